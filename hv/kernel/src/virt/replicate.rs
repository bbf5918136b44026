//! The replication service's hardware binding (Remus mode).
//!
//! The protocol itself (control area, commands with role checks, staging,
//! output hold and release, Activate, Detach and re-attach) is the engine
//! in hv/core (`doppel_core::engine`, docs/REPLICATION.md); `doppel
//! sim-hv` runs the same engine on the host. Here is only what needs the
//! machine: the guest and its nested tables, the frames of the control
//! area and of the locator, the vCPU, and the run loop's epoch ends
//! ([`EpochSink`]) forwarded to the engine. The guest is stopped at every
//! epoch end until the engine has staged the checkpoint; it waits there
//! while the tool still holds the staging area (back-pressure).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64};

use doppel_abi::control::{ControlHeader, ControlView, Field, Region};
use doppel_abi::guest::{PAGE_SIZE, PROGRAM_KV, PROGRAM_WORKLOAD};
use doppel_abi::locator::{Locator, LOCATOR_WORDS};
use doppel_abi::msg::LogDirtyMode;
use doppel_abi::{errno::Errno, AtomicMem, AtomicMem64, SharedMem};
use doppel_core::addr::HostPhysAddr;
use doppel_core::engine::control::{features, publish_area, publish_locator, region_sizes};
use doppel_core::engine::{self, bitmap_pfns, EpochClock, EpochPolicy, Remus, Role};
use doppel_core::hvm::{HeaderInfo, VcpuState};
use doppel_core::paging::NestedEntry;
use doppel_core::selftest::Mode;

use super::guest::{self, GuestRam, Workload};
use super::run::{run_mode, EpochEnd, EpochSink, Plan, Recv};
use super::vcpu::{GuestStart, Vcpu};
use crate::arch::instr::cpuid;
use crate::mem::frames;

/// The engine over the control area in machine memory.
pub(super) type Engine = engine::Engine<AtomicMem<'static>, AtomicMem64<'static>>;

/// Run the guest as a replicated primary. True when the guest finished and
/// every checkpoint was acknowledged by the tool.
/// `offered` are the log-dirty modes the backend tracks with; the tool's
/// `LogDirtyEnable` picks one, and the vCPU is built for it.
pub fn primary<E, V, F>(plan: &Plan, vmmcall: bool, offered: &[LogDirtyMode], make_vcpu: F) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&GuestStart, HostPhysAddr, Mode) -> Result<V, &'static str>,
{
    said(
        "primary",
        primary_inner::<E, V, F>(plan, vmmcall, offered, make_vcpu),
    )
}

/// The run loop's tracker for a log-dirty mode of the protocol.
pub fn tracker(mode: LogDirtyMode) -> Mode {
    match mode {
        LogDirtyMode::WriteProtect => Mode::WriteProtect,
        LogDirtyMode::Pml => Mode::Pml,
        LogDirtyMode::AdScan => Mode::AdScan,
    }
}

/// The run's verdict; an error is logged as `who: error`.
pub(super) fn said(who: &str, run: Result<bool, &'static str>) -> bool {
    run.unwrap_or_else(|e| {
        log::error!("{who}: {e}");
        false
    })
}

