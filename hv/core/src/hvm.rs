//! Codec between a vendor-neutral vCPU state ([`VcpuState`]) and Xen's HVM
//! context blob (the body of the HVM_CONTEXT record).
//!
//! The hypervisor encodes the vCPUs of a checkpoint with [`encode`]; the
//! dom0 tool forwards the blob as HVM_CONTEXT and, on the backup, turns it
//! back into vCPU states with [`decode`] / [`decode_visit`].
//!
//! # Blob layout
//!
//! `[descriptor][payload]...` with no padding (layouts in
//! [`doppel_abi::hvm`]): HEADER (typecode 1, instance 0, 24 bytes), one CPU
//! record (typecode 2, instance = vCPU id, 1032 bytes) per vCPU, END
//! (0/0/0). [`encode`] writes exactly that.
//!
//! # What [`decode`] accepts
//!
//! Xen's own loader (`hvm_load` in `xen/common/hvm/save.c`) reads the HEADER
//! first, then dispatches every record to the handler of its typecode and
//! *fails* on a typecode above `HVM_SAVE_CODE_MAX` (20) or one without a
//! handler; it stops at the first END. We are stricter and check:
//!
//! - HEADER first, instance 0, length exactly 24, magic
//!   [`HVM_FILE_MAGIC`], version [`HVM_FILE_VERSION`];
//! - records in strictly ascending (typecode, instance) order, so per-vCPU
//!   ids are unique and ascending and no type repeats out of place;
//! - CPU records exactly 1032 bytes (Xen also accepts shorter ones from old
//!   versions and zero-extends them; we never produce those);
//! - other typecodes Xen defines (3..=20: PIC, LAPIC, MTRR, CPU_XSAVE,
//!   CPU_MSR, ...) are skipped by their length, so a blob saved by a real
//!   Xen still yields its vCPUs; typecodes above 20 are rejected, as Xen does;
//! - END last, instance 0, length 0, and nothing after it (Xen ignores
//!   trailing bytes; for us they mean a framing error upstream);
//! - at least one CPU record;
//! - in each CPU record, the fields Xen itself rejects (`flags` beyond
//!   bit 0, `pad0` non-zero, `msr_tsc_aux` above 32 bits) and the ones the
//!   typed state cannot hold (selectors and descriptor-table limits above
//!   16 bits, attributes above 12 bits, reserved bits of `pending_event`,
//!   an error code without its flag). `msr_flags` is obsolete and ignored
//!   (Xen ignores it too); [`encode`] writes 0.
//!
//! Every failure is its own [`HvmError`] variant. Nothing here indexes or
//! unwraps input: all reads go through `get` and checked arithmetic.
//!
//! # Segment attributes
//!
//! `hvm_hw_cpu.*_arbytes` hold Xen's `struct segment_register` attribute
//! word, a 12-bit packed form (see [`SegAttr`]): bits 0-3 type, 4 S,
//! 5-6 DPL, 7 P, 8 AVL, 9 L, 10 D/B, 11 G. It is exactly the layout of
//! the SVM VMCB segment `attrib` field, so an SVM backend converts with a
//! 12-bit mask ([`SegAttr::from_svm`], [`SegAttr::to_svm`]). VMX access
//! rights keep AVL/L/D/G in bits 12-15 and mark an unusable segment with
//! bit 16; Xen folds them as bits 12-15 -> 8-11 and P := !unusable
//! (`vmx_get_segment_register`), and unfolds the same way
//! ([`SegAttr::from_vmx_ar`], [`SegAttr::to_vmx_ar`]). (Xen before 3.2
//! stored raw VMX access rights here; today's Xen unfolds them on load, we
//! reject them as attributes above 12 bits.)
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use core::mem::size_of;

