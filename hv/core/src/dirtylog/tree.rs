//! One generation of Xen's lazily allocated log-dirty tree.
//!
//! Shape (as Xen's `mm/paging.c`): four levels. A leaf is a 4 KiB bitmap
//! page covering 32768 pfns; the three interior levels have 512 children
//! each, so the tree covers 2^(15 + 3 * 9) = 2^42 pfns. Interior nodes and
//! leaves are allocated on the first mark beneath them.
//!
//! Unlike Xen, every node also carries a 512-bit *summary*: bit `i` says
//! "child `i` (or, in a leaf, bitmap word `i`) may hold dirty bits". A
//! harvest follows the summaries down from the root, so it visits only the
//! words that were dirtied; its cost follows the number of dirty words,
//! never the guest size.
//!
//! Each leaf also has a list of the offsets of the first [`LEAF_LIST_CAP`]
//! bits newly set in it, in the order they were set. The lists of a level-2
//! node's 512 leaves sit in that node, 128 bytes each, one after the other.
//! A *listed* harvest (used by [`super::DirtyTree::clean_unordered_with`])
//! reads a sparsely dirtied leaf's list and nothing of the leaf itself: a
//! sequential sweep over the lists instead of a scattered read and clear of
//! every dirty bitmap word. The leaf is then *stale*: its bitmap words and
//! summary still hold the harvested bits, and the first marker that comes
//! back to it clears the listed words and the summary (at most
//! `LEAF_LIST_CAP + 8` stores) before setting its bit. That moves the
//! clearing out of CLEAN, which runs while the guest is paused, to the next
//! epoch's first fault in the leaf. A leaf with more new bits than its list
//! holds is harvested by the summary walk, which clears as it reads.
//!
//! Marking is lock-free (`&self`, atomics) except for that lazy clearing:
//! markers that meet a leaf another marker is clearing wait for its (at
//! most `LEAF_LIST_CAP + 8`) stores. Harvested leaves are kept for reuse: a
//! guest's working set tends to be dirtied again in the next epoch, and
//! freeing a node while a concurrent marker may hold a reference to it
//! would need a grace period. [`LogTree::reset`] (with `&mut self`, so no
//! marker can be running) frees everything, e.g. when log-dirty mode is
//! switched off.

use alloc::alloc::{alloc_zeroed, Layout};
use alloc::boxed::Box;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::{DirtyLog, DirtyLogError, DirtyStats, DirtyWord};

/// log2 of the pfns one leaf bitmap page covers (4096 bytes * 8 bits).
const LEAF_SHIFT: u32 = 15;
/// log2 of the fan-out of an interior node.
const FANOUT_SHIFT: u32 = 9;
const FANOUT: usize = 1 << FANOUT_SHIFT;
const INDEX_MASK: u64 = FANOUT as u64 - 1;
/// Bitmap words in a leaf: 32768 bits / 64.
const LEAF_WORDS: usize = 1 << (LEAF_SHIFT - 6);
/// Words of a 512-bit summary.
const SUMMARY_WORDS: usize = FANOUT / 64;

/// Highest pfn a tree can hold: 2^42 - 1 (4 levels: 15 + 9 + 9 + 9 bits).
pub const TREE_MAX_PFN: u64 = (1 << (LEAF_SHIFT + 3 * FANOUT_SHIFT)) - 1;

/// Offsets a leaf lists (new bits since its last harvest or clearing).
/// At 0.1% uniform density a leaf gets ~33 new bits per epoch; one more
/// than 60 is rare (Poisson tail ~1e-5 per leaf).
pub const LEAF_LIST_CAP: usize = 60;

/// Leaf states (`LeafList::state`).
const FRESH: u32 = 0;
/// Harvested from its list: the listed bitmap words still hold the old
/// bits and must be cleared before the next mark.
const STALE: u32 = 1;
/// A marker is clearing the listed words.
const CLEARING: u32 = 2;
/// A `count` that marks the list as unusable until the next quiesced
/// harvest (set by the swap-based CLEAN, which does not keep the lists).
const UNLISTED: u32 = 1 << 30;

const _: () = assert!(LEAF_WORDS == 512);
const _: () = assert!(LEAF_LIST_CAP < u16::MAX as usize);
const _: () = assert!(core::mem::size_of::<[AtomicU64; LEAF_WORDS]>() == 4096);
const _: () = assert!(TREE_MAX_PFN >= (1 << 40));

