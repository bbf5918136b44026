//! `ocf` (host only, no emulator): the Pacemaker resource agent
//! tools/ocf/doppel against a running primary/backup pair built from the
//! hypervisor simulator (docs/OPERATING.md, "Pacemaker resource agent").
//!
//! The node under test owns the VM: `doppel sim-hv --service kv` is its
//! running guest, its config's `[primary]` protects it to the peer and
//! serves its clients, its `[backup]` is a file replica nobody connects to.
//! The peer is a `doppel backup` into a fresh replica directory, restarted
//! on the same address whenever it exits (each demote ends the primary's
//! stream, so the peer finishes; each promote needs a backup to connect to).
//!
//! `ocf-tester` (Debian resource-agents) must exit 0 with no `* rc=` line;
//! then, by hand: after promote monitor is 8, the status says `protected`
//! and a `doppel client` of the kv service gets every answer; after demote
//! monitor is 0; after stop 7; a start with a broken config is 6
//! (OCF_ERR_CONFIGURED).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::harness::doppel_bin;
use crate::harness::{spawn_kv_client, spawn_sim_hv};
use crate::proc::Proc;
use crate::shm::shm_file;

const PAGES: &str = "512";
const OCF_RUNNING_MASTER: i32 = 8;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_ERR_CONFIGURED: i32 = 6;

/// A free loopback port (bound, then released).
fn free_addr() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// The peer `doppel backup`, restarted on `addr` into a fresh replica
/// directory whenever it exits, until dropped.
struct Peer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u32>>,
}

impl Peer {
    fn start(doppel: &Path, dir: &Path, addr: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = {
            let (doppel, dir, addr) = (doppel.to_path_buf(), dir.to_path_buf(), addr.to_string());
            move |n: u32| -> Result<Proc> {
                let replica = dir.join(format!("peer-replica-{n}"));
                Proc::spawn(
                    "peer backup",
                    Command::new(&doppel)
                        .args(["backup", "--listen", &addr, "--replica"])
                        .arg(&replica)
                        .args(["--guest-pages", PAGES, "--accept-timeout", "120"]),
                    false,
                )
            }
        };
        let mut first = spawn(0)?;
        first
            .wait_line("listening on ", Duration::from_secs(20))
            .context("the peer backup did not start")?;
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut cur = first;
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                if cur.exited().unwrap_or(true) {
                    n += 1;
                    match spawn(n) {
                        Ok(w) => cur = w,
                        Err(e) => {
                            eprintln!("  ocf: restarting the peer backup: {e}");
                            break;
                        }
                    }
                }
                thread::sleep(Duration::from_millis(30));
            }
            n
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop restarting; how many times the peer was restarted.
    fn finish(&mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The agent run by hand, as Pacemaker would.
struct Agent<'a> {
    path: PathBuf,
    doppel: &'a Path,
    config: PathBuf,
    state_dir: PathBuf,
}

impl Agent<'_> {
    fn run(&self, action: &str) -> Result<(i32, String)> {
        let o = Command::new(&self.path)
            .arg(action)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("OCF_RESOURCE_INSTANCE", "doppel-test")
            .env("OCF_RESKEY_config", &self.config)
            .env("OCF_RESKEY_state_dir", &self.state_dir)
            .env("OCF_RESKEY_binary", self.doppel)
            .env("OCF_RESKEY_CRM_meta_timeout", "20000")
            .env("OCF_RESKEY_CRM_meta_interval", "10000")
            .output()
            .with_context(|| format!("running {} {action}", self.path.display()))?;
        Ok((o.status.code().unwrap_or(-1), text(&o)))
    }

