//! Replication end to end with the dom0 tool (`doppel primary` and
//! `doppel backup`), docs/REPLICATION.md:
//!
//! - `xen-verify-sim-capture`: the hypervisor simulator (`doppel sim-hv`)
//!   and `doppel primary --record` as separate processes sharing a machine
//!   RAM file; Xen's verify-stream-v2 must accept the 5-epoch capture.
//! - `replica-qemu-svm`: QEMU (SVM) runs the hypervisor in `mode=primary`
//!   with its RAM in /dev/shm; primary and backup replicate 21 epochs over
//!   loopback; the replica's memory must equal the guest RAM bytes in the
//!   RAM file and its vCPU blob the last checkpoint's, byte for byte. The
//!   primary tool ends with Detach: the hypervisor must log `replication
//!   detached; guest runs unprotected` and then finish on its own.
//! - `xen-verify-capture`: `doppel primary --record` of 5 epochs from the
//!   real hypervisor, accepted by verify-stream-v2.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::emu::{self, RunSpec, Running};
use crate::harness::{doppel_bin, guest_ram};
use crate::proc::Proc;
use crate::shm::{shm_file, TempFile};
use crate::Emulator;

/// Epochs per guest pass (`epochs=4`) give 20 checkpoints, and the primary
/// takes one more when the guest stops (DONE), so the last committed
/// checkpoint is the memory the guest is paused with.
const CMDLINE: &str = "mode=primary epochs=4";
const EPOCHS: u64 = 21;
const MEM_MIB: u32 = 256;

fn spawn(name: &'static str, cmd: &mut Command) -> Result<Proc> {
    Proc::spawn(name, cmd, false)
}

