//! `doppel run`'s device model against a fake machine: a temp file as
//! machine RAM holding the device-model locator, area and guest RAM as
//! the hypervisor writes them (hv/core's `DmLink`, the hypervisor's own
//! end of the protocol), the test playing the hypervisor and a minimal
//! virtio driver (feature negotiation, split queues in guest RAM,
//! notifies through the buffered ring, interrupt status through the
//! slot).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use doppel::dm::{Area, AreaError, Backends, DeviceModel, DiskWrite, DmError, NetSpec, Stop};
use doppel::machine::MachineRam;
use doppel_abi::ioreq::{
    self, buffered_push, device, dm_locator, kind, publish_slot, read_slot, state, virtio_devices,
    Access, BufIoreq, DmDevice, DmHeader, IoreqError, DM_AREA_SIZE, DM_LOCATOR_OFFSET,
    VIRTIO_WINDOW_BASE, VIRTIO_WINDOW_SIZE,
};
use doppel_abi::locator::LOCATOR_AT;
use doppel_abi::{AtomicMem64, SharedMem};
use doppel_core::dm::DmLink;
use doppel_core::engine::control::publish_locator_words;

const FILE_BYTES: u64 = 8 << 20;
const AREA_AT: u64 = 0x10_0000;
const GUEST_AT: u64 = 0x20_0000;
const GUEST_BYTES: u64 = 4 << 20;

/// A fake machine: the RAM file and its hypervisor-side mapping.
struct Machine {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    hv: MachineRam,
}

impl Machine {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine.ram");
        File::create(&path).unwrap().set_len(FILE_BYTES).unwrap();
        let hv = MachineRam::open(&path).unwrap();
        Self {
            _dir: dir,
            path,
            hv,
        }
    }

    fn header(kinds: &[u32]) -> DmHeader {
        let devs: Vec<DmDevice> = virtio_devices(kinds).collect();
        DmHeader::new(
            GUEST_AT,
            GUEST_BYTES,
            VIRTIO_WINDOW_BASE,
            VIRTIO_WINDOW_SIZE,
            &devs,
        )
    }

    /// Publish `header` as the hypervisor does: the area, then the locator.
    fn publish(&self, header: DmHeader) -> DmLink<AtomicMem64<'_>> {
        let link = DmLink::publish(self.hv.window(AREA_AT as usize), header);
        publish_locator_words(
            &self.hv.window((LOCATOR_AT + DM_LOCATOR_OFFSET) as usize),
            &dm_locator(AREA_AT, DM_AREA_SIZE),
        );
        link
    }

    /// The published area, found as `doppel run` finds it.
    fn area(&self) -> Area {
        Area::find(MachineRam::open(&self.path).unwrap())
            .map_err(|(_, e)| e)
            .unwrap()
    }

    fn write(&self, gpa: u64, b: &[u8]) {
        self.hv.mem().write_bytes((GUEST_AT + gpa) as usize, b);
    }

    fn read(&self, gpa: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.hv.mem().read_bytes((GUEST_AT + gpa) as usize, &mut b);
        b
    }
}

// virtio-mmio registers.
const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const STATUS: u64 = 0x70;
const QUEUE_DESC: u64 = 0x80;
const QUEUE_AVAIL: u64 = 0x90;
const QUEUE_USED: u64 = 0xa0;
const CONFIG: u64 = 0x100;

const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const VERSION_1: u64 = 1 << 32;

const QSIZE: u16 = 8;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

/// The test's driver: the hypervisor's link, and the device model it
/// drives a step at a time while it waits for an answer.
struct Drv<'a> {
    m: &'a Machine,
    link: DmLink<AtomicMem64<'a>>,
    dm: DeviceModel,
    /// Register base of the device driven.
    base: u64,
    /// Per queue: ring base in guest RAM, next avail index.
    queues: Vec<(u64, u16)>,
}

impl<'a> Drv<'a> {
    fn new(m: &'a Machine, kinds: &[u32], backends: &Backends) -> Self {
        Self::with(m, kinds, |a| DeviceModel::new(a, backends).unwrap())
    }

    /// A driver of a replicated device model (frames held, writes logged).
    fn replicated(m: &'a Machine, kinds: &[u32], backends: &Backends) -> Self {
        Self::with(m, kinds, |a| DeviceModel::replicated(a, backends).unwrap())
    }

    fn with(m: &'a Machine, kinds: &[u32], dm: impl FnOnce(Area) -> DeviceModel) -> Self {
        let link = m.publish(Machine::header(kinds));
        let dm = dm(m.area());
        Self {
            m,
            link,
            dm,
            base: VIRTIO_WINDOW_BASE,
            queues: Vec::new(),
        }
    }

    fn access(&mut self, off: u64, size: u8, read: bool, data: u64) -> u64 {
        let a = Access {
            kind: kind::COPY,
            addr: self.base + off,
            size,
            read,
            data,
        };
        let dm = &mut self.dm;
        let mut tries = 0;
        self.link
            .access(a, || {
                dm.step();
                tries += 1;
                tries < 100
            })
            .unwrap()
    }

    fn rd(&mut self, off: u64) -> u32 {
        self.access(off, 4, true, 0) as u32
    }

    fn wr(&mut self, off: u64, v: u32) {
        self.access(off, 4, false, u64::from(v));
    }

    /// Negotiate `features` (as written, VERSION_1 or not); the status
    /// read back.
    fn negotiate(&mut self, features: u64) -> u32 {
        self.wr(STATUS, 0);
        self.wr(STATUS, ACK | DRIVER);
        self.wr(DRIVER_FEATURES_SEL, 0);
        self.wr(DRIVER_FEATURES, features as u32);
        self.wr(DRIVER_FEATURES_SEL, 1);
        self.wr(DRIVER_FEATURES, (features >> 32) as u32);
        self.wr(STATUS, ACK | DRIVER | FEATURES_OK);
        self.rd(STATUS)
    }

