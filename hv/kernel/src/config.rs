//! The kernel command line (Multiboot2 tag 1): whitespace-separated
//! `key=value` words turned into a [`Config`].
//!
//! Known keys:
//! - `log=off|error|warn|info|debug|trace`: the log level (default `info`).
//! - `mode=report|crash-null|crash-panic|crash-stack`: what the image does
//!   after bring-up. `report` (the default) prints the capability line and
//!   powers off. The `crash-*` modes then fault on purpose (a read of
//!   address 0, a panic, a kernel stack overflow) so tests can check that
//!   every failure is reported and ends the run. `selftest` runs the
//!   log-dirty self-test: the test guest under the CPU's backend, every
//!   tracking mode the backend has, comparing each epoch's dirty log with
//!   the guest's own truth.
//!   `primary` runs the test guest as a replicated primary for the dom0
//!   tool (`doppel primary`). `standby` publishes a control area and waits
//!   for the backup tool to fill the guest's RAM and send `Activate`.
//!   `isolation` boots the hostile guest once per escape probe of the
//!   backend (`doppel_core::hostile`), checks after each that the host is
//!   untouched, and prints `isolation: backend=.. probes=N contained=N
//!   escaped=0 result=pass`.
//!   `replica` (test only: never a normal primary) runs the key-value
//!   service replicated to an in-machine replica that plays the dom0
//!   tool's part over the real rings, compares its shadow with the guest
//!   after every epoch, then fails over to it inside the machine
//!   (`virt::replica`); it prints `replica: backend=.. mode=.. epochs=N
//!   pages_compared=M mismatches=K vcpu_blob=.. failover=.. result=..`.
//!   `epochs` is the epochs replicated before the failover.
//! - `tracker=wp|pml|ad` (default `wp`): with `mode=replica`, the
//!   log-dirty mode the replica asks for (`LogDirtyEnable`): EPT/NPT
//!   write-protect, PML (VMX) or the NPT dirty-bit scan (SVM). Another
//!   mode refuses it.
//! - `service=workload|kv` (default `workload`): what the guest runs in
//!   `mode=primary`: the dirty-tracking write patterns, or the key-value
//!   service of `doppel_abi::service` (which never stops).
//! - `keys=N` (1..=4096, default 256): keys of the key-value service.
//! - `epoch-exits=N` (1..=10^7): with `service=kv`, take a checkpoint every
//!   N exits (deterministic, for tests). Otherwise `service=kv` takes one
//!   every `epoch-ticks` TSC ticks, default 25 000 000 (25 ms of guest
//!   time under QEMU `-icount`, where the TSC counts virtual nanoseconds).
//! - `epochs=N` (1..=1000, default 4): epochs per pattern of the test guest.
//! - `guest-mem=MiB` (8..=1024, even, default 64): self-test guest RAM.
//! - `epoch-ticks=N` (1000..=10^10): also end a tracking epoch every N TSC
//!   ticks with the backend's epoch timer (default: only the guest's own
//!   epoch ends).
//! - `broken=none|no-fault-mark|no-pml-drain|msr-passthrough|skip-lapic-regs`:
//!   run with a deliberate bug, to show that the test catches it (default
//!   `none`). `msr-passthrough` leaves the MSR intercept bitmaps all zero
//!   (the guest reaches the host's MSRs), for `mode=isolation`;
//!   `skip-lapic-regs` leaves the LAPIC_REGS record out of every save of
//!   `mode=linux restore-every=N`.
//! - `mode=linux` runs the stock Linux kernel given as Multiboot2 module 0
//!   (its module string is the kernel's command line) with module 1 as its
//!   initrd, through Xen's PVH entry, in `guest-mem` MiB (default 256 in
//!   this mode). `tsc-khz=N` (1000..=10^8, required) is the guest's TSC
//!   rate, which the platform's clocks are timed by; `restore-every=N`
//!   (1..=10^7) saves the whole guest to Xen's records every N exits,
//!   destroys the vCPU and platform and rebuilds them from the records.
//!   `devices=net,blk` (default `none`) gives the guest those virtio-mmio
//!   devices, in order, declared in its DSDT and served by `doppel run`
//!   through the device-model area (`virt::devmodel`).
//!   `replicate=primary` runs it as a replicated primary for `doppel
//!   primary` (a checkpoint every `epoch-exits` exits when given, else at
//!   the first exit after every `epoch-ms=N` (1..=60000, default 25) ms
//!   of guest time, each with the whole machine's records; with devices
//!   the device model is quiesced at each epoch end); `replicate=standby` publishes a
//!   standby area the backup tool fills and, at `Activate`, rebuilds the
//!   machine from the committed records and runs Linux on from there.
//!   With `tracker=wp|pml|ad` (test only) the Linux guest is replicated
//!   to the in-machine replica instead: an epoch ends every `epoch-exits`
//!   exits (default 4000), each checkpoint carries the dirty pages and the
//!   whole machine's records, and after `epochs` epochs the guest fails
//!   over to the replica's copy and finishes there (`virt::replica::
//!   LinuxReplica`); it prints `replica: backend=.. guest=linux mode=..
//!   epochs=N pages_compared=M mismatches=K vcpu_blob=.. failover=..
//!   at_epoch=E .. result=..`.
//!
//! A word without `=` that starts with `/` is the image's own path (some
//! loaders prepend it) and is skipped. Anything else is an error: a typo on
//! the command line must not silently change what a test run means.

