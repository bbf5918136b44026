//! The primary side: serve the hypervisor's rings, turn each staged
//! checkpoint into libxc records, ship it, and release the epoch once the
//! backup has committed it.
//!
//! Protocol (docs/REPLICATION.md):
//! 1. `LogDirtyEnable{WriteProtect}` on the command ring; its response must
//!    be `Done` (an errno is reported by name).
//! 2. Per `CheckpointReady` event (epochs 0, 1, 2, ... in order; epoch 0
//!    carries every guest pfn exactly once, later epochs distinct pfns):
//!    check its spans against the control view, copy pfn list, pages and
//!    the HVM context blob out of machine memory, validate them, write
//!    PAGE_DATA* X86_TSC_INFO HVM_CONTEXT HVM_PARAMS CHECKPOINT, flush.
//! 3. With a backup: wait for its ack of that epoch on the back channel.
//! 4. Push the `EventAck` (frees the staging area), then
//!    `CommitEpoch{epoch}` and wait for `Done` (output release):
//!    [`Primary::release`], the one place output is released. A lost
//!    backup does not end a run driven by [`crate::protect`]: it releases
//!    on unprotected and starts a new stream session when a backup is back.
//!
//! 5. On every orderly exit (`--epochs N` reached, SIGINT/SIGTERM; an
//!    event timeout only for `--record`, since with a backup a standby
//!    takes over) the caller sends `Detach` ([`Primary::detach`]):
//!    the hypervisor runs the guest on, unprotected, and a later primary
//!    can attach again ([`Primary::attach`] at the rings' current indices).
//!
//! There are no interrupts between the emulated machine and this process:
//! both rings are polled (spin briefly, then sleep 1 ms), with the rings'
//! final-check rule applied before every sleep.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doppel_abi::control::{AbiError, Features, Field, ALIVE_OFFSET, HELD_OFFSET, PAUSE_OFFSET};
use doppel_abi::msg::{op, Ack, CheckpointReady, LogDirtyMode, Reply};
use doppel_abi::ring::{ring_entries, slot_size, RingError, HEADER_SIZE, REQ_PROD, RSP_PROD};
use doppel_abi::{
    AtomicMem64, Command, CommandEntry, CommandFront, DecodeError, Errno, Event, EventBack,
    ResponseEntry, SharedMem,
};
use zerocopy::FromBytes;

use crate::ack::{AckReader, BackMsg};
use crate::machine::{describe, Control, MachineRam, PAGE};
use crate::stream::format::{feature, SESSION_NONCE_LEN};
use crate::stream::{OutPage, StreamError, StreamWriter, TscInfo, XorCache};

pub use crate::stream::format::{XEN_MAJOR, XEN_MINOR};

/// Most vCPUs a context blob may describe.
pub const MAX_VCPUS: usize = 64;

/// Why the primary stopped.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("{0}")]
    Machine(#[from] crate::machine::MachineError),
    #[error(
        "this machine is a standby; `doppel primary` replicates a running primary \
         (hypervisor mode=primary). A standby's RAM is filled by `doppel backup`, which \
         starts it with Activate ({why})"
    )]
    Standby { why: &'static str },
    #[error("{ring} ring: {}", ring_text(*.err))]
    Ring { ring: &'static str, err: RingError },
    #[error("{what} from the hypervisor does not decode: {}", decode_text(*.err))]
    Decode {
        what: &'static str,
        err: DecodeError,
    },
    #[error("{cmd} failed in the hypervisor: {}", errno_text(*.errno))]
    CommandFailed { cmd: &'static str, errno: Errno },
    #[error("{cmd}: the hypervisor answered {detail}")]
    BadResponse { cmd: &'static str, detail: String },
    #[error("checkpoint of epoch {epoch}: {}", describe(*.err))]
    Span { epoch: u64, err: AbiError },
    #[error("checkpoint for epoch {got} arrived, expected epoch {want} (epochs must come in order from 0)")]
    EpochOrder { got: u64, want: u64 },
    #[error("checkpoint of epoch {epoch}: {detail}")]
    BadCheckpoint { epoch: u64, detail: String },
    #[error("the hypervisor reported an error in epoch {epoch} (op {op}): {}", errno_text(*.errno))]
    HypervisorError { epoch: u64, op: u32, errno: Errno },
    #[error("the hypervisor stopped answering: no {what} within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("{path}: the machine RAM file disappeared (hypervisor gone)")]
    Gone { path: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The backup answered but the link could not be set up: the TLS
    /// handshake failed (not the pinned certificate, no TLS).
    #[error("connecting to {addr}: {why}")]
    LinkRefused { addr: String, why: String },
    #[error("sending epoch {epoch}: {source}")]
    Send { epoch: u64, source: std::io::Error },
    #[error("back channel, waiting for the ack of epoch {epoch}: {source}")]
    Ack { epoch: u64, source: StreamError },
    #[error("back channel: ack for epoch {got} while waiting for epoch {epoch}")]
    WrongAck { epoch: u64, got: u64 },
    #[error("back channel: the backup closed it before acknowledging epoch {epoch}")]
    AckClosed { epoch: u64 },
    #[error(
        "the backup did not answer the feature hello (compression request) within {secs} s; \
         a backup without compression support ignores it: run without --compress"
    )]
    HelloTimeout { secs: u64 },
    #[error("the backup's answer to the feature hello is invalid: {detail}")]
    BadHello { detail: String },
    #[error("fenced before committing epoch {epoch}: {why}")]
    Fenced { epoch: u64, why: String },
}

impl PrimaryError {
    /// Exit code of `doppel primary` for this error (see main.rs).
    pub fn exit_code(&self) -> u8 {
        match self {
            PrimaryError::Machine(crate::machine::MachineError::Io { .. })
            | PrimaryError::Connect { .. } => 3,
            PrimaryError::Timeout { .. } | PrimaryError::Gone { .. } => 4,
            PrimaryError::Send { .. }
            | PrimaryError::AckClosed { .. }
            | PrimaryError::LinkRefused { .. }
            | PrimaryError::HelloTimeout { .. } => 5,
            PrimaryError::Fenced { .. } => 6,
            PrimaryError::Ack { source, .. }
                if source.is_truncation() || matches!(source, StreamError::Io { .. }) =>
            {
                5
            }
            _ => 1,
        }
    }

    /// Whether `Detach` is still worth sending after this error: not when
    /// the rings themselves are broken, the machine is gone or the
    /// hypervisor reported its own failure (it is stopping).
    pub fn can_detach(&self) -> bool {
        !matches!(
            self,
            PrimaryError::Ring { .. }
                | PrimaryError::Gone { .. }
                | PrimaryError::Machine(_)
                | PrimaryError::HypervisorError { .. }
                | PrimaryError::Standby { .. }
                | PrimaryError::Fenced { .. }
        )
    }

    /// Whether the error is the loss of the backup connection (exit code
    /// 5): the backup died, or the link to it broke.
    pub fn lost_backup(&self) -> bool {
        self.exit_code() == 5
    }
}

fn ring_text(e: RingError) -> String {
    match e {
        RingError::PeerOverrun { prod, cons } => format!(
            "the hypervisor's producer index is {prod} with our consumer at {cons}: \
             a jump larger than the ring (misbehaving peer)"
        ),
        e => format!("{e:?}"),
    }
}

fn decode_text(e: DecodeError) -> String {
    match e {
        DecodeError::UnknownOpcode(k) => format!("unknown opcode/kind {k}"),
        DecodeError::ReservedNonZero(f) => format!("field {f} is reserved but not zero"),
        DecodeError::OutOfRange(f) => format!("field {f} is out of range"),
    }
}

/// `EINVAL (-22)`.
pub fn errno_text(e: Errno) -> String {
    let name = Errno::ALL
        .iter()
        .find(|(_, v)| *v == e)
        .map_or("errno", |(n, _)| n);
    format!("{name} (-{})", e.0)
}

/// Knobs of a primary run.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// Stop after this many committed epochs.
    pub epochs: Option<u64>,
    /// Longest wait for a command response.
    pub reply_timeout: Duration,
    /// Longest wait for the next checkpoint.
    pub event_timeout: Duration,
    /// Set (by a signal handler) to end the run at the next epoch
    /// boundary, as if `epochs` had been reached: END is written.
    pub stop: Option<Arc<AtomicBool>>,
    /// Asked right before every `CommitEpoch` (the one place output is
    /// released): a refusal fences this primary for good (the witness
    /// lease may run out: docs/REPLICATION.md, "Witness").
    pub gate: Option<crate::witness::Gate>,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        Self {
            epochs: None,
            reply_timeout: Duration::from_secs(30),
            event_timeout: Duration::from_secs(120),
            stop: None,
            gate: None,
        }
    }
}

