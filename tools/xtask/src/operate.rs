//! `status-metrics-qemu-svm` (issue 23): what an operator reads from a
//! running pair is what is happening.
//!
//! One QEMU machine runs the protected key-value guest; `doppel primary`
//! replicates it to a file backup, both with `--status-socket` and
//! `--metrics`, while a client runs.
//! - `doppel status --json` on each side (the command an operator runs)
//!   must parse, carry every documented field, say role and state
//!   `protected`, name the peer, and agree with the other side: the
//!   backup, asked after the primary, has committed at least as far
//!   (it acks before the primary releases). `--field state` must say the
//!   same as the JSON.
//! - Both metrics endpoints are scraped three times; the counters of
//!   epochs, pages and bytes, and the pause and ack latency histograms
//!   (the hypervisor's own pause, published in the control header) must
//!   grow between scrapes.
//! - The backup is then killed: the primary's status must turn
//!   `degraded` with `backup_lost` 1, and its metrics count the loss.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::harness::{
    boot, client_answered, kv_primary_cmdline, spawn_kv_client, spawn_primary, wait_for,
};
use crate::harness::{doppel_bin, guest_ram};
use crate::proc::{tail, Proc};

/// The fields of the status document (docs/OPERATING.md, "Status").
pub(crate) const STATUS_FIELDS: &[&str] = &[
    "schema",
    "role",
    "state",
    "pid",
    "version",
    "uptime_s",
    "epoch",
    "last_committed",
    "epochs_committed",
    "commit_lag_ms",
    "since_commit_ms",
    "epoch_rate",
    "dirty_pages",
    "bytes",
    "pause_cycles",
    "held_output_bytes",
    "witness",
    "peer",
    "last_failover",
    "backup_lost",
    "unprotected_epochs",
];

const OPS: u64 = 4000;

