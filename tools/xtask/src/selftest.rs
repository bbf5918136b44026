//! `cargo xtask selftest`: boot the image with `mode=selftest` and judge the
//! log-dirty self-test from the `logdirty:` lines it prints.
//!
//! The image prints one line per epoch,
//! `logdirty: backend=vmx mode=wp pattern=seq epoch=0 dirty=1033 truth=1033 missing=0 extra=0 exits=1033 ...`,
//! and a final `logdirty: backend=vmx result=pass epochs=40 failed=0`. A run
//! passes only when that final line says pass, its epoch count is what the
//! backend's modes times the patterns times the epochs per pattern give,
//! every epoch line was seen, and each has missing=0 and extra=0.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::emu::{self, Run, RunSpec};
use crate::image::Image;
use crate::logline::{field, num};
use crate::Emulator;

/// Workload patterns the image runs (doppel_abi::guest::PatternId::ALL).
pub const PATTERNS: u64 = doppel_abi::guest::PatternId::ALL.len() as u64;
/// Epochs per pattern when the command line does not say (`epochs=`).
pub const DEFAULT_EPOCHS: u64 = 4;
/// Hard limit of one Bochs self-test run (a full run takes about a minute).
pub const BOCHS_TIMEOUT: Duration = Duration::from_secs(600);
/// Hard limit of one QEMU self-test run.
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(300);

/// The backend an emulator's CPU gets, and the tracking modes it runs (as
/// the image names them in `mode=`).
pub fn backend(emulator: Emulator) -> (&'static str, [&'static str; 2]) {
    use doppel_core::selftest::Mode;
    match emulator {
        // EPT write-protect and PML.
        Emulator::Bochs => ("vmx", [Mode::WriteProtect.name(), Mode::Pml.name()]),
        // NPT write-protect and the NPT dirty-bit scan.
        Emulator::Qemu => ("svm", [Mode::WriteProtect.name(), Mode::AdScan.name()]),
    }
}

/// One `logdirty:` epoch line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epoch {
    pub backend: String,
    pub mode: String,
    pub pattern: String,
    pub epoch: u64,
    pub dirty: u64,
    pub truth: u64,
    pub missing: u64,
    pub extra: u64,
    pub exits: u64,
    /// Tracking epochs the epoch timer ended inside this guest epoch.
    pub timer_epochs: u64,
    /// The image marked the line as failing its checks.
    pub fail_mark: bool,
}

/// The final `logdirty: backend=.. result=.. epochs=.. failed=..` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub backend: String,
    pub pass: bool,
    pub epochs: u64,
    pub failed: u64,
}

/// Everything a self-test run printed about log-dirty.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    /// Every `guest: workload region N pages` the guest printed (once per
    /// boot of the test guest).
    pub work_pages: Vec<u64>,
    pub epochs: Vec<Epoch>,
    pub summary: Option<Summary>,
    /// Lines starting `logdirty:` that are neither an epoch nor a summary.
    pub malformed: Vec<String>,
}