/// A leaf: one 4 KiB bitmap page (Xen's layout, pfn bit `p & 0x7fff`) and
/// the summary of its non-zero words.
struct Leaf {
    words: [AtomicU64; LEAF_WORDS],
    summary: [AtomicU64; SUMMARY_WORDS],
}

/// A leaf's list of new bits and its state. Kept in the level-2 node, next
/// to the lists of the neighbouring leaves, so a listed harvest reads them
/// in one sequential sweep and never touches the leaves themselves.
#[repr(C, align(64))]
struct LeafList {
    /// FRESH, STALE or CLEARING.
    state: AtomicU32,
    /// New bits since the last harvest or clearing; more than
    /// `LEAF_LIST_CAP` means the list overflowed (it then stays a little
    /// above, or at `UNLISTED`).
    count: AtomicU32,
    /// Leaf offsets (`pfn & 0x7fff`) of the first `LEAF_LIST_CAP` new bits.
    list: [AtomicU16; LEAF_LIST_CAP],
}

const _: () = assert!(core::mem::size_of::<LeafList>() == 128);

impl LeafList {
    /// Makes a stale leaf's bitmap words and summary zero again before a
    /// mark.
    #[inline(always)]
    fn settle(&self, leaf: &Leaf) {
        if self.state.load(Ordering::Acquire) != FRESH {
            self.settle_slow(leaf);
        }
    }

    #[cold]
    #[inline(never)]
    fn settle_slow(&self, leaf: &Leaf) {
        loop {
            match self
                .state
                .compare_exchange(STALE, CLEARING, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => {
                    // A stale leaf's count is at most LEAF_LIST_CAP (listed
                    // harvests only take such leaves); its entries name
                    // every set bit, so their words are all that is set.
                    let n = (self.count.load(Ordering::Relaxed) as usize).min(LEAF_LIST_CAP);
                    for e in &self.list[..n] {
                        let off = usize::from(e.load(Ordering::Relaxed));
                        leaf.words[(off >> 6) % LEAF_WORDS].store(0, Ordering::Relaxed);
                    }
                    for w in &leaf.summary {
                        w.store(0, Ordering::Relaxed);
                    }
                    self.count.store(0, Ordering::Relaxed);
                    self.state.store(FRESH, Ordering::Release);
                    return;
                }
                Err(FRESH) => return,
                // Another marker is clearing: at most LEAF_LIST_CAP + 8
                // stores.
                Err(_) => core::hint::spin_loop(),
            }
        }
    }

    /// Lists a newly set bit at leaf offset `off`, if there is room.
    #[inline(always)]
    fn note(&self, off: u16) {
        // Once overflowed, the list is not read: skip the read-modify-write.
        if self.count.load(Ordering::Relaxed) as usize <= LEAF_LIST_CAP {
            let k = self.count.fetch_add(1, Ordering::Relaxed) as usize;
            if let Some(slot) = self.list.get(k) {
                slot.store(off, Ordering::Relaxed);
            }
        }
    }
}

/// An interior node: 512 lazily installed children, their summary, and
/// per-child data (level 2 keeps its leaves' lists there; `()` above).
struct Node<C, X = ()> {
    summary: [AtomicU64; SUMMARY_WORDS],
    children: [AtomicPtr<C>; FANOUT],
    per_child: [X; FANOUT],
}

type L2 = Node<Leaf, LeafList>;
type L3 = Node<L2>;
type L4 = Node<L3>;

/// Marker for node types whose all-zero bit pattern is a valid value.
///
/// # Safety
/// Implementors must consist only of fields for which zero bytes are valid
/// (`AtomicU64` zero, `AtomicPtr` null).
unsafe trait ZeroInit: Sized {}

// SAFETY: a Leaf is only AtomicU64 arrays; zero is a valid AtomicU64.
unsafe impl ZeroInit for Leaf {}
// SAFETY: a LeafList is only AtomicU32/AtomicU16 fields; zero is a valid
// value of each (and means FRESH with an empty list).
unsafe impl ZeroInit for LeafList {}
// SAFETY: `()` has no bytes.
unsafe impl ZeroInit for () {}
// SAFETY: a Node is AtomicU64 and AtomicPtr arrays (zero/null are valid)
// and an array of `X`, which is ZeroInit.
unsafe impl<C, X: ZeroInit> ZeroInit for Node<C, X> {}

