//! The platform devices a stock Linux guest needs (issue 19), as pure
//! models: a local APIC in x2APIC form ([`lapic`]), an IOAPIC ([`ioapic`]),
//! a CMOS RTC ([`rtc`]), the i8254's channel 2 ([`pit`]: the counter Linux
//! calibrates against) and a 16550 UART on COM1 ([`uart`]).
//!
//! Each model owns its device state, takes guest accesses as plain values
//! (an MSR number, an MMIO offset, a port) and time as a TSC value, and
//! never panics: every guest-written value is checked or masked, and an
//! access the model does not implement is a [`Refused`] the caller turns
//! into a fault (#GP for an MSR) or ignores (port and MMIO accesses). The
//! hypervisor wires them to exits; here they are host-tested only.
//!
//! The LAPIC, IOAPIC, PIT and RTC state travels in Xen's HVM save records
//! (LAPIC, LAPIC_REGS, IOAPIC, PIT, RTC; layouts in [`doppel_abi::hvm`]): each
//! model has a `save` and a `restore` that round-trip exactly. The UART is a
//! device model's state in Xen's split (QEMU's), so it has no Xen record.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod ioapic;
pub mod lapic;
pub mod machine;
pub mod pit;
pub mod records;
pub mod rtc;
pub mod uart;

/// A guest access a model does not accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No such register (or one the model does not implement).
    Unknown { reg: u32 },
    /// A write to a read-only register.
    ReadOnly { reg: u32 },
    /// A read of a write-only register.
    WriteOnly { reg: u32 },
    /// Reserved bits set, or a reserved encoding.
    Reserved { reg: u32, value: u64 },
    /// The device is disabled (e.g. the LAPIC through IA32_APIC_BASE).
    Disabled { reg: u32 },
}

/// A save record the model cannot take: the field and the value found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordError {
    pub field: &'static str,
    pub value: u64,
}

impl RecordError {
    pub(crate) fn new(field: &'static str, value: u64) -> Self {
        RecordError { field, value }
    }
}
