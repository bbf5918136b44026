//! Address and frame-number newtypes.
//!
//! Guest-physical, host-physical and guest-virtual addresses are different
//! kinds that must never be mixed silently, so each has its own type and
//! prints with its kind: `gpa:0x1000`, `hpa:0x1000`, `gva:0x1000`.
//! Frame numbers (`addr >> 12`) are [`Gfn`] for guest frames and [`Pfn`] for
//! host frames, printed `gfn:0x1` / `pfn:0x1`.
//!
//! Naming note: Xen's migration stream calls a guest frame a "pfn"; in this
//! crate that value is a [`Gfn`]. Our [`Pfn`] is a host (machine) frame, what
//! Xen calls an "mfn".

use core::fmt;

/// Size of the smallest page, in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

macro_rules! address {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// Offset inside the 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }

            /// Rounds down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align.wrapping_sub(1)))
            }

            /// Whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & align.wrapping_sub(1) == 0
            }

            /// `self + bytes`, or `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($kind, ":{:#x}"), self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

address!(
    /// A guest-physical address: what the guest believes is physical memory,
    /// translated by EPT/NPT into a [`HostPhysAddr`].
    GuestPhysAddr,
    "gpa"
);
address!(
    /// A host-physical (machine) address.
    HostPhysAddr,
    "hpa"
);
address!(
    /// A guest-virtual (linear) address, translated by the guest's own paging.
    GuestVirtAddr,
    "gva"
);
address!(
    /// A guest frame number (`gpa >> 12`); Xen's migration stream calls it pfn.
    Gfn,
    "gfn"
);
address!(
    /// A host-physical frame number (`hpa >> 12`); Xen calls it mfn.
    Pfn,
    "pfn"
);

/// Short name of [`GuestPhysAddr`].
pub type Gpa = GuestPhysAddr;
/// Short name of [`HostPhysAddr`].
pub type Hpa = HostPhysAddr;
/// Short name of [`GuestVirtAddr`].
pub type Gva = GuestVirtAddr;

impl GuestPhysAddr {
    /// The guest frame holding this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
}

impl HostPhysAddr {
    /// The host frame holding this address.
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
}

impl Gfn {
    /// First guest-physical address of the frame (`None` if it overflows).
    pub const fn gpa(self) -> Option<GuestPhysAddr> {
        if self.0 > (u64::MAX >> PAGE_SHIFT) {
            None
        } else {
            Some(GuestPhysAddr(self.0 << PAGE_SHIFT))
        }
    }
}

impl Pfn {
    /// First host-physical address of the frame (`None` if it overflows).
    pub const fn hpa(self) -> Option<HostPhysAddr> {
        if self.0 > (u64::MAX >> PAGE_SHIFT) {
            None
        } else {
            Some(HostPhysAddr(self.0 << PAGE_SHIFT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_with_kind() {
        assert_eq!(format!("{}", Gpa::new(0x1000)), "gpa:0x1000");
        assert_eq!(format!("{:?}", Hpa::new(0x2000)), "hpa:0x2000");
        assert_eq!(format!("{}", Gva::new(0)), "gva:0x0");
        assert_eq!(format!("{}", Gfn::new(1)), "gfn:0x1");
        assert_eq!(format!("{}", Pfn::new(0xabc)), "pfn:0xabc");
    }

    #[test]
    fn frame_numbers_round_trip() {
        assert_eq!(Gpa::new(0x1234_5678).gfn(), Gfn::new(0x12345));
        assert_eq!(Gfn::new(0x12345).gpa(), Some(Gpa::new(0x1234_5000)));
        assert_eq!(Hpa::new(0xfff).pfn(), Pfn::new(0));
        assert_eq!(Pfn::new(u64::MAX).hpa(), None);
        assert_eq!(Gfn::new(u64::MAX >> 12).gpa(), Some(Gpa::new(!0xfff)));
    }

    #[test]
    fn alignment_helpers() {
        let a = Gpa::new(0x20_1234);
        assert_eq!(a.page_offset(), 0x234);
        assert_eq!(a.align_down(0x20_0000), Gpa::new(0x20_0000));
        assert!(!a.is_aligned(PAGE_SIZE));
        assert!(Gpa::new(0x20_0000).is_aligned(0x20_0000));
        assert_eq!(Gpa::new(u64::MAX).checked_add(1), None);
        assert_eq!(Gpa::new(1).checked_add(1), Some(Gpa::new(2)));
    }
}
