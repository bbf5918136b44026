//! `doppel sim-hv`: the hypervisor's side of replication on the host, for
//! tests and for the xtask steps that need a hypervisor without an
//! emulator. The protocol is hv/core's engine (`doppel_core::engine`), the
//! very code the image runs, over the machine RAM file; this module is
//! only the simulated machine (the file, laid out like the hypervisor's:
//! junk below, the control area at [`CONTROL_AT`] found through the
//! locator, guest RAM after it) and a workload: a deterministic fake guest
//! that dirties pages (hv/core's `FlatLog` logs them) and ends an epoch as
//! soon as the staging area is free, until `epochs` checkpoints (over all
//! sessions) are committed and the tool detached, or `stop`.
//!
//! It keeps the guest memory and the HVM context blob of the last
//! checkpoint it posted, so a test can compare a replica with them byte
//! for byte. `sim_kv` is the other workload (the key-value service).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use doppel_abi::control::{
    validate_header, ControlHeader, ControlView, Features, Field, Region, MAGIC,
};
use doppel_abi::locator::{Locator, LOCATOR_AT};
use doppel_abi::ring::REQ_PROD;
use doppel_abi::{AtomicMem64, SharedMem};
use doppel_core::dirtylog::{DirtyLog, DirtyPfns, DirtyWord, FlatLog};
use doppel_core::engine::control::{publish_area, publish_locator};
use doppel_core::engine::{self, EpochPolicy, GuestPages, Hooks, Remus, Role, Stats};
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
        if let Err(e) = publish(&machine, &h, placed) {
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
        let (machine, spec, rng) = (&self.machine, &self.spec, &mut self.rng);
        let win = machine.window(CONTROL_AT as usize);
        let view = view_of(&self.header, &win)?;
        let jump = AtomicBool::new(false);
        let rings = Rings {
            mem: win,
            jump_at: spec
                .misbehave
                .map(|_| view.region(Field::EventRing).0 + REQ_PROD),
            jump: &jump,
        };
        let mut hv =
            engine::Engine::attach(rings, win, view, Role::Workload, Remus::default(), ())?;
        let ram = SimRam::new(machine, &self.header);
        let log = FlatLog::new(ram.pages - 1).map_err(|e| format!("dirty log: {e:?}"))?;
        let start = Instant::now();
        let mut last_run = Instant::now();
        loop {
            hv.beat();
            let Stats {
                posted,
                commits,
                detaches,
                ..
            } = hv.stats();
            (res.posted, res.committed, res.detaches) = (posted, commits, detaches);
            let done = res.committed >= spec.epochs && hv.detached();
            if done || stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if start.elapsed() > spec.timeout {
                return Err(format!(
                    "timed out: {} posted, {} committed",
                    res.posted, res.committed
                ));
            }
            let before = hv.stats();
            hv.poll()?;
            let mut busy = hv.stats() != before;
            note_detach(&before, &hv.stats());
            if hv.detached() && last_run.elapsed() >= Duration::from_millis(2) {
                // The guest runs on, unprotected.
                last_run = Instant::now();
                guest_runs(rng, spec, &ram, &log);
                res.unprotected_runs += 1;
            }
            // Checkpoints voided by Detach do not count towards `epochs`.
            let in_flight = hv.next_epoch() - hv.committed().map_or(0, |c| c + 1);
            if hv.replicating() && hv.staging_free() && hv.stats().commits + in_flight < spec.epochs
            {
                busy = true;
                let epoch = hv.next_epoch();
                if epoch > 0 {
                    guest_runs(rng, spec, &ram, &log);
                }
                jump.store(
                    spec.misbehave == Some(Misbehave::EventIndexJump { epoch }),
                    Ordering::Relaxed,
                );
                let vcpu = fake_vcpu(rng, epoch);
                let s = stage(&mut hv, &log, &ram, &vcpu)?;
                res.memory = ram.snapshot();
                res.blob = read_blob(&win, &view, s.blob_len);
                // The guest keeps running while the tool copies the staged
                // pages: these writes belong to the next epoch.
                guest_runs(rng, spec, &ram, &log);
            }
            if !busy {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// The fake guest: write a few words into `spec.dirty / 2` random pages.
fn guest_runs(rng: &mut Rng, spec: &SimSpec, ram: &SimRam<'_>, log: &FlatLog) {
    for _ in 0..spec.dirty.div_ceil(2) {
        let pfn = rng.below(spec.guest_pages);
        for _ in 0..4 {
            let at = rng.below((PAGE / 8) as u64) as usize * 8;
            let v = rng.next_u64();
            ram.mem
                .write_bytes(ram.at + pfn as usize * PAGE + at, &v.to_le_bytes());
        }
        // In range: pfn < guest pages.
        let _ = log.mark(pfn);
    }
}

/// The fake guest's vCPU at the end of `epoch`.
fn fake_vcpu(rng: &mut Rng, epoch: u64) -> VcpuState {
    VcpuState {
        rip: 0x10_0000 + epoch * 0x40,
        rax: rng.next_u64(),
        rbx: epoch,
        rsp: 0x8000 - epoch * 8,
        tsc: 1_000_000 * (epoch + 1),
        cr0: 0x11,
        ..VcpuState::default()
    }
}

/// Say so on stderr when a `Detach` was answered between `before` and
/// `after`.
pub(crate) fn note_detach(before: &Stats, after: &Stats) {
    if after.detaches > before.detaches {
        eprintln!("sim-hv: replication detached; guest runs unprotected");
    }
}

// The simulated machine, which both workloads (this one and `sim_kv`'s)
// run on.

/// The HVM save header the simulated machines put on their checkpoints.
pub(crate) const SIM_HEADER: HeaderInfo = HeaderInfo {
    cpuid: 0x00a2_0f10,
    gtsc_khz: 2_000_000,
    changeset: 0,
};

/// Stage the epoch's harvest: CLEAN `log` into words, hand its pfns and
/// `vcpu` to the engine.
pub(crate) fn stage<R: SharedMem + Clone, B: SharedMem, P: EpochPolicy, H: Hooks>(
    hv: &mut engine::Engine<R, B, P, H>,
    log: &FlatLog,
    ram: &SimRam<'_>,
    vcpu: &VcpuState,
) -> Result<engine::Staged, String> {
    let mut words: Vec<DirtyWord> = Vec::new();
    log.clean_with(|w| words.push(w));
    Ok(hv.stage(DirtyPfns::new(words.into_iter()), ram, vcpu, SIM_HEADER)?)
}

/// The validated view of the published header (a tampered one does not
/// validate: nothing is served then).
pub(crate) fn view_of(h: &ControlHeader, win: &AtomicMem64<'_>) -> Result<ControlView, String> {
    validate_header(h.as_bytes(), win.size()).map_err(|e| format!("control area: {e:?}"))
}

/// The first `len` bytes of the vCPU area: the blob just staged.
fn read_blob(win: &AtomicMem64<'_>, view: &ControlView, len: usize) -> Vec<u8> {
    let mut blob = vec![0u8; len];
    win.read_bytes(view.region(Field::VcpuArea).0, &mut blob);
    blob
}

/// The simulated guest's RAM in the machine file.
pub(crate) struct SimRam<'a> {
    pub(crate) mem: AtomicMem64<'a>,
    /// Machine address of guest-physical 0.
    pub(crate) at: usize,
    pub(crate) pages: u64,
}

impl<'a> SimRam<'a> {
    pub(crate) fn new(machine: &'a MachineRam, h: &ControlHeader) -> Self {
        Self {
            mem: machine.mem(),
            at: h.guest_ram.offset as usize,
            pages: h.guest_ram.size / PAGE as u64,
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut m = vec![0u8; self.pages as usize * PAGE];
        self.mem.read_bytes(self.at, &mut m);
        m
    }
}

impl GuestPages for SimRam<'_> {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn copy_page<S: SharedMem>(&self, pfn: u64, dst: &S, at: usize) -> bool {
        if pfn >= self.pages {
            return false;
        }
        let mut page = [0u8; PAGE];
        self.mem
            .read_bytes(self.at + pfn as usize * PAGE, &mut page);
        dst.write_bytes(at, &page);
        true
    }
}

/// The engine's view of the rings and channels: the control area, with
/// [`Misbehave::EventIndexJump`] wired in (while `jump` is set, the event
/// ring's producer index is published 1000 too far).
#[derive(Clone, Copy)]
struct Rings<'a> {
    mem: AtomicMem64<'a>,
    jump_at: Option<usize>,
    jump: &'a AtomicBool,
}

