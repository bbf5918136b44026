//! The device records (DOPPEL_DEVICE_STATE, DOPPEL_DISK_WRITES) through
//! the stream reader and into a standby with a disk copy (issue 21): the
//! disk copy and the committed device state change only when an epoch
//! commits (DRBD protocol D), an initial sync in epoch 0 makes the copy
//! equal to the source, and hostile records change nothing.

use std::fs::{File, OpenOptions};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use doppel::backup::{self, DiskCopy, ReceiveError, Staged, Stager};
use doppel::machine::{MachineRam, PAGE};
use doppel::primary::{XEN_MAJOR, XEN_MINOR};
use doppel::replica::ReplicaError;
use doppel::sim::encode_vcpu;
use doppel::sim_kv::{KvSim, KvSpec};
use doppel::standby::Standby;
use doppel::stream::format::{rec, MAX_DISK_WRITES_BODY};
use doppel::stream::{
    DiskWrite, Limits, OutPage, Record, StreamError, StreamReader, StreamWriter, TscInfo,
};
use doppel_core::hvm::VcpuState;

const PAGES: u64 = 32;
const MIB: usize = 1 << 20;

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("devices-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One standby RAM file for every test (the tests check disks and device
/// states; every Standby starts its own epoch count).
fn standby_ram() -> &'static PathBuf {
    static RAM: OnceLock<PathBuf> = OnceLock::new();
    RAM.get_or_init(|| {
        let ram = dir("ram").join("s.ram");
        let spec = KvSpec {
            guest_pages: PAGES,
            keys: 4,
            epoch: Duration::from_millis(50),
            seed: 1,
            standby: true,
            max_run: Duration::from_secs(10),
        };
        KvSim::create(&ram, spec).unwrap();
        ram
    })
}

/// A disk file of `bytes` filled with `fill`, opened read-write.
fn disk_file(name: &str, bytes: &[u8]) -> (PathBuf, File) {
    let p = dir(name).join("disk.img");
    std::fs::write(&p, bytes).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    (p, f)
}

/// What one epoch carries besides memory.
struct Ep {
    fill: u8,
    writes: Vec<(u64, Vec<u8>)>,
    state: Option<Vec<u8>>,
}

fn tsc() -> TscInfo {
    TscInfo {
        mode: 0,
        khz: 2_000_000,
        nsec: 0,
        incarnation: 0,
    }
}

/// A stream of `eps` (epoch 0 writes every page); returns the bytes and
/// the offset where each epoch's CHECKPOINT record starts.
fn stream(eps: &[Ep], end: bool) -> (Vec<u8>, Vec<usize>) {
    let mut w = StreamWriter::new(Vec::new());
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    w.static_data_end().unwrap();
    let blob = encode_vcpu(VcpuState::default());
    let mut cps = Vec::new();
    for (i, e) in eps.iter().enumerate() {
        let data = vec![e.fill; PAGE];
        let n = if i == 0 { PAGES } else { 2 };
        let pages: Vec<OutPage<'_>> = (0..n)
            .map(|pfn| OutPage {
                pfn,
                data: Some(&data),
            })
            .collect();
        w.page_data(&pages).unwrap();
        let writes: Vec<(u64, &[u8])> = e.writes.iter().map(|(o, d)| (*o, &d[..])).collect();
        w.disk_writes(&writes).unwrap();
        if let Some(s) = &e.state {
            w.device_state(s).unwrap();
        }
        w.tsc_info(&tsc()).unwrap();
        w.hvm_context(&blob).unwrap();
        w.hvm_params(&[]).unwrap();
        cps.push(w.bytes() as usize);
        w.checkpoint().unwrap();
    }
    if end {
        w.end().unwrap();
    }
    (w.into_inner(), cps)
}

/// Feed `bytes` to a fresh standby with `disk` (if any): (committed
/// epochs, committed device state, error, disk bytes applied).
fn feed(
    bytes: &[u8],
    disk: Option<(PathBuf, File)>,
) -> (u64, Option<Vec<u8>>, Option<ReceiveError>, u64) {
    let m = MachineRam::open(standby_ram()).unwrap();
    let ctl = m.find_control().unwrap();
    let mut sb = Standby::new(&m, ctl).unwrap();
    if let Some((p, f)) = disk {
        sb = sb.with_disk(DiskCopy::new(f, &p).unwrap());
    }
    let got = backup::receive(Cursor::new(bytes), &mut sb, |_| Ok(()));
    (
        sb.committed(),
        sb.committed_device_state().map(<[u8]>::to_vec),
        got.error,
        sb.disk().map_or(0, DiskCopy::applied),
    )
}

