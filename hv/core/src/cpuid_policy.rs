//! What CPUID tells a Linux guest: an explicit table from the host's
//! answer to the guest's.
//!
//! Every bit the guest sees is a promise the platform keeps (PLATFORM.md,
//! "CPUID and MSRs"). Each leaf is one of:
//! - passed through masked: the host's value ANDed with an allow-list, then
//!   ORed with bits the platform itself provides (x2APIC and TSC-deadline
//!   are emulated, so shown even when the host lacks them);
//! - synthesized: the value does not depend on the host (topology for one
//!   vCPU, the hypervisor leaves);
//! - zero: every leaf not in the table, and every leaf above the guest's
//!   maximum basic/extended leaf (real CPUs repeat the last basic leaf
//!   there; zeros promise less).
//!
//! No Xen signature anywhere in 0x4000_0000..0x4001_0000: Linux's
//! `xen_cpuid_base()` would take the Xen path and expect hypercalls. The
//! hypervisor leaf shows KVM's signature with no PV features (0x4000_0001
//! all zero): that is what makes Linux keep x2APIC without interrupt
//! remapping (`kvm_para_available()`), and with no feature bits it uses no
//! kvmclock, steal time or PV EOI.
//!
//! docs/KERNEL.md ("CPUID policy") lists this table; a test checks it.

/// One CPUID answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl Cpuid {
    pub const ZERO: Cpuid = Cpuid::new(0, 0, 0, 0);

    pub const fn new(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Self {
        Cpuid { eax, ebx, ecx, edx }
    }
}

/// How one leaf is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `(host & keep) | set`, per register (eax, ebx, ecx, edx).
    Masked { keep: [u32; 4], set: [u32; 4] },
    /// Built by the policy, independent of the host.
    Synthesized,
    /// All four registers zero.
    Zero,
}

/// One row of the policy table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub leaf: u32,
    pub name: &'static str,
    pub rule: Rule,
}

/// Feature bits by name (Intel SDM vol. 2A "CPUID"; AMD APM vol. 3 app. E).
pub mod bit {
    // leaf 1 ECX
    pub const SSE3: u32 = 1 << 0;
    pub const PCLMULQDQ: u32 = 1 << 1;
    pub const MONITOR: u32 = 1 << 3;
    pub const VMX: u32 = 1 << 5;
    pub const SSSE3: u32 = 1 << 9;
    pub const FMA: u32 = 1 << 12;
    pub const CX16: u32 = 1 << 13;
    pub const PDCM: u32 = 1 << 15;
    pub const PCID: u32 = 1 << 17;
    pub const SSE41: u32 = 1 << 19;
    pub const SSE42: u32 = 1 << 20;
    pub const X2APIC: u32 = 1 << 21;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const AES: u32 = 1 << 25;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const RDRAND: u32 = 1 << 30;
    pub const HYPERVISOR: u32 = 1 << 31;
    // leaf 1 EDX (bits 0-17, 23, 24 repeat in 0x8000_0001 EDX on AMD)
    pub const FPU: u32 = 1 << 0;
    pub const VME: u32 = 1 << 1;
    pub const DE: u32 = 1 << 2;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const MCE: u32 = 1 << 7;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const MTRR: u32 = 1 << 12;
    pub const PGE: u32 = 1 << 13;
    pub const MCA: u32 = 1 << 14;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const PSE36: u32 = 1 << 17;
    pub const CLFSH: u32 = 1 << 19;
    pub const DS: u32 = 1 << 21;
    pub const ACPI: u32 = 1 << 22;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    pub const HTT: u32 = 1 << 28;
    // leaf 6 EAX
    pub const ARAT: u32 = 1 << 2;
    // leaf 7.0 EBX
    pub const FSGSBASE: u32 = 1 << 0;
    pub const TSC_ADJUST: u32 = 1 << 1;
    pub const BMI1: u32 = 1 << 3;
    pub const HLE: u32 = 1 << 4;
    pub const AVX2: u32 = 1 << 5;
    pub const SMEP: u32 = 1 << 7;
    pub const BMI2: u32 = 1 << 8;
    pub const ERMS: u32 = 1 << 9;
    pub const INVPCID: u32 = 1 << 10;
    pub const RTM: u32 = 1 << 11;
    pub const RDSEED: u32 = 1 << 18;
    pub const ADX: u32 = 1 << 19;
    pub const SMAP: u32 = 1 << 20;
    pub const CLFLUSHOPT: u32 = 1 << 23;
    pub const CLWB: u32 = 1 << 24;
    pub const SHA: u32 = 1 << 29;
    // 0x8000_0001 ECX
    pub const LAHF_LM: u32 = 1 << 0;
    pub const SVM: u32 = 1 << 2;
    pub const ABM: u32 = 1 << 5;
    pub const SSE4A: u32 = 1 << 6;
    pub const MISALIGNSSE: u32 = 1 << 7;
    pub const PRFCHW: u32 = 1 << 8;
    pub const TOPOEXT: u32 = 1 << 22;
    pub const PERFCTR_CORE: u32 = 1 << 23;
    // 0x8000_0001 EDX
    pub const SYSCALL: u32 = 1 << 11;
    pub const NX: u32 = 1 << 20;
    pub const MMXEXT: u32 = 1 << 22;
    pub const FFXSR: u32 = 1 << 25;
    pub const PDPE1GB: u32 = 1 << 26;
    pub const RDTSCP: u32 = 1 << 27;
    pub const LM: u32 = 1 << 29;
    // 0x8000_0007 EDX
    pub const INVARIANT_TSC: u32 = 1 << 8;
}

