//! The virtio-mmio transport (virtio 1.x, register layout version 2), one
//! instance per declared device: feature negotiation, queue set-up into
//! `virtio-queue`'s [`Queue`], status and interrupt status. It refuses
//! what the spec forbids the driver (writes to read-only registers, queue
//! set-up after DRIVER_OK, a feature set without VERSION_1 or beyond what
//! was offered) with a log line, changing nothing.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::GuestRam;

use doppel_abi::ioreq::device;

use super::blk::Blk;
use super::blob::{self, DevState, QueueRegs};
use super::net::Net;
use super::Stats;

/// virtio-mmio's magic, "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// Register layout version (virtio 1.x).
pub const VERSION: u32 = 2;
/// VendorID: "DPPL".
pub const VENDOR: u32 = u32::from_le_bytes(*b"DPPL");
/// Entries each queue offers at most.
pub const QUEUE_MAX: u16 = 256;

/// The features a device of hv/abi kind `kind` offers.
pub fn offered_features(kind: u32) -> u64 {
    let dev = if kind == device::NET {
        super::net::FEATURES
    } else {
        super::blk::FEATURES
    };
    dev | (1 << VIRTIO_F_VERSION_1)
}

/// The queues a device of hv/abi kind `kind` has.
pub fn queue_count(kind: u32) -> usize {
    if kind == device::NET {
        2
    } else {
        1
    }
}

/// The device behind a transport.
pub enum Backend {
    Net(Net),
    Blk(Blk),
}

impl Backend {
    /// hv/abi's device kind.
    pub fn kind(&self) -> u32 {
        match self {
            Backend::Net(_) => device::NET,
            Backend::Blk(_) => device::BLK,
        }
    }

    fn device_id(&self) -> u32 {
        match self {
            Backend::Net(_) => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            Backend::Blk(_) => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
        }
    }

    fn features(&self) -> u64 {
        offered_features(self.kind())
    }

    fn queues(&self) -> usize {
        queue_count(self.kind())
    }

    fn config(&self) -> Vec<u8> {
        match self {
            Backend::Net(n) => n.config(),
            Backend::Blk(b) => b.config(),
        }
    }
}

/// One virtio-mmio device.
pub struct Mmio {
    pub name: String,
    pub backend: Backend,
    queues: Vec<Queue>,
    /// Addresses the driver wrote, per queue: desc, driver (avail), device (used).
    addrs: Vec<[u64; 3]>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    isr: u32,
    config_generation: u32,
}

/// What an access did that the caller must follow up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// The device added to a used ring: raise its interrupt.
    pub interrupt: bool,
}

