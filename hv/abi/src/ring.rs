//! Xen's shared ring (`xen/include/public/io/ring.h`), over [`SharedMem`].
//!
//! Layout of a ring region: a 64-byte header (`req_prod` @0, `req_event` @4,
//! `rsp_prod` @8, `rsp_event` @12, 4 private bytes @16, padding to 64), then
//! the slots. Slot size is the larger of the request and response entry (the
//! C side declares a union). The slot count is the largest power of two that
//! fits; indices are free-running `u32`, slot = `index & (n - 1)`.
//!
//! As in Xen the ring is bidirectional: the *front* produces requests and
//! consumes responses, the *back* consumes requests and answers each one with
//! a response written into the same slots. A slot is free for a new request
//! only once its response has been consumed, so responses are also the flow
//! control.
//!
//! Every index read from the peer is checked before use: a peer that claims
//! more entries than it can have produced gets [`RingError::PeerOverrun`] and
//! this side's state does not change. Entries are copied out of shared memory
//! before the caller validates them.

use core::marker::PhantomData;
use core::mem::size_of;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::layout::layout_struct;

use crate::errno::Errno;
use crate::mem::SharedMem;

/// Offset of `req_prod` in the ring header.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event` in the ring header.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod` in the ring header.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event` in the ring header.
pub const RSP_EVENT: usize = 12;
/// Offset of the 4 private bytes (`pvt`) in the ring header.
pub const PVT: usize = 16;
/// Size of the ring header; slots start here.
pub const HEADER_SIZE: usize = 64;
/// Largest slot count: indices are `u32`, so at most 2^31 entries keep the
/// unsigned distance arithmetic unambiguous.
pub const MAX_ENTRIES: u32 = 1 << 31;

layout_struct! {
    /// The ring header as a struct (Xen's `struct *_sring` without the slots).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SringHeader {
        pub req_prod: u32,
        pub req_event: u32,
        pub rsp_prod: u32,
        pub rsp_event: u32,
        pub pvt: [u8; 4],
        pub pad: [u8; 44],
    }
}

const _: () = assert!(size_of::<SringHeader>() == HEADER_SIZE);
const _: () = assert!(core::mem::offset_of!(SringHeader, req_prod) == REQ_PROD);
const _: () = assert!(core::mem::offset_of!(SringHeader, req_event) == REQ_EVENT);
const _: () = assert!(core::mem::offset_of!(SringHeader, rsp_prod) == RSP_PROD);
const _: () = assert!(core::mem::offset_of!(SringHeader, rsp_event) == RSP_EVENT);
const _: () = assert!(core::mem::offset_of!(SringHeader, pvt) == PVT);

/// Types that can sit in a ring slot: plain little-endian bytes both ways.
pub trait RingEntry: FromBytes + IntoBytes + Immutable + KnownLayout + Sized {}
impl<T: FromBytes + IntoBytes + Immutable + KnownLayout + Sized> RingEntry for T {}

/// The slot size of a ring carrying `Req` requests and `Rsp` responses
/// (the size of the C union of the two).
pub const fn slot_size<Req, Rsp>() -> usize {
    let (a, b) = (size_of::<Req>(), size_of::<Rsp>());
    if a > b {
        a
    } else {
        b
    }
}

/// Slot count of a ring region of `bytes` bytes with `slot`-byte slots: the
/// largest power of two that fits (Xen's `__RING_SIZE`), 0 if none fits.
pub const fn ring_entries(bytes: usize, slot: usize) -> u32 {
    if slot == 0 || bytes < HEADER_SIZE + slot {
        return 0;
    }
    let n = (bytes - HEADER_SIZE) / slot;
    let mut p: usize = 1;
    while p <= n / 2 && (p as u64) < MAX_ENTRIES as u64 {
        p *= 2;
    }
    p as u32
}

/// Xen's notify rule: after publishing `new` (previously `old`), the peer
/// wants a notification iff its event index lies in `(old, new]`, in
/// wrapping `u32` arithmetic.
pub const fn notify_needed(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// Why a ring operation failed. None of these change the ring's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The region does not lie inside the shared memory.
    OutOfBounds,
    /// The region does not start on an 8-byte boundary.
    Misaligned,
    /// The region has no room for the header and one slot.
    TooSmall,
    /// No free slot for a request (front side).
    Full,
    /// A response was pushed with no unanswered request (back side).
    NoRequestToAnswer,
    /// The peer's producer index claims more entries than it can have
    /// produced: `prod` (read from the peer) against our consumer `cons`.
    PeerOverrun { prod: u32, cons: u32 },
}

