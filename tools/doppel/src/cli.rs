//! What `doppel primary` and `backup` share (the machine, the client
//! side, signals, the listening socket), and `doppel client`, `inspect`
//! and the hidden `sim-hv`.

use std::io::{IsTerminal, Write};
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use doppel::client::ClientConfig;
use doppel::kv::{Checker, Workload};
use doppel::machine::{Control, MachineError, MachineRam};
use doppel::primary::EpochReport;
use doppel::replica::{Journal, Replica};
use doppel::sim::{Sim, SimSpec};
use doppel::sim_kv::{KvSim, KvSpec};
use doppel_abi::chan::{ChannelConsumer, ChannelProducer};
use doppel_abi::control::{Features, Field};
use doppel_abi::{AtomicMem64, SharedMem};

use crate::args::{ClientArgs, InspectArgs, SimArgs};
use crate::exit::{Res, INVALID, IO, PEER_GONE, USAGE};

pub(crate) fn machine_err(e: MachineError) -> (String, u8) {
    let code = match e {
        MachineError::Io { .. } => IO,
        _ => INVALID,
    };
    (e.to_string(), code)
}

pub(crate) fn find_control(m: &MachineRam, wait: Duration) -> Result<Control, (String, u8)> {
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

pub(crate) fn progress_printer() -> impl FnMut(&EpochReport) {
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
pub(crate) fn open_machine_waiting(
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
pub(crate) fn client_side<'m>(
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
pub(crate) fn stop_on_signals() -> Result<std::sync::Arc<AtomicBool>, (String, u8)> {
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, std::sync::Arc::clone(&flag))
            .and_then(|_| signal_hook::flag::register(sig, std::sync::Arc::clone(&flag)))
            .map_err(|e| (format!("installing the signal handler: {e}"), IO))?;
    }
    Ok(flag)
}

/// Bind the replication address and print `listening on ADDR`.
pub(crate) fn bind_listen(addr: &str) -> Result<TcpListener, (String, u8)> {
    let io = |what: String| move |e: std::io::Error| (format!("{what}: {e}"), IO);
    let l = TcpListener::bind(addr).map_err(io(format!("binding {addr}")))?;
    let local = l.local_addr().map_err(io(addr.into()))?;
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    Ok(l)
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
