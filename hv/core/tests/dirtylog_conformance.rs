//! The conformance suite run on every dirty-log implementation, plus the
//! behaviour specific to each.

mod common;

use common::{check_peek, conformance, Model};
use doppel_core::dirtylog::{
    DirtyLog, DirtyLogError, DirtyRange, DirtyRanges, DirtyTree, DirtyWord, FlatLog, LogTree,
    NodeCounts, NoopLog, TREE_MAX_PFN,
};

const TREE_MAXES: &[u64] = &[TREE_MAX_PFN, 1 << 40, (1 << 24) + 5, 100_000, 40_000];
const FLAT_MAXES: &[u64] = &[(1 << 24) + 5, 100_000, 40_000, 65_535];

#[test]
fn conformance_dirty_tree() {
    conformance(|m| DirtyTree::new(m).expect("tree"), TREE_MAXES);
}

#[test]
fn conformance_log_tree() {
    conformance(|m| LogTree::new(m).expect("tree"), TREE_MAXES);
}

#[test]
fn conformance_flat() {
    conformance(|m| FlatLog::new(m).expect("flat"), FLAT_MAXES);
}

#[test]
fn noop_records_nothing_and_checks_range() {
    let log = NoopLog::new(1000);
    for p in [0, 1, 999, 1000] {
        assert_eq!(log.mark(p), Ok(false));
        assert_eq!(log.is_dirty(p), Ok(false));
    }
    assert_eq!(
        log.mark(1001),
        Err(DirtyLogError::PfnOutOfRange {
            pfn: 1001,
            max_pfn: 1000
        })
    );
    // Nothing reported, counters stay zero: the model of an empty log.
    check_peek(&log, &Model::new(1000));
    assert!(log.clean().expect("clean").words.is_empty());
    let dynamic: &dyn DirtyLog = &log;
    assert_eq!(dynamic.max_pfn(), 1000);
}

#[test]
fn tree_refuses_max_beyond_four_levels() {
    let err = DirtyLogError::MaxPfnTooLarge {
        max_pfn: TREE_MAX_PFN + 1,
        limit: TREE_MAX_PFN,
    };
    assert_eq!(LogTree::new(TREE_MAX_PFN + 1).err(), Some(err));
    assert_eq!(DirtyTree::new(u64::MAX).err().map(|e| e.errno()), Some(-22));
}

#[test]
fn tree_allocates_lazily_and_reuses_leaves() {
    let mut t = LogTree::new(TREE_MAX_PFN).expect("tree");
    assert_eq!(t.node_counts(), NodeCounts::default());
    t.mark(5).expect("mark");
    // One level-3 node, one level-2 node, one leaf.
    assert_eq!(
        t.node_counts(),
        NodeCounts {
            interior: 2,
            leaves: 1
        }
    );
    t.mark(32767).expect("same leaf");
    assert_eq!(
        t.node_counts(),
        NodeCounts {
            interior: 2,
            leaves: 1
        }
    );
    t.mark(32768).expect("next leaf");
    assert_eq!(
        t.node_counts(),
        NodeCounts {
            interior: 2,
            leaves: 2
        }
    );
    t.mark(1 << 24).expect("next level-2 node");
    assert_eq!(
        t.node_counts(),
        NodeCounts {
            interior: 3,
            leaves: 3
        }
    );
    t.mark(TREE_MAX_PFN).expect("last pfn");
    assert_eq!(
        t.node_counts(),
        NodeCounts {
            interior: 5,
            leaves: 4
        }
    );
    // A failed mark allocates nothing; peek and is_dirty neither.
    assert!(t.mark(TREE_MAX_PFN + 1).is_err());
    assert_eq!(t.is_dirty(1 << 35), Ok(false));
    t.peek().expect("peek");
    assert_eq!(
        t.node_counts(),
        NodeCounts {
            interior: 5,
            leaves: 4
        }
    );
    // CLEAN keeps the zeroed leaves for the next epoch.
    assert_eq!(t.clean().expect("clean").count(), 5);
    t.mark(6).expect("mark");
    assert_eq!(
        t.node_counts(),
        NodeCounts {
            interior: 5,
            leaves: 4
        }
    );
    // reset frees them.
    t.reset();
    assert_eq!(t.node_counts(), NodeCounts::default());
    assert!(t.peek().expect("peek").words.is_empty());
    assert_eq!(t.mark(6), Ok(true));
}

#[test]
fn dirty_tree_refuses_overlapping_operations() {
    let t = DirtyTree::new(1 << 20).expect("tree");
    t.mark(77).expect("mark");
    let mut inner = None;
    let stats = t
        .clean_with(|_| inner = Some(t.peek_with(|_| {}).err()))
        .expect("clean");
    assert_eq!(inner, Some(Some(DirtyLogError::Busy)));
    assert_eq!(DirtyLogError::Busy.errno(), -16);
    assert_eq!(stats.dirty_count, 1);
    // After the CLEAN, operations work again.
    assert!(t.peek().expect("peek").words.is_empty());
}

#[test]
fn dirty_tree_batch_counts_on_drop() {
    let t = DirtyTree::new(1 << 20).expect("tree");
    {
        let mut b = t.batch();
        assert_eq!(b.mark(1), Ok(true));
        assert_eq!(b.mark(1), Ok(false));
        assert_eq!(b.mark(2), Ok(true));
        assert!(b.mark((1 << 20) + 1).is_err());
    }
    let h = t.clean().expect("clean");
    assert_eq!(h.pfns().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!((h.stats.dirty_count, h.stats.fault_count), (2, 3));
}

#[test]
fn ranges_merge_across_words() {
    let words = [
        DirtyWord {
            base: 0,
            bits: 0b1011 << 60,
        },
        DirtyWord {
            base: 64,
            bits: u64::MAX,
        },
        DirtyWord {
            base: 128,
            bits: 1 | 1 << 63,
        },
        DirtyWord { base: 256, bits: 1 },
    ];
    let got: Vec<DirtyRange> = DirtyRanges::new(words.into_iter()).collect();
    let want = vec![
        DirtyRange { start: 60, len: 2 },
        DirtyRange { start: 63, len: 66 },
        DirtyRange { start: 191, len: 1 },
        DirtyRange { start: 256, len: 1 },
    ];
    assert_eq!(got, want);
}
