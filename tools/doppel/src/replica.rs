//! The backup's replica: guest memory image plus the last committed vCPU
//! blob, TSC info, HVM params and static data, and the number of committed
//! epochs. It only ever changes by a whole epoch (`Replica::commit`).
//!
//! Two stores:
//! - memory (tests, benches): the epoch is checked completely before the
//!   first byte is applied, and applying to a `Vec` cannot fail, so a
//!   commit is all or nothing;
//! - file (`<image>`, `<image>.state`, `<image>.journal`): a redo journal.
//!   Commit = write the epoch's final pages and new state to the journal,
//!   fsync it and its directory (the commit point), apply the pages to the
//!   image, fsync, replace the state file (write tmp, fsync, rename, fsync
//!   dir), remove the journal. `open_file` replays a complete journal (its
//!   CRC32C matches) and drops a torn one, so after any crash the replica
//!   is exactly at the old or the new epoch. Replaying is idempotent.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::stream::records::{zero_page, PageBuf};
use crate::stream::{DiskWrite, HvmParam, PageData, Record, TscInfo, PAGE_SIZE};

/// Errors of the replica store.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt {what}")]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("pfn {pfn:#x} is beyond the replica ({pages} pages)")]
    PfnBeyondReplica { pfn: u64, pages: u64 },
    #[error("epoch is incomplete: {0} missing")]
    Incomplete(&'static str),
    #[error(
        "the primary's guest does not match the standby's: epoch 0 carries {stream} pages, \
         the standby's guest_ram has {local} pages (start both with the same guest-mem=)"
    )]
    GuestMismatch { stream: u64, local: u64 },
    #[error(
        "epoch 0 carries {stream} pages but the replica has {local} (--guest-pages): \
         give the guest's size"
    )]
    SizeMismatch { stream: u64, local: u64 },
    #[error("epoch {epoch}: the HVM context blob does not decode: {detail}")]
    BadContext { epoch: u64, detail: String },
    #[error(
        "epoch {epoch} refused, not acknowledged: the standby could not be activated from it: \
         {detail}; the standby stays at the epoch before"
    )]
    Unactivatable { epoch: u64, detail: String },
    #[error(
        "epoch {epoch} refused: a disk write of {len} bytes at byte {offset} ends beyond the \
         backup's disk copy ({size} bytes; the primary's disk is larger: give --disk a copy of \
         the same size); nothing of the epoch was applied"
    )]
    DiskWriteBeyondDisk {
        epoch: u64,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error(
        "epoch {epoch} refused: it carries {bytes} bytes of disk writes but this backup has no \
         disk copy (--disk); nothing of the epoch was applied"
    )]
    NoDisk { epoch: u64, bytes: u64 },
    #[error(
        "{path} is in use by another doppel process (a running backup or stream replay \
         holds its lock); stop that process first, or use `doppel inspect --replica` to look"
    )]
    Busy { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The committed non-memory state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommittedState {
    /// Number of committed epochs (the last committed epoch is this - 1).
    pub committed: u64,
    pub hvm_context: Vec<u8>,
    pub tsc: Option<TscInfo>,
    pub params: Vec<HvmParam>,
    pub cpuid_policy: Vec<u8>,
    pub msr_policy: Vec<u8>,
}

/// The records of one epoch, held until its CHECKPOINT.
#[derive(Clone, Debug, Default)]
pub struct StagedEpoch {
    pub pages: Vec<PageData>,
    pub tsc: Option<TscInfo>,
    pub hvm_context: Option<Vec<u8>>,
    pub params: Option<Vec<HvmParam>>,
    pub cpuid_policy: Option<Vec<u8>>,
    pub msr_policy: Option<Vec<u8>>,
    /// The device model's state at the epoch's end (DOPPEL_DEVICE_STATE).
    pub device_state: Option<Vec<u8>>,
    /// The epoch's disk writes in stream order (DOPPEL_DISK_WRITES). A
    /// `Replica` keeps memory only and drops them; a `Standby` with a
    /// disk copy applies them at commit.
    pub disk_writes: Vec<DiskWrite>,
    /// Body bytes held (disk write data and entry headers included).
    pub bytes: u64,
}

impl StagedEpoch {
    /// Take one epoch record. CHECKPOINT, END and STATIC_DATA_END are
    /// boundaries, not content, and are ignored here.
    pub fn push(&mut self, r: Record) {
        match r {
            Record::PageData(p) => {
                self.bytes += p.body_len() as u64;
                self.pages.push(p);
            }
            Record::TscInfo(t) => self.tsc = Some(t),
            Record::HvmContext(c) => {
                self.bytes += c.len() as u64;
                self.hvm_context = Some(c);
            }
            Record::HvmParams(p) => {
                self.bytes += 16 * p.len() as u64;
                self.params = Some(p);
            }
            Record::CpuidPolicy(c) => {
                self.bytes += c.len() as u64;
                self.cpuid_policy = Some(c);
            }
            Record::MsrPolicy(c) => {
                self.bytes += c.len() as u64;
                self.msr_policy = Some(c);
            }
            Record::Checkpoint | Record::End | Record::StaticDataEnd | Record::Hello(_) => {}
            Record::Session(_) => {}
            Record::DeviceState(d) => {
                self.bytes += d.len() as u64;
                self.device_state = Some(d);
            }
            Record::DiskWrites(w) => {
                self.bytes += w.iter().map(|w| 16 + w.data.len() as u64).sum::<u64>();
                self.disk_writes.extend(w);
            }
        }
    }

    /// Data bytes of the epoch's disk writes.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_writes.iter().map(|w| w.data.len() as u64).sum()
    }

    /// The page buffers, for reuse by the reader.
    pub fn into_pages(self) -> impl Iterator<Item = PageBuf> {
        self.pages.into_iter().flat_map(PageData::into_pages)
    }

    /// Whether the end-of-epoch records are all there.
    pub fn check_complete(&self) -> Result<(), ReplicaError> {
        if self.tsc.is_none() {
            return Err(ReplicaError::Incomplete("X86_TSC_INFO"));
        }
        if self.hvm_context.is_none() {
            return Err(ReplicaError::Incomplete("HVM_CONTEXT"));
        }
        if self.params.is_none() {
            return Err(ReplicaError::Incomplete("HVM_PARAMS"));
        }
        Ok(())
    }

    /// The final contents of every page the epoch touches (later entries
    /// win), `None` for pfns sent as invalid (they become zero pages).
    pub fn final_pages(&self) -> BTreeMap<u64, Option<&[u8]>> {
        let mut m = BTreeMap::new();
        for p in &self.pages {
            for e in p.entries() {
                m.insert(e.pfn, e.data);
            }
        }
        m
    }
}

