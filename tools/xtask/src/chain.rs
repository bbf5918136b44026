//! A chain A -> B -> C (issue 22): three QEMU machines running the
//! key-value service, A the primary, B and C standbys. `doppel primary`
//! protects A to B's `doppel backup --then-backup`, which, once activated,
//! protects B to C's `doppel backup`. One client with `--failover B,C`
//! runs throughout.
//!
//! 1. At a seeded epoch A's QEMU is frozen (SIGSTOP, its whole process
//!    group): A's `doppel primary` lives on and would wait 120 s
//!    (`--event-timeout`) for its hypervisor, but the hypervisor's
//!    liveness counter stops, so the tool stops sending heartbeats and B
//!    must fail over within its heartbeat timeout. Then A's QEMU is
//!    killed (-9), as a dead host.
//! 2. B activates and is protected to C: C commits a seeded number of
//!    B's epochs.
//! 3. B's QEMU is killed (-9); C activates.
//! 4. The client finishes on C with every request answered, none lost,
//!    none divergent, two failovers.
//!
//! Before all that, a rogue tool sends `LogDirtyEnable` to C (a standby
//! not activated yet): the hypervisor must refuse it (EPERM), while B
//! accepts it after `Activate`.
//!
//! The step prints `chain: failovers=F lost_acked=L divergent=D
//! result=pass|fail`: F counts the backups' `failover:` lines, L and D
//! come from the client's verdict.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use doppel_abi::splitmix::GAMMA;

use crate::ctx::Ctx;
use crate::harness::doppel_bin;
use crate::harness::{
    boot, client_answered, client_verdict, committed_epochs, random_seed, spawn_backup,
    spawn_primary, splitmix, wait_for,
};
use crate::logline::num;
use crate::proc::{tail, Proc};

/// A small guest: three TCG machines share two cores.
const GUEST_MIB: u32 = 8;
const KEYS: u32 = 64;
/// Deterministic checkpoints, as in the failover step.
const EPOCH_EXITS: u32 = 3000;
/// The backups' heartbeat timeout (s). `doppel primary` keeps its default
/// 120 s event timeout: only the liveness counter can make the failover
/// come within this.
const HEARTBEAT_TIMEOUT: u64 = 4;
/// Slack on top of the heartbeat timeout for a failover to count as
/// "within the heartbeat timeout" (a heartbeat interval, activation,
/// scheduling on a loaded machine), far below the event timeout.
const FAILOVER_SLACK: u64 = 8;
const OPS: u64 = 800;

/// One chain run's seeded moments.
struct Plan {
    seed: u64,
    /// B's committed epoch at which A freezes.
    freeze_at: u64,
    /// C's committed epochs (of B's service) before B is killed.
    c_epochs: u64,
    client_seed: u64,
}

impl Plan {
    fn new(seed: u64) -> Self {
        let x = splitmix(seed ^ GAMMA);
        Plan {
            seed,
            freeze_at: 4 + x % 8,
            c_epochs: 3 + (x >> 32) % 6,
            client_seed: splitmix(x),
        }
    }
}

/// `cargo xtask test` step `chain-qemu-svm`.
pub fn step_chain(ctx: &mut Ctx) -> Result<String> {
    let plan = Plan::new(ctx.seed.unwrap_or_else(random_seed));
    println!(
        "chain: seed={} freeze_at={} c_epochs={} (replay: cargo xtask test --only chain --seed {})",
        plan.seed, plan.freeze_at, plan.c_epochs, plan.seed
    );
    let (line, detail) = run(ctx, &plan)?;
    println!("{line}");
    if !line.ends_with("result=pass") {
        bail!("{line} ({detail})");
    }
    Ok(format!("{line} ({detail})"))
}

