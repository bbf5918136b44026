//! Machine memory as the dom0 tool sees it: a host file that backs the
//! emulator's RAM (`-object memory-backend-file,...,share=on`), mapped
//! shared, and the hypervisor's control area found in it through the
//! control locator (hv/abi `locator`), at a fixed address the guest cannot
//! write: never by scanning for its magic.
//!
//! Everything in the file is written by someone else (the hypervisor, the
//! guest, the emulator) while we read it, so every access goes through
//! atomics ([`AtomicMem64`]) and everything is copied out before it is
//! validated.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use doppel_abi::control::{validate_header, AbiError, ControlView, Field, Region, HEADER_SIZE};
use doppel_abi::locator::{Locator, LocatorError, LOCATOR_AT, LOCATOR_SIZE, LOCATOR_WORDS};
use doppel_abi::{AtomicMem64, SharedMem};
use memmap2::{MmapOptions, MmapRaw};

/// Page size; the control area starts on a page boundary.
pub const PAGE: usize = 4096;

/// Why the machine file or its control area cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {len} bytes is not a whole number of 4 KiB pages (or is empty)")]
    BadFileSize { path: PathBuf, len: u64 },
    #[error(
        "{path}: no control area: the locator page at {LOCATOR_AT:#x} holds no \
         \"DOPPELLO\" (is the hypervisor running in mode=primary or mode=standby?)"
    )]
    NotFound { path: PathBuf, len: u64 },
    #[error(
        "{path}: the {len}-byte file ends before the control locator page at {LOCATOR_AT:#x} \
         (too small for a machine running the hypervisor)"
    )]
    NoLocatorPage { path: PathBuf, len: u64 },
    #[error("{path}: control locator at {LOCATOR_AT:#x}: {}", locator_text(*.err))]
    BadLocator { path: PathBuf, err: LocatorError },
    #[error("{path}: control area at machine address {at:#x}: {}", describe(*.err))]
    Control {
        path: PathBuf,
        at: u64,
        err: AbiError,
    },
    #[error(
        "{path}: control area at {at:#x}: the hypervisor published no guest (guest_ram.size = 0)"
    )]
    NoGuest { path: PathBuf, at: u64 },
    #[error(
        "{path}: control area at {at:#x}: field guest_ram ({offset:#x}, {size:#x} bytes) \
         lies outside the {len}-byte machine RAM file"
    )]
    GuestRamOutsideFile {
        path: PathBuf,
        at: u64,
        offset: u64,
        size: u64,
        len: u64,
    },
}

/// A refused locator in words.
pub fn locator_text(e: LocatorError) -> String {
    match e {
        LocatorError::NoMagic(m) => format!("magic is {m:#018x}"),
        LocatorError::Misaligned => "the control area's address or size is not whole pages".into(),
        LocatorError::OverlapsLocator => "the control area overlaps the locator page".into(),
        LocatorError::BeyondMemory => "the control area ends beyond the machine's RAM".into(),
        LocatorError::LargerThanPlaced { total } => format!(
            "the control header's total_size {total} exceeds the bytes the locator gives the area"
        ),
        LocatorError::ControlInGuestRam => {
            "the control area lies in the guest RAM its header declares (guest-writable); refused"
                .into()
        }
        LocatorError::LocatorInGuestRam => {
            "the guest RAM the header declares covers the locator page (guest-writable); refused"
                .into()
        }
    }
}

/// The header field a [`Field`] names, as spelled in `ControlHeader`.
pub fn field_name(f: Field) -> &'static str {
    match f {
        Field::Magic => "magic",
        Field::Version => "version",
        Field::HeaderSize => "header_size",
        Field::TotalSize => "total_size",
        Field::Features => "features",
        Field::Reserved => "reserved",
        Field::CommandRing => "cmd_ring",
        Field::EventRing => "evt_ring",
        Field::OutputChannel => "out_chan",
        Field::InputChannel => "in_chan",
        Field::Staging => "staging",
        Field::VcpuArea => "vcpu_area",
        Field::PfnList => "pfn_list",
        Field::GuestRam => "guest_ram",
    }
}

