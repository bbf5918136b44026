//! `doppel primary`: open the machine, connect (or record), protect the
//! guest and serve its clients.

use std::fs::File;
use std::io::{BufWriter, IsTerminal};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use doppel::bridge::{self, BridgeStats};
use doppel::devices::DeviceThread;
use doppel::primary::{Output, Primary};
use doppel::protect::{self, ProtectOpts};
use doppel::telemetry::{self, Role, State};

use crate::args::PrimaryArgs;
use crate::cli::{
    client_side, find_control, open_machine_waiting, progress_printer, stop_on_signals, ClientSide,
};
use crate::exit::{Res, IO};

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
    let mut p = Primary::attach(&m, ctl, cfg).map_err(|e| (e.to_string(), e.exit_code()))?;
    // The guest's devices, served from a thread of this tool once the
    // hypervisor publishes their area (it may do so only after log-dirty
    // is on: the Linux guest starts then).
    let devices = (a.net.is_some() || a.disk.is_some())
        .then(|| {
            let ram = open_machine_waiting(&a.machine_ram, wait)?;
            let backends = doppel::dm::Backends {
                net: a.net.clone(),
                disk: a.disk.clone(),
            };
            Ok::<_, (String, u8)>(std::sync::Arc::new(DeviceThread::start(
                ram,
                backends,
                wait,
                Duration::from_secs(5),
            )))
        })
        .transpose()?;
    if let Some(d) = &devices {
        p.set_devices(d.clone());
    }
    let clients = match &a.serve_clients {
        Some(addr) => Some(client_side(&m, &ctl, addr, false)?),
        None => None,
    };
    let r = protect_attached(&a, p, clients, tls.map(std::sync::Arc::new));
    if let Some(d) = devices {
        println!("{}", d.stats());
        if let Some(why) = d.failed() {
            tracing::warn!("devices: {why}");
        }
    }
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
