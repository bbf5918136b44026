//! The status socket: a Unix socket on which a running `doppel primary`
//! or `doppel backup` (`--status-socket PATH`) answers `doppel status`.
//!
//! Protocol: the client connects and sends one line, `status`; the
//! server answers one line, the [`Status`] document as JSON, and closes.
//! Anything else is answered `{"error": "..."}`. The socket is local
//! (file permissions decide who may read it; it is created mode 0660)
//! and only ever reads state: nothing sent on it changes what the
//! replication does.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::telemetry::{Status, Telemetry};

/// Longest request line read from a client.
const MAX_REQUEST: u64 = 256;
/// A client that does not send its line in this time is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("status socket {path}: another doppel answers there (give each process its own --status-socket)")]
    InUse { path: PathBuf },
    #[error("status socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status socket {path}: nothing answers there ({source}); is the process running?")]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status socket {path}: bad answer: {detail}")]
    BadAnswer { path: PathBuf, detail: String },
}

/// The server; dropping it stops the thread and removes the socket file.
pub struct StatusServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatusServer {
    /// Bind `path` (a stale socket file left by a dead process is
    /// replaced; a live one is [`StatusError::InUse`]) and answer from
    /// `tel` in a thread.
    pub fn start(path: &Path, tel: &'static Telemetry) -> Result<Self, StatusError> {
        let io = |source| StatusError::Io {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(StatusError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let l = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        l.set_nonblocking(true).map_err(io)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || serve(&l, tel, &s))
            .map_err(io)?;
        Ok(Self {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(l: &UnixListener, tel: &Telemetry, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((c, _)) => {
                if let Err(e) = answer(c, tel) {
                    tracing::debug!("status client: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("status socket: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// One client: read its line (bounded, with a timeout), answer, close.
fn answer(c: UnixStream, tel: &Telemetry) -> std::io::Result<()> {
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    c.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&c).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match line.trim() {
        "status" => serde_json::to_string(&tel.snapshot()).map_err(std::io::Error::other)?,
        other => serde_json::json!({
            "error": format!("unknown request `{}` (this socket answers `status`)",
                             other.escape_debug())
        })
        .to_string(),
    };
    (&c).write_all(reply.as_bytes())?;
    (&c).write_all(b"\n")
}

/// Ask the process at `path` for its status.
pub fn query(path: &Path) -> Result<Status, StatusError> {
    let c = UnixStream::connect(path).map_err(|source| StatusError::NotRunning {
        path: path.to_owned(),
        source,
    })?;
    let io = |source| StatusError::Io {
        path: path.to_owned(),
        source,
    };
    c.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    c.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    (&c).write_all(b"status\n").map_err(io)?;
    let mut text = String::new();
    (&c).take(1 << 20).read_to_string(&mut text).map_err(io)?;
    let bad = |detail: String| StatusError::BadAnswer {
        path: path.to_owned(),
        detail,
    };
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| bad(format!("not JSON: {e}")))?;
    if let Some(e) = v.get("error") {
        return Err(bad(e.to_string()));
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Committed, Role, State};

    #[test]
    fn a_client_reads_the_live_status_and_a_second_server_is_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let path = dir.join("s.sock");
        let tel: &'static Telemetry = Box::leak(Box::new(Telemetry::new(Role::Backup)));
        let server = StatusServer::start(&path, tel).expect("start");
        tel.set_state(State::Protected);
        tel.committed(&Committed {
            epoch: 3,
            pages: 9,
            ..Committed::default()
        });
        let s = query(&path).expect("query");
        assert_eq!(
            (s.role, s.state, s.last_committed),
            (Role::Backup, State::Protected, Some(3))
        );
        assert!(matches!(
            StatusServer::start(&path, tel),
            Err(StatusError::InUse { .. })
        ));
        // Junk gets an error answer, and the server goes on.
        let mut c = UnixStream::connect(&path).expect("connect");
        c.write_all(b"rm -rf /\n").expect("write");
        let mut a = String::new();
        c.read_to_string(&mut a).expect("read");
        assert!(a.contains("unknown request"), "{a}");
        assert_eq!(query(&path).expect("again").dirty_pages, 9);
        drop(server);
        assert!(!path.exists());
        assert!(matches!(query(&path), Err(StatusError::NotRunning { .. })));
        // A stale file (no process behind it) is replaced.
        let stale = UnixListener::bind(&path).expect("bind");
        drop(stale);
        let again = StatusServer::start(&path, tel).expect("replaces a stale socket");
        assert!(query(&path).is_ok());
        drop(again);
    }
}
