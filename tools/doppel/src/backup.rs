//! The backup side's receive loop: decoder -> epoch stager -> replica.
//!
//! Records of an epoch are staged in memory; the epoch is committed to the
//! replica only when its CHECKPOINT (or, for a plain stream, END right after
//! HVM_PARAMS) arrives. Any error drops the staged epoch, so the replica
//! stays exactly at its last committed epoch.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::replica::{Replica, ReplicaError, StagedEpoch};
use crate::stream::format::{feature, SESSION_NONCE_LEN};
use crate::stream::records::PageBuf;
use crate::stream::{DiskWrite, Limits, Record, StreamError, StreamReader};

/// Where committed epochs go: a file (or memory) replica, or a standby's
/// guest RAM (`crate::standby`).
pub trait EpochSink {
    /// Guest size in pages (pfns at or above it are refused).
    fn pages(&self) -> u64;
    /// Apply one complete epoch, all or nothing; returns page buffers that
    /// are free again.
    fn commit(&mut self, staged: StagedEpoch) -> Result<Vec<PageBuf>, ReplicaError>;
    /// Size in bytes of the disk copy the sink applies disk writes to (0:
    /// none); the staging bound grows by it, so an initial sync (the whole
    /// disk in epoch 0) fits.
    fn disk_size(&self) -> u64 {
        0
    }
}

/// The backup's copy of the guest's disk (`doppel backup --disk`): an
/// epoch's disk writes are checked against its size before anything of
/// the epoch is applied, and applied in order, then fdatasync'ed, only
/// when the epoch commits (DRBD protocol D: the copy only ever holds a
/// committed epoch's disk).
pub struct DiskCopy {
    file: File,
    path: PathBuf,
    size: u64,
    applied: u64,
}

impl DiskCopy {
    /// Use `file` (opened read-write by the caller; `path` names it in
    /// messages). Its current length is the disk's size: it never grows.
    pub fn new(file: File, path: &Path) -> std::io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            applied: 0,
        })
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Disk bytes applied by committed epochs so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Whether every write of epoch `epoch` lies inside the disk.
    pub fn check(&self, epoch: u64, writes: &[DiskWrite]) -> Result<(), ReplicaError> {
        for w in writes {
            let len = w.data.len() as u64;
            if w.offset.checked_add(len).is_none_or(|end| end > self.size) {
                return Err(ReplicaError::DiskWriteBeyondDisk {
                    epoch,
                    offset: w.offset,
                    len,
                    size: self.size,
                });
            }
        }
        Ok(())
    }

    /// Apply checked writes in order, then fdatasync; returns the bytes
    /// written. An I/O error here leaves the copy partly written (the
    /// session ends with it).
    pub fn apply(&mut self, writes: &[DiskWrite]) -> Result<u64, ReplicaError> {
        let io = |source| ReplicaError::Io {
            path: self.path.clone(),
            source,
        };
        let mut n = 0;
        for w in writes {
            self.file.write_all_at(&w.data, w.offset).map_err(io)?;
            n += w.data.len() as u64;
        }
        if n > 0 {
            self.file.sync_data().map_err(io)?;
        }
        self.applied += n;
        Ok(n)
    }
}

impl EpochSink for Replica {
    fn pages(&self) -> u64 {
        Replica::pages(self)
    }
    fn commit(&mut self, staged: StagedEpoch) -> Result<Vec<PageBuf>, ReplicaError> {
        Replica::commit(self, staged)
    }
}

/// Why a receive stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
    #[error("replica: {0}")]
    Replica(#[from] ReplicaError),
    #[error("epoch {epoch}: staged data exceeds {limit} bytes")]
    StagedTooLarge { epoch: u64, limit: u64 },
    #[error("acknowledging epoch {epoch}: {source}")]
    Ack { epoch: u64, source: std::io::Error },
    #[error("answering the primary's feature hello: {0}")]
    Hello(std::io::Error),
    #[error("compressed pages were asked for, but {0}")]
    Cache(std::io::Error),
    /// The stream does not belong to this connection's session (a replay,
    /// or a primary that did not echo the nonce): refused before any
    /// record was applied.
    #[error("session check failed: {0}")]
    Session(String),
}

