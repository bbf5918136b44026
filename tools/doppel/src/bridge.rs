//! The client bridge of `doppel primary --serve-clients` and `doppel
//! backup --serve-clients`: one TCP client at a time (a new connection
//! replaces the old one), its request frames written into the control
//! area's input channel, the reply frames found in the output channel sent
//! back.
//!
//! Threads (all inside one `std::thread::scope`):
//! - accept: takes connections, replaces the current client, starts a
//!   reader for it;
//! - reader (per connection): reads 32-byte frames; each must parse as a
//!   [`Request`] (a malformed frame drops the connection with a logged
//!   reason); writes it into `in_chan` as one record (epoch field 0),
//!   polling while the channel is full;
//! - drainer: polls `out_chan` and writes each record to the current
//!   client. With no client (or a write error) replies are dropped and
//!   counted: the client re-sends, and the service answers from its replay
//!   cache.
//!
//! It cannot be frozen by a client: every client socket has TCP keepalive
//! and a write timeout ([`WRITE_TIMEOUT`]); a client's replies are
//! buffered only in its socket's send buffer plus one drain's worth of
//! records, and a client that does not take them within the timeout is
//! dropped (the replies counted as dropped), never waited for. Writes
//! happen outside the bridge's lock, so accepting a new client never waits
//! for a write. The accept loop outlives a full fd table (EMFILE, ENFILE)
//! and other transient accept errors: it logs, backs off and goes on.
//!
//! The hypervisor releases output into `out_chan` only once the epoch that
//! produced it is committed (`CommitEpoch`), so what the drainer finds
//! there is safe to send, with one exception: records tagged
//! [`UNPROTECTED_EPOCH`] were released by a `Detach` (never committed, for
//! an earlier tool's clients) or made while no tool protected the guest.
//! They are dropped and counted, never sent.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doppel_abi::chan::{ChannelConsumer, ChannelError, ChannelProducer};
use doppel_abi::msg::UNPROTECTED_EPOCH;
use doppel_abi::service::Request;
use doppel_abi::SharedMem;

/// Size of a request frame.
pub const REQUEST_LEN: usize = core::mem::size_of::<Request>();

/// Longest a write of replies to a client may block: a client whose
/// socket buffer stays full this long does not read, and is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest pause of the accept loop after a transient accept error.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where the bridge takes its clients from: a [`TcpListener`], or a test's
/// stand-in that fails on purpose.
pub trait Acceptor: Sync {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
    fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)>;
}

impl Acceptor for TcpListener {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        TcpListener::set_nonblocking(self, on)
    }
    fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        TcpListener::accept(self)
    }
}

/// Accept errors that pass: out of file descriptors (process or system),
/// buffers or memory, a connection that died in the backlog. The loop
/// backs off and tries again; anything else stops the bridge.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ETIMEDOUT
        )
    )
}

/// Counters of a bridge, readable while it runs.
#[derive(Debug, Default)]
pub struct BridgeStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub replies: AtomicU64,
    /// Replies drained with no client to send them to.
    pub dropped: AtomicU64,
    /// Connections dropped for a malformed frame.
    pub refused: AtomicU64,
    /// Clients dropped because they did not take their replies within
    /// [`WRITE_TIMEOUT`].
    pub stalled: AtomicU64,
    /// Accept errors the loop outlived (EMFILE, ENFILE, ...).
    pub accept_errors: AtomicU64,
}

struct Current {
    /// Connection generation: a reader whose generation is not the
    /// current one stops.
    generation: u64,
    writer: Option<Arc<TcpStream>>,
}

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("input channel: {0:?}")]
    InChan(ChannelError),
    #[error("output channel: {0:?}")]
    OutChan(ChannelError),
    #[error("accepting clients: {0}")]
    Accept(std::io::Error),
}

