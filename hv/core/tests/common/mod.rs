//! Shared by the dirty-log tests: a model, a seeded generator and the
//! conformance suite every `DirtyLog` implementation must pass (rust-vmm
//! vm-memory's bitmap test pattern).
#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};

use doppel_core::dirtylog::{
    DirtyLog, DirtyLogError, DirtyRange, DirtyStats, DirtyWord, Harvest, LEAF_LIST_CAP,
};

/// Small deterministic generator for tests with fixed seeds.
pub use doppel_abi::splitmix::SplitMix64 as Rng;

/// Pfns where the tree changes word, leaf or interior node.
pub fn boundaries(max_pfn: u64) -> Vec<u64> {
    let mut v = vec![
        0,
        1,
        63,
        64,
        65,
        32767,
        32768,
        32769,
        (1 << 24) - 1,
        1 << 24,
        (1 << 33) - 1,
        1 << 33,
        (1 << 40) - 1,
        max_pfn.saturating_sub(64),
        max_pfn.saturating_sub(1),
        max_pfn,
    ];
    v.retain(|&p| p <= max_pfn);
    v
}

/// The set of pfns a harvest reports; panics if a word is empty, out of
/// order or misaligned.
pub fn harvest_set(h: &Harvest) -> BTreeSet<u64> {
    for pair in h.words.windows(2) {
        assert!(pair[0].base < pair[1].base, "words not ascending");
    }
    for w in &h.words {
        assert_eq!(w.base % 64, 0, "word base not aligned");
        assert_ne!(w.bits, 0, "empty word reported");
    }
    let pfns: Vec<u64> = h.pfns().collect();
    let set: BTreeSet<u64> = pfns.iter().copied().collect();
    assert_eq!(set.len(), pfns.len(), "pfn reported twice");
    assert_eq!(h.count(), pfns.len() as u64);
    set
}

/// An unordered CLEAN (`clean_words_unordered`): its words and counters.
pub fn clean_unordered<L: DirtyLog + ?Sized>(log: &L) -> (Vec<DirtyWord>, DirtyStats) {
    let mut words = Vec::new();
    let stats = log
        .clean_words_unordered(&mut |w| words.push(w))
        .expect("unordered clean");
    (words, stats)
}

/// The set of pfns an unordered CLEAN reported; panics if a word is empty
/// or misaligned or a pfn came twice (words may repeat, bits may not).
pub fn unordered_set(words: &[DirtyWord]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for w in words {
        assert_eq!(w.base % 64, 0, "word base not aligned");
        assert_ne!(w.bits, 0, "empty word reported");
        let mut bits = w.bits;
        while bits != 0 {
            let p = w.base + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            assert!(set.insert(p), "pfn {p:#x} reported twice");
        }
    }
    set
}

/// Maximal runs of a sorted set, computed the obvious way.
pub fn model_ranges(set: &BTreeSet<u64>) -> Vec<DirtyRange> {
    let mut out: Vec<DirtyRange> = Vec::new();
    for &p in set {
        match out.last_mut() {
            Some(r) if r.start + r.len == p => r.len += 1,
            _ => out.push(DirtyRange { start: p, len: 1 }),
        }
    }
    out
}

/// Xen-layout bitmap of `len` bytes holding the pfns of `set` that fit.
pub fn model_bitmap(set: &BTreeSet<u64>, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for &p in set {
        if let Some(b) = out.get_mut((p >> 3) as usize) {
            *b |= 1 << (p & 7);
        }
    }
    out
}

/// The reference behaviour: a set and the two counters.
#[derive(Default)]
pub struct Model {
    pub dirty: HashSet<u64>,
    pub stats: DirtyStats,
    pub max_pfn: u64,
}

impl Model {
    pub fn new(max_pfn: u64) -> Self {
        Model {
            max_pfn,
            ..Model::default()
        }
    }

    pub fn mark(&mut self, pfn: u64) -> Result<bool, DirtyLogError> {
        if pfn > self.max_pfn {
            return Err(DirtyLogError::PfnOutOfRange {
                pfn,
                max_pfn: self.max_pfn,
            });
        }
        let new = self.dirty.insert(pfn);
        self.stats.fault_count += 1;
        self.stats.dirty_count += u64::from(new);
        Ok(new)
    }

    pub fn sorted(&self) -> BTreeSet<u64> {
        self.dirty.iter().copied().collect()
    }

    pub fn clean(&mut self) -> (BTreeSet<u64>, DirtyStats) {
        let set = self.sorted();
        self.dirty.clear();
        (set, std::mem::take(&mut self.stats))
    }
}

