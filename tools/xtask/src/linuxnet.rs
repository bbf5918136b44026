//! Issue 20's guest: a second initramfs beside issue 19's (which stays as
//! it is), holding Debian's virtio and ext4 modules from the same kernel
//! package, Debian's `redis-server` and `redis-cli` with every shared
//! library they need, and an /init that brings eth0 up, mounts /dev/vda on
//! /data and runs Redis with its append-only file there (docs/WORKLOAD.md).
//!
//! The packages come from Debian like the kernel's: `apt-get download` and
//! `dpkg -x` into target/guest/net/root/, the closure of the `lib*`
//! dependencies of `redis-server` and `redis-tools`; every DT_NEEDED of
//! the binaries is then resolved on that tree (not the host's), so a
//! library the closure missed is an error naming it.
//!
//! Step `linux-net-direct-qemu` proves the initramfs and the host harness
//! (crate::workload) in plain QEMU with QEMU's own virtio-mmio devices,
//! without Doppel.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cpio::{self, Entry};
use crate::ctx::Ctx;
use crate::linux;
use crate::setup;
use crate::workload::{self, ClientOptions, NetGuard};

/// The packages whose `lib*` dependency closure is unpacked for the guest.
pub const ROOT_PACKAGES: [&str; 2] = ["redis-server", "redis-tools"];

/// The modules /init loads (their `depends=` closure is added and the
/// whole loaded in dependency order): the virtio-mmio transport, the NIC,
/// the disk, ext4, and `crc32c_generic`, which provides `crypto-crc32c`,
/// the soft dependency ext4 and jbd2 name for metadata checksums (a
/// softdep, so not in `depends=`; [`module_set`] checks ext4 still names
/// it).
pub const ROOT_MODULES: [&str; 5] = [
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// The binaries the initramfs carries, as (path in the unpacked tree,
/// path in the guest). Debian's /usr/bin/redis-server is a symbolic link
/// to redis-check-rdb (one binary that picks its role by its name): the
/// link is followed and the binary stored under the server's name.
pub const BINARIES: [(&str, &str); 2] = [
    ("usr/bin/redis-server", "/bin/redis-server"),
    ("usr/bin/redis-cli", "/bin/redis-cli"),
];

/// Where the guest's shared libraries go (the loader's default search
/// path on Debian, also set as LD_LIBRARY_PATH by /init).
pub const LIB_DIR: &str = "/lib/x86_64-linux-gnu";

/// The guest's address; the client namespace has [`workload::CLIENT_IP`].
pub const GUEST_IP: &str = "10.77.0.2";
/// Redis's port.
pub const REDIS_PORT: u16 = 6379;

/// The console lines /init prints, in order (`linux-net: <key>=<value>`).
pub const MARKERS: [&str; 5] = [
    "eth0=up",
    "disk=mounted",
    "redis=ready",
    "redis=exited",
    "disk=unmounted",
];

/// /init of the network guest. `@MODULES@` becomes the module file names
/// in load order.
pub const INIT: &str = r#"#!/bin/busybox sh
# /init of Doppel's network guest (issue 20): virtio modules, eth0, the
# ext4 disk on /data, and redis-server until a client sends SHUTDOWN.
mark() {
    /bin/busybox printf "\\$1" |
        /bin/busybox dd of=/dev/port bs=1 seek=1538 count=1 conv=notrunc 2>/dev/null
}
mark 001
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
say() { echo "linux-net: $*"; }
fail() { say "error=$*"; poweroff -f; }
say "init=reached"
for m in @MODULES@; do
    insmod "/lib/modules/$m" || fail "insmod-$m"
done
say "modules=loaded"
say "virtio-mmio=$(ls /sys/bus/platform/devices | grep -c '^LNRO0005:')"
n=0
while [ ! -e /sys/class/net/eth0 ] || [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ $n -le 50 ] || fail "no-eth0-or-vda"
    sleep 0.1
done
ip link set lo up
ip link set eth0 up || fail "eth0"
ip addr add @GUEST_IP@/24 dev eth0 || fail "eth0-addr"
say "eth0=up"
mkdir -p /data
mount -t ext4 /dev/vda /data || fail "mount-vda"
say "disk=mounted"
redis-server --bind 0.0.0.0 --protected-mode no --appendonly yes \
    --appendfsync always --dir /data --save '' &
pid=$!
n=0
until [ "$(redis-cli -h 127.0.0.1 ping 2>/dev/null)" = PONG ]; do
    n=$((n + 1))
    [ $n -le 300 ] || fail "redis-not-answering"
    sleep 0.1
done
say "redis=ready"
mark 003
wait $pid
st=$?
mark 004
say "redis=exited status=$st"
sync
umount /data && say "disk=unmounted"
mark 002
poweroff -f
"#;

/// [`INIT`] with the module load order and the address filled in.
pub fn init_script(modules: &[String]) -> String {
    INIT.replace("@MODULES@", &modules.join(" "))
        .replace("@GUEST_IP@", GUEST_IP)
}

/// A little-endian ELF64 file, read only as far as the module and library
/// resolution needs (section `.modinfo`; PT_INTERP and PT_DYNAMIC).
struct Elf64<'a> {
    b: &'a [u8],
}