/// The disk after applying `eps[..n]`'s writes to `start`.
fn model(start: &[u8], eps: &[Ep], n: usize) -> Vec<u8> {
    let mut d = start.to_vec();
    for e in &eps[..n] {
        for (o, data) in &e.writes {
            d[*o as usize..*o as usize + data.len()].copy_from_slice(data);
        }
    }
    d
}

const DISK: usize = 64 << 10;

/// Four epochs: 0 overwrites the whole disk, 1-3 write overlapping
/// sectors (a later write wins over an earlier one of the same epoch).
fn four_epochs() -> Vec<Ep> {
    let sec = |b: u8, n: usize| vec![b; 512 * n];
    vec![
        Ep {
            fill: 0x10,
            writes: vec![(0, (0..DISK).map(|i| (i / 512) as u8).collect())],
            state: Some(b"DOPPELDS epoch 0".to_vec()),
        },
        Ep {
            fill: 0x11,
            writes: vec![(512, sec(0xA1, 3)), (1024, sec(0xA2, 1))],
            state: Some(b"DOPPELDS epoch 1".to_vec()),
        },
        Ep {
            fill: 0x12,
            writes: vec![(DISK as u64 - 1024, sec(0xB1, 2)), (0, sec(0xB2, 8))],
            state: Some(b"DOPPELDS epoch 2, longer".to_vec()),
        },
        Ep {
            fill: 0x13,
            writes: vec![(4096, sec(0xC1, 16)), (0, sec(0xC2, 1))],
            state: Some(b"DOPPELDS epoch 3".to_vec()),
        },
    ]
}

#[test]
fn device_records_round_trip_through_the_reader() {
    let eps = four_epochs();
    let (bytes, _) = stream(&eps[..2], true);
    let mut r = StreamReader::open(Cursor::new(bytes), Limits { guest_pages: PAGES }).unwrap();
    let mut states = Vec::new();
    let mut writes: Vec<DiskWrite> = Vec::new();
    loop {
        match r.next_record().unwrap() {
            Record::DeviceState(s) => states.push(s),
            Record::DiskWrites(w) => writes.extend(w),
            Record::End => break,
            _ => {}
        }
    }
    assert_eq!(
        states,
        vec![eps[0].state.clone().unwrap(), eps[1].state.clone().unwrap()]
    );
    let want: Vec<DiskWrite> = eps[..2]
        .iter()
        .flat_map(|e| &e.writes)
        .map(|(o, d)| DiskWrite {
            offset: *o,
            data: d.clone(),
        })
        .collect();
    assert_eq!(writes, want);
}

#[test]
fn a_cut_epoch_leaves_the_disk_and_device_state_at_the_last_commit() {
    let eps = four_epochs();
    let start = vec![0xEEu8; DISK];
    let (bytes, cps) = stream(&eps, false);
    // Cut in the middle of epoch 3: after its disk writes and device
    // state, before its CHECKPOINT.
    let cut = &bytes[..cps[3] - 8];
    let (p, f) = disk_file("cut", &start);
    let (committed, state, err, applied) = feed(cut, Some((p.clone(), f)));
    assert!(
        err.as_ref()
            .is_some_and(|e| matches!(e, ReceiveError::Stream(s) if s.is_truncation())),
        "{err:?}"
    );
    assert_eq!(committed, 3);
    assert_eq!(state.as_deref(), eps[2].state.as_deref());
    let disk = std::fs::read(&p).unwrap();
    assert!(disk == model(&start, &eps, 3), "disk is not epoch 2's");
    assert_ne!(disk, model(&start, &eps, 4));
    let written: usize = eps[..3]
        .iter()
        .flat_map(|e| &e.writes)
        .map(|w| w.1.len())
        .sum();
    assert_eq!(applied, written as u64);
}

