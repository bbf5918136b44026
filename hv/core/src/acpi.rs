//! ACPI tables for the Linux guest: what lets an unmodified kernel find its
//! interrupt controllers and console without a PIT, 8259 PIC or HPET.
//!
//! RSDP (revision 2) -> XSDT -> FADT (HW_REDUCED_ACPI, "VGA not present",
//! "MSI not supported") and MADT (one local APIC, id 0; one IOAPIC, id 0
//! at 0xFEC00000, GSI base 0; no PCAT_COMPAT: there is no 8259). The FADT
//! points at the DSDT, which declares COM1 (`PNP0501`, I/O 0x3F8-0x3FF,
//! IRQ 4). Tables come from rust-vmm's `acpi_tables` crate; nothing here is
//! hand-encoded.
//!
//! # Poweroff
//!
//! A hardware-reduced platform has no PM1 blocks: Linux powers off through
//! the FADT's SLEEP_CONTROL_REG and SLEEP_STATUS_REG and the DSDT's `_S5_`
//! package (its `acpi_sleep_state_supported(S5)` wants all three, and only
//! then installs `acpi_power_off`). Both registers are one byte in I/O
//! space: sleep control at [`SLEEP_CONTROL_PORT`] (SLP_TYPx in bits 2-4,
//! SLP_EN bit 5), sleep status at [`SLEEP_STATUS_PORT`] (WAK_STS bit 7,
//! which ACPICA writes to clear before sleeping). `_S5_` is
//! `Package { S5_SLP_TYP, S5_SLP_TYP }`; the write that powers off is
//! recognised by [`is_poweroff`].
//!
//! [`build`] lays everything out in one blob for a given guest-physical
//! base, RSDP first (the PVH start info's `rsdp_paddr` is the base), each
//! table 16-byte aligned.

use alloc::vec::Vec;

