//! Intel VMX: capability detection from the VMX MSRs and VMXON (here),
//! typed VMCS access (`vmcs`), and the vCPU that runs a guest under EPT
//! with write-protect or PML dirty tracking (`vcpu`).
//! (Intel SDM vol. 3, chapter 24 "Introduction to VMX operation" and
//! appendix A "VMX capability reporting facility".)

pub mod roundtrip;
pub mod vcpu;
pub mod vmcs;

use x86_64::registers::control::Cr4Flags;

use crate::arch::instr::{self, cpuid, rdmsr, wrmsr};
use crate::mem::frames;

use super::Error;

const IA32_FEATURE_CONTROL: u32 = 0x3A;
const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;

const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;

/// IA32_VMX_BASIC bit 55: the TRUE_* control MSRs exist.
const BASIC_TRUE_CTLS: u64 = 1 << 55;
/// Primary processor-based control 31: activate secondary controls.
const PROC_SECONDARY: u32 = 1 << 31;
/// Secondary processor-based controls.
const PROC2_EPT: u32 = 1 << 1;
const PROC2_UNRESTRICTED: u32 = 1 << 7;
const PROC2_PML: u32 = 1 << 17;
/// IA32_VMX_EPT_VPID_CAP bit 21: accessed and dirty flags for EPT.
const EPT_CAP_AD: u64 = 1 << 21;

const CR4_VMXE: u64 = Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCaps {
    /// VMCS revision identifier (IA32_VMX_BASIC[30:0]).
    pub revision: u32,
    /// VMXON/VMCS region size in bytes (IA32_VMX_BASIC[44:32]).
    pub region_size: u32,
    /// The TRUE_* control MSRs are to be used.
    pub true_ctls: bool,
    pub ept: bool,
    pub ept_ad: bool,
    pub pml: bool,
    pub unrestricted: bool,
}

/// VMX capabilities, or `None` if CPUID.1:ECX[5] (VMX) is clear. The VMX
/// MSRs are read only when VMX is there (they raise #GP otherwise).
pub fn detect() -> Option<VmxCaps> {
    if cpuid(1, 0).ecx & (1 << 5) == 0 {
        return None;
    }
    let basic = rdmsr(IA32_VMX_BASIC);
    let true_ctls = basic & BASIC_TRUE_CTLS != 0;
    let procbased = rdmsr(if true_ctls {
        IA32_VMX_TRUE_PROCBASED_CTLS
    } else {
        IA32_VMX_PROCBASED_CTLS
    });
    // Allowed-1 settings are the high 32 bits of a control MSR.
    let proc_allowed1 = (procbased >> 32) as u32;
    let proc2_allowed1 = if proc_allowed1 & PROC_SECONDARY != 0 {
        (rdmsr(IA32_VMX_PROCBASED_CTLS2) >> 32) as u32
    } else {
        0
    };
    let ept = proc2_allowed1 & PROC2_EPT != 0;
    // IA32_VMX_EPT_VPID_CAP exists only with EPT or VPID.
    let ept_ad = ept && rdmsr(IA32_VMX_EPT_VPID_CAP) & EPT_CAP_AD != 0;
    let caps = VmxCaps {
        revision: (basic & 0x7fff_ffff) as u32,
        region_size: ((basic >> 32) & 0x1fff) as u32,
        true_ctls,
        ept,
        ept_ad,
        pml: proc2_allowed1 & PROC2_PML != 0,
        unrestricted: proc2_allowed1 & PROC2_UNRESTRICTED != 0,
    };
    log::debug!(
        "vmx: basic={basic:#018x} procbased={procbased:#018x} proc2_allowed1={proc2_allowed1:#010x}"
    );
    Some(caps)
}

/// VMX root operation entered; owns the VMXON region.
#[derive(Debug)]
pub struct VmxOn {
    /// Physical address of the VMXON region.
    pub region: u64,
    /// VMCS revision identifier, for every VMCS made under this VMXON.
    pub revision: u32,
}

