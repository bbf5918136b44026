//! The log-dirty self-test, vendor-neutral: boot the test guest under a
//! backend, track its writes in each mode, and at every epoch end compare
//! the harvested dirty log with the guest's own ground truth.

use alloc::vec;
use alloc::vec::Vec;

use doppel_abi::guest::{PAGE_SIZE, TRUTH_GPA};
use doppel_core::addr::HostPhysAddr;
use doppel_core::paging::NestedEntry;
use doppel_core::selftest::{compare, EpochCheck, EpochLine, Mode, Verdict};

use super::guest::{self, GuestRam, Workload};
pub use super::run::Plan;
use super::run::{run_mode, EpochEnd, EpochSink};
use super::vcpu::{GuestStart, Vcpu};
use crate::console;

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
        program: doppel_abi::guest::PROGRAM_WORKLOAD,
        keys: 0,
    };
    let mut judge = Judge::new(ram.pages());
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
        match run_mode(&mut ram, &mut table, &mut vcpu, mode, plan, &mut judge) {
            Ok(true) => {}
            Ok(false) => {
                log::error!("self-test: mode {} stopped early", mode.name());
                judge.verdict.failed += 1;
                break;
            }
            Err(e) => {
                log::error!("self-test: mode {}: {e}", mode.name());
                return false;
            }
        }
    }
    console::print(format_args!("{}\n", judge.verdict.line(backend)));
    judge.verdict.passed()
}

/// Compares each epoch's harvest with the guest's truth bitmap.
struct Judge {
    verdict: Verdict,
    /// Pages the hypervisor writes on the guest's behalf (none today: the
    /// guest rewrites and records its own page tables each epoch, because
    /// page walks count as writes to them under EPT A/D and QEMU's NPT).
    declared: Vec<u8>,
    /// The last epoch's line, printed once the pause is known.
    pending: Option<Pending>,
}

struct Pending {
    backend: &'static str,
    mode: Mode,
    pattern: &'static str,
    epoch: u64,
    check: EpochCheck,
    exits: u64,
    drains: u64,
    timer_epochs: u64,
    tracked_dirty: u64,
}

impl Judge {
    fn new(pages: u64) -> Self {
        Self {
            verdict: Verdict::default(),
            declared: vec![0u8; pages.div_ceil(8) as usize],
            pending: None,
        }
    }
}

impl EpochSink for Judge {
    fn epoch_end(&mut self, e: &EpochEnd<'_>) -> Result<(), &'static str> {
        let truth = e
            .ram
            .slice(TRUTH_GPA, e.harvest.len() as u64)
            .ok_or("truth bitmap outside guest RAM")?;
        let check = compare(e.harvest, truth, &self.declared);
        if check.missing > 0 || check.extra > 0 {
            report_differences(e.harvest, truth, &self.declared);
        }
        self.pending = Some(Pending {
            backend: e.backend,
            mode: e.mode,
            pattern: e.pattern.map_or("stop", |p| p.name()),
            epoch: e.epoch,
            check,
            exits: e.exits,
            drains: e.drains,
            timer_epochs: e.timer_epochs,
            tracked_dirty: e.tracked_dirty,
        });
        Ok(())
    }

    fn resumed(&mut self, pause: Option<u64>) {
        if let Some(p) = self.pending.take() {
            let line = EpochLine {
                backend: p.backend,
                mode: p.mode,
                pattern: p.pattern,
                epoch: p.epoch,
                check: p.check,
                exits: p.exits,
                drains: p.drains,
                pause_cycles: pause,
                timer_epochs: p.timer_epochs,
                tracked_dirty: p.tracked_dirty,
            };
            self.verdict.record(&line);
            console::print(format_args!("{line}\n"));
        }
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