impl Mmio {
    pub fn new(name: String, backend: Backend) -> Self {
        let n = backend.queues();
        let mut m = Self {
            name,
            backend,
            queues: Vec::new(),
            addrs: vec![[0; 3]; n],
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            isr: 0,
            config_generation: 0,
        };
        m.queues = (0..n).map(|_| new_queue()).collect();
        m
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The transport's state for the epoch's blob.
    pub fn snapshot(&self) -> DevState {
        DevState {
            kind: self.backend.kind(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            isr: self.isr,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .zip(&self.addrs)
                .map(|(q, a)| QueueRegs {
                    ready: q.ready(),
                    size: q.size(),
                    desc: a[0],
                    avail: a[1],
                    used: a[2],
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    /// Take over `s` (checked by [`blob::decode`] for this device's kind
    /// and `guest`); on error nothing is changed.
    pub fn restore(&mut self, s: &DevState, guest: &GuestRam) -> Result<(), String> {
        if s.kind != self.backend.kind() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "{}: state of a device of kind {} with {} queues",
                self.name,
                s.kind,
                s.queues.len()
            ));
        }
        let queues = s
            .queues
            .iter()
            .map(|r| blob::queue_from(r, guest))
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.addrs = s.queues.iter().map(|r| [r.desc, r.avail, r.used]).collect();
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.isr = s.isr;
        self.config_generation = s.config_generation;
        Ok(())
    }

    /// The interrupt status register.
    pub fn isr(&self) -> u32 {
        self.isr
    }

    /// Whether the driver finished set-up (DRIVER_OK).
    pub fn live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        for a in &mut self.addrs {
            *a = [0; 3];
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.isr = 0;
    }

    fn refuse(&self, what: &str) {
        tracing::warn!("run: {}: refused: {what}", self.name);
    }

    /// A read of `size` bytes at `offset` in the registers.
    pub fn read(&mut self, offset: u64, size: u8) -> u64 {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let cfg = self.backend.config();
            let start = (offset - u64::from(VIRTIO_MMIO_CONFIG)) as usize;
            let mut b = [0u8; 8];
            for (i, x) in b.iter_mut().take(size as usize).enumerate() {
                *x = cfg.get(start + i).copied().unwrap_or(0);
            }
            return u64::from_le_bytes(b);
        }
        if size != 4 || !offset.is_multiple_of(4) {
            self.refuse(&format!(
                "a {size}-byte read at register {offset:#x} (registers are 32-bit)"
            ));
            return 0;
        }
        let q = self.queue_sel as usize;
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.backend.device_id(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.backend.features() as u32,
                1 => (self.backend.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                if q < self.queues.len() {
                    u32::from(QUEUE_MAX)
                } else {
                    0
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.queues.get(q).is_some_and(|q| q.ready()) as u32,
            VIRTIO_MMIO_INTERRUPT_STATUS => self.isr,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            other => {
                self.refuse(&format!(
                    "a read of write-only or unknown register {other:#x}"
                ));
                0
            }
        };
        u64::from(v)
    }

    /// A write of `data` (`size` bytes) at `offset` in the registers.
    pub fn write(
        &mut self,
        offset: u64,
        size: u8,
        data: u64,
        mem: &GuestRam,
        stats: &mut Stats,
    ) -> Effect {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.refuse(&format!(
                "a write to config space at {offset:#x} (read-only for this device)"
            ));
            return Effect::default();
        }
        if size != 4 || !offset.is_multiple_of(4) {
            self.refuse(&format!(
                "a {size}-byte write at register {offset:#x} (registers are 32-bit)"
            ));
            return Effect::default();
        }
        let v = data as u32;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    self.refuse("DriverFeatures written after FEATURES_OK");
                } else {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        s if v != 0 => {
                            self.refuse(&format!("driver feature bits in bank {s} (none offered)"))
                        }
                        _ => {}
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.queue_setup(offset as u32, v, mem),
            VIRTIO_MMIO_QUEUE_NOTIFY => return self.notify(v, mem, stats),
            VIRTIO_MMIO_INTERRUPT_ACK => self.isr &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            other => self.refuse(&format!(
                "a write to read-only or unknown register {other:#x}"
            )),
        }
        Effect::default()
    }

    fn queue_setup(&mut self, reg: u32, v: u32, mem: &GuestRam) {
        let q = self.queue_sel as usize;
        if self.live() {
            self.refuse(&format!(
                "queue {q} set-up (register {reg:#x}) after DRIVER_OK"
            ));
            return;
        }
        let Some(queue) = self.queues.get_mut(q) else {
            tracing::warn!(
                "run: {}: refused: set-up of queue {q}, which does not exist",
                self.name
            );
            return;
        };
        if queue.ready() && reg != VIRTIO_MMIO_QUEUE_READY {
            self.refuse(&format!(
                "queue {q} set-up (register {reg:#x}) while it is ready"
            ));
            return;
        }
        let set = |a: &mut u64, high: bool| {
            *a = if high {
                (*a & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*a & !0xffff_ffff) | u64::from(v)
            }
        };
        let addrs = &mut self.addrs[q];
        match reg {
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Err(e) = queue.try_set_size(v.try_into().unwrap_or(0)) {
                    let name = &self.name;
                    tracing::warn!(
                        "run: {name}: refused: queue {q} size {v} ({e}; a power of two up to {QUEUE_MAX})"
                    );
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => set(&mut addrs[0], false),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set(&mut addrs[0], true),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set(&mut addrs[1], false),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set(&mut addrs[1], true),
            VIRTIO_MMIO_QUEUE_USED_LOW => set(&mut addrs[2], false),
            VIRTIO_MMIO_QUEUE_USED_HIGH => set(&mut addrs[2], true),
            _ => {
                // QueueReady.
                if v == 0 {
                    queue.set_ready(false);
                    return;
                }
                let [d, a, u] = *addrs;
                let placed = queue
                    .try_set_desc_table_address(GuestAddress(d))
                    .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(a)))
                    .and_then(|()| queue.try_set_used_ring_address(GuestAddress(u)));
                queue.set_ready(true);
                let problem = match placed {
                    Err(e) => Some(format!("{e}")),
                    Ok(()) if !queue.is_valid(mem) => Some("rings not inside guest RAM".into()),
                    Ok(()) => None,
                };
                if let Some(p) = problem {
                    queue.set_ready(false);
                    let name = &self.name;
                    tracing::warn!(
                        "run: {name}: refused: queue {q} ready with desc {d:#x} avail {a:#x} used {u:#x}: {p}"
                    );
                }
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly = v & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.backend.features();
            if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                self.refuse("FEATURES_OK without VERSION_1 (legacy drivers are not served)");
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else if self.driver_features & !offered != 0 {
                self.refuse(&format!(
                    "FEATURES_OK with features {:#x} never offered",
                    self.driver_features & !offered
                ));
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            self.refuse("DRIVER_OK before FEATURES_OK was accepted");
            v &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        if self.status & !v != 0 {
            self.refuse("clearing status bits other than by a reset (writing 0)");
            return;
        }
        self.status = v;
    }

    fn notify(&mut self, q: u32, mem: &GuestRam, stats: &mut Stats) -> Effect {
        let q = q as usize;
        if !self.live() {
            self.refuse(&format!("notify of queue {q} before DRIVER_OK"));
            return Effect::default();
        }
        let Some(queue) = self.queues.get(q) else {
            self.refuse(&format!("notify of queue {q}, which does not exist"));
            return Effect::default();
        };
        if !queue.ready() {
            self.refuse(&format!("notify of queue {q}, which is not ready"));
            return Effect::default();
        }
        let used = match &mut self.backend {
            Backend::Net(n) => n.notify(q, &mut self.queues, mem, stats),
            Backend::Blk(b) => b.process(&mut self.queues[0], mem, stats),
        };
        self.used(used)
    }

    fn used(&mut self, used: bool) -> Effect {
        if used {
            self.isr |= VIRTIO_MMIO_INT_VRING;
        }
        Effect { interrupt: used }
    }

    /// Work a device does without the guest asking (frames arriving on
    /// the TAP).
    pub fn poll(&mut self, mem: &GuestRam, stats: &mut Stats) -> Effect {
        let used = match &mut self.backend {
            Backend::Net(n) => {
                let rx_ready = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
                    && self.queues.first().is_some_and(|q| q.ready());
                n.poll(rx_ready, &mut self.queues[0], mem, stats)
            }
            Backend::Blk(_) => false,
        };
        self.used(used)
    }
}

fn new_queue() -> Queue {
    match Queue::new(QUEUE_MAX) {
        Ok(q) => q,
        // QUEUE_MAX is a power of two within virtio-queue's limit.
        Err(_) => unreachable!("QUEUE_MAX is a valid queue size"),
    }
}
