//! The host side of issue 20's workload (docs/WORKLOAD.md): the network
//! namespaces the guest's TAP and the client live in, the guest's ext4
//! disk, the client (Debian's `redis-benchmark` beside an INCR checker)
//! and the disk check after the guest powered off.
//!
//! Everything is local: two network namespaces per run, nothing routed
//! out of them.
//!
//! ```text
//!  host netns doppel-h-<T>                     client netns doppel-c-<T>
//!  dtap<T> (QEMU / doppel run) --+
//!                                 dbr<T> -- dvh<T> ==veth== dvc<T> 10.77.0.1/24
//! ```
//!
//! The guest is 10.77.0.2/24. The checker runs as the current xtask
//! binary's hidden `net-checker` subcommand under `ip netns exec`.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::linuxnet::{GUEST_IP, REDIS_PORT};
use crate::proc::Proc;

/// The client namespace's address.
pub const CLIENT_IP: &str = "10.77.0.1";
/// The key the checker increments.
pub const COUNTER_KEY: &str = "doppel:counter";
/// The guest disk's size.
pub const DISK_MIB: u64 = 64;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Run `ip ARGS`; an error with its stderr if it fails.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The run's network: the host-side namespace with the TAP on a bridge,
/// a veth to the client namespace. Dropping it deletes both namespaces
/// (and with them every interface in them).
#[derive(Debug)]
pub(crate) struct NetGuard {
    /// The namespace the guest's backend (QEMU, `doppel run`) runs in.
    pub host_ns: String,
    /// The namespace the client runs in, with [`CLIENT_IP`].
    pub client_ns: String,
    /// The TAP device, in `host_ns`, on the bridge, up.
    pub tap: String,
    pub bridge: String,
}

impl NetGuard {
    /// Make the namespaces and interfaces, with names unique to this
    /// process and call (interface names stay within 15 bytes).
    pub(crate) fn create() -> Result<NetGuard> {
        let tag = format!(
            "{:x}{:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let g = NetGuard {
            host_ns: format!("doppel-h-{tag}"),
            client_ns: format!("doppel-c-{tag}"),
            tap: format!("dtap{tag}"),
            bridge: format!("dbr{tag}"),
        };
        ip(&["netns", "add", &g.host_ns])?;
        // From here on a failure drops `g`, which deletes what was made.
        ip(&["netns", "add", &g.client_ns])?;
        let (h, c) = (g.host_ns.as_str(), g.client_ns.as_str());
        let (vh, vc) = (format!("dvh{tag}"), format!("dvc{tag}"));
        ip(&["-n", h, "link", "set", "lo", "up"])?;
        ip(&["-n", h, "link", "add", &g.bridge, "type", "bridge"])?;
        ip(&["-n", h, "link", "set", &g.bridge, "up"])?;
        ip(&["-n", h, "tuntap", "add", "dev", &g.tap, "mode", "tap"])?;
        ip(&["-n", h, "link", "set", &g.tap, "master", &g.bridge])?;
        ip(&["-n", h, "link", "set", &g.tap, "up"])?;
        ip(&[
            "-n", h, "link", "add", &vh, "type", "veth", "peer", "name", &vc, "netns", c,
        ])?;
        ip(&["-n", h, "link", "set", &vh, "master", &g.bridge])?;
        ip(&["-n", h, "link", "set", &vh, "up"])?;
        ip(&["-n", c, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            &vc,
        ])?;
        ip(&["-n", c, "link", "set", &vc, "up"])?;
        Ok(g)
    }

    /// A second TAP on the same bridge, down until a process opens it (a
    /// backup's device model: silent until it activates), named after the
    /// first with `suffix`. Deleted with the namespace.
    pub(crate) fn add_tap(&self, suffix: &str) -> Result<String> {
        let tap = format!("{}{suffix}", self.tap);
        ensure!(tap.len() <= 15, "TAP name {tap} is over 15 bytes");
        let h = self.host_ns.as_str();
        ip(&["-n", h, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
        ip(&["-n", h, "link", "set", &tap, "master", &self.bridge])?;
        ip(&["-n", h, "link", "set", &tap, "up"])?;
        Ok(tap)
    }

    /// `program` to be run inside the host-side namespace.
    pub(crate) fn host_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.host_ns, program)
    }

    /// `program` to be run inside the client namespace.
    pub(crate) fn client_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.client_ns, program)
    }
}

fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        let _ = ip(&["-n", &self.host_ns, "link", "del", &self.tap]);
        for ns in [&self.host_ns, &self.client_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Make the guest's disk: a sparse file of [`DISK_MIB`] with a fresh ext4.
pub(crate) fn make_disk(path: &Path) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(DISK_MIB << 20)?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(path)
        .output()
        .context("running mkfs.ext4 (e2fsprogs)")?;
    ensure!(
        out.status.success(),
        "mkfs.ext4 {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// What the client does.
#[derive(Clone, Debug)]
pub(crate) struct ClientOptions {
    /// redis-benchmark `-n`, `-c`, `-t`.
    pub requests: u64,
    pub clients: u32,
    pub tests: &'static str,
    /// How long to wait for the guest's Redis to answer PING.
    pub ready_timeout: Duration,
    /// Hard limit of the benchmark.
    pub benchmark_timeout: Duration,
}

impl ClientOptions {
    /// Modest counts for an emulated guest.
    pub(crate) fn emulated() -> Self {
        Self {
            requests: 2000,
            clients: 4,
            tests: "set,get,incr",
            ready_timeout: Duration::from_secs(180),
            benchmark_timeout: Duration::from_secs(240),
        }
    }
}

/// redis-benchmark's own figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Benchmark {
    /// Requests of the tests it reported (`-n` times their number).
    pub requests: u64,
    /// (test, requests per second), in order.
    pub rates: Vec<(String, f64)>,
    /// Its result lines, verbatim.
    pub lines: Vec<String>,
}

/// Parse `redis-benchmark -q` output: one `TEST: R requests per second,
/// p50=... msec` result per test, after `\r`-separated progress lines.
pub(crate) fn parse_benchmark(text: &str, n: u64) -> Benchmark {
    let mut b = Benchmark::default();
    for piece in text.split(['\r', '\n']) {
        let piece = piece.trim();
        let Some((test, rest)) = piece.split_once(": ") else {
            continue;
        };
        let Some((rate, _)) = rest.split_once(" requests per second") else {
            continue;
        };
        if let Ok(r) = rate.trim().parse::<f64>() {
            b.rates.push((test.to_string(), r));
            b.lines.push(piece.to_string());
            b.requests += n;
        }
    }
    b
}

/// The INCR checker's account: each reply must be the previous plus one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IncrTrack {
    /// Replies received (INCRs acknowledged).
    pub acked: u64,
    /// Replies that were not the previous plus one.
    pub gaps: u64,
    /// Error replies or a broken connection.
    pub errors: u64,
    /// Acknowledged increments a later reply shows were lost: a reply of
    /// `v` after `prev` with `v <= prev` lost `prev - v + 1` of them.
    pub lost: u64,
    pub first: Option<i64>,
    pub last: Option<i64>,
}

impl IncrTrack {
    /// Record one acknowledged INCR's value.
    pub(crate) fn reply(&mut self, v: i64) {
        if let Some(prev) = self.last {
            if prev.checked_add(1) != Some(v) {
                self.gaps += 1;
            }
            if v <= prev {
                self.lost = self.lost.saturating_add(prev.abs_diff(v).saturating_add(1));
            }
        }
        self.first.get_or_insert(v);
        self.last = Some(v);
        self.acked += 1;
    }

    /// The checker's result line.
    pub(crate) fn line(&self) -> String {
        format!(
            "checker: acked={} gaps={} errors={} lost={} first={} last={}",
            self.acked,
            self.gaps,
            self.errors,
            self.lost,
            self.first.map_or("none".into(), |v| v.to_string()),
            self.last.map_or("none".into(), |v| v.to_string())
        )
    }

    /// Parse [`IncrTrack::line`].
    pub(crate) fn parse(line: &str) -> Option<IncrTrack> {
        let body = line.strip_prefix("checker: ")?;
        let opt = |k: &str| -> Option<Option<i64>> {
            match crate::logline::field(body, k)? {
                "none" => Some(None),
                v => v.parse().ok().map(Some),
            }
        };
        Some(IncrTrack {
            acked: crate::logline::num(body, "acked")?,
            gaps: crate::logline::num(body, "gaps")?,
            errors: crate::logline::num(body, "errors")?,
            lost: crate::logline::num(body, "lost")?,
            first: opt("first")?,
            last: opt("last")?,
        })
    }
}

/// A command as a RESP array of bulk strings.
pub(crate) fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// A reply the checker understands.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Int(i64),
    Simple(String),
    Error(String),
    /// Anything else (bulk, array): its type byte.
    Other(u8),
}

/// Read one reply line; `None` at end of stream.
pub(crate) fn read_reply(r: &mut impl BufRead) -> Result<Option<Reply>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let l = line
        .strip_suffix("\r\n")
        .with_context(|| format!("reply line not ended by CRLF: {line:?}"))?;
    let (kind, rest) = l.split_at(1.min(l.len()));
    Ok(Some(match kind {
        ":" => Reply::Int(rest.parse().with_context(|| format!("integer {rest:?}"))?),
        "+" => Reply::Simple(rest.into()),
        "-" => Reply::Error(rest.into()),
        _ => Reply::Other(l.bytes().next().unwrap_or(0)),
    }))
}