fn run(ctx: &mut Ctx, plan: &Plan) -> Result<(String, String)> {
    let doppel = doppel_bin()?;
    let primary_cmd = format!(
        "mode=primary service=kv keys={KEYS} guest-mem={GUEST_MIB} epoch-exits={EPOCH_EXITS}"
    );
    let standby_cmd =
        format!("mode=standby keys={KEYS} guest-mem={GUEST_MIB} epoch-exits={EPOCH_EXITS}");
    let mut a = boot(ctx, &doppel, &primary_cmd, "chain-a")?;
    let mut b = boot(ctx, &doppel, &standby_cmd, "chain-b")?;
    let c = boot(ctx, &doppel, &standby_cmd, "chain-c")?;

    // Before any Activate a standby refuses LogDirtyEnable (a rogue tool
    // that skips the STANDBY check gets EPERM); after it, B accepts it.
    let before_activate = log_dirty_enable_before_activate(&c.ram.0)?;
    let hb = HEARTBEAT_TIMEOUT.to_string();
    let timeouts = ["--heartbeat-timeout", &hb, "--accept-timeout", "900"];
    let (mut backup_c, c_listen, c_clients) =
        spawn_backup(&doppel, "backup C", &c.ram.0, &timeouts, false)?;
    let (mut backup_b, b_listen, b_clients) = spawn_backup(
        &doppel,
        "backup B",
        &b.ram.0,
        &[&timeouts[..], &["--then-backup", &c_listen]].concat(),
        false,
    )?;
    let (mut primary, a_clients) =
        spawn_primary(&doppel, "primary A", &a.ram.0, &b_listen, &[], false)?;
    let mut client = Proc::spawn(
        "client",
        Command::new(&doppel)
            .args(["client", "--connect", &a_clients])
            .args(["--failover", &format!("{b_clients},{c_clients}")])
            .args(["--ops", &OPS.to_string(), "--keys", &KEYS.to_string()])
            .args(["--seed", &plan.client_seed.to_string()])
            .args(["--reply-timeout", "8", "--connect-timeout", "60"]),
        false,
    )?;

    // 1. Freeze A at the seeded epoch B committed.
    let b_epoch = |w: &Proc| committed_epochs(w).last().map(|e| e.0);
    wait_for(
        "B committing A's seeded epoch",
        Duration::from_secs(300),
        || {
            if b_epoch(&backup_b).is_some_and(|e| e >= plan.freeze_at) {
                return Ok(true);
            }
            if !client.alive() {
                bail!("the client finished before A froze (make OPS larger)");
            }
            if !primary.alive() || !backup_b.alive() {
                bail!(
                    "a tool died before A froze:\nprimary A:\n{}\nbackup B:\n{}",
                    tail(&primary.err(), 20),
                    tail(&backup_b.err(), 20)
                );
            }
            Ok(false)
        },
    )?;
    let frozen_at = b_epoch(&backup_b).unwrap_or(0);
    let t_freeze = Instant::now();
    if let Some(q) = a.qemu.as_ref() {
        q.freeze();
    }
    let fail_b = backup_b.wait_line("failover:", Duration::from_secs(60))?;
    let freeze_secs = t_freeze.elapsed().as_secs_f64();
    // A's tool is alive and connected all along: only the stopped
    // heartbeats tell B.
    let a_tool_alive = primary.alive();
    if let Some(q) = a.qemu.as_mut() {
        q.kill();
    }
    let silent = fail_b.contains(&format!("nothing received for {HEARTBEAT_TIMEOUT}.0 s"));
    let in_time = freeze_secs < (HEARTBEAT_TIMEOUT + FAILOVER_SLACK) as f64;

    // 2. B protects itself to C; C commits the seeded number of epochs.
    backup_b.wait_line(
        "chain: protecting the activated standby to ",
        Duration::from_secs(60),
    )?;
    wait_for("C committing B's epochs", Duration::from_secs(300), || {
        if committed_epochs(&backup_c).len() as u64 >= plan.c_epochs {
            return Ok(true);
        }
        if !client.alive() {
            bail!("the client finished before B was killed (make OPS larger)");
        }
        if !backup_b.alive() || !backup_c.alive() {
            bail!(
                "a tool died while B was protected:\nbackup B:\n{}\nbackup C:\n{}",
                tail(&backup_b.err(), 20),
                tail(&backup_c.err(), 20)
            );
        }
        Ok(false)
    })?;
    let c_committed = committed_epochs(&backup_c).len() as u64;
    let answered_before_b = client_answered(&client);

    // 3. Kill B's host; C activates.
    let t_kill = Instant::now();
    if let Some(q) = b.qemu.as_mut() {
        q.kill();
    }
    let fail_c = backup_c.wait_line("failover:", Duration::from_secs(60))?;
    let kill_secs = t_kill.elapsed().as_secs_f64();

    // 4. The client's verdict.
    let verdict = client_verdict(&mut client, Duration::from_secs(300), |_| Ok(()))
        .context("after C's failover")?;
    let failovers = [&fail_b, &fail_c]
        .iter()
        .filter(|l| l.contains("standby activated from committed epoch"))
        .count();
    let lost = num(&verdict, "lost_acked");
    let divergent = num(&verdict, "divergent");
    let pass = failovers == 2
        && verdict.contains("result=pass")
        && lost == Some(0)
        && divergent == Some(0)
        && num(&verdict, "answered") == Some(OPS)
        && num(&verdict, "failovers") == Some(2)
        && silent
        && in_time
        && a_tool_alive
        && answered_before_b < OPS
        && before_activate == "EPERM";
    let show = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    let line = format!(
        "chain: failovers={failovers} lost_acked={} divergent={} result={}",
        show(lost),
        show(divergent),
        if pass { "pass" } else { "fail" }
    );
    let detail = format!(
        "seed={} LogDirtyEnable to C before Activate: {before_activate}; \
         A frozen at B's epoch {frozen_at}: B failed over in {freeze_secs:.1} s \
         (heartbeat timeout {HEARTBEAT_TIMEOUT} s, A's tool alive={a_tool_alive}, `{fail_b}`); \
         C committed {c_committed} of B's epochs; B killed: C failed over in {kill_secs:.1} s \
         (`{fail_c}`); client `{verdict}`",
        plan.seed
    );
    println!("chain: {detail}");
    drop(c);
    Ok((line, detail))
}

