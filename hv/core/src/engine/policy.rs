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
}

impl EpochPolicy for Remus {
    fn epoch_due(&self, clock: &EpochClock) -> bool {
        clock.first || clock.timer_fired || self.epoch_exits.is_some_and(|n| clock.exits >= n)
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
        };
        let c = |timer_fired, exits, first| EpochClock {
            timer_fired,
            exits,
            first,
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
}
