//! Xen's HVM save layouts (`xen/include/public/hvm/save.h` and
//! `arch-x86/hvm/save.h`): the body of an HVM_CONTEXT record is a sequence
//! of [`HvmSaveDescriptor`] + payload, HEADER first, END last.
//!
//! Field names are Xen's, so the conformance check can compare every field's
//! offset and size with the C headers (`FIELDS` tables below).

use core::mem::{offset_of, size_of};
#[cfg(test)]
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::layout::layout_struct;

/// Typecodes of save records.
pub mod code {
    pub const END: u16 = 0;
    pub const HEADER: u16 = 1;
    pub const CPU: u16 = 2;
    pub const PIC: u16 = 3;
    pub const IOAPIC: u16 = 4;
    pub const LAPIC: u16 = 5;
    pub const LAPIC_REGS: u16 = 6;
    pub const PIT: u16 = 10;
    pub const RTC: u16 = 11;
    pub const MTRR: u16 = 14;
    pub const CPU_XSAVE: u16 = 16;
    pub const TSC_ADJUST: u16 = 19;
    pub const CPU_MSR: u16 = 20;

    /// Xen's name of a typecode (`HVM_SAVE_CODE(name)`), for error lines;
    /// `"unknown"` for one Xen does not define.
    pub const fn name(typecode: u16) -> &'static str {
        match typecode {
            END => "END",
            HEADER => "HEADER",
            CPU => "CPU",
            PIC => "PIC",
            IOAPIC => "IOAPIC",
            LAPIC => "LAPIC",
            LAPIC_REGS => "LAPIC_REGS",
            7 => "PCI_IRQ",
            8 => "ISA_IRQ",
            9 => "PCI_LINK",
            PIT => "PIT",
            RTC => "RTC",
            12 => "HPET",
            13 => "PMTIMER",
            MTRR => "MTRR",
            15 => "VIRIDIAN_DOMAIN",
            CPU_XSAVE => "CPU_XSAVE",
            17 => "VIRIDIAN_VCPU",
            18 => "VMCE_VCPU",
            TSC_ADJUST => "TSC_ADJUST",
            CPU_MSR => "CPU_MSR",
            _ => "unknown",
        }
    }
}

/// `HVM_FILE_MAGIC`.
pub const HVM_FILE_MAGIC: u32 = 0x5438_1286;
/// `HVM_FILE_VERSION`.
pub const HVM_FILE_VERSION: u32 = 1;
/// `XEN_X86_FPU_INITIALISED` in [`HvmHwCpu::flags`].
pub const XEN_X86_FPU_INITIALISED: u32 = 1;

layout_struct! {
    /// `struct hvm_save_descriptor`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmSaveDescriptor {
        pub typecode: u16,
        pub instance: u16,
        /// Payload bytes, not counting this descriptor.
        pub length: u32,
    }
}

layout_struct! {
    /// `struct hvm_save_header` (typecode 1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmSaveHeader {
        pub magic: u32,
        pub version: u32,
        pub changeset: u64,
        /// CPUID.1:EAX of the saving machine.
        pub cpuid: u32,
        pub gtsc_khz: u32,
    }
}

