//! The contract shared by the Doppel hypervisor and the dom0 tool.
//!
//! Everything here is `#[repr(C)]`, derives zerocopy traits and carries
//! compile-time size and offset checks. No unsafe code: the peer on the other
//! side of any of these layouts is untrusted.
#![no_std]
#![forbid(unsafe_code)]

pub mod guest;
