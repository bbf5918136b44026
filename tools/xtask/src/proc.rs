//! One wrapper for every child process xtask starts: the doppel tools,
//! the emulators, etcd and the `--load` busy loops. Killed when dropped;
//! optionally collecting its output lines, or running in a process group
//! of its own.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process, killed when dropped. Started with [`Proc::spawn`] its
/// output lines are collected by threads (and echoed with a prefix when
/// `echo` is set); started with [`Proc::start`] its output goes where the
/// command sends it (an emulator's log file), and with `group` it runs in
/// a process group of its own, killed as a whole.
pub(crate) struct Proc {
    child: Child,
    name: &'static str,
    /// Runs in its own process group (killed, frozen, as a group).
    group: bool,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
    /// The collector threads, joined once the child has exited.
    collectors: Vec<thread::JoinHandle<()>>,
}

/// Stderr lines worth showing live in the demo (the rest is per-epoch
/// noise the progress line summarises).
const NOTABLE: [&str; 9] = [
    "failover",
    "failing over",
    "re-sending",
    "LOST",
    "DIVERGENT",
    "ERROR",
    "WARN",
    "activat",
    "connected to",
];

fn collect<R: Read + Send + 'static>(
    r: R,
    into: Arc<Mutex<Vec<String>>>,
    echo: Option<&'static str>,
    only_notable: bool,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(p) = echo {
                if !only_notable || NOTABLE.iter().any(|n| line.contains(n)) {
                    println!("  {p}| {line}");
                }
            }
            if let Ok(mut v) = into.lock() {
                v.push(line);
            }
        }
    })
}

/// Writes the output collected from some processes into a directory when
/// dropped (`NAME.out`, `NAME.err`): a run's logs kept for a post-mortem,
/// however the run ends.
/// Collected lines of one stream (stdout or stderr).
type Lines = Arc<Mutex<Vec<String>>>;

pub(crate) struct SaveLogs {
    dir: std::path::PathBuf,
    logs: Vec<(&'static str, Lines, Lines)>,
}

impl SaveLogs {
    pub(crate) fn new(dir: &std::path::Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            logs: Vec::new(),
        }
    }

    /// Keep `p`'s output too (as far as it is collected).
    pub(crate) fn add(&mut self, p: &Proc) {
        self.logs.push((p.name, p.out.clone(), p.err.clone()));
    }
}

impl Drop for SaveLogs {
    fn drop(&mut self) {
        for (name, out, err) in &self.logs {
            let file = name.replace(' ', "-");
            for (ext, v) in [("out", out), ("err", err)] {
                let text = v.lock().map(|v| v.join("\n")).unwrap_or_default();
                let _ = std::fs::write(self.dir.join(format!("{file}.{ext}")), text);
            }
        }
    }
}

impl Proc {
    pub(crate) fn spawn(name: &'static str, cmd: &mut Command, echo: bool) -> Result<Self> {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let tag = echo.then_some(name);
        let collectors = vec![
            collect(
                child.stdout.take().context("stdout")?,
                out.clone(),
                tag,
                false,
            ),
            collect(
                child.stderr.take().context("stderr")?,
                err.clone(),
                tag,
                true,
            ),
        ];
        Ok(Self {
            child,
            name,
            group: false,
            out,
            err,
            collectors,
        })
    }

