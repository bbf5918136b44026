//! The two device records (Doppel extensions, docs/STREAM.md "Devices"):
//! DOPPEL_DEVICE_STATE carries the device model's sealed blob, opaque
//! here; DOPPEL_DISK_WRITES carries the disk writes the guest made in the
//! epoch, in the order it made them.
//!
//! Disk write body: `count u32, reserved u32`, then `count` entries of
//! `offset u64, length u32, reserved u32, data[length]`. Offsets and
//! lengths are whole 512-byte sectors, so every entry stays 8-byte aligned
//! and the body needs no padding.

use zerocopy::{FromBytes, IntoBytes};

use super::error::{RecCtx, StreamError};
use super::format::{
    CountHeader, DiskWriteRaw, MAX_DEVICE_STATE, MAX_DISK_WRITES_BODY, SECTOR_SIZE,
};

/// One disk write: `data` (whole sectors) at byte `offset` of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Bytes of the count header and of one entry header.
const HEAD: usize = 8;
const ENTRY: usize = 16;

/// Most data bytes one entry carries when it is alone in a record
/// (whole sectors).
pub const MAX_ENTRY_DATA: usize =
    (MAX_DISK_WRITES_BODY as usize - HEAD - ENTRY) / SECTOR_SIZE as usize * SECTOR_SIZE as usize;

/// Check a DOPPEL_DEVICE_STATE body (1..=MAX_DEVICE_STATE bytes).
pub(crate) fn check_device_state(rec: RecCtx, body: &[u8]) -> Result<(), StreamError> {
    if body.is_empty() || body.len() > MAX_DEVICE_STATE as usize {
        return Err(StreamError::BadLength {
            rec,
            length: body.len() as u64,
            expected: format!("1..={MAX_DEVICE_STATE}"),
        });
    }
    Ok(())
}

/// Decode and check a DOPPEL_DISK_WRITES body: count 1.., reserved fields
/// zero, every entry non-empty, sector-aligned, `offset + length` not
/// overflowing, inside the body, and the body exactly the entries.
pub(crate) fn decode_disk_writes(rec: RecCtx, body: &[u8]) -> Result<Vec<DiskWrite>, StreamError> {
    let len = body.len() as u64;
    let Some((h, mut rest)) = body
        .split_at_checked(HEAD)
        .map(|(h, r)| (CountHeader::read_from_bytes(h).expect("8 bytes"), r))
    else {
        return Err(StreamError::BadLength {
            rec,
            length: len,
            expected: "at least 8".into(),
        });
    };
    if h.reserved.get() != 0 {
        return Err(StreamError::Reserved {
            rec,
            field: "reserved",
            value: h.reserved.get().into(),
        });
    }
    let count = h.count.get();
    // Each entry holds at least one sector: a count the body cannot hold
    // is refused before anything is decoded.
    let most = (rest.len() / (ENTRY + SECTOR_SIZE as usize)) as u32;
    if count == 0 || count > most {
        return Err(StreamError::BadCount {
            rec,
            count,
            max: most,
        });
    }
    let mut out = Vec::with_capacity(count as usize);
    for entry in 0..count as usize {
        let bad = |msg: String| StreamError::BadDiskWrite { rec, entry, msg };
        let Some((eh, after)) = rest.split_at_checked(ENTRY) else {
            return Err(bad(format!(
                "entry header needs 16 bytes, {} left in the record",
                rest.len()
            )));
        };
        let e = DiskWriteRaw::read_from_bytes(eh).expect("16 bytes");
        let (offset, length) = (e.offset.get(), u64::from(e.length.get()));
        if e.reserved.get() != 0 {
            return Err(bad(format!(
                "reserved field is {:#x}, expected 0",
                e.reserved.get()
            )));
        }
        if length == 0 {
            return Err(bad("length 0 (a write is at least one sector)".into()));
        }
        if !offset.is_multiple_of(SECTOR_SIZE) || !length.is_multiple_of(SECTOR_SIZE) {
            return Err(bad(format!(
                "offset {offset} / length {length} not whole {SECTOR_SIZE}-byte sectors"
            )));
        }
        if offset.checked_add(length).is_none() {
            return Err(bad(format!(
                "offset {offset} + length {length} overflows 64 bits"
            )));
        }
        let Some((data, after)) = after.split_at_checked(length as usize) else {
            return Err(bad(format!(
                "length {length} runs past the record ({} bytes left)",
                after.len()
            )));
        };
        out.push(DiskWrite {
            offset,
            data: data.to_vec(),
        });
        rest = after;
    }
    if !rest.is_empty() {
        return Err(StreamError::BadLength {
            rec,
            length: len,
            expected: format!("{} (the {count} entries)", len - rest.len() as u64),
        });
    }
    Ok(out)
}

/// One planned DOPPEL_DISK_WRITES body: entry headers and their data.
pub(crate) type PlannedRecord<'a> = Vec<(DiskWriteRaw, &'a [u8])>;

