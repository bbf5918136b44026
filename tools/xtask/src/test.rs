//! `cargo xtask test`: every check in one run, ending with `N passed, N failed`.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ctx::{cargo, cargo_env, Ctx};
use crate::emu::{self, RunSpec};
use crate::image::KERNEL_TARGET;
use crate::proc::Proc;
use crate::Emulator;

type StepFn = fn(&mut Ctx) -> Result<String>;

/// `cargo xtask demo`: one failover run shown live.
pub fn demo(seed: Option<u64>, kv: bool) -> Result<()> {
    let mut ctx = Ctx::new(false, seed);
    if kv {
        crate::failover::demo(&mut ctx)
    } else {
        crate::linuxha::demo(&mut ctx)
    }
}

/// How `cargo xtask test` runs its steps.
#[derive(Debug, Default)]
pub struct Options {
    pub long: bool,
    /// Run only the steps whose name contains this text (comma-separated
    /// texts: any of them).
    pub only: Option<String>,
    /// Run the chosen steps this many times (at least once).
    pub repeat: u32,
    /// Busy-loop processes kept running beside the steps.
    pub load: u32,
    pub seed: Option<u64>,
}

/// The steps, in order. Each returns a one-line detail on success.
fn steps() -> Vec<(&'static str, StepFn)> {
    vec![
        ("fmt", step_fmt),
        ("clippy-host", step_clippy_host),
        ("clippy-image", step_clippy_image),
        ("host-tests", step_host_tests),
        ("loom-ring", step_loom_ring),
        ("xen-conformance-layout", crate::conformance::step_layout),
        ("xen-ring-interop", crate::conformance::step_ring_interop),
        ("xen-verify-stream", crate::verifier::step_xen_verify_stream),
        (
            "xen-verify-sim-capture",
            crate::replica::step_verify_sim_capture,
        ),
        ("image-build", step_image_build),
        ("boot-qemu-svm", step_boot_qemu),
        ("boot-bochs-vmx", step_boot_bochs),
        ("boot-qemu-no-virt", step_boot_no_virt),
        ("boot-qemu-faults", step_boot_faults),
        ("selftest-bochs-vmx", step_selftest_vmx),
        ("selftest-bochs-vmx-broken", step_selftest_vmx_broken),
        ("selftest-qemu-svm", step_selftest_svm),
        ("selftest-qemu-svm-broken", step_selftest_svm_broken),
        ("selftest-bochs-vmx-timer", step_selftest_vmx_timer),
        ("selftest-qemu-svm-timer", step_selftest_svm_timer),
        ("isolation-qemu-svm", crate::isolation::step_svm),
        (
            "isolation-qemu-svm-broken",
            crate::isolation::step_svm_broken,
        ),
        ("isolation-bochs-vmx", crate::isolation::step_vmx),
        (
            "isolation-bochs-vmx-broken",
            crate::isolation::step_vmx_broken,
        ),
        ("replica-qemu-svm", crate::replica::step_replica_qemu),
        ("xen-verify-capture", crate::replica::step_verify_capture),
        ("failover-qemu-svm", crate::failover::step_failover),
        ("chain-qemu-svm", crate::chain::step_chain),
        ("witness-down-qemu-svm", crate::witness::step_witness_down),
        ("partition-qemu-svm", crate::witness::step_partition),
        ("backup-loss-qemu-svm", crate::backuploss::step_backup_loss),
        ("linux-image", crate::linux::step_linux_image),
        ("link-auth", crate::linkauth::step_link_auth),
        (
            "status-metrics-qemu-svm",
            crate::operate::step_status_metrics,
        ),
        ("config", crate::config::step_config),
        ("ocf", crate::ocf::step_ocf),
        ("linux-direct-qemu", crate::linuxboot::step_direct),
        ("linux-qemu-svm", crate::linuxboot::step_linux_qemu),
        ("linux-bochs-vmx", crate::linuxboot::step_linux_bochs),
        ("restore-loop-qemu-svm", crate::linuxboot::step_restore_qemu),
        (
            "restore-loop-bochs-vmx",
            crate::linuxboot::step_restore_bochs,
        ),
        (
            "restore-loop-qemu-svm-broken",
            crate::linuxboot::step_restore_qemu_broken,
        ),
        (
            "replica-linux-bochs-vmx-pml",
            crate::linuxboot::step_replica_bochs_pml,
        ),
        (
            "replica-linux-bochs-vmx-wp",
            crate::linuxboot::step_replica_bochs_wp,
        ),
        (
            "replica-linux-qemu-svm-ad",
            crate::linuxboot::step_replica_qemu_ad,
        ),
        (
            "replica-linux-qemu-svm-wp",
            crate::linuxboot::step_replica_qemu_wp,
        ),
        ("replica-bochs-vmx-pml", crate::inreplica::step_vmx_pml),
        ("replica-bochs-vmx-wp", crate::inreplica::step_vmx_wp),
        ("replica-qemu-svm-ad", crate::inreplica::step_svm_ad),
        ("replica-qemu-svm-wp", crate::inreplica::step_svm_wp),
        (
            "replica-bochs-vmx-pml-broken",
            crate::inreplica::step_vmx_pml_broken,
        ),
        ("linux-net-direct-qemu", crate::linuxnet::step_direct),
        ("linux-net-qemu-svm", crate::linuxdev::step_net_qemu),
        ("linux-failover-qemu-svm", crate::linuxfail::step_failover),
        ("linux-ha-qemu-svm", crate::linuxha::step_ha),
    ]
}

