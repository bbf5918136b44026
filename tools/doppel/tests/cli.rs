//! The `doppel` binary on bad input: every case must end with a clear
//! message and its documented exit code (2 usage, 1 invalid input, 3 I/O
//! or unreachable, 4 peer gone), never a panic, and must leave no files
//! behind. Plus the checks a replica makes before it takes a stream.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use doppel::synth::{self, SynthSpec};

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn doppel(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Run `args`; the exit code must be `code` and stderr must contain `msg`
/// and no panic. Returns stderr.
fn fails(args: &[&str], dir: &Path, code: i32, msg: &str) -> String {
    let o = doppel(args, dir);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(msg), "{args:?}: expected {msg:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    err
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

const SPEC: SynthSpec = SynthSpec {
    epochs: 3,
    pages: 64,
    dirty: 8,
    seed: 3,
};

fn write_capture(dir: &Path) -> PathBuf {
    let (_, bytes, _) = synth::stream_bytes(&SPEC);
    let p = dir.join("cap.xen");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn timeouts_must_be_finite_positive_and_bounded() {
    let d = scratch("timeouts");
    let range = "give a finite number of seconds from 0.001 to 604800";
    for (flag, v) in [
        ("--reply-timeout", "inf"),
        ("--reply-timeout", "NaN"),
        ("--reply-timeout", "-1"),
        ("--reply-timeout", "0"),
        ("--connect-timeout", "1e30"),
        ("--connect-timeout", "604801"),
    ] {
        let arg = format!("{flag}={v}");
        let args = ["client", "--connect", "127.0.0.1:1", "--ops", "1", &arg];
        let err = fails(&args, &d, 2, range);
        assert!(err.contains(&format!("'{v}' for '{flag} <SECS>'")), "{err}");
    }
    fails(
        &[
            "client",
            "--connect",
            "127.0.0.1:1",
            "--ops",
            "1",
            "--reply-timeout",
            "five",
        ],
        &d,
        2,
        "`five` is not a number of seconds",
    );
    // Rejected while parsing, not once the primary connects.
    let args = [
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--standby-ram",
        "nothere.ram",
        "--serve-clients",
        "127.0.0.1:0",
        "--heartbeat-timeout",
        "inf",
    ];
    fails(&args, &d, 2, range);
    for flag in ["--ack-timeout", "--event-timeout", "--wait-control"] {
        for v in ["0", "604801", "18446744073709551616"] {
            let args = ["primary", "--machine-ram", "x", "--backup", "h:1", flag, v];
            fails(&args, &d, 2, &format!("for '{flag} <SECS>'"));
        }
    }
    assert!(files(&d).is_empty(), "{:?}", files(&d));
}

#[test]
fn sizes_and_counts_are_bounded() {
    let d = scratch("sizes");
    let cap = write_capture(&d);
    let cap = cap.to_str().unwrap();
    let huge = "18446744073709551615";
    fails(
        &[
            "backup",
            "--listen",
            "127.0.0.1:0",
            "--replica",
            "bk",
            "--guest-pages",
            huge,
        ],
        &d,
        2,
        &format!("{huge} is not in 1..=4294967296"),
    );
    fails(
        &[
            "stream",
            "replay",
            cap,
            "--image",
            "r.img",
            "--guest-pages",
            huge,
        ],
        &d,
        2,
        &format!("{huge} is not in 1..=4294967296"),
    );
    fails(
        &[
            "stream",
            "replay",
            cap,
            "--image",
            "r.img",
            "--guest-pages",
            "0",
        ],
        &d,
        2,
        "0 is not in 1..=4294967296",
    );
    fails(
        &[
            "stream",
            "synth",
            "--epochs",
            "1000000000000000000",
            "--out",
            "s",
        ],
        &d,
        2,
        "1000000000000000000 is not in 1..=100000",
    );
    fails(
        &["stream", "synth", "--pages", "100000000", "--out", "s"],
        &d,
        2,
        "100000000 is not in 1..=1048576",
    );
    for ops in ["100000000000", "0"] {
        fails(
            &["client", "--connect", "127.0.0.1:1", "--ops", ops],
            &d,
            2,
            &format!("{ops} is not in 1..=1000000"),
        );
    }
    fails(
        &[
            "client",
            "--connect",
            "127.0.0.1:1",
            "--ops",
            "5",
            "--keys",
            "4097",
        ],
        &d,
        2,
        "4097 is not in 1..=4096",
    );
    assert_eq!(files(&d), ["cap.xen"]);
}

#[test]
fn flags_that_would_be_ignored_are_refused() {
    let d = scratch("ignored");
    for (flag, v) in [
        ("--heartbeat-timeout", "3"),
        ("--wait-control", "3"),
        ("--reply-timeout", "3"),
    ] {
        let args = [
            "backup",
            "--listen",
            "127.0.0.1:0",
            "--replica",
            "bk",
            "--guest-pages",
            "64",
            flag,
            v,
        ];
        fails(
            &args,
            &d,
            2,
            &format!("'--replica <DIR>' cannot be used with '{flag} <SECS>'"),
        );
    }
    for (flag, v, with) in [
        ("--heartbeat-ms", "5", "--heartbeat-ms <MS>"),
        ("--ack-timeout", "5", "--ack-timeout <SECS>"),
    ] {
        let args = ["primary", "--machine-ram", "m", "--record", "c", flag, v];
        fails(
            &args,
            &d,
            2,
            &format!("'--record <FILE>' cannot be used with '{with}'"),
        );
    }
    let args = [
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--standby-ram",
        "s.ram",
    ];
    fails(&args, &d, 2, "--serve-clients <ADDR>");
    assert!(files(&d).is_empty(), "{:?}", files(&d));
}

#[test]
fn every_subcommand_help_has_an_example() {
    let d = scratch("help");
    for sub in [
        &["primary"][..],
        &["backup"],
        &["inspect"],
        &["client"],
        &["stream"],
        &["stream", "verify"],
        &["stream", "synth"],
        &["stream", "replay"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let o = doppel(&args, &d);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{args:?}");
        assert!(out.contains("Example"), "{args:?}: no example:\n{out}");
        assert!(out.contains("doppel "), "{args:?}");
    }
    let o = doppel(&["backup", "--help"], &d);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Requires --serve-clients"), "{out}");
}

#[test]
fn replay_refuses_a_replica_with_epochs_and_a_short_epoch_0() {
    let d = scratch("replay");
    let cap = write_capture(&d);
    let cap = cap.to_str().unwrap();
    // A missing capture creates no image.
    fails(
        &[
            "stream",
            "replay",
            "nothere.xen",
            "--image",
            "a.img",
            "--guest-pages",
            "64",
        ],
        &d,
        3,
        "nothere.xen",
    );
    assert!(!d.join("a.img").exists());
    // The 64-page stream into a 128-page replica: refused, nothing committed.
    fails(
        &[
            "stream",
            "replay",
            cap,
            "--image",
            "big.img",
            "--guest-pages",
            "128",
        ],
        &d,
        1,
        "epoch 0 carries 64 pages but the replica has 128",
    );
    assert!(!d.join("big.img.state").exists());
    // The right size: committed; the image equals the model.
    let o = doppel(
        &[
            "stream",
            "replay",
            cap,
            "--image",
            "r.img",
            "--guest-pages",
            "64",
        ],
        &d,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eps = synth::epochs(&SPEC);
    let model = doppel::epoch::ModelReplica::after(SPEC.pages, &eps, eps.len());
    assert!(std::fs::read(d.join("r.img")).unwrap() == model.memory);
    // Again into the same replica: refused, untouched.
    let state = std::fs::read(d.join("r.img.state")).unwrap();
    fails(
        &[
            "stream",
            "replay",
            cap,
            "--image",
            "r.img",
            "--guest-pages",
            "64",
        ],
        &d,
        2,
        "the replica already holds 3 committed epochs",
    );
    assert_eq!(std::fs::read(d.join("r.img.state")).unwrap(), state);
    assert!(std::fs::read(d.join("r.img")).unwrap() == model.memory);
}

#[test]
fn synth_writes_the_model_stream_and_leaves_nothing_on_failure() {
    let d = scratch("synth");
    let o = doppel(
        &[
            "stream", "synth", "--epochs", "3", "--pages", "64", "--dirty", "8", "--seed", "3",
            "--out", "s.xen",
        ],
        &d,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, want, _) = synth::stream_bytes(&SPEC);
    assert!(std::fs::read(d.join("s.xen")).unwrap() == want);
    // --out is a directory: the rename fails, the temporary file goes.
    std::fs::create_dir(d.join("adir")).unwrap();
    std::fs::write(d.join("adir/keep"), b"k").unwrap();
    fails(&["stream", "synth", "--out", "adir"], &d, 3, "adir");
    assert_eq!(files(&d), ["adir", "s.xen"]);
    assert_eq!(files(&d.join("adir")), ["keep"]);
    // A missing directory: nothing is created.
    fails(&["stream", "synth", "--out", "nodir/s.xen"], &d, 3, "nodir");
    assert_eq!(files(&d), ["adir", "s.xen"]);
}

#[test]
fn backup_binds_before_creating_the_replica() {
    let d = scratch("bind");
    fails(
        &[
            "backup",
            "--listen",
            "garbage",
            "--replica",
            "bk1",
            "--guest-pages",
            "64",
        ],
        &d,
        3,
        "binding garbage",
    );
    assert!(files(&d).is_empty(), "{:?}", files(&d));
}

#[test]
fn backup_refuses_a_replica_with_epochs_as_a_usage_error() {
    let d = scratch("nonempty");
    let cap = write_capture(&d);
    std::fs::create_dir(d.join("bk")).unwrap();
    let o = doppel(
        &[
            "stream",
            "replay",
            cap.to_str().unwrap(),
            "--image",
            "bk/memory.img",
            "--guest-pages",
            "64",
        ],
        &d,
    );
    assert!(o.status.success());
    fails(
        &[
            "backup",
            "--listen",
            "127.0.0.1:0",
            "--replica",
            "bk",
            "--guest-pages",
            "64",
        ],
        &d,
        2,
        "the replica already holds 3 committed epochs; use an empty directory",
    );
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn client_that_never_connects_exits_with_the_io_code() {
    let d = scratch("client");
    let addr = free_port();
    let err = fails(
        &[
            "client",
            "--connect",
            &addr,
            "--ops",
            "3",
            "--connect-timeout",
            "0.2",
        ],
        &d,
        3,
        "the service was never reached",
    );
    assert!(err.contains(&format!("cannot connect to {addr}")), "{err}");
    let o = doppel(
        &[
            "client",
            "--connect",
            &addr,
            "--ops",
            "3",
            "--connect-timeout",
            "0.2",
        ],
        &d,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("answered=0") && out.contains("result=fail"),
        "{out}"
    );
}

#[test]
fn client_whose_service_goes_away_exits_peer_gone() {
    let d = scratch("client-gone");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    // A service that accepts, reads a little and hangs up unanswered.
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 32];
        let _ = c.read(&mut b);
    });
    fails(
        &[
            "client",
            "--connect",
            &addr,
            "--ops",
            "3",
            "--connect-timeout",
            "2",
        ],
        &d,
        4,
        "the service went away before answering everything",
    );
    t.join().unwrap();
}

/// A file-replica backup fed a stream slowly: it logs its totals at info
/// about once a second (stderr is not a terminal here), then ends.
#[test]
fn file_backup_logs_progress_without_verbose() {
    let d = scratch("progress");
    let spec = SynthSpec {
        epochs: 6,
        pages: 64,
        dirty: 8,
        seed: 5,
    };
    let (_, bytes, lay) = synth::stream_bytes(&spec);
    let mut child = Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["backup", "--listen", "127.0.0.1:0", "--replica", "bk"])
        .args(["--guest-pages", "64", "--accept-timeout", "20"])
        .current_dir(&d)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let addr = line.strip_prefix("listening on ").expect(&line).to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut acks = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = acks.read_to_end(&mut v);
    });
    // Two epochs, a pause longer than the progress interval, the rest.
    let cut = lay.checkpoint_ends[1] as usize;
    s.write_all(&bytes[..cut]).unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    s.write_all(&bytes[cut..]).unwrap();
    drop(s);
    let st = child.wait().unwrap();
    drain.join().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(st.success(), "{err}");
    assert!(
        rest.contains("backup: last committed epoch 5 (6 epochs)"),
        "{rest}"
    );
    // The first commit after the pause reports three epochs.
    assert!(
        err.contains("backup: 3 epochs committed"),
        "no progress line:\n{err}"
    );
}

