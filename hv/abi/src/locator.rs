//! The control locator: where the tool learns the control area's address
//! without looking at memory the guest can write.
//!
//! The hypervisor reserves the 4 KiB page at [`LOCATOR_AT`] at boot: it
//! never enters the frame allocator, so it is never guest RAM and no nested
//! page table maps it (the guest cannot write it). When it publishes its
//! control area it writes [`Locator`] there: the area's machine address and
//! size, then (after a release fence) [`LOCATOR_MAGIC`]. The tool reads
//! only this page to find the control area; a header with the control
//! area's magic anywhere else (for instance one a guest planted in its own
//! RAM) is never looked at. [`Locator::check`] then refuses a placement
//! the hypervisor cannot have made: a control area overlapping the locator
//! page or the guest RAM its own header declares, or a locator page inside
//! that guest RAM (docs/REPLICATION.md, "Finding the control area").

use crate::control::Region;

/// Machine address of the locator page (512 KiB: conventional memory
/// below 1 MiB, which every PC has as RAM, which the frame allocator never
/// hands out and where neither the image (linked at 1 MiB) nor GRUB's
/// modules (placed above the image; a guest kernel module can be tens of
/// MiB) ever lie).
pub const LOCATOR_AT: u64 = 0x8_0000;
/// Bytes of the locator page.
pub const LOCATOR_SIZE: u64 = 4096;
/// "DOPPELLO" read as a little-endian `u64`: the locator's first word.
pub const LOCATOR_MAGIC: u64 = u64::from_le_bytes(*b"DOPPELLO");
/// Little-endian `u64` words of the locator: magic, control area address,
/// control area size (the rest of the page is zero).
pub const LOCATOR_WORDS: usize = 3;

/// The locator's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Locator {
    /// Machine address of the control area's header (page aligned).
    pub control_at: u64,
    /// Bytes the hypervisor gave the control area (a whole number of
    /// pages, at least the header's `total_size`).
    pub control_size: u64,
}

/// Why a locator (or the placement it describes) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocatorError {
    /// The first word is not [`LOCATOR_MAGIC`] (not published yet).
    NoMagic(u64),
    /// `control_at` or `control_size` is not page aligned, or the size is 0.
    Misaligned,
    /// The control area overlaps the locator page.
    OverlapsLocator,
    /// The control area ends beyond `len` bytes of machine memory.
    BeyondMemory,
    /// The control header's `total_size` exceeds what the locator gave it.
    LargerThanPlaced { total: u64 },
    /// The control area overlaps the guest RAM its header declares.
    ControlInGuestRam,
    /// The locator page lies in the guest RAM the header declares.
    LocatorInGuestRam,
}

const fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    // Callers pass ranges whose ends do not overflow.
    a < b + b_len && b < a + a_len
}

impl Locator {
    /// The words to write, magic first (the hypervisor writes words 1.. and
    /// then, after a release fence, word 0).
    pub const fn encode(&self) -> [u64; LOCATOR_WORDS] {
        [LOCATOR_MAGIC, self.control_at, self.control_size]
    }

    /// Decode the words read from the page and check the placement against
    /// `len` bytes of machine memory. The control area's own header is
    /// checked later with [`Locator::check`].
    pub fn decode(words: [u64; LOCATOR_WORDS], len: u64) -> Result<Self, LocatorError> {
        let [magic, control_at, control_size] = words;
        if magic != LOCATOR_MAGIC {
            return Err(LocatorError::NoMagic(magic));
        }
        if !control_at.is_multiple_of(LOCATOR_SIZE)
            || !control_size.is_multiple_of(LOCATOR_SIZE)
            || control_size == 0
        {
            return Err(LocatorError::Misaligned);
        }
        let Some(end) = control_at.checked_add(control_size) else {
            return Err(LocatorError::BeyondMemory);
        };
        if end > len {
            return Err(LocatorError::BeyondMemory);
        }
        if overlaps(control_at, control_size, LOCATOR_AT, LOCATOR_SIZE) {
            return Err(LocatorError::OverlapsLocator);
        }
        Ok(Self {
            control_at,
            control_size,
        })
    }

