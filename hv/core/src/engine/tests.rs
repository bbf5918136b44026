//! The engine on the host, over a byte buffer, driven by a scripted tool.

extern crate std;

use std::vec;
use std::vec::Vec;

use doppel_abi::chan::{ChannelConsumer, ChannelProducer};
use doppel_abi::control::{ControlHeader, ControlView, Field, Region, HELD_OFFSET};
use doppel_abi::msg::{
    Ack, Command, CommandEntry, Event, LogDirtyMode, Reply, PAGE_SIZE, UNPROTECTED_EPOCH,
};
use doppel_abi::{ByteMem, CommandFront, Errno, EventBack, ResponseEntry, SharedMem};

use super::control::{features, publish_area, region_sizes};
use super::*;
use crate::hvm::{HeaderInfo, VcpuState};

const PAGES: u64 = 8;

type Mem = ByteMem<Vec<u8>>;

/// Guest RAM in a vector; page `p` filled with byte `p + 1`.
struct Ram(Vec<u8>);

impl Ram {
    fn new() -> Self {
        let mut v = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        for (p, page) in v.chunks_mut(PAGE_SIZE as usize).enumerate() {
            page.fill(p as u8 + 1);
        }
        Ram(v)
    }
}

impl GuestPages for Ram {
    fn pages(&self) -> u64 {
        PAGES
    }
    fn copy_page<S: SharedMem>(&self, pfn: u64, dst: &S, at: usize) -> bool {
        let page = PAGE_SIZE as usize;
        match self.0.get(pfn as usize * page..(pfn as usize + 1) * page) {
            Some(src) => {
                dst.write_bytes(at, src);
                true
            }
            None => false,
        }
    }
}

fn area(role: Role) -> (Mem, ControlView) {
    let mut h = ControlHeader::pack(region_sizes(PAGES), features(role)).unwrap();
    h.guest_ram = Region {
        offset: 0x10_0000,
        size: PAGES * PAGE_SIZE,
    };
    let mem = ByteMem::new(vec![0u8; h.total_size as usize]);
    let view = publish_area(&mem, &h).unwrap();
    (mem, view)
}

/// The dom0 tool's ends of the rings and channels.
struct Tool<'a> {
    cmd: CommandFront<&'a Mem>,
    evt: EventBack<&'a Mem>,
    out: ChannelConsumer<&'a Mem>,
    inp: ChannelProducer<&'a Mem>,
    id: u32,
}

type Eng<'a, H = ()> = Engine<&'a Mem, &'a Mem, Remus, H>;

fn tool<'a>(mem: &'a Mem, view: &ControlView) -> Tool<'a> {
    let (co, cs) = view.region(Field::CommandRing);
    let (eo, es) = view.region(Field::EventRing);
    let (oo, os) = view.region(Field::OutputChannel);
    let (io, is) = view.region(Field::InputChannel);
    Tool {
        cmd: CommandFront::attach(mem, co, cs).unwrap(),
        evt: EventBack::attach(mem, eo, es).unwrap(),
        out: ChannelConsumer::attach(mem, oo, os).unwrap(),
        inp: ChannelProducer::attach(mem, io, is).unwrap(),
        id: 0,
    }
}

impl Tool<'_> {
    fn send_raw<H: Hooks>(&mut self, e: &mut Eng<'_, H>, entry: CommandEntry) -> ResponseEntry {
        self.cmd.push_request(&entry).unwrap();
        self.cmd.publish_requests();
        assert!(e.serve_commands().unwrap());
        self.cmd.pop_response().unwrap().expect("an answer")
    }

    fn send<H: Hooks>(&mut self, e: &mut Eng<'_, H>, c: Command) -> Result<Reply, Errno> {
        self.id += 1;
        self.send_raw(e, c.encode(self.id)).decode().unwrap().result
    }

    /// The next event, acked with `result`.
    fn ack(&mut self, result: Result<(), Errno>) -> Event {
        let ev = self.evt.pop_request().unwrap().expect("an event");
        let a = Ack {
            kind: ev.kind,
            seq: ev.seq,
            epoch: ev.epoch,
            result,
        };
        self.evt.push_response(&a.encode()).unwrap();
        self.evt.publish_responses();
        ev.decode().unwrap()
    }

    /// Every output record: (epoch, bytes).
    fn output(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Some(r) = self.out.pop(&mut buf).unwrap() {
            got.push((r.epoch, buf[..r.len].to_vec()));
        }
        self.out.publish();
        got
    }
}