enum Store {
    Memory(Vec<PageBuf>),
    File(FileStore),
}

struct FileStore {
    image: File,
    image_path: PathBuf,
    state_path: PathBuf,
    journal_path: PathBuf,
}

/// Where a test wants the file commit to stop, simulating a crash (the
/// `crash-hooks` feature, which only the tests turn on).
#[cfg(feature = "crash-hooks")]
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    None,
    /// Journal written and synced, nothing applied.
    AfterJournal,
    /// Journal written, pages applied, state file not yet replaced.
    AfterPages,
    /// A torn journal (half written), nothing applied.
    TornJournal,
}

/// The backup's copy of the guest.
pub struct Replica {
    pages: u64,
    store: Store,
    state: CommittedState,
}

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
const JOURNAL_MAGIC: &[u8; 8] = b"DPLJRN01";
const STATE_MAGIC: &[u8; 8] = b"DPLSTA01";

impl Replica {
    /// An in-memory replica of `pages` zero pages, nothing committed.
    pub fn in_memory(pages: u64) -> Self {
        Self {
            pages,
            store: Store::Memory((0..pages).map(|_| zero_page()).collect()),
            state: CommittedState::default(),
        }
    }

    /// Open (or create) a file replica of `pages` pages at `image`,
    /// recovering from an interrupted commit. The replica is locked
    /// (an exclusive `flock` on the image) for as long as it is open, so a
    /// second writer gets [`ReplicaError::Busy`] instead of replaying or
    /// dropping a journal under a running backup's feet.
    pub fn open_file(image: &Path, pages: u64) -> Result<Self, ReplicaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(image)
            .map_err(io_err(image))?;
        lock_exclusive(&file, image)?;
        let want = pages.checked_mul(PAGE_SIZE as u64).ok_or_else(|| {
            io_err(image)(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a guest of {pages} pages is larger than a file can be"),
            ))
        })?;
        let have = file.metadata().map_err(io_err(image))?.len();
        if have != want {
            if have != 0 {
                return Err(ReplicaError::Corrupt {
                    path: image.into(),
                    what: "image size (does not match the guest size)",
                });
            }
            file.set_len(want).map_err(io_err(image))?;
        }
        let fs = FileStore {
            image: file,
            image_path: image.into(),
            state_path: side_path(image, ".state"),
            journal_path: side_path(image, ".journal"),
        };
        let mut r = Self {
            pages,
            store: Store::File(fs),
            state: CommittedState::default(),
        };
        r.recover()?;
        Ok(r)
    }

    /// Guest size in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The committed state.
    pub fn state(&self) -> &CommittedState {
        &self.state
    }

    /// Whole guest memory as committed.
    pub fn memory(&self) -> Result<Vec<u8>, ReplicaError> {
        match &self.store {
            Store::Memory(m) => {
                let mut v = Vec::with_capacity(m.len() * PAGE_SIZE);
                for p in m {
                    v.extend_from_slice(&p[..]);
                }
                Ok(v)
            }
            Store::File(f) => {
                let mut v = vec![0; self.pages as usize * PAGE_SIZE];
                f.image
                    .read_exact_at(&mut v, 0)
                    .map_err(io_err(&f.image_path))?;
                Ok(v)
            }
        }
    }

    /// Apply one complete, validated epoch, all or nothing. Returns page
    /// buffers that are free again (for `StreamReader::recycle_pages`).
    ///
    /// Memory store: pages are moved into the replica by pointer (the
    /// displaced buffers are returned), so a commit copies no page data.
    pub fn commit(&mut self, staged: StagedEpoch) -> Result<Vec<PageBuf>, ReplicaError> {
        let (staged, next) = self.prepare(staged)?;
        // Nothing below fails for the memory store; the file store's
        // commit point is the synced journal.
        let spare = match &mut self.store {
            Store::Memory(m) => {
                let mut spare = Vec::new();
                for p in staged.pages {
                    for (pfn, d) in p.into_entries() {
                        let slot = &mut m[pfn as usize];
                        match d {
                            Some(b) => spare.push(std::mem::replace(slot, b)),
                            None => slot.fill(0),
                        }
                    }
                }
                spare
            }
            Store::File(f) => {
                {
                    let pages = staged.final_pages();
                    write_journal(f, &next, &pages)?;
                    apply_pages(f, &pages)?;
                    finish_commit(f, &next)?;
                }
                staged.into_pages().collect()
            }
        };
        self.state = next;
        Ok(spare)
    }

    /// [`Replica::commit`] cut short at `crash`, as a crash there would
    /// leave a file replica (a memory replica commits in full).
    #[cfg(feature = "crash-hooks")]
    #[doc(hidden)]
    pub fn commit_at(
        &mut self,
        staged: StagedEpoch,
        crash: CrashPoint,
    ) -> Result<Vec<PageBuf>, ReplicaError> {
        if crash == CrashPoint::None || !matches!(self.store, Store::File(_)) {
            return self.commit(staged);
        }
        let (staged, next) = self.prepare(staged)?;
        let Store::File(f) = &mut self.store else {
            unreachable!("checked above")
        };
        let pages = staged.final_pages();
        write_journal(f, &next, &pages)?;
        match crash {
            CrashPoint::TornJournal => {
                // Half the payload made it to the disk.
                let j = &f.journal_path;
                let len = fs::metadata(j).map_err(io_err(j))?.len();
                File::options()
                    .write(true)
                    .open(j)
                    .and_then(|file| file.set_len(24 + (len - 24) / 2))
                    .map_err(io_err(j))?;
            }
            CrashPoint::AfterPages => apply_pages(f, &pages)?,
            CrashPoint::None | CrashPoint::AfterJournal => {}
        }
        Ok(Vec::new())
    }

    /// Check a staged epoch against this replica; the epoch with its
    /// state taken out, and the state committing it gives.
    fn prepare(
        &self,
        mut staged: StagedEpoch,
    ) -> Result<(StagedEpoch, CommittedState), ReplicaError> {
        staged.check_complete()?;
        if let Some(pfn) = staged
            .pages
            .iter()
            .flat_map(|p| p.entries())
            .map(|e| e.pfn)
            .find(|&pfn| pfn >= self.pages)
        {
            return Err(ReplicaError::PfnBeyondReplica {
                pfn,
                pages: self.pages,
            });
        }
        // A file replica's first epoch must set every page (the image
        // would otherwise keep zero pages the guest never had).
        if self.state.committed == 0 && matches!(self.store, Store::File(_)) {
            let stream = staged.final_pages().len() as u64;
            if stream != self.pages {
                return Err(ReplicaError::SizeMismatch {
                    stream,
                    local: self.pages,
                });
            }
        }
        let mut next = self.state.clone();
        next.committed += 1;
        next.tsc = staged.tsc;
        next.hvm_context = staged.hvm_context.take().unwrap_or_default();
        next.params = staged.params.take().unwrap_or_default();
        if let Some(c) = staged.cpuid_policy.take() {
            next.cpuid_policy = c;
        }
        if let Some(c) = staged.msr_policy.take() {
            next.msr_policy = c;
        }
        Ok((staged, next))
    }

    fn recover(&mut self) -> Result<(), ReplicaError> {
        let Store::File(f) = &mut self.store else {
            return Ok(());
        };
        match read_framed(&f.journal_path, JOURNAL_MAGIC)? {
            Some(payload) => {
                let (next, pages) =
                    decode_journal(&payload, self.pages).ok_or_else(|| ReplicaError::Corrupt {
                        path: f.journal_path.clone(),
                        what: "journal payload",
                    })?;
                tracing::info!(
                    "replaying journal of epoch {} ({} pages)",
                    next.committed,
                    pages.len()
                );
                let refs: BTreeMap<u64, Option<&[u8]>> =
                    pages.iter().map(|(k, v)| (*k, v.as_deref())).collect();
                apply_pages(f, &refs)?;
                finish_commit(f, &next)?;
            }
            None => {
                if f.journal_path.exists() {
                    tracing::warn!("dropping torn journal {}", f.journal_path.display());
                    fs::remove_file(&f.journal_path).map_err(io_err(&f.journal_path))?;
                }
            }
        }
        self.state = read_state(&f.state_path)?;
        Ok(())
    }

    /// Looks at a file replica without changing anything: no file is
    /// created, no journal replayed or dropped, no lock taken that could
    /// stop a backup. Safe while a backup or replay is writing it.
    pub fn inspect(image: &Path) -> Result<ReplicaView, ReplicaError> {
        let file = File::open(image).map_err(io_err(image))?;
        let len = file.metadata().map_err(io_err(image))?.len();
        if !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(ReplicaError::Corrupt {
                path: image.into(),
                what: "image size (not a whole number of pages)",
            });
        }
        let pages = len / PAGE_SIZE as u64;
        // A shared lock is refused only while a writer holds the replica.
        // Let go at once: held while the journal is read, the shared lock
        // would make a writer starting meanwhile fail with Busy.
        let in_use = match file.try_lock_shared() {
            Ok(()) => {
                file.unlock().map_err(io_err(image))?;
                false
            }
            Err(fs::TryLockError::WouldBlock) => true,
            Err(fs::TryLockError::Error(e)) => return Err(io_err(image)(e)),
        };
        let journal_path = side_path(image, ".journal");
        let journal = match read_framed(&journal_path, JOURNAL_MAGIC)? {
            Some(payload) => match decode_journal(&payload, pages) {
                Some((next, _)) => Journal::Pending(next),
                None => {
                    return Err(ReplicaError::Corrupt {
                        path: journal_path,
                        what: "journal payload",
                    })
                }
            },
            None if journal_path.exists() => Journal::Torn,
            None => Journal::None,
        };
        let state = read_state(&side_path(image, ".state"))?;
        Ok(ReplicaView {
            pages,
            state,
            journal,
            in_use,
        })
    }
}

