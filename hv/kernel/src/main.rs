//! The Doppel hypervisor image: a Multiboot2 kernel that brings the CPU up,
//! builds its own memory management, turns hardware virtualization on and
//! reports what the CPU offers (`doppel-hv: vendor=... virt=on`).
//!
//! Boot path and memory layout: docs/KERNEL.md.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod boot;
mod console;
mod crash;
mod exit;
mod mem;
mod virt;

use core::sync::atomic::{AtomicBool, Ordering};

use doppel_kernel::bootinfo::{BootInfo, BOOTLOADER_MAGIC};
use doppel_kernel::config::{Config, Mode, Service, Tracker, SERVICE_EPOCH_TICKS};
use log::{error, info, LevelFilter};

use exit::{exit, Status};

/// The boot information block must sit in the 4 GiB the boot tables map.
const BOOT_MAPPED: u64 = 4 << 30;

/// Entered from the boot assembly on the boot stack, in long mode with the
/// first 4 GiB identity mapped.
#[unsafe(no_mangle)]
extern "C" fn kmain(magic: u32, info_addr: usize) -> ! {
    console::init();
    console::init_logger(LevelFilter::Info);
    arch::init(fault);
    if magic != BOOTLOADER_MAGIC {
        error!("not started by a Multiboot2 loader (eax={magic:#x})");
        exit(Status::Fail);
    }
    let info = match boot_info(info_addr as u64) {
        Ok(i) => i,
        Err(e) => {
            error!("{e}");
            exit(Status::Fail);
        }
    };
    let cmdline = info.cmdline().unwrap_or("");
    let config = match Config::parse(cmdline) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            exit(Status::Fail);
        }
    };
    log::set_max_level(config.log);
    log::debug!("command line {cmdline:?}: {config:?}");
    if let Err(e) = mem::init(&info, info_addr as u64) {
        error!("{e}");
        exit(Status::Fail);
    }

    let caps = virt::Caps::detect();
    let enabled = virt::enable(&caps);
    info!("{}", caps.line(enabled.is_ok()));
    let mut enabled = match enabled {
        Ok(e) => e,
        Err(e) => {
            error!("{e}");
            exit(Status::Fail);
        }
    };
    match config.mode {
        Mode::Report => match enabled.disable() {
            Ok(()) => exit(Status::Pass),
            Err(e) => {
                error!("{e}");
                exit(Status::Fail)
            }
        },
        Mode::Crash(kind) => crash::crash(kind),
        Mode::Linux => {
            let ok = linux(&info, &config, &mut enabled);
            exit(if ok { Status::Pass } else { Status::Fail })
        }
        Mode::SelfTest | Mode::Primary | Mode::Standby | Mode::Isolation | Mode::Replica => {
            let service = matches!(config.mode, Mode::Standby | Mode::Replica)
                || config.service == Service::Kv;
            let plan = virt::selftest::Plan {
                mem_bytes: u64::from(config.guest_mem_mib) << 20,
                epochs: config.epochs,
                patterns: (1 << doppel_abi::guest::PatternId::ALL.len()) - 1,
                seed: doppel_abi::guest::SELFTEST_SEED,
                broken: config.broken,
                pause_cycles: true,
                // A service checkpoints on the epoch timer unless a
                // per-exits policy is named.
                epoch_ticks: match (service, config.epoch_ticks, config.epoch_exits) {
                    (true, None, None) => Some(SERVICE_EPOCH_TICKS),
                    (_, t, _) => t,
                },
                service,
                epoch_exits: config.epoch_exits,
                keys: config.keys,
            };
            let ok = match config.mode {
                Mode::Primary => virt::primary(&mut enabled, &plan),
                Mode::Standby => virt::standby(&mut enabled, &plan),
                Mode::Isolation => virt::isolation(&mut enabled, &plan),
                Mode::Replica => virt::replica(&mut enabled, &plan, log_dirty_mode(config.tracker)),
                _ => virt::selftest(&mut enabled, &plan),
            };
            exit(if ok { Status::Pass } else { Status::Fail })
        }
    }
}

/// The log-dirty mode `tracker=` asks for (write-protect by default).
fn log_dirty_mode(t: Option<Tracker>) -> doppel_abi::msg::LogDirtyMode {
    use doppel_abi::msg::LogDirtyMode;
    match t {
        None | Some(Tracker::WriteProtect) => LogDirtyMode::WriteProtect,
        Some(Tracker::Pml) => LogDirtyMode::Pml,
        Some(Tracker::AdScan) => LogDirtyMode::AdScan,
    }
}

