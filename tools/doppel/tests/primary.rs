//! The primary and backup against the hypervisor simulator: replication
//! over loopback compared byte for byte, and every bad control area / ring
//! misbehaviour giving its own clear error.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use doppel::ack::{AckReader, AckWriter};
use doppel::backup;
use doppel::machine::{MachineError, MachineRam};
use doppel::primary::{EpochReport, Output, Primary, PrimaryConfig, PrimaryError, Summary};
use doppel::replica::Replica;
use doppel::sim::{Misbehave, Sim, SimResult, SimSpec};
use doppel::stream::format::{feature, libxl_rec, rec};
use doppel::stream::{Limits, StreamError, StreamReader, PAGE_SIZE};
use doppel_abi::control::ControlHeader;
use doppel_abi::locator::LOCATOR_AT;
use doppel_abi::SharedMem;

fn scratch(name: &str) -> PathBuf {
    // Under the target directory (as replica_file.rs), not the system's
    // temporary directory: each run replaces the last one's files instead
    // of leaving a megabyte of guest RAM per test behind.
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("primary-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg(epochs: u64) -> PrimaryConfig {
    PrimaryConfig {
        epochs: Some(epochs),
        reply_timeout: Duration::from_secs(20),
        event_timeout: Duration::from_secs(20),
        stop: None,
        gate: None,
    }
}

/// Bytes the primary sent, as forwarded by the tap between it and the
/// backup.
#[derive(Default)]
struct Tap {
    bytes: Vec<u8>,
    /// Record types in order.
    types: Vec<u32>,
    /// Offset just past each CHECKPOINT (in `bytes`).
    ends: Vec<u64>,
    /// Whether a compressed record was damaged on its way to the backup.
    corrupted: bool,
}

/// Forward the primary's stream record by record to the backup (and the
/// back channel the other way). With `corrupt = Some(e)`, the first
/// compressed page record of epoch `e` reaches the backup with its raw_len
/// one page too large; `Tap::bytes` keeps the original.
fn tap(from: TcpStream, to: TcpStream, corrupt: Option<u64>) -> Tap {
    let (mut back_in, mut back_out) = (to.try_clone().unwrap(), from.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_in, &mut back_out);
        let _ = back_out.shutdown(Shutdown::Write);
    });
    let (mut r, mut w) = (BufReader::new(from), to);
    let mut t = Tap::default();
    let mut head = [0u8; 40];
    if r.read_exact(&mut head).is_ok() {
        t.bytes.extend_from_slice(&head);
        let mut ok = w.write_all(&head).is_ok();
        let mut h = [0u8; 8];
        while r.read_exact(&mut h).is_ok() {
            let rtype = u32::from_le_bytes(h[..4].try_into().unwrap());
            let len = u32::from_le_bytes(h[4..].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len.next_multiple_of(8)];
            if r.read_exact(&mut body).is_err() {
                break;
            }
            t.bytes.extend_from_slice(&h);
            t.bytes.extend_from_slice(&body);
            t.types.push(rtype);
            if rtype == rec::DOPPEL_PAGE_DATA_XLZ4
                && corrupt == Some(t.ends.len() as u64)
                && !t.corrupted
            {
                let count = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
                let at = 8 + 8 * count;
                let raw = u32::from_le_bytes(body[at..at + 4].try_into().unwrap());
                body[at..at + 4].copy_from_slice(&(raw + 4096).to_le_bytes());
                t.corrupted = true;
            }
            // Once the backup is gone, keep draining so the primary is
            // never stuck in a write.
            ok = ok && w.write_all(&h).is_ok() && w.write_all(&body).is_ok();
            if rtype == rec::CHECKPOINT {
                t.ends.push(t.bytes.len() as u64);
            }
            if rtype == rec::END {
                break;
            }
        }
    }
    let _ = w.shutdown(Shutdown::Write);
    back.join().unwrap();
    t
}

struct Run {
    summary: Result<Summary, PrimaryError>,
    reports: Vec<EpochReport>,
    got: backup::Received,
    sim: SimResult,
    tap: Tap,
    image: PathBuf,
    dir: PathBuf,
}

const PAGES: u64 = 512;

