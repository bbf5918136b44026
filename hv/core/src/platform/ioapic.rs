//! IOAPIC: the MMIO window at 0xFEC00000 (IOREGSEL at +0x00, IOWIN at
//! +0x10), ID, version 0x11 with 24 redirection entries, and the routing
//! of interrupt lines (GSIs) to a vector and destination.
//!
//! # What is modelled
//! 32-bit accesses to IOREGSEL and IOWIN; registers ID (bits 24-27
//! writable), version (0x00170011), arbitration (reads the ID) and the 24
//! redirection entries. Lines are driven with [`Ioapic::set_irq`] (level
//! as the guest sees it asserted; polarity is stored, not applied) or
//! [`Ioapic::pulse_irq`]. Edge pins deliver on a rising edge while
//! unmasked; level pins deliver while asserted and remote IRR is clear, set
//! remote IRR, and deliver again after [`Ioapic::eoi`] if still asserted.
//! Fixed and lowest-priority entries give a [`Delivery`] with the vector;
//! NMI entries one with [`DeliveryKind::Nmi`]; SMI/INIT/ExtINT are dropped.
//!
//! # What is refused or masked
//! Accesses other than 32-bit at offset 0x00 or 0x10 are [`Refused`] (the
//! caller drops the write, reads all ones). IOREGSEL keeps its low 8 bits.
//! Reads of unimplemented register indices are refused; writes to version
//! and arbitration are read-only refusals; reserved and read-only bits of
//! a redirection entry (delivery status, remote IRR, 17-55) are masked.
//!
//! # Save record
//! Xen's IOAPIC record has 48 pins: pins 24-47 are saved masked and must
//! be masked on restore. Line levels are not in it (Xen keeps them in its
//! IRQ records): after a restore the caller drives [`Ioapic::set_irq`]
//! again from its devices' line state.
use doppel_abi::hvm::{HvmHwVioapic, VIOAPIC_NUM_PINS};

use super::{RecordError, Refused};

/// Guest-physical base of the window.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Redirection entries.
pub const PINS: usize = 24;
/// Offsets in the window.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
/// Version register: version 0x11, max redirection entry 23.
pub const VERSION: u32 = 0x0017_0011;

/// Redirection entry bits.
pub const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Guest-writable: vector, delivery mode, dest mode, polarity, trigger,
/// mask, destination.
const RTE_WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

/// How a delivery reaches the local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryKind {
    Fixed,
    LowestPriority,
    Nmi,
}

