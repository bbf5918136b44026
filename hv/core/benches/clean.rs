//! CLEAN of a 64 GiB guest's dirty log (16,777,216 pfns) at 0.1%, 1% and
//! 10% dirty, against a flat bitmap of the same guest measured in the same
//! run: a plain linear scan+clear, the atomic `FlatLog` CLEAN, and a 2 MiB
//! memcpy. Each iteration re-marks the same pfns (untimed setup), then
//! times one CLEAN. Every variant feeds the same sink per dirty word, so
//! all report the same dirty pfns. Dirty pfns are uniform random, except
//! `0.1%_runs16`: the same count in runs of 16 consecutive pfns (aligned
//! to 16), as guests dirty runs.
//!
//! `dirty_tree_unordered` is the CLEAN the hypervisor's checkpoint uses
//! (`DirtyTree::clean_unordered_with`, behind `clean_bitmap`): sparsely
//! dirtied leaves are read from their lists of new bits and their bitmap
//! words are cleared by the next epoch's marks instead. `dirty_tree` is
//! the ordered CLEAN (ascending words, cleared as read). Because the
//! unordered one leaves that clearing to the marks, the `epoch` ratio
//! also times marks and CLEAN together for both, so the work moved out
//! of CLEAN is counted.
//!
//! After criterion's figures it prints the ratios (doppel-benchkit: each
//! case and its baseline in alternating blocks): per density, each tree
//! CLEAN over the flat scan, the unordered one over the memcpy, and at
//! 0.1% and 1% marks+CLEAN unordered over ordered.
//!
//! Run: cargo bench -p doppel-core --bench clean (ratios alone: `-- ratio`)

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use doppel_abi::splitmix::SplitMix64;
use doppel_benchkit::{report, Goal};
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

/// Marks `pfns` in `tree` (one batch, as a PML drain does).
fn mark_tree(tree: &DirtyTree, pfns: &[u64]) {
    let mut batch = tree.batch();
    for &p in pfns {
        batch.mark(p).expect("mark");
    }
}

/// One CLEAN of `tree`, ordered or not, into the sink.
#[inline(always)]
fn clean_tree(tree: &DirtyTree, unordered: bool) {
    let mut acc = 0;
    let stats = if unordered {
        tree.clean_unordered_with(|w| sink(&mut acc, w))
    } else {
        tree.clean_with(|w| sink(&mut acc, w))
    };
    black_box((acc, stats.expect("clean")));
}

/// One timed CLEAN of `tree` after (untimed) marking `pfns`.
fn time_tree(tree: &DirtyTree, pfns: &[u64], unordered: bool) -> Duration {
    mark_tree(tree, pfns);
    let start = Instant::now();
    clean_tree(tree, unordered);
    start.elapsed()
}

/// Marking `pfns` and the CLEAN after it, timed together.
fn time_epoch(tree: &DirtyTree, pfns: &[u64], unordered: bool) -> Duration {
    let start = Instant::now();
    mark_tree(tree, pfns);
    clean_tree(tree, unordered);
    start.elapsed()
}

fn time_swap_tree(tree: &LogTree, pfns: &[u64]) -> Duration {
    for &p in pfns {
        tree.mark(p).expect("mark");
    }
    let mut acc = 0;
    let start = Instant::now();
    let stats = tree.clean_with(|w| sink(&mut acc, w));
    let t = start.elapsed();
    black_box((acc, stats));
    t
}

fn time_flat_log(log: &FlatLog, pfns: &[u64]) -> Duration {
    for &p in pfns {
        doppel_core::dirtylog::DirtyLog::mark(log, p).expect("mark");
    }
    let mut acc = 0;
    let start = Instant::now();
    let stats = log.clean_with(|w| sink(&mut acc, w));
    let t = start.elapsed();
    black_box((acc, stats));
    t
}

/// The baseline: one timed plain scan+clear of `flat` after (untimed)
/// setting the bits of `pfns`.
fn time_scan(flat: &mut [u64], pfns: &[u64]) -> Duration {
    for &p in pfns {
        flat[(p / 64) as usize] |= 1 << (p % 64);
    }
    let mut acc = 0;
    let start = Instant::now();
    flat_scan_clear(black_box(flat), |w| sink(&mut acc, w));
    let t = start.elapsed();
    black_box(acc);
    t
}

fn time_copy(dst: &mut [u64], src: &[u64]) -> Duration {
    let start = Instant::now();
    dst.copy_from_slice(black_box(src));
    black_box(&dst);
    start.elapsed()
}

