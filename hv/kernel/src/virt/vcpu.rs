//! The one trait both vendor backends implement, and the guest state they
//! share. Everything above this line (dispatch, log-dirty, epochs, the
//! self-test) is vendor-neutral and never asks which backend it drives.

use core::fmt;

use doppel_core::dirtylog::DirtyLog;
use doppel_core::exit::{CodePaging, VmExit};
use doppel_core::hvm::VcpuState;
use doppel_core::paging::Flush;
use doppel_core::pml::{DrainStats, PmlError};

/// The registers the entry stubs save and restore (a leaf type in hv/core,
/// so `arch::instr` reads its layout without depending on this module).
pub use doppel_core::regs::GuestRegs;

/// Where a guest starts; its state is [`VcpuState::long_mode_start`], which
/// each backend translates into its VMCS or VMCB.
pub use doppel_core::start::GuestStart;

/// Guest state worth printing when a run fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestDump {
    pub regs: GuestRegs,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl fmt::Display for GuestDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} \
             rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} \
             r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cr0,
            self.cr3,
            self.cr4,
            self.efer,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15
        )
    }
}

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

    /// Guest state for failure reports.
    fn dump(&self) -> GuestDump;

    /// The architectural vCPU state for a checkpoint (Xen's HVM CPU
    /// record). The default carries what [`GuestDump`] has (registers,
    /// control registers, EFER); backends override it with their segment
    /// and MSR state.
    fn state(&self) -> VcpuState {
        base_state(&self.dump())
    }

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
}

impl GuestDump {
    /// What a walk of the guest's page tables for the code at RIP needs:
    /// this dump's control registers and EFER, and `cs_long`.
    pub fn code_paging(&self, cs_long: bool) -> CodePaging {
        CodePaging {
            cr0: self.cr0,
            cr3: self.cr3,
            cr4: self.cr4,
            efer: self.efer,
            cs_long,
        }
    }
}

/// The architectural state a [`GuestDump`] carries: general registers,
/// RIP, RSP, RFLAGS, control registers and EFER; everything else default.
pub fn base_state(d: &GuestDump) -> VcpuState {
    let mut st = VcpuState {
        rsp: d.rsp,
        rip: d.rip,
        rflags: d.rflags,
        cr0: d.cr0,
        cr3: d.cr3,
        cr4: d.cr4,
        efer: d.efer,
        ..VcpuState::default()
    };
    d.regs.store(&mut st);
    st
}
