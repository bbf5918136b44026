//! The local APIC (xAPIC, memory mapped) as the epoch timer of the SVM
//! backend: one-shot timer interrupts on [`TIMER_VECTOR`], calibrated
//! against the TSC, and their EOI. (AMD APM vol. 2, chapter 16 "Advanced
//! Programmable Interrupt Controller"; Intel SDM vol. 3A, chapter 11.)
//!
//! The kernel runs with RFLAGS.IF clear. Interrupts reach it in two places
//! only: during a guest run (SVM turns them into #VMEXIT(INTR), see
//! `virt::svm`), and in [`instr::interrupt_window`], where the IDT's
//! handlers for [`TIMER_VECTOR`] and [`SPURIOUS_VECTOR`] take them and call
//! [`on_interrupt`]. Every other interrupt source is masked here: the
//! 8259 PICs and the LINT0/error LVT entries.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;
use x86_64::registers::model_specific::ApicBaseFlags;

use super::instr::{self, rdmsr, rdtsc, wrmsr};

/// The one-shot epoch timer's vector.
pub const TIMER_VECTOR: u8 = 0x40;
/// The APIC's spurious-interrupt vector (low 4 bits all set, as older
/// APICs require).
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Register offsets in the xAPIC page.
const REG_EOI: usize = 0xb0;
const REG_SVR: usize = 0xf0;
const REG_LVT_TIMER: usize = 0x320;
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_ERROR: usize = 0x370;
const REG_TIMER_INITIAL: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3e0;

/// SVR bit 8: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// LVT bit 16: masked. Timer mode bits 18:17 = 0 is one-shot.
const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration 1011b: divide by 1.
const DIVIDE_BY_1: u32 = 0b1011;

/// TSC ticks the calibration spins for.
const CALIBRATION_TSC: u64 = 200_000;

/// Timer and spurious interrupts taken so far.
static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);
static SPURIOUS_IRQS: AtomicU64 = AtomicU64::new(0);

/// The local APIC, set up once.
#[derive(Debug)]
pub struct Apic {
    base: u64,
    /// Calibration: `apic_ticks` timer ticks elapsed in `tsc_ticks`.
    apic_ticks: u64,
    tsc_ticks: u64,
}

static APIC: Once<Result<Apic, &'static str>> = Once::new();

/// The local APIC, set up (its register page made uncached by `uncached`,
/// the timer calibrated) on first use; an error when it is in x2APIC mode
/// or cannot be mapped.
pub fn get(uncached: Uncached) -> Result<&'static Apic, &'static str> {
    APIC.call_once(|| init(uncached)).as_ref().map_err(|e| *e)
}

/// Makes the page at a physical address uncached in the kernel's page
/// tables (which are `mem`'s, not the CPU set-up's, to edit).
pub type Uncached = fn(u64) -> Result<(), &'static str>;