/// The cases: label, dirty pfn count, run length, and (rounds, block) for
/// the interleaved ratio pass (fewer at 10%, whose marking takes longest).
const CASES: [(&str, usize, u64, (usize, usize)); 4] = [
    ("0.1%", 16_777, 1, (40, 10)),
    ("0.1%_runs16", 16_777, 16, (40, 10)),
    ("1%", 167_772, 1, (20, 5)),
    ("10%", 1_677_722, 1, (8, 3)),
];

fn bench_clean(c: &mut Criterion) {
    let max_pfn = GUEST_PFNS - 1;
    let tree = DirtyTree::new(max_pfn).expect("tree");
    let unordered_tree = DirtyTree::new(max_pfn).expect("tree");
    let swap_tree = LogTree::new(max_pfn).expect("tree");
    let flat_log = FlatLog::new(max_pfn).expect("flat");
    let mut flat = vec![0u64; FLAT_WORDS];
    let mut copy_dst = vec![0u64; FLAT_WORDS];

    for (label, count, run, _) in CASES {
        let pfns = dirty_pfns(count, 0xD0FF_E1C0_FFEE, run);
        let mut group = c.benchmark_group(format!("clean_64GiB_{label}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        group.bench_function("dirty_tree_unordered", |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| time_tree(&unordered_tree, &pfns, true))
                    .sum()
            })
        });
        group.bench_function("dirty_tree", |b| {
            b.iter_custom(|n| (0..n).map(|_| time_tree(&tree, &pfns, false)).sum())
        });
        group.bench_function("log_tree_swap", |b| {
            b.iter_custom(|n| (0..n).map(|_| time_swap_tree(&swap_tree, &pfns)).sum())
        });
        group.bench_function("flat_log_atomic", |b| {
            b.iter_custom(|n| (0..n).map(|_| time_flat_log(&flat_log, &pfns)).sum())
        });
        group.bench_function("flat_scan_plain", |b| {
            b.iter_custom(|n| (0..n).map(|_| time_scan(&mut flat, &pfns)).sum())
        });
        // The bitmap itself is the same size whatever the density.
        let src = dirty_bitmap(&pfns);
        group.bench_function("memcpy_2MiB", |b| {
            b.iter_custom(|n| (0..n).map(|_| time_copy(&mut copy_dst, &src)).sum())
        });
        group.finish();
    }
}

fn dirty_bitmap(pfns: &[u64]) -> Vec<u64> {
    let mut m = vec![0u64; FLAT_WORDS];
    for &p in pfns {
        m[(p / 64) as usize] |= 1 << (p % 64);
    }
    m
}

/// The ratios, case and baseline interleaved (doppel-benchkit):
/// the checkpoint's (unordered) CLEAN against the flat scan (target at
/// 0.1% uniform: at most 0.1x) and the memcpy of the flat bitmap; the
/// ordered CLEAN against the flat scan; marks+CLEAN unordered against
/// ordered (what moving the clearing to the marks costs or saves).
fn ratios() {
    let unordered = DirtyTree::new(GUEST_PFNS - 1).expect("tree");
    let ordered = DirtyTree::new(GUEST_PFNS - 1).expect("tree");
    let mut flat = vec![0u64; FLAT_WORDS];
    let mut copy_dst = vec![0u64; FLAT_WORDS];
    for (label, count, run, shape) in CASES {
        let pfns = dirty_pfns(count, 0xD0FF_E1C0_FFEE, run);
        let target = (label == "0.1%").then_some(0.1);
        report(
            &format!("clean_64GiB_{label}/scan"),
            ("dirty_tree_unordered", "flat_scan_plain"),
            Goal::Ratio(target),
            shape,
            || time_tree(&unordered, &pfns, true),
            || time_scan(&mut flat, &pfns),
        );
        report(
            &format!("clean_64GiB_{label}/ordered_scan"),
            ("dirty_tree", "flat_scan_plain"),
            Goal::Ratio(None),
            shape,
            || time_tree(&ordered, &pfns, false),
            || time_scan(&mut flat, &pfns),
        );
        let src = dirty_bitmap(&pfns);
        report(
            &format!("clean_64GiB_{label}/memcpy"),
            ("dirty_tree_unordered", "memcpy_2MiB"),
            Goal::Ratio(None),
            shape,
            || time_tree(&unordered, &pfns, true),
            || time_copy(&mut copy_dst, &src),
        );
        if count < 1_000_000 {
            let (rounds, block) = shape;
            report(
                &format!("clean_64GiB_{label}/epoch"),
                ("marks+dirty_tree_unordered", "marks+dirty_tree"),
                Goal::Ratio(None),
                (rounds / 2, block),
                || time_epoch(&unordered, &pfns, true),
                || time_epoch(&ordered, &pfns, false),
            );
        }
    }
}

criterion_group!(benches, bench_clean);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    ratios();
}
