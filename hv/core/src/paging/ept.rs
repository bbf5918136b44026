//! Intel EPT entry format (Intel SDM vol. 3C, "The Extended Page Table
//! Mechanism (EPT)" and "Format of the Extended-Page-Table Pointer").

use core::fmt;

use super::entry::{NestedEntry, ADDR_MASK_4K};
use super::{MemType, Perms};
use crate::addr::HostPhysAddr;

bitflags::bitflags! {
    /// Bits of an EPT paging-structure entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EptFlags: u64 {
        /// Bit 0: reads allowed.
        const READ = 1 << 0;
        /// Bit 1: writes allowed.
        const WRITE = 1 << 1;
        /// Bit 2: instruction fetches allowed (supervisor fetches when
        /// mode-based execute control is on).
        const EXECUTE = 1 << 2;
        /// Bits 3..5 of a leaf: EPT memory type (see [`EPT_MT_WB`]).
        const MEM_TYPE = 0b111 << 3;
        /// Bit 6 of a leaf: ignore the guest PAT memory type.
        const IGNORE_PAT = 1 << 6;
        /// Bit 7 of a PDE/PDPTE: the entry maps a 2 MiB / 1 GiB page.
        const LARGE = 1 << 7;
        /// Bit 8: accessed (set by hardware when EPTP bit 6 enables A/D).
        const ACCESSED = 1 << 8;
        /// Bit 9 of a leaf: dirty (set by hardware when EPTP bit 6 enables A/D).
        const DIRTY = 1 << 9;
        /// Bit 10: user-mode fetches allowed (only with mode-based execute
        /// control; ignored otherwise). Set together with EXECUTE.
        const USER_EXECUTE = 1 << 10;
        /// Bit 52 (ignored by the processor): Doppel's "logically writable".
        const SOFT_WRITABLE = 1 << 52;
    }
}

/// EPT memory type "uncacheable" (bits 3..5 of a leaf, bits 0..2 of EPTP).
pub const EPT_MT_UC: u64 = 0;
/// EPT memory type "write-back".
pub const EPT_MT_WB: u64 = 6;

/// EPTP bits 3..5: page-walk length minus one (4 levels).
const EPTP_WALK_4: u64 = 3 << 3;
/// EPTP bit 6: enable accessed and dirty flags.
const EPTP_AD: u64 = 1 << 6;

/// The EPT pointer (VMCS field 0x201A) for a 4-level table at `root`:
/// write-back paging-structure memory type (bits 0..2 = 6), walk length 4
/// (bits 3..5 = 3), bit 6 set when `ad` enables accessed/dirty flags.
pub fn ept_pointer(root: HostPhysAddr, ad: bool) -> u64 {
    (root.as_u64() & ADDR_MASK_4K) | EPT_MT_WB | EPTP_WALK_4 | if ad { EPTP_AD } else { 0 }
}

/// One EPT entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct EptEntry(u64);

const _: () = assert!(core::mem::size_of::<EptEntry>() == 8);

impl EptEntry {
    /// The entry's flags (address bits dropped).
    pub fn flags(self) -> EptFlags {
        EptFlags::from_bits_truncate(self.0)
    }
}

impl fmt::Debug for EptEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EptEntry({:#x}: {} {:?})",
            self.0,
            self.addr(),
            self.flags()
        )
    }
}

impl NestedEntry for EptEntry {
    const FORMAT: &'static str = "ept";
    const WRITE: u64 = EptFlags::WRITE.bits();
    const ACCESSED: u64 = EptFlags::ACCESSED.bits();
    const DIRTY: u64 = EptFlags::DIRTY.bits();
    const LARGE: u64 = EptFlags::LARGE.bits();
    const SOFT_WRITABLE: u64 = EptFlags::SOFT_WRITABLE.bits();

    fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    fn raw(self) -> u64 {
        self.0
    }

    fn table(next: HostPhysAddr) -> Self {
        // Permissions of non-leaf entries are ANDed down the walk: grant all.
        let f = EptFlags::READ | EptFlags::WRITE | EptFlags::EXECUTE | EptFlags::USER_EXECUTE;
        Self((next.as_u64() & ADDR_MASK_4K) | f.bits())
    }

