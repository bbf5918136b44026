//! The log-dirty self-test, vendor-neutral: boot the test guest under a
//! backend, track its writes in each mode, and at every epoch end compare
//! the harvested dirty log with the guest's own ground truth.
//!
//! This is also the one exit dispatch: every exit of every backend comes
//! through [`Run::dispatch`], and RIP moves only through its [`Action`].

use alloc::vec;
use alloc::vec::Vec;

use doppel_abi::guest::{hypercall, PatternId, CONSOLE_PORT, PAGE_SIZE, TRUTH_GPA};
use doppel_core::addr::HostPhysAddr;
use doppel_core::dirtylog::{DirtyLog, DirtyTree};
use doppel_core::exit::{resume_rip, Action, ExitKind, VmExit};
use doppel_core::paging::{Flush, NestedEntry, NestedPageTable, RestoreWrite};
use doppel_core::selftest::{compare, EpochCheck, EpochLine, Mode, Verdict};
use doppel_kernel::config::Broken;
use heapless::Vec as HVec;

use super::guest::{self, GuestRam, KernelFrames, Workload};
use super::vcpu::{GuestStart, Vcpu};
use crate::arch::instr::{cpuid, rdtsc};
use crate::console;

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
}

/// Upper bound on exits in one mode, so a guest stuck in a loop of exits
/// fails the run instead of hanging it.
const MAX_EXITS: u64 = 5_000_000;

/// Run the self-test for every mode in `modes`. `make_vcpu` builds a vCPU
/// of the backend for a guest start and the nested table's root.
pub fn run<E, V, F>(modes: &[Mode], plan: &Plan, vmmcall: bool, mut make_vcpu: F) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnMut(&GuestStart, HostPhysAddr, Mode) -> Result<V, &'static str>,
{
    let mut ram = match GuestRam::new(plan.mem_bytes) {
        Ok(r) => r,
        Err(e) => {
            log::error!("self-test: {e}");
            return false;
        }
    };
    let workload = Workload {
        patterns: plan.patterns,
        epochs: plan.epochs,
        seed: plan.seed,
        vmmcall,
    };
    let mut verdict = Verdict::default();
    let mut backend = "?";
    for &mode in modes {
        let start = match guest::load(&mut ram, &workload) {
            Ok(s) => s,
            Err(e) => {
                log::error!("self-test: loading the guest: {e}");
                return false;
            }
        };
        let mut table = match ram.nested_table::<E>() {
            Ok(t) => t,
            Err(e) => {
                log::error!("self-test: {e}");
                return false;
            }
        };
        let mut vcpu = match make_vcpu(&start, table.root(), mode) {
            Ok(v) => v,
            Err(e) => {
                log::error!("self-test: vcpu: {e}");
                return false;
            }
        };
        backend = vcpu.backend();
        let mut run = match Run::new(&ram, &mut table, &mut vcpu, mode, plan) {
            Ok(r) => r,
            Err(e) => {
                log::error!("self-test: mode {}: {e}", mode.name());
                return false;
            }
        };
        let ok = run.go(&mut verdict);
        if !ok {
            log::error!("self-test: mode {} stopped early", mode.name());
            verdict.failed += 1;
            break;
        }
    }
    console::print(format_args!("{}\n", verdict.line(backend)));
    verdict.passed()
}

/// One guest run in one mode.
struct Run<'a, E: NestedEntry, V: Vcpu> {
    ram: &'a GuestRam,
    table: &'a mut NestedPageTable<E, KernelFrames>,
    vcpu: &'a mut V,
    mode: Mode,
    plan: &'a Plan,
    log: DirtyTree,
    harvest: Vec<u8>,
    /// Pages the hypervisor writes on the guest's behalf (none today: the
    /// guest rewrites and records its own page tables each epoch, because
    /// page walks count as writes to them under EPT A/D and QEMU's NPT).
    declared: Vec<u8>,
    /// Dirty-tracking exits and PML drains in the current epoch.
    exits: u64,
    drains: u64,
    console: HVec<u8, 160>,
    /// The guest's DONE status, once it said it.
    done_status: Option<u64>,
}

