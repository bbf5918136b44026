//! The Linux boot steps of issue 19: boot the hypervisor with `mode=linux`
//! and Debian's kernel plus the busybox initramfs as Multiboot2 modules,
//! and judge what it prints.
//!
//! The hypervisor's lines (the interface, see docs/KERNEL.md):
//! - every guest console line as `doppel-hv: guest: <text>`;
//! - per byte /init writes to the mark port (0x602):
//!   `doppel-hv: linux: mark=<B> exits=<N> guest-tsc=<T> cpuid=<n> ...`
//!   with the exit counts since boot by reason ([`REASONS`]);
//! - at the end `doppel-hv: linux: stop=<poweroff|triple-fault|halted|error>
//!   exits=<N> restores=<R> guest-tsc=<T>` and the same reasons, then
//!   `doppel-hv: exit=pass` (clean poweroff) or `exit=fail`.
//!
//! Steps: `linux-qemu-svm`, `linux-bochs-vmx` (a plain boot),
//! `restore-loop-qemu-svm`, `restore-loop-bochs-vmx` (save, destroy and
//! rebuild the vCPU and platform every [`RESTORE_EVERY`] exits; the
//! transcript must equal the plain run's), `restore-loop-qemu-svm-broken`
//! (the restore skips LAPIC_REGS; the run must not finish cleanly).
//! `linux-direct-qemu` boots the same kernel and initramfs in QEMU without
//! Doppel: it proves /init and the checker on their own.

use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::ctx::Ctx;
use crate::emu::{self, Run, RunSpec};
use crate::image::Module;
use crate::linux::{self, LinuxImage, MARK_IDLE_END, MARK_IDLE_START, MARK_INIT};
use crate::logline::{field, num};
use crate::Emulator;

/// The exit reasons the hypervisor counts, in the order it prints them.
pub const REASONS: [&str; 11] = [
    "cpuid", "msr", "io", "mmio", "hlt", "timer", "intr", "window", "cr", "npf", "other",
];

/// Guest RAM given to Linux (`guest-mem=`, MiB).
pub const GUEST_MEM_MIB: u64 = linux::GUEST_RAM >> 20;
/// Emulated machine RAM: the guest's 256 MiB, the modules (about 60 MiB of
/// kernel and initramfs, loaded by GRUB) and the hypervisor's own memory.
pub const HOST_MEM_MIB: u32 = 512;

/// Guest TSC rate under QEMU `-icount shift=0`: one tick per emulated
/// instruction at 1 GHz of virtual time.
pub const QEMU_TSC_KHZ: u64 = 1_000_000;
/// Guest TSC rate under Bochs: its TSC counts emulated instructions, and
/// `ips=` of them make one emulated second (emu::BOCHS_IPS), so 50 MHz.
/// The hypervisor gives the guest the host's TSC plus an offset, so the
/// guest sees the same rate.
pub const BOCHS_TSC_KHZ: u64 = emu::BOCHS_IPS / 1000;

/// Hard wall-clock limit of one Linux run under QEMU. A direct QEMU boot
/// takes about 2.5 s; nested under the hypervisor every exit is emulated
/// SVM work, so allow far more. Generous on purpose until measured with
/// the hypervisor side in place; then tune.
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(600);
/// Hard wall-clock limit of one Linux run under Bochs (the kernel alone is
/// over a billion instructions, at a few tens of millions a second).
pub const BOCHS_TIMEOUT: Duration = Duration::from_secs(1500);
/// Hard limit of the direct QEMU boot (no Doppel).
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(120);

/// Save + destroy + rebuild every this many exits in the restore loops.
/// A boot to poweroff makes thousands of exits (each console byte alone is
/// two or more port exits), so this gives well over [`MIN_RESTORES`];
/// the step fails naming this constant if it does not.
pub const RESTORE_EVERY: u64 = 200;
/// Restores a restore loop must show (issue 19: N >= 20).
pub const MIN_RESTORES: u64 = 20;

/// Exit counts the hypervisor printed on a mark or stop line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    pub exits: u64,
    pub guest_tsc: u64,
    /// Exits by reason, every one of [`REASONS`].
    pub by_reason: BTreeMap<String, u64>,
}

impl Counts {
    fn parse(body: &str) -> Option<Counts> {
        let mut by_reason = BTreeMap::new();
        for r in REASONS {
            by_reason.insert(r.to_string(), num(body, r)?);
        }
        Some(Counts {
            exits: num(body, "exits")?,
            guest_tsc: num(body, "guest-tsc")?,
            by_reason,
        })
    }

