//! A recorded 3-epoch stream, cut at every byte, every structural byte
//! damaged with 16 values, and a few thousand random bytes damaged, fed to
//! the backup path (decoder -> stager -> replica). Never a panic, never a
//! partial epoch: the replica always equals a model replica built from the
//! generator's epochs (as sent, or as the damage changed them where the
//! format cannot tell).

use std::ops::Range;

use doppel::backup::receive;
use doppel::epoch::{EpochData, ModelReplica};
use doppel::replica::Replica;
use doppel::stream::format::{rec, PFN_MASK, REC_TYPE_OPTIONAL};
use doppel::stream::{TscInfo, PAGE_SIZE};
use doppel::synth::{stream_bytes, Layout, Rng, SynthSpec};

const SPEC: SynthSpec = SynthSpec {
    epochs: 3,
    pages: 5,
    dirty: 3,
    seed: 11,
};

fn assert_replica_is(rep: &Replica, m: &ModelReplica, what: &str) {
    assert_eq!(rep.state().committed, m.committed, "{what}: committed");
    assert!(rep.memory().unwrap() == m.memory, "{what}: memory");
    assert_eq!(rep.state().hvm_context, m.hvm_context, "{what}: context");
    assert_eq!(rep.state().tsc, m.tsc, "{what}: tsc");
    assert_eq!(rep.state().params, m.params, "{what}: params");
}

#[test]
fn every_truncation_leaves_the_last_whole_epoch() {
    let (epochs, bytes, lay) = stream_bytes(&SPEC);
    let models: Vec<ModelReplica> = (0..=epochs.len())
        .map(|k| ModelReplica::after(SPEC.pages, &epochs, k))
        .collect();
    for t in 0..=bytes.len() {
        let mut rep = Replica::in_memory(SPEC.pages);
        let got = receive(&bytes[..t], &mut rep, |_| Ok(()));
        let k = lay
            .checkpoint_ends
            .iter()
            .filter(|&&e| e <= t as u64)
            .count();
        assert_replica_is(&rep, &models[k], &format!("cut at {t}"));
        assert_eq!(got.epochs.len(), k, "cut at {t}");
        if t < bytes.len() {
            let e = got.error.expect("a cut stream is an error");
            assert!(
                matches!(&e, doppel::backup::ReceiveError::Stream(s) if s.is_truncation()),
                "cut at {t}: {e}"
            );
        } else {
            assert!(got.error.is_none() && got.ended);
        }
    }
}

/// What a byte of the trusted original stream is, from the format spec
/// (walked here independently of the StreamReader under test). `e` is the
/// epoch the record belongs to (STATIC_DATA_END: 0, END: the epoch count).
#[derive(Clone, Debug)]
enum Field {
    /// Headers, record framing, counts, reserved words: the reader
    /// validates them or they carry nothing the replica keeps.
    Meta,
    /// A record header's type byte; `entries` = the epoch's page entries a
    /// PAGE_DATA record carries.
    RecType {
        e: usize,
        rtype: u32,
        byte: usize,
        entries: Range<usize>,
    },
    /// A record header's length byte.
    RecLen { e: usize, rtype: u32, byte: usize },
    /// Byte `byte` of the pfn word of page entry `entry`.
    Pfn { e: usize, entry: usize, byte: usize },
    /// Byte `off` of the contents of page entry `entry`.
    Page { e: usize, entry: usize, off: usize },
    /// X86_TSC_INFO value bytes (mode, khz, nsec, incarnation).
    Tsc { e: usize, off: usize },
    /// HVM_CONTEXT blob byte (opaque at this layer).
    Context { e: usize, off: usize },
    /// HVM_PARAMS entry bytes (index, value), after the count header.
    Param { e: usize, off: usize },
}

impl Field {
    /// Bytes whose damage the format cannot see by design: values with no
    /// checksum (page contents, TSC values, the context blob, parameters).
    fn is_payload(&self) -> bool {
        matches!(
            self,
            Field::Page { .. } | Field::Tsc { .. } | Field::Context { .. } | Field::Param { .. }
        )
    }
}

