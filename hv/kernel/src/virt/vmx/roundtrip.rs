//! The VMX self-test's save/load check: a [`VmxVcpu`] that, every
//! [`EVERY`] entries, reads its whole state ([`Vcpu::state`]), loads it
//! back ([`Vcpu::load_state`]) and reads it again before it resumes the
//! guest. A field `state` misses or `load_state` writes wrongly either
//! differs on the second read (the run stops with an error line) or
//! derails the test guest, whose pattern and dirty-log checks then fail.
//! The line `vmx: state round trips=N mismatches=0` at the end shows it
//! ran; the xtask self-test step requires it.

use doppel_core::dirtylog::DirtyLog;
use doppel_core::exit::{ExitKind, VmExit};
use doppel_core::hvm::VcpuState;
use doppel_core::paging::Flush;
use doppel_core::pml::{DrainStats, PmlError};

use super::vcpu::VmxVcpu;
use crate::virt::vcpu::{GuestRegs, Vcpu};

/// Entries between two round trips.
pub const EVERY: u64 = 5;

pub struct RoundTrip {
    inner: VmxVcpu,
    entries: u64,
    trips: u64,
    mismatches: u64,
}

impl RoundTrip {
    pub fn new(inner: VmxVcpu) -> Self {
        Self {
            inner,
            entries: 0,
            trips: 0,
            mismatches: 0,
        }
    }

    /// Save, load, compare; `Err` names what went wrong.
    fn trip(&mut self) -> Result<(), &'static str> {
        let before = self.inner.state();
        if !self.inner.load_state(&before) {
            return Err("load_state failed");
        }
        let after = self.inner.state();
        self.trips += 1;
        if after != before {
            self.mismatches += 1;
            log::error!(
                "vmx: state round trip changed the state: before {before:?} after {after:?}"
            );
            return Err("the state read back differs from the state loaded");
        }
        Ok(())
    }
}

impl Drop for RoundTrip {
    fn drop(&mut self) {
        log::info!(
            "vmx: state round trips={} mismatches={}",
            self.trips,
            self.mismatches
        );
    }
}

impl Vcpu for RoundTrip {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn run(&mut self) -> VmExit {
        self.entries += 1;
        if self.entries.is_multiple_of(EVERY) {
            if let Err(e) = self.trip() {
                log::error!("vmx: state round trip {}: {e}", self.trips);
                return VmExit {
                    kind: ExitKind::EntryFailed { code: u64::MAX },
                    rip: self.inner.state().rip,
                    next_rip: None,
                };
            }
        }
        self.inner.run()
    }

    fn regs(&mut self) -> &mut GuestRegs {
        self.inner.regs()
    }

    fn set_rip(&mut self, rip: u64) {
        self.inner.set_rip(rip);
    }

    fn flush(&mut self, flush: Flush) {
        self.inner.flush(flush);
    }

    fn set_pml(&mut self, on: bool) -> bool {
        self.inner.set_pml(on)
    }

    fn drain_pml(&mut self, log: &dyn DirtyLog) -> Result<DrainStats, PmlError> {
        self.inner.drain_pml(log)
    }

    fn arm_timer(&mut self, tsc_ticks: Option<u64>) -> bool {
        self.inner.arm_timer(tsc_ticks)
    }

    fn state(&self) -> VcpuState {
        self.inner.state()
    }

    fn switched_msr(&self, msr: u32) -> Option<u64> {
        self.inner.switched_msr(msr)
    }

    fn set_switched_msr(&mut self, msr: u32, value: u64) -> bool {
        self.inner.set_switched_msr(msr, value)
    }

    fn control_pa(&self) -> u64 {
        self.inner.control_pa()
    }

    fn confinement(&self) -> u64 {
        self.inner.confinement()
    }

    fn cs_long(&self) -> bool {
        self.inner.cs_long()
    }
}
