//! The isolation steps: boot the image with `mode=isolation` (the hostile
//! guest tries every escape of its backend, one fresh guest per probe) and
//! judge the `isolation:` lines it prints:
//! `isolation: probe=vmsave-hv outcome=contained how=refused` per probe and
//! one final `isolation: backend=svm probes=26 contained=26 escaped=0
//! result=pass`. The `-broken` steps boot `broken=msr-passthrough` (MSR
//! bitmaps all zero) and must see escapes and result=fail.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::ctx::Ctx;
use crate::emu::{self, Run, RunSpec};
use crate::logline::{field, num};
use crate::Emulator;

/// Probes each backend must run (doppel_core::hostile::PROBES, counted
/// here on purpose: a probe dropped from the table fails the step).
pub const SVM_PROBES: u64 = 26;
pub const VMX_PROBES: u64 = 27;

/// The final line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub backend: String,
    pub probes: u64,
    pub contained: u64,
    pub escaped: u64,
    pub pass: bool,
    /// The line itself, for the CI log.
    pub line: String,
}

/// One probe's line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeLine {
    pub name: String,
    pub outcome: String,
    pub how: String,
}

/// Everything an isolation run printed.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub probes: Vec<ProbeLine>,
    pub summaries: Vec<Summary>,
    pub malformed: Vec<String>,
}

impl Report {
    pub fn parse(output: &str) -> Self {
        let mut r = Report::default();
        for line in output.lines().map(str::trim) {
            let Some(body) = line.strip_prefix("isolation: ") else {
                continue;
            };
            if field(body, "result").is_some() {
                let s = (|| {
                    Some(Summary {
                        backend: field(body, "backend")?.to_string(),
                        probes: num(body, "probes")?,
                        contained: num(body, "contained")?,
                        escaped: num(body, "escaped")?,
                        pass: match field(body, "result")? {
                            "pass" => true,
                            "fail" => false,
                            _ => return None,
                        },
                        line: line.to_string(),
                    })
                })();
                match s {
                    Some(s) => r.summaries.push(s),
                    None => r.malformed.push(line.to_string()),
                }
            } else if let (Some(n), Some(o), Some(h)) = (
                field(body, "probe"),
                field(body, "outcome"),
                field(body, "how"),
            ) {
                r.probes.push(ProbeLine {
                    name: n.to_string(),
                    outcome: o.to_string(),
                    how: h.to_string(),
                });
            } else {
                r.malformed.push(line.to_string());
            }
        }
        r
    }

    fn summary(&self) -> Result<&Summary> {
        if let Some(l) = self.malformed.first() {
            bail!("malformed isolation line: {l}");
        }
        match self.summaries.as_slice() {
            [s] => Ok(s),
            [] => bail!("no `isolation: backend=.. result=..` line"),
            _ => bail!(
                "{} isolation summary lines, expected one",
                self.summaries.len()
            ),
        }
    }

    /// Every one of `want` probes contained on `backend`; the summary line.
    pub fn check_pass(&self, backend: &str, want: u64) -> Result<&Summary> {
        let s = self.summary()?;
        if s.backend != backend
            || s.probes != want
            || s.contained != want
            || s.escaped != 0
            || !s.pass
        {
            bail!(
                "expected `isolation: backend={backend} probes={want} contained={want} escaped=0 result=pass`, got `{}`",
                s.line
            );
        }
        if self.probes.len() as u64 != want {
            bail!("{} probe lines, expected {want}", self.probes.len());
        }
        if let Some(p) = self.probes.iter().find(|p| p.outcome != "contained") {
            bail!("probe {} outcome={} how={}", p.name, p.outcome, p.how);
        }
        Ok(s)
    }

    /// The broken build: some probe escaped and the run failed.
    pub fn check_caught(&self, backend: &str, want: u64) -> Result<&Summary> {
        let s = self.summary()?;
        if s.backend != backend || s.probes != want || s.escaped == 0 || s.pass {
            bail!(
                "expected `isolation: backend={backend} probes={want} ... escaped>0 result=fail`, got `{}`",
                s.line
            );
        }
        let escaped = self
            .probes
            .iter()
            .filter(|p| p.outcome == "escaped")
            .count();
        if escaped as u64 != s.escaped {
            bail!("{escaped} escaped probe lines, summary says {}", s.escaped);
        }
        Ok(s)
    }
}

fn boot(ctx: &mut Ctx, emulator: Emulator, broken: bool) -> Result<(Run, Report)> {
    let img = ctx.image()?;
    let backend = crate::selftest::backend(emulator).0;
    let tag = format!(
        "test-isolation-{backend}{}",
        if broken { "-broken" } else { "" }
    );
    let mut spec = RunSpec::new(emulator, &tag);
    spec.cmdline = if broken {
        "mode=isolation broken=msr-passthrough".into()
    } else {
        "mode=isolation".into()
    };
    spec.timeout = match emulator {
        Emulator::Bochs => Duration::from_secs(600),
        Emulator::Qemu => Duration::from_secs(300),
    };
    let run = emu::run(&img, &spec)?;
    let report = Report::parse(&run.output);
    Ok((run, report))
}

fn want(emulator: Emulator) -> (&'static str, u64) {
    match emulator {
        Emulator::Qemu => ("svm", SVM_PROBES),
        Emulator::Bochs => ("vmx", VMX_PROBES),
    }
}

