//! The back channel: round trip and one test per validation rule.

use doppel::ack::{AckReader, AckWriter, BackMsg};
use doppel::stream::StreamError;

fn hdr(ident: u64, version: u32, options: u32) -> Vec<u8> {
    let mut v = ident.to_be_bytes().to_vec();
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&options.to_be_bytes());
    v
}

const IDENT: u64 = 0x4C69_6278_6C46_6D74;
const ACK: u32 = 0x80D0_0001;
const FEATURES: u32 = doppel::stream::format::libxl_rec::DOPPEL_FEATURES;

fn rec(t: u32, body: &[u8]) -> Vec<u8> {
    let mut v = t.to_le_bytes().to_vec();
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v.resize(v.len() + (8 - body.len() % 8) % 8, 0);
    v
}

fn ack_body(epoch: u64, reserved: u64) -> Vec<u8> {
    let mut b = epoch.to_le_bytes().to_vec();
    b.extend_from_slice(&reserved.to_le_bytes());
    b
}

fn state(id: u32) -> Vec<u8> {
    rec(5, &id.to_le_bytes())
}

fn read_all(bytes: &[u8], first: u64) -> Result<Vec<BackMsg>, StreamError> {
    let mut r = AckReader::open(bytes, first)?;
    let mut out = Vec::new();
    loop {
        let m = r.next_msg()?;
        out.push(m);
        if m == BackMsg::End {
            return Ok(out);
        }
    }
}

fn chan(recs: &[Vec<u8>]) -> Vec<u8> {
    let mut v = hdr(IDENT, 2, 0);
    for r in recs {
        v.extend_from_slice(r);
    }
    v
}

#[test]
fn writer_reader_round_trip_and_exact_bytes() {
    let mut w = AckWriter::new(Vec::new()).unwrap();
    for e in 7..12 {
        w.ack(e).unwrap();
    }
    let bytes = w.end().unwrap();
    // Exact framing: header, then per ack 8+16 and 8+4+4 bytes, END.
    let mut want = hdr(IDENT, 2, 0);
    for e in 7..12u64 {
        want.extend(rec(ACK, &ack_body(e, 0)));
        want.extend(state(2));
    }
    want.extend(rec(0, &[]));
    assert_eq!(bytes, want);
    let msgs = read_all(&bytes, 7).unwrap();
    let mut expect: Vec<BackMsg> = (7..12).map(BackMsg::Ack).collect();
    expect.push(BackMsg::End);
    assert_eq!(msgs, expect);
}

#[test]
fn header_rules() {
    assert!(matches!(
        read_all(&hdr(IDENT + 1, 2, 0), 0),
        Err(StreamError::BadLibxlIdent(_))
    ));
    assert!(matches!(
        read_all(&hdr(IDENT, 3, 0), 0),
        Err(StreamError::BadLibxlVersion(3))
    ));
    for o in [1u32, 2, 4] {
        assert!(
            matches!(read_all(&hdr(IDENT, 2, o), 0), Err(StreamError::LibxlOptions(x)) if x == o)
        );
    }
    assert!(matches!(
        read_all(&hdr(IDENT, 2, 0)[..9], 0),
        Err(StreamError::Truncated {
            what: "libxl header",
            ..
        })
    ));
}

#[test]
fn framing_rules() {
    let mut big = 5u32.to_le_bytes().to_vec();
    big.extend_from_slice(&4097u32.to_le_bytes());
    assert!(matches!(
        read_all(&chan(&[big]), 0),
        Err(StreamError::RecordTooLong { length: 4097, .. })
    ));
    let mut padded = state(3);
    padded[14] = 1;
    assert!(matches!(
        read_all(&chan(&[padded]), 0),
        Err(StreamError::NonZeroPadding {
            at: 6,
            value: 1,
            ..
        })
    ));
    assert!(matches!(
        read_all(&chan(&[rec(0x77, &[])]), 0),
        Err(StreamError::UnknownMandatory { rec }) if rec.rtype == 0x77 && rec.libxl
    ));
    for t in 1..=4u32 {
        assert!(matches!(
            read_all(&chan(&[rec(t, &[])]), 0),
            Err(StreamError::Unsupported { rec }) if rec.rtype == t
        ));
    }
    // Unknown optional records are skipped.
    let msgs = read_all(
        &chan(&[
            rec(0x8000_0042, b"xyz"),
            rec(ACK, &ack_body(0, 0)),
            state(2),
            rec(0, &[]),
        ]),
        0,
    )
    .unwrap();
    assert_eq!(msgs, vec![BackMsg::Ack(0), BackMsg::End]);
    assert!(matches!(
        read_all(&chan(&[rec(0, &[0])]), 0),
        Err(StreamError::BadLength { length: 1, .. })
    ));
    assert!(matches!(
        read_all(&chan(&[state(3)]), 0),
        Err(StreamError::Truncated {
            what: "back channel record header",
            ..
        })
    ));
}

#[test]
fn ack_rules() {
    let bad_ack = |recs: &[Vec<u8>]| match read_all(&chan(recs), 4) {
        Err(StreamError::BadAck { msg, .. }) => msg,
        other => panic!("expected BadAck, got {other:?}"),
    };
    assert!(bad_ack(&[rec(ACK, &ack_body(5, 0)), state(2)]).contains("expected epoch 4"));
    assert!(bad_ack(&[
        rec(ACK, &ack_body(4, 0)),
        state(2),
        rec(ACK, &ack_body(4, 0))
    ])
    .contains("expected epoch 5"));
    assert!(bad_ack(&[state(2)]).contains("without a preceding"));
    assert!(bad_ack(&[rec(ACK, &ack_body(4, 0)), state(3)]).contains("expected SVM_READY"));
    assert!(bad_ack(&[rec(ACK, &ack_body(4, 0)), rec(ACK, &ack_body(5, 0))]).contains("second"));
    assert!(bad_ack(&[rec(ACK, &ack_body(4, 0)), rec(0, &[])]).contains("END while"));
    assert!(bad_ack(&[rec(ACK, &ack_body(4, 0)), rec(0x8000_0042, &[])]).contains("between"));
    assert!(matches!(
        read_all(&chan(&[rec(ACK, &ack_body(4, 9))]), 4),
        Err(StreamError::Reserved { value: 9, .. })
    ));
    // DOPPEL_FEATURES: the same (value, reserved = 0) body.
    assert_eq!(
        read_all(&chan(&[rec(FEATURES, &ack_body(0b101, 0)), rec(0, &[])]), 4).unwrap(),
        vec![BackMsg::Features(0b101), BackMsg::End]
    );
    assert!(matches!(
        read_all(&chan(&[rec(FEATURES, &ack_body(0b101, 7))]), 4),
        Err(StreamError::Reserved { value: 7, .. })
    ));
    assert!(matches!(
        read_all(&chan(&[rec(ACK, &[0; 8])]), 4),
        Err(StreamError::BadLength { length: 8, .. })
    ));
    assert!(matches!(
        read_all(&chan(&[rec(5, &[2, 0])]), 4),
        Err(StreamError::BadLength { length: 2, .. })
    ));
    assert!(matches!(
        read_all(&chan(&[state(4)]), 4),
        Err(StreamError::BadControlId { id: 4, .. })
    ));
    // Bare states other than SVM_READY pass through.
    assert_eq!(
        read_all(&chan(&[state(0), state(1), state(3), rec(0, &[])]), 4).unwrap(),
        vec![
            BackMsg::State(0),
            BackMsg::State(1),
            BackMsg::State(3),
            BackMsg::End
        ]
    );
}
