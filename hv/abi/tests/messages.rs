//! Encode/decode round trips and malformed entries for every message type.

use doppel_abi::errno::Errno;
use doppel_abi::msg::*;
use doppel_abi::splitmix::SplitMix64;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use zerocopy::{FromBytes, IntoBytes};

fn span() -> impl Strategy<Value = Span> {
    (0u64..1 << 40, 0u64..1 << 30).prop_map(|(o, l)| Span {
        offset: o * 8,
        len: l,
    })
}

fn command() -> impl Strategy<Value = Command> {
    let mode = prop_oneof![
        Just(LogDirtyMode::WriteProtect),
        Just(LogDirtyMode::Pml),
        Just(LogDirtyMode::AdScan)
    ];
    let dest = (0u64..1 << 40, 0u64..1 << 36, 0u64..8).prop_map(|(o, pages, extra)| BitmapDest {
        span: Span {
            offset: o * 8,
            len: pages.div_ceil(8) + extra,
        },
        pages,
    });
    prop_oneof![
        mode.prop_map(|mode| Command::LogDirtyEnable { mode }),
        Just(Command::LogDirtyDisable),
        dest.clone().prop_map(Command::LogDirtyPeek),
        dest.prop_map(Command::LogDirtyClean),
        Just(Command::EndEpoch),
        Just(Command::Resume),
        (0..=MAX_EPOCH).prop_map(|epoch| Command::CommitEpoch { epoch }),
        (0..=MAX_EPOCH).prop_map(|epoch| Command::Activate { epoch }),
        (any::<u32>(), 0u64..1 << 40, 1032u64..1 << 20).prop_map(|(vcpu, o, len)| {
            Command::ReadVcpu {
                vcpu,
                dest: Span { offset: o * 8, len },
            }
        }),
        Just(Command::Detach),
    ]
}

fn errno() -> impl Strategy<Value = Errno> {
    (1i32..=Errno::MAX).prop_map(Errno)
}

