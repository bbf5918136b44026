//! A minimal ELF64 reader for loading test-guest images: validates the
//! header and yields the loadable segments, every offset and size checked
//! against the file before use.

use zerocopy::{FromBytes, Immutable, KnownLayout};

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, Immutable, KnownLayout)]
struct Ehdr {
    ident: [u8; 16],
    kind: u16,
    machine: u16,
    version: u32,
    entry: u64,
    phoff: u64,
    shoff: u64,
    flags: u32,
    ehsize: u16,
    phentsize: u16,
    phnum: u16,
    shentsize: u16,
    shnum: u16,
    shstrndx: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, Immutable, KnownLayout)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

const _: () = assert!(core::mem::size_of::<Ehdr>() == 64);
const _: () = assert!(core::mem::size_of::<Phdr>() == 56);

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY` (xen/include/public/elfnote.h): the
/// physical address of the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    TooShort,
    BadMagic,
    NotElf64LittleEndian,
    NotX86_64Executable,
    BadProgramHeaders,
    SegmentOutOfFile,
    FileLargerThanMemory,
    /// A PT_NOTE segment whose notes run past the segment.
    BadNote,
    /// No `Xen` note of type [`XEN_ELFNOTE_PHYS32_ENTRY`].
    NoPvhEntry,
    /// The PVH entry note's value is not a 4- or 8-byte address below 4 GiB.
    BadPvhEntry,
}

/// One ELF note: its owner name (without the NUL) and descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

/// A loadable segment: copy `file[offset..offset+filesz]` to physical
/// address `paddr` and zero the rest up to `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A validated ELF image.
#[derive(Clone, Copy, Debug)]
pub struct Elf<'a> {
    file: &'a [u8],
    hdr: Ehdr,
}

impl<'a> Elf<'a> {
    pub fn parse(file: &'a [u8]) -> Result<Self, ElfError> {
        let (hdr, _) = Ehdr::read_from_prefix(file).map_err(|_| ElfError::TooShort)?;
        if hdr.ident[..4] != *b"\x7fELF" {
            return Err(ElfError::BadMagic);
        }
        // Class 2 = 64-bit, data 1 = little endian.
        if hdr.ident[4] != 2 || hdr.ident[5] != 1 {
            return Err(ElfError::NotElf64LittleEndian);
        }
        if hdr.kind != ET_EXEC || hdr.machine != EM_X86_64 {
            return Err(ElfError::NotX86_64Executable);
        }
        if hdr.phentsize as usize != core::mem::size_of::<Phdr>() {
            return Err(ElfError::BadProgramHeaders);
        }
        let end = (hdr.phnum as u64)
            .checked_mul(hdr.phentsize as u64)
            .and_then(|n| n.checked_add(hdr.phoff))
            .ok_or(ElfError::BadProgramHeaders)?;
        if end > file.len() as u64 {
            return Err(ElfError::BadProgramHeaders);
        }
        let elf = Self { file, hdr };
        // Validate every loadable segment now, so iteration cannot fail.
        for i in 0..hdr.phnum {
            let ph = elf.phdr(i)?;
            if ph.kind == PT_LOAD {
                let fend = ph
                    .offset
                    .checked_add(ph.filesz)
                    .ok_or(ElfError::SegmentOutOfFile)?;
                if fend > file.len() as u64 {
                    return Err(ElfError::SegmentOutOfFile);
                }
                if ph.filesz > ph.memsz || ph.paddr.checked_add(ph.memsz).is_none() {
                    return Err(ElfError::FileLargerThanMemory);
                }
            }
        }
        Ok(elf)
    }

    fn phdr(&self, i: u16) -> Result<Phdr, ElfError> {
        let at = self.hdr.phoff as usize + i as usize * core::mem::size_of::<Phdr>();
        let bytes = self.file.get(at..).ok_or(ElfError::BadProgramHeaders)?;
        Phdr::read_from_prefix(bytes)
            .map(|(p, _)| p)
            .map_err(|_| ElfError::BadProgramHeaders)
    }

    pub fn entry(&self) -> u64 {
        self.hdr.entry
    }

