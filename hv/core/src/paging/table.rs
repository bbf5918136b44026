//! The generic 4-level nested page table.
//!
//! Levels are numbered like the hardware walk: 4 (PML4, 512 GiB per entry),
//! 3 (PDPT, 1 GiB), 2 (PD, 2 MiB), 1 (PT, 4 KiB). Leaves are 4 KiB entries at
//! level 1 or 2 MiB entries at level 2; 1 GiB leaves are never created.
//!
//! # All or nothing
//! Every operation that needs new table frames first plans how many it needs
//! (walking without changing anything, which also finds overlaps), then
//! takes all of them from the allocator, and only then changes entries. If
//! the allocator runs dry the frames taken so far are returned and the call
//! fails with [`Error::AllocFailed`] having changed nothing. Frames reserved
//! but not yet linked are chained through their first entry, so reserving
//! needs no heap memory.
//!
//! # Ownership of frames
//! The table owns every table frame it allocated, including empty ones left
//! behind by [`unmap`](NestedPageTable::unmap) (they are reused by later
//! mappings). Dropping the table frees them all; the kernel must first make
//! sure no processor can still walk it (no VMCS/VMCB points at it and the
//! TLBs have been flushed). Guest memory the leaves point at is not owned.
//!
//! # Concurrency with the hardware
//! Mutating methods take `&mut self`, so software is serialised; the
//! processor may still set accessed/dirty bits concurrently while vCPUs run.
//! Entries are therefore changed with atomic read-modify-writes (and splits
//! with compare-exchange) so a hardware-set bit is never lost. Changes become
//! effective for running vCPUs only after the returned [`Flush`]; for a
//! consistent log-dirty epoch, run the epoch-end operations with the vCPUs
//! paused and flush before resuming them.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

use super::ept::EptEntry;
use super::npt::NptEntry;
use super::{Error, Flush, MapAttrs, MemType, NestedEntry, PageSize, Perms};
use crate::addr::{Gfn, GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frame::{FrameAllocator, ENTRIES_PER_FRAME};

/// First guest-physical address a 4-level table cannot map.
pub const GPA_LIMIT: u64 = 1 << 48;
/// First host-physical address an entry cannot hold (MAXPHYADDR <= 52).
pub const HPA_LIMIT: u64 = 1 << 52;

const SIZE_2M: u64 = 1 << 21;
const PAGES_PER_2M: u64 = 512;

const fn shift(level: u8) -> u32 {
    12 + 9 * (level as u32 - 1)
}

const fn span(level: u8) -> u64 {
    1 << shift(level)
}

/// Index range of the entries of a table (whose first address is `base`)
/// that cover `[start, end)`.
fn indices(level: u8, base: u64, start: u64, end: u64) -> core::ops::RangeInclusive<usize> {
    let s = ((start - base) >> shift(level)) as usize;
    let e = ((end - 1 - base) >> shift(level)) as usize;
    s..=e.min(ENTRIES_PER_FRAME - 1)
}

/// A nested page table in the Intel EPT format.
pub type EptTable<A> = NestedPageTable<EptEntry, A>;
/// A nested page table in the AMD NPT format.
pub type NptTable<A> = NestedPageTable<NptEntry, A>;

/// Counters kept by a table for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Table frames currently owned (the root included).
    pub tables: u64,
    /// 2 MiB leaves split into 512 4 KiB leaves so far.
    pub splits: u64,
    /// Leaves visited by whole-table walks (write protect, scans).
    pub leaves_visited: u64,
    /// 4 KiB pages covered by those leaves.
    pub pages_visited: u64,
}

/// Result of a whole-table walk.
#[must_use = "the flush must be carried out"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Invalidation needed before the change is effective.
    pub flush: Flush,
    /// Leaves visited.
    pub leaves: u64,
    /// 4 KiB pages covered by the visited leaves.
    pub pages: u64,
    /// Leaves changed.
    pub changed: u64,
}

/// A translated address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Host-physical address, page offset included.
    pub hpa: HostPhysAddr,
    /// Size of the leaf that maps it.
    pub size: PageSize,
    /// Permissions the hardware grants now (write cleared while tracked).
    pub perms: Perms,
    /// Memory type.
    pub mem: MemType,
    /// Writable, but write-protected for dirty tracking.
    pub write_protected: bool,
    /// Hardware accessed bit of the leaf.
    pub accessed: bool,
    /// Hardware dirty bit of the leaf.
    pub dirty: bool,
}

