//! The in-machine replica (test only, `mode=replica`): proof of the
//! replication data path where the dom0 tool cannot reach (Bochs cannot
//! share its RAM with a host process).
//!
//! The key-value service runs as a replicated primary over a published
//! control area and the same engine as always ([`super::replicate`]). The
//! tool's part is played here, on the same CPU, over the same rings and
//! channels (hv/abi's tool-side ends: [`CommandFront`], [`EventBack`], the
//! input producer and the output consumer): `LogDirtyEnable` with the
//! chosen tracker; at every epoch end the checkpoint is taken (pfns, pages
//! and the vCPU record copied into a shadow of the guest's RAM that the
//! hypervisor allocated and never maps for the guest), acknowledged and
//! committed (`CommitEpoch`), exactly as `doppel primary` does. The guest
//! is still stopped then, so the shadow must equal its memory page for
//! page, and the record must equal its vCPU byte for byte: both are
//! compared at every epoch. A client plays the service's user meanwhile
//! (requests into the input channel, every released reply checked against
//! its own model of the state, as `doppel-client` does).
//!
//! After `epochs` epochs the primary fails over inside the machine: its
//! vCPU is destroyed, the engine detached (the guest runs unprotected, as
//! an activated standby does), the guest's RAM rewritten from the shadow
//! and a new vCPU built from the last committed record; the service then
//! answers more requests, each checked, and the run ends with
//! `replica: backend=.. mode=.. epochs=.. pages_compared=.. mismatches=..
//! vcpu_blob=equal|differs failover=ok|failed .. result=pass|fail`.

use alloc::vec;
use alloc::vec::Vec;

use doppel_abi::chan::{ChannelConsumer, ChannelError, ChannelProducer};
use doppel_abi::control::Field;
use doppel_abi::guest::{MAX_RECORD, PAGE_SIZE, PROGRAM_KV};
use doppel_abi::msg::{Ack, Command, Event, LogDirtyMode, Reply as Answer, Span};
use doppel_abi::service::{self, apply, checksum, op, Reply, Request};
use doppel_abi::splitmix::mix64;
use doppel_abi::{AtomicMem, AtomicMem64, CommandFront, EventBack, SharedMem};
use doppel_core::addr::HostPhysAddr;
use doppel_core::dirtylog::DirtyTree;
use doppel_core::engine::{EpochClock, Recv, Role};
use doppel_core::hvm::{self, VcpuState};
use doppel_core::paging::NestedEntry;
use doppel_core::selftest::Mode;
use zerocopy::IntoBytes;

use super::guest::{self, GuestRam, Workload};
use super::linux::{EpochNext, LinuxEpochs};
use super::replicate::{checkpoint_header, said, tracker, Binding, Context, Engine};
use super::run::{run_mode, EpochEnd, EpochSink, Plan};
use super::vcpu::{GuestStart, Vcpu};
use crate::arch::instr::rdtsc;
use crate::console;

type Rings = AtomicMem<'static>;

/// Requests the client keeps unanswered at most.
const IN_FLIGHT: u64 = 4;
/// Replies checked after the failover before the run ends.
const AFTER_FAILOVER: u64 = 24;
/// Differing pages named in the log at most.
const SHOWN: u64 = 8;

/// Run the key-value service replicated to the in-machine replica with
/// tracker `mode` (one of `offered`), then fail over to the replica.
/// `make_vcpu` builds the primary's vCPU, `restore` the failed-over one
/// from a vCPU record. True when every epoch compared equal and the
/// service answered correctly after the failover.
pub fn replica<E, V, F, G>(
    plan: &Plan,
    vmmcall: bool,
    offered: &[LogDirtyMode],
    mode: LogDirtyMode,
    make_vcpu: F,
    restore: G,
) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&GuestStart, HostPhysAddr, Mode) -> Result<V, &'static str>,
    G: FnOnce(&VcpuState, HostPhysAddr) -> Result<V, &'static str>,
{
    said(
        "replica",
        replica_inner::<E, V, F, G>(plan, vmmcall, offered, mode, make_vcpu, restore),
    )
}

