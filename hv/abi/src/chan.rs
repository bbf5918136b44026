//! Byte channels for guest output (hypervisor -> tool) and input
//! (tool -> hypervisor): a single-producer single-consumer byte ring with
//! the shared ring's index discipline, carrying records tagged with the
//! epoch that produced them, so output can be held until that epoch commits.
//!
//! Region layout: 64-byte header (`prod` @0, `prod_event` @4, `cons` @8,
//! `cons_event` @12, zero padding to 64), then the data area, whose size is
//! the largest power of two that fits. Indices are free-running `u32` byte
//! counts, position = index & (size - 1). Records are a
//! [`RecordHeader`] followed by the payload, padded to 8 bytes; a record may
//! wrap around the end of the data area.
//!
//! Producer: write record(s), release fence, store `prod`, full fence,
//! notify iff `prod_event` in (old, new]. Consumer: copy out, release
//! fence, store `cons`, full fence, notify iff `cons_event` in (old, new].
//! Either side, before sleeping, sets its event index to the peer's index
//! + 1, full fence, re-checks.

use core::mem::size_of;

use zerocopy::IntoBytes;

use crate::layout::layout_struct;

use crate::errno::Errno;
use crate::mem::SharedMem;
use crate::ring::notify_needed;

/// Offset of `prod` in the channel header.
pub const PROD: usize = 0;
/// Offset of `prod_event` (set by a consumer waiting for data).
pub const PROD_EVENT: usize = 4;
/// Offset of `cons` in the channel header.
pub const CONS: usize = 8;
/// Offset of `cons_event` (set by a producer waiting for space).
pub const CONS_EVENT: usize = 12;
/// Size of the channel header; data starts here.
pub const HEADER_SIZE: usize = 64;
/// Smallest data area.
pub const MIN_DATA: usize = 64;

layout_struct! {
    /// The header in front of every record.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RecordHeader {
        /// Epoch that produced the bytes.
        pub epoch: u64,
        /// Payload length in bytes (without header and padding).
        pub len: u32,
        /// Must be zero.
        pub reserved: u32,
    }
}

const _: () = assert!(size_of::<RecordHeader>() == 16);
const _: () = assert!(core::mem::offset_of!(RecordHeader, len) == 8);

/// Bytes a record with `len` payload bytes takes in the channel.
pub const fn record_size(len: usize) -> usize {
    size_of::<RecordHeader>() + len.next_multiple_of(8)
}

/// Why a channel operation failed. None of these change the channel's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// The region does not lie inside the shared memory.
    OutOfBounds,
    /// The region does not start on an 8-byte boundary.
    Misaligned,
    /// The region has no room for the header and [`MIN_DATA`] bytes.
    TooSmall,
    /// Not enough free space now.
    Full,
    /// The record can never fit in this channel.
    TooLarge,
    /// The peer's index claims more bytes than the channel can hold, or
    /// moved backwards.
    PeerOverrun { peer: u32, own: u32 },
    /// The published bytes end inside a record.
    Truncated,
    /// A record header's reserved field is not zero.
    ReservedNonZero,
    /// The destination buffer is smaller than the record (`need` bytes).
    BufferTooSmall { need: usize },
}

impl ChannelError {
    /// The errno this error is reported as on the ABI.
    pub const fn errno(self) -> Errno {
        match self {
            ChannelError::OutOfBounds
            | ChannelError::Misaligned
            | ChannelError::TooSmall
            | ChannelError::ReservedNonZero => Errno::EINVAL,
            ChannelError::Full => Errno::ENOSPC,
            ChannelError::TooLarge => Errno::E2BIG,
            ChannelError::PeerOverrun { .. } | ChannelError::Truncated => Errno::EBADMSG,
            ChannelError::BufferTooSmall { .. } => Errno::EOVERFLOW,
        }
    }
}

/// Where a channel lives in a [`SharedMem`] window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelLayout {
    base: usize,
    data: u32,
}

/// Data area size of a channel region of `bytes` bytes (largest power of
/// two that fits), 0 if below [`MIN_DATA`].
pub const fn channel_capacity(bytes: usize) -> u32 {
    if bytes < HEADER_SIZE + MIN_DATA {
        return 0;
    }
    let n = bytes - HEADER_SIZE;
    let mut p: usize = MIN_DATA;
    while p <= n / 2 && p < (1 << 31) {
        p *= 2;
    }
    p as u32
}

