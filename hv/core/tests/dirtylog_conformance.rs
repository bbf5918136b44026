//! The conformance suite run on every dirty-log implementation, plus the
//! behaviour specific to each.

mod common;

use common::{check_peek, conformance, Model};
use doppel_core::dirtylog::{
    DirtyLog, DirtyLogError, DirtyRange, DirtyRanges, DirtyTree, DirtyWord, FlatLog, LogTree,
    NodeCounts, NoopLog, LEAF_LIST_CAP, TREE_MAX_PFN,
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
fn dirty_tree_unordered_clean_reads_lists_and_walks_full_leaves() {
    let t = DirtyTree::new(1 << 20).expect("tree");
    let cap = LEAF_LIST_CAP as u64;
    // Leaf 3: two bits of one word, high first, with a later word marked
    // between them; then two more bits of one word one after the other.
    // Leaf 1: one more new bit than its list holds, two in word 0.
    let b3 = 3 * 32768;
    let listed = [b3 + 70, b3 + 9000, b3 + 65, b3 + 130, b3 + 131];
    let full: Vec<u64> = [32768, 32769]
        .into_iter()
        .chain((1..cap).map(|i| 32768 + i * 500))
        .collect();
    assert_eq!(full.len() as u64, cap + 1);
    for &p in listed.iter().chain(&full) {
        assert_eq!(t.mark(p), Ok(true));
    }
    let mut words = Vec::new();
    let stats = t.clean_unordered_with(|w| words.push(w)).expect("clean");
    assert_eq!(stats.dirty_count, cap + 6);
    // Leaves ascending. Leaf 1 overflowed its list: walked, one word per
    // 64 pfns, ascending. Leaf 3 was listed: one word per pfn, in the
    // order marked.
    let (walked, from_list) = words.split_at(words.len() - 5);
    assert_eq!(
        walked[0],
        DirtyWord {
            base: 32768,
            bits: 0b11
        }
    );
    assert!(walked.windows(2).all(|w| w[0].base < w[1].base));
    assert_eq!(
        walked.iter().map(|w| w.bits.count_ones()).sum::<u32>() as u64,
        cap + 1
    );
    assert_eq!(
        from_list,
        [
            DirtyWord {
                base: b3 + 64,
                bits: 1 << 6
            },
            DirtyWord {
                base: b3 + 8960,
                bits: 1 << 40
            },
            DirtyWord {
                base: b3 + 64,
                bits: 1 << 1
            },
            DirtyWord {
                base: b3 + 128,
                bits: 1 << 2
            },
            DirtyWord {
                base: b3 + 128,
                bits: 1 << 3
            },
        ]
    );
    // Nothing is dirty after the CLEAN, in either generation.
    for &p in full.iter().chain(&listed) {
        assert_eq!(t.is_dirty(p), Ok(false), "{p:#x}");
    }
    assert!(t.peek().expect("peek").words.is_empty());
    // The next CLEAN flips back to the generation harvested from its
    // lists: its old bits must be gone before new marks count.
    assert_eq!(t.clean().expect("clean").words, vec![]);
    assert_eq!(t.is_dirty(b3 + 70), Ok(false), "stale bits count as clean");
    assert!(t.peek().expect("peek").words.is_empty());
    assert_eq!(t.mark(b3 + 70), Ok(true));
    assert_eq!(t.is_dirty(b3 + 65), Ok(false));
    assert_eq!(t.mark(b3 + 65), Ok(true));
    let h = t.clean().expect("clean");
    assert_eq!(h.pfns().collect::<Vec<_>>(), vec![b3 + 65, b3 + 70]);
    assert_eq!(h.stats.dirty_count, 2);
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
