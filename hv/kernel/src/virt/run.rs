//! Running the test guest under a backend with dirty tracking, vendor-
//! neutral. This is the one exit dispatch: every exit of every backend comes
//! through [`Run::dispatch`], and RIP moves only through its [`Action`].
//!
//! What happens at each of the guest's epoch ends is the [`EpochSink`]'s
//! business: the self-test compares the harvest with the guest's truth, the
//! replication service stages a checkpoint for the dom0 tool.

use alloc::vec;
use alloc::vec::Vec;

use doppel_abi::guest::{hypercall, PatternId, CONSOLE_PORT, MAX_RECORD, PAGE_SIZE, SEND_AGAIN};
use doppel_core::dirtylog::DirtyTree;
use doppel_core::engine::EpochClock;
use doppel_core::exit::{exact_length, read_code, resume_rip, Action, ExitKind, VmExit};
use doppel_core::fault;
use doppel_core::hvm::{PendingEvent, VcpuState};
use doppel_core::paging::{NestedEntry, NestedPageTable};
use doppel_core::regs::Brief;
use doppel_core::selftest::Mode;
use doppel_kernel::config::Broken;
use heapless::Vec as HVec;

use super::guest::{GuestRam, KernelFrames};
use super::track::{self, Tracker};
use super::vcpu::Vcpu;
use crate::arch::instr::{cpuid, rdtsc};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub mem_bytes: u64,
    pub epochs: u32,
    pub patterns: u32,
    pub seed: u64,
    pub broken: Option<Broken>,
    /// Measure the epoch-end pause in TSC cycles and print it.
    pub pause_cycles: bool,
    /// End a tracking epoch every this many TSC ticks with the backend's
    /// epoch timer (VMX-preemption timer, LAPIC timer on SVM), besides the
    /// guest's own epoch ends. Each timer epoch harvests and re-arms
    /// tracking while the guest is mid-pattern; the sink sees the union of
    /// the harvests at the guest's next epoch end.
    pub epoch_ticks: Option<u64>,
    /// Service runs (the key-value guest): every epoch-timer expiry ends a
    /// checkpoint epoch (not a tracking epoch inside the guest's own), and
    /// so does every `epoch_exits`-th exit; the run has no exit limit.
    pub service: bool,
    pub epoch_exits: Option<u64>,
    /// Keys of the key-value service.
    pub keys: u32,
}

/// Upper bound on exits in one run, so a guest stuck in a loop of exits
/// fails the run instead of hanging it.
const MAX_EXITS: u64 = 5_000_000;

/// One epoch end, as the sink sees it. The guest is stopped throughout.
pub struct EpochEnd<'a> {
    pub backend: &'static str,
    pub mode: Mode,
    /// The guest's pattern, or `None` for the final checkpoint taken when
    /// the guest stops.
    pub pattern: Option<PatternId>,
    /// The guest's running epoch number.
    pub epoch: u64,
    /// The epoch's harvest (CLEAN): Xen's bitmap layout, one bit per pfn.
    pub harvest: &'a [u8],
    pub ram: &'a GuestRam,
    /// Dirty-tracking exits and PML drains in the epoch.
    pub exits: u64,
    pub drains: u64,
    /// Timer-ended tracking epochs inside this epoch, and the sum of what
    /// each tracking epoch harvested (see [`Plan::epoch_ticks`]).
    pub timer_epochs: u64,
    pub tracked_dirty: u64,
    /// The vCPU at the epoch end, RIP already past the hypercall.
    pub vcpu: VcpuState,
}

