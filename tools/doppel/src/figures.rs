//! Bytes on the wire per dirty page for the test guest's write patterns,
//! plain PAGE_DATA against the compressed record (`examples/wire_bytes.rs`,
//! docs/perf/stream.md).
//!
//! A guest of `guest_bytes` starts as zeros; epoch 0 sends every page (it
//! primes the connection's XOR cache, as on a real connection, and is not
//! counted). Then each pattern epoch applies exactly the guest's writes
//! (`doppel_core::workload::for_each_write`, value `workload::value`, a
//! little-endian u64 at (WORK_GPA + page * 4096 + offset)) and sends the
//! distinct pages it touched, in pfn order, through the real encoder.

use std::collections::BTreeSet;

use doppel_abi::guest::{PatternId, WORK_GPA};
use doppel_core::workload;

use crate::stream::{OutPage, StreamWriter, XorCache, PAGE_SIZE};

/// Totals over the measured epochs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireFigures {
    pub epochs: u64,
    /// Distinct pages sent (sum over epochs).
    pub dirty_pages: u64,
    /// Page contents: 4096 x dirty pages.
    pub raw: u64,
    /// PAGE_DATA records' bytes (headers, pfn words, pages).
    pub plain: u64,
    /// DOPPEL_PAGE_DATA_XLZ4 records' bytes (headers, pfn words, lengths,
    /// lz4 block, padding).
    pub xlz4: u64,
}

impl WireFigures {
    pub fn plain_per_page(&self) -> f64 {
        self.plain as f64 / self.dirty_pages.max(1) as f64
    }
    pub fn xlz4_per_page(&self) -> f64 {
        self.xlz4 as f64 / self.dirty_pages.max(1) as f64
    }
}

fn send(
    plain: &mut StreamWriter<std::io::Sink>,
    comp: &mut StreamWriter<std::io::Sink>,
    cache: &mut XorCache,
    mem: &[u8],
    pfns: &BTreeSet<u64>,
) -> std::io::Result<(u64, u64)> {
    let batch: Vec<OutPage<'_>> = pfns
        .iter()
        .map(|&pfn| OutPage {
            pfn,
            data: Some(&mem[pfn as usize * PAGE_SIZE..][..PAGE_SIZE]),
        })
        .collect();
    let (p0, c0) = (plain.bytes(), comp.bytes());
    plain.page_data(&batch)?;
    comp.page_data_xlz4(&batch, cache)?;
    Ok((plain.bytes() - p0, comp.bytes() - c0))
}

/// Run `epochs` epochs of `pattern` over a guest of `guest_bytes`
/// (a multiple of 4096, larger than WORK_GPA).
pub fn pattern_wire_bytes(
    pattern: PatternId,
    seed: u64,
    epochs: u64,
    guest_bytes: u64,
) -> std::io::Result<WireFigures> {
    let pages = guest_bytes / PAGE_SIZE as u64;
    let work_first = WORK_GPA / PAGE_SIZE as u64;
    let work_pages = pages.saturating_sub(work_first);
    let mut mem = vec![0u8; (pages as usize) * PAGE_SIZE];
    let mut plain = StreamWriter::new(std::io::sink());
    let mut comp = StreamWriter::new(std::io::sink());
    let mut cache = XorCache::new(pages)?;
    let all: BTreeSet<u64> = (0..pages).collect();
    send(&mut plain, &mut comp, &mut cache, &mem, &all)?;
    let mut f = WireFigures {
        epochs,
        ..WireFigures::default()
    };
    for e in 0..epochs {
        let mut dirty = BTreeSet::new();
        workload::for_each_write(pattern, seed, e, work_pages, &mut |w| {
            let pfn = work_first + w.page;
            let at = pfn as usize * PAGE_SIZE + w.offset as usize;
            mem[at..at + 8].copy_from_slice(&workload::value(e, w.page).to_le_bytes());
            dirty.insert(pfn);
        });
        let (p, c) = send(&mut plain, &mut comp, &mut cache, &mem, &dirty)?;
        f.dirty_pages += dirty.len() as u64;
        f.raw += (dirty.len() * PAGE_SIZE) as u64;
        f.plain += p;
        f.xlz4 += c;
    }
    Ok(f)
}