/// Checks that PEEK shows exactly the model, in every output form.
pub fn check_peek<L: DirtyLog + ?Sized>(log: &L, model: &Model) {
    let h = log.peek().expect("peek");
    let want = model.sorted();
    assert_eq!(harvest_set(&h), want);
    assert_eq!(h.stats, model.stats);
    assert_eq!(log.stats(), model.stats);
    assert_eq!(h.ranges().collect::<Vec<_>>(), model_ranges(&want));
    // Flat form: a window of at most 64 KiB (whole log when it is small).
    let len = log.bitmap_len().min(1 << 16);
    let mut out = vec![0xA5u8; len];
    assert_eq!(log.peek_bitmap(&mut out).expect("peek_bitmap"), model.stats);
    assert_eq!(out, model_bitmap(&want, len));
}

/// The conformance suite. `make(max_pfn)` builds an empty log; it is run
/// with each `max_pfn` in `maxes`.
pub fn conformance<L: DirtyLog>(make: impl Fn(u64) -> L, maxes: &[u64]) {
    for &max in maxes {
        empty_log(&make(max));
        mark_counts(&make(max));
        boundaries_and_order(&make(max));
        out_of_range_changes_nothing(&make(max));
        peek_changes_nothing(&make(max));
        clean_harvests_and_resets(&make(max));
        bitmap_forms(&make(max));
        random_epochs(&make(max), max);
        unordered_epochs(&make(max), max);
    }
}

fn empty_log<L: DirtyLog>(log: &L) {
    let model = Model::new(log.max_pfn());
    check_peek(log, &model);
    let h = log.clean().expect("clean");
    assert!(h.words.is_empty());
    assert_eq!(h.stats, DirtyStats::default());
}

fn mark_counts<L: DirtyLog>(log: &L) {
    let p = log.max_pfn() / 2;
    assert_eq!(log.is_dirty(p), Ok(false));
    assert_eq!(log.mark(p), Ok(true));
    assert_eq!(log.mark(p), Ok(false));
    assert_eq!(log.mark(p), Ok(false));
    assert_eq!(log.is_dirty(p), Ok(true));
    assert_eq!(
        log.stats(),
        DirtyStats {
            dirty_count: 1,
            fault_count: 3
        }
    );
}

fn boundaries_and_order<L: DirtyLog>(log: &L) {
    let mut model = Model::new(log.max_pfn());
    // Marked in descending order; reported ascending.
    for p in boundaries(log.max_pfn()).into_iter().rev() {
        assert_eq!(log.mark(p), model.mark(p), "mark {p:#x}");
    }
    for p in boundaries(log.max_pfn()) {
        assert_eq!(log.is_dirty(p), Ok(true), "pfn {p:#x}");
    }
    check_peek(log, &model);
}

fn out_of_range_changes_nothing<L: DirtyLog>(log: &L) {
    let max = log.max_pfn();
    let mut model = Model::new(max);
    assert_eq!(log.mark(3), model.mark(3));
    for bad in [max + 1, max.saturating_add(1 << 33), u64::MAX] {
        if bad <= max {
            continue;
        }
        let err = DirtyLogError::PfnOutOfRange {
            pfn: bad,
            max_pfn: max,
        };
        assert_eq!(log.mark(bad), Err(err));
        assert_eq!(log.is_dirty(bad), Err(err));
        assert_eq!(err.errno(), -22);
    }
    check_peek(log, &model);
}

fn peek_changes_nothing<L: DirtyLog>(log: &L) {
    let mut model = Model::new(log.max_pfn());
    for p in [5, 6, 700, log.max_pfn()] {
        assert_eq!(log.mark(p), model.mark(p));
    }
    let first = log.peek().expect("peek");
    let second = log.peek().expect("peek");
    assert_eq!(first, second);
    check_peek(log, &model);
}

fn clean_harvests_and_resets<L: DirtyLog>(log: &L) {
    let mut model = Model::new(log.max_pfn());
    for p in boundaries(log.max_pfn()) {
        log.mark(p).expect("mark");
        model.mark(p).expect("model");
    }
    log.mark(0).expect("mark");
    model.mark(0).expect("model");
    let (want, stats) = model.clean();
    let h = log.clean().expect("clean");
    assert_eq!(harvest_set(&h), want);
    assert_eq!(h.stats, stats);
    check_peek(log, &model);
    // Newly dirty again after CLEAN.
    assert_eq!(log.mark(0), Ok(true));
    model.mark(0).expect("model");
    check_peek(log, &model);
}

