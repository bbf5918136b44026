//! `doppel primary`, `backup`, `inspect` and the hidden `sim-hv`.

use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use doppel::backup::{self, ReceiveError};
use doppel::bridge::{self, BridgeStats};
use doppel::client::ClientConfig;
use doppel::kv::{Checker, Workload};
use doppel::machine::{Control, MachineError, MachineRam};
use doppel::primary::{EpochReport, Output, Primary, PrimaryConfig};
use doppel::protect::{self, ProtectOpts};
use doppel::replica::{Journal, Replica, ReplicaError};
use doppel::sim::{Sim, SimSpec};
use doppel::sim_kv::{KvSim, KvSpec};
use doppel::standby::Standby;
use doppel::stream::format::feature;
use doppel::takeover::{self, Takeover};
use doppel::telemetry::{self, Committed, Role, Shipped, State};
use doppel_abi::chan::{ChannelConsumer, ChannelProducer};
use doppel_abi::control::{Features, Field};
use doppel_abi::{AtomicMem64, SharedMem};

use crate::exit::{Res, INVALID, IO, PEER_GONE, USAGE};

/// Longest timeout any flag takes: one week.
pub const MAX_SECS: u64 = 7 * 24 * 3600;
/// Largest guest a replica may have (`--guest-pages`): 2^32 pages, 16 TiB.
pub const MAX_GUEST_PAGES: u64 = 1 << 32;
/// Most requests one `client` run sends (the workload and its expected
/// answers are held in memory, 48 bytes per request).
pub const MAX_OPS: u64 = 1_000_000;

/// A timeout in seconds (fractions allowed): finite, at least 1 ms, at most
/// [`MAX_SECS`].
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v.is_finite() && (0.001..=MAX_SECS as f64).contains(&v)) {
        return Err(format!(
            "{s} s is out of range: give a finite number of seconds from 0.001 to {MAX_SECS}"
        ));
    }
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s} s: {e}"))
}

/// Whole seconds for a timeout flag: 1 to [`MAX_SECS`].
fn secs_u64() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=MAX_SECS)
}

