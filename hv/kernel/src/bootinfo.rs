//! Multiboot2 boot information (the structure GRUB leaves at the address in
//! EBX), read with the `multiboot2` crate.
//!
//! The crate checks the block's structure (alignment, sizes, the tag chain
//! and its end tag). What stays here is what it leaves to its user: the
//! block is taken as a byte slice, so its claimed size is checked against
//! the bytes there before anything reads it, and the three tags the image
//! reads (command line, memory map, modules) are checked for shape before
//! the crate's typed accessors see them, since those assert (panic) on a
//! tag too short for its fixed part or on memory map entries that are not
//! 24 bytes. After [`BootInfo::parse`] no accessor can fail or panic.

use core::fmt;

use multiboot2::{
    parse_slice_as_string, BootInformation, BootInformationHeader, LoadError, MemoryAreaType,
    TagType,
};

/// Value of EAX when a Multiboot2 loader enters the image.
pub const BOOTLOADER_MAGIC: u32 = multiboot2::MAGIC;

/// The boot information's fixed header (`total_size`, `reserved`).
const HEADER: usize = 8;
/// The memory map entry the crate (and the specification's version 0)
/// reads: `base_addr: u64, length: u64, type: u32, reserved: u32`.
const MMAP_ENTRY: u32 = 24;

/// Why a boot information block was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// Fewer bytes than the fixed header, or than `total_size` claims.
    Truncated { have: usize, need: usize },
    /// The tag chain is malformed (sizes, alignment, padding, end tag).
    Structure(LoadError),
    /// A tag the image reads is shorter than its fixed part, or a memory
    /// map's entries do not fill it exactly.
    BadTag { tag: u32, size: u32 },
    /// The memory map tag has entries of another size than 24 bytes.
    BadMmapEntrySize(u32),
    /// A string tag is not NUL-terminated UTF-8.
    BadString { tag: u32 },
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { have, need } => {
                write!(f, "boot info truncated: {have} bytes, need {need}")
            }
            Self::Structure(LoadError::NoEndTag) => write!(f, "boot info has no end tag"),
            Self::Structure(LoadError::Memory(e)) => write!(f, "boot info malformed: {e}"),
            Self::BadTag { tag, size } => write!(f, "boot info tag {tag} has bad size {size}"),
            Self::BadMmapEntrySize(s) => {
                write!(f, "memory map entry size {s}, expected at least 24")
            }
            Self::BadString { tag } => write!(f, "boot info tag {tag}: bad string"),
        }
    }
}

/// Kind of a memory map region (Multiboot2 numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Type 1: RAM the kernel may use.
    Available,
    /// Type 3: ACPI tables, reclaimable after reading them.
    AcpiReclaimable,
    /// Type 4: must be preserved across hibernation.
    AcpiNvs,
    /// Type 5: defective RAM.
    Defective,
    /// Anything else (2 and unknown types): reserved.
    Reserved(u32),
}

impl From<u32> for RegionKind {
    fn from(t: u32) -> Self {
        match MemoryAreaType::from_val(t) {
            MemoryAreaType::Available => Self::Available,
            MemoryAreaType::AcpiAvailable => Self::AcpiReclaimable,
            MemoryAreaType::ReservedHibernate => Self::AcpiNvs,
            MemoryAreaType::Defective => Self::Defective,
            other => Self::Reserved(other.val()),
        }
    }
}

/// One entry of the physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub base: u64,
    pub len: u64,
    pub kind: RegionKind,
}

impl MemoryRegion {
    /// One past the last byte, saturating at `u64::MAX`.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }
}

/// A boot module (a file GRUB loaded next to the image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    pub start: u32,
    pub end: u32,
    pub cmdline: &'a str,
}

/// A validated boot information block.
#[derive(Debug)]
pub struct BootInfo<'a> {
    mbi: BootInformation<'a>,
}

impl<'a> BootInfo<'a> {
    /// Size the block claims for itself (the first `u32`), so a caller that
    /// only has a pointer knows how many bytes to hand to [`BootInfo::parse`].
    pub fn claimed_size(first8: &[u8]) -> Result<usize, BootInfoError> {
        match first8.first_chunk::<4>() {
            Some(b) if first8.len() >= HEADER => Ok(u32::from_le_bytes(*b) as usize),
            _ => Err(BootInfoError::Truncated {
                have: first8.len(),
                need: HEADER,
            }),
        }
    }

