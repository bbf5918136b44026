//! The key-value service as a `doppel sim-hv` workload (`--service kv`
//! and `--standby`), so the whole failover pipeline (client, primary tool,
//! backup tool, two hypervisors) runs on the host in seconds. The
//! hypervisor's side is hv/core's engine (`doppel_core::engine`), as in
//! the image; this module is what the service is: requests taken from the
//! input channel and applied per `doppel_abi::service` to a KV state that
//! lives in the simulated guest RAM (exactly the pages written are logged
//! dirty), each reply handed to the engine (which holds it until its epoch
//! commits, releases it at `Detach`, or at once on an activated standby),
//! an epoch ending every `epoch` (epoch 0 at once) when staging is free.
//!
//! Standby (`features STANDBY`): the guest RAM starts as junk; the backup
//! tool writes committed pages into it and, at failover, the HVM context
//! blob into the vCPU area, then sends `Activate{epoch}`. Besides the
//! engine's own checks, the service checks the blob against its state: the
//! vCPU carries the epoch (rbx) and the KV version (rcx) of its
//! checkpoint, which must not be below the `Activate` epoch (a
//! re-protected primary's stream counts from 0 again) and must match the
//! state found in guest RAM (else `EINVAL`, and the standby keeps
//! waiting). Then it serves the KV from that RAM.
//!
//! Guest RAM layout of the service (this simulator's; the real guest has
//! its own): page 0 = state page: magic "DKVSTATE" @0, keys @8, version
//! @16, checksum @24, reply cache @64 (`REPLAY_WINDOW` replies of 48
//! bytes, slot = id % REPLAY_WINDOW); page 1 + k = key k's value @0.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use doppel_abi::control::{ControlHeader, Features};
use doppel_abi::service::{self, Outcome, REPLAY_WINDOW};
use doppel_abi::{Errno, SharedMem};
use doppel_core::dirtylog::{DirtyLog, FlatLog};
use doppel_core::engine::{self, EpochClock, Hooks, Recv, Remus, Role};
use doppel_core::hvm::VcpuState;
use zerocopy::{FromZeros, IntoBytes};

use crate::machine::{MachineRam, PAGE};
use crate::sim::{
    create_machine, note_detach, placed_size, publish, stage, view_of, SimRam, CONTROL_AT,
};
use crate::synth::Rng;
/// "DKVSTATE": magic of the simulated service's state page.
pub const STATE_MAGIC: u64 = u64::from_le_bytes(*b"DKVSTATE");
/// Offset of the reply cache in the state page.
pub const CACHE_AT: usize = 64;
const REPLY_LEN: usize = core::mem::size_of::<service::Reply>();
const _: () = assert!(CACHE_AT + REPLAY_WINDOW as usize * REPLY_LEN <= PAGE);

/// What to simulate.
#[derive(Clone, Debug)]
pub struct KvSpec {
    pub guest_pages: u64,
    pub keys: u64,
    pub epoch: Duration,
    pub seed: u64,
    /// Publish a standby instead of a running primary.
    pub standby: bool,
    /// Give up after this long.
    pub max_run: Duration,
}

/// Region sizes: larger channels than the plain simulator's.
pub fn region_sizes(guest_pages: u64) -> [u64; 7] {
    let mut s = crate::sim::region_sizes(guest_pages);
    s[2] = 64 << 10;
    s[3] = 64 << 10;
    s
}

/// The service state in guest RAM: `mem` is the whole machine, the guest
/// starts at `base`.
#[derive(Clone, Copy, Debug)]
pub struct KvGuest {
    pub base: usize,
    pub keys: u64,
}

fn load_u64<M: SharedMem>(mem: &M, at: usize) -> u64 {
    let mut b = [0u8; 8];
    mem.read_bytes(at, &mut b);
    u64::from_le_bytes(b)
}

fn store_u64<M: SharedMem>(mem: &M, at: usize, v: u64) {
    mem.write_bytes(at, &v.to_le_bytes());
}

impl KvGuest {
    /// Boot: zero the state page and the key pages, write the header.
    pub fn init<M: SharedMem>(mem: &M, base: usize, keys: u64) -> Self {
        let zero = [0u8; PAGE];
        for p in 0..=keys as usize {
            mem.write_bytes(base + p * PAGE, &zero);
        }
        let g = Self { base, keys };
        store_u64(mem, base, STATE_MAGIC);
        store_u64(mem, base + 8, keys);
        store_u64(mem, base + 24, service::checksum((0..keys).map(|_| 0)));
        g
    }

