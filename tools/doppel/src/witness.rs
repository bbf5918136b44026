//! The split-brain witness: an etcd key bound to a lease (docs/REPLICATION.md,
//! "Witness").
//!
//! The side that releases output (the primary, or an activated standby)
//! holds one key in etcd, bound to a lease it keeps alive; the key's
//! revision when it was taken is the fencing token. Taking the key is one
//! transaction: "if the key does not exist, put it bound to my fresh
//! lease". etcd deletes the key only when the holder's lease is revoked or
//! has expired on the server, so a taker wins only once the old holder can
//! no longer renew.
//!
//! The holder may release output only while its lease certainly still
//! runs on the server. It knows a lower bound of the server's expiry: the
//! local send time of the last keep-alive whose answer came back, plus the
//! TTL (the server renewed on receipt, which came after the send). From
//! that it subtracts a margin that covers the time between the check and
//! the release (CommitEpoch's round trip, the bridge) and the clock rate
//! difference between this host and the etcd leader over one TTL
//! ([`Timing`], a pure function tested without etcd).
//!
//! The etcd client is asynchronous; the witness owns a small
//! current-thread tokio runtime and blocks on it. After the key is won a
//! thread keeps the lease alive and publishes the send time of each
//! acknowledged keep-alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

/// Default key: both sides of one protected VM must use the same key, and
/// every VM its own.
pub const DEFAULT_KEY: &str = "/doppel/default/active";
/// Default lease TTL in seconds.
pub const DEFAULT_TTL_SECS: u64 = 5;
/// Assumed bound on the rate difference between this host's monotonic
/// clock and the etcd leader's (parts per million): 1 %, far above what
/// NTP-disciplined or even free-running quartz clocks drift.
pub const DRIFT_PPM: u64 = 10_000;

/// The timing rules of a lease, without etcd (pure, unit-tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// The lease's time to live.
    pub ttl: Duration,
    /// Longest time from a passed check to the release it allows
    /// (CommitEpoch's round trip and the bridge handing the replies on).
    pub release_latency: Duration,
    /// Clock rate difference bound, parts per million.
    pub drift_ppm: u64,
}

impl Timing {
    /// The defaults for a TTL: a release latency of a fifth of the TTL
    /// (at least 200 ms, at most 2 s) and [`DRIFT_PPM`].
    pub fn for_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            release_latency: (ttl / 5).clamp(Duration::from_millis(200), Duration::from_secs(2)),
            drift_ppm: DRIFT_PPM,
        }
    }

    /// What is taken off the lease: release latency plus the drift over
    /// one TTL, counted twice (either clock may be the fast one).
    pub fn margin(&self) -> Duration {
        let drift_ns = self.ttl.as_nanos() * u128::from(self.drift_ppm) * 2 / 1_000_000;
        self.release_latency + Duration::from_nanos(drift_ns.min(u128::from(u64::MAX)) as u64)
    }

    /// Whether the TTL leaves anything after the margin.
    pub fn usable(&self) -> bool {
        self.ttl > self.margin()
    }

    /// The last instant at which a release may start, given the local
    /// send time of the last keep-alive (or grant) whose answer came back.
    /// `None` when the margin eats the whole TTL.
    pub fn valid_until(&self, acked_send: Instant) -> Option<Instant> {
        self.ttl
            .checked_sub(self.margin())
            .and_then(|left| acked_send.checked_add(left))
    }

    /// Whether a release may start at `now`: only strictly before
    /// [`Timing::valid_until`].
    pub fn may_release(&self, acked_send: Option<Instant>, now: Instant) -> Result<(), String> {
        let Some(sent) = acked_send else {
            return Err("the witness lease was never confirmed".into());
        };
        match self.valid_until(sent) {
            Some(until) if now < until => Ok(()),
            Some(until) => Err(format!(
                "the witness lease is not confirmed to run long enough: the last acknowledged \
                 keep-alive was sent {:.1} s ago, the lease is {:.1} s and {:.1} s of it are the \
                 safety margin ({:.1} s past the deadline)",
                now.saturating_duration_since(sent).as_secs_f64(),
                self.ttl.as_secs_f64(),
                self.margin().as_secs_f64(),
                now.saturating_duration_since(until).as_secs_f64()
            )),
            None => Err(format!(
                "the lease TTL {:.1} s does not exceed the safety margin {:.1} s",
                self.ttl.as_secs_f64(),
                self.margin().as_secs_f64()
            )),
        }
    }

    /// How often the lease is renewed: four times per usable window, so
    /// that three lost or late keep-alives in a row still leave time.
    pub fn keepalive_every(&self) -> Duration {
        (self.ttl.saturating_sub(self.margin()) / 4).max(Duration::from_millis(50))
    }
}