impl Report {
    pub fn parse(output: &str) -> Self {
        let mut r = Report::default();
        for line in output.lines().map(str::trim) {
            // The guest's console lines: only its workload region is read
            // there; result lines come from the hypervisor alone.
            if emu::is_guest_line(line) {
                let body = &line[emu::GUEST_LINE_PREFIX.len()..];
                if let Some(rest) = body.strip_prefix("workload region ") {
                    match rest.strip_suffix(" pages").map(str::parse) {
                        Some(Ok(n)) => r.work_pages.push(n),
                        _ => r.malformed.push(line.to_string()),
                    }
                }
                continue;
            }
            let Some(body) = line.strip_prefix("logdirty: ") else {
                continue;
            };
            r.lines.push(line.to_string());
            if let Some(result) = field(body, "result") {
                let s = (|| {
                    Some(Summary {
                        backend: field(body, "backend")?.to_string(),
                        pass: match result {
                            "pass" => true,
                            "fail" => false,
                            _ => return None,
                        },
                        epochs: num(body, "epochs")?,
                        failed: num(body, "failed")?,
                    })
                })();
                match s {
                    Some(s) if r.summary.is_none() => r.summary = Some(s),
                    _ => r.malformed.push(line.to_string()),
                }
                continue;
            }
            let e = (|| {
                Some(Epoch {
                    backend: field(body, "backend")?.to_string(),
                    mode: field(body, "mode")?.to_string(),
                    pattern: field(body, "pattern")?.to_string(),
                    epoch: num(body, "epoch")?,
                    dirty: num(body, "dirty")?,
                    truth: num(body, "truth")?,
                    missing: num(body, "missing")?,
                    extra: num(body, "extra")?,
                    exits: num(body, "exits")?,
                    timer_epochs: num(body, "timer_epochs").unwrap_or(0),
                    fail_mark: body.split_whitespace().any(|w| w == "FAIL"),
                })
            })();
            match e {
                Some(e) => r.epochs.push(e),
                None => r.malformed.push(line.to_string()),
            }
        }
        r
    }

    /// Why this is not a passing run of `backend` in which each of `modes`
    /// ran `per_mode` epochs (and no other mode ran), or Ok.
    pub fn check_pass(&self, backend: &str, modes: &[&str], per_mode: u64) -> Result<()> {
        let want_epochs = per_mode * modes.len() as u64;
        if let Some(l) = self.malformed.first() {
            bail!("malformed logdirty line: {l}");
        }
        let Some(s) = &self.summary else {
            bail!("no `logdirty: backend=.. result=..` line");
        };
        if s.backend != backend || !s.pass || s.failed != 0 || s.epochs != want_epochs {
            bail!(
                "expected `logdirty: backend={backend} result=pass epochs={want_epochs} failed=0`, got {s:?}"
            );
        }
        if self.epochs.len() as u64 != want_epochs {
            bail!("{} epoch lines, expected {want_epochs}", self.epochs.len());
        }
        for e in &self.epochs {
            if e.backend != backend || e.missing != 0 || e.extra != 0 || e.fail_mark {
                bail!("epoch failed: {e:?}");
            }
            if !modes.contains(&e.mode.as_str()) {
                bail!("mode={} ran, expected only {modes:?}: {e:?}", e.mode);
            }
        }
        // The count alone passes a run whose one mode ran twice as long.
        for m in modes {
            let n = self.epochs.iter().filter(|e| e.mode == *m).count() as u64;
            if n != per_mode {
                bail!("mode={m} ran {n} epochs, expected {per_mode}");
            }
        }
        self.check_workload()
    }

    /// Each epoch's truth is the pages its pattern writes (recomputed here
    /// from the seed, the pattern and the epoch's place in it) plus the
    /// guest's bookkeeping pages (stack, page tables, 1 to all truth
    /// pages). Without this, a guest whose workload wrote nothing would
    /// pass: its bookkeeping pages alone are tracked exactly.
    fn check_workload(&self) -> Result<()> {
        use doppel_abi::guest::{PatternId, PAGE_TABLES_PAGES, STACK_PAGES, TRUTH_PAGES};
        let Some(&n) = self.work_pages.first() else {
            bail!("no `guest: workload region N pages` line");
        };
        if n == 0 || self.work_pages.iter().any(|&w| w != n) {
            bail!("workload regions {:?} pages", self.work_pages);
        }
        let mut nth: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for e in &self.epochs {
            let k = nth.entry((&e.mode, &e.pattern)).or_default();
            let local = *k;
            *k += 1;
            let Some(p) = PatternId::ALL.into_iter().find(|p| p.name() == e.pattern) else {
                bail!("unknown pattern in {e:?}");
            };
            let mut pages = std::collections::BTreeSet::new();
            doppel_core::workload::for_each_write(
                p,
                doppel_abi::guest::SELFTEST_SEED,
                local,
                n,
                &mut |w| {
                    pages.insert(w.page);
                },
            );
            let w = pages.len() as u64;
            let fixed = STACK_PAGES + PAGE_TABLES_PAGES;
            let (lo, hi) = (w + fixed + 1, w + fixed + TRUTH_PAGES);
            if !(lo..=hi).contains(&e.truth) {
                bail!(
                    "mode={} pattern={} epoch={}: truth={} pages, but that epoch of the pattern \
                     writes {w} distinct pages ({lo}..={hi} with the guest's own): the workload \
                     did not run as planned",
                    e.mode,
                    e.pattern,
                    e.epoch,
                    e.truth
                );
            }
        }
        Ok(())
    }

