//! The device-model area in machine memory (issue 20): allocated,
//! published through the device-model locator (the locator page's second
//! half, hv/abi `ioreq`) and handed to hv/core's [`DmLink`], which carries
//! the Linux guest's accesses to its virtio-mmio devices to `doppel run`
//! and brings their interrupts back.

use core::sync::atomic::{AtomicU32, AtomicU64};

use doppel_abi::ioreq::{dm_locator, DmDevice, DmHeader, DM_LOCATOR_OFFSET, DM_LOCATOR_WORDS};
use doppel_abi::{AtomicMem, AtomicMem64};
use doppel_core::dm::{area_bytes, DmLink};
use doppel_core::engine::control::publish_locator_words;

use super::guest::GuestRam;
use crate::mem::frames;

/// The area, as the kernel uses it.
pub type Link = DmLink<AtomicMem<'static>>;

/// Allocate the device-model area for `ram` and `devices` (placed in the
/// window of `window_base`, `window_size`), publish its header and then
/// its locator. The area lives as long as the hypervisor.
pub fn publish(
    ram: &GuestRam,
    window_base: u64,
    window_size: u64,
    devices: &[DmDevice],
) -> Result<Link, &'static str> {
    let size = area_bytes(ram.bytes()) as u64;
    let pa = frames::alloc_contiguous(size, 4096).ok_or("no memory for the device-model area")?;
    // SAFETY: `pa..pa+size` is fresh, zeroed, identity-mapped memory the
    // frame allocator gave us, page aligned and never freed (the area
    // lives as long as the hypervisor). Besides us only the device model
    // accesses it, from the emulator's host process; every access on our
    // side goes through these atomic 32-bit words (the buffered ring's two
    // pointers share an 8-byte word, one written by each side: 32-bit
    // stores never touch the peer's half).
    let words: &'static [AtomicU32] =
        unsafe { core::slice::from_raw_parts(pa as *const AtomicU32, (size / 4) as usize) };
    let header = DmHeader::new(ram.hpa(), ram.bytes(), window_base, window_size, devices);
    header
        .validate()
        .map_err(|_| "own device-model header does not validate")?;
    let link = DmLink::publish(AtomicMem::new(words), header);
    let at = frames::locator_page().ok_or(
        "the locator page (512 KiB) is not free RAM; the device model could not find its area",
    )? + DM_LOCATOR_OFFSET;
    // SAFETY: the locator page was reserved at boot (never handed out by
    // the frame allocator, so never guest RAM and never mapped for a
    // guest), is identity mapped and lives for the whole run; its second
    // half (from `DM_LOCATOR_OFFSET`, 8-byte aligned) holds only this
    // locator. Besides us only the device model reads it; every access
    // here is atomic.
    let loc: &'static [AtomicU64] =
        unsafe { core::slice::from_raw_parts(at as *const AtomicU64, DM_LOCATOR_WORDS) };
    publish_locator_words(&AtomicMem64::new(loc), &dm_locator(pa, size));
    log::info!(
        "devices: device-model area at {pa:#x} ({size} bytes), {} device(s) in the window {window_base:#x}+{window_size:#x}; waiting for `doppel run`",
        devices.len()
    );
    Ok(link)
}