    /// `cpuid=.. msr=.. ...` in [`REASONS`] order.
    pub fn reasons(&self) -> String {
        REASONS
            .iter()
            .map(|r| format!("{r}={}", self.by_reason[*r]))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The final `linux: stop=` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    pub kind: String,
    pub restores: u64,
    pub counts: Counts,
}

/// Everything a Linux run printed.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// (mark byte, counts) in the order printed.
    pub marks: Vec<(u8, Counts)>,
    pub stops: Vec<Stop>,
    /// The guest's console text, one line each (the `guest:` prefix off).
    pub guest: String,
    /// The hypervisor's lines naming an error.
    pub errors: Vec<String>,
    /// `linux: mark=` or `linux: stop=` lines lacking a field.
    pub malformed: Vec<String>,
}

impl Report {
    pub fn parse(output: &str) -> Report {
        let mut r = Report::default();
        for raw in output.lines() {
            let line = raw.trim();
            if emu::is_guest_line(line) {
                r.guest += &line[emu::GUEST_LINE_PREFIX.len()..];
                r.guest.push('\n');
                continue;
            }
            let Some(body) = line.strip_prefix("doppel-hv: ") else {
                continue;
            };
            if body.starts_with("error") || body.contains(" error") {
                r.errors.push(line.to_string());
            }
            let Some(body) = body.strip_prefix("linux: ") else {
                continue;
            };
            if let Some(kind) = field(body, "stop") {
                match (num(body, "restores"), Counts::parse(body)) {
                    (Some(restores), Some(counts)) => r.stops.push(Stop {
                        kind: kind.to_string(),
                        restores,
                        counts,
                    }),
                    _ => r.malformed.push(line.to_string()),
                }
            } else if let Some(m) = field(body, "mark") {
                match (m.parse::<u8>(), Counts::parse(body)) {
                    (Ok(m), Some(c)) => r.marks.push((m, c)),
                    _ => r.malformed.push(line.to_string()),
                }
            }
            // Other `linux:` lines (the hypervisor's own notes) are not
            // judged here.
        }
        r
    }

    /// The counts at the first mark `b`.
    pub fn mark(&self, b: u8) -> Option<&Counts> {
        self.marks.iter().find(|(m, _)| *m == b).map(|(_, c)| c)
    }

    /// The one stop line.
    pub fn stop(&self) -> Result<&Stop> {
        match self.stops.as_slice() {
            [s] => Ok(s),
            [] => bail!("no poweroff: no `linux: stop=` line"),
            _ => bail!("{} `linux: stop=` lines, expected one", self.stops.len()),
        }
    }

    /// Why this is not a clean run to poweroff with a good transcript of
    /// kernel `release`, or the transcript.
    pub fn check_clean(&self, release: &str) -> Result<linux::Transcript> {
        if let Some(l) = self.malformed.first() {
            bail!("malformed hypervisor line: {l}");
        }
        ensure!(
            self.mark(MARK_INIT).is_some(),
            "init not reached: no `linux: mark={MARK_INIT}` line"
        );
        let t = linux::check_transcript(&self.guest, release)
            .map_err(|e| anyhow::anyhow!("transcript: {e:#}"))?;
        for m in [MARK_IDLE_START, MARK_IDLE_END] {
            ensure!(
                self.mark(m).is_some(),
                "no `linux: mark={m}` line (the idle period after the transcript)"
            );
        }
        let s = self.stop()?;
        ensure!(
            s.kind == "poweroff",
            "no poweroff: the guest stopped with stop={}",
            s.kind
        );
        Ok(t)
    }

    /// Exits per second of guest time between marks 2 and 3.
    pub fn idle_rate(&self, tsc_khz: u64) -> Option<f64> {
        let (a, b) = (self.mark(MARK_IDLE_START)?, self.mark(MARK_IDLE_END)?);
        let ticks = b.guest_tsc.checked_sub(a.guest_tsc)?;
        let exits = b.exits.checked_sub(a.exits)?;
        (ticks > 0).then(|| exits as f64 * (tsc_khz as f64 * 1000.0) / ticks as f64)
    }

    /// The `figures:` line of a step.
    pub fn figures(&self, step: &str, vendor: &str, tsc_khz: u64, wall: Duration) -> String {
        let boot = match self.mark(MARK_INIT) {
            Some(c) => format!("boot-exits={} {}", c.exits, c.reasons()),
            None => "boot-exits=unknown".into(),
        };
        let idle = match self.idle_rate(tsc_khz) {
            Some(r) => format!("idle-exits-per-guest-s={r:.1}"),
            None => "idle-exits-per-guest-s=unknown".into(),
        };
        format!(
            "figures: step={step} vendor={vendor} tsc-khz={tsc_khz} {boot} {idle} wall-s={:.1} (emulated)",
            wall.as_secs_f64()
        )
    }

