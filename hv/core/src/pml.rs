//! Draining Intel's page-modification log (SDM Vol. 3C, "Page-Modification
//! Logging") into a dirty log.
//!
//! The log is a 4 KiB page of 512 guest-physical addresses. The 16-bit PML
//! index in the VMCS starts at 511; when the processor sets an EPT dirty
//! flag it writes the 4 KiB-aligned gpa at entry `index` and decrements the
//! index, which wraps from 0 to 0xFFFF when the page is full (a later write
//! then causes a "log full" VM exit). So the valid entries are
//! `index + 1 ..= 511`: none at 511, all 512 at 0xFFFF. Any other value
//! above 511 cannot come from the processor and is rejected.

use crate::dirtylog::{DirtyLog, DirtyLogError};

/// Entries in the PML page.
pub const PML_ENTRIES: usize = 512;
/// Index of an empty log; write it back to the VMCS after a drain.
pub const PML_INDEX_EMPTY: u16 = 511;
/// Index after the last entry (entry 0) was written: the log is full.
pub const PML_INDEX_FULL: u16 = 0xFFFF;

const _: () = assert!(core::mem::size_of::<[u64; PML_ENTRIES]>() == 4096);

/// What one drain did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Valid entries found in the buffer.
    pub entries: usize,
    /// Entries whose page was newly dirtied in the log.
    pub newly_dirty: usize,
    /// Entries whose pfn is beyond the log's maximum (not logged).
    pub out_of_range: usize,
    /// Highest offending pfn among `out_of_range` entries.
    pub worst_pfn: Option<u64>,
    /// PML index to write back to the VMCS ([`PML_INDEX_EMPTY`]).
    pub next_index: u16,
}

/// Why a drain failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmlError {
    /// The index is above 511 and not 0xFFFF; nothing was drained.
    BadIndex(u16),
    /// The dirty log failed (out of memory for a node). Entries before
    /// the failed one were logged; write `resume_index` back to the VMCS so
    /// that exactly the unlogged entries remain valid, and retry later.
    Log {
        /// The log's error.
        error: DirtyLogError,
        /// PML index that keeps the not yet logged entries.
        resume_index: u16,
    },
}

impl core::fmt::Display for PmlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PmlError::BadIndex(i) => write!(f, "PML index {i:#x} is neither 0..=511 nor 0xffff"),
            PmlError::Log {
                error,
                resume_index,
            } => write!(f, "{error}; resume PML at index {resume_index}"),
        }
    }
}

impl core::error::Error for PmlError {}

/// Entry slots holding logged addresses for a given PML index.
pub fn valid_entries(index: u16) -> Result<core::ops::Range<usize>, PmlError> {
    match index {
        PML_INDEX_FULL => Ok(0..PML_ENTRIES),
        i if usize::from(i) < PML_ENTRIES => Ok(usize::from(i) + 1..PML_ENTRIES),
        i => Err(PmlError::BadIndex(i)),
    }
}

/// Feeds every valid entry's pfn (`gpa >> 12`, low 12 bits ignored) into
/// `log`. Pfns beyond the log's maximum are counted in the result, not
/// logged.
pub fn drain<L: DirtyLog + ?Sized>(
    buffer: &[u64; PML_ENTRIES],
    index: u16,
    log: &L,
) -> Result<DrainStats, PmlError> {
    let slots = valid_entries(index)?;
    let mut stats = DrainStats {
        entries: slots.len(),
        next_index: PML_INDEX_EMPTY,
        ..DrainStats::default()
    };
    // Lowest slot first: on failure at slot `i`, slots `i..=511` are the
    // unlogged ones and index `i - 1` (wrapping to 0xFFFF) keeps them.
    for i in slots {
        let pfn = buffer[i] >> 12;
        match log.mark(pfn) {
            Ok(new) => stats.newly_dirty += usize::from(new),
            Err(DirtyLogError::PfnOutOfRange { .. }) => {
                stats.out_of_range += 1;
                stats.worst_pfn = stats.worst_pfn.max(Some(pfn));
            }
            Err(error) => {
                return Err(PmlError::Log {
                    error,
                    // i <= 511, so it fits; slot 0 gives 0xFFFF (full).
                    resume_index: (i as u16).wrapping_sub(1),
                });
            }
        }
    }
    Ok(stats)
}
