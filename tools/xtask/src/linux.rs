//! The Linux guest of issue 19, built from Debian's binaries: the
//! uncompressed vmlinux taken out of the stock bzImage, and a busybox
//! initramfs whose /init prints the transcript the boot tests check.
//!
//! `cargo xtask linux-image` builds both into target/guest/.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use doppel_core::elf::Elf;

use crate::cpio::{self, Entry};
use crate::setup::{self, GuestPackages};

// Offsets in the bzImage's setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const KERNEL_VERSION: usize = 0x20e;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// payload_offset/payload_length exist from boot protocol 2.08 on.
const MIN_PROTOCOL: u16 = 0x0208;

/// The XZ stream magic (`FD 37 7A 58 5A 00`).
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .context("bzImage shorter than its setup header")
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .context("bzImage shorter than its setup header")
}

/// What the bzImage's setup header says about the kernel inside.
#[derive(Debug)]
pub struct BzImage<'a> {
    /// Boot protocol version, e.g. 0x020f.
    pub protocol: u16,
    /// The kernel_version string: the release, then build details.
    pub version: String,
    /// The compressed vmlinux.
    pub payload: &'a [u8],
}

/// Parse the setup header and find the compressed payload.
pub fn bzimage(b: &[u8]) -> Result<BzImage<'_>> {
    ensure!(
        u16_at(b, BOOT_FLAG)? == 0xaa55 && b.get(HEADER..HEADER + 4) == Some(b"HdrS"),
        "not a bzImage (no boot flag or HdrS header)"
    );
    let protocol = u16_at(b, VERSION)?;
    ensure!(
        protocol >= MIN_PROTOCOL,
        "boot protocol {protocol:#06x} has no payload fields (need 2.08+)"
    );
    let sects = match b[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    // The payload offset counts from the protected-mode code, which follows
    // the boot sector and the setup sectors.
    let pm_start = (sects + 1) * 512;
    let off = pm_start + u32_at(b, PAYLOAD_OFFSET)? as usize;
    let len = u32_at(b, PAYLOAD_LENGTH)? as usize;
    let payload = off
        .checked_add(len)
        .and_then(|end| b.get(off..end))
        .with_context(|| format!("payload {off:#x}+{len:#x} lies beyond the file"))?;
    let version = match u16_at(b, KERNEL_VERSION)? {
        0 => String::new(),
        p => {
            let s = b.get(p as usize + 0x200..).unwrap_or(&[]);
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        }
    };
    Ok(BzImage {
        protocol,
        version,
        payload,
    })
}

/// The kernel release (first word of the version string).
pub fn release_of(version: &str) -> &str {
    version.split_whitespace().next().unwrap_or("")
}

/// Decompress an XZ payload (Linux's has the x86 BCJ filter, which
/// liblzma handles).
pub fn unxz(payload: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        payload.starts_with(XZ_MAGIC),
        "the payload is not XZ (starts {:02x?}); only XZ kernels are supported",
        &payload[..payload.len().min(6)]
    );
    let mut out = Vec::with_capacity(payload.len() * 4);
    liblzma::read::XzDecoder::new(payload)
        .read_to_end(&mut out)
        .context("decompressing the XZ payload")?;
    Ok(out)
}

/// A checked vmlinux.
#[derive(Debug)]
pub struct Vmlinux {
    pub release: String,
    /// The PVH entry (XEN_ELFNOTE_PHYS32_ENTRY).
    pub pvh_entry: u32,
    /// Lowest and highest physical address the loadable segments cover.
    pub span: (u64, u64),
}

