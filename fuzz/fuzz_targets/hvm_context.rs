//! Untrusted HVM context blobs (the HVM_CONTEXT record from a peer): decode
//! must never panic, and whatever decodes must re-encode to the same bytes
//! (apart from the ignored `msr_flags`) when its vCPU ids are 0..n.
#![no_main]

use doppel_core::hvm::{decode, decode_visit, encode, encoded_len, HvmError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = decode::<4>(data);
    // The visitor path agrees with the collecting one.
    let mut seen = 0usize;
    let visited = decode_visit(data, |_, _| {
        seen += 1;
        Ok(())
    });
    match &full {
        Ok(d) => {
            assert_eq!(visited, Ok(d.header));
            assert_eq!(seen, d.vcpus.len());
            let dense = d.vcpus.iter().enumerate().all(|(i, (id, _))| *id as usize == i);
            // Re-encoding only reproduces the input when there are no
            // skipped record types, i.e. the blob has the encoder's size.
            let n = d.vcpus.len();
            if dense && encoded_len(n) == Some(data.len()) {
                let states: Vec<_> = d.vcpus.iter().map(|(_, v)| v.clone()).collect();
                let mut out = vec![0u8; data.len()];
                assert_eq!(encode(&states, d.header, &mut out), Ok(data.len()));
                let mut want = data.to_vec();
                for k in 0..n {
                    let at = 32 + k * 1040 + 8 + 952;
                    want[at..at + 8].fill(0);
                }
                assert_eq!(out, want);
            }
        }
        Err(HvmError::CapacityExceeded(_)) => assert!(visited.is_ok() && seen > 4),
        Err(e) => assert_eq!(visited, Err(*e)),
    }
});
