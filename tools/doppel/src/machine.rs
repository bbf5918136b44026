//! Machine memory as the dom0 tool sees it: a host file that backs the
//! emulator's RAM (`-object memory-backend-file,...,share=on`), mapped
//! shared, and the hypervisor's control area found in it by its magic.
//!
//! Everything in the file is written by someone else (the hypervisor, the
//! guest, the emulator) while we read it, so every access goes through
//! atomics ([`AtomicMem64`]) and everything is copied out before it is
//! validated.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use doppel_abi::control::{validate_header, AbiError, ControlView, Field, Region, HEADER_SIZE};
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
        "{path}: no control area: the magic \"DOPPELCA\" is at no 4 KiB boundary \
         of the {len}-byte file (is the hypervisor running in mode=primary?)"
    )]
    NotFound { path: PathBuf, len: u64 },
    #[error("{path}: control area at machine address {at:#x}: {}", describe(*.err))]
    Control {
        path: PathBuf,
        at: u64,
        err: AbiError,
    },
    #[error(
        "{path}: control areas at {first:#x} and {second:#x} both validate; \
         refusing to guess which one is the hypervisor's"
    )]
    Ambiguous {
        path: PathBuf,
        first: u64,
        second: u64,
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

    /// Machine addresses of the 4 KiB boundaries holding the magic.
    pub fn magic_candidates(&self) -> Vec<u64> {
        let words = self.words();
        (0..self.len())
            .step_by(PAGE)
            .filter(|at| {
                words[at / 8].load(std::sync::atomic::Ordering::Relaxed)
                    == doppel_abi::control::MAGIC.to_le()
            })
            .map(|at| at as u64)
            .collect()
    }

    /// Find and validate the control area. Exactly one candidate must
    /// validate; without any, the first candidate's error is reported.
    pub fn find_control(&self) -> Result<Control, MachineError> {
        let mut found: Option<(u64, ControlView)> = None;
        let mut first_err = None;
        for at in self.magic_candidates() {
            match self.control_at(at) {
                Ok(v) => {
                    if let Some((first, _)) = found {
                        return Err(MachineError::Ambiguous {
                            path: self.path.clone(),
                            first,
                            second: at,
                        });
                    }
                    found = Some((at, v));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some((at, view)) = found else {
            return Err(first_err.unwrap_or(MachineError::NotFound {
                path: self.path.clone(),
                len: self.len() as u64,
            }));
        };
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
