//! Wire layouts of the libxc migration stream (version 3) and of the libxl
//! wrapper framing used by the back channel.
//!
//! Facts from Xen's docs/specs/libxc-migration-stream.pandoc and
//! libxl-migration-stream.pandoc. The image and libxl headers are big
//! endian; everything else is little endian. All layouts use zerocopy's
//! byte-order types, so they have alignment 1 and parse from any offset.

use zerocopy::byteorder::{BigEndian, LittleEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

type Be16 = U16<BigEndian>;
type Be32 = U32<BigEndian>;
type Be64 = U64<BigEndian>;
type Le16 = U16<LittleEndian>;
type Le32 = U32<LittleEndian>;
type Le64 = U64<LittleEndian>;

/// Size of one guest page (page_shift 12).
pub const PAGE_SIZE: usize = 4096;
/// The only page shift an x86 stream may carry.
pub const PAGE_SHIFT: u16 = 12;
/// Largest record body a receiver accepts (Xen's REC_LENGTH limit).
pub const MAX_RECORD_BODY: u32 = 128 << 20;
/// Most pfns Xen's sender (and ours) puts in one PAGE_DATA record; the
/// receiver enforces it too.
pub const MAX_BATCH_PFNS: u32 = 1024;

/// Image header marker: all ones.
pub const IHDR_MARKER: u64 = u64::MAX;
/// Image header id: "XENF".
pub const IHDR_ID: u32 = 0x5845_4E46;
/// The stream version we write.
pub const IHDR_VERSION: u32 = 3;
/// Image header option bit 0: stream is big endian (refused).
pub const IHDR_OPT_BIG_ENDIAN: u16 = 1;

/// Xen version written in the domain header (the verifier's reference):
/// what the primary sends and the test-data generator imitates.
pub const XEN_MAJOR: u32 = 4;
pub const XEN_MINOR: u32 = 17;

/// Domain type x86 PV.
pub const DHDR_TYPE_X86_PV: u32 = 1;
/// Domain type x86 HVM (the only one Doppel replicates).
pub const DHDR_TYPE_X86_HVM: u32 = 2;

/// Record type bit 31: the record is optional and may be skipped.
pub const REC_TYPE_OPTIONAL: u32 = 0x8000_0000;

/// libxc record types Doppel knows.
pub mod rec {
    /// End of stream.
    pub const END: u32 = 0x0;
    /// Guest pages.
    pub const PAGE_DATA: u32 = 0x1;
    /// TSC mode and frequency.
    pub const X86_TSC_INFO: u32 = 0x8;
    /// Hypervisor HVM context blob (vCPU and platform state).
    pub const HVM_CONTEXT: u32 = 0x9;
    /// HVM parameters (index/value pairs).
    pub const HVM_PARAMS: u32 = 0xA;
    /// Debug VERIFY record (not supported by Doppel's receiver).
    pub const VERIFY: u32 = 0xD;
    /// End of one checkpoint epoch.
    pub const CHECKPOINT: u32 = 0xE;
    /// COLO back channel dirty pfn list (never in a forward stream).
    pub const CHECKPOINT_DIRTY_PFN_LIST: u32 = 0xF;
    /// End of the static (once per stream) data.
    pub const STATIC_DATA_END: u32 = 0x10;
    /// CPUID policy (static data).
    pub const X86_CPUID_POLICY: u32 = 0x11;
    /// MSR policy (static data).
    pub const X86_MSR_POLICY: u32 = 0x12;
    /// Doppel extension, optional: PAGE_DATA whose pages are XORed against
    /// the last version sent and lz4 compressed; refused unless negotiated
    /// (skipping it would lose pages; docs/STREAM.md).
    pub const DOPPEL_PAGE_DATA_XLZ4: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0002;
    /// Doppel extension, optional: the primary's feature request (u64
    /// feature bits, u64 reserved), only as the first record after the
    /// headers, only when the primary asks for a feature.
    pub const DOPPEL_HELLO: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0003;
    /// Doppel extension, optional: the primary is alive and its hypervisor
    /// makes progress (u64 epochs committed so far, u64 reserved); only at
    /// an epoch boundary, only on a live connection (never in a capture).
    pub const DOPPEL_HEARTBEAT: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0004;
    /// Doppel extension, optional: the primary's echo of the backup's
    /// session nonce (SESSION_NONCE_LEN bytes), only as the first record
    /// after the headers, only on a TLS link (never in a capture).
    pub const DOPPEL_SESSION: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0005;
    /// Doppel extension, optional: the device model's sealed state at the
    /// epoch's end (opaque here, 1..=MAX_DEVICE_STATE bytes), at most one
    /// per epoch, after the epoch's pages, before X86_TSC_INFO.
    pub const DOPPEL_DEVICE_STATE: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0006;
    /// Doppel extension, optional: disk writes the guest made in the epoch
    /// (count u32, reserved u32, then per write offset u64, length u32,
    /// reserved u32, data), any number per epoch, each body at most
    /// MAX_DISK_WRITES_BODY, after the epoch's pages, before X86_TSC_INFO.
    pub const DOPPEL_DISK_WRITES: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0007;
}

/// Largest DOPPEL_DEVICE_STATE body (the device model's blob is a few KiB).
pub const MAX_DEVICE_STATE: u32 = 64 << 10;
/// Largest DOPPEL_DISK_WRITES body; the writer splits larger lists.
pub const MAX_DISK_WRITES_BODY: u32 = 4 << 20;
/// Disk writes are in whole sectors: offset and length multiples of this.
pub const SECTOR_SIZE: u64 = 512;

/// DOPPEL_DISK_WRITES entry header (16 bytes); `length` data bytes follow
/// (a multiple of SECTOR_SIZE, so entries stay 8-byte aligned).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct DiskWriteRaw {
    pub offset: Le64,
    pub length: Le32,
    pub reserved: Le32,
}
const _: () = assert!(core::mem::size_of::<DiskWriteRaw>() == 16);
const _: () = assert!(core::mem::offset_of!(DiskWriteRaw, length) == 8);

