//! The VMX vCPU: one VMCS set up for a 64-bit guest under EPT, the exit
//! decoding into the vendor-neutral [`VmExit`], INVEPT, PML and the
//! VMX-preemption timer. (Intel SDM vol. 3C, chapters 25-29.)

use super::{
    EPT_CAP_AD, IA32_VMX_BASIC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED0,
    IA32_VMX_CR4_FIXED1, IA32_VMX_EPT_VPID_CAP, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2,
    IA32_VMX_TRUE_PROCBASED_CTLS, PROC2_EPT, PROC2_PML, PROC2_UNRESTRICTED, PROC_SECONDARY,
};
use doppel_core::addr::HostPhysAddr;
use doppel_core::dirtylog::DirtyLog;
use doppel_core::exit::{ExitKind, Insn, IoAccess, VmExit};
use doppel_core::hostile::{fnv1a, FNV_START};
use doppel_core::hvm::{DescTable, PendingEvent, SegAttr, Segment, VcpuState};
use doppel_core::hw::vmcs::{
    can_take_interrupt, cr_guest_view, cr_mask, cr_real, efer_with_lma, event_from_info,
    event_to_info, exit_reason as reason, interruptibility, intr_info, Control16, Control32,
    Control64, ControlN, CrAccess, Guest16, Guest32, Guest64, GuestN, Host16, Host32, Host64,
    HostN, IoQualification, MsrEntry, ReadOnly32, ReadOnly64, ReadOnlyN,
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
/// Host interrupts exit instead of going through the guest's IDT (with it
/// clear, a pending 8259 IRQ0 reached a Linux guest as vector 8: a "double
/// fault" without an error code).
const PIN_EXTERNAL_INTERRUPT: u32 = 1 << 0;
/// Primary processor-based controls.
const PROC_INTERRUPT_WINDOW: u32 = 1 << 2;
const PROC_TSC_OFFSETTING: u32 = 1 << 3;
const PROC_HLT_EXITING: u32 = 1 << 7;
const PROC_CR8_LOAD_EXITING: u32 = 1 << 19;
const PROC_CR8_STORE_EXITING: u32 = 1 << 20;
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

/// CR0 bits the host owns (a guest write changing one exits): PE and PG
/// (paging-mode changes: EFER.LMA and the IA-32e-mode entry control
/// follow them), CD and NW (the guest must not make memory uncacheable
/// unchecked). NE and every bit VMX fixes are owned too ([`cr_mask`]).
const CR0_OWNED: u64 = (1 << 0) | (1 << 29) | (1 << 30) | (1 << 31);
/// CR0.PE and CR0.PG: VMX fixes them to 1 unless the guest is
/// unrestricted.
const CR0_PE_PG: u64 = (1 << 0) | (1 << 31);
/// CR4 bits the host owns: PAE (a paging-mode change), VMXE (the host's,
/// never the guest's) and OSXSAVE (XSAVE state is not switched).
const CR4_OWNED: u64 = (1 << 5) | (1 << 13) | (1 << 18);
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;

/// MSRs the VMCS has no fields for, switched through the VM-entry
/// MSR-load list (guest values), the VM-exit MSR-store list (the same
/// guest list) and the VM-exit MSR-load list (host values).
const LIST_MSRS: [u32; 5] = [
    nr::STAR,
    nr::LSTAR,
    nr::CSTAR,
    nr::SFMASK,
    nr::KERNEL_GS_BASE,
];
/// Byte offset of the host list in the MSR-list frame (the guest list is
/// at 0).
const HOST_LIST_OFFSET: u64 = 2048;

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
    proc: u32,
    proc2: u32,
    exit: u32,
    entry: u32,
    invept_single: bool,
    invvpid_single: bool,
    /// The guest's STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE list, then
    /// the host's at [`HOST_LIST_OFFSET`].
    msr_lists: OwnedFrame,
    /// Real CR0/CR4 bits VMX operation forces to 1 and allows to be 1.
    cr0_fixed: (u64, u64),
    cr4_fixed: (u64, u64),
    /// The guest's CR2 (VMX does not switch it): put into the CPU before
    /// each entry, read back after each exit.
    cr2: u64,
    /// log2 of TSC ticks per preemption-timer tick (IA32_VMX_MISC[4:0]).
    timer_shift: u32,
    /// Preemption-timer exits seen, and the last period armed.
    timer_exits: u64,
    timer_armed: Option<u64>,
}

