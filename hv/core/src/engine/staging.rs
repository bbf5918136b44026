//! The event ring and the staging area: a harvested epoch staged (pfns,
//! pages, the HVM context blob) and posted as `CheckpointReady`; the
//! tool's acks matched against what was posted (back-pressure: staging
//! holds one checkpoint at a time).

use doppel_abi::control::Field;
use doppel_abi::msg::{CheckpointReady, Event, Span, PAGE_SIZE};
use doppel_abi::{Errno, SharedMem};

use super::{Engine, EpochPolicy, GuestPages, Hooks, PEER_BROKE_ACKS, PEER_BROKE_RING};
use crate::hvm::{self, HeaderInfo, VcpuState};
use crate::posted::AckError;

/// One staged checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    pub epoch: u64,
    /// Pages staged.
    pub dirty: u64,
    /// Bytes of the HVM context blob at the start of the vCPU area.
    pub blob_len: usize,
}

/// The pfns set in a harvest in Xen's bitmap layout (bit `pfn % 8` of
/// byte `pfn / 8`), ascending.
pub fn bitmap_pfns(bitmap: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(i, &byte)| {
        let mut bits = byte;
        core::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let bit = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            Some(i as u64 * 8 + bit)
        })
    })
}

impl<R: SharedMem + Clone, B: SharedMem, P: EpochPolicy, H: Hooks> Engine<R, B, P, H> {
    /// Whether the staging area is free: every checkpoint posted was
    /// acknowledged.
    pub fn staging_free(&self) -> bool {
        self.events.checkpoints() == 0
    }

