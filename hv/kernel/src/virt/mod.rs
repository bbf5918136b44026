//! Hardware virtualization: which vendor and features the CPU offers, and
//! turning it on (VMXON on Intel, EFER.SVME on AMD).
//!
//! The vendor backends (VMCS/VMCB set-up, EPT/NPT, PML, VM exits) of the
//! next issues live next to this in `vmx.rs` and `svm.rs`, behind
//! [`Enabled`].

pub mod devmodel;
pub mod guest;
pub mod isolation;
pub mod linux;
pub mod replica;
pub mod replicate;
pub mod run;
pub mod selftest;
pub mod svm;
pub mod track;
pub mod vcpu;
pub mod vmx;

use core::fmt;

use crate::arch::instr::cpuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    /// Neither: the 12-byte CPUID vendor string.
    Other([u8; 12]),
}

impl Vendor {
    pub fn detect() -> Self {
        let r = cpuid(0, 0);
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&r.ebx.to_le_bytes());
        id[4..8].copy_from_slice(&r.edx.to_le_bytes());
        id[8..].copy_from_slice(&r.ecx.to_le_bytes());
        match &id {
            b"GenuineIntel" => Self::Intel,
            b"AuthenticAMD" => Self::Amd,
            _ => Self::Other(id),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Intel => "intel",
            Self::Amd => "amd",
            Self::Other(_) => "other",
        }
    }
}

/// What the CPU offers for hardware virtualization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub vendor: Vendor,
    /// Intel details; `None` without VMX.
    pub vmx: Option<vmx::VmxCaps>,
    /// AMD details; `None` without SVM.
    pub svm: Option<svm::SvmCaps>,
    /// PREFETCHW, the write hint the shared rings give (`doppel-hint`).
    pub prefetchw: bool,
}

impl Caps {
    pub fn detect() -> Self {
        let vendor = Vendor::detect();
        let (vmx, svm) = match vendor {
            Vendor::Intel => (vmx::detect(), None),
            Vendor::Amd => (None, svm::detect()),
            Vendor::Other(_) => (None, None),
        };
        // The rings hint with PREFETCHW where CPUID reports it. Give the
        // hint once here, at boot, so a CPU or emulator that reports it
        // but does not decode it stops now (#UD, reported) rather than in
        // the middle of replication.
        doppel_hint::prefetch_write(&vendor);
        Self {
            vendor,
            vmx,
            svm,
            prefetchw: doppel_hint::has_prefetchw(),
        }
    }

    /// The capability line's body: every key, always, in a fixed order.
    pub fn line(&self, on: bool) -> CapsLine<'_> {
        CapsLine { caps: self, on }
    }
}

pub struct CapsLine<'a> {
    caps: &'a Caps,
    on: bool,
}

impl fmt::Display for CapsLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = |x: bool| u8::from(x);
        let v = self.caps.vmx;
        let s = self.caps.svm;
        write!(
            f,
            "vendor={} vmx={} ept={} ept_ad={} pml={} unrestricted={} svm={} npt={} nrips={} prefetchw={} virt={}",
            self.caps.vendor.name(),
            b(v.is_some()),
            b(v.is_some_and(|v| v.ept)),
            b(v.is_some_and(|v| v.ept_ad)),
            b(v.is_some_and(|v| v.pml)),
            b(v.is_some_and(|v| v.unrestricted)),
            b(s.is_some()),
            b(s.is_some_and(|s| s.npt)),
            b(s.is_some_and(|s| s.nrips)),
            b(self.caps.prefetchw),
            if self.on { "on" } else { "off" },
        )
    }
}

/// Why virtualization could not be turned on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The CPU does not offer it at all (what is missing).
    Missing(&'static str),
    /// The CPU has it but firmware disabled it (which control).
    DisabledByFirmware(&'static str),
    /// A VMX instruction failed (which one).
    VmxFailed(&'static str),
    /// No frame for a VMXON region or host save area.
    OutOfFrames,
    /// Another vendor.
    UnknownVendor([u8; 12]),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(what) => write!(f, "no hardware virtualization ({what})"),
            Self::UnknownVendor(id) => write!(
                f,
                "no hardware virtualization (CPU vendor {:?} is neither GenuineIntel nor AuthenticAMD)",
                core::str::from_utf8(id).unwrap_or("?")
            ),
            Self::DisabledByFirmware(what) => {
                write!(f, "hardware virtualization disabled by firmware ({what})")
            }
            Self::VmxFailed(what) => write!(f, "{what} failed"),
            Self::OutOfFrames => write!(f, "no memory for the virtualization root structure"),
        }
    }
}

