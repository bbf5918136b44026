//! The VMX vCPU: one VMCS set up for a 64-bit guest under EPT, the exit
//! decoding into the vendor-neutral [`VmExit`], INVEPT, PML and the
//! VMX-preemption timer. (Intel SDM vol. 3C, chapters 25-29.)

use super::{
    EPT_CAP_AD, IA32_VMX_BASIC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED0,
    IA32_VMX_CR4_FIXED1, IA32_VMX_EPT_VPID_CAP, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2,
    IA32_VMX_TRUE_PROCBASED_CTLS, PROC2_EPT, PROC2_PML, PROC_SECONDARY,
};
use doppel_core::addr::HostPhysAddr;
use doppel_core::dirtylog::DirtyLog;
use doppel_core::exit::{ExitKind, Insn, IoAccess, VmExit};
use doppel_core::hostile::{fnv1a, FNV_START};
use doppel_core::hvm::VcpuState;
use doppel_core::hw::vmcs::{
    exit_reason as reason, Control16, Control32, Control64, ControlN, Guest16, Guest32, Guest64,
    GuestN, Host16, Host32, Host64, HostN, IoQualification, ReadOnly32, ReadOnly64, ReadOnlyN,
};
use doppel_core::msr::{self, nr};
use doppel_core::paging::fault::decode_ept_violation;
use doppel_core::paging::{ept_pointer, Flush};
use doppel_core::pml::{self, DrainStats, PmlError, PML_ENTRIES, PML_INDEX_EMPTY};

use super::vmcs::{self, VmcsError};
use crate::arch::instr::{self, rdmsr, VmFail};
use crate::arch::IA32_EFER;
use crate::mem::{frames, PAGE_SIZE};
use crate::virt::vcpu::{GuestRegs, GuestStart, Vcpu};

const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
const IA32_VMX_EXIT_CTLS: u32 = 0x483;
const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
const IA32_VMX_MISC: u32 = 0x485;
const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
const IA32_FS_BASE: u32 = 0xC000_0100;
const IA32_GS_BASE: u32 = 0xC000_0101;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;

/// Pin-based controls.
const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
/// Primary processor-based controls.
const PROC_HLT_EXITING: u32 = 1 << 7;
const PROC_UNCONDITIONAL_IO: u32 = 1 << 24;
const PROC_MSR_BITMAPS: u32 = 1 << 28;
/// Secondary processor-based controls (EPT and PML come from the parent).
const PROC2_VPID: u32 = 1 << 5;
/// VM-exit controls.
const EXIT_HOST_ADDR_SPACE_64: u32 = 1 << 9;
const EXIT_SAVE_EFER: u32 = 1 << 20;
const EXIT_SAVE_TIMER: u32 = 1 << 22;
const EXIT_LOAD_EFER: u32 = 1 << 21;
/// VM-entry controls.
const ENTRY_IA32E_GUEST: u32 = 1 << 9;
const ENTRY_LOAD_EFER: u32 = 1 << 15;

const EPT_CAP_INVEPT_SINGLE: u64 = 1 << 25;
const VPID_CAP_INVVPID_SINGLE: u64 = 1 << 41;

/// The only VPID this hypervisor uses (0 is the host's).
const VPID: u16 = 1;

/// Why a vCPU could not be set up.
#[derive(Clone, Copy, Debug)]
pub enum SetupError {
    OutOfFrames,
    /// A control the vCPU needs is not allowed to be 1 (which, and the
    /// bits missing).
    Control(&'static str, u32),
    Vmcs(VmcsError),
    Instr(&'static str, VmFail),
}

impl From<VmcsError> for SetupError {
    fn from(e: VmcsError) -> Self {
        Self::Vmcs(e)
    }
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfFrames => write!(f, "no frame for a VMCS, bitmap or PML buffer"),
            Self::Control(what, bits) => {
                write!(f, "the CPU does not allow {what} controls {bits:#010x}")
            }
            Self::Vmcs(e) => write!(f, "{e}"),
            Self::Instr(what, fail) => write!(f, "{what} failed ({fail:?})"),
        }
    }
}

