//! Write-protecting a 4 GiB guest's nested page table (the start of a
//! log-dirty epoch), in pages per second, against flat loops over the same
//! number of u64 entries measured in the same run.
//!
//! - `baseline_plain`: clear bit 1 of 2^20 `u64`s (the least possible work).
//! - `baseline_atomic`: the same with `fetch_and` on `AtomicU64`s (what a
//!   table shared with the hardware's A/D updates must use).
//! - `{ept,npt}_2m_split`: guest mapped with 2 MiB pages; the timed call
//!   splits all 2048 of them (allocating 2048 frames) and protects.
//! - `{ept,npt}_4k`: guest already mapped with 4 KiB pages (the per-epoch
//!   re-arm when every page was written); write access is restored,
//!   untimed, before each run.
//! - `{ept,npt}_4k_rearm_1pct`: the same when 1% of pages were written
//!   (restored through `restore_write`, untimed): the usual epoch.
//! - `{ept,npt}_4k_scan_1pct`: the A/D-scan alternative, harvesting 1%
//!   dirty pages (dirty bits set, untimed, through `mark_accessed`).
//!
//! Run: cargo bench -p doppel-core --bench npt -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use doppel_core::addr::{GuestPhysAddr, HostPhysAddr};
use doppel_core::frame::HeapFramePool;
use doppel_core::paging::{EptEntry, MapAttrs, NestedEntry, NestedPageTable, NptEntry};

const GUEST: u64 = 4 << 30;
const PAGES: u64 = GUEST >> 12;
/// Two tables' worth: 1 PML4 + 1 PDPT + 4 PD + 2048 PT each.
const POOL_FRAMES: usize = 2 * 2054 + 16;

fn mapped<E: NestedEntry>(pool: &HeapFramePool, large: bool) -> NestedPageTable<E, &HeapFramePool> {
    let mut t = NestedPageTable::new(pool).expect("root");
    let attrs = MapAttrs {
        large,
        ..MapAttrs::RAM
    };
    let _ = t
        .map(
            GuestPhysAddr::new(0),
            HostPhysAddr::new(1 << 32),
            GUEST,
            attrs,
        )
        .expect("map 4 GiB");
    t
}

fn bench_format<E: NestedEntry>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    let pool = HeapFramePool::new(POOL_FRAMES, HostPhysAddr::new(0x100_0000_0000));
    c.bench_function(format!("{}_2m_split", E::FORMAT), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut t = mapped::<E>(&pool, true);
                let start = Instant::now();
                let w = black_box(t.enable_write_protect().expect("frames"));
                total += start.elapsed();
                assert_eq!(w.changed, PAGES);
                drop(t);
            }
            total
        })
    });
    let mut t = mapped::<E>(&pool, false);
    c.bench_function(format!("{}_4k", E::FORMAT), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = t.disable_write_protect();
                let start = Instant::now();
                let w = black_box(t.enable_write_protect().expect("no split"));
                total += start.elapsed();
                assert_eq!(w.changed, PAGES);
            }
            total
        })
    });
    // The per-epoch re-arm when 1% of the pages were written in the epoch.
    let _ = t.enable_write_protect().expect("no split");
    c.bench_function(format!("{}_4k_rearm_1pct", E::FORMAT), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for gfn in (0..PAGES).step_by(100) {
                    let _ = t
                        .restore_write(GuestPhysAddr::new(gfn << 12))
                        .expect("mapped");
                }
                let start = Instant::now();
                let w = black_box(t.enable_write_protect().expect("no split"));
                total += start.elapsed();
                assert_eq!(w.changed, PAGES.div_ceil(100));
            }
            total
        })
    });
    // The A/D-scan alternative: harvest and clear 1% dirty pages.
    let _ = t.disable_write_protect();
    c.bench_function(format!("{}_4k_scan_1pct", E::FORMAT), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for gfn in (0..PAGES).step_by(100) {
                    t.mark_accessed(GuestPhysAddr::new(gfn << 12), true)
                        .expect("mapped");
                }
                let mut n = 0u64;
                let start = Instant::now();
                let w = black_box(t.scan_and_clear_dirty(false, |_| n += 1));
                total += start.elapsed();
                assert_eq!((w.changed, n), (PAGES.div_ceil(100), PAGES.div_ceil(100)));
            }
            total
        })
    });
}

fn write_protect_4g(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_protect_4g");
    g.throughput(Throughput::Elements(PAGES));
    g.sample_size(10);

    let mut plain: Vec<u64> = vec![0; PAGES as usize];
    g.bench_function("baseline_plain", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                plain.iter_mut().for_each(|e| *e = 0x1234_5007);
                let start = Instant::now();
                for e in black_box(&mut plain).iter_mut() {
                    *e &= !2;
                }
                total += start.elapsed();
            }
            total
        })
    });
    let atomic: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    g.bench_function("baseline_atomic", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                atomic
                    .iter()
                    .for_each(|e| e.store(0x1234_5007, Ordering::Relaxed));
                let start = Instant::now();
                for e in black_box(&atomic) {
                    e.fetch_and(!2, Ordering::AcqRel);
                }
                total += start.elapsed();
            }
            total
        })
    });
    bench_format::<EptEntry>(&mut g);
    bench_format::<NptEntry>(&mut g);
    g.finish();
}

criterion_group!(benches, write_protect_4g);
criterion_main!(benches);