/// What a run does at the guest's epoch ends.
pub trait EpochSink {
    /// Before the guest first runs, with tracking armed (unless
    /// [`EpochSink::tracking`] said none is wanted).
    fn start(&mut self, _log: &DirtyTree, _ram: &GuestRam) -> Result<(), &'static str> {
        Ok(())
    }

    /// The guest ended an epoch; its harvest is in `e`.
    fn epoch_end(&mut self, e: &EpochEnd<'_>) -> Result<(), &'static str>;

    /// Tracking is re-armed and the guest resumes next; `pause` is the TSC
    /// cycles from guest stop to now (when measured).
    fn resumed(&mut self, _pause: Option<u64>) {}

    /// The epoch-end pause just measured (every service checkpoint,
    /// whether or not the plan prints it), in TSC cycles.
    fn pause_measured(&mut self, _cycles: u64) {}

    /// Whether the guest's stop (DONE) ends one more epoch, so that what
    /// the sink saw last is exactly the memory the guest stopped with.
    fn checkpoint_at_stop(&self) -> bool {
        false
    }

    /// The guest's `RECV`: copy the next input record into `dst`.
    fn recv(&mut self, _dst: &mut [u8]) -> Result<Recv, &'static str> {
        Err("this run has no input channel")
    }

    /// The guest's `SEND`: take an output record. False: no room now.
    fn send(&mut self, _record: &[u8]) -> Result<bool, &'static str> {
        Err("this run has no output channel")
    }

    /// The guest is idle (an empty `RECV`): serve the tool meanwhile.
    fn poll(&mut self) -> Result<(), &'static str> {
        Ok(())
    }

    /// The hostile guest's `ESCAPED`: it got past probe `probe` (having
    /// read `value`). The run stops after it either way.
    fn escaped(&mut self, _probe: u64, _value: u64) -> Result<(), &'static str> {
        Err("ESCAPED from a guest that runs no probes")
    }

    /// The hostile guest's `FAULTED`: its probe took exception `vector`
    /// (error code `error`, 0 when none) at `rip`. The run stops after it
    /// either way.
    fn faulted(&mut self, _vector: u64, _error: u64, _rip: u64) -> Result<(), &'static str> {
        Err("FAULTED from a guest that runs no probes")
    }

    /// The dispatch refused `exit` and injected `ev`; the guest resumes at
    /// the instruction, where `ev` is delivered.
    fn refused(&mut self, _exit: &VmExit, _ev: &PendingEvent) {}

    /// The run stopped at `exit` (DONE, ESCAPED, FAULTED or a failure).
    fn stopped(&mut self, _exit: &VmExit) {}

    /// The guest exited (any exit, timer and epoch ends included): the
    /// hypervisor is alive. The replication service advances the control
    /// area's liveness counter here.
    fn exited(&mut self) {}

    /// Service runs, at every exit: whether the epoch ends here (the
    /// replication engine's epoch policy decides; by default the epoch
    /// timer alone).
    fn epoch_due(&self, clock: &EpochClock) -> bool {
        clock.timer_fired
    }

    /// Asked after every exit, with the guest's state complete (RIP set,
    /// any epoch end staged): true ends the run here as a success, the
    /// guest not finished (the in-machine replica fails over now, or has
    /// seen the service do its work).
    fn finished(&self) -> bool {
        false
    }

    /// Asked at each epoch end: whether the next epoch's writes must be
    /// tracked. False once nobody uses the harvests (replication detached,
    /// or an activated standby); true again re-arms tracking from scratch.
    fn tracking(&self) -> bool {
        true
    }
}

/// What a `RECV` found (the replication engine's answer).
pub use doppel_core::engine::Recv;

/// Run the guest in `mode` until it says DONE (true when its status is 0
/// and every sink call succeeded).
pub fn run_mode<E: NestedEntry, V: Vcpu, S: EpochSink>(
    ram: &mut GuestRam,
    table: &mut NestedPageTable<E, KernelFrames>,
    vcpu: &mut V,
    mode: Mode,
    plan: &Plan,
    sink: &mut S,
) -> Result<bool, &'static str> {
    let mut run = Run::new(ram, table, vcpu, mode, plan, sink)?;
    run.sink.start(run.tracker.log(), run.ram)?;
    Ok(run.go())
}

/// One guest run in one mode.
struct Run<'a, E: NestedEntry, V: Vcpu, S: EpochSink> {
    ram: &'a mut GuestRam,
    table: &'a mut NestedPageTable<E, KernelFrames>,
    vcpu: &'a mut V,
    mode: Mode,
    plan: &'a Plan,
    sink: &'a mut S,
    tracker: Tracker,
    /// Union of the timer epochs' harvests since the guest's last epoch end.
    timer_union: Vec<u8>,
    timer_epochs: u64,
    tracked_dirty: u64,
    console: HVec<u8, 160>,
    /// The guest's DONE status, once it said it.
    done_status: Option<u64>,
    /// Service runs: exits since the last checkpoint, whether the epoch
    /// timer has expired, checkpoints taken, and the TSC at the last exit.
    epoch_exit_count: u64,
    timer_due: bool,
    checkpoints: u64,
    exit_tsc: u64,
    /// TSC when the current service epoch began (guest resumed).
    epoch_start_tsc: u64,
}