pub fn run(opts: &Options) -> Result<()> {
    let only = opts.only.as_deref();
    let mut ctx = Ctx::new(opts.long, opts.seed);
    let all = steps();
    let chosen: Vec<_> = all
        .iter()
        .filter(|(name, _)| only.is_none_or(|o| selects(o, name)))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
        bail!(
            "no test step matches --only {:?}; the steps are: {}",
            only.unwrap_or_default(),
            names.join(", ")
        );
    }
    let repeat = opts.repeat.max(1);
    let load = Load::start(opts.load)?;
    if opts.load > 0 {
        println!("load: {} busy-loop processes beside the steps", opts.load);
    }
    let mut tally = Tally::new(chosen.iter().map(|(n, _)| *n), repeat);
    for round in 1..=repeat {
        for &&(name, f) in &chosen {
            if repeat > 1 {
                println!("---- {name} (round {round}/{repeat})");
            } else {
                println!("---- {name}");
            }
            let t = Instant::now();
            // Steps that build or run emulators can take minutes with
            // nothing to say; show they are alive.
            let (done, ticker) = still_running(name);
            let result = f(&mut ctx);
            drop(done);
            let _ = ticker.join();
            tally.record(name, result.is_ok());
            match result {
                Ok(detail) => {
                    println!("PASS {name} ({:.1}s) {detail}", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    println!("FAIL {name} ({:.1}s): {e:#}", t.elapsed().as_secs_f64());
                }
            }
        }
    }
    // The busy loops end before the summary (and before exit(), which
    // runs no destructors).
    drop(load);
    print!("{}", tally.summary());
    if tally.failed() > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Pass counts per step over the rounds of a run.
struct Tally {
    repeat: u32,
    /// (step, runs passed, runs failed), in the order the steps run.
    steps: Vec<(&'static str, u32, u32)>,
}

impl Tally {
    fn new(names: impl Iterator<Item = &'static str>, repeat: u32) -> Self {
        Tally {
            repeat,
            steps: names.map(|n| (n, 0, 0)).collect(),
        }
    }

    fn record(&mut self, name: &str, ok: bool) {
        if let Some(s) = self.steps.iter_mut().find(|s| s.0 == name) {
            if ok {
                s.1 += 1;
            } else {
                s.2 += 1;
            }
        }
    }

    fn passed(&self) -> u32 {
        self.steps.iter().map(|s| s.1).sum()
    }

    fn failed(&self) -> u32 {
        self.steps.iter().map(|s| s.2).sum()
    }

    /// With `--repeat N` (N > 1) a table `step  passed/N`; then the
    /// failed steps; last the `P passed, F failed` line, which counts
    /// each step-run.
    fn summary(&self) -> String {
        let mut out = String::new();
        if self.repeat > 1 {
            let w = self.steps.iter().map(|s| s.0.len()).max().unwrap_or(0);
            out += &format!("{:w$}  passed/{}\n", "step", self.repeat);
            for (name, p, _) in &self.steps {
                out += &format!("{name:w$}  {p}/{}\n", self.repeat);
            }
        }
        let failures: Vec<String> = self
            .steps
            .iter()
            .filter(|s| s.2 > 0)
            .map(|(n, _, f)| {
                if self.repeat > 1 {
                    format!("{n} ({f} of {})", self.repeat)
                } else {
                    n.to_string()
                }
            })
            .collect();
        if !failures.is_empty() {
            out += &format!("failed steps: {}\n", failures.join(", "));
        }
        out += &format!("{} passed, {} failed\n", self.passed(), self.failed());
        out
    }
}

/// `--load K`: K busy-loop processes for as long as this lives. They are
/// killed when it is dropped, and each also ends by itself once this
/// process is gone (it checks every so often), so none outlives a run
/// that was killed.
struct Load {
    /// Killed when dropped ([`Proc`]).
    _procs: Vec<Proc>,
}

/// One `--load` process: busy until its parent (`$0`) is gone.
const BUSY_LOOP: &str = "i=0; while :; do i=$((i + 1)); \
     if [ $((i % 200000)) -eq 0 ] && ! kill -0 \"$0\" 2>/dev/null; then exit 0; fi; \
     done";

impl Load {
    fn start(k: u32) -> Result<Self> {
        let mut load = Load { _procs: Vec::new() };
        let parent = std::process::id().to_string();
        for _ in 0..k {
            let child = Proc::start(
                "busy loop",
                Command::new("sh")
                    .args(["-c", BUSY_LOOP, &parent])
                    .stdin(std::process::Stdio::null()),
                false,
            )
            .context("starting a busy-loop process for --load")?;
            load._procs.push(child);
        }
        Ok(load)
    }
}

/// Whether `--only FILTER` selects step `name`: FILTER is one or more
/// texts separated by commas, and a step is chosen if its name contains
/// any of them.
fn selects(filter: &str, name: &str) -> bool {
    filter
        .split(',')
        .filter(|t| !t.is_empty())
        .any(|t| name.contains(t))
}

/// Prints `     NAME: still running (Ns)` every 30 s until the returned
/// sender is dropped; join the handle after dropping it.
fn still_running(name: &'static str) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let start = Instant::now();
    let h = std::thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(30)) {
            println!(
                "     {name}: still running ({:.0}s)",
                start.elapsed().as_secs_f64()
            );
        }
    });
    (tx, h)
}