impl ChannelLayout {
    /// Check a channel region of `bytes` bytes at `base` against a window of
    /// `mem_size` bytes.
    pub fn new(mem_size: usize, base: usize, bytes: usize) -> Result<Self, ChannelError> {
        if !base.is_multiple_of(8) {
            return Err(ChannelError::Misaligned);
        }
        match base.checked_add(bytes) {
            Some(end) if end <= mem_size => {}
            _ => return Err(ChannelError::OutOfBounds),
        }
        let data = channel_capacity(bytes);
        if data == 0 {
            return Err(ChannelError::TooSmall);
        }
        Ok(Self { base, data })
    }

    /// Data area size in bytes.
    pub fn capacity(&self) -> u32 {
        self.data
    }

    /// Zero the header (all indices 0, event indices 1).
    pub fn init_shared<M: SharedMem>(&self, mem: &M) {
        mem.write_bytes(self.base, &[0u8; HEADER_SIZE]);
        mem.store_u32(self.base + PROD_EVENT, 1);
        mem.store_u32(self.base + CONS_EVENT, 1);
    }

    fn copy_in<M: SharedMem>(&self, mem: &M, idx: u32, src: &[u8]) {
        let pos = (idx & (self.data - 1)) as usize;
        let first = src.len().min(self.data as usize - pos);
        let data = self.base + HEADER_SIZE;
        mem.write_bytes(data + pos, &src[..first]);
        if first < src.len() {
            mem.write_bytes(data, &src[first..]);
        }
    }

    fn copy_out<M: SharedMem>(&self, mem: &M, idx: u32, dst: &mut [u8]) {
        let pos = (idx & (self.data - 1)) as usize;
        let first = dst.len().min(self.data as usize - pos);
        let data = self.base + HEADER_SIZE;
        mem.read_bytes(data + pos, &mut dst[..first]);
        if first < dst.len() {
            mem.read_bytes(data, &mut dst[first..]);
        }
    }
}

/// The writing side of a byte channel.
pub struct ChannelProducer<M> {
    mem: M,
    layout: ChannelLayout,
    prod_pvt: u32,
    prod_published: u32,
}

impl<M: SharedMem> ChannelProducer<M> {
    /// Attach at index 0 (see [`ChannelLayout::init_shared`]).
    pub fn attach(mem: M, base: usize, bytes: usize) -> Result<Self, ChannelError> {
        let layout = ChannelLayout::new(mem.size(), base, bytes)?;
        Ok(Self {
            mem,
            layout,
            prod_pvt: 0,
            prod_published: 0,
        })
    }

    /// Attach where the channel's published producer index stands: a tool
    /// taking over from an earlier one (after `Detach`) writes on after
    /// what that one published. The consumer's index is checked against it
    /// here and at every later use.
    pub fn attach_resume(mem: M, base: usize, bytes: usize) -> Result<Self, ChannelError> {
        let mut p = Self::attach(mem, base, bytes)?;
        let prod = p.mem.load_u32(p.layout.base + PROD);
        p.prod_pvt = prod;
        p.prod_published = prod;
        p.free()?;
        Ok(p)
    }

    /// The channel's layout.
    pub fn layout(&self) -> ChannelLayout {
        self.layout
    }

    /// Free bytes, after checking the consumer's index.
    pub fn free(&self) -> Result<u32, ChannelError> {
        let cons = self.mem.load_u32(self.layout.base + CONS);
        // The consumer can only have consumed published bytes, and cannot
        // lag more than the capacity behind what we wrote: `cons` must lie
        // in `[prod_pvt - data, prod_published]`. The second bound also
        // catches a `cons` that moved backwards past the space we already
        // reused (its bytes were overwritten by unpublished records); it
        // keeps the subtraction below from underflowing.
        if self.prod_published.wrapping_sub(cons) > self.layout.data
            || self.prod_pvt.wrapping_sub(cons) > self.layout.data
        {
            return Err(ChannelError::PeerOverrun {
                peer: cons,
                own: self.prod_published,
            });
        }
        Ok(self.layout.data - self.prod_pvt.wrapping_sub(cons))
    }

