//! Random sequences of mark / peek / clean / PML drain against a HashSet
//! model, for each implementation.

mod common;

use common::{
    check_peek, clean_unordered, harvest_set, model_bitmap, model_ranges, unordered_set, Model,
};
use doppel_core::dirtylog::{DirtyLog, DirtyTree, FlatLog, LogTree, TREE_MAX_PFN};
use doppel_core::pml::{self, DrainStats, PmlError, PML_ENTRIES};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Mark(u64),
    /// Marks `len` pfns from `start` on, `step` apart (fills a leaf's list
    /// of new bits past its capacity).
    MarkRun(u64, u16, u16),
    IsDirty(u64),
    Peek,
    Clean,
    CleanUnordered,
    CleanBitmap,
    Drain(Vec<u64>, u16),
}

fn pfn(max: u64) -> impl Strategy<Value = u64> {
    let mut edges = common::boundaries(max);
    edges.extend([max + 1, max + 64, u64::MAX]);
    prop_oneof![
        3 => 0..=max,
        3 => prop::sample::select(edges),
        // A small cluster, so pages are marked again and runs form.
        2 => 0..=max.min(300),
    ]
}

fn gpa(max: u64) -> impl Strategy<Value = u64> {
    // Any low 12 bits; pfns beyond 2^52 cannot be expressed in a gpa.
    (pfn(max), 0..4096u64).prop_map(|(p, low)| ((p & ((1 << 52) - 1)) << 12) | low)
}

fn ops(max: u64) -> impl Strategy<Value = Vec<Op>> {
    let index = prop_oneof![
        0..=511u16,
        Just(511u16),
        Just(0u16),
        Just(0xFFFFu16),
        512..0xFFFFu16,
    ];
    let op = prop_oneof![
        12 => pfn(max).prop_map(Op::Mark),
        2 => (pfn(max), 1..100u16, 1..700u16).prop_map(|(p, n, s)| Op::MarkRun(p, n, s)),
        2 => pfn(max).prop_map(Op::IsDirty),
        2 => Just(Op::Peek),
        3 => Just(Op::Clean),
        3 => Just(Op::CleanUnordered),
        1 => Just(Op::CleanBitmap),
        1 => (prop::collection::vec(gpa(max), PML_ENTRIES), index)
            .prop_map(|(b, i)| Op::Drain(b, i)),
    ];
    prop::collection::vec(op, 1..60)
}

/// The model's reading of a drain: which slots are valid, per the SDM.
fn model_drain(model: &mut Model, buf: &[u64; 512], index: u16) -> Result<DrainStats, PmlError> {
    let first = match index {
        0xFFFF => 0,
        i if i <= 511 => usize::from(i) + 1,
        i => return Err(PmlError::BadIndex(i)),
    };
    let mut s = DrainStats {
        next_index: 511,
        ..DrainStats::default()
    };
    for &g in &buf[first..] {
        s.entries += 1;
        match model.mark(g >> 12) {
            Ok(new) => s.newly_dirty += usize::from(new),
            Err(_) => {
                s.out_of_range += 1;
                s.worst_pfn = s.worst_pfn.max(Some(g >> 12));
            }
        }
    }
    Ok(s)
}

fn run<L: DirtyLog>(log: &L, ops: &[Op]) {
    let mut model = Model::new(log.max_pfn());
    for op in ops {
        match op {
            Op::Mark(p) => assert_eq!(log.mark(*p), model.mark(*p), "mark {p:#x}"),
            Op::MarkRun(start, len, step) => {
                for i in 0..u64::from(*len) {
                    let p = start.saturating_add(i * u64::from(*step));
                    assert_eq!(log.mark(p), model.mark(p), "mark {p:#x}");
                }
            }
            Op::IsDirty(p) => {
                let want = if *p > model.max_pfn {
                    log.is_dirty(*p).is_err()
                } else {
                    log.is_dirty(*p) == Ok(model.dirty.contains(p))
                };
                assert!(want, "is_dirty {p:#x}");
            }
            Op::Peek => check_peek(log, &model),
            Op::Clean => {
                let (want, stats) = model.clean();
                let h = log.clean().expect("clean");
                assert_eq!(harvest_set(&h), want);
                assert_eq!(h.ranges().collect::<Vec<_>>(), model_ranges(&want));
                assert_eq!(h.stats, stats);
            }
            Op::CleanUnordered => {
                let (want, stats) = model.clean();
                let (words, got) = clean_unordered(log);
                assert_eq!(unordered_set(&words), want);
                assert_eq!(got, stats);
            }
            Op::CleanBitmap => {
                let len = log.bitmap_len();
                if len <= 1 << 16 {
                    let mut out = vec![0xEEu8; len];
                    let (want, stats) = model.clean();
                    assert_eq!(log.clean_bitmap(&mut out), Ok(stats));
                    assert_eq!(out, model_bitmap(&want, len));
                } else {
                    // Refused: nothing may change.
                    let mut out = vec![0u8; 1 << 16];
                    assert!(log.clean_bitmap(&mut out).is_err());
                }
            }
            Op::Drain(buf, index) => {
                let buf: &[u64; 512] = buf.as_slice().try_into().expect("512 entries");
                assert_eq!(
                    pml::drain(buf, *index, log),
                    model_drain(&mut model, buf, *index)
                );
            }
        }
    }
    check_peek(log, &model);
}

fn tree_max() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![
        TREE_MAX_PFN,
        1 << 40,
        (1 << 24) - 1,
        100_000,
        3 * 32768 - 1,
    ])
}

fn flat_max() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![100_000u64, 3 * 32768 - 1, 40_003])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn dirty_tree_matches_model((max, ops) in tree_max().prop_flat_map(|m| (Just(m), ops(m)))) {
        run(&DirtyTree::new(max).expect("tree"), &ops);
    }

    #[test]
    fn log_tree_matches_model((max, ops) in tree_max().prop_flat_map(|m| (Just(m), ops(m)))) {
        run(&LogTree::new(max).expect("tree"), &ops);
    }

    #[test]
    fn flat_matches_model((max, ops) in flat_max().prop_flat_map(|m| (Just(m), ops(m)))) {
        run(&FlatLog::new(max).expect("flat"), &ops);
    }
}