fn response() -> impl Strategy<Value = Response> {
    let stats = (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(d, f, p)| LogDirtyStats {
        dirty_count: d,
        fault_count: f,
        pages: p,
    });
    let ok = prop_oneof![
        (
            prop_oneof![Just(1u32), Just(2), Just(6), Just(7), Just(8), Just(10)],
            Just(Reply::Done)
        ),
        (
            prop_oneof![Just(3u32), Just(4)],
            stats.prop_map(Reply::Stats)
        ),
        (Just(5u32), any::<u64>().prop_map(Reply::Epoch)),
        (Just(9u32), any::<u64>().prop_map(Reply::Length)),
    ];
    prop_oneof![
        (any::<u32>(), ok).prop_map(|(id, (op, r))| Response {
            id,
            op,
            result: Ok(r)
        }),
        (any::<u32>(), 1u32..=10, errno()).prop_map(|(id, op, e)| Response {
            id,
            op,
            result: Err(e)
        }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let ckpt = (
        any::<u64>(),
        0u64..1 << 20,
        0u64..1 << 30,
        0u64..1 << 20,
        span(),
    )
        .prop_map(|(epoch, n, pfn_at, page_at, vcpu)| {
            Event::CheckpointReady(CheckpointReady {
                epoch,
                dirty_count: n,
                pfn_list: Span {
                    offset: pfn_at * 8,
                    len: n * 8,
                },
                pages: Span {
                    offset: page_at * PAGE_SIZE,
                    len: n * PAGE_SIZE,
                },
                vcpu: Span {
                    offset: vcpu.offset,
                    len: vcpu.len.max(1),
                },
            })
        });
    prop_oneof![
        ckpt,
        (any::<u64>(), any::<u64>())
            .prop_map(|(epoch, bytes)| Event::OutputAvailable { epoch, bytes }),
        (any::<u64>(), any::<u32>(), errno()).prop_map(|(epoch, op, errno)| Event::Error {
            epoch,
            op,
            errno
        }),
    ]
}

fn ack() -> impl Strategy<Value = Ack> {
    (
        1u32..=3,
        any::<u32>(),
        any::<u64>(),
        proptest::option::of(errno()),
    )
        .prop_map(|(kind, seq, epoch, err)| Ack {
            kind,
            seq,
            epoch,
            result: err.map_or(Ok(()), Err),
        })
}

/// The four entry types on the rings (in [`KINDS`] order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Command,
    Response,
    Event,
    Ack,
}

const KINDS: [Kind; 4] = [Kind::Command, Kind::Response, Kind::Event, Kind::Ack];

/// A valid message of some type, encoded: the bytes as they sit in the ring.
fn valid_entry() -> impl Strategy<Value = (Kind, Vec<u8>)> {
    prop_oneof![
        (command(), any::<u32>())
            .prop_map(|(c, id)| (Kind::Command, c.encode(id).as_bytes().to_vec())),
        response().prop_map(|r| (Kind::Response, r.encode().as_bytes().to_vec())),
        (event(), any::<u32>())
            .prop_map(|(ev, seq)| (Kind::Event, ev.encode(seq).as_bytes().to_vec())),
        ack().prop_map(|a| (Kind::Ack, a.encode().as_bytes().to_vec())),
    ]
}

/// Decodes `bytes` as a `kind` entry. One that decodes must encode back to
/// exactly these bytes (decode neither loses nor invents anything); `Ok`
/// says whether it decoded.
fn decode_reencodes(kind: Kind, bytes: &[u8]) -> Result<bool, String> {
    fn same(decoded: impl core::fmt::Debug, back: &[u8], bytes: &[u8]) -> Result<bool, String> {
        if back == bytes {
            Ok(true)
        } else {
            Err(format!(
                "{decoded:?} decoded from {bytes:02x?} encodes to {back:02x?}"
            ))
        }
    }
    match kind {
        Kind::Command => {
            let e = CommandEntry::read_from_bytes(bytes).unwrap();
            e.decode()
                .map_or(Ok(false), |c| same(c, c.encode(e.id).as_bytes(), bytes))
        }
        Kind::Response => {
            let e = ResponseEntry::read_from_bytes(bytes).unwrap();
            e.decode()
                .map_or(Ok(false), |r| same(r, r.encode().as_bytes(), bytes))
        }
        Kind::Event => {
            let e = EventEntry::read_from_bytes(bytes).unwrap();
            e.decode()
                .map_or(Ok(false), |ev| same(ev, ev.encode(e.seq).as_bytes(), bytes))
        }
        Kind::Ack => {
            let e = EventAck::read_from_bytes(bytes).unwrap();
            e.decode()
                .map_or(Ok(false), |a| same(a, a.encode().as_bytes(), bytes))
        }
    }
}

/// XORs each `(offset, value)` into `bytes` (offsets wrap; values are
/// non-zero, so each one changes a byte unless two hit the same one).
fn mutate(bytes: &mut [u8], flips: &[(usize, u8)]) {
    let n = bytes.len();
    for &(at, x) in flips {
        bytes[at % n] ^= x;
    }
}

proptest! {
    #[test]
    fn command_round_trip(c in command(), id in any::<u32>()) {
        let e = c.encode(id);
        let back = CommandEntry::read_from_bytes(e.as_bytes()).unwrap();
        prop_assert_eq!(back.id, id);
        prop_assert_eq!(back.decode(), Ok(c));
    }

    #[test]
    fn command_reserved_bits_are_refused(c in command(), word in 0usize..4, bit in 0u32..64) {
        let mut e = c.encode(1);
        e.reserved[word] |= 1 << bit;
        prop_assert_eq!(e.decode(), Err(DecodeError::ReservedNonZero("reserved")));
        prop_assert_eq!(e.decode().unwrap_err().errno(), Errno::EINVAL);
    }

    #[test]
    fn unused_args_are_refused(bit in 0u32..64) {
        for c in [Command::LogDirtyDisable, Command::EndEpoch, Command::Resume, Command::Detach] {
            let mut e = c.encode(1);
            e.args[0] |= 1 << bit;
            prop_assert_eq!(e.decode(), Err(DecodeError::ReservedNonZero("args[0]")));
        }
        for c in [Command::CommitEpoch { epoch: 3 }, Command::LogDirtyEnable { mode: LogDirtyMode::Pml }] {
            let mut e = c.encode(1);
            e.args[2] |= 1 << bit;
            prop_assert_eq!(e.decode(), Err(DecodeError::ReservedNonZero("args[2]")));
        }
    }

    #[test]
    fn unknown_opcodes_are_refused(op in 11u32.., id in any::<u32>()) {
        let e = CommandEntry { op, id, ..CommandEntry::default() };
        prop_assert_eq!(e.decode(), Err(DecodeError::UnknownOpcode(op)));
        prop_assert_eq!(DecodeError::UnknownOpcode(op).errno().to_wire(), -38);
    }

    /// Uniformly random bytes practically never get past the reserved-word
    /// checks, so this is mostly a no-panic test; the re-encode check is
    /// exercised by `mutated_entries_decode_only_to_what_reencodes_exactly`.
    #[test]
    fn any_bytes_decode_without_panic_and_reencode_exactly(bytes in proptest::collection::vec(any::<u8>(), 128)) {
        let c = CommandEntry::read_from_bytes(&bytes[..64]).unwrap();
        if let Ok(cmd) = c.decode() {
            prop_assert_eq!(cmd.encode(c.id), c);
        }
        let r = ResponseEntry::read_from_bytes(&bytes[..64]).unwrap();
        if let Ok(rsp) = r.decode() {
            prop_assert_eq!(rsp.encode(), r);
        }
        let e = EventEntry::read_from_bytes(&bytes[..]).unwrap();
        if let Ok(ev) = e.decode() {
            prop_assert_eq!(ev.encode(e.seq), e);
        }
        let a = EventAck::read_from_bytes(&bytes[..64]).unwrap();
        if let Ok(ack) = a.decode() {
            prop_assert_eq!(ack.encode(), a);
        }
    }

    /// A valid entry with up to two bytes changed: whatever still decodes
    /// must encode back to exactly the changed bytes (so a decoder that
    /// ignores or normalises a bit fails here), and nothing panics.
    #[test]
    fn mutated_entries_decode_only_to_what_reencodes_exactly(
        (kind, mut bytes) in valid_entry(),
        flips in proptest::collection::vec((any::<Index>(), 1u8..=255), 0..=2),
    ) {
        let flips: Vec<(usize, u8)> = flips.iter().map(|(i, x)| (i.index(bytes.len()), *x)).collect();
        mutate(&mut bytes, &flips);
        if let Err(e) = decode_reencodes(kind, &bytes) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn response_round_trip(r in response()) {
        let e = r.encode();
        prop_assert_eq!(ResponseEntry::read_from_bytes(e.as_bytes()).unwrap().decode(), Ok(r));
    }

    #[test]
    fn response_with_positive_or_huge_status_is_refused(status in prop_oneof![1i32.., i32::MIN..-4095]) {
        let e = ResponseEntry { op: 1, id: 0, status, ..ResponseEntry::default() };
        prop_assert_eq!(e.decode(), Err(DecodeError::OutOfRange("status")));
    }

    #[test]
    fn event_round_trip(ev in event(), seq in any::<u32>()) {
        let e = ev.encode(seq);
        prop_assert_eq!(EventEntry::read_from_bytes(e.as_bytes()).unwrap().decode(), Ok(ev));
    }

    #[test]
    fn ack_round_trip(a in ack()) {
        prop_assert_eq!(a.encode().decode(), Ok(a));
    }
}

/// The mutation test above only means something if both of its outcomes
/// happen: the same generation, seeded, over 2000 cases, must both decode
/// changed entries (and re-encode them exactly) and refuse others, for
/// every entry type.
#[test]
fn mutated_entries_are_both_accepted_and_refused() {
    const CASES: usize = 2000;
    let mut runner = TestRunner::deterministic();
    let entries = valid_entry();
    let mut rng = SplitMix64::new(0xd0_99e1);
    // Per kind: [unchanged and decoded, changed and decoded, refused].
    let mut seen = [[0usize; 3]; 4];
    for _ in 0..CASES {
        let (kind, mut bytes) = entries.new_tree(&mut runner).unwrap().current();
        let flips: Vec<(usize, u8)> = (0..rng.below(3))
            .map(|_| {
                (
                    rng.below(bytes.len() as u64) as usize,
                    1 + rng.below(255) as u8,
                )
            })
            .collect();
        let original = bytes.clone();
        mutate(&mut bytes, &flips);
        let decoded = decode_reencodes(kind, &bytes).unwrap();
        seen[kind as usize][match (decoded, bytes == original) {
            (true, true) => 0,
            (true, false) => 1,
            (false, _) => 2,
        }] += 1;
    }
    eprintln!("per kind [unchanged ok, changed ok, refused]: {seen:?}");
    let total = |i: usize| seen.iter().map(|s| s[i]).sum::<usize>();
    assert!(
        total(0) + total(1) >= CASES / 10,
        "decoded: {}",
        total(0) + total(1)
    );
    // A random offset lands in a reserved word about half the time, so
    // changed entries that still decode are the rarer outcome (7% here).
    assert!(total(1) >= CASES / 20, "changed and decoded: {}", total(1));
    assert!(total(2) >= CASES / 10, "refused: {}", total(2));
    for (kind, s) in KINDS.iter().zip(seen) {
        assert!(s[1] >= 10 && s[2] >= 10, "{kind:?}: {s:?}");
    }
}

#[test]
fn epochs_stop_short_of_the_unprotected_tag() {
    // Activate at u64::MAX - 1 would make the standby's next epoch
    // UNPROTECTED_EPOCH, the tag of output nobody protects.
    for o in [op::COMMIT_EPOCH, op::ACTIVATE] {
        let at = |epoch| CommandEntry {
            op: o,
            args: [epoch, 0, 0],
            ..Default::default()
        };
        for bad in [MAX_EPOCH + 1, UNPROTECTED_EPOCH] {
            assert_eq!(at(bad).decode(), Err(DecodeError::OutOfRange("epoch")));
        }
        assert!(at(MAX_EPOCH).decode().is_ok());
    }
}

#[test]
fn out_of_range_fields_are_refused() {
    let bad_mode = CommandEntry {
        op: op::LOG_DIRTY_ENABLE,
        args: [4, 0, 0],
        ..Default::default()
    };
    assert_eq!(bad_mode.decode(), Err(DecodeError::OutOfRange("mode")));
    assert_eq!(bad_mode.decode().unwrap_err().errno().to_wire(), -34);
    let zero_mode = CommandEntry {
        op: op::LOG_DIRTY_ENABLE,
        ..Default::default()
    };
    assert_eq!(zero_mode.decode(), Err(DecodeError::OutOfRange("mode")));
    let huge_mode = CommandEntry {
        op: op::LOG_DIRTY_ENABLE,
        args: [1 << 32 | 1, 0, 0],
        ..Default::default()
    };
    assert_eq!(huge_mode.decode(), Err(DecodeError::OutOfRange("mode")));
    // Bitmap too short for the pfns it must cover: 17 pfns need 3 bytes.
    let short = CommandEntry {
        op: op::LOG_DIRTY_CLEAN,
        args: [64, 2, 17],
        ..Default::default()
    };
    assert_eq!(short.decode(), Err(DecodeError::OutOfRange("bitmap pages")));
    let ok = CommandEntry {
        op: op::LOG_DIRTY_CLEAN,
        args: [64, 3, 17],
        ..Default::default()
    };
    assert!(ok.decode().is_ok());
    let unaligned = CommandEntry {
        op: op::LOG_DIRTY_PEEK,
        args: [65, 3, 17],
        ..Default::default()
    };
    assert_eq!(
        unaligned.decode(),
        Err(DecodeError::OutOfRange("bitmap offset"))
    );
    let wrap = CommandEntry {
        op: op::LOG_DIRTY_PEEK,
        args: [u64::MAX - 7, 16, 17],
        ..Default::default()
    };
    assert_eq!(wrap.decode(), Err(DecodeError::OutOfRange("bitmap len")));
    let vcpu = CommandEntry {
        op: op::READ_VCPU,
        args: [1 << 32, 0, 2048],
        ..Default::default()
    };
    assert_eq!(vcpu.decode(), Err(DecodeError::OutOfRange("vcpu")));
    let small = CommandEntry {
        op: op::READ_VCPU,
        args: [0, 0, 1031],
        ..Default::default()
    };
    assert_eq!(small.decode(), Err(DecodeError::OutOfRange("dest len")));
}

#[test]
fn checkpoint_spans_must_agree_with_dirty_count() {
    let good = Event::CheckpointReady(CheckpointReady {
        epoch: 7,
        dirty_count: 3,
        pfn_list: Span {
            offset: 8192,
            len: 24,
        },
        pages: Span {
            offset: 4096 * 4,
            len: 3 * 4096,
        },
        vcpu: Span {
            offset: 1024,
            len: 1100,
        },
    })
    .encode(1);
    assert!(good.decode().is_ok());
    let mut e = good;
    e.pfn_list.len = 16;
    assert_eq!(e.decode(), Err(DecodeError::OutOfRange("pfn_list len")));
    let mut e = good;
    e.pages.len += 1;
    assert_eq!(e.decode(), Err(DecodeError::OutOfRange("pages len")));
    let mut e = good;
    e.pages.offset += 8;
    assert_eq!(e.decode(), Err(DecodeError::OutOfRange("pages offset")));
    let mut e = good;
    e.vcpu.len = 0;
    assert_eq!(e.decode(), Err(DecodeError::OutOfRange("vcpu len")));
    let mut e = good;
    e.value = u64::MAX;
    assert_eq!(e.decode(), Err(DecodeError::OutOfRange("pfn_list len")));
    let mut e = good;
    e.status = -22;
    assert_eq!(e.decode(), Err(DecodeError::ReservedNonZero("status")));
    let mut e = good;
    e.kind = 0;
    assert_eq!(e.decode(), Err(DecodeError::UnknownOpcode(0)));
    let mut out = Event::OutputAvailable { epoch: 1, bytes: 5 }.encode(0);
    out.vcpu.len = 1;
    assert_eq!(out.decode(), Err(DecodeError::ReservedNonZero("spans")));
    let mut err = Event::Error {
        epoch: 1,
        op: 5,
        errno: Errno::EBUSY,
    }
    .encode(0);
    assert_eq!(err.status, -16);
    err.status = 0;
    assert_eq!(err.decode(), Err(DecodeError::OutOfRange("status")));
}

#[test]
fn error_responses_carry_negative_errno() {
    let req = Command::LogDirtyEnable {
        mode: LogDirtyMode::Pml,
    }
    .encode(42);
    let r = Response::error(&req, Errno::EINVAL).encode();
    assert_eq!(
        (r.op, r.id, r.status, r.vals),
        (op::LOG_DIRTY_ENABLE, 42, -22, [0; 3])
    );
    let mut bad = r;
    bad.vals[1] = 1;
    assert_eq!(bad.decode(), Err(DecodeError::ReservedNonZero("vals[1]")));
    let mut bad = r;
    bad.reserved0 = 1;
    assert_eq!(bad.decode(), Err(DecodeError::ReservedNonZero("reserved0")));
    let unknown = ResponseEntry {
        op: 77,
        ..ResponseEntry::default()
    };
    assert_eq!(unknown.decode(), Err(DecodeError::UnknownOpcode(77)));
}

#[test]
fn detach_has_opcode_10_no_arguments_and_a_done_reply() {
    let e = Command::Detach.encode(7);
    assert_eq!((e.op, e.id, e.args, e.reserved), (10, 7, [0; 3], [0; 4]));
    assert_eq!(op::DETACH, 10);
    assert_eq!(e.decode(), Ok(Command::Detach));
    for w in 0..3 {
        let mut bad = e;
        bad.args[w] = 1;
        let name = ["args[0]", "args[1]", "args[2]"][w];
        assert_eq!(bad.decode(), Err(DecodeError::ReservedNonZero(name)));
    }
    let done = Response {
        id: 7,
        op: op::DETACH,
        result: Ok(Reply::Done),
    }
    .encode();
    assert_eq!((done.op, done.status, done.vals), (10, 0, [0; 3]));
    assert_eq!(done.decode().unwrap().result, Ok(Reply::Done));
    // A Done answer to Detach carries no values.
    let mut bad = done;
    bad.vals[0] = 3;
    assert_eq!(bad.decode(), Err(DecodeError::ReservedNonZero("vals[0]")));
    let refused = Response::error(&e, Errno::EINVAL).encode();
    assert_eq!(refused.decode().unwrap().result, Err(Errno::EINVAL));
}