impl VmxVcpu {
    /// Build the VMCS for a 64-bit test guest starting at `start` (see
    /// [`Self::with_state`]).
    pub fn new(
        revision: u32,
        start: &GuestStart,
        ept_root: HostPhysAddr,
        ad: bool,
        msr_passthrough: bool,
    ) -> Result<Self, SetupError> {
        let st = VcpuState::long_mode_start(start);
        Self::with_state(revision, &st, ept_root, ad, msr_passthrough)
    }

    /// Build the VMCS for a guest in state `st` (any mode: the long-mode
    /// start of the test guests, Linux's 32-bit PVH start with paging off,
    /// a restored record), with the EPT rooted at `ept_root`; `ad` enables
    /// EPT accessed/dirty flags (needed for PML). `msr_passthrough` leaves
    /// the MSR bitmap all zero (the deliberately broken build,
    /// `broken=msr-passthrough`). A state with CR0.PE or CR0.PG clear needs
    /// the "unrestricted guest" control.
    pub fn with_state(
        revision: u32,
        st: &VcpuState,
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
        let msr_lists = OwnedFrame::new()?;
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

        let pin = adjust(m.pin, PIN_EXTERNAL_INTERRUPT, "pin-based")?;
        let proc = adjust(
            m.proc,
            PROC_HLT_EXITING
                | PROC_UNCONDITIONAL_IO
                | PROC_MSR_BITMAPS
                | PROC_SECONDARY
                | PROC_CR8_LOAD_EXITING
                | PROC_CR8_STORE_EXITING,
            "processor-based",
        )?;
        // Unrestricted guest where the CPU has it (the PVH start runs with
        // paging off); only a state that needs it fails without it.
        let unrestricted = (m.proc2 >> 32) as u32 & PROC2_UNRESTRICTED != 0;
        if !unrestricted && st.cr0 & CR0_PE_PG != CR0_PE_PG {
            return Err(SetupError::Control(
                "secondary (unrestricted guest, for CR0.PE/PG clear)",
                PROC2_UNRESTRICTED,
            ));
        }
        let want2 = PROC2_EPT | PROC2_VPID | if unrestricted { PROC2_UNRESTRICTED } else { 0 };
        let proc2 = adjust(m.proc2, want2, "secondary")?;
        let exit = adjust(
            m.exit,
            EXIT_HOST_ADDR_SPACE_64 | EXIT_SAVE_EFER | EXIT_LOAD_EFER,
            "VM-exit",
        )?;
        // The IA-32e-mode control must be allowed; it is set from EFER.LMA
        // by `write_guest_state`.
        let entry = adjust(m.entry, ENTRY_IA32E_GUEST | ENTRY_LOAD_EFER, "VM-entry")?;
        let entry = entry & !ENTRY_IA32E_GUEST;
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
        let n = LIST_MSRS.len() as u32;
        vmcs::write(Control64::EntryMsrLoadAddr, msr_lists.0)?;
        vmcs::write(Control64::ExitMsrStoreAddr, msr_lists.0)?;
        vmcs::write(Control64::ExitMsrLoadAddr, msr_lists.0 + HOST_LIST_OFFSET)?;
        vmcs::write(Control32::ExitMsrStoreCount, n)?;
        vmcs::write(Control32::ExitMsrLoadCount, n)?;
        vmcs::write(Control32::EntryMsrLoadCount, n)?;
        vmcs::write(Control32::EntryInterruptionInfo, 0)?;
        // Every MSR exits but the allow-list (`doppel_core::msr`).
        vmcs::write(Control64::MsrBitmap, msr_bitmap.0)?;
        vmcs::write(Control64::EptPointer, eptp)?;
        vmcs::write(Control16::Vpid, VPID)?;
        let pe_pg = if unrestricted { CR0_PE_PG } else { 0 };
        let cr0_fixed = (
            rdmsr(IA32_VMX_CR0_FIXED0) & !pe_pg,
            rdmsr(IA32_VMX_CR0_FIXED1),
        );
        let cr4_fixed = (rdmsr(IA32_VMX_CR4_FIXED0), rdmsr(IA32_VMX_CR4_FIXED1));
        vmcs::write(
            ControlN::Cr0GuestHostMask,
            cr_mask(CR0_OWNED, cr0_fixed.0, cr0_fixed.1),
        )?;
        vmcs::write(
            ControlN::Cr4GuestHostMask,
            cr_mask(CR4_OWNED, cr4_fixed.0, cr4_fixed.1),
        )?;

        write_host_state()?;

        let invept_single = m.ept_vpid & EPT_CAP_INVEPT_SINGLE != 0;
        let invvpid_single = m.ept_vpid & VPID_CAP_INVVPID_SINGLE != 0;
        let mut v = Self {
            vmcs,
            msr_bitmap,
            pml: None,
            regs: GuestRegs::of(st),
            eptp,
            launched: false,
            pin,
            proc,
            proc2,
            exit,
            entry,
            invept_single,
            invvpid_single,
            msr_lists,
            cr0_fixed,
            cr4_fixed,
            cr2: st.cr2,
            timer_shift: (m.misc & 0x1f) as u32,
            timer_exits: 0,
            timer_armed: None,
        };
        for (i, &m) in LIST_MSRS.iter().enumerate() {
            v.set_list_entry(HOST_LIST_OFFSET, i, m, rdmsr(m));
            v.set_list_entry(0, i, m, 0);
        }
        v.write_state(st)?;
        // A fresh guest must not see translations an earlier one (same
        // VPID) left behind.
        if invvpid_single {
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

    /// Write entry `i` of the MSR list at byte `offset` of the list frame.
    fn set_list_entry(&mut self, offset: u64, i: usize, index: u32, value: u64) {
        let Some(slot) = list_slot(self.msr_lists.0, offset, i) else {
            return;
        };
        // SAFETY: `list_slot` gives an aligned entry inside the list frame
        // this vCPU owns (identity mapped); the CPU reads and writes the
        // lists only while the guest runs, and `&mut self` here means it
        // does not.
        unsafe {
            slot.write_volatile(MsrEntry {
                index,
                reserved: 0,
                value,
            })
        };
    }

    /// The guest's value of list MSR `m`, if it is one.
    fn list_msr(&self, m: u32) -> Option<u64> {
        let i = LIST_MSRS.iter().position(|&x| x == m)?;
        let slot = list_slot(self.msr_lists.0, 0, i)?;
        // SAFETY: as in `set_list_entry`; `&self` is only taken between
        // exits, when the CPU does not touch the list.
        Some(unsafe { slot.read_volatile() }.value)
    }

    fn set_list_msr(&mut self, m: u32, value: u64) -> bool {
        match LIST_MSRS.iter().position(|&x| x == m) {
            Some(i) => {
                self.set_list_entry(0, i, m, value);
                true
            }
            None => false,
        }
    }

    /// Real CR0 for the guest's value, the read shadow set to the guest's.
    fn write_cr0(&self, guest: u64) -> Result<(), VmcsError> {
        vmcs::write(
            GuestN::Cr0,
            cr_real(guest, self.cr0_fixed.0, self.cr0_fixed.1),
        )?;
        vmcs::write(ControlN::Cr0ReadShadow, guest)
    }

    fn write_cr4(&self, guest: u64) -> Result<(), VmcsError> {
        vmcs::write(
            GuestN::Cr4,
            cr_real(guest, self.cr4_fixed.0, self.cr4_fixed.1),
        )?;
        vmcs::write(ControlN::Cr4ReadShadow, guest)
    }

    /// CR0 and CR4 as the guest sees them (read shadows merged).
    fn guest_cr0(&self) -> u64 {
        cr_guest_view(
            vmcs::read_or_zero(GuestN::Cr0),
            vmcs::read_or_zero(ControlN::Cr0ReadShadow),
            vmcs::read_or_zero(ControlN::Cr0GuestHostMask),
        )
    }

    fn guest_cr4(&self) -> u64 {
        cr_guest_view(
            vmcs::read_or_zero(GuestN::Cr4),
            vmcs::read_or_zero(ControlN::Cr4ReadShadow),
            vmcs::read_or_zero(ControlN::Cr4GuestHostMask),
        )
    }

    /// Guest EFER and the IA-32e-mode entry control, which VM entry
    /// requires to equal EFER.LMA.
    fn write_efer(&mut self, efer: u64) -> Result<(), VmcsError> {
        let entry = if efer & EFER_LMA != 0 {
            self.entry | ENTRY_IA32E_GUEST
        } else {
            self.entry & !ENTRY_IA32E_GUEST
        };
        vmcs::write(Guest64::Ia32Efer, efer)?;
        vmcs::write(Control32::EntryControls, entry)?;
        self.entry = entry;
        Ok(())
    }

    fn write_proc(&mut self, proc: u32) -> bool {
        match vmcs::write(Control32::PrimaryProcBasedControls, proc) {
            Ok(()) => {
                self.proc = proc;
                true
            }
            Err(e) => {
                log::error!("vmx: writing the processor-based controls: {e}");
                false
            }
        }
    }

    /// Flush the guest's own (VPID-tagged) linear translations, as a CR
    /// write that changes paging does on hardware.
    fn flush_guest_tlb(&self) {
        let r = if self.invvpid_single {
            instr::invvpid_single(VPID)
        } else {
            instr::invept_all()
        };
        if let Err(e) = r {
            log::error!("vmx: flushing the guest TLB failed ({e:?})");
        }
    }

    /// Everything of `st` into the VMCS (and CR2, the MSR list, the
    /// general registers): the one writer of guest state, for a new vCPU
    /// and for [`Vcpu::load_state`]. Its pending event is set up for
    /// injection; the guest is active, with no interrupt shadow.
    fn write_state(&mut self, st: &VcpuState) -> Result<(), VmcsError> {
        self.write_cr0(st.cr0)?;
        self.write_cr4(st.cr4)?;
        vmcs::write(GuestN::Cr3, st.cr3)?;
        vmcs::write(GuestN::Dr7, st.dr7)?;
        vmcs::write(GuestN::Rsp, st.rsp)?;
        vmcs::write(GuestN::Rip, st.rip)?;
        vmcs::write(GuestN::Rflags, st.rflags)?;
        self.write_efer(st.efer)?;
        vmcs::write(Guest64::Ia32Debugctl, 0)?;
        vmcs::write(Guest64::VmcsLinkPointer, u64::MAX)?;
        for (seg, (sel, base, limit, ar)) in segments(st) {
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
        for m in LIST_MSRS {
            let v = match m {
                nr::STAR => st.star,
                nr::LSTAR => st.lstar,
                nr::CSTAR => st.cstar,
                nr::SFMASK => st.sfmask,
                _ => st.kernel_gs_base,
            };
            self.set_list_msr(m, v);
        }
        self.cr2 = st.cr2;
        self.regs = GuestRegs::of(st);
        match st.pending_event {
            Some(ev) => self.write_event(ev, 0)?,
            None => vmcs::write(Control32::EntryInterruptionInfo, 0)?,
        }
        Ok(())
    }

    /// Set `ev` up for injection at the next entry; `len` is the
    /// instruction length a software event needs.
    fn write_event(&self, ev: PendingEvent, len: u32) -> Result<(), VmcsError> {
        let (info, code) = event_to_info(&ev);
        if ev.error_code.is_some() {
            vmcs::write(Control32::EntryExceptionErrorCode, code)?;
        }
        if intr_info::needs_length(ev.kind) {
            vmcs::write(Control32::EntryInstructionLength, len)?;
        }
        vmcs::write(Control32::EntryInterruptionInfo, info)
    }

    /// After an exit: an event the exit interrupted while it was being
    /// delivered goes back in for the next entry (SDM "Information for VM
    /// Exits That Occur During Event Delivery").
    fn requeue_interrupted(&self) {
        let info = vmcs::read_or_zero(ReadOnly32::IdtVectoringInfo);
        let code = vmcs::read_or_zero(ReadOnly32::IdtVectoringErrorCode);
        if let Some(ev) = event_from_info(info, code) {
            let len = vmcs::read_or_zero(ReadOnly32::ExitInstructionLength);
            if let Err(e) = self.write_event(ev, len) {
                log::error!("vmx: re-injecting the interrupted event {ev:?}: {e}");
            }
        }
    }

    /// The guest state VM entry checks, for an entry-failure report.
    fn log_entry_state(&self) {
        let ar = |f| vmcs::read_or_zero(f);
        log::error!(
            "vmx: entry state: cr0={:#x} (shadow {:#x}) cr4={:#x} (shadow {:#x}) cr3={:#x} \
             efer={:#x} rip={:#x} rflags={:#x} pin={:#x} proc={:#x} proc2={:#x} entry={:#x} \
             exit={:#x} cs={:#x}/ar={:#x} ss={:#x}/ar={:#x} tr={:#x}/ar={:#x} ldtr ar={:#x} \
             interruptibility={:#x} activity={} entry_info={:#x} entry_len={}",
            vmcs::read_or_zero(GuestN::Cr0),
            vmcs::read_or_zero(ControlN::Cr0ReadShadow),
            vmcs::read_or_zero(GuestN::Cr4),
            vmcs::read_or_zero(ControlN::Cr4ReadShadow),
            vmcs::read_or_zero(GuestN::Cr3),
            vmcs::read_or_zero(Guest64::Ia32Efer),
            vmcs::read_or_zero(GuestN::Rip),
            vmcs::read_or_zero(GuestN::Rflags),
            vmcs::read_or_zero(Control32::PinBasedControls),
            vmcs::read_or_zero(Control32::PrimaryProcBasedControls),
            vmcs::read_or_zero(Control32::SecondaryProcBasedControls),
            vmcs::read_or_zero(Control32::EntryControls),
            vmcs::read_or_zero(Control32::ExitControls),
            vmcs::read_or_zero(Guest16::CsSelector),
            ar(Guest32::CsAccessRights),
            vmcs::read_or_zero(Guest16::SsSelector),
            ar(Guest32::SsAccessRights),
            vmcs::read_or_zero(Guest16::TrSelector),
            ar(Guest32::TrAccessRights),
            ar(Guest32::LdtrAccessRights),
            vmcs::read_or_zero(Guest32::InterruptibilityState),
            vmcs::read_or_zero(Guest32::ActivityState),
            vmcs::read_or_zero(Control32::EntryInterruptionInfo),
            vmcs::read_or_zero(Control32::EntryInstructionLength),
        );
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
            if (raw & 0xffff) as u16 == reason::MSR_LOADING {
                // The qualification is the failing entry, counted from 1.
                let m = LIST_MSRS.get((qual as usize).wrapping_sub(1));
                log::error!("vmx: the VM-entry MSR-load list failed at MSR {m:#x?}");
            }
            self.log_entry_state();
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
            reason::INTERRUPT_WINDOW => exit(ExitKind::InterruptWindow, None),
            reason::CR_ACCESS => match CrAccess::decode(qual) {
                CrAccess::MovTo { cr, gpr } if matches!(cr, 0 | 3 | 4 | 8) => {
                    exit(ExitKind::CrWrite { cr, gpr: Some(gpr) }, next)
                }
                // CR3-store, CR8-store exiting; LMSW changing PE (CLTS
                // cannot exit: CR0.TS is not owned). No guest needs them
                // emulated yet.
                a => {
                    log::error!("vmx: control-register access {a:?} is not emulated");
                    self.unknown(raw, qual, rip)
                }
            },
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

/// Entry `i` of the MSR list at byte `offset` of the list frame at `frame`.
fn list_slot(frame: u64, offset: u64, i: usize) -> Option<*mut MsrEntry> {
    (i < LIST_MSRS.len()).then(|| (frame + offset + 16 * i as u64) as *mut MsrEntry)
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

/// The guest segment registers' VMCS fields: selector, base, limit,
/// access rights.
type SegFields = (Guest16, GuestN, Guest32, Guest32);

const SEG_CS: SegFields = (
    Guest16::CsSelector,
    GuestN::CsBase,
    Guest32::CsLimit,
    Guest32::CsAccessRights,
);

fn read_segment((sel, base, limit, ar): SegFields) -> Segment {
    Segment {
        selector: vmcs::read_or_zero(sel),
        base: vmcs::read_or_zero(base),
        limit: vmcs::read_or_zero(limit),
        attr: SegAttr::from_vmx_ar(vmcs::read_or_zero(ar)),
    }
}

/// Every segment register of `st` with its VMCS fields.
fn segments(st: &VcpuState) -> [(&Segment, SegFields); 8] {
    [
        (
            &st.cs,
            (
                Guest16::CsSelector,
                GuestN::CsBase,
                Guest32::CsLimit,
                Guest32::CsAccessRights,
            ),
        ),
        (
            &st.ss,
            (
                Guest16::SsSelector,
                GuestN::SsBase,
                Guest32::SsLimit,
                Guest32::SsAccessRights,
            ),
        ),
        (
            &st.ds,
            (
                Guest16::DsSelector,
                GuestN::DsBase,
                Guest32::DsLimit,
                Guest32::DsAccessRights,
            ),
        ),
        (
            &st.es,
            (
                Guest16::EsSelector,
                GuestN::EsBase,
                Guest32::EsLimit,
                Guest32::EsAccessRights,
            ),
        ),
        (
            &st.fs,
            (
                Guest16::FsSelector,
                GuestN::FsBase,
                Guest32::FsLimit,
                Guest32::FsAccessRights,
            ),
        ),
        (
            &st.gs,
            (
                Guest16::GsSelector,
                GuestN::GsBase,
                Guest32::GsLimit,
                Guest32::GsAccessRights,
            ),
        ),
        (
            &st.tr,
            (
                Guest16::TrSelector,
                GuestN::TrBase,
                Guest32::TrLimit,
                Guest32::TrAccessRights,
            ),
        ),
        (
            &st.ldtr,
            (
                Guest16::LdtrSelector,
                GuestN::LdtrBase,
                Guest32::LdtrLimit,
                Guest32::LdtrAccessRights,
            ),
        ),
    ]
}

impl Vcpu for VmxVcpu {
    fn backend(&self) -> &'static str {
        "vmx"
    }

    fn run(&mut self) -> VmExit {
        if instr::read_cr2() != self.cr2 {
            instr::write_cr2(self.cr2);
        }
        let regs = (&raw mut self.regs).cast::<u64>();
        // SAFETY: this vCPU's VMCS is current (made so in `new`, and only
        // one vCPU exists at a time); its host-state area was written by
        // `write_host_state` from the running kernel with the host address-
        // space-size exit control set; `regs` points at this vCPU's
        // `GuestRegs`, 15 u64 in the stub's order.
        let rc = unsafe { instr::vmx_enter(regs, u64::from(self.launched)) };
        match rc {
            instr::VMX_ENTER_EXITED => {
                self.cr2 = instr::read_cr2();
                let e = self.decode_exit();
                self.requeue_interrupted();
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
                    self.log_entry_state();
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
        // The instruction that exited is done: an STI or MOV-SS shadow it
        // stood in is over (left set, the next injection would fail the
        // entry checks).
        let s = vmcs::read_or_zero(Guest32::InterruptibilityState);
        let shadow = interruptibility::STI | interruptibility::MOV_SS;
        if s & shadow != 0 {
            if let Err(e) = vmcs::write(Guest32::InterruptibilityState, s & !shadow) {
                log::error!("vmx: clearing the interrupt shadow: {e}");
            }
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
        if let Some(v) = self.list_msr(m) {
            return Some(v);
        }
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
        if self.set_list_msr(m, value) {
            return true;
        }
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
            // The interrupt window and TSC offsetting come and go as the
            // platform runs the guest; they confine nothing.
            u64::from(
                vmcs::read_or_zero(Control32::PrimaryProcBasedControls)
                    & !(PROC_INTERRUPT_WINDOW | PROC_TSC_OFFSETTING),
            ),
            u64::from(vmcs::read_or_zero(Control32::SecondaryProcBasedControls)),
            u64::from(vmcs::read_or_zero(Control32::ExitControls)) & !u64::from(EXIT_SAVE_TIMER),
            // IA-32e mode follows the guest's EFER.LMA.
            u64::from(vmcs::read_or_zero(Control32::EntryControls) & !ENTRY_IA32E_GUEST),
            vmcs::read_or_zero(ControlN::Cr0GuestHostMask),
            vmcs::read_or_zero(ControlN::Cr4GuestHostMask),
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

    /// Everything the VMCS, the MSR list and the entry stub hold of the
    /// guest: registers, CR0/CR4 as the guest sees them, CR2, segments,
    /// descriptor tables, EFER, SYSENTER and the list MSRs, DR7 and the
    /// event set up for the next entry (an interrupted one being
    /// re-injected, or one the platform injected). Not here: DR0-3/DR6
    /// (not switched; no guest of ours uses them), the FPU and the TSC
    /// (the platform's).
    fn state(&self) -> VcpuState {
        let seg = |sel, base, limit, ar| read_segment((sel, base, limit, ar));
        let table = |base, limit| DescTable {
            base: vmcs::read_or_zero(base),
            limit: vmcs::read_or_zero(limit) as u16,
        };
        let list = |m| self.list_msr(m).unwrap_or(0);
        let mut st = VcpuState {
            rip: vmcs::read_or_zero(GuestN::Rip),
            rsp: vmcs::read_or_zero(GuestN::Rsp),
            rflags: vmcs::read_or_zero(GuestN::Rflags),
            cr0: self.guest_cr0(),
            cr2: self.cr2,
            cr3: vmcs::read_or_zero(GuestN::Cr3),
            cr4: self.guest_cr4(),
            dr7: vmcs::read_or_zero(GuestN::Dr7),
            cs: read_segment(SEG_CS),
            ss: seg(
                Guest16::SsSelector,
                GuestN::SsBase,
                Guest32::SsLimit,
                Guest32::SsAccessRights,
            ),
            ds: seg(
                Guest16::DsSelector,
                GuestN::DsBase,
                Guest32::DsLimit,
                Guest32::DsAccessRights,
            ),
            es: seg(
                Guest16::EsSelector,
                GuestN::EsBase,
                Guest32::EsLimit,
                Guest32::EsAccessRights,
            ),
            fs: seg(
                Guest16::FsSelector,
                GuestN::FsBase,
                Guest32::FsLimit,
                Guest32::FsAccessRights,
            ),
            gs: seg(
                Guest16::GsSelector,
                GuestN::GsBase,
                Guest32::GsLimit,
                Guest32::GsAccessRights,
            ),
            tr: seg(
                Guest16::TrSelector,
                GuestN::TrBase,
                Guest32::TrLimit,
                Guest32::TrAccessRights,
            ),
            ldtr: seg(
                Guest16::LdtrSelector,
                GuestN::LdtrBase,
                Guest32::LdtrLimit,
                Guest32::LdtrAccessRights,
            ),
            gdtr: table(GuestN::GdtrBase, Guest32::GdtrLimit),
            idtr: table(GuestN::IdtrBase, Guest32::IdtrLimit),
            efer: vmcs::read_or_zero(Guest64::Ia32Efer),
            sysenter_cs: u64::from(vmcs::read_or_zero(Guest32::SysenterCs)),
            sysenter_esp: vmcs::read_or_zero(GuestN::SysenterEsp),
            sysenter_eip: vmcs::read_or_zero(GuestN::SysenterEip),
            star: list(nr::STAR),
            lstar: list(nr::LSTAR),
            cstar: list(nr::CSTAR),
            sfmask: list(nr::SFMASK),
            kernel_gs_base: list(nr::KERNEL_GS_BASE),
            pending_event: event_from_info(
                vmcs::read_or_zero(Control32::EntryInterruptionInfo),
                vmcs::read_or_zero(Control32::EntryExceptionErrorCode),
            ),
            ..VcpuState::default()
        };
        self.regs.store(&mut st);
        st
    }

    fn cs_long(&self) -> bool {
        SegAttr::from_vmx_ar(vmcs::read_or_zero(Guest32::CsAccessRights)).long()
    }

    fn inject(&mut self, ev: PendingEvent) -> bool {
        let len = vmcs::read_or_zero(ReadOnly32::ExitInstructionLength);
        match self.write_event(ev, len) {
            Ok(()) => true,
            Err(e) => {
                log::error!("vmx: injecting {ev:?}: {e}");
                false
            }
        }
    }

    fn interrupted_event(&self) -> Option<PendingEvent> {
        event_from_info(
            vmcs::read_or_zero(ReadOnly32::IdtVectoringInfo),
            vmcs::read_or_zero(ReadOnly32::IdtVectoringErrorCode),
        )
    }

    fn interruptible(&self) -> bool {
        can_take_interrupt(
            vmcs::read_or_zero(GuestN::Rflags),
            vmcs::read_or_zero(Guest32::InterruptibilityState),
            vmcs::read_or_zero(Control32::EntryInterruptionInfo),
        )
    }

    fn set_interrupt_window(&mut self, on: bool) {
        let proc = if on {
            self.proc | PROC_INTERRUPT_WINDOW
        } else {
            self.proc & !PROC_INTERRUPT_WINDOW
        };
        if proc != self.proc {
            self.write_proc(proc);
        }
    }

    fn set_tsc_offset(&mut self, offset: u64) -> bool {
        if let Err(e) = vmcs::write(Control64::TscOffset, offset) {
            log::error!("vmx: writing the TSC offset: {e}");
            return false;
        }
        self.proc & PROC_TSC_OFFSETTING != 0 || self.write_proc(self.proc | PROC_TSC_OFFSETTING)
    }

    fn set_cr(&mut self, cr: u8, value: u64) -> bool {
        let r = match cr {
            0 => {
                let old = self.guest_cr0();
                let efer = efer_with_lma(vmcs::read_or_zero(Guest64::Ia32Efer), value);
                if value & CR0_PG != 0 && efer & EFER_LMA == 0 && self.guest_cr4() & CR4_PAE != 0 {
                    // With EPT, PAE paging takes its PDPTEs from the VMCS,
                    // which nothing here loads; Linux goes from paging off
                    // straight to long mode.
                    log::error!(
                        "vmx: CR0 write {value:#x}: PAE paging outside long mode is not supported"
                    );
                    return false;
                }
                let r = self.write_cr0(value).and_then(|()| self.write_efer(efer));
                if (old ^ value) & CR0_PG != 0 {
                    self.flush_guest_tlb();
                }
                r
            }
            3 => {
                let r = vmcs::write(GuestN::Cr3, value);
                self.flush_guest_tlb();
                r
            }
            4 => {
                let r = self.write_cr4(value);
                self.flush_guest_tlb();
                r
            }
            _ => {
                log::error!("vmx: CR{cr} is not a register set_cr writes");
                return false;
            }
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                log::error!("vmx: writing CR{cr} = {value:#x}: {e}");
                false
            }
        }
    }

    fn set_efer(&mut self, value: u64) -> bool {
        let efer = efer_with_lma(value, self.guest_cr0());
        match self.write_efer(efer) {
            Ok(()) => true,
            Err(e) => {
                log::error!("vmx: writing EFER = {value:#x}: {e}");
                false
            }
        }
    }

    fn load_state(&mut self, st: &VcpuState) -> bool {
        match self.write_state(st) {
            Ok(()) => {
                self.flush_guest_tlb();
                true
            }
            Err(e) => {
                log::error!("vmx: loading the vCPU state: {e}");
                false
            }
        }
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
