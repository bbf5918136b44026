//! The device-model area as `doppel run` sees it in the machine RAM file:
//! found only through the device-model locator (hv/abi `ioreq`), its
//! header copied out and validated once, then its ioreq page, buffered
//! page and liveness and interrupt words used through hv/abi's
//! [`SharedMem`] functions (every access atomic), and the guest's RAM
//! mapped again for the virtio queues as a `vm-memory` [`GuestRam`](super::GuestRam)
//! over the same file.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use doppel_abi::ioreq::{
    dirty_bit, dm_held, dm_locator_decode, guest_pages, irq_word, BufWrite, DmHeader, IoreqError,
    DM_ALIVE_OFFSET, DM_LOCATOR_MAGIC, DM_LOCATOR_OFFSET, DM_LOCATOR_WORDS, HV_ALIVE_OFFSET,
    IRQ_OFFSET, MAX_DEVICES, PAGE, QUIESCED_OFFSET, QUIESCE_OFFSET, RESUME_OFFSET,
};
use doppel_abi::locator::LOCATOR_AT;
use doppel_abi::{AtomicMem64, SharedMem};
use vm_memory::{FileOffset, GuestAddress};
use zerocopy::FromBytes;

use super::GuestRam;
use crate::machine::MachineRam;

/// Why the area cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    /// The locator holds no device-model magic (yet): `magic` is what it
    /// holds (0 while the hypervisor has not published).
    #[error(
        "{path}: device-model locator at {at:#x} holds {magic:#018x}, not \"DOPPELDL\" \
         (is the hypervisor running mode=linux with devices=?)"
    )]
    NotPublished { path: PathBuf, at: u64, magic: u64 },
    #[error("{path}: the {len}-byte file ends before the device-model locator at {at:#x}")]
    NoLocatorPage { path: PathBuf, at: u64, len: u64 },
    #[error("{path}: device-model locator at {at:#x}: {}", .err.text())]
    Locator {
        path: PathBuf,
        at: u64,
        err: IoreqError,
    },
    #[error("{path}: device-model area at {at:#x}: header refused: {}", .err.text())]
    Header {
        path: PathBuf,
        at: u64,
        err: IoreqError,
    },
    #[error("{path}: device-model area at {at:#x}: {what}")]
    Placement {
        path: PathBuf,
        at: u64,
        what: &'static str,
    },
    #[error("{path}: mapping guest RAM ({offset:#x}, {size:#x} bytes) for the queues: {err}")]
    GuestMap {
        path: PathBuf,
        offset: u64,
        size: u64,
        err: String,
    },
}

/// A published, validated device-model area.
pub struct Area {
    ram: MachineRam,
    at: usize,
    header: DmHeader,
    guest: GuestRam,
    irq_seq: [u32; MAX_DEVICES],
}

/// Machine address of the device-model locator.
pub const DM_LOCATOR_AT: u64 = LOCATOR_AT + DM_LOCATOR_OFFSET;

fn overlaps(a: u64, an: u64, b: u64, bn: u64) -> bool {
    a < b.saturating_add(bn) && b < a.saturating_add(an)
}

/// Read the locator's words (magic first, acquire: the hypervisor writes
/// it last, after a release fence).
fn locator_words(ram: &MachineRam) -> Result<[u64; DM_LOCATOR_WORDS], AreaError> {
    let len = ram.len() as u64;
    if DM_LOCATOR_AT + (DM_LOCATOR_WORDS as u64) * 8 > len {
        return Err(AreaError::NoLocatorPage {
            path: ram.path().into(),
            at: DM_LOCATOR_AT,
            len,
        });
    }
    let words = ram.words();
    let base = DM_LOCATOR_AT as usize / 8;
    let mut w = [0u64; DM_LOCATOR_WORDS];
    w[0] = u64::from_le(words[base].load(Ordering::Acquire));
    for (i, x) in w.iter_mut().enumerate().skip(1) {
        *x = u64::from_le(words[base + i].load(Ordering::Relaxed));
    }
    Ok(w)
}

impl Area {
    /// Find the area in `ram` through the device-model locator, validate
    /// its header (copied out first) and where it and guest RAM lie, and
    /// map guest RAM for the queues. On error `ram` comes back, so the
    /// caller can wait and try again.
    pub fn find(ram: MachineRam) -> Result<Self, (MachineRam, AreaError)> {
        match Self::check(&ram) {
            Ok((at, header, guest)) => {
                let mut irq_seq = [0u32; MAX_DEVICES];
                let mem = ram.mem();
                for (i, s) in irq_seq.iter_mut().enumerate() {
                    // Continue the sequence a previous device model left.
                    *s = mem.load_u32(at + IRQ_OFFSET + i * 8 + 4);
                }
                Ok(Self {
                    ram,
                    at,
                    header,
                    guest,
                    irq_seq,
                })
            }
            Err(e) => Err((ram, e)),
        }
    }

