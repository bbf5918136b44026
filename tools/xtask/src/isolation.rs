//! The isolation steps: boot the image with `mode=isolation` (the hostile
//! guest tries every escape of its backend, one fresh guest per probe) and
//! judge the `isolation:` lines it prints:
//! `isolation: probe=vmsave-hv outcome=contained how=fault vector=6
//! error=0` per probe and one final `isolation: backend=svm probes=26
//! contained=26 escaped=0 result=pass`. Every probe must end the way
//! [`expected`] says: the refused instructions with #UD delivered in the
//! guest, the refused MSRs with #GP(0), the allow-listed MSRs
//! virtualized; a hypervisor that stops the guest at a refusal
//! (`how=refused`) or injects the wrong exception fails the step. The
//! `-broken` steps boot `broken=msr-passthrough` (MSR bitmaps all zero)
//! and must see escapes and result=fail.

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
    /// `how=fault`: the exception the guest took, and its error code.
    pub vector: Option<u64>,
    pub error: Option<u64>,
    pub line: String,
}

/// How a contained probe must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The guest took exception `vector` with error code 0 (none).
    Fault(u64),
    /// It reached only its own copy of an allow-listed MSR.
    Virtualized,
}

/// #UD and #GP.
const UD: u64 = 6;
const GP: u64 = 13;

/// How probe `name` must end on `backend`, written out here rather than
/// derived from the hypervisor's own tables (its allow-list, its refusal
/// mapping), so that a change there shows up as a failing step.
pub fn expected(backend: &str, name: &str) -> Expect {
    // The MSRs the world switch gives the guest its own copy of
    // (doppel_core::msr::ALLOW_LIST): LSTAR is AMD's only.
    let virtualized: &[&str] = match backend {
        "svm" => &["lstar", "sysenter_eip"],
        _ => &["sysenter_eip"],
    };
    if let Some(msr) = name
        .strip_prefix("rdmsr-")
        .or_else(|| name.strip_prefix("wrmsr-"))
    {
        return if virtualized.contains(&msr) {
            Expect::Virtualized
        } else {
            Expect::Fault(GP)
        };
    }
    // The XSETBV probe sets CR4.OSXSAVE first. Both backends intercept
    // that CR4 write (SVM every CR4 write, VMX through the CR4 mask, which
    // owns OSXSAVE) and refuse it with #GP(0): a MOV to CR4 exists, the
    // value is what is refused. XSETBV itself is not reached.
    if name == "xsetbv" {
        return Expect::Fault(GP);
    }
    Expect::Fault(UD)
}

