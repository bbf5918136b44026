//! The log-dirty self-test's judgement, vendor-neutral: compare what the
//! dirty log harvested in an epoch with the guest's own ground truth, and
//! decide whether the exit counts meet the bounds each mode promises.
//!
//! Both bitmaps use Xen's layout: pfn p is byte p >> 3, bit p & 7.

use core::fmt;

/// How dirty pages were tracked in an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Write-protect the nested tables; one fault per first write.
    WriteProtect,
    /// Intel page-modification logging.
    Pml,
    /// Scan and clear the nested tables' dirty bits at epoch end.
    AdScan,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::WriteProtect => "wp",
            Mode::Pml => "pml",
            Mode::AdScan => "ad",
        }
    }
}

/// Result of comparing one epoch's harvest with the truth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochCheck {
    /// Pages the dirty log reported.
    pub dirty: u64,
    /// Pages the guest says it wrote.
    pub truth: u64,
    /// In the truth, not in the log: lost writes. Must always be 0.
    pub missing: u64,
    /// In the log, not in the truth, and not declared by the hypervisor.
    pub extra: u64,
    /// In the log because the hypervisor wrote them on the guest's behalf.
    pub declared: u64,
}

fn byte(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

/// Compare a harvested log with the truth. Bitmaps may differ in length;
/// absent bytes count as zero. `declared` lists hypervisor writes.
pub fn compare(log: &[u8], truth: &[u8], declared: &[u8]) -> EpochCheck {
    let n = log.len().max(truth.len());
    let mut c = EpochCheck::default();
    for i in 0..n {
        let (l, t, d) = (byte(log, i), byte(truth, i), byte(declared, i));
        c.dirty += l.count_ones() as u64;
        c.truth += t.count_ones() as u64;
        c.missing += (t & !l).count_ones() as u64;
        let beyond = l & !t;
        c.declared += (beyond & d).count_ones() as u64;
        c.extra += (beyond & !d).count_ones() as u64;
    }
    c
}

/// One epoch's line, e.g.
/// `logdirty: backend=vmx mode=pml pattern=rand epoch=3 dirty=812 truth=812 missing=0 extra=0 exits=2`.
#[derive(Clone, Copy, Debug)]
pub struct EpochLine<'a> {
    pub backend: &'a str,
    pub mode: Mode,
    pub pattern: &'a str,
    pub epoch: u64,
    pub check: EpochCheck,
    /// Dirty-tracking exits in the epoch (faults, or PML-full exits).
    pub exits: u64,
    /// PML drains done at epoch ends (one per tracking epoch).
    pub drains: u64,
    /// Guest stop to guest resume in TSC cycles, when measured.
    pub pause_cycles: Option<u64>,
    /// Tracking epochs the epoch timer ended inside this guest epoch (each
    /// a harvest and re-arm while the guest was mid-pattern). The truth is
    /// compared with the union of all harvests of the guest epoch.
    pub timer_epochs: u64,
    /// Sum of the pages each tracking epoch harvested: what the exits are
    /// bounded by (a page written in two tracking epochs faults twice).
    /// Equals `check.dirty` without timer epochs.
    pub tracked_dirty: u64,
}

impl EpochLine<'_> {
    /// Whether this epoch meets every promise: no lost writes, no unexplained
    /// extra pages, and the mode's exit bound.
    pub fn passed(&self) -> bool {
        self.check.missing == 0 && self.check.extra == 0 && self.exits_ok()
    }

    /// Exit bounds: write-protect takes exactly one exit per page dirtied in
    /// each tracking epoch; PML at most one per 500 such pages plus one drain
    /// per tracking epoch; an A/D scan takes none.
    pub fn exits_ok(&self) -> bool {
        let dirty = self.tracked_dirty;
        match self.mode {
            Mode::WriteProtect => self.exits == dirty,
            Mode::Pml => self.exits * 500 <= dirty && self.drains <= 1 + self.timer_epochs,
            Mode::AdScan => self.exits == 0,
        }
    }
}

impl fmt::Display for EpochLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.check;
        write!(
            f,
            "logdirty: backend={} mode={} pattern={} epoch={} dirty={} truth={} missing={} extra={} exits={}",
            self.backend,
            self.mode.name(),
            self.pattern,
            self.epoch,
            c.dirty,
            c.truth,
            c.missing,
            c.extra,
            self.exits
        )?;
        if c.declared > 0 {
            write!(f, " declared={}", c.declared)?;
        }
        if self.mode == Mode::Pml {
            write!(f, " drains={}", self.drains)?;
        }
        if let Some(p) = self.pause_cycles {
            write!(f, " pause_cycles={p}")?;
        }
        if self.timer_epochs > 0 {
            write!(
                f,
                " timer_epochs={} tracked={}",
                self.timer_epochs, self.tracked_dirty
            )?;
        }
        if !self.passed() {
            write!(f, " FAIL")?;
        }
        Ok(())
    }
}

/// Running verdict over all epochs of a self-test.
#[derive(Clone, Copy, Debug, Default)]
pub struct Verdict {
    pub epochs: u64,
    pub failed: u64,
    pub dirty: u64,
    pub exits: u64,
}