    /// Why this is not a run that caught a deliberate bug (some epoch with
    /// missing pages, and the final line saying fail), or Ok.
    pub fn check_caught(&self, backend: &str) -> Result<()> {
        let Some(s) = &self.summary else {
            bail!("no `logdirty: backend=.. result=..` line");
        };
        if s.backend != backend || s.pass || s.failed == 0 {
            bail!("expected result=fail with failed epochs, got {s:?}");
        }
        if !self.epochs.iter().any(|e| e.missing > 0 && e.fail_mark) {
            bail!("no epoch reported missing pages");
        }
        Ok(())
    }

    /// Per mode and pattern: epochs, dirty pages, tracking exits.
    pub fn per_pattern(&self) -> Vec<(String, String, u64, u64, u64)> {
        let mut m: BTreeMap<(String, String), (u64, u64, u64)> = BTreeMap::new();
        for e in &self.epochs {
            let t = m.entry((e.mode.clone(), e.pattern.clone())).or_default();
            t.0 += 1;
            t.1 += e.dirty;
            t.2 += e.exits;
        }
        let mut v: Vec<_> = m
            .into_iter()
            .map(|((mode, pat), (n, d, x))| (mode, pat, n, d, x))
            .collect();
        // Modes in the order the image runs them, patterns likewise.
        let order = |p: &str| {
            ["seq", "rand", "hot", "sparse", "mixed"]
                .iter()
                .position(|x| *x == p)
                .unwrap_or(usize::MAX)
        };
        v.sort_by_key(|(mode, pat, ..)| (mode != "wp", order(pat)));
        v
    }

    /// The per-pattern table as text.
    pub fn table(&self) -> String {
        let mut s = String::from("mode  pattern  epochs  dirty  exits  exits/dirty\n");
        for (mode, pat, n, d, x) in self.per_pattern() {
            let ratio = if d == 0 { 0.0 } else { x as f64 / d as f64 };
            s += &format!("{mode:<5} {pat:<8} {n:>6} {d:>6} {x:>6}  {ratio:.4}\n");
        }
        s
    }
}

/// The `epochs=` value of a command line, or the image's default.
pub fn epochs_of(cmdline: &str) -> u64 {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("epochs="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_EPOCHS)
}

/// Boot the self-test on `emulator` with `extra` words on the command line.
pub fn boot(img: &Image, emulator: Emulator, extra: &str, tag: &str) -> Result<(Run, Report)> {
    let mut spec = RunSpec::new(emulator, tag);
    spec.cmdline = format!("mode=selftest {extra}").trim().to_string();
    spec.timeout = match emulator {
        Emulator::Bochs => BOCHS_TIMEOUT,
        Emulator::Qemu => QEMU_TIMEOUT,
    };
    // QEMU: the TSC follows executed instructions, so the pause_cycles the
    // image prints repeat run to run.
    spec.icount = emulator == Emulator::Qemu;
    let run = emu::run(img, &spec)?;
    let report = Report::parse(&run.output);
    Ok((run, report))
}

