//! AMD SVM: capability detection from CPUID, enabling with EFER.SVME, and
//! the SVM vCPU: a VMCB, nested paging, VMRUN and #VMEXIT decoding into the
//! vendor-neutral exit. (AMD APM vol. 2, chapter 15 "Secure Virtual
//! Machine".)
//!
//! QEMU's TCG offers no NRIP save and no decode assists: the next RIP comes
//! from EXITINFO2 for I/O; for CPUID, VMMCALL and HLT it is reported
//! unknown, and the run loop reads the instruction's bytes and accepts only
//! its exact encoding (`doppel_core::exit::exact_length`) instead of
//! assuming a length (a prefixed CPUID is 3 bytes, not 2). With NRIP save
//! (real hardware) the VMCB's nRIP is used. TCG has no flush-by-ASID
//! either, so every nested-table flush is TLB_CONTROL=1 (flush everything)
//! on the next VMRUN.
//!
//! Epoch timer: the local APIC's one-shot timer (`arch::apic`). The VMCB
//! intercepts physical interrupts (INTR) with V_INTR_MASKING set, so the
//! host's RFLAGS.IF at VMRUN, not the guest's, decides whether they reach
//! the guest's run; `svm_run` sets IF only while the timer is armed. After
//! #VMEXIT(INTR) the interrupt is still pending at the APIC (APM vol. 2,
//! "INTR Intercept"); the host takes it at once in an interrupt window, where the
//! IDT's timer handler counts it and sends the EOI, and the exit is a
//! Timer exit if that handler ran.

use doppel_abi::msg::LogDirtyMode;
use doppel_core::addr::HostPhysAddr;
use doppel_core::exit::{CodePaging, ExitKind, Insn, IoAccess, VmExit};
use doppel_core::hostile::{fnv1a, FNV_START};
use doppel_core::hvm::{DescTable, PendingEvent, SegAttr, Segment, VcpuState};
use doppel_core::hw::vmcb::{
    exitcode, intercept3, intercept4, tlb_control, IoExitInfo, Vmcb, VmcbSegment,
};
use doppel_core::hw::vmcs::{event_from_info, event_to_info, intr_info};
use doppel_core::msr::{self, nr};
use doppel_core::paging::fault::decode_npf;
use doppel_core::paging::{ncr3, Flush, NptEntry};
use doppel_core::selftest::Mode;
use doppel_kernel::config::Broken;
use x86_64::registers::model_specific::EferFlags;

use crate::arch::apic;
use crate::arch::instr::{cpuid, interrupt_window, rdmsr, rdtsc, svm_run, vmsave, wrmsr};
use crate::arch::IA32_EFER;
use crate::mem::{frames, PAGE_SIZE};

use super::vcpu::{GuestRegs, GuestStart, Vcpu};
use super::Error;

const VM_CR: u32 = 0xC001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
const VM_HSAVE_PA: u32 = 0xC001_0117;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmCaps {
    /// Nested paging (CPUID 8000_000Ah EDX[0]).
    pub npt: bool,
    /// Next-RIP save on #VMEXIT (CPUID 8000_000Ah EDX[3]).
    pub nrips: bool,
    /// Number of ASIDs (CPUID 8000_000Ah EBX).
    pub asids: u32,
}

/// SVM capabilities, or `None` if CPUID 8000_0001h ECX[2] (SVM) is clear.
pub fn detect() -> Option<SvmCaps> {
    let max_ext = cpuid(0x8000_0000, 0).eax;
    if max_ext < 0x8000_0001 || cpuid(0x8000_0001, 0).ecx & (1 << 2) == 0 {
        return None;
    }
    let r = if max_ext >= 0x8000_000A {
        cpuid(0x8000_000A, 0)
    } else {
        Default::default()
    };
    log::debug!("svm: CPUID 8000_000Ah ebx={:#x} edx={:#x}", r.ebx, r.edx);
    Some(SvmCaps {
        npt: r.edx & (1 << 0) != 0,
        nrips: r.edx & (1 << 3) != 0,
        asids: r.ebx,
    })
}

/// SVM enabled; owns the host save area.
#[derive(Debug)]
pub struct SvmOn {
    /// Physical address of the host save area (VM_HSAVE_PA).
    pub hsave: u64,
}