/// One committed epoch, for progress output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochReport {
    pub epoch: u64,
    pub pages: u64,
    /// Stream bytes of the epoch.
    pub bytes: u64,
    /// Page contents of the epoch (4096 x pages).
    pub page_raw: u64,
    /// Bytes of its page records on the wire (PAGE_DATA or the compressed
    /// record: headers, pfn words, data, padding).
    pub page_wire: u64,
    /// From picking up the event to the hypervisor's answer to CommitEpoch.
    pub lag: Duration,
}

/// Disk writes as the stream writer takes them.
fn as_pairs(v: &[crate::stream::DiskWrite]) -> Vec<(u64, &[u8])> {
    v.iter().map(|x| (x.offset, x.data.as_slice())).collect()
}

/// A stream write error of `epoch` as a [`PrimaryError`].
fn send(epoch: u64) -> impl Fn(std::io::Error) -> PrimaryError {
    move |source| PrimaryError::Send { epoch, source }
}

/// What a finished run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Epochs committed (released) in the hypervisor.
    pub committed: u64,
    pub pages: u64,
    pub bytes: u64,
    /// Sum of `EpochReport::page_raw` / `page_wire`.
    pub page_raw: u64,
    pub page_wire: u64,
    /// Whether the page records were compressed (negotiated).
    pub compressed: bool,
    /// The run ended because [`PrimaryConfig::stop`] was set.
    pub stopped: bool,
}

impl Summary {
    /// Count one shipped and committed epoch.
    fn add(&mut self, r: &EpochReport) {
        self.committed += 1;
        self.pages += r.pages;
        self.bytes += r.bytes;
        self.page_raw += r.page_raw;
        self.page_wire += r.page_wire;
    }

    /// Raw page bytes per wire page byte (1.0 = no gain; plain PAGE_DATA is
    /// slightly below 1 because of pfn words and headers).
    pub fn ratio(&self) -> f64 {
        if self.page_wire == 0 {
            0.0
        } else {
            self.page_raw as f64 / self.page_wire as f64
        }
    }

    /// `compression: raw=R wire=W ratio=X (xlz4|off)`, printed at exit.
    pub fn compression_line(&self) -> String {
        format!(
            "compression: raw={} wire={} ratio={:.2} ({})",
            self.page_raw,
            self.page_wire,
            self.ratio(),
            if self.compressed { "xlz4" } else { "off" }
        )
    }
}

/// Where the stream goes: a backup (with its back channel) or a file.
pub struct Output<W: Write, R: Read> {
    writer: StreamWriter<W>,
    acks: Option<AckReader<R>>,
    /// Headers (and the hello) already written by `negotiate`.
    started: bool,
    /// Present when the backup accepted compressed page records.
    xlz4: Option<XorCache>,
    /// Heartbeat interval (backup only) and when the last one went out.
    heartbeat: Option<Duration>,
    last_beat: Instant,
    /// The backup's session nonce, echoed right after the headers.
    session: Option<[u8; SESSION_NONCE_LEN]>,
    /// The hypervisor's liveness counter when the last heartbeat went out.
    beat_alive: Option<u64>,
}

impl<W: Write, R: Read> Output<W, R> {
    /// The stream's headers (and the session hello) unless `negotiate`
    /// wrote them, then STATIC_DATA_END.
    fn open_stream(&mut self) -> Result<(), PrimaryError> {
        if !self.started {
            self.started = true;
            self.writer.headers(XEN_MAJOR, XEN_MINOR).map_err(send(0))?;
            if let Some(n) = self.session {
                self.writer.session(&n).map_err(send(0))?;
            }
        }
        self.writer.static_data_end().map_err(send(0))
    }

