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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::emu::{self, RunSpec, Running};
use crate::proc::Proc;
use crate::test::{cargo, Ctx};
use crate::Emulator;

/// Epochs per guest pass (`epochs=4`) give 20 checkpoints, and the primary
/// takes one more when the guest stops (DONE), so the last committed
/// checkpoint is the memory the guest is paused with.
const CMDLINE: &str = "mode=primary epochs=4";
const EPOCHS: u64 = 21;
const MEM_MIB: u32 = 256;

/// A file removed when dropped.
pub(crate) struct TempFile(pub(crate) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Prefix of the machine RAM files in /dev/shm: `doppel-xtask-<pid>-<tag>`.
const SHM_PREFIX: &str = "doppel-xtask-";

/// A machine RAM file `/dev/shm/doppel-xtask-<pid>-<tag>`, removed when
/// dropped. Files of earlier runs whose process is gone (stopped by
/// Ctrl-C or killed, so their drop never ran; each is up to 256 MiB of
/// RAM) are removed first.
pub(crate) fn shm_file(tag: &str) -> TempFile {
    remove_stale_shm(Path::new("/dev/shm"));
    TempFile(PathBuf::from(format!(
        "/dev/shm/{SHM_PREFIX}{}-{tag}",
        std::process::id()
    )))
}

/// The pid in a file name made by [`shm_file`].
fn shm_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(SHM_PREFIX)?;
    let (pid, _tag) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Remove the [`shm_file`] files in `dir` whose process no longer exists.
fn remove_stale_shm(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(shm_pid) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let path = e.path();
            match fs::remove_file(&path) {
                Ok(()) => println!("removed {} (its run, pid {pid}, is gone)", path.display()),
                Err(err) => println!("cannot remove stale {}: {err}", path.display()),
            }
        }
    }
}

pub(crate) fn doppel_bin() -> Result<PathBuf> {
    cargo(&["build", "--release", "--package", "doppel"])?;
    Ok(crate::root().join("target/release/doppel"))
}

fn spawn(name: &'static str, cmd: &mut Command) -> Result<Proc> {
    Proc::spawn(name, cmd, false)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_names_carry_the_pid() {
        let f = shm_file("failover-qemu-1-standby");
        let name = f.0.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(shm_pid(&name), Some(std::process::id()));
        assert!(name.ends_with("-failover-qemu-1-standby"), "{name}");
        assert_eq!(shm_pid("doppel-replica-123"), None);
        assert_eq!(shm_pid("doppel-xtask-12x-a"), None);
    }

    #[test]
    fn only_files_of_gone_processes_are_removed() {
        let dir = std::env::temp_dir().join(format!("xtask-shm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // pid_max is at most 2^22: this pid cannot exist.
        let gone = format!("{SHM_PREFIX}{}-replica", (1u32 << 22) + 1);
        let live = format!("{SHM_PREFIX}{}-sim", std::process::id());
        let other = "doppel-replica-999999999".to_string();
        for n in [&gone, &live, &other] {
            fs::write(dir.join(n), b"x").unwrap();
        }
        remove_stale_shm(&dir);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![live, other];
        want.sort();
        assert_eq!(left, want);
        fs::remove_dir_all(&dir).unwrap();
    }
}