/// Decides, before each output release, whether it may happen. The
/// primary calls it right before `CommitEpoch`; its one implementation
/// outside tests is [`Witness`].
pub trait ReleaseGate: Send + Sync {
    /// `Ok` if output may be released now; otherwise why not (the caller
    /// fences itself: it never releases again).
    fn check(&self, now: Instant) -> Result<(), String>;
}

/// A shared [`ReleaseGate`] (cloneable, printable for `PrimaryConfig`).
#[derive(Clone)]
pub struct Gate(pub Arc<dyn ReleaseGate>);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

/// Why the key was not won.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("the witness key {key} is held by {owner:?} (taken at revision {revision})")]
    Held {
        key: String,
        owner: String,
        revision: i64,
    },
    #[error("the witness at {endpoints} is unreachable: {detail}")]
    Unreachable { endpoints: String, detail: String },
    #[error("the witness: {0}")]
    Invalid(String),
}

/// What the keep-alive thread publishes.
#[derive(Debug, Default)]
struct LeaseState {
    /// Local send time of the last keep-alive (or the grant) answered
    /// with a live lease.
    acked_send: Option<Instant>,
    /// Set once etcd says the lease is gone (TTL 0): final.
    lost: Option<String>,
    /// The last keep-alive failure (for messages).
    last_error: Option<String>,
}

/// A client of the etcd witness for one key.
pub struct Witness {
    rt: Arc<tokio::runtime::Runtime>,
    client: Option<Client>,
    endpoints: Vec<String>,
    key: String,
    owner: String,
    timing: Timing,
    /// The lease bound to the key once it is won, and its fencing token.
    held: Option<(i64, i64)>,
    state: Arc<Mutex<LeaseState>>,
    stop: Arc<AtomicBool>,
    keeper: Option<JoinHandle<()>>,
}

impl Witness {
    /// A witness client for `key` at `endpoints` (`host:port`, or URLs).
    /// Nothing is contacted yet: the backup needs etcd only at failover.
    pub fn new(
        endpoints: &[String],
        key: &str,
        ttl: Duration,
        owner: &str,
    ) -> Result<Self, WitnessError> {
        if endpoints.is_empty() {
            return Err(WitnessError::Invalid("no etcd endpoint given".into()));
        }
        if key.is_empty() {
            return Err(WitnessError::Invalid("the witness key is empty".into()));
        }
        let timing = Timing::for_ttl(ttl);
        if !timing.usable() || ttl.as_secs() == 0 || ttl.subsec_nanos() != 0 {
            return Err(WitnessError::Invalid(format!(
                "the lease TTL must be whole seconds, above the {:.1} s safety margin",
                timing.margin().as_secs_f64()
            )));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| WitnessError::Invalid(format!("starting the etcd client runtime: {e}")))?;
        let endpoints = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        Ok(Self {
            rt: Arc::new(rt),
            client: None,
            endpoints,
            key: key.to_string(),
            owner: owner.to_string(),
            timing,
            held: None,
            state: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            keeper: None,
        })
    }

    /// The timing rules in use.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What this side writes into the key when it takes it.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The fencing token (the key's revision when this side took it).
    pub fn token(&self) -> Option<i64> {
        self.held.map(|(_, t)| t)
    }

    /// Longest wait for one etcd request.
    fn request_timeout(&self) -> Duration {
        (self.timing.ttl / 3).max(Duration::from_millis(300))
    }

    fn unreachable(&self, detail: impl std::fmt::Display) -> WitnessError {
        WitnessError::Unreachable {
            endpoints: self.endpoints.join(","),
            detail: detail.to_string(),
        }
    }

