//! Nested page tables against a model, for both formats.
//!
//! The model is a map gfn -> (hfn, writable, dirty, ...) plus the set of
//! tables that exist, so it predicts not only translations but also page
//! sizes, frame counts, how many frames each operation needs (hence whether
//! an injected allocation failure must make it fail), the flushes returned
//! and the pages an A/D scan reports. After every operation the whole table
//! is compared with the model, and the pool's frame count with the model's.

use std::collections::{BTreeMap, BTreeSet};

use doppel_core::addr::{Gfn, GuestPhysAddr, HostPhysAddr};
use doppel_core::frame::{FailMode, HeapFramePool};
use doppel_core::paging::{
    EptEntry, Error, Flush, MapAttrs, MemType, NestedEntry, NestedPageTable, NptEntry, PageSize,
    Perms, RestoreWrite, Translation,
};
use proptest::prelude::*;

const POOL_BASE: u64 = 0x80_0000_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Page {
    hfn: u64,
    soft_w: bool,
    hw_w: bool,
    accessed: bool,
    dirty: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    pages: BTreeMap<u64, Page>,
    /// 2 MiB regions (gfn >> 9) mapped by one 2 MiB leaf.
    large: BTreeSet<u64>,
    /// Tables that exist, by the index of the region they cover.
    pt: BTreeSet<u64>, // gfn >> 9
    pd: BTreeSet<u64>,   // gfn >> 18
    pdpt: BTreeSet<u64>, // gfn >> 27
    wp: bool,
    /// 2 MiB leaves split so far.
    splits: u64,
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        gfn: u64,
        hfn: u64,
        pages: u64,
        write: bool,
        large: bool,
    },
    Unmap {
        gfn: u64,
        pages: u64,
    },
    EnableWp,
    DisableWp,
    Restore {
        gfn: u64,
        off: u64,
    },
    Translate {
        gfn: u64,
        off: u64,
    },
    Mark {
        gfn: u64,
        write: bool,
    },
    Scan {
        clear_accessed: bool,
    },
}

impl Model {
    fn frames(&self) -> usize {
        1 + self.pdpt.len() + self.pd.len() + self.pt.len()
    }

    /// Frames needed to own tables down to the PD of region `r`.
    fn new_upper(&self, r: u64, pd: &mut BTreeSet<u64>, pdpt: &mut BTreeSet<u64>) -> u64 {
        u64::from(!self.pd.contains(&(r >> 9)) && pd.insert(r >> 9))
            + u64::from(!self.pdpt.contains(&(r >> 18)) && pdpt.insert(r >> 18))
    }

    fn regions(gfn: u64, pages: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let end = gfn + pages;
        (gfn >> 9..=(end - 1) >> 9).map(move |r| (r, (r << 9).max(gfn), ((r + 1) << 9).min(end)))
    }

    /// Returns (frames needed, result) and applies if `budget` allows.
    fn map(
        &mut self,
        gfn: u64,
        hfn: u64,
        pages: u64,
        write: bool,
        large: bool,
        budget: u64,
    ) -> Result<Flush, Error> {
        if let Some(g) = (gfn..gfn + pages).find(|g| self.pages.contains_key(g)) {
            return Err(Error::Overlap(GuestPhysAddr::new(g << 12)));
        }
        let (mut pd, mut pdpt) = (BTreeSet::new(), BTreeSet::new());
        let (mut pt, mut big) = (BTreeSet::new(), BTreeSet::new());
        let mut need = 0;
        for (r, s, t) in Self::regions(gfn, pages) {
            need += self.new_upper(r, &mut pd, &mut pdpt);
            let hs = hfn + (s - gfn);
            if large
                && !self.wp
                && t - s == 512
                && s.is_multiple_of(512)
                && hs.is_multiple_of(512)
                && !self.pt.contains(&r)
            {
                big.insert(r);
            } else if !self.pt.contains(&r) && pt.insert(r) {
                need += 1;
            }
        }
        if need > budget {
            return Err(Error::AllocFailed);
        }
        self.pd.extend(pd);
        self.pdpt.extend(pdpt);
        self.pt.extend(pt);
        self.large.extend(big);
        for g in gfn..gfn + pages {
            let p = Page {
                hfn: hfn + (g - gfn),
                soft_w: write,
                hw_w: write && !self.wp,
                accessed: false,
                dirty: false,
            };
            self.pages.insert(g, p);
        }
        Ok(Flush::None)
    }

