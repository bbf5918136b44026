//! The device-model interface (issue 20): how the hypervisor hands the
//! guest's accesses to devices it does not emulate to a device model in
//! dom0 (`doppel run`), and how the device model raises the devices'
//! interrupts.
//!
//! The requests are Xen's (public/hvm/ioreq.h, checked by the
//! `xen-conformance-layout` step against libxen-dev's header): one
//! [`Ioreq`] slot per vCPU in a shared ioreq page for accesses that need an
//! answer (reads, and writes the guest must see completed), and the
//! buffered ioreq ring ([`BufferedIopage`], 511 eight-byte [`BufIoreq`]
//! slots) for writes that need none (virtio queue notifies). They live in
//! Doppel's device-model area: a header page ([`DmHeader`]: the MMIO
//! window forwarded to the device model, the devices in it with their
//! GSIs, liveness counters and the interrupt words), then the ioreq page,
//! then the buffered page. The hypervisor publishes the area's address in
//! the second half of the locator page ([`DM_LOCATOR_OFFSET`]), as it does
//! the replication control area's.
//!
//! Both sides are untrusted by the other: every state, size, type and
//! address read back is checked ([`IoreqError`]), and an error changes
//! nothing (the hypervisor then stops the guest with the error named;
//! the device model drops the request).
//!
//! Protocol of the synchronous slot (Xen's states): the hypervisor fills
//! the slot and publishes `READY` (release); the device model sees it
//! (acquire), may publish `INPROCESS`, does the access, writes `data` for
//! a read and publishes `IORESP_READY` (release); the hypervisor reads the
//! answer and publishes `NONE`. The state sits in the slot's last 32-bit
//! word with the direction and type, which each side writes whole, at its
//! own turn only.
//!
//! The buffered ring: Xen's free-running `read_pointer` (device model) and
//! `write_pointer` (hypervisor), slot `pointer % 511`, full when they are
//! 511 apart. A buffered request's 20-bit `addr` is the offset of the
//! access in the forwarded MMIO window (Xen's is a port or a legacy VGA
//! address; ours are all in the window).
//!
//! The epoch handshake (version 2, issue 21): before the hypervisor stages
//! the checkpoint of epoch E it writes `quiesce = E + 1` (release); the
//! device model drains the buffered ring, seals E, ORs the guest pages it
//! wrote itself since its last seal (DMA the hypervisor's tracker never
//! sees) into the dirty bitmap after the buffered page, one bit per guest
//! pfn, and publishes `quiesced = E + 1` (release). From then on it does
//! not touch guest RAM until `resume == quiesced`: the hypervisor swaps the
//! bitmap's words to zero into its harvest, stages, and writes
//! `resume = E + 1` (release). The device model is held while
//! `quiesced != resume` ([`dm_held`]).

use crate::layout::layout_struct;
use crate::SharedMem;

/// `dir`: the guest reads (the device model answers with `data`).
pub const IOREQ_READ: u8 = 1;
/// `dir`: the guest writes `data`.
pub const IOREQ_WRITE: u8 = 0;

/// Xen's `STATE_*` of an ioreq slot.
pub mod state {
    pub const NONE: u8 = 0;
    pub const READY: u8 = 1;
    pub const INPROCESS: u8 = 2;
    pub const IORESP_READY: u8 = 3;
}

/// Xen's `IOREQ_TYPE_*`.
pub mod kind {
    /// Port I/O.
    pub const PIO: u8 = 0;
    /// MMIO.
    pub const COPY: u8 = 1;
    pub const PCI_CONFIG: u8 = 2;
    pub const TIMEOFFSET: u8 = 7;
    pub const INVALIDATE: u8 = 8;
}

/// Xen's `IOREQ_BUFFER_SLOT_NUM`.
pub const IOREQ_BUFFER_SLOT_NUM: u32 = 511;

layout_struct! {
    /// Xen's `struct ioreq`. `flags` holds the C bit-fields `state:4,
    /// data_is_ptr:1, dir:1, df:1, _pad1:1` (bit 0 first, as GCC lays them
    /// out on x86).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Ioreq {
        pub addr: u64,
        pub data: u64,
        pub count: u32,
        pub size: u32,
        pub vp_eport: u32,
        pub pad0: u16,
        pub flags: u8,
        pub type_: u8,
    }
}

const _: () = assert!(core::mem::size_of::<Ioreq>() == 32);
const _: () = assert!(core::mem::offset_of!(Ioreq, flags) == 30);

/// Bits of [`Ioreq::flags`].
pub mod flag {
    pub const STATE_MASK: u8 = 0x0f;
    pub const DATA_IS_PTR: u8 = 1 << 4;
    pub const DIR_READ: u8 = 1 << 5;
    pub const DF: u8 = 1 << 6;
}

/// Offset in the slot of the 32-bit word holding `pad0`, `flags` (with
/// the state) and `type`: the word each side writes to change the state.
pub const STATE_WORD: usize = 28;

