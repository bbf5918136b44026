//! The memory abstraction every shared structure in this crate runs over.
//!
//! The protocol code (ring indices, bounds, notify rule, validation) lives in
//! this crate and has no unsafe code, so it never touches raw shared memory.
//! It goes through [`SharedMem`]: the hypervisor implements it over its own
//! memory, the dom0 tool over an `mmap` of machine memory, tests and benches
//! use [`AtomicMem`], which is safe code over `&[AtomicU32]`; one-thread
//! tests, fuzz targets and host-side builders use [`ByteMem`] over a plain
//! byte buffer.
//!
//! All multi-byte values in shared memory are little endian.

use core::cell::RefCell;
use core::mem::size_of;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

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
    /// Little-endian store of the `u64` at `offset` (8-byte aligned): one
    /// atomic store where the implementation has 64-bit words. The default
    /// writes the 8 bytes with [`SharedMem::write_bytes`].
    fn store_u64(&self, offset: usize, value: u64) {
        self.write_bytes(offset, &value.to_le_bytes())
    }
    /// Swap the `u32` at `offset` to zero and return what it held: one
    /// atomic read-modify-write where the implementation has atomic words
    /// (a bit the peer sets meanwhile is either returned or stays set). The
    /// default loads and stores (for single-threaded test memory).
    fn take_u32(&self, offset: usize) -> u32 {
        let v = self.load_u32(offset);
        self.store_u32(offset, 0);
        v
    }
    /// OR `bits` into the `u32` at `offset`: one atomic read-modify-write
    /// where the implementation has atomic words. The default loads and
    /// stores.
    fn or_u32(&self, offset: usize, bits: u32) {
        let v = self.load_u32(offset);
        self.store_u32(offset, v | bits);
    }
    /// Hint that this side will soon write the `len` bytes at `offset`
    /// (and may read them first): an implementation over real memory can
    /// fetch their cache lines for ownership now, so that the read and the
    /// write that follow do not each wait on the peer's core. Changes no
    /// contents; a range outside the window is ignored. The default does
    /// nothing.
    fn prefetch_write(&self, offset: usize, len: usize) {
        let _ = (offset, len);
    }
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
    fn store_u64(&self, offset: usize, value: u64) {
        (**self).store_u64(offset, value)
    }
    fn take_u32(&self, offset: usize) -> u32 {
        (**self).take_u32(offset)
    }
    fn or_u32(&self, offset: usize, bits: u32) {
        (**self).or_u32(offset, bits)
    }
    fn prefetch_write(&self, offset: usize, len: usize) {
        (**self).prefetch_write(offset, len)
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

/// [`SharedMem::prefetch_write`] for the words that hold bytes
/// `offset .. offset + len` of a window of `W`-sized words: one PREFETCHW
/// per cache line they touch (`doppel-hint`), nothing if the range is not
/// inside the window.
#[inline]
fn prefetch_words<W>(words: &[W], offset: usize, len: usize) {
    let size = size_of::<W>();
    let Some(end) = offset.checked_add(len) else {
        return;
    };
    let Some(range) = words.get(offset / size..end.div_ceil(size)) else {
        return;
    };
    // One word in each line: the first, then each first word of a line
    // (words are aligned to their size, so the step is at least 1).
    let mut i = 0;
    while let Some(w) = range.get(i) {
        doppel_hint::prefetch_write(w);
        let into_line = core::ptr::from_ref(w).addr() % CACHE_LINE;
        i += (CACHE_LINE - into_line) / size;
    }
}

/// Cache line size of the x86-64 CPUs the hypervisor runs on.
const CACHE_LINE: usize = 64;

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

    #[inline]
    fn prefetch_write(&self, offset: usize, len: usize) {
        prefetch_words(self.words, offset, len);
    }

    fn load_u32(&self, offset: usize) -> u32 {
        debug_assert_eq!(offset % 4, 0);
        u32::from_le(self.word(offset).load(Ordering::Relaxed))
    }

    fn store_u32(&self, offset: usize, value: u32) {
        debug_assert_eq!(offset % 4, 0);
        self.word(offset).store(value.to_le(), Ordering::Relaxed)
    }

    fn take_u32(&self, offset: usize) -> u32 {
        debug_assert_eq!(offset % 4, 0);
        u32::from_le(self.word(offset).swap(0, Ordering::Relaxed))
    }

    fn or_u32(&self, offset: usize, bits: u32) {
        debug_assert_eq!(offset % 4, 0);
        self.word(offset).fetch_or(bits.to_le(), Ordering::Relaxed);
    }

    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        // Unaligned head, whole words, tail.
        let head = ((4 - offset % 4) % 4).min(dst.len());
        let (h, rest) = dst.split_at_mut(head);
        if !h.is_empty() {
            let b = self.word(offset).load(Ordering::Relaxed).to_ne_bytes();
            h.copy_from_slice(&b[offset % 4..offset % 4 + head]);
        }
        let first = (offset + head) / 4;
        let mut chunks = rest.chunks_exact_mut(4);
        let words = &self.words[first..first + chunks.len()];
        for (c, w) in (&mut chunks).zip(words) {
            c.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let b = self.words[first + words.len()]
                .load(Ordering::Relaxed)
                .to_ne_bytes();
            let n = tail.len();
            tail.copy_from_slice(&b[..n]);
        }
    }

    fn write_bytes(&self, offset: usize, src: &[u8]) {
        let head = ((4 - offset % 4) % 4).min(src.len());
        let (h, rest) = src.split_at(head);
        if !h.is_empty() {
            self.merge(offset / 4, offset % 4, h);
        }
        let first = (offset + head) / 4;
        let chunks = rest.chunks_exact(4);
        let tail = chunks.remainder();
        let words = &self.words[first..first + chunks.len()];
        for (c, w) in chunks.zip(words) {
            w.store(
                u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
                Ordering::Relaxed,
            );
        }
        if !tail.is_empty() {
            self.merge(first + words.len(), 0, tail);
        }
    }
}

