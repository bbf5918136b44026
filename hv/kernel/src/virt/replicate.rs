//! The replication service, primary side (Remus mode), vendor-neutral.
//!
//! The hypervisor publishes a control area (hv/abi) in machine memory,
//! waits for the dom0 tool to enable log-dirty through the command ring,
//! then runs the guest. At every epoch end, with the guest stopped, it
//! harvests the dirty log, copies the dirty pages into the staging area,
//! writes the vCPU as a Xen HVM context blob and posts `CheckpointReady`
//! on the event ring; the guest then runs on. The staging area is reused
//! only after the tool acknowledged the event (back-pressure): the guest
//! waits at its next epoch end until then. Epoch 0 carries every page.
//!
//! `Detach` ends replication (docs/REPLICATION.md, "Detach and re-attach"):
//! log-dirty off for the tool, no more staging or events, the acks still
//! to come dropped unread, every held output record released (tagged
//! `UNPROTECTED_EPOCH`: no backup can be consistent with the guest any
//! more) and the guest runs on unprotected. From the next epoch end the
//! run loop stops write-protecting (`EpochSink::tracking`), so the guest
//! writes without exits. A later `LogDirtyEnable` starts a new session at
//! the rings' current indices: epochs from 0 again, epoch 0 carrying every
//! page, and tracking re-armed at its end.
//!
//! Everything the tool writes (commands, acks, ring indices) is untrusted:
//! malformed entries are answered with an errno, a ring index that jumps
//! past the ring stops replication with a clear error.

use alloc::collections::VecDeque;
use core::sync::atomic::{AtomicU32, AtomicU64};

use doppel_abi::chan::{ChannelConsumer, ChannelError, ChannelLayout, ChannelProducer};
use doppel_abi::guest::MAX_RECORD;
use heapless::Vec as HVec;

use doppel_abi::control::{
    validate_header, ControlHeader, ControlView, Field, Region, ALIVE_OFFSET, HELD_OFFSET,
    PAUSE_OFFSET,
};
// The three live header words are mapped as one array.
const _: () = assert!(PAUSE_OFFSET == ALIVE_OFFSET + 8 && HELD_OFFSET == ALIVE_OFFSET + 16);

use doppel_abi::msg::{
    CheckpointReady, Command, Event, LogDirtyMode, Reply, Response, Span, UNPROTECTED_EPOCH,
};
use doppel_abi::ring::{slot_size, RingLayout};
use doppel_abi::SharedMem;
use doppel_abi::{errno::Errno, guest::PAGE_SIZE};
use doppel_abi::{
    AtomicMem, AtomicMem64, CommandBack, CommandEntry, EventAck, EventEntry, EventFront, Features,
};
use doppel_core::addr::HostPhysAddr;
use doppel_core::dirtylog::DirtyTree;
use doppel_core::hvm::{self, HeaderInfo};
use doppel_core::paging::NestedEntry;
use doppel_core::posted::{AckError, PostedEvents};
use doppel_core::selftest::Mode;

use super::guest::{self, GuestRam, Workload};
use super::run::{run_mode, EpochEnd, EpochSink, Plan, Recv};
use super::vcpu::{GuestStart, Vcpu};
use crate::arch::instr::cpuid;
use crate::mem::frames;

/// Bytes of each ring region (a page each: 63 slots of 64 bytes round down
/// to 32 for commands; events are larger).
const RING_BYTES: u64 = 4096;
/// Byte channels (guest output / input): 16 KiB hold about 250 service
/// frames each way.
const CHANNEL_BYTES: u64 = 16384;
/// Output records held for commit at most (the guest's `SEND` is told to
/// retry beyond that; holding drains as epochs commit).
const HOLD_LIMIT: usize = 1024;
/// The vCPU area holds one HVM context blob (one vCPU).
const VCPU_AREA_BYTES: u64 = 4096;
/// Unanswered events tracked at most: the event ring's slot count (16 for
/// a page of 128-byte events) fits.
const EVENTS_IN_FLIGHT: usize = 16;

/// Run the guest as a replicated primary. True when the guest finished and
/// every checkpoint was acknowledged by the tool.
pub fn primary<E, V, F>(plan: &Plan, vmmcall: bool, make_vcpu: F) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&GuestStart, HostPhysAddr, Mode) -> Result<V, &'static str>,
{
    match primary_inner::<E, V, F>(plan, vmmcall, make_vcpu) {
        Ok(ok) => ok,
        Err(e) => {
            log::error!("primary: {e}");
            false
        }
    }
}

