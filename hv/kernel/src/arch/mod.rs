//! CPU set-up: descriptor tables, exception handling, and the one module of
//! privileged instruction wrappers.

pub mod apic;
pub mod gdt;
pub mod idt;
pub mod instr;

use x86_64::registers::model_specific::EferFlags;

/// IA32_EFER (its bits: [`EferFlags`]).
pub const IA32_EFER: u32 = 0xC000_0080;

/// Whether the CPU supports the no-execute page bit
/// (CPUID 8000_0001h EDX[20]).
pub fn has_nx() -> bool {
    instr::cpuid(0x8000_0000, 0).eax >= 0x8000_0001
        && instr::cpuid(0x8000_0001, 0).edx & (1 << 20) != 0
}

/// Load the kernel's GDT (with TSS and the double-fault stack) and IDT, and
/// turn on no-execute pages where the CPU has them. Runs first in `kmain`
/// so every later fault is reported, by `on_fault`.
pub fn init(on_fault: fn(&idt::Fault<'_>) -> !) {
    gdt::init();
    idt::init(on_fault);
    if has_nx() {
        let efer = instr::rdmsr(IA32_EFER);
        // SAFETY: setting EFER.NXE only makes the NX page bit meaningful;
        // the CPU has it (checked above) and no mapping uses it yet.
        unsafe { instr::wrmsr(IA32_EFER, efer | EferFlags::NO_EXECUTE_ENABLE.bits()) };
    }
}
