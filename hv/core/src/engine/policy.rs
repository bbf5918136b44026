//! When an epoch ends and when held output may go out: the one place a
//! replication scheme differs from another (docs/REPLICATION.md, "Epoch
//! policies").
//!
//! [`Remus`] is the implementation the hypervisor and `doppel sim-hv` run:
//! an epoch ends when its timer fires or after a number of exits, and held
//! output is released once its epoch is committed by the backup. Kemari
//! (end the epoch before every output) answers
//! [`EpochPolicy::end_before_output`] with true; COLO (release when the
//! outputs of primary and secondary match) answers
//! [`EpochPolicy::releasable`] from its comparison. Neither needs the
//! engine to change.

/// What the run knows when it asks whether the epoch should end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochClock {
    /// The epoch timer expired (the backend's timer, or the host clock in
    /// `doppel sim-hv`).
    pub timer_fired: bool,
    /// Guest exits (or simulated guest steps) since the epoch began.
    pub exits: u64,
    /// No checkpoint has been taken in this session yet.
    pub first: bool,
    /// Guest TSC ticks since the epoch began (0 where the run does not
    /// count guest time).
    pub guest_ticks: u64,
}

/// When an epoch ends and when held output may be released.
pub trait EpochPolicy {
    /// Whether the running epoch should end now.
    fn epoch_due(&self, clock: &EpochClock) -> bool;

    /// Whether an output record of `epoch` may leave, given the last
    /// committed epoch (`None`: nothing committed in this session).
    fn releasable(&self, epoch: u64, committed: Option<u64>) -> bool;

    /// Whether the epoch must end before the guest's next output is taken
    /// (so that the output is produced by checkpointed state).
    fn end_before_output(&self) -> bool {
        false
    }
}

/// Remus: epochs end on a timer or an exit budget; output leaves at commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remus {
    /// End an epoch after this many exits (`None`: the timer alone).
    pub epoch_exits: Option<u64>,
    /// End an epoch at the first exit after this many guest TSC ticks
    /// (`None`: not on guest time).
    pub epoch_ticks: Option<u64>,
}

/// Remus's 40 Hz: the Linux primary's epoch on guest time when neither
/// `epoch-ms` nor `epoch-exits` is given.
pub const DEFAULT_EPOCH_MS: u64 = 25;

impl Remus {
    /// The Linux primary's policy: every `epoch_exits` exits when given
    /// (deterministic, for tests: it wins), else every `epoch_ms` ms of
    /// guest time (default [`DEFAULT_EPOCH_MS`]) at `tsc_khz`.
    pub fn linux(epoch_exits: Option<u64>, epoch_ms: Option<u64>, tsc_khz: u32) -> Self {
        match epoch_exits {
            Some(n) => Self {
                epoch_exits: Some(n.max(1)),
                epoch_ticks: None,
            },
            None => Self {
                epoch_exits: None,
                epoch_ticks: Some(
                    epoch_ms
                        .unwrap_or(DEFAULT_EPOCH_MS)
                        .max(1)
                        .saturating_mul(u64::from(tsc_khz).max(1)),
                ),
            },
        }
    }
}

impl EpochPolicy for Remus {
    fn epoch_due(&self, clock: &EpochClock) -> bool {
        clock.first
            || clock.timer_fired
            || self.epoch_exits.is_some_and(|n| clock.exits >= n)
            || self.epoch_ticks.is_some_and(|t| clock.guest_ticks >= t)
    }

    fn releasable(&self, epoch: u64, committed: Option<u64>) -> bool {
        committed.is_some_and(|c| epoch <= c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remus_ends_on_timer_budget_or_first_and_releases_on_commit() {
        let r = Remus {
            epoch_exits: Some(3),
            epoch_ticks: None,
        };
        let c = |timer_fired, exits, first| EpochClock {
            timer_fired,
            exits,
            first,
            guest_ticks: u64::MAX,
        };
        assert!(!r.epoch_due(&c(false, 2, false)));
        assert!(r.epoch_due(&c(false, 3, false)));
        assert!(r.epoch_due(&c(true, 0, false)));
        assert!(r.epoch_due(&c(false, 0, true)));
        assert!(!Remus::default().epoch_due(&c(false, u64::MAX, false)));
        assert!(!r.releasable(0, None));
        assert!(r.releasable(4, Some(4)));
        assert!(!r.releasable(5, Some(4)));
        assert!(!r.end_before_output());
    }

    #[test]
    fn guest_time_ends_an_epoch_and_an_exit_budget_wins_over_it() {
        let at = |exits, guest_ticks| EpochClock {
            exits,
            guest_ticks,
            ..EpochClock::default()
        };
        // 25 ms at 2 GHz by default; exits do not end it.
        let t = Remus::linux(None, None, 2_000_000);
        assert_eq!((t.epoch_exits, t.epoch_ticks), (None, Some(50_000_000)));
        assert!(!t.epoch_due(&at(u64::MAX, 49_999_999)));
        assert!(t.epoch_due(&at(1, 50_000_000)));
        // epoch-ms=10.
        let t = Remus::linux(None, Some(10), 1_000_000);
        assert!(!t.epoch_due(&at(0, 9_999_999)));
        assert!(t.epoch_due(&at(0, 10_000_000)));
        // epoch-exits wins: guest time no longer counts.
        let e = Remus::linux(Some(4000), Some(10), 1_000_000);
        assert_eq!((e.epoch_exits, e.epoch_ticks), (Some(4000), None));
        assert!(!e.epoch_due(&at(3999, u64::MAX)));
        assert!(e.epoch_due(&at(4000, 0)));
        assert_eq!(Remus::linux(Some(0), None, 1).epoch_exits, Some(1));
    }
}