/// Primary -> tap -> backup over loopback against the simulator.
/// `compress`: the primary asks for compression; `offer`: what the backup
/// accepts; `corrupt`: see `tap`.
fn replicate(name: &str, epochs: u64, compress: bool, offer: u64, corrupt: Option<u64>) -> Run {
    let dir = scratch(name);
    let ram = dir.join("machine.ram");
    let spec = SimSpec {
        guest_pages: PAGES,
        epochs,
        dirty: 60,
        seed: 42,
        ..SimSpec::default()
    };
    let sim = Sim::create(&ram, spec).unwrap();
    let stop = AtomicBool::new(false);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let tap_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let tap_addr = tap_l.local_addr().unwrap();
    let image = dir.join("replica").join("memory.img");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let (sim_res, got, tap_res, summary, reports) = std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let image = &image;
        let backup = s.spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut rep = Replica::open_file(image, PAGES).unwrap();
            let back = conn.try_clone().unwrap();
            backup::serve_opts(BufReader::new(conn), back, &mut rep, offer, |_| {}).unwrap()
        });
        let tapt = s.spawn(move || {
            let (from, _) = tap_l.accept().unwrap();
            let to = TcpStream::connect(addr).unwrap();
            tap(from, to, corrupt)
        });
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        assert_eq!(ctl.at, doppel::sim::CONTROL_AT);
        let mut p = Primary::attach(&m, ctl, cfg(epochs)).unwrap();
        let conn = TcpStream::connect(tap_addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let acks = AckReader::open(conn.try_clone().unwrap(), 0).unwrap();
        let mut out = Output::backup(conn, acks);
        if compress {
            let got = out
                .negotiate(feature::XLZ4, PAGES, Duration::from_secs(20))
                .unwrap();
            assert_eq!(got, offer & feature::XLZ4);
            assert_eq!(out.compressed(), got != 0);
        }
        let mut reports = Vec::new();
        let summary = p.run(&mut out, |r| reports.push(*r));
        drop(out);
        let got = backup.join().unwrap();
        let tap_res = tapt.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        (simt.join().unwrap(), got, tap_res, summary, reports)
    });
    Run {
        summary,
        reports,
        got,
        sim: sim_res,
        tap: tap_res,
        image,
        dir,
    }
}

/// The replica equals the simulator's guest at its last checkpoint.
fn assert_exact(run: &Run, epochs: u64) {
    let summary = run.summary.as_ref().unwrap();
    assert_eq!(run.sim.error, None);
    assert_eq!((run.sim.posted, run.sim.committed), (epochs, epochs));
    assert_eq!(summary.committed, epochs);
    assert!(run.got.error.is_none(), "{:?}", run.got.error);
    assert!(run.got.ended);
    assert_eq!(run.got.epochs.len() as u64, epochs);
    let seen: Vec<u64> = run.reports.iter().map(|r| r.epoch).collect();
    assert_eq!(seen, (0..epochs).collect::<Vec<_>>());
    let rep = Replica::open_file(&run.image, PAGES).unwrap();
    assert_eq!(rep.state().committed, epochs);
    let mem = rep.memory().unwrap();
    assert_eq!(mem.len(), run.sim.memory.len());
    let mismatches = mem
        .chunks(PAGE_SIZE)
        .zip(run.sim.memory.chunks(PAGE_SIZE))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(rep.state().hvm_context, run.sim.blob);
    // Epoch 0 carried every page; later epochs what the guest dirtied.
    assert_eq!(run.got.epochs[0].pages, PAGES);
    assert!(run.got.epochs[1..]
        .iter()
        .all(|e| e.pages > 0 && e.pages <= 60));
    // Raw page bytes are exactly the dirty pages.
    for (r, e) in run.reports.iter().zip(&run.got.epochs) {
        assert_eq!(r.page_raw, e.pages * PAGE_SIZE as u64);
    }
    assert_eq!(
        summary.page_raw,
        run.reports.iter().map(|r| r.page_raw).sum::<u64>()
    );
    println!(
        "replica: epochs={} pages_compared={} mismatches={mismatches} {}",
        rep.state().committed,
        mem.len() / PAGE_SIZE,
        summary.compression_line()
    );
    assert_eq!(mismatches, 0);
}

fn page_records(t: &Tap) -> (usize, usize) {
    let n = |ty| t.types.iter().filter(|&&x| x == ty).count();
    (n(rec::PAGE_DATA), n(rec::DOPPEL_PAGE_DATA_XLZ4))
}