    /// Find the state in guest RAM (after a failover).
    pub fn load<M: SharedMem>(mem: &M, base: usize, guest_pages: u64) -> Result<Self, String> {
        if load_u64(mem, base) != STATE_MAGIC {
            return Err("no service state in guest RAM (state page magic)".into());
        }
        let keys = load_u64(mem, base + 8);
        if keys == 0 || keys >= guest_pages || keys > u64::from(service::MAX_KEYS) {
            return Err(format!("service state names {keys} keys"));
        }
        Ok(Self { base, keys })
    }

    /// Requests applied so far.
    pub fn version<M: SharedMem>(&self, mem: &M) -> u64 {
        load_u64(mem, self.base + 16)
    }

    /// The state checksum.
    pub fn checksum<M: SharedMem>(&self, mem: &M) -> u64 {
        load_u64(mem, self.base + 24)
    }

    /// Key `k`'s value.
    pub fn value<M: SharedMem>(&self, mem: &M, k: u64) -> u64 {
        load_u64(mem, self.base + (1 + k as usize) * PAGE)
    }

    /// Serve one frame (per `service::decide`); `dirty(pfn)` for every
    /// guest page written.
    pub fn handle<M: SharedMem>(
        &self,
        mem: &M,
        frame: &[u8],
        mut dirty: impl FnMut(u64),
    ) -> service::Reply {
        let slot = |id: u64| self.base + CACHE_AT + (id % REPLAY_WINDOW) as usize * REPLY_LEN;
        let cached = |id: u64| {
            let mut c = service::Reply::new_zeroed();
            mem.read_bytes(slot(id), c.as_mut_bytes());
            c
        };
        let (version, checksum) = (self.version(mem), self.checksum(mem));
        let value = |k| self.value(mem, k);
        match service::decide(frame, self.keys, version, checksum, value, cached) {
            Outcome::Apply { key, reply } => {
                store_u64(mem, self.base + (1 + key as usize) * PAGE, reply.value);
                dirty(1 + key);
                store_u64(mem, self.base + 16, reply.version);
                store_u64(mem, self.base + 24, reply.checksum);
                mem.write_bytes(slot(reply.id), reply.as_bytes());
                dirty(0);
                reply
            }
            Outcome::Answer(reply) => reply,
        }
    }
}

/// A simulated KV machine (primary or standby).
pub struct KvSim {
    machine: MachineRam,
    spec: KvSpec,
    header: ControlHeader,
}

/// What a run ended with.
#[derive(Clone, Debug, Default)]
pub struct KvResult {
    pub epochs_posted: u64,
    /// `Detach` commands answered Done.
    pub detaches: u64,
    pub committed: u64,
    pub requests: u64,
    pub released: u64,
    pub activated: Option<u64>,
    pub error: Option<String>,
}

impl KvSim {
    /// Create the machine RAM file and publish the control area.
    pub fn create(path: &Path, spec: KvSpec) -> std::io::Result<Self> {
        let bad = |m: String| std::io::Error::other(m);
        if spec.keys == 0 || spec.keys > 4096 || spec.keys >= spec.guest_pages {
            return Err(bad(format!(
                "--keys {} needs 1..=4096 keys and guest pages > keys ({})",
                spec.keys, spec.guest_pages
            )));
        }
        let features = if spec.standby {
            Features::STANDBY
        } else {
            Features::LOG_DIRTY_WP | Features::INPUT_CHANNEL | Features::OUTPUT_COMMIT
        };
        let (machine, h) = create_machine(
            path,
            region_sizes(spec.guest_pages),
            features,
            spec.guest_pages,
        )?;
        let mem = machine.mem();
        let guest_at = h.guest_ram.offset as usize;
        let mut rng = Rng::new(spec.seed);
        // Guest RAM: junk (a standby's is overwritten by the backup; the
        // primary's service pages are zeroed at boot below).
        let mut g = vec![0u8; h.guest_ram.size as usize];
        rng.fill(&mut g);
        mem.write_bytes(guest_at, &g);
        if !spec.standby {
            KvGuest::init(&mem, guest_at, spec.keys);
        }
        publish(&machine, &h, placed_size(&h)).map_err(bad)?;
        Ok(Self {
            machine,
            spec,
            header: h,
        })
    }

    /// The published header.
    pub fn header(&self) -> &ControlHeader {
        &self.header
    }

    /// Serve until `stop`, the time limit, or a protocol error.
    pub fn run(self, stop: &AtomicBool) -> KvResult {
        let mut res = KvResult::default();
        if let Err(e) = self.serve(stop, &mut res) {
            res.error = Some(e);
        }
        res
    }

