//! The wire-bytes model of `doppel::figures` on the guest's real patterns:
//! the dirty page counts match the pattern definitions, plain PAGE_DATA
//! costs a page plus its pfn word and headers, and compression beats it
//! on the hot and sparse patterns (the figures themselves are printed by
//! `examples/wire_bytes.rs`, not asserted).

use doppel::figures::pattern_wire_bytes;
use doppel_abi::guest::{PatternId, WORK_GPA};
use doppel_core::workload::{HOT_PAGES, SPARSE_STRIDE};

const GUEST: u64 = 64 << 20;

#[test]
fn hot_and_sparse_compress_and_plain_costs_a_page_plus_framing() {
    let work_pages = (GUEST - WORK_GPA) / 4096;
    for (p, per_epoch) in [
        (PatternId::Hot, HOT_PAGES),
        (PatternId::Sparse, work_pages.div_ceil(SPARSE_STRIDE)),
    ] {
        let f = pattern_wire_bytes(p, 1, 8, GUEST).unwrap();
        assert_eq!(f.dirty_pages, 8 * per_epoch, "{p:?}");
        assert_eq!(f.raw, f.dirty_pages * 4096);
        // One record per epoch (< 1024 pages): 8 B record header, 8 B count
        // header, then a pfn word and 4096 bytes per page.
        assert_eq!(f.plain, 8 * 16 + f.dirty_pages * (8 + 4096), "{p:?}");
        assert!(f.xlz4 < f.plain, "{p:?}: {f:?}");
        // A changed word per page: far below a page.
        assert!(f.xlz4_per_page() < 512.0, "{p:?}: {f:?}");
    }
}
