//! AMD SVM: capability detection from CPUID and enabling with EFER.SVME.
//! (AMD APM vol. 2, chapter 15 "Secure Virtual Machine".)

use crate::arch::instr::{cpuid, rdmsr, wrmsr};
use crate::arch::{EFER_SVME, IA32_EFER};
use crate::mem::frames;

use super::Error;

const VM_CR: u32 = 0xC001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
const VM_HSAVE_PA: u32 = 0xC001_0117;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmCaps {
    /// Nested paging (CPUID 8000_000Ah EDX[0]).
    pub npt: bool,
    /// Next-RIP save on #VMEXIT (CPUID 8000_000Ah EDX[3]).
    pub nrips: bool,
    /// Number of ASIDs (CPUID 8000_000Ah EBX).
    pub asids: u32,
}

/// SVM capabilities, or `None` if CPUID 8000_0001h ECX[2] (SVM) is clear.
pub fn detect() -> Option<SvmCaps> {
    let max_ext = cpuid(0x8000_0000, 0).eax;
    if max_ext < 0x8000_0001 || cpuid(0x8000_0001, 0).ecx & (1 << 2) == 0 {
        return None;
    }
    let r = if max_ext >= 0x8000_000A {
        cpuid(0x8000_000A, 0)
    } else {
        Default::default()
    };
    log::debug!("svm: CPUID 8000_000Ah ebx={:#x} edx={:#x}", r.ebx, r.edx);
    Some(SvmCaps {
        npt: r.edx & (1 << 0) != 0,
        nrips: r.edx & (1 << 3) != 0,
        asids: r.ebx,
    })
}

/// SVM enabled; owns the host save area.
#[derive(Debug)]
pub struct SvmOn {
    /// Physical address of the host save area (VM_HSAVE_PA).
    pub hsave: u64,
}

pub fn enable(_caps: &SvmCaps) -> Result<SvmOn, Error> {
    if rdmsr(VM_CR) & VM_CR_SVMDIS != 0 {
        return Err(Error::DisabledByFirmware("VM_CR.SVMDIS=1"));
    }
    let hsave = frames::alloc_zeroed()
        .ok_or(Error::OutOfFrames)?
        .start_address()
        .as_u64();
    let efer = rdmsr(IA32_EFER);
    // SAFETY: EFER.SVME only enables the SVM instructions; the CPU has SVM
    // and firmware has not disabled it (checked above).
    unsafe { wrmsr(IA32_EFER, efer | EFER_SVME) };
    // SAFETY: `hsave` is a zeroed frame given to the CPU for host state on
    // VMRUN from now on.
    unsafe { wrmsr(VM_HSAVE_PA, hsave) };
    log::debug!("svm: on, host save area at {hsave:#x}");
    Ok(SvmOn { hsave })
}

impl SvmOn {
    /// Clear EFER.SVME.
    pub fn off(self) {
        // SAFETY: no guest runs; clearing SVME only disables SVM instructions.
        unsafe { wrmsr(IA32_EFER, rdmsr(IA32_EFER) & !EFER_SVME) };
        // SAFETY: a zero VM_HSAVE_PA just unsets the host save area, which
        // the CPU uses only on VMRUN (impossible with SVME clear).
        unsafe { wrmsr(VM_HSAVE_PA, 0) };
        frames::free(self.hsave, crate::mem::PAGE_SIZE);
    }
}

/// The log-dirty self-test under SVM (NPT write-protect mode).
pub fn selftest(_on: &mut SvmOn, _plan: &super::selftest::Plan) -> bool {
    log::error!("self-test: the SVM backend is not built yet");
    false
}
