//! A software model of the hypervisor's side of the control area, for
//! tests and for `doppel sim-hv`: it lays out a machine RAM file the way
//! the hypervisor does (`ControlHeader::pack`, `RingLayout::init_shared`,
//! magic written last), runs a deterministic fake guest that dirties pages,
//! and serves the protocol in docs/REPLICATION.md: answers LogDirtyEnable,
//! stages each epoch's dirty pages (copies), posts CheckpointReady, waits
//! for the tool's EventAck before staging the next, answers CommitEpoch.
//!
//! `Detach` (the tool ends replication): log-dirty off, the pending event
//! and every later ack dropped, and the fake guest runs on unprotected
//! (its writes go on, no checkpoint is posted). A later `LogDirtyEnable`
//! starts a new session: epochs from 0 again, epoch 0 with every page.
//! The run ends once `epochs` checkpoints (over all sessions) are
//! committed and the tool detached, or at `stop`.
//!
//! It keeps the guest memory and the HVM context blob of the last
//! checkpoint it posted, so a test can compare a replica with them byte
//! for byte.
//!
//! The hypervisor side that `sim_kv` shares with it lives here once:
//! creating and publishing the control area, the command ring's answers,
//! the event ring with its pending acks, the dirty log and the staging of
//! a checkpoint.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use doppel_abi::chan::ChannelLayout;
use doppel_abi::control::{ControlHeader, Features, Field, Region, ALIVE_OFFSET, MAGIC};
use doppel_abi::locator::{Locator, LOCATOR_AT, LOCATOR_WORDS};
use doppel_abi::msg::{kind, CheckpointReady, LogDirtyMode, Reply, Response, Span};
use doppel_abi::ring::{slot_size, RingLayout, REQ_PROD};
use doppel_abi::{
    AtomicMem64, Command, CommandEntry, Errno, Event, EventAck, EventEntry, ResponseEntry,
    SharedMem,
};
use doppel_core::hvm::{self, HeaderInfo, VcpuState};
use zerocopy::IntoBytes;

use crate::machine::{MachineRam, PAGE};
use crate::synth::Rng;

/// Where the control area starts in the simulated machine: like the
/// hypervisor's, in memory the guest cannot write, and found by the tool
/// through the control locator at [`LOCATOR_AT`] (512 KiB), at 17 MiB.
pub const CONTROL_AT: u64 = 0x110_0000;
/// Where [`Sim::create`] plants a fake control area in the guest's RAM (a
/// guest can write one there): pages from the start of the guest RAM.
pub const FAKE_AT_PAGE: u64 = 2;

