//! Building the hypervisor image: the kernel ELF and a GRUB (Multiboot2) ISO
//! that boots it in both QEMU and Bochs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// A built image.
#[derive(Clone, Debug)]
pub struct Image {
    /// The Multiboot2 kernel ELF.
    pub elf: PathBuf,
    /// A GRUB rescue ISO booting `elf` with the default command line.
    pub iso: PathBuf,
}

impl Image {
    /// An ISO booting the same kernel with another command line (for
    /// self-test or standby modes). Built once per distinct command line.
    pub fn iso_with(&self, cmdline: &str) -> Result<PathBuf> {
        make_iso(&self.elf, cmdline)
    }
}

/// Build the kernel (release) and the default ISO.
pub fn build() -> Result<Image> {
    let root = crate::root();
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--package",
            "doppel-kernel",
            "--target",
            KERNEL_TARGET,
        ])
        .current_dir(&root)
        .status()
        .context("running cargo build for the kernel")?;
    if !st.success() {
        bail!("building the hypervisor image failed");
    }
    let elf = root
        .join("target")
        .join(KERNEL_TARGET)
        .join("release")
        .join("doppel-hv");
    if !elf.exists() {
        bail!("kernel ELF not found at {}", elf.display());
    }
    let iso = make_iso(&elf, "")?;
    Ok(Image { elf, iso })
}

fn iso_name(cmdline: &str) -> String {
    if cmdline.is_empty() {
        return "doppel-hv.iso".into();
    }
    let tag: String = cmdline
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("doppel-hv-{tag}.iso")
}

fn make_iso(elf: &Path, cmdline: &str) -> Result<PathBuf> {
    let out = crate::out_dir();
    let iso = out.join(iso_name(cmdline));
    // Rebuild only when the kernel is newer than the ISO.
    if let (Ok(a), Ok(b)) = (fs::metadata(elf), fs::metadata(&iso)) {
        if let (Ok(ta), Ok(tb)) = (a.modified(), b.modified()) {
            if tb >= ta {
                return Ok(iso);
            }
        }
    }
    let tree = out.join(format!("{}.tree", iso_name(cmdline)));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("boot/grub"))?;
    fs::copy(elf, tree.join("boot/doppel-hv"))?;
    fs::write(
        tree.join("boot/grub/grub.cfg"),
        format!(
            "set timeout=0\nset default=0\nmenuentry \"doppel\" {{\n  multiboot2 /boot/doppel-hv {cmdline}\n  boot\n}}\n"
        ),
    )?;
    let o = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&tree)
        .output()
        .context("running grub-mkrescue (is grub-pc-bin installed? try `cargo xtask setup`)")?;
    if !o.status.success() {
        bail!(
            "grub-mkrescue failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(iso)
}