/// A control value with `want` set, adjusted to the capability MSR `msr`:
/// bits that must be 1 (allowed-0 settings, low half) are added; every bit
/// of `want` must be allowed to be 1 (high half).
fn adjust(msr: u64, want: u32, what: &'static str) -> Result<u32, SetupError> {
    let must1 = msr as u32;
    let may1 = (msr >> 32) as u32;
    if want & !may1 != 0 {
        return Err(SetupError::Control(what, want & !may1));
    }
    Ok((want | must1) & may1)
}

/// Capability MSRs the set-up reads.
struct CtlMsrs {
    pin: u64,
    proc: u64,
    exit: u64,
    entry: u64,
    proc2: u64,
    ept_vpid: u64,
    misc: u64,
}

impl CtlMsrs {
    fn read() -> Self {
        let t = rdmsr(IA32_VMX_BASIC) & (1 << 55) != 0;
        let pick = |truem, plain| rdmsr(if t { truem } else { plain });
        Self {
            pin: pick(IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_PINBASED_CTLS),
            proc: pick(IA32_VMX_TRUE_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS),
            exit: pick(IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_EXIT_CTLS),
            entry: pick(IA32_VMX_TRUE_ENTRY_CTLS, IA32_VMX_ENTRY_CTLS),
            proc2: rdmsr(IA32_VMX_PROCBASED_CTLS2),
            ept_vpid: rdmsr(IA32_VMX_EPT_VPID_CAP),
            misc: rdmsr(IA32_VMX_MISC),
        }
    }
}

/// A frame handed to the CPU (VMCS, MSR bitmap, PML buffer), freed on drop.
struct OwnedFrame(u64);

impl OwnedFrame {
    fn new() -> Result<Self, SetupError> {
        frames::alloc_zeroed()
            .map(|f| Self(f.start_address().as_u64()))
            .ok_or(SetupError::OutOfFrames)
    }
}

impl Drop for OwnedFrame {
    fn drop(&mut self) {
        frames::free(self.0, PAGE_SIZE);
    }
}

/// A VMX vCPU. Only one exists at a time: its VMCS is made current when it
/// is built and cleared when it is dropped.
pub struct VmxVcpu {
    vmcs: OwnedFrame,
    msr_bitmap: OwnedFrame,
    pml: Option<OwnedFrame>,
    regs: GuestRegs,
    eptp: u64,
    launched: bool,
    pin: u32,
    proc2: u32,
    exit: u32,
    invept_single: bool,
    /// log2 of TSC ticks per preemption-timer tick (IA32_VMX_MISC[4:0]).
    timer_shift: u32,
    /// Preemption-timer exits seen, and the last period armed.
    timer_exits: u64,
    timer_armed: Option<u64>,
}

