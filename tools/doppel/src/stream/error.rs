//! Errors of the stream decoder and validator.

use std::fmt;
use std::io;

use super::format::{libxl_rec_name, rec_name};

/// Where in the stream a record sits, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecCtx {
    /// Record number, counting from 0 after the headers.
    pub index: u64,
    /// Record type as read.
    pub rtype: u32,
    /// Byte offset of the record header in the stream.
    pub offset: u64,
    /// A libxl (back channel) record rather than a libxc one.
    pub libxl: bool,
}

impl fmt::Display for RecCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "record #{} {} (type {:#x}) at byte {}",
            self.index,
            if self.libxl {
                libxl_rec_name(self.rtype)
            } else {
                rec_name(self.rtype)
            },
            self.rtype,
            self.offset
        )
    }
}

/// Everything that makes a stream (or back channel) invalid.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream truncated in {what} at byte {offset}")]
    Truncated { what: &'static str, offset: u64 },
    #[error("I/O error reading {what} at byte {offset}: {source}")]
    Io {
        what: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("image header: marker is {0:#018x}, expected all ones")]
    BadMarker(u64),
    #[error("image header: id is {0:#010x}, expected 0x58454e46 (\"XENF\")")]
    BadImageId(u32),
    #[error("image header: version {0} is not supported (2 or 3)")]
    UnsupportedVersion(u32),
    #[error("image header: options bit 0 set: big-endian streams are refused")]
    BigEndian,
    #[error("image header: reserved option bits set: {0:#06x}")]
    ImageOptionsReserved(u16),
    #[error("image header: reserved bytes are not zero: {0:02x?}")]
    ImageHeaderReserved([u8; 6]),
    #[error("domain header: type {0} is not x86 HVM (2)")]
    DomainType(u32),
    #[error("domain header: page_shift {0}, expected 12")]
    PageShift(u16),
    #[error("domain header: reserved field is {0:#06x}, expected 0")]
    DomainHeaderReserved(u16),
    #[error("{rec}: body length {length} exceeds the limit of {max} bytes")]
    RecordTooLong { rec: RecCtx, length: u32, max: u32 },
    #[error("{rec}: padding byte {at} is {value:#04x}, expected 0")]
    NonZeroPadding { rec: RecCtx, at: usize, value: u8 },
    #[error("{rec}: unknown mandatory record type")]
    UnknownMandatory { rec: RecCtx },
    #[error("{rec}: record type is not supported in a Doppel HVM stream")]
    Unsupported { rec: RecCtx },
    #[error("{rec}: body is {length} bytes, expected {expected}")]
    BadLength {
        rec: RecCtx,
        length: u64,
        expected: String,
    },
    #[error("{rec}: reserved field {field} is {value:#x}, expected 0")]
    Reserved {
        rec: RecCtx,
        field: &'static str,
        value: u64,
    },
    #[error("{rec}: count {count} out of range 1..={max}")]
    BadCount { rec: RecCtx, count: u32, max: u32 },
    #[error("{rec}: pfn[{entry}] = {pfn:#x} is beyond the guest ({limit} pages)")]
    PfnOutOfRange {
        rec: RecCtx,
        entry: usize,
        pfn: u64,
        limit: u64,
    },
    #[error("{rec}: pfn[{entry}] has page type {ptype:#x}; only 0 (normal) and 0xf (invalid) are accepted")]
    PageType {
        rec: RecCtx,
        entry: usize,
        ptype: u8,
    },
    #[error("{rec}: out of order, expected {expected}")]
    OutOfOrder { rec: RecCtx, expected: &'static str },
    #[error("{rec}: record not allowed in a version {version} stream")]
    WrongVersion { rec: RecCtx, version: u32 },
    #[error("{0} bytes of trailing data after END")]
    TrailingData(u64),
    #[error("record read after END")]
    AfterEnd,
    #[error("libxl header: ident {0:#018x}, expected 0x4c6962786c466d74 (\"LibxlFmt\")")]
    BadLibxlIdent(u64),
    #[error("libxl header: version {0}, expected 2")]
    BadLibxlVersion(u32),
    #[error("libxl header: options {0:#x} not accepted (big endian / legacy / reserved)")]
    LibxlOptions(u32),
    #[error("{rec}: checkpoint state control id {id} is not known")]
    BadControlId { rec: RecCtx, id: u32 },
    #[error("{rec}: compressed pages do not decode: {msg}")]
    BadCompressed { rec: RecCtx, msg: String },
    #[error("{rec}: {msg}")]
    BadAck { rec: RecCtx, msg: String },
    #[error("{rec}: disk write [{entry}]: {msg}")]
    BadDiskWrite {
        rec: RecCtx,
        entry: usize,
        msg: String,
    },
}

impl StreamError {
    /// Turn a read failure into Truncated (EOF) or Io.
    pub(crate) fn from_io(e: io::Error, what: &'static str, offset: u64) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StreamError::Truncated { what, offset }
        } else {
            StreamError::Io {
                what,
                offset,
                source: e,
            }
        }
    }

    /// Whether the stream simply ended early (as opposed to lying).
    pub fn is_truncation(&self) -> bool {
        matches!(self, StreamError::Truncated { .. })
    }
}
