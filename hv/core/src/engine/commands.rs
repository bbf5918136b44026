//! The command ring: every command the tool may send, with the role's
//! checks; `Activate`, `Detach` and the re-attach that follows one.

use doppel_abi::msg::{Command, LogDirtyMode, Reply, Response, UNPROTECTED_EPOCH};
use doppel_abi::{Errno, SharedMem};

use super::{Engine, EpochPolicy, Hooks, Role, PEER_BROKE_RING};
use crate::hvm;

impl<R: SharedMem + Clone, B: SharedMem, P: EpochPolicy, H: Hooks> Engine<R, B, P, H> {
    /// Serve every queued command. True when there was at least one.
    /// Every call (the wait loops poll here) is a liveness beat.
    pub fn serve_commands(&mut self) -> Result<bool, &'static str> {
        self.beat();
        let mut any = false;
        loop {
            let req = match self.cmd.pop_request() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if any
                        || !self
                            .cmd
                            .final_check_for_requests()
                            .map_err(|_| PEER_BROKE_RING)?
                    {
                        break;
                    }
                    continue;
                }
                Err(_) => return Err(PEER_BROKE_RING),
            };
            any = true;
            let rsp = match req.decode() {
                Ok(cmd) => Response {
                    id: req.id,
                    op: req.op,
                    result: self.execute(cmd),
                },
                Err(e) => Response::error(&req, e.errno()),
            };
            self.cmd
                .push_response(&rsp.encode())
                .map_err(|_| PEER_BROKE_RING)?;
            self.cmd.publish_responses();
        }
        Ok(any)
    }

    /// One decoded command. An error answer changes nothing.
    fn execute(&mut self, cmd: Command) -> Result<Reply, Errno> {
        match cmd {
            // A standby's RAM belongs to the backup that fills it; a
            // primary tool pointed at it must not take its rings (the
            // backup's `Activate` would then be refused).
            Command::LogDirtyEnable { .. }
                if self.role == Role::Standby && self.activated.is_none() =>
            {
                log::warn!("standby: LogDirtyEnable refused (EPERM): this machine is a standby");
                Err(Errno::EPERM)
            }
            Command::LogDirtyEnable { mode }
                if self.role == Role::Standby && mode == LogDirtyMode::WriteProtect =>
            {
                self.protect_activated().map_err(|e| {
                    log::error!("standby: protecting the activated guest: {e}");
                    Errno::EIO
                })?;
                Ok(Reply::Done)
            }
            Command::LogDirtyEnable { mode } => {
                if self.enabled {
                    // Xen: enabling twice is -EINVAL.
                    Err(Errno::EINVAL)
                } else if !self.accepts(mode) {
                    // Not a tracker this backend has, or not the one the
                    // guest already runs with.
                    Err(Errno::EOPNOTSUPP)
                } else {
                    self.mode = Some(mode);
                    if self.detached {
                        self.reattach().map_err(|e| {
                            log::error!("primary: re-attach: {e}");
                            Errno::EIO
                        })?;
                    }
                    // Every session's epoch 0 carries every page: its
                    // backup starts from nothing.
                    self.full_next = true;
                    self.enabled = true;
                    Ok(Reply::Done)
                }
            }
            Command::Detach => self.detach(),
            // Detached (or never enabled): no session to commit in.
            Command::CommitEpoch { .. } if self.role != Role::Standby && !self.enabled => {
                Err(Errno::EINVAL)
            }
            Command::CommitEpoch { epoch } => {
                if self.role == Role::Standby
                    || epoch >= self.next_epoch
                    || self.committed.is_some_and(|c| epoch < c)
                {
                    // Not yet checkpointed, or going backwards.
                    Err(Errno::ERANGE)
                } else {
                    self.committed = Some(epoch);
                    self.stats.commits += 1;
                    // Output commit: the epoch's replies go out now, before
                    // the tool sees `Done`.
                    self.release().map_err(|e| {
                        log::error!("primary: releasing output: {e}");
                        Errno::EIO
                    })?;
                    Ok(Reply::Done)
                }
            }
            Command::Activate { epoch } => self.activate(epoch),
            // Epochs end at the guest's own epoch boundaries in this mode;
            // the other operations belong to the standby and output work.
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// Standby: check the vCPU record the backup tool wrote and accept
    /// the failover. The guest starts once the answer is out.
    fn activate(&mut self, epoch: u64) -> Result<Reply, Errno> {
        if self.role != Role::Standby || self.activated.is_some() {
            return Err(Errno::EINVAL);
        }
        // The record sits at the start of the area, zero-padded to its end.
        // Decode a private copy: the tool could still be writing the area,
        // and the decoder reads its input more than once.
        let (vo, vs) = self.view.region(doppel_abi::Field::VcpuArea);
        let mut copy = alloc::vec![0u8; vs];
        self.bulk.read_bytes(vo, &mut copy);
        let decoded = hvm::decode_padded::<1>(&copy).map_err(|e| {
            log::error!("standby: Activate: the vCPU record does not decode: {e:?}");
            Errno::EINVAL
        })?;
        let Some((_, state)) = decoded.vcpus.first() else {
            log::error!("standby: Activate: the vCPU record has no CPU");
            return Err(Errno::EINVAL);
        };
        self.hooks.check_activation(epoch, state)?;
        self.activated = Some((epoch, state.clone()));
        self.next_epoch = epoch.saturating_add(1);
        Ok(Reply::Done)
    }

    /// `LogDirtyEnable` on an activated standby (a chain A -> B -> C): from
    /// now on it is a replicated service like any primary (output held
    /// until `CommitEpoch`, checkpoints staged at every epoch end), in a
    /// session that starts at epoch 0 with every page. Before the next
    /// epoch end the output goes out as before (it was released at once
    /// since `Activate`; nothing is held), so no reply is lost or
    /// reordered.
    fn protect_activated(&mut self) -> Result<(), &'static str> {
        // The backup tool that sent `Activate` answers no events (the
        // standby posted none); drop any answer left on the ring.
        self.skip_acks()?;
        self.role = Role::Service;
        self.enabled = true;
        self.full_next = true;
        self.events.clear();
        self.next_epoch = 0;
        self.committed = None;
        log::info!(
            "standby: the activated guest is protected to a new backup (log-dirty enabled); \
             replication starts at epoch 0"
        );
        Ok(())
    }

    /// `Detach`: stop replicating and run the guest unprotected. Answered
    /// `Done` after the held output went out (as far as the output channel
    /// has room; the rest follows as the tool's successor or nobody drains
    /// it — the guest is told to retry a full channel as before).
    fn detach(&mut self) -> Result<Reply, Errno> {
        if self.role == Role::Standby {
            return Err(Errno::EOPNOTSUPP);
        }
        if !self.enabled {
            // Nothing attached (never enabled, or detached already).
            return Err(Errno::EINVAL);
        }
        self.enabled = false;
        self.detached = true;
        self.stats.detaches += 1;
        // The staged checkpoint (if any) is void: its ack may never come.
        self.events.clear();
        let held = self.held.len();
        for h in self.held.iter_mut() {
            h.epoch = UNPROTECTED_EPOCH;
        }
        self.release_unprotected().map_err(|e| {
            log::error!("primary: releasing output at Detach: {e}");
            Errno::EIO
        })?;
        log::warn!(
            "primary: replication detached; guest runs unprotected (after epoch {}, last \
             committed {}; {held} held output records released, {} still waiting for room)",
            self.next_epoch.saturating_sub(1),
            self.committed
                .map_or(-1, |e| i64::try_from(e).unwrap_or(i64::MAX)),
            self.held.len()
        );
        Ok(Reply::Done)
    }

    /// `LogDirtyEnable` after `Detach`: a new session. The new tool has
    /// answered the old session's events before sending it; drop those
    /// answers unread and start again from epoch 0 with every page.
    fn reattach(&mut self) -> Result<(), &'static str> {
        self.skip_acks()?;
        self.detached = false;
        self.full_next = true;
        self.events.clear();
        self.next_epoch = 0;
        self.committed = None;
        log::info!("primary: a new dom0 tool enabled log-dirty; replication restarts at epoch 0");
        Ok(())
    }

    /// The guest finished: serve the tool until it detaches (it commits
    /// the last checkpoint first), so its last commands are answered
    /// before the hypervisor stops; `idle` between empty polls.
    pub fn wait_detached(&mut self, mut idle: impl FnMut()) -> Result<(), &'static str> {
        if !self.detached {
            log::info!("primary: guest finished; waiting for the tool to Detach");
        }
        while !self.detached {
            self.take_acks()?;
            if !self.serve_commands()? {
                idle();
            }
        }
        self.skip_acks()?;
        self.release_unprotected()
    }
}
