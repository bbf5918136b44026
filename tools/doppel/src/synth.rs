//! A deterministic synthetic guest: epoch 0 sends every page, later epochs
//! send a pseudo-random set of dirtied pages. Used by `doppel stream synth`,
//! the Xen verifier check, the corruption tests and the benchmark.

use std::io::{self, Write};

use crate::epoch::EpochData;
use crate::stream::{HvmParam, StreamWriter, TscInfo, PAGE_SIZE};

pub use crate::stream::format::{XEN_MAJOR, XEN_MINOR};

/// Parameters of a synthetic stream.
#[derive(Clone, Copy, Debug)]
pub struct SynthSpec {
    /// Number of epochs (each ends with CHECKPOINT).
    pub epochs: u64,
    /// Guest size in pages.
    pub pages: u64,
    /// Pages dirtied per later epoch (capped at `pages`).
    pub dirty: u64,
    /// Generator seed.
    pub seed: u64,
}

/// The seeded generator of the synthetic streams and simulators.
pub use doppel_abi::splitmix::SplitMix64 as Rng;

/// A minimal HVM context blob: the save HEADER record (typecode 1) and the
/// END descriptor. The real vCPU codec lives in doppel-core; at this layer
/// the blob is opaque.
pub fn hvm_context_blob(epoch: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&1u16.to_le_bytes()); // typecode HEADER
    b.extend_from_slice(&0u16.to_le_bytes()); // instance
    b.extend_from_slice(&24u32.to_le_bytes()); // length
    b.extend_from_slice(&0x5438_1286u32.to_le_bytes()); // magic
    b.extend_from_slice(&1u32.to_le_bytes()); // version
    b.extend_from_slice(&epoch.to_le_bytes()); // changeset: the epoch, so blobs differ
    b.extend_from_slice(&0x000A_0F10u32.to_le_bytes()); // cpuid
    b.extend_from_slice(&2_000_000u32.to_le_bytes()); // gtsc_khz
    b.extend_from_slice(&[0; 8]); // END descriptor
    b
}

/// Generate the epochs. Epoch 0: every page in pfn order, with every 61st
/// pfn sent as invalid (no data). Later epochs: `dirty` random pfns (may
/// repeat, so a pfn can be sent twice in one epoch; the later copy wins).
/// Everything is held in memory: for large guests use [`write_spec`].
pub fn epochs(spec: &SynthSpec) -> Vec<EpochData> {
    let mut rng = Rng::new(spec.seed);
    let mut out = Vec::new();
    for e in 0..spec.epochs {
        let pages = (0..epoch_pages(spec, e))
            .map(|i| page(spec, &mut rng, e, i))
            .collect();
        out.push(epoch_tail(spec, e, pages));
    }
    out
}

/// Number of pages epoch `e` sends.
fn epoch_pages(spec: &SynthSpec, e: u64) -> u64 {
    match e {
        0 => spec.pages,
        _ if spec.pages == 0 => 0,
        _ => spec.dirty.min(spec.pages),
    }
}

