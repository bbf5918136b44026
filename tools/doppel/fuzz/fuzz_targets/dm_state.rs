//! Fuzz the device model's state blob decoder (a backup's restore reads
//! what the primary sent). Invariants: no panic; a blob that decodes
//! encodes back to the same bytes (`doppel::dm::blob::fuzz_one`).
#![no_main]

use doppel::dm::blob::{anonymous_guest, fuzz_one, FUZZ_GUEST};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let guest = anonymous_guest(FUZZ_GUEST).expect("1 MiB of anonymous guest RAM");
    let _ = fuzz_one(data, &guest);
});
