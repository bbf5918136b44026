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

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use doppel_abi::splitmix::GAMMA;

use crate::ctx::Ctx;
use crate::emu::Running;
use crate::harness::{
    boot, client_answered, client_verdict, committed_epochs, doppel_bin, kv_primary_cmdline,
    random_seed, spawn_backup, spawn_primary, splitmix, Machine, DETACHED, GUEST_MIB, KEYS,
};
use crate::logline::num;
use crate::proc::{tail, Proc};
use crate::relay::Relay;

/// Seconds without a record before the backup takes over, and without an
/// event before `doppel primary` gives its hypervisor up.
const HEARTBEAT_TIMEOUT: u64 = 4;
const EVENT_TIMEOUT: u64 = 4;
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
    /// The client's verdict line, and what the run reads from it.
    pub verdict: String,
    pub verdict_ops: u64,
    pub lost: Option<u64>,
    pub divergent: Option<u64>,
    /// The backup's `failover:` line.
    pub failover_line: String,
    /// When the fault was injected.
    pub fault_at: Option<Instant>,
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

/// The machines and tools of one run.
struct Rig {
    doppel: PathBuf,
    prim: Machine,
    stby: Machine,
    backup: Proc,
    relay: Relay,
    primary: Proc,
    client: Proc,
}

impl Rig {
    /// The primary hypervisor's lines so far (its log file outlives a
    /// killed machine).
    fn primary_hv(&self) -> String {
        self.prim
            .qemu
            .as_ref()
            .map(Running::hv_output_so_far)
            .unwrap_or_default()
    }
}

/// Run one scenario end to end.
pub fn run(ctx: &mut Ctx, sc: &Scenario, progress: &mut Progress) -> Result<Outcome> {
    let mut rig = start(ctx, sc, progress.enabled)?;
    let t0 = Instant::now();
    let mut out = Outcome::default();
    wait_for_fault_epoch(&mut rig, sc, progress, t0)?;
    let at = inject(&mut rig, sc, progress.enabled, &mut out)?;
    let mut pass = take_over(&mut rig, sc, progress, t0, &mut out)?;
    pass &= standby_untracked(&rig, &mut out);
    if sc.fault == Fault::Link {
        pass &= split_brain(&mut rig, sc, at, &mut out)?;
    }
    figures(&rig, &mut out);
    out.line = format!(
        "{} at_epoch={at} client_ops={} lost_acked={} divergent={} resumed_epoch={} result={}",
        sc.line_head(),
        out.verdict_ops,
        out.lost.map_or("?".into(), |v| v.to_string()),
        out.divergent.map_or("?".into(), |v| v.to_string()),
        out.resumed.map_or("?".into(), |v| v.to_string()),
        if pass { "pass" } else { "fail" }
    );
    out.pass = pass;
    if !pass {
        out.notes.push(format!("client: {}", out.verdict));
        out.notes.push(format!("backup: {}", out.failover_line));
        out.notes
            .push(format!("client stderr:\n{}", tail(&rig.client.err(), 15)));
    }
    let Rig {
        client,
        primary,
        backup,
        stby,
        mut prim,
        ..
    } = rig;
    drop(client);
    drop(primary);
    drop(backup);
    drop(stby);
    prim.qemu.take();
    Ok(out)
}

