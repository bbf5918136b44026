//! `mode=isolation`: the hostile guest tries every escape of
//! `doppel_core::hostile::PROBES` that applies to this backend, one probe
//! per fresh guest (fresh RAM contents, nested table and vCPU), and the
//! hypervisor judges each.
//!
//! A probe is contained when the guest never gets past its instruction,
//! or when it touched only its own copy of an allow-listed MSR
//! (`how=virtualized`: a read returned the marker planted in the guest's
//! copy, a write landed in the guest's copy). Not getting past it means,
//! normally, that the instruction raised an exception in the guest: the
//! dispatch refused it and injected #UD (an instruction) or #GP(0) (an
//! MSR, a control-register write; `doppel_core::fault`), or the CPU raised
//! its own. The hostile guest's IDT handler reports it with `FAULTED`:
//! `how=fault vector=V error=E` (decimal; E is 0 for a vector without an
//! error code). After a refusal the report must name the exception
//! injected and the refused instruction's RIP; any other is
//! `outcome=unclear how=fault-elsewhere`. A run that stopped at the refusal instead (a backend that
//! could not inject) reads `how=refused`; a guest that shut down (triple
//! fault) `how=shutdown`; one stopped at an intercepted exception
//! `how=exception`. After every probe the host must be exactly as before: the
//! hypervisor's code and read-only data, its page tables, the replication
//! control area and its locator page, the vCPU's confinement (intercepts,
//! MSR and I/O maps) and the host MSRs it relies on. Anything else is an
//! escape.
//!
//! Before the first probe the run publishes a replication control area for
//! the probe guest's RAM, as a replicated primary does
//! (`replicate::publish_unserved`), so that the probes aimed at it
//! (`Arg::ReplicationControl`) hit a real one, found through the real
//! locator page. Nobody serves it: no tool attaches in this mode. One line per probe, then
//! `isolation: backend=svm probes=N contained=N escaped=0 result=pass`.

use core::sync::atomic::{AtomicU64, Ordering};

use doppel_abi::control::Field;
use doppel_abi::guest::PROGRAM_HOSTILE;
use doppel_abi::locator::{LOCATOR_AT, LOCATOR_SIZE};
use doppel_core::addr::HostPhysAddr;
use doppel_core::exit::{ExitKind, VmExit};
use doppel_core::fault;
use doppel_core::hostile::{self, fnv1a, Arg, Op, Probe, FNV_START, PROBES};
use doppel_core::hvm::PendingEvent;
use doppel_core::msr::{self, nr, Vendor};
use doppel_core::paging::NestedEntry;
use doppel_core::selftest::Mode;
use x86_64::structures::paging::PageTableFlags;

use super::guest::{self, GuestRam, Workload};
use super::replicate::{self, Published};
use super::run::{run_mode, EpochEnd, EpochSink, Plan};
use super::vcpu::{GuestStart, Vcpu};
use crate::arch::instr::{rdmsr, read_cr3};
use crate::console;
use crate::mem::KernelLayout;

/// Guest RAM of each probe's guest (the smallest a guest may have).
const PROBE_RAM: u64 = 8 << 20;

/// Host MSRs that must hold their values through every probe (TSC moves
/// on its own and is left out).
const HOST_MSRS: &[u32] = &[
    nr::EFER,
    nr::STAR,
    nr::LSTAR,
    nr::SFMASK,
    nr::FS_BASE,
    nr::GS_BASE,
    nr::KERNEL_GS_BASE,
    nr::SYSENTER_CS,
    nr::SYSENTER_ESP,
    nr::SYSENTER_EIP,
    nr::APIC_BASE,
    nr::MTRR_PHYS_BASE0,
];

/// What one probe's guest did, as the run saw it.
#[derive(Default)]
struct Watch {
    /// `ESCAPED` with the value it read.
    escaped: Option<u64>,
    /// `FAULTED`: the vector, error code and RIP the guest's handler got.
    faulted: Option<(u64, u64, u64)>,
    /// The last refusal: where it was, and the vector injected there.
    refused: Option<(u64, u8)>,
    /// The exit the run stopped at.
    stop: Option<ExitKind>,
}

impl EpochSink for Watch {
    fn epoch_end(&mut self, _e: &EpochEnd<'_>) -> Result<(), &'static str> {
        Err("the hostile guest ends no epochs")
    }

    fn escaped(&mut self, _probe: u64, value: u64) -> Result<(), &'static str> {
        self.escaped = Some(value);
        Ok(())
    }

