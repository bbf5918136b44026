//! The device-model ABI's decoders over untrusted bytes (hv/abi
//! `ioreq`): an ioreq slot as the device model reads it, an answer as the
//! hypervisor checks it, a buffered slot, the area header and the
//! buffered ring's pointers. None may panic; what decodes keeps its
//! promises.
#![no_main]

use doppel_abi::ioreq::{buffered_pop, state, Access, BufIoreq, DmHeader, Ioreq, PAGE};
use doppel_abi::ByteMem;
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    // A slot the device model reads, and the answer the hypervisor reads.
    if let Ok((slot, rest)) = Ioreq::read_from_prefix(data) {
        if let Ok(a) = Access::from_slot(&slot) {
            assert!(matches!(a.size, 1 | 2 | 4 | 8));
            assert_eq!(Access::from_slot(&a.slot(state::READY)), Ok(a));
            // A well-formed answer is taken, masked to the size.
            let mut ans = a.slot(state::IORESP_READY);
            ans.data = slot.data;
            let v = a.answer(&ans).unwrap();
            if a.read && a.size < 8 {
                assert!(v < 1u64 << (8 * u32::from(a.size)));
            } else if !a.read {
                assert_eq!(v, 0);
            }
            // Any other answer is checked without panicking.
            if let Ok((other, _)) = Ioreq::read_from_prefix(rest) {
                if a.answer(&other).is_ok() {
                    assert_eq!(other.addr, a.addr);
                    assert_eq!(other.size, u32::from(a.size));
                }
            }
        }
    }
    // A buffered slot: what decodes encodes back to the same bits.
    if data.len() >= 8 {
        let w = BufIoreq(u64::from_le_bytes(data[..8].try_into().unwrap()));
        if let Ok(d) = w.decode() {
            assert_eq!(BufIoreq::write(d), Some(w));
        }
    }
    // The area header.
    if let Ok((h, _)) = DmHeader::read_from_prefix(data) {
        if h.validate().is_ok() {
            for (i, d) in h.devices().iter().enumerate() {
                assert_eq!(h.device_at(d.base, 1), Some(i));
                assert!(d.base >= h.window_base);
                assert!(d.base + d.size <= h.window_base + h.window_size);
            }
        }
    }
    // The buffered page as a hostile hypervisor could leave it.
    let mut page = vec![0u8; PAGE];
    let n = data.len().min(PAGE);
    page[..n].copy_from_slice(&data[..n]);
    let mem = ByteMem::new(page);
    for _ in 0..4 {
        match buffered_pop(&mem, 0) {
            None => break,
            Some(Ok(w)) => assert!(matches!(w.size, 1 | 2 | 4)),
            Some(Err(_)) => {}
        }
    }
});
