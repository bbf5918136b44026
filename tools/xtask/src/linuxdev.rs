//! Issue 20 end to end: the Linux guest under Doppel with a virtio-mmio NIC
//! and disk served by `doppel run`, Redis serving a host client.
//!
//! `linux-net-qemu-svm` boots the hypervisor under QEMU (`-cpu EPYC`,
//! `-icount`) with `mode=linux devices=net,blk`, Debian's kernel and the
//! network initramfs (tools/xtask/src/linuxnet.rs), the machine's RAM in a
//! host file. `doppel run` maps that file and serves the devices from the
//! host-side network namespace, where its TAP is bridged to the client's
//! namespace (tools/xtask/src/workload.rs). From the client namespace
//! `redis-benchmark` runs against the guest beside the INCR checker, then
//! SHUTDOWN ends Redis and the guest powers off. The step prints two
//! acceptance lines:
//! - `linux-net: vendor=amd benchmark_requests=N incr_acked=M incr_gap=0
//!   result=pass` (every benchmark test reported, INCRs acknowledged in
//!   order on one connection, a clean poweroff);
//! - `linux-disk: vendor=amd fsck=clean aof_incr=K result=pass` (the disk
//!   checked after poweroff: `e2fsck -fn` clean, the AOF holding every
//!   acknowledged INCR).
//!
//! Bochs has no such step: its RAM cannot be shared with a host process,
//! so no device model can serve a Bochs machine (docs/DEVICES.md).

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::ctx::Ctx;
use crate::emu::{self, RunSpec};
use crate::image::Module;
use crate::linuxboot::{self, Report, HOST_MEM_MIB, QEMU_TIMEOUT, QEMU_TSC_KHZ};
use crate::linuxnet;
use crate::logline::num;
use crate::proc::{tail, Proc};
use crate::shm::shm_file;
use crate::workload::{self, ClientOptions, NetGuard};
use crate::Emulator;

/// The step's name and its run directory's.
const STEP: &str = "linux-net-qemu-svm";

/// What the client asks of Redis under Doppel: fewer requests than in
/// plain QEMU (every packet costs the guest exits and device-model round
/// trips), more patience.
fn client_options() -> ClientOptions {
    ClientOptions {
        requests: 500,
        clients: 4,
        tests: "set,get,incr",
        ready_timeout: Duration::from_secs(600),
        benchmark_timeout: Duration::from_secs(600),
    }
}

/// The hypervisor's `devices:` line: (sync, buffered, irqs, refused).
fn device_counts(hv: &str) -> Option<(u64, u64, u64, u64)> {
    let l = hv.lines().rev().find(|l| l.contains("devices: sync="))?;
    Some((
        num(l, "sync")?,
        num(l, "buffered")?,
        num(l, "irqs")?,
        num(l, "refused_irqs")?,
    ))
}

