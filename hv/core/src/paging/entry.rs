//! The one entry trait shared by EPT and NPT.

use core::fmt;

use super::{MemType, Perms};
use crate::addr::HostPhysAddr;

/// Bits 12..51: the physical address of a 4 KiB frame (both formats).
pub const ADDR_MASK_4K: u64 = 0x000f_ffff_ffff_f000;
/// Bits 21..51: the physical address of a 2 MiB page (both formats).
pub const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;

/// A 64-bit nested page-table entry of one format.
///
/// The table code only uses this trait, so EPT and NPT share every algorithm.
/// The format-specific facts are the bit positions (constants) and the
/// encoders/decoders of permissions and memory type.
///
/// Write protection for log-dirty needs two write bits: the hardware one
/// ([`WRITE`](Self::WRITE)) that is cleared while tracking, and a software
/// one ([`SOFT_WRITABLE`](Self::SOFT_WRITABLE), in bits the hardware
/// ignores) that remembers the page may be written at all.
pub trait NestedEntry: Copy + Eq + fmt::Debug + 'static {
    /// Short name of the format ("ept" / "npt").
    const FORMAT: &'static str;
    /// Hardware write-permission bit.
    const WRITE: u64;
    /// Accessed bit (set by hardware on any access through the entry).
    const ACCESSED: u64;
    /// Dirty bit of leaves (set by hardware on a write through the entry).
    const DIRTY: u64;
    /// Page-size bit of a level-2 entry that maps a 2 MiB page.
    const LARGE: u64;
    /// Software bit: the mapping is logically writable.
    const SOFT_WRITABLE: u64;

    /// Wraps a raw value.
    fn from_raw(raw: u64) -> Self;
    /// The raw value the hardware reads.
    fn raw(self) -> u64;
    /// A non-leaf entry pointing at the next-level table `next`.
    fn table(next: HostPhysAddr) -> Self;
    /// A leaf mapping `hpa` (4 KiB, or 2 MiB when `large`), hardware-writable
    /// only if `perms` has WRITE and `write_protect` is false; the software
    /// writable bit follows `perms` alone. `perms` must contain READ.
    fn leaf(
        hpa: HostPhysAddr,
        perms: Perms,
        mem: MemType,
        large: bool,
        write_protect: bool,
    ) -> Self;
    /// Whether the hardware considers the entry present.
    fn is_present(self) -> bool;
    /// Permissions the hardware grants through this entry now.
    fn perms(self) -> Perms;
    /// Memory type of a leaf.
    fn mem_type(self) -> MemType;
    /// The value to load into the VMCS (EPTP) or VMCB (nCR3) for a table
    /// whose top level is at `root`; `ad` asks for hardware accessed/dirty
    /// bits where that is optional (EPT), and is ignored where they are
    /// always on (NPT).
    fn root_pointer(root: HostPhysAddr, ad: bool) -> u64;

    /// The empty (non-present) entry.
    fn empty() -> Self {
        Self::from_raw(0)
    }
    /// Whether this present entry is a 2 MiB leaf (meaningful at level 2).
    fn is_large(self) -> bool {
        self.raw() & Self::LARGE != 0
    }
    /// Address of the next table (non-leaf) or of a 4 KiB leaf's frame.
    fn addr(self) -> HostPhysAddr {
        HostPhysAddr::new(self.raw() & ADDR_MASK_4K)
    }
    /// Address of a 2 MiB leaf's page.
    fn large_addr(self) -> HostPhysAddr {
        HostPhysAddr::new(self.raw() & ADDR_MASK_2M)
    }
    /// Hardware write bit.
    fn is_hw_writable(self) -> bool {
        self.raw() & Self::WRITE != 0
    }
    /// Software writable bit (write permission regardless of tracking).
    fn is_soft_writable(self) -> bool {
        self.raw() & Self::SOFT_WRITABLE != 0
    }
    /// Accessed bit.
    fn is_accessed(self) -> bool {
        self.raw() & Self::ACCESSED != 0
    }
    /// Dirty bit.
    fn is_dirty(self) -> bool {
        self.raw() & Self::DIRTY != 0
    }
    /// The `i`th 4 KiB entry of the page table that replaces this 2 MiB leaf:
    /// same permissions, memory type and A/D bits, page-size bit cleared,
    /// hardware write bit cleared if `write_protect`.
    fn split_child(self, i: u64, write_protect: bool) -> Self {
        let keep = self.raw() & !(ADDR_MASK_4K | Self::LARGE);
        let mut raw = keep | (self.large_addr().as_u64() + (i << 12));
        if write_protect {
            raw &= !Self::WRITE;
        }
        Self::from_raw(raw)
    }
}