layout_struct! {
    /// `struct hvm_hw_cpu` (typecode 2), one per vCPU, instance = vCPU id.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmHwCpu {
        /// FXSAVE image.
        pub fpu_regs: [u8; 512],
        pub rax: u64,
        pub rbx: u64,
        pub rcx: u64,
        pub rdx: u64,
        pub rbp: u64,
        pub rsi: u64,
        pub rdi: u64,
        pub rsp: u64,
        pub r8: u64,
        pub r9: u64,
        pub r10: u64,
        pub r11: u64,
        pub r12: u64,
        pub r13: u64,
        pub r14: u64,
        pub r15: u64,
        pub rip: u64,
        pub rflags: u64,
        pub cr0: u64,
        pub cr2: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub dr0: u64,
        pub dr1: u64,
        pub dr2: u64,
        pub dr3: u64,
        pub dr6: u64,
        pub dr7: u64,
        pub cs_sel: u32,
        pub ds_sel: u32,
        pub es_sel: u32,
        pub fs_sel: u32,
        pub gs_sel: u32,
        pub ss_sel: u32,
        pub tr_sel: u32,
        pub ldtr_sel: u32,
        pub cs_limit: u32,
        pub ds_limit: u32,
        pub es_limit: u32,
        pub fs_limit: u32,
        pub gs_limit: u32,
        pub ss_limit: u32,
        pub tr_limit: u32,
        pub ldtr_limit: u32,
        pub idtr_limit: u32,
        pub gdtr_limit: u32,
        pub cs_base: u64,
        pub ds_base: u64,
        pub es_base: u64,
        pub fs_base: u64,
        pub gs_base: u64,
        pub ss_base: u64,
        pub tr_base: u64,
        pub ldtr_base: u64,
        pub idtr_base: u64,
        pub gdtr_base: u64,
        pub cs_arbytes: u32,
        pub ds_arbytes: u32,
        pub es_arbytes: u32,
        pub fs_arbytes: u32,
        pub gs_arbytes: u32,
        pub ss_arbytes: u32,
        pub tr_arbytes: u32,
        pub ldtr_arbytes: u32,
        pub sysenter_cs: u64,
        pub sysenter_esp: u64,
        pub sysenter_eip: u64,
        pub shadow_gs: u64,
        /// Obsolete, ignored by Xen.
        pub msr_flags: u64,
        pub msr_lstar: u64,
        pub msr_star: u64,
        pub msr_cstar: u64,
        pub msr_syscall_mask: u64,
        pub msr_efer: u64,
        pub msr_tsc_aux: u64,
        pub tsc: u64,
        /// vector 0-7, type 8-10, error valid 11, valid 31.
        pub pending_event: u32,
        pub error_code: u32,
        /// Bit 0: [`XEN_X86_FPU_INITIALISED`].
        pub flags: u32,
        pub pad0: u32,
    }
}

const _: () = assert!(size_of::<HvmSaveDescriptor>() == 8);
const _: () = assert!(offset_of!(HvmSaveDescriptor, typecode) == 0);
const _: () = assert!(offset_of!(HvmSaveDescriptor, instance) == 2);
const _: () = assert!(offset_of!(HvmSaveDescriptor, length) == 4);
const _: () = assert!(size_of::<HvmSaveHeader>() == 24);
const _: () = assert!(offset_of!(HvmSaveHeader, changeset) == 8);
const _: () = assert!(offset_of!(HvmSaveHeader, gtsc_khz) == 20);
const _: () = assert!(size_of::<HvmHwCpu>() == 1032);
const _: () = assert!(offset_of!(HvmHwCpu, rax) == 512);
const _: () = assert!(offset_of!(HvmHwCpu, rip) == 640);
const _: () = assert!(offset_of!(HvmHwCpu, cr0) == 656);
const _: () = assert!(offset_of!(HvmHwCpu, dr0) == 688);
const _: () = assert!(offset_of!(HvmHwCpu, cs_sel) == 736);
const _: () = assert!(offset_of!(HvmHwCpu, cs_limit) == 768);
const _: () = assert!(offset_of!(HvmHwCpu, cs_base) == 808);
const _: () = assert!(offset_of!(HvmHwCpu, cs_arbytes) == 888);
const _: () = assert!(offset_of!(HvmHwCpu, sysenter_cs) == 920);
const _: () = assert!(offset_of!(HvmHwCpu, shadow_gs) == 944);
const _: () = assert!(offset_of!(HvmHwCpu, msr_flags) == 952);
const _: () = assert!(offset_of!(HvmHwCpu, tsc) == 1008);
const _: () = assert!(offset_of!(HvmHwCpu, pending_event) == 1016);
const _: () = assert!(offset_of!(HvmHwCpu, error_code) == 1020);
const _: () = assert!(offset_of!(HvmHwCpu, flags) == 1024);
const _: () = assert!(offset_of!(HvmHwCpu, pad0) == 1028);

