//! The host page tables, built by the kernel to replace the boot ones.
//!
//! All of physical memory up to max(4 GiB, top of RAM) is identity mapped.
//! The 2 MiB blocks holding the image are mapped with 4 KiB pages so that:
//! page 0 is not present (null dereferences fault), the guard page below the
//! stack is not present (overflows fault), code is read-only and
//! executable, read-only data is read-only, and data is not executable.
//! Everything else uses 2 MiB pages, writable, not executable.

use core::ops::Range;

use x86_64::structures::paging::{PageTable, PageTableFlags as F, PhysFrame};
use x86_64::PhysAddr;

use super::{frames, KernelLayout, MemError, PAGE_SIZE};
use crate::arch::{self, instr};

const SIZE_2M: u64 = 2 << 20;
const SIZE_1G: u64 = 1 << 30;
const SIZE_512G: u64 = 512 * SIZE_1G;
/// The boot tables map this much; new tables must be reachable through them.
const BOOT_MAPPED: u64 = 4 * SIZE_1G;

fn new_table() -> Result<(PhysFrame, &'static mut PageTable), MemError> {
    let frame = frames::alloc_zeroed().ok_or(MemError::OutOfFrames("page tables"))?;
    let pa = frame.start_address().as_u64();
    if pa + PAGE_SIZE > BOOT_MAPPED {
        return Err(MemError::OutOfFrames("page tables below 4 GiB"));
    }
    // SAFETY: a zeroed, exclusively owned frame (all-zero is an empty
    // table), identity mapped by the boot tables (checked above), kept for
    // the kernel's lifetime.
    let table = unsafe { &mut *(pa as *mut PageTable) };
    Ok((frame, table))
}

fn in_range(r: &Range<u64>, a: u64) -> bool {
    r.start <= a && a < r.end
}

/// Flags for the 4 KiB page at `pa` in the image's 2 MiB blocks, or `None`
/// for a page left unmapped.
fn small_page_flags(layout: &KernelLayout, pa: u64, nx: F) -> Option<F> {
    if pa == 0 || pa == layout.stack_guard {
        return None;
    }
    let flags = if in_range(&layout.text, pa) {
        F::PRESENT
    } else if in_range(&layout.rodata, pa) {
        F::PRESENT | nx
    } else {
        F::PRESENT | F::WRITABLE | nx
    };
    Some(flags)
}

pub fn init(layout: &KernelLayout, top_of_ram: u64) -> Result<(), MemError> {
    let nx = if arch::has_nx() {
        F::NO_EXECUTE
    } else {
        F::empty()
    };
    let top = top_of_ram.max(BOOT_MAPPED).next_multiple_of(SIZE_1G);
    let small_end = layout.image.end.next_multiple_of(SIZE_2M);
    let table_flags = F::PRESENT | F::WRITABLE;

    let (pml4_frame, pml4) = new_table()?;
    let (pdpt_frame, mut pdpt) = new_table()?;
    pml4[0].set_frame(pdpt_frame, table_flags);
    let mut gib = 0u64;
    while gib < top {
        if gib != 0 && gib.is_multiple_of(SIZE_512G) {
            let (f, t) = new_table()?;
            pml4[(gib / SIZE_512G) as usize].set_frame(f, table_flags);
            pdpt = t;
        }
        let (pd_frame, pd) = new_table()?;
        pdpt[((gib % SIZE_512G) / SIZE_1G) as usize].set_frame(pd_frame, table_flags);
        for (i, entry) in pd.iter_mut().enumerate() {
            let block = gib + i as u64 * SIZE_2M;
            if block < small_end {
                let (pt_frame, pt) = new_table()?;
                for (j, e) in pt.iter_mut().enumerate() {
                    let pa = block + j as u64 * PAGE_SIZE;
                    if let Some(flags) = small_page_flags(layout, pa, nx) {
                        e.set_addr(PhysAddr::new(pa), flags);
                    }
                }
                entry.set_frame(pt_frame, table_flags);
            } else {
                entry.set_addr(
                    PhysAddr::new(block),
                    F::PRESENT | F::WRITABLE | F::HUGE_PAGE | nx,
                );
            }
        }
        gib += SIZE_1G;
    }
    // SAFETY: the new tables identity map all RAM (the image, its stack and
    // statics, the boot info) and the 4 GiB below for devices; they are
    // never freed.
    unsafe { instr::write_cr3(pml4_frame) };
    log::debug!(
        "paging: identity map 0..{top:#x}, 4 KiB pages below {small_end:#x}, cr3={:#x}",
        instr::read_cr3()
    );
    Ok(())
}

/// Make the identity mapping of the page at `pa` uncached (PCD and PWT on
/// its leaf entry, a 2 MiB block or a 4 KiB page) and drop its TLB entry.
/// For device registers such as the local APIC's; a 2 MiB leaf is made
/// uncached as a whole, which only matters if it also holds RAM.
pub fn set_uncached(pa: u64) -> Result<(), &'static str> {
    let mut table = instr::read_cr3();
    for (level, shift) in [(4u8, 39u32), (3, 30), (2, 21), (1, 12)] {
        let index = ((pa >> shift) & 511) as usize;
        // SAFETY: `table` is the physical address of a live table of the
        // kernel's own tables (identity mapped, built by `init`, never
        // freed); this CPU runs alone and holds no other reference to it.
        let entry = unsafe { &mut (&mut *(table as *mut PageTable))[index] };
        let flags = entry.flags();
        if !flags.contains(F::PRESENT) {
            return Err("address not mapped");
        }
        if level == 1 || (level == 2 && flags.contains(F::HUGE_PAGE)) {
            entry.set_flags(flags | F::NO_CACHE | F::WRITE_THROUGH);
            instr::invlpg(pa);
            return Ok(());
        }
        if level == 3 && flags.contains(F::HUGE_PAGE) {
            // `init` never makes 1 GiB leaves.
            return Err("address in a 1 GiB page");
        }
        table = entry.addr().as_u64();
    }
    Err("address not mapped")
}
