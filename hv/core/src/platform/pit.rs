//! i8254 PIT channel 2 (the speaker and calibration counter) on ports 0x42
//! (count), 0x43 (control word) and 0x61 (gate, speaker enable, OUT2).
//!
//! Linux calibrates the CPU clock against it at boot even when it is told
//! the TSC rate (`quick_pit_calibrate`, and `pit_calibrate_tsc` if that
//! fails): without it the polling loops run to their 50 000-iteration
//! limits on all-ones reads, two port exits each.
//!
//! # What is modelled
//! The counter runs at 1 193 182 Hz on the guest's TSC (its rate in kHz as
//! the RTC's [`super::rtc::Clock`] has it). Control words for channel 2:
//! access mode (LSB, MSB, LSB then MSB, with the 8254's read and write
//! flip-flops), operating modes 0-5 (6 and 7 are 2 and 3), binary or BCD
//! counting; the counter latch command; the read-back command (count
//! and/or status) when it selects channel 2. Mode 0 and 4 counters wrap
//! past zero and keep counting; modes 2 and 3 reload. The gate (port 0x61
//! bit 0) holds counting low in modes 0, 2, 3 and 4 (2 and 3 restart on
//! its rising edge, with OUT forced high while it is low) and triggers
//! modes 1 and 5. A count takes effect when written (the 8254 loads it on
//! the next clock edge: under a microsecond), in every mode; in mode 0 the
//! first byte of a two-byte count stops counting and drives OUT low, as the
//! 8254 does. Port 0x61 reads gate 2 (bit 0), speaker data enable (bit 1),
//! a refresh toggle every 18 PIT clocks (bit 4, ~15 us) and OUT2 (bit 5);
//! its other bits read 0.
//!
//! # What is refused or masked
//! Channels 0 and 1 are not there (the ACPI tables tell Linux there is no
//! PIT; channel 2 has no interrupt line in any case): their ports and
//! control words, and a read-back naming only them, are [`Refused`] (the
//! caller reads all ones and drops writes), as is a read of port 0x43.
//! Port 0x61 keeps bits 0 and 1 of a write. A BCD digit above 9 in a
//! written count counts as 9. No IRQ is raised.
//!
//! # Save record
//! Xen's PIT record (`struct hvm_hw_pit`), channel 2 in `channels[2]`;
//! channels 0 and 1 are all zero (and a record with anything in them is
//! refused: this platform could not present it). `count` is the reload
//! value (1-65536, 10000 in BCD; 0 when no count has been written since
//! the control word), and, as in Xen, counting restarts from it when the
//! record is loaded: the ticks already counted do not survive a restore
//! (nor does a held counter's progress; a mode 1 or 5 counter waits for
//! its next trigger). What survives: the mode, access mode, BCD flag, both
//! flip-flops and the half-written byte, a latched count and status, the
//! gate and the speaker enable.
use doppel_abi::hvm::{HvmHwPit, HvmHwPitChannel};

use super::{RecordError, Refused};

pub const PORT_CH0: u16 = 0x40;
pub const PORT_CH1: u16 = 0x41;
pub const PORT_CH2: u16 = 0x42;
pub const PORT_CONTROL: u16 = 0x43;
/// The PC's system control port B: gate 2, speaker, OUT2.
pub const PORT_SPEAKER: u16 = 0x61;

/// The 8254's input clock on a PC.
pub const PIT_HZ: u64 = 1_193_182;

pub const SPEAKER_GATE: u8 = 0x01;
pub const SPEAKER_DATA: u8 = 0x02;
pub const SPEAKER_REFRESH: u8 = 0x10;
pub const SPEAKER_OUT2: u8 = 0x20;

/// Byte states (Xen's `read_state`, `write_state`, `count_latched`).
const LSB: u8 = 1;
const MSB: u8 = 2;
const WORD0: u8 = 3;
const WORD1: u8 = 4;