impl RingError {
    /// The errno this error is reported as on the ABI.
    pub const fn errno(self) -> Errno {
        match self {
            RingError::OutOfBounds | RingError::Misaligned | RingError::TooSmall => Errno::EINVAL,
            RingError::Full => Errno::ENOSPC,
            RingError::NoRequestToAnswer => Errno::EINVAL,
            RingError::PeerOverrun { .. } => Errno::EBADMSG,
        }
    }
}

/// Where a ring lives in a [`SharedMem`] window and how many slots it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    base: usize,
    slot: usize,
    entries: u32,
}

impl RingLayout {
    /// Check a ring region of `bytes` bytes at `base` with `slot`-byte slots
    /// against a window of `mem_size` bytes.
    pub fn new(mem_size: usize, base: usize, bytes: usize, slot: usize) -> Result<Self, RingError> {
        if !base.is_multiple_of(8) {
            return Err(RingError::Misaligned);
        }
        match base.checked_add(bytes) {
            Some(end) if end <= mem_size => {}
            _ => return Err(RingError::OutOfBounds),
        }
        let entries = ring_entries(bytes, slot);
        if entries == 0 {
            return Err(RingError::TooSmall);
        }
        Ok(Self {
            base,
            slot,
            entries,
        })
    }

    /// Slot count.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Slot size in bytes.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Offset of the ring header in the window.
    pub fn base(&self) -> usize {
        self.base
    }

    fn slot_offset(&self, idx: u32) -> usize {
        self.base + HEADER_SIZE + (idx & (self.entries - 1)) as usize * self.slot
    }

    /// Initialise the shared header (Xen's `SHARED_RING_INIT`): producer
    /// indices 0, event indices 1, private bytes and padding zero.
    pub fn init_shared<M: SharedMem>(&self, mem: &M) {
        mem.store_u32(self.base + REQ_PROD, 0);
        mem.store_u32(self.base + RSP_PROD, 0);
        mem.store_u32(self.base + REQ_EVENT, 1);
        mem.store_u32(self.base + RSP_EVENT, 1);
        mem.write_bytes(self.base + PVT, &[0u8; HEADER_SIZE - PVT]);
    }
}

/// How far ahead of the entry it consumes an end hints the slot it will
/// write next ([`SharedMem::prefetch_write`]). Without the hint each slot
/// line crosses between the cores once to be read and once more to be
/// written; 8 entries give the fetches time to land before the copy
/// (measured against 4 and 16: docs/perf/ring.md, ninth round).
pub const PREFETCH_AHEAD: u32 = 8;

/// What both ends keep: each produces into the slots (front: requests,
/// back: responses) and consumes what the peer produced. The end-specific
/// parts (which header words, how far the peer may run ahead) are passed
/// in by [`FrontRing`] and [`BackRing`].
struct End<M> {
    mem: M,
    layout: RingLayout,
    /// Entries this end has written.
    prod_pvt: u32,
    /// The producer index last stored into the header.
    published: u32,
    /// Entries of the peer consumed.
    cons: u32,
    /// Last producer index read from the peer and checked (Xen's `rp`
    /// snapshot).
    seen: u32,
}

impl<M: SharedMem> End<M> {
    fn attach(mem: M, base: usize, bytes: usize, slot: usize, idx: u32) -> Result<Self, RingError> {
        let layout = RingLayout::new(mem.size(), base, bytes, slot)?;
        Ok(Self {
            mem,
            layout,
            prod_pvt: idx,
            published: idx,
            cons: idx,
            seen: idx,
        })
    }

    fn load(&self, field: usize) -> u32 {
        self.mem.load_u32(self.layout.base + field)
    }

    /// The peer's producer index at header word `prod`, checked: at most
    /// `limit` entries may be unconsumed.
    fn unconsumed(&self, prod: usize, limit: u32) -> Result<u32, RingError> {
        let prod = self.load(prod);
        let avail = prod.wrapping_sub(self.cons);
        if avail > limit {
            return Err(RingError::PeerOverrun {
                prod,
                cons: self.cons,
            });
        }
        Ok(avail)
    }

