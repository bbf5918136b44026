//! A test guest's machine, vendor-neutral: its RAM (one contiguous block of
//! host memory), the nested page table mapping it (EPT or NPT format), the
//! guest image loaded from the ELF the build embeds, its boot information
//! and its own page tables.

use core::fmt;

use doppel_abi::guest::{
    BootInfo, BOOT_INFO_GPA, BOOT_MAGIC, BOOT_VERSION, IMAGE_END_GPA, IMAGE_GPA, PAGE_SIZE,
    PAGE_TABLES_GPA, STACK_GPA, STACK_PAGES, TRUTH_MAX_PFNS, WORK_GPA,
};
use doppel_core::addr::{GuestPhysAddr, HostPhysAddr};
use doppel_core::elf::{Elf, ElfError};
use doppel_core::frame::{Frame, FrameAllocator};
use doppel_core::paging::{self, MapAttrs, NestedEntry, NestedPageTable};
use zerocopy::IntoBytes;

use super::vcpu::GuestStart;
use crate::mem::frames;

/// The test guest's ELF, built by build.rs.
static GUEST_ELF: &[u8] = include_bytes!(env!("DOPPEL_GUEST_ELF"));

/// Page-table frames from the kernel's frame allocator. Host memory is
/// identity-mapped, so a frame's host-physical address is its address.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelFrames;

impl FrameAllocator for KernelFrames {
    fn alloc_zeroed(&self) -> Option<HostPhysAddr> {
        frames::alloc_zeroed().map(|f| HostPhysAddr::new(f.start_address().as_u64()))
    }

    fn free(&self, frame: HostPhysAddr) {
        frames::free(frame.as_u64(), PAGE_SIZE);
    }

    fn frame(&self, frame: HostPhysAddr) -> &Frame {
        // SAFETY: the trait's contract: `frame` came from `alloc_zeroed`
        // above and is not yet freed, so it is a 4 KiB-aligned, identity-
        // mapped frame owned by the table; `Frame` is 512 AtomicU64, valid
        // for any bit pattern, and shared access is through atomics only.
        unsafe { &*(frame.as_u64() as *const Frame) }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum GuestError {
    /// Guest RAM must be a multiple of 2 MiB, at least 8 MiB, at most what
    /// the truth bitmap describes.
    BadSize(u64),
    OutOfMemory,
    Elf(ElfError),
    /// An image segment lies outside [IMAGE_GPA, IMAGE_END_GPA).
    ImageOutOfRange,
    Paging(paging::Error),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadSize(b) => write!(f, "guest memory size {b:#x} is not usable"),
            Self::OutOfMemory => write!(f, "not enough host memory for the guest"),
            Self::Elf(e) => write!(f, "guest image: {e:?}"),
            Self::ImageOutOfRange => write!(f, "guest image outside its load window"),
            Self::Paging(e) => write!(f, "nested page table: {e}"),
        }
    }
}

impl From<paging::Error> for GuestError {
    fn from(e: paging::Error) -> Self {
        Self::Paging(e)
    }
}

/// Guest RAM: `bytes` of host memory starting at `hpa`, guest-physical 0.
pub struct GuestRam {
    hpa: u64,
    bytes: u64,
}

const TWO_MIB: u64 = 2 << 20;

impl GuestRam {
    pub fn new(bytes: u64) -> Result<Self, GuestError> {
        if !bytes.is_multiple_of(TWO_MIB)
            || bytes < 4 * TWO_MIB
            || bytes / PAGE_SIZE > TRUTH_MAX_PFNS
        {
            return Err(GuestError::BadSize(bytes));
        }
        let hpa = frames::alloc_contiguous(bytes, TWO_MIB).ok_or(GuestError::OutOfMemory)?;
        Ok(Self { hpa, bytes })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Machine-physical address of guest-physical 0.
    pub fn hpa(&self) -> u64 {
        self.hpa
    }

    pub fn pages(&self) -> u64 {
        self.bytes / PAGE_SIZE
    }

    /// Guest memory `[gpa, gpa + len)`, or `None` if any of it is outside
    /// guest RAM.
    pub fn slice(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let end = gpa.checked_add(len)?;
        if end > self.bytes {
            return None;
        }
        // SAFETY: the range lies inside this guest's RAM block, which the
        // frame allocator gave to this `GuestRam` and which is identity-
        // mapped. Two others can write it. The guest, only while it runs on
        // this CPU, which the hypervisor gives it only between its own
        // accesses (it reads guest memory only at exits, guest stopped).
        // And the dom0 tool, which finds the block's machine address in the
        // control area (`guest_ram`): a primary's tool never writes it (the
        // pages reach it through the staging area); a standby's backup tool
        // writes it only before `Activate`, and the standby builds nothing
        // on it and reads none of it until it has accepted `Activate`, after
        // which the tool writes no more. The tool can reach all of machine
        // memory, so it is trusted to keep that protocol as it is trusted
        // not to write the hypervisor's own memory.
        Some(unsafe { core::slice::from_raw_parts((self.hpa + gpa) as *const u8, len as usize) })
    }

    /// Mutable access to guest memory, for loading while the guest is not
    /// running.
    pub fn slice_mut(&mut self, gpa: u64, len: u64) -> Option<&mut [u8]> {
        let end = gpa.checked_add(len)?;
        if end > self.bytes {
            return None;
        }
        // SAFETY: as in `slice` (no other writer while we hold it); `&mut
        // self` makes this the only access on the hypervisor's side.
        Some(unsafe { core::slice::from_raw_parts_mut((self.hpa + gpa) as *mut u8, len as usize) })
    }

    /// Zero all of guest RAM.
    pub fn clear(&mut self) {
        if let Some(s) = self.slice_mut(0, self.bytes) {
            s.fill(0);
        }
    }

    /// A nested page table mapping all of guest RAM (2 MiB pages, RWX,
    /// write-back).
    pub fn nested_table<E: NestedEntry>(
        &self,
    ) -> Result<NestedPageTable<E, KernelFrames>, GuestError> {
        let mut t = NestedPageTable::new(KernelFrames)?;
        // A fresh table: nothing cached to flush yet.
        let _ = t.map(
            GuestPhysAddr::new(0),
            HostPhysAddr::new(self.hpa),
            self.bytes,
            MapAttrs::RAM,
        )?;
        Ok(t)
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        frames::free(self.hpa, self.bytes);
    }
}

/// What a workload run asks of the guest.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Bit i: run pattern i.
    pub patterns: u32,
    pub epochs: u32,
    pub seed: u64,
    /// Whether the guest uses VMMCALL (AMD) rather than VMCALL.
    pub vmmcall: bool,
    /// `doppel_abi::guest::PROGRAM_*`.
    pub program: u32,
    /// Keys of the key-value service (0 for the workload).
    pub keys: u32,
}