impl AtomicMem<'_> {
    /// Write part of a word, keeping the bytes the peer owns intact.
    fn merge(&self, word: usize, start: usize, part: &[u8]) {
        let _ = self.words[word].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            let mut b = old.to_ne_bytes();
            b[start..start + part.len()].copy_from_slice(part);
            Some(u32::from_ne_bytes(b))
        });
    }
}

/// [`SharedMem`] over a slice of `AtomicU64`, in safe code: byte copies
/// move 8 bytes per access (faster than [`AtomicMem`] for ring entries);
/// a `u32` store is a compare-exchange on its 8-byte word. Byte `i` of the
/// window is byte `i % 8` (little endian) of word `i / 8`.
#[derive(Clone, Copy, Debug)]
pub struct AtomicMem64<'a> {
    words: &'a [AtomicU64],
}

impl<'a> AtomicMem64<'a> {
    /// A window over `words` (size = 8 bytes per word).
    pub fn new(words: &'a [AtomicU64]) -> Self {
        Self { words }
    }

    /// Write part of a word, keeping the bytes the peer owns intact.
    fn merge(&self, word: usize, start: usize, part: &[u8]) {
        let _ = self.words[word].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            let mut b = old.to_ne_bytes();
            b[start..start + part.len()].copy_from_slice(part);
            Some(u64::from_ne_bytes(b))
        });
    }
}

