//! AMD nested page-table entry format (AMD APM vol. 2, "Nested Paging").
//!
//! Nested tables are ordinary x86-64 long-mode page tables walked with host
//! rules; every nested access counts as a user access, so US must be set at
//! every level. Accessed and dirty bits are always maintained by hardware.

use core::fmt;

use super::entry::{NestedEntry, ADDR_MASK_4K};
use super::{MemType, Perms};
use crate::addr::HostPhysAddr;

bitflags::bitflags! {
    /// Bits of a long-mode (nested) page-table entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct NptFlags: u64 {
        /// Bit 0: present.
        const PRESENT = 1 << 0;
        /// Bit 1: read/write.
        const WRITABLE = 1 << 1;
        /// Bit 2: user/supervisor (must be set: nested walks are user accesses).
        const USER = 1 << 2;
        /// Bit 3: page-level write-through.
        const WRITE_THROUGH = 1 << 3;
        /// Bit 4: page-level cache disable.
        const NO_CACHE = 1 << 4;
        /// Bit 5: accessed.
        const ACCESSED = 1 << 5;
        /// Bit 6 of a leaf: dirty.
        const DIRTY = 1 << 6;
        /// Bit 7 of a PDE/PDPTE: page size (2 MiB / 1 GiB leaf).
        const HUGE = 1 << 7;
        /// Bit 8 of a leaf: global.
        const GLOBAL = 1 << 8;
        /// Bit 9 (available to software): Doppel's "logically writable".
        const SOFT_WRITABLE = 1 << 9;
        /// Bit 63: no-execute.
        const NO_EXECUTE = 1 << 63;
    }
}

/// The nCR3 value (VMCB offset 0xB0) for a 4-level table at `root`:
/// the PML4 address with PWT = PCD = 0 (write-back table walks).
pub fn ncr3(root: HostPhysAddr) -> u64 {
    root.as_u64() & ADDR_MASK_4K
}

/// One nested page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct NptEntry(u64);

const _: () = assert!(core::mem::size_of::<NptEntry>() == 8);

impl NptEntry {
    /// The entry's flags (address bits dropped).
    pub fn flags(self) -> NptFlags {
        NptFlags::from_bits_truncate(self.0)
    }
}

impl fmt::Debug for NptEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NptEntry({:#x}: {} {:?})",
            self.0,
            self.addr(),
            self.flags()
        )
    }
}

impl NestedEntry for NptEntry {
    const FORMAT: &'static str = "npt";
    const WRITE: u64 = NptFlags::WRITABLE.bits();
    const ACCESSED: u64 = NptFlags::ACCESSED.bits();
    const DIRTY: u64 = NptFlags::DIRTY.bits();
    const LARGE: u64 = NptFlags::HUGE.bits();
    const SOFT_WRITABLE: u64 = NptFlags::SOFT_WRITABLE.bits();

    fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    fn raw(self) -> u64 {
        self.0
    }

    fn table(next: HostPhysAddr) -> Self {
        let f = NptFlags::PRESENT | NptFlags::WRITABLE | NptFlags::USER;
        Self((next.as_u64() & ADDR_MASK_4K) | f.bits())
    }

    fn leaf(hpa: HostPhysAddr, perms: Perms, mem: MemType, large: bool, wp: bool) -> Self {
        let mut f = NptFlags::PRESENT | NptFlags::USER;
        if perms.contains(Perms::WRITE) {
            f |= NptFlags::SOFT_WRITABLE;
            if !wp {
                f |= NptFlags::WRITABLE;
            }
        }
        if !perms.contains(Perms::EXEC) {
            f |= NptFlags::NO_EXECUTE;
        }
        if large {
            f |= NptFlags::HUGE;
        }
        if mem == MemType::Uncacheable {
            // PAT index 3, which is UC in the power-on PAT.
            f |= NptFlags::WRITE_THROUGH | NptFlags::NO_CACHE;
        }
        Self((hpa.as_u64() & ADDR_MASK_4K) | f.bits())
    }

    fn is_present(self) -> bool {
        self.0 & NptFlags::PRESENT.bits() != 0
    }

    fn perms(self) -> Perms {
        let f = self.flags();
        let mut p = Perms::empty();
        if f.contains(NptFlags::PRESENT) {
            p |= Perms::READ;
            p.set(Perms::WRITE, f.contains(NptFlags::WRITABLE));
            p.set(Perms::EXEC, !f.contains(NptFlags::NO_EXECUTE));
        }
        p
    }

    fn mem_type(self) -> MemType {
        if self.flags().contains(NptFlags::NO_CACHE) {
            MemType::Uncacheable
        } else {
            MemType::WriteBack
        }
    }

    fn root_pointer(root: HostPhysAddr, _ad: bool) -> u64 {
        ncr3(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_bits_match_the_apm() {
        assert_eq!(NptFlags::PRESENT.bits(), 0x1);
        assert_eq!(NptFlags::WRITABLE.bits(), 0x2);
        assert_eq!(NptFlags::USER.bits(), 0x4);
        assert_eq!(NptFlags::WRITE_THROUGH.bits(), 0x8);
        assert_eq!(NptFlags::NO_CACHE.bits(), 0x10);
        assert_eq!(NptFlags::ACCESSED.bits(), 0x20);
        assert_eq!(NptFlags::DIRTY.bits(), 0x40);
        assert_eq!(NptFlags::HUGE.bits(), 0x80);
        assert_eq!(NptFlags::GLOBAL.bits(), 0x100);
        assert_eq!(NptFlags::NO_EXECUTE.bits(), 0x8000_0000_0000_0000);
    }

    #[test]
    fn leaf_and_table_known_values() {
        let hpa = HostPhysAddr::new(0x1234_5000);
        // P | RW | US = 0x7, soft-writable bit 9 = 0x200.
        let e = NptEntry::leaf(hpa, Perms::all(), MemType::WriteBack, false, false);
        assert_eq!(e.raw(), 0x1234_5207);
        let e = NptEntry::leaf(hpa, Perms::all(), MemType::WriteBack, false, true);
        assert_eq!(e.raw(), 0x1234_5205);
        assert_eq!(e.perms(), Perms::READ | Perms::EXEC);
        // Read-only, no-exec, UC, 2 MiB: P|US|PWT|PCD|PS = 0x9d, NX bit 63.
        let e = NptEntry::leaf(
            HostPhysAddr::new(0x4020_0000),
            Perms::READ,
            MemType::Uncacheable,
            true,
            false,
        );
        assert_eq!(e.raw(), 0x8000_0000_4020_009d);
        assert_eq!(e.perms(), Perms::READ);
        assert_eq!(e.mem_type(), MemType::Uncacheable);
        assert_eq!(NptEntry::table(hpa).raw(), 0x1234_5007);
        assert_eq!(NptEntry::empty().perms(), Perms::empty());
    }

    #[test]
    fn split_child_clears_ps_so_bit7_is_not_read_as_pat() {
        let big = NptEntry::from_raw(0x4020_0000 | 0x80 | 0x40 | 0x20 | 0x207);
        let c = big.split_child(1, true);
        assert_eq!(c.raw(), 0x4020_1000 | 0x40 | 0x20 | 0x205);
    }

    #[test]
    fn ncr3_known_value() {
        assert_eq!(ncr3(HostPhysAddr::new(0xabc_d000)), 0xabc_d000);
        assert_eq!(
            NptEntry::root_pointer(HostPhysAddr::new(0x5000), true),
            0x5000
        );
    }
}
