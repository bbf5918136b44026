//! The standby backup's failover policy: from how its session with the
//! primary ended, whether it activates the standby, and the reason it
//! gives. `doppel backup --standby-ram` acts on the answer (README,
//! "Failover").

use std::io::ErrorKind;
use std::time::Duration;

use crate::backup::{ReceiveError, Received};
use crate::stream::StreamError;

/// What the backup does once its session with the primary is over.
#[derive(Debug, PartialEq, Eq)]
pub enum Takeover {
    /// The primary ended the stream in order: the standby stays down.
    Ended,
    /// The primary is lost (`reason`): activate the standby from committed
    /// epoch `last`.
    Activate { reason: String, last: u64 },
    /// The replica failed or the primary broke the protocol: the standby
    /// stays down (the error line; exit INVALID).
    Refuse(String),
    /// The primary was lost before any epoch committed: nothing to
    /// activate from (the error line; exit PEER_GONE).
    NothingCommitted(String),
}

/// Decide, from the session's end `got`, the epochs committed in all
/// (`committed`, the last one is `committed - 1`) and the heartbeat
/// timeout (silence that long is a lost primary).
pub fn decide(got: &Received, committed: u64, heartbeat: Duration) -> Takeover {
    let last = committed.checked_sub(1);
    let last_text = last.map_or("none".to_string(), |e| e.to_string());
    let reason = match &got.error {
        None if got.ended => return Takeover::Ended,
        None => "the stream ended".to_string(),
        Some(ReceiveError::Stream(StreamError::Io { source, .. }))
            if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            format!("nothing received for {:.1} s", heartbeat.as_secs_f64())
        }
        Some(ReceiveError::Stream(e)) if e.is_truncation() => "connection closed".to_string(),
        Some(ReceiveError::Stream(e @ StreamError::Io { .. })) => {
            format!("connection failed: {e}")
        }
        Some(ReceiveError::Ack { source, .. }) => format!("acknowledging failed: {source}"),
        Some(e @ ReceiveError::Replica(_)) => {
            return Takeover::Refuse(format!(
                "{e}; standby not activated (guest RAM at epoch {last_text})"
            ))
        }
        Some(e) => {
            return Takeover::Refuse(format!(
                "the primary broke the protocol: {e}; standby not activated \
                 (guest RAM at epoch {last_text})"
            ))
        }
    };
    match last {
        Some(last) => Takeover::Activate { reason, last },
        None => Takeover::NothingCommitted(format!(
            "primary lost ({reason}) before any epoch was committed: \
             nothing to activate the standby from"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::replica::ReplicaError;

    fn ended_by(error: Option<ReceiveError>, ended: bool) -> Received {
        Received {
            epochs: Vec::new(),
            ended,
            error,
            partial: None,
            features: 0,
        }
    }

    fn io_stream(kind: ErrorKind) -> Option<ReceiveError> {
        Some(ReceiveError::Stream(StreamError::Io {
            what: "record header",
            offset: 56,
            source: io::Error::from(kind),
        }))
    }

    const HB: Duration = Duration::from_millis(2500);

    fn activate(reason: &str, last: u64) -> Takeover {
        Takeover::Activate {
            reason: reason.into(),
            last,
        }
    }

    #[test]
    fn an_orderly_end_activates_nothing() {
        assert_eq!(decide(&ended_by(None, true), 5, HB), Takeover::Ended);
        assert_eq!(decide(&ended_by(None, true), 0, HB), Takeover::Ended);
    }

    #[test]
    fn a_lost_primary_activates_from_the_last_committed_epoch() {
        let got = ended_by(io_stream(ErrorKind::WouldBlock), false);
        assert_eq!(
            decide(&got, 8, HB),
            activate("nothing received for 2.5 s", 7)
        );
        let got = ended_by(io_stream(ErrorKind::TimedOut), false);
        assert_eq!(
            decide(&got, 1, HB),
            activate("nothing received for 2.5 s", 0)
        );
        let got = ended_by(
            Some(ReceiveError::Stream(StreamError::Truncated {
                what: "record body",
                offset: 9,
            })),
            false,
        );
        assert_eq!(decide(&got, 3, HB), activate("connection closed", 2));
        assert_eq!(
            decide(&ended_by(None, false), 3, HB),
            activate("the stream ended", 2)
        );
        let got = ended_by(io_stream(ErrorKind::ConnectionReset), false);
        let Takeover::Activate { reason, last: 2 } = decide(&got, 3, HB) else {
            panic!("a reset link is a lost primary");
        };
        assert!(reason.starts_with("connection failed: I/O error reading record header"));
        let got = ended_by(
            Some(ReceiveError::Ack {
                epoch: 4,
                source: io::Error::from(ErrorKind::BrokenPipe),
            }),
            false,
        );
        let Takeover::Activate { reason, last: 4 } = decide(&got, 5, HB) else {
            panic!("a failed ack is a lost primary");
        };
        assert!(reason.starts_with("acknowledging failed: "), "{reason}");
    }

    #[test]
    fn nothing_committed_is_nothing_to_activate() {
        let got = ended_by(io_stream(ErrorKind::TimedOut), false);
        assert_eq!(
            decide(&got, 0, HB),
            Takeover::NothingCommitted(
                "primary lost (nothing received for 2.5 s) before any epoch was committed: \
                 nothing to activate the standby from"
                    .into()
            )
        );
    }

    #[test]
    fn a_broken_replica_or_protocol_never_activates() {
        let got = ended_by(Some(ReceiveError::Session("replayed".into())), false);
        assert_eq!(
            decide(&got, 3, HB),
            Takeover::Refuse(
                "the primary broke the protocol: session check failed: replayed; standby not \
                 activated (guest RAM at epoch 2)"
                    .into()
            )
        );
        let got = ended_by(
            Some(ReceiveError::Replica(ReplicaError::PfnBeyondReplica {
                pfn: 9,
                pages: 4,
            })),
            false,
        );
        let Takeover::Refuse(why) = decide(&got, 0, HB) else {
            panic!("a replica error must not activate");
        };
        assert!(
            why.ends_with("; standby not activated (guest RAM at epoch none)"),
            "{why}"
        );
    }
}
