//! Untrusted kernel images for the PVH domain builder: building must never
//! panic nor write outside guest RAM (the memory below panics on any access
//! outside it), and a success keeps the builder's promises.
#![no_main]

use doppel_abi::ByteMem;
use doppel_core::pvh::{build, PvhConfig, HIGH_RAM};
use libfuzzer_sys::fuzz_target;

const RAM: u64 = 2 << 20;

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the initrd size (in 64-byte units), the rest
    // is the kernel.
    let (initrd_units, kernel) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
        _ => return,
    };
    let initrd = vec![0x5a; initrd_units * 64];
    let ram = ByteMem::new(vec![0; RAM as usize]);
    let cfg = PvhConfig {
        kernel,
        initrd: &initrd,
        cmdline: b"console=ttyS0",
        ram_size: RAM,
        acpi: Some(b"RSD PTR "),
    };
    match build(&ram, &cfg) {
        Ok(b) => {
            assert!(b.kernel_span.0 >= HIGH_RAM && b.kernel_span.1 <= RAM);
            assert!((b.kernel_span.0..b.kernel_span.1).contains(&u64::from(b.entry)));
            assert_eq!(b.vcpu.rip, u64::from(b.entry));
            if b.initrd.1 > 0 {
                assert!(b.initrd.0 >= b.kernel_span.1 && b.initrd.0 + b.initrd.1 <= RAM);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
