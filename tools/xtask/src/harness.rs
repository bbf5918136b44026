//! What the replication steps share: the doppel tool, QEMU machines with
//! their RAM in /dev/shm, the doppel processes of a replicated service
//! (sim-hv, primary, backup, client), and reading their progress lines.
//! Used by the failover, chain, witness, backup-loss, operate, config,
//! link-auth and ocf steps; it imports no step.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use doppel_abi::splitmix::SplitMix64;

use crate::ctx::{cargo, Ctx};
use crate::emu::{self, RunSpec, Running};
use crate::logline::num;
use crate::proc::{tail, Proc};
use crate::shm::{shm_file, TempFile};
use crate::Emulator;

/// Guest RAM of the protected machine (MiB) and the QEMU machines' RAM.
pub(crate) const GUEST_MIB: u32 = 16;

const MACHINE_MIB: u32 = 128;

pub(crate) const KEYS: u32 = 256;

/// Deterministic checkpoint policy for tests: one every this many exits.
pub(crate) const EPOCH_EXITS: u32 = 3000;

/// What the primary's hypervisor logs when the tool detaches, when its
/// guest then stops being write-protected, and when a new session tracks
/// it again; and what an activated standby logs (it never write-protects).
pub(crate) const DETACHED: &str = "replication detached; guest runs unprotected";

pub(crate) fn doppel_bin() -> Result<PathBuf> {
    cargo(&["build", "--release", "--package", "doppel"])?;
    Ok(crate::root().join("target/release/doppel"))
}

/// `doppel inspect --machine-ram`: (guest RAM offset, size) once the
/// control area validates.
pub(crate) fn guest_ram(doppel: &Path, ram: &Path) -> Result<Option<(u64, u64)>> {
    let out = Command::new(doppel)
        .args(["inspect", "--machine-ram"])
        .arg(ram)
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("guest_ram "))
        .context("doppel inspect printed no guest_ram line")?;
    let w: Vec<&str> = line.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16);
    match w.as_slice() {
        ["guest_ram", "offset", o, "size", s, ..] => Ok(Some((hex(o)?, hex(s)?))),
        _ => bail!("unexpected guest_ram line: {line}"),
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
    wait_published(
        doppel,
        &ram.0,
        &qemu,
        &format!("`{cmdline}`"),
        Duration::from_secs(120),
    )?;
    Ok(Machine {
        qemu: Some(qemu),
        ram,
    })
}

/// Wait until the hypervisor running in `qemu` (named `what` in errors)
/// has published a control area in `ram` that `doppel inspect` accepts,
/// failing if it ends first or after `limit`.
pub(crate) fn wait_published(
    doppel: &Path,
    ram: &Path,
    qemu: &Running,
    what: &str,
    limit: Duration,
) -> Result<()> {
    let t = Instant::now();
    loop {
        if guest_ram(doppel, ram)?.is_some() {
            return Ok(());
        }
        let out = qemu.hv_output_so_far();
        if out.contains(emu::FAIL_LINE) || out.contains(emu::PASS_LINE) {
            bail!("the hypervisor ({what}) ended before publishing its control area:\n{out}");
        }
        if t.elapsed() > limit {
            bail!(
                "no control area from {what} within {} s:\n{out}",
                limit.as_secs()
            );
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
