//! Several threads mark overlapping pfns while another repeatedly cleans:
//! the union of all harvests must be exactly the set of marked pfns, and
//! the counters must add up.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;

use common::{clean_unordered, harvest_set, unordered_set, Rng};
use doppel_core::dirtylog::{
    DirtyLog, DirtyStats, DirtyTree, FlatLog, Harvest, LogTree, NodeCounts,
};
use doppel_core::pml;

const MARKERS: u64 = 3;
const MARKS: usize = 20_000;

/// Pfns thread `t` marks: overlapping hot set, a shared spread, and leaf /
/// node boundaries, all below `max`.
fn pfns_for(t: u64, max: u64) -> Vec<u64> {
    let mut rng = Rng(0x5EED ^ t);
    let edges = common::boundaries(max);
    (0..MARKS)
        .map(|i| match i % 4 {
            0 => rng.below(4096),
            1 => rng.below(max + 1),
            2 => edges[rng.below(edges.len() as u64) as usize],
            _ => rng.below(3 * 32768),
        })
        .collect()
}

/// What the cleaner saw, summed over all harvests.
#[derive(Default)]
struct Outcome {
    union: BTreeSet<u64>,
    harvests: usize,
    bits: u64,
    totals: DirtyStats,
    /// Harvests whose dirty_count differed from their number of pfns.
    inexact: usize,
    marked: BTreeSet<u64>,
    marks: u64,
}

impl Outcome {
    fn add(&mut self, h: &Harvest) {
        self.add_set(harvest_set(h), h.stats);
    }

    fn add_set(&mut self, set: BTreeSet<u64>, stats: DirtyStats) {
        self.harvests += 1;
        self.bits += set.len() as u64;
        self.totals.dirty_count += stats.dirty_count;
        self.totals.fault_count += stats.fault_count;
        self.inexact += usize::from(stats.dirty_count != set.len() as u64);
        self.union.extend(set);
    }

    /// One CLEAN: ordered, or unordered on odd turns if `mixed`.
    fn clean<L: DirtyLog>(&mut self, log: &L, mixed: bool) {
        if mixed && self.harvests % 2 == 1 {
            let (words, stats) = clean_unordered(log);
            self.add_set(unordered_set(&words), stats);
        } else {
            self.add(&log.clean().expect("clean"));
        }
    }
}

/// One "vCPU" hands its pfns over as PML pages: a chunk of n entries sits
/// in slots 512 - n ..= 511 with index 511 - n (0xFFFF when n = 512).
fn drain_chunks<L: DirtyLog>(log: &L, list: &[u64]) {
    for chunk in list.chunks(512) {
        let mut page = [0u64; 512];
        for (slot, p) in page[512 - chunk.len()..].iter_mut().zip(chunk) {
            *slot = p << 12 | 0xABC;
        }
        let index = 511u16.wrapping_sub(chunk.len() as u16);
        let s = pml::drain(&page, index, log).expect("drain");
        assert_eq!((s.entries, s.out_of_range), (chunk.len(), 0));
    }
}

fn hammer<L: DirtyLog>(log: &L, use_pml: bool) -> Outcome {
    hammer_with(log, use_pml, false)
}

/// As [`hammer`]; with `mixed`, every other CLEAN is the unordered one.
fn hammer_with<L: DirtyLog>(log: &L, use_pml: bool, mixed: bool) -> Outcome {
    let max = log.max_pfn();
    let done = AtomicUsize::new(0);
    let cleans = AtomicUsize::new(0);
    let lists: Vec<Vec<u64>> = (0..MARKERS).map(|t| pfns_for(t, max)).collect();
    let mut out = Outcome::default();
    std::thread::scope(|s| {
        for (t, list) in lists.iter().enumerate() {
            let (done, cleans) = (&done, &cleans);
            s.spawn(move || {
                // Halfway through, wait for a clean to have happened, so at
                // least one harvest races with marking however the threads
                // are scheduled (a loaded machine could otherwise let every
                // marker finish before the cleaner's first turn).
                let (first, second) = list.split_at(list.len() / 2);
                for (i, half) in [first, second].into_iter().enumerate() {
                    if i == 1 {
                        while cleans.load(Ordering::Acquire) == 0 {
                            std::thread::yield_now();
                        }
                    }
                    if use_pml && t == 0 {
                        drain_chunks(log, half);
                    } else {
                        for &p in half {
                            log.mark(p).expect("in range");
                        }
                    }
                }
                done.fetch_add(1, Ordering::Release);
            });
        }
        // The cleaner: this thread, until every marker has finished.
        while done.load(Ordering::Acquire) < MARKERS as usize {
            out.clean(log, mixed);
            cleans.fetch_add(1, Ordering::Release);
            std::thread::yield_now();
        }
    });
    out.add(&log.clean().expect("final clean"));
    out.marked = lists.iter().flatten().copied().collect();
    out.marks = (MARKERS as usize * MARKS) as u64;
    out
}

fn check_union(o: &Outcome) {
    assert_eq!(o.union, o.marked, "lost or invented pfns");
    // Every bit reported was newly dirtied exactly once, every mark was a
    // fault: totals over all harvests are exact.
    assert_eq!(o.totals.dirty_count, o.bits);
    assert_eq!(o.totals.fault_count, o.marks);
    assert!(o.harvests > 1);
}

#[test]
fn dirty_tree_loses_nothing_and_counts_each_harvest_exactly() {
    for round in 0..3 {
        let log = DirtyTree::new(if round == 0 { 1 << 40 } else { 200_000 }).expect("tree");
        let o = hammer(&log, round == 1);
        check_union(&o);
        // Generations make every single harvest's counters exact.
        assert_eq!(o.inexact, 0);
    }
}

#[test]
fn dirty_tree_unordered_cleans_lose_nothing() {
    // Every other CLEAN harvests from the leaves' lists, so markers keep
    // meeting stale leaves and clear them, several threads at once.
    for round in 0..3 {
        let log = DirtyTree::new(if round == 0 { 1 << 40 } else { 200_000 }).expect("tree");
        let o = hammer_with(&log, round == 1, true);
        check_union(&o);
        assert_eq!(o.inexact, 0);
    }
}

#[test]
fn log_tree_loses_nothing() {
    for max in [1 << 40, 200_000] {
        let log = LogTree::new(max).expect("tree");
        check_union(&hammer(&log, max == 200_000));
    }
}

#[test]
fn flat_loses_nothing() {
    check_union(&hammer(&FlatLog::new(200_000).expect("flat"), true));
}

#[test]
fn racing_installers_agree_on_one_node_each() {
    // All threads mark the first pfn of the same 64 fresh leaves at once;
    // exactly one node per position must survive and every mark counts.
    let log = LogTree::new(1 << 40).expect("tree");
    let threads = 4;
    let barrier = Barrier::new(threads);
    let newly = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                for leaf in 0..64u64 {
                    // Spread over 4 level-2 nodes (16 leaves each).
                    let pfn = (leaf / 16) << 24 | (leaf % 16) << 15;
                    if log.mark(pfn).expect("mark") {
                        newly.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(newly.load(Ordering::Relaxed), 64);
    assert_eq!(
        log.node_counts(),
        NodeCounts {
            interior: 1 + 4,
            leaves: 64
        }
    );
    assert_eq!(
        log.stats(),
        DirtyStats {
            dirty_count: 64,
            fault_count: 64 * threads as u64
        }
    );
}