/// Xen's `struct buf_ioreq`, as the 64-bit little-endian word GCC lays it
/// out in: `type` bits 0-7, `pad` bit 8, `dir` bit 9, `size` bits 10-11
/// (0 => 1 byte, 1 => 2, 2 => 4, 3 => 8), `addr` bits 12-31, `data` bits
/// 32-63.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufIoreq(pub u64);

/// Bytes of the buffered page's header: `read_pointer`, `write_pointer`.
pub const BUF_HEADER: usize = 8;
/// Bytes of one [`BufIoreq`].
pub const BUF_SLOT: usize = 8;
const _: () = assert!(BUF_HEADER + IOREQ_BUFFER_SLOT_NUM as usize * BUF_SLOT <= PAGE);

/// The largest offset a buffered request can name (20 bits).
pub const BUF_ADDR_LIMIT: u64 = 1 << 20;

/// A write that needs no answer, as the buffered ring carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufWrite {
    /// Offset in the forwarded MMIO window.
    pub offset: u32,
    /// 1, 2 or 4.
    pub size: u8,
    pub data: u32,
}

impl BufIoreq {
    /// The slot for `w` (a write of 1, 2 or 4 bytes in the window); `None`
    /// when it cannot be carried (8 bytes, or an offset beyond 20 bits).
    pub fn write(w: BufWrite) -> Option<Self> {
        let size = match w.size {
            1 => 0u64,
            2 => 1,
            4 => 2,
            _ => return None,
        };
        if u64::from(w.offset) >= BUF_ADDR_LIMIT {
            return None;
        }
        Some(Self(
            u64::from(kind::COPY)
                | (size << 10)
                | (u64::from(w.offset) << 12)
                | (u64::from(w.data) << 32),
        ))
    }

    /// The write this slot carries, or why it is not one we post.
    pub fn decode(self) -> Result<BufWrite, IoreqError> {
        let v = self.0;
        let ty = v as u8;
        if ty != kind::COPY {
            return Err(IoreqError::BadType(ty));
        }
        if v & (1 << 8) != 0 {
            return Err(IoreqError::BadPad);
        }
        if v & (1 << 9) != 0 {
            return Err(IoreqError::BufferedRead);
        }
        let size = match (v >> 10) & 3 {
            0 => 1,
            1 => 2,
            2 => 4,
            _ => return Err(IoreqError::BadSize(8)),
        };
        Ok(BufWrite {
            offset: ((v >> 12) & 0xf_ffff) as u32,
            size,
            data: (v >> 32) as u32,
        })
    }
}

/// Page size of the area's pages.
pub const PAGE: usize = 4096;

/// "DOPPELDM" as a little-endian `u64`: the area header's first word.
pub const DM_MAGIC: u64 = u64::from_le_bytes(*b"DOPPELDM");
/// Version of this layout.
pub const DM_VERSION: u32 = 2;
/// Devices an area can declare at most.
pub const MAX_DEVICES: usize = 8;

/// What a device is.
pub mod device {
    /// virtio-net over virtio-mmio.
    pub const NET: u32 = 1;
    /// virtio-blk over virtio-mmio.
    pub const BLK: u32 = 2;
}

layout_struct! {
    /// One device the hypervisor forwards to the device model: its
    /// virtio-mmio registers and its interrupt.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DmDevice {
        /// [`device`]; 0 = no device in this slot.
        pub kind: u32,
        /// The IOAPIC input it interrupts on.
        pub gsi: u32,
        /// Guest-physical base of its registers (inside the window).
        pub base: u64,
        pub size: u64,
    }
}

layout_struct! {
    /// The device-model area's header page.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DmHeader {
        /// [`DM_MAGIC`].
        pub magic: u64,
        /// [`DM_VERSION`].
        pub version: u32,
        /// Devices declared in `devices` (the rest are zero).
        pub device_count: u32,
        /// Bytes of the area (header, ioreq and buffered pages).
        pub total_size: u64,
        /// Guest RAM in machine memory: machine-physical address and
        /// bytes; guest-physical 0 is at `guest_ram_at`.
        pub guest_ram_at: u64,
        pub guest_ram_size: u64,
        /// The guest-physical MMIO window forwarded to the device model.
        pub window_base: u64,
        pub window_size: u64,
        /// Offsets in the area of the ioreq page and the buffered page.
        pub ioreq_page: u64,
        pub buffered_page: u64,
        /// Advanced by the hypervisor while it runs.
        pub hv_alive: u64,
        /// Advanced by the device model while it serves.
        pub dm_alive: u64,
        pub devices: [DmDevice; MAX_DEVICES],
        /// Interrupt words, one per device slot, written by the device
        /// model only: `(seq << 32) | gsi`. A new `seq` asks for one edge
        /// on `gsi`, which must be that device's.
        pub irq: [u64; MAX_DEVICES],
        /// Offset in the area of the device model's dirty bitmap (page
        /// aligned, after the buffered page) and its bytes (whole pages,
        /// at least one bit per guest page: bit `p` = guest pfn `p`).
        pub dirty_page: u64,
        pub dirty_bytes: u64,
        /// The epoch handshake, each word `epoch + 1` (0: never): the
        /// hypervisor asks for the end of an epoch (`quiesce`), the device
        /// model answers once sealed with its bits in the bitmap
        /// (`quiesced`), the hypervisor lets it go on (`resume`).
        pub quiesce: u64,
        pub quiesced: u64,
        pub resume: u64,
    }
}