/// Check a run that should pass; the detail line on success.
pub fn judge_pass(emulator: Emulator, extra: &str, run: &Run, report: &Report) -> Result<String> {
    let (backend, modes) = backend(emulator);
    if let Err(e) = report.check_pass(backend, &modes, PATTERNS * epochs_of(extra)) {
        bail!("{e:#} ({}); output:\n{}", run.describe(), run.output);
    }
    if !run.passed() {
        bail!("the image did not report exit=pass ({})", run.describe());
    }
    // The epoch timer was armed once in the write-protect run: the VMX-
    // preemption timer, or the local APIC timer under SVM.
    let (prefix, what) = match backend {
        "vmx" => ("doppel-hv: vmx: preemption timer:", "VMX-preemption timer"),
        _ => ("doppel-hv: svm: lapic timer:", "local APIC timer"),
    };
    if timer_exits(run.lines_with(prefix)) < 1 {
        bail!("no {what} exit reported ({})", run.describe());
    }
    let summary = report.lines.last().cloned().unwrap_or_default();
    Ok(format!("{summary} [{}]", run.describe()))
}

/// The largest `timer_exits=` count among timer probe lines (0 if none).
fn timer_exits<'a>(lines: impl Iterator<Item = &'a str>) -> u64 {
    lines
        .filter_map(|l| l.rsplit_once("timer_exits=")?.1.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// `cargo xtask selftest`: one run, every logdirty line and the per-pattern
/// table printed; fails unless the run passed.
pub fn command(img: &Image, emulator: Emulator, extra: &str) -> Result<()> {
    let (run, report) = boot(
        img,
        emulator,
        extra,
        &format!("selftest-{}", backend(emulator).0),
    )?;
    for l in &report.lines {
        println!("{l}");
    }
    print!("{}", report.table());
    println!("({})", run.describe());
    let detail = judge_pass(emulator, extra, &run, &report)?;
    println!("selftest: pass: {detail}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VMX backend's modes.
    const VMX: &[&str] = &["wp", "pml"];

    const GOOD: &str = "\
doppel-hv: guest: workload region 15360 pages
logdirty: backend=vmx mode=wp pattern=seq epoch=0 dirty=1033 truth=1033 missing=0 extra=0 exits=1033 pause_cycles=5
logdirty: backend=vmx mode=pml pattern=seq epoch=0 dirty=1033 truth=1033 missing=0 extra=0 exits=2 drains=1
logdirty: backend=vmx result=pass epochs=2 failed=0
";

    #[test]
    fn a_clean_run_passes_and_is_tabulated() {
        let r = Report::parse(GOOD);
        assert_eq!(r.lines.len(), 3);
        assert_eq!(r.epochs.len(), 2);
        assert_eq!(r.epochs[1].exits, 2);
        assert_eq!(r.epochs[1].mode, "pml");
        r.check_pass("vmx", VMX, 1).unwrap();
        // Wrong count, wrong backend.
        assert!(r.check_pass("vmx", VMX, 20).is_err());
        assert!(r.check_pass("svm", VMX, 1).is_err());
        assert!(r.check_caught("vmx").is_err());
        assert_eq!(
            r.per_pattern(),
            vec![
                ("wp".into(), "seq".into(), 1, 1033, 1033),
                ("pml".into(), "seq".into(), 1, 1033, 2)
            ]
        );
    }

    #[test]
    fn a_workload_that_did_not_run_fails() {
        // Only the guest's own 9 pages written and tracked exactly: every
        // epoch line is clean, but seq's epoch 0 writes 1024 pages.
        let idle = GOOD.replace(
            "dirty=1033 truth=1033 missing=0 extra=0 exits=1033",
            "dirty=9 truth=9 missing=0 extra=0 exits=9",
        );
        let e = Report::parse(&idle).check_pass("vmx", VMX, 1).unwrap_err();
        assert!(e.to_string().contains("writes 1024 distinct pages"), "{e}");
        // Half the pattern.
        let half = GOOD.replace(
            "truth=1033 missing=0 extra=0 exits=2",
            "truth=521 missing=0 extra=0 exits=2",
        );
        assert!(Report::parse(&half).check_pass("vmx", VMX, 1).is_err());
        // No region line, or a region of another size (epoch 0 of seq
        // writes min(1024, region) pages).
        let none: String = GOOD.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert!(Report::parse(&none).check_pass("vmx", VMX, 1).is_err());
        let small = GOOD.replace("region 15360 pages", "region 512 pages");
        assert!(Report::parse(&small).check_pass("vmx", VMX, 1).is_err());
    }

    #[test]
    fn a_missing_page_fails_and_counts_as_caught() {
        let bad = GOOD
            .replace(
                "dirty=1033 truth=1033 missing=0 extra=0 exits=1033 pause_cycles=5",
                "dirty=1032 truth=1033 missing=1 extra=0 exits=1033 pause_cycles=5 FAIL",
            )
            .replace(
                "result=pass epochs=2 failed=0",
                "result=fail epochs=2 failed=1",
            );
        let r = Report::parse(&bad);
        assert!(r.check_pass("vmx", VMX, 1).is_err());
        r.check_caught("vmx").unwrap();
    }

    #[test]
    fn a_passing_summary_does_not_excuse_a_bad_epoch_line() {
        // The summary claims pass but one epoch has an extra page.
        let lie = GOOD.replace("missing=0 extra=0 exits=2", "missing=0 extra=1 exits=2");
        assert!(Report::parse(&lie).check_pass("vmx", VMX, 1).is_err());
        // A missing epoch line.
        let short: String = GOOD
            .lines()
            .filter(|l| !l.contains("mode=pml"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Report::parse(&short).check_pass("vmx", VMX, 1).is_err());
        // A malformed line.
        let junk = format!("{GOOD}logdirty: backend=vmx mode=wp dirty=x\n");
        assert!(Report::parse(&junk).check_pass("vmx", VMX, 1).is_err());
    }

    #[test]
    fn every_mode_must_run_its_epochs() {
        // The epoch count is right (2) but PML never ran: write-protect
        // ran twice.
        let wp_twice = GOOD.replace("mode=pml", "mode=wp");
        let e = Report::parse(&wp_twice)
            .check_pass("vmx", VMX, 1)
            .unwrap_err();
        assert!(
            e.to_string().contains("mode=wp ran 2 epochs, expected 1"),
            "{e}"
        );
        // A mode of the other backend instead of PML.
        let ad = GOOD.replace("mode=pml", "mode=ad");
        let e = Report::parse(&ad).check_pass("vmx", VMX, 1).unwrap_err();
        assert!(e.to_string().contains("mode=ad ran"), "{e}");
        // A report missing one mode's lines altogether.
        let no_pml: String = GOOD
            .lines()
            .filter(|l| !l.contains("mode=pml"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replace("epochs=2", "epochs=1");
        assert!(Report::parse(&no_pml).check_pass("vmx", VMX, 1).is_err());
        // The names are the image's.
        assert_eq!(backend(Emulator::Bochs), ("vmx", ["wp", "pml"]));
        assert_eq!(backend(Emulator::Qemu), ("svm", ["wp", "ad"]));
    }

    #[test]
    fn epochs_come_from_the_command_line() {
        assert_eq!(epochs_of(""), DEFAULT_EPOCHS);
        assert_eq!(epochs_of("log=debug epochs=7"), 7);
    }

    #[test]
    fn timer_probe_lines_give_their_exit_count() {
        let out = "\
doppel-hv: svm: lapic timer: armed for 20000 TSC ticks, timer_exits=0
doppel-hv: svm: lapic timer: armed for 20000 TSC ticks, timer_exits=3
doppel-hv: svm: lapic timer: armed for 20000 TSC ticks, timer_exits=x
";
        assert_eq!(timer_exits(out.lines()), 3);
        assert_eq!(timer_exits(out.lines().take(1)), 0);
        assert_eq!(timer_exits("no probe here".lines().skip(1)), 0);
    }
}