use doppel_abi::hvm::{
    code, HvmHwCpu, HvmSaveDescriptor, HvmSaveHeader, HVM_FILE_MAGIC, HVM_FILE_VERSION,
    XEN_X86_FPU_INITIALISED,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Bytes of a save descriptor.
pub const DESC_LEN: usize = size_of::<HvmSaveDescriptor>();
/// Bytes of the HEADER payload.
pub const HEADER_LEN: usize = size_of::<HvmSaveHeader>();
/// Bytes of a CPU payload.
pub const CPU_LEN: usize = size_of::<HvmHwCpu>();
/// Highest typecode Xen defines (`HVM_SAVE_CODE_MAX`).
pub const MAX_TYPECODE: u16 = 20;
/// Most vCPUs a blob can describe (instance ids are 16-bit).
pub const MAX_VCPUS: usize = 1 << 16;

/// Xen's packed 12-bit segment attribute word (`segment_register.attr`),
/// also the SVM VMCB `attrib` layout: bits 0-3 type, 4 S (code/data),
/// 5-6 DPL, 7 P, 8 AVL, 9 L, 10 D/B, 11 G. Bits 12-15 are always clear.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegAttr(u16);

impl SegAttr {
    /// Bits the packed form uses.
    pub const MASK: u16 = 0x0fff;
    /// The present bit.
    pub const P: u16 = 1 << 7;

    /// From Xen's packed form; `None` if a bit above 11 is set.
    pub const fn from_bits(bits: u16) -> Option<Self> {
        if bits & !Self::MASK == 0 {
            Some(Self(bits))
        } else {
            None
        }
    }

    /// Xen's packed form (the value of `*_arbytes`).
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// From an SVM VMCB `attrib` (same layout; bits 12-15 are reserved and
    /// dropped).
    pub const fn from_svm(attrib: u16) -> Self {
        Self(attrib & Self::MASK)
    }

    /// To an SVM VMCB `attrib`.
    pub const fn to_svm(self) -> u16 {
        self.0
    }

    /// From VMX guest-segment access rights: type/S/DPL kept (bits 0-6),
    /// AVL/L/D/G moved from bits 12-15 to 8-11, P set to the inverse of
    /// the unusable bit 16 (as Xen's `vmx_get_segment_register`). Reserved
    /// bits 8-11 and 17-31 are dropped.
    pub const fn from_vmx_ar(ar: u32) -> Self {
        let unusable = ar & (1 << 16) != 0;
        let p = if unusable { 0 } else { Self::P as u32 };
        Self(((ar & 0x7f) | p | ((ar >> 4) & 0xf00)) as u16)
    }

    /// To VMX access rights: bits 0-7 as is, 8-11 moved to 12-15, the
    /// unusable bit 16 set when P is clear.
    pub const fn to_vmx_ar(self) -> u32 {
        let a = self.0 as u32;
        let unusable = if a & Self::P as u32 == 0 { 1 << 16 } else { 0 };
        (a & 0xff) | ((a & 0xf00) << 4) | unusable
    }

    /// Segment type (bits 0-3).
    pub const fn seg_type(self) -> u8 {
        (self.0 & 0xf) as u8
    }
    /// Descriptor privilege level.
    pub const fn dpl(self) -> u8 {
        ((self.0 >> 5) & 3) as u8
    }
    /// Present.
    pub const fn present(self) -> bool {
        self.0 & Self::P != 0
    }
    /// 64-bit code segment (L).
    pub const fn long(self) -> bool {
        self.0 & (1 << 9) != 0
    }
    /// Default operation size 32 bits (D/B).
    pub const fn db(self) -> bool {
        self.0 & (1 << 10) != 0
    }
}

/// A segment register as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub attr: SegAttr,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescTable {
    pub base: u64,
    pub limit: u16,
}

/// An event (interrupt or exception) that was being delivered when the vCPU
/// stopped and must be re-injected. Xen's `pending_event`: vector in bits
/// 0-7, type in 8-10 (VMX interruption-information encoding), error code
/// valid in 11, valid in 31.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEvent {
    pub vector: u8,
    /// Event type, 0..=7 (0 external interrupt, 2 NMI, 3 hardware
    /// exception, 4 software interrupt, 5 privileged software exception,
    /// 6 software exception).
    pub kind: u8,
    pub error_code: Option<u32>,
}

use crate::hw::vmcs::{event_from_info, event_to_info, intr_info};

/// Xen's `pending_event` is VMX's interruption-information word: the bits
/// it may hold (vector, type, error code valid, valid).
const EV_KNOWN: u32 = intr_info::VALID | intr_info::ERROR_CODE | 0x7ff;

impl PendingEvent {
    /// Xen's (`pending_event`, `error_code`) pair.
    pub fn to_xen(ev: Option<Self>) -> Result<(u32, u32), HvmError> {
        let Some(e) = ev else { return Ok((0, 0)) };
        if e.kind > 7 {
            return Err(HvmError::BadEventKind(e.kind));
        }
        Ok(event_to_info(&e))
    }

    /// From Xen's pair. Not valid means both words are zero; a set
    /// reserved bit or an error code without its flag is an error.
    pub fn from_xen(word: u32, code: u32) -> Result<Option<Self>, HvmError> {
        if word & !EV_KNOWN != 0 || (word & intr_info::VALID == 0 && word != 0) {
            return Err(HvmError::PendingEventReserved(word));
        }
        if word & intr_info::ERROR_CODE == 0 && code != 0 {
            return Err(HvmError::StrayErrorCode(code));
        }
        Ok(event_from_info(word, code))
    }
}

