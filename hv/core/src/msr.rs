//! Which MSRs a guest may touch without an exit, and the two vendors'
//! MSR-intercept bitmaps built from that one list.
//!
//! A guest runs at CPL0; every RDMSR/WRMSR it executes without an exit
//! reads or writes the CPU's real MSR. That is harmless only for an MSR the
//! world switch itself saves and restores (the guest then sees and changes
//! its own copy). Every other MSR is intercepted, and the exit dispatch
//! emulates it from per-vCPU state or refuses it; the hypervisor never
//! executes the real RDMSR/WRMSR for it on the guest's behalf.
//!
//! What each vendor switches (docs/KERNEL.md has the table):
//! - SVM: VMRUN/#VMEXIT switch EFER, CR*, segment state, RSP/RIP/RAX, PAT;
//!   VMLOAD/VMSAVE switch FS/GS/TR/LDTR (bases included), KERNEL_GS_BASE,
//!   STAR, LSTAR, CSTAR, SFMASK and SYSENTER_CS/ESP/EIP (AMD APM vol. 2,
//!   "VMSAVE and VMLOAD Instructions"). The kernel's `svm_run` VMLOADs the
//!   guest's VMCB before VMRUN, VMSAVEs it after, and VMLOADs the host's, so
//!   all of those are the guest's own while it runs.
//! - VMX: the VMCS guest-state area holds FS/GS base and SYSENTER_CS/ESP/EIP
//!   and VM exit loads the host's from the host-state area (Intel SDM vol.
//!   3C, "Guest-State Area", "Loading Host Control Registers, Debug
//!   Registers, MSRs"); KERNEL_GS_BASE, STAR, LSTAR, CSTAR and SFMASK are
//!   not switched, so they stay intercepted there. EFER is switched by the
//!   load/save-EFER controls but stays intercepted on both: a guest write
//!   of EFER must not go to hardware unchecked.

/// MSR numbers used here and by the hostile guest's probes.
pub mod nr {
    pub const TSC: u32 = 0x10;
    pub const APIC_BASE: u32 = 0x1b;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MTRR_PHYS_BASE0: u32 = 0x200;
    pub const EFER: u32 = 0xC000_0080;
    pub const STAR: u32 = 0xC000_0081;
    pub const LSTAR: u32 = 0xC000_0082;
    pub const CSTAR: u32 = 0xC000_0083;
    pub const SFMASK: u32 = 0xC000_0084;
    pub const FS_BASE: u32 = 0xC000_0100;
    pub const GS_BASE: u32 = 0xC000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    /// AMD: the host save area's physical address.
    pub const VM_HSAVE_PA: u32 = 0xC001_0117;
}

/// The two virtualization vendors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Svm,
    Vmx,
}

/// One allow-listed MSR: the guest reads and writes it without an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub msr: u32,
    pub name: &'static str,
    /// The SVM world switch (VMRUN plus `svm_run`'s VMLOAD/VMSAVE) saves
    /// and restores it.
    pub svm: bool,
    /// The VMCS guest/host-state areas save and restore it.
    pub vmx: bool,
}

/// The allow-list, the one place it lives. See the module comment for why
/// each entry is switched by its vendor.
pub const ALLOW_LIST: &[Allowed] = &[
    Allowed {
        msr: nr::FS_BASE,
        name: "FS_BASE",
        svm: true,
        vmx: true,
    },
    Allowed {
        msr: nr::GS_BASE,
        name: "GS_BASE",
        svm: true,
        vmx: true,
    },
    Allowed {
        msr: nr::KERNEL_GS_BASE,
        name: "KERNEL_GS_BASE",
        svm: true,
        vmx: false,
    },
    Allowed {
        msr: nr::STAR,
        name: "STAR",
        svm: true,
        vmx: false,
    },
    Allowed {
        msr: nr::LSTAR,
        name: "LSTAR",
        svm: true,
        vmx: false,
    },
    Allowed {
        msr: nr::CSTAR,
        name: "CSTAR",
        svm: true,
        vmx: false,
    },
    Allowed {
        msr: nr::SFMASK,
        name: "SFMASK",
        svm: true,
        vmx: false,
    },
    Allowed {
        msr: nr::SYSENTER_CS,
        name: "SYSENTER_CS",
        svm: true,
        vmx: true,
    },
    Allowed {
        msr: nr::SYSENTER_ESP,
        name: "SYSENTER_ESP",
        svm: true,
        vmx: true,
    },
    Allowed {
        msr: nr::SYSENTER_EIP,
        name: "SYSENTER_EIP",
        svm: true,
        vmx: true,
    },
];

