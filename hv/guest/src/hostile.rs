//! `PROGRAM_HOSTILE`: one escape probe of `doppel_core::hostile::PROBES`
//! per boot. If the probe's instruction completes, the guest reports it
//! with `ESCAPED`; a hypervisor that contains it never lets it get there
//! (the instruction exits and is refused, or faults in the guest).

use core::arch::asm;

use doppel_abi::guest::hypercall;
use doppel_core::exit::Insn;
use doppel_core::hostile::{Op, PROBES};

use crate::{print, Guest};

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
    let value = execute(probe.op, arg);
    g.hypercall(hypercall::ESCAPED, n, value, 0);
    0
}

/// Execute `op`. Every instruction here is one a guest must not get to
/// run; the hypervisor under test is expected to stop the guest at it.
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
        // No probe runs these: GETSEC needs SMX, and the CR4 write is what
        // the XSETBV probe's CR4.OSXSAVE step runs into on SVM. A table
        // entry naming one would be reported as an escape, never passed.
        Op::Insn(Insn::Getsec | Insn::WriteCr4) => {}
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
