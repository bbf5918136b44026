//! `witness-down`: the etcd witness becomes unreachable mid-run (issue 22).
//!
//! Two QEMU machines as in the failover step (tools/xtask/src/failover.rs),
//! a real etcd on loopback, `doppel primary --witness`, `doppel backup
//! --standby-ram --witness` and a client. Once the backup has committed a
//! few epochs and the client has answers, etcd is killed. Then:
//! - the primary must fence itself (`primary: fenced:`) within the lease
//!   TTL plus one epoch's slack, and not detach;
//! - the backup, which loses the primary's stream when it exits, must not
//!   activate: it says `backup: waiting:` and is still waiting, alive,
//!   two TTLs later;
//! - the client's verdict must show no acknowledged answer lost
//!   (`lost_acked=0`; it gives up, no side serves any more).

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::etcd::Etcd;
use crate::harness::doppel_bin;
use crate::harness::{
    boot, client_answered, client_verdict, committed_epochs, kv_primary_cmdline, spawn_backup,
    spawn_primary, wait_for, Machine, DETACHED, GUEST_MIB, KEYS,
};
use crate::logline::num;
use crate::proc::{tail, Proc};
use crate::relay::Relay;

/// Lease TTL of the step (s): short, so the fence comes soon.
const TTL: u64 = 3;

/// The backup's timeouts in both runs.
const BACKUP_TIMEOUTS: [&str; 4] = ["--heartbeat-timeout", "4", "--accept-timeout", "120"];

/// Wait (up to 300 s) until the backup committed `epoch` and the client
/// has answers; failing if one of the three ended before `before`.
fn replicating(epoch: u64, before: &str, [p, b, c]: [&mut Proc; 3]) -> Result<()> {
    wait_for(
        &format!("epoch {epoch} committed with client answers"),
        Duration::from_secs(300),
        || {
            let e = committed_epochs(b).last().map_or(0, |e| e.0);
            if e >= epoch && client_answered(c) > 0 {
                return Ok(true);
            }
            if !p.alive() || !b.alive() || !c.alive() {
                bail!(
                    "a process ended before {before}:\nprimary:\n{}\nbackup:\n{}\nclient:\n{}",
                    tail(&p.err(), 15),
                    tail(&b.err(), 15),
                    tail(&c.err(), 5)
                );
            }
            Ok(false)
        },
    )
}

/// A kv primary and a standby machine, tagged `{tag}-primary` and
/// `{tag}-standby`.
fn machines(ctx: &mut Ctx, doppel: &Path, tag: &str) -> Result<(Machine, Machine)> {
    let prim = boot(
        ctx,
        doppel,
        &kv_primary_cmdline(),
        &format!("{tag}-primary"),
    )?;
    let stby = boot(
        ctx,
        doppel,
        &format!("mode=standby keys={KEYS} guest-mem={GUEST_MIB}"),
        &format!("{tag}-standby"),
    )?;
    Ok((prim, stby))
}

