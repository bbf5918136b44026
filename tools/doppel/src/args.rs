//! The arguments of `doppel primary`, `backup`, `inspect`, `client` and
//! the hidden `sim-hv` (clap).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Args;
use doppel::primary::PrimaryConfig;

use crate::exit::USAGE;
use crate::units::{guest_pages_parser, parse_secs, secs_u64, MAX_OPS};

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["backup", "record"])))]
pub struct PrimaryArgs {
    /// The machine's RAM as a host file (QEMU `-object
    /// memory-backend-file,mem-path=FILE,share=on`). The control area is
    /// found through the hypervisor's locator page at 512 KiB, never by
    /// scanning (the guest's RAM is in the file too).
    #[arg(long, value_name = "FILE")]
    pub(crate) machine_ram: PathBuf,
    /// Replicate to the backup listening at this address (host:port).
    #[arg(long, value_name = "ADDR")]
    pub(crate) backup: Option<String>,
    /// Instead of a backup, write the stream to this file (ends with END,
    /// no compression; checkable with `doppel stream verify` and Xen's
    /// verify-stream-v2). Epochs are still acked and committed in the
    /// hypervisor, so the guest keeps running.
    #[arg(long, value_name = "FILE")]
    pub(crate) record: Option<PathBuf>,
    /// Stop after N epochs are committed (then END is sent). Without it:
    /// run until the hypervisor stops answering.
    #[arg(long, value_name = "N")]
    pub(crate) epochs: Option<u64>,
    /// Seconds to wait for the machine RAM file and the control area in it
    /// to appear (the emulator may be starting, the hypervisor booting).
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = secs_u64())]
    pub(crate) wait_control: u64,
    /// Seconds to wait for the hypervisor's answer to a command.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = secs_u64())]
    pub(crate) reply_timeout: u64,
    /// Seconds to wait for the next checkpoint before deciding the
    /// hypervisor stopped answering (exit code 4).
    #[arg(long, default_value_t = 120, value_name = "SECS", value_parser = secs_u64())]
    pub(crate) event_timeout: u64,
    /// Seconds to wait for the backup's ack of an epoch. Not with --record.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = secs_u64(),
          conflicts_with = "record")]
    pub(crate) ack_timeout: u64,
    /// Ask the backup for compressed page records (each page XORed with its
    /// previous version, lz4). Sent as a hello right after the stream
    /// headers; if the backup refuses, pages go plain. Not with --record
    /// (captures stay Xen-valid).
    #[arg(long, conflicts_with = "record")]
    pub(crate) compress: bool,
    /// Seconds to wait for the backup's answer to the --compress hello
    /// (a backup too old to know it never answers).
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = secs_u64(),
          requires = "compress")]
    pub(crate) hello_timeout: u64,
    /// Serve the protected service's clients on this address (host:port;
    /// port 0 picks one; printed as `clients on ADDR`): one client at a
    /// time, its request frames into the input channel, the replies the
    /// hypervisor releases (committed epochs only) back to it. Needs a
    /// hypervisor with INPUT_CHANNEL and OUTPUT_COMMIT.
    #[arg(long, value_name = "ADDR", conflicts_with = "record")]
    pub(crate) serve_clients: Option<String>,
    /// With a backup: send a heartbeat record at least this often (ms)
    /// while waiting for the hypervisor's next event; the backup fails
    /// over when the stream stays silent for its --heartbeat-timeout.
    /// 1 to 60000; not with --record (a capture carries no heartbeats).
    #[arg(long, default_value_t = 200, value_name = "MS", conflicts_with = "record",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) heartbeat_ms: u64,
    /// Serve the machine's virtio-net device (a Linux guest booted with
    /// `mode=linux devices=net,...`) from TAP device NAME, already created
    /// and on the guest network's bridge, its NIC with MAC. Under
    /// replication the frames the guest transmits are held until their
    /// epoch commits on the backup (output commit); the backup runs
    /// `doppel backup --net` with its own TAP and the same MAC.
    #[arg(long, value_name = "tap=NAME,mac=MAC", value_parser = doppel::dm::parse_net,
          conflicts_with = "record")]
    pub(crate) net: Option<doppel::dm::NetSpec>,
    /// Serve the machine's virtio-blk device from this file. Every write
    /// is applied here at once and shipped in its epoch; the backup
    /// applies it to its copy (`doppel backup --disk`) only when the
    /// epoch commits. The first epoch carries the whole disk.
    #[arg(long, value_name = "PATH", conflicts_with = "record")]
    pub(crate) disk: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) witness: crate::witness_cli::WitnessArgs,
    #[command(flatten)]
    pub(crate) tls: crate::linkcli::TlsArgs,
    #[command(flatten)]
    pub(crate) ops: crate::opscli::OpsArgs,
    #[command(flatten)]
    #[allow(dead_code)] // read before clap parses (config::expand)
    pub(crate) config: crate::config::ConfigArg,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Address to accept the primary's connection on (host:port; port 0
    /// picks a free port). The bound address is printed as
    /// `listening on ADDR`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: String,
    /// Directory of the replica: `memory.img` (guest memory),
    /// `memory.img.state` (vCPU blob, TSC info, params, committed epochs),
    /// `memory.img.journal` during a commit. Must not hold committed epochs
    /// already (exit code 2).
    #[arg(long, value_name = "DIR", required_unless_present = "standby_ram")]
    pub(crate) replica: Option<PathBuf>,
    /// Guest size in 4 KiB pages (1 to 2^32); pfns at or above it are
    /// refused, and epoch 0 must carry every one of them.
    #[arg(long, value_name = "N", required_unless_present = "standby_ram",
          value_parser = guest_pages_parser())]
    pub(crate) guest_pages: Option<u64>,
    /// Instead of a file replica: a standby hypervisor's machine RAM file
    /// (control area with the STANDBY feature). Committed epochs are
    /// written into its guest RAM; when the primary is lost the last
    /// committed vCPU state is written and the standby activated.
    /// Requires --serve-clients.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["replica", "guest_pages"], requires = "serve_clients")]
    pub(crate) standby_ram: Option<PathBuf>,
    /// With --standby-ram (and required by it): after failover, serve the
    /// service's clients on this address (bound at startup, printed as
    /// `clients on ADDR`; connections are accepted only once the standby
    /// is active).
    #[arg(long, value_name = "ADDR", requires = "standby_ram")]
    pub(crate) serve_clients: Option<String>,
    /// With --standby-ram: once activated, protect the service in its turn
    /// to the backup listening at ADDR (another `doppel backup
    /// --standby-ram`), exactly as `doppel primary --backup ADDR
    /// --serve-clients` would: a chain A -> B -> C, where this standby is
    /// B. Its clients are served once the new backup is connected and
    /// log-dirty is on; their replies then wait for commit, as at any
    /// primary. Default heartbeats and timeouts of `doppel primary`.
    #[arg(long, value_name = "ADDR", requires = "standby_ram")]
    pub(crate) then_backup: Option<String>,
    /// With --standby-ram: fail over when nothing (not even a heartbeat)
    /// arrives from the primary for this long (0.001 to 604800 s).
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_secs,
          conflicts_with = "replica")]
    pub(crate) heartbeat_timeout: Duration,
    /// With --standby-ram: the backup's copy of the guest's disk, an
    /// existing file of the primary's disk size (e.g. `truncate -s SIZE
    /// FILE`), opened read-write. Epoch 0 (the initial sync) overwrites it
    /// whole; every later epoch's disk writes are applied only when that
    /// epoch commits (then fdatasync), so the file always holds the last
    /// committed epoch's disk, never part of an epoch. A disk write beyond
    /// its size is refused (exit 1, naming both sizes) and the standby is
    /// not activated.
    #[arg(long, value_name = "FILE", requires = "standby_ram")]
    pub(crate) disk: Option<PathBuf>,
    /// With --standby-ram: at failover, serve the standby's virtio-net
    /// device from TAP device NAME (on the same bridge as the primary's,
    /// down until then) with the primary's MAC. The device model is
    /// rebuilt from the last committed epoch's device state (with the
    /// disk copy of --disk behind its virtio-blk), announces the MAC
    /// (RARP, as after a migration) so the bridge sends the guest's
    /// traffic here, and only then is the standby activated.
    #[arg(long, value_name = "tap=NAME,mac=MAC", value_parser = doppel::dm::parse_net,
          requires = "standby_ram")]
    pub(crate) net: Option<doppel::dm::NetSpec>,
    /// With --standby-ram: seconds to wait for the standby's control area.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = secs_u64(),
          conflicts_with = "replica")]
    pub(crate) wait_control: u64,
    /// With --standby-ram: seconds to wait for the answer to Activate.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = secs_u64(),
          conflicts_with = "replica")]
    pub(crate) reply_timeout: u64,
    /// Seconds to wait for the primary to connect.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = secs_u64())]
    pub(crate) accept_timeout: u64,
    /// Refuse the primary's request for compressed page records (it then
    /// sends plain PAGE_DATA).
    #[arg(long)]
    pub(crate) no_compress: bool,
    /// With --standby-ram: activate only after taking the witness key.
    #[command(flatten)]
    pub(crate) witness: crate::witness_cli::WitnessArgs,
    #[command(flatten)]
    pub(crate) tls: crate::linkcli::TlsArgs,
    #[command(flatten)]
    pub(crate) ops: crate::opscli::OpsArgs,
    #[command(flatten)]
    #[allow(dead_code)] // read before clap parses (config::expand)
    pub(crate) config: crate::config::ConfigArg,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["machine_ram", "replica"])))]
