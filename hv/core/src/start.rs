//! The state a guest vCPU starts in, once for both vendors: 64-bit mode
//! with paging on at the guest's own page tables, flat segments, interrupts
//! off. The VMX and SVM backends only translate it into their VMCS or VMCB
//! (adding what is theirs alone: VMX's fixed CR0/CR4 bits, SVM's EFER.SVME).

use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;

use crate::hvm::{Segment, VcpuState};

/// Where a guest starts.
#[derive(Clone, Copy, Debug)]
pub struct GuestStart {
    pub rip: u64,
    pub rsp: u64,
    /// First argument (the boot information's address).
    pub rdi: u64,
    /// Guest-physical address of the guest's PML4.
    pub cr3: u64,
}

/// Selectors of the start state (the guest loads its own GDT before it
/// reloads a segment register).
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Protected mode, paging, native FPU errors, ET (hard-wired to 1).
pub const START_CR0: Cr0Flags = Cr0Flags::PROTECTED_MODE_ENABLE
    .union(Cr0Flags::EXTENSION_TYPE)
    .union(Cr0Flags::NUMERIC_ERROR)
    .union(Cr0Flags::PAGING);
/// PAE, which long mode requires.
pub const START_CR4: Cr4Flags = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION;
/// Long mode enabled and active.
pub const START_EFER: EferFlags = EferFlags::LONG_MODE_ENABLE.union(EferFlags::LONG_MODE_ACTIVE);
/// RFLAGS with only its always-one bit 1: interrupts off.
pub const START_RFLAGS: u64 = 1 << 1;
/// DR6 and DR7 at reset (their reserved-one bits).
pub const RESET_DR6: u64 = 0xffff_0ff0;
pub const RESET_DR7: u64 = 0x400;

/// Segment attributes (Xen's packed form, [`SegAttr`]).
mod attr {
    use crate::hvm::SegAttr;
    /// 64-bit code: type 0xb (execute/read, accessed), S, P, L, G.
    pub const CODE64: SegAttr = SegAttr::from_vmx_ar(0xa09b);
    /// Read/write data, accessed: type 3, S, P, D/B, G.
    pub const DATA: SegAttr = SegAttr::from_vmx_ar(0xc093);
    /// A busy 64-bit TSS: type 0xb, P.
    pub const TSS_BUSY64: SegAttr = SegAttr::from_vmx_ar(0x008b);
}

impl VcpuState {
    /// The long-mode start state for `start`; everything not named here
    /// (other general registers, CR2, MSRs, the FPU) is zero.
    pub fn long_mode_start(start: &GuestStart) -> Self {
        let flat = |selector, attr| Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            attr,
        };
        let data = flat(DATA_SELECTOR, attr::DATA);
        Self {
            rip: start.rip,
            rsp: start.rsp,
            rdi: start.rdi,
            rflags: START_RFLAGS,
            cr0: START_CR0.bits(),
            cr3: start.cr3,
            cr4: START_CR4.bits(),
            efer: START_EFER.bits(),
            dr6: RESET_DR6,
            dr7: RESET_DR7,
            cs: flat(CODE_SELECTOR, attr::CODE64),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment {
                selector: TSS_SELECTOR,
                base: 0,
                limit: 0x67,
                attr: attr::TSS_BUSY64,
            },
            // Not present: VMX marks it unusable, SVM reads attribute 0.
            ldtr: Segment::default(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hw::vmcb::VmcbSegment;

    fn start() -> GuestStart {
        GuestStart {
            rip: 0x40_1000,
            rsp: 0x7f_f000,
            rdi: 0x9000,
            cr3: 0x20_0000,
        }
    }

    /// The values both backends loaded before they shared this state.
    #[test]
    fn control_registers_and_msrs_are_long_mode() {
        let s = VcpuState::long_mode_start(&start());
        assert_eq!(s.cr0, 0x8000_0031);
        assert_eq!(s.cr4, 0x20);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.rflags, 0x2);
        assert_eq!((s.dr6, s.dr7), (0xffff_0ff0, 0x400));
        assert_eq!(
            (s.rip, s.rsp, s.rdi, s.cr3),
            (0x40_1000, 0x7f_f000, 0x9000, 0x20_0000)
        );
        assert_eq!((s.rax, s.rbx, s.cr2, s.star, s.lstar), (0, 0, 0, 0, 0));
        assert!(s.pending_event.is_none());
    }

    /// Translated to each vendor's encoding, the segments are what VMX
    /// (access rights) and SVM (VMCB attributes) loaded by hand before.
    #[test]
    fn segments_translate_to_both_vendors() {
        let s = VcpuState::long_mode_start(&start());
        assert!(s.cs.attr.long() && s.cs.attr.present() && s.cs.attr.dpl() == 0);
        assert_eq!(s.cs.attr.to_vmx_ar(), 0xa09b);
        assert_eq!(
            s.cs.attr.to_svm(),
            VmcbSegment::attrib_from_access_rights(0xa09b)
        );
        for d in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((d.selector, d.base, d.limit), (0x10, 0, 0xffff_ffff));
            assert_eq!(d.attr.to_vmx_ar(), 0xc093);
            assert_eq!(
                d.attr.to_svm(),
                VmcbSegment::attrib_from_access_rights(0xc093)
            );
        }
        assert_eq!((s.cs.selector, s.cs.limit), (0x08, 0xffff_ffff));
        assert_eq!((s.tr.selector, s.tr.limit), (0x18, 0x67));
        assert_eq!(s.tr.attr.to_vmx_ar(), 0x8b);
        assert_eq!(s.tr.attr.to_svm(), 0x8b);
        // LDTR: unusable on VMX, attribute 0 on SVM.
        assert_eq!(s.ldtr.attr.to_vmx_ar(), 1 << 16);
        assert_eq!(s.ldtr.attr.to_svm(), 0);
        assert_eq!(
            (s.gdtr.base, s.gdtr.limit, s.idtr.base, s.idtr.limit),
            (0, 0, 0, 0)
        );
    }
}
