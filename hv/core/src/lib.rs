//! Pure logic of the Doppel hypervisor, with no hardware access.
//!
//! `no_std` so the kernel links it; tested on the host with std.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod addr;
pub mod cpuid_policy;
pub mod dirtylog;
pub mod dm;
pub mod elf;
pub mod engine;
pub mod exit;
pub mod fault;
pub mod frame;
pub mod hostile;
pub mod hvm;
pub mod hw;
pub mod mmio;
pub mod msr;
pub mod msr_policy;
pub mod paging;
pub mod platform;
pub mod pml;
pub mod posted;
pub mod pvh;
pub mod regs;
pub mod selftest;
pub mod start;
pub mod workload;
