//! Ending a run: the final `doppel-hv: exit=pass|fail` line, then the
//! emulators' exit devices. QEMU's isa-debug-exit (port 0xF4) turns a write
//! of v into exit code (v << 1) | 1; Bochs powers off when the string
//! `Shutdown` is written to port 0x8900 (its exit code is always 1, hence the
//! line). On a machine with neither, the CPU halts.

use crate::arch::instr::{halt_forever, outb};
use crate::console;

const QEMU_EXIT_PORT: u16 = 0xF4;
const QEMU_PASS: u8 = 0x10; // exit code 33
const QEMU_FAIL: u8 = 0x11; // exit code 35
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
}

pub fn exit(status: Status) -> ! {
    let (word, code) = match status {
        Status::Pass => ("pass", QEMU_PASS),
        Status::Fail => ("fail", QEMU_FAIL),
    };
    console::emergency(format_args!("doppel-hv: exit={word}\n"));
    console::flush();
    outb(QEMU_EXIT_PORT, code);
    for b in b"Shutdown" {
        outb(BOCHS_SHUTDOWN_PORT, *b);
    }
    halt_forever()
}
