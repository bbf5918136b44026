//! VMCS field encodings (Intel SDM vol. 3, appendix B), as enums split by
//! width and by class.
//!
//! The width is part of the type, so a 16-bit field can only be written with
//! a `u16`; read-only fields (the VM-exit information class) live in their
//! own enums that have no write path at all. The kernel's VMX backend
//! provides the `vmread`/`vmwrite` that take these types.

/// The width of a field, bits 13-14 of its encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    W16 = 0,
    W64 = 1,
    W32 = 2,
    Natural = 3,
}

/// The class of a field, bits 10-11 of its encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Control = 0,
    ReadOnly = 1,
    Guest = 2,
    Host = 3,
}

/// Width and class an encoding says it has.
pub const fn decode(encoding: u32) -> (Width, Class) {
    let w = match (encoding >> 13) & 3 {
        0 => Width::W16,
        1 => Width::W64,
        2 => Width::W32,
        _ => Width::Natural,
    };
    let c = match (encoding >> 10) & 3 {
        0 => Class::Control,
        1 => Class::ReadOnly,
        2 => Class::Guest,
        _ => Class::Host,
    };
    (w, c)
}

macro_rules! fields {
    ($(#[$m:meta])* $name:ident: $width:ident, $class:ident { $($(#[$fm:meta])* $f:ident = $e:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum $name { $($(#[$fm])* $f = $e),* }
        impl $name {
            pub const WIDTH: Width = Width::$width;
            pub const CLASS: Class = Class::$class;
            pub const ALL: &'static [$name] = &[$($name::$f),*];
            pub const fn encoding(self) -> u32 { self as u32 }
        }
    };
}

fields!(
    /// 16-bit control fields.
    Control16: W16, Control {
        Vpid = 0x0000,
    }
);
fields!(
    /// 16-bit guest-state fields.
    Guest16: W16, Guest {
        EsSelector = 0x0800,
        CsSelector = 0x0802,
        SsSelector = 0x0804,
        DsSelector = 0x0806,
        FsSelector = 0x0808,
        GsSelector = 0x080a,
        LdtrSelector = 0x080c,
        TrSelector = 0x080e,
        InterruptStatus = 0x0810,
        /// Index into the page-modification log (starts at 511, counts down).
        PmlIndex = 0x0812,
    }
);
fields!(
    /// 16-bit host-state fields.
    Host16: W16, Host {
        EsSelector = 0x0c00,
        CsSelector = 0x0c02,
        SsSelector = 0x0c04,
        DsSelector = 0x0c06,
        FsSelector = 0x0c08,
        GsSelector = 0x0c0a,
        TrSelector = 0x0c0c,
    }
);
fields!(
    /// 64-bit control fields (full encodings).
    Control64: W64, Control {
        IoBitmapA = 0x2000,
        IoBitmapB = 0x2002,
        MsrBitmap = 0x2004,
        ExitMsrStoreAddr = 0x2006,
        ExitMsrLoadAddr = 0x2008,
        EntryMsrLoadAddr = 0x200a,
        /// Physical address of the 4 KiB page-modification log.
        PmlAddress = 0x200e,
        TscOffset = 0x2010,
        VirtualApicAddr = 0x2012,
        ApicAccessAddr = 0x2014,
        EptPointer = 0x201a,
    }
);
fields!(
    /// 64-bit read-only data fields.
    ReadOnly64: W64, ReadOnly {
        /// The guest-physical address of an EPT violation or misconfiguration.
        GuestPhysicalAddress = 0x2400,
    }
);
fields!(
    /// 64-bit guest-state fields.
    Guest64: W64, Guest {
        VmcsLinkPointer = 0x2800,
        Ia32Debugctl = 0x2802,
        Ia32Pat = 0x2804,
        Ia32Efer = 0x2806,
        Pdpte0 = 0x280a,
        Pdpte1 = 0x280c,
        Pdpte2 = 0x280e,
        Pdpte3 = 0x2810,
    }
);
fields!(
    /// 64-bit host-state fields.
    Host64: W64, Host {
        Ia32Pat = 0x2c00,
        Ia32Efer = 0x2c02,
    }
);
fields!(
    /// 32-bit control fields.
    Control32: W32, Control {
        PinBasedControls = 0x4000,
        PrimaryProcBasedControls = 0x4002,
        ExceptionBitmap = 0x4004,
        PageFaultErrorCodeMask = 0x4006,
        PageFaultErrorCodeMatch = 0x4008,
        Cr3TargetCount = 0x400a,
        ExitControls = 0x400c,
        ExitMsrStoreCount = 0x400e,
        ExitMsrLoadCount = 0x4010,
        EntryControls = 0x4012,
        EntryMsrLoadCount = 0x4014,
        EntryInterruptionInfo = 0x4016,
        EntryExceptionErrorCode = 0x4018,
        EntryInstructionLength = 0x401a,
        TprThreshold = 0x401c,
        SecondaryProcBasedControls = 0x401e,
    }
);
fields!(
    /// 32-bit read-only data fields (VM-exit information).
    ReadOnly32: W32, ReadOnly {
        VmInstructionError = 0x4400,
        ExitReason = 0x4402,
        ExitInterruptionInfo = 0x4404,
        ExitInterruptionErrorCode = 0x4406,
        IdtVectoringInfo = 0x4408,
        IdtVectoringErrorCode = 0x440a,
        ExitInstructionLength = 0x440c,
        ExitInstructionInfo = 0x440e,
    }
);
fields!(
    /// 32-bit guest-state fields.
    Guest32: W32, Guest {
        EsLimit = 0x4800,
        CsLimit = 0x4802,
        SsLimit = 0x4804,
        DsLimit = 0x4806,
        FsLimit = 0x4808,
        GsLimit = 0x480a,
        LdtrLimit = 0x480c,
        TrLimit = 0x480e,
        GdtrLimit = 0x4810,
        IdtrLimit = 0x4812,
        EsAccessRights = 0x4814,
        CsAccessRights = 0x4816,
        SsAccessRights = 0x4818,
        DsAccessRights = 0x481a,
        FsAccessRights = 0x481c,
        GsAccessRights = 0x481e,
        LdtrAccessRights = 0x4820,
        TrAccessRights = 0x4822,
        InterruptibilityState = 0x4824,
        ActivityState = 0x4826,
        Smbase = 0x4828,
        SysenterCs = 0x482a,
        /// VMX-preemption timer value (counts down; exit at zero).
        PreemptionTimerValue = 0x482e,
    }
);
fields!(
    /// 32-bit host-state fields.
    Host32: W32, Host {
        SysenterCs = 0x4c00,
    }
);
fields!(
    /// Natural-width control fields.
    ControlN: Natural, Control {
        Cr0GuestHostMask = 0x6000,
        Cr4GuestHostMask = 0x6002,
        Cr0ReadShadow = 0x6004,
        Cr4ReadShadow = 0x6006,
    }
);
fields!(
    /// Natural-width read-only data fields.
    ReadOnlyN: Natural, ReadOnly {
        ExitQualification = 0x6400,
        IoRcx = 0x6402,
        IoRsi = 0x6404,
        IoRdi = 0x6406,
        IoRip = 0x6408,
        GuestLinearAddress = 0x640a,
    }
);
fields!(
    /// Natural-width guest-state fields.
    GuestN: Natural, Guest {
        Cr0 = 0x6800,
        Cr3 = 0x6802,
        Cr4 = 0x6804,
        EsBase = 0x6806,
        CsBase = 0x6808,
        SsBase = 0x680a,
        DsBase = 0x680c,
        FsBase = 0x680e,
        GsBase = 0x6810,
        LdtrBase = 0x6812,
        TrBase = 0x6814,
        GdtrBase = 0x6816,
        IdtrBase = 0x6818,
        Dr7 = 0x681a,
        Rsp = 0x681c,
        Rip = 0x681e,
        Rflags = 0x6820,
        PendingDebugExceptions = 0x6822,
        SysenterEsp = 0x6824,
        SysenterEip = 0x6826,
    }
);
fields!(
    /// Natural-width host-state fields.
    HostN: Natural, Host {
        Cr0 = 0x6c00,
        Cr3 = 0x6c02,
        Cr4 = 0x6c04,
        FsBase = 0x6c06,
        GsBase = 0x6c08,
        TrBase = 0x6c0a,
        GdtrBase = 0x6c0c,
        IdtrBase = 0x6c0e,
        SysenterEsp = 0x6c10,
        SysenterEip = 0x6c12,
        Rsp = 0x6c14,
        Rip = 0x6c16,
    }
);

/// Basic exit reasons (bits 0-15 of the exit-reason field; SDM appendix C).
pub mod exit_reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const VMCALL: u16 = 18;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const INVALID_GUEST_STATE: u16 = 33;
    pub const MSR_LOADING: u16 = 34;
    pub const MACHINE_CHECK: u16 = 41;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const XSETBV: u16 = 55;
    /// The page-modification log is full.
    pub const PML_FULL: u16 = 62;
    /// Bit 31 of the exit-reason field: VM entry failed.
    pub const ENTRY_FAILURE_BIT: u32 = 1 << 31;
}

