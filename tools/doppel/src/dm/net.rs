//! virtio-net (device id 1) over a TAP device: VERSION_1 and MAC offered
//! (config: the MAC), queue 0 receive, queue 1 transmit, the 12-byte
//! `virtio_net_hdr_v1` before each frame (no offloads: the header we
//! write is all zero but `num_buffers` = 1, the one we read is skipped).

use std::io::{Read, Write};

use super::{Dirty, GuestRam};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::tap::Tap;
use super::Stats;

/// Bytes of `virtio_net_hdr_v1`.
pub const NET_HDR: usize = 12;
/// The largest frame carried (Ethernet with a VLAN tag at MTU 1500 is
/// 1522; a TAP read is never larger than 64 KiB).
pub const MAX_FRAME: usize = 65_536;

/// Features offered besides VERSION_1.
pub const FEATURES: u64 = 1 << VIRTIO_NET_F_MAC;

/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;

/// A virtio-net device.
pub struct Net {
    pub mac: [u8; 6],
    tap: Tap,
    buf: Vec<u8>,
    /// Under replication: the frames the guest transmitted in the epoch
    /// in progress, completed to it but not yet sent (docs/DEVICES.md).
    hold: Option<Vec<Vec<u8>>>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            mac,
            tap,
            buf: vec![0; MAX_FRAME],
            hold: None,
        }
    }

    /// Hold transmitted frames (replicated) or send them at once.
    pub fn set_hold(&mut self, on: bool) {
        self.hold = on.then(Vec::new);
    }

    /// The frames held since the last take (the epoch in progress).
    pub fn take_held(&mut self) -> Vec<Vec<u8>> {
        self.hold.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Frames held for the epoch in progress.
    pub fn held(&self) -> usize {
        self.hold.as_ref().map_or(0, Vec::len)
    }

    /// Send one frame on the TAP now.
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.tap.send(frame)
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn features(&self) -> u64 {
        FEATURES
    }

    pub fn config(&self) -> Vec<u8> {
        self.mac.to_vec()
    }

    /// The guest notified queue `q`: transmit what the transmit queue
    /// holds (a receive notify only posts buffers, taken as frames come).
    pub fn notify(
        &mut self,
        q: usize,
        queues: &mut [Queue],
        mem: &GuestRam,
        stats: &mut Stats,
    ) -> bool {
        if q != TXQ {
            return false;
        }
        let Some(queue) = queues.get_mut(TXQ) else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match Reader::new(mem, chain) {
                Ok(mut r) => self.transmit(&mut r, stats),
                Err(e) => {
                    stats.errors += 1;
                    tracing::warn!("run: net: transmit chain {head} refused: {e}");
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                stats.errors += 1;
                tracing::warn!("run: net: transmit used ring: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn transmit(&mut self, r: &mut Reader<'_, Dirty<'_>>, stats: &mut Stats) {
        let n = r.available_bytes();
        if !(NET_HDR..=NET_HDR + MAX_FRAME).contains(&n) {
            stats.errors += 1;
            tracing::warn!(
                "run: net: a {n}-byte transmit buffer dropped (header {NET_HDR} bytes, frame at most {MAX_FRAME})"
            );
            return;
        }
        let mut hdr = [0u8; NET_HDR];
        let frame = &mut self.buf[..n - NET_HDR];
        if let Err(e) = r.read_exact(&mut hdr).and_then(|()| r.read_exact(frame)) {
            stats.errors += 1;
            tracing::warn!("run: net: reading a transmit buffer: {e}");
            return;
        }
        if let Some(hold) = &mut self.hold {
            hold.push(frame.to_vec());
            stats.tx_frames += 1;
            return;
        }
        match self.tap.send(frame) {
            Ok(()) => stats.tx_frames += 1,
            Err(e) => {
                stats.errors += 1;
                tracing::warn!("run: net: TAP {}: send: {e}", self.tap.name());
            }
        }
    }

    /// Move the frames waiting on the TAP into receive buffers the guest
    /// posted (`rx_ready`: the driver is live and queue 0 ready); a frame
    /// with no buffer for it is dropped and counted.
    pub fn poll(
        &mut self,
        rx_ready: bool,
        rxq: &mut Queue,
        mem: &GuestRam,
        stats: &mut Stats,
    ) -> bool {
        let mut used = false;
        // A bounded batch: the loop also serves the ioreq slot.
        for _ in 0..64 {
            let n = match self.tap.recv(&mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    stats.errors += 1;
                    tracing::warn!("run: net: TAP {}: receive: {e}", self.tap.name());
                    break;
                }
            };
            let chain = if rx_ready {
                rxq.pop_descriptor_chain(mem)
            } else {
                None
            };
            let Some(chain) = chain else {
                stats.rx_dropped += 1;
                continue;
            };
            let head = chain.head_index();
            let written = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= NET_HDR + n => {
                    let mut hdr = [0u8; NET_HDR];
                    hdr[10] = 1; // num_buffers, little-endian 1
                    match w.write_all(&hdr).and_then(|()| w.write_all(&self.buf[..n])) {
                        Ok(()) => Some(NET_HDR + n),
                        Err(e) => {
                            tracing::warn!("run: net: writing a receive buffer: {e}");
                            None
                        }
                    }
                }
                Ok(w) => {
                    tracing::warn!(
                        "run: net: a {n}-byte frame dropped: receive buffer {head} holds {} bytes",
                        w.available_bytes()
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!("run: net: receive chain {head} refused: {e}");
                    None
                }
            };
            // The buffer goes back either way (empty when nothing fit).
            let len = written.unwrap_or(0);
            match written {
                Some(_) => stats.rx_frames += 1,
                None => stats.rx_dropped += 1,
            }
            if let Err(e) = rxq.add_used(mem, head, len as u32) {
                stats.errors += 1;
                tracing::warn!("run: net: receive used ring: {e}");
                break;
            }
            used = true;
        }
        used
    }
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<_> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("MAC {s:?}: six hex bytes separated by ':'"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("MAC {s:?}: {p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC {s:?} is a multicast address"));
    }
    Ok(mac)
}