#[test]
fn every_cut_leaves_the_disk_exactly_at_a_commit() {
    let eps = four_epochs();
    let start = vec![0x5Au8; DISK];
    let (bytes, cps) = stream(&eps, true);
    // Every 8-byte boundary from the first checkpoint on, plus odd cuts.
    let cuts: Vec<usize> = (cps[0] - 64..bytes.len())
        .step_by(4093)
        .chain(cps.iter().flat_map(|&c| [c - 1, c, c + 7, c + 8]))
        .collect();
    for cut in cuts {
        let (p, f) = disk_file("every-cut", &start);
        let (committed, state, _, _) = feed(&bytes[..cut], Some((p.clone(), f)));
        let n = cps.iter().filter(|&&c| c + 8 <= cut).count();
        assert_eq!(committed, n as u64, "cut at {cut}");
        let disk = std::fs::read(&p).unwrap();
        if n == 0 {
            assert!(
                disk == start,
                "cut at {cut}: disk changed before any commit"
            );
            assert_eq!(state, None);
        } else {
            assert!(
                disk == model(&start, &eps, n),
                "cut at {cut}: disk not at epoch {}",
                n - 1
            );
            assert_eq!(
                state.as_deref(),
                eps[n - 1].state.as_deref(),
                "cut at {cut}"
            );
        }
    }
}

#[test]
fn an_initial_sync_in_1_mib_chunks_makes_the_copy_equal_to_the_source() {
    // 4 MiB + 3 sectors: the last chunk is short, and the 1 MiB chunks
    // need two 4 MiB records.
    let size = 4 * MIB + 1536;
    let source: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4099) as u8).collect();
    let writes: Vec<(u64, Vec<u8>)> = source
        .chunks(MIB)
        .enumerate()
        .map(|(i, c)| ((i * MIB) as u64, c.to_vec()))
        .collect();
    let eps = vec![
        Ep {
            fill: 1,
            writes,
            state: Some(b"DOPPELDS initial".to_vec()),
        },
        Ep {
            fill: 2,
            writes: vec![],
            state: None,
        },
    ];
    let (bytes, _) = stream(&eps, true);
    // The whole disk travels in bounded records.
    let mut r = StreamReader::open(Cursor::new(&bytes), Limits { guest_pages: PAGES }).unwrap();
    let mut records = 0;
    let mut before = r.offset();
    loop {
        let rec = r.next_record().unwrap();
        if let Record::DiskWrites(_) = rec {
            records += 1;
            assert!(r.offset() - before <= 8 + u64::from(MAX_DISK_WRITES_BODY));
        }
        if rec == Record::End {
            break;
        }
        before = r.offset();
    }
    assert_eq!(records, 2, "5 chunks, at most 3 of 1 MiB per 4 MiB record");
    let (p, f) = disk_file("sync", &vec![0xEE; size]);
    let (committed, state, err, applied) = feed(&bytes, Some((p.clone(), f)));
    assert!(err.is_none(), "{err:?}");
    assert_eq!(committed, 2);
    assert!(
        std::fs::read(&p).unwrap() == source,
        "copy differs from the source"
    );
    assert_eq!(applied, size as u64);
    // Epoch 1 carried no device state: epoch 0's stays committed.
    assert_eq!(state.as_deref(), Some(&b"DOPPELDS initial"[..]));
}

#[test]
fn a_write_beyond_the_disk_copy_is_refused_and_nothing_of_its_epoch_applied() {
    let mut eps = four_epochs();
    eps[0].writes[0].1.truncate(DISK - 512);
    let start = vec![0u8; DISK];
    // The copy is one sector short: epoch 2 writes the last two sectors.
    let (p, f) = disk_file("beyond", &start[..DISK - 512]);
    let (bytes, _) = stream(&eps[..3], true);
    let (committed, state, err, _) = feed(&bytes, Some((p.clone(), f)));
    let text = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        matches!(
            err,
            Some(ReceiveError::Replica(ReplicaError::DiskWriteBeyondDisk {
                epoch: 2,
                ..
            }))
        ),
        "{err:?}"
    );
    let (off, size) = (DISK - 1024, DISK - 512);
    assert!(
        text.contains(&format!("1024 bytes at byte {off}"))
            && text.contains(&format!("({size} bytes")),
        "{text}"
    );
    assert_eq!(committed, 2);
    assert_eq!(state.as_deref(), eps[1].state.as_deref());
    let disk = std::fs::read(&p).unwrap();
    assert!(
        disk == model(&start, &eps, 2)[..DISK - 512],
        "epoch 2 touched the disk"
    );
}