pub struct InspectArgs {
    /// A machine RAM file: print the control area and the guest RAM
    /// location (`guest_ram offset ... size ...`).
    #[arg(long, value_name = "FILE")]
    pub(crate) machine_ram: Option<PathBuf>,
    /// With --machine-ram: write the HVM context blob of the last
    /// checkpoint posted on the event ring to this file.
    #[arg(long, value_name = "FILE", requires = "machine_ram")]
    pub(crate) last_vcpu_out: Option<PathBuf>,
    /// A replica directory: print its committed epochs, and whether a
    /// commit is under way or a backup holds it. Read-only: safe while a
    /// backup is writing the replica.
    #[arg(long, value_name = "DIR")]
    pub(crate) replica: Option<PathBuf>,
    /// With --replica: write its committed HVM context blob to this file.
    #[arg(long, value_name = "FILE", requires = "replica")]
    pub(crate) vcpu_out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    /// The machine RAM file to create.
    #[arg(long, value_name = "FILE")]
    pub(crate) machine_ram: PathBuf,
    /// Checkpoints to post.
    #[arg(long, default_value_t = 5)]
    pub(crate) epochs: u64,
    /// Guest size in pages (1 to 2^20: up to 4 GiB, the file is mapped).
    #[arg(long, default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub(crate) guest_pages: u64,
    /// Pages dirtied per epoch (at most --guest-pages).
    #[arg(long, default_value_t = 40)]
    pub(crate) dirty: u64,
    /// Seed of the fake guest.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Run the protected service instead of the fake guest: a key-value
    /// service in guest RAM, fed from the input channel, its replies held
    /// until their epoch is committed. Runs until killed (or --max-secs).
    #[arg(long, value_parser = ["kv"])]
    pub(crate) service: Option<String>,
    /// Keys of the service (each on its own guest page; 1 to 4096, and
    /// fewer than --guest-pages).
    #[arg(long, default_value_t = 16, value_name = "K",
          value_parser = clap::value_parser!(u64).range(1..=u64::from(doppel_abi::service::MAX_KEYS)))]
    pub(crate) keys: u64,
    /// With --service: end an epoch every this many ms (1 to 60000).
    #[arg(long, default_value_t = 50, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) epoch_ms: u64,
    /// A standby for the service: publish a STANDBY control area, wait for
    /// Activate, then serve the service from the state in guest RAM.
    #[arg(long)]
    pub(crate) standby: bool,
    /// With --service / --standby: stop after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub(crate) max_secs: u64,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The service's address (`doppel primary --serve-clients`).
    #[arg(long, value_name = "ADDR")]
    pub(crate) connect: String,
    /// Where to go when the first address breaks or goes silent (`doppel
    /// backup --serve-clients`); unanswered requests are re-sent there.
    /// More than one (repeated, or comma-separated): tried in order, one
    /// per failover (a chain: the backup, then the backup's own backup).
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    pub(crate) failover: Vec<String>,
    /// Requests to send (ids 1..=N; N from 1 to 1000000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_OPS))]
    pub(crate) ops: u64,
    /// Most unanswered requests (1..=32, the service's replay window).
    #[arg(long, default_value_t = 8, value_name = "W",
          value_parser = clap::value_parser!(u64).range(1..=doppel_abi::service::REPLAY_WINDOW))]
    pub(crate) window: u64,
    /// Keys used (random PUT / ADD on keys below K; 1 to 4096, the
    /// service's limit).
    #[arg(long, default_value_t = 16, value_name = "K",
          value_parser = clap::value_parser!(u64).range(1..=u64::from(doppel_abi::service::MAX_KEYS)))]
    pub(crate) keys: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Fail over when no reply arrives for this long while requests are
    /// outstanding (0.001 to 604800 s).
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_secs)]
    pub(crate) reply_timeout: Duration,
    /// Keep trying to connect (to each address) for this long (0.001 to
    /// 604800 s).
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_secs)]
    pub(crate) connect_timeout: Duration,
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
