//! The control area the hypervisor publishes in machine memory.
//!
//! It starts with a [`ControlHeader`] (found by its magic) that gives the
//! size and offset, relative to the start of the area, of every region:
//! command ring, event ring, output and input byte channels, the staging
//! area for checkpoint pages, the vCPU record area and the pfn list area.
//! The tool treats all of it as untrusted: [`validate`] checks magic,
//! version, every size and offset (in bounds, aligned, large enough, not
//! overlapping the header or each other) before anything is used.

use core::mem::{offset_of, size_of};

use zerocopy::FromBytes;

use crate::layout::layout_struct;

use crate::chan::{self, channel_capacity};
use crate::errno::Errno;
use crate::hvm::HvmHwCpu;
use crate::msg::{
    CheckpointReady, CommandEntry, EventAck, EventEntry, ResponseEntry, Span, PAGE_SIZE,
};
use crate::ring::{ring_entries, slot_size};

/// "DOPPELCA" read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"DOPPELCA");
/// The ABI version this crate speaks. Newer versions are refused.
pub const ABI_VERSION: u32 = 1;
/// Size of [`ControlHeader`].
pub const HEADER_SIZE: usize = 256;
/// Offset of [`ControlHeader::alive`], the liveness counter, from the start
/// of the control area (8-byte aligned).
pub const ALIVE_OFFSET: usize = 160;
/// Offset of [`ControlHeader::pause_cycles`], the last epoch-end pause,
/// right after the liveness counter (8-byte aligned).
pub const PAUSE_OFFSET: usize = 168;
/// Offset of [`ControlHeader::held_output`], the guest output held until
/// commit, right after the pause (8-byte aligned).
pub const HELD_OFFSET: usize = 176;

bitflags::bitflags! {
    /// What the hypervisor offers.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u64 {
        /// Log-dirty by write-protecting the nested page tables.
        const LOG_DIRTY_WP = 1 << 0;
        /// Log-dirty by Intel PML.
        const LOG_DIRTY_PML = 1 << 1;
        /// Log-dirty by scanning nested A/D bits.
        const LOG_DIRTY_AD_SCAN = 1 << 2;
        /// Checkpoint pages are staged copy-on-write.
        const COW_STAGING = 1 << 3;
        /// The input channel is served.
        const INPUT_CHANNEL = 1 << 4;
        /// A standby: the guest does not run; the backup tool writes its
        /// RAM and vCPU record and sends `Activate` (failover).
        const STANDBY = 1 << 5;
        /// Guest output is held per epoch until `CommitEpoch` releases it
        /// into the output channel (output commit).
        const OUTPUT_COMMIT = 1 << 6;
    }
}

layout_struct! {
    /// A region of the control area.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Region {
        /// From the start of the control area.
        pub offset: u64,
        pub size: u64,
    }
}

layout_struct! {
    /// The header at the start of the control area.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ControlHeader {
        /// [`MAGIC`].
        pub magic: u64,
        /// [`ABI_VERSION`].
        pub version: u32,
        /// [`HEADER_SIZE`].
        pub header_size: u32,
        /// Bytes of the whole control area, header included.
        pub total_size: u64,
        /// [`Features`] bits.
        pub features: u64,
        pub cmd_ring: Region,
        pub evt_ring: Region,
        pub out_chan: Region,
        pub in_chan: Region,
        pub staging: Region,
        pub vcpu_area: Region,
        pub pfn_list: Region,
        /// Where the protected guest's RAM lies in machine memory: `offset`
        /// is its machine-physical address (not relative to this area),
        /// `size` its bytes; both page aligned. Guest-physical 0 is at
        /// `offset`. Zero size: no guest published.
        pub guest_ram: Region,
        /// The hypervisor's liveness counter: it advances while the
        /// hypervisor runs (every guest exit, epoch end and command poll),
        /// and never otherwise. The tool reads it live from the mapping
        /// (at [`ALIVE_OFFSET`], one aligned 64-bit word that only the
        /// hypervisor writes) to tell a hypervisor that stopped (hung, or
        /// its emulator stopped) from one that only has nothing to say;
        /// its value means nothing, only whether it moved. Any value
        /// validates.
        pub alive: u64,
        /// The most recent epoch-end pause, in the hypervisor's TSC
        /// cycles: from the exit that ended the epoch (guest stopped) to
        /// the guest resuming with its checkpoint posted. Written by the
        /// hypervisor after each checkpoint (0: none measured yet); the
        /// tool reads it live (at [`PAUSE_OFFSET`]) when it commits an
        /// epoch, for its status and metrics. Any value validates.
        pub pause_cycles: u64,
        /// Bytes of guest output the hypervisor holds until their epoch
        /// commits (or a Detach releases them), updated as output is
        /// produced and released; the tool reads it live (at
        /// [`HELD_OFFSET`]) for its status and metrics. Any value
        /// validates.
        pub held_output: u64,
        /// Must be zero.
        pub reserved: [u64; 9],
    }
}

