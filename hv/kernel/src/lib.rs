//! Hardware-free parts of the Doppel hypervisor image: Multiboot2 boot
//! information parsing, the kernel command line, and physical memory range
//! arithmetic. The image (`src/main.rs`, binary `doppel-hv`) uses them; on
//! the host they are unit tested (`cargo test -p doppel-kernel --lib`).
#![cfg_attr(not(test), no_std)]

pub mod bootinfo;
pub mod config;
pub mod memmap;
