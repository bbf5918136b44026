//! Remus end to end on the host (issue #7): two simulated hypervisors
//! (`doppel sim-hv --service kv` and `--standby`), `doppel backup
//! --standby-ram`, `doppel primary --serve-clients` and `doppel client` as
//! processes. Something dies at a random moment after the client got
//! answers; the client must end with every request answered, nothing
//! acknowledged lost, no divergent reply, and the backup must have failed
//! over. Also: heartbeats on the stream, a malformed client frame, a
//! non-standby area given to `--standby-ram`.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doppel::ack::AckWriter;
use doppel::machine::MachineRam;
use doppel::primary::{Output, Primary, PrimaryConfig, PrimaryError};
use doppel::sim::{Sim, SimSpec};
use doppel::sim_kv::{KvSim, KvSpec};
use doppel::stream::format::rec;
use doppel::stream::{Limits, Record, StreamError, StreamReader, StreamWriter};
use doppel_abi::msg::LogDirtyMode;
use doppel_abi::{Command as HvCommand, Errno};

mod common;
use common::{failing_over_client, spawn_client, Proc};

fn scratch(name: &str) -> PathBuf {
    // Under the target directory (as replica_file.rs), not the system's
    // temporary directory: each run replaces the last one's files instead
    // of leaving a megabyte of guest RAM per test behind.
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("failover-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A TCP forwarder between the primary and the backup; `blackhole` makes
/// it stop forwarding in both directions while keeping both connections
/// open (the link is cut, nobody sees a FIN).
struct Proxy {
    addr: String,
    blackhole: Arc<AtomicBool>,
}

fn proxy(to: String) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let blackhole = Arc::new(AtomicBool::new(false));
    let bh = Arc::clone(&blackhole);
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let b = TcpStream::connect(&to).unwrap();
        for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
            let bh = Arc::clone(&bh);
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            if !bh.load(Ordering::Relaxed) {
                                let _ = into.shutdown(Shutdown::Write);
                            }
                            return;
                        }
                        Ok(n) => {
                            if !bh.load(Ordering::Relaxed) && into.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Proxy { addr, blackhole }
}

/// `doppel sim-hv` in `dir` creating `ram`: the KV service, or with
/// `standby` a standby for it (16 keys, 64 guest pages, 60 s at most),
/// with `extra` arguments; returns once it published its control area.
fn sim_hv(dir: &Path, ram: &str, standby: bool, extra: &[&str]) -> Proc {
    let (name, mode, published): (_, &[&str], _) = if standby {
        ("sim-hv standby", &["--standby"], "standby")
    } else {
        ("sim-hv primary", &["--service", "kv"], "kv service")
    };
    let mut a = vec!["sim-hv", "--machine-ram", ram];
    a.extend(mode);
    a.extend(["--keys", "16", "--guest-pages", "64", "--max-secs", "60"]);
    a.extend(extra);
    let p = Proc::spawn(name, dir, &a);
    p.wait_line(&format!("sim-hv: {published} control area published"), 10);
    p
}

/// `doppel backup` in `dir` onto the standby area in `standby_ram`,
/// listening and serving clients on free ports, with `extra` arguments.
fn spawn_backup(dir: &Path, standby_ram: &str, extra: &[&str]) -> Proc {
    let mut a = vec![
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--standby-ram",
        standby_ram,
        "--serve-clients",
        "127.0.0.1:0",
    ];
    a.extend(extra);
    Proc::spawn("backup", dir, &a)
}

/// The replicated service, started in order: both simulated hypervisors
/// (the KV service's on p.ram, a standby on s.ram), `doppel backup` on the
/// standby, `doppel primary` on the service replicating to the backup
/// (through a [`Proxy`] with `Extra::proxy`), both serving clients.
struct Pipeline {
    dir: PathBuf,
    sim_primary: Proc,
    _sim_standby: Proc,
    backup: Proc,
    primary: Proc,
    /// Where the primary and the backup serve clients.
    pclients: String,
    bclients: String,
    proxy: Option<Proxy>,
}

/// Extra arguments for the processes of a [`Pipeline`].
#[derive(Default)]
struct Extra<'a> {
    sim_primary: &'a [&'a str],
    backup: &'a [&'a str],
    primary: &'a [&'a str],
    proxy: bool,
    /// Runs in the scratch directory once the standby published its
    /// area, before the backup starts.
    on_standby: Option<fn(&Path)>,
}