layout_struct! {
    /// `struct hvm_hw_lapic` (typecode 5), one per vCPU.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmHwLapic {
        /// IA32_APIC_BASE.
        pub apic_base_msr: u64,
        /// [`VLAPIC_SW_DISABLED`] | [`VLAPIC_HW_DISABLED`].
        pub disabled: u32,
        /// The timer's divide value (1, 2, 4, ... 128), from TDCR.
        pub timer_divisor: u32,
        /// IA32_TSC_DEADLINE.
        pub tdt_msr: u64,
    }
}

/// `VLAPIC_SW_DISABLED` in [`HvmHwLapic::disabled`] (SVR bit 8 clear).
pub const VLAPIC_SW_DISABLED: u32 = 0x1;
/// `VLAPIC_HW_DISABLED` in [`HvmHwLapic::disabled`] (APIC_BASE bit 11 clear).
pub const VLAPIC_HW_DISABLED: u32 = 0x2;

/// Bytes of the local APIC register page in [`HvmHwLapicRegs`].
pub const LAPIC_REGS_SIZE: usize = 1024;

layout_struct! {
    /// `struct hvm_hw_lapic_regs` (typecode 6): the first KiB of the xAPIC
    /// register page, register at offset `0x10 * n` for x2APIC MSR
    /// `0x800 + n`, each a little-endian u32.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmHwLapicRegs {
        pub data: [u8; LAPIC_REGS_SIZE],
    }
}

/// `VIOAPIC_NUM_PINS`: redirection entries in Xen's HVM IOAPIC record.
pub const VIOAPIC_NUM_PINS: usize = 48;

layout_struct! {
    /// `struct hvm_hw_vioapic` (typecode 4). Each `redirtbl` entry is the
    /// 64-bit `union vioapic_redir_entry` (the IOAPIC's redirection
    /// register: vector 0-7, delivery mode 8-10, dest mode 11, delivery
    /// status 12, polarity 13, remote IRR 14, trigger 15, mask 16,
    /// destination 56-63).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmHwVioapic {
        pub base_address: u64,
        pub ioregsel: u32,
        pub id: u32,
        pub redirtbl: [u64; VIOAPIC_NUM_PINS],
    }
}

/// `RTC_CMOS_SIZE`: CMOS bytes in Xen's RTC record (time, registers A-D).
pub const RTC_CMOS_SIZE: usize = 14;

layout_struct! {
    /// `struct hvm_hw_rtc` (typecode 11).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmHwRtc {
        /// CMOS bytes 0-13: seconds, alarm seconds, minutes, alarm minutes,
        /// hours, alarm hours, day of week, day, month, year, A, B, C, D.
        pub cmos_data: [u8; RTC_CMOS_SIZE],
        /// The index register (port 0x70).
        pub cmos_index: u8,
        pub pad0: u8,
        /// RTC offset from host time, in seconds.
        pub rtc_offset: i64,
    }
}

const _: () = assert!(size_of::<HvmHwLapic>() == 24);
const _: () = assert!(offset_of!(HvmHwLapic, disabled) == 8);
const _: () = assert!(offset_of!(HvmHwLapic, timer_divisor) == 12);
const _: () = assert!(offset_of!(HvmHwLapic, tdt_msr) == 16);
const _: () = assert!(size_of::<HvmHwLapicRegs>() == 1024);
const _: () = assert!(size_of::<HvmHwVioapic>() == 16 + 8 * 48);
const _: () = assert!(offset_of!(HvmHwVioapic, ioregsel) == 8);
const _: () = assert!(offset_of!(HvmHwVioapic, id) == 12);
const _: () = assert!(offset_of!(HvmHwVioapic, redirtbl) == 16);
const _: () = assert!(size_of::<HvmHwRtc>() == 24);
const _: () = assert!(offset_of!(HvmHwRtc, cmos_index) == 14);
const _: () = assert!(offset_of!(HvmHwRtc, pad0) == 15);
const _: () = assert!(offset_of!(HvmHwRtc, rtc_offset) == 16);

