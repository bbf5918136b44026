//! Keep a primary's guest protected by a backup over the network, and keep
//! it serving when the backup is lost.
//!
//! [`protect`] runs stream sessions to `--backup` one after the other:
//! - a session is [`Primary::run`] on a fresh connection (stream headers,
//!   optional feature hello, epochs from 0). Its epoch 0 is every guest
//!   page: the hypervisor's epoch 0 on the first session, the primary's
//!   page mirror ([`Primary::keep_mirror`]) together with the vCPU of the
//!   checkpoint it is taken at on a later one;
//! - when the backup is lost (no ack within `--ack-timeout`, the
//!   connection closed or reset, a send that fails or does not finish
//!   within `--ack-timeout`) the primary says so (`primary: backup lost
//!   (<why>) after epoch E; serving unprotected`) and goes on releasing
//!   every checkpoint itself ([`Primary::release`], the one place that
//!   sends `CommitEpoch`): the guest keeps answering its clients,
//!   unprotected (Remus's rule: a lost backup must not take the service
//!   down);
//! - meanwhile a helper thread tries `--backup` again about once a second.
//!   When a backup accepts (and answers the hello, with `--compress`), the
//!   next checkpoint starts a new session: `primary: re-protected by
//!   <addr> (new session)`.
//!
//! The guest does not stop while the tool holds a checkpoint (it runs on
//! into the next epoch and only waits at that epoch's end), so guest RAM
//! read from the machine file is never the state of a checkpoint. The
//! mirror is: every checkpoint's pages are applied to it as they are
//! taken, so after checkpoint E it is exactly the guest of epoch E.
//!
//! The client bridge is the caller's: it runs beside this, untouched,
//! whether a backup protects the guest or not.

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ack::{AckReader, BackMsg};
use crate::link::{LinkReader, LinkTls, LinkWriter};
use crate::primary::{EpochReport, Output, Primary, PrimaryError, Summary};
use crate::stream::format::feature;
use crate::telemetry::State;

/// The stream to a backup over TCP, plain or TLS (crate::link).
pub type Link = Output<BufWriter<LinkWriter>, BufReader<LinkReader>>;

/// How to reach and talk to the backup.
#[derive(Clone, Debug)]
pub struct ProtectOpts {
    /// `HOST:PORT` of the backup.
    pub backup: String,
    /// Longest wait for an ack, and for a send to finish.
    pub ack_timeout: Duration,
    /// Heartbeat interval while the hypervisor makes no checkpoint.
    pub heartbeat: Duration,
    /// Ask for XOR+lz4 page records.
    pub compress: bool,
    pub hello_timeout: Duration,
    /// Pause between reconnection attempts once the backup is lost.
    pub retry: Duration,
    /// Longest wait for a reconnection's TCP handshake and the backup's
    /// stream header (a listener that never accepts must not hold the
    /// helper thread for `ack_timeout`).
    pub connect_timeout: Duration,
    /// Mutual TLS with pinned certificates (None: plain TCP).
    pub tls: Option<Arc<LinkTls>>,
    /// Longest wait for the TLS handshake.
    pub handshake: Duration,
}

impl ProtectOpts {
    pub fn new(backup: &str) -> Self {
        Self {
            backup: backup.into(),
            ack_timeout: Duration::from_secs(60),
            heartbeat: Duration::from_millis(200),
            compress: false,
            hello_timeout: Duration::from_secs(10),
            retry: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            tls: None,
            handshake: Duration::from_secs(10),
        }
    }
}

/// What a [`protect`] run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Totals over every epoch shipped to a backup (all sessions);
    /// `committed` counts every epoch released, protected or not.
    pub summary: Summary,
    /// Stream sessions started (1 + the times the guest was re-protected).
    pub sessions: u32,
    /// Times the backup was lost.
    pub lost: u32,
    /// Epochs released with no backup holding them.
    pub unprotected_epochs: u64,
    /// Time spent without a backup.
    pub unprotected: Duration,
    /// The run ended with a backup protecting the guest (END sent).
    pub protected_at_end: bool,
}

impl Report {
    /// Whether the guest ran unprotected at some point of the run.
    pub fn was_unprotected(&self) -> bool {
        self.lost > 0
    }

