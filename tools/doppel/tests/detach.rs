//! Detach and re-attach against the hypervisor simulators: a primary that
//! ends (epochs reached, event timeout, stop flag, signal) hands the guest
//! back with `Detach`, the simulated guest runs on unprotected with its
//! held output released, and a second primary attaches and replicates a
//! new session from epoch 0.

use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doppel::backup::receive;
use doppel::machine::MachineRam;
use doppel::primary::{EpochReport, Output, Primary, PrimaryConfig, PrimaryError};
use doppel::replica::Replica;
use doppel::sim::{Sim, SimResult, SimSpec};
use doppel::sim_kv::{KvSim, KvSpec};
use doppel::stream::{Limits, Record, StreamReader};
use doppel_abi::chan::{ChannelConsumer, ChannelProducer};
use doppel_abi::control::Field;
use doppel_abi::msg::{LogDirtyMode, Reply, UNPROTECTED_EPOCH};
use doppel_abi::ring::REQ_PROD;
use doppel_abi::service::{op, Request};
use doppel_abi::{Command, SharedMem};
use zerocopy::IntoBytes;

const BIN: &str = env!("CARGO_BIN_EXE_doppel");
const PAGES: u64 = 128;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("detach-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg(epochs: Option<u64>) -> PrimaryConfig {
    PrimaryConfig {
        epochs,
        reply_timeout: Duration::from_secs(20),
        event_timeout: Duration::from_secs(20),
        stop: None,
        gate: None,
    }
}

fn spec(epochs: u64) -> SimSpec {
    SimSpec {
        guest_pages: PAGES,
        epochs,
        dirty: 10,
        seed: 7,
        ..SimSpec::default()
    }
}

/// Read a capture to END: (checkpoints, pages per epoch).
fn read_capture(bytes: &[u8]) -> (u64, Vec<u64>) {
    let mut rd = StreamReader::open(bytes, Limits { guest_pages: PAGES }).unwrap();
    let (mut ckpts, mut pages, mut cur) = (0u64, Vec::new(), 0u64);
    while !rd.ended() {
        match rd.next_record().unwrap() {
            Record::PageData(p) => cur += p.count() as u64,
            Record::Checkpoint => {
                ckpts += 1;
                pages.push(cur);
                cur = 0;
            }
            Record::End => {}
            _ => {}
        }
    }
    rd.expect_eof().unwrap();
    (ckpts, pages)
}

/// One primary session on `ram` through the library, as the CLI runs it:
/// run, then Detach. The capture bytes, the run's result and the reports.
fn session(
    ram: &Path,
    cfg: PrimaryConfig,
    on_epoch: impl FnMut(&EpochReport),
) -> (Vec<u8>, Result<doppel::primary::Summary, PrimaryError>) {
    let m = MachineRam::open(ram).unwrap();
    let ctl = m.find_control().unwrap();
    let mut p = Primary::attach(&m, ctl, cfg).unwrap();
    let mut out: Output<_, std::io::Empty> = Output::record(Vec::new());
    let r = p.run(&mut out, on_epoch);
    p.detach(Duration::from_secs(10)).unwrap();
    (out.writer_mut().get_mut().clone(), r)
}

