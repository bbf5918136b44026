//! CMOS RTC (MC146818) on ports 0x70 (index) and 0x71 (data).
//!
//! # What is modelled
//! The time registers (seconds, minutes, hours, day of week, day, month,
//! year; years 2000-2099) computed from a wall clock ([`Clock`]: Unix
//! seconds at a TSC value plus the TSC rate) and the guest's offset from
//! it, in BCD or binary (register B bit 2) and 12- or 24-hour form (bit 1,
//! PM in hour bit 7); the three alarm bytes (stored); register A (divider
//! and rate stored, UIP set in the last 244 µs of each second while
//! updates run); register B (SET halts updates and holds written time
//! until cleared, when it becomes the new offset); register D (VRT, valid
//! time). Writes of time registers without SET move the offset at once.
//!
//! # What is refused or masked
//! CMOS bytes 0x0E-0x7F and reads of port 0x70 are [`Refused`] (the caller
//! returns 0xFF and drops writes). The index keeps 7 bits (bit 7, NMI
//! disable, is dropped). A, C and D's read-only bits are masked. Interrupts
//! are not modelled: PIE/AIE/UIE are stored, register C reads 0 and the
//! RTC raises no IRQ 8 (Linux reads the time by polling). A written time
//! that is not a valid date is ignored.
//!
//! # Save record
//! Xen's RTC record: the 14 CMOS bytes at save time, the index and
//! `rtc_offset` (seconds from the wall clock). Restore takes the offset,
//! not the saved time bytes, so the time keeps running across the gap,
//! except while SET holds the time, when the held bytes are restored.
use doppel_abi::hvm::{HvmHwRtc, RTC_CMOS_SIZE};

use super::{RecordError, Refused};

pub const PORT_INDEX: u16 = 0x70;
pub const PORT_DATA: u16 = 0x71;

pub const REG_A: u8 = 0x0A;
pub const REG_B: u8 = 0x0B;
pub const REG_C: u8 = 0x0C;
pub const REG_D: u8 = 0x0D;
pub const A_UIP: u8 = 0x80;
pub const B_SET: u8 = 0x80;
pub const B_BINARY: u8 = 0x04;
pub const B_24H: u8 = 0x02;
pub const D_VRT: u8 = 0x80;

/// The host's view of time: `secs` Unix seconds at TSC `tsc`, TSC at `khz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub secs: i64,
    pub tsc: u64,
    pub khz: u32,
}