    fn faulted(&mut self, vector: u64, error: u64, rip: u64) -> Result<(), &'static str> {
        log::info!(
            "isolation: the probe took vector {vector} error code {error:#x} at rip={rip:#x}"
        );
        self.faulted = Some((vector, error, rip));
        Ok(())
    }

    fn refused(&mut self, exit: &VmExit, ev: &PendingEvent) {
        self.refused = Some((exit.rip, ev.vector));
    }

    fn stopped(&mut self, exit: &VmExit) {
        self.stop = Some(exit.kind);
    }
}

/// The host state a probe must leave alone.
#[derive(Clone, Copy, PartialEq, Eq)]
struct HostState {
    image: u64,
    page_tables: u64,
    /// The replication control area and the locator page.
    control: u64,
    msrs: [u64; 16],
}

impl HostState {
    fn take(vendor: Vendor, ctl: &Published) -> Self {
        let layout = KernelLayout::get();
        let mut msrs = [0u64; 16];
        for (v, m) in msrs.iter_mut().zip(HOST_MSRS) {
            *v = rdmsr(*m);
        }
        if vendor == Vendor::Svm {
            // AMD's alone (RDMSR of VM_HSAVE_PA faults on Intel, and CSTAR
            // is not architectural there).
            msrs[HOST_MSRS.len()] = rdmsr(nr::VM_HSAVE_PA);
            msrs[HOST_MSRS.len() + 1] = rdmsr(nr::CSTAR);
        }
        Self {
            image: hash_range(layout.text.start, layout.text.end)
                ^ hash_range(layout.rodata.start, layout.rodata.end).rotate_left(1),
            page_tables: hash_tables(read_cr3() & ADDR_MASK, 4),
            control: hash_control(ctl),
            msrs,
        }
    }

    /// What differs from `before`, for the probe's line.
    fn changed(&self, before: &Self) -> Option<&'static str> {
        if self.image != before.image {
            Some("image")
        } else if self.page_tables != before.page_tables {
            Some("page-tables")
        } else if self.control != before.control {
            Some("control-area")
        } else if self.msrs != before.msrs {
            Some("host-msrs")
        } else {
            None
        }
    }
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const ACCESSED_DIRTY: u64 = PageTableFlags::ACCESSED.bits() | PageTableFlags::DIRTY.bits();

fn hash_range(start: u64, end: u64) -> u64 {
    // SAFETY: [start, end) is part of the kernel image (linker symbols),
    // identity mapped and readable; reading it has no side effects.
    let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    fnv1a(FNV_START, bytes)
}

/// Fingerprint of `len` bytes at machine address `pa`, read as the
/// hypervisor and the tool access shared pages: 64-bit atomic loads.
///
/// # Safety
/// `pa..pa + len` is identity-mapped memory that stays allocated for the
/// whole run, 8-byte aligned, `len` a multiple of 8, and reached by
/// everyone else only through atomic accesses.
unsafe fn hash_shared(h: u64, pa: u64, len: u64) -> u64 {
    // SAFETY: the caller's contract; every access is an atomic load.
    let words = unsafe { core::slice::from_raw_parts(pa as *const AtomicU64, (len / 8) as usize) };
    words
        .iter()
        .fold(h, |h, w| fnv1a(h, &w.load(Ordering::Relaxed).to_le_bytes()))
}

/// Fingerprint of the published replication control area and the locator
/// page. Nothing writes either during a probe (no tool is attached and the
/// hypervisor serves no command in this mode), so all of it must stay
/// constant, header, rings, channels, vCPU area and pfn list alike; only
/// the staging area is left out: it is as large as the guest's RAM (8 MiB),
/// too slow to hash twice per probe under Bochs, and holds nothing the
/// hypervisor or the tool reads before an epoch end the probes never reach.
/// The probes aim at the header's page, which is hashed.
fn hash_control(ctl: &Published) -> u64 {
    let (s_off, s_len) = ctl.view.region(Field::Staging);
    let (s_off, s_end) = (s_off as u64, (s_off + s_len) as u64);
    // SAFETY: the control area (`publish_unserved`: page aligned, whole
    // pages, never freed, every access atomic) split around its staging
    // region, whose offset and size are page multiples (the header checks);
    // the locator page is reserved at boot, identity mapped, accessed only
    // atomically.
    unsafe {
        let h = hash_shared(FNV_START, ctl.pa, s_off);
        let h = hash_shared(h, ctl.pa + s_end, ctl.size - s_end);
        hash_shared(h, LOCATOR_AT, LOCATOR_SIZE)
    }
}