fn step_fmt(_: &mut Ctx) -> Result<String> {
    cargo(&["fmt", "--all", "--check"])?;
    Ok(String::new())
}

fn step_clippy_host(_: &mut Ctx) -> Result<String> {
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // The kernel's library and its unit tests, built for the host.
    cargo(&[
        "clippy",
        "--package",
        "doppel-kernel",
        "--lib",
        "--tests",
        "--",
        "-D",
        "warnings",
    ])?;
    Ok(String::new())
}

fn step_clippy_image(_: &mut Ctx) -> Result<String> {
    cargo(&[
        "clippy",
        "--package",
        "doppel-kernel",
        "--package",
        "doppel-guest",
        "--target",
        KERNEL_TARGET,
        "--release",
        "--",
        "-D",
        "warnings",
    ])?;
    Ok(String::new())
}

fn step_host_tests(ctx: &mut Ctx) -> Result<String> {
    // `--long`: sixteen times proptest's default number of cases.
    let cases = if ctx.long { "4096" } else { "256" };
    let mut out = cargo_env(&["test", "--release"], &[("PROPTEST_CASES", cases)])?;
    // The kernel's hardware-free library (boot info, command line, memory
    // ranges) is not a default member: it is built for the image's target.
    out += &cargo_env(
        &["test", "--release", "--package", "doppel-kernel", "--lib"],
        &[("PROPTEST_CASES", cases)],
    )?;
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

/// The loom model of the ring's index protocol (hv/abi/tests/loom_ring.rs).
/// `--cfg loom` changes every crate's build, so it gets its own target
/// directory and leaves the main build's cache alone.
fn step_loom_ring(_: &mut Ctx) -> Result<String> {
    let dir = crate::root().join("target/loom");
    let out = cargo_env(
        &[
            "test",
            "--release",
            "--package",
            "doppel-abi",
            "--test",
            "loom_ring",
            "--target-dir",
            &dir.to_string_lossy(),
        ],
        &[("RUSTFLAGS", "--cfg loom")],
    )?;
    let summary = out
        .lines()
        .find(|l| l.starts_with("test result: "))
        .context("no test summary from the loom model")?;
    // A cfg typo would compile the file to nothing and "pass" 0 tests.
    if !summary.contains(" 2 passed") {
        bail!("the loom model ran fewer tests than its two: {summary}");
    }
    Ok(summary.trim_start_matches("test result: ").to_string())
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
        crate::logline::pairs(body)
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
    "prefetchw",
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
        &[
            ("vendor", "amd"),
            ("svm", "1"),
            ("npt", "1"),
            // QEMU 7.2's TCG does not report PRFCHW for -cpu EPYC: the
            // rings' write hint must be skipped here, not executed.
            ("prefetchw", "0"),
            ("virt", "on"),
        ],
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
            // Bochs' Skylake-X reports PRFCHW, and the image gave the
            // hint once at boot before printing this line.
            ("prefetchw", "1"),
            ("virt", "on"),
        ],
    )
}

