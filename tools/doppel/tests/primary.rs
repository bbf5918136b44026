//! The primary and backup against the hypervisor simulator: replication
//! over loopback compared byte for byte, and every bad control area / ring
//! misbehaviour giving its own clear error.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use doppel::ack::AckReader;
use doppel::backup;
use doppel::machine::{MachineError, MachineRam};
use doppel::primary::{Output, Primary, PrimaryConfig, PrimaryError};
use doppel::replica::Replica;
use doppel::sim::{Misbehave, Sim, SimSpec};
use doppel::stream::PAGE_SIZE;
use doppel_abi::control::ControlHeader;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("doppel-primary-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg(epochs: u64) -> PrimaryConfig {
    PrimaryConfig {
        epochs: Some(epochs),
        reply_timeout: Duration::from_secs(20),
        event_timeout: Duration::from_secs(20),
    }
}

#[test]
fn replica_matches_the_guest_after_20_epochs_over_loopback() {
    let dir = scratch("replica");
    let ram = dir.join("machine.ram");
    let spec = SimSpec {
        guest_pages: 512,
        epochs: 20,
        dirty: 60,
        seed: 42,
        ..SimSpec::default()
    };
    let pages = spec.guest_pages;
    let sim = Sim::create(&ram, spec).unwrap();
    let stop = AtomicBool::new(false);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let image = dir.join("replica").join("memory.img");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let (simres, got, summary) = std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let image = &image;
        let backup = s.spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut rep = Replica::open_file(image, pages).unwrap();
            let back = conn.try_clone().unwrap();
            backup::serve(BufReader::new(conn), back, &mut rep, |_| {}).unwrap()
        });
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        assert_eq!(ctl.at, doppel::sim::CONTROL_AT);
        let mut p = Primary::attach(&m, ctl, cfg(20)).unwrap();
        let conn = TcpStream::connect(addr).unwrap();
        let acks = AckReader::open(conn.try_clone().unwrap(), 0).unwrap();
        let mut out = Output::backup(conn, acks);
        let mut seen = Vec::new();
        let summary = p.run(&mut out, |r| seen.push(r.epoch));
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        drop(out);
        let got = backup.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        (simt.join().unwrap(), got, summary)
    });
    let summary = summary.unwrap();
    assert_eq!(simres.error, None);
    assert_eq!((simres.posted, simres.committed), (20, 20));
    assert_eq!(summary.committed, 20);
    assert!(got.error.is_none(), "{:?}", got.error);
    assert!(got.ended);
    assert_eq!(got.epochs.len(), 20);
    let rep = Replica::open_file(&image, pages).unwrap();
    assert_eq!(rep.state().committed, 20);
    let mem = rep.memory().unwrap();
    assert_eq!(mem.len(), simres.memory.len());
    let mismatches = mem
        .chunks(PAGE_SIZE)
        .zip(simres.memory.chunks(PAGE_SIZE))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(rep.state().hvm_context, simres.blob);
    // Epoch 0 carried every page; later epochs what the guest dirtied.
    assert_eq!(got.epochs[0].pages, pages);
    assert!(got.epochs[1..].iter().all(|e| e.pages > 0 && e.pages <= 60));
    println!(
        "replica: epochs={} pages_compared={} mismatches={mismatches}",
        rep.state().committed,
        mem.len() / PAGE_SIZE
    );
    assert_eq!(mismatches, 0);
    let _ = std::fs::remove_dir_all(&dir);
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
fn wrong_magic_is_not_found() {
    // The simulator also plants the magic at an unaligned address: ignored.
    let e = control_error("magic", |h| h.magic ^= 1);
    assert!(matches!(e, MachineError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("no control area"), "{e}");
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
