//! What a guest gets when the hypervisor refuses what it tried: the one
//! answer both run loops give (the test guests' `run.rs` and the Linux
//! platform's `linux.rs`). A refusal is an exception delivered at the
//! instruction, as a CPU that lacks the feature (or rejects the value)
//! would raise it; the guest's own handler decides what happens next.
//!
//! - a refused instruction (the virtualization instructions, XSETBV,
//!   INVLPGA: [`ExitKind::Privileged`]): #UD, as on a CPU without them;
//! - a refused RDMSR or WRMSR ([`ExitKind::Msr`]): #GP(0), as for an MSR
//!   the CPU does not implement;
//! - a refused MOV to a control register ([`ExitKind::CrWrite`]): #GP(0),
//!   as for a value the CPU will not take (the instruction itself exists).

use crate::exit::ExitKind;
use crate::hvm::PendingEvent;

/// Exception vectors (SDM vol. 3A table 6-1).
pub mod vector {
    pub const UD: u8 = 6;
    pub const DF: u8 = 8;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    /// Vectors 0..=31 are the architecture's exceptions.
    pub const EXCEPTIONS: u8 = 32;
}

/// [`PendingEvent::kind`] of a hardware exception.
pub const KIND_EXCEPTION: u8 = 3;

/// #UD: invalid opcode (no error code).
pub const UNDEFINED_OPCODE: PendingEvent = PendingEvent {
    vector: vector::UD,
    kind: KIND_EXCEPTION,
    error_code: None,
};

/// #GP(0): general protection, error code 0.
pub const GENERAL_PROTECTION: PendingEvent = PendingEvent {
    vector: vector::GP,
    kind: KIND_EXCEPTION,
    error_code: Some(0),
};

/// Whether exception `vector` pushes an error code in protected and long
/// mode (#DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX).
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The exception the hypervisor injects when it refuses the exit `kind`,
/// or `None` for an exit that is not a refusal.
pub fn refusal(kind: &ExitKind) -> Option<PendingEvent> {
    match kind {
        ExitKind::Privileged(_) => Some(UNDEFINED_OPCODE),
        ExitKind::Msr { .. } | ExitKind::CrWrite { .. } => Some(GENERAL_PROTECTION),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Insn;

    #[test]
    fn refused_instructions_are_ud_and_refused_msrs_and_crs_gp0() {
        for insn in [Insn::Vmrun, Insn::Vmxon, Insn::Xsetbv, Insn::Invlpga] {
            let ev = refusal(&ExitKind::Privileged(insn)).unwrap();
            assert_eq!((ev.vector, ev.kind, ev.error_code), (6, 3, None));
        }
        for write in [false, true] {
            let ev = refusal(&ExitKind::Msr {
                msr: 0xc000_0080,
                write,
                value: 0,
            })
            .unwrap();
            assert_eq!((ev.vector, ev.kind, ev.error_code), (13, 3, Some(0)));
        }
        let ev = refusal(&ExitKind::CrWrite { cr: 4, gpr: None }).unwrap();
        assert_eq!((ev.vector, ev.error_code), (13, Some(0)));
    }

    #[test]
    fn other_exits_are_not_refusals() {
        for kind in [
            ExitKind::Hypercall,
            ExitKind::Cpuid,
            ExitKind::Hlt,
            ExitKind::Shutdown,
            ExitKind::Timer,
        ] {
            assert_eq!(refusal(&kind), None, "{kind:?}");
        }
    }

    #[test]
    fn error_codes_follow_the_architecture() {
        let with: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
        for v in 0..vector::EXCEPTIONS {
            assert_eq!(has_error_code(v), with.contains(&v), "vector {v}");
        }
    }
}
