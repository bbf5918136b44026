//! The device model's state blob (issue 21): what a backup needs to
//! continue every virtio transport and queue where the primary's epoch
//! ended. Little-endian, versioned, no padding:
//!
//! ```text
//! "DOPPELDS"  u32 version (1)  u32 device count
//! per device:  u32 kind (hv/abi device::NET | BLK)
//!              u32 status  u32 device_features_sel  u32 driver_features_sel
//!              u64 driver_features  u32 queue_sel  u32 interrupt_status
//!              u32 config_generation  u32 queue count
//!   per queue: u8 ready  u16 size  u64 desc  u64 avail  u64 used
//!              u16 next_avail  u16 next_used  u8 event_idx
//! ```
//!
//! The blob comes from a peer: [`decode`] checks every field against the
//! devices the area declares and the guest RAM they serve, and names the
//! first that is wrong; it builds nothing until all of it is checked.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::mmio::{self, QUEUE_MAX};
use super::GuestRam;

/// The blob's first bytes.
pub const MAGIC: &[u8; 8] = b"DOPPELDS";
/// The layout this code writes and reads.
pub const VERSION: u32 = 1;
/// Devices a blob may describe at most (the area declares fewer).
const MAX_DEVICES: u32 = 64;

/// One queue's registers and positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRegs {
    pub ready: bool,
    pub size: u16,
    /// Descriptor table, driver (avail) ring, device (used) ring, as the
    /// driver wrote them.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// One transport's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevState {
    /// hv/abi's `device::NET` or `device::BLK`.
    pub kind: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub isr: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueRegs>,
}

/// Why a blob was refused: where, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("device state blob, byte {at}: {field}: {why}")]
pub struct StateError {
    pub at: usize,
    pub field: String,
    pub why: String,
}

/// The blob of `devices`, in slot order.
pub fn encode(devices: &[DevState]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + devices.len() * 96);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(devices.len() as u32).to_le_bytes());
    for d in devices {
        for v in [
            d.kind,
            d.status,
            d.device_features_sel,
            d.driver_features_sel,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&d.driver_features.to_le_bytes());
        for v in [
            d.queue_sel,
            d.isr,
            d.config_generation,
            d.queues.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for q in &d.queues {
            b.push(u8::from(q.ready));
            b.extend_from_slice(&q.size.to_le_bytes());
            for a in [q.desc, q.avail, q.used] {
                b.extend_from_slice(&a.to_le_bytes());
            }
            b.extend_from_slice(&q.next_avail.to_le_bytes());
            b.extend_from_slice(&q.next_used.to_le_bytes());
            b.push(u8::from(q.event_idx));
        }
    }
    b
}

/// A cursor over the blob that names what it reads.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cur<'_> {
    fn err(&self, at: usize, field: &str, why: impl Into<String>) -> StateError {
        StateError {
            at,
            field: field.into(),
            why: why.into(),
        }
    }

    fn take<const N: usize>(&mut self, field: &str) -> Result<([u8; N], usize), StateError> {
        let at = self.at;
        let Some(s) = self.b.get(at..at.saturating_add(N)) else {
            return Err(self.err(
                at,
                field,
                format!("truncated ({} bytes, {N} more needed)", self.b.len()),
            ));
        };
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        self.at += N;
        Ok((a, at))
    }

    fn u8(&mut self, field: &str) -> Result<(u8, usize), StateError> {
        self.take::<1>(field).map(|(a, at)| (a[0], at))
    }

    fn u16(&mut self, field: &str) -> Result<(u16, usize), StateError> {
        self.take(field).map(|(a, at)| (u16::from_le_bytes(a), at))
    }

    fn u32(&mut self, field: &str) -> Result<(u32, usize), StateError> {
        self.take(field).map(|(a, at)| (u32::from_le_bytes(a), at))
    }

    fn u64(&mut self, field: &str) -> Result<(u64, usize), StateError> {
        self.take(field).map(|(a, at)| (u64::from_le_bytes(a), at))
    }

    fn flag(&mut self, field: &str) -> Result<bool, StateError> {
        match self.u8(field)? {
            (0, _) => Ok(false),
            (1, _) => Ok(true),
            (v, at) => Err(self.err(at, field, format!("{v} is neither 0 nor 1"))),
        }
    }
}

/// Status bits a driver may set.
const STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED;