    fn client(&mut self) -> Result<Client, WitnessError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let t = self.request_timeout();
        let opts = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t)
            .with_keep_alive(t, t);
        let eps = self.endpoints.clone();
        let c = self
            .rt
            .block_on(async { tokio::time::timeout(t, Client::connect(eps, Some(opts))).await })
            .map_err(|_| self.unreachable("connecting timed out"))?
            .map_err(|e| self.unreachable(e))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Take the key (the primary at start): it must be absent. Returns the
    /// fencing token; starts keeping the lease alive.
    pub fn acquire(&mut self) -> Result<i64, WitnessError> {
        self.try_take()
    }

    /// Take the key if it is absent (the backup, retried until it wins):
    /// one transaction "if the key does not exist, put it bound to a fresh
    /// lease, else read it". Returns the fencing token; from then on a
    /// thread keeps the lease alive. A lease that did not win is revoked.
    pub fn try_take(&mut self) -> Result<i64, WitnessError> {
        if let Some((_, token)) = self.held {
            return Ok(token);
        }
        let mut client = self.client()?;
        let t = self.request_timeout();
        let ttl = self.timing.ttl.as_secs() as i64;
        let (key, owner) = (self.key.clone(), self.owner.clone());
        let sent = Instant::now();
        let grant = self
            .rt
            .block_on(async { tokio::time::timeout(t, client.lease_grant(ttl, None)).await });
        let lease = match grant {
            Ok(Ok(g)) if g.ttl() >= ttl => g.id(),
            Ok(Ok(g)) => {
                return Err(WitnessError::Invalid(format!(
                    "etcd granted a {} s lease, {ttl} s were asked for",
                    g.ttl()
                )))
            }
            Ok(Err(e)) => return Err(self.unreachable(format!("granting a lease: {e}"))),
            Err(_) => return Err(self.unreachable("granting a lease timed out")),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                owner,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let res = self
            .rt
            .block_on(async { tokio::time::timeout(t, client.txn(txn)).await });
        let outcome = match res {
            Ok(Ok(r)) if r.succeeded() => match r.header() {
                Some(h) => Ok(h.revision()),
                None => Err(WitnessError::Invalid(
                    "a transaction answer without header".into(),
                )),
            },
            Ok(Ok(r)) => {
                let kv = r.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                    _ => None,
                });
                match kv {
                    // Our own lease: an earlier attempt whose answer was
                    // lost did win.
                    Some(kv) if kv.lease() == lease => Ok(kv.mod_revision()),
                    Some(kv) => Err(WitnessError::Held {
                        key: key.clone(),
                        owner: String::from_utf8_lossy(kv.value()).into_owned(),
                        revision: kv.mod_revision(),
                    }),
                    // Deleted between compare and read cannot happen in
                    // one transaction; treat it as not won.
                    None => Err(WitnessError::Invalid(
                        "the key was neither absent nor readable".into(),
                    )),
                }
            }
            Ok(Err(e)) => Err(self.unreachable(format!("taking the key: {e}"))),
            Err(_) => Err(self.unreachable("taking the key timed out")),
        };
        match outcome {
            Ok(token) => {
                {
                    let mut s = self.state.lock().expect("witness state");
                    s.acked_send = Some(sent);
                    s.lost = None;
                }
                self.held = Some((lease, token));
                self.start_keepalive(client, lease);
                tracing::info!(
                    "witness: holding {} (lease {lease:#x}, fencing token {token})",
                    self.key
                );
                Ok(token)
            }
            Err(e) => {
                // Best effort: an unused lease only delays nothing, but
                // one whose put did win unseen must not keep the key.
                let _ = self
                    .rt
                    .block_on(async { tokio::time::timeout(t, client.lease_revoke(lease)).await });
                Err(e)
            }
        }
    }

    fn start_keepalive(&mut self, client: Client, lease: i64) {
        let (rt, state, stop) = (
            Arc::clone(&self.rt),
            Arc::clone(&self.state),
            Arc::clone(&self.stop),
        );
        let every = self.timing.keepalive_every();
        let t = self.request_timeout();
        self.keeper = Some(std::thread::spawn(move || {
            rt.block_on(keepalive(client, lease, every, t, state, stop));
        }));
    }

    /// The last instant a release may start (None: never confirmed, or
    /// the lease is lost).
    pub fn valid_until(&self) -> Option<Instant> {
        self.held?;
        let s = self.state.lock().expect("witness state");
        if s.lost.is_some() {
            return None;
        }
        s.acked_send.and_then(|t| self.timing.valid_until(t))
    }

    /// Whether output may be released at `now` (see [`Timing::may_release`]).
    pub fn may_release(&self, now: Instant) -> Result<(), String> {
        if self.held.is_none() {
            return Err("this side does not hold the witness key".into());
        }
        check(&self.state, self.timing, now)
    }

    /// The release gate of the lease now held (for `PrimaryConfig` or a
    /// watcher thread); it keeps answering after the witness is dropped
    /// (then: no).
    pub fn gate(&self) -> Gate {
        Gate(Arc::new(LeaseGate {
            state: Arc::clone(&self.state),
            timing: self.timing,
        }))
    }

    /// Stop renewing without revoking: what a crashed holder leaves (the
    /// key goes when the lease expires on the server).
    pub fn abandon(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        if self.held.take().is_some() {
            self.state.lock().expect("witness state").lost =
                Some("this side gave the witness key up".into());
        }
    }

    /// Stop renewing and revoke the lease (the key is deleted at once, so
    /// a waiting side can take it). Call only once this side can release
    /// no more output. Best effort: an unreachable etcd lets it expire.
    pub fn release(&mut self) {
        let held = self.held;
        self.abandon();
        if let (Some((lease, _)), Some(mut c)) = (held, self.client.clone()) {
            let t = self.request_timeout();
            match self
                .rt
                .block_on(async { tokio::time::timeout(t, c.lease_revoke(lease)).await })
            {
                Ok(Ok(_)) => tracing::info!("witness: released {}", self.key),
                Ok(Err(e)) => tracing::warn!("witness: revoking the lease: {e} (it expires)"),
                Err(_) => tracing::warn!("witness: revoking the lease timed out (it expires)"),
            }
        }
    }
}