/// Fingerprint of the host's page-table tree below the table at `table`
/// (`level` 4 = PML4): every table page's bytes, in walk order.
fn hash_tables(table: u64, level: u32) -> u64 {
    // SAFETY: `table` is a page-table page of the running kernel (CR3 or
    // an entry of a table above it), identity mapped; only read.
    let entries = unsafe { &*(table as *const [u64; 512]) };
    let mut h = FNV_START;
    for e in entries {
        // Accessed and dirty are the CPU's, set as the host touches memory.
        h = fnv1a(h, &(e & !ACCESSED_DIRTY).to_le_bytes());
    }
    if level > 1 {
        for e in entries {
            // Present, not a large page: a table one level down.
            if e & 1 != 0 && e & (1 << 7) == 0 {
                h = fnv1a(h, &hash_tables(e & ADDR_MASK, level - 1).to_le_bytes());
            }
        }
    }
    h
}

/// How a probe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Contained(&'static str),
    /// Contained: the probe's instruction raised exception `vector` (with
    /// error code `error`) in the guest, whose handler said so.
    Faulted {
        vector: u8,
        error: u32,
    },
    Escaped(&'static str),
    /// Neither: the run stopped some other way (an unknown exit, an entry
    /// failure). Not counted as contained.
    Unclear(&'static str),
}

/// Run every probe of `vendor`; true when all were contained.
pub fn run<E, V, F>(vendor: Vendor, plan: &Plan, vmmcall: bool, mut make_vcpu: F) -> bool
where
    E: NestedEntry,
    V: Vcpu,
    F: FnMut(&GuestStart, HostPhysAddr) -> Result<V, &'static str>,
{
    let backend = match vendor {
        Vendor::Svm => "svm",
        Vendor::Vmx => "vmx",
    };
    let mut ram = match GuestRam::new(PROBE_RAM) {
        Ok(r) => r,
        Err(e) => {
            log::error!("isolation: {e}");
            return false;
        }
    };
    let ctl = match replicate::publish_unserved(&ram) {
        Ok(c) => c,
        Err(e) => {
            log::error!("isolation: publishing the replication control area: {e}");
            return false;
        }
    };
    log::info!(
        "isolation: replication control area at {:#x} ({} bytes)",
        ctl.pa,
        ctl.size
    );
    let (mut probes, mut contained, mut escaped) = (0u32, 0u32, 0u32);
    for (n, probe) in PROBES.iter().enumerate() {
        if !probe.runs_on(vendor) {
            continue;
        }
        probes += 1;
        let outcome =
            match run_probe::<E, V, F>(vendor, plan, vmmcall, &mut ram, &ctl, n, &mut make_vcpu) {
                Ok(o) => o,
                Err(e) => {
                    log::error!("isolation: probe {}: {e}", probe.name);
                    Outcome::Unclear("setup-failed")
                }
            };
        match outcome {
            Outcome::Contained(_) | Outcome::Faulted { .. } => contained += 1,
            Outcome::Escaped(_) => escaped += 1,
            Outcome::Unclear(_) => {}
        }
        let name = probe.name;
        match outcome {
            Outcome::Faulted { vector, error } => console::print(format_args!(
                "isolation: probe={name} outcome=contained how=fault vector={vector} error={error}\n"
            )),
            Outcome::Contained(how) => console::print(format_args!(
                "isolation: probe={name} outcome=contained how={how}\n"
            )),
            Outcome::Escaped(how) => console::print(format_args!(
                "isolation: probe={name} outcome=escaped how={how}\n"
            )),
            Outcome::Unclear(how) => console::print(format_args!(
                "isolation: probe={name} outcome=unclear how={how}\n"
            )),
        }
    }
    let pass = escaped == 0 && contained == probes && probes as usize == hostile::count(vendor);
    console::print(format_args!(
        "isolation: backend={backend} probes={probes} contained={contained} escaped={escaped} result={}\n",
        if pass { "pass" } else { "fail" }
    ));
    pass
}

fn run_probe<E, V, F>(
    vendor: Vendor,
    plan: &Plan,
    vmmcall: bool,
    ram: &mut GuestRam,
    ctl: &Published,
    n: usize,
    make_vcpu: &mut F,
) -> Result<Outcome, &'static str>
where
    E: NestedEntry,
    V: Vcpu,
    F: FnMut(&GuestStart, HostPhysAddr) -> Result<V, &'static str>,
{
    let probe: &Probe = PROBES.get(n).ok_or("no such probe")?;
    let workload = Workload {
        patterns: 0,
        epochs: 0,
        seed: 0,
        vmmcall,
        program: PROGRAM_HOSTILE,
        keys: 0,
    };
    let start = guest::load(ram, &workload).map_err(|_| "loading the hostile guest")?;
    let mut table = ram
        .nested_table::<E>()
        .map_err(|_| "building the nested table")?;
    let mut vcpu = make_vcpu(&start, table.root())?;
    // A guest-side copy of an allow-listed MSR holds a marker: a read that
    // returns anything else read the host's.
    let allowed = |m: u32| msr::allowed(vendor, m);
    let arg = match (probe.arg, probe.op) {
        (Arg::None, _) => 0,
        (Arg::HvImage, _) => KernelLayout::get().rodata.start,
        (Arg::VcpuControl, _) => vcpu.control_pa(),
        (Arg::ReplicationControl, _) => ctl.pa,
        (Arg::MsrValue, Op::Wrmsr(m)) if allowed(m) => hostile::WRITE_MARKER,
        // The host's own value: a write that gets through changes nothing
        // (so the broken build's run stays safe), and is still seen.
        (Arg::MsrValue, Op::Wrmsr(m)) => rdmsr(m),
        (Arg::MsrValue, _) => 0,
    };
    if let Op::Rdmsr(m) = probe.op {
        if allowed(m) && !vcpu.set_switched_msr(m, hostile::READ_MARKER) {
            return Err("planting the marker in the guest's MSR");
        }
    }
    let regs = vcpu.regs();
    regs.rsi = n as u64;
    regs.rdx = arg;
    let confinement = vcpu.confinement();
    let before = HostState::take(vendor, ctl);
    let mut watch = Watch::default();
    let plan = Plan {
        epoch_ticks: None,
        service: false,
        ..*plan
    };
    run_mode(
        ram,
        &mut table,
        &mut vcpu,
        Mode::WriteProtect,
        &plan,
        &mut watch,
    )?;
    let after = HostState::take(vendor, ctl);
    if let Some(what) = after.changed(&before) {
        log::error!("isolation: probe {} changed the host's {what}", probe.name);
        return Ok(Outcome::Escaped(what));
    }
    if vcpu.confinement() != confinement {
        log::error!(
            "isolation: probe {} changed the vCPU's intercepts or maps",
            probe.name
        );
        return Ok(Outcome::Escaped("confinement"));
    }
    Ok(match (watch.escaped, probe.op) {
        (Some(v), Op::Rdmsr(m)) if allowed(m) && v == hostile::READ_MARKER => {
            Outcome::Contained("virtualized")
        }
        (Some(_), Op::Wrmsr(m))
            if allowed(m) && vcpu.switched_msr(m) == Some(hostile::WRITE_MARKER) =>
        {
            Outcome::Contained("virtualized")
        }
        (Some(_), _) => Outcome::Escaped("reached"),
        (None, _) => match (watch.faulted, watch.stop) {
            (Some(report), _) => fault_outcome(probe, report, watch.refused),
            (
                None,
                Some(ExitKind::Privileged(_) | ExitKind::CrWrite { .. } | ExitKind::Msr { .. }),
            ) => Outcome::Contained("refused"),
            (None, Some(ExitKind::Shutdown)) => Outcome::Contained("shutdown"),
            (None, Some(ExitKind::Exception { .. })) => Outcome::Contained("exception"),
            _ => Outcome::Unclear("stopped"),
        },
    })
}

/// A `FAULTED` report (`vector`, error code, RIP): contained if it is an
/// exception with an error code that fits one and, after a refusal, the
/// exception injected, taken at the refused instruction.
fn fault_outcome(probe: &Probe, report: (u64, u64, u64), refused: Option<(u64, u8)>) -> Outcome {
    let (vector, error, rip) = report;
    let (Ok(vector), Ok(error)) = (u8::try_from(vector), u32::try_from(error)) else {
        return Outcome::Unclear("fault-report");
    };
    if vector >= fault::vector::EXCEPTIONS {
        return Outcome::Unclear("fault-report");
    }
    match refused {
        Some((at, v)) if at != rip || v != vector => {
            log::error!(
                "isolation: probe {}: vector {v} injected at rip={at:#x}, the guest took vector {vector} at rip={rip:#x}",
                probe.name
            );
            Outcome::Unclear("fault-elsewhere")
        }
        _ => Outcome::Faulted { vector, error },
    }
}
