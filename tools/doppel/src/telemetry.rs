//! What a running `doppel primary` or `doppel backup` knows about itself,
//! kept in one place: the live status (`doppel status`, served on the
//! status socket, crate::status) and the Prometheus metrics (`--metrics`,
//! crate::metrics) are two views of the same [`Telemetry`].
//!
//! The replication code reports events as they happen (an epoch
//! committed, the backup lost, a failover, the witness key taken); it
//! never formats anything here. One process runs one role, so the
//! process holds one [`Telemetry`] ([`global`]); tests build their own.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// Version of the status document ([`Status::schema`]); bumped when a
/// field changes meaning or goes away (new fields do not bump it).
pub const SCHEMA: u32 = 1;

/// Window over which [`Status::epoch_rate`] is computed.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Backup,
}

/// Where this side stands (docs/OPERATING.md, "Status").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Attaching to the hypervisor / binding sockets.
    Starting,
    /// Backup: no primary connected yet, or waiting for the witness key
    /// before activating.
    Waiting,
    /// Primary: a backup acknowledges every epoch before its output is
    /// released. Backup: receiving and acknowledging a primary's epochs.
    Protected,
    /// Primary: serving with no backup (it was lost; reconnecting).
    Degraded,
    /// The witness lease could not be confirmed: no output is released
    /// any more (exit code 6 follows).
    Fenced,
    /// Backup: took over after its primary was lost; serves the clients.
    Active,
    /// Ending (signal, END, or an error being reported).
    Stopping,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Waiting => "waiting",
            State::Protected => "protected",
            State::Degraded => "degraded",
            State::Fenced => "fenced",
            State::Active => "active",
            State::Stopping => "stopping",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    /// Stream bytes sent (primary) or received (backup) since start.
    pub stream: u64,
    /// Page contents shipped (4096 per page), since start.
    pub pages_raw: u64,
    /// Page records on the wire (plain or compressed), since start.
    pub pages_wire: u64,
    /// Stream bytes of the last committed epoch.
    pub last_epoch: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessStatus {
    pub key: String,
    /// Who holds the key, as written in it (`role:host:pid`), when known.
    pub holder: Option<String>,
    /// This side's fencing token (the revision that took the key).
    pub token: Option<i64>,
    /// Whether this side holds the key.
    pub held: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// Wall-clock time (seconds since the Unix epoch).
    pub at_unix: f64,
    /// The committed epoch the standby was activated from.
    pub epoch: u64,
    pub reason: String,
}

/// The status document (`doppel status --json`; schema in
/// docs/OPERATING.md). Epochs are the hypervisor's on a primary and the
/// stream's on a backup (the same numbers for a primary's first backup).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub schema: u32,
    pub role: Role,
    pub state: State,
    pub pid: u32,
    pub version: String,
    pub uptime_s: f64,
    /// The epoch in progress (the next one to commit).
    pub epoch: u64,
    pub last_committed: Option<u64>,
    /// Epochs committed since start.
    pub epochs_committed: u64,
    /// Primary: from taking the last checkpoint to its commit (the output
    /// delay the clients saw), ms.
    pub commit_lag_ms: Option<f64>,
    /// Time since the last commit, ms (grows while nothing commits).
    pub since_commit_ms: Option<f64>,
    /// Committed epochs per second over the last 10 s.
    pub epoch_rate: f64,
    /// Pages of the last committed epoch.
    pub dirty_pages: u64,
    pub bytes: Bytes,
    /// The hypervisor's last epoch-end pause (guest stopped to checkpoint
    /// posted), in its TSC cycles; absent when the hypervisor does not
    /// report it.
    pub pause_cycles: Option<u64>,
    /// Guest output the hypervisor holds until its epoch commits, bytes
    /// (primary; read from the control header at each commit).
    pub held_output_bytes: u64,
    pub witness: Option<WitnessStatus>,
    /// The other side: the backup's address (primary) or the primary's
    /// (backup), while connected.
    pub peer: Option<String>,
    pub last_failover: Option<Failover>,
    /// Times the backup was lost (primary).
    pub backup_lost: u64,
    /// Epochs released with no backup (primary).
    pub unprotected_epochs: u64,
}

