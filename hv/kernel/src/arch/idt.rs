//! Exception handling: one assembly stub per vector pushes a uniform frame
//! (a zero where the CPU pushes no error code, then the vector number and
//! the general registers) and calls [`trap_handler`], which hands vector,
//! error code, RIP (and CR2 for #PF) to the kernel's fault handler given to
//! [`init`], which reports them and fails the run. Stable Rust has no
//! `x86-interrupt` ABI, hence the stubs. Two interrupt vectors, the local
//! APIC timer's and its spurious vector, have stubs that return (see
//! `arch::apic`); every other interrupt vector is not present.

use core::arch::global_asm;
use core::fmt;

use spin::Once;
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use super::{apic, gdt, instr};

/// Vectors for which the CPU pushes an error code.
const fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// What the stubs leave on the stack, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    // Pushed by the CPU.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<TrapFrame>() == 22 * 8);
const _: () = assert!(core::mem::offset_of!(TrapFrame, vector) == 15 * 8);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rip) == 17 * 8);

// The stubs. `doppel_trap_stubs` is a table of the 32 stub addresses.
global_asm!(
    r#"
    .section .text.doppel_traps, "ax"
    .code64
    // Vectors without a CPU-pushed error code: push a zero in its place.
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    doppel_trap_stub_\v:
        pushq $0
        pushq $\v
        jmp doppel_trap_common
    .endr
    // Vectors with an error code (see `has_error_code`).
    .irp v, 8,10,11,12,13,14,17,21,29,30
    doppel_trap_stub_\v:
        pushq $\v
        jmp doppel_trap_common
    .endr

    doppel_trap_common:
        pushq %rax
        pushq %rbx
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rbp
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rdi
        cld
        call {handler}
        ud2

    .section .rodata.doppel_traps, "a"
    .balign 8
    .global doppel_trap_stubs
    doppel_trap_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad doppel_trap_stub_\v
    .endr
    "#,
    handler = sym trap_handler,
    options(att_syntax)
);

// The interrupt stubs: unlike the exception stubs these return. They save
// the registers the C ABI lets `irq_handler` clobber, pass it the vector,
// and IRETQ. `doppel_irq_stubs` holds the timer and spurious stubs.
global_asm!(
    r#"
    .section .text.doppel_irqs, "ax"
    .code64
    doppel_irq_stub_timer:
        pushq ${timer}
        jmp doppel_irq_common
    doppel_irq_stub_spurious:
        pushq ${spurious}
        jmp doppel_irq_common

    // RSP was 16-byte aligned before the CPU pushed its 5 quadwords; with
    // the vector and 9 registers below it is 8 off, fixed before the call.
    doppel_irq_common:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        movq 72(%rsp), %rdi
        subq $8, %rsp
        cld
        call {handler}
        addq $8, %rsp
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rax
        addq $8, %rsp
        iretq

    .section .rodata.doppel_irqs, "a"
    .balign 8
    .global doppel_irq_stubs
    doppel_irq_stubs:
        .quad doppel_irq_stub_timer
        .quad doppel_irq_stub_spurious
    "#,
    timer = const apic::TIMER_VECTOR,
    spurious = const apic::SPURIOUS_VECTOR,
    handler = sym irq_handler,
    options(att_syntax)
);

unsafe extern "C" {
    /// Addresses of the 32 exception stubs, by vector.
    static doppel_trap_stubs: [u64; 32];
    /// Addresses of the timer and spurious interrupt stubs.
    static doppel_irq_stubs: [u64; 2];
}

/// The interrupt stubs' Rust half: count and acknowledge (`arch::apic`).
extern "C" fn irq_handler(vector: u64) {
    apic::on_interrupt(vector as u8);
}

fn irq_stub(index: usize) -> VirtAddr {
    // SAFETY: `doppel_irq_stubs` is an initialized, read-only table in the
    // image (defined in the global_asm! above).
    VirtAddr::new(unsafe { doppel_irq_stubs[index] })
}

fn stub(vector: u8) -> VirtAddr {
    // SAFETY: `doppel_trap_stubs` is an initialized, read-only table in the
    // image (defined in the global_asm! above).
    VirtAddr::new(unsafe { doppel_trap_stubs[usize::from(vector)] })
}