pub fn step_witness_down(ctx: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let mut etcd = Etcd::start("down")?;
    let wit = [
        "--witness",
        &etcd.endpoint,
        "--witness-ttl",
        &TTL.to_string(),
    ];
    let key = format!("/doppel/witness-down-{}/active", std::process::id());
    let (prim, stby) = machines(ctx, &doppel, "witness-down")?;
    let (mut backup, listen, bclients) = spawn_backup(
        &doppel,
        "backup",
        &stby.ram.0,
        &[&BACKUP_TIMEOUTS[..], &wit, &["--witness-key", &key]].concat(),
        false,
    )?;
    let (mut primary, pclients) = spawn_primary(
        &doppel,
        "primary",
        &prim.ram.0,
        &listen,
        &[
            &["--event-timeout", "4"][..],
            &wit,
            &["--witness-key", &key],
        ]
        .concat(),
        false,
    )?;
    primary.wait_line("primary: witness key", Duration::from_secs(60))?;
    let mut client = Proc::spawn(
        "client",
        Command::new(&doppel)
            .args(["client", "--connect", &pclients, "--failover", &bclients])
            .args(["--ops", "200000", "--keys", &KEYS.to_string()])
            .args(["--reply-timeout", "4", "--connect-timeout", "10"]),
        false,
    )?;
    // Replicating, and the client has answers.
    replicating(
        3,
        "etcd was stopped",
        [&mut primary, &mut backup, &mut client],
    )?;
    etcd.kill();
    let killed = Instant::now();
    let fenced = primary.wait_line("primary: fenced:", Duration::from_secs(TTL + 60));
    let fence_secs = killed.elapsed().as_secs_f64();
    // At the deadline (before TTL) plus one epoch of slack for the next
    // CommitEpoch to come along.
    let primary_fenced = fenced.is_ok() && fence_secs <= (TTL + 2) as f64;
    println!(
        "witness-down: primary fence line after {fence_secs:.2} s (lease {TTL} s): {}",
        match &fenced {
            Ok(l) => l.clone(),
            Err(e) => format!("{e:#}"),
        }
    );
    let detached = primary.out().iter().any(|l| l.contains("detached"))
        || prim
            .qemu
            .as_ref()
            .is_some_and(|q| q.hv_output_so_far().contains(DETACHED));
    // The backup loses the stream (the fenced primary exits) and must
    // wait, not activate, for as long as we look.
    let waiting = backup.wait_line("backup: waiting:", Duration::from_secs(TTL + 30));
    if let Ok(l) = &waiting {
        println!("witness-down: {l}");
    }
    thread::sleep(Duration::from_secs(2 * TTL));
    let activated = backup.out().iter().any(|l| l.starts_with("failover:"));
    let backup_waiting = waiting.is_ok() && !activated && backup.alive();
    // The client gives up (nobody serves); its verdict counts lost answers.
    let verdict = client_verdict(&mut client, Duration::from_secs(120), |_| Ok(()))?;
    println!("witness-down: {verdict}");
    let lost = num(&verdict, "lost_acked").context("the verdict has no lost_acked")?;
    let pass = primary_fenced && !detached && backup_waiting && lost == 0;
    let line = format!(
        "witness-down: primary={} backup={} lost_acked={lost} result={}",
        if primary_fenced && !detached {
            "fenced"
        } else {
            "not-fenced"
        },
        if backup_waiting {
            "waiting"
        } else if activated {
            "activated"
        } else {
            "not-waiting"
        },
        if pass { "pass" } else { "fail" }
    );
    println!("{line}");
    if !pass {
        bail!(
            "{line}\nprimary:\n{}\nbackup:\n{}",
            tail(&primary.err(), 15),
            tail(&backup.err(), 15)
        );
    }
    Ok(line)
}

/// Which way a partition run cuts the replication link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    Both,
    PrimaryToBackup,
    BackupToPrimary,
}

impl Cut {
    fn name(self) -> &'static str {
        match self {
            Cut::Both => "both",
            Cut::PrimaryToBackup => "primary->backup",
            Cut::BackupToPrimary => "backup->primary",
        }
    }
}

/// The leading RFC 3339 timestamp of the first stderr line containing
/// `needle` (tracing's format; one host, one clock, so the two tools'
/// stamps compare).
fn stamp(w: &Proc, needle: &str) -> Option<String> {
    w.err()
        .iter()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
}

/// How many sides served at once, from the witness log lines: the
/// backup's taking of the key must come after the primary released it
/// (revoked once its bridge had stopped), and an activation needs the key.
pub(crate) fn active_max(
    primary_released: Option<&str>,
    backup_took: Option<&str>,
    backup_activated: bool,
) -> u32 {
    match (backup_activated, backup_took, primary_released) {
        (false, _, _) => 1,
        (true, None, _) => 2,
        (true, Some(_), None) => 2,
        (true, Some(took), Some(rel)) if took > rel => 1,
        (true, Some(_), Some(_)) => 2,
    }
}

