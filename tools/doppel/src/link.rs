//! The replication link between `doppel primary` and `doppel backup`:
//! plain TCP (unauthenticated, the default), or mutual TLS 1.3 in which
//! each side pins the other's certificate.
//!
//! Pinning: a side accepts exactly one peer certificate, the DER of the
//! file given with `--peer-cert` (made by the other side's `doppel keygen`).
//! No CA, no names, no expiry policy: the certificate is an identity, not
//! a claim. The handshake signatures are still checked with the crypto
//! provider's algorithms, so presenting the pinned certificate without its
//! private key fails too.
//!
//! A [`Link`] is one connection; [`Link::split`] gives a reader half and a
//! writer half over one shared TLS session (a mutex). Each side of the
//! replication protocol uses both halves from one thread (request, then
//! response; heartbeats are written by that same thread between epochs),
//! so a read that blocks while holding the mutex never keeps another
//! thread from writing. Socket timeouts are set on [`Link::socket`] and
//! apply through TLS: a timed out read surfaces as the socket's
//! `WouldBlock`/`TimedOut` error.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, ServerConnection, SignatureScheme, StreamOwned,
};

/// Length of the session nonce (DOPPEL_SESSION, docs/STREAM.md).
pub use crate::stream::format::SESSION_NONCE_LEN;

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

/// The three files of a TLS side: its certificate and key, and the
/// peer's certificate it pins.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub peer: PathBuf,
}

/// A side's identity and its pin, loaded.
#[derive(Debug)]
pub struct LinkTls {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    peer: CertificateDer<'static>,
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, LinkError> {
    CertificateDer::from_pem_file(path).map_err(|e| LinkError::File {
        path: path.display().to_string(),
        why: format!("not a PEM certificate ({e})"),
    })
}

impl LinkTls {
    /// Load the PEM files (certificate, PKCS#8 key, the peer's certificate).
    pub fn load(f: &TlsFiles) -> Result<Self, LinkError> {
        let key = PrivateKeyDer::from_pem_file(&f.key).map_err(|e| LinkError::File {
            path: f.key.display().to_string(),
            why: format!("not a PEM private key ({e})"),
        })?;
        let t = Self::from_der(read_cert(&f.cert)?, key, read_cert(&f.peer)?);
        // A key that does not match the certificate fails here, not in
        // the first handshake.
        t.client_config()?;
        Ok(t)
    }

    /// From DER: our certificate and key, the pinned peer certificate.
    pub fn from_der(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        peer: CertificateDer<'static>,
    ) -> Self {
        Self { cert, key, peer }
    }

    /// The backup's side: TLS 1.3 only, a client certificate is required
    /// and must be the pinned one.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, LinkError> {
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LinkError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(Pinned::new(self.peer.clone())))
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| LinkError::Config(format!("certificate and key: {e}")))?;
        Ok(Arc::new(cfg))
    }

    /// The primary's side: TLS 1.3 only, the server certificate must be
    /// the pinned one, and ours is presented.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, LinkError> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LinkError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::new(self.peer.clone())))
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| LinkError::Config(format!("certificate and key: {e}")))?;
        cfg.enable_sni = false;
        Ok(Arc::new(cfg))
    }
}

/// The crypto provider of every link: rustls' `ring` provider (no C
/// toolchain or cmake needed, unlike aws-lc-rs). rustls 0.23.48 marks it
/// deprecated because ring has no post-quantum key exchange: the link's
/// key exchange is classical (X25519, P-256, P-384), see
/// docs/REPLICATION.md.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A fresh random session nonce (the backup sends one per connection).
pub fn nonce() -> Result<[u8; SESSION_NONCE_LEN], LinkError> {
    let mut n = [0u8; SESSION_NONCE_LEN];
    provider()
        .secure_random
        .fill(&mut n)
        .map_err(|_| LinkError::Config("the random number generator failed".into()))?;
    Ok(n)
}

/// Accepts exactly one certificate (by its DER bytes) and checks the
/// handshake signatures with the provider's algorithms. Used both ways:
/// the primary pins the backup's certificate, the backup the primary's.
#[derive(Debug)]
pub struct Pinned {
    pin: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

/// The error a pinned verifier gives for any other certificate (its
/// Debug form is what rustls prints).
struct NotPinned;

impl std::fmt::Debug for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not the pinned certificate (--peer-cert)")
    }
}

impl std::error::Error for NotPinned {}

impl Pinned {
    pub fn new(pin: CertificateDer<'static>) -> Self {
        Self {
            pin,
            algs: provider().signature_verification_algorithms,
        }
    }

    /// Ok only for the pinned certificate itself (byte for byte).
    pub fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.pin.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotPinned)),
            )))
        }
    }
}

/// The handshake-signature part both verifier traits ask for, the same
/// for either side: rustls' checks with the provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// A byte stream both ways.
trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

type Shared = Arc<Mutex<Box<dyn Duplex>>>;