/// Run the bridge until `stop` is set or a channel breaks the protocol.
/// `in_chan` / `out_chan` are the control area's channels (tool side).
pub fn serve<M: SharedMem + Send, L: Acceptor>(
    listener: &L,
    in_chan: ChannelProducer<M>,
    mut out_chan: ChannelConsumer<M>,
    stop: &AtomicBool,
    stats: &BridgeStats,
) -> Result<(), BridgeError> {
    listener
        .set_nonblocking(true)
        .map_err(BridgeError::Accept)?;
    let current = Arc::new(Mutex::new(Current {
        generation: 0,
        writer: None,
    }));
    let input = Mutex::new(in_chan);
    let failed: Mutex<Option<BridgeError>> = Mutex::new(None);
    std::thread::scope(|s| {
        let (current, input, failed) = (&current, &input, &failed);
        // Accept loop.
        s.spawn(move || {
            let mut backoff = Duration::from_millis(10);
            let mut said = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        backoff = Duration::from_millis(10);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_nodelay(true);
                        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
                        crate::keepalive::enable(&conn);
                        let Ok(w) = conn.try_clone() else { continue };
                        let w = Arc::new(w);
                        let generation = {
                            let mut c = current.lock().expect("bridge lock");
                            if let Some(old) = c.writer.take() {
                                tracing::info!("client {peer} replaces the previous client");
                                let _ = old.shutdown(Shutdown::Both);
                            }
                            c.generation += 1;
                            c.writer = Some(w);
                            c.generation
                        };
                        stats.connections.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("client connected from {peer}");
                        s.spawn(move || {
                            if let Err(e) = reader(conn, generation, current, input, stop, stats) {
                                failed.lock().expect("bridge lock").get_or_insert(e);
                                stop.store(true, Ordering::Relaxed);
                            }
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if transient(&e) => {
                        let n = stats.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
                        // Bounded noise: the first error, then one line per
                        // 100.
                        if said == 0 || n >= said + 100 {
                            tracing::warn!(
                                "accepting clients: {e} ({n} so far); backing off {} ms",
                                backoff.as_millis()
                            );
                            said = n;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                    Err(e) => {
                        failed
                            .lock()
                            .expect("bridge lock")
                            .get_or_insert(BridgeError::Accept(e));
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
        // Drainer (this thread).
        let mut buf = vec![0u8; out_chan.layout().capacity() as usize];
        let mut idle = 0u32;
        while !stop.load(Ordering::Relaxed) {
            match drain(&mut out_chan, &mut buf, current, stats) {
                Ok(0) => {
                    idle += 1;
                    if idle > 200 {
                        std::thread::sleep(Duration::from_millis(1));
                    } else {
                        std::thread::yield_now();
                    }
                }
                Ok(_) => idle = 0,
                Err(e) => {
                    failed.lock().expect("bridge lock").get_or_insert(e);
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }
        // Wake the readers: shut the current connection.
        if let Some(w) = current.lock().expect("bridge lock").writer.take() {
            let _ = w.shutdown(Shutdown::Both);
        }
    });
    match failed.into_inner().expect("bridge lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Move every record in `out_chan` to the current client; the number
/// moved.
fn drain<M: SharedMem>(
    out_chan: &mut ChannelConsumer<M>,
    buf: &mut [u8],
    current: &Mutex<Current>,
    stats: &BridgeStats,
) -> Result<u64, BridgeError> {
    let (mut n, mut stale) = (0u64, 0u64);
    let mut bytes = Vec::new();
    while let Some(info) = out_chan.pop(buf).map_err(BridgeError::OutChan)? {
        if info.epoch == UNPROTECTED_EPOCH {
            stale += 1;
            continue;
        }
        bytes.extend_from_slice(&buf[..info.len]);
        n += 1;
    }
    if stale > 0 {
        out_chan.publish();
        stats.dropped.fetch_add(stale, Ordering::Relaxed);
        tracing::info!("{stale} unprotected replies (not committed) dropped, not sent");
    }
    if n == 0 {
        return Ok(0);
    }
    out_chan.publish();
    // Write outside the lock: a new client is accepted meanwhile (and
    // shuts this one down, which ends the write at once).
    let (generation, writer) = {
        let c = current.lock().expect("bridge lock");
        (c.generation, c.writer.clone())
    };
    let mut stalled = false;
    let sent = match writer {
        Some(w) => match (&*w).write_all(&bytes) {
            Ok(()) => true,
            Err(e) => {
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                    stalled = true;
                    tracing::warn!(
                        "client does not read its replies (none taken for {} s); \
                         dropped with {n} replies",
                        WRITE_TIMEOUT.as_secs()
                    );
                } else {
                    tracing::info!("client gone ({e}); {n} replies dropped");
                }
                let _ = w.shutdown(Shutdown::Both);
                let mut c = current.lock().expect("bridge lock");
                if c.generation == generation {
                    c.writer = None;
                }
                false
            }
        },
        None => false,
    };
    if sent {
        stats.replies.fetch_add(n, Ordering::Relaxed);
    } else {
        let total = stats.dropped.fetch_add(n, Ordering::Relaxed) + n;
        tracing::debug!("no client: {n} replies dropped ({total} so far)");
    }
    // Counted once its replies are: whoever sees the stall (Acquire) sees
    // them dropped.
    if stalled {
        stats.stalled.fetch_add(1, Ordering::Release);
    }
    Ok(n)
}

/// Read one connection's frames into the input channel.
fn reader<M: SharedMem>(
    mut conn: TcpStream,
    generation: u64,
    current: &Mutex<Current>,
    input: &Mutex<ChannelProducer<M>>,
    stop: &AtomicBool,
    stats: &BridgeStats,
) -> Result<(), BridgeError> {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let is_current = || current.lock().expect("bridge lock").generation == generation;
    let mut frame = [0u8; REQUEST_LEN];
    let mut have = 0usize;
    let drop_conn = |conn: &TcpStream, why: String| {
        tracing::warn!("client {peer}: {why}; connection dropped");
        let mut c = current.lock().expect("bridge lock");
        if c.generation == generation {
            if let Some(w) = c.writer.take() {
                let _ = w.shutdown(Shutdown::Both);
            }
        }
        let _ = conn.shutdown(Shutdown::Both);
    };
    loop {
        if stop.load(Ordering::Relaxed) || !is_current() {
            return Ok(());
        }
        match conn.read(&mut frame[have..]) {
            Ok(0) => {
                if have != 0 {
                    drop_conn(
                        &conn,
                        format!("connection closed inside a frame ({have} bytes)"),
                    );
                } else {
                    tracing::info!("client {peer} closed the connection");
                }
                return Ok(());
            }
            Ok(n) => have += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::info!("client {peer}: {e}");
                return Ok(());
            }
        }
        if have < REQUEST_LEN {
            continue;
        }
        have = 0;
        let Some(req) = Request::parse(&frame) else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop_conn(
                &conn,
                format!(
                    "malformed request frame (magic {:#010x}, expected {:#010x})",
                    u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]),
                    doppel_abi::service::REQ_MAGIC
                ),
            );
            return Ok(());
        };
        loop {
            if stop.load(Ordering::Relaxed) || !is_current() {
                return Ok(());
            }
            let mut p = input.lock().expect("bridge lock");
            match p.write_record(0, &frame) {
                Ok(()) => {
                    p.publish();
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!("request {} into the input channel", req.id);
                    break;
                }
                Err(ChannelError::Full) => {
                    drop(p);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(BridgeError::InChan(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::chan::ChannelLayout;
    use doppel_abi::AtomicMem64;
    use std::sync::atomic::AtomicU64 as Word;

    #[test]
    fn drain_sends_committed_replies_and_drops_unprotected_ones() {
        let words: Vec<Word> = (0..(64 + 1024) / 8).map(|_| Word::new(0)).collect();
        let mem = AtomicMem64::new(&words);
        let size = mem.size();
        ChannelLayout::new(size, 0, size).unwrap().init_shared(&mem);
        let mut hv = ChannelProducer::attach(&mem, 0, size).unwrap();
        hv.write_record(3, b"committed-a").unwrap();
        hv.write_record(UNPROTECTED_EPOCH, b"never-committed")
            .unwrap();
        hv.write_record(4, b"committed-b").unwrap();
        hv.publish();

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let current = Mutex::new(Current {
            generation: 1,
            writer: Some(Arc::new(server)),
        });
        let stats = BridgeStats::default();
        let mut out = ChannelConsumer::attach(&mem, 0, size).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(drain(&mut out, &mut buf, &current, &stats).unwrap(), 2);
        assert_eq!(stats.replies.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
        // The client got exactly the committed bytes, in order.
        drop(current);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"committed-acommitted-b");
        // All three records' space went back to the producer.
        assert_eq!(hv.free().unwrap(), hv.layout().capacity());
    }

    /// Sets the bridge's stop flag when dropped: a failing assertion ends
    /// the bridge too, so the test reports instead of hanging in the
    /// scope's join.
    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// A channel of `bytes` in its own memory: (producer, consumer).
    fn chan(
        words: &[Word],
    ) -> (
        ChannelProducer<AtomicMem64<'_>>,
        ChannelConsumer<AtomicMem64<'_>>,
    ) {
        let mem = AtomicMem64::new(words);
        let size = mem.size();
        ChannelLayout::new(size, 0, size).unwrap().init_shared(&mem);
        (
            ChannelProducer::attach(mem, 0, size).unwrap(),
            ChannelConsumer::attach(mem, 0, size).unwrap(),
        )
    }

    fn words(bytes: usize) -> Vec<Word> {
        (0..bytes / 8).map(|_| Word::new(0)).collect()
    }

    fn request(id: u64) -> [u8; REQUEST_LEN] {
        let mut f = [0u8; REQUEST_LEN];
        f[..4].copy_from_slice(&doppel_abi::service::REQ_MAGIC.to_le_bytes());
        f[8..16].copy_from_slice(&id.to_le_bytes());
        assert!(Request::parse(&f).is_some());
        f
    }

    /// Play the hypervisor for one request: take it from `inp`, answer
    /// `reply` on `out`; true once done within `secs`.
    fn answer_one(
        inp: &mut ChannelConsumer<AtomicMem64<'_>>,
        out: &mut ChannelProducer<AtomicMem64<'_>>,
        reply: &[u8],
        secs: u64,
    ) -> bool {
        let t = std::time::Instant::now();
        let mut buf = [0u8; 64];
        while t.elapsed() < Duration::from_secs(secs) {
            if inp.pop(&mut buf).unwrap().is_some() {
                inp.publish();
                out.write_record(1, reply).unwrap();
                out.publish();
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn read_exact_within(c: &mut TcpStream, n: usize, secs: u64) -> Option<Vec<u8>> {
        c.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
        let mut got = vec![0u8; n];
        c.read_exact(&mut got).ok().map(|_| got)
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_and_the_next_one_is_served() {
        let (iw, ow) = (words(4096 + 64), words(65536 + 64));
        let (tool_in, mut hv_in) = chan(&iw);
        let (mut hv_out, tool_out) = chan(&ow);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, stats) = (AtomicBool::new(false), BridgeStats::default());
        std::thread::scope(|s| {
            let bridge = s.spawn(|| serve(&l, tool_in, tool_out, &stop, &stats));
            let _stop = StopOnDrop(&stop);
            let stuck = TcpStream::connect(addr).unwrap();
            while stats.connections.load(Ordering::Relaxed) < 1 {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Replies for it, far more than any socket buffer holds.
            let rec = [0x42u8; 200];
            let t = std::time::Instant::now();
            let mut pushed = 0u64;
            while stats.stalled.load(Ordering::Acquire) == 0
                && t.elapsed() < Duration::from_secs(30)
            {
                match hv_out.write_record(1, &rec) {
                    Ok(()) => {
                        hv_out.publish();
                        pushed += 1;
                    }
                    Err(ChannelError::Full) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("{e:?}"),
                }
            }
            let stalled = stats.stalled.load(Ordering::Acquire);
            // Unblock a bridge stuck writing before asserting (so a
            // failure is reported, not hung on).
            drop(stuck);
            assert_eq!(stalled, 1, "the client that never reads was not dropped");
            assert!(stats.dropped.load(Ordering::Relaxed) > 0);
            // The output channel drains on (nobody waits for that client).
            let t = std::time::Instant::now();
            while hv_out.free().unwrap() != hv_out.layout().capacity() {
                assert!(t.elapsed() < Duration::from_secs(5), "output not drained");
                std::thread::sleep(Duration::from_millis(5));
            }
            // The next client is served.
            let mut good = TcpStream::connect(addr).unwrap();
            good.write_all(&request(1)).unwrap();
            assert!(answer_one(&mut hv_in, &mut hv_out, b"reply-for-1", 5));
            assert_eq!(
                read_exact_within(&mut good, 11, 5).as_deref(),
                Some(&b"reply-for-1"[..])
            );
            assert!(pushed > 0);
            stop.store(true, Ordering::Relaxed);
            bridge.join().unwrap().unwrap();
        });
    }

    /// A listener whose first `fails` accepts fail with `errno`.
    struct Flaky {
        inner: TcpListener,
        fails: AtomicU64,
        errno: i32,
    }

    impl Acceptor for Flaky {
        fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
            self.inner.set_nonblocking(on)
        }
        fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
            if self
                .fails
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(std::io::Error::from_raw_os_error(self.errno));
            }
            self.inner.accept()
        }
    }

    #[test]
    fn the_accept_loop_outlives_a_full_fd_table() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            let (iw, ow) = (words(4096 + 64), words(4096 + 64));
            let (tool_in, mut hv_in) = chan(&iw);
            let (mut hv_out, tool_out) = chan(&ow);
            let l = Flaky {
                inner: TcpListener::bind("127.0.0.1:0").unwrap(),
                fails: AtomicU64::new(6),
                errno,
            };
            let addr = l.inner.local_addr().unwrap();
            let (stop, stats) = (AtomicBool::new(false), BridgeStats::default());
            std::thread::scope(|s| {
                let bridge = s.spawn(|| serve(&l, tool_in, tool_out, &stop, &stats));
                let _stop = StopOnDrop(&stop);
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&request(7)).unwrap();
                let answered = answer_one(&mut hv_in, &mut hv_out, b"seven", 10);
                let got = read_exact_within(&mut c, 5, 5);
                stop.store(true, Ordering::Relaxed);
                let r = bridge.join().unwrap();
                assert!(r.is_ok(), "errno {errno}: the bridge stopped: {r:?}");
                assert!(answered, "errno {errno}: the request never arrived");
                assert_eq!(got.as_deref(), Some(&b"seven"[..]), "errno {errno}");
                assert_eq!(stats.accept_errors.load(Ordering::Relaxed), 6);
            });
        }
    }
}