/// Check that `elf` is an x86-64 ELF64 executable with a PVH entry note and
/// the `Linux version <release> ` banner of the release the bzImage named.
pub fn check_vmlinux(elf: &[u8], release: &str) -> Result<Vmlinux> {
    let e = Elf::parse(elf).map_err(|err| anyhow::anyhow!("vmlinux: {err:?}"))?;
    let pvh_entry = e
        .pvh_entry()
        .map_err(|err| anyhow::anyhow!("vmlinux has no usable PVH entry: {err:?}"))?;
    let mut span = (u64::MAX, 0);
    for s in e.segments() {
        span.0 = span.0.min(s.paddr);
        span.1 = span.1.max(s.paddr + s.memsz);
    }
    ensure!(span.1 > 0, "vmlinux has no loadable segment");
    ensure!(
        (span.0..span.1).contains(&(pvh_entry as u64)),
        "PVH entry {pvh_entry:#x} lies outside the loaded image {:#x}-{:#x}",
        span.0,
        span.1
    );
    let banner = format!("Linux version {release} ");
    ensure!(
        elf.windows(banner.len()).any(|w| w == banner.as_bytes()),
        "vmlinux lacks the banner {banner:?}: not the kernel the bzImage names"
    );
    Ok(Vmlinux {
        release: release.to_string(),
        pvh_entry,
        span,
    })
}

/// The vmlinux as the hypervisor reads it: the ELF header, the program
/// headers and the bytes of the PT_LOAD and PT_NOTE segments, nothing
/// after the last of them, and no section headers (e_shoff, e_shnum and
/// e_shstrndx zero). Bytes inside that span that no segment covers are
/// zeroed, so nothing but what the loader reads is kept. Written by hand
/// rather than with `objcopy --strip-all` so the image needs no binutils.
pub fn pvh_only(elf: &[u8]) -> Result<Vec<u8>> {
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    // Validate with hv/core's reader first: it bounds-checks the headers.
    Elf::parse(elf).map_err(|e| anyhow::anyhow!("vmlinux: {e:?}"))?;
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| -> Result<usize> {
        let v = u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
        usize::try_from(v).context("ELF offset does not fit")
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36), u16_at(0x38));
    let ph_end = phnum
        .checked_mul(phentsize)
        .and_then(|n| n.checked_add(phoff))
        .filter(|&e| e <= elf.len())
        .context("program headers lie beyond the file")?;
    let mut keep: Vec<(usize, usize)> = vec![(0, 64), (phoff, ph_end)];
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if matches!(u32_at(ph), PT_LOAD | PT_NOTE) {
            let (off, filesz) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let end = off
                .checked_add(filesz)
                .filter(|&e| e <= elf.len())
                .context("a segment lies beyond the file")?;
            keep.push((off, end));
        }
    }
    let end = keep.iter().map(|k| k.1).max().unwrap_or(64);
    let mut out = vec![0u8; end];
    for (a, b) in keep {
        out[a..b].copy_from_slice(&elf[a..b]);
    }
    out[0x28..0x30].fill(0); // e_shoff
    out[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
    Ok(out)
}

/// The guest's /init: prints `linux-init:` lines (checked by
/// [`check_transcript`]) and powers off.
pub const INIT: &str = r#"#!/bin/busybox sh
# /init of Doppel's Linux guest: prints the transcript `cargo xtask` checks.
# Marks: a byte written to I/O port 0x602 (1538), which the hypervisor logs
# with its exit counts; /dev/port is in the initramfs, so mark 1 needs
# nothing mounted.
mark() {
    /bin/busybox printf "\\$1" |
        /bin/busybox dd of=/dev/port bs=1 seek=1538 count=1 conv=notrunc 2>/dev/null
}
mark 001
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
say() { echo "linux-init: $*"; }
# Local timer interrupts, summed over CPUs.
loc() {
    awk '$1 == "LOC:" { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts
}
say "init=reached"
say "uname=$(uname -r)"
say "flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
say "timer-irqs=$(loc)"
sleep 1
say "timer-irqs=$(loc)"
say "date=$(date -u +%s) rtc=$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null || echo none)"
seq 1 1000 > /tmp/file
sync
say "file=$(cat /tmp/file | sha256sum | cut -d' ' -f1)"
# The command line (printed as "Command line:" and "Kernel command line:")
# says panic=-1: leave it out.
dmesg | grep -vi 'command line' | grep -E 'BUG:|WARNING:|Call Trace|panic' > /tmp/bad
while read -r l; do say "dmesg-bad: $l"; done < /tmp/bad
say "dmesg-bad=$(grep -c . /tmp/bad)"
say "transcript=end"
# Idle for the figures: the hypervisor's exit counts at marks 2 and 3.
mark 002
sleep 2
mark 003
poweroff -f
"#;

