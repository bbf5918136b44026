//! Untrusted kernel images for the PVH domain builder: building must never
//! panic nor write outside guest RAM (the memory below panics on any access
//! outside it), and a success keeps the builder's promises.
#![no_main]

use std::cell::RefCell;

use doppel_abi::SharedMem;
use doppel_core::pvh::{build, PvhConfig, HIGH_RAM};
use libfuzzer_sys::fuzz_target;

const RAM: u64 = 2 << 20;

struct Ram(RefCell<Vec<u8>>);

impl SharedMem for Ram {
    fn size(&self) -> usize {
        self.0.borrow().len()
    }
    fn load_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read_bytes(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        self.write_bytes(offset, &value.to_le_bytes());
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&self.0.borrow()[offset..offset + dst.len()]);
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        self.0.borrow_mut()[offset..offset + src.len()].copy_from_slice(src);
    }
}

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the initrd size (in 64-byte units), the rest
    // is the kernel.
    let (initrd_units, kernel) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
        _ => return,
    };
    let initrd = vec![0x5a; initrd_units * 64];
    let ram = Ram(RefCell::new(vec![0; RAM as usize]));
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