/// Bytes of the session nonce (DOPPEL_SESSION, both directions).
pub const SESSION_NONCE_LEN: usize = 32;

/// Feature bits of DOPPEL_HELLO / DOPPEL_FEATURES.
pub mod feature {
    /// Compressed page records (DOPPEL_PAGE_DATA_XLZ4).
    pub const XLZ4: u64 = 1;
    /// Every feature this build knows.
    pub const KNOWN: u64 = XLZ4;
}

/// Human name of a libxc record type, for messages.
pub fn rec_name(t: u32) -> &'static str {
    match t {
        rec::END => "END",
        rec::PAGE_DATA => "PAGE_DATA",
        0x2 => "X86_PV_INFO",
        0x3 => "X86_PV_P2M_FRAMES",
        0x4 => "X86_PV_VCPU_BASIC",
        0x5 => "X86_PV_VCPU_EXTENDED",
        0x6 => "X86_PV_VCPU_XSAVE",
        0x7 => "SHARED_INFO",
        rec::X86_TSC_INFO => "X86_TSC_INFO",
        rec::HVM_CONTEXT => "HVM_CONTEXT",
        rec::HVM_PARAMS => "HVM_PARAMS",
        0xB => "TOOLSTACK",
        0xC => "X86_PV_VCPU_MSRS",
        rec::VERIFY => "VERIFY",
        rec::CHECKPOINT => "CHECKPOINT",
        rec::CHECKPOINT_DIRTY_PFN_LIST => "CHECKPOINT_DIRTY_PFN_LIST",
        rec::STATIC_DATA_END => "STATIC_DATA_END",
        rec::X86_CPUID_POLICY => "X86_CPUID_POLICY",
        rec::X86_MSR_POLICY => "X86_MSR_POLICY",
        rec::DOPPEL_PAGE_DATA_XLZ4 => "DOPPEL_PAGE_DATA_XLZ4",
        rec::DOPPEL_HELLO => "DOPPEL_HELLO",
        rec::DOPPEL_HEARTBEAT => "DOPPEL_HEARTBEAT",
        rec::DOPPEL_SESSION => "DOPPEL_SESSION",
        rec::DOPPEL_DEVICE_STATE => "DOPPEL_DEVICE_STATE",
        rec::DOPPEL_DISK_WRITES => "DOPPEL_DISK_WRITES",
        t if t & REC_TYPE_OPTIONAL != 0 => "unknown optional record",
        _ => "unknown record",
    }
}

/// The libxc image header (24 bytes, big endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct ImageHeader {
    pub marker: Be64,
    pub id: Be32,
    pub version: Be32,
    pub options: Be16,
    pub reserved: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<ImageHeader>() == 24);
const _: () = assert!(core::mem::offset_of!(ImageHeader, id) == 8);
const _: () = assert!(core::mem::offset_of!(ImageHeader, version) == 12);
const _: () = assert!(core::mem::offset_of!(ImageHeader, options) == 16);
const _: () = assert!(core::mem::offset_of!(ImageHeader, reserved) == 18);

impl ImageHeader {
    /// The header Doppel writes: version 3, little endian, no options.
    pub fn doppel() -> Self {
        Self {
            marker: IHDR_MARKER.into(),
            id: IHDR_ID.into(),
            version: IHDR_VERSION.into(),
            options: 0.into(),
            reserved: [0; 6],
        }
    }
}

/// The libxc domain header (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct DomainHeader {
    pub domain_type: Le32,
    pub page_shift: Le16,
    pub reserved: Le16,
    pub xen_major: Le32,
    pub xen_minor: Le32,
}
const _: () = assert!(core::mem::size_of::<DomainHeader>() == 16);
const _: () = assert!(core::mem::offset_of!(DomainHeader, page_shift) == 4);
const _: () = assert!(core::mem::offset_of!(DomainHeader, xen_major) == 8);
const _: () = assert!(core::mem::offset_of!(DomainHeader, xen_minor) == 12);