impl<'a> Elf64<'a> {
    fn new(b: &'a [u8]) -> Result<Self> {
        ensure!(
            b.len() >= 64 && b.starts_with(b"\x7fELF") && b[4] == 2 && b[5] == 1,
            "not a little-endian ELF64 file"
        );
        Ok(Self { b })
    }

    fn u16(&self, at: usize) -> Result<u16> {
        let s = self
            .b
            .get(at..at + 2)
            .context("ELF field beyond the file")?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    fn u32(&self, at: usize) -> Result<u32> {
        let s = self
            .b
            .get(at..at + 4)
            .context("ELF field beyond the file")?;
        Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }

    fn u64(&self, at: usize) -> Result<usize> {
        let s = self
            .b
            .get(at..at + 8)
            .context("ELF field beyond the file")?;
        usize::try_from(u64::from_le_bytes(s.try_into().expect("8 bytes")))
            .context("ELF value does not fit")
    }

    fn bytes(&self, off: usize, len: usize) -> Result<&'a [u8]> {
        off.checked_add(len)
            .and_then(|end| self.b.get(off..end))
            .with_context(|| format!("ELF range {off:#x}+{len:#x} beyond the file"))
    }

    /// The NUL-terminated string at `off`.
    fn cstr(&self, off: usize) -> Result<&'a str> {
        let s = self.b.get(off..).context("ELF string beyond the file")?;
        let end = s
            .iter()
            .position(|&c| c == 0)
            .context("unterminated string")?;
        std::str::from_utf8(&s[..end]).context("ELF string is not UTF-8")
    }

    /// Every section as (name, file offset, size).
    fn sections(&self) -> Result<Vec<(&'a str, usize, usize)>> {
        let (shoff, shentsize) = (self.u64(0x28)?, self.u16(0x3a)? as usize);
        let (shnum, shstrndx) = (self.u16(0x3c)? as usize, self.u16(0x3e)? as usize);
        let hdr = |i: usize| shoff + i * shentsize;
        let strtab = self.u64(hdr(shstrndx) + 0x18)?;
        (0..shnum)
            .map(|i| {
                let name = self.cstr(strtab + self.u32(hdr(i))? as usize)?;
                Ok((name, self.u64(hdr(i) + 0x18)?, self.u64(hdr(i) + 0x20)?))
            })
            .collect()
    }

    /// Every program header as (type, offset, vaddr, filesz).
    fn segments(&self) -> Result<Vec<(u32, usize, usize, usize)>> {
        let (phoff, phentsize, phnum) = (
            self.u64(0x20)?,
            self.u16(0x36)? as usize,
            self.u16(0x38)? as usize,
        );
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Ok((
                    self.u32(p)?,
                    self.u64(p + 8)?,
                    self.u64(p + 16)?,
                    self.u64(p + 32)?,
                ))
            })
            .collect()
    }

    /// The file offset of virtual address `v` (through the PT_LOADs).
    fn offset_of(&self, v: usize) -> Result<usize> {
        self.segments()?
            .into_iter()
            .find(|&(t, _, va, sz)| t == 1 && (va..va + sz).contains(&v))
            .map(|(_, off, va, _)| off + (v - va))
            .with_context(|| format!("address {v:#x} in no PT_LOAD"))
    }

    /// `key=value` pairs of the `.modinfo` section (a kernel module's).
    fn modinfo(&self) -> Result<Vec<(&'a str, &'a str)>> {
        let (_, off, size) = self
            .sections()?
            .into_iter()
            .find(|s| s.0 == ".modinfo")
            .context("no .modinfo section: not a kernel module")?;
        Ok(self
            .bytes(off, size)?
            .split(|&c| c == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
            .collect())
    }

    /// The program interpreter (PT_INTERP), if any.
    fn interp(&self) -> Result<Option<&'a str>> {
        match self.segments()?.into_iter().find(|s| s.0 == 3) {
            Some((_, off, _, _)) => Ok(Some(self.cstr(off)?)),
            None => Ok(None),
        }
    }

    /// The DT_NEEDED names of the dynamic section.
    fn needed(&self) -> Result<Vec<&'a str>> {
        let Some((_, off, _, size)) = self.segments()?.into_iter().find(|s| s.0 == 2) else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        for i in 0..size / 16 {
            let tag = self.u64(off + i * 16)?;
            if tag == 0 {
                break;
            }
            entries.push((tag, self.u64(off + i * 16 + 8)?));
        }
        const DT_NEEDED: usize = 1;
        const DT_STRTAB: usize = 5;
        let strtab = entries
            .iter()
            .find(|e| e.0 == DT_STRTAB)
            .context("dynamic section without DT_STRTAB")?;
        let strtab = self.offset_of(strtab.1)?;
        entries
            .iter()
            .filter(|e| e.0 == DT_NEEDED)
            .map(|e| self.cstr(strtab + e.1))
            .collect()
    }
}

