//! The contract between the hypervisor and its test guests: where things sit
//! in guest-physical memory, the boot information page, and the hypercalls.
//!
//! The guest starts in 64-bit mode at its ELF entry with paging on (the
//! hypervisor builds identity page tables at [`PAGE_TABLES_GPA`]), `rsp` at
//! the top of its stack and `rdi` = [`BOOT_INFO_GPA`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const PAGE_SIZE: u64 = 4096;
/// Boot information page (written by the hypervisor, read by the guest).
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest page tables: PML4, PDPT and four page directories (2 MiB pages),
/// identity-mapping the first 4 GiB.
pub const PAGE_TABLES_GPA: u64 = 0x2000;
pub const PAGE_TABLES_PAGES: u64 = 6;
/// The guest's ground-truth bitmap: bit p set = the guest wrote page p in
/// the current epoch (byte p >> 3, bit p & 7, as Xen's dirty bitmap).
pub const TRUTH_GPA: u64 = 0x8000;
pub const TRUTH_PAGES: u64 = 8;
/// Pages the truth bitmap can describe (1 GiB of guest memory).
pub const TRUTH_MAX_PFNS: u64 = TRUTH_PAGES * PAGE_SIZE * 8;
/// The guest stack; the guest writes every stack page at each epoch start
/// and records it, so stack writes are always in the truth.
pub const STACK_GPA: u64 = 0x10000;
pub const STACK_PAGES: u64 = 2;

/// Seed of the self-test's write patterns (`doppel_core::workload`): the
/// hypervisor hands it to the test guest, and `cargo xtask selftest`
/// recomputes from it which pages each epoch writes.
pub const SELFTEST_SEED: u64 = 0x5eed_d0bb_e100;
/// Where the guest image is linked and loaded.
pub const IMAGE_GPA: u64 = 0x10_0000;
/// The image must end below this address.
pub const IMAGE_END_GPA: u64 = 0x40_0000;
/// First page of the workload region (the rest of guest memory).
pub const WORK_GPA: u64 = 0x40_0000;

/// Magic of [`BootInfo`] ("DPLGUEST").
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"DPLGUEST");
pub const BOOT_VERSION: u32 = 1;

/// Which instruction the guest uses for hypercalls.
pub const HYPERCALL_VMCALL: u32 = 0;
pub const HYPERCALL_VMMCALL: u32 = 1;

/// Hypercall numbers (in `rax`; arguments in `rdi`, `rsi`, `rdx`; result in
/// `rax`).
pub mod hypercall {
    /// End of an epoch: `rdi` = running epoch number, `rsi` = pattern id,
    /// `rdx` = epoch index within the pattern. The truth bitmap is complete.
    pub const EPOCH_END: u64 = 1;
    /// The guest finished: `rdi` = 0 on success, else an error code.
    pub const DONE: u64 = 2;
    /// Take the next input record (service guests): `rdi` = buffer gpa,
    /// `rsi` = buffer length. Returns its length, 0 when there is none, or
    /// `u64::MAX` when the buffer is not inside guest RAM or too small (the
    /// record stays queued). The hypervisor logs the written pages dirty.
    pub const RECV: u64 = 3;
    /// Emit an output record (service guests): `rdi` = gpa, `rsi` = length.
    /// Returns 0, [`super::SEND_AGAIN`] when the hypervisor's hold buffer is
    /// full (retry; it drains as epochs commit), or `u64::MAX` for a buffer
    /// outside guest RAM or longer than [`super::MAX_RECORD`].
    pub const SEND: u64 = 4;
    /// The hostile guest (`PROGRAM_HOSTILE`) got past its probe's
    /// instruction: `rdi` = probe number, `rsi` = the value it read (RDMSR
    /// probes; 0 otherwise). The hypervisor judges it and stops the guest.
    pub const ESCAPED: u64 = 5;
    /// The hostile guest took an exception at its probe's instruction (one
    /// the hypervisor injected for a refusal, or the CPU's own): its IDT
    /// handler reports `rdi` = vector (0..=31), `rsi` = error code (0 when
    /// the vector has none), `rdx` = the RIP the exception was taken at.
    /// The hypervisor records it and stops the guest.
    pub const FAULTED: u64 = 6;
}

/// `SEND` result: no room to hold the record now; retry later.
pub const SEND_AGAIN: u64 = 1;
/// Largest record `RECV`/`SEND` move.
pub const MAX_RECORD: u64 = 256;

