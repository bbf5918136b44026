//! Issue 21 end to end: Redis in a Linux VM with a NIC and a disk,
//! protected by Doppel, and a client's TCP connection that survives a
//! kill -9 of the primary.
//!
//! `linux-ha-qemu-svm` boots two QEMU machines (`-cpu EPYC`, `-icount`),
//! the primary with `mode=linux replicate=primary devices=net,blk` and
//! the standby with `replicate=standby devices=net,blk`, both with the
//! network initramfs of issue 20 (Redis on an ext4 disk). `doppel
//! primary` embeds the device model (its TAP on the bridge, the primary's
//! disk) and ships every epoch's pages, machine records, device state and
//! disk writes; `doppel backup` holds the standby's disk copy and owns a
//! second TAP on the same bridge with the same MAC, silent until it
//! activates. From the client namespace one long-lived connection INCRs
//! a counter (every reply the previous plus one) beside redis-benchmark.
//! At a seeded moment the primary's QEMU or `doppel primary` is killed
//! with SIGKILL; the backup activates the standby, its device model
//! announces the MAC, and the same TCP connection must go on answering.
//! At the end SHUTDOWN powers the guest off and the backup's disk is
//! checked (`e2fsck -fn`, and the AOF holds every acknowledged INCR).
//!
//! One verdict line per run:
//! `linux-failover: run=K seed=S killed=qemu|primary at_epoch=E
//! incr_acked=N lost_acked=0 gap=0 connection=kept fsck=clean
//! result=pass`.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::ctx::Ctx;
use crate::harness::{committed_epochs, doppel_bin, random_seed, splitmix, wait_for};
use crate::image::Module;
use crate::linuxboot::{self, QEMU_TSC_KHZ};
use crate::linuxfail::{boot_with, Machine};
use crate::linuxnet::{self, GUEST_IP, GUEST_MAC, REDIS_PORT};
use crate::proc::{tail, Proc, SaveLogs};
use crate::workload::{self, IncrTrack, NetGuard};

const STEP: &str = "linux-ha-qemu-svm";

/// Runs in `cargo xtask test`, and with `--long`.
const RUNS: u32 = 3;
const LONG_RUNS: u32 = 20;

/// The hypervisor's epoch policy in these runs: guest time, Remus's 40 Hz.
const EPOCH_MS: u64 = 25;

/// INCRs the one connection must have acknowledged after the failover.
const AFTER_FAILOVER: u64 = 20;

/// What one run kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kill {
    /// The primary's QEMU: the primary host's machine dies.
    Qemu,
    /// `doppel primary`: the replication tool and its device model die;
    /// the primary machine waits at its next epoch end for ever.
    Primary,
}

impl Kill {
    fn name(self) -> &'static str {
        match self {
            Kill::Qemu => "qemu",
            Kill::Primary => "primary",
        }
    }
}

/// One run of a seeded series: what is killed and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub run: u32,
    pub series: u64,
    pub kill: Kill,
    /// Epochs the backup commits after the client's first INCR before
    /// the kill.
    pub after_epochs: u64,
    /// INCRs the one connection has acknowledged before the kill.
    pub after_acked: u64,
}