fn replica_inner<E, V, F, G>(
    plan: &Plan,
    vmmcall: bool,
    offered: &[LogDirtyMode],
    mode: LogDirtyMode,
    make_vcpu: F,
    restore: G,
) -> Result<bool, &'static str>
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&GuestStart, HostPhysAddr, Mode) -> Result<V, &'static str>,
    G: FnOnce(&VcpuState, HostPhysAddr) -> Result<V, &'static str>,
{
    let mut ram = GuestRam::new(plan.mem_bytes).map_err(|_| "no memory for the guest")?;
    let workload = Workload {
        patterns: plan.patterns,
        epochs: plan.epochs,
        seed: plan.seed,
        vmmcall,
        program: PROGRAM_KV,
        keys: plan.keys,
    };
    let start = guest::load(&mut ram, &workload).map_err(|_| "loading the guest")?;
    let mut bind = Binding::publish(&ram, Role::Service, plan.epoch_exits)?;
    bind.engine.offer_modes(offered);
    let mut tool = Tool::attach(&bind, plan.mem_bytes, plan.keys)?;
    tool.expect_done(&mut bind.engine, Command::LogDirtyEnable { mode })?;
    let tracked = tracker(bind.engine.log_dirty_mode());
    let mut table = ram
        .nested_table::<E>()
        .map_err(|_| "building the nested page table")?;
    let mut vcpu = make_vcpu(&start, table.root(), tracked)?;
    log::info!(
        "replica: the in-machine replica enabled log-dirty (mode={}); shadow of {} pages",
        tracked.name(),
        ram.pages()
    );
    let mut sink = ReplicaSink {
        bind,
        tool,
        epochs: u64::from(plan.epochs),
        failed_over: None,
        consumer_cycles: None,
    };
    let ran = run_mode(&mut ram, &mut table, &mut vcpu, tracked, plan, &mut sink)?;
    let backend = vcpu.backend();
    let mut failover = ran && sink.tool.error.is_none();
    if failover {
        // The primary fails: its vCPU and nested table go; the replica's
        // shadow and last committed record are all that is left.
        drop(vcpu);
        drop(table);
        failover = fail_over::<E, V, G>(&mut ram, &mut sink, plan, restore)?;
    }
    let t = &sink.tool;
    let equal = t.blob_mismatches == 0 && t.restored_blob;
    let pass = t.mismatches == 0 && equal && failover && t.error.is_none();
    console::print(format_args!(
        "replica: backend={backend} mode={} epochs={} pages_compared={} mismatches={} \
         vcpu_blob={} failover={} replies={} reply_errors={} tracking_exits={} dirty_pages={} \
         result={}\n",
        tracked.name(),
        t.epochs,
        t.pages_compared,
        t.mismatches,
        if equal { "equal" } else { "differs" },
        if failover { "ok" } else { "failed" },
        t.client.verified,
        t.client.errors,
        t.tracking_exits,
        t.dirty_pages,
        if pass { "pass" } else { "fail" },
    ));
    Ok(pass)
}

/// Fail over to the replica: guest RAM rewritten from the shadow, a vCPU
/// from the last committed record, the engine detached (the guest runs
/// unprotected); then the service answers [`AFTER_FAILOVER`] more
/// requests. True when it did, every answer right.
fn fail_over<E, V, G>(
    ram: &mut GuestRam,
    sink: &mut ReplicaSink,
    plan: &Plan,
    restore: G,
) -> Result<bool, &'static str>
where
    E: NestedEntry,
    V: Vcpu,
    G: FnOnce(&VcpuState, HostPhysAddr) -> Result<V, &'static str>,
{
    let tool = &mut sink.tool;
    let state = tool.committed_state()?;
    tool.take_over(ram, &mut sink.bind.engine)?;
    let mut table = ram
        .nested_table::<E>()
        .map_err(|_| "building the nested page table")?;
    let mut vcpu = restore(&state, table.root())?;
    // The new vCPU must be the committed record, byte for byte.
    tool.restored_blob = tool.blob_matches(&vcpu_context(&vcpu.state(), tool.vcpu_area)?);
    if !tool.restored_blob {
        log::warn!("replica: the restored vCPU's record differs from the committed one");
    }
    log::info!(
        "replica: failed over to the replica at committed epoch {}; the guest resumes at rip={:#x}",
        tool.committed.unwrap_or(0),
        state.rip
    );
    sink.failed_over = Some(tool.client.verified);
    let ran = run_mode(ram, &mut table, &mut vcpu, Mode::WriteProtect, plan, sink)?;
    let t = &sink.tool;
    Ok(ran
        && t.error.is_none()
        && t.client.errors == 0
        && sink
            .failed_over
            .is_some_and(|at| t.client.verified >= at + AFTER_FAILOVER))
}