use bit::*;

/// Leaf 1 EDX: what the guest may see of the host's.
const LEAF1_EDX: u32 = FPU
    | VME
    | DE
    | PSE
    | TSC
    | MSR
    | PAE
    | CX8
    | APIC
    | SEP
    | MTRR
    | PGE
    | CMOV
    | PAT
    | PSE36
    | CLFSH
    | MMX
    | FXSR
    | SSE
    | SSE2;
/// Leaf 1 ECX: passed through if the host has them.
const LEAF1_ECX: u32 =
    SSE3 | PCLMULQDQ | SSSE3 | CX16 | SSE41 | SSE42 | MOVBE | POPCNT | AES | RDRAND;
/// Leaf 1 ECX: the platform provides them (emulated x2APIC and its
/// TSC-deadline timer; the hypervisor bit).
const LEAF1_ECX_SET: u32 = X2APIC | TSC_DEADLINE | HYPERVISOR;
/// Leaf 7.0 EBX: no AVX2 (no XSAVE), no TSX, no INVPCID (PCID is hidden,
/// and VMX would need the enable-INVPCID control), no MPX/PT/AVX-512.
const LEAF7_EBX: u32 =
    FSGSBASE | BMI1 | SMEP | BMI2 | ERMS | RDSEED | ADX | SMAP | CLFLUSHOPT | CLWB | SHA;
/// Leaf 7.0 EBX: TSC_ADJUST is emulated (MSR 0x3B).
const LEAF7_EBX_SET: u32 = TSC_ADJUST;
/// 0x8000_0001 ECX.
const EXT1_ECX: u32 = LAHF_LM | ABM | SSE4A | MISALIGNSSE | PRFCHW;
/// 0x8000_0001 EDX: AMD repeats leaf 1's bits here; no RDTSCP (TSC_AUX is
/// not emulated), no FFXSR.
const EXT1_EDX: u32 = (LEAF1_EDX & 0x0183_FFFF) | SYSCALL | NX | MMXEXT | PDPE1GB | LM;

