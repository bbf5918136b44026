//! `doppel`: the dom0 replication tool.
//!
//! Exit codes (also in `doppel --help` and docs/REPLICATION.md):
//! 0 success; 1 invalid input (stream, control area, a hypervisor message
//! or the back channel broke the protocol); 2 usage error (clap); 3 I/O
//! error (a file or socket cannot be opened, read or written); 4 the peer
//! went away (hypervisor stopped answering or its RAM file disappeared;
//! for `backup`: the primary's stream broke, the replica stays at its last
//! committed epoch); 5 (`primary`) the backup connection was lost; 6 the
//! witness refused this side or it fenced itself (`--witness`).
//! A replica that already holds committed epochs is a usage error (2).

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use doppel::backup::{self, Staged, Stager};
use doppel::replica::{Replica, ReplicaError};
use doppel::stream::{Limits, StreamError, StreamReader};
use doppel::synth::{self, SynthSpec};

mod args;
mod backup_cmd;
mod chain;
mod cli;
mod config;
mod exit;
mod linkcli;
mod opscli;
mod primary_cmd;
mod run_cmd;
mod units;
mod witness_cli;

/// Most epochs `stream synth` writes.
const MAX_SYNTH_EPOCHS: u64 = 100_000;
/// Largest guest `stream synth` generates (epoch 0 alone is this many
/// pages of stream).
const MAX_SYNTH_PAGES: u64 = 1 << 20;

/// Doppel keeps a running VM replicated to a backup host.
///
/// `primary` serves the hypervisor's control area (found in the machine's
/// RAM file) and ships every checkpoint as a Xen libxc v3 stream to
/// `backup`, which keeps a byte-exact replica and acknowledges each epoch.
///
/// Exit codes: 0 success; 1 invalid input (stream, control area, hypervisor
/// message, back channel); 2 usage (bad flags, or a replica that already
/// holds committed epochs); 3 I/O error (for client: the service was never
/// reached); 4 peer gone (hypervisor silent or its RAM file removed; for
/// backup: the primary's stream broke, the replica stays at its last
/// committed epoch; for client: the service went away); 5 backup
/// connection lost; 6 the witness (`--witness`) refused this side, or it
/// fenced itself because its lease could no longer be confirmed.
/// Logs: RUST_LOG (default info) on stderr.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Xen migration stream tools (captures, synthetic streams).
    #[command(subcommand)]
    Stream(StreamCmd),
    /// Replicate: serve the hypervisor's rings and ship each checkpoint to
    /// a backup (or record the stream to a file).
    #[command(after_help = "Examples:
  doppel primary --machine-ram /dev/shm/vm.ram --backup 10.0.0.2:7000
  doppel primary --machine-ram /dev/shm/vm.ram --backup 10.0.0.2:7000 --compress \
      --serve-clients 0.0.0.0:7100
  doppel primary --machine-ram /dev/shm/vm.ram --record capture.xen --epochs 5")]
    Primary(args::PrimaryArgs),
    /// Receive one primary's stream into a file replica (or a standby's
    /// guest RAM), acknowledging each committed epoch. Prints the last
    /// committed epoch on exit.
    #[command(after_help = "Examples:
  doppel backup --listen 0.0.0.0:7000 --replica /var/lib/doppel/vm1 --guest-pages 16384
  doppel backup --listen 0.0.0.0:7000 --standby-ram /dev/shm/standby.ram \
      --serve-clients 0.0.0.0:7100 --heartbeat-timeout 2")]
    Backup(args::BackupArgs),
    /// Print the control area and guest RAM location found in a machine
    /// RAM file, or the state of a replica; optionally dump blobs.
    #[command(after_help = "Examples:
  doppel inspect --machine-ram /dev/shm/vm.ram
  doppel inspect --replica /var/lib/doppel/vm1 --vcpu-out vcpu.bin")]
    Inspect(args::InspectArgs),
    /// Drive the protected key-value service (`primary --serve-clients`)
    /// and check every reply against a model; fail over to a second
    /// address. Last stdout line: `client: ops=N answered=N ... result=pass|fail`
    /// (exit 0 only on pass; 1 wrong replies; 3 the service was never
    /// reached; 4 it went away before answering everything).
    #[command(after_help = "Example:
  doppel client --connect 10.0.0.1:7100 --failover 10.0.0.2:7100 --ops 4000")]
    Client(args::ClientArgs),
    /// Make this side's key pair and self-signed certificate for the
    /// replication link: DIR/NAME.key (private, mode 0600) and
    /// DIR/NAME.crt. Refuses to overwrite.
    #[command(
        after_help = "Each side pins the other (mutual TLS 1.3, exact certificate match):
  primary$ doppel keygen --out /etc/doppel --name primary
  backup$  doppel keygen --out /etc/doppel --name backup
  # copy primary.crt to the backup and backup.crt to the primary (public,
  # but copy them over a channel you trust: they are the identities), then:
  backup$  doppel backup --listen 0.0.0.0:7000 --replica /var/lib/doppel/vm1 --guest-pages 16384 \\
             --tls-cert /etc/doppel/backup.crt --tls-key /etc/doppel/backup.key \\
             --peer-cert /etc/doppel/primary.crt
  primary$ doppel primary --machine-ram /dev/shm/vm.ram --backup 10.0.0.2:7000 \\
             --tls-cert /etc/doppel/primary.crt --tls-key /etc/doppel/primary.key \\
             --peer-cert /etc/doppel/backup.crt