fn primary_inner<E, V, F>(plan: &Plan, vmmcall: bool, make_vcpu: F) -> Result<bool, &'static str>
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&GuestStart, HostPhysAddr, Mode) -> Result<V, &'static str>,
{
    let mut ram = GuestRam::new(plan.mem_bytes).map_err(|_| "no memory for the guest")?;
    let workload = Workload {
        patterns: plan.patterns,
        epochs: plan.epochs,
        seed: plan.seed,
        vmmcall,
        program: if plan.service {
            doppel_abi::guest::PROGRAM_KV
        } else {
            doppel_abi::guest::PROGRAM_WORKLOAD
        },
        keys: plan.keys,
    };
    let start = guest::load(&mut ram, &workload).map_err(|_| "loading the guest")?;
    let mut table = ram
        .nested_table::<E>()
        .map_err(|_| "building the nested page table")?;
    let mut vcpu = make_vcpu(&start, table.root(), Mode::WriteProtect)?;
    let role = if plan.service {
        Role::Service
    } else {
        Role::Workload
    };
    let mut area = ControlArea::publish(&ram, role)?;
    log::info!(
        "primary: control area at {:#x} ({} bytes), guest RAM at {:#x} ({} bytes); waiting for the dom0 tool",
        area.pa,
        area.size,
        ram.hpa(),
        ram.bytes()
    );
    area.wait_enable()?;
    log::info!("primary: log-dirty enabled by the tool; guest starts");
    let ran = run_mode(
        &mut ram,
        &mut table,
        &mut vcpu,
        Mode::WriteProtect,
        plan,
        &mut area,
    );
    let ok = match ran {
        Ok(true) => true,
        // The guest or an epoch end failed: tell the tool on the event ring
        // (it stops with the hypervisor's errno) before giving up.
        Ok(false) | Err(_) => {
            area.post_error(Errno::EIO);
            return ran;
        }
    };
    area.wait_detached()?;
    log::info!(
        "primary: guest finished after {} checkpoints, last committed epoch {}",
        area.next_epoch,
        area.committed
            .map_or(-1, |e| i64::try_from(e).unwrap_or(i64::MAX))
    );
    Ok(ok)
}

/// What the control area serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The workload guest, replicated (no channels).
    Workload,
    /// The key-value service, replicated with output commit.
    Service,
    /// A standby waiting for `Activate`; after it, the service runs
    /// unreplicated (output released at once).
    Standby,
}

/// An output record held until its epoch commits.
struct Held {
    epoch: u64,
    bytes: HVec<u8, { MAX_RECORD as usize }>,
}

/// Run as a standby: publish a control area whose guest RAM the backup
/// tool fills, wait for `Activate`, then run the guest from the vCPU
/// record the tool wrote, unreplicated. False when anything failed (the
/// standby never returns otherwise: the service runs until power-off).
pub fn standby<E, V, F>(plan: &Plan, make_vcpu: F) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&doppel_core::hvm::VcpuState, HostPhysAddr) -> Result<V, &'static str>,
{
    match standby_inner::<E, V, F>(plan, make_vcpu) {
        Ok(ok) => ok,
        Err(e) => {
            log::error!("standby: {e}");
            false
        }
    }
}

fn standby_inner<E, V, F>(plan: &Plan, make_vcpu: F) -> Result<bool, &'static str>
where
    E: NestedEntry,
    V: Vcpu,
    F: FnOnce(&doppel_core::hvm::VcpuState, HostPhysAddr) -> Result<V, &'static str>,
{
    let mut ram = GuestRam::new(plan.mem_bytes).map_err(|_| "no memory for the guest")?;
    let mut area = ControlArea::publish(&ram, Role::Standby)?;
    log::info!(
        "standby: control area at {:#x} ({} bytes), guest RAM at {:#x} ({} bytes); waiting for Activate",
        area.pa,
        area.size,
        ram.hpa(),
        ram.bytes()
    );
    let (epoch, state) = loop {
        if let Some(a) = &area.activated {
            break a.clone();
        }
        if !area.serve_commands()? {
            core::hint::spin_loop();
        }
    };
    log::info!(
        "standby: activated from committed epoch {epoch}; guest resumes at rip={:#x}",
        state.rip
    );
    let mut table = ram
        .nested_table::<E>()
        .map_err(|_| "building the nested page table")?;
    let mut vcpu = make_vcpu(&state, table.root())?;
    // Epochs end as in a primary (the plan's epoch timer or exit count):
    // an activated standby may be protected to a new backup, and then
    // checkpoints at those ends; unprotected, an epoch end only serves the
    // tool.
    let run = Plan {
        service: true,
        pause_cycles: false,
        ..*plan
    };
    run_mode(
        &mut ram,
        &mut table,
        &mut vcpu,
        Mode::WriteProtect,
        &run,
        &mut area,
    )
}

/// A control area published and left unserved: where it lies and its
/// layout.
#[derive(Clone, Copy, Debug)]
pub struct Published {
    /// Machine address of the header (page aligned).
    pub pa: u64,
    /// Bytes the frame allocator gave it (whole pages).
    pub size: u64,
    pub view: ControlView,
}

/// Publish a control area for `ram` exactly as a replicated primary of
/// the workload does (header, rings, channels, locator), and never serve
/// it: `mode=isolation` aims its hostile probes at it. The area stays
/// allocated and published for the rest of the run.
pub fn publish_unserved(ram: &GuestRam) -> Result<Published, &'static str> {
    let area = ControlArea::publish(ram, Role::Workload)?;
    Ok(Published {
        pa: area.pa,
        size: area.size,
        view: area.view,
    })
}