/// Outcome of [`NestedPageTable::restore_write`].
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreWrite {
    /// Write access was re-granted: the page is dirty in this epoch.
    Restored(Flush),
    /// The page was already writable: the fault was spurious (a second vCPU
    /// faulting on the same page, or a stale TLB entry; see
    /// [`NestedPageTable::restore_write`]). Nothing changed.
    Spurious,
}

/// Frames reserved for an operation, chained through their entry 0
/// (`next | 1`, 0 ends the chain; frames are 4 KiB aligned so bit 0 is free).
struct Reserve {
    head: Option<HostPhysAddr>,
}

impl Reserve {
    fn fill<A: FrameAllocator>(alloc: &A, n: u64) -> Result<Self, Error> {
        let mut r = Reserve { head: None };
        for _ in 0..n {
            match alloc.alloc_zeroed() {
                Some(f) => {
                    let link = r.head.map_or(0, |h| h.as_u64() | 1);
                    alloc.frame(f).entries[0].store(link, Ordering::Relaxed);
                    r.head = Some(f);
                }
                None => {
                    r.release(alloc);
                    return Err(Error::AllocFailed);
                }
            }
        }
        Ok(r)
    }

    /// A zeroed frame from the reserve, or straight from the allocator if
    /// the plan undercounted (which it does not; this keeps it panic-free).
    fn take<A: FrameAllocator>(&mut self, alloc: &A) -> Result<HostPhysAddr, Error> {
        match self.head {
            Some(f) => {
                let e = &alloc.frame(f).entries[0];
                let link = e.load(Ordering::Relaxed);
                e.store(0, Ordering::Relaxed);
                self.head = (link != 0).then(|| HostPhysAddr::new(link & !1));
                Ok(f)
            }
            None => alloc.alloc_zeroed().ok_or(Error::AllocFailed),
        }
    }

    fn release<A: FrameAllocator>(&mut self, alloc: &A) {
        while let Some(f) = self.head {
            let _ = self.take(alloc);
            alloc.free(f);
        }
    }
}

/// What `map` writes into each leaf.
struct MapReq {
    gpa: u64,
    hpa: u64,
    attrs: MapAttrs,
    large: bool,
    wp: bool,
}

impl MapReq {
    fn hpa_of(&self, gpa: u64) -> u64 {
        self.hpa + (gpa - self.gpa)
    }

    /// Whether `[s, t)`, one level-2 slot's part of the range, gets a 2 MiB
    /// leaf (when the slot is empty).
    fn fits_large(&self, s: u64, t: u64) -> bool {
        self.large
            && t - s == SIZE_2M
            && s.is_multiple_of(SIZE_2M)
            && self.hpa_of(s).is_multiple_of(SIZE_2M)
    }

    fn leaf<E: NestedEntry>(&self, gpa: u64, large: bool) -> E {
        E::leaf(
            HostPhysAddr::new(self.hpa_of(gpa)),
            self.attrs.perms,
            self.attrs.mem,
            large,
            self.wp,
        )
    }
}

/// A 4-level nested page table of entry format `E`, whose frames come from
/// `A`.
pub struct NestedPageTable<E: NestedEntry, A: FrameAllocator> {
    alloc: A,
    root: HostPhysAddr,
    write_protect: bool,
    stats: TableStats,
    _entry: PhantomData<E>,
}

impl<E: NestedEntry, A: FrameAllocator> NestedPageTable<E, A> {
    /// An empty table (one root frame).
    pub fn new(alloc: A) -> Result<Self, Error> {
        let root = alloc.alloc_zeroed().ok_or(Error::AllocFailed)?;
        Ok(Self {
            alloc,
            root,
            write_protect: false,
            stats: TableStats {
                tables: 1,
                ..TableStats::default()
            },
            _entry: PhantomData,
        })
    }