A peer with another certificate, no certificate or no TLS is refused in the handshake,
before any record is read; the backup logs why and keeps waiting. Keys never leave their host."
    )]
    Keygen(linkcli::KeygenArgs),
    /// Show the live state of a running primary or backup, read from its
    /// `--status-socket`: role, state (protected, degraded, fenced, ...),
    /// epochs, lag, rate, dirty pages, bytes, pause, held output, witness,
    /// peer, last failover. Exit 3 when nothing answers there.
    #[command(after_help = "Examples:
  doppel status --socket /run/doppel/vm1.sock
  doppel status --socket /run/doppel/vm1.sock --json
  doppel status --socket /run/doppel/vm1.sock --field state
States: primary protected | degraded | fenced; backup waiting | protected | active | fenced;
either side starting | stopping. The JSON schema is in docs/OPERATING.md.")]
    Status(opscli::StatusArgs),
    /// Play the hypervisor's side on a new machine RAM file (a software
    /// model for testing the tool without an emulator).
    #[command(hide = true)]
    SimHv(args::SimArgs),
    /// Config files of `primary` and `backup` (`--config FILE`).
    #[command(subcommand)]
    Config(config::ConfigCmd),
    /// Serve the virtio-mmio devices the hypervisor declares (mode=linux
    /// devices=net,blk) for an unprotected guest: virtio-net over a TAP
    /// device, virtio-blk over a file. Waits for the hypervisor's
    /// device-model area in the machine RAM file, then answers the
    /// guest's register accesses (ioreq slot), takes queue notifies off
    /// the buffered ring, moves frames between the TAP and the queues and
    /// raises the devices' interrupts. Ends when the hypervisor stops
    /// (its liveness word still for --hv-timeout) or on SIGTERM/SIGINT,
    /// printing `run: requests=N buffered=N irqs=N tx_frames=N rx_frames=N
    /// rx_dropped=N blk_reads=N blk_writes=N flushes=N`.
    #[command(after_help = "Examples:
  ip netns add vm1 && ip netns exec vm1 ip tuntap add dev tap0 mode tap
  ip netns exec vm1 ip link set tap0 up
  ip netns exec vm1 doppel run --machine-ram /dev/shm/vm1.ram \\
      --net tap=tap0,mac=52:54:00:12:34:56 --disk vm1-disk.img
Every device the hypervisor declares needs its option (--net for virtio-net, --disk for
virtio-blk) and every option its device; a mismatch is an error naming both.
Offered: VERSION_1 (+ MAC for net, + FLUSH for blk); no EVENT_IDX, no offloads, one vCPU's
ioreq slot. docs/DEVICES.md has the details and limits.")]
    Run(run_cmd::RunArgs),
}

#[derive(Subcommand, Debug)]
#[command(after_help = "Examples:
  doppel stream synth --epochs 5 --pages 256 --out synth.xen
  doppel stream verify synth.xen --guest-pages 256
  doppel stream replay synth.xen --image bk/memory.img --guest-pages 256")]
