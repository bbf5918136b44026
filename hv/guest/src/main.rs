//! The test guest: runs the write patterns of `doppel_core::workload` for a
//! number of epochs and keeps its own ground truth, the set of pages it wrote
//! in the current epoch, in a bitmap the hypervisor reads at each epoch end.
//!
//! It writes nothing but the workload pages, its truth bitmap and its stack,
//! and it records all three, so the truth is exact: a dirty log that reports
//! a page the truth lacks, or misses one it has, is wrong.
#![no_std]
#![no_main]

use core::arch::asm;

use doppel_abi::guest::{
    hypercall, BootInfo, PatternId, BOOT_MAGIC, BOOT_VERSION, CONSOLE_PORT, HYPERCALL_VMMCALL,
    PAGE_SIZE, PAGE_TABLES_GPA, PAGE_TABLES_PAGES, PROGRAM_HOSTILE, PROGRAM_KV, STACK_GPA,
    STACK_PAGES, TRUTH_GPA, TRUTH_MAX_PFNS, TRUTH_PAGES,
};
use doppel_core::workload::{self, Write};

mod hostile;
mod kv;

struct Guest {
    vmmcall: bool,
}

impl Guest {
    fn hypercall(&self, nr: u64, a: u64, b: u64, c: u64) -> u64 {
        let ret: u64;
        if self.vmmcall {
            // SAFETY: VMMCALL exits to the hypervisor, which reads rax/rdi/
            // rsi/rdx and writes rax; no memory is touched.
            unsafe {
                asm!("vmmcall", inlateout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack));
            }
        } else {
            // SAFETY: as above, with Intel's VMCALL.
            unsafe {
                asm!("vmcall", inlateout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack));
            }
        }
        ret
    }
}

fn putc(b: u8) {
    // SAFETY: an OUT to the console port; the hypervisor intercepts it.
    unsafe { asm!("out dx, al", in("dx") CONSOLE_PORT, in("al") b, options(nomem, nostack)) };
}

fn print(s: &str) {
    s.bytes().for_each(putc);
}

fn print_u64(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf[i..].iter().copied().for_each(putc);
}

fn write_u64(gpa: u64, v: u64) {
    // SAFETY: guest memory is identity-mapped; every address passed here is
    // page-aligned-plus-offset inside guest RAM (the workload region, the
    // truth bitmap or the stack), checked by the callers against BootInfo.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, v) };
}

