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
//! The hypervisor releases output into `out_chan` only once the epoch that
//! produced it is committed (`CommitEpoch`), so what the drainer finds
//! there is safe to send, with one exception: records tagged
//! [`UNPROTECTED_EPOCH`] were released by a `Detach` (never committed, for
//! an earlier tool's clients) or made while no tool protected the guest.
//! They are dropped and counted, never sent.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doppel_abi::chan::{ChannelConsumer, ChannelError, ChannelProducer};
use doppel_abi::msg::UNPROTECTED_EPOCH;
use doppel_abi::service::Request;
use doppel_abi::SharedMem;

/// Size of a request frame.
pub const REQUEST_LEN: usize = core::mem::size_of::<Request>();

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
}

struct Current {
    /// Connection generation: a reader whose generation is not the
    /// current one stops.
    generation: u64,
    writer: Option<TcpStream>,
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
pub fn serve<M: SharedMem + Send>(
    listener: &TcpListener,
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
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_nodelay(true);
                        let Ok(w) = conn.try_clone() else { continue };
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
    let mut c = current.lock().expect("bridge lock");
    let sent = match &mut c.writer {
        Some(w) => match w.write_all(&bytes) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!("client gone ({e}); {n} replies dropped");
                let _ = w.shutdown(Shutdown::Both);
                c.writer = None;
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
            writer: Some(server),
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
}