/// Architectural state of one vCPU, independent of VMX/SVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuState {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// DR0-DR3.
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr: DescTable,
    pub idtr: DescTable,
    pub efer: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    /// IA32_KERNEL_GS_BASE (Xen's `shadow_gs`).
    pub kernel_gs_base: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    /// IA32_FMASK (Xen's `msr_syscall_mask`).
    pub sfmask: u64,
    pub tsc: u64,
    pub tsc_aux: u32,
    pub pending_event: Option<PendingEvent>,
    /// FXSAVE image.
    pub fpu: [u8; 512],
    /// The guest has used the FPU (`XEN_X86_FPU_INITIALISED`); when clear
    /// Xen's restore ignores [`Self::fpu`] and resets the FPU.
    pub fpu_initialised: bool,
}

impl Default for VcpuState {
    fn default() -> Self {
        Self {
            rax: 0,
            rbx: 0,
            rcx: 0,
            rdx: 0,
            rbp: 0,
            rsi: 0,
            rdi: 0,
            rsp: 0,
            r8: 0,
            r9: 0,
            r10: 0,
            r11: 0,
            r12: 0,
            r13: 0,
            r14: 0,
            r15: 0,
            rip: 0,
            rflags: 0,
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            dr: [0; 4],
            dr6: 0,
            dr7: 0,
            cs: Segment::default(),
            ds: Segment::default(),
            es: Segment::default(),
            fs: Segment::default(),
            gs: Segment::default(),
            ss: Segment::default(),
            tr: Segment::default(),
            ldtr: Segment::default(),
            gdtr: DescTable::default(),
            idtr: DescTable::default(),
            efer: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            kernel_gs_base: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            tsc: 0,
            tsc_aux: 0,
            pending_event: None,
            fpu: [0; 512],
            fpu_initialised: false,
        }
    }
}

/// Which segment register a per-segment error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegName {
    Cs,
    Ds,
    Es,
    Fs,
    Gs,
    Ss,
    Tr,
    Ldtr,
}

/// Which descriptor table register an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableName {
    Gdtr,
    Idtr,
}

/// HEADER fields other than magic and version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderInfo {
    /// CPUID.1:EAX of the saving machine.
    pub cpuid: u32,
    /// Guest TSC frequency in kHz (0: not fixed).
    pub gtsc_khz: u32,
    /// Xen changeset (informational).
    pub changeset: u64,
}

/// Why a blob could not be encoded or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HvmError {
    /// Encode: the output buffer holds `have` bytes, `need` are required.
    BufferTooSmall { need: usize, have: usize },
    /// No vCPU given (encode) or no CPU record found (decode).
    NoVcpus,
    /// Encode: more vCPUs than 16-bit instance ids can name.
    TooManyVcpus(usize),
    /// Decode: more CPU records than the caller's capacity.
    CapacityExceeded(usize),
    /// Encode: pending event type above 7.
    BadEventKind(u8),
    /// A descriptor starting at `offset` does not fit in the blob.
    TruncatedDescriptor { offset: usize },
    /// The payload of the record at `offset` runs past the end.
    TruncatedPayload { offset: usize, length: u32 },
    /// The blob ended at a record boundary without an END record.
    MissingEnd,
    /// The first record is not a HEADER (its typecode).
    HeaderNotFirst(u16),
    /// HEADER or END with a non-zero instance.
    BadInstance { typecode: u16, instance: u16 },
    /// HEADER or CPU record with a length other than its struct size.
    BadLength { typecode: u16, length: u32 },
    /// HEADER magic is not `HVM_FILE_MAGIC`.
    BadMagic(u32),
    /// HEADER version is not `HVM_FILE_VERSION`.
    BadVersion(u32),
    /// A record does not come strictly after the previous one in
    /// (typecode, instance) order (a second HEADER, a repeated or
    /// descending vCPU id, types out of order).
    OutOfOrder { typecode: u16, instance: u16 },
    /// A typecode above `HVM_SAVE_CODE_MAX`, which Xen rejects too.
    UnknownType(u16),
    /// END with a non-zero length.
    EndLength(u32),
    /// Bytes after END.
    TrailingBytes(usize),
    /// CPU `flags` with bits other than `XEN_X86_FPU_INITIALISED`.
    ReservedFlags(u32),
    /// CPU `pad0` not zero.
    NonZeroPad(u32),
    /// `msr_tsc_aux` above 32 bits.
    TscAuxRange(u64),
    /// A selector above 16 bits.
    SelectorRange { seg: SegName, value: u32 },
    /// Attributes above Xen's 12 bits.
    AttrRange { seg: SegName, value: u32 },
    /// GDTR/IDTR limit above 16 bits.
    TableLimitRange { table: TableName, value: u32 },
    /// `pending_event` with reserved bits, or non-zero while not valid.
    PendingEventReserved(u32),
    /// `error_code` non-zero without the error-code-valid bit.
    StrayErrorCode(u32),
    /// Machine records: a record the stream must hold is absent (its
    /// typecode).
    MissingRecord(u16),
    /// Machine records: a record appears more than once (its typecode).
    DuplicateRecord(u16),
    /// Machine records: a type Xen defines that the machine stream does
    /// not carry (PIC, PIT, HPET, ...).
    UnexpectedRecord(u16),
}