const _: () = assert!(core::mem::size_of::<DmHeader>() <= PAGE);

/// Where the hypervisor puts virtio-mmio devices: the forwarded window
/// (guest-physical, above any guest RAM this version gives and below the
/// IOAPIC), one device every [`VIRTIO_STRIDE`] bytes from its base, each
/// with [`VIRTIO_REGS`] bytes of registers, device `i` on GSI
/// [`VIRTIO_FIRST_GSI`]` + i`.
pub const VIRTIO_WINDOW_BASE: u64 = 0xD000_0000;
pub const VIRTIO_WINDOW_SIZE: u64 = 1 << 20;
pub const VIRTIO_STRIDE: u64 = 0x1000;
pub const VIRTIO_REGS: u64 = 0x200;
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// virtio-mmio's QueueNotify register: the one write the hypervisor posts
/// on the buffered ring (the guest needs no answer to it).
pub const VIRTIO_QUEUE_NOTIFY: u64 = 0x50;

/// The devices of `kinds` ([`device`] values, at most [`MAX_DEVICES`]),
/// placed as [`VIRTIO_WINDOW_BASE`] says.
pub fn virtio_devices(kinds: &[u32]) -> impl Iterator<Item = DmDevice> + '_ {
    kinds
        .iter()
        .take(MAX_DEVICES)
        .enumerate()
        .map(|(i, &kind)| DmDevice {
            kind,
            gsi: VIRTIO_FIRST_GSI + i as u32,
            base: VIRTIO_WINDOW_BASE + i as u64 * VIRTIO_STRIDE,
            size: VIRTIO_REGS,
        })
}

/// Offsets of the header's live words.
pub const HV_ALIVE_OFFSET: usize = core::mem::offset_of!(DmHeader, hv_alive);
pub const DM_ALIVE_OFFSET: usize = core::mem::offset_of!(DmHeader, dm_alive);
pub const IRQ_OFFSET: usize = core::mem::offset_of!(DmHeader, irq);
/// Offsets of the epoch handshake's words.
pub const QUIESCE_OFFSET: usize = core::mem::offset_of!(DmHeader, quiesce);
pub const QUIESCED_OFFSET: usize = core::mem::offset_of!(DmHeader, quiesced);
pub const RESUME_OFFSET: usize = core::mem::offset_of!(DmHeader, resume);
const _: () = assert!(IRQ_OFFSET == 280);
const _: () = assert!(core::mem::offset_of!(DmHeader, dirty_page) == 344);
const _: () = assert!(core::mem::offset_of!(DmHeader, dirty_bytes) == 352);
const _: () = assert!(QUIESCE_OFFSET == 360);
const _: () = assert!(QUIESCED_OFFSET == 368);
const _: () = assert!(RESUME_OFFSET == 376);
const _: () = assert!(core::mem::size_of::<DmHeader>() == 384);

/// Offset in the area of the dirty bitmap: right after the buffered page.
pub const DM_DIRTY_PAGE: u64 = 3 * PAGE as u64;
/// The smallest area: header, ioreq page, buffered page and one page of
/// dirty bitmap.
pub const DM_AREA_SIZE: u64 = DM_DIRTY_PAGE + PAGE as u64;

/// Guest pages in `guest_ram_size` bytes (a partial page counts).
pub const fn guest_pages(guest_ram_size: u64) -> u64 {
    guest_ram_size.div_ceil(PAGE as u64)
}

/// Bytes of the dirty bitmap for `guest_ram_size` bytes of guest RAM:
/// one bit per guest page, in whole pages (at least one).
pub const fn dm_dirty_bytes(guest_ram_size: u64) -> u64 {
    let b = guest_pages(guest_ram_size)
        .div_ceil(8)
        .next_multiple_of(PAGE as u64);
    if b == 0 {
        PAGE as u64
    } else {
        b
    }
}

/// Bytes of the whole area for `guest_ram_size` bytes of guest RAM:
/// header, ioreq page, buffered page, dirty bitmap.
pub const fn dm_area_size(guest_ram_size: u64) -> u64 {
    DM_DIRTY_PAGE + dm_dirty_bytes(guest_ram_size)
}

/// Where guest pfn `pfn`'s bit lies in the dirty bitmap: the byte offset
/// of its 32-bit word from the bitmap's start, and its mask.
pub const fn dirty_bit(pfn: u64) -> (usize, u32) {
    (((pfn / 32) * 4) as usize, 1 << (pfn % 32))
}

/// Whether the device model is held (must not touch guest RAM) given the
/// handshake words it reads: it answered a quiesce the hypervisor has not
/// yet resumed.
pub const fn dm_held(quiesced: u64, resume: u64) -> bool {
    quiesced != resume
}

