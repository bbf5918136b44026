//! `--metrics ADDR`: the process's [`Telemetry`] as a Prometheus scrape
//! target. `GET /metrics` answers the OpenMetrics text format (which
//! Prometheus reads); anything else is 404. Read-only, like the status
//! socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::telemetry::Telemetry;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The HTTP server; dropping it stops it.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listen on `addr` (port 0 picks one: see [`MetricsServer::addr`]).
    pub fn start(addr: &str, tel: &'static Telemetry) -> Result<Self, String> {
        let server = tiny_http::Server::http(addr).map_err(|e| format!("--metrics {addr}: {e}"))?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| format!("--metrics {addr}: not an IP address"))?;
        let server = Arc::new(server);
        let s = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    let path = req.url().split('?').next().unwrap_or_default();
                    let r = if req.method() == &tiny_http::Method::Get && path == "/metrics" {
                        let header = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE)
                            .expect("a valid header");
                        req.respond(
                            tiny_http::Response::from_string(tel.metrics_text())
                                .with_header(header),
                        )
                    } else {
                        req.respond(
                            tiny_http::Response::from_string("only GET /metrics is served\n")
                                .with_status_code(404),
                        )
                    };
                    if let Err(e) = r {
                        tracing::debug!("metrics client: {e}");
                    }
                }
            })
            .map_err(|e| format!("--metrics: {e}"))?;
        Ok(Self {
            server,
            addr: bound,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Committed, Role};
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("send");
        let mut s = String::new();
        c.read_to_string(&mut s).expect("read");
        s
    }

    #[test]
    fn a_scrape_sees_the_counters_move() {
        let tel: &'static Telemetry = Box::leak(Box::new(Telemetry::new(Role::Primary)));
        let m = MetricsServer::start("127.0.0.1:0", tel).expect("start");
        let before = get(m.addr(), "/metrics");
        assert!(
            before.starts_with("HTTP/1.0 200") || before.starts_with("HTTP/1.1 200"),
            "{before}"
        );
        assert!(
            before.contains("doppel_epochs_committed_total{role=\"primary\"} 0"),
            "{before}"
        );
        tel.committed(&Committed {
            epoch: 0,
            pages: 5,
            ..Committed::default()
        });
        let after = get(m.addr(), "/metrics");
        assert!(
            after.contains("doppel_epochs_committed_total{role=\"primary\"} 1"),
            "{after}"
        );
        assert!(
            after.contains("doppel_dirty_pages_total{role=\"primary\"} 5"),
            "{after}"
        );
        assert!(get(m.addr(), "/").contains("404"));
    }
}
