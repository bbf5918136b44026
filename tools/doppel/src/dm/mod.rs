//! The device model (`doppel run`, issue 20): serves the virtio-mmio
//! devices the hypervisor declares in its device-model area (hv/abi
//! `ioreq`) for an unprotected guest: virtio-net over a TAP device and
//! virtio-blk over a file, with rust-vmm's `virtio-queue` and `vm-memory`
//! over the machine RAM file. docs/DEVICES.md.
//!
//! One thread, one loop ([`DeviceModel::step`]): the synchronous ioreq
//! slot (vCPU 0's: the hypervisor runs one vCPU), the buffered ring (queue
//! notifies), the TAP, the liveness word. Everything read from the area is
//! copied out and checked first; a request that does not decode is
//! dropped with a log line and nothing else changes.

pub mod area;
pub mod blk;
pub mod blob;
pub mod epoch;
pub mod mmio;
pub mod net;
pub mod tap;

use std::collections::VecDeque;
use std::fmt;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use doppel_abi::ioreq::{
    buffered_pop, device, flag, kind, publish_slot, read_slot, slot_state, state, Access, Ioreq,
};

pub use area::{Area, AreaError, DM_LOCATOR_AT};
pub use blob::StateError;
pub use epoch::{DiskWrite, Sealed};
use mmio::{Backend, Mmio};

/// Guest RAM as the device model maps it: every write made through it
/// (receive buffers, block reads, status bytes, used rings) marks its
/// page in a dirty bitmap, read and cleared at each epoch's seal.
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// The bitmap slice of a [`GuestRam`] buffer (what the queue readers and
/// writers carry).
pub type Dirty<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

/// What the device model did, for the summary line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Synchronous requests answered.
    pub requests: u64,
    /// Buffered writes taken off the ring.
    pub buffered: u64,
    /// Interrupts asked for.
    pub irqs: u64,
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub blk_reads: u64,
    pub blk_writes: u64,
    pub flushes: u64,
    /// Malformed requests, slots and chains dropped.
    pub errors: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run: requests={} buffered={} irqs={} tx_frames={} rx_frames={} rx_dropped={} \
             blk_reads={} blk_writes={} flushes={}",
            self.requests,
            self.buffered,
            self.irqs,
            self.tx_frames,
            self.rx_frames,
            self.rx_dropped,
            self.blk_reads,
            self.blk_writes,
            self.flushes
        )
    }
}

/// The network backend: a TAP device already present in this network
/// namespace, and the MAC the guest's NIC gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: [u8; 6],
}

/// What `doppel run` was given to back the declared devices with.
#[derive(Clone, Debug, Default)]
pub struct Backends {
    pub net: Option<NetSpec>,
    pub disk: Option<PathBuf>,
}

/// Why the device model cannot start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error(transparent)]
    Area(#[from] AreaError),
    #[error(
        "the hypervisor declares a virtio-net device (slot {slot}, GSI {gsi}) but no \
         --net tap=NAME,mac=MAC was given"
    )]
    NetMissing { slot: usize, gsi: u32 },
    #[error(
        "the hypervisor declares a virtio-blk device (slot {slot}, GSI {gsi}) but no \
         --disk PATH was given"
    )]
    DiskMissing { slot: usize, gsi: u32 },
    #[error(
        "the hypervisor declares a second {what} device (slot {slot}); one --{flag} serves one"
    )]
    Second {
        what: &'static str,
        flag: &'static str,
        slot: usize,
    },
    #[error("--{flag} given, but the hypervisor declares no {what} device (its devices= option)")]
    Unused {
        flag: &'static str,
        what: &'static str,
    },
    #[error("TAP {tap}: {err}")]
    Tap { tap: String, err: std::io::Error },
    #[error("disk {path}: {err}")]
    Disk { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    State(#[from] StateError),
}

/// Why [`DeviceModel::serve`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The hypervisor's liveness word stood still for the whole timeout.
    MachineGone,
    /// The stop flag was set (SIGTERM/SIGINT).
    Signal,
}