/// Allocates a zeroed node straight from the global allocator (no 4 KiB
/// temporary on the stack); `None` when the allocator is out of memory.
fn alloc_node<T: ZeroInit>() -> Option<Box<T>> {
    let layout = Layout::new::<T>();
    const { assert!(core::mem::size_of::<T>() != 0) };
    // SAFETY: the layout has a non-zero size (checked above).
    let raw = unsafe { alloc_zeroed(layout) }.cast::<T>();
    let raw = NonNull::new(raw)?;
    // SAFETY: `raw` was allocated by the global allocator with
    // `Layout::new::<T>()`, which is what `Box<T>` uses, and its zeroed
    // bytes are a valid `T` (`T: ZeroInit`).
    Some(unsafe { Box::from_raw(raw.as_ptr()) })
}

impl<C, X> Drop for Node<C, X> {
    fn drop(&mut self) {
        for slot in &mut self.children {
            let p = *slot.get_mut();
            if !p.is_null() {
                // SAFETY: non-null children come from `Box::into_raw` in
                // `child_or_install` and are owned by this node alone; we
                // have `&mut self`, so nobody else can reach them.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// Returns the child in `slot`, if one has been installed.
fn child<C>(slot: &AtomicPtr<C>) -> Option<&C> {
    let p = slot.load(Ordering::Acquire);
    // SAFETY: a non-null child pointer came from `Box::into_raw` and is
    // only freed through `&mut` of its parent (drop/reset), so it lives at
    // least as long as the shared borrow of the parent we were given; the
    // Acquire load pairs with the installing compare-exchange (Release) so
    // the zeroed contents are visible.
    unsafe { p.as_ref() }
}

/// Returns the child in `slot`, allocating and installing a zeroed one if
/// there is none. Concurrent installers race with compare-exchange; the
/// loser frees its allocation and uses the winner's node.
fn child_or_install<'a, C: ZeroInit>(
    slot: &'a AtomicPtr<C>,
    installed: &AtomicUsize,
) -> Result<&'a C, DirtyLogError> {
    if let Some(c) = child(slot) {
        return Ok(c);
    }
    let fresh = Box::into_raw(alloc_node::<C>().ok_or(DirtyLogError::NoMemory)?);
    match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            installed.fetch_add(1, Ordering::Relaxed);
            // SAFETY: we just published `fresh` (from Box::into_raw) in the
            // slot; it is freed only through `&mut` of the parent.
            Ok(unsafe { &*fresh })
        }
        Err(winner) => {
            // SAFETY: `fresh` was never published, so we still own it.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: the compare-exchange failed, so `winner` is the
            // non-null pointer another installer published (Box::into_raw),
            // which lives as long as the parent (see `child`).
            Ok(unsafe { &*winner })
        }
    }
}

/// Sets summary bit `i` unless it is already set (a plain load first keeps
/// the common case free of read-modify-writes on shared cache lines).
fn set_summary(summary: &[AtomicU64; SUMMARY_WORDS], i: usize) {
    let word = &summary[i / 64];
    let mask = 1u64 << (i % 64);
    if word.load(Ordering::SeqCst) & mask == 0 {
        word.fetch_or(mask, Ordering::SeqCst);
    }
}

/// How a walk reads each summary/bitmap word.
pub(crate) trait Take {
    fn take(word: &AtomicU64) -> u64;
}

/// Read only (PEEK).
pub(crate) struct Peek;
/// Read-and-clear with one atomic swap per word: safe while markers run.
pub(crate) struct Swap;
/// Read, then clear with a plain store. Only correct when no marker can
/// touch the tree (see `DirtyTree`, which guarantees that); it avoids a
/// locked instruction per dirty word.
pub(crate) struct Quiesced;

impl Take for Peek {
    #[inline(always)]
    fn take(word: &AtomicU64) -> u64 {
        word.load(Ordering::SeqCst)
    }
}

impl Take for Swap {
    #[inline(always)]
    fn take(word: &AtomicU64) -> u64 {
        word.swap(0, Ordering::SeqCst)
    }
}

impl Take for Quiesced {
    #[inline(always)]
    fn take(word: &AtomicU64) -> u64 {
        let v = word.load(Ordering::Relaxed);
        if v != 0 {
            word.store(0, Ordering::Relaxed);
        }
        v
    }
}