impl SharedMem for Rings<'_> {
    fn size(&self) -> usize {
        self.mem.size()
    }
    fn load_u32(&self, offset: usize) -> u32 {
        self.mem.load_u32(offset)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        let off = Some(offset) == self.jump_at && self.jump.load(Ordering::Relaxed);
        self.mem
            .store_u32(offset, if off { value.wrapping_add(1000) } else { value })
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        self.mem.read_bytes(offset, dst)
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        self.mem.write_bytes(offset, src)
    }
}

/// Create the machine RAM file at `path`: the control area packed from
/// `sizes` with `features` at [`CONTROL_AT`] (above the locator page),
/// `guest_pages` of guest RAM from the next MiB after it, a MiB of slack
/// at the end (all zero). The header names the guest RAM and is not
/// published yet ([`publish`]).
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

/// Publish `h` at [`CONTROL_AT`] as the hypervisor does (the engine's
/// `publish_area`), then the control locator at [`LOCATOR_AT`] naming
/// `placed` bytes there. A ring or channel whose region does not fit is
/// left as it is and named in the error; the rest is published all the
/// same.
pub(crate) fn publish(machine: &MachineRam, h: &ControlHeader, placed: u64) -> Result<(), String> {
    let published = publish_area(&machine.window(CONTROL_AT as usize), h);
    let loc = Locator {
        control_at: CONTROL_AT,
        control_size: placed,
    };
    publish_locator(&machine.window(LOCATOR_AT as usize), &loc);
    published.map(|_| ()).map_err(|e| format!("{e:?}"))
}

/// The HVM context blob of one simulated vCPU, as the simulated machines
/// stage it.
pub fn encode_vcpu(v: VcpuState) -> Vec<u8> {
    let mut out = vec![0u8; hvm::encoded_len(1).expect("one vCPU")];
    let n = hvm::encode(&[v], SIM_HEADER, &mut out).expect("the simulator's vCPU encodes");
    out.truncate(n);
    out
}
