//! The hostile guest's probes (`PROGRAM_HOSTILE`): each one an attempt to
//! reach the host from a CPL0 guest. The guest runs exactly one probe per
//! boot (its number in RSI, the probe's argument in RDX) and, if the
//! instruction completes, says so with the `ESCAPED` hypercall. The
//! hypervisor's isolation run (`mode=isolation`) boots a fresh guest for
//! every probe of its vendor and judges each.

use crate::exit::Insn;
use crate::msr::{nr, Vendor};

/// What a probe executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// One of the instructions the hypervisor refuses (the same names its
    /// exit decoding gives them). Operands, where the instruction takes
    /// one: VMSAVE / VMLOAD / VMRUN and VMXON / VMCLEAR / VMPTRLD /
    /// VMPTRST get the probe's argument as the physical address; INVLPGA
    /// address 0, ASID 0 (the host's); XSETBV XCR0 = x87 only; VMREAD /
    /// VMWRITE the guest RIP field (0x681E); INVEPT / INVVPID all-context;
    /// VMFUNC 0 (EPTP switching).
    Insn(Insn),
    /// RDMSR; the value read is reported with `ESCAPED`.
    Rdmsr(u32),
    /// WRMSR of the argument.
    Wrmsr(u32),
}

/// What the hypervisor passes as the probe's argument (RDX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    None,
    /// A host-physical address inside the hypervisor's own read-only image.
    HvImage,
    /// The host-physical address of this vCPU's own control structure
    /// (the VMCB, whose control area holds the intercepts; or the VMCS).
    VcpuControl,
    /// The machine address of the replication control area (hv/abi
    /// control.rs: header, rings, channels) the hypervisor published, as a
    /// primary does, for the dom0 tool; the locator page points at it.
    ReplicationControl,
    /// For WRMSR: the host's current value of the MSR, so that a write that
    /// gets through changes nothing (the broken build's run stays safe);
    /// for an allow-listed MSR, a marker the guest's own copy must get.
    MsrValue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub name: &'static str,
    pub op: Op,
    pub arg: Arg,
    pub svm: bool,
    pub vmx: bool,
}

const fn p(name: &'static str, op: Op, arg: Arg, svm: bool, vmx: bool) -> Probe {
    Probe {
        name,
        op,
        arg,
        svm,
        vmx,
    }
}

const SVM: (bool, bool) = (true, false);
const VMX: (bool, bool) = (false, true);
const BOTH: (bool, bool) = (true, true);

macro_rules! probes {
    ($(($name:expr, $op:expr, $arg:expr, $v:expr)),* $(,)?) => {
        &[$(p($name, $op, $arg, $v.0, $v.1)),*]
    };
}

/// Every probe, in the order they run. Numbers index this table.
pub const PROBES: &[Probe] = probes![
    ("vmsave-hv", Op::Insn(Insn::Vmsave), Arg::HvImage, SVM),
    ("vmsave-vmcb", Op::Insn(Insn::Vmsave), Arg::VcpuControl, SVM),
    (
        "vmsave-ctl",
        Op::Insn(Insn::Vmsave),
        Arg::ReplicationControl,
        SVM
    ),
    ("vmload-hv", Op::Insn(Insn::Vmload), Arg::HvImage, SVM),
    ("vmload-vmcb", Op::Insn(Insn::Vmload), Arg::VcpuControl, SVM),
    (
        "vmload-ctl",
        Op::Insn(Insn::Vmload),
        Arg::ReplicationControl,
        SVM
    ),
    ("vmrun-vmcb", Op::Insn(Insn::Vmrun), Arg::VcpuControl, SVM),
    ("stgi", Op::Insn(Insn::Stgi), Arg::None, SVM),
    ("clgi", Op::Insn(Insn::Clgi), Arg::None, SVM),
    ("skinit", Op::Insn(Insn::Skinit), Arg::None, SVM),
    ("invlpga", Op::Insn(Insn::Invlpga), Arg::None, SVM),
    ("xsetbv", Op::Insn(Insn::Xsetbv), Arg::None, BOTH),
    ("vmxon-hv", Op::Insn(Insn::Vmxon), Arg::HvImage, VMX),
    (
        "vmclear-vmcs",
        Op::Insn(Insn::Vmclear),
        Arg::VcpuControl,
        VMX
    ),
    (
        "vmclear-ctl",
        Op::Insn(Insn::Vmclear),
        Arg::ReplicationControl,
        VMX
    ),
    (
        "vmptrld-vmcs",
        Op::Insn(Insn::Vmptrld),
        Arg::VcpuControl,
        VMX
    ),
    (
        "vmptrld-ctl",
        Op::Insn(Insn::Vmptrld),
        Arg::ReplicationControl,
        VMX
    ),
    ("vmptrst", Op::Insn(Insn::Vmptrst), Arg::None, VMX),
    ("vmread", Op::Insn(Insn::Vmread), Arg::None, VMX),
    ("vmwrite", Op::Insn(Insn::Vmwrite), Arg::None, VMX),
    ("vmlaunch", Op::Insn(Insn::Vmlaunch), Arg::None, VMX),
    ("vmresume", Op::Insn(Insn::Vmresume), Arg::None, VMX),
    ("vmxoff", Op::Insn(Insn::Vmxoff), Arg::None, VMX),
    ("invept", Op::Insn(Insn::Invept), Arg::None, VMX),
    ("invvpid", Op::Insn(Insn::Invvpid), Arg::None, VMX),
    ("vmfunc", Op::Insn(Insn::Vmfunc), Arg::None, VMX),
    (
        "rdmsr-vm_hsave_pa",
        Op::Rdmsr(nr::VM_HSAVE_PA),
        Arg::None,
        SVM
    ),
    (
        "wrmsr-vm_hsave_pa",
        Op::Wrmsr(nr::VM_HSAVE_PA),
        Arg::MsrValue,
        SVM
    ),
    ("rdmsr-efer", Op::Rdmsr(nr::EFER), Arg::None, BOTH),
    ("wrmsr-efer", Op::Wrmsr(nr::EFER), Arg::MsrValue, BOTH),
    ("rdmsr-apic_base", Op::Rdmsr(nr::APIC_BASE), Arg::None, BOTH),
    (
        "wrmsr-apic_base",
        Op::Wrmsr(nr::APIC_BASE),
        Arg::MsrValue,
        BOTH
    ),
    ("rdmsr-lstar", Op::Rdmsr(nr::LSTAR), Arg::None, BOTH),
    ("wrmsr-lstar", Op::Wrmsr(nr::LSTAR), Arg::MsrValue, BOTH),
    (
        "rdmsr-sysenter_eip",
        Op::Rdmsr(nr::SYSENTER_EIP),
        Arg::None,
        BOTH
    ),
    (
        "wrmsr-sysenter_eip",
        Op::Wrmsr(nr::SYSENTER_EIP),
        Arg::MsrValue,
        BOTH
    ),
    (
        "rdmsr-mtrr_physbase0",
        Op::Rdmsr(nr::MTRR_PHYS_BASE0),
        Arg::None,
        BOTH
    ),
    (
        "wrmsr-mtrr_physbase0",
        Op::Wrmsr(nr::MTRR_PHYS_BASE0),
        Arg::MsrValue,
        BOTH
    ),
    ("rdmsr-tsc", Op::Rdmsr(nr::TSC), Arg::None, BOTH),
    ("wrmsr-tsc", Op::Wrmsr(nr::TSC), Arg::MsrValue, BOTH),
];

