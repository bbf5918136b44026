//! The log-dirty tree used by the hypervisor: two [`LogTree`] generations.
//!
//! Why two: clearing a word that markers may be updating needs one locked
//! read-modify-write (swap) per dirty word, and on current x86 parts that
//! swap costs about as much per word as a plain scan spends on 16-64 clean
//! words, so a swap-based CLEAN of a sparsely dirtied guest cannot get far
//! below a flat scan (see docs/perf/dirtylog.md). Instead, markers write
//! into the *current* generation, announced through a per-generation
//! in-flight counter. CLEAN flips the current generation, waits until no
//! marker is still inside the old one, and then harvests the old one with
//! plain loads and stores: no mark is lost (a racing mark lands in the old
//! generation before the flip completes, or in the new one, i.e. in the
//! next harvest), and each harvest's bits and counters match exactly.
//!
//! Cost: a mark adds two read-modify-writes on a shared counter (amortised
//! by [`MarkBatch`], which the PML drain of one vCPU can use for 512
//! entries), and memory for leaves is held twice.

use core::sync::atomic::{AtomicUsize, Ordering};

use super::tree::{LogTree, NodeCounts, Padded};
use super::{DirtyLog, DirtyLogError, DirtyStats, DirtyWord};

/// Double-buffered log-dirty tree: lock-free marks, exact and cheap CLEAN.
pub struct DirtyTree {
    gens: [LogTree; 2],
    /// Index (0/1) of the generation markers write into.
    current: Padded<AtomicUsize>,
    /// Markers inside each generation.
    inflight: [Padded<AtomicUsize>; 2],
    /// Serialises PEEK/CLEAN; a concurrent operation gets `Busy` (Xen
    /// returns -EBUSY).
    op: spin::Mutex<()>,
}

/// A marker's stay inside the current generation: marks through it pay no
/// per-mark counter updates. While a batch is alive, CLEAN waits for it, so
/// keep batches short (one PML drain) and never clean from the thread that
/// holds one.
pub struct MarkBatch<'a> {
    tree: &'a DirtyTree,
    gen: usize,
    faults: u64,
    dirty: u64,
}

impl DirtyTree {
    /// An empty log for pfns `0..=max_pfn` (at most [`super::TREE_MAX_PFN`]).
    pub fn new(max_pfn: u64) -> Result<Self, DirtyLogError> {
        Ok(DirtyTree {
            gens: [LogTree::new(max_pfn)?, LogTree::new(max_pfn)?],
            current: Padded(AtomicUsize::new(0)),
            inflight: [Padded(AtomicUsize::new(0)), Padded(AtomicUsize::new(0))],
            op: spin::Mutex::new(()),
        })
    }

    /// Highest pfn accepted.
    pub fn max_pfn(&self) -> u64 {
        self.gens[0].max_pfn()
    }

