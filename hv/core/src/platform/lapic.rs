//! Local APIC in x2APIC form: the MSR interface 0x800-0x8FF, IA32_APIC_BASE
//! (0x1B) and IA32_TSC_DEADLINE (0x6E0), interrupt acceptance and priority,
//! and the timer (one-shot, periodic, TSC-deadline) against a TSC value.
//!
//! # What is modelled
//! ID, version (0x14, five LVT entries: no CMCI), TPR, PPR, EOI, LDR
//! (derived from the ID, cluster form), SVR, ISR/TMR/IRR, ESR, ICR (fixed
//! and lowest-priority IPIs that reach this vCPU are accepted, NMI to self
//! is returned as [`Effect::SelfNmi`], INIT/SIPI/SMI and IPIs to other
//! APICs are dropped: there is one vCPU), the LVT timer/thermal/PMC/LINT0/
//! LINT1/error registers, TMICT/TMCCT/TDCR and SELF IPI.
//!
//! # What is refused ([`Refused`], the caller injects #GP)
//! As x2APIC hardware does: unknown registers in 0x800-0x8FF (APR, RRD, DFR,
//! CMCI among them), writes to read-only registers, reads of EOI and
//! SELF IPI, reserved bits (any bit above 31 except in the ICR, reserved
//! LVT bits, timer mode 3, a non-zero EOI or ESR write), every x2APIC
//! register while the APIC is disabled, and IA32_APIC_BASE values that move
//! the page, set reserved bits, or make a transition the SDM forbids
//! (x2APIC -> xAPIC, disabled -> x2APIC) or enter xAPIC mode, which is not
//! modelled.
//!
//! # Deviations, on purpose
//! Errors (illegal vectors) show in ESR at once and a write of 0 clears it
//! (hardware latches them at the write); the error LVT still fires. The
//! APIC timer counts `tsc_per_tick` TSC cycles per bus clock times the
//! divisor; a save keeps the current count, so a restore loses less than
//! one count of progress (Xen's record has the same granularity).
use doppel_abi::hvm::{
    HvmHwLapic, HvmHwLapicRegs, LAPIC_REGS_SIZE, VLAPIC_HW_DISABLED, VLAPIC_SW_DISABLED,
};

use super::{RecordError, Refused};

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// First and last MSR of the x2APIC range.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8FF;

/// The xAPIC page address (not relocatable here).
pub const APIC_BASE_ADDR: u64 = 0xFEE0_0000;
/// IA32_APIC_BASE bits.
pub const BASE_BSP: u64 = 1 << 8;
pub const BASE_EXTD: u64 = 1 << 10;
pub const BASE_ENABLE: u64 = 1 << 11;
/// Version register: version 0x14, max LVT entry 5.
pub const VERSION: u32 = 0x0005_0014;

/// Register numbers (MSR - 0x800, page offset / 16).
pub mod reg {
    pub const ID: u32 = 0x02;
    pub const VERSION: u32 = 0x03;
    pub const TPR: u32 = 0x08;
    pub const PPR: u32 = 0x0A;
    pub const EOI: u32 = 0x0B;
    pub const LDR: u32 = 0x0D;
    pub const SVR: u32 = 0x0F;
    pub const ISR0: u32 = 0x10;
    pub const TMR0: u32 = 0x18;
    pub const IRR0: u32 = 0x20;
    pub const ESR: u32 = 0x28;
    pub const ICR: u32 = 0x30;
    /// xAPIC ICR high half (page offset 0x310); not an x2APIC register.
    pub const ICR_HI: u32 = 0x31;
    pub const LVT_TIMER: u32 = 0x32;
    pub const LVT_THERMAL: u32 = 0x33;
    pub const LVT_PMC: u32 = 0x34;
    pub const LVT_LINT0: u32 = 0x35;
    pub const LVT_LINT1: u32 = 0x36;
    pub const LVT_ERROR: u32 = 0x37;
    pub const TMICT: u32 = 0x38;
    pub const TMCCT: u32 = 0x39;
    pub const TDCR: u32 = 0x3E;
    pub const SELF_IPI: u32 = 0x3F;
}

/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
const LVT_VECTOR: u32 = 0xFF;
const LVT_DELIVERY: u32 = 0x700;
const LVT_TIMER_MODE: u32 = 3 << 17;
/// Writable bits of each LVT register.
const LVT_TIMER_BITS: u32 = LVT_VECTOR | LVT_MASKED | LVT_TIMER_MODE;
const LVT_THERMAL_BITS: u32 = LVT_VECTOR | LVT_DELIVERY | LVT_MASKED;
const LVT_LINT_BITS: u32 = LVT_VECTOR | LVT_DELIVERY | (1 << 13) | (1 << 15) | LVT_MASKED;
const LVT_ERROR_BITS: u32 = LVT_VECTOR | LVT_MASKED;
/// SVR: vector, APIC software enable, focus checking.
const SVR_BITS: u32 = 0x3FF;
/// SVR bit 8.
pub const SVR_ENABLE: u32 = 1 << 8;
const TDCR_BITS: u32 = 0xB;
/// ICR bits: vector, delivery mode, dest mode, level, trigger, shorthand,
/// destination.
const ICR_BITS: u64 = 0xFFFF_FFFF_000C_CFFF;
/// ESR: send illegal vector, receive illegal vector.
pub const ESR_SEND_ILLEGAL: u32 = 1 << 5;
pub const ESR_RECV_ILLEGAL: u32 = 1 << 6;

/// The timer mode of LVT timer bits 17-18.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// What an access asks of the caller besides the register update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// EOI of a level-triggered vector: the IOAPIC clears remote IRR of
    /// the pins routed to it ([`super::ioapic::Ioapic::eoi`]).
    LevelEoi {
        vector: u8,
    },
    /// An NMI IPI to this vCPU: the caller injects an NMI.
    SelfNmi,
}

