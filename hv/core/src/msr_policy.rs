//! What an intercepted RDMSR/WRMSR of a Linux guest does: every MSR the
//! guest may touch, as a table, and the per-vCPU state behind the
//! emulated ones.
//!
//! Three classes (`Class`):
//! - emulated: the value lives in `MsrState` (or, for APIC_BASE,
//!   TSC_DEADLINE and the x2APIC range, in the LAPIC model
//!   `crate::platform::lapic`, which `Read::Apic`/`Write::Apic` forward to); writes are checked as the CPU
//!   checks them and a bad value is refused with #GP;
//! - read-as-zero: reads give 0, writes are dropped (MSRs Linux reads or
//!   writes with the unchecked accessors on boot, whose content means
//!   nothing on this platform);
//! - refused: every MSR not in the table: #GP, which Linux's `*_safe`
//!   accessors and fault fix-ups expect.
//!
//! `crate::msr` decides which MSRs exit at all; this module decides what
//! an exit does. docs/KERNEL.md ("MSR policy") lists the table; a test
//! checks the two agree.

use doppel_abi::hvm::{HvmHwMtrr, HvmTscAdjust, MTRR_VCNT};

use crate::msr::Vendor;
use crate::platform::RecordError;

/// How an MSR is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Emulated,
    ReadZero,
    Refused,
}

impl Class {
    /// The word docs/KERNEL.md's table uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Emulated => "emulated",
            Class::ReadZero => "read-as-zero",
            Class::Refused => "refused",
        }
    }
}

/// Which CPU vendors a row applies to (the other vendor gets #GP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Only {
    Both,
    Intel,
    Amd,
}

/// One row of the policy: MSRs `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub first: u32,
    pub last: u32,
    pub name: &'static str,
    pub class: Class,
    pub only: Only,
}

/// MSR numbers (Intel SDM vol. 4; AMD APM vol. 2 app. A).
pub mod nr {
    pub use crate::msr::nr::*;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const TSC_ADJUST: u32 = 0x3b;
    pub const UCODE_REV: u32 = 0x8b;
    pub const MTRR_CAP: u32 = 0xfe;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_PHYS_LAST: u32 = 0x20f;
    pub const MTRR_FIX64K_00000: u32 = 0x250;
    pub const MTRR_FIX16K_80000: u32 = 0x258;
    pub const MTRR_FIX16K_A0000: u32 = 0x259;
    pub const MTRR_FIX4K_C0000: u32 = 0x268;
    pub const MTRR_FIX4K_F8000: u32 = 0x26f;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const TSC_DEADLINE: u32 = 0x6e0;
    pub const X2APIC_FIRST: u32 = 0x800;
    pub const X2APIC_LAST: u32 = 0x8ff;
    pub const AMD_SYSCFG: u32 = 0xc001_0010;
    pub const AMD_NB_CFG: u32 = 0xc001_001f;
    pub const AMD_HWCR: u32 = 0xc001_0015;
    pub const AMD_DE_CFG: u32 = 0xc001_1029;
}

use nr::*;

const fn row(first: u32, last: u32, name: &'static str, class: Class, only: Only) -> Row {
    Row {
        first,
        last,
        name,
        class,
        only,
    }
}

const fn emu(msr: u32, name: &'static str) -> Row {
    row(msr, msr, name, Class::Emulated, Only::Both)
}

/// The policy. MSRs absent from it are refused (#GP).
pub const POLICY: &[Row] = &[
    emu(TSC, "TSC (guest TSC = host TSC + offset)"),
    emu(APIC_BASE, "APIC_BASE (the LAPIC model)"),
    row(
        PLATFORM_ID,
        PLATFORM_ID,
        "PLATFORM_ID",
        Class::ReadZero,
        Only::Intel,
    ),
    row(
        FEATURE_CONTROL,
        FEATURE_CONTROL,
        "FEATURE_CONTROL (locked, VMX off; writes #GP)",
        Class::Emulated,
        Only::Intel,
    ),
    emu(TSC_ADJUST, "TSC_ADJUST (moves the TSC offset)"),
    row(
        UCODE_REV,
        UCODE_REV,
        "BIOS_SIGN_ID / PATCH_LEVEL (microcode revision)",
        Class::ReadZero,
        Only::Both,
    ),
    emu(MTRR_CAP, "MTRRcap (8 variable, fixed, WC; read-only)"),
    emu(SYSENTER_CS, "SYSENTER_CS"),
    emu(SYSENTER_ESP, "SYSENTER_ESP"),
    emu(SYSENTER_EIP, "SYSENTER_EIP"),
    row(
        MISC_ENABLE,
        MISC_ENABLE,
        "MISC_ENABLE (fast strings, BTS/PEBS unavailable; writes dropped)",
        Class::Emulated,
        Only::Intel,
    ),
    row(
        MTRR_PHYS_BASE0,
        MTRR_PHYS_LAST,
        "MTRRphysBase0..7 / MTRRphysMask0..7",
        Class::Emulated,
        Only::Both,
    ),
    emu(MTRR_FIX64K_00000, "MTRRfix64K_00000"),
    row(
        MTRR_FIX16K_80000,
        MTRR_FIX16K_A0000,
        "MTRRfix16K_80000 / _A0000",
        Class::Emulated,
        Only::Both,
    ),
    row(
        MTRR_FIX4K_C0000,
        MTRR_FIX4K_F8000,
        "MTRRfix4K_C0000 .. _F8000",
        Class::Emulated,
        Only::Both,
    ),
    emu(PAT, "PAT"),
    emu(MTRR_DEF_TYPE, "MTRRdefType"),
    emu(TSC_DEADLINE, "TSC_DEADLINE (the LAPIC model's timer)"),
    row(
        X2APIC_FIRST,
        X2APIC_LAST,
        "x2APIC registers (the LAPIC model)",
        Class::Emulated,
        Only::Both,
    ),
    emu(EFER, "EFER (SCE, LME, LMA, NXE)"),
    emu(STAR, "STAR"),
    emu(LSTAR, "LSTAR"),
    emu(CSTAR, "CSTAR"),
    emu(SFMASK, "SFMASK"),
    emu(FS_BASE, "FS_BASE"),
    emu(GS_BASE, "GS_BASE"),
    emu(KERNEL_GS_BASE, "KERNEL_GS_BASE"),
    row(AMD_SYSCFG, AMD_SYSCFG, "SYSCFG", Class::ReadZero, Only::Amd),
    row(AMD_HWCR, AMD_HWCR, "HWCR", Class::ReadZero, Only::Amd),
    row(AMD_NB_CFG, AMD_NB_CFG, "NB_CFG", Class::ReadZero, Only::Amd),
    row(AMD_DE_CFG, AMD_DE_CFG, "DE_CFG", Class::ReadZero, Only::Amd),
];