impl Plan {
    /// The `run`th run of series `seed`: the victim alternates, the
    /// moment is drawn from the seed (1 to 12 epochs, 25 ms of guest time
    /// each, after the client's connection answered).
    pub(crate) fn nth(run: u32, seed: u64) -> Self {
        let x = splitmix(seed ^ u64::from(run).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Self {
            run,
            series: seed,
            kill: if (x >> 32) & 1 == 0 {
                Kill::Qemu
            } else {
                Kill::Primary
            },
            after_epochs: 1 + x % 12,
            after_acked: 5 + (x >> 8) % 56,
        }
    }
}

/// The series' plans: the victim alternates within a series whatever
/// the seed draws for the first run, so that three runs see both.
pub(crate) fn plans(n: u32, seed: u64) -> Vec<Plan> {
    let first = Plan::nth(0, seed).kill;
    (0..n)
        .map(|k| {
            let mut p = Plan::nth(k, seed);
            p.kill = match (first, k % 2) {
                (Kill::Qemu, 0) | (Kill::Primary, 1) => Kill::Qemu,
                _ => Kill::Primary,
            };
            p
        })
        .collect()
}

pub fn step_ha(ctx: &mut Ctx) -> Result<String> {
    let seed = ctx.seed.unwrap_or_else(random_seed);
    let n = if ctx.long { LONG_RUNS } else { RUNS };
    let mut lines = Vec::new();
    for plan in plans(n, seed) {
        let line = one_run(ctx, &plan, None)
            .with_context(|| format!("{STEP}: run {} of seed {seed} ({:?})", plan.run, plan))?;
        println!("{line}");
        lines.push(line);
    }
    Ok(lines.join("; "))
}

fn modules(guest: &linuxnet::NetImage) -> Vec<Module> {
    vec![
        Module {
            path: guest.base.pvh.clone(),
            args: linuxboot::linux_cmdline(QEMU_TSC_KHZ),
        },
        Module {
            path: guest.initramfs.clone(),
            args: "initrd".into(),
        },
    ]
}

/// The backup's disk copy: as large as the primary's, zero (the initial
/// sync fills it).
fn blank_like(src: &Path, dst: &Path) -> Result<()> {
    let len = fs::metadata(src)?.len();
    let f = fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    f.set_len(len)?;
    Ok(())
}

/// `cargo xtask demo --linux`: one run, shown as it happens.
pub fn demo(ctx: &mut Ctx) -> Result<()> {
    let seed = ctx.seed.unwrap_or_else(random_seed);
    let plan = plans(1, seed)[0];
    println!(
        "demo: Redis in a Debian Linux VM (QEMU TCG, -cpu EPYC) protected by Doppel: a primary and a \
         standby machine, each epoch ({EPOCH_MS} ms of guest time) shipped to the backup; one client \
         connection INCRs a counter; {} is killed with SIGKILL once {} INCRs are acknowledged \
         (seed {seed}; replay with --seed {seed})",
        if plan.kill == Kill::Qemu { "the primary's QEMU" } else { "`doppel primary`" },
        plan.after_acked
    );
    let mut live = Live::default();
    let line = one_run(ctx, &plan, Some(&mut live))?;
    println!("{line}");
    Ok(())
}

/// The demo's running account, a line every two seconds.
#[derive(Default)]
pub(crate) struct Live {
    last: Option<Instant>,
    epochs_then: Option<(Instant, u64)>,
}

impl Live {
    fn show(
        &mut self,
        phase: &str,
        backup: &Proc,
        primary: &Proc,
        machine: Option<&crate::emu::Running>,
        checker: Option<&Proc>,
    ) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        let now = Instant::now();
        self.last = Some(now);
        let c = committed_epochs(backup);
        let (epoch, pages, bytes) = c.last().copied().unwrap_or((0, 0, 0));
        let rate = match self.epochs_then {
            Some((t, e0)) if epoch >= e0 => {
                (epoch - e0) as f64 / t.elapsed().as_secs_f64().max(0.1)
            }
            _ => 0.0,
        };
        self.epochs_then = Some((now, epoch));
        let held = primary
            .err()
            .iter()
            .rev()
            .find_map(|l| crate::logline::num(l, "held_frames"))
            .map_or("-".into(), |h| h.to_string());
        let ops = checker.map_or(0, |c| workload::progress_acked(&c.out()));
        if phase == "failed over" {
            println!(
                "demo: [{phase}] the standby serves, unprotected; the same connection: incr_acked={ops}"
            );
            return;
        }
        // The primary hypervisor's last epoch-end pause (-icount cycles).
        let pause = machine
            .map(|m| m.hv_output_so_far())
            .and_then(|t| {
                t.lines().rev().find_map(|l| {
                    crate::logline::num(l.split("primary: epoch=").nth(1)?, "pause_cycles")
                })
            })
            .map_or("-".into(), |p| p.to_string());
        println!(
            "demo: [{phase}] committed_epoch={epoch} epochs_per_s={rate:.1} (host) last_epoch: dirty_pages={pages} bytes={bytes} pause_cycles={pause} held_frames={held} incr_acked={ops}"
        );
    }
}

/// redis-benchmark's SET and GET against the guest (`-n 30 -c 2`: every
/// protected request waits for an epoch's commit, seconds of host time
/// under emulation), which must report both.
fn benchmark(net: &NetGuard, what: &str) -> Result<workload::Benchmark> {
    let (code, text) = Proc::spawn(
        "redis-benchmark",
        net.client_command("redis-benchmark")
            .args(["-h", GUEST_IP, "-p", &REDIS_PORT.to_string()])
            .args(["-n", "30", "-c", "2", "-q", "-t", "set,get"]),
        false,
    )?
    .finish(Duration::from_secs(600))?;
    let b = workload::parse_benchmark(&text, 30);
    ensure!(
        code == Some(0) && b.rates.len() == 2,
        "redis-benchmark {what}: exit {code:?}, {} of 2 tests reported:\n{text}",
        b.rates.len()
    );
    Ok(b)
}

