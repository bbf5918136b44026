//! The sending side: write a libxc v3 stream to any `std::io::Write`.
//!
//! The writer frames records and batches pages; it does not police record
//! order (the epoch helpers below write the right order, and the receiver
//! checks it).

use std::io::{self, IoSlice, Write};

use zerocopy::IntoBytes;

use super::format::*;
pub use super::pages::OutPage;
use super::records::{HvmParam, TscInfo};
use super::xlz4::XorCache;

/// Writes records and counts bytes.
pub struct StreamWriter<W> {
    w: W,
    bytes: u64,
    words: Vec<u8>,
}

const ZEROS: [u8; 8] = [0; 8];

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl<W: Write> StreamWriter<W> {
    pub fn new(w: W) -> Self {
        Self {
            w,
            bytes: 0,
            words: Vec::new(),
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Unwrap.
    pub fn into_inner(self) -> W {
        self.w
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// Image header (version 3) and x86 HVM domain header.
    pub fn headers(&mut self, xen_major: u32, xen_minor: u32) -> io::Result<()> {
        self.put(ImageHeader::doppel().as_bytes())?;
        let d = DomainHeader {
            domain_type: DHDR_TYPE_X86_HVM.into(),
            page_shift: PAGE_SHIFT.into(),
            reserved: 0.into(),
            xen_major: xen_major.into(),
            xen_minor: xen_minor.into(),
        };
        self.put(d.as_bytes())
    }

    /// One record from body parts (the length is their sum).
    pub fn record(&mut self, rtype: u32, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_RECORD_BODY as usize {
            return Err(invalid(format!(
                "{} body of {len} bytes exceeds the record limit",
                rec_name(rtype)
            )));
        }
        let h = RecordHeader {
            rtype: rtype.into(),
            length: (len as u32).into(),
        };
        self.put(h.as_bytes())?;
        for p in parts {
            self.put(p)?;
        }
        self.put(&ZEROS[..padded(len) - len])
    }

    /// PAGE_DATA records for `pages`, at most 1024 pfns per record.
    pub fn page_data(&mut self, pages: &[OutPage<'_>]) -> io::Result<()> {
        for batch in pages.chunks(MAX_BATCH_PFNS as usize) {
            self.page_batch(batch)?;
        }
        Ok(())
    }

    fn page_batch(&mut self, batch: &[OutPage<'_>]) -> io::Result<()> {
        let mut words = std::mem::take(&mut self.words);
        words.clear();
        let h = CountHeader {
            count: (batch.len() as u32).into(),
            reserved: 0.into(),
        };
        words.extend_from_slice(h.as_bytes());
        let mut data_len = 0usize;
        for p in batch {
            if p.pfn > PFN_MASK {
                return Err(invalid(format!("pfn {:#x} does not fit 52 bits", p.pfn)));
            }
            let ptype = match p.data {
                Some(d) if d.len() == PAGE_SIZE => {
                    data_len += PAGE_SIZE;
                    PAGE_TYPE_NORMAL
                }
                Some(d) => {
                    return Err(invalid(format!(
                        "page {:#x} has {} bytes, expected 4096",
                        p.pfn,
                        d.len()
                    )))
                }
                None => PAGE_TYPE_INVALID,
            };
            let w = p.pfn | (u64::from(ptype) << PFN_TYPE_SHIFT);
            words.extend_from_slice(&w.to_le_bytes());
        }
        let len = words.len() + data_len;
        let hdr = RecordHeader {
            rtype: rec::PAGE_DATA.into(),
            length: (len as u32).into(),
        };
        // One vectored write per batch: with a BufWriter over a socket, a
        // batch larger than the buffer goes straight to writev, so page
        // contents are copied once (into the kernel), as a raw send would.
        let mut slices = Vec::with_capacity(batch.len() + 2);
        slices.push(IoSlice::new(hdr.as_bytes()));
        slices.push(IoSlice::new(&words));
        slices.extend(batch.iter().filter_map(|p| p.data).map(IoSlice::new));
        // 8 + 8n + 4096k is always a multiple of 8: no padding.
        let r = write_all_vectored(&mut self.w, &mut slices);
        drop(slices);
        if r.is_ok() {
            self.bytes += (8 + len) as u64;
        }
        self.words = words;
        r
    }

    /// Compressed page records (Doppel extension, only after negotiation):
    /// at most 1024 pfns each, XORed against `cache`, which it updates.
    pub fn page_data_xlz4(
        &mut self,
        pages: &[OutPage<'_>],
        cache: &mut XorCache,
    ) -> io::Result<()> {
        for batch in pages.chunks(MAX_BATCH_PFNS as usize) {
            let body = cache.encode(batch).map_err(invalid)?;
            self.record(rec::DOPPEL_PAGE_DATA_XLZ4, &[&body])?;
        }
        Ok(())
    }

    pub fn tsc_info(&mut self, t: &TscInfo) -> io::Result<()> {
        let raw = TscInfoRaw {
            mode: t.mode.into(),
            khz: t.khz.into(),
            nsec: t.nsec.into(),
            incarnation: t.incarnation.into(),
            reserved: 0.into(),
        };
        self.record(rec::X86_TSC_INFO, &[raw.as_bytes()])
    }

    /// HVM_CONTEXT with an already encoded blob (must not be empty).
    pub fn hvm_context(&mut self, blob: &[u8]) -> io::Result<()> {
        if blob.is_empty() {
            return Err(invalid("HVM_CONTEXT blob is empty".into()));
        }
        self.record(rec::HVM_CONTEXT, &[blob])
    }

    pub fn hvm_params(&mut self, params: &[HvmParam]) -> io::Result<()> {
        let mut body = Vec::with_capacity(8 + 16 * params.len());
        let h = CountHeader {
            count: (params.len() as u32).into(),
            reserved: 0.into(),
        };
        body.extend_from_slice(h.as_bytes());
        for p in params {
            let e = HvmParamRaw {
                index: p.index.into(),
                value: p.value.into(),
            };
            body.extend_from_slice(e.as_bytes());
        }
        self.record(rec::HVM_PARAMS, &[&body])
    }

    /// DOPPEL_HELLO (Doppel extension): ask the backup for `features`
    /// (`format::feature` bits). Only right after the headers, and only on a
    /// live connection: a capture never carries it.
    pub fn hello(&mut self, features: u64) -> io::Result<()> {
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&features.to_le_bytes());
        self.record(rec::DOPPEL_HELLO, &[&body])
    }

    /// DOPPEL_SESSION (Doppel extension): echo the backup's session nonce.
    /// Only right after the headers, and only on a TLS link: a capture
    /// never carries it.
    pub fn session(&mut self, nonce: &[u8; SESSION_NONCE_LEN]) -> io::Result<()> {
        self.record(rec::DOPPEL_SESSION, &[&nonce[..]])
    }

    /// DOPPEL_HEARTBEAT (Doppel extension): `committed` epochs so far. Only
    /// between epochs, and only on a live connection (never in a capture).
    pub fn heartbeat(&mut self, committed: u64) -> io::Result<()> {
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&committed.to_le_bytes());
        self.record(rec::DOPPEL_HEARTBEAT, &[&body])
    }

    /// DOPPEL_DEVICE_STATE (Doppel extension): the device model's sealed
    /// state, 1..=MAX_DEVICE_STATE bytes. At most one per epoch, after the
    /// epoch's pages and before X86_TSC_INFO.
    pub fn device_state(&mut self, blob: &[u8]) -> io::Result<()> {
        if blob.is_empty() || blob.len() > MAX_DEVICE_STATE as usize {
            return Err(invalid(format!(
                "device state of {} bytes; 1..={MAX_DEVICE_STATE} fit DOPPEL_DEVICE_STATE",
                blob.len()
            )));
        }
        self.record(rec::DOPPEL_DEVICE_STATE, &[blob])
    }

    /// DOPPEL_DISK_WRITES (Doppel extension): the epoch's disk writes
    /// `(byte offset, data)` in order, whole 512-byte sectors each, split
    /// into records of at most MAX_DISK_WRITES_BODY bytes (a larger write
    /// becomes consecutive pieces). After the epoch's pages and before
    /// X86_TSC_INFO. Nothing is written when `writes` is empty, or when
    /// one of them is not whole sectors (`InvalidInput`).
    pub fn disk_writes(&mut self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let plan = super::devices::plan_disk_writes(writes).map_err(invalid)?;
        for entries in plan {
            let count = super::devices::count_header(entries.len());
            let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + 2 * entries.len());
            parts.push(&count);
            for (h, data) in &entries {
                parts.push(h.as_bytes());
                parts.push(data);
            }
            self.record(rec::DOPPEL_DISK_WRITES, &parts)?;
        }
        Ok(())
    }

    pub fn checkpoint(&mut self) -> io::Result<()> {
        self.record(rec::CHECKPOINT, &[])
    }

    pub fn static_data_end(&mut self) -> io::Result<()> {
        self.record(rec::STATIC_DATA_END, &[])
    }

    pub fn end(&mut self) -> io::Result<()> {
        self.record(rec::END, &[])
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}