/// A guest size in pages: 1 to [`MAX_GUEST_PAGES`].
pub fn guest_pages_parser() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=MAX_GUEST_PAGES)
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["backup", "record"])))]
pub struct PrimaryArgs {
    /// The machine's RAM as a host file (QEMU `-object
    /// memory-backend-file,mem-path=FILE,share=on`). The control area is
    /// found through the hypervisor's locator page at 512 KiB, never by
    /// scanning (the guest's RAM is in the file too).
    #[arg(long, value_name = "FILE")]
    machine_ram: PathBuf,
    /// Replicate to the backup listening at this address (host:port).
    #[arg(long, value_name = "ADDR")]
    backup: Option<String>,
    /// Instead of a backup, write the stream to this file (ends with END,
    /// no compression; checkable with `doppel stream verify` and Xen's
    /// verify-stream-v2). Epochs are still acked and committed in the
    /// hypervisor, so the guest keeps running.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Stop after N epochs are committed (then END is sent). Without it:
    /// run until the hypervisor stops answering.
    #[arg(long, value_name = "N")]
    epochs: Option<u64>,
    /// Seconds to wait for the machine RAM file and the control area in it
    /// to appear (the emulator may be starting, the hypervisor booting).
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = secs_u64())]
    wait_control: u64,
    /// Seconds to wait for the hypervisor's answer to a command.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = secs_u64())]
    reply_timeout: u64,
    /// Seconds to wait for the next checkpoint before deciding the
    /// hypervisor stopped answering (exit code 4).
    #[arg(long, default_value_t = 120, value_name = "SECS", value_parser = secs_u64())]
    event_timeout: u64,
    /// Seconds to wait for the backup's ack of an epoch. Not with --record.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = secs_u64(),
          conflicts_with = "record")]
    ack_timeout: u64,
    /// Ask the backup for compressed page records (each page XORed with its
    /// previous version, lz4). Sent as a hello right after the stream
    /// headers; if the backup refuses, pages go plain. Not with --record
    /// (captures stay Xen-valid).
    #[arg(long, conflicts_with = "record")]
    compress: bool,
    /// Seconds to wait for the backup's answer to the --compress hello
    /// (a backup too old to know it never answers).
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = secs_u64(),
          requires = "compress")]
    hello_timeout: u64,
    /// Serve the protected service's clients on this address (host:port;
    /// port 0 picks one; printed as `clients on ADDR`): one client at a
    /// time, its request frames into the input channel, the replies the
    /// hypervisor releases (committed epochs only) back to it. Needs a
    /// hypervisor with INPUT_CHANNEL and OUTPUT_COMMIT.
    #[arg(long, value_name = "ADDR", conflicts_with = "record")]
    serve_clients: Option<String>,
    /// With a backup: send a heartbeat record at least this often (ms)
    /// while waiting for the hypervisor's next event; the backup fails
    /// over when the stream stays silent for its --heartbeat-timeout.
    /// 1 to 60000; not with --record (a capture carries no heartbeats).
    #[arg(long, default_value_t = 200, value_name = "MS", conflicts_with = "record",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    heartbeat_ms: u64,
    #[command(flatten)]
    witness: crate::witness_cli::WitnessArgs,
    #[command(flatten)]
    tls: crate::linkcli::TlsArgs,
    #[command(flatten)]
    pub(crate) ops: crate::opscli::OpsArgs,
    #[command(flatten)]
    #[allow(dead_code)] // read before clap parses (config::expand)
    config: crate::config::ConfigArg,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Address to accept the primary's connection on (host:port; port 0
    /// picks a free port). The bound address is printed as
    /// `listening on ADDR`.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Directory of the replica: `memory.img` (guest memory),
    /// `memory.img.state` (vCPU blob, TSC info, params, committed epochs),
    /// `memory.img.journal` during a commit. Must not hold committed epochs
    /// already (exit code 2).
    #[arg(long, value_name = "DIR", required_unless_present = "standby_ram")]
    replica: Option<PathBuf>,
    /// Guest size in 4 KiB pages (1 to 2^32); pfns at or above it are
    /// refused, and epoch 0 must carry every one of them.
    #[arg(long, value_name = "N", required_unless_present = "standby_ram",
          value_parser = guest_pages_parser())]
    guest_pages: Option<u64>,
    /// Instead of a file replica: a standby hypervisor's machine RAM file
    /// (control area with the STANDBY feature). Committed epochs are
    /// written into its guest RAM; when the primary is lost the last
    /// committed vCPU state is written and the standby activated.
    /// Requires --serve-clients.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["replica", "guest_pages"], requires = "serve_clients")]
    standby_ram: Option<PathBuf>,
    /// With --standby-ram (and required by it): after failover, serve the
    /// service's clients on this address (bound at startup, printed as
    /// `clients on ADDR`; connections are accepted only once the standby
    /// is active).
    #[arg(long, value_name = "ADDR", requires = "standby_ram")]
    serve_clients: Option<String>,
    /// With --standby-ram: once activated, protect the service in its turn
    /// to the backup listening at ADDR (another `doppel backup
    /// --standby-ram`), exactly as `doppel primary --backup ADDR
    /// --serve-clients` would: a chain A -> B -> C, where this standby is
    /// B. Its clients are served once the new backup is connected and
    /// log-dirty is on; their replies then wait for commit, as at any
    /// primary. Default heartbeats and timeouts of `doppel primary`.
    #[arg(long, value_name = "ADDR", requires = "standby_ram")]
    then_backup: Option<String>,
    /// With --standby-ram: fail over when nothing (not even a heartbeat)
    /// arrives from the primary for this long (0.001 to 604800 s).
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_secs,
          conflicts_with = "replica")]
    heartbeat_timeout: Duration,
    /// With --standby-ram: seconds to wait for the standby's control area.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = secs_u64(),
          conflicts_with = "replica")]
    wait_control: u64,
    /// With --standby-ram: seconds to wait for the answer to Activate.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = secs_u64(),
          conflicts_with = "replica")]
    reply_timeout: u64,
    /// Seconds to wait for the primary to connect.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = secs_u64())]
    accept_timeout: u64,
    /// Refuse the primary's request for compressed page records (it then
    /// sends plain PAGE_DATA).
    #[arg(long)]
    no_compress: bool,
    /// With --standby-ram: activate only after taking the witness key.
    #[command(flatten)]
    witness: crate::witness_cli::WitnessArgs,
    #[command(flatten)]
    tls: crate::linkcli::TlsArgs,
    #[command(flatten)]
    ops: crate::opscli::OpsArgs,
    #[command(flatten)]
    #[allow(dead_code)] // read before clap parses (config::expand)
    config: crate::config::ConfigArg,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["machine_ram", "replica"])))]