    /// Set up queues `0..n` at `ring_gpa + q * 0x1000` and go live.
    fn setup(&mut self, features: u64, n: usize, ring_gpa: u64) {
        assert_eq!(self.negotiate(features) & FEATURES_OK, FEATURES_OK);
        for q in 0..n {
            let at = ring_gpa + q as u64 * 0x1000;
            self.wr(QUEUE_SEL, q as u32);
            assert_eq!(self.rd(QUEUE_NUM_MAX), 256);
            self.wr(QUEUE_NUM, u32::from(QSIZE));
            for (reg, gpa) in [
                (QUEUE_DESC, at),
                (QUEUE_AVAIL, at + 0x100),
                (QUEUE_USED, at + 0x200),
            ] {
                self.wr(reg, gpa as u32);
                self.wr(reg + 4, (gpa >> 32) as u32);
            }
            self.wr(QUEUE_READY, 1);
            assert_eq!(self.rd(QUEUE_READY), 1, "queue {q} ready");
            self.queues.push((at, 0));
        }
        self.wr(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.rd(STATUS) & DRIVER_OK, DRIVER_OK);
    }

    /// Put the chain `descs` (gpa, len, flags) on queue `q` (descriptors
    /// from 0: one request in flight at a time).
    fn post(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
        let (at, idx) = self.queues[q];
        for (i, &(gpa, len, flags)) in descs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&gpa.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let more = if i + 1 < descs.len() { DESC_NEXT } else { 0 };
            d[12..14].copy_from_slice(&(flags | more).to_le_bytes());
            d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            self.m.write(at + 16 * i as u64, &d);
        }
        self.m.write(
            at + 0x100 + 4 + 2 * u64::from(idx % QSIZE),
            &0u16.to_le_bytes(),
        );
        self.m
            .write(at + 0x100 + 2, &idx.wrapping_add(1).to_le_bytes());
        self.queues[q].1 = idx.wrapping_add(1);
    }

    /// Notify queue `q` through the buffered ring, as the hypervisor
    /// carries it, and let the device model take it.
    fn notify(&mut self, q: u32) {
        let a = Access {
            kind: kind::COPY,
            addr: self.base + QUEUE_NOTIFY,
            size: 4,
            read: false,
            data: u64::from(q),
        };
        self.link.post(a, || false).unwrap();
        self.dm.step();
    }

    /// The used ring of queue `q`: its index and last element (id, len).
    fn used(&self, q: usize) -> (u16, u32, u32) {
        let at = self.queues[q].0 + 0x200;
        let b = self.m.read(at, 4 + 8 * usize::from(QSIZE));
        let idx = u16::from_le_bytes([b[2], b[3]]);
        let e = 4 + 8 * usize::from(idx.wrapping_sub(1) % QSIZE);
        let id = u32::from_le_bytes(b[e..e + 4].try_into().unwrap());
        let len = u32::from_le_bytes(b[e + 4..e + 8].try_into().unwrap());
        (idx, id, len)
    }

    /// GSIs the device model raised since the last look.
    fn irqs(&mut self) -> Vec<u32> {
        let mut got = Vec::new();
        let mut refused = Vec::new();
        self.link.interrupts(|g| got.push(g), |e| refused.push(e));
        assert!(refused.is_empty(), "{refused:?}");
        got
    }
}

fn disk(bytes: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.img");
    let mut f = File::create(&p).unwrap();
    f.write_all(&vec![0x5a; bytes as usize]).unwrap();
    (dir, p)
}

/// A driver of one virtio-blk device over a fresh `bytes`-byte disk file:
/// the file's directory (kept alive), its path and the driver.
fn blk_driver(m: &Machine, bytes: u64) -> (tempfile::TempDir, std::path::PathBuf, Drv<'_>) {
    let (dd, path) = disk(bytes);
    let d = Drv::new(
        m,
        &[device::BLK],
        &Backends {
            net: None,
            disk: Some(path.clone()),
        },
    );
    (dd, path, d)
}

const BLK_IN: u32 = 0;
const BLK_OUT: u32 = 1;
const BLK_FLUSH: u32 = 4;
const BLK_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const REQ: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STAT: u64 = 0x3_0000;
const RINGS: u64 = 0x8_0000;

/// One virtio-blk request: header, data (`len` bytes, device-writable
/// for IN and GET_ID), status; the status byte and the used length.
fn blk_req(d: &mut Drv<'_>, ty: u32, sector: u64, len: u32) -> (u8, u32) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.m.write(REQ, &h);
    d.m.write(STAT, &[0xff]);
    let data_flags = if ty == BLK_IN || ty == BLK_GET_ID {
        DESC_WRITE
    } else {
        0
    };
    let mut chain = vec![(REQ, 16, 0)];
    if len > 0 {
        chain.push((DATA, len, data_flags));
    }
    chain.push((STAT, 1, DESC_WRITE));
    let before = d.used(0).0;
    d.post(0, &chain);
    d.notify(0);
    let (idx, id, used_len) = d.used(0);
    assert_eq!(idx, before.wrapping_add(1), "one request completed");
    assert_eq!(id, 0, "the chain's head");
    (d.m.read(STAT, 1)[0], used_len)
}

#[test]
fn blk_write_then_read_returns_the_bytes_and_the_file_holds_them() {
    let m = Machine::new();
    let (_dd, path, mut d) = blk_driver(&m, 64 * 1024);
    assert_eq!(d.rd(MAGIC), 0x7472_6976);
    assert_eq!(d.rd(VERSION), 2);
    assert_eq!(d.rd(DEVICE_ID), 2);
    d.wr(DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.rd(DEVICE_FEATURES), 1, "VERSION_1 (bit 32)");
    d.wr(DEVICE_FEATURES_SEL, 0);
    assert_eq!(d.rd(DEVICE_FEATURES), 1 << 9, "FLUSH, and no EVENT_IDX");
    assert_eq!(
        d.access(CONFIG, 8, true, 0),
        128,
        "capacity in 512-byte sectors"
    );
    d.setup(VERSION_1 | (1 << 9), 1, RINGS);

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    d.m.write(DATA, &pattern);
    assert_eq!(blk_req(&mut d, BLK_OUT, 2, 1024), (S_OK, 1));
    let mut on_disk = vec![0u8; 1024];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut on_disk, 1024)
        .unwrap();
    assert_eq!(on_disk, pattern, "the backing file holds the bytes");

    d.m.write(DATA, &[0u8; 1024]);
    assert_eq!(blk_req(&mut d, BLK_IN, 2, 1024), (S_OK, 1025));
    assert_eq!(d.m.read(DATA, 1024), pattern, "read back");

    // The interrupt: the device's GSI, InterruptStatus bit 0, ACK clears.
    assert_eq!(d.irqs(), vec![ioreq::VIRTIO_FIRST_GSI]);
    assert_eq!(d.rd(INTERRUPT_STATUS), 1);
    d.wr(INTERRUPT_ACK, 1);
    assert_eq!(d.rd(INTERRUPT_STATUS), 0);
    assert!(d.irqs().is_empty(), "nothing new");

    assert_eq!(blk_req(&mut d, BLK_FLUSH, 0, 0), (S_OK, 1));
    let (st, n) = blk_req(&mut d, BLK_GET_ID, 0, 20);
    assert_eq!((st, n), (S_OK, 21));
    assert_eq!(&d.m.read(DATA, 10), b"doppel-blk");
    assert_eq!(blk_req(&mut d, 99, 0, 0), (S_UNSUPP, 1));

    let s = d.dm.stats();
    assert_eq!((s.blk_writes, s.blk_reads, s.flushes), (1, 1, 1));
    assert_eq!(s.irqs, 5, "one per request");
    assert_eq!(s.buffered, 5, "each notify came on the buffered ring");
}