    /// Start `cmd` as it is set up (its output is not collected); with
    /// `group` in a process group of its own.
    pub(crate) fn start(name: &'static str, cmd: &mut Command, group: bool) -> Result<Self> {
        if group {
            cmd.process_group(0);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child,
            name,
            group,
            out: Arc::default(),
            err: Arc::default(),
            collectors: Vec::new(),
        })
    }

    /// Its process id.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited (without waiting).
    pub(crate) fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Whether the child has exited. Once it has, the collectors are
    /// joined first, so `out()` and `err()` hold every line it printed: a
    /// line still in the pipe when the exit is seen is not missed (issue
    /// 17: checking the lines right after the exit lost the last ones).
    pub(crate) fn exited(&mut self) -> Result<bool> {
        if self.child.try_wait()?.is_none() {
            return Ok(false);
        }
        for c in self.collectors.drain(..) {
            let _ = c.join();
        }
        Ok(true)
    }

    pub(crate) fn out(&self) -> Vec<String> {
        self.out.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub(crate) fn err(&self) -> Vec<String> {
        self.err.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The first stdout line starting with `prefix`, waiting up to `limit`.
    pub(crate) fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<String> {
        let t = Instant::now();
        loop {
            // Exit first, then the lines: what it printed before exiting
            // is in by then.
            let exited = self.exited()?;
            if let Some(l) = self.out().into_iter().find(|l| l.starts_with(prefix)) {
                return Ok(l);
            }
            if exited {
                bail!(
                    "{} exited ({}) before printing `{prefix}`:\n{}",
                    self.name,
                    self.child.wait()?,
                    tail(&self.err(), 20)
                );
            }
            if t.elapsed() > limit {
                bail!(
                    "{} printed no `{prefix}` line within {} s:\n{}",
                    self.name,
                    limit.as_secs(),
                    tail(&self.err(), 20)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill it now (kill -9; its whole process group if it has one) and
    /// reap it.
    pub(crate) fn kill(&mut self) {
        if self.group {
            signal_group("-KILL", self.id());
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Stop its process group (SIGSTOP): it freezes, as a hung host
    /// would, without exiting.
    pub(crate) fn freeze(&self) {
        signal_group("-STOP", self.id());
    }

    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The rest of the first stdout line starting with `prefix` (trimmed),
    /// waiting up to `limit`: the address in `listening on ADDR`.
    pub(crate) fn wait_value(&mut self, prefix: &str, limit: Duration) -> Result<String> {
        let l = self.wait_line(prefix, limit)?;
        Ok(l[prefix.len()..].trim().to_string())
    }

    /// The `n`-th line (stdout, then stderr) containing `pat`, waiting up
    /// to `limit`; `None` if there are fewer by then.
    pub(crate) fn wait_nth(&self, pat: &str, n: usize, limit: Duration) -> Option<String> {
        let t = Instant::now();
        loop {
            let hits = self.out().into_iter().chain(self.err());
            if let Some(l) = hits.filter(|l| l.contains(pat)).nth(n.saturating_sub(1)) {
                return Some(l);
            }
            if t.elapsed() >= limit {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every line it printed so far: stdout, then stderr.
    pub(crate) fn text(&self) -> String {
        let mut all = self.out();
        all.extend(self.err());
        all.join("\n")
    }

    /// SIGINT: a doppel tool ends in order at its next epoch boundary.
    pub(crate) fn interrupt(&self) -> Result<()> {
        let st = Command::new("kill")
            .args(["-INT", &self.id().to_string()])
            .status()?;
        if !st.success() {
            bail!("kill -INT {} ({}): {st}", self.id(), self.name);
        }
        Ok(())
    }

    /// The child's exit status, waiting up to `limit`; `None` if it still
    /// runs by then. Its output is complete once this returns `Some`.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let t = Instant::now();
        while !self.exited()? {
            if t.elapsed() > limit {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(self.child.try_wait()?)
    }
}

impl Proc {
    /// Wait up to `limit` for the exit and give its status. Killed (an
    /// error) if it still runs by then.
    pub(crate) fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let Some(st) = self.wait_exit(limit)? else {
            self.kill();
            bail!(
                "{} did not finish within {} s:\n{}",
                self.name,
                limit.as_secs(),
                self.text()
            );
        };
        Ok(st)
    }

    /// Wait up to `limit` for the exit; its code and every line it
    /// printed. Killed (an error) if it still runs by then.
    pub(crate) fn finish(&mut self, limit: Duration) -> Result<(Option<i32>, String)> {
        let st = self.wait(limit)?;
        Ok((st.code(), self.text()))
    }

    /// Every stderr line it printed so far.
    pub(crate) fn stderr(&self) -> String {
        self.err().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Send `sig` (`-KILL`, `-STOP`) to the process group `pgid`.
fn signal_group(sig: &str, pgid: u32) {
    let _ = Command::new("kill")
        .args([sig, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_line_and_the_exit_code() {
        let mut p = Proc::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo one; echo two >&2; echo three; exit 3"]),
            false,
        )
        .unwrap();
        let (code, text) = p.finish(Duration::from_secs(20)).unwrap();
        assert_eq!(code, Some(3));
        assert_eq!(p.out(), ["one", "three"]);
        assert_eq!(p.stderr(), "two");
        assert_eq!(text, "one\nthree\ntwo");
    }

    #[test]
    fn a_child_past_its_limit_is_killed_and_reported() {
        let mut p = Proc::spawn("sleeper", Command::new("sleep").arg("30"), false).unwrap();
        let e = p.wait(Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("sleeper did not finish"), "{e}");
        assert!(!p.alive());
    }

    #[test]
    fn a_group_is_killed_as_a_whole() {
        // The shell's own child (the sleep) must die with it.
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("sleep.pid");
        let mut p = Proc::start(
            "group",
            Command::new("sh")
                .arg("-c")
                .arg(format!("sleep 30 & echo $! > {}; wait", pidfile.display())),
            true,
        )
        .unwrap();
        let t = Instant::now();
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                break pid;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no pid file");
            thread::sleep(Duration::from_millis(20));
        };
        p.kill();
        let t = Instant::now();
        // Killed, the sleep is gone or a zombie until its new parent
        // reaps it.
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with('Z'))
            })
        };
        while running() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the group's grandchild {pid} outlived the kill"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}