/// The row for `msr` on `vendor`, if any.
pub fn row_for(vendor: Vendor, msr: u32) -> Option<&'static Row> {
    POLICY.iter().find(|r| {
        (r.first..=r.last).contains(&msr)
            && match r.only {
                Only::Both => true,
                Only::Intel => vendor == Vendor::Vmx,
                Only::Amd => vendor == Vendor::Svm,
            }
    })
}

/// The class of `msr` on `vendor`.
pub fn classify(vendor: Vendor, msr: u32) -> Class {
    row_for(vendor, msr).map_or(Class::Refused, |r| r.class)
}

/// Why an access is refused: the hypervisor injects #GP and may print it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gp {
    /// Not in the policy (or not on this vendor).
    Unknown,
    /// A read-only MSR written.
    ReadOnly,
    /// Reserved bits set, a non-canonical address or an invalid memory
    /// type.
    BadValue,
}

/// What a read does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    Value(u64),
    /// APIC_BASE, TSC_DEADLINE or an x2APIC register: the caller asks the
    /// LAPIC model (`platform::lapic::Lapic::read_msr(msr, guest_tsc)`),
    /// whose refusal is a #GP too.
    Apic {
        msr: u32,
    },
    Gp(Gp),
}

/// What a write does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Done,
    /// For the LAPIC model (`Lapic::write_msr(msr, value, guest_tsc)`).
    Apic {
        msr: u32,
        value: u64,
    },
    Gp(Gp),
}

pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// MTRRcap: VCNT = 8, FIX, WC; no SMRR.
pub const MTRR_CAP_VALUE: u64 = 8 | (1 << 8) | (1 << 10);
/// MTRRdefType at reset, as firmware leaves it: MTRRs enabled (E), fixed
/// ranges disabled, default type write-back.
pub const MTRR_DEF_TYPE_RESET: u64 = (1 << 11) | 6;
/// PAT at reset (SDM: WB, WT, UC-, UC, repeated).
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// MISC_ENABLE: fast strings (0), BTS unavailable (11), PEBS unavailable (12).
pub const MISC_ENABLE_VALUE: u64 = 1 | (1 << 11) | (1 << 12);
/// FEATURE_CONTROL: locked, VMX disabled in and outside SMX.
pub const FEATURE_CONTROL_VALUE: u64 = 1;

/// The emulated MSRs of one vCPU.
///
/// # What travels where across a save and restore
///
/// Xen's records carry all of it; nothing Linux relies on is left out:
///
/// | state | record |
/// |---|---|
/// | `efer`, `star`, `lstar`, `cstar`, `sfmask`, `sysenter_*`, `kernel_gs_base` | CPU (`msr_efer`, `msr_star`, ..., `shadow_gs`, through [`crate::hvm::VcpuState`]) |
/// | `fs_base`, `gs_base` | CPU (`fs_base`, `gs_base`: the segment bases) |
/// | `tsc_offset` | CPU (`tsc`, the guest's TSC at the save; [`MsrState::restore_guest_tsc`] turns it back into an offset for the new host TSC) |
/// | `tsc_adjust` | TSC_ADJUST ([`MsrState::save_tsc_adjust`] / [`MsrState::restore_tsc_adjust`]) |
/// | `pat`, `mtrr_def_type`, `mtrr_fixed`, `mtrr_var` | MTRR ([`MsrState::save_mtrr`] / [`MsrState::restore_mtrr`]; `msr_mtrr_cap` is [`MTRR_CAP_VALUE`]) |
/// | `phys_bits` | none: the platform's (CPUID), the same on both hosts |
///
/// Constant MSRs travel nowhere: MTRRcap, MISC_ENABLE, FEATURE_CONTROL and
/// the read-as-zero rows read the same on any host. APIC_BASE,
/// TSC_DEADLINE and the x2APIC registers are the LAPIC model's (LAPIC and
/// LAPIC_REGS records). TSC_AUX is refused (no RDTSCP), so the CPU
/// record's `msr_tsc_aux` stays 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsrState {
    /// Guest-physical address width (CPUID 0x8000_0008 EAX[7:0]): bits
    /// above it in MTRR base/mask are reserved.
    pub phys_bits: u8,
    pub efer: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    /// Guest TSC = host TSC + `tsc_offset` (wrapping).
    pub tsc_offset: u64,
    pub tsc_adjust: u64,
    pub pat: u64,
    pub mtrr_def_type: u64,
    /// 0x250, 0x258, 0x259, 0x268..=0x26F in that order.
    pub mtrr_fixed: [u64; 11],
    /// (base, mask) of 0x200/0x201 .. 0x20E/0x20F.
    pub mtrr_var: [(u64, u64); 8],
}

fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// A memory type valid in an MTRR (UC, WC, WT, WP, WB).
fn mtrr_type(t: u64) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6)
}

/// A memory type valid in the PAT (MTRR types plus UC-).
fn pat_type(t: u64) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6 | 7)
}

/// A PAT value whose eight entries are all valid types.
fn pat_ok(v: u64) -> bool {
    (0..8).all(|i| pat_type((v >> (8 * i)) & 0xff))
}

/// An MTRRdefType value: type, FE (10) and E (11) only.
fn def_type_ok(v: u64) -> bool {
    v & !0xcff == 0 && mtrr_type(v & 0xff)
}

/// A fixed-range MTRR value: eight valid memory types.
fn fixed_ok(v: u64) -> bool {
    (0..8).all(|b| mtrr_type((v >> (8 * b)) & 0xff))
}

/// A variable-range MTRR base (`is_base`) or mask for `phys_bits`.
fn var_ok(phys_bits: u8, is_base: bool, v: u64) -> bool {
    let reserved = (!((1u64 << phys_bits) - 1)) | if is_base { 0xf00 } else { 0x7ff };
    v & reserved == 0 && (!is_base || mtrr_type(v & 0xff))
}

fn fixed_index(msr: u32) -> Option<usize> {
    match msr {
        MTRR_FIX64K_00000 => Some(0),
        MTRR_FIX16K_80000 => Some(1),
        MTRR_FIX16K_A0000 => Some(2),
        MTRR_FIX4K_C0000..=MTRR_FIX4K_F8000 => Some(3 + (msr - MTRR_FIX4K_C0000) as usize),
        _ => None,
    }
}

impl MsrState {
    /// The state at the PVH entry (32-bit protected mode, paging off).
    pub fn new(phys_bits: u8) -> Self {
        MsrState {
            phys_bits: phys_bits.clamp(32, 52),
            efer: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            fs_base: 0,
            gs_base: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            tsc_offset: 0,
            tsc_adjust: 0,
            pat: PAT_RESET,
            mtrr_def_type: MTRR_DEF_TYPE_RESET,
            mtrr_fixed: [0x0606_0606_0606_0606; 11],
            mtrr_var: [(0, 0); 8],
        }
    }

    /// The guest's TSC now, for a host TSC of `host_tsc`.
    pub fn guest_tsc(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add(self.tsc_offset)
    }

    /// RDMSR `msr` on `vendor`, with the host TSC read at the exit.
    pub fn read(&self, vendor: Vendor, msr: u32, host_tsc: u64) -> Read {
        let Some(row) = row_for(vendor, msr) else {
            return Read::Gp(Gp::Unknown);
        };
        if row.class == Class::ReadZero {
            return Read::Value(0);
        }
        Read::Value(match msr {
            TSC => self.guest_tsc(host_tsc),
            FEATURE_CONTROL => FEATURE_CONTROL_VALUE,
            TSC_ADJUST => self.tsc_adjust,
            MTRR_CAP => MTRR_CAP_VALUE,
            SYSENTER_CS => self.sysenter_cs,
            SYSENTER_ESP => self.sysenter_esp,
            SYSENTER_EIP => self.sysenter_eip,
            MISC_ENABLE => MISC_ENABLE_VALUE,
            MTRR_PHYS_BASE0..=MTRR_PHYS_LAST => {
                let (base, mask) = self.mtrr_var[((msr - MTRR_PHYS_BASE0) / 2) as usize];
                if msr & 1 == 0 {
                    base
                } else {
                    mask
                }
            }
            PAT => self.pat,
            MTRR_DEF_TYPE => self.mtrr_def_type,
            APIC_BASE | TSC_DEADLINE | X2APIC_FIRST..=X2APIC_LAST => return Read::Apic { msr },
            EFER => self.efer,
            STAR => self.star,
            LSTAR => self.lstar,
            CSTAR => self.cstar,
            SFMASK => self.sfmask,
            FS_BASE => self.fs_base,
            GS_BASE => self.gs_base,
            KERNEL_GS_BASE => self.kernel_gs_base,
            _ => match fixed_index(msr) {
                Some(i) => self.mtrr_fixed[i],
                // A row without a handler would be a bug in this table;
                // refuse rather than invent a value.
                None => return Read::Gp(Gp::Unknown),
            },
        })
    }