/// The run's sink: the engine's binding, with the replica acting after
/// every epoch end and whenever the guest idles.
struct ReplicaSink {
    bind: Binding,
    tool: Tool,
    /// Epochs to replicate before the failover.
    epochs: u64,
    /// After the failover: replies verified at that point.
    failed_over: Option<u64>,
    /// TSC cycles the replica spent in the last epoch end.
    consumer_cycles: Option<u64>,
}

impl EpochSink for ReplicaSink {
    fn start(&mut self, log: &DirtyTree, ram: &GuestRam) -> Result<(), &'static str> {
        self.bind.start(log, ram)
    }

    fn epoch_end(&mut self, e: &EpochEnd<'_>) -> Result<(), &'static str> {
        let replicating = self.bind.engine.replicating();
        self.bind.epoch_end(e)?;
        if !replicating {
            return Ok(());
        }
        if self.tool.epochs > 0 {
            self.tool.tracking_exits += e.exits;
        }
        let began = rdtsc();
        self.tool.take_checkpoint(&mut self.bind.engine)?;
        self.tool
            .compare(e.ram, &vcpu_context(&e.vcpu, self.tool.vcpu_area)?)?;
        self.tool.client_step()?;
        self.consumer_cycles = Some(rdtsc().wrapping_sub(began));
        Ok(())
    }

    fn resumed(&mut self, pause: Option<u64>) {
        self.bind.resumed(pause);
        // The replica's own work (copy, compare, client) runs inside the
        // pause here, on the same CPU; a real tool's runs beside the
        // guest. What the hypervisor itself paused the guest for is the
        // rest.
        if let (Some(p), Some(c)) = (pause, self.consumer_cycles.take()) {
            log::info!(
                "replica: epoch={} pause_cycles={p} consumer_cycles={c} hv_pause_cycles={}",
                self.tool.committed.unwrap_or(0),
                p.saturating_sub(c)
            );
        }
    }

    fn pause_measured(&mut self, cycles: u64) {
        self.bind.pause_measured(cycles);
    }

    fn checkpoint_at_stop(&self) -> bool {
        self.bind.checkpoint_at_stop()
    }

    fn recv(&mut self, dst: &mut [u8]) -> Result<Recv, &'static str> {
        self.bind.recv(dst)
    }

    fn send(&mut self, record: &[u8]) -> Result<bool, &'static str> {
        self.bind.send(record)
    }

    fn poll(&mut self) -> Result<(), &'static str> {
        self.bind.poll()?;
        self.tool.client_step()
    }

    fn exited(&mut self) {
        self.bind.exited();
    }

    fn epoch_due(&self, clock: &EpochClock) -> bool {
        self.bind.epoch_due(clock)
    }

    fn tracking(&self) -> bool {
        self.bind.tracking()
    }

    fn finished(&self) -> bool {
        if self.tool.error.is_some() {
            return true;
        }
        match self.failed_over {
            None => self.tool.epochs >= self.epochs,
            Some(at) => self.tool.client.verified >= at + AFTER_FAILOVER,
        }
    }
}

/// The in-machine replica of a Linux guest (`mode=linux tracker=..`):
/// the Linux run loop ([`super::linux`]) ends an epoch every
/// `epoch_exits` exits with the guest stopped, hands the harvest and the
/// whole machine's HVM context here, and the replica takes the
/// checkpoint over the real rings exactly as for the key-value service
/// ([`Tool`]), then compares its shadow with the guest's RAM and the
/// committed context with the machine's. After `epochs` epochs it fails
/// over: [`LinuxReplica::fail_over`] rewrites the guest's RAM from the
/// shadow and returns the committed context, from which the run loop
/// rebuilds the vCPU and the platform; Linux must then finish its
/// transcript and power off.
pub(super) struct LinuxReplica {
    bind: Binding,
    tool: Tool,
    mode: Mode,
    epochs: u64,
    failover: Failover,
    /// TSC cycles the replica's own work took in the last epoch end.
    consumer_cycles: u64,
}

