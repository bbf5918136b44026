//! Dirty tracking of a guest's RAM over its nested table, vendor-neutral:
//! the one implementation behind the test guests' run loop
//! ([`super::run`]) and the Linux guest's ([`super::linux`]).
//!
//! Three trackers (`doppel_core::selftest::Mode`): write-protect (one
//! nested fault per page's first write in an epoch, the page logged and
//! made writable again), PML (the CPU logs dirtied pages; the buffer is
//! drained when full and at every epoch end, as Xen's CLEAN does) and the
//! A/D scan (the nested table's dirty bits, read and cleared at the epoch
//! end). [`Tracker::harvest`] is CLEAN: the epoch's pages as Xen's bitmap,
//! the log emptied for the next epoch.

use alloc::vec;
use alloc::vec::Vec;

use doppel_abi::guest::PAGE_SIZE;
use doppel_core::dirtylog::{DirtyLog, DirtyTree};
use doppel_core::paging::{Flush, NestedEntry, NestedFault, NestedPageTable, RestoreWrite};
use doppel_core::selftest::Mode;

use super::guest::KernelFrames;
use super::vcpu::Vcpu;

/// A nested write fault, as the tracker saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFault {
    /// A tracked page's first write: logged, writable again.
    Logged,
    /// The page was writable already (a stale TLB entry): flushed.
    Spurious,
}

/// Deliberate breakage for the broken variants (each must fail its test).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sabotage {
    /// A write fault makes the page writable without logging it.
    pub no_fault_mark: bool,
    /// The PML buffer is not drained before the harvest.
    pub no_pml_drain: bool,
}

/// The dirty log of one guest and how it is filled.
pub struct Tracker {
    mode: Mode,
    log: DirtyTree,
    harvest: Vec<u8>,
    sabotage: Sabotage,
    /// Write-protect is lifted because nobody harvests (see
    /// [`Tracker::rearm`]).
    untracked: bool,
    /// Tracking exits (write faults, full PML buffers) and PML drains
    /// since [`Tracker::take_counts`].
    exits: u64,
    drains: u64,
}