/// What [`Replica::inspect`] found.
#[derive(Debug)]
pub struct ReplicaView {
    /// Guest size in pages (from the image size).
    pub pages: u64,
    /// The state file's committed state.
    pub state: CommittedState,
    /// The journal, if any.
    pub journal: Journal,
    /// A backup or replay holds the replica open right now.
    pub in_use: bool,
}

impl ReplicaView {
    /// The committed state: a complete journal is already committed (its
    /// sync is the commit point) and wins over the state file.
    pub fn committed(&self) -> &CommittedState {
        match &self.journal {
            Journal::Pending(next) => next,
            _ => &self.state,
        }
    }
}

/// A replica's redo journal, as found on disk.
#[derive(Debug)]
pub enum Journal {
    /// None: the last commit finished.
    None,
    /// Complete: the epoch it carries is committed; its pages are being,
    /// or after a crash will be, applied.
    Pending(CommittedState),
    /// Torn (a commit interrupted before its commit point, or one being
    /// written right now): it will be dropped, the state file stands.
    Torn,
}

/// Takes the writer's lock on an open image. A `flock` belongs to the open
/// file, and a child process this one is starting shares that file until
/// its `exec` closes it: a lock just let go can look held for that
/// instant. So a lock still held after a short wait (200 ms) is another
/// writer's.
fn lock_exclusive(file: &File, image: &Path) -> Result<(), ReplicaError> {
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock)
                if start.elapsed() < std::time::Duration::from_millis(200) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(ReplicaError::Busy { path: image.into() })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(image)(e)),
        }
    }
}