/// Classify every byte of `bytes`, written by `write_stream` from `eps`.
fn fields(bytes: &[u8], eps: &[EpochData]) -> Vec<Field> {
    let rd32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let mut out = vec![Field::Meta; 40];
    let (mut at, mut e, mut entry) = (40, 0, 0);
    while at < bytes.len() {
        let (rtype, len) = (rd32(at), rd32(at + 4) as usize);
        let body = at + 8;
        let count = if rtype == rec::PAGE_DATA {
            rd32(body) as usize
        } else {
            0
        };
        for byte in 0..4 {
            out.push(Field::RecType {
                e,
                rtype,
                byte,
                entries: entry..entry + count,
            });
        }
        for byte in 0..4 {
            out.push(Field::RecLen { e, rtype, byte });
        }
        match rtype {
            rec::PAGE_DATA => {
                out.extend((0..8).map(|_| Field::Meta));
                for i in 0..count {
                    out.extend((0..8).map(|byte| Field::Pfn {
                        e,
                        entry: entry + i,
                        byte,
                    }));
                }
                for i in 0..count {
                    if eps[e].pages[entry + i].1.is_some() {
                        out.extend((0..PAGE_SIZE).map(|off| Field::Page {
                            e,
                            entry: entry + i,
                            off,
                        }));
                    }
                }
                entry += count;
            }
            rec::X86_TSC_INFO => {
                out.extend((0..20).map(|off| Field::Tsc { e, off }));
                out.extend((20..24).map(|_| Field::Meta));
            }
            rec::HVM_CONTEXT => out.extend((0..len).map(|off| Field::Context { e, off })),
            rec::HVM_PARAMS => {
                out.extend((0..8).map(|_| Field::Meta));
                out.extend((0..len - 8).map(|off| Field::Param { e, off }));
            }
            rec::CHECKPOINT => {
                e += 1;
                entry = 0;
            }
            _ => {}
        }
        // Padding.
        at = body + len.next_multiple_of(8);
        out.resize_with(at, || Field::Meta);
    }
    assert_eq!(out.len(), bytes.len());
    out
}

/// Encoded X86_TSC_INFO value bytes (spec layout, without the reserved word).
fn tsc_bytes(t: &TscInfo) -> [u8; 20] {
    let mut b = [0; 20];
    b[..4].copy_from_slice(&t.mode.to_le_bytes());
    b[4..8].copy_from_slice(&t.khz.to_le_bytes());
    b[8..16].copy_from_slice(&t.nsec.to_le_bytes());
    b[16..].copy_from_slice(&t.incarnation.to_le_bytes());
    b
}

/// What the stream means when byte `f` is XORed with `x` and the format
/// has no way to tell (no checksum): the generator's epochs with that
/// value changed. `None`: no such legitimate reading, so the damage must
/// be refused or leave nothing the replica keeps different.
fn damaged_meaning(eps: &[EpochData], f: &Field, x: u8, guest: u64) -> Option<Vec<EpochData>> {
    let mut d = eps.to_vec();
    match *f {
        Field::Page { e, entry, off } => d[e].pages[entry].1.as_mut().unwrap()[off] ^= x,
        Field::Tsc { e, off } => {
            let mut b = tsc_bytes(&d[e].tsc);
            b[off] ^= x;
            let w32 = |r: Range<usize>| u32::from_le_bytes(b[r].try_into().unwrap());
            d[e].tsc = TscInfo {
                mode: w32(0..4),
                khz: w32(4..8),
                nsec: u64::from_le_bytes(b[8..16].try_into().unwrap()),
                incarnation: w32(16..20),
            };
        }
        Field::Context { e, off } => d[e].hvm_context[off] ^= x,
        Field::Param { e, off } => {
            let p = &mut d[e].params[off / 16];
            let v = if off % 16 < 8 {
                &mut p.index
            } else {
                &mut p.value
            };
            *v ^= u64::from(x) << (8 * (off % 8));
        }
        // A pfn moved to another pfn of the guest, type and reserved bits
        // untouched: a valid word, the page lands elsewhere.
        Field::Pfn { e, entry, byte } => {
            let (pfn, data) = &d[e].pages[entry];
            let ptype: u64 = if data.is_some() { 0 } else { 0xF };
            let w = (*pfn | ptype << 60) ^ (u64::from(x) << (8 * byte));
            let moved = w >> 52 == ptype << 8 && (w & PFN_MASK) < guest;
            if !moved {
                return None;
            }
            d[e].pages[entry].0 = w & PFN_MASK;
        }
        // PAGE_DATA turned into an unknown optional type: Xen's format
        // says skip it, so the epoch arrives without those pages.
        Field::RecType {
            e,
            rtype: rec::PAGE_DATA,
            byte,
            ref entries,
        } if (rec::PAGE_DATA ^ u32::from(x) << (8 * byte)) & REC_TYPE_OPTIONAL != 0 => {
            d[e].pages.drain(entries.clone());
        }
        // HVM_CONTEXT shortened into its own trailing zeros, which then
        // read as padding: a shorter blob.
        Field::RecLen {
            e,
            rtype: rec::HVM_CONTEXT,
            byte,
        } => {
            let ctx = &d[e].hvm_context;
            let len = ctx.len() ^ (usize::from(x) << (8 * byte));
            let shorter = (1..ctx.len()).contains(&len)
                && len.next_multiple_of(8) == ctx.len().next_multiple_of(8)
                && ctx[len..].iter().all(|&b| b == 0);
            if !shorter {
                return None;
            }
            d[e].hvm_context.truncate(len);
        }
        _ => return None,
    }
    Some(d)
}