/// Where the failover stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failover {
    NotYet,
    /// The guest runs from the replica's last committed epoch.
    Done {
        epoch: u64,
    },
    Failed,
}

impl LinuxReplica {
    /// Publish the control area for `ram` (whose boot image is loaded),
    /// attach the replica and have it enable log-dirty with `mode`, one
    /// of `offered`. The run loop tracks with [`LinuxReplica::tracker`].
    pub(super) fn start(
        ram: &GuestRam,
        offered: &[LogDirtyMode],
        mode: LogDirtyMode,
        epoch_exits: u64,
        epochs: u64,
    ) -> Result<Self, &'static str> {
        let mut bind = Binding::publish(ram, Role::Workload, Some(epoch_exits.max(1)))?;
        bind.engine.offer_modes(offered);
        let mut tool = Tool::attach(&bind, ram.bytes(), 1)?;
        tool.expect_done(&mut bind.engine, Command::LogDirtyEnable { mode })?;
        let mode = tracker(bind.engine.log_dirty_mode());
        log::info!(
            "replica: the in-machine replica of the Linux guest enabled log-dirty (mode={}); \
             an epoch every {epoch_exits} exits, failover after {epochs}; shadow of {} pages",
            mode.name(),
            ram.pages()
        );
        Ok(Self {
            bind,
            tool,
            mode,
            epochs,
            failover: Failover::NotYet,
            consumer_cycles: 0,
        })
    }
}

impl LinuxEpochs for LinuxReplica {
    /// The tracker the run loop must use.
    fn tracker(&self) -> Mode {
        self.mode
    }

    /// The guest exited: whether its epoch ends here (before the next
    /// entry). Never after the failover (the guest runs unprotected).
    fn exited(&mut self, guest_tsc: u64) -> bool {
        if self.failover != Failover::NotYet {
            self.bind.engine.beat();
            return false;
        }
        // The engine's epoch policy decides, as for every replicated guest.
        self.bind.exit_ends_epoch(guest_tsc)
    }

    /// An epoch ended with the guest stopped: checkpoint `harvest`'s pages
    /// of `ram` and `context` (the machine as it resumes), have the
    /// replica take and commit it, and compare. `exits` are the epoch's
    /// tracking exits. True when the failover is due now.
    fn epoch_end(
        &mut self,
        harvest: &[u8],
        ram: &GuestRam,
        context: &[u8],
        exits: u64,
    ) -> Result<EpochNext, &'static str> {
        self.bind
            .checkpoint(harvest, ram, Context::Machine(context), "linux", exits)?;
        if self.tool.epochs > 0 {
            self.tool.tracking_exits += exits;
        }
        let began = rdtsc();
        self.tool.take_checkpoint(&mut self.bind.engine)?;
        self.tool.compare(ram, context)?;
        self.consumer_cycles = rdtsc().wrapping_sub(began);
        Ok(if self.tool.epochs >= self.epochs {
            EpochNext::FailOver
        } else {
            EpochNext::Track
        })
    }

    /// The guest resumes after an epoch end that held it `pause` TSC
    /// cycles: log them, and the hypervisor's share (the replica's work
    /// runs inside the pause here, on the same CPU; a real tool's runs
    /// beside the guest).
    fn resumed(&mut self, pause: u64) {
        let c = core::mem::take(&mut self.consumer_cycles);
        log::info!(
            "replica: epoch={} pause_cycles={pause} consumer_cycles={c} hv_pause_cycles={}",
            self.tool.committed.unwrap_or(0),
            pause.saturating_sub(c)
        );
    }

    /// Fail over: the primary's RAM is rewritten from the shadow, the
    /// engine detached; the last committed context, to rebuild the vCPU
    /// and platform from.
    fn fail_over(&mut self, ram: &mut GuestRam) -> Result<Vec<u8>, &'static str> {
        self.failover = Failover::Failed;
        self.tool.take_over(ram, &mut self.bind.engine)?;
        let epoch = self.tool.committed.ok_or("no epoch was committed")?;
        log::info!("replica: failed over to the replica at committed epoch {epoch}");
        self.failover = Failover::Done { epoch };
        Ok(self.tool.blob.clone())
    }

    /// The rebuilt machine, saved again at the instant it was rebuilt:
    /// it must be the committed context byte for byte.
    fn rebuilt(&mut self, context: &[u8]) {
        self.tool.restored_blob = self.tool.blob_matches(context);
        if !self.tool.restored_blob {
            log::warn!("replica: the rebuilt machine's records differ from the committed ones");
        }
    }

    /// Print the verdict line; true when it passes (`powered_off`: Linux
    /// finished its run cleanly after the failover).
    fn report(&self, backend: &str, powered_off: bool) -> bool {
        let t = &self.tool;
        let equal = t.blob_mismatches == 0 && t.restored_blob;
        let failover = matches!(self.failover, Failover::Done { .. }) && powered_off;
        let pass = t.mismatches == 0 && equal && failover;
        let at = match self.failover {
            Failover::Done { epoch } => epoch,
            _ => 0,
        };
        console::print(format_args!(
            "replica: backend={backend} guest=linux mode={} epochs={} pages_compared={} \
             mismatches={} vcpu_blob={} failover={} at_epoch={at} tracking_exits={} \
             dirty_pages={} result={}\n",
            self.mode.name(),
            t.epochs,
            t.pages_compared,
            t.mismatches,
            if equal { "equal" } else { "differs" },
            if failover { "ok" } else { "failed" },
            t.tracking_exits,
            t.dirty_pages,
            if pass { "pass" } else { "fail" },
        ));
        pass
    }
}

