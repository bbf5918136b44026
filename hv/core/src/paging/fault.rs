//! Decoding nested page faults into one vendor-neutral form.
//!
//! Intel: EPT-violation exit qualification (SDM vol. 3C, table "Exit
//! Qualification for EPT Violations") with the guest-physical address from
//! VMCS field 0x2400. AMD: #VMEXIT(NPF) with the page-fault error code in
//! EXITINFO1 and the guest-physical address in EXITINFO2 (APM vol. 2,
//! "Nested versus Guest Page Faults").

use crate::addr::GuestPhysAddr;

bitflags::bitflags! {
    /// EPT-violation exit qualification bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EptViolationQual: u64 {
        /// Bit 0: the access was a data read.
        const READ = 1 << 0;
        /// Bit 1: the access was a data write.
        const WRITE = 1 << 1;
        /// Bit 2: the access was an instruction fetch.
        const FETCH = 1 << 2;
        /// Bit 3: the guest-physical address was readable (AND of the walk).
        const ENTRY_READ = 1 << 3;
        /// Bit 4: ... writable.
        const ENTRY_WRITE = 1 << 4;
        /// Bit 5: ... executable (supervisor-executable with MBEC).
        const ENTRY_EXEC = 1 << 5;
        /// Bit 6: ... user-executable (only meaningful with MBEC).
        const ENTRY_USER_EXEC = 1 << 6;
        /// Bit 7: the guest-linear-address field is valid.
        const GLA_VALID = 1 << 7;
        /// Bit 8 (valid when bit 7 is set): the access was to the final
        /// translation of a linear address, not to a guest paging structure.
        const GLA_TRANSLATED = 1 << 8;
        /// Bit 12: NMI unblocking due to IRET.
        const NMI_UNBLOCKING = 1 << 12;
    }
}

bitflags::bitflags! {
    /// AMD #VMEXIT(NPF) EXITINFO1: the page-fault error code of the nested
    /// walk plus two nested-only bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct NpfErrorCode: u64 {
        /// Bit 0: the nested entry was present (protection fault).
        const PRESENT = 1 << 0;
        /// Bit 1: the access was a write.
        const WRITE = 1 << 1;
        /// Bit 2: user access (always set for nested walks).
        const USER = 1 << 2;
        /// Bit 3: a reserved bit was set in a nested entry.
        const RESERVED = 1 << 3;
        /// Bit 4: the access was an instruction fetch.
        const FETCH = 1 << 4;
        /// Bit 32: the fault was on the final guest-physical address.
        const FINAL = 1 << 32;
        /// Bit 33: the fault was on a guest page-table access.
        const GUEST_WALK = 1 << 33;
    }
}

/// What the faulting access was touching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultStage {
    /// The data or code the guest addressed.
    Final,
    /// A guest page-table entry, read or updated during the guest's walk.
    GuestWalk,
    /// The hardware did not say.
    Unknown,
}

/// A nested page fault, vendor-neutral.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedFault {
    /// Faulting guest-physical address (byte granular as reported).
    pub gpa: GuestPhysAddr,
    /// The access was a write.
    pub write: bool,
    /// The access was an instruction fetch.
    pub fetch: bool,
    /// A translation existed (permission fault), as opposed to not mapped.
    pub present: bool,
    /// A reserved bit was set in a nested entry (AMD; Intel reports that as a
    /// separate EPT-misconfiguration exit, so always false there).
    pub reserved: bool,
    /// What the access was for.
    pub stage: FaultStage,
}

impl NestedFault {
    /// A write to a present page: the kind log-dirty write protection causes.
    /// Pass it to `NestedPageTable::restore_write`, which tells apart a
    /// tracked page, a spurious repeat and a page that is really read-only.
    pub fn is_write_protect_candidate(&self) -> bool {
        self.write && self.present && !self.reserved
    }
}

