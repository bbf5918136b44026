//! Set-up: the Debian packages and rustup pieces the project needs.
//!
//! Everything is checked first and installed only when missing, so running
//! it again on a ready machine costs a few process spawns.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages: emulators (bochs-term is the headless display Bochs
/// needs), the GRUB ISO tool chain, Xen's public headers
/// (for the ABI conformance checks), a C compiler, etcd (the split-brain
/// witness; its tests start a real one on loopback), protoc (the
/// `etcd-client` crate compiles etcd's protocol files with it; the
/// well-known google/protobuf/*.proto they import come with libprotobuf-dev),
/// GNU cpio and ACPICA's iasl (independent readers of the initramfs and
/// the ACPI tables we write), and Pacemaker's `resource-agents`
/// (ocf-tester, ocf-shellfuncs and ra-api-1.dtd, which the `ocf` step checks
/// tools/ocf/doppel against) with xmllint (libxml2-utils), which ocf-tester
/// validates the agent's meta-data with; for issue 20's workload
/// (workload.rs) Debian's redis-benchmark (redis-tools), mkfs.ext4,
/// e2fsck and debugfs (e2fsprogs) and ip (iproute2).
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
    "cpio",
    "acpica-tools",
    "resource-agents",
    "libxml2-utils",
    "redis-tools",
    "e2fsprogs",
    "iproute2",
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

/// What the Linux guest is made of, fetched from Debian by
/// [`ensure_guest`]: the stock kernel package and a static busybox, both
/// unpacked (`dpkg -x`) into one tree under target/guest/.
#[derive(Clone, Debug)]
pub struct GuestPackages {
    /// Where the packages were unpacked (their `/`).
    pub root: PathBuf,
    /// The kernel's bzImage (`/boot/vmlinuz-<release>`).
    pub bzimage: PathBuf,
    /// The kernel release, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The statically linked busybox (`/bin/busybox`).
    pub busybox: PathBuf,
    /// `package=version` of each .deb unpacked.
    pub packages: Vec<String>,
}

/// The guest kernel's meta-package: it depends on the versioned package
/// that holds the kernel itself.
const KERNEL_META: &str = "linux-image-amd64";
const BUSYBOX: &str = "busybox-static";
/// Lists what the cache holds (one `package=version` a line); written last,
/// so its presence means the cache is complete.
const STAMP: &str = "packages.txt";

/// The guest's cache directory.
pub fn guest_dir() -> PathBuf {
    crate::root().join("target").join("guest")
}

/// Fetch the guest's Debian packages into target/guest/ unless already
/// there. Quick when present: no apt call at all.
pub fn ensure_guest() -> Result<GuestPackages> {
    let dir = guest_dir();
    if let Some(p) = cached_guest(&dir) {
        return Ok(p);
    }
    std::fs::create_dir_all(dir.join("deb"))?;
    let kernel = match kernel_package() {
        Ok(k) => k,
        Err(_) => {
            // apt's lists may never have been fetched on a fresh machine.
            run_apt(&["update", "-qq"])?;
            kernel_package()?
        }
    };
    let busybox = candidate(BUSYBOX)?;
    let wanted = [kernel, (BUSYBOX.to_string(), busybox)];
    let root = dir.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    let mut packages = Vec::new();
    for (name, version) in &wanted {
        let spec = format!("{name}={version}");
        let deb = fetch_deb(&dir.join("deb"), &root, name, version)?;
        let size = std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
        println!(
            "setup: fetched {spec} ({} KiB) into {}",
            size / 1024,
            root.display()
        );
        packages.push(spec);
    }
    std::fs::write(dir.join(STAMP), packages.join("\n") + "\n")?;
    cached_guest(&dir).context("the unpacked packages lack /boot/vmlinuz-* or /bin/busybox")
}

