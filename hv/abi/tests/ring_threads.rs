//! Two threads over one shared buffer, with random delays: every message
//! arrives once, in order, intact; sleeping sides are only woken by the
//! notifications the protocol decides to send, so a wrong notify decision
//! shows up as a hang (caught by a timeout).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use doppel_abi::chan::{ChannelConsumer, ChannelError, ChannelLayout, ChannelProducer};
use doppel_abi::msg::*;
use doppel_abi::ring::RingLayout;
use doppel_abi::{AtomicMem, BackRing, FrontRing, SharedMem};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

const MESSAGES: u64 = if cfg!(debug_assertions) {
    20_000
} else {
    1_000_000
};

/// An event channel: a counter bumped on notify.
struct Doorbell {
    count: AtomicU64,
    failed: AtomicBool,
}

impl Doorbell {
    fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }
    fn seen(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
    fn ring(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }
    /// Sleep until rung after `seen`; a lost notification times out.
    fn wait(&self, seen: u64, other: &Doorbell) {
        let start = Instant::now();
        while self.count.load(Ordering::SeqCst) == seen {
            if other.failed.load(Ordering::SeqCst) {
                panic!("peer failed");
            }
            if start.elapsed() > Duration::from_secs(20) {
                self.failed.store(true, Ordering::SeqCst);
                panic!("lost wakeup: slept 20 s without a notification");
            }
            std::thread::yield_now();
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Mostly nothing, sometimes a short spin, rarely a yield.
    fn delay(&mut self) {
        match self.next() % 64 {
            0 => std::thread::yield_now(),
            1..=6 => {
                for _ in 0..(self.next() % 200) {
                    std::hint::spin_loop();
                }
            }
            _ => {}
        }
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
struct Msg {
    seq: u64,
    body: [u64; 6],
    check: u64,
}

impl Msg {
    fn new(seq: u64) -> Self {
        let body = core::array::from_fn(|i| {
            seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(i as u32 * 9)
        });
        let check = body.iter().fold(seq, |a, b| a ^ b);
        Msg { seq, body, check }
    }
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
struct TestAck {
    seq: u64,
    check: u64,
}

fn words(bytes: usize) -> Vec<AtomicU32> {
    (0..bytes / 4).map(|_| AtomicU32::new(0)).collect()
}

#[test]
fn million_requests_and_responses_between_two_threads() {
    let buf = words(64 + 16 * 64);
    let mem = AtomicMem::new(&buf);
    RingLayout::new(mem.size(), 0, mem.size(), 64)
        .unwrap()
        .init_shared(&mem);
    let to_back = Doorbell::new();
    let to_front = Doorbell::new();
    std::thread::scope(|s| {
        let back = s.spawn(|| {
            let mut r: BackRing<_, Msg, TestAck> = BackRing::attach(mem, 0, mem.size()).unwrap();
            let mut rng = Rng(0x1234_5678);
            let mut next = 0u64;
            while next < MESSAGES {
                let seen = to_back.seen();
                match r.pop_request().unwrap() {
                    Some(m) => {
                        assert_eq!(m, Msg::new(next), "lost, duplicated or reordered");
                        next += 1;
                        r.push_response(&TestAck {
                            seq: m.seq,
                            check: m.check,
                        })
                        .unwrap();
                        if rng.next().is_multiple_of(4) && r.publish_responses() {
                            to_front.ring();
                        }
                    }
                    None => {
                        if r.publish_responses() {
                            to_front.ring();
                        }
                        if !r.final_check_for_requests().unwrap() {
                            to_back.wait(seen, &to_front);
                        }
                    }
                }
                rng.delay();
            }
            if r.publish_responses() {
                to_front.ring();
            }
            next
        });
        let front = s.spawn(|| {
            let mut r: FrontRing<_, Msg, TestAck> = FrontRing::attach(mem, 0, mem.size()).unwrap();
            let mut rng = Rng(0x9abc_def0);
            let (mut sent, mut acked) = (0u64, 0u64);
            while acked < MESSAGES {
                let seen = to_front.seen();
                let mut progressed = false;
                while sent < MESSAGES && r.free_requests() > 0 && !rng.next().is_multiple_of(8) {
                    r.push_request(&Msg::new(sent)).unwrap();
                    sent += 1;
                    progressed = true;
                }
                if r.publish_requests() {
                    to_back.ring();
                }
                while let Some(a) = r.pop_response().unwrap() {
                    let m = Msg::new(acked);
                    assert_eq!(
                        a,
                        TestAck {
                            seq: m.seq,
                            check: m.check
                        }
                    );
                    acked += 1;
                    progressed = true;
                }
                if !progressed
                    && (sent == MESSAGES || r.free_requests() == 0)
                    && !r.final_check_for_responses().unwrap()
                {
                    to_front.wait(seen, &to_back);
                }
                rng.delay();
            }
            acked
        });
        assert_eq!(back.join().unwrap(), MESSAGES);
        assert_eq!(front.join().unwrap(), MESSAGES);
    });
}

#[test]
fn event_ring_delivers_checkpoints_in_order() {
    let n = MESSAGES / 10;
    let bytes = 64 + 8 * 128;
    let buf = words(bytes);
    let mem = AtomicMem::new(&buf);
    RingLayout::new(bytes, 0, bytes, 128)
        .unwrap()
        .init_shared(&mem);
    let (to_tool, to_hv) = (Doorbell::new(), Doorbell::new());
    let ev = |epoch: u64| {
        Event::CheckpointReady(CheckpointReady {
            epoch,
            dirty_count: epoch % 100,
            pfn_list: Span {
                offset: 8192,
                len: (epoch % 100) * 8,
            },
            pages: Span {
                offset: 1 << 20,
                len: (epoch % 100) * PAGE_SIZE,
            },
            vcpu: Span {
                offset: 4096,
                len: 1032,
            },
        })
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut r: doppel_abi::EventBack<_> = BackRing::attach(mem, 0, bytes).unwrap();
            let mut want = 0u64;
            while want < n {
                let seen = to_tool.seen();
                if let Some(e) = r.pop_request().unwrap() {
                    assert_eq!(e.seq, want as u32);
                    assert_eq!(e.decode(), Ok(ev(want)));
                    r.push_response(
                        &doppel_abi::msg::Ack {
                            kind: kind::CHECKPOINT_READY,
                            seq: e.seq,
                            epoch: want,
                            result: Ok(()),
                        }
                        .encode(),
                    )
                    .unwrap();
                    want += 1;
                    if r.publish_responses() {
                        to_hv.ring();
                    }
                } else if !r.final_check_for_requests().unwrap() {
                    to_tool.wait(seen, &to_hv);
                }
            }
        });
        s.spawn(|| {
            let mut r: doppel_abi::EventFront<_> = FrontRing::attach(mem, 0, bytes).unwrap();
            let (mut sent, mut acked) = (0u64, 0u64);
            while acked < n {
                let seen = to_hv.seen();
                if sent < n && r.free_requests() > 0 {
                    r.push_request(&ev(sent).encode(sent as u32)).unwrap();
                    sent += 1;
                    if r.publish_requests() {
                        to_tool.ring();
                    }
                    continue;
                }
                match r.pop_response().unwrap() {
                    Some(a) => {
                        let a = a.decode().unwrap();
                        assert_eq!((a.seq, a.epoch, a.result), (acked as u32, acked, Ok(())));
                        acked += 1;
                    }
                    None => {
                        if !r.final_check_for_responses().unwrap() {
                            to_hv.wait(seen, &to_tool);
                        }
                    }
                }
            }
        });
    });
}

#[test]
fn byte_channel_streams_epoch_tagged_records() {
    let n = MESSAGES / 5;
    let bytes = 64 + 1024;
    let buf = words(bytes);
    let mem = AtomicMem::new(&buf);
    ChannelLayout::new(bytes, 0, bytes)
        .unwrap()
        .init_shared(&mem);
    let (to_c, to_p) = (Doorbell::new(), Doorbell::new());
    let payload = |i: u64| -> Vec<u8> {
        (0..(i % 61) as usize)
            .map(|k| (i as usize * 31 + k) as u8)
            .collect()
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut p = ChannelProducer::attach(mem, 0, bytes).unwrap();
            let mut rng = Rng(77);
            let mut i = 0u64;
            while i < n {
                let seen = to_p.seen();
                match p.write_record(i / 16, &payload(i)) {
                    Ok(()) => {
                        i += 1;
                        if rng.next().is_multiple_of(3) && p.publish() {
                            to_c.ring();
                        }
                    }
                    Err(ChannelError::Full) => {
                        if p.publish() {
                            to_c.ring();
                        }
                        if !p
                            .final_check_for_space(doppel_abi::chan::record_size(payload(i).len()))
                            .unwrap()
                        {
                            to_p.wait(seen, &to_c);
                        }
                    }
                    Err(e) => panic!("{e:?}"),
                }
                rng.delay();
            }
            if p.publish() {
                to_c.ring();
            }
        });
        s.spawn(|| {
            let mut c = ChannelConsumer::attach(mem, 0, bytes).unwrap();
            let mut rng = Rng(99);
            let mut b = [0u8; 64];
            let mut i = 0u64;
            while i < n {
                let seen = to_c.seen();
                match c.pop(&mut b).unwrap() {
                    Some(info) => {
                        let want = payload(i);
                        assert_eq!((info.epoch, info.len), (i / 16, want.len()));
                        assert_eq!(&b[..info.len], &want[..]);
                        i += 1;
                        if rng.next().is_multiple_of(2) && c.publish() {
                            to_p.ring();
                        }
                    }
                    None => {
                        if c.publish() {
                            to_p.ring();
                        }
                        if !c.final_check().unwrap() {
                            to_c.wait(seen, &to_p);
                        }
                    }
                }
                rng.delay();
            }
        });
    });
}