/// A 256-bit vector register (ISR, TMR, IRR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bits256([u32; 8]);

impl Bits256 {
    fn set(&mut self, v: u8, on: bool) {
        let bit = 1u32 << (v & 31);
        if let Some(w) = self.0.get_mut(usize::from(v >> 5)) {
            if on {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }
    fn get(&self, v: u8) -> bool {
        self.0
            .get(usize::from(v >> 5))
            .is_some_and(|w| w & (1u32 << (v & 31)) != 0)
    }
    fn highest(&self) -> Option<u8> {
        for (i, w) in self.0.iter().enumerate().rev() {
            if *w != 0 {
                // i < 8 and the bit index < 32: fits a u8.
                return u8::try_from(i * 32 + (31 - w.leading_zeros() as usize)).ok();
            }
        }
        None
    }
    fn word(&self, i: u32) -> u32 {
        self.0.get(i as usize).copied().unwrap_or(0)
    }
}

/// One vCPU's local APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lapic {
    id: u32,
    /// TSC cycles per APIC bus clock (configuration, >= 1).
    tsc_per_tick: u64,
    apic_base: u64,
    tpr: u32,
    svr: u32,
    isr: Bits256,
    tmr: Bits256,
    irr: Bits256,
    esr: u32,
    icr: u64,
    lvt_timer: u32,
    lvt_thermal: u32,
    lvt_pmc: u32,
    lvt_lint0: u32,
    lvt_lint1: u32,
    lvt_error: u32,
    tmict: u32,
    tdcr: u32,
    tsc_deadline: u64,
    /// TSC at which the current count period started, when counting.
    timer_start: Option<u64>,
}

/// The divide value of a TDCR.
pub fn divisor(tdcr: u32) -> u32 {
    let code = ((tdcr & 8) >> 1) | (tdcr & 3);
    1 << ((code + 1) & 7)
}

/// The x2APIC logical ID of an x2APIC ID: cluster in 31-16, one bit of 16.
pub fn ldr_of(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xF))
}

impl Lapic {
    /// A local APIC after reset, already in x2APIC mode (as a firmware that
    /// enabled it leaves it), software-disabled, every LVT masked.
    /// `tsc_per_tick` of 0 is taken as 1.
    pub fn new(id: u32, bsp: bool, tsc_per_tick: u64) -> Self {
        Lapic {
            id,
            tsc_per_tick: tsc_per_tick.max(1),
            apic_base: APIC_BASE_ADDR | BASE_ENABLE | BASE_EXTD | if bsp { BASE_BSP } else { 0 },
            tpr: 0,
            svr: 0xFF,
            isr: Bits256::default(),
            tmr: Bits256::default(),
            irr: Bits256::default(),
            esr: 0,
            icr: 0,
            lvt_timer: LVT_MASKED,
            lvt_thermal: LVT_MASKED,
            lvt_pmc: LVT_MASKED,
            lvt_lint0: LVT_MASKED,
            lvt_lint1: LVT_MASKED,
            lvt_error: LVT_MASKED,
            tmict: 0,
            tdcr: 0,
            tsc_deadline: 0,
            timer_start: None,
        }
    }

    /// Reset to power-up state keeping ID, BSP flag and configuration, in
    /// the given IA32_APIC_BASE.
    fn reset(&mut self, apic_base: u64) {
        let mut fresh = Lapic::new(self.id, self.apic_base & BASE_BSP != 0, self.tsc_per_tick);
        fresh.apic_base = apic_base;
        *self = fresh;
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Enabled in IA32_APIC_BASE (x2APIC mode: the only enabled form here).
    pub fn hw_enabled(&self) -> bool {
        self.apic_base & BASE_ENABLE != 0
    }

    /// Enabled in SVR.
    pub fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt_timer >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// TSC cycles per timer count.
    fn period(&self) -> u64 {
        self.tsc_per_tick
            .saturating_mul(u64::from(divisor(self.tdcr)))
    }

    fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if (self.tpr & 0xF0) >= (isrv & 0xF0) {
            self.tpr & 0xFF
        } else {
            isrv & 0xF0
        }
    }