/// Calls `f` with the index of every set bit of a (taken) summary.
#[inline(always)]
fn for_each_set<T: Take>(summary: &[AtomicU64; SUMMARY_WORDS], mut f: impl FnMut(usize)) {
    for (k, word) in summary.iter().enumerate() {
        let mut bits = T::take(word);
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            f(k * 64 + b);
        }
    }
}

/// Visits one leaf's dirty words (ascending), taking each summary and
/// bitmap word with `T`; `base` is the leaf's first pfn.
#[inline(always)]
fn walk_words<T: Take>(leaf: &Leaf, base: u64, f: &mut impl FnMut(DirtyWord)) {
    for_each_set::<T>(&leaf.summary, |w| {
        let bits = T::take(&leaf.words[w]);
        if bits != 0 {
            f(DirtyWord {
                base: base | ((w as u64) << 6),
                bits,
            });
        }
    });
}

/// Counts of allocated nodes (to check laziness and memory use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Interior nodes below the root (levels 3 and 2).
    pub interior: usize,
    /// Leaf bitmap pages.
    pub leaves: usize,
}

/// One lazily allocated log-dirty tree with swap-based harvest.
///
/// `mark` is lock-free from any number of vCPUs. `clean` reads and clears
/// each dirty word with an atomic swap, so a mark that races with it lands
/// either in this harvest or in the next one. The counters are swapped to
/// zero separately from the bits: under such a race a mark may be counted
/// in the other harvest than its bit (totals over all harvests are exact).
/// [`super::DirtyTree`] wraps two of these to make each harvest exact and
/// cheaper.
pub struct LogTree {
    root: Box<L4>,
    max_pfn: u64,
    dirty: Padded<AtomicU64>,
    faults: Padded<AtomicU64>,
    interior: AtomicUsize,
    leaves: AtomicUsize,
}

/// Keeps hot counters on their own cache line.
#[repr(align(64))]
pub(crate) struct Padded<T>(pub(crate) T);

/// Tree coordinates of a pfn.
struct Coord {
    i4: usize,
    i3: usize,
    i2: usize,
    word: usize,
    mask: u64,
    /// `pfn & 0x7fff`.
    off: u16,
}

impl Coord {
    fn of(pfn: u64) -> Self {
        let level = |n: u32| ((pfn >> (LEAF_SHIFT + n * FANOUT_SHIFT)) & INDEX_MASK) as usize;
        Coord {
            i4: level(2),
            i3: level(1),
            i2: level(0),
            word: ((pfn >> 6) as usize) % LEAF_WORDS,
            mask: 1 << (pfn % 64),
            off: (pfn & ((1 << LEAF_SHIFT) - 1)) as u16,
        }
    }
}

fn base_pfn(i4: usize, i3: usize, i2: usize, word: usize) -> u64 {
    ((i4 as u64) << (LEAF_SHIFT + 2 * FANOUT_SHIFT))
        | ((i3 as u64) << (LEAF_SHIFT + FANOUT_SHIFT))
        | ((i2 as u64) << LEAF_SHIFT)
        | ((word as u64) << 6)
}

impl LogTree {
    /// An empty tree for pfns `0..=max_pfn`. Only the root (4 KiB) is
    /// allocated. Fails if `max_pfn` exceeds [`TREE_MAX_PFN`] or the root
    /// cannot be allocated.
    pub fn new(max_pfn: u64) -> Result<Self, DirtyLogError> {
        if max_pfn > TREE_MAX_PFN {
            return Err(DirtyLogError::MaxPfnTooLarge {
                max_pfn,
                limit: TREE_MAX_PFN,
            });
        }
        Ok(LogTree {
            root: alloc_node::<L4>().ok_or(DirtyLogError::NoMemory)?,
            max_pfn,
            dirty: Padded(AtomicU64::new(0)),
            faults: Padded(AtomicU64::new(0)),
            interior: AtomicUsize::new(0),
            leaves: AtomicUsize::new(0),
        })
    }

    /// Highest pfn accepted.
    pub fn max_pfn(&self) -> u64 {
        self.max_pfn
    }

    fn check(&self, pfn: u64) -> Result<(), DirtyLogError> {
        if pfn > self.max_pfn {
            return Err(DirtyLogError::PfnOutOfRange {
                pfn,
                max_pfn: self.max_pfn,
            });
        }
        Ok(())
    }

