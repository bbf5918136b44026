//! One test per validation rule: a stream that breaks exactly that rule
//! must be refused with exactly that error (and a valid twin is accepted).

use doppel::stream::format::rec;
use doppel::stream::{Limits, Record, StreamError, StreamReader};

const GUEST: u64 = 64;

fn ih(version: u32, options: u16, reserved: [u8; 6]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&u64::MAX.to_be_bytes());
    v.extend_from_slice(&0x5845_4E46u32.to_be_bytes());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&options.to_be_bytes());
    v.extend_from_slice(&reserved);
    v
}

fn dh(dtype: u32, shift: u16, reserved: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&dtype.to_le_bytes());
    v.extend_from_slice(&shift.to_le_bytes());
    v.extend_from_slice(&reserved.to_le_bytes());
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&17u32.to_le_bytes());
    v
}

fn record(t: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&t.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v.resize(v.len() + (8 - body.len() % 8) % 8, 0);
    v
}

fn headers() -> Vec<u8> {
    let mut v = ih(3, 0, [0; 6]);
    v.extend(dh(2, 12, 0));
    v
}

fn page_body(words: &[u64], pages: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(words.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    for i in 0..pages {
        b.extend(std::iter::repeat_n(i as u8 + 1, 4096));
    }
    b
}

fn tsc_body(reserved: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&2_000_000u32.to_le_bytes());
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&reserved.to_le_bytes());
    b
}

fn params_body(count: u32, reserved: u32, entries: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&reserved.to_le_bytes());
    for i in 0..entries as u64 {
        b.extend_from_slice(&i.to_le_bytes());
        b.extend_from_slice(&(i * 10).to_le_bytes());
    }
    b
}

/// A valid epoch's tail after its pages.
fn tail() -> Vec<u8> {
    let mut v = record(rec::X86_TSC_INFO, &tsc_body(0));
    v.extend(record(rec::HVM_CONTEXT, b"ctx-blob"));
    v.extend(record(rec::HVM_PARAMS, &params_body(1, 0, 1)));
    v
}

/// headers, STATIC_DATA_END, then `body` records, then END.
fn stream(body: &[Vec<u8>]) -> Vec<u8> {
    let mut v = headers();
    v.extend(record(rec::STATIC_DATA_END, &[]));
    for b in body {
        v.extend_from_slice(b);
    }
    v.extend(record(rec::END, &[]));
    v
}

fn good_epoch() -> Vec<u8> {
    let mut v = record(rec::PAGE_DATA, &page_body(&[3, 0xF << 60 | 4], 1));
    v.extend(tail());
    v.extend(record(rec::CHECKPOINT, &[]));
    v
}

fn decode(bytes: &[u8]) -> Result<Vec<Record>, StreamError> {
    let mut r = StreamReader::open(bytes, Limits { guest_pages: GUEST })?;
    let mut out = Vec::new();
    loop {
        let rec = r.next_record()?;
        out.push(rec);
        if r.ended() {
            r.expect_eof()?;
            return Ok(out);
        }
    }
}

#[test]
fn valid_twin_is_accepted() {
    let recs = decode(&stream(&[good_epoch(), good_epoch()])).unwrap();
    assert_eq!(recs.len(), 12);
    let Record::PageData(p) = &recs[1] else {
        panic!("expected PAGE_DATA, got {:?}", recs[1]);
    };
    let e: Vec<_> = p.entries().collect();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].pfn, 3);
    assert_eq!(e[0].data.unwrap(), &[1u8; 4096][..]);
    assert_eq!((e[1].pfn, e[1].data), (4, None));
    assert_eq!(recs[11], Record::End);
}

#[test]
fn image_header_rules() {
    let mut s = stream(&[good_epoch()]);
    s[3] = 0;
    assert!(matches!(decode(&s), Err(StreamError::BadMarker(m)) if m == 0xFFFF_FF00_FFFF_FFFF));
    let mut s = stream(&[good_epoch()]);
    s[8] = b'Y';
    assert!(matches!(
        decode(&s),
        Err(StreamError::BadImageId(0x5945_4E46))
    ));
    for v in [0u32, 1, 4] {
        let mut s = ih(v, 0, [0; 6]);
        s.extend(dh(2, 12, 0));
        assert!(matches!(decode(&s), Err(StreamError::UnsupportedVersion(x)) if x == v));
    }
    let mut s = ih(3, 1, [0; 6]);
    s.extend(dh(2, 12, 0));
    assert!(matches!(decode(&s), Err(StreamError::BigEndian)));
    let mut s = ih(3, 2, [0; 6]);
    s.extend(dh(2, 12, 0));
    assert!(matches!(
        decode(&s),
        Err(StreamError::ImageOptionsReserved(2))
    ));
    let mut s = ih(3, 0, [0, 0, 0, 0, 0, 9]);
    s.extend(dh(2, 12, 0));
    assert!(matches!(decode(&s), Err(StreamError::ImageHeaderReserved(r)) if r[5] == 9));
}

