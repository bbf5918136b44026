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

    /// The file bytes of a segment.
    pub fn data(&self, s: &Segment) -> &'a [u8] {
        // Bounds were checked in `parse`; `get` keeps this panic-free anyway.
        self.file
            .get(s.offset as usize..(s.offset + s.filesz) as usize)
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
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
}
