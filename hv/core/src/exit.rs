//! The vendor-neutral VM exit: what both backends hand to the one dispatch.
//!
//! A backend decodes its exit (VMCS exit reason and qualification, or VMCB
//! EXITCODE and EXITINFO) into [`VmExit`], including the guest's RIP and the
//! RIP of the next instruction where the exit was caused by one. The dispatch
//! decides what to do and answers with an [`Action`]; RIP is advanced in one
//! place, by the backend, from that answer.

use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;
use x86_64::structures::paging::PageTableFlags;

use crate::paging::NestedFault;

/// A port I/O access by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// IN (true) or OUT (false).
    pub input: bool,
    /// Operand size in bytes: 1, 2 or 4.
    pub size: u8,
    /// INS/OUTS.
    pub string: bool,
    pub rep: bool,
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A guest access the nested page tables refused.
    NestedPageFault(NestedFault),
    /// The nested tables held a malformed entry (EPT misconfiguration).
    NestedMisconfig {
        gpa: u64,
    },
    /// IN/OUT to an intercepted port.
    Io(IoAccess),
    /// VMCALL / VMMCALL.
    Hypercall,
    Cpuid,
    Hlt,
    /// The page-modification log is full (Intel PML).
    PmlFull,
    /// The epoch timer fired (VMX-preemption timer, or an intercepted host
    /// interrupt).
    Timer,
    /// A host interrupt arrived while the guest ran.
    ExternalInterrupt,
    /// Triple fault (VMX) or shutdown (SVM): the guest is dead.
    Shutdown,
    /// An intercepted exception.
    Exception {
        vector: u8,
        error_code: Option<u32>,
    },
    /// VM entry failed: the guest state was invalid (VMX exit reason with
    /// bit 31, or SVM EXITCODE -1).
    EntryFailed {
        code: u64,
    },
    /// A virtualization instruction (SVM's or VMX's) or another
    /// instruction that reaches host state (XSETBV, INVLPGA): always
    /// refused, never run on the guest's behalf.
    Privileged(Insn),
    /// An intercepted RDMSR (`write` false) or WRMSR of `msr`; `value` is
    /// EDX:EAX for a write.
    Msr {
        msr: u32,
        write: bool,
        value: u64,
    },
    /// The guest can take a maskable interrupt now (it asked for an
    /// interrupt window: SVM's VINTR intercept, VMX interrupt-window
    /// exiting).
    InterruptWindow,
    /// A write of control register `cr` (0, 3, 4 or 8) from general
    /// register `gpr` (0 = RAX .. 15 = R15, the ModRM order), or `None`
    /// when the backend does not report it (SVM without decode assists:
    /// the dispatch decodes the instruction's bytes).
    CrWrite {
        cr: u8,
        gpr: Option<u8>,
    },
    /// Anything else, with the vendor's raw reason and details.
    Unknown {
        code: u64,
        info1: u64,
        info2: u64,
    },
}

/// Instructions a guest must never get to run: each exits and is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    Vmrun,
    Vmload,
    Vmsave,
    Stgi,
    Clgi,
    Skinit,
    Invlpga,
    Xsetbv,
    Vmxon,
    Vmclear,
    Vmptrld,
    Vmptrst,
    Vmread,
    Vmwrite,
    Vmlaunch,
    Vmresume,
    Vmxoff,
    Invept,
    Invvpid,
    Vmfunc,
    Getsec,
}