impl Verdict {
    pub fn record(&mut self, line: &EpochLine<'_>) {
        self.epochs += 1;
        self.dirty += line.check.dirty;
        self.exits += line.exits;
        if !line.passed() {
            self.failed += 1;
        }
    }

    /// Passed when at least one epoch ran and none failed.
    pub fn passed(&self) -> bool {
        self.epochs > 0 && self.failed == 0
    }

    /// The closing line, e.g. `logdirty: backend=vmx result=pass epochs=40`.
    pub fn line<'a>(&'a self, backend: &'a str) -> impl fmt::Display + 'a {
        struct L<'a>(&'a Verdict, &'a str);
        impl fmt::Display for L<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "logdirty: backend={} result={} epochs={} failed={}",
                    self.1,
                    if self.0.passed() { "pass" } else { "fail" },
                    self.0.epochs,
                    self.0.failed
                )
            }
        }
        L(self, backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn bitmap(set: &BTreeSet<u32>, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        for &p in set {
            b[(p / 8) as usize] |= 1 << (p % 8);
        }
        b
    }

    proptest! {
        #[test]
        fn compare_equals_set_arithmetic(
            log in proptest::collection::btree_set(0u32..4096, 0..300),
            truth in proptest::collection::btree_set(0u32..4096, 0..300),
            declared in proptest::collection::btree_set(0u32..4096, 0..50),
            llen in 512usize..600, tlen in 512usize..600,
        ) {
            let c = compare(&bitmap(&log, llen), &bitmap(&truth, tlen), &bitmap(&declared, 512));
            prop_assert_eq!(c.dirty, log.len() as u64);
            prop_assert_eq!(c.truth, truth.len() as u64);
            prop_assert_eq!(c.missing, truth.difference(&log).count() as u64);
            let beyond: BTreeSet<u32> = log.difference(&truth).copied().collect();
            prop_assert_eq!(c.declared, beyond.intersection(&declared).count() as u64);
            prop_assert_eq!(c.extra, beyond.difference(&declared).count() as u64);
        }
    }

    fn line(mode: Mode, dirty: u64, exits: u64, drains: u64) -> EpochLine<'static> {
        EpochLine {
            backend: "vmx",
            mode,
            pattern: "rand",
            epoch: 3,
            check: EpochCheck {
                dirty,
                truth: dirty,
                ..Default::default()
            },
            exits,
            drains,
            pause_cycles: None,
            timer_epochs: 0,
            tracked_dirty: dirty,
        }
    }

    #[test]
    fn exit_bounds_bite() {
        assert!(line(Mode::WriteProtect, 16, 16, 0).passed());
        assert!(!line(Mode::WriteProtect, 16, 15, 0).passed());
        assert!(!line(Mode::WriteProtect, 16, 17, 0).passed());
        assert!(line(Mode::Pml, 1030, 2, 1).passed());
        assert!(!line(Mode::Pml, 812, 2, 1).passed());
        assert!(!line(Mode::Pml, 5000, 1, 2).passed());
        assert!(line(Mode::AdScan, 30, 0, 0).passed());
    }

    #[test]
    fn timer_epochs_bound_exits_by_tracked_pages() {
        // 100 distinct pages, but 30 of them written again after a timer
        // epoch re-armed tracking: 130 faults are right, 100 are not.
        let mut l = line(Mode::WriteProtect, 100, 130, 0);
        l.timer_epochs = 2;
        l.tracked_dirty = 130;
        assert!(l.passed());
        l.exits = 100;
        assert!(!l.passed());
        let mut p = line(Mode::Pml, 5000, 2, 3);
        p.timer_epochs = 2;
        p.tracked_dirty = 5000;
        assert!(p.passed(), "one drain per tracking epoch");
        p.drains = 4;
        assert!(!p.passed());
        assert!(l.to_string().contains(" timer_epochs=2 tracked=130"));
    }

    #[test]
    fn missing_pages_fail_the_epoch_and_the_run() {
        let mut l = line(Mode::WriteProtect, 10, 10, 0);
        l.check.truth = 11;
        l.check.missing = 1;
        assert!(!l.passed());
        let mut v = Verdict::default();
        v.record(&line(Mode::WriteProtect, 10, 10, 0));
        assert!(v.passed());
        v.record(&l);
        assert!(!v.passed());
        assert_eq!(
            v.line("svm").to_string(),
            "logdirty: backend=svm result=fail epochs=2 failed=1"
        );
        assert!(!Verdict::default().passed(), "no epochs is no pass");
    }

    #[test]
    fn line_format_is_stable() {
        let mut l = line(Mode::Pml, 812, 1, 1);
        l.check.dirty = 812;
        l.tracked_dirty = 812;
        assert_eq!(
            l.to_string(),
            "logdirty: backend=vmx mode=pml pattern=rand epoch=3 dirty=812 truth=812 missing=0 extra=0 exits=1 drains=1"
        );
        let mut w = line(Mode::WriteProtect, 16, 16, 0);
        w.pause_cycles = Some(1234);
        assert_eq!(
            w.to_string(),
            "logdirty: backend=vmx mode=wp pattern=rand epoch=3 dirty=16 truth=16 missing=0 extra=0 exits=16 pause_cycles=1234"
        );
    }
}
