//! `doppel`: the dom0 replication tool.
//!
//! Exit codes (also in `doppel --help` and docs/REPLICATION.md):
//! 0 success; 1 invalid input (stream, control area, a hypervisor message
//! or the back channel broke the protocol); 2 usage error (clap); 3 I/O
//! error (a file or socket cannot be opened, read or written); 4 the peer
//! went away (hypervisor stopped answering or its RAM file disappeared;
//! for `backup`: the primary's stream broke, the replica stays at its last
//! committed epoch); 5 (`primary`) the backup connection was lost.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use doppel::backup::{self, Staged, Stager};
use doppel::replica::Replica;
use doppel::stream::{Limits, StreamError, StreamReader};
use doppel::synth::{self, SynthSpec};

mod cli;

/// Doppel keeps a running VM replicated to a backup host.
///
/// `primary` serves the hypervisor's control area (found in the machine's
/// RAM file) and ships every checkpoint as a Xen libxc v3 stream to
/// `backup`, which keeps a byte-exact replica and acknowledges each epoch.
///
/// Exit codes: 0 success; 1 invalid input (stream, control area, hypervisor
/// message, back channel); 2 usage; 3 I/O error; 4 peer gone (hypervisor
/// silent or its RAM file removed; for backup: the primary's stream broke,
/// the replica stays at its last committed epoch); 5 backup connection lost.
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
    Primary(cli::PrimaryArgs),
    /// Receive one primary's stream into a file replica, acknowledging
    /// each committed epoch. Prints the last committed epoch on exit.
    Backup(cli::BackupArgs),
    /// Print the control area and guest RAM location found in a machine
    /// RAM file, or the state of a replica; optionally dump blobs.
    Inspect(cli::InspectArgs),
    /// Drive the protected key-value service (`primary --serve-clients`)
    /// and check every reply against a model; fail over to a second
    /// address. Last stdout line: `client: ops=N answered=N ... result=pass|fail`
    /// (exit 0 only on pass).
    Client(cli::ClientArgs),
    /// Play the hypervisor's side on a new machine RAM file (a software
    /// model for testing the tool without an emulator).
    #[command(hide = true)]
    SimHv(cli::SimArgs),
}

#[derive(Subcommand, Debug)]
enum StreamCmd {
    /// Validate a finite capture (ending in END) and print per-epoch counts.
    ///
    /// Every record is checked: framing, lengths, padding, reserved fields,
    /// page types, pfn range and record order. Exit code 1 names the first
    /// violation.
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
    Synth {
        /// Number of epochs.
        #[arg(long, default_value_t = 5)]
        epochs: u64,
        /// Guest size in pages.
        #[arg(long, default_value_t = 256)]
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
    Replay {
        /// The capture file.
        file: PathBuf,
        /// Replica image file (created if missing).
        #[arg(long)]
        image: PathBuf,
        /// Guest size in pages.
        #[arg(long)]
        guest_pages: u64,
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
    let cli = Cli::parse();
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
        Cmd::Primary(a) => cli::primary(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Backup(a) => cli::backup(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Inspect(a) => cli::inspect(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::Client(a) => cli::client(a).map_err(|(m, c)| Failure::Code(m, c)),
        Cmd::SimHv(a) => cli::sim_hv(a).map_err(|(m, c)| Failure::Code(m, c)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(m)) => {
            eprintln!("doppel: invalid: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Io(m)) => {
            eprintln!("doppel: {m}");
            ExitCode::from(3)
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
    let io = |e: std::io::Error| Failure::Io(format!("{}: {e}", out.display()));
    let f = File::create(out).map_err(io)?;
    let eps = synth::epochs(spec);
    let (_, lay) = synth::write_stream(BufWriter::with_capacity(1 << 20, f), &eps).map_err(io)?;
    tracing::info!(
        "wrote {} epochs of a {}-page guest, {} bytes, to {}",
        spec.epochs,
        spec.pages,
        lay.total,
        out.display()
    );
    Ok(())
}

fn replay(file: &Path, image: &Path, guest_pages: u64) -> Result<(), Failure> {
    let mut rep = Replica::open_file(image, guest_pages).map_err(|e| Failure::Io(e.to_string()))?;
    let before = rep.state().committed;
    let got = backup::receive(open(file)?, &mut rep, |s| {
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
        Some(e @ backup::ReceiveError::Replica(_)) => Err(Failure::Io(e.to_string())),
        Some(e) => Err(Failure::Invalid(e.to_string())),
    }
}
