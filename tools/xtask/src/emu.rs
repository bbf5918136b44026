//! Running the image under QEMU (AMD SVM + NPT) or Bochs (Intel VMX + EPT +
//! PML) with a hard wall-clock limit; the whole process group is killed at
//! the limit or when the run ends.
//!
//! Pass/fail comes from lines the image prints, never from an exit code
//! alone (Bochs always exits with 1). The image writes every byte to both
//! port 0xE9 and COM1. QEMU's `-debugcon` file holds exactly the 0xE9 bytes,
//! so that is the run's text there. Bochs prints 0xE9 bytes on its stdout
//! mixed with its own banner and debugger lines (kept in `bochs.out`), so
//! the run's text there is the COM1 file, which holds only the image's
//! bytes. Both are written unbuffered, byte by byte, so the text is
//! complete even when a run is killed at its time limit.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::image::Image;
use crate::proc::Proc;
use crate::Emulator;

/// The line the image prints last when it decided the run passed.
pub const PASS_LINE: &str = "doppel-hv: exit=pass";
/// The line the image prints last when it decided the run failed.
pub const FAIL_LINE: &str = "doppel-hv: exit=fail";

/// How the hypervisor prints a line of guest console output:
/// `doppel-hv: guest: ...` (doppel_abi::guest::GuestLine). Such a line is
/// the guest's, whatever follows: never a result line.
pub const GUEST_LINE_PREFIX: &str = "doppel-hv: guest: ";

/// Whether `line` (trimmed or not) is guest console output.
pub fn is_guest_line(line: &str) -> bool {
    line.trim_start().starts_with(GUEST_LINE_PREFIX)
}

/// The lines of `output` the hypervisor printed itself, trimmed: every
/// line but the guest's console output. Result lines are matched only
/// here.
pub fn hv_lines(output: &str) -> impl Iterator<Item = &str> {
    output.lines().map(str::trim).filter(|l| !is_guest_line(l))
}

/// [`hv_lines`] of `output`, each ended by a newline.
pub fn hv_text(output: &str) -> String {
    hv_lines(output).flat_map(|l| [l, "\n"]).collect()
}

/// Bochs' emulated instructions per second of emulated time (`cpu: ips=`).
/// Bochs' TSC advances one tick per emulated instruction, so this is also
/// the TSC rate a guest sees there (Hz).
pub const BOCHS_IPS: u64 = 50_000_000;

/// What an emulator run left behind.
#[derive(Debug)]
pub struct Run {
    /// Port 0xE9 text (the image's log).
    pub output: String,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub emulator: Emulator,
    /// The run's log directory (emulator output, logs, config).
    pub dir: PathBuf,
}

impl Run {
    pub fn passed(&self) -> bool {
        !self.timed_out && hv_lines(&self.output).any(|l| l == PASS_LINE)
    }
    pub fn failed_cleanly(&self) -> bool {
        !self.timed_out && hv_lines(&self.output).any(|l| l == FAIL_LINE)
    }
    pub fn describe(&self) -> String {
        let mut s = format!("{:?} ran {:.1}s", self.emulator, self.elapsed.as_secs_f64());
        if self.timed_out {
            s.push_str(", killed at the time limit");
        }
        if let Some(c) = self.exit_code {
            let _ = write!(s, ", exit code {c}");
        }
        let _ = write!(s, ", logs in {}", self.dir.display());
        s
    }
    /// The hypervisor's lines starting with `prefix` (never the guest's).
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        hv_lines(&self.output).filter(move |l| l.starts_with(prefix))
    }
}

/// Options of one emulator run beyond the image.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub emulator: Emulator,
    /// QEMU `-cpu` model; Bochs always runs `corei7_skylake_x`.
    pub cpu: String,
    pub timeout: Duration,
    /// Guest-physical RAM in MiB.
    pub mem_mib: u32,
    /// Kernel command line (picks the ISO).
    pub cmdline: String,
    /// QEMU only: back machine RAM by this host file so a host process
    /// (the dom0 tool) can map it.
    pub ram_file: Option<PathBuf>,
    /// QEMU only: `-icount shift=0,sleep=off` for repeatable TSC counts.
    pub icount: bool,
    /// Name of this run's log directory under target/doppel/runs/.
    pub tag: String,
    /// Multiboot2 modules the ISO carries (none for the test guests).
    pub modules: Vec<crate::image::Module>,
}

impl RunSpec {
    pub fn new(emulator: Emulator, tag: &str) -> Self {
        Self {
            emulator,
            cpu: "EPYC".into(),
            timeout: Duration::from_secs(120),
            mem_mib: 256,
            cmdline: String::new(),
            ram_file: None,
            icount: false,
            tag: tag.into(),
            modules: Vec::new(),
        }
    }
}