impl core::fmt::Display for HvmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = code::name;
        match *self {
            HvmError::MissingRecord(t) => {
                write!(f, "HVM context: no {} record (typecode {t})", name(t))
            }
            HvmError::DuplicateRecord(t) => {
                write!(f, "HVM context: {} record (typecode {t}) twice", name(t))
            }
            HvmError::UnexpectedRecord(t) => write!(
                f,
                "HVM context: unexpected {} record (typecode {t})",
                name(t)
            ),
            HvmError::UnknownType(t) => write!(f, "HVM context: unknown typecode {t}"),
            HvmError::BadLength { typecode, length } => write!(
                f,
                "HVM context: {} record (typecode {typecode}) of {length} bytes",
                name(typecode)
            ),
            HvmError::BadInstance { typecode, instance } => write!(
                f,
                "HVM context: {} record with instance {instance}",
                name(typecode)
            ),
            HvmError::OutOfOrder { typecode, instance } => write!(
                f,
                "HVM context: {} record (instance {instance}) out of order",
                name(typecode)
            ),
            other => write!(f, "HVM context: {other:?}"),
        }
    }
}

/// Bytes [`encode`] writes for `n_vcpus` vCPUs (`None` on overflow).
pub const fn encoded_len(n_vcpus: usize) -> Option<usize> {
    match n_vcpus.checked_mul(DESC_LEN + CPU_LEN) {
        Some(c) => c.checked_add(DESC_LEN + HEADER_LEN + DESC_LEN),
        None => None,
    }
}

fn put(out: &mut [u8], at: &mut usize, bytes: &[u8]) -> Result<(), HvmError> {
    let have = out.len();
    let end = at
        .checked_add(bytes.len())
        .ok_or(HvmError::BufferTooSmall {
            need: usize::MAX,
            have,
        })?;
    let dst = out
        .get_mut(*at..end)
        .ok_or(HvmError::BufferTooSmall { need: end, have })?;
    dst.copy_from_slice(bytes);
    *at = end;
    Ok(())
}

pub(crate) fn desc(typecode: u16, instance: u16, length: usize) -> HvmSaveDescriptor {
    HvmSaveDescriptor {
        typecode,
        instance,
        // Only called with the constant struct sizes (at most 1032) and 0.
        length: length as u32,
    }
}

fn seg_to_xen(s: &Segment) -> (u32, u32, u64, u32) {
    (
        u32::from(s.selector),
        s.limit,
        s.base,
        u32::from(s.attr.bits()),
    )
}

