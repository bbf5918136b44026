//! `doppel keygen` and the replication link's flags: `--tls-cert`,
//! `--tls-key`, `--peer-cert` on `primary` and `backup` (doppel::link).

use std::fs::OpenOptions;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use doppel::ack::{AckReader, BackMsg};
use doppel::backup::{ReceiveError, Received};
use doppel::link::{Link, LinkReader, LinkTls, TlsFiles, SESSION_NONCE_LEN};
use doppel::telemetry::State;

use crate::exit::{IO, LOST_BACKUP, PEER_GONE, USAGE};

type Nonce = [u8; SESSION_NONCE_LEN];

/// A connected link to the backup, its back channel, and the session
/// nonce (TLS only).
pub type Connected = (Link, AckReader<BufReader<LinkReader>>, Option<Nonce>);

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Directory to write NAME.key and NAME.crt into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Name of this side (e.g. primary, backup): the file names and the
    /// certificate's subject alternative name. Letters, digits, `-`, `_`, `.`.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    name: String,
}

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}`: use 1 to 63 letters, digits, `-`, `_` or `.` (not starting with `.`)"
        ))
    }
}

/// The TLS flags of `primary` and `backup`.
#[derive(Args, Debug)]
pub struct TlsArgs {
    /// This side's certificate (PEM, from `doppel keygen`). With --tls-key
    /// and --peer-cert: the replication link is mutual TLS 1.3. Without
    /// the three: plain TCP, unauthenticated (a warning says so).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PKCS#8 PEM, from `doppel keygen`).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The other side's certificate (PEM): the only certificate this side
    /// accepts (pinned, byte for byte).
    #[arg(long, value_name = "FILE")]
    peer_cert: Option<PathBuf>,
    /// With TLS: seconds the handshake may take (0.001 to 604800). The
    /// backup drops a peer that does not finish it in time (e.g. one
    /// without TLS, which waits silently) and keeps waiting.
    #[arg(long, default_value = "10", value_name = "SECS",
          value_parser = crate::units::parse_secs, requires = "tls_cert")]
    tls_handshake_timeout: Duration,
}

impl TlsArgs {
    /// The TLS handshake's time limit.
    pub fn handshake(&self) -> Duration {
        self.tls_handshake_timeout
    }

    /// Whether any of the three flags was given.
    pub fn any(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.peer_cert.is_some()
    }

    /// The loaded TLS side, or `None` for plain TCP (warned about).
    /// `role`: "primary" or "backup", for messages.
    pub fn load(&self, role: &str) -> Result<Option<LinkTls>, (String, u8)> {
        let files = match (&self.tls_cert, &self.tls_key, &self.peer_cert) {
            (None, None, None) => {
                tracing::warn!(
                    "{role}: the replication link is plain TCP, unauthenticated and \
                     unencrypted: anyone who reaches it can act as the peer. Use `doppel keygen` \
                     and --tls-cert/--tls-key/--peer-cert on both sides"
                );
                return Ok(None);
            }
            (Some(c), Some(k), Some(p)) => TlsFiles {
                cert: c.clone(),
                key: k.clone(),
                peer: p.clone(),
            },
            (c, k, p) => {
                let missing: Vec<&str> = [
                    (c.is_none(), "--tls-cert"),
                    (k.is_none(), "--tls-key"),
                    (p.is_none(), "--peer-cert"),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, n)| *n)
                .collect();
                return Err((
                    format!(
                        "--tls-cert, --tls-key and --peer-cert go together (all three or none); \
                         missing {}",
                        missing.join(" and ")
                    ),
                    USAGE,
                ));
            }
        };
        let t = LinkTls::load(&files).map_err(|e| (e.to_string(), USAGE))?;
        tracing::info!(
            "{role}: mutual TLS 1.3 on the replication link, peer pinned to {}",
            files.peer.display()
        );
        Ok(Some(t))
    }
}

/// `doppel keygen --out DIR --name NAME`.
pub fn keygen(a: KeygenArgs) -> Result<(), (String, u8)> {
    let key_path = a.out.join(format!("{}.key", a.name));
    let crt_path = a.out.join(format!("{}.crt", a.name));
    for p in [&key_path, &crt_path] {
        if p.exists() {
            return Err((
                format!("{}: exists; refusing to overwrite a key pair", p.display()),
                USAGE,
            ));
        }
    }
    let ck = rcgen::generate_simple_self_signed(vec![a.name.clone()])
        .map_err(|e| (format!("generating the key pair: {e}"), IO))?;
    std::fs::create_dir_all(&a.out).map_err(|e| (format!("{}: {e}", a.out.display()), IO))?;
    let write = |p: &PathBuf, mode: u32, text: &str| -> Result<(), (String, u8)> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .map_err(|e| (format!("{}: {e}", p.display()), IO))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| (format!("{}: {e}", p.display()), IO))
    };
    write(&key_path, 0o600, &ck.signing_key.serialize_pem())?;
    if let Err(e) = write(&crt_path, 0o644, &ck.cert.pem()) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    println!(
        "keygen: wrote {} (private, mode 0600) and {} (give it to the peer)",
        key_path.display(),
        crt_path.display()
    );
    Ok(())
}

/// Connect to the backup (for `stream send`; `doppel primary` connects
/// through doppel::protect::connect, which also reconnects) (TLS when `tls`), open the back channel, and
/// take the session nonce the backup sends on a TLS link. `ack_timeout`
/// bounds every read on the link.
pub fn connect(
    addr: &str,
    tls: Option<&LinkTls>,
    handshake: Duration,
    ack_timeout: Duration,
) -> Result<Connected, (String, u8)> {
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    let conn = TcpStream::connect(addr).map_err(io(format!("connecting to {addr}")))?;
    let _ = conn.set_nodelay(true);
    let link = match tls {
        Some(t) => Link::client(conn, t, handshake),
        None => Link::plain(conn),
    }
    .map_err(|e| (e.to_string(), LOST_BACKUP))?;
    link.socket()
        .set_read_timeout(Some(ack_timeout))
        .map_err(io(addr.into()))?;
    let (rd, _) = link.split();
    let refused = |e: String| {
        let hint = if tls.is_some() {
            " (a TLS backup that refused our certificate closes the link here)"
        } else {
            ""
        };
        (format!("back channel from {addr}: {e}{hint}"), LOST_BACKUP)
    };
    let mut acks = AckReader::open(BufReader::new(rd), 0).map_err(|e| refused(e.to_string()))?;
    let nonce = match tls {
        None => None,
        Some(_) => match acks.next_msg() {
            Ok(BackMsg::Session(n)) => Some(n),
            Ok(other) => {
                return Err((
                    format!("back channel from {addr}: {other:?} instead of DOPPEL_SESSION"),
                    1,
                ))
            }
            Err(e) => return Err(refused(e.to_string())),
        },
    };
    Ok((link, acks, nonce))
}

/// Accept the primary: with TLS, a peer that fails the handshake (wrong
/// or no certificate, no TLS at all) is logged and dropped, and the wait
/// goes on until `timeout` after `start`. Returns the link and, on TLS, a
/// fresh session nonce for it.
pub fn accept(
    l: &TcpListener,
    start: Instant,
    timeout: u64,
    tls: Option<&LinkTls>,
    handshake: Duration,
) -> Result<(Link, Option<Nonce>), (String, u8)> {
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    l.set_nonblocking(true).map_err(io("listener".into()))?;
    loop {
        let conn = match l.accept() {
            Ok((c, peer)) => {
                tracing::info!("primary connected from {peer}");
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() >= Duration::from_secs(timeout) {
                    return Err((
                        format!("no primary connected within {timeout} s"),
                        PEER_GONE,
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(io("accept".into())(e)),
        };
        conn.set_nonblocking(false).map_err(io("socket".into()))?;
        // A primary host that vanished without a FIN is noticed by the
        // kernel too, not only by the heartbeat timeout.
        doppel::keepalive::enable(&conn);
        let _ = conn.set_nodelay(true);
        let Some(t) = tls else {
            return Ok((Link::plain(conn).map_err(|e| (e.to_string(), IO))?, None));
        };
        let left = Duration::from_secs(timeout).saturating_sub(start.elapsed());
        let hs = handshake.min(left).max(Duration::from_millis(100));
        match Link::server(conn, t, hs) {
            Ok(link) => {
                let n = doppel::link::nonce().map_err(|e| (e.to_string(), IO))?;
                return Ok((link, Some(n)));
            }
            Err(e) => {
                tracing::warn!("link: rejected: {e}; still waiting for the primary");
            }
        }
    }
}

/// Accept primaries (as [`accept`], the wait bounded by `timeout` from
/// now) and give each link to `serve`, until a session is not `refused`
/// (a refused session lets the next primary in).
pub fn serve_until_accepted<R>(
    l: &TcpListener,
    timeout: u64,
    tls: Option<&LinkTls>,
    handshake: Duration,
    mut serve: impl FnMut(Link, Option<Nonce>) -> Result<R, (String, u8)>,
    refused: impl Fn(&R) -> bool,
) -> Result<R, (String, u8)> {
    let waiting = Instant::now();
    let tel = doppel::telemetry::global();
    loop {
        tel.set_state(State::Waiting);
        let (link, nonce) = accept(l, waiting, timeout, tls, handshake)?;
        // A primary connected: this backup now protects it.
        tel.set_peer(link.socket().peer_addr().ok().map(|a| a.to_string()));
        tel.set_state(State::Protected);
        let got = serve(link, nonce)?;
        if !refused(&got) {
            return Ok(got);
        }
    }
}

/// Whether a receive was refused by the session check before anything
/// was applied (a replayed stream): the backup then waits for the next
/// connection instead of ending.
pub fn session_refused(got: &Received) -> bool {
    if let Some(e @ ReceiveError::Session(_)) = &got.error {
        if got.epochs.is_empty() {
            tracing::warn!(
                "link: rejected the stream: {e}; nothing applied, still waiting for the primary"
            );
            return true;
        }
    }
    false
}

/// `doppel stream send FILE --backup ADDR [TLS flags]` (hidden): replay
/// a recorded stream to a backup.
pub fn send(file: &std::path::Path, addr: &str, tls: &TlsArgs) -> Result<(), (String, u8)> {
    let bytes = std::fs::read(file).map_err(|e| (format!("{}: {e}", file.display()), IO))?;
    let t = tls.load("stream send")?;
    let (link, mut acks, _nonce) =
        connect(addr, t.as_ref(), tls.handshake(), Duration::from_secs(10))?;
    let (_, mut w) = link.split();
    // As recorded: whatever session it had, not this connection's.
    let sent = w.write_all(&bytes).and_then(|_| w.flush());
    let mut acked = 0u64;
    let why = loop {
        match acks.next_msg() {
            Ok(BackMsg::Ack(_)) => acked += 1,
            Ok(BackMsg::End) => break None,
            Ok(_) => {}
            Err(e) => break Some(e.to_string()),
        }
    };
    println!(
        "stream send: {} of {} bytes sent; the backup acknowledged {acked} epochs{}",
        if sent.is_ok() { bytes.len() } else { 0 },
        bytes.len(),
        why.as_deref()
            .map_or(" and ended the back channel".to_string(), |w| format!(
                ", then: {w}"
            ))
    );
    match why {
        None => Ok(()),
        Some(w) => Err((
            format!("the backup did not take the stream: {w}"),
            PEER_GONE,
        )),
    }
}