/// [`BootInfo::program`]: run the dirty-tracking workload patterns.
pub const PROGRAM_WORKLOAD: u32 = 0;
/// [`BootInfo::program`]: serve the key-value service of
/// [`crate::service`] forever over `RECV`/`SEND`.
pub const PROGRAM_KV: u32 = 1;
/// [`BootInfo::program`]: run one escape probe of
/// `doppel_core::hostile::PROBES` (its number in `rsi` at entry, its
/// argument in `rdx`) and report with `ESCAPED` if it got through.
pub const PROGRAM_HOSTILE: u32 = 2;

/// Console port: bytes written here are forwarded to the hypervisor's log,
/// one line at a time, as [`GuestLine`] prints it.
pub const CONSOLE_PORT: u16 = 0xe9;

/// What the hypervisor puts before every line of guest console output,
/// after its own `doppel-hv: `: the guest cannot print a line that reads as
/// one of the hypervisor's (`doppel-hv: exit=pass`, `logdirty: ...`).
pub const GUEST_LINE_MARK: &str = "guest: ";

/// One line of guest console output (without its newline) as the
/// hypervisor prints it: [`GUEST_LINE_MARK`], then the bytes, each one
/// that is not printable ASCII (a control character such as CR, or not
/// ASCII at all) shown as `?`. The test guests mark their lines `guest: `
/// themselves; that mark is dropped, so the line carries the hypervisor's
/// mark exactly once.
pub struct GuestLine<'a>(pub &'a [u8]);

impl core::fmt::Display for GuestLine<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mark = GUEST_LINE_MARK.as_bytes();
        let body = self.0.strip_prefix(mark).unwrap_or(self.0);
        f.write_str(GUEST_LINE_MARK)?;
        for &b in body {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            core::fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

/// Workload patterns, as ids in [`BootInfo::patterns`] (bit i = pattern i).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PatternId {
    /// Stride through the region.
    Seq = 0,
    /// Seeded random pages.
    Rand = 1,
    /// A small hot set rewritten.
    Hot = 2,
    /// One byte in far-apart pages.
    Sparse = 3,
    /// Hot, random and sparse together.
    Mixed = 4,
}

impl PatternId {
    pub const ALL: [PatternId; 5] = [
        PatternId::Seq,
        PatternId::Rand,
        PatternId::Hot,
        PatternId::Sparse,
        PatternId::Mixed,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            PatternId::Seq => "seq",
            PatternId::Rand => "rand",
            PatternId::Hot => "hot",
            PatternId::Sparse => "sparse",
            PatternId::Mixed => "mixed",
        }
    }
}

/// The boot information page.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    /// [`HYPERCALL_VMCALL`] or [`HYPERCALL_VMMCALL`].
    pub hypercall: u32,
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// Workload region [work_start, work_end), page aligned.
    pub work_start: u64,
    pub work_end: u64,
    /// Bit i set: run pattern i, in ascending order.
    pub patterns: u32,
    /// Epochs per pattern.
    pub epochs: u32,
    /// Seed of the random patterns.
    pub seed: u64,
    /// [`PROGRAM_WORKLOAD`] or [`PROGRAM_KV`].
    pub program: u32,
    /// Keys of the key-value service (each value on its own page of the
    /// workload region); 0 for the workload.
    pub keys: u32,
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == 64);
const _: () = assert!(core::mem::offset_of!(BootInfo, mem_bytes) == 16);
const _: () = assert!(core::mem::offset_of!(BootInfo, patterns) == 40);
const _: () = assert!(core::mem::offset_of!(BootInfo, seed) == 48);
const _: () = assert!(core::mem::offset_of!(BootInfo, program) == 56);
const _: () = assert!(core::mem::offset_of!(BootInfo, keys) == 60);
const _: () = assert!(TRUTH_GPA + TRUTH_PAGES * PAGE_SIZE <= STACK_GPA);
const _: () = assert!(PAGE_TABLES_GPA + PAGE_TABLES_PAGES * PAGE_SIZE <= TRUTH_GPA);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn shown(b: &[u8]) -> std::string::String {
        std::format!("{}", GuestLine(b))
    }

    #[test]
    fn guest_lines_carry_the_mark_once_and_no_control_bytes() {
        assert_eq!(shown(b"exit=pass"), "guest: exit=pass");
        assert_eq!(
            shown(b"guest: workload region 8 pages"),
            "guest: workload region 8 pages"
        );
        // The guest's own mark is dropped once only: a second stays text.
        assert_eq!(shown(b"guest: guest: x"), "guest: guest: x");
        // CR (which a terminal would use to overwrite the mark), NUL, ESC
        // and non-ASCII bytes are shown as `?`.
        assert_eq!(
            shown(b"x\rdoppel-hv: exit=pass\x00\x1b\xff"),
            "guest: x?doppel-hv: exit=pass???"
        );
        assert_eq!(shown(b""), "guest: ");
    }
}
