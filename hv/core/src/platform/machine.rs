//! The platform as one machine: the device models of this module wired to
//! each other and to the guest's port, MMIO and MSR accesses, the way the
//! hypervisor's exit dispatch sees them.
//!
//! Routing: COM1's interrupt line drives IOAPIC pin 4 (the DSDT's `COM1`,
//! edge, active high); IOAPIC deliveries and the LAPIC timer go into the
//! LAPIC's IRR; a level-triggered vector's EOI goes back to the IOAPIC.
//! The hypervisor asks [`Machine::pending`] before each entry and injects
//! what [`Machine::ack`] returns.
//!
//! Time is the guest's TSC throughout (host TSC plus the MSR state's
//! offset): the LAPIC's TSC-deadline and count-down timers, the RTC and
//! the PIT's channel 2 (at the RTC clock's TSC rate) run on it. Ports no
//! device claims read as all ones and drop writes, as on a
//! PC with nothing at that address.

use crate::acpi;
use crate::msr::Vendor;
use crate::msr_policy::{self, Gp, MsrState, Read, Write};

use doppel_abi::hvm::{HvmHwLapicRegs, HvmTscAdjust};

use crate::hvm::VcpuState;

use super::ioapic::{Delivery, DeliveryKind, Ioapic};
use super::lapic::{Effect, Lapic};
use super::pit::{self, Pit};
use super::records::MachineRecords;
use super::rtc::{Clock, Rtc};
use super::uart::Uart;
use super::RecordError;

/// COM1's eight ports.
pub const COM1_FIRST: u16 = acpi::COM1_PORT;
pub const COM1_LAST: u16 = acpi::COM1_PORT + 7;
/// The CMOS RTC's index and data ports.
pub const RTC_FIRST: u16 = 0x70;
pub const RTC_LAST: u16 = 0x71;
/// The PIT's channel 2 and control ports, and port 0x61 (gate 2, speaker
/// enable, OUT2). Channels 0 and 1 (0x40, 0x41) are not there.
pub const PIT_CH2: u16 = pit::PORT_CH2;
pub const PIT_CONTROL: u16 = pit::PORT_CONTROL;
pub const PIT_SPEAKER: u16 = pit::PORT_SPEAKER;
/// A byte written here is a mark the test harness times the guest by
/// (`doppel-hv: linux: mark=..`): the guest's /init writes it through
/// /dev/port. Not a device Linux knows; reads give all ones.
pub const MARK_PORT: u16 = 0x602;
/// The IOAPIC's MMIO window.
pub const IOAPIC_BASE: u64 = acpi::IOAPIC_ADDR as u64;
pub const IOAPIC_SIZE: u64 = 0x1000;

/// TSC cycles per APIC bus clock: only the count-down timer uses it
/// (Linux takes the TSC-deadline timer it is offered).
pub const APIC_TSC_PER_TICK: u64 = 1;

/// A restore that broke on purpose (the test suite's broken variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    None,
    /// Rebuild the LAPIC without its LAPIC_REGS record (the register page
    /// of a LAPIC out of reset instead).
    SkipLapicRegs,
}

/// What a port write asks of the hypervisor besides the device update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    None,
    /// A byte for the console (COM1's THR).
    Console(u8),
    /// A mark for the test harness.
    Mark(u8),
    /// ACPI S5 through the sleep control register: the guest powered off.
    Poweroff,
}

/// An MMIO access no device claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoDevice {
    pub gpa: u64,
}

/// A guest's platform: its devices and emulated MSRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub vendor: Vendor,
    pub lapic: Lapic,
    pub ioapic: Ioapic,
    pub rtc: Rtc,
    pub pit: Pit,
    pub uart: Uart,
    pub msrs: MsrState,
    /// The level last driven on IOAPIC pin 4 by COM1.
    com1_line: bool,
    /// Deliveries the LAPIC could not take (NMI), counted.
    pub dropped_deliveries: u64,
}

impl Machine {
    /// The machine at the PVH entry: LAPIC in x2APIC mode (id 0),
    /// IOAPIC masked, RTC at `clock`, PIT channel 2 unprogrammed (counting
    /// at `clock.khz`), COM1 idle, MSRs at reset. The TSC
    /// offset is the caller's (it sets `msrs.tsc_offset` and the vCPU's).
    pub fn new(vendor: Vendor, phys_bits: u8, clock: Clock) -> Self {
        Machine {
            vendor,
            lapic: Lapic::new(0, true, APIC_TSC_PER_TICK),
            ioapic: Ioapic::new(0),
            rtc: Rtc::new(clock),
            pit: Pit::new(clock.khz),
            uart: Uart::new(),
            msrs: MsrState::new(phys_bits),
            com1_line: false,
            dropped_deliveries: 0,
        }
    }

