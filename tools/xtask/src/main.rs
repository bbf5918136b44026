//! `cargo xtask`: the one front door for building, booting and testing Doppel.
//!
//! Every subcommand does its own set-up first, so a newcomer on a fresh
//! machine needs nothing else: Debian packages, rustup target and
//! components; `fuzz` instead installs only what it needs (the nightly
//! toolchain and cargo-fuzz).

mod backuploss;
mod chain;
mod config;
mod conformance;
mod cpio;
mod ctx;
mod emu;
mod etcd;
mod failover;
mod fuzz;
mod harness;
mod image;
mod inreplica;
mod isolation;
mod linkauth;
mod linux;
mod linuxboot;
mod linuxdev;
mod linuxfail;
mod linuxha;
mod linuxnet;
mod logline;
mod ocf;
mod operate;
mod proc;
mod relay;
mod replica;
mod selftest;
mod setup;
mod shm;
mod test;
mod verifier;
mod witness;
mod workload;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

/// Build, boot, test and demo the Doppel replicating hypervisor.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Which emulated machine (and so which CPU vendor) runs the image.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Emulator {
    /// QEMU TCG with `-cpu EPYC`: AMD SVM with nested paging.
    Qemu,
    /// Bochs with `corei7_skylake_x`: Intel VMX with EPT, A/D bits and PML.
    Bochs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install what the project needs (Debian packages, rustup target and
    /// components, the Linux guest's Debian kernel and busybox under
    /// target/guest/). Idempotent; quick when everything is there.
    Setup,
    /// Build the hypervisor image (ELF and GRUB ISO) into target/doppel/.
    Build,
    /// Build the Linux guest into target/guest/: the vmlinux unpacked from
    /// Debian's bzImage (checked for its PVH entry note) and a busybox
    /// initramfs whose /init prints the transcript the boot tests check.
    LinuxImage,
    /// Boot the image in an emulator and print what it says.
    Boot {
        /// Emulator (and CPU vendor) to boot in.
        #[arg(long, value_enum, default_value = "qemu")]
        emulator: Emulator,
        /// QEMU CPU model (ignored for Bochs). `qemu64,-svm` has no hardware
        /// virtualization: use it to see the image refuse such a CPU.
        #[arg(long, default_value = "EPYC")]
        cpu: String,
        /// Hard wall-clock limit for the emulator run, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Kernel command line, e.g. `log=debug` (see docs/KERNEL.md).
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// Boot the log-dirty self-test (`mode=selftest`) and check every
    /// `logdirty:` line: all epochs exact (missing=0 extra=0) and the final
    /// `result=pass` line with the expected epoch count.
    Selftest {
        /// Emulator: bochs runs the VMX backend, qemu the SVM backend.
        #[arg(long, value_enum, default_value = "bochs")]
        emulator: Emulator,
        /// More kernel command-line words, e.g. `epochs=2 log=debug`.
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// Run everything that proves Doppel works: format, lints, unit and
    /// property tests, conformance checks and emulator boots. Ends with a
    /// line `N passed, N failed`.
    Test {
        /// Also run the long, randomized suites.
        #[arg(long)]
        long: bool,
        /// Run only the steps whose name contains this text (several
        /// texts separated by commas: a step matching any of them).
        #[arg(long)]
        only: Option<String>,
        /// Run the chosen steps N times and print each step's pass count
        /// (`step  passed/N`); the last line counts every step-run.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Keep K busy-loop processes running beside the steps (a loaded
        /// machine); they are killed when the run ends.
        #[arg(long, value_name = "K", default_value_t = 0)]
        load: u32,
        /// Replay the failover runs of an earlier run: the seed its
        /// `failover:` lines printed (`seed=S`). Random when not given.
        #[arg(long, value_name = "S")]
        seed: Option<u64>,
    },
    /// Replication with a failover, shown as it happens.
    Demo {
        /// Replay an earlier demo: the seed its `failover:` line printed
        /// (`seed=S`). Random when not given.
        #[arg(long, value_name = "S")]
        seed: Option<u64>,
        /// The Linux demo (the default): Redis in a Debian VM with a NIC
        /// and a disk, a client's TCP connection kept across a kill -9 of
        /// the primary (a few minutes under emulation).
        #[arg(long, conflicts_with = "kv")]
        linux: bool,
        /// The key-value demo: the test guest's store, clients through the
        /// tool's bridge.
        #[arg(long)]
        kv: bool,
    },
    /// Run every cargo-fuzz target (ring entries, control area, HVM
    /// context, PVH domain builder, migration stream) for a bounded time. Needs nightly and
    /// cargo-fuzz (installed when missing). Not part of `test`.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Run only the targets whose name contains this text.
        #[arg(long)]
        only: Option<String>,
    },
    /// The INCR checker of issue 20's workload (workload.rs), run by the
    /// test harness inside the client network namespace.
    #[command(hide = true)]
    NetChecker {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        stop_file: Option<PathBuf>,
        #[arg(long, default_value_t = 120)]
        ready_timeout: u64,
        #[arg(long)]
        shutdown: bool,
        /// Seconds one INCR may wait for its reply (a failover takes
        /// longer than a plain run's 30).
        #[arg(long, default_value_t = 30)]
        io_timeout: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => {
            setup::ensure()?;
            let g = setup::ensure_guest()?;
            println!(
                "setup: guest {} unpacked in {}: kernel {} ({}), busybox {}",
                g.packages.join(" "),
                g.root.display(),
                g.release,
                g.bzimage.display(),
                g.busybox.display()
            );
            Ok(())
        }
        Cmd::Build => {
            setup::ensure()?;
            let img = image::build()?;
            println!("image: {}", img.iso.display());
            Ok(())
        }
        Cmd::LinuxImage => {
            setup::ensure()?;
            linux::command()
        }
        Cmd::Boot {
            emulator,
            cpu,
            timeout,
            cmdline,
        } => {
            setup::ensure()?;
            let img = image::build()?;
            let run = emu::boot(&img, emulator, &cpu, timeout, &cmdline)?;
            print!("{}", run.output);
            println!("({})", run.describe());
            if run.passed() {
                Ok(())
            } else {
                anyhow::bail!("the image did not report success")
            }
        }
        Cmd::Selftest { emulator, cmdline } => {
            setup::ensure()?;
            let img = image::build()?;
            selftest::command(&img, emulator, &cmdline)
        }
        Cmd::Test {
            long,
            only,
            repeat,
            load,
            seed,
        } => {
            setup::ensure()?;
            test::run(&test::Options {
                long,
                only,
                repeat,
                load,
                seed,
            })
        }
        Cmd::Fuzz { seconds, only } => fuzz::run(seconds, only.as_deref()),
        Cmd::NetChecker {
            addr,
            stop_file,
            ready_timeout,
            shutdown,
            io_timeout,
        } => workload::checker_main(
            &addr,
            stop_file.as_deref(),
            std::time::Duration::from_secs(ready_timeout),
            shutdown,
            std::time::Duration::from_secs(io_timeout),
        ),
        Cmd::Demo { seed, linux: _, kv } => {
            setup::ensure()?;
            test::demo(seed, kv)
        }
    }
}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .expect("xtask lives two levels below the root")
        .to_path_buf()
}

/// Where xtask keeps what it builds and the logs of emulator runs.
pub fn out_dir() -> PathBuf {
    root().join("target").join("doppel")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(["cargo xtask"].iter().chain(args)).map(|c| c.cmd)
    }

    #[test]
    fn test_takes_repeat_load_and_seed() {
        match parse(&[
            "test", "--repeat", "20", "--only", "host", "--load", "2", "--seed", "77",
        ])
        .unwrap()
        {
            Cmd::Test {
                repeat,
                only,
                load,
                seed,
                long,
            } => {
                assert_eq!(
                    (repeat, only.as_deref(), load, seed, long),
                    (20, Some("host"), 2, Some(77), false)
                );
            }
            other => panic!("{other:?}"),
        }
        match parse(&["test"]).unwrap() {
            Cmd::Test {
                repeat, load, seed, ..
            } => assert_eq!((repeat, load, seed), (1, 0, None)),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["test", "--repeat", "0"]).is_err());
        match parse(&["demo", "--seed", "5"]).unwrap() {
            Cmd::Demo { seed, kv, .. } => assert_eq!((seed, kv), (Some(5), false)),
            other => panic!("{other:?}"),
        }
    }
}