fn primary_inner<E, V, F>(
    plan: &Plan,
    vmmcall: bool,
    offered: &[LogDirtyMode],
    make_vcpu: F,
) -> Result<bool, &'static str>
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&GuestStart, HostPhysAddr, Mode) -> Result<V, &'static str>,
{
    let mut ram = GuestRam::new(plan.mem_bytes).map_err(|_| "no memory for the guest")?;
    let workload = Workload {
        patterns: plan.patterns,
        epochs: plan.epochs,
        seed: plan.seed,
        vmmcall,
        program: if plan.service {
            PROGRAM_KV
        } else {
            PROGRAM_WORKLOAD
        },
        keys: plan.keys,
    };
    let start = guest::load(&mut ram, &workload).map_err(|_| "loading the guest")?;
    let role = if plan.service {
        Role::Service
    } else {
        Role::Workload
    };
    let mut area = Binding::publish(&ram, role, plan.epoch_exits)?;
    area.engine.offer_modes(offered);
    log::info!(
        "primary: control area at {:#x} ({} bytes), guest RAM at {:#x} ({} bytes); waiting for the dom0 tool",
        area.pa,
        area.size,
        ram.hpa(),
        ram.bytes()
    );
    area.engine.wait_enabled(core::hint::spin_loop)?;
    // The vCPU and its tracker are built for the mode the tool chose.
    let mode = tracker(area.engine.log_dirty_mode());
    let mut table = ram
        .nested_table::<E>()
        .map_err(|_| "building the nested page table")?;
    let mut vcpu = make_vcpu(&start, table.root(), mode)?;
    log::info!(
        "primary: log-dirty enabled by the tool (mode={}); guest starts",
        mode.name()
    );
    let ran = run_mode(&mut ram, &mut table, &mut vcpu, mode, plan, &mut area);
    if ran != Ok(true) {
        // The guest or an epoch end failed: tell the tool on the event ring
        // (it stops with the hypervisor's errno) before giving up.
        area.engine.post_error(Errno::EIO);
        return ran;
    }
    area.engine.wait_detached(core::hint::spin_loop)?;
    log::info!(
        "primary: guest finished after {} checkpoints, last committed epoch {}",
        area.engine.stats().posted,
        area.engine
            .committed()
            .map_or(-1, |e| i64::try_from(e).unwrap_or(i64::MAX))
    );
    Ok(true)
}

/// Run as a standby: publish a control area whose guest RAM the backup
/// tool fills, wait for `Activate`, then run the guest from the vCPU
/// record the tool wrote, unreplicated. False when anything failed (the
/// standby never returns otherwise: the service runs until power-off).
pub fn standby<E, V, F>(plan: &Plan, make_vcpu: F) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&VcpuState, HostPhysAddr) -> Result<V, &'static str>,
{
    said("standby", standby_inner::<E, V, F>(plan, make_vcpu))
}

fn standby_inner<E, V, F>(plan: &Plan, make_vcpu: F) -> Result<bool, &'static str>
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&VcpuState, HostPhysAddr) -> Result<V, &'static str>,
{
    let mut ram = GuestRam::new(plan.mem_bytes).map_err(|_| "no memory for the guest")?;
    let mut area = Binding::publish(&ram, Role::Standby, plan.epoch_exits)?;
    log::info!(
        "standby: control area at {:#x} ({} bytes), guest RAM at {:#x} ({} bytes); waiting for Activate",
        area.pa,
        area.size,
        ram.hpa(),
        ram.bytes()
    );
    let (epoch, state) = area.engine.wait_activated(core::hint::spin_loop)?;
    log::info!(
        "standby: activated from committed epoch {epoch}; guest resumes at rip={:#x}",
        state.rip
    );
    let mut table = ram
        .nested_table::<E>()
        .map_err(|_| "building the nested page table")?;
    let mut vcpu = make_vcpu(&state, table.root())?;
    // Epochs end as in a primary (the plan's epoch timer or exit count):
    // an activated standby may be protected to a new backup, and then
    // checkpoints at those ends; unprotected, an epoch end only serves the
    // tool.
    let run = Plan {
        service: true,
        pause_cycles: false,
        ..*plan
    };
    run_mode(
        &mut ram,
        &mut table,
        &mut vcpu,
        Mode::WriteProtect,
        &run,
        &mut area,
    )
}

/// The record header of every checkpoint this hypervisor stages.
pub(super) fn checkpoint_header() -> HeaderInfo {
    HeaderInfo {
        cpuid: cpuid(1, 0).eax,
        gtsc_khz: 0,
        changeset: 0,
    }
}

/// A control area published and left unserved: where it lies and its
/// layout.
#[derive(Clone, Copy, Debug)]
pub struct Published {
    /// Machine address of the header (page aligned).
    pub pa: u64,
    /// Bytes the frame allocator gave it (whole pages).
    pub size: u64,
    pub view: ControlView,
}