impl<'a, E: NestedEntry, V: Vcpu> Run<'a, E, V> {
    fn new(
        ram: &'a GuestRam,
        table: &'a mut NestedPageTable<E, KernelFrames>,
        vcpu: &'a mut V,
        mode: Mode,
        plan: &'a Plan,
    ) -> Result<Self, &'static str> {
        let log = DirtyTree::new(ram.pages() - 1).map_err(|_| "dirty log")?;
        let harvest = vec![0u8; log.bitmap_len()];
        let declared = vec![0u8; log.bitmap_len()];
        let mut r = Self {
            ram,
            table,
            vcpu,
            mode,
            plan,
            log,
            harvest,
            declared,
            exits: 0,
            drains: 0,
            console: HVec::new(),
            done_status: None,
        };
        r.arm(true)?;
        Ok(r)
    }

    /// Start (or re-start, after a harvest) tracking for the next epoch.
    fn arm(&mut self, first: bool) -> Result<(), &'static str> {
        let flush = match self.mode {
            Mode::WriteProtect => {
                self.table
                    .enable_write_protect()
                    .map_err(|_| "write-protecting the nested table")?
                    .flush
            }
            Mode::Pml | Mode::AdScan => {
                if first {
                    // Dirty bits are per leaf: split every large page into
                    // 4 KiB leaves (write-protect splits; then re-grant).
                    // Flushed below with everything else.
                    let _ = self
                        .table
                        .enable_write_protect()
                        .map_err(|_| "splitting the nested table")?;
                    let _ = self.table.disable_write_protect();
                    if self.mode == Mode::Pml && !self.vcpu.set_pml(true) {
                        return Err("the backend has no page-modification logging");
                    }
                }
                // Clear the dirty bits so the next first write is seen again.
                self.table.scan_and_clear_dirty(false, |_| {}).flush
            }
        };
        self.vcpu.flush(flush.merge(Flush::All));
        Ok(())
    }

    /// Run the guest to its end. False when it stopped in error.
    fn go(&mut self, verdict: &mut Verdict) -> bool {
        for _ in 0..MAX_EXITS {
            let exit = self.vcpu.run();
            let action = self.dispatch(&exit, verdict);
            match resume_rip(&exit, action) {
                Some(rip) => self.vcpu.set_rip(rip),
                None if action == Action::Stop => return self.finished_ok(&exit),
                None => {
                    log::error!("exit {:?} has no known instruction length", exit.kind);
                    return false;
                }
            }
        }
        log::error!("self-test: more than {MAX_EXITS} exits; guest stuck");
        false
    }

    fn finished_ok(&self, exit: &VmExit) -> bool {
        matches!(exit.kind, ExitKind::Hypercall) && self.done_status == Some(0)
    }

    fn fail(&self, what: &str, exit: &VmExit) -> Action {
        log::error!(
            "{what}: {:?} at rip={:#x}; guest: {}",
            exit.kind,
            exit.rip,
            self.vcpu.dump()
        );
        Action::Stop
    }

    fn dispatch(&mut self, exit: &VmExit, verdict: &mut Verdict) -> Action {
        match exit.kind {
            ExitKind::NestedPageFault(f) if f.is_write_protect_candidate() => {
                match self.table.restore_write(f.gpa) {
                    Ok(RestoreWrite::Restored(flush)) => {
                        self.exits += 1;
                        log::trace!("write fault {:?} stage {:?}", f.gpa, f.stage);
                        if self.plan.broken != Some(Broken::NoFaultMark)
                            && self.log.mark(f.gpa.as_u64() / PAGE_SIZE).is_err()
                        {
                            return self.fail("dirty log refused a guest page", exit);
                        }
                        self.vcpu.flush(flush);
                        Action::Retry
                    }
                    Ok(RestoreWrite::Spurious) => {
                        self.vcpu.flush(Flush::Page(f.gpa));
                        Action::Retry
                    }
                    Err(_) => self.fail("write fault outside guest RAM", exit),
                }
            }
            ExitKind::NestedPageFault(_) | ExitKind::NestedMisconfig { .. } => {
                self.fail("unexpected nested page fault", exit)
            }
            ExitKind::PmlFull => {
                self.exits += 1;
                match self.vcpu.drain_pml(&self.log) {
                    Ok(_) => Action::Retry,
                    Err(_) => self.fail("PML drain failed", exit),
                }
            }
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
            ExitKind::Hypercall => self.hypercall(exit, verdict),
            ExitKind::Timer | ExitKind::ExternalInterrupt => Action::Retry,
            ExitKind::Hlt => self.fail("guest halted before finishing", exit),
            ExitKind::Shutdown => self.fail("guest shut down (triple fault)", exit),
            ExitKind::EntryFailed { .. } => self.fail("VM entry failed", exit),
            _ => self.fail("unexpected exit", exit),
        }
    }

    fn console_byte(&mut self, b: u8) {
        if b == b'\n' || self.console.is_full() {
            let line = core::str::from_utf8(&self.console).unwrap_or("<non-utf8>");
            log::info!("{line}");
            self.console.clear();
        }
        if b != b'\n' {
            let _ = self.console.push(b);
        }
    }

    fn hypercall(&mut self, exit: &VmExit, verdict: &mut Verdict) -> Action {
        let r = *self.vcpu.regs();
        match r.rax {
            hypercall::EPOCH_END => {
                let stopped = rdtsc();
                let Some(pattern) = u8::try_from(r.rsi).ok().and_then(PatternId::from_u8) else {
                    return self.fail("EPOCH_END with an unknown pattern", exit);
                };
                let check = match self.end_epoch() {
                    Ok(c) => c,
                    Err(e) => return self.fail(e, exit),
                };
                let mut line = EpochLine {
                    backend: self.vcpu.backend(),
                    mode: self.mode,
                    pattern: pattern.name(),
                    epoch: r.rdi,
                    check,
                    exits: self.exits,
                    drains: self.drains,
                    pause_cycles: None,
                };
                self.exits = 0;
                self.drains = 0;
                self.vcpu.regs().rax = 0;
                if self.plan.pause_cycles {
                    line.pause_cycles = Some(rdtsc().wrapping_sub(stopped));
                }
                verdict.record(&line);
                console::print(format_args!("{line}\n"));
                Action::Skip
            }
            hypercall::DONE => {
                self.done_status = Some(r.rdi);
                Action::Stop
            }
            _ => {
                self.vcpu.regs().rax = u64::MAX;
                Action::Skip
            }
        }
    }

    /// Pause is implicit (the guest is stopped in this exit): drain, CLEAN,
    /// compare with the truth, re-arm.
    fn end_epoch(&mut self) -> Result<EpochCheck, &'static str> {
        match self.mode {
            Mode::Pml => {
                if self.plan.broken != Some(Broken::NoPmlDrain) {
                    self.vcpu
                        .drain_pml(&self.log)
                        .map_err(|_| "PML drain at epoch end failed")?;
                    self.drains += 1;
                }
            }
            Mode::AdScan => {
                let log = &self.log;
                let mut bad = false;
                let _ = self.table.scan_and_clear_dirty(false, |gfn| {
                    bad |= log.mark(gfn.as_u64()).is_err();
                });
                if bad {
                    return Err("dirty bit outside guest RAM");
                }
            }
            Mode::WriteProtect => {}
        }
        self.log
            .clean_bitmap(&mut self.harvest)
            .map_err(|_| "CLEAN failed")?;
        let truth_len = self.harvest.len() as u64;
        let truth = self
            .ram
            .slice(TRUTH_GPA, truth_len)
            .ok_or("truth bitmap outside guest RAM")?;
        let check = compare(&self.harvest, truth, &self.declared);
        if check.missing > 0 || check.extra > 0 {
            report_differences(&self.harvest, truth, &self.declared);
        }
        self.arm(false)?;
        Ok(check)
    }
}

/// Log the first few pfns on which the harvest and the truth disagree.
fn report_differences(log: &[u8], truth: &[u8], declared: &[u8]) {
    let mut shown = 0;
    for (i, (&l, &t)) in log.iter().zip(truth).enumerate() {
        let diff = (l ^ t) & !declared.get(i).copied().unwrap_or(0);
        for bit in 0..8 {
            if diff & (1 << bit) != 0 && shown < 8 {
                let pfn = i as u64 * 8 + bit;
                let what = if t & (1 << bit) != 0 {
                    "missing"
                } else {
                    "extra"
                };
                log::warn!(
                    "self-test: pfn {pfn:#x} (gpa {:#x}) {what}",
                    pfn * PAGE_SIZE
                );
                shown += 1;
            }
        }
    }
}
