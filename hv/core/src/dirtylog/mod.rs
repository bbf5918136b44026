//! Log-dirty tracking: which guest frames were written since the last
//! CLEAN (Xen's `XEN_DOMCTL_shadow_op` PEEK/CLEAN semantics).
//!
//! - [`DirtyLog`] is the interface every implementation offers; one
//!   conformance suite (hv/core/tests/common) runs against each.
//! - [`DirtyTree`]: the one to use. Xen-shaped lazily allocated 4-level
//!   tree, lock-free marks, CLEAN cost following the dirtied words.
//! - [`LogTree`]: one generation of that tree, with a swap-per-word CLEAN
//!   that is safe while marks run (simpler, slower CLEAN).
//! - [`FlatLog`]: flat atomic bitmap, the reference and bench baseline.
//! - [`NoopLog`]: records nothing (log-dirty mode off).
//!
//! Dirty state is exchanged as [`DirtyWord`]s: 64 pfns starting at a
//! multiple of 64, bit `i` = pfn `base + i`. [`DirtyPfns`] and
//! [`DirtyRanges`] turn ascending words into pfns or `(start, len)` runs.
//! The flat bitmap layout (`peek_bitmap`/`clean_bitmap`) is Xen's: pfn `p`
//! is byte `p >> 3`, bit `p & 7`.

mod epoch;
mod flat;
mod tree;

use alloc::vec::Vec;
use core::fmt;

pub use epoch::{DirtyTree, MarkBatch};
pub use flat::FlatLog;
pub use tree::{LogTree, NodeCounts, LEAF_LIST_CAP, TREE_MAX_PFN};

/// Xen's log-dirty statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyStats {
    /// Pages newly marked dirty since the last CLEAN.
    pub dirty_count: u64,
    /// All marks since the last CLEAN (tracking faults / PML entries).
    pub fault_count: u64,
}

/// 64 consecutive pfns: bit `i` of `bits` is pfn `base + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyWord {
    /// First pfn; a multiple of 64.
    pub base: u64,
    /// Dirty bits.
    pub bits: u64,
}

/// A run of dirty pfns `start .. start + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyRange {
    /// First pfn.
    pub start: u64,
    /// Number of pfns (at least 1).
    pub len: u64,
}

/// Why a log operation failed. Nothing is changed when one is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogError {
    /// The pfn is beyond the log's configured maximum.
    PfnOutOfRange {
        /// Offending pfn.
        pfn: u64,
        /// Highest accepted pfn.
        max_pfn: u64,
    },
    /// The requested maximum pfn exceeds what the implementation supports.
    MaxPfnTooLarge {
        /// Requested maximum.
        max_pfn: u64,
        /// Supported maximum.
        limit: u64,
    },
    /// A node or bitmap could not be allocated.
    NoMemory,
    /// Another PEEK/CLEAN is running (Xen: -EBUSY).
    Busy,
    /// The caller's bitmap cannot hold every pfn of the log.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
}

impl DirtyLogError {
    /// Negative errno for the hypercall ABI (Xen's choices: EINVAL for bad
    /// arguments, ENOMEM, EBUSY).
    pub fn errno(&self) -> i32 {
        const EINVAL: i32 = 22;
        const ENOMEM: i32 = 12;
        const EBUSY: i32 = 16;
        match self {
            DirtyLogError::NoMemory => -ENOMEM,
            DirtyLogError::Busy => -EBUSY,
            DirtyLogError::PfnOutOfRange { .. }
            | DirtyLogError::MaxPfnTooLarge { .. }
            | DirtyLogError::BufferTooSmall { .. } => -EINVAL,
        }
    }
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogError::PfnOutOfRange { pfn, max_pfn } => {
                write!(f, "pfn {pfn:#x} beyond max pfn {max_pfn:#x}")
            }
            DirtyLogError::MaxPfnTooLarge { max_pfn, limit } => {
                write!(f, "max pfn {max_pfn:#x} beyond supported {limit:#x}")
            }
            DirtyLogError::NoMemory => write!(f, "out of memory for the dirty log"),
            DirtyLogError::Busy => write!(f, "another log-dirty operation is running"),
            DirtyLogError::BufferTooSmall { needed, got } => {
                write!(f, "dirty bitmap needs {needed} bytes, got {got}")
            }
        }
    }
}

impl core::error::Error for DirtyLogError {}