impl<'a, E: NestedEntry, V: Vcpu, S: EpochSink> Run<'a, E, V, S> {
    fn new(
        ram: &'a mut GuestRam,
        table: &'a mut NestedPageTable<E, KernelFrames>,
        vcpu: &'a mut V,
        mode: Mode,
        plan: &'a Plan,
        sink: &'a mut S,
    ) -> Result<Self, &'static str> {
        let sabotage = track::Sabotage {
            no_fault_mark: plan.broken == Some(Broken::NoFaultMark),
            no_pml_drain: plan.broken == Some(Broken::NoPmlDrain),
        };
        let tracker = Tracker::new(ram.pages(), mode, sabotage)?;
        let timer_union = vec![0u8; tracker.harvested().len()];
        let mut r = Self {
            ram,
            table,
            vcpu,
            mode,
            plan,
            sink,
            tracker,
            timer_union,
            timer_epochs: 0,
            tracked_dirty: 0,
            console: HVec::new(),
            done_status: None,
            epoch_exit_count: 0,
            timer_due: false,
            checkpoints: 0,
            exit_tsc: 0,
            epoch_start_tsc: rdtsc(),
        };
        if r.mode == Mode::WriteProtect && !r.sink.tracking() {
            // Nobody will harvest (an activated standby): never protect.
            r.tracker.off();
        } else {
            r.tracker.arm(r.table, r.vcpu, true)?;
        }
        r.arm_epoch_timer()?;
        Ok(r)
    }

    /// Stop the epoch timer while an epoch end is handled. The LAPIC timer
    /// counts host time too: left running through a harvest longer than its
    /// period, it would fire before the guest ran again, every time.
    fn stop_epoch_timer(&mut self) {
        if self.plan.epoch_ticks.is_some() {
            let _ = self.vcpu.arm_timer(None);
        }
    }

    /// (Re)start the epoch timer when the plan asks for timer epochs.
    fn arm_epoch_timer(&mut self) -> Result<(), &'static str> {
        match self.plan.epoch_ticks {
            Some(t) if !self.vcpu.arm_timer(Some(t)) => Err("the backend has no epoch timer"),
            _ => Ok(()),
        }
    }

    /// The epoch timer fired: end a tracking epoch (harvest, re-arm) inside
    /// the guest's epoch; its pages join the union the sink will see.
    fn timer_epoch(&mut self) -> Result<(), &'static str> {
        self.stop_epoch_timer();
        self.harvest_epoch()?;
        for (u, h) in self.timer_union.iter_mut().zip(self.tracker.harvested()) {
            *u |= *h;
        }
        self.timer_epochs += 1;
        self.rearm()?;
        self.arm_epoch_timer()
    }
    /// After an epoch end: track the next epoch, unless the sink wants no
    /// tracking ([`Tracker::rearm`]).
    fn rearm(&mut self) -> Result<(), &'static str> {
        let wanted = self.sink.tracking();
        self.tracker.rearm(self.table, self.vcpu, wanted)
    }

    /// Fill in the next RIP of a CPUID, hypercall or HLT exit whose backend
    /// could not report the instruction's length (SVM without NRIP save)
    /// from the instruction's own bytes, read through the guest's page
    /// tables: only the instruction's one exact encoding gives a length.
    /// Anything else leaves it unknown, and the guest stops.
    fn complete_length(&self, exit: VmExit) -> VmExit {
        let skipped = matches!(
            exit.kind,
            ExitKind::Cpuid | ExitKind::Hypercall | ExitKind::Hlt
        );
        if exit.next_rip.is_some() || !skipped {
            return exit;
        }
        let paging = self.vcpu.code_paging();
        let read = |gpa: u64| {
            self.ram
                .slice(gpa, 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let byte = |gpa: u64| self.ram.slice(gpa, 1).map(|b| b[0]);
        let (bytes, n) = read_code(&paging, exit.rip, read, byte);
        match exact_length(&exit.kind, &bytes[..n]) {
            Some(len) => VmExit {
                next_rip: Some(exit.rip.wrapping_add(len)),
                ..exit
            },
            None => exit,
        }
    }

    /// Run the guest to its end. False when it stopped in error.
    fn go(&mut self) -> bool {
        let mut exits: u64 = 0;
        loop {
            if !self.plan.service && exits >= MAX_EXITS {
                log::error!("more than {MAX_EXITS} exits; guest stuck");
                return false;
            }
            exits += 1;
            let exit = self.vcpu.run();
            self.sink.exited();
            let exit = self.complete_length(exit);
            if self.plan.pause_cycles || self.plan.service {
                self.exit_tsc = rdtsc();
            }
            self.epoch_exit_count += 1;
            let action = self.dispatch(&exit);
            match resume_rip(&exit, action) {
                Some(rip) => self.vcpu.set_rip(rip),
                None if action == Action::Stop => {
                    self.sink.stopped(&exit);
                    return self.finished_ok(&exit);
                }
                None => {
                    log::error!("exit {:?} has no known instruction length", exit.kind);
                    return false;
                }
            }
            if self.checkpoint_due() {
                if let Err(e) = self.service_checkpoint() {
                    log::error!("checkpoint: {e}; guest: {}", Brief(&self.vcpu.state()));
                    return false;
                }
            }
            if self.sink.finished() {
                return true;
            }
        }
    }

    /// Service runs: the epoch timer expired or the exit budget is spent.
    fn checkpoint_due(&self) -> bool {
        self.plan.service
            && self.sink.epoch_due(&EpochClock {
                timer_fired: self.timer_due,
                exits: self.epoch_exit_count,
                first: false,
                guest_ticks: 0,
            })
    }

    /// End a checkpoint epoch of a service run at this exit: the vCPU is
    /// recorded exactly as it will resume (RIP and results already set).
    fn service_checkpoint(&mut self) -> Result<(), &'static str> {
        let state = self.vcpu.state();
        let epoch = self.checkpoints;
        if self.plan.pause_cycles {
            // Guest progress of the epoch (its exits included), in TSC
            // ticks: under QEMU -icount, virtual nanoseconds.
            log::info!(
                "service: epoch={epoch} epoch_cycles={}",
                self.exit_tsc.wrapping_sub(self.epoch_start_tsc)
            );
        }
        self.end_epoch(state, None, epoch)?;
        self.checkpoints += 1;
        self.epoch_exit_count = 0;
        self.timer_due = false;
        self.rearm()?;
        self.arm_epoch_timer()?;
        let pause = rdtsc().wrapping_sub(self.exit_tsc);
        self.sink.pause_measured(pause);
        self.sink.resumed(self.plan.pause_cycles.then_some(pause));
        self.epoch_start_tsc = rdtsc();
        Ok(())
    }

    fn finished_ok(&self, exit: &VmExit) -> bool {
        matches!(exit.kind, ExitKind::Hypercall) && self.done_status == Some(0)
    }

    fn fail(&self, what: &str, exit: &VmExit) -> Action {
        log::error!(
            "{what}: {:?} at rip={:#x}; guest: {}",
            exit.kind,
            exit.rip,
            Brief(&self.vcpu.state())
        );
        Action::Stop
    }

    fn dispatch(&mut self, exit: &VmExit) -> Action {
        match exit.kind {
            ExitKind::NestedPageFault(f) if f.is_write_protect_candidate() => {
                match self.tracker.write_fault(self.table, self.vcpu, &f) {
                    Ok(_) => Action::Retry,
                    Err(e) => self.fail(e, exit),
                }
            }
            ExitKind::NestedPageFault(_) | ExitKind::NestedMisconfig { .. } => {
                self.fail("unexpected nested page fault", exit)
            }
            ExitKind::PmlFull => match self.tracker.pml_full(self.vcpu) {
                Ok(()) => Action::Retry,
                Err(e) => self.fail(e, exit),
            },
            ExitKind::Io(io) if io.port == CONSOLE_PORT && !io.input && !io.string => {
                let b = self.vcpu.regs().rax as u8;
                self.console_byte(b);
                Action::Skip
            }
            ExitKind::Cpuid => {
                let r = self.vcpu.regs();
                let mut c = cpuid(r.rax as u32, r.rcx as u32);
                match r.rax as u32 {
                    // Hide VMX, show "running under a hypervisor".
                    1 => c.ecx = (c.ecx & !(1 << 5)) | (1 << 31),
                    // Hide SVM.
                    0x8000_0001 => c.ecx &= !(1 << 2),
                    _ => {}
                }
                r.rax = c.eax.into();
                r.rbx = c.ebx.into();
                r.rcx = c.ecx.into();
                r.rdx = c.edx.into();
                Action::Skip
            }
            ExitKind::Hypercall => self.hypercall(exit),
            ExitKind::Timer if self.plan.service => {
                self.timer_due = true;
                Action::Retry
            }
            ExitKind::Timer if self.plan.epoch_ticks.is_some() => match self.timer_epoch() {
                Ok(()) => Action::Retry,
                Err(e) => self.fail(e, exit),
            },
            ExitKind::Timer | ExitKind::ExternalInterrupt => Action::Retry,
            ExitKind::Privileged(insn) => {
                log::error!(
                    "guest executed {} (refused) rip={:#x}",
                    insn.name(),
                    exit.rip
                );
                self.refuse(exit)
            }
            // The test guests write no control register (only Linux's
            // platform emulates CR writes).
            ExitKind::CrWrite { cr, .. } => {
                log::error!("guest executed MOV-to-CR{cr} (refused) rip={:#x}", exit.rip);
                self.refuse(exit)
            }
            ExitKind::Msr { msr, write, value } => self.msr(exit, msr, write, value),
            ExitKind::Hlt => self.fail("guest halted before finishing", exit),
            ExitKind::Shutdown => self.fail("guest shut down (triple fault)", exit),
            ExitKind::EntryFailed { .. } => self.fail("VM entry failed", exit),
            _ => self.fail("unexpected exit", exit),
        }
    }

    /// Refuse what `exit` tried (its error line already printed): inject
    /// the exception every refusal gets (`doppel_core::fault::refusal`:
    /// #UD for an instruction, #GP(0) for an MSR or a control-register
    /// write) and resume the guest at the instruction, where the
    /// exception is delivered. The guest's own handler takes it from
    /// there; a guest without one shuts down (triple fault).
    fn refuse(&mut self, exit: &VmExit) -> Action {
        match fault::refusal(&exit.kind) {
            Some(ev) if self.vcpu.inject(ev) => {
                self.sink.refused(exit, &ev);
                Action::Retry
            }
            Some(_) => self.fail("the backend cannot inject the refusal's exception", exit),
            None => self.fail("not a refusal", exit),
        }
    }

    /// An intercepted RDMSR/WRMSR (the allow-list's MSRs never exit,
    /// `doppel_core::msr`). No guest of ours needs another MSR, and none
    /// is emulated yet: each is refused, naming the MSR, and the guest
    /// gets #GP(0) ([`Run::refuse`]). The real MSR is never read or
    /// written for the guest.
    fn msr(&mut self, exit: &VmExit, msr: u32, write: bool, value: u64) -> Action {
        if write {
            log::error!(
                "guest WRMSR of MSR {msr:#x} ({}) value={value:#x} (refused) rip={:#x}",
                doppel_core::msr::name(msr),
                exit.rip
            );
        } else {
            log::error!(
                "guest RDMSR of MSR {msr:#x} ({}) (refused) rip={:#x}",
                doppel_core::msr::name(msr),
                exit.rip
            );
        }
        self.refuse(exit)
    }

    fn console_byte(&mut self, b: u8) {
        if b == b'\n' || self.console.is_full() {
            // Marked as the guest's (`doppel-hv: guest: ...`), control
            // bytes shown as `?`: no guest line reads as one of ours.
            log::info!("{}", doppel_abi::guest::GuestLine(&self.console));
            self.console.clear();
        }
        if b != b'\n' {
            let _ = self.console.push(b);
        }
    }

    fn hypercall(&mut self, exit: &VmExit) -> Action {
        let r = *self.vcpu.regs();
        match r.rax {
            hypercall::EPOCH_END => {
                let stopped = rdtsc();
                let Some(pattern) = u8::try_from(r.rsi).ok().and_then(PatternId::from_u8) else {
                    return self.fail("EPOCH_END with an unknown pattern", exit);
                };
                let state = self.resume_state(exit);
                if let Err(e) = self.end_epoch(state, Some(pattern), r.rdi) {
                    return self.fail(e, exit);
                }
                if let Err(e) = self.rearm().and_then(|()| self.arm_epoch_timer()) {
                    return self.fail(e, exit);
                }
                let pause = rdtsc().wrapping_sub(stopped);
                self.sink.pause_measured(pause);
                self.sink.resumed(self.plan.pause_cycles.then_some(pause));
                Action::Skip
            }
            hypercall::DONE => {
                self.done_status = Some(r.rdi);
                if self.sink.checkpoint_at_stop() {
                    let state = self.resume_state(exit);
                    if let Err(e) = self.end_epoch(state, None, r.rsi) {
                        return self.fail(e, exit);
                    }
                }
                Action::Stop
            }
            hypercall::ESCAPED => match self.sink.escaped(r.rdi, r.rsi) {
                Ok(()) => Action::Stop,
                Err(e) => self.fail(e, exit),
            },
            hypercall::FAULTED => match self.sink.faulted(r.rdi, r.rsi, r.rdx) {
                Ok(()) => Action::Stop,
                Err(e) => self.fail(e, exit),
            },
            hypercall::RECV => match self.recv(r.rdi, r.rsi) {
                Ok(v) => {
                    self.vcpu.regs().rax = v;
                    Action::Skip
                }
                Err(e) => self.fail(e, exit),
            },
            hypercall::SEND => match self.send(r.rdi, r.rsi) {
                Ok(v) => {
                    self.vcpu.regs().rax = v;
                    Action::Skip
                }
                Err(e) => self.fail(e, exit),
            },
            _ => {
                self.vcpu.regs().rax = u64::MAX;
                Action::Skip
            }
        }
    }

    /// `RECV` into guest buffer `[gpa, gpa + len)`: the record's length,
    /// 0 when none is queued, `u64::MAX` for a bad buffer. The copy is the
    /// hypervisor's write, not the guest's: its pages are logged here.
    fn recv(&mut self, gpa: u64, len: u64) -> Result<u64, &'static str> {
        let len = len.min(MAX_RECORD);
        if len == 0 || self.ram.slice(gpa, len).is_none() {
            return Ok(u64::MAX);
        }
        let mut buf = [0u8; MAX_RECORD as usize];
        match self.sink.recv(&mut buf[..len as usize])? {
            Recv::Record(n) => {
                let n = n.min(len as usize);
                let dst = self
                    .ram
                    .slice_mut(gpa, n as u64)
                    .ok_or("RECV buffer outside guest RAM")?;
                dst.copy_from_slice(&buf[..n]);
                if n > 0 {
                    for pfn in gpa / PAGE_SIZE..=(gpa + n as u64 - 1) / PAGE_SIZE {
                        self.tracker
                            .log()
                            .mark(pfn)
                            .map_err(|_| "dirty log refused a RECV page")?;
                    }
                }
                Ok(n as u64)
            }
            Recv::Empty => {
                self.sink.poll()?;
                Ok(0)
            }
            Recv::TooSmall => Ok(u64::MAX),
        }
    }

    /// `SEND` of guest bytes `[gpa, gpa + len)`: 0, or [`SEND_AGAIN`] when
    /// the sink has no room now, `u64::MAX` for a bad buffer.
    fn send(&mut self, gpa: u64, len: u64) -> Result<u64, &'static str> {
        if len == 0 || len > MAX_RECORD {
            return Ok(u64::MAX);
        }
        let Some(src) = self.ram.slice(gpa, len) else {
            return Ok(u64::MAX);
        };
        let mut buf = [0u8; MAX_RECORD as usize];
        buf[..len as usize].copy_from_slice(src);
        if self.sink.send(&buf[..len as usize])? {
            Ok(0)
        } else {
            self.sink.poll()?;
            Ok(SEND_AGAIN)
        }
    }

    /// The vCPU as it resumes after a hypercall exit: past the instruction,
    /// its result (0) in RAX.
    fn resume_state(&mut self, exit: &VmExit) -> VcpuState {
        self.vcpu.regs().rax = 0;
        let mut state = self.vcpu.state();
        state.rax = 0;
        if let Some(next) = exit.next_rip {
            state.rip = next;
        }
        state
    }

    /// Harvest the epoch and hand it to the sink with `state`, the vCPU as
    /// it resumes.
    fn end_epoch(
        &mut self,
        state: VcpuState,
        pattern: Option<PatternId>,
        epoch: u64,
    ) -> Result<(), &'static str> {
        self.stop_epoch_timer();
        self.harvest_epoch()?;
        self.tracker.absorb(&mut self.timer_union);
        let (exits, drains) = self.tracker.take_counts();
        let end = EpochEnd {
            backend: self.vcpu.backend(),
            mode: self.mode,
            pattern,
            epoch,
            harvest: self.tracker.harvested(),
            ram: &*self.ram,
            exits,
            drains,
            timer_epochs: self.timer_epochs,
            tracked_dirty: self.tracked_dirty,
            vcpu: state,
        };
        self.sink.epoch_end(&end)?;
        self.timer_epochs = 0;
        self.tracked_dirty = 0;
        Ok(())
    }

    /// The guest is stopped in this exit: drain, CLEAN into the harvest.
    fn harvest_epoch(&mut self) -> Result<(), &'static str> {
        self.tracked_dirty += self.tracker.harvest(self.table, self.vcpu)?;
        Ok(())
    }
}