impl VmxVcpu {
    /// Build the VMCS for a 64-bit guest starting at `start`, with the EPT
    /// rooted at `ept_root`; `ad` enables EPT accessed/dirty flags (needed
    /// for PML). `msr_passthrough` leaves the MSR bitmap all zero (the
    /// deliberately broken build, `broken=msr-passthrough`).
    pub fn new(
        revision: u32,
        start: &GuestStart,
        ept_root: HostPhysAddr,
        ad: bool,
        msr_passthrough: bool,
    ) -> Result<Self, SetupError> {
        let m = CtlMsrs::read();
        if ad && m.ept_vpid & EPT_CAP_AD == 0 {
            return Err(SetupError::Control("EPT accessed/dirty", 0));
        }
        let vmcs = OwnedFrame::new()?;
        let msr_bitmap = OwnedFrame::new()?;
        // SAFETY: a fresh 4 KiB frame this vCPU owns, identity mapped and
        // page aligned; the CPU only reads it while this vCPU runs.
        let map = unsafe { &mut *(msr_bitmap.0 as *mut [u8; msr::VMX_BITMAP_BYTES]) };
        msr::build_vmx_bitmap(map, msr_passthrough);
        if msr_passthrough {
            log::warn!("vmx: broken=msr-passthrough: the MSR bitmap is all zero");
        }
        // SAFETY: a zeroed frame we own, identity mapped; the revision id
        // goes in its first 4 bytes (bit 31 clear: not a shadow VMCS).
        unsafe { (vmcs.0 as *mut u32).write_volatile(revision) };
        // SAFETY: VMX root operation (a VmxOn exists); the frame holds a
        // VMCS region and is given to the CPU until `drop` clears it.
        unsafe { instr::vmclear(vmcs.0) }.map_err(|e| SetupError::Instr("VMCLEAR", e))?;
        // SAFETY: as above; this VMCS becomes the current one.
        unsafe { instr::vmptrld(vmcs.0) }.map_err(|e| SetupError::Instr("VMPTRLD", e))?;

        let pin = adjust(m.pin, 0, "pin-based")?;
        let proc = adjust(
            m.proc,
            PROC_HLT_EXITING | PROC_UNCONDITIONAL_IO | PROC_MSR_BITMAPS | PROC_SECONDARY,
            "processor-based",
        )?;
        let proc2 = adjust(m.proc2, PROC2_EPT | PROC2_VPID, "secondary")?;
        let exit = adjust(
            m.exit,
            EXIT_HOST_ADDR_SPACE_64 | EXIT_SAVE_EFER | EXIT_LOAD_EFER,
            "VM-exit",
        )?;
        let entry = adjust(m.entry, ENTRY_IA32E_GUEST | ENTRY_LOAD_EFER, "VM-entry")?;
        let eptp = ept_pointer(ept_root, ad);

        vmcs::write(Control32::PinBasedControls, pin)?;
        vmcs::write(Control32::PrimaryProcBasedControls, proc)?;
        vmcs::write(Control32::SecondaryProcBasedControls, proc2)?;
        vmcs::write(Control32::ExitControls, exit)?;
        vmcs::write(Control32::EntryControls, entry)?;
        vmcs::write(Control32::ExceptionBitmap, 0)?;
        vmcs::write(Control32::PageFaultErrorCodeMask, 0)?;
        vmcs::write(Control32::PageFaultErrorCodeMatch, 0)?;
        vmcs::write(Control32::Cr3TargetCount, 0)?;
        vmcs::write(Control32::ExitMsrStoreCount, 0)?;
        vmcs::write(Control32::ExitMsrLoadCount, 0)?;
        vmcs::write(Control32::EntryMsrLoadCount, 0)?;
        vmcs::write(Control32::EntryInterruptionInfo, 0)?;
        // Every MSR exits but the allow-list (`doppel_core::msr`).
        vmcs::write(Control64::MsrBitmap, msr_bitmap.0)?;
        vmcs::write(Control64::EptPointer, eptp)?;
        vmcs::write(Control16::Vpid, VPID)?;
        vmcs::write(ControlN::Cr0GuestHostMask, 0)?;
        vmcs::write(ControlN::Cr4GuestHostMask, 0)?;
        vmcs::write(ControlN::Cr0ReadShadow, 0)?;
        vmcs::write(ControlN::Cr4ReadShadow, 0)?;

        write_host_state()?;
        let st = VcpuState::long_mode_start(start);
        write_guest_state(&st)?;

        let invept_single = m.ept_vpid & EPT_CAP_INVEPT_SINGLE != 0;
        let mut v = Self {
            vmcs,
            msr_bitmap,
            pml: None,
            regs: GuestRegs::of(&st),
            eptp,
            launched: false,
            pin,
            proc2,
            exit,
            invept_single,
            timer_shift: (m.misc & 0x1f) as u32,
            timer_exits: 0,
            timer_armed: None,
        };
        // A fresh guest must not see translations an earlier one (same
        // VPID) left behind.
        if m.ept_vpid & VPID_CAP_INVVPID_SINGLE != 0 {
            instr::invvpid_single(VPID).map_err(|e| SetupError::Instr("INVVPID", e))?;
        }
        v.flush(Flush::All);
        log::debug!(
            "vmx: vcpu vmcs={:#x} pin={pin:#x} proc={proc:#x} proc2={proc2:#x} exit={exit:#x} \
             entry={entry:#x} eptp={eptp:#x}",
            v.vmcs.0
        );
        Ok(v)
    }