enum StreamCmd {
    /// Validate a finite capture (ending in END) and print per-epoch counts.
    ///
    /// Every record is checked: framing, lengths, padding, reserved fields,
    /// page types, pfn range and record order. Exit code 1 names the first
    /// violation.
    #[command(after_help = "Example:\n  doppel stream verify capture.xen --guest-pages 16384")]
    Verify {
        /// The capture file.
        file: PathBuf,
        /// Guest size in pages: pfns at or above it are rejected. Without
        /// it only the 52-bit pfn field limits them.
        #[arg(long)]
        guest_pages: Option<u64>,
    },
    /// Write a deterministic synthetic stream: headers, STATIC_DATA_END,
    /// N epochs (epoch 0 = all pages, later ones = dirtied pages), END.
    /// Written while generated, to a temporary file renamed to --out at
    /// the end (a failed run leaves no partial file).
    #[command(
        after_help = "Example:\n  doppel stream synth --epochs 5 --pages 2100 --out synth.xen"
    )]
    Synth {
        /// Number of epochs (1 to 100000).
        #[arg(long, default_value_t = 5,
              value_parser = clap::value_parser!(u64).range(1..=MAX_SYNTH_EPOCHS))]
        epochs: u64,
        /// Guest size in pages (1 to 1048576: a 4 GiB guest, 4 GiB of
        /// stream for epoch 0).
        #[arg(long, default_value_t = 256,
              value_parser = clap::value_parser!(u64).range(1..=MAX_SYNTH_PAGES))]
        pages: u64,
        /// Pages dirtied per epoch after the first.
        #[arg(long, default_value_t = 32)]
        dirty: u64,
        /// Generator seed (same seed, same bytes).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Receive a capture into a file replica (image + .state + .journal),
    /// committing epoch by epoch as the backup does.
    ///
    /// Like `backup`, a replica that already holds committed epochs is
    /// refused (exit code 2): every capture starts over with its own
    /// headers and a full epoch 0, so appending one to a replica would only
    /// mix two streams' epoch counts. Epoch 0 must carry every one of
    /// --guest-pages pages.
    #[command(
        after_help = "Example:\n  doppel stream replay capture.xen --image bk/memory.img --guest-pages 16384"
    )]
    Replay {
        /// The capture file.
        file: PathBuf,
        /// Replica image file (created if missing; must not hold committed
        /// epochs).
        #[arg(long)]
        image: PathBuf,
        /// Guest size in pages (1 to 2^32).
        #[arg(long, value_parser = units::guest_pages_parser())]
        guest_pages: u64,
    },
    /// Send a recorded stream to a backup as it is, the way a primary
    /// connects (with the TLS flags: over TLS, with this side's
    /// certificate), without echoing the backup's session nonce: a replay.
    /// Testing only: a backup must refuse it. Prints what the backup
    /// answered; exit 0 only if it acknowledged the stream to its END.
    #[command(hide = true)]
    Send {
        /// The recorded stream.
        file: PathBuf,
        /// The backup's address.
        #[arg(long, value_name = "ADDR")]
        backup: String,
        #[command(flatten)]
        tls: linkcli::TlsArgs,
    },
}

