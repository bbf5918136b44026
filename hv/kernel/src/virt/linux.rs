//! A stock Linux guest (issue 19): the kernel and initrd GRUB loaded as
//! Multiboot2 modules, booted through Xen's PVH entry by hv/core's domain
//! builder, on the platform of `doppel_core::platform::machine` (x2APIC
//! LAPIC, IOAPIC, CMOS RTC, COM1, ACPI tables, CPUID and MSR policies).
//!
//! This is the Linux guest's exit dispatch, vendor-neutral over [`Vcpu`]:
//! each exit is counted by reason, emulated, and answered with the RIP to
//! resume at; anything the platform does not handle stops the guest with
//! an error line naming the exit. Before each entry the LAPIC's highest
//! pending vector is injected when the guest can take it (otherwise an
//! interrupt window is asked for), and the host timer is armed for the
//! LAPIC timer's next deadline. A HLT waits in the host for that deadline.
//!
//! Lines (after `doppel-hv: `): `guest: ..` per console line,
//! `linux: mark=B exits=N guest-tsc=T <counts>` when the guest writes a
//! byte to the mark port, and at the end `linux: stop=poweroff|
//! triple-fault|halted|error exits=N restores=R guest-tsc=T <counts>`.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use doppel_abi::guest::GuestLine;
use doppel_abi::ioreq::{self, DmDevice};
use doppel_abi::msg::LogDirtyMode;
use doppel_abi::ByteMem;
use doppel_core::addr::HostPhysAddr;
use doppel_core::cpuid_policy::guest_cpuid;
use doppel_core::dm::{DmError, Route};
use doppel_core::engine::Remus;
use doppel_core::exit::{exact_length, read_code, read_code_into, ExitKind, VmExit};
use doppel_core::fault;
use doppel_core::hvm::HeaderInfo;
use doppel_core::hvm::{PendingEvent, VcpuState};
use doppel_core::mmio::{self, decode_mmio, decode_mov_to_cr, Direction, MmioOp};
use doppel_core::msr::Vendor;
use doppel_core::msr_policy::nr;
use doppel_core::paging::{NestedEntry, NestedPageTable};
use doppel_core::platform::machine::{self, Machine, PortEffect, Sabotage};
use doppel_core::platform::records;
use doppel_core::platform::rtc::{Clock, Rtc};
use doppel_core::platform::uart::Uart;
use doppel_core::regs::Brief;
use doppel_core::selftest::Mode;
use doppel_core::{acpi, pvh};

use super::devmodel;
use super::guest::{GuestRam, KernelFrames};
use super::replica::LinuxReplica;
use super::replicate::{LinuxActivated, LinuxPrimary};
use super::track::{Sabotage as TrackSabotage, Tracker};
use super::vcpu::Vcpu;
use crate::arch::instr::{cpuid, enable_fxsr, fxrstor, fxsave, inb, mxcsr_ok, outb, rdtsc, FxArea};

/// The FPU image after FNINIT with SSE reset: FCW 0x37F, MXCSR 0x1F80,
/// everything else zero.
const FPU_RESET: [u8; 512] = {
    let mut a = [0u8; 512];
    a[0] = 0x7f;
    a[1] = 0x03;
    a[24] = 0x80;
    a[25] = 0x1f;
    a
};

/// What to run.
pub struct LinuxPlan<'a> {
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub cmdline: &'a [u8],
    pub mem_bytes: u64,
    pub tsc_khz: u32,
    pub restore_every: Option<u64>,
    pub skip_lapic_regs: bool,
    /// Replicate the guest to the in-machine replica (test only).
    pub replica: Option<ReplicaPlan>,
    /// The guest's virtio-mmio devices (hv/abi `ioreq::device` kinds),
    /// served by `doppel run` through the device-model area.
    pub devices: &'a [u32],
    /// Replicated with the dom0 tool, as primary or standby.
    pub replicate: Replicate,
}

/// The guest's part in replication with the dom0 tool (issue 21).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replicate {
    None,
    /// A replicated primary: an epoch every `epoch_exits` exits when
    /// given, else every `epoch_ms` ms of guest time (default 25).
    Primary {
        epoch_exits: Option<u64>,
        epoch_ms: Option<u64>,
    },
    /// A standby: waits for `Activate`, then runs on from the committed
    /// whole-machine context.
    Standby,
}

/// Where a replicated Linux guest's epochs go: the in-machine replica
/// (test only, [`LinuxReplica`]), the dom0 tool
/// ([`super::replicate::LinuxPrimary`]), or nowhere after a standby's
/// activation ([`super::replicate::LinuxActivated`]). The run loop asks
/// after every exit whether an epoch ends, and hands each epoch end's
/// harvest and whole-machine context over with the guest stopped.
pub(super) trait LinuxEpochs {
    /// The tracker the guest's vCPU and table are set up for.
    fn tracker(&self) -> Mode;
    /// The guest exited (its TSC reads `guest_tsc`): whether its epoch
    /// ends here (before the next entry).
    fn exited(&mut self, guest_tsc: u64) -> bool;
    /// Checkpoint `harvest`'s pages of `ram` and `context` (the machine as
    /// it resumes); `exits` were the epoch's tracking exits. What next.
    fn epoch_end(
        &mut self,
        harvest: &[u8],
        ram: &GuestRam,
        context: &[u8],
        exits: u64,
    ) -> Result<EpochNext, &'static str>;
    /// Fail over now (after [`EpochNext::FailOver`]): guest RAM rewritten
    /// as committed; the committed context to rebuild the machine from.
    fn fail_over(&mut self, _ram: &mut GuestRam) -> Result<Vec<u8>, &'static str> {
        Err("nothing to fail over to")
    }
    /// The epoch the coming [`LinuxEpochs::epoch_end`] checkpoints, when
    /// it checkpoints one: the device model is quiesced for it and its
    /// pages join the harvest. `None` (the default): no checkpoint, the
    /// device model runs on (its pages wait in its bitmap).
    fn dm_epoch(&self) -> Option<u64> {
        None
    }
    /// The rebuilt machine's context, saved at the instant it was rebuilt.
    fn rebuilt(&mut self, _context: &[u8]) {}
    /// The guest resumes after an epoch end that held it `pause` cycles.
    fn resumed(&mut self, _pause: u64) {}
    /// Print the verdict; true when the run passes (`powered_off`: Linux
    /// finished cleanly).
    fn report(&self, backend: &str, powered_off: bool) -> bool;
}