/// The running device model.
pub struct DeviceModel {
    area: Area,
    /// One per declared device slot.
    devices: Vec<Mmio>,
    stats: Stats,
    /// The last slot refused: left as it is (the hypervisor never posts
    /// one, so its state is not ours to change) and not refused again
    /// until it changes.
    refused_slot: Option<Ioreq>,
    /// Replicated: transmitted frames held until their epoch commits,
    /// disk writes logged per epoch.
    replicated: bool,
    /// Sealed epochs, oldest first, until committed.
    sealed: VecDeque<Sealed>,
    /// Per slot: an interrupt to raise at the next step (a restored
    /// device whose interrupt status is nonzero).
    pending_irq: Vec<bool>,
    /// The quiesce last refused (an unreplicated device model asked to
    /// seal an epoch): said once, never answered.
    refused_quiesce: Option<u64>,
}

impl DeviceModel {
    /// Back the devices `area` declares with `backends`; every declared
    /// device needs its backend and every backend its device.
    pub fn new(area: Area, backends: &Backends) -> Result<Self, DmError> {
        let mut devices = Vec::new();
        let mut net = backends.net.clone();
        let mut disk = backends.disk.clone();
        for (slot, d) in area.header().devices().iter().enumerate() {
            match d.kind {
                device::NET => {
                    let Some(spec) = net.take() else {
                        return Err(if backends.net.is_some() {
                            DmError::Second {
                                what: "virtio-net",
                                flag: "net",
                                slot,
                            }
                        } else {
                            DmError::NetMissing { slot, gsi: d.gsi }
                        });
                    };
                    let tap = tap::Tap::open(&spec.tap).map_err(|err| DmError::Tap {
                        tap: spec.tap.clone(),
                        err,
                    })?;
                    devices.push(Mmio::new(
                        format!("net{slot} (tap {})", spec.tap),
                        Backend::Net(net::Net::new(tap, spec.mac)),
                    ));
                }
                _ => {
                    let Some(path) = disk.take() else {
                        return Err(if backends.disk.is_some() {
                            DmError::Second {
                                what: "virtio-blk",
                                flag: "disk",
                                slot,
                            }
                        } else {
                            DmError::DiskMissing { slot, gsi: d.gsi }
                        });
                    };
                    let err = |err| DmError::Disk {
                        path: path.clone(),
                        err,
                    };
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(err)?;
                    let name = format!("blk{slot} ({})", path.display());
                    let b = blk::Blk::new(file, name.clone()).map_err(err)?;
                    devices.push(Mmio::new(name, Backend::Blk(b)));
                }
            }
        }
        if net.is_some() {
            return Err(DmError::Unused {
                flag: "net",
                what: "virtio-net",
            });
        }
        if disk.is_some() {
            return Err(DmError::Unused {
                flag: "disk",
                what: "virtio-blk",
            });
        }
        let pending_irq = vec![false; devices.len()];
        Ok(Self {
            area,
            devices,
            stats: Stats::default(),
            refused_slot: None,
            replicated: false,
            sealed: VecDeque::new(),
            pending_irq,
            refused_quiesce: None,
        })
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn area(&self) -> &Area {
        &self.area
    }

    /// The transport of device slot `slot`.
    pub fn device(&self, slot: usize) -> Option<&Mmio> {
        self.devices.get(slot)
    }

    /// One round: the synchronous slot, the buffered ring, the devices'
    /// own work, the liveness word. Whether anything was done.
    pub fn step(&mut self) -> bool {
        // The hypervisor stages a checkpoint: guest RAM is not ours to
        // touch until it resumes us (hv/abi `ioreq`, the epoch handshake).
        if self.area.held() {
            self.area.beat();
            return false;
        }
        if let Some(epoch) = self.area.quiesce_requested() {
            return self.quiesce(epoch);
        }
        // A restored device's interrupt the guest had not taken yet.
        let mut busy = false;
        for slot in 0..self.pending_irq.len() {
            if std::mem::take(&mut self.pending_irq[slot]) {
                self.raise(slot);
                busy = true;
            }
        }
        // Program order: the buffered writes were posted before the
        // access now waiting in the slot (the vCPU stops at that one), so
        // they are done first.
        busy |= self.drain_buffered();
        busy |= self.serve_slot();
        for slot in 0..self.devices.len() {
            let e = self.devices[slot].poll(self.area.guest(), &mut self.stats);
            if e.interrupt {
                self.raise(slot);
                busy = true;
            }
        }
        self.area.beat();
        busy
    }

    /// The hypervisor ended epoch `epoch` with the guest stopped: take in
    /// every queue notify it posted before (they belong to the epoch),
    /// seal the epoch and hand the hypervisor the guest pages written
    /// since the last seal; then hold until it resumes us. An
    /// unreplicated device model (`doppel run`) seals nothing: it says so
    /// once and leaves the quiesce unanswered (the hypervisor stops the
    /// guest with its own error).
    fn quiesce(&mut self, epoch: u64) -> bool {
        if !self.replicated {
            if self.refused_quiesce != Some(epoch) {
                self.refused_quiesce = Some(epoch);
                tracing::error!(
                    "run: the hypervisor asks to seal epoch {epoch}, but this device model does not \
                     replicate (doppel run); run the devices under doppel primary --net/--disk"
                );
            }
            self.area.beat();
            return false;
        }
        // The ring holds at most 511 writes; each pass takes up to 64. A
        // slot that does not decode stops the pass without being taken:
        // bounded either way.
        for _ in 0..16 {
            if !self.drain_buffered() {
                break;
            }
        }
        let pfns = self.seal_epoch(epoch);
        let dropped = self.area.answer_quiesce(epoch, pfns);
        if dropped > 0 {
            tracing::error!(
                "run: {dropped} page(s) of epoch {epoch} beyond guest RAM not reported"
            );
        }
        self.area.beat();
        true
    }

    fn raise(&mut self, slot: usize) {
        self.area.raise(slot);
        self.stats.irqs += 1;
    }

    fn serve_slot(&mut self) -> bool {
        let mem = self.area.mem();
        let at = self.area.ioreq_at();
        if slot_state(&mem, at) != state::READY {
            return false;
        }
        let slot = read_slot(&mem, at);
        let access = match Access::from_slot(&slot) {
            Ok(a) => a,
            Err(_) if self.refused_slot == Some(slot) => return false,
            Err(e) => {
                self.refused_slot = Some(slot);
                self.stats.errors += 1;
                tracing::error!(
                    "run: ioreq slot refused ({}): addr {:#x} size {} count {} flags {:#x} type {}; dropped",
                    e.text(),
                    slot.addr,
                    slot.size,
                    slot.count,
                    slot.flags,
                    slot.type_
                );
                return true;
            }
        };
        let data = self.access(&access);
        let mut ans = access.slot(state::IORESP_READY);
        ans.data = data;
        ans.flags = (slot.flags & !flag::STATE_MASK) | state::IORESP_READY;
        publish_slot(&self.area.mem(), at, &ans);
        self.stats.requests += 1;
        true
    }

    /// Do one access; what a read reads (all ones where nothing answers,
    /// as an unclaimed bus reads).
    fn access(&mut self, a: &Access) -> u64 {
        let size = u64::from(a.size);
        let none = if a.size == 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        };
        if a.kind != kind::COPY {
            tracing::warn!(
                "run: port access {:#x} refused: the devices are MMIO only",
                a.addr
            );
            return if a.read { none } else { 0 };
        }
        let Some(slot) = self.area.header().device_at(a.addr, size) else {
            tracing::warn!(
                "run: MMIO access {:#x} ({} bytes) is in no declared device's registers",
                a.addr,
                a.size
            );
            return if a.read { none } else { 0 };
        };
        let Some(dev) = self.devices.get_mut(slot) else {
            return if a.read { none } else { 0 };
        };
        let offset = a.addr - self.area.header().devices()[slot].base;
        if a.read {
            return dev.read(offset, a.size);
        }
        let e = dev.write(offset, a.size, a.data, self.area.guest(), &mut self.stats);
        if e.interrupt {
            self.raise(slot);
        }
        0
    }