/// Where the device-model locator lies in the locator page: its second
/// half (the first holds the replication control area's).
pub const DM_LOCATOR_OFFSET: u64 = 2048;
/// "DOPPELDL" as a little-endian `u64`: the device-model locator's magic.
pub const DM_LOCATOR_MAGIC: u64 = u64::from_le_bytes(*b"DOPPELDL");

/// Little-endian `u64` words of the device-model locator: magic, area
/// address, area size.
pub const DM_LOCATOR_WORDS: usize = 3;

/// The device-model locator's words for an area at machine address `at`
/// (page aligned) of `size` bytes; the hypervisor writes words 1.. and
/// then, after a release fence, word 0.
pub const fn dm_locator(at: u64, size: u64) -> [u64; DM_LOCATOR_WORDS] {
    [DM_LOCATOR_MAGIC, at, size]
}

/// The area's `(address, size)` from the locator's words, checked against
/// `len` bytes of machine memory: published, page aligned, inside memory,
/// at least [`DM_AREA_SIZE`], and apart from the locator page at
/// `locator_at`.
pub fn dm_locator_decode(
    words: [u64; DM_LOCATOR_WORDS],
    len: u64,
    locator_at: u64,
) -> Result<(u64, u64), IoreqError> {
    let [magic, at, size] = words;
    if magic != DM_LOCATOR_MAGIC {
        return Err(IoreqError::BadHeader(
            "no device-model area published (is the hypervisor running mode=linux with devices=?)",
        ));
    }
    if at % PAGE as u64 != 0 || size % PAGE as u64 != 0 || size < DM_AREA_SIZE {
        return Err(IoreqError::BadHeader(
            "a device-model area that is misaligned or too small",
        ));
    }
    if at.checked_add(size).is_none_or(|end| end > len) {
        return Err(IoreqError::BadHeader(
            "a device-model area beyond machine memory",
        ));
    }
    if at < locator_at + PAGE as u64 && locator_at < at + size {
        return Err(IoreqError::BadHeader(
            "a device-model area over the locator page",
        ));
    }
    Ok((at, size))
}

/// Why a request, an answer, a buffered slot, an interrupt word or an
/// area header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoreqError {
    /// A state the reader's turn does not allow.
    BadState(u8),
    /// A size other than 1, 2, 4 or 8.
    BadSize(u32),
    /// A type other than PIO or COPY.
    BadType(u8),
    /// `data_is_ptr`, `df` or a `count` other than 1: string accesses are
    /// never forwarded.
    NotSingle,
    /// The buffered slot's pad bit is set.
    BadPad,
    /// A buffered slot asks for a read (reads need an answer).
    BufferedRead,
    /// The answer changed the request's address, size, type or direction.
    AnswerChangedRequest,
    /// The buffered ring's pointers are further apart than its slots.
    BadPointers { read: u32, write: u32 },
    /// An interrupt word names a GSI that is not its device's.
    ForeignGsi { slot: usize, gsi: u32 },
    /// The area header does not validate (what is wrong).
    BadHeader(&'static str),
}

impl IoreqError {
    pub fn text(self) -> &'static str {
        match self {
            IoreqError::BadState(_) => "an ioreq slot in a state this side's turn does not allow",
            IoreqError::BadSize(_) => "an access size other than 1, 2, 4 or 8",
            IoreqError::BadType(_) => "an ioreq type other than port I/O or MMIO",
            IoreqError::NotSingle => "a string or indirect ioreq (never forwarded)",
            IoreqError::BadPad => "a buffered ioreq with its pad bit set",
            IoreqError::BufferedRead => "a buffered ioreq that reads",
            IoreqError::AnswerChangedRequest => {
                "an ioreq answer that changed the request's address, size, type or direction"
            }
            IoreqError::BadPointers { .. } => "buffered ioreq pointers further apart than 511",
            IoreqError::ForeignGsi { .. } => {
                "an interrupt request for a GSI that is not the device's"
            }
            IoreqError::BadHeader(w) => w,
        }
    }
}

/// One access that needs an answer, as the hypervisor posts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// [`kind::PIO`] or [`kind::COPY`].
    pub kind: u8,
    /// Port or guest-physical address.
    pub addr: u64,
    /// 1, 2, 4 or 8.
    pub size: u8,
    /// The guest reads (else writes `data`).
    pub read: bool,
    /// What a write writes (0 for a read).
    pub data: u64,
}

impl Access {
    /// The slot for this access, in `state`.
    pub fn slot(&self, state: u8) -> Ioreq {
        Ioreq {
            addr: self.addr,
            data: if self.read { 0 } else { self.data },
            count: 1,
            size: u32::from(self.size),
            vp_eport: 0,
            pad0: 0,
            flags: (state & flag::STATE_MASK) | if self.read { flag::DIR_READ } else { 0 },
            type_: self.kind,
        }
    }

