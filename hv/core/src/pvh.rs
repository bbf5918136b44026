//! The PVH domain builder: puts an unmodified Linux (or any PVH kernel)
//! into guest memory the way Xen's PVH boot does (xen docs/misc/pvh.pandoc),
//! and says how its vCPU starts.
//!
//! Given the kernel's ELF, an initrd, a command line and the RAM size, it
//! loads the PT_LOAD segments at their physical addresses, writes
//! `struct hvm_start_info` version 1 with a memory map, the initrd as
//! module 0 and the command line, plus ACPI tables when given, and returns
//! the entry point (`XEN_ELFNOTE_PHYS32_ENTRY`) with the initial vCPU state:
//! 32-bit flat protected mode, paging off, EBX = the start info's address.
//!
//! Guest-physical layout (the one Firecracker uses for Linux):
//!
//! | what | where |
//! | --- | --- |
//! | GDT (null, code 0x08, data 0x10, TSS 0x18) | [`GDT_ADDR`] |
//! | `hvm_start_info` | [`START_INFO_ADDR`] |
//! | module list | [`MODLIST_ADDR`] |
//! | memory map | [`MEMMAP_ADDR`] |
//! | command line | [`CMDLINE_ADDR`], at most [`CMDLINE_MAX`] bytes |
//! | ACPI tables (RSDP first) | [`ACPI_ADDR`], in the reserved hole |
//! | kernel | its segments' physical addresses, at or above 1 MiB |
//! | initrd | the top of RAM, page aligned |
//!
//! The memory map: RAM [0, 0x9FC00), reserved [0x9FC00, 1 MiB) (the BIOS
//! area, which holds the ACPI tables), RAM [1 MiB, top).
//!
//! Everything in the kernel image is untrusted: a malformed ELF, segments
//! outside RAM or over the boot data, an entry outside the image, an initrd
//! or command line that does not fit: each is a [`PvhError`], never a panic
//! and never a write outside the memory window.

use alloc::vec::Vec;

use doppel_abi::pvh::{
    memmap_type, HvmMemmapTableEntry, HvmModlistEntry, HvmStartInfo, START_INFO_VERSION,
    XEN_HVM_START_MAGIC_VALUE,
};
use doppel_abi::SharedMem;
use zerocopy::IntoBytes;

use crate::elf::{Elf, ElfError};
use crate::hvm::{DescTable, SegAttr, Segment, VcpuState};

/// The boot GDT: null, flat 32-bit code, flat data, the 32-bit TSS.
pub const GDT_ADDR: u64 = 0x500;
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MODLIST_ADDR: u64 = 0x6040;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line, counting its terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where the ACPI tables go (inside the reserved hole).
pub const ACPI_ADDR: u64 = 0xE_0000;
/// Room for the ACPI tables: up to the end of the hole.
pub const ACPI_MAX: usize = (HIGH_RAM - ACPI_ADDR) as usize;
/// The end of low RAM (the EBDA starts here).
pub const LOW_RAM_END: u64 = 0x9_FC00;
/// High RAM starts at 1 MiB; the kernel must load there or above.
pub const HIGH_RAM: u64 = 0x10_0000;
/// Most RAM: below the 32-bit MMIO window (IOAPIC at 0xFEC00000, LAPIC at
/// 0xFEE00000), so one RAM region above 1 MiB is the whole map.
pub const MAX_RAM: u64 = 0xC000_0000;
/// Least RAM: the boot area plus one page.
pub const MIN_RAM: u64 = HIGH_RAM + PAGE;
const PAGE: u64 = 0x1000;

/// Selectors of the boot GDT.
pub const CODE_SEL: u16 = 0x08;
pub const DATA_SEL: u16 = 0x10;
pub const TSS_SEL: u16 = 0x18;

/// The TSS limit (a 32-bit TSS is 104 bytes).
const TSS_LIMIT: u32 = 0x67;

