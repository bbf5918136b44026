//! CLEAN of a 64 GiB guest's dirty log (16,777,216 pfns) at 0.1%, 1% and
//! 10% dirty, against a flat bitmap of the same guest measured in the same
//! run: a plain linear scan+clear, the atomic `FlatLog` CLEAN, and a 2 MiB
//! memcpy. Each iteration re-marks the same pfns (untimed setup), then
//! times one CLEAN. Every variant feeds the same sink per dirty word, so
//! all produce the same dirty set (base and bits of every non-zero word).
//! Dirty pfns are uniform random, except `0.1%_runs16`: the same count in
//! runs of 16 consecutive pfns (aligned to 16), as guests dirty runs.
//!
//! Run: cargo bench -p doppel-core --bench clean

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use doppel_abi::splitmix::SplitMix64;
use doppel_core::dirtylog::{DirtyTree, DirtyWord, FlatLog, LogTree};

/// 64 GiB of 4 KiB pages.
const GUEST_PFNS: u64 = 1 << 24;
const FLAT_WORDS: usize = (GUEST_PFNS / 64) as usize;

/// `count` distinct pfns below GUEST_PFNS in runs of `run` consecutive
/// pfns starting at random multiples of `run` (splitmix64, fixed seed);
/// `run == 1` is uniform random.
fn dirty_pfns(count: usize, seed: u64, run: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    let mut seen = vec![0u64; FLAT_WORDS];
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let start = rng.below(GUEST_PFNS / run) * run;
        for p in start..start + run {
            let (w, m) = ((p / 64) as usize, 1u64 << (p % 64));
            if out.len() < count && seen[w] & m == 0 {
                seen[w] |= m;
                out.push(p);
            }
        }
    }
    out
}

/// What every CLEAN hands its words to.
#[inline(always)]
fn sink(acc: &mut u64, w: DirtyWord) {
    *acc = acc.wrapping_add(w.base ^ w.bits);
}

/// The flat baseline without atomics: read every word of the 2 MiB
/// bitmap, report and clear (store zero into) the non-zero ones; zero
/// words are not written.
fn flat_scan_clear(words: &mut [u64], mut f: impl FnMut(DirtyWord)) {
    for (i, w) in words.iter_mut().enumerate() {
        if *w != 0 {
            f(DirtyWord {
                base: i as u64 * 64,
                bits: *w,
            });
            *w = 0;
        }
    }
}

fn bench_clean(c: &mut Criterion) {
    let max_pfn = GUEST_PFNS - 1;
    let tree = DirtyTree::new(max_pfn).expect("tree");
    let swap_tree = LogTree::new(max_pfn).expect("tree");
    let flat_log = FlatLog::new(max_pfn).expect("flat");
    // Setup and routine both need the flat bitmap, one after the other.
    let flat = RefCell::new(vec![0u64; FLAT_WORDS]);
    let mut copy_dst = vec![0u64; FLAT_WORDS];

    for (label, count, run) in [
        ("0.1%", 16_777usize, 1),
        ("0.1%_runs16", 16_777, 16),
        ("1%", 167_772, 1),
        ("10%", 1_677_722, 1),
    ] {
        let pfns = dirty_pfns(count, 0xD0FF_E1C0_FFEE, run);
        let mut group = c.benchmark_group(format!("clean_64GiB_{label}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));

        group.bench_function("dirty_tree", |b| {
            b.iter_batched(
                || {
                    let mut batch = tree.batch();
                    for &p in &pfns {
                        batch.mark(p).expect("mark");
                    }
                },
                |()| {
                    let mut acc = 0;
                    let stats = tree.clean_with(|w| sink(&mut acc, w)).expect("clean");
                    black_box((acc, stats))
                },
                BatchSize::PerIteration,
            )
        });

        group.bench_function("log_tree_swap", |b| {
            b.iter_batched(
                || {
                    for &p in &pfns {
                        swap_tree.mark(p).expect("mark");
                    }
                },
                |()| {
                    let mut acc = 0;
                    let stats = swap_tree.clean_with(|w| sink(&mut acc, w));
                    black_box((acc, stats))
                },
                BatchSize::PerIteration,
            )
        });

        group.bench_function("flat_log_atomic", |b| {
            b.iter_batched(
                || {
                    for &p in &pfns {
                        doppel_core::dirtylog::DirtyLog::mark(&flat_log, p).expect("mark");
                    }
                },
                |()| {
                    let mut acc = 0;
                    let stats = flat_log.clean_with(|w| sink(&mut acc, w));
                    black_box((acc, stats))
                },
                BatchSize::PerIteration,
            )
        });

        group.bench_function("flat_scan_plain", |b| {
            b.iter_batched(
                || {
                    let mut flat = flat.borrow_mut();
                    for &p in &pfns {
                        flat[(p / 64) as usize] |= 1 << (p % 64);
                    }
                },
                |()| {
                    let mut acc = 0;
                    flat_scan_clear(&mut flat.borrow_mut(), |w| sink(&mut acc, w));
                    black_box(acc)
                },
                BatchSize::PerIteration,
            )
        });

        // The bitmap itself is the same size whatever the density.
        let mut src = flat.borrow_mut();
        for &p in &pfns {
            src[(p / 64) as usize] |= 1 << (p % 64);
        }
        group.bench_function("memcpy_2MiB", |b| {
            b.iter(|| {
                copy_dst.copy_from_slice(black_box(&src));
                black_box(&copy_dst);
            })
        });
        src.fill(0);
        drop(src);
        group.finish();
    }
}

criterion_group!(benches, bench_clean);
criterion_main!(benches);
