//! The messages on the two rings.
//!
//! Command ring (tool = front, hypervisor = back): requests are
//! [`CommandEntry`], responses [`ResponseEntry`] carrying the hypervisor's
//! answer (0 or a negative errno plus the reply values).
//!
//! Event ring (hypervisor = front, tool = back): requests are [`EventEntry`],
//! responses [`EventAck`]; the ack of a checkpoint tells the hypervisor the
//! tool has copied what the event pointed at, so the staging area is free.
//!
//! Entries are fixed-size little-endian structs. Decoding copies nothing
//! from shared memory itself (the ring already copied the entry out) and
//! returns a distinct error for an unknown opcode, reserved bits that are
//! set and out-of-range fields. Unused argument words are reserved too.

use core::mem::{offset_of, size_of};

use crate::layout::layout_struct;

use crate::errno::Errno;

/// Why an entry did not decode. The name is the offending field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The opcode / kind is not one this ABI version knows.
    UnknownOpcode(u32),
    /// A reserved field (or an argument unused by this opcode) is not zero.
    ReservedNonZero(&'static str),
    /// A field holds a value outside its range.
    OutOfRange(&'static str),
}

impl DecodeError {
    /// The errno this error is answered with on the ABI.
    pub const fn errno(self) -> Errno {
        match self {
            DecodeError::UnknownOpcode(_) => Errno::ENOSYS,
            DecodeError::ReservedNonZero(_) => Errno::EINVAL,
            DecodeError::OutOfRange(_) => Errno::ERANGE,
        }
    }
}

layout_struct! {
    /// A byte range in the control area (offset from its start, length).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Span {
        pub offset: u64,
        pub len: u64,
    }
}

const _: () = assert!(size_of::<Span>() == 16);
const _: () = assert!(offset_of!(Span, offset) == 0);
const _: () = assert!(offset_of!(Span, len) == 8);

impl Span {
    pub const EMPTY: Span = Span { offset: 0, len: 0 };

    /// One past the last byte, or `None` on overflow.
    pub const fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// How the hypervisor tracks dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LogDirtyMode {
    /// Write-protect the nested page tables, log on the first write fault.
    WriteProtect = 1,
    /// Intel Page-Modification Logging.
    Pml = 2,
    /// Scan and clear the nested page tables' accessed/dirty bits.
    AdScan = 3,
}

impl LogDirtyMode {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::WriteProtect),
            2 => Some(Self::Pml),
            3 => Some(Self::AdScan),
            _ => None,
        }
    }
}

/// Where PEEK/CLEAN write the dirty bitmap (Xen layout: pfn `p` is byte
/// `p >> 3`, bit `p & 7`) and how many pfns it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapDest {
    /// Bitmap bytes in the control area (must lie in the pfn list area;
    /// the hypervisor checks that against its control view).
    pub span: Span,
    /// Pfns covered; `span.len >= ceil(pages / 8)`.
    pub pages: u64,
}

/// The epoch an output record carries in the output channel when it was
/// released by `Detach` (still held then) or produced while detached: it
/// never was, and never will be, committed to a backup.
pub const UNPROTECTED_EPOCH: u64 = u64::MAX;

/// The largest epoch `CommitEpoch` and `Activate` may name: two short of
/// [`UNPROTECTED_EPOCH`], so that the epoch after it (where a standby
/// activated at it goes on) is never taken for unprotected output.
pub const MAX_EPOCH: u64 = UNPROTECTED_EPOCH - 2;
const _: () = assert!(MAX_EPOCH + 1 < UNPROTECTED_EPOCH);

fn epoch_arg(a: u64) -> Result<u64, DecodeError> {
    if a > MAX_EPOCH {
        return Err(DecodeError::OutOfRange("epoch"));
    }
    Ok(a)
}