/// The `i`th page epoch `e` sends (pages are drawn in order from one
/// generator, so the whole stream is fixed by the seed).
fn page(spec: &SynthSpec, rng: &mut Rng, e: u64, i: u64) -> (u64, Option<Vec<u8>>) {
    if e == 0 {
        let pfn = i;
        if pfn % 61 == 60 {
            return (pfn, None);
        }
        let mut d = vec![0; PAGE_SIZE];
        rng.fill(&mut d);
        return (pfn, Some(d));
    }
    let pfn = rng.below(spec.pages);
    let mut d = vec![0; PAGE_SIZE];
    // Sparse writes, like a real guest: most of the page keeps the pattern
    // of its pfn, a few words are random.
    d.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (pfn as u8) ^ (i as u8));
    for _ in 0..8 {
        let at = rng.below((PAGE_SIZE / 8) as u64) as usize * 8;
        d[at..at + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    (pfn, Some(d))
}

/// Epoch `e` with `pages` and its end-of-epoch records.
fn epoch_tail(spec: &SynthSpec, e: u64, pages: Vec<(u64, Option<Vec<u8>>)>) -> EpochData {
    EpochData {
        pages,
        tsc: TscInfo {
            mode: 0,
            khz: 2_000_000,
            nsec: e.wrapping_mul(100_000_000),
            incarnation: 0,
        },
        hvm_context: hvm_context_blob(e),
        params: vec![
            HvmParam {
                index: 1, // HVM_PARAM_STORE_PFN
                value: spec.pages.saturating_sub(1),
            },
            HvmParam {
                index: 2, // HVM_PARAM_TIMER_MODE (synthetic value)
                value: e,
            },
        ],
    }
}

/// Write the stream of `spec` (the bytes [`stream_bytes`] gives) while
/// generating it, holding at most one PAGE_DATA batch (1024 pages) in
/// memory. Returns the writer and the stream length.
pub fn write_spec<W: Write>(w: W, spec: &SynthSpec) -> io::Result<(W, u64)> {
    let batch = crate::stream::MAX_BATCH_PFNS as u64;
    let mut rng = Rng::new(spec.seed);
    let mut sw = StreamWriter::new(w);
    sw.headers(XEN_MAJOR, XEN_MINOR)?;
    sw.static_data_end()?;
    for e in 0..spec.epochs {
        let n = epoch_pages(spec, e);
        let mut i = 0;
        while i < n {
            let k = batch.min(n - i);
            let pages = (i..i + k).map(|j| page(spec, &mut rng, e, j)).collect();
            sw.page_data(&epoch_tail(spec, e, pages).out_pages())?;
            i += k;
        }
        let tail = epoch_tail(spec, e, Vec::new());
        tail.write(&mut sw, true)?;
    }
    sw.end()?;
    sw.flush()?;
    let total = sw.bytes();
    Ok((sw.into_inner(), total))
}

/// Byte offsets in a written stream, for tests.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Offset just past each CHECKPOINT record.
    pub checkpoint_ends: Vec<u64>,
    /// Offset where each epoch's first record starts.
    pub epoch_starts: Vec<u64>,
    /// Total length.
    pub total: u64,
}

/// Write a finite stream: headers, STATIC_DATA_END, each epoch with its
/// CHECKPOINT, then END.
pub fn write_stream<W: Write>(w: W, epochs: &[EpochData]) -> io::Result<(W, Layout)> {
    let mut sw = StreamWriter::new(w);
    let mut lay = Layout::default();
    sw.headers(XEN_MAJOR, XEN_MINOR)?;
    sw.static_data_end()?;
    for e in epochs {
        lay.epoch_starts.push(sw.bytes());
        e.write(&mut sw, true)?;
        lay.checkpoint_ends.push(sw.bytes());
    }
    sw.end()?;
    sw.flush()?;
    lay.total = sw.bytes();
    Ok((sw.into_inner(), lay))
}

/// The whole synthetic stream in memory.
pub fn stream_bytes(spec: &SynthSpec) -> (Vec<EpochData>, Vec<u8>, Layout) {
    let eps = epochs(spec);
    let (bytes, lay) = write_stream(Vec::new(), &eps).expect("writing to a Vec cannot fail");
    (eps, bytes, lay)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed writer gives exactly the bytes of the in-memory one,
    /// with epochs larger than one PAGE_DATA batch (so batch boundaries
    /// and the generator's draw order must agree).
    #[test]
    fn write_spec_equals_stream_bytes() {
        for spec in [
            SynthSpec {
                epochs: 3,
                pages: 2100,
                dirty: 1500,
                seed: 7,
            },
            SynthSpec {
                epochs: 2,
                pages: 1,
                dirty: 5,
                seed: 1,
            },
            SynthSpec {
                epochs: 0,
                pages: 64,
                dirty: 5,
                seed: 1,
            },
        ] {
            let (_, want, lay) = stream_bytes(&spec);
            let (got, total) = write_spec(Vec::new(), &spec).unwrap();
            assert_eq!(total, lay.total, "{spec:?}");
            assert_eq!(got.len() as u64, total, "{spec:?}");
            assert!(got == want, "{spec:?}: streamed bytes differ");
        }
    }
}
