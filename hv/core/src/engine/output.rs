//! The byte channels: the guest's input, and its output held until its
//! epoch commits (released at once when nothing protects the guest).

use doppel_abi::chan::ChannelError;
use doppel_abi::msg::UNPROTECTED_EPOCH;
use doppel_abi::SharedMem;

use super::{Engine, EpochPolicy, Held, Hooks, Role, HOLD_LIMIT};

/// What a `RECV` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recv {
    /// A record of this many bytes was copied.
    Record(usize),
    /// Nothing queued.
    Empty,
    /// The next record does not fit the guest's buffer (it stays queued).
    TooSmall,
}

const BROKE_OUTPUT: &str = "the dom0 tool broke the output channel";

impl<R: SharedMem + Clone, B: SharedMem, P: EpochPolicy, H: Hooks> Engine<R, B, P, H> {
    /// The guest's `RECV`: the next input record into `dst`.
    pub fn recv(&mut self, dst: &mut [u8]) -> Result<Recv, &'static str> {
        let got = match self.input.pop(dst) {
            Ok(Some(info)) => Recv::Record(info.len),
            Ok(None) => return Ok(Recv::Empty),
            Err(ChannelError::BufferTooSmall { .. }) => return Ok(Recv::TooSmall),
            Err(_) => return Err("the dom0 tool broke the input channel"),
        };
        self.input.publish();
        Ok(got)
    }

    /// The guest's `SEND`: take an output record. False: no room now (the
    /// guest retries).
    pub fn send(&mut self, record: &[u8]) -> Result<bool, &'static str> {
        if self.role == Role::Standby {
            // Activated: nothing to commit against any more.
            return match self.output.write_record(self.next_epoch, record) {
                Ok(()) => {
                    self.output.publish();
                    self.stats.released += 1;
                    Ok(true)
                }
                Err(ChannelError::Full) => Ok(false),
                Err(_) => Err(BROKE_OUTPUT),
            };
        }
        if self.held.len() >= HOLD_LIMIT {
            return Ok(false);
        }
        let bytes = heapless::Vec::from_slice(record).map_err(|()| "output record too long")?;
        let epoch = if self.detached {
            UNPROTECTED_EPOCH
        } else {
            self.next_epoch
        };
        self.held_changed(bytes.len() as i64);
        self.held.push_back(Held { epoch, bytes });
        if self.detached {
            // Unprotected: out as soon as the channel has room.
            self.release_unprotected()?;
        }
        Ok(true)
    }

    /// Move held output the policy releases (Remus: of committed epochs)
    /// into the output channel, in order, as far as it has room.
    pub(super) fn release(&mut self) -> Result<(), &'static str> {
        let committed = self.committed;
        self.release_while(|policy, epoch| {
            epoch != UNPROTECTED_EPOCH && policy.releasable(epoch, committed)
        })
    }

    /// Move the held records tagged [`UNPROTECTED_EPOCH`] at the front
    /// (released by `Detach`, or sent while detached) into the output
    /// channel, as far as it has room. No event: nobody is attached.
    pub(super) fn release_unprotected(&mut self) -> Result<(), &'static str> {
        self.release_while(|_, epoch| epoch == UNPROTECTED_EPOCH)
    }

    fn release_while(&mut self, go: impl Fn(&P, u64) -> bool) -> Result<(), &'static str> {
        let mut any = false;
        let mut freed = 0i64;
        while let Some(h) = self.held.front() {
            if !go(&self.policy, h.epoch) {
                break;
            }
            match self.output.write_record(h.epoch, &h.bytes) {
                Ok(()) => {
                    any = true;
                    freed += h.bytes.len() as i64;
                    self.stats.released += 1;
                    self.held.pop_front();
                }
                Err(ChannelError::Full) => break,
                Err(_) => return Err(BROKE_OUTPUT),
            }
        }
        if any {
            self.held_changed(-freed);
            self.output.publish();
        }
        Ok(())
    }
}