/// Bytes of a flat bitmap covering pfns `0..=max_pfn` (saturating).
pub fn bitmap_bytes(max_pfn: u64) -> usize {
    let bytes = (u128::from(max_pfn) + 8) / 8;
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// ORs `word` into a flat Xen-layout bitmap; bits past its end are dropped.
pub fn or_word_into(out: &mut [u8], word: DirtyWord) {
    let Ok(start) = usize::try_from(word.base / 8) else {
        return;
    };
    if start >= out.len() {
        return;
    }
    // A word's 8 bytes start at a multiple of 8: one 64-bit OR, except for
    // a word cut off by the end of the bitmap.
    if let Some(chunk) = out
        .get_mut(start..start.saturating_add(8))
        .and_then(|c| <&mut [u8; 8]>::try_from(c).ok())
    {
        *chunk = (u64::from_le_bytes(*chunk) | word.bits).to_le_bytes();
        return;
    }
    for (o, b) in out[start..].iter_mut().zip(word.bits.to_le_bytes()) {
        *o |= b;
    }
}

/// A dirty log (rust-vmm's bitmap pattern: one interface, a no-op
/// implementation, one conformance suite).
///
/// `mark` may run on several vCPUs at once. PEEK/CLEAN take `&self` too;
/// an implementation may refuse one that overlaps another with `Busy`.
/// Every failing call leaves the log unchanged.
pub trait DirtyLog: Sync {
    /// Highest pfn accepted.
    fn max_pfn(&self) -> u64;

    /// Marks `pfn` dirty (a tracking fault). Returns whether it was newly
    /// dirtied since the last CLEAN. Counts a fault always and a dirty page
    /// when new. `PfnOutOfRange` beyond [`DirtyLog::max_pfn`].
    fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError>;

    /// Whether `pfn` is dirty now.
    fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError>;

    /// Counters since the last CLEAN, unchanged.
    fn stats(&self) -> DirtyStats;

    /// PEEK: calls `f` for every non-zero dirty word in ascending order and
    /// returns the counters; changes nothing.
    fn peek_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError>;

    /// CLEAN: calls `f` for every non-zero dirty word in ascending order,
    /// clearing each as it is read, and returns the counters, which restart
    /// at zero. A mark racing with CLEAN is never lost: it is reported by
    /// this CLEAN or the next.
    fn clean_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError>;

    /// CLEAN for callers that need the set of dirty pfns, not an order (a
    /// bitmap, a checkpoint): as [`DirtyLog::clean_words`], but words may
    /// come in any order and the same word may come more than once, with
    /// disjoint bits. Every dirty pfn is reported exactly once. By default
    /// the ordered CLEAN; [`DirtyTree`] harvests faster this way.
    fn clean_words_unordered(
        &self,
        f: &mut dyn FnMut(DirtyWord),
    ) -> Result<DirtyStats, DirtyLogError> {
        self.clean_words(f)
    }

    /// Bytes of a flat bitmap covering the whole log.
    fn bitmap_len(&self) -> usize {
        bitmap_bytes(self.max_pfn())
    }

    /// PEEK into a flat Xen-layout bitmap. `out` may be shorter than
    /// [`DirtyLog::bitmap_len`]: it then shows pfns `0..out.len() * 8`.
    /// `out` is overwritten entirely.
    fn peek_bitmap(&self, out: &mut [u8]) -> Result<DirtyStats, DirtyLogError> {
        out.fill(0);
        self.peek_words(&mut |w| or_word_into(out, w))
    }

    /// CLEAN into a flat Xen-layout bitmap, which must hold every pfn
    /// (`BufferTooSmall` otherwise, with nothing cleared).
    fn clean_bitmap(&self, out: &mut [u8]) -> Result<DirtyStats, DirtyLogError> {
        let needed = self.bitmap_len();
        if out.len() < needed {
            return Err(DirtyLogError::BufferTooSmall {
                needed,
                got: out.len(),
            });
        }
        out.fill(0);
        self.clean_words_unordered(&mut |w| or_word_into(out, w))
    }

    /// PEEK into a sparse list of words.
    fn peek(&self) -> Result<Harvest, DirtyLogError> {
        let mut words = Vec::new();
        let stats = self.peek_words(&mut |w| words.push(w))?;
        Ok(Harvest { words, stats })
    }

    /// CLEAN into a sparse list of words.
    fn clean(&self) -> Result<Harvest, DirtyLogError> {
        let mut words = Vec::new();
        let stats = self.clean_words(&mut |w| words.push(w))?;
        Ok(Harvest { words, stats })
    }
}

/// The result of a PEEK or CLEAN as a sparse, ascending list of words.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Harvest {
    /// Non-zero words, ascending by base.
    pub words: Vec<DirtyWord>,
    /// Counters at the time of the operation.
    pub stats: DirtyStats,
}

