//! write -> read round trips of random epochs, through a reader that
//! returns short reads, and receive -> replica against the model.

use std::io::Read;

use doppel::backup::receive;
use doppel::epoch::{EpochData, ModelReplica};
use doppel::replica::Replica;
use doppel::stream::{HvmParam, Limits, Record, StreamReader, TscInfo};
use doppel::synth::write_stream;
use proptest::prelude::*;

/// Returns at most `step` bytes per read (cycling through sizes).
struct Dribble<'a> {
    data: &'a [u8],
    steps: Vec<usize>,
    i: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let step = self.steps[self.i % self.steps.len()].max(1);
        self.i += 1;
        let n = step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

const GUEST: u64 = 40;

fn page_strategy() -> impl Strategy<Value = (u64, Option<Vec<u8>>)> {
    (
        0..GUEST,
        prop_oneof![
            1 => Just(None),
            4 => (any::<u8>(), any::<u64>()).prop_map(|(fill, word)| {
                let mut d = vec![fill; 4096];
                d[(word % 512) as usize * 8..][..8].copy_from_slice(&word.to_le_bytes());
                Some(d)
            }),
        ],
    )
}

fn epoch_strategy() -> impl Strategy<Value = EpochData> {
    (
        prop::collection::vec(page_strategy(), 0..12),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>()),
        prop::collection::vec(any::<u8>(), 1..64),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..5),
    )
        .prop_map(
            |(pages, (mode, khz, nsec, incarnation), ctx, params)| EpochData {
                pages,
                tsc: TscInfo {
                    mode,
                    khz,
                    nsec,
                    incarnation,
                },
                hvm_context: ctx,
                params: params
                    .into_iter()
                    .map(|(index, value)| HvmParam { index, value })
                    .collect(),
            },
        )
}

/// Regroup decoded records into epochs.
fn decode_epochs(r: impl Read) -> Vec<EpochData> {
    let mut rd = StreamReader::open(r, Limits { guest_pages: GUEST }).unwrap();
    let mut out = Vec::new();
    let mut cur = EpochData {
        pages: Vec::new(),
        tsc: TscInfo::default(),
        hvm_context: Vec::new(),
        params: Vec::new(),
    };
    loop {
        match rd.next_record().unwrap() {
            Record::PageData(p) => cur
                .pages
                .extend(p.entries().map(|e| (e.pfn, e.data.map(<[u8]>::to_vec)))),
            Record::TscInfo(t) => cur.tsc = t,
            Record::HvmContext(c) => cur.hvm_context = c,
            Record::HvmParams(p) => cur.params = p,
            Record::Checkpoint => out.push(std::mem::replace(
                &mut cur,
                EpochData {
                    pages: Vec::new(),
                    tsc: TscInfo::default(),
                    hvm_context: Vec::new(),
                    params: Vec::new(),
                },
            )),
            Record::StaticDataEnd => {}
            Record::End => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    rd.expect_eof().unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(epochs in prop::collection::vec(epoch_strategy(), 1..5),
                  steps in prop::collection::vec(1usize..9000, 1..6)) {
        let (bytes, lay) = write_stream(Vec::new(), &epochs).unwrap();
        prop_assert_eq!(bytes.len() as u64, lay.total);
        prop_assert_eq!(bytes.len() % 8, 0);
        let back = decode_epochs(Dribble { data: &bytes, steps, i: 0 });
        prop_assert_eq!(&back, &epochs);

        let mut rep = Replica::in_memory(GUEST);
        let mut acked = Vec::new();
        let got = receive(&bytes[..], &mut rep, |s| { acked.push(s.epoch); Ok(()) });
        prop_assert!(got.error.is_none(), "{:?}", got.error);
        prop_assert!(got.ended);
        let want: Vec<u64> = (0..epochs.len() as u64).collect();
        prop_assert_eq!(acked, want);
        let model = ModelReplica::after(GUEST, &epochs, epochs.len());
        prop_assert_eq!(rep.memory().unwrap(), model.memory.clone());
        prop_assert_eq!(rep.state().committed, model.committed);
        prop_assert_eq!(&rep.state().hvm_context, &model.hvm_context);
        prop_assert_eq!(rep.state().tsc, model.tsc);
        prop_assert_eq!(&rep.state().params, &model.params);
    }
}

#[test]
fn batches_split_at_1024_pfns() {
    let pages: Vec<(u64, Option<Vec<u8>>)> = (0..2500u64)
        .map(|p| {
            (
                p,
                if p % 3 == 0 {
                    None
                } else {
                    Some(vec![p as u8; 4096])
                },
            )
        })
        .collect();
    let e = EpochData {
        pages,
        tsc: TscInfo::default(),
        hvm_context: vec![1],
        params: vec![],
    };
    let (bytes, _) = write_stream(Vec::new(), std::slice::from_ref(&e)).unwrap();
    let mut rd = StreamReader::open(&bytes[..], Limits { guest_pages: 2500 }).unwrap();
    let mut counts = Vec::new();
    while !rd.ended() {
        if let Record::PageData(p) = rd.next_record().unwrap() {
            counts.push(p.count());
        }
    }
    assert_eq!(counts, vec![1024, 1024, 452]);
}

#[test]
fn recycled_buffers_never_leak_old_pages() {
    // Page buffers displaced by each commit are recycled into the reader
    // and refilled by later epochs. The replica must still equal the model
    // exactly.
    use doppel::synth::{stream_bytes, SynthSpec};
    let spec = SynthSpec {
        epochs: 6,
        pages: 300,
        dirty: 20,
        seed: 21,
    };
    let (epochs, bytes, _) = stream_bytes(&spec);
    let mut rep = Replica::in_memory(spec.pages);
    let got = receive(
        Dribble {
            data: &bytes,
            steps: vec![70_000, 3, 4096],
            i: 0,
        },
        &mut rep,
        |_| Ok(()),
    );
    assert!(got.error.is_none() && got.ended);
    let m = ModelReplica::after(spec.pages, &epochs, epochs.len());
    assert!(rep.memory().unwrap() == m.memory);
    assert_eq!(rep.state().committed, 6);
}