enum Failure {
    Invalid(String),
    Io(String),
    /// Message and exit code.
    Code(String, u8),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // `primary|backup --config FILE`: the file's keys become flags.
    let args = match config::expand(Cli::command(), std::env::args_os().collect()) {
        Ok(a) => a,
        Err((m, c)) => {
            eprintln!("doppel: {m}");
            return ExitCode::from(c);
        }
    };
    let cli = Cli::parse_from(args);
    let r = match cli.cmd {
        Cmd::Stream(StreamCmd::Verify { file, guest_pages }) => verify(&file, guest_pages),
        Cmd::Stream(StreamCmd::Synth {
            epochs,
            pages,
            dirty,
            seed,
            out,
        }) => synth_cmd(
            &SynthSpec {
                epochs,
                pages,
                dirty,
                seed,
            },
            &out,
        ),
        Cmd::Stream(StreamCmd::Replay {
            file,
            image,
            guest_pages,
        }) => replay(&file, &image, guest_pages),
        Cmd::Stream(StreamCmd::Send { file, backup, tls }) => {
            linkcli::send(&file, &backup, &tls).map_err(|(m, c)| Failure::Code(m, c))
        }
        Cmd::Primary(a) => primary_cmd::primary(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Backup(a) => backup_cmd::backup(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Inspect(a) => cli::inspect(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Client(a) => cli::client(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Keygen(a) => linkcli::keygen(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Status(a) => opscli::status(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Run(a) => run_cmd::run(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::SimHv(a) => cli::sim_hv(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Config(c) => match config::run(Cli::command(), c) {
            0 => Ok(()),
            c => return ExitCode::from(c),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(m)) => {
            eprintln!("doppel: invalid: {m}");
            ExitCode::from(exit::INVALID)
        }
        Err(Failure::Io(m)) => {
            eprintln!("doppel: {m}");
            ExitCode::from(exit::IO)
        }
        Err(Failure::Code(m, c)) => {
            eprintln!("doppel: {m}");
            ExitCode::from(c)
        }
    }
}

fn stream_failure(e: StreamError) -> Failure {
    match e {
        StreamError::Io { .. } => Failure::Io(e.to_string()),
        e => Failure::Invalid(e.to_string()),
    }
}

fn open(file: &Path) -> Result<BufReader<File>, Failure> {
    File::open(file)
        .map(|f| BufReader::with_capacity(1 << 20, f))
        .map_err(|e| Failure::Io(format!("{}: {e}", file.display())))
}

fn verify(file: &Path, guest_pages: Option<u64>) -> Result<(), Failure> {
    let limits = guest_pages.map_or(Limits::any(), |p| Limits { guest_pages: p });
    let mut rd = StreamReader::open(open(file)?, limits).map_err(stream_failure)?;
    let info = rd.info();
    println!(
        "{}: libxc stream v{}, x86 HVM, Xen {}.{}",
        file.display(),
        info.version,
        info.xen_major,
        info.xen_minor
    );
    let mut stager = Stager::new(u64::MAX);
    let mut epochs = 0u64;
    let mut pages = 0u64;
    loop {
        let before = rd.offset();
        let rec = rd.next_record().map_err(stream_failure)?;
        match stager
            .push(rec, rd.offset() - before)
            .map_err(|e| Failure::Invalid(e.to_string()))?
        {
            Staged::Epoch(_, s) => {
                println!(
                    "epoch {}: {} pages, {} invalid pfns, {} PAGE_DATA records, {} bytes",
                    s.epoch, s.pages, s.invalid, s.page_records, s.bytes
                );
                epochs += 1;
                pages += s.pages;
            }
            Staged::More | Staged::End => {}
        }
        if rd.ended() {
            break;
        }
    }
    rd.expect_eof().map_err(stream_failure)?;
    println!(
        "valid: {epochs} epochs, {pages} pages, {} bytes",
        rd.offset()
    );
    Ok(())
}

fn synth_cmd(spec: &SynthSpec, out: &Path) -> Result<(), Failure> {
    fn io(p: &Path) -> impl FnOnce(std::io::Error) -> Failure + '_ {
        move |e| Failure::Io(format!("{}: {e}", p.display()))
    }
    let name = out
        .file_name()
        .ok_or_else(|| Failure::Code(format!("--out {}: not a file name", out.display()), 2))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let written = File::create(&tmp).map_err(io(&tmp)).and_then(|f| {
        let (w, total) =
            synth::write_spec(BufWriter::with_capacity(1 << 20, f), spec).map_err(io(&tmp))?;
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        Ok(total)
    });
    let total = match written {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    tracing::info!(
        "wrote {} epochs of a {}-page guest, {} bytes, to {}",
        spec.epochs,
        spec.pages,
        total,
        out.display()
    );
    Ok(())
}

fn replay(file: &Path, image: &Path, guest_pages: u64) -> Result<(), Failure> {
    // The capture first: a missing one creates no image.
    let capture = open(file)?;
    let mut rep = Replica::open_file(image, guest_pages).map_err(|e| Failure::Io(e.to_string()))?;
    let before = rep.state().committed;
    if before != 0 {
        return Err(Failure::Code(
            format!(
                "{}: the replica already holds {before} committed epochs; use a new image",
                image.display()
            ),
            2,
        ));
    }
    let got = backup::receive(capture, &mut rep, |s| {
        println!("committed epoch {} ({} pages)", s.epoch, s.pages);
        Ok(())
    });
    println!(
        "replica {}: {} epochs committed (was {before})",
        image.display(),
        rep.state().committed
    );
    match got.error {
        None => Ok(()),
        Some(backup::ReceiveError::Stream(e)) => Err(stream_failure(e)),
        Some(
            e @ backup::ReceiveError::Replica(
                ReplicaError::Io { .. } | ReplicaError::Corrupt { .. },
            ),
        ) => Err(Failure::Io(e.to_string())),
        Some(e) => Err(Failure::Invalid(e.to_string())),
    }
}