fn same(rep: &Replica, m: &ModelReplica) -> bool {
    rep.state().committed == m.committed
        && rep.memory().unwrap() == m.memory
        && rep.state().hvm_context == m.hvm_context
        && rep.state().tsc == m.tsc
        && rep.state().params == m.params
}

/// Feed `bytes` with byte `p` XORed with `x` and compare the replica with
/// the generator's model. Payload damage (no checksum in the format) must
/// be accepted as exactly the damaged values. Structural damage must be
/// refused or leave the replica at the model of the original epochs it
/// committed; the only silent changes allowed are the ones the format
/// cannot tell from a valid stream (`damaged_meaning`), and then the
/// replica must be exactly that. Each damage is fed twice: the whole
/// stream, and the stream cut right after the damaged epoch's CHECKPOINT
/// (so a later epoch rewriting the same pages cannot hide it). Returns
/// whether the whole stream's run reported an error.
fn judge(bytes: &[u8], eps: &[EpochData], lay: &Layout, fields: &[Field], p: usize, x: u8) -> bool {
    let mut bad = bytes.to_vec();
    bad[p] ^= x;
    let f = &fields[p];
    let meaning = damaged_meaning(eps, f, x, SPEC.pages);
    let ends = &lay.checkpoint_ends;
    // Epochs wholly before the damaged byte.
    let c = ends.iter().filter(|&&e| e <= p as u64).count();
    let mut cuts = vec![bad.len()];
    cuts.extend(ends.get(c).map(|&e| e as usize));
    let mut detected = false;
    for cut in cuts {
        let whole = cut == bad.len();
        let mut rep = Replica::in_memory(SPEC.pages);
        let got = receive(&bad[..cut], &mut rep, |_| Ok(()));
        let what = format!("byte {p} ({f:?}) ^ {x:#04x}, cut at {cut}: {:?}", got.error);
        let k = rep.state().committed as usize;
        assert!(k >= c, "{what}: undamaged epochs must commit ({k} < {c})");
        assert_eq!(got.epochs.len(), k, "{what}");
        if f.is_payload() {
            let d = meaning.as_ref().expect("payload damage has a meaning");
            let n = ends.iter().filter(|&&e| e <= cut as u64).count();
            assert_eq!(k, n, "{what}: every epoch commits");
            assert_eq!(got.error.is_none() && got.ended, whole, "{what}");
            assert_replica_is(&rep, &ModelReplica::after(SPEC.pages, d, n), &what);
        } else if !same(&rep, &ModelReplica::after(SPEC.pages, eps, k)) {
            let Some(d) = &meaning else {
                // Neither refused cleanly nor harmless: name the difference.
                assert_replica_is(&rep, &ModelReplica::after(SPEC.pages, eps, k), &what);
                unreachable!("{what}");
            };
            assert_replica_is(&rep, &ModelReplica::after(SPEC.pages, d, k), &what);
        }
        if whole {
            detected = got.error.is_some();
        }
    }
    detected
}

#[test]
fn every_structural_byte_damaged_is_refused_or_harmless() {
    let (eps, bytes, lay) = stream_bytes(&SPEC);
    let fields = fields(&bytes, &eps);
    let mut rng = Rng::new(0x5EED_0002);
    let mut xs = vec![
        0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF, 0x0E, 0x0F, 0x09,
    ];
    xs.extend((0..4).map(|_| 1 + rng.below(255) as u8));
    let (mut refused, mut accepted) = (0u32, 0u32);
    for p in (0..bytes.len()).filter(|&p| !fields[p].is_payload()) {
        for &x in &xs {
            if judge(&bytes, &eps, &lay, &fields, p, x) {
                refused += 1;
            } else {
                accepted += 1;
            }
        }
    }
    eprintln!("structural damage: {refused} refused, {accepted} accepted (harmless or by-design)");
}

#[test]
fn random_single_byte_corruptions() {
    let (eps, bytes, lay) = stream_bytes(&SPEC);
    let fields = fields(&bytes, &eps);
    let structural: Vec<usize> = (0..bytes.len())
        .filter(|&p| !fields[p].is_payload())
        .collect();
    let mut rng = Rng::new(0x5EED_0001);
    let (mut detected, mut undetected) = (0u32, 0u32);
    for i in 0..4000 {
        // Half anywhere (mostly page contents), half on framing/metadata.
        let p = if i % 2 == 0 {
            rng.below(bytes.len() as u64) as usize
        } else {
            structural[rng.below(structural.len() as u64) as usize]
        };
        let x = 1 + rng.below(255) as u8;
        if judge(&bytes, &eps, &lay, &fields, p, x) {
            detected += 1;
        } else {
            undetected += 1;
        }
    }
    eprintln!("corruptions: {detected} detected, {undetected} undetected");
    // Each corruption was checked against the model above. Page contents
    // and the other values carry no checksum in Xen's format, so their
    // damage is undetected by design; most framing damage is refused.
    assert!(
        detected > 100 && undetected > 100,
        "{detected} / {undetected}"
    );
}
