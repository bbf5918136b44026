//! The operator's surface of running processes: `doppel status` against
//! a live pair (the host simulator as the hypervisor), its errors, the
//! status socket's lifetime, and the initial sync's progress lines.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{spawn_client, spawn_primary, Proc, BIN};
use tempfile::TempDir;

/// A directory of its own, removed when dropped (passed or not).
fn scratch(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("doppel-operate-{name}-"))
        .tempdir()
        .expect("scratch dir")
}

/// `doppel sim-hv` on `ram` with `args`, once its control area is up.
fn sim_hv(dir: &std::path::Path, ram: &str, args: &[&str]) -> Proc {
    let mut a = vec!["sim-hv", "--machine-ram", ram];
    a.extend(args);
    let sim = Proc::spawn("sim", dir, &a);
    sim.wait_line("sim-hv: ", 30);
    sim
}

fn status(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(BIN)
        .arg("status")
        .args(args)
        .output()
        .expect("run doppel status");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn field(sock: &str, name: &str) -> String {
    let (code, out, err) = status(&["--socket", sock, "--field", name]);
    assert_eq!(code, Some(0), "{err}");
    out.trim().to_string()
}

/// Poll `--field name` until it says `want` (or fail after 20 s).
fn wait_field(sock: &str, name: &str, want: &str) {
    let t = Instant::now();
    loop {
        let (code, out, _) = status(&["--socket", sock, "--field", name]);
        if code == Some(0) && out.trim() == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{sock}: {name} is {out:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn status_follows_a_pair_through_protection_and_the_loss_of_its_backup() {
    let tmp = scratch("pair");
    let dir = tmp.path();
    let ram = dir.join("m.ram");
    let ram_s = ram.to_str().expect("utf-8 path");
    let mut sim = sim_hv(dir, ram_s, &["--service", "kv", "--max-secs", "120"]);
    let bsock = dir.join("b.sock").display().to_string();
    let psock = dir.join("p.sock").display().to_string();
    let mut backup = Proc::spawn(
        "backup",
        dir,
        &[
            "backup",
            "--listen",
            "127.0.0.1:0",
            "--replica",
            dir.join("rep").to_str().expect("utf-8"),
            "--guest-pages",
            "512",
            "--status-socket",
            &bsock,
        ],
    );
    let listen = backup.addr("listening on ");
    // Before any primary: the backup waits.
    wait_field(&bsock, "state", "waiting");
    assert_eq!(field(&bsock, "role"), "backup");
    assert_eq!(field(&bsock, "last_committed"), "none");
    let (mut primary, clients) = spawn_primary(dir, ram_s, &listen, &["--status-socket", &psock]);
    let mut client = spawn_client(dir, &clients, "400", &[]);
    assert!(client.wait_exit(60).success(), "the client failed");
    wait_field(&psock, "state", "protected");
    wait_field(&bsock, "state", "protected");
    // The primary releases only what the backup acknowledged.
    let p: u64 = field(&psock, "last_committed").parse().expect("a number");
    let b: u64 = field(&bsock, "last_committed").parse().expect("a number");
    assert!(b >= p, "backup at {b}, primary released {p}");
    assert_eq!(field(&psock, "peer"), listen);
    let (code, human, _) = status(&["--socket", &psock]);
    assert_eq!(code, Some(0));
    for want in [
        "role             primary",
        "state            protected",
        "peer",
    ] {
        assert!(human.contains(want), "{human}");
    }
    // The JSON document is complete and versioned.
    let (code, json, _) = status(&["--socket", &psock, "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["schema"], 1);
    assert_eq!(v["pid"], primary.child.id());
    // An unknown field is a usage error naming the fields.
    let (code, _, err) = status(&["--socket", &psock, "--field", "colour"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no field `colour`") && err.contains("last_committed"),
        "{err}"
    );
    // A second process may not take a live socket.
    let mut second = Proc::spawn(
        "backup2",
        dir,
        &[
            "backup",
            "--listen",
            "127.0.0.1:0",
            "--replica",
            dir.join("rep2").to_str().expect("utf-8"),
            "--guest-pages",
            "512",
            "--status-socket",
            &psock,
        ],
    );
    assert_eq!(second.wait_exit(20).code(), Some(2));
    assert!(
        second
            .err_lines()
            .iter()
            .any(|l| l.contains("another doppel answers there")),
        "{:?}",
        second.err_lines()
    );
    // The backup dies: the primary is degraded and says so.
    backup.kill9();
    wait_field(&psock, "state", "degraded");
    assert_eq!(field(&psock, "backup_lost"), "1");
    assert_eq!(field(&psock, "peer"), "none");
    // Gone with its process: nothing answers, exit 3.
    primary.kill9();
    let (code, _, err) = status(&["--socket", &psock]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("nothing answers there"), "{err}");
    sim.kill9();
}

#[test]
fn the_initial_sync_of_a_large_guest_reports_progress() {
    let tmp = scratch("progress");
    let dir = tmp.path();
    let ram = dir.join("m.ram");
    let ram_s = ram.to_str().expect("utf-8 path");
    let pages = "20000";
    let mut sim = sim_hv(dir, ram_s, &["--guest-pages", pages, "--epochs", "2"]);
    let cap = dir.join("cap.xen");
    let mut p = Proc::spawn(
        "primary",
        dir,
        &[
            "primary",
            "--machine-ram",
            ram_s,
            "--record",
            cap.to_str().expect("utf-8"),
            "--epochs",
            "2",
        ],
    );
    assert!(p.wait_exit(60).success(), "{:?}", p.err_lines());
    let err = p.err_lines();
    assert!(
        err.iter()
            .any(|l| l.contains("initial sync (epoch 0): 20000 pages to send")),
        "{err:?}"
    );
    assert!(
        err.iter()
            .any(|l| l.contains("initial sync (epoch 0): 20000 pages sent in")),
        "{err:?}"
    );
    // The chunked send is the same stream: the capture verifies.
    let v = Command::new(BIN)
        .args(["stream", "verify"])
        .arg(&cap)
        .args(["--guest-pages", pages])
        .output()
        .expect("verify");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let _ = sim.wait_exit(30);
}
