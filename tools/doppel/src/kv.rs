//! The protected service's client side: a seeded workload of requests and
//! a checker that holds every reply against the client's own model of the
//! key-value state (hv/abi/src/service.rs).
//!
//! The workload is generated in id order and applied to the model as it
//! is generated, so the expected answer to request `id` (the key's value,
//! version `id`, the state checksum after `id`) is known before it is
//! sent. A reply is accepted only if it answers an outstanding request
//! with status OK or REPLAY and exactly the expected fields.
//!
//! Two kinds of failure are told apart:
//! - `lost_acked`: the reply's version is below the highest version the
//!   client already had acknowledged (an answered request's effect is gone:
//!   the service went back in time, e.g. a backup activated from a state
//!   older than an answer that was released);
//! - `divergent`: any other reply that does not match the model.

use std::collections::BTreeSet;

use doppel_abi::service::{self, op, status, Reply, Request};

use crate::synth::Rng;

/// What the client expects as the answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub value: u64,
    pub checksum: u64,
}

/// A seeded sequence of requests (ids 1..=n) with the expected answers.
#[derive(Clone, Debug)]
pub struct Workload {
    requests: Vec<Request>,
    expected: Vec<Expected>,
    keys: u64,
}

impl Workload {
    /// `n` requests, random PUT / ADD on random keys below `keys`
    /// (`keys >= 1`), from `seed`.
    pub fn new(n: u64, keys: u64, seed: u64) -> Self {
        let keys = keys.max(1);
        let mut rng = Rng::new(seed);
        let mut model = Model::new(keys);
        let mut requests = Vec::with_capacity(n as usize);
        let mut expected = Vec::with_capacity(n as usize);
        for id in 1..=n {
            let key = rng.below(keys);
            let (o, value) = if rng.below(3) == 0 {
                (op::PUT, rng.next_u64())
            } else {
                (op::ADD, rng.below(1 << 20))
            };
            let r = Request::new(id, o, key, value);
            expected.push(model.apply(&r));
            requests.push(r);
        }
        Self {
            requests,
            expected,
            keys,
        }
    }

    /// Number of requests.
    pub fn len(&self) -> u64 {
        self.requests.len() as u64
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Keys the workload uses.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// Request `id` (1-based).
    pub fn request(&self, id: u64) -> Option<&Request> {
        id.checked_sub(1)
            .and_then(|i| self.requests.get(usize::try_from(i).ok()?))
    }

    /// The answer expected to request `id`.
    pub fn expected(&self, id: u64) -> Option<Expected> {
        id.checked_sub(1)
            .and_then(|i| self.expected.get(usize::try_from(i).ok()?))
            .copied()
    }
}

/// The client's model of the service state.
#[derive(Clone, Debug)]
pub struct Model {
    values: Vec<u64>,
    checksum: u64,
}

impl Model {
    /// `keys` keys, all zero.
    pub fn new(keys: u64) -> Self {
        let values = vec![0; keys as usize];
        let checksum = service::checksum(values.iter().copied());
        Self { values, checksum }
    }

    /// Apply a (well-formed, in-range) request; the expected answer.
    pub fn apply(&mut self, r: &Request) -> Expected {
        let k = r.key as usize;
        let old = self.values[k];
        let new = service::apply(r.op, old, r.value).unwrap_or(old);
        self.checksum = self
            .checksum
            .wrapping_sub(service::term(r.key, old))
            .wrapping_add(service::term(r.key, new));
        self.values[k] = new;
        Expected {
            value: new,
            checksum: self.checksum,
        }
    }

    /// The state checksum, kept incrementally.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    /// The values.
    pub fn values(&self) -> &[u64] {
        &self.values
    }
}

/// What one reply was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It answers outstanding request `id` correctly.
    Answered { id: u64, replay: bool },
    /// A correct repeat of an answer already accepted (harmless).
    Duplicate { id: u64 },
    /// Acknowledged work was lost: version below the highest acknowledged.
    LostAcked { detail: String },
    /// Does not match the model.
    Divergent { detail: String },
}

/// Counts and the outstanding set of one client run.
#[derive(Clone, Debug)]
pub struct Checker {
    work: Workload,
    outstanding: BTreeSet<u64>,
    answered_ids: BTreeSet<u64>,
    next_id: u64,
    /// Highest version of an accepted reply.
    pub acked_version: u64,
    pub answered: u64,
    pub replays: u64,
    pub duplicates: u64,
    pub lost_acked: u64,
    pub divergent: u64,
}

impl Checker {
    pub fn new(work: Workload) -> Self {
        Self {
            work,
            outstanding: BTreeSet::new(),
            answered_ids: BTreeSet::new(),
            next_id: 1,
            acked_version: 0,
            answered: 0,
            replays: 0,
            duplicates: 0,
            lost_acked: 0,
            divergent: 0,
        }
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.work
    }

