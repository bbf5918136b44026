//! Remus end to end (issue #7): two QEMU machines, the protected key-value
//! service, `doppel primary` / `doppel backup` / `doppel client`, and a
//! fault injected at a random epoch. Used by `cargo xtask test` (a few
//! runs, `--long`: 21) and by `cargo xtask demo` (one run, shown live).
//!
//! One run:
//! 1. Boot the primary (`mode=primary service=kv`) and the standby
//!    (`mode=standby`), each with its RAM in a /dev/shm file, `-icount`.
//! 2. Start `doppel backup --standby-ram` and `doppel primary
//!    --serve-clients` (through a TCP relay we can cut), then the client.
//! 3. When the backup has committed the run's random epoch, inject the
//!    fault: kill -9 the primary's QEMU, kill -9 `doppel primary`, or cut
//!    the replication link (the relay stops forwarding but keeps both
//!    connections open: only the heartbeat timeout can tell).
//! 4. The client finishes on the backup; its verdict and the backup's
//!    failover line make the run's `failover:` line.
//! 5. Link cut only: the old `doppel primary` must give the backup up
//!    (`primary: backup lost ...; serving unprotected`) and serve on
//!    without it (split brain: no witness); stopped with SIGINT it ends in
//!    order (exit 5: it served unprotected) and Detaches (its hypervisor
//!    logs `replication detached; guest runs unprotected`), its guest must
//!    stop being write-protected at the next epoch end (`dirty tracking
//!    off`), and a second `doppel primary --record --epochs 2` must attach
//!    to the still-running guest, commit two epochs of a new session, and
//!    have tracking re-armed (`dirty tracking on again`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std::{fs, thread};

use anyhow::{bail, Context, Result};
use doppel_abi::splitmix::{SplitMix64, GAMMA};

use crate::emu::{self, RunSpec, Running};
use crate::logline::num;
use crate::proc::{tail, Proc};
use crate::replica::{doppel_bin, guest_ram, shm_file, TempFile};
use crate::test::Ctx;
use crate::Emulator;

/// Guest RAM of the protected machine (MiB) and the QEMU machines' RAM.
pub(crate) const GUEST_MIB: u32 = 16;
const MACHINE_MIB: u32 = 128;
pub(crate) const KEYS: u32 = 256;
/// Deterministic checkpoint policy for tests: one every this many exits.
pub(crate) const EPOCH_EXITS: u32 = 3000;
/// Seconds without a record before the backup takes over, and without an
/// event before `doppel primary` gives its hypervisor up.
const HEARTBEAT_TIMEOUT: u64 = 4;
const EVENT_TIMEOUT: u64 = 4;

/// What the primary's hypervisor logs when the tool detaches, when its
/// guest then stops being write-protected, and when a new session tracks
/// it again; and what an activated standby logs (it never write-protects).
pub(crate) const DETACHED: &str = "replication detached; guest runs unprotected";
const TRACKING_OFF: &str = "dirty tracking off:";
const TRACKING_ON: &str = "dirty tracking on again";
const STANDBY_UNTRACKED: &str = "dirty tracking off: nothing harvests";

/// What a run kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 the primary machine's QEMU (the primary host dies).
    Qemu,
    /// kill -9 `doppel primary` (dom0's replication tool dies).
    Primary,
    /// Cut the replication link while the primary lives (split brain).
    Link,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Qemu => "qemu",
            Fault::Primary => "primary",
            Fault::Link => "link",
        }
    }
}

/// One run's parameters.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub run: u32,
    pub fault: Fault,
    /// Kill once the backup has committed this epoch, plus `delay_ms`
    /// (so the fault lands anywhere inside the next epochs, not on a
    /// commit boundary).
    pub at_epoch: u64,
    pub delay_ms: u64,
    pub ops: u64,
    /// The client's workload seed (derived from `series`).
    pub seed: u64,
    /// The seed of the series this run belongs to: printed in every
    /// `failover:` line as `seed=S`; `--seed S` gives the same runs again.
    pub series: u64,
}