/// Whether `vendor` lets the guest access `msr` without an exit.
pub fn allowed(vendor: Vendor, msr: u32) -> bool {
    ALLOW_LIST.iter().any(|a| {
        a.msr == msr
            && match vendor {
                Vendor::Svm => a.svm,
                Vendor::Vmx => a.vmx,
            }
    })
}

/// A name for the MSRs this hypervisor knows, for error lines.
pub fn name(msr: u32) -> &'static str {
    if let Some(a) = ALLOW_LIST.iter().find(|a| a.msr == msr) {
        return a.name;
    }
    match msr {
        nr::TSC => "TSC",
        nr::APIC_BASE => "APIC_BASE",
        nr::MTRR_PHYS_BASE0 => "MTRR_PHYS_BASE0",
        nr::EFER => "EFER",
        nr::VM_HSAVE_PA => "VM_HSAVE_PA",
        _ => "?",
    }
}

/// Bytes of the SVM MSR permission map (two 4 KiB pages).
pub const SVM_MSRPM_BYTES: usize = 8192;
/// Bytes of the VMX MSR bitmap (one 4 KiB page).
pub const VMX_BITMAP_BYTES: usize = 4096;

/// The three MSR ranges the SVM MSRPM covers: (first MSR, byte offset of
/// its vector). Two bits per MSR, read then write; MSRs outside them are
/// always intercepted (AMD APM vol. 2, "MSR Intercepts").
const SVM_RANGES: [(u32, usize); 3] = [(0, 0), (0xC000_0000, 0x800), (0xC001_0000, 0x1000)];
const SVM_RANGE_MSRS: u32 = 0x2000;

/// Where `msr`'s read bit sits in the SVM MSRPM: (byte, bit); the write
/// bit is the next bit. `None` outside the mapped ranges.
pub fn svm_msrpm_bit(msr: u32) -> Option<(usize, u8)> {
    SVM_RANGES.iter().find_map(|&(first, off)| {
        let i = msr.checked_sub(first).filter(|i| *i < SVM_RANGE_MSRS)? as usize;
        Some((off + i / 4, ((i % 4) * 2) as u8))
    })
}

/// Where `msr`'s read bit sits in the VMX MSR bitmap: (byte, bit); its
/// write bit is the same bit 2048 bytes on. Read-low (0-0x1FFF) at 0,
/// read-high (0xC000_0000-0xC000_1FFF) at 1024, write-low at 2048,
/// write-high at 3072 (Intel SDM vol. 3C, "MSR-Bitmap Address"). `None`
/// outside those ranges (always an exit).
pub fn vmx_bitmap_bit(msr: u32) -> Option<(usize, u8)> {
    let (base, i) = match msr {
        0..=0x1FFF => (0, msr),
        0xC000_0000..=0xC000_1FFF => (1024, msr - 0xC000_0000),
        _ => return None,
    };
    Some((base + (i / 8) as usize, (i % 8) as u8))
}

/// Fill the SVM MSR permission map: every MSR intercepted (all bits set)
/// except the allow-list's SVM entries. `passthrough` makes it all zeros,
/// the deliberately broken build (`broken=msr-passthrough`).
pub fn build_svm_msrpm(map: &mut [u8; SVM_MSRPM_BYTES], passthrough: bool) {
    map.fill(if passthrough { 0 } else { 0xff });
    if passthrough {
        return;
    }
    for a in ALLOW_LIST.iter().filter(|a| a.svm) {
        if let Some((byte, bit)) = svm_msrpm_bit(a.msr) {
            map[byte] &= !(0b11 << bit);
        }
    }
}

