//! Cache hints for memory shared with a peer on another core.
//!
//! The shared rings of `doppel-abi` pass cache lines back and forth between
//! the hypervisor and the dom0 tool: one side writes a slot, the other
//! reads it and then writes its answer into the same slot, and the first
//! side reads that and later writes the slot again. A plain read leaves
//! such a line shared, so the write that follows has to invalidate the
//! peer's copy first: a second trip between the cores for the same line.
//! [`prefetch_write`] asks for the line exclusive ahead of time instead
//! (PREFETCHW), so the read and the later write both hit.
//!
//! `doppel-abi` has no unsafe code; the one `asm!` it needs for this lives
//! here. The hint changes no memory and no register the program can see,
//! so it cannot change what any code computes, only how fast.

#![no_std]

#[cfg(target_arch = "x86_64")]
use core::sync::atomic::{AtomicU8, Ordering};

/// Hint that this core will soon write the cache line holding `*at`.
///
/// On x86-64 CPUs that report PRFCHW (CPUID 8000_0001h:ECX bit 8: AMD
/// since the K6-2, Intel since Broadwell) this is PREFETCHW, which fetches
/// the line in an exclusive state; elsewhere it does nothing. Like every
/// prefetch it may be dropped by the CPU, and it never faults.
#[inline]
pub fn prefetch_write<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    if has_prefetchw() {
        // SAFETY: PREFETCHW only moves a cache line closer to this core;
        // it writes no register or memory the program can observe, takes
        // no fault (a prefetch of a bad address is dropped, and `at` is a
        // live reference anyway) and needs no stack. It runs only where
        // CPUID reports it, so it never meets a CPU that would not decode
        // it.
        unsafe {
            core::arch::asm!(
                "prefetchw [{}]",
                in(reg) at as *const T,
                options(nostack, readonly, preserves_flags),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Whether [`prefetch_write`] does anything here: never off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub fn has_prefetchw() -> bool {
    false
}

/// Whether the CPU has PREFETCHW, asked once (CPUID) and then remembered:
/// a relaxed load of a byte no one writes after the first call.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_prefetchw() -> bool {
    const UNKNOWN: u8 = 0;
    const NO: u8 = 1;
    const YES: u8 = 2;
    static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
    match STATE.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let yes = cpuid_prefetchw();
            // Two cores racing here store the same answer.
            STATE.store(if yes { YES } else { NO }, Ordering::Relaxed);
            yes
        }
    }
}

/// CPUID 8000_0001h:ECX bit 8 (PRFCHW, "3DNowPrefetch" in AMD's manuals),
/// if the CPU has that leaf.
#[cfg(target_arch = "x86_64")]
fn cpuid_prefetchw() -> bool {
    use core::arch::x86_64::__cpuid;
    const EXT_FEATURES: u32 = 0x8000_0001;
    const PRFCHW: u32 = 1 << 8;
    __cpuid(0x8000_0000).eax >= EXT_FEATURES && __cpuid(EXT_FEATURES).ecx & PRFCHW != 0
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::sync::atomic::AtomicU64;

    #[test]
    fn detection_matches_the_os() {
        // Linux lists the same CPUID bit as `3dnowprefetch`.
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let flags = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .expect("a flags line");
        let listed = flags.split_whitespace().any(|f| f == "3dnowprefetch");
        assert_eq!(has_prefetchw(), listed, "{flags}");
        // The remembered answer is the same as a fresh one.
        assert_eq!(has_prefetchw(), cpuid_prefetchw());
    }

    #[test]
    fn hint_changes_nothing() {
        let words: std::vec::Vec<AtomicU64> = (0..64u64).map(AtomicU64::new).collect();
        for w in &words {
            prefetch_write(w);
        }
        let x = 0x1234_5678u32;
        prefetch_write(&x);
        assert_eq!(x, 0x1234_5678);
        for (i, w) in words.iter().enumerate() {
            assert_eq!(w.load(Ordering::Relaxed), i as u64);
        }
    }
}
