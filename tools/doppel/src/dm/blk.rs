//! virtio-blk (device id 2) over a file: VERSION_1 and FLUSH offered,
//! config capacity in 512-byte sectors; requests IN, OUT, FLUSH
//! (fdatasync) and GET_ID, the rest UNSUPP. A request that does not lie
//! inside the disk gets IOERR before anything is read or written.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use super::epoch::DiskWrite;
use super::{Dirty, GuestRam};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::Stats;

/// Bytes of a sector.
pub const SECTOR: u64 = 512;
/// Features offered besides VERSION_1.
pub const FEATURES: u64 = 1 << VIRTIO_BLK_F_FLUSH;
/// Bytes of a request header: type, reserved, sector.
const REQ_HDR: usize = 16;
/// Bytes copied at a time between guest RAM and the file.
const CHUNK: usize = 64 * 1024;

/// A virtio-blk device.
pub struct Blk {
    file: File,
    name: String,
    /// Bytes of the disk (whole sectors).
    size: u64,
    buf: Vec<u8>,
    /// Under replication: the writes of the epoch in progress, as applied
    /// to the file.
    log: Option<Vec<DiskWrite>>,
}

impl Blk {
    /// The disk `file` (`name` for log lines); its size is rounded down to
    /// whole sectors.
    pub fn new(file: File, name: String) -> std::io::Result<Self> {
        let size = file.metadata()?.len() / SECTOR * SECTOR;
        Ok(Self {
            file,
            name,
            size,
            buf: vec![0; CHUNK],
            log: None,
        })
    }

    /// Log every write applied (replicated) or not.
    pub fn set_log(&mut self, on: bool) {
        self.log = on.then(Vec::new);
    }