#[test]
fn domain_header_rules() {
    let with = |d: Vec<u8>| {
        let mut s = ih(3, 0, [0; 6]);
        s.extend(d);
        s
    };
    assert!(matches!(
        decode(&with(dh(1, 12, 0))),
        Err(StreamError::DomainType(1))
    ));
    assert!(matches!(
        decode(&with(dh(2, 13, 0))),
        Err(StreamError::PageShift(13))
    ));
    assert!(matches!(
        decode(&with(dh(2, 12, 7))),
        Err(StreamError::DomainHeaderReserved(7))
    ));
}

#[test]
fn version_2_has_no_static_section() {
    let mut v2 = ih(2, 0, [0; 6]);
    v2.extend(dh(2, 12, 0));
    let mut ok = v2.clone();
    ok.extend(good_epoch());
    ok.extend(record(rec::END, &[]));
    assert_eq!(decode(&ok).unwrap().len(), 6);
    let mut bad = v2;
    bad.extend(record(rec::STATIC_DATA_END, &[]));
    assert!(matches!(
        decode(&bad),
        Err(StreamError::WrongVersion { rec, version: 2 }) if rec.rtype == rec::STATIC_DATA_END
    ));
}

#[test]
fn record_length_limit_is_checked_before_the_body() {
    // The body is not there at all: a reader that allocated and read first
    // would report truncation instead.
    let mut s = headers();
    s.extend_from_slice(&rec::HVM_CONTEXT.to_le_bytes());
    s.extend_from_slice(&((128u32 << 20) + 1).to_le_bytes());
    assert!(matches!(
        decode(&s),
        Err(StreamError::RecordTooLong { length, max, .. }) if length == (128 << 20) + 1 && max == 128 << 20
    ));
}

#[test]
fn padding_must_be_zero() {
    let mut t = record(rec::X86_TSC_INFO, &tsc_body(0));
    t.extend(record(rec::HVM_CONTEXT, b"odd"));
    let at = t.len() - 2; // a padding byte of the 3-byte HVM_CONTEXT
    t[at] = 0x5A;
    let s = stream(&[t]);
    assert!(matches!(
        decode(&s),
        Err(StreamError::NonZeroPadding { rec, at: 6, value: 0x5A }) if rec.rtype == rec::HVM_CONTEXT
    ));
}

#[test]
fn unknown_mandatory_rejected_unknown_optional_skipped() {
    let s = stream(&[record(0x1234, b"x")]);
    assert!(matches!(
        decode(&s),
        Err(StreamError::UnknownMandatory { rec }) if rec.rtype == 0x1234 && rec.index == 1
    ));
    for t in [0x2u32, 0x7, rec::VERIFY, rec::CHECKPOINT_DIRTY_PFN_LIST] {
        let s = stream(&[record(t, &[])]);
        assert!(matches!(decode(&s), Err(StreamError::Unsupported { rec }) if rec.rtype == t));
    }
    // The reserved compressed-pages type is refused, not skipped: skipping
    // it would lose pages.
    let s = stream(&[record(rec::DOPPEL_PAGE_DATA_XLZ4, b"x")]);
    assert!(matches!(
        decode(&s),
        Err(StreamError::Unsupported { rec }) if rec.rtype == 0x80D0_0002
    ));
    // An optional record anywhere (even mid-epoch) is skipped.
    let mut e = record(rec::PAGE_DATA, &page_body(&[3], 1));
    e.extend(record(0x8000_4321, b"whatever"));
    e.extend(tail());
    e.extend(record(rec::CHECKPOINT, &[]));
    let with = decode(&stream(&[record(0x8000_0001, b"abc"), e])).unwrap();
    let mut plain = record(rec::PAGE_DATA, &page_body(&[3], 1));
    plain.extend(tail());
    plain.extend(record(rec::CHECKPOINT, &[]));
    assert_eq!(with, decode(&stream(&[plain])).unwrap());
}

#[test]
fn empty_records_must_be_empty() {
    for t in [rec::CHECKPOINT, rec::END] {
        let mut e = record(rec::PAGE_DATA, &page_body(&[3], 1));
        e.extend(tail());
        e.extend(record(t, &[0; 8]));
        assert!(matches!(
            decode(&stream(&[e])),
            Err(StreamError::BadLength { rec, length: 8, .. }) if rec.rtype == t
        ));
    }
    let mut s = headers();
    s.extend(record(rec::STATIC_DATA_END, &[1]));
    assert!(matches!(
        decode(&s),
        Err(StreamError::BadLength { rec, length: 1, .. }) if rec.rtype == rec::STATIC_DATA_END
    ));
}