/// What to build.
#[derive(Clone, Copy, Debug)]
pub struct PvhConfig<'a> {
    /// The kernel as an ELF (vmlinux) with a PVH entry note.
    pub kernel: &'a [u8],
    /// The initrd (module 0); empty for none.
    pub initrd: &'a [u8],
    /// The kernel command line, without NUL.
    pub cmdline: &'a [u8],
    /// Guest RAM in bytes, a multiple of 4 KiB.
    pub ram_size: u64,
    /// ACPI tables laid out for [`ACPI_ADDR`], RSDP first; `None` for no
    /// ACPI (the start info's `rsdp_paddr` is then 0).
    pub acpi: Option<&'a [u8]>,
}

/// Why a domain could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvhError {
    /// The kernel is not a loadable ELF, or has no usable PVH note.
    Elf(ElfError),
    /// RAM below [`MIN_RAM`], above [`MAX_RAM`] or not page aligned.
    BadRamSize(u64),
    /// The memory window is smaller than the RAM it should hold.
    WindowTooSmall { window: u64, ram: u64 },
    /// A segment reaches past the end of RAM.
    SegmentOutsideRam { paddr: u64, end: u64 },
    /// A segment starts below 1 MiB, over the boot data and the hole.
    SegmentOverBootData { paddr: u64, end: u64 },
    /// The ELF has no loadable segment.
    NoSegments,
    /// The PVH entry is not inside a loaded segment.
    EntryOutsideImage(u32),
    /// The initrd does not fit between the kernel and the top of RAM.
    InitrdDoesNotFit { size: u64, room: u64 },
    /// The command line is too long or holds a NUL.
    BadCmdline,
    /// The ACPI tables do not fit in [`ACPI_MAX`] bytes.
    AcpiTooLarge(usize),
}

impl From<ElfError> for PvhError {
    fn from(e: ElfError) -> Self {
        Self::Elf(e)
    }
}

impl core::fmt::Display for PvhError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::Elf(e) => write!(f, "kernel ELF: {e:?}"),
            Self::BadRamSize(r) => write!(
                f,
                "guest RAM {r:#x} must be a multiple of 4 KiB in {MIN_RAM:#x}..={MAX_RAM:#x}"
            ),
            Self::WindowTooSmall { window, ram } => {
                write!(f, "memory window {window:#x} smaller than RAM {ram:#x}")
            }
            Self::SegmentOutsideRam { paddr, end } => {
                write!(f, "kernel segment {paddr:#x}-{end:#x} lies beyond RAM")
            }
            Self::SegmentOverBootData { paddr, end } => write!(
                f,
                "kernel segment {paddr:#x}-{end:#x} overlaps the boot data below 1 MiB"
            ),
            Self::NoSegments => write!(f, "kernel ELF has no loadable segment"),
            Self::EntryOutsideImage(e) => {
                write!(f, "PVH entry {e:#x} is outside the loaded kernel")
            }
            Self::InitrdDoesNotFit { size, room } => write!(
                f,
                "initrd of {size:#x} bytes does not fit in the {room:#x} bytes above the kernel"
            ),
            Self::BadCmdline => write!(
                f,
                "command line longer than {} bytes or holding a NUL",
                CMDLINE_MAX - 1
            ),
            Self::AcpiTooLarge(n) => write!(f, "ACPI tables of {n} bytes exceed {ACPI_MAX}"),
        }
    }
}

/// A built domain: where it starts and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvhBoot {
    /// The PVH entry point (also `vcpu.rip`).
    pub entry: u32,
    /// Guest-physical address of the start info (also `vcpu.rbx`).
    pub start_info: u64,
    /// The initrd's guest-physical address and size (0, 0 when none).
    pub initrd: (u64, u64),
    /// Lowest and highest address the kernel's segments cover.
    pub kernel_span: (u64, u64),
    /// The memory map written for the guest.
    pub memmap: Vec<HvmMemmapTableEntry>,
    /// The vCPU at the entry point.
    pub vcpu: VcpuState,
}

// Xen's packed segment attributes: type, S (bit 4), P (bit 7), D/B (10),
// G (11).
const ATTR_CODE32: u16 = 0xb | 1 << 4 | 1 << 7 | 1 << 10 | 1 << 11;
const ATTR_DATA32: u16 = 0x3 | 1 << 4 | 1 << 7 | 1 << 10 | 1 << 11;
/// A busy 32-bit TSS, present.
const ATTR_TSS32: u16 = 0xb | 1 << 7;