/// Publish a control area for `ram` exactly as a replicated primary of
/// the workload does (header, rings, channels, locator), and never serve
/// it: `mode=isolation` aims its hostile probes at it. The area stays
/// allocated and published for the rest of the run.
pub fn publish_unserved(ram: &GuestRam) -> Result<Published, &'static str> {
    let (pa, size, views) = map_area(ram, Role::Workload)?.1;
    Ok(Published {
        pa,
        size,
        view: views.view,
    })
}

/// The engine and where its area lies.
pub(super) struct Binding {
    pub(super) engine: Engine,
    pa: u64,
    size: u64,
    /// When a service epoch ends (the engine's policy, from the plan).
    policy: Remus,
    /// The area's two views (as the engine has them), for the in-machine
    /// replica (`super::replica`), which plays the tool over them.
    pub(super) views: Views,
    /// The Linux guest's exits since its last epoch end
    /// ([`Binding::exit_ends_epoch`]).
    exits: u64,
    /// The guest TSC at the Linux guest's first exit since its last epoch
    /// end (`None`: none yet).
    began: Option<u64>,
}

/// The whole control area as 32-bit words (header, rings, channels) and
/// as 64-bit words (staging, pfn list, vCPU area).
#[derive(Clone, Copy)]
pub(super) struct Views {
    pub(super) rings: AtomicMem<'static>,
    pub(super) bulk: AtomicMem64<'static>,
    pub(super) view: ControlView,
}

impl Binding {
    /// Publish the area for `ram` with role `role`; a service epoch ends
    /// every `epoch_exits` exits when given.
    pub(super) fn publish(
        ram: &GuestRam,
        role: Role,
        epoch_exits: Option<u64>,
    ) -> Result<Self, &'static str> {
        let (engine, (pa, size, views)) = map_area(ram, role)?;
        Ok(Self {
            engine,
            pa,
            size,
            policy: Remus {
                epoch_exits,
                epoch_ticks: None,
            },
            views,
            exits: 0,
            began: None,
        })
    }
}

/// Allocate, publish and attach the control area for `ram` (the locator
/// names it); the engine, and the area's address, size and views.
fn map_area(ram: &GuestRam, role: Role) -> Result<(Engine, (u64, u64, Views)), &'static str> {
    let mut h = ControlHeader::pack(region_sizes(ram.pages()), features(role))
        .map_err(|_| "control area layout")?;
    h.guest_ram = Region {
        offset: ram.hpa(),
        size: ram.bytes(),
    };
    let size = h.total_size.next_multiple_of(PAGE_SIZE);
    let pa = frames::alloc_contiguous(size, PAGE_SIZE).ok_or("no memory for the control area")?;
    // SAFETY: `pa..pa+size` is fresh, zeroed, identity-mapped memory the
    // frame allocator gave to us, page aligned, and it is never freed (the
    // area lives as long as the hypervisor). Besides us, only the dom0 tool
    // accesses it, concurrently, from another CPU (or from the emulator
    // host process); that is why every access on our side goes through
    // atomic words and no plain reference to the bytes is ever made.
    //
    // 32-bit words for the header, rings and channels: the tool writes
    // rsp_prod/req_event while we write req_prod/rsp_event, two u32 fields
    // per 8-byte word. A u32 store into an 8-byte atomic is a
    // read-modify-write, and QEMU's TCG runs a single vCPU's locked
    // instructions non-atomically, so a merge could write back the tool's
    // field as it was before the tool's store (seen as a lost final ack).
    // Plain 32-bit stores never touch the peer's field.
    let words: &'static [AtomicU32] =
        unsafe { core::slice::from_raw_parts(pa as *const AtomicU32, (size / 4) as usize) };
    // SAFETY: the same area as above, viewed as 64-bit atomic words (`pa`
    // is page aligned, `size` whole pages). The engine reaches the
    // staging, pfn-list and vCPU areas and the header's live words (which
    // have one writer each) only through this view, and the header, rings
    // and channels only through the 32-bit one (doppel_core::engine), so
    // no location is accessed with two sizes at once on our side.
    let wide: &'static [AtomicU64] =
        unsafe { core::slice::from_raw_parts(pa as *const AtomicU64, (size / 8) as usize) };
    let (rings, bulk) = (AtomicMem::new(words), AtomicMem64::new(wide));
    let view = publish_area(&rings, &h).map_err(|e| e.text())?;
    let engine = Engine::attach(rings, bulk, view, role, Remus::default(), ())?;
    write_locator(pa, size, h.total_size, h.guest_ram)?;
    Ok((engine, (pa, size, Views { rings, bulk, view })))
}