fn page_err(body: Vec<u8>) -> StreamError {
    decode(&stream(&[record(rec::PAGE_DATA, &body)])).unwrap_err()
}

#[test]
fn page_data_count_rules() {
    assert!(matches!(
        page_err(page_body(&[], 0)),
        StreamError::BadCount {
            count: 0,
            max: 1024,
            ..
        }
    ));
    let words: Vec<u64> = (0..1025).map(|_| 0xF << 60).collect();
    assert!(matches!(
        page_err(page_body(&words, 0)),
        StreamError::BadCount { count: 1025, .. }
    ));
    let mut b = page_body(&[1], 1);
    b[4] = 1;
    assert!(matches!(
        page_err(b),
        StreamError::Reserved {
            field: "reserved",
            value: 1,
            ..
        }
    ));
    assert!(matches!(
        page_err(vec![1, 0, 0]),
        StreamError::BadLength { length: 3, .. }
    ));
}

#[test]
fn page_data_pfn_word_rules() {
    assert!(matches!(
        page_err(page_body(&[1 << 52 | 5], 1)),
        StreamError::Reserved { field: "pfn word bits 52-59", value, .. } if value == 1 << 52
    ));
    assert!(matches!(
        page_err(page_body(&[1, GUEST], 2)),
        StreamError::PfnOutOfRange {
            entry: 1,
            pfn: GUEST,
            limit: GUEST,
            ..
        }
    ));
    // An invalid pfn is range checked too.
    assert!(matches!(
        page_err(page_body(&[0xF << 60 | (GUEST + 9)], 0)),
        StreamError::PfnOutOfRange { entry: 0, .. }
    ));
    for t in [1u64, 4, 5, 8, 0xD, 0xE] {
        assert!(matches!(
            page_err(page_body(&[t << 60 | 2], 1)),
            StreamError::PageType { entry: 0, ptype, .. } if u64::from(ptype) == t
        ));
    }
}

#[test]
fn page_data_length_must_match_exactly() {
    // Two normal pfns but one page of data.
    assert!(matches!(
        page_err(page_body(&[1, 2], 1)),
        StreamError::BadLength { length, .. } if length == 8 + 16 + 4096
    ));
    // One invalid pfn, but a page of data anyway.
    assert!(matches!(
        page_err(page_body(&[0xF << 60 | 1], 1)),
        StreamError::BadLength { .. }
    ));
    // Fewer pfn words than count.
    let mut b = page_body(&[1], 0);
    b[0] = 3;
    assert!(matches!(
        page_err(b),
        StreamError::BadLength { length: 16, .. }
    ));
}

fn tail_err(tsc: Vec<u8>, ctx: &[u8], params: Vec<u8>) -> StreamError {
    let mut e = record(rec::X86_TSC_INFO, &tsc);
    e.extend(record(rec::HVM_CONTEXT, ctx));
    e.extend(record(rec::HVM_PARAMS, &params));
    e.extend(record(rec::CHECKPOINT, &[]));
    decode(&stream(&[e])).unwrap_err()
}

#[test]
fn tsc_context_params_rules() {
    let p = || params_body(1, 0, 1);
    assert!(matches!(
        tail_err(tsc_body(0)[..20].to_vec(), b"c", p()),
        StreamError::BadLength { rec, length: 20, .. } if rec.rtype == rec::X86_TSC_INFO
    ));
    assert!(matches!(
        tail_err(tsc_body(3), b"c", p()),
        StreamError::Reserved { rec, value: 3, .. } if rec.rtype == rec::X86_TSC_INFO
    ));
    assert!(matches!(
        tail_err(tsc_body(0), b"", p()),
        StreamError::BadLength { rec, length: 0, .. } if rec.rtype == rec::HVM_CONTEXT
    ));
    assert!(matches!(
        tail_err(tsc_body(0), b"c", vec![0; 4]),
        StreamError::BadLength { rec, length: 4, .. } if rec.rtype == rec::HVM_PARAMS
    ));
    assert!(matches!(
        tail_err(tsc_body(0), b"c", params_body(1, 8, 1)),
        StreamError::Reserved { rec, value: 8, .. } if rec.rtype == rec::HVM_PARAMS
    ));
    assert!(matches!(
        tail_err(tsc_body(0), b"c", params_body(2, 0, 1)),
        StreamError::BadLength { rec, length: 24, .. } if rec.rtype == rec::HVM_PARAMS
    ));
}