    /// Put back the parts that are not in any record (COM1 is a device
    /// model's state, the pin level follows from it).
    pub fn from_parts(
        vendor: Vendor,
        lapic: Lapic,
        ioapic: Ioapic,
        rtc: Rtc,
        pit: Pit,
        uart: Uart,
        msrs: MsrState,
    ) -> Self {
        let mut m = Machine {
            vendor,
            lapic,
            ioapic,
            rtc,
            pit,
            uart,
            msrs,
            com1_line: false,
            dropped_deliveries: 0,
        };
        m.drive_com1();
        m
    }

    /// The guest's TSC at host TSC `host_tsc`.
    pub fn guest_tsc(&self, host_tsc: u64) -> u64 {
        self.msrs.guest_tsc(host_tsc)
    }

    fn deliver(&mut self, d: Option<Delivery>) {
        let Some(d) = d else { return };
        match d.kind {
            // One vCPU: every fixed or lowest-priority message is its.
            DeliveryKind::Fixed | DeliveryKind::LowestPriority => {
                self.lapic.accept(d.vector, d.level);
            }
            DeliveryKind::Nmi => self.dropped_deliveries += 1,
        }
    }

    /// An edge on `gsi` (a device model's device asked for one).
    pub fn pulse_gsi(&mut self, gsi: u32) {
        let d = self.ioapic.pulse_irq(gsi);
        self.deliver(d);
    }

    /// Re-drive IOAPIC pin 4 from COM1's interrupt output.
    fn drive_com1(&mut self) {
        let level = self.uart.irq();
        if level != self.com1_line {
            self.com1_line = level;
            let d = self.ioapic.set_irq(acpi::COM1_GSI, level);
            self.deliver(d);
        }
    }

    /// IN of `size` bytes from `port`. Unclaimed ports (and refused
    /// reads) give all ones.
    pub fn port_read(&mut self, port: u16, size: u8, host_tsc: u64) -> u32 {
        let ones = match size {
            1 => 0xff,
            2 => 0xffff,
            _ => u32::MAX,
        };
        if size != 1 {
            return ones;
        }
        let tsc = self.guest_tsc(host_tsc);
        let v = match port {
            COM1_FIRST..=COM1_LAST => {
                let v = self.uart.read(port - COM1_FIRST);
                self.drive_com1();
                v.ok()
            }
            RTC_FIRST..=RTC_LAST => self.rtc.read(port, tsc).ok(),
            PIT_CH2 | PIT_CONTROL | PIT_SPEAKER => self.pit.read(port, tsc).ok(),
            acpi::SLEEP_STATUS_PORT => Some(0),
            _ => None,
        };
        v.map_or(ones, u32::from)
    }

    /// OUT of `size` bytes of `value` to `port`. Unclaimed ports (and
    /// refused writes) drop it.
    pub fn port_write(&mut self, port: u16, size: u8, value: u32, host_tsc: u64) -> PortEffect {
        if size != 1 {
            return PortEffect::None;
        }
        let byte = value as u8;
        let tsc = self.guest_tsc(host_tsc);
        match port {
            COM1_FIRST..=COM1_LAST => {
                let out = self.uart.write(port - COM1_FIRST, byte);
                self.drive_com1();
                match out {
                    Ok(Some(b)) => PortEffect::Console(b),
                    _ => PortEffect::None,
                }
            }
            RTC_FIRST..=RTC_LAST => {
                let _ = self.rtc.write(port, byte, tsc);
                PortEffect::None
            }
            PIT_CH2 | PIT_CONTROL | PIT_SPEAKER => {
                let _ = self.pit.write(port, byte, tsc);
                PortEffect::None
            }
            MARK_PORT => PortEffect::Mark(byte),
            p if acpi::is_poweroff(p, byte) => PortEffect::Poweroff,
            _ => PortEffect::None,
        }
    }

    /// Whether `gpa` is in a device's MMIO window.
    pub fn claims_mmio(gpa: u64) -> bool {
        (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&gpa)
    }