#[test]
fn a_second_primary_attaches_after_the_first_detached() {
    let dir = scratch("second");
    let ram = dir.join("m.ram");
    let sim = Sim::create(&ram, spec(6)).unwrap();
    let stop = AtomicBool::new(false);
    let (res, first, second, refused) = std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let (first, r1) = session(&ram, cfg(Some(3)), |_| {});
        assert_eq!(r1.unwrap().committed, 3);
        let mut epochs = Vec::new();
        let (second, r2) = session(&ram, cfg(Some(3)), |r| epochs.push((r.epoch, r.pages)));
        let sum = r2.unwrap();
        assert_eq!(sum.committed, 3);
        // A new session: epochs from 0, epoch 0 with every page again.
        assert_eq!(epochs.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(epochs[0].1, PAGES);
        // Both detached: the simulator is done (6 committed, detached).
        let res: SimResult = simt.join().unwrap();
        // A third tool may attach again (the last answer is Detach).
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        let refused = Primary::attach(&m, ctl, cfg(None)).err();
        (res, first, second, refused)
    });
    assert_eq!(res.error, None);
    assert_eq!((res.committed, res.detaches), (6, 2));
    assert!(refused.is_none(), "{refused:?}");
    let (c1, p1) = read_capture(&first);
    let (c2, p2) = read_capture(&second);
    assert_eq!((c1, c2), (3, 3));
    assert_eq!((p1[0], p2[0]), (PAGES, PAGES));
    // The second session alone rebuilds the guest as the simulator last
    // staged it (the second session's epoch 2: with 6 checkpoints
    // committed or in flight it posts no more), so its epoch 0 carried
    // the guest as it ran on after the first detached, not the first's.
    // (Comparing the two streams proves nothing: each vCPU blob has a
    // random rax and each epoch a random dirty set.)
    let mut rep = Replica::in_memory(PAGES);
    let got = receive(&second[..], &mut rep, |_| Ok(()));
    assert!(got.error.is_none() && got.ended, "{got:?}");
    assert_eq!(rep.state().committed, 3);
    assert!(rep.memory().unwrap() == res.memory, "replica memory");
    assert_eq!(rep.state().hvm_context, res.blob);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_ring_left_without_detach_is_refused_until_the_owner_detaches() {
    let dir = scratch("refused");
    let ram = dir.join("m.ram");
    let sim = Sim::create(&ram, spec(4)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        let mut a = Primary::attach(&m, ctl, cfg(Some(2))).unwrap();
        let mut out: Output<_, std::io::Empty> = Output::record(Vec::new());
        a.run(&mut out, |_| {}).unwrap();
        // `a` has not detached: its last answer is CommitEpoch (op 7).
        let e = Primary::attach(&m, ctl, cfg(None)).err().unwrap();
        let text = e.to_string();
        assert!(text.contains("already in use"), "{text}");
        assert!(
            text.contains("the last command answered was op 7"),
            "{text}"
        );
        // Detaching twice: the second is refused (nothing attached).
        a.detach(Duration::from_secs(10)).unwrap();
        let again = a.detach(Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(again, PrimaryError::CommandFailed { cmd: "Detach", .. }),
            "{again}"
        );
        // The refused Detach is now the last answer: in use again.
        assert!(Primary::attach(&m, ctl, cfg(None)).is_err());
        stop.store(true, Ordering::Relaxed);
        let res = simt.join().unwrap();
        assert_eq!(res.error, None);
        assert_eq!((res.committed, res.detaches), (2, 1));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn after_detach_the_sim_guest_runs_on_and_posts_no_event() {
    let dir = scratch("runs-on");
    let ram = dir.join("m.ram");
    let sim = Sim::create(&ram, spec(100)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let (bytes, r) = session(&ram, cfg(Some(2)), |_| {});
        assert_eq!(r.unwrap().committed, 2);
        assert_eq!(read_capture(&bytes).0, 2);
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        let g = ctl.guest_ram();
        let mut before = vec![0u8; g.size as usize];
        let mut after = before.clone();
        let win = m.window(ctl.at as usize);
        let (eo, _) = ctl.view.region(Field::EventRing);
        let posted = win.load_u32(eo + REQ_PROD);
        m.mem().read_bytes(g.offset as usize, &mut before);
        std::thread::sleep(Duration::from_millis(100));
        m.mem().read_bytes(g.offset as usize, &mut after);
        assert_ne!(before, after, "the guest stopped after Detach");
        assert_eq!(win.load_u32(eo + REQ_PROD), posted, "an event after Detach");
        stop.store(true, Ordering::Relaxed);
        let res = simt.join().unwrap();
        assert_eq!(res.error, None);
        assert_eq!(res.detaches, 1);
        assert!(res.unprotected_runs > 0);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kv_sim_releases_held_replies_at_detach_and_answers_at_once_after() {
    let dir = scratch("kv");
    let ram = dir.join("m.ram");
    let sim = small_kv_sim(&ram, 64);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let m = MachineRam::open(&ram).unwrap();
        let ctl = m.find_control().unwrap();
        let win = m.window(ctl.at as usize);
        let (io, is) = ctl.view.region(Field::InputChannel);
        let (oo, os) = ctl.view.region(Field::OutputChannel);
        let mut inp = ChannelProducer::attach(win, io, is).unwrap();
        let mut outc = ChannelConsumer::attach(win, oo, os).unwrap();
        let mut p = Primary::attach(&m, ctl, cfg(None)).unwrap();
        let enable = Command::LogDirtyEnable {
            mode: LogDirtyMode::WriteProtect,
        };
        assert_eq!(p.command(enable, "LogDirtyEnable").unwrap(), Reply::Done);
        let send = |inp: &mut ChannelProducer<_>, id: u64| {
            let r = Request::new(id, op::ADD, id % 8, id);
            inp.write_record(0, r.as_bytes()).unwrap();
            inp.publish();
        };
        let mut buf = [0u8; 64];
        let mut take = |outc: &mut ChannelConsumer<_>, want: usize, limit: Duration| {
            let mut got = Vec::new();
            let t = Instant::now();
            while got.len() < want && t.elapsed() < limit {
                match outc.pop(&mut buf).unwrap() {
                    Some(info) => {
                        let rep = doppel_abi::service::Reply::parse(&buf[..info.len]).unwrap();
                        got.push((info.epoch, rep.id));
                    }
                    None => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            outc.publish();
            got
        };
        for id in 1..=5 {
            send(&mut inp, id);
        }
        // Nothing is committed: the replies are held.
        assert_eq!(take(&mut outc, 1, Duration::from_millis(300)), []);
        p.detach(Duration::from_secs(10)).unwrap();
        let released = take(&mut outc, 5, Duration::from_secs(5));
        let ids: Vec<u64> = (1..=5).collect();
        assert_eq!(
            released,
            ids.iter()
                .map(|&i| (UNPROTECTED_EPOCH, i))
                .collect::<Vec<_>>()
        );
        // Unprotected: a new request is answered with nothing committed.
        send(&mut inp, 6);
        assert_eq!(
            take(&mut outc, 1, Duration::from_secs(5)),
            [(UNPROTECTED_EPOCH, 6)]
        );
        stop.store(true, Ordering::Relaxed);
        let res = simt.join().unwrap();
        assert_eq!(res.error, None);
        assert_eq!((res.detaches, res.committed, res.released), (1, 0, 6));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_event_timeout_ends_the_capture_with_end() {
    let dir = scratch("timeout");
    let ram = dir.join("m.ram");
    // Two checkpoints, then the simulator posts nothing more.
    let sim = Sim::create(&ram, spec(2)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let c = PrimaryConfig {
            event_timeout: Duration::from_secs(1),
            ..cfg(None)
        };
        let (bytes, r) = session(&ram, c, |_| {});
        let e = r.unwrap_err();
        assert!(matches!(e, PrimaryError::Timeout { .. }), "{e}");
        assert_eq!(e.exit_code(), 4);
        let (ckpts, pages) = read_capture(&bytes);
        assert_eq!((ckpts, pages[0]), (2, PAGES));
        let res = simt.join().unwrap();
        assert_eq!(res.error, None);
        assert_eq!((res.committed, res.detaches), (2, 1));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_stop_flag_ends_the_run_at_an_epoch_boundary_with_end() {
    let dir = scratch("stop");
    let ram = dir.join("m.ram");
    let sim = Sim::create(&ram, spec(1000)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let flag = Arc::new(AtomicBool::new(false));
        let c = PrimaryConfig {
            stop: Some(Arc::clone(&flag)),
            ..cfg(None)
        };
        // "Ctrl-C" after the 4th commit.
        let (bytes, r) = session(&ram, c, |rep| {
            if rep.epoch == 3 {
                flag.store(true, Ordering::Relaxed);
            }
        });
        let sum = r.unwrap();
        assert!(sum.stopped);
        assert_eq!(sum.committed, 4);
        assert_eq!(read_capture(&bytes).0, 4);
        stop.store(true, Ordering::Relaxed);
        let res = simt.join().unwrap();
        assert_eq!(res.error, None);
        assert_eq!((res.committed, res.detaches), (4, 1));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// The binary: SIGINT during a capture gives exit 0, a capture ending in
/// END, and Detach (a second `doppel primary` then attaches).
#[test]
fn sigint_ends_a_recording_cleanly_and_detaches() {
    let dir = scratch("sigint");
    let ram = dir.join("m.ram");
    let mut sim = Proc::new(BIN)
        .args(["sim-hv", "--machine-ram"])
        .arg(&ram)
        .args(["--epochs", "100000", "--guest-pages", &PAGES.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ram.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rec = |name: &str, extra: &[&str]| {
        Proc::new(BIN)
            .args(["primary", "--machine-ram"])
            .arg(&ram)
            .arg("--record")
            .arg(dir.join(name))
            .args(["--wait-control", "10"])
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = rec("r1.bin", &[]);
    // Signal it once it has committed an epoch (its handler is installed
    // before it attaches). A fixed 700 ms sleep was not enough on a loaded
    // machine: no epoch committed yet, or no handler yet (killed by
    // SIGINT).
    let err = Lines::read(first.stderr.take().unwrap());
    let t = Instant::now();
    while !err
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(" committed: "))
    {
        assert!(t.elapsed() < Duration::from_secs(20), "no epoch committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Proc::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = first.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}: {stdout}\n{}",
        out.status,
        err.all().join("\n")
    );
    assert!(stdout.contains("primary: stopped by signal"), "{stdout}");
    assert!(stdout.contains("primary: detached"), "{stdout}");
    let committed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("primary: committed "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(committed > 0);
    let (ckpts, _) = read_capture(&std::fs::read(dir.join("r1.bin")).unwrap());
    assert_eq!(ckpts, committed);
    // The guest was handed back: another primary attaches.
    let second = rec("r2.bin", &["--epochs", "2"]);
    let out2 = second.wait_with_output().unwrap();
    assert!(
        out2.status.success(),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    assert_eq!(
        read_capture(&std::fs::read(dir.join("r2.bin")).unwrap()).0,
        2
    );
    let _ = sim.kill();
    let _ = sim.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failure_with_a_live_backup_leaves_the_guest_fenced() {
    // An event timeout while the backup is healthy: the backup gets no
    // END (a standby would activate), so the primary must not hand its
    // guest back; the ring stays owned and a second primary is refused.
    let dir = scratch("fenced");
    let ram = dir.join("m.ram");
    let mut sim = kv_sim(&ram, "4000", "60");
    let (mut backup, addr) = backup_into(&dir.join("bk"));
    let out = Proc::new(BIN)
        .args(["primary", "--machine-ram"])
        .arg(&ram)
        .args([
            "--backup",
            &addr,
            "--event-timeout",
            "1",
            "--wait-control",
            "10",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("primary: not detaching"),
        "{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("primary: detached"), "{stdout}");
    // No Detach went out: the ring still belongs to the failed session.
    let second = Proc::new(BIN)
        .args(["primary", "--machine-ram"])
        .arg(&ram)
        .arg("--record")
        .arg(dir.join("r2.bin"))
        .args(["--epochs", "1", "--wait-control", "5"])
        .output()
        .unwrap();
    let err2 = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err2}");
    assert!(err2.contains("already in use"), "{err2}");
    let _ = backup.kill();
    let _ = backup.wait();
    let _ = sim.kill();
    let _ = sim.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `doppel sim-hv` running the KV service over the machine RAM file `ram`.
fn kv_sim(ram: &Path, epoch_ms: &str, max_secs: &str) -> std::process::Child {
    Proc::new(BIN)
        .args(["sim-hv", "--machine-ram"])
        .arg(ram)
        .args([
            "--service",
            "kv",
            "--epoch-ms",
            epoch_ms,
            "--max-secs",
            max_secs,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `doppel backup` of a 512-page guest into `replica`, listening on a free
/// loopback port; returns it and the address it printed.
fn backup_into(replica: &Path) -> (std::process::Child, String) {
    let (backup, _, addr) = started(
        Proc::new(BIN)
            .args(["backup", "--listen", "127.0.0.1:0", "--replica"])
            .arg(replica)
            .args(["--guest-pages", "512", "--accept-timeout", "30"]),
        "listening on ",
    );
    (backup, addr)
}

/// Spawn `cmd` (stdout collected, stderr dropped) and wait for its stdout
/// line starting with `prefix`: the child, its stdout lines, and the rest
/// of that line.
fn started(cmd: &mut Proc, prefix: &str) -> (std::process::Child, Lines, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Lines::of(&mut child);
    let rest = wait_line(&lines.lines, prefix);
    (child, lines, rest)
}

/// A child's stdout lines, read into a shared list by a thread.
struct Lines {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Lines {
    fn of(child: &mut std::process::Child) -> Self {
        Self::read(child.stdout.take().unwrap())
    }

    fn read(out: impl std::io::Read + Send + 'static) -> Self {
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                let Ok(l) = l else { break };
                l2.lock().unwrap().push(l);
            }
        });
        Self { lines, reader }
    }

    /// Every line, once the pipe is at its end. A child that has exited
    /// may still have lines in the pipe that the reader has not taken
    /// yet: looking at the list right after `wait()` can miss the last
    /// ones (the counts line this file checks, issue 17).
    fn all(self) -> Vec<String> {
        self.reader.join().unwrap();
        Arc::into_inner(self.lines).unwrap().into_inner().unwrap()
    }
}

/// Waits for a line starting with `prefix` and returns the rest.
fn wait_line(lines: &std::sync::Mutex<Vec<String>>, prefix: &str) -> String {
    let t = Instant::now();
    loop {
        if let Some(l) = lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
        {
            return l.trim().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no {prefix:?} line");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_primary_serves_clients_after_the_first_detached() {
    // Two sessions of backup + primary --serve-clients + client on one
    // KV hypervisor. The second tool must write requests after the first
    // one's and not pass on the first one's output.
    let dir = scratch("clients");
    let ram = dir.join("m.ram");
    let mut sim = kv_sim(&ram, "50", "120");
    for session in 1..=2 {
        let (mut backup, addr) = backup_into(&dir.join(format!("bk{session}")));
        let (mut primary, plines, clients) = started(
            Proc::new(BIN)
                .args(["primary", "--machine-ram"])
                .arg(&ram)
                .args(["--backup", &addr, "--serve-clients", "127.0.0.1:0"])
                .args(["--wait-control", "10"]),
            "clients on ",
        );
        let c = Proc::new(BIN)
            .args(["client", "--connect", &clients, "--ops", "20"])
            .args(["--connect-timeout", "5", "--reply-timeout", "30"])
            .output()
            .unwrap();
        let cout = String::from_utf8_lossy(&c.stdout);
        assert!(c.status.success(), "session {session}: {cout}");
        assert!(cout.contains("answered=20"), "session {session}: {cout}");
        assert!(cout.contains("result=pass"), "session {session}: {cout}");
        // The client is done: end the session (at the next epoch end,
        // then END and Detach). It used to end after 40 epochs of 50 ms,
        // which a loaded machine reached before the client was answered.
        let st = Proc::new("kill")
            .args(["-INT", &primary.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(primary.wait().unwrap().success(), "session {session}");
        assert!(backup.wait().unwrap().success(), "session {session}");
        let all = plines.all().join("\n");
        assert!(
            all.contains("requests=20 replies=20 dropped=0"),
            "session {session}: {all}"
        );
        assert!(
            all.contains("primary: detached"),
            "session {session}: {all}"
        );
    }
    let _ = sim.kill();
    let _ = sim.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lines_holds_what_a_child_printed_after_it_was_waited_for() {
    // The shell exits at once; its background child (holding the same
    // stdout) prints 0.3 s later. Reading the list right after `wait()`
    // (as the clients test did) misses that line; `all()` waits for the
    // pipe's end and has it.
    let mut child = Proc::new("sh")
        .args(["-c", "echo first; (sleep 0.3; echo last) & exit 0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(&mut child);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.all(), ["first", "last"]);
}

#[test]
fn a_reattaching_primary_lets_no_client_request_in_before_log_dirty_is_on() {
    // A guest an earlier tool detached runs unprotected: it answers a
    // request at once, tagged UNPROTECTED_EPOCH, and the bridge drops
    // that reply. So the second primary must not pass a client's request
    // on before its LogDirtyEnable is answered. Here nobody answers it
    // (the hypervisor stopped after the first session's Detach): the
    // request must stay out of the input channel.
    let dir = scratch("enable-first");
    let ram = dir.join("m.ram");
    let sim = small_kv_sim(&ram, 512);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let simt = s.spawn(|| sim.run(&stop));
        let (_, r) = session(&ram, cfg(Some(2)), |_| {});
        assert_eq!(r.unwrap().committed, 2);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(simt.join().unwrap().detaches, 1);
    });
    let (mut backup, addr) = backup_into(&dir.join("bk"));
    let (mut primary, _, clients) = started(
        Proc::new(BIN)
            .args(["primary", "--machine-ram"])
            .arg(&ram)
            .args(["--backup", &addr, "--serve-clients", "127.0.0.1:0"])
            .args(["--wait-control", "10", "--reply-timeout", "30"]),
        "clients on ",
    );
    let mut c = std::net::TcpStream::connect(&clients).unwrap();
    std::io::Write::write_all(&mut c, Request::new(1, op::ADD, 1, 1).as_bytes()).unwrap();
    // Time enough for a running bridge (it polls every 10 ms) to pass the
    // frame on; the fixed primary has no bridge yet.
    std::thread::sleep(Duration::from_secs(1));
    let m = MachineRam::open(&ram).unwrap();
    let ctl = m.find_control().unwrap();
    let (io, is) = ctl.view.region(Field::InputChannel);
    let mut inp = ChannelConsumer::attach(m.window(ctl.at as usize), io, is).unwrap();
    let mut frame = [0u8; 64];
    let early = inp.pop(&mut frame).unwrap();
    let _ = primary.kill();
    let _ = primary.wait();
    let _ = backup.kill();
    let _ = backup.wait();
    assert!(
        early.is_none(),
        "a client request reached the unprotected guest before LogDirtyEnable was answered"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The in-process key-value simulator the session tests drive: `pages`
/// pages of guest RAM, 8 keys, 20 ms epochs, seed 3, a primary.
fn small_kv_sim(ram: &Path, pages: u64) -> KvSim {
    KvSim::create(
        ram,
        KvSpec {
            guest_pages: pages,
            keys: 8,
            epoch: Duration::from_millis(20),
            seed: 3,
            standby: false,
            max_run: Duration::from_secs(60),
        },
    )
    .unwrap()
}