/// `<image><ext>`: the state and journal files beside an image.
fn side_path(image: &Path, ext: &str) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(ext);
    PathBuf::from(p)
}

/// The state file's committed state; the default if there is none.
fn read_state(path: &Path) -> Result<CommittedState, ReplicaError> {
    match read_framed(path, STATE_MAGIC)? {
        Some(p) => {
            let mut c = Cursor(&p);
            let s = decode_state(&mut c).ok_or_else(|| ReplicaError::Corrupt {
                path: path.into(),
                what: "state payload",
            })?;
            if !c.0.is_empty() {
                return Err(ReplicaError::Corrupt {
                    path: path.into(),
                    what: "state payload (trailing bytes)",
                });
            }
            Ok(s)
        }
        None if path.exists() => Err(ReplicaError::Corrupt {
            path: path.into(),
            what: "state file (bad magic or checksum)",
        }),
        None => Ok(CommittedState::default()),
    }
}

/// Write and sync the journal of the epoch that gives `next`: the file
/// store's commit point.
fn write_journal(
    f: &FileStore,
    next: &CommittedState,
    pages: &BTreeMap<u64, Option<&[u8]>>,
) -> Result<(), ReplicaError> {
    write_framed(&f.journal_path, JOURNAL_MAGIC, &encode_journal(next, pages))
}

