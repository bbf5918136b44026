//! The protected service: a key-value / counter server in the test guest
//! (hv/guest, `program = PROGRAM_KV`), its wire frames and its state
//! checksum. Shared by the guest, the hypervisor (which only moves frames),
//! the dom0 tool (which forwards them) and the client (which checks them).
//!
//! Path of a request: client --TCP--> `doppel primary` --input channel-->
//! hypervisor --`RECV` hypercall--> guest. Path of a reply: guest --`SEND`
//! hypercall--> hypervisor, which holds it, tagged with the epoch that
//! produced it, until the backup has committed that epoch (output commit)
//! --output channel--> `doppel primary` --TCP--> client.
//!
//! One channel record carries exactly one frame. Frames are little-endian.
//!
//! Semantics (docs/REPLICATION.md, "The protected service"):
//! - The state is `keys` u64 values, all 0 at boot, each on its own guest
//!   page, plus a version (requests applied so far) and a checksum.
//! - Every request mutates: `PUT` stores the value, `ADD` adds it (wrapping).
//!   The reply carries the key's new value, the new version and the state
//!   checksum after the request.
//! - Request ids start at 1 and are consecutive: id `version + 1` is applied;
//!   an id already applied within the last [`REPLAY_WINDOW`] is answered
//!   from the guest's reply cache with status [`status::REPLAY`] and
//!   otherwise the same bytes (idempotent retry); anything else is refused
//!   with an error status and changes nothing.
//! - So for a single client the version in the reply to request `id` is
//!   `id`, and the checksum is [`checksum`] of the client's own model after
//!   applying requests 1..=id: a client can check every reply.

use core::mem::{offset_of, size_of};

use crate::layout::layout_struct;
use crate::splitmix::{mix64, GAMMA};

/// "DKVQ": request frame magic.
pub const REQ_MAGIC: u32 = u32::from_le_bytes(*b"DKVQ");
/// "DKVR": reply frame magic.
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"DKVR");

/// Most keys a service may have.
pub const MAX_KEYS: u32 = 4096;
/// Replies the guest keeps for idempotent retries; a client keeps at most
/// this many requests unanswered.
pub const REPLAY_WINDOW: u64 = 32;

/// Request operations.
pub mod op {
    /// `value` becomes the key's value.
    pub const PUT: u32 = 1;
    /// `value` is added to the key's value (wrapping).
    pub const ADD: u32 = 2;
}

/// Reply statuses.
pub mod status {
    /// Applied now.
    pub const OK: u32 = 0;
    /// Applied before; this is the cached reply (same id, value, version,
    /// checksum as the first answer).
    pub const REPLAY: u32 = 1;
    /// Unknown operation.
    pub const BAD_OP: u32 = 2;
    /// Key out of range.
    pub const BAD_KEY: u32 = 3;
    /// The id skips ahead of `version + 1`.
    pub const GAP: u32 = 4;
    /// The id is older than the reply cache.
    pub const STALE: u32 = 5;
    /// The frame is not a request (size or magic).
    pub const BAD_FRAME: u32 = 6;
}

layout_struct! {
    /// A client request.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Request {
        /// [`REQ_MAGIC`].
        pub magic: u32,
        /// One of [`op`].
        pub op: u32,
        /// 1, 2, 3, ... per client.
        pub id: u64,
        pub key: u64,
        pub value: u64,
    }
}

const _: () = assert!(size_of::<Request>() == 32);
const _: () = assert!(offset_of!(Request, id) == 8);
const _: () = assert!(offset_of!(Request, key) == 16);
const _: () = assert!(offset_of!(Request, value) == 24);

layout_struct! {
    /// The guest's answer.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Reply {
        /// [`REPLY_MAGIC`].
        pub magic: u32,
        /// One of [`status`].
        pub status: u32,
        /// The request's id.
        pub id: u64,
        /// The key's value after the request.
        pub value: u64,
        /// Requests applied so far (after this one).
        pub version: u64,
        /// [`checksum`] of the whole state after this request.
        pub checksum: u64,
        /// Must be zero.
        pub reserved: u64,
    }
}

const _: () = assert!(size_of::<Reply>() == 48);
const _: () = assert!(offset_of!(Reply, id) == 8);
const _: () = assert!(offset_of!(Reply, value) == 16);
const _: () = assert!(offset_of!(Reply, version) == 24);
const _: () = assert!(offset_of!(Reply, checksum) == 32);

/// One key's contribution to the state checksum.
pub const fn term(key: u64, value: u64) -> u64 {
    mix64(mix64(key.wrapping_add(GAMMA)) ^ value)
}

/// The state checksum: the wrapping sum of [`term`] over every key. A
/// sum, so the guest updates it in O(1) per request (subtract the old
/// term, add the new) while the client recomputes it from its model.
pub fn checksum(values: impl IntoIterator<Item = u64>) -> u64 {
    values
        .into_iter()
        .enumerate()
        .fold(0u64, |acc, (k, v)| acc.wrapping_add(term(k as u64, v)))
}