pub fn enable(_caps: &SvmCaps) -> Result<SvmOn, Error> {
    if rdmsr(VM_CR) & VM_CR_SVMDIS != 0 {
        return Err(Error::DisabledByFirmware("VM_CR.SVMDIS=1"));
    }
    let hsave = frames::alloc_zeroed()
        .ok_or(Error::OutOfFrames)?
        .start_address()
        .as_u64();
    let efer = rdmsr(IA32_EFER);
    // SAFETY: EFER.SVME only enables the SVM instructions; the CPU has SVM
    // and firmware has not disabled it (checked above).
    unsafe { wrmsr(IA32_EFER, efer | EFER_SVME) };
    // SAFETY: `hsave` is a zeroed frame given to the CPU for host state on
    // VMRUN from now on.
    unsafe { wrmsr(VM_HSAVE_PA, hsave) };
    log::debug!("svm: on, host save area at {hsave:#x}");
    Ok(SvmOn { hsave })
}

impl SvmOn {
    /// Clear EFER.SVME.
    pub fn off(self) {
        // SAFETY: no guest runs; clearing SVME only disables SVM instructions.
        unsafe { wrmsr(IA32_EFER, rdmsr(IA32_EFER) & !EFER_SVME) };
        // SAFETY: a zero VM_HSAVE_PA just unsets the host save area, which
        // the CPU uses only on VMRUN (impossible with SVME clear).
        unsafe { wrmsr(VM_HSAVE_PA, 0) };
        frames::free(self.hsave, PAGE_SIZE);
    }
}

/// The log-dirty self-test under SVM: NPT write-protect mode, and the
/// dirty-bit scan mode (the nested walk sets NPT dirty bits in TCG).
pub fn selftest(_on: &mut SvmOn, plan: &super::selftest::Plan) -> bool {
    let pass = passthrough(plan);
    with_host_vmcb(|host_vmcb, nrips| {
        let modes = [Mode::WriteProtect, Mode::AdScan];
        super::selftest::run::<NptEntry, SvmVcpu, _>(&modes, plan, true, |start, root, mode| {
            let mut v = SvmVcpu::new(start, root, host_vmcb, nrips, pass)?;
            if mode == Mode::WriteProtect && !v.arm_timer(Some(TIMER_PROBE_TICKS)) {
                return Err("arming the local APIC timer failed");
            }
            Ok(v)
        })
    })
}

/// Run the test guest as a replicated primary under SVM (see
/// [`super::replicate`]).
pub fn primary(_on: &mut SvmOn, plan: &super::selftest::Plan) -> bool {
    let pass = passthrough(plan);
    with_host_vmcb(|host_vmcb, nrips| {
        super::replicate::primary::<NptEntry, SvmVcpu, _>(plan, true, &MODES, |start, root, _| {
            SvmVcpu::new(start, root, host_vmcb, nrips, pass)
        })
    })
}

/// The log-dirty modes SVM tracks with: NPT write-protect and the scan of
/// the NPT dirty bits.
const MODES: [LogDirtyMode; 2] = [LogDirtyMode::WriteProtect, LogDirtyMode::AdScan];

/// The key-value service replicated to the in-machine replica under SVM
/// (see [`super::replica`]).
pub fn replica(_on: &mut SvmOn, plan: &super::selftest::Plan, mode: LogDirtyMode) -> bool {
    with_host_vmcb(|host_vmcb, nrips| {
        super::replica::replica::<NptEntry, SvmVcpu, _, _>(
            plan,
            true,
            &MODES,
            mode,
            |start, root, _| SvmVcpu::new(start, root, host_vmcb, nrips, false),
            |state, root| SvmVcpu::with_state(state, root, host_vmcb, nrips, false),
        )
    })
}

/// The hostile guest's escape probes under SVM (see [`super::isolation`]).
pub fn isolation(_on: &mut SvmOn, plan: &super::selftest::Plan) -> bool {
    let pass = passthrough(plan);
    with_host_vmcb(|host_vmcb, nrips| {
        super::isolation::run::<NptEntry, SvmVcpu, _>(
            msr::Vendor::Svm,
            plan,
            true,
            |start, root| SvmVcpu::new(start, root, host_vmcb, nrips, pass),
        )
    })
}