/// A module's `depends=` names and its `softdep=` text.
pub fn module_deps(ko: &[u8]) -> Result<(Vec<String>, String)> {
    let info = Elf64::new(ko)?.modinfo()?;
    let depends = info
        .iter()
        .filter(|kv| kv.0 == "depends")
        .flat_map(|kv| kv.1.split(','))
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    let softdep = info
        .iter()
        .filter(|kv| kv.0 == "softdep")
        .map(|kv| kv.1)
        .collect::<Vec<_>>()
        .join(" ");
    Ok((depends, softdep))
}

/// Load order of `roots` and everything they depend on: each module after
/// its dependencies, `deps` giving each module's `depends=`. A cycle or a
/// module with no entry is an error.
pub fn load_order(roots: &[&str], deps: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>> {
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        on_path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if out.iter().any(|o| o == m) {
            return Ok(());
        }
        ensure!(
            !on_path.iter().any(|p| p == m),
            "module dependency cycle: {} -> {m}",
            on_path.join(" -> ")
        );
        let ds = deps
            .get(m)
            .with_context(|| format!("module {m} not found"))?;
        on_path.push(m.to_string());
        for d in ds {
            visit(d, deps, on_path, out)?;
        }
        on_path.pop();
        out.push(m.to_string());
        Ok(())
    }
    let mut out = Vec::new();
    for r in roots {
        visit(r, deps, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// Every `*.ko` (or `*.ko.xz`) under `dir` by module name (file stem,
/// `-` as `_`).
fn index_modules(dir: &Path, into: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, into)?;
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = n.strip_suffix(".ko").or_else(|| n.strip_suffix(".ko.xz")) {
                into.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
    Ok(())
}

/// A module file's ELF bytes: a `.ko.xz` is decompressed here, since
/// busybox `insmod` takes only the plain ELF (Debian 6.1's are plain).
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let b = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "xz") {
        return linux::unxz(&b).with_context(|| format!("{}", path.display()));
    }
    Ok(b)
}

/// The modules /init loads, in load order: (guest file name, bytes).
pub fn module_set(kernel_root: &Path, release: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = kernel_root.join("lib/modules").join(release).join("kernel");
    let mut files = BTreeMap::new();
    index_modules(&dir, &mut files)?;
    let mut deps = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    let mut todo: Vec<String> = ROOT_MODULES.iter().map(|s| s.to_string()).collect();
    while let Some(m) = todo.pop() {
        if deps.contains_key(&m) {
            continue;
        }
        let path = files
            .get(&m)
            .with_context(|| format!("no {m}.ko under {}", dir.display()))?;
        let ko = read_module(path)?;
        let (d, softdep) = module_deps(&ko).with_context(|| format!("{}", path.display()))?;
        if m == "ext4" {
            ensure!(
                softdep.contains("crypto-crc32c"),
                "ext4's softdep is {softdep:?}, not crypto-crc32c: revisit ROOT_MODULES"
            );
        }
        todo.extend(d.iter().cloned());
        deps.insert(m.clone(), d);
        bytes.insert(m, ko);
    }
    load_order(&ROOT_MODULES, &deps)?
        .into_iter()
        .map(|m| {
            let b = bytes.remove(&m).expect("read above");
            Ok((format!("{m}.ko"), b))
        })
        .collect()
}

/// `path` (inside the unpacked tree `root`) with symbolic links followed
/// inside the tree: absolute targets count from `root`, not the host's /.
pub fn resolve_in(root: &Path, path: &str) -> Result<PathBuf> {
    let mut rel = PathBuf::from(path.trim_start_matches('/'));
    for _ in 0..16 {
        let p = root.join(&rel);
        let meta = fs::symlink_metadata(&p).with_context(|| format!("no {}", p.display()))?;
        if !meta.file_type().is_symlink() {
            return Ok(p);
        }
        let target = fs::read_link(&p)?;
        rel = if target.is_absolute() {
            target.strip_prefix("/")?.to_path_buf()
        } else {
            rel.parent().unwrap_or(Path::new("")).join(target)
        };
    }
    bail!("{path}: too many symbolic links")
}

/// Library directories searched in the unpacked tree, in order.
const TREE_LIB_DIRS: [&str; 4] = [
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib",
    "usr/lib",
];

/// The shared libraries `binaries` need, transitively, found in `root`:
/// soname -> file, and the program interpreter (its path as the binaries
/// name it, and the file). A library not in the tree is an error naming
/// it and who needs it.
pub fn resolve_libraries(
    root: &Path,
    binaries: &[PathBuf],
) -> Result<(BTreeMap<String, PathBuf>, (String, PathBuf))> {
    let mut libs = BTreeMap::new();
    let mut interp = None;
    let mut todo: Vec<(String, PathBuf)> = binaries
        .iter()
        .map(|b| (b.display().to_string(), b.clone()))
        .collect();
    while let Some((who, file)) = todo.pop() {
        let bytes = fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let elf = Elf64::new(&bytes).with_context(|| format!("{}", file.display()))?;
        if let Some(i) = elf.interp()? {
            if interp.is_none() {
                interp = Some((i.to_string(), resolve_in(root, i)?));
            }
        }
        for soname in elf.needed()? {
            if libs.contains_key(soname) {
                continue;
            }
            let found = TREE_LIB_DIRS
                .iter()
                .find_map(|d| resolve_in(root, &format!("{d}/{soname}")).ok())
                .with_context(|| {
                    format!(
                        "{soname} (needed by {who}) is in none of the unpacked packages under {}",
                        root.display()
                    )
                })?;
            libs.insert(soname.to_string(), found.clone());
            todo.push((soname.to_string(), found));
        }
    }
    let interp = interp.context("the binaries name no program interpreter")?;
    Ok((libs, interp))
}

/// The `lib*` names in a Depends line, first alternative of each.
pub fn lib_depends(line: &str) -> Vec<String> {
    line.split(',')
        .filter_map(|alt| alt.split('|').next())
        .filter_map(|a| a.split_whitespace().next())
        .map(|n| n.split(':').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("lib"))
        .collect()
}

fn apt_field(pkg: &str, field: &str) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", pkg])
        .output()
        .context("running apt-cache show")?;
    ensure!(
        out.status.success(),
        "apt-cache show {pkg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = format!("{field}: ");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string))
}

/// Where the network guest's packages are unpacked.
pub fn net_dir() -> PathBuf {
    setup::guest_dir().join("net")
}

/// Written last: `package=version` a line; its presence means the tree is
/// complete.
const STAMP: &str = "packages.txt";

/// Fetch and unpack [`ROOT_PACKAGES`] and their `lib*` closure unless the
/// tree is already complete; the tree's root.
pub fn ensure_packages() -> Result<PathBuf> {
    let dir = net_dir();
    let root = dir.join("root");
    if dir.join(STAMP).is_file() && root.is_dir() {
        return Ok(root);
    }
    let debs = dir.join("deb");
    fs::create_dir_all(&debs)?;
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = ROOT_PACKAGES.iter().map(|s| s.to_string()).collect();
    let mut specs = Vec::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let version = apt_field(&p, "Version")?
            .with_context(|| format!("apt-cache show {p}: no Version (is apt's list current?)"))?;
        for f in ["Pre-Depends", "Depends"] {
            if let Some(line) = apt_field(&p, f)? {
                todo.extend(lib_depends(&line));
            }
        }
        specs.push((p, version));
    }
    for (name, version) in &specs {
        crate::setup::fetch_deb(&debs, &root, name, version)?;
    }
    let list: Vec<String> = specs.iter().map(|(n, v)| format!("{n}={v}")).collect();
    println!("setup: network guest packages: {}", list.join(" "));
    fs::write(dir.join(STAMP), list.join("\n") + "\n")?;
    Ok(root)
}