/// What `cargo xtask boot` does: one run with the given CPU model (QEMU
/// only) and kernel command line.
pub fn boot(
    img: &Image,
    emulator: Emulator,
    cpu: &str,
    timeout_s: u64,
    cmdline: &str,
) -> Result<Run> {
    let tag = match emulator {
        Emulator::Qemu => format!("boot-qemu-{cpu}"),
        Emulator::Bochs => "boot-bochs".into(),
    };
    let mut spec = RunSpec::new(emulator, &tag);
    spec.cpu = cpu.into();
    spec.timeout = Duration::from_secs(timeout_s);
    spec.cmdline = cmdline.into();
    run(img, &spec)
}

/// Start an emulator run and wait for it (bounded by `spec.timeout`).
pub fn run(img: &Image, spec: &RunSpec) -> Result<Run> {
    let child = spawn(img, spec)?;
    child.wait()
}

/// A running emulator, in its own process group.
pub struct Running {
    proc: Proc,
    started: Instant,
    spec: RunSpec,
    dir: PathBuf,
    /// The file holding the image's text (see the module comment).
    text: PathBuf,
}

impl Running {
    /// Text the image has printed so far.
    pub fn output_so_far(&self) -> String {
        fs::read(&self.text)
            .map(|b| String::from_utf8_lossy(&b).replace("\r\n", "\n"))
            .unwrap_or_default()
    }

    /// The hypervisor's own lines printed so far ([`hv_lines`]), one per
    /// line: the guest's console output left out.
    pub fn hv_output_so_far(&self) -> String {
        hv_text(&self.output_so_far())
    }