pub fn enable(caps: &VmxCaps) -> Result<VmxOn, Error> {
    let fc = rdmsr(IA32_FEATURE_CONTROL);
    if fc & FEATURE_CONTROL_LOCK == 0 {
        // SAFETY: IA32_FEATURE_CONTROL only gates VMX/SMX; locking it with
        // VMX-outside-SMX allowed changes nothing the kernel relies on.
        unsafe {
            wrmsr(
                IA32_FEATURE_CONTROL,
                fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            )
        };
    } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(Error::DisabledByFirmware(
            "IA32_FEATURE_CONTROL locked with VMX outside SMX off",
        ));
    }
    if caps.region_size as u64 > crate::mem::PAGE_SIZE {
        return Err(Error::VmxFailed("VMXON (region larger than 4 KiB)"));
    }

    let cr0 = (instr::read_cr0() | rdmsr(IA32_VMX_CR0_FIXED0)) & rdmsr(IA32_VMX_CR0_FIXED1);
    let cr4 =
        (instr::read_cr4() | CR4_VMXE | rdmsr(IA32_VMX_CR4_FIXED0)) & rdmsr(IA32_VMX_CR4_FIXED1);
    // SAFETY: the fixed-1 bits VMX requires in long mode (PE, PG, NE) are
    // compatible with the kernel; fixed-0 bits only clear what VMX forbids.
    unsafe { instr::write_cr0(cr0) };
    // SAFETY: as above; CR4.VMXE only permits VMXON, PAE stays set.
    unsafe { instr::write_cr4(cr4) };

    let region = frames::alloc_zeroed()
        .ok_or(Error::OutOfFrames)?
        .start_address()
        .as_u64();
    // SAFETY: a zeroed frame owned by this function, identity mapped; the
    // revision id goes in its first 4 bytes with bit 31 clear.
    unsafe { (region as *mut u32).write_volatile(caps.revision) };
    // SAFETY: CR4.VMXE and the fixed bits are set above; `region` is a
    // dedicated frame holding the revision id, given to VMX from now on.
    unsafe { instr::vmxon(region) }.map_err(|e| match e {
        instr::VmFail::Invalid => Error::VmxFailed("VMXON (VMfailInvalid)"),
        instr::VmFail::Valid => Error::VmxFailed("VMXON (VMfailValid)"),
    })?;
    log::debug!(
        "vmx: on, VMXON region at {region:#x}, revision {:#x}",
        caps.revision
    );
    Ok(VmxOn {
        region,
        revision: caps.revision,
    })
}

impl VmxOn {
    /// Leave VMX root operation and clear CR4.VMXE.
    pub fn off(self) -> Result<(), Error> {
        // SAFETY: VMXON succeeded (this value exists only then) and no VMCS
        // is in use.
        unsafe { instr::vmxoff() }.map_err(|_| Error::VmxFailed("VMXOFF"))?;
        // SAFETY: clearing CR4.VMXE outside VMX operation is always allowed.
        unsafe { instr::write_cr4(instr::read_cr4() & !CR4_VMXE) };
        // Outside VMX operation the CPU no longer uses the region.
        frames::free(self.region, crate::mem::PAGE_SIZE);
        Ok(())
    }
}

/// TSC ticks after which the preemption timer is armed to fire once in the
/// write-protect run: short, so it fires while the guest runs, and the
/// `vmx: preemption timer` line shows the exit arrived.
const TIMER_PROBE_TICKS: u64 = 20_000;

/// The log-dirty self-test under VMX: EPT write-protect and PML modes.
pub fn selftest(on: &mut VmxOn, plan: &super::selftest::Plan) -> bool {
    use doppel_core::paging::EptEntry;
    use doppel_core::selftest::Mode;

    use super::vcpu::Vcpu as _;

    let Some(caps) = detect() else {
        log::error!("self-test: no VMX");
        return false;
    };
    if !caps.ept || !caps.ept_ad || !caps.pml {
        log::error!(
            "self-test: VMX needs EPT ({}), EPT A/D ({}) and PML ({})",
            caps.ept,
            caps.ept_ad,
            caps.pml
        );
        return false;
    }
    let revision = on.revision;
    // Every vCPU saves and reloads its whole state every few entries
    // (`roundtrip`): the test guests prove the save/restore path.
    super::selftest::run::<EptEntry, roundtrip::RoundTrip, _>(
        &[Mode::WriteProtect, Mode::Pml],
        plan,
        false,
        |start, root, mode| {
            // PML logs when the CPU sets EPT dirty flags, so that mode needs
            // A/D on; write-protect keeps it off (with A/D on, guest page-
            // table walks count as writes and would fault).
            let pass = plan.broken == Some(doppel_kernel::config::Broken::MsrPassthrough);
            let mut v = vcpu::VmxVcpu::new(revision, start, root, mode == Mode::Pml, pass)
                .map_err(|e| {
                    log::error!("vmx: vCPU set-up: {e}");
                    "VMX vCPU set-up failed"
                })?;
            if mode == Mode::WriteProtect && !v.arm_timer(Some(TIMER_PROBE_TICKS)) {
                return Err("arming the VMX-preemption timer failed");
            }
            Ok(roundtrip::RoundTrip::new(v))
        },
    )
}