impl Scenario {
    /// The `n`th run of a seeded series: faults cycle, the epoch is random.
    pub fn nth(n: u32, seed: u64) -> Self {
        let mut x = seed ^ u64::from(n).wrapping_mul(GAMMA);
        x = splitmix(x);
        let fault = [Fault::Qemu, Fault::Primary, Fault::Link][(n % 3) as usize];
        Scenario {
            run: n,
            fault,
            at_epoch: 6 + x % 30,
            delay_ms: (x >> 32) % 400,
            ops: 1200,
            seed: splitmix(x),
            series: seed,
        }
    }

    /// The demo's run: the primary machine killed after epoch 100, the
    /// moment inside the next epoch and the client's workload from `seed`.
    pub fn demo(seed: u64) -> Self {
        let x = splitmix(seed);
        Scenario {
            run: 0,
            fault: Fault::Qemu,
            at_epoch: 100,
            delay_ms: (x >> 32) % 400,
            ops: 4000,
            seed: splitmix(x),
            series: seed,
        }
    }

    /// How every `failover:` line of this run starts: `failover: run=N
    /// seed=S killed=FAULT`.
    pub fn line_head(&self) -> String {
        format!(
            "failover: run={} seed={} killed={}",
            self.run,
            self.series,
            self.fault.name()
        )
    }
}

/// A seed for a new series, different on every call (std's per-process
/// random hash keys, the time and the process id; no extra crate).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    RandomState::new().hash_one((now, std::process::id()))
}

/// One SplitMix64 step from state `z`.
pub(crate) fn splitmix(z: u64) -> u64 {
    SplitMix64(z).next_u64()
}

/// What a run showed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub line: String,
    pub pass: bool,
    /// Extra lines worth printing (the split-brain report).
    pub notes: Vec<String>,
    /// Figures for PERFORMANCE.md: epochs committed before the fault,
    /// checkpoint pages and bytes, pause cycles, failover wall seconds.
    pub epochs: u64,
    pub pages: u64,
    pub bytes: u64,
    pub pause_cycles: Vec<u64>,
    pub failover_secs: f64,
    pub client_answered_before: u64,
    /// Guest progress per epoch in TSC ticks (virtual ns under -icount).
    pub epoch_cycles: Vec<u64>,
    /// The primary hypervisor's last checkpoint epoch, and the epoch the
    /// standby resumed from.
    pub last_primary_epoch: Option<u64>,
    pub resumed: Option<u64>,
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

impl Outcome {
    /// The run's figures in one line (docs/PERFORMANCE.md quotes them).
    pub fn figures(&self, run: u32) -> String {
        let n = self.epochs.saturating_sub(1).max(1) as f64;
        let ec = median(&self.epoch_cycles);
        format!(
            "figures: run={run} epochs={} (after epoch 0:) dirty_pages_per_epoch={:.1} wire_bytes_per_epoch={:.0} \
             pause_cycles_median={} epoch_cycles_median={ec} checkpoints_per_guest_second={:.1} \
             answered_per_epoch={:.2} failover_wall_s={:.1} (emulated machines) rolled_back_epochs={}",
            self.epochs,
            self.pages as f64 / n,
            self.bytes as f64 / n,
            median(&self.pause_cycles),
            if ec == 0 { 0.0 } else { 1e9 / ec as f64 },
            self.client_answered_before as f64 / n,
            self.failover_secs,
            match (self.last_primary_epoch, self.resumed) {
                (Some(l), Some(r)) => l.saturating_sub(r).to_string(),
                _ => "?".into(),
            }
        )
    }
}

/// A TCP relay for the replication link: forwards both ways until cut;
/// cut, it stops reading and writing but keeps both connections open, as a
/// network partition would.
pub(crate) struct Relay {
    pub(crate) addr: String,
    /// Both directions.
    pub(crate) cut: Arc<AtomicBool>,
    /// One direction only: primary to backup (the stream), backup to
    /// primary (the acks).
    pub(crate) cut_fwd: Arc<AtomicBool>,
    pub(crate) cut_back: Arc<AtomicBool>,
}

