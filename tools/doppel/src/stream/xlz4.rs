//! Optional page compression (Doppel extension, record type 0x80d00002):
//! each page is XORed with the last version of the same pfn sent on this
//! connection (zero if none), and the batch of XORed pages is one lz4 block.
//!
//! Body: count u32, reserved u32, count pfn words (as PAGE_DATA), raw_len
//! u32 (= 4096 * data pages), comp_len u32 (= bytes that follow), lz4 block.
//!
//! Both ends keep an `XorCache` per connection (a guest-sized copy of the
//! last version sent/received); a new connection starts both at zero, so a
//! broken stream never leaves them out of step. Off by default and never
//! used for captures: Xen's verifier refuses unknown types.

use super::error::{RecCtx, StreamError};
use super::format::{PAGE_SIZE, PAGE_TYPE_INVALID, PFN_MASK, PFN_TYPE_SHIFT};
use super::pages::{validate_pfn_words, Limits, OutPage};
use super::records::{zero_page, PageData};

/// Last version of every page sent (or received) on one connection.
/// Anonymous memory: its pages are zero until written, so a large guest's
/// cache costs only the pages the connection has carried, and a cache the
/// host cannot provide is an error, not an abort.
pub struct XorCache {
    last: memmap2::MmapMut,
}

impl XorCache {
    /// Guest size in pages.
    pub fn pages(&self) -> u64 {
        (self.last.len() / PAGE_SIZE) as u64
    }

    /// A zeroed cache for a guest of `guest_pages` pages; an error if the
    /// host cannot map that much memory.
    pub fn new(guest_pages: u64) -> std::io::Result<Self> {
        let len = usize::try_from(guest_pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("no compression cache for a guest of {guest_pages} pages"),
                )
            })?;
        let last = memmap2::MmapMut::map_anon(len).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot map the compression cache ({guest_pages} pages, {} MiB): {e}",
                    len >> 20
                ),
            )
        })?;
        Ok(Self { last })
    }

    fn page(&mut self, pfn: u64) -> Option<&mut [u8]> {
        let at = usize::try_from(pfn).ok()?.checked_mul(PAGE_SIZE)?;
        self.last.get_mut(at..at + PAGE_SIZE)
    }

    /// Encode one batch (<= 1024 pages) as a record body; updates the cache.
    pub fn encode(&mut self, batch: &[OutPage<'_>]) -> Result<Vec<u8>, String> {
        let mut body = Vec::with_capacity(16 + 8 * batch.len());
        body.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        let mut raw = Vec::with_capacity(batch.len() * PAGE_SIZE);
        for p in batch {
            let ptype = if p.data.is_some() {
                0
            } else {
                PAGE_TYPE_INVALID
            };
            let w = p.pfn | (u64::from(ptype) << PFN_TYPE_SHIFT);
            if p.pfn > PFN_MASK {
                return Err(format!("pfn {:#x} does not fit 52 bits", p.pfn));
            }
            body.extend_from_slice(&w.to_le_bytes());
            let last = self
                .page(p.pfn)
                .ok_or_else(|| format!("pfn {:#x} beyond the cache", p.pfn))?;
            match p.data {
                Some(d) if d.len() == PAGE_SIZE => {
                    raw.extend(d.iter().zip(last.iter()).map(|(a, b)| a ^ b));
                    last.copy_from_slice(d);
                }
                Some(d) => return Err(format!("page of {} bytes", d.len())),
                None => last.fill(0),
            }
        }
        let block = lz4_flex::block::compress(&raw);
        body.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        body.extend_from_slice(&(block.len() as u32).to_le_bytes());
        body.extend_from_slice(&block);
        Ok(body)
    }

    /// Validate and decode a received body into plain PAGE_DATA, updating
    /// the cache. (A bad record ends the connection, and its cache with it.)
    pub fn decode(
        &mut self,
        rec: RecCtx,
        body: &[u8],
        limits: Limits,
    ) -> Result<PageData, StreamError> {
        let bad = |msg: String| StreamError::BadCompressed { rec, msg };
        let (count, pages) = validate_pfn_words(rec, body, limits)?;
        let words_end = 8 + 8 * count;
        let Some(tail) = body.get(words_end..words_end + 8) else {
            return Err(StreamError::BadLength {
                rec,
                length: body.len() as u64,
                expected: format!("at least {}", words_end + 8),
            });
        };
        let raw_len = u32::from_le_bytes(tail[..4].try_into().expect("4")) as usize;
        let comp_len = u32::from_le_bytes(tail[4..].try_into().expect("4")) as usize;
        if raw_len != pages * PAGE_SIZE {
            return Err(bad(format!(
                "raw_len {raw_len}, expected 4096 * {pages} data pages"
            )));
        }
        let block = &body[words_end + 8..];
        if block.len() != comp_len {
            return Err(StreamError::BadLength {
                rec,
                length: body.len() as u64,
                expected: format!("{} (comp_len {comp_len})", words_end + 8 + comp_len),
            });
        }
        let mut raw = vec![0u8; raw_len];
        let n =
            lz4_flex::block::decompress_into(block, &mut raw).map_err(|e| bad(e.to_string()))?;
        if n != raw_len {
            return Err(bad(format!(
                "block decodes to {n} bytes, expected {raw_len}"
            )));
        }
        if limits.guest_pages > self.pages() {
            return Err(bad("guest larger than the connection cache".into()));
        }
        // Undo the XOR and update the cache (pfns were range checked).
        let head = body[..words_end].to_vec();
        let mut pages = Vec::with_capacity(raw_len / PAGE_SIZE);
        let mut chunks = raw.chunks_exact(PAGE_SIZE);
        for w in head[8..].chunks_exact(8) {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            let last = self
                .page(w & PFN_MASK)
                .ok_or_else(|| bad("pfn beyond the connection cache".into()))?;
            if (w >> PFN_TYPE_SHIFT) as u8 == PAGE_TYPE_INVALID {
                last.fill(0);
                continue;
            }
            let x = chunks.next().expect("raw_len = 4096 * data pages");
            for (l, b) in last.iter_mut().zip(x) {
                *l ^= b;
            }
            let mut p = zero_page();
            p.copy_from_slice(last);
            pages.push(p);
        }
        Ok(PageData::from_parts(head, pages, count))
    }
}