    fn serve(&self, stop: &AtomicBool, res: &mut KvResult) -> Result<(), String> {
        let h = self.header;
        let win = self.machine.window(CONTROL_AT as usize);
        let view = view_of(&h, &win)?;
        let ram = SimRam::new(&self.machine, &h);
        let role = if self.spec.standby {
            Role::Standby
        } else {
            Role::Service
        };
        let check = Activation {
            ram: &ram,
            found: None,
        };
        let mut hv = engine::Engine::attach(win, win, view, role, Remus::default(), check)?;
        let mut kv = (!self.spec.standby).then_some(KvGuest {
            base: ram.at,
            keys: self.spec.keys,
        });
        let log = FlatLog::new(ram.pages - 1).map_err(|e| format!("dirty log: {e:?}"))?;
        // A reply the engine had no room for yet (the guest's SEND retry).
        let mut unsent: Option<service::Reply> = None;
        let mut frame = vec![0u8; view.region(doppel_abi::Field::InputChannel).1];
        let mut last_epoch = Instant::now();
        let start = Instant::now();
        loop {
            hv.beat();
            let s = hv.stats();
            (res.epochs_posted, res.committed, res.detaches, res.released) =
                (s.posted, s.commits, s.detaches, s.released);
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if start.elapsed() > self.spec.max_run {
                return Err(format!(
                    "ran for {:?} (the limit); {} epochs posted",
                    self.spec.max_run, res.epochs_posted
                ));
            }
            hv.poll()?;
            let mut busy = hv.stats() != s;
            note_detach(&s, &hv.stats());
            if let Some(g) = hv.hooks().found.take() {
                kv = Some(g);
                res.activated = hv.activated().map(|a| a.0);
            }
            // The guest: serve requests.
            let serving = match hv.role() {
                Role::Standby => hv.activated().is_some(),
                _ => hv.enabled() || hv.detached(),
            };
            if let (true, Some(g)) = (serving, kv) {
                loop {
                    if let Some(rep) = unsent {
                        if !hv.send(rep.as_bytes())? {
                            break;
                        }
                        unsent = None;
                    }
                    match hv.recv(&mut frame)? {
                        Recv::Record(n) => {
                            busy = true;
                            res.requests += 1;
                            unsent = Some(g.handle(&ram.mem, &frame[..n], |pfn| {
                                // In range: the service's pages are.
                                let _ = log.mark(pfn);
                            }));
                        }
                        Recv::Empty => break,
                        Recv::TooSmall => {
                            return Err("request larger than the input channel".into())
                        }
                    }
                }
            }
            // Epoch end (a replicating primary).
            let clock = EpochClock {
                timer_fired: last_epoch.elapsed() >= self.spec.epoch,
                ..EpochClock::default()
            };
            if hv.epoch_due(clock) && hv.staging_free() {
                busy = true;
                last_epoch = Instant::now();
                let g = kv.ok_or("a primary without its service")?;
                let vcpu = vcpu_state(hv.next_epoch(), g.version(&ram.mem));
                stage(&mut hv, &log, &ram, &vcpu)?;
            }
            if !busy {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// The service's own check of an `Activate` (after the engine decoded the
/// vCPU record): the state in guest RAM must be the checkpoint's.
struct Activation<'a> {
    ram: &'a SimRam<'a>,
    /// The service found by an accepted check.
    found: Option<KvGuest>,
}

impl Hooks for Activation<'_> {
    fn check_activation(&mut self, epoch: u64, v: &VcpuState) -> Result<(), Errno> {
        match self.check(epoch, v) {
            Ok(g) => {
                self.found = Some(g);
                Ok(())
            }
            Err(why) => {
                eprintln!("sim-hv: Activate({epoch}) refused: {why}");
                Err(Errno::EINVAL)
            }
        }
    }
}

impl Activation<'_> {
    fn check(&self, epoch: u64, v: &VcpuState) -> Result<KvGuest, String> {
        // rbx is the hypervisor's epoch, Activate names the backup's: a
        // stream session that started after hypervisor epoch 0 (a primary
        // re-protected by a new backup, crate::protect) counts from 0
        // again, so the stream epoch can only be the smaller.
        if v.rbx < epoch {
            return Err(format!(
                "blob is of hypervisor epoch {}, Activate names stream epoch {epoch} (later)",
                v.rbx
            ));
        }
        let mem = &self.ram.mem;
        let g = KvGuest::load(mem, self.ram.at, self.ram.pages)?;
        if g.version(mem) != v.rcx {
            return Err(format!(
                "guest RAM holds version {}, the blob's checkpoint version {}",
                g.version(mem),
                v.rcx
            ));
        }
        let sum = service::checksum((0..g.keys).map(|k| g.value(mem, k)));
        if sum != g.checksum(mem) {
            return Err("the state checksum does not match the values".into());
        }
        Ok(g)
    }
}

/// The checkpoint's vCPU: rbx = epoch, rcx = KV version.
fn vcpu_state(epoch: u64, version: u64) -> VcpuState {
    VcpuState {
        rip: 0x10_0000 + (version % 64) * 0x10,
        rbx: epoch,
        rcx: version,
        rsp: 0x8000,
        tsc: 1_000_000 * (epoch + 1),
        cr0: 0x11,
        ..VcpuState::default()
    }
}

/// The checkpoint's vCPU as its HVM context blob.
pub fn vcpu_blob(epoch: u64, version: u64) -> Vec<u8> {
    crate::sim::encode_vcpu(vcpu_state(epoch, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::service::{op, status, Request};
    use doppel_abi::AtomicMem64;
    use doppel_core::hvm;
    use std::sync::atomic::AtomicU64;

    fn req(id: u64, o: u32, key: u64, value: u64) -> Vec<u8> {
        Request::new(id, o, key, value).as_bytes().to_vec()
    }

    #[test]
    fn service_semantics_match_the_client_model() {
        let words: Vec<AtomicU64> = (0..(8 * PAGE / 8)).map(|_| AtomicU64::new(!0)).collect();
        let mem = AtomicMem64::new(&words);
        let g = KvGuest::init(&mem, 0, 5);
        let w = crate::kv::Workload::new(60, 5, 4);
        let mut dirtied = Vec::new();
        for id in 1..=60 {
            let r = w.request(id).unwrap();
            dirtied.clear();
            let rep = g.handle(&mem, r.as_bytes(), |p| dirtied.push(p));
            let e = w.expected(id).unwrap();
            assert_eq!(
                (rep.status, rep.id, rep.version, rep.value, rep.checksum),
                (status::OK, id, id, e.value, e.checksum)
            );
            assert_eq!(dirtied, [1 + r.key, 0]);
        }
        // Replays within the window: same bytes, status REPLAY, nothing
        // written.
        dirtied.clear();
        let rep = g.handle(&mem, w.request(40).unwrap().as_bytes(), |p| dirtied.push(p));
        let e = w.expected(40).unwrap();
        assert_eq!(
            (rep.status, rep.version, rep.value, rep.checksum),
            (status::REPLAY, 40, e.value, e.checksum)
        );
        assert!(dirtied.is_empty());
        let v = g.version(&mem);
        let cases = [
            // The oldest id still cached is version - (window - 1).
            (
                w.request(61 - REPLAY_WINDOW).unwrap().as_bytes().to_vec(),
                status::REPLAY,
            ),
            (req(60 - REPLAY_WINDOW, op::ADD, 0, 1), status::STALE),
            (req(0, op::ADD, 0, 1), status::STALE),
            (req(62, op::ADD, 0, 1), status::GAP),
            (req(61, 9, 0, 1), status::BAD_OP),
            (req(61, op::PUT, 5, 1), status::BAD_KEY),
            (req(61, op::PUT, 0, 1)[..31].to_vec(), status::BAD_FRAME),
        ];
        for (f, want) in cases {
            let rep = g.handle(&mem, &f, |p| dirtied.push(p));
            assert_eq!(rep.status, want);
            // Refusals carry the current version; a replay its own.
            let version = if want == status::REPLAY {
                61 - REPLAY_WINDOW
            } else {
                v
            };
            assert_eq!(rep.version, version);
        }
        assert!(dirtied.is_empty());
        assert_eq!(g.version(&mem), 60);
        // The state found again from RAM (a standby after failover).
        let h = KvGuest::load(&mem, 0, 8).unwrap();
        assert_eq!(h.keys, 5);
        let sum = service::checksum((0..5).map(|k| h.value(&mem, k)));
        assert_eq!(sum, h.checksum(&mem));
    }

    #[test]
    fn blob_carries_epoch_and_version() {
        let b = vcpu_blob(7, 1234);
        let mut area = b.clone();
        area.extend_from_slice(&[0; 64]);
        let d = hvm::decode::<64>(&b).unwrap();
        assert_eq!(hvm::decode_padded::<64>(&area).unwrap(), d);
        assert_eq!((d.vcpus[0].1.rbx, d.vcpus[0].1.rcx), (7, 1234));
        assert!(hvm::decode_padded::<64>(&[0xff; 16]).is_err());
    }
}