fn pipeline(name: &str, x: Extra<'_>) -> Pipeline {
    let dir = scratch(name);
    let sim_primary = sim_hv(&dir, "p.ram", false, x.sim_primary);
    let sim_standby = sim_hv(&dir, "s.ram", true, &[]);
    if let Some(f) = x.on_standby {
        f(&dir);
    }
    let backup = spawn_backup(&dir, "s.ram", x.backup);
    let listen = backup.addr("listening on ");
    let bclients = backup.addr("clients on ");
    let proxy = x.proxy.then(|| proxy(listen.clone()));
    let to = proxy.as_ref().map_or(listen, |p| p.addr.clone());
    let (primary, pclients) = common::spawn_primary(&dir, "p.ram", &to, x.primary);
    Pipeline {
        dir,
        sim_primary,
        _sim_standby: sim_standby,
        backup,
        primary,
        pclients,
        bclients,
        proxy,
    }
}

const OPS: &str = "4000";

/// The primary's short timeouts and 20 ms heartbeats for a quick failover.
const FAST_PRIMARY: &[&str] = &[
    "--event-timeout",
    "1",
    "--reply-timeout",
    "1",
    "--ack-timeout",
    "4",
    "--heartbeat-ms",
    "20",
];

/// A failover run: 20 ms epochs, short timeouts and heartbeats, and a
/// client of [`OPS`] requests that fails over to the backup; once the
/// client got answers (plus a random delay), `break_it` breaks the primary
/// side. Then [`check_outcome`]: its lines are returned.
fn fail_over(
    name: &str,
    with_proxy: bool,
    break_it: impl FnOnce(&mut Pipeline),
) -> (Pipeline, String, String) {
    fail_over_with(name, with_proxy, None, break_it)
}

/// [`fail_over`], with `on_standby` run before the backup starts.
fn fail_over_with(
    name: &str,
    with_proxy: bool,
    on_standby: Option<fn(&Path)>,
    break_it: impl FnOnce(&mut Pipeline),
) -> (Pipeline, String, String) {
    let mut p = pipeline(
        name,
        Extra {
            sim_primary: &["--epoch-ms", "20"],
            backup: &["--heartbeat-timeout", "1.5"],
            primary: FAST_PRIMARY,
            proxy: with_proxy,
            on_standby,
        },
    );
    let mut client = failing_over_client(&p.dir, &p.pclients, OPS, &p.bclients);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let extra = u64::from(nanos % 400);
    eprintln!("breaking after the first progress line + {extra} ms");
    std::thread::sleep(Duration::from_millis(extra));
    break_it(&mut p);
    let (last, fail) = check_outcome(&p, &mut client);
    (p, last, fail)
}

/// The client passed with one failover; the backup printed its line.
fn check_outcome(p: &Pipeline, client: &mut Proc) -> (String, String) {
    let st = client.wait_exit(20);
    let last = client.lines().last().cloned().unwrap_or_default();
    eprintln!("client: {last}");
    assert!(
        last.starts_with(&format!("client: ops={OPS} answered={OPS} "))
            && last.contains(" failovers=1 lost_acked=0 divergent=0 ")
            && last.ends_with(&format!("last_version={OPS} result=pass")),
        "client line {last:?}\nclient stderr: {:#?}\nbackup stderr: {:#?}",
        client.err_lines(),
        p.backup.err_lines()
    );
    assert!(st.success(), "client exit {st:?}");
    // The backup printed it before it served the client, but its
    // collector may not have read it yet: wait for it.
    let fail = p.backup.wait_line("failover: ", 10);
    eprintln!("backup: {fail}");
    (last, fail)
}

/// The epochs named in `failover: ... after epoch E; ... committed epoch C`.
fn failover_epochs(line: &str) -> (u64, u64) {
    let num = |key: &str| -> u64 {
        let at = line.find(key).unwrap() + key.len();
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num("after epoch "), num("committed epoch "))
}

