//! The whole Linux guest machine as one value ([`MachineRecords`]) and as
//! one Xen HVM context stream: what a checkpoint carries besides memory,
//! and all a restore starts from.
//!
//! # Stream
//!
//! [`encode`] writes, each with Xen's descriptor (typecode, instance 0,
//! payload length) and in Xen's order (ascending typecode, as `hvm_save`
//! walks its handlers):
//!
//! | typecode | record | payload bytes | from |
//! |---|---|---|---|
//! | 1 | HEADER | 24 | [`HeaderInfo`] |
//! | 2 | CPU | 1032 | [`VcpuState`] ([`crate::hvm::to_hw_cpu`]) |
//! | 4 | IOAPIC | 400 | `Ioapic::save` |
//! | 5 | LAPIC | 24 | `Lapic::save` |
//! | 6 | LAPIC_REGS | 1024 | `Lapic::save` |
//! | 10 | PIT | 56 | `Pit::save` |
//! | 11 | RTC | 24 | `Rtc::save` |
//! | 14 | MTRR | 240 | `MsrState::save_mtrr` |
//! | 19 | TSC_ADJUST | 8 | `MsrState::save_tsc_adjust` |
//! | 0 | END | 0 | |
//!
//! # What [`decode`] rejects
//!
//! The framing rules of [`crate::hvm`] (HEADER first and well-formed, END
//! last with nothing after it, no truncated descriptor or payload,
//! typecodes above 20 refused) and, for the machine:
//!
//! - a record type it does not carry ([`HvmError::UnexpectedRecord`]:
//!   PIC, HPET, PMTIMER, CPU_XSAVE, ...; a second HEADER is a
//!   [`HvmError::DuplicateRecord`]);
//! - a record twice ([`HvmError::DuplicateRecord`]), or out of ascending
//!   typecode order ([`HvmError::OutOfOrder`]);
//! - an instance other than 0 (one vCPU: [`HvmError::BadInstance`]);
//! - a payload shorter or longer than the record's struct
//!   ([`HvmError::BadLength`]);
//! - a CPU record [`crate::hvm::from_hw_cpu`] refuses;
//! - any of the nine records missing ([`HvmError::MissingRecord`], the
//!   first missing in stream order).
//!
//! Every error names the typecode; [`HvmError`]'s `Display` names the
//! record. The device payloads are returned as Xen's structs: each model's
//! `restore` checks their values (and names the field it refuses).
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use alloc::vec::Vec;

use doppel_abi::hvm::{
    code, HvmHwLapic, HvmHwLapicRegs, HvmHwMtrr, HvmHwPit, HvmHwRtc, HvmHwVioapic, HvmTscAdjust,
};
use zerocopy::{Immutable, IntoBytes};

use crate::hvm::{self, from_hw_cpu, to_hw_cpu, HeaderInfo, HvmError, VcpuState};

/// The machine's state besides memory, as Xen's records hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineRecords {
    pub cpu: VcpuState,
    pub lapic: HvmHwLapic,
    pub lapic_regs: HvmHwLapicRegs,
    pub ioapic: HvmHwVioapic,
    pub pit: HvmHwPit,
    pub rtc: HvmHwRtc,
    pub mtrr: HvmHwMtrr,
    /// IA32_TSC_ADJUST (`struct hvm_tsc_adjust`).
    pub tsc_adjust: u64,
}

/// The records between HEADER and END, in stream order.
pub const RECORDS: [u16; 8] = [
    code::CPU,
    code::IOAPIC,
    code::LAPIC,
    code::LAPIC_REGS,
    code::PIT,
    code::RTC,
    code::MTRR,
    code::TSC_ADJUST,
];