fn lock(s: &Shared) -> MutexGuard<'_, Box<dyn Duplex>> {
    // A panic elsewhere cannot leave a half-written TLS record in the
    // session that matters more than the error the next call reports.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// One replication connection, plain or TLS.
pub struct Link {
    inner: Shared,
    sock: TcpStream,
    tls: bool,
}

/// The reading half of a [`Link`].
pub struct LinkReader(Shared);
/// The writing half of a [`Link`].
pub struct LinkWriter(Shared);

impl Read for LinkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        lock(&self.0).read(buf)
    }
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        lock(&self.0).flush()
    }
}

/// Text of a handshake failure: rustls' error when there is one, and a
/// hint for a peer that never spoke TLS.
fn handshake_why(e: &io::Error, timeout: Duration) -> String {
    use rustls::Error as E;
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        return match t {
            E::InvalidCertificate(CertificateError::Other(o)) if o.0.is::<NotPinned>() => {
                "its certificate is not the pinned one (--peer-cert)".into()
            }
            E::NoCertificatesPresented => "it presented no certificate".into(),
            E::InvalidMessage(_) => format!("it does not speak TLS 1.3 ({t})"),
            E::AlertReceived(a) => {
                format!("it refused the handshake with alert {a:?} (does it pin our certificate?)")
            }
            t => t.to_string(),
        };
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
            "no TLS handshake within {:.1} s (a peer without TLS?)",
            timeout.as_secs_f64()
        ),
        io::ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
        _ => e.to_string(),
    }
}

fn peer_of(sock: &TcpStream) -> String {
    sock.peer_addr()
        .map_or_else(|_| "the peer".into(), |a| a.to_string())
}