/// The metric series (names follow Prometheus conventions: base units,
/// `_total` on counters, added by the encoder).
struct Metrics {
    registry: Registry,
    epochs: Counter,
    dirty_pages: Counter,
    stream_bytes: Counter,
    page_bytes: Family<Vec<(String, String)>, Counter>,
    unprotected_epochs: Counter,
    backup_lost: Counter,
    failovers: Counter,
    epoch_pages: Histogram,
    pause_cycles: Histogram,
    ack_latency: Histogram,
    commit_lag: Histogram,
    held_output: Gauge,
    last_committed: Gauge,
    state: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    fn new(role: Role) -> Self {
        let role = match role {
            Role::Primary => "primary",
            Role::Backup => "backup",
        };
        let mut registry =
            Registry::with_prefix_and_labels("doppel", [("role".into(), role.into())].into_iter());
        let m = Self {
            epochs: Counter::default(),
            dirty_pages: Counter::default(),
            stream_bytes: Counter::default(),
            page_bytes: Family::default(),
            unprotected_epochs: Counter::default(),
            backup_lost: Counter::default(),
            failovers: Counter::default(),
            epoch_pages: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            pause_cycles: Histogram::new(exponential_buckets(1e4, 4.0, 12)),
            ack_latency: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            commit_lag: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            held_output: Gauge::default(),
            last_committed: Gauge::default(),
            state: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "epochs_committed",
            "Epochs committed (primary: released; backup: acknowledged)",
            m.epochs.clone(),
        );
        registry.register(
            "dirty_pages",
            "Pages shipped (primary) or received (backup) in committed epochs",
            m.dirty_pages.clone(),
        );
        registry.register(
            "stream_bytes",
            "Bytes of the Xen stream in committed epochs",
            m.stream_bytes.clone(),
        );
        registry.register(
            "page_bytes",
            "Page contents (encoding=raw) and their records on the wire \
             (encoding=plain or xlz4), in committed epochs",
            m.page_bytes.clone(),
        );
        registry.register(
            "unprotected_epochs",
            "Epochs the primary released with no backup",
            m.unprotected_epochs.clone(),
        );
        registry.register(
            "backup_lost",
            "Times the primary lost its backup",
            m.backup_lost.clone(),
        );
        registry.register(
            "failovers",
            "Times this backup activated its standby",
            m.failovers.clone(),
        );
        registry.register(
            "epoch_dirty_pages",
            "Pages per committed epoch",
            m.epoch_pages.clone(),
        );
        registry.register(
            "epoch_pause_cycles",
            "The hypervisor's epoch-end pause, in its TSC cycles",
            m.pause_cycles.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "From an epoch's last byte sent to the backup's ack",
            m.ack_latency.clone(),
        );
        registry.register(
            "commit_lag_seconds",
            "From taking a checkpoint to committing it (output delay)",
            m.commit_lag.clone(),
        );
        registry.register(
            "held_output_bytes",
            "Guest output announced and not yet released",
            m.held_output.clone(),
        );
        registry.register(
            "last_committed_epoch",
            "The last committed epoch (-1: none yet)",
            m.last_committed.clone(),
        );
        registry.register(
            "state",
            "1 for the current state (label state), 0 for the others",
            m.state.clone(),
        );
        m.last_committed.set(-1);
        Self { registry, ..m }
    }
}

/// One committed epoch as the replication code reports it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Committed {
    pub epoch: u64,
    pub pages: u64,
    /// Checkpoint taken to commit (primary).
    pub lag: Option<Duration>,
    /// The hypervisor's pause (primary; absent when not reported).
    pub pause_cycles: Option<u64>,
}

/// One epoch's stream, as sent (primary) or received (backup).
#[derive(Clone, Copy, Debug, Default)]
pub struct Shipped {
    pub bytes: u64,
    pub page_raw: u64,
    pub page_wire: u64,
    /// Whether the page records were compressed.
    pub xlz4: bool,
    /// Last byte sent to the backup's ack (primary with a backup).
    pub ack: Option<Duration>,
}

struct Inner {
    status: Status,
    commits: VecDeque<Instant>,
    last_commit: Option<Instant>,
}

pub struct Telemetry {
    started: Instant,
    inner: Mutex<Inner>,
    metrics: Metrics,
}

