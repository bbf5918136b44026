//! The file replica: journaled commit, recovery after a crash at each step;
//! one writer at a time, and `Replica::inspect` (what `doppel inspect
//! --replica` uses) looks without touching anything: it never replays or
//! drops a journal, even one a running backup is writing.

use std::path::{Path, PathBuf};
use std::process::Command;

use doppel::backup::{receive, Staged, Stager};
use doppel::epoch::ModelReplica;
use doppel::replica::{CrashPoint, Journal, Replica, ReplicaError, StagedEpoch};
use doppel::stream::{Limits, StreamReader};
use doppel::synth::{stream_bytes, SynthSpec};

const SPEC: SynthSpec = SynthSpec {
    epochs: 3,
    pages: 70,
    dirty: 9,
    seed: 3,
};

/// An empty directory for one test.
fn scratch_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("replica-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An image path in an empty directory.
fn scratch(name: &str) -> PathBuf {
    scratch_dir(name).join("guest.img")
}

fn check(rep: &Replica, m: &ModelReplica) {
    assert_eq!(rep.state().committed, m.committed);
    assert!(rep.memory().unwrap() == m.memory);
    assert_eq!(rep.state().hvm_context, m.hvm_context);
    assert_eq!(rep.state().tsc, m.tsc);
    assert_eq!(rep.state().params, m.params);
}

/// `<image>.journal`, where the file replica keeps its redo journal.
fn journal_of(img: &std::path::Path) -> PathBuf {
    let mut p = img.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// The staged epochs of the synthetic stream.
fn staged_epochs(bytes: &[u8]) -> Vec<StagedEpoch> {
    let mut rd = StreamReader::open(
        bytes,
        Limits {
            guest_pages: SPEC.pages,
        },
    )
    .unwrap();
    let mut st = Stager::for_guest(SPEC.pages);
    let mut out = Vec::new();
    while !rd.ended() {
        if let Staged::Epoch(e, _) = st.push(rd.next_record().unwrap(), 0).unwrap() {
            out.push(e);
        }
    }
    out
}

#[test]
fn receive_into_file_and_reopen() {
    let (epochs, bytes, _) = stream_bytes(&SPEC);
    let img = scratch("reopen");
    let mut rep = Replica::open_file(&img, SPEC.pages).unwrap();
    let got = receive(&bytes[..], &mut rep, |_| Ok(()));
    assert!(got.error.is_none());
    let m = ModelReplica::after(SPEC.pages, &epochs, 3);
    check(&rep, &m);
    drop(rep);
    let rep = Replica::open_file(&img, SPEC.pages).unwrap();
    check(&rep, &m);
    assert!(!journal_of(&img).exists());
}

#[test]
fn crash_at_each_commit_step() {
    let (epochs, bytes, _) = stream_bytes(&SPEC);
    let staged = staged_epochs(&bytes);
    for (crash, want) in [
        (CrashPoint::TornJournal, 2usize),
        (CrashPoint::AfterJournal, 3),
        (CrashPoint::AfterPages, 3),
    ] {
        let img = scratch(&format!("{crash:?}"));
        let mut rep = Replica::open_file(&img, SPEC.pages).unwrap();
        rep.commit(staged[0].clone()).unwrap();
        rep.commit(staged[1].clone()).unwrap();
        rep.commit_at(staged[2].clone(), crash).unwrap();
        // The "crash": it leaves the (complete or torn) journal of epoch 2.
        drop(rep);
        let journal = journal_of(&img);
        assert!(journal.exists(), "{crash:?}: no journal after the crash");
        let rep = Replica::open_file(&img, SPEC.pages).unwrap();
        check(&rep, &ModelReplica::after(SPEC.pages, &epochs, want));
        // Recovery is complete: the journal is gone, reopening changes nothing.
        assert!(
            !journal.exists(),
            "{crash:?}: {} still there after recovery",
            journal.display()
        );
        drop(rep);
        let rep = Replica::open_file(&img, SPEC.pages).unwrap();
        check(&rep, &ModelReplica::after(SPEC.pages, &epochs, want));
    }
}

#[test]
fn corrupt_state_file_is_an_error_not_a_reset() {
    let (_, bytes, _) = stream_bytes(&SPEC);
    let img = scratch("badstate");
    let mut rep = Replica::open_file(&img, SPEC.pages).unwrap();
    assert!(receive(&bytes[..], &mut rep, |_| Ok(())).error.is_none());
    drop(rep);
    let state = img.with_extension("img.state");
    let mut s = std::fs::read(&state).unwrap();
    let n = s.len();
    s[n - 1] ^= 1;
    std::fs::write(&state, s).unwrap();
    let e = Replica::open_file(&img, SPEC.pages)
        .err()
        .expect("corrupt state");
    assert!(e.to_string().contains("state file"), "{e}");
    // A wrong guest size is refused too.
    std::fs::remove_file(&state).unwrap();
    assert!(Replica::open_file(&img, SPEC.pages + 1).is_err());
}

/// Every file of the replica directory and its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_writer_is_refused_until_the_first_closes() {
    let dir = scratch_dir("writers");
    let img = dir.join("memory.img");
    let first = Replica::open_file(&img, SPEC.pages).unwrap();
    let e = Replica::open_file(&img, SPEC.pages)
        .err()
        .expect("second writer");
    assert!(matches!(e, ReplicaError::Busy { .. }), "{e}");
    assert!(
        e.to_string().contains("in use by another doppel process"),
        "{e}"
    );
    drop(first);
    Replica::open_file(&img, SPEC.pages).unwrap();
}

#[test]
fn inspect_changes_nothing_and_reports_a_pending_journal() {
    let (epochs, bytes, _) = stream_bytes(&SPEC);
    let staged = staged_epochs(&bytes);
    let dir = scratch_dir("pending");
    let img = dir.join("memory.img");
    let mut rep = Replica::open_file(&img, SPEC.pages).unwrap();
    rep.commit(staged[0].clone()).unwrap();
    rep.commit(staged[1].clone()).unwrap();
    // Epoch 2 reaches its commit point (journal synced), nothing applied.
    rep.commit_at(staged[2].clone(), CrashPoint::AfterJournal)
        .unwrap();
    let before = snapshot(&dir);
    assert!(before.iter().any(|(n, _)| n == "memory.img.journal"));

    // While the writer still holds the replica.
    let v = Replica::inspect(&img).unwrap();
    assert!(v.in_use);
    assert_eq!(v.pages, SPEC.pages);
    assert_eq!(v.state.committed, 2);
    assert!(matches!(&v.journal, Journal::Pending(s) if s.committed == 3));
    let want = ModelReplica::after(SPEC.pages, &epochs, 3);
    assert_eq!(v.committed().committed, want.committed);
    assert_eq!(v.committed().hvm_context, want.hvm_context);
    assert_eq!(snapshot(&dir), before, "inspect changed the replica");

    // After the writer is gone: still read-only, no longer in use.
    drop(rep);
    let v = Replica::inspect(&img).unwrap();
    assert!(!v.in_use);
    assert_eq!(snapshot(&dir), before, "inspect changed the replica");

    // The next writer finishes the commit: what inspect called committed.
    let rep = Replica::open_file(&img, SPEC.pages).unwrap();
    assert_eq!(rep.state().committed, 3);
    assert!(rep.memory().unwrap() == want.memory);
    drop(rep);
    assert!(!dir.join("memory.img.journal").exists());
}

#[test]
fn inspect_leaves_a_torn_journal_for_the_writer_to_drop() {
    let (epochs, bytes, _) = stream_bytes(&SPEC);
    let staged = staged_epochs(&bytes);
    let dir = scratch_dir("torn");
    let img = dir.join("memory.img");
    let mut rep = Replica::open_file(&img, SPEC.pages).unwrap();
    rep.commit(staged[0].clone()).unwrap();
    rep.commit_at(staged[1].clone(), CrashPoint::TornJournal)
        .unwrap();
    drop(rep);
    let before = snapshot(&dir);
    let v = Replica::inspect(&img).unwrap();
    assert!(matches!(v.journal, Journal::Torn));
    assert_eq!(v.committed().committed, 1);
    assert_eq!(snapshot(&dir), before, "inspect changed the replica");
    let rep = Replica::open_file(&img, SPEC.pages).unwrap();
    let want = ModelReplica::after(SPEC.pages, &epochs, 1);
    assert_eq!(rep.state().committed, 1);
    assert!(rep.memory().unwrap() == want.memory);
    assert!(!dir.join("memory.img.journal").exists());
}

#[test]
fn inspect_cli_reads_a_replica_that_a_writer_holds() {
    let (_, bytes, _) = stream_bytes(&SPEC);
    let staged = staged_epochs(&bytes);
    let dir = scratch_dir("cli");
    let img = dir.join("memory.img");
    let mut rep = Replica::open_file(&img, SPEC.pages).unwrap();
    rep.commit(staged[0].clone()).unwrap();
    rep.commit_at(staged[1].clone(), CrashPoint::AfterJournal)
        .unwrap();
    let before = snapshot(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["inspect", "--replica"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("70 pages, 2 committed epochs"), "{text}");
    assert!(text.contains("journal: epoch 2 committed"), "{text}");
    assert!(
        text.contains("in use: a running backup or replay"),
        "{text}"
    );
    assert_eq!(snapshot(&dir), before, "inspect changed the replica");
    drop(rep);
}