impl Clock {
    fn hz(&self) -> u64 {
        u64::from(self.khz.max(1)) * 1000
    }
    /// Whole seconds and the TSC cycles into the current second at `tsc`.
    fn at(&self, tsc: u64) -> (i64, u64) {
        let d = tsc.saturating_sub(self.tsc);
        let whole = i64::try_from(d / self.hz()).unwrap_or(i64::MAX);
        (self.secs.saturating_add(whole), d % self.hz())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rtc {
    clock: Clock,
    /// Guest time minus wall time, seconds.
    offset: i64,
    index: u8,
    a: u8,
    b: u8,
    /// Alarm seconds, minutes, hours (register form).
    alarm: [u8; 3],
    /// Time registers 0-9 as held while SET is set (zero otherwise).
    held: [u8; 10],
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of days since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

impl Rtc {
    /// After reset: A = 0x26 (32.768 kHz, 1024 Hz), B = 24-hour BCD, time
    /// = the wall clock.
    pub fn new(clock: Clock) -> Self {
        Rtc {
            clock,
            offset: 0,
            index: 0,
            a: 0x26,
            b: B_24H,
            alarm: [0; 3],
            held: [0; 10],
        }
    }

    fn enc(&self, v: u32) -> u8 {
        let v = v % 100;
        if self.b & B_BINARY != 0 {
            v as u8
        } else {
            (((v / 10) << 4) | (v % 10)) as u8
        }
    }

    fn dec(&self, v: u8) -> Option<u32> {
        if self.b & B_BINARY != 0 {
            return Some(u32::from(v));
        }
        let (hi, lo) = (u32::from(v >> 4), u32::from(v & 0xF));
        (hi < 10 && lo < 10).then_some(hi * 10 + lo)
    }

    /// Time registers 0-9 for Unix time `t`.
    fn regs_of(&self, t: i64) -> [u8; 10] {
        let days = t.div_euclid(86_400);
        let s = t.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        // 1970-01-01 was a Thursday; register 6 counts Sunday = 1.
        let wday = (days + 4).rem_euclid(7) as u32 + 1;
        let (h, mi, se) = (s / 3600, s / 60 % 60, s % 60);
        let hour = if self.b & B_24H != 0 {
            self.enc(h)
        } else {
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            self.enc(h12) | if h >= 12 { 0x80 } else { 0 }
        };
        let [a0, a1, a2] = self.alarm;
        [
            self.enc(se),
            a0,
            self.enc(mi),
            a1,
            hour,
            a2,
            self.enc(wday),
            self.enc(d),
            self.enc(m),
            self.enc(y.rem_euclid(100) as u32),
        ]
    }

    /// Unix time of a real CMOS clock's time registers 0-9, read with its
    /// register B = `b` (the host's clock, read once at boot).
    pub fn unix_of_cmos(regs: &[u8; 10], b: u8) -> Option<i64> {
        let mut r = Rtc::new(Clock {
            secs: 0,
            tsc: 0,
            khz: 1,
        });
        r.b = b;
        r.time_of(regs)
    }

    /// Unix time of time registers, if they hold a valid date.
    fn time_of(&self, r: &[u8; 10]) -> Option<i64> {
        let se = self.dec(r[0])?;
        let mi = self.dec(r[2])?;
        let hour = if self.b & B_24H != 0 {
            self.dec(r[4])?
        } else {
            let h = self.dec(r[4] & 0x7F)?;
            if !(1..=12).contains(&h) {
                return None;
            }
            h % 12 + if r[4] & 0x80 != 0 { 12 } else { 0 }
        };
        let d = self.dec(r[7])?;
        let m = self.dec(r[8])?;
        let y = 2000 + i64::from(self.dec(r[9])?);
        if se > 59 || mi > 59 || hour > 23 || !(1..=12).contains(&m) {
            return None;
        }
        if d < 1 || d > days_in_month(y, m) {
            return None;
        }
        let secs = i64::from(hour * 3600 + mi * 60 + se);
        Some(days_from_civil(y, m, d) * 86_400 + secs)
    }

    /// The guest's RTC time (Unix seconds) at `tsc`, updates running.
    pub fn time(&self, tsc: u64) -> i64 {
        self.clock.at(tsc).0.saturating_add(self.offset)
    }

    fn uip(&self, tsc: u64) -> bool {
        if self.b & B_SET != 0 {
            return false;
        }
        let hz = self.clock.hz();
        // 244 us before the second ends.
        self.clock.at(tsc).1 >= hz - hz * 244 / 1_000_000
    }

    fn current(&self, tsc: u64) -> [u8; 10] {
        if self.b & B_SET != 0 {
            self.held
        } else {
            self.regs_of(self.time(tsc))
        }
    }

    /// Read a port at TSC `tsc`.
    pub fn read(&mut self, port: u16, tsc: u64) -> Result<u8, Refused> {
        match port {
            PORT_INDEX => Err(Refused::WriteOnly { reg: 0x70 }),
            PORT_DATA => self.read_reg(self.index, tsc),
            _ => Err(Refused::Unknown {
                reg: u32::from(port),
            }),
        }
    }

    fn read_reg(&self, r: u8, tsc: u64) -> Result<u8, Refused> {
        let regs = self.current(tsc);
        match r {
            0..=9 => Ok(regs.get(usize::from(r)).copied().unwrap_or(0)),
            REG_A => Ok(self.a | if self.uip(tsc) { A_UIP } else { 0 }),
            REG_B => Ok(self.b),
            REG_C => Ok(0),
            REG_D => Ok(D_VRT),
            _ => Err(Refused::Unknown { reg: u32::from(r) }),
        }
    }

    /// Write a port at TSC `tsc`.
    pub fn write(&mut self, port: u16, value: u8, tsc: u64) -> Result<(), Refused> {
        match port {
            PORT_INDEX => {
                self.index = value & 0x7F;
                Ok(())
            }
            PORT_DATA => self.write_reg(self.index, value, tsc),
            _ => Err(Refused::Unknown {
                reg: u32::from(port),
            }),
        }
    }

    fn write_reg(&mut self, r: u8, value: u8, tsc: u64) -> Result<(), Refused> {
        match r {
            1 | 3 | 5 => {
                if let Some(a) = self.alarm.get_mut(usize::from(r / 2)) {
                    *a = value;
                }
                if self.b & B_SET != 0 {
                    if let Some(h) = self.held.get_mut(usize::from(r)) {
                        *h = value;
                    }
                }
            }
            0 | 2 | 4 | 6..=9 => {
                let mut regs = self.current(tsc);
                if let Some(x) = regs.get_mut(usize::from(r)) {
                    *x = value;
                }
                if self.b & B_SET != 0 {
                    self.held = regs;
                } else if let Some(t) = self.time_of(&regs) {
                    self.offset = t.saturating_sub(self.clock.at(tsc).0);
                }
            }
            REG_A => self.a = value & 0x7F,
            REG_B => {
                let was_set = self.b & B_SET != 0;
                if !was_set && value & B_SET != 0 {
                    // Halt updates: hold the time now, in the old format.
                    self.held = self.regs_of(self.time(tsc));
                }
                if was_set && value & B_SET == 0 {
                    // Resume from the held time (in the format being left).
                    if let Some(t) = self.time_of(&self.held) {
                        self.offset = t.saturating_sub(self.clock.at(tsc).0);
                    }
                    self.held = [0; 10];
                }
                self.b = value;
            }
            REG_C | REG_D => return Err(Refused::ReadOnly { reg: u32::from(r) }),
            _ => return Err(Refused::Unknown { reg: u32::from(r) }),
        }
        Ok(())
    }

    /// Xen's RTC record at `tsc`.
    pub fn save(&self, tsc: u64) -> HvmHwRtc {
        let mut cmos_data = [0u8; RTC_CMOS_SIZE];
        for (i, d) in cmos_data.iter_mut().enumerate() {
            let r = i as u8;
            *d = match r {
                REG_A => self.a,
                _ => self.read_reg(r, tsc).unwrap_or(0),
            };
        }
        HvmHwRtc {
            cmos_data,
            cmos_index: self.index,
            pad0: 0,
            rtc_offset: self.offset,
        }
    }

    /// The wall time (Unix seconds) a saved RTC stood for: the time its
    /// registers held less the guest's offset from wall time. A standby
    /// goes on with the primary's wall clock from there. `None` when the
    /// registers hold no valid date.
    pub fn wall_of_record(rec: &HvmHwRtc) -> Option<i64> {
        let mut regs = [0u8; 10];
        regs.copy_from_slice(rec.cmos_data.get(..10)?);
        let b = *rec.cmos_data.get(usize::from(REG_B))?;
        Rtc::unix_of_cmos(&regs, b).map(|t| t.saturating_sub(rec.rtc_offset))
    }

    /// Rebuild from Xen's RTC record with this host's `clock`.
    pub fn restore(rec: &HvmHwRtc, clock: Clock) -> Result<Self, RecordError> {
        let byte = |i: u8| rec.cmos_data.get(usize::from(i)).copied().unwrap_or(0);
        let err = |f: &'static str, v: u8| RecordError::new(f, u64::from(v));
        if rec.cmos_index > 0x7F {
            return Err(err("cmos_index", rec.cmos_index));
        }
        if rec.pad0 != 0 {
            return Err(err("pad0", rec.pad0));
        }
        if byte(REG_A) & A_UIP != 0 {
            return Err(err("register A", byte(REG_A)));
        }
        if byte(REG_C) != 0 {
            return Err(err("register C", byte(REG_C)));
        }
        if byte(REG_D) != D_VRT {
            return Err(err("register D", byte(REG_D)));
        }
        let mut rtc = Rtc::new(clock);
        rtc.index = rec.cmos_index;
        rtc.offset = rec.rtc_offset;
        rtc.a = byte(REG_A);
        rtc.b = byte(REG_B);
        rtc.alarm = [byte(1), byte(3), byte(5)];
        if rtc.b & B_SET != 0 {
            for (i, h) in rtc.held.iter_mut().enumerate() {
                *h = byte(i as u8);
            }
        }
        Ok(rtc)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_rtc_gives_back_the_wall_time_it_stood_for() {
        let clock = Clock {
            secs: 1_796_600_000,
            tsc: 0,
            khz: 1000,
        };
        let mut rtc = Rtc::new(clock);
        rtc.offset = 7;
        // 42.5 s of guest time later.
        let rec = rtc.save(42_500_000);
        assert_eq!(Rtc::wall_of_record(&rec), Some(1_796_600_042));
        let mut bad = rec;
        bad.cmos_data[8] = 0x13; // month 13
        assert_eq!(Rtc::wall_of_record(&bad), None);
    }

    /// 2026-12-07 03:24:05 UTC, a Monday, at TSC 1000, 1 GHz.
    const T0: i64 = 1_796_613_845;
    const CLOCK: Clock = Clock {
        secs: T0,
        tsc: 1000,
        khz: 1_000_000,
    };
    const SEC: u64 = 1_000_000_000;

    fn get(rtc: &mut Rtc, r: u8, tsc: u64) -> u8 {
        rtc.write(PORT_INDEX, r, tsc).unwrap();
        rtc.read(PORT_DATA, tsc).unwrap()
    }

    fn put(rtc: &mut Rtc, r: u8, v: u8, tsc: u64) {
        rtc.write(PORT_INDEX, r, tsc).unwrap();
        rtc.write(PORT_DATA, v, tsc).unwrap();
    }

    fn time(rtc: &mut Rtc, tsc: u64) -> [u8; 10] {
        core::array::from_fn(|i| get(rtc, i as u8, tsc))
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(T0.div_euclid(86_400), days_from_civil(2026, 12, 7));
        for d in (-800_000..800_000).step_by(997) {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn bcd_24h_time_and_status() {
        let mut rtc = Rtc::new(CLOCK);
        assert_eq!(
            time(&mut rtc, 1000),
            [0x05, 0, 0x24, 0, 0x03, 0, 0x02, 0x07, 0x12, 0x26]
        );
        assert_eq!(get(&mut rtc, REG_A, 1000), 0x26);
        assert_eq!(get(&mut rtc, REG_B, 1000), 0x02);
        assert_eq!(get(&mut rtc, REG_C, 1000), 0);
        assert_eq!(get(&mut rtc, REG_D, 1000), 0x80);
        // TSC progress: 56 s later the minute rolls over.
        assert_eq!(get(&mut rtc, 0, 1000 + 55 * SEC), 0x00);
        assert_eq!(get(&mut rtc, 2, 1000 + 55 * SEC), 0x25);
        // UIP in the last 244 us of a second only.
        assert_eq!(get(&mut rtc, REG_A, 1000 + SEC - 244_001), 0x26);
        assert_eq!(get(&mut rtc, REG_A, 1000 + SEC - 244_000), 0xA6);
        assert_eq!(get(&mut rtc, REG_A, 1000 + SEC), 0x26);
    }

    #[test]
    fn binary_and_12_hour_forms() {
        let mut rtc = Rtc::new(Clock {
            secs: T0 + 12 * 3600,
            ..CLOCK
        });
        put(&mut rtc, REG_B, B_BINARY, 1000);
        // 15:24:05 -> 3 PM.
        assert_eq!(time(&mut rtc, 1000), [5, 0, 24, 0, 0x83, 0, 2, 7, 12, 26]);
        put(&mut rtc, REG_B, 0, 1000);
        assert_eq!(get(&mut rtc, 4, 1000), 0x83);
        let mut am = Rtc::new(Clock {
            secs: T0 - 3 * 3600,
            ..CLOCK
        });
        put(&mut am, REG_B, 0, 1000);
        assert_eq!(get(&mut am, 4, 1000), 0x12); // 00:24 is 12 AM
    }

    #[test]
    fn set_holds_and_resumes_from_written_time() {
        let mut rtc = Rtc::new(CLOCK);
        put(&mut rtc, REG_B, B_SET | B_24H, 1000);
        assert_eq!(get(&mut rtc, REG_A, 1000 + SEC - 1), 0x26); // no UIP
                                                                // 2030-01-31 23:59:58, BCD.
        for (r, v) in [
            (0, 0x58),
            (2, 0x59),
            (4, 0x23),
            (7, 0x31),
            (8, 0x01),
            (9, 0x30),
        ] {
            put(&mut rtc, r, v, 1000);
        }
        // Held: time does not move.
        assert_eq!(get(&mut rtc, 0, 1000 + 5 * SEC), 0x58);
        put(&mut rtc, REG_B, B_24H, 1000 + 5 * SEC);
        assert_eq!(get(&mut rtc, 0, 1000 + 7 * SEC), 0x00);
        assert_eq!(get(&mut rtc, 8, 1000 + 7 * SEC), 0x02);
        assert_eq!(get(&mut rtc, 7, 1000 + 7 * SEC), 0x01);
        assert_eq!(
            rtc.time(1000 + 5 * SEC),
            days_from_civil(2030, 1, 31) * 86_400 + 86_398
        );
        // A direct write moves the offset; an invalid one is ignored.
        put(&mut rtc, 9, 0x29, 1000 + 7 * SEC);
        assert_eq!(get(&mut rtc, 9, 1000 + 7 * SEC), 0x29);
        let before = rtc.time(0);
        put(&mut rtc, 8, 0x13, 1000 + 7 * SEC);
        put(&mut rtc, 0, 0x6A, 1000 + 7 * SEC);
        assert_eq!(rtc.time(0), before);
    }

    #[test]
    fn refusals_and_masks() {
        let mut rtc = Rtc::new(CLOCK);
        assert_eq!(
            rtc.read(PORT_INDEX, 0),
            Err(Refused::WriteOnly { reg: 0x70 })
        );
        assert_eq!(rtc.read(0x72, 0), Err(Refused::Unknown { reg: 0x72 }));
        rtc.write(PORT_INDEX, 0x8E, 0).unwrap(); // NMI-disable bit dropped
        assert_eq!(rtc.read(PORT_DATA, 0), Err(Refused::Unknown { reg: 0x0E }));
        assert_eq!(
            rtc.write(PORT_DATA, 1, 0),
            Err(Refused::Unknown { reg: 0x0E })
        );
        rtc.write(PORT_INDEX, REG_C, 0).unwrap();
        assert_eq!(
            rtc.write(PORT_DATA, 0xFF, 0),
            Err(Refused::ReadOnly { reg: 0x0C })
        );
        put(&mut rtc, REG_A, 0xFF, 1000);
        assert_eq!(get(&mut rtc, REG_A, 1000), 0x7F);
        rtc.write(PORT_INDEX, REG_D, 0).unwrap();
        assert_eq!(
            rtc.write(PORT_DATA, 0, 0),
            Err(Refused::ReadOnly { reg: 0x0D })
        );
        assert_eq!(get(&mut rtc, REG_D, 0), 0x80);
    }

    #[test]
    fn save_restore_round_trips() {
        let mut rtc = Rtc::new(CLOCK);
        put(&mut rtc, 1, 0x30, 1000);
        put(&mut rtc, 9, 0x27, 1000);
        put(&mut rtc, REG_B, B_24H | 0x20, 1000);
        rtc.write(PORT_INDEX, REG_B, 1000).unwrap();
        let rec = rtc.save(1000 + 3 * SEC);
        assert_eq!(
            rec.cmos_data,
            [0x08, 0x30, 0x24, 0, 0x03, 0, 0x03, 0x07, 0x12, 0x27, 0x26, 0x22, 0, 0x80]
        );
        assert_eq!(rec.cmos_index, REG_B);
        assert_eq!(rec.rtc_offset, 31_536_000); // 2027-12-07 is 365 days on
        assert_eq!(Rtc::restore(&rec, CLOCK).unwrap(), rtc);
        // On another host clock the guest's time keeps its offset.
        let other = Clock {
            secs: T0 + 100,
            tsc: 0,
            khz: 2_000_000,
        };
        let back = Rtc::restore(&rec, other).unwrap();
        assert_eq!(back.time(0), rtc.time(1000) + 100);
        // Held time survives too.
        put(&mut rtc, REG_B, B_SET | B_24H, 1000);
        put(&mut rtc, 0, 0x42, 1000);
        let rec = rtc.save(1000 + 9 * SEC);
        assert_eq!(rec.cmos_data[0], 0x42);
        assert_eq!(Rtc::restore(&rec, CLOCK).unwrap(), rtc);
    }

    #[test]
    fn restore_refuses_bad_records() {
        let rec = Rtc::new(CLOCK).save(1000);
        let bad = |f: &dyn Fn(&mut HvmHwRtc)| {
            let mut r = rec;
            f(&mut r);
            Rtc::restore(&r, CLOCK).unwrap_err().field
        };
        assert_eq!(bad(&|r| r.cmos_index = 0x80), "cmos_index");
        assert_eq!(bad(&|r| r.pad0 = 1), "pad0");
        assert_eq!(bad(&|r| r.cmos_data[10] = 0xA6), "register A");
        assert_eq!(bad(&|r| r.cmos_data[12] = 0x10), "register C");
        assert_eq!(bad(&|r| r.cmos_data[13] = 0), "register D");
    }
}
