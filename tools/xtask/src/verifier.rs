//! Xen's own stream verifier as a test step: `verify-stream-v2` from the
//! Debian package xen-utils-4.17 (a Python 3 script; no Xen install
//! needed) must accept a 5-epoch synthetic capture written by `doppel`, and
//! must reject a copy with one reserved bit set (so a verifier that accepts
//! everything cannot pass the step).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::ctx::{cargo, Ctx};

const PACKAGE: &str = "xen-utils-4.17";
const VERIFIER: &str = "usr/lib/xen-4.17/bin/verify-stream-v2";
const PYLIB: &str = "usr/lib/xen-4.17/lib/python";

/// Download and unpack the package once into target/doppel/xen/.
/// Returns the unpacked root.
pub(crate) fn ensure_xen_utils() -> Result<PathBuf> {
    let dir = crate::out_dir().join("xen");
    let root = dir.join("root");
    if root.join(VERIFIER).exists() && root.join(PYLIB).join("xen/migration/libxc.py").exists() {
        return Ok(root);
    }
    let dl = dir.join("dl");
    fs::create_dir_all(&dl)?;
    let find_deb = |dl: &Path| -> Option<PathBuf> {
        fs::read_dir(dl)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PACKAGE) && n.ends_with(".deb"))
            })
    };
    if find_deb(&dl).is_none() {
        let download = || {
            Command::new("apt-get")
                .args(["download", PACKAGE])
                .current_dir(&dl)
                .output()
                .context("running apt-get download")
        };
        let mut out = download()?;
        if !out.status.success() {
            // A fresh machine may have no package lists yet.
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
            out = download()?;
        }
        if !out.status.success() {
            bail!(
                "apt-get download {PACKAGE} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let deb = find_deb(&dl).context("downloaded .deb not found")?;
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    let st = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .context("running dpkg -x")?;
    if !st.success() || !root.join(VERIFIER).exists() {
        bail!("dpkg -x {} did not yield {VERIFIER}", deb.display());
    }
    Ok(root)
}

/// Run the verifier on a libxc stream file: (success, stdout+stderr).
pub(crate) fn run_verifier(root: &Path, file: &Path) -> Result<(bool, String)> {
    let out = Command::new("python3")
        .arg(root.join(VERIFIER))
        .args(["-f", "libxc", "-v", "-i"])
        .arg(file)
        .env("PYTHONPATH", root.join(PYLIB))
        .output()
        .context("running python3 verify-stream-v2")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

pub fn step_xen_verify_stream(_: &mut Ctx) -> Result<String> {
    let root = ensure_xen_utils()?;
    cargo(&["build", "--release", "--package", "doppel"])?;
    let doppel = crate::root().join("target/release/doppel");
    let dir = crate::out_dir().join("xen");
    let cap = dir.join("capture-5-epochs.bin");
    // 2100 pages: epoch 0 spans three PAGE_DATA records (1024-pfn batches)
    // and carries invalid pfns; later epochs repeat some pfns.
    let st = Command::new(&doppel)
        .args(["stream", "synth", "--epochs", "5", "--pages", "2100"])
        .args(["--dirty", "300", "--seed", "7", "--out"])
        .arg(&cap)
        .env("RUST_LOG", "warn")
        .status()
        .context("running doppel stream synth")?;
    if !st.success() {
        bail!("doppel stream synth failed ({st})");
    }
    let (ok, text) = run_verifier(&root, &cap)?;
    if !ok {
        bail!("verify-stream-v2 rejected {}:\n{text}", cap.display());
    }
    let checkpoints = text
        .lines()
        .filter(|l| l.contains("Record: Checkpoint"))
        .count();
    let end = text.lines().any(|l| l.contains("Record: End"));
    if checkpoints != 5 || !end {
        bail!("verifier saw {checkpoints} checkpoints (want 5), END={end}:\n{text}");
    }
    // Negative control: set a reserved pfn bit (bit 52) in the first pfn
    // word of the first PAGE_DATA record. Layout: 24 image header + 16
    // domain header + 8 STATIC_DATA_END + 8 record header + 8 count = 64.
    let mut bytes = fs::read(&cap)?;
    bytes[64 + 6] |= 0x10;
    let bad = dir.join("capture-reserved-bit.bin");
    fs::write(&bad, &bytes)?;
    let (bad_ok, bad_text) = run_verifier(&root, &bad)?;
    if bad_ok || !bad_text.contains("Reserved bits set in pfn[0]") {
        bail!("verify-stream-v2 did not reject a reserved pfn bit:\n{bad_text}");
    }
    Ok(format!(
        "verify-stream-v2 accepted {} ({} bytes, 5 checkpoints, END) and rejected the corrupted copy",
        cap.display(),
        fs::metadata(&cap)?.len()
    ))
}