/// The built network guest.
#[derive(Debug)]
pub struct NetImage {
    /// Issue 19's kernel (vmlinux, PVH-only vmlinux), unchanged.
    pub base: linux::LinuxImage,
    /// The network initramfs.
    pub initramfs: PathBuf,
    /// Module file names in load order.
    pub modules: Vec<String>,
    /// Shared library sonames copied in, and the loader's path.
    pub libraries: Vec<String>,
    pub interp: String,
}

/// The initramfs bytes: busybox, the binaries, libraries and loader,
/// the modules and /init.
pub fn initramfs(
    busybox: &[u8],
    binaries: &[(&str, Vec<u8>)],
    libs: &[(String, Vec<u8>)],
    interp: (&str, &[u8]),
    modules: &[(String, Vec<u8>)],
    init: &str,
) -> Vec<u8> {
    let lib_paths: Vec<String> = libs.iter().map(|l| format!("{LIB_DIR}/{}", l.0)).collect();
    let mod_paths: Vec<String> = modules
        .iter()
        .map(|m| format!("/lib/modules/{}", m.0))
        .collect();
    let mut e = vec![
        Entry::Dir("/bin"),
        Entry::File("/bin/busybox", 0o755, busybox),
        Entry::Symlink("/bin/sh", "busybox"),
        Entry::Dir("/dev"),
        Entry::CharDev("/dev/console", 5, 1),
        Entry::CharDev("/dev/port", 1, 4),
        Entry::CharDev("/dev/null", 1, 3),
        Entry::Dir("/proc"),
        Entry::Dir("/sys"),
        Entry::Dir("/tmp"),
        Entry::Dir("/data"),
        Entry::Dir("/etc"),
        Entry::Dir("/lib"),
        Entry::Dir(LIB_DIR),
        Entry::Dir("/lib/modules"),
    ];
    let interp_dir = Path::new(interp.0)
        .parent()
        .and_then(|p| p.to_str())
        .unwrap_or("/");
    if !matches!(interp_dir, "/" | "/lib" | LIB_DIR) {
        e.push(Entry::Dir(interp_dir));
    }
    for (path, bytes) in binaries {
        e.push(Entry::File(path, 0o755, bytes));
    }
    for (path, l) in lib_paths.iter().zip(libs) {
        e.push(Entry::File(path, 0o755, &l.1));
    }
    e.push(Entry::File(interp.0, 0o755, interp.1));
    for (path, m) in mod_paths.iter().zip(modules) {
        e.push(Entry::File(path, 0o644, &m.1));
    }
    e.push(Entry::File("/init", 0o755, init.as_bytes()));
    cpio::newc(&e)
}