const _: () = assert!(size_of::<ControlHeader>() == HEADER_SIZE);
const _: () = assert!(offset_of!(ControlHeader, version) == 8);
const _: () = assert!(offset_of!(ControlHeader, header_size) == 12);
const _: () = assert!(offset_of!(ControlHeader, total_size) == 16);
const _: () = assert!(offset_of!(ControlHeader, features) == 24);
const _: () = assert!(offset_of!(ControlHeader, cmd_ring) == 32);
const _: () = assert!(offset_of!(ControlHeader, pfn_list) == 128);
const _: () = assert!(offset_of!(ControlHeader, guest_ram) == 144);
const _: () = assert!(offset_of!(ControlHeader, alive) == ALIVE_OFFSET);
const _: () = assert!(offset_of!(ControlHeader, pause_cycles) == PAUSE_OFFSET);
const _: () = assert!(offset_of!(ControlHeader, held_output) == HELD_OFFSET);
const _: () = assert!(offset_of!(ControlHeader, reserved) == 184);
const _: () = assert!(size_of::<Region>() == 16);
const _: () = assert!(offset_of!(Region, offset) == 0);
const _: () = assert!(offset_of!(Region, size) == 8);

/// A field of the header, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Magic,
    Version,
    HeaderSize,
    TotalSize,
    Features,
    Reserved,
    CommandRing,
    EventRing,
    OutputChannel,
    InputChannel,
    Staging,
    VcpuArea,
    PfnList,
    /// The guest RAM location (machine-physical, outside the area).
    GuestRam,
}

/// The regions, in header order.
pub const REGIONS: [Field; 7] = [
    Field::CommandRing,
    Field::EventRing,
    Field::OutputChannel,
    Field::InputChannel,
    Field::Staging,
    Field::VcpuArea,
    Field::PfnList,
];

/// Why a control area (or a span an event points at) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiError {
    /// Fewer bytes than a header.
    TooShort { have: usize },
    /// The magic is not [`MAGIC`].
    BadMagic(u64),
    /// Version 0 or newer than [`ABI_VERSION`].
    UnsupportedVersion(u32),
    /// `header_size` is not [`HEADER_SIZE`].
    BadHeaderSize(u32),
    /// `total_size` is below the header or beyond the mapped bytes.
    BadTotalSize { total: u64, mapped: usize },
    /// Feature bits this version does not define.
    UnknownFeatures(u64),
    /// The reserved words are not zero.
    ReservedNonZero,
    /// The region ends beyond `total_size` (or its end overflows).
    RegionOutOfBounds(Field),
    /// The region's offset or size breaks its alignment rule.
    RegionMisaligned(Field),
    /// The region cannot hold its minimum content.
    RegionTooSmall(Field),
    /// The region overlaps the header.
    RegionOverlapsHeader(Field),
    /// The two regions overlap.
    RegionOverlap(Field, Field),
    /// A span from an event lies outside the region it must be in.
    SpanOutside(Field),
}

impl AbiError {
    /// The errno this error is reported as on the ABI.
    pub const fn errno(self) -> Errno {
        match self {
            AbiError::UnsupportedVersion(_) => Errno::EOPNOTSUPP,
            AbiError::SpanOutside(_) => Errno::EFAULT,
            _ => Errno::EINVAL,
        }
    }
}

