//! The `--witness` flags of `doppel primary` and `doppel backup`, and what
//! each side does with the witness (docs/REPLICATION.md, "Witness").

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use doppel::witness::{self, Gate, Witness, WitnessError};

use crate::exit::FENCED;

#[derive(Args, Debug, Clone)]
pub struct WitnessArgs {
    /// The etcd cluster that decides which side may serve
    /// (HOST:PORT[,HOST:PORT...]). The serving side holds --witness-key
    /// bound to a lease it keeps alive, and releases output only while
    /// that lease is certain to run; a backup activates only once it has
    /// taken the key (the primary's lease ended). Without it a cut
    /// replication link can leave two live machines serving (README,
    /// "Split brain").
    #[arg(long, value_name = "HOST:PORT[,...]", value_parser = endpoints)]
    pub witness: Option<String>,
    /// The witness key; the primary and its backup must use the same one,
    /// every protected VM its own.
    #[arg(long, value_name = "KEY", default_value = witness::DEFAULT_KEY, requires = "witness")]
    pub witness_key: String,
    /// Lease time to live in whole seconds (2 to 3600). A primary that
    /// cannot renew stops releasing output (fences itself) about a fifth
    /// of it before the lease can expire; a backup waits at most this long
    /// after the primary's last renewal.
    #[arg(long, value_name = "SECS", default_value_t = witness::DEFAULT_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(2..=3600), requires = "witness")]
    pub witness_ttl: u64,
}

impl WitnessArgs {
    pub fn open(&self, role: &str) -> Result<Option<Witness>, (String, u8)> {
        let Some(eps) = self.witness.as_deref().map(witness::parse_endpoints) else {
            tracing::warn!(
                "no --witness: if the replication link is cut while both machines run, both \
                 can serve (split brain; README, \"Split brain\")"
            );
            return Ok(None);
        };
        let eps = eps.map_err(|e| (format!("--witness: {e}"), 2))?;
        Witness::new(
            &eps,
            &self.witness_key,
            Duration::from_secs(self.witness_ttl),
            &witness::default_owner(role),
        )
        .map(Some)
        .map_err(|e| (e.to_string(), 2))
    }
}

/// `--witness`: checked here, split when used.
fn endpoints(s: &str) -> Result<String, String> {
    witness::parse_endpoints(s).map(|_| s.to_string())
}

fn say(line: String) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// The witness as the status shows it.
fn report(key: &str, holder: Option<String>, token: Option<i64>, held: bool) {
    doppel::telemetry::global().set_witness(doppel::telemetry::WitnessStatus {
        key: key.to_string(),
        holder,
        token,
        held,
    });
}

/// The primary at start: take the key or refuse to run.
pub fn primary_acquire(a: &WitnessArgs) -> Result<Option<(Witness, Gate)>, (String, u8)> {
    let Some(mut w) = a.open("primary")? else {
        return Ok(None);
    };
    match w.acquire() {
        Ok(token) => {
            say(format!(
                "primary: witness key {} held (fencing token {token}, lease {} s)",
                w.key(),
                w.timing().ttl.as_secs()
            ));
            report(w.key(), Some(w.owner().to_string()), Some(token), true);
            let gate = w.gate();
            Ok(Some((w, gate)))
        }
        Err(e) => Err((
            format!(
                "primary: not starting: {e} (another side serves, or its lease has not run out)"
            ),
            FENCED,
        )),
    }
}

/// The backup after losing its primary: take the key before activating.
/// Retries about every TTL/2 while the key is held (the primary may be
/// alive behind a cut link) or etcd is unreachable, saying why; returns
/// once won (or `None` without a witness). Ends only by winning or a
/// signal.
pub fn backup_take(w: Option<&mut Witness>) -> Option<Gate> {
    let w = w?;
    let every = w.timing().ttl / 2;
    loop {
        match w.try_take() {
            Ok(token) => {
                say(format!(
                    "backup: witness key {} taken (fencing token {token})",
                    w.key()
                ));
                report(w.key(), Some(w.owner().to_string()), Some(token), true);
                return Some(w.gate());
            }
            Err(e) => {
                let why = match &e {
                    WitnessError::Held { owner, .. } => {
                        report(w.key(), Some(owner.clone()), None, false);
                        format!("{e}; the primary may be alive")
                    }
                    _ => e.to_string(),
                };
                say(format!(
                    "backup: waiting: {why}; not activating, retrying in {:.1} s",
                    every.as_secs_f64()
                ));
            }
        }
        std::thread::sleep(every);
    }
}

/// The activated standby: while `serving` runs (the client bridge, which
/// stops when `stop` is set), check the lease every 50 ms; once it can no
/// longer be confirmed, say so and stop the bridge: no reply reaches a
/// client any more. Returns the bridge's result, or the fence.
pub fn watch_serving<T: Send>(
    gate: Option<Gate>,
    stop: &AtomicBool,
    serving: impl FnOnce() -> T + Send,
) -> Result<T, (String, u8)> {
    let Some(gate) = gate else {
        return Ok(serving());
    };
    let done = AtomicBool::new(false);
    let poll = Duration::from_millis(50);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let r = serving();
            done.store(true, Ordering::Relaxed);
            r
        });
        let mut fenced = None;
        while !done.load(Ordering::Relaxed) {
            // One poll ahead: the next check comes that much later.
            if let Err(why) = gate.0.check(Instant::now() + poll) {
                say(format!(
                    "backup: fenced: {why}; the client bridge stops, no reply is sent any more"
                ));
                doppel::telemetry::global().set_state(doppel::telemetry::State::Fenced);
                stop.store(true, Ordering::Relaxed);
                fenced = Some(why);
                break;
            }
            std::thread::sleep(poll);
        }
        let r = h.join().expect("the client bridge thread panicked");
        match fenced {
            Some(why) => Err((format!("backup: fenced: {why}"), FENCED)),
            None => Ok(r),
        }
    })
}