/// The published control area and the hypervisor's ends of its rings.
struct ControlArea {
    role: Role,
    /// The guest's input (tool -> guest) and output (guest -> tool).
    input: ChannelConsumer<AtomicMem<'static>>,
    output: ChannelProducer<AtomicMem<'static>>,
    /// Output not yet released, oldest first.
    held: VecDeque<Held>,
    /// Standby: `Activate` accepted, with the committed epoch and vCPU.
    activated: Option<(u64, doppel_core::hvm::VcpuState)>,
    pa: u64,
    size: u64,
    view: ControlView,
    cmd: CommandBack<AtomicMem<'static>>,
    evt: EventFront<AtomicMem<'static>>,
    /// Staging, pfn list and vCPU areas (disjoint from the rings and each
    /// other; `validate` checked that). Shared with the tool like the
    /// rings, so accessed only through atomics: the tool reads staging and
    /// pfns while a checkpoint is unanswered and, as a backup, writes the
    /// vCPU area before `Activate`; a tool that breaks that protocol can
    /// only make us copy torn bytes, never race in the Rust sense.
    staging: AtomicMem64<'static>,
    pfns: AtomicMem64<'static>,
    vcpu: AtomicMem64<'static>,
    /// The header's liveness counter ([`ControlHeader::alive`]), written
    /// only here, and its value.
    alive: &'static AtomicU64,
    /// The header's last epoch-end pause ([`ControlHeader::pause_cycles`]).
    pause: &'static AtomicU64,
    /// The header's held output ([`ControlHeader::held_output`]), and
    /// the bytes in `held` it mirrors.
    held_word: &'static AtomicU64,
    held_bytes: u64,
    beats: u64,
    enabled: bool,
    /// Events posted and not yet acknowledged, to match acks against.
    events: PostedEvents<EVENTS_IN_FLIGHT>,
    /// The tool sent `Detach`: the guest runs unprotected until a new
    /// `LogDirtyEnable`.
    detached: bool,
    /// The next checkpoint carries every page (a new session after
    /// `Detach`: the new backup starts from nothing).
    full_next: bool,
    next_epoch: u64,
    committed: Option<u64>,
}

/// Write the control locator (hv/abi locator.rs) for the area at `pa`
/// (`size` bytes): the tool finds the area through it, never by scanning
/// memory the guest can write. Address and size first, then, after a
/// release fence, the magic.
fn publish_locator(pa: u64, size: u64, total: u64, guest_ram: Region) -> Result<(), &'static str> {
    use core::sync::atomic::{fence, Ordering};
    use doppel_abi::locator::{Locator, LOCATOR_WORDS};
    let at = frames::locator_page().ok_or(
        "the control locator page (512 KiB) is not free RAM; the tool could not find the area",
    )?;
    let loc = Locator {
        control_at: pa,
        control_size: size,
    };
    // Our own placement must pass the tool's checks (it always does: the
    // locator page and the area are the allocator's, the guest RAM too).
    loc.check(total, guest_ram)
        .map_err(|_| "own control locator does not check")?;
    // SAFETY: the locator page was reserved at boot (never handed out by
    // the frame allocator, so never guest RAM and never mapped by a nested
    // table), is identity mapped, 8-byte aligned and lives for the whole
    // run. Besides us only the dom0 tool reads it, from another process;
    // every access here is atomic.
    let words: &'static [AtomicU64] =
        unsafe { core::slice::from_raw_parts(at as *const AtomicU64, LOCATOR_WORDS) };
    let w = loc.encode();
    for i in 1..LOCATOR_WORDS {
        words[i].store(w[i].to_le(), Ordering::Relaxed);
    }
    fence(Ordering::Release);
    words[0].store(w[0].to_le(), Ordering::Release);
    Ok(())
}

/// Error text for a ring the tool drove out of protocol.
const PEER_BROKE_RING: &str = "the dom0 tool broke the ring protocol (index out of range)";
/// Error text for an event ack that answers no posted event.
const PEER_BROKE_ACKS: &str =
    "the dom0 tool broke the event protocol (an ack that does not answer the oldest event)";