fn check(state: &Mutex<LeaseState>, timing: Timing, now: Instant) -> Result<(), String> {
    let s = state.lock().expect("witness state");
    if let Some(l) = &s.lost {
        return Err(l.clone());
    }
    timing
        .may_release(s.acked_send, now)
        .map_err(|e| match &s.last_error {
            Some(last) => format!("{e}; last keep-alive failure: {last}"),
            None => e,
        })
}

/// The gate [`Witness::gate`] hands out.
struct LeaseGate {
    state: Arc<Mutex<LeaseState>>,
    timing: Timing,
}

impl ReleaseGate for LeaseGate {
    fn check(&self, now: Instant) -> Result<(), String> {
        check(&self.state, self.timing, now)
    }
}

/// A witness goes out of scope only once its side can release nothing
/// more (the tools stop their bridges first, also on early errors), so
/// the key is given up rather than left to expire.
impl Drop for Witness {
    fn drop(&mut self) {
        self.release();
    }
}

/// The keep-alive loop: one request at a time, its send time published
/// when the answer shows the lease alive. A broken stream is reopened at
/// the next round; an answer with TTL 0 (lease gone) is final.
async fn keepalive(
    mut client: Client,
    lease: i64,
    every: Duration,
    t: Duration,
    state: Arc<Mutex<LeaseState>>,
    stop: Arc<AtomicBool>,
) {
    let mut stream = None;
    let fail = |why: String| {
        tracing::warn!("witness: keep-alive: {why}");
        state.lock().expect("witness state").last_error = Some(why);
    };
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        if stream.is_none() {
            match tokio::time::timeout(t, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => stream = Some(pair),
                Ok(Err(e)) => fail(format!("opening the stream: {e}")),
                Err(_) => fail("opening the stream timed out".into()),
            }
        }
        if let Some((keeper, replies)) = &mut stream {
            let sent = Instant::now();
            let answer = tokio::time::timeout(t, async {
                keeper.keep_alive().await?;
                replies.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    let mut s = state.lock().expect("witness state");
                    s.acked_send = Some(sent);
                    s.last_error = None;
                }
                Ok(Ok(Some(_))) => {
                    let why = "etcd reports the witness lease expired".to_string();
                    tracing::warn!("witness: {why}");
                    state.lock().expect("witness state").lost = Some(why);
                    return;
                }
                Ok(Ok(None)) => {
                    fail("the stream closed".into());
                    stream = None;
                }
                Ok(Err(e)) => {
                    fail(e.to_string());
                    stream = None;
                }
                Err(_) => {
                    fail(format!("no answer within {:.1} s", t.as_secs_f64()));
                    stream = None;
                }
            }
        }
        // Sleep to the next round in small steps (stop is checked).
        while !stop.load(Ordering::Relaxed) && round.elapsed() < every {
            tokio::time::sleep(Duration::from_millis(20).min(every)).await;
        }
    }
}