    fn leaf(hpa: HostPhysAddr, perms: Perms, mem: MemType, large: bool, wp: bool) -> Self {
        let mut f = EptFlags::READ;
        if perms.contains(Perms::WRITE) {
            f |= EptFlags::SOFT_WRITABLE;
            if !wp {
                f |= EptFlags::WRITE;
            }
        }
        if perms.contains(Perms::EXEC) {
            f |= EptFlags::EXECUTE | EptFlags::USER_EXECUTE;
        }
        if large {
            f |= EptFlags::LARGE;
        }
        let mt = match mem {
            MemType::WriteBack => EPT_MT_WB,
            MemType::Uncacheable => EPT_MT_UC,
        };
        Self((hpa.as_u64() & ADDR_MASK_4K) | f.bits() | (mt << 3))
    }

    fn is_present(self) -> bool {
        // Not present when bits 0..2 are all clear (SDM: "not present").
        self.0 & 0b111 != 0
    }

    fn perms(self) -> Perms {
        let f = self.flags();
        let mut p = Perms::empty();
        p.set(Perms::READ, f.contains(EptFlags::READ));
        p.set(Perms::WRITE, f.contains(EptFlags::WRITE));
        p.set(Perms::EXEC, f.contains(EptFlags::EXECUTE));
        p
    }

    fn mem_type(self) -> MemType {
        if (self.0 >> 3) & 0b111 == EPT_MT_WB {
            MemType::WriteBack
        } else {
            MemType::Uncacheable
        }
    }

    fn root_pointer(root: HostPhysAddr, ad: bool) -> u64 {
        ept_pointer(root, ad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_bits_match_the_sdm() {
        assert_eq!(EptFlags::READ.bits(), 0x1);
        assert_eq!(EptFlags::WRITE.bits(), 0x2);
        assert_eq!(EptFlags::EXECUTE.bits(), 0x4);
        assert_eq!(EptFlags::MEM_TYPE.bits(), 0x38);
        assert_eq!(EptFlags::IGNORE_PAT.bits(), 0x40);
        assert_eq!(EptFlags::LARGE.bits(), 0x80);
        assert_eq!(EptFlags::ACCESSED.bits(), 0x100);
        assert_eq!(EptFlags::DIRTY.bits(), 0x200);
        assert_eq!(EptFlags::USER_EXECUTE.bits(), 0x400);
    }

    #[test]
    fn leaf_and_table_known_values() {
        let hpa = HostPhysAddr::new(0x1234_5000);
        // RWX, WB (6 << 3 = 0x30), user-exec (0x400), soft-writable (1 << 52).
        let e = EptEntry::leaf(hpa, Perms::all(), MemType::WriteBack, false, false);
        assert_eq!(e.raw(), 0x0010_0000_1234_5437);
        // Same, write-protected: hardware W (bit 1) clear, soft bit kept.
        let e = EptEntry::leaf(hpa, Perms::all(), MemType::WriteBack, false, true);
        assert_eq!(e.raw(), 0x0010_0000_1234_5435);
        // Read-only, UC, 2 MiB.
        let e = EptEntry::leaf(
            HostPhysAddr::new(0x4020_0000),
            Perms::READ,
            MemType::Uncacheable,
            true,
            false,
        );
        assert_eq!(e.raw(), 0x4020_0081);
        assert!(e.is_large() && e.is_present() && !e.is_soft_writable());
        assert_eq!(e.mem_type(), MemType::Uncacheable);
        assert_eq!(EptEntry::table(hpa).raw(), 0x1234_5407);
        assert!(!EptEntry::empty().is_present());
    }

    #[test]
    fn split_child_keeps_flags_and_offsets_address() {
        let big = EptEntry::from_raw(0x4020_0000 | 0x80 | 0x200 | 0x100 | 0x37);
        let c = big.split_child(3, false);
        assert_eq!(c.raw(), 0x4020_3000 | 0x200 | 0x100 | 0x37);
        let c = big.split_child(511, true);
        assert_eq!(c.raw(), 0x403f_f000 | 0x200 | 0x100 | 0x35);
    }

    #[test]
    fn eptp_known_values() {
        let root = HostPhysAddr::new(0xabc_d000);
        // WB (6) | walk length 4 (3 << 3 = 0x18) = 0x1e; A/D adds 0x40.
        assert_eq!(ept_pointer(root, false), 0xabc_d01e);
        assert_eq!(ept_pointer(root, true), 0xabc_d05e);
    }
}
