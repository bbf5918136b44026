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

/// One guest page buffer. Pages move between the reader, the staged epoch
/// and the replica by pointer, so an epoch commits without copying pages.
pub type PageBuf = Box<[u8; PAGE_SIZE]>;

/// A zeroed page buffer.
pub fn zero_page() -> PageBuf {
    vec![0u8; PAGE_SIZE]
        .into_boxed_slice()
        .try_into()
        .expect("exactly one page")
}

/// A validated PAGE_DATA record: the count header and pfn words as
/// received, and one buffer per pfn that carries data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageData {
    head: Vec<u8>,
    pages: Vec<PageBuf>,
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
    /// Assemble a record the reader has validated: `head` = count header
    /// and `count` pfn words, `pages` = one buffer per data pfn.
    pub(crate) fn from_parts(head: Vec<u8>, pages: Vec<PageBuf>, count: usize) -> Self {
        debug_assert_eq!(head.len(), 8 + 8 * count);
        Self { head, pages, count }
    }

    /// Number of pfns.
    pub fn count(&self) -> usize {
        self.count
    }

    fn word(&self, i: usize) -> (u64, bool) {
        let at = 8 + 8 * i;
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.head[at..at + 8]);
        let w = u64::from_le_bytes(w);
        (
            w & PFN_MASK,
            (w >> PFN_TYPE_SHIFT) as u8 != PAGE_TYPE_INVALID,
        )
    }

    /// Entries in record order.
    pub fn entries(&self) -> impl Iterator<Item = PageEntry<'_>> + '_ {
        let mut next = 0;
        (0..self.count).map(move |i| {
            let (pfn, has_data) = self.word(i);
            if has_data {
                let d = &self.pages[next][..];
                next += 1;
                PageEntry { pfn, data: Some(d) }
            } else {
                PageEntry { pfn, data: None }
            }
        })
    }

    /// Entries in record order, taking the page buffers.
    pub fn into_entries(self) -> impl Iterator<Item = (u64, Option<PageBuf>)> {
        let words: Vec<(u64, bool)> = (0..self.count).map(|i| self.word(i)).collect();
        let mut pages = self.pages.into_iter();
        words
            .into_iter()
            .map(move |(pfn, d)| (pfn, if d { pages.next() } else { None }))
    }

    /// The page buffers (for reuse).
    pub fn into_pages(self) -> Vec<PageBuf> {
        self.pages
    }

    /// Number of entries that carry data.
    pub fn data_pages(&self) -> usize {
        self.pages.len()
    }

    /// Body size in bytes (as on the wire, without header and padding).
    pub fn body_len(&self) -> usize {
        self.head.len() + self.pages.len() * PAGE_SIZE
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
    /// DOPPEL_HELLO: the feature bits the primary asks for (only as the
    /// first record; the backup answers on the back channel).
    Hello(u64),
    /// DOPPEL_SESSION: the primary's echo of the backup's session nonce
    /// (only as the first record).
    Session([u8; super::format::SESSION_NONCE_LEN]),
    /// DOPPEL_DEVICE_STATE: the device model's sealed state at the epoch's
    /// end (opaque here; 1..=MAX_DEVICE_STATE bytes, at most one per epoch).
    DeviceState(Vec<u8>),
    /// DOPPEL_DISK_WRITES: disk writes of the epoch, in order (checked:
    /// whole sectors, non-empty, no overflow).
    DiskWrites(Vec<super::devices::DiskWrite>),
}
