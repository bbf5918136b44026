//! The guest general-purpose registers as the kernel's VM entry stubs save
//! and restore them: a leaf type (it depends on nothing of the kernel), so
//! the stubs and the vCPU code above them share one layout without a
//! cycle between them.

use core::fmt;

use crate::exit::CodePaging;
use crate::hvm::VcpuState;

/// Guest general-purpose registers that neither the VMCS nor the VMCB holds
/// for us (RSP and RIP live there), saved and restored by the entry stub.
/// RAX is here too: on SVM the backend copies it to and from the VMCB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

// The kernel's entry stubs (`arch::instr::vmx_enter`, `svm_run`) address every
// field; their `const` operands come from `offset_of!`, and the layout is
// pinned here: 15 u64 in declaration order.
const _: () = assert!(core::mem::size_of::<GuestRegs>() == 15 * 8);
const _: () = assert!(core::mem::offset_of!(GuestRegs, rax) == 0);
const _: () = assert!(core::mem::offset_of!(GuestRegs, rbx) == 8);
const _: () = assert!(core::mem::offset_of!(GuestRegs, rcx) == 16);
const _: () = assert!(core::mem::offset_of!(GuestRegs, rdx) == 24);
const _: () = assert!(core::mem::offset_of!(GuestRegs, rsi) == 32);
const _: () = assert!(core::mem::offset_of!(GuestRegs, rdi) == 40);
const _: () = assert!(core::mem::offset_of!(GuestRegs, rbp) == 48);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r8) == 56);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r9) == 64);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r10) == 72);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r11) == 80);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r12) == 88);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r13) == 96);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r14) == 104);
const _: () = assert!(core::mem::offset_of!(GuestRegs, r15) == 112);

impl GuestRegs {
    /// The general registers of `st` the entry stub loads.
    pub fn of(st: &VcpuState) -> Self {
        Self {
            rax: st.rax,
            rbx: st.rbx,
            rcx: st.rcx,
            rdx: st.rdx,
            rsi: st.rsi,
            rdi: st.rdi,
            rbp: st.rbp,
            r8: st.r8,
            r9: st.r9,
            r10: st.r10,
            r11: st.r11,
            r12: st.r12,
            r13: st.r13,
            r14: st.r14,
            r15: st.r15,
        }
    }

    /// The register with hardware index `index` (0 = RAX, 1 = RCX, 2 = RDX,
    /// 3 = RBX, 5 = RBP, 6 = RSI, 7 = RDI, 8..=15 = R8..R15, the ModRM
    /// order); `None` for 4 (RSP is not here: it is in the VMCS/VMCB) and
    /// anything above 15.
    pub fn gpr_mut(&mut self, index: u8) -> Option<&mut u64> {
        Some(match index {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return None,
        })
    }

    /// Write these registers into `st` (RSP, RIP and the rest untouched).
    pub fn store(&self, st: &mut VcpuState) {
        st.rax = self.rax;
        st.rbx = self.rbx;
        st.rcx = self.rcx;
        st.rdx = self.rdx;
        st.rsi = self.rsi;
        st.rdi = self.rdi;
        st.rbp = self.rbp;
        st.r8 = self.r8;
        st.r9 = self.r9;
        st.r10 = self.r10;
        st.r11 = self.r11;
        st.r12 = self.r12;
        st.r13 = self.r13;
        st.r14 = self.r14;
        st.r15 = self.r15;
    }
}

/// The registers worth printing when a run fails, on one line:
/// `rip=.. rsp=.. rflags=.. cr0=.. cr3=.. cr4=.. efer=.. rax=.. .. r15=..`.
pub struct Brief<'a>(pub &'a VcpuState);

impl fmt::Display for Brief<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            s.rip, s.rsp, s.rflags, s.cr0, s.cr3, s.cr4, s.efer
        )?;
        let r = GuestRegs::of(s);
        let named = [
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rbp", r.rbp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
        ];
        for (name, v) in named {
            write!(f, " {name}={v:#x}")?;
        }
        Ok(())
    }
}

impl VcpuState {
    /// What a walk of the guest's page tables for the code at RIP needs:
    /// the control registers and EFER, and CS.L as the backend reads it.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each register lands in its own field (a swapped pair in a
    /// field-by-field copy would go unnoticed with equal values), RSP is
    /// not one of them, and `store` is the inverse of `of`.
    /// The ModRM order: RAX RCX RDX RBX (RSP) RBP RSI RDI R8..R15.
    #[test]
    fn gpr_index_follows_the_hardware_encoding() {
        let st = VcpuState {
            rax: 10,
            rcx: 11,
            rdx: 12,
            rbx: 13,
            rbp: 15,
            rsi: 16,
            rdi: 17,
            r8: 18,
            r15: 25,
            ..VcpuState::default()
        };
        let mut r = GuestRegs::of(&st);
        for (i, want) in [
            (0, 10),
            (1, 11),
            (2, 12),
            (3, 13),
            (5, 15),
            (6, 16),
            (7, 17),
            (8, 18),
            (15, 25),
        ] {
            assert_eq!(r.gpr_mut(i).map(|v| *v), Some(want), "index {i}");
        }
        assert!(r.gpr_mut(4).is_none());
        assert!(r.gpr_mut(16).is_none());
    }

    #[test]
    fn of_and_store_map_every_register_to_its_own() {
        let mut st = VcpuState {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rbp: 7,
            r8: 8,
            r9: 9,
            r10: 10,
            r11: 11,
            r12: 12,
            r13: 13,
            r14: 14,
            r15: 15,
            rsp: 99,
            ..VcpuState::default()
        };
        let r = GuestRegs::of(&st);
        let words = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15,
        ];
        assert_eq!(words, core::array::from_fn(|i| i as u64 + 1));
        let before = st.clone();
        let mut other = r;
        other.rdi = 0x66;
        other.store(&mut st);
        assert_eq!(st.rdi, 0x66);
        assert_eq!(st.rsp, 99);
        r.store(&mut st);
        assert_eq!(st, before);
    }

    /// The failure line's text, as the kernel printed it before the
    /// registers had one home.
    #[test]
    fn brief_prints_the_failure_registers_in_order() {
        let mut st = VcpuState {
            rip: 0x1000,
            rsp: 0x2000,
            rflags: 0x2,
            cr0: 0x8000_0031,
            cr3: 0x3000,
            cr4: 0x20,
            efer: 0x500,
            ..VcpuState::default()
        };
        GuestRegs {
            rax: 1,
            rdi: 0xa,
            r15: 0xf,
            ..GuestRegs::default()
        }
        .store(&mut st);
        assert_eq!(
            Brief(&st).to_string(),
            "rip=0x1000 rsp=0x2000 rflags=0x2 cr0=0x80000031 cr3=0x3000 cr4=0x20 efer=0x500 \
             rax=0x1 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rdi=0xa rbp=0x0 \
             r8=0x0 r9=0x0 r10=0x0 r11=0x0 r12=0x0 r13=0x0 r14=0x0 r15=0xf"
        );
        let p = st.code_paging(true);
        assert_eq!(
            (p.cr0, p.cr3, p.cr4, p.efer, p.cs_long),
            (0x8000_0031, 0x3000, 0x20, 0x500, true)
        );
    }
}
