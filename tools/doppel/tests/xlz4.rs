//! Optional XOR + lz4 page compression: round trip to the same replica as
//! the plain stream, smaller on sparse writes, and damage is refused.

use doppel::backup::{receive_opts, ReceiveError};
use doppel::epoch::{EpochData, ModelReplica};
use doppel::replica::Replica;
use doppel::stream::format::rec;
use doppel::stream::{StreamError, StreamWriter, XorCache};
use doppel::synth::{epochs, SynthSpec, XEN_MAJOR, XEN_MINOR};

const SPEC: SynthSpec = SynthSpec {
    epochs: 5,
    pages: 300,
    dirty: 40,
    seed: 4,
};

/// Write `eps` with compressed page records; returns bytes and the offset
/// just past each CHECKPOINT.
fn compressed(eps: &[EpochData], guest: u64) -> (Vec<u8>, Vec<u64>) {
    let mut w = StreamWriter::new(Vec::new());
    let mut cache = XorCache::new(guest).unwrap();
    let mut ends = Vec::new();
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    w.static_data_end().unwrap();
    for e in eps {
        w.page_data_xlz4(&e.out_pages(), &mut cache).unwrap();
        w.tsc_info(&e.tsc).unwrap();
        w.hvm_context(&e.hvm_context).unwrap();
        w.hvm_params(&e.params).unwrap();
        w.checkpoint().unwrap();
        ends.push(w.bytes());
    }
    w.end().unwrap();
    (w.into_inner(), ends)
}

fn check(rep: &Replica, m: &ModelReplica) {
    assert_eq!(rep.state().committed, m.committed);
    assert!(rep.memory().unwrap() == m.memory);
    assert_eq!(rep.state().hvm_context, m.hvm_context);
    assert_eq!(rep.state().params, m.params);
}

/// `check` as a predicate.
fn same(rep: &Replica, m: &ModelReplica) -> bool {
    rep.state().committed == m.committed
        && rep.memory().unwrap() == m.memory
        && rep.state().hvm_context == m.hvm_context
        && rep.state().params == m.params
}

/// Epoch 0 from the synthetic guest, then epochs that rewrite 8 bytes of
/// `dirty` pages each (sparse writes, the case XOR + lz4 is for).
fn sparse_epochs() -> Vec<EpochData> {
    let mut eps = epochs(&SynthSpec { epochs: 1, ..SPEC });
    let mut mem = ModelReplica::after(SPEC.pages, &eps, 1).memory;
    for n in 1..SPEC.epochs {
        let mut e = eps[0].clone();
        e.pages.clear();
        for k in 0..SPEC.dirty {
            let pfn = (n * 7 + k * 13) % SPEC.pages;
            let page = &mut mem[pfn as usize * 4096..][..4096];
            let at = ((n * 31 + k * 17) % 512) as usize * 8;
            page[at..at + 8].copy_from_slice(&(n * 1000 + k).to_le_bytes());
            e.pages.push((pfn, Some(page.to_vec())));
        }
        e.hvm_context = vec![n as u8; 40];
        eps.push(e);
    }
    eps
}

#[test]
fn round_trip_equals_plain_and_is_smaller() {
    let eps = sparse_epochs();
    let (bytes, ends) = compressed(&eps, SPEC.pages);
    let (plain, plain_lay) = doppel::synth::write_stream(Vec::new(), &eps).unwrap();
    // Epoch 0 is random data; the sparse epochs after it must shrink a lot.
    let later = bytes.len() as u64 - ends[0];
    let plain_later = plain.len() as u64 - plain_lay.checkpoint_ends[0];
    assert!(later * 10 < plain_later, "{later} vs {plain_later}");
    let mut rep = Replica::in_memory(SPEC.pages);
    let got = receive_opts(&bytes[..], &mut rep, true, |_| Ok(()));
    assert!(got.error.is_none() && got.ended, "{:?}", got.error);
    check(&rep, &ModelReplica::after(SPEC.pages, &eps, eps.len()));
    // Without negotiation the same stream is refused, nothing committed.
    let mut rep = Replica::in_memory(SPEC.pages);
    let got = receive_opts(&bytes[..], &mut rep, false, |_| Ok(()));
    assert!(matches!(
        got.error,
        Some(ReceiveError::Stream(StreamError::Unsupported { rec })) if rec.rtype == rec::DOPPEL_PAGE_DATA_XLZ4
    ));
    assert_eq!(rep.state().committed, 0);
}