fn read_u64(gpa: u64) -> u64 {
    // SAFETY: as for `write_u64`: an identity-mapped address inside guest
    // RAM (callers pass page-table entries the hypervisor built).
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

/// The ground-truth bitmap.
struct Truth {
    /// Bit i: truth page i holds a set bit (must be cleared next epoch).
    used: u8,
}

impl Truth {
    const FIRST_PFN: u64 = TRUTH_GPA / PAGE_SIZE;

    fn set(&mut self, pfn: u64) {
        if pfn >= TRUTH_MAX_PFNS {
            return;
        }
        let byte = TRUTH_GPA + pfn / 8;
        let page = (byte - TRUTH_GPA) / PAGE_SIZE;
        // SAFETY: `byte` lies inside the truth bitmap (pfn < TRUTH_MAX_PFNS).
        unsafe {
            let p = byte as *mut u8;
            p.write_volatile(p.read_volatile() | 1 << (pfn % 8));
        }
        self.used |= 1 << page;
    }

    /// Record a page the guest wrote, and the truth pages that recording it
    /// wrote in turn.
    fn record(&mut self, pfn: u64) {
        self.set(pfn);
        let tpage = (pfn / 8) / PAGE_SIZE;
        self.set(Self::FIRST_PFN + tpage);
        // Bits of the truth pages themselves live in the first truth page.
        self.set(Self::FIRST_PFN);
    }

    /// Start an epoch: zero the pages used last epoch (and record those
    /// writes), then touch and record the stack and the page tables.
    ///
    /// The page tables: with EPT accessed/dirty flags on (Intel PML, A/D
    /// scans), the CPU treats every access of a guest page walk as a write
    /// to the walked table page (SDM vol. 3C, "Accessed and Dirty Flags
    /// for EPT"), so those pages may be logged in any epoch although their
    /// contents never change. Rewriting one entry of each with its own
    /// value makes them written pages in every mode, so the truth is exact
    /// whatever the hardware logs for the walks.
    fn begin_epoch(&mut self) {
        let used = self.used;
        self.used = 0;
        for page in 0..TRUTH_PAGES {
            if used & (1 << page) != 0 {
                let base = TRUTH_GPA + page * PAGE_SIZE;
                for off in (0..PAGE_SIZE).step_by(8) {
                    write_u64(base + off, 0);
                }
            }
        }
        for page in 0..TRUTH_PAGES {
            if used & (1 << page) != 0 {
                self.record(Self::FIRST_PFN + page);
            }
        }
        for s in 0..STACK_PAGES {
            let gpa = STACK_GPA + s * PAGE_SIZE;
            write_u64(gpa, 0x5ac5_5ac5);
            self.record(gpa / PAGE_SIZE);
        }
        for p in 0..PAGE_TABLES_PAGES {
            let gpa = PAGE_TABLES_GPA + p * PAGE_SIZE;
            write_u64(gpa, read_u64(gpa));
            self.record(gpa / PAGE_SIZE);
        }
    }
}

#[unsafe(no_mangle)]
extern "C" fn _start(boot_gpa: u64, probe: u64, probe_arg: u64) -> ! {
    // SAFETY: the hypervisor places BootInfo at `boot_gpa` (identity-mapped)
    // before starting the guest; we copy it out once.
    let boot: BootInfo = unsafe { core::ptr::read_volatile(boot_gpa as *const BootInfo) };
    let g = Guest {
        vmmcall: boot.hypercall == HYPERCALL_VMMCALL,
    };
    if boot.magic != BOOT_MAGIC || boot.version != BOOT_VERSION {
        print("guest: bad boot info\n");
        g.hypercall(hypercall::DONE, 1, 0, 0);
        halt();
    }
    let work_start = boot.work_start & !(PAGE_SIZE - 1);
    let work_end = boot.work_end.min(boot.mem_bytes) & !(PAGE_SIZE - 1);
    let work_pages = work_end.saturating_sub(work_start) / PAGE_SIZE;
    if work_start / PAGE_SIZE + work_pages > TRUTH_MAX_PFNS {
        print("guest: memory larger than the truth bitmap\n");
        g.hypercall(hypercall::DONE, 2, 0, 0);
        halt();
    }
    if boot.program == PROGRAM_HOSTILE {
        let status = hostile::run(&g, probe, probe_arg);
        g.hypercall(hypercall::DONE, status, 0, 0);
        halt();
    }
    if boot.program == PROGRAM_KV {
        let status = kv::serve(&g, work_start, work_pages, boot.keys);
        g.hypercall(hypercall::DONE, status, 0, 0);
        halt();
    }
    print("guest: workload region ");
    print_u64(work_pages);
    print(" pages\n");

    let mut truth = Truth { used: 0 };
    let mut epoch = 0u64;
    for pattern in PatternId::ALL {
        if boot.patterns & (1 << pattern as u32) == 0 {
            continue;
        }
        for e in 0..boot.epochs as u64 {
            truth.begin_epoch();
            workload::for_each_write(pattern, boot.seed, e, work_pages, &mut |w: Write| {
                let pfn = work_start / PAGE_SIZE + w.page;
                write_u64(
                    pfn * PAGE_SIZE + w.offset as u64,
                    workload::value(epoch, w.page),
                );
                truth.record(pfn);
            });
            g.hypercall(hypercall::EPOCH_END, epoch, pattern as u64, e);
            epoch += 1;
        }
    }
    g.hypercall(hypercall::DONE, 0, epoch, 0);
    halt()
}

fn halt() -> ! {
    loop {
        // SAFETY: HLT with interrupts off parks the vCPU; the hypervisor
        // intercepts it.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// The guest has no heap: it never allocates. `doppel-core` links the
/// `alloc` crate for the hypervisor's sake, which needs an allocator to
/// exist; this one refuses every request.
struct NoHeap;

// SAFETY: returning null is GlobalAlloc's documented way to refuse; dealloc
// is never called with a pointer this allocator handed out (it hands none).
unsafe impl core::alloc::GlobalAlloc for NoHeap {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[global_allocator]
static HEAP: NoHeap = NoHeap;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    print("guest: panic\n");
    halt()
}