impl Probe {
    pub fn runs_on(&self, vendor: Vendor) -> bool {
        match vendor {
            Vendor::Svm => self.svm,
            Vendor::Vmx => self.vmx,
        }
    }
}

/// How many probes run on `vendor`.
pub fn count(vendor: Vendor) -> usize {
    PROBES.iter().filter(|p| p.runs_on(vendor)).count()
}

/// The marker an allow-listed MSR's guest copy holds before a read probe
/// (a read returning anything else saw the host's value), and the one a
/// write probe writes (the guest's copy must hold it afterwards, the
/// host's must not). Canonical, so valid for LSTAR and SYSENTER_EIP.
pub const READ_MARKER: u64 = 0xffff_8000_6e75_6d62;
pub const WRITE_MARKER: u64 = 0xffff_8000_6775_6573;

/// FNV-1a over `bytes`, continuing from `h` (start with [`FNV_START`]):
/// the fingerprint the isolation run takes of host memory before and after
/// each probe.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_see_one_bit() {
        let a = [0u8; 4096];
        let mut b = a;
        b[4095] = 1;
        assert_ne!(fnv1a(FNV_START, &a), fnv1a(FNV_START, &b));
        assert_eq!(fnv1a(FNV_START, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn every_vendor_gets_its_escapes() {
        assert_eq!(count(Vendor::Svm), 26);
        assert_eq!(count(Vendor::Vmx), 27);
        let names: Vec<_> = PROBES.iter().map(|p| p.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "probe names are unique");
        // The list, on SVM.
        for want in [
            "vmsave-hv",
            "vmsave-vmcb",
            "vmload-hv",
            "vmload-vmcb",
            "vmsave-ctl",
            "vmload-ctl",
            "vmrun-vmcb",
            "stgi",
            "clgi",
            "rdmsr-vm_hsave_pa",
            "wrmsr-vm_hsave_pa",
            "wrmsr-efer",
            "rdmsr-apic_base",
            "wrmsr-lstar",
            "rdmsr-sysenter_eip",
            "wrmsr-mtrr_physbase0",
            "wrmsr-tsc",
        ] {
            assert!(
                PROBES.iter().any(|p| p.name == want && p.svm),
                "{want} on svm"
            );
        }
        // On VMX, the instructions that take a VMCS address aim at the
        // replication control area too.
        for want in ["vmclear-ctl", "vmptrld-ctl"] {
            assert!(
                PROBES
                    .iter()
                    .any(|p| p.name == want && p.vmx && p.arg == Arg::ReplicationControl),
                "{want} on vmx"
            );
        }
        // VM_HSAVE_PA is AMD's alone.
        assert!(!PROBES
            .iter()
            .any(|p| p.vmx && p.op == Op::Rdmsr(nr::VM_HSAVE_PA)));
        // Every write probe carries the value to write.
        for p in PROBES {
            if let Op::Wrmsr(_) = p.op {
                assert_eq!(p.arg, Arg::MsrValue, "{}", p.name);
            }
        }
    }
}