/// The I/O port /init writes its marks to (the hypervisor logs each with
/// its exit counts: `doppel-hv: linux: mark=<B> ...`).
pub const MARK_PORT: u16 = 0x602;
/// Mark 1: /init started. Marks 2 and 3 bracket a `sleep 2` after the
/// transcript (the idle figure).
pub const MARK_INIT: u8 = 1;
pub const MARK_IDLE_START: u8 = 2;
pub const MARK_IDLE_END: u8 = 3;

/// sha256 of `seq 1 1000` (the file /init writes and reads back).
#[cfg_attr(not(test), allow(dead_code))]
pub const FILE_SHA256: &str = "67d4ff71d43921d5739f387da09746f405e425b07d727e4c69d029461d1f051f";

/// The initramfs: busybox, its applet links made by /init, a console node
/// (the kernel opens /dev/console before /init runs) and the mount points.
pub fn initramfs(busybox: &[u8]) -> Vec<u8> {
    cpio::newc(&[
        Entry::Dir("/bin"),
        Entry::File("/bin/busybox", 0o755, busybox),
        Entry::Symlink("/bin/sh", "busybox"),
        Entry::Dir("/dev"),
        Entry::CharDev("/dev/console", 5, 1),
        // /dev/mem's minor 4: I/O ports, for the marks before devtmpfs.
        Entry::CharDev("/dev/port", 1, 4),
        Entry::Dir("/proc"),
        Entry::Dir("/sys"),
        Entry::Dir("/tmp"),
        Entry::File("/init", 0o755, INIT.as_bytes()),
    ])
}

/// dmesg lines that match /init's trouble patterns but are no fault, each
/// accepted by name. On AMD CPU models without the SRSO fix (QEMU's
/// `-cpu EPYC`) Linux prints `Speculative Return Stack Overflow: WARNING:
/// See ... for mitigation options.`: a mitigation notice, not a `WARN()`.
/// On Intel models whose Spectre v2 mitigation is retpolines (the CPUID
/// policy shows no SPEC_CTRL, so there is no IBRS), Bochs's Skylake among
/// them, it prints `RETBleed: WARNING: Spectre v2 mitigation leaves CPU
/// vulnerable to RETBleed attacks, data leaks possible!`: another notice.
pub const DMESG_ACCEPTED: [&str; 2] = [
    "Speculative Return Stack Overflow: WARNING: See ",
    "RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks",
];

/// What a transcript showed.
#[derive(Debug, PartialEq, Eq)]
pub struct Transcript {
    pub release: String,
    /// Local timer interrupts before and after one second.
    pub timer_irqs: (u64, u64),
    /// `date` and the RTC, seconds since the epoch.
    pub date: u64,
    pub rtc: u64,
}

