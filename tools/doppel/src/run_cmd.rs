//! `doppel run`: the device model for an unprotected guest
//! (doppel::dm; docs/DEVICES.md).

use std::path::PathBuf;
use std::time::Duration;

use doppel::dm::{self, Backends, DeviceModel, DmError, NetSpec, Stop};

use crate::exit::{Res, INVALID, IO, USAGE};

/// `doppel run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The emulator's guest-RAM backing file (`-object
    /// memory-backend-file,...,share=on`), where the hypervisor publishes
    /// its device-model area; waited for while it does not exist yet.
    #[arg(long, value_name = "FILE")]
    pub machine_ram: PathBuf,
    /// Back the declared virtio-net device with TAP device NAME (already
    /// created in this network namespace: `ip tuntap add dev NAME mode
    /// tap`); the guest's NIC gets MAC.
    #[arg(long, value_name = "tap=NAME,mac=MAC", value_parser = dm::parse_net)]
    pub net: Option<NetSpec>,
    /// Back the declared virtio-blk device with this file (its size,
    /// rounded down to 512-byte sectors, is the disk's capacity).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Seconds the hypervisor's liveness word may stand still before the
    /// machine counts as gone and the run ends.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub hv_timeout: u64,
    /// Seconds to wait for the machine RAM file to appear, and for a
    /// locator holding something other than the device-model magic to
    /// change.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub wait: u64,
}

fn code(e: &DmError) -> u8 {
    match e {
        DmError::Area(dm::AreaError::GuestMap { .. }) => IO,
        DmError::Area(_) => INVALID,
        DmError::Tap { .. } | DmError::Disk { .. } => IO,
        _ => USAGE,
    }
}

pub fn run(a: RunArgs) -> Res {
    let stop = crate::cli::stop_on_signals()?;
    let wait = Duration::from_secs(a.wait);
    let ram = crate::cli::open_machine_waiting(&a.machine_ram, wait)?;
    let fail = |e: DmError| (format!("run: {e}"), code(&e));
    let area = dm::wait_for_area(ram, wait, Duration::from_secs(5), &stop).map_err(fail)?;
    let backends = Backends {
        net: a.net,
        disk: a.disk,
    };
    let h = *area.header();
    let mut dm = DeviceModel::new(area, &backends).map_err(fail)?;
    eprintln!(
        "run: serving {} device(s) in the window {:#x}+{:#x}; guest RAM at {:#x} ({} MiB)",
        h.devices().len(),
        h.window_base,
        h.window_size,
        h.guest_ram_at,
        h.guest_ram_size >> 20
    );
    let why = dm.serve(&stop, Duration::from_secs(a.hv_timeout.max(1)));
    println!("{}", dm.stats());
    match why {
        Stop::Signal => Ok(()),
        Stop::MachineGone => {
            eprintln!(
                "run: the hypervisor's liveness word stood still for {} s: the machine is gone",
                a.hv_timeout.max(1)
            );
            Ok(())
        }
    }
}