    fn drain_buffered(&mut self) -> bool {
        let mut busy = false;
        // Bounded: the slot is served between batches.
        for _ in 0..64 {
            let popped = buffered_pop(&self.area.mem(), self.area.buffered_at());
            let w = match popped {
                None => break,
                Some(Ok(w)) => w,
                Some(Err(e)) => {
                    self.stats.errors += 1;
                    tracing::error!("run: buffered ioreq refused ({}); dropped", e.text());
                    busy = true;
                    // Wild pointers are not consumed: do not spin on them.
                    break;
                }
            };
            busy = true;
            self.stats.buffered += 1;
            let a = Access {
                kind: kind::COPY,
                addr: self.area.buffered_addr(&w),
                size: w.size,
                read: false,
                data: u64::from(w.data),
            };
            self.access(&a);
        }
        busy
    }

    /// Serve until `stop` is set or the hypervisor's liveness word stays
    /// still for `hv_timeout`: spin briefly when idle, then sleep a few
    /// microseconds at a time.
    pub fn serve(&mut self, stop: &AtomicBool, hv_timeout: Duration) -> Stop {
        let mut pace = Pace::new(self.area.hv_alive(), hv_timeout);
        loop {
            if stop.load(Ordering::Relaxed) {
                return Stop::Signal;
            }
            let busy = self.step();
            if !pace.after(busy, self.area.hv_alive()) {
                return Stop::MachineGone;
            }
        }
    }
}

