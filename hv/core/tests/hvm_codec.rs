//! HVM context codec: round trips, byte positions against the documented
//! Xen layout, one test per validation rule, truncation and corruption.

mod common;

use common::Rng;
use doppel_core::hvm::{
    decode, decode_padded, decode_visit, encode, encoded_len, to_hw_cpu, DescTable, HeaderInfo,
    HvmError, PendingEvent, SegAttr, SegName, Segment, TableName, VcpuState, CPU_LEN,
};
use proptest::prelude::*;
use zerocopy::IntoBytes;

fn seg(r: &mut Rng) -> Segment {
    Segment {
        selector: r.next_u64() as u16,
        base: r.next_u64(),
        limit: r.next_u64() as u32,
        attr: SegAttr::from_svm(r.next_u64() as u16),
    }
}

/// A vCPU state with every field drawn from `seed`.
fn state(seed: u64) -> VcpuState {
    let mut r = Rng(seed);
    let mut fpu = [0u8; 512];
    for b in fpu.iter_mut() {
        *b = r.next_u64() as u8;
    }
    let pending_event = match r.below(3) {
        0 => None,
        1 => Some(PendingEvent {
            vector: r.next_u64() as u8,
            kind: r.below(8) as u8,
            error_code: None,
        }),
        _ => Some(PendingEvent {
            vector: r.next_u64() as u8,
            kind: r.below(8) as u8,
            error_code: Some(r.next_u64() as u32),
        }),
    };
    VcpuState {
        rax: r.next_u64(),
        rbx: r.next_u64(),
        rcx: r.next_u64(),
        rdx: r.next_u64(),
        rbp: r.next_u64(),
        rsi: r.next_u64(),
        rdi: r.next_u64(),
        rsp: r.next_u64(),
        r8: r.next_u64(),
        r9: r.next_u64(),
        r10: r.next_u64(),
        r11: r.next_u64(),
        r12: r.next_u64(),
        r13: r.next_u64(),
        r14: r.next_u64(),
        r15: r.next_u64(),
        rip: r.next_u64(),
        rflags: r.next_u64(),
        cr0: r.next_u64(),
        cr2: r.next_u64(),
        cr3: r.next_u64(),
        cr4: r.next_u64(),
        dr: [r.next_u64(), r.next_u64(), r.next_u64(), r.next_u64()],
        dr6: r.next_u64(),
        dr7: r.next_u64(),
        cs: seg(&mut r),
        ds: seg(&mut r),
        es: seg(&mut r),
        fs: seg(&mut r),
        gs: seg(&mut r),
        ss: seg(&mut r),
        tr: seg(&mut r),
        ldtr: seg(&mut r),
        gdtr: DescTable {
            base: r.next_u64(),
            limit: r.next_u64() as u16,
        },
        idtr: DescTable {
            base: r.next_u64(),
            limit: r.next_u64() as u16,
        },
        efer: r.next_u64(),
        sysenter_cs: r.next_u64(),
        sysenter_esp: r.next_u64(),
        sysenter_eip: r.next_u64(),
        kernel_gs_base: r.next_u64(),
        star: r.next_u64(),
        lstar: r.next_u64(),
        cstar: r.next_u64(),
        sfmask: r.next_u64(),
        tsc: r.next_u64(),
        tsc_aux: r.next_u64() as u32,
        pending_event,
        fpu,
        fpu_initialised: r.below(2) == 1,
    }
}

const HDR: HeaderInfo = HeaderInfo {
    cpuid: 0x000a_0655,
    gtsc_khz: 2_000_000,
    changeset: 0x0102_0304_0506_0708,
};

fn enc(vcpus: &[VcpuState]) -> Vec<u8> {
    let mut out = vec![0u8; encoded_len(vcpus.len()).expect("len")];
    let n = encode(vcpus, HDR, &mut out).expect("encode");
    assert_eq!(n, out.len());
    out
}

fn rec(t: u16, i: u16, payload: &[u8]) -> Vec<u8> {
    rec_len(t, i, payload.len() as u32, payload)
}

fn rec_len(t: u16, i: u16, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&t.to_le_bytes());
    v.extend_from_slice(&i.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn header_payload(magic: u32, version: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&magic.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&HDR.changeset.to_le_bytes());
    v.extend_from_slice(&HDR.cpuid.to_le_bytes());
    v.extend_from_slice(&HDR.gtsc_khz.to_le_bytes());
    v
}