    fn decode_exit(&self) -> VmExit {
        let rip = vmcs::read_or_zero(GuestN::Rip);
        let raw = vmcs::read_or_zero(ReadOnly32::ExitReason);
        let qual = vmcs::read_or_zero(ReadOnlyN::ExitQualification);
        let len = u64::from(vmcs::read_or_zero(ReadOnly32::ExitInstructionLength));
        let next = Some(rip.wrapping_add(len));
        let exit = |kind, next_rip| VmExit {
            kind,
            rip,
            next_rip,
        };
        if raw & reason::ENTRY_FAILURE_BIT != 0 {
            log::error!(
                "vmx: VM entry failed: exit reason {:#x} ({}), qualification {qual:#x}",
                raw,
                match (raw & 0xffff) as u16 {
                    reason::INVALID_GUEST_STATE => "invalid guest state",
                    reason::MSR_LOADING => "MSR loading",
                    reason::MACHINE_CHECK => "machine check",
                    _ => "?",
                }
            );
            return exit(ExitKind::EntryFailed { code: raw.into() }, None);
        }
        match (raw & 0xffff) as u16 {
            reason::EXCEPTION_OR_NMI => {
                let info = vmcs::read_or_zero(ReadOnly32::ExitInterruptionInfo);
                let error_code = (info & (1 << 11) != 0)
                    .then(|| vmcs::read_or_zero(ReadOnly32::ExitInterruptionErrorCode));
                exit(
                    ExitKind::Exception {
                        vector: info as u8,
                        error_code,
                    },
                    None,
                )
            }
            reason::EXTERNAL_INTERRUPT => exit(ExitKind::ExternalInterrupt, None),
            reason::TRIPLE_FAULT => exit(ExitKind::Shutdown, None),
            reason::CPUID => exit(ExitKind::Cpuid, next),
            reason::HLT => exit(ExitKind::Hlt, next),
            reason::VMCALL => exit(ExitKind::Hypercall, next),
            reason::IO_INSTRUCTION => match IoQualification::decode(qual) {
                Some(q) => exit(
                    ExitKind::Io(IoAccess {
                        port: q.port,
                        input: q.input,
                        size: q.size,
                        string: q.string,
                        rep: q.rep,
                    }),
                    next,
                ),
                None => self.unknown(raw, qual, rip),
            },
            reason::EPT_VIOLATION => {
                let gpa = vmcs::read_or_zero(ReadOnly64::GuestPhysicalAddress);
                exit(
                    ExitKind::NestedPageFault(decode_ept_violation(qual, gpa)),
                    None,
                )
            }
            reason::EPT_MISCONFIG => exit(
                ExitKind::NestedMisconfig {
                    gpa: vmcs::read_or_zero(ReadOnly64::GuestPhysicalAddress),
                },
                None,
            ),
            reason::PML_FULL => exit(ExitKind::PmlFull, None),
            reason::PREEMPTION_TIMER => exit(ExitKind::Timer, None),
            reason::RDMSR | reason::WRMSR => exit(
                ExitKind::Msr {
                    msr: self.regs.rcx as u32,
                    write: (raw & 0xffff) as u16 == reason::WRMSR,
                    value: (self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff),
                },
                next,
            ),
            // The VMX instructions, INVEPT/INVVPID, VMFUNC, GETSEC and
            // XSETBV: refused.
            r => match Insn::from_vmx_reason(r) {
                Some(insn) => exit(ExitKind::Privileged(insn), None),
                None => self.unknown(raw, qual, rip),
            },
        }
    }

    fn unknown(&self, raw: u32, qual: u64, rip: u64) -> VmExit {
        VmExit {
            kind: ExitKind::Unknown {
                code: raw.into(),
                info1: qual,
                info2: vmcs::read_or_zero(ReadOnly64::GuestPhysicalAddress),
            },
            rip,
            next_rip: None,
        }
    }

    fn set_proc2(&mut self, proc2: u32) -> Result<(), VmcsError> {
        vmcs::write(Control32::SecondaryProcBasedControls, proc2)?;
        self.proc2 = proc2;
        Ok(())
    }