    /// The loadable segments (already validated by [`Elf::parse`]).
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        (0..self.hdr.phnum)
            .filter_map(|i| self.phdr(i).ok())
            .filter(|p| p.kind == PT_LOAD)
            .map(|p| Segment {
                paddr: p.paddr,
                offset: p.offset,
                filesz: p.filesz,
                memsz: p.memsz,
            })
    }

    /// Every note of every PT_NOTE segment, in file order. A malformed
    /// note area is an error, not a short list.
    pub fn notes(&self) -> Result<alloc::vec::Vec<Note<'a>>, ElfError> {
        let mut out = alloc::vec::Vec::new();
        for i in 0..self.hdr.phnum {
            let ph = self.phdr(i)?;
            if ph.kind != PT_NOTE {
                continue;
            }
            let end = ph.offset.checked_add(ph.filesz).ok_or(ElfError::BadNote)?;
            let area = usize::try_from(ph.offset)
                .ok()
                .zip(usize::try_from(end).ok())
                .and_then(|(a, b)| self.file.get(a..b))
                .ok_or(ElfError::BadNote)?;
            parse_notes(area, &mut out)?;
        }
        Ok(out)
    }

    /// The PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY` in a `Xen` note).
    pub fn pvh_entry(&self) -> Result<u32, ElfError> {
        let note = self
            .notes()?
            .into_iter()
            .find(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
            .ok_or(ElfError::NoPvhEntry)?;
        let value = match note.desc.len() {
            4 => {
                u32::from_le_bytes(note.desc.try_into().map_err(|_| ElfError::BadPvhEntry)?) as u64
            }
            8 => u64::from_le_bytes(note.desc.try_into().map_err(|_| ElfError::BadPvhEntry)?),
            _ => return Err(ElfError::BadPvhEntry),
        };
        u32::try_from(value).map_err(|_| ElfError::BadPvhEntry)
    }

    /// The file bytes of a segment.
    pub fn data(&self, s: &Segment) -> &'a [u8] {
        // Bounds were checked in `parse`; `get` keeps this panic-free anyway.
        self.file
            .get(s.offset as usize..(s.offset + s.filesz) as usize)
            .unwrap_or(&[])
    }
}

