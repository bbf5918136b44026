//! Decoded records: owned, already validated values.

use super::format::{PAGE_SIZE, PAGE_TYPE_INVALID, PFN_MASK, PFN_TYPE_SHIFT};

/// X86_TSC_INFO contents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TscInfo {
    pub mode: u32,
    pub khz: u32,
    pub nsec: u64,
    pub incarnation: u32,
}

/// One HVM parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HvmParam {
    pub index: u64,
    pub value: u64,
}

/// A validated PAGE_DATA record. The body is kept as received (no copy of
/// the pages): `count` pfn words at byte 8, then the data pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageData {
    body: Vec<u8>,
    count: usize,
}

/// One entry of a PAGE_DATA record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry<'a> {
    pub pfn: u64,
    /// Page contents; `None` for an invalid (type 0xF) pfn.
    pub data: Option<&'a [u8]>,
}

impl PageData {
    /// Wrap a body that the reader has validated.
    pub(crate) fn from_validated(body: Vec<u8>, count: usize) -> Self {
        Self { body, count }
    }

    /// Number of pfns.
    pub fn count(&self) -> usize {
        self.count
    }

    fn word(&self, i: usize) -> u64 {
        let at = 8 + 8 * i;
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.body[at..at + 8]);
        u64::from_le_bytes(w)
    }

    /// Entries in record order.
    pub fn entries(&self) -> impl Iterator<Item = PageEntry<'_>> + '_ {
        let mut data_at = 8 + 8 * self.count;
        (0..self.count).map(move |i| {
            let w = self.word(i);
            let pfn = w & PFN_MASK;
            if (w >> PFN_TYPE_SHIFT) as u8 == PAGE_TYPE_INVALID {
                PageEntry { pfn, data: None }
            } else {
                let d = &self.body[data_at..data_at + PAGE_SIZE];
                data_at += PAGE_SIZE;
                PageEntry { pfn, data: Some(d) }
            }
        })
    }

    /// Number of entries that carry data.
    pub fn data_pages(&self) -> usize {
        (self.body.len() - 8 - 8 * self.count) / PAGE_SIZE
    }

    /// The raw body (for buffer reuse).
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// Body size in bytes (as on the wire, without header and padding).
    pub fn body_len(&self) -> usize {
        self.body.len()
    }
}

/// A decoded libxc record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    End,
    PageData(PageData),
    TscInfo(TscInfo),
    /// The HVM context blob, opaque at this layer (never empty).
    HvmContext(Vec<u8>),
    HvmParams(Vec<HvmParam>),
    Checkpoint,
    StaticDataEnd,
    /// xen_cpuid_leaf_t array (static data, opaque here).
    CpuidPolicy(Vec<u8>),
    /// xen_msr_entry_t array (static data, opaque here).
    MsrPolicy(Vec<u8>),
}