impl Insn {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmrun => "VMRUN",
            Self::Vmload => "VMLOAD",
            Self::Vmsave => "VMSAVE",
            Self::Stgi => "STGI",
            Self::Clgi => "CLGI",
            Self::Skinit => "SKINIT",
            Self::Invlpga => "INVLPGA",
            Self::Xsetbv => "XSETBV",
            Self::Vmxon => "VMXON",
            Self::Vmclear => "VMCLEAR",
            Self::Vmptrld => "VMPTRLD",
            Self::Vmptrst => "VMPTRST",
            Self::Vmread => "VMREAD",
            Self::Vmwrite => "VMWRITE",
            Self::Vmlaunch => "VMLAUNCH",
            Self::Vmresume => "VMRESUME",
            Self::Vmxoff => "VMXOFF",
            Self::Invept => "INVEPT",
            Self::Invvpid => "INVVPID",
            Self::Vmfunc => "VMFUNC",
            Self::Getsec => "GETSEC",
        }
    }

    /// The refused instruction an SVM EXITCODE names (AMD APM vol. 2,
    /// appendix C), or `None` for any other code. (CR4 writes, 0x14, are
    /// intercepted too, but as [`ExitKind::CrWrite`]: the platform checks
    /// the value; CR4.OSXSAVE is refused because QEMU's TCG does not
    /// implement the XSETBV intercept.)
    pub fn from_svm_exitcode(code: u64) -> Option<Self> {
        Some(match code {
            0x7a => Self::Invlpga,
            0x80 => Self::Vmrun,
            0x82 => Self::Vmload,
            0x83 => Self::Vmsave,
            0x84 => Self::Stgi,
            0x85 => Self::Clgi,
            0x86 => Self::Skinit,
            0x8d => Self::Xsetbv,
            _ => return None,
        })
    }

    /// The refused instruction a VMX basic exit reason names (Intel SDM
    /// vol. 3D, appendix C), or `None` for any other reason. The VMX
    /// instructions, INVEPT, INVVPID, GETSEC and XSETBV exit unconditionally
    /// in VMX non-root operation; VMFUNC exits when its function is
    /// disabled (with VM functions off it is #UD in the guest).
    pub fn from_vmx_reason(reason: u16) -> Option<Self> {
        Some(match reason {
            11 => Self::Getsec,
            19 => Self::Vmclear,
            20 => Self::Vmlaunch,
            21 => Self::Vmptrld,
            22 => Self::Vmptrst,
            23 => Self::Vmread,
            24 => Self::Vmresume,
            25 => Self::Vmwrite,
            26 => Self::Vmxoff,
            27 => Self::Vmxon,
            50 => Self::Invept,
            53 => Self::Invvpid,
            55 => Self::Xsetbv,
            59 => Self::Vmfunc,
            _ => return None,
        })
    }
}

/// An exit with where it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmExit {
    pub kind: ExitKind,
    /// Guest RIP of the instruction that caused the exit (or was about to
    /// run, for asynchronous exits).
    pub rip: u64,
    /// RIP after the exiting instruction, when the exit was caused by one
    /// that completes by being skipped (CPUID, hypercalls, I/O, HLT).
    pub next_rip: Option<u64>,
}

/// What the dispatch wants done before the guest runs again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Resume at the same RIP (the access is retried, e.g. after restoring
    /// write access, or an exception injected for a refusal is delivered
    /// there).
    Retry,
    /// The instruction is done: resume at `next_rip`.
    Skip,
    /// Stop running this guest; the run's outcome is decided by the caller.
    Stop,
}

/// Where the guest resumes for `action`, or `None` when it must stop (or an
/// instruction the dispatch wants skipped has no known length: reported as
/// a stop rather than a guess). A backend that cannot report the length
/// (SVM without NRIP save) leaves `next_rip` empty; the run loop may fill
/// it only from the instruction's bytes ([`exact_length`]).
pub fn resume_rip(exit: &VmExit, action: Action) -> Option<u64> {
    match action {
        Action::Retry => Some(exit.rip),
        Action::Skip => exit.next_rip,
        Action::Stop => None,
    }
}

/// The one encoding each skipped-by-length exit is accepted in: CPUID
/// (`0F A2`), VMMCALL (`0F 01 D9`) or VMCALL (`0F 01 C1`), HLT (`F4`),
/// RDMSR (`0F 32`), WRMSR (`0F 30`).
/// No prefixes: a prefixed form is legal but rare, and is reported as
/// unknown (a stop) rather than skipped by a wrong length.
fn encoding(kind: &ExitKind) -> &'static [&'static [u8]] {
    match kind {
        ExitKind::Cpuid => &[&[0x0f, 0xa2]],
        ExitKind::Hypercall => &[&[0x0f, 0x01, 0xd9], &[0x0f, 0x01, 0xc1]],
        ExitKind::Hlt => &[&[0xf4]],
        ExitKind::Msr { write: false, .. } => &[&[0x0f, 0x32]],
        ExitKind::Msr { write: true, .. } => &[&[0x0f, 0x30]],
        _ => &[],
    }
}

/// Longest encoding [`exact_length`] looks at.
pub const MAX_EXACT_LEN: usize = 3;