    /// Sets the bit without touching the counters; returns whether it was
    /// newly set. The caller has checked the range.
    pub(crate) fn set_bit(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        let c = Coord::of(pfn);
        let l3 = child_or_install(&self.root.children[c.i4], &self.interior)?;
        let l2 = child_or_install(&l3.children[c.i3], &self.interior)?;
        let leaf = child_or_install(&l2.children[c.i2], &self.leaves)?;
        let list = &l2.per_child[c.i2];
        list.settle(leaf);
        let old = leaf.words[c.word].fetch_or(c.mask, Ordering::SeqCst);
        if old & c.mask != 0 {
            return Ok(false);
        }
        list.note(c.off);
        if old == 0 {
            // First bit of this word since it was last harvested: publish
            // it bottom-up, so a harvest that sees a summary bit finds the
            // word below it already set.
            set_summary(&leaf.summary, c.word);
            set_summary(&l2.summary, c.i2);
            set_summary(&l3.summary, c.i3);
            set_summary(&self.root.summary, c.i4);
        }
        Ok(true)
    }

    pub(crate) fn add_counts(&self, faults: u64, dirty: u64) {
        self.faults.0.fetch_add(faults, Ordering::Relaxed);
        if dirty != 0 {
            self.dirty.0.fetch_add(dirty, Ordering::Relaxed);
        }
    }

