//! Messages per second between two threads: hv/abi's shared ring against
//! `std::sync::mpsc` carrying the same entries, in the same run.
//!
//! Two cases:
//! - `event_stream_100k`: the event ring (hypervisor -> tool). The
//!   producer (front) streams 128-byte `EventEntry`s, publishing its index
//!   once per batch of up to `BATCH`; the consumer (back) drains up to
//!   `BATCH` published events and acknowledges them (one 64-byte
//!   `EventAck` per event, as the ring protocol requires to free slots,
//!   published once per batch). mpsc sends the same `EventEntry`s one way.
//!   This is the like-for-like comparison: one stream of N messages from
//!   one thread to another. Three producer variants differ only in how
//!   acknowledged slots are taken back: `abi_event_ring` copies and checks
//!   each whole ack, `abi_event_ring_status` reads only each ack's status
//!   word (`pop_response_u32`), `abi_event_ring_skip` takes the slots back
//!   without reading the acks (`skip_responses`).
//! - `request_response_100k`: the command ring, where every 64-byte
//!   request is answered by a 64-byte response that the front reads back
//!   (each message crosses the ring twice), against mpsc one way.
//!
//! Ring sides sleep (park) when idle after a bounded spin and are woken
//! only when the ring's notify rule says so, as with Xen's event channels;
//! mpsc blocks too.
//!
//! After criterion's figures it prints the ratios (doppel-benchkit: the
//! ring and mpsc runs alternated, so both see the same phases of the
//! machine): each ring variant's speed-up over `mpsc::channel` (target
//! for the event stream with whole acks: at least 2x).
//!
//! `cargo bench -p doppel-abi --bench ring` (ratios alone: `-- ratio`)

use std::hint::black_box;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use doppel_abi::msg::{Command, CommandEntry, EventAck, EventEntry, Response, ResponseEntry};
use doppel_abi::ring::RingLayout;
use doppel_abi::{AtomicMem64, BackRing, FrontRing, SharedMem};
use doppel_benchkit::{report, Goal};

const MESSAGES: u64 = 100_000;
const SLOTS: usize = 1024;

fn entry(i: u64) -> CommandEntry {
    Command::CommitEpoch { epoch: i }.encode(i as u32)
}

