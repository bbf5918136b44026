//! The kernel heap (`alloc`), for structures hv/core allocates lazily. A
//! spin-locked linked-list allocator over contiguous frames.

use linked_list_allocator::LockedHeap;

use super::{frames, MemError};

pub const HEAP_SIZE: u64 = 4 << 20;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub fn init() -> Result<(), MemError> {
    let base = frames::alloc_contiguous(HEAP_SIZE, super::PAGE_SIZE)
        .ok_or(MemError::OutOfFrames("the heap"))?;
    // SAFETY: [base, base + HEAP_SIZE) is free RAM taken from the frame
    // allocator for the heap alone, identity mapped and writable, and the
    // heap is initialized once (before any allocation).
    unsafe { HEAP.lock().init(base as *mut u8, HEAP_SIZE as usize) };
    // Allocate once now, so a broken heap shows up here (allocation
    // failure panics) rather than in whoever allocates first.
    drop(alloc::vec![0u8; 4096]);
    log::debug!("heap: {} KiB at {base:#x}", HEAP_SIZE >> 10);
    Ok(())
}