/// The tool's part, in the machine.
struct Tool {
    cmd: CommandFront<Rings>,
    evt: EventBack<Rings>,
    input: ChannelProducer<Rings>,
    output: ChannelConsumer<Rings>,
    bulk: AtomicMem64<'static>,
    /// Bytes of the vCPU area (room for an encoded record).
    vcpu_area: usize,
    next_id: u32,
    /// The guest's RAM as of the last committed epoch: frames of the
    /// hypervisor's, never mapped for the guest.
    shadow: GuestRam,
    /// The last committed vCPU record.
    blob: Vec<u8>,
    committed: Option<u64>,
    epochs: u64,
    pages_compared: u64,
    mismatches: u64,
    blob_mismatches: u64,
    restored_blob: bool,
    tracking_exits: u64,
    dirty_pages: u64,
    client: Client,
    /// What went wrong on the client's side (the run stops there).
    error: Option<&'static str>,
}

impl Tool {
    fn attach(bind: &Binding, mem_bytes: u64, keys: u32) -> Result<Self, &'static str> {
        let v = &bind.views;
        let region = |f: Field| v.view.region(f);
        let (co, cs) = region(Field::CommandRing);
        let (eo, es) = region(Field::EventRing);
        let (io, is) = region(Field::InputChannel);
        let (oo, os) = region(Field::OutputChannel);
        Ok(Self {
            cmd: CommandFront::attach(v.rings, co, cs).map_err(|_| "replica: command ring")?,
            evt: EventBack::attach(v.rings, eo, es).map_err(|_| "replica: event ring")?,
            input: ChannelProducer::attach(v.rings, io, is)
                .map_err(|_| "replica: input channel")?,
            output: ChannelConsumer::attach(v.rings, oo, os)
                .map_err(|_| "replica: output channel")?,
            bulk: v.bulk,
            vcpu_area: region(Field::VcpuArea).1,
            next_id: 0,
            shadow: GuestRam::new(mem_bytes).map_err(|_| "no memory for the shadow")?,
            blob: Vec::new(),
            committed: None,
            epochs: 0,
            pages_compared: 0,
            mismatches: 0,
            blob_mismatches: 0,
            restored_blob: false,
            tracking_exits: 0,
            dirty_pages: 0,
            client: Client::new(keys),
            error: None,
        })
    }

    /// Send `cmd`, let the engine serve it (the same CPU: no one else
    /// would) and check the answer is `Done`.
    fn expect_done(&mut self, engine: &mut Engine, cmd: Command) -> Result<(), &'static str> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.cmd
            .push_request(&cmd.encode(id))
            .map_err(|_| "replica: command ring full")?;
        self.cmd.publish_requests();
        engine.serve_commands()?;
        let rsp = self
            .cmd
            .pop_response()
            .map_err(|_| "replica: command ring broken")?
            .ok_or("replica: command not answered")?
            .decode()
            .map_err(|_| "replica: answer does not decode")?;
        if rsp.id != id || rsp.op != cmd.opcode() {
            return Err("replica: answer to another command");
        }
        match rsp.result {
            Ok(Answer::Done) => Ok(()),
            Ok(_) => Err("replica: command answered other than Done"),
            Err(e) => {
                log::error!("replica: command op {} refused: {e:?}", cmd.opcode());
                Err("replica: command refused")
            }
        }
    }

    /// The checkpoint the engine just posted: pages into the shadow, the
    /// record kept, the event acknowledged and the epoch committed.
    fn take_checkpoint(&mut self, engine: &mut Engine) -> Result<(), &'static str> {
        let entry = self
            .evt
            .pop_request()
            .map_err(|_| "replica: event ring broken")?
            .ok_or("replica: no checkpoint posted at the epoch end")?;
        let Ok(Event::CheckpointReady(r)) = entry.decode() else {
            return Err("replica: an event other than CheckpointReady");
        };
        let page = PAGE_SIZE as usize;
        let n = usize::try_from(r.dirty_count).map_err(|_| "replica: dirty count")?;
        let within = |s: &Span, need: usize| {
            s.len >= need as u64 && s.offset.saturating_add(s.len) <= self.bulk.size() as u64
        };
        if !within(&r.pfn_list, n * 8) || !within(&r.pages, n * page) || !within(&r.vcpu, 0) {
            return Err("replica: checkpoint spans outside the control area");
        }
        let mut pfn = [0u8; 8];
        for i in 0..n {
            self.bulk
                .read_bytes(r.pfn_list.offset as usize + i * 8, &mut pfn);
            let gpa = u64::from_le_bytes(pfn)
                .checked_mul(PAGE_SIZE)
                .ok_or("replica: staged pfn out of range")?;
            let dst = self
                .shadow
                .slice_mut(gpa, PAGE_SIZE)
                .ok_or("replica: staged pfn outside guest RAM")?;
            self.bulk
                .read_bytes(r.pages.offset as usize + i * page, dst);
        }
        self.blob.clear();
        self.blob.resize(r.vcpu.len as usize, 0);
        self.bulk.read_bytes(r.vcpu.offset as usize, &mut self.blob);
        let ack = Ack {
            kind: entry.kind,
            seq: entry.seq,
            epoch: entry.epoch,
            result: Ok(()),
        };
        self.evt
            .push_response(&ack.encode())
            .map_err(|_| "replica: event ring full")?;
        self.evt.publish_responses();
        engine.take_acks()?;
        self.expect_done(engine, Command::CommitEpoch { epoch: r.epoch })?;
        self.committed = Some(r.epoch);
        if self.epochs > 0 {
            // The session's first checkpoint carries every page; the
            // figures count what the guest dirtied.
            self.dirty_pages += r.dirty_count;
        }
        self.epochs += 1;
        Ok(())
    }

    /// The guest is still stopped at the epoch end: the shadow must equal
    /// its memory, every page, and the committed record `context`, the
    /// guest's state encoded now.
    fn compare(&mut self, ram: &GuestRam, context: &[u8]) -> Result<(), &'static str> {
        let mut differ = 0;
        for pfn in 0..ram.pages() {
            let at = pfn * PAGE_SIZE;
            let (Some(a), Some(b)) = (ram.slice(at, PAGE_SIZE), self.shadow.slice(at, PAGE_SIZE))
            else {
                return Err("replica: page outside guest RAM or shadow");
            };
            if !same_page(a, b) {
                if self.mismatches + differ < SHOWN {
                    log::warn!(
                        "replica: epoch {} pfn {pfn:#x}: the shadow differs from guest memory",
                        self.committed.unwrap_or(0)
                    );
                }
                differ += 1;
            }
        }
        self.pages_compared += ram.pages();
        self.mismatches += differ;
        if !self.blob_matches(context) {
            log::warn!(
                "replica: epoch {}: the vCPU record differs from the guest's vCPU",
                self.committed.unwrap_or(0)
            );
            self.blob_mismatches += 1;
        }
        Ok(())
    }

    /// Whether `context` is the last committed record byte for byte.
    fn blob_matches(&self, context: &[u8]) -> bool {
        context == &self.blob[..]
    }

    /// The failover's memory half: guest RAM rewritten from the shadow
    /// (the last committed epoch), and the engine detached (the guest runs
    /// unprotected from now on, as an activated standby does).
    fn take_over(&mut self, ram: &mut GuestRam, engine: &mut Engine) -> Result<(), &'static str> {
        let bytes = ram.bytes();
        let shadow = self
            .shadow
            .slice(0, bytes)
            .ok_or("shadow smaller than guest RAM")?;
        ram.slice_mut(0, bytes)
            .ok_or("guest RAM")?
            .copy_from_slice(shadow);
        self.expect_done(engine, Command::Detach)
    }

    /// The vCPU of the last committed record.
    fn committed_state(&self) -> Result<VcpuState, &'static str> {
        let d = hvm::decode::<1>(&self.blob).map_err(|_| "replica: the record does not decode")?;
        d.vcpus
            .first()
            .map(|(_, s)| s.clone())
            .ok_or("replica: the record has no vCPU")
    }

    /// The client's turn: check every released reply, queue more requests.
    fn client_step(&mut self) -> Result<(), &'static str> {
        let mut buf = [0u8; MAX_RECORD as usize];
        loop {
            match self.output.pop(&mut buf) {
                Ok(Some(rec)) => {
                    let len = rec.len.min(buf.len());
                    self.client.check(&buf[..len]);
                }
                Ok(None) => break,
                Err(_) => return Err("replica: output channel broken"),
            }
        }
        self.output.publish();
        while self.client.sent < self.client.verified + IN_FLIGHT {
            let req = self.client.request(self.client.sent + 1);
            match self.input.write_record(0, req.as_bytes()) {
                Ok(()) => self.client.sent += 1,
                Err(ChannelError::Full) => break,
                Err(_) => return Err("replica: input channel broken"),
            }
        }
        self.input.publish();
        if self.client.errors > 0 && self.error.is_none() {
            self.error = Some("a reply did not match the client's model");
        }
        Ok(())
    }
}