    /// Any error line, for a failure's detail.
    pub fn error_hint(&self) -> String {
        match self.errors.last() {
            Some(e) => format!("; last error line: {e}"),
            None => String::new(),
        }
    }
}

/// The transcript's fields that must not change with the restore loop:
/// every `linux-init:` line but those that measure time (timer counts,
/// date), in order, dmesg lines without their time stamps.
pub fn stable_fields(guest: &str) -> Vec<String> {
    guest
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once("linux-init: "))
        .map(|(_, rest)| match rest.strip_prefix("dmesg-bad: [") {
            Some(r) => format!("dmesg-bad: {}", r.split_once("] ").map_or(r, |x| x.1)),
            None => rest.to_string(),
        })
        .filter(|l| !l.starts_with("timer-irqs=") && !l.starts_with("date="))
        .collect()
}

fn vendor(e: Emulator) -> &'static str {
    match e {
        Emulator::Qemu => "amd",
        Emulator::Bochs => "intel",
    }
}

fn tsc_khz(e: Emulator) -> u64 {
    match e {
        Emulator::Qemu => QEMU_TSC_KHZ,
        Emulator::Bochs => BOCHS_TSC_KHZ,
    }
}

/// The Linux command line (PLATFORM.md), with the guest's TSC rate.
pub fn linux_cmdline(khz: u64) -> String {
    format!("{} tsc_early_khz={khz}", linux::CMDLINE)
}

/// The hypervisor's command line for a Linux run.
pub fn hv_cmdline(khz: u64, restore_every: Option<u64>, broken: bool) -> String {
    let mut s = format!("mode=linux guest-mem={GUEST_MEM_MIB} tsc-khz={khz}");
    if let Some(n) = restore_every {
        s += &format!(" restore-every={n}");
    }
    if broken {
        s += " broken=skip-lapic-regs";
    }
    s
}

/// The ISO's modules: the PVH-only vmlinux with the Linux command line,
/// then the initramfs.
pub fn modules(guest: &LinuxImage, khz: u64) -> Vec<Module> {
    vec![
        Module {
            path: guest.pvh.clone(),
            args: linux_cmdline(khz),
        },
        Module {
            path: guest.initramfs.clone(),
            args: "initrd".into(),
        },
    ]
}

/// One boot of Linux under the hypervisor.
fn boot(
    ctx: &mut Ctx,
    emulator: Emulator,
    tag: &str,
    restore_every: Option<u64>,
    broken: bool,
) -> Result<(LinuxImage, Run, Report)> {
    let cmdline = hv_cmdline(tsc_khz(emulator), restore_every, broken);
    boot_with(ctx, emulator, tag, cmdline, HOST_MEM_MIB)
}

/// One boot of Linux under the hypervisor with command line `cmdline`, in
/// an emulated machine of `mem_mib` MiB.
fn boot_with(
    ctx: &mut Ctx,
    emulator: Emulator,
    tag: &str,
    cmdline: String,
    mem_mib: u32,
) -> Result<(LinuxImage, Run, Report)> {
    let img = ctx.image()?;
    let guest = linux::build()?;
    let khz = tsc_khz(emulator);
    let mut spec = RunSpec::new(emulator, tag);
    spec.mem_mib = mem_mib;
    spec.icount = true;
    spec.timeout = match emulator {
        Emulator::Qemu => QEMU_TIMEOUT,
        Emulator::Bochs => BOCHS_TIMEOUT,
    };
    spec.cmdline = cmdline;
    spec.modules = modules(&guest, khz);
    let run = emu::run(&img, &spec)?;
    let report = Report::parse(&run.output);
    Ok((guest, run, report))
}

/// Where a plain run keeps its transcript's stable fields for the restore
/// loop of the same vendor.
fn plain_record(e: Emulator) -> std::path::PathBuf {
    crate::out_dir().join(format!("linux-plain-{}.fields", vendor(e)))
}

/// A plain boot to poweroff; the acceptance line, or why not.
fn plain(ctx: &mut Ctx, emulator: Emulator, step: &str) -> Result<(Report, String)> {
    let (guest, run, report) = boot(ctx, emulator, step, None, false)?;
    let release = &guest.kernel.release;
    let v = vendor(emulator);
    println!(
        "{}",
        report.figures(step, v, tsc_khz(emulator), run.elapsed)
    );
    if let Err(e) = report.check_clean(release) {
        bail!(
            "{e:#}{} ({}); see {}/",
            report.error_hint(),
            run.describe(),
            run.dir.display()
        );
    }
    ensure!(
        run.passed(),
        "the guest powered off but no `{}` line ({})",
        emu::PASS_LINE,
        run.describe()
    );
    let s = report.stop()?;
    fs::write(
        plain_record(emulator),
        stable_fields(&report.guest).join("\n"),
    )?;
    let line = format!(
        "linux: vendor={v} kernel={release} init=reached transcript=ok shutdown=clean exits={} result=pass",
        s.counts.exits
    );
    println!("{line}");
    Ok((report, line))
}