    fn unmap(&mut self, gfn: u64, pages: u64, budget: u64) -> Result<Flush, Error> {
        let partial: Vec<u64> = Self::regions(gfn, pages)
            .filter(|&(r, s, t)| self.large.contains(&r) && t - s < 512)
            .map(|(r, _, _)| r)
            .collect();
        if partial.len() as u64 > budget {
            return Err(Error::AllocFailed);
        }
        let mut flush = Flush::None;
        for (r, s, t) in Self::regions(gfn, pages) {
            if self.large.contains(&r) {
                self.large.remove(&r);
                if t - s == 512 {
                    flush = Flush::All;
                } else {
                    self.pt.insert(r);
                    self.splits += 1;
                }
            }
        }
        for g in gfn..gfn + pages {
            if self.pages.remove(&g).is_some() {
                flush = flush.merge(Flush::Page(GuestPhysAddr::new(g << 12)));
            }
        }
        Ok(flush)
    }

    fn leaf_key(&self, g: u64) -> (bool, u64) {
        if self.large.contains(&(g >> 9)) {
            (true, g >> 9)
        } else {
            (false, g)
        }
    }

    fn leaves(&self) -> u64 {
        self.pages
            .keys()
            .map(|&g| self.leaf_key(g))
            .collect::<BTreeSet<_>>()
            .len() as u64
    }
}

fn all_flush(changed: u64) -> Flush {
    if changed > 0 {
        Flush::All
    } else {
        Flush::None
    }
}

/// Every 4 KiB page of the table, expanded, in model form.
fn snapshot<E: NestedEntry>(
    t: &NestedPageTable<E, &HeapFramePool>,
) -> (BTreeMap<u64, Page>, BTreeSet<u64>) {
    let mut pages = BTreeMap::new();
    let mut large = BTreeSet::new();
    t.for_each_leaf(|gpa, tr: Translation| {
        let g0 = gpa.as_u64() >> 12;
        let n = match tr.size {
            PageSize::Size4K => 1,
            PageSize::Size2M => {
                large.insert(g0 >> 9);
                512
            }
        };
        assert!(tr.perms.contains(Perms::READ | Perms::EXEC));
        assert_eq!(tr.mem, MemType::WriteBack);
        for k in 0..n {
            let p = Page {
                hfn: (tr.hpa.as_u64() >> 12) + k,
                soft_w: tr.perms.contains(Perms::WRITE) || tr.write_protected,
                hw_w: tr.perms.contains(Perms::WRITE),
                accessed: tr.accessed,
                dirty: tr.dirty,
            };
            assert!(pages.insert(g0 + k, p).is_none(), "leaves overlap");
        }
    });
    (pages, large)
}

fn ram(write: bool, large: bool) -> MapAttrs {
    let perms = if write {
        Perms::all()
    } else {
        Perms::READ | Perms::EXEC
    };
    MapAttrs {
        perms,
        mem: MemType::WriteBack,
        large,
    }
}