impl ControlArea {
    fn publish(ram: &GuestRam, role: Role) -> Result<Self, &'static str> {
        let pages = ram.pages();
        // Epoch 0 stages every page. A standby stages nothing until it is
        // activated, but then it can be protected to a new backup (a
        // chain), whose epoch 0 carries every page too.
        let (staging, pfns) = (pages * PAGE_SIZE, pages * 8);
        let sizes = [
            RING_BYTES,
            RING_BYTES,
            CHANNEL_BYTES,
            CHANNEL_BYTES,
            staging,
            VCPU_AREA_BYTES,
            pfns,
        ];
        let features = match role {
            Role::Workload => Features::LOG_DIRTY_WP,
            Role::Service => {
                Features::LOG_DIRTY_WP | Features::INPUT_CHANNEL | Features::OUTPUT_COMMIT
            }
            // Log-dirty and output commit only after `Activate`.
            Role::Standby => {
                Features::STANDBY
                    | Features::INPUT_CHANNEL
                    | Features::LOG_DIRTY_WP
                    | Features::OUTPUT_COMMIT
            }
        };
        let mut h = ControlHeader::pack(sizes, features).map_err(|_| "control area layout")?;
        h.guest_ram = Region {
            offset: ram.hpa(),
            size: ram.bytes(),
        };
        let size = h.total_size.next_multiple_of(PAGE_SIZE);
        let pa =
            frames::alloc_contiguous(size, PAGE_SIZE).ok_or("no memory for the control area")?;
        // SAFETY: `pa..pa+size` is fresh, zeroed, identity-mapped memory the
        // frame allocator gave to us, 8-byte aligned, and it is never freed
        // (the area lives as long as the hypervisor). Besides us, only the
        // dom0 tool accesses it, concurrently, from another CPU (or from
        // the emulator host process); that is why every access on our side,
        // to every region, goes through these atomic words and no plain
        // reference to the bytes is ever made.
        //
        // 32-bit words, not 64-bit: the tool writes rsp_prod/req_event while
        // we write req_prod/rsp_event, two u32 fields per 8-byte word. A
        // u32 store into an 8-byte atomic is a read-modify-write, and QEMU's
        // TCG runs a single vCPU's locked instructions non-atomically, so a
        // merge could write back the tool's field as it was before the
        // tool's store (seen as a lost final ack). Plain 32-bit stores never
        // touch the peer's field.
        let words: &'static [AtomicU32] =
            unsafe { core::slice::from_raw_parts(pa as *const AtomicU32, (size / 4) as usize) };
        let all = AtomicMem::new(words);
        // Our own header must pass the tool's checks.
        let view = validate_header(zerocopy::IntoBytes::as_bytes(&h), size as usize)
            .map_err(|_| "own control header does not validate")?;
        let ring_words = |f: Field| -> &'static [AtomicU32] {
            let (off, len) = view.region(f);
            &words[off / 4..(off + len) / 4]
        };
        let cmd_mem = AtomicMem::new(ring_words(Field::CommandRing));
        let evt_mem = AtomicMem::new(ring_words(Field::EventRing));
        let in_mem = AtomicMem::new(ring_words(Field::InputChannel));
        let out_mem = AtomicMem::new(ring_words(Field::OutputChannel));
        for (mem, f) in [
            (&in_mem, Field::InputChannel),
            (&out_mem, Field::OutputChannel),
        ] {
            ChannelLayout::new(view.region(f).1, 0, view.region(f).1)
                .map_err(|_| "channel layout")?
                .init_shared(mem);
        }
        let cmd_slot = slot_size::<CommandEntry, doppel_abi::ResponseEntry>();
        let evt_slot = slot_size::<EventEntry, EventAck>();
        let bytes = |f: Field| view.region(f).1;
        RingLayout::new(
            bytes(Field::CommandRing),
            0,
            bytes(Field::CommandRing),
            cmd_slot,
        )
        .map_err(|_| "command ring layout")?
        .init_shared(&cmd_mem);
        RingLayout::new(
            bytes(Field::EventRing),
            0,
            bytes(Field::EventRing),
            evt_slot,
        )
        .map_err(|_| "event ring layout")?
        .init_shared(&evt_mem);
        // Publish: the header without its magic, then (rings ready) a
        // release fence and the magic, so a tool that finds the magic finds
        // initialised rings behind it.
        let mut unpublished = h;
        unpublished.magic = 0;
        doppel_abi::SharedMem::write_bytes(&all, 0, zerocopy::IntoBytes::as_bytes(&unpublished));
        doppel_abi::SharedMem::fence_release(&all);
        doppel_abi::SharedMem::write_bytes(&all, 0, &h.magic.to_le_bytes());
        let cmd = CommandBack::attach(cmd_mem, 0, bytes(Field::CommandRing))
            .map_err(|_| "command ring")?;
        let input = ChannelConsumer::attach(in_mem, 0, bytes(Field::InputChannel))
            .map_err(|_| "input channel")?;
        let output = ChannelProducer::attach(out_mem, 0, bytes(Field::OutputChannel))
            .map_err(|_| "output channel")?;
        let evt =
            EventFront::attach(evt_mem, 0, bytes(Field::EventRing)).map_err(|_| "event ring")?;
        // The staging, pfn and vCPU areas have one writer each (no field
        // of the peer shares a word with ours), so they are reached through
        // 64-bit words: a staged page is 512 stores instead of 1024.
        let area_mem = |f: Field| -> Result<AtomicMem64<'static>, &'static str> {
            let (off, len) = view.region(f);
            if !off.is_multiple_of(8) || !len.is_multiple_of(8) || off + len > size as usize {
                return Err("control area region not 8-byte aligned");
            }
            // SAFETY: `pa + off .. pa + off + len` lies inside the area
            // described above (checked just now), 8-byte aligned (`pa` is
            // page aligned, `off` checked). Like the 32-bit view, this view
            // only ever makes atomic accesses; these three regions are
            // reached through this view alone (never through `words`), so
            // no access of another size races with them on our side.
            let words: &'static [AtomicU64] = unsafe {
                core::slice::from_raw_parts((pa + off as u64) as *const AtomicU64, len / 8)
            };
            Ok(AtomicMem64::new(words))
        };
        publish_locator(pa, size, h.total_size, h.guest_ram)?;
        // SAFETY: `pa + ALIVE_OFFSET` and the two words after it
        // (`PAUSE_OFFSET`, `HELD_OFFSET`, asserted adjacent at the top of
        // this file) lie in the header,
        // inside the area described above, 8-byte aligned (`pa` is page
        // aligned and the offsets are checked at compile time in hv/abi).
        // After the publish above the header is never written through
        // `words` again: these two words are reached through this
        // reference alone on our side, by atomic stores; the tool only
        // reads them.
        let live: &'static [AtomicU64; 3] =
            unsafe { &*((pa + ALIVE_OFFSET as u64) as *const [AtomicU64; 3]) };
        let [alive, pause, held_word] = live;
        let staging = area_mem(Field::Staging)?;
        let pfns = area_mem(Field::PfnList)?;
        let vcpu = area_mem(Field::VcpuArea)?;
        Ok(Self {
            role,
            input,
            output,
            held: VecDeque::new(),
            activated: None,
            pa,
            size,
            view,
            cmd,
            evt,
            staging,
            pfns,
            vcpu,
            alive,
            pause,
            held_word,
            held_bytes: 0,
            beats: 0,
            enabled: false,
            events: PostedEvents::new(),
            detached: false,
            full_next: false,
            next_epoch: 0,
            committed: None,
        })
    }

    /// Serve commands until the tool has enabled log-dirty.
    fn wait_enable(&mut self) -> Result<(), &'static str> {
        while !self.enabled {
            if !self.serve_commands()? {
                core::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// `held` grew or shrank by `delta` bytes: publish the new total.
    fn held_changed(&mut self, delta: i64) {
        self.held_bytes = self.held_bytes.saturating_add_signed(delta);
        self.held_word.store(
            self.held_bytes.to_le(),
            core::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Advance the liveness counter: the hypervisor runs.
    fn beat(&mut self) {
        self.beats = self.beats.wrapping_add(1);
        self.alive
            .store(self.beats.to_le(), core::sync::atomic::Ordering::Relaxed);
    }

    /// Serve every queued command. True when there was at least one.
    /// Every call (the wait loops poll here) is a liveness beat.
    fn serve_commands(&mut self) -> Result<bool, &'static str> {
        self.beat();
        let mut any = false;
        loop {
            let req = match self.cmd.pop_request() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if any
                        || !self
                            .cmd
                            .final_check_for_requests()
                            .map_err(|_| PEER_BROKE_RING)?
                    {
                        break;
                    }
                    continue;
                }
                Err(_) => return Err(PEER_BROKE_RING),
            };
            any = true;
            let rsp = match req.decode() {
                Ok(cmd) => Response {
                    id: req.id,
                    op: req.op,
                    result: self.execute(cmd),
                },
                Err(e) => Response::error(&req, e.errno()),
            };
            self.cmd
                .push_response(&rsp.encode())
                .map_err(|_| PEER_BROKE_RING)?;
            self.cmd.publish_responses();
        }
        Ok(any)
    }

    fn execute(&mut self, cmd: Command) -> Result<Reply, Errno> {
        match cmd {
            // A standby's RAM belongs to the backup that fills it; a
            // primary tool pointed at it must not take its rings (the
            // backup's `Activate` would then be refused).
            Command::LogDirtyEnable { .. }
                if self.role == Role::Standby && self.activated.is_none() =>
            {
                log::warn!("standby: LogDirtyEnable refused (EPERM): this machine is a standby");
                Err(Errno::EPERM)
            }
            Command::LogDirtyEnable { mode }
                if self.role == Role::Standby && mode == LogDirtyMode::WriteProtect =>
            {
                self.protect_activated().map_err(|e| {
                    log::error!("standby: protecting the activated guest: {e}");
                    Errno::EIO
                })?;
                Ok(Reply::Done)
            }
            Command::LogDirtyEnable { mode } => {
                if self.enabled {
                    // Xen: enabling twice is -EINVAL.
                    Err(Errno::EINVAL)
                } else if mode != LogDirtyMode::WriteProtect {
                    Err(Errno::EOPNOTSUPP)
                } else {
                    if self.detached {
                        self.reattach().map_err(|e| {
                            log::error!("primary: re-attach: {e}");
                            Errno::EIO
                        })?;
                    }
                    self.enabled = true;
                    Ok(Reply::Done)
                }
            }
            Command::Detach => self.detach(),
            // Detached (or never enabled): no session to commit in.
            Command::CommitEpoch { .. } if self.role != Role::Standby && !self.enabled => {
                Err(Errno::EINVAL)
            }
            Command::CommitEpoch { epoch } => {
                if self.role == Role::Standby
                    || epoch >= self.next_epoch
                    || self.committed.is_some_and(|c| epoch < c)
                {
                    // Not yet checkpointed, or going backwards.
                    Err(Errno::ERANGE)
                } else {
                    self.committed = Some(epoch);
                    // Output commit: the epoch's replies go out now, before
                    // the tool sees `Done`.
                    self.release().map_err(|e| {
                        log::error!("primary: releasing output: {e}");
                        Errno::EIO
                    })?;
                    Ok(Reply::Done)
                }
            }
            Command::Activate { epoch } => self.activate(epoch),
            // Epochs end at the guest's own epoch boundaries in this mode;
            // the other operations belong to the standby and output work.
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// Take every acknowledgement the tool has posted. Acks answer events
    /// in ring order; one that does not answer the oldest unanswered event
    /// (or does not decode) stops replication.
    fn take_acks(&mut self) -> Result<(), &'static str> {
        loop {
            match self.evt.pop_response() {
                Ok(Some(a)) => match self.events.take(a.decode()) {
                    Ok(answered) => {
                        if let Err(e) = answered.result {
                            log::warn!(
                                "primary: the tool rejected event kind {} of epoch {}: {e:?}",
                                answered.event.kind,
                                answered.event.epoch
                            );
                        }
                    }
                    Err(e) => {
                        match e {
                            AckError::Malformed(d) => {
                                log::error!("primary: malformed acknowledgement ({d:?})");
                            }
                            AckError::Unsolicited { got } => {
                                log::error!("primary: acknowledgement of no event: {got:?}");
                            }
                            AckError::Mismatch { want, got } => log::error!(
                                "primary: acknowledgement {got:?} does not answer the oldest \
                                 unanswered event {want:?}"
                            ),
                        }
                        return Err(PEER_BROKE_ACKS);
                    }
                },
                Ok(None) => {
                    if !self
                        .evt
                        .final_check_for_responses()
                        .map_err(|_| PEER_BROKE_RING)?
                    {
                        return Ok(());
                    }
                }
                Err(_) => return Err(PEER_BROKE_RING),
            }
        }
    }

    /// Wait until the tool has acknowledged every checkpoint, serving its
    /// commands meanwhile.
    fn wait_released(&mut self) -> Result<(), &'static str> {
        let mut said = false;
        loop {
            self.take_acks()?;
            let served = self.serve_commands()?;
            if self.events.checkpoints() == 0 {
                return Ok(());
            }
            if !said {
                log::debug!("primary: waiting for the tool to release staging");
                said = true;
            }
            if !served {
                core::hint::spin_loop();
            }
        }
    }

    /// Post an Error event (best effort: a full ring is skipped, the
    /// hypervisor is stopping anyway). None once detached: nobody reads.
    fn post_error(&mut self, errno: Errno) {
        if self.detached {
            return;
        }
        let e = Event::Error {
            epoch: self.next_epoch,
            op: 0,
            errno,
        };
        // Best effort (see above): a full ring or record skips the event.
        let _ = self.post_event(&e);
    }

    /// Push `ev` on the event ring, publish it and record it, so its ack
    /// can be matched.
    fn post_event(&mut self, ev: &Event) -> Result<(), &'static str> {
        if !self.events.can_post() {
            return Err("event ring full");
        }
        let entry = ev.encode(self.events.next_seq());
        self.evt
            .push_request(&entry)
            .map_err(|_| "event ring full")?;
        self.evt.publish_requests();
        self.events
            .posted(entry.kind, entry.epoch)
            .map_err(|_| "event ring full")
    }

    /// Stage the epoch's dirty pages, pfns and vCPU; post the event.
    fn stage(&mut self, e: &EpochEnd<'_>) -> Result<u64, &'static str> {
        let mut n: usize = 0;
        for (i, &byte) in e.harvest.iter().enumerate() {
            let mut bits = byte;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let pfn = i as u64 * 8 + bit;
                let page = e
                    .ram
                    .slice(pfn * PAGE_SIZE, PAGE_SIZE)
                    .ok_or("dirty pfn outside guest RAM")?;
                let at = n * PAGE_SIZE as usize;
                if at + PAGE_SIZE as usize > self.staging.size() {
                    return Err("staging area too small");
                }
                if n * 8 + 8 > self.pfns.size() {
                    return Err("pfn list area too small");
                }
                self.staging.write_bytes(at, page);
                self.pfns.write_bytes(n * 8, &pfn.to_le_bytes());
                n += 1;
                if n.is_multiple_of(256) {
                    // Staging a large guest's epoch 0 takes a while under
                    // an emulator: the hypervisor is alive meanwhile.
                    self.beat();
                }
            }
        }
        let header = HeaderInfo {
            cpuid: cpuid(1, 0).eax,
            gtsc_khz: 0,
            changeset: 0,
        };
        let mut blob = alloc::vec![0u8; self.vcpu.size()];
        let blob_len = hvm::encode(core::slice::from_ref(&e.vcpu), header, &mut blob)
            .map_err(|_| "encoding the vCPU record")?;
        self.vcpu.write_bytes(0, &blob[..blob_len]);
        let off = |f: Field| self.view.region(f).0 as u64;
        let epoch = self.next_epoch;
        let ready = CheckpointReady {
            epoch,
            dirty_count: n as u64,
            pfn_list: Span {
                offset: off(Field::PfnList),
                len: n as u64 * 8,
            },
            pages: Span {
                offset: off(Field::Staging),
                len: n as u64 * PAGE_SIZE,
            },
            vcpu: Span {
                offset: off(Field::VcpuArea),
                len: blob_len as u64,
            },
        };
        // Cannot be full: the previous checkpoint is answered (back-pressure)
        // and hints always leave a slot free for this event.
        self.post_event(&Event::CheckpointReady(ready))?;
        self.next_epoch += 1;
        Ok(n as u64)
    }
}