    /// Append one record (not visible until [`ChannelProducer::publish`]).
    pub fn write_record(&mut self, epoch: u64, payload: &[u8]) -> Result<(), ChannelError> {
        let need = record_size(payload.len());
        if need > self.layout.data as usize || payload.len() > u32::MAX as usize {
            return Err(ChannelError::TooLarge);
        }
        if need > self.free()? as usize {
            return Err(ChannelError::Full);
        }
        let h = RecordHeader {
            epoch,
            len: payload.len() as u32,
            reserved: 0,
        };
        let m = &self.mem;
        self.layout.copy_in(m, self.prod_pvt, h.as_bytes());
        let mut at = self.prod_pvt.wrapping_add(size_of::<RecordHeader>() as u32);
        self.layout.copy_in(m, at, payload);
        at = at.wrapping_add(payload.len() as u32);
        let pad = need - size_of::<RecordHeader>() - payload.len();
        self.layout.copy_in(m, at, &[0u8; 8][..pad]);
        self.prod_pvt = self.prod_pvt.wrapping_add(need as u32);
        Ok(())
    }

    /// Publish written records; true if the consumer wants a notification.
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.prod_published, self.prod_pvt);
        self.mem.fence_release();
        self.mem.store_u32(self.layout.base + PROD, new);
        self.prod_published = new;
        self.mem.fence_full();
        notify_needed(old, new, self.mem.load_u32(self.layout.base + PROD_EVENT))
    }

    /// Before sleeping for space: `Ok(true)` if `need` bytes are free now;
    /// else ask to be woken when the consumer's index reaches the point
    /// where `need` bytes are free (`cons_event = prod_pvt + need - data`),
    /// full fence, check again.
    ///
    /// The event names the index that frees enough space, not `cons + 1`:
    /// with `cons + 1`, a consumer that advanced a little between our load
    /// and our store would already have passed the event, and its later
    /// publishes would never notify us (a lost wakeup).
    pub fn final_check_for_space(&mut self, need: usize) -> Result<bool, ChannelError> {
        if self.free()? as usize >= need {
            return Ok(true);
        }
        let need = u32::try_from(need).map_err(|_| ChannelError::TooLarge)?;
        let target = self
            .prod_pvt
            .wrapping_add(need)
            .wrapping_sub(self.layout.data);
        self.mem.store_u32(self.layout.base + CONS_EVENT, target);
        self.mem.fence_full();
        Ok(self.free()? as usize >= need as usize)
    }
}

/// Where a record came from and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    pub epoch: u64,
    pub len: usize,
}

/// The reading side of a byte channel.
pub struct ChannelConsumer<M> {
    mem: M,
    layout: ChannelLayout,
    cons: u32,
    cons_published: u32,
}

impl<M: SharedMem> ChannelConsumer<M> {
    /// Attach at index 0.
    pub fn attach(mem: M, base: usize, bytes: usize) -> Result<Self, ChannelError> {
        let layout = ChannelLayout::new(mem.size(), base, bytes)?;
        Ok(Self {
            mem,
            layout,
            cons: 0,
            cons_published: 0,
        })
    }

    /// Attach past everything published so far, handing that space back
    /// at once: a tool taking over from an earlier one (after `Detach`)
    /// must not pass the earlier session's output on to its own clients.
    /// The producer's index is checked as in [`ChannelConsumer::available`].
    pub fn attach_skip(mem: M, base: usize, bytes: usize) -> Result<Self, ChannelError> {
        let mut c = Self::attach(mem, base, bytes)?;
        let cons = c.mem.load_u32(c.layout.base + CONS);
        c.cons = cons;
        c.cons_published = cons;
        let stale = c.available()?;
        c.cons = cons.wrapping_add(stale);
        c.publish();
        Ok(c)
    }

    /// The channel's layout.
    pub fn layout(&self) -> ChannelLayout {
        self.layout
    }

    /// Published bytes not consumed yet, after checking the producer's index.
    pub fn available(&self) -> Result<u32, ChannelError> {
        let prod = self.mem.load_u32(self.layout.base + PROD);
        let avail = prod.wrapping_sub(self.cons);
        if avail > self.layout.data - self.cons.wrapping_sub(self.cons_published) {
            return Err(ChannelError::PeerOverrun {
                peer: prod,
                own: self.cons,
            });
        }
        Ok(avail)
    }