use core::fmt;

use log::LevelFilter;

/// What the image does once hardware virtualization is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Print the capability line and power off with success.
    Report,
    /// Print the capability line, then fail on purpose.
    Crash(Crash),
    /// The log-dirty self-test.
    SelfTest,
    /// Replicated primary: publish the control area, wait for the dom0
    /// tool, run the test guest and stage a checkpoint at each epoch end.
    Primary,
    /// Standby: publish the control area and wait for `Activate`.
    Standby,
    /// The hostile guest's escape probes, each in a fresh guest.
    Isolation,
    /// A stock Linux kernel (Multiboot2 modules) through the PVH entry.
    Linux,
    /// Test only: the key-value service replicated to the in-machine
    /// replica, then failed over to it.
    Replica,
}

/// `devices=`: the virtio-mmio devices the Linux guest gets, in order
/// (hv/abi `ioreq::device` kinds), served by `doppel run`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    kinds: [u32; doppel_abi::ioreq::MAX_DEVICES],
    len: u8,
}

impl Devices {
    pub fn kinds(&self) -> &[u32] {
        &self.kinds[..usize::from(self.len)]
    }

    /// `net,blk,...` (`none` for no device).
    fn parse(value: &str) -> Option<Self> {
        let mut d = Self::default();
        if value == "none" {
            return Some(d);
        }
        for word in value.split(',') {
            let kind = match word {
                "net" => doppel_abi::ioreq::device::NET,
                "blk" => doppel_abi::ioreq::device::BLK,
                _ => return None,
            };
            *d.kinds.get_mut(usize::from(d.len))? = kind;
            d.len += 1;
        }
        Some(d)
    }
}

/// `replicate=`: the Linux guest's part in replication with the dom0 tool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Replicate {
    /// Not replicated (or only to the in-machine replica, `tracker=`).
    #[default]
    None,
    /// A replicated primary for `doppel primary`.
    Primary,
    /// A standby the backup tool fills and activates.
    Standby,
}

/// The log-dirty mode `mode=replica` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracker {
    /// Write-protect the nested tables.
    WriteProtect,
    /// Intel page-modification logging.
    Pml,
    /// Scan the nested tables' dirty bits.
    AdScan,
}

/// What the guest runs in `mode=primary`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The dirty-tracking write patterns (ends on its own).
    Workload,
    /// The key-value service (runs until the machine is stopped).
    Kv,
}