/// What follows an epoch end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EpochNext {
    /// Track the next epoch.
    Track,
    /// Nobody harvests for now (replication detached): stop tracking.
    Untracked,
    /// Fail over to the replica.
    FailOver,
}

/// `mode=linux tracker=..`: the guest replicated to the in-machine replica
/// ([`LinuxReplica`]), which fails over after `epochs` epochs.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaPlan {
    /// The log-dirty mode the replica asks for.
    pub mode: LogDirtyMode,
    /// An epoch ends every this many exits.
    pub epoch_exits: u64,
    /// Epochs before the failover.
    pub epochs: u64,
}

const RFLAGS_IF: u64 = 1 << 9;

/// How long an access waits for the device model's answer (host time)
/// before the guest is stopped: it covers `doppel run` starting after the
/// guest (the first access waits for it).
const DM_PATIENCE_S: u64 = 120;

/// TSC ticks between looks at the device model's interrupt words while
/// the guest waits in HLT.
const DM_POLL_TICKS: u64 = 20_000;

/// Exits without the guest powering off before the run is given up: a
/// guest stuck in a loop of exits fails rather than hangs.
const MAX_EXITS: u64 = 50_000_000;

/// Exits by reason.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    total: u64,
    cpuid: u64,
    msr: u64,
    io: u64,
    mmio: u64,
    hlt: u64,
    timer: u64,
    intr: u64,
    window: u64,
    cr: u64,
    npf: u64,
    other: u64,
}

impl Counts {
    fn count(&mut self, kind: &ExitKind, ram_bytes: u64) {
        self.total += 1;
        let slot = match kind {
            ExitKind::Cpuid => &mut self.cpuid,
            ExitKind::Msr { .. } => &mut self.msr,
            ExitKind::Io(_) => &mut self.io,
            ExitKind::NestedPageFault(f) if f.gpa.as_u64() >= ram_bytes => &mut self.mmio,
            ExitKind::NestedPageFault(_) => &mut self.npf,
            ExitKind::Hlt => &mut self.hlt,
            ExitKind::Timer => &mut self.timer,
            ExitKind::ExternalInterrupt => &mut self.intr,
            ExitKind::InterruptWindow => &mut self.window,
            ExitKind::CrWrite { .. } => &mut self.cr,
            _ => &mut self.other,
        };
        *slot += 1;
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpuid={} msr={} io={} mmio={} hlt={} timer={} intr={} window={} cr={} npf={} other={}",
            self.cpuid,
            self.msr,
            self.io,
            self.mmio,
            self.hlt,
            self.timer,
            self.intr,
            self.window,
            self.cr,
            self.npf,
            self.other
        )
    }
}

/// How the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Poweroff,
    TripleFault,
    Halted,
    Error,
}

impl Stop {
    fn as_str(self) -> &'static str {
        match self {
            Stop::Poweroff => "poweroff",
            Stop::TripleFault => "triple-fault",
            Stop::Halted => "halted",
            Stop::Error => "error",
        }
    }
}

/// What the dispatch wants after an exit.
enum Next {
    /// Resume at this RIP.
    Resume(u64),
    /// Resume where the guest stopped (the access is retried or a fault
    /// was injected at it).
    Retry,
    Stop(Stop),
}

/// The host's wall clock, read once from its CMOS RTC.
fn host_unix_seconds() -> i64 {
    let read = |r: u8| {
        outb(0x70, r);
        inb(0x71)
    };
    // Wait out an update in progress (at most one second; bounded here).
    for _ in 0..1_000_000 {
        if read(0x0a) & 0x80 == 0 {
            break;
        }
    }
    let mut regs = [0u8; 10];
    for (i, r) in regs.iter_mut().enumerate() {
        *r = read(i as u8);
    }
    let b = read(0x0b);
    Rtc::unix_of_cmos(&regs, b).unwrap_or_else(|| {
        log::warn!("linux: the host's CMOS clock holds no valid date; the guest's RTC starts at 2000-01-01");
        946_684_800
    })
}

/// The guest-physical address width the guest is shown.
fn phys_bits() -> u8 {
    let max = cpuid(0x8000_0000, 0).eax;
    if max >= 0x8000_0008 {
        cpuid(0x8000_0008, 0).eax as u8
    } else {
        36
    }
}