#[test]
fn same_pfn_twice_in_one_epoch_and_invalid_pages_chain_correctly() {
    let page = |v: u8| Some(vec![v; 4096]);
    let e = |pages: Vec<(u64, Option<Vec<u8>>)>| EpochData {
        pages,
        tsc: Default::default(),
        hvm_context: vec![1],
        params: vec![],
    };
    let eps = vec![
        e(vec![(0, page(1)), (1, page(2)), (0, page(3)), (2, page(9))]),
        e(vec![(0, page(4)), (2, None), (0, page(5)), (1, page(2))]),
        e(vec![(2, page(7)), (2, page(8))]),
    ];
    let (bytes, _) = compressed(&eps, 4);
    let mut rep = Replica::in_memory(4);
    let got = receive_opts(&bytes[..], &mut rep, true, |_| Ok(()));
    assert!(got.error.is_none());
    check(&rep, &ModelReplica::after(4, &eps, 3));
}

#[test]
fn truncations_and_damage_leave_whole_epochs() {
    let spec = SynthSpec {
        epochs: 3,
        pages: 4,
        dirty: 4,
        seed: 5,
    };
    let eps = epochs(&spec);
    let (bytes, ends) = compressed(&eps, spec.pages);
    for t in (0..bytes.len()).step_by(13) {
        let mut rep = Replica::in_memory(spec.pages);
        let got = receive_opts(&bytes[..t], &mut rep, true, |_| Ok(()));
        let k = ends.iter().filter(|&&e| e <= t as u64).count();
        assert!(got.error.is_some());
        check(&rep, &ModelReplica::after(spec.pages, &eps, k));
    }
    // Flip each byte of the first compressed record's tail (raw_len,
    // comp_len): refused, and nothing committed. Only real refusals count.
    let first = 24 + 16 + 8; // image + domain header + STATIC_DATA_END
    let len = u32::from_le_bytes(bytes[first + 4..first + 8].try_into().unwrap()) as usize;
    let count = u32::from_le_bytes(bytes[first + 8..first + 12].try_into().unwrap()) as usize;
    let tail = first + 8 + 8 + 8 * count;
    let nothing = ModelReplica::after(spec.pages, &eps, 0);
    let mut refused = Vec::new();
    for at in tail..tail + 8 {
        let mut bad = bytes.clone();
        bad[at] ^= 0x40;
        let mut rep = Replica::in_memory(spec.pages);
        let got = receive_opts(&bad[..], &mut rep, true, |_| Ok(()));
        let refusal = matches!(
            got.error,
            Some(ReceiveError::Stream(
                StreamError::BadCompressed { .. } | StreamError::BadLength { .. }
            ))
        );
        if refusal && same(&rep, &nothing) {
            refused.push(at);
        } else {
            eprintln!("tail byte {at}: {:?}", got.error);
        }
    }
    assert_eq!(refused, (tail..tail + 8).collect::<Vec<_>>());

    // The lz4 block of epoch 0 (random pages XORed with a zero cache, so
    // the raw bytes are the pages themselves): incompressible, so one
    // sequence of literals: a token, literal-length bytes, then the raw
    // bytes verbatim. Check that premise, then damage every header byte
    // and every 97th literal.
    let block = tail + 8..first + 8 + len;
    let raw: Vec<u8> = eps[0]
        .pages
        .iter()
        .flat_map(|(_, d)| d.clone().unwrap())
        .collect();
    let b = &bytes[block.clone()];
    assert_eq!(b[0] >> 4, 15, "token of a long literal run");
    let mut lit_len = 15;
    let mut head = 1;
    loop {
        lit_len += b[head] as usize;
        head += 1;
        if b[head - 1] != 255 {
            break;
        }
    }
    assert_eq!(lit_len, raw.len(), "one literal run holds the whole batch");
    assert!(b[head..] == raw[..], "the literals are the raw pages");
    // Damage in the token or the length bytes breaks the block's size:
    // refused, nothing committed.
    for at in block.start..block.start + head {
        let mut bad = bytes.clone();
        bad[at] ^= 0x5A;
        let mut rep = Replica::in_memory(spec.pages);
        let got = receive_opts(&bad[..], &mut rep, true, |_| Ok(()));
        assert!(
            matches!(
                got.error,
                Some(ReceiveError::Stream(StreamError::BadCompressed { .. }))
            ),
            "block header byte {at}: {:?}",
            got.error
        );
        check(&rep, &nothing);
    }
    // Damage in a literal is invisible by design (lz4 blocks and Xen's
    // stream carry no checksum): every epoch commits, and the replica is
    // the model of the epochs as damaged: that byte of that page flipped,
    // and (XOR chaining) the same byte of every later copy of the pfn
    // until an invalid entry zeroes the receiver's cache page.
    for at in (block.start + head..block.end)
        .step_by(97)
        .chain([block.end - 1])
    {
        let mut bad = bytes.clone();
        bad[at] ^= 0x5A;
        let mut rep = Replica::in_memory(spec.pages);
        let got = receive_opts(&bad[..], &mut rep, true, |_| Ok(()));
        assert!(
            got.error.is_none() && got.ended,
            "literal {at}: {:?}",
            got.error
        );
        let r = at - block.start - head;
        let damaged = flip_chained(&eps, r / 4096, r % 4096, 0x5A);
        check(&rep, &ModelReplica::after(spec.pages, &damaged, eps.len()));
    }
}