/// Virtualization switched on, with what the backend keeps for it.
#[derive(Debug)]
pub enum Enabled {
    Vmx(vmx::VmxOn),
    Svm(svm::SvmOn),
}

/// Turn hardware virtualization on for this CPU.
pub fn enable(caps: &Caps) -> Result<Enabled, Error> {
    match caps.vendor {
        Vendor::Intel => {
            let v = caps
                .vmx
                .ok_or(Error::Missing("intel CPU without VMX: CPUID.1:ECX[5]=0"))?;
            vmx::enable(&v).map(Enabled::Vmx)
        }
        Vendor::Amd => {
            let s = caps.svm.ok_or(Error::Missing(
                "amd CPU without SVM: CPUID.8000_0001h:ECX[2]=0",
            ))?;
            svm::enable(&s).map(Enabled::Svm)
        }
        Vendor::Other(id) => Err(Error::UnknownVendor(id)),
    }
}

/// Run the log-dirty self-test on this CPU's backend (see
/// [`selftest::run`]); true when every epoch of every mode passed.
pub fn selftest(enabled: &mut Enabled, plan: &selftest::Plan) -> bool {
    match enabled {
        Enabled::Vmx(on) => vmx::selftest(on, plan),
        Enabled::Svm(on) => svm::selftest(on, plan),
    }
}

/// Run the guest as a replicated primary (the dom0 tool drives it through
/// the control area), on either backend, with the tracker the tool asks
/// for among the backend's.
pub fn primary(enabled: &mut Enabled, plan: &selftest::Plan) -> bool {
    match enabled {
        Enabled::Svm(on) => svm::primary(on, plan),
        Enabled::Vmx(on) => vmx::primary(on, plan),
    }
}

/// Wait as a standby for the backup tool's `Activate`, then run the guest
/// from the committed checkpoint.
pub fn standby(enabled: &mut Enabled, plan: &selftest::Plan) -> bool {
    match enabled {
        Enabled::Svm(on) => svm::standby(on, plan),
        Enabled::Vmx(on) => vmx::standby(on, plan),
    }
}

/// The in-machine replica (test only, see [`replica`]): the key-value
/// service replicated with tracker `mode` to a consumer inside the
/// machine, which then fails over.
pub fn replica(
    enabled: &mut Enabled,
    plan: &selftest::Plan,
    mode: doppel_abi::msg::LogDirtyMode,
) -> bool {
    match enabled {
        Enabled::Svm(on) => svm::replica(on, plan, mode),
        Enabled::Vmx(on) => vmx::replica(on, plan, mode),
    }
}

/// The hostile guest's escape probes on this CPU's backend (see
/// [`isolation`]); true when every probe was contained.
pub fn isolation(enabled: &mut Enabled, plan: &selftest::Plan) -> bool {
    match enabled {
        Enabled::Vmx(on) => vmx::isolation(on, plan),
        Enabled::Svm(on) => svm::isolation(on, plan),
    }
}

/// Boot a stock Linux guest (see [`linux`]); true when it powered off
/// cleanly.
pub fn linux(enabled: &mut Enabled, plan: &linux::LinuxPlan<'_>) -> bool {
    match enabled {
        Enabled::Svm(on) => svm::linux(on, plan),
        Enabled::Vmx(on) => vmx::linux(on, plan),
    }
}

impl Enabled {
    /// Leave virtualization (VMXOFF / clear EFER.SVME) before powering off.
    pub fn disable(self) -> Result<(), Error> {
        match self {
            Self::Vmx(v) => v.off(),
            Self::Svm(s) => {
                s.off();
                Ok(())
            }
        }
    }
}