/// Boot a stock Linux guest under SVM (see [`super::linux`]).
pub fn linux(_on: &mut SvmOn, plan: &super::linux::LinuxPlan<'_>) -> bool {
    with_host_vmcb(|host_vmcb, nrips| {
        super::linux::run::<NptEntry, SvmVcpu, _>(msr::Vendor::Svm, plan, &MODES, |st, root, _| {
            SvmVcpu::with_state(st, root, host_vmcb, nrips, false)
        })
    })
}

/// The deliberately broken build's all-zero MSR permission map.
fn passthrough(plan: &super::selftest::Plan) -> bool {
    plan.broken == Some(Broken::MsrPassthrough)
}

/// Wait as a standby; at `Activate`, run the guest from the vCPU record
/// the backup tool wrote (see [`super::replicate::standby`]).
pub fn standby(_on: &mut SvmOn, plan: &super::selftest::Plan) -> bool {
    let pass = passthrough(plan);
    with_host_vmcb(|host_vmcb, nrips| {
        super::replicate::standby::<NptEntry, SvmVcpu, _>(plan, |state, root| {
            SvmVcpu::with_state(state, root, host_vmcb, nrips, pass)
        })
    })
}

/// Save this CPU's host state for the world switch (VMSAVE into a fresh
/// page), run `f` with it and NRIP-save support, free the page.
fn with_host_vmcb(f: impl FnOnce(u64, bool) -> bool) -> bool {
    let nrips = detect().is_some_and(|c| c.nrips);
    let Some(host) = frames::alloc_zeroed() else {
        log::error!("svm: no frame for the host VMCB");
        return false;
    };
    let host_vmcb = host.start_address().as_u64();
    // SAFETY: SVME is on and `host_vmcb` is a fresh frame we own.
    unsafe { vmsave(host_vmcb) };
    let ok = f(host_vmcb, nrips);
    frames::free(host_vmcb, PAGE_SIZE);
    ok
}

/// TSC ticks after which the LAPIC timer is armed to fire once in the
/// write-protect run, as the VMX backend does with its preemption timer:
/// the `svm: lapic timer` line shows the exit arrived. Unlike that timer
/// the LAPIC counts host time too (the vCPU's set-up alone takes about
/// 90 000 ticks under QEMU `-icount`), so the period is long enough to end
/// in the middle of the guest's run; had it fired while the host handled an
/// exit, it would end the next VMRUN at once.
const TIMER_PROBE_TICKS: u64 = 1_000_000;

/// VMCB V_INTR_MASKING (VINTR bit 24): physical interrupts are masked by
/// the host's RFLAGS.IF while the guest runs.
const V_INTR_MASKING: u64 = 1 << 24;

/// Guest ASID (0 is the host's).
const GUEST_ASID: u32 = 1;
/// I/O permission map: 12 KiB, every bit set = every port intercepted.
const IOPM_BYTES: u64 = 3 * PAGE_SIZE;
/// MSR permission map: 8 KiB, built by `doppel_core::msr::build_svm_msrpm`
/// (every MSR intercepted but the allow-list).
const MSRPM_BYTES: u64 = 2 * PAGE_SIZE;
const _: () = assert!(MSRPM_BYTES as usize == msr::SVM_MSRPM_BYTES);

/// EFER.SVME: SVM on (the host's), required in every guest's EFER too.
const EFER_SVME: u64 = EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits();
/// The power-on default PAT (must be a valid PAT when nested paging is on).
const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

/// One SVM vCPU: its VMCB, I/O and MSR permission maps.
pub struct SvmVcpu {
    vmcb: u64,
    iopm: u64,
    msrpm: u64,
    host_vmcb: u64,
    nrips: bool,
    regs: GuestRegs,
    /// The LAPIC timer is armed (host IF is set for VMRUN).
    timer_on: bool,
    /// The last period armed, and timer exits seen (for the probe line).
    timer_armed: Option<u64>,
    timer_exits: u64,
    /// TSC when the timer was last armed.
    timer_armed_at: u64,
    /// The last #VMEXIT(INTR) was our timer's interrupt.
    intr_was_timer: bool,
}