    /// The access a slot the hypervisor published carries (the device
    /// model's check of what it reads).
    pub fn from_slot(s: &Ioreq) -> Result<Self, IoreqError> {
        if s.flags & flag::STATE_MASK != state::READY {
            return Err(IoreqError::BadState(s.flags & flag::STATE_MASK));
        }
        if s.type_ != kind::PIO && s.type_ != kind::COPY {
            return Err(IoreqError::BadType(s.type_));
        }
        if s.flags & (flag::DATA_IS_PTR | flag::DF) != 0 || s.count != 1 {
            return Err(IoreqError::NotSingle);
        }
        let size = match s.size {
            1 | 2 | 4 | 8 => s.size as u8,
            n => return Err(IoreqError::BadSize(n)),
        };
        let read = s.flags & flag::DIR_READ != 0;
        Ok(Self {
            kind: s.type_,
            addr: s.addr,
            size,
            read,
            data: if read { 0 } else { s.data },
        })
    }

    /// Check the answer `s` to this access and return what a read reads
    /// (masked to the access's size; 0 for a write).
    pub fn answer(&self, s: &Ioreq) -> Result<u64, IoreqError> {
        let st = s.flags & flag::STATE_MASK;
        if st != state::IORESP_READY {
            return Err(IoreqError::BadState(st));
        }
        let posted = self.slot(state::IORESP_READY);
        if s.addr != posted.addr
            || s.size != posted.size
            || s.type_ != posted.type_
            || s.count != posted.count
            || s.flags != posted.flags
        {
            return Err(IoreqError::AnswerChangedRequest);
        }
        if !self.read {
            return Ok(0);
        }
        Ok(match self.size {
            8 => s.data,
            n => s.data & ((1u64 << (u32::from(n) * 8)) - 1),
        })
    }
}

/// Read the ioreq slot at `at` of `mem` (the bytes may tear while the peer
/// writes: read the state word after an acquire fence first).
pub fn read_slot<M: SharedMem>(mem: &M, at: usize) -> Ioreq {
    let mut b = [0u8; 32];
    mem.read_bytes(at, &mut b);
    let mut s = Ioreq::default();
    zerocopy::IntoBytes::as_mut_bytes(&mut s).copy_from_slice(&b);
    s
}

/// The state in the slot at `at` (one atomic 32-bit load, acquire).
pub fn slot_state<M: SharedMem>(mem: &M, at: usize) -> u8 {
    let w = mem.load_u32(at + STATE_WORD);
    mem.fence_acquire();
    (w >> 16) as u8 & flag::STATE_MASK
}

/// Write slot `s` at `at`: everything but the state word, a release
/// fence, then the state word (one atomic 32-bit store), so the peer that
/// sees the new state sees the rest.
pub fn publish_slot<M: SharedMem>(mem: &M, at: usize, s: &Ioreq) {
    let b = zerocopy::IntoBytes::as_bytes(s);
    mem.write_bytes(at, &b[..STATE_WORD]);
    mem.fence_release();
    let word = u32::from(s.pad0) | (u32::from(s.flags) << 16) | (u32::from(s.type_) << 24);
    mem.store_u32(at + STATE_WORD, word);
}

/// The hypervisor's end of the buffered ring in `mem` at `at`: push one
/// write. False when the ring is full (the caller waits, or posts it
/// synchronously).
pub fn buffered_push<M: SharedMem>(mem: &M, at: usize, w: BufIoreq) -> Result<bool, IoreqError> {
    let read = mem.load_u32(at);
    let write = mem.load_u32(at + 4);
    let used = write.wrapping_sub(read);
    if used > IOREQ_BUFFER_SLOT_NUM {
        return Err(IoreqError::BadPointers { read, write });
    }
    if used == IOREQ_BUFFER_SLOT_NUM {
        return Ok(false);
    }
    let slot = (write % IOREQ_BUFFER_SLOT_NUM) as usize;
    mem.write_bytes(at + BUF_HEADER + slot * BUF_SLOT, &w.0.to_le_bytes());
    mem.fence_release();
    mem.store_u32(at + 4, write.wrapping_add(1));
    Ok(true)
}

/// The device model's end of the buffered ring in `mem` at `at`: take
/// the next write, if any. A slot that does not decode is consumed and
/// reported (nothing else changes).
pub fn buffered_pop<M: SharedMem>(mem: &M, at: usize) -> Option<Result<BufWrite, IoreqError>> {
    let read = mem.load_u32(at);
    let write = mem.load_u32(at + 4);
    mem.fence_acquire();
    let used = write.wrapping_sub(read);
    if used == 0 {
        return None;
    }
    if used > IOREQ_BUFFER_SLOT_NUM {
        return Some(Err(IoreqError::BadPointers { read, write }));
    }
    let slot = (read % IOREQ_BUFFER_SLOT_NUM) as usize;
    let mut b = [0u8; 8];
    mem.read_bytes(at + BUF_HEADER + slot * BUF_SLOT, &mut b);
    mem.fence_full();
    mem.store_u32(at, read.wrapping_add(1));
    Some(BufIoreq(u64::from_le_bytes(b)).decode())
}

/// An interrupt word: `(seq << 32) | gsi`.
pub const fn irq_word(seq: u32, gsi: u32) -> u64 {
    ((seq as u64) << 32) | gsi as u64
}