/// `struct hvm_hw_pit`'s channel count (channels 0-2).
pub const PIT_CHANNELS: usize = 3;

layout_struct! {
    /// `struct hvm_hw_pit_channel`: one i8254 counter in [`HvmHwPit`].
    /// Xen keeps its i8254 model's state here; the byte-state fields use
    /// the values 1 (LSB), 2 (MSB), 3 (first byte of a word), 4 (second).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HvmHwPitChannel {
        /// The reload value last loaded (1-65536; Xen's load of 0 is 65536).
        /// Xen restarts counting from it on restore.
        pub count: u32,
        /// The count latched by a latch or read-back command.
        pub latched_count: u16,
        /// Byte state of a pending latched count (0: none latched).
        pub count_latched: u8,
        /// 1 if a status byte is latched.
        pub status_latched: u8,
        /// The latched status byte.
        pub status: u8,
        /// Byte state of the next unlatched read.
        pub read_state: u8,
        /// Byte state of the next count write.
        pub write_state: u8,
        /// The first byte of a two-byte count write.
        pub write_latch: u8,
        /// Access mode from the control word: 1 LSB, 2 MSB, 3 LSB then MSB.
        pub rw_mode: u8,
        /// Operating mode 0-5.
        pub mode: u8,
        /// 1 for BCD counting.
        pub bcd: u8,
        /// The gate input (channel 2: port 0x61 bit 0).
        pub gate: u8,
    }
}

layout_struct! {
    /// `struct hvm_hw_pit` (typecode 10): the i8254's three channels and
    /// the speaker data enable (port 0x61 bit 1).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HvmHwPit {
        pub channels: [HvmHwPitChannel; PIT_CHANNELS],
        pub speaker_data_on: u32,
        pub pad0: u32,
    }
}

const _: () = assert!(size_of::<HvmHwPitChannel>() == 16);
const _: () = assert!(offset_of!(HvmHwPitChannel, latched_count) == 4);
const _: () = assert!(offset_of!(HvmHwPitChannel, count_latched) == 6);
const _: () = assert!(offset_of!(HvmHwPitChannel, read_state) == 9);
const _: () = assert!(offset_of!(HvmHwPitChannel, rw_mode) == 12);
const _: () = assert!(offset_of!(HvmHwPitChannel, gate) == 15);
const _: () = assert!(size_of::<HvmHwPit>() == 56);
const _: () = assert!(offset_of!(HvmHwPit, speaker_data_on) == 48);
const _: () = assert!(offset_of!(HvmHwPit, pad0) == 52);

/// `MTRR_VCNT`: variable-range MTRR pairs in Xen's MTRR record.
pub const MTRR_VCNT: usize = 8;
/// `NUM_FIXED_MSR`: fixed-range MTRR MSRs in Xen's MTRR record.
pub const NUM_FIXED_MSR: usize = 11;

layout_struct! {
    /// `struct hvm_hw_mtrr` (typecode 14), one per vCPU.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmHwMtrr {
        /// IA32_PAT.
        pub msr_pat_cr: u64,
        /// MTRRphysBase*n* at `2n`, MTRRphysMask*n* at `2n + 1`
        /// (MSRs 0x200..=0x20F in order).
        pub msr_mtrr_var: [u64; 2 * MTRR_VCNT],
        /// MSRs 0x250, 0x258, 0x259, 0x268..=0x26F in that order.
        pub msr_mtrr_fixed: [u64; NUM_FIXED_MSR],
        /// IA32_MTRRCAP.
        pub msr_mtrr_cap: u64,
        /// IA32_MTRR_DEF_TYPE.
        pub msr_mtrr_def_type: u64,
    }
}