impl ControlArea {
    /// Move held output of committed epochs into the output channel, in
    /// order, as far as it has room; post an `OutputAvailable` hint when
    /// something went out, no hint is unanswered and the ring keeps a slot
    /// for the next checkpoint besides (hints coalesce: the tool reads the
    /// whole channel, so one unanswered hint covers later output too).
    fn release(&mut self) -> Result<(), &'static str> {
        let Some(committed) = self.committed else {
            return Ok(());
        };
        let mut bytes = 0u64;
        while let Some(h) = self.held.front() {
            if h.epoch > committed {
                break;
            }
            match self.output.write_record(h.epoch, &h.bytes) {
                Ok(()) => {
                    bytes += h.bytes.len() as u64;
                    self.held_changed(-(h.bytes.len() as i64));
                    self.held.pop_front();
                }
                Err(ChannelError::Full) => break,
                Err(_) => return Err("the dom0 tool broke the output channel"),
            }
        }
        if bytes > 0 {
            self.output.publish();
            let hint = Event::OutputAvailable {
                epoch: committed,
                bytes,
            };
            if self.events.may_post_hint(self.evt.free_requests()) {
                self.post_event(&hint)?;
            }
        }
        Ok(())
    }

    /// Standby: check the vCPU record the backup tool wrote and accept
    /// the failover. The guest starts once the answer is out.
    fn activate(&mut self, epoch: u64) -> Result<Reply, Errno> {
        if self.role != Role::Standby || self.activated.is_some() {
            return Err(Errno::EINVAL);
        }
        // The record sits at the start of the area, zero-padded to its end.
        // Decode a private copy: the tool could still be writing the area,
        // and the decoder reads its input more than once.
        let mut copy = alloc::vec![0u8; self.vcpu.size()];
        self.vcpu.read_bytes(0, &mut copy);
        let decoded = hvm::decode_padded::<1>(&copy);
        let decoded = decoded.map_err(|e| {
            log::error!("standby: Activate: the vCPU record does not decode: {e:?}");
            Errno::EINVAL
        })?;
        let Some((_, state)) = decoded.vcpus.first() else {
            log::error!("standby: Activate: the vCPU record has no CPU");
            return Err(Errno::EINVAL);
        };
        self.activated = Some((epoch, state.clone()));
        self.next_epoch = epoch.saturating_add(1);
        Ok(Reply::Done)
    }
}

