//! The in-machine replica steps (`mode=replica`, hv/kernel virt/replica.rs):
//! the key-value service replicated with one log-dirty tracker to a
//! consumer inside the machine, which compares its shadow with the guest
//! after every epoch and then fails over. Each step prints the acceptance
//! line `replica-<backend>: mode=.. epochs=N pages_compared=M
//! mismatches=K vcpu_blob=.. failover=.. result=..` built from the
//! image's own `replica:` line, after checking it.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::emu::{self, Run, RunSpec};
use crate::logline::{field, num};
use crate::Emulator;

/// Epochs replicated before the failover.
const EPOCHS: u64 = 8;
/// Guest RAM in MiB (the replica compares every page at every epoch).
const GUEST_MIB: u64 = 8;

/// What the image reported on its `replica:` line (the key-value
/// service's, or with `guest=linux` the Linux guest's: no replies, the
/// committed epoch it failed over at instead).
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub backend: String,
    pub guest: Option<String>,
    pub mode: String,
    pub epochs: u64,
    pub pages_compared: u64,
    pub mismatches: u64,
    pub vcpu_blob: String,
    pub failover: String,
    pub at_epoch: Option<u64>,
    pub replies: u64,
    pub tracking_exits: u64,
    pub dirty_pages: u64,
    pub result: String,
}

impl Outcome {
    pub fn parse(output: &str) -> Result<Self> {
        let line = emu::hv_lines(output)
            .find_map(|l| l.split_once("replica: backend=").map(|_| l))
            .context("the image printed no `replica: backend=` line")?;
        let s = |k: &str| {
            field(line, k)
                .map(str::to_string)
                .with_context(|| format!("no {k}= in {line:?}"))
        };
        let n = |k: &str| num(line, k).with_context(|| format!("no number {k}= in {line:?}"));
        let guest = field(line, "guest").map(str::to_string);
        let linux = guest.as_deref() == Some("linux");
        Ok(Self {
            backend: s("backend")?,
            guest,
            mode: s("mode")?,
            epochs: n("epochs")?,
            pages_compared: n("pages_compared")?,
            mismatches: n("mismatches")?,
            vcpu_blob: s("vcpu_blob")?,
            failover: s("failover")?,
            at_epoch: if linux { Some(n("at_epoch")?) } else { None },
            replies: if linux { 0 } else { n("replies")? },
            tracking_exits: n("tracking_exits")?,
            dirty_pages: n("dirty_pages")?,
            result: s("result")?,
        })
    }

    /// The acceptance line.
    pub fn line(&self) -> String {
        format!(
            "replica-{}: {}mode={} epochs={} pages_compared={} mismatches={} vcpu_blob={} \
             failover={} result={}",
            self.backend,
            self.guest
                .as_ref()
                .map_or(String::new(), |g| format!("guest={g} ")),
            self.mode,
            self.epochs,
            self.pages_compared,
            self.mismatches,
            self.vcpu_blob,
            self.failover,
            self.result
        )
    }

    /// A correct run of the Linux guest: the backend and tracker asked
    /// for, `epochs` epochs each compared over all `pages` of the guest,
    /// everything equal, and the failover taken at the last of them.
    pub fn check_linux(&self, backend: &str, mode: &str, epochs: u64, pages: u64) -> Result<()> {
        if self.guest.as_deref() != Some("linux") || self.backend != backend || self.mode != mode {
            bail!(
                "ran guest={:?} backend={} mode={}, expected linux {backend} {mode}",
                self.guest,
                self.backend,
                self.mode
            );
        }
        if self.epochs != epochs || self.pages_compared != epochs * pages {
            bail!(
                "epochs={} pages_compared={}: expected {epochs} epochs of {pages} pages each \
                 (did Linux power off before the failover?)",
                self.epochs,
                self.pages_compared
            );
        }
        if self.mismatches != 0
            || self.vcpu_blob != "equal"
            || self.failover != "ok"
            || self.at_epoch != Some(epochs - 1)
            || self.result != "pass"
        {
            bail!("the replica run did not pass: {}", self.line());
        }
        Ok(())
    }

    /// Checks every run must meet: the backend and tracker asked for, and
    /// every epoch compared over the whole guest.
    fn check_shape(&self, backend: &str, mode: &str) -> Result<()> {
        if self.backend != backend || self.mode != mode {
            bail!(
                "ran backend={} mode={}, expected {backend} {mode}",
                self.backend,
                self.mode
            );
        }
        let pages = (GUEST_MIB << 20) / 4096;
        if self.epochs != EPOCHS || self.pages_compared != EPOCHS * pages {
            bail!(
                "epochs={} pages_compared={}: expected {EPOCHS} epochs of {pages} pages each",
                self.epochs,
                self.pages_compared
            );
        }
        Ok(())
    }