/// The pace of a device-model loop and its watch on the hypervisor's
/// liveness word: [`DeviceModel::serve`]'s and `doppel primary`'s device
/// thread (doppel::devices).
pub struct Pace {
    last_hv: u64,
    last_change: Instant,
    idle: u32,
    timeout: Duration,
}

impl Pace {
    /// A watch starting at liveness value `hv_alive`, giving up after
    /// `timeout` without a change.
    pub fn new(hv_alive: u64, timeout: Duration) -> Self {
        Self {
            last_hv: hv_alive,
            last_change: Instant::now(),
            idle: 0,
            timeout,
        }
    }

    /// After one step (`busy`: it did something): back off when idle
    /// (spin briefly, then sleep a few microseconds at a time). Whether
    /// the hypervisor still lives: false once its word, now `hv_alive`,
    /// stood still for the whole timeout.
    pub fn after(&mut self, busy: bool, hv_alive: u64) -> bool {
        if busy {
            self.idle = 0;
        } else {
            self.idle = self.idle.saturating_add(1);
            if self.idle > 2000 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
        if hv_alive != self.last_hv {
            self.last_hv = hv_alive;
            self.last_change = Instant::now();
        }
        self.last_change.elapsed() < self.timeout
    }
}

/// Wait for the hypervisor to publish the area in `ram`: a progress line
/// at once and then every `every`; an area that is not published after `patience` (the
/// locator still zero: the hypervisor is booting) is waited for as long as
/// `stop` is clear, but a locator holding another magic for `patience`,
/// or a published area that does not validate, is an error at once.
pub fn wait_for_area(
    ram: crate::machine::MachineRam,
    patience: Duration,
    every: Duration,
    stop: &AtomicBool,
) -> Result<Area, DmError> {
    let start = Instant::now();
    let mut last_note: Option<Instant> = None;
    let mut ram = ram;
    loop {
        match Area::find(ram) {
            Ok(a) => return Ok(a),
            Err((r, AreaError::NotPublished { path, at, magic })) => {
                if (magic != 0 && start.elapsed() >= patience) || stop.load(Ordering::Relaxed) {
                    return Err(AreaError::NotPublished { path, at, magic }.into());
                }
                if last_note.is_none_or(|t| t.elapsed() >= every) {
                    eprintln!(
                        "run: waiting for the device-model area in {} (locator at {at:#x} not published yet, {:.0} s)",
                        path.display(),
                        start.elapsed().as_secs_f64()
                    );
                    last_note = Some(Instant::now());
                }
                ram = r;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

/// `--net tap=NAME,mac=MAC`.
pub fn parse_net(s: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
            Some(("mac", v)) => mac = Some(net::parse_mac(v)?),
            _ => return Err(format!("{part:?}: expected tap=NAME,mac=MAC")),
        }
    }
    match (tap, mac) {
        (Some(tap), Some(mac)) => Ok(NetSpec { tap, mac }),
        _ => Err("both tap=NAME and mac=MAC are needed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse_only_a_tap_name_and_a_unicast_mac() {
        assert_eq!(
            parse_net("tap=tap0,mac=52:54:00:12:34:56"),
            Ok(NetSpec {
                tap: "tap0".into(),
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            })
        );
        for bad in [
            "tap=tap0",
            "mac=52:54:00:12:34:56",
            "tap=,mac=52:54:00:12:34:56",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,mac=52:54:00:12:34:5g",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=52:54:00:12:34:56,mtu=9000",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }
}