    /// The next record's header, copied out and checked, without consuming.
    pub fn peek(&self) -> Result<Option<RecordInfo>, ChannelError> {
        let avail = self.available()? as usize;
        if avail == 0 {
            return Ok(None);
        }
        if avail < size_of::<RecordHeader>() {
            return Err(ChannelError::Truncated);
        }
        self.mem.fence_acquire();
        let mut h = RecordHeader::default();
        self.layout.copy_out(&self.mem, self.cons, h.as_mut_bytes());
        if h.reserved != 0 {
            return Err(ChannelError::ReservedNonZero);
        }
        if record_size(h.len as usize) > avail {
            return Err(ChannelError::Truncated);
        }
        Ok(Some(RecordInfo {
            epoch: h.epoch,
            len: h.len as usize,
        }))
    }

    /// Copy the next record's payload into `dst` and consume it (privately;
    /// see [`ChannelConsumer::publish`]).
    pub fn pop(&mut self, dst: &mut [u8]) -> Result<Option<RecordInfo>, ChannelError> {
        self.pop_if(dst, |_| true)
    }

    /// As [`ChannelConsumer::pop`], but only a record of an epoch
    /// `<= committed`: output is held until its epoch commits.
    pub fn pop_committed(
        &mut self,
        dst: &mut [u8],
        committed: u64,
    ) -> Result<Option<RecordInfo>, ChannelError> {
        self.pop_if(dst, |i| i.epoch <= committed)
    }

    fn pop_if(
        &mut self,
        dst: &mut [u8],
        take: impl Fn(&RecordInfo) -> bool,
    ) -> Result<Option<RecordInfo>, ChannelError> {
        let Some(info) = self.peek()? else {
            return Ok(None);
        };
        if !take(&info) {
            return Ok(None);
        }
        if dst.len() < info.len {
            return Err(ChannelError::BufferTooSmall { need: info.len });
        }
        let at = self.cons.wrapping_add(size_of::<RecordHeader>() as u32);
        self.layout.copy_out(&self.mem, at, &mut dst[..info.len]);
        self.cons = self.cons.wrapping_add(record_size(info.len) as u32);
        Ok(Some(info))
    }