/// An activated standby protected in its turn (a chain A -> B -> C).
impl ControlArea {
    /// `LogDirtyEnable` on an activated standby: from now on it is a
    /// replicated service like any primary (output held until
    /// `CommitEpoch`, checkpoints staged at every epoch end), in a session
    /// that starts at epoch 0 with every page. Before the next epoch end
    /// the output goes out as before (it was released at once since
    /// `Activate`; nothing is held), so no reply is lost or reordered.
    fn protect_activated(&mut self) -> Result<(), &'static str> {
        // The backup tool that sent `Activate` answers no events (the
        // standby posted none); drop any answer left on the ring.
        self.skip_acks()?;
        self.role = Role::Service;
        self.enabled = true;
        self.full_next = true;
        self.events.clear();
        self.next_epoch = 0;
        self.committed = None;
        log::info!(
            "standby: the activated guest is protected to a new backup (log-dirty enabled); \
             replication starts at epoch 0"
        );
        Ok(())
    }
}

/// Detach and re-attach (docs/REPLICATION.md).
impl ControlArea {
    /// `Detach`: stop replicating and run the guest unprotected. Answered
    /// `Done` after the held output went out (as far as the output channel
    /// has room; the rest follows as the tool's successor or nobody drains
    /// it — the guest is told to retry a full channel as before).
    fn detach(&mut self) -> Result<Reply, Errno> {
        if self.role == Role::Standby {
            return Err(Errno::EOPNOTSUPP);
        }
        if !self.enabled {
            // Nothing attached (never enabled, or detached already).
            return Err(Errno::EINVAL);
        }
        self.enabled = false;
        self.detached = true;
        // The staged checkpoint (if any) is void: its ack may never come.
        self.events.clear();
        let held = self.held.len();
        for h in self.held.iter_mut() {
            h.epoch = UNPROTECTED_EPOCH;
        }
        self.release_unprotected().map_err(|e| {
            log::error!("primary: releasing output at Detach: {e}");
            Errno::EIO
        })?;
        log::warn!(
            "primary: replication detached; guest runs unprotected (after epoch {}, last \
             committed {}; {held} held output records released, {} still waiting for room)",
            self.next_epoch.saturating_sub(1),
            self.committed
                .map_or(-1, |e| i64::try_from(e).unwrap_or(i64::MAX)),
            self.held.len()
        );
        Ok(Reply::Done)
    }

