//! The page batch shape shared by the writer, the reader and the XOR+LZ4
//! codec (xlz4): a page to send, the receiver's guest limits, and the
//! checks of a batch's count header and pfn words (PAGE_DATA and its
//! compressed variant alike). Here so that xlz4 needs neither end.

use zerocopy::FromBytes;

use super::error::{RecCtx, StreamError};
use super::format::{
    CountHeader, MAX_BATCH_PFNS, PAGE_TYPE_INVALID, PAGE_TYPE_NORMAL, PFN_MASK, PFN_RESERVED_MASK,
    PFN_TYPE_SHIFT,
};

/// A page to send: pfn and its contents (`None` = invalid pfn, no data).
#[derive(Clone, Copy, Debug)]
pub struct OutPage<'a> {
    pub pfn: u64,
    pub data: Option<&'a [u8]>,
}

/// What the receiver knows about the guest.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Guest size in pages: every pfn must be below it.
    pub guest_pages: u64,
}

impl Limits {
    /// No guest size known (pfn checked only against the 52-bit field).
    pub fn any() -> Self {
        Self {
            guest_pages: PFN_MASK + 1,
        }
    }
}

/// Validate the count header and pfn words shared by PAGE_DATA and the
/// compressed variant; returns (count, pfns that carry data).
pub(crate) fn validate_pfn_words(
    rec: RecCtx,
    body: &[u8],
    limits: Limits,
) -> Result<(usize, usize), StreamError> {
    let len = body.len() as u64;
    if body.len() < 8 {
        return Err(StreamError::BadLength {
            rec,
            length: len,
            expected: "at least 8".into(),
        });
    }
    let h = CountHeader::read_from_bytes(&body[..8]).expect("8 bytes");
    let count = h.count.get();
    if count == 0 || count > MAX_BATCH_PFNS {
        return Err(StreamError::BadCount {
            rec,
            count,
            max: MAX_BATCH_PFNS,
        });
    }
    if h.reserved.get() != 0 {
        return Err(StreamError::Reserved {
            rec,
            field: "reserved",
            value: h.reserved.get().into(),
        });
    }
    let words_end = 8 + 8 * count as usize;
    if body.len() < words_end {
        return Err(StreamError::BadLength {
            rec,
            length: len,
            expected: format!("at least {words_end} (8 + 8 * count {count})"),
        });
    }
    let mut pages = 0usize;
    for (i, w) in body[8..words_end].chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        let r = w & PFN_RESERVED_MASK;
        if r != 0 {
            return Err(StreamError::Reserved {
                rec,
                field: "pfn word bits 52-59",
                value: r,
            });
        }
        let ptype = (w >> PFN_TYPE_SHIFT) as u8;
        match ptype {
            PAGE_TYPE_NORMAL => pages += 1,
            PAGE_TYPE_INVALID => {}
            _ => {
                return Err(StreamError::PageType {
                    rec,
                    entry: i,
                    ptype,
                })
            }
        }
        let pfn = w & PFN_MASK;
        if pfn >= limits.guest_pages {
            return Err(StreamError::PfnOutOfRange {
                rec,
                entry: i,
                pfn,
                limit: limits.guest_pages,
            });
        }
    }
    Ok((count as usize, pages))
}