#[test]
fn sim_hv_numbers_are_bounded() {
    // Before: a 2^64-page guest panicked, more dirty pages than the guest
    // has made the simulator search for distinct pages forever, and
    // `keys + 1` overflowed (a panic in this debug build) before the keys
    // were checked; the parser now refuses them, and the check of keys
    // against the guest's pages stays (exit 3).
    let d = scratch("simhv");
    let max = "18446744073709551615";
    for (args, code, msg) in [
        (&["--guest-pages", max][..], 2, "is not in 1..=1048576"),
        (
            &["--guest-pages", "16", "--dirty", "17"],
            2,
            "--dirty 17 is more than the guest's 16 pages",
        ),
        (
            &["--service", "kv", "--epoch-ms", "0"],
            2,
            "0 is not in 1..=60000",
        ),
        (
            &["--service", "kv", "--keys", max],
            2,
            "18446744073709551615 is not in 1..=4096",
        ),
        (
            &["--service", "kv", "--keys", "64", "--guest-pages", "64"],
            3,
            "--keys 64 needs 1..=4096 keys and guest pages > keys (64)",
        ),
    ] {
        let mut all = vec!["sim-hv", "--machine-ram", "m.ram"];
        all.extend_from_slice(args);
        fails(&all, &d, code, msg);
    }
    assert!(files(&d).is_empty(), "{:?}", files(&d));
}