/// Load the test guest into `ram` (cleared first): image, boot
/// information and page tables. Returns where the vCPU starts.
pub fn load(ram: &mut GuestRam, w: &Workload) -> Result<GuestStart, GuestError> {
    ram.clear();
    let elf = Elf::parse(GUEST_ELF).map_err(GuestError::Elf)?;
    for seg in elf.segments() {
        let end = seg
            .paddr
            .checked_add(seg.memsz)
            .ok_or(GuestError::ImageOutOfRange)?;
        if seg.paddr < IMAGE_GPA || end > IMAGE_END_GPA {
            return Err(GuestError::ImageOutOfRange);
        }
        let data = elf.data(&seg);
        let dst = ram
            .slice_mut(seg.paddr, data.len() as u64)
            .ok_or(GuestError::ImageOutOfRange)?;
        dst.copy_from_slice(data);
        // The rest up to memsz stays zero (RAM was cleared).
    }
    let boot = BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        hypercall: if w.vmmcall {
            doppel_abi::guest::HYPERCALL_VMMCALL
        } else {
            doppel_abi::guest::HYPERCALL_VMCALL
        },
        mem_bytes: ram.bytes(),
        work_start: WORK_GPA,
        work_end: ram.bytes(),
        patterns: w.patterns,
        epochs: w.epochs,
        seed: w.seed,
        program: w.program,
        keys: w.keys,
    };
    ram.slice_mut(BOOT_INFO_GPA, core::mem::size_of::<BootInfo>() as u64)
        .ok_or(GuestError::BadSize(0))?
        .copy_from_slice(boot.as_bytes());
    write_guest_page_tables(ram)?;
    Ok(GuestStart {
        rip: elf.entry(),
        rsp: STACK_GPA + STACK_PAGES * PAGE_SIZE,
        rdi: BOOT_INFO_GPA,
        cr3: PAGE_TABLES_GPA,
    })
}

/// Identity-map the first 4 GiB with 2 MiB pages: PML4 at PAGE_TABLES_GPA,
/// one PDPT after it, four page directories after that. Accessed and dirty
/// are preset everywhere so the CPU never writes these pages itself (a
/// hardware A/D update would be a write the guest's truth cannot know).
fn write_guest_page_tables(ram: &mut GuestRam) -> Result<(), GuestError> {
    use x86_64::structures::paging::PageTableFlags as F;
    let table = (F::PRESENT | F::WRITABLE | F::ACCESSED).bits();
    let leaf = (F::PRESENT | F::WRITABLE | F::ACCESSED | F::DIRTY | F::HUGE_PAGE).bits();
    let pml4 = PAGE_TABLES_GPA;
    let pdpt = pml4 + PAGE_SIZE;
    let pd0 = pdpt + PAGE_SIZE;
    let mut put = |gpa: u64, v: u64| -> Result<(), GuestError> {
        ram.slice_mut(gpa, 8)
            .ok_or(GuestError::BadSize(0))?
            .copy_from_slice(&v.to_le_bytes());
        Ok(())
    };
    put(pml4, pdpt | table)?;
    for i in 0..4u64 {
        let pd = pd0 + i * PAGE_SIZE;
        put(pdpt + i * 8, pd | table)?;
        for j in 0..512u64 {
            let addr = (i * 512 + j) * TWO_MIB;
            put(pd + j * 8, addr | leaf)?;
        }
    }
    Ok(())
}

/// The replication engine stages dirty pages straight from guest RAM.
impl doppel_core::engine::GuestPages for GuestRam {
    fn pages(&self) -> u64 {
        GuestRam::pages(self)
    }

    fn copy_page<S: doppel_abi::SharedMem>(&self, pfn: u64, dst: &S, at: usize) -> bool {
        let Some(page) = pfn
            .checked_mul(PAGE_SIZE)
            .and_then(|gpa| self.slice(gpa, PAGE_SIZE))
        else {
            return false;
        };
        dst.write_bytes(at, page);
        true
    }
}
