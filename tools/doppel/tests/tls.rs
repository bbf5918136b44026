//! The authenticated replication link (issue 22): `doppel keygen`, mutual
//! TLS 1.3 with pinned certificates between real `doppel primary` and
//! `doppel backup` processes over the hypervisor simulator, and the
//! session nonce that makes a replayed stream useless.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doppel::ack::{AckReader, BackMsg};
use doppel::backup::{self, ReceiveError};
use doppel::link::{Link, LinkTls, Pinned, SESSION_NONCE_LEN};
use doppel::replica::Replica;
use doppel::stream::format::feature;
use doppel::stream::StreamWriter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

mod common;
use common::{Proc, BIN};
const PAGES: u64 = 256;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[OsString]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

/// `doppel keygen` for primary, backup and intruder in `dir/keys`.
fn keys(dir: &Path) -> PathBuf {
    let k = dir.join("keys");
    for n in ["primary", "backup", "intruder"] {
        let o = Command::new(BIN)
            .args(["keygen", "--out"])
            .arg(&k)
            .args(["--name", n])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    }
    k
}

/// `--tls-cert K/me.crt --tls-key K/me.key --peer-cert K/peer.crt`.
fn tls(k: &Path, me: &str, peer: &str) -> Vec<OsString> {
    vec![
        "--tls-cert".into(),
        k.join(format!("{me}.crt")).into(),
        "--tls-key".into(),
        k.join(format!("{me}.key")).into(),
        "--peer-cert".into(),
        k.join(format!("{peer}.crt")).into(),
    ]
}

fn der(k: &Path, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    (
        CertificateDer::from_pem_file(k.join(format!("{name}.crt"))).unwrap(),
        PrivateKeyDer::from_pem_file(k.join(format!("{name}.key"))).unwrap(),
    )
}

/// A side's identity pinning `peer`, loaded from the keygen files.
fn side(k: &Path, me: &str, peer: &str) -> LinkTls {
    let (c, key) = der(k, me);
    LinkTls::from_der(c, key, der(k, peer).0)
}

/// A running `doppel backup` into `dir/bk` and the address it listens on.
struct Backup {
    p: Proc,
    addr: String,
}

impl Backup {
    fn start(dir: &Path, extra: &[OsString]) -> Self {
        let mut args: Vec<OsString> = ["backup", "--listen", "127.0.0.1:0", "--replica"]
            .map(OsString::from)
            .to_vec();
        args.push(dir.join("bk").into());
        args.extend(
            [
                "--guest-pages",
                &PAGES.to_string(),
                "--accept-timeout",
                "60",
            ]
            .map(OsString::from),
        );
        args.extend(extra.iter().cloned());
        let p = Proc::spawn("backup", dir, &args);
        let addr = p.addr("listening on ");
        Self { p, addr }
    }

    /// Wait (up to 20 s) for a stderr line containing `pat`.
    fn wait_err(&self, pat: &str) {
        self.p.wait_err(pat, 20);
    }

    fn err_text(&self) -> String {
        self.p.err_lines().join("\n")
    }

    /// How many stderr lines contain `pat`.
    fn err_count(&self, pat: &str) -> usize {
        self.p
            .err_lines()
            .iter()
            .filter(|l| l.contains(pat))
            .count()
    }

    /// Still running (waiting for the primary).
    fn alive(&mut self) -> bool {
        self.p.child.try_wait().unwrap().is_none()
    }

    /// Wait for the exit; (code, stdout, stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        let st = self.p.wait_exit(60);
        (st.code(), self.p.lines().join("\n"), self.err_text())
    }

    fn kill(mut self) {
        self.p.kill9();
    }
}