/// The command ring of a machine RAM file, reached with positioned reads
/// and writes of the file (which the emulator maps shared): enough for a
/// rogue tool that sends one command and reads its answer.
struct FileMem {
    file: std::fs::File,
    /// File offset of the window's start, and its size.
    base: u64,
    size: usize,
}

impl doppel_abi::SharedMem for FileMem {
    fn size(&self) -> usize {
        self.size
    }
    fn load_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read_bytes(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        self.write_bytes(offset, &value.to_le_bytes());
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        use std::os::unix::fs::FileExt;
        // A failed read leaves zeros: the ring checks then refuse it.
        dst.fill(0);
        let _ = self.file.read_exact_at(dst, self.base + offset as u64);
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        use std::os::unix::fs::FileExt;
        let _ = self.file.write_all_at(src, self.base + offset as u64);
    }
}

/// A rogue tool that skips the STANDBY check sends `LogDirtyEnable` to
/// the standby in `ram` before any `Activate`: the hypervisor must refuse
/// it with EPERM (after `Activate` it accepts it: the chain). Returns the
/// answer's errno name.
pub(crate) fn log_dirty_enable_before_activate(ram: &std::path::Path) -> Result<String> {
    use anyhow::Context;
    use doppel_abi::control::{validate_header, Features, Field, HEADER_SIZE};
    use doppel_abi::locator::{Locator, LOCATOR_AT, LOCATOR_WORDS};
    use doppel_abi::msg::{Command as HvCommand, LogDirtyMode};
    use doppel_abi::{CommandFront, SharedMem};
    use std::os::unix::fs::FileExt;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ram)
        .with_context(|| format!("opening {}", ram.display()))?;
    let len = file.metadata()?.len();
    let mut words = [0u64; LOCATOR_WORDS];
    for (i, w) in words.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, LOCATOR_AT + 8 * i as u64)?;
        *w = u64::from_le_bytes(b);
    }
    let loc = Locator::decode(words, len).map_err(|e| anyhow::anyhow!("locator: {e:?}"))?;
    let mut hdr = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut hdr, loc.control_at)?;
    let view = validate_header(&hdr, loc.control_size as usize)
        .map_err(|e| anyhow::anyhow!("control header: {e:?}"))?;
    if !view.features().contains(Features::STANDBY) {
        bail!("{} is not a standby's", ram.display());
    }
    let (co, cs) = view.region(Field::CommandRing);
    let mem = FileMem {
        file,
        base: loc.control_at + co as u64,
        size: cs,
    };
    let req_prod = mem.load_u32(doppel_abi::ring::REQ_PROD);
    let mut ring = CommandFront::attach_at(mem, 0, cs, req_prod)
        .map_err(|e| anyhow::anyhow!("command ring: {e:?}"))?;
    let cmd = HvCommand::LogDirtyEnable {
        mode: LogDirtyMode::WriteProtect,
    };
    ring.push_request(&cmd.encode(0x0bad))
        .map_err(|e| anyhow::anyhow!("command ring: {e:?}"))?;
    ring.publish_requests();
    let t = Instant::now();
    let rsp = loop {
        if let Some(r) = ring
            .pop_response()
            .map_err(|e| anyhow::anyhow!("command ring: {e:?}"))?
        {
            break r;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the standby did not answer LogDirtyEnable within 30 s");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let rsp = rsp
        .decode()
        .map_err(|e| anyhow::anyhow!("response: {e:?}"))?;
    Ok(match rsp.result {
        Ok(r) => format!("accepted ({r:?})"),
        Err(doppel_abi::Errno::EPERM) => "EPERM".into(),
        Err(e) => format!("{e:?}"),
    })
}