impl ProbeLine {
    /// Whether the line ends the way [`expected`] says.
    pub fn as_expected(&self, backend: &str) -> bool {
        if self.outcome != "contained" {
            return false;
        }
        match expected(backend, &self.name) {
            Expect::Virtualized => self.how == "virtualized",
            Expect::Fault(v) => {
                self.how == "fault" && self.vector == Some(v) && self.error == Some(0)
            }
        }
    }
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
                    vector: num(body, "vector"),
                    error: num(body, "error"),
                    line: line.to_string(),
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
        if let Some(p) = self.probes.iter().find(|p| !p.as_expected(backend)) {
            let want = match expected(backend, &p.name) {
                Expect::Fault(v) => format!("how=fault vector={v} error=0"),
                Expect::Virtualized => "how=virtualized".to_string(),
            };
            bail!("probe {}: expected {want}, got `{}`", p.name, p.line);
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
    use doppel_core::{hostile, msr::Vendor};

    fn vendor(backend: &str) -> Vendor {
        match backend {
            "svm" => Vendor::Svm,
            _ => Vendor::Vmx,
        }
    }

    /// The probe lines a correct hypervisor prints on `backend` (the real
    /// probe table), `escaped` ones escaped, and the summary line.
    fn run_text(backend: &str, escaped: &[&str], result: &str) -> String {
        let mut s = String::from("doppel-hv: vendor=amd svm=1\n");
        let mut n = 0;
        for p in hostile::PROBES
            .iter()
            .filter(|p| p.runs_on(vendor(backend)))
        {
            n += 1;
            let how = if escaped.contains(&p.name) {
                "escaped how=reached".to_string()
            } else {
                match expected(backend, p.name) {
                    Expect::Fault(v) => format!("contained how=fault vector={v} error=0"),
                    Expect::Virtualized => "contained how=virtualized".to_string(),
                }
            };
            s += &format!("isolation: probe={} outcome={how}\n", p.name);
        }
        s += &format!(
            "isolation: backend={backend} probes={n} contained={} escaped={} result={result}\n",
            n - escaped.len(),
            escaped.len()
        );
        s
    }

    fn want(backend: &str) -> u64 {
        match backend {
            "svm" => SVM_PROBES,
            _ => VMX_PROBES,
        }
    }

    /// `text` with probe `name`'s line replaced by `line`'s words.
    fn with(text: &str, name: &str, words: &str) -> String {
        let key = format!("probe={name} ");
        let out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.contains(&key) {
                    format!("isolation: probe={name} {words}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert!(out.iter().any(|l| l.contains(&key)), "no probe {name}");
        out.join("\n") + "\n"
    }

    #[test]
    fn the_expected_counts_are_the_probe_table() {
        assert_eq!(SVM_PROBES, hostile::count(Vendor::Svm) as u64);
        assert_eq!(VMX_PROBES, hostile::count(Vendor::Vmx) as u64);
    }

    #[test]
    fn instructions_expect_ud_msrs_gp_and_the_allow_list_virtualized() {
        let tally = |backend: &str| {
            let (mut ud, mut gp, mut virt) = (0, 0, 0);
            for p in hostile::PROBES
                .iter()
                .filter(|p| p.runs_on(vendor(backend)))
            {
                match expected(backend, p.name) {
                    Expect::Fault(UD) => ud += 1,
                    Expect::Fault(GP) => gp += 1,
                    Expect::Virtualized => virt += 1,
                    Expect::Fault(v) => panic!("probe {} expects vector {v}", p.name),
                }
            }
            (ud, gp, virt)
        };
        // SVM: 11 SVM instructions; XSETBV (its CR4 write) and 10 MSRs
        // #GP; LSTAR and SYSENTER_EIP read and written virtualized.
        assert_eq!(tally("svm"), (11, 11, 4));
        // VMX: 14 VMX instructions; XSETBV and 10 MSRs; SYSENTER_EIP.
        assert_eq!(tally("vmx"), (14, 11, 2));
        assert_eq!(expected("svm", "vmrun-vmcb"), Expect::Fault(UD));
        assert_eq!(expected("vmx", "xsetbv"), Expect::Fault(GP));
        assert_eq!(expected("vmx", "vmfunc"), Expect::Fault(UD));
        assert_eq!(expected("svm", "rdmsr-efer"), Expect::Fault(GP));
        assert_eq!(expected("vmx", "wrmsr-lstar"), Expect::Fault(GP));
        assert_eq!(expected("svm", "wrmsr-lstar"), Expect::Virtualized);
    }

    #[test]
    fn a_contained_run_passes() {
        for backend in ["svm", "vmx"] {
            let r = Report::parse(&run_text(backend, &[], "pass"));
            let s = r.check_pass(backend, want(backend)).unwrap();
            assert!(s
                .line
                .starts_with(&format!("isolation: backend={backend} probes=")));
            assert!(r.check_caught(backend, want(backend)).is_err());
        }
    }

    #[test]
    fn a_refusal_that_stops_the_guest_or_injects_the_wrong_fault_fails() {
        let t = run_text("svm", &[], "pass");
        let fails = |t: &str| Report::parse(t).check_pass("svm", SVM_PROBES).is_err();
        assert!(!fails(&t));
        // The guest stopped at the refusal, as before injection.
        assert!(fails(&with(
            &t,
            "vmrun-vmcb",
            "outcome=contained how=refused"
        )));
        assert!(fails(&with(
            &t,
            "rdmsr-efer",
            "outcome=contained how=refused"
        )));
        // No IDT handler ran: the guest shut down.
        assert!(fails(&with(&t, "stgi", "outcome=contained how=shutdown")));
        // #GP for an instruction, #UD for an MSR, a stray #PF.
        let gp = "outcome=contained how=fault vector=13 error=0";
        let ud = "outcome=contained how=fault vector=6 error=0";
        assert!(fails(&with(&t, "vmsave-hv", gp)));
        assert!(fails(&with(&t, "wrmsr-tsc", ud)));
        assert!(fails(&with(
            &t,
            "clgi",
            "outcome=contained how=fault vector=14 error=0"
        )));
        // #GP with an error code other than 0; a fault without its vector.
        assert!(fails(&with(
            &t,
            "wrmsr-tsc",
            "outcome=contained how=fault vector=13 error=8"
        )));
        assert!(fails(&with(&t, "wrmsr-tsc", "outcome=contained how=fault")));
        // An allow-listed MSR refused instead of virtualized.
        assert!(fails(&with(&t, "rdmsr-lstar", gp)));
        // The same words are right where expected.
        assert!(!fails(&with(&t, "wrmsr-tsc", gp)));
        assert!(!fails(&with(&t, "xsetbv", gp)));
        let v = run_text("vmx", &[], "pass");
        assert!(Report::parse(&v).check_pass("vmx", VMX_PROBES).is_ok());
        let r = Report::parse(&with(&v, "xsetbv", ud));
        assert!(r.check_pass("vmx", VMX_PROBES).is_err());
    }

    #[test]
    fn a_missing_probe_or_an_escape_fails() {
        let t = run_text("svm", &[], "pass");
        // One probe line fewer than the backend must run.
        let fewer: String = t
            .lines()
            .filter(|l| !l.contains("probe=stgi "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Report::parse(&fewer).check_pass("svm", SVM_PROBES).is_err());
        // A summary counting one probe fewer.
        let r = Report::parse(&t);
        assert!(r.check_pass("svm", SVM_PROBES + 1).is_err());
        // The other backend.
        assert!(r.check_pass("vmx", SVM_PROBES).is_err());
        // An escape, even under a (lying) result=pass.
        let r = Report::parse(&run_text("svm", &["rdmsr-efer"], "pass"));
        assert!(r.check_pass("svm", SVM_PROBES).is_err());
        let r = Report::parse(&run_text("svm", &["rdmsr-efer", "wrmsr-tsc"], "fail"));
        assert!(r.check_pass("svm", SVM_PROBES).is_err());
        assert_eq!(r.check_caught("svm", SVM_PROBES).unwrap().escaped, 2);
        // A probe line that is not contained though the summary says so.
        let u = with(&t, "clgi", "outcome=unclear how=stopped");
        assert!(Report::parse(&u).check_pass("svm", SVM_PROBES).is_err());
        // No summary, two summaries, a malformed line.
        let without: String = t
            .lines()
            .filter(|l| !l.contains("result="))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(Report::parse(&without)
            .check_pass("svm", SVM_PROBES)
            .is_err());
        let twice = format!("{t}{}", t.lines().last().unwrap());
        assert!(Report::parse(&twice).check_pass("svm", SVM_PROBES).is_err());
        let bad = format!("{t}isolation: backend=svm probes=x result=pass\n");
        assert!(Report::parse(&bad).check_pass("svm", SVM_PROBES).is_err());
    }
}