/// Default checkpoint period of the service, in TSC ticks (25 ms of guest
/// time under QEMU `-icount`: 40 checkpoints a second, as in Remus).
pub const SERVICE_EPOCH_TICKS: u64 = 25_000_000;

/// A deliberate bug for the self-test, to show it is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// Restore write access on a write fault without marking the page.
    NoFaultMark,
    /// Skip the PML drain at epoch end.
    NoPmlDrain,
    /// All-zero MSR intercept bitmaps: every MSR reaches the hardware.
    MsrPassthrough,
    /// The Linux restore loop's saves leave out the LAPIC_REGS record.
    SkipLapicRegs,
}

/// A deliberate failure, to test that failures are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// Read address 0 (unmapped): a page fault.
    NullRead,
    /// `panic!`.
    Panic,
    /// Unbounded recursion into the stack guard page: a page fault that
    /// cannot be delivered on the same stack, so a double fault.
    StackOverflow,
}

/// Settings from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub log: LevelFilter,
    pub mode: Mode,
    pub epochs: u32,
    pub guest_mem_mib: u32,
    pub broken: Option<Broken>,
    pub epoch_ticks: Option<u64>,
    pub service: Service,
    pub keys: u32,
    pub epoch_exits: Option<u64>,
    /// `mode=linux replicate=primary`: an epoch every this many ms of
    /// guest time (when `epoch-exits` is not given; default 25).
    pub epoch_ms: Option<u64>,
    /// `mode=linux`: the guest's TSC rate in kHz.
    pub tsc_khz: Option<u32>,
    /// `mode=linux`: save and rebuild the guest every this many exits.
    pub restore_every: Option<u64>,
    /// `guest-mem` was given (Linux's default differs).
    pub guest_mem_given: bool,
    /// `mode=replica`: the tracker asked for; `None` unless given.
    pub tracker: Option<Tracker>,
    /// `mode=linux`: the guest's virtio devices.
    pub devices: Devices,
    /// `mode=linux`: replicated with the dom0 tool, as primary or standby.
    pub replicate: Replicate,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log: LevelFilter::Info,
            mode: Mode::Report,
            epochs: 4,
            guest_mem_mib: 64,
            broken: None,
            epoch_ticks: None,
            service: Service::Workload,
            keys: 256,
            epoch_exits: None,
            epoch_ms: None,
            tsc_khz: None,
            restore_every: None,
            guest_mem_given: false,
            tracker: None,
            devices: Devices::default(),
            replicate: Replicate::None,
        }
    }
}

/// Why a command line was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError<'a> {
    /// A key this image does not know.
    UnknownKey(&'a str),
    /// A known key with a value it does not take.
    BadValue { key: &'a str, value: &'a str },
    /// A word that is not `key=value`.
    NotKeyValue(&'a str),
    /// The same key twice.
    Duplicate(&'a str),
}

impl fmt::Display for ConfigError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey(k) => write!(f, "unknown command-line key `{k}`"),
            Self::BadValue { key, value } => {
                write!(f, "bad value `{value}` for command-line key `{key}`")
            }
            Self::NotKeyValue(w) => write!(f, "command-line word `{w}` is not key=value"),
            Self::Duplicate(k) => write!(f, "command-line key `{k}` given twice"),
        }
    }
}