    fn status_field(&self, name: &str) -> Result<String> {
        let o = Command::new(self.doppel)
            .args(["status", "--socket"])
            .arg(self.state_dir.join("status.sock"))
            .args(["--field", name])
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The node's config: `[primary]` protects the simulated guest to the
/// peer and serves clients; `[backup]` is a local file replica.
fn config(ram: &Path, peer: &str, clients: &str, replica: &Path) -> String {
    format!(
        "[primary]\nmachine-ram = {:?}\nbackup = {peer:?}\nserve-clients = {clients:?}\n\
         wait-control = 10\n\n[backup]\nlisten = \"127.0.0.1:0\"\nreplica = {:?}\n\
         guest-pages = {PAGES}\n",
        ram.display().to_string(),
        replica.display().to_string(),
    )
}

pub fn step_ocf(_: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let agent = crate::root().join("tools/ocf/doppel");
    let dir = crate::out_dir().join("ocf");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let ram = shm_file("ocf");
    let keys = crate::harness::KEYS.to_string();
    let mut sim = spawn_sim_hv(
        &doppel,
        &ram.0,
        &[
            "--service",
            "kv",
            "--keys",
            &keys,
            "--guest-pages",
            PAGES,
            "--max-secs",
            "120",
        ],
    )?;
    let peer_addr = free_addr()?;
    let clients = free_addr()?;
    let mut peer = Peer::start(&doppel, &dir, &peer_addr)?;
    let cfg = dir.join("node.toml");
    fs::write(
        &cfg,
        config(&ram.0, &peer_addr, &clients, &dir.join("local-replica")),
    )?;
    let state_dir = dir.join("state");

    let tester = Command::new("ocf-tester")
        .args(["-n", "doppel-test", "-o"])
        .arg(format!("config={}", cfg.display()))
        .arg("-o")
        .arg(format!("state_dir={}", state_dir.display()))
        .arg("-o")
        .arg(format!("binary={}", doppel.display()))
        .arg(&agent)
        .output()
        .context("running ocf-tester (cargo xtask setup installs resource-agents)")?;
    let tester_out = text(&tester);
    let failures: Vec<&str> = tester_out
        .lines()
        .filter(|l| l.starts_with("* rc="))
        .collect();
    let tester_ok = tester.status.success() && failures.is_empty();
    let mut log = vec![format!(
        "ocf-tester exit {:?}, {} failure lines",
        tester.status.code(),
        failures.len()
    )];
    if !tester_ok {
        log.push(tester_out.clone());
    }

    let a = Agent {
        path: agent.clone(),
        doppel: &doppel,
        config: cfg.clone(),
        state_dir: state_dir.clone(),
    };
    let mut checks: Vec<(&str, bool)> = Vec::new();
    let mut check = |what: &'static str, ok: bool, detail: String| {
        log.push(format!(
            "{what}: {} ({detail})",
            if ok { "ok" } else { "FAILED" }
        ));
        checks.push((what, ok));
    };
    let (rc, out) = a.run("start")?;
    check("start", rc == 0, format!("rc={rc} {}", out.trim()));
    let (rc, out) = a.run("promote")?;
    check("promote", rc == 0, format!("rc={rc} {}", out.trim()));
    let (rc, _) = a.run("monitor")?;
    check(
        "monitor promoted",
        rc == OCF_RUNNING_MASTER,
        format!("rc={rc}"),
    );
    let state = a.status_field("state")?;
    let role = a.status_field("role")?;
    check(
        "status promoted",
        role == "primary" && state == "protected",
        format!("role={role} state={state}"),
    );
    let mut client = spawn_kv_client(&doppel, &clients, 40)?;
    let (code, _) = client.finish(Duration::from_secs(30))?;
    check(
        "client",
        code == Some(0),
        format!(
            "exit {code:?}: {}",
            client
                .out()
                .into_iter()
                .find(|l| l.starts_with("client:"))
                .unwrap_or_default()
        ),
    );
    let (rc, out) = a.run("demote")?;
    check("demote", rc == 0, format!("rc={rc} {}", out.trim()));
    let (rc, _) = a.run("monitor")?;
    check("monitor demoted", rc == 0, format!("rc={rc}"));
    let role = a.status_field("role")?;
    check("status demoted", role == "backup", format!("role={role}"));
    let (rc, out) = a.run("stop")?;
    check("stop", rc == 0, format!("rc={rc} {}", out.trim()));
    let (rc, _) = a.run("monitor")?;
    check("monitor stopped", rc == OCF_NOT_RUNNING, format!("rc={rc}"));

    let broken_cfg = dir.join("broken.toml");
    fs::write(&broken_cfg, "[backup]\nno-such-key = 1\n")?;
    let broken = Agent {
        config: broken_cfg,
        state_dir: dir.join("broken-state"),
        ..a
    };
    let (rc, out) = broken.run("start")?;
    check(
        "broken config start",
        rc == OCF_ERR_CONFIGURED,
        format!("rc={rc} {}", out.lines().last().unwrap_or_default()),
    );
    let _ = broken.run("stop");

    let restarts = peer.finish();
    log.push(format!("peer backup restarted {restarts} times"));
    sim.kill();
    for l in &log {
        println!("  {l}");
    }
    let pass = tester_ok && checks.iter().all(|(_, ok)| *ok);
    let line = format!(
        "ocf: ocf-tester={} actions=start,stop,monitor,promote,demote result={}",
        if tester_ok { "pass" } else { "fail" },
        if pass { "pass" } else { "fail" }
    );
    if !pass {
        bail!("{line}");
    }
    Ok(line)
}