    /// Entries in the current snapshot of the peer's index. `unconsumed`
    /// (read and check the peer's index) runs only when the last snapshot
    /// is used up; the acquire fence then orders our reads of the slots
    /// (and later writes into them) after the peer's writes.
    fn snapshot(
        &mut self,
        unconsumed: impl FnOnce(&Self) -> Result<u32, RingError>,
    ) -> Result<u32, RingError> {
        if self.seen == self.cons {
            let n = unconsumed(self)?;
            if n == 0 {
                return Ok(0);
            }
            self.seen = self.cons.wrapping_add(n);
            self.mem.fence_acquire();
        }
        Ok(self.seen.wrapping_sub(self.cons))
    }

    /// Copies out the entry at `cons` and consumes it; the caller has
    /// checked that one is published.
    fn take<T: RingEntry>(&mut self) -> T {
        let mut v = T::new_zeroed();
        let at = self.consume();
        self.mem.read_bytes(at, v.as_mut_bytes());
        v
    }

    /// Consumes the entry at `cons` (published, as the caller checked) and
    /// returns its slot's offset. The slot [`PREFETCH_AHEAD`] entries on is
    /// hinted for writing if the peer has published it too: this end will
    /// read that slot soon and then write into it (the back end its
    /// response, the front end its next request), and the peer is done
    /// with it until then.
    fn consume(&mut self) -> usize {
        let at = self.layout.slot_offset(self.cons);
        if self.seen.wrapping_sub(self.cons) > PREFETCH_AHEAD {
            let ahead = self.cons.wrapping_add(PREFETCH_AHEAD);
            self.mem
                .prefetch_write(self.layout.slot_offset(ahead), self.layout.slot);
        }
        self.cons = self.cons.wrapping_add(1);
        at
    }

    /// Writes the entry at `prod_pvt` and counts it; the caller has checked
    /// that the slot is ours.
    fn put<T: RingEntry>(&mut self, v: &T) {
        self.mem
            .write_bytes(self.layout.slot_offset(self.prod_pvt), v.as_bytes());
        self.prod_pvt = self.prod_pvt.wrapping_add(1);
    }

    /// Xen's `RING_PUSH_*_AND_CHECK_NOTIFY`: release fence, store our
    /// producer index at `prod`, full fence, then whether the peer's event
    /// index at `event` lies in `(old, new]`.
    fn publish(&mut self, prod: usize, event: usize) -> bool {
        let (old, new) = (self.published, self.prod_pvt);
        self.mem.fence_release();
        self.mem.store_u32(self.layout.base + prod, new);
        self.published = new;
        self.mem.fence_full();
        notify_needed(old, new, self.load(event))
    }

    /// Xen's `RING_FINAL_CHECK_FOR_*`: if nothing is pending, set our event
    /// index at `event` to `cons + 1`, full fence, check again.
    fn final_check(
        &mut self,
        event: usize,
        unconsumed: impl Fn(&Self) -> Result<u32, RingError>,
    ) -> Result<bool, RingError> {
        if unconsumed(self)? > 0 {
            return Ok(true);
        }
        self.mem
            .store_u32(self.layout.base + event, self.cons.wrapping_add(1));
        self.mem.fence_full();
        Ok(unconsumed(self)? > 0)
    }
}

/// The front end: produces requests, consumes responses.
pub struct FrontRing<M, Req, Rsp> {
    end: End<M>,
    _entries: PhantomData<fn(Req) -> Rsp>,
}

impl<M: SharedMem, Req: RingEntry, Rsp: RingEntry> FrontRing<M, Req, Rsp> {
    /// Attach to a ring region at `base` of `bytes` bytes, starting at index
    /// 0. Does not touch shared memory (see [`RingLayout::init_shared`]).
    pub fn attach(mem: M, base: usize, bytes: usize) -> Result<Self, RingError> {
        Self::attach_at(mem, base, bytes, 0)
    }

    /// As [`FrontRing::attach`], with all indices starting at `idx` (Xen's
    /// `FRONT_RING_ATTACH`).
    pub fn attach_at(mem: M, base: usize, bytes: usize, idx: u32) -> Result<Self, RingError> {
        Ok(Self {
            end: End::attach(mem, base, bytes, slot_size::<Req, Rsp>(), idx)?,
            _entries: PhantomData,
        })
    }

    /// The ring's layout.
    pub fn layout(&self) -> RingLayout {
        self.end.layout
    }

    /// The shared memory behind the ring.
    pub fn mem(&self) -> &M {
        &self.end.mem
    }