/// Poll briefly before going to sleep (cheaper than a park/unpark pair
/// when the peer is running).
fn spin_until(mut ready: impl FnMut() -> bool) -> bool {
    for _ in 0..SPINS {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

/// Roughly 30-100 us of polling (`pause` takes tens to ~140 cycles
/// depending on the core). With 200, an event-stream run of 100k messages
/// slept and was woken ~90 times (a futex wait/wake pair each) and the ring
/// took 6.4-7.2 ms; with 2000 it usually did not sleep at all and took
/// 4.6-5.6 ms (2026-11-22, docs/perf/ring.md). mpsc's blocking `recv` does
/// its own spin-then-park and is unaffected by this constant.
const SPINS: u32 = 2000;

/// Event-stream sides publish their index at least every `BATCH` entries,
/// so the peer can work on the first part of a burst while the rest is
/// written (instead of taking turns on whole 1024-slot bursts).
const BATCH: u64 = 256;

fn ring_run(words: &[AtomicU64]) -> u64 {
    let mem = AtomicMem64::new(words);
    let bytes = mem.size();
    RingLayout::new(bytes, 0, bytes, 64)
        .unwrap()
        .init_shared(&mem);
    // Notifications are thread unparks (the event channel); a side parks
    // only after the final check found no work, so none is lost.
    let front_thread = std::thread::current();
    std::thread::scope(|s| {
        let back = s.spawn(move || {
            let mut r: BackRing<_, CommandEntry, ResponseEntry> =
                BackRing::attach(mem, 0, bytes).unwrap();
            let (mut got, mut sum) = (0u64, 0u64);
            while got < MESSAGES {
                let mut n = 0;
                while let Some(e) = r.pop_request().unwrap() {
                    sum = sum.wrapping_add(e.args[0]);
                    let rsp = Response {
                        id: e.id,
                        op: e.op,
                        result: Ok(doppel_abi::msg::Reply::Done),
                    };
                    r.push_response(&rsp.encode()).unwrap();
                    n += 1;
                }
                got += n;
                if r.publish_responses() {
                    front_thread.unpark();
                }
                if n == 0
                    && !spin_until(|| r.unconsumed_requests().unwrap() > 0)
                    && !r.final_check_for_requests().unwrap()
                {
                    std::thread::park();
                }
            }
            sum
        });
        let back_thread = back.thread().clone();
        let mut r: FrontRing<_, CommandEntry, ResponseEntry> =
            FrontRing::attach(mem, 0, bytes).unwrap();
        let (mut sent, mut acked) = (0u64, 0u64);
        while acked < MESSAGES {
            let mut progressed = false;
            while sent < MESSAGES && r.free_requests() > 0 {
                r.push_request(&entry(sent)).unwrap();
                sent += 1;
                progressed = true;
            }
            if r.publish_requests() {
                back_thread.unpark();
            }
            while r.pop_response().unwrap().is_some() {
                acked += 1;
                progressed = true;
            }
            if !progressed
                && !spin_until(|| r.unconsumed_responses().unwrap() > 0)
                && !r.final_check_for_responses().unwrap()
            {
                std::thread::park();
            }
        }
        back.join().unwrap()
    })
}

fn event(i: u64) -> EventEntry {
    EventEntry {
        kind: 2,
        seq: i as u32,
        epoch: i,
        value: i,
        ..EventEntry::default()
    }
}

/// How the event producer takes acknowledged slots back.
#[derive(Clone, Copy)]
enum Reclaim {
    Copy,
    Status,
    Skip,
}

const ACK_STATUS: usize = core::mem::offset_of!(EventAck, status);

/// The event ring, one way: hypervisor (front) -> tool (back).
fn event_ring_run(words: &[AtomicU64], reclaim: Reclaim) -> u64 {
    let mem = AtomicMem64::new(words);
    let bytes = mem.size();
    RingLayout::new(bytes, 0, bytes, 128)
        .unwrap()
        .init_shared(&mem);
    let front_thread = std::thread::current();
    std::thread::scope(|s| {
        let back = s.spawn(move || {
            let mut r: BackRing<_, EventEntry, EventAck> = BackRing::attach(mem, 0, bytes).unwrap();
            let (mut got, mut sum) = (0u64, 0u64);
            while got < MESSAGES {
                let mut n = 0;
                while n < BATCH {
                    let Some(e) = r.pop_request().unwrap() else {
                        break;
                    };
                    sum = sum.wrapping_add(e.value);
                    let ack = EventAck {
                        kind: e.kind,
                        seq: e.seq,
                        epoch: e.epoch,
                        ..EventAck::default()
                    };
                    r.push_response(&ack).unwrap();
                    n += 1;
                }
                got += n;
                if n > 0 && r.publish_responses() {
                    front_thread.unpark();
                }
                if n == 0
                    && !spin_until(|| r.unconsumed_requests().unwrap() > 0)
                    && !r.final_check_for_requests().unwrap()
                {
                    std::thread::park();
                }
            }
            sum
        });
        let back_thread = back.thread().clone();
        let mut r: FrontRing<_, EventEntry, EventAck> = FrontRing::attach(mem, 0, bytes).unwrap();
        let (mut sent, mut acked) = (0u64, 0u64);
        while sent < MESSAGES {
            let mut progressed = false;
            let mut n = 0;
            while n < BATCH && sent < MESSAGES && r.free_requests() > 0 {
                n += 1;
                r.push_request(&event(sent)).unwrap();
                sent += 1;
                progressed = true;
            }
            if progressed && r.publish_requests() {
                back_thread.unpark();
            }
            // Reclaim acknowledged slots.
            match reclaim {
                // The hypervisor copies and checks each whole ack.
                Reclaim::Copy => {
                    while let Some(a) = r.pop_response().unwrap() {
                        assert_eq!(u64::from(a.seq), acked & 0xffff_ffff);
                        acked += 1;
                        progressed = true;
                    }
                }
                // It reads only each ack's status word.
                Reclaim::Status => {
                    while let Some(st) = r.pop_response_u32(ACK_STATUS).unwrap() {
                        assert_eq!(st, 0);
                        acked += 1;
                        progressed = true;
                    }
                }
                // It only takes the slots back.
                Reclaim::Skip => {
                    let n = r.skip_responses(u32::MAX).unwrap();
                    acked += u64::from(n);
                    progressed |= n > 0;
                }
            }
            if !progressed
                && !spin_until(|| r.unconsumed_responses().unwrap() > 0)
                && !r.final_check_for_responses().unwrap()
            {
                std::thread::park();
            }
        }
        back.join().unwrap()
    })
}

/// `MESSAGES` entries one way from this thread to another through
/// `std::sync::mpsc`: `channel()`, or `sync_channel(SLOTS)` if `bounded`.
/// Returns the receiver's sum of `value` over what it got.
fn mpsc_stream<T: Send>(
    bounded: bool,
    make: impl Fn(u64) -> T,
    value: impl Fn(&T) -> u64 + Send,
) -> u64 {
    let (tx, rx) = if bounded {
        let (t, r) = mpsc::sync_channel::<T>(SLOTS);
        (Tx::Bounded(t), r)
    } else {
        let (t, r) = mpsc::channel::<T>();
        (Tx::Unbounded(t), r)
    };
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let mut sum = 0u64;
            for _ in 0..MESSAGES {
                sum = sum.wrapping_add(value(&rx.recv().unwrap()));
            }
            sum
        });
        // One loop per sender type, so the send itself is not behind a match.
        match tx {
            Tx::Unbounded(t) => (0..MESSAGES).for_each(|i| t.send(make(i)).unwrap()),
            Tx::Bounded(t) => (0..MESSAGES).for_each(|i| t.send(make(i)).unwrap()),
        }
        h.join().unwrap()
    })
}