/// `doppel sim-hv` posting `epochs` checkpoints of a 256-page guest.
fn sim(ram: &Path, epochs: u64) -> Child {
    let c = Command::new(BIN)
        .args(["sim-hv", "--machine-ram"])
        .arg(ram)
        .args([
            "--epochs",
            &epochs.to_string(),
            "--guest-pages",
            &PAGES.to_string(),
            "--dirty",
            "20",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::fs::metadata(ram).map_or(0, |m| m.len()) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "sim-hv did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

/// `doppel primary` of `ram` to `addr` for `epochs` epochs.
fn primary(ram: &Path, addr: &str, epochs: u64, extra: &[OsString]) -> Output {
    let mut a = os(&["primary", "--machine-ram"]);
    a.push(ram.into());
    a.extend(os(&[
        "--backup",
        addr,
        "--epochs",
        &epochs.to_string(),
        "--wait-control",
        "10",
        "--ack-timeout",
        "10",
    ]));
    a.extend_from_slice(extra);
    run(&a)
}

/// Committed epochs of the replica in `dir/bk` (read-only inspect).
fn committed(dir: &Path) -> u64 {
    let o = run(&[
        "inspect".into(),
        "--replica".into(),
        dir.join("bk").into_os_string(),
    ]);
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let n = s
        .split(", ")
        .find_map(|p| p.strip_suffix(" committed epochs"))
        .unwrap_or_else(|| panic!("{s}"));
    n.parse().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn keygen_writes_a_private_pkcs8_key_and_a_certificate_and_never_overwrites() {
    let dir = scratch("keygen");
    let k = dir.join("k");
    let ok = run(&os(&[
        "keygen",
        "--out",
        k.to_str().unwrap(),
        "--name",
        "side-a7",
    ]));
    assert!(ok.status.success(), "{}", text(&ok));
    let key = std::fs::read_to_string(k.join("side-a7.key")).unwrap();
    let crt = std::fs::read_to_string(k.join("side-a7.crt")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"), "{crt}");
    let mode = std::fs::metadata(k.join("side-a7.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The certificate names the side (its SAN), and key and certificate
    // belong together (a link side loads them).
    let (c, _) = der(&k, "side-a7");
    assert!(c.as_ref().windows(7).any(|w| w == b"side-a7"));
    side(&k, "side-a7", "side-a7").client_config().unwrap();
    // A second run refuses, and leaves both files as they were.
    let again = run(&os(&[
        "keygen",
        "--out",
        k.to_str().unwrap(),
        "--name",
        "side-a7",
    ]));
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(k.join("side-a7.key")).unwrap(), key);
    // A name that is not a plain file name is a usage error.
    let bad = run(&os(&[
        "keygen",
        "--out",
        k.to_str().unwrap(),
        "--name",
        "../x",
    ]));
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    // A key that is not the certificate's is refused when loaded.
    let (c, _) = der(&k, "side-a7");
    let other = rcgen::KeyPair::generate().unwrap();
    let t = LinkTls::from_der(
        c.clone(),
        PrivateKeyDer::try_from(other.serialize_der()).unwrap(),
        c,
    );
    assert!(t.client_config().is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_flags_go_together_and_not_with_a_capture() {
    let dir = scratch("flags");
    let k = keys(&dir);
    let cert = k.join("backup.crt");
    let one = run(&[
        "backup".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--replica".into(),
        dir.join("bk").into(),
        "--guest-pages".into(),
        "16".into(),
        "--tls-cert".into(),
        cert.clone().into(),
    ]);
    assert_eq!(one.status.code(), Some(2), "{}", text(&one));
    assert!(
        text(&one).contains("missing --tls-key and --peer-cert"),
        "{}",
        text(&one)
    );
    let mut rec = os(&["primary", "--machine-ram", "/nonexistent", "--record"]);
    rec.push(dir.join("c.xen").into());
    rec.extend(tls(&k, "primary", "backup"));
    let o = run(&rec);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("a --record capture has none"),
        "{}",
        text(&o)
    );
    // A certificate file that is not one.
    let mut bad = os(&[
        "primary",
        "--machine-ram",
        "/nonexistent",
        "--backup",
        "127.0.0.1:9",
    ]);
    bad.extend(tls(&k, "primary", "backup"));
    bad[6] = k.join("primary.key").into();
    let o = run(&bad);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a PEM certificate"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pinned_certificates_replicate_and_wrong_ones_are_refused_in_the_handshake() {
    let dir = scratch("pins");
    let k = keys(&dir);
    let ram = dir.join("m.ram");
    let mut simc = sim(&ram, 3);
    let mut bk = Backup::start(&dir, &tls(&k, "backup", "primary"));
    // An intruder with a valid certificate of its own.
    let bad = primary(&ram, &bk.addr, 3, &tls(&k, "intruder", "backup"));
    assert_eq!(bad.status.code(), Some(5), "{}", text(&bad));
    assert!(text(&bad).contains("fatal alert"), "{}", text(&bad));
    bk.wait_err("rejected: TLS handshake");
    assert!(bk
        .err_text()
        .contains("its certificate is not the pinned one"));
    // A primary that pins another backup refuses this one itself.
    let wary = primary(&ram, &bk.addr, 3, &tls(&k, "primary", "intruder"));
    assert_eq!(wary.status.code(), Some(5), "{}", text(&wary));
    assert!(
        text(&wary).contains("its certificate is not the pinned one"),
        "{}",
        text(&wary)
    );
    assert!(bk.alive(), "{}", bk.err_text());
    assert_eq!(committed(&dir), 0);
    // The real primary: replicated over TLS, every epoch.
    let good = primary(&ram, &bk.addr, 3, &tls(&k, "primary", "backup"));
    assert!(good.status.success(), "{}", text(&good));
    assert!(text(&good).contains("primary: committed 3 epochs"));
    let (code, out, err) = bk.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("backup: last committed epoch 2 (3 epochs)"),
        "{out}"
    );
    assert!(err.contains("mutual TLS 1.3"), "{err}");
    assert_eq!(committed(&dir), 3);
    let _ = simc.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS client that presents no certificate (pins the backup, though).
fn connect_without_certificate(addr: &str, k: &Path) -> std::io::Result<Vec<u8>> {
    let cfg = rustls::ClientConfig::builder_with_provider(doppel::link::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(der(k, "backup").0)))
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("x").unwrap()).unwrap();
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(got)
}

#[test]
fn no_certificate_and_no_tls_are_refused_and_the_backup_keeps_waiting() {
    let dir = scratch("nocert");
    let k = keys(&dir);
    let mut extra = tls(&k, "backup", "primary");
    extra.extend(os(&["--tls-handshake-timeout", "0.5"]));
    let mut bk = Backup::start(&dir, &extra);
    // TLS, but no certificate: nothing of the stream ever comes back.
    let r = connect_without_certificate(&bk.addr, &k);
    assert!(r.is_err(), "{r:?}");
    bk.wait_err("it presented no certificate");
    // A capture sent in the clear (a primary without TLS).
    let cap = dir.join("synth.xen");
    let o = run(&[
        "stream".into(),
        "synth".into(),
        "--epochs".into(),
        "2".into(),
        "--pages".into(),
        PAGES.to_string().into(),
        "--out".into(),
        cap.clone().into(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let mut s = TcpStream::connect(&bk.addr).unwrap();
    let _ = s.write_all(&std::fs::read(&cap).unwrap());
    bk.wait_err("it does not speak TLS 1.3");
    // Connected and silent (a plain primary waits for the back channel).
    let quiet = TcpStream::connect(&bk.addr).unwrap();
    bk.wait_err("no TLS handshake within 0.5 s");
    drop(quiet);
    assert_eq!(bk.err_count("link: rejected"), 3, "{}", bk.err_text());
    assert!(bk.alive(), "{}", bk.err_text());
    assert_eq!(committed(&dir), 0, "nothing of the refused peers applied");
    // And still listening for the real primary.
    let ram = dir.join("m.ram");
    let mut simc = sim(&ram, 2);
    // With --compress: the hello follows the session record both ways.
    let mut flags = tls(&k, "primary", "backup");
    flags.push("--compress".into());
    let good = primary(&ram, &bk.addr, 2, &flags);
    assert!(good.status.success(), "{}", text(&good));
    assert!(text(&good).contains("(xlz4)"), "{}", text(&good));
    let (code, out, err) = bk.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("(2 epochs)"), "{out}");
    let _ = simc.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reader that keeps a copy of every byte it hands out.
struct Tee<R> {
    r: R,
    copy: Arc<Mutex<Vec<u8>>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.copy.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Play a valid TLS primary (the primary's own certificate) that sends
/// `bytes` instead of a live stream; returns what the back channel said.
fn replay(addr: &str, k: &Path, bytes: &[u8]) -> String {
    let link = Link::client(
        TcpStream::connect(addr).unwrap(),
        &side(k, "primary", "backup"),
        Duration::from_secs(10),
    )
    .unwrap();
    link.socket()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (rd, mut wr) = link.split();
    let mut acks = AckReader::open(std::io::BufReader::new(rd), 0).unwrap();
    // The backup's fresh nonce: what a replay cannot answer.
    assert!(matches!(acks.next_msg(), Ok(BackMsg::Session(_))));
    let _ = wr.write_all(bytes).and_then(|_| wr.flush());
    format!("{:?}", acks.next_msg())
}

#[test]
fn a_replayed_stream_is_refused_before_anything_is_applied() {
    let dir = scratch("replay");
    let k = keys(&dir);
    let ram = dir.join("m.ram");
    let mut simc = sim(&ram, 6);
    // Session 1, genuine: a real TLS primary to a backup that keeps the
    // plaintext it received (what a peer holding a valid certificate, or
    // a compromised earlier backup, could have).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let bside = side(&k, "backup", "primary");
    let rdir = dir.join("r1");
    std::fs::create_dir_all(&rdir).unwrap();
    let mut rep = Replica::open_file(&rdir.join("memory.img"), PAGES).unwrap();
    let copy = Arc::new(Mutex::new(Vec::new()));
    let c2 = Arc::clone(&copy);
    let recorder = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let link = Link::server(s, &bside, Duration::from_secs(10)).unwrap();
        let (rd, wr) = link.split();
        let n = doppel::link::nonce().unwrap();
        let got = backup::serve_session(
            Tee { r: rd, copy: c2 },
            wr,
            &mut rep,
            feature::KNOWN,
            Some(n),
            |_| {},
        )
        .unwrap();
        assert!(got.error.is_none(), "{:?}", got.error);
        got.epochs.len()
    });
    let one = primary(&ram, &addr, 3, &tls(&k, "primary", "backup"));
    assert!(one.status.success(), "{}", text(&one));
    assert_eq!(recorder.join().unwrap(), 3);
    let session1 = copy.lock().unwrap().clone();
    // Session 2: a capture (`--record`), the other kind of recorded bytes.
    let cap = dir.join("cap.xen");
    let mut rec = os(&["primary", "--machine-ram"]);
    rec.push(ram.clone().into());
    rec.extend(os(&["--epochs", "3", "--wait-control", "10", "--record"]));
    rec.push(cap.clone().into());
    let two = run(&rec);
    assert!(two.status.success(), "{}", text(&two));
    // The capture stays Xen-valid: no session record in it.
    let v = run(&[
        "stream".into(),
        "verify".into(),
        cap.clone().into(),
        "--guest-pages".into(),
        PAGES.to_string().into(),
    ]);
    assert!(v.status.success(), "{}", text(&v));
    let capture = std::fs::read(&cap).unwrap();
    let session_type = (0x80D0_0005u32).to_le_bytes();
    assert!(!capture.windows(4).any(|w| w == session_type));
    assert!(session1.windows(4).any(|w| w == session_type));
    // Both replayed to a real backup over new TLS connections, with the
    // primary's valid certificate: refused, nothing applied.
    let mut bk = Backup::start(&dir, &tls(&k, "backup", "primary"));
    // Each refusal is logged twice (the receive's reason, then the
    // link's verdict): wait for the verdict, the later line, before
    // counting them (waiting for the reason raced with the count).
    let said = replay(&bk.addr, &k, &session1);
    assert!(!said.contains("Ack"), "{said}");
    bk.wait_err(
        "link: rejected the stream: session check failed: DOPPEL_SESSION carries another nonce",
    );
    let said = replay(&bk.addr, &k, &capture);
    assert!(!said.contains("Ack"), "{said}");
    bk.wait_err("link: rejected the stream: session check failed: the first record is");
    assert_eq!(
        bk.err_count("link: rejected the stream"),
        2,
        "{}",
        bk.err_text()
    );
    assert!(bk.alive(), "{}", bk.err_text());
    assert_eq!(committed(&dir), 0, "the replica is unchanged");
    bk.kill();
    let _ = simc.kill();
    let _ = simc.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stream bytes: headers, then `first` records, STATIC_DATA_END.
fn stream_with(first: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.headers(doppel::primary::XEN_MAJOR, doppel::primary::XEN_MINOR)
        .unwrap();
    first(&mut w);
    w.static_data_end().unwrap();
    w.end().unwrap();
    w.flush().unwrap();
    std::mem::take(w.get_mut())
}

#[test]
fn the_session_record_must_come_first_and_carry_this_connections_nonce() {
    let dir = scratch("records");
    let mut rep = Replica::open_file(&dir.join("memory.img"), 16).unwrap();
    let n = [7u8; SESSION_NONCE_LEN];
    let ok = stream_with(|w| {
        w.session(&n).unwrap();
        w.hello(feature::XLZ4).unwrap();
    });
    let got = backup::receive_session(&ok[..], &mut rep, 0, n, |_| Ok(()));
    assert!(got.error.is_none(), "{:?}", got.error);
    assert!(got.ended);
    let wrong = backup::receive_session(&ok[..], &mut rep, 0, [8; SESSION_NONCE_LEN], |_| Ok(()));
    assert!(
        matches!(&wrong.error, Some(ReceiveError::Session(m)) if m.contains("another nonce")),
        "{:?}",
        wrong.error
    );
    // After the hello it is out of order; and a session record where no
    // nonce was sent is refused.
    let late = stream_with(|w| {
        w.hello(0).unwrap();
        w.session(&n).unwrap();
    });
    let got = backup::receive_session(&late[..], &mut rep, 0, n, |_| Ok(()));
    assert!(
        matches!(got.error, Some(ReceiveError::Session(_))),
        "{:?}",
        got.error
    );
    let got = backup::receive_negotiated(&ok[..], &mut rep, 0, |_| Ok(()));
    assert!(
        matches!(got.error, Some(ReceiveError::Session(_))),
        "{:?}",
        got.error
    );
    // The back channel: DOPPEL_FEATURES may follow DOPPEL_SESSION, and
    // DOPPEL_SESSION is only the first record.
    let mut back = Vec::new();
    {
        let mut a = doppel::ack::AckWriter::new(&mut back).unwrap();
        a.session(&n).unwrap();
        a.features(0).unwrap();
        a.ack(0).unwrap();
        a.end().unwrap();
    }
    let mut r = AckReader::open(&back[..], 0).unwrap();
    assert_eq!(r.next_msg().unwrap(), BackMsg::Session(n));
    assert_eq!(r.next_msg().unwrap(), BackMsg::Features(0));
    assert_eq!(r.next_msg().unwrap(), BackMsg::Ack(0));
    let mut back = Vec::new();
    {
        let mut a = doppel::ack::AckWriter::new(&mut back).unwrap();
        a.features(0).unwrap();
        a.session(&n).unwrap();
    }
    let mut r = AckReader::open(&back[..], 0).unwrap();
    assert_eq!(r.next_msg().unwrap(), BackMsg::Features(0));
    assert!(r.next_msg().is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_standby_fails_over_when_the_tls_stream_goes_silent() {
    // The protected KV service over a TLS link: heartbeats and the
    // standby's --heartbeat-timeout (a socket read timeout) work through
    // TLS. The primary tool is frozen (SIGSTOP): the link stays open but
    // silent, the standby activates, the client fails over and loses
    // nothing.
    let dir = scratch("standby");
    let k = keys(&dir);
    let sim_args = |ram: &str, mode: &[&str]| {
        let mut a = os(&["sim-hv", "--machine-ram", ram]);
        a.extend(os(mode));
        a.extend(os(&[
            "--keys",
            "16",
            "--guest-pages",
            "64",
            "--max-secs",
            "60",
        ]));
        a
    };
    let sp = Proc::spawn(
        "sim primary",
        &dir,
        &sim_args("p.ram", &["--service", "kv", "--epoch-ms", "20"]),
    );
    sp.wait_out("kv service control area published", 20);
    let ss = Proc::spawn("sim standby", &dir, &sim_args("s.ram", &["--standby"]));
    ss.wait_out("standby control area published", 20);
    let mut b = os(&[
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--standby-ram",
        "s.ram",
        "--serve-clients",
        "127.0.0.1:0",
        "--heartbeat-timeout",
        "1.5",
    ]);
    b.extend(tls(&k, "backup", "primary"));
    let bk = Proc::spawn("backup", &dir, &b);
    let listen = bk.addr("listening on ");
    let bclients = bk.addr("clients on ");
    let mut p = os(&["--heartbeat-ms", "20", "--ack-timeout", "4"]);
    p.extend(tls(&k, "primary", "backup"));
    let (pr, pclients) = common::spawn_primary(&dir, "p.ram", &listen, &p);
    let client = common::failing_over_client(&dir, &pclients, "4000", &bclients);
    // Epochs went through TLS, then heartbeats keep the link alive.
    bk.wait_err("backup: committed epoch 3 ", 20);
    let st = Command::new("kill")
        .args(["-STOP", &pr.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let fail = bk.wait_out("failover: ", 20);
    assert!(
        fail.contains("primary lost (nothing received for 1.5 s)"),
        "{fail}"
    );
    let last = client.wait_out("client: ops=", 20);
    assert!(
        last.contains("answered=4000")
            && last.contains(" failovers=1 lost_acked=0 divergent=0 ")
            && last.ends_with("result=pass"),
        "{last}\n{}",
        client.err_lines().join("\n")
    );
    assert!(bk.err_lines().iter().any(|l| l.contains("mutual TLS 1.3")));
    let _ = Command::new("kill")
        .args(["-CONT", &pr.child.id().to_string()])
        .status();
    drop((client, pr, bk, ss, sp));
    let _ = std::fs::remove_dir_all(&dir);
}
