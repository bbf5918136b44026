//! Laying out and publishing the control area, and the control locator.
//!
//! The same steps for the hypervisor (over machine memory) and for
//! `doppel sim-hv` (over the machine RAM file): the header without its
//! magic, the rings' and channels' shared indices, a release fence, the
//! magic; so a tool that finds the magic finds initialised rings behind it.

use doppel_abi::chan::ChannelLayout;
use doppel_abi::control::{validate_header, ControlHeader, ControlView, Field, REGIONS};
use doppel_abi::locator::{Locator, LOCATOR_WORDS};
use doppel_abi::msg::PAGE_SIZE;
use doppel_abi::ring::{slot_size, RingLayout};
use doppel_abi::{CommandEntry, EventAck, EventEntry, ResponseEntry, SharedMem};
use zerocopy::IntoBytes;

use super::Role;
use doppel_abi::Features;

/// Bytes of each ring region the hypervisor lays out (a page each).
pub const RING_BYTES: u64 = 4096;
/// Byte channels (guest output / input): 16 KiB hold about 250 service
/// frames each way.
pub const CHANNEL_BYTES: u64 = 16384;
/// The vCPU area holds one HVM context blob (one vCPU).
pub const VCPU_AREA_BYTES: u64 = 4096;

/// What the control area of `role` offers.
pub fn features(role: Role) -> Features {
    match role {
        Role::Workload => Features::LOG_DIRTY_WP,
        Role::Service => Features::LOG_DIRTY_WP | Features::INPUT_CHANNEL | Features::OUTPUT_COMMIT,
        // Log-dirty and output commit only after `Activate`.
        Role::Standby => {
            Features::STANDBY
                | Features::INPUT_CHANNEL
                | Features::LOG_DIRTY_WP
                | Features::OUTPUT_COMMIT
        }
    }
}

/// The hypervisor's region sizes for a guest of `pages` pages, in
/// [`REGIONS`] order. Staging and the pfn list hold every page: epoch 0
/// carries the whole guest (and so does an activated standby's first
/// checkpoint to a new backup).
pub fn region_sizes(pages: u64) -> [u64; 7] {
    [
        RING_BYTES,
        RING_BYTES,
        CHANNEL_BYTES,
        CHANNEL_BYTES,
        pages * PAGE_SIZE,
        VCPU_AREA_BYTES,
        pages * 8,
    ]
}

/// Why a header could not be published as a working area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishError {
    /// The header does not pass the tool's checks.
    Invalid,
    /// This region cannot hold its ring or channel (left as it was).
    Region(Field),
}

impl PublishError {
    pub fn text(self) -> &'static str {
        match self {
            PublishError::Invalid => "own control header does not validate",
            PublishError::Region(_) => "control area ring or channel layout",
        }
    }
}

/// Publish `h` at offset 0 of `mem` (the control area, `mem.size()` bytes
/// mapped): the header without its magic, both rings and both channels
/// initialised, a release fence, the magic. A ring or channel whose region
/// does not fit is left as it is and named in the error; everything else is
/// published all the same (tests publish broken headers on purpose).
/// Returns the validated view of a working area.
pub fn publish_area<M: SharedMem>(mem: &M, h: &ControlHeader) -> Result<ControlView, PublishError> {
    let mut unpublished = *h;
    unpublished.magic = 0;
    mem.write_bytes(0, unpublished.as_bytes());
    let mut bad = None;
    for f in REGIONS {
        let r = h.region(f);
        let (o, s) = (r.offset as usize, r.size as usize);
        let fits = match f {
            Field::CommandRing => {
                RingLayout::new(mem.size(), o, s, slot_size::<CommandEntry, ResponseEntry>())
                    .map(|l| l.init_shared(mem))
                    .is_ok()
            }
            Field::EventRing => {
                RingLayout::new(mem.size(), o, s, slot_size::<EventEntry, EventAck>())
                    .map(|l| l.init_shared(mem))
                    .is_ok()
            }
            Field::OutputChannel | Field::InputChannel => ChannelLayout::new(mem.size(), o, s)
                .map(|l| l.init_shared(mem))
                .is_ok(),
            _ => true,
        };
        if !fits {
            bad = bad.or(Some(PublishError::Region(f)));
        }
    }
    mem.fence_release();
    mem.write_bytes(0, &h.magic.to_le_bytes());
    mem.fence_full();
    if let Some(e) = bad {
        return Err(e);
    }
    validate_header(h.as_bytes(), mem.size()).map_err(|_| PublishError::Invalid)
}

/// Write the control locator into `mem` (its page, at offset 0): every
/// word but the magic, a release fence, the magic.
pub fn publish_locator<M: SharedMem>(mem: &M, loc: &Locator) {
    let w = loc.encode();
    publish_locator_words(mem, &w[..LOCATOR_WORDS]);
}

/// Write a locator's words (magic first) at the start of `mem`: every
/// word but the magic, a release fence, the magic, so a reader that sees
/// the magic sees the rest (the control locator's and the device-model
/// locator's publication).
pub fn publish_locator_words<M: SharedMem>(mem: &M, words: &[u64]) {
    for (i, word) in words.iter().enumerate().skip(1) {
        mem.write_bytes(i * 8, &word.to_le_bytes());
    }
    mem.fence_release();
    if let Some(magic) = words.first() {
        mem.write_bytes(0, &magic.to_le_bytes());
    }
}
