//! A software model of the hypervisor running the protected key-value
//! service (`doppel sim-hv --service kv` and `--standby`), so the whole
//! failover pipeline (client, primary tool, backup tool, two hypervisors)
//! runs on the host in seconds.
//!
//! Primary (`features LOG_DIRTY_WP | INPUT_CHANNEL | OUTPUT_COMMIT`):
//! requests are taken from `in_chan` and applied per
//! `doppel_abi::service` to a KV state that lives in the simulated guest
//! RAM; exactly the pages written are logged dirty; each reply is held,
//! tagged with the running epoch, and `CommitEpoch{E}` moves the held
//! replies of epochs `<= E` into `out_chan` before it answers `Done`, then
//! posts `OutputAvailable` (a hint). An epoch ends every `epoch_ms` (epoch
//! 0 at once, with every page), never before the tool acked the previous
//! checkpoint.
//!
//! `Detach` (primary): log-dirty off, no more checkpoints, acks dropped;
//! every held reply goes into `out_chan` at once (tagged
//! `UNPROTECTED_EPOCH`: it was never committed) and the service runs on,
//! unprotected, its replies released as soon as they are made. A later
//! `LogDirtyEnable` starts a new session (epoch 0 with every page, output
//! held again).
//!
//! Standby (`features STANDBY`): the guest RAM starts as junk; the backup
//! tool writes committed pages into it and, at failover, the HVM context
//! blob into the vCPU area, then sends `Activate{epoch}`. The blob must
//! decode (`doppel_core::hvm::decode`); its vCPU carries the epoch (rbx)
//! and the KV version (rcx) of its checkpoint, which must match the
//! `Activate` epoch and the state found in guest RAM (else `EINVAL`, and
//! the standby keeps waiting). Then it serves the KV from that RAM, output
//! released at once (tagged `epoch + 1`). A second `Activate` is `EINVAL`.
//!
//! Guest RAM layout of the service (this simulator's; the real guest has
//! its own): page 0 = state page: magic "DKVSTATE" @0, keys @8, version
//! @16, checksum @24, reply cache @64 (`REPLAY_WINDOW` replies of 48
//! bytes, slot = id % REPLAY_WINDOW); page 1 + k = key k's value @0.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use doppel_abi::chan::{ChannelConsumer, ChannelProducer};
use doppel_abi::control::{ControlHeader, Features, Field};
use doppel_abi::msg::{kind, LogDirtyMode, Reply, UNPROTECTED_EPOCH};
use doppel_abi::service::{self, Outcome, REPLAY_WINDOW};
use doppel_abi::{AtomicMem64, Command, Errno, Event, SharedMem};
use doppel_core::hvm::{self, VcpuState};
use zerocopy::{FromZeros, IntoBytes};

