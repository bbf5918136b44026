//! The replication engine: the hypervisor's side of the checkpoint
//! protocol (docs/REPLICATION.md), once, for the hypervisor and for
//! `doppel sim-hv`.
//!
//! It owns the published control area: serving the command ring with the
//! role's checks (primary or standby), matching the tool's event acks,
//! staging a harvested epoch (pfns, pages, the HVM context blob) and
//! posting `CheckpointReady`, holding guest output until its epoch commits
//! and releasing it (tagged `UNPROTECTED_EPOCH` after `Detach`),
//! `Activate`, `Detach` and re-attach, and the header's live words (alive,
//! pause_cycles, held_output). It touches no hardware: the caller runs the
//! guest, harvests its dirty log, hands the engine the pfns, a way to read
//! guest pages ([`GuestPages`]) and the vCPU, and asks it what to do
//! ([`Engine::tracking`], [`Engine::activated`], [`Engine::staging_free`]).
//!
//! Memory: the engine reaches the control area through two views of the
//! whole area, both [`SharedMem`]: `rings` for the header (at publish), the
//! rings and the channels, whose words the tool writes too (the hypervisor
//! passes 32-bit atomics, so a store never rewrites the peer's half of a
//! word), and `bulk` for the staging, pfn-list and vCPU areas and the live
//! header words, which have one writer each (64-bit atomics there: a page
//! is 512 stores). Each region is reached through one view only.
//!
//! Everything the tool writes (commands, acks, ring indices, the vCPU
//! record of an `Activate`) is untrusted: malformed entries are answered
//! with an errno and change nothing; a ring index that jumps past the ring
//! or an ack that answers no posted event is an error the caller reports.

mod commands;
pub mod control;
mod output;
pub mod policy;
mod staging;
#[cfg(test)]
mod tests;

use alloc::collections::VecDeque;

use doppel_abi::chan::{ChannelConsumer, ChannelProducer};
use doppel_abi::control::{ControlView, Field, ALIVE_OFFSET, HELD_OFFSET, PAUSE_OFFSET};
use doppel_abi::msg::LogDirtyMode;
use doppel_abi::{CommandBack, Errno, EventFront, SharedMem};

use crate::hvm::VcpuState;
use crate::posted::PostedEvents;

pub use output::Recv;
pub use policy::{EpochClock, EpochPolicy, Remus};
pub use staging::{bitmap_pfns, Staged};

/// Output records held for commit at most (the guest's `SEND` is told to
/// retry beyond that; holding drains as epochs commit).
pub const HOLD_LIMIT: usize = 1024;
/// Unanswered events tracked at most: the event ring's slot count (16 for
/// a page of 128-byte events) fits.
pub const EVENTS_IN_FLIGHT: usize = 16;

/// Error text for a ring the tool drove out of protocol.
pub const PEER_BROKE_RING: &str = "the dom0 tool broke the ring protocol (index out of range)";
/// Error text for an event ack that answers no posted event.
pub const PEER_BROKE_ACKS: &str =
    "the dom0 tool broke the event protocol (an ack that does not answer the oldest event)";

/// What the control area serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The workload guest, replicated (no channels).
    Workload,
    /// The key-value service, replicated with output commit.
    Service,
    /// A standby waiting for `Activate`; after it, the service runs
    /// unreplicated (output released at once) until a `LogDirtyEnable`
    /// protects it in turn (then it is a [`Role::Service`]).
    Standby,
}

/// What the caller decides about an `Activate` beyond the vCPU record
/// decoding (the simulated service checks its state in guest RAM).
pub trait Hooks {
    /// Whether the guest may resume from `state` as the committed epoch
    /// `epoch`. An error answers the command with it; the standby keeps
    /// waiting.
    fn check_activation(&mut self, _epoch: u64, _state: &VcpuState) -> Result<(), Errno> {
        Ok(())
    }
}

/// No checks beyond the engine's own.
impl Hooks for () {}

/// Guest RAM as the engine reads it when it stages pages.
pub trait GuestPages {
    /// Pages of guest RAM.
    fn pages(&self) -> u64;
    /// Copy page `pfn` into `dst` at byte `at`; false when `pfn` is not
    /// guest RAM.
    fn copy_page<S: SharedMem>(&self, pfn: u64, dst: &S, at: usize) -> bool;
}