pub struct InspectArgs {
    /// A machine RAM file: print the control area and the guest RAM
    /// location (`guest_ram offset ... size ...`).
    #[arg(long, value_name = "FILE")]
    machine_ram: Option<PathBuf>,
    /// With --machine-ram: write the HVM context blob of the last
    /// checkpoint posted on the event ring to this file.
    #[arg(long, value_name = "FILE", requires = "machine_ram")]
    last_vcpu_out: Option<PathBuf>,
    /// A replica directory: print its committed epochs, and whether a
    /// commit is under way or a backup holds it. Read-only: safe while a
    /// backup is writing the replica.
    #[arg(long, value_name = "DIR")]
    replica: Option<PathBuf>,
    /// With --replica: write its committed HVM context blob to this file.
    #[arg(long, value_name = "FILE", requires = "replica")]
    vcpu_out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    /// The machine RAM file to create.
    #[arg(long, value_name = "FILE")]
    machine_ram: PathBuf,
    /// Checkpoints to post.
    #[arg(long, default_value_t = 5)]
    epochs: u64,
    /// Guest size in pages (1 to 2^20: up to 4 GiB, the file is mapped).
    #[arg(long, default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    guest_pages: u64,
    /// Pages dirtied per epoch (at most --guest-pages).
    #[arg(long, default_value_t = 40)]
    dirty: u64,
    /// Seed of the fake guest.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run the protected service instead of the fake guest: a key-value
    /// service in guest RAM, fed from the input channel, its replies held
    /// until their epoch is committed. Runs until killed (or --max-secs).
    #[arg(long, value_parser = ["kv"])]
    service: Option<String>,
    /// Keys of the service (each on its own guest page; 1 to 4096, and
    /// fewer than --guest-pages).
    #[arg(long, default_value_t = 16, value_name = "K",
          value_parser = clap::value_parser!(u64).range(1..=u64::from(doppel_abi::service::MAX_KEYS)))]
    keys: u64,
    /// With --service: end an epoch every this many ms (1 to 60000).
    #[arg(long, default_value_t = 50, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    epoch_ms: u64,
    /// A standby for the service: publish a STANDBY control area, wait for
    /// Activate, then serve the service from the state in guest RAM.
    #[arg(long)]
    standby: bool,
    /// With --service / --standby: stop after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    max_secs: u64,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The service's address (`doppel primary --serve-clients`).
    #[arg(long, value_name = "ADDR")]
    connect: String,
    /// Where to go when the first address breaks or goes silent (`doppel
    /// backup --serve-clients`); unanswered requests are re-sent there.
    /// More than one (repeated, or comma-separated): tried in order, one
    /// per failover (a chain: the backup, then the backup's own backup).
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    failover: Vec<String>,
    /// Requests to send (ids 1..=N; N from 1 to 1000000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_OPS))]
    ops: u64,
    /// Most unanswered requests (1..=32, the service's replay window).
    #[arg(long, default_value_t = 8, value_name = "W",
          value_parser = clap::value_parser!(u64).range(1..=doppel_abi::service::REPLAY_WINDOW))]
    window: u64,
    /// Keys used (random PUT / ADD on keys below K; 1 to 4096, the
    /// service's limit).
    #[arg(long, default_value_t = 16, value_name = "K",
          value_parser = clap::value_parser!(u64).range(1..=u64::from(doppel_abi::service::MAX_KEYS)))]
    keys: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fail over when no reply arrives for this long while requests are
    /// outstanding (0.001 to 604800 s).
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_secs)]
    reply_timeout: Duration,
    /// Keep trying to connect (to each address) for this long (0.001 to
    /// 604800 s).
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_secs)]
    connect_timeout: Duration,
}

fn machine_err(e: MachineError) -> (String, u8) {
    let code = match e {
        MachineError::Io { .. } => IO,
        _ => INVALID,
    };
    (e.to_string(), code)
}

fn find_control(m: &MachineRam, wait: Duration) -> Result<Control, (String, u8)> {
    let start = Instant::now();
    loop {
        match m.find_control() {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= wait => return Err(machine_err(e)),
            Err(e) => tracing::debug!("control area not ready: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn progress_printer() -> impl FnMut(&EpochReport) {
    let tty = std::io::stderr().is_terminal();
    move |r: &EpochReport| {
        if tty {
            eprint!(
                "\repoch {:>6}  pages {:>7}  bytes {:>11}  lag {:>8.1} ms   ",
                r.epoch,
                r.pages,
                r.bytes,
                r.lag.as_secs_f64() * 1000.0
            );
        }
        tracing::debug!(
            "epoch {} committed: {} pages, {} bytes, lag {:?}",
            r.epoch,
            r.pages,
            r.bytes,
            r.lag
        );
    }
}

/// Open the machine RAM file; with a wait, a file that does not exist yet
/// (or is still empty: the emulator is starting) is retried until then.
fn open_machine_waiting(
    path: &std::path::Path,
    wait: Duration,
) -> Result<MachineRam, (String, u8)> {
    let start = std::time::Instant::now();
    loop {
        match MachineRam::open(path) {
            Ok(m) => return Ok(m),
            Err(e)
                if start.elapsed() < wait && path.metadata().map_or(true, |md| md.len() == 0) =>
            {
                tracing::debug!("waiting for the machine RAM file: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(machine_err(e)),
        }
    }
}

pub(crate) type ClientSide<'m> = (
    TcpListener,
    ChannelProducer<AtomicMem64<'m>>,
    ChannelConsumer<AtomicMem64<'m>>,
);

/// Bind the client address (printing `clients on ADDR`) and attach to the
/// control area's input and output channels. `standby`: the area is a
/// standby's (its features are checked elsewhere).
fn client_side<'m>(
    m: &'m MachineRam,
    ctl: &Control,
    addr: &str,
    standby: bool,
) -> Result<ClientSide<'m>, (String, u8)> {
    let need = Features::INPUT_CHANNEL | Features::OUTPUT_COMMIT;
    if !standby && !ctl.view.features().contains(need) {
        return Err((
            format!(
                "--serve-clients: the hypervisor offers {:?}, without INPUT_CHANNEL and \
                 OUTPUT_COMMIT its output is not held until commit (start it with service=kv)",
                ctl.view.features()
            ),
            INVALID,
        ));
    }
    let win = m.window(ctl.at as usize);
    let chan = |f: Field| ctl.view.region(f);
    let (io, is) = chan(Field::InputChannel);
    let (oo, os) = chan(Field::OutputChannel);
    // Attach where an earlier tool (before its Detach) left the channels:
    // write after what it published, and skip output it did not drain
    // (replies for its clients, or released unprotected). On a fresh
    // hypervisor both indices are 0.
    let inp = ChannelProducer::attach_resume(win, io, is)
        .map_err(|e| (format!("input channel: {e:?}"), INVALID))?;
    let outc = ChannelConsumer::attach_skip(win, oo, os)
        .map_err(|e| (format!("output channel: {e:?}"), INVALID))?;
    let l = TcpListener::bind(addr).map_err(|e| (format!("binding {addr}: {e}"), IO))?;
    let local = l.local_addr().map_err(|e| (format!("{addr}: {e}"), IO))?;
    println!("clients on {local}");
    let _ = std::io::stdout().flush();
    Ok((l, inp, outc))
}

/// SIGINT/SIGTERM set the returned flag (the run ends at the next epoch
/// boundary, then Detach); a second one ends the process at once.
fn stop_on_signals() -> Result<std::sync::Arc<AtomicBool>, (String, u8)> {
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, std::sync::Arc::clone(&flag))
            .and_then(|_| signal_hook::flag::register(sig, std::sync::Arc::clone(&flag)))
            .map_err(|e| (format!("installing the signal handler: {e}"), IO))?;
    }
    Ok(flag)
}