/// Fill the VMX MSR bitmap: every MSR intercepted except the allow-list's
/// VMX entries; `passthrough` as for [`build_svm_msrpm`].
pub fn build_vmx_bitmap(map: &mut [u8; VMX_BITMAP_BYTES], passthrough: bool) {
    map.fill(if passthrough { 0 } else { 0xff });
    if passthrough {
        return;
    }
    for a in ALLOW_LIST.iter().filter(|a| a.vmx) {
        if let Some((byte, bit)) = vmx_bitmap_bit(a.msr) {
            map[byte] &= !(1 << bit);
            map[byte + 2048] &= !(1 << bit);
        }
    }
}

/// Whether the SVM map intercepts (`write`) access to `msr`.
pub fn svm_intercepts(map: &[u8; SVM_MSRPM_BYTES], msr: u32, write: bool) -> bool {
    match svm_msrpm_bit(msr) {
        Some((byte, bit)) => map[byte] & (1 << (bit + u8::from(write))) != 0,
        None => true,
    }
}

/// Whether the VMX bitmap intercepts (`write`) access to `msr`.
pub fn vmx_intercepts(map: &[u8; VMX_BITMAP_BYTES], msr: u32, write: bool) -> bool {
    match vmx_bitmap_bit(msr) {
        Some((byte, bit)) => map[byte + if write { 2048 } else { 0 }] & (1 << bit) != 0,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_NAMED: [u32; 15] = [
        nr::TSC,
        nr::APIC_BASE,
        nr::SYSENTER_CS,
        nr::SYSENTER_ESP,
        nr::SYSENTER_EIP,
        nr::MTRR_PHYS_BASE0,
        nr::EFER,
        nr::STAR,
        nr::LSTAR,
        nr::CSTAR,
        nr::SFMASK,
        nr::FS_BASE,
        nr::GS_BASE,
        nr::KERNEL_GS_BASE,
        nr::VM_HSAVE_PA,
    ];

    #[test]
    fn svm_bits_sit_where_the_apm_puts_them() {
        // MSR 0: byte 0 bits 0/1; MSR 0x10 (TSC): byte 4 bits 0/1.
        assert_eq!(svm_msrpm_bit(0), Some((0, 0)));
        assert_eq!(svm_msrpm_bit(nr::TSC), Some((4, 0)));
        // SYSENTER_EIP 0x176: byte 0x5d, bits 4/5.
        assert_eq!(svm_msrpm_bit(nr::SYSENTER_EIP), Some((0x5d, 4)));
        // EFER 0xC000_0080: 0x800 + 0x20, bits 0/1.
        assert_eq!(svm_msrpm_bit(nr::EFER), Some((0x820, 0)));
        // LSTAR 0xC000_0082: 0x820, bits 4/5.
        assert_eq!(svm_msrpm_bit(nr::LSTAR), Some((0x820, 4)));
        // VM_HSAVE_PA 0xC001_0117: 0x1000 + 0x45, bits 6/7.
        assert_eq!(svm_msrpm_bit(nr::VM_HSAVE_PA), Some((0x1045, 6)));
        assert_eq!(svm_msrpm_bit(0x1FFF), Some((0x7ff, 6)));
        assert_eq!(svm_msrpm_bit(0x2000), None);
        assert_eq!(svm_msrpm_bit(0xC001_2000), None);
        assert_eq!(svm_msrpm_bit(0x4000_0000), None);
    }

    #[test]
    fn vmx_bits_sit_where_the_sdm_puts_them() {
        assert_eq!(vmx_bitmap_bit(nr::TSC), Some((2, 0)));
        // SYSENTER_EIP 0x176: byte 0x2e bit 6.
        assert_eq!(vmx_bitmap_bit(nr::SYSENTER_EIP), Some((0x2e, 6)));
        // FS_BASE 0xC000_0100: 1024 + 0x20 bit 0.
        assert_eq!(vmx_bitmap_bit(nr::FS_BASE), Some((1024 + 0x20, 0)));
        assert_eq!(vmx_bitmap_bit(nr::EFER), Some((1024 + 0x10, 0)));
        // AMD's range is not in the VMX bitmap: always an exit.
        assert_eq!(vmx_bitmap_bit(nr::VM_HSAVE_PA), None);
        assert_eq!(vmx_bitmap_bit(0x2000), None);
    }

    #[test]
    fn the_svm_map_intercepts_all_but_the_allow_list() {
        let mut m = [0u8; SVM_MSRPM_BYTES];
        build_svm_msrpm(&mut m, false);
        for msr in ALL_NAMED {
            let want = !allowed(Vendor::Svm, msr);
            assert_eq!(svm_intercepts(&m, msr, false), want, "{msr:#x} read");
            assert_eq!(svm_intercepts(&m, msr, true), want, "{msr:#x} write");
        }
        // Specific bytes: VM_HSAVE_PA intercepted both ways, LSTAR's pair
        // cleared among EFER's (set), STAR's and CSTAR's (cleared).
        assert_eq!(m[0x1045] & 0xc0, 0xc0);
        assert_eq!(m[0x820], 0b0000_0011);
        // SYSENTER_CS/ESP/EIP (0x174-0x176) are byte 0x5d bits 0-5; 0x177 stays.
        assert_eq!(m[0x5d], 0b1100_0000);
        assert_eq!(m[4], 0xff, "TSC and its neighbours");
        // Every byte outside the allow-list's is all ones.
        let cleared = m.iter().filter(|b| **b != 0xff).count();
        assert_eq!(cleared, 4, "bytes 0x5d, 0x820, 0x821 (SFMASK), 0x840");
        assert_eq!(m[0x821], 0b1111_1100);
        assert_eq!(m[0x840], 0b1100_0000);
        assert!(svm_intercepts(&m, 0x4000_0000, false), "outside the ranges");
        assert!(!allowed(Vendor::Svm, nr::EFER));
        assert!(!allowed(Vendor::Svm, nr::VM_HSAVE_PA));
    }

    #[test]
    fn the_vmx_bitmap_intercepts_all_but_the_allow_list() {
        let mut m = [0u8; VMX_BITMAP_BYTES];
        build_vmx_bitmap(&mut m, false);
        for msr in ALL_NAMED {
            let want = !allowed(Vendor::Vmx, msr);
            assert_eq!(vmx_intercepts(&m, msr, false), want, "{msr:#x} read");
            assert_eq!(vmx_intercepts(&m, msr, true), want, "{msr:#x} write");
        }
        // VMX does not switch LSTAR (nor STAR, CSTAR, SFMASK, KERNEL_GS_BASE).
        assert!(vmx_intercepts(&m, nr::LSTAR, false));
        assert!(vmx_intercepts(&m, nr::KERNEL_GS_BASE, true));
        // SYSENTER 0x174-0x176: byte 0x2e bits 4-6, read and write halves.
        assert_eq!(m[0x2e], 0b1000_1111);
        assert_eq!(m[0x2e + 2048], 0b1000_1111);
        // FS_BASE and GS_BASE: byte 1024+0x20 bits 0 and 1.
        assert_eq!(m[1024 + 0x20], 0b1111_1100);
        assert_eq!(m[3072 + 0x20], 0b1111_1100);
        assert_eq!(m.iter().filter(|b| **b != 0xff).count(), 4);
    }

    #[test]
    fn passthrough_is_all_zero() {
        let mut s = [0xaau8; SVM_MSRPM_BYTES];
        build_svm_msrpm(&mut s, true);
        assert!(s.iter().all(|b| *b == 0));
        assert!(!svm_intercepts(&s, nr::VM_HSAVE_PA, true));
        let mut v = [0xaau8; VMX_BITMAP_BYTES];
        build_vmx_bitmap(&mut v, true);
        assert!(v.iter().all(|b| *b == 0));
        assert!(!vmx_intercepts(&v, nr::EFER, false));
    }

    #[test]
    fn names() {
        assert_eq!(name(nr::VM_HSAVE_PA), "VM_HSAVE_PA");
        assert_eq!(name(nr::LSTAR), "LSTAR");
        assert_eq!(name(0x1234), "?");
    }
}