/// The hypervisor's check of interrupt word `word` of device slot `slot`
/// (whose GSI is `gsi`) against the sequence it saw last: `Ok(true)` for
/// one new edge on the device's GSI, `Ok(false)` for nothing new, an error
/// for a word naming another GSI (the caller keeps `last` as it was).
pub fn irq_check(slot: usize, gsi: u32, word: u64, last: u32) -> Result<bool, IoreqError> {
    let seq = (word >> 32) as u32;
    if seq == last {
        return Ok(false);
    }
    let named = word as u32;
    if named != gsi {
        return Err(IoreqError::ForeignGsi { slot, gsi: named });
    }
    Ok(true)
}

impl DmHeader {
    /// A header for guest RAM at `guest_ram_at` (`guest_ram_size` bytes),
    /// the window `[window_base, +window_size)` and `devices`.
    pub fn new(
        guest_ram_at: u64,
        guest_ram_size: u64,
        window_base: u64,
        window_size: u64,
        devices: &[DmDevice],
    ) -> Self {
        let mut d = [DmDevice::default(); MAX_DEVICES];
        for (slot, dev) in d.iter_mut().zip(devices) {
            *slot = *dev;
        }
        Self {
            magic: DM_MAGIC,
            version: DM_VERSION,
            device_count: devices.len().min(MAX_DEVICES) as u32,
            total_size: dm_area_size(guest_ram_size),
            guest_ram_at,
            guest_ram_size,
            window_base,
            window_size,
            ioreq_page: PAGE as u64,
            buffered_page: 2 * PAGE as u64,
            hv_alive: 0,
            dm_alive: 0,
            devices: d,
            irq: [0; MAX_DEVICES],
            dirty_page: DM_DIRTY_PAGE,
            dirty_bytes: dm_dirty_bytes(guest_ram_size),
            quiesce: 0,
            quiesced: 0,
            resume: 0,
        }
    }

    /// The device model's check of a header it read: the layout this
    /// version defines, devices inside the window and apart, the window
    /// within what a buffered request can name.
    pub fn validate(&self) -> Result<(), IoreqError> {
        let bad = |w| Err(IoreqError::BadHeader(w));
        if self.magic != DM_MAGIC {
            return bad("no device-model area magic (\"DOPPELDM\")");
        }
        if self.version != DM_VERSION {
            return bad("a device-model area version this tool does not know");
        }
        if self.ioreq_page != PAGE as u64 || self.buffered_page != 2 * PAGE as u64 {
            return bad("a device-model area layout this version does not define");
        }
        if self.dirty_page < DM_DIRTY_PAGE
            || !self.dirty_page.is_multiple_of(PAGE as u64)
            || !self.dirty_bytes.is_multiple_of(PAGE as u64)
        {
            return bad("a dirty bitmap that is not whole pages after the buffered page");
        }
        if self.dirty_bytes < guest_pages(self.guest_ram_size).div_ceil(8) {
            return bad("a dirty bitmap with fewer bits than guest pages");
        }
        if self
            .dirty_page
            .checked_add(self.dirty_bytes)
            .is_none_or(|end| end > self.total_size)
            || !self.total_size.is_multiple_of(PAGE as u64)
        {
            return bad("a dirty bitmap beyond the area's total_size");
        }
        if self.window_size == 0
            || self.window_size > BUF_ADDR_LIMIT
            || self.window_base.checked_add(self.window_size).is_none()
        {
            return bad("a forwarded MMIO window that is empty, over 1 MiB or wraps");
        }
        if self.guest_ram_size == 0 || self.guest_ram_at.checked_add(self.guest_ram_size).is_none()
        {
            return bad("no guest RAM, or guest RAM that wraps");
        }
        let n = self.device_count as usize;
        if n > MAX_DEVICES {
            return bad("more devices than the area has slots");
        }
        let end = self.window_base + self.window_size;
        for (i, d) in self.devices.iter().enumerate() {
            if i >= n {
                if *d != DmDevice::default() {
                    return bad("a device slot past device_count that is not empty");
                }
                continue;
            }
            if d.kind != device::NET && d.kind != device::BLK {
                return bad("a device of a kind this version does not define");
            }
            if d.size == 0 || d.base < self.window_base || d.base.saturating_add(d.size) > end {
                return bad("a device whose registers are not inside the window");
            }
            for e in &self.devices[..i] {
                if d.base < e.base + e.size && e.base < d.base + d.size {
                    return bad("two devices whose registers overlap");
                }
                if d.gsi == e.gsi {
                    return bad("two devices on one GSI");
                }
            }
        }
        Ok(())
    }

    /// The declared devices.
    pub fn devices(&self) -> &[DmDevice] {
        &self.devices[..(self.device_count as usize).min(MAX_DEVICES)]
    }