#[test]
fn replica_matches_the_guest_after_20_epochs_over_loopback() {
    // No --compress: no hello, a plain Xen stream, though the backup
    // would accept compression.
    let run = replicate("replica", 20, false, feature::KNOWN, None);
    assert_exact(&run, 20);
    assert_eq!(run.got.features, 0);
    assert!(!run.summary.as_ref().unwrap().compressed);
    assert!(!run.tap.types.contains(&rec::DOPPEL_HELLO));
    let (plain, xlz4) = page_records(&run.tap);
    assert_eq!((plain > 0, xlz4), (true, 0));
    // The capture of a plain run passes the validating reader as is.
    let mut rd = StreamReader::open(&run.tap.bytes[..], Limits { guest_pages: PAGES }).unwrap();
    while !rd.ended() {
        rd.next_record().unwrap();
    }
    rd.expect_eof().unwrap();
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[test]
fn compressed_replication_is_exact_over_20_epochs() {
    let run = replicate("xlz4", 20, true, feature::KNOWN, None);
    assert_exact(&run, 20);
    assert_eq!(run.got.features, feature::XLZ4);
    let summary = run.summary.as_ref().unwrap();
    assert!(summary.compressed);
    assert_eq!(run.tap.types[0], rec::DOPPEL_HELLO);
    let (plain, xlz4) = page_records(&run.tap);
    assert_eq!((plain, xlz4 > 0), (0, true));
    // The fake guest rewrites a few words per dirty page: after epoch 0
    // (random contents), every epoch's pages shrink at least 4x.
    for r in &run.reports[1..] {
        assert!(r.page_wire * 4 < r.page_raw, "{r:?}");
    }
    assert!(summary.page_wire < summary.page_raw);
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[test]
fn backup_refusing_compression_gets_a_plain_stream() {
    let run = replicate("refused", 20, true, 0, None);
    assert_exact(&run, 20);
    assert_eq!(run.got.features, 0);
    assert!(!run.summary.as_ref().unwrap().compressed);
    assert_eq!(run.tap.types[0], rec::DOPPEL_HELLO);
    let (plain, xlz4) = page_records(&run.tap);
    assert_eq!((plain > 0, xlz4), (true, 0));
    // Plain PAGE_DATA: wire = raw + headers and pfn words.
    for r in &run.reports {
        assert!(r.page_wire > r.page_raw, "{r:?}");
    }
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[test]
fn corrupted_compressed_record_discards_the_epoch() {
    let run = replicate("corrupt", 12, true, feature::KNOWN, Some(5));
    assert!(run.tap.corrupted);
    // The backup refuses epoch 5 and stops; the primary loses its backup.
    match &run.got.error {
        Some(backup::ReceiveError::Stream(StreamError::BadCompressed { msg, .. })) => {
            assert!(msg.contains("raw_len"), "{msg}")
        }
        other => panic!("expected BadCompressed, got {other:?}"),
    }
    assert_eq!(run.got.epochs.len(), 5);
    let e = run.summary.as_ref().unwrap_err();
    assert_eq!(e.exit_code(), 5, "{e}");
    assert_eq!(run.reports.len(), 5);
    // The replica is at epoch 4: equal to the undamaged stream up to the
    // end of epoch 4, decoded on its own.
    let rep = Replica::open_file(&run.image, PAGES).unwrap();
    assert_eq!(rep.state().committed, 5);
    let mut model = Replica::in_memory(PAGES);
    let cut = run.tap.ends[4] as usize;
    let m = backup::receive_opts(&run.tap.bytes[..cut], &mut model, true, |_| Ok(()));
    assert_eq!(m.epochs.len(), 5);
    assert!(m
        .error
        .as_ref()
        .is_some_and(|e| matches!(e, backup::ReceiveError::Stream(s) if s.is_truncation())));
    assert!(rep.memory().unwrap() == model.memory().unwrap());
    assert_eq!(rep.state().hvm_context, model.state().hvm_context);
    // And epoch 5 did change memory, so staying at 4 is observable.
    let mut model6 = Replica::in_memory(PAGES);
    let cut6 = run.tap.ends[5] as usize;
    backup::receive_opts(&run.tap.bytes[..cut6], &mut model6, true, |_| Ok(()));
    assert_eq!(model6.state().committed, 6);
    assert!(model6.memory().unwrap() != model.memory().unwrap());
    let _ = std::fs::remove_dir_all(&run.dir);
}

/// A fake backup: sends the libxl header, then `answer`, then waits for the
/// primary to hang up.
fn fake_backup(answer: Vec<u8>) -> Result<u64, PrimaryError> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        AckWriter::new(c.try_clone().unwrap()).unwrap();
        c.write_all(&answer).unwrap();
        let _ = std::io::copy(&mut c, &mut std::io::sink());
    });
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let acks = AckReader::open(conn.try_clone().unwrap(), 0).unwrap();
    let mut out = Output::backup(conn, acks);
    let r = out.negotiate(feature::XLZ4, 64, Duration::from_secs(1));
    drop(out);
    t.join().unwrap();
    r
}