    /// Slots not holding an outstanding request or unconsumed response.
    pub fn free_requests(&self) -> u32 {
        self.end.layout.entries - self.end.prod_pvt.wrapping_sub(self.end.cons)
    }

    /// Private producer index (requests written so far).
    pub fn req_prod_pvt(&self) -> u32 {
        self.end.prod_pvt
    }

    /// Private consumer index of responses.
    pub fn rsp_cons(&self) -> u32 {
        self.end.cons
    }

    /// Write a request into the next slot. Not visible to the back end
    /// until [`FrontRing::publish_requests`].
    pub fn push_request(&mut self, req: &Req) -> Result<(), RingError> {
        if self.free_requests() == 0 {
            return Err(RingError::Full);
        }
        self.end.put(req);
        Ok(())
    }

    /// Publish written requests (Xen's `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`):
    /// release fence, store `req_prod`, full fence, then report whether the
    /// back end asked to be notified (its `req_event` in `(old, new]`).
    pub fn publish_requests(&mut self) -> bool {
        self.end.publish(REQ_PROD, REQ_EVENT)
    }

    /// Responses published by the back end and not consumed yet. The back
    /// end cannot answer more requests than were published.
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        Self::responses(&self.end)
    }

    fn responses(end: &End<M>) -> Result<u32, RingError> {
        end.unconsumed(RSP_PROD, end.published.wrapping_sub(end.cons))
    }

    /// Copy the next response out of the ring, if any. The peer's index is
    /// read (and checked) only when the last snapshot is used up.
    pub fn pop_response(&mut self) -> Result<Option<Rsp>, RingError> {
        if self.end.snapshot(Self::responses)? == 0 {
            return Ok(None);
        }
        Ok(Some(self.end.take()))
    }

    /// Consume up to `max` published responses without copying them out:
    /// for a front end that needs the slots back but not the response
    /// bodies. The peer's index is checked exactly as in
    /// [`FrontRing::pop_response`] (a bad index is an error and consumes
    /// nothing). Returns how many were consumed.
    pub fn skip_responses(&mut self, max: u32) -> Result<u32, RingError> {
        let n = self.end.snapshot(Self::responses)?.min(max);
        self.end.cons = self.end.cons.wrapping_add(n);
        Ok(n)
    }

    /// Consume the next response, copying out only the little-endian `u32`
    /// at byte `field` of it (for example a status word), if any.
    /// `field` must be a multiple of 4 inside `Rsp`, else
    /// [`RingError::OutOfBounds`] (and nothing is consumed).
    pub fn pop_response_u32(&mut self, field: usize) -> Result<Option<u32>, RingError> {
        if !field.is_multiple_of(4)
            || size_of::<Rsp>()
                .checked_sub(4)
                .is_none_or(|last| field > last)
        {
            return Err(RingError::OutOfBounds);
        }
        if self.end.snapshot(Self::responses)? == 0 {
            return Ok(None);
        }
        let at = self.end.consume();
        Ok(Some(self.end.mem.load_u32(at + field)))
    }

    /// Before sleeping (Xen's `RING_FINAL_CHECK_FOR_RESPONSES`): if nothing
    /// is pending, set `rsp_event = rsp_cons + 1`, full fence, check again.
    /// `Ok(false)` means it is safe to wait for a notification.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        self.end.final_check(RSP_EVENT, Self::responses)
    }
}

/// The back end: consumes requests, produces responses.
pub struct BackRing<M, Req, Rsp> {
    end: End<M>,
    _entries: PhantomData<fn(Req) -> Rsp>,
}

impl<M: SharedMem, Req: RingEntry, Rsp: RingEntry> BackRing<M, Req, Rsp> {
    /// Attach to a ring region at `base` of `bytes` bytes, index 0.
    pub fn attach(mem: M, base: usize, bytes: usize) -> Result<Self, RingError> {
        Self::attach_at(mem, base, bytes, 0)
    }

    /// As [`BackRing::attach`], with all indices starting at `idx` (Xen's
    /// `BACK_RING_ATTACH`).
    pub fn attach_at(mem: M, base: usize, bytes: usize, idx: u32) -> Result<Self, RingError> {
        Ok(Self {
            end: End::attach(mem, base, bytes, slot_size::<Req, Rsp>(), idx)?,
            _entries: PhantomData,
        })
    }

    /// The ring's layout.
    pub fn layout(&self) -> RingLayout {
        self.end.layout
    }