impl Telemetry {
    pub fn new(role: Role) -> Self {
        let t = Self {
            started: Instant::now(),
            inner: Mutex::new(Inner {
                status: Status {
                    schema: SCHEMA,
                    role,
                    state: State::Starting,
                    pid: std::process::id(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    uptime_s: 0.0,
                    epoch: 0,
                    last_committed: None,
                    epochs_committed: 0,
                    commit_lag_ms: None,
                    since_commit_ms: None,
                    epoch_rate: 0.0,
                    dirty_pages: 0,
                    bytes: Bytes::default(),
                    pause_cycles: None,
                    held_output_bytes: 0,
                    witness: None,
                    peer: None,
                    last_failover: None,
                    backup_lost: 0,
                    unprotected_epochs: 0,
                },
                commits: VecDeque::new(),
                last_commit: None,
            }),
            metrics: Metrics::new(role),
        };
        t.set_state(State::Starting);
        t
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panicking reporter must not take the status down with it.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn role(&self) -> Role {
        self.with(|i| i.status.role)
    }

    pub fn set_role(&self, role: Role) {
        self.with(|i| i.status.role = role);
    }

    pub fn state(&self) -> State {
        self.with(|i| i.status.state)
    }

    /// Enter `s`. Fenced is final: nothing leaves it (a fenced side
    /// releases nothing again).
    pub fn set_state(&self, s: State) {
        let now = self.with(|i| {
            if i.status.state != State::Fenced || s == State::Fenced {
                i.status.state = s;
            }
            i.status.state
        });
        for other in [
            State::Starting,
            State::Waiting,
            State::Protected,
            State::Degraded,
            State::Fenced,
            State::Active,
            State::Stopping,
        ] {
            self.metrics
                .state
                .get_or_create(&vec![("state".to_string(), other.name().to_string())])
                .set(i64::from(other == now));
        }
    }

    pub fn set_peer(&self, peer: Option<String>) {
        self.with(|i| i.status.peer = peer);
    }

    /// The hypervisor epoch now in progress.
    pub fn set_epoch(&self, epoch: u64) {
        self.with(|i| i.status.epoch = epoch);
    }

    /// An epoch committed: its output is released (primary) or it is
    /// acknowledged (backup).
    pub fn committed(&self, c: &Committed) {
        let now = Instant::now();
        self.with(|i| {
            let s = &mut i.status;
            s.last_committed = Some(c.epoch);
            s.epoch = s.epoch.max(c.epoch + 1);
            s.epochs_committed += 1;
            s.dirty_pages = c.pages;
            if let Some(l) = c.lag {
                s.commit_lag_ms = Some(l.as_secs_f64() * 1e3);
            }
            if c.pause_cycles.is_some() {
                s.pause_cycles = c.pause_cycles;
            }
            i.commits.push_back(now);
            i.last_commit = Some(now);
        });
        let m = &self.metrics;
        m.epochs.inc();
        m.dirty_pages.inc_by(c.pages);
        m.epoch_pages.observe(c.pages as f64);
        if let Some(p) = c.pause_cycles {
            m.pause_cycles.observe(p as f64);
        }
        if let Some(l) = c.lag {
            m.commit_lag.observe(l.as_secs_f64());
        }
        m.last_committed.set(c.epoch.min(i64::MAX as u64) as i64);
    }

    /// An epoch's stream went out (primary) or came in (backup).
    pub fn shipped(&self, x: &Shipped) {
        self.with(|i| {
            let b = &mut i.status.bytes;
            b.stream += x.bytes;
            b.pages_raw += x.page_raw;
            b.pages_wire += x.page_wire;
            b.last_epoch = x.bytes;
        });
        let m = &self.metrics;
        m.stream_bytes.inc_by(x.bytes);
        let enc = |e: &str| vec![("encoding".to_string(), e.to_string())];
        m.page_bytes.get_or_create(&enc("raw")).inc_by(x.page_raw);
        // A backup knows the contents, not how they were encoded.
        if x.page_wire > 0 {
            m.page_bytes
                .get_or_create(&enc(if x.xlz4 { "xlz4" } else { "plain" }))
                .inc_by(x.page_wire);
        }
        if let Some(a) = x.ack {
            m.ack_latency.observe(a.as_secs_f64());
        }
    }

    /// The guest output the hypervisor holds until commit (read from
    /// its control header).
    pub fn set_held_output(&self, bytes: u64) {
        self.with(|i| i.status.held_output_bytes = bytes);
        self.metrics
            .held_output
            .set(bytes.min(i64::MAX as u64) as i64);
    }

    /// The primary released an epoch with no backup.
    pub fn unprotected_epoch(&self) {
        self.with(|i| i.status.unprotected_epochs += 1);
        self.metrics.unprotected_epochs.inc();
    }

    pub fn backup_lost(&self) {
        self.with(|i| {
            i.status.backup_lost += 1;
            i.status.peer = None;
        });
        self.metrics.backup_lost.inc();
        self.set_state(State::Degraded);
    }

    pub fn failover(&self, epoch: u64, reason: &str) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.with(|i| {
            i.status.last_failover = Some(Failover {
                at_unix: at,
                epoch,
                reason: reason.to_string(),
            });
            i.status.peer = None;
        });
        self.metrics.failovers.inc();
        self.set_state(State::Active);
    }

    pub fn set_witness(&self, w: WitnessStatus) {
        self.with(|i| i.status.witness = Some(w));
    }

    /// The live status now.
    pub fn snapshot(&self) -> Status {
        let now = Instant::now();
        let up = self.started.elapsed();
        self.with(|i| {
            while i
                .commits
                .front()
                .is_some_and(|&t| now.duration_since(t) > RATE_WINDOW)
            {
                i.commits.pop_front();
            }
            let window = RATE_WINDOW.min(up).as_secs_f64().max(1e-3);
            let mut s = i.status.clone();
            s.uptime_s = up.as_secs_f64();
            s.epoch_rate = i.commits.len() as f64 / window;
            s.since_commit_ms = i
                .last_commit
                .map(|t| now.duration_since(t).as_secs_f64() * 1e3);
            s
        })
    }

    /// The metrics in the OpenMetrics text format (which Prometheus
    /// scrapes), ending with `# EOF`.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry);
        out
    }
}