fn bitmap_forms<L: DirtyLog>(log: &L) {
    let max = log.max_pfn();
    let mut model = Model::new(max);
    for p in [0, 7, 8, 9, 63, 64, 1000, max] {
        assert_eq!(log.mark(p), model.mark(p));
    }
    let needed = log.bitmap_len();
    assert_eq!(needed as u64, max / 8 + 1);
    // Too small for CLEAN: refused, nothing cleared.
    let mut small = vec![0u8; 4];
    assert_eq!(
        log.clean_bitmap(&mut small),
        Err(DirtyLogError::BufferTooSmall { needed, got: 4 })
    );
    check_peek(log, &model);
    // A PEEK window shows only the pfns that fit.
    let mut window = vec![0xFFu8; 2];
    log.peek_bitmap(&mut window).expect("peek window");
    assert_eq!(window, model_bitmap(&model.sorted(), 2));
    if needed <= 1 << 20 {
        let mut out = vec![0x5Au8; needed];
        let (want, stats) = model.clean();
        assert_eq!(log.clean_bitmap(&mut out), Ok(stats));
        assert_eq!(out, model_bitmap(&want, needed));
        check_peek(log, &model);
    }
}

fn random_epochs<L: DirtyLog>(log: &L, max: u64) {
    let mut rng = Rng(max ^ 0xD1B5_4A32_D192_ED03);
    let mut model = Model::new(max);
    let span = max.min(1 << 22) + 1;
    for _ in 0..4 {
        for _ in 0..2000 {
            // Clustered pfns (repeats, runs) and spread ones.
            let p = if rng.below(2) == 0 {
                rng.below(span)
            } else {
                rng.below(max + 1)
            };
            assert_eq!(log.mark(p), model.mark(p));
        }
        let (want, stats) = model.clean();
        let h = log.clean().expect("clean");
        assert_eq!(harvest_set(&h), want);
        assert_eq!(h.ranges().collect::<Vec<_>>(), model_ranges(&want));
        assert_eq!(h.stats, stats);
    }
}

/// Pfns that exercise a tree leaf's list of new bits: leaf 1 gets exactly
/// as many new bits as its list holds, leaf 2 one more (the list
/// overflows), leaf 0 a word with two bits, each spread over the leaf.
/// Only the pfns at most `max`.
pub fn list_edges(max: u64) -> Vec<u64> {
    let cap = LEAF_LIST_CAP as u64;
    let mut v = vec![0, 1, 64 * 100 + 3];
    v.extend((0..cap).map(|i| 32768 + i * 541));
    v.extend((0..=cap).map(|i| 2 * 32768 + i * 523));
    v.retain(|&p| p <= max);
    v
}

/// Epochs harvested by the unordered CLEAN and the ordered one in turn,
/// with pfns marked again in the epoch after their harvest: every pfn must
/// be reported exactly once per epoch and be newly dirty again afterwards
/// (a harvested leaf's old bits must not survive), and PEEK and is_dirty
/// must agree with the model throughout.
fn unordered_epochs<L: DirtyLog>(log: &L, max: u64) {
    let mut rng = Rng(max ^ 0x0DDB_A11C_0FFE_E5ED);
    let mut model = Model::new(max);
    let edges = list_edges(max);
    let mut last: Vec<u64> = Vec::new();
    for epoch in 0..6 {
        // Last epoch's pfns again (newly dirty), the list edges, and some
        // random ones, clustered and spread.
        let mut pfns = last.clone();
        pfns.extend(&edges);
        pfns.extend((0..300).map(|i| {
            if i % 2 == 0 {
                rng.below(max.min(3 * 32768) + 1)
            } else {
                rng.below(max + 1)
            }
        }));
        for &p in &pfns {
            assert_eq!(log.mark(p), model.mark(p), "epoch {epoch}: mark {p:#x}");
        }
        check_peek(log, &model);
        let (want, stats) = model.clean();
        if epoch % 3 == 2 {
            let h = log.clean().expect("clean");
            assert_eq!(harvest_set(&h), want, "epoch {epoch}: ordered clean");
            assert_eq!(h.stats, stats);
        } else {
            let (words, got) = clean_unordered(log);
            assert_eq!(
                unordered_set(&words),
                want,
                "epoch {epoch}: unordered clean"
            );
            assert_eq!(got, stats);
        }
        for &p in want.iter().take(64) {
            assert_eq!(
                log.is_dirty(p),
                Ok(false),
                "epoch {epoch}: {p:#x} after clean"
            );
        }
        check_peek(log, &model);
        last = want.into_iter().collect();
    }
}
