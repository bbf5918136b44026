//! `backup-loss` (issue 22): a lost backup does not take the service down.
//!
//! One QEMU machine runs the protected key-value guest (`mode=primary
//! service=kv`); `doppel primary --serve-clients` replicates it to a file
//! backup (`doppel backup --replica`) while a client runs throughout.
//! 1. Once the backup committed a few epochs it is killed (kill -9).
//! 2. The primary must say `primary: backup lost ...; serving unprotected`
//!    and the client must keep being answered: `served_unprotected`.
//! 3. A new backup on the same address (an empty replica): the primary
//!    must say `primary: re-protected by ADDR (new session)` and the new
//!    backup commit epochs again (its epoch 0 is checked by the backup to
//!    carry every guest page): `reprotected`.
//! 4. The client finishes with every answer right (`lost_acked`), then
//!    the primary is stopped by SIGINT: END reaches the new backup (exit
//!    0), and the primary's exit status says it served unprotected (5).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::harness::{
    boot, client_answered, client_verdict, kv_primary_cmdline, spawn_kv_client, spawn_primary,
    wait_for,
};
use crate::harness::{doppel_bin, guest_ram};
use crate::logline::num;
use crate::proc::{tail, Proc};

/// Client requests: enough to outlast the loss and the re-protection.
const OPS: u64 = 3000;
/// Epochs the first backup commits before it is killed, and the second
/// one at least.
const BEFORE: u64 = 4;
const AFTER: u64 = 3;

/// The epoch count of a file backup's `backup: N epochs committed` info
/// lines (about one a second), or of its `backup: last committed epoch E
/// (N epochs)` exit line.
fn backup_epochs(b: &Proc) -> u64 {
    b.err()
        .iter()
        .chain(b.out().iter())
        .filter_map(|l| {
            if let Some(r) = l.split("backup: ").nth(1) {
                if let Some(n) = r.strip_suffix(" epochs)") {
                    return n.rsplit('(').next()?.parse().ok();
                }
                let (n, rest) = r.split_once(' ')?;
                if rest.starts_with("epochs committed") {
                    return n.parse().ok();
                }
            }
            None
        })
        .max()
        .unwrap_or(0)
}

pub fn step_backup_loss(ctx: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let cmdline = kv_primary_cmdline();
    let mut prim = boot(ctx, &doppel, &cmdline, "backup-loss-primary")?;
    let (_, size) = guest_ram(&doppel, &prim.ram.0)?.context("no guest RAM published")?;
    let pages = (size / 4096).to_string();
    let dir = crate::out_dir().join("backup-loss");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let file_backup = |listen: &str, replica: &str| {
        Proc::spawn(
            "backup",
            Command::new(&doppel)
                .args(["backup", "--listen", listen, "--replica"])
                .arg(dir.join(replica))
                .args(["--guest-pages", &pages, "--accept-timeout", "120"]),
            false,
        )
    };
    let mut first = file_backup("127.0.0.1:0", "r1")?;
    let listen = first.wait_value("listening on ", Duration::from_secs(30))?;
    let (mut primary, pclients) = spawn_primary(
        &doppel,
        "primary",
        &prim.ram.0,
        &listen,
        &["--event-timeout", "60", "--ack-timeout", "20"],
        false,
    )?;
    let mut client = spawn_kv_client(&doppel, &pclients, OPS)?;
    let alive = |w: &mut Proc, what: &str| -> Result<()> {
        if !w.alive() {
            bail!(
                "{what} exited:\n{}\n{}",
                tail(&w.out(), 5),
                tail(&w.err(), 20)
            );
        }
        Ok(())
    };
    wait_for(
        &format!("the first backup committing {BEFORE} epochs"),
        Duration::from_secs(300),
        || {
            alive(&mut primary, "doppel primary")?;
            Ok(backup_epochs(&first) >= BEFORE && client_answered(&client) > 0)
        },
    )?;
    let before = client_answered(&client);
    if !client.alive() || before >= OPS {
        bail!("the client finished before the backup was killed (make OPS larger)");
    }
    first.kill();
    let lost = primary.wait_line("primary: backup lost (", Duration::from_secs(60))?;
    println!("backup-loss: killed the backup after {before} answers: {lost}");
    // Answers while no backup exists at all: the guest serves unprotected.
    let at_loss = client_answered(&client);
    let served = wait_for(
        "an answer while unprotected",
        Duration::from_secs(120),
        || {
            alive(&mut primary, "doppel primary")?;
            Ok(client_answered(&client) > at_loss)
        },
    );
    let served_unprotected = served.is_ok() && primary.alive();
    if let Err(e) = &served {
        println!("backup-loss: {e:#}");
    }
    let mut second = file_backup(&listen, "r2")?;
    second.wait_line("listening on ", Duration::from_secs(30))?;
    let again = primary.wait_line("primary: re-protected by ", Duration::from_secs(60));
    let committed = wait_for(
        &format!("the new backup committing {AFTER} epochs"),
        Duration::from_secs(300),
        || {
            alive(&mut second, "the new backup")?;
            Ok(backup_epochs(&second) >= AFTER)
        },
    );
    println!(
        "backup-loss: {}; new backup: {} epochs so far{}",
        again.as_deref().unwrap_or("no re-protected line"),
        backup_epochs(&second),
        committed
            .as_ref()
            .err()
            .map_or(String::new(), |e| format!(" ({e:#})"))
    );
    // The client's verdict.
    let verdict = client_verdict(&mut client, Duration::from_secs(900), |_| {
        alive(&mut primary, "doppel primary")
    })?;
    println!("backup-loss: {verdict}");
    // Stop the primary in order: END to the new backup.
    primary.interrupt()?;
    let pst = primary.wait_exit(Duration::from_secs(120))?;
    let bst = second.wait_exit(Duration::from_secs(60))?;
    let punprot = primary
        .out()
        .into_iter()
        .find(|l| l.starts_with("primary: unprotected for "));
    println!(
        "backup-loss: primary {} ({}); new backup {} ({} epochs)",
        pst.map_or("still running".into(), |s| s.to_string()),
        punprot.as_deref().unwrap_or("no unprotected line"),
        bst.map_or("still running".into(), |s| s.to_string()),
        backup_epochs(&second)
    );
    let reprotected = again.is_ok()
        && committed.is_ok()
        && bst.is_some_and(|s| s.success())
        && backup_epochs(&second) >= AFTER
        && pst.is_some_and(|s| s.code() == Some(5))
        && punprot.is_some_and(|l| l.contains("re-protected 1 times; protected at the end: yes"));
    let lost_acked = num(&verdict, "lost_acked");
    let pass = served_unprotected
        && reprotected
        && lost_acked == Some(0)
        && num(&verdict, "divergent") == Some(0)
        && num(&verdict, "answered") == Some(OPS)
        && verdict.contains("result=pass");
    prim.qemu.take();
    let line = format!(
        "backup-loss: served_unprotected={served_unprotected} reprotected={reprotected} \
         lost_acked={} result={}",
        lost_acked.map_or("?".into(), |v| v.to_string()),
        if pass { "pass" } else { "fail" }
    );
    println!("{line}");
    if !pass {
        bail!(
            "{line}\nprimary:\n{}\nnew backup:\n{}",
            tail(&primary.err(), 20),
            tail(&second.err(), 20)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(line)
}
