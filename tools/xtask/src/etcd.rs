//! A single-member etcd on loopback (free ports, a temporary data
//! directory), for the witness tests: the `witness-*`/`partition` xtask
//! steps, and tools/doppel/tests/witness.rs, which includes this file
//! (`#[path]`), so it uses std only.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A running etcd; killed and its files removed when dropped.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:PORT` of its client URL.
    pub endpoint: String,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Start one and wait (up to 30 s) until it says it serves clients;
    /// `tag` names its data directory.
    pub fn start(tag: &str) -> io::Result<Self> {
        let (client, peer) = (free_port()?, free_port()?);
        let dir =
            std::env::temp_dir().join(format!("doppel-etcd-{tag}-{}-{client}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let log = dir.with_extension("log");
        let c = format!("http://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "w", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("w={p}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .map_err(|e| {
                io::Error::other(format!(
                    "starting etcd (installed by `cargo xtask setup`: etcd-server): {e}"
                ))
            })?;
        let mut e = Etcd {
            child,
            dir,
            endpoint: format!("127.0.0.1:{client}"),
        };
        let t = Instant::now();
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("ready to serve client requests") {
                return Ok(e);
            }
            if e.child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(30) {
                let lines: Vec<&str> = text.lines().collect();
                return Err(io::Error::other(format!(
                    "etcd did not come up:\n{}",
                    lines[lines.len().saturating_sub(10)..].join("\n")
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill it (the witness becomes unreachable).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_file(self.dir.with_extension("log"));
        let _ = fs::remove_dir_all(&self.dir);
    }
}
