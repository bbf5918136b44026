//! Nested page tables (guest-physical -> host-physical), Intel EPT and AMD
//! NPT formats, behind one entry trait and one generic 4-level table.
//!
//! - [`NestedEntry`] is the one trait both formats implement: [`EptEntry`]
//!   (Intel SDM vol. 3, "EPT") and [`NptEntry`] (AMD APM vol. 2, "Nested
//!   Paging": ordinary long-mode entries seen as user accesses).
//! - [`NestedPageTable`] maps/unmaps/translates, and provides the log-dirty
//!   operations: write-protect everything, re-grant write on one page after
//!   a fault, or scan-and-clear hardware dirty bits.
//! - [`fault`] decodes EPT-violation qualifications and NPF error codes into
//!   a vendor-neutral [`NestedFault`].
//!
//! No privileged instruction lives here. Every operation that can leave stale
//! translations in a TLB returns a [`Flush`] that the kernel must carry out
//! (INVEPT on Intel, a TLB_CONTROL flush on AMD) before relying on the change.

mod entry;
mod ept;
pub mod fault;
mod npt;
mod table;

pub use entry::NestedEntry;
pub use ept::{ept_pointer, EptEntry, EptFlags, EPT_MT_UC, EPT_MT_WB};
pub use fault::NestedFault;
pub use npt::{ncr3, NptEntry, NptFlags};
pub use table::{
    EptTable, NestedPageTable, NptTable, RestoreWrite, TableStats, Translation, Walk, GPA_LIMIT,
    HPA_LIMIT,
};

use core::fmt;

use crate::addr::{GuestPhysAddr, HostPhysAddr};

bitflags::bitflags! {
    /// Vendor-neutral access permissions of a mapping.
    ///
    /// Every mapping must be readable: EPT treats write-without-read as a
    /// misconfiguration and NPT has no way to express "present but not
    /// readable". Execute-only EPT mappings are not offered.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Perms: u8 {
        /// Reads allowed.
        const READ = 1 << 0;
        /// Writes allowed.
        const WRITE = 1 << 1;
        /// Instruction fetches allowed.
        const EXEC = 1 << 2;
    }
}

/// Memory type of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Write-back: guest RAM.
    WriteBack,
    /// Uncacheable: device memory.
    Uncacheable,
}

/// Size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB.
    Size4K,
    /// 2 MiB.
    Size2M,
}

impl PageSize {
    /// Bytes covered.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
        }
    }
}

/// How a range is mapped by [`NestedPageTable::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapAttrs {
    /// Permissions (must contain [`Perms::READ`]).
    pub perms: Perms,
    /// Memory type.
    pub mem: MemType,
    /// Use 2 MiB pages where gpa and hpa are both 2 MiB aligned and a whole
    /// 2 MiB is covered (never while write protection is enabled).
    pub large: bool,
}

impl MapAttrs {
    /// Guest RAM: read/write/execute, write-back, 2 MiB pages allowed.
    pub const RAM: MapAttrs = MapAttrs {
        perms: Perms::all(),
        mem: MemType::WriteBack,
        large: true,
    };
}

/// TLB invalidation the kernel must perform after a table change.
///
/// Neither vendor can invalidate one guest-physical address directly: the
/// kernel turns `Page` into what the hardware offers (INVEPT single-context on
/// Intel; a flush of the guest's ASID on AMD). `Page` is kept distinct so a
/// backend that can do better, or that knows the hardware already dropped the
/// stale entry (see [`NestedPageTable::restore_write`]), may do less.
#[must_use = "stale translations stay in the TLB until the kernel flushes"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Nothing cached can be stale.
    None,
    /// Translations of this one guest-physical page may be stale.
    Page(GuestPhysAddr),
    /// Translations anywhere in this table may be stale.
    All,
}

impl Flush {
    /// The flush that covers both `self` and `other`.
    pub fn merge(self, other: Flush) -> Flush {
        match (self, other) {
            (Flush::None, x) | (x, Flush::None) => x,
            (Flush::Page(a), Flush::Page(b)) if a == b => Flush::Page(a),
            _ => Flush::All,
        }
    }
}

/// Why a table operation was refused. A refused operation changed nothing
/// that a translation can observe (see each method for what "nothing" means
/// with respect to empty intermediate tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The guest-physical address is not 4 KiB aligned.
    MisalignedGpa(GuestPhysAddr),
    /// The host-physical address is not 4 KiB aligned.
    MisalignedHpa(HostPhysAddr),
    /// The length is zero or not a multiple of 4 KiB.
    BadLength(u64),
    /// The guest-physical range leaves the 48-bit space of a 4-level table.
    GpaOutOfRange(GuestPhysAddr),
    /// The host-physical range leaves the 52-bit physical address space.
    HpaOutOfRange(HostPhysAddr),
    /// The permissions cannot be expressed (no read permission).
    BadPerms(Perms),
    /// Part of the range is already mapped (first mapped address given).
    Overlap(GuestPhysAddr),
    /// The address is not mapped.
    NotMapped(GuestPhysAddr),
    /// The page is mapped without write permission: a write to it is a real
    /// protection fault, not a log-dirty fault.
    WriteNotAllowed(GuestPhysAddr),
    /// The frame allocator is out of frames.
    AllocFailed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::MisalignedGpa(a) => write!(f, "{a} is not 4 KiB aligned"),
            Error::MisalignedHpa(a) => write!(f, "{a} is not 4 KiB aligned"),
            Error::BadLength(l) => write!(f, "length {l:#x} is not a non-zero multiple of 4 KiB"),
            Error::GpaOutOfRange(a) => write!(f, "{a}: range leaves the 48-bit guest space"),
            Error::HpaOutOfRange(a) => write!(f, "{a}: range leaves the 52-bit host space"),
            Error::BadPerms(p) => write!(f, "permissions {p:?} lack READ"),
            Error::Overlap(a) => write!(f, "{a} is already mapped"),
            Error::NotMapped(a) => write!(f, "{a} is not mapped"),
            Error::WriteNotAllowed(a) => write!(f, "{a} is mapped read-only"),
            Error::AllocFailed => write!(f, "out of page-table frames"),
        }
    }
}