/// The boot GDT's descriptors (legacy 8-byte format).
const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff, // code: base 0, limit 4 GiB, 32-bit, exec/read, accessed
    0x00cf_9300_0000_ffff, // data: base 0, limit 4 GiB, read/write, accessed
    0x0000_8b00_0000_0067, // TSS: base 0, limit 0x67, busy
];

fn flat(selector: u16, attr: u16) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        attr: SegAttr::from_bits(attr).unwrap_or_default(),
    }
}

/// The vCPU at a PVH entry (pvh.pandoc): CR0 = PE | ET, CR4 = 0, EFER = 0,
/// flat 32-bit CS/DS/ES/SS/FS/GS, a busy 32-bit TSS in TR, LDTR unusable,
/// RFLAGS with only the fixed bit 1 (IF and TF clear), EBX = start info.
pub fn initial_vcpu(entry: u32, start_info: u64) -> VcpuState {
    let data = flat(DATA_SEL, ATTR_DATA32);
    VcpuState {
        rip: u64::from(entry),
        rbx: start_info,
        rflags: 0x2,
        cr0: 0x11,
        cs: flat(CODE_SEL, ATTR_CODE32),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            selector: TSS_SEL,
            base: 0,
            limit: TSS_LIMIT,
            attr: SegAttr::from_bits(ATTR_TSS32).unwrap_or_default(),
        },
        gdtr: DescTable {
            base: GDT_ADDR,
            limit: (GDT.len() * 8 - 1) as u16,
        },
        ..VcpuState::default()
    }
}

/// Write `bytes` at `paddr` after checking it lies inside `ram`.
fn put<M: SharedMem + ?Sized>(mem: &M, ram: u64, paddr: u64, bytes: &[u8]) -> Option<()> {
    let end = paddr.checked_add(bytes.len() as u64)?;
    if end > ram {
        return None;
    }
    mem.write_bytes(usize::try_from(paddr).ok()?, bytes);
    Some(())
}

/// Zero `[paddr, paddr + len)`, checked against `ram`.
fn zero<M: SharedMem + ?Sized>(mem: &M, ram: u64, mut paddr: u64, mut len: u64) -> Option<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64);
        put(mem, ram, paddr, ZEROS.get(..n as usize)?)?;
        paddr += n;
        len -= n;
    }
    Some(())
}

/// The memory map for `ram` bytes of RAM.
pub fn memmap(ram: u64) -> [HvmMemmapTableEntry; 3] {
    let entry = |addr: u64, end: u64, type_: u32| HvmMemmapTableEntry {
        addr,
        size: end - addr,
        type_,
        reserved: 0,
    };
    [
        entry(0, LOW_RAM_END, memmap_type::RAM),
        entry(LOW_RAM_END, HIGH_RAM, memmap_type::RESERVED),
        entry(HIGH_RAM, ram.max(HIGH_RAM), memmap_type::RAM),
    ]
}

