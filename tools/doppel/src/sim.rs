//! A software model of the hypervisor's side of the control area, for
//! tests and for `doppel sim-hv`: it lays out a machine RAM file the way
//! the hypervisor does (`ControlHeader::pack`, `RingLayout::init_shared`,
//! magic written last), runs a deterministic fake guest that dirties pages,
//! and serves the protocol in docs/REPLICATION.md: answers LogDirtyEnable,
//! stages each epoch's dirty pages (copies), posts CheckpointReady, waits
//! for the tool's EventAck before staging the next, answers CommitEpoch.
//!
//! It keeps the guest memory and the HVM context blob of the last
//! checkpoint it posted, so a test can compare a replica with them byte
//! for byte.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use doppel_abi::control::{ControlHeader, Features, Field, Region, MAGIC};
use doppel_abi::msg::{CheckpointReady, LogDirtyMode, Reply, Response, Span};
use doppel_abi::ring::{slot_size, RingLayout, REQ_PROD};
use doppel_abi::{
    AtomicMem64, Command, CommandEntry, Errno, Event, EventAck, EventEntry, ResponseEntry,
    SharedMem,
};
use doppel_core::hvm::{self, HeaderInfo, VcpuState};
use zerocopy::IntoBytes;

use crate::machine::{MachineRam, PAGE};
use crate::synth::Rng;