    /// The device slot whose registers hold `[addr, addr + size)`.
    pub fn device_at(&self, addr: u64, size: u64) -> Option<usize> {
        self.devices().iter().position(|d| {
            addr >= d.base && addr.checked_add(size).is_some_and(|e| e <= d.base + d.size)
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::ByteMem;
    use std::vec;

    fn write(offset: u32, size: u8, data: u32) -> BufWrite {
        BufWrite { offset, size, data }
    }

    #[test]
    fn a_buffered_write_packs_as_gcc_lays_out_buf_ioreq() {
        // type=COPY, dir=0, size=2 (4 bytes), addr=0x12345, data=0xdeadbeef.
        let w = BufIoreq::write(write(0x12345, 4, 0xdead_beef)).unwrap();
        assert_eq!(w.0, 0xdead_beef_1234_5801);
        assert_eq!(w.decode(), Ok(write(0x12345, 4, 0xdead_beef)));
        assert_eq!(BufIoreq::write(write(1 << 20, 4, 0)), None, "21 bits");
        assert_eq!(BufIoreq::write(write(0, 8, 0)), None, "8 bytes");
        assert_eq!(
            BufIoreq(w.0 | (1 << 9)).decode(),
            Err(IoreqError::BufferedRead)
        );
        assert_eq!(BufIoreq(w.0 | (1 << 8)).decode(), Err(IoreqError::BadPad));
        assert_eq!(BufIoreq(w.0 & !0xff).decode(), Err(IoreqError::BadType(0)));
        assert_eq!(
            BufIoreq(w.0 | (3 << 10)).decode(),
            Err(IoreqError::BadSize(8))
        );
    }

    #[test]
    fn the_buffered_ring_fills_at_511_and_refuses_wild_pointers() {
        let mem = ByteMem::new(vec![0u8; PAGE]);
        for i in 0..IOREQ_BUFFER_SLOT_NUM {
            let w = BufIoreq::write(write(0x50, 4, i)).unwrap();
            assert_eq!(buffered_push(&mem, 0, w), Ok(true));
        }
        let extra = BufIoreq::write(write(0x50, 4, 9999)).unwrap();
        assert_eq!(buffered_push(&mem, 0, extra), Ok(false), "full");
        for i in 0..IOREQ_BUFFER_SLOT_NUM {
            assert_eq!(buffered_pop(&mem, 0), Some(Ok(write(0x50, 4, i))));
        }
        assert_eq!(buffered_pop(&mem, 0), None);
        // Pointers 600 apart: neither side trusts them.
        mem.store_u32(4, mem.load_u32(0).wrapping_add(600));
        assert!(matches!(
            buffered_pop(&mem, 0),
            Some(Err(IoreqError::BadPointers { .. }))
        ));
        assert!(matches!(
            buffered_push(&mem, 0, extra),
            Err(IoreqError::BadPointers { .. })
        ));
    }

    #[test]
    fn a_slot_round_trips_and_a_changed_answer_is_refused() {
        let mem = ByteMem::new(vec![0u8; PAGE]);
        let read = Access {
            kind: kind::COPY,
            addr: 0xd000_0070,
            size: 4,
            read: true,
            data: 0,
        };
        publish_slot(&mem, 64, &read.slot(state::READY));
        assert_eq!(slot_state(&mem, 64), state::READY);
        let seen = read_slot(&mem, 64);
        assert_eq!(Access::from_slot(&seen), Ok(read));
        // The device model answers.
        let mut ans = seen;
        ans.data = 0x1_0000_000f;
        ans.flags = (ans.flags & !flag::STATE_MASK) | state::IORESP_READY;
        publish_slot(&mem, 64, &ans);
        assert_eq!(slot_state(&mem, 64), state::IORESP_READY);
        assert_eq!(
            read.answer(&read_slot(&mem, 64)),
            Ok(0xf),
            "masked to 4 bytes"
        );
        for bad in [
            Ioreq {
                addr: 0xd000_0074,
                ..ans
            },
            Ioreq { size: 8, ..ans },
            Ioreq {
                type_: kind::PIO,
                ..ans
            },
            Ioreq {
                flags: ans.flags & !flag::DIR_READ,
                ..ans
            },
            Ioreq { count: 2, ..ans },
        ] {
            assert_eq!(read.answer(&bad), Err(IoreqError::AnswerChangedRequest));
        }
        let not_ready = Ioreq {
            flags: flag::DIR_READ | state::INPROCESS,
            ..ans
        };
        assert_eq!(
            read.answer(&not_ready),
            Err(IoreqError::BadState(state::INPROCESS))
        );
    }

    #[test]
    fn the_device_model_refuses_slots_we_never_post() {
        let ok = Access {
            kind: kind::COPY,
            addr: 0x1000,
            size: 2,
            read: false,
            data: 7,
        }
        .slot(state::READY);
        assert!(Access::from_slot(&ok).is_ok());
        for (bad, err) in [
            (Ioreq { size: 3, ..ok }, IoreqError::BadSize(3)),
            (
                Ioreq {
                    type_: kind::PCI_CONFIG,
                    ..ok
                },
                IoreqError::BadType(2),
            ),
            (Ioreq { count: 0, ..ok }, IoreqError::NotSingle),
            (
                Ioreq {
                    flags: ok.flags | flag::DATA_IS_PTR,
                    ..ok
                },
                IoreqError::NotSingle,
            ),
            (
                Ioreq {
                    flags: state::NONE,
                    ..ok
                },
                IoreqError::BadState(0),
            ),
        ] {
            assert_eq!(Access::from_slot(&bad), Err(err));
        }
    }

    #[test]
    fn an_interrupt_word_must_name_its_devices_gsi() {
        assert_eq!(irq_check(0, 5, irq_word(0, 5), 0), Ok(false), "nothing new");
        assert_eq!(irq_check(0, 5, irq_word(1, 5), 0), Ok(true));
        assert_eq!(
            irq_check(1, 6, irq_word(2, 4), 1),
            Err(IoreqError::ForeignGsi { slot: 1, gsi: 4 })
        );
    }

    #[test]
    fn placed_devices_validate() {
        let mut d = [DmDevice::default(); MAX_DEVICES];
        let n = virtio_devices(&[device::NET, device::BLK])
            .zip(d.iter_mut())
            .map(|(v, slot)| *slot = v)
            .count();
        let h = DmHeader::new(
            0x1000_0000,
            1 << 28,
            VIRTIO_WINDOW_BASE,
            VIRTIO_WINDOW_SIZE,
            &d[..n],
        );
        assert_eq!(h.validate(), Ok(()));
        assert_eq!((h.devices[1].gsi, h.devices[1].base), (6, 0xD000_1000));
        assert_eq!(virtio_devices(&[device::NET; 12]).count(), MAX_DEVICES);
    }

    #[test]
    fn the_locator_places_the_area_only_where_the_hypervisor_can() {
        let len = 1 << 30;
        assert_eq!(
            dm_locator_decode(dm_locator(0x20_0000, 0x4000), len, 0x8_0000),
            Ok((0x20_0000, 0x4000))
        );
        for words in [
            [0, 0x20_0000, 0x4000],
            dm_locator(0x20_0100, 0x4000),
            dm_locator(0x20_0000, 0x3000),
            dm_locator(len - 0x1000, 0x4000),
            dm_locator(0x7_f000, 0x4000),
            dm_locator(u64::MAX - 0xfff, 0x4000),
        ] {
            assert!(
                dm_locator_decode(words, len, 0x8_0000).is_err(),
                "{words:x?}"
            );
        }
    }

    fn header() -> DmHeader {
        DmHeader::new(
            0x4000_0000,
            256 << 20,
            0xd000_0000,
            1 << 20,
            &[
                DmDevice {
                    kind: device::NET,
                    gsi: 5,
                    base: 0xd000_0000,
                    size: 0x200,
                },
                DmDevice {
                    kind: device::BLK,
                    gsi: 6,
                    base: 0xd000_1000,
                    size: 0x200,
                },
            ],
        )
    }

    #[test]
    fn the_area_grows_with_guest_ram_one_bit_per_page() {
        let h = header();
        // 256 MiB: 65536 pages, 8 KiB of bits.
        assert_eq!((h.dirty_page, h.dirty_bytes), (3 * 4096, 8192));
        assert_eq!(h.total_size, 5 * 4096);
        assert_eq!(
            dm_area_size(4096),
            DM_AREA_SIZE,
            "one page of bits at least"
        );
        assert_eq!(dm_dirty_bytes((4096 * 8 + 1) * 4096), 2 * 4096);
        assert_eq!(dirty_bit(0), (0, 1));
        assert_eq!(dirty_bit(33), (4, 2));
        assert!(dm_held(3, 2) && !dm_held(3, 3) && !dm_held(0, 0));
        // A bigger bitmap in a bigger area is fine (the peer sized it).
        let mut b = h;
        b.dirty_bytes += PAGE as u64;
        b.total_size += PAGE as u64;
        assert_eq!(b.validate(), Ok(()));
        // The guest grows past its bits: refused.
        let mut b = h;
        b.guest_ram_size *= 2;
        assert!(b.validate().is_err());
    }

    #[test]
    fn a_header_validates_only_as_this_version_lays_it_out() {
        let h = header();
        assert_eq!(h.validate(), Ok(()));
        assert_eq!(h.device_at(0xd000_1070, 4), Some(1));
        assert_eq!(h.device_at(0xd000_01fe, 4), None, "runs past the registers");
        let cases: [fn(&mut DmHeader); 15] = [
            |h| h.magic = 0,
            |h| h.version = 1,
            // The dirty bitmap over the header, the ioreq or the buffered
            // page, misaligned, too small for the guest, past the area,
            // or wrapping.
            |h| h.dirty_page = 0,
            |h| h.dirty_page = 2 * PAGE as u64,
            |h| h.dirty_page += 8,
            |h| h.dirty_bytes -= PAGE as u64,
            |h| h.dirty_bytes += 1,
            |h| h.total_size -= PAGE as u64,
            |h| h.dirty_page = u64::MAX - 0xfff,
            |h| h.window_size = 2 << 20,
            |h| h.devices[1].base = 0xd000_0100,
            |h| h.devices[1].gsi = 5,
            |h| h.devices[1].kind = 9,
            |h| h.devices[3].kind = device::NET,
            |h| h.device_count = 9,
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut b = h;
            f(&mut b);
            assert!(b.validate().is_err(), "case {i}");
        }
    }
}
