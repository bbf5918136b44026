//! Links the image with the workspace's `linker.ld` (load address, section
//! order, symbols the boot code and the frame allocator rely on).
use std::path::PathBuf;

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
    }
}