impl Config {
    /// Parse a command line; the defaults fill in keys that are absent.
    pub fn parse(cmdline: &str) -> Result<Self, ConfigError<'_>> {
        let mut cfg = Self::default();
        let mut seen: u32 = 0;
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                if word.starts_with('/') {
                    continue;
                }
                return Err(ConfigError::NotKeyValue(word));
            };
            let bad = ConfigError::BadValue { key, value };
            const KEYS: [&str; 15] = [
                "log",
                "mode",
                "epochs",
                "guest-mem",
                "broken",
                "epoch-ticks",
                "service",
                "keys",
                "epoch-exits",
                "tsc-khz",
                "restore-every",
                "tracker",
                "devices",
                "replicate",
                "epoch-ms",
            ];
            let Some(i) = KEYS.iter().position(|k| *k == key) else {
                return Err(ConfigError::UnknownKey(key));
            };
            if seen & (1 << i) != 0 {
                return Err(ConfigError::Duplicate(key));
            }
            seen |= 1 << i;
            match key {
                "log" => {
                    cfg.log = match value {
                        "off" => LevelFilter::Off,
                        "error" => LevelFilter::Error,
                        "warn" => LevelFilter::Warn,
                        "info" => LevelFilter::Info,
                        "debug" => LevelFilter::Debug,
                        "trace" => LevelFilter::Trace,
                        _ => return Err(bad),
                    };
                }
                "mode" => {
                    cfg.mode = match value {
                        "report" => Mode::Report,
                        "crash-null" => Mode::Crash(Crash::NullRead),
                        "crash-panic" => Mode::Crash(Crash::Panic),
                        "crash-stack" => Mode::Crash(Crash::StackOverflow),
                        "selftest" => Mode::SelfTest,
                        "primary" => Mode::Primary,
                        "standby" => Mode::Standby,
                        "isolation" => Mode::Isolation,
                        "linux" => Mode::Linux,
                        "replica" => Mode::Replica,
                        _ => return Err(bad),
                    };
                }
                "epochs" => {
                    cfg.epochs = match value.parse::<u32>() {
                        Ok(n) if (1..=1000).contains(&n) => n,
                        _ => return Err(bad),
                    };
                }
                "guest-mem" => {
                    cfg.guest_mem_mib = match value.parse::<u32>() {
                        Ok(n) if (8..=1024).contains(&n) && n % 2 == 0 => n,
                        _ => return Err(bad),
                    };
                    cfg.guest_mem_given = true;
                }
                "tsc-khz" => {
                    cfg.tsc_khz = match value.parse::<u32>() {
                        Ok(n) if (1000..=100_000_000).contains(&n) => Some(n),
                        _ => return Err(bad),
                    };
                }
                "restore-every" => {
                    cfg.restore_every = match value.parse::<u64>() {
                        Ok(n) if (1..=10_000_000).contains(&n) => Some(n),
                        _ => return Err(bad),
                    };
                }
                "epoch-ticks" => {
                    cfg.epoch_ticks = match value.parse::<u64>() {
                        Ok(n) if (1000..=10_000_000_000).contains(&n) => Some(n),
                        _ => return Err(bad),
                    };
                }
                "service" => {
                    cfg.service = match value {
                        "workload" => Service::Workload,
                        "kv" => Service::Kv,
                        _ => return Err(bad),
                    };
                }
                "keys" => {
                    cfg.keys = match value.parse::<u32>() {
                        Ok(n) if (1..=4096).contains(&n) => n,
                        _ => return Err(bad),
                    };
                }
                "epoch-exits" => {
                    cfg.epoch_exits = match value.parse::<u64>() {
                        Ok(n) if (1..=10_000_000).contains(&n) => Some(n),
                        _ => return Err(bad),
                    };
                }
                "epoch-ms" => {
                    cfg.epoch_ms = match value.parse::<u64>() {
                        Ok(n) if (1..=60_000).contains(&n) => Some(n),
                        _ => return Err(bad),
                    };
                }
                "devices" => cfg.devices = Devices::parse(value).ok_or(bad)?,
                "replicate" => {
                    cfg.replicate = match value {
                        "none" => Replicate::None,
                        "primary" => Replicate::Primary,
                        "standby" => Replicate::Standby,
                        _ => return Err(bad),
                    };
                }
                "tracker" => {
                    cfg.tracker = Some(match value {
                        "wp" => Tracker::WriteProtect,
                        "pml" => Tracker::Pml,
                        "ad" => Tracker::AdScan,
                        _ => return Err(bad),
                    });
                }
                "broken" => {
                    cfg.broken = match value {
                        "none" => None,
                        "no-fault-mark" => Some(Broken::NoFaultMark),
                        "no-pml-drain" => Some(Broken::NoPmlDrain),
                        "msr-passthrough" => Some(Broken::MsrPassthrough),
                        "skip-lapic-regs" => Some(Broken::SkipLapicRegs),
                        _ => return Err(bad),
                    };
                }
                _ => return Err(ConfigError::UnknownKey(key)),
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_line_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert_eq!(Config::parse("  \t ").unwrap(), Config::default());
        assert_eq!(Config::default().log, LevelFilter::Info);
        assert_eq!(Config::default().mode, Mode::Report);
    }

    #[test]
    fn known_keys_are_read() {
        let c = Config::parse("/boot/doppel-hv  log=trace mode=report").unwrap();
        assert_eq!(
            c,
            Config {
                log: LevelFilter::Trace,
                mode: Mode::Report,
                ..Config::default()
            }
        );
        assert_eq!(Config::parse("log=off").unwrap().log, LevelFilter::Off);
        for (word, mode) in [
            ("mode=crash-null", Mode::Crash(Crash::NullRead)),
            ("mode=crash-panic", Mode::Crash(Crash::Panic)),
            ("mode=crash-stack", Mode::Crash(Crash::StackOverflow)),
        ] {
            assert_eq!(Config::parse(word).unwrap().mode, mode);
        }
        assert_eq!(Config::parse("log=warn").unwrap().log, LevelFilter::Warn);
        let c = Config::parse("mode=selftest epochs=7 guest-mem=128 broken=no-pml-drain").unwrap();
        assert_eq!(c.mode, Mode::SelfTest);
        assert_eq!(Config::parse("mode=primary").unwrap().mode, Mode::Primary);
        let l =
            Config::parse("mode=linux tsc-khz=1000000 restore-every=5000 broken=skip-lapic-regs")
                .unwrap();
        assert_eq!(
            (
                l.mode,
                l.tsc_khz,
                l.restore_every,
                l.broken,
                l.guest_mem_given
            ),
            (
                Mode::Linux,
                Some(1_000_000),
                Some(5000),
                Some(Broken::SkipLapicRegs),
                false
            )
        );
        for bad in [
            "tsc-khz=999",
            "tsc-khz=x",
            "restore-every=0",
            "restore-every=20000000",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(c.epochs, 7);
        assert_eq!(c.guest_mem_mib, 128);
        assert_eq!(c.broken, Some(Broken::NoPmlDrain));
        assert_eq!(Config::parse("broken=none").unwrap().broken, None);
        assert_eq!(
            Config::parse("epoch-ticks=200000").unwrap().epoch_ticks,
            Some(200_000)
        );
        assert!(Config::parse("epoch-ticks=10").is_err());
        let c = Config::parse("mode=primary service=kv keys=64 epoch-exits=500").unwrap();
        assert_eq!(
            (c.mode, c.service, c.keys, c.epoch_exits),
            (Mode::Primary, Service::Kv, 64, Some(500))
        );
        assert_eq!(Config::parse("mode=standby").unwrap().mode, Mode::Standby);
        let c = Config::parse("mode=isolation broken=msr-passthrough").unwrap();
        assert_eq!(
            (c.mode, c.broken),
            (Mode::Isolation, Some(Broken::MsrPassthrough))
        );
        for bad in ["service=web", "keys=0", "keys=4097", "epoch-exits=0"] {
            assert!(
                matches!(Config::parse(bad), Err(ConfigError::BadValue { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn replica_mode_and_tracker_are_read() {
        let c = Config::parse("mode=replica tracker=pml broken=no-pml-drain epochs=8").unwrap();
        assert_eq!(
            (c.mode, c.tracker, c.broken, c.epochs),
            (
                Mode::Replica,
                Some(Tracker::Pml),
                Some(Broken::NoPmlDrain),
                8
            )
        );
        assert_eq!(
            Config::parse("tracker=wp").unwrap().tracker,
            Some(Tracker::WriteProtect)
        );
        assert_eq!(
            Config::parse("tracker=ad").unwrap().tracker,
            Some(Tracker::AdScan)
        );
        assert_eq!(Config::parse("mode=replica").unwrap().tracker, None);
        let d = Config::parse("mode=linux devices=net,blk").unwrap().devices;
        assert_eq!(
            d.kinds(),
            [
                doppel_abi::ioreq::device::NET,
                doppel_abi::ioreq::device::BLK
            ]
        );
        assert!(Config::default().devices.kinds().is_empty());
        for bad in [
            "devices=",
            "devices=net,",
            "devices=gpu",
            "devices=net,net,net,net,net,net,net,net,net",
        ] {
            assert!(
                matches!(Config::parse(bad), Err(ConfigError::BadValue { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            Config::parse("mode=linux replicate=standby")
                .unwrap()
                .replicate,
            Replicate::Standby
        );
        assert_eq!(Config::default().replicate, Replicate::None);
        let c = Config::parse("mode=linux replicate=primary epoch-ms=40").unwrap();
        assert_eq!((c.epoch_ms, c.epoch_exits), (Some(40), None));
        assert_eq!(Config::default().epoch_ms, None);
        for bad in ["epoch-ms=0", "epoch-ms=60001", "epoch-ms=x"] {
            assert!(
                matches!(Config::parse(bad), Err(ConfigError::BadValue { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            Config::parse("replicate=backup"),
            Err(ConfigError::BadValue { .. })
        ));
        // The replicated Linux guest takes the same keys.
        let l = Config::parse("mode=linux tsc-khz=50000 tracker=pml epoch-exits=3000 epochs=5")
            .unwrap();
        assert_eq!(
            (l.mode, l.tracker, l.epoch_exits, l.epochs),
            (Mode::Linux, Some(Tracker::Pml), Some(3000), 5)
        );
        assert_eq!(Config::default().tracker, None);
        for bad in ["tracker=ept", "tracker=", "tracker=PML"] {
            assert!(
                matches!(Config::parse(bad), Err(ConfigError::BadValue { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            Config::parse("tracker=wp tracker=pml").unwrap_err(),
            ConfigError::Duplicate("tracker")
        );
    }

    #[test]
    fn self_test_numbers_are_bounded() {
        for bad in [
            "epochs=0",
            "epochs=1001",
            "epochs=x",
            "guest-mem=6",
            "guest-mem=65",
            "guest-mem=2048",
            "broken=maybe",
            "epochs=-1",
        ] {
            assert!(
                matches!(Config::parse(bad), Err(ConfigError::BadValue { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            Config::parse("epochs=2 epochs=3").unwrap_err(),
            ConfigError::Duplicate("epochs")
        );
    }

    #[test]
    fn bad_words_are_errors_naming_the_word() {
        assert_eq!(
            Config::parse("log=loud").unwrap_err(),
            ConfigError::BadValue {
                key: "log",
                value: "loud"
            }
        );
        assert_eq!(
            Config::parse("mode=report colour=red").unwrap_err(),
            ConfigError::UnknownKey("colour")
        );
        assert_eq!(
            Config::parse("quiet").unwrap_err(),
            ConfigError::NotKeyValue("quiet")
        );
        assert_eq!(
            Config::parse("log=info log=debug").unwrap_err(),
            ConfigError::Duplicate("log")
        );
        assert_eq!(
            Config::parse("mode=").unwrap_err(),
            ConfigError::BadValue {
                key: "mode",
                value: ""
            }
        );
    }
}