impl SvmVcpu {
    fn new(
        start: &GuestStart,
        nested_root: HostPhysAddr,
        host_vmcb: u64,
        nrips: bool,
        msr_passthrough: bool,
    ) -> Result<Self, &'static str> {
        let vmcb = frames::alloc_zeroed()
            .ok_or("no frame for the VMCB")?
            .start_address()
            .as_u64();
        let Some(iopm) = frames::alloc_contiguous(IOPM_BYTES, PAGE_SIZE) else {
            frames::free(vmcb, PAGE_SIZE);
            return Err("no memory for the I/O permission map");
        };
        let Some(msrpm) = frames::alloc_contiguous(MSRPM_BYTES, PAGE_SIZE) else {
            frames::free(vmcb, PAGE_SIZE);
            frames::free(iopm, IOPM_BYTES);
            return Err("no memory for the MSR permission map");
        };
        // SAFETY: `iopm` is IOPM_BYTES of fresh identity-mapped memory.
        unsafe { core::ptr::write_bytes(iopm as *mut u8, 0xff, IOPM_BYTES as usize) };
        // SAFETY: `msrpm` is MSRPM_BYTES (== SVM_MSRPM_BYTES) of fresh,
        // identity-mapped, page-aligned memory this vCPU owns; the CPU
        // reads it only while this vCPU runs.
        let map = unsafe { &mut *(msrpm as *mut [u8; msr::SVM_MSRPM_BYTES]) };
        msr::build_svm_msrpm(map, msr_passthrough);
        if msr_passthrough {
            log::warn!("svm: broken=msr-passthrough: the MSR permission map is all zero");
        }
        let mut v = Self {
            vmcb,
            iopm,
            msrpm,
            host_vmcb,
            nrips,
            regs: GuestRegs::default(),
            timer_on: false,
            timer_armed: None,
            timer_exits: 0,
            timer_armed_at: 0,
            intr_was_timer: false,
        };
        v.setup(start, nested_root);
        Ok(v)
    }

    /// A vCPU that starts from a whole architectural state (the Linux
    /// guest's PVH entry, or a restore from records) rather than the test
    /// guests' long-mode start.
    pub fn with_state(
        st: &VcpuState,
        nested_root: HostPhysAddr,
        host_vmcb: u64,
        nrips: bool,
        msr_passthrough: bool,
    ) -> Result<Self, &'static str> {
        let start = GuestStart {
            rip: st.rip,
            rsp: st.rsp,
            rdi: st.rdi,
            cr3: st.cr3,
        };
        let mut v = Self::new(&start, nested_root, host_vmcb, nrips, msr_passthrough)?;
        v.load_state(st);
        Ok(v)
    }

    fn vmcb(&self) -> &Vmcb {
        // SAFETY: `self.vmcb` is a frame this vCPU owns for its lifetime;
        // `Vmcb` is a plain 4 KiB repr(C) struct valid for any bytes. The CPU
        // writes it only inside `svm_run`, which takes `&mut self`.
        unsafe { &*(self.vmcb as *const Vmcb) }
    }

    fn vmcb_mut(&mut self) -> &mut Vmcb {
        // SAFETY: as in `vmcb`, and `&mut self` makes this access unique.
        unsafe { &mut *(self.vmcb as *mut Vmcb) }
    }

    fn setup(&mut self, start: &GuestStart, nested_root: HostPhysAddr) {
        let (iopm, msrpm) = (self.iopm, self.msrpm);
        let v = self.vmcb_mut();
        let c = &mut v.control;
        c.intercept3 = intercept3::CPUID
            | intercept3::HLT
            | intercept3::IOIO_PROT
            | intercept3::MSR_PROT
            | intercept3::SHUTDOWN
            | intercept3::INTR
            | intercept3::INVLPGA;
        // CR4 writes exit and are refused: TCG lacks the XSETBV intercept,
        // and CR4.OSXSAVE would let a guest reach the host's XCR0.
        c.intercept_cr_write = 1 << 4;
        c.vintr = V_INTR_MASKING;
        // Every SVM instruction and XSETBV exit: VMLOAD/VMSAVE take host-
        // physical addresses, STGI/CLGI the host's interrupt gate, SKINIT
        // the machine; the dispatch refuses them all.
        c.intercept4 = intercept4::VMRUN
            | intercept4::VMMCALL
            | intercept4::VMLOAD
            | intercept4::VMSAVE
            | intercept4::STGI
            | intercept4::CLGI
            | intercept4::SKINIT
            | intercept4::XSETBV;
        c.iopm_base_pa = iopm;
        c.msrpm_base_pa = msrpm;
        c.guest_asid = GUEST_ASID;
        c.tlb_control = tlb_control::FLUSH_ALL;
        c.np_enable = 1;
        c.n_cr3 = ncr3(nested_root);

        v.save.g_pat = DEFAULT_PAT;
        self.restore(&VcpuState::long_mode_start(start));
    }

    /// Load a checkpointed vCPU (the inverse of [`Vcpu::state`]): every
    /// register the record carries goes into the VMCB save area or the
    /// general registers. The control area (intercepts, nested paging)
    /// stays as `setup` made it.
    fn restore(&mut self, st: &VcpuState) {
        // An event that was being delivered is delivered at the next VMRUN.
        self.vmcb_mut().control.eventinj = st.pending_event.map_or(0, eventinj);
        let seg = |g: &Segment| VmcbSegment {
            selector: g.selector,
            attrib: g.attr.to_svm(),
            limit: g.limit,
            base: g.base,
        };
        let table = |t: &DescTable| VmcbSegment {
            base: t.base,
            limit: u32::from(t.limit),
            ..VmcbSegment::default()
        };
        let s = &mut self.vmcb_mut().save;
        s.cs = seg(&st.cs);
        s.ds = seg(&st.ds);
        s.es = seg(&st.es);
        s.fs = seg(&st.fs);
        s.gs = seg(&st.gs);
        s.ss = seg(&st.ss);
        s.tr = seg(&st.tr);
        s.ldtr = seg(&st.ldtr);
        s.gdtr = table(&st.gdtr);
        s.idtr = table(&st.idtr);
        // CPL is SS.DPL (APM vol. 2, "Segment State in the VMCB").
        s.cpl = ((st.ss.attr.to_svm() >> 5) & 3) as u8;
        s.efer = st.efer | EFER_SVME;
        s.cr0 = st.cr0;
        s.cr2 = st.cr2;
        s.cr3 = st.cr3;
        s.cr4 = st.cr4;
        s.dr6 = st.dr6;
        s.dr7 = st.dr7;
        s.rflags = st.rflags;
        s.rip = st.rip;
        s.rsp = st.rsp;
        s.rax = st.rax;
        s.sysenter_cs = st.sysenter_cs;
        s.sysenter_esp = st.sysenter_esp;
        s.sysenter_eip = st.sysenter_eip;
        s.kernel_gs_base = st.kernel_gs_base;
        s.star = st.star;
        s.lstar = st.lstar;
        s.cstar = st.cstar;
        s.sfmask = st.sfmask;
        self.regs = GuestRegs::of(st);
    }

    /// Decode the #VMEXIT in the VMCB.
    fn decode(&self) -> VmExit {
        let c = &self.vmcb().control;
        let rip = self.vmcb().save.rip;
        // Without NRIP save the length is unknown here (see the module
        // comment): the run loop decodes it from the instruction's bytes.
        let nrip = || (self.nrips && c.nrip != 0).then_some(c.nrip);
        let (kind, next_rip) = match c.exitcode {
            exitcode::NPF => (
                ExitKind::NestedPageFault(decode_npf(c.exitinfo1, c.exitinfo2)),
                None,
            ),
            exitcode::IOIO => match IoExitInfo::decode(c.exitinfo1) {
                // EXITINFO2 holds the RIP after the IN/OUT.
                Some(io) => (
                    ExitKind::Io(IoAccess {
                        port: io.port,
                        input: io.input,
                        size: io.size,
                        string: io.string,
                        rep: io.rep,
                    }),
                    Some(c.exitinfo2),
                ),
                None => (self.unknown(), None),
            },
            exitcode::CPUID => (ExitKind::Cpuid, nrip()),
            exitcode::VMMCALL => (ExitKind::Hypercall, nrip()),
            exitcode::HLT => (ExitKind::Hlt, nrip()),
            exitcode::SHUTDOWN => (ExitKind::Shutdown, None),
            exitcode::VINTR => (ExitKind::InterruptWindow, None),
            // MOV to CR4. With decode assists EXITINFO1 bit 63 says the
            // GPR is in bits 3:0; TCG has none, so the dispatch decodes.
            exitcode::CR4_WRITE => (
                ExitKind::CrWrite {
                    cr: 4,
                    gpr: (c.exitinfo1 >> 63 != 0).then_some((c.exitinfo1 & 15) as u8),
                },
                None,
            ),
            exitcode::INTR if self.intr_was_timer => (ExitKind::Timer, None),
            exitcode::INTR => (ExitKind::ExternalInterrupt, None),
            exitcode::INVALID => (ExitKind::EntryFailed { code: c.exitcode }, None),
            exitcode::MSR => {
                // EXITINFO1 bit 0: WRMSR; ECX the MSR, EDX:EAX the value.
                let (rax, rdx) = (self.vmcb().save.rax, self.regs.rdx);
                (
                    ExitKind::Msr {
                        msr: self.regs.rcx as u32,
                        write: c.exitinfo1 & 1 != 0,
                        value: (rdx << 32) | (rax & 0xffff_ffff),
                    },
                    nrip(),
                )
            }

            code if (exitcode::EXCP_BASE..exitcode::EXCP_BASE + 32).contains(&code) => (
                ExitKind::Exception {
                    vector: (code - exitcode::EXCP_BASE) as u8,
                    error_code: Some(c.exitinfo1 as u32),
                },
                None,
            ),
            // The virtualization instructions and XSETBV, refused.
            code => match Insn::from_svm_exitcode(code) {
                Some(insn) => (ExitKind::Privileged(insn), None),
                None => (self.unknown(), None),
            },
        };
        VmExit {
            kind,
            rip,
            next_rip,
        }
    }

    fn unknown(&self) -> ExitKind {
        let c = &self.vmcb().control;
        ExitKind::Unknown {
            code: c.exitcode,
            info1: c.exitinfo1,
            info2: c.exitinfo2,
        }
    }
}