    /// `primary: unprotected for N epochs (S s): backup lost L times,
    /// re-protected R times; protected at the end: yes|no`.
    pub fn unprotected_line(&self) -> String {
        format!(
            "primary: unprotected for {} epochs ({:.1} s): backup lost {} times, \
             re-protected {} times; protected at the end: {}",
            self.unprotected_epochs,
            self.unprotected.as_secs_f64(),
            self.lost,
            self.sessions.saturating_sub(1),
            if self.protected_at_end { "yes" } else { "no" }
        )
    }
}

/// Open a stream session to the backup: TCP connect (within
/// `connect_timeout`), keepalive and timeouts on the socket, the backup's
/// stream header on the back channel, and the feature hello with
/// `compress`. Errors: [`PrimaryError::Connect`] when nobody answers,
/// otherwise as [`Output::negotiate`].
pub fn connect(opts: &ProtectOpts, guest_pages: u64) -> Result<Link, PrimaryError> {
    let cerr = |source: std::io::Error| PrimaryError::Connect {
        addr: opts.backup.clone(),
        source,
    };
    let addrs: Vec<SocketAddr> = opts.backup.to_socket_addrs().map_err(cerr)?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut conn = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, opts.connect_timeout) {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => last = e,
        }
    }
    let conn = conn.ok_or(last).map_err(cerr)?;
    let _ = conn.set_nodelay(true);
    crate::keepalive::enable(&conn);
    // A write that cannot finish (a peer that stopped reading) fails
    // instead of holding the epoch forever.
    conn.set_write_timeout(Some(opts.ack_timeout))
        .and_then(|_| conn.set_read_timeout(Some(opts.connect_timeout)))
        .map_err(cerr)?;
    let sock = conn.try_clone().map_err(cerr)?;
    let link = match &opts.tls {
        Some(t) => crate::link::Link::client(conn, t, opts.handshake),
        None => crate::link::Link::plain(conn),
    }
    .map_err(|e| PrimaryError::LinkRefused {
        addr: opts.backup.clone(),
        why: e.to_string(),
    })?;
    let (back, wr) = link.split();
    let mut acks = AckReader::open(BufReader::new(back), 0)
        .map_err(|source| PrimaryError::Ack { epoch: 0, source })?;
    // On TLS the backup opens with a fresh session nonce, which the stream
    // must echo before anything else (docs/STREAM.md): a replayed stream
    // cannot.
    let nonce = match &opts.tls {
        None => None,
        Some(_) => match acks.next_msg() {
            Ok(BackMsg::Session(n)) => Some(n),
            Ok(other) => {
                return Err(PrimaryError::BadHello {
                    detail: format!("{other:?} instead of DOPPEL_SESSION"),
                })
            }
            Err(source) => return Err(PrimaryError::Ack { epoch: 0, source }),
        },
    };
    let mut out =
        Output::backup(BufWriter::with_capacity(1 << 20, wr), acks).with_heartbeat(opts.heartbeat);
    if let Some(n) = nonce {
        out = out.with_session(n);
    }
    if opts.compress {
        sock.set_read_timeout(Some(opts.hello_timeout))
            .map_err(cerr)?;
        let got = out.negotiate(feature::XLZ4, guest_pages, opts.hello_timeout)?;
        if got & feature::XLZ4 == 0 {
            tracing::warn!("the backup refused compression; sending plain PAGE_DATA");
        }
    }
    sock.set_read_timeout(Some(opts.ack_timeout))
        .map_err(cerr)?;
    Ok(out)
}

/// Tries the backup again in a helper thread, every `retry`, until one
/// session opens (taken with [`Reconnect::take`]) or it is dropped.
struct Reconnect {
    stop: Arc<AtomicBool>,
    rx: mpsc::Receiver<Link>,
    thread: Option<JoinHandle<()>>,
}