fn status_json(doppel: &Path, sock: &Path) -> Result<serde_json::Value> {
    let out = Command::new(doppel)
        .args(["status", "--json", "--socket"])
        .arg(sock)
        .output()?;
    if !out.status.success() {
        bail!(
            "doppel status --socket {}: {}: {}",
            sock.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("doppel status --json printed no JSON")
}

fn status_field(doppel: &Path, sock: &Path, name: &str) -> Result<String> {
    let out = Command::new(doppel)
        .args(["status", "--field", name, "--socket"])
        .arg(sock)
        .output()?;
    if !out.status.success() {
        bail!("doppel status --field {name}: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Check one side's document: `(valid, fields, problems)`.
fn check_status(v: &serde_json::Value, role: &str) -> (bool, usize, Vec<String>) {
    let mut bad = Vec::new();
    let Some(o) = v.as_object() else {
        return (false, 0, vec!["not an object".into()]);
    };
    for f in STATUS_FIELDS {
        if !o.contains_key(*f) {
            bad.push(format!("field {f} missing"));
        }
    }
    if v["schema"] != 1 {
        bad.push(format!("schema {}", v["schema"]));
    }
    if v["role"] != role {
        bad.push(format!("role {}", v["role"]));
    }
    if v["state"] != "protected" {
        bad.push(format!("state {}", v["state"]));
    }
    if !v["last_committed"].is_u64() || v["epochs_committed"].as_u64().is_none_or(|n| n == 0) {
        bad.push("no committed epoch".into());
    }
    if !v["peer"].is_string() {
        bad.push("no peer".into());
    }
    if v["bytes"]["stream"].as_u64().is_none_or(|b| b == 0) {
        bad.push("no stream bytes".into());
    }
    (bad.is_empty(), o.len(), bad)
}

/// One scrape: series name with labels -> value.
fn scrape(addr: &str) -> Result<Vec<(String, f64)>> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).with_context(|| format!("metrics {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(c, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.contains(" 200 ") || !head.to_ascii_lowercase().contains("openmetrics-text") {
        bail!(
            "metrics {addr}: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    if !body.trim_end().ends_with("# EOF") {
        bail!("metrics {addr}: no `# EOF` at the end");
    }
    let mut series = Vec::new();
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = l.rsplit_once(' ').context("a series line without value")?;
        series.push((name.to_string(), value.parse::<f64>()?));
    }
    Ok(series)
}

fn value(s: &[(String, f64)], name: &str) -> f64 {
    s.iter()
        .filter(|(n, _)| n == name || n.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

pub fn step_status_metrics(ctx: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let mut prim = boot(ctx, &doppel, &kv_primary_cmdline(), "status-primary")?;
    let (_, size) = guest_ram(&doppel, &prim.ram.0)?.context("no guest RAM published")?;
    let pages = (size / 4096).to_string();
    let dir = crate::out_dir().join("status-metrics");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (psock, bsock) = (dir.join("primary.sock"), dir.join("backup.sock"));
    let mut backup = Proc::spawn(
        "backup",
        Command::new(&doppel)
            .args(["backup", "--listen", "127.0.0.1:0", "--replica"])
            .arg(dir.join("replica"))
            .args(["--guest-pages", &pages, "--accept-timeout", "120"])
            .arg("--status-socket")
            .arg(&bsock)
            .args(["--metrics", "127.0.0.1:0"]),
        false,
    )?;
    let bmetrics = backup.wait_value("metrics on ", Duration::from_secs(30))?;
    let listen = backup.wait_value("listening on ", Duration::from_secs(30))?;
    let psock_s = psock.display().to_string();
    let (mut primary, pclients) = spawn_primary(
        &doppel,
        "primary",
        &prim.ram.0,
        &listen,
        &[
            "--event-timeout",
            "60",
            "--ack-timeout",
            "20",
            "--status-socket",
            &psock_s,
            "--metrics",
            "127.0.0.1:0",
        ],
        false,
    )?;
    let pmetrics = primary.wait_value("metrics on ", Duration::from_secs(30))?;
    let mut client = spawn_kv_client(&doppel, &pclients, OPS)?;
    wait_for(
        "the client's first answers",
        Duration::from_secs(300),
        || {
            if !primary.alive() {
                bail!("doppel primary exited:\n{}", tail(&primary.err(), 20));
            }
            Ok(client_answered(&client) > 20)
        },
    )?;
    // Status, primary first (see the module doc).
    let pj = status_json(&doppel, &psock)?;
    let bj = status_json(&doppel, &bsock)?;
    let (pvalid, pfields, mut pbad) = check_status(&pj, "primary");
    let (bvalid, bfields, mut bbad) = check_status(&bj, "backup");
    let (pc, bc) = (
        pj["last_committed"].as_u64().unwrap_or(0),
        bj["last_committed"].as_u64().unwrap_or(0),
    );
    if bc < pc {
        bbad.push(format!(
            "backup at epoch {bc} behind the primary's released {pc}"
        ));
    }
    if pj["pause_cycles"].as_u64().is_none_or(|c| c == 0) {
        pbad.push("no pause reported by the hypervisor".into());
    }
    // Output the guest produced in the running epoch is held until it
    // commits: some status must show it.
    let t = Instant::now();
    let mut held = 0;
    while held == 0 && t.elapsed() < Duration::from_secs(10) {
        held = status_json(&doppel, &psock)?["held_output_bytes"]
            .as_u64()
            .unwrap_or(0);
    }
    if held == 0 {
        pbad.push("held_output_bytes never above 0 while a client runs".into());
    }
    let pstate = status_field(&doppel, &psock, "state")?;
    if pstate != pj["state"] {
        pbad.push(format!("--field state says {pstate}"));
    }
    // Metrics: three scrapes of each side, about a second apart.
    let mut scrapes = Vec::new();
    for _ in 0..3 {
        scrapes.push((scrape(&pmetrics)?, scrape(&bmetrics)?));
        std::thread::sleep(Duration::from_millis(1200));
    }
    let series = scrapes[0].0.len() + scrapes[0].1.len();
    let grows = |side: usize, name: &str| {
        let v: Vec<f64> = scrapes
            .iter()
            .map(|(p, b)| value(if side == 0 { p } else { b }, name))
            .collect();
        v.windows(2).all(|w| w[1] > w[0])
    };
    let mut still = Vec::new();
    for name in [
        "doppel_epochs_committed_total",
        "doppel_dirty_pages_total",
        "doppel_stream_bytes_total",
        "doppel_epoch_pause_cycles_count",
        "doppel_ack_latency_seconds_count",
        "doppel_commit_lag_seconds_count",
    ] {
        if !grows(0, name) {
            still.push(format!("primary {name}"));
        }
    }
    for name in ["doppel_epochs_committed_total", "doppel_stream_bytes_total"] {
        if !grows(1, name) {
            still.push(format!("backup {name}"));
        }
    }
    let moving = still.is_empty();
    // Degraded: the backup is killed.
    backup.kill();
    primary.wait_line("primary: backup lost (", Duration::from_secs(60))?;
    let t = Instant::now();
    let degraded = loop {
        let j = status_json(&doppel, &psock)?;
        if j["state"] == "degraded" && j["backup_lost"] == 1 && j["peer"].is_null() {
            break true;
        }
        if t.elapsed() > Duration::from_secs(10) {
            pbad.push(format!("after the backup was killed: {j}"));
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let lost_metric = value(&scrape(&pmetrics)?, "doppel_backup_lost_total") == 1.0;
    if !lost_metric {
        still.push("doppel_backup_lost_total is not 1".into());
    }
    client.kill();
    primary.interrupt()?;
    let _ = primary.wait_exit(Duration::from_secs(60))?;
    prim.qemu.take();
    let gone = !psock.exists();
    if !gone {
        pbad.push("the status socket outlived the primary".into());
    }
    let ppass = pvalid && pbad.is_empty() && degraded;
    let bpass = bvalid && bbad.is_empty();
    let mpass = moving && lost_metric;
    let verdict = |b: bool| if b { "pass" } else { "fail" };
    let pline = format!(
        "status: role=primary state={} json={} fields={pfields} result={}",
        pj["state"].as_str().unwrap_or("?"),
        if pvalid { "valid" } else { "invalid" },
        verdict(ppass)
    );
    let bline = format!(
        "status: role=backup state={} json={} fields={bfields} result={}",
        bj["state"].as_str().unwrap_or("?"),
        if bvalid { "valid" } else { "invalid" },
        verdict(bpass)
    );
    let mline = format!(
        "metrics: scraped={} series={series} moving={moving} result={}",
        scrapes.len() * 2 + 1,
        verdict(mpass)
    );
    println!("status: primary {pj}");
    println!("status: backup {bj}");
    for l in [&pline, &bline, &mline] {
        println!("{l}");
    }
    if !(ppass && bpass && mpass) {
        bail!(
            "{pline}\n{bline}\n{mline}\nprimary problems: {pbad:?}\nbackup problems: {bbad:?}\n\
             metrics not moving: {still:?}"
        );
    }
    Ok(format!("{pline}; {bline}; {mline}"))
}