fn step_boot_no_virt(ctx: &mut Ctx) -> Result<String> {
    let img = ctx.image()?;
    let mut spec = RunSpec::new(Emulator::Qemu, "test-boot-no-virt");
    // QEMU 7.2's TCG `qemu64` model has SVM (without nested paging):
    // remove it to get a CPU without hardware virtualization.
    spec.cpu = "qemu64,-svm".into();
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

/// Deliberate failures (`mode=crash-*`): each must print its error line,
/// then `exit=fail`, and leave QEMU with the failure status, never hang.
fn step_boot_faults(ctx: &mut Ctx) -> Result<String> {
    let img = ctx.image()?;
    let cases = [
        (
            "crash-null",
            "doppel-hv: error: exception 14 (#PF page fault) error=0x0 ",
            " cr2=0x0",
        ),
        (
            "crash-panic",
            "doppel-hv: error: panic at ",
            ": requested by mode=crash-panic",
        ),
        (
            "crash-stack",
            "doppel-hv: error: exception 8 (#DF double fault) error=0x0 ",
            "",
        ),
    ];
    let mut seen = Vec::new();
    for (mode, prefix, suffix) in cases {
        let mut spec = RunSpec::new(Emulator::Qemu, &format!("test-{mode}"));
        spec.cmdline = format!("mode={mode}");
        spec.timeout = Duration::from_secs(60);
        let run = emu::run(&img, &spec)?;
        let Some(line) = run
            .lines_with(prefix)
            .find(|l| l.ends_with(suffix))
            .map(str::to_owned)
        else {
            bail!(
                "mode={mode}: expected a line `{prefix}...{suffix}` ({}); output:\n{}",
                run.describe(),
                run.output
            );
        };
        if !run.failed_cleanly() || run.passed() || run.exit_code != Some((0x11 << 1) | 1) {
            bail!(
                "mode={mode}: expected exit=fail and QEMU exit code 35 ({})",
                run.describe()
            );
        }
        seen.push(format!("{mode}: {line}"));
    }
    Ok(seen.join(" | "))
}

/// The log-dirty self-test under VMX in Bochs: EPT write-protect and PML,
/// 5 patterns x 4 epochs each, every epoch exact.
fn step_selftest_vmx(ctx: &mut Ctx) -> Result<String> {
    selftest_pass(ctx, Emulator::Bochs)
}

/// The log-dirty self-test under SVM in QEMU (-cpu EPYC, -icount): NPT
/// write-protect and dirty-bit scan, 5 patterns x 4 epochs each.
fn step_selftest_svm(ctx: &mut Ctx) -> Result<String> {
    selftest_pass(ctx, Emulator::Qemu)
}

/// The self-test with deliberate bugs under VMX: each must be caught.
fn step_selftest_vmx_broken(ctx: &mut Ctx) -> Result<String> {
    selftest_broken(ctx, Emulator::Bochs, &["no-fault-mark", "no-pml-drain"])
}

/// The self-test with the fault-time marking removed under SVM.
fn step_selftest_svm_broken(ctx: &mut Ctx) -> Result<String> {
    selftest_broken(ctx, Emulator::Qemu, &["no-fault-mark"])
}

/// VMX with the VMX-preemption timer ending tracking epochs every 5000 TSC
/// ticks mid-pattern: every guest epoch still exact over the union.
fn step_selftest_vmx_timer(ctx: &mut Ctx) -> Result<String> {
    selftest_timer(ctx, Emulator::Bochs, 5_000)
}

/// SVM with the LAPIC timer ending tracking epochs every 50 000 TSC ticks
/// (instructions, under -icount; the LAPIC counts host time too, so the
/// runner stops it while an epoch end is handled).
fn step_selftest_svm_timer(ctx: &mut Ctx) -> Result<String> {
    selftest_timer(ctx, Emulator::Qemu, 50_000)
}

fn selftest_timer(ctx: &mut Ctx, emulator: Emulator, ticks: u64) -> Result<String> {
    let img = ctx.image()?;
    let backend = crate::selftest::backend(emulator).0;
    let extra = format!("epoch-ticks={ticks}");
    let tag = format!("test-selftest-{backend}-timer");
    let (run, report) = crate::selftest::boot(&img, emulator, &extra, &tag)?;
    let detail = crate::selftest::judge_pass(emulator, &extra, &run, &report)?;
    let timer_epochs: u64 = report.epochs.iter().map(|e| e.timer_epochs).sum();
    if timer_epochs == 0 {
        bail!(
            "the epoch timer never ended a tracking epoch ({})",
            run.describe()
        );
    }
    Ok(format!(
        "{timer_epochs} timer-ended tracking epochs; {detail}"
    ))
}

fn selftest_pass(ctx: &mut Ctx, emulator: Emulator) -> Result<String> {
    let img = ctx.image()?;
    let tag = format!("test-selftest-{}", crate::selftest::backend(emulator).0);
    let (run, report) = crate::selftest::boot(&img, emulator, "", &tag)?;
    let detail = crate::selftest::judge_pass(emulator, "", &run, &report)?;
    if emulator == Emulator::Bochs {
        // Every VMX vCPU of the self-test saves and reloads its whole state
        // every few entries (hv/kernel/src/virt/vmx/roundtrip.rs).
        let trips = vmx_round_trips(&run.output)?;
        return Ok(format!("{detail}, state round trips={trips}"));
    }
    Ok(detail)
}

/// The state round trips the VMX self-test's vCPUs report (`vmx: state
/// round trips=N mismatches=M`), summed; an error when there are none or
/// any mismatched.
fn vmx_round_trips(output: &str) -> Result<u64> {
    let mut trips = 0;
    let mut lines = 0;
    for l in output.lines() {
        let Some(rest) = l.split("vmx: state round trips=").nth(1) else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let n: u64 = it.next().unwrap_or("").parse()?;
        if it.next() != Some("mismatches=0") {
            bail!("a VMX state round trip changed the state: {l}");
        }
        trips += n;
        lines += 1;
    }
    if lines == 0 || trips == 0 {
        bail!("no VMX state round trips reported ({lines} lines)");
    }
    Ok(trips)
}

/// Each deliberate bug must be caught (some epoch with missing pages,
/// result=fail), proving the check bites.
fn selftest_broken(ctx: &mut Ctx, emulator: Emulator, bugs: &[&str]) -> Result<String> {
    let img = ctx.image()?;
    let backend = crate::selftest::backend(emulator).0;
    let mut seen = Vec::new();
    for broken in bugs {
        // One epoch per pattern is enough to show the bug.
        let extra = format!("epochs=1 broken={broken}");
        let (run, report) = crate::selftest::boot(
            &img,
            emulator,
            &extra,
            &format!("test-selftest-{backend}-{broken}"),
        )?;
        if let Err(e) = report.check_caught(backend) {
            bail!(
                "broken={broken}: {e:#} ({}); output:\n{}",
                run.describe(),
                run.output
            );
        }
        if run.passed() || !run.failed_cleanly() {
            bail!("broken={broken}: expected exit=fail ({})", run.describe());
        }
        let worst = report.epochs.iter().map(|e| e.missing).max().unwrap_or(0);
        seen.push(format!(
            "{broken}: {} (max missing={worst}) [{:.1}s]",
            report.lines.last().cloned().unwrap_or_default(),
            run.elapsed.as_secs_f64()
        ));
    }
    Ok(seen.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_takes_comma_separated_alternatives() {
        assert!(selects("boot", "boot-qemu-svm"));
        assert!(!selects("boot", "selftest-qemu-svm"));
        assert!(selects("boot,selftest-qemu", "selftest-qemu-svm-timer"));
        assert!(selects("boot,selftest-qemu", "boot-bochs-vmx"));
        assert!(!selects("boot,selftest-qemu", "selftest-bochs-vmx"));
        // An empty alternative selects nothing by itself.
        assert!(!selects("boot,", "failover-qemu-svm"));
        assert!(!selects(",", "fmt"));
    }

    #[test]
    fn repeat_summary_counts_each_step_run() {
        let mut t = Tally::new(["fmt", "host-tests"].into_iter(), 3);
        for ok in [true, true, true] {
            t.record("fmt", ok);
        }
        for ok in [true, false, true] {
            t.record("host-tests", ok);
        }
        assert_eq!(
            t.summary(),
            "step        passed/3\n\
             fmt         3/3\n\
             host-tests  2/3\n\
             failed steps: host-tests (1 of 3)\n\
             5 passed, 1 failed\n"
        );
    }

    #[test]
    fn a_single_round_prints_no_table() {
        let mut t = Tally::new(["fmt", "clippy-host"].into_iter(), 1);
        t.record("fmt", true);
        t.record("clippy-host", false);
        assert_eq!(
            t.summary(),
            "failed steps: clippy-host\n1 passed, 1 failed\n"
        );
    }

    #[test]
    fn load_processes_end_with_their_guard() {
        let load = Load::start(2).unwrap();
        let pids: Vec<u32> = load._procs.iter().map(Proc::id).collect();
        assert_eq!(pids.len(), 2);
        let alive = |p: &u32| std::path::Path::new(&format!("/proc/{p}")).exists();
        assert!(pids.iter().all(alive));
        drop(load);
        // Killed and reaped: no such process any more.
        assert!(!pids.iter().any(alive), "{pids:?}");
    }
}