/// `role:host:pid`, the value written under the key.
pub fn default_owner(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{role}:{host}:{}", std::process::id())
}

/// Split `HOST:PORT[,HOST:PORT...]`.
pub fn parse_endpoints(s: &str) -> Result<Vec<String>, String> {
    let eps: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if eps.is_empty() {
        return Err("give at least one etcd endpoint (HOST:PORT)".into());
    }
    if let Some(bad) = eps.iter().find(|e| !e.contains(':')) {
        return Err(format!("`{bad}` is not HOST:PORT"));
    }
    Ok(eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timing {
        Timing::for_ttl(Duration::from_secs(secs))
    }

    #[test]
    fn the_margin_is_release_latency_plus_twice_the_drift_over_one_ttl() {
        let tm = t(5);
        assert_eq!(tm.release_latency, Duration::from_secs(1));
        // 5 s x 1 % x 2 = 100 ms.
        assert_eq!(tm.margin(), Duration::from_millis(1100));
        assert_eq!(t(1).release_latency, Duration::from_millis(200));
        assert_eq!(t(60).release_latency, Duration::from_secs(2));
    }

    #[test]
    fn the_deadline_counts_from_the_send_time_of_the_last_acknowledged_keepalive() {
        let tm = t(5);
        let sent = Instant::now();
        let until = tm.valid_until(sent).unwrap();
        assert_eq!(until - sent, Duration::from_millis(3900));
        assert!(tm.may_release(Some(sent), sent).is_ok());
        assert!(tm
            .may_release(Some(sent), until - Duration::from_nanos(1))
            .is_ok());
        // At the deadline itself and after it: no.
        let at = tm.may_release(Some(sent), until).unwrap_err();
        assert!(at.contains("not confirmed"), "{at}");
        assert!(tm
            .may_release(Some(sent), sent + Duration::from_secs(5))
            .is_err());
        // A later acknowledged keep-alive moves it on.
        let later = sent + Duration::from_secs(2);
        assert!(tm
            .may_release(Some(later), sent + Duration::from_secs(5))
            .is_ok());
    }

    #[test]
    fn nothing_may_be_released_before_the_lease_was_confirmed() {
        let e = t(5).may_release(None, Instant::now()).unwrap_err();
        assert!(e.contains("never confirmed"), "{e}");
    }

    #[test]
    fn a_ttl_that_the_margin_eats_allows_no_release() {
        let tm = Timing {
            ttl: Duration::from_millis(500),
            release_latency: Duration::from_millis(600),
            drift_ppm: DRIFT_PPM,
        };
        assert!(!tm.usable());
        let now = Instant::now();
        assert_eq!(tm.valid_until(now), None);
        assert!(tm.may_release(Some(now), now).is_err());
    }

    #[test]
    fn the_server_expiry_is_never_before_the_local_deadline() {
        // The server renews at receipt r >= send s and expires at r + ttl,
        // measured on a clock at most drift fast; the local deadline is
        // s + ttl - margin. For every receipt delay and worst-case rate
        // the deadline plus the release latency stays at or before the
        // expiry.
        for secs in [1, 2, 5, 30] {
            let tm = t(secs);
            let s = Instant::now();
            for delay_ms in [0u64, 1, 100, 1000] {
                let r = s + Duration::from_millis(delay_ms);
                let fast = tm.ttl.as_nanos() * u128::from(tm.drift_ppm) / 1_000_000;
                let expiry = r + tm.ttl - Duration::from_nanos(fast as u64);
                let last_release = tm.valid_until(s).unwrap() + tm.release_latency;
                assert!(last_release <= expiry, "ttl {secs} s, delay {delay_ms} ms");
            }
        }
    }

    #[test]
    fn keepalives_come_several_times_per_usable_window() {
        let tm = t(5);
        assert!(tm.keepalive_every() * 3 < tm.ttl - tm.margin());
        assert!(tm.keepalive_every() >= Duration::from_millis(50));
    }

    #[test]
    fn endpoints_are_comma_separated_host_ports() {
        assert_eq!(
            parse_endpoints("a:1, b:2").unwrap(),
            vec!["a:1".to_string(), "b:2".to_string()]
        );
        assert!(parse_endpoints("").is_err());
        assert!(parse_endpoints("nohost").is_err());
    }
}