    /// The page-modification log, as the CPU fills it.
    fn pml_buffer(&self) -> Option<&[u64; PML_ENTRIES]> {
        let f = self.pml.as_ref()?;
        // SAFETY: a 4 KiB frame this vCPU owns (identity mapped, aligned);
        // the CPU writes it only while the guest runs, and `&self` here is
        // only taken between exits, when it does not run.
        Some(unsafe { &*(f.0 as *const [u64; PML_ENTRIES]) })
    }
}

/// Host state: the kernel as it runs now. RSP and RIP are written by the
/// entry stub on every entry.
fn write_host_state() -> Result<(), VmcsError> {
    let s = instr::host_segments();
    vmcs::write(HostN::Cr0, instr::read_cr0())?;
    vmcs::write(HostN::Cr3, instr::read_cr3())?;
    vmcs::write(HostN::Cr4, instr::read_cr4())?;
    // Selectors with RPL and TI cleared, as VM entry requires; the kernel's
    // are GDT selectors at ring 0 already.
    let sel = |s: u16| s & !7;
    vmcs::write(Host16::CsSelector, sel(s.cs))?;
    vmcs::write(Host16::SsSelector, sel(s.ss))?;
    vmcs::write(Host16::DsSelector, sel(s.ds))?;
    vmcs::write(Host16::EsSelector, sel(s.es))?;
    vmcs::write(Host16::FsSelector, sel(s.fs))?;
    vmcs::write(Host16::GsSelector, sel(s.gs))?;
    vmcs::write(Host16::TrSelector, sel(s.tr))?;
    vmcs::write(HostN::FsBase, rdmsr(IA32_FS_BASE))?;
    vmcs::write(HostN::GsBase, rdmsr(IA32_GS_BASE))?;
    vmcs::write(HostN::TrBase, crate::arch::gdt::tss_base())?;
    vmcs::write(HostN::GdtrBase, s.gdtr_base)?;
    vmcs::write(HostN::IdtrBase, s.idtr_base)?;
    vmcs::write(Host32::SysenterCs, rdmsr(IA32_SYSENTER_CS) as u32)?;
    vmcs::write(HostN::SysenterEsp, rdmsr(IA32_SYSENTER_ESP))?;
    vmcs::write(HostN::SysenterEip, rdmsr(IA32_SYSENTER_EIP))?;
    vmcs::write(Host64::Ia32Efer, rdmsr(IA32_EFER))?;
    Ok(())
}