/// The `hvm_hw_cpu` record of one vCPU.
pub fn to_hw_cpu(v: &VcpuState) -> Result<HvmHwCpu, HvmError> {
    let (pending_event, error_code) = PendingEvent::to_xen(v.pending_event)?;
    let mut c = HvmHwCpu::new_zeroed();
    c.fpu_regs = v.fpu;
    c.rax = v.rax;
    c.rbx = v.rbx;
    c.rcx = v.rcx;
    c.rdx = v.rdx;
    c.rbp = v.rbp;
    c.rsi = v.rsi;
    c.rdi = v.rdi;
    c.rsp = v.rsp;
    c.r8 = v.r8;
    c.r9 = v.r9;
    c.r10 = v.r10;
    c.r11 = v.r11;
    c.r12 = v.r12;
    c.r13 = v.r13;
    c.r14 = v.r14;
    c.r15 = v.r15;
    c.rip = v.rip;
    c.rflags = v.rflags;
    c.cr0 = v.cr0;
    c.cr2 = v.cr2;
    c.cr3 = v.cr3;
    c.cr4 = v.cr4;
    [c.dr0, c.dr1, c.dr2, c.dr3] = v.dr;
    c.dr6 = v.dr6;
    c.dr7 = v.dr7;
    (c.cs_sel, c.cs_limit, c.cs_base, c.cs_arbytes) = seg_to_xen(&v.cs);
    (c.ds_sel, c.ds_limit, c.ds_base, c.ds_arbytes) = seg_to_xen(&v.ds);
    (c.es_sel, c.es_limit, c.es_base, c.es_arbytes) = seg_to_xen(&v.es);
    (c.fs_sel, c.fs_limit, c.fs_base, c.fs_arbytes) = seg_to_xen(&v.fs);
    (c.gs_sel, c.gs_limit, c.gs_base, c.gs_arbytes) = seg_to_xen(&v.gs);
    (c.ss_sel, c.ss_limit, c.ss_base, c.ss_arbytes) = seg_to_xen(&v.ss);
    (c.tr_sel, c.tr_limit, c.tr_base, c.tr_arbytes) = seg_to_xen(&v.tr);
    (c.ldtr_sel, c.ldtr_limit, c.ldtr_base, c.ldtr_arbytes) = seg_to_xen(&v.ldtr);
    c.idtr_limit = u32::from(v.idtr.limit);
    c.idtr_base = v.idtr.base;
    c.gdtr_limit = u32::from(v.gdtr.limit);
    c.gdtr_base = v.gdtr.base;
    c.sysenter_cs = v.sysenter_cs;
    c.sysenter_esp = v.sysenter_esp;
    c.sysenter_eip = v.sysenter_eip;
    c.shadow_gs = v.kernel_gs_base;
    c.msr_flags = 0;
    c.msr_lstar = v.lstar;
    c.msr_star = v.star;
    c.msr_cstar = v.cstar;
    c.msr_syscall_mask = v.sfmask;
    c.msr_efer = v.efer;
    c.msr_tsc_aux = u64::from(v.tsc_aux);
    c.tsc = v.tsc;
    c.pending_event = pending_event;
    c.error_code = error_code;
    c.flags = if v.fpu_initialised {
        XEN_X86_FPU_INITIALISED
    } else {
        0
    };
    c.pad0 = 0;
    Ok(c)
}

fn seg_from_xen(
    seg: SegName,
    sel: u32,
    limit: u32,
    base: u64,
    ar: u32,
) -> Result<Segment, HvmError> {
    let selector = u16::try_from(sel).map_err(|_| HvmError::SelectorRange { seg, value: sel })?;
    let attr = u16::try_from(ar)
        .ok()
        .and_then(SegAttr::from_bits)
        .ok_or(HvmError::AttrRange { seg, value: ar })?;
    Ok(Segment {
        selector,
        base,
        limit,
        attr,
    })
}

fn table_from_xen(table: TableName, limit: u32, base: u64) -> Result<DescTable, HvmError> {
    let limit = u16::try_from(limit).map_err(|_| HvmError::TableLimitRange {
        table,
        value: limit,
    })?;
    Ok(DescTable { base, limit })
}