    fn check(ram: &MachineRam) -> Result<(usize, DmHeader, GuestRam), AreaError> {
        let path: PathBuf = ram.path().into();
        let len = ram.len() as u64;
        let words = locator_words(ram)?;
        if words[0] != DM_LOCATOR_MAGIC {
            return Err(AreaError::NotPublished {
                path,
                at: DM_LOCATOR_AT,
                magic: words[0],
            });
        }
        let (at, size) =
            dm_locator_decode(words, len, LOCATOR_AT).map_err(|err| AreaError::Locator {
                path: path.clone(),
                at: DM_LOCATOR_AT,
                err,
            })?;
        let mut b = vec![0u8; core::mem::size_of::<DmHeader>()];
        ram.mem().read_bytes(at as usize, &mut b);
        let header = DmHeader::read_from_bytes(&b).map_err(|_| AreaError::Placement {
            path: path.clone(),
            at,
            what: "header does not fit",
        })?;
        header.validate().map_err(|err| AreaError::Header {
            path: path.clone(),
            at,
            err,
        })?;
        let place = |what| AreaError::Placement {
            path: path.clone(),
            at,
            what,
        };
        if header.total_size > size {
            return Err(place("header's total_size exceeds what the locator gives"));
        }
        let (g, gn) = (header.guest_ram_at, header.guest_ram_size);
        if !g.is_multiple_of(PAGE as u64) || !gn.is_multiple_of(PAGE as u64) {
            return Err(place("guest RAM is not whole pages"));
        }
        if g.checked_add(gn).is_none_or(|e| e > len) {
            return Err(place("guest RAM lies beyond the machine RAM file"));
        }
        if overlaps(g, gn, at, size) {
            return Err(place(
                "the area lies in guest RAM (guest-writable); refused",
            ));
        }
        if overlaps(g, gn, LOCATOR_AT, PAGE as u64) {
            return Err(place(
                "guest RAM covers the locator page (guest-writable); refused",
            ));
        }
        let gmap = |err: String| AreaError::GuestMap {
            path: path.clone(),
            offset: g,
            size: gn,
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| gmap(e.to_string()))?;
        let gn_us = usize::try_from(gn).map_err(|e| gmap(e.to_string()))?;
        let guest = GuestRam::from_ranges_with_files([(
            GuestAddress(0),
            gn_us,
            Some(FileOffset::new(file, g)),
        )])
        .map_err(|e| gmap(e.to_string()))?;
        Ok((at as usize, header, guest))
    }

    /// The validated header (as copied out when found).
    pub fn header(&self) -> &DmHeader {
        &self.header
    }

    /// Machine address of the area.
    pub fn at(&self) -> u64 {
        self.at as u64
    }

    /// Guest RAM, guest-physical 0 first.
    pub fn guest(&self) -> &GuestRam {
        &self.guest
    }

    /// The machine RAM file.
    pub fn ram(&self) -> &MachineRam {
        &self.ram
    }

    /// Shared memory from the area's start.
    pub fn mem(&self) -> AtomicMem64<'_> {
        self.ram.window(self.at)
    }

    /// Offset (in [`Area::mem`]) of the ioreq page's slot for vCPU 0.
    pub fn ioreq_at(&self) -> usize {
        self.header.ioreq_page as usize
    }

    /// Offset (in [`Area::mem`]) of the buffered page.
    pub fn buffered_at(&self) -> usize {
        self.header.buffered_page as usize
    }

    fn load_u64(&self, offset: usize) -> u64 {
        u64::from_le(self.ram.words()[(self.at + offset) / 8].load(Ordering::Acquire))
    }

    /// The hypervisor's liveness word.
    pub fn hv_alive(&self) -> u64 {
        self.load_u64(HV_ALIVE_OFFSET)
    }

    /// Advance the device model's liveness word.
    pub fn beat(&self) {
        let v = self.load_u64(DM_ALIVE_OFFSET).wrapping_add(1);
        self.mem().store_u64(DM_ALIVE_OFFSET, v);
    }

    /// Ask the hypervisor for one edge on device slot `slot`'s GSI: the
    /// next sequence in its interrupt word (release: the used ring it
    /// signals is visible first).
    pub fn raise(&mut self, slot: usize) {
        let Some(dev) = self.header.devices().get(slot) else {
            return;
        };
        self.irq_seq[slot] = self.irq_seq[slot].wrapping_add(1);
        let mem = self.mem();
        mem.fence_release();
        mem.store_u64(IRQ_OFFSET + slot * 8, irq_word(self.irq_seq[slot], dev.gsi));
    }

    /// The window offset of a buffered write as a guest-physical address.
    pub fn buffered_addr(&self, w: &BufWrite) -> u64 {
        self.header.window_base + u64::from(w.offset)
    }

    /// The epoch the hypervisor asks the device model to end: `Some(E)`
    /// when `quiesce = E + 1` and the device model has not answered it.
    pub fn quiesce_requested(&self) -> Option<u64> {
        let asked = self.load_u64(QUIESCE_OFFSET);
        (asked != 0 && asked != self.load_u64(QUIESCED_OFFSET)).then(|| asked - 1)
    }

    /// Answer the hypervisor's quiesce of `epoch` (sealed): the bits of
    /// `pfns` (the guest pages the device model wrote since its last
    /// seal) ORed into the dirty bitmap, then, after a release fence,
    /// `quiesced = epoch + 1`. From then on the device model is
    /// [`Area::held`] until the hypervisor resumes it. A pfn beyond guest
    /// RAM is dropped; how many were is returned.
    pub fn answer_quiesce(&mut self, epoch: u64, pfns: impl IntoIterator<Item = u64>) -> u64 {
        let pages = guest_pages(self.header.guest_ram_size);
        let at = self.header.dirty_page as usize;
        let mem = self.mem();
        let mut dropped = 0;
        for pfn in pfns {
            if pfn >= pages {
                dropped += 1;
                continue;
            }
            let (off, bit) = dirty_bit(pfn);
            mem.or_u32(at + off, bit);
        }
        mem.fence_release();
        mem.store_u64(QUIESCED_OFFSET, epoch.wrapping_add(1));
        dropped
    }

    /// Whether the device model is held: it answered a quiesce the
    /// hypervisor has not resumed yet. It must not touch guest RAM then
    /// (it still beats its liveness word).
    pub fn held(&self) -> bool {
        dm_held(self.load_u64(QUIESCED_OFFSET), self.load_u64(RESUME_OFFSET))
    }
}