fn libxl_record(rtype: u32, body: &[u8]) -> Vec<u8> {
    let mut v = rtype.to_le_bytes().to_vec();
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v.resize(v.len().next_multiple_of(8), 0);
    v
}

#[test]
fn silent_backup_times_out_the_hello() {
    // An old backup skips the optional hello and never answers.
    let e = fake_backup(Vec::new()).unwrap_err();
    assert!(matches!(e, PrimaryError::HelloTimeout { secs: 1 }), "{e}");
    assert!(e.to_string().contains("run without --compress"), "{e}");
    assert_eq!(e.exit_code(), 5);
}

#[test]
fn garbage_answers_to_the_hello_are_refused() {
    let mut ok = [0u8; 16];
    ok[0] = 1;
    assert_eq!(
        fake_backup(libxl_record(libxl_rec::DOPPEL_FEATURES, &ok)).unwrap(),
        feature::XLZ4
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // A feature that was not asked for.
        (
            libxl_record(
                libxl_rec::DOPPEL_FEATURES,
                &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            "only 0x1 were asked for",
        ),
        // Reserved word set.
        (
            libxl_record(
                libxl_rec::DOPPEL_FEATURES,
                &[1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0],
            ),
            "reserved",
        ),
        // Wrong length.
        (
            libxl_record(libxl_rec::DOPPEL_FEATURES, &[1, 0, 0, 0]),
            "expected 16",
        ),
        // An epoch ack instead of the answer.
        (
            [
                libxl_record(libxl_rec::DOPPEL_EPOCH_ACK, &[0; 16]),
                libxl_record(libxl_rec::CHECKPOINT_STATE, &2u32.to_le_bytes()),
            ]
            .concat(),
            "Ack(0) instead of DOPPEL_FEATURES",
        ),
        // An unknown mandatory record.
        (libxl_record(0x1234, &[0; 8]), "0x1234"),
        // The backup closed the channel.
        (
            libxl_record(libxl_rec::END, &[]),
            "End instead of DOPPEL_FEATURES",
        ),
    ];
    for (answer, want) in cases {
        let e = fake_backup(answer).unwrap_err();
        assert!(matches!(e, PrimaryError::BadHello { .. }), "{e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
}

fn control_error(name: &str, tamper: fn(&mut ControlHeader)) -> MachineError {
    let dir = scratch(name);
    let ram = dir.join("machine.ram");
    let spec = SimSpec {
        guest_pages: 64,
        tamper: Some(tamper),
        ..SimSpec::default()
    };
    let _sim = Sim::create(&ram, spec).unwrap();
    let m = MachineRam::open(&ram).unwrap();
    let e = m.find_control().unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    e
}

#[test]
fn wrong_magic_is_named() {
    // The locator points at an area whose magic is wrong.
    let e = control_error("magic", |h| h.magic ^= 1);
    assert!(matches!(e, MachineError::Control { .. }), "{e}");
    assert!(e.to_string().contains("field magic is"), "{e}");
}

#[test]
fn no_locator_is_not_found() {
    // A valid control area, but no locator (a hypervisor still booting):
    // the area is not looked for elsewhere.
    let dir = scratch("nolocator");
    let ram = dir.join("machine.ram");
    let _sim = Sim::create(&ram, SimSpec::default()).unwrap();
    let m = MachineRam::open(&ram).unwrap();
    m.mem().write_bytes(LOCATOR_AT as usize, &[0; 8]);
    let e = m.find_control().unwrap_err();
    assert!(matches!(e, MachineError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("no control area"), "{e}");
    // A file too small to hold the locator page.
    let small = dir.join("small.ram");
    std::fs::write(&small, vec![0u8; LOCATOR_AT as usize]).unwrap();
    let e = MachineRam::open(&small)
        .unwrap()
        .find_control()
        .unwrap_err();
    assert!(matches!(e, MachineError::NoLocatorPage { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_control_area_planted_in_guest_ram_is_ignored() {
    // The simulator plants what a hostile guest can: a whole, valid copy
    // of the header on a page of its own RAM. Scanning for the magic, the
    // tool found two areas and gave up (`doppel inspect` and re-attach
    // failed); through the locator it finds the hypervisor's alone.
    let dir = scratch("planted");
    let ram = dir.join("machine.ram");
    let sim = Sim::create(&ram, SimSpec::default()).unwrap();
    let g = sim.header().guest_ram;
    let fake_at = g.offset + doppel::sim::FAKE_AT_PAGE * PAGE_SIZE as u64;
    let m = MachineRam::open(&ram).unwrap();
    m.control_at(fake_at)
        .expect("the planted area validates on its own");
    let ctl = m.find_control().unwrap();
    assert_eq!(ctl.at, doppel::sim::CONTROL_AT);
    assert_eq!(ctl.guest_ram(), g);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["inspect", "--machine-ram"])
        .arg(&ram)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "control area at machine address {:#x}",
            doppel::sim::CONTROL_AT
        )),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_control_area_inside_its_own_guest_ram_is_refused() {
    // The area (or the locator page) inside the guest RAM its header
    // declares is guest-writable: refused, named.
    let e = control_error("inguest", |h| {
        h.guest_ram.offset = doppel::sim::CONTROL_AT - 0x1000;
    });
    assert!(matches!(e, MachineError::BadLocator { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("the control area lies in the guest RAM its header declares"),
        "{e}"
    );
    let e = control_error("locinguest", |h| {
        h.guest_ram = doppel_abi::control::Region {
            offset: LOCATOR_AT,
            size: 0x1000,
        };
    });
    assert!(
        e.to_string()
            .contains("the guest RAM the header declares covers the locator page"),
        "{e}"
    );
}

#[test]
fn version_from_the_future_is_named() {
    let e = control_error("version", |h| h.version = 2);
    assert!(
        e.to_string()
            .contains("field version is 2; this tool speaks version 1"),
        "{e}"
    );
}

#[test]
fn region_offset_past_the_end_is_named() {
    let e = control_error("offset", |h| h.staging.offset = h.total_size + 0x1000);
    assert!(
        e.to_string()
            .contains("field staging ends beyond total_size"),
        "{e}"
    );
    let e = control_error("total", |h| h.total_size = 1 << 40);
    assert!(
        e.to_string().contains("field total_size is 1099511627776"),
        "{e}"
    );
}

#[test]
fn guest_ram_outside_the_file_is_named() {
    let e = control_error("guest", |h| h.guest_ram.offset = 1 << 40);
    assert!(matches!(e, MachineError::GuestRamOutsideFile { .. }), "{e}");
    assert!(e.to_string().contains("field guest_ram"), "{e}");
    let e = control_error("noguest", |h| h.guest_ram.size = 0);
    assert!(matches!(e, MachineError::NoGuest { .. }), "{e}");
}

#[test]
fn event_index_jump_is_an_error_not_a_crash() {
    let dir = scratch("jump");
    let ram = dir.join("machine.ram");
    let spec = SimSpec {
        guest_pages: 64,
        epochs: 5,
        misbehave: Some(Misbehave::EventIndexJump { epoch: 2 }),
        ..SimSpec::default()
    };
    let sim = Sim::create(&ram, spec).unwrap();
    let stop = AtomicBool::new(false);
    let (res, committed) = std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        let mut p = Primary::attach(&m, ctl, cfg(5)).unwrap();
        let mut out: Output<_, std::io::Empty> = Output::record(Vec::new());
        let mut committed = 0;
        let r = p.run(&mut out, |_| committed += 1);
        stop.store(true, Ordering::Relaxed);
        simt.join().unwrap();
        (r, committed)
    });
    let e = res.unwrap_err();
    assert!(matches!(e, PrimaryError::Ring { ring: "event", .. }), "{e}");
    assert!(e.to_string().contains("a jump larger than the ring"), "{e}");
    assert_eq!(e.exit_code(), 1);
    // Epochs 0 and 1 were committed; epoch 2's event was posted with the
    // bad index, which the ring refuses before reading any entry.
    assert_eq!(committed, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_primary_without_memory_for_the_cache_does_not_ask_for_compression() {
    // 2^40 pages (4 PiB): no host can map that XOR cache. The primary
    // says so and asks for plain pages, which the backup (which would
    // accept compression) then gets.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let backup = std::thread::spawn(move || {
        let (conn, _) = l.accept().unwrap();
        let mut rep = Replica::in_memory(4);
        let back = conn.try_clone().unwrap();
        backup::serve_opts(BufReader::new(conn), back, &mut rep, feature::KNOWN, |_| {}).unwrap()
    });
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let acks = AckReader::open(conn.try_clone().unwrap(), 0).unwrap();
    let mut out = Output::backup(conn, acks);
    let got = out
        .negotiate(feature::XLZ4, 1 << 40, Duration::from_secs(20))
        .unwrap();
    assert_eq!(got, 0);
    assert!(!out.compressed());
    drop(out);
    assert_eq!(backup.join().unwrap().features, 0);
}
