//! Typed access to the current VMCS: a field's enum (from
//! `doppel_core::hw::vmcs`) fixes its width and whether it can be written.
//! Read-only fields (VM-exit information) implement [`Field`] only, so
//! `write(ReadOnly32::ExitReason, ..)` does not compile.

use doppel_core::hw::vmcs::{
    Control16, Control32, Control64, ControlN, Guest16, Guest32, Guest64, GuestN, Host16, Host32,
    Host64, HostN, ReadOnly32, ReadOnly64, ReadOnlyN,
};

use crate::arch::instr::{self, VmFail};

/// A VMCS field of a known width.
pub trait Field: Copy + core::fmt::Debug {
    type Value: Copy;
    fn encoding(self) -> u32;
    fn from_raw(raw: u64) -> Self::Value;
    fn to_raw(value: Self::Value) -> u64;
}

/// A field software may write (every class but the read-only one).
pub trait Writable: Field {}

macro_rules! field {
    ($t:ty, $v:ty, $w:tt) => {
        impl Field for $t {
            type Value = $v;
            fn encoding(self) -> u32 {
                <$t>::encoding(self)
            }
            fn from_raw(raw: u64) -> $v {
                // The CPU zero-extends a narrower field into the register.
                raw as $v
            }
            fn to_raw(value: $v) -> u64 {
                value as u64
            }
        }
        field!(@w $t, $w);
    };
    (@w $t:ty, rw) => {
        impl Writable for $t {}
    };
    (@w $t:ty, ro) => {};
}

field!(Control16, u16, rw);
field!(Guest16, u16, rw);
field!(Host16, u16, rw);
field!(Control64, u64, rw);
field!(ReadOnly64, u64, ro);
field!(Guest64, u64, rw);
field!(Host64, u64, rw);
field!(Control32, u32, rw);
field!(ReadOnly32, u32, ro);
field!(Guest32, u32, rw);
field!(Host32, u32, rw);
field!(ControlN, u64, rw);
field!(ReadOnlyN, u64, ro);
field!(GuestN, u64, rw);
field!(HostN, u64, rw);

/// A VMREAD or VMWRITE that failed, with the field it was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcsError {
    pub encoding: u32,
    pub write: bool,
    pub fail: VmFail,
}

impl core::fmt::Display for VmcsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "VM{} of field {:#06x} failed ({:?}",
            if self.write { "WRITE" } else { "READ" },
            self.encoding,
            self.fail
        )?;
        if self.fail == VmFail::Valid {
            write!(f, ", instruction error {}", instruction_error())?;
        }
        write!(f, ")")
    }
}

/// Read a field of the current VMCS.
pub fn read<F: Field>(field: F) -> Result<F::Value, VmcsError> {
    instr::vmread(field.encoding())
        .map(F::from_raw)
        .map_err(|fail| VmcsError {
            encoding: field.encoding(),
            write: false,
            fail,
        })
}

/// Read a field whose failure would mean no current VMCS; 0 then (only
/// for reports and exit decoding, where a failed read shows up as a
/// nonsensical exit that the dispatch rejects).
pub fn read_or_zero<F: Field>(field: F) -> F::Value {
    read(field).unwrap_or(F::from_raw(0))
}

/// Write a field of the current VMCS.
pub fn write<F: Writable>(field: F, value: F::Value) -> Result<(), VmcsError> {
    instr::vmwrite(field.encoding(), F::to_raw(value)).map_err(|fail| VmcsError {
        encoding: field.encoding(),
        write: true,
        fail,
    })
}

/// The VM-instruction error field (why the last VMX instruction failed
/// with VMfailValid); SDM vol. 3C, "VM-Instruction Error Numbers".
pub fn instruction_error() -> u32 {
    read_or_zero(ReadOnly32::VmInstructionError)
}

/// What a VM-instruction error number means (the ones VM entry and the
/// set-up here can produce).
pub fn instruction_error_text(n: u32) -> &'static str {
    match n {
        2 => "VMCLEAR with invalid physical address",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "see the SDM's VM-instruction error numbers",
    }
}