#[test]
fn simulated_primary_hypervisor_dies() {
    let (mut p, _, fail) = fail_over("hvdies", false, |p| p.sim_primary.kill9());
    // The primary tool closes the connection when its hypervisor stays
    // silent for --event-timeout; if the hypervisor died while a command
    // was pending, no heartbeat goes out meanwhile and the backup's
    // --heartbeat-timeout may come first.
    assert!(
        fail.contains("primary lost (connection closed)")
            || fail.contains("primary lost (nothing received for 1.5 s)"),
        "{fail}"
    );
    let (after, from) = failover_epochs(&fail);
    assert_eq!(after, from);
    // The primary noticed the silent hypervisor: exit 4 (and closed the
    // backup connection, which is how the backup learned of it).
    let st = p.primary.wait_exit(10);
    assert_eq!(st.code(), Some(4), "{:#?}", p.primary.err_lines());
    assert!(
        p.primary
            .err_lines()
            .iter()
            .any(|l| l.contains("the hypervisor stopped answering")),
        "{:#?}",
        p.primary.err_lines()
    );
}

#[test]
fn primary_tool_dies() {
    let (_p, _, fail) = fail_over("tooldies", false, |p| p.primary.kill9());
    // Noticed at once, not by the heartbeat timeout: a close, or a reset
    // when the killed tool had acks it had not read yet (seen once under
    // load: the socket of a process killed with unread data resets).
    assert!(
        [
            "primary lost (connection closed)",
            "primary lost (connection failed: ",
            "primary lost (acknowledging failed: ",
        ]
        .iter()
        .any(|r| fail.contains(r)),
        "{fail}"
    );
}

#[test]
fn replication_link_cut_fails_over_on_silence() {
    let mut cut = Instant::now();
    let (mut p, last, fail) = fail_over("blackhole", true, |p| {
        let proxy = p.proxy.as_ref().unwrap();
        proxy.blackhole.store(true, Ordering::Relaxed);
        cut = Instant::now();
    });
    assert!(
        fail.contains("primary lost (nothing received for 1.5 s)"),
        "{fail}"
    );
    // Split brain: the primary still runs its guest, but cannot get the
    // backup's ack, so nothing is committed until it gives the backup up
    // (--ack-timeout); then it serves on unprotected (Remus's rule: a
    // lost backup must not take the service down) and keeps trying to
    // reach a backup. Without a witness both sides now serve (README).
    let lost = p.primary.wait_line("primary: backup lost (", 15);
    eprintln!(
        "link cut: {lost} ({:.1} s after the cut)",
        cut.elapsed().as_secs_f64()
    );
    assert!(
        lost.contains("(back channel, waiting for the ack of epoch")
            && lost.ends_with("; serving unprotected"),
        "{lost}"
    );
    assert!(
        p.primary.child.try_wait().unwrap().is_none(),
        "it serves on"
    );
    // Stopped, it ends in order and says it served unprotected: exit 5.
    let st = Command::new("kill")
        .args(["-INT", &p.primary.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let st = p.primary.wait_exit(15);
    assert_eq!(st.code(), Some(5), "{:#?}", p.primary.err_lines());
    let lines = p.primary.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("primary: unprotected for ")
                && l.contains("backup lost 1 times, re-protected 0 times")),
        "{lines:#?}"
    );
    assert!(last.contains("result=pass"));
}

/// Send `sig` (`-STOP`, `-CONT`) to process `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}: {st:?}");
}

/// A hypervisor that stops answering (here: its simulator stopped with
/// SIGSTOP, as a hung hypervisor or a stopped emulator) freezes its
/// liveness counter; the primary tool, still alive and waiting for the
/// next event with the default 120 s --event-timeout, stops sending
/// heartbeats, and the backup fails over within its --heartbeat-timeout.
/// Before the liveness counter the tool kept beating for the hypervisor
/// until its event timeout, and no failover came in time.
#[test]
fn a_stopped_hypervisor_is_failed_over_within_the_heartbeat_timeout() {
    let mut p = pipeline(
        "hvstopped",
        Extra {
            sim_primary: &["--epoch-ms", "20"],
            backup: &["--heartbeat-timeout", "1.5"],
            primary: &["--ack-timeout", "4", "--heartbeat-ms", "20"],
            ..Extra::default()
        },
    );
    let mut client = failing_over_client(&p.dir, &p.pclients, OPS, &p.bclients);
    let pid = p.sim_primary.child.id();
    signal(pid, "-STOP");
    let stopped = Instant::now();
    let fail = p.backup.wait_line("failover: ", 10);
    let took = stopped.elapsed();
    eprintln!("backup: {fail} ({:.2} s after SIGSTOP)", took.as_secs_f64());
    assert!(
        fail.contains("primary lost (nothing received for 1.5 s)"),
        "{fail}"
    );
    // Within the heartbeat timeout (plus one heartbeat interval and
    // scheduling slack), far below the 120 s event timeout.
    assert!(took < Duration::from_secs(5), "failover after {took:?}");
    let (last, _) = check_outcome(&p, &mut client);
    assert!(last.contains("result=pass"), "{last}");
    // The primary tool is still waiting for its hypervisor (event timeout
    // 120 s): it noticed nothing itself, it only stopped vouching for it.
    assert!(p.primary.child.try_wait().unwrap().is_none());
    signal(pid, "-CONT");
}

