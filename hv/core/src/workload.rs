//! The test guests' write patterns, as pure functions.
//!
//! A pattern, a seed and an epoch number decide exactly which pages of the
//! workload region are written and where, so a run is repeatable. The guest
//! runs these on bare metal; the host tests pin their shape here.

use doppel_abi::guest::PatternId;

/// Pages written per epoch by `seq`.
pub const SEQ_PAGES: u64 = 1024;
/// Writes per epoch by `rand` (pages may repeat).
pub const RAND_WRITES: u64 = 812;
/// Size of the `hot` set and how often each page is rewritten per epoch.
pub const HOT_PAGES: u64 = 16;
pub const HOT_REWRITES: u64 = 8;
/// Distance between `sparse` pages: 2 MiB, so each lands in its own large
/// page and log-dirty must split them all.
pub const SPARSE_STRIDE: u64 = 512;

/// A small, fast, seeded generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Never zero: xorshift would stay at zero.
        Self(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-enough value in [0, n); n > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One write: a page index inside the workload region and a byte offset in
/// that page, 8-byte aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Write {
    pub page: u64,
    pub offset: u16,
}

/// Call `f` for every write of `pattern` in `epoch`, in order, over a region
/// of `work_pages` pages. Nothing is written when the region is empty.
pub fn for_each_write(
    pattern: PatternId,
    seed: u64,
    epoch: u64,
    work_pages: u64,
    f: &mut dyn FnMut(Write),
) {
    if work_pages == 0 {
        return;
    }
    let off = |x: u64| ((x * 8) % 4096) as u16;
    match pattern {
        PatternId::Seq => {
            let n = SEQ_PAGES.min(work_pages);
            let start = epoch.wrapping_mul(n) % work_pages;
            for i in 0..n {
                f(Write {
                    page: (start + i) % work_pages,
                    offset: off(epoch + i),
                });
            }
        }
        PatternId::Rand => {
            let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x100_0000_01b3));
            for _ in 0..RAND_WRITES {
                let page = rng.below(work_pages);
                let o = rng.below(512);
                f(Write {
                    page,
                    offset: off(o),
                });
            }
        }
        PatternId::Hot => {
            let n = HOT_PAGES.min(work_pages);
            for r in 0..HOT_REWRITES {
                for p in 0..n {
                    f(Write {
                        page: p,
                        offset: off(epoch * HOT_REWRITES + r),
                    });
                }
            }
        }
        PatternId::Sparse => {
            // Shift by one page per epoch so successive epochs differ.
            let shift = epoch % SPARSE_STRIDE;
            let mut page = shift.min(work_pages - 1);
            while page < work_pages {
                f(Write {
                    page,
                    offset: off(epoch),
                });
                page += SPARSE_STRIDE;
            }
        }
        PatternId::Mixed => {
            for_each_write(PatternId::Hot, seed, epoch, work_pages, f);
            let mut rng = Rng::new(seed.rotate_left(17) ^ epoch);
            for _ in 0..RAND_WRITES / 4 {
                let page = rng.below(work_pages);
                f(Write {
                    page,
                    offset: off(rng.below(512)),
                });
            }
            for_each_write(PatternId::Sparse, seed, epoch, work_pages, f);
        }
    }
}

/// The value the guest stores with a write: distinct per epoch and write, so
/// successive epochs change the page contents.
pub fn value(epoch: u64, index: u64) -> u64 {
    (epoch << 32) ^ index ^ 0xd0_99e1_0000_0000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn pages(p: PatternId, seed: u64, epoch: u64, n: u64) -> (Vec<Write>, BTreeSet<u64>) {
        let mut v = Vec::new();
        for_each_write(p, seed, epoch, n, &mut |w| v.push(w));
        let set = v.iter().map(|w| w.page).collect();
        (v, set)
    }

    const WORK: u64 = 15360; // 60 MiB: a 64 MiB guest less the low 4 MiB

    #[test]
    fn every_write_stays_in_the_region_and_aligned() {
        for p in PatternId::ALL {
            for e in 0..6 {
                let (v, _) = pages(p, 7, e, WORK);
                assert!(!v.is_empty(), "{p:?}");
                for w in v {
                    assert!(w.page < WORK);
                    assert_eq!(w.offset % 8, 0);
                    assert!(w.offset < 4096);
                }
            }
        }
    }

    #[test]
    fn patterns_have_their_documented_shape() {
        let (v, s) = pages(PatternId::Seq, 1, 3, WORK);
        assert_eq!(v.len() as u64, SEQ_PAGES);
        assert_eq!(s.len() as u64, SEQ_PAGES);
        assert_eq!(*s.iter().next().unwrap(), 3 * SEQ_PAGES);

        let (v, s) = pages(PatternId::Hot, 1, 2, WORK);
        assert_eq!(v.len() as u64, HOT_PAGES * HOT_REWRITES);
        assert_eq!(s, (0..HOT_PAGES).collect());

        let (_, s) = pages(PatternId::Sparse, 1, 1, WORK);
        assert_eq!(s.len() as u64, WORK.div_ceil(SPARSE_STRIDE));
        assert!(s.iter().all(|p| p % SPARSE_STRIDE == 1));

        let (v, s) = pages(PatternId::Rand, 1, 0, WORK);
        assert_eq!(v.len() as u64, RAND_WRITES);
        assert!(s.len() as u64 > RAND_WRITES * 9 / 10, "rand too clustered");
    }

    #[test]
    fn runs_repeat_and_epochs_and_seeds_differ() {
        for p in PatternId::ALL {
            assert_eq!(pages(p, 5, 4, WORK).0, pages(p, 5, 4, WORK).0);
        }
        assert_ne!(
            pages(PatternId::Rand, 5, 4, WORK).1,
            pages(PatternId::Rand, 5, 5, WORK).1
        );
        assert_ne!(
            pages(PatternId::Rand, 5, 4, WORK).1,
            pages(PatternId::Rand, 6, 4, WORK).1
        );
        assert_ne!(
            pages(PatternId::Seq, 5, 0, WORK).1,
            pages(PatternId::Seq, 5, 1, WORK).1
        );
    }

    #[test]
    fn tiny_and_empty_regions_are_safe() {
        for p in PatternId::ALL {
            assert!(pages(p, 1, 9, 0).0.is_empty());
            for n in 1..4 {
                let (v, _) = pages(p, 1, 9, n);
                assert!(v.iter().all(|w| w.page < n), "{p:?} n={n}");
            }
        }
    }
}