fn partition_run(ctx: &mut Ctx, k: u32, seed: u64, cut: Cut) -> Result<String> {
    let doppel = doppel_bin()?;
    let mut rng = doppel_abi::splitmix::SplitMix64::new(seed ^ u64::from(k));
    let at_epoch = 4 + rng.below(8);
    let etcd = Etcd::start(&format!("partition-{k}"))?;
    let wit = [
        "--witness",
        &etcd.endpoint,
        "--witness-ttl",
        &TTL.to_string(),
    ];
    let key = format!("/doppel/partition-{}-{k}/active", std::process::id());
    let (mut prim, mut stby) = machines(ctx, &doppel, &format!("partition-{k}"))?;
    let (mut backup, listen, bclients) = spawn_backup(
        &doppel,
        "backup",
        &stby.ram.0,
        &[&BACKUP_TIMEOUTS[..], &wit, &["--witness-key", &key]].concat(),
        false,
    )?;
    let relay = Relay::start(&listen)?;
    let (mut primary, pclients) = spawn_primary(
        &doppel,
        "primary",
        &prim.ram.0,
        &relay.addr,
        &[
            &["--event-timeout", "4", "--ack-timeout", "10"][..],
            &wit,
            &["--witness-key", &key],
        ]
        .concat(),
        false,
    )?;
    let ops = 3000;
    let mut client = Proc::spawn(
        "client",
        Command::new(&doppel)
            .args(["client", "--connect", &pclients, "--failover", &bclients])
            .args(["--ops", &ops.to_string(), "--keys", &KEYS.to_string()])
            .args(["--seed", &rng.next_u64().to_string()])
            .args(["--reply-timeout", "30", "--connect-timeout", "30"]),
        false,
    )?;
    replicating(
        at_epoch,
        "the cut",
        [&mut primary, &mut backup, &mut client],
    )?;
    match cut {
        Cut::Both => &relay.cut,
        Cut::PrimaryToBackup => &relay.cut_fwd,
        Cut::BackupToPrimary => &relay.cut_back,
    }
    .store(true, std::sync::atomic::Ordering::SeqCst);
    // The client finishes on whichever side serves.
    let verdict = client_verdict(&mut client, Duration::from_secs(180), |_| Ok(()))?;
    let lost = num(&verdict, "lost_acked").context("the verdict has no lost_acked")?;
    let activated = backup.out().iter().any(|l| l.starts_with("failover:"));
    let waited_while_held = backup
        .out()
        .iter()
        .any(|l| l.starts_with("backup: waiting:") && l.contains("is held by"));
    let released = stamp(&primary, "witness: released");
    let took = stamp(&backup, "witness: holding");
    let active = active_max(released.as_deref(), took.as_deref(), activated);
    // Both machines still run (a partition kills nothing), and so does
    // the backup tool (waiting or serving).
    let both_alive = [&mut prim, &mut stby]
        .into_iter()
        .all(|m| m.qemu.as_mut().is_some_and(|q| q.alive()))
        && backup.alive();
    println!(
        "partition: run={k} cut={} at_epoch={at_epoch} backup waited while held: \
         {waited_while_held}; primary released {released:?}, backup took {took:?}; {verdict}",
        cut.name()
    );
    // The witness must have held the backup back while the primary held
    // the key (it saw the stream stop before the primary gave up).
    let pass = both_alive && active == 1 && lost == 0 && waited_while_held;
    Ok(format!(
        "partition: run={k} seed={seed} witness=etcd both_alive={both_alive} \
         active_max={active} lost_acked={lost} result={}",
        if pass { "pass" } else { "fail" }
    ))
}

pub fn step_partition(ctx: &mut Ctx) -> Result<String> {
    let seed = ctx.seed.unwrap_or_else(crate::harness::random_seed);
    let mut failed = 0;
    let mut last = String::new();
    for (k, cut) in [Cut::Both, Cut::PrimaryToBackup, Cut::BackupToPrimary]
        .into_iter()
        .enumerate()
    {
        let k = k as u32 + 1;
        let line = match partition_run(ctx, k, seed, cut) {
            Ok(l) => l,
            Err(e) => format!("partition: run={k} seed={seed} witness=etcd result=fail ({e:#})"),
        };
        println!("{line}");
        if !line.ends_with("result=pass") {
            failed += 1;
        }
        last = line;
    }
    if failed > 0 {
        bail!(
            "{failed} of 3 partition runs failed (seed={seed}; replay with --seed {seed}): {last}"
        );
    }
    Ok(format!("3 partition runs passed (seed={seed})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::Ordering;

    #[test]
    fn one_side_serving_at_a_time_needs_the_key_taken_after_its_release() {
        // Never activated: one side.
        assert_eq!(active_max(None, None, false), 1);
        // Activated without the key, or while the primary never let go.
        assert_eq!(active_max(None, None, true), 2);
        assert_eq!(active_max(None, Some("2026-01-01T00:00:02Z"), true), 2);
        // Taken after the release: one; at or before it: two.
        let rel = Some("2026-01-01T00:00:01.500000Z");
        assert_eq!(
            active_max(rel, Some("2026-01-01T00:00:01.600000Z"), true),
            1
        );
        assert_eq!(
            active_max(rel, Some("2026-01-01T00:00:01.400000Z"), true),
            2
        );
    }

    #[test]
    fn a_one_way_cut_stops_only_its_direction() {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay::start(&target.local_addr().unwrap().to_string()).unwrap();
        let mut a = TcpStream::connect(&relay.addr).unwrap();
        let (mut b, _) = target.accept().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
        }
        let mut buf = [0u8; 1];
        relay.cut_fwd.store(true, Ordering::SeqCst);
        a.write_all(b"f").unwrap();
        b.write_all(b"r").unwrap();
        a.read_exact(&mut buf).expect("backward still flows");
        assert_eq!(&buf, b"r");
        assert!(b.read_exact(&mut buf).is_err(), "forward is cut");
        relay.cut_fwd.store(false, Ordering::SeqCst);
        relay.cut_back.store(true, Ordering::SeqCst);
        a.write_all(b"g").unwrap();
        b.write_all(b"s").unwrap();
        b.read_exact(&mut buf).expect("forward flows again");
        assert!(buf == *b"f" || buf == *b"g", "{buf:?}");
        assert!(a.read_exact(&mut buf).is_err(), "backward is cut");
    }
}