fn run<E: NestedEntry>(ops: &[(Op, Option<u64>)]) {
    let pool = HeapFramePool::new(512, HostPhysAddr::new(POOL_BASE));
    {
        let mut t = NestedPageTable::<E, _>::new(&pool).unwrap();
        let mut m = Model::default();
        for (op, fail) in ops {
            let budget = fail.unwrap_or(u64::MAX);
            if let Some(k) = fail {
                pool.set_fail(FailMode::After(*k as usize));
            }
            let before = m.clone();
            let snap_before = snapshot(&t);
            let frames_before = pool.in_use();
            match *op {
                Op::Map {
                    gfn,
                    hfn,
                    pages,
                    write,
                    large,
                } => {
                    let want = m.map(gfn, hfn, pages, write, large, budget);
                    let got = t.map(
                        GuestPhysAddr::new(gfn << 12),
                        HostPhysAddr::new(hfn << 12),
                        pages << 12,
                        ram(write, large),
                    );
                    assert_eq!(got, want, "{op:?}");
                }
                Op::Unmap { gfn, pages } => {
                    let want = m.unmap(gfn, pages, budget);
                    assert_eq!(
                        t.unmap(GuestPhysAddr::new(gfn << 12), pages << 12),
                        want,
                        "{op:?}"
                    );
                }
                Op::EnableWp => {
                    let got = t.enable_write_protect();
                    if m.large.len() as u64 > budget {
                        assert_eq!(got, Err(Error::AllocFailed));
                    } else {
                        let changed = m.pages.values().filter(|p| p.hw_w).count() as u64;
                        let big = std::mem::take(&mut m.large);
                        m.splits += big.len() as u64;
                        m.pt.extend(big);
                        m.wp = true;
                        m.pages.values_mut().for_each(|p| p.hw_w = false);
                        let w = got.unwrap();
                        assert_eq!((w.flush, w.changed), (all_flush(changed), changed));
                        assert_eq!(
                            (w.leaves, w.pages),
                            (m.pages.len() as u64, m.pages.len() as u64)
                        );
                        assert!(all_read_only(&t));
                    }
                }
                Op::DisableWp => {
                    let leaves = m.leaves();
                    let changed = m.pages.values().filter(|p| p.soft_w && !p.hw_w).count() as u64;
                    m.wp = false;
                    m.pages.values_mut().for_each(|p| p.hw_w = p.soft_w);
                    let w = t.disable_write_protect();
                    assert_eq!(
                        (w.flush, w.changed, w.leaves),
                        (all_flush(changed), changed, leaves)
                    );
                }
                Op::Restore { gfn, off } => {
                    let page = GuestPhysAddr::new(gfn << 12);
                    let want = match m.pages.get_mut(&gfn) {
                        None => Err(Error::NotMapped(page)),
                        Some(p) if !p.soft_w => Err(Error::WriteNotAllowed(page)),
                        Some(p) if p.hw_w => Ok(RestoreWrite::Spurious),
                        Some(p) => {
                            p.hw_w = true;
                            Ok(RestoreWrite::Restored(Flush::Page(page)))
                        }
                    };
                    let snap = snapshot(&t).0;
                    assert_eq!(t.restore_write(GuestPhysAddr::new((gfn << 12) | off)), want);
                    // Exactly that page changed, if any did.
                    let after = snapshot(&t).0;
                    let diff: Vec<u64> = after
                        .iter()
                        .filter(|(g, p)| snap.get(g) != Some(p))
                        .map(|(g, _)| *g)
                        .collect();
                    let expect: Vec<u64> = if matches!(want, Ok(RestoreWrite::Restored(_))) {
                        vec![gfn]
                    } else {
                        vec![]
                    };
                    assert_eq!(diff, expect);
                }
                Op::Translate { gfn, off } => {
                    let got = t.translate(GuestPhysAddr::new((gfn << 12) | off));
                    match m.pages.get(&gfn) {
                        None => assert_eq!(got, None),
                        Some(p) => {
                            let tr = got.expect("mapped");
                            assert_eq!(tr.hpa, HostPhysAddr::new((p.hfn << 12) | off));
                            assert_eq!(tr.perms.contains(Perms::WRITE), p.hw_w);
                            let size = if m.large.contains(&(gfn >> 9)) {
                                PageSize::Size2M
                            } else {
                                PageSize::Size4K
                            };
                            assert_eq!(tr.size, size);
                        }
                    }
                }
                Op::Mark { gfn, write } => {
                    let got = t.mark_accessed(GuestPhysAddr::new(gfn << 12), write);
                    if m.pages.contains_key(&gfn) {
                        got.unwrap();
                        let gs: Vec<u64> = if m.large.contains(&(gfn >> 9)) {
                            ((gfn >> 9) << 9..((gfn >> 9) + 1) << 9).collect()
                        } else {
                            vec![gfn]
                        };
                        for g in gs {
                            let p = m.pages.get_mut(&g).unwrap();
                            p.accessed = true;
                            p.dirty |= write;
                        }
                    } else {
                        assert_eq!(got, Err(Error::NotMapped(GuestPhysAddr::new(gfn << 12))));
                    }
                }
                Op::Scan { clear_accessed } => {
                    let want: Vec<Gfn> = m
                        .pages
                        .iter()
                        .filter(|(_, p)| p.dirty)
                        .map(|(g, _)| Gfn::new(*g))
                        .collect();
                    let changed = m
                        .pages
                        .iter()
                        .filter(|(_, p)| p.dirty || (clear_accessed && p.accessed))
                        .map(|(g, _)| m.leaf_key(*g))
                        .collect::<BTreeSet<_>>()
                        .len() as u64;
                    let leaves = m.leaves();
                    for p in m.pages.values_mut() {
                        p.dirty = false;
                        p.accessed &= !clear_accessed;
                    }
                    let mut got = Vec::new();
                    let w = t.scan_and_clear_dirty(clear_accessed, |g| got.push(g));
                    assert_eq!(got, want);
                    assert_eq!(
                        (w.flush, w.changed, w.leaves, w.pages),
                        (all_flush(changed), changed, leaves, m.pages.len() as u64)
                    );
                }
            }
            pool.set_fail(FailMode::Never);
            if m == before {
                // Refused operations (overlap, injected allocation failure,
                // not mapped) and no-ops leave the table exactly as it was.
                assert_eq!(snapshot(&t), snap_before, "{op:?} changed the table");
                assert_eq!(pool.in_use(), frames_before);
            }
            let (pages, large) = snapshot(&t);
            assert_eq!(pages, m.pages, "after {op:?}");
            assert_eq!(large, m.large, "after {op:?}");
            assert_eq!(pool.in_use(), m.frames(), "frames after {op:?}");
            assert_eq!(t.stats().tables, m.frames() as u64);
            assert_eq!(t.stats().splits, m.splits);
            assert_eq!(t.is_write_protecting(), m.wp);
        }
    }
    assert_eq!(pool.in_use(), 0, "dropping the table frees every frame");
    assert_eq!(pool.bad_frees(), 0);
}