/// Notes are `namesz, descsz, type` (u32 each), then the name and the
/// descriptor, each padded to 4 bytes.
fn parse_notes<'a>(
    mut area: &'a [u8],
    out: &mut alloc::vec::Vec<Note<'a>>,
) -> Result<(), ElfError> {
    let pad4 = |n: u32| (n as usize).checked_add(3).map(|v| v & !3);
    while !area.is_empty() {
        let word = |i: usize| -> Result<u32, ElfError> {
            area.get(i * 4..i * 4 + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or(ElfError::BadNote)
        };
        let (namesz, descsz, kind) = (word(0)?, word(1)?, word(2)?);
        let name_len = pad4(namesz).ok_or(ElfError::BadNote)?;
        let desc_len = pad4(descsz).ok_or(ElfError::BadNote)?;
        let name = area
            .get(12..12 + namesz as usize)
            .ok_or(ElfError::BadNote)?;
        let desc_at = 12usize.checked_add(name_len).ok_or(ElfError::BadNote)?;
        let desc = desc_at
            .checked_add(descsz as usize)
            .and_then(|e| area.get(desc_at..e))
            .ok_or(ElfError::BadNote)?;
        let next = desc_at.checked_add(desc_len).ok_or(ElfError::BadNote)?;
        // The last note's padding may be cut off by the segment's end.
        area = area.get(next..).unwrap_or(&[]);
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        out.push(Note { name, kind, desc });
    }
    Ok(())
}

/// Builds ELF images for tests: loadable segments and notes.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use alloc::vec::Vec;

    /// A loadable segment to place: physical address, file bytes, memsz.
    pub struct Load<'a> {
        pub paddr: u64,
        pub data: &'a [u8],
        pub memsz: u64,
    }

    /// One note: owner name (NUL added), type, descriptor.
    pub struct NoteSpec<'a> {
        pub name: &'a [u8],
        pub kind: u32,
        pub desc: &'a [u8],
    }

    fn note_bytes(notes: &[NoteSpec]) -> Vec<u8> {
        let mut v = Vec::new();
        for n in notes {
            v.extend_from_slice(&(n.name.len() as u32 + 1).to_le_bytes());
            v.extend_from_slice(&(n.desc.len() as u32).to_le_bytes());
            v.extend_from_slice(&n.kind.to_le_bytes());
            v.extend_from_slice(n.name);
            v.push(0);
            while !v.len().is_multiple_of(4) {
                v.push(0);
            }
            v.extend_from_slice(n.desc);
            while !v.len().is_multiple_of(4) {
                v.push(0);
            }
        }
        v
    }

    /// An x86-64 ET_EXEC image with these segments, then one PT_NOTE
    /// segment holding `notes` (none when empty).
    pub fn build_elf(entry: u64, loads: &[Load], notes: &[NoteSpec]) -> Vec<u8> {
        let nphdr = loads.len() + usize::from(!notes.is_empty());
        let mut f = vec![0u8; 64 + 56 * nphdr];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(nphdr as u16).to_le_bytes());
        let phdr = |i: usize,
                    kind: u32,
                    off: u64,
                    paddr: u64,
                    filesz: u64,
                    memsz: u64,
                    f: &mut Vec<u8>| {
            let ph = 64 + 56 * i;
            f[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            f[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
            f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
            f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
            f[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
            f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        for (i, l) in loads.iter().enumerate() {
            let off = f.len() as u64;
            phdr(
                i,
                PT_LOAD,
                off,
                l.paddr,
                l.data.len() as u64,
                l.memsz,
                &mut f,
            );
            f.extend_from_slice(l.data);
        }
        if !notes.is_empty() {
            let n = note_bytes(notes);
            let off = f.len() as u64;
            phdr(
                loads.len(),
                PT_NOTE,
                off,
                0,
                n.len() as u64,
                n.len() as u64,
                &mut f,
            );
            f.extend_from_slice(&n);
        }
        f
    }

    /// A Xen PVH entry note with an 8-byte address, as Linux writes it.
    pub fn pvh_note(entry: &[u8; 8]) -> NoteSpec<'_> {
        NoteSpec {
            name: b"Xen",
            kind: XEN_ELFNOTE_PHYS32_ENTRY,
            desc: entry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// Build a small ELF with one PT_LOAD segment.
    fn build(entry: u64, paddr: u64, data: &[u8], memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn reads_entry_and_segment() {
        let f = build(0x10_0010, 0x10_0000, b"hello", 64);
        let e = Elf::parse(&f).unwrap();
        assert_eq!(e.entry(), 0x10_0010);
        let segs: Vec<_> = e.segments().collect();
        assert_eq!(
            segs,
            vec![Segment {
                paddr: 0x10_0000,
                offset: 120,
                filesz: 5,
                memsz: 64
            }]
        );
        assert_eq!(e.data(&segs[0]), b"hello");
    }

    #[test]
    fn rejects_malformed_files_without_panicking() {
        let good = build(0, 0x1000, b"abc", 3);
        assert_eq!(Elf::parse(&good[..10]).unwrap_err(), ElfError::TooShort);
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(Elf::parse(&bad).unwrap_err(), ElfError::BadMagic);
        let mut bad = good.clone();
        bad[4] = 1;
        assert_eq!(
            Elf::parse(&bad).unwrap_err(),
            ElfError::NotElf64LittleEndian
        );
        let mut bad = good.clone();
        bad[64 + 32] = 200; // filesz past the end
        assert_eq!(Elf::parse(&bad).unwrap_err(), ElfError::SegmentOutOfFile);
        let mut bad = good.clone();
        bad[56] = 0xff; // phnum huge
        assert_eq!(Elf::parse(&bad).unwrap_err(), ElfError::BadProgramHeaders);
        let bad = build(0, 0x1000, b"abcdef", 2);
        assert_eq!(
            Elf::parse(&bad).unwrap_err(),
            ElfError::FileLargerThanMemory
        );
        // Every truncation of a good file is an error or a valid parse, never a panic.
        for n in 0..good.len() {
            let _ = Elf::parse(&good[..n]);
        }
    }

    #[test]
    fn finds_the_pvh_entry_among_notes() {
        let entry = 0x100_0850u64.to_le_bytes();
        let other = NoteSpec {
            name: b"GNU",
            kind: 3,
            desc: b"build-id!",
        };
        let f = build_elf(
            0xffff_ffff_8100_0000,
            &[Load {
                paddr: 0x100_0000,
                data: b"kernel",
                memsz: 0x1000,
            }],
            &[other, pvh_note(&entry)],
        );
        let e = Elf::parse(&f).unwrap();
        let notes = e.notes().unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].name, b"GNU");
        assert_eq!(notes[0].desc, b"build-id!");
        assert_eq!(e.pvh_entry(), Ok(0x100_0850));
        // A 4-byte descriptor is accepted too.
        let f = build_elf(
            0,
            &[],
            &[NoteSpec {
                name: b"Xen",
                kind: XEN_ELFNOTE_PHYS32_ENTRY,
                desc: &0x20_0000u32.to_le_bytes(),
            }],
        );
        assert_eq!(Elf::parse(&f).unwrap().pvh_entry(), Ok(0x20_0000));
    }

    #[test]
    fn bad_or_missing_pvh_notes_are_errors() {
        // No note at all, or only another owner's type 18.
        let f = build_elf(0, &[], &[]);
        assert_eq!(
            Elf::parse(&f).unwrap().pvh_entry(),
            Err(ElfError::NoPvhEntry)
        );
        let f = build_elf(
            0,
            &[],
            &[NoteSpec {
                name: b"Linux",
                kind: XEN_ELFNOTE_PHYS32_ENTRY,
                desc: &[0; 8],
            }],
        );
        assert_eq!(
            Elf::parse(&f).unwrap().pvh_entry(),
            Err(ElfError::NoPvhEntry)
        );
        // An entry above 4 GiB or of an odd size.
        let high = (1u64 << 32).to_le_bytes();
        let f = build_elf(0, &[], &[pvh_note(&high)]);
        assert_eq!(
            Elf::parse(&f).unwrap().pvh_entry(),
            Err(ElfError::BadPvhEntry)
        );
        let f = build_elf(
            0,
            &[],
            &[NoteSpec {
                name: b"Xen",
                kind: XEN_ELFNOTE_PHYS32_ENTRY,
                desc: &[1, 2],
            }],
        );
        assert_eq!(
            Elf::parse(&f).unwrap().pvh_entry(),
            Err(ElfError::BadPvhEntry)
        );
        // A descriptor size running past the segment.
        let mut f = build_elf(0, &[], &[pvh_note(&0x1000u64.to_le_bytes())]);
        let note_at = f.len() - 24;
        f[note_at + 4..note_at + 8].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
        assert_eq!(Elf::parse(&f).unwrap().pvh_entry(), Err(ElfError::BadNote));
        f[note_at + 4..note_at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Elf::parse(&f).unwrap().pvh_entry(), Err(ElfError::BadNote));
    }
}