#[test]
fn a_blk_request_past_the_end_gets_ioerr_and_the_file_is_unchanged() {
    let m = Machine::new();
    let (_dd, path, mut d) = blk_driver(&m, 64 * 1024);
    d.setup(VERSION_1, 1, RINGS);
    let before = std::fs::read(&path).unwrap();
    d.m.write(DATA, &[0xee; 1024]);
    // Sector 127 is the last: two sectors from there run past the end.
    assert_eq!(blk_req(&mut d, BLK_OUT, 127, 1024), (S_IOERR, 1));
    assert_eq!(blk_req(&mut d, BLK_OUT, u64::MAX / 256, 512), (S_IOERR, 1));
    assert_eq!(blk_req(&mut d, BLK_IN, 128, 512), (S_IOERR, 1));
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024);
    // The last sector itself is fine.
    assert_eq!(blk_req(&mut d, BLK_OUT, 127, 512), (S_OK, 1));
    assert_eq!(d.dm.stats().blk_writes, 1);
}

#[test]
fn the_transport_refuses_what_the_spec_forbids() {
    let m = Machine::new();
    let (_dd, _path, mut d) = blk_driver(&m, 4096);
    // No VERSION_1: FEATURES_OK does not stick.
    assert_eq!(d.negotiate(1 << 9) & FEATURES_OK, 0);
    // A feature never offered (EVENT_IDX, bit 29): refused too.
    assert_eq!(d.negotiate(VERSION_1 | (1 << 29)) & FEATURES_OK, 0);
    // Read-only registers keep their values.
    d.wr(MAGIC, 0);
    d.wr(QUEUE_NUM_MAX, 4);
    assert_eq!(d.rd(MAGIC), 0x7472_6976);
    assert_eq!(d.rd(QUEUE_NUM_MAX), 256);
    d.setup(VERSION_1, 1, RINGS);
    // Queue set-up after DRIVER_OK changes nothing: still ready, and a
    // request still lands in the rings set up first.
    d.wr(QUEUE_READY, 0);
    d.wr(QUEUE_DESC, 0x40_0000);
    assert_eq!(d.rd(QUEUE_READY), 1);
    assert_eq!(blk_req(&mut d, BLK_FLUSH, 0, 0), (S_OK, 1));
    // A reset (status 0) takes the queue down.
    d.wr(STATUS, 0);
    assert_eq!(d.rd(QUEUE_READY), 0);
    assert_eq!(d.rd(STATUS), 0);
}

#[test]
fn a_malformed_slot_is_dropped_with_nothing_changed() {
    let m = Machine::new();
    let (_dd, _path, mut d) = blk_driver(&m, 4096);
    d.wr(STATUS, ACK);
    let before = d.dm.stats();
    let area = m.hv.window(AREA_AT as usize);
    let at = Machine::header(&[device::BLK]).ioreq_page as usize;
    // A 3-byte write to Status: never posted by the hypervisor.
    let mut bad = Access {
        kind: kind::COPY,
        addr: VIRTIO_WINDOW_BASE + STATUS,
        size: 4,
        read: false,
        data: 0,
    }
    .slot(state::READY);
    bad.size = 3;
    publish_slot(&area, at, &bad);
    for _ in 0..5 {
        d.dm.step();
    }
    assert_eq!(read_slot(&area, at), bad, "the slot is left as it was");
    let after = d.dm.stats();
    assert_eq!(after.errors, before.errors + 1, "refused once");
    assert_eq!(after.requests, before.requests, "nothing served");
    // A buffered slot that reads: consumed, refused, nothing else.
    let buf_at = Machine::header(&[device::BLK]).buffered_page as usize;
    let w = BufIoreq::write(ioreq::BufWrite {
        offset: STATUS as u32,
        size: 4,
        data: 0,
    })
    .unwrap();
    assert_eq!(
        buffered_push(&area, buf_at, BufIoreq(w.0 | (1 << 9))),
        Ok(true)
    );
    d.dm.step();
    let s = d.dm.stats();
    assert_eq!(s.errors, after.errors + 1);
    assert_eq!(s.buffered, after.buffered, "not taken as a write");
    assert_eq!(area.load_u32(buf_at), 1, "the ring moved past it");
    // The device is as it was: Status still ACK (a write of 0 would
    // have reset it), once the hypervisor takes its slot back.
    publish_slot(&area, at, &ioreq::Ioreq::default());
    assert_eq!(d.rd(STATUS), ACK);
}