impl Tracker {
    /// A tracker in `mode` for a guest of `pages` pages; nothing armed yet.
    pub fn new(pages: u64, mode: Mode, sabotage: Sabotage) -> Result<Self, &'static str> {
        let log = DirtyTree::new(pages.checked_sub(1).ok_or("a guest without RAM")?)
            .map_err(|_| "dirty log")?;
        let harvest = vec![0u8; log.bitmap_len()];
        Ok(Self {
            mode,
            log,
            harvest,
            sabotage,
            untracked: false,
            exits: 0,
            drains: 0,
        })
    }

    /// The log, for writes the hypervisor makes into guest RAM itself.
    pub fn log(&self) -> &DirtyTree {
        &self.log
    }

    /// The last harvest (Xen's bitmap layout, one bit per pfn).
    pub fn harvested(&self) -> &[u8] {
        &self.harvest
    }

    /// The last harvest, for pages written behind the tracker's back (the
    /// device model's) to join it.
    pub fn harvested_mut(&mut self) -> &mut [u8] {
        &mut self.harvest
    }

    /// OR `union` (harvests of earlier tracking epochs) into the harvest,
    /// and empty it.
    pub fn absorb(&mut self, union: &mut [u8]) {
        for (h, u) in self.harvest.iter_mut().zip(union.iter_mut()) {
            *h |= core::mem::take(u);
        }
    }

    /// Tracking exits and PML drains since the last call.
    pub fn take_counts(&mut self) -> (u64, u64) {
        (
            core::mem::take(&mut self.exits),
            core::mem::take(&mut self.drains),
        )
    }

    /// Start (`first`: for the first time on this vCPU and table) or
    /// restart, after a harvest, tracking for the next epoch.
    pub fn arm<E: NestedEntry, V: Vcpu>(
        &mut self,
        table: &mut NestedPageTable<E, KernelFrames>,
        vcpu: &mut V,
        first: bool,
    ) -> Result<(), &'static str> {
        let flush = match self.mode {
            Mode::WriteProtect => {
                table
                    .enable_write_protect()
                    .map_err(|_| "write-protecting the nested table")?
                    .flush
            }
            Mode::Pml | Mode::AdScan => {
                if first {
                    // Dirty bits are per leaf: split every large page into
                    // 4 KiB leaves (write-protect splits; then re-grant).
                    // Flushed below with everything else.
                    let _ = table
                        .enable_write_protect()
                        .map_err(|_| "splitting the nested table")?;
                    let _ = table.disable_write_protect();
                    if self.mode == Mode::Pml && !vcpu.set_pml(true) {
                        return Err("the backend has no page-modification logging");
                    }
                }
                // Clear the dirty bits so the next first write is seen again.
                table.scan_and_clear_dirty(false, |_| {}).flush
            }
        };
        vcpu.flush(flush.merge(Flush::All));
        Ok(())
    }

    /// After a harvest: track the next epoch when `wanted`. Otherwise, in
    /// write-protect mode, every leaf gets its hardware write permission
    /// back once, so an unprotected guest pays no exit per first write;
    /// when tracking is wanted again, every leaf is write-protected anew.
    /// (PML and the A/D scan cost the guest no exits and stay armed.)
    pub fn rearm<E: NestedEntry, V: Vcpu>(
        &mut self,
        table: &mut NestedPageTable<E, KernelFrames>,
        vcpu: &mut V,
        wanted: bool,
    ) -> Result<(), &'static str> {
        if self.mode != Mode::WriteProtect || wanted {
            if core::mem::take(&mut self.untracked) {
                log::info!("dirty tracking on again: every guest page write-protected");
            }
            return self.arm(table, vcpu, false);
        }
        self.stop(table, vcpu);
        Ok(())
    }

    /// Stop write-protect tracking for good (nobody harvests any more):
    /// every leaf writable again.
    pub fn stop<E: NestedEntry, V: Vcpu>(
        &mut self,
        table: &mut NestedPageTable<E, KernelFrames>,
        vcpu: &mut V,
    ) {
        if !self.untracked {
            self.untracked = true;
            let walk = table.disable_write_protect();
            vcpu.flush(walk.flush);
            log::info!(
                "dirty tracking off: {} leaves writable again, guest writes no longer trapped",
                walk.changed
            );
        }
    }

    /// Untracked from the start: nobody will harvest this run's pages
    /// (an activated standby's, a failed-over guest's).
    pub fn off(&mut self) {
        self.untracked = true;
        log::info!("dirty tracking off: nothing harvests this run's pages");
    }

    /// A nested write fault at `f` in guest RAM: log the page and give
    /// the write back. Err for a fault outside the table's RAM, or a log
    /// that refuses the page.
    pub fn write_fault<E: NestedEntry, V: Vcpu>(
        &mut self,
        table: &mut NestedPageTable<E, KernelFrames>,
        vcpu: &mut V,
        f: &NestedFault,
    ) -> Result<WriteFault, &'static str> {
        match table.restore_write(f.gpa) {
            Ok(RestoreWrite::Restored(flush)) => {
                self.exits += 1;
                if !self.sabotage.no_fault_mark {
                    self.log
                        .mark(f.gpa.as_u64() / PAGE_SIZE)
                        .map_err(|_| "dirty log refused a guest page")?;
                }
                vcpu.flush(flush);
                Ok(WriteFault::Logged)
            }
            Ok(RestoreWrite::Spurious) => {
                vcpu.flush(Flush::Page(f.gpa));
                Ok(WriteFault::Spurious)
            }
            Err(_) => Err("write fault outside guest RAM"),
        }
    }

    /// The PML buffer is full: drain it into the log.
    pub fn pml_full<V: Vcpu>(&mut self, vcpu: &mut V) -> Result<(), &'static str> {
        self.exits += 1;
        vcpu.drain_pml(&self.log)
            .map(|_| ())
            .map_err(|_| "PML drain failed")
    }

    /// Drain what the hardware buffered (PML; an A/D scan) into the log,
    /// without harvesting: before a vCPU whose PML buffer holds entries
    /// is thrown away.
    pub fn drain<E: NestedEntry, V: Vcpu>(
        &mut self,
        table: &mut NestedPageTable<E, KernelFrames>,
        vcpu: &mut V,
    ) -> Result<(), &'static str> {
        match self.mode {
            Mode::Pml => {
                if !self.sabotage.no_pml_drain {
                    vcpu.drain_pml(&self.log)
                        .map_err(|_| "PML drain at epoch end failed")?;
                    self.drains += 1;
                }
            }
            Mode::AdScan => {
                let log = &self.log;
                let mut bad = false;
                let walk = table.scan_and_clear_dirty(false, |gfn| {
                    bad |= log.mark(gfn.as_u64()).is_err();
                });
                vcpu.flush(walk.flush);
                if bad {
                    return Err("dirty bit outside guest RAM");
                }
            }
            Mode::WriteProtect => {}
        }
        Ok(())
    }

    /// The epoch ends with the guest stopped: drain, then CLEAN into the
    /// harvest ([`Tracker::harvested`]). How many pages it holds.
    pub fn harvest<E: NestedEntry, V: Vcpu>(
        &mut self,
        table: &mut NestedPageTable<E, KernelFrames>,
        vcpu: &mut V,
    ) -> Result<u64, &'static str> {
        self.drain(table, vcpu)?;
        let stats = self
            .log
            .clean_bitmap(&mut self.harvest)
            .map_err(|_| "CLEAN failed")?;
        Ok(stats.dirty_count)
    }
}