    /// Host-physical address of the top-level table.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// The EPTP (Intel) or nCR3 (AMD) value for this table; `ad` enables
    /// EPT accessed/dirty flags (needed for [`scan_and_clear_dirty`]).
    ///
    /// [`scan_and_clear_dirty`]: Self::scan_and_clear_dirty
    pub fn root_pointer(&self, ad: bool) -> u64 {
        E::root_pointer(self.root, ad)
    }

    /// Whether write protection for dirty tracking is on.
    pub fn is_write_protecting(&self) -> bool {
        self.write_protect
    }

    /// Counters.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// The frame allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    fn slot(&self, table: HostPhysAddr, i: usize) -> &AtomicU64 {
        &self.alloc.frame(table).entries[i]
    }

    fn load(&self, table: HostPhysAddr, i: usize) -> E {
        E::from_raw(self.slot(table, i).load(Ordering::Acquire))
    }

    fn check_gpa_range(gpa: GuestPhysAddr, len: u64) -> Result<u64, Error> {
        if !gpa.is_aligned(PAGE_SIZE) {
            return Err(Error::MisalignedGpa(gpa));
        }
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::BadLength(len));
        }
        match gpa.as_u64().checked_add(len) {
            Some(end) if end <= GPA_LIMIT => Ok(end),
            _ => Err(Error::GpaOutOfRange(gpa)),
        }
    }

    /// Maps `[gpa, gpa + len)` to `[hpa, hpa + len)`.
    ///
    /// Uses 2 MiB leaves where `attrs.large`, write protection is off, both
    /// addresses are 2 MiB aligned, a whole 2 MiB is covered and no 4 KiB
    /// table already exists there; 4 KiB leaves elsewhere. While write
    /// protection is on, writable pages are mapped write-protected (so their
    /// first write is seen) and only with 4 KiB leaves.
    ///
    /// Fails without changing anything if any page of the range is already
    /// mapped ([`Error::Overlap`]), on misaligned or out-of-range input, or
    /// when frames run out. Returns [`Flush::None`]: only empty entries are
    /// filled, and neither vendor caches those.
    pub fn map(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        len: u64,
        attrs: MapAttrs,
    ) -> Result<Flush, Error> {
        let end = Self::check_gpa_range(gpa, len)?;
        if !hpa.is_aligned(PAGE_SIZE) {
            return Err(Error::MisalignedHpa(hpa));
        }
        if hpa.as_u64().checked_add(len).is_none_or(|e| e > HPA_LIMIT) {
            return Err(Error::HpaOutOfRange(hpa));
        }
        if !attrs.perms.contains(Perms::READ) {
            return Err(Error::BadPerms(attrs.perms));
        }
        let req = MapReq {
            gpa: gpa.as_u64(),
            hpa: hpa.as_u64(),
            attrs,
            large: attrs.large && !self.write_protect,
            wp: self.write_protect,
        };
        let need = self.plan_map(Some(self.root), 4, 0, req.gpa, end, &req)?;
        let mut reserve = Reserve::fill(&self.alloc, need)?;
        let res = self.apply_map(self.root, 4, 0, req.gpa, end, &req, &mut reserve);
        reserve.release(&self.alloc);
        self.stats.tables += need;
        res.map(|()| Flush::None)
    }

    /// Counts the tables `map` must create, or finds the first overlap.
    /// `table` is `None` below an entry that `map` would create.
    fn plan_map(
        &self,
        table: Option<HostPhysAddr>,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        req: &MapReq,
    ) -> Result<u64, Error> {
        let mut need = 0;
        for i in indices(level, base, start, end) {
            let e_base = base + i as u64 * span(level);
            let (s, t) = (start.max(e_base), end.min(e_base + span(level)));
            let e = table.map_or(E::empty(), |tb| self.load(tb, i));
            if level == 1 || (e.is_present() && e.is_large()) {
                if e.is_present() {
                    return Err(Error::Overlap(GuestPhysAddr::new(s)));
                }
                continue;
            }
            if level == 2 && !e.is_present() && req.fits_large(s, t) {
                continue;
            }
            let child = if e.is_present() {
                Some(e.addr())
            } else {
                need += 1;
                None
            };
            need += self.plan_map(child, level - 1, e_base, s, t, req)?;
        }
        Ok(need)
    }

    /// Writes what `plan_map` planned; allocation only from `reserve`.
    #[allow(clippy::too_many_arguments)]
    fn apply_map(
        &self,
        table: HostPhysAddr,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        req: &MapReq,
        reserve: &mut Reserve,
    ) -> Result<(), Error> {
        for i in indices(level, base, start, end) {
            let e_base = base + i as u64 * span(level);
            let (s, t) = (start.max(e_base), end.min(e_base + span(level)));
            let slot = self.slot(table, i);
            let e = E::from_raw(slot.load(Ordering::Acquire));
            if level == 1 {
                slot.store(req.leaf::<E>(s, false).raw(), Ordering::Release);
                continue;
            }
            if level == 2 && !e.is_present() && req.fits_large(s, t) {
                slot.store(req.leaf::<E>(s, true).raw(), Ordering::Release);
                continue;
            }
            let child = if e.is_present() {
                e.addr()
            } else {
                let f = reserve.take(&self.alloc)?;
                slot.store(E::table(f).raw(), Ordering::Release);
                f
            };
            self.apply_map(child, level - 1, e_base, s, t, req, reserve)?;
        }
        Ok(())
    }

    /// Removes every mapping in `[gpa, gpa + len)`; pages that are not
    /// mapped are skipped. A 2 MiB leaf only partly inside the range is first
    /// split (the one frame that needs is reserved up front, so on
    /// [`Error::AllocFailed`] nothing changed). Emptied tables are kept.
    /// Returns `Page` when exactly one 4 KiB leaf was removed, `All` when
    /// more, `None` when nothing was mapped.
    pub fn unmap(&mut self, gpa: GuestPhysAddr, len: u64) -> Result<Flush, Error> {
        let end = Self::check_gpa_range(gpa, len)?;
        let start = gpa.as_u64();
        // Only the 2 MiB regions holding the first and last page can be
        // partly covered.
        let first = start & !(SIZE_2M - 1);
        let last = (end - 1) & !(SIZE_2M - 1);
        let regions = if first == last {
            &[first][..]
        } else {
            &[first, last][..]
        };
        let mut need = 0;
        for &region in regions {
            let partial = start > region || end < region + SIZE_2M;
            if let Some((2, e, _)) = self.find_leaf(region) {
                need += u64::from(partial && e.is_large());
            }
        }
        let mut reserve = Reserve::fill(&self.alloc, need)?;
        let mut flush = Flush::None;
        let res = self.apply_unmap(self.root, 4, 0, start, end, &mut reserve, &mut flush);
        reserve.release(&self.alloc);
        res.map(|()| flush)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_unmap(
        &mut self,
        table: HostPhysAddr,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        reserve: &mut Reserve,
        flush: &mut Flush,
    ) -> Result<(), Error> {
        for i in indices(level, base, start, end) {
            let e_base = base + i as u64 * span(level);
            let (s, t) = (start.max(e_base), end.min(e_base + span(level)));
            let e = self.load(table, i);
            if !e.is_present() {
                continue;
            }
            if level == 1 {
                self.slot(table, i).swap(0, Ordering::AcqRel);
                *flush = flush.merge(Flush::Page(GuestPhysAddr::new(s)));
                continue;
            }
            let mut child = e.addr();
            if e.is_large() {
                if t - s == span(level) {
                    self.slot(table, i).swap(0, Ordering::AcqRel);
                    *flush = Flush::All;
                    continue;
                }
                child = reserve.take(&self.alloc)?;
                self.split_slot(self.slot(table, i), child, false);
                self.count_split();
            }
            self.apply_unmap(child, level - 1, e_base, s, t, reserve, flush)?;
        }
        Ok(())
    }

    /// Replaces the 2 MiB leaf in `slot` with a pointer to `new`, filled with
    /// the equivalent 512 4 KiB leaves (hardware write cleared if `wp`).
    /// Retries if the hardware sets A/D on the leaf meanwhile, so those bits
    /// are carried into the children.
    fn split_slot(&self, slot: &AtomicU64, new: HostPhysAddr, wp: bool) {
        let frame = self.alloc.frame(new);
        let mut cur = E::from_raw(slot.load(Ordering::Acquire));
        loop {
            let first = cur.split_child(0, wp).raw();
            for (i, e) in frame.entries.iter().enumerate() {
                e.store(first + ((i as u64) << 12), Ordering::Relaxed);
            }
            match slot.compare_exchange(
                cur.raw(),
                E::table(new).raw(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => cur = E::from_raw(now),
            }
        }
    }

    fn count_split(&mut self) {
        self.stats.splits += 1;
        self.stats.tables += 1;
    }

    /// The leaf mapping `gpa`: (level, entry, slot's table and index).
    fn find_leaf(&self, gpa: u64) -> Option<(u8, E, (HostPhysAddr, usize))> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        let mut level = 4;
        loop {
            let i = ((gpa >> shift(level)) & 511) as usize;
            let e = self.load(table, i);
            if !e.is_present() {
                return None;
            }
            if level == 1 || e.is_large() {
                return Some((level, e, (table, i)));
            }
            table = e.addr();
            level -= 1;
        }
    }

    /// Translates a guest-physical address (any byte), or `None` if unmapped
    /// or beyond the 48-bit guest space.
    pub fn translate(&self, gpa: GuestPhysAddr) -> Option<Translation> {
        let (level, e, _) = self.find_leaf(gpa.as_u64())?;
        Some(Self::translation(gpa.as_u64(), level, e))
    }

    fn translation(gpa: u64, level: u8, e: E) -> Translation {
        let (size, base) = if level == 2 {
            (PageSize::Size2M, e.large_addr())
        } else {
            (PageSize::Size4K, e.addr())
        };
        Translation {
            hpa: HostPhysAddr::new(base.as_u64() + (gpa & (size.bytes() - 1))),
            size,
            perms: e.perms(),
            mem: e.mem_type(),
            write_protected: e.is_soft_writable() && !e.is_hw_writable(),
            accessed: e.is_accessed(),
            dirty: e.is_dirty(),
        }
    }

    /// Calls `f(gpa, translation)` for every leaf in ascending gpa order
    /// (`gpa` is the leaf's first address).
    pub fn for_each_leaf(&self, mut f: impl FnMut(GuestPhysAddr, Translation)) {
        self.walk_leaves(self.root, 4, 0, &mut |gpa, level, _, e| {
            f(GuestPhysAddr::new(gpa), Self::translation(gpa, level, e))
        });
    }

    fn walk_leaves<F: FnMut(u64, u8, &AtomicU64, E)>(
        &self,
        table: HostPhysAddr,
        level: u8,
        base: u64,
        f: &mut F,
    ) {
        for (i, slot) in self.alloc.frame(table).entries.iter().enumerate() {
            let e = E::from_raw(slot.load(Ordering::Acquire));
            if !e.is_present() {
                continue;
            }
            let gpa = base + ((i as u64) << shift(level));
            if level == 1 || e.is_large() {
                f(gpa, level, slot, e);
            } else {
                self.walk_leaves(e.addr(), level - 1, gpa, f);
            }
        }
    }

    fn count_large(&self, table: HostPhysAddr, level: u8) -> u64 {
        let mut n = 0;
        for i in 0..ENTRIES_PER_FRAME {
            let e = self.load(table, i);
            if e.is_present() {
                if level == 2 {
                    n += u64::from(e.is_large());
                } else if !e.is_large() {
                    n += self.count_large(e.addr(), level - 1);
                }
            }
        }
        n
    }

    /// Starts dirty tracking by write protection: clears the hardware write
    /// bit of every writable leaf, first splitting every 2 MiB leaf into 4
    /// KiB leaves so faults and re-grants are per 4 KiB page.
    ///
    /// The frames for all splits are reserved first: on
    /// [`Error::AllocFailed`] nothing changed. Later [`map`](Self::map)s
    /// create write-protected 4 KiB leaves until
    /// [`disable_write_protect`](Self::disable_write_protect). Calling it
    /// again re-protects pages written since (the per-epoch re-arm).
    pub fn enable_write_protect(&mut self) -> Result<Walk, Error> {
        let need = self.count_large(self.root, 4);
        let mut reserve = Reserve::fill(&self.alloc, need)?;
        self.write_protect = true;
        let mut walk = Walk {
            flush: Flush::None,
            leaves: 0,
            pages: 0,
            changed: 0,
        };
        let mut splits = 0;
        let res = self.protect_table(self.root, 4, &mut reserve, &mut walk, &mut splits);
        reserve.release(&self.alloc);
        self.stats.splits += splits;
        self.stats.tables += splits;
        self.stats.leaves_visited += walk.leaves;
        self.stats.pages_visited += walk.pages;
        if walk.changed > 0 {
            walk.flush = Flush::All;
        }
        res.map(|_| walk)
    }

    /// Protects the subtree at `table`, counting splits in `splits`.
    fn protect_table(
        &self,
        table: HostPhysAddr,
        level: u8,
        reserve: &mut Reserve,
        walk: &mut Walk,
        splits: &mut u64,
    ) -> Result<(), Error> {
        let entries = &self.alloc.frame(table).entries;
        if level == 1 {
            // The hot loop: one load per leaf, a locked RMW only where the
            // write bit is set.
            // Counters in locals stay in registers across the atomics.
            let (mut leaves, mut changed) = (0, 0);
            for slot in entries {
                let e = E::from_raw(slot.load(Ordering::Acquire));
                if !e.is_present() {
                    continue;
                }
                leaves += 1;
                if e.is_hw_writable() {
                    slot.fetch_and(!E::WRITE, Ordering::AcqRel);
                    changed += 1;
                }
            }
            walk.leaves += leaves;
            walk.changed += changed;
            walk.pages = walk.leaves;
            return Ok(());
        }
        for slot in entries {
            let e = E::from_raw(slot.load(Ordering::Acquire));
            if !e.is_present() {
                continue;
            }
            if !e.is_large() {
                self.protect_table(e.addr(), level - 1, reserve, walk, splits)?;
            } else if level == 2 {
                let new = reserve.take(&self.alloc)?;
                self.split_slot(slot, new, true);
                *splits += 1;
                walk.leaves += PAGES_PER_2M;
                walk.pages = walk.leaves;
                if e.is_hw_writable() {
                    walk.changed += PAGES_PER_2M;
                }
            }
        }
        Ok(())
    }

    /// Handles a write fault on `gpa` (any byte of the page): re-grants
    /// hardware write on that one 4 KiB page if it is logically writable.
    ///
    /// - [`RestoreWrite::Restored`]: the page was write-protected; log it as
    ///   dirty. The flush is `Page(gpa)`: permission was only raised. Intel
    ///   documents that an EPT violation itself invalidates the cached
    ///   translations of the faulting address, so a VMX backend may skip it;
    ///   an SVM backend should flush the guest's ASID unless it has checked
    ///   the equivalent AMD guarantee.
    /// - [`RestoreWrite::Spurious`]: the page already was writable (another
    ///   vCPU restored it first, or a stale read-only translation survived a
    ///   skipped flush: a backend that skipped one should flush now, or the
    ///   access faults again).
    /// - [`Error::WriteNotAllowed`]: the page is mapped read-only; a real
    ///   protection fault.
    /// - [`Error::NotMapped`]: no mapping (or beyond the guest space).
    ///
    /// A write-protected 2 MiB leaf (not produced by this table's own
    /// operations, which split first) is split here, which may fail with
    /// [`Error::AllocFailed`] without changes.
    pub fn restore_write(&mut self, gpa: GuestPhysAddr) -> Result<RestoreWrite, Error> {
        let page = gpa.align_down(PAGE_SIZE);
        let Some((level, e, (table, i))) = self.find_leaf(page.as_u64()) else {
            return Err(Error::NotMapped(page));
        };
        if !e.is_soft_writable() {
            return Err(Error::WriteNotAllowed(page));
        }
        if e.is_hw_writable() {
            return Ok(RestoreWrite::Spurious);
        }
        let (table, i) = if level == 2 {
            let mut reserve = Reserve::fill(&self.alloc, 1)?;
            let new = reserve.take(&self.alloc)?;
            self.split_slot(self.slot(table, i), new, true);
            self.count_split();
            (new, ((page.as_u64() >> 12) & 511) as usize)
        } else {
            (table, i)
        };
        self.slot(table, i).fetch_or(E::WRITE, Ordering::AcqRel);
        Ok(RestoreWrite::Restored(Flush::Page(page)))
    }

    /// Stops write-protect tracking: gives hardware write back to every
    /// logically writable leaf. Split leaves stay 4 KiB. The flush is `All`
    /// when anything changed; as only permissions were raised, skipping it
    /// merely risks spurious faults that `restore_write` reports as such.
    pub fn disable_write_protect(&mut self) -> Walk {
        self.write_protect = false;
        let mut walk = Walk {
            flush: Flush::None,
            leaves: 0,
            pages: 0,
            changed: 0,
        };
        self.walk_leaves(self.root, 4, 0, &mut |_, level, slot, e| {
            walk.leaves += 1;
            walk.pages += if level == 2 { PAGES_PER_2M } else { 1 };
            if e.is_soft_writable() && !e.is_hw_writable() {
                slot.fetch_or(E::WRITE, Ordering::AcqRel);
                walk.changed += 1;
            }
        });
        self.account(walk)
    }

    fn account(&mut self, mut walk: Walk) -> Walk {
        self.stats.leaves_visited += walk.leaves;
        self.stats.pages_visited += walk.pages;
        if walk.changed > 0 {
            walk.flush = Flush::All;
        }
        walk
    }

    /// The A/D-scan mode of dirty tracking: calls `visit(gfn)` in ascending
    /// order for every page whose leaf has the dirty bit set, and clears that
    /// bit (and every leaf's accessed bit when `clear_accessed`).
    ///
    /// A dirty 2 MiB leaf reports all 512 of its frames (the hardware keeps
    /// one bit for the whole page); to track such memory per 4 KiB page,
    /// map it with `large: false`. Splitting keeps A/D on all 512 children.
    /// On Intel this needs EPTP A/D enabled (`root_pointer(true)`).
    pub fn scan_and_clear_dirty(
        &mut self,
        clear_accessed: bool,
        mut visit: impl FnMut(Gfn),
    ) -> Walk {
        let mut walk = Walk {
            flush: Flush::None,
            leaves: 0,
            pages: 0,
            changed: 0,
        };
        let mask = E::DIRTY | if clear_accessed { E::ACCESSED } else { 0 };
        self.walk_leaves(self.root, 4, 0, &mut |gpa, level, slot, e| {
            let pages = if level == 2 { PAGES_PER_2M } else { 1 };
            walk.leaves += 1;
            walk.pages += pages;
            if e.raw() & mask == 0 {
                return;
            }
            slot.fetch_and(!mask, Ordering::AcqRel);
            walk.changed += 1;
            if e.is_dirty() {
                let gfn = gpa >> 12;
                for k in 0..pages {
                    visit(Gfn::new(gfn + k));
                }
            }
        });
        self.account(walk)
    }

    /// Sets the accessed bit, and the dirty bit when `write`, on the leaf
    /// mapping `gpa`: what the processor does when the guest accesses the
    /// page with A/D enabled. Used by tests in the hardware's role, and by
    /// hypervisor code that writes guest memory on the guest's behalf while
    /// dirty tracking uses A/D scans.
    pub fn mark_accessed(&self, gpa: GuestPhysAddr, write: bool) -> Result<(), Error> {
        let page = gpa.align_down(PAGE_SIZE);
        let Some((_, _, (table, i))) = self.find_leaf(page.as_u64()) else {
            return Err(Error::NotMapped(page));
        };
        let bits = E::ACCESSED | if write { E::DIRTY } else { 0 };
        self.slot(table, i).fetch_or(bits, Ordering::AcqRel);
        Ok(())
    }

    fn free_tables(&self, table: HostPhysAddr, level: u8) {
        if level > 1 {
            for i in 0..ENTRIES_PER_FRAME {
                let e = self.load(table, i);
                if e.is_present() && !e.is_large() {
                    self.free_tables(e.addr(), level - 1);
                }
            }
        }
        self.alloc.free(table);
    }
}

impl<E: NestedEntry, A: FrameAllocator> Drop for NestedPageTable<E, A> {
    /// Frees every table frame. The caller must have detached the table from
    /// all processors and flushed (see the module documentation).
    fn drop(&mut self) {
        self.free_tables(self.root, 4);
    }
}
