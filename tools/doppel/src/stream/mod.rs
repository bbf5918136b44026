//! The Xen libxc migration stream, version 3: layouts, writer, validating
//! reader. See docs/STREAM.md for the exact rules the reader enforces.

pub mod devices;
pub mod error;
pub mod format;
pub mod pages;
pub mod reader;
pub mod records;
pub mod writer;
pub mod xlz4;

pub use devices::DiskWrite;
pub use error::{RecCtx, StreamError};
pub use format::{MAX_BATCH_PFNS, MAX_RECORD_BODY, PAGE_SIZE};
pub use reader::{Limits, StreamInfo, StreamReader};
pub use records::{HvmParam, PageData, PageEntry, Record, TscInfo};
pub use writer::{OutPage, StreamWriter};
pub use xlz4::XorCache;