impl Harvest {
    /// Dirty pfns, ascending.
    pub fn pfns(&self) -> DirtyPfns<core::iter::Copied<core::slice::Iter<'_, DirtyWord>>> {
        DirtyPfns::new(self.words.iter().copied())
    }

    /// Maximal runs of dirty pfns, ascending.
    pub fn ranges(&self) -> DirtyRanges<core::iter::Copied<core::slice::Iter<'_, DirtyWord>>> {
        DirtyRanges::new(self.words.iter().copied())
    }

    /// Number of dirty pfns.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.bits.count_ones()))
            .sum()
    }
}

/// Log that records nothing: log-dirty mode off. Accepts pfns up to its
/// maximum, never reports a dirty page.
#[derive(Clone, Copy, Debug)]
pub struct NoopLog {
    max_pfn: u64,
}

impl NoopLog {
    /// A no-op log accepting pfns `0..=max_pfn`.
    pub const fn new(max_pfn: u64) -> Self {
        NoopLog { max_pfn }
    }

    fn check(&self, pfn: u64) -> Result<(), DirtyLogError> {
        if pfn > self.max_pfn {
            return Err(DirtyLogError::PfnOutOfRange {
                pfn,
                max_pfn: self.max_pfn,
            });
        }
        Ok(())
    }
}

impl DirtyLog for NoopLog {
    fn max_pfn(&self) -> u64 {
        self.max_pfn
    }

    fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        self.check(pfn).map(|()| false)
    }

    fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        self.check(pfn).map(|()| false)
    }

    fn stats(&self) -> DirtyStats {
        DirtyStats::default()
    }

    fn peek_words(&self, _f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        Ok(DirtyStats::default())
    }

    fn clean_words(&self, _f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        Ok(DirtyStats::default())
    }
}

/// Iterator over the pfns of ascending [`DirtyWord`]s.
pub struct DirtyPfns<I> {
    words: I,
    base: u64,
    bits: u64,
}

impl<I: Iterator<Item = DirtyWord>> DirtyPfns<I> {
    /// Wraps an iterator of words.
    pub fn new(words: I) -> Self {
        DirtyPfns {
            words,
            base: 0,
            bits: 0,
        }
    }
}

impl<I: Iterator<Item = DirtyWord>> Iterator for DirtyPfns<I> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.bits == 0 {
            let w = self.words.next()?;
            self.base = w.base;
            self.bits = w.bits;
        }
        let i = self.bits.trailing_zeros();
        self.bits &= self.bits - 1;
        Some(self.base + u64::from(i))
    }
}

/// Iterator over maximal `(start, len)` runs of ascending [`DirtyWord`]s;
/// runs continue across word boundaries (cloud-hypervisor's dirty-bitmap
/// to range table conversion).
pub struct DirtyRanges<I> {
    words: I,
    base: u64,
    bits: u64,
    pending: Option<DirtyRange>,
}

impl<I: Iterator<Item = DirtyWord>> DirtyRanges<I> {
    /// Wraps an iterator of words.
    pub fn new(words: I) -> Self {
        DirtyRanges {
            words,
            base: 0,
            bits: 0,
            pending: None,
        }
    }
}

impl<I: Iterator<Item = DirtyWord>> Iterator for DirtyRanges<I> {
    type Item = DirtyRange;

    fn next(&mut self) -> Option<DirtyRange> {
        loop {
            if self.bits == 0 {
                match self.words.next() {
                    Some(w) => {
                        self.base = w.base;
                        self.bits = w.bits;
                        continue;
                    }
                    None => return self.pending.take(),
                }
            }
            let skip = self.bits.trailing_zeros();
            let run = (!(self.bits >> skip)).trailing_zeros();
            self.bits = if skip + run >= 64 {
                0
            } else {
                self.bits & !((1u64 << (skip + run)) - 1)
            };
            let start = self.base + u64::from(skip);
            let len = u64::from(run);
            match &mut self.pending {
                Some(r) if r.start + r.len == start => r.len += len,
                pending => {
                    if let Some(done) = pending.replace(DirtyRange { start, len }) {
                        return Some(done);
                    }
                }
            }
        }
    }
}
