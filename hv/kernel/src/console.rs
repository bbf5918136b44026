//! Text output: every byte goes to the debug console (port 0xE9: QEMU
//! `-debugcon`, Bochs `port_e9_hack`) and to COM1 (a 16550 UART). The `log`
//! crate writes here as `doppel-hv: <message>` (info) or
//! `doppel-hv: <level>: <message>`; the test runner matches those lines.

use core::fmt::{self, Write};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::arch::instr::{inb, outb};

const DEBUGCON: u16 = 0xE9;
const COM1: u16 = 0x3F8;
/// Line status register bits: transmit holding register empty, and
/// transmitter empty (the last byte has left the shift register).
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
/// Bound on waiting for the UART (a missing UART must not hang the kernel).
const UART_SPINS: u32 = 100_000;

/// Keeps lines whole when several writers print.
static LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Program COM1 for 115200 baud, 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB on
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8 data bits, no parity, 1 stop bit, DLAB off
    outb(COM1 + 2, 0xC7); // FIFOs on and cleared, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR, RTS
}

fn com1_put(b: u8) {
    for _ in 0..UART_SPINS {
        if inb(COM1 + 5) & LSR_THRE != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Wait (bounded) until COM1 has sent every byte, so powering off right
/// after does not cut the last line short.
pub fn flush() {
    for _ in 0..UART_SPINS {
        if inb(COM1 + 5) & LSR_TEMT != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(DEBUGCON, b);
            if b == b'\n' {
                com1_put(b'\r');
            }
            com1_put(b);
        }
        Ok(())
    }
}

/// Print under the console lock.
pub fn print(args: fmt::Arguments<'_>) {
    let _guard = LOCK.lock();
    let _ = Console.write_fmt(args);
}

/// Print without taking the lock: for the panic and exception paths, which
/// may have interrupted a holder of the lock.
pub fn emergency(args: fmt::Arguments<'_>) {
    let _ = Console.write_fmt(args);
}

struct Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = match record.level() {
            Level::Info => "",
            Level::Error => "error: ",
            Level::Warn => "warn: ",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        print(format_args!("doppel-hv: {prefix}{}\n", record.args()));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Route the `log` crate here at `level`.
pub fn init_logger(level: LevelFilter) {
    // Only fails if a logger is already set, which then stays in use.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