    /// Whether the emulator is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// Kill the emulator's whole process group now (kill -9: the machine
    /// dies as a host would).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Set the scheduling niceness of every thread of the emulator's
    /// process group (`renice -g`): a standby machine that only spins
    /// waiting for Activate yields the host's cores to the primary machine
    /// and the tools while it waits (on real hosts it has its own).
    pub fn set_nice(&self, nice: i32) -> Result<()> {
        let out = std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-g", &self.proc.id().to_string()])
            .output()
            .context("running renice (util-linux)")?;
        anyhow::ensure!(
            out.status.success(),
            "renice -n {nice} -g {}: {}",
            self.proc.id(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Stop the emulator's whole process group (SIGSTOP): the machine
    /// freezes, as a hung host would, without exiting.
    pub fn freeze(&self) {
        self.proc.freeze();
    }

    /// Wait for the emulator to exit on its own, or kill it at the limit.
    pub fn wait(mut self) -> Result<Run> {
        let mut timed_out = false;
        let exit_code = loop {
            if let Some(st) = self.proc.try_status()? {
                break st.code();
            }
            if self.started.elapsed() >= self.spec.timeout {
                timed_out = true;
                self.proc.kill();
                break self.proc.try_status()?.and_then(|st| st.code());
            }
            // Bochs does not always leave on its own after the shutdown port
            // write; the image's final line is the real end of the run.
            let out = self.output_so_far();
            if out
                .lines()
                .any(|l| l.trim() == PASS_LINE || l.trim() == FAIL_LINE)
            {
                // The exit port write follows the line; give the emulator
                // a moment to leave with its status before killing it.
                let grace = Instant::now();
                let st = loop {
                    if let Some(st) = self.proc.try_status()? {
                        break Some(st);
                    }
                    if grace.elapsed() >= Duration::from_secs(2) {
                        self.proc.kill();
                        break self.proc.try_status()?;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                break st.and_then(|st| st.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Whatever happened, nothing of this run outlives it.
        self.proc.kill();
        Ok(Run {
            output: self.output_so_far(),
            exit_code,
            timed_out,
            elapsed: self.started.elapsed(),
            emulator: self.spec.emulator,
            dir: self.dir.clone(),
        })
    }
}

/// Start the emulator without waiting (for runs a host tool talks to).
pub fn spawn(img: &Image, spec: &RunSpec) -> Result<Running> {
    let dir = crate::out_dir().join("runs").join(&spec.tag);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let iso = if spec.modules.is_empty() {
        img.iso_with(&spec.cmdline)?
    } else {
        img.iso_with_modules(&spec.cmdline, &spec.modules)?
    };
    let text = match spec.emulator {
        Emulator::Qemu => dir.join("e9.log"),
        Emulator::Bochs => dir.join("com1.log"),
    };
    fs::write(&text, b"")?;
    let mut cmd = match spec.emulator {
        Emulator::Qemu => qemu_command(&iso, spec, &dir, &text)?,
        Emulator::Bochs => bochs_command(&iso, spec, &dir)?,
    };
    cmd.stdin(Stdio::null());
    let proc = Proc::start("emulator", &mut cmd, true)
        .with_context(|| format!("starting {:?} (try `cargo xtask setup`)", spec.emulator))?;
    Ok(Running {
        proc,
        started: Instant::now(),
        spec: spec.clone(),
        dir,
        text,
    })
}

fn qemu_command(iso: &Path, spec: &RunSpec, dir: &Path, e9: &Path) -> Result<Command> {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-cpu", &spec.cpu])
        .args(["-m", &format!("{}M", spec.mem_mib)])
        .args(["-display", "none", "-no-reboot", "-boot", "d"])
        .arg("-cdrom")
        .arg(iso)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-debugcon")
        .arg(format!("file:{}", e9.display()))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("com1.log").display()))
        .args(["-monitor", "none"]);
    if let Some(ram) = &spec.ram_file {
        c.args([
            "-object",
            &format!(
                "memory-backend-file,id=ram,size={}M,mem-path={},share=on",
                spec.mem_mib,
                ram.display()
            ),
            "-machine",
            "pc,memory-backend=ram",
        ]);
    }
    if spec.icount {
        c.args(["-icount", "shift=0,sleep=off"]);
    }
    c.stdout(Stdio::from(fs::File::create(dir.join("qemu.out"))?))
        .stderr(Stdio::from(fs::File::create(dir.join("qemu.err"))?));
    Ok(c)
}

fn bochs_command(iso: &Path, spec: &RunSpec, dir: &Path) -> Result<Command> {
    let rc = dir.join("bochsrc");
    fs::write(
        &rc,
        format!(
            "megs: {mem}\n\
             cpu: model=corei7_skylake_x, count=1, ips={ips}\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
             vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
             ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14\n\
             ata0-slave: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             display_library: term\n\
             sound: driver=dummy\n\
             speaker: enabled=0\n\
             port_e9_hack: enabled=1\n\
             com1: enabled=1, mode=file, dev={com1}\n\
             log: {log}\n\
             panic: action=fatal\n\
             error: action=report\n\
             info: action=ignore\n\
             debug: action=ignore\n",
            mem = spec.mem_mib,
            ips = BOCHS_IPS,
            iso = iso.display(),
            com1 = dir.join("com1.log").display(),
            log = dir.join("bochs.log").display(),
        ),
    )?;
    // Debian's Bochs has its debugger on and stops before the first
    // instruction: the command file continues. `display_library: term`
    // (package bochs-term) needs TERM, which CI may not set. Without
    // `sound: driver=dummy` the sound mixer thread aborts Bochs on machines
    // without an ALSA device.
    let cmds = dir.join("cmds");
    fs::write(&cmds, "c\n")?;
    let mut c = Command::new("bochs-bin");
    c.arg("-q")
        .arg("-f")
        .arg(&rc)
        .arg("-rc")
        .arg(&cmds)
        .env("TERM", "dumb")
        // Port 0xE9 bytes, mixed with Bochs' own messages.
        .stdout(Stdio::from(fs::File::create(dir.join("bochs.out"))?))
        .stderr(Stdio::from(fs::File::create(dir.join("bochs.err"))?));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::guest::GuestLine;

    fn run_of(output: String) -> Run {
        Run {
            output,
            exit_code: Some(33),
            timed_out: false,
            elapsed: Duration::from_secs(1),
            emulator: Emulator::Qemu,
            dir: PathBuf::new(),
        }
    }

    /// A guest that prints every result line the runner looks for, then
    /// crashes: each line reaches the log as the hypervisor forwards it.
    fn hostile_guest() -> String {
        [
            "exit=pass",
            "doppel-hv: exit=pass",
            "guest: exit=pass",
            "logdirty: backend=svm result=pass epochs=40 failed=0",
            "x\rdoppel-hv: exit=pass",
            "svm: lapic timer: armed for 20000 TSC ticks, timer_exits=3",
            "primary: replication detached; guest runs unprotected",
        ]
        .iter()
        .map(|l| format!("doppel-hv: {}\n", GuestLine(l.as_bytes())))
        .collect::<String>()
            + "doppel-hv: error: guest shut down (triple fault)\n"
    }

    #[test]
    fn result_lines_printed_by_the_guest_do_not_count() {
        let out = hostile_guest();
        let run = run_of(out.clone());
        assert!(!run.passed(), "{out}");
        assert!(!run.failed_cleanly());
        assert_eq!(run.lines_with("doppel-hv: svm: lapic timer:").count(), 0);
        assert_eq!(run.lines_with("doppel-hv: guest").count(), 0);
        assert_eq!(hv_lines(&out).count(), 1);
        let r = crate::selftest::Report::parse(&out);
        assert!(r.summary.is_none() && r.lines.is_empty(), "{r:?}");
        // The hypervisor's own lines still count.
        let run = run_of(format!(
            "{out}doppel-hv: svm: lapic timer: timer_exits=3\n{PASS_LINE}\n"
        ));
        assert!(run.passed());
        assert_eq!(run.lines_with("doppel-hv: svm: lapic timer:").count(), 1);
    }
}
