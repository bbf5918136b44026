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
    use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

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

    /// Bytes of a two-page buffer holding a known pattern that differ
    /// from it after `hint` ran on every byte of it (each offset in a line,
    /// the first and last byte of the buffer and of each page, lines split
    /// across the page boundary), then once per `u64` word over the same
    /// memory. The buffer is read back through `black_box`, so the compiler
    /// cannot answer from the values it wrote.
    fn changed_bytes(hint: impl Fn(usize, &AtomicU8)) -> std::vec::Vec<usize> {
        const LEN: usize = 8192;
        let pattern = |i: usize| (i as u8).wrapping_mul(151) ^ ((i >> 8) as u8) ^ 0xa5;
        let bytes: std::vec::Vec<AtomicU8> = (0..LEN).map(|i| AtomicU8::new(pattern(i))).collect();
        let bytes = core::hint::black_box(bytes);
        for (i, b) in bytes.iter().enumerate() {
            hint(i, b);
        }
        let words: std::vec::Vec<AtomicU64> = (0..LEN as u64 / 8)
            .map(|i| AtomicU64::new(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .collect();
        let words = core::hint::black_box(words);
        for w in &words {
            prefetch_write(w);
        }
        let mut changed: std::vec::Vec<usize> = core::hint::black_box(&bytes)
            .iter()
            .enumerate()
            .filter(|(i, b)| b.load(Ordering::Relaxed) != pattern(*i))
            .map(|(i, _)| i)
            .collect();
        for (i, w) in core::hint::black_box(&words).iter().enumerate() {
            if w.load(Ordering::Relaxed) != (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) {
                changed.push(LEN + i);
            }
        }
        changed
    }

    #[test]
    fn hint_changes_nothing() {
        assert_eq!(changed_bytes(|_, b| prefetch_write(b)), std::vec![]);
    }

    #[test]
    fn the_check_sees_a_hint_that_writes() {
        // A "hint" that writes the first byte, the last byte of the first
        // page and the last byte of the buffer is caught at each of them:
        // `hint_changes_nothing` can fail.
        let bad = |i: usize, b: &AtomicU8| {
            prefetch_write(b);
            if [0, 4095, 8191].contains(&i) {
                b.fetch_xor(1, Ordering::Relaxed);
            }
        };
        assert_eq!(changed_bytes(bad), std::vec![0, 4095, 8191]);
    }
}