    /// Check the control header's `total_size` and `guest_ram` (machine
    /// address and bytes, overflow already excluded by the header checks)
    /// against this placement: neither the control area nor the locator
    /// may lie in the guest's RAM.
    pub fn check(&self, total_size: u64, guest_ram: Region) -> Result<(), LocatorError> {
        if total_size > self.control_size {
            return Err(LocatorError::LargerThanPlaced { total: total_size });
        }
        let (g, n) = (guest_ram.offset, guest_ram.size);
        if g.checked_add(n).is_none() {
            return Err(LocatorError::BeyondMemory);
        }
        if overlaps(self.control_at, self.control_size, g, n) {
            return Err(LocatorError::ControlInGuestRam);
        }
        if overlaps(LOCATOR_AT, LOCATOR_SIZE, g, n) {
            return Err(LocatorError::LocatorInGuestRam);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 0x10_0000;

    #[test]
    fn a_hypervisor_placement_decodes_and_checks() {
        let l = Locator {
            control_at: 20 * MIB,
            control_size: 0x5000,
        };
        let len = 64 * MIB;
        assert_eq!(Locator::decode(l.encode(), len), Ok(l));
        let guest = Region {
            offset: 32 * MIB,
            size: 16 * MIB,
        };
        assert_eq!(l.check(0x4800, guest), Ok(()));
    }

    #[test]
    fn misplaced_locators_are_refused() {
        let len = 64 * MIB;
        let at = |control_at, control_size| {
            Locator::decode(
                Locator {
                    control_at,
                    control_size,
                }
                .encode(),
                len,
            )
        };
        assert_eq!(at(20 * MIB + 8, 0x1000), Err(LocatorError::Misaligned));
        assert_eq!(at(20 * MIB, 0), Err(LocatorError::Misaligned));
        assert_eq!(
            at(64 * MIB - 0x1000, 0x2000),
            Err(LocatorError::BeyondMemory)
        );
        assert_eq!(at(!0xfff, 0x2000), Err(LocatorError::BeyondMemory));
        // The area may not cover the locator page, even by its last page.
        assert_eq!(
            at(LOCATOR_AT - 0x1000, 0x2000),
            Err(LocatorError::OverlapsLocator)
        );
        assert_eq!(at(LOCATOR_AT + 0x1000, 0x1000).map(|_| ()), Ok(()));
        let mut w = Locator {
            control_at: 20 * MIB,
            control_size: 0x1000,
        }
        .encode();
        w[0] = crate::control::MAGIC;
        assert!(matches!(
            Locator::decode(w, len),
            Err(LocatorError::NoMagic(_))
        ));
    }

    #[test]
    fn a_control_area_or_locator_in_guest_ram_is_refused() {
        let l = Locator {
            control_at: 20 * MIB,
            control_size: 0x4000,
        };
        let g = |offset, size| Region { offset, size };
        // The guest's first or last page is the control area's.
        assert_eq!(
            l.check(0x4000, g(20 * MIB + 0x3000, MIB)),
            Err(LocatorError::ControlInGuestRam)
        );
        assert_eq!(
            l.check(0x4000, g(19 * MIB, MIB + 0x1000)),
            Err(LocatorError::ControlInGuestRam)
        );
        // Adjacent on both sides is fine.
        assert_eq!(l.check(0x4000, g(19 * MIB, MIB)), Ok(()));
        assert_eq!(l.check(0x4000, g(20 * MIB + 0x4000, MIB)), Ok(()));
        // Guest RAM over the locator page.
        assert_eq!(
            l.check(0x4000, g(LOCATOR_AT, 0x1000)),
            Err(LocatorError::LocatorInGuestRam)
        );
        assert_eq!(
            l.check(0x4001, g(32 * MIB, MIB)),
            Err(LocatorError::LargerThanPlaced { total: 0x4001 })
        );
        assert_eq!(
            l.check(0x4000, g(u64::MAX - 0xfff, 0x2000)),
            Err(LocatorError::BeyondMemory)
        );
    }
}