enum Tx<T> {
    Unbounded(mpsc::Sender<T>),
    Bounded(mpsc::SyncSender<T>),
}

fn mpsc_event_run() -> u64 {
    mpsc_stream(false, event, |e| e.value)
}

fn sync_mpsc_event_run() -> u64 {
    mpsc_stream(true, event, |e| e.value)
}

fn mpsc_run() -> u64 {
    mpsc_stream(false, entry, |e| e.args[0])
}

fn sync_mpsc_run() -> u64 {
    mpsc_stream(true, entry, |e| e.args[0])
}

fn bench(c: &mut Criterion) {
    let want = (0..MESSAGES).fold(0u64, |a, i| a.wrapping_add(i));
    let words: Vec<AtomicU64> = (0..(64 + SLOTS * 64) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    assert_eq!(ring_run(&words), want);
    assert_eq!(mpsc_run(), want);
    let event_words: Vec<AtomicU64> = (0..(64 + SLOTS * 128) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    for r in [Reclaim::Copy, Reclaim::Status, Reclaim::Skip] {
        assert_eq!(event_ring_run(&event_words, r), want);
    }
    assert_eq!(mpsc_event_run(), want);

    let mut g = c.benchmark_group("event_stream_100k");
    g.throughput(Throughput::Elements(MESSAGES));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, r) in [
        ("abi_event_ring", Reclaim::Copy),
        ("abi_event_ring_status", Reclaim::Status),
        ("abi_event_ring_skip", Reclaim::Skip),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(event_ring_run(&event_words, r)))
        });
    }
    g.bench_function("std_mpsc_channel", |b| {
        b.iter(|| black_box(mpsc_event_run()))
    });
    g.bench_function("std_mpsc_sync_channel_1024", |b| {
        b.iter(|| black_box(sync_mpsc_event_run()))
    });
    g.finish();

    let mut g = c.benchmark_group("request_response_100k");
    g.throughput(Throughput::Elements(MESSAGES));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("abi_ring", |b| b.iter(|| black_box(ring_run(&words))));
    g.bench_function("std_mpsc_channel", |b| b.iter(|| black_box(mpsc_run())));
    g.bench_function("std_mpsc_sync_channel_1024", |b| {
        b.iter(|| black_box(sync_mpsc_run()))
    });
    g.finish();
}

/// Wall time of one run of `f`, which must return `want`.
fn timed(want: u64, f: impl FnOnce() -> u64) -> Duration {
    let start = Instant::now();
    let got = f();
    let t = start.elapsed();
    assert_eq!(got, want);
    t
}

fn ratios() {
    let want = (0..MESSAGES).fold(0u64, |a, i| a.wrapping_add(i));
    let event_words: Vec<AtomicU64> = (0..(64 + SLOTS * 128) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    for (name, r, target) in [
        ("abi_event_ring", Reclaim::Copy, Some(2.0)),
        ("abi_event_ring_skip", Reclaim::Skip, None),
    ] {
        report(
            &format!("event_stream_100k/{name}"),
            (name, "std_mpsc_channel"),
            Goal::Speedup(target),
            (20, 3),
            || timed(want, || event_ring_run(&event_words, r)),
            || timed(want, mpsc_event_run),
        );
    }
    let words: Vec<AtomicU64> = (0..(64 + SLOTS * 64) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    report(
        "request_response_100k/abi_ring",
        ("abi_ring", "std_mpsc_channel"),
        Goal::Speedup(None),
        (20, 3),
        || timed(want, || ring_run(&words)),
        || timed(want, mpsc_run),
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    ratios();
}
