//! The etcd witness against a real etcd on loopback (temporary data
//! directory, free ports). Skipped, with a message, only when no `etcd`
//! binary is installed (`cargo xtask setup` installs Debian's
//! etcd-server, so CI runs them).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use doppel::witness::{Witness, WitnessError};

// The etcd start-up the xtask witness steps use, std only.
#[path = "../../xtask/src/etcd.rs"]
mod etcd;
use etcd::Etcd;

mod common;
use common::{Proc, BIN};

fn etcd_installed() -> bool {
    let ok = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED: no `etcd` binary on PATH (run `cargo xtask setup`, which installs \
             Debian's etcd-server)"
        );
    }
    ok
}

/// Started (a test-named one), and ready once a lease can be granted
/// and a key taken.
fn start(name: &str) -> Etcd {
    let e = Etcd::start(&format!("witness-{name}")).expect("starting etcd");
    let start = Instant::now();
    loop {
        let mut probe = e.witness("/probe", 2, "probe");
        match probe.try_take() {
            Ok(_) => {
                probe.release();
                break;
            }
            Err(err) if start.elapsed() > Duration::from_secs(30) => {
                panic!("etcd did not come up within 30 s: {err}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    e
}

impl Etcd {
    fn witness(&self, key: &str, ttl: u64, owner: &str) -> Witness {
        Witness::new(
            std::slice::from_ref(&self.endpoint),
            key,
            Duration::from_secs(ttl),
            owner,
        )
        .expect("witness")
    }
}

#[test]
fn a_second_owner_is_refused_while_the_first_holds_the_key() {
    if !etcd_installed() {
        return;
    }
    let etcd = start("contend");
    let mut a = etcd.witness("/doppel/t/active", 3, "side-a");
    let mut b = etcd.witness("/doppel/t/active", 3, "side-b");
    let token = a.acquire().expect("a takes the free key");
    assert!(a.may_release(Instant::now()).is_ok());
    match b.acquire() {
        Err(WitnessError::Held {
            owner, revision, ..
        }) => {
            assert_eq!(owner, "side-a");
            assert_eq!(revision, token);
        }
        other => panic!("b must be refused, got {other:?}"),
    }
    assert!(b.may_release(Instant::now()).is_err());
    // Held across several keep-alive rounds (longer than the TTL).
    std::thread::sleep(Duration::from_secs(4));
    assert!(a.may_release(Instant::now()).is_ok());
    assert!(matches!(b.try_take(), Err(WitnessError::Held { .. })));
}

#[test]
fn a_crashed_holders_key_is_taken_only_after_its_lease_expired() {
    if !etcd_installed() {
        return;
    }
    let etcd = start("expire");
    let ttl = 2;
    let mut a = etcd.witness("/k", ttl, "a");
    let mut b = etcd.witness("/k", ttl, "b");
    let ta = a.acquire().expect("a takes the key");
    let every = a.timing().keepalive_every();
    std::thread::sleep(Duration::from_millis(700));
    a.abandon();
    let t0 = Instant::now();
    assert!(a.may_release(Instant::now()).is_err());
    let tb = loop {
        match b.try_take() {
            Ok(t) => break t,
            Err(WitnessError::Held { owner, .. }) => assert_eq!(owner, "a"),
            Err(e) => panic!("{e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(ttl + 5),
            "the expired lease's key was never freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let waited = t0.elapsed();
    // a's last renewal was at most one keep-alive round before t0.
    assert!(
        waited + every >= Duration::from_secs(ttl),
        "b won after {waited:?}, before a's lease could have expired"
    );
    assert!(tb > ta, "fencing tokens grow: {ta} then {tb}");
    assert!(b.may_release(Instant::now()).is_ok());
}

#[test]
fn a_released_key_is_taken_at_once() {
    if !etcd_installed() {
        return;
    }
    let etcd = start("release");
    let mut a = etcd.witness("/k", 5, "a");
    let mut b = etcd.witness("/k", 5, "b");
    a.acquire().expect("a takes the key");
    assert!(matches!(b.try_take(), Err(WitnessError::Held { .. })));
    a.release();
    assert!(a.may_release(Instant::now()).is_err());
    b.try_take().expect("b takes the released key at once");
}

#[test]
fn a_holder_whose_etcd_dies_stops_being_allowed_to_release_within_the_ttl() {
    if !etcd_installed() {
        return;
    }
    let mut etcd = start("down");
    let ttl = 2;
    let mut a = etcd.witness("/k", ttl, "a");
    let mut b = etcd.witness("/k", ttl, "b");
    a.acquire().expect("a takes the key");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(a.may_release(Instant::now()).is_ok(), "renewed while up");
    etcd.kill();
    let killed = Instant::now();
    let until = a.valid_until().expect("confirmed before the kill");
    assert!(
        until <= killed + Duration::from_secs(ttl) - a.timing().margin(),
        "the deadline rests on a keep-alive answered before etcd died"
    );
    let fenced = loop {
        if let Err(why) = a.may_release(Instant::now()) {
            break why;
        }
        assert!(
            killed.elapsed() <= Duration::from_secs(ttl),
            "still allowed to release {:?} after etcd died",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(fenced.contains("not confirmed"), "{fenced}");
    // Nobody else can take it either.
    match b.try_take() {
        Err(WitnessError::Unreachable { .. }) => {}
        other => panic!("b must find etcd unreachable, got {other:?}"),
    }
}

/// `doppel sim-hv --service kv` on a new machine RAM file in `dir`.
fn sim_kv(dir: &std::path::Path) -> (Child, PathBuf) {
    let ram = dir.join("machine.ram");
    let sim = Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args([
            "sim-hv",
            "--service",
            "kv",
            "--epoch-ms",
            "50",
            "--max-secs",
            "60",
        ])
        .arg("--machine-ram")
        .arg(&ram)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sim-hv");
    (sim, ram)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("witness-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn primary(ram: &std::path::Path, rec: &std::path::Path, etcd: &str, key: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_doppel"));
    c.args(["primary", "--wait-control", "20", "--machine-ram"])
        .arg(ram)
        .arg("--record")
        .arg(rec)
        .args([
            "--witness",
            etcd,
            "--witness-key",
            key,
            "--witness-ttl",
            "2",
        ])
        .env("RUST_BACKTRACE", "1");
    c
}

#[test]
fn a_primary_does_not_start_while_another_side_holds_the_key() {
    if !etcd_installed() {
        return;
    }
    let etcd = start("refuse");
    let dir = scratch("refuse");
    let (mut sim, ram) = sim_kv(&dir);
    let mut other = etcd.witness("/vm/active", 5, "backup:elsewhere:1");
    other.acquire().expect("the other side takes the key");
    let o = primary(&ram, &dir.join("c.xen"), &etcd.endpoint, "/vm/active")
        .output()
        .unwrap();
    let _ = sim.kill();
    let _ = sim.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(6), "{err}");
    assert!(err.contains("backup:elsewhere:1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("primary: committed"), "{out}");
}

#[test]
fn a_primary_whose_witness_dies_fences_itself_and_does_not_detach() {
    if !etcd_installed() {
        return;
    }
    let mut etcd = start("fence");
    let dir = scratch("fence");
    let (mut sim, ram) = sim_kv(&dir);
    let sock = dir.join("p.sock");
    let child = primary(&ram, &dir.join("c.xen"), &etcd.endpoint, "/vm/active")
        .arg("--status-socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it commit for a while (several lease renewals), then kill etcd.
    std::thread::sleep(Duration::from_secs(4));
    // Its status names the key, that it holds it, and its token.
    let st = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    etcd.kill();
    let killed = Instant::now();
    let o = child.wait_with_output().unwrap();
    let exited = killed.elapsed();
    let _ = sim.kill();
    let _ = sim.wait();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(6), "{out}\n{err}");
    assert!(
        out.contains("primary: witness key /vm/active held"),
        "{out}"
    );
    assert!(out.contains("primary: fenced:"), "{out}\n{err}");
    assert!(!out.contains("primary: detached"), "{out}");
    let w = &st["witness"];
    assert_eq!(
        (&w["key"], &w["held"]),
        (&"/vm/active".into(), &true.into()),
        "{st}"
    );
    let token = w["token"].as_i64().expect("a token");
    assert!(
        out.contains(&format!("(fencing token {token},")),
        "{st}\n{out}"
    );
    assert!(
        w["holder"]
            .as_str()
            .is_some_and(|h| h.starts_with("primary")),
        "{st}"
    );
    // Fenced before the 2 s lease could run out, plus the exit (a
    // bounded attempt to revoke the lease).
    assert!(
        exited < Duration::from_secs(3),
        "exited {exited:?} after etcd died"
    );
}

#[test]
fn the_backup_activates_only_once_the_primarys_lease_is_gone_and_fences_when_it_cannot_renew() {
    if !etcd_installed() {
        return;
    }
    let mut etcd = start("backup");
    let dir = scratch("backup");
    let (mut sim, ram) = sim_kv(&dir);
    let sram = dir.join("standby.ram");
    let sram_s = sram.to_str().unwrap();
    let _standby = Proc::spawn(
        "standby",
        &dir,
        &[
            "sim-hv",
            "--standby",
            "--max-secs",
            "60",
            "--machine-ram",
            sram_s,
        ],
    );
    let wit = ["--witness", &etcd.endpoint, "--witness-ttl", "2"];
    let mut bargs = vec![
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--standby-ram",
        sram_s,
        "--serve-clients",
        "127.0.0.1:0",
        "--heartbeat-timeout",
        "1",
        "--wait-control",
        "20",
    ];
    bargs.extend(wit);
    let mut backup = Proc::spawn("backup", &dir, &bargs);
    let (_, listen) = backup.wait_line_at("listening on ", 20);
    let listen = listen["listening on ".len()..].trim().to_string();
    let mut pargs = vec![
        "primary",
        "--wait-control",
        "20",
        "--machine-ram",
        ram.to_str().unwrap(),
        "--backup",
        &listen,
    ];
    pargs.extend(wit);
    let mut primary = Proc::spawn("primary", &dir, &pargs);
    primary.wait_line_at("primary: witness key", 20);
    std::thread::sleep(Duration::from_secs(2));
    // SIGKILL: no revoke, the lease runs out on its own.
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    let killed = Instant::now();
    let _ = sim.kill();
    let _ = sim.wait();
    let (w, waiting) = backup.wait_line_at("backup: waiting:", 10);
    assert!(waiting.contains("is held by \"primary:"), "{waiting}");
    let (f, _) = backup.wait_line_at("failover:", 15);
    let took = killed.elapsed();
    assert!(w < f, "waited before activating: {:#?}", backup.lines());
    let (t, _) = backup.wait_line_at("backup: witness key", 1);
    assert!(t < f, "the key was taken before activation");
    // Not before the primary's last renewal could have expired (it was
    // renewed at most one round before the kill).
    assert!(
        took >= Duration::from_millis(2000 - 400),
        "activated after {took:?}"
    );
    // The activated side loses etcd: it must stop serving within the TTL.
    etcd.kill();
    let down = Instant::now();
    backup.wait_line_at("backup: fenced:", 5);
    assert!(
        down.elapsed() < Duration::from_secs(2),
        "{:?}",
        down.elapsed()
    );
    let st = backup.child.wait().unwrap();
    assert_eq!(st.code(), Some(6));
}