static GLOBAL: OnceLock<Telemetry> = OnceLock::new();

/// This process's telemetry; the first caller names the role (a
/// `doppel primary` reports as primary, a backup as backup; a later call
/// with another role, e.g. an activated standby protecting its turn,
/// keeps the first: it is still the process that was started as backup).
pub fn init(role: Role) -> &'static Telemetry {
    GLOBAL.get_or_init(|| Telemetry::new(role))
}

/// This process's telemetry (a primary's, unless [`init`] said otherwise
/// first: library code reports without knowing who runs it).
pub fn global() -> &'static Telemetry {
    GLOBAL.get_or_init(|| Telemetry::new(Role::Primary))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(t: &Telemetry, e: u64, pages: u64) {
        t.shipped(&Shipped {
            bytes: pages * 4200,
            page_raw: pages * 4096,
            page_wire: pages * 4104,
            ack: Some(Duration::from_millis(1)),
            xlz4: false,
        });
        t.committed(&Committed {
            epoch: e,
            pages,
            lag: Some(Duration::from_millis(3)),
            pause_cycles: Some(50_000),
        });
    }

    #[test]
    fn commits_move_the_status_and_the_metrics() {
        let t = Telemetry::new(Role::Primary);
        assert_eq!(t.snapshot().state, State::Starting);
        assert_eq!(t.snapshot().last_committed, None);
        t.set_state(State::Protected);
        t.set_held_output(150);
        assert_eq!(t.snapshot().held_output_bytes, 150);
        assert!(t
            .metrics_text()
            .contains("doppel_held_output_bytes{role=\"primary\"} 150"));
        t.set_held_output(0);
        epoch(&t, 0, 10);
        epoch(&t, 1, 3);
        let s = t.snapshot();
        assert_eq!(s.last_committed, Some(1));
        assert_eq!(s.epoch, 2);
        assert_eq!(s.epochs_committed, 2);
        assert_eq!(s.dirty_pages, 3);
        assert_eq!(s.bytes.stream, 13 * 4200);
        assert_eq!(s.bytes.last_epoch, 3 * 4200);
        assert_eq!(s.held_output_bytes, 0);
        assert_eq!(s.pause_cycles, Some(50_000));
        assert!(s.epoch_rate > 0.0);
        let m = t.metrics_text();
        assert!(
            m.contains("doppel_epochs_committed_total{role=\"primary\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("doppel_dirty_pages_total{role=\"primary\"} 13"),
            "{m}"
        );
        assert!(
            m.contains("doppel_state{role=\"primary\",state=\"protected\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("doppel_epoch_pause_cycles_count{role=\"primary\"} 2"),
            "{m}"
        );
        assert!(m.ends_with("# EOF\n"), "{m}");
    }

    #[test]
    fn fenced_is_final_and_failover_is_recorded() {
        let t = Telemetry::new(Role::Backup);
        t.set_state(State::Protected);
        t.failover(7, "nothing received for 2.0 s");
        let s = t.snapshot();
        assert_eq!(s.state, State::Active);
        assert_eq!(s.last_failover.as_ref().map(|f| f.epoch), Some(7));
        t.set_state(State::Fenced);
        t.set_state(State::Active);
        assert_eq!(t.state(), State::Fenced);
        let json = serde_json::to_string(&t.snapshot()).expect("json");
        let back: Status = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.state, State::Fenced);
        assert_eq!(back.role, Role::Backup);
    }
}