    /// Take every acknowledgement the tool has posted. Acks answer events
    /// in ring order; one that does not answer the oldest unanswered event
    /// (or does not decode) stops replication.
    pub fn take_acks(&mut self) -> Result<(), &'static str> {
        loop {
            match self.evt.pop_response() {
                Ok(Some(a)) => match self.events.take(a.decode()) {
                    Ok(answered) => {
                        if let Err(e) = answered.result {
                            log::warn!(
                                "{}: the tool rejected event kind {} of epoch {}: {e:?}",
                                self.who(),
                                answered.event.kind,
                                answered.event.epoch
                            );
                        }
                    }
                    Err(e) => {
                        match e {
                            AckError::Malformed(d) => {
                                log::error!("{}: malformed acknowledgement ({d:?})", self.who());
                            }
                            AckError::Unsolicited { got } => {
                                log::error!("{}: acknowledgement of no event: {got:?}", self.who());
                            }
                            AckError::Mismatch { want, got } => log::error!(
                                "{}: acknowledgement {got:?} does not answer the oldest \
                                 unanswered event {want:?}",
                                self.who()
                            ),
                        }
                        return Err(PEER_BROKE_ACKS);
                    }
                },
                Ok(None) => {
                    if !self
                        .evt
                        .final_check_for_responses()
                        .map_err(|_| PEER_BROKE_RING)?
                    {
                        return Ok(());
                    }
                }
                Err(_) => return Err(PEER_BROKE_RING),
            }
        }
    }

    /// Consume the tool's acks without reading them (they answer events of
    /// a session that is over). A bad index is still an error.
    pub fn skip_acks(&mut self) -> Result<(), &'static str> {
        self.evt
            .skip_responses(u32::MAX)
            .map(|_| ())
            .map_err(|_| PEER_BROKE_RING)
    }

    /// Wait until the tool has acknowledged every checkpoint (or
    /// detached), serving its commands meanwhile; `idle` between empty
    /// polls.
    pub fn wait_staging_free(&mut self, mut idle: impl FnMut()) -> Result<(), &'static str> {
        let mut said = false;
        loop {
            self.take_acks()?;
            let served = self.serve_commands()?;
            if self.staging_free() || self.detached {
                return Ok(());
            }
            if !said {
                log::debug!("primary: waiting for the tool to release staging");
                said = true;
            }
            if !served {
                idle();
            }
        }
    }

    /// Post an Error event (best effort: a full ring is skipped, the
    /// hypervisor is stopping anyway). None once detached: nobody reads.
    pub fn post_error(&mut self, errno: Errno) {
        if self.detached {
            return;
        }
        let e = Event::Error {
            epoch: self.next_epoch,
            op: 0,
            errno,
        };
        // Best effort (see above): a full ring or record skips the event.
        let _ = self.post_event(&e);
    }

    /// Push `ev` on the event ring, publish it and record it, so its ack
    /// can be matched.
    fn post_event(&mut self, ev: &Event) -> Result<(), &'static str> {
        if !self.events.can_post() {
            return Err("event ring full");
        }
        let entry = ev.encode(self.events.next_seq());
        self.evt
            .push_request(&entry)
            .map_err(|_| "event ring full")?;
        self.evt.publish_requests();
        self.events
            .posted(entry.kind, entry.epoch)
            .map_err(|_| "event ring full")
    }

    /// Stage the epoch's dirty pages `pfns` (every page instead, in a new
    /// session's first checkpoint) read from `ram`, and `vcpu` as an HVM
    /// context blob with `header`; post `CheckpointReady`. Call with the
    /// staging area free ([`Engine::staging_free`]) and a session on
    /// ([`Engine::replicating`]); the guest is stopped meanwhile.
    pub fn stage<G: GuestPages>(
        &mut self,
        pfns: impl Iterator<Item = u64>,
        ram: &G,
        vcpu: &VcpuState,
        header: HeaderInfo,
    ) -> Result<Staged, &'static str> {
        let (_, vs) = self.view.region(Field::VcpuArea);
        let mut blob = alloc::vec![0u8; vs];
        let blob_len = hvm::encode(core::slice::from_ref(vcpu), header, &mut blob)
            .map_err(|_| "encoding the vCPU record")?;
        self.stage_context(pfns, ram, &blob[..blob_len])
    }

    /// [`Engine::stage`] for a guest whose whole machine is recorded:
    /// `context` is its HVM context stream, already encoded (the vCPU and
    /// the platform's records, `doppel_core::platform::records`), carried
    /// in the vCPU area as it is.
    pub fn stage_context<G: GuestPages>(
        &mut self,
        pfns: impl Iterator<Item = u64>,
        ram: &G,
        context: &[u8],
    ) -> Result<Staged, &'static str> {
        if !self.replicating() {
            return Err("no replication session to stage in");
        }
        if !self.staging_free() {
            return Err("staging area still held by the tool");
        }
        let (vo, vs) = self.view.region(Field::VcpuArea);
        if context.len() > vs {
            return Err("the HVM context does not fit the vCPU area");
        }
        let n = if core::mem::take(&mut self.full_next) {
            // A new session: every page, whatever this epoch dirtied.
            self.stage_pages(0..ram.pages(), ram)?
        } else {
            self.stage_pages(pfns, ram)?
        };
        let blob_len = context.len();
        self.bulk.write_bytes(vo, context);
        let off = |f: Field| self.view.region(f).0 as u64;
        let epoch = self.next_epoch;
        let ready = CheckpointReady {
            epoch,
            dirty_count: n,
            pfn_list: Span {
                offset: off(Field::PfnList),
                len: n * 8,
            },
            pages: Span {
                offset: off(Field::Staging),
                len: n * PAGE_SIZE,
            },
            vcpu: Span {
                offset: vo as u64,
                len: blob_len as u64,
            },
        };
        // Cannot be full: the previous checkpoint is answered (back-pressure).
        self.post_event(&Event::CheckpointReady(ready))?;
        self.next_epoch += 1;
        self.stats.posted += 1;
        Ok(Staged {
            epoch,
            dirty: n,
            blob_len,
        })
    }

    /// Copy the pages `pfns` into staging and their numbers into the pfn
    /// list; how many.
    fn stage_pages<G: GuestPages>(
        &mut self,
        pfns: impl Iterator<Item = u64>,
        ram: &G,
    ) -> Result<u64, &'static str> {
        let (so, ss) = self.view.region(Field::Staging);
        let (po, ps) = self.view.region(Field::PfnList);
        let page = PAGE_SIZE as usize;
        let mut n: usize = 0;
        for pfn in pfns {
            let at = n * page;
            if at + page > ss {
                return Err("staging area too small");
            }
            if n * 8 + 8 > ps {
                return Err("pfn list area too small");
            }
            if !ram.copy_page(pfn, &self.bulk, so + at) {
                return Err("dirty pfn outside guest RAM");
            }
            self.bulk.write_bytes(po + n * 8, &pfn.to_le_bytes());
            n += 1;
            if n.is_multiple_of(256) {
                // Staging a large guest's epoch 0 takes a while under an
                // emulator: the hypervisor is alive meanwhile.
                self.beat();
            }
        }
        Ok(n as u64)
    }
}
