//! Deliberate failures (`mode=crash-*` on the command line), so the boot
//! tests can check that a page fault, a panic and a kernel stack overflow
//! are each reported and end the run instead of hanging it.

use core::arch::asm;
use core::hint::black_box;

use doppel_kernel::config::Crash;

pub fn crash(kind: Crash) -> ! {
    log::info!("crashing on purpose: {kind:?}");
    match kind {
        Crash::NullRead => {
            let value: u64;
            // SAFETY: reads address 0, which the kernel's page tables leave
            // unmapped; the page fault handler ends the run, so nothing
            // after the read executes.
            unsafe {
                asm!("mov {v}, qword ptr [{a}]", v = out(reg) value, a = in(reg) 0u64,
                     options(nostack, readonly));
            }
            panic!("reading address 0 gave {value:#x} instead of a page fault")
        }
        Crash::Panic => panic!("requested by mode=crash-panic"),
        Crash::StackOverflow => {
            let n = recurse(0);
            panic!("unbounded recursion returned {n}")
        }
    }
}

/// Uses about half a KiB of stack per level until the guard page stops it.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 64]);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_add(frame[63])
}