/// Guest state: `st` (the long-mode start state) in the VMCS, CR0 and
/// CR4 with the bits VMX operation fixes; no event pending, the guest
/// active and interruptible.
fn write_guest_state(st: &VcpuState) -> Result<(), VmcsError> {
    let fixed = |v: u64, f0: u32, f1: u32| (v | rdmsr(f0)) & rdmsr(f1);
    let cr0 = fixed(st.cr0, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1);
    let cr4 = fixed(st.cr4, IA32_VMX_CR4_FIXED0, IA32_VMX_CR4_FIXED1);
    vmcs::write(GuestN::Cr0, cr0)?;
    vmcs::write(GuestN::Cr3, st.cr3)?;
    vmcs::write(GuestN::Cr4, cr4)?;
    vmcs::write(GuestN::Dr7, st.dr7)?;
    vmcs::write(GuestN::Rsp, st.rsp)?;
    vmcs::write(GuestN::Rip, st.rip)?;
    vmcs::write(GuestN::Rflags, st.rflags)?;
    vmcs::write(Guest64::Ia32Efer, st.efer)?;
    vmcs::write(Guest64::Ia32Debugctl, 0)?;
    vmcs::write(Guest64::VmcsLinkPointer, u64::MAX)?;

    let segments = [
        (
            &st.cs,
            Guest16::CsSelector,
            GuestN::CsBase,
            Guest32::CsLimit,
            Guest32::CsAccessRights,
        ),
        (
            &st.ss,
            Guest16::SsSelector,
            GuestN::SsBase,
            Guest32::SsLimit,
            Guest32::SsAccessRights,
        ),
        (
            &st.ds,
            Guest16::DsSelector,
            GuestN::DsBase,
            Guest32::DsLimit,
            Guest32::DsAccessRights,
        ),
        (
            &st.es,
            Guest16::EsSelector,
            GuestN::EsBase,
            Guest32::EsLimit,
            Guest32::EsAccessRights,
        ),
        (
            &st.fs,
            Guest16::FsSelector,
            GuestN::FsBase,
            Guest32::FsLimit,
            Guest32::FsAccessRights,
        ),
        (
            &st.gs,
            Guest16::GsSelector,
            GuestN::GsBase,
            Guest32::GsLimit,
            Guest32::GsAccessRights,
        ),
        (
            &st.tr,
            Guest16::TrSelector,
            GuestN::TrBase,
            Guest32::TrLimit,
            Guest32::TrAccessRights,
        ),
        (
            &st.ldtr,
            Guest16::LdtrSelector,
            GuestN::LdtrBase,
            Guest32::LdtrLimit,
            Guest32::LdtrAccessRights,
        ),
    ];
    for (seg, sel, base, limit, ar) in segments {
        vmcs::write(sel, seg.selector)?;
        vmcs::write(base, seg.base)?;
        vmcs::write(limit, seg.limit)?;
        vmcs::write(ar, seg.attr.to_vmx_ar())?;
    }
    vmcs::write(GuestN::GdtrBase, st.gdtr.base)?;
    vmcs::write(Guest32::GdtrLimit, u32::from(st.gdtr.limit))?;
    vmcs::write(GuestN::IdtrBase, st.idtr.base)?;
    vmcs::write(Guest32::IdtrLimit, u32::from(st.idtr.limit))?;

    vmcs::write(Guest32::InterruptibilityState, 0)?;
    vmcs::write(Guest32::ActivityState, 0)?;
    vmcs::write(GuestN::PendingDebugExceptions, 0)?;
    vmcs::write(Guest32::SysenterCs, st.sysenter_cs as u32)?;
    vmcs::write(GuestN::SysenterEsp, st.sysenter_esp)?;
    vmcs::write(GuestN::SysenterEip, st.sysenter_eip)?;
    Ok(())
}