fn step_plain(ctx: &mut Ctx, emulator: Emulator, step: &str) -> Result<String> {
    let (_, line) = plain(ctx, emulator, step)?;
    Ok(line)
}

pub fn step_linux_qemu(ctx: &mut Ctx) -> Result<String> {
    step_plain(ctx, Emulator::Qemu, "linux-qemu-svm")
}

pub fn step_linux_bochs(ctx: &mut Ctx) -> Result<String> {
    step_plain(ctx, Emulator::Bochs, "linux-bochs-vmx")
}

/// The plain run's stable fields: recorded by the plain step of this
/// vendor when it is newer than the hypervisor and the initramfs, else
/// from a plain run made now.
pub fn plain_fields(ctx: &mut Ctx, emulator: Emulator) -> Result<Vec<String>> {
    let rec = plain_record(emulator);
    let img = ctx.image()?;
    let guest = linux::build()?;
    let t = |p: &std::path::Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(r), Some(a), Some(b)) = (t(&rec), t(&img.elf), t(&guest.initramfs)) {
        if r >= a && r >= b {
            let text = fs::read_to_string(&rec)?;
            return Ok(text.lines().map(str::to_string).collect());
        }
    }
    let step = match emulator {
        Emulator::Qemu => "linux-qemu-svm",
        Emulator::Bochs => "linux-bochs-vmx",
    };
    let (report, _) = plain(ctx, emulator, step).context("the plain run to compare with")?;
    Ok(stable_fields(&report.guest))
}

fn step_restore(ctx: &mut Ctx, emulator: Emulator, step: &str) -> Result<String> {
    let want = plain_fields(ctx, emulator)?;
    let (guest, run, report) = boot(ctx, emulator, step, Some(RESTORE_EVERY), false)?;
    let v = vendor(emulator);
    println!(
        "{}",
        report.figures(step, v, tsc_khz(emulator), run.elapsed)
    );
    same_as_plain(
        &report,
        &run,
        &guest.kernel.release,
        &want,
        &format!("restore-every={RESTORE_EVERY}"),
    )?;
    let s = report.stop()?;
    ensure!(
        s.restores >= MIN_RESTORES,
        "restores={} after {} exits, need >= {MIN_RESTORES}: lower RESTORE_EVERY ({RESTORE_EVERY})",
        s.restores,
        s.counts.exits
    );
    let line = format!(
        "restore-loop: vendor={v} restores={} transcript=ok result=pass",
        s.restores
    );
    println!("{line}");
    Ok(line)
}

/// A run that must end as the plain run of its vendor did: a clean
/// transcript and poweroff, `exit=pass`, and the transcript's stable
/// fields `want` (the plain run's) unchanged. `what` says what the run
/// did differently, for the error.
pub fn same_as_plain(
    report: &Report,
    run: &Run,
    release: &str,
    want: &[String],
    what: &str,
) -> Result<()> {
    if let Err(e) = report.check_clean(release) {
        bail!("{what}: {e:#}{} ({})", report.error_hint(), run.describe());
    }
    ensure!(
        run.passed(),
        "{what}: no `{}` line ({})",
        emu::PASS_LINE,
        run.describe()
    );
    let got = stable_fields(&report.guest);
    if got != want {
        let diff = want
            .iter()
            .zip(&got)
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("plain `{a}`, {what} `{b}`"))
            .unwrap_or_else(|| format!("{} lines vs {}", want.len(), got.len()));
        bail!("{what}: the transcript differs from the plain run's: {diff}");
    }
    Ok(())
}

pub fn step_restore_qemu(ctx: &mut Ctx) -> Result<String> {
    step_restore(ctx, Emulator::Qemu, "restore-loop-qemu-svm")
}

pub fn step_restore_bochs(ctx: &mut Ctx) -> Result<String> {
    step_restore(ctx, Emulator::Bochs, "restore-loop-bochs-vmx")
}