impl Relay {
    pub(crate) fn start(target: &str) -> Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (cut_fwd, cut_back) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let target = target.to_string();
        let c = cut.clone();
        let (cf, cb) = (Arc::clone(&cut_fwd), Arc::clone(&cut_back));
        thread::spawn(move || {
            let Ok((a, _)) = l.accept() else { return };
            let Ok(b) = TcpStream::connect(&target) else {
                return;
            };
            for (from, to, one) in [(&a, &b, &cf), (&b, &a, &cb)] {
                let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                    return;
                };
                let (both, one) = (c.clone(), Arc::clone(one));
                let c = move || both.load(Ordering::SeqCst) || one.load(Ordering::SeqCst);
                thread::spawn(move || {
                    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        if c() {
                            // Partitioned: hold the sockets, move nothing.
                            thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                        match from.read(&mut buf) {
                            Ok(0) => {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                if c() || to.write_all(&buf[..n]).is_err() {
                                    continue;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            // Reset: a process killed with unread data in
                            // its socket resets it. Over a direct link the
                            // peer would see that at once; pass it on as a
                            // close, not as silence until the heartbeat
                            // timeout.
                            Err(_) => {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                        }
                    }
                });
            }
            // Keep both ends alive for the life of the process.
            let _keep = (a, b);
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        });
        Ok(Self {
            addr,
            cut,
            cut_fwd,
            cut_back,
        })
    }
}

/// One QEMU machine with its RAM file.
pub(crate) struct Machine {
    pub(crate) qemu: Option<Running>,
    pub(crate) ram: TempFile,
}

pub(crate) fn boot(ctx: &mut Ctx, doppel: &Path, cmdline: &str, tag: &str) -> Result<Machine> {
    let img = ctx.image()?;
    let ram = shm_file(tag);
    let f = fs::File::create(&ram.0).with_context(|| format!("creating {}", ram.0.display()))?;
    f.set_len(u64::from(MACHINE_MIB) << 20)?;
    drop(f);
    let mut spec = RunSpec::new(Emulator::Qemu, tag);
    spec.ram_file = Some(ram.0.clone());
    spec.mem_mib = MACHINE_MIB;
    spec.cmdline = cmdline.into();
    spec.icount = true;
    spec.timeout = Duration::from_secs(1200);
    let qemu = emu::spawn(&img, &spec)?;
    let t = Instant::now();
    loop {
        if guest_ram(doppel, &ram.0)?.is_some() {
            return Ok(Machine {
                qemu: Some(qemu),
                ram,
            });
        }
        let out = qemu.hv_output_so_far();
        if out.contains(emu::FAIL_LINE) || out.contains(emu::PASS_LINE) {
            bail!("the hypervisor ({cmdline}) ended before publishing its control area:\n{out}");
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("no control area from `{cmdline}` within 120 s:\n{out}");
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// The kv primary's hypervisor command line.
pub(crate) fn kv_primary_cmdline() -> String {
    format!("mode=primary service=kv keys={KEYS} guest-mem={GUEST_MIB} epoch-exits={EPOCH_EXITS}")
}

/// `doppel backup --standby-ram RAM` serving clients, with `args` (its
/// timeouts and the rest); the backup, its listen address and its
/// clients' address.
pub(crate) fn spawn_backup(
    doppel: &Path,
    name: &'static str,
    ram: &Path,
    args: &[&str],
    echo: bool,
) -> Result<(Proc, String, String)> {
    let mut b = Proc::spawn(
        name,
        Command::new(doppel)
            .args(["backup", "--listen", "127.0.0.1:0", "--standby-ram"])
            .arg(ram)
            .args(["--serve-clients", "127.0.0.1:0"])
            .args(args),
        echo,
    )?;
    let listen = b.wait_value("listening on ", Duration::from_secs(30))?;
    let clients = b.wait_value("clients on ", Duration::from_secs(30))?;
    Ok((b, listen, clients))
}

/// `doppel sim-hv` (the host simulator as the hypervisor) on `ram` with
/// `args`, once it has published its control area.
pub(crate) fn spawn_sim_hv(doppel: &Path, ram: &Path, args: &[&str]) -> Result<Proc> {
    let sim = Proc::spawn(
        "sim-hv",
        Command::new(doppel)
            .args(["sim-hv", "--machine-ram"])
            .arg(ram)
            .args(args),
        false,
    )?;
    if sim
        .wait_nth("control area published", 1, Duration::from_secs(30))
        .is_none()
    {
        bail!("sim-hv did not start:\n{}", sim.text());
    }
    Ok(sim)
}

/// `doppel client` of the key-value service at `connect`: `ops` requests
/// on [`KEYS`] keys, patient (60 s) with a slow emulated guest.
pub(crate) fn spawn_kv_client(doppel: &Path, connect: &str, ops: u64) -> Result<Proc> {
    Proc::spawn(
        "client",
        Command::new(doppel)
            .args(["client", "--connect", connect])
            .args(["--ops", &ops.to_string(), "--keys", &KEYS.to_string()])
            .args(["--reply-timeout", "60", "--connect-timeout", "60"]),
        false,
    )
}

/// `doppel primary --machine-ram RAM --backup BACKUP` serving clients,
/// with `args`; the primary and its clients' address.
pub(crate) fn spawn_primary(
    doppel: &Path,
    name: &'static str,
    ram: &Path,
    backup: &str,
    args: &[&str],
    echo: bool,
) -> Result<(Proc, String)> {
    let mut p = Proc::spawn(
        name,
        Command::new(doppel)
            .args(["primary", "--machine-ram"])
            .arg(ram)
            .args(["--backup", backup, "--serve-clients", "127.0.0.1:0"])
            .args(["--wait-control", "60"])
            .args(args),
        echo,
    )?;
    let clients = p.wait_value("clients on ", Duration::from_secs(60))?;
    Ok((p, clients))
}

/// Wait until `ready` says so (asked every 100 ms), failing after `limit`
/// or with the error `ready` gives (a process the run needs has died).
pub(crate) fn wait_for(
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let t = Instant::now();
    while !ready()? {
        if t.elapsed() > limit {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The client's `client:` verdict line, waiting up to `limit`; `each`
/// runs at every look (progress, or failing when a tool has died).
pub(crate) fn client_verdict(
    client: &mut Proc,
    limit: Duration,
    mut each: impl FnMut(&Proc) -> Result<()>,
) -> Result<String> {
    let t = Instant::now();
    loop {
        each(client)?;
        let exited = client.exited()?;
        if let Some(l) = client.out().into_iter().find(|l| l.starts_with("client:")) {
            return Ok(l);
        }
        if exited {
            bail!(
                "the client died without a verdict:\n{}",
                tail(&client.err(), 20)
            );
        }
        if t.elapsed() > limit {
            bail!("the client did not finish within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Highest epoch in the backup's `backup: committed epoch E ...` lines.
pub(crate) fn committed_epochs(backup: &Proc) -> Vec<(u64, u64, u64)> {
    backup
        .err()
        .iter()
        .chain(backup.out().iter())
        .filter_map(|l| {
            let at = l.find("backup: committed epoch ")?;
            let rest = &l[at + "backup: committed epoch ".len()..];
            let e = rest.split_whitespace().next()?.parse().ok()?;
            Some((
                e,
                num(rest, "pages").unwrap_or(0),
                num(rest, "bytes").unwrap_or(0),
            ))
        })
        .collect()
}

/// Replies the client has checked so far (its `client: answered N/M`
/// progress lines).
pub(crate) fn client_answered(client: &Proc) -> u64 {
    client
        .err()
        .iter()
        .rev()
        .find_map(|l| {
            let rest = l.split("client: answered ").nth(1)?;
            rest.split('/').next()?.trim().parse().ok()
        })
        .unwrap_or(0)
}

/// Live progress for the demo, once a second until `stop` says so.
pub struct Progress {
    pub enabled: bool,
    last: Instant,
    last_epoch: u64,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            last: Instant::now(),
            last_epoch: 0,
        }
    }

    fn tick(&mut self, t0: Instant, backup: &Proc, primary_hv: Option<&Running>, client: &Proc) {
        if !self.enabled || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        let dt = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let eps = committed_epochs(backup);
        let (epoch, pages, _) = eps.last().copied().unwrap_or((0, 0, 0));
        let rate = (epoch.saturating_sub(self.last_epoch)) as f64 / dt;
        self.last_epoch = epoch;
        let recent: Vec<_> = eps.iter().rev().take(20).collect();
        let avg_pages = if recent.is_empty() {
            0.0
        } else {
            recent.iter().map(|e| e.1 as f64).sum::<f64>() / recent.len() as f64
        };
        let shipped: u64 = eps.iter().map(|e| e.2).sum();
        let hv = primary_hv
            .map(Running::hv_output_so_far)
            .unwrap_or_default();
        let pause = hv
            .lines()
            .rev()
            .find_map(|l| num(l, "pause_cycles"))
            .map_or("-".into(), |p| format!("{p}"));
        let held = hv
            .lines()
            .rev()
            .find_map(|l| num(l, "held"))
            .map_or("-".into(), |h| format!("{h}"));
        let answered = client_answered(client);
        println!(
            "[{:6.1}s] epoch {epoch:5} ({rate:5.1}/s)  dirty {avg_pages:5.1} pages/epoch (last {pages})  \
             shipped {:8.2} MB  pause {pause} cycles  held {held}  client answered {answered}",
            t0.elapsed().as_secs_f64(),
            shipped as f64 / 1e6
        );
    }
}

/// Run one scenario end to end.
pub fn run(ctx: &mut Ctx, sc: &Scenario, progress: &mut Progress) -> Result<Outcome> {
    let doppel = doppel_bin()?;
    let echo = progress.enabled;
    let primary_cmd = kv_primary_cmdline();
    let standby_cmd = format!("mode=standby keys={KEYS} guest-mem={GUEST_MIB}");
    if echo {
        println!("demo: booting the primary machine (QEMU, AMD SVM): {primary_cmd}");
    }
    let mut prim = boot(
        ctx,
        &doppel,
        &primary_cmd,
        &format!("failover-{}-primary", sc.run),
    )?;
    if echo {
        println!("demo: booting the standby machine (QEMU): {standby_cmd}");
    }
    let stby = boot(
        ctx,
        &doppel,
        &standby_cmd,
        &format!("failover-{}-standby", sc.run),
    )?;

    let hb = HEARTBEAT_TIMEOUT.to_string();
    let (mut backup, listen, bclients) = spawn_backup(
        &doppel,
        "backup",
        &stby.ram.0,
        &["--heartbeat-timeout", &hb, "--accept-timeout", "120"],
        echo,
    )?;
    let relay = Relay::start(&listen)?;
    let (mut primary, pclients) = spawn_primary(
        &doppel,
        "primary",
        &prim.ram.0,
        &relay.addr,
        &["--event-timeout", &EVENT_TIMEOUT.to_string()],
        echo,
    )?;
    let mut client = Proc::spawn(
        "client",
        Command::new(&doppel)
            .args(["client", "--connect", &pclients, "--failover", &bclients])
            .args(["--ops", &sc.ops.to_string(), "--keys", &KEYS.to_string()])
            .args(["--seed", &sc.seed.to_string()])
            .args(["--reply-timeout", "8", "--connect-timeout", "60"]),
        echo,
    )?;
    let t0 = Instant::now();
    let mut out = Outcome::default();
    // Wait for the fault's epoch.
    let limit = Duration::from_secs(300);
    loop {
        progress.tick(t0, &backup, prim.qemu.as_ref(), &client);
        let e = committed_epochs(&backup).last().map(|e| e.0);
        if e.is_some_and(|e| e >= sc.at_epoch) {
            break;
        }
        if !client.alive() {
            bail!(
                "the client finished before epoch {} (make --ops larger):\n{}",
                sc.at_epoch,
                tail(&client.out(), 5)
            );
        }
        if !primary.alive() || !backup.alive() {
            bail!(
                "a tool died before the fault:\nprimary:\n{}\nbackup:\n{}",
                tail(&primary.err(), 20),
                tail(&backup.err(), 20)
            );
        }
        if t0.elapsed() > limit {
            bail!(
                "epoch {} not committed within {} s",
                sc.at_epoch,
                limit.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(sc.delay_ms));
    let at = committed_epochs(&backup).last().map_or(0, |e| e.0);
    out.client_answered_before = client_answered(&client);
    // A client that is done already would pass without ever talking to
    // the activated standby: the run would prove nothing about failover.
    if !client.alive() || out.client_answered_before >= sc.ops {
        bail!(
            "the client finished before the fault at epoch {at} (answered {} of {}; \
             make --ops larger):\n{}",
            out.client_answered_before,
            sc.ops,
            tail(&client.out(), 5)
        );
    }
    let t_fault = Instant::now();
    if echo {
        println!("demo: *** killing {} at epoch {at} ***", sc.fault.name());
    }
    match sc.fault {
        Fault::Qemu => {
            if let Some(q) = prim.qemu.as_mut() {
                q.kill();
            }
        }
        Fault::Primary => primary.kill(),
        Fault::Link => relay.cut.store(true, Ordering::SeqCst),
    }
    // The backup takes over; the client finishes against it.
    let failover_line = backup.wait_line("failover:", Duration::from_secs(120))?;
    out.failover_secs = t_fault.elapsed().as_secs_f64();
    let verdict = client_verdict(&mut client, Duration::from_secs(300), |c| {
        progress.tick(t0, &backup, None, c);
        Ok(())
    })
    .context("after the failover")?;
    let resumed = failover_line
        .split("committed epoch ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.trim_end_matches([',', ';', '.']).parse::<u64>().ok());
    let lost = num(&verdict, "lost_acked");
    let divergent = num(&verdict, "divergent");
    let ops = num(&verdict, "ops").unwrap_or(0);
    // Every request answered, and by the standby for some of them: the
    // client failed over exactly once (`ops` only echoes the workload).
    let answered = num(&verdict, "answered");
    let failovers = num(&verdict, "failovers");
    let mut pass = verdict.contains("result=pass")
        && lost == Some(0)
        && divergent == Some(0)
        && ops == sc.ops
        && answered == Some(sc.ops)
        && failovers == Some(1)
        && resumed.is_some();
    if failovers != Some(1) {
        out.notes.push(format!(
            "the client failed over {failovers:?} times, not once: `{verdict}`"
        ));
    }
    // The activated standby never checkpoints, so it runs its guest
    // without write-protecting it.
    let sb = stby
        .qemu
        .as_ref()
        .map(Running::hv_output_so_far)
        .unwrap_or_default();
    if !sb
        .find("standby: activated")
        .is_some_and(|a| sb[a..].contains(STANDBY_UNTRACKED))
    {
        out.notes.push(format!(
            "the activated standby did not log `{STANDBY_UNTRACKED}`"
        ));
        pass = false;
    }
    if sc.fault == Fault::Link {
        // Split brain: the primary is still up. Say what it did.
        let hv = prim
            .qemu
            .as_ref()
            .map(Running::hv_output_so_far)
            .unwrap_or_default();
        let last_release = hv
            .lines()
            .rev()
            .find(|l| l.contains("checkpoint epoch="))
            .unwrap_or("");
        out.notes.push(format!(
            "split-brain: run={} link cut at epoch {at}; primary machine still running={}, \
             doppel primary running={}; the backup activated on heartbeat loss ({failover_line}); \
             the primary could commit nothing until it gave the backup up (--ack-timeout), \
             when the client had failed over already (last hypervisor checkpoint line: `{}`)",
            sc.run,
            prim.qemu.is_some(),
            primary.alive(),
            last_release.trim()
        ));
        // The old tool gives up on the backup's ack and serves on,
        // unprotected (without a witness nothing stops it: README, "Split
        // brain"). Stopped, it detaches; its guest runs on unprotected,
        // and a second primary can attach to it.
        let lost = primary.wait_line("primary: backup lost (", Duration::from_secs(150));
        let serving = lost.is_ok() && primary.alive();
        primary.interrupt()?;
        let status = primary.wait_exit(Duration::from_secs(120))?;
        let exited = status.is_some_and(|s| s.code() == Some(5));
        let hv_log = || {
            prim.qemu
                .as_ref()
                .map(Running::hv_output_so_far)
                .unwrap_or_default()
        };
        let detached = hv_log().contains(DETACHED);
        // At its next epoch end the detached guest stops being
        // write-protected (no exit per first write any more).
        let t = Instant::now();
        let untracked = loop {
            let hv = hv_log();
            let off = hv
                .find(DETACHED)
                .is_some_and(|d| hv[d..].contains(TRACKING_OFF));
            if off || t.elapsed() > Duration::from_secs(60) {
                break off;
            }
            thread::sleep(Duration::from_millis(200));
        };
        let cap = crate::out_dir().join(format!("failover-{}-reattach.bin", sc.run));
        let again = Command::new(&doppel)
            .args(["primary", "--machine-ram"])
            .arg(&prim.ram.0)
            .arg("--record")
            .arg(&cap)
            .args([
                "--epochs",
                "2",
                "--wait-control",
                "10",
                "--event-timeout",
                "120",
            ])
            .output()?;
        let reattached = again.status.success();
        let _ = std::fs::remove_file(&cap);
        // The new session's epochs were tracked again: "on" after the
        // "off" that followed the first Detach. (The second tool detaches
        // too, so a later "off" may already follow.)
        let retracked = {
            let hv = hv_log();
            hv.find(DETACHED)
                .and_then(|d| hv[d..].find(TRACKING_OFF).map(|o| d + o))
                .is_some_and(|o| hv[o..].contains(TRACKING_ON))
        };
        out.notes.push(format!(
            "after the cut: old doppel primary gave the backup up and served on \
             unprotected={serving}; stopped by SIGINT, it exited with 5={exited}; its hypervisor logged \
             `{DETACHED}`={detached}, then `{TRACKING_OFF}`={untracked}; a second doppel \
             primary attached to the running guest and committed 2 epochs={reattached}, \
             with `{TRACKING_ON}`={retracked}"
        ));
        if !reattached {
            out.notes.push(format!(
                "second primary {}: {}",
                again.status,
                String::from_utf8_lossy(&again.stderr)
            ));
        }
        pass &= serving && exited && detached && untracked && reattached && retracked;
    }
    // Epoch 0 carries every page; the per-epoch figures are the steady
    // state after it.
    let eps = committed_epochs(&backup);
    out.epochs = eps.len() as u64;
    out.pages = eps.iter().filter(|e| e.0 > 0).map(|e| e.1).sum();
    out.bytes = eps.iter().filter(|e| e.0 > 0).map(|e| e.2).sum();
    // The killed machine's text stays readable in its log file.
    let hv = prim
        .qemu
        .as_ref()
        .map(Running::hv_output_so_far)
        .unwrap_or_default();
    out.pause_cycles = hv.lines().filter_map(|l| num(l, "pause_cycles")).collect();
    out.epoch_cycles = hv.lines().filter_map(|l| num(l, "epoch_cycles")).collect();
    out.last_primary_epoch = hv
        .lines()
        .rev()
        .filter(|l| l.contains("checkpoint epoch="))
        .find_map(|l| num(l, "epoch"));
    out.resumed = resumed;
    out.line = format!(
        "{} at_epoch={at} client_ops={ops} lost_acked={} divergent={} resumed_epoch={} result={}",
        sc.line_head(),
        lost.map_or("?".into(), |v| v.to_string()),
        divergent.map_or("?".into(), |v| v.to_string()),
        resumed.map_or("?".into(), |v| v.to_string()),
        if pass { "pass" } else { "fail" }
    );
    out.pass = pass;
    if !pass {
        out.notes.push(format!("client: {verdict}"));
        out.notes.push(format!("backup: {failover_line}"));
        out.notes
            .push(format!("client stderr:\n{}", tail(&client.err(), 15)));
    }
    drop(client);
    drop(primary);
    drop(backup);
    drop(stby);
    prim.qemu.take();
    Ok(out)
}

/// `cargo xtask test` step: a few runs (one per fault), or 21 with
/// `--long`.
pub fn step_failover(ctx: &mut Ctx) -> Result<String> {
    let runs: u32 = if ctx.long { 21 } else { 3 };
    let seed = ctx.seed.unwrap_or_else(random_seed);
    println!("failover: seed={seed} runs={runs} (replay: cargo xtask test --only failover --seed {seed})");
    let mut lines = Vec::new();
    let mut failed = 0;
    for n in 0..runs {
        let sc = Scenario::nth(n, seed);
        let mut p = Progress::new(false);
        match run(ctx, &sc, &mut p) {
            Ok(o) => {
                println!("{}", o.line);
                println!("{}", o.figures(n));
                for note in &o.notes {
                    println!("{note}");
                }
                if !o.pass {
                    failed += 1;
                }
                lines.push(o.line);
            }
            Err(e) => {
                failed += 1;
                let line = format!(
                    "{} at_epoch={} result=fail ({e:#})",
                    sc.line_head(),
                    sc.at_epoch
                );
                println!("{line}");
                lines.push(line);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {runs} failover runs failed (seed={seed}; replay with --seed {seed})");
    }
    Ok(format!(
        "{runs} failover runs passed (qemu, primary and link faults; seed={seed})"
    ))
}

/// `cargo xtask demo`.
pub fn demo(ctx: &mut Ctx) -> Result<()> {
    let sc = Scenario::demo(ctx.seed.unwrap_or_else(random_seed));
    println!(
        "demo: a key-value service replicated from one QEMU machine to another; the client \
         checks every answer; the primary machine is killed at epoch {} (seed={}; replay: \
         cargo xtask demo --seed {})",
        sc.at_epoch, sc.series, sc.series
    );
    let mut p = Progress::new(true);
    let o = run(ctx, &sc, &mut p)?;
    println!("{}", o.line);
    println!("{}", o.figures(0));
    for n in &o.notes {
        println!("{n}");
    }
    println!(
        "demo: failover took {:.1} s of wall clock (emulated machines), {} epochs were \
         committed before the kill",
        o.failover_secs, o.epochs
    );
    if !o.pass {
        bail!("the demo's failover did not pass");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `seed=S` of a `failover:` line (what a reader replays with).
    fn seed_of(line: &str) -> Option<u64> {
        line.strip_prefix("failover: ")?
            .split_whitespace()
            .find_map(|w| w.strip_prefix("seed="))?
            .parse()
            .ok()
    }

    fn plan(seed: u64) -> Vec<(Fault, u64, u64, u64)> {
        (0..21)
            .map(|n| Scenario::nth(n, seed))
            .map(|s| (s.fault, s.at_epoch, s.delay_ms, s.seed))
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_kill_plan() {
        assert_eq!(plan(0xd0bb_e1f0), plan(0xd0bb_e1f0));
        let (a, b) = (plan(1), plan(2));
        assert_ne!(a, b, "the seed must choose the kill points");
        // Every fault in turn; kill points inside the bounds.
        assert_eq!(
            a[..3].iter().map(|p| p.0).collect::<Vec<_>>(),
            [Fault::Qemu, Fault::Primary, Fault::Link]
        );
        assert!(a.iter().all(|p| (6..36).contains(&p.1) && p.2 < 400));
        let (d1, d2) = (Scenario::demo(9), Scenario::demo(9));
        assert_eq!((d1.delay_ms, d1.seed), (d2.delay_ms, d2.seed));
    }

    #[test]
    fn random_seeds_differ() {
        let seeds: Vec<u64> = (0..8).map(|_| random_seed()).collect();
        for (i, s) in seeds.iter().enumerate() {
            assert!(!seeds[i + 1..].contains(s), "{seeds:?}");
        }
    }

    #[test]
    fn every_failover_line_carries_its_seed() {
        let sc = Scenario::nth(4, 12_345_678_901);
        let head = sc.line_head();
        assert_eq!(head, "failover: run=4 seed=12345678901 killed=primary");
        assert_eq!(
            seed_of(&format!("{head} at_epoch=9 result=pass")),
            Some(12_345_678_901)
        );
        // The seed read back from a line replays the same run.
        let again = Scenario::nth(4, seed_of(&head).unwrap());
        assert_eq!(
            (again.fault, again.at_epoch, again.delay_ms, again.seed),
            (sc.fault, sc.at_epoch, sc.delay_ms, sc.seed)
        );
        assert_eq!(seed_of("failover: run=4 killed=qemu result=pass"), None);
        assert_eq!(seed_of("figures: seed=3"), None);
    }
}
