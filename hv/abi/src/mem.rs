//! The memory abstraction every shared structure in this crate runs over.
//!
//! The protocol code (ring indices, bounds, notify rule, validation) lives in
//! this crate and has no unsafe code, so it never touches raw shared memory.
//! It goes through [`SharedMem`]: the hypervisor implements it over its own
//! memory, the dom0 tool over an `mmap` of machine memory, tests and benches
//! use [`AtomicMem`], which is safe code over `&[AtomicU32]`.
//!
//! All multi-byte values in shared memory are little endian.

use core::sync::atomic::{fence, AtomicU32, Ordering};

/// A window of memory shared with an untrusted peer.
///
/// Offsets are byte offsets from the start of the window. The protocol code
/// in this crate only ever passes offsets it derived from a layout it checked
/// against [`SharedMem::size`] at attach time: `offset + len <= size()`, and
/// `offset % 4 == 0` for the `u32` accessors. An implementation may panic if
/// called outside that contract (that is a bug in the caller, never the
/// result of peer input).
///
/// The `u32` accessors are single atomic accesses with relaxed ordering; the
/// byte copies may tear (the peer can write concurrently; the protocol copies
/// entries out before validating them). Ordering comes from the fences, which
/// default to the hardware fences of `core::sync::atomic` and may be
/// overridden (for example by a model checker).
pub trait SharedMem {
    /// Size of the window in bytes.
    fn size(&self) -> usize;
    /// Atomic (relaxed) little-endian load of the `u32` at `offset`.
    fn load_u32(&self, offset: usize) -> u32;
    /// Atomic (relaxed) little-endian store of the `u32` at `offset`.
    fn store_u32(&self, offset: usize, value: u32);
    /// Copy `dst.len()` bytes starting at `offset` out of shared memory.
    fn read_bytes(&self, offset: usize, dst: &mut [u8]);
    /// Copy `src` into shared memory starting at `offset`.
    fn write_bytes(&self, offset: usize, src: &[u8]);
    /// Loads before this fence are not reordered with accesses after it
    /// (Xen's `xen_rmb`).
    fn fence_acquire(&self) {
        fence(Ordering::Acquire);
    }
    /// Accesses before this fence are not reordered with stores after it
    /// (Xen's `xen_wmb`).
    fn fence_release(&self) {
        fence(Ordering::Release);
    }
    /// Full barrier (Xen's `xen_mb`).
    fn fence_full(&self) {
        fence(Ordering::SeqCst);
    }
}

impl<T: SharedMem + ?Sized> SharedMem for &T {
    fn size(&self) -> usize {
        (**self).size()
    }
    fn load_u32(&self, offset: usize) -> u32 {
        (**self).load_u32(offset)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        (**self).store_u32(offset, value)
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        (**self).read_bytes(offset, dst)
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        (**self).write_bytes(offset, src)
    }
    fn fence_acquire(&self) {
        (**self).fence_acquire()
    }
    fn fence_release(&self) {
        (**self).fence_release()
    }
    fn fence_full(&self) {
        (**self).fence_full()
    }
}

/// [`SharedMem`] over a slice of `AtomicU32`, in safe code.
///
/// Every access is an atomic access, so two threads (or, after a one-line
/// cast of an `mmap`, two processes) may share it without data races in the
/// Rust sense. Byte `i` of the window is byte `i % 4` (little endian) of word
/// `i / 4`.
#[derive(Clone, Copy, Debug)]
pub struct AtomicMem<'a> {
    words: &'a [AtomicU32],
}

impl<'a> AtomicMem<'a> {
    /// A window over `words` (size = 4 bytes per word).
    pub fn new(words: &'a [AtomicU32]) -> Self {
        Self { words }
    }

    /// The words behind the window.
    pub fn words(&self) -> &'a [AtomicU32] {
        self.words
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        &self.words[offset / 4]
    }
}

impl SharedMem for AtomicMem<'_> {
    fn size(&self) -> usize {
        self.words.len() * 4
    }

    fn load_u32(&self, offset: usize) -> u32 {
        debug_assert_eq!(offset % 4, 0);
        u32::from_le(self.word(offset).load(Ordering::Relaxed))
    }

    fn store_u32(&self, offset: usize, value: u32) {
        debug_assert_eq!(offset % 4, 0);
        self.word(offset).store(value.to_le(), Ordering::Relaxed)
    }

    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        let mut pos = offset;
        let mut done = 0;
        while done < dst.len() {
            let bytes = self.word(pos).load(Ordering::Relaxed).to_ne_bytes();
            let start = pos % 4;
            let n = (4 - start).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&bytes[start..start + n]);
            done += n;
            pos += n;
        }
    }

    fn write_bytes(&self, offset: usize, src: &[u8]) {
        let mut pos = offset;
        let mut done = 0;
        while done < src.len() {
            let start = pos % 4;
            let n = (4 - start).min(src.len() - done);
            let w = self.word(pos);
            if n == 4 {
                let mut b = [0u8; 4];
                b.copy_from_slice(&src[done..done + 4]);
                w.store(u32::from_ne_bytes(b), Ordering::Relaxed);
            } else {
                // Part of a word: merge, so bytes the peer owns stay intact.
                let part = &src[done..done + n];
                let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                    let mut b = old.to_ne_bytes();
                    b[start..start + n].copy_from_slice(part);
                    Some(u32::from_ne_bytes(b))
                });
            }
            done += n;
            pos += n;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn buf(words: usize) -> Vec<AtomicU32> {
        (0..words).map(|_| AtomicU32::new(0)).collect()
    }

    #[test]
    fn bytes_and_words_agree_little_endian() {
        let b = buf(4);
        let m = AtomicMem::new(&b);
        m.store_u32(4, 0x4433_2211);
        let mut out = [0u8; 6];
        m.read_bytes(3, &mut out);
        assert_eq!(out, [0, 0x11, 0x22, 0x33, 0x44, 0]);
        m.write_bytes(5, &[0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        assert_eq!(m.load_u32(4), 0xccbb_aa11);
        assert_eq!(m.load_u32(8), 0x0000_eedd);
        assert_eq!(m.size(), 16);
    }

    proptest::proptest! {
        #[test]
        fn unaligned_copies_match_a_byte_model(
            ops in proptest::collection::vec((0usize..60, proptest::collection::vec(proptest::num::u8::ANY, 0..20)), 1..40)
        ) {
            let b = buf(20);
            let m = AtomicMem::new(&b);
            let mut model = [0u8; 80];
            for (off, data) in &ops {
                let len = data.len().min(80 - off);
                m.write_bytes(*off, &data[..len]);
                model[*off..off + len].copy_from_slice(&data[..len]);
            }
            let mut all = [0u8; 80];
            m.read_bytes(0, &mut all);
            proptest::prop_assert_eq!(&all[..], &model[..]);
            for w in 0..20 {
                let want = u32::from_le_bytes([model[4*w], model[4*w+1], model[4*w+2], model[4*w+3]]);
                proptest::prop_assert_eq!(m.load_u32(4 * w), want);
            }
        }
    }
}