/// `mode=linux tracker=..`: a replicated epoch ends every this many exits
/// unless `epoch-exits=` says otherwise.
const LINUX_EPOCH_EXITS: u64 = 4000;

/// `mode=linux`: the kernel (module 0, whose string is its command line)
/// and the initrd (module 1) as GRUB loaded them.
fn linux(info: &BootInfo<'_>, config: &Config, enabled: &mut virt::Enabled) -> bool {
    let mods: alloc::vec::Vec<_> = info.modules().collect();
    let (Some(kernel), Some(initrd)) = (mods.first(), mods.get(1)) else {
        error!(
            "mode=linux needs two Multiboot2 modules (the kernel, then the initrd); the loader gave {}",
            mods.len()
        );
        return false;
    };
    let Some(tsc_khz) = config.tsc_khz else {
        error!("mode=linux needs tsc-khz=<the guest TSC rate in kHz>");
        return false;
    };
    let bytes = |m: &doppel_kernel::bootinfo::Module<'_>| {
        // SAFETY: GRUB loaded the module at [start, end) below 4 GiB (the
        // boot information checks say so), which the identity map covers;
        // the frame allocator reserved it, so nothing else writes it.
        unsafe {
            core::slice::from_raw_parts(m.start as usize as *const u8, (m.end - m.start) as usize)
        }
    };
    let plan = virt::linux::LinuxPlan {
        kernel: bytes(kernel),
        initrd: bytes(initrd),
        cmdline: kernel.cmdline.as_bytes(),
        mem_bytes: u64::from(if config.guest_mem_given {
            config.guest_mem_mib
        } else {
            256
        }) << 20,
        tsc_khz,
        restore_every: config.restore_every,
        skip_lapic_regs: config.broken == Some(doppel_kernel::config::Broken::SkipLapicRegs),
        devices: config.devices.kinds(),
        replicate: match config.replicate {
            doppel_kernel::config::Replicate::None => virt::linux::Replicate::None,
            doppel_kernel::config::Replicate::Primary => virt::linux::Replicate::Primary {
                epoch_exits: config.epoch_exits,
                epoch_ms: config.epoch_ms,
            },
            doppel_kernel::config::Replicate::Standby => virt::linux::Replicate::Standby,
        },
        replica: config.tracker.map(|t| virt::linux::ReplicaPlan {
            mode: log_dirty_mode(Some(t)),
            epoch_exits: config.epoch_exits.unwrap_or(LINUX_EPOCH_EXITS),
            epochs: u64::from(config.epochs),
        }),
    };
    virt::linux(enabled, &plan)
}

/// The loader's boot information, validated.
fn boot_info(addr: u64) -> Result<BootInfo<'static>, &'static str> {
    if addr == 0 || !addr.is_multiple_of(8) || addr + 8 > BOOT_MAPPED {
        return Err("boot information pointer is null, unaligned or above 4 GiB");
    }
    // SAFETY: the loader put the block's 8-byte header at `addr` (aligned,
    // checked above), inside the boot identity map; nothing writes it.
    let head = unsafe { core::slice::from_raw_parts(addr as *const u8, 8) };
    let size = BootInfo::claimed_size(head).map_err(|_| "boot information unreadable")? as u64;
    if addr + size > BOOT_MAPPED {
        return Err("boot information extends above 4 GiB");
    }
    // SAFETY: as above for the whole block, whose size the header gives;
    // the frame allocator reserves it, so it stays intact.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, size as usize) };
    BootInfo::parse(bytes).map_err(|e| {
        error!("{e}");
        "malformed Multiboot2 boot information"
    })
}

/// An exception ends the run with one error line.
fn fault(f: &arch::idt::Fault<'_>) -> ! {
    console::emergency(format_args!("doppel-hv: error: {f}\n"));
    exit(Status::Fail)
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::SeqCst) {
        console::emergency(format_args!("doppel-hv: error: panic while panicking\n"));
    } else {
        match panic.location() {
            Some(l) => console::emergency(format_args!(
                "doppel-hv: error: panic at {}:{}:{}: {}\n",
                l.file(),
                l.line(),
                l.column(),
                panic.message()
            )),
            None => console::emergency(format_args!(
                "doppel-hv: error: panic: {}\n",
                panic.message()
            )),
        }
    }
    exit(Status::Fail)
}