/// Check the `linux-init:` lines of a guest's console output; the error
/// names the first thing that is wrong.
pub fn check_transcript(output: &str, release: &str) -> Result<Transcript> {
    let lines: Vec<&str> = output
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once("linux-init: "))
        .map(|(_, rest)| rest)
        .collect();
    let value = |key: &str| -> Vec<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .collect()
    };
    ensure!(
        value("init") == ["reached"],
        "init=reached missing: /init never ran"
    );
    let uname = value("uname");
    ensure!(uname == [release], "uname -r {uname:?}, expected {release}");
    let flags = value("flags");
    let flags = flags.first().context("no cpuinfo flags line")?;
    ensure!(flags.contains("fpu"), "cpuinfo flags look empty: {flags:?}");
    for hidden in ["svm", "vmx"] {
        ensure!(
            !flags.split_whitespace().any(|f| f == hidden),
            "the guest sees {hidden} in /proc/cpuinfo"
        );
    }
    let irqs: Vec<u64> = value("timer-irqs")
        .iter()
        .map(|v| v.parse().with_context(|| format!("timer-irqs={v}")))
        .collect::<Result<_>>()?;
    ensure!(
        irqs.len() == 2,
        "{} timer-irqs lines, expected 2",
        irqs.len()
    );
    ensure!(
        irqs[1] > irqs[0],
        "the local timer did not tick during sleep 1 ({} then {})",
        irqs[0],
        irqs[1]
    );
    let date_line = value("date");
    let date_line = date_line.first().context("no date line")?;
    let (date, rtc) = date_line
        .split_once(" rtc=")
        .context("date line without rtc=")?;
    let date: u64 = date.parse().with_context(|| format!("date={date}"))?;
    let rtc: u64 = rtc
        .parse()
        .with_context(|| format!("rtc={rtc}: no RTC device in the guest"))?;
    // 2020-01-01: a clock starting at 0 means the RTC was never read.
    ensure!(date >= 1_577_836_800, "date {date} is before 2020");
    ensure!(
        date.abs_diff(rtc) <= 2,
        "date {date} and the RTC {rtc} disagree"
    );
    let file = value("file");
    ensure!(
        file == [FILE_SHA256],
        "the file read back hashes to {file:?}, expected {FILE_SHA256}"
    );
    let bad: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("dmesg-bad: "))
        .collect();
    let count = value("dmesg-bad");
    ensure!(
        count == [bad.len().to_string().as_str()],
        "dmesg-bad={count:?} but {} dmesg-bad lines",
        bad.len()
    );
    let trouble: Vec<&&str> = bad
        .iter()
        .filter(|l| !DMESG_ACCEPTED.iter().any(|a| l.contains(a)))
        .collect();
    ensure!(trouble.is_empty(), "dmesg shows trouble: {trouble:?}");
    ensure!(
        value("transcript") == ["end"],
        "transcript=end missing: /init stopped early"
    );
    Ok(Transcript {
        release: release.to_string(),
        timer_irqs: (irqs[0], irqs[1]),
        date,
        rtc,
    })
}

/// The built guest.
#[derive(Debug)]
pub struct LinuxImage {
    /// The bzImage's boot protocol version.
    pub protocol: u16,
    pub vmlinux: PathBuf,
    /// [`pvh_only`] of the vmlinux: what the boot ISOs carry.
    pub pvh: PathBuf,
    pub initramfs: PathBuf,
    pub kernel: Vmlinux,
}

/// Write `bytes` to `path` unless it already holds them.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if fs::read(path).ok().as_deref() != Some(bytes) {
        fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Fetch the packages if needed, unpack the vmlinux (again only when the
/// bzImage is newer) and write the initramfs.
pub fn build() -> Result<LinuxImage> {
    let pkgs: GuestPackages = setup::ensure_guest()?;
    let dir = setup::guest_dir();
    let bz_bytes =
        fs::read(&pkgs.bzimage).with_context(|| format!("reading {}", pkgs.bzimage.display()))?;
    let bz = bzimage(&bz_bytes)?;
    let release = release_of(&bz.version).to_string();
    ensure!(
        release == pkgs.release,
        "the bzImage says release {release:?}, its file name {:?}",
        pkgs.release
    );
    let vmlinux = dir.join("vmlinux");
    let fresh = |p: &Path| -> bool {
        let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(p), m(&pkgs.bzimage)), (Some(a), Some(b)) if a >= b)
    };
    let elf = if fresh(&vmlinux) {
        fs::read(&vmlinux)?
    } else {
        let elf = unxz(bz.payload)?;
        fs::write(&vmlinux, &elf)?;
        elf
    };
    let kernel = check_vmlinux(&elf, &release)?;
    let pvh = dir.join("vmlinux.pvh");
    let small = pvh_only(&elf)?;
    check_vmlinux(&small, &release).context("the PVH-only vmlinux")?;
    write_if_changed(&pvh, &small)?;
    let busybox = fs::read(&pkgs.busybox)?;
    ensure!(
        busybox.starts_with(b"\x7fELF"),
        "{} is not an ELF",
        pkgs.busybox.display()
    );
    let initrd = dir.join("initramfs.cpio");
    write_if_changed(&initrd, &initramfs(&busybox))?;
    Ok(LinuxImage {
        protocol: bz.protocol,
        vmlinux,
        pvh,
        initramfs: initrd,
        kernel,
    })
}