impl Field {
    /// (offset alignment, size granule, minimum size) of a region.
    const fn rules(self) -> (u64, u64, u64) {
        let cmd_slot = slot_size::<CommandEntry, ResponseEntry>() as u64;
        let evt_slot = slot_size::<EventEntry, EventAck>() as u64;
        let chan_min = (chan::HEADER_SIZE + chan::MIN_DATA) as u64;
        match self {
            Field::CommandRing => (64, 8, 64 + cmd_slot),
            Field::EventRing => (64, 8, 64 + evt_slot),
            Field::OutputChannel | Field::InputChannel => (64, 8, chan_min),
            Field::Staging => (PAGE_SIZE, PAGE_SIZE, PAGE_SIZE),
            Field::VcpuArea => (64, 8, size_of::<HvmHwCpu>() as u64),
            Field::PfnList => (8, 8, 8),
            _ => (1, 1, 0),
        }
    }
}

impl ControlHeader {
    /// The region for `f` (a zero region for non-region fields).
    pub const fn region(&self, f: Field) -> Region {
        match f {
            Field::CommandRing => self.cmd_ring,
            Field::EventRing => self.evt_ring,
            Field::OutputChannel => self.out_chan,
            Field::InputChannel => self.in_chan,
            Field::Staging => self.staging,
            Field::VcpuArea => self.vcpu_area,
            Field::PfnList => self.pfn_list,
            _ => Region { offset: 0, size: 0 },
        }
    }

    fn region_mut(&mut self, f: Field) -> Option<&mut Region> {
        Some(match f {
            Field::CommandRing => &mut self.cmd_ring,
            Field::EventRing => &mut self.evt_ring,
            Field::OutputChannel => &mut self.out_chan,
            Field::InputChannel => &mut self.in_chan,
            Field::Staging => &mut self.staging,
            Field::VcpuArea => &mut self.vcpu_area,
            Field::PfnList => &mut self.pfn_list,
            _ => return None,
        })
    }

    /// Lay out a control area (hypervisor side): regions of the given sizes
    /// (in [`REGIONS`] order) packed after the header, each aligned as
    /// [`validate`] requires. Fails with the error [`validate`] would give.
    pub fn pack(sizes: [u64; 7], features: Features) -> Result<Self, AbiError> {
        let mut h = ControlHeader {
            magic: MAGIC,
            version: ABI_VERSION,
            header_size: HEADER_SIZE as u32,
            total_size: 0,
            features: features.bits(),
            cmd_ring: Region::default(),
            evt_ring: Region::default(),
            out_chan: Region::default(),
            in_chan: Region::default(),
            staging: Region::default(),
            vcpu_area: Region::default(),
            pfn_list: Region::default(),
            guest_ram: Region::default(),
            alive: 0,
            pause_cycles: 0,
            held_output: 0,
            reserved: [0; 9],
        };
        let mut at = HEADER_SIZE as u64;
        for (f, size) in REGIONS.into_iter().zip(sizes) {
            let (align, _, _) = f.rules();
            let offset = at
                .checked_next_multiple_of(align)
                .ok_or(AbiError::RegionOutOfBounds(f))?;
            at = offset
                .checked_add(size)
                .ok_or(AbiError::RegionOutOfBounds(f))?;
            if let Some(r) = h.region_mut(f) {
                *r = Region { offset, size };
            }
        }
        h.total_size = at;
        check(&h, usize::MAX)?;
        Ok(h)
    }
}

/// A validated control area: every region is known to be in bounds,
/// aligned, large enough and disjoint from the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlView {
    header: ControlHeader,
}

impl ControlView {
    /// The validated header.
    pub fn header(&self) -> &ControlHeader {
        &self.header
    }

    /// Total bytes of the control area.
    pub fn total_size(&self) -> u64 {
        self.header.total_size
    }

    /// Offered features.
    pub fn features(&self) -> Features {
        Features::from_bits_retain(self.header.features)
    }

    /// A region as `(offset, size)` in `usize`, ready for ring/channel attach.
    pub fn region(&self, f: Field) -> (usize, usize) {
        let r = self.header.region(f);
        // In bounds of a mapping of `total_size <= mapped` bytes: fits usize.
        (r.offset as usize, r.size as usize)
    }