/// Epochs the Linux guest is replicated to the in-machine replica before
/// it fails over.
pub const REPLICA_EPOCHS: u64 = 4;
/// An epoch of the replicated Linux guest ends every this many exits
/// (tracking exits included), so the failover comes after
/// `REPLICA_EPOCHS` times this many, early in the boot, and Linux does
/// the rest on the replica's copy. Far from every boot's end: a boot's
/// exits depend on guest time (the kernel polls devices until time-outs),
/// and every epoch end, which copies and compares all of guest RAM, lets
/// guest time run on; under QEMU a replicated boot took 7 737 exits in
/// all, against 22 301 unreplicated.
pub const REPLICA_EPOCH_EXITS: u64 = 1000;
/// The emulated machine of a replicated Linux guest also holds the
/// staging area and the replica's shadow, each as large as guest RAM.
pub const REPLICA_HOST_MEM_MIB: u32 = HOST_MEM_MIB + 2 * GUEST_MEM_MIB as u32;

/// The Linux guest replicated with `tracker` to the in-machine replica
/// (issue 24): every epoch the replica's shadow must equal guest RAM and
/// the committed records the machine's; after the failover to it, Linux
/// must finish with the transcript of the plain run.
fn step_replica(ctx: &mut Ctx, emulator: Emulator, tracker: &str, step: &str) -> Result<String> {
    let want = plain_fields(ctx, emulator)?;
    let khz = tsc_khz(emulator);
    let cmdline = format!(
        "{} tracker={tracker} epoch-exits={REPLICA_EPOCH_EXITS} epochs={REPLICA_EPOCHS}",
        hv_cmdline(khz, None, false)
    );
    let (guest, run, report) = boot_with(ctx, emulator, step, cmdline, REPLICA_HOST_MEM_MIB)?;
    let v = vendor(emulator);
    println!("{}", report.figures(step, v, khz, run.elapsed));
    let backend = crate::selftest::backend(emulator).0;
    let o = crate::inreplica::Outcome::parse(&run.output)
        .and_then(|o| {
            o.check_linux(
                backend,
                tracker,
                REPLICA_EPOCHS,
                (GUEST_MEM_MIB << 20) / 4096,
            )
            .map(|()| o)
        })
        .with_context(|| format!("{}{}", run.describe(), report.error_hint()))?;
    same_as_plain(
        &report,
        &run,
        &guest.kernel.release,
        &want,
        "after the failover",
    )?;
    let s = report.stop()?;
    let line = o.line();
    println!("{line}");
    let pause = crate::inreplica::hv_pauses(&run.output)
        .map_or("n/a".into(), |(lo, hi)| format!("{lo}-{hi}"));
    Ok(format!(
        "{line} transcript=ok exits={} tracking_exits={} dirty_pages={} exits_per_dirty_page={} \
         hv_pause_cycles={pause} [{}]",
        s.counts.exits,
        o.tracking_exits,
        o.dirty_pages,
        o.exits_per_page(),
        run.describe()
    ))
}

pub fn step_replica_bochs_pml(ctx: &mut Ctx) -> Result<String> {
    step_replica(ctx, Emulator::Bochs, "pml", "replica-linux-bochs-vmx-pml")
}

pub fn step_replica_bochs_wp(ctx: &mut Ctx) -> Result<String> {
    step_replica(ctx, Emulator::Bochs, "wp", "replica-linux-bochs-vmx-wp")
}

pub fn step_replica_qemu_ad(ctx: &mut Ctx) -> Result<String> {
    step_replica(ctx, Emulator::Qemu, "ad", "replica-linux-qemu-svm-ad")
}

/// Write-protect under SVM too: both vendors on one tracker, and the
/// pause of both SVM trackers under `-icount`.
pub fn step_replica_qemu_wp(ctx: &mut Ctx) -> Result<String> {
    step_replica(ctx, Emulator::Qemu, "wp", "replica-linux-qemu-svm-wp")
}

/// How a run with the broken restore (LAPIC_REGS skipped) was caught, or
/// why it was not. A catch counts only when a restore is known to have
/// happened: a hypervisor that refuses the command line catches nothing.
pub fn judge_broken(
    report: &Report,
    timed_out: bool,
    passed: bool,
    release: &str,
) -> Result<String> {
    if let Some(l) = report.malformed.first() {
        bail!("malformed hypervisor line: {l}");
    }
    let seen_exits = report
        .stops
        .iter()
        .map(|s| s.counts.exits)
        .chain(report.marks.iter().map(|(_, c)| c.exits))
        .max()
        .unwrap_or(0);
    match report.stops.as_slice() {
        [] => {
            ensure!(
                timed_out,
                "the run ended with no `linux: stop=` line and no time-out{}",
                report.error_hint()
            );
            ensure!(
                seen_exits >= RESTORE_EVERY,
                "timed out, but no mark shows {RESTORE_EVERY} exits: no restore is known to have run"
            );
            Ok("timeout".into())
        }
        [s] => {
            ensure!(
                s.restores >= 1,
                "stop={} with restores=0: the broken restore never ran{}",
                s.kind,
                report.error_hint()
            );
            if s.kind != "poweroff" {
                return Ok(format!("stop-{}", s.kind));
            }
            if let Err(e) = linux::check_transcript(&report.guest, release) {
                return Ok(format!("transcript ({e:#})").replace(' ', "_"));
            }
            ensure!(
                !passed,
                "broken restore not caught: the guest powered off cleanly after {} restores",
                s.restores
            );
            Ok("exit-fail".into())
        }
        _ => bail!("{} `linux: stop=` lines", report.stops.len()),
    }
}