/// Build the domain into `mem` (guest-physical address = offset in the
/// window). Everything is checked before the first byte is written, so an
/// error leaves the memory untouched.
pub fn build<M: SharedMem + ?Sized>(mem: &M, cfg: &PvhConfig) -> Result<PvhBoot, PvhError> {
    let ram = cfg.ram_size;
    if !(MIN_RAM..=MAX_RAM).contains(&ram) || !ram.is_multiple_of(PAGE) {
        return Err(PvhError::BadRamSize(ram));
    }
    let window = mem.size() as u64;
    if window < ram {
        return Err(PvhError::WindowTooSmall { window, ram });
    }
    if cfg.cmdline.len() >= CMDLINE_MAX || cfg.cmdline.contains(&0) {
        return Err(PvhError::BadCmdline);
    }
    let acpi = cfg.acpi.unwrap_or(&[]);
    if acpi.len() > ACPI_MAX {
        return Err(PvhError::AcpiTooLarge(acpi.len()));
    }

    let elf = Elf::parse(cfg.kernel)?;
    let entry = elf.pvh_entry()?;
    let mut span = (u64::MAX, 0u64);
    let mut entry_loaded = false;
    for s in elf.segments() {
        // `Elf::parse` checked paddr + memsz does not overflow.
        let end = s.paddr.saturating_add(s.memsz);
        if s.paddr < HIGH_RAM {
            return Err(PvhError::SegmentOverBootData {
                paddr: s.paddr,
                end,
            });
        }
        if end > ram {
            return Err(PvhError::SegmentOutsideRam {
                paddr: s.paddr,
                end,
            });
        }
        span = (span.0.min(s.paddr), span.1.max(end));
        entry_loaded |= (s.paddr..end).contains(&u64::from(entry));
    }
    if span.1 == 0 {
        return Err(PvhError::NoSegments);
    }
    if !entry_loaded {
        return Err(PvhError::EntryOutsideImage(entry));
    }

    // The initrd at the top of RAM, page aligned, above the kernel.
    let size = cfg.initrd.len() as u64;
    let room = ram - span.1.next_multiple_of(PAGE).min(ram);
    let initrd_at = match size {
        0 => 0,
        _ if size > room => return Err(PvhError::InitrdDoesNotFit { size, room }),
        _ => (ram - size) & !(PAGE - 1),
    };

    // All checked: write. `put` checks again, so a mistake above is an
    // error, not a write outside the window.
    let fail = PvhError::SegmentOutsideRam {
        paddr: span.0,
        end: span.1,
    };
    for s in elf.segments() {
        let data = elf.data(&s);
        put(mem, ram, s.paddr, data).ok_or(fail)?;
        zero(mem, ram, s.paddr + s.filesz, s.memsz - s.filesz).ok_or(fail)?;
    }
    if size > 0 {
        put(mem, ram, initrd_at, cfg.initrd).ok_or(fail)?;
    }
    put(mem, ram, GDT_ADDR, GDT.as_bytes()).ok_or(fail)?;
    put(mem, ram, CMDLINE_ADDR, cfg.cmdline).ok_or(fail)?;
    put(mem, ram, CMDLINE_ADDR + cfg.cmdline.len() as u64, &[0]).ok_or(fail)?;
    let map = memmap(ram);
    put(mem, ram, MEMMAP_ADDR, map.as_bytes()).ok_or(fail)?;
    let module = HvmModlistEntry {
        paddr: initrd_at,
        size,
        cmdline_paddr: 0,
        reserved: 0,
    };
    put(mem, ram, MODLIST_ADDR, module.as_bytes()).ok_or(fail)?;
    if !acpi.is_empty() {
        put(mem, ram, ACPI_ADDR, acpi).ok_or(fail)?;
    }
    let info = HvmStartInfo {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: u32::from(size > 0),
        modlist_paddr: if size > 0 { MODLIST_ADDR } else { 0 },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: if acpi.is_empty() { 0 } else { ACPI_ADDR },
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        reserved: 0,
    };
    put(mem, ram, START_INFO_ADDR, info.as_bytes()).ok_or(fail)?;

    Ok(PvhBoot {
        entry,
        start_info: START_INFO_ADDR,
        initrd: (initrd_at, size),
        kernel_span: span,
        memmap: map.to_vec(),
        vcpu: initial_vcpu(entry, START_INFO_ADDR),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::testing::{build_elf, pvh_note, Load, NoteSpec};
    use crate::elf::XEN_ELFNOTE_PHYS32_ENTRY;
    use crate::hvm::{from_hw_cpu, to_hw_cpu};
    use doppel_abi::ByteMem;
    use proptest::prelude::*;
    use zerocopy::FromBytes;

    const RAM: u64 = 4 << 20;

    /// Guest RAM for tests: a byte vector whose accessors panic (slice
    /// indexing) on any access outside it, so a stray write fails the test.
    type TestRam = ByteMem<Vec<u8>>;

    fn test_ram(bytes: u64) -> TestRam {
        // A pattern, so zeroing and untouched areas both show.
        ByteMem::new(vec![0xa5; bytes as usize])
    }

    fn untouched(mem: &TestRam) -> bool {
        mem.0.borrow().iter().all(|&b| b == 0xa5)
    }

    fn read(mem: &TestRam, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_bytes(at as usize, &mut v);
        v
    }

    const ENTRY: u64 = 0x10_0040;

    fn kernel() -> Vec<u8> {
        build_elf(
            0xffff_ffff_8100_0000,
            &[
                Load {
                    paddr: 0x10_0000,
                    data: &[0x90; 0x100],
                    memsz: 0x100,
                },
                Load {
                    paddr: 0x14_0000,
                    data: b"data",
                    memsz: 0x3000, // bss after the data
                },
            ],
            &[pvh_note(&ENTRY.to_le_bytes())],
        )
    }

    fn cfg<'a>(kernel: &'a [u8], initrd: &'a [u8]) -> PvhConfig<'a> {
        PvhConfig {
            kernel,
            initrd,
            cmdline: b"console=ttyS0 quiet",
            ram_size: RAM,
            acpi: Some(b"RSD PTR tables"),
        }
    }

    #[test]
    fn loads_segments_and_writes_the_start_info() {
        let mem = test_ram(RAM);
        let k = kernel();
        let initrd = vec![0x42u8; 10_000];
        let boot = build(&mem, &cfg(&k, &initrd)).unwrap();

        assert_eq!(boot.entry, ENTRY as u32);
        assert_eq!(boot.kernel_span, (0x10_0000, 0x14_3000));
        // Segments at their physical addresses, bss zeroed, past it untouched.
        assert_eq!(read(&mem, 0x10_0000, 0x100), vec![0x90; 0x100]);
        assert_eq!(read(&mem, 0x14_0000, 4), b"data");
        assert!(read(&mem, 0x14_0004, 0x3000 - 4).iter().all(|&b| b == 0));
        assert_eq!(read(&mem, 0x14_3000, 4), [0xa5; 4]);

        // The initrd: page aligned at the top of RAM.
        assert_eq!(boot.initrd, ((RAM - 10_000) & !0xfff, 10_000));
        assert_eq!(read(&mem, boot.initrd.0, 10_000), initrd);

        let info = HvmStartInfo::read_from_bytes(&read(&mem, START_INFO_ADDR, 56)).unwrap();
        assert_eq!(
            info,
            HvmStartInfo {
                magic: 0x336e_c578,
                version: 1,
                flags: 0,
                nr_modules: 1,
                modlist_paddr: MODLIST_ADDR,
                cmdline_paddr: CMDLINE_ADDR,
                rsdp_paddr: ACPI_ADDR,
                memmap_paddr: MEMMAP_ADDR,
                memmap_entries: 3,
                reserved: 0,
            }
        );
        let module = HvmModlistEntry::read_from_bytes(&read(&mem, MODLIST_ADDR, 32)).unwrap();
        assert_eq!((module.paddr, module.size), boot.initrd);
        assert_eq!(read(&mem, CMDLINE_ADDR, 20), b"console=ttyS0 quiet\0");
        assert_eq!(read(&mem, ACPI_ADDR, 14), b"RSD PTR tables");

        // The memory map: RAM, the reserved hole (holding ACPI), RAM to the top.
        let map =
            <[HvmMemmapTableEntry; 3]>::read_from_bytes(&read(&mem, MEMMAP_ADDR, 72)).unwrap();
        assert_eq!(map.to_vec(), boot.memmap);
        let spans: Vec<_> = map
            .iter()
            .map(|e| (e.addr, e.addr + e.size, e.type_))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 0x9_fc00, memmap_type::RAM),
                (0x9_fc00, 0x10_0000, memmap_type::RESERVED),
                (0x10_0000, RAM, memmap_type::RAM),
            ]
        );
        let hole = &map[1];
        assert!(hole.addr <= ACPI_ADDR && ACPI_ADDR + ACPI_MAX as u64 <= hole.addr + hole.size);

        // The GDT the selectors point at.
        let gdt = <[u64; 4]>::read_from_bytes(&read(&mem, GDT_ADDR, 32)).unwrap();
        assert_eq!(gdt, GDT);
    }

    #[test]
    fn the_vcpu_starts_as_pvh_says() {
        let v = initial_vcpu(0x100_0850, START_INFO_ADDR);
        assert_eq!(v.rip, 0x100_0850);
        assert_eq!(v.rbx, START_INFO_ADDR);
        assert_eq!(v.cr0, 0x11, "PE and ET, paging off");
        assert_eq!((v.cr4, v.efer), (0, 0));
        assert_eq!(v.rflags & (1 << 9 | 1 << 8), 0, "IF and TF clear");
        for s in [v.cs, v.ds, v.es, v.ss, v.fs, v.gs] {
            assert_eq!((s.base, s.limit), (0, 0xffff_ffff));
            assert!(s.attr.present());
            assert_eq!(s.attr.dpl(), 0);
            assert!(!s.attr.long());
            assert_eq!(s.attr.bits() & 1 << 10, 1 << 10, "32-bit");
        }
        assert_eq!(v.cs.attr.seg_type() & 0x8, 0x8, "CS is code");
        assert_eq!(v.ss.attr.seg_type() & 0xa, 0x2, "SS is writable data");
        assert_eq!(v.tr.attr.seg_type(), 0xb, "busy 32-bit TSS");
        assert!(v.tr.attr.present());
        assert!(!v.ldtr.attr.present(), "LDTR unusable");
        // Each selector's descriptor in the GDT agrees with the register.
        for s in [v.cs, v.ds, v.tr] {
            let d = GDT[usize::from(s.selector >> 3)];
            let access = ((d >> 40) & 0xff) as u16;
            assert_eq!(access, s.attr.bits() & 0xff, "selector {:#x}", s.selector);
        }
        assert!(u64::from(v.gdtr.limit) + 1 == 32);
        // The state survives Xen's CPU record, as a restore would see it.
        assert_eq!(from_hw_cpu(&to_hw_cpu(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn the_start_info_points_at_the_real_acpi_tables() {
        let mem = test_ram(RAM);
        let k = kernel();
        let acpi = crate::acpi::build(ACPI_ADDR);
        let c = PvhConfig {
            acpi: Some(&acpi.bytes),
            ..cfg(&k, &[])
        };
        build(&mem, &c).unwrap();
        let info = HvmStartInfo::read_from_bytes(&read(&mem, START_INFO_ADDR, 56)).unwrap();
        assert_eq!(read(&mem, info.rsdp_paddr, 8), b"RSD PTR ");
        assert_eq!(read(&mem, ACPI_ADDR, acpi.bytes.len()), acpi.bytes);
        // The tables lie in the memory map's reserved hole.
        let hole = memmap(RAM)[1];
        assert_eq!(hole.type_, memmap_type::RESERVED);
        assert!(hole.addr <= ACPI_ADDR);
        assert!(ACPI_ADDR + acpi.bytes.len() as u64 <= hole.addr + hole.size);
    }

    #[test]
    fn no_initrd_and_no_acpi() {
        let mem = test_ram(RAM);
        let k = kernel();
        let c = PvhConfig {
            acpi: None,
            ..cfg(&k, &[])
        };
        let boot = build(&mem, &c).unwrap();
        assert_eq!(boot.initrd, (0, 0));
        let info = HvmStartInfo::read_from_bytes(&read(&mem, START_INFO_ADDR, 56)).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.rsdp_paddr),
            (0, 0, 0)
        );
    }

    fn err<'a>(kernel: &'a [u8], initrd: &'a [u8], f: impl FnOnce(&mut PvhConfig<'a>)) -> PvhError {
        let mem = test_ram(RAM);
        let mut c = cfg(kernel, initrd);
        f(&mut c);
        let e = build(&mem, &c).unwrap_err();
        // An error leaves memory untouched.
        assert!(untouched(&mem));
        e
    }

    fn one_segment(paddr: u64, memsz: u64, entry: u64) -> Vec<u8> {
        build_elf(
            0,
            &[Load {
                paddr,
                data: b"x",
                memsz,
            }],
            &[pvh_note(&entry.to_le_bytes())],
        )
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let k = kernel();
        // Segments past the end of RAM, or over the start info below 1 MiB.
        let beyond = one_segment(RAM - 0x1000, 0x2000, RAM - 0x1000);
        assert_eq!(
            err(&beyond, &[], |_| ()),
            PvhError::SegmentOutsideRam {
                paddr: RAM - 0x1000,
                end: RAM + 0x1000
            }
        );
        let over = one_segment(START_INFO_ADDR, 0x100, START_INFO_ADDR);
        assert_eq!(
            err(&over, &[], |_| ()),
            PvhError::SegmentOverBootData {
                paddr: START_INFO_ADDR,
                end: START_INFO_ADDR + 0x100
            }
        );
        // A segment whose end wraps is refused by the ELF reader.
        let wrap = one_segment(u64::MAX - 0x10, 0x100, 0x10_0000);
        assert_eq!(
            err(&wrap, &[], |_| ()),
            PvhError::Elf(ElfError::FileLargerThanMemory)
        );
        // Entry outside the image; no PVH note; a bad note; no segments.
        let outside = one_segment(0x10_0000, 0x1000, 0x20_0000);
        assert_eq!(
            err(&outside, &[], |_| ()),
            PvhError::EntryOutsideImage(0x20_0000)
        );
        let no_note = build_elf(
            0,
            &[Load {
                paddr: 0x10_0000,
                data: b"x",
                memsz: 1,
            }],
            &[],
        );
        assert_eq!(
            err(&no_note, &[], |_| ()),
            PvhError::Elf(ElfError::NoPvhEntry)
        );
        let bad_note = build_elf(
            0,
            &[],
            &[NoteSpec {
                name: b"Xen",
                kind: XEN_ELFNOTE_PHYS32_ENTRY,
                desc: &[1, 2, 3],
            }],
        );
        assert_eq!(
            err(&bad_note, &[], |_| ()),
            PvhError::Elf(ElfError::BadPvhEntry)
        );
        let empty = build_elf(0, &[], &[pvh_note(&0x10_0000u64.to_le_bytes())]);
        assert_eq!(err(&empty, &[], |_| ()), PvhError::NoSegments);
        assert_eq!(
            err(b"MZ not an elf", &[], |_| ()),
            PvhError::Elf(ElfError::TooShort)
        );
        // An initrd bigger than the room above the kernel.
        let big = vec![0u8; (RAM - 0x14_3000) as usize + 1];
        assert_eq!(
            err(&k, &big, |_| ()),
            PvhError::InitrdDoesNotFit {
                size: big.len() as u64,
                room: RAM - 0x14_3000
            }
        );
        // Command line too long or with a NUL; ACPI too large.
        let long = vec![b'a'; CMDLINE_MAX];
        assert_eq!(err(&k, &[], |c| c.cmdline = &long), PvhError::BadCmdline);
        assert_eq!(err(&k, &[], |c| c.cmdline = b"a\0b"), PvhError::BadCmdline);
        let acpi = vec![0u8; ACPI_MAX + 1];
        assert_eq!(
            err(&k, &[], |c| c.acpi = Some(&acpi)),
            PvhError::AcpiTooLarge(ACPI_MAX + 1)
        );
        // RAM sizes: unaligned, too small, too large, bigger than the window.
        assert_eq!(
            err(&k, &[], |c| c.ram_size = RAM + 1),
            PvhError::BadRamSize(RAM + 1)
        );
        assert_eq!(
            err(&k, &[], |c| c.ram_size = HIGH_RAM),
            PvhError::BadRamSize(HIGH_RAM)
        );
        assert_eq!(
            err(&k, &[], |c| c.ram_size = MAX_RAM + PAGE),
            PvhError::BadRamSize(MAX_RAM + PAGE)
        );
        assert_eq!(
            err(&k, &[], |c| c.ram_size = 2 * RAM),
            PvhError::WindowTooSmall {
                window: RAM,
                ram: 2 * RAM
            }
        );
        // Every error has a message naming the problem.
        assert!(PvhError::EntryOutsideImage(0x20_0000)
            .to_string()
            .contains("0x200000"));
    }

    #[test]
    fn the_largest_initrd_that_fits_does_not_touch_the_kernel() {
        let mem = test_ram(RAM);
        let k = kernel();
        let initrd = vec![0x42u8; (RAM - 0x14_3000) as usize];
        let boot = build(&mem, &cfg(&k, &initrd)).unwrap();
        assert_eq!(boot.initrd.0, 0x14_3000);
        assert_eq!(read(&mem, 0x14_0000, 4), b"data");
    }

    /// The fuzz target's seeds (fuzz/corpus/pvh_domain, first two bytes
    /// the initrd size in 64-byte units) give the outcomes they were made
    /// for, in the fuzz target's 2 MiB of RAM.
    #[test]
    fn fuzz_seeds_mean_what_their_names_say() {
        let seeds: [(&[u8], Result<u32, PvhError>); 6] = [
            (
                include_bytes!("../../../fuzz/corpus/pvh_domain/valid"),
                Ok(0x10_0010),
            ),
            (
                include_bytes!("../../../fuzz/corpus/pvh_domain/two_segments"),
                Ok(0x10_0000),
            ),
            (
                include_bytes!("../../../fuzz/corpus/pvh_domain/note_4byte"),
                Ok(0x10_0004),
            ),
            (
                include_bytes!("../../../fuzz/corpus/pvh_domain/over_start_info"),
                Err(PvhError::SegmentOverBootData {
                    paddr: 0x6000,
                    end: 0x6100,
                }),
            ),
            (
                include_bytes!("../../../fuzz/corpus/pvh_domain/beyond_ram"),
                Err(PvhError::SegmentOutsideRam {
                    paddr: 0x1f_f000,
                    end: 0x20_1000,
                }),
            ),
            (
                include_bytes!("../../../fuzz/corpus/pvh_domain/truncated"),
                Err(PvhError::Elf(ElfError::BadProgramHeaders)),
            ),
        ];
        for (seed, want) in seeds {
            let units = usize::from(u16::from_le_bytes([seed[0], seed[1]]));
            let initrd = vec![0x5a; units * 64];
            let mem = test_ram(2 << 20);
            let c = PvhConfig {
                kernel: &seed[2..],
                initrd: &initrd,
                cmdline: b"console=ttyS0",
                ram_size: 2 << 20,
                acpi: Some(b"RSD PTR "),
            };
            assert_eq!(build(&mem, &c).map(|b| b.entry), want);
        }
    }

    /// A mutated kernel image: flip bytes, maybe truncate.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        let base = kernel();
        let len = base.len();
        (
            proptest::collection::vec((0..len, any::<u8>()), 0..8),
            0..=len,
        )
            .prop_map(move |(flips, cut)| {
                let mut k = base.clone();
                for (i, b) in flips {
                    k[i] = b;
                }
                k.truncate(cut.max(1));
                k
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the kernel bytes, building never panics (TestRam
        /// panics on a write outside its window), and a success keeps its
        /// promises: entry inside the kernel, kernel and initrd in high RAM
        /// and apart.
        #[test]
        fn untrusted_kernels_never_panic(k in mutated(), initrd_len in 0usize..0x30_0000) {
            let mem = test_ram(RAM);
            let initrd = vec![7u8; initrd_len];
            if let Ok(b) = build(&mem, &cfg(&k, &initrd)) {
                prop_assert!(b.kernel_span.0 >= HIGH_RAM && b.kernel_span.1 <= RAM);
                prop_assert!((b.kernel_span.0..b.kernel_span.1).contains(&u64::from(b.entry)));
                if b.initrd.1 > 0 {
                    prop_assert!(b.initrd.0 >= b.kernel_span.1);
                    prop_assert!(b.initrd.0 + b.initrd.1 <= RAM);
                }
            }
        }

        /// Random program-header fields over a valid layout.
        #[test]
        fn random_segments_are_checked(paddr in any::<u64>(), memsz in any::<u64>(), entry in any::<u64>()) {
            let mem = test_ram(RAM);
            let k = one_segment(paddr, memsz.max(1), entry);
            match build(&mem, &cfg(&k, &[])) {
                Ok(b) => {
                    prop_assert!(paddr >= HIGH_RAM && paddr + memsz.max(1) <= RAM);
                    prop_assert_eq!(u64::from(b.entry), entry);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