const ENABLE: Command = Command::LogDirtyEnable {
    mode: LogDirtyMode::WriteProtect,
};

fn header() -> HeaderInfo {
    HeaderInfo {
        cpuid: 1,
        gtsc_khz: 0,
        changeset: 0,
    }
}

fn vcpu(rbx: u64) -> VcpuState {
    VcpuState {
        rip: 0x1000,
        rbx,
        cr0: 0x11,
        ..VcpuState::default()
    }
}

fn engine<H: Hooks>(mem: &Mem, view: ControlView, role: Role, hooks: H) -> Eng<'_, H> {
    Engine::attach(mem, mem, view, role, Remus::default(), hooks).unwrap()
}

/// An engine of `role` enabled by the tool, epoch 0 staged and acked.
fn past_epoch_zero(mem: &Mem, view: ControlView, role: Role) -> (Eng<'_>, Tool<'_>, Ram) {
    let mut e = engine(mem, view, role, ());
    let mut t = tool(mem, &view);
    let ram = Ram::new();
    assert_eq!(t.send(&mut e, ENABLE), Ok(Reply::Done));
    e.stage(core::iter::empty(), &ram, &vcpu(0), header())
        .unwrap();
    t.ack(Ok(()));
    (e, t, ram)
}

fn held_word(mem: &Mem) -> u64 {
    let mut b = [0u8; 8];
    mem.read_bytes(HELD_OFFSET, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn epoch_zero_carries_every_page_then_only_the_harvest() {
    let (mem, view) = area(Role::Workload);
    let mut e = engine(&mem, view, Role::Workload, ());
    let mut t = tool(&mem, &view);
    let ram = Ram::new();
    assert_eq!(t.send(&mut e, ENABLE), Ok(Reply::Done));
    assert!(e.epoch_due(EpochClock::default()), "epoch 0 is due at once");
    let s = e
        .stage(bitmap_pfns(&[0b100]), &ram, &vcpu(0), header())
        .unwrap();
    assert_eq!((s.epoch, s.dirty), (0, PAGES));
    assert!(!e.staging_free());
    // Back-pressure: a second checkpoint before the ack is refused.
    assert!(e
        .stage(bitmap_pfns(&[1]), &ram, &vcpu(1), header())
        .is_err());
    let Event::CheckpointReady(c) = t.ack(Ok(())) else {
        panic!("not a checkpoint")
    };
    assert_eq!((c.epoch, c.dirty_count), (0, PAGES));
    e.poll().unwrap();
    assert!(e.staging_free());
    // Epoch 1: pfns 2 and 5, pages and list as the tool reads them.
    let s = e
        .stage(bitmap_pfns(&[0b10_0100]), &ram, &vcpu(1), header())
        .unwrap();
    assert_eq!((s.epoch, s.dirty), (1, 2));
    let Event::CheckpointReady(c) = t.ack(Ok(())) else {
        panic!("not a checkpoint")
    };
    view.check_checkpoint(&c).unwrap();
    let mut pfns = [0u8; 16];
    mem.read_bytes(c.pfn_list.offset as usize, &mut pfns);
    assert_eq!(pfns[..8], 2u64.to_le_bytes());
    assert_eq!(pfns[8..], 5u64.to_le_bytes());
    let mut page = vec![0u8; PAGE_SIZE as usize];
    mem.read_bytes(c.pages.offset as usize + PAGE_SIZE as usize, &mut page);
    assert!(page.iter().all(|&b| b == 6));
    let mut blob = vec![0u8; c.vcpu.len as usize];
    mem.read_bytes(c.vcpu.offset as usize, &mut blob);
    let d = crate::hvm::decode::<1>(&blob).unwrap();
    assert_eq!(d.vcpus[0].1.rbx, 1);
    assert_eq!(
        t.send(&mut e, Command::CommitEpoch { epoch: 1 }),
        Ok(Reply::Done)
    );
    assert_eq!(e.stats().posted, 2);
}

#[test]
fn a_whole_machine_context_is_carried_as_it_is_and_one_too_big_is_refused() {
    let (mem, view) = area(Role::Workload);
    let (mut e, mut t, ram) = past_epoch_zero(&mem, view, Role::Workload);
    e.poll().unwrap();
    let (_, room) = view.region(Field::VcpuArea);
    // Larger than the area: refused before anything is staged or posted.
    let big = vec![0x5a; room + 1];
    assert_eq!(
        e.stage_context(bitmap_pfns(&[0b10]), &ram, &big),
        Err("the HVM context does not fit the vCPU area")
    );
    assert_eq!(e.next_epoch(), 1, "nothing posted");
    assert!(e.staging_free());
    // Any context that fits arrives byte for byte, with its pages.
    let context: Vec<u8> = (0..room as u32).map(|i| (i * 7) as u8).collect();
    let s = e
        .stage_context(bitmap_pfns(&[0b10]), &ram, &context)
        .unwrap();
    assert_eq!((s.epoch, s.dirty, s.blob_len), (1, 1, room));
    let Event::CheckpointReady(c) = t.ack(Ok(())) else {
        panic!("not a checkpoint")
    };
    view.check_checkpoint(&c).unwrap();
    let mut got = vec![0u8; c.vcpu.len as usize];
    mem.read_bytes(c.vcpu.offset as usize, &mut got);
    assert_eq!(got, context);
}

#[test]
fn staging_is_bounded_by_its_regions_and_guest_ram() {
    let (mem, view) = area(Role::Workload);
    let (mut e, _tool, ram) = past_epoch_zero(&mem, view, Role::Workload);
    e.poll().unwrap();
    // A pfn outside guest RAM.
    let r = e.stage([PAGES].into_iter(), &ram, &vcpu(1), header());
    assert_eq!(r, Err("dirty pfn outside guest RAM"));
    // More pages than staging holds (a harvest that repeats pages).
    let many = core::iter::repeat_n(1u64, PAGES as usize + 1);
    assert_eq!(
        e.stage(many, &ram, &vcpu(1), header()),
        Err("staging area too small")
    );
    assert_eq!(e.next_epoch(), 1, "nothing posted");
    assert_eq!(
        bitmap_pfns(&[0x81, 0, 0x01]).collect::<Vec<_>>(),
        [0, 7, 16]
    );
}

#[test]
fn role_checks_primary_and_standby() {
    let (mem, view) = area(Role::Service);
    let mut e = engine(&mem, view, Role::Service, ());
    let mut t = tool(&mem, &view);
    // Nothing attached: no commit, no detach, no activate.
    assert_eq!(
        t.send(&mut e, Command::CommitEpoch { epoch: 0 }),
        Err(Errno::EINVAL)
    );
    assert_eq!(t.send(&mut e, Command::Detach), Err(Errno::EINVAL));
    assert_eq!(
        t.send(&mut e, Command::Activate { epoch: 0 }),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        t.send(
            &mut e,
            Command::LogDirtyEnable {
                mode: LogDirtyMode::Pml
            }
        ),
        Err(Errno::EOPNOTSUPP)
    );
    assert_eq!(t.send(&mut e, ENABLE), Ok(Reply::Done));
    assert_eq!(t.send(&mut e, ENABLE), Err(Errno::EINVAL), "twice");
    // Not yet checkpointed.
    assert_eq!(
        t.send(&mut e, Command::CommitEpoch { epoch: 0 }),
        Err(Errno::ERANGE)
    );

    let (mem, view) = area(Role::Standby);
    let mut s = engine(&mem, view, Role::Standby, ());
    let mut t = tool(&mem, &view);
    assert_eq!(t.send(&mut s, ENABLE), Err(Errno::EPERM));
    assert_eq!(t.send(&mut s, Command::Detach), Err(Errno::EOPNOTSUPP));
    assert_eq!(
        t.send(&mut s, Command::CommitEpoch { epoch: 0 }),
        Err(Errno::ERANGE)
    );
    assert!(!s.enabled() && s.activated().is_none());
}

#[test]
fn hostile_commands_are_refused_without_state_change() {
    let (mem, view) = area(Role::Service);
    let (mut e, mut t, ram) = past_epoch_zero(&mem, view, Role::Service);
    assert_eq!(
        t.send(&mut e, Command::CommitEpoch { epoch: 0 }),
        Ok(Reply::Done)
    );
    let before = (
        e.enabled(),
        e.detached(),
        e.next_epoch(),
        e.committed(),
        e.stats(),
    );
    // Garbage: unknown opcode, reserved bits set.
    let mut junk = Command::Detach.encode(77);
    junk.op = 0xdead;
    assert_ne!(t.send_raw(&mut e, junk).status, 0);
    let mut junk = Command::Detach.encode(78);
    junk.reserved = [1; 4];
    assert_ne!(t.send_raw(&mut e, junk).status, 0);
    // A commit beyond what was posted, one going backwards, an activate on
    // a primary, an unsupported operation.
    assert_eq!(
        t.send(&mut e, Command::CommitEpoch { epoch: 9 }),
        Err(Errno::ERANGE)
    );
    assert_eq!(
        t.send(&mut e, Command::Activate { epoch: 0 }),
        Err(Errno::EINVAL)
    );
    assert_eq!(t.send(&mut e, Command::EndEpoch), Err(Errno::EOPNOTSUPP));
    let after = (
        e.enabled(),
        e.detached(),
        e.next_epoch(),
        e.committed(),
        e.stats(),
    );
    assert_eq!(before, after);
    // An ack that does not answer the event posted stops replication with
    // a clear error.
    e.poll().unwrap();
    e.stage(core::iter::empty(), &ram, &vcpu(1), header())
        .unwrap();
    let ev = t.evt.pop_request().unwrap().unwrap();
    let a = Ack {
        kind: ev.kind,
        seq: ev.seq.wrapping_add(1),
        epoch: ev.epoch,
        result: Ok(()),
    };
    t.evt.push_response(&a.encode()).unwrap();
    t.evt.publish_responses();
    assert_eq!(e.poll(), Err(PEER_BROKE_ACKS));
}

#[test]
fn output_is_held_until_commit_and_detach_releases_it_unprotected() {
    let (mem, view) = area(Role::Service);
    let mut e = engine(&mem, view, Role::Service, ());
    let mut t = tool(&mem, &view);
    let ram = Ram::new();
    t.send(&mut e, ENABLE).unwrap();
    assert!(e.send(b"r0").unwrap());
    e.stage(core::iter::empty(), &ram, &vcpu(0), header())
        .unwrap();
    assert!(e.send(b"r1").unwrap());
    assert!(e.send(b"r2").unwrap());
    assert_eq!(held_word(&mem), 6);
    t.ack(Ok(()));
    e.poll().unwrap();
    assert!(t.output().is_empty(), "nothing leaves before its commit");
    assert_eq!(
        t.send(&mut e, Command::CommitEpoch { epoch: 0 }),
        Ok(Reply::Done)
    );
    assert_eq!(t.output(), [(0, b"r0".to_vec())]);
    assert_eq!(held_word(&mem), 4);
    // Released output comes with no OutputAvailable hint: the tool's
    // bridge reads the channel by itself (docs/REPLICATION.md).
    assert!(
        t.evt.pop_request().unwrap().is_none(),
        "no event after a commit that released output"
    );
    // Epoch 1 is staged but never committed: Detach lets its output go,
    // tagged unprotected.
    e.stage(core::iter::empty(), &ram, &vcpu(1), header())
        .unwrap();
    assert_eq!(t.send(&mut e, Command::Detach), Ok(Reply::Done));
    assert_eq!(
        t.output(),
        [
            (UNPROTECTED_EPOCH, b"r1".to_vec()),
            (UNPROTECTED_EPOCH, b"r2".to_vec())
        ]
    );
    assert_eq!(held_word(&mem), 0);
    assert!(!e.tracking() && !e.replicating());
    // Detached: output goes out at once; the old checkpoint's ack is
    // skipped unread.
    t.ack(Ok(()));
    assert!(e.send(b"r3").unwrap());
    e.poll().unwrap();
    assert_eq!(t.output(), [(UNPROTECTED_EPOCH, b"r3".to_vec())]);
    assert_eq!(t.send(&mut e, Command::Detach), Err(Errno::EINVAL), "twice");
    // Re-attach: a new session from epoch 0 with every page.
    assert_eq!(t.send(&mut e, ENABLE), Ok(Reply::Done));
    assert!(e.tracking() && e.next_epoch() == 0);
    let s = e
        .stage(bitmap_pfns(&[1]), &ram, &vcpu(2), header())
        .unwrap();
    assert_eq!((s.epoch, s.dirty), (0, PAGES));
    assert_eq!(e.stats().detaches, 1);
    assert_eq!(e.stats().released, 4);
}

#[test]
fn input_records_reach_the_guest() {
    let (mem, view) = area(Role::Service);
    let mut e = engine(&mem, view, Role::Service, ());
    let mut t = tool(&mem, &view);
    assert_eq!(e.recv(&mut [0u8; 8]), Ok(Recv::Empty));
    t.inp.write_record(0, b"hello").unwrap();
    t.inp.publish();
    assert_eq!(e.recv(&mut [0u8; 2]), Ok(Recv::TooSmall));
    let mut buf = [0u8; 8];
    assert_eq!(e.recv(&mut buf), Ok(Recv::Record(5)));
    assert_eq!(&buf[..5], b"hello");
}

/// Refuses activation below epoch 3 (as a service checks its RAM).
struct AtLeast3;
impl Hooks for AtLeast3 {
    fn check_activation(&mut self, epoch: u64, state: &VcpuState) -> Result<(), Errno> {
        if epoch >= 3 && state.rbx == epoch {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }
}

#[test]
fn activate_checks_the_record_then_the_standby_serves_and_can_be_protected() {
    let (mem, view) = area(Role::Standby);
    let mut s = engine(&mem, view, Role::Standby, AtLeast3);
    let mut t = tool(&mem, &view);
    // No record in the vCPU area yet.
    assert_eq!(
        t.send(&mut s, Command::Activate { epoch: 3 }),
        Err(Errno::EINVAL)
    );
    let (vo, vs) = view.region(Field::VcpuArea);
    let mut blob = vec![0u8; vs];
    let n = crate::hvm::encode(&[vcpu(3)], header(), &mut blob).unwrap();
    mem.write_bytes(vo, &blob[..n]);
    // The hook refuses epoch 2's claim; the standby keeps waiting.
    assert_eq!(
        t.send(&mut s, Command::Activate { epoch: 2 }),
        Err(Errno::EINVAL)
    );
    assert!(s.activated().is_none());
    assert_eq!(
        t.send(&mut s, Command::Activate { epoch: 3 }),
        Ok(Reply::Done)
    );
    assert_eq!(s.activated().map(|a| (a.0, a.1.rbx)), Some((3, 3)));
    assert_eq!(
        t.send(&mut s, Command::Activate { epoch: 3 }),
        Err(Errno::EINVAL)
    );
    assert!(!s.tracking() && !s.replicating());
    // Unreplicated: output out at once, tagged epoch + 1.
    assert!(s.send(b"a").unwrap());
    assert_eq!(t.output(), [(4, b"a".to_vec())]);
    // Protected in its turn: a primary from epoch 0 with every page.
    assert_eq!(t.send(&mut s, ENABLE), Ok(Reply::Done));
    assert_eq!(s.role(), Role::Service);
    let st = s
        .stage(core::iter::empty(), &Ram::new(), &vcpu(0), header())
        .unwrap();
    assert_eq!((st.epoch, st.dirty), (0, PAGES));
    assert!(s.send(b"b").unwrap());
    assert!(t.output().is_empty(), "held again");
}

/// `LogDirtyEnable` takes exactly the modes the backend offered, and a
/// later session (after `Detach`) only the mode the guest already tracks
/// with: its tracker was built for it.
#[test]
fn log_dirty_modes_are_the_backends() {
    let enable = |mode| Command::LogDirtyEnable { mode };
    let (mem, view) = area(Role::Service);
    let mut e = engine(&mem, view, Role::Service, ());
    let mut t = tool(&mem, &view);
    e.offer_modes(&[LogDirtyMode::WriteProtect, LogDirtyMode::Pml]);
    assert_eq!(e.log_dirty_mode(), LogDirtyMode::WriteProtect);
    assert_eq!(
        t.send(&mut e, enable(LogDirtyMode::AdScan)),
        Err(Errno::EOPNOTSUPP),
        "not offered"
    );
    assert!(!e.enabled());
    assert_eq!(t.send(&mut e, enable(LogDirtyMode::Pml)), Ok(Reply::Done));
    assert_eq!(e.log_dirty_mode(), LogDirtyMode::Pml);
    assert_eq!(t.send(&mut e, Command::Detach), Ok(Reply::Done));
    assert_eq!(
        t.send(&mut e, enable(LogDirtyMode::WriteProtect)),
        Err(Errno::EOPNOTSUPP),
        "offered, but the guest tracks with PML"
    );
    assert!(e.detached());
    assert_eq!(t.send(&mut e, enable(LogDirtyMode::Pml)), Ok(Reply::Done));
    assert!(e.replicating());
    assert_eq!(e.log_dirty_mode(), LogDirtyMode::Pml);
}
