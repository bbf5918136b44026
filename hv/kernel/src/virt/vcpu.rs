//! The one trait both vendor backends implement, and the guest state they
//! share. Everything above this line (dispatch, log-dirty, epochs, the
//! self-test) is vendor-neutral and never asks which backend it drives.

use doppel_core::dirtylog::DirtyLog;
use doppel_core::exit::{CodePaging, VmExit};
use doppel_core::hvm::{PendingEvent, VcpuState};
use doppel_core::paging::Flush;
use doppel_core::pml::{DrainStats, PmlError};

/// The registers the entry stubs save and restore (a leaf type in hv/core,
/// so `arch::instr` reads its layout without depending on this module).
pub use doppel_core::regs::GuestRegs;

/// Where a guest starts; its state is [`VcpuState::long_mode_start`], which
/// each backend translates into its VMCS or VMCB.
pub use doppel_core::start::GuestStart;

/// A virtual CPU of one backend, running one guest over one nested page
/// table.
pub trait Vcpu {
    /// `"vmx"` or `"svm"`, as the self-test lines print it.
    fn backend(&self) -> &'static str;

    /// Enter the guest and run it until an exit the host must handle.
    fn run(&mut self) -> VmExit;

    /// The registers the entry stub saves.
    fn regs(&mut self) -> &mut GuestRegs;

    /// Set where the guest resumes (the dispatch's one RIP update).
    fn set_rip(&mut self, rip: u64);

    /// Invalidate cached nested translations (INVEPT / TLB_CONTROL).
    fn flush(&mut self, flush: Flush);

    /// Switch page-modification logging on or off; `false` when the backend
    /// has none.
    fn set_pml(&mut self, _on: bool) -> bool {
        false
    }

    /// Feed every logged guest-physical address into `log` and reset the
    /// buffer. A backend without PML logs nothing.
    fn drain_pml(&mut self, _log: &dyn DirtyLog) -> Result<DrainStats, PmlError> {
        Ok(DrainStats::default())
    }

    /// Arm the epoch timer to fire after about `tsc_ticks` (None: disarm).
    /// Returns false when the backend has no such timer.
    fn arm_timer(&mut self, _tsc_ticks: Option<u64>) -> bool {
        false
    }

    /// The architectural vCPU state: for a checkpoint (Xen's HVM CPU
    /// record) and, shown by [`doppel_core::regs::Brief`], for failure
    /// reports. What a backend does not read is zero.
    fn state(&self) -> VcpuState;

    /// The guest's own copy of an allow-listed MSR that the world switch
    /// saves and restores (`doppel_core::msr::ALLOW_LIST`), or `None` for
    /// an MSR this backend does not switch.
    fn switched_msr(&self, _msr: u32) -> Option<u64> {
        None
    }

    /// Set the guest's own copy of such an MSR; false if not switched.
    fn set_switched_msr(&mut self, _msr: u32, _value: u64) -> bool {
        false
    }

    /// Host-physical address of the control structure the CPU runs this
    /// vCPU from (the VMCB, or the VMCS region).
    fn control_pa(&self) -> u64;

    /// A fingerprint of everything that confines the guest: the intercept
    /// and control settings and the MSR (and I/O) permission maps. It must
    /// not change while the guest runs.
    fn confinement(&self) -> u64;

    /// Whether the guest runs 64-bit code (CS.L). Asked at every CPUID,
    /// VMMCALL and HLT exit by a backend that cannot report instruction
    /// lengths, so a backend should read just this bit rather than build a
    /// whole [`Vcpu::state`] as the default does.
    fn cs_long(&self) -> bool {
        self.state().cs.attr.long()
    }

    /// What a walk of the guest's page tables for the code at RIP needs
    /// (the control registers, EFER and CS.L). Asked at the same exits as
    /// [`Vcpu::cs_long`]: a backend that gets asked (SVM without NRIP
    /// save) reads just these rather than build a whole [`Vcpu::state`]
    /// (segments, MSRs: some 400 emulated instructions per exit).
    fn code_paging(&self) -> CodePaging {
        self.state().code_paging(self.cs_long())
    }

    // ---- The platform's needs (issue 19: a stock Linux guest). A backend
    // that runs only the test guests may keep the defaults.

    /// Deliver `ev` at the next entry (an external interrupt, NMI or
    /// exception; SVM EVENTINJ, VMX VM-entry interruption information).
    /// Replaces an event still waiting. False: not supported.
    fn inject(&mut self, _ev: PendingEvent) -> bool {
        false
    }

    /// The event the last exit interrupted while it was being delivered
    /// (SVM EXITINTINFO, VMX IDT-vectoring information), which the backend
    /// re-injects at the next entry unless [`Vcpu::inject`] replaces it.
    /// [`Vcpu::state`] reports it as `pending_event`.
    fn interrupted_event(&self) -> Option<PendingEvent> {
        None
    }

    /// Whether the guest can take a maskable interrupt right now:
    /// RFLAGS.IF set, no STI/MOV-SS shadow, no event waiting to be
    /// injected.
    fn interruptible(&self) -> bool {
        false
    }

    /// Ask for (true) or stop asking for an [`ExitKind::InterruptWindow`]
    /// exit as soon as the guest can take an interrupt.
    ///
    /// [`ExitKind::InterruptWindow`]: doppel_core::exit::ExitKind::InterruptWindow
    fn set_interrupt_window(&mut self, _on: bool) {}

    /// Guest TSC = host TSC + `offset` (wrapping), for RDTSC and for
    /// everything else the CPU reads the TSC for. False: not supported.
    fn set_tsc_offset(&mut self, _offset: u64) -> bool {
        false
    }

    /// Write control register `cr` (0, 3 or 4) with a value the platform
    /// has already checked, with what the CPU does on such a write (VMX:
    /// EFER.LMA and the IA-32e-mode entry control on a CR0.PG change, the
    /// read shadows; both: the guest TLB as the architecture says).
    fn set_cr(&mut self, _cr: u8, _value: u64) -> bool {
        false
    }

    /// Set the guest's EFER (already checked; LMA as the CPU keeps it).
    fn set_efer(&mut self, _value: u64) -> bool {
        false
    }

    /// Load a whole architectural state (a restore from records): every
    /// register, segment, control register, EFER and switched MSR of
    /// `st`, and its `pending_event` as the event to inject. The nested
    /// tables and intercepts stay as they are. False: not supported.
    fn load_state(&mut self, _st: &VcpuState) -> bool {
        false
    }
}