pub fn step_restore_qemu_broken(ctx: &mut Ctx) -> Result<String> {
    let step = "restore-loop-qemu-svm-broken";
    let (guest, run, report) = boot(ctx, Emulator::Qemu, step, Some(RESTORE_EVERY), true)?;
    println!("{}", report.figures(step, "amd", QEMU_TSC_KHZ, run.elapsed));
    let how = judge_broken(&report, run.timed_out, run.passed(), &guest.kernel.release)
        .with_context(|| run.describe())?;
    let line =
        format!("restore-loop-broken: vendor=amd skipped=LAPIC_REGS caught={how} result=pass");
    println!("{line}");
    Ok(line)
}

/// The direct QEMU boot of the guest (no Doppel): its console text, the
/// mark bytes /init wrote (QEMU's debugcon on the mark port), wall time.
pub fn direct_boot(guest: &LinuxImage, icount: bool) -> Result<(String, Vec<u8>, Duration)> {
    let dir = crate::out_dir().join("runs").join("linux-direct-qemu");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let console = dir.join("console.log");
    let marks = dir.join("marks.bin");
    let mut cmd = Command::new("qemu-system-x86_64");
    // `-machine microvm`: on pc and q35 the firmware puts the ACPI PM block
    // at 0x600, so a mark byte lands in PM1_EN (Linux then complains of a
    // PM timer event) and never reaches a debugcon there. microvm has its
    // ACPI (hardware-reduced, as Doppel's) in MMIO, a COM1 and a CMOS RTC.
    // `-svm`: the hypervisor hides SVM from the guest, the checker wants it
    // hidden.
    cmd.args(["-machine", "microvm,rtc=on", "-accel", "tcg"])
        .args(["-cpu", "EPYC,-svm", "-m", "512"])
        .arg("-kernel")
        .arg(&guest.vmlinux)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .args(["-append", &linux_cmdline(QEMU_TSC_KHZ)])
        .args(["-display", "none", "-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-chardev")
        .arg(format!("file,id=marks,path={}", marks.display()))
        .args([
            "-device",
            &format!("isa-debugcon,iobase={:#x},chardev=marks", linux::MARK_PORT),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::from(fs::File::create(dir.join("qemu.out"))?))
        .stderr(Stdio::from(fs::File::create(dir.join("qemu.err"))?));
    if icount {
        cmd.args(["-icount", "shift=0,sleep=off"]);
    }
    let started = Instant::now();
    let mut p = crate::proc::Proc::start("qemu (direct Linux)", &mut cmd, true)?;
    let status = loop {
        if let Some(st) = p.try_status()? {
            break Some(st);
        }
        if started.elapsed() >= DIRECT_TIMEOUT {
            p.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall = started.elapsed();
    p.kill();
    let text = String::from_utf8_lossy(&fs::read(&console)?).replace("\r\n", "\n");
    let marks = fs::read(&marks).unwrap_or_default();
    ensure!(
        status.is_some(),
        "the direct boot did not power off within {DIRECT_TIMEOUT:?}; console in {}",
        console.display()
    );
    Ok((text, marks, wall))
}

/// Test step: /init and the checker on a direct QEMU boot of the same
/// kernel and initramfs (no Doppel).
pub fn step_direct(_: &mut Ctx) -> Result<String> {
    let guest = linux::build()?;
    let (text, marks, wall) = direct_boot(&guest, true)?;
    let t = linux::check_transcript(&text, &guest.kernel.release)
        .with_context(|| format!("direct boot transcript:\n{text}"))?;
    ensure!(
        marks == [MARK_INIT, MARK_IDLE_START, MARK_IDLE_END],
        "marks written {marks:?}, expected [1, 2, 3]"
    );
    Ok(format!(
        "linux-direct: kernel={} transcript=ok marks=1,2,3 timer-irqs={}->{} wall-s={:.1} (QEMU TCG -icount shift=0, no Doppel)",
        t.release,
        t.timer_irqs.0,
        t.timer_irqs.1,
        wall.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::guest::GuestLine;

    fn reasons(base: u64) -> String {
        REASONS
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{r}={}", base + i as u64))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn guest(l: &str) -> String {
        format!("doppel-hv: {}\n", GuestLine(l.as_bytes()))
    }

    /// A run as the hypervisor prints it: the transcript of linux.rs's
    /// tests, marks, and the stop line.
    fn run_text(stop: &str, restores: u64) -> String {
        let mut s = String::from("doppel-hv: vendor=amd svm=1\n");
        s += &format!(
            "doppel-hv: linux: mark=1 exits=1000 guest-tsc=5000000 {}\n",
            reasons(10)
        );
        for l in crate::linux::tests::good_transcript().split("\r\n") {
            s += &guest(l);
        }
        s += &format!(
            "doppel-hv: linux: mark=2 exits=3000 guest-tsc=9000000000 {}\n",
            reasons(20)
        );
        // 2 s of guest time at 1 GHz, 500 exits.
        s += &format!(
            "doppel-hv: linux: mark=3 exits=3500 guest-tsc=11000000000 {}\n",
            reasons(30)
        );
        s += &format!(
            "doppel-hv: linux: stop={stop} exits=3600 restores={restores} guest-tsc=11100000000 {}\n",
            reasons(40)
        );
        s += if stop == "poweroff" {
            "doppel-hv: exit=pass\n"
        } else {
            "doppel-hv: exit=fail\n"
        };
        s
    }

    const REL: &str = "6.1.0-57-amd64";

    #[test]
    fn a_clean_run_parses_and_passes() {
        let r = Report::parse(&run_text("poweroff", 0));
        assert!(r.malformed.is_empty(), "{:?}", r.malformed);
        assert_eq!(r.marks.len(), 3);
        let c = r.mark(1).unwrap();
        assert_eq!((c.exits, c.guest_tsc), (1000, 5_000_000));
        assert_eq!(c.by_reason["cpuid"], 10);
        assert_eq!(c.by_reason["other"], 20);
        assert!(c.reasons().starts_with("cpuid=10 msr=11 io=12"));
        // The hypervisor's other notes are no part of the judgement.
        let noted = run_text("poweroff", 0).replace(
            "doppel-hv: exit=pass",
            "doppel-hv: linux: kernel entry=0x1000850 initrd=0xf000000\ndoppel-hv: exit=pass",
        );
        Report::parse(&noted).check_clean(REL).unwrap();
        let s = r.stop().unwrap();
        assert_eq!(
            (s.kind.as_str(), s.restores, s.counts.exits),
            ("poweroff", 0, 3600)
        );
        r.check_clean(REL).unwrap();
        assert_eq!(r.idle_rate(QEMU_TSC_KHZ), Some(250.0));
        let f = r.figures(
            "linux-qemu-svm",
            "amd",
            QEMU_TSC_KHZ,
            Duration::from_secs(42),
        );
        assert!(f.contains("boot-exits=1000 cpuid=10"), "{f}");
        assert!(f.contains("idle-exits-per-guest-s=250.0"), "{f}");
        assert!(f.ends_with("wall-s=42.0 (emulated)"), "{f}");
        // The guest's text is what the checker reads, not the hv's.
        assert!(r.guest.contains("linux-init: transcript=end"));
        assert!(!r.guest.contains("doppel-hv"));
    }

    #[test]
    fn each_missing_piece_is_named() {
        let good = run_text("poweroff", 0);
        let without = |pat: &str| -> String {
            good.lines()
                .filter(|l| !l.contains(pat))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        for (text, says) in [
            (without("mark=1 "), "init not reached"),
            (without("stop="), "no poweroff"),
            (run_text("triple-fault", 0), "stop=triple-fault"),
            (without("mark=3 "), "mark=3"),
            (without("file="), "transcript: "),
            (without("uname="), "uname"),
            (good.replace("guest-tsc=5000000 ", ""), "malformed"),
            (good.replace(" npf=29", ""), "malformed"),
            (good.replace("mark=2 ", "mark=x "), "malformed"),
            (
                good.replace(
                    "doppel-hv: exit=pass",
                    &good
                        .lines()
                        .filter(|l| l.contains("stop="))
                        .collect::<String>(),
                ),
                "2 `linux: stop=` lines",
            ),
        ] {
            let err = format!("{:#}", Report::parse(&text).check_clean(REL).unwrap_err());
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn hv_lines_printed_by_the_guest_do_not_count() {
        // The guest prints a stop line and marks itself: they are console
        // text, never the hypervisor's.
        let mut t = String::new();
        for l in crate::linux::tests::good_transcript().split("\r\n") {
            t += &guest(l);
        }
        t += &guest(&format!(
            "doppel-hv: linux: mark=1 exits=1 guest-tsc=1 {}",
            reasons(0)
        ));
        t += &guest(&format!(
            "doppel-hv: linux: stop=poweroff exits=1 restores=99 guest-tsc=1 {}",
            reasons(0)
        ));
        t += &guest("doppel-hv: exit=pass");
        let r = Report::parse(&t);
        assert!(r.marks.is_empty() && r.stops.is_empty());
        assert!(r.check_clean(REL).is_err());
        assert!(judge_broken(&r, false, false, REL).is_err());
    }

    #[test]
    fn the_restore_loop_compares_stable_fields_only() {
        let a = Report::parse(&run_text("poweroff", 30)).guest;
        let b = a
            .replace("timer-irqs=561", "timer-irqs=999")
            .replace("date=1796600000", "date=1796600100");
        assert_eq!(stable_fields(&a), stable_fields(&b));
        assert!(stable_fields(&a).contains(&"uname=6.1.0-57-amd64".to_string()));
        let c = a.replace("x2apic", "x2apic pcid");
        assert_ne!(stable_fields(&a), stable_fields(&c));
        let notice = |t: &str| {
            a.replace(
                "linux-init: dmesg-bad=0",
                &format!("linux-init: dmesg-bad: [    {t}] Speculative Return Stack Overflow: WARNING: See x\nlinux-init: dmesg-bad=1"),
            )
        };
        let (d, e) = (
            stable_fields(&notice("0.073781")),
            stable_fields(&notice("0.311")),
        );
        assert_eq!(d, e);
        assert!(
            d.contains(&"dmesg-bad: Speculative Return Stack Overflow: WARNING: See x".to_string())
        );
    }

    #[test]
    fn a_broken_restore_must_be_caught_after_a_restore() {
        // Stopped with an error after restores: caught.
        let t = run_text("error", 3);
        let how = judge_broken(&Report::parse(&t), false, false, REL).unwrap();
        assert_eq!(how, "stop-error");
        // The guest finished cleanly despite restores: not caught.
        let r = Report::parse(&run_text("poweroff", 3));
        let err = format!("{:#}", judge_broken(&r, false, true, REL).unwrap_err());
        assert!(err.contains("not caught"), "{err}");
        // Powered off but the transcript is wrong: caught by the checker.
        let t = run_text("poweroff", 3).replace("file=67", "file=00");
        let how = judge_broken(&Report::parse(&t), false, false, REL).unwrap();
        assert!(how.starts_with("transcript"), "{how}");
        assert!(!how.contains(' '), "{how}");
        // No restore ran (e.g. mode=linux refused): nothing was caught.
        let r = Report::parse(&run_text("error", 0));
        assert!(judge_broken(&r, false, false, REL).is_err());
        let r = Report::parse("doppel-hv: error: unknown mode=linux\ndoppel-hv: exit=fail\n");
        let err = format!("{:#}", judge_broken(&r, false, false, REL).unwrap_err());
        assert!(err.contains("unknown mode"), "{err}");
        // A hang after enough exits for a restore: caught by the time-out;
        // a hang before any restore could have run: not.
        let hung: String = run_text("poweroff", 3)
            .lines()
            .filter(|l| !l.contains("stop=") && !l.contains("exit="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            judge_broken(&Report::parse(&hung), true, false, REL).unwrap(),
            "timeout"
        );
        let early = "doppel-hv: linux: mark=1 exits=10 guest-tsc=1 ".to_string() + &reasons(0);
        assert!(judge_broken(&Report::parse(&early), true, false, REL).is_err());
    }

    #[test]
    fn command_lines_carry_the_tsc_rate() {
        assert_eq!(
            hv_cmdline(1_000_000, None, false),
            "mode=linux guest-mem=256 tsc-khz=1000000"
        );
        assert_eq!(
            hv_cmdline(50_000, Some(200), true),
            "mode=linux guest-mem=256 tsc-khz=50000 restore-every=200 broken=skip-lapic-regs"
        );
        let l = linux_cmdline(BOCHS_TSC_KHZ);
        assert!(
            l.starts_with("console=ttyS0 ") && l.ends_with(" tsc_early_khz=50000"),
            "{l}"
        );
        assert_eq!(BOCHS_TSC_KHZ, 50_000);
    }
}