impl SharedMem for AtomicMem64<'_> {
    fn size(&self) -> usize {
        self.words.len() * 8
    }

    fn store_u64(&self, offset: usize, value: u64) {
        if offset.is_multiple_of(8) {
            self.words[offset / 8].store(value.to_le(), Ordering::Relaxed);
        } else {
            self.write_bytes(offset, &value.to_le_bytes());
        }
    }

    #[inline]
    fn prefetch_write(&self, offset: usize, len: usize) {
        prefetch_words(self.words, offset, len);
    }

    fn load_u32(&self, offset: usize) -> u32 {
        debug_assert_eq!(offset % 4, 0);
        let b = self.words[offset / 8].load(Ordering::Relaxed).to_ne_bytes();
        let i = offset % 8;
        u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }

    fn store_u32(&self, offset: usize, value: u32) {
        debug_assert_eq!(offset % 4, 0);
        self.merge(offset / 8, offset % 8, &value.to_le_bytes());
    }

    fn take_u32(&self, offset: usize) -> u32 {
        debug_assert_eq!(offset % 4, 0);
        let i = offset % 8;
        let mut m = [0u8; 8];
        m[i..i + 4].fill(0xff);
        let old = self.words[offset / 8]
            .fetch_and(!u64::from_ne_bytes(m), Ordering::Relaxed)
            .to_ne_bytes();
        u32::from_le_bytes([old[i], old[i + 1], old[i + 2], old[i + 3]])
    }

    fn or_u32(&self, offset: usize, bits: u32) {
        debug_assert_eq!(offset % 4, 0);
        let i = offset % 8;
        let mut b = [0u8; 8];
        b[i..i + 4].copy_from_slice(&bits.to_le_bytes());
        self.words[offset / 8].fetch_or(u64::from_ne_bytes(b), Ordering::Relaxed);
    }

    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        if offset.is_multiple_of(8) && dst.len().is_multiple_of(8) {
            // Ring entries: whole words, one load each.
            let first = offset / 8;
            let words = &self.words[first..first + dst.len() / 8];
            for (c, w) in dst.chunks_exact_mut(8).zip(words) {
                c.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
            }
            return;
        }
        let head = ((8 - offset % 8) % 8).min(dst.len());
        let (h, rest) = dst.split_at_mut(head);
        if !h.is_empty() {
            let b = self.words[offset / 8].load(Ordering::Relaxed).to_ne_bytes();
            h.copy_from_slice(&b[offset % 8..offset % 8 + head]);
        }
        let first = (offset + head) / 8;
        let mut chunks = rest.chunks_exact_mut(8);
        let words = &self.words[first..first + chunks.len()];
        for (c, w) in (&mut chunks).zip(words) {
            c.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let b = self.words[first + words.len()]
                .load(Ordering::Relaxed)
                .to_ne_bytes();
            let n = tail.len();
            tail.copy_from_slice(&b[..n]);
        }
    }

    fn write_bytes(&self, offset: usize, src: &[u8]) {
        if offset.is_multiple_of(8) && src.len().is_multiple_of(8) {
            // Ring entries: whole words, one store each.
            let first = offset / 8;
            let words = &self.words[first..first + src.len() / 8];
            for (c, w) in src.chunks_exact(8).zip(words) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
            }
            return;
        }
        let head = ((8 - offset % 8) % 8).min(src.len());
        let (h, rest) = src.split_at(head);
        if !h.is_empty() {
            self.merge(offset / 8, offset % 8, h);
        }
        let first = (offset + head) / 8;
        let chunks = rest.chunks_exact(8);
        let tail = chunks.remainder();
        let words = &self.words[first..first + chunks.len()];
        for (c, w) in chunks.zip(words) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        if !tail.is_empty() {
            self.merge(first + words.len(), 0, tail);
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
    fn byte_mem_is_little_endian_and_writes_only_where_asked() {
        let m = ByteMem::new(std::vec![0xa5u8; 16]);
        assert_eq!(m.size(), 16);
        m.store_u32(4, 0x0403_0201);
        m.write_bytes(10, b"xy");
        assert_eq!(m.load_u32(4), 0x0403_0201);
        let mut back = [0u8; 16];
        m.read_bytes(0, &mut back);
        let mut want = [0xa5u8; 16];
        want[4..8].copy_from_slice(&[1, 2, 3, 4]);
        want[10..12].copy_from_slice(b"xy");
        assert_eq!(back, want);
    }

    #[test]
    #[should_panic]
    fn byte_mem_panics_on_a_write_past_its_end() {
        ByteMem::new([0u8; 8]).write_bytes(6, b"abc");
    }

    #[test]
    fn take_and_or_touch_only_their_word_everywhere() {
        let b64: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        let b32 = buf(8);
        let m64 = AtomicMem64::new(&b64);
        let m32 = AtomicMem::new(&b32);
        let bytes = ByteMem::new([0u8; 32]);
        let mems: [&dyn SharedMem; 3] = [&m64, &m32, &bytes];
        for m in mems {
            m.store_u32(8, 0x0000_00f0);
            m.store_u32(12, 0x1111_1111);
            m.or_u32(8, 0x8000_0001);
            m.or_u32(12, 0x0200_0000);
            assert_eq!(m.load_u32(8), 0x8000_00f1);
            assert_eq!(m.take_u32(12), 0x1311_1111);
            assert_eq!((m.load_u32(8), m.load_u32(12)), (0x8000_00f1, 0));
            assert_eq!(m.take_u32(8), 0x8000_00f1);
            let mut back = [0u8; 32];
            m.read_bytes(0, &mut back);
            assert_eq!(back, [0u8; 32], "nothing left, nothing else written");
        }
    }

    #[test]
    fn u64_stores_are_little_endian_bytes_everywhere() {
        let b64: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        let b32 = buf(8);
        let m64 = AtomicMem64::new(&b64);
        let m32 = AtomicMem::new(&b32);
        let bytes = ByteMem::new([0u8; 32]);
        let mems: [&dyn SharedMem; 3] = [&m64, &m32, &bytes];
        for m in mems {
            m.store_u64(8, 0x0807_0605_0403_0201);
            m.store_u64(20, 0x1817_1615_1413_1211);
            let mut back = [0u8; 32];
            m.read_bytes(0, &mut back);
            assert_eq!(back[8..16], [1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(
                back[20..28],
                [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
            );
            assert_eq!(back[..8], [0; 8]);
        }
        assert_eq!(
            b64[1].load(Ordering::Relaxed),
            0x0807_0605_0403_0201u64.to_le()
        );
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

    #[test]
    fn write_hints_change_nothing_and_ignore_ranges_outside() {
        let b = buf(40);
        let b64: Vec<AtomicU64> = (0..20).map(|_| AtomicU64::new(0)).collect();
        let m32 = AtomicMem::new(&b);
        let m64 = AtomicMem64::new(&b64);
        let mems: [&dyn SharedMem; 2] = [&m32, &m64];
        for m in mems {
            let data: Vec<u8> = (0..160u8).map(|i| i.wrapping_mul(7) ^ 0x5a).collect();
            m.write_bytes(0, &data);
            for (offset, len) in [
                (0, 160),
                (3, 70),
                (64, 64),
                (159, 1),
                (0, 0),
                (160, 0),
                (150, 20),
                (161, 8),
                (8, usize::MAX),
                (usize::MAX, 1),
                (usize::MAX, usize::MAX),
            ] {
                m.prefetch_write(offset, len);
            }
            let mut back = [0u8; 160];
            m.read_bytes(0, &mut back);
            assert_eq!(&back[..], &data[..]);
        }
    }

    proptest::proptest! {
        #[test]
        fn unaligned_copies_match_a_byte_model(
            ops in proptest::collection::vec((0usize..60, proptest::collection::vec(proptest::num::u8::ANY, 0..20)), 1..40)
        ) {
            let b = buf(20);
            let b64: Vec<AtomicU64> = (0..10).map(|_| AtomicU64::new(0)).collect();
            let m32 = AtomicMem::new(&b);
            let m64 = AtomicMem64::new(&b64);
            let mems: [&dyn SharedMem; 2] = [&m32, &m64];
            for m in mems {
                proptest::prop_assert_eq!(m.size(), 80);
                let mut model = [0u8; 80];
                for (i, (off, data)) in ops.iter().enumerate() {
                    let len = data.len().min(80 - off);
                    if i % 5 == 4 {
                        // Also u32 stores at aligned offsets.
                        let at = off & !3;
                        let v = (i as u32).wrapping_mul(0x0101_0101) ^ 0xa5a5_0000;
                        m.store_u32(at, v);
                        model[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    } else {
                        m.write_bytes(*off, &data[..len]);
                        model[*off..off + len].copy_from_slice(&data[..len]);
                    }
                }
                let mut all = [0u8; 80];
                m.read_bytes(0, &mut all);
                proptest::prop_assert_eq!(&all[..], &model[..]);
                for w in 0..20 {
                    let want = u32::from_le_bytes([model[4*w], model[4*w+1], model[4*w+2], model[4*w+3]]);
                    proptest::prop_assert_eq!(m.load_u32(4 * w), want);
                }
                for off in [0usize, 3, 13, 40, 79] {
                    let mut part = [0u8; 7];
                    let n = part.len().min(80 - off);
                    m.read_bytes(off, &mut part[..n]);
                    proptest::prop_assert_eq!(&part[..n], &model[off..off + n]);
                }
            }
        }
    }
}

/// A [`SharedMem`] over a plain byte buffer (a `Vec<u8>`, an array), for
/// one thread: tests, fuzz targets and host-side builders (the PVH domain
/// builder run on the host). An access outside the buffer panics (slice
/// indexing), which is what a test wants of a stray write; the
/// hypervisor's own memory never goes through it.
#[derive(Debug)]
pub struct ByteMem<B>(pub RefCell<B>);

impl<B> ByteMem<B> {
    pub fn new(bytes: B) -> Self {
        Self(RefCell::new(bytes))
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> SharedMem for ByteMem<B> {
    fn size(&self) -> usize {
        self.0.borrow().as_ref().len()
    }
    fn load_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read_bytes(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        self.write_bytes(offset, &value.to_le_bytes());
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&self.0.borrow().as_ref()[offset..offset + dst.len()]);
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        self.0.borrow_mut().as_mut()[offset..offset + src.len()].copy_from_slice(src);
    }
}
