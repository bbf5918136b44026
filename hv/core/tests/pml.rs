//! PML drain: the index cases of the SDM, out-of-range gpas, bad indices
//! and failure recovery.

mod common;

use common::{harvest_set, Model};
use doppel_core::dirtylog::{DirtyLog, DirtyLogError, DirtyStats, DirtyTree, DirtyWord};
use doppel_core::pml::{drain, valid_entries, DrainStats, PmlError, PML_INDEX_EMPTY};

/// Buffer whose slot `i` holds the gpa of pfn `1000 + i` plus noise in the
/// low 12 bits (which the drain must ignore).
fn buffer() -> [u64; 512] {
    core::array::from_fn(|i| ((1000 + i as u64) << 12) | (i as u64 * 7 % 4096))
}

fn logged(log: &DirtyTree) -> Vec<u64> {
    harvest_set(&log.peek().expect("peek"))
        .into_iter()
        .collect()
}

#[test]
fn index_511_means_empty() {
    let log = DirtyTree::new(1 << 20).expect("tree");
    let s = drain(&buffer(), PML_INDEX_EMPTY, &log).expect("drain");
    assert_eq!(
        s,
        DrainStats {
            next_index: 511,
            ..DrainStats::default()
        }
    );
    assert!(logged(&log).is_empty());
}

#[test]
fn index_510_means_only_the_last_slot() {
    let log = DirtyTree::new(1 << 20).expect("tree");
    let s = drain(&buffer(), 510, &log).expect("drain");
    assert_eq!((s.entries, s.newly_dirty, s.next_index), (1, 1, 511));
    assert_eq!(logged(&log), vec![1000 + 511]);
}

#[test]
fn wrapped_index_means_all_512() {
    let log = DirtyTree::new(1 << 20).expect("tree");
    let s = drain(&buffer(), 0xFFFF, &log).expect("drain");
    assert_eq!((s.entries, s.newly_dirty, s.out_of_range), (512, 512, 0));
    assert_eq!(logged(&log), (1000..1512).collect::<Vec<_>>());
    // Index 0: slot 0 not yet written.
    let log = DirtyTree::new(1 << 20).expect("tree");
    assert_eq!(drain(&buffer(), 0, &log).expect("drain").entries, 511);
    assert_eq!(logged(&log), (1001..1512).collect::<Vec<_>>());
}

#[test]
fn repeated_pages_count_as_faults_once_dirty() {
    let log = DirtyTree::new(1 << 20).expect("tree");
    let buf = [0x5000u64; 512];
    let s = drain(&buf, 0xFFFF, &log).expect("drain");
    assert_eq!((s.entries, s.newly_dirty), (512, 1));
    assert_eq!(
        log.stats(),
        DirtyStats {
            dirty_count: 1,
            fault_count: 512
        }
    );
}

#[test]
fn bad_index_is_refused_without_logging() {
    let log = DirtyTree::new(1 << 20).expect("tree");
    for bad in [512u16, 513, 0x8000, 0xFFFE] {
        assert_eq!(drain(&buffer(), bad, &log), Err(PmlError::BadIndex(bad)));
        assert_eq!(valid_entries(bad), Err(PmlError::BadIndex(bad)));
    }
    assert!(logged(&log).is_empty());
    assert_eq!(log.stats(), DirtyStats::default());
}

#[test]
fn gpas_beyond_the_log_are_counted_not_logged() {
    let max = 1200;
    let log = DirtyTree::new(max).expect("tree");
    let mut buf = buffer();
    buf[511] = u64::MAX;
    let mut model = Model::new(max);
    let s = drain(&buf, 0xFFFF, &log).expect("drain");
    for &g in &buf {
        let _ = model.mark(g >> 12);
    }
    // pfns 1201..=1510 and the u64::MAX gpa are beyond max.
    assert_eq!(s.out_of_range, 310 + 1);
    assert_eq!(s.worst_pfn, Some(u64::MAX >> 12));
    assert_eq!(s.entries, 512);
    assert_eq!(logged(&log), model.sorted().into_iter().collect::<Vec<_>>());
    assert_eq!(log.stats(), model.stats);
}

/// A log that runs out of memory on one pfn.
struct FailsOn(u64, DirtyTree);

impl DirtyLog for FailsOn {
    fn max_pfn(&self) -> u64 {
        self.1.max_pfn()
    }
    fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        if pfn == self.0 {
            return Err(DirtyLogError::NoMemory);
        }
        self.1.mark(pfn)
    }
    fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        self.1.is_dirty(pfn)
    }
    fn stats(&self) -> DirtyStats {
        self.1.stats()
    }
    fn peek_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        self.1.peek_words(f)
    }
    fn clean_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        self.1.clean_words(f)
    }
}

#[test]
fn log_failure_reports_index_that_keeps_unlogged_entries() {
    for (fail_slot, start) in [(300usize, 0xFFFFu16), (0, 0xFFFF), (511, 100)] {
        let log = FailsOn(
            1000 + fail_slot as u64,
            DirtyTree::new(1 << 20).expect("tree"),
        );
        let err = drain(&buffer(), start, &log).expect_err("must fail");
        let PmlError::Log {
            error,
            resume_index,
        } = err
        else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(error, DirtyLogError::NoMemory);
        // Logged: the slots before the failure; kept: the failed one on.
        let first = valid_entries(start).expect("valid").start;
        let want: Vec<u64> = (first..fail_slot).map(|i| 1000 + i as u64).collect();
        assert_eq!(logged(&log.1), want);
        assert_eq!(valid_entries(resume_index).expect("valid"), fail_slot..512);
    }
}