/// Boot both machines and start the backup, the relay, the primary and
/// the client.
fn start(ctx: &mut Ctx, sc: &Scenario, echo: bool) -> Result<Rig> {
    let doppel = doppel_bin()?;
    let primary_cmd = kv_primary_cmdline();
    let standby_cmd = format!("mode=standby keys={KEYS} guest-mem={GUEST_MIB}");
    if echo {
        println!("demo: booting the primary machine (QEMU, AMD SVM): {primary_cmd}");
    }
    let prim = boot(
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
    let (backup, listen, bclients) = spawn_backup(
        &doppel,
        "backup",
        &stby.ram.0,
        &["--heartbeat-timeout", &hb, "--accept-timeout", "120"],
        echo,
    )?;
    let relay = Relay::start(&listen)?;
    let (primary, pclients) = spawn_primary(
        &doppel,
        "primary",
        &prim.ram.0,
        &relay.addr,
        &["--event-timeout", &EVENT_TIMEOUT.to_string()],
        echo,
    )?;
    let client = Proc::spawn(
        "client",
        Command::new(&doppel)
            .args(["client", "--connect", &pclients, "--failover", &bclients])
            .args(["--ops", &sc.ops.to_string(), "--keys", &KEYS.to_string()])
            .args(["--seed", &sc.seed.to_string()])
            .args(["--reply-timeout", "8", "--connect-timeout", "60"]),
        echo,
    )?;
    Ok(Rig {
        doppel,
        prim,
        stby,
        backup,
        relay,
        primary,
        client,
    })
}

/// Wait until the backup has committed the scenario's epoch, with every
/// tool still at work.
fn wait_for_fault_epoch(
    rig: &mut Rig,
    sc: &Scenario,
    progress: &mut Progress,
    t0: Instant,
) -> Result<()> {
    let limit = Duration::from_secs(300);
    loop {
        progress.tick(t0, &rig.backup, rig.prim.qemu.as_ref(), &rig.client);
        let e = committed_epochs(&rig.backup).last().map(|e| e.0);
        if e.is_some_and(|e| e >= sc.at_epoch) {
            return Ok(());
        }
        if !rig.client.alive() {
            bail!(
                "the client finished before epoch {} (make --ops larger):\n{}",
                sc.at_epoch,
                tail(&rig.client.out(), 5)
            );
        }
        if !rig.primary.alive() || !rig.backup.alive() {
            bail!(
                "a tool died before the fault:\nprimary:\n{}\nbackup:\n{}",
                tail(&rig.primary.err(), 20),
                tail(&rig.backup.err(), 20)
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
}

/// After the scenario's delay, inject its fault; the epoch it landed at.
fn inject(rig: &mut Rig, sc: &Scenario, echo: bool, out: &mut Outcome) -> Result<u64> {
    thread::sleep(Duration::from_millis(sc.delay_ms));
    let at = committed_epochs(&rig.backup).last().map_or(0, |e| e.0);
    out.client_answered_before = client_answered(&rig.client);
    // A client that is done already would pass without ever talking to
    // the activated standby: the run would prove nothing about failover.
    if !rig.client.alive() || out.client_answered_before >= sc.ops {
        bail!(
            "the client finished before the fault at epoch {at} (answered {} of {}; \
             make --ops larger):\n{}",
            out.client_answered_before,
            sc.ops,
            tail(&rig.client.out(), 5)
        );
    }
    out.fault_at = Some(Instant::now());
    if echo {
        println!("demo: *** killing {} at epoch {at} ***", sc.fault.name());
    }
    match sc.fault {
        Fault::Qemu => {
            if let Some(q) = rig.prim.qemu.as_mut() {
                q.kill();
            }
        }
        Fault::Primary => rig.primary.kill(),
        Fault::Link => rig.relay.cut.store(true, Ordering::SeqCst),
    }
    Ok(at)
}

/// The backup takes over and the client finishes against it: whether it
/// lost nothing, agreed on everything and failed over exactly once.
fn take_over(
    rig: &mut Rig,
    sc: &Scenario,
    progress: &mut Progress,
    t0: Instant,
    out: &mut Outcome,
) -> Result<bool> {
    let failover_line = rig
        .backup
        .wait_line("failover:", Duration::from_secs(120))?;
    out.failover_secs = out.fault_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let backup = &rig.backup;
    let verdict = client_verdict(&mut rig.client, Duration::from_secs(300), |c| {
        progress.tick(t0, backup, None, c);
        Ok(())
    })
    .context("after the failover")?;
    let resumed = failover_line
        .split("committed epoch ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.trim_end_matches([',', ';', '.']).parse::<u64>().ok());
    out.lost = num(&verdict, "lost_acked");
    out.divergent = num(&verdict, "divergent");
    out.verdict_ops = num(&verdict, "ops").unwrap_or(0);
    // Every request answered, and by the standby for some of them: the
    // client failed over exactly once (`ops` only echoes the workload).
    let answered = num(&verdict, "answered");
    let failovers = num(&verdict, "failovers");
    let pass = verdict.contains("result=pass")
        && out.lost == Some(0)
        && out.divergent == Some(0)
        && out.verdict_ops == sc.ops
        && answered == Some(sc.ops)
        && failovers == Some(1)
        && resumed.is_some();
    if failovers != Some(1) {
        out.notes.push(format!(
            "the client failed over {failovers:?} times, not once: `{verdict}`"
        ));
    }
    out.resumed = resumed;
    out.verdict = verdict;
    out.failover_line = failover_line;
    Ok(pass)
}

/// The activated standby never checkpoints, so it runs its guest without
/// write-protecting it.
fn standby_untracked(rig: &Rig, out: &mut Outcome) -> bool {
    let sb = rig
        .stby
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
        return false;
    }
    true
}

/// Link cut only (split brain: the primary is still up): say what it did;
/// the old tool must give the backup up and serve on unprotected (without
/// a witness nothing stops it: README, "Split brain"); stopped, it
/// detaches, its guest runs on unprotected, and a second primary can
/// attach to it.
fn split_brain(rig: &mut Rig, sc: &Scenario, at: u64, out: &mut Outcome) -> Result<bool> {
    let hv = rig.primary_hv();
    let last_release = hv
        .lines()
        .rev()
        .find(|l| l.contains("checkpoint epoch="))
        .unwrap_or("");
    out.notes.push(format!(
        "split-brain: run={} link cut at epoch {at}; primary machine still running={}, \
         doppel primary running={}; the backup activated on heartbeat loss ({}); \
         the primary could commit nothing until it gave the backup up (--ack-timeout), \
         when the client had failed over already (last hypervisor checkpoint line: `{}`)",
        sc.run,
        rig.prim.qemu.is_some(),
        rig.primary.alive(),
        out.failover_line,
        last_release.trim()
    ));
    let lost = rig
        .primary
        .wait_line("primary: backup lost (", Duration::from_secs(150));
    let serving = lost.is_ok() && rig.primary.alive();
    rig.primary.interrupt()?;
    let status = rig.primary.wait_exit(Duration::from_secs(120))?;
    let exited = status.is_some_and(|s| s.code() == Some(5));
    let detached = rig.primary_hv().contains(DETACHED);
    // At its next epoch end the detached guest stops being
    // write-protected (no exit per first write any more).
    let t = Instant::now();
    let untracked = loop {
        let hv = rig.primary_hv();
        let off = hv
            .find(DETACHED)
            .is_some_and(|d| hv[d..].contains(TRACKING_OFF));
        if off || t.elapsed() > Duration::from_secs(60) {
            break off;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let cap = crate::out_dir().join(format!("failover-{}-reattach.bin", sc.run));
    let again = Command::new(&rig.doppel)
        .args(["primary", "--machine-ram"])
        .arg(&rig.prim.ram.0)
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
    // The new session's epochs were tracked again: "on" after the "off"
    // that followed the first Detach. (The second tool detaches too, so a
    // later "off" may already follow.)
    let retracked = {
        let hv = rig.primary_hv();
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
    Ok(serving && exited && detached && untracked && reattached && retracked)
}

/// The run's figures: epoch 0 carries every page, so the per-epoch
/// figures are the steady state after it; the killed machine's text stays
/// readable in its log file.
fn figures(rig: &Rig, out: &mut Outcome) {
    let eps = committed_epochs(&rig.backup);
    out.epochs = eps.len() as u64;
    out.pages = eps.iter().filter(|e| e.0 > 0).map(|e| e.1).sum();
    out.bytes = eps.iter().filter(|e| e.0 > 0).map(|e| e.2).sum();
    let hv = rig.primary_hv();
    out.pause_cycles = hv.lines().filter_map(|l| num(l, "pause_cycles")).collect();
    out.epoch_cycles = hv.lines().filter_map(|l| num(l, "epoch_cycles")).collect();
    out.last_primary_epoch = hv
        .lines()
        .rev()
        .filter(|l| l.contains("checkpoint epoch="))
        .find_map(|l| num(l, "epoch"));
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
