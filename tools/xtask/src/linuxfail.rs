//! The Linux guest replicated between two machines by the dom0 tool, and
//! failed over (issue 21's hypervisor half; no devices yet).
//!
//! `linux-failover-qemu-svm` boots two QEMU machines (`-cpu EPYC`,
//! `-icount`): the primary with `mode=linux replicate=primary` (Debian's
//! kernel and the busybox initramfs of issue 19), the standby with
//! `mode=linux replicate=standby`. `doppel primary` ships every checkpoint
//! (dirty pages and the whole machine's HVM records) to `doppel backup`,
//! which writes committed epochs into the standby's RAM. Once the backup
//! has committed [`FAIL_AFTER`] epochs the primary machine is killed
//! (kill -9 of its QEMU, mid-boot); the backup activates the standby,
//! whose hypervisor rebuilds the vCPU and platform from the committed
//! records, and Linux must boot on there to its /init transcript, the
//! same as a plain boot's, and power off cleanly:
//! `linux-failover: killed=qemu at_epoch=E transcript=ok shutdown=clean
//! result=pass`.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::ctx::Ctx;
use crate::emu::{self, RunSpec, Running};
use crate::harness::{committed_epochs, doppel_bin, wait_for, wait_published};
use crate::image::Module;
use crate::linux;
use crate::linuxboot::{self, Report, QEMU_TSC_KHZ};
use crate::proc::{tail, Proc};
use crate::shm::{shm_file, TempFile};
use crate::Emulator;

const STEP: &str = "linux-failover-qemu-svm";

/// Committed epochs before the primary is killed.
const FAIL_AFTER: u64 = 3;
/// A checkpoint every this many exits.
const EPOCH_EXITS: u64 = 1000;
/// Each machine holds guest RAM, the staging area (as large) and the
/// modules.
const MACHINE_MIB: u32 = linuxboot::HOST_MEM_MIB + linuxboot::GUEST_MEM_MIB as u32;

/// One machine of the pair, its RAM in a host file.
pub(crate) struct Machine {
    pub qemu: Option<Running>,
    pub ram: TempFile,
}

fn boot(ctx: &mut Ctx, doppel: &std::path::Path, role: &str, tag: &str) -> Result<Machine> {
    let guest = linux::build()?;
    let modules = vec![
        Module {
            path: guest.pvh.clone(),
            args: linuxboot::linux_cmdline(QEMU_TSC_KHZ),
        },
        Module {
            path: guest.initramfs.clone(),
            args: "initrd".into(),
        },
    ];
    boot_with(
        ctx,
        doppel,
        role,
        tag,
        &format!("epoch-exits={EPOCH_EXITS}"),
        modules,
    )
}

/// Boot one machine of a replicated pair: `mode=linux replicate=ROLE`
/// with `extra` on the hypervisor's command line and `modules` (the
/// kernel, then the initramfs), its RAM in a host file; wait until its
/// control area is published.
pub(crate) fn boot_with(
    ctx: &mut Ctx,
    doppel: &std::path::Path,
    role: &str,
    tag: &str,
    extra: &str,
    modules: Vec<Module>,
) -> Result<Machine> {
    let img = ctx.image()?;
    let ram = shm_file(tag);
    let f = fs::File::create(&ram.0).with_context(|| format!("creating {}", ram.0.display()))?;
    f.set_len(u64::from(MACHINE_MIB) << 20)?;
    drop(f);
    let khz = QEMU_TSC_KHZ;
    let mut spec = RunSpec::new(Emulator::Qemu, tag);
    spec.ram_file = Some(ram.0.clone());
    spec.mem_mib = MACHINE_MIB;
    spec.icount = true;
    spec.timeout = Duration::from_secs(1200);
    spec.cmdline = format!(
        "{} replicate={role} {extra}",
        linuxboot::hv_cmdline(khz, None, false)
    );
    spec.modules = modules;
    let qemu = emu::spawn(&img, &spec)?;
    wait_published(
        doppel,
        &ram.0,
        &qemu,
        &format!("the {role}"),
        Duration::from_secs(180),
    )?;
    Ok(Machine {
        qemu: Some(qemu),
        ram,
    })
}

pub fn step_failover(ctx: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let want = linuxboot::plain_fields(ctx, Emulator::Qemu)?;
    let release = linux::build()?.kernel.release;
    let mut stby = boot(ctx, &doppel, "standby", &format!("{STEP}-standby"))?;
    let mut prim = boot(ctx, &doppel, "primary", &format!("{STEP}-primary"))?;
    let mut backup = Proc::spawn(
        "backup",
        Command::new(&doppel)
            .args(["backup", "--listen", "127.0.0.1:0", "--standby-ram"])
            .arg(&stby.ram.0)
            .args(["--serve-clients", "127.0.0.1:0"])
            .args(["--heartbeat-timeout", "4", "--accept-timeout", "300"]),
        false,
    )?;
    let listen = backup.wait_value("listening on ", Duration::from_secs(60))?;
    let mut primary = Proc::spawn(
        "primary",
        Command::new(&doppel)
            .args(["primary", "--machine-ram"])
            .arg(&prim.ram.0)
            .args(["--backup", &listen, "--wait-control", "120"])
            .args(["--event-timeout", "4"]),
        false,
    )?;
    let why = |b: &Proc, p: &Proc| {
        format!(
            "backup:\n{}\nprimary:\n{}",
            tail(&b.err(), 15),
            tail(&p.err(), 15)
        )
    };
    // Let the backup commit a few epochs of Linux's boot.
    let committed = wait_for(
        "the backup committing the Linux guest's epochs",
        Duration::from_secs(600),
        || {
            if backup.exited()? || primary.exited()? {
                bail!("a tool stopped early");
            }
            Ok(committed_epochs(&backup)
                .iter()
                .any(|(e, _, _)| *e + 1 >= FAIL_AFTER))
        },
    );
    if let Err(e) = committed {
        bail!("{e:#}\n{}", why(&backup, &primary));
    }
    let at = committed_epochs(&backup)
        .iter()
        .map(|(e, _, _)| *e)
        .max()
        .unwrap_or(0);
    // The primary machine dies as a host would.
    if let Some(mut q) = prim.qemu.take() {
        q.kill();
    }
    let activated = wait_for("the standby's activation", Duration::from_secs(120), || {
        Ok(stby
            .qemu
            .as_ref()
            .is_some_and(|q| q.hv_output_so_far().contains("standby: activated")))
    });
    if let Err(e) = activated {
        bail!("{e:#}\n{}", why(&backup, &primary));
    }
    let run = stby.qemu.take().context("the standby machine")?.wait()?;
    backup.kill();
    primary.kill();
    let report = Report::parse(&run.output);
    let resumed = emu::hv_lines(&run.output)
        .find_map(|l| {
            let rest = l.split("activated from committed epoch ").nth(1)?;
            rest.split(';').next()?.trim().parse::<u64>().ok()
        })
        .context("the standby printed no `activated from committed epoch` line")?;
    ensure!(
        resumed >= at,
        "the standby resumed from epoch {resumed}, before the {at} the backup had committed when the primary died"
    );
    linuxboot::same_as_plain(&report, &run, &release, &want, "after the failover")?;
    let s = report.stop()?;
    let line = format!(
        "linux-failover: killed=qemu at_epoch={at} resumed_epoch={resumed} transcript=ok shutdown=clean exits_after={} result=pass",
        s.counts.exits
    );
    println!("{line}");
    Ok(line)
}
