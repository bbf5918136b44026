//! Page-table frames and the allocator trait that provides them.
//!
//! Nested page tables live in 4 KiB host-physical frames that the hardware
//! walks. This crate never touches memory by physical address itself: it asks
//! a [`FrameAllocator`] for a zeroed frame (getting its [`HostPhysAddr`]) and
//! for a reference to a frame's contents. The kernel implements the trait over
//! its identity-mapped memory; tests and benches use [`HeapFramePool`], a heap
//! arena that pretends to live at some host-physical base and can be told to
//! fail.
//!
//! Entries are [`AtomicU64`]s because the hardware sets accessed/dirty bits
//! with locked read-modify-writes while a guest runs: software updates must
//! be atomic too or a hardware-set dirty bit could be lost.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{HostPhysAddr, PAGE_SIZE};

/// Number of 8-byte entries in one table frame.
pub const ENTRIES_PER_FRAME: usize = 512;

/// One 4 KiB page-table frame, as the hardware sees it.
#[repr(C, align(4096))]
pub struct Frame {
    /// The 512 entries.
    pub entries: [AtomicU64; ENTRIES_PER_FRAME],
}

const _: () = assert!(core::mem::size_of::<Frame>() == PAGE_SIZE as usize);
const _: () = assert!(core::mem::align_of::<Frame>() == PAGE_SIZE as usize);

impl Frame {
    /// A frame of zeroes.
    pub const fn zeroed() -> Self {
        Self {
            entries: [const { AtomicU64::new(0) }; ENTRIES_PER_FRAME],
        }
    }

    /// Sets every entry to zero.
    pub fn clear(&self) {
        for e in &self.entries {
            e.store(0, Ordering::Relaxed);
        }
    }
}

/// Source of 4 KiB page-table frames.
///
/// Contract for implementors:
/// - [`alloc_zeroed`](Self::alloc_zeroed) returns a 4 KiB-aligned frame whose
///   512 entries read as zero, not in use by anything else, or `None` when
///   memory is exhausted (this is a normal outcome, not a panic).
/// - [`frame`](Self::frame) returns the memory of a frame handed out by
///   `alloc_zeroed` and not yet freed. Callers never pass anything else; an
///   implementation may panic on other addresses (that is a bug in the
///   caller, not bad input).
/// - For tables loaded into hardware (EPTP / nCR3), the memory returned by
///   `frame(hpa)` must be the memory the processor reads at `hpa`. Page-table
///   code is memory-safe whatever the allocator does; the kernel's unsafe
///   code that loads the root pointer is where this property is relied upon.
pub trait FrameAllocator {
    /// A zeroed, 4 KiB-aligned frame, or `None` when out of memory.
    fn alloc_zeroed(&self) -> Option<HostPhysAddr>;
    /// Returns a frame obtained from `alloc_zeroed`.
    fn free(&self, frame: HostPhysAddr);
    /// The contents of an allocated frame.
    fn frame(&self, frame: HostPhysAddr) -> &Frame;
}

impl<T: FrameAllocator + ?Sized> FrameAllocator for &T {
    fn alloc_zeroed(&self) -> Option<HostPhysAddr> {
        (**self).alloc_zeroed()
    }
    fn free(&self, frame: HostPhysAddr) {
        (**self).free(frame)
    }
    fn frame(&self, frame: HostPhysAddr) -> &Frame {
        (**self).frame(frame)
    }
}

/// When a [`HeapFramePool`] refuses allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Allocate while frames remain.
    Never,
    /// Allow this many more successful allocations, then fail every one.
    After(usize),
}

struct PoolState {
    free: Vec<u32>,
    in_use: Vec<bool>,
    fail: FailMode,
    allocs: u64,
    bad_frees: u64,
}

/// A fixed pool of frames on the heap, presented at a chosen host-physical
/// base address.
///
/// For host tests and benches the base is arbitrary (it need not be where the
/// memory really is, which catches code that confuses pointers and
/// addresses). In a kernel that identity-maps memory, passing the pool's real
/// address as the base would make it usable for hardware too.
pub struct HeapFramePool {
    frames: Box<[Frame]>,
    base: HostPhysAddr,
    state: spin::Mutex<PoolState>,
}