/// A chain A -> B -> C on simulated hypervisors: `doppel primary` on A
/// protects to B's `doppel backup --then-backup` C; A's hypervisor dies,
/// B activates and protects itself to C (C commits epochs of B), B's
/// hypervisor dies, C activates. One client with `--failover B,C` sees
/// every request answered, nothing lost or divergent, two failovers.
#[test]
fn a_chain_fails_over_twice_and_the_client_loses_nothing() {
    let dir = scratch("chain");
    let mut sim_a = sim_hv(&dir, "a.ram", false, &["--epoch-ms", "20"]);
    let mut sim_b = sim_hv(&dir, "b.ram", true, &["--epoch-ms", "20"]);
    let _sim_c = sim_hv(&dir, "c.ram", true, &[]);
    let backup_c = spawn_backup(&dir, "c.ram", &["--heartbeat-timeout", "1.5"]);
    let c_listen = backup_c.addr("listening on ");
    let c_clients = backup_c.addr("clients on ");
    let backup_b = spawn_backup(
        &dir,
        "b.ram",
        &["--heartbeat-timeout", "1.5", "--then-backup", &c_listen],
    );
    let b_listen = backup_b.addr("listening on ");
    let b_clients = backup_b.addr("clients on ");
    let (_primary, a_clients) =
        common::spawn_primary(&dir, "a.ram", &b_listen, &["--heartbeat-ms", "20"]);
    let ops = "6000";
    let failover = format!("{b_clients},{c_clients}");
    let mut client = failing_over_client(&dir, &a_clients, ops, &failover);
    sim_a.kill9();
    let first = backup_b.wait_line("failover: ", 10);
    backup_b.wait_line("chain: protecting the activated standby to ", 10);
    // C commits epochs of B's service before B dies.
    backup_c.log.poll("no epoch of B committed", 15, 10, || {
        backup_c
            .err_lines()
            .iter()
            .any(|l| l.contains("backup: committed epoch 2 "))
            .then_some(())
    });
    sim_b.kill9();
    let second = backup_c.wait_line("failover: ", 10);
    eprintln!("B: {first}\nC: {second}");
    let st = client.wait_exit(30);
    let last = client.lines().last().cloned().unwrap_or_default();
    assert!(
        last.starts_with(&format!("client: ops={ops} answered={ops} "))
            && last.contains(" failovers=2 lost_acked=0 divergent=0 ")
            && last.ends_with("result=pass"),
        "client line {last:?}\nclient stderr: {:#?}\nB stderr: {:#?}\nC stderr: {:#?}",
        client.err_lines(),
        backup_b.err_lines(),
        backup_c.err_lines()
    );
    assert!(st.success(), "client exit {st:?}");
}

#[test]
fn malformed_client_frame_drops_the_connection_not_the_primary() {
    let mut p = pipeline("badframe", Extra::default());
    let mut s = TcpStream::connect(&p.pclients).unwrap();
    let mut junk = [0x5au8; 32];
    junk[8] = 1;
    s.write_all(&junk).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 48];
    let n = s.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "the connection is closed, no reply");
    p.primary.wait_err("malformed request frame", 5);
    assert!(
        p.primary.child.try_wait().unwrap().is_none(),
        "the primary still runs"
    );
    // A well-behaved client is served afterwards.
    let mut c = spawn_client(&p.dir, &p.pclients, "200", &["--reply-timeout", "5"]);
    assert!(c.wait_exit(20).success(), "{:#?}", c.err_lines());
    let last = c.lines().last().cloned().unwrap();
    assert_eq!(
        last,
        "client: ops=200 answered=200 replays=0 failovers=0 lost_acked=0 divergent=0 \
         last_version=200 result=pass"
    );
}