/// The length of the instruction that caused `kind`, from the bytes at its
/// RIP (`bytes`, up to [`MAX_EXACT_LEN`]; fewer when the rest was not
/// readable): `Some` only when they start with that instruction's one
/// accepted encoding.
pub fn exact_length(kind: &ExitKind, bytes: &[u8]) -> Option<u64> {
    encoding(kind)
        .iter()
        .find(|enc| bytes.starts_with(enc))
        .map(|enc| enc.len() as u64)
}

/// The paging state [`translate_code`] needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodePaging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// CS.L: the guest runs 64-bit code (CS base 0, no limit).
    pub cs_long: bool,
}

const CR0_PG: u64 = Cr0Flags::PAGING.bits();
const CR4_PAE: u64 = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits();
const CR4_LA57: u64 = Cr4Flags::L5_PAGING.bits();
const EFER_LMA: u64 = EferFlags::LONG_MODE_ACTIVE.bits();
const PTE_P: u64 = PageTableFlags::PRESENT.bits();
const PTE_PS: u64 = PageTableFlags::HUGE_PAGE.bits();
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The guest-physical address of the code byte at `rip`, through the
/// guest's own 4-level page tables; `read` loads the little-endian `u64`
/// at a guest-physical address (`None` outside guest RAM). `None` when the
/// guest is not in 64-bit mode with 4-level paging, or the walk hits a
/// non-present entry or leaves guest RAM: the caller then does not know
/// the bytes, and must not guess.
pub fn translate_code(
    p: &CodePaging,
    rip: u64,
    mut read: impl FnMut(u64) -> Option<u64>,
) -> Option<u64> {
    let long = p.cr0 & CR0_PG != 0 && p.cr4 & CR4_PAE != 0 && p.efer & EFER_LMA != 0;
    if !long || !p.cs_long || p.cr4 & CR4_LA57 != 0 {
        return None;
    }
    let mut table = p.cr3 & ADDR_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (rip >> shift) & 511;
        let entry = read(table + index * 8)?;
        if entry & PTE_P == 0 {
            return None;
        }
        // A large page at the PDPT (1 GiB) or PD (2 MiB) level.
        if level > 0 && entry & PTE_PS != 0 {
            if level == 3 {
                return None;
            }
            let size = 1u64 << shift;
            return Some((entry & ADDR_MASK & !(size - 1)) | (rip & (size - 1)));
        }
        table = entry & ADDR_MASK;
    }
    Some(table | (rip & 0xfff))
}

/// The first [`MAX_EXACT_LEN`] bytes of the code at `rip` (fewer when the
/// rest is not readable), for [`exact_length`]: one [`translate_code`] walk
/// per code page touched (`read` as there), `byte` loads one byte at a
/// guest-physical address (`None` outside guest RAM).
pub fn read_code(
    p: &CodePaging,
    rip: u64,
    read: impl FnMut(u64) -> Option<u64>,
    byte: impl FnMut(u64) -> Option<u8>,
) -> ([u8; MAX_EXACT_LEN], usize) {
    let mut bytes = [0u8; MAX_EXACT_LEN];
    let n = read_code_into(p, rip, read, byte, &mut bytes);
    (bytes, n)
}

