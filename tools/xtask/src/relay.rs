//! A TCP relay for the replication link that a test can cut.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::Result;

/// A TCP relay for the replication link: forwards both ways until cut;
/// cut, it stops reading and writing but keeps both connections open, as a
/// network partition would.
pub(crate) struct Relay {
    pub(crate) addr: String,
    /// Both directions.
    pub(crate) cut: Arc<AtomicBool>,
    /// One direction only: primary to backup (the stream), backup to
    /// primary (the acks).
    pub(crate) cut_fwd: Arc<AtomicBool>,
    pub(crate) cut_back: Arc<AtomicBool>,
}

impl Relay {
    pub(crate) fn start(target: &str) -> Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (cut_fwd, cut_back) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let target = target.to_string();
        let c = cut.clone();
        let (cf, cb) = (Arc::clone(&cut_fwd), Arc::clone(&cut_back));
        thread::spawn(move || {
            let Ok((a, _)) = l.accept() else { return };
            let Ok(b) = TcpStream::connect(&target) else {
                return;
            };
            for (from, to, one) in [(&a, &b, &cf), (&b, &a, &cb)] {
                let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                    return;
                };
                let (both, one) = (c.clone(), Arc::clone(one));
                let c = move || both.load(Ordering::SeqCst) || one.load(Ordering::SeqCst);
                thread::spawn(move || {
                    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        if c() {
                            // Partitioned: hold the sockets, move nothing.
                            thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                        match from.read(&mut buf) {
                            Ok(0) => {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                if c() || to.write_all(&buf[..n]).is_err() {
                                    continue;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            // Reset: a process killed with unread data in
                            // its socket resets it. Over a direct link the
                            // peer would see that at once; pass it on as a
                            // close, not as silence until the heartbeat
                            // timeout.
                            Err(_) => {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                        }
                    }
                });
            }
            // Keep both ends alive for the life of the process.
            let _keep = (a, b);
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        });
        Ok(Self {
            addr,
            cut,
            cut_fwd,
            cut_back,
        })
    }
}