/// Counters over the engine's life (all sessions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Checkpoints posted.
    pub posted: u64,
    /// `CommitEpoch` commands answered `Done`.
    pub commits: u64,
    /// `Detach` commands answered `Done`.
    pub detaches: u64,
    /// Output records moved into the output channel.
    pub released: u64,
}

/// An output record held until its epoch commits.
struct Held {
    epoch: u64,
    bytes: heapless::Vec<u8, { doppel_abi::guest::MAX_RECORD as usize }>,
}

/// The protocol engine over a published control area.
pub struct Engine<R: SharedMem + Clone, B: SharedMem, P: EpochPolicy = Remus, H: Hooks = ()> {
    role: Role,
    policy: P,
    hooks: H,
    view: ControlView,
    cmd: CommandBack<R>,
    evt: EventFront<R>,
    /// The guest's input (tool -> guest) and output (guest -> tool).
    input: ChannelConsumer<R>,
    output: ChannelProducer<R>,
    /// Staging, pfn list, vCPU areas and the live header words.
    bulk: B,
    /// Output not yet released, oldest first, and its bytes.
    held: VecDeque<Held>,
    held_bytes: u64,
    /// Standby: `Activate` accepted, with the committed epoch and vCPU.
    activated: Option<(u64, VcpuState)>,
    beats: u64,
    enabled: bool,
    /// The tool sent `Detach`: the guest runs unprotected until a new
    /// `LogDirtyEnable`.
    detached: bool,
    /// The next checkpoint carries every page (a new session).
    full_next: bool,
    /// The log-dirty modes the backend offers (bit `mode as u32`); write-
    /// protect unless the caller offers more ([`Engine::offer_modes`]).
    offered: u32,
    /// The mode the first `LogDirtyEnable` chose: the guest's tracker is
    /// built for it, so later sessions must ask for the same one.
    mode: Option<LogDirtyMode>,
    next_epoch: u64,
    committed: Option<u64>,
    /// Events posted and not yet acknowledged, to match acks against.
    events: PostedEvents<EVENTS_IN_FLIGHT>,
    stats: Stats,
}

