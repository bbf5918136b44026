//! The replication data path on the host: encode an epoch of pages as
//! libxc records -> TCP loopback -> decode and validate -> stage -> commit
//! into an in-memory replica, against the baseline of pushing the same
//! bytes through the same TCP loopback and discarding them.
//!
//! Run: cargo bench -p doppel --bench pipeline
//! After criterion's figures it prints the ratio baseline_time /
//! pipeline_time (higher is better; target at least 0.7x), the two
//! interleaved (doppel-benchkit). Ratio alone: `-- ratio`.
//!
//! The TLS line runs the same pipeline over the authenticated link (mutual
//! TLS 1.3 with pinned certificates, doppel::link; handshake outside the
//! timed part, as it happens once per connection) and reports its speed
//! as a ratio to the plain pipeline in the same process, the two
//! interleaved: `ratio epoch_16MiB/pipeline_tls: ... = X` (1.0 = TLS costs
//! nothing). TLS alone: `-- pipeline_tls`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use doppel::backup::receive;
use doppel::link::{Link, LinkTls};
use doppel::replica::Replica;
use doppel::stream::{HvmParam, OutPage, StreamWriter, TscInfo};
use doppel::synth::{hvm_context_blob, Rng, XEN_MAJOR, XEN_MINOR};
use doppel_benchkit::{report, Goal};

/// Guest size and pages per epoch: 16 MiB, every page dirty.
const PAGES: u64 = 4096;
const BUF: usize = 1 << 20;
/// Receive-side buffer: reads of 64 KiB and more bypass it.
const RBUF: usize = 64 << 10;

fn guest() -> Vec<u8> {
    let mut g = vec![0u8; PAGES as usize * 4096];
    Rng::new(9).fill(&mut g);
    g
}

fn write_epoch<W: Write>(w: &mut StreamWriter<W>, g: &[u8], e: u64) -> std::io::Result<()> {
    let pages: Vec<OutPage<'_>> = g
        .chunks_exact(4096)
        .enumerate()
        .map(|(i, d)| OutPage {
            pfn: i as u64,
            data: Some(d),
        })
        .collect();
    w.page_data(&pages)?;
    w.tsc_info(&TscInfo {
        mode: 0,
        khz: 2_000_000,
        nsec: e,
        incarnation: 0,
    })?;
    w.hvm_context(&hvm_context_blob(e))?;
    w.hvm_params(&[HvmParam { index: 1, value: e }])?;
    w.checkpoint()
}

fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Doppel: sender thread encodes `iters` epochs from guest memory; this
/// thread receives, validates, stages and commits each.
fn run_pipeline(l: &TcpListener, rep: &mut Replica, g: &'static [u8], iters: u64) -> Duration {
    let (tx, rx) = pair(l);
    transfer(tx, rx, (), rep, g, iters)
}

/// A sender thread writes `iters` epochs of `g` into `w` (holding `keep`
/// until it is done); this thread receives them from `r`, validates,
/// stages and commits each into `rep`. The time from the first byte sent
/// to the last commit.
fn transfer<W: Write + Send + 'static, R: Read, K: Send + 'static>(
    w: W,
    r: R,
    keep: K,
    rep: &mut Replica,
    g: &'static [u8],
    iters: u64,
) -> Duration {
    let start = Instant::now();
    let sender = thread::spawn(move || {
        let mut w = StreamWriter::new(BufWriter::with_capacity(BUF, w));
        w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
        w.static_data_end().unwrap();
        for e in 0..iters {
            write_epoch(&mut w, g, e).unwrap();
        }
        w.end().unwrap();
        w.flush().unwrap();
        keep
    });
    let got = receive(BufReader::with_capacity(RBUF, r), rep, |_| Ok(()));
    assert!(got.error.is_none() && got.epochs.len() as u64 == iters);
    drop(sender.join().unwrap());
    let t = start.elapsed();
    assert!(rep.memory().unwrap() == g);
    t
}

