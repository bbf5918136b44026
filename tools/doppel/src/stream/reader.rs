//! The receiving side: parse and validate a libxc stream from any
//! `std::io::Read` (short reads are fine; EOF mid-item is `Truncated`).
//!
//! Every check happens before the record is handed out, and a record body is
//! only allocated after its length passed the limit.

use std::io::{self, IoSliceMut, Read};

use zerocopy::FromBytes;

use super::devices::{check_device_state, decode_disk_writes};
use super::error::{RecCtx, StreamError};
use super::format::*;
use super::pages::validate_pfn_words;
pub use super::pages::Limits;
use super::records::{zero_page, HvmParam, PageBuf, PageData, Record, TscInfo};
use super::xlz4::XorCache;

/// Position in the record order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// After the headers, before STATIC_DATA_END (v3).
    Static,
    /// At the start of an epoch: nothing of it read yet.
    EpochStart,
    /// PAGE_DATA records of the epoch.
    Pages,
    /// TSC_INFO read.
    Tsc,
    /// HVM_CONTEXT read.
    Context,
    /// HVM_PARAMS read: CHECKPOINT (or END) must follow.
    Params,
    /// END read.
    Ended,
}

/// What the two headers said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    pub version: u32,
    pub xen_major: u32,
    pub xen_minor: u32,
}

/// Reads validated records in stream order.
pub struct StreamReader<R> {
    r: R,
    limits: Limits,
    info: StreamInfo,
    phase: Phase,
    offset: u64,
    index: u64,
    /// Epochs completed by CHECKPOINT so far.
    checkpoints: u64,
    /// Spare page buffers.
    pool: Vec<PageBuf>,
    /// Present when compressed pages were negotiated for this connection.
    xlz4: Option<XorCache>,
    /// DOPPEL_HEARTBEAT records consumed, and the last one's value.
    heartbeats: u64,
    last_heartbeat: u64,
    /// Record #0 was DOPPEL_SESSION.
    session: bool,
    /// The current epoch already carried DOPPEL_DEVICE_STATE.
    device_state: bool,
}

/// Most spare page buffers kept (128 MiB).
const POOL_PAGES: usize = 32 << 10;

fn read_exact_at<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
    offset: &mut u64,
) -> Result<(), StreamError> {
    r.read_exact(buf)
        .map_err(|e| StreamError::from_io(e, what, *offset))?;
    *offset += buf.len() as u64;
    Ok(())
}

