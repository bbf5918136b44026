//! Set-up: the Debian packages and rustup pieces the project needs.
//!
//! Everything is checked first and installed only when missing, so running
//! it again on a ready machine costs a few process spawns.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages: emulators (bochs-term is the headless display Bochs
/// needs), the GRUB ISO tool chain, Xen's public headers
/// (for the ABI conformance checks), a C compiler, etcd (the split-brain
/// witness; its tests start a real one on loopback) and protoc (the
/// `etcd-client` crate compiles etcd's protocol files with it; the
/// well-known google/protobuf/*.proto they import come with libprotobuf-dev).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "bochs",
    "bochsbios",
    "bochs-term",
    "vgabios",
    "grub-pc-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "libxen-dev",
    "gcc",
    "python3",
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
];

const TARGET: &str = "x86_64-unknown-none";
const COMPONENTS: &[&str] = &["rust-src", "clippy", "rustfmt"];

pub fn ensure() -> Result<()> {
    ensure_debian()?;
    ensure_rustup()?;
    Ok(())
}

fn is_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn ensure_debian() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    let sudo = !is_root();
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let st = cmd.status().context("running apt-get")?;
        if !st.success() {
            bail!("apt-get {} failed ({st})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args)?;
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn rustup_list(what: &str) -> Result<String> {
    let out = Command::new("rustup")
        .args([what, "list", "--installed"])
        .current_dir(crate::root())
        .output()
        .with_context(|| format!("running rustup {what} list"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rustup() -> Result<()> {
    let targets = rustup_list("target")?;
    if !targets.lines().any(|l| l.trim() == TARGET) {
        eprintln!("setup: rustup target add {TARGET}");
        run_rustup(&["target", "add", TARGET])?;
    }
    let comps = rustup_list("component")?;
    for c in COMPONENTS {
        if !comps
            .lines()
            .any(|l| l.starts_with(&format!("{c}-")) || l.trim() == *c)
        {
            eprintln!("setup: rustup component add {c}");
            run_rustup(&["component", "add", c])?;
        }
    }
    Ok(())
}

fn run_rustup(args: &[&str]) -> Result<()> {
    let st = Command::new("rustup")
        .args(args)
        .current_dir(crate::root())
        .status()
        .context("running rustup")?;
    if !st.success() {
        bail!("rustup {} failed ({st})", args.join(" "));
    }
    Ok(())
}
