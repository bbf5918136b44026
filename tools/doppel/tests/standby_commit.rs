//! `doppel backup --standby-ram` acknowledges only epochs the standby can
//! be activated from (issue 22): crafted streams whose second epoch a
//! standby could not run (two vCPUs in its HVM context; no X86_TSC_INFO,
//! which the stream reader refuses first) are refused before the ack and
//! leave the standby's guest RAM at the epoch before.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use doppel::backup::{self, ReceiveError};
use doppel::machine::{MachineRam, PAGE};
use doppel::primary::{XEN_MAJOR, XEN_MINOR};
use doppel::replica::ReplicaError;
use doppel::sim::encode_vcpu;
use doppel::sim_kv::{KvSim, KvSpec};
use doppel::standby::Standby;
use doppel::stream::{OutPage, StreamWriter, TscInfo};
use doppel_abi::SharedMem;
use doppel_core::hvm::{self, HeaderInfo, VcpuState};

const PAGES: u64 = 32;

fn standby_ram(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("standby-commit-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let ram = d.join("s.ram");
    let spec = KvSpec {
        guest_pages: PAGES,
        keys: 4,
        epoch: Duration::from_millis(50),
        seed: 1,
        standby: true,
        max_run: Duration::from_secs(10),
    };
    // Publishing the area is all that is needed: nothing activates here.
    KvSim::create(&ram, spec).unwrap();
    ram
}

/// A blob with two vCPUs (the primary's hypervisor never makes one; a
/// standby runs exactly one).
fn two_vcpus() -> Vec<u8> {
    let mut out = vec![0u8; hvm::encoded_len(2).unwrap()];
    let header = HeaderInfo {
        cpuid: 0x00a2_0f10,
        gtsc_khz: 2_000_000,
        changeset: 0,
    };
    let v = VcpuState::default();
    let n = hvm::encode(&[v.clone(), v], header, &mut out).unwrap();
    out.truncate(n);
    out
}

/// What epoch 1 of the crafted stream gets wrong.
#[derive(Clone, Copy, Debug)]
enum Flaw {
    None,
    TwoVcpus,
    NoTsc,
}

/// Epoch 0: every page filled with 0x11; epoch 1: pages 0..4 with 0x22,
/// with `flaw`; then END.
fn stream(flaw: Flaw) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    w.static_data_end().unwrap();
    let tsc = TscInfo {
        mode: 0,
        khz: 2_000_000,
        nsec: 0,
        incarnation: 0,
    };
    let good = encode_vcpu(VcpuState::default());
    for (epoch, fill, n) in [(0u64, 0x11u8, PAGES), (1, 0x22, 4)] {
        let data = vec![fill; PAGE];
        let pages: Vec<OutPage<'_>> = (0..n)
            .map(|pfn| OutPage {
                pfn,
                data: Some(&data),
            })
            .collect();
        w.page_data(&pages).unwrap();
        let (blob, with_tsc) = match (epoch, flaw) {
            (1, Flaw::TwoVcpus) => (two_vcpus(), true),
            (1, Flaw::NoTsc) => (good.clone(), false),
            _ => (good.clone(), true),
        };
        if with_tsc {
            w.tsc_info(&tsc).unwrap();
        }
        w.hvm_context(&blob).unwrap();
        w.hvm_params(&[]).unwrap();
        w.checkpoint().unwrap();
    }
    w.end().unwrap();
    w.flush().unwrap();
    w.into_inner()
}

/// Feed `flaw`'s stream to a standby; (epochs acknowledged, error, the
/// first byte of guest page 0 afterwards).
fn feed(flaw: Flaw) -> (u64, Option<ReceiveError>, u8, u64) {
    let ram = standby_ram(&format!("{flaw:?}"));
    let m = MachineRam::open(&ram).unwrap();
    let ctl = m.find_control().unwrap();
    let mut sb = Standby::new(&m, ctl).unwrap();
    let mut acks = Vec::new();
    let got = backup::serve_opts(Cursor::new(stream(flaw)), &mut acks, &mut sb, 0, |_| {}).unwrap();
    let mut b = [0u8; 1];
    m.mem().read_bytes(ctl.guest_ram().offset as usize, &mut b);
    (got.epochs.len() as u64, got.error, b[0], sb.committed())
}

#[test]
fn a_well_formed_stream_commits_both_epochs() {
    let (acked, err, page0, committed) = feed(Flaw::None);
    assert!(err.is_none(), "{err:?}");
    assert_eq!((acked, committed, page0), (2, 2, 0x22));
}

#[test]
fn an_epoch_with_two_vcpus_is_refused_before_its_ack() {
    let (acked, err, page0, committed) = feed(Flaw::TwoVcpus);
    let text = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        matches!(
            err,
            Some(ReceiveError::Replica(ReplicaError::Unactivatable {
                epoch: 1,
                ..
            }))
        ),
        "{err:?}"
    );
    assert!(text.contains("describes 2 vCPUs"), "{text}");
    // Epoch 0 acked, epoch 1 not; guest RAM still epoch 0's.
    assert_eq!((acked, committed, page0), (1, 1, 0x11));
}

#[test]
fn an_epoch_without_tsc_info_is_refused_before_its_ack() {
    // The stream reader already requires X86_TSC_INFO before the HVM
    // context of every epoch (the commit check stands behind it): the
    // epoch is refused as a protocol error, unacknowledged, and the
    // standby stays at epoch 0.
    let (acked, err, page0, committed) = feed(Flaw::NoTsc);
    let text = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.contains("expected PAGE_DATA or X86_TSC_INFO"),
        "{text}"
    );
    assert_eq!((acked, committed, page0), (1, 1, 0x11));
}