    /// `LogDirtyEnable` after `Detach`: a new session. The new tool has
    /// answered the old session's events before sending it; drop those
    /// answers unread and start again from epoch 0 with every page.
    fn reattach(&mut self) -> Result<(), &'static str> {
        self.skip_acks()?;
        self.detached = false;
        self.full_next = true;
        self.events.clear();
        self.next_epoch = 0;
        self.committed = None;
        log::info!("primary: a new dom0 tool enabled log-dirty; replication restarts at epoch 0");
        Ok(())
    }

    /// Detached: consume the tool's acks without reading them (they answer
    /// events of a session that is over). A bad index is still an error.
    fn skip_acks(&mut self) -> Result<(), &'static str> {
        self.evt
            .skip_responses(u32::MAX)
            .map(|_| ())
            .map_err(|_| PEER_BROKE_RING)
    }

    /// Move the held records tagged [`UNPROTECTED_EPOCH`] at the front
    /// (released by `Detach`, or sent while detached) into the output
    /// channel, as far as it has room. No event: nobody is attached.
    fn release_unprotected(&mut self) -> Result<(), &'static str> {
        let mut any = false;
        while let Some(h) = self.held.front() {
            if h.epoch != UNPROTECTED_EPOCH {
                break;
            }
            match self.output.write_record(h.epoch, &h.bytes) {
                Ok(()) => {
                    any = true;
                    self.held_changed(-(h.bytes.len() as i64));
                    self.held.pop_front();
                }
                Err(ChannelError::Full) => break,
                Err(_) => return Err("the dom0 tool broke the output channel"),
            }
        }
        if any {
            self.output.publish();
        }
        Ok(())
    }

    /// The guest finished: serve the tool until it detaches (it commits
    /// the last checkpoint first), so its last commands are answered
    /// before the hypervisor stops.
    fn wait_detached(&mut self) -> Result<(), &'static str> {
        if !self.detached {
            log::info!("primary: guest finished; waiting for the tool to Detach");
        }
        while !self.detached {
            self.take_acks()?;
            if !self.serve_commands()? {
                core::hint::spin_loop();
            }
        }
        self.skip_acks()?;
        self.release_unprotected()
    }
}