fn size(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// One line describing the built guest.
pub fn describe(img: &LinuxImage) -> String {
    format!(
        "linux-image: kernel={} protocol={}.{:02} pvh-entry={:#x} segments={:#x}-{:#x} vmlinux={} ({} KiB, {} KiB PVH-only) initramfs={} ({} KiB)",
        img.kernel.release,
        img.protocol >> 8,
        img.protocol & 0xff,
        img.kernel.pvh_entry,
        img.kernel.span.0,
        img.kernel.span.1,
        img.vmlinux.display(),
        size(&img.vmlinux) / 1024,
        size(&img.pvh) / 1024,
        img.initramfs.display(),
        size(&img.initramfs) / 1024,
    )
}

/// `cargo xtask linux-image`.
pub fn command() -> Result<()> {
    let img = build()?;
    println!("{}", describe(&img));
    Ok(())
}

/// Guest RAM the boot tests give Linux.
pub const GUEST_RAM: u64 = 256 << 20;

/// The command line the boot tests pass (PLATFORM.md; `tsc_early_khz`
/// added by the run that knows the guest's TSC frequency).
pub const CMDLINE: &str =
    "console=ttyS0 8250.nr_uarts=1 reboot=t panic=-1 tsc=reliable no_timer_check quiet";

/// Build the PVH domain of the real kernel and initramfs into host memory
/// with hv/core's domain builder, and check what it wrote.
pub fn build_domain(img: &LinuxImage) -> Result<doppel_core::pvh::PvhBoot> {
    use doppel_abi::SharedMem;
    use doppel_core::pvh;
    let kernel = fs::read(&img.vmlinux)?;
    let initrd = fs::read(&img.initramfs)?;
    // Guest RAM on the host, as the hypervisor's would be.
    let ram = doppel_abi::ByteMem::new(vec![0; GUEST_RAM as usize]);
    let acpi = doppel_core::acpi::build(pvh::ACPI_ADDR);
    let boot = pvh::build(
        &ram,
        &pvh::PvhConfig {
            kernel: &kernel,
            initrd: &initrd,
            cmdline: CMDLINE.as_bytes(),
            ram_size: GUEST_RAM,
            acpi: Some(&acpi.bytes),
        },
    )
    .map_err(|e| anyhow::anyhow!("PVH domain builder: {e}"))?;
    ensure!(
        boot.entry == img.kernel.pvh_entry,
        "builder entry {:#x}, the note says {:#x}",
        boot.entry,
        img.kernel.pvh_entry
    );
    let mut back = vec![0; initrd.len()];
    ram.read_bytes(boot.initrd.0 as usize, &mut back);
    ensure!(back == initrd, "the initrd in guest memory differs");
    let mut magic = [0; 4];
    ram.read_bytes(boot.start_info as usize, &mut magic);
    ensure!(
        u32::from_le_bytes(magic) == doppel_abi::pvh::XEN_HVM_START_MAGIC_VALUE,
        "no start info magic"
    );
    let mut rsdp = [0; 8];
    ram.read_bytes(pvh::ACPI_ADDR as usize, &mut rsdp);
    ensure!(&rsdp == b"RSD PTR ", "no RSDP at {:#x}", pvh::ACPI_ADDR);
    Ok(boot)
}

/// Test step: the guest builds, its kernel checks out, and hv/core's PVH
/// domain builder lays it out in 256 MiB.
pub fn step_linux_image(_: &mut crate::ctx::Ctx) -> Result<String> {
    let img = build()?;
    if img.kernel.span.0 != 0x100_0000 {
        bail!(
            "the kernel loads at {:#x}, not CONFIG_PHYSICAL_START 0x1000000",
            img.kernel.span.0
        );
    }
    let boot = build_domain(&img)?;
    Ok(format!(
        "{}; pvh-domain: ram={} MiB entry={:#x} start-info={:#x} initrd={:#x}+{:#x} memmap={} rsdp={:#x}",
        describe(&img),
        GUEST_RAM >> 20,
        boot.entry,
        boot.start_info,
        boot.initrd.0,
        boot.initrd.1,
        boot.memmap.len(),
        doppel_core::pvh::ACPI_ADDR
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal bzImage: setup header with `sects` setup sectors and the
    /// payload `at` bytes into the protected-mode code.
    fn fake_bzimage(sects: u8, at: u32, payload: &[u8], version: &str) -> Vec<u8> {
        let pm = (sects.max(1) as usize + 1) * 512;
        let mut b = vec![0u8; pm + at as usize];
        b[SETUP_SECTS] = sects;
        b[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[HEADER..HEADER + 4].copy_from_slice(b"HdrS");
        b[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&at.to_le_bytes());
        b[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        // kernel_version string at 0x300 (pointer 0x100 + 0x200).
        b[KERNEL_VERSION..KERNEL_VERSION + 2].copy_from_slice(&0x100u16.to_le_bytes());
        b[0x300..0x300 + version.len()].copy_from_slice(version.as_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        liblzma::read::XzEncoder::new(data, 1)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn payload_is_found_and_unpacked() {
        let inner = b"\x7fELF pretend vmlinux".repeat(100);
        let b = fake_bzimage(
            3,
            0x40,
            &xz(&inner),
            "6.1.0-57-amd64 (debian-kernel@) #1 SMP",
        );
        let bz = bzimage(&b).unwrap();
        assert_eq!(bz.protocol, 0x020f);
        assert_eq!(release_of(&bz.version), "6.1.0-57-amd64");
        assert_eq!(unxz(bz.payload).unwrap(), inner);
    }

    #[test]
    fn bad_bzimages_are_errors() {
        let good = fake_bzimage(3, 0x40, &xz(b"x"), "6.1");
        let mut b = good.clone();
        b[HEADER] = b'X';
        assert!(bzimage(&b).is_err());
        let mut b = good.clone();
        b[VERSION..VERSION + 2].copy_from_slice(&0x0207u16.to_le_bytes());
        assert!(format!("{:#}", bzimage(&b).unwrap_err()).contains("2.08"));
        // Payload length past the end of the file.
        let mut b = good.clone();
        b[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(bzimage(&b).is_err());
        // Not XZ (e.g. a gzip kernel), and a corrupt XZ stream.
        assert!(unxz(b"\x1f\x8b\x08\0").is_err());
        let mut bad = xz(b"some data to compress");
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        assert!(unxz(&bad).is_err());
        // Truncations never panic.
        for n in 0..good.len() {
            let _ = bzimage(&good[..n]);
        }
    }

    pub(crate) fn good_transcript() -> String {
        [
            "[    0.5] some kernel line",
            "linux-init: init=reached",
            "linux-init: uname=6.1.0-57-amd64",
            "linux-init: flags=fpu vme de pse tsc msr pae x2apic hypervisor",
            "linux-init: timer-irqs=310",
            "linux-init: timer-irqs=561",
            "linux-init: date=1796600000 rtc=1796600001",
            &format!("linux-init: file={FILE_SHA256}"),
            "linux-init: dmesg-bad=0",
            "linux-init: transcript=end",
            "reboot: Power down",
        ]
        .join("\r\n")
    }

    /// An x86-64 ELF: one PT_LOAD (file bytes 0x100..0x180), one PT_NOTE
    /// with the PVH entry (0x180..0x194), then 0x400 bytes of "sections"
    /// and section headers.
    fn tiny_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x600];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[6] = 1;
        f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        f[0x28..0x30].copy_from_slice(&0x200u64.to_le_bytes()); // shoff
        f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, at: usize, kind: u32, off: u64, addr: u64, sz: u64, mem: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&sz.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&mem.to_le_bytes());
        };
        ph(&mut f, 0x40, 1, 0x100, 0x100_0000, 0x80, 0x1000);
        ph(&mut f, 0x78, 4, 0x180, 0, 0x14, 0x14);
        f[0x100..0x180].fill(0xc3);
        let banner = b"Linux version 6.1.0-57-amd64 ";
        f[0x110..0x110 + banner.len()].copy_from_slice(banner);
        // Xen note 18: PHYS32_ENTRY.
        f[0x180..0x184].copy_from_slice(&4u32.to_le_bytes());
        f[0x184..0x188].copy_from_slice(&4u32.to_le_bytes());
        f[0x188..0x18c].copy_from_slice(&18u32.to_le_bytes());
        f[0x18c..0x190].copy_from_slice(b"Xen\0");
        f[0x190..0x194].copy_from_slice(&0x100_0040u32.to_le_bytes());
        f[0x194..0x600].fill(0xee);
        f
    }

    #[test]
    fn the_pvh_only_vmlinux_keeps_what_the_loader_reads() {
        let elf = tiny_elf();
        let full = check_vmlinux(&elf, "6.1.0-57-amd64").unwrap();
        let small = pvh_only(&elf).unwrap();
        assert_eq!(small.len(), 0x194, "nothing after the last segment");
        assert!(!small.contains(&0xee), "no section bytes kept");
        assert_eq!(&small[0x28..0x30], &[0; 8], "e_shoff");
        assert_eq!(&small[0x3c..0x40], &[0; 4], "e_shnum, e_shstrndx");
        assert_eq!(small[0x100..0x194], elf[0x100..0x194]);
        let kept = check_vmlinux(&small, "6.1.0-57-amd64").unwrap();
        assert_eq!((kept.pvh_entry, kept.span), (full.pvh_entry, full.span));
        // A segment past the end of the file is an error, not a panic.
        let mut bad = elf.clone();
        bad[0x40 + 32..0x40 + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert!(pvh_only(&bad).is_err());
        for n in 0..elf.len() {
            let _ = pvh_only(&elf[..n]);
        }
    }

    #[test]
    fn a_good_transcript_passes() {
        let t = check_transcript(&good_transcript(), "6.1.0-57-amd64").unwrap();
        assert_eq!(t.timer_irqs, (310, 561));
        assert_eq!((t.date, t.rtc), (1796600000, 1796600001));
        let srso = good_transcript().replace(
            "dmesg-bad=0",
            "dmesg-bad: [    0.073781] Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/html/latest/admin-guide/hw-vuln/srso.html for mitigation options.\r\nlinux-init: dmesg-bad=1",
        );
        check_transcript(&srso, "6.1.0-57-amd64").unwrap();
    }

    #[test]
    fn each_fault_in_a_transcript_is_named() {
        let good = good_transcript();
        for (from, to, says) in [
            ("init=reached", "init=missing?", "init=reached"),
            ("uname=6.1.0-57-amd64", "uname=5.10.0", "uname"),
            ("x2apic", "x2apic svm", "svm"),
            ("x2apic", "vmx x2apic", "vmx"),
            ("timer-irqs=561", "timer-irqs=310", "did not tick"),
            ("rtc=1796600001", "rtc=1796500000", "disagree"),
            ("rtc=1796600001", "rtc=none", "no RTC"),
            ("date=1796600000", "date=100", "before 2020"),
            ("file=67", "file=00", "hashes"),
            (
                "dmesg-bad=0",
                "dmesg-bad: WARNING: foo\r\nlinux-init: dmesg-bad=1",
                "WARNING: foo",
            ),
            ("transcript=end", "transcript=cut", "stopped early"),
            // The SRSO notice is accepted by name, nothing else beside it.
            (
                "dmesg-bad=0",
                "dmesg-bad: [    0.07] Speculative Return Stack Overflow: WARNING: See x\r\nlinux-init: dmesg-bad: [    0.08] WARNING: CPU: 0 PID: 1\r\nlinux-init: dmesg-bad=2",
                "CPU: 0 PID: 1",
            ),
            // So is the RETBleed notice; a RETBleed line of another
            // wording is not.
            (
                "dmesg-bad=0",
                "dmesg-bad: [    1.69] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks, data leaks possible!\r\nlinux-init: dmesg-bad: [    1.70] RETBleed: WARNING: something else\r\nlinux-init: dmesg-bad=2",
                "something else",
            ),
            // A count that does not match the lines printed.
            (
                "dmesg-bad=0",
                "dmesg-bad: [    0.07] Speculative Return Stack Overflow: WARNING: See x\r\nlinux-init: dmesg-bad=2",
                "dmesg-bad=",
            ),
        ] {
            assert!(good.contains(from), "{from}");
            let bad = good.replacen(from, to, 1);
            let err = format!(
                "{:#}",
                check_transcript(&bad, "6.1.0-57-amd64").expect_err(from)
            );
            assert!(err.contains(says), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn init_prints_every_line_the_checker_reads() {
        for key in [
            "init=reached",
            "uname=",
            "flags=",
            "timer-irqs=",
            "date=",
            " rtc=",
            "file=",
            "dmesg-bad: ",
            "dmesg-bad=",
            "transcript=end",
        ] {
            assert!(INIT.contains(key), "/init never prints {key}");
        }
        let archive = initramfs(b"\x7fELF busybox");
        assert!(archive.windows(INIT.len()).any(|w| w == INIT.as_bytes()));
    }
}

/// hv/core's ACPI tables as an independent reader sees them: ACPICA's
/// `iasl -d` (Debian's acpica-tools, installed by `cargo xtask setup`).
#[cfg(test)]
mod acpi_tests {
    use std::process::Command;

    use doppel_core::acpi;

    /// Disassemble one table with iasl; its text.
    fn iasl(name: &str, table: &[u8]) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, table).unwrap();
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(dir)
            .output()
            .expect("iasl is installed (`cargo xtask setup`)");
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {name}: {log}");
        std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
    }

    fn table(t: &acpi::AcpiTables, off: usize) -> &[u8] {
        let len = u32::from_le_bytes(t.bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        &t.bytes[off..off + len]
    }

    #[test]
    fn iasl_reads_dsdt_fadt_and_madt() {
        let t = acpi::build(doppel_core::pvh::ACPI_ADDR);
        let dsdt = iasl("dsdt", table(&t, t.dsdt));
        for want in [
            "Device (_SB.COM1)",
            "EisaId (\"PNP0501\")",
            "IO (Decode16,",
            "0x03F8,",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            "0x00000004,",
            "Name (_S5, Package (0x02)",
            "0x05,",
        ] {
            assert!(dsdt.contains(want), "DSDT lacks {want:?}:\n{dsdt}");
        }
        let fadt = iasl("facp", table(&t, t.fadt));
        for want in [
            "Hardware Reduced (V5) : 1",
            "VGA Not Present (V4) : 1",
            "MSI Not Supported (V4) : 1",
        ] {
            assert!(fadt.contains(want), "FADT lacks {want:?}:\n{fadt}");
        }
        // The hardware-reduced sleep registers (what Linux powers off
        // through): one byte each in I/O space at 0x600 and 0x601.
        for (reg, port) in [
            ("Sleep Control Register", "0000000000000600"),
            ("Sleep Status Register", "0000000000000601"),
        ] {
            let block: Vec<&str> = fadt
                .lines()
                .skip_while(|l| !l.contains(reg))
                .take(6)
                .collect();
            let block = block.join("\n");
            for want in [
                "Space ID : 01 [SystemIO]",
                "Bit Width : 08",
                "Bit Offset : 00",
                "Encoded Access Width : 01 [Byte Access:8]",
                &format!("Address : {port}"),
            ] {
                assert!(block.contains(want), "{reg} lacks {want:?}:\n{block}");
            }
        }
        let madt = iasl("apic", table(&t, t.madt));
        for want in [
            "Local Apic Address : FEE00000",
            "Subtable Type : 00 [Processor Local APIC]",
            "Subtable Type : 01 [I/O APIC]",
            "Address : FEC00000",
        ] {
            assert!(madt.contains(want), "MADT lacks {want:?}:\n{madt}");
        }
        for dsl in [&dsdt, &fadt, &madt] {
            assert!(!dsl.contains("Incorrect checksum"), "{dsl}");
        }
    }
}