#[test]
fn disk_writes_without_a_disk_copy_are_refused() {
    let eps = four_epochs();
    let (bytes, _) = stream(&eps[..1], true);
    let (committed, state, err, _) = feed(&bytes, None);
    assert!(
        matches!(err, Some(ReceiveError::Replica(ReplicaError::NoDisk { epoch: 0, bytes })) if bytes == DISK as u64),
        "{err:?}"
    );
    assert_eq!((committed, state), (0, None));
}

/// Offset of the first DOPPEL_DISK_WRITES record of epoch 1 in `bytes`.
fn first_disk_record_after(bytes: &[u8], from: usize) -> usize {
    let mut at = from;
    loop {
        let t = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if t == rec::DOPPEL_DISK_WRITES {
            return at;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

#[test]
fn hostile_disk_records_are_refused_and_change_nothing() {
    let eps = four_epochs();
    let start = vec![0x77u8; DISK];
    let (bytes, cps) = stream(&eps[..2], true);
    let at = first_disk_record_after(&bytes, cps[0] + 8);
    // Record header 8, count header 8, entry: offset 8, length 4, reserved 4.
    let entry = at + 16;
    type Patch = fn(&mut Vec<u8>, usize);
    let patches: Vec<(&str, Patch, &str)> = vec![
        (
            "offset not a sector",
            |b, e| b[e] = 1,
            "not whole 512-byte sectors",
        ),
        (
            "length not a sector",
            |b, e| b[e + 8] = 0x80,
            "not whole 512-byte sectors",
        ),
        ("length 0", |b, e| b[e + 8..e + 12].fill(0), "length 0"),
        (
            "length past the record",
            |b, e| b[e + 9] = 0x40,
            "runs past the record",
        ),
        (
            "offset overflow",
            |b, e| b[e..e + 8].copy_from_slice(&(u64::MAX - 511).to_le_bytes()),
            "overflows",
        ),
        ("reserved", |b, e| b[e + 12] = 1, "reserved field is 0x1"),
        ("count", |b, e| b[e - 8] = 9, "count 9 out of range"),
        (
            "record too long",
            |b, e| {
                b[e - 16 + 4..e - 16 + 8].copy_from_slice(&(MAX_DISK_WRITES_BODY + 8).to_le_bytes())
            },
            "exceeds the limit of 4194304",
        ),
    ];
    for (what, patch, want) in patches {
        let mut b = bytes.clone();
        patch(&mut b, entry);
        let (p, f) = disk_file("hostile", &start);
        let (committed, state, err, _) = feed(&b, Some((p.clone(), f)));
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains(want), "{what}: {text}");
        assert!(text.contains("DOPPEL_DISK_WRITES"), "{what}: {text}");
        assert_eq!(committed, 1, "{what}");
        assert_eq!(state.as_deref(), eps[0].state.as_deref(), "{what}");
        assert!(
            std::fs::read(&p).unwrap() == model(&start, &eps, 1),
            "{what}: disk moved"
        );
    }
}

/// Records of one hand-built stream: headers, STATIC_DATA_END, then `f`.
fn raw(f: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    f(&mut w);
    w.into_inner()
}

fn first_error(bytes: Vec<u8>) -> StreamError {
    let mut r = StreamReader::open(Cursor::new(bytes), Limits { guest_pages: PAGES }).unwrap();
    loop {
        if let Err(e) = r.next_record() {
            return e;
        }
    }
}

#[test]
fn device_records_are_only_accepted_inside_an_epoch_before_tsc_info() {
    let sec = [0u8; 512];
    let blob = encode_vcpu(VcpuState::default());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "before STATIC_DATA_END",
            raw(|w| w.device_state(b"x").unwrap()),
            "out of order",
        ),
        (
            "two device states in one epoch",
            raw(|w| {
                w.static_data_end().unwrap();
                w.device_state(b"x").unwrap();
                w.device_state(b"y").unwrap();
            }),
            "at most one DOPPEL_DEVICE_STATE per epoch",
        ),
        (
            "after X86_TSC_INFO",
            raw(|w| {
                w.static_data_end().unwrap();
                w.tsc_info(&tsc()).unwrap();
                w.disk_writes(&[(0, &sec)]).unwrap();
            }),
            "expected device records after the pages, before X86_TSC_INFO",
        ),
        (
            "after HVM_PARAMS",
            raw(|w| {
                w.static_data_end().unwrap();
                w.tsc_info(&tsc()).unwrap();
                w.hvm_context(&blob).unwrap();
                w.hvm_params(&[]).unwrap();
                w.device_state(b"x").unwrap();
            }),
            "expected device records after the pages, before X86_TSC_INFO",
        ),
        (
            "END inside an epoch with device records",
            raw(|w| {
                w.static_data_end().unwrap();
                w.disk_writes(&[(0, &sec)]).unwrap();
                w.end().unwrap();
            }),
            "expected PAGE_DATA or X86_TSC_INFO",
        ),
        (
            "an empty device state",
            raw(|w| {
                w.static_data_end().unwrap();
                w.record(rec::DOPPEL_DEVICE_STATE, &[]).unwrap();
            }),
            "expected 1..=65536",
        ),
        (
            "a device state over 64 KiB",
            raw(|w| {
                w.static_data_end().unwrap();
                w.record(rec::DOPPEL_DEVICE_STATE, &[&vec![1u8; 65537]])
                    .unwrap();
            }),
            "exceeds the limit of 65536",
        ),
    ];
    for (what, bytes, want) in cases {
        let e = first_error(bytes).to_string();
        assert!(e.contains(want), "{what}: {e}");
    }
    // One device state per epoch: the next epoch may carry its own.
    let eps = four_epochs();
    let (bytes, _) = stream(&eps, true);
    let mut r = StreamReader::open(Cursor::new(bytes), Limits { guest_pages: PAGES }).unwrap();
    while r.next_record().unwrap() != Record::End {}
}