/// Boot `plan` under a backend: `make` builds a vCPU from a state over
/// the nested table rooted at its second argument, for the dirty tracker
/// in its third (PML needs the nested A/D bits). `offered` are the
/// log-dirty modes the backend tracks with.
pub fn run<E, V, F>(
    vendor: Vendor,
    plan: &LinuxPlan<'_>,
    offered: &[LogDirtyMode],
    mut make: F,
) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnMut(&VcpuState, HostPhysAddr, Mode) -> Result<V, &'static str>,
{
    enable_fxsr();
    // No host interrupt source may stay live while a guest that enables
    // interrupts runs: the local APIC set-up masks the 8259s and LINT0.
    if let Err(e) = crate::arch::apic::get(crate::mem::paging::set_uncached) {
        log::error!("linux: the host's local APIC: {e}");
        return false;
    }
    let mut ram = match GuestRam::new(plan.mem_bytes) {
        Ok(r) => r,
        Err(e) => {
            log::error!("linux: guest RAM of {} MiB: {e}", plan.mem_bytes >> 20);
            return false;
        }
    };
    let devices: Vec<DmDevice> = ioreq::virtio_devices(plan.devices).collect();
    let publish_dm = |ram: &GuestRam| {
        devmodel::publish(
            ram,
            ioreq::VIRTIO_WINDOW_BASE,
            ioreq::VIRTIO_WINDOW_SIZE,
            &devices,
        )
        .map_err(|e| log::error!("linux: devices: {e}"))
    };
    // A standby with devices publishes its device-model area before it
    // waits for Activate: the backup tool's device model restores the
    // committed device state into it first.
    let mut dm = None;
    if plan.replicate == Replicate::Standby && !devices.is_empty() {
        let Ok(l) = publish_dm(&ram) else {
            return false;
        };
        dm = Some(l);
    }
    let start = if plan.replicate == Replicate::Standby {
        standby_start(vendor, &ram, plan.tsc_khz)
    } else {
        boot_start(vendor, &mut ram, plan, &devices, offered)
    };
    let Some(Start {
        m,
        cpu,
        clock,
        replica,
    }) = start
    else {
        return false;
    };
    let mode = replica.as_ref().map_or(Mode::WriteProtect, |r| r.tracker());
    let mut table = match ram.nested_table::<E>() {
        Ok(t) => t,
        Err(e) => {
            log::error!("linux: nested page table: {e}");
            return false;
        }
    };
    if dm.is_none() && !devices.is_empty() {
        let Ok(l) = publish_dm(&ram) else {
            return false;
        };
        dm = Some(l);
    }
    let mut vcpu = match make(&cpu, table.root(), mode) {
        Ok(v) => v,
        Err(e) => {
            log::error!("linux: vCPU: {e}");
            return false;
        }
    };
    if !vcpu.set_tsc_offset(m.msrs.tsc_offset) {
        log::error!("linux: the {} backend has no TSC offset", vcpu.backend());
        return false;
    }
    if cpu.fpu_initialised {
        // A standby resumes the committed FPU image.
        if !mxcsr_ok(&cpu.fpu) {
            log::error!("linux: the committed FPU image's MXCSR has reserved bits set");
            return false;
        }
        fxrstor(&FxArea(cpu.fpu));
    }
    let tracker = match &replica {
        None => None,
        Some(_) if plan.replicate == Replicate::Standby => None,
        Some(_) => {
            let t = Tracker::new(ram.pages(), mode, TrackSabotage::default())
                .and_then(|mut t| t.arm(&mut table, &mut vcpu, true).map(|()| t));
            match t {
                Ok(t) => Some(t),
                Err(e) => {
                    log::error!("linux: dirty tracking: {e}");
                    return false;
                }
            }
        }
    };
    let mut l = Linux {
        vcpu,
        m,
        ram,
        table,
        mode,
        tracker,
        replica,
        dm,
        counts: Counts::default(),
        line: Vec::new(),
        restores: 0,
        last_restore: 0,
        make,
        clock,
        plan,
    };
    let stop = l.run_loop();
    l.flush_line();
    if let Some(dm) = &l.dm {
        let s = dm.stats;
        log::info!(
            "devices: sync={} buffered={} irqs={} refused_irqs={}",
            s.sync,
            s.buffered,
            s.irqs,
            s.refused_irqs
        );
    }
    let gtsc = l.m.guest_tsc(rdtsc());
    log::info!(
        "linux: stop={} exits={} restores={} guest-tsc={gtsc} {}",
        stop.as_str(),
        l.counts.total,
        l.restores,
        l.counts
    );
    match &l.replica {
        Some(r) => r.report(l.vcpu.backend(), stop == Stop::Poweroff),
        None => stop == Stop::Poweroff,
    }
}

/// How the guest starts: its platform, its vCPU's state, the RTC's wall
/// clock, and where its epochs go.
struct Start {
    m: Machine,
    cpu: VcpuState,
    clock: Clock,
    replica: Option<Box<dyn LinuxEpochs>>,
}

/// A fresh boot: the PVH domain built into `ram`, the platform at reset,
/// the guest's TSC from 0 and its RTC at the host's wall clock; the
/// replica or the dom0 tool attached when the plan says so (their first
/// checkpoint carries the loaded boot image).
fn boot_start(
    vendor: Vendor,
    ram: &mut GuestRam,
    plan: &LinuxPlan<'_>,
    devices: &[DmDevice],
    offered: &[LogDirtyMode],
) -> Option<Start> {
    let tables = acpi::build_with(pvh::ACPI_ADDR, devices);
    let boot = {
        let Some(bytes) = ram.slice_mut(0, plan.mem_bytes) else {
            log::error!("linux: guest RAM is not addressable");
            return None;
        };
        let mem = ByteMem::new(bytes);
        pvh::build(
            &mem,
            &pvh::PvhConfig {
                kernel: plan.kernel,
                initrd: plan.initrd,
                cmdline: plan.cmdline,
                ram_size: plan.mem_bytes,
                acpi: Some(&tables.bytes),
            },
        )
    };
    let boot = match boot {
        Ok(b) => b,
        Err(e) => {
            log::error!("linux: the PVH domain builder refused the kernel: {e}");
            return None;
        }
    };
    log::info!(
        "linux: entry={:#x} kernel={:#x}-{:#x} initrd={:#x}+{:#x} ram={}MiB tsc-khz={}",
        boot.entry,
        boot.kernel_span.0,
        boot.kernel_span.1,
        boot.initrd.0,
        boot.initrd.1,
        plan.mem_bytes >> 20,
        plan.tsc_khz
    );
    let replica: Option<Box<dyn LinuxEpochs>> = match (plan.replica, plan.replicate) {
        (Some(r), _) => match LinuxReplica::start(ram, offered, r.mode, r.epoch_exits, r.epochs) {
            Ok(rep) => Some(Box::new(rep)),
            Err(e) => {
                log::error!("linux: the in-machine replica: {e}");
                return None;
            }
        },
        (
            None,
            Replicate::Primary {
                epoch_exits,
                epoch_ms,
            },
        ) => {
            let policy = Remus::linux(epoch_exits, epoch_ms, plan.tsc_khz);
            match LinuxPrimary::start(ram, offered, policy) {
                Ok(p) => Some(Box::new(p)),
                Err(e) => {
                    log::error!("linux: primary: {e}");
                    return None;
                }
            }
        }
        (None, _) => None,
    };
    // The guest's TSC starts at 0 now; its RTC at the host's wall clock.
    let clock = Clock {
        secs: host_unix_seconds(),
        tsc: 0,
        khz: plan.tsc_khz,
    };
    let mut m = Machine::new(vendor, phys_bits(), clock);
    m.msrs.tsc_offset = 0u64.wrapping_sub(rdtsc());
    Some(Start {
        m,
        cpu: boot.vcpu,
        clock,
        replica,
    })
}