/// The vCPU state in one `hvm_hw_cpu` record, validated.
pub fn from_hw_cpu(c: &HvmHwCpu) -> Result<VcpuState, HvmError> {
    if c.flags & !XEN_X86_FPU_INITIALISED != 0 {
        return Err(HvmError::ReservedFlags(c.flags));
    }
    if c.pad0 != 0 {
        return Err(HvmError::NonZeroPad(c.pad0));
    }
    let tsc_aux = u32::try_from(c.msr_tsc_aux).map_err(|_| HvmError::TscAuxRange(c.msr_tsc_aux))?;
    use SegName::*;
    Ok(VcpuState {
        rax: c.rax,
        rbx: c.rbx,
        rcx: c.rcx,
        rdx: c.rdx,
        rbp: c.rbp,
        rsi: c.rsi,
        rdi: c.rdi,
        rsp: c.rsp,
        r8: c.r8,
        r9: c.r9,
        r10: c.r10,
        r11: c.r11,
        r12: c.r12,
        r13: c.r13,
        r14: c.r14,
        r15: c.r15,
        rip: c.rip,
        rflags: c.rflags,
        cr0: c.cr0,
        cr2: c.cr2,
        cr3: c.cr3,
        cr4: c.cr4,
        dr: [c.dr0, c.dr1, c.dr2, c.dr3],
        dr6: c.dr6,
        dr7: c.dr7,
        cs: seg_from_xen(Cs, c.cs_sel, c.cs_limit, c.cs_base, c.cs_arbytes)?,
        ds: seg_from_xen(Ds, c.ds_sel, c.ds_limit, c.ds_base, c.ds_arbytes)?,
        es: seg_from_xen(Es, c.es_sel, c.es_limit, c.es_base, c.es_arbytes)?,
        fs: seg_from_xen(Fs, c.fs_sel, c.fs_limit, c.fs_base, c.fs_arbytes)?,
        gs: seg_from_xen(Gs, c.gs_sel, c.gs_limit, c.gs_base, c.gs_arbytes)?,
        ss: seg_from_xen(Ss, c.ss_sel, c.ss_limit, c.ss_base, c.ss_arbytes)?,
        tr: seg_from_xen(Tr, c.tr_sel, c.tr_limit, c.tr_base, c.tr_arbytes)?,
        ldtr: seg_from_xen(Ldtr, c.ldtr_sel, c.ldtr_limit, c.ldtr_base, c.ldtr_arbytes)?,
        gdtr: table_from_xen(TableName::Gdtr, c.gdtr_limit, c.gdtr_base)?,
        idtr: table_from_xen(TableName::Idtr, c.idtr_limit, c.idtr_base)?,
        efer: c.msr_efer,
        sysenter_cs: c.sysenter_cs,
        sysenter_esp: c.sysenter_esp,
        sysenter_eip: c.sysenter_eip,
        kernel_gs_base: c.shadow_gs,
        star: c.msr_star,
        lstar: c.msr_lstar,
        cstar: c.msr_cstar,
        sfmask: c.msr_syscall_mask,
        tsc: c.tsc,
        tsc_aux,
        pending_event: PendingEvent::from_xen(c.pending_event, c.error_code)?,
        fpu: c.fpu_regs,
        fpu_initialised: c.flags & XEN_X86_FPU_INITIALISED != 0,
    })
}

/// Write the HVM context blob of `vcpus` (vCPU id = index) into `out`;
/// returns the bytes written ([`encoded_len`]). On error `out` may hold a
/// partial blob.
pub fn encode(vcpus: &[VcpuState], header: HeaderInfo, out: &mut [u8]) -> Result<usize, HvmError> {
    if vcpus.is_empty() {
        return Err(HvmError::NoVcpus);
    }
    if vcpus.len() > MAX_VCPUS {
        return Err(HvmError::TooManyVcpus(vcpus.len()));
    }
    let need = encoded_len(vcpus.len()).ok_or(HvmError::TooManyVcpus(vcpus.len()))?;
    if out.len() < need {
        return Err(HvmError::BufferTooSmall {
            need,
            have: out.len(),
        });
    }
    let mut at = 0;
    put(out, &mut at, desc(code::HEADER, 0, HEADER_LEN).as_bytes())?;
    put(out, &mut at, save_header(header).as_bytes())?;
    for (id, v) in vcpus.iter().enumerate() {
        let id = u16::try_from(id).map_err(|_| HvmError::TooManyVcpus(vcpus.len()))?;
        let c = to_hw_cpu(v)?;
        put(out, &mut at, desc(code::CPU, id, CPU_LEN).as_bytes())?;
        put(out, &mut at, c.as_bytes())?;
    }
    put(out, &mut at, desc(code::END, 0, 0).as_bytes())?;
    Ok(at)
}

/// One record of a blob: its descriptor and payload bytes.
pub(crate) struct Record<'a> {
    pub(crate) offset: usize,
    pub(crate) desc: HvmSaveDescriptor,
    pub(crate) payload: &'a [u8],
}

impl Record<'_> {
    /// The payload as `T`; a length other than `T`'s size is
    /// [`HvmError::BadLength`] naming the record's typecode.
    pub(crate) fn read<T: FromBytes>(&self) -> Result<T, HvmError> {
        T::read_from_bytes(self.payload).map_err(|_| HvmError::BadLength {
            typecode: self.desc.typecode,
            length: self.desc.length,
        })
    }
}

/// Split the record at `at`.
fn record(blob: &[u8], at: usize) -> Result<Record<'_>, HvmError> {
    let trunc = HvmError::TruncatedDescriptor { offset: at };
    let body = at.checked_add(DESC_LEN).ok_or(trunc)?;
    let d = blob
        .get(at..body)
        .and_then(|b| HvmSaveDescriptor::read_from_bytes(b).ok())
        .ok_or(trunc)?;
    let tp = HvmError::TruncatedPayload {
        offset: at,
        length: d.length,
    };
    let len = usize::try_from(d.length).map_err(|_| tp)?;
    let end = body.checked_add(len).ok_or(tp)?;
    let payload = blob.get(body..end).ok_or(tp)?;
    Ok(Record {
        offset: at,
        desc: d,
        payload,
    })
}