    /// An MMIO read of `size` bytes at `gpa`. A refused access to a device
    /// reads all ones; no device at all is an error for the caller.
    pub fn mmio_read(&mut self, gpa: u64, size: u8) -> Result<u64, NoDevice> {
        if !Self::claims_mmio(gpa) {
            return Err(NoDevice { gpa });
        }
        Ok(self.ioapic.read(gpa - IOAPIC_BASE, size).map_or(
            u64::MAX >> (64 - 8 * u32::from(size.clamp(1, 8))),
            u64::from,
        ))
    }

    /// An MMIO write; a refused one is dropped.
    pub fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) -> Result<(), NoDevice> {
        if !Self::claims_mmio(gpa) {
            return Err(NoDevice { gpa });
        }
        if let Ok(d) = self.ioapic.write(gpa - IOAPIC_BASE, size, value as u32) {
            self.deliver(d);
        }
        Ok(())
    }

    /// An intercepted RDMSR the MSR policy or the LAPIC answers.
    pub fn rdmsr(&mut self, msr: u32, host_tsc: u64) -> Result<u64, Gp> {
        match self.msrs.read(self.vendor, msr, host_tsc) {
            Read::Value(v) => Ok(v),
            Read::Apic { msr } => self
                .lapic
                .read_msr(msr, self.msrs.guest_tsc(host_tsc))
                .map_err(|_| Gp::BadValue),
            Read::Gp(g) => Err(g),
        }
    }

    /// An intercepted WRMSR; on `Ok` the value is the new state (the
    /// caller copies MSRs the vCPU holds into it: EFER, the switched
    /// ones, the TSC offset).
    pub fn wrmsr(&mut self, msr: u32, value: u64, host_tsc: u64) -> Result<(), Gp> {
        match self.msrs.write(self.vendor, msr, value, host_tsc) {
            Write::Done => Ok(()),
            Write::Apic { msr, value } => {
                let tsc = self.msrs.guest_tsc(host_tsc);
                match self.lapic.write_msr(msr, value, tsc) {
                    Ok(Effect::None) => Ok(()),
                    Ok(Effect::LevelEoi { vector }) => {
                        let d = self.ioapic.eoi(vector);
                        self.deliver(d);
                        Ok(())
                    }
                    Ok(Effect::SelfNmi) => {
                        self.dropped_deliveries += 1;
                        Ok(())
                    }
                    Err(_) => Err(Gp::BadValue),
                }
            }
            Write::Gp(g) => Err(g),
        }
    }

    /// Advance the timers to now.
    pub fn update(&mut self, host_tsc: u64) {
        let tsc = self.msrs.guest_tsc(host_tsc);
        self.lapic.tick(tsc);
    }

    /// The host TSC at which [`Machine::update`] next has work.
    pub fn next_deadline(&self) -> Option<u64> {
        self.lapic
            .next_deadline()
            .map(|g| g.wrapping_sub(self.msrs.tsc_offset))
    }

    /// The vector to inject now, if any.
    pub fn pending(&self) -> Option<u8> {
        self.lapic.pending()
    }

    /// The caller injects [`Machine::pending`]: move it to in-service.
    pub fn ack(&mut self) -> Option<u8> {
        self.lapic.ack()
    }

    /// The machine's records at host TSC `host_tsc`, with the vCPU's
    /// architectural state `cpu` (its FPU image included); the CPU
    /// record's TSC is the guest's now.
    pub fn save(&mut self, mut cpu: VcpuState, host_tsc: u64) -> MachineRecords {
        let tsc = self.guest_tsc(host_tsc);
        cpu.tsc = tsc;
        let (lapic, lapic_regs) = self.lapic.save(tsc);
        MachineRecords {
            cpu,
            lapic,
            lapic_regs,
            ioapic: self.ioapic.save(),
            pit: self.pit.save(),
            rtc: self.rtc.save(tsc),
            mtrr: self.msrs.save_mtrr(),
            tsc_adjust: self.msrs.save_tsc_adjust().tsc_adjust,
        }
    }

    /// A machine rebuilt from records alone, plus what no record holds: the
    /// platform's configuration (`vendor`, `phys_bits`, the RTC's `clock`)
    /// and COM1 (a device model's state in Xen's split, which lives
    /// outside the HVM context). The guest's TSC continues from the CPU
    /// record's at host TSC `host_tsc`; the PIT's channel 2 restarts its
    /// count there (Xen's semantics, see [`super::pit`]).
    pub fn restore(
        r: &MachineRecords,
        vendor: Vendor,
        phys_bits: u8,
        clock: Clock,
        uart: Uart,
        host_tsc: u64,
        sabotage: Sabotage,
    ) -> Result<Self, RecordError> {
        // The sabotaged restore has no LAPIC_REGS: the register page of a
        // LAPIC just out of reset stands in for it.
        let reset_page: HvmHwLapicRegs = Lapic::new(0, true, APIC_TSC_PER_TICK).save(r.cpu.tsc).1;
        let page = match sabotage {
            Sabotage::None => &r.lapic_regs,
            Sabotage::SkipLapicRegs => &reset_page,
        };
        let lapic = Lapic::restore(&r.lapic, page, APIC_TSC_PER_TICK, r.cpu.tsc)?;
        let ioapic = Ioapic::restore(&r.ioapic)?;
        let rtc = Rtc::restore(&r.rtc, clock)?;
        let pit = Pit::restore(&r.pit, clock.khz, r.cpu.tsc)?;
        let mut msrs = MsrState::new(phys_bits);
        msrs.restore_mtrr(&r.mtrr)?;
        msrs.restore_tsc_adjust(&HvmTscAdjust {
            tsc_adjust: r.tsc_adjust,
        });
        msrs.restore_guest_tsc(r.cpu.tsc, host_tsc);
        // The MSRs the vCPU holds, as the CPU record has them (the
        // policy's copy is checked against them on the next write).
        msrs.efer = r.cpu.efer;
        msrs.star = r.cpu.star;
        msrs.lstar = r.cpu.lstar;
        msrs.cstar = r.cpu.cstar;
        msrs.sfmask = r.cpu.sfmask;
        msrs.kernel_gs_base = r.cpu.kernel_gs_base;
        msrs.sysenter_cs = r.cpu.sysenter_cs;
        msrs.sysenter_esp = r.cpu.sysenter_esp;
        msrs.sysenter_eip = r.cpu.sysenter_eip;
        msrs.fs_base = r.cpu.fs.base;
        msrs.gs_base = r.cpu.gs.base;
        Ok(Self::from_parts(
            vendor, lapic, ioapic, rtc, pit, uart, msrs,
        ))
    }

    /// Whether an MSR is one the vCPU itself holds (the world switch or
    /// the CPU's own state): its value is read from the vCPU, and a write
    /// the policy accepts is copied into the vCPU.
    pub fn vcpu_held(msr: u32) -> bool {
        use msr_policy::nr::*;
        matches!(
            msr,
            EFER | STAR
                | LSTAR
                | CSTAR
                | SFMASK
                | FS_BASE
                | GS_BASE
                | KERNEL_GS_BASE
                | SYSENTER_CS
                | SYSENTER_ESP
                | SYSENTER_EIP
        )
    }
}

