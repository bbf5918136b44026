//! The epoch handshake between the hypervisor (hv/core's `DmLink`) and
//! the device model (`doppel::dm::Area`), end to end over one fake machine
//! RAM file: the hypervisor asks for the end of an epoch, the device model
//! reports the guest pages it wrote and holds off guest RAM, the
//! hypervisor takes those pages into its harvest and lets it go on. Both
//! sides refuse what a hostile peer could put in the bitmap.

use std::fs::File;

use doppel::dm::{Area, AreaError};
use doppel::machine::MachineRam;
use doppel_abi::ioreq::{
    device, dm_area_size, dm_locator, virtio_devices, DmDevice, DmHeader, DM_LOCATOR_OFFSET, PAGE,
    VIRTIO_WINDOW_BASE, VIRTIO_WINDOW_SIZE,
};
use doppel_abi::locator::LOCATOR_AT;
use doppel_abi::{AtomicMem64, SharedMem};
use doppel_core::dm::{DmError, DmLink};
use doppel_core::engine::control::publish_locator_words;

const FILE_BYTES: u64 = 8 << 20;
const AREA_AT: u64 = 0x10_0000;
const GUEST_AT: u64 = 0x20_0000;
/// 1000 pages: not a whole bitmap word, so bits past the guest exist.
const GUEST_PAGES: u64 = 1000;

struct Machine {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    hv: MachineRam,
}

fn machine() -> Machine {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine.ram");
    File::create(&path).unwrap().set_len(FILE_BYTES).unwrap();
    let hv = MachineRam::open(&path).unwrap();
    Machine {
        _dir: dir,
        path,
        hv,
    }
}

fn header() -> DmHeader {
    let devs: Vec<DmDevice> = virtio_devices(&[device::NET, device::BLK]).collect();
    DmHeader::new(
        GUEST_AT,
        GUEST_PAGES * PAGE as u64,
        VIRTIO_WINDOW_BASE,
        VIRTIO_WINDOW_SIZE,
        &devs,
    )
}

impl Machine {
    /// Publish `h` as the hypervisor does: the area, then the locator.
    fn publish(&self, h: DmHeader) -> DmLink<AtomicMem64<'_>> {
        let link = DmLink::publish(self.hv.window(AREA_AT as usize), h);
        publish_locator_words(
            &self.hv.window((LOCATOR_AT + DM_LOCATOR_OFFSET) as usize),
            &dm_locator(AREA_AT, dm_area_size(GUEST_PAGES * PAGE as u64)),
        );
        link
    }

    fn area(&self) -> Result<Area, AreaError> {
        Area::find(MachineRam::open(&self.path).unwrap()).map_err(|(_, e)| e)
    }
}

fn harvest() -> Vec<u8> {
    vec![0u8; GUEST_PAGES.div_ceil(8) as usize]
}