fn apply_pages(f: &FileStore, pages: &BTreeMap<u64, Option<&[u8]>>) -> Result<(), ReplicaError> {
    for (&pfn, d) in pages {
        f.image
            .write_all_at(d.unwrap_or(&ZERO_PAGE), pfn * PAGE_SIZE as u64)
            .map_err(io_err(&f.image_path))?;
    }
    f.image.sync_data().map_err(io_err(&f.image_path))
}

fn finish_commit(f: &FileStore, next: &CommittedState) -> Result<(), ReplicaError> {
    let mut payload = Vec::new();
    encode_state(next, &mut payload);
    let mut tmp = f.state_path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_framed(&tmp, STATE_MAGIC, &payload)?;
    fs::rename(&tmp, &f.state_path).map_err(io_err(&f.state_path))?;
    sync_dir(&f.state_path)?;
    fs::remove_file(&f.journal_path).map_err(io_err(&f.journal_path))?;
    sync_dir(&f.journal_path)
}

fn sync_dir(p: &Path) -> Result<(), ReplicaError> {
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// File = magic, payload length u64, crc32c u32, 4 zero bytes, payload.
fn write_framed(path: &Path, magic: &[u8; 8], payload: &[u8]) -> Result<(), ReplicaError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    let mut head = Vec::with_capacity(24);
    head.extend_from_slice(magic);
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    head.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    head.extend_from_slice(&[0; 4]);
    f.write_all(&head)
        .and_then(|_| f.write_all(payload))
        .and_then(|_| f.sync_all())
        .map_err(io_err(path))?;
    sync_dir(path)
}

