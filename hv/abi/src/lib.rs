//! The contract shared by the Doppel hypervisor and the dom0 tool.
//!
//! Everything here is `#[repr(C)]`, derives zerocopy traits and carries
//! compile-time size and offset checks. No unsafe code: the peer on the other
//! side of any of these layouts is untrusted.
//!
//! - [`mem`]: the [`SharedMem`] trait all shared structures run over, and
//!   [`AtomicMem`] / [`AtomicMem64`], safe implementations over
//!   `&[AtomicU32]` / `&[AtomicU64]`.
//! - [`ring`]: Xen's `io/ring.h` shared ring ([`FrontRing`], [`BackRing`]).
//! - [`msg`]: commands, responses, events and acks carried by the rings.
//! - [`chan`]: epoch-tagged byte channels for guest output and input.
//! - [`control`]: the control area header and its validation.
//! - [`hvm`]: Xen's HVM save record layouts and log-dirty op numbers.
//! - [`ioreq`]: Xen's ioreq page and buffered ioreq ring, in the device-
//!   model area the hypervisor shares with `doppel run`.
//! - [`pvh`]: Xen's PVH boot information (`hvm_start_info` and its module
//!   list and memory map), as our domain builder writes it for Linux.
//! - [`errno`]: Xen errno values used on the wire.
//! - [`guest`]: the test guests' memory layout, boot information and
//!   hypercalls.
//! - [`service`]: the protected key-value service's frames and checksum.
//! - [`splitmix`]: SplitMix64, the checksum's mixer and the seeded
//!   generator the tools and tests share.
#![no_std]
#![forbid(unsafe_code)]

pub mod chan;
pub mod control;
pub mod errno;
pub mod guest;
pub mod hvm;
pub mod ioreq;
pub mod layout;
pub mod locator;
pub mod mem;
pub mod msg;
pub mod pvh;
pub mod ring;
pub mod service;
pub mod splitmix;

pub use control::{validate, AbiError, ControlHeader, ControlView, Features, Field};
pub use errno::Errno;
pub use mem::{AtomicMem, AtomicMem64, ByteMem, SharedMem};
pub use msg::{
    Command, CommandEntry, DecodeError, Event, EventAck, EventEntry, Response, ResponseEntry,
};
pub use ring::{BackRing, FrontRing, RingError};

/// The command ring as the tool sees it.
pub type CommandFront<M> = FrontRing<M, CommandEntry, ResponseEntry>;
/// The command ring as the hypervisor sees it.
pub type CommandBack<M> = BackRing<M, CommandEntry, ResponseEntry>;
/// The event ring as the hypervisor sees it.
pub type EventFront<M> = FrontRing<M, EventEntry, EventAck>;
/// The event ring as the tool sees it.
pub type EventBack<M> = BackRing<M, EventEntry, EventAck>;
