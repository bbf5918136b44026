//! The events the hypervisor posted on the event ring and the tool has not
//! acknowledged yet, and how its acks are matched to them.
//!
//! The event ring answers by slot position: the tool consumes events in
//! order and answers each exactly once, so the n-th ack answers the n-th
//! event. [`PostedEvents`] keeps the unanswered events oldest first and
//! checks every ack against the oldest one: same kind, sequence number and
//! epoch. Anything else (an ack for an event never posted, for another
//! event, or one that does not decode) is a protocol error: the caller
//! stops replication rather than guess which event the tool meant. In
//! particular an ack claiming to answer a checkpoint frees the staging area
//! only when a checkpoint is the oldest unanswered event.
//!
//! The engine posts no `OutputAvailable` hints any more (the tool's bridge
//! reads the output channel by itself, docs/REPLICATION.md); an ack of one
//! is still matched like any event's, should a hypervisor post it.

use doppel_abi::errno::Errno;
use doppel_abi::msg::{kind, Ack, DecodeError};
use heapless::Deque;

/// One posted event, as its ack must name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Posted {
    /// One of [`kind`].
    pub kind: u32,
    pub seq: u32,
    pub epoch: u64,
}

/// What an accepted ack answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answered {
    pub event: Posted,
    /// The tool's verdict (`Err`: it rejected the event).
    pub result: Result<(), Errno>,
}

/// Why an ack was refused. None of these change the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckError {
    /// An ack with no event unanswered.
    Unsolicited { got: Ack },
    /// The ack names another event than the oldest unanswered one.
    Mismatch { want: Posted, got: Ack },
    /// The ack did not decode.
    Malformed(DecodeError),
}

/// No room to record another event (more posted than the ring holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordFull;

/// Unanswered events, oldest first, at most `N`.
pub struct PostedEvents<const N: usize> {
    queue: Deque<Posted, N>,
    next_seq: u32,
    checkpoints: u32,
}

impl<const N: usize> Default for PostedEvents<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> PostedEvents<N> {
    pub const fn new() -> Self {
        Self {
            queue: Deque::new(),
            next_seq: 0,
            checkpoints: 0,
        }
    }

    /// The sequence number the next posted event carries.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Whether one more event can be recorded.
    pub fn can_post(&self) -> bool {
        !self.queue.is_full()
    }

    /// Record an event of `kind` for `epoch`, just pushed with sequence
    /// number [`PostedEvents::next_seq`]. Check [`PostedEvents::can_post`]
    /// before pushing.
    pub fn posted(&mut self, kind: u32, epoch: u64) -> Result<(), RecordFull> {
        let p = Posted {
            kind,
            seq: self.next_seq,
            epoch,
        };
        self.queue.push_back(p).map_err(|_| RecordFull)?;
        self.next_seq = self.next_seq.wrapping_add(1);
        if kind == kind::CHECKPOINT_READY {
            self.checkpoints += 1;
        }
        Ok(())
    }

    /// Match one ack (as decoded) against the oldest unanswered event.
    pub fn take(&mut self, ack: Result<Ack, DecodeError>) -> Result<Answered, AckError> {
        let got = ack.map_err(AckError::Malformed)?;
        let Some(&want) = self.queue.front() else {
            return Err(AckError::Unsolicited { got });
        };
        if (got.kind, got.seq, got.epoch) != (want.kind, want.seq, want.epoch) {
            return Err(AckError::Mismatch { want, got });
        }
        self.queue.pop_front();
        if want.kind == kind::CHECKPOINT_READY {
            self.checkpoints -= 1;
        }
        Ok(Answered {
            event: want,
            result: got.result,
        })
    }