/// A control area error in words, naming the field.
pub fn describe(e: AbiError) -> String {
    use doppel_abi::control::ABI_VERSION;
    match e {
        AbiError::TooShort { have } => {
            format!("only {have} bytes left in the file, the header needs {HEADER_SIZE}")
        }
        AbiError::BadMagic(m) => format!("field magic is {m:#018x}"),
        AbiError::UnsupportedVersion(v) => {
            format!(
                "field version is {v}; this tool speaks version {ABI_VERSION} (1..={ABI_VERSION})"
            )
        }
        AbiError::BadHeaderSize(s) => format!("field header_size is {s}, expected {HEADER_SIZE}"),
        AbiError::BadTotalSize { total, mapped } => format!(
            "field total_size is {total}: below the header or beyond the {mapped} bytes \
             from the area to the end of the file"
        ),
        AbiError::UnknownFeatures(b) => format!("field features has unknown bits {b:#x}"),
        AbiError::ReservedNonZero => "field reserved is not zero".into(),
        AbiError::RegionOutOfBounds(f) => {
            format!(
                "field {} ends beyond total_size (or overflows)",
                field_name(f)
            )
        }
        AbiError::RegionMisaligned(f) => {
            format!("field {}: offset or size is misaligned", field_name(f))
        }
        AbiError::RegionTooSmall(f) => {
            format!("field {} is too small for its content", field_name(f))
        }
        AbiError::RegionOverlapsHeader(f) => {
            format!("field {} overlaps the header", field_name(f))
        }
        AbiError::RegionOverlap(a, b) => {
            format!("fields {} and {} overlap", field_name(a), field_name(b))
        }
        AbiError::SpanOutside(f) => {
            format!("a span lies outside region {}", field_name(f))
        }
    }
}

/// The machine RAM file, mapped shared.
pub struct MachineRam {
    path: PathBuf,
    map: MmapRaw,
    _file: File,
}