/// I/O instruction exit qualification (SDM table "Exit Qualification for
/// I/O Instructions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoQualification {
    pub port: u16,
    pub input: bool,
    pub string: bool,
    pub rep: bool,
    /// Operand size in bytes (1, 2 or 4).
    pub size: u8,
}

impl IoQualification {
    /// Decode; `None` for an operand-size encoding the SDM does not define.
    pub fn decode(q: u64) -> Option<Self> {
        let size = match q & 7 {
            0 => 1,
            1 => 2,
            3 => 4,
            _ => return None,
        };
        Some(Self {
            port: (q >> 16) as u16,
            input: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            size,
        })
    }
}

/// The access a control-register exit reports (SDM table "Exit
/// Qualification for Control-Register Accesses").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CR`cr` from general register `gpr` (0 = RAX .. 15 = R15).
    MovTo {
        cr: u8,
        gpr: u8,
    },
    /// MOV from CR`cr` into general register `gpr`.
    MovFrom {
        cr: u8,
        gpr: u8,
    },
    Clts,
    /// LMSW with its 16-bit source operand.
    Lmsw {
        source: u16,
    },
}

impl CrAccess {
    pub const fn decode(q: u64) -> Self {
        let cr = (q & 0xf) as u8;
        let gpr = ((q >> 8) & 0xf) as u8;
        match (q >> 4) & 3 {
            0 => Self::MovTo { cr, gpr },
            1 => Self::MovFrom { cr, gpr },
            2 => Self::Clts,
            _ => Self::Lmsw {
                source: (q >> 16) as u16,
            },
        }
    }
}