    /// Forgets every unanswered event: their session is over (the tool
    /// detached), and whatever acks still come for them are skipped unread.
    /// Sequence numbers run on.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.checkpoints = 0;
    }

    /// Checkpoints not answered yet (the staging area is busy while > 0).
    pub fn checkpoints(&self) -> u32 {
        self.checkpoints
    }

    /// Events not answered yet.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn ack(p: Posted, result: Result<(), Errno>) -> Result<Ack, DecodeError> {
        Ok(Ack {
            kind: p.kind,
            seq: p.seq,
            epoch: p.epoch,
            result,
        })
    }

    #[test]
    fn a_hint_ack_does_not_free_the_checkpoint() {
        let mut ev = PostedEvents::<16>::new();
        ev.posted(kind::CHECKPOINT_READY, 4).unwrap();
        ev.posted(kind::OUTPUT_AVAILABLE, 3).unwrap();
        assert_eq!(ev.checkpoints(), 1);
        // The tool answers the hint's slot first, claiming a checkpoint.
        let forged = Posted {
            kind: kind::CHECKPOINT_READY,
            seq: 1,
            epoch: 3,
        };
        let want = Posted {
            kind: kind::CHECKPOINT_READY,
            seq: 0,
            epoch: 4,
        };
        assert_eq!(
            ev.take(ack(forged, Ok(()))),
            Err(AckError::Mismatch {
                want,
                got: ack(forged, Ok(())).unwrap()
            })
        );
        // An ack of the hint itself, out of order, is refused too.
        let hint = Posted {
            kind: kind::OUTPUT_AVAILABLE,
            seq: 1,
            epoch: 3,
        };
        assert!(matches!(
            ev.take(ack(hint, Ok(()))),
            Err(AckError::Mismatch { .. })
        ));
        assert_eq!((ev.checkpoints(), ev.len()), (1, 2), "no state change");
        // In order, both are accepted; only the checkpoint's frees staging.
        assert_eq!(
            ev.take(ack(want, Ok(()))),
            Ok(Answered {
                event: want,
                result: Ok(())
            })
        );
        assert_eq!(ev.checkpoints(), 0);
        assert_eq!(
            ev.take(ack(hint, Ok(()))).map(|a| a.event),
            Ok(hint),
            "the hint's ack matches once it is the oldest"
        );
        assert!(ev.is_empty());
    }

    #[test]
    fn malformed_unsolicited_and_wrong_epoch_acks_are_refused() {
        let mut ev = PostedEvents::<4>::new();
        let got = Ack {
            kind: kind::CHECKPOINT_READY,
            seq: 0,
            epoch: 0,
            result: Ok(()),
        };
        assert_eq!(ev.take(Ok(got)), Err(AckError::Unsolicited { got }));
        ev.posted(kind::CHECKPOINT_READY, 0).unwrap();
        let bad = DecodeError::ReservedNonZero("reserved");
        assert_eq!(ev.take(Err(bad)), Err(AckError::Malformed(bad)));
        let wrong_epoch = Ack { epoch: 1, ..got };
        assert!(matches!(
            ev.take(Ok(wrong_epoch)),
            Err(AckError::Mismatch { .. })
        ));
        assert_eq!(ev.checkpoints(), 1);
        // A rejection is a well-formed answer: it frees staging.
        let rejected = Ack {
            result: Err(Errno::EINVAL),
            ..got
        };
        assert_eq!(
            ev.take(Ok(rejected)).map(|a| a.result),
            Ok(Err(Errno::EINVAL))
        );
        assert_eq!(ev.checkpoints(), 0);
    }

    #[test]
    fn the_record_keeps_no_more_than_its_size() {
        let mut small = PostedEvents::<2>::new();
        small.posted(kind::CHECKPOINT_READY, 0).unwrap();
        small.posted(kind::ERROR, 0).unwrap();
        assert!(!small.can_post());
        assert_eq!(small.posted(kind::ERROR, 0), Err(RecordFull));
        assert_eq!(small.next_seq(), 2, "a refused record takes no number");
    }

    #[test]
    fn clear_forgets_the_session_and_numbers_run_on() {
        let mut ev = PostedEvents::<4>::new();
        ev.posted(kind::CHECKPOINT_READY, 3).unwrap();
        ev.posted(kind::OUTPUT_AVAILABLE, 3).unwrap();
        ev.clear();
        assert!(ev.is_empty());
        assert_eq!(ev.checkpoints(), 0);
        // An ack of a forgotten event is now unsolicited, not a match.
        let old = Posted {
            kind: kind::CHECKPOINT_READY,
            seq: 0,
            epoch: 3,
        };
        assert!(matches!(
            ev.take(ack(old, Ok(()))),
            Err(AckError::Unsolicited { .. })
        ));
        assert_eq!(ev.next_seq(), 2);
        ev.posted(kind::CHECKPOINT_READY, 0).unwrap();
        let new = Posted {
            kind: kind::CHECKPOINT_READY,
            seq: 2,
            epoch: 0,
        };
        assert_eq!(ev.take(ack(new, Ok(()))).unwrap().event, new);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Post(u32, u64),
        /// Ack the oldest event with this result.
        AckOldest(bool),
        /// Ack with a field of the oldest event changed.
        AckWrong(u8, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (kind::CHECKPOINT_READY..=kind::ERROR, 0u64..4).prop_map(|(k, e)| Op::Post(k, e)),
            any::<bool>().prop_map(Op::AckOldest),
            (0u8..3, 1u32..3).prop_map(|(f, d)| Op::AckWrong(f, d)),
        ]
    }

    proptest! {
        /// Against a plain queue model: accepted acks are exactly the
        /// in-order ones, the checkpoint count is the model's, refused
        /// acks change nothing.
        #[test]
        fn matches_a_queue_model(ops in proptest::collection::vec(op(), 0..80)) {
            let mut ev = PostedEvents::<8>::new();
            let mut model: VecDeque<Posted> = VecDeque::new();
            let mut seq = 0u32;
            for o in ops {
                match o {
                    Op::Post(k, e) => {
                        let r = ev.posted(k, e);
                        if model.len() < 8 {
                            prop_assert_eq!(r, Ok(()));
                            model.push_back(Posted { kind: k, seq, epoch: e });
                            seq += 1;
                        } else {
                            prop_assert_eq!(r, Err(RecordFull));
                        }
                    }
                    Op::AckOldest(ok) => {
                        let result = if ok { Ok(()) } else { Err(Errno::EIO) };
                        match model.pop_front() {
                            Some(p) => prop_assert_eq!(
                                ev.take(ack(p, result)),
                                Ok(Answered { event: p, result })
                            ),
                            None => {
                                let got = Ack { kind: kind::ERROR, seq, epoch: 0, result };
                                prop_assert_eq!(
                                    ev.take(Ok(got)),
                                    Err(AckError::Unsolicited { got })
                                );
                            }
                        }
                    }
                    Op::AckWrong(field, d) => {
                        let Some(&p) = model.front() else { continue };
                        let mut got = ack(p, Ok(())).unwrap();
                        match field {
                            0 => got.kind = kind::CHECKPOINT_READY + (got.kind + d) % 3,
                            1 => got.seq = got.seq.wrapping_add(d),
                            _ => got.epoch = got.epoch.wrapping_add(u64::from(d)),
                        }
                        if (got.kind, got.seq, got.epoch) != (p.kind, p.seq, p.epoch) {
                            prop_assert_eq!(
                                ev.take(Ok(got)),
                                Err(AckError::Mismatch { want: p, got })
                            );
                        }
                    }
                }
                let cps = model.iter().filter(|p| p.kind == kind::CHECKPOINT_READY).count();
                prop_assert_eq!(ev.checkpoints() as usize, cps);
                prop_assert_eq!(ev.len(), model.len());
                prop_assert_eq!(ev.next_seq(), seq);
            }
        }
    }
}
