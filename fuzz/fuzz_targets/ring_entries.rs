//! Untrusted ring contents: random header indices and slot bytes fed to
//! both ring ends and a byte channel consumer; every entry that comes out
//! is decoded. Nothing may panic; errors never move an index; whatever
//! decodes re-encodes to the same bytes.
#![no_main]

use core::sync::atomic::AtomicU32;

use doppel_abi::chan::ChannelConsumer;
use doppel_abi::msg::{CommandEntry, EventAck, EventEntry, ResponseEntry};
use doppel_abi::ring::{REQ_PROD, RSP_PROD};
use doppel_abi::{AtomicMem, BackRing, FrontRing, SharedMem};
use libfuzzer_sys::fuzz_target;

const BYTES: usize = 64 + 4 * 128;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let start = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let pushed = data[4] % 5; // requests the front end published
    let words: Vec<AtomicU32> = (0..BYTES / 4).map(|_| AtomicU32::new(0)).collect();
    let mem = AtomicMem::new(&words);
    let body = &data[8..];
    mem.write_bytes(0, &body[..body.len().min(BYTES)]);

    // Back end of the event ring (the tool's view).
    let mut back: BackRing<_, EventEntry, EventAck> = BackRing::attach_at(&mem, 0, BYTES, start).unwrap();
    for _ in 0..8 {
        let before = back.req_cons();
        match back.pop_request() {
            Ok(Some(e)) => {
                if let Ok(ev) = e.decode() {
                    assert_eq!(ev.encode(e.seq), e);
                }
            }
            Ok(None) => break,
            Err(_) => {
                assert_eq!(back.req_cons(), before);
                break;
            }
        }
    }
    assert!(back.req_cons().wrapping_sub(start) <= 4);

    // Front end of the command ring (the tool's view of responses).
    let prod = mem.load_u32(RSP_PROD);
    let mut front: FrontRing<_, CommandEntry, ResponseEntry> = FrontRing::attach_at(&mem, 0, BYTES, start).unwrap();
    for i in 0..pushed {
        let _ = front.push_request(&CommandEntry { op: 5, id: i as u32, ..Default::default() });
    }
    front.publish_requests();
    mem.store_u32(RSP_PROD, prod);
    loop {
        let before = front.rsp_cons();
        match front.pop_response() {
            Ok(Some(r)) => {
                if let Ok(rsp) = r.decode() {
                    assert_eq!(rsp.encode(), r);
                }
            }
            Ok(None) => break,
            Err(_) => {
                assert_eq!(front.rsp_cons(), before);
                break;
            }
        }
    }
    assert!(front.rsp_cons().wrapping_sub(start) <= u32::from(pushed));

    // Commands as the hypervisor decodes them.
    let _ = mem.load_u32(REQ_PROD);
    for chunk in body.chunks_exact(64) {
        let c: CommandEntry = zerocopy::FromBytes::read_from_bytes(chunk).unwrap();
        if let Ok(cmd) = c.decode() {
            assert_eq!(cmd.encode(c.id), c);
        }
    }

    // A byte channel consumer over the same bytes.
    let mut c = ChannelConsumer::attach(&mem, 0, BYTES).unwrap();
    let mut buf = [0u8; 512];
    for _ in 0..64 {
        match c.pop(&mut buf) {
            Ok(Some(info)) => assert!(info.len <= 512 - 16),
            Ok(None) | Err(_) => break,
        }
    }
});