impl HeapFramePool {
    /// A pool of `count` frames whose first frame is at `base` (4 KiB
    /// aligned; rounded down otherwise).
    pub fn new(count: usize, base: HostPhysAddr) -> Self {
        let mut frames = Vec::with_capacity(count);
        frames.resize_with(count, Frame::zeroed);
        let count_u32 = u32::try_from(count).unwrap_or(u32::MAX);
        Self {
            frames: frames.into_boxed_slice(),
            base: base.align_down(PAGE_SIZE),
            state: spin::Mutex::new(PoolState {
                // Popped from the end: hand out low addresses first.
                free: (0..count_u32).rev().collect(),
                in_use: alloc::vec![false; count],
                fail: FailMode::Never,
                allocs: 0,
                bad_frees: 0,
            }),
        }
    }

    /// Sets when allocations start failing.
    pub fn set_fail(&self, mode: FailMode) {
        self.state.lock().fail = mode;
    }

    /// Frames currently allocated.
    pub fn in_use(&self) -> usize {
        let s = self.state.lock();
        self.frames.len() - s.free.len()
    }

    /// Total successful allocations since creation.
    pub fn allocs(&self) -> u64 {
        self.state.lock().allocs
    }

    /// Frees of addresses that were not allocated (double free, foreign
    /// address); always 0 unless the user of the pool has a bug.
    pub fn bad_frees(&self) -> u64 {
        self.state.lock().bad_frees
    }

    fn index(&self, frame: HostPhysAddr) -> Option<usize> {
        let off = frame.as_u64().checked_sub(self.base.as_u64())?;
        if !off.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let i = usize::try_from(off / PAGE_SIZE).ok()?;
        (i < self.frames.len()).then_some(i)
    }
}

impl FrameAllocator for HeapFramePool {
    fn alloc_zeroed(&self) -> Option<HostPhysAddr> {
        let mut s = self.state.lock();
        if let FailMode::After(n) = s.fail {
            if n == 0 {
                return None;
            }
            s.fail = FailMode::After(n - 1);
        }
        let i = s.free.pop()? as usize;
        s.in_use[i] = true;
        s.allocs += 1;
        drop(s);
        self.frames[i].clear();
        Some(HostPhysAddr::new(self.base.as_u64() + i as u64 * PAGE_SIZE))
    }

    fn free(&self, frame: HostPhysAddr) {
        let mut s = self.state.lock();
        match self.index(frame) {
            Some(i) if s.in_use[i] => {
                s.in_use[i] = false;
                // `i < frames.len()` which came from a `u32` range.
                s.free.push(i as u32);
            }
            _ => s.bad_frees += 1,
        }
    }

    /// Panics if `frame` is not inside the pool (a caller bug, see the trait).
    fn frame(&self, frame: HostPhysAddr) -> &Frame {
        match self.index(frame) {
            Some(i) => &self.frames[i],
            None => panic!("{frame} is not a frame of this pool"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_zeroed_distinct_frames_and_counts() {
        let pool = HeapFramePool::new(3, HostPhysAddr::new(0x10_0000_0000));
        let a = pool.alloc_zeroed().unwrap();
        let b = pool.alloc_zeroed().unwrap();
        assert_eq!(a, HostPhysAddr::new(0x10_0000_0000));
        assert_eq!(b, HostPhysAddr::new(0x10_0000_1000));
        pool.frame(a).entries[7].store(42, Ordering::Relaxed);
        pool.free(a);
        let c = pool.alloc_zeroed().unwrap();
        assert_eq!(c, a, "freed frame is reused");
        assert!(pool
            .frame(c)
            .entries
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == 0));
        assert_eq!(pool.in_use(), 2);
        let _d = pool.alloc_zeroed().unwrap();
        assert_eq!(pool.alloc_zeroed(), None, "pool exhausted");
        assert_eq!(pool.allocs(), 4);
    }

    #[test]
    fn injected_failure_and_bad_frees() {
        let pool = HeapFramePool::new(8, HostPhysAddr::new(0));
        pool.set_fail(FailMode::After(1));
        assert!(pool.alloc_zeroed().is_some());
        assert_eq!(pool.alloc_zeroed(), None);
        pool.set_fail(FailMode::Never);
        let f = pool.alloc_zeroed().unwrap();
        pool.free(f);
        pool.free(f);
        pool.free(HostPhysAddr::new(0x123));
        pool.free(HostPhysAddr::new(0x100_0000));
        assert_eq!(pool.bad_frees(), 3);
        assert_eq!(pool.in_use(), 1);
    }
}