/// A primary tool pointed at the standby's RAM, before its backup starts:
/// `doppel primary` refuses with a clear error (sending nothing), and a
/// `LogDirtyEnable` sent anyway is refused by the (simulated) hypervisor
/// with EPERM. Neither takes the standby's rings.
fn point_a_primary_at_the_standby(dir: &Path) {
    let mut p = Proc::spawn(
        "primary on the standby",
        dir,
        &[
            "primary",
            "--machine-ram",
            "s.ram",
            "--backup",
            "127.0.0.1:1",
            "--wait-control",
            "2",
        ],
    );
    let st = p.wait_exit(10);
    let err = p.err_lines().join("\n");
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("this machine is a standby; `doppel primary` replicates a running primary"),
        "{err}"
    );
    // A tool that does not check the features: the hypervisor refuses.
    let m = MachineRam::open(&dir.join("s.ram")).unwrap();
    let ctl = m.find_control().unwrap();
    assert!(matches!(
        Primary::attach(&m, ctl, PrimaryConfig::default()),
        Err(PrimaryError::Standby { .. })
    ));
    let mut rogue = Primary::attach_standby(&m, ctl, PrimaryConfig::default()).unwrap();
    let r = rogue.command(
        HvCommand::LogDirtyEnable {
            mode: LogDirtyMode::WriteProtect,
        },
        "LogDirtyEnable",
    );
    assert!(
        matches!(
            r,
            Err(PrimaryError::CommandFailed {
                errno: Errno::EPERM,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn a_primary_pointed_at_the_standby_is_refused_and_the_standby_still_fails_over() {
    let (_p, _, fail) = fail_over_with(
        "primaryonstandby",
        false,
        Some(point_a_primary_at_the_standby),
        |p| p.sim_primary.kill9(),
    );
    // The backup filled the standby and its Activate was accepted.
    let (after, from) = failover_epochs(&fail);
    assert_eq!(after, from);
}

#[test]
fn standby_ram_must_be_a_standby() {
    let dir = scratch("notstandby");
    let _sim = sim_hv(&dir, "p.ram", false, &[]);
    let mut b = spawn_backup(&dir, "p.ram", &["--wait-control", "2"]);
    let st = b.wait_exit(10);
    assert_eq!(st.code(), Some(1));
    let err = b.err_lines().join("\n");
    assert!(
        err.contains("is not a standby's")
            && err.contains("STANDBY missing")
            && err.contains("mode=standby"),
        "{err}"
    );
    assert!(b.lines().iter().all(|l| !l.starts_with("listening on")));
}

#[test]
fn heartbeats_flow_between_epochs_and_never_into_a_capture() {
    // Live: a KV simulator with slow epochs, a primary with a 5 ms
    // heartbeat, and an in-test backup that reads the stream and acks.
    let dir = scratch("beats");
    let ram = dir.join("p.ram");
    let spec = KvSpec {
        guest_pages: 32,
        keys: 4,
        epoch: Duration::from_millis(150),
        seed: 3,
        standby: false,
        max_run: Duration::from_secs(30),
    };
    let sim = KvSim::create(&ram, spec).unwrap();
    let stop = AtomicBool::new(false);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let ((beats, last), wire) = std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let bk = s.spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut acks = AckWriter::new(c.try_clone().unwrap()).unwrap();
            // Keep a copy of the wire bytes to check each heartbeat's value.
            let mut wire = Vec::new();
            let tee = Tee {
                inner: BufReader::new(c),
                copy: &mut wire,
            };
            let mut r = StreamReader::open(tee, Limits { guest_pages: 32 }).unwrap();
            let mut epoch = 0;
            while !r.ended() {
                match r.next_record() {
                    Ok(Record::Checkpoint) => {
                        acks.ack(epoch).unwrap();
                        epoch += 1;
                    }
                    Ok(_) => {}
                    Err(e) => panic!("backup reader: {e}"),
                }
            }
            acks.end().unwrap();
            let beats = r.heartbeats();
            drop(r);
            (beats, wire)
        });
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        let cfg = PrimaryConfig {
            epochs: Some(4),
            reply_timeout: Duration::from_secs(10),
            event_timeout: Duration::from_secs(10),
            stop: None,
            gate: None,
        };
        let mut p = Primary::attach(&m, ctl, cfg).unwrap();
        let conn = TcpStream::connect(addr).unwrap();
        let acks = doppel::ack::AckReader::open(conn.try_clone().unwrap(), 0).unwrap();
        let mut out = Output::backup(conn, acks).with_heartbeat(Duration::from_millis(5));
        let sum = p.run(&mut out, |_| {}).unwrap();
        assert_eq!(sum.committed, 4);
        let got = bk.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        simt.join().unwrap();
        got
    });
    // Three waits of ~150 ms between epochs at one beat per >= 5 ms.
    assert!(beats >= 30, "{beats} heartbeats");
    // Each heartbeat names the epochs the primary had committed while it
    // waited: those whose CHECKPOINT went out (and was acked) before it.
    let seen = heartbeats_on_wire(&wire);
    assert_eq!(seen.len() as u64, beats, "the reader counted every beat");
    for (i, &(before, value)) in seen.iter().enumerate() {
        assert_eq!(value, before, "heartbeat #{i} after {before} checkpoints");
    }
    // The waits between the 4 epochs the primary ran each carried beats
    // (after epochs 1, 2 and 3), and the last one named 3 committed epochs.
    let values: std::collections::BTreeSet<u64> = seen.iter().map(|&(_, v)| v).collect();
    assert!(
        [1, 2, 3].iter().all(|v| values.contains(v)) && values.iter().all(|&v| v <= 3),
        "heartbeat values {values:?}"
    );
    assert_eq!(last, 3, "the last heartbeat names {last} committed epochs");

    // Capture: the same request is ignored.
    let ram = dir.join("c.ram");
    let spec = SimSpec {
        guest_pages: 64,
        epochs: 3,
        ..SimSpec::default()
    };
    let sim = Sim::create(&ram, spec).unwrap();
    let stop = AtomicBool::new(false);
    let bytes = std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        let cfg = PrimaryConfig {
            epochs: Some(3),
            ..PrimaryConfig::default()
        };
        let mut p = Primary::attach(&m, ctl, cfg).unwrap();
        let mut out: Output<_, std::io::Empty> =
            Output::record(Vec::new()).with_heartbeat(Duration::ZERO);
        p.run(&mut out, |_| {}).unwrap();
        stop.store(true, Ordering::Relaxed);
        simt.join().unwrap();
        out.writer_mut().get_mut().clone()
    });
    let types = record_types(&bytes);
    assert_eq!(types.iter().filter(|&&t| t == rec::CHECKPOINT).count(), 3);
    assert!(!types.contains(&rec::DOPPEL_HEARTBEAT), "{types:x?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reader that keeps a copy of everything it reads.
struct Tee<'a, R> {
    inner: R,
    copy: &'a mut Vec<u8>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Every DOPPEL_HEARTBEAT of a stream (after the 40 header bytes): the
/// CHECKPOINT records before it and its value.
fn heartbeats_on_wire(b: &[u8]) -> Vec<(u64, u64)> {
    let mut at = 40;
    let (mut checkpoints, mut out) = (0, Vec::new());
    while at + 8 <= b.len() {
        let rtype = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        match rtype {
            rec::CHECKPOINT => checkpoints += 1,
            rec::DOPPEL_HEARTBEAT => {
                let v = u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap());
                out.push((checkpoints, v));
            }
            _ => {}
        }
        at += 8 + len.next_multiple_of(8);
    }
    out
}

