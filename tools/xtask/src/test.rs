//! `cargo xtask test`: every check in one run, ending with `N passed, N failed`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::emu::{self, RunSpec};
use crate::image::{self, Image, KERNEL_TARGET};
use crate::Emulator;

/// Shared state of one test run (the image is built once).
pub struct Ctx {
    pub long: bool,
    image: Option<Image>,
}

impl Ctx {
    pub fn image(&mut self) -> Result<Image> {
        if let Some(i) = &self.image {
            return Ok(i.clone());
        }
        let i = image::build()?;
        self.image = Some(i.clone());
        Ok(i)
    }
}

type StepFn = fn(&mut Ctx) -> Result<String>;

/// The steps, in order. Each returns a one-line detail on success.
fn steps() -> Vec<(&'static str, StepFn)> {
    vec![
        ("fmt", step_fmt),
        ("clippy-host", step_clippy_host),
        ("clippy-image", step_clippy_image),
        ("host-tests", step_host_tests),
        ("xen-verify-stream", crate::verifier::step_xen_verify_stream),
        ("image-build", step_image_build),
        ("boot-qemu-svm", step_boot_qemu),
        ("boot-bochs-vmx", step_boot_bochs),
        ("boot-qemu-no-virt", step_boot_no_virt),
    ]
}

pub fn run(long: bool, only: Option<&str>) -> Result<()> {
    let mut ctx = Ctx { long, image: None };
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut failures = Vec::new();
    for (name, f) in steps() {
        if let Some(o) = only {
            if !name.contains(o) {
                continue;
            }
        }
        println!("---- {name}");
        let t = Instant::now();
        match f(&mut ctx) {
            Ok(detail) => {
                passed += 1;
                println!("PASS {name} ({:.1}s) {detail}", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name} ({:.1}s): {e:#}", t.elapsed().as_secs_f64());
                failures.push(name);
            }
        }
    }
    if !failures.is_empty() {
        println!("failed steps: {}", failures.join(", "));
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Run a command in the workspace root; fail with its output's tail.
pub fn cargo(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(crate::root())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("cargo {} failed:\n{}", args.join(" "), tail.join("\n"));
    }
    Ok(text)
}

fn step_fmt(_: &mut Ctx) -> Result<String> {
    cargo(&["fmt", "--all", "--check"])?;
    Ok(String::new())
}

fn step_clippy_host(_: &mut Ctx) -> Result<String> {
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    Ok(String::new())
}

fn step_clippy_image(_: &mut Ctx) -> Result<String> {
    cargo(&[
        "clippy",
        "--package",
        "doppel-kernel",
        "--target",
        KERNEL_TARGET,
        "--release",
        "--",
        "-D",
        "warnings",
    ])?;
    Ok(String::new())
}

fn step_host_tests(_: &mut Ctx) -> Result<String> {
    let out = cargo(&["test", "--release"])?;
    // Sum cargo's own per-binary summaries into one line.
    let (mut p, mut f) = (0u64, 0u64);
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let part = part.trim();
                if let Some(n) = part.strip_suffix(" passed") {
                    p += n.rsplit(' ').next().unwrap_or("0").parse().unwrap_or(0);
                } else if let Some(n) = part.strip_suffix(" failed") {
                    f += n.parse().unwrap_or(0);
                }
            }
        }
    }
    Ok(format!("cargo tests: {p} passed, {f} failed"))
}

fn step_image_build(ctx: &mut Ctx) -> Result<String> {
    let img = ctx.image()?;
    let size = std::fs::metadata(&img.elf)?.len();
    Ok(format!("{} ({} KiB)", img.iso.display(), size / 1024))
}

/// Parse `doppel-hv: key=value ...` capability line into a map.
pub fn capability(run: &emu::Run) -> Option<BTreeMap<String, String>> {
    let line = run.lines_with("doppel-hv: vendor=").next()?;
    let body = line.strip_prefix("doppel-hv: ")?;
    Some(
        body.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

const CAP_KEYS: &[&str] = &[
    "vendor",
    "vmx",
    "ept",
    "ept_ad",
    "pml",
    "unrestricted",
    "svm",
    "npt",
    "nrips",
    "virt",
];

fn expect_caps(run: &emu::Run, want: &[(&str, &str)]) -> Result<String> {
    let Some(caps) = capability(run) else {
        bail!(
            "no capability line ({}); output:\n{}",
            run.describe(),
            run.output
        );
    };
    for k in CAP_KEYS {
        if !caps.contains_key(*k) {
            bail!("capability line lacks key {k}");
        }
    }
    for (k, v) in want {
        let got = caps.get(*k).map(String::as_str).unwrap_or("");
        if got != *v {
            bail!("capability {k}={got}, expected {v}");
        }
    }
    if !run.passed() {
        bail!(
            "the image did not report success ({}); output:\n{}",
            run.describe(),
            run.output
        );
    }
    Ok(format!(
        "{} [{}]",
        run.lines_with("doppel-hv: vendor=").next().unwrap_or(""),
        run.describe()
    ))
}

fn step_boot_qemu(ctx: &mut Ctx) -> Result<String> {
    let img = ctx.image()?;
    let mut spec = RunSpec::new(Emulator::Qemu, "test-boot-qemu");
    spec.timeout = Duration::from_secs(60);
    let run = emu::run(&img, &spec)?;
    expect_caps(
        &run,
        &[("vendor", "amd"), ("svm", "1"), ("npt", "1"), ("virt", "on")],
    )
}

fn step_boot_bochs(ctx: &mut Ctx) -> Result<String> {
    let img = ctx.image()?;
    let mut spec = RunSpec::new(Emulator::Bochs, "test-boot-bochs");
    spec.timeout = Duration::from_secs(120);
    let run = emu::run(&img, &spec)?;
    expect_caps(
        &run,
        &[
            ("vendor", "intel"),
            ("vmx", "1"),
            ("ept", "1"),
            ("ept_ad", "1"),
            ("pml", "1"),
            ("virt", "on"),
        ],
    )
}

fn step_boot_no_virt(ctx: &mut Ctx) -> Result<String> {
    let img = ctx.image()?;
    let mut spec = RunSpec::new(Emulator::Qemu, "test-boot-no-virt");
    spec.cpu = "qemu64".into();
    spec.timeout = Duration::from_secs(60);
    let run = emu::run(&img, &spec)?;
    let Some(err) = run
        .lines_with("doppel-hv: error: no hardware virtualization")
        .next()
    else {
        bail!(
            "expected the no-virtualization error ({}); output:\n{}",
            run.describe(),
            run.output
        );
    };
    if !run.failed_cleanly() || run.passed() {
        bail!("expected a failure status ({})", run.describe());
    }
    // isa-debug-exit: status v gives exit code (v << 1) | 1; 0x11 is failure.
    if run.exit_code != Some((0x11 << 1) | 1) {
        bail!("expected QEMU exit code 35, got {:?}", run.exit_code);
    }
    Ok(format!("{err} [{}]", run.describe()))
}