fn one_run(ctx: &mut Ctx, plan: &Plan, mut live: Option<&mut Live>) -> Result<String> {
    let doppel = doppel_bin()?;
    let guest = linuxnet::build()?;
    let dir = workload::run_dir(&format!("{STEP}-{}", plan.run))?;
    let (pdisk, bdisk) = (dir.join("primary-disk.img"), dir.join("backup-disk.img"));
    workload::make_disk(&pdisk)?;
    blank_like(&pdisk, &bdisk)?;
    let net = NetGuard::create()?;
    let btap = net.add_tap("b")?;
    let tag = format!("{STEP}-{}", plan.run);
    let mut stby: Machine = boot_with(
        ctx,
        &doppel,
        "standby",
        &format!("{tag}-standby"),
        "devices=net,blk",
        modules(&guest),
    )?;
    // The standby only spins until it is activated: on this one host it
    // must not take a core from the primary machine and the tools.
    if let Some(q) = &stby.qemu {
        q.set_nice(19)?;
    }
    let mut prim: Machine = boot_with(
        ctx,
        &doppel,
        "primary",
        &format!("{tag}-primary"),
        &format!("devices=net,blk epoch-ms={EPOCH_MS}"),
        modules(&guest),
    )?;
    let net_arg = |tap: &str| format!("tap={tap},mac={GUEST_MAC}");
    let mut backup = Proc::spawn(
        "backup",
        net.host_command(&doppel)
            .args(["backup", "--listen", "127.0.0.1:0", "--standby-ram"])
            .arg(&stby.ram.0)
            .args(["--serve-clients", "127.0.0.1:0"])
            .args(["--heartbeat-timeout", "4", "--accept-timeout", "300"])
            .args(["--net", &net_arg(&btap), "--disk"])
            .arg(&bdisk),
        false,
    )?;
    let mut logs = SaveLogs::new(&dir);
    logs.add(&backup);
    let listen = backup.wait_value("listening on ", Duration::from_secs(60))?;
    let mut primary = Proc::spawn(
        "primary",
        net.host_command(&doppel)
            .args(["primary", "--machine-ram"])
            .arg(&prim.ram.0)
            .args(["--backup", &listen, "--wait-control", "120"])
            .args(["--event-timeout", "4", "--compress"])
            .args(["--net", &net_arg(&net.tap), "--disk"])
            .arg(&pdisk),
        false,
    )?;
    logs.add(&primary);
    let why = |b: &Proc, p: &Proc| {
        format!(
            "backup:\n{}\nprimary:\n{}",
            tail(&b.err(), 20),
            tail(&p.err(), 20)
        )
    };

    // The one connection, and the benchmark beside it.
    let exe = std::env::current_exe().context("the xtask binary's path")?;
    let stop = dir.join("checker.stop");
    let _ = fs::remove_file(&stop);
    let addr = format!("{GUEST_IP}:{REDIS_PORT}");
    let mut checker = Proc::spawn(
        "incr checker",
        net.client_command(&exe)
            .arg("net-checker")
            .args(["--addr", &addr])
            .arg("--stop-file")
            .arg(&stop)
            .args(["--ready-timeout", "900", "--io-timeout", "300"]),
        false,
    )?;
    logs.add(&checker);
    let ready = wait_for(
        "Redis answering the checker's PING",
        Duration::from_secs(900),
        || {
            if backup.exited()? || primary.exited()? || checker.exited()? {
                bail!("a tool or the checker stopped early");
            }
            if let Some(l) = live.as_deref_mut() {
                l.show("booting", &backup, &primary, prim.qemu.as_ref(), None);
            }
            Ok(checker
                .out()
                .iter()
                .any(|l| l.starts_with("checker: ready")))
        },
    );
    if let Err(e) = ready {
        bail!(
            "{e:#}\nchecker:\n{}\n{}",
            tail(&checker.err(), 10),
            why(&backup, &primary)
        );
    }
    // Throughput protected, measured before the kill (the same benchmark
    // runs again on the activated standby, unprotected, after it).
    let protected = benchmark(&net, "protected")?;
    // Load beside the one connection while the primary dies (its own
    // connections are not judged).
    let mut load = Proc::spawn(
        "redis-benchmark load",
        net.client_command("redis-benchmark")
            .args(["-h", GUEST_IP, "-p", &REDIS_PORT.to_string()])
            .args(["-n", "1000000", "-c", "1", "-q", "-t", "set,get"]),
        false,
    )?;
    let last_epoch = |b: &Proc| committed_epochs(b).iter().map(|(e, _, _)| *e).max();
    let start_epoch = last_epoch(&backup).unwrap_or(0);
    let armed = wait_for(
        "the backup committing epochs while the client works",
        Duration::from_secs(600),
        || {
            if backup.exited()? || primary.exited()? {
                bail!("a tool stopped before the kill");
            }
            if let Some(l) = live.as_deref_mut() {
                l.show(
                    "protected",
                    &backup,
                    &primary,
                    prim.qemu.as_ref(),
                    Some(&checker),
                );
            }
            Ok(
                last_epoch(&backup).is_some_and(|e| e >= start_epoch + plan.after_epochs)
                    && workload::progress_acked(&checker.out()) >= plan.after_acked,
            )
        },
    );
    if let Err(e) = armed {
        bail!("{e:#}\n{}", why(&backup, &primary));
    }
    let at_epoch = last_epoch(&backup).unwrap_or(0);
    let acked_at_kill = workload::progress_acked(&checker.out());
    let mut hv_primary = String::new();
    match plan.kill {
        Kill::Qemu => {
            if let Some(mut q) = prim.qemu.take() {
                hv_primary = q.hv_output_so_far();
                q.kill();
            }
        }
        Kill::Primary => primary.kill(),
    }
    let killed_at = Instant::now();
    if live.is_some() {
        println!(
            "demo: killed {} (SIGKILL) with epoch {at_epoch} committed and {acked_at_kill} INCRs acknowledged",
            if plan.kill == Kill::Qemu { "the primary's QEMU" } else { "doppel primary" }
        );
    }
    let activated = wait_for("the standby's activation", Duration::from_secs(180), || {
        if backup.exited()? {
            bail!("the backup exited instead of activating the standby");
        }
        Ok(backup.out().iter().any(|l| l.starts_with("failover:")))
    });
    if let Err(e) = activated {
        bail!("{e:#}\n{}", why(&backup, &primary));
    }
    let failover_s = killed_at.elapsed().as_secs_f64();
    if let Some(q) = &stby.qemu {
        q.set_nice(0)?;
    }
    if live.is_some() {
        println!(
            "demo: the backup activated the standby {failover_s:.1} s after the kill: {}",
            backup
                .out()
                .iter()
                .find(|l| l.starts_with("failover:"))
                .map_or("", |l| l.as_str())
        );
    }
    // A primary machine whose tool died waits at its next epoch end, its
    // output held, for ever (fenced): its QEMU only burns a core now.
    if let Some(mut q) = prim.qemu.take() {
        hv_primary = q.hv_output_so_far();
        q.kill();
    }
    // The same connection must answer on.
    let carried = wait_for(
        "the client's connection answering after the failover",
        Duration::from_secs(900),
        || {
            if checker.exited()? {
                bail!("the checker stopped: its connection broke");
            }
            if let Some(l) = live.as_deref_mut() {
                l.show("failed over", &backup, &primary, None, Some(&checker));
            }
            Ok(workload::progress_acked(&checker.out()) >= acked_at_kill + AFTER_FAILOVER)
        },
    );
    if let Err(e) = carried {
        bail!(
            "{e:#}\nchecker:\n{}\n{}",
            tail(&checker.err(), 10),
            why(&backup, &primary)
        );
    }
    load.kill();
    if live.is_some() {
        println!(
            "demo: the same TCP connection answered {} INCRs since the kill, each the previous plus one",
            workload::progress_acked(&checker.out()).saturating_sub(acked_at_kill)
        );
    }
    let unprotected = benchmark(&net, "unprotected (the activated standby)")?;
    fs::write(&stop, b"stop\n")?;
    let (_, text) = checker.finish(Duration::from_secs(120))?;
    let incr = text
        .lines()
        .find_map(IncrTrack::parse)
        .with_context(|| format!("the checker printed no result line:\n{text}"))?;
    let shutdown = Proc::spawn(
        "shutdown client",
        net.client_command(&exe).arg("net-checker").args([
            "--addr",
            &addr,
            "--shutdown",
            "--io-timeout",
            "300",
        ]),
        false,
    )?
    .finish(Duration::from_secs(300))?;
    let run = stby.qemu.take().context("the standby machine")?.wait()?;
    backup.kill();
    primary.kill();
    if let Some(mut q) = prim.qemu.take() {
        q.kill();
    }
    drop(net);
    let report = linuxboot::Report::parse(&run.output);
    let stop_kind = report.stop().map(|s| s.kind.clone()).unwrap_or_default();
    ensure!(
        stop_kind == "poweroff",
        "the standby's guest did not power off after SHUTDOWN (stop={stop_kind}, shutdown client: {:?}); {}",
        shutdown,
        run.describe()
    );
    let d = workload::check_disk(&bdisk, incr.acked)?;
    ensure!(d.fsck_clean, "e2fsck -fn found errors on the backup's disk");
    // Every acknowledged INCR is in the counter's AOF on the backup's disk
    // (the first value the checker saw was 1 on a fresh disk).
    let total = incr.last.unwrap_or(0).max(0) as u64;
    workload::check_aof(d.aof_incr, total)?;
    let kept = incr.errors == 0 && incr.acked >= acked_at_kill + AFTER_FAILOVER;
    ensure!(
        kept && incr.gaps == 0 && incr.lost == 0,
        "the connection: {} (acked {acked_at_kill} before the kill)",
        incr.line()
    );
    let epochs = EpochFigures::collect(&hv_primary, &primary.err());
    println!("figures: {STEP} run={} per-epoch: {epochs}", plan.run);
    let resumed = backup
        .out()
        .iter()
        .find_map(|l| {
            let rest = l.split("activated from committed epoch ").nth(1)?;
            rest.trim().parse::<u64>().ok()
        })
        .context("the backup printed no `activated from committed epoch` line")?;
    let ratio = |test: &str| {
        let p = protected.rates.iter().find(|(t, _)| t == test)?.1;
        let u = unprotected.rates.iter().find(|(t, _)| t == test)?.1;
        Some(format!("{test}={:.4}", p / u.max(f64::MIN_POSITIVE)))
    };
    println!(
        "figures: {STEP} run={} killed={} at_epoch={at_epoch} resumed_epoch={resumed} failover_wall_s={failover_s:.1} (host) acked_before={acked_at_kill} acked_total={} aof_incr={} redis-benchmark protected: {} | unprotected: {} | protected/unprotected: {}",
        plan.run,
        plan.kill.name(),
        incr.acked,
        d.aof_incr,
        protected.lines.join(", "),
        unprotected.lines.join(", "),
        ["SET", "GET"]
            .iter()
            .filter_map(|t| ratio(t))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(format!(
        "linux-failover: run={} seed={} killed={} at_epoch={at_epoch} incr_acked={} lost_acked={} gap={} connection=kept fsck=clean result=pass",
        plan.run,
        plan.series,
        plan.kill.name(),
        incr.acked,
        incr.lost,
        incr.gaps
    ))
}

/// Per-epoch figures of a protected run: from the hypervisor's lines
/// (`primary: checkpoint epoch=E ... dirty=D`, `primary: epoch=E
/// pause_cycles=P`: QEMU `-icount` cycles) and `doppel primary`'s (`epoch
/// K: P pages, page bytes raw R wire W ..., held_frames=H`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct EpochFigures {
    pub epochs: u64,
    pub dirty: Vec<u64>,
    pub pause: Vec<u64>,
    pub raw: Vec<u64>,
    pub wire: Vec<u64>,
    pub held: Vec<u64>,
}