    /// Validate the block at the start of `bytes` (which may be longer than
    /// the block; it must be 8-byte aligned). Later accessors never fail
    /// on structure.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BootInfoError> {
        let total = Self::claimed_size(bytes)?;
        if total < 2 * HEADER || bytes.len() < total {
            return Err(BootInfoError::Truncated {
                have: bytes.len(),
                need: total.max(2 * HEADER),
            });
        }
        // SAFETY: `bytes` is readable for `total` bytes from its start (the
        // block's claimed size, checked just above), which is all `load`
        // reads, and the shared borrow keeps it unchanged for 'a. `load`
        // checks alignment itself.
        let mbi = unsafe { BootInformation::load(bytes.as_ptr().cast::<BootInformationHeader>()) }
            .map_err(BootInfoError::Structure)?;
        for tag in mbi.tags() {
            let (typ, size, body) = (tag.header().typ.get(), tag.header().size, tag.payload());
            let bad_tag = BootInfoError::BadTag { tag: typ, size };
            let bad_string = BootInfoError::BadString { tag: typ };
            match TagType::from_val(typ) {
                TagType::Cmdline => {
                    parse_slice_as_string(body).map_err(|_| bad_string)?;
                }
                TagType::Module => {
                    let name = body.get(8..).ok_or(bad_tag)?;
                    parse_slice_as_string(name).map_err(|_| bad_string)?;
                }
                TagType::Mmap => {
                    let entry_size = body.first_chunk::<4>().ok_or(bad_tag)?;
                    let entry_size = u32::from_le_bytes(*entry_size);
                    // Multiboot2 lets entries grow (entry_size >= 24): they
                    // are stepped by entry_size, so not read through the
                    // crate (which takes 24-byte entries only).
                    if entry_size < MMAP_ENTRY {
                        return Err(BootInfoError::BadMmapEntrySize(entry_size));
                    }
                    let entries = body.get(8..).ok_or(bad_tag)?;
                    if !entries.len().is_multiple_of(entry_size as usize) {
                        return Err(bad_tag);
                    }
                }
                _ => {}
            }
        }
        Ok(Self { mbi })
    }

    /// Bytes the block covers (for reserving it from the frame allocator).
    pub fn total_size(&self) -> usize {
        self.mbi.total_size()
    }

    /// The kernel command line (the first such tag), if the loader passed
    /// one.
    pub fn cmdline(&self) -> Option<&str> {
        self.mbi.command_line_tag().and_then(|t| t.cmdline().ok())
    }

    /// The physical memory map (of the first such tag), empty if the
    /// loader gave none.
    pub fn memory_map(&self) -> impl Iterator<Item = MemoryRegion> + '_ {
        // Checked by `parse`: entry_size >= 24, entries fill the tag.
        let body = self
            .mbi
            .tags()
            .find(|t| TagType::from_val(t.header().typ.get()) == TagType::Mmap)
            .map_or(&[][..], |t| t.payload());
        let entry_size = body
            .first_chunk::<4>()
            .map_or(MMAP_ENTRY, |b| u32::from_le_bytes(*b))
            .max(MMAP_ENTRY) as usize;
        body.get(8..)
            .unwrap_or_default()
            .chunks_exact(entry_size)
            .map(|e| {
                let word = |at: usize| {
                    e.get(at..at + 8)
                        .and_then(|b| b.first_chunk::<8>())
                        .map_or(0, |b| u64::from_le_bytes(*b))
                };
                let typ = e
                    .get(16..20)
                    .and_then(|b| b.first_chunk::<4>())
                    .map_or(0, |b| u32::from_le_bytes(*b));
                MemoryRegion {
                    base: word(0),
                    len: word(8),
                    kind: RegionKind::from(typ),
                }
            })
    }

    /// Boot modules.
    pub fn modules(&self) -> impl Iterator<Item = Module<'_>> + '_ {
        self.mbi.module_tags().filter_map(|m| {
            Some(Module {
                start: m.start_address(),
                end: m.end_address(),
                cmdline: m.cmdline().ok()?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::splitmix::SplitMix64;
    use zerocopy::IntoBytes;

    const TAG_END: u32 = 0;
    const TAG_CMDLINE: u32 = 1;
    const TAG_MODULE: u32 = 3;
    const TAG_MMAP: u32 = 6;

    /// Bytes starting 8-byte aligned, as GRUB leaves the block (the
    /// crate refuses anything else).
    #[derive(Clone)]
    struct Block(Vec<u64>, usize);

    impl Block {
        fn from(b: &[u8]) -> Self {
            let mut words = vec![0u64; b.len().div_ceil(8)];
            words.as_mut_bytes()[..b.len()].copy_from_slice(b);
            Self(words, b.len())
        }
    }

    impl core::ops::Deref for Block {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.0.as_bytes()[..self.1]
        }
    }

    impl core::ops::DerefMut for Block {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.0.as_mut_bytes()[..self.1]
        }
    }

    /// A tag as the block holds it: type and the bytes after its header.
    struct RawTag<'a> {
        typ: u32,
        body: &'a [u8],
    }

    /// Every tag of a parsed block, the end tag last.
    fn raw_tags<'a>(info: &'a BootInfo<'_>) -> Vec<RawTag<'a>> {
        info.mbi
            .tags()
            .map(|t| RawTag {
                typ: t.header().typ.get(),
                body: t.payload(),
            })
            .collect()
    }

    /// Builds a boot information block the way the specification lays it
    /// out, independent of the parser.
    struct Builder(Vec<u8>);

    impl Builder {
        fn new() -> Self {
            Self(vec![0; 8])
        }
        fn tag(mut self, typ: u32, body: &[u8]) -> Self {
            self.0.extend_from_slice(&typ.to_le_bytes());
            self.0
                .extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
            self.0.extend_from_slice(body);
            while !self.0.len().is_multiple_of(8) {
                self.0.push(0);
            }
            self
        }
        fn finish(self) -> Block {
            Block::from(&self.finish_vec())
        }
        fn finish_vec(self) -> Vec<u8> {
            let mut b = self.tag(TAG_END, &[]).0;
            let n = b.len() as u32;
            b[..4].copy_from_slice(&n.to_le_bytes());
            b
        }
    }

    fn mmap_body(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        mmap_body_sized(24, entries)
    }

    /// A memory map body with `entry_size`-byte entries (`>= 24`; the
    /// bytes past the 24 the parser reads are 0xAA).
    fn mmap_body_sized(entry_size: u32, entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&entry_size.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        for (b, l, t) in entries {
            v.extend_from_slice(&b.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
            v.resize(v.len() + entry_size as usize - 24, 0xAA);
        }
        v
    }

    #[test]
    fn parses_cmdline_mmap_and_modules() {
        let mut module = Vec::new();
        module.extend_from_slice(&0x20_0000u32.to_le_bytes());
        module.extend_from_slice(&0x20_3000u32.to_le_bytes());
        module.extend_from_slice(b"guest.bin\0");
        let b = Builder::new()
            .tag(TAG_CMDLINE, b"log=debug mode=report\0")
            .tag(99, &[1, 2, 3])
            .tag(
                TAG_MMAP,
                &mmap_body(&[
                    (0, 0x9fc00, 1),
                    (0xf0000, 0x10000, 2),
                    (0x100000, 0x7ee0000, 1),
                ]),
            )
            .tag(TAG_MODULE, &module)
            .finish();
        let info = BootInfo::parse(&b).unwrap();
        assert_eq!(info.total_size(), b.len());
        assert_eq!(info.cmdline(), Some("log=debug mode=report"));
        let mm: Vec<MemoryRegion> = info.memory_map().collect();
        assert_eq!(
            mm,
            vec![
                MemoryRegion {
                    base: 0,
                    len: 0x9fc00,
                    kind: RegionKind::Available
                },
                MemoryRegion {
                    base: 0xf0000,
                    len: 0x10000,
                    kind: RegionKind::Reserved(2)
                },
                MemoryRegion {
                    base: 0x100000,
                    len: 0x7ee0000,
                    kind: RegionKind::Available
                },
            ]
        );
        let mods: Vec<Module> = info.modules().collect();
        assert_eq!(
            mods,
            vec![Module {
                start: 0x20_0000,
                end: 0x20_3000,
                cmdline: "guest.bin"
            }]
        );
    }

    #[test]
    fn larger_mmap_entries_are_stepped_by_entry_size() {
        let b = Builder::new()
            .tag(
                TAG_MMAP,
                &mmap_body_sized(32, &[(0x1000, 0x2000, 1), (0x10_0000, 0x4000, 1)]),
            )
            .finish();
        let info = BootInfo::parse(&b).unwrap();
        let bases: Vec<(u64, u64)> = info.memory_map().map(|r| (r.base, r.len)).collect();
        assert_eq!(bases, vec![(0x1000, 0x2000), (0x10_0000, 0x4000)]);
    }

    #[test]
    fn mmap_entries_must_fill_their_tag() {
        // Entries that do not fill the tag exactly.
        let mut body = mmap_body(&[(0x1000, 0x2000, 1)]);
        body.truncate(body.len() - 4);
        let b = Builder::new().tag(TAG_MMAP, &body).finish();
        assert_eq!(
            BootInfo::parse(&b).unwrap_err(),
            BootInfoError::BadTag {
                tag: TAG_MMAP,
                size: 8 + body.len() as u32
            }
        );
        // A tag too short for the entry size field.
        let b = Builder::new().tag(TAG_MMAP, &[24, 0]).finish();
        assert_eq!(
            BootInfo::parse(&b).unwrap_err(),
            BootInfoError::BadTag {
                tag: TAG_MMAP,
                size: 10
            }
        );
    }

    #[test]
    fn rejects_truncated_and_malformed_blocks() {
        let good = Builder::new().tag(TAG_CMDLINE, b"x\0").finish();
        assert!(BootInfo::parse(&good).is_ok());
        // Shorter than the claimed size.
        assert_eq!(
            BootInfo::parse(&good[..good.len() - 1]).unwrap_err(),
            BootInfoError::Truncated {
                have: good.len() - 1,
                need: good.len()
            }
        );
        assert!(matches!(
            BootInfo::parse(&good[..4]),
            Err(BootInfoError::Truncated { .. })
        ));
        // A tag whose size runs past the end.
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&1000u32.to_le_bytes());
        let e = BootInfo::parse(&bad).unwrap_err();
        assert!(matches!(e, BootInfoError::Structure(LoadError::Memory(_))));
        assert_eq!(
            e.to_string(),
            format!(
                "boot info malformed: header reports an invalid total size of 0x3e8 \
                 while only {:#x} bytes are available",
                good.len() - 8
            )
        );
        // A tag smaller than its own header.
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&4u32.to_le_bytes());
        let e = BootInfo::parse(&bad).unwrap_err();
        assert!(matches!(e, BootInfoError::Structure(LoadError::Memory(_))));
        assert_eq!(
            e.to_string(),
            "boot info malformed: memory range is shorter than the size of the header structure"
        );
        // No end tag: claim a size that stops before it.
        let mut bad = good.clone();
        let n = (good.len() - 8) as u32;
        bad[..4].copy_from_slice(&n.to_le_bytes());
        assert_eq!(
            BootInfo::parse(&bad).unwrap_err(),
            BootInfoError::Structure(LoadError::NoEndTag)
        );
        // Command line without its NUL.
        let bad = Builder::new().tag(TAG_CMDLINE, b"abc").finish();
        assert_eq!(
            BootInfo::parse(&bad).unwrap_err(),
            BootInfoError::BadString { tag: TAG_CMDLINE }
        );
        // Memory map entries too small to hold an entry.
        let mut body = mmap_body(&[]);
        body[..4].copy_from_slice(&16u32.to_le_bytes());
        let bad = Builder::new().tag(TAG_MMAP, &body).finish();
        assert_eq!(
            BootInfo::parse(&bad).unwrap_err(),
            BootInfoError::BadMmapEntrySize(16)
        );
    }

    #[test]
    fn short_module_tag_is_rejected_with_its_size() {
        let b = Builder::new()
            .tag(TAG_CMDLINE, b"\0")
            .tag(TAG_MODULE, &[1, 2, 3, 4])
            .finish();
        assert_eq!(
            BootInfo::parse(&b).unwrap_err(),
            BootInfoError::BadTag {
                tag: TAG_MODULE,
                size: 12
            }
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, parsing returns (it never panics), and an
        /// accepted block's accessors stay inside it.
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256), size in 0u32..300) {
            if bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&size.to_le_bytes());
            }
            let bytes = Block::from(&bytes);
            if let Ok(info) = BootInfo::parse(&bytes) {
                proptest::prop_assert!(info.total_size() <= bytes.len());
                let _ = info.cmdline();
                proptest::prop_assert!(info.memory_map().count() <= bytes.len() / 24);
                let _ = info.modules().count();
            }
        }
    }

    /// A tag of a generated block, holding what the accessors must read
    /// back from it.
    #[derive(Clone, Debug)]
    enum GenTag {
        Cmdline(String),
        Mmap {
            entry_size: u32,
            entries: Vec<(u64, u64, u32)>,
        },
        Module {
            start: u32,
            end: u32,
            cmdline: String,
        },
        /// A type the parser does not interpret.
        Other {
            typ: u32,
            body: Vec<u8>,
        },
    }

    /// Short text, sometimes with a two-byte UTF-8 character a byte flip
    /// can break.
    fn random_text(rng: &mut SplitMix64) -> String {
        const CHARS: [char; 8] = ['a', 'z', '0', '=', ' ', '/', '.', 'é'];
        (0..rng.below(12))
            .map(|_| CHARS[rng.below(8) as usize])
            .collect()
    }

    fn random_tags(rng: &mut SplitMix64) -> Vec<GenTag> {
        (0..rng.below(6))
            .map(|_| match rng.below(4) {
                0 => GenTag::Cmdline(random_text(rng)),
                1 => GenTag::Mmap {
                    entry_size: 24 + 8 * rng.below(2) as u32,
                    entries: (0..rng.below(4))
                        .map(|_| {
                            let base = rng.next_u64() >> rng.below(64);
                            (base, rng.next_u64() >> rng.below(64), rng.below(7) as u32)
                        })
                        .collect(),
                },
                2 => GenTag::Module {
                    start: rng.next_u64() as u32,
                    end: rng.next_u64() as u32,
                    cmdline: random_text(rng),
                },
                _ => GenTag::Other {
                    typ: [2, 4, 5, 8, 21, 99][rng.below(6) as usize],
                    body: (0..rng.below(16)).map(|_| rng.next_u64() as u8).collect(),
                },
            })
            .collect()
    }

    fn build(tags: &[GenTag]) -> Builder {
        let mut b = Builder::new();
        for t in tags {
            b = match t {
                GenTag::Cmdline(s) => b.tag(TAG_CMDLINE, &[s.as_bytes(), b"\0"].concat()),
                GenTag::Mmap {
                    entry_size,
                    entries,
                } => b.tag(TAG_MMAP, &mmap_body_sized(*entry_size, entries)),
                GenTag::Module {
                    start,
                    end,
                    cmdline,
                } => {
                    let mut body = Vec::new();
                    body.extend_from_slice(&start.to_le_bytes());
                    body.extend_from_slice(&end.to_le_bytes());
                    body.extend_from_slice(cmdline.as_bytes());
                    body.push(0);
                    b.tag(TAG_MODULE, &body)
                }
                GenTag::Other { typ, body } => b.tag(*typ, body),
            };
        }
        b
    }

    /// Whether `part` lies inside `whole`.
    fn within(whole: &[u8], part: &[u8]) -> bool {
        let (w, p) = (whole.as_ptr_range(), part.as_ptr_range());
        w.start <= p.start && p.end <= w.end
    }

    /// What one generated case did.
    #[derive(Clone, Copy, Debug, Default)]
    struct Outcome {
        changed: bool,
        parsed: bool,
        /// Of a parsed block: a command line, a non-empty memory map, a
        /// module were read.
        cmdline: bool,
        mmap: bool,
        module: bool,
    }

    /// A block built from random tags, then in three cases of four with
    /// one to three bytes XORed and in one of four followed by stray
    /// bytes. An unchanged block must parse and read back exactly what
    /// its tags hold; any block that parses must have accessors that
    /// agree with its tags (`parse` promises they never fail on
    /// structure) and stay inside it.
    fn generated_case(seed: u64) -> Result<Outcome, proptest::test_runner::TestCaseError> {
        use proptest::{prop_assert, prop_assert_eq};
        let mut rng = SplitMix64::new(seed);
        let tags = random_tags(&mut rng);
        let mut bytes = build(&tags).finish_vec();
        let intact = bytes.clone();
        for _ in 0..rng.below(4) {
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] ^= 1 + rng.below(255) as u8;
        }
        if rng.below(4) == 0 {
            bytes.extend((0..1 + rng.below(16)).map(|_| rng.next_u64() as u8));
        }
        let changed = bytes[..intact.len()] != intact[..];
        let bytes = Block::from(&bytes);
        let info = match BootInfo::parse(&bytes) {
            Ok(info) => info,
            Err(e) => {
                // Every intact block parses (entries of 24 bytes or more).
                prop_assert!(changed, "{:?} refused: {:?}", tags, e);
                return Ok(Outcome {
                    changed,
                    ..Outcome::default()
                });
            }
        };
        prop_assert!(info.total_size() <= bytes.len());
        let block = &bytes[..info.total_size()];
        let cmdline = info.cmdline();
        let mmap: Vec<MemoryRegion> = info.memory_map().collect();
        let modules: Vec<Module> = info.modules().collect();
        prop_assert!(mmap.len() <= bytes.len() / 24);
        // One module per module tag, a command line if there is a tag
        // for it, every entry the first memory map tag holds.
        let raw = raw_tags(&info);
        prop_assert_eq!(raw.last().map(|t| t.typ), Some(TAG_END));
        prop_assert_eq!(
            modules.len(),
            raw.iter().filter(|t| t.typ == TAG_MODULE).count()
        );
        prop_assert_eq!(cmdline.is_some(), raw.iter().any(|t| t.typ == TAG_CMDLINE));
        if let Some(t) = raw.iter().find(|t| t.typ == TAG_MMAP) {
            let entry_size = u32::from_le_bytes(t.body[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(mmap.len(), (t.body.len() - 8) / entry_size);
        } else {
            prop_assert!(mmap.is_empty());
        }
        if let Some(c) = cmdline {
            prop_assert!(within(block, c.as_bytes()));
        }
        for m in &modules {
            prop_assert!(within(block, m.cmdline.as_bytes()));
        }
        if !changed {
            prop_assert_eq!(info.total_size(), intact.len());
            let want_cmdline = tags.iter().find_map(|t| match t {
                GenTag::Cmdline(s) => Some(s.as_str()),
                _ => None,
            });
            prop_assert_eq!(cmdline, want_cmdline);
            let want_mmap: Vec<MemoryRegion> = tags
                .iter()
                .find_map(|t| match t {
                    GenTag::Mmap { entries, .. } => Some(entries.as_slice()),
                    _ => None,
                })
                .unwrap_or(&[])
                .iter()
                .map(|&(base, len, typ)| MemoryRegion {
                    base,
                    len,
                    kind: RegionKind::from(typ),
                })
                .collect();
            prop_assert_eq!(&mmap, &want_mmap);
            let want_modules: Vec<Module> = tags
                .iter()
                .filter_map(|t| match t {
                    GenTag::Module {
                        start,
                        end,
                        cmdline,
                    } => Some(Module {
                        start: *start,
                        end: *end,
                        cmdline,
                    }),
                    _ => None,
                })
                .collect();
            prop_assert_eq!(&modules, &want_modules);
        }
        Ok(Outcome {
            changed,
            parsed: true,
            cmdline: cmdline.is_some(),
            mmap: !mmap.is_empty(),
            module: !modules.is_empty(),
        })
    }

    proptest::proptest! {
        /// Random bytes practically never end in an end tag, so
        /// `arbitrary_bytes_never_panic` only shows that parsing never
        /// panics; these blocks are well formed before a few bytes change,
        /// so many parse and their accessors run.
        #[test]
        fn generated_blocks_read_back_their_tags(seed in proptest::num::u64::ANY) {
            generated_case(seed)?;
        }
    }

    /// `generated_blocks_read_back_their_tags` only means something if its
    /// blocks both parse and fail to, and the parsed ones carry content:
    /// over 2000 seeds, changed blocks must often parse and often not, and
    /// a command line, a memory map and modules must often be read.
    #[test]
    fn generated_blocks_are_both_accepted_and_refused() {
        const CASES: usize = 2000;
        let mut seeds = SplitMix64::new(0x0b00_71f0);
        let mut outcomes = Vec::new();
        for _ in 0..CASES {
            let seed = seeds.next_u64();
            outcomes.push(generated_case(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}")));
        }
        let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
        let parsed = count(&|o| o.parsed);
        let changed_parsed = count(&|o| o.changed && o.parsed);
        let refused = count(&|o| !o.parsed);
        let (cmdline, mmap, module) = (
            count(&|o| o.cmdline),
            count(&|o| o.mmap),
            count(&|o| o.module),
        );
        eprintln!(
            "parsed {parsed} (changed {changed_parsed}), refused {refused}; \
             read a command line {cmdline}, a memory map {mmap}, modules {module}"
        );
        assert!(parsed >= CASES / 10 && refused >= CASES / 10);
        assert!(changed_parsed >= CASES / 10);
        for n in [cmdline, mmap, module] {
            assert!(n >= parsed / 10, "{n} of {parsed}");
        }
    }

    #[test]
    fn absent_tags_read_as_empty() {
        let b = Builder::new().finish();
        let info = BootInfo::parse(&b).unwrap();
        assert_eq!(info.cmdline(), None);
        assert_eq!(info.memory_map().count(), 0);
        assert_eq!(info.modules().count(), 0);
    }
}
