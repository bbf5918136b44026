//! Untrusted machine record streams (the Linux guest's HVM context from a
//! peer): `platform::records::decode` must never panic, whatever decodes
//! must re-encode to the same bytes (apart from the CPU record's ignored
//! `msr_flags`), and every device record it returns goes through its
//! model's `restore` without a panic.
#![no_main]

use doppel_abi::hvm::{HvmSaveHeader, HvmTscAdjust};
use doppel_core::hvm::HeaderInfo;
use doppel_core::msr_policy::MsrState;
use doppel_core::platform::ioapic::Ioapic;
use doppel_core::platform::lapic::Lapic;
use doppel_core::platform::pit::Pit;
use doppel_core::platform::records::{decode, encode};
use doppel_core::platform::rtc::{Clock, Rtc};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = decode(data) else { return };
    let h = HvmSaveHeader::read_from_bytes(&data[8..32]).expect("a decoded stream has a HEADER");
    let header = HeaderInfo {
        cpuid: h.cpuid,
        gtsc_khz: h.gtsc_khz,
        changeset: h.changeset,
    };
    let mut want = data.to_vec();
    want[32 + 8 + 952..32 + 8 + 960].fill(0);
    assert_eq!(encode(&m, header, None).as_deref(), Ok(&want[..]));
    let _ = Lapic::restore(&m.lapic, &m.lapic_regs, 16, m.cpu.tsc);
    let _ = Ioapic::restore(&m.ioapic);
    let clock = Clock {
        secs: 1_700_000_000,
        tsc: m.cpu.tsc,
        khz: 2_000_000,
    };
    let _ = Rtc::restore(&m.rtc, clock);
    if let Ok(mut pit) = Pit::restore(&m.pit, clock.khz, m.cpu.tsc) {
        assert_eq!(pit.save(), m.pit, "a restored PIT saves its record back");
        for port in [0x42, 0x61] {
            let _ = pit.read(port, m.cpu.tsc.wrapping_add(1 << 40));
        }
    }
    let mut msrs = MsrState::new(40);
    let before = msrs.clone();
    if msrs.restore_mtrr(&m.mtrr).is_err() {
        assert_eq!(msrs, before, "a refused MTRR record changes nothing");
    }
    msrs.restore_tsc_adjust(&HvmTscAdjust {
        tsc_adjust: m.tsc_adjust,
    });
});