/// The key's new value after `op` with `arg`, or `None` for an unknown op.
pub const fn apply(op: u32, old: u64, arg: u64) -> Option<u64> {
    match op {
        op::PUT => Some(arg),
        op::ADD => Some(old.wrapping_add(arg)),
        _ => None,
    }
}

/// What serving one frame does: [`decide`]'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request is applied: key `key` becomes `reply.value`, the state's
    /// version `reply.version` (the request's id) and its checksum
    /// `reply.checksum`; `reply` goes into the reply cache (slot
    /// `reply.id % REPLAY_WINDOW`) and is the answer.
    Apply { key: u64, reply: Reply },
    /// Nothing changes; this is the answer (a replay from the reply cache
    /// or a refusal).
    Answer(Reply),
}

/// The service's semantics (module docs) in one place for every
/// implementation, whatever its memory layout: serve `frame` against a
/// state of `keys` keys at `version` with `checksum`. `value(k)` reads key
/// `k` (asked only for `k < keys`); `cached(id)` reads the reply cache slot
/// of `id` (asked only for an id within the last [`REPLAY_WINDOW`]
/// applied). The caller carries the [`Outcome`] out.
///
/// A refusal carries the state's version and checksum and the request's
/// id: that of the frame's bytes 8..16 for a frame that is not a request
/// (0 when it is shorter). A cache slot that does not hold `id`'s reply
/// makes the request [`status::STALE`].
pub fn decide(
    frame: &[u8],
    keys: u64,
    version: u64,
    checksum: u64,
    value: impl FnOnce(u64) -> u64,
    cached: impl FnOnce(u64) -> Reply,
) -> Outcome {
    let refuse = |status: u32, id: u64| {
        Outcome::Answer(Reply {
            magic: REPLY_MAGIC,
            status,
            id,
            value: 0,
            version,
            checksum,
            reserved: 0,
        })
    };
    let Some(r) = Request::parse(frame) else {
        let id = frame
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        return refuse(status::BAD_FRAME, id);
    };
    if r.id == version.wrapping_add(1) {
        if r.key >= keys {
            return refuse(status::BAD_KEY, r.id);
        }
        let old = value(r.key);
        let Some(new) = apply(r.op, old, r.value) else {
            return refuse(status::BAD_OP, r.id);
        };
        let sum = checksum
            .wrapping_sub(term(r.key, old))
            .wrapping_add(term(r.key, new));
        Outcome::Apply {
            key: r.key,
            reply: Reply {
                magic: REPLY_MAGIC,
                status: status::OK,
                id: r.id,
                value: new,
                version: r.id,
                checksum: sum,
                reserved: 0,
            },
        }
    } else if r.id >= 1 && r.id <= version && version - r.id < REPLAY_WINDOW {
        match cached(r.id) {
            c if c.id == r.id && c.magic == REPLY_MAGIC => Outcome::Answer(Reply {
                status: status::REPLAY,
                ..c
            }),
            _ => refuse(status::STALE, r.id),
        }
    } else if r.id > version {
        refuse(status::GAP, r.id)
    } else {
        refuse(status::STALE, r.id)
    }
}

impl Request {
    /// Request `id`: `op` with `value` on key `key`.
    pub const fn new(id: u64, op: u32, key: u64, value: u64) -> Self {
        Self {
            magic: REQ_MAGIC,
            op,
            id,
            key,
            value,
        }
    }

    /// Parse a frame (exact size, magic); `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let r = <Self as zerocopy::FromBytes>::read_from_bytes(bytes).ok()?;
        (r.magic == REQ_MAGIC).then_some(r)
    }
}

impl Reply {
    /// Parse a frame (exact size, magic, reserved zero); `None` otherwise.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let r = <Self as zerocopy::FromBytes>::read_from_bytes(bytes).ok()?;
        (r.magic == REPLY_MAGIC && r.reserved == 0).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn checksum_is_incremental() {
        let mut vals = [0u64; 64];
        let mut sum = checksum(vals);
        for i in 0..500u64 {
            let k = (mix64(i) % 64) as usize;
            let new = apply(if i % 3 == 0 { op::PUT } else { op::ADD }, vals[k], i * 7)
                .expect("known op");
            sum = sum
                .wrapping_sub(term(k as u64, vals[k]))
                .wrapping_add(term(k as u64, new));
            vals[k] = new;
            assert_eq!(sum, checksum(vals));
        }
    }

    #[test]
    fn different_states_have_different_checksums() {
        let a = checksum([0u64, 1, 2]);
        let b = checksum([0u64, 2, 1]);
        let c = checksum([0u64, 1, 3]);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let r = Request {
            magic: REQ_MAGIC,
            op: op::ADD,
            id: 9,
            key: 3,
            value: 5,
        };
        assert_eq!(Request::parse(r.as_bytes()), Some(r));
        assert_eq!(Request::parse(&r.as_bytes()[..31]), None);
        let mut bad = r;
        bad.magic = REPLY_MAGIC;
        assert_eq!(Request::parse(bad.as_bytes()), None);
        let p = Reply {
            magic: REPLY_MAGIC,
            status: status::OK,
            id: 9,
            value: 5,
            version: 9,
            checksum: 1,
            reserved: 0,
        };
        assert_eq!(Reply::parse(p.as_bytes()), Some(p));
        let mut q = p;
        q.reserved = 1;
        assert_eq!(Reply::parse(q.as_bytes()), None);
    }

