//! The AMD SVM virtual machine control block (AMD64 APM vol. 2, appendix B).
//!
//! One 4 KiB page: a 1 KiB control area followed by the state-save area at
//! offset 0x400. Every architectural field has a name; reserved space is
//! explicit padding. The layout is checked at compile time, field by field.

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// A segment register in the state-save area.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VmcbSegment {
    pub selector: u16,
    /// Attribute bits in SVM's compressed form: type, S, DPL, P (bits 0-7),
    /// AVL, L, D/B, G (bits 8-11).
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

impl VmcbSegment {
    /// Convert VMX-style access rights (type.. P in bits 0-7, AVL..G in bits
    /// 12-15) or the descriptor's attribute word into SVM's compressed form.
    pub const fn attrib_from_access_rights(ar: u32) -> u16 {
        ((ar & 0xff) | ((ar >> 4) & 0xf00)) as u16
    }
}

/// Intercept bits of the third intercept word (offset 0x00C).
pub mod intercept3 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const SMI: u32 = 1 << 2;
    pub const INIT: u32 = 1 << 3;
    pub const VINTR: u32 = 1 << 4;
    pub const RDTSC: u32 = 1 << 14;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const PAUSE: u32 = 1 << 23;
    pub const HLT: u32 = 1 << 24;
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept bits of the fourth intercept word (offset 0x010).
pub mod intercept4 {
    /// VMRUN must always be intercepted (VMRUN fails otherwise).
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const RDTSCP: u32 = 1 << 7;
    pub const ICEBP: u32 = 1 << 8;
    pub const WBINVD: u32 = 1 << 9;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const XSETBV: u32 = 1 << 13;
}

/// EXITCODE values (APM vol. 2, appendix C).
pub mod exitcode {
    pub const EXCP_BASE: u64 = 0x40;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const VINTR: u64 = 0x64;
    /// MOV to CR4 (CR writes are 0x10 + the register number).
    pub const CR4_WRITE: u64 = 0x14;
    pub const RDTSC: u64 = 0x6e;
    pub const CPUID: u64 = 0x72;
    pub const HLT: u64 = 0x78;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const NPF: u64 = 0x400;
    /// The VMCB's guest state was invalid: VMRUN did not enter the guest.
    pub const INVALID: u64 = u64::MAX;
}

/// TLB_CONTROL values (offset 0x05C).
pub mod tlb_control {
    pub const DO_NOTHING: u8 = 0;
    /// Flush the whole TLB on VMRUN; the only flush TCG offers.
    pub const FLUSH_ALL: u8 = 1;
    /// Flush this guest's ASID (needs the flush-by-ASID feature).
    pub const FLUSH_ASID: u8 = 3;
}

/// The control area, offsets 0x000-0x3FF.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VmcbControl {
    pub intercept_cr_read: u16,
    pub intercept_cr_write: u16,
    pub intercept_dr_read: u16,
    pub intercept_dr_write: u16,
    pub intercept_exceptions: u32,
    pub intercept3: u32,
    pub intercept4: u32,
    pub intercept5: u32,
    pub _reserved0: [u8; 0x24],
    pub pause_filter_threshold: u16,
    pub pause_filter_count: u16,
    pub iopm_base_pa: u64,
    pub msrpm_base_pa: u64,
    pub tsc_offset: u64,
    pub guest_asid: u32,
    pub tlb_control: u8,
    pub _reserved1: [u8; 3],
    /// V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, V_INTR_VECTOR.
    pub vintr: u64,
    /// Bit 0: the guest is in an interrupt shadow; bit 1: guest interrupt mask.
    pub interrupt_shadow: u64,
    pub exitcode: u64,
    pub exitinfo1: u64,
    pub exitinfo2: u64,
    pub exitintinfo: u64,
    /// Bit 0: nested paging enable.
    pub np_enable: u64,
    pub avic_apic_bar: u64,
    pub ghcb_pa: u64,
    pub eventinj: u64,
    pub n_cr3: u64,
    /// Bit 0: LBR virtualization; bit 1: virtual VMSAVE/VMLOAD.
    pub virt_ext: u64,
    pub vmcb_clean: u32,
    pub _reserved2: u32,
    /// Next sequential RIP (only with the NRIP-save feature).
    pub nrip: u64,
    pub guest_insn_len: u8,
    pub guest_insn_bytes: [u8; 15],
    pub avic_backing_page: u64,
    pub _reserved3: u64,
    pub avic_logical_table: u64,
    pub avic_physical_table: u64,
    pub _reserved4: u64,
    pub vmsa_pa: u64,
    pub _reserved5: [u8; 0x2f0],
}