fn push(
    out: &mut Vec<u8>,
    skip: Option<u16>,
    typecode: u16,
    payload: &(impl IntoBytes + Immutable + ?Sized),
) {
    if skip == Some(typecode) {
        return;
    }
    let bytes = payload.as_bytes();
    out.extend_from_slice(hvm::desc(typecode, 0, bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
}

/// The machine's HVM context stream. `skip` leaves the record of that
/// typecode out (HEADER and END included): the deliberately broken
/// variant the restore tests feed back. Fails only on a pending event
/// type [`VcpuState`] cannot encode.
pub fn encode(
    r: &MachineRecords,
    header: HeaderInfo,
    skip: Option<u16>,
) -> Result<Vec<u8>, HvmError> {
    let cpu = to_hw_cpu(&r.cpu)?;
    let tsc_adjust = HvmTscAdjust {
        tsc_adjust: r.tsc_adjust,
    };
    let mut out = Vec::new();
    push(&mut out, skip, code::HEADER, &hvm::save_header(header));
    push(&mut out, skip, code::CPU, &cpu);
    push(&mut out, skip, code::IOAPIC, &r.ioapic);
    push(&mut out, skip, code::LAPIC, &r.lapic);
    push(&mut out, skip, code::LAPIC_REGS, &r.lapic_regs);
    push(&mut out, skip, code::PIT, &r.pit);
    push(&mut out, skip, code::RTC, &r.rtc);
    push(&mut out, skip, code::MTRR, &r.mtrr);
    push(&mut out, skip, code::TSC_ADJUST, &tsc_adjust);
    push(&mut out, skip, code::END, &[0u8; 0][..]);
    Ok(out)
}

/// Fill `slot` once: a second record of the same type is a duplicate.
fn once<T>(slot: &mut Option<T>, typecode: u16, v: T) -> Result<(), HvmError> {
    if slot.is_some() {
        return Err(HvmError::DuplicateRecord(typecode));
    }
    *slot = Some(v);
    Ok(())
}

/// The machine from its HVM context stream, every rule in the module
/// documentation checked. Never panics.
pub fn decode(blob: &[u8]) -> Result<MachineRecords, HvmError> {
    let mut cpu = None;
    let mut lapic = None;
    let mut lapic_regs = None;
    let mut ioapic = None;
    let mut pit = None;
    let mut rtc = None;
    let mut mtrr = None;
    let mut tsc_adjust = None;
    let mut last = code::HEADER;
    hvm::walk_stream(blob, &mut |r| {
        let (t, i) = (r.desc.typecode, r.desc.instance);
        if t == code::HEADER {
            return Err(HvmError::DuplicateRecord(t));
        }
        if !RECORDS.contains(&t) {
            return Err(HvmError::UnexpectedRecord(t));
        }
        if i != 0 {
            return Err(HvmError::BadInstance {
                typecode: t,
                instance: i,
            });
        }
        // Duplicates are checked by the slots, before the order: a repeat
        // is named as such even right after its first copy.
        match t {
            code::CPU => once(&mut cpu, t, from_hw_cpu(&r.read()?)?)?,
            code::IOAPIC => once(&mut ioapic, t, r.read()?)?,
            code::LAPIC => once(&mut lapic, t, r.read()?)?,
            code::LAPIC_REGS => once(&mut lapic_regs, t, r.read()?)?,
            code::PIT => once(&mut pit, t, r.read()?)?,
            code::RTC => once(&mut rtc, t, r.read()?)?,
            code::MTRR => once(&mut mtrr, t, r.read()?)?,
            _ => once(&mut tsc_adjust, t, r.read::<HvmTscAdjust>()?.tsc_adjust)?,
        }
        if t < last {
            return Err(HvmError::OutOfOrder {
                typecode: t,
                instance: i,
            });
        }
        last = t;
        Ok(())
    })?;
    let missing = HvmError::MissingRecord;
    Ok(MachineRecords {
        cpu: cpu.ok_or(missing(code::CPU))?,
        ioapic: ioapic.ok_or(missing(code::IOAPIC))?,
        lapic: lapic.ok_or(missing(code::LAPIC))?,
        lapic_regs: lapic_regs.ok_or(missing(code::LAPIC_REGS))?,
        pit: pit.ok_or(missing(code::PIT))?,
        rtc: rtc.ok_or(missing(code::RTC))?,
        mtrr: mtrr.ok_or(missing(code::MTRR))?,
        tsc_adjust: tsc_adjust.ok_or(missing(code::TSC_ADJUST))?,
    })
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use crate::hvm::{PendingEvent, SegAttr, Segment};
    use crate::msr::Vendor;
    use crate::msr_policy::{self, MsrState, Write};
    use crate::platform::ioapic::{Ioapic, IOREGSEL, IOWIN};
    use crate::platform::lapic::Lapic;
    use crate::platform::pit::{self, Pit};
    use crate::platform::rtc::{Clock, Rtc};
    use doppel_abi::hvm::HvmSaveDescriptor;
    use doppel_abi::splitmix::SplitMix64;
    use zerocopy::FromBytes;

    const TSC_PER_TICK: u64 = 16;
    const KHZ: u32 = 2_000_000;
    const TSC: u64 = 0x0000_0123_4567_89ab;
    const RTC_CLOCK: Clock = Clock {
        secs: 1_700_000_000,
        tsc: 0,
        khz: KHZ,
    };

    fn header() -> HeaderInfo {
        HeaderInfo {
            cpuid: 0x00a2_0f12,
            gtsc_khz: KHZ,
            changeset: 0,
        }
    }

    /// A 64-bit Linux vCPU in the middle of delivering a #PF.
    fn cpu() -> VcpuState {
        let code = Segment {
            selector: 0x10,
            base: 0,
            limit: 0xffff_ffff,
            attr: SegAttr::from_svm(0xa9b),
        };
        let data = Segment {
            selector: 0x18,
            attr: SegAttr::from_svm(0xc93),
            ..code
        };
        let mut fpu = [0u8; 512];
        SplitMix64(7).fill(&mut fpu);
        VcpuState {
            rax: 0xdead_beef,
            rsp: 0xffff_c900_0001_3f00,
            rip: 0xffff_ffff_8100_1234,
            rflags: 0x246,
            cr0: 0x8005_0033,
            cr3: 0x1_2345_6000,
            cr4: 0x0037_06f0,
            cr2: 0x7f00_0000_1000,
            cs: code,
            ss: data,
            ds: data,
            efer: 0xd01,
            lstar: 0xffff_ffff_8200_0000,
            star: 0x0023_0010_0000_0000,
            sfmask: 0x4_7700,
            kernel_gs_base: 0xffff_8880_7fc0_0000,
            tsc: TSC,
            pending_event: Some(PendingEvent {
                vector: 14,
                kind: 3,
                error_code: Some(6),
            }),
            fpu,
            fpu_initialised: true,
            ..VcpuState::default()
        }
    }

    /// Every part of a running machine, taken from the models' `save`.
    fn machine() -> MachineRecords {
        let mut lapic = Lapic::new(0, true, TSC_PER_TICK);
        lapic.write_msr(0x80f, 0x1ff, TSC).unwrap(); // SVR: enabled
        lapic.write_msr(0x832, (2 << 17) | 0xec, TSC).unwrap(); // TSC deadline
        lapic
            .write_msr(msr_policy::nr::TSC_DEADLINE, TSC + 1000, TSC)
            .unwrap();
        assert!(lapic.accept(0x31, false));
        let (lapic, lapic_regs) = lapic.save(TSC);
        let mut io = Ioapic::new(0);
        io.write(IOREGSEL, 4, 0x10 + 2 * 4).unwrap();
        io.write(IOWIN, 4, 0x24).unwrap(); // COM1: vector 0x24, unmasked
        let rtc = Rtc::new(RTC_CLOCK);
        // Channel 2 as Linux's calibration leaves it: gate on, mode 0,
        // counting down from 0xffff, the LSB of a pair read.
        let mut pit = Pit::new(KHZ);
        pit.write(pit::PORT_SPEAKER, 0x01, TSC).unwrap();
        pit.write(pit::PORT_CONTROL, 0xb0, TSC).unwrap();
        pit.write(pit::PORT_CH2, 0xff, TSC).unwrap();
        pit.write(pit::PORT_CH2, 0xff, TSC).unwrap();
        pit.read(pit::PORT_CH2, TSC + 5000).unwrap();
        let mut msrs = MsrState::new(40);
        assert_eq!(
            msrs.write(Vendor::Svm, msr_policy::nr::PAT, 0x0407_0501_0007_0106, 0),
            Write::Done
        );
        assert_eq!(
            msrs.write(Vendor::Svm, msr_policy::nr::TSC_ADJUST, 12345, 0),
            Write::Done
        );
        MachineRecords {
            cpu: cpu(),
            lapic,
            lapic_regs,
            ioapic: io.save(),
            pit: pit.save(),
            rtc: rtc.save(TSC),
            mtrr: msrs.save_mtrr(),
            tsc_adjust: msrs.save_tsc_adjust().tsc_adjust,
        }
    }

    /// (typecode, instance, length, offset) of each record.
    fn descriptors(blob: &[u8]) -> Vec<(u16, u16, u32, usize)> {
        let mut v = Vec::new();
        let mut at = 0;
        while at < blob.len() {
            let d = HvmSaveDescriptor::read_from_bytes(&blob[at..at + 8]).unwrap();
            v.push((d.typecode, d.instance, d.length, at));
            at += 8 + d.length as usize;
        }
        v
    }

    #[test]
    fn stream_is_xens_records_in_xens_order() {
        let blob = encode(&machine(), header(), None).unwrap();
        let d: Vec<_> = descriptors(&blob).iter().map(|x| (x.0, x.1, x.2)).collect();
        assert_eq!(
            d,
            [
                (1, 0, 24),
                (2, 0, 1032),
                (4, 0, 400),
                (5, 0, 24),
                (6, 0, 1024),
                (10, 0, 56),
                (11, 0, 24),
                (14, 0, 240),
                (19, 0, 8),
                (0, 0, 0),
            ]
        );
        // The stream starts as the CPU-only codec's does: its decoder
        // takes it too (it skips the other types Xen defines).
        let v = crate::hvm::decode::<1>(&blob).unwrap();
        assert_eq!(v.vcpus[0], (0, cpu()));
        assert_eq!(v.header, header());
    }

    #[test]
    fn realistic_machine_round_trips_and_restores_into_the_models() {
        let m = machine();
        let blob = encode(&m, header(), None).unwrap();
        let back = decode(&blob).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.cpu.fpu, cpu().fpu, "FXSAVE image");
        assert_eq!(back.cpu.tsc, TSC);
        assert_eq!(back.cpu.pending_event, cpu().pending_event);
        assert_eq!(encode(&back, header(), None).unwrap(), blob);
        // Every model takes its record back.
        let mut lapic = Lapic::restore(&back.lapic, &back.lapic_regs, TSC_PER_TICK, TSC).unwrap();
        assert_eq!(lapic.pending(), Some(0x31));
        assert_eq!(lapic.next_deadline(), Some(TSC + 1000));
        let io = Ioapic::restore(&back.ioapic).unwrap();
        assert_eq!(io.entry(4), Some(0x24));
        let rtc = Rtc::restore(&back.rtc, RTC_CLOCK).unwrap();
        assert_eq!(rtc.save(TSC), back.rtc);
        let mut pit = Pit::restore(&back.pit, KHZ, TSC).unwrap();
        assert_eq!(pit.save(), back.pit);
        assert_eq!(back.pit.channels[2].count, 0xffff);
        // The MSB of the pair is due; counting restarted from 0xffff.
        assert_eq!(pit.read(pit::PORT_CH2, TSC).unwrap(), 0xff);
        assert_eq!(pit.read(pit::PORT_CH2, TSC).unwrap(), 0xff);
        let mut msrs = MsrState::new(40);
        msrs.restore_mtrr(&back.mtrr).unwrap();
        msrs.restore_tsc_adjust(&HvmTscAdjust {
            tsc_adjust: back.tsc_adjust,
        });
        assert_eq!(msrs.pat, 0x0407_0501_0007_0106);
        assert_eq!(msrs.tsc_adjust, 12345);
        assert_eq!(lapic.save(TSC), (back.lapic, back.lapic_regs));
    }

    #[test]
    fn each_missing_record_is_named() {
        let m = machine();
        for t in RECORDS {
            let blob = encode(&m, header(), Some(t)).unwrap();
            assert_eq!(decode(&blob), Err(HvmError::MissingRecord(t)), "{t}");
            let line = HvmError::MissingRecord(t).to_string();
            assert!(line.contains(code::name(t)), "{line}");
        }
        let no_header = encode(&m, header(), Some(code::HEADER)).unwrap();
        assert_eq!(decode(&no_header), Err(HvmError::HeaderNotFirst(code::CPU)));
        let no_end = encode(&m, header(), Some(code::END)).unwrap();
        assert_eq!(decode(&no_end), Err(HvmError::MissingEnd));
        assert_eq!(
            decode(&encode(&m, header(), Some(code::PIT)).unwrap()),
            Err(HvmError::MissingRecord(code::PIT))
        );
        assert_eq!(
            HvmError::MissingRecord(code::PIT).to_string(),
            "HVM context: no PIT record (typecode 10)"
        );
        assert_eq!(
            HvmError::MissingRecord(code::TSC_ADJUST).to_string(),
            "HVM context: no TSC_ADJUST record (typecode 19)"
        );
    }

    /// The blob with the record at `index` (in [`descriptors`] order)
    /// replaced by `with` (whole records, descriptor included).
    fn splice(blob: &[u8], index: usize, with: &[u8]) -> Vec<u8> {
        let d = descriptors(blob);
        let (start, end) = (d[index].3, d[index].3 + 8 + d[index].2 as usize);
        [&blob[..start], with, &blob[end..]].concat()
    }

    fn rec(t: u16, i: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = hvm::desc(t, i, payload.len()).as_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn duplicated_unexpected_misplaced_and_missized_records_are_named() {
        let blob = encode(&machine(), header(), None).unwrap();
        let d = descriptors(&blob);
        let whole = |k: usize| blob[d[k].3..d[k].3 + 8 + d[k].2 as usize].to_vec();
        // Each record twice in a row, and the RTC again after MTRR.
        assert_eq!(d[6].0, code::RTC);
        for (k, t) in RECORDS.into_iter().enumerate() {
            let twice = splice(&blob, k + 1, &[whole(k + 1), whole(k + 1)].concat());
            assert_eq!(decode(&twice), Err(HvmError::DuplicateRecord(t)), "{t}");
        }
        let rtc_again = splice(&blob, 7, &[whole(7), whole(6)].concat());
        assert_eq!(
            decode(&rtc_again),
            Err(HvmError::DuplicateRecord(code::RTC))
        );
        let header_again = splice(&blob, 1, &[whole(0), whole(1)].concat());
        assert_eq!(
            decode(&header_again),
            Err(HvmError::DuplicateRecord(code::HEADER))
        );
        // A second END: bytes after the stream.
        let end_again = [&blob[..], &rec(0, 0, &[])].concat();
        assert_eq!(decode(&end_again), Err(HvmError::TrailingBytes(8)));
        // Types Xen defines that the machine does not carry.
        for t in [3u16, 7, 12, 13, 16, 18, 20] {
            let with = splice(&blob, 9, &[rec(t, 0, &[0; 16]), whole(9)].concat());
            assert_eq!(decode(&with), Err(HvmError::UnexpectedRecord(t)), "{t}");
        }
        // Beyond Xen's last typecode.
        let with = splice(&blob, 9, &[rec(21, 0, &[]), whole(9)].concat());
        assert_eq!(decode(&with), Err(HvmError::UnknownType(21)));
        // LAPIC before IOAPIC: all present once, but not Xen's order.
        let swapped = splice(&blob, 2, &[whole(3), whole(2)].concat());
        let swapped = splice(&swapped, 4, &[]);
        assert_eq!(
            decode(&swapped),
            Err(HvmError::OutOfOrder {
                typecode: code::IOAPIC,
                instance: 0
            })
        );
        // A second vCPU's record.
        for (k, t) in RECORDS.into_iter().enumerate() {
            let payload = &whole(k + 1)[8..];
            let other = splice(&blob, k + 1, &rec(t, 1, payload));
            assert_eq!(
                decode(&other),
                Err(HvmError::BadInstance {
                    typecode: t,
                    instance: 1
                })
            );
        }
        // Payloads one byte short and one byte long.
        for (k, t) in RECORDS.into_iter().enumerate() {
            let payload = whole(k + 1)[8..].to_vec();
            let n = payload.len() as u32;
            let short = splice(&blob, k + 1, &rec(t, 0, &payload[1..]));
            assert_eq!(
                decode(&short),
                Err(HvmError::BadLength {
                    typecode: t,
                    length: n - 1
                })
            );
            let long = splice(&blob, k + 1, &rec(t, 0, &[&payload[..], &[0]].concat()));
            assert_eq!(
                decode(&long),
                Err(HvmError::BadLength {
                    typecode: t,
                    length: n + 1
                })
            );
        }
        // A CPU record the CPU codec refuses.
        let mut m = machine();
        m.cpu.pending_event = None;
        let b = encode(&m, header(), None).unwrap();
        let mut cpu_payload = whole(1)[8..].to_vec();
        cpu_payload[1028] = 1; // pad0
        assert_eq!(
            decode(&splice(&b, 1, &rec(2, 0, &cpu_payload))),
            Err(HvmError::NonZeroPad(1))
        );
        // Encode refuses what Xen's pending_event cannot hold.
        m.cpu.pending_event = Some(PendingEvent {
            vector: 1,
            kind: 8,
            error_code: None,
        });
        assert_eq!(encode(&m, header(), None), Err(HvmError::BadEventKind(8)));
    }

    #[test]
    fn every_truncation_fails() {
        let blob = encode(&machine(), header(), None).unwrap();
        for n in 0..blob.len() {
            assert!(decode(&blob[..n]).is_err(), "{n} bytes");
        }
    }

    /// Random bytes, random splices of valid records and single-byte
    /// mutations of a valid stream: decode returns (never panics), and what
    /// decodes re-encodes to the same bytes.
    #[test]
    fn random_and_mutated_blobs_never_panic() {
        let good = encode(&machine(), header(), None).unwrap();
        let d = descriptors(&good);
        let mut r = SplitMix64(0x05ee_d7ec_04d5);
        let mut ok = 0;
        for round in 0..20_000 {
            let blob = match round % 4 {
                0 => {
                    let mut b = vec![0u8; r.below(3000) as usize];
                    r.fill(&mut b);
                    b
                }
                1 => {
                    // Whole records picked at random (often valid framing).
                    let mut b = Vec::new();
                    for _ in 0..r.below(12) {
                        let k = r.below(d.len() as u64) as usize;
                        b.extend_from_slice(&good[d[k].3..d[k].3 + 8 + d[k].2 as usize]);
                    }
                    b
                }
                _ => {
                    let mut b = good.clone();
                    for _ in 0..=r.below(3) {
                        let at = r.below(b.len() as u64) as usize;
                        b[at] = r.next_u64() as u8;
                    }
                    if r.below(4) == 0 {
                        b.truncate(r.below(b.len() as u64 + 1) as usize);
                    }
                    b
                }
            };
            if let Ok(m) = decode(&blob) {
                ok += 1;
                // Byte for byte, but the CPU record's obsolete msr_flags,
                // which the codec ignores and writes as 0.
                let mut want = blob.clone();
                want[32 + 8 + 952..32 + 8 + 960].fill(0);
                assert_eq!(encode(&m, header_of(&blob), None).unwrap(), want);
            }
        }
        assert!(ok > 100, "mutations that keep a valid stream decode ({ok})");
    }

    fn header_of(blob: &[u8]) -> HeaderInfo {
        let h = doppel_abi::hvm::HvmSaveHeader::read_from_bytes(&blob[8..32]).unwrap();
        HeaderInfo {
            cpuid: h.cpuid,
            gtsc_khz: h.gtsc_khz,
            changeset: h.changeset,
        }
    }

    /// The fuzz seeds in fuzz/corpus/machine_records are what their names
    /// say (written once from [`machine`]).
    #[test]
    fn fuzz_seeds_mean_what_their_names_say() {
        let valid = include_bytes!("../../../../fuzz/corpus/machine_records/valid");
        assert_eq!(decode(valid), Ok(machine()));
        assert_eq!(
            decode(include_bytes!(
                "../../../../fuzz/corpus/machine_records/no_mtrr"
            )),
            Err(HvmError::MissingRecord(code::MTRR))
        );
        assert_eq!(
            decode(include_bytes!(
                "../../../../fuzz/corpus/machine_records/truncated_lapic"
            )),
            Err(HvmError::TruncatedPayload {
                offset: 1480,
                length: 24
            })
        );
    }
}