fn pass(ctx: &mut Ctx, emulator: Emulator) -> Result<String> {
    let (backend, n) = want(emulator);
    let (run, report) = boot(ctx, emulator, false)?;
    let s = match report.check_pass(backend, n) {
        Ok(s) => s,
        Err(e) => bail!("{e:#} ({}); output:\n{}", run.describe(), run.output),
    };
    if !run.passed() {
        bail!(
            "expected exit=pass ({}); output:\n{}",
            run.describe(),
            run.output
        );
    }
    Ok(format!("{} [{}]", s.line, run.describe()))
}

fn broken(ctx: &mut Ctx, emulator: Emulator) -> Result<String> {
    let (backend, n) = want(emulator);
    let (run, report) = boot(ctx, emulator, true)?;
    let s = match report.check_caught(backend, n) {
        Ok(s) => s,
        Err(e) => bail!("{e:#} ({}); output:\n{}", run.describe(), run.output),
    };
    if run.passed() || !run.failed_cleanly() {
        bail!("expected exit=fail ({})", run.describe());
    }
    let names: Vec<&str> = report
        .probes
        .iter()
        .filter(|p| p.outcome == "escaped")
        .map(|p| p.name.as_str())
        .collect();
    // The escapes the bug opens: reading the host's EFER, and on SVM the
    // host save area's address.
    let must: &[&str] = match emulator {
        Emulator::Qemu => &["rdmsr-efer", "rdmsr-vm_hsave_pa"],
        Emulator::Bochs => &["rdmsr-efer", "rdmsr-lstar"],
    };
    if let Some(m) = must.iter().find(|m| !names.contains(m)) {
        bail!("broken=msr-passthrough: probe {m} did not escape (escaped: {names:?})");
    }
    Ok(format!(
        "msr-passthrough caught: {} (escaped: {}) [{}]",
        s.line,
        names.join(","),
        run.describe()
    ))
}

pub fn step_svm(ctx: &mut Ctx) -> Result<String> {
    pass(ctx, Emulator::Qemu)
}

pub fn step_vmx(ctx: &mut Ctx) -> Result<String> {
    pass(ctx, Emulator::Bochs)
}

pub fn step_svm_broken(ctx: &mut Ctx) -> Result<String> {
    broken(ctx, Emulator::Qemu)
}

pub fn step_vmx_broken(ctx: &mut Ctx) -> Result<String> {
    broken(ctx, Emulator::Bochs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_text(n: u64, escaped: &[u64], result: &str) -> String {
        let mut s = String::from("doppel-hv: vendor=amd svm=1\n");
        for i in 0..n {
            let o = if escaped.contains(&i) {
                "escaped how=reached"
            } else {
                "contained how=refused"
            };
            s += &format!("isolation: probe=p{i} outcome={o}\n");
        }
        s += &format!(
            "isolation: backend=svm probes={n} contained={} escaped={} result={result}\n",
            n - escaped.len() as u64,
            escaped.len()
        );
        s
    }

    #[test]
    fn the_expected_counts_are_the_probe_table() {
        use doppel_core::{hostile, msr::Vendor};
        assert_eq!(SVM_PROBES, hostile::count(Vendor::Svm) as u64);
        assert_eq!(VMX_PROBES, hostile::count(Vendor::Vmx) as u64);
    }

    #[test]
    fn a_contained_run_passes() {
        let r = Report::parse(&run_text(24, &[], "pass"));
        let s = r.check_pass("svm", 24).unwrap();
        assert!(s.line.starts_with("isolation: backend=svm probes=24"));
        assert!(r.check_caught("svm", 24).is_err());
    }

    #[test]
    fn a_missing_probe_or_an_escape_fails() {
        // One probe fewer than the backend must run.
        let r = Report::parse(&run_text(23, &[], "pass"));
        assert!(r.check_pass("svm", 24).is_err());
        // The other backend.
        assert!(Report::parse(&run_text(24, &[], "pass"))
            .check_pass("vmx", 24)
            .is_err());
        // An escape, even under a (lying) result=pass.
        let r = Report::parse(&run_text(24, &[3], "pass"));
        assert!(r.check_pass("svm", 24).is_err());
        let r = Report::parse(&run_text(24, &[3, 7], "fail"));
        assert!(r.check_pass("svm", 24).is_err());
        assert_eq!(r.check_caught("svm", 24).unwrap().escaped, 2);
        // A probe line that is not contained though the summary says so.
        let t = run_text(24, &[], "pass").replace(
            "probe=p5 outcome=contained how=refused",
            "probe=p5 outcome=unclear how=stopped",
        );
        assert!(Report::parse(&t).check_pass("svm", 24).is_err());
        // No summary, two summaries, a malformed line.
        let t = run_text(24, &[], "pass");
        let without: String = t
            .lines()
            .filter(|l| !l.contains("result="))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(Report::parse(&without).check_pass("svm", 24).is_err());
        let twice = format!("{t}{}", t.lines().last().unwrap());
        assert!(Report::parse(&twice).check_pass("svm", 24).is_err());
        let bad = format!("{t}isolation: backend=svm probes=x result=pass\n");
        assert!(Report::parse(&bad).check_pass("svm", 24).is_err());
    }
}