/// Split `writes` into record bodies of at most MAX_DISK_WRITES_BODY,
/// keeping their order; a write larger than one record is cut into
/// consecutive pieces. Each body is (count header, entry headers with the
/// data slices they precede), ready for `StreamWriter::record`.
pub(crate) fn plan_disk_writes<'a>(
    writes: &[(u64, &'a [u8])],
) -> Result<Vec<PlannedRecord<'a>>, String> {
    let mut records = Vec::new();
    let mut cur: PlannedRecord<'a> = Vec::new();
    let mut size = HEAD;
    for &(offset, data) in writes {
        if data.is_empty()
            || !offset.is_multiple_of(SECTOR_SIZE)
            || !(data.len() as u64).is_multiple_of(SECTOR_SIZE)
        {
            return Err(format!(
                "disk write at {offset} of {} bytes is not whole {SECTOR_SIZE}-byte sectors",
                data.len()
            ));
        }
        if offset.checked_add(data.len() as u64).is_none() {
            return Err(format!("disk write at {offset} overflows 64 bits"));
        }
        let mut at = offset;
        for piece in data.chunks(MAX_ENTRY_DATA) {
            if size + ENTRY + piece.len() > MAX_DISK_WRITES_BODY as usize {
                records.push(std::mem::take(&mut cur));
                size = HEAD;
            }
            let h = DiskWriteRaw {
                offset: at.into(),
                length: (piece.len() as u32).into(),
                reserved: 0.into(),
            };
            cur.push((h, piece));
            size += ENTRY + piece.len();
            at += piece.len() as u64;
        }
    }
    if !cur.is_empty() {
        records.push(cur);
    }
    Ok(records)
}

/// The count header of a planned body.
pub(crate) fn count_header(entries: usize) -> [u8; 8] {
    let h = CountHeader {
        count: (entries as u32).into(),
        reserved: 0.into(),
    };
    let mut out = [0u8; 8];
    out.copy_from_slice(h.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::format::rec;

    fn ctx() -> RecCtx {
        RecCtx {
            index: 3,
            rtype: rec::DOPPEL_DISK_WRITES,
            offset: 100,
            libxl: false,
        }
    }

    /// A body from raw entries (offset, length field, data).
    fn body(count: u32, entries: &[(u64, u32, u32, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(off, len, res, data) in entries {
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&res.to_le_bytes());
            b.extend_from_slice(data);
        }
        b
    }

    #[test]
    fn a_well_formed_body_decodes_in_order() {
        let a = vec![1u8; 512];
        let b = vec![2u8; 1024];
        let got =
            decode_disk_writes(ctx(), &body(2, &[(4096, 512, 0, &a), (0, 1024, 0, &b)])).unwrap();
        assert_eq!(
            got,
            vec![
                DiskWrite {
                    offset: 4096,
                    data: a
                },
                DiskWrite { offset: 0, data: b }
            ]
        );
    }

    #[test]
    fn hostile_bodies_are_refused_with_the_reason() {
        let s = vec![7u8; 512];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 0, 0], "at least 8"),
            (body(0, &[]), "count 0"),
            (body(2, &[(0, 512, 0, &s)]), "count 2"),
            (body(1, &[(100, 512, 0, &s)]), "not whole 512-byte sectors"),
            (body(1, &[(0, 500, 0, &s[..500])]), "count 1 out of range"),
            (body(1, &[(0, 100, 0, &s)]), "not whole 512-byte sectors"),
            (body(1, &[(0, 0, 0, &s)]), "length 0"),
            (body(1, &[(0, 1024, 0, &s)]), "runs past the record"),
            (body(1, &[(0, 512, 9, &s)]), "reserved field is 0x9"),
            (
                body(1, &[(u64::MAX - 511, 512, 0, &s)]),
                "overflows 64 bits",
            ),
            (
                {
                    let mut b = body(1, &[(0, 512, 0, &s)]);
                    b.extend_from_slice(&[0; 8]);
                    b
                },
                "(the 1 entries)",
            ),
            (
                {
                    let mut b = body(1, &[(0, 512, 0, &s)]);
                    b[4] = 1;
                    b
                },
                "reserved field reserved",
            ),
        ];
        for (b, want) in cases {
            let e = decode_disk_writes(ctx(), &b).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(e.contains("DOPPEL_DISK_WRITES"), "{e}");
        }
    }

    #[test]
    fn device_state_must_be_non_empty_and_bounded() {
        assert!(check_device_state(ctx(), &[1]).is_ok());
        assert!(check_device_state(ctx(), &vec![0; MAX_DEVICE_STATE as usize]).is_ok());
        assert!(check_device_state(ctx(), &[]).is_err());
        assert!(check_device_state(ctx(), &vec![0; MAX_DEVICE_STATE as usize + 1]).is_err());
    }

    #[test]
    fn large_writes_are_split_into_bounded_records_in_order() {
        let big = vec![3u8; 9 << 20];
        let small = vec![4u8; 512];
        let plan = plan_disk_writes(&[(1 << 20, &small), (0, &big), (512, &small)]).unwrap();
        assert!(plan.len() >= 3, "{} records", plan.len());
        let mut flat = Vec::new();
        for r in &plan {
            let size: usize = HEAD + r.iter().map(|(_, d)| ENTRY + d.len()).sum::<usize>();
            assert!(size <= MAX_DISK_WRITES_BODY as usize);
            for (h, d) in r {
                assert_eq!(h.length.get() as usize, d.len());
                flat.push((h.offset.get(), d.len()));
            }
        }
        // The big write comes back as consecutive pieces between the two
        // small ones.
        assert_eq!(flat.first(), Some(&(1 << 20, 512)));
        assert_eq!(flat.last(), Some(&(512, 512)));
        let mut at = 0;
        for &(off, n) in &flat[1..flat.len() - 1] {
            assert_eq!(off, at);
            at += n as u64;
        }
        assert_eq!(at, 9 << 20);
        assert!(plan_disk_writes(&[(1, &small)]).is_err());
        assert!(plan_disk_writes(&[(0, &small[..100])]).is_err());
        assert!(plan_disk_writes(&[(0, &[])]).is_err());
    }
}
