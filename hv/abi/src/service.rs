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

/// SplitMix64's finaliser: a cheap, well-mixing bijection on u64.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One key's contribution to the state checksum.
pub const fn term(key: u64, value: u64) -> u64 {
    mix64(mix64(key.wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ value)
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

impl Request {
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

    #[test]
    fn unknown_op_is_refused() {
        assert_eq!(apply(0, 1, 2), None);
        assert_eq!(apply(op::ADD, u64::MAX, 2), Some(1));
    }
}
