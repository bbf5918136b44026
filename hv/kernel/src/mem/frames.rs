//! The physical frame allocator: free RAM from the boot memory map, minus
//! low memory below 1 MiB, the kernel image, the boot information and boot
//! modules. Hands out the lowest free frames first (the page tables built
//! while the boot map covers only 4 GiB rely on that).

use core::ops::Range;
use core::sync::atomic::{AtomicBool, Ordering};

use doppel_abi::locator::{LOCATOR_AT, LOCATOR_SIZE};

use doppel_kernel::bootinfo::{BootInfo, RegionKind};
use doppel_kernel::memmap::RangeSet;
use spin::Mutex;
use x86_64::structures::paging::{PhysFrame, Size4KiB};
use x86_64::PhysAddr;

use super::{KernelLayout, MemError, PAGE_SIZE};

/// Disjoint free ranges kept (fragmentation from frees beyond this leaks
/// the freed frame, with a warning).
const MAX_RANGES: usize = 64;
/// Below this, firmware structures (IVT, BDA, EBDA, video, BIOS) live.
const LOW_MEMORY_END: u64 = 0x10_0000;

static FREE: Mutex<RangeSet<MAX_RANGES>> = Mutex::new(RangeSet::new());
/// The locator page was free RAM at boot and is now reserved.
static LOCATOR_RESERVED: AtomicBool = AtomicBool::new(false);

/// The control locator's page, reserved at boot (never allocated), or
/// `None` when it was not free RAM.
pub fn locator_page() -> Option<u64> {
    LOCATOR_RESERVED
        .load(Ordering::Relaxed)
        .then_some(LOCATOR_AT)
}

pub struct Summary {
    pub free_bytes: u64,
    pub ranges: usize,
    /// One past the highest byte of RAM the map reports (any kind but
    /// reserved).
    pub top_of_ram: u64,
}

pub fn init(
    info: &BootInfo<'_>,
    layout: &KernelLayout,
    info_range: Range<u64>,
) -> Result<Summary, MemError> {
    let mut free: RangeSet<MAX_RANGES> = RangeSet::new();
    let mut top = 0u64;
    for r in info.memory_map() {
        log::trace!("memory map: {:#x}..{:#x} {:?}", r.base, r.end(), r.kind);
        // Reserved ranges (holes, MMIO above 4 GiB such as QEMU's 12 GiB
        // HyperTransport range just below 1 TiB) do not count as RAM.
        if !matches!(r.kind, RegionKind::Reserved(_)) {
            top = top.max(r.end());
        }
        if r.kind == RegionKind::Available {
            free.insert(r.base..r.end())
                .map_err(|_| MemError::TooFragmented)?;
        }
    }
    let reserve = |free: &mut RangeSet<MAX_RANGES>, r: Range<u64>| {
        free.remove(r).map_err(|_| MemError::TooFragmented)
    };
    reserve(&mut free, layout.image.clone())?;
    reserve(&mut free, info_range)?;
    for m in info.modules() {
        reserve(&mut free, u64::from(m.start)..u64::from(m.end))?;
    }
    free.align_inward(PAGE_SIZE);
    // The control locator's page (hv/abi locator.rs, in low memory) is
    // never handed out: so it is never guest RAM, nor mapped by any nested
    // table. If it is not free RAM here (no RAM there, or the boot
    // information or a module over it), publishing a control area fails
    // later with a clear error.
    let loc = LOCATOR_AT..LOCATOR_AT + LOCATOR_SIZE;
    let loc_free = free
        .ranges()
        .iter()
        .any(|r| r.start <= loc.start && loc.end <= r.end);
    // Low memory (the locator page with it) is never allocated.
    free.clamp(LOW_MEMORY_END..u64::MAX);
    if loc_free {
        // Zero it: a magic left from an earlier boot must not point the
        // tool at memory that is guest RAM now.
        // SAFETY: the page is free RAM (checked just now), identity mapped
        // by the boot tables (below 4 GiB), and belongs to no one: it was
        // just taken out of the free set and nothing runs concurrently yet.
        unsafe { core::ptr::write_bytes(LOCATOR_AT as *mut u8, 0, LOCATOR_SIZE as usize) };
    }
    LOCATOR_RESERVED.store(loc_free, Ordering::Relaxed);
    if free.total() == 0 {
        return Err(MemError::NoMemoryMap);
    }
    let summary = Summary {
        free_bytes: free.total(),
        ranges: free.ranges().len(),
        top_of_ram: top,
    };
    *FREE.lock() = free;
    Ok(summary)
}

/// `bytes` (a multiple of 4 KiB) of contiguous physical memory aligned to
/// `align`, zeroed.
pub fn alloc_contiguous(bytes: u64, align: u64) -> Option<u64> {
    let pa = FREE.lock().take(bytes, align.max(PAGE_SIZE))?;
    // SAFETY: the range was free RAM (never the image, boot info or low
    // memory), is identity mapped, and now belongs to the caller alone.
    unsafe { core::ptr::write_bytes(pa as *mut u8, 0, bytes as usize) };
    Some(pa)
}

/// One zeroed 4 KiB frame.
pub fn alloc_zeroed() -> Option<PhysFrame<Size4KiB>> {
    alloc_contiguous(PAGE_SIZE, PAGE_SIZE)
        .map(|pa| PhysFrame::containing_address(PhysAddr::new(pa)))
}

/// Give `bytes` at `pa` (as returned by `alloc_contiguous`) back. If the
/// free set is too fragmented to record it, the memory stays unused.
pub fn free(pa: u64, bytes: u64) {
    if FREE.lock().insert(pa..pa + bytes).is_err() {
        log::warn!("frames: free set full, {bytes:#x} bytes at {pa:#x} leak");
    }
}