/// An interrupt message for the local APIC(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub vector: u8,
    pub kind: DeliveryKind,
    /// Destination APIC ID (physical) or logical destination.
    pub dest: u8,
    pub logical: bool,
    /// Level-triggered: the LAPIC sets TMR and its EOI comes back here.
    pub level: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ioapic {
    id: u8,
    ioregsel: u8,
    redir: [u64; PINS],
    /// Asserted lines, bit per pin.
    lines: u32,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Ioapic {
    /// After reset: every entry masked.
    pub fn new(id: u8) -> Self {
        Ioapic {
            id: id & 0xF,
            ioregsel: 0,
            redir: [RTE_MASKED; PINS],
            lines: 0,
        }
    }

    /// The redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redir.get(pin).copied()
    }

    fn check(offset: u64, size: u8) -> Result<(), Refused> {
        let reg = u32::try_from(offset).unwrap_or(u32::MAX);
        if size != 4 || (offset != IOREGSEL && offset != IOWIN) {
            return Err(Refused::Unknown { reg });
        }
        Ok(())
    }

    /// Read `size` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, size: u8) -> Result<u32, Refused> {
        Self::check(offset, size)?;
        if offset == IOREGSEL {
            return Ok(u32::from(self.ioregsel));
        }
        let r = self.ioregsel;
        match r {
            0 | 2 => Ok(u32::from(self.id) << 24),
            1 => Ok(VERSION),
            0x10..=0x3F => {
                let e = self
                    .redir
                    .get(usize::from((r - 0x10) / 2))
                    .copied()
                    .unwrap_or(0);
                Ok(if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                })
            }
            _ => Err(Refused::Unknown { reg: u32::from(r) }),
        }
    }

    /// Write `size` bytes at `offset`; an unmasked entry whose level line
    /// is pending delivers at once.
    pub fn write(
        &mut self,
        offset: u64,
        size: u8,
        value: u32,
    ) -> Result<Option<Delivery>, Refused> {
        Self::check(offset, size)?;
        if offset == IOREGSEL {
            self.ioregsel = value as u8;
            return Ok(None);
        }
        let r = self.ioregsel;
        match r {
            0 => self.id = ((value >> 24) & 0xF) as u8,
            1 | 2 => return Err(Refused::ReadOnly { reg: u32::from(r) }),
            0x10..=0x3F => {
                let pin = usize::from((r - 0x10) / 2);
                let Some(e) = self.redir.get_mut(pin) else {
                    return Err(Refused::Unknown { reg: u32::from(r) });
                };
                let new = if r & 1 == 0 {
                    (*e & !0xFFFF_FFFF) | u64::from(value)
                } else {
                    (*e & 0xFFFF_FFFF) | (u64::from(value) << 32)
                };
                // Keep the read-only remote IRR; drop it for edge entries.
                let mut keep = *e & RTE_REMOTE_IRR;
                if new & RTE_LEVEL == 0 {
                    keep = 0;
                }
                *e = (new & RTE_WRITABLE) | keep;
                return Ok(self.service(pin));
            }
            _ => return Err(Refused::Unknown { reg: u32::from(r) }),
        }
        Ok(None)
    }

    /// Deliver a pending level interrupt on `pin` if it may go now.
    fn service(&mut self, pin: usize) -> Option<Delivery> {
        let e = *self.redir.get(pin)?;
        let asserted = self.lines & (1u32 << pin) != 0;
        if !asserted || e & RTE_LEVEL == 0 || e & RTE_MASKED != 0 || e & RTE_REMOTE_IRR != 0 {
            return None;
        }
        let d = Self::message(e)?;
        if let Some(slot) = self.redir.get_mut(pin) {
            *slot |= RTE_REMOTE_IRR;
        }
        Some(d)
    }

    fn message(e: u64) -> Option<Delivery> {
        let kind = match (e >> 8) & 7 {
            0 => DeliveryKind::Fixed,
            1 => DeliveryKind::LowestPriority,
            4 => DeliveryKind::Nmi,
            _ => return None,
        };
        Some(Delivery {
            vector: e as u8,
            kind,
            dest: (e >> 56) as u8,
            logical: e & (1 << 11) != 0,
            level: e & RTE_LEVEL != 0,
        })
    }

    /// Drive line `gsi` (asserted = true). Returns the message to deliver,
    /// if any. GSIs above 23 do not exist: nothing happens.
    pub fn set_irq(&mut self, gsi: u32, asserted: bool) -> Option<Delivery> {
        let pin = usize::try_from(gsi).ok().filter(|p| *p < PINS)?;
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if asserted {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
            return None;
        }
        let e = *self.redir.get(pin)?;
        if e & RTE_LEVEL != 0 {
            return self.service(pin);
        }
        if was || e & RTE_MASKED != 0 {
            return None;
        }
        Self::message(e)
    }

    /// An edge: assert then deassert `gsi`.
    pub fn pulse_irq(&mut self, gsi: u32) -> Option<Delivery> {
        let d = self.set_irq(gsi, true);
        self.set_irq(gsi, false);
        d
    }

    /// The LAPIC's EOI of a level-triggered `vector`: clears remote IRR of
    /// the pins with that vector; returns a redelivery for the first such
    /// pin whose line is still asserted.
    pub fn eoi(&mut self, vector: u8) -> Option<Delivery> {
        let mut again = None;
        for pin in 0..PINS {
            let Some(e) = self.redir.get_mut(pin) else {
                continue;
            };
            if *e & RTE_REMOTE_IRR != 0 && *e as u8 == vector {
                *e &= !RTE_REMOTE_IRR;
                if again.is_none() {
                    again = self.service(pin);
                }
            }
        }
        again
    }

    /// Xen's IOAPIC record.
    pub fn save(&self) -> HvmHwVioapic {
        let mut redirtbl = [RTE_MASKED; VIOAPIC_NUM_PINS];
        for (d, s) in redirtbl.iter_mut().zip(self.redir.iter()) {
            *d = *s;
        }
        HvmHwVioapic {
            base_address: IOAPIC_BASE,
            ioregsel: u32::from(self.ioregsel),
            id: u32::from(self.id),
            redirtbl,
        }
    }

    /// Rebuild from Xen's IOAPIC record (line levels all deasserted).
    pub fn restore(rec: &HvmHwVioapic) -> Result<Self, RecordError> {
        if rec.base_address != IOAPIC_BASE {
            return Err(RecordError::new("base_address", rec.base_address));
        }
        let ioregsel = u8::try_from(rec.ioregsel)
            .map_err(|_| RecordError::new("ioregsel", u64::from(rec.ioregsel)))?;
        if rec.id > 0xF {
            return Err(RecordError::new("id", u64::from(rec.id)));
        }
        let mut io = Ioapic::new(rec.id as u8);
        io.ioregsel = ioregsel;
        for (pin, e) in rec.redirtbl.iter().enumerate() {
            if let Some(slot) = io.redir.get_mut(pin) {
                let bad_irr = *e & RTE_REMOTE_IRR != 0 && *e & RTE_LEVEL == 0;
                if *e & !(RTE_WRITABLE | RTE_REMOTE_IRR) != 0 || bad_irr {
                    return Err(RecordError::new("redirtbl", *e));
                }
                *slot = *e;
            } else if *e & RTE_MASKED == 0 {
                return Err(RecordError::new("redirtbl", *e));
            }
        }
        Ok(io)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn set(io: &mut Ioapic, pin: u8, lo: u32, hi: u32) -> Option<Delivery> {
        io.write(IOREGSEL, 4, u32::from(0x10 + 2 * pin)).unwrap();
        let a = io.write(IOWIN, 4, lo).unwrap();
        io.write(IOREGSEL, 4, u32::from(0x11 + 2 * pin)).unwrap();
        a.or(io.write(IOWIN, 4, hi).unwrap())
    }

    fn reg(io: &mut Ioapic, r: u32) -> u32 {
        io.write(IOREGSEL, 4, r).unwrap();
        io.read(IOWIN, 4).unwrap()
    }

    #[test]
    fn registers_read_as_hardware() {
        let mut io = Ioapic::new(0);
        assert_eq!(reg(&mut io, 1), 0x0017_0011);
        assert_eq!(reg(&mut io, 0), 0);
        assert_eq!(reg(&mut io, 0x10), 0x1_0000);
        assert_eq!(reg(&mut io, 0x3F), 0);
        io.write(IOREGSEL, 4, 0).unwrap();
        io.write(IOWIN, 4, 0xFFFF_FFFF).unwrap();
        assert_eq!(reg(&mut io, 0), 0x0F00_0000);
        assert_eq!(reg(&mut io, 2), 0x0F00_0000);
        // IOREGSEL keeps 8 bits.
        io.write(IOREGSEL, 4, 0x1234).unwrap();
        assert_eq!(io.read(IOREGSEL, 4), Ok(0x34));
    }

    #[test]
    fn refusals() {
        let mut io = Ioapic::new(0);
        assert_eq!(io.read(0x04, 4), Err(Refused::Unknown { reg: 4 }));
        assert_eq!(io.read(IOWIN, 2), Err(Refused::Unknown { reg: 0x10 }));
        assert_eq!(io.write(0x40, 4, 0), Err(Refused::Unknown { reg: 0x40 }));
        io.write(IOREGSEL, 4, 1).unwrap();
        assert_eq!(io.write(IOWIN, 4, 0), Err(Refused::ReadOnly { reg: 1 }));
        io.write(IOREGSEL, 4, 0x40).unwrap();
        assert_eq!(io.read(IOWIN, 4), Err(Refused::Unknown { reg: 0x40 }));
        assert_eq!(io.write(IOWIN, 4, 0), Err(Refused::Unknown { reg: 0x40 }));
        assert_eq!(io.set_irq(24, true), None);
        assert_eq!(io.set_irq(u32::MAX, true), None);
    }

    #[test]
    fn entry_masks_read_only_and_reserved_bits() {
        let mut io = Ioapic::new(0);
        set(&mut io, 4, 0xFFFF_FFFF, 0xFFFF_FFFF);
        assert_eq!(io.entry(4), Some(0xFF00_0000_0001_AFFF));
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_when_unmasked() {
        let mut io = Ioapic::new(0);
        assert_eq!(io.pulse_irq(4), None); // masked after reset
        set(&mut io, 4, 0x24, 0x0300_0000);
        let d = Delivery {
            vector: 0x24,
            kind: DeliveryKind::Fixed,
            dest: 3,
            logical: false,
            level: false,
        };
        assert_eq!(io.set_irq(4, true), Some(d));
        assert_eq!(io.set_irq(4, true), None); // no new edge
        io.set_irq(4, false);
        assert_eq!(io.pulse_irq(4), Some(d));
        // Logical, lowest priority.
        set(&mut io, 5, 0x931, 0x0100_0000);
        assert_eq!(
            io.pulse_irq(5),
            Some(Delivery {
                vector: 0x31,
                kind: DeliveryKind::LowestPriority,
                dest: 1,
                logical: true,
                level: false
            })
        );
        // NMI; ExtINT dropped.
        set(&mut io, 6, 0x400, 0);
        assert_eq!(io.pulse_irq(6).map(|d| d.kind), Some(DeliveryKind::Nmi));
        set(&mut io, 7, 0x700, 0);
        assert_eq!(io.pulse_irq(7), None);
    }

    #[test]
    fn level_pin_holds_remote_irr_until_eoi() {
        let mut io = Ioapic::new(0);
        // Level, masked; line asserted while masked.
        set(&mut io, 9, 0x1_8041, 0);
        assert_eq!(io.set_irq(9, true), None);
        // Unmasking delivers the pending level.
        let d = set(&mut io, 9, 0x8041, 0).unwrap();
        assert_eq!((d.vector, d.level), (0x41, true));
        assert_eq!(reg(&mut io, 0x22), 0xC041);
        // Remote IRR is read-only.
        set(&mut io, 9, 0x8041, 0);
        assert_eq!(io.entry(9), Some(0xC041));
        assert_eq!(io.set_irq(9, true), None);
        // EOI with the line still up: delivered again.
        assert_eq!(io.eoi(0x41), Some(d));
        io.set_irq(9, false);
        assert_eq!(io.eoi(0x41), None);
        assert_eq!(io.entry(9), Some(0x8041));
        assert_eq!(io.eoi(0x41), None);
        // Switching to edge drops remote IRR.
        io.set_irq(9, true);
        assert_eq!(io.entry(9), Some(0xC041));
        set(&mut io, 9, 0x41, 0);
        assert_eq!(io.entry(9), Some(0x41));
    }

    #[test]
    fn save_restore_round_trips() {
        let mut io = Ioapic::new(2);
        set(&mut io, 4, 0x24, 0x0100_0000);
        set(&mut io, 9, 0xA041, 0);
        io.set_irq(9, true);
        io.set_irq(9, false);
        io.write(IOREGSEL, 4, 0x13).unwrap();
        let rec = io.save();
        assert_eq!(rec.base_address, 0xFEC0_0000);
        assert_eq!(rec.id, 2);
        assert_eq!(rec.ioregsel, 0x13);
        assert_eq!(rec.redirtbl[4], 0x0100_0000_0000_0024);
        assert_eq!(rec.redirtbl[9], 0xE041);
        assert_eq!(rec.redirtbl[0], 0x1_0000);
        assert_eq!(rec.redirtbl[47], 0x1_0000);
        assert_eq!(Ioapic::restore(&rec).unwrap(), io);
    }

    #[test]
    fn restore_refuses_bad_records() {
        let rec = Ioapic::new(0).save();
        let bad = |r: HvmHwVioapic| Ioapic::restore(&r).unwrap_err().field;
        assert_eq!(
            bad(HvmHwVioapic {
                base_address: 0xFEC0_1000,
                ..rec
            }),
            "base_address"
        );
        assert_eq!(bad(HvmHwVioapic { id: 16, ..rec }), "id");
        assert_eq!(
            bad(HvmHwVioapic {
                ioregsel: 0x100,
                ..rec
            }),
            "ioregsel"
        );
        for (pin, e) in [(0, 1u64 << 17), (1, 0x4041), (2, 1 << 48), (30, 0x41)] {
            let mut r = rec;
            r.redirtbl[pin] = e;
            assert_eq!(bad(r), "redirtbl", "{pin} {e:#x}");
        }
    }
}
