//! Untrusted control-area headers: whatever validates must describe
//! disjoint, in-bounds regions after the header.
#![no_main]

use doppel_abi::control::{validate_header, HEADER_SIZE, REGIONS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let mut m = [0u8; 8];
    m.copy_from_slice(&data[..8]);
    let mapped = u64::from_le_bytes(m) as usize;
    if let Ok(v) = validate_header(&data[8..], mapped) {
        assert!(v.total_size() as usize <= mapped);
        let mut r: Vec<(usize, usize)> = REGIONS.iter().map(|f| v.region(*f)).collect();
        r.sort();
        assert!(r[0].0 >= HEADER_SIZE);
        for w in r.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
        let last = r[r.len() - 1];
        assert!(last.0 + last.1 <= v.total_size() as usize);
    }
});
