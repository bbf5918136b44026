//! `PROGRAM_HOSTILE`: one escape probe of `doppel_core::hostile::PROBES`
//! per boot. If the probe's instruction completes, the guest reports it
//! with `ESCAPED`; a hypervisor that contains it never lets it get there:
//! the instruction exits, is refused and the hypervisor injects an
//! exception (#UD, #GP(0): `doppel_core::fault`), or the CPU raises one
//! itself. Before the probe the guest installs a GDT and an IDT whose
//! handlers, one per exception vector 0..=31, report the vector, error
//! code and RIP with `FAULTED` and then stop.

use core::arch::{asm, global_asm};

use doppel_abi::guest::{hypercall, BootInfo, BOOT_INFO_GPA, HYPERCALL_VMMCALL};
use doppel_core::exit::Insn;
use doppel_core::fault::{has_error_code, vector::EXCEPTIONS};
use doppel_core::hostile::{Op, PROBES};
use doppel_core::start::{CODE_SELECTOR, DATA_SELECTOR};

use crate::{halt, print, Guest};

// One stub per exception vector, 16 bytes apart from `fault_stubs`: push
// the vector, join the common part, which calls `fault_entry` with the
// stack as the CPU and the stub left it (vector, [error code,] RIP, CS,
// RFLAGS, RSP, SS), aligned for the call. Nothing returns.
global_asm!(
    ".pushsection .text.fault_stubs, \"ax\"",
    ".balign 16",
    "fault_stubs:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".balign 16",
    "push \\v",
    "jmp fault_common",
    ".endr",
    "fault_common:",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    ".popsection",
    entry = sym fault_entry,
);

/// Distance between two stubs.
const STUB_STRIDE: u64 = 16;

/// The flat GDT the IDT's gates need (delivering an exception loads CS
/// from the GDT): null, 64-bit code at [`CODE_SELECTOR`], data at
/// [`DATA_SELECTOR`], both with their accessed bit set already (the CPU
/// would otherwise write it).
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
const _: () = assert!(CODE_SELECTOR == 0x08 && DATA_SELECTOR == 0x10);

/// The descriptor tables, live for as long as the probe runs.
#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 3],
    idt: [[u64; 2]; EXCEPTIONS as usize],
}

/// An LGDT/LIDT operand.
#[repr(C, packed)]
struct Pseudo {
    limit: u16,
    base: u64,
}

impl Tables {
    fn new() -> Self {
        let stubs: u64;
        // SAFETY: takes the address of `fault_stubs` (RIP-relative LEA);
        // touches nothing.
        unsafe { asm!("lea {0}, [rip + fault_stubs]", out(reg) stubs, options(nomem, nostack)) };
        let mut idt = [[0u64; 2]; EXCEPTIONS as usize];
        for (v, gate) in idt.iter_mut().enumerate() {
            let h = stubs + v as u64 * STUB_STRIDE;
            // A present 64-bit interrupt gate (type 0xe, DPL 0, no IST).
            gate[0] = (h & 0xffff)
                | u64::from(CODE_SELECTOR) << 16
                | 0x8e << 40
                | ((h >> 16) & 0xffff) << 48;
            gate[1] = h >> 32;
        }
        Self { gdt: GDT, idt }
    }

    /// Load both tables. `self` must stay where it is (and alive) for as
    /// long as an exception may be delivered.
    fn load(&self) {
        let gdt = Pseudo {
            limit: (core::mem::size_of_val(&self.gdt) - 1) as u16,
            base: self.gdt.as_ptr() as u64,
        };
        let idt = Pseudo {
            limit: (core::mem::size_of_val(&self.idt) - 1) as u16,
            base: self.idt.as_ptr() as u64,
        };
        // SAFETY: both operands describe tables in `self`, which the
        // caller keeps in place while the probe runs; the GDT's code
        // descriptor is the 64-bit one CS already holds, so no segment
        // changes meaning.
        unsafe {
            asm!(
                "lgdt [{g}]",
                "lidt [{i}]",
                g = in(reg) &gdt,
                i = in(reg) &idt,
                options(readonly, nostack, preserves_flags),
            )
        };
    }
}

/// Every exception lands here: report it with `FAULTED` and stop.
/// `frame` points at the vector the stub pushed, followed by the CPU's
/// exception frame (error code first, for the vectors that have one).
extern "C" fn fault_entry(frame: *const u64) -> ! {
    // SAFETY: the stub passes the stack pointer right after its push; the
    // vector and the CPU's frame (at least RIP, CS, RFLAGS, RSP, SS above
    // it) are on this stack.
    let (vector, after) = unsafe { (frame.read(), frame.add(1)) };
    let has_code = u8::try_from(vector).is_ok_and(has_error_code);
    // SAFETY: as above: `after` is the error code or RIP, then the rest of
    // the frame.
    let (error, rip) = unsafe {
        if has_code {
            (after.read(), after.add(1).read())
        } else {
            (0, after.read())
        }
    };
    // SAFETY: the boot information page the hypervisor wrote at
    // BOOT_INFO_GPA (the address `_start` got), identity-mapped; read once.
    let boot: BootInfo = unsafe { core::ptr::read_volatile(BOOT_INFO_GPA as *const BootInfo) };
    let g = Guest {
        vmmcall: boot.hypercall == HYPERCALL_VMMCALL,
    };
    g.hypercall(hypercall::FAULTED, vector, error, rip);
    print("guest: hostile: resumed after FAULTED\n");
    halt()
}