/// `eps` with byte `off` of epoch 0's `data`-th data page XORed with `x`,
/// and of every later entry of the same pfn until it is sent invalid.
fn flip_chained(eps: &[EpochData], data: usize, off: usize, x: u8) -> Vec<EpochData> {
    let mut out = eps.to_vec();
    let at = out[0]
        .pages
        .iter()
        .enumerate()
        .filter(|(_, (_, d))| d.is_some())
        .nth(data)
        .unwrap()
        .0;
    let pfn = out[0].pages[at].0;
    let later = out
        .iter_mut()
        .flat_map(|e| e.pages.iter_mut())
        .skip(at)
        .filter(|(p, _)| *p == pfn);
    for (_, d) in later {
        match d {
            Some(d) => d[off] ^= x,
            None => break,
        }
    }
    out
}

/// A stream of headers, a hello asking for `requested`, and END, received
/// by a backup offering `offer`: what it got and its answers to hellos
/// (requested, accepted).
fn hello_only(
    requested: u64,
    sink: &mut impl doppel::backup::EpochSink,
    offer: u64,
) -> (doppel::backup::Received, Vec<(u64, u64)>) {
    use doppel::backup::{receive_negotiated, Event};
    let mut w = StreamWriter::new(Vec::new());
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    w.hello(requested).unwrap();
    w.static_data_end().unwrap();
    w.end().unwrap();
    let mut answers = Vec::new();
    let got = receive_negotiated(&w.into_inner()[..], sink, offer, |ev| {
        if let Event::Hello {
            requested,
            accepted,
        } = ev
        {
            answers.push((requested, accepted));
        }
        Ok(())
    });
    (got, answers)
}