/// Highest basic leaf shown (capped at the host's).
pub const MAX_BASIC: u32 = 0xD;
/// Highest extended leaf shown (capped at the host's).
pub const MAX_EXTENDED: u32 = 0x8000_0008;
/// Hypervisor leaves shown: 0x4000_0000 and 0x4000_0001.
pub const HV_BASE: u32 = 0x4000_0000;
pub const MAX_HV: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

const ALL: u32 = u32::MAX;

/// The policy, one row per leaf that is not all zero plus the zero leaves
/// worth naming. Leaves absent from this table read as zero.
pub const TABLE: &[Leaf] = &[
    Leaf {
        leaf: 0x0,
        name: "max basic leaf (capped at 0xD), vendor string",
        rule: Rule::Synthesized,
    },
    Leaf {
        leaf: 0x1,
        name: "signature; one logical CPU, APIC id 0; features",
        rule: Rule::Masked {
            keep: [ALL, 0x0000_FFFF, LEAF1_ECX, LEAF1_EDX],
            set: [0, 0x0001_0000, LEAF1_ECX_SET, 0],
        },
    },
    Leaf {
        leaf: 0x2,
        name: "cache descriptors (Intel)",
        rule: Rule::Masked {
            keep: [ALL; 4],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x4,
        name: "cache parameters (Intel), one core one thread",
        rule: Rule::Masked {
            keep: [0x0000_3FFF, ALL, ALL, ALL],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x5,
        name: "MONITOR/MWAIT (hidden)",
        rule: Rule::Zero,
    },
    Leaf {
        leaf: 0x6,
        name: "power management: ARAT only",
        rule: Rule::Synthesized,
    },
    Leaf {
        leaf: 0x7,
        name: "structured extended features (subleaf 0)",
        rule: Rule::Masked {
            keep: [0, LEAF7_EBX, 0, 0],
            set: [0, LEAF7_EBX_SET, 0, 0],
        },
    },
    Leaf {
        leaf: 0xA,
        name: "architectural PMU (hidden)",
        rule: Rule::Zero,
    },
    Leaf {
        leaf: 0xB,
        name: "x2APIC topology: one thread, one core",
        rule: Rule::Synthesized,
    },
    Leaf {
        leaf: 0xD,
        name: "XSAVE (hidden: the guest uses FXSAVE)",
        rule: Rule::Zero,
    },
    Leaf {
        leaf: HV_BASE,
        name: "hypervisor: KVM signature, max leaf 0x40000001",
        rule: Rule::Synthesized,
    },
    Leaf {
        leaf: MAX_HV,
        name: "KVM PV features: none",
        rule: Rule::Zero,
    },
    Leaf {
        leaf: 0x8000_0000,
        name: "max extended leaf (capped at 0x80000008), vendor",
        rule: Rule::Synthesized,
    },
    Leaf {
        leaf: 0x8000_0001,
        name: "extended signature and features",
        rule: Rule::Masked {
            keep: [ALL, ALL, EXT1_ECX, EXT1_EDX],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x8000_0002,
        name: "brand string",
        rule: Rule::Masked {
            keep: [ALL; 4],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x8000_0003,
        name: "brand string",
        rule: Rule::Masked {
            keep: [ALL; 4],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x8000_0004,
        name: "brand string",
        rule: Rule::Masked {
            keep: [ALL; 4],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x8000_0005,
        name: "L1 cache and TLB (AMD)",
        rule: Rule::Masked {
            keep: [ALL; 4],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x8000_0006,
        name: "L2/L3 cache",
        rule: Rule::Masked {
            keep: [ALL; 4],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x8000_0007,
        name: "power management: invariant TSC only",
        rule: Rule::Synthesized,
    },
    Leaf {
        leaf: 0x8000_0008,
        name: "address sizes; no core count, no speculation-control bits",
        rule: Rule::Masked {
            keep: [0x0000_FFFF, 0, 0, 0],
            set: [0; 4],
        },
    },
    Leaf {
        leaf: 0x8000_000A,
        name: "SVM (hidden; above the max extended leaf)",
        rule: Rule::Zero,
    },
    Leaf {
        leaf: 0x8000_001F,
        name: "SEV/SME (hidden; above the max extended leaf)",
        rule: Rule::Zero,
    },
];

/// The row for `leaf`, if the table names it.
pub fn rule_for(leaf: u32) -> Option<&'static Leaf> {
    TABLE.iter().find(|l| l.leaf == leaf)
}

/// What the guest's CPUID(`leaf`, `subleaf`) returns, given the host's
/// CPUID as `host(leaf, subleaf)`. Total: any leaf/subleaf gives an answer.
pub fn guest_cpuid(host: impl Fn(u32, u32) -> Cpuid, leaf: u32, subleaf: u32) -> Cpuid {
    let in_range = if leaf < HV_BASE {
        leaf <= host(0, 0).eax.min(MAX_BASIC)
    } else if leaf < 0x8000_0000 {
        leaf <= MAX_HV
    } else {
        leaf <= host(0x8000_0000, 0).eax.min(MAX_EXTENDED)
    };
    let Some(row) = rule_for(leaf).filter(|_| in_range) else {
        return Cpuid::ZERO;
    };
    match row.rule {
        Rule::Zero => Cpuid::ZERO,
        Rule::Masked { keep, set } => {
            // Subleaf-indexed leaves: only subleaf 0 of leaf 7 is shown;
            // leaf 4's subleaves are the host's caches, each masked.
            if leaf == 0x7 && subleaf != 0 {
                return Cpuid::ZERO;
            }
            let h = host(leaf, if leaf == 0x4 { subleaf } else { 0 });
            Cpuid::new(
                (h.eax & keep[0]) | set[0],
                (h.ebx & keep[1]) | set[1],
                (h.ecx & keep[2]) | set[2],
                (h.edx & keep[3]) | set[3],
            )
        }
        Rule::Synthesized => synthesized(&host, leaf, subleaf),
    }
}

fn synthesized(host: &impl Fn(u32, u32) -> Cpuid, leaf: u32, subleaf: u32) -> Cpuid {
    match leaf {
        0x0 => {
            let h = host(0, 0);
            Cpuid::new(h.eax.min(MAX_BASIC), h.ebx, h.ecx, h.edx)
        }
        0x6 => Cpuid::new(ARAT, 0, 0, 0),
        // One logical processor per level: level 0 SMT (type 1), level 1
        // core (type 2), x2APIC id 0, shift 0; ECX[7:0] echoes the subleaf.
        0xB => match subleaf {
            0 => Cpuid::new(0, 1, 0x100, 0),
            1 => Cpuid::new(0, 1, 0x201, 0),
            n => Cpuid::new(0, 0, n & 0xff, 0),
        },
        HV_BASE => Cpuid::new(MAX_HV, KVM_SIGNATURE[0], KVM_SIGNATURE[1], KVM_SIGNATURE[2]),
        0x8000_0000 => {
            let h = host(0x8000_0000, 0);
            Cpuid::new(h.eax.min(MAX_EXTENDED), h.ebx, h.ecx, h.edx)
        }
        0x8000_0007 => Cpuid::new(0, 0, 0, INVARIANT_TSC),
        _ => Cpuid::ZERO,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A host CPUID as a list of (leaf, subleaf, answer); absent = zero.
    type Dump = &'static [(u32, u32, [u32; 4])];

    fn lookup(dump: Dump) -> impl Fn(u32, u32) -> Cpuid {
        move |leaf, sub| {
            dump.iter()
                .find(|(l, s, _)| *l == leaf && *s == sub)
                .map(|(_, _, r)| Cpuid::new(r[0], r[1], r[2], r[3]))
                .unwrap_or_default()
        }
    }

    /// QEMU 7.2 `-cpu EPYC` (family 17h model 1 stepping 2), reference
    /// values composed from QEMU's model definition (target/i386/cpu.c,
    /// "EPYC"), not a recording: SVM, MONITOR, XSAVE/AVX/AVX2, TOPOEXT,
    /// perfctr_core, RDTSCP present; no x2APIC, no TSC-deadline.
    pub(crate) const EPYC: Dump = &[
        (0x0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]), // AuthenticAMD
        (0x1, 0, [0x0080_0f12, 0x0001_0800, 0xf6d8_320b, 0x178b_fbff]),
        (0x5, 0, [0x40, 0x40, 0x3, 0x0]),
        (0x7, 0, [0x0, 0x209c_03a9, 0x0, 0x0]),
        (0xd, 0, [0x7, 0x340, 0x340, 0x0]),
        (
            0x4000_0000,
            0,
            [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
        ),
        (
            0x8000_0000,
            0,
            [0x8000_001e, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
        ),
        (0x8000_0001, 0, [0x0080_0f12, 0x0, 0x00c0_03ff, 0x2fd3_fbff]),
        (
            0x8000_0002,
            0,
            [0x2044_4d41, 0x4359_5045, 0x6f72_5020, 0x7373_6563],
        ),
        (
            0x8000_0005,
            0,
            [0xff40_ff40, 0xff40_ff40, 0x2004_0140, 0x4004_0140],
        ),
        (0x8000_0006, 0, [0x0, 0x4200_4200, 0x0200_6140, 0x0080_8140]),
        (0x8000_0007, 0, [0x0, 0x0, 0x0, 0x0]),
        (0x8000_0008, 0, [0x3028, 0x0, 0x0000_3001, 0x0]),
        (0x8000_000a, 0, [0x1, 0x10, 0x0, 0x0000_0089]),
        (0x8000_001e, 0, [0x0, 0x100, 0x0, 0x0]),
    ];

    /// Bochs `corei7_skylake_x` (Xeon Skylake-X, family 6 model 55h
    /// stepping 4), reference values composed from its model
    /// (cpu/cpudb/intel/corei7_skylake-x.cc), not a recording: VMX,
    /// MONITOR, PDCM, PCID, XSAVE, AVX/AVX2/AVX-512, TSX, INVPCID, PMU,
    /// SPEC_CTRL/ARCH_CAPABILITIES present; a Xen signature as if Doppel
    /// itself ran under Xen (the guest must not see it).
    pub(crate) const SKYLAKE_X: Dump = &[
        (0x0, 0, [0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]), // GenuineIntel
        (0x1, 0, [0x0005_0654, 0x0010_0800, 0x7ffe_fbff, 0xbfeb_fbff]),
        (0x2, 0, [0x0076_0036, 0x00ff_0000, 0x0, 0x00c3_0000]),
        (0x4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0x0]),
        (0x4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0x0]),
        (0x4, 3, [0x1c03_c163, 0x0280_003f, 0x6fff, 0x4]),
        (0x5, 0, [0x40, 0x40, 0x3, 0x0000_2020]),
        (0x6, 0, [0x77, 0x2, 0x9, 0x0]),
        (0x7, 0, [0x0, 0xd3bf_5fbf, 0x8, 0xbc00_0400]),
        (0x7, 1, [0x0, 0x0, 0x0, 0x0]),
        (0xa, 0, [0x0730_0404, 0x0, 0x0, 0x603]),
        (0xb, 0, [0x1, 0x2, 0x100, 0x0]),
        (0xb, 1, [0x5, 0x10, 0x201, 0x0]),
        (0xd, 0, [0x2ff, 0xa88, 0xa88, 0x0]),
        (0x15, 0, [0x2, 0xa8, 0x0, 0x0]),
        (0x16, 0, [0xbb8, 0xfa0, 0x64, 0x0]),
        (
            0x4000_0000,
            0,
            [0x4000_0002, 0x566e_6558, 0x6558_4d4d, 0x4d4d_566e],
        ), // XenVMMXenVMM
        (0x8000_0000, 0, [0x8000_0008, 0x0, 0x0, 0x0]),
        (0x8000_0001, 0, [0x0, 0x0, 0x121, 0x2c10_0800]),
        (0x8000_0006, 0, [0x0, 0x0, 0x0100_6040, 0x0]),
        (0x8000_0007, 0, [0x0, 0x0, 0x0, 0x100]),
        (0x8000_0008, 0, [0x3027, 0x0, 0x0, 0x0]),
    ];

    fn has(v: u32, bits: u32) -> bool {
        v & bits == bits
    }

    /// The bits Linux keys on, on either vendor.
    fn common_promises(host: Dump) {
        let g = |l, s| guest_cpuid(lookup(host), l, s);
        let l1 = g(1, 0);
        // Shown: what Linux 6.1 x86-64 needs and the platform emulates.
        for (b, n) in [
            (FPU, "fpu"),
            (TSC, "tsc"),
            (MSR, "msr"),
            (PAE, "pae"),
            (CX8, "cx8"),
            (APIC, "apic"),
            (PGE, "pge"),
            (CMOV, "cmov"),
            (PAT, "pat"),
            (FXSR, "fxsr"),
            (SSE, "sse"),
            (SSE2, "sse2"),
            (MTRR, "mtrr"),
        ] {
            assert!(has(l1.edx, b), "leaf 1 edx {n}");
        }
        for (b, n) in [
            (X2APIC, "x2apic"),
            (TSC_DEADLINE, "tsc-deadline"),
            (HYPERVISOR, "hypervisor"),
            (CX16, "cx16"),
        ] {
            assert!(has(l1.ecx, b), "leaf 1 ecx {n}");
        }
        // Hidden: never a promise the platform cannot keep.
        for (b, n) in [
            (VMX, "vmx"),
            (MONITOR, "monitor"),
            (PDCM, "pdcm"),
            (PCID, "pcid"),
            (XSAVE, "xsave"),
            (OSXSAVE, "osxsave"),
            (AVX, "avx"),
            (FMA, "fma"),
        ] {
            assert_eq!(l1.ecx & b, 0, "leaf 1 ecx {n}");
        }
        for (b, n) in [
            (MCE, "mce"),
            (MCA, "mca"),
            (HTT, "htt"),
            (DS, "ds"),
            (ACPI, "acpi"),
        ] {
            assert_eq!(l1.edx & b, 0, "leaf 1 edx {n}");
        }
        assert_eq!((l1.ebx >> 16) & 0xff, 1, "one logical processor");
        assert_eq!(l1.ebx >> 24, 0, "initial APIC id 0");
        assert_eq!(
            l1.eax,
            lookup(host)(1, 0).eax,
            "family/model/stepping passed"
        );

        assert_eq!(g(5, 0), Cpuid::ZERO, "no MONITOR/MWAIT leaf");
        assert_eq!(g(6, 0), Cpuid::new(ARAT, 0, 0, 0), "ARAT only");
        let l7 = g(7, 0);
        assert_eq!(l7.eax, 0, "only subleaf 0");
        assert!(has(l7.ebx, TSC_ADJUST), "TSC_ADJUST is emulated");
        for (b, n) in [
            (AVX2, "avx2"),
            (INVPCID, "invpcid"),
            (HLE, "hle"),
            (RTM, "rtm"),
        ] {
            assert_eq!(l7.ebx & b, 0, "leaf 7 ebx {n}");
        }
        assert_eq!(
            l7.ebx & 0xfffe_0000 & !(RDSEED | ADX | SMAP | CLFLUSHOPT | CLWB | SHA),
            0
        );
        assert_eq!(
            (l7.ecx, l7.edx),
            (0, 0),
            "no PKU, no speculation-control MSRs"
        );
        assert_eq!(g(7, 1), Cpuid::ZERO);
        assert_eq!(g(0xa, 0), Cpuid::ZERO, "no PMU");
        assert_eq!(g(0xd, 0), Cpuid::ZERO, "no XSAVE");
        assert_eq!(g(0xd, 1), Cpuid::ZERO);
        assert_eq!(
            g(0xb, 0),
            Cpuid::new(0, 1, 0x100, 0),
            "SMT level: one thread"
        );
        assert_eq!(
            g(0xb, 1),
            Cpuid::new(0, 1, 0x201, 0),
            "core level: one core"
        );
        assert_eq!(g(0xb, 2), Cpuid::new(0, 0, 2, 0), "invalid level");
        assert_eq!(g(0x15, 0), Cpuid::ZERO, "above the max basic leaf");
        assert_eq!(g(0, 0).eax, 0xd);

        // The hypervisor leaves: KVM's signature, no PV features, and no
        // Xen signature at any base Linux's xen_cpuid_base() probes.
        let hv = g(HV_BASE, 0);
        assert_eq!(hv.eax, MAX_HV);
        let mut sig = [0u8; 12];
        for (i, r) in [hv.ebx, hv.ecx, hv.edx].iter().enumerate() {
            sig[4 * i..4 * i + 4].copy_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(g(MAX_HV, 0), Cpuid::ZERO, "no KVM PV features");
        for base in (HV_BASE..0x4001_0000).step_by(0x100) {
            let r = g(base, 0);
            let xen = [0x566e_6558, 0x6558_4d4d, 0x4d4d_566e];
            assert_ne!([r.ebx, r.ecx, r.edx], xen, "Xen signature at {base:#x}");
            if base != HV_BASE {
                assert_eq!(r, Cpuid::ZERO, "{base:#x}");
            }
        }

        let e1 = g(0x8000_0001, 0);
        for (b, n) in [(LM, "lm"), (NX, "nx"), (SYSCALL, "syscall")] {
            assert!(has(e1.edx, b), "0x80000001 edx {n}");
        }
        assert_eq!(e1.edx & (RDTSCP | FFXSR), 0, "no rdtscp, no ffxsr");
        assert_eq!(
            e1.ecx & (SVM | TOPOEXT | PERFCTR_CORE),
            0,
            "no svm, topoext, perfctr"
        );
        assert_eq!(g(0x8000_0007, 0), Cpuid::new(0, 0, 0, INVARIANT_TSC));
        let e8 = g(0x8000_0008, 0);
        assert_eq!(
            e8.eax,
            lookup(host)(0x8000_0008, 0).eax & 0xffff,
            "address sizes"
        );
        assert_eq!(
            (e8.ebx, e8.ecx, e8.edx),
            (0, 0, 0),
            "no core count, no IBPB bits"
        );
        assert_eq!(g(0x8000_000a, 0), Cpuid::ZERO, "no SVM leaf");
        assert_eq!(g(0x8000_001f, 0), Cpuid::ZERO, "no SEV leaf");
        assert_eq!(g(0x8000_0000, 0).eax, 0x8000_0008);
    }

    #[test]
    fn epyc_guest_view() {
        common_promises(EPYC);
        let g = |l, s| guest_cpuid(lookup(EPYC), l, s);
        assert_eq!(g(0, 0).ebx, 0x6874_7541, "vendor AuthenticAMD kept");
        // The host has neither: the platform provides both.
        assert_eq!(EPYC[1].2[2] & (X2APIC | TSC_DEADLINE), 0);
        // AMD-only bits that survive.
        assert!(has(g(0x8000_0001, 0).ecx, LAHF_LM | ABM | SSE4A | PRFCHW));
        assert_eq!(g(0x8000_0002, 0).eax, 0x2044_4d41, "brand string");
        assert_eq!(g(0x8000_0005, 0).ecx, 0x2004_0140, "L1 cache info");
        // Leaves the host lacks stay zero even if the table passes them.
        assert_eq!(g(2, 0), Cpuid::ZERO);
        assert_eq!(g(4, 0), Cpuid::ZERO);
        let l1 = g(1, 0);
        assert_eq!(l1.ecx, (0xf6d8_320b & LEAF1_ECX) | LEAF1_ECX_SET);
    }

    #[test]
    fn skylake_guest_view() {
        common_promises(SKYLAKE_X);
        let g = |l, s| guest_cpuid(lookup(SKYLAKE_X), l, s);
        assert_eq!(g(0, 0).ecx, 0x6c65_746e, "vendor GenuineIntel kept");
        // Deterministic cache parameters: host's caches, no core/thread
        // sharing counts (EAX[31:14] cleared).
        assert_eq!(g(4, 0).eax, 0x0000_0121);
        assert_eq!(g(4, 3).eax, 0x0000_0163);
        assert_eq!(g(4, 3).ecx, 0x6fff);
        assert_eq!(g(4, 2), Cpuid::ZERO, "subleaf the host lacks");
        assert_eq!(g(2, 0), lookup(SKYLAKE_X)(2, 0), "cache descriptors passed");
        assert_eq!(
            g(0x16, 0),
            Cpuid::ZERO,
            "frequency leaf: tsc_early_khz instead"
        );
        let l7 = g(7, 0);
        assert!(has(l7.ebx, FSGSBASE | SMEP | SMAP | ERMS | BMI1 | BMI2));
    }

    /// docs/KERNEL.md's CPUID table lists exactly the policy's leaves with
    /// the same rule.
    #[test]
    fn doc_table_matches_policy() {
        let doc = include_str!("../../../docs/KERNEL.md");
        let mut rows: Vec<(u32, String)> =
            crate::msr_policy::tests::doc_table(doc, "### CPUID policy")
                .iter()
                .map(|c| {
                    let leaf = u32::from_str_radix(c[0].trim_start_matches("0x"), 16)
                        .unwrap_or_else(|_| panic!("bad leaf {:?}", c[0]));
                    (leaf, c[1].clone())
                })
                .collect();
        let mut code: Vec<(u32, String)> = TABLE
            .iter()
            .map(|l| {
                let rule = match l.rule {
                    Rule::Masked { .. } => "masked",
                    Rule::Synthesized => "synthesized",
                    Rule::Zero => "zero",
                };
                (l.leaf, rule.to_string())
            })
            .collect();
        rows.sort();
        code.sort();
        assert_eq!(
            rows, code,
            "docs/KERNEL.md CPUID policy table vs cpuid_policy::TABLE"
        );
    }

    proptest! {
        /// For any host: a passed-through bit the guest sees, the host has
        /// (or the platform sets it); the forced bits are always there.
        #[test]
        fn never_promises_what_host_lacks(regs in proptest::array::uniform4(any::<u32>()),
                                          max in 0u32..0x20, leaf in prop_oneof![0u32..0x20, 0x8000_0000u32..0x8000_0020, 0x4000_0000u32..0x4000_0010],
                                          sub in 0u32..4) {
            let host = move |l: u32, _s: u32| match l {
                0 => Cpuid::new(max, regs[1], regs[2], regs[3]),
                0x8000_0000 => Cpuid::new(0x8000_0000 | max, 0, 0, 0),
                _ => Cpuid::new(regs[0], regs[1], regs[2], regs[3]),
            };
            let g = guest_cpuid(host, leaf, sub);
            if let Some(Leaf { rule: Rule::Masked { keep, set }, .. }) = rule_for(leaf) {
                let h = host(leaf, sub);
                let (gv, hv) = ([g.eax, g.ebx, g.ecx, g.edx], [h.eax, h.ebx, h.ecx, h.edx]);
                for i in 0..4 {
                    prop_assert_eq!(gv[i] & !set[i] & !hv[i], 0);
                    prop_assert_eq!(gv[i] & !(keep[i] | set[i]), 0);
                }
            }
            if rule_for(leaf).is_none() {
                prop_assert_eq!(g, Cpuid::ZERO);
            }
        }
    }
}