#[test]
fn the_writer_refuses_what_the_reader_would() {
    let mut w = StreamWriter::new(Vec::new());
    assert!(w.device_state(&[]).is_err());
    assert!(w.device_state(&vec![0; 65537]).is_err());
    assert!(w.disk_writes(&[(1, &[0; 512])]).is_err());
    assert!(w.disk_writes(&[(0, &[0; 100])]).is_err());
    assert!(w.disk_writes(&[(u64::MAX - 511, &[0; 512])]).is_err());
    w.disk_writes(&[]).unwrap();
    assert_eq!(w.bytes(), 0, "nothing written for refused or empty input");
}

#[test]
fn the_staging_limit_counts_disk_bytes() {
    let mut s = Stager::new(1 << 20);
    let w = |n: usize| {
        Record::DiskWrites(vec![DiskWrite {
            offset: 0,
            data: vec![0; n],
        }])
    };
    assert!(matches!(s.push(w(512 << 10), 0), Ok(Staged::More)));
    let e = s.push(w(600 << 10), 0).err();
    assert!(
        matches!(
            e,
            Some(ReceiveError::StagedTooLarge {
                epoch: 0,
                limit: 1_048_576
            })
        ),
        "{e:?}"
    );
}

/// The stream fuzz target's seed with both device records
/// (tools/doppel/fuzz/corpus/stream_decoder/devices.bin): a 16-page guest,
/// two epochs, each with disk writes and a device state. The seed must be
/// exactly what this builds, and must replicate cleanly through the fuzz
/// target's path. `DOPPEL_WRITE_SEEDS=1` rewrites it.
#[test]
fn the_fuzz_corpus_carries_both_device_records() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stream_decoder/devices.bin");
    let mut w = StreamWriter::new(Vec::new());
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    w.static_data_end().unwrap();
    let blob = encode_vcpu(VcpuState::default());
    for epoch in 0..2u8 {
        let data = vec![epoch + 1; PAGE];
        let pages: Vec<OutPage<'_>> = (0..if epoch == 0 { 16 } else { 1 })
            .map(|pfn| OutPage {
                pfn,
                data: Some(&data),
            })
            .collect();
        w.page_data(&pages).unwrap();
        let a = vec![0xA0 + epoch; 1024];
        let b = vec![0xB0 + epoch; 512];
        w.disk_writes(&[(512, &a), (0, &b)]).unwrap();
        w.device_state(&[b'D', b'S', epoch]).unwrap();
        w.tsc_info(&tsc()).unwrap();
        w.hvm_context(&blob).unwrap();
        w.hvm_params(&[]).unwrap();
        w.checkpoint().unwrap();
    }
    w.end().unwrap();
    let want = w.into_inner();
    if std::env::var_os("DOPPEL_WRITE_SEEDS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let seed = std::fs::read(&path).unwrap_or_default();
    assert!(seed == want, "{} is missing or stale", path.display());
    let mut rep = doppel::replica::Replica::in_memory(16);
    let got = backup::receive(Cursor::new(&seed), &mut rep, |_| Ok(()));
    assert!(got.error.is_none() && got.ended, "{:?}", got.error);
    assert_eq!(got.epochs.len(), 2);
    assert_eq!(
        got.epochs.iter().map(|e| e.disk_bytes).collect::<Vec<_>>(),
        [1536, 1536]
    );
}

