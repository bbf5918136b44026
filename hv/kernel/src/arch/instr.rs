//! Every privileged instruction the image executes, wrapped once as a small
//! function. Nothing else in the kernel uses `asm!` for a privileged
//! instruction (the boot and trap entry assembly aside), so this file is the
//! one place to audit what the hypervisor does to the CPU.
//!
//! Reads (CPUID, RDMSR, control registers) are safe functions: at worst an
//! unknown MSR raises #GP, which the exception handlers report. Writes that
//! can break the kernel's own memory safety (MSRs, control registers,
//! descriptor tables, VMXON) are `unsafe fn` with their contract written
//! down. Port I/O is safe: the kernel owns the machine and only touches the
//! debug console, COM1, the emulators' power-off ports and the 8259 PICs'
//! mask registers.

use core::arch::asm;

use x86_64::instructions::port::Port;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::gdt::{GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::paging::PhysFrame;

/// The four registers CPUID returns (hv/core's, which the CPUID policy
/// takes the host's answers in).
pub use doppel_core::cpuid_policy::Cpuid;

/// CPUID with `leaf` in EAX and `subleaf` in ECX.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID only writes the four registers named here; RBX is
    // reserved by LLVM, so it is saved in a scratch register and restored.
    unsafe {
        asm!(
            "mov {saved:r}, rbx",
            "cpuid",
            "xchg {saved:r}, rbx",
            saved = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        );
    }
    Cpuid { eax, ebx, ecx, edx }
}

/// RDMSR. An MSR the CPU does not have raises #GP (reported, run fails).
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR reads a model-specific register into EDX:EAX and has no
    // memory effects; the kernel runs at CPL 0.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
             options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// WRMSR.
///
/// # Safety
/// The value must keep the kernel's assumptions (long mode, paging, the
/// identity map, its own use of EFER bits) intact.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller keeps the CPU state the kernel relies on; WRMSR
    // itself touches no memory.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

pub fn read_cr0() -> u64 {
    x86_64::registers::control::Cr0::read_raw()
}

/// # Safety
/// Must keep protected mode, paging and write protection on.
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { x86_64::registers::control::Cr0::write_raw(value) }
}

pub fn read_cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// Set CR2, the last page-fault address: only a guest reads it (VMX does
/// not switch it, so the VMX backend puts the guest's value back here).
pub fn write_cr2(value: u64) {
    // SAFETY: the kernel never reads CR2 outside its fault report; writing
    // it changes nothing else.
    unsafe { asm!("mov cr2, {v}", v = in(reg) value, options(nostack, preserves_flags)) };
}

pub fn read_cr3() -> u64 {
    Cr3::read_raw().0.start_address().as_u64()
}

/// Switch to the page tables rooted at `pml4`.
///
/// # Safety
/// The tables must map the running code, its stack and every static the
/// kernel uses, at the addresses it uses them, and stay alive forever.
pub unsafe fn write_cr3(pml4: PhysFrame) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { Cr3::write(pml4, Cr3Flags::empty()) }
}

pub fn read_cr4() -> u64 {
    x86_64::registers::control::Cr4::read_raw()
}

/// # Safety
/// Must keep PAE on and only set features the CPU has.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { x86_64::registers::control::Cr4::write_raw(value) }
}

/// The FXSAVE image (512 bytes, 16-byte aligned).
#[repr(C, align(16))]
pub struct FxArea(pub [u8; 512]);

/// Let FXSAVE/FXRSTOR carry the XMM registers and MXCSR (CR4.OSFXSR,
/// OSXMMEXCPT) and make x87/SSE instructions run rather than fault (CR0.EM
/// and TS clear). The hypervisor itself never uses the FPU (the target is
/// soft-float): the guest's FPU state stays in the registers across exits,
/// and only a save or a restore of the whole guest moves it.
pub fn enable_fxsr() {
    use x86_64::registers::control::{Cr0Flags, Cr4Flags};
    let cr4 = read_cr4() | (Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE).bits();
    // SAFETY: OSFXSR/OSXMMEXCPT only change how FXSAVE/FXRSTOR and SSE
    // faults behave; every x86-64 CPU has them. PAE stays on.
    unsafe { write_cr4(cr4) };
    let cr0 = read_cr0() & !(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED).bits();
    // SAFETY: clearing EM and TS only lets FPU instructions run.
    unsafe { write_cr0(cr0) };
}

