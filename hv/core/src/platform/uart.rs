//! 16550A UART on COM1 (ports 0x3F8-0x3FF, GSI 4), the guest's console.
//!
//! # What is modelled
//! THR/RBR, IER (four enables), IIR (line status > received data /
//! character timeout > THR empty; FIFO bits), FCR (enable, clear, trigger
//! level), LCR with DLAB and the divisor latch, MCR (DTR, RTS, OUT1, OUT2,
//! loopback), LSR (data ready, overrun, THR empty, transmitter empty), MSR
//! (CTS, DSR and DCD up; in loopback the MCR outputs) and SCR. Output is
//! instant: a THR write returns the byte and the transmitter is empty at
//! once, so the THR-empty interrupt follows every byte (cleared by reading
//! IIR or writing THR). Input goes into a 16-byte receive FIFO (1 byte with
//! FIFOs off) with [`Uart::receive`]; a full FIFO sets overrun. The
//! interrupt line ([`Uart::irq`]) is the pending interrupt gated by OUT2,
//! as on PCs.
//!
//! # What is refused or masked
//! Offsets above 7 and writes to LSR and MSR are [`Refused`] (the caller
//! drops them). Reserved bits of IER (4-7) and MCR (5-7) are masked. The
//! modem-status interrupt never fires (the lines do not change), and
//! parity, framing and break errors never occur. No Xen record: in Xen's
//! split the UART is the device model's (QEMU's) state.

use super::Refused;

/// COM1 base port and its GSI.
pub const COM1: u16 = 0x3F8;
pub const COM1_GSI: u32 = 4;

const FIFO: usize = 16;