/// Command opcodes.
pub mod op {
    pub const LOG_DIRTY_ENABLE: u32 = 1;
    pub const LOG_DIRTY_DISABLE: u32 = 2;
    pub const LOG_DIRTY_PEEK: u32 = 3;
    pub const LOG_DIRTY_CLEAN: u32 = 4;
    pub const END_EPOCH: u32 = 5;
    pub const RESUME: u32 = 6;
    pub const COMMIT_EPOCH: u32 = 7;
    pub const ACTIVATE: u32 = 8;
    pub const READ_VCPU: u32 = 9;
    pub const DETACH: u32 = 10;
}

/// A decoded command (tool -> hypervisor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Start dirty logging. Enabling twice is `-EINVAL` (Xen).
    LogDirtyEnable { mode: LogDirtyMode },
    /// Stop dirty logging (Xen's `SHADOW_OP_OFF`).
    LogDirtyDisable,
    /// Copy the dirty bitmap, change nothing (Xen's `PEEK`).
    LogDirtyPeek(BitmapDest),
    /// Copy and clear the bitmap, zero the counters, re-arm tracking
    /// (Xen's `CLEAN`).
    LogDirtyClean(BitmapDest),
    /// End the current epoch: pause, harvest, stage, post CheckpointReady.
    EndEpoch,
    /// Resume the guest.
    Resume,
    /// The backup committed `epoch`: release its output (and earlier).
    /// At most [`MAX_EPOCH`].
    CommitEpoch { epoch: u64 },
    /// Failover: run from the last committed state, which is `epoch` (at
    /// most [`MAX_EPOCH`]).
    Activate { epoch: u64 },
    /// Write vCPU `vcpu`'s context (`hvm_hw_cpu`) into `dest`.
    ReadVcpu { vcpu: u32, dest: Span },
    /// The tool stops replicating: the hypervisor turns log-dirty off,
    /// stops staging and posting events, releases every held output record
    /// (committed or not: no backup can be consistent with the guest any
    /// more) and runs the guest unprotected. The rings stay where they are;
    /// a new primary may attach at their current indices (docs/REPLICATION.md,
    /// "Detach and re-attach").
    Detach,
}

layout_struct! {
    /// A command ring request as it sits in the ring.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CommandEntry {
        /// One of [`op`].
        pub op: u32,
        /// Chosen by the tool, echoed in the response.
        pub id: u32,
        /// Operation arguments; words an opcode does not use must be zero.
        pub args: [u64; 3],
        /// Must be zero.
        pub reserved: [u64; 4],
    }
}

const _: () = assert!(size_of::<CommandEntry>() == 64);
const _: () = assert!(offset_of!(CommandEntry, op) == 0);
const _: () = assert!(offset_of!(CommandEntry, id) == 4);
const _: () = assert!(offset_of!(CommandEntry, args) == 8);
const _: () = assert!(offset_of!(CommandEntry, reserved) == 32);

const ARGS: [&str; 3] = ["args[0]", "args[1]", "args[2]"];
const VALS: [&str; 3] = ["vals[0]", "vals[1]", "vals[2]"];