impl Vcpu for VmxVcpu {
    fn backend(&self) -> &'static str {
        "vmx"
    }

    fn run(&mut self) -> VmExit {
        let regs = (&raw mut self.regs).cast::<u64>();
        // SAFETY: this vCPU's VMCS is current (made so in `new`, and only
        // one vCPU exists at a time); its host-state area was written by
        // `write_host_state` from the running kernel with the host address-
        // space-size exit control set; `regs` points at this vCPU's
        // `GuestRegs`, 15 u64 in the stub's order.
        let rc = unsafe { instr::vmx_enter(regs, u64::from(self.launched)) };
        match rc {
            instr::VMX_ENTER_EXITED => {
                let e = self.decode_exit();
                // A VM entry that failed while loading guest state leaves
                // the VMCS not launched (SDM "VM-Entry Failures During or
                // After Loading Guest State").
                if !matches!(e.kind, ExitKind::EntryFailed { .. }) {
                    self.launched = true;
                }
                if e.kind == ExitKind::Timer {
                    // One-shot: the saved timer value is 0 now and would
                    // exit again at once.
                    self.timer_exits += 1;
                    self.arm_timer(None);
                }
                e
            }
            instr::VMX_ENTER_FAIL_VALID | instr::VMX_ENTER_FAIL_INVALID => {
                let code = if rc == instr::VMX_ENTER_FAIL_VALID {
                    let n = vmcs::instruction_error();
                    log::error!(
                        "vmx: VM{} failed: VM-instruction error {n} ({})",
                        if self.launched { "RESUME" } else { "LAUNCH" },
                        vmcs::instruction_error_text(n)
                    );
                    u64::from(n)
                } else {
                    log::error!("vmx: VM entry failed with VMfailInvalid (no current VMCS)");
                    u64::MAX
                };
                VmExit {
                    kind: ExitKind::EntryFailed { code },
                    rip: vmcs::read_or_zero(GuestN::Rip),
                    next_rip: None,
                }
            }
            other => {
                log::error!("vmx: entry stub returned {other}");
                VmExit {
                    kind: ExitKind::EntryFailed { code: other },
                    rip: vmcs::read_or_zero(GuestN::Rip),
                    next_rip: None,
                }
            }
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn set_rip(&mut self, rip: u64) {
        if let Err(e) = vmcs::write(GuestN::Rip, rip) {
            // Cannot happen with a current VMCS; the next entry then runs
            // at the old RIP and the dispatch sees the same exit again.
            log::error!("vmx: setting guest RIP: {e}");
        }
    }

    fn flush(&mut self, flush: Flush) {
        let r = match flush {
            Flush::None => return,
            // No INVEPT form for one guest-physical page: flush this EPT.
            Flush::Page(_) | Flush::All if self.invept_single => instr::invept_single(self.eptp),
            Flush::Page(_) | Flush::All => instr::invept_all(),
        };
        if let Err(e) = r {
            log::error!("vmx: INVEPT failed ({e:?})");
        }
    }

    fn set_pml(&mut self, on: bool) -> bool {
        if !on {
            return self.set_proc2(self.proc2 & !PROC2_PML).is_ok();
        }
        // PML logs when the CPU sets an EPT dirty flag: A/D must be on.
        if self.eptp & (1 << 6) == 0 {
            log::error!("vmx: PML needs EPT accessed/dirty flags in the EPTP");
            return false;
        }
        if self.pml.is_none() {
            match OwnedFrame::new() {
                Ok(f) => self.pml = Some(f),
                Err(_) => return false,
            }
        }
        let addr = self.pml.as_ref().map_or(0, |f| f.0);
        let m = CtlMsrs::read();
        let proc2 = match adjust(m.proc2, self.proc2 | PROC2_PML, "secondary") {
            Ok(p) => p,
            Err(e) => {
                log::error!("vmx: {e}");
                return false;
            }
        };
        let r = vmcs::write(Control64::PmlAddress, addr)
            .and_then(|()| vmcs::write(Guest16::PmlIndex, PML_INDEX_EMPTY))
            .and_then(|()| self.set_proc2(proc2));
        if let Err(e) = r {
            log::error!("vmx: enabling PML: {e}");
            return false;
        }
        true
    }

    fn drain_pml(&mut self, log: &dyn DirtyLog) -> Result<DrainStats, PmlError> {
        let Some(buf) = self.pml_buffer() else {
            return Ok(DrainStats::default());
        };
        let index = vmcs::read_or_zero(Guest16::PmlIndex);
        let r = pml::drain(buf, index, log);
        let next = match &r {
            Ok(s) => s.next_index,
            Err(PmlError::Log { resume_index, .. }) => *resume_index,
            Err(PmlError::BadIndex(_)) => PML_INDEX_EMPTY,
        };
        if let Err(e) = vmcs::write(Guest16::PmlIndex, next) {
            log::error!("vmx: writing the PML index: {e}");
        }
        r
    }

    fn arm_timer(&mut self, tsc_ticks: Option<u64>) -> bool {
        // The timer counts down only in VMX non-root operation; saving its
        // value at each exit makes it count guest time across exits.
        let (pin, exit) = match tsc_ticks {
            Some(_) => (self.pin | PIN_PREEMPTION_TIMER, self.exit | EXIT_SAVE_TIMER),
            None => (
                self.pin & !PIN_PREEMPTION_TIMER,
                self.exit & !EXIT_SAVE_TIMER,
            ),
        };
        let m = CtlMsrs::read();
        let (pin, exit) = match (
            adjust(m.pin, pin, "pin-based"),
            adjust(m.exit, exit, "VM-exit"),
        ) {
            (Ok(p), Ok(x)) => (p, x),
            (Err(e), _) | (_, Err(e)) => {
                log::error!("vmx: {e}");
                return false;
            }
        };
        let value = tsc_ticks.map_or(0, |t| {
            u32::try_from(t >> self.timer_shift)
                .unwrap_or(u32::MAX)
                .max(1)
        });
        let r = vmcs::write(Guest32::PreemptionTimerValue, value)
            .and_then(|()| vmcs::write(Control32::PinBasedControls, pin))
            .and_then(|()| vmcs::write(Control32::ExitControls, exit));
        match r {
            Ok(()) => {
                self.pin = pin;
                self.exit = exit;
                if tsc_ticks.is_some() {
                    self.timer_armed = tsc_ticks;
                }
                true
            }
            Err(e) => {
                log::error!("vmx: arming the preemption timer: {e}");
                false
            }
        }
    }

    fn switched_msr(&self, m: u32) -> Option<u64> {
        Some(match m {
            nr::FS_BASE => vmcs::read_or_zero(GuestN::FsBase),
            nr::GS_BASE => vmcs::read_or_zero(GuestN::GsBase),
            nr::SYSENTER_CS => u64::from(vmcs::read_or_zero(Guest32::SysenterCs)),
            nr::SYSENTER_ESP => vmcs::read_or_zero(GuestN::SysenterEsp),
            nr::SYSENTER_EIP => vmcs::read_or_zero(GuestN::SysenterEip),
            _ => return None,
        })
    }

    fn set_switched_msr(&mut self, m: u32, value: u64) -> bool {
        let r = match m {
            nr::FS_BASE => vmcs::write(GuestN::FsBase, value),
            nr::GS_BASE => vmcs::write(GuestN::GsBase, value),
            nr::SYSENTER_CS => vmcs::write(Guest32::SysenterCs, value as u32),
            nr::SYSENTER_ESP => vmcs::write(GuestN::SysenterEsp, value),
            nr::SYSENTER_EIP => vmcs::write(GuestN::SysenterEip, value),
            _ => return false,
        };
        r.is_ok()
    }

    fn control_pa(&self) -> u64 {
        self.vmcs.0
    }

    fn confinement(&self) -> u64 {
        let words = [
            u64::from(vmcs::read_or_zero(Control32::PinBasedControls)),
            u64::from(vmcs::read_or_zero(Control32::PrimaryProcBasedControls)),
            u64::from(vmcs::read_or_zero(Control32::SecondaryProcBasedControls)),
            u64::from(vmcs::read_or_zero(Control32::ExitControls)) & !u64::from(EXIT_SAVE_TIMER),
            u64::from(vmcs::read_or_zero(Control32::EntryControls)),
            u64::from(vmcs::read_or_zero(Control32::ExceptionBitmap)),
            vmcs::read_or_zero(Control64::MsrBitmap),
            vmcs::read_or_zero(Control64::EptPointer),
            u64::from(vmcs::read_or_zero(Control16::Vpid)),
        ];
        let mut h = FNV_START;
        for w in words {
            h = fnv1a(h, &w.to_le_bytes());
        }
        // SAFETY: the bitmap frame is this vCPU's own (identity mapped, 4
        // KiB); the CPU only reads it.
        let map = unsafe { core::slice::from_raw_parts(self.msr_bitmap.0 as *const u8, 4096) };
        fnv1a(h, map)
    }

    /// Registers, RIP, RSP, RFLAGS, control registers and EFER (the VMX
    /// backend does not checkpoint; this serves failure reports).
    fn state(&self) -> VcpuState {
        let mut st = VcpuState {
            rip: vmcs::read_or_zero(GuestN::Rip),
            rsp: vmcs::read_or_zero(GuestN::Rsp),
            rflags: vmcs::read_or_zero(GuestN::Rflags),
            cr0: vmcs::read_or_zero(GuestN::Cr0),
            cr3: vmcs::read_or_zero(GuestN::Cr3),
            cr4: vmcs::read_or_zero(GuestN::Cr4),
            efer: vmcs::read_or_zero(Guest64::Ia32Efer),
            ..VcpuState::default()
        };
        self.regs.store(&mut st);
        st
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        if let Some(ticks) = self.timer_armed {
            log::info!(
                "vmx: preemption timer: armed for {ticks} TSC ticks (rate 2^{}), timer_exits={}",
                self.timer_shift,
                self.timer_exits
            );
        }
        // SAFETY: our VMCS region; clearing it makes the CPU stop using it,
        // so its frame (and with it the bitmap and PML frames, which only
        // this VMCS names) can go back to the allocator.
        if let Err(e) = unsafe { instr::vmclear(self.vmcs.0) } {
            log::error!("vmx: VMCLEAR at vCPU drop failed ({e:?})");
        }
    }
}
