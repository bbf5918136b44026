//! Physical memory: the frame allocator, the host page tables and the
//! kernel heap. Everything runs identity mapped (virtual == physical).

pub mod frames;
pub mod heap;
pub mod paging;

use core::fmt;
use core::ops::Range;

use doppel_kernel::bootinfo::BootInfo;

pub const PAGE_SIZE: u64 = 4096;

/// Addresses of the image's parts, from symbols of linker.ld.
#[derive(Clone, Debug)]
pub struct KernelLayout {
    /// The whole image: [__kernel_start, __kernel_end).
    pub image: Range<u64>,
    /// Code (boot code included): read and execute.
    pub text: Range<u64>,
    /// Read-only data. The rest of the image (data, .bss) is read-write,
    /// not executable.
    pub rodata: Range<u64>,
    /// The page below the kernel stack, left unmapped.
    pub stack_guard: u64,
}

unsafe extern "C" {
    static __kernel_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __kernel_end: u8;
    static boot_stack_guard: u8;
}

impl KernelLayout {
    pub fn get() -> Self {
        let a = |p: *const u8| p as u64;
        Self {
            image: a(&raw const __kernel_start)..a(&raw const __kernel_end),
            text: a(&raw const __kernel_start)..a(&raw const __text_end),
            rodata: a(&raw const __rodata_start)..a(&raw const __rodata_end),
            stack_guard: a(&raw const boot_stack_guard),
        }
    }
}

/// Why memory set-up failed.
#[derive(Clone, Copy, Debug)]
pub enum MemError {
    /// The loader gave no usable RAM above 1 MiB.
    NoMemoryMap,
    /// The memory map has more disjoint ranges than the allocator keeps.
    TooFragmented,
    /// No frame left for `what`.
    OutOfFrames(&'static str),
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMemoryMap => write!(f, "no usable RAM above 1 MiB in the boot memory map"),
            Self::TooFragmented => write!(f, "boot memory map too fragmented"),
            Self::OutOfFrames(what) => write!(f, "out of physical frames for {what}"),
        }
    }
}

/// Frame allocator from the boot memory map, host page tables, heap.
pub fn init(info: &BootInfo<'_>, info_addr: u64) -> Result<(), MemError> {
    let layout = KernelLayout::get();
    let info_range = info_addr..info_addr + info.total_size() as u64;
    let summary = frames::init(info, &layout, info_range)?;
    log::debug!(
        "memory: {} MiB free in {} ranges, top of RAM {:#x}, image {:#x}..{:#x}",
        summary.free_bytes >> 20,
        summary.ranges,
        summary.top_of_ram,
        layout.image.start,
        layout.image.end
    );
    paging::init(&layout, summary.top_of_ram)?;
    heap::init()?;
    Ok(())
}