    /// The writes logged since the last take (the epoch in progress).
    pub fn take_log(&mut self) -> Vec<DiskWrite> {
        self.log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The whole disk as writes of at most `chunk` bytes (whole
    /// sectors), in order: a backup's initial sync.
    pub fn whole(&mut self, chunk: usize) -> std::io::Result<Vec<DiskWrite>> {
        use std::os::unix::fs::FileExt;
        let chunk = (chunk as u64 / SECTOR).max(1) * SECTOR;
        let mut out = Vec::new();
        let mut at = 0;
        while at < self.size {
            let n = chunk.min(self.size - at);
            let mut data = vec![0; n as usize];
            self.file.read_exact_at(&mut data, at)?;
            out.push(DiskWrite { offset: at, data });
            at += n;
        }
        Ok(out)
    }

    pub fn features(&self) -> u64 {
        FEATURES
    }

    /// `struct virtio_blk_config`'s first field, capacity (sectors).
    pub fn config(&self) -> Vec<u8> {
        (self.size / SECTOR).to_le_bytes().to_vec()
    }

    /// Serve every request the queue holds.
    pub fn process(&mut self, queue: &mut Queue, mem: &GuestRam, stats: &mut Stats) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let parts =
                Reader::new(mem, chain.clone()).and_then(|r| Ok((r, Writer::new(mem, chain)?)));
            let len = match parts {
                Ok((mut r, mut w)) => self.request(&mut r, &mut w, stats),
                Err(e) => {
                    stats.errors += 1;
                    tracing::warn!("run: {}: request chain {head} refused: {e}", self.name);
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                stats.errors += 1;
                tracing::warn!("run: {}: used ring: {e}", self.name);
                break;
            }
            used = true;
        }
        used
    }

    /// One request; the bytes written into the guest's buffers.
    fn request(
        &mut self,
        r: &mut Reader<'_, Dirty<'_>>,
        w: &mut Writer<'_, Dirty<'_>>,
        stats: &mut Stats,
    ) -> u32 {
        let mut hdr = [0u8; REQ_HDR];
        if w.available_bytes() == 0 || r.read_exact(&mut hdr).is_err() {
            stats.errors += 1;
            tracing::warn!(
                "run: {}: a request without a 16-byte header or a status byte; dropped",
                self.name
            );
            return 0;
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector);
        let mut status_w = match w.split_at(w.available_bytes() - 1) {
            Ok(s) => s,
            Err(e) => {
                stats.errors += 1;
                tracing::warn!("run: {}: status byte: {e}", self.name);
                return 0;
            }
        };
        let status = match ty {
            VIRTIO_BLK_T_IN => self.read(sector, w, stats),
            VIRTIO_BLK_T_OUT => self.write(sector, r, stats),
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => {
                    stats.flushes += 1;
                    VIRTIO_BLK_S_OK
                }
                Err(e) => {
                    tracing::warn!("run: {}: fdatasync: {e}", self.name);
                    VIRTIO_BLK_S_IOERR
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let s = b"doppel-blk";
                id[..s.len()].copy_from_slice(s);
                let n = id.len().min(w.available_bytes());
                match w.write_all(&id[..n]) {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(_) => VIRTIO_BLK_S_IOERR,
                }
            }
            other => {
                tracing::warn!("run: {}: request type {other} unsupported", self.name);
                VIRTIO_BLK_S_UNSUPP
            }
        };
        if status_w.write_all(&[status as u8]).is_err() {
            stats.errors += 1;
            tracing::warn!("run: {}: writing the status byte failed", self.name);
        }
        (w.bytes_written() + status_w.bytes_written()) as u32
    }

    /// The disk's byte range for `len` bytes from `sector`, if inside.
    fn range(&self, sector: u64, len: usize, what: &str) -> Option<u64> {
        let at = sector.checked_mul(SECTOR)?;
        let end = at.checked_add(len as u64)?;
        if end > self.size || !(len as u64).is_multiple_of(SECTOR) {
            tracing::warn!(
                "run: {}: {what} of {len} bytes at sector {sector}: outside the {}-byte disk or not whole sectors; IOERR",
                self.name,
                self.size
            );
            return None;
        }
        Some(at)
    }

    fn read(&mut self, sector: u64, w: &mut Writer<'_, Dirty<'_>>, stats: &mut Stats) -> u32 {
        let len = w.available_bytes();
        let Some(mut at) = self.range(sector, len, "read") else {
            return VIRTIO_BLK_S_IOERR;
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let chunk = &mut self.buf[..n];
            if let Err(e) = self
                .file
                .read_exact_at(chunk, at)
                .and_then(|()| w.write_all(chunk))
            {
                tracing::warn!("run: {}: read at {at:#x}: {e}", self.name);
                return VIRTIO_BLK_S_IOERR;
            }
            at += n as u64;
            left -= n;
        }
        stats.blk_reads += 1;
        VIRTIO_BLK_S_OK
    }

    fn write(&mut self, sector: u64, r: &mut Reader<'_, Dirty<'_>>, stats: &mut Stats) -> u32 {
        let len = r.available_bytes();
        let Some(mut at) = self.range(sector, len, "write") else {
            return VIRTIO_BLK_S_IOERR;
        };
        let offset = at;
        let mut logged = Vec::new();
        let mut left = len;
        let mut status = VIRTIO_BLK_S_OK;
        while left > 0 {
            let n = left.min(CHUNK);
            let chunk = &mut self.buf[..n];
            if let Err(e) = r
                .read_exact(chunk)
                .and_then(|()| self.file.write_all_at(chunk, at))
            {
                tracing::warn!("run: {}: write at {at:#x}: {e}", self.name);
                status = VIRTIO_BLK_S_IOERR;
                break;
            }
            if self.log.is_some() {
                logged.extend_from_slice(chunk);
            }
            at += n as u64;
            left -= n;
        }
        // What reached the file is logged, a failed request's part too:
        // the backup's disk must match the primary's.
        if let Some(log) = &mut self.log {
            if !logged.is_empty() {
                log.push(DiskWrite {
                    offset,
                    data: logged,
                });
            }
        }
        if status == VIRTIO_BLK_S_OK {
            stats.blk_writes += 1;
        }
        status
    }
}