impl<R: SharedMem + Clone, B: SharedMem, P: EpochPolicy, H: Hooks> Engine<R, B, P, H> {
    /// Attach to an area published with [`control::publish_area`] (whose
    /// `view` it returned): `rings` and `bulk` both map the whole area from
    /// its header on.
    pub fn attach(
        rings: R,
        bulk: B,
        view: ControlView,
        role: Role,
        policy: P,
        hooks: H,
    ) -> Result<Self, &'static str> {
        let total = view.total_size() as usize;
        if rings.size() < total || bulk.size() < total {
            return Err("control area mapping smaller than the area");
        }
        let (co, cs) = view.region(Field::CommandRing);
        let (eo, es) = view.region(Field::EventRing);
        let (io, is) = view.region(Field::InputChannel);
        let (oo, os) = view.region(Field::OutputChannel);
        let cmd = CommandBack::attach(rings.clone(), co, cs).map_err(|_| "command ring")?;
        let evt = EventFront::attach(rings.clone(), eo, es).map_err(|_| "event ring")?;
        let input = ChannelConsumer::attach(rings.clone(), io, is).map_err(|_| "input channel")?;
        let output = ChannelProducer::attach(rings, oo, os).map_err(|_| "output channel")?;
        Ok(Self {
            role,
            policy,
            hooks,
            view,
            cmd,
            evt,
            input,
            output,
            bulk,
            held: VecDeque::new(),
            held_bytes: 0,
            activated: None,
            beats: 0,
            enabled: false,
            detached: false,
            full_next: false,
            offered: 1 << LogDirtyMode::WriteProtect as u32,
            mode: None,
            next_epoch: 0,
            committed: None,
            events: PostedEvents::new(),
            stats: Stats::default(),
        })
    }

    /// Who the engine speaks as in its log lines.
    fn who(&self) -> &'static str {
        if self.role == Role::Standby {
            "standby"
        } else {
            "primary"
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn view(&self) -> &ControlView {
        &self.view
    }
    pub fn policy(&self) -> &P {
        &self.policy
    }
    pub fn hooks(&mut self) -> &mut H {
        &mut self.hooks
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// Offer `modes` to the tool's `LogDirtyEnable` (what the backend can
    /// track with; write-protect alone by default). Call before the first
    /// session.
    pub fn offer_modes(&mut self, modes: &[LogDirtyMode]) {
        self.offered = modes.iter().fold(0, |a, m| a | 1 << *m as u32);
    }
    /// Whether `LogDirtyEnable` may ask for `mode`: offered, and the mode
    /// of every earlier session (the guest's tracker is built for it).
    pub fn accepts(&self, mode: LogDirtyMode) -> bool {
        self.offered & (1 << mode as u32) != 0 && self.mode.is_none_or(|m| m == mode)
    }
    /// The log-dirty mode the tool chose (write-protect before any
    /// `LogDirtyEnable`).
    pub fn log_dirty_mode(&self) -> LogDirtyMode {
        self.mode.unwrap_or(LogDirtyMode::WriteProtect)
    }
    /// Log-dirty is enabled: a replication session is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }
    /// The tool detached: the guest runs unprotected.
    pub fn detached(&self) -> bool {
        self.detached
    }
    /// The epoch the next checkpoint carries (= checkpoints posted in this
    /// session).
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }
    /// The last epoch the tool committed in this session.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }
    /// Standby: the committed epoch and vCPU `Activate` accepted.
    pub fn activated(&self) -> Option<&(u64, VcpuState)> {
        self.activated.as_ref()
    }
    /// Output records held for commit.
    pub fn held_records(&self) -> usize {
        self.held.len()
    }
    /// Whether the next epoch's writes must be tracked: false once nobody
    /// uses the harvests (detached, or an activated standby).
    pub fn tracking(&self) -> bool {
        !self.detached && self.role != Role::Standby
    }
    /// Whether an epoch end checkpoints (a session is on and this is no
    /// standby).
    pub fn replicating(&self) -> bool {
        self.enabled && !self.detached && self.role != Role::Standby
    }
    /// Whether the running epoch should end now, per the policy (the
    /// caller fills in its clock; `first` is the engine's).
    pub fn epoch_due(&self, mut clock: EpochClock) -> bool {
        clock.first = self.next_epoch == 0;
        self.replicating() && self.policy.epoch_due(&clock)
    }

    /// Advance the liveness counter: the hypervisor runs.
    pub fn beat(&mut self) {
        self.beats = self.beats.wrapping_add(1);
        self.store_live(ALIVE_OFFSET, self.beats);
    }

    /// The epoch-end pause just measured, for the tool's status.
    pub fn pause_measured(&mut self, cycles: u64) {
        self.store_live(PAUSE_OFFSET, cycles);
    }

    /// `held` grew or shrank by `delta` bytes: publish the new total.
    fn held_changed(&mut self, delta: i64) {
        self.held_bytes = self.held_bytes.saturating_add_signed(delta);
        self.store_live(HELD_OFFSET, self.held_bytes);
    }

    fn store_live(&self, offset: usize, value: u64) {
        // At every exit: one aligned atomic store where `bulk` has 64-bit
        // words (the hypervisor's), not a byte copy.
        self.bulk.store_u64(offset, value);
    }

    /// Serve commands until the tool enabled log-dirty; `idle` between
    /// empty polls.
    pub fn wait_enabled(&mut self, mut idle: impl FnMut()) -> Result<(), &'static str> {
        while !self.enabled {
            if !self.serve_commands()? {
                idle();
            }
        }
        Ok(())
    }

    /// Standby: serve commands until `Activate` was accepted; the epoch
    /// and vCPU to resume from.
    pub fn wait_activated(
        &mut self,
        mut idle: impl FnMut(),
    ) -> Result<(u64, VcpuState), &'static str> {
        loop {
            if let Some(a) = &self.activated {
                return Ok(a.clone());
            }
            if !self.serve_commands()? {
                idle();
            }
        }
    }

    /// The tool's side, once: acks (skipped unread when detached),
    /// commands, then held output as far as it may and can go. The guest
    /// is idle or at an exit meanwhile.
    pub fn poll(&mut self) -> Result<(), &'static str> {
        if self.detached {
            self.skip_acks()?;
        } else {
            self.take_acks()?;
        }
        self.serve_commands()?;
        // What Detach released goes first, also into a later session.
        self.release_unprotected()?;
        if self.detached {
            return Ok(());
        }
        self.release()
    }
}