/// Record types of a capture (after the 40 header bytes).
fn record_types(b: &[u8]) -> Vec<u32> {
    let mut at = 40;
    let mut t = Vec::new();
    while at + 8 <= b.len() {
        let rtype = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        t.push(rtype);
        at += 8 + len.next_multiple_of(8);
    }
    t
}

#[test]
fn heartbeat_is_accepted_only_between_epochs() {
    let epoch = |w: &mut StreamWriter<Vec<u8>>| {
        w.tsc_info(&Default::default()).unwrap();
        w.hvm_context(&[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        w.hvm_params(&[]).unwrap();
    };
    let mut w = StreamWriter::new(Vec::new());
    w.headers(4, 17).unwrap();
    w.static_data_end().unwrap();
    w.heartbeat(0).unwrap();
    epoch(&mut w);
    w.checkpoint().unwrap();
    w.heartbeat(1).unwrap();
    w.heartbeat(1).unwrap();
    w.end().unwrap();
    let good = w.into_inner();
    let mut r = StreamReader::open(&good[..], Limits { guest_pages: 8 }).unwrap();
    let mut recs = Vec::new();
    while !r.ended() {
        recs.push(r.next_record().unwrap());
    }
    // Heartbeats are consumed by the reader, never handed out.
    assert_eq!(
        recs.iter()
            .filter(|r| !matches!(
                r,
                Record::TscInfo(_) | Record::HvmContext(_) | Record::HvmParams(_)
            ))
            .cloned()
            .collect::<Vec<_>>(),
        [Record::StaticDataEnd, Record::Checkpoint, Record::End]
    );
    assert_eq!(r.heartbeats(), (3, 1));

    // Inside an epoch: refused.
    let mut w = StreamWriter::new(Vec::new());
    w.headers(4, 17).unwrap();
    w.static_data_end().unwrap();
    w.tsc_info(&Default::default()).unwrap();
    w.heartbeat(0).unwrap();
    let bad = w.into_inner();
    let mut r = StreamReader::open(&bad[..], Limits { guest_pages: 8 }).unwrap();
    r.next_record().unwrap();
    r.next_record().unwrap();
    let e = r.next_record().unwrap_err();
    assert!(matches!(e, StreamError::OutOfOrder { .. }), "{e}");

    // Reserved word set: refused.
    let mut w = StreamWriter::new(Vec::new());
    w.headers(4, 17).unwrap();
    w.static_data_end().unwrap();
    w.record(
        rec::DOPPEL_HEARTBEAT,
        &[&[0u8; 8], &[1u8, 0, 0, 0, 0, 0, 0, 0]],
    )
    .unwrap();
    let bad = w.into_inner();
    let mut r = StreamReader::open(&bad[..], Limits { guest_pages: 8 }).unwrap();
    r.next_record().unwrap();
    let e = r.next_record().unwrap_err();
    assert!(matches!(e, StreamError::Reserved { .. }), "{e}");
}

/// The last `client: answered N/M` count the client printed.
fn client_answered(c: &Proc) -> u64 {
    c.err_lines()
        .iter()
        .rev()
        .find_map(|l| {
            let rest = l.split("client: answered ").nth(1)?;
            rest.split('/').next()?.parse().ok()
        })
        .unwrap_or(0)
}

#[test]
fn a_lost_backup_leaves_the_primary_serving_until_a_new_backup_protects_it() {
    // The KV service replicated to a file backup; the backup is killed
    // mid-run. The primary must keep answering the client (unprotected),
    // and protect the guest again with a full epoch 0 once a backup
    // listens on the same address again.
    let dir = scratch("backuploss");
    let _sim = sim_hv(&dir, "p.ram", false, &["--epoch-ms", "20"]);
    let file_backup = |listen: &str, replica: &str| {
        Proc::spawn(
            "backup",
            &dir,
            &[
                "backup",
                "--listen",
                listen,
                "--replica",
                replica,
                "--guest-pages",
                "64",
            ],
        )
    };
    let mut first = file_backup("127.0.0.1:0", "r1");
    let listen = first.addr("listening on ");
    let (mut primary, pclients) = common::spawn_primary(
        &dir,
        "p.ram",
        &listen,
        &["--ack-timeout", "4", "--heartbeat-ms", "20"],
    );
    let mut client = spawn_client(
        &dir,
        &pclients,
        "12000",
        // No failover address: a reply timeout would end the client, so
        // it is long enough for a loaded machine (a CI run failed once
        // with 5 s); stalls are caught by the 10 s progress checks below.
        &[
            "--window",
            "16",
            "--reply-timeout",
            "20",
            "--connect-timeout",
            "20",
        ],
    );
    client.wait_err("client: answered", 15);
    first.kill9();
    let lost = primary.wait_line("primary: backup lost (", 10);
    assert!(lost.ends_with("; serving unprotected"), "{lost}");
    // Served unprotected: the client's count grows with no backup at all.
    let at_loss = client_answered(&client);
    client.log.poll("no answers while unprotected", 10, 50, || {
        (client_answered(&client) > at_loss + 50).then_some(())
    });
    assert!(primary.child.try_wait().unwrap().is_none());
    // A new backup on the same address: a fresh session, whose epoch 0
    // the backup checks carries all 64 pages (else it exits 1).
    let mut second = file_backup(&listen, "r2");
    second.addr("listening on ");
    let again = primary.wait_line("primary: re-protected by ", 10);
    assert_eq!(
        again,
        format!("primary: re-protected by {listen} (new session)")
    );
    second.wait_err("epochs committed", 10);
    let st = client.wait_exit(60);
    let last = client.lines().last().cloned().unwrap_or_default();
    assert!(
        st.success()
            && last.contains(" lost_acked=0 divergent=0 ")
            && last.ends_with("result=pass"),
        "{last}\n{:#?}",
        client.err_lines()
    );
    // Stopped in order: END reaches the new backup (exit 0, epochs
    // committed), and the primary's exit status says it was unprotected
    // for a while (5).
    let st = Command::new("kill")
        .args(["-INT", &primary.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let pst = primary.wait_exit(15);
    let bst = second.wait_exit(15);
    let plines = primary.lines();
    assert_eq!(pst.code(), Some(5), "{plines:#?}");
    assert!(
        plines
            .iter()
            .any(|l| l.starts_with("primary: unprotected for ")
                && l.ends_with(
                    "backup lost 1 times, re-protected 1 times; protected at the end: yes"
                )),
        "{plines:#?}"
    );
    assert!(bst.success(), "{:#?}", second.err_lines());
    let done = second.wait_line("backup: last committed epoch ", 5);
    let n: u64 = done
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(n >= 2, "{done}");
}

#[test]
fn a_reprotected_guest_fails_over_to_the_new_backup_consistently() {
    // The new backup after a loss is a standby: its state comes from the
    // re-protected session only (epoch 0 = the primary's mirror plus the
    // vCPU of that checkpoint, then deltas). The primary's hypervisor is
    // then killed: the standby must activate (the simulated standby checks
    // that the guest RAM's KV version and checksum match the blob's) and
    // the client, failing over to it, must lose no acknowledged answer.
    let dir = scratch("reprotect");
    let _sim = sim_hv(&dir, "p.ram", false, &["--epoch-ms", "20"]);
    let mut sim_standby = sim_hv(&dir, "s.ram", true, &[]);
    let mut first = Proc::spawn(
        "backup",
        &dir,
        &[
            "backup",
            "--listen",
            "127.0.0.1:0",
            "--replica",
            "r1",
            "--guest-pages",
            "64",
        ],
    );
    let listen = first.addr("listening on ");
    // The standby backup's client address, fixed now for the client's
    // --failover.
    let bclients = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (mut primary, pclients) = common::spawn_primary(&dir, "p.ram", &listen, FAST_PRIMARY);
    let mut client = failing_over_client(&dir, &pclients, "12000", &bclients);
    first.kill9();
    primary.wait_line("primary: backup lost (", 10);
    let second = spawn_backup_at(&dir, &listen, &bclients);
    primary.wait_line("primary: re-protected by ", 10);
    second.log.poll("no 3 epochs committed", 15, 20, || {
        (second
            .err_lines()
            .iter()
            .filter(|l| l.contains("backup: committed epoch "))
            .count()
            >= 3)
            .then_some(())
    });
    assert!(
        client.child.try_wait().unwrap().is_none(),
        "client done too early"
    );
    // The primary's host dies.
    let mut sim_primary = _sim;
    sim_primary.kill9();
    let fail = second.wait_line("failover: ", 15);
    assert!(
        fail.contains("standby activated from committed epoch"),
        "{fail}"
    );
    let st = client.wait_exit(30);
    let last = client.lines().last().cloned().unwrap_or_default();
    assert!(
        st.success()
            && last.contains(" failovers=1 lost_acked=0 divergent=0 ")
            && last.ends_with("result=pass"),
        "{last}\nclient: {:#?}\nstandby sim: {:#?}",
        client.err_lines(),
        sim_standby.err_lines()
    );
    let _ = sim_standby.child.kill();
    let _ = primary.child.kill();
}

/// `doppel backup --standby-ram s.ram` listening on `listen`, serving
/// clients on `clients`, with a 1.5 s heartbeat timeout.
fn spawn_backup_at(dir: &Path, listen: &str, clients: &str) -> Proc {
    Proc::spawn(
        "backup",
        dir,
        &[
            "backup",
            "--listen",
            listen,
            "--standby-ram",
            "s.ram",
            "--serve-clients",
            clients,
            "--heartbeat-timeout",
            "1.5",
        ],
    )
}
