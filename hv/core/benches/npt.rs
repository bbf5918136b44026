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
//! After criterion's figures it prints, per format, the write-protect
//! (2 MiB split, 4 KiB) against `baseline_plain` interleaved
//! (doppel-benchkit), and its rate in pages per second.
//!
//! Run: cargo bench -p doppel-core --bench npt -- --warm-up-time 1 --measurement-time 3
//! (ratios alone: `-- ratio`)

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use doppel_benchkit::{report, Goal};
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

/// One timed write-protect of a freshly mapped 2 MiB-page table (splits
/// every page).
fn time_split<E: NestedEntry>(pool: &HeapFramePool) -> Duration {
    let mut t = mapped::<E>(pool, true);
    let start = Instant::now();
    let w = black_box(t.enable_write_protect().expect("frames"));
    let d = start.elapsed();
    assert_eq!(w.changed, PAGES);
    d
}

/// One timed write-protect of a 4 KiB table whose every page is writable.
fn time_4k<E: NestedEntry>(t: &mut NestedPageTable<E, &HeapFramePool>) -> Duration {
    let _ = t.disable_write_protect();
    let start = Instant::now();
    let w = black_box(t.enable_write_protect().expect("no split"));
    let d = start.elapsed();
    assert_eq!(w.changed, PAGES);
    d
}

/// The per-epoch re-arm when 1% of the pages were written in the epoch
/// (the table is write-protected on entry and on return).
fn time_rearm<E: NestedEntry>(t: &mut NestedPageTable<E, &HeapFramePool>) -> Duration {
    for gfn in (0..PAGES).step_by(100) {
        let _ = t
            .restore_write(GuestPhysAddr::new(gfn << 12))
            .expect("mapped");
    }
    let start = Instant::now();
    let w = black_box(t.enable_write_protect().expect("no split"));
    let d = start.elapsed();
    assert_eq!(w.changed, PAGES.div_ceil(100));
    d
}

/// The A/D-scan alternative: harvest and clear 1% dirty pages.
fn time_scan<E: NestedEntry>(t: &mut NestedPageTable<E, &HeapFramePool>) -> Duration {
    for gfn in (0..PAGES).step_by(100) {
        t.mark_accessed(GuestPhysAddr::new(gfn << 12), true)
            .expect("mapped");
    }
    let mut n = 0u64;
    let start = Instant::now();
    let w = black_box(t.scan_and_clear_dirty(false, |_| n += 1));
    let d = start.elapsed();
    assert_eq!((w.changed, n), (PAGES.div_ceil(100), PAGES.div_ceil(100)));
    d
}

/// Baseline: clear bit 1 of every entry of a plain array.
fn time_plain(plain: &mut [u64]) -> Duration {
    plain.iter_mut().for_each(|e| *e = 0x1234_5007);
    let start = Instant::now();
    for e in black_box(&mut *plain).iter_mut() {
        *e &= !2;
    }
    start.elapsed()
}

/// Baseline with atomics: `fetch_and` on every entry.
fn time_atomic(atomic: &[AtomicU64]) -> Duration {
    atomic
        .iter()
        .for_each(|e| e.store(0x1234_5007, Ordering::Relaxed));
    let start = Instant::now();
    for e in black_box(atomic) {
        e.fetch_and(!2, Ordering::AcqRel);
    }
    start.elapsed()
}

fn sum(n: u64, mut f: impl FnMut() -> Duration) -> Duration {
    (0..n).map(|_| f()).sum()
}

fn bench_format<E: NestedEntry>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    let pool = HeapFramePool::new(POOL_FRAMES, HostPhysAddr::new(0x100_0000_0000));
    c.bench_function(format!("{}_2m_split", E::FORMAT), |b| {
        b.iter_custom(|n| sum(n, || time_split::<E>(&pool)))
    });
    let mut t = mapped::<E>(&pool, false);
    c.bench_function(format!("{}_4k", E::FORMAT), |b| {
        b.iter_custom(|n| sum(n, || time_4k(&mut t)))
    });
    let _ = t.enable_write_protect().expect("no split");
    c.bench_function(format!("{}_4k_rearm_1pct", E::FORMAT), |b| {
        b.iter_custom(|n| sum(n, || time_rearm(&mut t)))
    });
    let _ = t.disable_write_protect();
    c.bench_function(format!("{}_4k_scan_1pct", E::FORMAT), |b| {
        b.iter_custom(|n| sum(n, || time_scan(&mut t)))
    });
}

fn write_protect_4g(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_protect_4g");
    g.throughput(Throughput::Elements(PAGES));
    g.sample_size(10);

    let mut plain: Vec<u64> = vec![0; PAGES as usize];
    g.bench_function("baseline_plain", |b| {
        b.iter_custom(|n| sum(n, || time_plain(&mut plain)))
    });
    let atomic: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    g.bench_function("baseline_atomic", |b| {
        b.iter_custom(|n| sum(n, || time_atomic(&atomic)))
    });
    bench_format::<EptEntry>(&mut g);
    bench_format::<NptEntry>(&mut g);
    g.finish();
}

/// Each format's write-protect against the plain loop, interleaved
/// (doppel-benchkit), with its rate in pages per second.
fn ratios_for<E: NestedEntry>(plain: &mut [u64]) {
    let pool = HeapFramePool::new(POOL_FRAMES, HostPhysAddr::new(0x100_0000_0000));
    let mut t = mapped::<E>(&pool, false);
    let f = E::FORMAT;
    for what in ["2m_split", "4k", "4k_rearm_1pct"] {
        // `4k_rearm_1pct` starts from a write-protected table (`4k` leaves
        // it so, but a filter may have skipped `4k`); untimed.
        if what == "4k_rearm_1pct" {
            let _ = t.enable_write_protect().expect("no split");
        }
        let mut run = || match what {
            "2m_split" => time_split::<E>(&pool),
            "4k" => time_4k(&mut t),
            _ => time_rearm(&mut t),
        };
        let name = format!("write_protect_4g/{f}_{what}");
        if let Some(s) = report(
            &name,
            (&format!("{f}_{what}"), "baseline_plain"),
            Goal::Ratio(None),
            (10, 3),
            &mut run,
            || time_plain(plain),
        ) {
            println!(
                "rate {name}: {:.0} Mpages/s (baseline_plain {:.0} Mpages/s)",
                PAGES as f64 / s.case_median.as_secs_f64() / 1e6,
                PAGES as f64 / s.baseline_median.as_secs_f64() / 1e6
            );
        }
    }
}

fn ratios() {
    let mut plain: Vec<u64> = vec![0; PAGES as usize];
    ratios_for::<EptEntry>(&mut plain);
    ratios_for::<NptEntry>(&mut plain);
}

criterion_group!(benches, write_protect_4g);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    ratios();
}