fn good_header() -> Vec<u8> {
    rec(1, 0, &header_payload(0x5438_1286, 1))
}

fn cpu(v: &VcpuState) -> Vec<u8> {
    to_hw_cpu(v).expect("cpu").as_bytes().to_vec()
}

fn end() -> Vec<u8> {
    rec(0, 0, &[])
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// A CPU payload from `seed` with one little-endian word patched.
fn cpu_patched(seed: u64, offset: usize, bytes: &[u8]) -> Vec<u8> {
    let mut c = cpu(&state(seed));
    c[offset..offset + bytes.len()].copy_from_slice(bytes);
    c
}

fn one_cpu_blob(payload: &[u8]) -> Vec<u8> {
    cat(&[good_header(), rec(2, 0, payload), end()])
}

fn dec(blob: &[u8]) -> Result<Vec<(u16, VcpuState)>, HvmError> {
    decode::<8>(blob).map(|d| d.vcpus.into_iter().collect())
}

#[test]
fn layout_matches_xen_abi_offsets() {
    let mut v = state(1);
    v.rax = 0x1111_1111_1111_1111;
    v.r15 = 0xf0f0;
    v.rip = 0xffff_8000_0000_1234;
    v.cr3 = 0x33;
    v.dr7 = 0x77;
    v.cs.selector = 0x10;
    v.ldtr.limit = 0xabcd;
    v.gs.base = 0x6565;
    v.ss.attr = SegAttr::from_bits(0xc93).expect("attr");
    v.gdtr = DescTable {
        base: 0x9000,
        limit: 0x7f,
    };
    v.idtr = DescTable {
        base: 0xa000,
        limit: 0xfff,
    };
    v.kernel_gs_base = 0x4747;
    v.sfmask = 0x4700;
    v.efer = 0xd01;
    v.tsc_aux = 7;
    v.tsc = 0x1234_5678;
    v.pending_event = Some(PendingEvent {
        vector: 14,
        kind: 3,
        error_code: Some(2),
    });
    v.fpu_initialised = true;
    v.fpu[0] = 0x7f;
    let b = enc(std::slice::from_ref(&v));
    assert_eq!(b.len(), 8 + 24 + 8 + 1032 + 8);
    let u16at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    // HEADER descriptor and payload.
    assert_eq!((u16at(0), u16at(2), u32at(4)), (1, 0, 24));
    assert_eq!(u32at(8), 0x5438_1286);
    assert_eq!(u32at(12), 1);
    assert_eq!(u64at(16), HDR.changeset);
    assert_eq!(u32at(24), HDR.cpuid);
    assert_eq!(u32at(28), HDR.gtsc_khz);
    // CPU descriptor; payload starts at 40. Offsets per XEN-ABI.md.
    assert_eq!((u16at(32), u16at(34), u32at(36)), (2, 0, 1032));
    let c = 40;
    assert_eq!(b[c], 0x7f);
    assert_eq!(u64at(c + 512), v.rax);
    assert_eq!(u64at(c + 512 + 15 * 8), v.r15);
    assert_eq!(u64at(c + 640), v.rip);
    assert_eq!(u64at(c + 648), v.rflags);
    assert_eq!(u64at(c + 656 + 16), v.cr3);
    assert_eq!(u64at(c + 688 + 40), v.dr7);
    assert_eq!(u32at(c + 736), 0x10);
    assert_eq!(u32at(c + 768 + 7 * 4), 0xabcd);
    assert_eq!(u32at(c + 768 + 8 * 4), 0xfff); // idtr_limit
    assert_eq!(u32at(c + 768 + 9 * 4), 0x7f); // gdtr_limit
    assert_eq!(u64at(c + 808 + 4 * 8), 0x6565);
    assert_eq!(u64at(c + 808 + 8 * 8), 0xa000); // idtr_base
    assert_eq!(u64at(c + 808 + 9 * 8), 0x9000); // gdtr_base
    assert_eq!(u32at(c + 888 + 5 * 4), 0xc93);
    assert_eq!(u64at(c + 920), v.sysenter_cs);
    assert_eq!(u64at(c + 944), 0x4747);
    assert_eq!(u64at(c + 952), 0); // msr_flags
    assert_eq!(u64at(c + 960), v.lstar);
    assert_eq!(u64at(c + 968), v.star);
    assert_eq!(u64at(c + 976), v.cstar);
    assert_eq!(u64at(c + 984), 0x4700);
    assert_eq!(u64at(c + 992), 0xd01);
    assert_eq!(u64at(c + 1000), 7);
    assert_eq!(u64at(c + 1008), 0x1234_5678);
    assert_eq!(u32at(c + 1016), 1 << 31 | 1 << 11 | 3 << 8 | 14);
    assert_eq!(u32at(c + 1020), 2);
    assert_eq!(u32at(c + 1024), 1);
    assert_eq!(u32at(c + 1028), 0);
    // END.
    assert_eq!(&b[c + 1032..], &[0u8; 8]);
}

#[test]
fn hand_built_blob_decodes() {
    let (a, b) = (state(10), state(11));
    let blob = cat(&[
        good_header(),
        rec(2, 0, &cpu(&a)),
        rec(2, 1, &cpu(&b)),
        end(),
    ]);
    assert_eq!(blob, enc(&[a.clone(), b.clone()]));
    let d = decode::<2>(&blob).expect("decode");
    assert_eq!(d.header, HDR);
    assert_eq!(d.vcpus.as_slice(), &[(0, a), (1, b)]);
}

#[test]
fn sparse_vcpu_ids_are_kept() {
    let (a, b) = (state(20), state(21));
    let blob = cat(&[
        good_header(),
        rec(2, 0, &cpu(&a)),
        rec(2, 3, &cpu(&b)),
        end(),
    ]);
    assert_eq!(dec(&blob), Ok(vec![(0, a), (3, b)]));
}

#[test]
fn xen_types_we_do_not_use_are_skipped() {
    let (a, b) = (state(30), state(31));
    let blob = cat(&[
        good_header(),
        rec(2, 0, &cpu(&a)),
        rec(2, 1, &cpu(&b)),
        rec(3, 0, &[0x5a; 16]), // PIC
        rec(5, 0, &[1; 40]),    // LAPIC
        rec(5, 1, &[2; 40]),
        rec(16, 0, &[3; 600]), // CPU_XSAVE, variable length
        rec(16, 1, &[]),
        rec(20, 1, &[4; 24]), // CPU_MSR
        end(),
    ]);
    assert_eq!(dec(&blob), Ok(vec![(0, a), (1, b)]));
}

#[test]
fn header_must_come_first_and_be_well_formed() {
    let c = rec(2, 0, &cpu(&state(1)));
    assert_eq!(
        dec(&cat(&[c.clone(), good_header(), end()])),
        Err(HvmError::HeaderNotFirst(2))
    );
    assert_eq!(dec(&end()), Err(HvmError::HeaderNotFirst(0)));
    let hp = header_payload(0x5438_1286, 1);
    assert_eq!(
        dec(&cat(&[rec(1, 1, &hp), c.clone(), end()])),
        Err(HvmError::BadInstance {
            typecode: 1,
            instance: 1
        })
    );
    for len in [0usize, 23, 25, 32] {
        let mut p = hp.clone();
        p.resize(len, 0);
        assert_eq!(
            dec(&cat(&[rec(1, 0, &p), c.clone(), end()])),
            Err(HvmError::BadLength {
                typecode: 1,
                length: len as u32
            })
        );
    }
    assert_eq!(
        dec(&cat(&[
            rec(1, 0, &header_payload(0x5438_1287, 1)),
            c.clone(),
            end()
        ])),
        Err(HvmError::BadMagic(0x5438_1287))
    );
    for ver in [0, 2, u32::MAX] {
        assert_eq!(
            dec(&cat(&[
                rec(1, 0, &header_payload(0x5438_1286, ver)),
                c.clone(),
                end()
            ])),
            Err(HvmError::BadVersion(ver))
        );
    }
    assert_eq!(
        dec(&cat(&[good_header(), good_header(), c, end()])),
        Err(HvmError::OutOfOrder {
            typecode: 1,
            instance: 0
        })
    );
}

#[test]
fn records_must_ascend() {
    let (a, b) = (cpu(&state(1)), cpu(&state(2)));
    let h = good_header();
    // Repeated vCPU id.
    assert_eq!(
        dec(&cat(&[h.clone(), rec(2, 1, &a), rec(2, 1, &b), end()])),
        Err(HvmError::OutOfOrder {
            typecode: 2,
            instance: 1
        })
    );
    // Descending ids.
    assert_eq!(
        dec(&cat(&[h.clone(), rec(2, 2, &a), rec(2, 1, &b), end()])),
        Err(HvmError::OutOfOrder {
            typecode: 2,
            instance: 1
        })
    );
    // A lower type after a higher one.
    assert_eq!(
        dec(&cat(&[
            h.clone(),
            rec(3, 0, &[0; 16]),
            rec(2, 0, &a),
            end()
        ])),
        Err(HvmError::OutOfOrder {
            typecode: 2,
            instance: 0
        })
    );
    // Interleaved per-vCPU types (Xen writes type by type).
    assert_eq!(
        dec(&cat(&[
            h,
            rec(2, 0, &a),
            rec(16, 0, &[0; 8]),
            rec(2, 1, &b),
            end()
        ])),
        Err(HvmError::OutOfOrder {
            typecode: 2,
            instance: 1
        })
    );
}

#[test]
fn typecodes_above_xen_max_are_rejected() {
    let a = cpu(&state(1));
    for t in [21u16, 0x100, u16::MAX] {
        assert_eq!(
            dec(&cat(&[
                good_header(),
                rec(2, 0, &a),
                rec(t, 0, &[0; 4]),
                end()
            ])),
            Err(HvmError::UnknownType(t))
        );
    }
}

#[test]
fn cpu_length_must_be_exact() {
    let a = cpu(&state(1));
    for len in [0usize, 1024, 1031, 1033, 2064] {
        let mut p = a.clone();
        p.resize(len, 0);
        assert_eq!(
            dec(&one_cpu_blob(&p)),
            Err(HvmError::BadLength {
                typecode: 2,
                length: len as u32
            })
        );
    }
}

#[test]
fn end_rules() {
    let a = rec(2, 0, &cpu(&state(1)));
    let h = good_header();
    assert_eq!(
        dec(&cat(&[h.clone(), a.clone(), rec(0, 0, &[0; 4])])),
        Err(HvmError::EndLength(4))
    );
    assert_eq!(
        dec(&cat(&[h.clone(), a.clone(), rec(0, 2, &[])])),
        Err(HvmError::BadInstance {
            typecode: 0,
            instance: 2
        })
    );
    assert_eq!(
        dec(&cat(&[h.clone(), a.clone(), end(), vec![0]])),
        Err(HvmError::TrailingBytes(1))
    );
    assert_eq!(
        dec(&cat(&[h.clone(), a.clone(), end(), end()])),
        Err(HvmError::TrailingBytes(8))
    );
    assert_eq!(
        dec(&cat(&[h.clone(), a.clone()])),
        Err(HvmError::MissingEnd)
    );
    assert_eq!(dec(&h), Err(HvmError::MissingEnd));
    // Header and END but no vCPU.
    assert_eq!(
        dec(&cat(&[h.clone(), rec(3, 0, &[0; 16]), end()])),
        Err(HvmError::NoVcpus)
    );
    assert_eq!(dec(&cat(&[h, end()])), Err(HvmError::NoVcpus));
}

#[test]
fn truncation_and_huge_lengths() {
    let h = good_header();
    let a = rec(2, 0, &cpu(&state(1)));
    assert_eq!(dec(&[]), Err(HvmError::TruncatedDescriptor { offset: 0 }));
    assert_eq!(
        dec(&h[..7]),
        Err(HvmError::TruncatedDescriptor { offset: 0 })
    );
    assert_eq!(
        dec(&h[..31]),
        Err(HvmError::TruncatedPayload {
            offset: 0,
            length: 24
        })
    );
    let partial = cat(&[h.clone(), a[..3].to_vec()]);
    assert_eq!(
        dec(&partial),
        Err(HvmError::TruncatedDescriptor { offset: 32 })
    );
    for len in [u32::MAX, u32::MAX - 7, 1 << 31, 17] {
        let blob = cat(&[h.clone(), a.clone(), rec_len(4, 0, len, &[0; 8]), end()]);
        assert_eq!(
            dec(&blob),
            Err(HvmError::TruncatedPayload {
                offset: 32 + 1040,
                length: len
            })
        );
    }
}

#[test]
fn every_truncation_of_a_valid_blob_fails() {
    let blob = enc(&[state(5), state(6)]);
    for n in 0..blob.len() {
        let r = dec(&blob[..n]);
        assert!(r.is_err(), "prefix {n} decoded");
        // At a record boundary the blob is well framed but lacks END.
        if n == 32 || n == 32 + 1040 || n == 32 + 2 * 1040 {
            assert_eq!(r, Err(HvmError::MissingEnd), "prefix {n}");
        }
    }
    assert!(dec(&blob).is_ok());
}

#[test]
fn cpu_reserved_fields() {
    assert_eq!(
        dec(&one_cpu_blob(&cpu_patched(1, 1024, &2u32.to_le_bytes()))),
        Err(HvmError::ReservedFlags(2))
    );
    assert_eq!(
        dec(&one_cpu_blob(&cpu_patched(
            1,
            1024,
            &0x8000_0001u32.to_le_bytes()
        ))),
        Err(HvmError::ReservedFlags(0x8000_0001))
    );
    assert_eq!(
        dec(&one_cpu_blob(&cpu_patched(1, 1028, &1u32.to_le_bytes()))),
        Err(HvmError::NonZeroPad(1))
    );
    assert_eq!(
        dec(&one_cpu_blob(&cpu_patched(
            1,
            1000,
            &(1u64 << 32).to_le_bytes()
        ))),
        Err(HvmError::TscAuxRange(1 << 32))
    );
    // msr_flags is obsolete: ignored on decode.
    let d = dec(&one_cpu_blob(&cpu_patched(1, 952, &u64::MAX.to_le_bytes())));
    assert_eq!(d, Ok(vec![(0, state(1))]));
}

#[test]
fn cpu_ranges_the_typed_state_cannot_hold() {
    let names = [
        SegName::Cs,
        SegName::Ds,
        SegName::Es,
        SegName::Fs,
        SegName::Gs,
        SegName::Ss,
        SegName::Tr,
        SegName::Ldtr,
    ];
    for (k, seg) in names.into_iter().enumerate() {
        let p = cpu_patched(1, 736 + 4 * k, &0x1_0000u32.to_le_bytes());
        assert_eq!(
            dec(&one_cpu_blob(&p)),
            Err(HvmError::SelectorRange {
                seg,
                value: 0x1_0000
            })
        );
        for ar in [0x1000u32, 0xf093, 0x1_0000] {
            let p = cpu_patched(1, 888 + 4 * k, &ar.to_le_bytes());
            assert_eq!(
                dec(&one_cpu_blob(&p)),
                Err(HvmError::AttrRange { seg, value: ar })
            );
        }
        // Any limit is fine.
        let p = cpu_patched(1, 768 + 4 * k, &u32::MAX.to_le_bytes());
        assert!(dec(&one_cpu_blob(&p)).is_ok());
    }
    for (off, table) in [(768 + 32, TableName::Idtr), (768 + 36, TableName::Gdtr)] {
        let p = cpu_patched(1, off, &0x1_0000u32.to_le_bytes());
        assert_eq!(
            dec(&one_cpu_blob(&p)),
            Err(HvmError::TableLimitRange {
                table,
                value: 0x1_0000
            })
        );
    }
}

#[test]
fn pending_event_encoding() {
    let ev = |w: u32, c: u32| {
        let mut p = cpu(&state(3));
        p[1016..1020].copy_from_slice(&w.to_le_bytes());
        p[1020..1024].copy_from_slice(&c.to_le_bytes());
        dec(&one_cpu_blob(&p)).map(|v| v[0].1.pending_event)
    };
    assert_eq!(ev(0, 0), Ok(None));
    assert_eq!(
        ev(1 << 31 | 6 << 8 | 3, 0),
        Ok(Some(PendingEvent {
            vector: 3,
            kind: 6,
            error_code: None
        }))
    );
    assert_eq!(
        ev(1 << 31 | 1 << 11 | 3 << 8 | 13, 0x18),
        Ok(Some(PendingEvent {
            vector: 13,
            kind: 3,
            error_code: Some(0x18)
        }))
    );
    for bad in [1u32 << 12, 1 << 30, 0x20, 1 << 11] {
        let w = if bad >= 1 << 12 { bad | 1 << 31 } else { bad };
        assert_eq!(ev(w, 0), Err(HvmError::PendingEventReserved(w)));
    }
    assert_eq!(ev(1 << 31 | 14, 5), Err(HvmError::StrayErrorCode(5)));
    assert_eq!(ev(0, 5), Err(HvmError::StrayErrorCode(5)));
    let mut v = state(3);
    v.pending_event = Some(PendingEvent {
        vector: 1,
        kind: 8,
        error_code: None,
    });
    let mut out = vec![0u8; encoded_len(1).expect("len")];
    assert_eq!(encode(&[v], HDR, &mut out), Err(HvmError::BadEventKind(8)));
}

#[test]
fn encode_errors() {
    let vs = [state(1), state(2), state(3)];
    let need = encoded_len(3).expect("len");
    assert_eq!(need, 32 + 3 * 1040 + 8);
    for have in [0, 1, need / 2, need - 1] {
        let mut out = vec![0u8; have];
        assert_eq!(
            encode(&vs, HDR, &mut out),
            Err(HvmError::BufferTooSmall { need, have })
        );
    }
    // A larger buffer is fine; bytes past the blob are untouched.
    let mut out = vec![0xeeu8; need + 5];
    assert_eq!(encode(&vs, HDR, &mut out), Ok(need));
    assert_eq!(&out[need..], &[0xee; 5]);
    assert_eq!(out[..need], enc(&vs)[..]);
    assert_eq!(encode(&[], HDR, &mut out), Err(HvmError::NoVcpus));
    assert_eq!(encoded_len(usize::MAX), None);
}

#[test]
fn capacity_and_visitor() {
    let vs = [state(1), state(2), state(3)];
    let blob = enc(&vs);
    assert_eq!(
        decode::<2>(&blob).map(|_| ()),
        Err(HvmError::CapacityExceeded(2))
    );
    let mut seen = Vec::new();
    let h = decode_visit(&blob, |id, v| {
        seen.push((id, v));
        Ok(())
    });
    assert_eq!(h, Ok(HDR));
    let want: Vec<_> = vs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, v)| (i as u16, v))
        .collect();
    assert_eq!(seen, want);
    // A blob that fails late never reaches the visitor.
    let mut bad = blob.clone();
    bad.push(0);
    let mut calls = 0;
    assert_eq!(
        decode_visit(&bad, |_, _| {
            calls += 1;
            Ok(())
        }),
        Err(HvmError::TrailingBytes(1))
    );
    assert_eq!(calls, 0);
}