layout_struct! {
    /// `struct hvm_tsc_adjust` (typecode 19), one per vCPU.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvmTscAdjust {
        /// IA32_TSC_ADJUST.
        pub tsc_adjust: u64,
    }
}

const _: () = assert!(size_of::<HvmHwMtrr>() == 8 * (1 + 16 + 11 + 2));
const _: () = assert!(offset_of!(HvmHwMtrr, msr_mtrr_var) == 8);
const _: () = assert!(offset_of!(HvmHwMtrr, msr_mtrr_fixed) == 136);
const _: () = assert!(offset_of!(HvmHwMtrr, msr_mtrr_cap) == 224);
const _: () = assert!(offset_of!(HvmHwMtrr, msr_mtrr_def_type) == 232);
const _: () = assert!(size_of::<HvmTscAdjust>() == 8);

/// Xen's log-dirty operations (`XEN_DOMCTL_SHADOW_OP_*`).
pub mod shadow_op {
    pub const OFF: u32 = 0;
    pub const ENABLE_LOGDIRTY: u32 = 2;
    pub const CLEAN: u32 = 11;
    pub const PEEK: u32 = 12;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_are_little_endian() {
        let h = HvmSaveHeader {
            magic: HVM_FILE_MAGIC,
            version: HVM_FILE_VERSION,
            changeset: 0x0102_0304_0506_0708,
            cpuid: 0x000a_0655,
            gtsc_khz: 2_000_000,
        };
        let b = h.as_bytes();
        assert_eq!(&b[0..8], &[0x86, 0x12, 0x38, 0x54, 1, 0, 0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(HvmSaveHeader::read_from_bytes(b).unwrap(), h);
    }

    #[test]
    fn typecode_names_are_xens() {
        let known = [
            (code::END, "END"),
            (code::HEADER, "HEADER"),
            (code::CPU, "CPU"),
            (code::IOAPIC, "IOAPIC"),
            (code::LAPIC, "LAPIC"),
            (code::LAPIC_REGS, "LAPIC_REGS"),
            (code::PIT, "PIT"),
            (code::RTC, "RTC"),
            (code::MTRR, "MTRR"),
            (code::TSC_ADJUST, "TSC_ADJUST"),
            (code::CPU_MSR, "CPU_MSR"),
        ];
        for (c, n) in known {
            assert_eq!(code::name(c), n);
        }
        // Every code up to HVM_SAVE_CODE_MAX (20) has its own name.
        for a in 0..=20u16 {
            assert_ne!(code::name(a), "unknown", "{a}");
            for b in 0..a {
                assert_ne!(code::name(a), code::name(b), "{a} and {b}");
            }
        }
        assert_eq!(code::name(21), "unknown");
        assert_eq!(code::name(u16::MAX), "unknown");
    }

    #[test]
    fn pit_record_bytes_follow_xens_order() {
        let mut p = HvmHwPit::new_zeroed();
        p.channels[2].count = 0x1_0000;
        p.channels[2].latched_count = 0xabcd;
        p.channels[2].mode = 3;
        p.channels[2].gate = 1;
        p.speaker_data_on = 1;
        let b = p.as_bytes();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[32..38], &[0, 0, 1, 0, 0xcd, 0xab]);
        assert_eq!((b[45], b[47], b[48]), (3, 1, 1));
        assert!(b[..32].iter().all(|&x| x == 0));
    }

    #[test]
    fn mtrr_record_bytes_follow_xens_order() {
        let mut m = HvmHwMtrr::new_zeroed();
        m.msr_pat_cr = 1;
        m.msr_mtrr_var[1] = 2; // mask of pair 0
        m.msr_mtrr_fixed[10] = 3; // 0x26F
        m.msr_mtrr_def_type = 4;
        let b = m.as_bytes();
        let at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!((at(0), at(16), at(216), at(232)), (1, 2, 3, 4));
        let t = HvmTscAdjust { tsc_adjust: 5 };
        assert_eq!(t.as_bytes(), &[5, 0, 0, 0, 0, 0, 0, 0]);
    }
}
