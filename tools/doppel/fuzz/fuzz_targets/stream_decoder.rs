//! Fuzz the backup path: any bytes through decoder -> stager -> replica,
//! and through the back channel reader. Invariants: no panic; the replica
//! changes only by whole epochs (its committed count equals the epochs the
//! receive loop reported, and an uncommitted replica is still all zeros).
#![no_main]

use doppel::ack::AckReader;
use doppel::backup::receive_opts;
use doppel::replica::Replica;
use libfuzzer_sys::fuzz_target;

const GUEST: u64 = 16;

fuzz_target!(|data: &[u8]| {
    // Odd first byte: also accept compressed page records. A valid image
    // header starts with 0xff, so valid seeds run with them on; mutations
    // of that byte cover the plain reader.
    let xlz4 = data.first().is_some_and(|b| b & 1 == 1);
    let mut rep = Replica::in_memory(GUEST);
    let got = receive_opts(data, &mut rep, xlz4, |_| Ok(()));
    assert_eq!(rep.state().committed, got.epochs.len() as u64);
    if got.epochs.is_empty() {
        assert!(rep.memory().unwrap().iter().all(|&b| b == 0));
        assert!(rep.state().tsc.is_none());
    }
    if let Ok(mut r) = AckReader::open(data, 0) {
        let mut last = None;
        while let Ok(m) = r.next_msg() {
            if let doppel::ack::BackMsg::Ack(e) = m {
                assert!(last.is_none_or(|l| e == l + 1));
                last = Some(e);
            }
        }
    }
});