    /// Accept an interrupt into IRR (from the IOAPIC, an IPI or an LVT).
    /// `level` sets its TMR bit. Returns false when it was not accepted: the
    /// APIC is disabled, or the vector is illegal (0-15, flagged in ESR).
    pub fn accept(&mut self, vector: u8, level: bool) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        if vector < 16 {
            self.error(ESR_RECV_ILLEGAL);
            return false;
        }
        self.irr.set(vector, true);
        self.tmr.set(vector, level);
        true
    }

    /// Record an APIC error and raise the error LVT if it is unmasked.
    fn error(&mut self, bits: u32) {
        self.esr |= bits;
        if self.lvt_error & LVT_MASKED == 0 {
            let v = (self.lvt_error & LVT_VECTOR) as u8;
            if v >= 16 {
                self.irr.set(v, true);
                self.tmr.set(v, false);
            }
        }
    }

    /// The vector to inject now: the highest IRR vector whose priority
    /// class is above PPR's.
    pub fn pending(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xF0 > self.ppr() & 0xF0).then_some(v)
    }

    /// The caller injected [`Lapic::pending`]: move it from IRR to ISR.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.pending()?;
        self.irr.set(v, false);
        self.isr.set(v, true);
        Some(v)
    }

    fn eoi(&mut self) -> Effect {
        match self.isr.highest() {
            Some(v) => {
                self.isr.set(v, false);
                if self.tmr.get(v) {
                    Effect::LevelEoi { vector: v }
                } else {
                    Effect::None
                }
            }
            None => Effect::None,
        }
    }

    /// The TSC at which [`Lapic::tick`] next has work, for the host timer.
    pub fn next_deadline(&self) -> Option<u64> {
        if !self.hw_enabled() {
            return None;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            _ => {
                let start = self.timer_start?;
                let span = u64::from(self.tmict).saturating_mul(self.period());
                Some(start.saturating_add(span))
            }
        }
    }

    /// Advance the timer to `tsc`. Returns true if the timer fired with its
    /// LVT unmasked, which put its vector in IRR. Periods missed while the
    /// caller was away coalesce into one interrupt, as on hardware.
    pub fn tick(&mut self, tsc: u64) -> bool {
        let Some(due) = self.next_deadline() else {
            return false;
        };
        if tsc < due {
            return false;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => self.tsc_deadline = 0,
            TimerMode::OneShot => self.timer_start = None,
            TimerMode::Periodic => {
                let span = u64::from(self.tmict).saturating_mul(self.period()).max(1);
                let late = (tsc - due) / span;
                // The period boundary at or before `tsc`.
                self.timer_start = Some(due.saturating_add(late.saturating_mul(span)));
            }
        }
        if self.lvt_timer & LVT_MASKED != 0 {
            return false;
        }
        let v = (self.lvt_timer & LVT_VECTOR) as u8;
        self.accept(v, false)
    }

    /// TMCCT at `tsc`.
    fn current_count(&self, tsc: u64) -> u32 {
        if self.timer_mode() == TimerMode::TscDeadline || self.tmict == 0 {
            return 0;
        }
        let Some(start) = self.timer_start else {
            return 0;
        };
        let ticks = tsc.saturating_sub(start) / self.period().max(1);
        let tmict = u64::from(self.tmict);
        let left = match self.timer_mode() {
            TimerMode::Periodic => tmict - ticks % tmict,
            _ => tmict.saturating_sub(ticks),
        };
        u32::try_from(left).unwrap_or(0)
    }

    /// (Re)start counting so that `count` counts are left at `tsc`.
    fn set_count(&mut self, count: u32, tsc: u64) {
        if count == 0 || self.tmict == 0 || self.timer_mode() == TimerMode::TscDeadline {
            self.timer_start = None;
            return;
        }
        let done = u64::from(self.tmict.saturating_sub(count)).saturating_mul(self.period());
        self.timer_start = Some(tsc.saturating_sub(done));
    }

    /// Read an MSR this model owns (IA32_APIC_BASE, IA32_TSC_DEADLINE,
    /// 0x800-0x8FF) at TSC `tsc`.
    pub fn read_msr(&self, msr: u32, tsc: u64) -> Result<u64, Refused> {
        match msr {
            MSR_APIC_BASE => return Ok(self.apic_base),
            MSR_TSC_DEADLINE => {
                return Ok(if self.timer_mode() == TimerMode::TscDeadline {
                    self.tsc_deadline
                } else {
                    0
                })
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {}
            _ => return Err(Refused::Unknown { reg: msr }),
        }
        if !self.hw_enabled() {
            return Err(Refused::Disabled { reg: msr });
        }
        let r = msr - MSR_X2APIC_FIRST;
        let v = match r {
            reg::ID => self.id,
            reg::VERSION => VERSION,
            reg::TPR => self.tpr,
            reg::PPR => self.ppr(),
            reg::LDR => ldr_of(self.id),
            reg::SVR => self.svr,
            0x10..=0x17 => self.isr.word(r - reg::ISR0),
            0x18..=0x1F => self.tmr.word(r - reg::TMR0),
            0x20..=0x27 => self.irr.word(r - reg::IRR0),
            reg::ESR => self.esr,
            reg::ICR => return Ok(self.icr),
            reg::LVT_TIMER => self.lvt_timer,
            reg::LVT_THERMAL => self.lvt_thermal,
            reg::LVT_PMC => self.lvt_pmc,
            reg::LVT_LINT0 => self.lvt_lint0,
            reg::LVT_LINT1 => self.lvt_lint1,
            reg::LVT_ERROR => self.lvt_error,
            reg::TMICT => self.tmict,
            reg::TMCCT => self.current_count(tsc),
            reg::TDCR => self.tdcr,
            reg::EOI | reg::SELF_IPI => return Err(Refused::WriteOnly { reg: msr }),
            _ => return Err(Refused::Unknown { reg: msr }),
        };
        Ok(u64::from(v))
    }

    /// Write an MSR this model owns at TSC `tsc`.
    pub fn write_msr(&mut self, msr: u32, value: u64, tsc: u64) -> Result<Effect, Refused> {
        match msr {
            MSR_APIC_BASE => return self.write_apic_base(value).map(|()| Effect::None),
            MSR_TSC_DEADLINE => {
                // Ignored outside TSC-deadline mode (SDM 11.5.4.1).
                if self.hw_enabled() && self.timer_mode() == TimerMode::TscDeadline {
                    self.tsc_deadline = value;
                }
                return Ok(Effect::None);
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {}
            _ => return Err(Refused::Unknown { reg: msr }),
        }
        if !self.hw_enabled() {
            return Err(Refused::Disabled { reg: msr });
        }
        let r = msr - MSR_X2APIC_FIRST;
        let reserved = Refused::Reserved { reg: msr, value };
        if r == reg::ICR {
            if value & !ICR_BITS != 0 {
                return Err(reserved);
            }
            self.icr = value;
            return Ok(self.send_ipi(value));
        }
        let Ok(v) = u32::try_from(value) else {
            return Err(reserved);
        };
        let check = |bits: u32| if v & !bits != 0 { Err(reserved) } else { Ok(v) };
        match r {
            reg::TPR => self.tpr = check(0xFF)?,
            reg::EOI => {
                check(0)?;
                return Ok(self.eoi());
            }
            reg::SVR => {
                self.svr = check(SVR_BITS)?;
                if !self.sw_enabled() {
                    for lvt in [
                        &mut self.lvt_timer,
                        &mut self.lvt_thermal,
                        &mut self.lvt_pmc,
                        &mut self.lvt_lint0,
                        &mut self.lvt_lint1,
                        &mut self.lvt_error,
                    ] {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                check(0)?;
                self.esr = 0;
            }
            reg::LVT_TIMER => {
                let v = check(LVT_TIMER_BITS)?;
                if (v >> 17) & 3 == 3 {
                    return Err(reserved);
                }
                let old = self.timer_mode();
                self.lvt_timer = self.lvt_masked(v);
                if self.timer_mode() != old {
                    // A mode change disarms both counters.
                    self.tmict = 0;
                    self.timer_start = None;
                    self.tsc_deadline = 0;
                }
            }
            reg::LVT_THERMAL => self.lvt_thermal = self.lvt_masked(check(LVT_THERMAL_BITS)?),
            reg::LVT_PMC => self.lvt_pmc = self.lvt_masked(check(LVT_THERMAL_BITS)?),
            reg::LVT_LINT0 => self.lvt_lint0 = self.lvt_masked(check(LVT_LINT_BITS)?),
            reg::LVT_LINT1 => self.lvt_lint1 = self.lvt_masked(check(LVT_LINT_BITS)?),
            reg::LVT_ERROR => self.lvt_error = self.lvt_masked(check(LVT_ERROR_BITS)?),
            reg::TMICT => {
                // Ignored in TSC-deadline mode.
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.tmict = v;
                    self.set_count(v, tsc);
                }
            }
            reg::TDCR => {
                let v = check(TDCR_BITS)?;
                let left = self.current_count(tsc);
                self.tdcr = v;
                self.set_count(left, tsc);
            }
            reg::SELF_IPI => {
                let v = check(0xFF)?;
                self.fixed_ipi(v as u8);
            }
            reg::ID | reg::VERSION | reg::PPR | reg::LDR | reg::TMCCT | 0x10..=0x27 => {
                return Err(Refused::ReadOnly { reg: msr })
            }
            _ => return Err(Refused::Unknown { reg: msr }),
        }
        Ok(Effect::None)
    }

    /// An LVT value with the mask forced while software-disabled.
    fn lvt_masked(&self, v: u32) -> u32 {
        if self.sw_enabled() {
            v
        } else {
            v | LVT_MASKED
        }
    }

    fn fixed_ipi(&mut self, vector: u8) {
        if vector < 16 {
            self.error(ESR_SEND_ILLEGAL | ESR_RECV_ILLEGAL);
        } else {
            self.accept(vector, false);
        }
    }

    /// Whether an ICR value addresses this APIC.
    fn targets_self(&self, icr: u64) -> bool {
        let dest = (icr >> 32) as u32;
        match (icr >> 18) & 3 {
            1 | 2 => true,
            3 => false,
            _ if dest == u32::MAX => true,
            _ if icr & (1 << 11) == 0 => dest == self.id,
            _ => {
                let ldr = ldr_of(self.id);
                dest >> 16 == ldr >> 16 && dest & ldr & 0xFFFF != 0
            }
        }
    }

    fn send_ipi(&mut self, icr: u64) -> Effect {
        if !self.targets_self(icr) {
            return Effect::None;
        }
        match (icr >> 8) & 7 {
            0 | 1 => {
                self.fixed_ipi(icr as u8);
                Effect::None
            }
            4 => Effect::SelfNmi,
            // SMI, INIT, SIPI and reserved modes: no other vCPU, dropped.
            _ => Effect::None,
        }
    }

    fn write_apic_base(&mut self, value: u64) -> Result<(), Refused> {
        let reserved = Refused::Reserved {
            reg: MSR_APIC_BASE,
            value,
        };
        // BSP is read-only: masked. The page does not move.
        let value = (value & !BASE_BSP) | (self.apic_base & BASE_BSP);
        if value & !(BASE_BSP | BASE_EXTD | BASE_ENABLE) != APIC_BASE_ADDR {
            return Err(reserved);
        }
        let mode = value & (BASE_EXTD | BASE_ENABLE);
        let now = self.apic_base & (BASE_EXTD | BASE_ENABLE);
        if mode == now {
            return Ok(());
        }
        if mode == 0 {
            // Disable: the APIC returns to its power-up state.
            self.reset(value);
            return Ok(());
        }
        // x2APIC -> xAPIC and disabled -> x2APIC are invalid (SDM 11.12.5),
        // EXTD without ENABLE is invalid, and xAPIC mode is not modelled.
        Err(reserved)
    }

    /// Save into Xen's LAPIC and LAPIC_REGS records at TSC `tsc`. Runs
    /// [`Lapic::tick`] first so an expiry already due is not lost.
    pub fn save(&mut self, tsc: u64) -> (HvmHwLapic, HvmHwLapicRegs) {
        self.tick(tsc);
        let mut disabled = 0;
        if !self.sw_enabled() {
            disabled |= VLAPIC_SW_DISABLED;
        }
        if !self.hw_enabled() {
            disabled |= VLAPIC_HW_DISABLED;
        }
        let hw = HvmHwLapic {
            apic_base_msr: self.apic_base,
            disabled,
            timer_divisor: divisor(self.tdcr),
            tdt_msr: self.tsc_deadline,
        };
        let mut page = HvmHwLapicRegs {
            data: [0; LAPIC_REGS_SIZE],
        };
        let mut put = |r: u32, v: u32| {
            let at = r as usize * 16;
            if let Some(d) = page.data.get_mut(at..at + 4) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        };
        put(reg::ID, self.id);
        put(reg::VERSION, VERSION);
        put(reg::TPR, self.tpr);
        put(reg::PPR, self.ppr());
        put(reg::LDR, ldr_of(self.id));
        put(reg::SVR, self.svr);
        for i in 0..8 {
            put(reg::ISR0 + i, self.isr.word(i));
            put(reg::TMR0 + i, self.tmr.word(i));
            put(reg::IRR0 + i, self.irr.word(i));
        }
        put(reg::ESR, self.esr);
        put(reg::ICR, self.icr as u32);
        put(reg::ICR_HI, (self.icr >> 32) as u32);
        put(reg::LVT_TIMER, self.lvt_timer);
        put(reg::LVT_THERMAL, self.lvt_thermal);
        put(reg::LVT_PMC, self.lvt_pmc);
        put(reg::LVT_LINT0, self.lvt_lint0);
        put(reg::LVT_LINT1, self.lvt_lint1);
        put(reg::LVT_ERROR, self.lvt_error);
        put(reg::TMICT, self.tmict);
        put(reg::TMCCT, self.current_count(tsc));
        put(reg::TDCR, self.tdcr);
        (hw, page)
    }

    /// Rebuild from Xen's LAPIC and LAPIC_REGS records at TSC `tsc`, with
    /// this vCPU's `tsc_per_tick`. Every field is checked as a guest write
    /// would be; derived registers (version, LDR, PPR) must match.
    pub fn restore(
        hw: &HvmHwLapic,
        page: &HvmHwLapicRegs,
        tsc_per_tick: u64,
        tsc: u64,
    ) -> Result<Self, RecordError> {
        let get = |r: u32| -> u32 {
            let at = r as usize * 16;
            page.data
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_le_bytes)
        };
        let err = |f: &'static str, v: u32| RecordError::new(f, u64::from(v));
        let id = get(reg::ID);
        let base = hw.apic_base_msr;
        let mut l = Lapic::new(id, base & BASE_BSP != 0, tsc_per_tick);
        let mode = base & (BASE_EXTD | BASE_ENABLE);
        if base & !(BASE_BSP | BASE_EXTD | BASE_ENABLE) != APIC_BASE_ADDR
            || (mode != 0 && mode != BASE_EXTD | BASE_ENABLE)
        {
            return Err(RecordError::new("apic_base_msr", base));
        }
        l.apic_base = base;
        let fits = |name: &'static str, r: u32, bits: u32| -> Result<u32, RecordError> {
            let v = get(r);
            if v & !bits != 0 {
                Err(err(name, v))
            } else {
                Ok(v)
            }
        };
        l.tpr = fits("TPR", reg::TPR, 0xFF)?;
        l.svr = fits("SVR", reg::SVR, SVR_BITS)?;
        l.esr = fits("ESR", reg::ESR, ESR_SEND_ILLEGAL | ESR_RECV_ILLEGAL)?;
        l.lvt_timer = fits("LVT timer", reg::LVT_TIMER, LVT_TIMER_BITS)?;
        if (l.lvt_timer >> 17) & 3 == 3 {
            return Err(err("LVT timer", l.lvt_timer));
        }
        l.lvt_thermal = fits("LVT thermal", reg::LVT_THERMAL, LVT_THERMAL_BITS)?;
        l.lvt_pmc = fits("LVT PMC", reg::LVT_PMC, LVT_THERMAL_BITS)?;
        l.lvt_lint0 = fits("LVT LINT0", reg::LVT_LINT0, LVT_LINT_BITS)?;
        l.lvt_lint1 = fits("LVT LINT1", reg::LVT_LINT1, LVT_LINT_BITS)?;
        l.lvt_error = fits("LVT error", reg::LVT_ERROR, LVT_ERROR_BITS)?;
        l.tdcr = fits("TDCR", reg::TDCR, TDCR_BITS)?;
        let icr = u64::from(get(reg::ICR)) | (u64::from(get(reg::ICR_HI)) << 32);
        if icr & !ICR_BITS != 0 {
            return Err(RecordError::new("ICR", icr));
        }
        l.icr = icr;
        for i in 0..8u32 {
            if let (Some(a), Some(b), Some(c)) = (
                l.isr.0.get_mut(i as usize),
                l.tmr.0.get_mut(i as usize),
                l.irr.0.get_mut(i as usize),
            ) {
                *a = get(reg::ISR0 + i);
                *b = get(reg::TMR0 + i);
                *c = get(reg::IRR0 + i);
            }
        }
        if get(reg::VERSION) != VERSION {
            return Err(err("version", get(reg::VERSION)));
        }
        if get(reg::LDR) != ldr_of(id) {
            return Err(err("LDR", get(reg::LDR)));
        }
        if get(reg::PPR) != l.ppr() {
            return Err(err("PPR", get(reg::PPR)));
        }
        let mut disabled = 0;
        if !l.sw_enabled() {
            disabled |= VLAPIC_SW_DISABLED;
        }
        if !l.hw_enabled() {
            disabled |= VLAPIC_HW_DISABLED;
        }
        if hw.disabled != disabled {
            return Err(err("disabled", hw.disabled));
        }
        if hw.timer_divisor != divisor(l.tdcr) {
            return Err(err("timer_divisor", hw.timer_divisor));
        }
        l.tmict = get(reg::TMICT);
        let count = get(reg::TMCCT);
        if count > l.tmict || (l.timer_mode() == TimerMode::TscDeadline && count != 0) {
            return Err(err("TMCCT", count));
        }
        l.set_count(count, tsc);
        if l.timer_mode() != TimerMode::TscDeadline && hw.tdt_msr != 0 {
            return Err(RecordError::new("tdt_msr", hw.tdt_msr));
        }
        l.tsc_deadline = hw.tdt_msr;
        Ok(l)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    const X: u32 = MSR_X2APIC_FIRST;

    fn enabled() -> Lapic {
        let mut l = Lapic::new(3, true, 4);
        l.write_msr(X + reg::SVR, 0x1FF, 0).unwrap();
        l
    }

    #[test]
    fn reset_state_reads() {
        let l = Lapic::new(0x23, true, 1);
        assert_eq!(l.read_msr(MSR_APIC_BASE, 0), Ok(0xFEE0_0D00));
        assert_eq!(l.read_msr(X + reg::ID, 0), Ok(0x23));
        assert_eq!(l.read_msr(X + reg::VERSION, 0), Ok(0x50014));
        assert_eq!(l.read_msr(X + reg::LDR, 0), Ok(0x0002_0008));
        assert_eq!(l.read_msr(X + reg::SVR, 0), Ok(0xFF));
        assert_eq!(l.read_msr(X + reg::LVT_TIMER, 0), Ok(0x10000));
        assert_eq!(l.read_msr(X + reg::LVT_LINT0, 0), Ok(0x10000));
        assert_eq!(l.read_msr(X + reg::TMCCT, 0), Ok(0));
        assert_eq!(Lapic::new(1, false, 1).apic_base(), 0xFEE0_0C00);
    }

    #[test]
    fn refusals_are_those_of_x2apic_hardware() {
        let mut l = enabled();
        for r in [0x00, 0x09, 0x0C, 0x0E, 0x2F, 0x31, 0x3A, 0x40, 0xFF] {
            assert_eq!(
                l.read_msr(X + r, 0),
                Err(Refused::Unknown { reg: X + r }),
                "{r:#x}"
            );
        }
        assert_eq!(
            l.read_msr(X + reg::EOI, 0),
            Err(Refused::WriteOnly { reg: X + reg::EOI })
        );
        assert_eq!(
            l.read_msr(X + reg::SELF_IPI, 0),
            Err(Refused::WriteOnly {
                reg: X + reg::SELF_IPI
            })
        );
        for r in [
            reg::ID,
            reg::VERSION,
            reg::PPR,
            reg::LDR,
            reg::TMCCT,
            0x10,
            0x27,
        ] {
            assert_eq!(
                l.write_msr(X + r, 0, 0),
                Err(Refused::ReadOnly { reg: X + r })
            );
        }
        let bad = [
            (reg::TPR, 0x100),
            (reg::EOI, 1),
            (reg::ESR, 1),
            (reg::SVR, 0x1000),
            (reg::LVT_TIMER, 0x60000),
            (reg::LVT_TIMER, 0x1000),
            (reg::LVT_ERROR, 0x700),
            (reg::TDCR, 4),
            (reg::SELF_IPI, 0x100),
            (reg::TMICT, 1 << 32),
            (reg::ICR, 1 << 12),
        ];
        for (r, v) in bad {
            assert_eq!(
                l.write_msr(X + r, v, 0),
                Err(Refused::Reserved {
                    reg: X + r,
                    value: v
                }),
                "{r:#x} {v:#x}"
            );
        }
        assert_eq!(l.read_msr(0x1C, 0), Err(Refused::Unknown { reg: 0x1C }));
        assert_eq!(l.write_msr(0x1C, 0, 0), Err(Refused::Unknown { reg: 0x1C }));
        // Nothing refused changed state.
        assert_eq!(l, enabled());
    }

    #[test]
    fn apic_base_transitions() {
        let mut l = enabled();
        // Same mode; BSP bit is read-only.
        assert_eq!(l.write_msr(MSR_APIC_BASE, 0xFEE0_0C00, 0), Ok(Effect::None));
        assert_eq!(l.apic_base(), 0xFEE0_0D00);
        for v in [0xFEE0_0800u64, 0xFEE0_0400, 0xFED0_0C00, 0xFEE0_0C01] {
            assert_eq!(
                l.write_msr(MSR_APIC_BASE, v, 0),
                Err(Refused::Reserved {
                    reg: MSR_APIC_BASE,
                    value: v
                })
            );
        }
        l.accept(0x40, false);
        assert_eq!(l.write_msr(MSR_APIC_BASE, 0xFEE0_0000, 0), Ok(Effect::None));
        assert_eq!(l.apic_base(), 0xFEE0_0100);
        assert_eq!(
            l.read_msr(X + reg::ID, 0),
            Err(Refused::Disabled { reg: X + reg::ID })
        );
        assert_eq!(l.pending(), None);
        assert!(!l.accept(0x40, false));
        // Disabled -> x2APIC directly is invalid.
        assert!(l.write_msr(MSR_APIC_BASE, 0xFEE0_0C00, 0).is_err());
    }

    #[test]
    fn priority_and_eoi() {
        let mut l = enabled();
        assert!(l.accept(0x31, false));
        assert!(l.accept(0x52, true));
        assert!(l.accept(0x55, false));
        assert_eq!(l.read_msr(X + reg::IRR0 + 2, 0), Ok(0x0024_0000));
        assert_eq!(l.read_msr(X + reg::TMR0 + 2, 0), Ok(0x0004_0000));
        assert_eq!(l.pending(), Some(0x55));
        assert_eq!(l.ack(), Some(0x55));
        // 0x52 is in the same class as the in-service 0x55: held.
        assert_eq!(l.read_msr(X + reg::PPR, 0), Ok(0x50));
        assert_eq!(l.pending(), None);
        assert_eq!(l.write_msr(X + reg::EOI, 0, 0), Ok(Effect::None));
        assert_eq!(l.ack(), Some(0x52));
        // TPR above the class of 0x31 holds it.
        l.write_msr(X + reg::TPR, 0x40, 0).unwrap();
        assert_eq!(
            l.write_msr(X + reg::EOI, 0, 0),
            Ok(Effect::LevelEoi { vector: 0x52 })
        );
        assert_eq!(l.read_msr(X + reg::PPR, 0), Ok(0x40));
        assert_eq!(l.pending(), None);
        l.write_msr(X + reg::TPR, 0x20, 0).unwrap();
        assert_eq!(l.pending(), Some(0x31));
        // EOI with nothing in service does nothing.
        let mut m = enabled();
        assert_eq!(m.write_msr(X + reg::EOI, 0, 0), Ok(Effect::None));
        assert_eq!(m, enabled());
    }

    #[test]
    fn illegal_vectors_set_esr_and_raise_error_lvt() {
        let mut l = enabled();
        l.write_msr(X + reg::LVT_ERROR, 0xFE, 0).unwrap();
        assert!(!l.accept(0x0F, false));
        assert_eq!(l.read_msr(X + reg::ESR, 0), Ok(0x40));
        assert_eq!(l.pending(), Some(0xFE));
        l.write_msr(X + reg::SELF_IPI, 0x03, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::ESR, 0), Ok(0x60));
        l.write_msr(X + reg::ESR, 0, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::ESR, 0), Ok(0));
    }

    #[test]
    fn software_disable_masks_lvts() {
        let mut l = enabled();
        l.write_msr(X + reg::LVT_LINT0, 0x700, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::LVT_LINT0, 0), Ok(0x700));
        l.write_msr(X + reg::SVR, 0xFF, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::LVT_LINT0, 0), Ok(0x10700));
        l.write_msr(X + reg::LVT_TIMER, 0x20, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::LVT_TIMER, 0), Ok(0x10020));
    }

    #[test]
    fn ipis_reach_self_only() {
        let mut l = enabled();
        // Self shorthand, fixed.
        l.write_msr(X + reg::ICR, 0x4_0041, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::ICR, 0), Ok(0x4_0041));
        // Physical destination 3 (us) and 4 (not us).
        l.write_msr(X + reg::ICR, (3 << 32) | 0x42, 0).unwrap();
        l.write_msr(X + reg::ICR, (4 << 32) | 0x43, 0).unwrap();
        // All excluding self.
        l.write_msr(X + reg::ICR, 0xC_0044, 0).unwrap();
        // Logical: cluster 0, bit 3 = us.
        l.write_msr(X + reg::ICR, (0x8 << 32) | 0x845, 0).unwrap();
        l.write_msr(X + reg::SELF_IPI, 0x46, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::IRR0 + 2, 0), Ok(0x66));
        assert_eq!(l.write_msr(X + reg::ICR, 0x4_0400, 0), Ok(Effect::SelfNmi));
        // INIT to self: dropped.
        assert_eq!(l.write_msr(X + reg::ICR, 0x4_0500, 0), Ok(Effect::None));
    }

    #[test]
    fn one_shot_timer_with_divider() {
        let mut l = enabled();
        l.write_msr(X + reg::TDCR, 0x1, 0).unwrap(); // divide by 4
        l.write_msr(X + reg::LVT_TIMER, 0xEC, 0).unwrap();
        l.write_msr(X + reg::TMICT, 100, 1000).unwrap();
        // 4 TSC per tick x 4 = 16 TSC per count.
        assert_eq!(l.next_deadline(), Some(1000 + 1600));
        assert_eq!(l.read_msr(X + reg::TMCCT, 1000 + 16 * 10 + 5), Ok(90));
        assert!(!l.tick(2599));
        assert!(l.tick(2600));
        assert_eq!(l.pending(), Some(0xEC));
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.read_msr(X + reg::TMCCT, 3000), Ok(0));
        assert!(!l.tick(10_000));
        // Changing the divider keeps the count left.
        l.write_msr(X + reg::TMICT, 100, 0).unwrap();
        l.write_msr(X + reg::TDCR, 0xB, 16 * 40).unwrap(); // divide by 1
        assert_eq!(l.read_msr(X + reg::TMCCT, 16 * 40), Ok(60));
        assert_eq!(l.next_deadline(), Some(16 * 40 + 60 * 4));
    }

    #[test]
    fn periodic_timer_rearms_and_coalesces() {
        let mut l = enabled();
        l.write_msr(X + reg::TDCR, 0xB, 0).unwrap(); // divide by 1
        l.write_msr(X + reg::LVT_TIMER, 0x2_00EF, 0).unwrap();
        l.write_msr(X + reg::TMICT, 10, 0).unwrap();
        assert_eq!(l.next_deadline(), Some(40));
        assert!(l.tick(40));
        assert_eq!(l.next_deadline(), Some(80));
        assert_eq!(l.read_msr(X + reg::TMCCT, 45), Ok(9));
        // Three periods late: one interrupt, next boundary after now.
        assert!(l.tick(200));
        assert_eq!(l.next_deadline(), Some(240));
        assert_eq!(l.ack(), Some(0xEF));
        // Masked: counts, no interrupt.
        l.write_msr(X + reg::LVT_TIMER, 0x3_00EF, 0).unwrap();
        assert!(!l.tick(240));
        assert_eq!(l.next_deadline(), Some(280));
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut l = enabled();
        // Outside deadline mode the MSR reads 0 and ignores writes.
        l.write_msr(MSR_TSC_DEADLINE, 5000, 0).unwrap();
        assert_eq!(l.read_msr(MSR_TSC_DEADLINE, 0), Ok(0));
        l.write_msr(X + reg::LVT_TIMER, 0x4_00EE, 0).unwrap();
        assert_eq!(l.timer_mode(), TimerMode::TscDeadline);
        // TMICT is ignored in deadline mode.
        l.write_msr(X + reg::TMICT, 10, 0).unwrap();
        assert_eq!(l.read_msr(X + reg::TMICT, 0), Ok(0));
        assert_eq!(l.next_deadline(), None);
        l.write_msr(MSR_TSC_DEADLINE, 5000, 0).unwrap();
        assert_eq!(l.read_msr(MSR_TSC_DEADLINE, 0), Ok(5000));
        assert_eq!(l.next_deadline(), Some(5000));
        assert!(!l.tick(4999));
        assert!(l.tick(5000));
        assert_eq!(l.read_msr(MSR_TSC_DEADLINE, 0), Ok(0));
        assert_eq!(l.pending(), Some(0xEE));
        // A deadline in the past fires at the next tick; 0 disarms.
        l.write_msr(MSR_TSC_DEADLINE, 1, 6000).unwrap();
        assert!(l.tick(6000));
        l.write_msr(MSR_TSC_DEADLINE, 7000, 6000).unwrap();
        l.write_msr(MSR_TSC_DEADLINE, 0, 6000).unwrap();
        assert!(!l.tick(8000));
        // Leaving deadline mode disarms.
        l.write_msr(MSR_TSC_DEADLINE, 9000, 0).unwrap();
        l.write_msr(X + reg::LVT_TIMER, 0xEE, 0).unwrap();
        assert_eq!(l.next_deadline(), None);
    }

    fn busy() -> Lapic {
        let mut l = enabled();
        l.write_msr(X + reg::TPR, 0x20, 0).unwrap();
        l.write_msr(X + reg::LVT_ERROR, 0xFE, 0).unwrap();
        l.write_msr(X + reg::LVT_LINT0, 0x700, 0).unwrap();
        l.write_msr(X + reg::LVT_LINT1, 0x400, 0).unwrap();
        l.write_msr(X + reg::LVT_THERMAL, 0x1_0000, 0).unwrap();
        l.write_msr(X + reg::ICR, (3 << 32) | 0x4_0061, 0).unwrap();
        l.accept(0x90, true);
        l.ack();
        l.accept(0x41, false);
        l.accept(0x42, true);
        l.accept(0x3, false);
        l.write_msr(X + reg::TDCR, 0x3, 0).unwrap(); // divide by 16
        l.write_msr(X + reg::LVT_TIMER, 0x2_00EF, 0).unwrap();
        l.write_msr(X + reg::TMICT, 1000, 100).unwrap();
        l
    }

    #[test]
    fn save_restore_round_trips() {
        // 4 TSC per tick x 16: 64 TSC per count; save on a count boundary.
        let mut l = busy();
        let tsc = 100 + 64 * 2500;
        let (hw, page) = l.save(tsc);
        assert_eq!(hw.apic_base_msr, 0xFEE0_0D00);
        assert_eq!(hw.disabled, 0);
        assert_eq!(hw.timer_divisor, 16);
        assert_eq!(
            u32::from_le_bytes(page.data[0x390..0x394].try_into().unwrap()),
            500
        );
        assert_eq!(
            u32::from_le_bytes(page.data[0x20..0x24].try_into().unwrap()),
            3
        );
        let mut back = Lapic::restore(&hw, &page, 4, tsc).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.save(tsc), l.save(tsc));

        let mut d = enabled();
        d.write_msr(X + reg::LVT_TIMER, 0x4_00EE, 0).unwrap();
        d.write_msr(MSR_TSC_DEADLINE, 123_456, 0).unwrap();
        let (hw, page) = d.save(1000);
        assert_eq!(hw.tdt_msr, 123_456);
        assert_eq!(Lapic::restore(&hw, &page, 4, 1000).unwrap(), d);

        let mut off = Lapic::new(0, true, 4);
        off.write_msr(MSR_APIC_BASE, 0xFEE0_0000, 0).unwrap();
        let (hw, page) = off.save(0);
        assert_eq!(hw.disabled, VLAPIC_SW_DISABLED | VLAPIC_HW_DISABLED);
        assert_eq!(Lapic::restore(&hw, &page, 4, 0).unwrap(), off);
    }

    #[test]
    fn restore_at_another_tsc_keeps_the_count() {
        let mut l = busy();
        let (hw, page) = l.save(100 + 64 * 2500 + 10);
        let back = Lapic::restore(&hw, &page, 4, 7_000_000).unwrap();
        assert_eq!(back.read_msr(X + reg::TMCCT, 7_000_000), Ok(500));
        assert_eq!(back.next_deadline(), Some(7_000_000 + 500 * 64));
    }

    #[test]
    fn save_delivers_a_due_expiry() {
        let mut l = enabled();
        l.write_msr(X + reg::LVT_TIMER, 0xE0, 0).unwrap();
        l.write_msr(X + reg::TMICT, 1, 0).unwrap();
        let (_, page) = l.save(1_000_000);
        let irr7 = u32::from_le_bytes(page.data[0x270..0x274].try_into().unwrap());
        assert_eq!(irr7, 1);
    }

    #[test]
    fn restore_refuses_bad_records() {
        let mut l = busy();
        let (hw, page) = l.save(0);
        let with = |off: usize, v: u32| {
            let mut p = page;
            p.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
            Lapic::restore(&hw, &p, 4, 0).unwrap_err().field
        };
        assert_eq!(with(0x80, 0x100), "TPR");
        assert_eq!(with(0x30, 0x14), "version");
        assert_eq!(with(0xD0, 0), "LDR");
        assert_eq!(with(0xA0, 0x20), "PPR");
        assert_eq!(with(0x320, 0x6_00EF), "LVT timer");
        assert_eq!(with(0x390, 1001), "TMCCT");
        assert_eq!(with(0x3E0, 0x4), "TDCR");
        assert_eq!(with(0x300, 1 << 12), "ICR");
        assert_eq!(with(0xF0, 0xFF), "disabled");
        let bad = |hw: HvmHwLapic| Lapic::restore(&hw, &page, 4, 0).unwrap_err().field;
        assert_eq!(
            bad(HvmHwLapic {
                timer_divisor: 2,
                ..hw
            }),
            "timer_divisor"
        );
        assert_eq!(bad(HvmHwLapic { tdt_msr: 5, ..hw }), "tdt_msr");
        for base in [0xFEE0_0900u64, 0xFEE0_0500, 0xFEC0_0D00, 0xFEE0_0D01] {
            assert_eq!(
                bad(HvmHwLapic {
                    apic_base_msr: base,
                    ..hw
                }),
                "apic_base_msr"
            );
        }
    }
}
