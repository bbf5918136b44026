//! The Multiboot2 header and the 32-bit entry point.
//!
//! GRUB enters `_start` in 32-bit protected mode with paging off, EAX =
//! the Multiboot2 magic and EBX = the physical address of the boot
//! information. The entry zeroes .bss, checks for long mode, identity-maps
//! the first 4 GiB with 2 MiB pages, enables PAE, EFER.LME and paging, loads
//! a minimal 64-bit GDT and jumps to 64-bit code, which sets the stack and
//! calls `kmain(magic, info)`. `kmain` then replaces the GDT and the page
//! tables with the kernel's own. See docs/KERNEL.md.

use core::arch::global_asm;

/// Size of the boot (and kernel) stack. A 4 KiB guard page below it is left
/// unmapped by the kernel's page tables.
pub const STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .set MB2_MAGIC, 0xE85250D6
    .set MB2_ARCH_I386, 0

    .section .multiboot2_header, "a"
    .balign 8
mb2_header:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH_I386 + (mb2_header_end - mb2_header))
    // End tag.
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .boot.text, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    // Keep the loader's magic and info pointer across CPUID/STOS.
    movl %eax, %ebp
    movl %ebx, %esi

    // Zero .bss (boot page tables and stack live there).
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl
    movl $boot_stack_top, %esp

    // Long mode? (CPUID 8000_0001h EDX[29])
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb no_long_mode
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 29), %edx
    jz no_long_mode

    // PML4[0] -> PDPT; PDPT[0..4] -> 4 page directories; 2048 x 2 MiB.
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl $boot_pdpt, %edi
    movl $4, %ecx
1:  movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    loop 1b
    movl $boot_pd, %edi
    movl $0x83, %eax            // present, writable, 2 MiB page
    movl $2048, %ecx
2:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 2b

    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $(1 << 5), %eax         // PAE
    movl %eax, %cr4
    movl $0xC0000080, %ecx      // IA32_EFER
    rdmsr
    orl $(1 << 8), %eax         // LME
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax       // PG, WP, PE
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

no_long_mode:
    movl $no_long_mode_msg, %ebx
    movw $0xE9, %dx
    call print32
    movb $0x11, %al             // QEMU isa-debug-exit: failure
    movw $0xF4, %dx
    outb %al, %dx
    movl $shutdown_msg, %ebx
    movw $0x8900, %dx           // Bochs power-off
    call print32
3:  hlt
    jmp 3b

    // Write the NUL-terminated string at EBX to port DX.
print32:
    movb (%ebx), %al
    testb %al, %al
    jz 4f
    outb %al, %dx
    incl %ebx
    jmp print32
4:  ret

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    // kmain(magic: u32, info: usize); the upper halves of the registers are
    // undefined after the mode switch, 32-bit moves clear them.
    movl %ebp, %edi
    movl %esi, %esi
    xorl %ebp, %ebp
    call {kmain}
5:  cli
    hlt
    jmp 5b

    .section .rodata.boot, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    // 0x08: 64-bit code
    .quad 0x00CF92000000FFFF    // 0x10: data
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
no_long_mode_msg:
    .asciz "doppel-hv: error: the CPU has no long mode\ndoppel-hv: exit=fail\n"
shutdown_msg:
    .asciz "Shutdown"

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .global boot_stack_guard
boot_stack_guard:
    .skip 4096
boot_stack:
    .skip {stack_size}
    .global boot_stack_top
boot_stack_top:
    "#,
    kmain = sym crate::kmain,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);