/// Write the control locator (hv/abi locator.rs) for the area at `pa`
/// (`size` bytes): the tool finds the area through it, never by scanning
/// memory the guest can write.
fn write_locator(pa: u64, size: u64, total: u64, guest_ram: Region) -> Result<(), &'static str> {
    let at = frames::locator_page().ok_or(
        "the control locator page (512 KiB) is not free RAM; the tool could not find the area",
    )?;
    let loc = Locator {
        control_at: pa,
        control_size: size,
    };
    // Our own placement must pass the tool's checks (it always does: the
    // locator page and the area are the allocator's, the guest RAM too).
    loc.check(total, guest_ram)
        .map_err(|_| "own control locator does not check")?;
    // SAFETY: the locator page was reserved at boot (never handed out by
    // the frame allocator, so never guest RAM and never mapped by a nested
    // table), is identity mapped, 8-byte aligned and lives for the whole
    // run. Besides us only the dom0 tool reads it, from another process;
    // every access here is atomic.
    let words: &'static [AtomicU64] =
        unsafe { core::slice::from_raw_parts(at as *const AtomicU64, LOCATOR_WORDS) };
    publish_locator(&AtomicMem64::new(words), &loc);
    Ok(())
}

impl Binding {
    /// The Linux guest exited (its run loop counts here, not through
    /// [`EpochSink`]): the hypervisor is alive, and whether the engine's
    /// epoch policy ends the epoch at this exit.
    /// `guest_tsc` is the guest's TSC at the exit.
    pub(super) fn exit_ends_epoch(&mut self, guest_tsc: u64) -> bool {
        self.engine.beat();
        self.exits += 1;
        let began = *self.began.get_or_insert(guest_tsc);
        self.epoch_due(&EpochClock {
            timer_fired: false,
            exits: self.exits,
            first: false,
            guest_ticks: guest_tsc.saturating_sub(began),
        })
    }
}

/// What a checkpoint records besides memory.
pub(super) enum Context<'a> {
    /// The test guests: one vCPU, encoded by the engine.
    Vcpu(&'a VcpuState),
    /// A whole machine (the Linux guest): its HVM context stream, encoded.
    Machine(&'a [u8]),
}

impl Binding {
    /// The epoch ended with the guest stopped: stage its harvest's pages
    /// from `ram` and `context` for the tool (after the tool has taken the
    /// previous checkpoint: back-pressure), unless nothing is replicated
    /// (an activated standby; a detached primary, which serves the tool's
    /// successor instead). `what` names the epoch end in the log line.
    pub(super) fn checkpoint(
        &mut self,
        harvest: &[u8],
        ram: &GuestRam,
        context: Context<'_>,
        what: &str,
        exits: u64,
    ) -> Result<(), &'static str> {
        self.exits = 0;
        self.began = None;
        self.engine.beat();
        if self.engine.role() == Role::Standby {
            // An activated standby runs unreplicated: nothing to stage.
            return Ok(());
        }
        if self.engine.detached() {
            // Unprotected: serve the tool's successor, stage nothing.
            return self.engine.poll();
        }
        // Back-pressure: staging holds one checkpoint at a time.
        self.engine.wait_staging_free(core::hint::spin_loop)?;
        if self.engine.detached() {
            // Detach arrived while the guest waited: stage nothing.
            return Ok(());
        }
        let pfns = bitmap_pfns(harvest);
        let s = match context {
            Context::Vcpu(v) => self.engine.stage(pfns, ram, v, checkpoint_header())?,
            Context::Machine(m) => self.engine.stage_context(pfns, ram, m)?,
        };
        log::info!(
            "primary: checkpoint epoch={} pattern={what} dirty={} exits={exits} held={}",
            s.epoch,
            s.dirty,
            self.engine.held_records()
        );
        Ok(())
    }
}