/// CR0 or CR4 as the guest reads it: the bits the guest/host mask owns
/// come from the read shadow, the others from the real register.
pub const fn cr_guest_view(real: u64, shadow: u64, mask: u64) -> u64 {
    (real & !mask) | (shadow & mask)
}

/// The real CR0/CR4 for a guest value `guest`, given the bits VMX operation
/// fixes to 1 (`must1`, the FIXED0 MSR, less PE/PG for an unrestricted
/// guest) and the bits it allows to be 1 (`may1`, the FIXED1 MSR).
pub const fn cr_real(guest: u64, must1: u64, may1: u64) -> u64 {
    (guest | must1) & may1
}

/// The guest/host mask for CR0/CR4: the bits the host wants to see
/// written (`owned`) and every bit whose real value VMX may force away
/// from the guest's (must-be-1 and must-be-0 bits), so that the guest
/// reads its own value of those from the shadow and a write changing one
/// exits.
pub const fn cr_mask(owned: u64, must1: u64, may1: u64) -> u64 {
    owned | must1 | !may1
}

/// EFER after a write of CR0 (or of EFER): LMA is LME and CR0.PG, as the
/// CPU keeps it (SDM vol. 3A, "IA-32e Mode Initialization").
pub const fn efer_with_lma(efer: u64, cr0: u64) -> u64 {
    const LME: u64 = 1 << 8;
    const LMA: u64 = 1 << 10;
    const PG: u64 = 1 << 31;
    if efer & LME != 0 && cr0 & PG != 0 {
        efer | LMA
    } else {
        efer & !LMA
    }
}

/// Interruption-information bits (VM-entry interruption information,
/// IDT-vectoring information; SDM "Format of the VM-Entry
/// Interruption-Information Field").
pub mod intr_info {
    pub const VALID: u32 = 1 << 31;
    pub const ERROR_CODE: u32 = 1 << 11;
    /// IDT-vectoring / exit information only: NMI unblocking due to IRET.
    pub const NMI_UNBLOCKED: u32 = 1 << 12;
    pub const TYPE_SHIFT: u32 = 8;
    /// Event types that need the VM-entry instruction length (software
    /// interrupt, privileged software exception, software exception).
    pub const fn needs_length(kind: u8) -> bool {
        matches!(kind, 4..=6)
    }
}

/// An event as VM-entry interruption information (and its error code).
pub const fn event_to_info(ev: &crate::hvm::PendingEvent) -> (u32, u32) {
    let mut info =
        intr_info::VALID | ev.vector as u32 | ((ev.kind as u32 & 7) << intr_info::TYPE_SHIFT);
    let code = match ev.error_code {
        Some(c) => {
            info |= intr_info::ERROR_CODE;
            c
        }
        None => 0,
    };
    (info, code)
}