    /// A correct run: everything equal, the failover served the client.
    fn check_pass(&self, backend: &str, mode: &str) -> Result<()> {
        self.check_shape(backend, mode)?;
        if self.mismatches != 0
            || self.vcpu_blob != "equal"
            || self.failover != "ok"
            || self.result != "pass"
            || self.replies == 0
        {
            bail!("the replica run did not pass: {}", self.line());
        }
        Ok(())
    }

    /// The broken run (no PML drain): the comparison must have caught it.
    fn check_caught(&self, backend: &str, mode: &str) -> Result<()> {
        self.check_shape(backend, mode)?;
        if self.mismatches == 0 || self.result != "fail" {
            bail!(
                "the PML drain was skipped, yet the replica saw no mismatch: {}",
                self.line()
            );
        }
        Ok(())
    }

    /// Dirty-tracking exits per staged page (the figures).
    pub fn exits_per_page(&self) -> String {
        if self.dirty_pages == 0 {
            return "n/a".into();
        }
        format!(
            "{:.3}",
            self.tracking_exits as f64 / self.dirty_pages as f64
        )
    }
}

/// The hypervisor's own epoch-end pause (the replica's work taken out)
/// over the epochs after the full epoch 0: (min, max), in TSC cycles.
pub fn hv_pauses(output: &str) -> Option<(u64, u64)> {
    let p: Vec<u64> = emu::hv_lines(output)
        .filter(|l| l.contains("replica: epoch=") && num(l, "epoch").is_some_and(|e| e > 0))
        .filter_map(|l| num(l, "hv_pause_cycles"))
        .collect();
    Some((*p.iter().min()?, *p.iter().max()?))
}

fn boot(ctx: &mut Ctx, emulator: Emulator, tracker: &str, broken: bool) -> Result<Run> {
    let img = ctx.image()?;
    let backend = crate::selftest::backend(emulator).0;
    let tag = format!(
        "test-replica-{backend}-{tracker}{}",
        if broken { "-broken" } else { "" }
    );
    let mut spec = RunSpec::new(emulator, &tag);
    spec.cmdline = format!(
        "mode=replica tracker={tracker} epochs={EPOCHS} guest-mem={GUEST_MIB} keys=64 \
         epoch-exits=300{}",
        if broken { " broken=no-pml-drain" } else { "" }
    );
    spec.timeout = match emulator {
        Emulator::Bochs => Duration::from_secs(900),
        Emulator::Qemu => Duration::from_secs(300),
    };
    spec.icount = emulator == Emulator::Qemu;
    emu::run(&img, &spec)
}

fn pass(ctx: &mut Ctx, emulator: Emulator, tracker: &str) -> Result<String> {
    let run = boot(ctx, emulator, tracker, false)?;
    let backend = crate::selftest::backend(emulator).0;
    let o = Outcome::parse(&run.output)
        .and_then(|o| o.check_pass(backend, tracker).map(|()| o))
        .with_context(|| format!("{}; output:\n{}", run.describe(), run.output))?;
    if !run.passed() {
        bail!("the image did not report exit=pass ({})", run.describe());
    }
    println!("{}", o.line());
    let pause = hv_pauses(&run.output).map_or("n/a".into(), |(lo, hi)| format!("{lo}-{hi}"));
    Ok(format!(
        "{} replies={} tracking_exits={} dirty_pages={} exits_per_dirty_page={} \
         hv_pause_cycles={pause} [{}]",
        o.line(),
        o.replies,
        o.tracking_exits,
        o.dirty_pages,
        o.exits_per_page(),
        run.describe()
    ))
}

pub fn step_vmx_pml(ctx: &mut Ctx) -> Result<String> {
    pass(ctx, Emulator::Bochs, "pml")
}

pub fn step_vmx_wp(ctx: &mut Ctx) -> Result<String> {
    pass(ctx, Emulator::Bochs, "wp")
}

pub fn step_svm_ad(ctx: &mut Ctx) -> Result<String> {
    pass(ctx, Emulator::Qemu, "ad")
}

/// Write-protect under SVM too: both vendors on one tracker.
pub fn step_svm_wp(ctx: &mut Ctx) -> Result<String> {
    pass(ctx, Emulator::Qemu, "wp")
}