/// The blob a decode result stands for, built independently of `encode`,
/// with `msr_flags` zero (decode ignores it).
fn rebuild(h: HeaderInfo, vcpus: &[(u16, VcpuState)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0x5438_1286u32.to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&h.changeset.to_le_bytes());
    p.extend_from_slice(&h.cpuid.to_le_bytes());
    p.extend_from_slice(&h.gtsc_khz.to_le_bytes());
    let mut out = rec(1, 0, &p);
    for (id, v) in vcpus {
        out.extend(rec(2, *id, &cpu(v)));
    }
    out.extend(end());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip(seeds in prop::collection::vec(any::<u64>(), 1..=4),
                  cpuid in any::<u32>(), gtsc_khz in any::<u32>(), changeset in any::<u64>()) {
        let vs: Vec<VcpuState> = seeds.iter().map(|s| state(*s)).collect();
        let h = HeaderInfo { cpuid, gtsc_khz, changeset };
        let mut out = vec![0u8; encoded_len(vs.len()).unwrap()];
        prop_assert_eq!(encode(&vs, h, &mut out), Ok(out.len()));
        prop_assert_eq!(out.len(), 32 + vs.len() * (8 + CPU_LEN) + 8);
        let d = decode::<4>(&out).unwrap();
        prop_assert_eq!(d.header, h);
        let want: Vec<_> = vs.into_iter().enumerate().map(|(i, v)| (i as u16, v)).collect();
        prop_assert_eq!(d.vcpus.as_slice(), want.as_slice());
    }

    #[test]
    fn corruption_never_panics_and_ok_means_faithful(
        seeds in prop::collection::vec(any::<u64>(), 1..=3),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..=2),
    ) {
        let vs: Vec<VcpuState> = seeds.iter().map(|s| state(*s)).collect();
        let mut blob = enc(&vs);
        for (at, x) in &flips {
            let i = at.index(blob.len());
            blob[i] ^= x;
        }
        if let Ok(d) = decode::<4>(&blob) {
            // Whatever decodes is exactly what the bytes say (apart from
            // the ignored msr_flags).
            let mut clean = blob.clone();
            let mut at = 32;
            while at + 8 + 1032 <= clean.len() && clean[at] == 2 {
                clean[at + 8 + 952..at + 8 + 960].fill(0);
                at += 8 + 1032;
            }
            let got: Vec<_> = d.vcpus.iter().cloned().collect();
            prop_assert_eq!(rebuild(d.header, &got), clean);
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let _ = decode::<4>(&bytes);
    }
}