/// Count the `INCR <key>` commands in an append-only file's RESP stream
/// (commands are arrays of bulk strings). A truncated last command (a
/// write cut short) is not counted; anything else malformed is an error.
pub(crate) fn count_incr(aof: &[u8], key: &str) -> Result<u64> {
    fn line(b: &[u8], at: &mut usize) -> Option<Result<usize>> {
        let rest = b.get(*at..)?;
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let text = String::from_utf8_lossy(&rest[1.min(end)..end]).into_owned();
        *at += end + 2;
        Some(text.parse().with_context(|| format!("bad length {text:?}")))
    }
    let mut at = 0;
    let mut n = 0;
    while at < aof.len() {
        ensure!(
            aof[at] == b'*',
            "AOF byte {at}: {:?} where a command array starts",
            aof[at] as char
        );
        let Some(argc) = line(aof, &mut at) else {
            break;
        };
        let mut args: Vec<&[u8]> = Vec::new();
        let mut complete = true;
        for _ in 0..argc? {
            if aof.get(at) != Some(&b'$') {
                ensure!(at >= aof.len(), "AOF byte {at}: no bulk string");
                complete = false;
                break;
            }
            let Some(len) = line(aof, &mut at) else {
                complete = false;
                break;
            };
            let len = len?;
            match aof.get(at..at + len + 2) {
                Some(s) if s.ends_with(b"\r\n") => args.push(&s[..len]),
                Some(_) => bail!("AOF byte {at}: bulk string not ended by CRLF"),
                None => {
                    complete = false;
                    break;
                }
            }
            at += len + 2;
        }
        if !complete {
            break;
        }
        if args.len() == 2 && args[0].eq_ignore_ascii_case(b"INCR") && args[1] == key.as_bytes() {
            n += 1;
        }
    }
    Ok(n)
}

/// The files of Redis 7's multi-part AOF manifest as (name, type), type
/// `b` (base) or `i` (incremental), incremental ones in `seq` order.
pub(crate) fn parse_manifest(text: &str) -> Result<Vec<(String, char)>> {
    let mut files = Vec::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let get = |k: &str| {
            w.chunks(2)
                .find(|c| c.len() == 2 && c[0] == k)
                .map(|c| c[1])
        };
        let name = get("file").with_context(|| format!("manifest line without file: {l}"))?;
        let seq: u64 = get("seq")
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("manifest line without seq: {l}"))?;
        let kind = get("type")
            .and_then(|t| t.chars().next())
            .with_context(|| format!("manifest line without type: {l}"))?;
        files.push((seq, name.to_string(), kind));
    }
    files.sort_by_key(|f| (f.2 != 'b', f.0));
    Ok(files.into_iter().map(|(_, n, k)| (n, k)).collect())
}

/// What the checker and the benchmark saw.
#[derive(Clone, Debug)]
pub(crate) struct ClientResult {
    pub benchmark: Benchmark,
    /// Tests asked of redis-benchmark (`-t`), and whether it exited 0.
    pub tests_asked: usize,
    pub benchmark_ok: bool,
    pub incr: IncrTrack,
    /// SHUTDOWN closed the connection without an error reply.
    pub shutdown_ok: bool,
}

impl ClientResult {
    /// Why this is not a pass: every test reported, INCRs acknowledged,
    /// no gap, no error, SHUTDOWN accepted.
    pub(crate) fn check(&self) -> Result<()> {
        ensure!(
            self.benchmark_ok && self.benchmark.rates.len() == self.tests_asked,
            "redis-benchmark reported {} of {} tests (exit ok: {}): {:?}",
            self.benchmark.rates.len(),
            self.tests_asked,
            self.benchmark_ok,
            self.benchmark.lines
        );
        ensure!(self.incr.acked > 0, "the checker had no INCR acknowledged");
        ensure!(
            self.incr.gaps == 0 && self.incr.errors == 0,
            "the INCR checker saw {} gaps and {} errors: {}",
            self.incr.gaps,
            self.incr.errors,
            self.incr.line()
        );
        ensure!(self.shutdown_ok, "SHUTDOWN was not accepted");
        Ok(())
    }
}

fn guest_addr() -> String {
    format!("{GUEST_IP}:{REDIS_PORT}")
}