/// FXSAVE the FPU/SSE registers (the guest's: see [`enable_fxsr`]).
pub fn fxsave(area: &mut FxArea) {
    // SAFETY: FXSAVE writes 512 bytes at a 16-byte aligned address, which
    // `FxArea` is; it reads only registers.
    unsafe {
        asm!("fxsave64 [{a}]", a = in(reg) area.0.as_mut_ptr(), options(nostack, preserves_flags))
    };
}

/// FXRSTOR the FPU/SSE registers from `area`. Reserved MXCSR bits set
/// would fault (#GP): the caller passes only images FXSAVE made or that
/// [`mxcsr_ok`] accepted.
pub fn fxrstor(area: &FxArea) {
    // SAFETY: FXRSTOR reads 512 aligned bytes and loads only FPU/SSE
    // registers, which the hypervisor does not use; the caller checked
    // MXCSR against MXCSR_MASK.
    unsafe {
        asm!("fxrstor64 [{a}]", a = in(reg) area.0.as_ptr(), options(nostack, preserves_flags, readonly))
    };
}

/// Whether an FXSAVE image's MXCSR (bytes 24-27) has no bit outside the
/// CPU's MXCSR_MASK (bytes 28-31 of an image this CPU saved).
pub fn mxcsr_ok(image: &[u8; 512]) -> bool {
    let mut own = FxArea([0; 512]);
    fxsave(&mut own);
    let word =
        |b: &[u8; 512], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mask = match word(&own.0, 28) {
        0 => 0xffbf,
        m => m,
    };
    word(image, 24) & !mask == 0
}

/// Load `gdt`, reload CS/SS/DS/ES with its kernel selectors and load the
/// task register with its TSS.
///
/// # Safety
/// `code`/`data` must be 64-bit kernel code/data descriptors and `tss` an
/// available TSS descriptor of `gdt`.
pub unsafe fn load_gdt(
    gdt: &'static GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
) {
    gdt.load();
    // SAFETY: the selectors name descriptors of the table just loaded
    // (caller's contract), so the segment loads and LTR are valid.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        tables::load_tss(tss);
    }
}

/// LIDT.
pub fn load_idt(idt: &'static InterruptDescriptorTable) {
    idt.load();
}

/// Write one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the kernel owns every device; callers only address the debug
    // console (0xE9), COM1, the emulators' exit/power-off ports, the 8259
    // mask registers (0x21, 0xA1) and the CMOS clock's index (0x70), none
    // of which can touch memory.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// Read one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`; reads of these ports have no memory effects.
    unsafe { Port::<u8>::new(port).read() }
}

/// INVLPG: drop the TLB entries for the page holding `addr`. Only
/// invalidates a cache.
pub fn invlpg(addr: u64) {
    // SAFETY: INVLPG only invalidates translations; it reads no memory.
    unsafe { asm!("invlpg [{a}]", a = in(reg) addr, options(nostack, preserves_flags)) };
}

/// Let a pending maskable interrupt in: STI, one instruction in STI's
/// interrupt shadow, CLI. The kernel otherwise runs with RFLAGS.IF clear;
/// this is the one place it takes interrupts outside a guest (see
/// `arch::apic`). Any interrupt taken here goes through the IDT: vectors
/// without a handler there are reported as exceptions and fail the run.
pub fn interrupt_window() {
    // SAFETY: the handlers the IDT holds for interrupt vectors (timer,
    // spurious) preserve every register and return with IRETQ, so the
    // window is invisible to the code around it apart from their effects on
    // atomics and APIC registers.
    unsafe { asm!("sti", "nop", "cli", options(nostack)) };
}

/// Read the time-stamp counter (under QEMU `-icount` it counts executed
/// instructions, so differences are repeatable).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter into EDX:EAX.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Stop this CPU for good: interrupts off, HLT in a loop (an NMI or SMI
/// that wakes it halts it again).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI and HLT only change the interrupt flag and wait.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Why VMXON (or another VMX instruction) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// CF=1: no current VMCS or a bad operand (VMfailInvalid).
    Invalid,
    /// ZF=1: the instruction error field holds the reason (VMfailValid).
    Valid,
}