/// The fuzz seed was written by a separate script straight from the Xen
/// layout (not by `encode`): it decodes to the values that script put in,
/// and re-encodes to the same bytes.
#[test]
fn independent_seed_blob_decodes() {
    let blob = include_bytes!("../../../fuzz/corpus/hvm_context/valid_1vcpu");
    let d = decode::<1>(blob).expect("decode");
    assert_eq!(
        d.header,
        HeaderInfo {
            cpuid: 0x000a_0655,
            gtsc_khz: 2_000_000,
            changeset: 0
        }
    );
    let (id, v) = &d.vcpus[0];
    assert_eq!(*id, 0);
    assert_eq!((v.rax, v.rbx, v.r15), (0, 0x11, 0xff));
    assert_eq!((v.rip, v.rflags), (0xffff_ffff_8100_0000, 0x202));
    assert_eq!((v.cr0, v.cr3, v.cr4), (0x8005_0033, 0x1000, 0x6f0));
    assert_eq!((v.dr6, v.dr7), (0xffff_0ff0, 0x400));
    assert_eq!(
        (v.cs.selector, v.cs.attr.bits(), v.cs.limit),
        (0x10, 0xa9b, u32::MAX)
    );
    assert!(v.cs.attr.long() && v.cs.attr.present() && v.cs.attr.dpl() == 0);
    assert_eq!(
        (v.tr.selector, v.tr.limit, v.tr.base),
        (0x40, 0x67, 0xffff_fe00_0000_3000)
    );
    assert_eq!(v.tr.attr.bits(), 0x8b);
    assert_eq!(v.gs.base, 0xffff_8880_0000_0000);
    assert_eq!(
        v.idtr,
        DescTable {
            base: 0xffff_fe00_0000_0000,
            limit: 0xfff
        }
    );
    assert_eq!(
        v.gdtr,
        DescTable {
            base: 0xffff_fe00_0000_1000,
            limit: 0x7f
        }
    );
    assert_eq!(
        (v.sysenter_cs, v.sysenter_eip),
        (0x10, 0xffff_ffff_81a0_0000)
    );
    assert_eq!(
        (v.lstar, v.star, v.sfmask, v.efer),
        (0xffff_ffff_81a0_0010, 0x0023_0010_0000_0000, 0x47700, 0xd01)
    );
    assert_eq!((v.tsc, v.tsc_aux, v.pending_event), (123_456_789, 0, None));
    assert!(v.fpu_initialised);
    assert_eq!(&v.fpu[..2], &0x37fu16.to_le_bytes());
    let mut out = vec![0u8; blob.len()];
    assert_eq!(
        encode(std::slice::from_ref(v), d.header, &mut out),
        Ok(blob.len())
    );
    assert_eq!(out, blob.to_vec());
}

#[test]
fn padded_blob_decodes_only_with_zero_padding() {
    let v = VcpuState {
        rip: 0x1234,
        rbx: 7,
        ..VcpuState::default()
    };
    let h = HeaderInfo {
        cpuid: 1,
        gtsc_khz: 0,
        changeset: 0,
    };
    let mut area = [0u8; 4096];
    let n = encode(core::slice::from_ref(&v), h, &mut area).unwrap();
    assert!(matches!(
        decode::<1>(&area),
        Err(HvmError::TrailingBytes(k)) if k == 4096 - n
    ));
    let d = decode_padded::<1>(&area).unwrap();
    assert_eq!(d.vcpus[0].1, v);
    assert_eq!(decode_padded::<1>(&area[..n]).unwrap(), d);
    area[n + 100] = 0xee;
    assert!(matches!(
        decode_padded::<1>(&area),
        Err(HvmError::TrailingBytes(_))
    ));
    // All zero: the first descriptor is an END, not the HEADER.
    assert_eq!(
        decode_padded::<1>(&[0u8; 64]),
        Err(HvmError::HeaderNotFirst(0))
    );
}