/// Whether two pages hold the same bytes, compared a word at a time
/// (a byte loop is slow under an emulator, and this runs over all of a
/// Linux guest's RAM at every epoch).
fn same_page(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.chunks_exact(8).zip(b.chunks_exact(8)).all(|(x, y)| {
            let w = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]));
            w(x) == w(y)
        })
        && a.chunks_exact(8).remainder() == b.chunks_exact(8).remainder()
}

/// `vcpu` encoded as the engine encodes a checkpoint of the test guests
/// (at most `room` bytes).
fn vcpu_context(vcpu: &VcpuState, room: usize) -> Result<Vec<u8>, &'static str> {
    let mut blob = vec![0u8; room];
    let n = hvm::encode(core::slice::from_ref(vcpu), checkpoint_header(), &mut blob)
        .map_err(|_| "replica: encoding the vCPU record")?;
    blob.truncate(n);
    Ok(blob)
}

/// The service's user: deterministic requests, and a model of the state
/// every reply is checked against.
struct Client {
    keys: u64,
    values: Vec<u64>,
    sent: u64,
    verified: u64,
    errors: u64,
}

impl Client {
    fn new(keys: u32) -> Self {
        let keys = u64::from(keys.clamp(1, service::MAX_KEYS));
        Self {
            keys,
            values: vec![0; keys as usize],
            sent: 0,
            verified: 0,
            errors: 0,
        }
    }

    fn request(&self, id: u64) -> Request {
        let r = mix64(id);
        let o = if r & 1 == 0 { op::ADD } else { op::PUT };
        Request::new(id, o, (r >> 8) % self.keys, mix64(r))
    }

    /// The next reply (in order, ids from 1): status, id, value, version
    /// and checksum as the model says.
    fn check(&mut self, bytes: &[u8]) {
        let id = self.verified + 1;
        let q = self.request(id);
        let old = self.values[q.key as usize];
        let new = apply(q.op, old, q.value).unwrap_or(old);
        self.values[q.key as usize] = new;
        self.verified = id;
        let ok = Reply::parse(bytes).is_some_and(|r| {
            r.status == service::status::OK
                && r.id == id
                && r.value == new
                && r.version == id
                && r.checksum == checksum(self.values.iter().copied())
        });
        if !ok {
            log::error!("replica: the reply to request {id} does not match the model");
            self.errors += 1;
        }
    }
}