/// The client side of a run against the guest's Redis: wait until it
/// answers PING (from the client namespace), start the INCR checker, run
/// redis-benchmark, stop the checker, send SHUTDOWN on a second
/// connection. `dir` takes the checker's stop file. An error only when
/// something could not run; judge the result with
/// [`ClientResult::check`]. SHUTDOWN is sent whatever the benchmark did,
/// so the guest powers off. The wait for Redis ends as soon as
/// `backend_up` says the guest's backend (QEMU, `doppel run`, the
/// hypervisor's run) is gone, rather than after the whole ready timeout.
pub(crate) fn run_client_while(
    net: &NetGuard,
    o: &ClientOptions,
    dir: &Path,
    backend_up: &mut dyn FnMut() -> bool,
) -> Result<ClientResult> {
    let exe = std::env::current_exe().context("the xtask binary's path")?;
    let stop = dir.join("checker.stop");
    let _ = fs::remove_file(&stop);
    let mut checker = Proc::spawn(
        "incr checker",
        net.client_command(&exe)
            .arg("net-checker")
            .args(["--addr", &guest_addr()])
            .arg("--stop-file")
            .arg(&stop)
            .args(["--ready-timeout", &o.ready_timeout.as_secs().to_string()]),
        false,
    )?;
    let ready = wait_ready(&mut checker, o.ready_timeout, backend_up);
    let result = ready.and_then(|_| {
        let mut bench = Proc::spawn(
            "redis-benchmark",
            net.client_command("redis-benchmark")
                .args(["-h", GUEST_IP, "-p", &REDIS_PORT.to_string()])
                .args(["-n", &o.requests.to_string()])
                .args(["-c", &o.clients.to_string()])
                .args(["-q", "-t", o.tests]),
            false,
        )?;
        let (code, text) = bench.finish(o.benchmark_timeout)?;
        Ok((code == Some(0), parse_benchmark(&text, o.requests)))
    });
    fs::write(&stop, b"stop\n")?;
    let (_, text) = checker.finish(Duration::from_secs(60))?;
    let shutdown = send_shutdown(net, &exe);
    let (benchmark_ok, benchmark) = result?;
    let incr = text
        .lines()
        .find_map(IncrTrack::parse)
        .with_context(|| format!("the checker printed no result line:\n{text}"))?;
    Ok(ClientResult {
        benchmark,
        tests_asked: o.tests.split(',').count(),
        benchmark_ok,
        incr,
        shutdown_ok: shutdown?,
    })
}

