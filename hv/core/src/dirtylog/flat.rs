//! Flat atomic bitmap: the simple reference implementation (and the bench
//! baseline). Memory and CLEAN cost follow the guest size.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{DirtyLog, DirtyLogError, DirtyStats, DirtyWord};

/// One bit per pfn in `0..=max_pfn`, allocated up front.
pub struct FlatLog {
    words: Vec<AtomicU64>,
    max_pfn: u64,
    dirty: AtomicU64,
    faults: AtomicU64,
}

impl FlatLog {
    /// A zeroed bitmap for pfns `0..=max_pfn`; `NoMemory` if it cannot be
    /// allocated.
    pub fn new(max_pfn: u64) -> Result<Self, DirtyLogError> {
        let nwords = usize::try_from(max_pfn / 64 + 1).map_err(|_| DirtyLogError::NoMemory)?;
        let mut words = Vec::new();
        words
            .try_reserve_exact(nwords)
            .map_err(|_| DirtyLogError::NoMemory)?;
        words.extend((0..nwords).map(|_| AtomicU64::new(0)));
        Ok(FlatLog {
            words,
            max_pfn,
            dirty: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        })
    }

    fn word(&self, pfn: u64) -> Result<(&AtomicU64, u64), DirtyLogError> {
        if pfn > self.max_pfn {
            return Err(DirtyLogError::PfnOutOfRange {
                pfn,
                max_pfn: self.max_pfn,
            });
        }
        // In range: pfn / 64 < words.len(), which fits usize.
        let w = &self.words[(pfn / 64) as usize];
        Ok((w, 1 << (pfn % 64)))
    }

    /// CLEAN: scans every word; swaps out the non-zero ones.
    pub fn clean_with(&self, mut f: impl FnMut(DirtyWord)) -> DirtyStats {
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) != 0 {
                let bits = w.swap(0, Ordering::SeqCst);
                f(DirtyWord {
                    base: i as u64 * 64,
                    bits,
                });
            }
        }
        DirtyStats {
            dirty_count: self.dirty.swap(0, Ordering::Relaxed),
            fault_count: self.faults.swap(0, Ordering::Relaxed),
        }
    }

    /// PEEK: scans every word.
    pub fn peek_with(&self, mut f: impl FnMut(DirtyWord)) -> DirtyStats {
        for (i, w) in self.words.iter().enumerate() {
            let bits = w.load(Ordering::SeqCst);
            if bits != 0 {
                f(DirtyWord {
                    base: i as u64 * 64,
                    bits,
                });
            }
        }
        self.stats()
    }

    fn stats(&self) -> DirtyStats {
        DirtyStats {
            dirty_count: self.dirty.load(Ordering::Relaxed),
            fault_count: self.faults.load(Ordering::Relaxed),
        }
    }
}

impl DirtyLog for FlatLog {
    fn max_pfn(&self) -> u64 {
        self.max_pfn
    }

    fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        let (w, mask) = self.word(pfn)?;
        let new = w.fetch_or(mask, Ordering::SeqCst) & mask == 0;
        self.faults.fetch_add(1, Ordering::Relaxed);
        if new {
            self.dirty.fetch_add(1, Ordering::Relaxed);
        }
        Ok(new)
    }

    fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        let (w, mask) = self.word(pfn)?;
        Ok(w.load(Ordering::SeqCst) & mask != 0)
    }

    fn stats(&self) -> DirtyStats {
        FlatLog::stats(self)
    }

    fn peek_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        Ok(self.peek_with(f))
    }

    fn clean_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        Ok(self.clean_with(f))
    }
}