/// EVENTINJ / EXITINTINFO (APM vol. 2, "Event Injection"): the low 32
/// bits are VMX's interruption-information word (vector 7:0, type 10:8,
/// error code valid 11, valid 31; `doppel_core::hw::vmcs::event_to_info`),
/// the error code is in 63:32.
const EVENT_VALID: u64 = intr_info::VALID as u64;
const RFLAGS_IF: u64 = 1 << 9;
/// V_IRQ (bit 8), V_INTR_PRIO (19:16), V_IGN_TPR (20) of the VINTR word.
const V_IRQ: u64 = 1 << 8;
const V_INTR_PRIO: u64 = 0xf << 16;
const V_IGN_TPR: u64 = 1 << 20;

/// An event as SVM's EVENTINJ word. SVM has no software-exception types:
/// those (5, 6) are exceptions (3) for it.
fn eventinj(ev: PendingEvent) -> u64 {
    let ev = PendingEvent {
        kind: match ev.kind {
            0 | 2 | 3 | 4 => ev.kind,
            _ => 3,
        },
        ..ev
    };
    let (info, code) = event_to_info(&ev);
    u64::from(info) | (u64::from(code) << 32)
}

/// The event an EVENTINJ/EXITINTINFO word holds, if valid.
fn pending_of(w: u64) -> Option<PendingEvent> {
    event_from_info(w as u32, (w >> 32) as u32)
}