impl EpochSink for ControlArea {
    fn recv(&mut self, dst: &mut [u8]) -> Result<Recv, &'static str> {
        let got = match self.input.pop(dst) {
            Ok(Some(info)) => Recv::Record(info.len),
            Ok(None) => return Ok(Recv::Empty),
            Err(ChannelError::BufferTooSmall { .. }) => return Ok(Recv::TooSmall),
            Err(_) => return Err("the dom0 tool broke the input channel"),
        };
        self.input.publish();
        Ok(got)
    }

    fn send(&mut self, record: &[u8]) -> Result<bool, &'static str> {
        if self.role == Role::Standby {
            // Activated: nothing to commit against any more.
            return match self.output.write_record(self.next_epoch, record) {
                Ok(()) => {
                    self.output.publish();
                    Ok(true)
                }
                Err(ChannelError::Full) => Ok(false),
                Err(_) => Err("the dom0 tool broke the output channel"),
            };
        }
        if self.held.len() >= HOLD_LIMIT {
            return Ok(false);
        }
        let bytes = HVec::from_slice(record).map_err(|()| "output record too long")?;
        let epoch = if self.detached {
            UNPROTECTED_EPOCH
        } else {
            self.next_epoch
        };
        self.held_changed(bytes.len() as i64);
        self.held.push_back(Held { epoch, bytes });
        if self.detached {
            // Unprotected: out as soon as the channel has room.
            self.release_unprotected()?;
        }
        Ok(true)
    }

    fn poll(&mut self) -> Result<(), &'static str> {
        if self.detached {
            self.skip_acks()?;
        } else {
            self.take_acks()?;
        }
        self.serve_commands()?;
        // What Detach released goes first, also into a later session.
        self.release_unprotected()?;
        if self.detached {
            return Ok(());
        }
        self.release()
    }

    fn start(&mut self, log: &DirtyTree, ram: &GuestRam) -> Result<(), &'static str> {
        // Epoch 0 carries every page: the backup starts from nothing.
        for pfn in 0..ram.pages() {
            log.mark(pfn).map_err(|_| "marking guest RAM dirty")?;
        }
        Ok(())
    }

    fn epoch_end(&mut self, e: &EpochEnd<'_>) -> Result<(), &'static str> {
        self.beat();
        if self.role == Role::Standby {
            // An activated standby runs unreplicated: nothing to stage.
            return Ok(());
        }
        if self.detached {
            // Unprotected: serve the tool's successor, stage nothing.
            self.skip_acks()?;
            self.serve_commands()?;
            return self.release_unprotected();
        }
        // Back-pressure: staging holds one checkpoint at a time.
        self.wait_released()?;
        if self.detached {
            // Detach arrived while the guest waited: stage nothing.
            return Ok(());
        }
        let n = if core::mem::take(&mut self.full_next) {
            // A new session: every page, whatever this epoch dirtied.
            let mut bits = alloc::vec![0u8; e.harvest.len()];
            for pfn in 0..e.ram.pages() {
                if let Some(b) = bits.get_mut((pfn / 8) as usize) {
                    *b |= 1 << (pfn % 8);
                }
            }
            let full = EpochEnd {
                harvest: &bits,
                vcpu: e.vcpu.clone(),
                ..*e
            };
            self.stage(&full)?
        } else {
            self.stage(e)?
        };
        let what = match (e.pattern, self.role) {
            (Some(p), _) => p.name(),
            (None, Role::Workload) => "stop",
            (None, _) => "service",
        };
        log::info!(
            "primary: checkpoint epoch={} pattern={what} dirty={n} exits={} held={}",
            self.next_epoch - 1,
            e.exits,
            self.held.len()
        );
        Ok(())
    }

    fn checkpoint_at_stop(&self) -> bool {
        true
    }

    fn exited(&mut self) {
        self.beat();
    }

    /// Nobody uses the harvests of a detached primary or of an activated
    /// standby (which never checkpoints): their guests run without
    /// write-protect exits.
    fn tracking(&self) -> bool {
        !self.detached && self.role != Role::Standby
    }

    fn resumed(&mut self, pause: Option<u64>) {
        if let Some(p) = pause {
            log::info!(
                "primary: epoch={} pause_cycles={p}",
                self.next_epoch.saturating_sub(1)
            );
        }
    }

    fn pause_measured(&mut self, cycles: u64) {
        self.pause
            .store(cycles.to_le(), core::sync::atomic::Ordering::Relaxed);
    }
}