/// Build the network guest: issue 19's kernel, and the network initramfs
/// in target/guest/net/initramfs.cpio (rewritten only when it changes).
pub fn build() -> Result<NetImage> {
    let base = linux::build()?;
    let kernel = setup::ensure_guest()?;
    let root = ensure_packages()?;
    let modules = module_set(&kernel.root, &kernel.release)?;
    let mut binaries = Vec::new();
    let mut files = Vec::new();
    for (from, to) in BINARIES {
        let f = resolve_in(&root, from)?;
        binaries.push((to, fs::read(&f)?));
        files.push(f);
    }
    let (libs, (interp, interp_file)) = resolve_libraries(&root, &files)?;
    let lib_bytes: Vec<(String, Vec<u8>)> = libs
        .iter()
        .map(|(n, p)| Ok((n.clone(), fs::read(p)?)))
        .collect::<Result<_>>()?;
    let names: Vec<String> = modules.iter().map(|m| m.0.clone()).collect();
    let archive = initramfs(
        &fs::read(&kernel.busybox)?,
        &binaries,
        &lib_bytes,
        (&interp, &fs::read(&interp_file)?),
        &modules,
        &init_script(&names),
    );
    let path = net_dir().join("initramfs.cpio");
    if fs::read(&path).ok().as_deref() != Some(&archive[..]) {
        fs::write(&path, &archive).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(NetImage {
        base,
        initramfs: path,
        modules: names,
        libraries: libs.keys().cloned().collect(),
        interp,
    })
}

/// The `linux-net:` values /init printed, by key, in order.
pub fn console_values(console: &str) -> BTreeMap<String, Vec<String>> {
    let mut v: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in console.lines() {
        if let Some((_, rest)) = l.trim_end_matches('\r').split_once("linux-net: ") {
            let (k, val) = rest.split_once('=').unwrap_or((rest, ""));
            v.entry(k.to_string()).or_default().push(val.to_string());
        }
    }
    v
}

/// Check /init's console lines: every one of [`MARKERS`], no `error=`,
/// redis-server exiting with status 0; the number of virtio-mmio devices
/// Linux found through ACPI (`LNRO0005`).
pub fn check_console(console: &str) -> Result<u32> {
    let v = console_values(console);
    if let Some(e) = v.get("error") {
        bail!("/init failed: error={}", e.join(", error="));
    }
    let none = Vec::new();
    for m in MARKERS {
        let (k, want) = m.split_once('=').expect("key=value");
        let got = v.get(k).unwrap_or(&none);
        ensure!(
            got.iter()
                .any(|g| g == want || g.starts_with(&format!("{want} "))),
            "no `linux-net: {m}` line (got {k}={got:?})"
        );
    }
    let status = v["redis"]
        .iter()
        .find_map(|r| r.strip_prefix("exited status="));
    ensure!(
        status == Some("0"),
        "redis-server exited with status {status:?}"
    );
    let devices: u32 = v
        .get("virtio-mmio")
        .and_then(|n| n.first()?.parse().ok())
        .context("no `linux-net: virtio-mmio=<n>` line")?;
    Ok(devices)
}

/// Hard limit of the direct QEMU run (boot, benchmark, shutdown).
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(300);
/// The guest's MAC address.
pub const GUEST_MAC: &str = "52:54:00:77:00:02";

/// Test step: the network initramfs and the host harness in plain QEMU
/// (microvm with ACPI; QEMU's own virtio-mmio NIC and disk, which its
/// DSDT declares as LNRO0005), no Doppel.
pub fn step_direct(_: &mut Ctx) -> Result<String> {
    let img = build()?;
    let dir = workload::run_dir("linux-net-direct-qemu")?;
    let disk = dir.join("disk.img");
    workload::make_disk(&disk)?;
    let net = NetGuard::create()?;
    let console = dir.join("console.log");
    let mut cmd = net.host_command("qemu-system-x86_64");
    // auto-kernel-cmdline=off: QEMU adds no `virtio_mmio.device=` to the
    // command line, so Linux finds the devices through ACPI alone.
    cmd.args([
        "-machine",
        "microvm,acpi=on,rtc=on,auto-kernel-cmdline=off",
        "-accel",
        "tcg",
    ])
    .args(["-cpu", "EPYC,-svm", "-m", "512"])
    // microvm has no PIT, HPET or PM timer to calibrate the TSC against:
    // without a known rate Linux marks the TSC unstable and may hang in
    // early boot. With -icount shift=0 the TSC counts one tick per
    // instruction at 1 GHz of virtual time, and the kernel is told so
    // (tsc_early_khz), as in linux-direct-qemu; sleep=on keeps virtual
    // time from racing ahead of the client while the guest idles.
    .args(["-icount", "shift=0,sleep=on"])
    .arg("-kernel")
    .arg(&img.base.vmlinux)
    .arg("-initrd")
    .arg(&img.initramfs)
    .args([
        "-append",
        &crate::linuxboot::linux_cmdline(crate::linuxboot::QEMU_TSC_KHZ),
    ])
    .args(["-display", "none", "-no-reboot", "-monitor", "none"])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-netdev")
    .arg(format!(
        "tap,id=n0,ifname={},script=no,downscript=no",
        net.tap
    ))
    .arg("-device")
    .arg(format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}"))
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=none,id=d0,cache=writeback",
        disk.display()
    ))
    .args(["-device", "virtio-blk-device,drive=d0"])
    .stdin(Stdio::null())
    .stdout(Stdio::from(fs::File::create(dir.join("qemu.out"))?))
    .stderr(Stdio::from(fs::File::create(dir.join("qemu.err"))?));
    let started = Instant::now();
    let mut qemu = crate::proc::Proc::start("qemu (network guest)", &mut cmd, true)?;
    let client = workload::run_client_while(&net, &ClientOptions::emulated(), &dir, &mut || {
        !qemu.exited().unwrap_or(true)
    });
    let left = DIRECT_TIMEOUT.saturating_sub(started.elapsed());
    let status = qemu.wait_exit(left)?;
    qemu.kill();
    let wall = started.elapsed();
    let text = String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
    let client = client.with_context(|| format!("the client; console in {}", console.display()))?;
    client
        .check()
        .with_context(|| format!("console in {}", console.display()))?;
    ensure!(
        status.is_some(),
        "the guest did not power off within {DIRECT_TIMEOUT:?}; console in {}",
        console.display()
    );
    let devices = check_console(&text).with_context(|| format!("console:\n{text}"))?;
    ensure!(
        devices == 2,
        "Linux found {devices} LNRO0005 devices through ACPI, expected 2"
    );
    drop(net);
    let d = workload::check_disk(&disk, client.incr.acked)?;
    for l in &client.benchmark.lines {
        println!(
            "figures: linux-net-direct-qemu redis-benchmark (emulated, QEMU TCG -icount shift=0, no Doppel): {l}"
        );
    }
    println!(
        "figures: linux-net-direct-qemu wall-s={:.1} virtio-mmio={devices} modules={} libraries={} loader={} aof-files={}",
        wall.as_secs_f64(),
        img.modules.join(","),
        img.libraries.len(),
        img.interp,
        d.aof_files.join(",")
    );
    Ok(format!(
        "linux-net-direct: benchmark_requests={} incr_acked={} incr_gap={} fsck={} aof_incr={} result=pass",
        client.benchmark.requests,
        client.incr.acked,
        client.incr.gaps,
        if d.fsck_clean { "clean" } else { "errors" },
        d.aof_incr
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(m, d)| (m.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let d = deps(&[
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("virtio", &["virtio_ring"]),
            ("virtio_ring", &[]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
        ]);
        let order = load_order(&["virtio_net", "virtio_blk"], &d).unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_blk"
            ]
        );
        let pos = |m: &str| order.iter().position(|o| o == m).unwrap();
        for (m, ds) in &d {
            for x in ds {
                assert!(pos(x) < pos(m), "{x} before {m}");
            }
        }
        let cyc = deps(&[("a", &["b"]), ("b", &["a"])]);
        assert!(format!("{:#}", load_order(&["a"], &cyc).unwrap_err()).contains("cycle"));
        let missing = deps(&[("a", &["b"])]);
        assert!(format!("{:#}", load_order(&["a"], &missing).unwrap_err()).contains("b"));
    }

    /// A compressed module is found under its name and handed over as the
    /// ELF inside; a plain one as it is.
    #[test]
    fn compressed_modules_are_decompressed() {
        use std::io::Read;
        let t = tempfile::tempdir().unwrap();
        let sub = t.path().join("kernel/drivers");
        fs::create_dir_all(&sub).unwrap();
        let elf = b"\x7fELF pretend module".repeat(50);
        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new(&elf[..], 1)
            .read_to_end(&mut xz)
            .unwrap();
        fs::write(sub.join("virtio-net.ko.xz"), &xz).unwrap();
        fs::write(sub.join("virtio_blk.ko"), &elf).unwrap();
        fs::write(sub.join("notes.txt"), b"x").unwrap();
        let mut idx = BTreeMap::new();
        index_modules(t.path(), &mut idx).unwrap();
        assert_eq!(idx.keys().collect::<Vec<_>>(), ["virtio_blk", "virtio_net"]);
        assert_eq!(read_module(&idx["virtio_net"]).unwrap(), elf);
        assert_eq!(read_module(&idx["virtio_blk"]).unwrap(), elf);
    }

    #[test]
    fn depends_lines_keep_lib_first_alternatives() {
        assert_eq!(
            lib_depends("adduser, libatomic1 (>= 4.8), libc6 (>= 2.34), libsystemd0 | libelogind0, libfoo:any"),
            ["libatomic1", "libc6", "libsystemd0", "libfoo"]
        );
    }

    /// The xtask test binary itself is a dynamically linked ELF: its
    /// DT_NEEDED and interpreter are what the host's loader uses.
    #[test]
    fn needed_and_interp_of_a_real_binary() {
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        let e = Elf64::new(&exe).unwrap();
        let needed = e.needed().unwrap();
        assert!(needed.contains(&"libc.so.6"), "{needed:?}");
        assert_eq!(e.interp().unwrap(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(e.modinfo().is_err(), "not a kernel module");
        for n in 0..exe.len().min(4096) {
            if let Ok(e) = Elf64::new(&exe[..n]) {
                let _ = e.needed();
                let _ = e.interp();
            }
        }
    }

    /// Libraries resolve inside the tree: an absolute symbolic link counts
    /// from the tree's root, and a library missing from the tree is an
    /// error naming it (not a silent fall-back to the host's copy).
    #[test]
    fn libraries_resolve_in_the_tree_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let exe = std::env::current_exe().unwrap();
        let bytes = fs::read(&exe).unwrap();
        let needed: Vec<String> = Elf64::new(&bytes)
            .unwrap()
            .needed()
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::copy(&exe, root.join("bin/x")).unwrap();
        // The loader (a real one: it has no DT_NEEDED of its own), reached
        // through an absolute link as Debian ships it.
        let lib = root.join("lib/x86_64-linux-gnu");
        fs::create_dir_all(&lib).unwrap();
        fs::create_dir_all(root.join("lib64")).unwrap();
        let host_ld = fs::canonicalize("/lib64/ld-linux-x86-64.so.2").unwrap();
        fs::copy(&host_ld, lib.join("ld-linux-x86-64.so.2")).unwrap();
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            root.join("lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        // The host has the libraries; the tree does not yet.
        let err = resolve_libraries(root, &[root.join("bin/x")]).unwrap_err();
        assert!(format!("{err:#}").contains(&needed[0]), "{err:#}");
        // Leaf stand-ins for the libraries.
        for n in &needed {
            fs::copy(&host_ld, lib.join(n)).unwrap();
        }
        let (libs, (interp, file)) = resolve_libraries(root, &[root.join("bin/x")]).unwrap();
        assert_eq!(libs.keys().cloned().collect::<Vec<_>>(), {
            let mut n = needed.clone();
            n.sort();
            n
        });
        assert_eq!(interp, "/lib64/ld-linux-x86-64.so.2");
        assert_eq!(file, root.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
    }

    fn good_console() -> String {
        [
            "[    1.0] virtio_net virtio0 eth0: ...",
            "linux-net: init=reached",
            "linux-net: modules=loaded",
            "linux-net: virtio-mmio=2",
            "linux-net: eth0=up",
            "linux-net: disk=mounted",
            "1:M 07 Dec 2026 * Ready to accept connections tcp",
            "linux-net: redis=ready",
            "linux-net: redis=exited status=0",
            "linux-net: disk=unmounted",
        ]
        .join("\r\n")
    }

    #[test]
    fn console_checks_name_the_missing_step() {
        assert_eq!(check_console(&good_console()).unwrap(), 2);
        for (from, to, says) in [
            ("eth0=up", "eth0=down", "eth0=up"),
            ("disk=mounted", "disk=gone", "disk=mounted"),
            ("redis=ready", "redis=starting", "redis=ready"),
            ("status=0", "status=1", "status"),
            ("disk=unmounted", "disk=busy", "disk=unmounted"),
            ("modules=loaded", "error=insmod-ext4.ko", "insmod-ext4"),
            ("virtio-mmio=2", "virtio-mmio=x", "virtio-mmio"),
        ] {
            let bad = good_console().replacen(from, to, 1);
            let err = format!("{:#}", check_console(&bad).expect_err(from));
            assert!(err.contains(says), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn init_prints_every_marker_and_loads_the_modules() {
        let s = init_script(&["virtio_ring.ko".into(), "ext4.ko".into()]);
        for m in MARKERS {
            let key = m.split('=').next().unwrap();
            assert!(s.contains(&format!("say \"{key}=")), "{m}");
        }
        assert!(s.contains("for m in virtio_ring.ko ext4.ko; do"));
        assert!(s.contains("10.77.0.2/24 dev eth0"));
        assert!(!s.contains('@'), "a placeholder left in /init");
    }
}