/// Fill `out` with the code at `rip` as [`read_code`] does (one walk per
/// code page touched); returns how many bytes were readable. With paging
/// off (CR0.PG clear) the code address is the guest-physical one (a flat
/// code segment, as at Linux's PVH entry).
pub fn read_code_into(
    p: &CodePaging,
    rip: u64,
    mut read: impl FnMut(u64) -> Option<u64>,
    mut byte: impl FnMut(u64) -> Option<u8>,
    out: &mut [u8],
) -> usize {
    let paged = p.cr0 & CR0_PG != 0;
    let mut gpa = None;
    for (i, b) in out.iter_mut().enumerate() {
        let at = rip.wrapping_add(i as u64);
        // The next byte of the same page is the next guest-physical byte.
        gpa = if !paged {
            Some(at & 0xffff_ffff)
        } else if i == 0 || at.is_multiple_of(4096) {
            translate_code(p, at, &mut read)
        } else {
            gpa.map(|g: u64| g + 1)
        };
        match gpa.and_then(&mut byte) {
            Some(v) => *b = v,
            None => return i,
        }
    }
    out.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn only_the_exact_encoding_has_a_length() {
        assert_eq!(exact_length(&ExitKind::Cpuid, &[0x0f, 0xa2, 0x90]), Some(2));
        assert_eq!(exact_length(&ExitKind::Hlt, &[0xf4]), Some(1));
        assert_eq!(
            exact_length(&ExitKind::Hypercall, &[0x0f, 0x01, 0xd9]),
            Some(3)
        );
        assert_eq!(
            exact_length(&ExitKind::Hypercall, &[0x0f, 0x01, 0xc1]),
            Some(3)
        );
        // A prefixed CPUID is 3 bytes; the fixed guess rip+2 would land
        // inside it. Unknown instead.
        assert_eq!(exact_length(&ExitKind::Cpuid, &[0x66, 0x0f, 0xa2]), None);
        assert_eq!(exact_length(&ExitKind::Cpuid, &[0x0f]), None, "cut short");
        assert_eq!(exact_length(&ExitKind::Hlt, &[0x0f, 0xa2]), None);
        assert_eq!(
            exact_length(&ExitKind::Hypercall, &[0x0f, 0x01, 0xd8]),
            None
        );
        assert_eq!(exact_length(&ExitKind::Timer, &[0xf4]), None);
        assert_eq!(exact_length(&ExitKind::Shutdown, &[]), None);
    }

    fn paging(cr3: u64) -> CodePaging {
        CodePaging {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            cs_long: true,
        }
    }

    #[test]
    fn walks_4k_2m_and_1g_pages_and_refuses_the_rest() {
        // Tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT).
        let mut mem: BTreeMap<u64, u64> = BTreeMap::new();
        let gva_4k: u64 = 0x0000_0080_4060_3abc; // pml4 1, pdpt 1, pd 3, pt 3
        let gva_2m: u64 = 0x0000_0080_4080_0123; // pd 4
        let gva_1g: u64 = 0x0000_0080_8000_4567; // pdpt 2
        mem.insert(0x1000 + 8, 0x2000 | PTE_P);
        mem.insert(0x2000 + 8, 0x3000 | PTE_P);
        mem.insert(0x2000 + 16, 0x4000_0000 | PTE_P | PTE_PS);
        mem.insert(0x3000 + 3 * 8, 0x4000 | PTE_P);
        mem.insert(0x3000 + 4 * 8, 0x0060_0000 | PTE_P | PTE_PS);
        mem.insert(0x4000 + 3 * 8, 0x0000_9000 | PTE_P | (1 << 63));
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        let p = paging(0x1000);
        assert_eq!(translate_code(&p, gva_4k, read), Some(0x9abc));
        assert_eq!(translate_code(&p, gva_2m, read), Some(0x0060_0123));
        assert_eq!(translate_code(&p, gva_1g, read), Some(0x4000_4567));
        // Not present (the entry after the mapped one), or outside RAM.
        assert_eq!(translate_code(&p, gva_4k + 0x1000, read), None);
        assert_eq!(translate_code(&p, gva_4k, |_| None), None);
        // Not 64-bit code, not long mode, 5-level paging.
        for q in [
            CodePaging {
                cs_long: false,
                ..p
            },
            CodePaging { efer: 0, ..p },
            CodePaging { cr0: 1, ..p },
            CodePaging {
                cr4: CR4_PAE | CR4_LA57,
                ..p
            },
        ] {
            assert_eq!(translate_code(&q, gva_4k, read), None);
        }
    }

    #[test]
    fn code_bytes_take_one_walk_per_page() {
        // gva page 0x7000 -> gpa 0x9000, gva page 0x8000 -> gpa 0x5000 (not
        // contiguous), gva page 0x9000 unmapped. PML4 0x1000, PDPT 0x2000,
        // PD 0x3000, PT 0x4000.
        let mut mem: BTreeMap<u64, u64> = BTreeMap::new();
        mem.insert(0x1000, 0x2000 | PTE_P);
        mem.insert(0x2000, 0x3000 | PTE_P);
        mem.insert(0x3000, 0x4000 | PTE_P);
        mem.insert(0x4000 + 7 * 8, 0x9000 | PTE_P);
        mem.insert(0x4000 + 8 * 8, 0x5000 | PTE_P);
        let code = |g: u64| -> Option<u8> {
            match g {
                0x9ffe => Some(0x0f),
                0x9fff => Some(0x01),
                0x5000 => Some(0xd9),
                0x5001 => Some(0xf4),
                0x9100..=0x9102 => Some([0x0f, 0xa2, 0x90][(g - 0x9100) as usize]),
                0x5fff => Some(0x0f),
                _ => None,
            }
        };
        let p = paging(0x1000);
        let walks = core::cell::Cell::new(0);
        let read = |a: u64| {
            walks.set(walks.get() + 1);
            mem.get(&a).copied().or(Some(0))
        };
        // Inside one page: one walk (4 entries read), three bytes.
        assert_eq!(read_code(&p, 0x7100, read, code), ([0x0f, 0xa2, 0x90], 3));
        assert_eq!(walks.get(), 4);
        // Across a page boundary: the third byte comes from the other
        // page's frame, found by a second walk.
        walks.set(0);
        let (b, n) = read_code(&p, 0x7ffe, read, code);
        assert_eq!((b, n), ([0x0f, 0x01, 0xd9], 3));
        assert_eq!(exact_length(&ExitKind::Hypercall, &b[..n]), Some(3));
        assert_eq!(walks.get(), 8);
        // The next page is not mapped: the bytes stop there.
        let (b, n) = read_code(&p, 0x8fff, read, code);
        assert_eq!((b[0], n), (0x0f, 1));
        assert_eq!(exact_length(&ExitKind::Cpuid, &b[..n]), None);
        // A byte outside guest RAM stops them too.
        assert_eq!(read_code(&p, 0x7000, read, code).1, 0);
    }

    #[test]
    fn virtualization_instructions_decode_on_both_vendors() {
        for (code, insn) in [
            (0x80, Insn::Vmrun),
            (0x82, Insn::Vmload),
            (0x83, Insn::Vmsave),
            (0x84, Insn::Stgi),
            (0x85, Insn::Clgi),
            (0x86, Insn::Skinit),
            (0x7a, Insn::Invlpga),
            (0x8d, Insn::Xsetbv),
        ] {
            assert_eq!(Insn::from_svm_exitcode(code), Some(insn), "{code:#x}");
        }
        for (reason, insn) in [
            (27, Insn::Vmxon),
            (19, Insn::Vmclear),
            (21, Insn::Vmptrld),
            (22, Insn::Vmptrst),
            (23, Insn::Vmread),
            (25, Insn::Vmwrite),
            (20, Insn::Vmlaunch),
            (24, Insn::Vmresume),
            (26, Insn::Vmxoff),
            (50, Insn::Invept),
            (53, Insn::Invvpid),
            (59, Insn::Vmfunc),
            (55, Insn::Xsetbv),
            (11, Insn::Getsec),
        ] {
            assert_eq!(Insn::from_vmx_reason(reason), Some(insn), "{reason}");
        }
        // VMMCALL/VMCALL, CPUID, MSR exits and unknown values are not
        // refused instructions, and no value panics.
        assert_eq!(Insn::from_svm_exitcode(0x81), None);
        assert_eq!(Insn::from_svm_exitcode(0x7c), None);
        assert_eq!(Insn::from_svm_exitcode(u64::MAX), None);
        assert_eq!(Insn::from_vmx_reason(18), None);
        assert_eq!(Insn::from_vmx_reason(31), None);
        assert_eq!(Insn::from_vmx_reason(u16::MAX), None);
        for c in 0..0x500u64 {
            let _ = Insn::from_svm_exitcode(c).map(Insn::name);
        }
        for r in 0..=u16::MAX {
            let _ = Insn::from_vmx_reason(r).map(Insn::name);
        }
        assert_eq!(Insn::Vmsave.name(), "VMSAVE");
    }

    #[test]
    fn rip_moves_only_by_the_action() {
        let e = VmExit {
            kind: ExitKind::Cpuid,
            rip: 0x1000,
            next_rip: Some(0x1002),
        };
        assert_eq!(resume_rip(&e, Action::Retry), Some(0x1000));
        assert_eq!(resume_rip(&e, Action::Skip), Some(0x1002));
        assert_eq!(resume_rip(&e, Action::Stop), None);
        let unknown_len = VmExit {
            next_rip: None,
            ..e
        };
        assert_eq!(resume_rip(&unknown_len, Action::Skip), None);
    }
}
