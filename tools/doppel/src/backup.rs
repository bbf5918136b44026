//! The backup side's receive loop: decoder -> epoch stager -> replica.
//!
//! Records of an epoch are staged in memory; the epoch is committed to the
//! replica only when its CHECKPOINT (or, for a plain stream, END right after
//! HVM_PARAMS) arrives. Any error drops the staged epoch, so the replica
//! stays exactly at its last committed epoch.

use std::io::Read;

use crate::replica::{Replica, ReplicaError, StagedEpoch};
use crate::stream::{Limits, Record, StreamError, StreamReader};

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
}

/// Groups validated records into epochs.
pub struct Stager {
    staged: StagedEpoch,
    stats: EpochStats,
    max_staged: u64,
}

/// What pushing one record did.
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
        Self::new(pages.saturating_mul(2 * 4096).saturating_add(16 << 20))
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
}

/// Receive a stream into `replica`. `on_commit(epoch)` runs after each
/// commit (where the backup acknowledges). Errors are reported in the
/// result; the replica is then at its last committed epoch.
pub fn receive<R: Read>(
    input: R,
    replica: &mut Replica,
    on_commit: impl FnMut(&EpochStats) -> std::io::Result<()>,
) -> Received {
    receive_opts(input, replica, false, on_commit)
}

/// `receive`, with compressed page records (`xlz4`) accepted when the
/// connection negotiated them.
pub fn receive_opts<R: Read>(
    input: R,
    replica: &mut Replica,
    xlz4: bool,
    mut on_commit: impl FnMut(&EpochStats) -> std::io::Result<()>,
) -> Received {
    let mut out = Received {
        epochs: Vec::new(),
        ended: false,
        error: None,
        partial: None,
    };
    let limits = Limits {
        guest_pages: replica.pages(),
    };
    let mut stager = Stager::for_guest(replica.pages());
    let r = (|| -> Result<(), ReceiveError> {
        let mut reader = StreamReader::open(input, limits)?;
        if xlz4 {
            reader.enable_xlz4();
        }
        loop {
            let before = reader.offset();
            let rec = reader.next_record()?;
            match stager.push(rec, reader.offset() - before)? {
                Staged::More => {}
                Staged::Epoch(e, stats) => {
                    let spare = replica.commit(e)?;
                    reader.recycle_pages(spare);
                    tracing::debug!("committed epoch {} ({} pages)", stats.epoch, stats.pages);
                    out.epochs.push(stats);
                    on_commit(&stats).map_err(|source| ReceiveError::Ack {
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

/// Serve one primary: receive its stream from `input` into `replica` and
/// acknowledge every committed epoch on `ack_out` (the back channel).
/// `on_commit` runs after each commit, before its ack is sent. The back
/// channel is closed with END when the stream ended with END.
pub fn serve<R: Read, W: std::io::Write>(
    input: R,
    ack_out: W,
    replica: &mut Replica,
    mut on_commit: impl FnMut(&EpochStats),
) -> std::io::Result<Received> {
    let mut acks = crate::ack::AckWriter::new(ack_out)?;
    let got = receive(input, replica, |s| {
        on_commit(s);
        acks.ack(s.epoch)
    });
    if got.ended {
        acks.end()?;
    }
    Ok(got)
}