    /// The next request to send if fewer than `window` are outstanding.
    pub fn next_to_send(&mut self, window: u64) -> Option<Request> {
        if self.outstanding.len() as u64 >= window {
            return None;
        }
        let r = *self.work.request(self.next_id)?;
        self.outstanding.insert(r.id);
        self.next_id += 1;
        Some(r)
    }

    /// Unanswered requests in id order (to re-send after a reconnect).
    pub fn unanswered(&self) -> Vec<Request> {
        self.outstanding
            .iter()
            .filter_map(|&id| self.work.request(id).copied())
            .collect()
    }

    /// Requests sent and not answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// All requests answered.
    pub fn done(&self) -> bool {
        self.answered == self.work.len()
    }

    /// Whether the run passes: everything answered, nothing lost or wrong.
    pub fn pass(&self) -> bool {
        self.done() && self.lost_acked == 0 && self.divergent == 0
    }

    /// Check one reply frame and count it.
    pub fn check(&mut self, frame: &[u8]) -> Verdict {
        let v = self.classify(frame);
        match &v {
            Verdict::Answered { id, replay } => {
                self.outstanding.remove(id);
                self.answered_ids.insert(*id);
                self.answered += 1;
                self.replays += u64::from(*replay);
                self.acked_version = self.acked_version.max(*id);
            }
            Verdict::Duplicate { .. } => self.duplicates += 1,
            Verdict::LostAcked { .. } => self.lost_acked += 1,
            Verdict::Divergent { .. } => self.divergent += 1,
        }
        v
    }

    fn classify(&self, frame: &[u8]) -> Verdict {
        let Some(r) = Reply::parse(frame) else {
            return Verdict::Divergent {
                detail: format!(
                    "not a reply frame ({} bytes, magic or reserved wrong)",
                    frame.len()
                ),
            };
        };
        let bad = |detail: String| {
            if r.version < self.acked_version {
                Verdict::LostAcked {
                    detail: format!(
                        "{detail}; version {} is below the acknowledged version {}",
                        r.version, self.acked_version
                    ),
                }
            } else {
                Verdict::Divergent { detail }
            }
        };
        if r.status != status::OK && r.status != status::REPLAY {
            return bad(format!("reply to id {} has status {}", r.id, r.status));
        }
        let Some(want) = self.work.expected(r.id) else {
            return bad(format!("reply to id {}, which was never sent", r.id));
        };
        if r.version != r.id || r.value != want.value || r.checksum != want.checksum {
            return bad(format!(
                "reply to id {}: value {:#x} version {} checksum {:#x}, \
                 expected value {:#x} version {} checksum {:#x}",
                r.id, r.value, r.version, r.checksum, want.value, r.id, want.checksum
            ));
        }
        if self.outstanding.contains(&r.id) {
            Verdict::Answered {
                id: r.id,
                replay: r.status == status::REPLAY,
            }
        } else if self.answered_ids.contains(&r.id) {
            Verdict::Duplicate { id: r.id }
        } else {
            bad(format!("reply to id {}, which is not outstanding", r.id))
        }
    }