impl MachineRam {
    /// Map `path` read-write and shared (the tool writes ring entries).
    pub fn open(path: &Path) -> Result<Self, MachineError> {
        let io = |source| MachineError::Io {
            path: path.into(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 || !len.is_multiple_of(PAGE as u64) || usize::try_from(len).is_err() {
            return Err(MachineError::BadFileSize {
                path: path.into(),
                len,
            });
        }
        let map = MmapOptions::new().map_raw(&file).map_err(io)?;
        Ok(Self {
            path: path.into(),
            map,
            _file: file,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes mapped (the file's size).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true: [`MachineRam::open`] refuses empty files.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The whole mapping as 64-bit words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len` bytes, readable and writable, shared
        // with other processes (emulator, hypervisor) and alive as long as
        // `self`. Its start is page aligned (mmap) and `len` is a multiple
        // of 4096 (checked in `open`), so it is exactly `len / 8` properly
        // aligned u64 slots. All accesses through the slice are atomic, so
        // concurrent writers outside this process cause no data race in the
        // Rust sense; AtomicU64 has the size and alignment of u64.
        unsafe {
            std::slice::from_raw_parts(self.map.as_mut_ptr() as *const AtomicU64, self.len() / 8)
        }
    }

    /// The whole file as shared memory (byte offset = machine address).
    pub fn mem(&self) -> AtomicMem64<'_> {
        AtomicMem64::new(self.words())
    }

    /// Shared memory from machine address `at` (a multiple of 8) to the
    /// end of the file.
    pub fn window(&self, at: usize) -> AtomicMem64<'_> {
        AtomicMem64::new(&self.words()[at / 8..])
    }

    /// Read the control locator at [`LOCATOR_AT`] (docs/REPLICATION.md,
    /// "Finding the control area").
    pub fn locator(&self) -> Result<Locator, MachineError> {
        let len = self.len() as u64;
        if LOCATOR_AT + LOCATOR_SIZE > len {
            return Err(MachineError::NoLocatorPage {
                path: self.path.clone(),
                len,
            });
        }
        let words = self.words();
        let base = LOCATOR_AT as usize / 8;
        // The magic first (acquire: the hypervisor writes it last, after a
        // release fence), then the rest.
        let mut w = [0u64; LOCATOR_WORDS];
        w[0] = u64::from_le(words[base].load(Ordering::Acquire));
        for (i, x) in w.iter_mut().enumerate().skip(1) {
            *x = u64::from_le(words[base + i].load(Ordering::Relaxed));
        }
        Locator::decode(w, len).map_err(|err| self.locator_err(err))
    }

    fn locator_err(&self, err: LocatorError) -> MachineError {
        match err {
            LocatorError::NoMagic(_) => MachineError::NotFound {
                path: self.path.clone(),
                len: self.len() as u64,
            },
            err => MachineError::BadLocator {
                path: self.path.clone(),
                err,
            },
        }
    }

    /// Find and validate the control area: only where the locator says,
    /// never by scanning memory (the guest's RAM is part of the file, and
    /// the guest can write a header there). The area and the locator page
    /// must lie outside the guest RAM the header declares.
    pub fn find_control(&self) -> Result<Control, MachineError> {
        let loc = self.locator()?;
        let at = loc.control_at;
        let view = self.control_at(at)?;
        let g = view.header().guest_ram;
        if g.size == 0 {
            return Err(MachineError::NoGuest {
                path: self.path.clone(),
                at,
            });
        }
        // validate() checked alignment and that offset + size does not
        // overflow.
        if g.offset + g.size > self.len() as u64 {
            return Err(MachineError::GuestRamOutsideFile {
                path: self.path.clone(),
                at,
                offset: g.offset,
                size: g.size,
                len: self.len() as u64,
            });
        }
        loc.check(view.header().total_size, g)
            .map_err(|err| self.locator_err(err))?;
        Ok(Control { at, view })
    }

    /// Validate the control area whose header starts at `at` (copied out
    /// first) against the bytes from `at` to the end of the file.
    pub fn control_at(&self, at: u64) -> Result<ControlView, MachineError> {
        let at_us = at as usize;
        let mapped = self.len() - at_us;
        let mut hdr = vec![0u8; HEADER_SIZE.min(mapped)];
        self.mem().read_bytes(at_us, &mut hdr);
        validate_header(&hdr, mapped).map_err(|err| MachineError::Control {
            path: self.path.clone(),
            at,
            err,
        })
    }
}

/// A validated control area and where it is.
#[derive(Clone, Copy, Debug)]
pub struct Control {
    /// Machine address of the header.
    pub at: u64,
    pub view: ControlView,
}

impl Control {
    /// The guest's RAM in machine memory (checked to lie in the file).
    pub fn guest_ram(&self) -> Region {
        self.view.header().guest_ram
    }

    /// Guest size in pages.
    pub fn guest_pages(&self) -> u64 {
        self.guest_ram().size / PAGE as u64
    }

    /// Every region, one per line, for `doppel inspect`.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let h = self.view.header();
        let mut s = String::new();
        let _ = writeln!(s, "control area at machine address {:#x}", self.at);
        let _ = writeln!(
            s,
            "version {} total_size {} features {:?}",
            h.version,
            h.total_size,
            self.view.features()
        );
        for f in doppel_abi::control::REGIONS {
            let r = h.region(f);
            let _ = writeln!(
                s,
                "{:<10} offset {:#10x} size {:#10x} (machine {:#x})",
                field_name(f),
                r.offset,
                r.size,
                self.at + r.offset
            );
        }
        let g = h.guest_ram;
        let _ = write!(
            s,
            "guest_ram  offset {:#x} size {:#x} ({} pages)",
            g.offset,
            g.size,
            g.size / PAGE as u64
        );
        s
    }
}