static IDT: Once<InterruptDescriptorTable> = Once::new();

pub fn init(on_fault: fn(&Fault<'_>) -> !) {
    ON_FAULT.call_once(|| on_fault);
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        macro_rules! set {
            ($($field:ident = $v:expr),* $(,)?) => {$(
                // SAFETY: the stub for vector $v pushes an error-code slot
                // exactly when the CPU does not (`has_error_code`), so the
                // frame it hands to `trap_handler` is uniform; it never
                // returns to the interrupted code.
                unsafe { idt.$field.set_handler_addr(stub($v)); }
            )*};
        }
        set!(
            divide_error = 0,
            debug = 1,
            non_maskable_interrupt = 2,
            breakpoint = 3,
            overflow = 4,
            bound_range_exceeded = 5,
            invalid_opcode = 6,
            device_not_available = 7,
            invalid_tss = 10,
            segment_not_present = 11,
            stack_segment_fault = 12,
            general_protection_fault = 13,
            page_fault = 14,
            x87_floating_point = 16,
            alignment_check = 17,
            machine_check = 18,
            simd_floating_point = 19,
            virtualization = 20,
            cp_protection_exception = 21,
            hv_injection_exception = 28,
            vmm_communication_exception = 29,
            security_exception = 30,
        );
        // SAFETY: as above (the crate reaches vector 9 only by index).
        unsafe {
            idt[9].set_handler_addr(stub(9));
        }
        // SAFETY: as above, for the double fault; it runs on its own stack.
        unsafe {
            idt.double_fault
                .set_handler_addr(stub(8))
                .set_stack_index(gdt::DOUBLE_FAULT_IST);
        }
        // SAFETY: the interrupt stubs save every register the handler may
        // change and return with IRETQ; the CPU pushes no error code for
        // external interrupts. Interrupt gates: IF stays clear inside.
        unsafe {
            idt[apic::TIMER_VECTOR].set_handler_addr(irq_stub(0));
            idt[apic::SPURIOUS_VECTOR].set_handler_addr(irq_stub(1));
        }
        // Every other vector from 32 up stays not present: an interrupt on
        // one raises #NP, reported and fatal like any exception.
        // Vectors 15, 22-27 and 31 are reserved: the x86_64 crate keeps
        // their entries not-present, so an `int` to one of them raises #NP
        // (vector 11) with the IDT index in the error code, which is
        // reported like any other exception.
        idt
    });
    instr::load_idt(idt);
}

fn name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 floating point",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD floating point",
        "#VE virtualization",
        "#CP control protection",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV hypervisor injection",
        "#VC VMM communication",
        "#SX security",
        "reserved",
    ];
    usize::try_from(vector)
        .ok()
        .and_then(|v| NAMES.get(v))
        .copied()
        .unwrap_or("unknown")
}

/// An exception the kernel took: its frame and, for #PF, CR2. Displays
/// as `exception V (NAME) error=E rip=R rsp=S rflags=F[ cr2=A]`.
pub struct Fault<'a> {
    pub frame: &'a TrapFrame,
    pub cr2: Option<u64>,
}

impl fmt::Display for Fault<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.frame;
        let v = t.vector;
        write!(
            f,
            "exception {v} ({}) error={:#x}{} rip={:#x} rsp={:#x} rflags={:#x}",
            name(v),
            t.error_code,
            if u8::try_from(v).is_ok_and(has_error_code) {
                ""
            } else {
                " (none pushed)"
            },
            t.rip,
            t.rsp,
            t.rflags,
        )?;
        if let Some(cr2) = self.cr2 {
            write!(f, " cr2={cr2:#x}")?;
        }
        Ok(())
    }
}

/// What the kernel does with an exception (report it and end the run),
/// given to [`init`]: the CPU set-up knows no console.
static ON_FAULT: Once<fn(&Fault<'_>) -> !> = Once::new();

/// Every exception ends the run: the kernel takes none on purpose.
extern "C" fn trap_handler(frame: &TrapFrame) -> ! {
    let cr2 = (frame.vector == 14).then(instr::read_cr2);
    match ON_FAULT.get() {
        Some(on_fault) => on_fault(&Fault { frame, cr2 }),
        // `init` sets it before it loads the IDT.
        None => instr::halt_forever(),
    }
}
