//! Links the image with the workspace's `linker.ld` (load address, section
//! order, symbols the boot code and the frame allocator rely on).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let script = manifest
        .ancestors()
        .nth(2)
        .expect("hv/kernel lives two levels below the workspace root")
        .join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    // Only the image is linked with the script and as a fixed-address
    // executable; a host build of the library (unit tests) is untouched.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        // GRUB loads ELF executables at their physical addresses; the
        // target's default static-PIE output is not one.
        println!("cargo:rustc-link-arg-bins=--no-pie");
        build_guest(manifest.ancestors().nth(2).expect("workspace root"));
    }
}

/// Build the test guest (hv/guest) and hand its ELF to the image through
/// `DOPPEL_GUEST_ELF`, for `include_bytes!`. It gets a target directory of
/// its own so this nested cargo never waits on the outer one's lock.
fn build_guest(root: &Path) {
    for dir in ["hv/guest", "hv/core/src", "hv/abi/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let target_dir = root.join("target").join("guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--package", "doppel-guest"])
        .args(["--target", "x86_64-unknown-none", "--target-dir"])
        .arg(&target_dir);
    // The outer build's wrappers (clippy) and flags are not the guest's.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo to build the test guest");
    assert!(
        status.success(),
        "building the test guest (hv/guest) failed"
    );
    let elf = target_dir
        .join("x86_64-unknown-none")
        .join("release")
        .join("doppel-guest");
    println!("cargo:rustc-env=DOPPEL_GUEST_ELF={}", elf.display());
}