/// Every leaf is hardware read-only.
fn all_read_only<E: NestedEntry>(t: &NestedPageTable<E, &HeapFramePool>) -> bool {
    let mut ok = true;
    t.for_each_leaf(|_, tr| ok &= !tr.perms.contains(Perms::WRITE));
    ok
}

/// Guest frames near the boundaries of PTs, PDs (1 GiB) and PDPTs (512 GiB),
/// so ranges share and cross tables.
fn gfn() -> impl Strategy<Value = u64> {
    let base = prop_oneof![Just(0u64), Just((1 << 18) - 1024), Just((1 << 27) - 1024)];
    (base, 0u64..2048, any::<bool>())
        .prop_map(|(b, o, align)| if align { (b + o) & !511 } else { b + o })
}

fn op() -> impl Strategy<Value = Op> {
    let hfn = (0u64..4096, any::<bool>()).prop_map(|(h, align)| if align { h << 9 } else { h + 7 });
    prop_oneof![
        4 => (gfn(), hfn, 1u64..1300, any::<bool>(), any::<bool>())
            .prop_map(|(gfn, hfn, pages, write, large)| Op::Map { gfn, hfn, pages, write, large }),
        2 => (gfn(), 1u64..700).prop_map(|(gfn, pages)| Op::Unmap { gfn, pages }),
        1 => Just(Op::EnableWp),
        1 => Just(Op::DisableWp),
        3 => (gfn(), 0u64..4096).prop_map(|(gfn, off)| Op::Restore { gfn, off }),
        2 => (gfn(), 0u64..4096).prop_map(|(gfn, off)| Op::Translate { gfn, off }),
        3 => (gfn(), any::<bool>()).prop_map(|(gfn, write)| Op::Mark { gfn, write }),
        1 => any::<bool>().prop_map(|clear_accessed| Op::Scan { clear_accessed }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<(Op, Option<u64>)>> {
    prop::collection::vec((op(), prop::option::weighted(0.2, 0u64..4)), 1..40)
}

proptest! {
    // 200 sequences per format in release (`cargo xtask test`); fewer in
    // unoptimised builds, where each takes ~10x longer.
    #![proptest_config(ProptestConfig::with_cases(if cfg!(debug_assertions) { 40 } else { 200 }))]

    #[test]
    fn ept_matches_model(ops in ops()) {
        run::<EptEntry>(&ops);
    }

    #[test]
    fn npt_matches_model(ops in ops()) {
        run::<NptEntry>(&ops);
    }
}

/// Cases that random sequences reach rarely, spelled out.
#[test]
fn write_protect_lifecycle_on_2m_mapping() {
    use Op::*;
    let ops = [
        (
            Map {
                gfn: 0,
                hfn: 512,
                pages: 1024,
                write: true,
                large: true,
            },
            None,
        ),
        (
            Map {
                gfn: 1024,
                hfn: 3,
                pages: 10,
                write: false,
                large: true,
            },
            None,
        ),
        (
            Mark {
                gfn: 5,
                write: true,
            },
            None,
        ),
        (EnableWp, Some(1)), // two 2 MiB leaves need two frames: refused
        (EnableWp, None),
        (Restore { gfn: 700, off: 8 }, None),
        (Restore { gfn: 700, off: 0 }, None),
        (Restore { gfn: 1024, off: 0 }, None),
        (Restore { gfn: 5000, off: 0 }, None),
        (
            Map {
                gfn: 2048,
                hfn: 2048,
                pages: 512,
                write: true,
                large: true,
            },
            None,
        ),
        (Unmap { gfn: 100, pages: 1 }, None),
        (
            Scan {
                clear_accessed: true,
            },
            None,
        ),
        (DisableWp, None),
        (
            Map {
                gfn: 4096,
                hfn: 4096,
                pages: 512,
                write: true,
                large: true,
            },
            None,
        ),
        (
            Mark {
                gfn: 4100,
                write: true,
            },
            None,
        ),
        (
            Map {
                gfn: 4608,
                hfn: 8192,
                pages: 512,
                write: true,
                large: true,
            },
            None,
        ),
        (
            Unmap {
                gfn: 4096 + 511,
                pages: 2,
            },
            Some(0),
        ), // split needed: refused
        (
            Unmap {
                gfn: 4096 + 511,
                pages: 2,
            },
            Some(1),
        ), // two splits: refused
        (
            Unmap {
                gfn: 4096 + 511,
                pages: 2,
            },
            Some(2),
        ),
        (
            Map {
                gfn: 1 << 18,
                hfn: 0,
                pages: 1024,
                write: true,
                large: false,
            },
            Some(3),
        ), // PD + 2 PTs = 3: allowed
        (
            Map {
                gfn: 1 << 27,
                hfn: 0,
                pages: 1024,
                write: true,
                large: false,
            },
            Some(3),
        ), // PDPT + PD + 2 PTs: refused
        (
            Scan {
                clear_accessed: false,
            },
            None,
        ),
    ];
    run::<EptEntry>(&ops);
    run::<NptEntry>(&ops);
}

#[test]
fn bad_input_is_refused_without_change() {
    let pool = HeapFramePool::new(16, HostPhysAddr::new(POOL_BASE));
    let mut t = NestedPageTable::<EptEntry, _>::new(&pool).unwrap();
    let g = GuestPhysAddr::new;
    let h = HostPhysAddr::new;
    let rw = MapAttrs::RAM;
    assert_eq!(
        t.map(g(0x1001), h(0), 0x1000, rw),
        Err(Error::MisalignedGpa(g(0x1001)))
    );
    assert_eq!(
        t.map(g(0), h(0x10), 0x1000, rw),
        Err(Error::MisalignedHpa(h(0x10)))
    );
    assert_eq!(t.map(g(0), h(0), 0, rw), Err(Error::BadLength(0)));
    assert_eq!(t.map(g(0), h(0), 0x1800, rw), Err(Error::BadLength(0x1800)));
    assert_eq!(
        t.map(g((1 << 48) - 0x1000), h(0), 0x2000, rw),
        Err(Error::GpaOutOfRange(g((1 << 48) - 0x1000)))
    );
    assert_eq!(
        t.map(g(!0xfff), h(0), 0x2000, rw),
        Err(Error::GpaOutOfRange(g(!0xfff)))
    );
    assert_eq!(
        t.map(g(0), h((1 << 52) - 0x1000), 0x2000, rw),
        Err(Error::HpaOutOfRange(h((1 << 52) - 0x1000)))
    );
    let wo = MapAttrs {
        perms: Perms::WRITE,
        ..rw
    };
    assert_eq!(
        t.map(g(0), h(0), 0x1000, wo),
        Err(Error::BadPerms(Perms::WRITE))
    );
    assert_eq!(t.unmap(g(0x10), 0x1000), Err(Error::MisalignedGpa(g(0x10))));
    assert_eq!(t.unmap(g(0), 0), Err(Error::BadLength(0)));
    assert_eq!(
        t.restore_write(g(u64::MAX)),
        Err(Error::NotMapped(g(!0xfff)))
    );
    assert_eq!(t.translate(g(u64::MAX)), None);
    assert_eq!(
        t.mark_accessed(g(1 << 48), true),
        Err(Error::NotMapped(g(1 << 48)))
    );
    assert_eq!(pool.in_use(), 1, "only the root");
    let mut n = 0;
    t.for_each_leaf(|_, _| n += 1);
    assert_eq!(n, 0);
}

#[test]
fn root_pointers() {
    let pool = HeapFramePool::new(4, HostPhysAddr::new(0x4000_0000));
    let e = NestedPageTable::<EptEntry, _>::new(&pool).unwrap();
    assert_eq!(e.root(), HostPhysAddr::new(0x4000_0000));
    assert_eq!(e.root_pointer(true), 0x4000_005e);
    let n = NestedPageTable::<NptEntry, _>::new(&pool).unwrap();
    assert_eq!(n.root_pointer(true), 0x4000_1000);
    drop((e, n));
    assert_eq!(pool.in_use(), 0);
    pool.set_fail(FailMode::After(0));
    assert!(matches!(
        NestedPageTable::<NptEntry, _>::new(&pool),
        Err(Error::AllocFailed)
    ));
}
