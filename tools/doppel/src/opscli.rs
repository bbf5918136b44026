//! The operator's view of a running `doppel primary` / `doppel backup`:
//! `--status-socket` and `--metrics` (flattened into both), and the
//! `doppel status` command that reads the socket.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use doppel::metrics::MetricsServer;
use doppel::status::{self, StatusError, StatusServer};
use doppel::telemetry::{self, Role, Status};

use crate::exit::{IO, USAGE};

#[derive(Args, Debug, Clone, Default)]
pub struct OpsArgs {
    /// Answer `doppel status --socket PATH` on this Unix socket (created
    /// mode 0660, removed at exit; a stale one left by a dead process is
    /// replaced, a live one is an error: one socket per process). Off
    /// when not given.
    #[arg(long, value_name = "PATH")]
    pub status_socket: Option<PathBuf>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics
    /// (host:port; port 0 picks one, printed as `metrics on ADDR`).
    /// Counters and histograms of epochs, dirty pages, bytes, pause
    /// cycles, ack latency, held output, failovers (docs/OPERATING.md).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// The servers of one run; dropping it stops them.
pub struct Ops {
    _status: Option<StatusServer>,
    _metrics: Option<MetricsServer>,
}

impl OpsArgs {
    /// Name this process's role and start what the flags ask for.
    pub fn start(&self, role: Role) -> Result<Ops, (String, u8)> {
        let tel = telemetry::init(role);
        let status = match &self.status_socket {
            Some(p) => {
                let s = StatusServer::start(p, tel).map_err(|e| {
                    let code = match e {
                        StatusError::InUse { .. } => USAGE,
                        _ => IO,
                    };
                    (e.to_string(), code)
                })?;
                println!("status on {}", p.display());
                Some(s)
            }
            None => None,
        };
        let metrics = match &self.metrics {
            Some(a) => {
                let m = MetricsServer::start(a, tel).map_err(|e| (e, IO))?;
                println!("metrics on {}", m.addr());
                Some(m)
            }
            None => None,
        };
        let _ = std::io::stdout().flush();
        Ok(Ops {
            _status: status,
            _metrics: metrics,
        })
    }
}

/// `doppel status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The `--status-socket` of the running primary or backup.
    #[arg(long, value_name = "PATH", env = "DOPPEL_STATUS_SOCKET")]
    socket: PathBuf,
    /// Print the whole status document as JSON (schema in
    /// docs/OPERATING.md; `schema` says its version).
    #[arg(long, conflicts_with = "field")]
    json: bool,
    /// Print one top-level field's value only (`role`, `state`,
    /// `last_committed`, ...; `none` for an absent value; objects as
    /// JSON): for scripts such as the Pacemaker agent.
    #[arg(long, value_name = "NAME")]
    field: Option<String>,
}

pub fn status(a: StatusArgs) -> Result<(), (String, u8)> {
    let s = status::query(&a.socket).map_err(|e| (e.to_string(), IO))?;
    if a.json {
        let text = serde_json::to_string_pretty(&s).map_err(|e| (e.to_string(), IO))?;
        println!("{text}");
        return Ok(());
    }
    if let Some(name) = &a.field {
        let v = serde_json::to_value(&s).map_err(|e| (e.to_string(), IO))?;
        let Some(f) = v.get(name) else {
            let names: Vec<&str> = v
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            return Err((
                format!(
                    "no field `{name}` in the status; fields: {}",
                    names.join(", ")
                ),
                USAGE,
            ));
        };
        match f {
            serde_json::Value::Null => println!("none"),
            serde_json::Value::String(t) => println!("{t}"),
            other => println!("{other}"),
        }
        return Ok(());
    }
    print!("{}", human(&s, std::io::stdout().is_terminal()));
    Ok(())
}

/// The status for a person: one fact per line.
fn human(s: &Status, _tty: bool) -> String {
    let opt = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    let role = serde_json::to_value(s.role)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<16} {v}\n"));
    line("role", role);
    line("state", s.state.name().to_string());
    line(
        "pid",
        format!("{} (up {:.0} s, doppel {})", s.pid, s.uptime_s, s.version),
    );
    line(
        "epoch",
        format!(
            "{} in progress, last committed {} ({} committed)",
            s.epoch,
            opt(s.last_committed),
            s.epochs_committed
        ),
    );
    line("epoch rate", format!("{:.1}/s", s.epoch_rate));
    line(
        "lag",
        format!(
            "commit {} , since last commit {}",
            ms(s.commit_lag_ms),
            ms(s.since_commit_ms)
        ),
    );
    line("dirty pages", format!("{} (last epoch)", s.dirty_pages));
    line(
        "bytes",
        format!(
            "{} stream, pages {} raw / {} on the wire, last epoch {}",
            s.bytes.stream, s.bytes.pages_raw, s.bytes.pages_wire, s.bytes.last_epoch
        ),
    );
    line(
        "pause",
        s.pause_cycles.map_or("not reported".into(), |c| {
            format!("{c} cycles (last epoch end)")
        }),
    );
    line("held output", format!("{} bytes", s.held_output_bytes));
    line("peer", s.peer.clone().unwrap_or_else(|| "none".into()));
    line(
        "witness",
        match &s.witness {
            None => "none".into(),
            Some(w) => format!(
                "key {} {} by {} (token {})",
                w.key,
                if w.held { "held" } else { "not held" },
                w.holder.as_deref().unwrap_or("?"),
                w.token.map_or("-".into(), |t| t.to_string())
            ),
        },
    );
    line(
        "last failover",
        match &s.last_failover {
            None => "none".into(),
            Some(f) => format!(
                "from epoch {} at {:.0} (unix s): {}",
                f.epoch, f.at_unix, f.reason
            ),
        },
    );
    if s.role == Role::Primary {
        line(
            "unprotected",
            format!(
                "backup lost {} times, {} epochs released with no backup",
                s.backup_lost, s.unprotected_epochs
            ),
        );
    }
    o
}