pub const IER_RX: u8 = 0x01;
pub const IER_THRE: u8 = 0x02;
pub const IER_LSR: u8 = 0x04;
const IER_BITS: u8 = 0x0F;
pub const IIR_NONE: u8 = 0x01;
pub const IIR_LSR: u8 = 0x06;
pub const IIR_RX: u8 = 0x04;
pub const IIR_TIMEOUT: u8 = 0x0C;
pub const IIR_THRE: u8 = 0x02;
const IIR_FIFO: u8 = 0xC0;
pub const LCR_DLAB: u8 = 0x80;
pub const MCR_OUT2: u8 = 0x08;
pub const MCR_LOOP: u8 = 0x10;
const MCR_BITS: u8 = 0x1F;
pub const LSR_DR: u8 = 0x01;
pub const LSR_OE: u8 = 0x02;
pub const LSR_THRE: u8 = 0x20;
pub const LSR_TEMT: u8 = 0x40;
/// CTS, DSR, DCD.
const MSR_CONNECTED: u8 = 0xB0;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    /// FCR bit 0 and the trigger level bits 6-7.
    fcr: u8,
    overrun: bool,
    thre_pending: bool,
    rx: [u8; FIFO],
    rx_head: usize,
    rx_len: usize,
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart {
    /// After reset (divisor 12, 9600 baud).
    pub fn new() -> Self {
        Uart {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            dll: 12,
            dlm: 0,
            fcr: 0,
            overrun: false,
            thre_pending: false,
            rx: [0; FIFO],
            rx_head: 0,
            rx_len: 0,
        }
    }

    fn fifo_on(&self) -> bool {
        self.fcr & 1 != 0
    }

    fn capacity(&self) -> usize {
        if self.fifo_on() {
            FIFO
        } else {
            1
        }
    }

    /// Bytes that make the received-data interrupt (not the timeout).
    fn trigger(&self) -> usize {
        if !self.fifo_on() {
            return 1;
        }
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    /// A byte from the outside world (the console input). False if the
    /// FIFO was full: the byte is lost and overrun is flagged.
    pub fn receive(&mut self, byte: u8) -> bool {
        if self.rx_len >= self.capacity() {
            self.overrun = true;
            return false;
        }
        let at = (self.rx_head + self.rx_len) % FIFO;
        if let Some(slot) = self.rx.get_mut(at) {
            *slot = byte;
        }
        self.rx_len += 1;
        true
    }

    fn pop(&mut self) -> u8 {
        if self.rx_len == 0 {
            return 0;
        }
        let b = self.rx.get(self.rx_head).copied().unwrap_or(0);
        self.rx_head = (self.rx_head + 1) % FIFO;
        self.rx_len -= 1;
        b
    }

    fn lsr(&self) -> u8 {
        let mut v = LSR_THRE | LSR_TEMT;
        if self.rx_len > 0 {
            v |= LSR_DR;
        }
        if self.overrun {
            v |= LSR_OE;
        }
        v
    }

    /// The interrupt identification, without side effects.
    fn iir(&self) -> u8 {
        let id = if self.ier & IER_LSR != 0 && self.overrun {
            IIR_LSR
        } else if self.ier & IER_RX != 0 && self.rx_len > 0 {
            if self.rx_len >= self.trigger() {
                IIR_RX
            } else {
                IIR_TIMEOUT
            }
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else {
            IIR_NONE
        };
        id | if self.fifo_on() { IIR_FIFO } else { 0 }
    }

    /// The interrupt line to the IOAPIC (GSI 4): an interrupt is pending
    /// and OUT2 is set.
    pub fn irq(&self) -> bool {
        self.iir() & IIR_NONE == 0 && self.mcr & MCR_OUT2 != 0 && self.mcr & MCR_LOOP == 0
    }

    /// Read register `offset` (port - 0x3F8).
    pub fn read(&mut self, offset: u16) -> Result<u8, Refused> {
        let dlab = self.lcr & LCR_DLAB != 0;
        Ok(match offset {
            0 if dlab => self.dll,
            0 => self.pop(),
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let v = self.iir();
                if v & 0x0F == IIR_THRE {
                    self.thre_pending = false;
                }
                v
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                let v = self.lsr();
                self.overrun = false;
                v
            }
            6 => {
                if self.mcr & MCR_LOOP != 0 {
                    // CTS = RTS, DSR = DTR, RI = OUT1, DCD = OUT2.
                    let m = self.mcr;
                    ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
                } else {
                    MSR_CONNECTED
                }
            }
            7 => self.scr,
            _ => {
                return Err(Refused::Unknown {
                    reg: u32::from(offset),
                })
            }
        })
    }

    /// Write register `offset`; returns the byte sent to the console, if
    /// any.
    pub fn write(&mut self, offset: u16, value: u8) -> Result<Option<u8>, Refused> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 => {
                self.thre_pending = true;
                if self.mcr & MCR_LOOP != 0 {
                    self.receive(value);
                    return Ok(None);
                }
                return Ok(Some(value));
            }
            1 if dlab => self.dlm = value,
            1 => {
                let was = self.ier & IER_THRE != 0;
                self.ier = value & IER_BITS;
                if !was && self.ier & IER_THRE != 0 {
                    // Enabling the THR-empty interrupt with THR empty.
                    self.thre_pending = true;
                }
            }
            2 => {
                if value & 0x02 != 0 || (value ^ self.fcr) & 1 != 0 {
                    self.rx_head = 0;
                    self.rx_len = 0;
                }
                self.fcr = value & 0xC1;
            }
            3 => self.lcr = value,
            4 => self.mcr = value & MCR_BITS,
            5 | 6 => {
                return Err(Refused::ReadOnly {
                    reg: u32::from(offset),
                })
            }
            7 => self.scr = value,
            _ => {
                return Err(Refused::Unknown {
                    reg: u32::from(offset),
                })
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reset_registers() {
        let mut u = Uart::new();
        assert_eq!(u.read(1), Ok(0));
        assert_eq!(u.read(2), Ok(0x01));
        assert_eq!(u.read(5), Ok(0x60));
        assert_eq!(u.read(6), Ok(0xB0));
        assert!(!u.irq());
    }

    #[test]
    fn output_and_thre_interrupt() {
        let mut u = Uart::new();
        u.write(4, MCR_OUT2 | 0x03).unwrap();
        assert_eq!(u.write(0, b'L'), Ok(Some(b'L')));
        assert!(!u.irq()); // THRE interrupt not enabled
        u.write(1, IER_THRE).unwrap();
        assert!(u.irq());
        assert_eq!(u.read(2), Ok(IIR_THRE));
        // Reading IIR cleared it.
        assert!(!u.irq());
        assert_eq!(u.read(2), Ok(IIR_NONE));
        assert_eq!(u.write(0, b'x'), Ok(Some(b'x')));
        assert!(u.irq());
        // OUT2 gates the line.
        u.write(4, 0x03).unwrap();
        assert!(!u.irq());
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let mut u = Uart::new();
        u.write(3, LCR_DLAB | 0x03).unwrap();
        u.write(0, 0x01).unwrap();
        u.write(1, 0x00).unwrap();
        assert_eq!(u.read(0), Ok(0x01));
        assert_eq!(u.read(1), Ok(0x00));
        // Divisor writes sent nothing and left IER alone.
        u.write(3, 0x03).unwrap();
        assert_eq!(u.read(1), Ok(0));
        assert_eq!(u.read(3), Ok(0x03));
        u.write(7, 0x5A).unwrap();
        assert_eq!(u.read(7), Ok(0x5A));
    }

    #[test]
    fn receive_fifo_priority_and_overrun() {
        let mut u = Uart::new();
        u.write(4, MCR_OUT2).unwrap();
        u.write(2, 0x81).unwrap(); // FIFO on, trigger 8
        u.write(1, IER_RX | IER_THRE | IER_LSR).unwrap();
        for b in 0..4u8 {
            assert!(u.receive(b'a' + b));
        }
        // Below the trigger: timeout id; above THRE in priority.
        assert_eq!(u.read(2), Ok(0xC0 | IIR_TIMEOUT));
        for b in 4..8u8 {
            u.receive(b'a' + b);
        }
        assert_eq!(u.read(2), Ok(0xC0 | IIR_RX));
        assert_eq!(u.read(5), Ok(0x61));
        for b in 8..16u8 {
            assert!(u.receive(b'a' + b));
        }
        assert!(!u.receive(b'!'));
        assert_eq!(u.read(2), Ok(0xC0 | IIR_LSR));
        assert_eq!(u.read(5), Ok(0x63)); // read clears OE
        assert_eq!(u.read(5), Ok(0x61));
        let got: Vec<u8> = (0..16).map(|_| u.read(0).unwrap()).collect();
        assert_eq!(got, b"abcdefghijklmnop");
        assert_eq!(u.read(5), Ok(0x60));
        assert_eq!(u.read(0), Ok(0));
        // Only THRE is left.
        assert_eq!(u.read(2), Ok(0xC0 | IIR_THRE));
        // FIFOs off: one byte holds.
        u.write(2, 0).unwrap();
        assert!(u.receive(1));
        assert!(!u.receive(2));
        assert_eq!(u.read(2), Ok(IIR_LSR));
        // FCR clear-receive empties it; overrun stays until LSR is read.
        u.write(2, 0x03).unwrap();
        assert_eq!(u.read(5), Ok(0x62));
        assert_eq!(u.read(5), Ok(0x60));
    }

    #[test]
    fn loopback_echoes_and_mirrors_modem_lines() {
        let mut u = Uart::new();
        u.write(4, MCR_LOOP | 0x0A).unwrap(); // loop, OUT2, RTS
        assert_eq!(u.read(6), Ok(0x90));
        u.write(4, MCR_LOOP | 0x05).unwrap(); // loop, OUT1, DTR
        assert_eq!(u.read(6), Ok(0x60));
        assert_eq!(u.write(0, 0x55), Ok(None));
        assert_eq!(u.read(5), Ok(0x61));
        assert_eq!(u.read(0), Ok(0x55));
    }

    #[test]
    fn refusals_and_masks() {
        let mut u = Uart::new();
        assert_eq!(u.read(8), Err(Refused::Unknown { reg: 8 }));
        assert_eq!(u.write(8, 0), Err(Refused::Unknown { reg: 8 }));
        assert_eq!(u.write(5, 0), Err(Refused::ReadOnly { reg: 5 }));
        assert_eq!(u.write(6, 0), Err(Refused::ReadOnly { reg: 6 }));
        u.write(1, 0xFF).unwrap();
        assert_eq!(u.read(1), Ok(0x0F));
        u.write(4, 0xFF).unwrap();
        assert_eq!(u.read(4), Ok(0x1F));
    }
}