/// Decode and check a blob for the devices `kinds` (the area's, in slot
/// order) over `guest`: every field, before anything is built.
pub fn decode(blob: &[u8], kinds: &[u32], guest: &GuestRam) -> Result<Vec<DevState>, StateError> {
    let mut c = Cur { b: blob, at: 0 };
    let (magic, at) = c.take::<8>("magic")?;
    if &magic != MAGIC {
        return Err(c.err(at, "magic", format!("{magic:02x?} is not \"DOPPELDS\"")));
    }
    let (v, at) = c.u32("version")?;
    if v != VERSION {
        return Err(c.err(at, "version", format!("{v} (this build reads {VERSION})")));
    }
    let (n, at) = c.u32("device count")?;
    if n > MAX_DEVICES || n as usize != kinds.len() {
        return Err(c.err(
            at,
            "device count",
            format!("{n}, but the hypervisor declares {}", kinds.len()),
        ));
    }
    let mut out = Vec::with_capacity(kinds.len());
    for (slot, &want) in kinds.iter().enumerate() {
        let f = |name: &str| format!("device {slot} {name}");
        let (kind, at) = c.u32(&f("kind"))?;
        if kind != want {
            return Err(c.err(
                at,
                &f("kind"),
                format!("{kind}, but the hypervisor declares {want} in this slot"),
            ));
        }
        let offered = mmio::offered_features(kind);
        let nq = mmio::queue_count(kind);
        let (status, at) = c.u32(&f("status"))?;
        if status & !STATUS_BITS != 0 {
            return Err(c.err(at, &f("status"), format!("{status:#x} has unknown bits")));
        }
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err(c.err(at, &f("status"), "DRIVER_OK without FEATURES_OK"));
        }
        let (device_features_sel, _) = c.u32(&f("device feature select"))?;
        let (driver_features_sel, _) = c.u32(&f("driver feature select"))?;
        let (driver_features, at) = c.u64(&f("driver features"))?;
        if status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && driver_features & !offered != 0 {
            return Err(c.err(
                at,
                &f("driver features"),
                format!(
                    "{:#x} accepted but never offered",
                    driver_features & !offered
                ),
            ));
        }
        let (queue_sel, _) = c.u32(&f("queue select"))?;
        let (isr, at) = c.u32(&f("interrupt status"))?;
        if isr & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return Err(c.err(
                at,
                &f("interrupt status"),
                format!("{isr:#x} has unknown bits"),
            ));
        }
        let (config_generation, _) = c.u32(&f("config generation"))?;
        let (qn, at) = c.u32(&f("queue count"))?;
        if qn as usize != nq {
            return Err(c.err(
                at,
                &f("queue count"),
                format!("{qn}, but this device has {nq}"),
            ));
        }
        let mut queues = Vec::with_capacity(nq);
        for q in 0..nq {
            let g = |name: &str| format!("device {slot} queue {q} {name}");
            let ready = c.flag(&g("ready"))?;
            let (size, at) = c.u16(&g("size"))?;
            if size == 0 || !size.is_power_of_two() || size > QUEUE_MAX {
                return Err(c.err(
                    at,
                    &g("size"),
                    format!("{size} (a power of two up to {QUEUE_MAX})"),
                ));
            }
            let (desc, _) = c.u64(&g("descriptor table"))?;
            let (avail, _) = c.u64(&g("driver ring"))?;
            let (used, at_used) = c.u64(&g("device ring"))?;
            let (next_avail, _) = c.u16(&g("next avail"))?;
            let (next_used, _) = c.u16(&g("next used"))?;
            let at = c.at;
            let event_idx = c.flag(&g("event idx"))?;
            if event_idx {
                return Err(c.err(at, &g("event idx"), "set, but EVENT_IDX is never offered"));
            }
            let regs = QueueRegs {
                ready,
                size,
                desc,
                avail,
                used,
                next_avail,
                next_used,
                event_idx,
            };
            if ready {
                if let Err(why) = queue_from(&regs, guest) {
                    return Err(c.err(at_used, &g("rings"), why));
                }
            }
            queues.push(regs);
        }
        out.push(DevState {
            kind,
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            isr,
            config_generation,
            queues,
        });
    }
    if c.at != blob.len() {
        return Err(c.err(
            c.at,
            "end",
            format!("{} bytes after the last device", blob.len() - c.at),
        ));
    }
    Ok(out)
}

/// A `virtio-queue` queue set to `regs`, its rings checked inside
/// `guest` when it is ready.
pub fn queue_from(regs: &QueueRegs, guest: &GuestRam) -> Result<Queue, String> {
    let mut q = Queue::new(QUEUE_MAX).map_err(|e| e.to_string())?;
    q.try_set_size(regs.size).map_err(|e| e.to_string())?;
    q.set_next_avail(regs.next_avail);
    q.set_next_used(regs.next_used);
    q.set_event_idx(regs.event_idx);
    if regs.ready {
        let (d, a, u) = (regs.desc, regs.avail, regs.used);
        q.try_set_desc_table_address(GuestAddress(d))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(a)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(u)))
            .map_err(|e| format!("desc {d:#x} avail {a:#x} used {u:#x}: {e}"))?;
        q.set_ready(true);
        if !q.is_valid(guest) {
            return Err(format!(
                "desc {d:#x} avail {a:#x} used {u:#x}: not inside guest RAM"
            ));
        }
    }
    Ok(q)
}