/// Counts of one epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochStats {
    /// Epoch number (0 = the first, full-memory epoch).
    pub epoch: u64,
    pub page_records: u64,
    /// Pfns with data.
    pub pages: u64,
    /// Pfns sent as invalid.
    pub invalid: u64,
    /// Stream bytes of the epoch (headers, bodies, padding).
    pub bytes: u64,
    /// Disk writes (DOPPEL_DISK_WRITES entries) and their data bytes.
    pub disk_writes: u64,
    pub disk_bytes: u64,
}

/// Groups validated records into epochs.
pub struct Stager {
    staged: StagedEpoch,
    stats: EpochStats,
    max_staged: u64,
}

/// What pushing one record did.
// Returned once per record and consumed at once: moving the epoch's
// bookkeeping (its buffers are on the heap) costs less than a box would.
#[allow(clippy::large_enum_variant)]
pub enum Staged {
    /// Keep going.
    More,
    /// An epoch is complete and ready to commit.
    Epoch(StagedEpoch, EpochStats),
    /// END: nothing further.
    End,
}

impl Stager {
    /// `max_staged`: most body bytes one epoch may hold in memory.
    pub fn new(max_staged: u64) -> Self {
        Self {
            staged: StagedEpoch::default(),
            stats: EpochStats::default(),
            max_staged,
        }
    }

    /// Default bound: twice the guest plus 16 MiB (a full epoch plus
    /// metadata, with room for pages sent twice).
    pub fn for_guest(pages: u64) -> Self {
        Self::for_guest_and_disk(pages, 0)
    }

    /// `for_guest`, plus room for `disk` bytes of disk writes (the disk
    /// copy's size: an initial sync carries the whole disk in epoch 0).
    pub fn for_guest_and_disk(pages: u64, disk: u64) -> Self {
        Self::new(
            pages
                .saturating_mul(2 * 4096)
                .saturating_add(disk)
                .saturating_add(16 << 20),
        )
    }

    /// Take the next record; `bytes` = its size in the stream.
    pub fn push(&mut self, rec: Record, bytes: u64) -> Result<Staged, ReceiveError> {
        self.stats.bytes += bytes;
        match rec {
            Record::Checkpoint => Ok(self.finish()),
            Record::End => {
                // END right after HVM_PARAMS closes a plain stream's epoch.
                if self.staged.params.is_some() {
                    return Ok(self.finish());
                }
                Ok(Staged::End)
            }
            r => {
                if let Record::PageData(p) = &r {
                    self.stats.page_records += 1;
                    let data = p.data_pages() as u64;
                    self.stats.pages += data;
                    self.stats.invalid += p.count() as u64 - data;
                }
                if let Record::DiskWrites(w) = &r {
                    self.stats.disk_writes += w.len() as u64;
                    self.stats.disk_bytes += w.iter().map(|w| w.data.len() as u64).sum::<u64>();
                }
                self.staged.push(r);
                if self.staged.bytes > self.max_staged {
                    return Err(ReceiveError::StagedTooLarge {
                        epoch: self.stats.epoch,
                        limit: self.max_staged,
                    });
                }
                Ok(Staged::More)
            }
        }
    }

    fn finish(&mut self) -> Staged {
        let e = std::mem::take(&mut self.staged);
        let next = EpochStats {
            epoch: self.stats.epoch + 1,
            ..Default::default()
        };
        let s = std::mem::replace(&mut self.stats, next);
        Staged::Epoch(e, s)
    }

    /// Counts of the epoch being staged, if any of its records arrived.
    pub fn pending(&self) -> Option<EpochStats> {
        (self.stats.bytes > 0).then_some(self.stats)
    }

    /// Drop whatever is staged (stream broke).
    pub fn discard(&mut self) {
        self.staged = StagedEpoch::default();
    }
}

/// The result of one receive run.
#[derive(Debug)]
pub struct Received {
    /// Epochs committed in this run.
    pub epochs: Vec<EpochStats>,
    /// Whether END was read.
    pub ended: bool,
    /// The error that stopped the run, if any.
    pub error: Option<ReceiveError>,
    /// The epoch that was being staged when the run stopped (discarded).
    pub partial: Option<EpochStats>,
    /// Feature bits in use on this connection (`stream::format::feature`):
    /// those the primary asked for in its hello and the backup offered.
    pub features: u64,
}

/// What `receive_negotiated` reports to its caller.
#[derive(Debug)]
pub enum Event<'a> {
    /// The primary's DOPPEL_HELLO arrived: answer it with `accepted` (its
    /// request masked by the offer) before anything else.
    Hello { requested: u64, accepted: u64 },
    /// An epoch was committed: acknowledge it.
    Commit(&'a EpochStats),
}