    /// The shared memory behind the ring.
    pub fn mem(&self) -> &M {
        &self.end.mem
    }

    /// Private consumer index of requests.
    pub fn req_cons(&self) -> u32 {
        self.end.cons
    }

    /// Private producer index of responses.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.end.prod_pvt
    }

    /// Requests published by the front end and not consumed yet. A front end
    /// can fill at most the slots whose responses it has seen, so
    /// `req_prod - req_cons` may not exceed `n - (req_cons - rsp_prod_pvt)`
    /// (this also rejects a `req_prod` that moved backwards).
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        Self::requests(&self.end)
    }

    fn requests(end: &End<M>) -> Result<u32, RingError> {
        let in_flight = end.cons.wrapping_sub(end.prod_pvt);
        end.unconsumed(REQ_PROD, end.layout.entries - in_flight)
    }

    /// Copy the next request out of the ring, if any. The peer's index is
    /// read (and checked) only when the last snapshot is used up.
    pub fn pop_request(&mut self) -> Result<Option<Req>, RingError> {
        if self.end.snapshot(Self::requests)? == 0 {
            return Ok(None);
        }
        Ok(Some(self.end.take()))
    }

    /// Answer the oldest consumed, unanswered request. Not visible to the
    /// front end until [`BackRing::publish_responses`].
    pub fn push_response(&mut self, rsp: &Rsp) -> Result<(), RingError> {
        if self.end.prod_pvt == self.end.cons {
            return Err(RingError::NoRequestToAnswer);
        }
        self.end.put(rsp);
        Ok(())
    }

    /// Publish written responses (Xen's
    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`); true if the front end wants
    /// a notification.
    pub fn publish_responses(&mut self) -> bool {
        self.end.publish(RSP_PROD, RSP_EVENT)
    }

    /// Before sleeping (Xen's `RING_FINAL_CHECK_FOR_REQUESTS`).
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        self.end.final_check(REQ_EVENT, Self::requests)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::mem::AtomicMem;
    use core::sync::atomic::AtomicU32;
    use std::vec::Vec;

    #[repr(C)]
    #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
    struct Req {
        seq: u64,
        payload: [u64; 3],
    }

    #[repr(C)]
    #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
    struct Rsp {
        seq: u64,
        sum: u64,
    }

    fn words(bytes: usize) -> Vec<AtomicU32> {
        (0..bytes / 4).map(|_| AtomicU32::new(0)).collect()
    }

    fn req(seq: u64) -> Req {
        Req {
            seq,
            payload: [seq ^ 0x5555, seq.wrapping_mul(3), !seq],
        }
    }

    #[test]
    fn entries_are_largest_power_of_two() {
        assert_eq!(ring_entries(4096, 64), 32); // (4096-64)/64 = 63 -> 32
        assert_eq!(ring_entries(64 + 64 * 64, 64), 64);
        assert_eq!(ring_entries(64 + 64 * 64 - 1, 64), 32);
        assert_eq!(ring_entries(64 + 112, 112), 1);
        assert_eq!(ring_entries(64 + 111, 112), 0);
        assert_eq!(ring_entries(10, 0), 0);
        for bytes in 64..5000usize {
            for slot in [8usize, 24, 64, 112] {
                let n = ring_entries(bytes, slot) as usize;
                let fit = bytes.saturating_sub(64) / slot;
                if fit == 0 {
                    assert_eq!(n, 0);
                } else {
                    assert!(
                        n.is_power_of_two() && n <= fit && 2 * n > fit,
                        "{bytes} {slot}"
                    );
                }
            }
        }
    }

    #[test]
    fn notify_rule_matches_interval_model() {
        // Event in (old, new] with wrapping: check against an explicit walk.
        let cases = [0u32, 1, 2, 5, u32::MAX - 2, u32::MAX - 1, u32::MAX];
        for &old in &cases {
            for d in 0..6u32 {
                let new = old.wrapping_add(d);
                for e in 0..10u32 {
                    let event = old.wrapping_sub(2).wrapping_add(e);
                    let model = (1..=d).any(|k| old.wrapping_add(k) == event);
                    assert_eq!(notify_needed(old, new, event), model, "{old} {new} {event}");
                }
            }
        }
    }

    #[test]
    fn layout_rejects_bad_regions() {
        assert_eq!(
            RingLayout::new(4096, 4, 1024, 64),
            Err(RingError::Misaligned)
        );
        assert_eq!(
            RingLayout::new(4096, 3072, 2048, 64),
            Err(RingError::OutOfBounds)
        );
        assert_eq!(
            RingLayout::new(4096, 8, usize::MAX, 64),
            Err(RingError::OutOfBounds)
        );
        assert_eq!(RingLayout::new(4096, 0, 127, 64), Err(RingError::TooSmall));
        assert_eq!(
            RingLayout::new(4096, 0, 128, 64).map(|l| l.entries()),
            Ok(1)
        );
    }

    #[test]
    fn init_matches_shared_ring_init() {
        let w = words(512);
        let m = AtomicMem::new(&w);
        m.write_bytes(0, &[0xffu8; 512]);
        let l = RingLayout::new(m.size(), 0, 512, 64).unwrap();
        l.init_shared(&m);
        let mut h = [0u8; 64];
        m.read_bytes(0, &mut h);
        let h = SringHeader::read_from_bytes(&h[..]).unwrap();
        assert_eq!(
            (h.req_prod, h.req_event, h.rsp_prod, h.rsp_event),
            (0, 1, 0, 1)
        );
        assert_eq!(h.pvt, [0; 4]);
        assert_eq!(h.pad, [0; 44]);
        let mut slot = [0u8; 8];
        m.read_bytes(64, &mut slot);
        assert_eq!(slot, [0xff; 8], "init leaves the slots alone");
    }

    #[test]
    fn request_response_round_trip_with_wrap_and_notify() {
        let w = words(64 + 4 * 32);
        let m = AtomicMem::new(&w);
        let bytes = m.size();
        let start = u32::MAX - 5; // indices wrap during the test
        let mut f: FrontRing<_, Req, Rsp> = FrontRing::attach_at(&m, 0, bytes, start).unwrap();
        let mut b: BackRing<_, Req, Rsp> = BackRing::attach_at(&m, 0, bytes, start).unwrap();
        m.store_u32(REQ_PROD, start);
        m.store_u32(RSP_PROD, start);
        m.store_u32(REQ_EVENT, start.wrapping_add(1));
        m.store_u32(RSP_EVENT, start.wrapping_add(1));
        assert_eq!(f.layout().entries(), 4);
        let mut seq = 0u64;
        let mut got = 0u64;
        for round in 0..10 {
            assert!(!b.final_check_for_requests().unwrap());
            let k = 1 + round % 4;
            for _ in 0..k {
                f.push_request(&req(seq)).unwrap();
                seq += 1;
            }
            if k == 4 {
                assert_eq!(f.push_request(&req(99)), Err(RingError::Full));
            }
            // The back end is asleep with req_event = cons + 1: must notify.
            assert!(f.publish_requests());
            // Nothing new published: no second notification.
            assert!(!f.publish_requests());
            while let Some(r) = b.pop_request().unwrap() {
                assert_eq!(r, req(got));
                b.push_response(&Rsp {
                    seq: r.seq,
                    sum: r.payload.iter().fold(0, |a, x| a ^ x),
                })
                .unwrap();
                got += 1;
            }
            assert_eq!(
                b.push_response(&Rsp { seq: 0, sum: 0 }),
                Err(RingError::NoRequestToAnswer)
            );
            assert!(!f.final_check_for_responses().unwrap());
            assert!(b.publish_responses());
            let mut n = 0;
            while let Some(r) = f.pop_response().unwrap() {
                let want = req(r.seq);
                assert_eq!(r.sum, want.payload.iter().fold(0, |a, x| a ^ x));
                n += 1;
            }
            assert_eq!(n, k);
            assert_eq!(f.free_requests(), 4);
        }
        assert_eq!(got, seq);
    }

    #[test]
    fn hostile_front_gets_errors_and_no_state_change() {
        let w = words(64 + 4 * 32);
        let m = AtomicMem::new(&w);
        let mut b: BackRing<_, Req, Rsp> = BackRing::attach(&m, 0, m.size()).unwrap();
        for bad in [5u32, 100, u32::MAX, u32::MAX - 3, 1 << 31] {
            m.store_u32(REQ_PROD, bad);
            assert_eq!(
                b.pop_request(),
                Err(RingError::PeerOverrun { prod: bad, cons: 0 })
            );
            assert_eq!(
                b.final_check_for_requests(),
                Err(RingError::PeerOverrun { prod: bad, cons: 0 })
            );
            assert_eq!((b.req_cons(), b.rsp_prod_pvt()), (0, 0));
        }
        // Honest again: four requests are fine, the fifth slot would overrun
        // unanswered requests.
        m.store_u32(REQ_PROD, 4);
        for _ in 0..4 {
            assert!(b.pop_request().unwrap().is_some());
        }
        m.store_u32(REQ_PROD, 5);
        assert_eq!(
            b.pop_request(),
            Err(RingError::PeerOverrun { prod: 5, cons: 4 })
        );
        // The front moves req_prod backwards.
        m.store_u32(REQ_PROD, 2);
        assert_eq!(
            b.pop_request(),
            Err(RingError::PeerOverrun { prod: 2, cons: 4 })
        );
        assert_eq!(b.req_cons(), 4);
    }

    #[test]
    fn hostile_back_gets_errors_and_no_state_change() {
        let w = words(64 + 4 * 32);
        let m = AtomicMem::new(&w);
        let mut f: FrontRing<_, Req, Rsp> = FrontRing::attach(&m, 0, m.size()).unwrap();
        f.push_request(&req(1)).unwrap();
        f.push_request(&req(2)).unwrap();
        f.publish_requests();
        for bad in [3u32, 4, 9, u32::MAX] {
            m.store_u32(RSP_PROD, bad);
            assert_eq!(
                f.pop_response(),
                Err(RingError::PeerOverrun { prod: bad, cons: 0 })
            );
            assert_eq!(
                f.final_check_for_responses(),
                Err(RingError::PeerOverrun { prod: bad, cons: 0 })
            );
            assert_eq!(f.rsp_cons(), 0);
            assert_eq!(f.free_requests(), 2);
        }
        m.store_u32(RSP_PROD, 2);
        assert!(f.pop_response().unwrap().is_some());
        assert!(f.pop_response().unwrap().is_some());
        assert_eq!(f.pop_response(), Ok(None));
    }

    #[test]
    fn hostile_back_skip_and_status_reads_get_errors_and_no_state_change() {
        let w = words(64 + 4 * 32);
        let m = AtomicMem::new(&w);
        let mut f: FrontRing<_, Req, Rsp> = FrontRing::attach(&m, 0, m.size()).unwrap();
        f.push_request(&req(1)).unwrap();
        f.push_request(&req(2)).unwrap();
        f.publish_requests();
        for bad in [3u32, 4, 9, u32::MAX] {
            m.store_u32(RSP_PROD, bad);
            let e = Err(RingError::PeerOverrun { prod: bad, cons: 0 });
            assert_eq!(f.skip_responses(u32::MAX), e);
            assert_eq!(f.pop_response_u32(8), e.map(|_| None));
            assert_eq!((f.rsp_cons(), f.free_requests()), (0, 2));
        }
        // A field outside the response (or misaligned) is refused before
        // anything is read or consumed.
        m.store_u32(RSP_PROD, 2);
        for field in [2usize, 13, 16, usize::MAX - 1, usize::MAX & !3] {
            assert_eq!(f.pop_response_u32(field), Err(RingError::OutOfBounds));
        }
        assert_eq!(f.rsp_cons(), 0);
    }

    #[test]
    fn skip_and_status_reads_consume_like_pop() {
        let w = words(64 + 4 * 32);
        let m = AtomicMem::new(&w);
        let bytes = m.size();
        let start = u32::MAX - 2; // indices wrap during the test
        let mut f: FrontRing<_, Req, Rsp> = FrontRing::attach_at(&m, 0, bytes, start).unwrap();
        let mut b: BackRing<_, Req, Rsp> = BackRing::attach_at(&m, 0, bytes, start).unwrap();
        m.store_u32(REQ_PROD, start);
        m.store_u32(RSP_PROD, start);
        let mut seq = 0u64;
        for round in 0..6u64 {
            for _ in 0..4 {
                f.push_request(&req(seq)).unwrap();
                seq += 1;
            }
            f.publish_requests();
            while let Some(r) = b.pop_request().unwrap() {
                let sum = r.seq.wrapping_mul(0x1_0000_0001) ^ round;
                b.push_response(&Rsp { seq: r.seq, sum }).unwrap();
            }
            b.publish_responses();
            assert_eq!(f.skip_responses(0), Ok(0));
            // Word 2 of a response is the low half of `sum`.
            let first = seq - 4;
            let want = |s: u64| (s.wrapping_mul(0x1_0000_0001) ^ round) as u32;
            assert_eq!(f.pop_response_u32(8), Ok(Some(want(first))));
            assert_eq!(f.skip_responses(2), Ok(2));
            assert_eq!(f.free_requests(), 3);
            assert_eq!(f.pop_response_u32(0), Ok(Some((first + 3) as u32)));
            assert_eq!(f.skip_responses(u32::MAX), Ok(0));
            assert_eq!(f.pop_response_u32(8), Ok(None));
            assert_eq!(f.pop_response(), Ok(None));
            assert_eq!(f.free_requests(), 4);
            assert_eq!(f.rsp_cons(), start.wrapping_add(seq as u32));
        }
    }

    /// A window that records the write hints the ring gives it.
    struct Hinted<'a> {
        mem: AtomicMem<'a>,
        hints: core::cell::RefCell<Vec<(usize, usize)>>,
    }

    impl SharedMem for Hinted<'_> {
        fn size(&self) -> usize {
            self.mem.size()
        }
        fn load_u32(&self, offset: usize) -> u32 {
            self.mem.load_u32(offset)
        }
        fn store_u32(&self, offset: usize, value: u32) {
            self.mem.store_u32(offset, value)
        }
        fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
            self.mem.read_bytes(offset, dst)
        }
        fn write_bytes(&self, offset: usize, src: &[u8]) {
            self.mem.write_bytes(offset, src)
        }
        fn prefetch_write(&self, offset: usize, len: usize) {
            self.hints.borrow_mut().push((offset, len));
        }
    }

    #[test]
    fn write_hints_name_only_published_slots_ahead() {
        let w = words(64 + 32 * 32);
        let m = Hinted {
            mem: AtomicMem::new(&w),
            hints: Default::default(),
        };
        let bytes = m.size();
        let start = u32::MAX - 12; // indices wrap during the test
        let mut f: FrontRing<_, Req, Rsp> = FrontRing::attach_at(&m, 0, bytes, start).unwrap();
        let mut b: BackRing<_, Req, Rsp> = BackRing::attach_at(&m, 0, bytes, start).unwrap();
        let layout = f.layout();
        assert_eq!((layout.entries(), layout.slot()), (32, 32));
        let slots = |seqs: &[u32]| -> Vec<(usize, usize)> {
            seqs.iter()
                .map(|&i| (layout.slot_offset(start.wrapping_add(i)), 32))
                .collect()
        };
        m.store_u32(REQ_PROD, start);
        m.store_u32(RSP_PROD, start);
        let take = |m: &Hinted| core::mem::take(&mut *m.hints.borrow_mut());

        // 10 requests published, 3 taken: entries 8 and 9 are hinted while
        // entries 0 and 1 are read; 10 is not published yet.
        for i in 0..10 {
            f.push_request(&req(i)).unwrap();
        }
        f.publish_requests();
        for i in 0..3 {
            assert_eq!(b.pop_request().unwrap(), Some(req(i)));
        }
        assert_eq!(take(&m), slots(&[8, 9]));
        // 10 more published: the back end still works on its snapshot
        // (entries up to 9) and hints nothing past it; once the snapshot
        // is used up it reads the index again and hints 18 and 19.
        for i in 10..20 {
            f.push_request(&req(i)).unwrap();
        }
        f.publish_requests();
        for i in 3..20 {
            assert_eq!(b.pop_request().unwrap(), Some(req(i)));
            b.push_response(&Rsp { seq: i, sum: !i }).unwrap();
        }
        assert_eq!(b.pop_request().unwrap(), None);
        assert_eq!(take(&m), slots(&[18, 19]));
        // The three answers to requests 0-2 come last: 20 responses.
        for i in 0..3 {
            b.push_response(&Rsp { seq: i, sum: !i }).unwrap();
        }
        b.publish_responses();
        // The front end hints the response slots it will reuse, whichever
        // way it consumes them; skipping hints nothing.
        assert_eq!(f.pop_response().unwrap().map(|r| r.seq), Some(3));
        assert_eq!(f.pop_response_u32(0).unwrap(), Some(4));
        assert_eq!(f.skip_responses(5), Ok(5));
        assert_eq!(take(&m), slots(&[8, 9]));
        let mut n = 0;
        while f.pop_response().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 13);
        assert_eq!(take(&m), slots(&[15, 16, 17, 18, 19]));
        // Every slot is free again.
        assert_eq!(f.free_requests(), 32);
    }
}