/// Wait for the checker's `checker: ready` line while it and the backend
/// run.
fn wait_ready(
    checker: &mut Proc,
    limit: Duration,
    backend_up: &mut dyn FnMut() -> bool,
) -> Result<()> {
    let t = Instant::now();
    loop {
        let exited = checker.exited()?;
        if checker
            .out()
            .iter()
            .any(|l| l.starts_with("checker: ready"))
        {
            return Ok(());
        }
        ensure!(
            !exited,
            "the checker exited before Redis answered PING:\n{}",
            checker.text()
        );
        ensure!(
            backend_up(),
            "the guest's backend stopped before Redis answered PING"
        );
        ensure!(
            t.elapsed() <= limit + Duration::from_secs(10),
            "Redis did not answer PING within {} s",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SHUTDOWN through a fresh connection from the client namespace.
fn send_shutdown(net: &NetGuard, exe: &Path) -> Result<bool> {
    let mut p = Proc::spawn(
        "shutdown client",
        net.client_command(exe)
            .arg("net-checker")
            .args(["--addr", &guest_addr(), "--shutdown"]),
        false,
    )?;
    let (code, text) = p.finish(Duration::from_secs(60))?;
    Ok(code == Some(0) && text.contains("checker: shutdown=ok"))
}

/// The hidden `net-checker` subcommand, run inside the client namespace.
/// With `shutdown`: send SHUTDOWN on a new connection, pass if Redis
/// closes it without an error reply. Otherwise: connect (retrying up to
/// `ready_timeout`) until PING answers, print `checker: ready`, then INCR
/// [`COUNTER_KEY`] on that one connection until `stop_file` exists, and
/// print the [`IncrTrack::line`].
pub(crate) fn checker_main(
    addr: &str,
    stop_file: Option<&Path>,
    ready_timeout: Duration,
    shutdown: bool,
    io_timeout: Duration,
) -> Result<()> {
    let io_timeout = Some(io_timeout);
    if shutdown {
        let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(io_timeout)?;
        s.write_all(&resp_command(&[b"SHUTDOWN"]))?;
        let mut r = BufReader::new(s);
        return match read_reply(&mut r) {
            Ok(None) => {
                println!("checker: shutdown=ok");
                Ok(())
            }
            Ok(Some(reply)) => bail!("SHUTDOWN answered {reply:?}"),
            // A reset instead of a clean close still means it went down.
            Err(e) if is_reset(&e) => {
                println!("checker: shutdown=ok");
                Ok(())
            }
            Err(e) => Err(e),
        };
    }
    let stop_file = stop_file.context("--stop-file is needed")?;
    let t = Instant::now();
    let (mut w, mut r) = loop {
        match ping(addr, io_timeout) {
            Ok(c) => break c,
            Err(e) if t.elapsed() > ready_timeout => {
                bail!("no PONG from {addr} within {ready_timeout:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    println!("checker: ready");
    let track = incr_until(&mut w, &mut r, || stop_file.exists());
    println!("{}", track.line());
    Ok(())
}

/// INCR [`COUNTER_KEY`] on one connection until `stop` says so; an error
/// reply or a broken connection ends it (counted in `errors`).
pub(crate) fn incr_until(
    w: &mut impl Write,
    r: &mut impl BufRead,
    stop: impl Fn() -> bool,
) -> IncrTrack {
    let mut track = IncrTrack::default();
    let incr = resp_command(&[b"INCR", COUNTER_KEY.as_bytes()]);
    let mut shown = Instant::now();
    while !stop() {
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            println!("{}", progress_line(&track));
        }
        let reply = w
            .write_all(&incr)
            .map_err(anyhow::Error::from)
            .and_then(|_| read_reply(r));
        match reply {
            Ok(Some(Reply::Int(v))) => track.reply(v),
            Ok(other) => {
                eprintln!("checker: INCR answered {other:?}");
                track.errors += 1;
                break;
            }
            Err(e) => {
                eprintln!("checker: INCR failed: {e:#}");
                track.errors += 1;
                break;
            }
        }
    }
    track
}

/// The checker's progress line, printed about once a second while it
/// runs: what a harness reads to know how far the one connection got.
pub(crate) fn progress_line(t: &IncrTrack) -> String {
    format!(
        "checker: progress acked={} last={}",
        t.acked,
        t.last.map_or("none".into(), |v| v.to_string())
    )
}

/// The latest acknowledged count in a checker's progress lines.
pub(crate) fn progress_acked(lines: &[String]) -> u64 {
    lines
        .iter()
        .rev()
        .find_map(|l| crate::logline::num(l.strip_prefix("checker: progress ")?, "acked"))
        .unwrap_or(0)
}

fn is_reset(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Connect and PING; the connection's two halves once it answers PONG.
fn ping(addr: &str, io_timeout: Option<Duration>) -> Result<(TcpStream, BufReader<TcpStream>)> {
    let sa: std::net::SocketAddr = addr.parse().context("--addr")?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))?;
    s.set_read_timeout(io_timeout)?;
    s.set_nodelay(true)?;
    s.write_all(&resp_command(&[b"PING"]))?;
    let mut r = BufReader::new(s.try_clone()?);
    match read_reply(&mut r)? {
        Some(Reply::Simple(p)) if p == "PONG" => Ok((s, r)),
        other => bail!("PING answered {other:?}"),
    }
}

/// What the disk held after the guest powered off.
#[derive(Clone, Debug)]
pub(crate) struct DiskCheck {
    /// `e2fsck -fn` exited 0.
    pub fsck_clean: bool,
    /// `INCR` [`COUNTER_KEY`] commands in the AOF files.
    pub aof_incr: u64,
    /// The AOF files read, in order.
    pub aof_files: Vec<String>,
}

/// Redis's AOF directory and manifest on the disk (`--dir /data`, the
/// default appenddirname and appendfilename).
const AOF_DIR: &str = "/appendonlydir";
const MANIFEST: &str = "appendonly.aof.manifest";

/// One file of the ext4 image `disk`, read with debugfs (no mount).
fn debugfs_cat(disk: &Path, path: &str) -> Result<Vec<u8>> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(disk)
        .output()
        .context("running debugfs (e2fsprogs)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && !err.contains("File not found"),
        "debugfs cat {path} on {}: {err}",
        disk.display()
    );
    Ok(out.stdout)
}

/// Check the guest's disk after it powered off: `e2fsck -fn` clean, and
/// the AOF (manifest, then every AOF-format file it lists) holds at least
/// `acked` INCRs of [`COUNTER_KEY`]. An error says which failed; the
/// figures are in the result when both hold.
pub(crate) fn check_disk(disk: &Path, acked: u64) -> Result<DiskCheck> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .context("running e2fsck (e2fsprogs)")?;
    let fsck_clean = out.status.success();
    ensure!(
        fsck_clean,
        "e2fsck -fn {} exited {}: {}{}",
        disk.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = debugfs_cat(disk, &format!("{AOF_DIR}/{MANIFEST}"))?;
    let files = parse_manifest(&String::from_utf8_lossy(&manifest))?;
    let mut aof_incr = 0;
    let mut aof_files = Vec::new();
    for (name, kind) in files {
        // The base is an RDB file (aof-use-rdb-preamble) unless it is
        // named .aof; only AOF-format files hold commands.
        if kind == 'b' && !name.ends_with(".aof") {
            continue;
        }
        let bytes = debugfs_cat(disk, &format!("{AOF_DIR}/{name}"))?;
        aof_incr += count_incr(&bytes, COUNTER_KEY).with_context(|| name.clone())?;
        aof_files.push(name);
    }
    ensure!(!aof_files.is_empty(), "the AOF manifest lists no AOF file");
    check_aof(aof_incr, acked)?;
    Ok(DiskCheck {
        fsck_clean,
        aof_incr,
        aof_files,
    })
}

/// Every acknowledged INCR must be in the AOF (`appendfsync always`).
pub(crate) fn check_aof(aof_incr: u64, acked: u64) -> Result<()> {
    ensure!(
        aof_incr >= acked,
        "the AOF holds {aof_incr} INCRs of {COUNTER_KEY} but {acked} were acknowledged"
    );
    Ok(())
}

/// The issue's `linux-net:` acceptance line for a run on `vendor`
/// (`amd`, `intel`), or why the client's result is no pass. For the
/// steps under Doppel (the direct step prints its own line).
pub(crate) fn net_line(vendor: &str, c: &ClientResult) -> Result<String> {
    c.check()?;
    Ok(format!(
        "linux-net: vendor={vendor} benchmark_requests={} incr_acked={} incr_gap={} result=pass",
        c.benchmark.requests, c.incr.acked, c.incr.gaps
    ))
}

/// The issue's `linux-disk:` acceptance line ([`check_disk`] passed).
pub(crate) fn disk_line(vendor: &str, d: &DiskCheck) -> String {
    format!(
        "linux-disk: vendor={vendor} fsck={} aof_incr={} result=pass",
        if d.fsck_clean { "clean" } else { "errors" },
        d.aof_incr
    )
}

/// Where a run keeps its files.
pub(crate) fn run_dir(step: &str) -> Result<PathBuf> {
    let dir = crate::out_dir().join("runs").join(step);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Read the whole of `r` (for tests of the reply reader).
#[cfg(test)]
fn replies(bytes: &[u8]) -> Vec<Reply> {
    use std::io::Read;
    let mut r = BufReader::new(bytes);
    let mut v = Vec::new();
    while let Some(x) = read_reply(&mut r).unwrap() {
        v.push(x);
    }
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_flags_a_gap() {
        let mut t = IncrTrack::default();
        for v in [7, 8, 9] {
            t.reply(v);
        }
        assert_eq!((t.acked, t.gaps), (3, 0));
        t.reply(11); // 10 lost
        assert_eq!((t.acked, t.gaps), (4, 1));
        t.reply(11); // repeated
        assert_eq!(t.gaps, 2);
        let r = ClientResult {
            benchmark: parse_benchmark("SET: 1.0 requests per second\n", 10),
            tests_asked: 1,
            benchmark_ok: true,
            incr: t.clone(),
            shutdown_ok: true,
        };
        assert!(format!("{:#}", r.check().unwrap_err()).contains("2 gaps"));
        let back = IncrTrack::parse(&t.line()).unwrap();
        assert_eq!(back, t);
        let mut ok = IncrTrack::default();
        (1..=5).for_each(|v| ok.reply(v));
        assert!(net_line("amd", &r).is_err());
        let good = ClientResult { incr: ok, ..r };
        good.check().unwrap();
        assert_eq!(
            net_line("amd", &good).unwrap(),
            "linux-net: vendor=amd benchmark_requests=10 incr_acked=5 incr_gap=0 result=pass"
        );
        assert_eq!(
            IncrTrack::parse("checker: acked=0 gaps=0 errors=0 lost=0 first=none last=none"),
            Some(IncrTrack::default())
        );
    }

    /// A counter that goes back (a failover to a state before acked
    /// increments) counts the increments it lost; a repeat loses one.
    #[test]
    fn a_counter_that_goes_back_counts_the_lost_increments() {
        let mut t = IncrTrack::default();
        [10, 11, 12, 13, 11, 12].iter().for_each(|&v| t.reply(v));
        assert_eq!((t.acked, t.gaps, t.lost), (6, 1, 3));
        let mut t = IncrTrack::default();
        [1, 2, 2, 3].iter().for_each(|&v| t.reply(v));
        assert_eq!((t.gaps, t.lost), (1, 1));
        let mut t = IncrTrack::default();
        [1, 2, 5].iter().for_each(|&v| t.reply(v));
        assert_eq!((t.gaps, t.lost), (1, 0));
        assert_eq!(IncrTrack::parse(&t.line()), Some(t));
    }

    /// The checker's loop against a server whose third reply skips a
    /// value and who then hangs up: one gap, one error, every INCR sent
    /// as RESP.
    #[test]
    fn the_checker_loop_sees_a_skipped_value_and_a_hang_up() {
        let mut sent = Vec::new();
        let mut r = BufReader::new(&b":1\r\n:2\r\n:4\r\n"[..]);
        let t = incr_until(&mut sent, &mut r, || false);
        assert_eq!((t.acked, t.gaps, t.errors), (3, 1, 1));
        assert_eq!((t.first, t.last), (Some(1), Some(4)));
        let one = resp_command(&[b"INCR", b"doppel:counter"]);
        assert_eq!(sent, one.repeat(4));
        let mut r = BufReader::new(&b":5\r\n:6\r\n-ERR busy\r\n"[..]);
        let t = incr_until(&mut Vec::new(), &mut r, || false);
        assert_eq!((t.acked, t.gaps, t.errors), (2, 0, 1));
        let n = std::cell::Cell::new(0);
        let mut r = BufReader::new(&b":5\r\n:6\r\n:7\r\n"[..]);
        let t = incr_until(&mut Vec::new(), &mut r, || {
            n.set(n.get() + 1);
            n.get() > 2
        });
        assert_eq!((t.acked, t.gaps, t.errors), (2, 0, 0));
    }

    fn netns_list() -> String {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The guard makes both namespaces, the TAP in the host-side one and
    /// the client's address, with names unique per call; dropping it
    /// leaves nothing behind.
    #[test]
    fn the_network_guard_builds_and_removes_everything() {
        let (a, b) = (NetGuard::create().unwrap(), NetGuard::create().unwrap());
        assert_ne!(a.tap, b.tap);
        assert!(a.tap.len() <= 15 && a.bridge.len() <= 15);
        let list = netns_list();
        for ns in [&a.host_ns, &a.client_ns, &b.host_ns, &b.client_ns] {
            assert!(list.contains(ns.as_str()), "{ns} in {list}");
        }
        let out = a
            .host_command("ip")
            .args(["-d", "link", "show", &a.tap])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("tun type tap"), "{text}");
        assert!(text.contains(&format!("master {}", a.bridge)), "{text}");
        let out = a
            .client_command("ip")
            .args(["-4", "addr"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("inet {CLIENT_IP}/24")), "{text}");
        let names = [a.host_ns.clone(), a.client_ns.clone()];
        drop(a);
        let list = netns_list();
        for ns in &names {
            assert!(!list.contains(ns.as_str()), "{ns} left behind: {list}");
        }
        assert!(list.contains(b.host_ns.as_str()), "the other run's kept");
    }

    /// The wait for Redis ends as soon as the backend is gone, or the
    /// checker is ready, or the checker died; not after the time limit.
    #[test]
    fn the_ready_wait_ends_when_the_backend_stops() {
        let limit = Duration::from_secs(60);
        let t = Instant::now();
        let mut silent = Proc::spawn("silent", Command::new("sleep").arg("30"), false).unwrap();
        let mut polls = 0;
        let err = wait_ready(&mut silent, limit, &mut || {
            polls += 1;
            polls < 3
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("backend stopped"), "{err:#}");
        let mut ready =
            Proc::spawn("ready", Command::new("echo").arg("checker: ready"), false).unwrap();
        wait_ready(&mut ready, limit, &mut || true).unwrap();
        let mut dead = Proc::spawn("dead", &mut Command::new("false"), false).unwrap();
        let err = wait_ready(&mut dead, limit, &mut || true).unwrap_err();
        assert!(format!("{err:#}").contains("checker exited"), "{err:#}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn the_aof_counter_flags_a_missing_incr() {
        let mut aof = resp_command(&[b"SELECT", b"0"]);
        for _ in 0..5 {
            aof.extend(resp_command(&[b"INCR", COUNTER_KEY.as_bytes()]));
            aof.extend(resp_command(&[b"incr", b"counter:__rand_int__"]));
            aof.extend(resp_command(&[b"SET", b"key:1", b"INCR"]));
        }
        assert_eq!(count_incr(&aof, COUNTER_KEY).unwrap(), 5);
        check_aof(5, 5).unwrap();
        let err = check_aof(5, 6).unwrap_err();
        assert!(format!("{err:#}").contains("5 INCRs"), "{err:#}");
        // The one INCR cut short at the end is not counted.
        let mut cut = aof.clone();
        let last = resp_command(&[b"INCR", COUNTER_KEY.as_bytes()]);
        cut.extend_from_slice(&last[..last.len() - 3]);
        assert_eq!(count_incr(&cut, COUNTER_KEY).unwrap(), 5);
        // Garbage in the middle is an error, not a count.
        let mut bad = aof.clone();
        bad.extend_from_slice(b"junk\r\n");
        bad.extend(last);
        assert!(count_incr(&bad, COUNTER_KEY).is_err());
        for n in 0..aof.len() {
            let _ = count_incr(&aof[..n], COUNTER_KEY);
        }
    }

    /// Run debugfs's `-w` commands on `disk`, with `files` (name, bytes)
    /// written to the host first in `dir` so `write` can take them.
    fn debugfs_w(disk: &Path, dir: &Path, files: &[(&str, &[u8])], cmds: &str) {
        for (n, b) in files {
            fs::write(dir.join(n), b).unwrap();
        }
        fs::write(dir.join("cmds"), cmds).unwrap();
        let out = Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(dir.join("cmds"))
            .arg(disk)
            .current_dir(dir)
            .output()
            .expect("debugfs is installed (`cargo xtask setup`: e2fsprogs)");
        assert!(out.status.success(), "{out:?}");
    }

    /// check_disk on a real ext4 image made as the step makes it, with an
    /// AOF written into it by debugfs: the INCR count, a missing INCR, a
    /// missing manifest and an unclean file system are each caught.
    #[test]
    fn the_disk_check_reads_the_aof_and_runs_fsck() {
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("disk.img");
        make_disk(&disk).unwrap();
        assert_eq!(fs::metadata(&disk).unwrap().len(), DISK_MIB << 20);
        let err = format!("{:#}", check_disk(&disk, 0).unwrap_err());
        assert!(err.contains("File not found"), "{err}");
        let mut incr = resp_command(&[b"SELECT", b"0"]);
        for _ in 0..3 {
            incr.extend(resp_command(&[b"INCR", COUNTER_KEY.as_bytes()]));
        }
        let mut incr2 = Vec::new();
        for _ in 0..2 {
            incr2.extend(resp_command(&[b"INCR", COUNTER_KEY.as_bytes()]));
        }
        let manifest = b"file appendonly.aof.1.base.rdb seq 1 type b\nfile appendonly.aof.2.incr.aof seq 2 type i\nfile appendonly.aof.1.incr.aof seq 1 type i\n";
        debugfs_w(
            &disk,
            t.path(),
            &[
                ("m", manifest),
                ("b", b"REDIS0010 not RESP"),
                ("i1", &incr),
                ("i2", &incr2),
            ],
            "mkdir /appendonlydir\ncd /appendonlydir\nwrite m appendonly.aof.manifest\nwrite b appendonly.aof.1.base.rdb\nwrite i1 appendonly.aof.1.incr.aof\nwrite i2 appendonly.aof.2.incr.aof\n",
        );
        let d = check_disk(&disk, 5).unwrap();
        assert!(d.fsck_clean);
        assert_eq!(
            disk_line("amd", &d),
            "linux-disk: vendor=amd fsck=clean aof_incr=5 result=pass"
        );
        assert_eq!(d.aof_incr, 5);
        assert_eq!(
            d.aof_files,
            ["appendonly.aof.1.incr.aof", "appendonly.aof.2.incr.aof"]
        );
        let err = format!("{:#}", check_disk(&disk, 6).unwrap_err());
        assert!(err.contains("holds 5 INCRs"), "{err}");
        // A wrong link count on the root directory: e2fsck -fn must fail.
        debugfs_w(&disk, t.path(), &[], "set_inode_field <2> links_count 9\n");
        let err = format!("{:#}", check_disk(&disk, 0).unwrap_err());
        assert!(err.contains("e2fsck -fn"), "{err}");
    }

    #[test]
    fn manifest_lists_base_then_incr_files_in_order() {
        let m = "file appendonly.aof.3.incr.aof seq 3 type i\nfile appendonly.aof.1.base.rdb seq 1 type b\nfile appendonly.aof.2.incr.aof seq 2 type i\n";
        assert_eq!(
            parse_manifest(m).unwrap(),
            [
                ("appendonly.aof.1.base.rdb".to_string(), 'b'),
                ("appendonly.aof.2.incr.aof".to_string(), 'i'),
                ("appendonly.aof.3.incr.aof".to_string(), 'i'),
            ]
        );
        assert!(parse_manifest("file x type i\n").is_err());
    }

    #[test]
    fn benchmark_figures_are_its_own_lines() {
        let out = "SET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\rSET: 3389.83 requests per second, p50=1.031 msec                    \nGET: 4081.63 requests per second, p50=0.839 msec\nINCR: 4000.00 requests per second, p50=0.855 msec\n";
        let b = parse_benchmark(out, 2000);
        assert_eq!(b.requests, 6000);
        assert_eq!(
            b.rates,
            [
                ("SET".to_string(), 3389.83),
                ("GET".to_string(), 4081.63),
                ("INCR".to_string(), 4000.0)
            ]
        );
        assert_eq!(
            b.lines[0],
            "SET: 3389.83 requests per second, p50=1.031 msec"
        );
    }

    #[test]
    fn replies_are_read_by_type() {
        assert_eq!(
            replies(b":41\r\n+PONG\r\n-ERR no\r\n$3\r\n"),
            [
                Reply::Int(41),
                Reply::Simple("PONG".into()),
                Reply::Error("ERR no".into()),
                Reply::Other(b'$')
            ]
        );
        let mut r = BufReader::new(&b":12"[..]);
        assert!(read_reply(&mut r).is_err(), "no CRLF");
    }
}