/// The HEADER payload [`encode`] and [`crate::platform::records::encode`]
/// write.
pub(crate) fn save_header(header: HeaderInfo) -> HvmSaveHeader {
    HvmSaveHeader {
        magic: HVM_FILE_MAGIC,
        version: HVM_FILE_VERSION,
        changeset: header.changeset,
        cpuid: header.cpuid,
        gtsc_khz: header.gtsc_khz,
    }
}

/// The framing every HVM context blob shares, checked: a well-formed
/// HEADER first, then `each` called for every record up to the first END
/// (typecodes above [`MAX_TYPECODE`] refused before `each` sees them), END
/// well-formed, nothing after it. Ordering and which types may appear are
/// the caller's rules, in `each`.
pub(crate) fn walk_stream(
    blob: &[u8],
    each: &mut dyn FnMut(&Record<'_>) -> Result<(), HvmError>,
) -> Result<HeaderInfo, HvmError> {
    let r = record(blob, 0)?;
    if r.desc.typecode != code::HEADER {
        return Err(HvmError::HeaderNotFirst(r.desc.typecode));
    }
    if r.desc.instance != 0 {
        return Err(HvmError::BadInstance {
            typecode: code::HEADER,
            instance: r.desc.instance,
        });
    }
    let h: HvmSaveHeader = r.read()?;
    if h.magic != HVM_FILE_MAGIC {
        return Err(HvmError::BadMagic(h.magic));
    }
    if h.version != HVM_FILE_VERSION {
        return Err(HvmError::BadVersion(h.version));
    }
    let info = HeaderInfo {
        cpuid: h.cpuid,
        gtsc_khz: h.gtsc_khz,
        changeset: h.changeset,
    };
    let mut at = DESC_LEN
        .checked_add(r.payload.len())
        .ok_or(HvmError::MissingEnd)?;
    loop {
        if at == blob.len() {
            return Err(HvmError::MissingEnd);
        }
        let r = record(blob, at)?;
        let (t, i) = (r.desc.typecode, r.desc.instance);
        at = r
            .offset
            .checked_add(DESC_LEN)
            .and_then(|x| x.checked_add(r.payload.len()))
            .ok_or(HvmError::TruncatedPayload {
                offset: r.offset,
                length: r.desc.length,
            })?;
        if t == code::END {
            if i != 0 {
                return Err(HvmError::BadInstance {
                    typecode: t,
                    instance: i,
                });
            }
            if r.desc.length != 0 {
                return Err(HvmError::EndLength(r.desc.length));
            }
            break;
        }
        if t > MAX_TYPECODE {
            return Err(HvmError::UnknownType(t));
        }
        each(&r)?;
    }
    if at != blob.len() {
        return Err(HvmError::TrailingBytes(blob.len().saturating_sub(at)));
    }
    Ok(info)
}

/// Validate the whole blob, calling `cpu` for each CPU record in order.
fn walk(
    blob: &[u8],
    cpu: &mut dyn FnMut(u16, VcpuState) -> Result<(), HvmError>,
) -> Result<HeaderInfo, HvmError> {
    let mut last = (code::HEADER, 0u16);
    let mut n_cpus = 0usize;
    let info = walk_stream(blob, &mut |r| {
        let (t, i) = (r.desc.typecode, r.desc.instance);
        if (t, i) <= last {
            return Err(HvmError::OutOfOrder {
                typecode: t,
                instance: i,
            });
        }
        last = (t, i);
        if t == code::CPU {
            let v = from_hw_cpu(&r.read::<HvmHwCpu>()?)?;
            n_cpus = n_cpus.saturating_add(1);
            cpu(i, v)?;
        }
        Ok(())
    })?;
    if n_cpus == 0 {
        return Err(HvmError::NoVcpus);
    }
    Ok(info)
}

/// Validate the whole blob, then call `visit(vcpu_id, state)` for each
/// vCPU in ascending id order. `visit` is only called once the entire blob
/// has been checked, so an error never leaves a partial restore behind
/// (unless `visit` itself fails). No allocation.
pub fn decode_visit(
    blob: &[u8],
    mut visit: impl FnMut(u16, VcpuState) -> Result<(), HvmError>,
) -> Result<HeaderInfo, HvmError> {
    walk(blob, &mut |_, _| Ok(()))?;
    walk(blob, &mut visit)
}

/// A decoded blob holding up to `N` vCPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded<const N: usize> {
    pub header: HeaderInfo,
    /// (vCPU id, state), ids strictly ascending.
    pub vcpus: heapless::Vec<(u16, VcpuState), N>,
}