impl Link {
    /// A plain TCP link (unauthenticated).
    pub fn plain(sock: TcpStream) -> Result<Self, LinkError> {
        let other = sock.try_clone().map_err(|source| LinkError::Io {
            what: "socket",
            source,
        })?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Box::new(other))),
            sock,
            tls: false,
        })
    }

    /// The primary's side: TLS client handshake on `sock` (bounded by
    /// `timeout`). In TLS 1.3 the backup checks our certificate after our
    /// last handshake message: a rejection shows up as an alert on the
    /// first read.
    pub fn client(sock: TcpStream, tls: &LinkTls, timeout: Duration) -> Result<Self, LinkError> {
        let name = ServerName::try_from("doppel-backup").expect("a valid DNS name");
        let conn = ClientConnection::new(tls.client_config()?, name)
            .map_err(|e| LinkError::Config(e.to_string()))?;
        Self::handshake(sock, conn, timeout)
    }

    /// The backup's side: TLS server handshake on `sock` (bounded by
    /// `timeout`); a peer without the pinned certificate, or without TLS,
    /// is refused here, before any stream byte is read.
    pub fn server(sock: TcpStream, tls: &LinkTls, timeout: Duration) -> Result<Self, LinkError> {
        let conn = ServerConnection::new(tls.server_config()?)
            .map_err(|e| LinkError::Config(e.to_string()))?;
        Self::handshake(sock, conn, timeout)
    }

    fn handshake<C, S>(sock: TcpStream, mut conn: C, timeout: Duration) -> Result<Self, LinkError>
    where
        C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>> + Send + 'static,
        S: rustls::SideData + 'static,
    {
        let io = |what| move |source| LinkError::Io { what, source };
        let peer = peer_of(&sock);
        let keep_r = sock.read_timeout().map_err(io("socket"))?;
        let keep_w = sock.write_timeout().map_err(io("socket"))?;
        sock.set_read_timeout(Some(timeout)).map_err(io("socket"))?;
        sock.set_write_timeout(Some(timeout))
            .map_err(io("socket"))?;
        let mut s = sock.try_clone().map_err(io("socket"))?;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut s) {
                return Err(LinkError::Handshake {
                    peer,
                    why: handshake_why(&e, timeout),
                });
            }
        }
        sock.set_read_timeout(keep_r).map_err(io("socket"))?;
        sock.set_write_timeout(keep_w).map_err(io("socket"))?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Box::new(StreamOwned::new(conn, s)))),
            sock,
            tls: true,
        })
    }

    /// The TCP socket (timeouts, nodelay, shutdown).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Whether the link is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Reader and writer halves (one TLS session behind a mutex).
    pub fn split(&self) -> (LinkReader, LinkWriter) {
        (
            LinkReader(Arc::clone(&self.inner)),
            LinkWriter(Arc::clone(&self.inner)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let k = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert = k.cert.der().clone();
        let key = PrivateKeyDer::try_from(k.signing_key.serialize_der()).unwrap();
        (cert, key)
    }

    #[test]
    fn a_pin_accepts_its_own_certificate_only() {
        let (a, _) = ident("a");
        let (b, _) = ident("b");
        let p = Pinned::new(a.clone());
        assert!(p.check(&a).is_ok());
        let e = p.check(&b).unwrap_err();
        assert!(e.to_string().contains("not the pinned certificate"), "{e}");
        // One flipped byte is another certificate.
        let mut bytes = a.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(p.check(&CertificateDer::from(bytes)).is_err());
        assert!(p.check(&CertificateDer::from(Vec::new())).is_err());
    }

    #[test]
    fn both_verifier_roles_apply_the_pin() {
        let (a, _) = ident("a");
        let (b, _) = ident("b");
        let p = Pinned::new(a.clone());
        let name = ServerName::try_from("doppel-backup").unwrap();
        let now = UnixTime::now();
        assert!(p.verify_server_cert(&a, &[], &name, &[], now).is_ok());
        assert!(p.verify_server_cert(&b, &[], &name, &[], now).is_err());
        // An intermediate list does not smuggle another end entity in.
        assert!(p
            .verify_server_cert(&b, std::slice::from_ref(&a), &name, &[], now)
            .is_err());
        assert!(p.verify_client_cert(&a, &[], now).is_ok());
        assert!(p
            .verify_client_cert(&b, std::slice::from_ref(&a), now)
            .is_err());
        assert!(ClientCertVerifier::client_auth_mandatory(&p));
        assert!(!ServerCertVerifier::supported_verify_schemes(&p).is_empty());
    }

    fn pair(
        server_pin: &CertificateDer<'static>,
        client: (CertificateDer<'static>, PrivateKeyDer<'static>),
        server: (CertificateDer<'static>, PrivateKeyDer<'static>),
        client_pin: CertificateDer<'static>,
    ) -> (Result<Link, LinkError>, Result<Vec<u8>, String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let st = LinkTls::from_der(server.0, server.1, server_pin.clone());
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let link = Link::server(s, &st, Duration::from_secs(5))?;
            let (mut r, _) = link.split();
            let mut b = [0u8; 5];
            r.read_exact(&mut b).map_err(|e| LinkError::Io {
                what: "read",
                source: e,
            })?;
            Ok::<_, LinkError>((link, b.to_vec()))
        });
        let ct = LinkTls::from_der(client.0, client.1, client_pin);
        let c = Link::client(
            TcpStream::connect(addr).unwrap(),
            &ct,
            Duration::from_secs(5),
        );
        if let Ok(c) = &c {
            let (_, mut w) = c.split();
            let _ = w.write_all(b"hello").and_then(|_| w.flush());
        }
        let got = srv.join().unwrap();
        (c, got.map(|(_, b)| b).map_err(|e| e.to_string()))
    }

    #[test]
    fn mutual_pins_connect_and_a_wrong_client_cert_is_refused_in_the_handshake() {
        let (p, pk) = ident("primary");
        let (b, bk) = ident("backup");
        let (_, got) = pair(
            &p,
            (p.clone(), pk.clone_key()),
            (b.clone(), bk.clone_key()),
            b.clone(),
        );
        assert_eq!(got.unwrap(), b"hello");
        // The backup pins someone else: our (valid) certificate is refused.
        let (x, _) = ident("intruder");
        let (_, got) = pair(
            &x,
            (p.clone(), pk.clone_key()),
            (b.clone(), bk.clone_key()),
            b.clone(),
        );
        let e = got.unwrap_err();
        assert!(
            e.contains("TLS handshake") && e.contains("not the pinned one"),
            "{e}"
        );
        // The primary pins someone else: it refuses the backup itself.
        let (c, got) = pair(&p, (p.clone(), pk.clone_key()), (b, bk), x);
        let e = c.err().expect("refused").to_string();
        assert!(e.contains("not the pinned one"), "{e}");
        assert!(got.is_err());
    }

    #[test]
    fn a_read_timeout_works_through_tls_and_the_session_survives_it() {
        let (p, pk) = ident("primary");
        let (b, bk) = ident("backup");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let st = LinkTls::from_der(b.clone(), bk, p.clone());
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            Link::server(s, &st, Duration::from_secs(5)).unwrap()
        });
        let ct = LinkTls::from_der(p, pk, b);
        let c = Link::client(
            TcpStream::connect(addr).unwrap(),
            &ct,
            Duration::from_secs(5),
        )
        .unwrap();
        let s = srv.join().unwrap();
        assert!(s.is_tls() && c.is_tls());
        // The handshake's own timeout was taken off again.
        assert_eq!(s.socket().read_timeout().unwrap(), None);
        s.socket()
            .set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        let (mut r, _) = s.split();
        let t = std::time::Instant::now();
        let mut b = [0u8; 4];
        let e = r.read(&mut b).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e:?}"
        );
        assert!(t.elapsed() >= Duration::from_millis(100));
        // A heartbeat after the timeout still gets through.
        let (_, mut w) = c.split();
        w.write_all(b"beat").unwrap();
        w.flush().unwrap();
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"beat");
    }
}