fn stats(v: &[u64]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let mean = s.iter().sum::<u64>() as f64 / s.len() as f64;
    format!(
        "mean={mean:.0} p50={} max={}",
        s[s.len() / 2],
        s[s.len() - 1]
    )
}

impl EpochFigures {
    pub(crate) fn collect(hv: &str, tool: &[String]) -> Self {
        let mut f = Self::default();
        for l in hv.lines() {
            if let Some(rest) = l.split("primary: checkpoint ").nth(1) {
                if let Some(d) = crate::logline::num(rest, "dirty") {
                    f.dirty.push(d);
                }
            } else if let Some(rest) = l.split("primary: epoch=").nth(1) {
                if let Some(p) = crate::logline::num(rest, "pause_cycles") {
                    f.pause.push(p);
                }
            }
        }
        for l in tool {
            let Some(rest) = l.split(" epoch ").nth(1) else {
                continue;
            };
            let Some((_, body)) = rest.split_once(": ") else {
                continue;
            };
            let word = |k: &str| {
                body.split(k)
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .trim_end_matches(',')
                    .parse::<u64>()
                    .ok()
            };
            if let (Some(raw), Some(wire)) = (word("raw "), word("wire ")) {
                f.raw.push(raw);
                f.wire.push(wire);
                if let Some(h) = crate::logline::num(body, "held_frames") {
                    f.held.push(h);
                }
            }
        }
        f.epochs = f.raw.len() as u64;
        f
    }

