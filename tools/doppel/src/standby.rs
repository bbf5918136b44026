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
//!
//! With a disk copy (`with_disk`, `doppel backup --disk`) the epoch's disk
//! writes are checked against its size with the rest and applied (then
//! fdatasync) at commit, before the memory; the epoch's device state
//! becomes `committed_device_state` (docs/STREAM.md, "Devices").

use doppel_abi::control::{Features, Field};
use doppel_abi::msg::Reply;
use doppel_abi::{Command, SharedMem};

use crate::backup::{DiskCopy, EpochSink};
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
    /// The guest disk's copy, if the backup keeps one (`--disk`).
    disk: Option<DiskCopy>,
    /// The device model's state as of the last committed epoch that
    /// carried one.
    device_state: Option<Vec<u8>>,
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
            disk: None,
            device_state: None,
        })
    }

    /// Keep `disk` at the committed epoch too: each epoch's disk writes
    /// are applied to it when the epoch commits, never before. Without a
    /// disk copy an epoch carrying disk writes is refused.
    pub fn with_disk(mut self, disk: DiskCopy) -> Self {
        self.disk = Some(disk);
        self
    }

    /// The disk copy, if any (its size, the bytes applied so far).
    pub fn disk(&self) -> Option<&DiskCopy> {
        self.disk.as_ref()
    }

    /// The device model's state of the last committed epoch that carried
    /// one (`None` before): what the backup's device model restores from
    /// at Activate.
    pub fn committed_device_state(&self) -> Option<&[u8]> {
        self.device_state.as_deref()
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

impl Standby<'_> {
    /// What `Activate` needs of an epoch, checked before it is applied and
    /// acknowledged: the HVM context record fits the standby's vCPU area
    /// and decodes as the hypervisor decodes it at `Activate` (exactly one
    /// CPU record, every descriptor of the size Xen's save format gives
    /// it), and the epoch carried X86_TSC_INFO.
    fn activatable(&self, epoch: u64, blob: &[u8], tsc: bool) -> Result<(), ReplicaError> {
        let refuse = |detail: String| ReplicaError::Unactivatable { epoch, detail };
        let (_, area) = self.ctl.view.region(Field::VcpuArea);
        if blob.len() > area {
            return Err(refuse(format!(
                "its HVM context record ({} bytes) does not fit the standby's vcpu_area ({area} \
                 bytes)",
                blob.len()
            )));
        }
        let cpus = match doppel_core::hvm::decode::<MAX_VCPUS>(blob) {
            Ok(d) => d.vcpus.len(),
            Err(e) => return Err(refuse(format!("its HVM context does not decode: {e:?}"))),
        };
        if cpus != 1 {
            return Err(refuse(format!(
                "its HVM context describes {cpus} vCPUs; the standby runs exactly one"
            )));
        }
        // The hypervisor's own decoder, as Activate runs it.
        doppel_core::hvm::decode::<1>(blob).map_err(|e| {
            refuse(format!(
                "its HVM context does not decode as Activate decodes it: {e:?}"
            ))
        })?;
        if !tsc {
            return Err(refuse("it carries no X86_TSC_INFO record".into()));
        }
        Ok(())
    }
}

impl EpochSink for Standby<'_> {
    fn pages(&self) -> u64 {
        self.ctl.guest_pages()
    }

    fn disk_size(&self) -> u64 {
        self.disk.as_ref().map_or(0, DiskCopy::size)
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
        // Ack only what the standby can be activated from: found out now,
        // the epoch is refused while the primary still runs; found out at
        // failover, there would be nothing to fail over to.
        self.activatable(epoch, &blob, staged.tsc.is_some())?;
        let writes = std::mem::take(&mut staged.disk_writes);
        match &self.disk {
            Some(d) => d.check(epoch, &writes)?,
            None if !writes.is_empty() => {
                return Err(ReplicaError::NoDisk {
                    epoch,
                    bytes: writes.iter().map(|w| w.data.len() as u64).sum(),
                })
            }
            None => {}
        }
        // Every check passed. The disk first: only its I/O can fail, and
        // then the guest RAM and the committed state are still the last
        // epoch's.
        if let Some(d) = &mut self.disk {
            d.apply(&writes)?;
        }
        // Applying the memory cannot fail.
        let mem = self.machine.mem();
        let base = self.ctl.guest_ram().offset as usize;
        let zero = [0u8; PAGE];
        for (pfn, data) in staged.final_pages() {
            mem.write_bytes(base + pfn as usize * PAGE, data.unwrap_or(&zero));
        }
        mem.fence_full();
        self.blob = blob;
        if let Some(ds) = staged.device_state.take() {
            self.device_state = Some(ds);
        }
        self.committed += 1;
        Ok(staged.into_pages().collect())
    }
}