impl Reconnect {
    fn start(opts: &ProtectOpts, guest_pages: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (o, s) = (opts.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut tries = 0u64;
            let mut said = Instant::now();
            while !s.load(Ordering::Relaxed) {
                // The first try right away: a backup restarted at once is
                // taken at once.
                match connect(&o, guest_pages) {
                    Ok(link) => {
                        let _ = tx.send(link);
                        return;
                    }
                    Err(e) => {
                        tries += 1;
                        // Bounded noise: the first failure, then one line
                        // about every 30 s.
                        if tries == 1 {
                            tracing::warn!(
                                "no backup at {} ({e}); trying again every {} ms",
                                o.backup,
                                o.retry.as_millis()
                            );
                            said = Instant::now();
                        } else if said.elapsed() >= Duration::from_secs(30) {
                            tracing::warn!(
                                "still no backup at {} after {tries} tries ({e})",
                                o.backup
                            );
                            said = Instant::now();
                        }
                    }
                }
                let t = Instant::now();
                while t.elapsed() < o.retry && !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Self {
            stop,
            rx,
            thread: Some(thread),
        }
    }

    fn take(&self) -> Option<Link> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Reconnect {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The text of a lost backup's reason for the log line.
fn why(e: &PrimaryError) -> String {
    e.to_string()
}

/// Protect the guest behind `p` with the backup at `opts.backup` until
/// `cfg.epochs` epochs are released or the stop flag is set, serving on
/// unprotected (and reconnecting) whenever the backup is lost. The first
/// connection must succeed (its error is returned: nobody to protect with
/// yet). `progress` runs after every epoch a backup acknowledged. Errors
/// other than a lost backup end the run as [`Primary::run`]'s do.
///
/// The caller keeps its client bridge running around this call: output
/// reaches it only through `CommitEpoch`, protected or not.
pub fn protect(
    p: &mut Primary<'_>,
    opts: &ProtectOpts,
    mut progress: impl FnMut(&EpochReport),
) -> Result<Report, PrimaryError> {
    let guest_pages = p.control().guest_pages();
    p.keep_mirror();
    let mut rep = Report::default();
    let mut link = connect(opts, guest_pages)?;
    let tel = crate::telemetry::global();
    tel.set_peer(Some(opts.backup.clone()));
    tel.set_state(State::Protected);
    loop {
        rep.sessions += 1;
        rep.summary.compressed |= link.compressed();
        let sum = &mut rep.summary;
        let r = p.run(&mut link, |e| {
            sum.pages += e.pages;
            sum.bytes += e.bytes;
            sum.page_raw += e.page_raw;
            sum.page_wire += e.page_wire;
            progress(e);
        });
        drop(link);
        match r {
            Ok(s) => {
                rep.summary.stopped = s.stopped;
                rep.summary.committed = p.next_epoch();
                rep.protected_at_end = true;
                return Ok(rep);
            }
            Err(e) if e.lost_backup() => {
                rep.lost += 1;
                tel.backup_lost();
                let after = match p.next_epoch() {
                    0 => "none".to_string(),
                    n => (n - 1).to_string(),
                };
                println!(
                    "primary: backup lost ({}) after epoch {after}; serving unprotected",
                    why(&e)
                );
                let t = Instant::now();
                let next = unprotected(p, opts, guest_pages, &mut rep);
                rep.unprotected += t.elapsed();
                match next? {
                    Some(l) => {
                        println!("primary: re-protected by {} (new session)", opts.backup);
                        tel.set_peer(Some(opts.backup.clone()));
                        tel.set_state(State::Protected);
                        link = l;
                    }
                    None => {
                        rep.summary.committed = p.next_epoch();
                        return Ok(rep);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Release checkpoints with no backup until one accepts again (its
/// session is returned) or the run ends (`None`).
fn unprotected(
    p: &mut Primary<'_>,
    opts: &ProtectOpts,
    guest_pages: u64,
    rep: &mut Report,
) -> Result<Option<Link>, PrimaryError> {
    // The checkpoint the lost backup never acknowledged (if any) goes out
    // now, unprotected.
    let tel = crate::telemetry::global();
    if p.release()?.is_some() {
        rep.unprotected_epochs += 1;
        tel.unprotected_epoch();
    }
    let again = Reconnect::start(opts, guest_pages);
    loop {
        if p.epochs_done() {
            return Ok(None);
        }
        if let Some(link) = again.take() {
            return Ok(Some(link));
        }
        match p.next_checkpoint(|_| Ok(()))? {
            None => {
                tracing::info!("stop requested: ending unprotected");
                rep.summary.stopped = true;
                return Ok(None);
            }
            Some(_) => {
                p.release()?;
                rep.unprotected_epochs += 1;
                tel.unprotected_epoch();
            }
        }
    }
}
