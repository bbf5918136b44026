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

/// A Multiboot2 module an ISO carries: GRUB loads `path` (as
/// /boot/<its file name>) and hands it to the kernel with the module string
/// `args` (`module2 /boot/<name> <args>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub path: PathBuf,
    pub args: String,
}

impl Image {
    /// An ISO booting the same kernel with another command line (for
    /// self-test or standby modes). Built once per distinct command line.
    pub fn iso_with(&self, cmdline: &str) -> Result<PathBuf> {
        make_iso(&self.elf, cmdline, &[])
    }

    /// As [`Image::iso_with`], with Multiboot2 modules in this order
    /// (module 0 first). Built once per distinct command line and module
    /// list, again when the kernel or a module file is newer than the ISO.
    pub fn iso_with_modules(&self, cmdline: &str, modules: &[Module]) -> Result<PathBuf> {
        make_iso(&self.elf, cmdline, modules)
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
    let iso = make_iso(&elf, "", &[])?;
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

/// The ISO's file name for a command line and module list: as before for
/// no modules; with modules the command line's tag plus a hash of
/// everything GRUB is told (the Linux command line is too long for a name).
fn iso_name_with(cmdline: &str, modules: &[Module]) -> String {
    if modules.is_empty() {
        return iso_name(cmdline);
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &c in b.iter().chain([&0u8]) {
            h = (h ^ c as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(cmdline.as_bytes());
    for m in modules {
        eat(m.path.as_os_str().as_encoded_bytes());
        eat(m.args.as_bytes());
    }
    let base = iso_name(cmdline);
    let stem = base.strip_suffix(".iso").unwrap_or(&base);
    format!("{stem}-m{h:016x}.iso")
}

/// The grub.cfg of an ISO.
fn grub_cfg(cmdline: &str, modules: &[Module]) -> Result<String> {
    let mut entry = format!("  multiboot2 /boot/doppel-hv {cmdline}\n");
    for m in modules {
        entry += &format!("  module2 /boot/{} {}\n", module_file(m)?, m.args);
    }
    Ok(format!(
        "set timeout=0\nset default=0\nmenuentry \"doppel\" {{\n{entry}  boot\n}}\n"
    ))
}

/// A module's file name in the ISO's /boot.
fn module_file(m: &Module) -> Result<&str> {
    let name = m
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("module {} has no file name", m.path.display()))?;
    if name == "doppel-hv" || name == "grub" {
        bail!("module file name {name} clashes with the ISO's own files");
    }
    Ok(name)
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn make_iso(elf: &Path, cmdline: &str, modules: &[Module]) -> Result<PathBuf> {
    let out = crate::out_dir();
    let name = iso_name_with(cmdline, modules);
    let iso = out.join(&name);
    // Rebuild only when the kernel or a module is newer than the ISO.
    if let Some(t_iso) = modified(&iso) {
        let inputs = std::iter::once(elf).chain(modules.iter().map(|m| m.path.as_path()));
        if inputs.map(modified).all(|t| t.is_some_and(|t| t <= t_iso)) {
            return Ok(iso);
        }
    }
    let tree = out.join(format!("{name}.tree"));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("boot/grub"))?;
    fs::copy(elf, tree.join("boot/doppel-hv"))?;
    for m in modules {
        fs::copy(&m.path, tree.join("boot").join(module_file(m)?))
            .with_context(|| format!("copying module {}", m.path.display()))?;
    }
    fs::write(tree.join("boot/grub/grub.cfg"), grub_cfg(cmdline, modules)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str, args: &str) -> Module {
        Module {
            path: path.into(),
            args: args.into(),
        }
    }

    #[test]
    fn an_iso_without_modules_is_as_before() {
        assert_eq!(iso_name_with("", &[]), "doppel-hv.iso");
        assert_eq!(
            iso_name_with("mode=selftest epochs=2", &[]),
            "doppel-hv-mode_selftest_epochs_2.iso"
        );
        assert_eq!(
            grub_cfg("log=debug", &[]).unwrap(),
            "set timeout=0\nset default=0\nmenuentry \"doppel\" {\n  multiboot2 /boot/doppel-hv log=debug\n  boot\n}\n"
        );
    }

    #[test]
    fn modules_follow_the_kernel_in_order() {
        let mods = [
            m("/x/guest/vmlinux.pvh", "console=ttyS0 quiet"),
            m("/x/guest/initramfs.cpio", "initrd"),
        ];
        let cfg = grub_cfg("mode=linux guest-mem=256", &mods).unwrap();
        assert_eq!(
            cfg.lines().skip(3).collect::<Vec<_>>(),
            [
                "  multiboot2 /boot/doppel-hv mode=linux guest-mem=256",
                "  module2 /boot/vmlinux.pvh console=ttyS0 quiet",
                "  module2 /boot/initramfs.cpio initrd",
                "  boot",
                "}",
            ]
        );
        // Each distinct module list is its own ISO; the same list is the
        // same ISO.
        let a = iso_name_with("mode=linux", &mods);
        assert!(a.starts_with("doppel-hv-mode_linux-m") && a.ends_with(".iso"));
        assert_eq!(a, iso_name_with("mode=linux", &mods.clone()));
        let mut other = mods.clone();
        other[0].args += " tsc_early_khz=50000";
        assert_ne!(a, iso_name_with("mode=linux", &other));
        assert_ne!(a, iso_name_with("mode=linux", &mods[..1]));
        assert_ne!(a, iso_name_with("mode=linux", &[]));
        // A module may not overwrite the kernel.
        assert!(grub_cfg("", &[m("/y/doppel-hv", "")]).is_err());
    }
}