/// VMXON with the 4 KiB-aligned physical address of the VMXON region.
///
/// # Safety
/// CR4.VMXE is set, CR0/CR4 respect the VMX fixed bits, and `region_pa` is
/// a zeroed frame owned by VMX from now on with the revision id at offset 0.
pub unsafe fn vmxon(region_pa: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: caller's contract; VMXON reads the 64-bit operand in memory
    // (the local `region_pa`) and reports through CF/ZF.
    unsafe {
        asm!(
            "vmxon qword ptr [{pa}]",
            "setc {cf}",
            "setz {zf}",
            pa = in(reg) &region_pa,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    vm_result(cf, zf)
}

/// VMXOFF: leave VMX operation.
///
/// # Safety
/// The CPU is in VMX root operation and nothing still needs its VMCSs.
pub unsafe fn vmxoff() -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: caller's contract; VMXOFF has no memory operands.
    unsafe {
        asm!("vmxoff", "setc {cf}", "setz {zf}", cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    vm_result(cf, zf)
}

fn vm_result(cf: u8, zf: u8) -> Result<(), VmFail> {
    match (cf, zf) {
        (0, 0) => Ok(()),
        (0, _) => Err(VmFail::Valid),
        _ => Err(VmFail::Invalid),
    }
}

/// The segment registers and descriptor-table registers of the running
/// kernel, as the VMCS host-state area needs them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostSegments {
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
    pub tr: u16,
    pub gdtr_base: u64,
    pub idtr_base: u64,
}

/// Read CS, SS, DS, ES, FS, GS, TR and the GDTR/IDTR bases (SGDT, SIDT,
/// STR and segment-register moves: reads only).
pub fn host_segments() -> HostSegments {
    let (cs, ss, ds, es, fs, gs, tr): (u16, u16, u16, u16, u16, u16, u16);
    // SAFETY: moves from segment registers and STR only write the named
    // general-purpose registers.
    unsafe {
        asm!(
            "mov {cs:x}, cs", "mov {ss:x}, ss", "mov {ds:x}, ds", "mov {es:x}, es",
            "mov {fs:x}, fs", "mov {gs:x}, gs", "str {tr:x}",
            cs = out(reg) cs, ss = out(reg) ss, ds = out(reg) ds, es = out(reg) es,
            fs = out(reg) fs, gs = out(reg) gs, tr = out(reg) tr,
            options(nomem, nostack, preserves_flags),
        );
    }
    HostSegments {
        cs,
        ss,
        ds,
        es,
        fs,
        gs,
        tr,
        gdtr_base: tables::sgdt().base.as_u64(),
        idtr_base: tables::sidt().base.as_u64(),
    }
}

/// VMCLEAR: flush a VMCS to memory and make it inactive and not current.
///
/// # Safety
/// CPU in VMX root operation; `vmcs_pa` is a 4 KiB frame holding a VMCS
/// region (revision id at offset 0) that only VMX uses.
pub unsafe fn vmclear(vmcs_pa: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: caller's contract; the operand is the local `vmcs_pa`.
    unsafe {
        asm!("vmclear qword ptr [{pa}]", "setc {cf}", "setz {zf}",
             pa = in(reg) &vmcs_pa, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    vm_result(cf, zf)
}

/// VMPTRLD: make the VMCS at `vmcs_pa` current.
///
/// # Safety
/// As for [`vmclear`]; from now on VMREAD/VMWRITE/VMLAUNCH act on it.
pub unsafe fn vmptrld(vmcs_pa: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: caller's contract; the operand is the local `vmcs_pa`.
    unsafe {
        asm!("vmptrld qword ptr [{pa}]", "setc {cf}", "setz {zf}",
             pa = in(reg) &vmcs_pa, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    vm_result(cf, zf)
}

/// VMREAD of the field with this encoding in the current VMCS. Fails
/// (VMfailInvalid) with no current VMCS, (VMfailValid) for a field the CPU
/// does not have. Outside VMX operation it raises #UD, which is reported.
/// The typed accessors in `virt::vmx::vmcs` are the way to call it.
pub fn vmread(encoding: u32) -> Result<u64, VmFail> {
    let value: u64;
    let (cf, zf): (u8, u8);
    // SAFETY: VMREAD with a register destination only writes `value` and
    // the flags; it has no memory operand here.
    unsafe {
        asm!("vmread {v}, {e}", "setc {cf}", "setz {zf}",
             v = out(reg) value, e = in(reg) u64::from(encoding),
             cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nomem, nostack));
    }
    vm_result(cf, zf).map(|()| value)
}

/// VMWRITE of a field of the current VMCS. VMWRITE by itself changes
/// nothing the kernel runs on: a VMCS is only acted on by VM entry, and
/// [`vmx_enter`] carries the contract that the host-state fields are right.
/// The typed accessors in `virt::vmx::vmcs` (which have no write for
/// read-only fields) are the way to call it.
pub fn vmwrite(encoding: u32, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMWRITE from registers touches only the current VMCS (CPU-
    // owned memory that no Rust reference covers) and the flags.
    unsafe {
        asm!("vmwrite {e}, {v}", "setc {cf}", "setz {zf}",
             e = in(reg) u64::from(encoding), v = in(reg) value,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    vm_result(cf, zf)
}

/// INVEPT type 1 (single-context): drop cached translations derived from
/// the EPT rooted in `eptp`. Only invalidates caches.
pub fn invept_single(eptp: u64) -> Result<(), VmFail> {
    invept(1, eptp)
}

/// INVEPT type 2 (all-context).
pub fn invept_all() -> Result<(), VmFail> {
    invept(2, 0)
}

fn invept(kind: u64, eptp: u64) -> Result<(), VmFail> {
    let desc: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: INVEPT reads the 16-byte descriptor (a local) and only
    // invalidates TLB and paging-structure caches.
    unsafe {
        asm!("invept {k}, [{d}]", "setc {cf}", "setz {zf}",
             k = in(reg) kind, d = in(reg) &desc,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack, readonly));
    }
    vm_result(cf, zf)
}

/// INVVPID type 1 (single-context): drop linear and combined translations
/// tagged with `vpid`. Only invalidates caches.
pub fn invvpid_single(vpid: u16) -> Result<(), VmFail> {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    let (cf, zf): (u8, u8);
    // SAFETY: INVVPID reads the 16-byte descriptor (a local) and only
    // invalidates TLB and paging-structure caches.
    unsafe {
        asm!("invvpid {k}, [{d}]", "setc {cf}", "setz {zf}",
             k = in(reg) 1u64, d = in(reg) &desc,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack, readonly));
    }
    vm_result(cf, zf)
}

/// How [`vmx_enter`] came back.
pub const VMX_ENTER_EXITED: u64 = 0;
/// VMLAUNCH/VMRESUME failed with CF=1 (VMfailInvalid).
pub const VMX_ENTER_FAIL_INVALID: u64 = 1;
/// VMLAUNCH/VMRESUME failed with ZF=1 (VMfailValid).
pub const VMX_ENTER_FAIL_VALID: u64 = 2;

/// Offsets of the `GuestRegs` fields, as the entry stubs below address
/// them: taken from the struct itself, so the assembly follows its layout
/// (`doppel_core::regs` asserts that layout too).
mod gr {
    use core::mem::offset_of;
    use doppel_core::regs::GuestRegs;
    pub const RAX: usize = offset_of!(GuestRegs, rax);
    pub const RBX: usize = offset_of!(GuestRegs, rbx);
    pub const RCX: usize = offset_of!(GuestRegs, rcx);
    pub const RDX: usize = offset_of!(GuestRegs, rdx);
    pub const RSI: usize = offset_of!(GuestRegs, rsi);
    pub const RDI: usize = offset_of!(GuestRegs, rdi);
    pub const RBP: usize = offset_of!(GuestRegs, rbp);
    pub const R8: usize = offset_of!(GuestRegs, r8);
    pub const R9: usize = offset_of!(GuestRegs, r9);
    pub const R10: usize = offset_of!(GuestRegs, r10);
    pub const R11: usize = offset_of!(GuestRegs, r11);
    pub const R12: usize = offset_of!(GuestRegs, r12);
    pub const R13: usize = offset_of!(GuestRegs, r13);
    pub const R14: usize = offset_of!(GuestRegs, r14);
    pub const R15: usize = offset_of!(GuestRegs, r15);
}

/// The exit half both world switches share: store the guest's RBX..R15
/// into the `GuestRegs` that RAX points at (after a VMX exit and after an
/// SVM #VMEXIT alike; RAX itself is saved by each stub its own way). The
/// stub passes the `g_*` offsets from [`gr`].
macro_rules! store_guest_gprs_at_rax {
    () => {
        concat!(
            "mov [rax + {g_rbx}], rbx\n",
            "mov [rax + {g_rcx}], rcx\n",
            "mov [rax + {g_rdx}], rdx\n",
            "mov [rax + {g_rsi}], rsi\n",
            "mov [rax + {g_rdi}], rdi\n",
            "mov [rax + {g_rbp}], rbp\n",
            "mov [rax + {g_r8}], r8\n",
            "mov [rax + {g_r9}], r9\n",
            "mov [rax + {g_r10}], r10\n",
            "mov [rax + {g_r11}], r11\n",
            "mov [rax + {g_r12}], r12\n",
            "mov [rax + {g_r13}], r13\n",
            "mov [rax + {g_r14}], r14\n",
            "mov [rax + {g_r15}], r15",
        )
    };
}

/// Enter the guest of the current VMCS and come back at its next VM exit.
///
/// `regs` points at the guest's general-purpose registers in the layout of
/// `doppel_core::regs::GuestRegs` (rax, rbx, rcx, rdx, rsi, rdi, rbp, r8..r15);
/// they are loaded before entry and stored back at the exit. `launched` = 0
/// uses VMLAUNCH, anything else VMRESUME. Returns [`VMX_ENTER_EXITED`]
/// after a VM exit, or a failure code when the instruction itself failed
/// (then the guest registers are not stored back).
///
/// A naked function because VM entry and exit are one control transfer the
/// compiler cannot see: the stub writes HOST_RSP and HOST_RIP itself (the
/// exit lands at its label `2:` with the stack as it was at entry), saves
/// the callee-saved registers the guest will overwrite, and restores them.
///
/// # Safety
/// VMX root operation with a current VMCS whose host-state area (other than
/// RSP and RIP) describes this kernel: its CR0/CR3/CR4, selectors, FS/GS/
/// TR/GDTR/IDTR bases and EFER, with the "host address-space size" exit
/// control set; `regs` is valid for reads and writes of 15 u64.
#[unsafe(naked)]
pub unsafe extern "C" fn vmx_enter(regs: *mut u64, launched: u64) -> u64 {
    core::arch::naked_asm!(
        // Host callee-saved registers, then the regs pointer on top.
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        // HOST_RSP (0x6c14) = this stack; HOST_RIP (0x6c16) = label 2.
        "mov rax, 0x6c14",
        "vmwrite rax, rsp",
        "lea rcx, [rip + 2f]",
        "mov rax, 0x6c16",
        "vmwrite rax, rcx",
        // Flags from this compare survive the loads below (MOV keeps them).
        "cmp rsi, 0",
        "mov rax, [rdi + {g_rax}]",
        "mov rbx, [rdi + {g_rbx}]",
        "mov rcx, [rdi + {g_rcx}]",
        "mov rdx, [rdi + {g_rdx}]",
        "mov rsi, [rdi + {g_rsi}]",
        "mov rbp, [rdi + {g_rbp}]",
        "mov r8,  [rdi + {g_r8}]",
        "mov r9,  [rdi + {g_r9}]",
        "mov r10, [rdi + {g_r10}]",
        "mov r11, [rdi + {g_r11}]",
        "mov r12, [rdi + {g_r12}]",
        "mov r13, [rdi + {g_r13}]",
        "mov r14, [rdi + {g_r14}]",
        "mov r15, [rdi + {g_r15}]",
        "mov rdi, [rdi + {g_rdi}]",
        "jne 3f",
        "vmlaunch",
        "jmp 4f",
        "3:",
        "vmresume",
        // Falling through: the instruction failed. CF=1 invalid, ZF=1 valid.
        "4:",
        "mov eax, 2",
        "mov ecx, 1",
        "cmovc eax, ecx",
        "add rsp, 8",
        "jmp 5f",
        // VM exit: RSP is HOST_RSP, so the regs pointer is on top.
        "2:",
        "push rax",
        "mov rax, [rsp + 8]",
        store_guest_gprs_at_rax!(),
        "pop rcx",
        "mov [rax + {g_rax}], rcx",
        "add rsp, 8",
        "xor eax, eax",
        "5:",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
        g_rax = const gr::RAX,
        g_rbx = const gr::RBX,
        g_rcx = const gr::RCX,
        g_rdx = const gr::RDX,
        g_rsi = const gr::RSI,
        g_rdi = const gr::RDI,
        g_rbp = const gr::RBP,
        g_r8 = const gr::R8,
        g_r9 = const gr::R9,
        g_r10 = const gr::R10,
        g_r11 = const gr::R11,
        g_r12 = const gr::R12,
        g_r13 = const gr::R13,
        g_r14 = const gr::R14,
        g_r15 = const gr::R15,
    )
}

/// VMSAVE: store the processor's FS, GS, TR, LDTR (hidden parts included),
/// KernelGsBase, STAR/LSTAR/CSTAR/SFMASK and SYSENTER MSRs into the VMCB at
/// `vmcb_pa`.
///
/// # Safety
/// EFER.SVME is set and `vmcb_pa` is a 4 KiB frame owned by the caller as
/// a VMCB (the CPU writes to it).
pub unsafe fn vmsave(vmcb_pa: u64) {
    // SAFETY: caller's contract; VMSAVE writes only the VMCB at rax.
    unsafe { asm!("vmsave rax", in("rax") vmcb_pa, options(nostack)) };
}

/// Enter an SVM guest and return at its next #VMEXIT.
///
/// Loads the guest's general-purpose registers from `regs` (RAX and RSP come
/// from the VMCB), VMLOADs the guest's segment/MSR state, VMRUNs, VMSAVEs it
/// back, stores the guest's registers into `regs` and VMLOADs the host's
/// state from `host_vmcb`. Runs with GIF clear around the world switch
/// (CLGI/STGI), so no host interrupt lands between the two halves.
///
/// With `intr` non-zero the host's RFLAGS.IF is set after CLGI, so VMRUN
/// saves IF=1 and (with V_INTR_MASKING and the INTR intercept in the VMCB)
/// a physical interrupt ends the guest's run with #VMEXIT(INTR); GIF=0
/// keeps it from being delivered to the host before VMRUN. IF is cleared
/// again before STGI, so such an interrupt stays pending at the APIC until
/// the caller takes it (`interrupt_window`).
///
/// # Safety
/// EFER.SVME is set, VM_HSAVE_PA holds a host save area, `vmcb` is a fully
/// set-up VMCB whose nested page table maps only guest RAM, `host_vmcb` a
/// VMCB page holding a VMSAVE of this CPU's host state, and `regs` points
/// to a valid `GuestRegs` (15 u64: rax rbx rcx rdx rsi rdi rbp r8..r15).
#[unsafe(naked)]
pub unsafe extern "sysv64" fn svm_run(vmcb: u64, regs: *mut u64, host_vmcb: u64, intr: u64) {
    core::arch::naked_asm!(
        // Host callee-saved registers, then our three arguments.
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi", // [rsp+16] guest VMCB
        "push rsi", // [rsp+8]  GuestRegs
        "push rdx", // [rsp+0]  host VMCB
        "clgi",
        // Physical interrupts may end the guest's run (RCX = `intr`).
        "test rcx, rcx",
        "jz 2f",
        "sti",
        "2:",
        // Guest general-purpose registers (RAX is the VMCB's; RSI last).
        "mov rbx, [rsi + {g_rbx}]",
        "mov rcx, [rsi + {g_rcx}]",
        "mov rdx, [rsi + {g_rdx}]",
        "mov rdi, [rsi + {g_rdi}]",
        "mov rbp, [rsi + {g_rbp}]",
        "mov r8,  [rsi + {g_r8}]",
        "mov r9,  [rsi + {g_r9}]",
        "mov r10, [rsi + {g_r10}]",
        "mov r11, [rsi + {g_r11}]",
        "mov r12, [rsi + {g_r12}]",
        "mov r13, [rsi + {g_r13}]",
        "mov r14, [rsi + {g_r14}]",
        "mov r15, [rsi + {g_r15}]",
        "mov rsi, [rsi + {g_rsi}]",
        "mov rax, [rsp + 16]",
        "vmload rax",
        "vmrun rax",
        "vmsave rax",
        // RSP is the host's again (restored by #VMEXIT); RAX is free.
        "mov rax, [rsp + 8]",
        store_guest_gprs_at_rax!(),
        "mov rax, [rsp]",
        "vmload rax",
        "cli",
        "stgi",
        "add rsp, 24",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        g_rbx = const gr::RBX,
        g_rcx = const gr::RCX,
        g_rdx = const gr::RDX,
        g_rsi = const gr::RSI,
        g_rdi = const gr::RDI,
        g_rbp = const gr::RBP,
        g_r8 = const gr::R8,
        g_r9 = const gr::R9,
        g_r10 = const gr::R10,
        g_r11 = const gr::R11,
        g_r12 = const gr::R12,
        g_r13 = const gr::R13,
        g_r14 = const gr::R14,
        g_r15 = const gr::R15,
    );
}