    /// The final line of `doppel client`.
    pub fn summary_line(&self, failovers: u64) -> String {
        format!(
            "client: ops={} answered={} replays={} failovers={failovers} lost_acked={} \
             divergent={} last_version={} result={}",
            self.work.len(),
            self.answered,
            self.replays,
            self.lost_acked,
            self.divergent,
            self.acked_version,
            if self.pass() { "pass" } else { "fail" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::service::REPLY_MAGIC;
    use zerocopy::IntoBytes;

    fn reply(id: u64, st: u32, value: u64, version: u64, checksum: u64) -> Vec<u8> {
        Reply {
            magic: REPLY_MAGIC,
            status: st,
            id,
            value,
            version,
            checksum,
            reserved: 0,
        }
        .as_bytes()
        .to_vec()
    }

    fn good(w: &Workload, id: u64, st: u32) -> Vec<u8> {
        let e = w.expected(id).unwrap();
        reply(id, st, e.value, id, e.checksum)
    }

    #[test]
    fn model_matches_the_abi_checksum_after_every_request() {
        let w = Workload::new(400, 7, 3);
        let mut vals = [0u64; 7];
        for id in 1..=400 {
            let r = w.request(id).unwrap();
            assert_eq!(r.id, id);
            let k = r.key as usize;
            vals[k] = service::apply(r.op, vals[k], r.value).unwrap();
            let e = w.expected(id).unwrap();
            assert_eq!(e.value, vals[k]);
            assert_eq!(e.checksum, service::checksum(vals));
        }
        // Both operations occur, every key is used.
        let ops: BTreeSet<u32> = (1..=400).map(|i| w.request(i).unwrap().op).collect();
        assert_eq!(ops, BTreeSet::from([op::PUT, op::ADD]));
        let keys: BTreeSet<u64> = (1..=400).map(|i| w.request(i).unwrap().key).collect();
        assert_eq!(keys.len(), 7);
        assert!(w.request(0).is_none() && w.request(401).is_none());
    }

    #[test]
    fn window_bounds_outstanding_and_unanswered_is_in_id_order() {
        let mut c = Checker::new(Workload::new(10, 4, 1));
        let sent: Vec<u64> = std::iter::from_fn(|| c.next_to_send(3))
            .map(|r| r.id)
            .collect();
        assert_eq!(sent, [1, 2, 3]);
        let f = good(c.workload(), 2, status::OK);
        assert_eq!(
            c.check(&f),
            Verdict::Answered {
                id: 2,
                replay: false
            }
        );
        assert_eq!(c.next_to_send(3).map(|r| r.id), Some(4));
        assert_eq!(c.next_to_send(3), None);
        let ids: Vec<u64> = c.unanswered().iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 3, 4]);
    }

    #[test]
    fn replays_duplicates_and_a_full_run_pass() {
        let mut c = Checker::new(Workload::new(5, 2, 9));
        while c.next_to_send(8).is_some() {}
        for id in 1..=3 {
            let f = good(c.workload(), id, status::OK);
            assert!(matches!(c.check(&f), Verdict::Answered { .. }));
        }
        // After a failover: 4 and 5 come back as replays, 3 again as a
        // duplicate of an accepted answer.
        let f = good(c.workload(), 4, status::REPLAY);
        assert_eq!(
            c.check(&f),
            Verdict::Answered {
                id: 4,
                replay: true
            }
        );
        let f = good(c.workload(), 3, status::REPLAY);
        assert_eq!(c.check(&f), Verdict::Duplicate { id: 3 });
        let f = good(c.workload(), 5, status::OK);
        assert!(matches!(c.check(&f), Verdict::Answered { .. }));
        assert!(c.pass());
        assert_eq!(
            c.summary_line(1),
            "client: ops=5 answered=5 replays=1 failovers=1 lost_acked=0 divergent=0 \
             last_version=5 result=pass"
        );
    }

    #[test]
    fn a_service_that_went_back_in_time_is_lost_acked() {
        let mut c = Checker::new(Workload::new(20, 3, 5));
        while c.next_to_send(20).is_some() {}
        for id in 1..=10 {
            let f = good(c.workload(), id, status::OK);
            assert!(matches!(c.check(&f), Verdict::Answered { .. }));
        }
        // A standby activated from version 6 answers the re-sent id 11 with
        // GAP at version 6: answers 7..10 are gone.
        let gap = reply(11, status::GAP, 0, 6, 123);
        assert!(matches!(c.check(&gap), Verdict::LostAcked { .. }));
        // Or it applies 11 on the old state: right version, wrong value or
        // checksum -> divergent (version 11 is not below 10).
        let e = c.workload().expected(11).unwrap();
        let wrong = reply(11, status::OK, e.value, 11, e.checksum ^ 1);
        assert!(matches!(c.check(&wrong), Verdict::Divergent { .. }));
        // A stale version on an OK status is lost work too.
        let old = reply(12, status::OK, 0, 7, 0);
        assert!(matches!(c.check(&old), Verdict::LostAcked { .. }));
        assert_eq!((c.lost_acked, c.divergent, c.answered), (2, 1, 10));
        assert!(!c.pass());
        assert!(c.summary_line(0).ends_with("result=fail"));
    }

    #[test]
    fn malformed_unknown_and_wrong_replies_are_divergent() {
        let mut c = Checker::new(Workload::new(4, 2, 2));
        while c.next_to_send(8).is_some() {}
        let e = c.workload().expected(1).unwrap();
        let cases = [
            reply(1, status::OK, e.value, 1, e.checksum)[..47].to_vec(),
            {
                let mut f = reply(1, status::OK, e.value, 1, e.checksum);
                f[0] ^= 1;
                f
            },
            {
                let mut f = reply(1, status::OK, e.value, 1, e.checksum);
                f[40] = 1; // reserved
                f
            },
            reply(1, status::BAD_OP, e.value, 1, e.checksum),
            reply(1, status::OK, e.value ^ 4, 1, e.checksum),
            reply(1, status::OK, e.value, 2, e.checksum),
            reply(9, status::OK, 0, 9, 0),
        ];
        for f in &cases {
            assert!(
                matches!(c.check(f), Verdict::Divergent { .. }),
                "{f:?} must be divergent"
            );
        }
        assert_eq!(c.divergent, cases.len() as u64);
        assert_eq!(c.answered, 0);
        assert_eq!(c.outstanding(), 4);
    }
}