fn pfns(h: &[u8]) -> Vec<u64> {
    (0..h.len() as u64 * 8)
        .filter(|p| h[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

#[test]
fn the_device_models_pages_reach_the_harvest_and_it_holds_until_resumed() {
    let m = machine();
    let mut link = m.publish(header());
    let mut area = m.area().unwrap();
    assert_eq!(area.quiesce_requested(), None, "nothing asked yet");
    assert!(!area.held());
    for epoch in [0u64, 1, 2] {
        let dm_pages = [epoch, 17, 999 - epoch];
        let mut looks = 0;
        link.quiesce(epoch, || {
            looks += 1;
            // The device model's loop: it sees the request on a later look.
            if looks == 2 {
                assert_eq!(area.quiesce_requested(), Some(epoch));
                assert_eq!(area.answer_quiesce(epoch, dm_pages), 0);
                assert_eq!(area.quiesce_requested(), None, "answered");
            }
            true
        })
        .unwrap();
        assert!(area.held(), "off guest RAM until resumed");
        let mut h = harvest();
        h[5] = 1; // pfn 40, the tracker's
        assert_eq!(link.take_dirty(&mut h), 3);
        let mut want = vec![epoch, 17, 40, 999 - epoch];
        want.sort();
        want.dedup();
        assert_eq!(pfns(&h), want, "epoch {epoch}");
        link.resume(epoch);
        assert!(!area.held(), "resumed");
        assert_eq!(area.quiesce_requested(), None);
    }
    assert_eq!(link.stats.quiesces, 3);
}

#[test]
fn a_device_model_that_never_answers_is_no_answer_after_the_patience() {
    let m = machine();
    let mut link = m.publish(header());
    let area = m.area().unwrap();
    let mut looks = 0;
    let r = link.quiesce(3, || {
        looks += 1;
        looks < 100
    });
    assert_eq!(r, Err(DmError::NoAnswer));
    assert_eq!(looks, 100);
    assert_eq!(area.quiesce_requested(), Some(3), "still asked");
    assert!(!area.held(), "never answered: not held");
    assert!(area.hv_alive() >= 99, "the hypervisor beat while it waited");
}

#[test]
fn hostile_bits_never_reach_past_the_harvest() {
    let m = machine();
    let mut link = m.publish(header());
    let mut area = m.area().unwrap();
    // The device model names pages beyond the guest: dropped on its side.
    link.quiesce(0, || {
        assert_eq!(area.answer_quiesce(0, [5, GUEST_PAGES, u64::MAX]), 2);
        true
    })
    .unwrap();
    // A hostile peer sets every bit of the whole bitmap directly.
    let h = *link.header();
    let mem = m.hv.window(AREA_AT as usize);
    for w in 0..(h.dirty_bytes / 4) as usize {
        mem.store_u32(h.dirty_page as usize + w * 4, u32::MAX);
    }
    let mut buf = harvest();
    buf.extend([0u8; 64]);
    let n = buf.len() - 64;
    assert_eq!(link.take_dirty(&mut buf[..n]), GUEST_PAGES);
    assert!(buf[n..].iter().all(|&b| b == 0), "nothing past the harvest");
    assert_eq!(pfns(&buf[..n]).len() as u64, GUEST_PAGES);
    assert_eq!(
        link.stats.refused_dirty,
        h.dirty_bytes * 8 - GUEST_PAGES,
        "the rest dropped"
    );
    let mut rest = vec![0u8; h.dirty_bytes as usize];
    mem.read_bytes(h.dirty_page as usize, &mut rest);
    assert!(rest.iter().all(|&b| b == 0), "the bitmap is empty again");
}

#[test]
fn the_device_model_refuses_an_area_whose_bitmap_is_misplaced() {
    let cases: [fn(&mut DmHeader); 4] = [
        |h| h.dirty_page = 2 * PAGE as u64, // over the buffered page
        |h| h.dirty_bytes = 0,
        |h| h.dirty_bytes = 64 << 20, // past the area
        |h| h.total_size = 64 << 20,  // more than the locator gives
    ];
    for (i, f) in cases.iter().enumerate() {
        let m = machine();
        let mut h = header();
        f(&mut h);
        let _link = m.publish(h);
        let e = m
            .area()
            .err()
            .unwrap_or_else(|| panic!("case {i} accepted"));
        let text = e.to_string();
        assert!(
            text.contains("bitmap") || text.contains("total_size"),
            "case {i}: {text}"
        );
    }
}

#[test]
fn the_checkpoint_is_staged_with_the_device_model_held_and_its_pages_in() {
    let m = machine();
    let mut link = m.publish(header());
    // The device model answers in `wait` and is looked at in `stage`.
    let area = std::cell::RefCell::new(m.area().unwrap());
    let mut h = harvest();
    h[0] = 0b100; // pfn 2, the tracker's
    let staged = link
        .epoch_cut(
            9,
            &mut h,
            || {
                let mut a = area.borrow_mut();
                if let Some(e) = a.quiesce_requested() {
                    a.answer_quiesce(e, [500]);
                }
                true
            },
            |staged| {
                assert!(
                    area.borrow().held(),
                    "the device model is off guest RAM while staging"
                );
                pfns(staged)
            },
        )
        .unwrap();
    assert_eq!(staged, [2, 500], "staged with the device model's page");
    assert!(!area.borrow().held(), "resumed after staging");
    // Silent: nothing is staged.
    let mut looks = 0;
    let r = link.epoch_cut(
        10,
        &mut h,
        || {
            looks += 1;
            looks < 5
        },
        |_| panic!("staged without the device model's answer"),
    );
    assert_eq!(r, Err(DmError::NoAnswer));
}