/// The state-save area, offsets 0x400-0xFFF of the VMCB.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VmcbSave {
    pub es: VmcbSegment,
    pub cs: VmcbSegment,
    pub ss: VmcbSegment,
    pub ds: VmcbSegment,
    pub fs: VmcbSegment,
    pub gs: VmcbSegment,
    pub gdtr: VmcbSegment,
    pub ldtr: VmcbSegment,
    pub idtr: VmcbSegment,
    pub tr: VmcbSegment,
    pub _reserved0: [u8; 0x2b],
    pub cpl: u8,
    pub _reserved1: u32,
    pub efer: u64,
    pub _reserved2: [u8; 0x70],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    pub _reserved3: [u8; 0x58],
    pub rsp: u64,
    pub s_cet: u64,
    pub ssp: u64,
    pub isst_addr: u64,
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    pub _reserved4: [u8; 0x20],
    pub g_pat: u64,
    pub dbgctl: u64,
    pub br_from: u64,
    pub br_to: u64,
    pub last_excp_from: u64,
    pub last_excp_to: u64,
    pub _reserved5: [u8; 0x968],
}

/// A whole VMCB: one page, 4 KiB aligned.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Vmcb {
    pub control: VmcbControl,
    pub save: VmcbSave,
}

impl Vmcb {
    /// An all-zero VMCB.
    pub fn zeroed() -> Self {
        FromZeros::new_zeroed()
    }
}

macro_rules! assert_offsets {
    ($t:ty { $($f:ident = $o:expr),* $(,)? }) => {
        $(const _: () = assert!(core::mem::offset_of!($t, $f) == $o);)*
    };
}

const _: () = assert!(core::mem::size_of::<VmcbSegment>() == 16);
const _: () = assert!(core::mem::size_of::<VmcbControl>() == 0x400);
const _: () = assert!(core::mem::size_of::<VmcbSave>() == 0xc00);
const _: () = assert!(core::mem::size_of::<Vmcb>() == 4096);
const _: () = assert!(core::mem::offset_of!(Vmcb, save) == 0x400);

assert_offsets!(VmcbControl {
    intercept_cr_read = 0x000,
    intercept_cr_write = 0x002,
    intercept_dr_read = 0x004,
    intercept_dr_write = 0x006,
    intercept_exceptions = 0x008,
    intercept3 = 0x00c,
    intercept4 = 0x010,
    intercept5 = 0x014,
    pause_filter_threshold = 0x03c,
    pause_filter_count = 0x03e,
    iopm_base_pa = 0x040,
    msrpm_base_pa = 0x048,
    tsc_offset = 0x050,
    guest_asid = 0x058,
    tlb_control = 0x05c,
    vintr = 0x060,
    interrupt_shadow = 0x068,
    exitcode = 0x070,
    exitinfo1 = 0x078,
    exitinfo2 = 0x080,
    exitintinfo = 0x088,
    np_enable = 0x090,
    avic_apic_bar = 0x098,
    ghcb_pa = 0x0a0,
    eventinj = 0x0a8,
    n_cr3 = 0x0b0,
    virt_ext = 0x0b8,
    vmcb_clean = 0x0c0,
    nrip = 0x0c8,
    guest_insn_len = 0x0d0,
    guest_insn_bytes = 0x0d1,
    avic_backing_page = 0x0e0,
    avic_logical_table = 0x0f0,
    avic_physical_table = 0x0f8,
    vmsa_pa = 0x108,
});