    /// Enters the current generation for a batch of marks.
    pub fn batch(&self) -> MarkBatch<'_> {
        loop {
            let gen = self.current.0.load(Ordering::SeqCst);
            self.inflight[gen].0.fetch_add(1, Ordering::SeqCst);
            // A CLEAN that flipped between our load and our increment may
            // already have seen zero markers; re-check and retry.
            if self.current.0.load(Ordering::SeqCst) == gen {
                return MarkBatch {
                    tree: self,
                    gen,
                    faults: 0,
                    dirty: 0,
                };
            }
            self.inflight[gen].0.fetch_sub(1, Ordering::Release);
        }
    }

    /// Marks one pfn; returns whether it was newly dirtied since the last
    /// CLEAN.
    pub fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        self.batch().mark(pfn)
    }

    /// Whether `pfn` is dirty in the current generation.
    pub fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        self.gens[self.current.0.load(Ordering::SeqCst)].is_dirty(pfn)
    }

    /// Counters of the current generation, unchanged.
    pub fn stats(&self) -> DirtyStats {
        self.gens[self.current.0.load(Ordering::SeqCst)].stats()
    }

    /// Nodes allocated over both generations.
    pub fn node_counts(&self) -> NodeCounts {
        let (a, b) = (self.gens[0].node_counts(), self.gens[1].node_counts());
        NodeCounts {
            interior: a.interior + b.interior,
            leaves: a.leaves + b.leaves,
        }
    }

    /// PEEK: visits the dirty words (ascending) and returns the counters;
    /// changes nothing. `Busy` if another PEEK/CLEAN is running.
    pub fn peek_with(&self, f: impl FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        let _op = self.op.try_lock().ok_or(DirtyLogError::Busy)?;
        Ok(self.gens[self.current.0.load(Ordering::SeqCst)].peek_with(f))
    }

    /// CLEAN: hands every word dirtied since the last CLEAN to `f`
    /// (ascending), clears them and returns the counters, zeroed for the
    /// next epoch. `Busy` if another PEEK/CLEAN is running.
    // Inlined (with `LogTree::clean_quiesced_with`) so a caller's closure
    // state stays in registers across the walk instead of being written
    // back per dirty word; see docs/perf/dirtylog.md.
    #[inline]
    pub fn clean_with(&self, f: impl FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        let _op = self.op.try_lock().ok_or(DirtyLogError::Busy)?;
        let old = self.flip();
        Ok(self.gens[old].clean_quiesced_with(f))
    }

    /// CLEAN for callers that need the set, not the order (Xen's CLEAN
    /// into a bitmap; the checkpoint): as [`DirtyTree::clean_with`], but
    /// only the leaves (32768 pfns each) come in ascending order. A
    /// sparsely dirtied leaf gives one word per pfn, in the order the pfns
    /// were first marked, so a word may come more than once, with disjoint
    /// bits; every dirty pfn comes exactly once. Such leaves are
    /// read from their lists of new bits and their bitmap words are
    /// cleared later, by the next mark in the leaf (the tree's module
    /// docs), which keeps this CLEAN's cost to the dirty pages themselves.
    #[inline]
    pub fn clean_unordered_with(
        &self,
        f: impl FnMut(DirtyWord),
    ) -> Result<DirtyStats, DirtyLogError> {
        let _op = self.op.try_lock().ok_or(DirtyLogError::Busy)?;
        let old = self.flip();
        Ok(self.gens[old].clean_listed_with(f))
    }

    /// Makes the other generation current and waits until no marker is
    /// inside the old one; returns the old one's index.
    #[inline]
    fn flip(&self) -> usize {
        let old = self.current.0.load(Ordering::SeqCst);
        self.current.0.store(old ^ 1, Ordering::SeqCst);
        // Store-then-load, both SeqCst, against the marker's increment-then-
        // load in `batch`: either we see its increment and wait for its
        // Release decrement, or it sees the flip and retries.
        while self.inflight[old].0.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
        old
    }

    /// Frees all nodes of both generations and zeroes the counters.
    pub fn reset(&mut self) {
        for g in &mut self.gens {
            g.reset();
        }
    }
}

impl MarkBatch<'_> {
    /// Marks one pfn; returns whether it was newly dirtied since the last
    /// CLEAN.
    pub fn mark(&mut self, pfn: u64) -> Result<bool, DirtyLogError> {
        let log = &self.tree.gens[self.gen];
        if pfn > log.max_pfn() {
            return Err(DirtyLogError::PfnOutOfRange {
                pfn,
                max_pfn: log.max_pfn(),
            });
        }
        let new = log.set_bit(pfn)?;
        self.faults += 1;
        self.dirty += u64::from(new);
        Ok(new)
    }
}

impl Drop for MarkBatch<'_> {
    fn drop(&mut self) {
        self.tree.gens[self.gen].add_counts(self.faults, self.dirty);
        self.tree.inflight[self.gen]
            .0
            .fetch_sub(1, Ordering::Release);
    }
}

impl DirtyLog for DirtyTree {
    fn max_pfn(&self) -> u64 {
        DirtyTree::max_pfn(self)
    }

    fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        DirtyTree::mark(self, pfn)
    }

    fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        DirtyTree::is_dirty(self, pfn)
    }

    fn stats(&self) -> DirtyStats {
        DirtyTree::stats(self)
    }

    fn peek_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        self.peek_with(f)
    }

    fn clean_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        self.clean_with(f)
    }

    fn clean_words_unordered(
        &self,
        f: &mut dyn FnMut(DirtyWord),
    ) -> Result<DirtyStats, DirtyLogError> {
        self.clean_unordered_with(f)
    }
}