impl EpochSink for Binding {
    fn recv(&mut self, dst: &mut [u8]) -> Result<Recv, &'static str> {
        self.engine.recv(dst)
    }

    fn send(&mut self, record: &[u8]) -> Result<bool, &'static str> {
        self.engine.send(record)
    }

    fn poll(&mut self) -> Result<(), &'static str> {
        self.engine.poll()
    }

    fn epoch_end(&mut self, e: &EpochEnd<'_>) -> Result<(), &'static str> {
        let what = match (e.pattern, self.engine.role()) {
            (Some(p), _) => p.name(),
            (None, Role::Workload) => "stop",
            (None, _) => "service",
        };
        self.checkpoint(e.harvest, e.ram, Context::Vcpu(&e.vcpu), what, e.exits)
    }

    fn checkpoint_at_stop(&self) -> bool {
        true
    }

    fn exited(&mut self) {
        self.engine.beat();
    }

    fn epoch_due(&self, clock: &EpochClock) -> bool {
        self.policy.epoch_due(clock)
    }

    /// Nobody uses the harvests of a detached primary or of an activated
    /// standby (which never checkpoints): their guests run without
    /// write-protect exits.
    fn tracking(&self) -> bool {
        self.engine.tracking()
    }

    fn resumed(&mut self, pause: Option<u64>) {
        if let Some(p) = pause {
            log::info!(
                "primary: epoch={} pause_cycles={p}",
                self.engine.next_epoch().saturating_sub(1)
            );
        }
    }

    fn pause_measured(&mut self, cycles: u64) {
        self.engine.pause_measured(cycles);
    }
}

/// The Linux guest as a replicated primary for the dom0 tool (`mode=linux
/// replicate=primary`, issue 21): the control area is published before the
/// guest starts; the tool's `LogDirtyEnable` picks the tracker; every
/// epoch (the engine's policy: every `epoch-exits` exits) stages the
/// harvest and the whole machine's HVM context, exactly as `doppel
/// primary` takes them from the key-value guest.
pub(super) struct LinuxPrimary {
    bind: Binding,
    mode: Mode,
}

impl LinuxPrimary {
    /// Publish the control area for `ram` (boot image loaded) and wait for
    /// the tool to enable log-dirty with one of `offered`.
    pub(super) fn start(
        ram: &GuestRam,
        offered: &[LogDirtyMode],
        policy: Remus,
    ) -> Result<Self, &'static str> {
        let mut bind = Binding::publish(ram, Role::Workload, None)?;
        bind.policy = policy;
        bind.engine.offer_modes(offered);
        log::info!(
            "primary: control area at {:#x} ({} bytes), guest RAM at {:#x} ({} bytes), the Linux guest; waiting for the dom0 tool",
            bind.pa,
            bind.size,
            ram.hpa(),
            ram.bytes()
        );
        bind.engine.wait_enabled(core::hint::spin_loop)?;
        let mode = tracker(bind.engine.log_dirty_mode());
        log::info!(
            "primary: log-dirty enabled by the tool (mode={}); Linux starts, {}",
            mode.name(),
            EpochEvery(policy)
        );
        Ok(Self { bind, mode })
    }
}

/// The Linux primary's epoch policy, as its log line names it.
struct EpochEvery(Remus);

impl core::fmt::Display for EpochEvery {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Remus {
                epoch_exits: Some(n),
                ..
            } => write!(f, "an epoch every {n} exits"),
            Remus {
                epoch_ticks: Some(t),
                ..
            } => write!(f, "an epoch every {t} guest TSC ticks (epoch-ms)"),
            _ => write!(f, "epochs on the timer"),
        }
    }
}

