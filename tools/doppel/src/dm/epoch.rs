//! The device model under replication (issue 21, docs/DEVICES.md "Under
//! replication"): epochs sealed at the hypervisor's quiesce (the state
//! blob, the disk writes, the frames transmitted, the guest pages the
//! device model wrote itself), frames held until their epoch commits, a
//! backup's device model restored from a blob, and the RARP announce a
//! backup sends when it takes over.

use std::collections::BTreeSet;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::mmio::Backend;
use super::{blob, Area, Backends, DeviceModel, DmError};

/// One disk write as applied to the primary's disk (byte offset, whole
/// sectors): the stream's type, which carries it to the backup.
pub use crate::stream::DiskWrite;

/// A sealed epoch: the device state at its end, the disk writes and the
/// transmitted frames it made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sealed {
    pub epoch: u64,
    pub state: Vec<u8>,
    pub disk: Vec<DiskWrite>,
    pub frames: Vec<Vec<u8>>,
}

/// Bytes of a guest page (the pfns reported).
const PAGE: u64 = 4096;
/// RARP's ethertype.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// RARP opcode "reverse request".
const RARP_REQUEST: u16 = 3;

/// The RARP self-announcement of `mac` (as a migrated NIC sends it, so
/// that the bridges learn the MAC's new port): broadcast, from `mac`,
/// Ethernet/IPv4 sizes, opcode 3, sender and target hardware address
/// `mac`, protocol addresses zero, padded to Ethernet's 60-byte minimum.
pub fn rarp_announce(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&RARP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac); // sender hardware
                                     // 28..32 sender protocol: 0
    f[32..38].copy_from_slice(&mac); // target hardware
                                     // 38..42 target protocol: 0, then padding
    f
}

impl DeviceModel {
    /// As [`DeviceModel::new`], replicated: frames the guest transmits
    /// are completed to it at once and held until their epoch commits,
    /// disk writes are applied at once and logged per epoch.
    pub fn replicated(area: Area, backends: &Backends) -> Result<Self, DmError> {
        let mut dm = Self::new(area, backends)?;
        dm.replicated = true;
        for d in &mut dm.devices {
            match &mut d.backend {
                Backend::Net(n) => n.set_hold(true),
                Backend::Blk(b) => b.set_log(true),
            }
        }
        Ok(dm)
    }

    /// Whether frames are held and disk writes logged.
    pub fn is_replicated(&self) -> bool {
        self.replicated
    }

    /// A backup's device model: the devices `area` declares, backed by
    /// `backends`, continuing where the blob `state` left them (every
    /// field checked first: on error nothing is opened or built). A
    /// device whose interrupt status is nonzero raises its interrupt at
    /// the first step. It runs unreplicated (frames sent at once).
    pub fn restore(area: Area, backends: &Backends, state: &[u8]) -> Result<Self, DmError> {
        let kinds: Vec<u32> = area.header().devices().iter().map(|d| d.kind).collect();
        let states = blob::decode(state, &kinds, area.guest())?;
        let mut dm = Self::new(area, backends)?;
        for (slot, s) in states.iter().enumerate() {
            let guest = dm.area.guest();
            if let Err(why) = dm.devices[slot].restore(s, guest) {
                return Err(blob::StateError {
                    at: 0,
                    field: format!("device {slot}"),
                    why,
                }
                .into());
            }
            dm.pending_irq[slot] = s.isr != 0;
        }
        Ok(dm)
    }

    /// The state blob of every device now.
    pub fn state(&self) -> Vec<u8> {
        let devs: Vec<_> = self.devices.iter().map(|d| d.snapshot()).collect();
        blob::encode(&devs)
    }

    /// End epoch `epoch` (the hypervisor's quiesce; no request in flight):
    /// record its state blob, disk writes and held frames, and return the
    /// guest pfns the device model wrote since the last seal, ascending
    /// (the dirty bitmap is cleared).
    pub fn seal_epoch(&mut self, epoch: u64) -> Vec<u64> {
        let state = self.state();
        let mut disk = Vec::new();
        let mut frames = Vec::new();
        for d in &mut self.devices {
            match &mut d.backend {
                Backend::Net(n) => frames.extend(n.take_held()),
                Backend::Blk(b) => disk.extend(b.take_log()),
            }
        }
        if let Some(last) = self.sealed.back() {
            if last.epoch >= epoch {
                tracing::warn!(
                    "run: epoch {epoch} sealed after epoch {}; commits go in seal order",
                    last.epoch
                );
            }
        }
        self.sealed.push_back(Sealed {
            epoch,
            state,
            disk,
            frames,
        });
        self.take_dirty()
    }