/// Record header: type and body length (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RecordHeader {
    pub rtype: Le32,
    pub length: Le32,
}
const _: () = assert!(core::mem::size_of::<RecordHeader>() == 8);

/// PAGE_DATA (and HVM_PARAMS) body prefix: count and reserved (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct CountHeader {
    pub count: Le32,
    pub reserved: Le32,
}
const _: () = assert!(core::mem::size_of::<CountHeader>() == 8);

/// X86_TSC_INFO body (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct TscInfoRaw {
    pub mode: Le32,
    pub khz: Le32,
    pub nsec: Le64,
    pub incarnation: Le32,
    pub reserved: Le32,
}
const _: () = assert!(core::mem::size_of::<TscInfoRaw>() == 24);
const _: () = assert!(core::mem::offset_of!(TscInfoRaw, nsec) == 8);
const _: () = assert!(core::mem::offset_of!(TscInfoRaw, incarnation) == 16);

/// One HVM_PARAMS entry (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct HvmParamRaw {
    pub index: Le64,
    pub value: Le64,
}
const _: () = assert!(core::mem::size_of::<HvmParamRaw>() == 16);

/// PAGE_DATA pfn word: bits 0-51 pfn.
pub const PFN_MASK: u64 = (1 << 52) - 1;
/// PAGE_DATA pfn word: bits 52-59 reserved.
pub const PFN_RESERVED_MASK: u64 = 0xFF << 52;
/// PAGE_DATA pfn word: type in bits 60-63.
pub const PFN_TYPE_SHIFT: u32 = 60;
/// Page type 0: a normal page, 4096 bytes of data follow.
pub const PAGE_TYPE_NORMAL: u8 = 0x0;
/// Page type 0xF (XTAB): invalid / not populated, no data.
pub const PAGE_TYPE_INVALID: u8 = 0xF;

/// The libxl header (16 bytes, big endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct LibxlHeader {
    pub ident: Be64,
    pub version: Be32,
    pub options: Be32,
}
const _: () = assert!(core::mem::size_of::<LibxlHeader>() == 16);

/// libxl header ident "LibxlFmt".
pub const LIBXL_IDENT: u64 = 0x4C69_6278_6C46_6D74;
/// libxl stream version.
pub const LIBXL_VERSION: u32 = 2;
/// libxl option bit 0: big endian (refused).
pub const LIBXL_OPT_BIG_ENDIAN: u32 = 1;
/// libxl option bit 1: legacy-converted stream (refused on a back channel).
pub const LIBXL_OPT_LEGACY: u32 = 2;

/// libxl record types used on the back channel.
pub mod libxl_rec {
    /// End of the back channel.
    pub const END: u32 = 0x0;
    /// Checkpoint state: u32 control id.
    pub const CHECKPOINT_STATE: u32 = 0x5;
    /// Doppel extension, optional: epoch acknowledgement (u64 epoch, u64
    /// reserved); always followed by CHECKPOINT_STATE(SVM_READY).
    pub const DOPPEL_EPOCH_ACK: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0001;
    /// Doppel extension, optional: the backup's answer to DOPPEL_HELLO (u64
    /// accepted feature bits, u64 reserved), only as the first record.
    pub const DOPPEL_FEATURES: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0002;
    /// Doppel extension, optional: the backup's fresh session nonce
    /// (SESSION_NONCE_LEN bytes), only as the first record, only on a TLS
    /// link; the primary echoes it in its stream's DOPPEL_SESSION.
    pub const DOPPEL_SESSION: u32 = super::REC_TYPE_OPTIONAL | 0xD0_0003;
}

/// CHECKPOINT_STATE control ids.
pub mod control {
    pub const NEW: u32 = 0;
    pub const SVM_SUSPENDED: u32 = 1;
    pub const SVM_READY: u32 = 2;
    pub const SVM_RESUMED: u32 = 3;
}

/// Human name of a libxl record type, for messages.
pub fn libxl_rec_name(t: u32) -> &'static str {
    match t {
        libxl_rec::END => "END",
        0x1 => "LIBXC_CONTEXT",
        0x2 => "EMULATOR_XENSTORE_DATA",
        0x3 => "EMULATOR_CONTEXT",
        0x4 => "CHECKPOINT_END",
        libxl_rec::CHECKPOINT_STATE => "CHECKPOINT_STATE",
        libxl_rec::DOPPEL_EPOCH_ACK => "DOPPEL_EPOCH_ACK",
        libxl_rec::DOPPEL_FEATURES => "DOPPEL_FEATURES",
        libxl_rec::DOPPEL_SESSION => "DOPPEL_SESSION",
        t if t & REC_TYPE_OPTIONAL != 0 => "unknown optional record",
        _ => "unknown record",
    }
}

/// Round a body length up to the 8-byte record alignment.
pub const fn padded(len: usize) -> usize {
    (len + 7) & !7
}