pub fn step_net_qemu(ctx: &mut Ctx) -> Result<String> {
    let img = ctx.image()?;
    let doppel = crate::harness::doppel_bin()?;
    let guest = linuxnet::build()?;
    // Not the emulator's run directory (emu::spawn starts that afresh).
    let dir = workload::run_dir(&format!("{STEP}-host"))?;
    let disk = dir.join("disk.img");
    workload::make_disk(&disk)?;
    let net = NetGuard::create()?;
    let ram = shm_file(STEP);
    let f = fs::File::create(&ram.0).with_context(|| format!("creating {}", ram.0.display()))?;
    f.set_len(u64::from(HOST_MEM_MIB) << 20)?;
    drop(f);

    let khz = QEMU_TSC_KHZ;
    let mut spec = RunSpec::new(Emulator::Qemu, STEP);
    spec.ram_file = Some(ram.0.clone());
    spec.mem_mib = HOST_MEM_MIB;
    spec.icount = true;
    spec.timeout = QEMU_TIMEOUT + Duration::from_secs(600);
    spec.cmdline = format!(
        "{} devices=net,blk",
        linuxboot::hv_cmdline(khz, None, false)
    );
    spec.modules = vec![
        Module {
            path: guest.base.pvh.clone(),
            args: linuxboot::linux_cmdline(khz),
        },
        Module {
            path: guest.initramfs.clone(),
            args: "initrd".into(),
        },
    ];
    let started = Instant::now();
    let mut qemu = emu::spawn(&img, &spec)?;
    let dm_out = dir.join("doppel-run.out");
    let dm_err = dir.join("doppel-run.err");
    let mut dm = Proc::start(
        "doppel run",
        net.host_command(&doppel)
            .arg("run")
            .arg("--machine-ram")
            .arg(&ram.0)
            .arg("--net")
            .arg(format!("tap={},mac={}", net.tap, linuxnet::GUEST_MAC))
            .arg("--disk")
            .arg(&disk)
            .stdout(fs::File::create(&dm_out)?)
            .stderr(fs::File::create(&dm_err)?),
        true,
    )?;
    let client = workload::run_client_while(&net, &client_options(), &dir, &mut || qemu.alive());
    let run = qemu.wait()?;
    // The hypervisor is gone: `doppel run` sees its liveness word still
    // and prints its summary.
    let _ = dm.wait_exit(Duration::from_secs(20));
    dm.kill();
    let wall = started.elapsed();
    let dm_text = fs::read_to_string(&dm_out).unwrap_or_default();
    let summary = dm_text
        .lines()
        .rev()
        .find(|l| l.starts_with("run: requests="))
        .map(str::to_string);
    let report = Report::parse(&run.output);
    let where_ = || {
        format!(
            "{}; doppel run: {}; its stderr:\n{}",
            run.describe(),
            dm_out.display(),
            tail(
                &fs::read_to_string(&dm_err)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
                12
            )
        )
    };
    let client = client.with_context(where_)?;
    client.check().with_context(where_)?;
    let stop = report.stop().with_context(where_)?;
    ensure!(
        stop.kind == "poweroff" && run.passed(),
        "the guest did not power off cleanly (stop={}){}; {}",
        stop.kind,
        report.error_hint(),
        where_()
    );
    let found = linuxnet::check_console(&report.guest).with_context(where_)?;
    ensure!(
        found == 2,
        "Linux found {found} LNRO0005 devices in Doppel's DSDT, expected 2"
    );
    let Some((sync, buffered, irqs, refused)) = device_counts(&emu::hv_text(&run.output)) else {
        bail!("the hypervisor printed no `devices:` line; {}", where_());
    };
    ensure!(
        refused == 0,
        "the hypervisor refused {refused} interrupt words"
    );
    drop(net);
    let d = workload::check_disk(&disk, client.incr.acked)?;
    workload::check_aof(d.aof_incr, client.incr.acked)?;
    ensure!(d.fsck_clean, "e2fsck -fn found errors on the guest's disk");

    // Figures (counts; wall time is emulated).
    let served = client.benchmark.requests + client.incr.acked;
    let per = |n: u64| n as f64 / served.max(1) as f64;
    // Redis's busy span: from `redis=ready` (mark 3) to its exit (mark 4).
    let span = report.mark(3).zip(report.mark(4));
    let busy = span.map(|(a, b)| b.exits.saturating_sub(a.exits));
    let by_reason = span.map_or("n/a".into(), |(a, b)| {
        linuxboot::REASONS
            .iter()
            .map(|r| {
                let n = b.by_reason[*r].saturating_sub(a.by_reason[*r]);
                format!("{r}={:.2}", per(n))
            })
            .collect::<Vec<_>>()
            .join(" ")
    });
    for l in &client.benchmark.lines {
        println!("figures: {STEP} redis-benchmark (emulated, QEMU TCG, under Doppel): {l}");
    }
    println!(
        "figures: {STEP} requests={served} exits={} exits-per-request={} per-request-by-reason: {by_reason} sync-ioreqs={sync} buffered-ioreqs={buffered} ioreq-round-trips-per-request={:.2} buffered-per-request={:.2} irqs={irqs} exits-by-reason: {} doppel-run: {} wall-s={:.1} (emulated)",
        stop.counts.exits,
        busy.map_or("n/a".into(), |b| format!("{:.2}", per(b))),
        per(sync),
        per(buffered),
        stop.counts.reasons(),
        summary.as_deref().unwrap_or("no summary"),
        wall.as_secs_f64()
    );
    let net_line = workload::net_line("amd", &client)?;
    let disk_line = workload::disk_line("amd", &d);
    println!("{net_line}");
    println!("{disk_line}");
    Ok(format!("{net_line}; {disk_line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_line_is_read_whole_or_not_at_all() {
        let hv = "doppel-hv: linux: stop=poweroff exits=9\n\
                  doppel-hv: devices: sync=120 buffered=40 irqs=33 refused_irqs=0\n";
        assert_eq!(device_counts(hv), Some((120, 40, 33, 0)));
        assert_eq!(
            device_counts("doppel-hv: devices: sync=1 buffered=2\n"),
            None
        );
        assert_eq!(device_counts("doppel-hv: exit=pass\n"), None);
    }
}