fn check_unused(
    words: &[u64; 3],
    from: usize,
    names: &[&'static str; 3],
) -> Result<(), DecodeError> {
    for (i, a) in words.iter().enumerate().skip(from) {
        if *a != 0 {
            return Err(DecodeError::ReservedNonZero(names[i]));
        }
    }
    Ok(())
}

fn bitmap_dest(args: &[u64; 3]) -> Result<BitmapDest, DecodeError> {
    let (offset, len, pages) = (args[0], args[1], args[2]);
    if !offset.is_multiple_of(8) {
        return Err(DecodeError::OutOfRange("bitmap offset"));
    }
    if offset.checked_add(len).is_none() {
        return Err(DecodeError::OutOfRange("bitmap len"));
    }
    if len < pages.div_ceil(8) {
        return Err(DecodeError::OutOfRange("bitmap pages"));
    }
    Ok(BitmapDest {
        span: Span { offset, len },
        pages,
    })
}

impl Command {
    /// The opcode of this command.
    pub const fn opcode(&self) -> u32 {
        match self {
            Command::LogDirtyEnable { .. } => op::LOG_DIRTY_ENABLE,
            Command::LogDirtyDisable => op::LOG_DIRTY_DISABLE,
            Command::LogDirtyPeek(_) => op::LOG_DIRTY_PEEK,
            Command::LogDirtyClean(_) => op::LOG_DIRTY_CLEAN,
            Command::EndEpoch => op::END_EPOCH,
            Command::Resume => op::RESUME,
            Command::CommitEpoch { .. } => op::COMMIT_EPOCH,
            Command::Activate { .. } => op::ACTIVATE,
            Command::ReadVcpu { .. } => op::READ_VCPU,
            Command::Detach => op::DETACH,
        }
    }

    /// The ring entry for this command with request id `id`.
    pub fn encode(&self, id: u32) -> CommandEntry {
        let args = match *self {
            Command::LogDirtyEnable { mode } => [mode as u64, 0, 0],
            Command::LogDirtyPeek(d) | Command::LogDirtyClean(d) => {
                [d.span.offset, d.span.len, d.pages]
            }
            Command::CommitEpoch { epoch } | Command::Activate { epoch } => [epoch, 0, 0],
            Command::ReadVcpu { vcpu, dest } => [vcpu as u64, dest.offset, dest.len],
            Command::LogDirtyDisable | Command::EndEpoch | Command::Resume | Command::Detach => {
                [0; 3]
            }
        };
        CommandEntry {
            op: self.opcode(),
            id,
            args,
            reserved: [0; 4],
        }
    }
}

impl CommandEntry {
    /// Decode (the id is `self.id` either way, to answer errors).
    pub fn decode(&self) -> Result<Command, DecodeError> {
        if self.reserved != [0; 4] {
            return Err(DecodeError::ReservedNonZero("reserved"));
        }
        let a = &self.args;
        let cmd = match self.op {
            op::LOG_DIRTY_ENABLE => {
                check_unused(a, 1, &ARGS)?;
                let mode = u32::try_from(a[0])
                    .ok()
                    .and_then(LogDirtyMode::from_u32)
                    .ok_or(DecodeError::OutOfRange("mode"))?;
                Command::LogDirtyEnable { mode }
            }
            op::LOG_DIRTY_DISABLE => {
                check_unused(a, 0, &ARGS)?;
                Command::LogDirtyDisable
            }
            op::LOG_DIRTY_PEEK => Command::LogDirtyPeek(bitmap_dest(a)?),
            op::LOG_DIRTY_CLEAN => Command::LogDirtyClean(bitmap_dest(a)?),
            op::END_EPOCH => {
                check_unused(a, 0, &ARGS)?;
                Command::EndEpoch
            }
            op::RESUME => {
                check_unused(a, 0, &ARGS)?;
                Command::Resume
            }
            op::COMMIT_EPOCH => {
                check_unused(a, 1, &ARGS)?;
                Command::CommitEpoch {
                    epoch: epoch_arg(a[0])?,
                }
            }
            op::ACTIVATE => {
                check_unused(a, 1, &ARGS)?;
                Command::Activate {
                    epoch: epoch_arg(a[0])?,
                }
            }
            op::READ_VCPU => {
                let vcpu = u32::try_from(a[0]).map_err(|_| DecodeError::OutOfRange("vcpu"))?;
                let dest = Span {
                    offset: a[1],
                    len: a[2],
                };
                if !dest.offset.is_multiple_of(8) || dest.end().is_none() {
                    return Err(DecodeError::OutOfRange("dest"));
                }
                if dest.len < size_of::<crate::hvm::HvmHwCpu>() as u64 {
                    return Err(DecodeError::OutOfRange("dest len"));
                }
                Command::ReadVcpu { vcpu, dest }
            }
            op::DETACH => {
                check_unused(a, 0, &ARGS)?;
                Command::Detach
            }
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        Ok(cmd)
    }
}

/// Log-dirty statistics (Xen's `xen_domctl_shadow_op_stats`, widened).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogDirtyStats {
    /// Pages marked dirty since the last CLEAN.
    pub dirty_count: u64,
    /// Write faults taken since the last CLEAN.
    pub fault_count: u64,
    /// Pfns covered by the bitmap written.
    pub pages: u64,
}

/// What a successful command returns; which variant follows from the opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Enable, disable, resume, commit, activate, detach.
    Done,
    /// PEEK and CLEAN.
    Stats(LogDirtyStats),
    /// END_EPOCH: the epoch just closed.
    Epoch(u64),
    /// READ_VCPU: bytes written.
    Length(u64),
}