/// The hostile guest's escape probes under VMX (see
/// [`super::isolation`]).
pub fn isolation(on: &mut VmxOn, plan: &super::selftest::Plan) -> bool {
    use doppel_core::paging::EptEntry;

    let revision = on.revision;
    let pass = plan.broken == Some(doppel_kernel::config::Broken::MsrPassthrough);
    super::isolation::run::<EptEntry, vcpu::VmxVcpu, _>(
        doppel_core::msr::Vendor::Vmx,
        plan,
        false,
        |start, root| {
            vcpu::VmxVcpu::new(revision, start, root, false, pass).map_err(|e| {
                log::error!("vmx: vCPU set-up: {e}");
                "VMX vCPU set-up failed"
            })
        },
    )
}

/// Boot a stock Linux guest under VMX (see [`super::linux`]).
pub fn linux(on: &mut VmxOn, plan: &super::linux::LinuxPlan<'_>) -> bool {
    use doppel_core::paging::EptEntry;

    let revision = on.revision;
    super::linux::run::<EptEntry, vcpu::VmxVcpu, _>(
        doppel_core::msr::Vendor::Vmx,
        plan,
        modes(),
        |st, root, mode| {
            // EPT A/D on for PML (which logs as the CPU sets dirty flags).
            let ad = mode == doppel_core::selftest::Mode::Pml;
            vcpu::VmxVcpu::with_state(revision, st, root, ad, false).map_err(|e| {
                log::error!("vmx: vCPU set-up: {e}");
                "VMX vCPU set-up failed"
            })
        },
    )
}

/// The log-dirty modes this CPU's VMX tracks with: EPT write-protect, and
/// PML where EPT A/D and PML are there.
fn modes() -> &'static [doppel_abi::msg::LogDirtyMode] {
    use doppel_abi::msg::LogDirtyMode;
    const BOTH: [LogDirtyMode; 2] = [LogDirtyMode::WriteProtect, LogDirtyMode::Pml];
    if detect().is_some_and(|c| c.ept_ad && c.pml) {
        &BOTH
    } else {
        &BOTH[..1]
    }
}

/// A vCPU for the replicated guest: EPT A/D on for PML (which logs as
/// the CPU sets dirty flags), off for write-protect.
fn replicated_vcpu(
    revision: u32,
    start: &super::vcpu::GuestStart,
    root: doppel_core::addr::HostPhysAddr,
    mode: doppel_core::selftest::Mode,
    pass: bool,
) -> Result<vcpu::VmxVcpu, &'static str> {
    use doppel_core::selftest::Mode;
    vcpu::VmxVcpu::new(revision, start, root, mode == Mode::Pml, pass).map_err(|e| {
        log::error!("vmx: vCPU set-up: {e}");
        "VMX vCPU set-up failed"
    })
}

/// A vCPU resuming from a checkpoint's record (untracked: the failed-over
/// or activated guest runs unreplicated).
fn resumed_vcpu(
    revision: u32,
    st: &doppel_core::hvm::VcpuState,
    root: doppel_core::addr::HostPhysAddr,
    pass: bool,
) -> Result<vcpu::VmxVcpu, &'static str> {
    vcpu::VmxVcpu::with_state(revision, st, root, false, pass).map_err(|e| {
        log::error!("vmx: vCPU set-up: {e}");
        "VMX vCPU set-up failed"
    })
}

/// Run the test guest as a replicated primary under VMX (see
/// [`super::replicate`]), tracking with the mode the tool chose.
pub fn primary(on: &mut VmxOn, plan: &super::selftest::Plan) -> bool {
    use doppel_core::paging::EptEntry;

    let revision = on.revision;
    let pass = plan.broken == Some(doppel_kernel::config::Broken::MsrPassthrough);
    super::replicate::primary::<EptEntry, vcpu::VmxVcpu, _>(
        plan,
        false,
        modes(),
        |start, root, mode| replicated_vcpu(revision, start, root, mode, pass),
    )
}

/// Wait as a standby under VMX (see [`super::replicate::standby`]).
pub fn standby(on: &mut VmxOn, plan: &super::selftest::Plan) -> bool {
    use doppel_core::paging::EptEntry;

    let revision = on.revision;
    let pass = plan.broken == Some(doppel_kernel::config::Broken::MsrPassthrough);
    super::replicate::standby::<EptEntry, vcpu::VmxVcpu, _>(plan, |st, root| {
        resumed_vcpu(revision, st, root, pass)
    })
}

/// The key-value service replicated to the in-machine replica under VMX
/// (see [`super::replica`]).
pub fn replica(
    on: &mut VmxOn,
    plan: &super::selftest::Plan,
    mode: doppel_abi::msg::LogDirtyMode,
) -> bool {
    use doppel_core::paging::EptEntry;

    let revision = on.revision;
    super::replica::replica::<EptEntry, vcpu::VmxVcpu, _, _>(
        plan,
        false,
        modes(),
        mode,
        |start, root, m| replicated_vcpu(revision, start, root, m, false),
        |st, root| resumed_vcpu(revision, st, root, false),
    )
}
