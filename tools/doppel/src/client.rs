//! `doppel client`: drive the protected service over TCP, check every
//! reply with [`crate::kv::Checker`], fail over to a second address when
//! the first one breaks or goes silent, re-sending every unanswered request.
//!
//! Wire: request frames (32 bytes) one after the other; reply frames (48
//! bytes) one after the other (hv/abi/src/service.rs).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use doppel_abi::service::Reply;
use zerocopy::IntoBytes;

use crate::kv::{Checker, Verdict};

/// Size of a reply frame.
pub const REPLY_LEN: usize = core::mem::size_of::<Reply>();

/// Knobs of a client run.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub connect: String,
    /// Where to go when the current address breaks or goes silent, in
    /// order: the first failover goes to the first, the next to the
    /// second (a chain A -> B -> C).
    pub failover: Vec<String>,
    /// Most unanswered requests.
    pub window: u64,
    /// Longest silence while requests are outstanding.
    pub reply_timeout: Duration,
    /// How long to keep trying to connect (to each address).
    pub connect_timeout: Duration,
}

/// How a client run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientRun {
    pub failovers: u64,
    /// Connections made (0: the service was never reached).
    pub connections: u64,
    /// Why the run stopped before everything was answered, if it did.
    pub gave_up: Option<String>,
}

/// Connect to `addr`, retrying until `timeout`.
pub fn connect_retry(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

enum Session {
    /// Everything answered.
    Done,
    /// The connection broke or went silent.
    Lost(String),
}

/// Run the whole workload of `checker` against the service.
pub fn run(cfg: &ClientConfig, checker: &mut Checker) -> ClientRun {
    let mut out = ClientRun::default();
    let mut addr = cfg.connect.clone();
    let mut last_progress = Instant::now();
    loop {
        let sock = match connect_retry(&addr, cfg.connect_timeout) {
            Ok(s) => s,
            Err(e) => {
                out.gave_up = Some(format!("cannot connect to {addr}: {e}"));
                return out;
            }
        };
        out.connections += 1;
        eprintln!("client: connected to {addr}");
        match session(cfg, checker, sock, &mut last_progress) {
            Session::Done => return out,
            Session::Lost(why) => {
                eprintln!(
                    "client: {addr}: {why} ({} outstanding, {} answered)",
                    checker.outstanding(),
                    checker.answered
                );
                match cfg.failover.get(out.failovers as usize) {
                    Some(b) => {
                        out.failovers += 1;
                        eprintln!("client: failing over to {b}");
                        addr = b.clone();
                    }
                    None => {
                        out.gave_up = Some(format!("{addr}: {why}"));
                        return out;
                    }
                }
            }
        }
    }
}

fn session(
    cfg: &ClientConfig,
    checker: &mut Checker,
    mut sock: TcpStream,
    last_progress: &mut Instant,
) -> Session {
    // Re-send what is unanswered (after a failover), in id order.
    let mut frames = Vec::new();
    for r in checker.unanswered() {
        frames.extend_from_slice(r.as_bytes());
    }
    if !frames.is_empty() {
        eprintln!(
            "client: re-sending {} unanswered requests",
            frames.len() / 32
        );
    }
    if let Err(e) = sock.write_all(&frames) {
        return Session::Lost(format!("send failed: {e}"));
    }
    let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 64 * REPLY_LEN];
    let mut have = 0usize;
    let mut silent_since = Instant::now();
    loop {
        let mut frames = Vec::new();
        while let Some(r) = checker.next_to_send(cfg.window) {
            frames.extend_from_slice(r.as_bytes());
        }
        if !frames.is_empty() {
            if let Err(e) = sock.write_all(&frames) {
                return Session::Lost(format!("send failed: {e}"));
            }
        }
        if checker.done() {
            return Session::Done;
        }
        if checker.outstanding() == 0 {
            // Bad replies took requests off the books: nothing to wait for.
            return Session::Done;
        }
        match sock.read(&mut buf[have..]) {
            Ok(0) => return Session::Lost("connection closed".into()),
            Ok(n) => {
                have += n;
                silent_since = Instant::now();
                let whole = have / REPLY_LEN * REPLY_LEN;
                for f in buf[..whole].chunks_exact(REPLY_LEN) {
                    match checker.check(f) {
                        Verdict::Answered { .. } | Verdict::Duplicate { .. } => {}
                        Verdict::LostAcked { detail } => {
                            eprintln!("client: LOST ACKNOWLEDGED WORK: {detail}");
                        }
                        Verdict::Divergent { detail } => {
                            eprintln!("client: DIVERGENT reply: {detail}");
                        }
                    }
                }
                buf.copy_within(whole..have, 0);
                have -= whole;
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    *last_progress = Instant::now();
                    eprintln!(
                        "client: answered {}/{} (version {}, {} replays)",
                        checker.answered,
                        checker.workload().len(),
                        checker.acked_version,
                        checker.replays
                    );
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if silent_since.elapsed() >= cfg.reply_timeout {
                    return Session::Lost(format!(
                        "no reply within {:.1} s",
                        cfg.reply_timeout.as_secs_f64()
                    ));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Session::Lost(format!("receive failed: {e}")),
        }
    }
}