#[test]
fn a_tampered_header_or_a_misplaced_area_is_refused_with_the_error_named() {
    let m = Machine::new();
    let mut h = Machine::header(&[device::NET, device::BLK]);
    h.devices[1].base = h.devices[0].base + 0x100;
    m.publish(h);
    let e = Area::find(MachineRam::open(&m.path).unwrap())
        .map_err(|(_, e)| e)
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            AreaError::Header {
                err: IoreqError::BadHeader(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("two devices whose registers overlap"),
        "{e}"
    );

    let mut h = Machine::header(&[device::BLK]);
    h.guest_ram_at = 0;
    h.guest_ram_size = 4 << 20;
    m.publish(h);
    let e = Area::find(MachineRam::open(&m.path).unwrap())
        .map_err(|(_, e)| e)
        .err()
        .unwrap();
    assert!(e.to_string().contains("guest-writable"), "{e}");

    // Nothing published: the locator's magic is named.
    let m2 = Machine::new();
    let e = Area::find(MachineRam::open(&m2.path).unwrap())
        .map_err(|(_, e)| e)
        .err()
        .unwrap();
    assert!(matches!(e, AreaError::NotPublished { magic: 0, .. }), "{e}");
}

#[test]
fn declared_devices_and_options_must_match() {
    let m = Machine::new();
    m.publish(Machine::header(&[device::NET]));
    let find = || {
        Area::find(MachineRam::open(&m.path).unwrap())
            .map_err(|(_, e)| e)
            .unwrap()
    };
    let e = DeviceModel::new(find(), &Backends::default())
        .err()
        .unwrap();
    assert!(matches!(e, DmError::NetMissing { slot: 0, gsi: 5 }), "{e}");
    assert!(e.to_string().contains("virtio-net") && e.to_string().contains("--net"));
    let (_dd, path) = disk(4096);
    let e = DeviceModel::new(
        find(),
        &Backends {
            net: None,
            disk: Some(path),
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, DmError::NetMissing { .. }), "{e}");
    m.publish(Machine::header(&[device::BLK]));
    let e = DeviceModel::new(
        find(),
        &Backends {
            net: Some(NetSpec {
                tap: "nothere0".into(),
                mac: [2, 0, 0, 0, 0, 1],
            }),
            disk: None,
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, DmError::DiskMissing { slot: 0, gsi: 5 }), "{e}");
}

#[test]
fn serve_ends_when_the_hypervisor_stops_beating_and_prints_the_summary() {
    let m = Machine::new();
    let (_dd, _path, mut d) = blk_driver(&m, 4096);
    d.link.beat();
    let t = std::time::Instant::now();
    let why =
        d.dm.serve(&AtomicBool::new(false), Duration::from_millis(300));
    assert_eq!(why, Stop::MachineGone);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        d.dm.serve(&AtomicBool::new(true), Duration::from_secs(5)),
        Stop::Signal
    );
    let dm_alive = d.link.dm_alive();
    assert!(dm_alive > 0, "the device model beat");
    assert_eq!(
        d.dm.stats().to_string(),
        "run: requests=0 buffered=0 irqs=0 tx_frames=0 rx_frames=0 rx_dropped=0 \
         blk_reads=0 blk_writes=0 flushes=0"
    );
}

// ---- virtio-net over a TAP in a network namespace of the test's own ----

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "ip {args:?}");
}