/// Decodes an EPT violation.
pub fn decode_ept_violation(qualification: u64, gpa: u64) -> NestedFault {
    let q = EptViolationQual::from_bits_truncate(qualification);
    let present = q.intersects(
        EptViolationQual::ENTRY_READ | EptViolationQual::ENTRY_WRITE | EptViolationQual::ENTRY_EXEC,
    );
    let stage = if !q.contains(EptViolationQual::GLA_VALID) {
        FaultStage::Unknown
    } else if q.contains(EptViolationQual::GLA_TRANSLATED) {
        FaultStage::Final
    } else {
        FaultStage::GuestWalk
    };
    NestedFault {
        gpa: GuestPhysAddr::new(gpa),
        write: q.contains(EptViolationQual::WRITE),
        fetch: q.contains(EptViolationQual::FETCH),
        present,
        reserved: false,
        stage,
    }
}

/// Decodes a #VMEXIT(NPF) from EXITINFO1 and EXITINFO2.
pub fn decode_npf(exitinfo1: u64, exitinfo2: u64) -> NestedFault {
    let e = NpfErrorCode::from_bits_truncate(exitinfo1);
    let stage = match (
        e.contains(NpfErrorCode::FINAL),
        e.contains(NpfErrorCode::GUEST_WALK),
    ) {
        (true, false) => FaultStage::Final,
        (false, true) => FaultStage::GuestWalk,
        _ => FaultStage::Unknown,
    };
    NestedFault {
        gpa: GuestPhysAddr::new(exitinfo2),
        write: e.contains(NpfErrorCode::WRITE),
        fetch: e.contains(NpfErrorCode::FETCH),
        present: e.contains(NpfErrorCode::PRESENT),
        reserved: e.contains(NpfErrorCode::RESERVED),
        stage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_write_to_read_only_present_page() {
        // Write (bit 1), entry readable+executable (bits 3, 5), GLA valid and
        // final translation (bits 7, 8): 0x1aa.
        let f = decode_ept_violation(0x1aa, 0x1234_5678);
        assert_eq!(
            f,
            NestedFault {
                gpa: GuestPhysAddr::new(0x1234_5678),
                write: true,
                fetch: false,
                present: true,
                reserved: false,
                stage: FaultStage::Final,
            }
        );
        assert!(f.is_write_protect_candidate());
    }

    #[test]
    fn ept_fetch_from_unmapped_during_guest_walk() {
        // Fetch (bit 2), nothing permitted, GLA valid but not translated.
        let f = decode_ept_violation(0x84, 0x9000);
        assert!(f.fetch && !f.write && !f.present);
        assert_eq!(f.stage, FaultStage::GuestWalk);
        assert!(!f.is_write_protect_candidate());
        // No GLA: stage unknown; a read of an unmapped page.
        let f = decode_ept_violation(0x1, 0);
        assert!(!f.write && !f.fetch && !f.present);
        assert_eq!(f.stage, FaultStage::Unknown);
    }

    #[test]
    fn npf_error_codes() {
        // P | W | US, final translation (bit 32).
        let f = decode_npf(0x1_0000_0007, 0xfee0_0000);
        assert_eq!(
            f,
            NestedFault {
                gpa: GuestPhysAddr::new(0xfee0_0000),
                write: true,
                fetch: false,
                present: true,
                reserved: false,
                stage: FaultStage::Final,
            }
        );
        // Not present, US, fetch (bit 4), during a guest walk (bit 33).
        let f = decode_npf(0x2_0000_0014, 0x3000);
        assert!(!f.present && f.fetch && !f.write);
        assert_eq!(f.stage, FaultStage::GuestWalk);
        // Reserved bit set: not a log-dirty fault even if P and W.
        let f = decode_npf(0x1_0000_000f, 0x3000);
        assert!(f.reserved && !f.is_write_protect_candidate());
        // Both stage bits: inconsistent, reported as unknown.
        assert_eq!(decode_npf(0x3_0000_0000, 0).stage, FaultStage::Unknown);
    }
}