#[test]
fn static_data_rules() {
    let mut s = headers();
    s.extend(record(rec::X86_CPUID_POLICY, &[0; 48]));
    s.extend(record(rec::X86_MSR_POLICY, &[0; 16]));
    s.extend(record(rec::STATIC_DATA_END, &[]));
    s.extend(record(rec::END, &[]));
    let r = decode(&s).unwrap();
    assert_eq!(r[0], Record::CpuidPolicy(vec![0; 48]));
    assert_eq!(r[1], Record::MsrPolicy(vec![0; 16]));
    let mut s = headers();
    s.extend(record(rec::X86_CPUID_POLICY, &[0; 40]));
    assert!(matches!(
        decode(&s),
        Err(StreamError::BadLength { rec, length: 40, .. }) if rec.rtype == rec::X86_CPUID_POLICY
    ));
    let mut s = headers();
    s.extend(record(rec::X86_MSR_POLICY, &[0; 24]));
    assert!(matches!(
        decode(&s),
        Err(StreamError::BadLength { rec, length: 24, .. }) if rec.rtype == rec::X86_MSR_POLICY
    ));
}

fn order_err(recs: &[Vec<u8>]) -> (u32, &'static str) {
    match decode(&stream(recs)) {
        Err(StreamError::OutOfOrder { rec, expected }) => (rec.rtype, expected),
        other => panic!("expected OutOfOrder, got {other:?}"),
    }
}

#[test]
fn order_rules() {
    // Page data before STATIC_DATA_END.
    let mut s = headers();
    s.extend(record(rec::PAGE_DATA, &page_body(&[1], 1)));
    assert!(matches!(
        decode(&s),
        Err(StreamError::OutOfOrder { rec, .. }) if rec.rtype == rec::PAGE_DATA
    ));
    let pd = || record(rec::PAGE_DATA, &page_body(&[1], 1));
    let tsc = || record(rec::X86_TSC_INFO, &tsc_body(0));
    let ctx = || record(rec::HVM_CONTEXT, b"c");
    let par = || record(rec::HVM_PARAMS, &params_body(0, 0, 0));
    let cp = || record(rec::CHECKPOINT, &[]);
    assert_eq!(order_err(&[pd(), ctx()]).0, rec::HVM_CONTEXT);
    assert_eq!(order_err(&[pd(), cp()]).0, rec::CHECKPOINT);
    assert_eq!(order_err(&[tsc(), pd()]).0, rec::PAGE_DATA);
    assert_eq!(order_err(&[tsc(), par()]).0, rec::HVM_PARAMS);
    assert_eq!(order_err(&[tsc(), ctx(), cp()]).0, rec::CHECKPOINT);
    assert_eq!(order_err(&[tsc(), ctx(), par(), pd()]).0, rec::PAGE_DATA);
    assert_eq!(
        order_err(&[pd(), tsc(), ctx(), par(), cp(), ctx()]).0,
        rec::HVM_CONTEXT
    );
    assert_eq!(
        order_err(&[record(rec::STATIC_DATA_END, &[])]).0,
        rec::STATIC_DATA_END
    );
    assert_eq!(
        order_err(&[record(rec::X86_CPUID_POLICY, &[0; 24])]).0,
        rec::X86_CPUID_POLICY
    );
    // END in the middle of an epoch.
    let (t, _) = order_err(&[pd(), tsc()]);
    assert_eq!(t, rec::END);
    // A plain (non-checkpointed) final epoch: END right after HVM_PARAMS.
    assert_eq!(
        decode(&stream(&[pd(), tsc(), ctx(), par()])).unwrap().len(),
        6
    );
}

#[test]
fn nothing_after_end() {
    let mut s = stream(&[good_epoch()]);
    s.extend(record(rec::CHECKPOINT, &[]));
    assert!(matches!(decode(&s), Err(StreamError::TrailingData(8))));
    let good = stream(&[good_epoch()]);
    let mut r = StreamReader::open(&good[..], Limits::any()).unwrap();
    while !r.ended() {
        r.next_record().unwrap();
    }
    assert!(matches!(r.next_record(), Err(StreamError::AfterEnd)));
}

#[test]
fn truncation_is_reported_with_its_place() {
    let s = stream(&[good_epoch()]);
    assert!(matches!(
        decode(&s[..10]),
        Err(StreamError::Truncated {
            what: "image header",
            offset: 0
        })
    ));
    assert!(matches!(
        decode(&s[..30]),
        Err(StreamError::Truncated {
            what: "domain header",
            offset: 24
        })
    ));
    assert!(matches!(
        decode(&s[..52]),
        Err(StreamError::Truncated {
            what: "record header",
            offset: 48
        })
    ));
    assert!(matches!(
        decode(&s[..70]),
        Err(StreamError::Truncated {
            what: "record body",
            offset: 64
        })
    ));
}

#[test]
fn error_messages_name_record_and_field() {
    let e = page_err(page_body(&[1 << 52 | 5], 1));
    let m = e.to_string();
    assert!(
        m.contains("record #1 PAGE_DATA (type 0x1) at byte 48"),
        "{m}"
    );
    assert!(m.contains("pfn word bits 52-59"), "{m}");
}