    /// The guest pfns written through the device model's mapping since
    /// the last call, ascending; clears the bitmap.
    fn take_dirty(&self) -> Vec<u64> {
        let mut pfns = BTreeSet::new();
        for region in self.area.guest().iter() {
            // The whole region's bitmap (the trait's is a slice of it).
            let mapping: &MmapRegion<AtomicBitmap> = region;
            let bm = mapping.bitmap();
            let (bits, bytes) = (bm.len() as u64, bm.byte_size() as u64);
            if bits == 0 {
                continue;
            }
            let page = bytes.div_ceil(bits);
            let base = region.start_addr().0;
            for (w, word) in bm.get_and_reset().into_iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let start = base + bit * page;
                    let end = (start + page).min(base + bytes);
                    pfns.extend(start / PAGE..end.div_ceil(PAGE));
                }
            }
        }
        pfns.into_iter().collect()
    }

    /// Every disk's bytes as 1 MiB writes, read now (a new backup's
    /// initial sync; the device model writes nothing while its caller
    /// holds it).
    pub fn whole_disk(&mut self) -> std::io::Result<Vec<DiskWrite>> {
        let mut out = Vec::new();
        for d in &mut self.devices {
            if let Backend::Blk(b) = &mut d.backend {
                out.extend(b.whole(1 << 20)?);
            }
        }
        Ok(out)
    }

    /// Sealed epoch `epoch`'s state blob and disk writes (once; `None`
    /// if it was never sealed, was committed, or was taken).
    pub fn take_sealed(&mut self, epoch: u64) -> Option<(Vec<u8>, Vec<DiskWrite>)> {
        let s = self
            .sealed
            .iter_mut()
            .find(|s| s.epoch == epoch && !s.state.is_empty())?;
        Some((std::mem::take(&mut s.state), std::mem::take(&mut s.disk)))
    }

    /// Epochs up to `epoch` committed on the backup: send their held
    /// frames on the TAP, oldest first, and forget them. Frames of later
    /// or unsealed epochs stay held. The frames sent.
    pub fn commit(&mut self, epoch: u64) -> usize {
        let mut sent = 0;
        while self.sealed.front().is_some_and(|s| s.epoch <= epoch) {
            let Some(s) = self.sealed.pop_front() else {
                break;
            };
            for f in &s.frames {
                if self.send(f) {
                    sent += 1;
                }
            }
        }
        sent
    }

    /// Frames transmitted by the guest and not yet sent (sealed epochs
    /// and the epoch in progress).
    pub fn held_frames(&self) -> usize {
        let sealed: usize = self.sealed.iter().map(|s| s.frames.len()).sum();
        let open: usize = self
            .devices
            .iter()
            .map(|d| match &d.backend {
                Backend::Net(n) => n.held(),
                Backend::Blk(_) => 0,
            })
            .sum();
        sealed + open
    }

    /// Drop every held frame unsent (epochs that will never commit); the
    /// frames dropped.
    pub fn discard_uncommitted(&mut self) -> usize {
        let mut n = 0;
        for s in &mut self.sealed {
            n += std::mem::take(&mut s.frames).len();
        }
        for d in &mut self.devices {
            if let Backend::Net(net) = &mut d.backend {
                n += net.take_held().len();
            }
        }
        n
    }

    /// Announce the NIC's MAC on its TAP ([`rarp_announce`]), as a backup
    /// does when it takes over; whether it was sent.
    pub fn announce(&mut self) -> bool {
        let mac = self.devices.iter().find_map(|d| match &d.backend {
            Backend::Net(n) => Some(n.mac),
            Backend::Blk(_) => None,
        });
        match mac {
            Some(mac) => self.send(&rarp_announce(mac)),
            None => false,
        }
    }

    /// Send `frame` on the (one) NIC's TAP now.
    fn send(&mut self, frame: &[u8]) -> bool {
        for d in &mut self.devices {
            if let Backend::Net(n) = &mut d.backend {
                return match n.send(frame) {
                    Ok(()) => true,
                    Err(e) => {
                        self.stats.errors += 1;
                        tracing::warn!("run: net: TAP {}: send: {e}", n.tap_name());
                        false
                    }
                };
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rarp_announce_is_byte_exact() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let mut want = vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // from the NIC
            0x80, 0x35, // RARP
            0x00, 0x01, 0x08, 0x00, 6, 4, // Ethernet, IPv4, sizes
            0x00, 0x03, // reverse request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sender
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // target
        ];
        want.resize(60, 0);
        assert_eq!(rarp_announce(mac).to_vec(), want);
    }
}
