//! The kernel's GDT: a 64-bit code segment, a data segment and a TSS whose
//! first interrupt stack carries double faults (so a kernel stack overflow,
//! which faults on the guard page, is still reported).

use spin::Once;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use super::instr;

/// Interrupt stack table slot (0-based, as the x86_64 crate counts) used by
/// the double-fault handler.
pub const DOUBLE_FAULT_IST: u16 = 0;

const IST_STACK_SIZE: usize = 16 * 1024;

/// The double-fault stack. Only the CPU writes it (on a double fault).
static mut DOUBLE_FAULT_STACK: [u8; IST_STACK_SIZE] = [0; IST_STACK_SIZE];

struct Gdt {
    table: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<Gdt> = Once::new();

pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let base = (&raw const DOUBLE_FAULT_STACK) as u64;
        // Stacks grow down; keep the top 16-byte aligned.
        tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST)] =
            VirtAddr::new((base + IST_STACK_SIZE as u64) & !0xf);
        tss
    });
    let gdt = GDT.call_once(|| {
        let mut table = GlobalDescriptorTable::new();
        let code = table.append(Descriptor::kernel_code_segment());
        let data = table.append(Descriptor::kernel_data_segment());
        let tss = table.append(Descriptor::tss_segment(tss));
        Gdt {
            table,
            code,
            data,
            tss,
        }
    });
    // SAFETY: the selectors were returned by `append` for a kernel code,
    // a kernel data and a TSS descriptor of this very table.
    unsafe { instr::load_gdt(&gdt.table, gdt.code, gdt.data, gdt.tss) };
}

/// Linear address of the kernel's TSS (the VMCS host TR base).
pub fn tss_base() -> u64 {
    TSS.get().map_or(0, |t| core::ptr::from_ref(t) as u64)
}