    /// Cycles of pause per dirty page, over epochs with both figures.
    fn pause_per_page(&self) -> Option<f64> {
        let n = self.dirty.len().min(self.pause.len());
        let pages: u64 = self.dirty[..n].iter().sum();
        let cycles: u64 = self.pause[..n].iter().sum();
        (pages > 0).then(|| cycles as f64 / pages as f64)
    }
}

impl std::fmt::Display for EpochFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let raw: u64 = self.raw.iter().sum();
        let wire: u64 = self.wire.iter().sum();
        write!(
            f,
            "epochs={} dirty_pages[{}] pause_cycles[{}] pause_cycles_per_dirty_page={} page_bytes_plain[{}] page_bytes_compressed[{}] (ratio {:.2}) held_frames_at_release[{}]",
            self.epochs,
            stats(&self.dirty),
            stats(&self.pause),
            self.pause_per_page()
                .map_or("n/a".into(), |c| format!("{c:.0}")),
            stats(&self.raw),
            stats(&self.wire),
            raw as f64 / wire.max(1) as f64,
            stats(&self.held)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_alternates_its_victim_and_replays_from_its_seed() {
        for seed in [0, 1, 42, u64::MAX] {
            let p = plans(3, seed);
            assert_eq!(p, plans(3, seed));
            assert_ne!(p[0].kill, p[1].kill);
            assert_eq!(p[0].kill, p[2].kill);
            assert!(p.iter().all(|x| (1..=12).contains(&x.after_epochs)));
            assert!(p.iter().all(|x| (5..61).contains(&x.after_acked)));
            assert!(p.iter().all(|x| x.series == seed));
        }
        let moments: std::collections::BTreeSet<u64> =
            (0..64).map(|s| plans(1, s)[0].after_epochs).collect();
        assert!(moments.len() > 6, "the moment hardly varies: {moments:?}");
    }

    #[test]
    fn the_per_epoch_figures_are_read_from_both_logs() {
        let hv =
            "doppel-hv: primary: checkpoint epoch=0 pattern=linux dirty=65536 exits=9 held=0\n\
                  doppel-hv: primary: epoch=0 pause_cycles=5000000\n\
                  doppel-hv: primary: checkpoint epoch=1 pattern=linux dirty=100 exits=9 held=0\n\
                  doppel-hv: primary: epoch=1 pause_cycles=100000\n";
        let tool = [
            "2026-12-07T14:00:00Z  INFO doppel::primary: epoch 0: 65536 pages, page bytes raw 268435456 wire 1000000 (ratio 268.44), stream 1000100 bytes, held_frames=0".to_string(),
            "2026-12-07T14:00:01Z  INFO doppel::primary: epoch 1: 100 pages, page bytes raw 409600 wire 20000 (ratio 20.48), stream 21000 bytes, held_frames=3".to_string(),
            "something else".to_string(),
        ];
        let f = EpochFigures::collect(hv, &tool);
        assert_eq!(f.epochs, 2);
        assert_eq!(f.dirty, vec![65536, 100]);
        assert_eq!(f.pause, vec![5_000_000, 100_000]);
        assert_eq!(f.raw, vec![268_435_456, 409_600]);
        assert_eq!(f.wire, vec![1_000_000, 20_000]);
        assert_eq!(f.held, vec![0, 3]);
        let text = f.to_string();
        assert!(text.contains("epochs=2"), "{text}");
        assert!(
            text.contains("held_frames_at_release[mean=2 p50=3 max=3]"),
            "{text}"
        );
    }
}