/// Validate and decode a blob of at most `N` vCPUs
/// ([`HvmError::CapacityExceeded`] beyond).
pub fn decode<const N: usize>(blob: &[u8]) -> Result<Decoded<N>, HvmError> {
    let mut vcpus = heapless::Vec::new();
    let header = walk(blob, &mut |id, v| {
        vcpus
            .push((id, v))
            .map_err(|_| HvmError::CapacityExceeded(N))
    })?;
    Ok(Decoded { header, vcpus })
}

/// Decode a blob that sits at the start of a larger area whose remaining
/// bytes are zero (the standby's vCPU area: the record is self-delimiting,
/// so the tool writes it without a length). Non-zero bytes after END are
/// still [`HvmError::TrailingBytes`].
pub fn decode_padded<const N: usize>(area: &[u8]) -> Result<Decoded<N>, HvmError> {
    match decode::<N>(area) {
        Err(HvmError::TrailingBytes(n)) => {
            let split = area
                .len()
                .checked_sub(n)
                .and_then(|end| area.split_at_checked(end));
            match split {
                Some((blob, pad)) if pad.iter().all(|&b| b == 0) => decode::<N>(blob),
                _ => Err(HvmError::TrailingBytes(n)),
            }
        }
        r => r,
    }
}

/// The length of the valid context stream at the start of `area`, whose
/// remaining bytes are zero (as [`decode_padded`] takes it): the bytes up
/// to and including its END record. The whole stream is checked
/// ([`walk_stream`]); non-zero bytes after END are an error.
pub fn stream_len(area: &[u8]) -> Result<usize, HvmError> {
    match walk_stream(area, &mut |_| Ok(())) {
        Ok(_) => Ok(area.len()),
        Err(HvmError::TrailingBytes(n)) => {
            let end = area.len().saturating_sub(n);
            let (blob, pad) = area.split_at(end);
            if pad.iter().any(|&b| b != 0) {
                return Err(HvmError::TrailingBytes(n));
            }
            walk_stream(blob, &mut |_| Ok(()))?;
            Ok(end)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_padded_stream_measures_to_its_end_record() {
        let v = VcpuState::default();
        let mut area = [0u8; 2048];
        let n = encode(core::slice::from_ref(&v), HeaderInfo::default(), &mut area);
        assert!(n.is_ok());
        let n = n.unwrap_or(0);
        assert_eq!(stream_len(&area), Ok(n));
        assert_eq!(area.get(..n).map(stream_len), Some(Ok(n)));
        if let Some(b) = area.get_mut(n + 5) {
            *b = 1;
        }
        assert!(stream_len(&area).is_err(), "bytes after END");
        assert!(stream_len(&[0u8; 64]).is_err(), "no stream at all");
    }

    #[test]
    fn svm_attrib_is_xen_format() {
        for a in 0..=0xffffu16 {
            let s = SegAttr::from_svm(a);
            assert_eq!(s.bits(), a & 0xfff);
            assert_eq!(SegAttr::from_bits(a), (a <= 0xfff).then_some(s));
        }
    }

    #[test]
    fn vmx_fold_matches_xen_formula() {
        // 64-bit code segment: type 0xb, S, DPL 0, P, L, G.
        let ar: u32 = 0xb | 1 << 4 | 1 << 7 | 1 << 13 | 1 << 15;
        let a = SegAttr::from_vmx_ar(ar);
        assert_eq!(a.bits(), 0xb | 1 << 4 | 1 << 7 | 1 << 9 | 1 << 11);
        assert!(a.long() && a.present());
        assert_eq!(a.seg_type(), 0xb);
        assert_eq!(a.to_vmx_ar(), ar);
        // Unusable: P forced clear whatever bit 7 said, and back to bit 16.
        let u = SegAttr::from_vmx_ar(1 << 16 | 0x93);
        assert_eq!(u.bits(), 0x13);
        assert_eq!(u.to_vmx_ar(), 1 << 16 | 0x13);
        // Every packed value survives the VMX round trip.
        for b in 0..=0xfffu16 {
            let s = SegAttr::from_bits(b).unwrap_or_default();
            assert_eq!(SegAttr::from_vmx_ar(s.to_vmx_ar()), s);
        }
    }
}