/// CR4 bits a guest may set: what the CPUID policy shows (VME, PVI, TSD,
/// DE, PSE, PAE, PGE, PCE, OSFXSR, OSXMMEXCPT, FSGSBASE, SMEP, SMAP).
/// Not MCE (no machine checks), UMIP, VMXE, SMXE, PCIDE, OSXSAVE (no
/// XSAVE: the world switch does not switch XCR0), PKE, LA57, CET.
pub const CR4_ALLOWED: u64 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x80
    | 0x100
    | 0x200
    | 0x400
    | (1 << 16)
    | (1 << 20)
    | (1 << 21);

/// A MOV to CR4 of `value`: the value to load, or #GP.
pub fn check_cr4(value: u64) -> Result<u64, Gp> {
    if value & !CR4_ALLOWED != 0 {
        return Err(Gp::BadValue);
    }
    Ok(value)
}

/// A MOV to CR0 of `value` (reserved high bits, PG without PE, NW
/// without CD are #GP; ET is hard-wired to 1).
pub fn check_cr0(value: u64) -> Result<u64, Gp> {
    const PE: u64 = 1;
    const ET: u64 = 1 << 4;
    const NW: u64 = 1 << 29;
    const CD: u64 = 1 << 30;
    const PG: u64 = 1 << 31;
    if value >> 32 != 0
        || (value & PG != 0 && value & PE == 0)
        || (value & NW != 0 && value & CD == 0)
    {
        return Err(Gp::BadValue);
    }
    Ok(value | ET)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::platform::lapic;

    fn machine() -> Machine {
        Machine::new(
            Vendor::Svm,
            40,
            Clock {
                secs: 1_700_000_000,
                tsc: 0,
                khz: 1_000_000,
            },
        )
    }

    /// Route GSI 4 to `vector`, edge, unmasked, as Linux programs it.
    fn route_com1(m: &mut Machine, vector: u8) {
        let base = IOAPIC_BASE;
        m.mmio_write(base, 4, 0x10 + 2 * 4).unwrap();
        m.mmio_write(base + 0x10, 4, u64::from(vector)).unwrap();
        m.mmio_write(base, 4, 0x10 + 2 * 4 + 1).unwrap();
        m.mmio_write(base + 0x10, 4, 0).unwrap();
    }

    fn enable_lapic(m: &mut Machine) {
        m.wrmsr(0x80f, 0x1ff, 0).unwrap();
    }

    #[test]
    fn com1_thre_interrupt_reaches_the_lapic_through_the_ioapic() {
        let mut m = machine();
        enable_lapic(&mut m);
        route_com1(&mut m, 0x24);
        assert_eq!(m.pending(), None);
        // MCR OUT2, then IER THRE: THR is empty, so the line rises.
        m.port_write(COM1_FIRST + 4, 1, 0x08, 0);
        m.port_write(COM1_FIRST + 1, 1, 0x02, 0);
        assert_eq!(m.pending(), Some(0x24));
        assert_eq!(m.ack(), Some(0x24));
        assert_eq!(m.pending(), None);
        // A byte out is console output.
        assert_eq!(
            m.port_write(COM1_FIRST, 1, u32::from(b'x'), 0),
            PortEffect::Console(b'x')
        );
        // EOI clears in-service.
        m.wrmsr(0x80b, 0, 0).unwrap();
    }

    #[test]
    fn tsc_deadline_fires_at_the_guest_tsc_and_maps_to_host_time() {
        let mut m = machine();
        m.msrs.tsc_offset = 1000;
        enable_lapic(&mut m);
        // LVT timer: TSC-deadline mode, vector 0xec.
        m.wrmsr(0x832, 0xec | (2 << 17), 0).unwrap();
        m.wrmsr(0x6e0, 50_000, 0).unwrap();
        assert_eq!(m.next_deadline(), Some(49_000));
        m.update(48_999);
        assert_eq!(m.pending(), None);
        m.update(49_000);
        assert_eq!(m.pending(), Some(0xec));
        assert_eq!(m.lapic.timer_mode(), lapic::TimerMode::TscDeadline);
    }

    #[test]
    fn unclaimed_ports_read_ones_and_poweroff_is_seen() {
        let mut m = machine();
        assert_eq!(m.port_read(0x80, 1, 0), 0xff);
        assert_eq!(m.port_read(0x3f8, 2, 0), 0xffff);
        assert_eq!(m.port_write(0x80, 1, 0, 0), PortEffect::None);
        assert_eq!(m.port_write(MARK_PORT, 1, 7, 0), PortEffect::Mark(7));
        let slp = (acpi::S5_SLP_TYP << 2) | (1 << 5);
        assert_eq!(
            m.port_write(acpi::SLEEP_CONTROL_PORT, 1, u32::from(slp), 0),
            PortEffect::Poweroff
        );
        // SLP_EN without S5's type is not a poweroff.
        assert_eq!(
            m.port_write(acpi::SLEEP_CONTROL_PORT, 1, 1 << 5, 0),
            PortEffect::None
        );
    }

    #[test]
    fn rtc_reads_the_clock_and_unknown_mmio_is_no_device() {
        let mut m = machine();
        m.port_write(RTC_FIRST, 1, 0x0b, 0);
        m.port_write(RTC_LAST, 1, 0x06, 0); // binary, 24 h
        m.port_write(RTC_FIRST, 1, 0x09, 0);
        // 1_700_000_000 is 2023-11-14 22:13:20 UTC.
        assert_eq!(m.port_read(RTC_LAST, 1, 0), 23);
        assert_eq!(
            m.mmio_read(0xfee0_0000, 4),
            Err(NoDevice { gpa: 0xfee0_0000 })
        );
        m.mmio_write(IOAPIC_BASE, 4, 1).unwrap();
        assert_eq!(m.mmio_read(IOAPIC_BASE + 0x10, 4), Ok(0x0017_0011));
    }

    /// Linux's `quick_pit_calibrate` through the port dispatch: gate on and
    /// speaker off through port 0x61, mode 0 from 0xffff, then LSB/MSB
    /// pairs until the MSB changes. It falls by one every 256 PIT clocks of
    /// the guest's TSC (here 1 GHz: 214 552 cycles), starting at the load.
    #[test]
    fn linux_quick_pit_calibration_sees_the_msb_fall_at_the_pit_rate() {
        let mut m = machine();
        m.msrs.tsc_offset = 3_000;
        let v = m.port_read(PIT_SPEAKER, 1, 0);
        assert_eq!(v & !0x10, 0, "gate, speaker and OUT2 low after reset");
        m.port_write(PIT_SPEAKER, 1, (v & !0x02) | 0x01, 0);
        m.port_write(PIT_CONTROL, 1, 0xb0, 0);
        m.port_write(PIT_CH2, 1, 0xff, 0);
        m.port_write(PIT_CH2, 1, 0xff, 0);
        let step = 50;
        let (mut host, mut msb, mut changes) = (0u64, 0xff, Vec::new());
        while changes.len() < 20 {
            let _lsb = m.port_read(PIT_CH2, 1, host);
            let b = m.port_read(PIT_CH2, 1, host);
            if b != msb {
                assert_eq!(b, msb - 1, "at host TSC {host}");
                changes.push(host);
                msb = b;
            }
            host += step;
        }
        let per = 256 * 1_000_000_000 / pit::PIT_HZ;
        assert_eq!(per, 214_552);
        assert!(changes[0].abs_diff(per) <= step, "{}", changes[0]);
        for w in changes.windows(2) {
            assert!((w[1] - w[0]).abs_diff(per) <= step, "{w:?}");
        }
        // A word-sized IN, channel 0 and the unused 0x40/0x41 stay unclaimed.
        assert_eq!(m.port_read(PIT_CH2, 2, host), 0xffff);
        assert_eq!(m.port_read(0x40, 1, host), 0xff);
        let before = m.pit.clone();
        m.port_write(PIT_CONTROL, 1, 0x34, host); // channel 0, mode 2
        m.port_write(0x40, 1, 0x12, host);
        assert_eq!(m.pit, before);
    }

    /// `pit_calibrate_tsc`'s countdown: mode 0 with a 50 ms latch sets OUT2
    /// (port 0x61 bit 5) at the first host TSC where the guest's TSC is
    /// 59 659 PIT clocks past the load, not one cycle before.
    #[test]
    fn pit_mode0_countdown_sets_out2_at_the_right_tsc() {
        let mut m = machine();
        m.msrs.tsc_offset = 1_000_000;
        m.port_write(PIT_SPEAKER, 1, 0x01, 0);
        m.port_write(PIT_CONTROL, 1, 0xb0, 0);
        let latch: u32 = 59_659;
        m.port_write(PIT_CH2, 1, latch & 0xff, 500);
        m.port_write(PIT_CH2, 1, latch >> 8, 500);
        let due = 500 + (u64::from(latch) * 1_000_000_000).div_ceil(pit::PIT_HZ);
        assert_eq!(due, 500 + 49_999_917);
        assert_eq!(m.port_read(PIT_SPEAKER, 1, 500) & 0x21, 0x01);
        assert_eq!(m.port_read(PIT_SPEAKER, 1, due - 1) & 0x21, 0x01);
        assert_eq!(m.port_read(PIT_SPEAKER, 1, due) & 0x21, 0x21);
    }

    /// A machine mid-run (LAPIC timer armed, IOAPIC routed, RTC set, MTRRs
    /// and TSC_ADJUST written) saved, put through Xen's stream and
    /// restored from it alone is the same machine, with its TSC going on
    /// from where it was; without LAPIC_REGS it is not.
    #[test]
    fn save_encode_decode_restore_is_the_same_machine() {
        use crate::hvm::HeaderInfo;
        use crate::platform::records;
        let mut m = machine();
        m.msrs.tsc_offset = 5_000;
        enable_lapic(&mut m);
        route_com1(&mut m, 0x24);
        m.wrmsr(0x832, 0xec | (2 << 17), 100).unwrap();
        m.wrmsr(0x6e0, 900_000, 100).unwrap();
        m.wrmsr(0x2ff, 0xc06, 100).unwrap();
        m.wrmsr(0x3b, 77, 100).unwrap();
        m.port_write(COM1_FIRST + 4, 1, 0x08, 100);
        m.port_write(PIT_SPEAKER, 1, 0x03, 100);
        m.port_write(PIT_CONTROL, 1, 0xb6, 100); // mode 3
        m.port_write(PIT_CH2, 1, 0x34, 100);
        m.port_write(PIT_CH2, 1, 0x12, 100);
        let cpu = VcpuState {
            rip: 0xffff_ffff_8100_0000,
            efer: 0xd01,
            lstar: 0xffff_ffff_8120_0000,
            ..VcpuState::default()
        };
        let recs = m.save(cpu, 1_000);
        let header = HeaderInfo {
            cpuid: 0x800f12,
            gtsc_khz: 1_000_000,
            changeset: 0,
        };
        let blob = records::encode(&recs, header, None).unwrap();
        let back = records::decode(&blob).unwrap();
        assert_eq!(back, recs);
        let clock = Clock {
            secs: 1_700_000_000,
            tsc: 0,
            khz: 1_000_000,
        };
        // Restored 10 000 host ticks later: the guest TSC goes on from
        // the record, so the offset moves by as much.
        let restore = |sabotage| {
            Machine::restore(
                &back,
                Vendor::Svm,
                40,
                clock,
                m.uart.clone(),
                11_000,
                sabotage,
            )
        };
        let mut r = restore(Sabotage::None).unwrap();
        // (5 000 plus the 77 the TSC_ADJUST write added.)
        assert_eq!(r.msrs.tsc_offset, 5_077u64.wrapping_sub(10_000));
        assert_eq!(r.guest_tsc(11_000), m.guest_tsc(1_000));
        assert_eq!(r.lapic.save(6_000), m.lapic.save(6_000));
        assert_eq!(r.ioapic, m.ioapic);
        assert_eq!(r.pit.save(), m.pit.save());
        assert_eq!(r.pit.save().channels[2].count, 0x1234);
        // Counting restarts from the reload value at the restore.
        r.port_write(PIT_CONTROL, 1, 0x80, 11_000);
        assert_eq!(r.port_read(PIT_CH2, 1, 11_000), 0x34);
        assert_eq!(r.port_read(PIT_CH2, 1, 11_000), 0x12);
        assert_eq!(r.msrs.save_mtrr(), m.msrs.save_mtrr());
        assert_eq!(r.msrs.tsc_adjust, 77);
        assert_eq!(r.msrs.lstar, 0xffff_ffff_8120_0000);
        // The deadline, in host time, moved with the offset.
        assert_eq!(r.next_deadline(), Some(900_000 - 5_077 + 10_000));
        // Without LAPIC_REGS (a reset register page instead) the LAPIC
        // record's enabled state contradicts the page: refused.
        let broken = restore(Sabotage::SkipLapicRegs);
        assert_eq!(broken.map(|_| ()).map_err(|e| e.field), Err("disabled"));
    }

    #[test]
    fn control_register_writes_are_checked() {
        // Linux's PVH entry sets PAE, later PGE, OSFXSR, OSXMMEXCPT.
        assert_eq!(check_cr4(0x20), Ok(0x20));
        assert_eq!(check_cr4(0x6a0), Ok(0x6a0));
        // OSXSAVE (18), VMXE (13), LA57 (12), PCIDE (17) are refused.
        for bit in [18, 13, 12, 17] {
            assert_eq!(check_cr4(1 << bit), Err(Gp::BadValue), "bit {bit}");
        }
        assert_eq!(check_cr0(0x8000_0001), Ok(0x8000_0011));
        assert_eq!(check_cr0(0x8000_0000), Err(Gp::BadValue));
        assert_eq!(check_cr0(1 << 29 | 1), Err(Gp::BadValue));
        assert_eq!(check_cr0(1 << 32 | 1), Err(Gp::BadValue));
    }

    #[test]
    fn refused_msrs_are_gp_and_change_nothing() {
        let mut m = machine();
        let before = m.clone();
        assert_eq!(m.wrmsr(0xc001_0117, 0, 0), Err(Gp::Unknown));
        assert_eq!(m.rdmsr(0x48, 0), Err(Gp::Unknown));
        assert_eq!(m, before);
        assert!(Machine::vcpu_held(0xc000_0080));
        assert!(!Machine::vcpu_held(0x10));
    }
}