/// Anonymous guest RAM of `bytes` from guest-physical 0 (tests, fuzzing).
pub fn anonymous_guest(bytes: usize) -> Result<GuestRam, String> {
    GuestRam::from_ranges(&[(GuestAddress(0), bytes)]).map_err(|e| e.to_string())
}

/// The fuzz target's input: the first byte picks the devices declared
/// (0: blk, 1: net, 2: net + blk, 3: none; modulo 4), the rest is the
/// blob, decoded over 1 MiB of guest RAM. What decodes must encode back
/// to the same bytes (one meaning per blob).
pub fn fuzz_one(data: &[u8], guest: &GuestRam) -> Result<Vec<DevState>, StateError> {
    use doppel_abi::ioreq::device::{BLK, NET};
    let Some((&pick, blob)) = data.split_first() else {
        return Err(StateError {
            at: 0,
            field: "fuzz input".into(),
            why: "empty".into(),
        });
    };
    let kinds: &[u32] = match pick % 4 {
        0 => &[BLK],
        1 => &[NET],
        2 => &[NET, BLK],
        _ => &[],
    };
    let got = decode(blob, kinds, guest)?;
    assert_eq!(encode(&got), blob, "a decoded blob encodes back to itself");
    Ok(got)
}

/// Bytes of guest RAM the fuzz target decodes over.
pub const FUZZ_GUEST: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::ioreq::device::{BLK, NET};
    use proptest::prelude::*;

    fn live_blk() -> DevState {
        DevState {
            kind: BLK,
            status: 0xf,
            device_features_sel: 1,
            driver_features_sel: 1,
            driver_features: 1 << 32,
            queue_sel: 0,
            isr: 1,
            config_generation: 0,
            queues: vec![QueueRegs {
                ready: true,
                size: 8,
                desc: 0x8000,
                avail: 0x8100,
                used: 0x8200,
                next_avail: 3,
                next_used: 3,
                event_idx: false,
            }],
        }
    }

    fn fresh(kind: u32) -> DevState {
        DevState {
            kind,
            queues: vec![
                QueueRegs {
                    size: QUEUE_MAX,
                    ..QueueRegs::default()
                };
                mmio::queue_count(kind)
            ],
            ..DevState::default()
        }
    }

    fn guest() -> GuestRam {
        anonymous_guest(FUZZ_GUEST).unwrap()
    }

    #[test]
    fn a_blob_round_trips() {
        let g = guest();
        let devs = vec![fresh(NET), live_blk()];
        let b = encode(&devs);
        assert_eq!(decode(&b, &[NET, BLK], &g), Ok(devs));
    }

    #[test]
    fn the_fuzz_seeds_mean_what_their_names_say() {
        let g = guest();
        let seed = |name: &str| {
            std::fs::read(format!(
                "{}/fuzz/corpus/dm_state/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        assert_eq!(fuzz_one(&seed("blk_live"), &g), Ok(vec![live_blk()]));
        assert_eq!(
            fuzz_one(&seed("net_blk_fresh"), &g),
            Ok(vec![fresh(NET), fresh(BLK)])
        );
        let e = fuzz_one(&seed("blk_rings_outside"), &g).unwrap_err();
        assert_eq!(e.field, "device 0 queue 0 rings");
    }

    proptest! {
        #[test]
        fn every_truncation_is_refused(cut in 0usize..1000) {
            let g = guest();
            let b = encode(&[fresh(NET), live_blk()]);
            let cut = cut % b.len();
            let e = decode(&b[..cut], &[NET, BLK], &g).unwrap_err();
            prop_assert!(e.why.contains("truncated"), "{e}");
        }

        #[test]
        fn a_mutated_blob_is_refused_or_means_exactly_its_bytes(
            at in 0usize..1000,
            x in 1u8..=255,
            extra in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let g = guest();
            let mut b = encode(&[fresh(NET), live_blk()]);
            let at = at % b.len();
            b[at] ^= x;
            b.extend_from_slice(&extra);
            let mut input = vec![2u8];
            input.extend_from_slice(&b);
            // No panic; what is accepted encodes back to these bytes.
            if let Ok(devs) = fuzz_one(&input, &g) {
                prop_assert!(extra.is_empty(), "trailing bytes accepted");
                prop_assert_eq!(encode(&devs), b);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let g = guest();
            let _ = fuzz_one(&data, &g);
        }
    }
}
