//! TCP keepalive on the tool's sockets: a peer host that vanished (power
//! off, cable cut) is noticed by the kernel within about 25 s even on a
//! connection nobody writes to, instead of never.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Idle seconds before the first probe, seconds between probes, probes.
const IDLE_SECS: libc::c_int = 10;
const INTERVAL_SECS: libc::c_int = 5;
const PROBES: libc::c_int = 3;

fn set(s: &TcpStream, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> bool {
    let len = core::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `s` owns an open socket for the whole call; the option value
    // is a live c_int on this stack frame and `len` is its exact size, so
    // the kernel reads only that int.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            len,
        )
    };
    r == 0
}

/// Switch keepalive on with short timers. A failure is logged (debug) and
/// otherwise ignored: the socket still works, only without probes.
pub fn enable(s: &TcpStream) -> bool {
    let ok = set(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)
        && set(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, IDLE_SECS)
        && set(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, INTERVAL_SECS)
        && set(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, PROBES);
    if !ok {
        tracing::debug!("TCP keepalive not set: {}", std::io::Error::last_os_error());
    }
    ok
}

/// Whether keepalive is on (for tests).
pub fn is_enabled(s: &TcpStream) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = core::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `s` owns an open socket; `v` and `len` are live locals the
    // kernel writes at most `len` bytes into.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && v != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn keepalive_is_on_after_enable_and_off_before() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(!is_enabled(&c));
        assert!(enable(&c));
        assert!(is_enabled(&c));
    }
}