/// The payload of a framed file, or `None` if absent, torn or corrupt.
fn read_framed(path: &Path, magic: &[u8; 8]) -> Result<Option<Vec<u8>>, ReplicaError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    if data.len() < 24 || &data[..8] != magic || data[20..24] != [0; 4] {
        return Ok(None);
    }
    let len = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(data[16..20].try_into().expect("4 bytes"));
    let payload = &data[24..];
    if payload.len() as u64 != len || crc32c::crc32c(payload) != crc {
        return Ok(None);
    }
    Ok(Some(payload.to_vec()))
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode_state(s: &CommittedState, out: &mut Vec<u8>) {
    out.extend_from_slice(&s.committed.to_le_bytes());
    match &s.tsc {
        Some(t) => {
            out.extend_from_slice(&1u64.to_le_bytes());
            out.extend_from_slice(&t.mode.to_le_bytes());
            out.extend_from_slice(&t.khz.to_le_bytes());
            out.extend_from_slice(&t.nsec.to_le_bytes());
            out.extend_from_slice(&t.incarnation.to_le_bytes());
        }
        None => out.extend_from_slice(&0u64.to_le_bytes()),
    }
    put_blob(out, &s.hvm_context);
    out.extend_from_slice(&(s.params.len() as u64).to_le_bytes());
    for p in &s.params {
        out.extend_from_slice(&p.index.to_le_bytes());
        out.extend_from_slice(&p.value.to_le_bytes());
    }
    put_blob(out, &s.cpuid_policy);
    put_blob(out, &s.msr_policy);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn blob(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.u64()?).ok()?;
        Some(self.take(n)?.to_vec())
    }
}

fn decode_state(c: &mut Cursor<'_>) -> Option<CommittedState> {
    let committed = c.u64()?;
    let tsc = match c.u64()? {
        0 => None,
        1 => Some(TscInfo {
            mode: c.u32()?,
            khz: c.u32()?,
            nsec: c.u64()?,
            incarnation: c.u32()?,
        }),
        _ => return None,
    };
    let hvm_context = c.blob()?;
    let n = c.u64()?;
    if n > c.0.len() as u64 / 16 {
        return None;
    }
    let params = (0..n)
        .map(|_| {
            Some(HvmParam {
                index: c.u64()?,
                value: c.u64()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(CommittedState {
        committed,
        hvm_context,
        tsc,
        params,
        cpuid_policy: c.blob()?,
        msr_policy: c.blob()?,
    })
}

/// Journal payload: state, page count, then per page pfn u64, flag u64
/// (1 = data follows, 0 = zero page), data.
fn encode_journal(next: &CommittedState, pages: &BTreeMap<u64, Option<&[u8]>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(pages.len() * (PAGE_SIZE + 16) + 256);
    encode_state(next, &mut out);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for (&pfn, d) in pages {
        out.extend_from_slice(&pfn.to_le_bytes());
        match d {
            Some(d) => {
                out.extend_from_slice(&1u64.to_le_bytes());
                out.extend_from_slice(d);
            }
            None => out.extend_from_slice(&0u64.to_le_bytes()),
        }
    }
    out
}

type JournalPages = BTreeMap<u64, Option<Vec<u8>>>;

fn decode_journal(p: &[u8], limit: u64) -> Option<(CommittedState, JournalPages)> {
    let mut c = Cursor(p);
    let s = decode_state(&mut c)?;
    let n = c.u64()?;
    let mut pages = BTreeMap::new();
    for _ in 0..n {
        let pfn = c.u64()?;
        if pfn >= limit {
            return None;
        }
        let d = match c.u64()? {
            0 => None,
            1 => Some(c.take(PAGE_SIZE)?.to_vec()),
            _ => return None,
        };
        pages.insert(pfn, d);
    }
    if !c.0.is_empty() {
        return None;
    }
    Some((s, pages))
}