pub fn primary(a: PrimaryArgs) -> Res {
    let tls = a.link_tls()?;
    let _ops = a.ops.start(Role::Primary)?;
    let wait = Duration::from_secs(a.wait_control);
    let m = open_machine_waiting(&a.machine_ram, wait)?;
    let ctl = find_control(&m, wait)?;
    tracing::info!(
        "control area at {:#x}; guest RAM at {:#x}, {} pages",
        ctl.at,
        ctl.guest_ram().offset,
        ctl.guest_pages()
    );
    let stop_flag = stop_on_signals()?;
    let (mut witness, gate) = crate::witness_cli::primary_acquire(&a.witness)?.unzip();
    let mut cfg = a.primary_config(Some(stop_flag));
    cfg.gate = gate;
    let p = Primary::attach(&m, ctl, cfg).map_err(|e| (e.to_string(), e.exit_code()))?;
    let clients = match &a.serve_clients {
        Some(addr) => Some(client_side(&m, &ctl, addr, false)?),
        None => None,
    };
    let r = protect_attached(&a, p, clients, tls.map(std::sync::Arc::new));
    // Nothing more is released by this side (bridge stopped, no commit
    // follows): give the key up so a backup need not wait for the TTL.
    if let Some(w) = &mut witness {
        w.release();
    }
    r
}