    /// One epoch's pages, whole records at a time (so the stream is the
    /// same bytes with or without the progress bar the initial sync shows).
    fn write_pages(&mut self, batch: &[OutPage<'_>], epoch: u64) -> Result<(), PrimaryError> {
        let pages = batch.len() as u64;
        let chunk = crate::stream::format::MAX_BATCH_PFNS as usize * 16;
        let mut shown = (epoch == 0 && pages >= crate::progress::SHOW_FROM_PAGES)
            .then(|| crate::progress::Progress::pages("initial sync (epoch 0)", pages));
        for part in batch.chunks(chunk) {
            match &mut self.xlz4 {
                Some(cache) => self.writer.page_data_xlz4(part, cache),
                None => self.writer.page_data(part),
            }
            .map_err(send(epoch))?;
            if let Some(p) = &mut shown {
                p.add(part.len() as u64);
            }
        }
        if let Some(p) = shown {
            p.finish();
        }
        Ok(())
    }

    /// Wait for the backup's ack of `epoch`; whether there is a backup to
    /// ack (a capture has none).
    fn await_ack(&mut self, epoch: u64) -> Result<bool, PrimaryError> {
        let Some(acks) = &mut self.acks else {
            return Ok(false);
        };
        loop {
            match acks.next_msg() {
                Ok(BackMsg::Ack(k)) if k == epoch => return Ok(true),
                Ok(BackMsg::Ack(got)) => return Err(PrimaryError::WrongAck { epoch, got }),
                Ok(BackMsg::State(s)) => tracing::debug!("backup state {s}"),
                Ok(BackMsg::Session(_)) => {
                    return Err(PrimaryError::BadHello {
                        detail: "DOPPEL_SESSION after the first record".into(),
                    })
                }
                Ok(BackMsg::Features(f)) => {
                    return Err(PrimaryError::BadHello {
                        detail: format!("DOPPEL_FEATURES ({f:#x}) although no hello was sent"),
                    })
                }
                Ok(BackMsg::End) => return Err(PrimaryError::AckClosed { epoch }),
                Err(source) => return Err(PrimaryError::Ack { epoch, source }),
            }
        }
    }

    /// END the stream after stream epoch `next` - 1 and see the backup
    /// close its back channel.
    fn close_stream(&mut self, next: u64) -> Result<(), PrimaryError> {
        self.writer
            .end()
            .and_then(|_| self.writer.flush())
            .map_err(send(next))?;
        if let Some(acks) = &mut self.acks {
            match acks.next_msg() {
                Ok(BackMsg::End) => tracing::debug!("backup closed the back channel"),
                other => tracing::warn!("back channel after END: {other:?}"),
            }
        }
        Ok(())
    }
    /// Replicate to a backup: stream on `w`, acks read from `acks`
    /// (already opened, expecting epoch 0 first).
    pub fn backup(w: W, acks: AckReader<R>) -> Self {
        Self {
            writer: StreamWriter::new(w),
            acks: Some(acks),
            started: false,
            xlz4: None,
            heartbeat: None,
            last_beat: Instant::now(),
            session: None,
            beat_alive: None,
        }
    }

    /// Ask the backup for `want` (`stream::format::feature` bits) before
    /// anything else: writes the headers and DOPPEL_HELLO, then waits for
    /// DOPPEL_FEATURES on the back channel (the caller bounds the wait, e.g.
    /// with a socket read timeout; `timeout` is for the message). Returns
    /// the accepted bits and switches them on. Not for captures.
    pub fn negotiate(
        &mut self,
        want: u64,
        guest_pages: u64,
        timeout: Duration,
    ) -> Result<u64, PrimaryError> {
        let bad = |detail: String| PrimaryError::BadHello { detail };
        let Some(acks) = &mut self.acks else {
            return Err(bad("a capture has no backup to negotiate with".into()));
        };
        if self.started {
            return Err(bad("negotiation must come before the first record".into()));
        }
        self.started = true;
        // Ask for compression only with the cache in hand: without it
        // plain pages replicate just the same.
        let mut want = want;
        let mut cache = None;
        if want & feature::XLZ4 != 0 {
            match XorCache::new(guest_pages) {
                Ok(c) => cache = Some(c),
                Err(e) => {
                    tracing::warn!("not asking for compression: {e}");
                    want &= !feature::XLZ4;
                }
            }
        }
        let w = &mut self.writer;
        let session = self.session;
        w.headers(XEN_MAJOR, XEN_MINOR)
            .and_then(|_| session.map_or(Ok(()), |n| w.session(&n)))
            .and_then(|_| w.hello(want))
            .and_then(|_| w.flush())
            .map_err(|source| PrimaryError::Send { epoch: 0, source })?;
        let got = match acks.next_msg() {
            Ok(BackMsg::Features(f)) => f,
            Ok(other) => return Err(bad(format!("{other:?} instead of DOPPEL_FEATURES"))),
            Err(StreamError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(PrimaryError::HelloTimeout {
                    secs: timeout.as_secs(),
                })
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        if got & !want != 0 {
            return Err(bad(format!(
                "the backup accepted features {got:#x}, but only {want:#x} were asked for"
            )));
        }
        if got & feature::XLZ4 != 0 {
            self.xlz4 = cache;
        }
        tracing::info!("backup accepted features {got:#x} (asked for {want:#x})");
        Ok(got)
    }

    /// Send a DOPPEL_HEARTBEAT at least every `every` while waiting for the
    /// hypervisor's next event, as long as the hypervisor is alive (its
    /// liveness counter moved since the last heartbeat; backup only: a
    /// capture never carries heartbeats). The backup fails over when the
    /// stream stays silent, so a hypervisor that stops (hung, or its
    /// emulator stopped) is failed over within the backup's heartbeat
    /// timeout, not only after `--event-timeout`.
    pub fn with_heartbeat(mut self, every: Duration) -> Self {
        if self.acks.is_some() {
            self.heartbeat = Some(every);
        }
        self
    }

    /// Echo the backup's session nonce (the back channel's DOPPEL_SESSION,
    /// TLS links) as the stream's first record. Backup only: a capture
    /// never carries it.
    pub fn with_session(mut self, nonce: [u8; SESSION_NONCE_LEN]) -> Self {
        if self.acks.is_some() {
            self.session = Some(nonce);
        }
        self
    }

    /// Send a heartbeat if one is due and the hypervisor's liveness
    /// counter reads `alive`, another value than at the last heartbeat.
    fn beat(&mut self, committed: u64, alive: u64) -> Result<(), PrimaryError> {
        let Some(every) = self.heartbeat else {
            return Ok(());
        };
        if !self.started || self.last_beat.elapsed() < every {
            return Ok(());
        }
        if self.beat_alive == Some(alive) {
            // The hypervisor has not run since the last heartbeat: say
            // nothing (checked again at the next poll).
            return Ok(());
        }
        self.beat_alive = Some(alive);
        self.last_beat = Instant::now();
        self.writer
            .heartbeat(committed)
            .and_then(|_| self.writer.flush())
            .map_err(|source| PrimaryError::Send {
                epoch: committed,
                source,
            })
    }

    /// The stream writer (a capture's bytes, in tests).
    pub fn writer_mut(&mut self) -> &mut StreamWriter<W> {
        &mut self.writer
    }

    /// Whether page records go out compressed.
    pub fn compressed(&self) -> bool {
        self.xlz4.is_some()
    }

    /// Write a capture (ends with END, no acks).
    pub fn record(w: W) -> Self {
        Self {
            writer: StreamWriter::new(w),
            acks: None,
            started: false,
            xlz4: None,
            heartbeat: None,
            last_beat: Instant::now(),
            session: None,
            beat_alive: None,
        }
    }
}

/// Polls with a short spin, then 1 ms sleeps; watches the deadline and the
/// machine file.
struct Poll<'a> {
    start: Instant,
    limit: Duration,
    spins: u32,
    path: &'a Path,
    last_stat: Instant,
}

impl<'a> Poll<'a> {
    fn new(limit: Duration, path: &'a Path) -> Self {
        let now = Instant::now();
        Self {
            start: now,
            limit,
            spins: 0,
            path,
            last_stat: now,
        }
    }

    fn wait(&mut self, what: impl FnOnce() -> String) -> Result<(), PrimaryError> {
        if self.spins < 200 {
            self.spins += 1;
            std::hint::spin_loop();
            if self.spins.is_multiple_of(20) {
                std::thread::yield_now();
            }
            return Ok(());
        }
        if self.start.elapsed() >= self.limit {
            return Err(PrimaryError::Timeout {
                what: what(),
                secs: self.limit.as_secs(),
            });
        }
        if self.last_stat.elapsed() >= Duration::from_secs(1) {
            self.last_stat = Instant::now();
            if !self.path.exists() {
                return Err(PrimaryError::Gone {
                    path: self.path.display().to_string(),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    }
}

/// The primary's state between epochs.
pub struct Primary<'m> {
    machine: &'m MachineRam,
    ctl: Control,
    win: AtomicMem64<'m>,
    cmd: CommandFront<AtomicMem64<'m>>,
    evt: EventBack<AtomicMem64<'m>>,
    next_id: u32,
    cfg: PrimaryConfig,
    // Buffers reused across epochs.
    pfn_bytes: Vec<u8>,
    pages: Vec<u8>,
    blob: Vec<u8>,
    seen: Vec<u64>,
    /// `LogDirtyEnable` was answered `Done` in this session.
    enabled: bool,
    /// A [`PrimaryConfig::gate`] refused a release: no CommitEpoch and
    /// no Detach from this session any more.
    fenced: bool,
    /// The hypervisor epoch expected next (= epochs released so far in
    /// this hypervisor session; stream sessions may start later).
    next_epoch: u64,
    /// The checkpoint taken and not yet released: (kind, seq, epoch).
    pending: Option<(u32, u32, u64)>,
    /// When the pending checkpoint was taken, and its pages.
    taken: Option<(Instant, u64)>,
    /// Every guest page as of the last checkpoint taken
    /// ([`Primary::keep_mirror`]): what a new backup's epoch 0 carries.
    mirror: Option<Vec<u8>>,
    /// The guest's device model, when this tool serves its devices
    /// (`--net`, `--disk`): its sealed state and disk writes ride in each
    /// checkpoint, its held frames go out at each commit.
    devices: Option<Arc<dyn crate::devices::EpochDevices>>,
}

fn ring(ring: &'static str) -> impl Fn(RingError) -> PrimaryError {
    move |err| PrimaryError::Ring { ring, err }
}

/// The command ring's last response (in the slot before `rsp_prod`), when
/// every request was answered; `None` when `req_prod != rsp_prod` or the
/// region holds no ring. Reads one slot inside the region only.
fn last_response(
    win: &AtomicMem64<'_>,
    base: usize,
    bytes: usize,
    req_prod: u32,
    rsp_prod: u32,
) -> Option<ResponseEntry> {
    let slot = slot_size::<CommandEntry, ResponseEntry>();
    let n = ring_entries(bytes, slot);
    if req_prod != rsp_prod || n == 0 {
        return None;
    }
    let at = base + HEADER_SIZE + (rsp_prod.wrapping_sub(1) & (n - 1)) as usize * slot;
    let mut raw = [0u8; core::mem::size_of::<ResponseEntry>()];
    win.read_bytes(at, &mut raw);
    ResponseEntry::read_from_bytes(&raw).ok()
}

impl<'m> Primary<'m> {
    /// Attach to the rings of a validated control area. Either the command
    /// ring is unused (both indices 0: a fresh area), or the last primary
    /// detached: every command was answered (`req_prod == rsp_prod`) and
    /// the last answer is `Detach` -> `Done`. Then this tool attaches at the
    /// current indices and answers every event still unanswered on the
    /// event ring with `EAGAIN` (they belong to the old session; a detached
    /// hypervisor drops them). Anything else is "in use". Every index read
    /// is bounded by the ring checks before any slot is used.
    ///
    /// A standby's control area is refused ([`PrimaryError::Standby`]):
    /// nothing on its rings is a primary tool's (its backup sends
    /// `Activate` there, see [`Primary::attach_standby`]).
    pub fn attach(
        machine: &'m MachineRam,
        ctl: Control,
        cfg: PrimaryConfig,
    ) -> Result<Self, PrimaryError> {
        if ctl.view.features().contains(Features::STANDBY) {
            return Err(PrimaryError::Standby {
                why: "its control area offers STANDBY; nothing was sent to it",
            });
        }
        Self::attach_inner(machine, ctl, cfg, false)
    }

    /// The backup's way onto its standby's command ring (to send
    /// `Activate`): at the current indices once every command on it was
    /// answered, whatever the answers were (a primary tool pointed at the
    /// standby by mistake got its refusal there).
    pub fn attach_standby(
        machine: &'m MachineRam,
        ctl: Control,
        cfg: PrimaryConfig,
    ) -> Result<Self, PrimaryError> {
        Self::attach_inner(machine, ctl, cfg, true)
    }

    fn attach_inner(
        machine: &'m MachineRam,
        ctl: Control,
        cfg: PrimaryConfig,
        standby: bool,
    ) -> Result<Self, PrimaryError> {
        let win = machine.window(ctl.at as usize);
        let (co, cs) = ctl.view.region(Field::CommandRing);
        let (eo, es) = ctl.view.region(Field::EventRing);
        let req_prod = win.load_u32(co + REQ_PROD);
        let rsp_prod = win.load_u32(co + RSP_PROD);
        let reattach = req_prod != 0 || rsp_prod != 0;
        if standby && req_prod != rsp_prod {
            return Err(PrimaryError::BadResponse {
                cmd: "attach",
                detail: format!(
                    "a standby command ring with unanswered commands (req_prod = {req_prod}, \
                     rsp_prod = {rsp_prod})"
                ),
            });
        }
        if reattach && !standby {
            let last = last_response(&win, co, cs, req_prod, rsp_prod);
            let detached = matches!(
                last,
                Some(r) if r.op == op::DETACH && r.status == 0
            );
            if !detached {
                let what = match last {
                    Some(r) => format!("the last command answered was op {}", r.op),
                    None => format!("rsp_prod = {rsp_prod}, commands unanswered"),
                };
                return Err(PrimaryError::BadResponse {
                    cmd: "attach",
                    detail: format!(
                        "a command ring already in use (req_prod = {req_prod}; {what}); \
                         another primary is attached, or one exited without Detach"
                    ),
                });
            }
        }
        let cmd = CommandFront::attach_at(win, co, cs, req_prod).map_err(ring("command"))?;
        // The first event not answered yet is at the event ring's rsp_prod
        // (0 on a fresh area).
        let evt_at = if reattach {
            win.load_u32(eo + RSP_PROD)
        } else {
            0
        };
        let mut evt = EventBack::attach_at(win, eo, es, evt_at).map_err(ring("event"))?;
        if reattach {
            let mut stale = 0u32;
            while let Some(e) = evt.pop_request().map_err(ring("event"))? {
                let a = Ack {
                    kind: e.kind,
                    seq: e.seq,
                    epoch: e.epoch,
                    result: Err(Errno::EAGAIN),
                };
                evt.push_response(&a.encode()).map_err(ring("event"))?;
                stale += 1;
            }
            let _ = evt.publish_responses();
            if standby {
                tracing::info!("attaching to the standby's command ring at {req_prod}");
            } else {
                tracing::info!(
                    "re-attaching to a detached hypervisor (command ring at {req_prod}, \
                     {stale} stale events answered)"
                );
            }
        }
        let pages = ctl.guest_pages() as usize;
        Ok(Self {
            machine,
            ctl,
            win,
            cmd,
            evt,
            next_id: 1,
            cfg,
            pfn_bytes: Vec::new(),
            pages: Vec::new(),
            blob: Vec::new(),
            seen: vec![0; pages.div_ceil(64)],
            enabled: false,
            fenced: false,
            next_epoch: 0,
            pending: None,
            taken: None,
            mirror: None,
            devices: None,
        })
    }

    /// Whether this session enabled log-dirty (`LogDirtyEnable` answered
    /// `Done`): only then is there anything for `Detach` to end.
    pub fn log_dirty_enabled(&self) -> bool {
        self.enabled
    }

    /// Replace the configuration given at attach (a standby's backup tool
    /// attached to send `Activate` and protects the machine afterwards).
    pub fn reconfigure(&mut self, cfg: PrimaryConfig) {
        self.cfg = cfg;
    }

    /// The hypervisor's liveness counter (hv/abi `ControlHeader::alive`),
    /// read live from the header: it moves while the hypervisor runs.
    pub fn alive(&self) -> u64 {
        let mut b = [0u8; 8];
        self.win.read_bytes(ALIVE_OFFSET, &mut b);
        u64::from_le_bytes(b)
    }

    /// The hypervisor's most recent epoch-end pause in TSC cycles (hv/abi
    /// `ControlHeader::pause_cycles`), read live; `None` when it reports
    /// none (0).
    pub fn pause_cycles(&self) -> Option<u64> {
        let mut b = [0u8; 8];
        self.win.read_bytes(PAUSE_OFFSET, &mut b);
        Some(u64::from_le_bytes(b)).filter(|&c| c != 0)
    }

    /// Guest output the hypervisor holds until commit (hv/abi
    /// `ControlHeader::held_output`), read live.
    pub fn held_output(&self) -> u64 {
        let mut b = [0u8; 8];
        self.win.read_bytes(HELD_OFFSET, &mut b);
        u64::from_le_bytes(b)
    }

    /// The control area in use.
    pub fn control(&self) -> &Control {
        &self.ctl
    }

    /// Replicate the guest's devices too: `devices` is the device model
    /// this tool runs for the machine (doppel::devices).
    pub fn set_devices(&mut self, devices: Arc<dyn crate::devices::EpochDevices>) {
        self.devices = Some(devices);
    }

    /// Keep a copy of every guest page as of the last checkpoint taken,
    /// so that a later stream session (a new backup, [`crate::protect`])
    /// can start with a full epoch 0 in the middle of the hypervisor's
    /// session. Costs one guest's RAM; call it before the first epoch.
    pub fn keep_mirror(&mut self) {
        let bytes = self.ctl.guest_pages() as usize * PAGE;
        self.mirror = Some(vec![0; bytes]);
    }

    /// The hypervisor epoch expected next: the number of epochs released
    /// since `LogDirtyEnable`.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// Whether `cfg.epochs` epochs are released.
    pub(crate) fn epochs_done(&self) -> bool {
        self.cfg.epochs.is_some_and(|n| self.next_epoch >= n)
    }

    /// Send one command and wait for its answer.
    pub fn command(&mut self, cmd: Command, name: &'static str) -> Result<Reply, PrimaryError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.cmd
            .push_request(&cmd.encode(id))
            .map_err(ring("command"))?;
        // No notification path exists: the hypervisor polls req_prod.
        let _ = self.cmd.publish_requests();
        let mut poll = Poll::new(self.cfg.reply_timeout, self.machine.path());
        let rsp = loop {
            if let Some(r) = self.cmd.pop_response().map_err(ring("command"))? {
                break r;
            }
            if self
                .cmd
                .final_check_for_responses()
                .map_err(ring("command"))?
            {
                continue;
            }
            poll.wait(|| format!("answer to {name}"))?;
        };
        let rsp = rsp.decode().map_err(|err| PrimaryError::Decode {
            what: "command response",
            err,
        })?;
        if rsp.id != id || rsp.op != cmd.opcode() {
            return Err(PrimaryError::BadResponse {
                cmd: name,
                detail: format!(
                    "op {} id {} (expected op {} id {id})",
                    rsp.op,
                    rsp.id,
                    cmd.opcode()
                ),
            });
        }
        rsp.result
            .map_err(|errno| PrimaryError::CommandFailed { cmd: name, errno })
    }

    fn expect_done(&mut self, cmd: Command, name: &'static str) -> Result<(), PrimaryError> {
        match self.command(cmd, name)? {
            Reply::Done => Ok(()),
            other => Err(PrimaryError::BadResponse {
                cmd: name,
                detail: format!("{other:?} (expected Done)"),
            }),
        }
    }

    /// Whether [`PrimaryConfig::stop`] is set.
    fn stop_requested(&self) -> bool {
        self.cfg
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// Wait for the next event entry (copied out, not decoded); `tick`
    /// runs between polls (heartbeats). `None`: the stop flag was set (an
    /// event already posted stays unconsumed: `Detach` voids it).
    fn next_event(
        &mut self,
        want: u64,
        mut tick: impl FnMut(u64) -> Result<(), PrimaryError>,
    ) -> Result<Option<doppel_abi::EventEntry>, PrimaryError> {
        let mut poll = Poll::new(self.cfg.event_timeout, self.machine.path());
        loop {
            if self.stop_requested() {
                return Ok(None);
            }
            tick(self.alive())?;
            if let Some(e) = self.evt.pop_request().map_err(ring("event"))? {
                return Ok(Some(e));
            }
            if self.evt.final_check_for_requests().map_err(ring("event"))? {
                continue;
            }
            poll.wait(|| format!("checkpoint for epoch {want}"))?;
        }
    }

    fn ack_event(&mut self, kind: u32, seq: u32, epoch: u64, result: Result<(), Errno>) {
        let a = Ack {
            kind,
            seq,
            epoch,
            result,
        };
        // The hypervisor posts one event per free slot, and we answer each
        // event we consumed exactly once, so there is always an unanswered
        // request here.
        if self.evt.push_response(&a.encode()).is_ok() {
            let _ = self.evt.publish_responses();
        }
    }

    /// Copy and check one checkpoint's parts out of machine memory.
    fn take_checkpoint(&mut self, c: &CheckpointReady) -> Result<(), PrimaryError> {
        let epoch = c.epoch;
        let bad = |detail: String| PrimaryError::BadCheckpoint { epoch, detail };
        self.ctl
            .view
            .check_checkpoint(c)
            .map_err(|err| PrimaryError::Span { epoch, err })?;
        let guest_pages = self.ctl.guest_pages();
        let n = c.dirty_count;
        if n > guest_pages {
            return Err(bad(format!(
                "dirty_count {n} exceeds the guest's {guest_pages} pages"
            )));
        }
        if epoch == 0 && n != guest_pages {
            return Err(bad(format!(
                "epoch 0 must carry every guest page: dirty_count {n}, guest has {guest_pages}"
            )));
        }
        // Spans are inside their regions, which are inside the mapping.
        self.pfn_bytes.resize(c.pfn_list.len as usize, 0);
        self.win
            .read_bytes(c.pfn_list.offset as usize, &mut self.pfn_bytes);
        self.seen.fill(0);
        for (i, w) in self.pfn_bytes.chunks_exact(8).enumerate() {
            let pfn = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            if pfn >= guest_pages {
                return Err(bad(format!(
                    "pfn_list[{i}] = {pfn:#x} is beyond the guest ({guest_pages} pages)"
                )));
            }
            let (word, bit) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
            if self.seen[word] & bit != 0 {
                return Err(bad(format!("pfn_list[{i}] = {pfn:#x} appears twice")));
            }
            self.seen[word] |= bit;
        }
        self.pages.resize(c.pages.len as usize, 0);
        self.win
            .read_bytes(c.pages.offset as usize, &mut self.pages);
        self.blob.resize(c.vcpu.len as usize, 0);
        self.win.read_bytes(c.vcpu.offset as usize, &mut self.blob);
        Ok(())
    }

    fn tsc_info(&self, epoch: u64) -> Result<TscInfo, PrimaryError> {
        let d = doppel_core::hvm::decode::<MAX_VCPUS>(&self.blob).map_err(|e| {
            PrimaryError::BadCheckpoint {
                epoch,
                detail: format!("the HVM context blob (vcpu span) does not decode: {e:?}"),
            }
        })?;
        let khz = d.header.gtsc_khz;
        let tsc = d.vcpus.first().map_or(0, |(_, v)| v.tsc);
        let nsec = if khz == 0 {
            0
        } else {
            (u128::from(tsc) * 1_000_000 / u128::from(khz)).min(u128::from(u64::MAX)) as u64
        };
        Ok(TscInfo {
            mode: 0,
            khz,
            nsec,
            incarnation: 0,
        })
    }

    /// Wait for the next `CheckpointReady` (acking `OutputAvailable`
    /// hints on the way), check it and copy it out: it is then pending
    /// until [`Primary::release`]. `tick` runs between polls. `None`: the
    /// stop flag was set. A checkpoint that fails a check is answered
    /// with its errno and ends the run.
    pub(crate) fn next_checkpoint(
        &mut self,
        mut tick: impl FnMut(u64) -> Result<(), PrimaryError>,
    ) -> Result<Option<(CheckpointReady, TscInfo)>, PrimaryError> {
        if let Some((_, _, epoch)) = self.pending {
            return Err(PrimaryError::BadCheckpoint {
                epoch,
                detail: "taken and not released before the next one".into(),
            });
        }
        let want = self.next_epoch;
        loop {
            let Some(entry) = self.next_event(want, &mut tick)? else {
                return Ok(None);
            };
            let ev = match entry.decode() {
                Ok(ev) => ev,
                Err(err) => {
                    self.ack_event(entry.kind, entry.seq, entry.epoch, Err(err.errno()));
                    return Err(PrimaryError::Decode { what: "event", err });
                }
            };
            let c = match ev {
                Event::CheckpointReady(c) => c,
                Event::OutputAvailable { epoch, bytes } => {
                    tracing::debug!("output available: epoch {epoch}, {bytes} bytes");
                    self.ack_event(entry.kind, entry.seq, epoch, Ok(()));
                    continue;
                }
                Event::Error { epoch, op, errno } => {
                    self.ack_event(entry.kind, entry.seq, epoch, Ok(()));
                    return Err(PrimaryError::HypervisorError { epoch, op, errno });
                }
            };
            if c.epoch != want {
                self.ack_event(entry.kind, entry.seq, c.epoch, Err(Errno::EINVAL));
                return Err(PrimaryError::EpochOrder { got: c.epoch, want });
            }
            let tsc = match self
                .take_checkpoint(&c)
                .and_then(|_| self.tsc_info(c.epoch))
            {
                Ok(t) => t,
                Err(e) => {
                    let errno = match &e {
                        PrimaryError::Span { .. } => Errno::EFAULT,
                        _ => Errno::EINVAL,
                    };
                    self.ack_event(entry.kind, entry.seq, c.epoch, Err(errno));
                    return Err(e);
                }
            };
            if let Some(m) = &mut self.mirror {
                for (w, d) in self
                    .pfn_bytes
                    .chunks_exact(8)
                    .zip(self.pages.chunks_exact(PAGE))
                {
                    // Checked below the guest's size by take_checkpoint.
                    let at = u64::from_le_bytes(w.try_into().expect("8 bytes")) as usize * PAGE;
                    m[at..at + PAGE].copy_from_slice(d);
                }
            }
            self.pending = Some((entry.kind, entry.seq, c.epoch));
            self.taken = Some((Instant::now(), c.dirty_count));
            crate::telemetry::global().set_epoch(c.epoch);
            return Ok(Some((c, tsc)));
        }
    }

    /// Release the pending checkpoint: push its `EventAck` (frees the
    /// staging area), then `CommitEpoch` (the hypervisor releases the
    /// epoch's held output). The one place output is released, protected
    /// or not. Returns the epoch; `None` when nothing was pending.
    pub(crate) fn release(&mut self) -> Result<Option<u64>, PrimaryError> {
        let Some((kind, seq, epoch)) = self.pending else {
            return Ok(None);
        };
        // Fence here, before the event is answered: the hypervisor keeps
        // the guest stopped at this epoch's end, output held.
        if let Some(gate) = &self.cfg.gate {
            if let Err(why) = gate.0.check(Instant::now()) {
                self.fenced = true;
                crate::telemetry::global().set_state(crate::telemetry::State::Fenced);
                return Err(PrimaryError::Fenced { epoch, why });
            }
        }
        self.pending = None;
        self.ack_event(kind, seq, epoch, Ok(()));
        self.expect_done(Command::CommitEpoch { epoch }, "CommitEpoch")?;
        self.next_epoch = epoch + 1;
        if let Some(d) = &self.devices {
            // The epoch's transmitted frames may be seen now.
            d.committed(epoch);
        }
        let (lag, pages) = self
            .taken
            .take()
            .map_or((None, 0), |(t, n)| (Some(t.elapsed()), n));
        crate::telemetry::global().committed(&crate::telemetry::Committed {
            epoch,
            pages,
            lag,
            pause_cycles: self.pause_cycles(),
        });
        crate::telemetry::global().set_held_output(self.held_output());
        Ok(Some(epoch))
    }

    /// Enable log-dirty (`LogDirtyEnable{WriteProtect}`) unless this
    /// session did already: from here on the guest's output is held until
    /// an epoch commits. Call it before letting clients' requests into
    /// the guest: a detached guest answers them unprotected at once
    /// (`UNPROTECTED_EPOCH`, which no bridge sends on). [`Primary::run`]
    /// calls it too.
    pub fn enable_log_dirty(&mut self) -> Result<(), PrimaryError> {
        if self.enabled {
            return Ok(());
        }
        self.expect_done(
            Command::LogDirtyEnable {
                mode: LogDirtyMode::WriteProtect,
            },
            "LogDirtyEnable",
        )
        .map_err(|e| match e {
            PrimaryError::CommandFailed {
                errno: Errno::EPERM,
                ..
            } => PrimaryError::Standby {
                why: "the hypervisor refused LogDirtyEnable with EPERM",
            },
            e => e,
        })?;
        self.enabled = true;
        tracing::info!(
            "log-dirty enabled; guest of {} pages at machine {:#x}",
            self.ctl.guest_pages(),
            self.ctl.guest_ram().offset
        );
        Ok(())
    }

    /// Run: enable log-dirty, then ship checkpoints until `cfg.epochs` are
    /// committed (or an error). `progress` runs after every commit.
    pub fn run<W: Write, R: Read>(
        &mut self,
        out: &mut Output<W, R>,
        mut progress: impl FnMut(&EpochReport),
    ) -> Result<Summary, PrimaryError> {
        let mut sum = Summary {
            compressed: out.xlz4.is_some(),
            ..Summary::default()
        };
        out.open_stream()?;
        self.enable_log_dirty()?;
        // A stream session may start in the middle of the hypervisor's
        // session (a new backup, crate::protect): its epoch 0 is then the
        // mirror, every page, with the vCPU of the checkpoint it is taken
        // at; stream epoch k is hypervisor epoch base + k.
        let base = self.next_epoch;
        while !self.epochs_done() {
            let want = self.next_epoch;
            let committed = sum.committed;
            let (c, tsc) = match self.next_checkpoint(|alive| out.beat(committed, alive)) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    tracing::info!("stop requested: ending the stream after epoch {committed}");
                    sum.stopped = true;
                    break;
                }
                // A capture stops at an epoch boundary here: end it
                // properly, so what was recorded stays readable.
                Err(e @ PrimaryError::Timeout { .. }) if out.acks.is_none() => {
                    out.writer
                        .end()
                        .and_then(|_| out.writer.flush())
                        .map_err(send(want))?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let t0 = Instant::now();
            let epoch = c.epoch - base;
            let mut report = self.ship_checkpoint(out, c.epoch, epoch, &tsc)?;
            let sent = Instant::now();
            let acked = out.await_ack(epoch)?;
            crate::telemetry::global().shipped(&crate::telemetry::Shipped {
                bytes: report.bytes,
                page_raw: report.page_raw,
                page_wire: report.page_wire,
                xlz4: out.xlz4.is_some(),
                ack: acked.then(|| sent.elapsed()),
            });
            // Frames held when the epoch is released: those of the epochs
            // still in flight (the one just released goes out now).
            let held = self.devices.as_ref().map(|d| d.held_frames());
            self.release()?;
            sum.add(&report);
            tracing::info!(
                "epoch {epoch}: {} pages, page bytes raw {} wire {} \
                 (ratio {:.2}), stream {} bytes{}",
                report.pages,
                report.page_raw,
                report.page_wire,
                report.page_raw as f64 / report.page_wire.max(1) as f64,
                report.bytes,
                held.map_or(String::new(), |h| format!(", held_frames={h}"))
            );
            report.lag = t0.elapsed();
            progress(&report);
        }
        out.close_stream(self.next_epoch - base)?;
        Ok(sum)
    }

    /// The pages of stream epoch `epoch` (hypervisor epoch `hv_epoch`): the
    /// staged dirty pages, or every page (the mirror) when a stream starts
    /// after the hypervisor's epoch 0.
    fn checkpoint_pages(
        &self,
        hv_epoch: u64,
        epoch: u64,
    ) -> Result<Vec<OutPage<'_>>, PrimaryError> {
        Ok(match (&self.mirror, epoch == 0 && hv_epoch != 0) {
            (Some(m), true) => m
                .chunks_exact(PAGE)
                .enumerate()
                .map(|(pfn, d)| OutPage {
                    pfn: pfn as u64,
                    data: Some(d),
                })
                .collect(),
            (None, true) => {
                return Err(PrimaryError::BadCheckpoint {
                    epoch: hv_epoch,
                    detail: "a stream starting after hypervisor epoch 0 needs the page \
                             mirror (Primary::keep_mirror)"
                        .into(),
                })
            }
            (_, false) => self
                .pfn_bytes
                .chunks_exact(8)
                .zip(self.pages.chunks_exact(PAGE))
                .map(|(w, d)| OutPage {
                    pfn: u64::from_le_bytes(w.try_into().expect("8 bytes")),
                    data: Some(d),
                })
                .collect(),
        })
    }

    /// Write one checkpoint: its pages, TSC, vCPU context, parameters and
    /// the CHECKPOINT record, flushed. Its figures (`lag` still zero).
    fn ship_checkpoint<W: Write, R: Read>(
        &self,
        out: &mut Output<W, R>,
        hv_epoch: u64,
        epoch: u64,
        tsc: &TscInfo,
    ) -> Result<EpochReport, PrimaryError> {
        let before = out.writer.bytes();
        let batch = self.checkpoint_pages(hv_epoch, epoch)?;
        let pages = batch.len() as u64;
        out.write_pages(&batch, epoch)?;
        let page_wire = out.writer.bytes() - before;
        let page_raw = (batch.len() * PAGE) as u64;
        drop(batch);
        if let Some(d) = &self.devices {
            let bad = |detail: String| PrimaryError::BadCheckpoint {
                epoch: hv_epoch,
                detail,
            };
            let sealed = d.sealed(hv_epoch, self.cfg.reply_timeout).map_err(bad)?;
            let w = &mut out.writer;
            if epoch == 0 {
                // A new stream session: the backup's disk copy is synced
                // whole first, then this epoch's writes (again) on top.
                let whole = d.whole_disk().map_err(bad)?;
                let bytes: usize = whole.iter().map(|x| x.data.len()).sum();
                tracing::info!(
                    "initial disk sync: the whole disk ({} MiB in {} writes) goes with epoch 0",
                    bytes >> 20,
                    whole.len()
                );
                w.disk_writes(&as_pairs(&whole)).map_err(send(epoch))?;
            }
            w.disk_writes(&as_pairs(&sealed.disk))
                .and_then(|_| w.device_state(&sealed.state))
                .map_err(send(epoch))?;
        }
        let w = &mut out.writer;
        w.tsc_info(tsc)
            .and_then(|_| w.hvm_context(&self.blob))
            .and_then(|_| w.hvm_params(&[]))
            .and_then(|_| w.checkpoint())
            .and_then(|_| w.flush())
            .map_err(send(epoch))?;
        Ok(EpochReport {
            epoch,
            pages,
            bytes: out.writer.bytes() - before,
            page_raw,
            page_wire,
            lag: Duration::ZERO,
        })
    }

    /// End replication: send `Detach` and wait up to `wait` for `Done`.
    /// The hypervisor then releases all held output and runs the guest
    /// unprotected; a new primary can attach. With `--serve-clients` call
    /// it only after the client bridge stopped: the output it releases
    /// was never committed and must not reach this tool's clients.
    pub fn detach(&mut self, wait: Duration) -> Result<(), PrimaryError> {
        // Detach releases all held output: never after a fence.
        if self.fenced {
            return Err(PrimaryError::Fenced {
                epoch: 0,
                why: "a fenced primary never detaches".into(),
            });
        }
        let keep = self.cfg.reply_timeout;
        self.cfg.reply_timeout = wait;
        let r = self.expect_done(Command::Detach, "Detach");
        self.cfg.reply_timeout = keep;
        r
    }
}