/// A standby's start: wait for `Activate` (guest RAM filled by the backup
/// tool meanwhile), then the platform rebuilt from the committed records.
/// The RTC's wall clock goes on from the primary's: the wall time the RTC
/// record held at the checkpoint, at the checkpoint's guest TSC.
fn standby_start(vendor: Vendor, ram: &GuestRam, tsc_khz: u32) -> Option<Start> {
    let (act, context) = match LinuxActivated::wait(ram) {
        Ok(a) => a,
        Err(e) => {
            log::error!("linux: standby: {e}");
            return None;
        }
    };
    let r = match records::decode(&context) {
        Ok(r) => r,
        Err(e) => {
            log::error!("linux: standby: the committed records do not decode: {e:?}");
            return None;
        }
    };
    let clock = Clock {
        secs: Rtc::wall_of_record(&r.rtc).unwrap_or_else(host_unix_seconds),
        tsc: r.cpu.tsc,
        khz: tsc_khz,
    };
    let m = match Machine::restore(
        &r,
        vendor,
        phys_bits(),
        clock,
        Uart::new(),
        rdtsc(),
        Sabotage::None,
    ) {
        Ok(m) => m,
        Err(e) => {
            log::error!(
                "linux: standby: a committed record was refused: {} = {:#x}",
                e.field,
                e.value
            );
            return None;
        }
    };
    Some(Start {
        m,
        cpu: r.cpu,
        clock,
        replica: Some(Box::new(act)),
    })
}

struct Linux<'r, E: NestedEntry, V: Vcpu, F> {
    vcpu: V,
    m: Machine,
    ram: GuestRam,
    /// The guest's nested table (the vCPU runs on it: replaced only
    /// together with the vCPU).
    table: NestedPageTable<E, KernelFrames>,
    /// What the vCPU is built for (PML needs the nested A/D bits).
    mode: Mode,
    /// Dirty tracking, while the guest is replicated.
    tracker: Option<Tracker>,
    replica: Option<Box<dyn LinuxEpochs>>,
    /// The device-model area, when the guest has devices.
    dm: Option<devmodel::Link>,
    counts: Counts,
    /// The console line being assembled.
    line: Vec<u8>,
    restores: u64,
    /// The exit count at the last restore (one restore per count).
    last_restore: u64,
    /// What builds a vCPU, over the nested table rooted at its second
    /// argument, for the tracker in its third.
    make: F,
    /// The RTC's wall clock (platform configuration, not guest state).
    clock: Clock,
    plan: &'r LinuxPlan<'r>,
}