/// PML with the epoch-end drain skipped: passes only when the replica
/// reported mismatches and failed.
pub fn step_vmx_pml_broken(ctx: &mut Ctx) -> Result<String> {
    let run = boot(ctx, Emulator::Bochs, "pml", true)?;
    let o = Outcome::parse(&run.output)
        .and_then(|o| o.check_caught("vmx", "pml").map(|()| o))
        .with_context(|| format!("{}; output:\n{}", run.describe(), run.output))?;
    if run.passed() {
        bail!("the broken image reported exit=pass ({})", run.describe());
    }
    println!("{}", o.line());
    Ok(format!("{} (caught) [{}]", o.line(), run.describe()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(mismatches: u64, result: &str) -> String {
        format!(
            "doppel-hv: vendor=intel vmx=1\n\
             doppel-hv: replica: backend=vmx mode=pml epochs=8 pages_compared=16384 \
             mismatches={mismatches} vcpu_blob=equal failover=ok replies=60 reply_errors=0 \
             tracking_exits=3 dirty_pages=2100 result={result}\n"
        )
    }

    #[test]
    fn a_clean_run_passes_and_prints_the_acceptance_line() {
        let o = Outcome::parse(&text(0, "pass")).unwrap();
        o.check_pass("vmx", "pml").unwrap();
        assert_eq!(
            o.line(),
            "replica-vmx: mode=pml epochs=8 pages_compared=16384 mismatches=0 \
             vcpu_blob=equal failover=ok result=pass"
        );
        assert!(o.check_caught("vmx", "pml").is_err());
        assert!(o.check_pass("vmx", "wp").is_err(), "another tracker");
        assert!(o.check_pass("svm", "pml").is_err(), "another backend");
    }

    #[test]
    fn mismatches_fail_the_run_and_satisfy_the_broken_step() {
        let o = Outcome::parse(&text(5, "fail")).unwrap();
        assert!(o.check_pass("vmx", "pml").is_err());
        o.check_caught("vmx", "pml").unwrap();
        // Mismatches the image still called a pass: caught by neither.
        let lying = Outcome::parse(&text(5, "pass")).unwrap();
        assert!(lying.check_pass("vmx", "pml").is_err());
        assert!(lying.check_caught("vmx", "pml").is_err());
    }

    #[test]
    fn pauses_leave_out_epoch_zero() {
        let out = "doppel-hv: replica: epoch=0 pause_cycles=9 consumer_cycles=1 hv_pause_cycles=8\n\
                   doppel-hv: replica: epoch=1 pause_cycles=7 consumer_cycles=2 hv_pause_cycles=5\n\
                   doppel-hv: replica: epoch=2 pause_cycles=9 consumer_cycles=2 hv_pause_cycles=7\n";
        assert_eq!(hv_pauses(out), Some((5, 7)));
        assert_eq!(hv_pauses("doppel-hv: exit=pass\n"), None);
    }

    fn linux_text(mismatches: u64, at: u64, result: &str) -> String {
        format!(
            "doppel-hv: replica: backend=vmx guest=linux mode=pml epochs=5 \
             pages_compared=327680 mismatches={mismatches} vcpu_blob=equal failover=ok \
             at_epoch={at} tracking_exits=40 dirty_pages=9000 result={result}\n"
        )
    }

    #[test]
    fn the_linux_line_needs_every_epoch_compared_and_the_failover_at_the_last() {
        let o = Outcome::parse(&linux_text(0, 4, "pass")).unwrap();
        o.check_linux("vmx", "pml", 5, 65536).unwrap();
        assert_eq!(
            o.line(),
            "replica-vmx: guest=linux mode=pml epochs=5 pages_compared=327680 mismatches=0 \
             vcpu_blob=equal failover=ok result=pass"
        );
        assert!(
            o.check_linux("vmx", "wp", 5, 65536).is_err(),
            "another tracker"
        );
        assert!(
            o.check_linux("vmx", "pml", 6, 65536).is_err(),
            "fewer epochs"
        );
        let early = Outcome::parse(&linux_text(0, 2, "pass")).unwrap();
        assert!(early.check_linux("vmx", "pml", 5, 65536).is_err());
        let bad = Outcome::parse(&linux_text(3, 4, "fail")).unwrap();
        assert!(bad.check_linux("vmx", "pml", 5, 65536).is_err());
        // The key-value line is not a Linux one, and needs its replies.
        assert!(Outcome::parse(&text(0, "pass"))
            .unwrap()
            .check_linux("vmx", "pml", 8, 4096)
            .is_err());
        assert!(Outcome::parse(&text(0, "pass").replace(" replies=60", "")).is_err());
    }

    #[test]
    fn short_or_missing_lines_are_errors() {
        assert!(Outcome::parse("doppel-hv: exit=pass\n").is_err());
        let short = text(0, "pass").replace("epochs=8", "epochs=3");
        assert!(Outcome::parse(&short)
            .unwrap()
            .check_pass("vmx", "pml")
            .is_err());
        let partial = text(0, "pass").replace("pages_compared=16384", "pages_compared=100");
        assert!(Outcome::parse(&partial)
            .unwrap()
            .check_pass("vmx", "pml")
            .is_err());
    }
}