use crate::machine::{MachineRam, PAGE};
use crate::sim::{
    attach_rings, create_machine, detach, log_dirty_enable, placed_size, publish, region, respond,
    stage, Alive, DirtyLog, CONTROL_AT,
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
        publish(&machine, &h, placed_size(&h), true).map_err(bad)?;
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
        let win: AtomicMem64<'_> = self.machine.window(CONTROL_AT as usize);
        let gmem = self.machine.mem();
        let e = |what: &'static str| move |x: &dyn std::fmt::Debug| format!("{what}: {x:?}");
        let (oo, os) = region(&h, Field::OutputChannel);
        let (io, is) = region(&h, Field::InputChannel);
        let (mut cmd, mut evt) = attach_rings(win, &h)?;
        let mut out = ChannelProducer::attach(win, oo, os).map_err(|x| e("output channel")(&x))?;
        let mut inp = ChannelConsumer::attach(win, io, is).map_err(|x| e("input channel")(&x))?;
        let mut kv = (!self.spec.standby).then_some(KvGuest {
            base: h.guest_ram.offset as usize,
            keys: self.spec.keys,
        });
        // A standby until an activated one is protected in its turn
        // (`LogDirtyEnable` after `Activate`: a chain), then a primary.
        let mut standby = self.spec.standby;
        let mut enabled = false;
        let mut detached = false;
        // Checkpoints posted in this session.
        let mut posted = 0u64;
        // Standby: the epoch activated from.
        let mut active: Option<u64> = None;
        let mut running = 0u64; // epoch whose checkpoint will hold the state
        let mut committed: Option<u64> = None;
        let mut held: VecDeque<(u64, service::Reply)> = VecDeque::new();
        let mut dirty = DirtyLog::all(self.spec.guest_pages);
        let mut last_epoch = Instant::now();
        let start = Instant::now();
        let mut frame = vec![0u8; is];
        let mut alive = Alive::new();
        loop {
            alive.beat(&win);
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if start.elapsed() > self.spec.max_run {
                return Err(format!(
                    "ran for {:?} (the limit); {} epochs posted",
                    self.spec.max_run, res.epochs_posted
                ));
            }
            let mut busy = false;
            if detached {
                evt.skip_acks()?;
            } else {
                busy |= evt.drain_acks(|_, _| {})?;
            }
            // Commands.
            while let Some(req) = cmd.pop_request().map_err(|x| e("command ring")(&x))? {
                busy = true;
                let mut post_output: Option<(u64, u64)> = None;
                let result = match req.decode() {
                    Err(x) => Err(x.errno()),
                    // As the hypervisor: a standby's RAM is the backup's
                    // to fill; a primary tool may not take its rings.
                    Ok(Command::LogDirtyEnable { mode })
                        if standby && active.is_some() && mode == LogDirtyMode::WriteProtect =>
                    {
                        // As the hypervisor: the activated service becomes
                        // a replicated primary, epoch 0 with every page.
                        eprintln!("sim-hv: the activated standby is protected (LogDirtyEnable)");
                        evt.skip_acks()?;
                        standby = false;
                        active = None;
                        posted = 0;
                        running = 0;
                        committed = None;
                        dirty = DirtyLog::all(self.spec.guest_pages);
                        log_dirty_enable(&mut enabled, mode)
                    }
                    Ok(Command::LogDirtyEnable { .. }) if standby => {
                        eprintln!("sim-hv: LogDirtyEnable refused (EPERM): a standby");
                        Err(Errno::EPERM)
                    }
                    Ok(Command::LogDirtyEnable { mode }) if !standby => {
                        if detached && mode == LogDirtyMode::WriteProtect {
                            // A new session (the new tool answered the old
                            // session's events before this command).
                            evt.skip_acks()?;
                            detached = false;
                            posted = 0;
                            running = 0;
                            committed = None;
                            dirty = DirtyLog::all(self.spec.guest_pages);
                        }
                        log_dirty_enable(&mut enabled, mode)
                    }
                    Ok(Command::Detach) if !standby => {
                        let r = detach(&mut enabled, &mut evt)?;
                        if r.is_ok() {
                            detached = true;
                            res.detaches += 1;
                            // Nothing will ever commit these: out they go.
                            for h in held.iter_mut() {
                                h.0 = UNPROTECTED_EPOCH;
                            }
                            let (n, _) = release_unprotected(&mut held, &mut out)?;
                            res.released += n;
                        }
                        r
                    }
                    Ok(Command::CommitEpoch { epoch }) if !standby && enabled => {
                        // The tool acks the event before committing; the
                        // ack may have landed after the drain above.
                        evt.drain_acks(|_, _| {})?;
                        let staged_acked = !evt
                            .pending
                            .iter()
                            .any(|&(_, k, ep)| k == kind::CHECKPOINT_READY && ep == epoch);
                        let next = committed.map_or(0, |c| c + 1);
                        if epoch == next && epoch < posted && staged_acked {
                            committed = Some(epoch);
                            res.committed += 1;
                            let (n, bytes) = release(&mut held, &mut out, epoch)?;
                            res.released += n;
                            if n > 0 {
                                post_output = Some((epoch, bytes));
                            }
                            Ok(Reply::Done)
                        } else {
                            Err(Errno::EINVAL)
                        }
                    }
                    Ok(Command::CommitEpoch { .. }) if !standby => Err(Errno::EINVAL),
                    Ok(Command::Activate { epoch }) if standby => {
                        if active.is_some() {
                            Err(Errno::EINVAL)
                        } else {
                            match self.activate(epoch) {
                                Ok(g) => {
                                    kv = Some(g);
                                    active = Some(epoch);
                                    res.activated = Some(epoch);
                                    Ok(Reply::Done)
                                }
                                Err(why) => {
                                    eprintln!("sim-hv: Activate({epoch}) refused: {why}");
                                    Err(Errno::EINVAL)
                                }
                            }
                        }
                    }
                    Ok(_) => Err(Errno::ENOSYS),
                };
                respond(&mut cmd, &req, result)?;
                if let Some((epoch, bytes)) = post_output {
                    if evt.ring.free_requests() > 0 {
                        evt.push(&Event::OutputAvailable { epoch, bytes })?;
                        evt.ring.publish_requests();
                    }
                }
            }
            // Held output that did not fit before: first what Detach
            // released (while detached, that is all of it).
            let (n, _) = release_unprotected(&mut held, &mut out)?;
            res.released += n;
            if let Some(c) = committed.filter(|_| !detached) {
                let (n, _) = release(&mut held, &mut out, c)?;
                res.released += n;
            }
            // The guest: serve requests.
            let serving = if standby {
                active.is_some()
            } else {
                enabled || detached
            };
            if let (true, Some(g)) = (serving, kv) {
                let mut any = false;
                while let Some(info) = inp.pop(&mut frame).map_err(|x| e("input channel")(&x))? {
                    any = true;
                    res.requests += 1;
                    let rep = g.handle(&gmem, &frame[..info.len], |pfn| dirty.mark(pfn));
                    match active {
                        // Standby, activated: unreplicated, released at once.
                        Some(a) => {
                            held.push_back((a + 1, rep));
                            let (n, _) = release(&mut held, &mut out, a + 1)?;
                            res.released += n;
                        }
                        // Detached: unprotected, released at once.
                        None if detached => {
                            held.push_back((UNPROTECTED_EPOCH, rep));
                            let (n, _) = release_unprotected(&mut held, &mut out)?;
                            res.released += n;
                        }
                        None => held.push_back((running, rep)),
                    }
                }
                if any {
                    busy = true;
                    inp.publish();
                }
            }
            // Epoch end (primary only).
            let due = running == 0 || last_epoch.elapsed() >= self.spec.epoch;
            if !standby
                && enabled
                && !evt.checkpoint_pending()
                && due
                && evt.ring.free_requests() > 0
            {
                busy = true;
                last_epoch = Instant::now();
                let g = kv.expect("primary has a service");
                let blob = vcpu_blob(running, g.version(&gmem));
                let c = stage(&self.machine, &h, running, dirty.pfns(), &blob);
                evt.push(&Event::CheckpointReady(c))?;
                evt.ring.publish_requests();
                res.epochs_posted += 1;
                posted += 1;
                running += 1;
                dirty.clear();
            }
            if !busy {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Standby: check the blob and the state in guest RAM.
    fn activate(&self, epoch: u64) -> Result<KvGuest, String> {
        let h = self.header;
        let win = self.machine.window(CONTROL_AT as usize);
        let r = h.region(Field::VcpuArea);
        let mut area = vec![0u8; r.size as usize];
        win.read_bytes(r.offset as usize, &mut area);
        let d = hvm::decode_padded::<64>(&area).map_err(|x| format!("blob: {x:?}"))?;
        let (_, v) = d.vcpus.first().ok_or("blob has no vCPU")?;
        if v.rbx != epoch {
            return Err(format!(
                "blob is of epoch {}, Activate names {epoch}",
                v.rbx
            ));
        }
        let mem = self.machine.mem();
        let g = KvGuest::load(&mem, h.guest_ram.offset as usize, self.spec.guest_pages)?;
        if g.version(&mem) != v.rcx {
            return Err(format!(
                "guest RAM holds version {}, the blob's checkpoint version {}",
                g.version(&mem),
                v.rcx
            ));
        }
        let sum = service::checksum((0..g.keys).map(|k| g.value(&mem, k)));
        if sum != g.checksum(&mem) {
            return Err("the state checksum does not match the values".into());
        }
        Ok(g)
    }
}

/// The checkpoint's vCPU: rbx = epoch, rcx = KV version.
pub fn vcpu_blob(epoch: u64, version: u64) -> Vec<u8> {
    let mut v = VcpuState {
        rip: 0x10_0000 + (version % 64) * 0x10,
        rbx: epoch,
        rcx: version,
        rsp: 0x8000,
        tsc: 1_000_000 * (epoch + 1),
        ..VcpuState::default()
    };
    v.cr0 = 0x11;
    crate::sim::encode_vcpu(v)
}

/// Move held replies of epochs `<= upto` into the output channel, in
/// order, as many as fit. (count, bytes) moved.
fn release(
    held: &mut VecDeque<(u64, service::Reply)>,
    out: &mut ChannelProducer<AtomicMem64<'_>>,
    upto: u64,
) -> Result<(u64, u64), String> {
    release_while(held, out, |ep| ep <= upto)
}

/// Move the replies at the front tagged [`UNPROTECTED_EPOCH`] (released by
/// `Detach` or made while detached) into the output channel, as many as
/// fit; they go before anything a later session holds.
fn release_unprotected(
    held: &mut VecDeque<(u64, service::Reply)>,
    out: &mut ChannelProducer<AtomicMem64<'_>>,
) -> Result<(u64, u64), String> {
    release_while(held, out, |ep| ep == UNPROTECTED_EPOCH)
}

fn release_while(
    held: &mut VecDeque<(u64, service::Reply)>,
    out: &mut ChannelProducer<AtomicMem64<'_>>,
    go: impl Fn(u64) -> bool,
) -> Result<(u64, u64), String> {
    let mut n = 0u64;
    while let Some(&(ep, rep)) = held.front() {
        if !go(ep) {
            break;
        }
        match out.write_record(ep, rep.as_bytes()) {
            Ok(()) => {
                held.pop_front();
                n += 1;
            }
            Err(doppel_abi::chan::ChannelError::Full) => break,
            Err(x) => return Err(format!("output channel: {x:?}")),
        }
    }
    if n > 0 {
        out.publish();
    }
    Ok((n, n * REPLY_LEN as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::service::{op, status, Request};
    use doppel_abi::AtomicMem64;
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
