//! Xen's PVH boot information (`xen/include/public/arch-x86/hvm/start_info.h`):
//! what a PVH guest finds at the address in EBX when it starts at its
//! `XEN_ELFNOTE_PHYS32_ENTRY`. Version 1, with a memory map: a guest not
//! running on Xen (Linux without Xen hypercalls) needs the map.
//!
//! Field names are Xen's, so the conformance check compares every field's
//! offset and size with the C header (`FIELDS` tables below).

use core::mem::{offset_of, size_of};

use crate::layout::layout_struct;

/// `XEN_HVM_START_MAGIC_VALUE` ("xEn3" with the 0x80 bit of the "E" set).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// The version of [`HvmStartInfo`] we write: 1 has the memory map fields.
pub const START_INFO_VERSION: u32 = 1;

/// `XEN_HVM_MEMMAP_TYPE_*`: the `type` of a [`HvmMemmapTableEntry`] (the
/// E820 type numbers).
pub mod memmap_type {
    pub const RAM: u32 = 1;
    pub const RESERVED: u32 = 2;
    pub const ACPI: u32 = 3;
    pub const NVS: u32 = 4;
    pub const UNUSABLE: u32 = 5;
    pub const DISABLED: u32 = 6;
    pub const PMEM: u32 = 7;
}

layout_struct! {
    /// `struct hvm_start_info`.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HvmStartInfo {
        /// [`XEN_HVM_START_MAGIC_VALUE`].
        pub magic: u32,
        pub version: u32,
        /// `SIF_*` flags.
        pub flags: u32,
        pub nr_modules: u32,
        /// Physical address of `nr_modules` [`HvmModlistEntry`]s.
        pub modlist_paddr: u64,
        /// Physical address of the NUL-terminated command line.
        pub cmdline_paddr: u64,
        /// Physical address of the ACPI RSDP.
        pub rsdp_paddr: u64,
        /// Version 1: physical address of `memmap_entries`
        /// [`HvmMemmapTableEntry`]s.
        pub memmap_paddr: u64,
        pub memmap_entries: u32,
        /// Must be zero.
        pub reserved: u32,
    }
}

layout_struct! {
    /// `struct hvm_modlist_entry`: one boot module (module 0 is Linux's
    /// initrd).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HvmModlistEntry {
        pub paddr: u64,
        pub size: u64,
        /// The module's own command line, 0 when none.
        pub cmdline_paddr: u64,
        pub reserved: u64,
    }
}

layout_struct! {
    /// `struct hvm_memmap_table_entry`: one E820-style region.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HvmMemmapTableEntry {
        pub addr: u64,
        pub size: u64,
        /// A [`memmap_type`] value.
        pub type_: u32,
        /// Must be zero for version 1.
        pub reserved: u32,
    }
}

const _: () = assert!(size_of::<HvmStartInfo>() == 56);
const _: () = assert!(offset_of!(HvmStartInfo, nr_modules) == 12);
const _: () = assert!(offset_of!(HvmStartInfo, modlist_paddr) == 16);
const _: () = assert!(offset_of!(HvmStartInfo, cmdline_paddr) == 24);
const _: () = assert!(offset_of!(HvmStartInfo, rsdp_paddr) == 32);
const _: () = assert!(offset_of!(HvmStartInfo, memmap_paddr) == 40);
const _: () = assert!(offset_of!(HvmStartInfo, memmap_entries) == 48);
const _: () = assert!(size_of::<HvmModlistEntry>() == 32);
const _: () = assert!(offset_of!(HvmModlistEntry, cmdline_paddr) == 16);
const _: () = assert!(size_of::<HvmMemmapTableEntry>() == 24);
const _: () = assert!(offset_of!(HvmMemmapTableEntry, type_) == 16);
