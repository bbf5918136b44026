//! The backup's standby mode (`doppel backup --standby-ram`): committed
//! epochs go straight into a standby hypervisor's guest RAM, and at
//! failover the last committed HVM context blob is written into the
//! standby's vCPU area and `Activate` is sent (docs/REPLICATION.md,
//! "Output commit and failover").
//!
//! An epoch is applied only once it is complete (its CHECKPOINT arrived,
//! the stager hands it over) and has passed every check (complete, pfns in
//! range, epoch 0 covering the whole guest, blob decodes): applying cannot
//! fail half-way, so the guest RAM always holds exactly the last committed
//! epoch's memory, and the blob kept in memory is that epoch's.

use doppel_abi::control::{Features, Field};
use doppel_abi::msg::Reply;
use doppel_abi::{Command, SharedMem};

use crate::backup::EpochSink;
use crate::machine::{Control, MachineRam, PAGE};
use crate::primary::{Primary, PrimaryConfig, PrimaryError, MAX_VCPUS};
use crate::replica::{ReplicaError, StagedEpoch};
use crate::stream::records::PageBuf;

/// Why the standby cannot be used or activated.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(
        "{path}: the control area at {at:#x} is not a standby's (features {features:?}, \
         STANDBY missing): start the hypervisor with mode=standby"
    )]
    NotStandby {
        path: String,
        at: u64,
        features: Features,
    },
    #[error("nothing was ever committed: there is no state to activate the standby from")]
    NothingCommitted,
    #[error(
        "the HVM context blob ({len} bytes) does not fit the standby's vcpu_area ({size} bytes)"
    )]
    BlobTooLarge { len: usize, size: usize },
    #[error("activating the standby: {0}")]
    Activate(PrimaryError),
}

/// A standby hypervisor's guest RAM as the target of committed epochs.
pub struct Standby<'m> {
    machine: &'m MachineRam,
    ctl: Control,
    /// Epochs committed (the last one is `committed - 1`).
    committed: u64,
    /// The last committed epoch's HVM context blob.
    blob: Vec<u8>,
}

impl<'m> Standby<'m> {
    /// Use the control area `ctl` of `machine`; it must offer STANDBY.
    pub fn new(machine: &'m MachineRam, ctl: Control) -> Result<Self, StandbyError> {
        if !ctl.view.features().contains(Features::STANDBY) {
            return Err(StandbyError::NotStandby {
                path: machine.path().display().to_string(),
                at: ctl.at,
                features: ctl.view.features(),
            });
        }
        Ok(Self {
            machine,
            ctl,
            committed: 0,
            blob: Vec::new(),
        })
    }

    /// Epochs committed so far.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The last committed HVM context blob (empty before the first).
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// Failover: write the last committed blob at the start of the vCPU
    /// area, send `Activate{last committed epoch}` (request id 1) and wait
    /// for `Done`. Returns the epoch activated.
    pub fn activate(&self, cfg: PrimaryConfig) -> Result<u64, StandbyError> {
        self.activate_attached(cfg).map(|(epoch, _)| epoch)
    }

    /// [`Standby::activate`], keeping the tool's end of the standby's
    /// rings: after `Activate` the machine can be protected in its turn
    /// with it (`Primary::run`: `LogDirtyEnable` goes to the same ring).
    pub fn activate_attached(
        &self,
        cfg: PrimaryConfig,
    ) -> Result<(u64, Primary<'m>), StandbyError> {
        if self.committed == 0 {
            return Err(StandbyError::NothingCommitted);
        }
        let epoch = self.committed - 1;
        let (vo, vs) = self.ctl.view.region(Field::VcpuArea);
        if self.blob.len() > vs {
            return Err(StandbyError::BlobTooLarge {
                len: self.blob.len(),
                size: vs,
            });
        }
        let win = self.machine.window(self.ctl.at as usize);
        win.write_bytes(vo, &self.blob);
        win.fence_full();
        let mut p =
            Primary::attach_standby(self.machine, self.ctl, cfg).map_err(StandbyError::Activate)?;
        match p
            .command(Command::Activate { epoch }, "Activate")
            .map_err(StandbyError::Activate)?
        {
            Reply::Done => Ok((epoch, p)),
            other => Err(StandbyError::Activate(PrimaryError::BadResponse {
                cmd: "Activate",
                detail: format!("{other:?} (expected Done)"),
            })),
        }
    }
}

impl EpochSink for Standby<'_> {
    fn pages(&self) -> u64 {
        self.ctl.guest_pages()
    }

    fn commit(&mut self, mut staged: StagedEpoch) -> Result<Vec<PageBuf>, ReplicaError> {
        staged.check_complete()?;
        let epoch = self.committed;
        let local = self.ctl.guest_pages();
        let pages = staged.final_pages();
        if let Some((&pfn, _)) = pages.range(local..).next() {
            return Err(ReplicaError::PfnBeyondReplica { pfn, pages: local });
        }
        if epoch == 0 && pages.len() as u64 != local {
            return Err(ReplicaError::GuestMismatch {
                stream: pages.len() as u64,
                local,
            });
        }
        let blob = staged.hvm_context.take().unwrap_or_default();
        doppel_core::hvm::decode::<MAX_VCPUS>(&blob).map_err(|e| ReplicaError::BadContext {
            epoch,
            detail: format!("{e:?}"),
        })?;
        // Every check passed: apply (cannot fail).
        let mem = self.machine.mem();
        let base = self.ctl.guest_ram().offset as usize;
        let zero = [0u8; PAGE];
        for (pfn, data) in staged.final_pages() {
            mem.write_bytes(base + pfn as usize * PAGE, data.unwrap_or(&zero));
        }
        mem.fence_full();
        self.blob = blob;
        self.committed += 1;
        Ok(staged.into_pages().collect())
    }
}
