//! `cargo xtask fuzz`: run every cargo-fuzz target for a bounded time.
//!
//! Not part of `cargo xtask test` (it needs nightly and minutes of CPU).
//! Seeds come from each package's `corpus/<target>/`; what libFuzzer finds
//! goes to target/doppel/fuzz-corpus/<target>/, so the repository's corpus
//! stays small: copy an input over by hand only when it is worth keeping.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// (package directory relative to the root, target names).
const TARGETS: &[(&str, &[&str])] = &[
    (
        "fuzz",
        &[
            "ring_entries",
            "control_area",
            "hvm_context",
            "pvh_domain",
            "ioreq",
            "machine_records",
        ],
    ),
    ("tools/doppel/fuzz", &["stream_decoder", "dm_state"]),
];

fn have(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Nightly and cargo-fuzz, installed when missing.
fn ensure_tools() -> Result<()> {
    if !have(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        eprintln!("fuzz: installing the nightly toolchain (cargo-fuzz needs it)");
        let st = Command::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .status()?;
        if !st.success() {
            bail!("rustup toolchain install nightly failed");
        }
    }
    if !have(Command::new("cargo").args(["+nightly", "fuzz", "--version"])) {
        eprintln!("fuzz: cargo install cargo-fuzz");
        let st = Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz"])
            .status()?;
        if !st.success() {
            bail!("cargo install cargo-fuzz failed");
        }
    }
    Ok(())
}

/// Run each target (or those whose name contains `only`) for `seconds`.
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    ensure_tools()?;
    let root = crate::root();
    let mut ran = 0;
    let mut failed = Vec::new();
    for (dir, targets) in TARGETS {
        for t in *targets {
            if only.is_some_and(|o| !t.contains(o)) {
                continue;
            }
            ran += 1;
            let found = crate::out_dir().join("fuzz-corpus").join(t);
            std::fs::create_dir_all(&found)?;
            let seeds = Path::new("corpus").join(t);
            println!("---- fuzz {t} for {seconds}s");
            let st = Command::new("cargo")
                .current_dir(root.join(dir))
                // The package is not in the workspace; its own rust-toolchain
                // pin does not apply, nightly is asked for explicitly.
                .env_remove("RUSTUP_TOOLCHAIN")
                .args(["+nightly", "fuzz", "run", t])
                .arg(&found)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .status()
                .with_context(|| format!("running cargo fuzz for {t}"))?;
            if st.success() {
                println!("PASS fuzz {t}");
            } else {
                println!("FAIL fuzz {t} (crash input under {dir}/artifacts/{t}/)");
                failed.push(*t);
            }
        }
    }
    if ran == 0 {
        bail!("no fuzz target matches {only:?}");
    }
    println!("{} passed, {} failed", ran - failed.len(), failed.len());
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}