/// PIT clocks per refresh toggle of port 0x61 bit 4.
const REFRESH_TICKS: u64 = 18;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No count written since the control word, or a mode 0 count half
    /// written: not counting.
    Idle,
    /// Mode 1 or 5 with a count: waiting for a gate rising edge.
    Armed,
    /// Counting since TSC `start`, `base` clocks counted before it.
    Running { start: u64, base: u64 },
    /// Gate low (modes 0, 2, 3, 4): `ticks` clocks counted, held.
    Held { ticks: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pit {
    /// The guest TSC's rate.
    khz: u32,
    mode: u8,
    bcd: bool,
    rw_mode: u8,
    read_state: u8,
    write_state: u8,
    write_latch: u8,
    latched_count: u16,
    count_latched: u8,
    status_latched: bool,
    status: u8,
    /// The count written (1..=modulus), 0 if none since the control word.
    reload: u32,
    phase: Phase,
    gate: bool,
    speaker: bool,
}

fn bcd_encode(v: u32) -> u16 {
    let d = |k: u32| (v / k % 10) as u16;
    (d(1000) << 12) | (d(100) << 8) | (d(10) << 4) | d(1)
}

fn bcd_decode(v: u16) -> u32 {
    let d = |s: u16| u32::from((v >> s & 0xF).min(9));
    d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
}

impl Pit {
    /// After reset: mode 0, LSB then MSB, binary, no count, gate low,
    /// speaker off. `khz` is the guest TSC's rate.
    pub fn new(khz: u32) -> Self {
        Pit {
            khz,
            mode: 0,
            bcd: false,
            rw_mode: WORD0,
            read_state: WORD0,
            write_state: WORD0,
            write_latch: 0,
            latched_count: 0,
            count_latched: 0,
            status_latched: false,
            status: 0,
            reload: 0,
            phase: Phase::Idle,
            gate: false,
            speaker: false,
        }
    }

    /// PIT clocks between TSC `from` and `to` (0 if `to` is earlier).
    fn ticks(&self, from: u64, to: u64) -> u64 {
        let d = u128::from(to.saturating_sub(from));
        let hz = u128::from(self.khz.max(1)) * 1000;
        u64::try_from(d * u128::from(PIT_HZ) / hz).unwrap_or(u64::MAX)
    }

    fn modulus(&self) -> u32 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// Clocks counted since the count was loaded (or triggered), if counting.
    fn elapsed(&self, tsc: u64) -> Option<u64> {
        match self.phase {
            Phase::Idle | Phase::Armed => None,
            Phase::Running { start, base } => Some(base.saturating_add(self.ticks(start, tsc))),
            Phase::Held { ticks } => Some(ticks),
        }
    }

    /// The counting element's value at `tsc`, 0..modulus.
    fn counter(&self, tsc: u64) -> u32 {
        let m = u64::from(self.modulus());
        let n = u64::from(self.reload.max(1));
        let Some(d) = self.elapsed(tsc) else {
            return (u64::from(self.reload) % m) as u32;
        };
        let v = match self.mode {
            2 => n - d % n,
            3 => {
                // Down by two: the high half lasts (n + 1) / 2 clocks, the
                // low half the rest.
                let p = d % n;
                let high = n.div_ceil(2);
                let q = if p < high { p } else { p - high };
                n.saturating_sub(2 * q).max(1)
            }
            // 0, 1, 4, 5: down by one, wrapping past zero.
            _ => (n + m - d % m) % m,
        };
        (v % m) as u32
    }

    /// The OUT pin at `tsc`.
    fn out(&self, tsc: u64) -> bool {
        match self.phase {
            Phase::Idle => return self.mode != 0,
            Phase::Armed => return true,
            Phase::Held { .. } if matches!(self.mode, 2 | 3) => return true,
            _ => {}
        }
        let n = u64::from(self.reload.max(1));
        let d = self.elapsed(tsc).unwrap_or(0);
        match self.mode {
            0 | 1 => d >= n,
            2 => d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    fn display(&self, v: u32) -> u16 {
        if self.bcd {
            bcd_encode(v)
        } else {
            v as u16
        }
    }

    fn latch_count(&mut self, tsc: u64) {
        if self.count_latched == 0 {
            self.latched_count = self.display(self.counter(tsc));
            self.count_latched = self.rw_mode;
        }
    }

    fn latch_status(&mut self, tsc: u64) {
        if !self.status_latched {
            let null_count = self.phase == Phase::Idle;
            self.status = (u8::from(self.out(tsc)) << 7)
                | (u8::from(null_count) << 6)
                | (self.rw_mode << 4)
                | (self.mode << 1)
                | u8::from(self.bcd);
            self.status_latched = true;
        }
    }

    /// A count written (the 16-bit value as the guest wrote it).
    fn load(&mut self, raw: u16, tsc: u64) {
        let v = if self.bcd {
            bcd_decode(raw)
        } else {
            u32::from(raw)
        };
        self.reload = if v == 0 { self.modulus() } else { v };
        self.phase = match self.mode {
            1 | 5 => Phase::Armed,
            _ if !self.gate => Phase::Held { ticks: 0 },
            _ => Phase::Running {
                start: tsc,
                base: 0,
            },
        };
    }

    fn set_gate(&mut self, gate: bool, tsc: u64) {
        let was = self.gate;
        self.gate = gate;
        if gate == was || self.reload == 0 {
            return;
        }
        let restart = Phase::Running {
            start: tsc,
            base: 0,
        };
        self.phase = match (gate, self.mode, self.phase) {
            // Rising edge: trigger (1, 5), reload (2, 3), resume (0, 4).
            (true, 1 | 5, Phase::Armed | Phase::Running { .. }) => restart,
            (true, 2 | 3, Phase::Held { .. }) => restart,
            (true, _, Phase::Held { ticks }) => Phase::Running {
                start: tsc,
                base: ticks,
            },
            // Falling edge: hold (0, 2, 3, 4).
            (false, 0 | 2 | 3 | 4, Phase::Running { .. }) => Phase::Held {
                ticks: self.elapsed(tsc).unwrap_or(0),
            },
            (_, _, p) => p,
        };
    }

    fn control(&mut self, value: u8, tsc: u64) -> Result<(), Refused> {
        let refused = Err(Refused::Unknown {
            reg: u32::from(PORT_CH0) + u32::from(value >> 6),
        });
        match value >> 6 {
            2 => {}
            3 => {
                // Read-back: bits 3..1 select channels 2..0; bit 5 clear
                // latches the count, bit 4 clear the status.
                if value & 0x08 == 0 {
                    return Err(Refused::Unknown {
                        reg: u32::from(PORT_CONTROL),
                    });
                }
                if value & 0x20 == 0 {
                    self.latch_count(tsc);
                }
                if value & 0x10 == 0 {
                    self.latch_status(tsc);
                }
                return Ok(());
            }
            _ => return refused,
        }
        let access = (value >> 4) & 3;
        if access == 0 {
            self.latch_count(tsc);
            return Ok(());
        }
        let mode = (value >> 1) & 7;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.bcd = value & 1 != 0;
        self.rw_mode = access;
        self.read_state = access;
        self.write_state = access;
        self.count_latched = 0;
        self.status_latched = false;
        self.reload = 0;
        self.phase = Phase::Idle;
        Ok(())
    }

    /// Read a port at guest TSC `tsc`.
    pub fn read(&mut self, port: u16, tsc: u64) -> Result<u8, Refused> {
        match port {
            PORT_CH2 => Ok(self.read_count(tsc)),
            PORT_CONTROL => Err(Refused::WriteOnly {
                reg: u32::from(port),
            }),
            PORT_SPEAKER => {
                let refresh = self.ticks(0, tsc) / REFRESH_TICKS % 2 == 1;
                Ok(u8::from(self.gate)
                    | if self.speaker { SPEAKER_DATA } else { 0 }
                    | if refresh { SPEAKER_REFRESH } else { 0 }
                    | if self.out(tsc) { SPEAKER_OUT2 } else { 0 })
            }
            _ => Err(Refused::Unknown {
                reg: u32::from(port),
            }),
        }
    }

    fn read_count(&mut self, tsc: u64) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        let [lo, hi] = self.latched_count.to_le_bytes();
        match self.count_latched {
            0 => {}
            WORD0 => {
                self.count_latched = MSB;
                return lo;
            }
            MSB => {
                self.count_latched = 0;
                return hi;
            }
            _ => {
                self.count_latched = 0;
                return lo;
            }
        }
        let [lo, hi] = self.display(self.counter(tsc)).to_le_bytes();
        match self.read_state {
            LSB => lo,
            MSB => hi,
            WORD0 => {
                self.read_state = WORD1;
                lo
            }
            _ => {
                self.read_state = WORD0;
                hi
            }
        }
    }

    /// Write a port at guest TSC `tsc`.
    pub fn write(&mut self, port: u16, value: u8, tsc: u64) -> Result<(), Refused> {
        match port {
            PORT_CH2 => {
                match self.write_state {
                    LSB => self.load(u16::from(value), tsc),
                    MSB => self.load(u16::from(value) << 8, tsc),
                    WORD0 => {
                        self.write_latch = value;
                        self.write_state = WORD1;
                        if self.mode == 0 {
                            self.phase = Phase::Idle;
                        }
                    }
                    _ => {
                        self.write_state = WORD0;
                        self.load(u16::from_le_bytes([self.write_latch, value]), tsc);
                    }
                }
                Ok(())
            }
            PORT_CONTROL => self.control(value, tsc),
            PORT_SPEAKER => {
                self.set_gate(value & SPEAKER_GATE != 0, tsc);
                self.speaker = value & SPEAKER_DATA != 0;
                Ok(())
            }
            _ => Err(Refused::Unknown {
                reg: u32::from(port),
            }),
        }
    }

    /// Xen's PIT record (nothing in it depends on the time).
    pub fn save(&self) -> HvmHwPit {
        let mut rec = HvmHwPit {
            speaker_data_on: u32::from(self.speaker),
            ..HvmHwPit::default()
        };
        if let Some(c) = rec.channels.get_mut(2) {
            *c = HvmHwPitChannel {
                count: self.reload,
                latched_count: self.latched_count,
                count_latched: self.count_latched,
                status_latched: u8::from(self.status_latched),
                status: self.status,
                read_state: self.read_state,
                write_state: self.write_state,
                write_latch: self.write_latch,
                rw_mode: self.rw_mode,
                mode: self.mode,
                bcd: u8::from(self.bcd),
                gate: u8::from(self.gate),
            };
        }
        rec
    }

    /// Rebuild from Xen's PIT record at guest TSC `tsc`, the TSC running at
    /// `khz`: counting restarts from the reload value (module docs).
    pub fn restore(rec: &HvmHwPit, khz: u32, tsc: u64) -> Result<Self, RecordError> {
        let err = |f: &'static str, v: u64| Err(RecordError::new(f, v));
        if rec.pad0 != 0 {
            return err("pad0", u64::from(rec.pad0));
        }
        if rec.speaker_data_on > 1 {
            return err("speaker_data_on", u64::from(rec.speaker_data_on));
        }
        let [c0, c1, c] = rec.channels;
        if c0 != HvmHwPitChannel::default() {
            return err("channels[0]", u64::from(c0.mode));
        }
        if c1 != HvmHwPitChannel::default() {
            return err("channels[1]", u64::from(c1.mode));
        }
        let byte_state_ok = |s: u8| match c.rw_mode {
            WORD0 => s == WORD0 || s == WORD1,
            m => s == m,
        };
        let checks: [(&'static str, u8, bool); 8] = [
            ("mode", c.mode, c.mode <= 5),
            ("bcd", c.bcd, c.bcd <= 1),
            ("gate", c.gate, c.gate <= 1),
            ("rw_mode", c.rw_mode, (LSB..=WORD0).contains(&c.rw_mode)),
            ("read_state", c.read_state, byte_state_ok(c.read_state)),
            ("write_state", c.write_state, byte_state_ok(c.write_state)),
            ("count_latched", c.count_latched, c.count_latched <= WORD0),
            ("status_latched", c.status_latched, c.status_latched <= 1),
        ];
        for (field, v, ok) in checks {
            if !ok {
                return err(field, u64::from(v));
            }
        }
        let mut pit = Pit::new(khz);
        pit.mode = c.mode;
        pit.bcd = c.bcd != 0;
        if c.count > pit.modulus() {
            return err("count", u64::from(c.count));
        }
        pit.rw_mode = c.rw_mode;
        pit.read_state = c.read_state;
        pit.write_state = c.write_state;
        pit.write_latch = c.write_latch;
        pit.latched_count = c.latched_count;
        pit.count_latched = c.count_latched;
        pit.status_latched = c.status_latched != 0;
        pit.status = c.status;
        pit.gate = c.gate != 0;
        pit.speaker = rec.speaker_data_on != 0;
        pit.reload = c.count;
        pit.phase = if c.count == 0 || (c.mode == 0 && c.write_state == WORD1) {
            Phase::Idle
        } else {
            match c.mode {
                1 | 5 => Phase::Armed,
                _ if !pit.gate => Phase::Held { ticks: 0 },
                _ => Phase::Running {
                    start: tsc,
                    base: 0,
                },
            }
        };
        Ok(pit)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// A 1.193182 GHz guest TSC: exactly 1000 TSC cycles per PIT clock.
    const KHZ: u32 = 1_193_182;

    /// The TSC `ticks` PIT clocks after TSC 0.
    fn at(ticks: u64) -> u64 {
        ticks * 1000
    }

    fn gate_on(p: &mut Pit, tsc: u64) {
        p.write(PORT_SPEAKER, SPEAKER_GATE, tsc).unwrap();
    }

    fn load(p: &mut Pit, control: u8, count: u16, tsc: u64) {
        p.write(PORT_CONTROL, control, tsc).unwrap();
        let [lo, hi] = count.to_le_bytes();
        p.write(PORT_CH2, lo, tsc).unwrap();
        p.write(PORT_CH2, hi, tsc).unwrap();
    }

    fn read16(p: &mut Pit, tsc: u64) -> u16 {
        let lo = p.read(PORT_CH2, tsc).unwrap();
        let hi = p.read(PORT_CH2, tsc).unwrap();
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn ticks_follow_the_tsc_rate() {
        let p = Pit::new(KHZ);
        assert_eq!(p.ticks(0, 1_193_182_000), PIT_HZ);
        assert_eq!(p.ticks(0, at(256)), 256);
        assert_eq!(p.ticks(0, at(256) - 1), 255);
        assert_eq!(p.ticks(5, 4), 0);
        let q = Pit::new(3_000_000);
        assert_eq!(q.ticks(0, 3_000_000_000), PIT_HZ);
        assert_eq!(q.ticks(7, 7 + 2_514_285), 999);
        assert_eq!(q.ticks(7, 7 + 2_514_286), 1000);
        // No overflow at the far end of the TSC.
        assert_eq!(q.ticks(0, u64::MAX), 7_336_774_329_118_970);
        // A zero rate (never configured) counts as 1 kHz, not a division by 0.
        assert_eq!(Pit::new(0).ticks(0, 1000), PIT_HZ);
    }

    #[test]
    fn mode0_counts_down_wraps_and_raises_out2_at_zero() {
        let mut p = Pit::new(KHZ);
        gate_on(&mut p, 0);
        p.write(PORT_CONTROL, 0xb0, 0).unwrap();
        // After the control word and during a half-written count, OUT2 is low.
        assert_eq!(p.read(PORT_SPEAKER, 0).unwrap() & SPEAKER_OUT2, 0);
        let t0 = 1_000;
        load(&mut p, 0xb0, 1000, t0);
        assert_eq!(read16(&mut p, t0), 1000);
        assert_eq!(read16(&mut p, t0 + at(400)), 600);
        assert_eq!(
            p.read(PORT_SPEAKER, t0 + at(1000) - 1).unwrap() & SPEAKER_OUT2,
            0
        );
        assert_eq!(
            p.read(PORT_SPEAKER, t0 + at(1000)).unwrap() & (SPEAKER_OUT2 | SPEAKER_GATE),
            SPEAKER_OUT2 | SPEAKER_GATE
        );
        assert_eq!(read16(&mut p, t0 + at(1000)), 0);
        // Past zero the counter wraps to 0xffff and keeps going; OUT2 stays high.
        assert_eq!(read16(&mut p, t0 + at(1001)), 0xffff);
        assert_ne!(
            p.read(PORT_SPEAKER, t0 + at(70_000)).unwrap() & SPEAKER_OUT2,
            0
        );
        // A new count restarts it, OUT2 low again.
        load(&mut p, 0xb0, 10, t0 + at(2000));
        assert_eq!(
            p.read(PORT_SPEAKER, t0 + at(2009)).unwrap() & SPEAKER_OUT2,
            0
        );
        assert_ne!(
            p.read(PORT_SPEAKER, t0 + at(2010)).unwrap() & SPEAKER_OUT2,
            0
        );
    }

    #[test]
    fn gate_low_holds_mode0_and_restarts_mode2() {
        let mut p = Pit::new(KHZ);
        load(&mut p, 0xb0, 100, 0); // gate low: loaded, held
        assert_eq!(read16(&mut p, at(50)), 100);
        gate_on(&mut p, at(50));
        assert_eq!(read16(&mut p, at(80)), 70);
        p.write(PORT_SPEAKER, 0, at(80)).unwrap();
        assert_eq!(read16(&mut p, at(500)), 70);
        gate_on(&mut p, at(500));
        assert_eq!(read16(&mut p, at(510)), 60);
        // Mode 2: 100 .. 1, OUT low for the clock at 1, reload.
        load(&mut p, 0xb4, 100, at(1000));
        assert_eq!(read16(&mut p, at(1099)), 1);
        assert_eq!(p.read(PORT_SPEAKER, at(1099)).unwrap() & SPEAKER_OUT2, 0);
        assert_eq!(read16(&mut p, at(1100)), 100);
        assert_ne!(p.read(PORT_SPEAKER, at(1100)).unwrap() & SPEAKER_OUT2, 0);
        assert_eq!(read16(&mut p, at(1130)), 70);
        // Gate low: held with OUT high; the rising edge reloads.
        p.write(PORT_SPEAKER, 0, at(1130)).unwrap();
        assert_eq!(read16(&mut p, at(1199)), 70);
        gate_on(&mut p, at(1200));
        assert_eq!(read16(&mut p, at(1210)), 90);
    }

    #[test]
    fn mode3_square_wave_counts_by_two() {
        let mut p = Pit::new(KHZ);
        gate_on(&mut p, 0);
        load(&mut p, 0xb6, 100, 0);
        assert_eq!(read16(&mut p, at(10)), 80);
        assert_ne!(p.read(PORT_SPEAKER, at(49)).unwrap() & SPEAKER_OUT2, 0);
        assert_eq!(p.read(PORT_SPEAKER, at(50)).unwrap() & SPEAKER_OUT2, 0);
        assert_eq!(read16(&mut p, at(60)), 80);
        assert_ne!(p.read(PORT_SPEAKER, at(100)).unwrap() & SPEAKER_OUT2, 0);
        // Modes 6 and 7 are 2 and 3.
        p.write(PORT_CONTROL, 0xbe, 0).unwrap();
        assert_eq!(p.mode, 3);
    }

    /// What `quick_pit_calibrate` does: gate on, speaker off, mode 0 from
    /// 0xffff, then LSB/MSB reads until the MSB changes, 256 clocks apart.
    #[test]
    fn linux_quick_calibration_sees_the_msb_fall_at_the_pit_rate() {
        let mut p = Pit::new(KHZ);
        let v = p.read(PORT_SPEAKER, 0).unwrap();
        p.write(PORT_SPEAKER, (v & !SPEAKER_DATA) | SPEAKER_GATE, 0)
            .unwrap();
        let t0 = 12_345;
        load(&mut p, 0xb0, 0xffff, t0);
        let step = 100; // TSC cycles per LSB/MSB pair
        let mut tsc = t0;
        let mut changes = Vec::new();
        let mut msb = 0xff;
        while changes.len() < 40 {
            let _lsb = p.read(PORT_CH2, tsc).unwrap();
            let m = p.read(PORT_CH2, tsc).unwrap();
            if m != msb {
                assert_eq!(m, msb - 1, "at TSC {tsc}");
                changes.push(tsc);
                msb = m;
            }
            tsc += step;
        }
        // MSB 0xff -> 0xfe after 256 clocks (0xffff - 0x100 = 0xfeff),
        // then every 256 clocks: 214.55 us of TSC.
        let tsc_per_msb = at(256);
        for w in changes.windows(2) {
            let d = w[1] - w[0];
            assert!(d.abs_diff(tsc_per_msb) <= step, "{d} vs {tsc_per_msb}");
        }
        let total = changes[39] - changes[0];
        assert!(total.abs_diff(39 * tsc_per_msb) <= step, "{total}");
        assert!((changes[0] - t0).abs_diff(at(256)) <= step);
    }

    /// What `pit_calibrate_tsc` does: mode 0 with a 50 ms latch, polling
    /// port 0x61 bit 5.
    #[test]
    fn linux_pit_calibrate_tsc_sees_out2_after_the_latch() {
        let mut p = Pit::new(2_500_000);
        let v = p.read(PORT_SPEAKER, 0).unwrap();
        p.write(PORT_SPEAKER, (v & !SPEAKER_DATA) | SPEAKER_GATE, 0)
            .unwrap();
        let latch = (PIT_HZ / 20) as u16; // 50 ms
        load(&mut p, 0xb0, latch, 1_000);
        let mut tsc = 1_000;
        while p.read(PORT_SPEAKER, tsc).unwrap() & SPEAKER_OUT2 == 0 {
            tsc += 10_000;
        }
        // 59 659 clocks at 2.5 GHz: 125 000 000 TSC cycles, to a poll step.
        let want = u64::from(latch) * 2_500_000_000 / PIT_HZ;
        assert!(tsc - 1_000 >= want && tsc - 1_000 - want <= 10_000, "{tsc}");
    }

    #[test]
    fn latches_read_back_and_flip_flops() {
        let mut p = Pit::new(KHZ);
        gate_on(&mut p, 0);
        load(&mut p, 0xb0, 0x1234, 0);
        // Counter latch: the value at the latch, whenever it is read.
        p.write(PORT_CONTROL, 0x80, at(0x34)).unwrap();
        // A second latch before the first is read changes nothing.
        p.write(PORT_CONTROL, 0x80, at(0x100)).unwrap();
        assert_eq!(p.read(PORT_CH2, at(0x500)).unwrap(), 0x00);
        // The latched MSB next, however much later.
        assert_eq!(p.read(PORT_CH2, at(0x600)).unwrap(), 0x12);
        assert_eq!(read16(&mut p, at(0x1000)), 0x0234);
        // Read-back, status and count, channel 2: status first.
        p.write(PORT_CONTROL, 0xc8, at(0x1034)).unwrap();
        assert_eq!(p.read(PORT_CH2, at(0x2000)).unwrap(), 0x30);
        assert_eq!(read16(&mut p, at(0x2000)), 0x0200);
        // Status only, after terminal count: OUT set, null count clear.
        p.write(PORT_CONTROL, 0xe8, at(0x1300)).unwrap();
        assert_eq!(p.read(PORT_CH2, at(0x1300)).unwrap(), 0xb0);
        // LSB-only and MSB-only access modes.
        p.write(PORT_CONTROL, 0x90, 0).unwrap();
        p.write(PORT_CONTROL, 0xe8, 0).unwrap(); // status: null count
        assert_eq!(p.read(PORT_CH2, 0).unwrap(), 0x50);
        p.write(PORT_CH2, 0x80, 0).unwrap();
        assert_eq!(p.read(PORT_CH2, at(0x10)).unwrap(), 0x70);
        assert_eq!(p.read(PORT_CH2, at(0x10)).unwrap(), 0x70);
        p.write(PORT_CONTROL, 0xa0, 0).unwrap();
        p.write(PORT_CH2, 0x02, 0).unwrap();
        assert_eq!(read16(&mut p, at(0x100)), 0x0101);
        // BCD: 1000 counts down in decimal.
        load(&mut p, 0xb1, 0x1000, 0);
        assert_eq!(read16(&mut p, at(1)), 0x0999);
        assert_eq!(read16(&mut p, at(1001)), 0x9999);
    }

    #[test]
    fn channels_0_and_1_and_bad_ports_are_refused() {
        let mut p = Pit::new(KHZ);
        let before = p.clone();
        for port in [PORT_CH0, PORT_CH1, 0x44] {
            assert_eq!(
                p.read(port, 0),
                Err(Refused::Unknown {
                    reg: u32::from(port)
                })
            );
            assert!(p.write(port, 0x34, 0).is_err());
        }
        assert_eq!(
            p.read(PORT_CONTROL, 0),
            Err(Refused::WriteOnly { reg: 0x43 })
        );
        for cw in [0x34, 0x00, 0x74, 0x40] {
            assert!(p.write(PORT_CONTROL, cw, 0).is_err(), "{cw:#x}");
        }
        // Read-back of channels 0 and 1 only.
        assert!(p.write(PORT_CONTROL, 0xc6, 0).is_err());
        assert_eq!(p, before);
        // Port 0x61 keeps gate and speaker only.
        p.write(PORT_SPEAKER, 0xff, 0).unwrap();
        assert_eq!(p.read(PORT_SPEAKER, 0).unwrap() & !SPEAKER_REFRESH, 0x03);
        // Refresh toggles every 18 clocks.
        assert_eq!(p.read(PORT_SPEAKER, at(17)).unwrap() & SPEAKER_REFRESH, 0);
        assert_ne!(p.read(PORT_SPEAKER, at(18)).unwrap() & SPEAKER_REFRESH, 0);
        assert_eq!(p.read(PORT_SPEAKER, at(36)).unwrap() & SPEAKER_REFRESH, 0);
    }

    #[test]
    fn save_restore_keeps_the_programming_and_restarts_the_count() {
        let mut p = Pit::new(KHZ);
        p.write(PORT_SPEAKER, 0x03, 0).unwrap();
        load(&mut p, 0xb4, 5000, 0);
        p.write(PORT_CONTROL, 0x80, at(1000)).unwrap(); // latched 4000
        assert_eq!(p.read(PORT_CH2, at(1000)).unwrap(), 0xa0); // LSB taken
        let rec = p.save();
        let c = rec.channels[2];
        assert_eq!(
            (c.count, c.latched_count, c.count_latched, c.mode, c.rw_mode),
            (5000, 4000, MSB, 2, WORD0)
        );
        assert_eq!((c.gate, rec.speaker_data_on), (1, 1));
        assert_eq!(rec.channels[0], HvmHwPitChannel::default());
        // Restored at guest TSC 9 000 000 on a 2 GHz host: the latched
        // MSB is still due, then counting restarts from 5000.
        let mut r = Pit::restore(&rec, 2_000_000, 9_000_000).unwrap();
        assert_eq!(r.save(), rec);
        assert_eq!(r.read(PORT_CH2, 9_000_000).unwrap(), 0x0f);
        let two_ghz = |t: u64| (t * 2_000_000_000).div_ceil(PIT_HZ);
        assert_eq!(read16(&mut r, 9_000_000 + two_ghz(10)), 4990);
        assert_eq!(r.read(PORT_SPEAKER, 9_000_000).unwrap() & 3, 3);
        // A record from reset, and a half-written mode 0 count.
        let fresh = Pit::new(KHZ);
        assert_eq!(Pit::restore(&fresh.save(), KHZ, 7).unwrap(), fresh);
        p.write(PORT_CONTROL, 0xb0, 0).unwrap();
        p.write(PORT_CH2, 0x10, 0).unwrap();
        let mut r = Pit::restore(&p.save(), KHZ, 0).unwrap();
        assert_eq!(r.read(PORT_SPEAKER, at(10)).unwrap() & SPEAKER_OUT2, 0);
        r.write(PORT_CH2, 0, at(10)).unwrap();
        assert_eq!(read16(&mut r, at(20)), 6);
    }

    #[test]
    fn restore_refuses_bad_records() {
        let mut p = Pit::new(KHZ);
        load(&mut p, 0xb0, 100, 0);
        let rec = p.save();
        let bad = |f: &dyn Fn(&mut HvmHwPit)| {
            let mut r = rec;
            f(&mut r);
            Pit::restore(&r, KHZ, 0).unwrap_err().field
        };
        assert_eq!(bad(&|r| r.pad0 = 1), "pad0");
        assert_eq!(bad(&|r| r.speaker_data_on = 2), "speaker_data_on");
        assert_eq!(bad(&|r| r.channels[0].gate = 1), "channels[0]");
        assert_eq!(bad(&|r| r.channels[1].count = 1), "channels[1]");
        assert_eq!(bad(&|r| r.channels[2].mode = 6), "mode");
        assert_eq!(bad(&|r| r.channels[2].bcd = 2), "bcd");
        assert_eq!(bad(&|r| r.channels[2].gate = 2), "gate");
        assert_eq!(bad(&|r| r.channels[2].rw_mode = 0), "rw_mode");
        assert_eq!(bad(&|r| r.channels[2].read_state = 1), "read_state");
        assert_eq!(bad(&|r| r.channels[2].write_state = 5), "write_state");
        assert_eq!(bad(&|r| r.channels[2].count_latched = 4), "count_latched");
        assert_eq!(bad(&|r| r.channels[2].status_latched = 2), "status_latched");
        assert_eq!(bad(&|r| r.channels[2].count = 0x1_0001), "count");
        assert_eq!(
            bad(&|r| {
                r.channels[2].bcd = 1;
                r.channels[2].count = 10_001;
            }),
            "count"
        );
        // Xen's own encoding of a zero load is accepted.
        let mut r = rec;
        r.channels[2].count = 0x1_0000;
        assert!(Pit::restore(&r, KHZ, 0).is_ok());
    }
}