use acpi_tables::aml::{
    AmlString, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, IO,
    ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use doppel_abi::ioreq::DmDevice;

/// OEM id and table id in every header.
pub const OEM_ID: [u8; 6] = *b"DOPPEL";
pub const OEM_TABLE_ID: [u8; 8] = *b"DOPPELVM";
const OEM_REVISION: u32 = 1;

/// The local APIC's MMIO base (the MADT's default; x2APIC ignores it).
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// COM1's I/O base and IRQ (GSI).
pub const COM1_PORT: u16 = 0x3F8;
pub const COM1_GSI: u32 = 4;
/// The CMOS RTC's index port (data at the next).
pub const RTC_PORT: u16 = 0x70;

/// The FADT's SLEEP_CONTROL_REG: one byte at this I/O port.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The FADT's SLEEP_STATUS_REG: one byte at this I/O port.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The sleep type of S5 (soft off) in `_S5_`, written as SLP_TYPx.
pub const S5_SLP_TYP: u8 = 5;
/// SLP_TYPx in the sleep control register (ACPI 6.5 §4.8.3.7).
pub const SLP_TYP_SHIFT: u8 = 2;
pub const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
/// SLP_EN in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// WAK_STS in the sleep status register.
pub const WAK_STS: u8 = 1 << 7;

/// A guest write of `value` to I/O `port` asks for soft off: SLP_EN set
/// with S5's sleep type on the sleep control port. Other bits (reserved)
/// do not matter, as for hardware that only decodes SLP_TYP and SLP_EN.
pub fn is_poweroff(port: u16, value: u8) -> bool {
    port == SLEEP_CONTROL_PORT
        && value & SLP_EN != 0
        && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP
}

/// FADT IA-PC boot architecture flags: no VGA, no MSI (there is no PCI).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;

/// The tables, laid out for one base address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of `bytes[0]` (the RSDP).
    pub base: u64,
    pub bytes: Vec<u8>,
    /// Offsets in `bytes` of each table, by signature.
    pub xsdt: usize,
    pub fadt: usize,
    pub madt: usize,
    pub dsdt: usize,
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: COM1 under `\_SB`, and `_S5_`.
pub fn dsdt() -> Vec<u8> {
    dsdt_with(&[])
}

/// The DSDT with one `LNRO0005` device (virtio-mmio, which Linux finds
/// only through ACPI: `_CRS` = the registers as Memory32Fixed and the GSI,
/// edge-triggered, active high) per entry of `virtio`, named `VRT0`,
/// `VRT1`, ... in order. Devices whose registers lie above 4 GiB cannot be
/// declared this way and are left out.
pub fn dsdt_with(virtio: &[DmDevice]) -> Vec<u8> {
    let hid = EISAName::new("PNP0501");
    let io = IO::new(COM1_PORT, COM1_PORT, 0, 8);
    // Consumer, edge-triggered, active high, exclusive: an ISA IRQ.
    let irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let crs = ResourceTemplate::new(alloc::vec![&io, &irq]);
    let hid = Name::new("_HID".into(), &hid);
    let uid = Name::new("_UID".into(), &ZERO);
    let crs = Name::new("_CRS".into(), &crs);
    let com1 = Device::new("_SB_.COM1".into(), alloc::vec![&hid, &uid, &crs]);
    // The CMOS RTC: with ACPI's PNP devices Linux creates rtc_cmos only
    // from this entry. No IRQ: the model raises no RTC interrupts.
    let rtc_hid = EISAName::new("PNP0B00");
    let rtc_io = IO::new(RTC_PORT, RTC_PORT, 0, 2);
    let rtc_crs = ResourceTemplate::new(alloc::vec![&rtc_io]);
    let rtc_hid = Name::new("_HID".into(), &rtc_hid);
    let rtc_crs = Name::new("_CRS".into(), &rtc_crs);
    let rtc = Device::new("_SB_.RTC_".into(), alloc::vec![&rtc_hid, &rtc_crs]);
    // SLP_TYPa, SLP_TYPb (a hardware-reduced platform uses only the first).
    let s5 = Package::new(alloc::vec![&S5_SLP_TYP, &S5_SLP_TYP]);
    let s5 = Name::new("_S5_".into(), &s5);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&aml_bytes(&com1));
    sdt.append_slice(&aml_bytes(&rtc));
    for (i, d) in virtio.iter().enumerate().take(10) {
        let (Ok(base), Ok(size)) = (u32::try_from(d.base), u32::try_from(d.size)) else {
            continue;
        };
        let hid = AmlString::from("LNRO0005");
        let uid = i as u8;
        let regs = Memory32Fixed::new(true, base, size);
        let irq = Interrupt::new(true, true, false, false, d.gsi);
        let crs = ResourceTemplate::new(alloc::vec![&regs, &irq]);
        let hid = Name::new("_HID".into(), &hid);
        let uid = Name::new("_UID".into(), &uid);
        let crs = Name::new("_CRS".into(), &crs);
        let path = alloc::format!("_SB_.VRT{i}");
        let dev = Device::new(path.as_str().into(), alloc::vec![&hid, &uid, &crs]);
        sdt.append_slice(&aml_bytes(&dev));
    }
    sdt.append_slice(&aml_bytes(&s5));
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .dsdt_64(dsdt_addr);
    f.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED).into();
    let byte_port = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    f.sleep_control_reg = byte_port(SLEEP_CONTROL_PORT);
    f.sleep_status_reg = byte_port(SLEEP_STATUS_PORT);
    aml_bytes(&f.finalize())
}

fn madt() -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    m.add_structure(ProcessorLocalApic::new(0, 0, EnabledStatus::Enabled));
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    aml_bytes(&m)
}

fn align16(v: &mut Vec<u8>) -> usize {
    v.resize(v.len().next_multiple_of(16), 0);
    v.len()
}

/// All tables for guest-physical `base`, RSDP first.
pub fn build(base: u64) -> AcpiTables {
    build_with(base, &[])
}

