//! The file replica: journaled commit, recovery after a crash at each step.

use std::path::PathBuf;

use doppel::backup::{receive, Staged, Stager};
use doppel::epoch::ModelReplica;
use doppel::replica::{CrashPoint, Replica, StagedEpoch};
use doppel::stream::{Limits, StreamReader};
use doppel::synth::{stream_bytes, SynthSpec};

const SPEC: SynthSpec = SynthSpec {
    epochs: 3,
    pages: 70,
    dirty: 9,
    seed: 3,
};

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("replica-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d.join("guest.img")
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
