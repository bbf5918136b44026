//! `doppel backup`: receive the stream into a replica directory, or into
//! a standby machine that takes over (takeover::decide) when the primary
//! is lost.

use std::io::{BufReader, IsTerminal, Write};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use doppel::backup::{self, ReceiveError};
use doppel::bridge::{self, BridgeStats};
use doppel::dm::{self, DeviceModel};
use doppel::primary::PrimaryConfig;
use doppel::replica::{Replica, ReplicaError};
use doppel::standby::Standby;
use doppel::stream::format::feature;
use doppel::takeover::{self, Takeover};
use doppel::telemetry::{self, Committed, Role, Shipped, State};

use crate::args::BackupArgs;
use crate::cli::{bind_listen, client_side, find_control, open_machine_waiting};
use crate::exit::{Res, INVALID, IO, PEER_GONE, USAGE};

pub fn backup(a: BackupArgs) -> Res {
    let _ops = a.ops.start(Role::Backup)?;
    let r = backup_inner(a);
    telemetry::global().set_state(State::Stopping);
    r
}

pub(crate) fn backup_inner(a: BackupArgs) -> Res {
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
    let got = crate::linkcli::serve_until_accepted(
        &l,
        a.accept_timeout,
        tls.as_ref(),
        a.tls.handshake(),
        |link, nonce| {
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

/// A committed epoch, for the status and metrics.
pub(crate) fn backup_epoch(s: &backup::EpochStats) {
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
pub(crate) struct Progress {
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
pub(crate) fn standby_backup(a: BackupArgs) -> Res {
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    let path = a.standby_ram.as_deref().expect("checked by the caller");
    let tls = a.tls.load("backup")?;
    let wait = Duration::from_secs(a.wait_control);
    let m = open_machine_waiting(path, wait)?;
    let ctl = find_control(&m, wait)?;
    let mut standby = Standby::new(&m, ctl).map_err(|e| (e.to_string(), INVALID))?;
    if let Some(p) = &a.disk {
        standby = standby.with_disk(open_disk(p)?);
    }
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
    let got = crate::linkcli::serve_until_accepted(
        &l,
        a.accept_timeout,
        tls.as_ref(),
        a.tls.handshake(),
        |link, nonce| {
            link.socket()
                .set_read_timeout(Some(hb))
                .map_err(io("socket".into()))?;
            let (conn, ack_out) = link.split();
            let mut disk_total = 0u64;
            let got = backup::serve_session(
                BufReader::with_capacity(1 << 20, conn),
                ack_out,
                &mut standby,
                offer,
                nonce,
                |s| {
                    disk_total = disk_total.saturating_add(s.disk_bytes);
                    tracing::info!(
                        "backup: committed epoch {} pages={} bytes={} disk_bytes={} \
                         disk_applied={disk_total}",
                        s.epoch,
                        s.pages,
                        s.bytes,
                        s.disk_bytes
                    );
                    backup_epoch(s);
                },
            );
            Ok(got)
        },
        |got| got.as_ref().is_ok_and(crate::linkcli::session_refused),
    )?;
    let committed = standby.committed();
    if let Some(d) = standby.disk() {
        println!(
            "backup: disk copy {} at the last committed epoch ({} of {} bytes applied)",
            a.disk.as_deref().unwrap_or(path).display(),
            d.applied(),
            d.size()
        );
    }
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
    // The devices first: restored from the committed epoch's state into
    // the standby's device-model area, the MAC announced on this side's
    // TAP; they serve once the standby runs.
    let devices = restore_devices(&a, path, &standby, wait)?;
    let (epoch, activated) = standby
        .activate_attached(cfg)
        .map_err(|e| (e.to_string(), INVALID))?;
    println!(
        "failover: primary lost ({reason}) after epoch {last}; standby activated from committed epoch {epoch}"
    );
    let _devices = devices.map(|dm| {
        std::thread::spawn(move || {
            let mut dm = dm;
            let never = AtomicBool::new(false);
            let why = dm.serve(&never, Duration::from_secs(5));
            println!("{}", dm.stats());
            tracing::info!("devices: stopped ({why:?})");
        })
    });
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

/// `--disk FILE`: the backup's disk copy, which must exist (the initial
/// sync overwrites it) and be non-empty.
fn open_disk(p: &std::path::Path) -> Result<backup::DiskCopy, (String, u8)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(|e| {
            (
                format!(
                    "--disk {}: {e} (the disk copy must exist, with the primary's disk size: \
                     create it with `truncate -s SIZE {}`)",
                    p.display(),
                    p.display()
                ),
                IO,
            )
        })?;
    let d =
        backup::DiskCopy::new(f, p).map_err(|e| (format!("--disk {}: {e}", p.display()), IO))?;
    if d.size() == 0 {
        return Err((
            format!(
                "--disk {}: the file is empty; give it the primary's disk size \
                 (`truncate -s SIZE {}`)",
                p.display(),
                p.display()
            ),
            USAGE,
        ));
    }
    tracing::info!("disk copy {} ({} bytes)", p.display(), d.size());
    Ok(d)
}

/// `--net`/`--disk` at failover: the device model rebuilt from the last
/// committed epoch's device state over the standby's device-model area,
/// this side's TAP (same MAC) announced; `None` without them.
fn restore_devices(
    a: &BackupArgs,
    path: &std::path::Path,
    standby: &Standby<'_>,
    wait: Duration,
) -> Result<Option<DeviceModel>, (String, u8)> {
    if a.net.is_none() && a.disk.is_none() {
        return Ok(None);
    }
    let blob = standby.committed_device_state().ok_or((
        "--net/--disk: the primary committed no device state (was it run with --net/--disk?); \
         the standby is not activated"
            .to_string(),
        INVALID,
    ))?;
    let ram = open_machine_waiting(path, wait)?;
    let never = AtomicBool::new(false);
    let fail = |e: dm::DmError| (format!("devices: {e}"), INVALID);
    let area = dm::wait_for_area(ram, wait, Duration::from_secs(5), &never).map_err(fail)?;
    let backends = dm::Backends {
        net: a.net.clone(),
        disk: a.disk.clone(),
    };
    let mut model = DeviceModel::restore(area, &backends, blob).map_err(fail)?;
    model.announce();
    tracing::info!(
        "devices: restored from the committed device state ({} bytes); MAC announced",
        blob.len()
    );
    Ok(Some(model))
}