#[test]
fn hello_is_only_the_first_record_and_features_only_the_first_answer() {
    use doppel::ack::{AckReader, AckWriter, BackMsg};
    use doppel::backup::receive_negotiated;
    use doppel::stream::format::feature;
    // A hello first: answered with the request masked by the offer.
    for (offer, want) in [(feature::KNOWN, feature::XLZ4), (0, 0)] {
        let (got, answers) = hello_only(feature::XLZ4 | 0x80, &mut Replica::in_memory(4), offer);
        assert!(got.error.is_none(), "{:?}", got.error);
        assert_eq!(answers, vec![(feature::XLZ4 | 0x80, want)]);
        assert_eq!(got.features, want);
    }
    // A hello after STATIC_DATA_END is out of order.
    let mut w = StreamWriter::new(Vec::new());
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    w.static_data_end().unwrap();
    w.hello(feature::XLZ4).unwrap();
    let mut rep = Replica::in_memory(4);
    let got = receive_negotiated(&w.into_inner()[..], &mut rep, feature::KNOWN, |_| Ok(()));
    assert!(
        matches!(
            got.error,
            Some(ReceiveError::Stream(StreamError::OutOfOrder { .. }))
        ),
        "{:?}",
        got.error
    );
    assert_eq!(got.features, 0);
    // Back channel: DOPPEL_FEATURES first is read; after an ack it is refused.
    let mut aw = AckWriter::new(Vec::new()).unwrap();
    aw.features(1).unwrap();
    aw.ack(0).unwrap();
    let bytes = aw.end().unwrap();
    let mut ar = AckReader::open(&bytes[..], 0).unwrap();
    assert_eq!(ar.next_msg().unwrap(), BackMsg::Features(1));
    assert_eq!(ar.next_msg().unwrap(), BackMsg::Ack(0));
    assert_eq!(ar.next_msg().unwrap(), BackMsg::End);
    let mut aw = AckWriter::new(Vec::new()).unwrap();
    aw.ack(0).unwrap();
    aw.features(1).unwrap();
    let bytes = aw.end().unwrap();
    let mut ar = AckReader::open(&bytes[..], 0).unwrap();
    assert_eq!(ar.next_msg().unwrap(), BackMsg::Ack(0));
    let e = ar.next_msg().unwrap_err();
    assert!(
        e.to_string().contains("only allowed as the first record"),
        "{e}"
    );
}

#[test]
fn a_cache_the_host_cannot_map_is_an_error() {
    // 2^40 pages = 4 PiB, beyond any address space; 0 pages is no guest.
    for pages in [1u64 << 40, 0] {
        match XorCache::new(pages) {
            Err(e) => assert!(e.to_string().contains("cache"), "{e}"),
            Ok(_) => panic!("a cache of {pages} pages was mapped"),
        }
    }
    let c = XorCache::new(1 << 20).unwrap();
    assert_eq!(c.pages(), 1 << 20);
}

#[test]
fn a_backup_without_memory_for_the_cache_declines_compression() {
    use doppel::backup::EpochSink;
    use doppel::replica::{ReplicaError, StagedEpoch};
    use doppel::stream::format::feature;
    use doppel::stream::PAGE_SIZE;
    /// A guest too large for any XOR cache; no epoch reaches it.
    struct Huge;
    impl EpochSink for Huge {
        fn pages(&self) -> u64 {
            1 << 40
        }
        fn commit(&mut self, _: StagedEpoch) -> Result<Vec<Box<[u8; PAGE_SIZE]>>, ReplicaError> {
            unreachable!("the stream has no epoch")
        }
    }
    let (got, answers) = hello_only(feature::XLZ4, &mut Huge, feature::KNOWN);
    assert!(got.error.is_none(), "{:?}", got.error);
    assert!(got.ended);
    assert_eq!(answers, vec![(feature::XLZ4, 0)]);
    assert_eq!(got.features, 0);
    // Preset (not negotiated): the same is an error, not an abort.
    let mut w = StreamWriter::new(Vec::new());
    w.headers(XEN_MAJOR, XEN_MINOR).unwrap();
    let got = doppel::backup::receive_opts(&w.into_inner()[..], &mut Huge, true, |_| Ok(()));
    assert!(
        matches!(got.error, Some(ReceiveError::Cache(_))),
        "{:?}",
        got.error
    );
}