/// VMCS field encoding of the guest RIP.
const VMCS_GUEST_RIP: u64 = 0x681e;

/// Run probe `n` with argument `arg`; returns only if it got through.
pub fn run(g: &Guest, n: u64, arg: u64) -> u64 {
    let Some(probe) = PROBES.get(n as usize) else {
        print("guest: hostile: no such probe\n");
        return 1;
    };
    print("guest: hostile probe ");
    print(probe.name);
    print("\n");
    let tables = Tables::new();
    tables.load();
    let value = execute(probe.op, arg);
    // The tables stay in place until here (the probe is over).
    core::hint::black_box(&tables);
    g.hypercall(hypercall::ESCAPED, n, value, 0);
    0
}

/// Execute `op`. Every instruction here is one a guest must not get to
/// run; the hypervisor under test is expected to refuse it with an
/// exception, which the IDT's handlers report.
fn execute(op: Op, arg: u64) -> u64 {
    // A memory operand for the VMX instructions that take one.
    let mut cell: [u64; 2] = [arg, 0];
    let m = cell.as_mut_ptr();
    let mut value = 0u64;
    // SAFETY (all blocks below): these are the escape attempts themselves.
    // Each touches no guest memory but `cell` (on this stack) and whatever
    // the hypervisor lets the instruction reach; the guest has nothing else
    // to protect and stops right after.
    match op {
        // SAFETY: see above.
        Op::Insn(Insn::Vmsave) => unsafe { asm!("vmsave rax", in("rax") arg, options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmload) => unsafe { asm!("vmload rax", in("rax") arg, options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmrun) => unsafe { asm!("vmrun rax", in("rax") arg, options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Stgi) => unsafe { asm!("stgi", options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Clgi) => unsafe { asm!("clgi", options(nostack)) },
        // SAFETY: see above; SKINIT takes the SLB address in EAX.
        Op::Insn(Insn::Skinit) => unsafe {
            asm!("skinit eax", in("eax") 0x0020_0000u32, options(nostack))
        },
        // SAFETY: see above; address 0 in RAX, ASID 0 (the host's) in ECX.
        Op::Insn(Insn::Invlpga) => unsafe {
            asm!("invlpga rax, ecx", in("rax") 0u64, in("ecx") 0u32, options(nostack))
        },
        // SAFETY: see above; XCR0 = x87 only. CR4.OSXSAVE first, so the
        // instruction gets as far as the intercept (without it, it is #UD).
        Op::Insn(Insn::Xsetbv) => unsafe {
            asm!(
                "mov {t}, cr4",
                "bts {t}, 18",
                "mov cr4, {t}",
                "xsetbv",
                t = out(reg) _,
                in("ecx") 0u32, in("eax") 1u32, in("edx") 0u32,
                options(nostack),
            )
        },
        // SAFETY: see above.
        Op::Insn(Insn::Vmxon) => unsafe { asm!("vmxon [{0}]", in(reg) m, options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmclear) => unsafe { asm!("vmclear [{0}]", in(reg) m, options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmptrld) => unsafe { asm!("vmptrld [{0}]", in(reg) m, options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmptrst) => unsafe { asm!("vmptrst [{0}]", in(reg) m, options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmread) => unsafe {
            asm!("vmread {0}, {1}", out(reg) value, in(reg) VMCS_GUEST_RIP, options(nostack))
        },
        // SAFETY: see above.
        Op::Insn(Insn::Vmwrite) => unsafe {
            asm!("vmwrite {0}, {1}", in(reg) VMCS_GUEST_RIP, in(reg) arg, options(nostack))
        },
        // SAFETY: see above.
        Op::Insn(Insn::Vmlaunch) => unsafe { asm!("vmlaunch", options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmresume) => unsafe { asm!("vmresume", options(nostack)) },
        // SAFETY: see above.
        Op::Insn(Insn::Vmxoff) => unsafe { asm!("vmxoff", options(nostack)) },
        // SAFETY: see above; type 2 = all contexts, descriptor in `cell`.
        Op::Insn(Insn::Invept) => unsafe {
            asm!("invept {0}, [{1}]", in(reg) 2u64, in(reg) m, options(nostack))
        },
        // SAFETY: see above.
        Op::Insn(Insn::Invvpid) => unsafe {
            asm!("invvpid {0}, [{1}]", in(reg) 2u64, in(reg) m, options(nostack))
        },
        // SAFETY: see above; function 0 in EAX, EPTP index 0 in ECX.
        Op::Insn(Insn::Vmfunc) => unsafe {
            asm!("vmfunc", in("eax") 0u32, in("ecx") 0u32, options(nostack))
        },
        // No probe runs it: GETSEC needs SMX. A table entry naming it would
        // be reported as an escape, never passed.
        Op::Insn(Insn::Getsec) => {}
        Op::Rdmsr(msr) => {
            let (lo, hi): (u32, u32);
            // SAFETY: see above.
            unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack)) };
            value = u64::from(hi) << 32 | u64::from(lo);
        }
        Op::Wrmsr(msr) => {
            // SAFETY: see above.
            unsafe {
                asm!("wrmsr", in("ecx") msr, in("eax") arg as u32, in("edx") (arg >> 32) as u32, options(nostack))
            };
        }
    }
    // Keep `cell` alive across the asm.
    // SAFETY: `m` points at `cell`, live here.
    let _ = unsafe { core::ptr::read_volatile(m) };
    value
}