fn init(uncached: Uncached) -> Result<Apic, &'static str> {
    let msr = rdmsr(IA32_APIC_BASE);
    let flags = ApicBaseFlags::from_bits_truncate(msr);
    if flags.contains(ApicBaseFlags::X2APIC_ENABLE) {
        return Err("the local APIC is in x2APIC mode (only xAPIC MMIO is supported)");
    }
    if !flags.contains(ApicBaseFlags::LAPIC_ENABLE) {
        // SAFETY: setting the global enable bit only turns the local APIC
        // on at the base it already has; no interrupt reaches the kernel
        // until it sets RFLAGS.IF.
        unsafe { wrmsr(IA32_APIC_BASE, msr | ApicBaseFlags::LAPIC_ENABLE.bits()) };
    }
    let base = msr & APIC_BASE_ADDR_MASK;
    uncached(base)?;
    let mut apic = Apic {
        base,
        apic_ticks: 0,
        tsc_ticks: 0,
    };
    // No interrupts but ours: mask both 8259s (BIOS leaves the PIT's IRQ 0
    // on, which would arrive through LINT0 on a vector we have no handler
    // for), LINT0 itself and the error LVT.
    instr::outb(0x21, 0xff);
    instr::outb(0xa1, 0xff);
    apic.write(REG_LVT_LINT0, apic.read(REG_LVT_LINT0) | LVT_MASKED);
    apic.write(REG_LVT_ERROR, apic.read(REG_LVT_ERROR) | LVT_MASKED);
    apic.write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));

    // Calibrate: let the timer count down, masked, while the TSC advances
    // by CALIBRATION_TSC.
    apic.write(REG_TIMER_DIVIDE, DIVIDE_BY_1);
    apic.write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    apic.write(REG_TIMER_INITIAL, u32::MAX);
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < CALIBRATION_TSC {
        core::hint::spin_loop();
    }
    let left = apic.read(REG_TIMER_CURRENT);
    let t1 = rdtsc();
    apic.write(REG_TIMER_INITIAL, 0);
    apic.apic_ticks = u64::from(u32::MAX - left);
    apic.tsc_ticks = t1.wrapping_sub(t0);
    if apic.apic_ticks == 0 || apic.tsc_ticks == 0 {
        return Err("the local APIC timer did not count during calibration");
    }
    log::debug!(
        "apic: base {base:#x}, timer {} ticks per {} TSC ticks (divide 1)",
        apic.apic_ticks,
        apic.tsc_ticks
    );
    Ok(apic)
}

impl Apic {
    fn reg(&self, offset: usize) -> *mut u32 {
        (self.base as usize + offset) as *mut u32
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `base` is the xAPIC page named by IA32_APIC_BASE, identity
        // mapped uncached (`init`); `offset` is one of the register offsets
        // above, 16-byte aligned, read as the 32-bit access the APIC needs.
        unsafe { self.reg(offset).read_volatile() }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`; register writes affect only the APIC.
        unsafe { self.reg(offset).write_volatile(value) }
    }

    /// APIC timer ticks for about `tsc` TSC ticks (at least 1).
    pub fn timer_count(&self, tsc: u64) -> u32 {
        let n = u128::from(tsc) * u128::from(self.apic_ticks) / u128::from(self.tsc_ticks);
        u32::try_from(n).unwrap_or(u32::MAX).max(1)
    }

    /// Start the one-shot timer: [`TIMER_VECTOR`] fires after about `tsc`
    /// TSC ticks. Re-arming restarts the count.
    pub fn arm_oneshot(&self, tsc: u64) {
        self.write(REG_TIMER_DIVIDE, DIVIDE_BY_1);
        self.write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
        self.write(REG_TIMER_INITIAL, self.timer_count(tsc));
    }

    /// Stop the timer and take an interrupt of it that is already pending
    /// (its handler sends the EOI), so none is left for a later run.
    pub fn disarm(&self) {
        self.write(REG_TIMER_INITIAL, 0);
        self.write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
        instr::interrupt_window();
    }

    fn eoi(&self) {
        self.write(REG_EOI, 0);
    }
}

/// Timer interrupts taken so far (by the handler, in an interrupt window).
pub fn timer_irqs() -> u64 {
    TIMER_IRQS.load(Ordering::Relaxed)
}

/// Spurious interrupts taken so far.
pub fn spurious_irqs() -> u64 {
    SPURIOUS_IRQS.load(Ordering::Relaxed)
}

/// Called by the IDT's interrupt stubs with the vector taken. A timer
/// interrupt is counted and acknowledged (EOI); a spurious one is counted
/// only (the APIC sets no in-service bit for it, so it takes no EOI).
pub fn on_interrupt(vector: u8) {
    if vector == TIMER_VECTOR {
        TIMER_IRQS.fetch_add(1, Ordering::Relaxed);
        // A timer interrupt implies the APIC was set up by `get`.
        if let Some(Ok(apic)) = APIC.get() {
            apic.eoi();
        }
    } else {
        SPURIOUS_IRQS.fetch_add(1, Ordering::Relaxed);
    }
}