/// A decoded response: the request id and opcode it answers, and either
/// the reply or the errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: u32,
    pub op: u32,
    pub result: Result<Reply, Errno>,
}

layout_struct! {
    /// A command ring response as it sits in the ring.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ResponseEntry {
        /// Opcode of the request answered.
        pub op: u32,
        /// Id of the request answered.
        pub id: u32,
        /// 0, or a negative errno.
        pub status: i32,
        /// Must be zero.
        pub reserved0: u32,
        /// Reply values (all zero on error and for [`Reply::Done`]).
        pub vals: [u64; 3],
        /// Must be zero.
        pub reserved: [u64; 3],
    }
}

const _: () = assert!(size_of::<ResponseEntry>() == 64);
const _: () = assert!(offset_of!(ResponseEntry, status) == 8);
const _: () = assert!(offset_of!(ResponseEntry, vals) == 16);
const _: () = assert!(offset_of!(ResponseEntry, reserved) == 40);

impl Response {
    /// The ring entry for this response.
    pub fn encode(&self) -> ResponseEntry {
        let (status, vals) = match self.result {
            Err(e) => (e.to_wire(), [0; 3]),
            Ok(Reply::Done) => (0, [0; 3]),
            Ok(Reply::Stats(s)) => (0, [s.dirty_count, s.fault_count, s.pages]),
            Ok(Reply::Epoch(e)) => (0, [e, 0, 0]),
            Ok(Reply::Length(l)) => (0, [l, 0, 0]),
        };
        ResponseEntry {
            op: self.op,
            id: self.id,
            status,
            reserved0: 0,
            vals,
            reserved: [0; 3],
        }
    }

    /// The error response to a request that failed to decode or execute.
    pub fn error(req: &CommandEntry, e: Errno) -> Self {
        Response {
            id: req.id,
            op: req.op,
            result: Err(e),
        }
    }
}

impl ResponseEntry {
    /// Decode; the reply shape follows from the echoed opcode.
    pub fn decode(&self) -> Result<Response, DecodeError> {
        if self.reserved0 != 0 {
            return Err(DecodeError::ReservedNonZero("reserved0"));
        }
        if self.reserved != [0; 3] {
            return Err(DecodeError::ReservedNonZero("reserved"));
        }
        let errno = Errno::from_wire(self.status).map_err(|_| DecodeError::OutOfRange("status"))?;
        let v = &self.vals;
        let known = matches!(self.op, op::LOG_DIRTY_ENABLE..=op::DETACH);
        if !known {
            return Err(DecodeError::UnknownOpcode(self.op));
        }
        let result = match errno {
            Some(e) => {
                check_unused(v, 0, &VALS)?;
                Err(e)
            }
            None => Ok(match self.op {
                op::LOG_DIRTY_PEEK | op::LOG_DIRTY_CLEAN => Reply::Stats(LogDirtyStats {
                    dirty_count: v[0],
                    fault_count: v[1],
                    pages: v[2],
                }),
                op::END_EPOCH => {
                    check_unused(v, 1, &VALS)?;
                    Reply::Epoch(v[0])
                }
                op::READ_VCPU => {
                    check_unused(v, 1, &VALS)?;
                    Reply::Length(v[0])
                }
                _ => {
                    check_unused(v, 0, &VALS)?;
                    Reply::Done
                }
            }),
        };
        Ok(Response {
            id: self.id,
            op: self.op,
            result,
        })
    }
}

/// Event kinds.
pub mod kind {
    pub const CHECKPOINT_READY: u32 = 1;
    pub const OUTPUT_AVAILABLE: u32 = 2;
    pub const ERROR: u32 = 3;
}