    /// Check that `span` lies inside region `f`.
    pub fn check_span(&self, f: Field, span: Span) -> Result<(), AbiError> {
        let r = self.header.region(f);
        match span.end() {
            Some(end) if span.offset >= r.offset && end <= r.offset + r.size => Ok(()),
            _ => Err(AbiError::SpanOutside(f)),
        }
    }

    /// Check that every part of a checkpoint lies in its region.
    pub fn check_checkpoint(&self, c: &CheckpointReady) -> Result<(), AbiError> {
        self.check_span(Field::PfnList, c.pfn_list)?;
        self.check_span(Field::Staging, c.pages)?;
        self.check_span(Field::VcpuArea, c.vcpu)
    }
}

fn check(h: &ControlHeader, mapped: usize) -> Result<(), AbiError> {
    if h.magic != MAGIC {
        return Err(AbiError::BadMagic(h.magic));
    }
    if h.version == 0 || h.version > ABI_VERSION {
        return Err(AbiError::UnsupportedVersion(h.version));
    }
    if h.header_size as usize != HEADER_SIZE {
        return Err(AbiError::BadHeaderSize(h.header_size));
    }
    if h.total_size < HEADER_SIZE as u64 || h.total_size > mapped as u64 {
        return Err(AbiError::BadTotalSize {
            total: h.total_size,
            mapped,
        });
    }
    if Features::from_bits(h.features).is_none() {
        return Err(AbiError::UnknownFeatures(
            h.features & !Features::all().bits(),
        ));
    }
    if h.reserved != [0; 9] {
        return Err(AbiError::ReservedNonZero);
    }
    let g = h.guest_ram;
    if !g.offset.is_multiple_of(PAGE_SIZE)
        || !g.size.is_multiple_of(PAGE_SIZE)
        || g.offset.checked_add(g.size).is_none()
    {
        return Err(AbiError::RegionMisaligned(Field::GuestRam));
    }
    for f in REGIONS {
        let r = h.region(f);
        let (align, granule, min) = f.rules();
        match r.offset.checked_add(r.size) {
            Some(end) if end <= h.total_size => {}
            _ => return Err(AbiError::RegionOutOfBounds(f)),
        }
        if !r.offset.is_multiple_of(align) || !r.size.is_multiple_of(granule) {
            return Err(AbiError::RegionMisaligned(f));
        }
        let usable = match f {
            Field::CommandRing => {
                ring_entries(r.size as usize, slot_size::<CommandEntry, ResponseEntry>()) > 0
            }
            Field::EventRing => {
                ring_entries(r.size as usize, slot_size::<EventEntry, EventAck>()) > 0
            }
            Field::OutputChannel | Field::InputChannel => channel_capacity(r.size as usize) > 0,
            _ => true,
        };
        if r.size < min || !usable {
            return Err(AbiError::RegionTooSmall(f));
        }
        if r.offset < HEADER_SIZE as u64 {
            return Err(AbiError::RegionOverlapsHeader(f));
        }
    }
    for (i, a) in REGIONS.into_iter().enumerate() {
        for b in REGIONS.into_iter().skip(i + 1) {
            let (ra, rb) = (h.region(a), h.region(b));
            // Both are in bounds, so the ends do not overflow.
            if ra.offset < rb.offset + rb.size && rb.offset < ra.offset + ra.size {
                return Err(AbiError::RegionOverlap(a, b));
            }
        }
    }
    Ok(())
}

/// Validate the control area in `bytes` (its header at the start; `bytes`
/// is all that is mapped). Only the header is read; it is copied first.
pub fn validate(bytes: &[u8]) -> Result<ControlView, AbiError> {
    validate_header(bytes, bytes.len())
}

/// As [`validate`], for a header copied out of a mapping of `mapped` bytes.
pub fn validate_header(header: &[u8], mapped: usize) -> Result<ControlView, AbiError> {
    let Some(src) = header.get(..HEADER_SIZE) else {
        return Err(AbiError::TooShort { have: header.len() });
    };
    let h = ControlHeader::read_from_bytes(src)
        .map_err(|_| AbiError::TooShort { have: header.len() })?;
    check(&h, mapped)?;
    Ok(ControlView { header: h })
}