/// Receive a stream into `replica`. `on_commit(epoch)` runs after each
/// commit (where the backup acknowledges). Errors are reported in the
/// result; the replica is then at its last committed epoch.
pub fn receive<R: Read>(
    input: R,
    replica: &mut (impl EpochSink + ?Sized),
    on_commit: impl FnMut(&EpochStats) -> std::io::Result<()>,
) -> Received {
    receive_opts(input, replica, false, on_commit)
}

/// `receive`, with compressed page records (`xlz4`) accepted when the
/// connection negotiated them.
pub fn receive_opts<R: Read>(
    input: R,
    replica: &mut (impl EpochSink + ?Sized),
    xlz4: bool,
    mut on_commit: impl FnMut(&EpochStats) -> std::io::Result<()>,
) -> Received {
    let preset = if xlz4 { feature::XLZ4 } else { 0 };
    receive_inner(input, replica, preset, 0, None, |ev| match ev {
        Event::Hello { .. } => Ok(()),
        Event::Commit(s) => on_commit(s),
    })
}

/// Receive a live stream: a DOPPEL_HELLO first record is answered through
/// `on_event` with the requested bits that are also in `offer`, and the
/// accepted features are switched on for the rest of the stream. A stream
/// without a hello is plain.
pub fn receive_negotiated<R: Read>(
    input: R,
    replica: &mut (impl EpochSink + ?Sized),
    offer: u64,
    on_event: impl FnMut(Event<'_>) -> std::io::Result<()>,
) -> Received {
    receive_inner(input, replica, 0, offer, None, on_event)
}

/// `receive_negotiated` on a session: the stream's first record must be
/// DOPPEL_SESSION carrying `nonce` (sent to the primary on the back
/// channel for this connection), else nothing is applied and the error is
/// [`ReceiveError::Session`].
pub fn receive_session<R: Read>(
    input: R,
    replica: &mut (impl EpochSink + ?Sized),
    offer: u64,
    nonce: [u8; SESSION_NONCE_LEN],
    on_event: impl FnMut(Event<'_>) -> std::io::Result<()>,
) -> Received {
    receive_inner(input, replica, 0, offer, Some(nonce), on_event)
}

fn receive_inner<R: Read>(
    input: R,
    replica: &mut (impl EpochSink + ?Sized),
    preset: u64,
    offer: u64,
    session: Option<[u8; SESSION_NONCE_LEN]>,
    mut on_event: impl FnMut(Event<'_>) -> std::io::Result<()>,
) -> Received {
    let mut out = Received {
        epochs: Vec::new(),
        ended: false,
        error: None,
        partial: None,
        features: preset,
    };
    let limits = Limits {
        guest_pages: replica.pages(),
    };
    let mut stager = Stager::for_guest_and_disk(replica.pages(), replica.disk_size());
    let r = (|| -> Result<(), ReceiveError> {
        let mut reader = StreamReader::open(input, limits)?;
        if preset & feature::XLZ4 != 0 {
            reader.enable_xlz4().map_err(ReceiveError::Cache)?;
        }
        if let Some(want) = session {
            // Before anything else: a replayed capture, or a stream of an
            // earlier connection, has no (or another) nonce here.
            match reader.next_record() {
                Ok(Record::Session(n)) if n == want => {
                    tracing::debug!("session nonce echoed");
                }
                Ok(Record::Session(_)) => {
                    return Err(ReceiveError::Session(
                        "DOPPEL_SESSION carries another nonce than this connection's \
                         (a replayed stream?)"
                            .into(),
                    ))
                }
                Ok(other) => {
                    return Err(ReceiveError::Session(format!(
                        "the first record is {}, not DOPPEL_SESSION with this connection's \
                         nonce (a replayed capture, or a primary without TLS session support?)",
                        record_name(&other)
                    )))
                }
                Err(e) => {
                    return Err(ReceiveError::Session(format!(
                        "no DOPPEL_SESSION record: {e}"
                    )))
                }
            }
        }
        loop {
            let before = reader.offset();
            let rec = reader.next_record()?;
            if let Record::Session(_) = rec {
                return Err(ReceiveError::Session(
                    "DOPPEL_SESSION arrived, but this connection has no session nonce".into(),
                ));
            }
            if let Record::Hello(requested) = rec {
                // The reader allows it only as the first record.
                let mut accepted = requested & offer & feature::KNOWN;
                if accepted & feature::XLZ4 != 0 {
                    if let Err(e) = reader.enable_xlz4() {
                        // Plain pages still replicate: decline, go on.
                        tracing::warn!("compression declined: {e}");
                        accepted &= !feature::XLZ4;
                    }
                }
                out.features = accepted;
                tracing::info!("primary asked for features {requested:#x}; accepted {accepted:#x}");
                on_event(Event::Hello {
                    requested,
                    accepted,
                })
                .map_err(ReceiveError::Hello)?;
                continue;
            }
            match stager.push(rec, reader.offset() - before)? {
                Staged::More => {}
                Staged::Epoch(e, stats) => {
                    let spare = replica.commit(e)?;
                    reader.recycle_pages(spare);
                    tracing::debug!("committed epoch {} ({} pages)", stats.epoch, stats.pages);
                    out.epochs.push(stats);
                    on_event(Event::Commit(&stats)).map_err(|source| ReceiveError::Ack {
                        epoch: stats.epoch,
                        source,
                    })?;
                }
                Staged::End => {}
            }
            if reader.ended() {
                out.ended = true;
                return Ok(());
            }
        }
    })();
    if let Err(e) = r {
        out.partial = stager.pending();
        stager.discard();
        tracing::warn!("receive stopped: {e}");
        out.error = Some(e);
    }
    out
}

fn record_name(r: &Record) -> &'static str {
    match r {
        Record::End => "END",
        Record::PageData(_) => "PAGE_DATA",
        Record::TscInfo(_) => "X86_TSC_INFO",
        Record::HvmContext(_) => "HVM_CONTEXT",
        Record::HvmParams(_) => "HVM_PARAMS",
        Record::Checkpoint => "CHECKPOINT",
        Record::StaticDataEnd => "STATIC_DATA_END",
        Record::CpuidPolicy(_) => "X86_CPUID_POLICY",
        Record::MsrPolicy(_) => "X86_MSR_POLICY",
        Record::Hello(_) => "DOPPEL_HELLO",
        Record::Session(_) => "DOPPEL_SESSION",
        Record::DeviceState(_) => "DOPPEL_DEVICE_STATE",
        Record::DiskWrites(_) => "DOPPEL_DISK_WRITES",
    }
}

/// Serve one primary: receive its stream from `input` into `replica` and
/// acknowledge every committed epoch on `ack_out` (the back channel).
/// `on_commit` runs after each commit, before its ack is sent. The back
/// channel is closed with END when the stream ended with END. Every
/// feature this build knows is offered (see `serve_opts`).
pub fn serve<R: Read, W: std::io::Write>(
    input: R,
    ack_out: W,
    replica: &mut (impl EpochSink + ?Sized),
    on_commit: impl FnMut(&EpochStats),
) -> std::io::Result<Received> {
    serve_opts(input, ack_out, replica, feature::KNOWN, on_commit)
}

/// `serve`, offering only the feature bits in `offer` (0: refuse
/// compression; the primary then sends plain PAGE_DATA).
pub fn serve_opts<R: Read, W: std::io::Write>(
    input: R,
    ack_out: W,
    replica: &mut (impl EpochSink + ?Sized),
    offer: u64,
    on_commit: impl FnMut(&EpochStats),
) -> std::io::Result<Received> {
    serve_session(input, ack_out, replica, offer, None, on_commit)
}

/// `serve_opts` with an optional session: with `nonce`, DOPPEL_SESSION
/// carrying it goes out as the back channel's first record, and the
/// stream must start with its echo (see [`receive_session`]).
pub fn serve_session<R: Read, W: std::io::Write>(
    input: R,
    ack_out: W,
    replica: &mut (impl EpochSink + ?Sized),
    offer: u64,
    nonce: Option<[u8; SESSION_NONCE_LEN]>,
    mut on_commit: impl FnMut(&EpochStats),
) -> std::io::Result<Received> {
    let mut acks = crate::ack::AckWriter::new(ack_out)?;
    if let Some(n) = &nonce {
        acks.session(n)?;
    }
    let got = receive_inner(input, replica, 0, offer, nonce, |ev| match ev {
        Event::Hello { accepted, .. } => acks.features(accepted),
        Event::Commit(s) => {
            on_commit(s);
            acks.ack(s.epoch)
        }
    });
    if got.ended {
        acks.end()?;
    }
    Ok(got)
}