impl<E, V, F> Linux<'_, E, V, F>
where
    E: NestedEntry,
    V: Vcpu,
    F: FnMut(&VcpuState, HostPhysAddr, Mode) -> Result<V, &'static str>,
{
    fn run_loop(&mut self) -> Stop {
        loop {
            if let Some(n) = self.plan.restore_every {
                if self.counts.total > 0
                    && self.counts.total.is_multiple_of(n)
                    && self.last_restore != self.counts.total
                {
                    self.last_restore = self.counts.total;
                    if let Err(e) = self.save_and_rebuild() {
                        log::error!("linux: restore {}: {e}", self.restores);
                        return Stop::Error;
                    }
                }
            }
            self.prepare_entry();
            let exit = self.vcpu.run();
            self.counts.count(&exit.kind, self.ram.bytes());
            let gtsc = self.m.guest_tsc(rdtsc());
            let epoch_due = self.replica.as_mut().is_some_and(|r| r.exited(gtsc));
            match self.dispatch(&exit) {
                Next::Resume(rip) => self.vcpu.set_rip(rip),
                Next::Retry => {}
                Next::Stop(s) => {
                    if s == Stop::Error {
                        let st = self.vcpu.state();
                        log::error!(
                            "linux: guest state at the stop: {} (event being delivered: {:?})",
                            Brief(&st),
                            self.vcpu.interrupted_event()
                        );
                    }
                    return s;
                }
            }
            if epoch_due {
                // The guest is stopped with its state complete (RIP moved,
                // any fault injected): what a checkpoint must record.
                if let Err(e) = self.epoch_end() {
                    log::error!("linux: epoch end: {e}");
                    return Stop::Error;
                }
            }
            if self.counts.total >= MAX_EXITS {
                log::error!("linux: {MAX_EXITS} exits without a poweroff; giving up");
                return Stop::Error;
            }
        }
    }

    /// End a replicated epoch: harvest, checkpoint the whole machine to
    /// the replica, and track the next epoch, or fail over to the replica
    /// when it says so.
    fn epoch_end(&mut self) -> Result<(), &'static str> {
        let stopped = rdtsc();
        let Some(tracker) = self.tracker.as_mut() else {
            return Err("an epoch end without dirty tracking");
        };
        tracker.harvest(&mut self.table, &mut self.vcpu)?;
        let (exits, _) = tracker.take_counts();
        let context = self.save_context(rdtsc())?;
        let (Some(tracker), Some(replica)) = (self.tracker.as_mut(), self.replica.as_mut()) else {
            return Err("an epoch end without a replica");
        };
        let ram = &self.ram;
        let next = match (replica.dm_epoch(), self.dm.as_mut()) {
            // The device model's half of the cut: quiesced (no ioreq is
            // in flight: the exit's emulation is complete), its pages in
            // the harvest, off guest RAM while the checkpoint is staged.
            (Some(epoch), Some(dm)) => {
                let patience = u64::from(self.plan.tsc_khz) * 1000 * DM_PATIENCE_S;
                let began = rdtsc();
                let wait = || {
                    core::hint::spin_loop();
                    rdtsc().wrapping_sub(began) < patience
                };
                dm.epoch_cut(epoch, tracker.harvested_mut(), wait, |h| {
                    replica.epoch_end(h, ram, &context, exits)
                })
                .map_err(|_| {
                    "the device model did not answer the epoch's quiesce in time (is `doppel` serving the devices?)"
                })??
            }
            _ => replica.epoch_end(tracker.harvested(), ram, &context, exits)?,
        };
        if next == EpochNext::FailOver {
            return self.fail_over();
        }
        tracker.rearm(&mut self.table, &mut self.vcpu, next == EpochNext::Track)?;
        replica.resumed(rdtsc().wrapping_sub(stopped));
        Ok(())
    }

    /// The primary fails: its vCPU, platform and nested table are thrown
    /// away, guest RAM is rewritten from the replica's shadow, and the
    /// machine is rebuilt from the last committed context alone. The guest
    /// then runs on, unreplicated.
    fn fail_over(&mut self) -> Result<(), &'static str> {
        let replica = self.replica.as_mut().ok_or("no replica to fail over to")?;
        self.tracker = None;
        let context = replica.fail_over(&mut self.ram)?;
        let table = self
            .ram
            .nested_table::<E>()
            .map_err(|_| "building the nested page table")?;
        let now = rdtsc();
        self.mode = Mode::WriteProtect;
        self.rebuild(&context, table.root(), now)?;
        // The old vCPU is gone: its table can go too.
        self.table = table;
        let again = self.save_context(now)?;
        if let Some(r) = self.replica.as_mut() {
            r.rebuilt(&again);
        }
        Ok(())
    }

    /// Save the whole guest to Xen's HVM context stream, throw the vCPU
    /// and the platform away, and rebuild both from the stream alone
    /// ([`Linux::save_context`], [`Linux::rebuild`]). Guest memory stays
    /// where it is (a checkpoint carries it separately); COM1 is a device
    /// model's state, outside the records.
    fn save_and_rebuild(&mut self) -> Result<(), &'static str> {
        // Counted when it starts: a rebuild that fails is a restore that
        // ran (and stops the guest).
        self.restores += 1;
        let now = rdtsc();
        let blob = self.save_context(now)?;
        if let Some(t) = self.tracker.as_mut() {
            // What the hardware logged for the old vCPU goes to the log
            // before the vCPU goes.
            t.drain(&mut self.table, &mut self.vcpu)?;
        }
        self.rebuild(&blob, self.table.root(), rdtsc())?;
        if let Some(t) = self.tracker.as_mut() {
            t.arm(&mut self.table, &mut self.vcpu, true)?;
        }
        log::debug!(
            "linux: restore {} at exit {} ({} bytes of records)",
            self.restores,
            self.counts.total,
            blob.len()
        );
        Ok(())
    }

    /// The whole guest (vCPU with its FPU image, LAPIC, LAPIC_REGS,
    /// IOAPIC, PIT, RTC, MTRR, TSC_ADJUST) as Xen's HVM context stream,
    /// its clocks read at host TSC `now`.
    fn save_context(&mut self, now: u64) -> Result<Vec<u8>, &'static str> {
        let mut fx = FxArea([0; 512]);
        fxsave(&mut fx);
        let mut cpu = self.vcpu.state();
        cpu.fpu = fx.0;
        cpu.fpu_initialised = true;
        let records = self.m.save(cpu, now);
        let header = HeaderInfo {
            cpuid: cpuid(1, 0).eax,
            gtsc_khz: self.plan.tsc_khz,
            changeset: 0,
        };
        records::encode(&records, header, None).map_err(|e| {
            log::error!("linux: encoding the records: {e:?}");
            "the machine's records could not be encoded"
        })
    }

    /// Replace the vCPU and the platform with ones built from `blob` alone
    /// (an HVM context stream from [`Linux::save_context`]), the vCPU over
    /// the nested table at `root`, its clocks resuming at host TSC `now`.
    /// Nothing of the old machine survives but COM1 and the platform's
    /// configuration; the FPU is scrubbed to its reset image first.
    fn rebuild(&mut self, blob: &[u8], root: HostPhysAddr, now: u64) -> Result<(), &'static str> {
        let uart = self.m.uart.clone();
        fxrstor(&FxArea(FPU_RESET));
        let r = records::decode(blob).map_err(|e| {
            log::error!("linux: decoding the records: {e:?}");
            "the machine's records could not be decoded"
        })?;
        let sabotage = if self.plan.skip_lapic_regs {
            Sabotage::SkipLapicRegs
        } else {
            Sabotage::None
        };
        let m = Machine::restore(
            &r,
            self.m.vendor,
            self.m.msrs.phys_bits,
            self.clock,
            uart,
            now,
            sabotage,
        )
        .map_err(|e| {
            log::error!("linux: a record was refused: {} = {:#x}", e.field, e.value);
            "a record was refused"
        })?;
        if !mxcsr_ok(&r.cpu.fpu) {
            return Err("the FPU image's MXCSR has reserved bits set");
        }
        let vcpu = (self.make)(&r.cpu, root, self.mode)?;
        self.vcpu = vcpu;
        self.m = m;
        if !self.vcpu.set_tsc_offset(self.m.msrs.tsc_offset) {
            return Err("the backend has no TSC offset");
        }
        fxrstor(&FxArea(r.cpu.fpu));
        Ok(())
    }

    /// Deliver what the LAPIC has pending, and arm the host timer for its
    /// next deadline.
    fn prepare_entry(&mut self) {
        self.device_interrupts();
        self.m.update(rdtsc());
        if self.m.pending().is_some() {
            if self.vcpu.interruptible() {
                if let Some(v) = self.m.ack() {
                    self.vcpu.inject(PendingEvent {
                        vector: v,
                        kind: 0,
                        error_code: None,
                    });
                }
                self.vcpu.set_interrupt_window(false);
            } else {
                self.vcpu.set_interrupt_window(true);
            }
        }
        let ticks = self
            .m
            .next_deadline()
            .map(|d| d.saturating_sub(rdtsc()).max(1));
        self.vcpu.arm_timer(ticks);
    }

    /// Raise the edges the device model asked for since the last look.
    fn device_interrupts(&mut self) {
        let Some(dm) = self.dm.as_mut() else { return };
        dm.beat();
        let m = &mut self.m;
        dm.interrupts(
            |gsi| m.pulse_gsi(gsi),
            |e| log::error!("devices: {} ({e:?}); ignored", e.text()),
        );
    }

    /// Carry the access at `gpa` in the device model's window to it: what
    /// a read reads. Waits for the answer up to [`DM_PATIENCE_S`] seconds
    /// of host time, beating meanwhile.
    fn forward(&mut self, gpa: u64, size: u8, read: bool, data: u64) -> Result<u64, DmError> {
        let Some(dm) = self.dm.as_mut() else {
            return Err(DmError::NoDevice { addr: gpa });
        };
        let a = ioreq::Access {
            kind: ioreq::kind::COPY,
            addr: gpa,
            size,
            read,
            data,
        };
        let patience = u64::from(self.plan.tsc_khz) * 1000 * DM_PATIENCE_S;
        let began = rdtsc();
        let wait = || {
            core::hint::spin_loop();
            rdtsc().wrapping_sub(began) < patience
        };
        match dm.route(gpa, size, read) {
            Route::Buffered => dm.post(a, wait).map(|()| 0),
            Route::Sync => dm.access(a, wait),
        }
    }

    /// Deliver `ev` (an exception) at the faulting instruction.
    fn inject_fault(&mut self, ev: PendingEvent) -> Next {
        self.vcpu.inject(ev);
        Next::Retry
    }

    /// Refuse what `exit` tried: the exception every refusal injects
    /// (`doppel_core::fault::refusal`: #UD for an instruction, #GP(0) for
    /// an MSR or a control-register value).
    fn refuse(&mut self, exit: &VmExit) -> Next {
        match fault::refusal(&exit.kind) {
            Some(ev) => self.inject_fault(ev),
            None => {
                log::error!("linux: {:?} is not a refusal", exit.kind);
                Next::Stop(Stop::Error)
            }
        }
    }

    /// Where the instruction that caused `exit` ends: the backend's report,
    /// or its one encoding found at RIP (SVM without NRIP save).
    fn next_rip(&self, exit: &VmExit) -> Option<u64> {
        if let Some(n) = exit.next_rip {
            return Some(n);
        }
        let p = self.vcpu.code_paging();
        let (bytes, n) = read_code(
            &p,
            exit.rip,
            |gpa| self.read_u64(gpa),
            |gpa| self.read_u8(gpa),
        );
        exact_length(&exit.kind, bytes.get(..n).unwrap_or(&[]))
            .map(|len| exit.rip.wrapping_add(len))
    }

    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let b = self.ram.slice(gpa, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn read_u8(&self, gpa: u64) -> Option<u8> {
        self.ram.slice(gpa, 1)?.first().copied()
    }

    /// Up to 15 bytes of code at `rip`, and the mode they run in.
    fn fetch(&self, rip: u64) -> ([u8; 15], usize, mmio::Mode) {
        let st = self.vcpu.state();
        let p = st.code_paging(st.cs.attr.long());
        let mut bytes = [0u8; 15];
        let n = read_code_into(
            &p,
            rip,
            |gpa| self.read_u64(gpa),
            |gpa| self.read_u8(gpa),
            &mut bytes,
        );
        let mode = if st.cs.attr.long() {
            mmio::Mode::Bits64
        } else if st.cs.attr.db() {
            mmio::Mode::Bits32
        } else {
            mmio::Mode::Bits16
        };
        (bytes, n, mode)
    }

    fn skip(&self, exit: &VmExit, what: &str) -> Next {
        match self.next_rip(exit) {
            Some(rip) => Next::Resume(rip),
            None => {
                log::error!(
                    "linux: {what} at rip={:#x}: the instruction's length is unknown",
                    exit.rip
                );
                Next::Stop(Stop::Error)
            }
        }
    }

    fn dispatch(&mut self, exit: &VmExit) -> Next {
        match exit.kind {
            ExitKind::Cpuid => {
                let r = self.vcpu.regs();
                let (leaf, sub) = (r.rax as u32, r.rcx as u32);
                let c = guest_cpuid(cpuid, leaf, sub);
                r.rax = u64::from(c.eax);
                r.rbx = u64::from(c.ebx);
                r.rcx = u64::from(c.ecx);
                r.rdx = u64::from(c.edx);
                self.skip(exit, "CPUID")
            }
            ExitKind::Msr { msr, write, value } => self.msr(exit, msr, write, value),
            ExitKind::Io(io) => {
                if io.string || io.rep {
                    log::error!(
                        "linux: string I/O on port {:#x} (not emulated) rip={:#x}",
                        io.port,
                        exit.rip
                    );
                    return Next::Stop(Stop::Error);
                }
                let now = rdtsc();
                if io.input {
                    let v = self.m.port_read(io.port, io.size, now);
                    let r = self.vcpu.regs();
                    r.rax = match io.size {
                        1 => (r.rax & !0xff) | u64::from(v & 0xff),
                        2 => (r.rax & !0xffff) | u64::from(v & 0xffff),
                        // A 32-bit register write zero-extends.
                        _ => u64::from(v),
                    };
                } else {
                    let v = self.vcpu.regs().rax as u32;
                    match self.m.port_write(io.port, io.size, v, now) {
                        PortEffect::None => {}
                        PortEffect::Console(b) => self.console(b),
                        PortEffect::Mark(b) => {
                            self.flush_line();
                            log::info!(
                                "linux: mark={b} exits={} guest-tsc={} {}",
                                self.counts.total,
                                self.m.guest_tsc(now),
                                self.counts
                            );
                        }
                        PortEffect::Poweroff => return Next::Stop(Stop::Poweroff),
                    }
                }
                self.skip(exit, "port I/O")
            }
            ExitKind::NestedPageFault(f) if f.gpa.as_u64() >= self.ram.bytes() => {
                self.mmio(exit, f.gpa.as_u64())
            }
            ExitKind::NestedPageFault(f) if f.is_write_protect_candidate() => {
                let Some(t) = self.tracker.as_mut() else {
                    log::error!(
                        "linux: a write fault in guest RAM at {:#x} with no dirty tracking, rip={:#x}",
                        f.gpa.as_u64(),
                        exit.rip
                    );
                    return Next::Stop(Stop::Error);
                };
                match t.write_fault(&mut self.table, &mut self.vcpu, &f) {
                    Ok(_) => Next::Retry,
                    Err(e) => {
                        log::error!("linux: {e} ({:#x}), rip={:#x}", f.gpa.as_u64(), exit.rip);
                        Next::Stop(Stop::Error)
                    }
                }
            }
            ExitKind::PmlFull => match self.tracker.as_mut().map(|t| t.pml_full(&mut self.vcpu)) {
                Some(Ok(())) => Next::Retry,
                other => {
                    log::error!("linux: PML buffer full: {other:?}");
                    Next::Stop(Stop::Error)
                }
            },
            ExitKind::Hlt => self.hlt(exit),
            ExitKind::Timer | ExitKind::ExternalInterrupt => Next::Retry,
            ExitKind::InterruptWindow => {
                self.vcpu.set_interrupt_window(false);
                Next::Retry
            }
            ExitKind::CrWrite { cr, gpr } => self.cr_write(exit, cr, gpr),
            // Refused instructions (the virtualization instructions,
            // XSETBV): what every refusal injects (`doppel_core::fault`,
            // #UD). Hypercalls too: Linux gets none, as on a CPU without
            // VMCALL/VMMCALL.
            ExitKind::Privileged(_) => self.refuse(exit),
            ExitKind::Hypercall => self.inject_fault(fault::UNDEFINED_OPCODE),
            ExitKind::Shutdown => {
                log::info!(
                    "linux: the guest shut down (triple fault) at rip={:#x}",
                    exit.rip
                );
                Next::Stop(Stop::TripleFault)
            }
            kind => {
                log::error!("linux: unhandled exit {kind:?} at rip={:#x}", exit.rip);
                Next::Stop(Stop::Error)
            }
        }
    }

    fn console(&mut self, b: u8) {
        match b {
            b'\n' => self.flush_line(),
            b'\r' => {}
            _ if self.line.len() >= 512 => {
                self.flush_line();
                self.line.push(b);
            }
            _ => self.line.push(b),
        }
    }

    fn flush_line(&mut self) {
        if !self.line.is_empty() {
            log::info!("{}", GuestLine(&self.line));
            self.line.clear();
        }
    }

    fn msr(&mut self, exit: &VmExit, msr: u32, write: bool, value: u64) -> Next {
        let now = rdtsc();
        let held = Machine::vcpu_held(msr);
        if write {
            if msr == nr::EFER {
                // The CPU keeps LMA: check the write against its EFER.
                self.m.msrs.efer = self.vcpu.state().efer;
            }
            match self.m.wrmsr(msr, value, now) {
                Ok(()) => {
                    let done = if msr == nr::EFER {
                        self.vcpu.set_efer(self.m.msrs.efer)
                    } else if held {
                        self.vcpu.set_switched_msr(msr, value)
                    } else {
                        if msr == nr::TSC || msr == nr::TSC_ADJUST {
                            self.vcpu.set_tsc_offset(self.m.msrs.tsc_offset);
                        }
                        true
                    };
                    if !done {
                        log::error!(
                            "linux: the {} backend cannot set MSR {msr:#x} ({})",
                            self.vcpu.backend(),
                            doppel_core::msr::name(msr)
                        );
                        return Next::Stop(Stop::Error);
                    }
                    self.skip(exit, "WRMSR")
                }
                Err(gp) => {
                    log::debug!("linux: WRMSR {msr:#x}={value:#x} refused ({gp:?}): #GP");
                    self.refuse(exit)
                }
            }
        } else {
            let v = if msr == nr::EFER {
                Ok(self.vcpu.state().efer)
            } else if let Some(v) = held.then(|| self.vcpu.switched_msr(msr)).flatten() {
                Ok(v)
            } else {
                self.m.rdmsr(msr, now)
            };
            match v {
                Ok(v) => {
                    let r = self.vcpu.regs();
                    r.rax = v & 0xffff_ffff;
                    r.rdx = v >> 32;
                    self.skip(exit, "RDMSR")
                }
                Err(gp) => {
                    log::debug!("linux: RDMSR {msr:#x} refused ({gp:?}): #GP");
                    self.refuse(exit)
                }
            }
        }
    }

    fn mmio(&mut self, exit: &VmExit, gpa: u64) -> Next {
        let (bytes, n, mode) = self.fetch(exit.rip);
        let op: MmioOp = match decode_mmio(bytes.get(..n).unwrap_or(&[]), mode) {
            Ok(op) => op,
            Err(e) => {
                log::error!(
                    "linux: MMIO access to {gpa:#x} at rip={:#x}: {} (bytes {:02x?})",
                    exit.rip,
                    e.as_str(),
                    bytes.get(..n).unwrap_or(&[])
                );
                return Next::Stop(Stop::Error);
            }
        };
        let reg = match op.operand {
            mmio::Operand::Reg(g) => Some(g.index),
            mmio::Operand::Imm(_) => None,
        };
        if reg.is_some_and(|i| self.vcpu.regs().gpr_mut(i).is_none()) {
            log::error!(
                "linux: MMIO through RSP at rip={:#x} (not emulated)",
                exit.rip
            );
            return Next::Stop(Stop::Error);
        }
        if self.dm.as_ref().is_some_and(|d| d.claims(gpa)) {
            return self.mmio_forward(exit, gpa, &op, reg);
        }
        let result = match op.dir {
            Direction::Read => self.m.mmio_read(gpa, op.size).map(|data| {
                if let Some(r) = reg.and_then(|i| self.vcpu.regs().gpr_mut(i)) {
                    if let Some(v) = op.read_merge(*r, data) {
                        *r = v;
                    }
                }
            }),
            Direction::Write => {
                let src = reg
                    .and_then(|i| self.vcpu.regs().gpr_mut(i).map(|r| *r))
                    .unwrap_or(0);
                self.m.mmio_write(gpa, op.size, op.write_value(src))
            }
        };
        match result {
            Ok(()) => Next::Resume(exit.rip.wrapping_add(u64::from(op.len))),
            Err(machine::NoDevice { gpa }) => {
                log::error!(
                    "linux: MMIO {} of {} bytes at {gpa:#x}: no device there, rip={:#x}",
                    if op.dir == Direction::Read {
                        "read"
                    } else {
                        "write"
                    },
                    op.size,
                    exit.rip
                );
                Next::Stop(Stop::Error)
            }
        }
    }

    /// The MMIO access `op` at `gpa` in the device model's window: carried
    /// to `doppel run`, the guest resumed after it with what it read.
    fn mmio_forward(&mut self, exit: &VmExit, gpa: u64, op: &MmioOp, reg: Option<u8>) -> Next {
        let read = op.dir == Direction::Read;
        let data = if read {
            0
        } else {
            let src = reg
                .and_then(|i| self.vcpu.regs().gpr_mut(i).map(|r| *r))
                .unwrap_or(0);
            op.write_value(src)
        };
        match self.forward(gpa, op.size, read, data) {
            Ok(v) => {
                if read {
                    if let Some(r) = reg.and_then(|i| self.vcpu.regs().gpr_mut(i)) {
                        if let Some(n) = op.read_merge(*r, v) {
                            *r = n;
                        }
                    }
                }
                Next::Resume(exit.rip.wrapping_add(u64::from(op.len)))
            }
            Err(e) => {
                self.flush_line();
                match e {
                    DmError::Protocol(p) => log::error!(
                        "linux: device model: {} ({p:?}) at {gpa:#x}, rip={:#x}",
                        p.text(),
                        exit.rip
                    ),
                    DmError::NoAnswer => log::error!(
                        "linux: device model: no answer in {DM_PATIENCE_S} s to the access at {gpa:#x} (is `doppel run` serving this machine?), rip={:#x}",
                        exit.rip
                    ),
                    DmError::NoDevice { addr } => log::error!(
                        "linux: MMIO at {addr:#x} in the device window but in no device's registers, rip={:#x}",
                        exit.rip
                    ),
                }
                Next::Stop(Stop::Error)
            }
        }
    }

    fn cr_write(&mut self, exit: &VmExit, cr: u8, gpr: Option<u8>) -> Next {
        let (gpr, next) = match gpr {
            Some(g) => match self.next_rip(exit) {
                Some(n) => (g, n),
                None => {
                    log::error!(
                        "linux: MOV to CR{cr}: no instruction length, rip={:#x}",
                        exit.rip
                    );
                    return Next::Stop(Stop::Error);
                }
            },
            None => {
                let (bytes, n, mode) = self.fetch(exit.rip);
                match decode_mov_to_cr(bytes.get(..n).unwrap_or(&[]), mode) {
                    Ok(d) if d.cr == cr => (d.gpr, exit.rip.wrapping_add(u64::from(d.len))),
                    other => {
                        log::error!(
                            "linux: CR{cr} write at rip={:#x} not decoded ({other:?}, bytes {:02x?})",
                            exit.rip,
                            bytes.get(..n).unwrap_or(&[])
                        );
                        return Next::Stop(Stop::Error);
                    }
                }
            }
        };
        let long = self.vcpu.cs_long();
        let Some(v) = self.vcpu.regs().gpr_mut(gpr).map(|r| *r) else {
            log::error!(
                "linux: MOV to CR{cr} from RSP at rip={:#x} (not emulated)",
                exit.rip
            );
            return Next::Stop(Stop::Error);
        };
        let v = if long { v } else { v & 0xffff_ffff };
        let checked = match cr {
            0 => machine::check_cr0(v),
            4 => machine::check_cr4(v),
            _ => Ok(v),
        };
        match checked {
            Ok(v) if self.vcpu.set_cr(cr, v) => Next::Resume(next),
            Ok(_) => {
                log::error!(
                    "linux: the {} backend cannot write CR{cr}",
                    self.vcpu.backend()
                );
                Next::Stop(Stop::Error)
            }
            Err(_) => {
                log::debug!("linux: MOV to CR{cr} of {v:#x} refused: #GP");
                self.refuse(exit)
            }
        }
    }

    /// HLT: resume after it, once an interrupt is there to wake the guest
    /// (waiting in the host for the LAPIC timer's deadline).
    fn hlt(&mut self, exit: &VmExit) -> Next {
        let Some(next) = self.next_rip(exit) else {
            log::error!("linux: HLT at rip={:#x} of unknown length", exit.rip);
            return Next::Stop(Stop::Error);
        };
        self.vcpu.set_rip(next);
        if self.vcpu.state().rflags & RFLAGS_IF == 0 {
            // `cli; hlt`: no maskable interrupt can wake it (Linux's halt
            // after a failed poweroff, or a stop on panic).
            self.flush_line();
            log::info!(
                "linux: the guest halted with interrupts off at rip={:#x}",
                exit.rip
            );
            return Next::Stop(Stop::Halted);
        }
        loop {
            self.device_interrupts();
            let now = rdtsc();
            self.m.update(now);
            if self.m.pending().is_some() {
                return Next::Retry;
            }
            // With devices, an interrupt may come from the device model
            // before the deadline (or with none armed): look every so often.
            let step = if self.dm.is_some() {
                DM_POLL_TICKS
            } else {
                u64::MAX
            };
            match self.m.next_deadline() {
                Some(d) if d > now => {
                    let until = d.min(now.saturating_add(step));
                    while rdtsc() < until {
                        core::hint::spin_loop();
                    }
                }
                Some(_) => {}
                None if self.dm.is_some() => {
                    let until = now.saturating_add(step);
                    while rdtsc() < until {
                        core::hint::spin_loop();
                    }
                }
                None => {
                    self.flush_line();
                    log::error!(
                        "linux: the guest waits in HLT at rip={:#x} for an interrupt that nothing will raise (no timer armed)",
                        exit.rip
                    );
                    return Next::Stop(Stop::Error);
                }
            }
        }
    }
}