/// How the simulated hypervisor misbehaves (for error-path tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// Post this epoch's event with a producer index 1000 beyond the one
    /// entry written (a jump larger than the ring).
    EventIndexJump { epoch: u64 },
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimSpec {
    pub guest_pages: u64,
    /// Checkpoints to post over all sessions (then wait until all are
    /// committed and the tool detached).
    pub epochs: u64,
    /// Pages the guest dirties per epoch (after epoch 0).
    pub dirty: u64,
    pub seed: u64,
    pub misbehave: Option<Misbehave>,
    /// Change the header before it is published (bad control area tests).
    pub tamper: Option<fn(&mut ControlHeader)>,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Default for SimSpec {
    fn default() -> Self {
        Self {
            guest_pages: 512,
            epochs: 20,
            dirty: 40,
            seed: 1,
            misbehave: None,
            tamper: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What the simulation ended with.
#[derive(Clone, Debug, Default)]
pub struct SimResult {
    /// Epochs posted.
    pub posted: u64,
    /// Epochs committed by the tool (CommitEpoch answered Done), all
    /// sessions.
    pub committed: u64,
    /// `Detach` commands answered Done.
    pub detaches: u64,
    /// Times the fake guest ran while detached (unprotected).
    pub unprotected_runs: u64,
    /// Guest memory as staged at the last posted checkpoint.
    pub memory: Vec<u8>,
    /// HVM context blob of the last posted checkpoint.
    pub blob: Vec<u8>,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// Region sizes the simulator (and the layout doc) use, in `REGIONS`
/// order: command ring, event ring, output and input channels, staging
/// (one full guest: epoch 0), vCPU area, pfn list.
pub fn region_sizes(guest_pages: u64) -> [u64; 7] {
    [
        4096,
        8192,
        4096,
        4096,
        guest_pages * PAGE as u64,
        8192,
        (guest_pages * 8).next_multiple_of(8).max(8),
    ]
}

/// A simulated machine: the file is created and the control area
/// published by [`Sim::create`]; [`Sim::run`] plays the hypervisor.
pub struct Sim {
    machine: MachineRam,
    spec: SimSpec,
    header: ControlHeader,
    rng: Rng,
}

impl Sim {
    /// Create `path` (junk, a stray unaligned magic, the control area at
    /// [`CONTROL_AT`], guest RAM after it with a fake control area at
    /// [`FAKE_AT_PAGE`]) and publish the control area.
    pub fn create(path: &Path, spec: SimSpec) -> std::io::Result<Self> {
        let (machine, mut h) = create_machine(
            path,
            region_sizes(spec.guest_pages),
            Features::LOG_DIRTY_WP,
            spec.guest_pages,
        )?;
        let mut rng = Rng::new(spec.seed);
        let mem = machine.mem();
        // Junk below the control area (like firmware and the hypervisor's
        // own memory), with the magic at an address that is not a 4 KiB
        // boundary: the tool must not take it.
        let mut junk = vec![0u8; CONTROL_AT as usize];
        rng.fill(&mut junk);
        junk[0x2008..0x2010].copy_from_slice(&MAGIC.to_le_bytes());
        mem.write_bytes(0, &junk);
        // The guest's initial memory.
        let mut g = vec![0u8; h.guest_ram.size as usize];
        rng.fill(&mut g);
        mem.write_bytes(h.guest_ram.offset as usize, &g);
        // What a hostile guest can do: a copy of the real header on one of
        // its own pages, whole and valid on its own, claiming guest RAM
        // elsewhere (the MiB of slack after the real guest RAM). A tool
        // that scanned for the magic would find two areas.
        let mut fake = h;
        fake.guest_ram = Region {
            offset: h.guest_ram.offset + h.guest_ram.size,
            size: (h.guest_ram.size).min(0x10_0000),
        };
        mem.write_bytes(
            (h.guest_ram.offset + FAKE_AT_PAGE * PAGE as u64) as usize,
            fake.as_bytes(),
        );
        let placed = placed_size(&h);
        if let Some(t) = spec.tamper {
            t(&mut h);
        }
        // A tampered header may name rings that do not fit: those are left
        // as they are, the area is published all the same.
        if let Err(e) = publish(&machine, &h, placed, false) {
            if spec.tamper.is_none() {
                return Err(std::io::Error::other(e));
            }
        }
        Ok(Self {
            machine,
            spec,
            header: h,
            rng,
        })
    }

    /// The published header.
    pub fn header(&self) -> &ControlHeader {
        &self.header
    }

    fn vcpu_blob(epoch: u64, rng: &mut Rng) -> Vec<u8> {
        let mut v = VcpuState {
            rip: 0x10_0000 + epoch * 0x40,
            rax: rng.next_u64(),
            rbx: epoch,
            rsp: 0x8000 - epoch * 8,
            tsc: 1_000_000 * (epoch + 1),
            ..VcpuState::default()
        };
        v.cr0 = 0x11;
        encode_vcpu(v)
    }

    /// Play the hypervisor until `spec.epochs` are committed, `stop` is
    /// set, the time limit passes or the tool misbehaves.
    pub fn run(mut self, stop: &AtomicBool) -> SimResult {
        let mut res = SimResult::default();
        if let Err(e) = self.serve(stop, &mut res) {
            res.error = Some(e);
        }
        res
    }

    fn serve(&mut self, stop: &AtomicBool, res: &mut SimResult) -> Result<(), String> {
        let h = self.header;
        let win: AtomicMem64<'_> = self.machine.window(CONTROL_AT as usize);
        let gmem = self.machine.mem();
        let guest_at = h.guest_ram.offset as usize;
        let pages = self.spec.guest_pages;
        let (mut cmd, mut evt) = attach_rings(win, &h)?;
        let mut enabled = false;
        let mut detached = false;
        // Per session: the next epoch to post and the next to commit.
        let mut next_epoch = 0u64;
        let mut session_committed = 0u64;
        let mut acked: Option<u64> = None;
        let mut dirty = DirtyLog::all(pages);
        let start = Instant::now();
        let mut last_run = Instant::now();
        let mut alive = Alive::new();
        loop {
            alive.beat(&win);
            let done = res.committed >= self.spec.epochs && detached;
            if done || stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if start.elapsed() > self.spec.timeout {
                return Err(format!(
                    "timed out: {} posted, {} committed",
                    res.posted, res.committed
                ));
            }
            let mut busy = false;
            if detached {
                evt.skip_acks()?;
                // The guest runs on, unprotected.
                if last_run.elapsed() >= Duration::from_millis(2) {
                    last_run = Instant::now();
                    guest_runs(&mut self.rng, &self.spec, &gmem, guest_at, &mut dirty);
                    res.unprotected_runs += 1;
                }
            } else {
                busy |= evt.drain_acks(|_, epoch| acked = Some(epoch))?;
            }
            while let Some(req) = cmd
                .pop_request()
                .map_err(|e| format!("command ring: {e:?}"))?
            {
                busy = true;
                let result = match req.decode() {
                    Err(e) => Err(e.errno()),
                    Ok(Command::LogDirtyEnable { mode }) => {
                        if detached && mode == LogDirtyMode::WriteProtect {
                            // A new session: the new tool answered the old
                            // session's events before this command.
                            evt.skip_acks()?;
                            detached = false;
                            next_epoch = 0;
                            session_committed = 0;
                            acked = None;
                            dirty = DirtyLog::all(pages);
                        }
                        log_dirty_enable(&mut enabled, mode)
                    }
                    Ok(Command::CommitEpoch { epoch }) if enabled => {
                        // The tool acks the event before committing; the
                        // ack may have landed after the drain above.
                        evt.drain_acks(|_, e| acked = Some(e))?;
                        if Some(epoch) == acked && epoch == session_committed {
                            session_committed += 1;
                            res.committed += 1;
                            Ok(Reply::Done)
                        } else {
                            Err(Errno::EINVAL)
                        }
                    }
                    Ok(Command::CommitEpoch { .. }) => Err(Errno::EINVAL),
                    Ok(Command::Detach) => {
                        let r = detach(&mut enabled, &mut evt)?;
                        if r.is_ok() {
                            detached = true;
                            res.detaches += 1;
                        }
                        r
                    }
                    Ok(_) => Err(Errno::ENOSYS),
                };
                respond(&mut cmd, &req, result)?;
            }
            // Checkpoints voided by Detach do not count towards `epochs`.
            let in_flight = next_epoch - session_committed;
            if enabled && evt.pending.is_empty() && res.committed + in_flight < self.spec.epochs {
                busy = true;
                let epoch = next_epoch;
                if epoch > 0 {
                    guest_runs(&mut self.rng, &self.spec, &gmem, guest_at, &mut dirty);
                }
                let blob = Self::vcpu_blob(epoch, &mut self.rng);
                let c = stage(&self.machine, &h, epoch, dirty.pfns(), &blob);
                evt.push(&Event::CheckpointReady(c))?;
                if self.spec.misbehave == Some(Misbehave::EventIndexJump { epoch }) {
                    // Publish a producer index far beyond the one entry
                    // written: the tool must refuse it before reading any.
                    let (eo, _) = region(&h, Field::EventRing);
                    win.fence_release();
                    win.store_u32(eo + REQ_PROD, evt.ring.req_prod_pvt().wrapping_add(1000));
                } else {
                    evt.ring.publish_requests();
                }
                next_epoch += 1;
                res.posted += 1;
                res.memory = vec![0u8; pages as usize * PAGE];
                gmem.read_bytes(guest_at, &mut res.memory);
                res.blob = blob;
                dirty.clear();
                // The guest keeps running while the tool copies the
                // staged pages: these writes belong to the next epoch.
                guest_runs(&mut self.rng, &self.spec, &gmem, guest_at, &mut dirty);
            }
            if !busy {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// The fake guest: write a few words into `spec.dirty / 2` random pages.
fn guest_runs(
    rng: &mut Rng,
    spec: &SimSpec,
    gmem: &AtomicMem64<'_>,
    guest_at: usize,
    dirty: &mut DirtyLog,
) {
    let pages = spec.guest_pages;
    for _ in 0..spec.dirty.div_ceil(2) {
        let pfn = rng.below(pages);
        for _ in 0..4 {
            let at = rng.below((PAGE / 8) as u64) as usize * 8;
            let v = rng.next_u64();
            gmem.write_bytes(guest_at + pfn as usize * PAGE + at, &v.to_le_bytes());
        }
        dirty.mark(pfn);
    }
}

// What both simulated hypervisors (this one and `sim_kv`'s) do alike:
// lay out and publish the control area, serve the command ring, stage
// checkpoints and post events.

/// Create the machine RAM file at `path`: the control area packed from
/// `sizes` with `features` at [`CONTROL_AT`] (above the locator page),
/// `guest_pages` of guest RAM
/// from the next MiB after it, a MiB of slack at the end (all zero). The
/// header names the guest RAM and is not published yet ([`publish`]).
pub(crate) fn create_machine(
    path: &Path,
    sizes: [u64; 7],
    features: Features,
    guest_pages: u64,
) -> std::io::Result<(MachineRam, ControlHeader)> {
    let mut h = ControlHeader::pack(sizes, features)
        .map_err(|e| std::io::Error::other(format!("pack: {e:?}")))?;
    let guest_at = (CONTROL_AT + h.total_size).next_multiple_of(0x10_0000);
    let guest_len = guest_pages * PAGE as u64;
    h.guest_ram = Region {
        offset: guest_at,
        size: guest_len,
    };
    let len = guest_at + guest_len + 0x10_0000;
    let f = std::fs::File::create(path)?;
    f.set_len(len)?;
    drop(f);
    let machine = MachineRam::open(path).map_err(std::io::Error::other)?;
    Ok((machine, h))
}

/// Bytes the simulated hypervisor gives the control area of `h`: its
/// `total_size` in whole pages (what the hypervisor allocates).
pub(crate) fn placed_size(h: &ControlHeader) -> u64 {
    h.total_size.next_multiple_of(PAGE as u64)
}

/// Publish `h` at [`CONTROL_AT`] the way the hypervisor does: everything
/// but the magic, then the shared indices of both rings (and of both
/// channels with `channels`), then, after a release fence, `h.magic`;
/// then the control locator at [`LOCATOR_AT`] (`placed` bytes at
/// [`CONTROL_AT`]), its magic last.
/// A ring or channel whose region does not fit its layout is left as it
/// is and named in the error; the rest is published all the same.
pub(crate) fn publish(
    machine: &MachineRam,
    h: &ControlHeader,
    placed: u64,
    channels: bool,
) -> Result<(), String> {
    let win = machine.window(CONTROL_AT as usize);
    let mut bytes = h.as_bytes().to_vec();
    bytes[..8].fill(0);
    win.write_bytes(0, &bytes);
    let mut bad = None;
    for (f, slot) in [
        (
            Field::CommandRing,
            slot_size::<CommandEntry, ResponseEntry>(),
        ),
        (Field::EventRing, slot_size::<EventEntry, EventAck>()),
    ] {
        let (o, s) = region(h, f);
        match RingLayout::new(win.size(), o, s, slot) {
            Ok(l) => l.init_shared(&win),
            Err(e) => bad = bad.or(Some(format!("{f:?}: {e:?}"))),
        }
    }
    let chans: &[Field] = if channels {
        &[Field::OutputChannel, Field::InputChannel]
    } else {
        &[]
    };
    for &f in chans {
        let (o, s) = region(h, f);
        match ChannelLayout::new(win.size(), o, s) {
            Ok(l) => l.init_shared(&win),
            Err(e) => bad = bad.or(Some(format!("{f:?}: {e:?}"))),
        }
    }
    win.fence_release();
    win.write_bytes(0, &h.magic.to_le_bytes());
    let loc = Locator {
        control_at: CONTROL_AT,
        control_size: placed,
    }
    .encode();
    let lwin = machine.window(LOCATOR_AT as usize);
    for (i, w) in loc.iter().enumerate().skip(1) {
        lwin.write_bytes(i * 8, &w.to_le_bytes());
    }
    lwin.fence_release();
    lwin.write_bytes(0, &loc[0].to_le_bytes());
    debug_assert_eq!(loc.len(), LOCATOR_WORDS);
    win.fence_full();
    bad.map_or(Ok(()), Err)
}

/// Region `f` of `h` as (offset, size) in the control area window.
pub(crate) fn region(h: &ControlHeader, f: Field) -> (usize, usize) {
    let r = h.region(f);
    (r.offset as usize, r.size as usize)
}

/// The simulated hypervisor's liveness counter (hv/abi
/// `ControlHeader::alive`): advanced on every pass of a serve loop, as the
/// hypervisor advances it on every exit and command poll.
pub(crate) struct Alive(u64);

impl Alive {
    pub(crate) fn new() -> Self {
        Self(0)
    }

    /// One beat, written into the header of the area in `win`.
    pub(crate) fn beat(&mut self, win: &AtomicMem64<'_>) {
        self.0 = self.0.wrapping_add(1);
        win.write_bytes(ALIVE_OFFSET, &self.0.to_le_bytes());
    }
}

pub(crate) type CmdBack<'a> = doppel_abi::CommandBack<AtomicMem64<'a>>;
type EvtFront<'a> = doppel_abi::EventFront<AtomicMem64<'a>>;

/// The hypervisor's ends of the published rings: the command ring's back
/// and the event ring's front.
pub(crate) fn attach_rings<'a>(
    win: AtomicMem64<'a>,
    h: &ControlHeader,
) -> Result<(CmdBack<'a>, Events<'a>), String> {
    let (co, cs) = region(h, Field::CommandRing);
    let (eo, es) = region(h, Field::EventRing);
    let cmd =
        doppel_abi::CommandBack::attach(win, co, cs).map_err(|e| format!("command ring: {e:?}"))?;
    let ring =
        doppel_abi::EventFront::attach(win, eo, es).map_err(|e| format!("event ring: {e:?}"))?;
    Ok((
        cmd,
        Events {
            ring,
            pending: VecDeque::new(),
            seq: 0,
        },
    ))
}

/// `LogDirtyEnable{mode}`: write protection only, and only once.
pub(crate) fn log_dirty_enable(enabled: &mut bool, mode: LogDirtyMode) -> Result<Reply, Errno> {
    if *enabled {
        Err(Errno::EINVAL)
    } else if mode != LogDirtyMode::WriteProtect {
        Err(Errno::EOPNOTSUPP)
    } else {
        *enabled = true;
        Ok(Reply::Done)
    }
}

/// `Detach`: log-dirty off, the events posted so far void (their acks,
/// whenever they come, are dropped). `EINVAL` when nothing is attached.
pub(crate) fn detach(
    enabled: &mut bool,
    evt: &mut Events<'_>,
) -> Result<Result<Reply, Errno>, String> {
    if !*enabled {
        return Ok(Err(Errno::EINVAL));
    }
    *enabled = false;
    evt.skip_acks()?;
    eprintln!("sim-hv: replication detached; guest runs unprotected");
    Ok(Ok(Reply::Done))
}

/// Answer command `req` with `result` and publish the response.
pub(crate) fn respond(
    cmd: &mut CmdBack<'_>,
    req: &CommandEntry,
    result: Result<Reply, Errno>,
) -> Result<(), String> {
    let rsp = Response {
        id: req.id,
        op: req.op,
        result,
    };
    cmd.push_response(&rsp.encode())
        .map_err(|e| format!("command ring: {e:?}"))?;
    cmd.publish_responses();
    Ok(())
}

/// The event ring from the hypervisor's side, with the events posted and
/// not acked yet.
pub(crate) struct Events<'a> {
    pub(crate) ring: EvtFront<'a>,
    /// (seq, kind, epoch) of every event posted and not acked, in order.
    pub(crate) pending: VecDeque<(u32, u32, u64)>,
    seq: u32,
}

impl Events<'_> {
    /// Write `ev` into the ring with the next sequence number (publishing
    /// is the caller's) and expect its ack.
    pub(crate) fn push(&mut self, ev: &Event) -> Result<(), String> {
        let e = ev.encode(self.seq);
        self.ring
            .push_request(&e)
            .map_err(|x| format!("event ring: {x:?}"))?;
        self.pending.push_back((e.seq, e.kind, e.epoch));
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    /// Detached: consume whatever acks the tool posted without looking at
    /// them (they answer events of a session that is over) and forget the
    /// pending events. A bad ring index is still an error.
    pub(crate) fn skip_acks(&mut self) -> Result<(), String> {
        self.ring
            .skip_responses(u32::MAX)
            .map_err(|x| format!("event ring: {x:?}"))?;
        self.pending.clear();
        Ok(())
    }

    /// Whether a `CheckpointReady` is posted and not acked.
    pub(crate) fn checkpoint_pending(&self) -> bool {
        self.pending
            .iter()
            .any(|&(_, k, _)| k == kind::CHECKPOINT_READY)
    }

    /// Consume the tool's event acks, which must come in order and accept
    /// the event; `acked(kind, epoch)` for each. True if there were any.
    pub(crate) fn drain_acks(&mut self, mut acked: impl FnMut(u32, u64)) -> Result<bool, String> {
        let mut any = false;
        while let Some(a) = self
            .ring
            .pop_response()
            .map_err(|x| format!("event ring: {x:?}"))?
        {
            any = true;
            let a = a.decode().map_err(|x| format!("event ack: {x:?}"))?;
            match self.pending.pop_front() {
                Some((s, k, ep)) if s == a.seq && k == a.kind && ep == a.epoch => {
                    a.result
                        .map_err(|x| format!("the tool rejected event {k} of epoch {ep}: {x:?}"))?;
                    acked(k, ep);
                }
                other => return Err(format!("unexpected event ack {a:?} (pending {other:?})")),
            }
        }
        Ok(any)
    }
}

/// The pages written since the last checkpoint, in the order first
/// written.
pub(crate) struct DirtyLog {
    pfns: Vec<u64>,
    seen: Vec<bool>,
}

impl DirtyLog {
    /// Every one of `pages` dirty (epoch 0 carries the whole guest).
    pub(crate) fn all(pages: u64) -> Self {
        Self {
            pfns: (0..pages).collect(),
            seen: vec![true; pages as usize],
        }
    }

    pub(crate) fn mark(&mut self, pfn: u64) {
        if !self.seen[pfn as usize] {
            self.seen[pfn as usize] = true;
            self.pfns.push(pfn);
        }
    }

    pub(crate) fn pfns(&self) -> &[u64] {
        &self.pfns
    }

    /// A checkpoint took them: nothing is dirty.
    pub(crate) fn clear(&mut self) {
        self.pfns.clear();
        self.seen.fill(false);
    }
}

/// Stage epoch `epoch`'s checkpoint the way the hypervisor does: the pfn
/// list in `dirty` order, each of those guest pages copied into staging,
/// `blob` at the start of the vCPU area. Returns the event that names it.
pub(crate) fn stage(
    machine: &MachineRam,
    h: &ControlHeader,
    epoch: u64,
    dirty: &[u64],
    blob: &[u8],
) -> CheckpointReady {
    let win = machine.window(CONTROL_AT as usize);
    let gmem = machine.mem();
    let guest_at = h.guest_ram.offset as usize;
    let (po, _) = region(h, Field::PfnList);
    let (so, _) = region(h, Field::Staging);
    let (vo, _) = region(h, Field::VcpuArea);
    let mut page = [0u8; PAGE];
    for (i, &pfn) in dirty.iter().enumerate() {
        win.write_bytes(po + i * 8, &pfn.to_le_bytes());
        gmem.read_bytes(guest_at + pfn as usize * PAGE, &mut page);
        win.write_bytes(so + i * PAGE, &page);
    }
    win.write_bytes(vo, blob);
    let n = dirty.len() as u64;
    CheckpointReady {
        epoch,
        dirty_count: n,
        pfn_list: Span {
            offset: po as u64,
            len: n * 8,
        },
        pages: Span {
            offset: so as u64,
            len: n * PAGE as u64,
        },
        vcpu: Span {
            offset: vo as u64,
            len: blob.len() as u64,
        },
    }
}

/// The HVM context blob of one simulated vCPU (the header both simulators
/// put on their checkpoints).
pub fn encode_vcpu(v: VcpuState) -> Vec<u8> {
    let mut out = vec![0u8; hvm::encoded_len(1).expect("one vCPU")];
    let header = HeaderInfo {
        cpuid: 0x00a2_0f10,
        gtsc_khz: 2_000_000,
        changeset: 0,
    };
    let n = hvm::encode(&[v], header, &mut out).expect("the simulator's vCPU encodes");
    out.truncate(n);
    out
}
