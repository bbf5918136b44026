//! `link-auth` (host only, no emulator): the authenticated replication
//! link end to end with real processes over the hypervisor simulator
//! (docs/REPLICATION.md, "Authenticated link").
//!
//! `doppel keygen` makes three identities (primary, backup, intruder); a
//! `doppel backup` with TLS pins the primary. Against it, in turn:
//! - wrong_cert: `doppel primary` with the intruder's (valid, self-signed)
//!   certificate;
//! - no_cert: `doppel primary` without TLS (plain TCP);
//! - replay: a capture recorded from an earlier session of the real
//!   primary, sent with the primary's valid certificate over a new TLS
//!   connection (`doppel stream send`, which does not echo the nonce).
//!
//! Each is `rejected` only if that client failed, the backup logged the
//! rejection, is still running and its replica still holds no epoch.
//! Then the real primary replicates 3 epochs to the same backup process:
//! `result=pass` needs all three rejected and that run complete.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::harness::doppel_bin;
use crate::proc::Proc;
use crate::shm::shm_file;

const PAGES: &str = "256";

fn tls(keys: &Path, me: &str, peer: &str) -> Vec<PathBuf> {
    vec![
        "--tls-cert".into(),
        keys.join(format!("{me}.crt")),
        "--tls-key".into(),
        keys.join(format!("{me}.key")),
        "--peer-cert".into(),
        keys.join(format!("{peer}.crt")),
    ]
}

fn out_text(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Committed epochs of the replica (`doppel inspect`, read-only).
fn committed(doppel: &Path, replica: &Path) -> Result<u64> {
    let o = Command::new(doppel)
        .args(["inspect", "--replica"])
        .arg(replica)
        .output()?;
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    s.split(", ")
        .find_map(|p| p.strip_suffix(" committed epochs"))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("doppel inspect --replica: {}", out_text(&o)))
}

/// The tool and the backup's replica.
struct Env<'a> {
    doppel: &'a Path,
    replica: &'a Path,
}

/// `rejected` when the attempt failed, the backup logged `mark` (once
/// more than before), is alive and its replica is empty.
fn verdict(
    what: &str,
    attempt: &Output,
    bk: &mut Proc,
    (mark, before): (&str, usize),
    env: &Env<'_>,
    log: &mut Vec<String>,
) -> Result<&'static str> {
    let logged = bk.wait_nth(mark, before + 1, Duration::from_secs(15));
    let alive = bk.alive();
    let epochs = committed(env.doppel, env.replica)?;
    let failed = !attempt.status.success();
    log.push(format!(
        "{what}: client {}; backup {}; alive={alive} replica_epochs={epochs}",
        out_text(attempt).lines().last().unwrap_or_default(),
        logged.as_deref().unwrap_or("logged nothing")
    ));
    Ok(if failed && logged.is_some() && alive && epochs == 0 {
        "rejected"
    } else {
        "accepted"
    })
}

pub fn step_link_auth(_: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let dir = crate::out_dir().join("link-auth");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let keys = dir.join("keys");
    for n in ["primary", "backup", "intruder"] {
        let o = Command::new(&doppel)
            .args(["keygen", "--out"])
            .arg(&keys)
            .args(["--name", n])
            .output()?;
        if !o.status.success() {
            bail!("doppel keygen --name {n}: {}", out_text(&o));
        }
    }
    let ram = shm_file("link-auth");
    // Two sessions of 3 epochs: the earlier one recorded, the real one.
    let mut sim = crate::harness::spawn_sim_hv(
        &doppel,
        &ram.0,
        &["--epochs", "6", "--guest-pages", PAGES, "--dirty", "20"],
    )?;
    let primary = |extra: &[PathBuf], dest: &[&str]| -> Result<Output> {
        Ok(Command::new(&doppel)
            .args(["primary", "--machine-ram"])
            .arg(&ram.0)
            .args(["--epochs", "3", "--wait-control", "30"])
            .args(dest)
            .args(extra)
            .output()?)
    };
    // The earlier session, recorded.
    let cap = dir.join("earlier-session.xen");
    let rec = primary(&[], &["--record", cap.to_str().context("path")?])?;
    if !rec.status.success() {
        bail!("recording the earlier session: {}", out_text(&rec));
    }
    let replica = dir.join("bk");
    let mut bk_args: Vec<PathBuf> = vec![
        "backup".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--replica".into(),
        replica.clone(),
        "--guest-pages".into(),
        PAGES.into(),
        "--accept-timeout".into(),
        "300".into(),
        // Shorter than the 2 s a primary waits for the backup's first
        // bytes: the backup's own "no TLS handshake within" verdict must
        // come first (with both at 2 s the plain primary sometimes hung up
        // first and the probe read "the peer closed the connection").
        "--tls-handshake-timeout".into(),
        "1".into(),
    ];
    bk_args.extend(tls(&keys, "backup", "primary"));
    let mut bk = Proc::spawn("backup", Command::new(&doppel).args(&bk_args), false)?;
    let addr = bk
        .wait_nth("listening on ", 1, Duration::from_secs(30))
        .with_context(|| format!("the backup did not start:\n{}", bk.text()))?;
    let addr = addr.trim_start_matches("listening on ").trim().to_string();
    let mut log = Vec::new();

    let wrong = primary(
        &tls(&keys, "intruder", "backup"),
        &["--backup", &addr, "--ack-timeout", "30"],
    )?;
    let env = Env {
        doppel: &doppel,
        replica: &replica,
    };
    let wrong_cert = verdict(
        "wrong_cert",
        &wrong,
        &mut bk,
        ("failed: its certificate is not the pinned one", 0),
        &env,
        &mut log,
    )?;

    let plain = primary(&[], &["--backup", &addr, "--ack-timeout", "30"])?;
    let no_cert = verdict(
        "no_cert",
        &plain,
        &mut bk,
        ("failed: no TLS handshake within", 0),
        &env,
        &mut log,
    )?;

    let mut send: Vec<PathBuf> = vec!["stream".into(), "send".into(), cap.clone()];
    send.extend(["--backup".into(), PathBuf::from(&addr)]);
    send.extend(tls(&keys, "primary", "backup"));
    let replayed = Command::new(&doppel).args(&send).output()?;
    let replay = verdict(
        "replay",
        &replayed,
        &mut bk,
        ("link: rejected the stream: session check failed", 0),
        &env,
        &mut log,
    )?;

    // The real primary, to the same backup process.
    let real = primary(
        &tls(&keys, "primary", "backup"),
        &["--backup", &addr, "--ack-timeout", "30"],
    )?;
    let (code, bk_text) = bk.finish(Duration::from_secs(60))?;
    let replicated = real.status.success()
        && code == Some(0)
        && bk_text.contains("backup: last committed epoch 2 (3 epochs)")
        && committed(&doppel, &replica)? == 3;
    log.push(format!(
        "real primary: {}; backup exit {code:?}",
        String::from_utf8_lossy(&real.stdout)
            .lines()
            .find(|l| l.starts_with("primary: committed"))
            .unwrap_or("no `primary: committed` line")
    ));
    let _ = sim.finish(Duration::from_secs(30));
    for l in &log {
        println!("  {l}");
    }
    let pass = [wrong_cert, no_cert, replay]
        .iter()
        .all(|v| *v == "rejected")
        && replicated;
    let line = format!(
        "link-auth: wrong_cert={wrong_cert} no_cert={no_cert} replay={replay} result={}",
        if pass { "pass" } else { "fail" }
    );
    if !pass {
        bail!("{line}\nreplicated={replicated}\nbackup:\n{bk_text}");
    }
    Ok(line)
}
