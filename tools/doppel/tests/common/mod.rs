//! What the integration tests that run `doppel` processes share
//! (`mod common;` in each).
#![allow(dead_code)] // each test crate uses a part

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_doppel");

/// A child process whose stdout and stderr lines are collected.
pub struct Proc {
    pub child: Child,
    pub log: Log,
    /// The two collector threads; joined once the child has exited.
    collectors: Vec<std::thread::JoinHandle<()>>,
}

/// The name of a [`Proc`] and its output so far.
pub struct Log {
    pub name: &'static str,
    pub out: Arc<Mutex<Vec<String>>>,
    pub err: Arc<Mutex<Vec<String>>>,
}

fn collect(
    r: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            into.lock().unwrap().push(l);
        }
    })
}

impl Log {
    /// Call `ready` every `every_ms` until it gives a value; after `secs`
    /// fail with "NAME: WHAT within SECS s" and the output.
    pub fn poll<T>(
        &self,
        what: &str,
        secs: u64,
        every_ms: u64,
        mut ready: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = ready() {
                return v;
            }
            if start.elapsed() >= Duration::from_secs(secs) {
                let out = self.out.lock().unwrap().clone();
                let err = self.err.lock().unwrap().clone();
                panic!(
                    "{}: {what} within {secs} s\nstdout: {out:#?}\nstderr: {err:#?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(every_ms));
        }
    }
}

impl Proc {
    pub fn spawn(name: &'static str, dir: &Path, args: &[impl AsRef<OsStr>]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (out, err) = (Arc::default(), Arc::default());
        let collectors = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&out)),
            collect(child.stderr.take().unwrap(), Arc::clone(&err)),
        ];
        Proc {
            child,
            log: Log { name, out, err },
            collectors,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.out.lock().unwrap().clone()
    }

    pub fn err_lines(&self) -> Vec<String> {
        self.log.err.lock().unwrap().clone()
    }

    /// The first stdout line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str, secs: u64) -> String {
        self.wait_line_at(prefix, secs).1
    }

    /// The index (order of output) and text of the first stdout line
    /// starting with `prefix`.
    pub fn wait_line_at(&self, prefix: &str, secs: u64) -> (usize, String) {
        let what = format!("no line starting with {prefix:?}");
        self.log.poll(&what, secs, 10, || {
            self.lines()
                .into_iter()
                .enumerate()
                .find(|(_, l)| l.starts_with(prefix))
        })
    }

    /// The first stdout line containing `needle`.
    pub fn wait_out(&self, needle: &str, secs: u64) -> String {
        let what = format!("no stdout line with {needle:?}");
        self.log.poll(&what, secs, 10, || {
            self.lines().into_iter().find(|l| l.contains(needle))
        })
    }

    /// Wait for a stderr line containing `needle`.
    pub fn wait_err(&self, needle: &str, secs: u64) {
        let what = format!("no stderr line with {needle:?}");
        self.log.poll(&what, secs, 10, || {
            self.err_lines()
                .iter()
                .any(|l| l.contains(needle))
                .then_some(())
        })
    }

    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let st = self
            .log
            .poll("did not exit", secs, 20, || self.child.try_wait().unwrap());
        // The child is gone, but its last lines may still sit in the pipes:
        // the collectors end at the pipes' end, so joining them makes
        // `lines()` and `err_lines()` complete (a fixed sleep did not
        // under load; issue 17).
        for c in self.collectors.drain(..) {
            c.join().unwrap();
        }
        st
    }

    /// The address at the end of the first stdout line starting with
    /// `prefix` (`listening on HOST:PORT`, `clients on HOST:PORT`).
    pub fn addr(&self, prefix: &str) -> String {
        let line = self.wait_line(prefix, 10);
        line.rsplit(' ').next().unwrap().to_string()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `doppel primary` in `dir` on the machine RAM file `ram`, replicating to
/// `backup` and serving clients, with `extra`; and its clients' address.
pub fn spawn_primary(
    dir: &Path,
    ram: &str,
    backup: &str,
    extra: &[impl AsRef<OsStr>],
) -> (Proc, String) {
    let mut a: Vec<OsString> = [
        "primary",
        "--machine-ram",
        ram,
        "--backup",
        backup,
        "--serve-clients",
        "127.0.0.1:0",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    a.extend(extra.iter().map(|e| e.as_ref().to_owned()));
    let p = Proc::spawn("primary", dir, &a);
    let clients = p.addr("clients on ");
    (p, clients)
}

/// `doppel client` in `dir` sending `ops` requests to `connect`, with
/// `extra` arguments.
pub fn spawn_client(dir: &Path, connect: &str, ops: &str, extra: &[&str]) -> Proc {
    let mut a = vec!["client", "--connect", connect, "--ops", ops];
    a.extend(extra);
    Proc::spawn("client", dir, &a)
}

/// A client of `ops` requests to `connect` that fails over to
/// `failover` (window 16, 3 s reply timeout), once it got answers.
pub fn failing_over_client(dir: &Path, connect: &str, ops: &str, failover: &str) -> Proc {
    let c = spawn_client(
        dir,
        connect,
        ops,
        &[
            "--failover",
            failover,
            "--window",
            "16",
            "--reply-timeout",
            "3",
            "--connect-timeout",
            "5",
        ],
    );
    c.wait_err("client: answered", 15);
    c
}