/// The cache's contents, if it is complete.
fn cached_guest(dir: &Path) -> Option<GuestPackages> {
    let stamp = std::fs::read_to_string(dir.join(STAMP)).ok()?;
    let root = dir.join("root");
    let busybox = root.join("bin").join("busybox");
    let boot = std::fs::read_dir(root.join("boot")).ok()?;
    let mut kernels: Vec<PathBuf> = boot
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let bzimage = kernels.pop()?;
    let release = bzimage
        .file_name()?
        .to_str()?
        .trim_start_matches("vmlinuz-")
        .to_string();
    if !busybox.is_file() {
        return None;
    }
    Some(GuestPackages {
        root,
        bzimage,
        release,
        busybox,
        packages: stamp.lines().map(str::to_string).collect(),
    })
}

/// `apt-cache show` of the candidate version, one field.
fn show_field(pkg: &str, field: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", pkg])
        .output()
        .context("running apt-cache show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{field}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .with_context(|| format!("apt-cache show {pkg}: no {field} (is apt's list current?)"))
}

fn candidate(pkg: &str) -> Result<String> {
    show_field(pkg, "Version")
}

/// The versioned kernel package the meta-package depends on, and its
/// version, e.g. (`linux-image-6.1.0-57-amd64`, `6.1.192-3`).
fn kernel_package() -> Result<(String, String)> {
    let deps = show_field(KERNEL_META, "Depends")?;
    parse_kernel_dep(&deps)
        .with_context(|| format!("{KERNEL_META} depends on no linux-image-*: {deps}"))
}

/// From a Depends line, the first `linux-image-*` package, with the version
/// it is pinned to or else its candidate.
fn parse_kernel_dep(deps: &str) -> Result<(String, String)> {
    for alt in deps.split([',', '|']) {
        let alt = alt.trim();
        let name = alt.split_whitespace().next().unwrap_or("");
        if !name.starts_with("linux-image-") {
            continue;
        }
        let pinned = alt
            .split_once("(=")
            .and_then(|(_, v)| v.split(')').next())
            .map(|v| v.trim().to_string());
        let version = match pinned {
            Some(v) => v,
            None => candidate(name)?,
        };
        return Ok((name.to_string(), version));
    }
    bail!("no linux-image-* dependency")
}

/// The .deb of `name` that apt-get download left in `dir`.
/// `apt-get download NAME=VERSION` into `deb_dir`, then `dpkg -x` it into
/// `root`: the package's files without installing it. The .deb's path.
pub fn fetch_deb(deb_dir: &Path, root: &Path, name: &str, version: &str) -> Result<PathBuf> {
    let spec = format!("{name}={version}");
    let st = Command::new("apt-get")
        .args(["download", "-qq", &spec])
        .current_dir(deb_dir)
        .status()
        .context("running apt-get download")?;
    if !st.success() {
        bail!("apt-get download {spec} failed ({st})");
    }
    let deb = find_deb(deb_dir, name)?;
    let st = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(root)
        .status()
        .context("running dpkg -x")?;
    if !st.success() {
        bail!("dpkg -x {} failed ({st})", deb.display());
    }
    Ok(deb)
}

fn find_deb(dir: &Path, name: &str) -> Result<PathBuf> {
    let prefix = format!("{name}_");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    debs.pop()
        .with_context(|| format!("apt-get download left no {name}_*.deb"))
}

fn run_apt(args: &[&str]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    let st = cmd.status().context("running apt-get")?;
    if !st.success() {
        bail!("apt-get {} failed ({st})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dep_is_the_pinned_versioned_package() {
        let (name, version) = parse_kernel_dep("linux-image-6.1.0-57-amd64 (= 6.1.192-3)").unwrap();
        assert_eq!(name, "linux-image-6.1.0-57-amd64");
        assert_eq!(version, "6.1.192-3");
        let (name, version) =
            parse_kernel_dep("foo (>= 1), linux-image-6.1.0-9-amd64-unsigned (= 6.1.27-1) | bar")
                .unwrap();
        assert_eq!(name, "linux-image-6.1.0-9-amd64-unsigned");
        assert_eq!(version, "6.1.27-1");
        assert!(parse_kernel_dep("foo, bar (= 1)").is_err());
    }
}