    /// A model service: the values, version, checksum and reply cache as
    /// plain fields, changed only as [`decide`] says.
    struct Model {
        values: [u64; 4],
        version: u64,
        checksum: u64,
        cache: [Reply; REPLAY_WINDOW as usize],
    }

    impl Model {
        fn serve(&mut self, frame: &[u8]) -> Reply {
            let keys = self.values.len() as u64;
            let (values, cache, version) = (self.values, self.cache, self.version);
            let out = decide(
                frame,
                keys,
                self.version,
                self.checksum,
                |k| {
                    assert!(k < keys, "value of key {k} read");
                    values[k as usize]
                },
                |id| {
                    assert!(
                        id <= version && version - id < REPLAY_WINDOW,
                        "cache of {id} read"
                    );
                    cache[(id % REPLAY_WINDOW) as usize]
                },
            );
            match out {
                Outcome::Apply { key, reply } => {
                    self.values[key as usize] = reply.value;
                    self.version = reply.version;
                    self.checksum = reply.checksum;
                    self.cache[(reply.id % REPLAY_WINDOW) as usize] = reply;
                    reply
                }
                Outcome::Answer(reply) => reply,
            }
        }
    }

    #[test]
    fn decide_applies_in_order_replays_from_the_cache_and_refuses_the_rest() {
        let mut m = Model {
            values: [0; 4],
            version: 0,
            checksum: checksum([0u64; 4]),
            cache: [Reply::default(); REPLAY_WINDOW as usize],
        };
        let mut vals = [0u64; 4];
        let mut answers = [Reply::default(); 51];
        for id in 1..=50u64 {
            let (o, k, v) = (if id % 4 == 0 { op::PUT } else { op::ADD }, id % 4, id * 3);
            let got = m.serve(Request::new(id, o, k, v).as_bytes());
            vals[k as usize] = apply(o, vals[k as usize], v).expect("known op");
            let want = Reply {
                magic: REPLY_MAGIC,
                status: status::OK,
                id,
                value: vals[k as usize],
                version: id,
                checksum: checksum(vals),
                reserved: 0,
            };
            assert_eq!(got, want);
            answers[id as usize] = got;
        }
        // The oldest id still cached is version - (window - 1): the same
        // reply, status REPLAY, nothing changed.
        for id in [50 - (REPLAY_WINDOW - 1), 50] {
            let got = m.serve(Request::new(id, op::ADD, 0, 99).as_bytes());
            let want = Reply {
                status: status::REPLAY,
                ..answers[id as usize]
            };
            assert_eq!(got, want);
        }
        let bytes = |r: Request| -> [u8; 32] { r.as_bytes().try_into().expect("32 bytes") };
        let mut bad_magic = bytes(Request::new(51, op::PUT, 0, 1));
        bad_magic[..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        let cases = [
            (
                bytes(Request::new(50 - REPLAY_WINDOW, op::ADD, 0, 1)),
                32,
                status::STALE,
                50 - REPLAY_WINDOW,
            ),
            (bytes(Request::new(0, op::ADD, 0, 1)), 32, status::STALE, 0),
            (bytes(Request::new(52, op::ADD, 0, 1)), 32, status::GAP, 52),
            (bytes(Request::new(51, 9, 0, 1)), 32, status::BAD_OP, 51),
            (
                bytes(Request::new(51, op::PUT, 4, 1)),
                32,
                status::BAD_KEY,
                51,
            ),
            (
                bytes(Request::new(51, op::PUT, 0, 1)),
                31,
                status::BAD_FRAME,
                51,
            ),
            (
                bytes(Request::new(51, op::PUT, 0, 1)),
                15,
                status::BAD_FRAME,
                0,
            ),
            (bad_magic, 32, status::BAD_FRAME, 51),
        ];
        for (frame, len, st, id) in cases {
            let want = Reply {
                magic: REPLY_MAGIC,
                status: st,
                id,
                value: 0,
                version: 50,
                checksum: checksum(vals),
                reserved: 0,
            };
            assert_eq!(m.serve(&frame[..len]), want);
        }
        assert_eq!(
            (m.values, m.version, m.checksum),
            (vals, 50, checksum(vals))
        );
        // A cache slot that lost its reply: STALE, not a wrong replay.
        m.cache[(45 % REPLAY_WINDOW) as usize].id = 13;
        assert_eq!(
            m.serve(Request::new(45, op::ADD, 0, 1).as_bytes()).status,
            status::STALE
        );
        m.cache[(46 % REPLAY_WINDOW) as usize].magic = REQ_MAGIC;
        assert_eq!(
            m.serve(Request::new(46, op::ADD, 0, 1).as_bytes()).status,
            status::STALE
        );
        assert_eq!((m.values, m.version), (vals, 50));
    }

    #[test]
    fn unknown_op_is_refused() {
        assert_eq!(apply(0, 1, 2), None);
        assert_eq!(apply(op::ADD, u64::MAX, 2), Some(1));
    }
}