/// A checkpoint is staged: where its parts are in the control area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointReady {
    pub epoch: u64,
    /// Pages dirtied in the epoch (and staged).
    pub dirty_count: u64,
    /// `dirty_count` little-endian `u64` pfns, in the pfn list area.
    pub pfn_list: Span,
    /// `dirty_count` 4096-byte pages in pfn list order, in the staging area.
    pub pages: Span,
    /// The HVM context blob (descriptors + records), in the vCPU area.
    pub vcpu: Span,
}

/// A decoded event (hypervisor -> tool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    CheckpointReady(CheckpointReady),
    /// `bytes` of output produced in `epoch` are in the output channel.
    OutputAvailable {
        epoch: u64,
        bytes: u64,
    },
    /// Something failed outside a command's answer (`op` is the command
    /// involved, or 0).
    Error {
        epoch: u64,
        op: u32,
        errno: Errno,
    },
}

layout_struct! {
    /// An event ring request as it sits in the ring.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct EventEntry {
        /// One of [`kind`].
        pub kind: u32,
        /// Sequence number, echoed in the ack.
        pub seq: u32,
        pub epoch: u64,
        /// CheckpointReady: dirty count; OutputAvailable: bytes.
        pub value: u64,
        pub pfn_list: Span,
        pub pages: Span,
        pub vcpu: Span,
        /// Error: negative errno; else 0.
        pub status: i32,
        /// Error: the command involved; else 0.
        pub op: u32,
        /// Must be zero.
        pub reserved: [u64; 6],
    }
}

const _: () = assert!(size_of::<EventEntry>() == 128);
const _: () = assert!(offset_of!(EventEntry, epoch) == 8);
const _: () = assert!(offset_of!(EventEntry, value) == 16);
const _: () = assert!(offset_of!(EventEntry, pfn_list) == 24);
const _: () = assert!(offset_of!(EventEntry, pages) == 40);
const _: () = assert!(offset_of!(EventEntry, vcpu) == 56);
const _: () = assert!(offset_of!(EventEntry, status) == 72);
const _: () = assert!(offset_of!(EventEntry, op) == 76);
const _: () = assert!(offset_of!(EventEntry, reserved) == 80);

/// Size of a staged page.
pub const PAGE_SIZE: u64 = 4096;

impl Event {
    /// The ring entry for this event with sequence number `seq`.
    pub fn encode(&self, seq: u32) -> EventEntry {
        let mut e = EventEntry {
            seq,
            ..EventEntry::default()
        };
        match *self {
            Event::CheckpointReady(c) => {
                e.kind = kind::CHECKPOINT_READY;
                e.epoch = c.epoch;
                e.value = c.dirty_count;
                e.pfn_list = c.pfn_list;
                e.pages = c.pages;
                e.vcpu = c.vcpu;
            }
            Event::OutputAvailable { epoch, bytes } => {
                e.kind = kind::OUTPUT_AVAILABLE;
                e.epoch = epoch;
                e.value = bytes;
            }
            Event::Error { epoch, op, errno } => {
                e.kind = kind::ERROR;
                e.epoch = epoch;
                e.op = op;
                e.status = errno.to_wire();
            }
        }
        e
    }
}

