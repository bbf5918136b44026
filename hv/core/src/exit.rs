//! The vendor-neutral VM exit: what both backends hand to the one dispatch.
//!
//! A backend decodes its exit (VMCS exit reason and qualification, or VMCB
//! EXITCODE and EXITINFO) into [`VmExit`], including the guest's RIP and the
//! RIP of the next instruction where the exit was caused by one. The dispatch
//! decides what to do and answers with an [`Action`]; RIP is advanced in one
//! place, by the backend, from that answer.

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
    /// Anything else, with the vendor's raw reason and details.
    Unknown {
        code: u64,
        info1: u64,
        info2: u64,
    },
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
    /// write access).
    Retry,
    /// The instruction is done: resume at `next_rip`.
    Skip,
    /// Stop running this guest; the run's outcome is decided by the caller.
    Stop,
}

/// Where the guest resumes for `action`, or `None` when it must stop (or an
/// instruction the dispatch wants skipped has no known length, which is a
/// backend bug reported as a stop rather than a guess).
pub fn resume_rip(exit: &VmExit, action: Action) -> Option<u64> {
    match action {
        Action::Retry => Some(exit.rip),
        Action::Skip => exit.next_rip,
        Action::Stop => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