    /// WRMSR `msr` = `value` on `vendor`, with the host TSC read at the
    /// exit. A refused write changes nothing.
    pub fn write(&mut self, vendor: Vendor, msr: u32, value: u64, host_tsc: u64) -> Write {
        let Some(row) = row_for(vendor, msr) else {
            return Write::Gp(Gp::Unknown);
        };
        if row.class == Class::ReadZero {
            return Write::Done;
        }
        let bad = Write::Gp(Gp::BadValue);
        match msr {
            TSC => {
                // SDM: a write to the TSC also moves TSC_ADJUST by as much.
                let old = self.guest_tsc(host_tsc);
                self.tsc_adjust = self.tsc_adjust.wrapping_add(value.wrapping_sub(old));
                self.tsc_offset = value.wrapping_sub(host_tsc);
            }
            TSC_ADJUST => {
                self.tsc_offset = self
                    .tsc_offset
                    .wrapping_add(value.wrapping_sub(self.tsc_adjust));
                self.tsc_adjust = value;
            }
            APIC_BASE | TSC_DEADLINE | X2APIC_FIRST..=X2APIC_LAST => {
                return Write::Apic { msr, value };
            }
            FEATURE_CONTROL | MTRR_CAP => return Write::Gp(Gp::ReadOnly),
            // Writable bits on hardware (e.g. fast strings, limit CPUID)
            // are dropped: the value stays the one the platform promises.
            MISC_ENABLE => {}
            SYSENTER_CS => {
                if value >> 32 != 0 {
                    return bad;
                }
                self.sysenter_cs = value;
            }
            SYSENTER_ESP | SYSENTER_EIP | LSTAR | CSTAR | FS_BASE | GS_BASE | KERNEL_GS_BASE => {
                if !canonical(value) {
                    return bad;
                }
                *match msr {
                    SYSENTER_ESP => &mut self.sysenter_esp,
                    SYSENTER_EIP => &mut self.sysenter_eip,
                    LSTAR => &mut self.lstar,
                    CSTAR => &mut self.cstar,
                    FS_BASE => &mut self.fs_base,
                    GS_BASE => &mut self.gs_base,
                    _ => &mut self.kernel_gs_base,
                } = value;
            }
            STAR => self.star = value,
            SFMASK => {
                if value >> 32 != 0 {
                    return bad;
                }
                self.sfmask = value;
            }
            EFER => {
                if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                    return bad;
                }
                // LMA is the CPU's: writes keep the current value.
                self.efer = (value & !EFER_LMA) | (self.efer & EFER_LMA);
            }
            PAT => {
                if !pat_ok(value) {
                    return bad;
                }
                self.pat = value;
            }
            MTRR_DEF_TYPE => {
                if !def_type_ok(value) {
                    return bad;
                }
                self.mtrr_def_type = value;
            }
            MTRR_PHYS_BASE0..=MTRR_PHYS_LAST => {
                let pair = &mut self.mtrr_var[((msr - MTRR_PHYS_BASE0) / 2) as usize];
                // Even MSRs are bases, odd ones masks.
                let is_base = msr & 1 == 0;
                if !var_ok(self.phys_bits, is_base, value) {
                    return bad;
                }
                if is_base {
                    pair.0 = value;
                } else {
                    pair.1 = value;
                }
            }
            _ => match fixed_index(msr) {
                Some(i) => {
                    if !fixed_ok(value) {
                        return bad;
                    }
                    self.mtrr_fixed[i] = value;
                }
                None => return Write::Gp(Gp::Unknown),
            },
        }
        Write::Done
    }

    /// Xen's MTRR record (typecode 14): PAT, the MTRRs and MTRRcap.
    pub fn save_mtrr(&self) -> HvmHwMtrr {
        let mut var = [0u64; 2 * MTRR_VCNT];
        for (pair, (base, mask)) in var.chunks_exact_mut(2).zip(self.mtrr_var) {
            pair.copy_from_slice(&[base, mask]);
        }
        HvmHwMtrr {
            msr_pat_cr: self.pat,
            msr_mtrr_var: var,
            msr_mtrr_fixed: self.mtrr_fixed,
            msr_mtrr_cap: MTRR_CAP_VALUE,
            msr_mtrr_def_type: self.mtrr_def_type,
        }
    }

    /// Take PAT and the MTRRs from Xen's MTRR record, each value checked
    /// as a guest WRMSR of it would be. MTRRcap must be ours
    /// ([`MTRR_CAP_VALUE`]): the guest sized its MTRR code by it. A bad
    /// value is an error naming the field; then nothing changes.
    pub fn restore_mtrr(&mut self, rec: &HvmHwMtrr) -> Result<(), RecordError> {
        if rec.msr_mtrr_cap != MTRR_CAP_VALUE {
            return Err(RecordError::new("msr_mtrr_cap", rec.msr_mtrr_cap));
        }
        if !pat_ok(rec.msr_pat_cr) {
            return Err(RecordError::new("msr_pat_cr", rec.msr_pat_cr));
        }
        if !def_type_ok(rec.msr_mtrr_def_type) {
            return Err(RecordError::new("msr_mtrr_def_type", rec.msr_mtrr_def_type));
        }
        if let Some(&v) = rec.msr_mtrr_fixed.iter().find(|&&v| !fixed_ok(v)) {
            return Err(RecordError::new("msr_mtrr_fixed", v));
        }
        let mut var = [(0u64, 0u64); MTRR_VCNT];
        for (i, slot) in var.iter_mut().enumerate() {
            let (base, mask) = (rec.msr_mtrr_var[2 * i], rec.msr_mtrr_var[2 * i + 1]);
            if !var_ok(self.phys_bits, true, base) {
                return Err(RecordError::new("msr_mtrr_var (base)", base));
            }
            if !var_ok(self.phys_bits, false, mask) {
                return Err(RecordError::new("msr_mtrr_var (mask)", mask));
            }
            *slot = (base, mask);
        }
        self.pat = rec.msr_pat_cr;
        self.mtrr_def_type = rec.msr_mtrr_def_type;
        self.mtrr_fixed = rec.msr_mtrr_fixed;
        self.mtrr_var = var;
        Ok(())
    }

    /// Xen's TSC_ADJUST record (typecode 19).
    pub fn save_tsc_adjust(&self) -> HvmTscAdjust {
        HvmTscAdjust {
            tsc_adjust: self.tsc_adjust,
        }
    }

    /// Take IA32_TSC_ADJUST from Xen's record. Only the MSR's value
    /// changes, not the guest's TSC (as Xen's `hvm_load_tsc_adjust`): the
    /// TSC itself comes from the CPU record, through
    /// [`Self::restore_guest_tsc`]. Every value is valid.
    pub fn restore_tsc_adjust(&mut self, rec: &HvmTscAdjust) {
        self.tsc_adjust = rec.tsc_adjust;
    }

    /// Make the guest's TSC read `guest_tsc` at host TSC `host_tsc`
    /// without moving TSC_ADJUST: the restore of the CPU record's `tsc`
    /// (a guest WRMSR to the TSC moves TSC_ADJUST, a restore does not).
    pub fn restore_guest_tsc(&mut self, guest_tsc: u64, host_tsc: u64) {
        self.tsc_offset = guest_tsc.wrapping_sub(host_tsc);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    const V: [Vendor; 2] = [Vendor::Svm, Vendor::Vmx];

    fn value(r: Read) -> u64 {
        match r {
            Read::Value(v) => v,
            other => panic!("expected a value, got {other:?}"),
        }
    }

    #[test]
    fn rows_do_not_overlap_and_every_emulated_msr_has_a_handler() {
        for (i, a) in POLICY.iter().enumerate() {
            assert!(a.first <= a.last, "{}", a.name);
            for b in &POLICY[i + 1..] {
                assert!(
                    a.last < b.first || b.last < a.first,
                    "{} overlaps {}",
                    a.name,
                    b.name
                );
            }
        }
        let s = MsrState::new(40);
        for vendor in V {
            for r in POLICY.iter().filter(|r| r.class != Class::Refused) {
                for msr in r.first..=r.last {
                    if row_for(vendor, msr).is_some() {
                        assert!(
                            !matches!(s.read(vendor, msr, 0), Read::Gp(_)),
                            "{msr:#x} on {vendor:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn syscall_and_segment_msrs_hold_what_is_written() {
        for vendor in V {
            let mut s = MsrState::new(40);
            for (msr, v) in [
                (STAR, 0x0023_0010_0000_0000),
                (LSTAR, 0xffff_ffff_8100_0000),
                (CSTAR, 0xffff_ffff_8100_1000),
                (SFMASK, 0x4_7700),
                (FS_BASE, 0x7fff_1234_5000),
                (GS_BASE, 0xffff_8880_0000_0000),
                (KERNEL_GS_BASE, 0x1000),
                (SYSENTER_CS, 0x10),
                (SYSENTER_ESP, 0xffff_fe00_0000_0000),
                (SYSENTER_EIP, 0xffff_ffff_8100_2000),
            ] {
                assert_eq!(s.write(vendor, msr, v, 0), Write::Done, "{msr:#x}");
                assert_eq!(value(s.read(vendor, msr, 0)), v, "{msr:#x}");
            }
            // Non-canonical addresses and reserved bits: #GP, state kept.
            for msr in [
                LSTAR,
                CSTAR,
                FS_BASE,
                GS_BASE,
                KERNEL_GS_BASE,
                SYSENTER_EIP,
                SYSENTER_ESP,
            ] {
                let before = s.clone();
                assert_eq!(
                    s.write(vendor, msr, 0x0000_8000_0000_0000, 0),
                    Write::Gp(Gp::BadValue)
                );
                assert_eq!(s, before);
            }
            assert_eq!(s.write(vendor, SFMASK, 1 << 32, 0), Write::Gp(Gp::BadValue));
            assert_eq!(
                s.write(vendor, SYSENTER_CS, 1 << 32, 0),
                Write::Gp(Gp::BadValue)
            );
        }
    }

    #[test]
    fn efer_takes_known_bits_and_keeps_lma() {
        let mut s = MsrState::new(40);
        let v = EFER_SCE | EFER_LME | EFER_NXE;
        assert_eq!(s.write(Vendor::Svm, EFER, v | EFER_LMA, 0), Write::Done);
        assert_eq!(s.efer, v, "LMA is not the guest's to set");
        s.efer |= EFER_LMA;
        assert_eq!(s.write(Vendor::Svm, EFER, v, 0), Write::Done);
        assert_eq!(s.efer, v | EFER_LMA, "nor to clear");
        // SVME (12), FFXSR (14), LMSLE (13), reserved: #GP.
        for b in [12, 13, 14, 1, 63] {
            assert_eq!(
                s.write(Vendor::Vmx, EFER, v | (1 << b), 0),
                Write::Gp(Gp::BadValue),
                "bit {b}"
            );
        }
    }

    #[test]
    fn tsc_offset_adjust_and_deadline() {
        let mut s = MsrState::new(40);
        assert_eq!(value(s.read(Vendor::Vmx, TSC, 1000)), 1000);
        // Guest sets its TSC to 5000 when the host reads 1000.
        assert_eq!(s.write(Vendor::Vmx, TSC, 5000, 1000), Write::Done);
        assert_eq!(
            value(s.read(Vendor::Vmx, TSC, 1500)),
            5500,
            "runs with the host"
        );
        assert_eq!(
            value(s.read(Vendor::Vmx, TSC_ADJUST, 0)),
            4000,
            "TSC write moves TSC_ADJUST"
        );
        // TSC_ADJUST back to 0 moves the TSC back by 4000.
        assert_eq!(s.write(Vendor::Vmx, TSC_ADJUST, 0, 2000), Write::Done);
        assert_eq!(value(s.read(Vendor::Vmx, TSC, 2000)), 2000);
        // Going backwards wraps instead of panicking.
        assert_eq!(s.write(Vendor::Svm, TSC, 0, u64::MAX), Write::Done);
        assert_eq!(value(s.read(Vendor::Svm, TSC, u64::MAX)), 0);
    }

    /// APIC_BASE, TSC_DEADLINE and the x2APIC range go to the LAPIC model
    /// untouched, and the model takes what the policy forwards.
    #[test]
    fn apic_msrs_go_to_the_lapic_model() {
        use crate::platform::lapic::Lapic;
        let mut s = MsrState::new(40);
        let before = s.clone();
        for vendor in V {
            for msr in [APIC_BASE, TSC_DEADLINE, 0x800, 0x802, 0x80b, 0x838, 0x8ff] {
                assert_eq!(s.read(vendor, msr, 0), Read::Apic { msr }, "{msr:#x}");
                assert_eq!(
                    s.write(vendor, msr, 77, 0),
                    Write::Apic { msr, value: 77 },
                    "{msr:#x}"
                );
            }
        }
        assert_eq!(s, before, "no APIC state kept here");
        let mut lapic = Lapic::new(0, true, 1);
        assert_eq!(
            lapic.read_msr(APIC_BASE, 0),
            Ok(0xfee0_0d00),
            "x2APIC enabled, BSP"
        );
        assert_eq!(lapic.read_msr(0x802, 0), Ok(0), "APIC ID");
        // SVR enabled, LVT timer in TSC-deadline mode, then a deadline.
        assert!(lapic.write_msr(0x80f, 0x1ff, 0).is_ok());
        assert!(lapic.write_msr(0x832, (2 << 17) | 0xec, 0).is_ok());
        assert!(lapic.write_msr(TSC_DEADLINE, 1000, 0).is_ok());
        assert_eq!(lapic.read_msr(TSC_DEADLINE, 0), Ok(1000));
        // Every forwarded x2APIC MSR: the model answers or refuses (#GP),
        // never panics.
        for msr in X2APIC_FIRST..=X2APIC_LAST {
            assert_eq!(s.read(Vendor::Vmx, msr, 0), Read::Apic { msr });
            let _ = lapic.read_msr(msr, 0);
            let _ = lapic.write_msr(msr, u64::MAX, 0);
        }
    }

    #[test]
    fn mtrrs_and_pat_as_linux_reads_them() {
        let mut s = MsrState::new(40);
        let vendor = Vendor::Svm;
        assert_eq!(value(s.read(vendor, MTRR_CAP, 0)), 0x508, "VCNT 8, FIX, WC");
        assert_eq!(s.write(vendor, MTRR_CAP, 0, 0), Write::Gp(Gp::ReadOnly));
        assert_eq!(
            value(s.read(vendor, MTRR_DEF_TYPE, 0)),
            0x806,
            "enabled, WB"
        );
        assert_eq!(value(s.read(vendor, PAT, 0)), 0x0007_0406_0007_0406);
        // Linux's PAT: WB, WC, UC-, UC, WB, WP, UC-, WT.
        assert_eq!(s.write(vendor, PAT, 0x0407_0501_0007_0106, 0), Write::Done);
        assert_eq!(
            s.write(vendor, PAT, 0x0000_0000_0000_0002, 0),
            Write::Gp(Gp::BadValue),
            "type 2"
        );
        assert_eq!(
            s.write(vendor, PAT, 0x0800_0000_0000_0000, 0),
            Write::Gp(Gp::BadValue),
            "type 8"
        );
        assert_eq!(s.pat, 0x0407_0501_0007_0106);
        // Variable range 3: 0x8000_0000 size 1 GiB UC.
        assert_eq!(s.write(vendor, 0x206, 0x8000_0000, 0), Write::Done);
        assert_eq!(s.write(vendor, 0x207, 0xff_c000_0800, 0), Write::Done);
        assert_eq!(
            (
                value(s.read(vendor, 0x206, 0)),
                value(s.read(vendor, 0x207, 0))
            ),
            (0x8000_0000, 0xff_c000_0800)
        );
        assert_eq!(s.mtrr_var[3], (0x8000_0000, 0xff_c000_0800));
        assert_eq!(
            s.write(vendor, 0x206, 1 << 40, 0),
            Write::Gp(Gp::BadValue),
            "above phys_bits"
        );
        assert_eq!(
            s.write(vendor, 0x206, 0x8000_0002, 0),
            Write::Gp(Gp::BadValue),
            "type 2"
        );
        assert_eq!(
            s.write(vendor, 0x207, 0x8000_0001, 0),
            Write::Gp(Gp::BadValue),
            "mask reserved bit"
        );
        // Fixed ranges: 11 MSRs, each 8 memory types.
        let fixed = [
            0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
        ];
        for (i, msr) in fixed.into_iter().enumerate() {
            assert_eq!(value(s.read(vendor, msr, 0)), 0x0606_0606_0606_0606);
            let v = 0x0001_0405_0600_0104 + i as u64;
            let v = (v & !0xff) | 0x06;
            assert_eq!(s.write(vendor, msr, v, 0), Write::Done, "{msr:#x}");
            assert_eq!(s.mtrr_fixed[i], v);
            assert_eq!(
                s.write(vendor, msr, 0x07, 0),
                Write::Gp(Gp::BadValue),
                "UC- not in MTRRs"
            );
        }
        assert_eq!(
            classify(vendor, 0x251),
            Class::Refused,
            "gap between fixed MTRRs"
        );
        assert_eq!(
            s.write(vendor, MTRR_DEF_TYPE, 0xc06, 0),
            Write::Done,
            "E|FE|WB"
        );
        assert_eq!(
            s.write(vendor, MTRR_DEF_TYPE, 0x1006, 0),
            Write::Gp(Gp::BadValue)
        );
    }

    #[test]
    fn vendor_specific_rows() {
        let mut s = MsrState::new(40);
        assert_eq!(value(s.read(Vendor::Vmx, MISC_ENABLE, 0)), 0x1801);
        assert_eq!(s.write(Vendor::Vmx, MISC_ENABLE, 0, 0), Write::Done);
        assert_eq!(
            value(s.read(Vendor::Vmx, MISC_ENABLE, 0)),
            0x1801,
            "writes dropped"
        );
        assert_eq!(
            s.read(Vendor::Svm, MISC_ENABLE, 0),
            Read::Gp(Gp::Unknown),
            "no MISC_ENABLE on AMD"
        );
        assert_eq!(
            value(s.read(Vendor::Vmx, FEATURE_CONTROL, 0)),
            1,
            "locked, VMX off"
        );
        assert_eq!(
            s.write(Vendor::Vmx, FEATURE_CONTROL, 5, 0),
            Write::Gp(Gp::ReadOnly)
        );
        assert_eq!(
            s.read(Vendor::Svm, FEATURE_CONTROL, 0),
            Read::Gp(Gp::Unknown)
        );
        assert_eq!(classify(Vendor::Svm, AMD_HWCR), Class::ReadZero);
        assert_eq!(classify(Vendor::Vmx, AMD_HWCR), Class::Refused);
        assert_eq!(classify(Vendor::Vmx, PLATFORM_ID), Class::ReadZero);
        assert_eq!(classify(Vendor::Svm, PLATFORM_ID), Class::Refused);
    }

    #[test]
    fn read_as_zero_class() {
        let mut s = MsrState::new(40);
        for (vendor, msr) in [
            (Vendor::Vmx, UCODE_REV),
            (Vendor::Svm, UCODE_REV),
            (Vendor::Svm, AMD_DE_CFG),
            (Vendor::Svm, AMD_HWCR),
            (Vendor::Svm, AMD_SYSCFG),
            (Vendor::Svm, AMD_NB_CFG),
            (Vendor::Vmx, PLATFORM_ID),
        ] {
            let before = s.clone();
            assert_eq!(s.write(vendor, msr, u64::MAX, 0), Write::Done, "{msr:#x}");
            assert_eq!(s, before, "write dropped");
            assert_eq!(s.read(vendor, msr, 0), Read::Value(0));
        }
    }

    #[test]
    fn refused_class() {
        let mut s = MsrState::new(40);
        // What a guest must not reach: virtualization control, speculation
        // control (hidden in CPUID), PMU, MCA, TSC_AUX (no RDTSCP), XSS.
        for msr in [
            VM_HSAVE_PA,
            0xc001_0114, // VM_CR
            0x480,       // VMX_BASIC
            0x48,        // SPEC_CTRL
            0x49,        // PRED_CMD
            0x10a,       // ARCH_CAPABILITIES
            0x186,       // PERFEVTSEL0
            0xc001_0000, // K7 PERF_CTL0
            0x179,       // MCG_CAP
            0x1d9,       // DEBUGCTL
            0xc000_0103, // TSC_AUX
            0xda0,       // XSS
            0x9ff,       // just past the x2APIC range
            0x4b56_4d00, // KVM PV MSRs (no PV features shown)
            0xffff_ffff,
        ] {
            for vendor in V {
                assert_eq!(classify(vendor, msr), Class::Refused, "{msr:#x}");
                let before = s.clone();
                assert_eq!(s.read(vendor, msr, 0), Read::Gp(Gp::Unknown), "{msr:#x}");
                assert_eq!(
                    s.write(vendor, msr, 0, 0),
                    Write::Gp(Gp::Unknown),
                    "{msr:#x}"
                );
                assert_eq!(s, before);
            }
        }
    }

    /// A state with every MTRR and PAT changed by guest writes.
    fn programmed() -> MsrState {
        let mut s = MsrState::new(40);
        let v = Vendor::Vmx;
        assert_eq!(s.write(v, PAT, 0x0407_0501_0007_0106, 0), Write::Done);
        assert_eq!(s.write(v, MTRR_DEF_TYPE, 0xc00, 0), Write::Done);
        for i in 0..8u32 {
            let base = (0x1000_0000 * u64::from(i)) | [0, 1, 4, 5, 6][i as usize % 5];
            let mask = 0xff_f000_0800 - 0x1000 * u64::from(i);
            assert_eq!(s.write(v, 0x200 + 2 * i, base, 0), Write::Done);
            assert_eq!(s.write(v, 0x201 + 2 * i, mask, 0), Write::Done);
        }
        for (i, msr) in [0x250, 0x258, 0x259, 0x26a, 0x26f].into_iter().enumerate() {
            let t = [0u64, 1, 4, 5, 6][i];
            assert_eq!(s.write(v, msr, t * 0x0101_0101_0101_0101, 0), Write::Done);
        }
        s
    }

    #[test]
    fn mtrr_record_round_trips_in_xens_layout() {
        let s = programmed();
        let rec = s.save_mtrr();
        // Xen's layout: PAT, then base/mask pairs in MSR order, fixed
        // ranges in MSR order, MTRRcap, MTRRdefType.
        assert_eq!(rec.msr_pat_cr, 0x0407_0501_0007_0106);
        assert_eq!(rec.msr_mtrr_var[6], s.mtrr_var[3].0);
        assert_eq!(rec.msr_mtrr_var[7], s.mtrr_var[3].1);
        assert_eq!(rec.msr_mtrr_fixed[5], 0x0505_0505_0505_0505, "0x26A");
        assert_eq!(rec.msr_mtrr_cap, 0x508);
        assert_eq!(rec.msr_mtrr_def_type, 0xc00);
        let mut t = MsrState::new(40);
        assert_ne!(t, s);
        assert_eq!(t.restore_mtrr(&rec), Ok(()));
        assert_eq!(t, s, "the MTRR record is all of the MTRR/PAT state");
        assert_eq!(t.save_mtrr(), rec);
        // What the guest reads back after the restore.
        for msr in [PAT, MTRR_DEF_TYPE, 0x200, 0x20f, 0x250, 0x26f] {
            assert_eq!(
                t.read(Vendor::Svm, msr, 0),
                s.read(Vendor::Svm, msr, 0),
                "{msr:#x}"
            );
        }
    }

    #[test]
    fn mtrr_restore_refuses_what_a_guest_write_would_and_names_it() {
        let good = programmed().save_mtrr();
        type Spoil = fn(&mut HvmHwMtrr);
        let cases: [(&str, Spoil); 8] = [
            ("msr_mtrr_cap", |r| r.msr_mtrr_cap = 0x50a),
            ("msr_pat_cr", |r| r.msr_pat_cr = 0x0200),
            ("msr_mtrr_def_type", |r| r.msr_mtrr_def_type = 0x1006),
            ("msr_mtrr_def_type", |r| r.msr_mtrr_def_type = 0x807),
            ("msr_mtrr_fixed", |r| r.msr_mtrr_fixed[10] = 0x07),
            ("msr_mtrr_var (base)", |r| r.msr_mtrr_var[4] = 1 << 40),
            ("msr_mtrr_var (base)", |r| r.msr_mtrr_var[14] = 0x2),
            ("msr_mtrr_var (mask)", |r| r.msr_mtrr_var[15] = 0x801),
        ];
        for (field, spoil) in cases {
            let mut rec = good;
            spoil(&mut rec);
            let mut t = MsrState::new(40);
            let before = t.clone();
            let e = t.restore_mtrr(&rec).expect_err(field);
            assert_eq!(e.field, field);
            assert_eq!(t, before, "{field}: nothing restored");
        }
        // A wider guest-physical space takes what a 40-bit one refuses.
        let mut rec = good;
        rec.msr_mtrr_var[4] = 1 << 40;
        assert_eq!(MsrState::new(48).restore_mtrr(&rec), Ok(()));
    }

    #[test]
    fn tsc_and_tsc_adjust_survive_a_move_to_another_host() {
        let v = Vendor::Vmx;
        let mut s = MsrState::new(40);
        // The guest sets its TSC (moving TSC_ADJUST), then runs on.
        assert_eq!(s.write(v, TSC, 1_000_000, 500), Write::Done);
        let adjust = value(s.read(v, TSC_ADJUST, 0));
        assert_eq!(adjust, 999_500);
        // Saved at host TSC 2000: the CPU record's `tsc` and TSC_ADJUST.
        let guest_tsc = s.guest_tsc(2000);
        let rec = s.save_tsc_adjust();
        assert_eq!(rec.tsc_adjust, adjust);
        // Restored on a host whose TSC reads 7_000_000.
        let mut t = MsrState::new(40);
        t.restore_tsc_adjust(&rec);
        t.restore_guest_tsc(guest_tsc, 7_000_000);
        assert_eq!(value(t.read(v, TSC, 7_000_000)), guest_tsc, "no jump");
        assert_eq!(value(t.read(v, TSC, 7_000_100)), guest_tsc + 100);
        assert_eq!(
            value(t.read(v, TSC_ADJUST, 0)),
            adjust,
            "a restore is not a guest write"
        );
        // Order does not matter, and a later guest write still moves both.
        let mut u = MsrState::new(40);
        u.restore_guest_tsc(guest_tsc, 7_000_000);
        u.restore_tsc_adjust(&rec);
        assert_eq!(u, t);
        assert_eq!(u.write(v, TSC_ADJUST, adjust + 10, 0), Write::Done);
        assert_eq!(value(u.read(v, TSC, 7_000_000)), guest_tsc + 10);
    }

    /// The table rows of the markdown section titled `heading`, split into
    /// trimmed cells (header and separator rows dropped).
    pub(crate) fn doc_table(doc: &str, heading: &str) -> Vec<Vec<String>> {
        let start = doc
            .find(heading)
            .unwrap_or_else(|| panic!("{heading} missing from docs/KERNEL.md"));
        doc[start..]
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    }

    fn hex(s: &str) -> u32 {
        u32::from_str_radix(s.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("bad number {s:?}"))
    }

    /// docs/KERNEL.md's MSR table lists exactly the policy's rows, with
    /// the same numbers, class and vendors.
    #[test]
    fn doc_table_matches_policy() {
        let doc = include_str!("../../../docs/KERNEL.md");
        let mut rows: Vec<(u32, u32, String, String)> = doc_table(doc, "### MSR policy")
            .iter()
            .map(|c| {
                let (first, last) = match c[1].split_once('-') {
                    Some((a, b)) => (hex(a), hex(b)),
                    None => (hex(&c[1]), hex(&c[1])),
                };
                (first, last, c[2].clone(), c[3].clone())
            })
            .collect();
        let mut code: Vec<(u32, u32, String, String)> = POLICY
            .iter()
            .map(|r| {
                let only = match r.only {
                    Only::Both => "both",
                    Only::Intel => "intel",
                    Only::Amd => "amd",
                };
                (
                    r.first,
                    r.last,
                    r.class.as_str().to_string(),
                    only.to_string(),
                )
            })
            .collect();
        rows.sort();
        code.sort();
        assert_eq!(
            rows, code,
            "docs/KERNEL.md MSR policy table vs msr_policy::POLICY"
        );
    }

    proptest! {
        /// Any MSR, any value: no panic; a refused write changes nothing;
        /// a class outside the table is refused.
        #[test]
        fn any_access_is_total(msr in prop_oneof![any::<u32>(), 0u32..0x1000, 0xc000_0000u32..0xc000_0200], value in any::<u64>(), tsc in any::<u64>(), amd in any::<bool>()) {
            let vendor = if amd { Vendor::Svm } else { Vendor::Vmx };
            let mut s = MsrState::new(40);
            let before = s.clone();
            let r = s.read(vendor, msr, tsc);
            let w = s.write(vendor, msr, value, tsc);
            if classify(vendor, msr) == Class::Refused {
                prop_assert_eq!(r, Read::Gp(Gp::Unknown));
                prop_assert_eq!(w, Write::Gp(Gp::Unknown));
            }
            if matches!(w, Write::Gp(_)) {
                prop_assert_eq!(s, before);
            }
        }
    }
}