    /// Marks `pfn` dirty; returns whether it was newly dirtied since the
    /// last clean. Counts a fault always and a dirty page when new.
    pub fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        self.check(pfn)?;
        let new = self.set_bit(pfn)?;
        self.add_counts(1, u64::from(new));
        Ok(new)
    }

    /// Whether `pfn` is currently dirty (no allocation, no change).
    pub fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        self.check(pfn)?;
        let c = Coord::of(pfn);
        let Some(l2) = child(&self.root.children[c.i4]).and_then(|l3| child(&l3.children[c.i3]))
        else {
            return Ok(false);
        };
        // A stale leaf's words still hold harvested bits: none is dirty.
        Ok(l2.per_child[c.i2].state.load(Ordering::SeqCst) == FRESH
            && child(&l2.children[c.i2])
                .is_some_and(|l| l.words[c.word].load(Ordering::SeqCst) & c.mask != 0))
    }

    /// Current counters, unchanged.
    pub fn stats(&self) -> DirtyStats {
        DirtyStats {
            dirty_count: self.dirty.0.load(Ordering::Relaxed),
            fault_count: self.faults.0.load(Ordering::Relaxed),
        }
    }

    /// Nodes allocated so far (root not counted).
    pub fn node_counts(&self) -> NodeCounts {
        NodeCounts {
            interior: self.interior.load(Ordering::Relaxed),
            leaves: self.leaves.load(Ordering::Relaxed),
        }
    }

    /// Visits the leaf positions below set summary bits in ascending pfn
    /// order, taking each interior summary word with `T`; `f` gets the
    /// level-2 node, the leaf's index in it and its first pfn.
    #[inline(always)]
    fn walk_leaves<T: Take>(&self, mut f: impl FnMut(&L2, usize, u64)) {
        let root = &*self.root;
        for_each_set::<T>(&root.summary, |i4| {
            let Some(l3) = child(&root.children[i4]) else {
                return;
            };
            for_each_set::<T>(&l3.summary, |i3| {
                let Some(l2) = child(&l3.children[i3]) else {
                    return;
                };
                for_each_set::<T>(&l2.summary, |i2| f(l2, i2, base_pfn(i4, i3, i2, 0)));
            });
        });
    }

    /// Visits the dirty words in ascending pfn order, following summaries.
    #[inline(always)]
    pub(crate) fn walk<T: Take>(&self, mut f: impl FnMut(DirtyWord)) {
        self.walk_leaves::<T>(|l2, i2, base| {
            if let Some(leaf) = child(&l2.children[i2]) {
                walk_words::<T>(leaf, base, &mut f);
            }
        });
    }

    /// PEEK: visits the dirty words (ascending) and returns the counters;
    /// changes nothing.
    pub fn peek_with(&self, f: impl FnMut(DirtyWord)) -> DirtyStats {
        self.walk::<Peek>(f);
        self.stats()
    }

    /// CLEAN: hands every dirty word to `f` (ascending) while clearing it
    /// atomically, then returns and zeroes the counters.
    pub fn clean_with(&self, mut f: impl FnMut(DirtyWord)) -> DirtyStats {
        self.walk_leaves::<Swap>(|l2, i2, base| {
            if let Some(leaf) = child(&l2.children[i2]) {
                walk_words::<Swap>(leaf, base, &mut f);
            }
            // Markers keep running: this leaf's list no longer matches its
            // bits, so it is not used until a quiesced harvest resets it.
            l2.per_child[i2].count.store(UNLISTED, Ordering::Relaxed);
        });
        DirtyStats {
            dirty_count: self.dirty.0.swap(0, Ordering::Relaxed),
            fault_count: self.faults.0.swap(0, Ordering::Relaxed),
        }
    }

    /// CLEAN without read-modify-writes. The caller guarantees that no
    /// `set_bit`/`add_counts` runs concurrently and that their effects are
    /// visible (acquire) before this is called.
    #[inline]
    pub(crate) fn clean_quiesced_with(&self, mut f: impl FnMut(DirtyWord)) -> DirtyStats {
        self.walk_leaves::<Quiesced>(|l2, i2, base| {
            if let Some(leaf) = child(&l2.children[i2]) {
                walk_words::<Quiesced>(leaf, base, &mut f);
            }
            l2.per_child[i2].count.store(0, Ordering::Relaxed);
        });
        self.take_counts()
    }

    /// CLEAN from the leaves' lists, under the same guarantee as
    /// [`LogTree::clean_quiesced_with`]. Leaves come in ascending order;
    /// a leaf whose list holds all its new bits gives one word per bit, in
    /// the order the bits were set, and is not touched: its bitmap words
    /// and summary are left for its next marker to clear (it turns stale). Other leaves are walked and cleared as in the
    /// ordered CLEAN. Every dirty pfn is reported exactly once.
    #[inline]
    pub(crate) fn clean_listed_with(&self, mut f: impl FnMut(DirtyWord)) -> DirtyStats {
        self.walk_leaves::<Quiesced>(|l2, i2, base| {
            let ll = &l2.per_child[i2];
            let n = ll.count.load(Ordering::Relaxed) as usize;
            if let Some(list) = ll.list.get(..n) {
                for e in list {
                    let off = u64::from(e.load(Ordering::Relaxed));
                    f(DirtyWord {
                        base: base + (off & !63),
                        bits: 1 << (off & 63),
                    });
                }
                ll.state.store(STALE, Ordering::Relaxed);
            } else {
                if let Some(leaf) = child(&l2.children[i2]) {
                    walk_words::<Quiesced>(leaf, base, &mut f);
                }
                ll.count.store(0, Ordering::Relaxed);
            }
        });
        self.take_counts()
    }

    /// Returns and zeroes the counters (quiesced: plain load and store).
    #[inline(always)]
    fn take_counts(&self) -> DirtyStats {
        DirtyStats {
            dirty_count: Quiesced::take(&self.dirty.0),
            fault_count: Quiesced::take(&self.faults.0),
        }
    }

    /// Frees every node below the root and zeroes the counters (log-dirty
    /// OFF). Needs `&mut self`, so no marker can hold a node.
    pub fn reset(&mut self) {
        for slot in &mut self.root.children {
            let p = core::mem::replace(slot.get_mut(), ptr::null_mut());
            if !p.is_null() {
                // SAFETY: non-null children come from Box::into_raw and are
                // owned by the root; `&mut self` excludes other users, and
                // the slot was nulled so the pointer cannot be freed twice.
                drop(unsafe { Box::from_raw(p) });
            }
        }
        for w in &mut self.root.summary {
            *w.get_mut() = 0;
        }
        *self.dirty.0.get_mut() = 0;
        *self.faults.0.get_mut() = 0;
        *self.interior.get_mut() = 0;
        *self.leaves.get_mut() = 0;
    }
}

impl DirtyLog for LogTree {
    fn max_pfn(&self) -> u64 {
        self.max_pfn
    }

    fn mark(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        LogTree::mark(self, pfn)
    }

    fn is_dirty(&self, pfn: u64) -> Result<bool, DirtyLogError> {
        LogTree::is_dirty(self, pfn)
    }

    fn stats(&self) -> DirtyStats {
        LogTree::stats(self)
    }

    fn peek_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        Ok(self.peek_with(f))
    }

    fn clean_words(&self, f: &mut dyn FnMut(DirtyWord)) -> Result<DirtyStats, DirtyLogError> {
        Ok(self.clean_with(f))
    }
}