/// `doppel primary` once attached: replicate `p`'s machine as `a` says,
/// serving `clients`. Also the body of `doppel backup --then-backup`
/// (an activated standby protected in its turn, doppel::chain).
pub(crate) fn protect_attached(
    a: &PrimaryArgs,
    mut p: Primary<'_>,
    clients: Option<ClientSide<'_>>,
    tls: Option<std::sync::Arc<doppel::link::LinkTls>>,
) -> Res {
    let stop = AtomicBool::new(false);
    let stats = BridgeStats::default();
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    let res = if let Some(path) = &a.record {
        let f = File::create(path).map_err(io(path.display().to_string()))?;
        let mut out: Output<_, std::io::Empty> =
            Output::record(BufWriter::with_capacity(1 << 20, f));
        // A capture protects nothing: its epochs are released at once.
        telemetry::global().set_state(State::Degraded);
        p.run(&mut out, progress_printer()).map(|s| (s, None))
    } else {
        let addr = a.backup.as_deref().unwrap_or_default();
        let opts = ProtectOpts {
            ack_timeout: Duration::from_secs(a.ack_timeout),
            heartbeat: Duration::from_millis(a.heartbeat_ms),
            compress: a.compress,
            hello_timeout: Duration::from_secs(a.hello_timeout),
            tls,
            handshake: a.tls.handshake(),
            ..ProtectOpts::new(addr)
        };
        std::thread::scope(|s| {
            // Protect the guest before the first client request reaches
            // it: a guest left detached by an earlier tool runs
            // unprotected until LogDirtyEnable, answering at once with
            // replies the bridge must drop (issue 17: a client of the
            // second session got no answer at all).
            if clients.is_some() {
                p.enable_log_dirty()?;
            }
            let bridge = clients.map(|(l, inp, outc)| {
                let (stop, stats) = (&stop, &stats);
                s.spawn(move || bridge::serve(&l, inp, outc, stop, stats))
            });
            // A lost backup does not end this: the guest serves on
            // unprotected through the same bridge until a backup is back.
            let r = protect::protect(&mut p, &opts, progress_printer());
            stop.store(true, Ordering::Relaxed);
            if let Some(Ok(Err(e))) = bridge.map(|b| b.join()) {
                tracing::warn!("client bridge: {e}");
            }
            r.map(|rep| (rep.summary.clone(), Some(rep)))
        })
    };
    if !matches!(res, Err(doppel::primary::PrimaryError::Fenced { .. })) {
        telemetry::global().set_state(State::Stopping);
    }
    if a.serve_clients.is_some() {
        println!(
            "clients: connections={} requests={} replies={} dropped={} refused={}",
            stats.connections.load(Ordering::Relaxed),
            stats.requests.load(Ordering::Relaxed),
            stats.replies.load(Ordering::Relaxed),
            stats.dropped.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed)
        );
    }
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    // Hand the guest back (Detach) only where no backup takes over from
    // it: after END or an orderly end while unprotected, with a capture
    // only, or when the first backup could not be reached (a backup lost
    // later does not end the run: protect serves on unprotected). On any other failure the backup got no END
    // and a standby activates, so this guest must stay stopped (fenced)
    // rather than run on beside it. The client bridge, if any, has
    // stopped: what Detach releases was never committed.
    // A session that never enabled log-dirty (its first backup refused
    // it, e.g. in the TLS handshake) sent no command: a Detach would only
    // be refused and leave the ring looking used to the next primary.
    let detach = p.log_dirty_enabled()
        && match &res {
            Ok(_) => true,
            Err(e) if !e.can_detach() => false,
            Err(_) if a.record.is_some() => true,
            Err(e) => e.lost_backup(),
        };
    if detach {
        match p.detach(Duration::from_secs(a.reply_timeout.min(10))) {
            Ok(()) => println!("primary: detached; the hypervisor runs the guest unprotected"),
            Err(e) => tracing::warn!("Detach: {e}"),
        }
    } else if !p.log_dirty_enabled() {
        tracing::info!("nothing to detach: this session never enabled log-dirty");
    } else if res.as_ref().is_err_and(|e| e.can_detach()) {
        println!(
            "primary: not detaching: the backup got no END and takes over from its last \
             committed epoch; this guest stays stopped at its next epoch end (fenced)"
        );
    } else if let Err(e @ doppel::primary::PrimaryError::Fenced { .. }) = &res {
        println!(
            "primary: fenced: {e}; no epoch is committed and no Detach sent, so the guest \
             stays stopped at its epoch end with its output held"
        );
    }
    match res {
        Ok((s, rep)) => {
            if s.stopped {
                println!("primary: stopped by signal");
            }
            println!(
                "primary: committed {} epochs, {} pages, {} bytes",
                s.committed, s.pages, s.bytes
            );
            println!("{}", s.compression_line());
            match rep {
                // The run ended in order, but the guest served without a
                // backup for a while: say so in the exit status too (5,
                // the backup connection was lost), now that it is over.
                Some(r) if r.was_unprotected() => {
                    println!("{}", r.unprotected_line());
                    Err((
                        format!(
                            "the backup was lost {} times; the guest served unprotected for {} \
                             epochs",
                            r.lost, r.unprotected_epochs
                        ),
                        5,
                    ))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err((e.to_string(), e.exit_code())),
    }
}

impl PrimaryArgs {
    /// The replication link's TLS side (None: plain TCP, warned about, or
    /// a capture); flags that do not go together are a usage error.
    pub(crate) fn link_tls(&self) -> Result<Option<doppel::link::LinkTls>, (String, u8)> {
        match &self.record {
            Some(_) if self.tls.any() => Err((
                "--tls-cert/--tls-key/--peer-cert secure the link to a backup; a --record \
                 capture has none"
                    .into(),
                USAGE,
            )),
            Some(_) => Ok(None),
            None => self.tls.load("primary"),
        }
    }

    /// `--backup`, or empty.
    pub(crate) fn backup_addr(&self) -> &str {
        self.backup.as_deref().unwrap_or_default()
    }

    /// The tool's configuration these arguments give.
    pub(crate) fn primary_config(&self, stop: Option<std::sync::Arc<AtomicBool>>) -> PrimaryConfig {
        PrimaryConfig {
            epochs: self.epochs,
            reply_timeout: Duration::from_secs(self.reply_timeout),
            event_timeout: Duration::from_secs(self.event_timeout),
            stop,
            gate: None,
        }
    }
}

/// Bind the replication address and print `listening on ADDR`.
fn bind_listen(addr: &str) -> Result<TcpListener, (String, u8)> {
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    let l = TcpListener::bind(addr).map_err(io(format!("binding {addr}")))?;
    let local = l.local_addr().map_err(io(addr.into()))?;
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    Ok(l)
}

pub fn backup(a: BackupArgs) -> Res {
    let _ops = a.ops.start(Role::Backup)?;
    let r = backup_inner(a);
    telemetry::global().set_state(State::Stopping);
    r
}

fn backup_inner(a: BackupArgs) -> Res {
    if a.standby_ram.is_some() {
        return standby_backup(a);
    }
    if a.witness.witness.is_some() {
        return Err((
            "--witness is for a standby (--standby-ram): a file replica never activates".into(),
            USAGE,
        ));
    }
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    let (Some(dir), Some(guest_pages)) = (&a.replica, a.guest_pages) else {
        return Err(("--replica and --guest-pages are required".into(), USAGE));
    };
    let tls = a.tls.load("backup")?;
    // Bind before anything is created: a bad --listen leaves no files.
    let l = bind_listen(&a.listen)?;
    std::fs::create_dir_all(dir).map_err(io(dir.display().to_string()))?;
    let image = dir.join("memory.img");
    let mut rep = Replica::open_file(&image, guest_pages).map_err(|e| (e.to_string(), IO))?;
    if rep.state().committed != 0 {
        return Err((
            format!(
                "{}: the replica already holds {} committed epochs; use an empty directory",
                dir.display(),
                rep.state().committed
            ),
            USAGE,
        ));
    }
    let tty = std::io::stderr().is_terminal();
    let offer = if a.no_compress { 0 } else { feature::KNOWN };
    telemetry::global().set_state(State::Waiting);
    let got = crate::linkcli::serve_until_accepted(
        &l,
        a.accept_timeout,
        tls.as_ref(),
        a.tls.handshake(),
        |link, nonce| {
            session_started(link.socket());
            let (conn, ack_out) = link.split();
            let t0 = Instant::now();
            let mut progress = Progress::new(t0);
            let got = backup::serve_session(
                BufReader::with_capacity(1 << 20, conn),
                ack_out,
                &mut rep,
                offer,
                nonce,
                |s| {
                    if tty {
                        eprint!(
                            "\rcommitted epoch {:>6}  pages {:>7}  bytes {:>11}  {:>7.1} s   ",
                            s.epoch,
                            s.pages,
                            s.bytes,
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    tracing::debug!("committed epoch {} ({} pages)", s.epoch, s.pages);
                    progress.epoch(s.pages, s.bytes, tty);
                    backup_epoch(s);
                },
            )
            .map_err(io("back channel".into()))?;
            Ok(got)
        },
        crate::linkcli::session_refused,
    )?;
    if tty {
        eprintln!();
    }
    let committed = rep.state().committed;
    let last = if committed == 0 {
        "none".to_string()
    } else {
        (committed - 1).to_string()
    };
    if let Some(p) = got.partial {
        tracing::warn!(
            "the stream broke inside epoch {} ({} bytes, {} pages received): \
             that epoch is discarded; the replica stays at epoch {last}",
            p.epoch,
            p.bytes,
            p.pages
        );
    }
    println!("backup: last committed epoch {last} ({committed} epochs)");
    match got.error {
        None => Ok(()),
        Some(ReceiveError::Stream(e)) if e.is_truncation() => Err((
            format!("the primary's stream broke: {e}; replica at epoch {last}"),
            PEER_GONE,
        )),
        Some(ReceiveError::Stream(e @ doppel::stream::StreamError::Io { .. })) => Err((
            format!("the primary's connection failed: {e}; replica at epoch {last}"),
            PEER_GONE,
        )),
        Some(
            e @ (ReceiveError::Replica(ReplicaError::Io { .. } | ReplicaError::Corrupt { .. })
            | ReceiveError::Ack { .. }
            | ReceiveError::Hello(_)),
        ) => Err((e.to_string(), IO)),
        Some(e) => Err((format!("{e}; replica at epoch {last}"), INVALID)),
    }
}

/// A primary connected: the backup is now protecting it.
fn session_started(sock: &std::net::TcpStream) {
    let t = telemetry::global();
    t.set_peer(sock.peer_addr().ok().map(|a| a.to_string()));
    t.set_state(State::Protected);
}

/// A committed epoch, for the status and metrics.
fn backup_epoch(s: &backup::EpochStats) {
    let t = telemetry::global();
    t.shipped(&Shipped {
        bytes: s.bytes,
        page_raw: s.pages * 4096,
        ..Shipped::default()
    });
    t.committed(&Committed {
        epoch: s.epoch,
        pages: s.pages,
        ..Committed::default()
    });
}

/// Totals of a backup run, logged at info about once a second (not on a
/// terminal, where the progress line shows every epoch).
struct Progress {
    epochs: u64,
    pages: u64,
    bytes: u64,
    last: Instant,
}

impl Progress {
    fn new(start: Instant) -> Self {
        Self {
            epochs: 0,
            pages: 0,
            bytes: 0,
            last: start,
        }
    }

    fn epoch(&mut self, pages: u64, bytes: u64, tty: bool) {
        self.epochs += 1;
        self.pages = self.pages.saturating_add(pages);
        self.bytes = self.bytes.saturating_add(bytes);
        if !tty && self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            tracing::info!(
                "backup: {} epochs committed, {} pages, {} bytes received",
                self.epochs,
                self.pages,
                self.bytes
            );
        }
    }
}

/// `doppel backup --standby-ram FILE --serve-clients ADDR`.
fn standby_backup(a: BackupArgs) -> Res {
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    let path = a.standby_ram.as_deref().expect("checked by the caller");
    let tls = a.tls.load("backup")?;
    let wait = Duration::from_secs(a.wait_control);
    let m = open_machine_waiting(path, wait)?;
    let ctl = find_control(&m, wait)?;
    let mut standby = Standby::new(&m, ctl).map_err(|e| (e.to_string(), INVALID))?;
    let mut witness = crate::witness_cli::WitnessArgs::open(&a.witness, "backup")?;
    tracing::info!(
        "standby control area at {:#x}; guest RAM at {:#x}, {} pages",
        ctl.at,
        ctl.guest_ram().offset,
        ctl.guest_pages()
    );
    let l = bind_listen(&a.listen)?;
    let caddr = a.serve_clients.as_deref().expect("clap requires it");
    let clients = client_side(&m, &ctl, caddr, true)?;
    // A chain: fail fast on a bad address, before any primary connects.
    let then = crate::chain::Then::new(a.then_backup.as_deref(), path, caddr)?;
    let hb = a.heartbeat_timeout;
    let offer = if a.no_compress { 0 } else { feature::KNOWN };
    let tel = telemetry::global();
    tel.set_state(State::Waiting);
    let got = crate::linkcli::serve_until_accepted(
        &l,
        a.accept_timeout,
        tls.as_ref(),
        a.tls.handshake(),
        |link, nonce| {
            session_started(link.socket());
            link.socket()
                .set_read_timeout(Some(hb))
                .map_err(io("socket".into()))?;
            let (conn, ack_out) = link.split();
            let got = backup::serve_session(
                BufReader::with_capacity(1 << 20, conn),
                ack_out,
                &mut standby,
                offer,
                nonce,
                |s| {
                    tracing::info!(
                        "backup: committed epoch {} pages={} bytes={}",
                        s.epoch,
                        s.pages,
                        s.bytes
                    );
                    backup_epoch(s);
                },
            );
            Ok(got)
        },
        |got| got.as_ref().is_ok_and(crate::linkcli::session_refused),
    )?;
    let committed = standby.committed();
    let last = committed.checked_sub(1);
    let last_text = last.map_or("none".to_string(), |e| e.to_string());
    let got = match got {
        Ok(g) => g,
        // The back channel could not even be opened: the primary is gone.
        Err(e) => backup::Received {
            epochs: Vec::new(),
            ended: false,
            error: Some(ReceiveError::Ack {
                epoch: 0,
                source: e,
            }),
            partial: None,
            features: 0,
        },
    };
    if let Some(p) = got.partial {
        tracing::warn!(
            "the stream broke inside epoch {} ({} bytes, {} pages received): discarded",
            p.epoch,
            p.bytes,
            p.pages
        );
    }
    let (reason, last) = match takeover::decide(&got, committed, hb) {
        Takeover::Ended => {
            println!("backup: the primary ended the stream after epoch {last_text}; standby not activated");
            return Ok(());
        }
        Takeover::Activate { reason, last } => (reason, last),
        Takeover::Refuse(why) => return Err((why, INVALID)),
        Takeover::NothingCommitted(why) => return Err((why, PEER_GONE)),
    };
    let cfg = PrimaryConfig {
        epochs: None,
        reply_timeout: Duration::from_secs(a.reply_timeout),
        event_timeout: Duration::from_secs(a.reply_timeout),
        stop: None,
        gate: None,
    };
    // With a witness: only once the primary's lease is gone.
    tel.set_peer(None);
    tel.set_state(State::Waiting);
    let gate = crate::witness_cli::backup_take(witness.as_mut());
    let (epoch, activated) = standby
        .activate_attached(cfg)
        .map_err(|e| (e.to_string(), INVALID))?;
    println!(
        "failover: primary lost ({reason}) after epoch {last}; standby activated from committed epoch {epoch}"
    );
    let _ = std::io::stdout().flush();
    tel.failover(epoch, &reason);
    if let Some(then) = then {
        // It protects the service in its turn: a primary from here on.
        tel.set_role(Role::Primary);
        return then.protect(activated, clients, gate);
    }
    let stop = AtomicBool::new(false);
    let stats = BridgeStats::default();
    let (l, inp, outc) = clients;
    crate::witness_cli::watch_serving(gate, &stop, || bridge::serve(&l, inp, outc, &stop, &stats))?
        .map_err(|e| (format!("serving clients: {e}"), INVALID))
}

pub fn client(a: ClientArgs) -> Res {
    let work = Workload::new(a.ops, a.keys, a.seed);
    let mut checker = Checker::new(work);
    let cfg = ClientConfig {
        connect: a.connect,
        failover: a.failover,
        window: a.window,
        reply_timeout: a.reply_timeout,
        connect_timeout: a.connect_timeout,
    };
    let run = doppel::client::run(&cfg, &mut checker);
    if let Some(why) = &run.gave_up {
        eprintln!("client: gave up: {why}");
    }
    println!("{}", checker.summary_line(run.failovers));
    let _ = std::io::stdout().flush();
    if checker.pass() {
        Ok(())
    } else if checker.lost_acked != 0 || checker.divergent != 0 {
        Err(("client: the run failed: wrong replies".into(), INVALID))
    } else if run.connections == 0 {
        Err(("client: the service was never reached".into(), IO))
    } else {
        Err((
            "client: the run failed: the service went away before answering everything".into(),
            PEER_GONE,
        ))
    }
}

pub fn inspect(a: InspectArgs) -> Res {
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    if let Some(path) = &a.machine_ram {
        let m = MachineRam::open(path).map_err(machine_err)?;
        let c = m.find_control().map_err(machine_err)?;
        println!("{}", c.describe());
        if let Some(out) = &a.last_vcpu_out {
            let blob = last_checkpoint_blob(&m, &c)?;
            std::fs::write(out, &blob).map_err(io(out.display().to_string()))?;
            println!(
                "last checkpoint: vcpu blob {} bytes -> {}",
                blob.len(),
                out.display()
            );
        }
    }
    if let Some(dir) = &a.replica {
        // Read-only: never replays or drops a journal, never blocks a
        // running backup.
        let image = dir.join("memory.img");
        let view = Replica::inspect(&image).map_err(|e| (e.to_string(), IO))?;
        let s = view.committed();
        println!(
            "replica {}: {} pages, {} committed epochs, vcpu blob {} bytes, {} params",
            dir.display(),
            view.pages,
            s.committed,
            s.hvm_context.len(),
            s.params.len()
        );
        match &view.journal {
            Journal::None => {}
            Journal::Pending(_) => println!(
                "journal: epoch {} committed, its pages not yet all in the image \
                 (the next backup or replay finishes it)",
                s.committed
            ),
            Journal::Torn => println!(
                "journal: incomplete (a commit in progress, or one cut short by a crash, \
                 which the next backup or replay drops)"
            ),
        }
        if view.in_use {
            println!("in use: a running backup or replay holds this replica");
        }
        if let Some(out) = &a.vcpu_out {
            std::fs::write(out, &s.hvm_context).map_err(io(out.display().to_string()))?;
        }
    }
    Ok(())
}

/// The HVM context blob in the vCPU area: the last checkpoint's (the
/// hypervisor rewrites the area only for the next checkpoint). The event
/// itself cannot be read back: in Xen's ring the ack takes the event's slot.
/// The blob is self-delimiting (descriptors up to END) and is decoded like
/// the primary decodes it.
fn last_checkpoint_blob(m: &MachineRam, c: &Control) -> Result<Vec<u8>, (String, u8)> {
    let bad = |what: String| (format!("vCPU area: {what}"), INVALID);
    let win = m.window(c.at as usize);
    let (vo, vs) = c.view.region(Field::VcpuArea);
    let mut area = vec![0u8; vs];
    win.read_bytes(vo, &mut area);
    let mut at = 0usize;
    loop {
        let d = area
            .get(at..at + 8)
            .ok_or_else(|| bad("no END descriptor".into()))?;
        let code = u16::from_le_bytes([d[0], d[1]]);
        let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize;
        at = at
            .checked_add(8 + len)
            .filter(|&e| e <= vs)
            .ok_or_else(|| bad("a record runs past the area".into()))?;
        if code == 0 {
            break;
        }
    }
    let blob = area[..at].to_vec();
    doppel_core::hvm::decode::<64>(&blob).map_err(|e| bad(format!("{e:?}")))?;
    Ok(blob)
}

pub fn sim_hv(a: SimArgs) -> Res {
    if a.dirty > a.guest_pages {
        return Err((
            format!(
                "--dirty {} is more than the guest's {} pages",
                a.dirty, a.guest_pages
            ),
            USAGE,
        ));
    }
    if a.service.is_some() || a.standby {
        let spec = KvSpec {
            guest_pages: a.guest_pages,
            keys: a.keys,
            epoch: Duration::from_millis(a.epoch_ms.max(1)),
            seed: a.seed,
            standby: a.standby,
            max_run: Duration::from_secs(a.max_secs),
        };
        let sim = KvSim::create(&a.machine_ram, spec).map_err(|e| (e.to_string(), IO))?;
        println!(
            "sim-hv: {} control area published in {}",
            if a.standby { "standby" } else { "kv service" },
            a.machine_ram.display()
        );
        let _ = std::io::stdout().flush();
        let r = sim.run(&AtomicBool::new(false));
        println!(
            "sim-hv: epochs posted {} committed {} requests {} released {} activated {:?}",
            r.epochs_posted, r.committed, r.requests, r.released, r.activated
        );
        return match r.error {
            None => Ok(()),
            Some(e) => Err((format!("sim-hv: {e}"), INVALID)),
        };
    }
    let spec = SimSpec {
        guest_pages: a.guest_pages,
        epochs: a.epochs,
        dirty: a.dirty,
        seed: a.seed,
        ..SimSpec::default()
    };
    let sim = Sim::create(&a.machine_ram, spec).map_err(|e| (e.to_string(), IO))?;
    println!(
        "sim-hv: control area published in {}",
        a.machine_ram.display()
    );
    let _ = std::io::stdout().flush();
    let r = sim.run(&AtomicBool::new(false));
    println!("sim-hv: posted {} committed {}", r.posted, r.committed);
    match r.error {
        None => Ok(()),
        Some(e) => Err((format!("sim-hv: {e}"), INVALID)),
    }
}