/// Where the control area starts in the simulated machine.
pub const CONTROL_AT: u64 = 0x10_0000;

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
    /// Checkpoints to post (then wait until all are committed).
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
    /// Epochs committed by the tool (CommitEpoch answered Done).
    pub committed: u64,
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
    /// [`CONTROL_AT`], guest RAM after it) and publish the control area.
    pub fn create(path: &Path, spec: SimSpec) -> std::io::Result<Self> {
        let mut h = ControlHeader::pack(region_sizes(spec.guest_pages), Features::LOG_DIRTY_WP)
            .map_err(|e| std::io::Error::other(format!("pack: {e:?}")))?;
        let guest_at = (CONTROL_AT + h.total_size).next_multiple_of(0x10_0000);
        let guest_len = spec.guest_pages * PAGE as u64;
        h.guest_ram = Region {
            offset: guest_at,
            size: guest_len,
        };
        let len = guest_at + guest_len + 0x10_0000;
        let f = std::fs::File::create(path)?;
        f.set_len(len)?;
        drop(f);
        let machine = MachineRam::open(path).map_err(std::io::Error::other)?;
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
        let mut g = vec![0u8; guest_len as usize];
        rng.fill(&mut g);
        mem.write_bytes(guest_at as usize, &g);
        if let Some(t) = spec.tamper {
            t(&mut h);
        }
        let win = machine.window(CONTROL_AT as usize);
        // Everything but the magic first, then the rings, then the magic.
        let mut bytes = h.as_bytes().to_vec();
        let magic = h.magic;
        bytes[..8].fill(0);
        win.write_bytes(0, &bytes);
        for (f, slot) in [
            (
                Field::CommandRing,
                slot_size::<CommandEntry, ResponseEntry>(),
            ),
            (Field::EventRing, slot_size::<EventEntry, EventAck>()),
        ] {
            let r = h.region(f);
            if let Ok(l) = RingLayout::new(win.size(), r.offset as usize, r.size as usize, slot) {
                l.init_shared(&win);
            }
        }
        win.fence_release();
        win.write_bytes(0, &magic.to_le_bytes());
        win.fence_full();
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
        let reg = |f: Field| {
            let r = h.region(f);
            (r.offset as usize, r.size as usize)
        };
        let (co, cs) = reg(Field::CommandRing);
        let (eo, es) = reg(Field::EventRing);
        let mut cmd = doppel_abi::CommandBack::attach(win, co, cs).map_err(|e| format!("{e:?}"))?;
        let mut evt = doppel_abi::EventFront::attach(win, eo, es).map_err(|e| format!("{e:?}"))?;
        let mut enabled = false;
        let mut next_epoch = 0u64;
        let mut outstanding: Option<(u32, u64)> = None;
        let mut acked: Option<u64> = None;
        let mut dirty: Vec<u64> = (0..pages).collect();
        let mut is_dirty = vec![true; pages as usize];
        let start = Instant::now();
        let mut page = vec![0u8; PAGE];
        loop {
            if res.committed == self.spec.epochs || stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if start.elapsed() > self.spec.timeout {
                return Err(format!(
                    "timed out: {} posted, {} committed",
                    res.posted, res.committed
                ));
            }
            let mut busy = false;
            busy |= drain_acks(&mut evt, &mut outstanding, &mut acked)?;
            while let Some(req) = cmd
                .pop_request()
                .map_err(|e| format!("command ring: {e:?}"))?
            {
                busy = true;
                let result = match req.decode() {
                    Err(e) => Err(e.errno()),
                    Ok(Command::LogDirtyEnable { mode }) => {
                        if enabled {
                            Err(Errno::EINVAL)
                        } else if mode != LogDirtyMode::WriteProtect {
                            Err(Errno::EOPNOTSUPP)
                        } else {
                            enabled = true;
                            Ok(Reply::Done)
                        }
                    }
                    Ok(Command::CommitEpoch { epoch }) => {
                        // The tool acks the event before committing; the
                        // ack may have landed after the drain above.
                        drain_acks(&mut evt, &mut outstanding, &mut acked)?;
                        if Some(epoch) == acked && epoch == res.committed {
                            res.committed += 1;
                            Ok(Reply::Done)
                        } else {
                            Err(Errno::EINVAL)
                        }
                    }
                    Ok(_) => Err(Errno::ENOSYS),
                };
                let rsp = Response {
                    id: req.id,
                    op: req.op,
                    result,
                };
                cmd.push_response(&rsp.encode())
                    .map_err(|e| format!("command ring: {e:?}"))?;
                cmd.publish_responses();
            }
            if enabled && outstanding.is_none() && next_epoch < self.spec.epochs {
                busy = true;
                let epoch = next_epoch;
                if epoch > 0 {
                    guest_runs(
                        &mut self.rng,
                        &self.spec,
                        &gmem,
                        guest_at,
                        &mut dirty,
                        &mut is_dirty,
                    );
                }
                // Stage: pfn list in dirtying order, pages copied.
                let (po, _) = reg(Field::PfnList);
                let (so, _) = reg(Field::Staging);
                let (vo, _) = reg(Field::VcpuArea);
                for (i, &pfn) in dirty.iter().enumerate() {
                    win.write_bytes(po + i * 8, &pfn.to_le_bytes());
                    gmem.read_bytes(guest_at + pfn as usize * PAGE, &mut page);
                    win.write_bytes(so + i * PAGE, &page);
                }
                let blob = Self::vcpu_blob(epoch, &mut self.rng);
                win.write_bytes(vo, &blob);
                let n = dirty.len() as u64;
                let c = CheckpointReady {
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
                };
                let seq = epoch as u32;
                evt.push_request(&Event::CheckpointReady(c).encode(seq))
                    .map_err(|e| format!("event ring: {e:?}"))?;
                if self.spec.misbehave == Some(Misbehave::EventIndexJump { epoch }) {
                    // Publish a producer index far beyond the one entry
                    // written: the tool must refuse it before reading any.
                    win.fence_release();
                    win.store_u32(eo + REQ_PROD, evt.req_prod_pvt().wrapping_add(1000));
                } else {
                    evt.publish_requests();
                }
                outstanding = Some((seq, epoch));
                next_epoch += 1;
                res.posted += 1;
                res.memory = vec![0u8; pages as usize * PAGE];
                gmem.read_bytes(guest_at, &mut res.memory);
                res.blob = blob;
                dirty.clear();
                is_dirty.fill(false);
                // The guest keeps running while the tool copies the
                // staged pages: these writes belong to the next epoch.
                guest_runs(
                    &mut self.rng,
                    &self.spec,
                    &gmem,
                    guest_at,
                    &mut dirty,
                    &mut is_dirty,
                );
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
    dirty: &mut Vec<u64>,
    is_dirty: &mut [bool],
) {
    let pages = spec.guest_pages;
    for _ in 0..spec.dirty.div_ceil(2) {
        let pfn = rng.below(pages);
        for _ in 0..4 {
            let at = rng.below((PAGE / 8) as u64) as usize * 8;
            let v = rng.next_u64();
            gmem.write_bytes(guest_at + pfn as usize * PAGE + at, &v.to_le_bytes());
        }
        if !is_dirty[pfn as usize] {
            is_dirty[pfn as usize] = true;
            dirty.push(pfn);
        }
    }
}

type EvtFront<'a> = doppel_abi::EventFront<AtomicMem64<'a>>;

/// Consume the tool's event acks; true if there were any.
fn drain_acks(
    evt: &mut EvtFront<'_>,
    outstanding: &mut Option<(u32, u64)>,
    acked: &mut Option<u64>,
) -> Result<bool, String> {
    let mut any = false;
    while let Some(a) = evt
        .pop_response()
        .map_err(|e| format!("event ring: {e:?}"))?
    {
        any = true;
        let a = a.decode().map_err(|e| format!("event ack: {e:?}"))?;
        match *outstanding {
            Some((seq, epoch)) if a.seq == seq && a.epoch == epoch => {
                a.result
                    .map_err(|e| format!("the tool rejected epoch {epoch}: {e:?}"))?;
                *outstanding = None;
                *acked = Some(epoch);
            }
            _ => return Err(format!("unexpected event ack {a:?}")),
        }
    }
    Ok(any)
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