impl EventEntry {
    /// Decode, checking that the spans agree with the dirty count. Whether
    /// the spans lie in their regions is checked against the control view
    /// (`ControlView::check_checkpoint`).
    pub fn decode(&self) -> Result<Event, DecodeError> {
        if self.reserved != [0; 6] {
            return Err(DecodeError::ReservedNonZero("reserved"));
        }
        let no_spans =
            self.pfn_list == Span::EMPTY && self.pages == Span::EMPTY && self.vcpu == Span::EMPTY;
        match self.kind {
            kind::CHECKPOINT_READY => {
                if self.status != 0 {
                    return Err(DecodeError::ReservedNonZero("status"));
                }
                if self.op != 0 {
                    return Err(DecodeError::ReservedNonZero("op"));
                }
                let n = self.value;
                for (name, s) in [
                    ("pfn_list", self.pfn_list),
                    ("pages", self.pages),
                    ("vcpu", self.vcpu),
                ] {
                    if s.end().is_none() || !s.offset.is_multiple_of(8) {
                        return Err(DecodeError::OutOfRange(name));
                    }
                }
                if n.checked_mul(8) != Some(self.pfn_list.len) {
                    return Err(DecodeError::OutOfRange("pfn_list len"));
                }
                if n.checked_mul(PAGE_SIZE) != Some(self.pages.len) {
                    return Err(DecodeError::OutOfRange("pages len"));
                }
                if !self.pages.offset.is_multiple_of(PAGE_SIZE) {
                    return Err(DecodeError::OutOfRange("pages offset"));
                }
                if self.vcpu.len == 0 {
                    return Err(DecodeError::OutOfRange("vcpu len"));
                }
                Ok(Event::CheckpointReady(CheckpointReady {
                    epoch: self.epoch,
                    dirty_count: n,
                    pfn_list: self.pfn_list,
                    pages: self.pages,
                    vcpu: self.vcpu,
                }))
            }
            kind::OUTPUT_AVAILABLE => {
                if !no_spans {
                    return Err(DecodeError::ReservedNonZero("spans"));
                }
                if self.status != 0 {
                    return Err(DecodeError::ReservedNonZero("status"));
                }
                if self.op != 0 {
                    return Err(DecodeError::ReservedNonZero("op"));
                }
                Ok(Event::OutputAvailable {
                    epoch: self.epoch,
                    bytes: self.value,
                })
            }
            kind::ERROR => {
                if !no_spans {
                    return Err(DecodeError::ReservedNonZero("spans"));
                }
                if self.value != 0 {
                    return Err(DecodeError::ReservedNonZero("value"));
                }
                let errno = match Errno::from_wire(self.status) {
                    Ok(Some(e)) => e,
                    _ => return Err(DecodeError::OutOfRange("status")),
                };
                Ok(Event::Error {
                    epoch: self.epoch,
                    op: self.op,
                    errno,
                })
            }
            other => Err(DecodeError::UnknownOpcode(other)),
        }
    }
}

layout_struct! {
    /// The tool's answer to an event (the event ring's response).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct EventAck {
        /// Kind of the event acknowledged.
        pub kind: u32,
        /// Sequence number of the event acknowledged.
        pub seq: u32,
        /// 0: handled; negative errno: the tool rejected the event.
        pub status: i32,
        /// Must be zero.
        pub reserved0: u32,
        /// Epoch of the event acknowledged.
        pub epoch: u64,
        /// Must be zero.
        pub reserved: [u64; 5],
    }
}

const _: () = assert!(size_of::<EventAck>() == 64);
const _: () = assert!(offset_of!(EventAck, status) == 8);
const _: () = assert!(offset_of!(EventAck, epoch) == 16);

/// A decoded event acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub kind: u32,
    pub seq: u32,
    pub epoch: u64,
    pub result: Result<(), Errno>,
}

impl Ack {
    /// The ring entry for this ack.
    pub fn encode(&self) -> EventAck {
        EventAck {
            kind: self.kind,
            seq: self.seq,
            status: match self.result {
                Ok(()) => 0,
                Err(e) => e.to_wire(),
            },
            reserved0: 0,
            epoch: self.epoch,
            reserved: [0; 5],
        }
    }
}

impl EventAck {
    /// Decode.
    pub fn decode(&self) -> Result<Ack, DecodeError> {
        if self.reserved0 != 0 {
            return Err(DecodeError::ReservedNonZero("reserved0"));
        }
        if self.reserved != [0; 5] {
            return Err(DecodeError::ReservedNonZero("reserved"));
        }
        if !matches!(self.kind, kind::CHECKPOINT_READY..=kind::ERROR) {
            return Err(DecodeError::UnknownOpcode(self.kind));
        }
        let result = match Errno::from_wire(self.status) {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(()) => return Err(DecodeError::OutOfRange("status")),
        };
        Ok(Ack {
            kind: self.kind,
            seq: self.seq,
            epoch: self.epoch,
            result,
        })
    }
}