/// Enter the namespace `name` on this thread.
fn enter(name: &str) {
    let f = File::open(Path::new("/var/run/netns").join(name)).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace file descriptor we hold open; it
    // changes only this (test-owned) thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// An Ethernet + IPv4 + UDP frame from the guest (10.77.0.2:4000) to
/// `dst_mac`, 10.77.0.1:`port`, carrying `payload`.
fn udp_frame(dst_mac: [u8; 6], port: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[10, 77, 0, 2, 10, 77, 0, 1]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn tap_mac(ns: &str, tap: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            &format!("/sys/class/net/{tap}/address"),
        ])
        .output()
        .unwrap();
    doppel::dm::net::parse_mac(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// Wait until the kernel has the TAP `tap` in namespace `ns` up for
/// sending: its carrier comes with the device model's open, but until the
/// kernel's link watch activates the queueing discipline (up to a second
/// later, when the operstate turns "up") what the host sends on it is
/// dropped, so a datagram to the guest could vanish.
fn wait_up(ns: &str, tap: &str) {
    let t = std::time::Instant::now();
    loop {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "cat",
                &format!("/sys/class/net/{tap}/operstate"),
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "up" {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "TAP {tap} not up after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace `{tag}{pid}` holding the TAP `tap` at 10.77.0.1/24,
/// up, with the guest (10.77.0.2) at `GUEST_MAC` as a static neighbour;
/// the TAP's own MAC.
fn netns_with_tap(tag: &str, tap: &str) -> (Netns, [u8; 6]) {
    let ns = Netns(format!("{tag}{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    // No IPv6 chatter (router solicitations) into the receive buffer.
    for k in ["all", "default"] {
        let key = format!("net.ipv6.conf.{k}.disable_ipv6=1");
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "sysctl", "-qw", &key])
            .status();
    }
    ip(&[
        "netns", "exec", &ns.0, "ip", "tuntap", "add", "dev", tap, "mode", "tap",
    ]);
    ip(&[
        "netns",
        "exec",
        &ns.0,
        "ip",
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        tap,
    ]);
    ip(&["netns", "exec", &ns.0, "ip", "link", "set", tap, "up"]);
    ip(&[
        "netns",
        "exec",
        &ns.0,
        "ip",
        "neigh",
        "add",
        "10.77.0.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        tap,
    ]);
    let host_mac = tap_mac(&ns.0, tap);
    (ns, host_mac)
}

/// Backends of a NIC alone on TAP `tap`, with [`GUEST_MAC`].
fn net_only(tap: &str) -> Backends {
    Backends {
        net: Some(NetSpec {
            tap: tap.into(),
            mac: GUEST_MAC,
        }),
        disk: None,
    }
}

#[test]
fn net_frames_go_to_the_tap_and_come_back_into_receive_buffers() {
    if !Path::new("/dev/net/tun").exists() {
        println!("skipped: /dev/net/tun is missing (no TAP devices on this host)");
        return;
    }
    let tap = "dmtap0";
    let (ns, host_mac) = netns_with_tap("dmtest", tap);
    let name = ns.0.clone();
    // The device model and the sockets live in the namespace: a thread
    // of our own enters it.
    std::thread::spawn(move || {
        enter(&name);
        let m = Machine::new();
        let mut d = Drv::new(&m, &[device::NET], &net_only(tap));
        wait_up(&name, tap);
        assert_eq!(d.rd(DEVICE_ID), 1);
        let mac: Vec<u8> = (0..6)
            .map(|i| d.access(CONFIG + i, 1, true, 0) as u8)
            .collect();
        assert_eq!(mac, GUEST_MAC, "config: the MAC given");
        d.setup(VERSION_1 | (1 << 5), 2, RINGS);

        // TX: the frame shows up on the TAP (the namespace's stack
        // delivers it to our UDP socket).
        let sock = std::net::UdpSocket::bind("10.77.0.1:4001").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let frame = udp_frame(host_mac, 4001, b"from the guest");
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(&frame);
        d.m.write(DATA, &buf);
        d.post(1, &[(DATA, buf.len() as u32, 0)]);
        d.notify(1);
        assert_eq!(d.used(1).0, 1, "the transmit buffer came back");
        let mut got = [0u8; 64];
        let (n, from) = sock.recv_from(&mut got).unwrap();
        assert_eq!(&got[..n], b"from the guest");
        assert_eq!(from.to_string(), "10.77.0.2:4000");
        assert_eq!(d.dm.stats().tx_frames, 1);

        assert_eq!(d.irqs(), vec![ioreq::VIRTIO_FIRST_GSI], "TX raised");

        // RX: the guest posts a buffer, a datagram to it lands there.
        let rx_buf = 0x4_0000;
        d.m.write(rx_buf, &[0u8; 2048]);
        d.post(0, &[(rx_buf, 2048, DESC_WRITE)]);
        d.notify(0);
        sock.send_to(b"to the guest", "10.77.0.2:4000").unwrap();
        let t = std::time::Instant::now();
        while d.used(0).0 == 0 && t.elapsed() < Duration::from_secs(5) {
            d.dm.step();
        }
        let (idx, id, len) = d.used(0);
        assert_eq!((idx, id), (1, 0), "a receive buffer filled");
        let b = d.m.read(rx_buf, len as usize);
        assert_eq!(&b[10..12], &1u16.to_le_bytes(), "num_buffers = 1");
        assert_eq!(&b[12..18], &GUEST_MAC, "to the guest's MAC");
        assert!(b.ends_with(b"to the guest"), "the datagram's payload");
        assert_eq!(d.irqs(), vec![ioreq::VIRTIO_FIRST_GSI], "seq advanced");
        let s = d.dm.stats();
        assert!(s.rx_frames >= 1);
    })
    .join()
    .unwrap();
}

#[test]
fn a_disk_that_cannot_be_opened_is_named() {
    let m = Machine::new();
    m.publish(Machine::header(&[device::BLK]));
    let area = Area::find(MachineRam::open(&m.path).unwrap())
        .map_err(|(_, e)| e)
        .unwrap();
    let e = DeviceModel::new(
        area,
        &Backends {
            net: None,
            disk: Some("/nonexistent/disk.img".into()),
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
}

#[test]
fn the_ioreq_fuzz_seeds_mean_what_their_names_say() {
    use zerocopy::FromBytes;
    let seed = |name: &str| {
        std::fs::read(format!(
            "{}/../../fuzz/corpus/ioreq/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let b = seed("read_slot");
    let (slot, rest) = ioreq::Ioreq::read_from_prefix(&b).unwrap();
    let a = Access::from_slot(&slot).unwrap();
    assert!(a.read && a.size == 4 && a.addr == 0xd000_0070);
    let (ans, _) = ioreq::Ioreq::read_from_prefix(rest).unwrap();
    assert_eq!(a.answer(&ans), Ok(0xf));
    let (w, _) = ioreq::Ioreq::read_from_prefix(&seed("write_slot")[..]).unwrap();
    assert!(!Access::from_slot(&w).unwrap().read);
    let n = seed("buffered_notify");
    let bw = BufIoreq(u64::from_le_bytes(n[..8].try_into().unwrap()))
        .decode()
        .unwrap();
    assert_eq!((bw.offset, bw.size, bw.data), (0x50, 4, 1));
    let (h, _) = DmHeader::read_from_prefix(&seed("header_two_devices")[..]).unwrap();
    assert_eq!(h.validate(), Ok(()));
    assert_eq!(h.devices().len(), 2);
    let page = doppel_abi::ByteMem::new(seed("wild_pointers"));
    assert!(matches!(
        ioreq::buffered_pop(&page, 0),
        Some(Err(IoreqError::BadPointers { .. }))
    ));
}

/// `doppel run` itself: serves the slot, and ends with the summary line
/// once the hypervisor's liveness word stands still.
#[test]
fn doppel_run_serves_and_ends_with_the_summary_when_the_machine_goes() {
    let m = Machine::new();
    let (_dd, path) = disk(4096);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["run", "--hv-timeout", "1", "--machine-ram"])
        .arg(&m.path)
        .arg("--disk")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It waits for the area, then finds it once published.
    std::thread::sleep(Duration::from_millis(300));
    let mut link = m.publish(Machine::header(&[device::BLK]));
    link.beat();
    let t = std::time::Instant::now();
    let magic = link
        .access(
            Access {
                kind: kind::COPY,
                addr: VIRTIO_WINDOW_BASE + MAGIC,
                size: 4,
                read: true,
                data: 0,
            },
            || {
                std::thread::sleep(Duration::from_millis(1));
                t.elapsed() < Duration::from_secs(20)
            },
        )
        .unwrap();
    assert_eq!(magic, 0x7472_6976);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout.lines().last(),
        Some(
            "run: requests=1 buffered=0 irqs=0 tx_frames=0 rx_frames=0 rx_dropped=0 \
             blk_reads=0 blk_writes=0 flushes=0"
        ),
        "{stdout}"
    );
    assert!(link.dm_alive() > 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("run: waiting for the device-model area in"),
        "{stderr}"
    );
}

#[test]
fn doppel_run_names_a_declared_device_without_its_option() {
    let m = Machine::new();
    m.publish(Machine::header(&[device::NET, device::BLK]));
    let (_dd, path) = disk(4096);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["run", "--machine-ram"])
        .arg(&m.path)
        .arg("--disk")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("declares a virtio-net device (slot 0, GSI 5) but no --net"),
        "{stderr}"
    );
}

// ---- Under replication (issue 21): epochs, the state blob, held frames.

/// A replicated device model's driver of one virtio-blk device over a
/// fresh `bytes`-byte disk, set up with its queue at `RINGS`.
fn replicated_blk(m: &Machine, bytes: u64) -> (tempfile::TempDir, std::path::PathBuf, Drv<'_>) {
    let (dd, path) = disk(bytes);
    let mut d = Drv::replicated(
        m,
        &[device::BLK],
        &Backends {
            net: None,
            disk: Some(path.clone()),
        },
    );
    d.setup(VERSION_1, 1, RINGS);
    (dd, path, d)
}

const PAGE: u64 = 4096;

#[test]
fn a_seal_reports_exactly_the_pages_the_device_model_wrote_and_then_none() {
    let m = Machine::new();
    let (_dd, _path, mut d) = replicated_blk(&m, 64 * 1024);
    assert_eq!(
        d.dm.seal_epoch(0),
        Vec::<u64>::new(),
        "set-up writes nothing"
    );
    // The driver's own writes (the test's, through the hypervisor's
    // mapping) are the hypervisor tracker's business, not ours.
    d.m.write(DATA, &[0x11; 8192]);
    assert_eq!(d.dm.seal_epoch(1), Vec::<u64>::new());

    // An 8 KiB read: two data pages, the status byte's page, the used
    // ring's page; nothing else.
    assert_eq!(blk_req(&mut d, BLK_IN, 0, 8192), (S_OK, 8193));
    assert_eq!(
        d.dm.seal_epoch(2),
        vec![
            DATA / PAGE,
            DATA / PAGE + 1,
            STAT / PAGE,
            (RINGS + 0x200) / PAGE
        ]
    );
    assert_eq!(d.dm.seal_epoch(3), Vec::<u64>::new(), "reset at the seal");

    // A write reads the guest's data: only the status byte and used ring.
    assert_eq!(blk_req(&mut d, BLK_OUT, 0, 512), (S_OK, 1));
    assert_eq!(
        d.dm.seal_epoch(4),
        vec![STAT / PAGE, (RINGS + 0x200) / PAGE]
    );
}

#[test]
fn disk_writes_reach_the_file_at_once_and_are_logged_with_their_epoch() {
    let m = Machine::new();
    let (_dd, path, mut d) = replicated_blk(&m, 64 * 1024);
    let a: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    d.m.write(DATA, &a);
    assert_eq!(blk_req(&mut d, BLK_OUT, 2, 1024), (S_OK, 1));
    let mut on_disk = vec![0u8; 1024];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut on_disk, 1024)
        .unwrap();
    assert_eq!(on_disk, a, "applied to the primary's disk at once");
    assert_eq!(blk_req(&mut d, BLK_IN, 2, 1024), (S_OK, 1025), "not logged");
    d.dm.seal_epoch(1);

    d.m.write(DATA, &[0xb0; 512]);
    assert_eq!(blk_req(&mut d, BLK_OUT, 127, 512), (S_OK, 1));
    assert_eq!(blk_req(&mut d, BLK_OUT, 127, 1024), (S_IOERR, 1), "refused");
    d.m.write(DATA, &[0xb1; 512]);
    assert_eq!(blk_req(&mut d, BLK_OUT, 0, 512), (S_OK, 1));
    d.dm.seal_epoch(2);
    d.dm.seal_epoch(3);

    let (state2, w2) = d.dm.take_sealed(2).unwrap();
    assert_eq!(
        w2,
        vec![
            DiskWrite {
                offset: 127 * 512,
                data: vec![0xb0; 512]
            },
            DiskWrite {
                offset: 0,
                data: vec![0xb1; 512]
            },
        ],
        "epoch 2's writes in order, the refused one not among them"
    );
    assert!(state2.starts_with(b"DOPPELDS"));
    let (_, w1) = d.dm.take_sealed(1).unwrap();
    assert_eq!(
        w1,
        vec![DiskWrite {
            offset: 1024,
            data: a
        }]
    );
    assert_eq!(d.dm.take_sealed(3).unwrap().1, vec![], "no writes");
    assert_eq!(d.dm.take_sealed(2), None, "taken once");
    assert_eq!(d.dm.take_sealed(4), None, "never sealed");
    d.dm.commit(3);
    assert_eq!(d.dm.take_sealed(3), None, "committed");
}

#[test]
fn an_unreplicated_device_model_logs_no_disk_writes() {
    let m = Machine::new();
    let (_dd, _path, mut d) = blk_driver(&m, 64 * 1024);
    d.setup(VERSION_1, 1, RINGS);
    assert_eq!(blk_req(&mut d, BLK_OUT, 0, 512), (S_OK, 1));
    d.dm.seal_epoch(1);
    assert_eq!(d.dm.take_sealed(1).unwrap().1, vec![]);
}

/// Every register a driver reads back, for comparing two device models.
fn registers(d: &mut Drv<'_>, queues: u32) -> Vec<u32> {
    let mut r = vec![d.rd(STATUS), d.rd(INTERRUPT_STATUS), d.rd(QUEUE_SEL)];
    for q in 0..queues {
        d.wr(QUEUE_SEL, q);
        r.extend([d.rd(QUEUE_READY), d.rd(QUEUE_NUM_MAX)]);
    }
    for sel in 0..2 {
        d.wr(DEVICE_FEATURES_SEL, sel);
        r.push(d.rd(DEVICE_FEATURES));
    }
    r
}

#[test]
fn a_restored_device_model_continues_the_queues_and_raises_the_pending_interrupt_once() {
    let m = Machine::new();
    let (_dd, path, mut d) = replicated_blk(&m, 64 * 1024);
    let a: Vec<u8> = (0..512u32).map(|i| (i * 13 + 1) as u8).collect();
    d.m.write(DATA, &a);
    for _ in 0..3 {
        assert_eq!(blk_req(&mut d, BLK_OUT, 4, 512), (S_OK, 1));
    }
    assert_eq!(d.irqs(), vec![ioreq::VIRTIO_FIRST_GSI]);
    assert_eq!(d.rd(INTERRUPT_STATUS), 1, "not acknowledged");
    let before = registers(&mut d, 1);
    d.dm.seal_epoch(7);
    let (blob, _) = d.dm.take_sealed(7).unwrap();
    assert_eq!(blob, d.dm.state(), "nothing moved since the seal");

    let restored = DeviceModel::restore(
        m.area(),
        &Backends {
            net: None,
            disk: Some(path.clone()),
        },
        &blob,
    )
    .unwrap();
    assert!(!restored.is_replicated());
    d.dm = restored;
    d.dm.step();
    assert_eq!(d.irqs(), vec![ioreq::VIRTIO_FIRST_GSI], "raised once");
    d.dm.step();
    assert!(d.irqs().is_empty(), "and only once");
    assert_eq!(registers(&mut d, 1), before, "the same registers");
    assert_eq!(d.dm.state(), blob, "the same state");

    // The next request is served from the next avail entry, completed at
    // the next used index (blk_req checks it is 4).
    d.m.write(DATA, &[0u8; 512]);
    assert_eq!(blk_req(&mut d, BLK_IN, 4, 512), (S_OK, 513));
    assert_eq!(d.used(0).0, 4);
    assert_eq!(d.m.read(DATA, 512), a);
}

#[test]
fn a_blob_that_does_not_fit_the_machine_is_refused_with_the_field_named() {
    let m = Machine::new();
    let (_dd, path, mut d) = replicated_blk(&m, 64 * 1024);
    blk_req(&mut d, BLK_OUT, 0, 512);
    let blob = d.dm.state();
    let backends = Backends {
        net: None,
        disk: Some(path.clone()),
    };
    let refused = |b: &[u8]| match DeviceModel::restore(m.area(), &backends, b) {
        Err(DmError::State(e)) => e.to_string(),
        Err(e) => panic!("not a state error: {e}"),
        Ok(_) => panic!("accepted"),
    };
    let with = |at: usize, bytes: &[u8]| {
        let mut b = blob.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    // Layout: magic 0..8, version 8, count 12, device 0 from 16: kind 16,
    // status 20, sels 24 28, driver features 32, queue_sel 40, isr 44,
    // generation 48, queue count 52, queue 0 from 56: ready 56, size 57,
    // desc 59, avail 67, used 75, next_avail 83, next_used 85, event 87.
    assert_eq!(blob.len(), 88);
    for (b, want) in [
        (with(0, b"DOPPELDT"), "byte 0: magic"),
        (with(8, &2u32.to_le_bytes()), "byte 8: version: 2"),
        (with(12, &2u32.to_le_bytes()), "byte 12: device count: 2"),
        (with(16, &device::NET.to_le_bytes()), "device 0 kind"),
        (
            with(20, &0x4u32.to_le_bytes()),
            "DRIVER_OK without FEATURES_OK",
        ),
        (
            with(32, &(1u64 << 40).to_le_bytes()),
            "device 0 driver features",
        ),
        (with(44, &4u32.to_le_bytes()), "device 0 interrupt status"),
        (with(52, &2u32.to_le_bytes()), "device 0 queue count"),
        (with(56, &[2]), "device 0 queue 0 ready: 2 is neither"),
        (with(57, &6u16.to_le_bytes()), "device 0 queue 0 size: 6"),
        (
            with(57, &512u16.to_le_bytes()),
            "device 0 queue 0 size: 512",
        ),
        (
            with(75, &GUEST_BYTES.to_le_bytes()),
            "device 0 queue 0 rings",
        ),
        (with(87, &[1]), "device 0 queue 0 event idx"),
        (blob[..87].to_vec(), "truncated"),
        ([blob.as_slice(), &[0]].concat(), "byte 88: end"),
    ] {
        let e = refused(&b);
        assert!(e.contains(want), "{e:?} names {want:?}");
    }
    // The blob is checked before any backend is opened: a disk that does
    // not exist is never reached.
    let nowhere = Backends {
        net: None,
        disk: Some(path.with_extension("absent")),
    };
    match DeviceModel::restore(m.area(), &nowhere, &blob[..40]) {
        Err(DmError::State(e)) => assert!(e.why.contains("truncated"), "{e}"),
        Err(e) => panic!("not a state error: {e}"),
        Ok(_) => panic!("accepted"),
    }
    assert!(matches!(
        DeviceModel::restore(m.area(), &nowhere, &blob),
        Err(DmError::Disk { .. })
    ));
}

/// An AF_PACKET socket on one interface: every frame crossing it.
struct Sniffer(std::os::fd::OwnedFd);

impl Sniffer {
    fn on(ifname: &str) -> Self {
        use std::os::fd::FromRawFd;
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked
        // before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(all),
            )
        };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "{ifname}: no such interface");
        // SAFETY: sockaddr_ll is plain old data; all zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = index as i32;
        use std::os::fd::AsRawFd;
        // SAFETY: bind reads one sockaddr_ll of the length given from a
        // live local; the socket is ours.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        Self(fd)
    }

    /// The frames from `src` seen within `wait`, in order.
    fn from(&self, src: [u8; 6], wait: Duration) -> Vec<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        let t = std::time::Instant::now();
        while t.elapsed() < wait {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`,
            // which is live and writable; the socket is ours.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let f = &buf[..n as usize];
            if f.len() >= 12 && f[6..12] == src {
                got.push(f.to_vec());
            }
        }
        got
    }
}

#[test]
fn replicated_frames_leave_only_when_their_epoch_commits_and_the_backup_announces_itself() {
    if !Path::new("/dev/net/tun").exists() {
        println!("skipped: /dev/net/tun is missing (no TAP devices on this host)");
        return;
    }
    let tap = "dmtap0";
    let (ns, host_mac) = netns_with_tap("dmrep", tap);
    let name = ns.0.clone();
    std::thread::spawn(move || {
        enter(&name);
        let m = Machine::new();
        let mut d = Drv::replicated(&m, &[device::NET], &net_only(tap));
        d.setup(VERSION_1 | (1 << 5), 2, RINGS);
        wait_up(&name, tap);
        let sniff = Sniffer::on(tap);
        // A listener, so the host answers nothing (no ICMP) to the guest.
        let sock = std::net::UdpSocket::bind("10.77.0.1:4001").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(d.dm.seal_epoch(0), Vec::<u64>::new());

        let frames: Vec<Vec<u8>> = (0..3)
            .map(|i| udp_frame(host_mac, 4001, format!("frame {i}").as_bytes()))
            .collect();
        let send = |d: &mut Drv<'_>, f: &[u8]| {
            let mut buf = vec![0u8; 12];
            buf.extend_from_slice(f);
            d.m.write(DATA, &buf);
            let before = d.used(1).0;
            d.post(1, &[(DATA, buf.len() as u32, 0)]);
            d.notify(1);
            assert_eq!(d.used(1).0, before + 1, "completed to the guest at once");
        };
        // Epoch 1: frame 0; epoch 2: frame 1; epoch 3 (in progress): frame 2.
        send(&mut d, &frames[0]);
        assert_eq!(d.dm.held_frames(), 1);
        assert_eq!(
            d.dm.seal_epoch(1),
            vec![(RINGS + 0x1000 + 0x200) / PAGE],
            "only the transmit used ring"
        );
        send(&mut d, &frames[1]);
        d.dm.seal_epoch(2);
        send(&mut d, &frames[2]);
        assert_eq!(d.dm.held_frames(), 3);
        assert_eq!(d.dm.stats().tx_frames, 3);
        assert!(
            sniff.from(GUEST_MAC, Duration::from_millis(300)).is_empty(),
            "nothing leaves before its epoch commits"
        );

        assert_eq!(d.dm.commit(1), 1);
        assert_eq!(
            sniff.from(GUEST_MAC, Duration::from_millis(300)),
            frames[..1]
        );
        assert_eq!(d.dm.commit(2), 1);
        assert_eq!(
            sniff.from(GUEST_MAC, Duration::from_millis(300)),
            frames[1..2]
        );
        let mut got = [0u8; 64];
        for want in [b"frame 0", b"frame 1"] {
            let (n, _) = sock.recv_from(&mut got).unwrap();
            assert_eq!(&got[..n], want, "delivered in order");
        }
        assert_eq!(d.dm.held_frames(), 1, "epoch 3's frame is still held");
        assert_eq!(d.dm.commit(2), 0, "epoch 3 is not sealed");
        assert_eq!(d.dm.discard_uncommitted(), 1);
        assert_eq!(d.dm.held_frames(), 0);
        d.dm.seal_epoch(3);
        assert_eq!(d.dm.commit(3), 0);
        assert!(
            sniff.from(GUEST_MAC, Duration::from_millis(300)).is_empty(),
            "a discarded frame never leaves"
        );

        // RX: the buffer's page and the receive used ring, nothing else.
        let rx_buf = 0x4_0000;
        d.m.write(rx_buf, &[0u8; 2048]);
        d.post(0, &[(rx_buf, 2048, DESC_WRITE)]);
        d.notify(0);
        assert_eq!(
            d.dm.seal_epoch(4),
            Vec::<u64>::new(),
            "posting writes nothing"
        );
        sock.send_to(b"to the guest", "10.77.0.2:4000").unwrap();
        let t = std::time::Instant::now();
        while d.used(0).0 == 0 && t.elapsed() < Duration::from_secs(5) {
            d.dm.step();
        }
        assert_eq!(d.used(0).0, 1, "received");
        assert_eq!(
            d.dm.seal_epoch(5),
            vec![rx_buf / PAGE, (RINGS + 0x200) / PAGE]
        );

        // The announce: RARP from the guest's MAC, byte for byte.
        assert!(d.dm.announce());
        assert_eq!(
            sniff.from(GUEST_MAC, Duration::from_millis(300)),
            vec![doppel::dm::epoch::rarp_announce(GUEST_MAC).to_vec()]
        );
    })
    .join()
    .unwrap();
}

/// The guest pfns set in a harvest bitmap.
fn harvest_pfns(h: &[u8]) -> Vec<u64> {
    (0..h.len() as u64 * 8)
        .filter(|p| h[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

/// The hypervisor's epoch end as the run loop does it, against the device
/// model's own loop (`step`): the quiesce seals the epoch with the disk
/// write made in it, the pages the device model wrote reach the harvest,
/// nothing is served while the checkpoint is staged, and after the resume
/// the device serves again.
#[test]
fn a_quiesce_seals_the_epoch_through_step_and_the_device_model_waits_for_the_resume() {
    let m = Machine::new();
    let (_dd, _path, mut d) = replicated_blk(&m, 64 * 1024);
    // The set-up's epoch, sealed and committed out of the way.
    d.dm.seal_epoch(0);
    assert!(d.dm.take_sealed(0).is_some());
    d.dm.commit(0);

    d.m.write(DATA, &[0x5a; 512]);
    assert_eq!(blk_req(&mut d, BLK_OUT, 3, 512), (S_OK, 1));
    let Drv { link, dm, .. } = &mut d;
    let mut looks = 0;
    link.quiesce(1, || {
        looks += 1;
        dm.step();
        looks < 100
    })
    .unwrap();
    // Held: the device model serves nothing until the resume.
    assert!(!d.dm.step());
    let mut h = vec![0u8; (GUEST_BYTES / PAGE / 8) as usize];
    d.link.take_dirty(&mut h);
    assert_eq!(harvest_pfns(&h), vec![STAT / PAGE, (RINGS + 0x200) / PAGE]);
    let (state, disk) = d.dm.take_sealed(1).expect("epoch 1 sealed by the quiesce");
    assert_eq!(
        disk,
        vec![DiskWrite {
            offset: 3 * 512,
            data: vec![0x5a; 512]
        }]
    );
    assert_eq!(state, d.dm.state());
    d.link.resume(1);
    assert_eq!(blk_req(&mut d, BLK_IN, 3, 512), (S_OK, 513));
    assert_eq!(d.m.read(DATA, 512), vec![0x5a; 512]);
}

/// `doppel run` replicates nothing: asked to seal an epoch it does not
/// answer, and the hypervisor gives up on it (and stops the guest).
#[test]
fn an_unreplicated_device_model_never_answers_a_quiesce() {
    let m = Machine::new();
    let (_dd, _path, mut d) = blk_driver(&m, 64 * 1024);
    d.setup(VERSION_1, 1, RINGS);
    let Drv { link, dm, .. } = &mut d;
    let mut looks = 0;
    let r = link.quiesce(0, || {
        looks += 1;
        dm.step();
        looks < 50
    });
    assert_eq!(r, Err(doppel_core::dm::DmError::NoAnswer));
}