/// Two link sides, each pinning the other (what `doppel keygen` makes).
fn tls_sides() -> (LinkTls, LinkTls) {
    use rustls::pki_types::PrivateKeyDer;
    let id = |name: &str| {
        let k = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let key = PrivateKeyDer::try_from(k.signing_key.serialize_der()).unwrap();
        (k.cert.der().clone(), key)
    };
    let (p, pk) = id("primary");
    let (b, bk) = id("backup");
    (
        LinkTls::from_der(p.clone(), pk, b.clone()),
        LinkTls::from_der(b, bk, p),
    )
}

/// `run_pipeline` over a TLS link (`sides`: primary, backup).
fn run_pipeline_tls(
    l: &TcpListener,
    sides: &(LinkTls, LinkTls),
    rep: &mut Replica,
    g: &'static [u8],
    iters: u64,
) -> Duration {
    let (a, b) = pair(l);
    let hs = Duration::from_secs(10);
    let (tx, rx) = thread::scope(|s| {
        let srv = s.spawn(|| Link::server(b, &sides.1, hs).unwrap());
        let tx = Link::client(a, &sides.0, hs).unwrap();
        (tx, srv.join().unwrap())
    });
    let (_, w) = tx.split();
    let (r, _) = rx.split();
    transfer(w, r, tx, rep, g, iters)
}

/// Baseline: the same bytes (one pre-encoded epoch, sent `iters` times)
/// through the same loopback, read and discarded.
fn run_raw(l: &TcpListener, epoch: &'static [u8], iters: u64) -> Duration {
    let (tx, rx) = pair(l);
    let start = Instant::now();
    let sender = thread::spawn(move || {
        let mut w = BufWriter::with_capacity(BUF, tx);
        for _ in 0..iters {
            w.write_all(epoch).unwrap();
        }
        w.flush().unwrap();
    });
    let mut r = BufReader::with_capacity(RBUF, rx);
    let mut buf = vec![0u8; BUF];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    sender.join().unwrap();
    let t = start.elapsed();
    assert_eq!(n, epoch.len() as u64 * iters);
    t
}

fn bench(c: &mut Criterion) {
    let g: &'static [u8] = Box::leak(guest().into_boxed_slice());
    let mut one = StreamWriter::new(Vec::new());
    write_epoch(&mut one, g, 0).unwrap();
    let epoch: &'static [u8] = Box::leak(one.into_inner().into_boxed_slice());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // The backup's replica exists before the connection: created (and its
    // memory faulted in) once, outside the timed runs.
    let mut rep = Replica::in_memory(PAGES);
    run_pipeline(&l, &mut rep, g, 1);

    let mut grp = c.benchmark_group("epoch_16MiB");
    grp.throughput(Throughput::Elements(PAGES));
    grp.warm_up_time(Duration::from_secs(1));
    grp.measurement_time(Duration::from_secs(3));
    grp.sample_size(10);
    grp.bench_function("raw_tcp_loopback", |b| {
        b.iter_custom(|iters| run_raw(&l, epoch, iters))
    });
    grp.bench_function("encode_tcp_decode_stage_commit", |b| {
        b.iter_custom(|iters| run_pipeline(&l, &mut rep, g, iters))
    });
    let sides = tls_sides();
    // Its own replica, so the ratio below can alternate the two runs.
    let mut rep_tls = Replica::in_memory(PAGES);
    run_pipeline_tls(&l, &sides, &mut rep_tls, g, 1);
    grp.bench_function("encode_tls_decode_stage_commit", |b| {
        b.iter_custom(|iters| run_pipeline_tls(&l, &sides, &mut rep_tls, g, iters))
    });
    grp.finish();
    c.final_summary();
    report(
        "epoch_16MiB/pipeline",
        ("encode_tcp_decode_stage_commit", "raw_tcp_loopback"),
        Goal::Speedup(Some(0.7)),
        (10, 2),
        || run_pipeline(&l, &mut rep, g, 4),
        || run_raw(&l, epoch, 4),
    );
    report(
        "epoch_16MiB/pipeline_tls",
        (
            "encode_tls_decode_stage_commit",
            "encode_tcp_decode_stage_commit",
        ),
        Goal::Speedup(None),
        (10, 2),
        || run_pipeline_tls(&l, &sides, &mut rep_tls, g, 4),
        || run_pipeline(&l, &mut rep, g, 4),
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
}