/// The event an IDT-vectoring (or entry) information field describes;
/// `None` when its valid bit is clear. Bits other than vector, type,
/// error-code-valid and valid are not part of the event and are dropped.
pub const fn event_from_info(info: u32, code: u32) -> Option<crate::hvm::PendingEvent> {
    if info & intr_info::VALID == 0 {
        return None;
    }
    Some(crate::hvm::PendingEvent {
        vector: info as u8,
        kind: ((info >> intr_info::TYPE_SHIFT) & 7) as u8,
        error_code: if info & intr_info::ERROR_CODE != 0 {
            Some(code)
        } else {
            None
        },
    })
}

/// Guest interruptibility-state bits.
pub mod interruptibility {
    pub const STI: u32 = 1 << 0;
    pub const MOV_SS: u32 = 1 << 1;
}

/// Whether a maskable interrupt can be injected now: RFLAGS.IF set, no
/// STI or MOV-SS shadow, and no event already set up for injection.
pub const fn can_take_interrupt(rflags: u64, interruptibility: u32, entry_info: u32) -> bool {
    rflags & (1 << 9) != 0
        && interruptibility & (interruptibility::STI | interruptibility::MOV_SS) == 0
        && entry_info & intr_info::VALID == 0
}

/// One entry of a VM-entry MSR-load, VM-exit MSR-store or VM-exit
/// MSR-load list (SDM "VM-Entry Controls for MSRs"): 16 bytes, the list
/// 16-byte aligned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct MsrEntry {
    pub index: u32,
    pub reserved: u32,
    pub value: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(all: &[u32], width: Width, class: Class) {
        for &e in all {
            assert_eq!(decode(e), (width, class), "encoding {e:#06x}");
            // Bit 0 (high access) is never set in a full encoding; bit 12
            // and bits 15-31 are reserved zero.
            assert_eq!(e & 1, 0, "{e:#06x}");
            assert_eq!(e & (1 << 12), 0, "{e:#06x}");
            assert_eq!(e >> 15, 0, "{e:#06x}");
        }
    }

    macro_rules! check_enum {
        ($t:ty) => {
            check(
                &<$t>::ALL.iter().map(|f| f.encoding()).collect::<Vec<_>>(),
                <$t>::WIDTH,
                <$t>::CLASS,
            )
        };
    }

    #[test]
    fn every_encoding_matches_its_width_and_class() {
        check_enum!(Control16);
        check_enum!(Guest16);
        check_enum!(Host16);
        check_enum!(Control64);
        check_enum!(ReadOnly64);
        check_enum!(Guest64);
        check_enum!(Host64);
        check_enum!(Control32);
        check_enum!(ReadOnly32);
        check_enum!(Guest32);
        check_enum!(Host32);
        check_enum!(ControlN);
        check_enum!(ReadOnlyN);
        check_enum!(GuestN);
        check_enum!(HostN);
    }

    #[test]
    fn io_qualification_decodes() {
        // out dx, al to 0xe9
        let q = IoQualification::decode(0xe9 << 16).unwrap();
        assert_eq!(
            q,
            IoQualification {
                port: 0xe9,
                input: false,
                string: false,
                rep: false,
                size: 1
            }
        );
        // in eax, dx from 0xcfc
        let q = IoQualification::decode((0xcfc << 16) | (1 << 3) | 3).unwrap();
        assert_eq!(q.size, 4);
        assert!(q.input);
        assert_eq!(IoQualification::decode(2), None);
    }
    #[test]
    fn cr_access_decodes() {
        // mov cr0, rax: CR 0, type 0, GPR 0.
        assert_eq!(CrAccess::decode(0), CrAccess::MovTo { cr: 0, gpr: 0 });
        // mov cr4, r13.
        assert_eq!(
            CrAccess::decode(4 | (13 << 8)),
            CrAccess::MovTo { cr: 4, gpr: 13 }
        );
        // mov rbx, cr3.
        assert_eq!(
            CrAccess::decode(3 | (1 << 4) | (3 << 8)),
            CrAccess::MovFrom { cr: 3, gpr: 3 }
        );
        assert_eq!(CrAccess::decode(2 << 4), CrAccess::Clts);
        assert_eq!(
            CrAccess::decode((3 << 4) | (0x0011 << 16)),
            CrAccess::Lmsw { source: 0x11 }
        );
    }

    #[test]
    fn cr_shadow_merge_shows_the_guest_its_own_value() {
        // PVH start: the guest has CR0 = PE|ET; VMX wants NE (and, without
        // unrestricted guest, PG); with unrestricted guest PE/PG may be 0.
        let guest = 0x11;
        let must1 = 1 << 5; // NE
        let may1 = 0xffff_ffff;
        let real = cr_real(guest, must1, may1);
        assert_eq!(real, 0x31);
        let owned = (1 << 31) | 1 | (1 << 29) | (1 << 30);
        let mask = cr_mask(owned, must1, may1);
        assert_eq!(cr_guest_view(real, guest, mask), guest);
        // Bits above 31 cannot be 1: owned, so a write setting one exits.
        assert_eq!(mask >> 32, 0xffff_ffff);
        // An unowned bit (WP) comes from the real register.
        let real_wp = real | (1 << 16);
        assert_eq!(cr_guest_view(real_wp, guest, mask), guest | (1 << 16));
        // CR4: VMXE is real but not the guest's.
        let cr4_guest = 1 << 5; // PAE
        let vmxe = 1 << 13;
        let real4 = cr_real(cr4_guest, vmxe, 0x3f_ffff);
        assert_eq!(real4, cr4_guest | vmxe);
        let mask4 = cr_mask(vmxe | (1 << 18), vmxe, 0x3f_ffff);
        assert_eq!(cr_guest_view(real4, cr4_guest, mask4), cr4_guest);
        // A bit the CPU cannot have stays the guest's in the view.
        assert_eq!(cr_real(1 << 40, 0, 0x3f_ffff), 0);
        assert_eq!(cr_guest_view(0, 1 << 40, mask4), 1 << 40);
    }

    #[test]
    fn lma_follows_lme_and_pg() {
        let lme = 1 << 8;
        let lma = 1 << 10;
        let pg = 1 << 31;
        assert_eq!(efer_with_lma(lme, pg | 1), lme | lma);
        assert_eq!(efer_with_lma(lme | lma, 1), lme);
        assert_eq!(efer_with_lma(0, pg | 1), 0);
        assert_eq!(efer_with_lma(lma | 1, pg), 1);
    }

    #[test]
    fn events_encode_as_interruption_information() {
        use crate::hvm::PendingEvent;
        // #GP(0): hardware exception 13 with an error code.
        let gp = PendingEvent {
            vector: 13,
            kind: 3,
            error_code: Some(0),
        };
        assert_eq!(event_to_info(&gp), (0x8000_0b0d, 0));
        // External interrupt 0xec, no error code.
        let irq = PendingEvent {
            vector: 0xec,
            kind: 0,
            error_code: None,
        };
        assert_eq!(event_to_info(&irq), (0x8000_00ec, 0));
        // #PF with error code 2.
        let pf = PendingEvent {
            vector: 14,
            kind: 3,
            error_code: Some(2),
        };
        let (info, code) = event_to_info(&pf);
        assert_eq!(event_from_info(info, code), Some(pf));
        assert_eq!(event_from_info(event_to_info(&irq).0, 0), Some(irq));
        // NMI-unblocked bit and reserved bits are not part of the event.
        assert_eq!(event_from_info(info | (1 << 12), code), Some(pf));
        assert_eq!(event_from_info(0x0000_0b0d, 7), None);
        assert!(intr_info::needs_length(4) && intr_info::needs_length(6));
        assert!(!intr_info::needs_length(3) && !intr_info::needs_length(0));
    }

    #[test]
    fn interrupts_wait_for_if_shadows_and_pending_injection() {
        let if_ = 1 << 9;
        assert!(can_take_interrupt(if_ | 2, 0, 0));
        assert!(!can_take_interrupt(2, 0, 0));
        assert!(!can_take_interrupt(if_, interruptibility::STI, 0));
        assert!(!can_take_interrupt(if_, interruptibility::MOV_SS, 0));
        // Blocking by NMI (bit 3) does not block an interrupt.
        assert!(can_take_interrupt(if_, 1 << 3, 0));
        assert!(!can_take_interrupt(if_, 0, intr_info::VALID | 0x20));
    }

    #[test]
    fn msr_entries_are_16_bytes() {
        assert_eq!(core::mem::size_of::<MsrEntry>(), 16);
        assert_eq!(core::mem::align_of::<MsrEntry>(), 16);
    }
}