/// [`build`] with the virtio-mmio devices `virtio` in the DSDT
/// ([`dsdt_with`]).
pub fn build_with(base: u64, virtio: &[DmDevice]) -> AcpiTables {
    // Table sizes do not depend on the addresses they hold, so lay out
    // first and fill in after.
    let rsdp_len = Rsdp::len();
    let dsdt = dsdt_with(virtio);
    let madt = madt();
    let fadt_len = fadt(0).len();
    let xsdt_len = 36 + 2 * 8;
    let mut at = rsdp_len.next_multiple_of(16);
    let mut place = |len: usize| {
        let here = at;
        at = (at + len).next_multiple_of(16);
        here
    };
    let xsdt_off = place(xsdt_len);
    let fadt_off = place(fadt_len);
    let madt_off = place(madt.len());
    let dsdt_off = place(dsdt.len());
    let addr = |off: usize| base + off as u64;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(addr(fadt_off));
    xsdt.add_entry(addr(madt_off));
    let parts: [(usize, Vec<u8>); 5] = [
        (0, aml_bytes(&Rsdp::new(OEM_ID, addr(xsdt_off)))),
        (xsdt_off, aml_bytes(&xsdt)),
        (fadt_off, fadt(addr(dsdt_off))),
        (madt_off, madt),
        (dsdt_off, dsdt),
    ];
    let mut bytes = Vec::new();
    for (off, part) in parts {
        bytes.resize(off, 0);
        bytes.extend_from_slice(&part);
    }
    align16(&mut bytes);
    AcpiTables {
        base,
        bytes,
        xsdt: xsdt_off,
        fadt: fadt_off,
        madt: madt_off,
        dsdt: dsdt_off,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xE_0000;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// The table at guest-physical `addr`: checks its signature, that its
    /// length stays inside the blob and that it sums to zero.
    fn table<'a>(t: &'a AcpiTables, addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - t.base) as usize;
        let b = &t.bytes[off..];
        assert_eq!(&b[..4], sig);
        let len = u32_at(b, 4) as usize;
        assert!(len >= 36 && len <= b.len(), "{sig:?} length {len}");
        let table = &b[..len];
        assert_eq!(sum(table), 0, "{sig:?} checksum");
        assert_eq!(&table[10..16], &OEM_ID);
        table
    }

    #[test]
    fn rsdp_leads_to_every_table_with_good_checksums() {
        let t = build(BASE);
        let b = &t.bytes;
        // RSDP v2: signature, the v1 checksum over 20 bytes, the extended
        // one over all 36, the XSDT address.
        assert_eq!(&b[..8], b"RSD PTR ");
        assert_eq!(b[15], 2, "revision 2 (has an XSDT)");
        assert_eq!(sum(&b[..20]), 0);
        assert_eq!(u32_at(b, 20), 36);
        assert_eq!(sum(&b[..36]), 0);
        let xsdt = table(&t, u64_at(b, 24), b"XSDT");
        // The XSDT names FADT and MADT, and nothing else.
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&t, entries[0], b"FACP");
        let madt = table(&t, entries[1], b"APIC");
        // The FADT names the DSDT (64-bit field; the 32-bit one is 0).
        assert_eq!(u32_at(fadt, 40), 0);
        let dsdt = table(&t, u64_at(fadt, 140), b"DSDT");
        // Every table was reached, each where build() says it is.
        for (name, off, tab) in [
            ("xsdt", t.xsdt, xsdt),
            ("fadt", t.fadt, fadt),
            ("madt", t.madt, madt),
            ("dsdt", t.dsdt, dsdt),
        ] {
            assert_eq!(&t.bytes[off..off + 4], &tab[..4], "{name}");
            assert_eq!(off % 16, 0, "{name} aligned");
        }
        // All of it fits the space the PVH builder gives it.
        assert!(t.bytes.len() <= crate::pvh::ACPI_MAX);
    }

    #[test]
    fn fadt_is_hardware_reduced_without_vga_or_msi() {
        let t = build(BASE);
        let fadt = &t.bytes[t.fadt..];
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc, IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED);
        // Revision 6: the fields Linux reads for a HW-reduced platform exist.
        assert_eq!(fadt[8], 6);
        assert_eq!(u32_at(fadt, 4), 276);
    }

    #[test]
    fn madt_has_one_lapic_and_one_ioapic_and_no_8259() {
        let t = build(BASE);
        let madt = &t.bytes[t.madt..];
        let len = u32_at(madt, 4) as usize;
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40) & 1, 0, "PCAT_COMPAT clear: no 8259");
        let mut at = 44;
        let mut found = Vec::new();
        while at < len {
            let (kind, l) = (madt[at], madt[at + 1] as usize);
            found.push((kind, madt[at..at + l].to_vec()));
            at += l;
        }
        assert_eq!(at, len, "structures tile the table");
        assert_eq!(found.len(), 2);
        // Type 0: processor UID 0, APIC id 0, enabled.
        assert_eq!(found[0], (0, vec![0, 8, 0, 0, 1, 0, 0, 0]));
        // Type 1: IOAPIC id 0 at 0xFEC00000, GSI base 0.
        let io = &found[1].1;
        assert_eq!((found[1].0, io[1], io[2]), (1, 12, 0));
        assert_eq!((u32_at(io, 4), u32_at(io, 8)), (IOAPIC_ADDR, 0));
    }

    #[test]
    fn dsdt_declares_com1() {
        let d = dsdt();
        let find = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        // EISA id PNP0501: "PNP" packed in 5-bit letters is 0x41D0, stored
        // big-endian, then the product 0x0501: DWord 41 D0 05 01.
        assert!(find(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), "_HID PNP0501");
        assert!(find(b"COM1") && find(b"_HID") && find(b"_CRS"));
        // I/O port descriptor: decode16, 0x3F8..0x3F8, align 0, length 8.
        assert!(find(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08]));
        // Extended IRQ descriptor: consumer + edge, one interrupt, GSI 4.
        assert!(find(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00
        ]));
    }

    #[test]
    fn fadt_names_the_sleep_registers_in_io_space() {
        let t = build(BASE);
        let fadt = &t.bytes[t.fadt..t.fadt + 276];
        // GAS at 244 (SLEEP_CONTROL_REG) and 256 (SLEEP_STATUS_REG):
        // space 1 (I/O), 8 bits wide, offset 0, byte access, the port.
        let gas = |at: usize| (fadt[at..at + 4].to_vec(), u64_at(fadt, at + 4));
        assert_eq!(gas(244), (vec![1, 8, 0, 1], 0x600));
        assert_eq!(gas(256), (vec![1, 8, 0, 1], 0x601));
        assert_eq!(sum(fadt), 0, "checksum still right");
    }

    #[test]
    fn dsdt_declares_each_virtio_device_as_lnro0005() {
        use doppel_abi::ioreq::{device, virtio_devices};
        let devs: Vec<DmDevice> = virtio_devices(&[device::NET, device::BLK]).collect();
        let d = dsdt_with(&devs);
        let find = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"VRT0") && find(b"VRT1") && !find(b"VRT2"));
        // String _HID: StringPrefix, "LNRO0005", NUL.
        let hid = b"\x0dLNRO0005\x00";
        assert_eq!(d.windows(hid.len()).filter(|w| w == hid).count(), 2);
        // Memory32Fixed, read-write, base 0xD0001000, length 0x200.
        assert!(find(&[
            0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x02, 0x00, 0x00
        ]));
        // Extended IRQ: consumer + edge, one interrupt, GSI 6.
        assert!(find(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00
        ]));
        // Without devices the DSDT is the one Linux boots with today.
        assert_eq!(dsdt_with(&[]), dsdt());
        assert!(!dsdt().windows(8).any(|w| w == b"LNRO0005"));
        let t = build_with(BASE, &devs);
        assert!(t.bytes.len() > build(BASE).bytes.len());
    }

    #[test]
    fn dsdt_declares_s5() {
        let d = dsdt();
        // Name (_S5_, Package (2) { 5, 5 }): NameOp, "_S5_", PackageOp,
        // PkgLength 6, 2 elements, BytePrefix 5 twice.
        let s5 = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a, 5, 0x0a, 5,
        ];
        assert!(d.windows(s5.len()).any(|w| w == s5), "{d:x?}");
    }

    #[test]
    fn poweroff_is_slp_en_with_s5_on_the_control_port() {
        // What ACPICA's acpi_hw_extended_sleep writes for S5.
        let off = (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN;
        assert_eq!(off, 0x34);
        assert!(is_poweroff(SLEEP_CONTROL_PORT, off));
        assert!(is_poweroff(SLEEP_CONTROL_PORT, off | 0xc3), "reserved bits");
        // Its first write (clearing WAK_STS) and the S5 type without SLP_EN,
        // other sleep types, other ports: not poweroff.
        assert!(!is_poweroff(SLEEP_STATUS_PORT, WAK_STS));
        assert!(!is_poweroff(SLEEP_STATUS_PORT, off));
        assert!(!is_poweroff(SLEEP_CONTROL_PORT, off & !SLP_EN));
        for typ in (0..8).filter(|&t| t != S5_SLP_TYP) {
            assert!(!is_poweroff(
                SLEEP_CONTROL_PORT,
                (typ << SLP_TYP_SHIFT) | SLP_EN
            ));
        }
        assert!(!is_poweroff(0x604, off));
        let hits = (0..=u16::MAX)
            .flat_map(|p| (0..=u8::MAX).map(move |v| (p, v)))
            .filter(|&(p, v)| is_poweroff(p, v))
            .count();
        assert_eq!(
            hits, 16,
            "only 0x34 with any of bits 0-1 and 6-7, on port 0x600"
        );
    }

    #[test]
    fn tables_move_with_their_base() {
        let a = build(BASE);
        let b = build(0xF_0000);
        assert_eq!(a.bytes.len(), b.bytes.len());
        assert_ne!(a.bytes, b.bytes);
        let t = table(&b, u64_at(&b.bytes, 24), b"XSDT");
        assert_eq!(u64_at(t, 36), 0xF_0000 + b.fadt as u64);
    }
}