    /// Hand consumed space back to the producer; true if it wants a
    /// notification.
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.cons_published, self.cons);
        // Our reads of the records happen before the producer may reuse them.
        self.mem.fence_release();
        self.mem.store_u32(self.layout.base + CONS, new);
        self.cons_published = new;
        self.mem.fence_full();
        notify_needed(old, new, self.mem.load_u32(self.layout.base + CONS_EVENT))
    }

    /// Before sleeping for data: set `prod_event = cons + 1`, full fence,
    /// re-check. `Ok(false)`: safe to wait for a notification.
    pub fn final_check(&mut self) -> Result<bool, ChannelError> {
        if self.available()? > 0 {
            return Ok(true);
        }
        self.mem
            .store_u32(self.layout.base + PROD_EVENT, self.cons.wrapping_add(1));
        self.mem.fence_full();
        Ok(self.available()? > 0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::mem::AtomicMem;
    use core::sync::atomic::AtomicU32;
    use std::vec::Vec;

    fn words(bytes: usize) -> Vec<AtomicU32> {
        (0..bytes / 4).map(|_| AtomicU32::new(0)).collect()
    }

    /// The whole of `w` as one channel, its header initialised.
    fn shared(w: &[AtomicU32]) -> AtomicMem<'_> {
        let m = AtomicMem::new(w);
        ChannelLayout::new(m.size(), 0, m.size())
            .unwrap()
            .init_shared(&m);
        m
    }

    #[test]
    fn capacity_is_power_of_two() {
        assert_eq!(channel_capacity(127), 0);
        assert_eq!(channel_capacity(128), 64);
        assert_eq!(channel_capacity(64 + 4095), 2048);
        assert_eq!(channel_capacity(64 + 4096), 4096);
    }

    #[test]
    fn records_wrap_and_hold_until_commit() {
        let w = words(64 + 128);
        let m = shared(&w);
        let mut p = ChannelProducer::attach(&m, 0, m.size()).unwrap();
        let mut c = ChannelConsumer::attach(&m, 0, m.size()).unwrap();
        let mut buf = [0u8; 128];
        for round in 0..50usize {
            let epoch = round as u64;
            let len = (round * 7) % 90;
            let payload: Vec<u8> = (0..len).map(|i| (i + round) as u8).collect();
            assert!(!c.final_check().unwrap());
            p.write_record(epoch, &payload).unwrap();
            assert!(p.publish(), "the consumer is waiting: notify");
            // Held: its epoch has not committed yet.
            if epoch > 0 {
                assert_eq!(c.pop_committed(&mut buf, epoch - 1), Ok(None));
            }
            let info = c.pop_committed(&mut buf, epoch).unwrap().unwrap();
            assert_eq!(info, RecordInfo { epoch, len });
            assert_eq!(&buf[..len], &payload[..]);
            c.publish();
        }
        assert_eq!(p.write_record(0, &[0; 113]), Err(ChannelError::TooLarge));
    }

    #[test]
    fn a_second_session_resumes_input_and_skips_old_output() {
        let w = words(64 + 128);
        let m = shared(&w);
        let mut buf = [0u8; 64];
        // Session 1: three records published, the consumer takes one.
        let mut p1 = ChannelProducer::attach(&m, 0, m.size()).unwrap();
        let mut c = ChannelConsumer::attach(&m, 0, m.size()).unwrap();
        for k in 1..=3u8 {
            p1.write_record(u64::from(k), &[k; 20]).unwrap();
        }
        p1.publish();
        assert_eq!(c.pop(&mut buf).unwrap().unwrap().epoch, 1);
        c.publish();
        // A new producer writes on after what the old one published: the
        // consumer reads 2, 3, then the new record, none overwritten.
        let mut p2 = ChannelProducer::attach_resume(&m, 0, m.size()).unwrap();
        p2.write_record(4, &[4; 20]).unwrap();
        p2.publish();
        for k in 2..=4u8 {
            let i = c.pop(&mut buf).unwrap().unwrap();
            assert_eq!((i.epoch, &buf[..i.len]), (u64::from(k), &[k; 20][..]));
        }
        c.publish();
        assert_eq!(c.pop(&mut buf), Ok(None));
        // A new consumer skips what is published and frees its space.
        p2.write_record(5, &[5; 40]).unwrap();
        p2.write_record(6, &[6; 40]).unwrap();
        p2.publish();
        assert_eq!(p2.free(), Ok(128 - 2 * record_size(40) as u32));
        let mut c2 = ChannelConsumer::attach_skip(&m, 0, m.size()).unwrap();
        assert_eq!(c2.pop(&mut buf), Ok(None));
        assert_eq!(p2.free(), Ok(128));
        p2.write_record(7, &[7; 8]).unwrap();
        p2.publish();
        assert_eq!(c2.pop(&mut buf).unwrap().unwrap().epoch, 7);
        // A producer index beyond the capacity is refused at attach.
        m.store_u32(PROD, m.load_u32(CONS).wrapping_add(129));
        assert!(matches!(
            ChannelConsumer::attach_skip(&m, 0, m.size()),
            Err(ChannelError::PeerOverrun { .. })
        ));
    }

    #[test]
    fn full_then_space_notification() {
        let w = words(64 + 64);
        let m = shared(&w);
        let mut p = ChannelProducer::attach(&m, 0, m.size()).unwrap();
        let mut c = ChannelConsumer::attach(&m, 0, m.size()).unwrap();
        p.write_record(1, &[1; 16]).unwrap();
        p.write_record(2, &[2; 16]).unwrap();
        assert_eq!(p.write_record(3, &[3; 1]), Err(ChannelError::Full));
        p.publish();
        assert!(!p.final_check_for_space(24).unwrap());
        let mut b = [0u8; 16];
        c.pop(&mut b).unwrap().unwrap();
        assert!(c.publish(), "the producer waits for space: notify");
        assert!(p.final_check_for_space(24).unwrap());
        p.write_record(3, &[3; 1]).unwrap();
    }

    #[test]
    fn hostile_producer_gets_errors_and_no_state_change() {
        let w = words(64 + 128);
        let m = shared(&w);
        let mut c = ChannelConsumer::attach(&m, 0, m.size()).unwrap();
        let mut b = [0u8; 128];
        m.store_u32(PROD, 129);
        assert_eq!(
            c.pop(&mut b),
            Err(ChannelError::PeerOverrun { peer: 129, own: 0 })
        );
        m.store_u32(PROD, 8);
        assert_eq!(c.pop(&mut b), Err(ChannelError::Truncated));
        // A header claiming more bytes than were published.
        let h = RecordHeader {
            epoch: 1,
            len: 40,
            reserved: 0,
        };
        m.write_bytes(64, h.as_bytes());
        m.store_u32(PROD, 32);
        assert_eq!(c.pop(&mut b), Err(ChannelError::Truncated));
        let h = RecordHeader {
            epoch: 1,
            len: 8,
            reserved: 7,
        };
        m.write_bytes(64, h.as_bytes());
        m.store_u32(PROD, 24);
        assert_eq!(c.pop(&mut b), Err(ChannelError::ReservedNonZero));
        let h = RecordHeader {
            epoch: 1,
            len: 8,
            reserved: 0,
        };
        m.write_bytes(64, h.as_bytes());
        assert_eq!(
            c.pop(&mut b[..4]),
            Err(ChannelError::BufferTooSmall { need: 8 })
        );
        assert_eq!(c.available(), Ok(24), "errors consumed nothing");
        assert_eq!(c.pop(&mut b), Ok(Some(RecordInfo { epoch: 1, len: 8 })));
        // The producer moves prod backwards.
        m.store_u32(PROD, 16);
        assert_eq!(
            c.available(),
            Err(ChannelError::PeerOverrun { peer: 16, own: 24 })
        );
    }

    #[test]
    fn hostile_consumer_index_is_rejected() {
        let w = words(64 + 128);
        let m = shared(&w);
        let mut p = ChannelProducer::attach(&m, 0, m.size()).unwrap();
        p.write_record(1, &[1; 8]).unwrap();
        p.publish();
        m.store_u32(CONS, 100); // consumed more than was published
        assert_eq!(
            p.write_record(2, &[2; 8]),
            Err(ChannelError::PeerOverrun { peer: 100, own: 24 })
        );
        m.store_u32(CONS, 24);
        p.write_record(2, &[2; 8]).unwrap();
    }

    #[test]
    fn consumer_index_moving_backwards_is_rejected() {
        // 128-byte data area. Publish 120 bytes, let the consumer take
        // them, write 120 more unpublished, then the consumer claims it is
        // back at 0: within the published window, but behind the space the
        // unpublished records reuse.
        let w = words(64 + 128);
        let m = shared(&w);
        let mut p = ChannelProducer::attach(&m, 0, m.size()).unwrap();
        let mut c = ChannelConsumer::attach(&m, 0, m.size()).unwrap();
        let first: Vec<u8> = (0..104u8).collect();
        p.write_record(1, &first).unwrap();
        assert_eq!(record_size(first.len()), 120);
        p.publish();
        let mut b = [0u8; 128];
        assert_eq!(c.pop(&mut b), Ok(Some(RecordInfo { epoch: 1, len: 104 })));
        c.publish();
        assert_eq!(m.load_u32(CONS), 120);
        let second: Vec<u8> = (0..104u8).map(|i| i ^ 0x5a).collect();
        p.write_record(2, &second).unwrap();
        let snapshot = |m: &AtomicMem<'_>| {
            let mut all = [0u8; 64 + 128];
            m.read_bytes(0, &mut all);
            all
        };
        m.store_u32(CONS, 0);
        let before = snapshot(&m);
        assert_eq!(
            p.free(),
            Err(ChannelError::PeerOverrun { peer: 0, own: 120 })
        );
        assert_eq!(
            p.write_record(3, &[3; 8]),
            Err(ChannelError::PeerOverrun { peer: 0, own: 120 })
        );
        assert_eq!(
            p.final_check_for_space(8),
            Err(ChannelError::PeerOverrun { peer: 0, own: 120 })
        );
        assert_eq!(snapshot(&m), before, "nothing was written");
        // Back at its true index the consumer reads the second record
        // intact: the errors changed nothing.
        m.store_u32(CONS, 120);
        assert_eq!(p.free(), Ok(8));
        p.publish();
        assert_eq!(c.pop(&mut b), Ok(Some(RecordInfo { epoch: 2, len: 104 })));
        assert_eq!(&b[..104], &second[..]);
    }
}