impl Vcpu for SvmVcpu {
    fn backend(&self) -> &'static str {
        "svm"
    }

    fn run(&mut self) -> VmExit {
        let rax = self.regs.rax;
        self.vmcb_mut().save.rax = rax;
        let regs = core::ptr::addr_of_mut!(self.regs).cast::<u64>();
        // SAFETY: SVME is on (this vCPU only exists under `SvmOn`), the VMCB
        // was set up by `setup` with a nested table mapping only guest RAM,
        // `host_vmcb` holds a VMSAVE of this CPU's state, and `regs` points
        // at our GuestRegs (15 u64 in the order svm_run expects). With the
        // timer on, the VMCB intercepts INTR under V_INTR_MASKING (`setup`)
        // and the IDT handles the timer's and the spurious vector.
        unsafe { svm_run(self.vmcb, regs, self.host_vmcb, u64::from(self.timer_on)) };
        self.regs.rax = self.vmcb().save.rax;
        self.intr_was_timer = false;
        if self.vmcb().control.exitcode == exitcode::INTR {
            // The interrupt is still pending: take it now (the handler
            // sends the EOI), so it does not end the next run too.
            let before = apic::timer_irqs();
            interrupt_window();
            if apic::timer_irqs() != before {
                self.intr_was_timer = true;
                self.timer_exits += 1;
                log::debug!(
                    "svm: timer exit at guest rip={:#x}, {} TSC ticks after arming",
                    self.vmcb().save.rip,
                    rdtsc().wrapping_sub(self.timer_armed_at)
                );
                // One-shot: it has fired.
                self.timer_on = false;
            }
        }
        // A requested flush has been done by this VMRUN, an injected event
        // delivered; one the exit interrupted is delivered again at the
        // next VMRUN (APM "Event Injection": EXITINTINFO).
        let c = &mut self.vmcb_mut().control;
        c.tlb_control = tlb_control::DO_NOTHING;
        c.eventinj = if c.exitintinfo & EVENT_VALID != 0 {
            c.exitintinfo
        } else {
            0
        };
        self.decode()
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn set_rip(&mut self, rip: u64) {
        let v = self.vmcb_mut();
        if v.save.rip != rip {
            // The instruction in an STI/MOV-SS shadow (Linux's idle `sti;
            // hlt`) is done: the shadow ends with it.
            v.control.interrupt_shadow &= !1;
        }
        v.save.rip = rip;
    }

    fn flush(&mut self, flush: Flush) {
        if flush != Flush::None {
            // TCG has no flush-by-ASID: flush everything on the next VMRUN.
            self.vmcb_mut().control.tlb_control = tlb_control::FLUSH_ALL;
        }
    }

    fn arm_timer(&mut self, tsc_ticks: Option<u64>) -> bool {
        let apic = match apic::get(crate::mem::paging::set_uncached) {
            Ok(a) => a,
            Err(e) => {
                log::error!("svm: local APIC timer: {e}");
                return false;
            }
        };
        match tsc_ticks {
            Some(t) => {
                self.timer_armed_at = rdtsc();
                apic.arm_oneshot(t);
                self.timer_on = true;
                self.timer_armed = Some(t);
            }
            None => {
                apic.disarm();
                self.timer_on = false;
            }
        }
        true
    }

    fn state(&self) -> VcpuState {
        let s = &self.vmcb().save;
        let seg = |v: &VmcbSegment| Segment {
            selector: v.selector,
            base: v.base,
            limit: v.limit,
            attr: SegAttr::from_svm(v.attrib),
        };
        let table = |v: &VmcbSegment| DescTable {
            base: v.base,
            limit: v.limit as u16,
        };
        let mut st = VcpuState {
            rip: s.rip,
            rsp: s.rsp,
            rflags: s.rflags,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            dr6: s.dr6,
            dr7: s.dr7,
            cs: seg(&s.cs),
            ds: seg(&s.ds),
            es: seg(&s.es),
            fs: seg(&s.fs),
            gs: seg(&s.gs),
            ss: seg(&s.ss),
            tr: seg(&s.tr),
            ldtr: seg(&s.ldtr),
            gdtr: table(&s.gdtr),
            idtr: table(&s.idtr),
            // The guest's EFER without SVME, which is the host's business.
            efer: s.efer & !EFER_SVME,
            sysenter_cs: s.sysenter_cs,
            sysenter_esp: s.sysenter_esp,
            sysenter_eip: s.sysenter_eip,
            kernel_gs_base: s.kernel_gs_base,
            star: s.star,
            lstar: s.lstar,
            cstar: s.cstar,
            sfmask: s.sfmask,
            pending_event: pending_of(self.vmcb().control.eventinj),
            ..VcpuState::default()
        };
        self.regs.store(&mut st);
        st
    }

    fn inject(&mut self, ev: PendingEvent) -> bool {
        self.vmcb_mut().control.eventinj = eventinj(ev);
        true
    }

    fn interrupted_event(&self) -> Option<PendingEvent> {
        pending_of(self.vmcb().control.exitintinfo)
    }

    fn interruptible(&self) -> bool {
        let v = self.vmcb();
        v.save.rflags & RFLAGS_IF != 0
            && v.control.interrupt_shadow & 1 == 0
            && v.control.eventinj & EVENT_VALID == 0
    }

    fn set_interrupt_window(&mut self, on: bool) {
        let c = &mut self.vmcb_mut().control;
        if on {
            // A virtual interrupt of the highest priority, TPR ignored:
            // the VINTR intercept fires as soon as the guest could take it.
            c.vintr |= V_IRQ | V_IGN_TPR | V_INTR_PRIO;
            c.intercept3 |= intercept3::VINTR;
        } else {
            c.vintr &= !(V_IRQ | V_IGN_TPR | V_INTR_PRIO);
            c.intercept3 &= !intercept3::VINTR;
        }
    }

    fn set_tsc_offset(&mut self, offset: u64) -> bool {
        self.vmcb_mut().control.tsc_offset = offset;
        true
    }

    fn set_cr(&mut self, cr: u8, value: u64) -> bool {
        let v = self.vmcb_mut();
        match cr {
            0 => v.save.cr0 = value,
            3 => v.save.cr3 = value,
            4 => v.save.cr4 = value,
            _ => return false,
        }
        // Paging-mode bits change what the TLB may hold.
        v.control.tlb_control = tlb_control::FLUSH_ALL;
        true
    }

    fn set_efer(&mut self, value: u64) -> bool {
        self.vmcb_mut().save.efer = value | EFER_SVME;
        true
    }

    fn load_state(&mut self, st: &VcpuState) -> bool {
        self.restore(st);
        true
    }

    fn cs_long(&self) -> bool {
        SegAttr::from_svm(self.vmcb().save.cs.attrib).long()
    }

    fn code_paging(&self) -> CodePaging {
        let s = &self.vmcb().save;
        CodePaging {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs_long: self.cs_long(),
        }
    }

    fn switched_msr(&self, m: u32) -> Option<u64> {
        let s = &self.vmcb().save;
        Some(match m {
            nr::FS_BASE => s.fs.base,
            nr::GS_BASE => s.gs.base,
            nr::KERNEL_GS_BASE => s.kernel_gs_base,
            nr::STAR => s.star,
            nr::LSTAR => s.lstar,
            nr::CSTAR => s.cstar,
            nr::SFMASK => s.sfmask,
            nr::SYSENTER_CS => s.sysenter_cs,
            nr::SYSENTER_ESP => s.sysenter_esp,
            nr::SYSENTER_EIP => s.sysenter_eip,
            _ => return None,
        })
    }

    fn set_switched_msr(&mut self, m: u32, value: u64) -> bool {
        let s = &mut self.vmcb_mut().save;
        let field = match m {
            nr::FS_BASE => &mut s.fs.base,
            nr::GS_BASE => &mut s.gs.base,
            nr::KERNEL_GS_BASE => &mut s.kernel_gs_base,
            nr::STAR => &mut s.star,
            nr::LSTAR => &mut s.lstar,
            nr::CSTAR => &mut s.cstar,
            nr::SFMASK => &mut s.sfmask,
            nr::SYSENTER_CS => &mut s.sysenter_cs,
            nr::SYSENTER_ESP => &mut s.sysenter_esp,
            nr::SYSENTER_EIP => &mut s.sysenter_eip,
            _ => return false,
        };
        *field = value;
        true
    }

    fn control_pa(&self) -> u64 {
        self.vmcb
    }

    fn confinement(&self) -> u64 {
        let c = &self.vmcb().control;
        let words = [
            u64::from(c.intercept_cr_read) | u64::from(c.intercept_cr_write) << 16,
            u64::from(c.intercept_exceptions),
            u64::from(c.intercept3) | u64::from(c.intercept4) << 32,
            u64::from(c.intercept5),
            c.iopm_base_pa,
            c.msrpm_base_pa,
            u64::from(c.guest_asid),
            c.np_enable,
            c.n_cr3,
            c.vintr & V_INTR_MASKING,
        ];
        let mut h = FNV_START;
        for w in words {
            h = fnv1a(h, &w.to_le_bytes());
        }
        // SAFETY: both maps are this vCPU's own, identity mapped, of the
        // sizes allocated in `new`; the CPU only reads them.
        let (iopm, msrpm) = unsafe {
            (
                core::slice::from_raw_parts(self.iopm as *const u8, IOPM_BYTES as usize),
                core::slice::from_raw_parts(self.msrpm as *const u8, MSRPM_BYTES as usize),
            )
        };
        fnv1a(fnv1a(h, iopm), msrpm)
    }
}

impl Drop for SvmVcpu {
    fn drop(&mut self) {
        if self.timer_on {
            self.arm_timer(None);
        }
        if let Some(ticks) = self.timer_armed {
            log::debug!("svm: spurious interrupts so far: {}", apic::spurious_irqs());
            log::info!(
                "svm: lapic timer: armed for {ticks} TSC ticks, timer_exits={}",
                self.timer_exits
            );
        }
        frames::free(self.vmcb, PAGE_SIZE);
        frames::free(self.iopm, IOPM_BYTES);
        frames::free(self.msrpm, MSRPM_BYTES);
    }
}