assert_offsets!(VmcbSave {
    es = 0x000,
    cs = 0x010,
    ss = 0x020,
    ds = 0x030,
    fs = 0x040,
    gs = 0x050,
    gdtr = 0x060,
    ldtr = 0x070,
    idtr = 0x080,
    tr = 0x090,
    cpl = 0x0cb,
    efer = 0x0d0,
    cr4 = 0x148,
    cr3 = 0x150,
    cr0 = 0x158,
    dr7 = 0x160,
    dr6 = 0x168,
    rflags = 0x170,
    rip = 0x178,
    rsp = 0x1d8,
    s_cet = 0x1e0,
    ssp = 0x1e8,
    isst_addr = 0x1f0,
    rax = 0x1f8,
    star = 0x200,
    lstar = 0x208,
    cstar = 0x210,
    sfmask = 0x218,
    kernel_gs_base = 0x220,
    sysenter_cs = 0x228,
    sysenter_esp = 0x230,
    sysenter_eip = 0x238,
    cr2 = 0x240,
    g_pat = 0x268,
    dbgctl = 0x270,
    br_from = 0x278,
    br_to = 0x280,
    last_excp_from = 0x288,
    last_excp_to = 0x290,
});

/// I/O intercept information in EXITINFO1 of an IOIO exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExitInfo {
    pub port: u16,
    /// true for IN, false for OUT.
    pub input: bool,
    pub string: bool,
    pub rep: bool,
    /// Operand size in bytes (1, 2 or 4).
    pub size: u8,
}

impl IoExitInfo {
    /// Decode EXITINFO1 (APM vol. 2, "IOIO intercept"). Returns `None` when
    /// no operand size bit is set, or more than one is.
    pub fn decode(info1: u64) -> Option<Self> {
        let size = match (info1 >> 4) & 0x7 {
            0b001 => 1,
            0b010 => 2,
            0b100 => 4,
            _ => return None,
        };
        Some(Self {
            port: (info1 >> 16) as u16,
            input: info1 & 1 != 0,
            string: info1 & (1 << 2) != 0,
            rep: info1 & (1 << 3) != 0,
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_vmcb_is_one_aligned_page() {
        let v = Vmcb::zeroed();
        assert_eq!(v.as_bytes().len(), 4096);
        assert!(v.as_bytes().iter().all(|&b| b == 0));
        assert_eq!(core::mem::align_of::<Vmcb>(), 4096);
    }

    #[test]
    fn fields_land_at_their_byte_offsets() {
        let mut v = Vmcb::zeroed();
        v.control.exitcode = 0x0123_4567_89ab_cdef;
        v.save.rip = 0x1122_3344_5566_7788;
        v.save.cpl = 3;
        let b = v.as_bytes();
        assert_eq!(&b[0x70..0x78], &0x0123_4567_89ab_cdefu64.to_le_bytes());
        assert_eq!(
            &b[0x400 + 0x178..0x400 + 0x180],
            &0x1122_3344_5566_7788u64.to_le_bytes()
        );
        assert_eq!(b[0x400 + 0xcb], 3);
    }

    #[test]
    fn access_rights_compress() {
        // 64-bit code: type 0xb, S, P, L, G -> VMX AR 0xa09b -> SVM 0xa9b.
        assert_eq!(VmcbSegment::attrib_from_access_rights(0xa09b), 0x0a9b);
        // Flat data, D/B and G: 0xc093 -> 0xc93.
        assert_eq!(VmcbSegment::attrib_from_access_rights(0xc093), 0x0c93);
    }

    #[test]
    fn io_exit_info_decodes() {
        // OUT dx, al to port 0xe9: size 1, not string.
        let out = IoExitInfo::decode((0xe9 << 16) | (1 << 4)).unwrap();
        assert_eq!(
            out,
            IoExitInfo {
                port: 0xe9,
                input: false,
                string: false,
                rep: false,
                size: 1
            }
        );
        // REP INSW from 0x1f0.
        let ins = IoExitInfo::decode((0x1f0 << 16) | (1 << 5) | (1 << 3) | (1 << 2) | 1).unwrap();
        assert_eq!(
            ins,
            IoExitInfo {
                port: 0x1f0,
                input: true,
                string: true,
                rep: true,
                size: 2
            }
        );
        assert_eq!(IoExitInfo::decode(0xe9 << 16), None);
        assert_eq!(IoExitInfo::decode((0xe9 << 16) | (0b011 << 4)), None);
    }
}