impl super::linux::LinuxEpochs for LinuxPrimary {
    fn tracker(&self) -> Mode {
        self.mode
    }

    fn exited(&mut self, guest_tsc: u64) -> bool {
        self.bind.exit_ends_epoch(guest_tsc)
    }

    fn dm_epoch(&self) -> Option<u64> {
        let e = &self.bind.engine;
        e.replicating().then(|| e.next_epoch())
    }

    fn epoch_end(
        &mut self,
        harvest: &[u8],
        ram: &GuestRam,
        context: &[u8],
        exits: u64,
    ) -> Result<super::linux::EpochNext, &'static str> {
        self.bind
            .checkpoint(harvest, ram, Context::Machine(context), "linux", exits)?;
        Ok(if self.bind.engine.tracking() {
            super::linux::EpochNext::Track
        } else {
            super::linux::EpochNext::Untracked
        })
    }

    /// The guest was stopped `pause` cycles for the epoch end (harvest,
    /// device-model cut, staging): one line per epoch for the figures, and
    /// the engine's pause for the tool.
    fn resumed(&mut self, pause: u64) {
        self.bind.pause_measured(pause);
        self.bind.resumed(Some(pause));
    }

    fn report(&self, _backend: &str, powered_off: bool) -> bool {
        log::info!(
            "primary: the Linux guest stopped after {} checkpoints, last committed epoch {}",
            self.bind.engine.stats().posted,
            self.bind
                .engine
                .committed()
                .map_or(-1, |e| i64::try_from(e).unwrap_or(i64::MAX))
        );
        powered_off
    }
}

/// A Linux standby (`mode=linux replicate=standby`): the area published
/// for the backup tool to fill; once activated, the whole machine's
/// committed context as the tool wrote it into the vCPU area. After that
/// the guest runs unreplicated; its exits keep the liveness word moving
/// and the tool's commands served.
pub(super) struct LinuxActivated {
    bind: Binding,
    epoch: u64,
}

impl LinuxActivated {
    /// Publish a standby area for `ram` and wait for `Activate`: the
    /// standby and the committed context it resumes from (the vCPU area's
    /// bytes up to the context's END record).
    pub(super) fn wait(ram: &GuestRam) -> Result<(Self, Vec<u8>), &'static str> {
        let mut bind = Binding::publish(ram, Role::Standby, None)?;
        log::info!(
            "standby: control area at {:#x} ({} bytes), guest RAM at {:#x} ({} bytes), for a Linux guest; waiting for Activate",
            bind.pa,
            bind.size,
            ram.hpa(),
            ram.bytes()
        );
        let (epoch, state) = bind.engine.wait_activated(core::hint::spin_loop)?;
        let (vo, vs) = bind.views.view.region(Field::VcpuArea);
        let mut area = alloc::vec![0u8; vs];
        bind.views.bulk.read_bytes(vo, &mut area);
        let len = doppel_core::hvm::stream_len(&area).map_err(|_| {
            "the committed HVM context in the vCPU area has no END record within it"
        })?;
        area.truncate(len);
        log::info!(
            "standby: activated from committed epoch {epoch}; Linux resumes at rip={:#x} ({len} bytes of records)",
            state.rip
        );
        Ok((Self { bind, epoch }, area))
    }
}

impl super::linux::LinuxEpochs for LinuxActivated {
    fn tracker(&self) -> Mode {
        Mode::WriteProtect
    }

    fn exited(&mut self, _guest_tsc: u64) -> bool {
        self.bind.engine.beat();
        false
    }

    fn epoch_end(
        &mut self,
        _harvest: &[u8],
        _ram: &GuestRam,
        _context: &[u8],
        _exits: u64,
    ) -> Result<super::linux::EpochNext, &'static str> {
        Err("an activated standby ends no epochs")
    }

    fn report(&self, _backend: &str, powered_off: bool) -> bool {
        log::info!(
            "standby: the Linux guest resumed from committed epoch {} {}",
            self.epoch,
            if powered_off {
                "ran to its poweroff"
            } else {
                "did not finish"
            }
        );
        powered_off
    }
}