/// A standby RAM file of its own (the CLI opens it as a machine).
fn own_standby_ram(name: &str) -> PathBuf {
    let ram = dir(name).join("s.ram");
    std::fs::copy(standby_ram(), &ram).unwrap();
    ram
}

fn backup_cmd(args: &[&str], cwd: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"));
    c.arg("backup")
        .args(["--listen", "127.0.0.1:0", "--serve-clients", "127.0.0.1:0"])
        .args(["--accept-timeout", "20", "--wait-control", "5"])
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG");
    c
}

#[test]
fn backup_disk_must_exist_be_non_empty_and_go_with_a_standby() {
    let ram = own_standby_ram("cli-refuse");
    let d = ram.parent().unwrap().to_path_buf();
    let ram = ram.to_str().unwrap();
    std::fs::write(d.join("empty.img"), b"").unwrap();
    let run = |args: &[&str]| {
        let o = backup_cmd(args, &d).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, err) = run(&["--standby-ram", ram, "--disk", "missing.img"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("--disk missing.img") && err.contains("must exist"),
        "{err}"
    );
    let (code, err) = run(&["--standby-ram", ram, "--disk", "empty.img"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the file is empty"), "{err}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["backup", "--listen", "127.0.0.1:0", "--replica", "r"])
        .args(["--guest-pages", "4", "--disk", "empty.img"])
        .current_dir(&d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--standby-ram"), "{err}");
}

/// `doppel backup --standby-ram --disk`: a stream whose epoch 0 carries
/// the whole disk and whose later epochs write to it, ended by END,
/// leaves the disk copy at the last commit; the progress lines show the
/// disk bytes applied.
#[test]
fn backup_applies_committed_disk_writes_to_its_disk_copy() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let ram = own_standby_ram("cli-apply");
    let d = ram.parent().unwrap().to_path_buf();
    let start = vec![0xEEu8; DISK];
    std::fs::write(d.join("disk.img"), &start).unwrap();
    let eps = four_epochs();
    let (bytes, _) = stream(&eps, true);
    let mut child = backup_cmd(
        &["--standby-ram", ram.to_str().unwrap(), "--disk", "disk.img"],
        &d,
    )
    .env("RUST_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let addr = line
        .lines()
        .find_map(|l| l.strip_prefix("listening on "))
        .expect(&line)
        .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut acks = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = acks.read_to_end(&mut v);
    });
    s.write_all(&bytes).unwrap();
    s.flush().unwrap();
    let st = child.wait().unwrap();
    drop(s);
    drain.join().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(st.success(), "{rest}\n{err}");
    assert!(std::fs::read(d.join("disk.img")).unwrap() == model(&start, &eps, 4));
    let total: usize = eps.iter().flat_map(|e| &e.writes).map(|w| w.1.len()).sum();
    assert!(
        rest.contains(&format!("({total} of {DISK} bytes applied)")),
        "{rest}"
    );
    assert!(
        err.contains(&format!("disk_bytes={DISK} disk_applied={DISK}")),
        "no progress line for the initial sync:\n{err}"
    );
    assert!(
        err.contains("committed epoch 3 ") && err.contains(&format!("disk_applied={total}")),
        "{err}"
    );
}