/// Boot the hypervisor in `mode=primary` with its RAM in a /dev/shm file
/// and wait until its control area validates.
fn boot_primary(
    ctx: &mut Ctx,
    doppel: &Path,
    tag: &str,
) -> Result<(Running, TempFile, (u64, u64))> {
    let img = ctx.image()?;
    let ram = shm_file("replica");
    let f = fs::File::create(&ram.0).with_context(|| format!("creating {}", ram.0.display()))?;
    f.set_len(u64::from(MEM_MIB) << 20)?;
    drop(f);
    let mut spec = RunSpec::new(Emulator::Qemu, tag);
    spec.ram_file = Some(ram.0.clone());
    spec.mem_mib = MEM_MIB;
    spec.cmdline = CMDLINE.into();
    spec.timeout = Duration::from_secs(900);
    let qemu = emu::spawn(&img, &spec)?;
    let t = Instant::now();
    loop {
        if let Some(g) = guest_ram(doppel, &ram.0)? {
            return Ok((qemu, ram, g));
        }
        let out = qemu.hv_output_so_far();
        let ended = out
            .lines()
            .any(|l| l.trim() == emu::PASS_LINE || l.trim() == emu::FAIL_LINE);
        if out.contains("`mode`") || out.contains("`primary`") {
            bail!(
                "hypervisor has no mode=primary yet (the image refused `{CMDLINE}`: {}); \
                 this step passes once the hypervisor side of replication lands",
                out.lines()
                    .find(|l| l.contains("mode"))
                    .unwrap_or("")
                    .trim()
            );
        }
        if ended {
            bail!("the hypervisor ended before publishing a control area:\n{out}");
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!(
                "no valid control area in {} after 180 s:\n{out}",
                ram.0.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn step_replica_qemu(ctx: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let dir = crate::out_dir().join("replica");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let rdir = dir.join("replica");
    let (qemu, ram, (g_off, g_size)) = boot_primary(ctx, &doppel, "test-replica-qemu")?;
    let pages = g_size / 4096;
    let mut backup = spawn(
        "doppel backup",
        Command::new(&doppel)
            .args([
                "backup",
                "--listen",
                "127.0.0.1:0",
                "--accept-timeout",
                "60",
            ])
            .arg("--replica")
            .arg(&rdir)
            .args(["--guest-pages", &pages.to_string()]),
    )?;
    let addr = backup.wait_value("listening on ", Duration::from_secs(60))?;
    let mut primary = spawn(
        "doppel primary",
        Command::new(&doppel)
            .args(["primary", "--machine-ram"])
            .arg(&ram.0)
            .args(["--backup", &addr, "--epochs", &EPOCHS.to_string()]),
    )?;
    let pst = primary.wait(Duration::from_secs(900))?;
    let perr = primary.stderr();
    let bst = backup.wait(Duration::from_secs(60))?;
    let bout = backup.out().join("\n");
    let berr = backup.stderr();
    let run = qemu.wait()?;
    if !pst.success() || !bst.success() {
        bail!(
            "primary {pst}:\n{perr}\nbackup {bst}: {bout}\n{berr}\nhypervisor ({}):\n{}",
            run.describe(),
            run.output
        );
    }
    // The last checkpoint's vCPU blob, from the event ring in the RAM file.
    let last = dir.join("last-vcpu.bin");
    let rep_vcpu = dir.join("replica-vcpu.bin");
    let st = Command::new(&doppel)
        .args(["inspect", "--machine-ram"])
        .arg(&ram.0)
        .arg("--last-vcpu-out")
        .arg(&last)
        .status()?;
    let st2 = Command::new(&doppel)
        .args(["inspect", "--replica"])
        .arg(&rdir)
        .arg("--vcpu-out")
        .arg(&rep_vcpu)
        .status()?;
    if !st.success() || !st2.success() {
        bail!("doppel inspect failed ({st}, {st2})");
    }
    let mut guest = vec![0u8; g_size as usize];
    let mut f = fs::File::open(&ram.0)?;
    f.seek(SeekFrom::Start(g_off))?;
    f.read_exact(&mut guest)?;
    let replica = fs::read(rdir.join("memory.img"))?;
    if replica.len() != guest.len() {
        bail!(
            "replica is {} bytes, guest RAM {}",
            replica.len(),
            guest.len()
        );
    }
    let mismatches = replica
        .chunks(4096)
        .zip(guest.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    let vcpu_ok = fs::read(&last)? == fs::read(&rep_vcpu)?;
    let committed = bout
        .lines()
        .find_map(|l| l.strip_prefix("backup: last committed epoch "))
        .unwrap_or("?")
        .to_string();
    // The tool detached after its last epoch; the hypervisor said so and
    // powered off by itself (it waits for Detach once the guest is done).
    let detached = crate::emu::hv_lines(&run.output)
        .any(|l| l.contains("replication detached; guest runs unprotected"));
    let line = format!(
        "replica: epochs={EPOCHS} pages_compared={pages} mismatches={mismatches} \
         vcpu_blob={} detached={detached} (backup: last committed epoch {committed})",
        if vcpu_ok { "equal" } else { "DIFFERENT" }
    );
    println!("{line}");
    if mismatches != 0 || !vcpu_ok || !detached {
        bail!("{line}\nhypervisor ({}):\n{}", run.describe(), run.output);
    }
    Ok(line)
}

/// Run verify-stream-v2 on a capture that must hold `epochs` checkpoints
/// and END.
fn verify_capture(cap: &Path, epochs: usize) -> Result<String> {
    let root = crate::verifier::ensure_xen_utils()?;
    let (ok, text) = crate::verifier::run_verifier(&root, cap)?;
    let checkpoints = text
        .lines()
        .filter(|l| l.contains("Record: Checkpoint"))
        .count();
    let end = text.lines().any(|l| l.contains("Record: End"));
    if !ok || checkpoints != epochs || !end {
        bail!(
            "verify-stream-v2 on {} (want {epochs} checkpoints and END):\n{text}",
            cap.display()
        );
    }
    Ok(format!(
        "verify-stream-v2 accepted {} ({} bytes, {checkpoints} checkpoints, END)",
        cap.display(),
        fs::metadata(cap)?.len()
    ))
}

pub fn step_verify_sim_capture(_: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let dir = crate::out_dir().join("replica");
    fs::create_dir_all(&dir)?;
    let ram = shm_file("sim");
    let cap = dir.join("sim-capture-5.bin");
    let mut sim = spawn(
        "doppel sim-hv",
        Command::new(&doppel)
            .args(["sim-hv", "--machine-ram"])
            .arg(&ram.0)
            .args(["--epochs", "5", "--guest-pages", "1500", "--dirty", "200"]),
    )?;
    let mut primary = spawn(
        "doppel primary",
        Command::new(&doppel)
            .args(["primary", "--machine-ram"])
            .arg(&ram.0)
            .args(["--wait-control", "30", "--epochs", "5", "--record"])
            .arg(&cap),
    )?;
    let pst = primary.wait(Duration::from_secs(120))?;
    let sst = sim.wait(Duration::from_secs(60))?;
    if !pst.success() || !sst.success() {
        bail!(
            "primary {pst}: {}\nsim-hv {sst}: {}",
            primary.stderr(),
            sim.stderr()
        );
    }
    verify_capture(&cap, 5)
}

pub fn step_verify_capture(ctx: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let dir = crate::out_dir().join("replica");
    fs::create_dir_all(&dir)?;
    let cap = dir.join("capture-5.bin");
    let (qemu, ram, _) = boot_primary(ctx, &doppel, "test-capture-qemu")?;
    let mut primary = spawn(
        "doppel primary",
        Command::new(&doppel)
            .args(["primary", "--machine-ram"])
            .arg(&ram.0)
            .args(["--epochs", "5", "--record"])
            .arg(&cap),
    )?;
    let pst = primary.wait(Duration::from_secs(600))?;
    // The guest wants 20 epochs; the capture stops at 5: end the run.
    drop(qemu);
    if !pst.success() {
        bail!("primary {pst}: {}", primary.stderr());
    }
    verify_capture(&cap, 5)
}