/// The 16-byte body of a Doppel record that carries one u64 and a reserved
/// u64 that must be 0 (DOPPEL_HELLO, DOPPEL_HEARTBEAT, and on the back
/// channel DOPPEL_FEATURES and DOPPEL_EPOCH_ACK); the caller has checked
/// the length.
pub(crate) fn value_then_reserved(rec: RecCtx, body: &[u8]) -> Result<u64, StreamError> {
    let word = |i: usize| {
        body.get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let reserved = word(1);
    if reserved != 0 {
        return Err(StreamError::Reserved {
            rec,
            field: "reserved",
            value: reserved,
        });
    }
    Ok(word(0))
}

/// Read one record header (type, body length) at `*offset` and refuse a
/// body longer than `max` before anything is allocated for it. Shared by
/// the libxc stream and the libxl-framed back channel.
pub(crate) fn read_record_header<R: Read>(
    r: &mut R,
    offset: &mut u64,
    index: &mut u64,
    libxl: bool,
    max: u32,
    what: &'static str,
) -> Result<(RecCtx, u32), StreamError> {
    let start = *offset;
    let mut hb = [0u8; 8];
    read_exact_at(r, &mut hb, what, offset)?;
    let (h, _) = RecordHeader::read_from_prefix(&hb).map_err(|_| StreamError::Truncated {
        what,
        offset: start,
    })?;
    let rec = RecCtx {
        index: *index,
        rtype: h.rtype.get(),
        offset: start,
        libxl,
    };
    *index += 1;
    let len = h.length.get();
    if len > max {
        return Err(StreamError::RecordTooLong {
            rec,
            length: len,
            max,
        });
    }
    Ok((rec, len))
}

/// Read and check a libxc image header.
pub(crate) fn check_image_header(h: &ImageHeader) -> Result<u32, StreamError> {
    if h.marker.get() != IHDR_MARKER {
        return Err(StreamError::BadMarker(h.marker.get()));
    }
    if h.id.get() != IHDR_ID {
        return Err(StreamError::BadImageId(h.id.get()));
    }
    let v = h.version.get();
    if !(2..=3).contains(&v) {
        return Err(StreamError::UnsupportedVersion(v));
    }
    let o = h.options.get();
    if o & IHDR_OPT_BIG_ENDIAN != 0 {
        return Err(StreamError::BigEndian);
    }
    if o != 0 {
        return Err(StreamError::ImageOptionsReserved(o));
    }
    if h.reserved != [0; 6] {
        return Err(StreamError::ImageHeaderReserved(h.reserved));
    }
    Ok(v)
}

impl<R: Read> StreamReader<R> {
    /// Read and validate the image and domain headers.
    pub fn open(mut r: R, limits: Limits) -> Result<Self, StreamError> {
        let mut offset = 0;
        let mut ih = [0u8; 24];
        read_exact_at(&mut r, &mut ih, "image header", &mut offset)?;
        let ih = ImageHeader::read_from_bytes(&ih).expect("24 bytes");
        let version = check_image_header(&ih)?;
        let mut dh = [0u8; 16];
        read_exact_at(&mut r, &mut dh, "domain header", &mut offset)?;
        let dh = DomainHeader::read_from_bytes(&dh).expect("16 bytes");
        if dh.domain_type.get() != DHDR_TYPE_X86_HVM {
            return Err(StreamError::DomainType(dh.domain_type.get()));
        }
        if dh.page_shift.get() != PAGE_SHIFT {
            return Err(StreamError::PageShift(dh.page_shift.get()));
        }
        if dh.reserved.get() != 0 {
            return Err(StreamError::DomainHeaderReserved(dh.reserved.get()));
        }
        Ok(Self {
            r,
            limits,
            info: StreamInfo {
                version,
                xen_major: dh.xen_major.get(),
                xen_minor: dh.xen_minor.get(),
            },
            phase: Phase::Static,
            offset,
            index: 0,
            checkpoints: 0,
            pool: Vec::new(),
            xlz4: None,
            heartbeats: 0,
            last_heartbeat: 0,
            session: false,
            device_state: false,
        })
    }

    /// Accept compressed page records (negotiated at connect; never for
    /// captures). The XOR cache lives as long as this reader; an error if
    /// it cannot be mapped (the reader stays as it was).
    pub fn enable_xlz4(&mut self) -> std::io::Result<()> {
        self.xlz4 = Some(XorCache::new(self.limits.guest_pages)?);
        Ok(())
    }

    /// Header facts.
    pub fn info(&self) -> StreamInfo {
        self.info
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of CHECKPOINT records read so far (= index of the epoch
    /// currently being read).
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }

    /// DOPPEL_HEARTBEAT records consumed so far and the last one's value
    /// (epochs the primary had committed).
    pub fn heartbeats(&self) -> (u64, u64) {
        (self.heartbeats, self.last_heartbeat)
    }

    /// Whether END has been read.
    pub fn ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The next record, or an error. After END this returns `AfterEnd`.
    pub fn next_record(&mut self) -> Result<Record, StreamError> {
        loop {
            if self.phase == Phase::Ended {
                return Err(StreamError::AfterEnd);
            }
            if let Some(rec) = self.next_raw()? {
                return Ok(rec);
            }
        }
    }

    /// After END: require that the input has nothing more.
    pub fn expect_eof(&mut self) -> Result<(), StreamError> {
        let mut buf = [0u8; 4096];
        let mut extra = 0u64;
        loop {
            match self.r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => extra += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::from_io(e, "end of stream", self.offset)),
            }
        }
        if extra > 0 {
            return Err(StreamError::TrailingData(extra));
        }
        Ok(())
    }

    /// Give page buffers back for reuse (the replica's displaced pages
    /// after a commit): saves allocating and faulting in fresh memory.
    pub fn recycle_pages(&mut self, pages: impl IntoIterator<Item = PageBuf>) {
        for p in pages {
            if self.pool.len() >= POOL_PAGES {
                break;
            }
            self.pool.push(p);
        }
    }

    /// Read `n` bytes of a (small) record body.
    /// A (value, reserved = 0) record of `len` bytes: its value.
    fn read_value_then_reserved(&mut self, rec: RecCtx, len: u32) -> Result<u64, StreamError> {
        if len != 16 {
            return Err(StreamError::BadLength {
                rec,
                length: len.into(),
                expected: "16".into(),
            });
        }
        let body = self.read_body(16)?;
        value_then_reserved(rec, &body)
    }

    fn read_body(&mut self, n: usize) -> Result<Vec<u8>, StreamError> {
        let mut body = vec![0; n];
        read_exact_at(&mut self.r, &mut body, "record body", &mut self.offset)?;
        Ok(body)
    }

    /// PAGE_DATA, read in parts: count header, pfn words (both validated
    /// before any page is read), then the pages straight into page buffers
    /// with vectored reads.
    fn read_page_data(&mut self, rec: RecCtx, len: u32) -> Result<PageData, StreamError> {
        let len = len as usize;
        let bad_len = |expected: String| StreamError::BadLength {
            rec,
            length: len as u64,
            expected,
        };
        if len < 8 {
            return Err(bad_len("at least 8".into()));
        }
        let mut head = vec![0u8; 8];
        read_exact_at(&mut self.r, &mut head, "record body", &mut self.offset)?;
        let count = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let words_end = 8 + 8 * count.min(MAX_BATCH_PFNS + 1) as usize;
        if (1..=MAX_BATCH_PFNS).contains(&count) && len >= words_end {
            head.resize(words_end, 0);
            read_exact_at(&mut self.r, &mut head[8..], "record body", &mut self.offset)?;
        }
        // Count, reserved and length-vs-words checks happen here too.
        let (count, pages) = validate_pfn_words(rec, &head, self.limits).map_err(|e| match e {
            StreamError::BadLength { .. } => bad_len(format!("at least {words_end}")),
            e => e,
        })?;
        let want = 8 + 8 * count + PAGE_SIZE * pages;
        if len != want {
            return Err(bad_len(format!(
                "{want} (8 + 8 * {count} pfns + 4096 * {pages} data pages)"
            )));
        }
        let keep = self.pool.len().saturating_sub(pages);
        let mut bufs: Vec<PageBuf> = self.pool.drain(keep..).collect();
        bufs.resize_with(pages, zero_page);
        let mut slices: Vec<IoSliceMut<'_>> = bufs
            .iter_mut()
            .map(|b| IoSliceMut::new(&mut b[..]))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.r.read_vectored(rest) {
                Ok(0) => {
                    return Err(StreamError::Truncated {
                        what: "record body",
                        offset: self.offset,
                    })
                }
                Ok(n) => {
                    self.offset += n as u64;
                    IoSliceMut::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::from_io(e, "record body", self.offset)),
            }
        }
        drop(slices);
        // 8 + 8n + 4096k is a multiple of 8: PAGE_DATA has no padding.
        Ok(PageData::from_parts(head, bufs, count))
    }

    /// One record; `None` for a skipped optional record.
    fn next_raw(&mut self) -> Result<Option<Record>, StreamError> {
        let (rec, len) = read_record_header(
            &mut self.r,
            &mut self.offset,
            &mut self.index,
            false,
            MAX_RECORD_BODY,
            "record header",
        )?;
        // Cheap checks that need no body come first, so a lying header is
        // refused before anything is allocated for it.
        let known = matches!(
            rec.rtype,
            rec::END
                | rec::PAGE_DATA
                | rec::X86_TSC_INFO
                | rec::HVM_CONTEXT
                | rec::HVM_PARAMS
                | rec::CHECKPOINT
                | rec::STATIC_DATA_END
                | rec::X86_CPUID_POLICY
                | rec::X86_MSR_POLICY
                | rec::DOPPEL_DEVICE_STATE
                | rec::DOPPEL_DISK_WRITES
        );
        let optional = rec.rtype & REC_TYPE_OPTIONAL != 0;
        // Optional in Xen's sense, but skipping it would silently lose
        // pages: refused unless compression was negotiated.
        let xlz4 = rec.rtype == rec::DOPPEL_PAGE_DATA_XLZ4;
        if xlz4 && self.xlz4.is_none() {
            return Err(StreamError::Unsupported { rec });
        }
        // The feature request: first record only, answered by the caller.
        if rec.rtype == rec::DOPPEL_SESSION {
            if rec.index != 0 {
                return Err(StreamError::OutOfOrder {
                    rec,
                    expected: "DOPPEL_SESSION only as the first record after the headers",
                });
            }
            if len as usize != SESSION_NONCE_LEN {
                return Err(StreamError::BadLength {
                    rec,
                    length: len.into(),
                    expected: SESSION_NONCE_LEN.to_string(),
                });
            }
            let body = self.read_body(SESSION_NONCE_LEN)?;
            self.session = true;
            let mut n = [0u8; SESSION_NONCE_LEN];
            n.copy_from_slice(&body);
            return Ok(Some(Record::Session(n)));
        }
        if rec.rtype == rec::DOPPEL_HELLO {
            // First, or second after the session record.
            if rec.index != u64::from(self.session) {
                return Err(StreamError::OutOfOrder {
                    rec,
                    expected: "DOPPEL_HELLO only as the first record after the headers \
                               (and DOPPEL_SESSION)",
                });
            }
            return Ok(Some(Record::Hello(
                self.read_value_then_reserved(rec, len)?,
            )));
        }
        // Liveness only: checked and consumed here, never handed out.
        if rec.rtype == rec::DOPPEL_HEARTBEAT {
            if self.phase != Phase::EpochStart {
                return Err(StreamError::OutOfOrder {
                    rec,
                    expected:
                        "DOPPEL_HEARTBEAT only between epochs (after STATIC_DATA_END or CHECKPOINT)",
                });
            }
            let value = self.read_value_then_reserved(rec, len)?;
            self.heartbeats += 1;
            self.last_heartbeat = value;
            return Ok(None);
        }
        let known = known || xlz4;
        if !known && !optional {
            return Err(if rec.rtype <= rec::X86_MSR_POLICY {
                StreamError::Unsupported { rec }
            } else {
                StreamError::UnknownMandatory { rec }
            });
        }
        if known {
            self.check_order(rec)?;
        }
        // The device records have their own, smaller bounds: refused before
        // their body is allocated.
        let own_max = match rec.rtype {
            rec::DOPPEL_DEVICE_STATE => Some(MAX_DEVICE_STATE),
            rec::DOPPEL_DISK_WRITES => Some(MAX_DISK_WRITES_BODY),
            _ => None,
        };
        if let Some(max) = own_max.filter(|&m| len > m) {
            return Err(StreamError::RecordTooLong {
                rec,
                length: len,
                max,
            });
        }
        if rec.rtype == rec::DOPPEL_DEVICE_STATE && self.device_state {
            return Err(StreamError::OutOfOrder {
                rec,
                expected: "at most one DOPPEL_DEVICE_STATE per epoch",
            });
        }
        if rec.rtype == rec::PAGE_DATA {
            let p = self.read_page_data(rec, len)?;
            self.advance(rec);
            return Ok(Some(Record::PageData(p)));
        }
        let mut body = self.read_body(padded(len as usize))?;
        if let Some((at, &v)) = body[len as usize..]
            .iter()
            .enumerate()
            .find(|(_, &b)| b != 0)
        {
            return Err(StreamError::NonZeroPadding {
                rec,
                at: len as usize + at,
                value: v,
            });
        }
        body.truncate(len as usize);
        if !known {
            tracing::debug!("skipping {rec} ({len} bytes)");
            return Ok(None);
        }
        let out = self.decode(rec, body)?;
        self.advance(rec);
        Ok(Some(out))
    }

    fn check_order(&self, rec: RecCtx) -> Result<(), StreamError> {
        let v3 = self.info.version >= 3;
        let err = |expected| Err(StreamError::OutOfOrder { rec, expected });
        match (self.phase, rec.rtype) {
            (Phase::Ended, _) => Err(StreamError::AfterEnd),
            (_, rec::STATIC_DATA_END | rec::X86_CPUID_POLICY | rec::X86_MSR_POLICY) if !v3 => {
                Err(StreamError::WrongVersion {
                    rec,
                    version: self.info.version,
                })
            }
            (Phase::Static, rec::STATIC_DATA_END | rec::X86_CPUID_POLICY | rec::X86_MSR_POLICY) => {
                Ok(())
            }
            (Phase::Static, _) if v3 => err("static data (CPUID/MSR policy) then STATIC_DATA_END"),
            (_, rec::STATIC_DATA_END | rec::X86_CPUID_POLICY | rec::X86_MSR_POLICY) => {
                err("epoch records (static data already ended)")
            }
            (
                Phase::Static | Phase::EpochStart | Phase::Pages,
                rec::PAGE_DATA
                | rec::DOPPEL_PAGE_DATA_XLZ4
                | rec::X86_TSC_INFO
                | rec::DOPPEL_DEVICE_STATE
                | rec::DOPPEL_DISK_WRITES,
            ) => Ok(()),
            // END is fine at an epoch boundary (after CHECKPOINT).
            (Phase::Static | Phase::EpochStart, rec::END) => Ok(()),
            (Phase::Static | Phase::EpochStart | Phase::Pages, _) => {
                err("PAGE_DATA or X86_TSC_INFO (or a Doppel device record)")
            }
            (_, rec::DOPPEL_DEVICE_STATE | rec::DOPPEL_DISK_WRITES) => {
                err("device records after the pages, before X86_TSC_INFO")
            }
            (Phase::Tsc, rec::HVM_CONTEXT) => Ok(()),
            (Phase::Tsc, _) => err("HVM_CONTEXT after X86_TSC_INFO"),
            (Phase::Context, rec::HVM_PARAMS) => Ok(()),
            (Phase::Context, _) => err("HVM_PARAMS after HVM_CONTEXT"),
            (Phase::Params, rec::CHECKPOINT | rec::END) => Ok(()),
            (Phase::Params, _) => err("CHECKPOINT or END after HVM_PARAMS"),
        }
    }

    fn advance(&mut self, rec: RecCtx) {
        self.phase = match rec.rtype {
            rec::STATIC_DATA_END => Phase::EpochStart,
            rec::X86_CPUID_POLICY | rec::X86_MSR_POLICY => Phase::Static,
            rec::PAGE_DATA | rec::DOPPEL_PAGE_DATA_XLZ4 | rec::DOPPEL_DISK_WRITES => Phase::Pages,
            rec::DOPPEL_DEVICE_STATE => {
                self.device_state = true;
                Phase::Pages
            }
            rec::X86_TSC_INFO => Phase::Tsc,
            rec::HVM_CONTEXT => Phase::Context,
            rec::HVM_PARAMS => Phase::Params,
            rec::CHECKPOINT => {
                self.checkpoints += 1;
                self.device_state = false;
                Phase::EpochStart
            }
            _ => Phase::Ended,
        };
    }

    fn decode(&mut self, rec: RecCtx, body: Vec<u8>) -> Result<Record, StreamError> {
        let len = body.len() as u64;
        let bad_len = |expected: String| StreamError::BadLength {
            rec,
            length: len,
            expected,
        };
        match rec.rtype {
            rec::END | rec::CHECKPOINT | rec::STATIC_DATA_END => {
                if !body.is_empty() {
                    return Err(bad_len("0".into()));
                }
                Ok(match rec.rtype {
                    rec::END => Record::End,
                    rec::CHECKPOINT => Record::Checkpoint,
                    _ => Record::StaticDataEnd,
                })
            }
            rec::DOPPEL_PAGE_DATA_XLZ4 => {
                let limits = self.limits;
                let cache = self
                    .xlz4
                    .as_mut()
                    .expect("checked when the header was read");
                Ok(Record::PageData(cache.decode(rec, &body, limits)?))
            }
            rec::X86_TSC_INFO => {
                let t = TscInfoRaw::read_from_bytes(&body).map_err(|_| bad_len("24".into()))?;
                if t.reserved.get() != 0 {
                    return Err(StreamError::Reserved {
                        rec,
                        field: "reserved",
                        value: t.reserved.get().into(),
                    });
                }
                Ok(Record::TscInfo(TscInfo {
                    mode: t.mode.get(),
                    khz: t.khz.get(),
                    nsec: t.nsec.get(),
                    incarnation: t.incarnation.get(),
                }))
            }
            rec::HVM_CONTEXT => {
                if body.is_empty() {
                    return Err(bad_len("at least 1".into()));
                }
                Ok(Record::HvmContext(body))
            }
            rec::HVM_PARAMS => {
                if body.len() < 8 {
                    return Err(bad_len("at least 8".into()));
                }
                let h = CountHeader::read_from_bytes(&body[..8]).expect("8 bytes");
                if h.reserved.get() != 0 {
                    return Err(StreamError::Reserved {
                        rec,
                        field: "reserved",
                        value: h.reserved.get().into(),
                    });
                }
                let want = 8 + 16 * u64::from(h.count.get());
                if len != want {
                    return Err(bad_len(format!(
                        "{want} (8 + 16 * count {})",
                        h.count.get()
                    )));
                }
                let entries = <[HvmParamRaw]>::ref_from_bytes(&body[8..]).expect("multiple of 16");
                Ok(Record::HvmParams(
                    entries
                        .iter()
                        .map(|e| HvmParam {
                            index: e.index.get(),
                            value: e.value.get(),
                        })
                        .collect(),
                ))
            }
            rec::X86_CPUID_POLICY | rec::X86_MSR_POLICY => {
                let unit = if rec.rtype == rec::X86_CPUID_POLICY {
                    24
                } else {
                    16
                };
                if body.is_empty() || !body.len().is_multiple_of(unit) {
                    return Err(bad_len(format!("a non-zero multiple of {unit}")));
                }
                Ok(if rec.rtype == rec::X86_CPUID_POLICY {
                    Record::CpuidPolicy(body)
                } else {
                    Record::MsrPolicy(body)
                })
            }
            rec::DOPPEL_DEVICE_STATE => {
                check_device_state(rec, &body)?;
                Ok(Record::DeviceState(body))
            }
            rec::DOPPEL_DISK_WRITES => Ok(Record::DiskWrites(decode_disk_writes(rec, &body)?)),
            _ => unreachable!("only known non-page types reach decode"),
        }
    }
}
