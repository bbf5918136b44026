//! A writer for the `newc` cpio format, the format of Linux's initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Written here rather than by `cpio` so that device nodes (`/dev/console`)
//! go into the archive without root and every field is deterministic
//! (uid, gid and mtime 0), so the same inputs give the same bytes.

/// One archive member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    Dir(&'a str),
    /// A regular file: path, permission bits, contents.
    File(&'a str, u32, &'a [u8]),
    /// A symbolic link: path, target.
    Symlink(&'a str, &'a str),
    /// A character device: path, major, minor.
    CharDev(&'a str, u32, u32),
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

/// The archive holding `entries` in order (parents before children), then
/// the trailer.
pub fn newc(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match *e {
            Entry::Dir(p) => member(&mut out, ino, S_IFDIR | 0o755, 2, (0, 0), p, &[]),
            Entry::File(p, perm, data) => member(&mut out, ino, S_IFREG | perm, 1, (0, 0), p, data),
            Entry::Symlink(p, target) => member(
                &mut out,
                ino,
                S_IFLNK | 0o777,
                1,
                (0, 0),
                p,
                target.as_bytes(),
            ),
            Entry::CharDev(p, major, minor) => {
                member(&mut out, ino, S_IFCHR | 0o600, 1, (major, minor), p, &[])
            }
        }
    }
    member(&mut out, 0, 0, 1, (0, 0), TRAILER, &[]);
    out
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn member(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    path: &str,
    data: &[u8],
) {
    // Paths are relative to the archive's root: "bin/sh", not "/bin/sh".
    let name = path.trim_start_matches('/');
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check (newc: no checksum)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read back (name, mode, rdev, data) of each member, checking the
    /// magic and the 4-byte alignment of every header and body.
    /// name, mode, (rdev major, minor), data
    type Member = (String, u32, (u32, u32), Vec<u8>);

    fn parse(mut a: &[u8]) -> Vec<Member> {
        let total = a.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - a.len()) % 4, 0, "header not 4-aligned");
            assert_eq!(&a[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rdev, namesize) = (
                field(1),
                field(6) as usize,
                (field(9), field(10)),
                field(11),
            );
            let name_end = 110 + namesize as usize;
            assert_eq!(a[name_end - 1], 0, "name not NUL-terminated");
            let name = String::from_utf8(a[110..name_end - 1].to_vec()).unwrap();
            let data_at = name_end.next_multiple_of(4);
            let data = a[data_at..data_at + size].to_vec();
            a = &a[(data_at + size).next_multiple_of(4)..];
            if name == TRAILER {
                assert!(a.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn members_round_trip_with_their_kinds() {
        let archive = newc(&[
            Entry::Dir("/bin"),
            Entry::File("/bin/busybox", 0o755, b"\x7fELF..."),
            Entry::Symlink("/bin/sh", "busybox"),
            Entry::Dir("/dev"),
            Entry::CharDev("/dev/console", 5, 1),
            Entry::File("/init", 0o755, b"#!/bin/sh\n"),
        ]);
        let m = parse(&archive);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0], ("bin".into(), S_IFDIR | 0o755, (0, 0), Vec::new()));
        assert_eq!(
            m[1],
            (
                "bin/busybox".into(),
                S_IFREG | 0o755,
                (0, 0),
                b"\x7fELF...".to_vec()
            )
        );
        assert_eq!(
            m[2],
            (
                "bin/sh".into(),
                S_IFLNK | 0o777,
                (0, 0),
                b"busybox".to_vec()
            )
        );
        assert_eq!(
            m[4],
            ("dev/console".into(), S_IFCHR | 0o600, (5, 1), Vec::new())
        );
        assert_eq!(m[5].3, b"#!/bin/sh\n");
        // Deterministic: the same members give the same bytes.
        assert_eq!(
            archive,
            newc(&[
                Entry::Dir("/bin"),
                Entry::File("/bin/busybox", 0o755, b"\x7fELF..."),
                Entry::Symlink("/bin/sh", "busybox"),
                Entry::Dir("/dev"),
                Entry::CharDev("/dev/console", 5, 1),
                Entry::File("/init", 0o755, b"#!/bin/sh\n"),
            ])
        );
    }

    #[test]
    fn the_system_cpio_reads_it() {
        // An independent reader: GNU cpio (installed by `cargo xtask
        // setup`) lists our archive.
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio is installed (`cargo xtask setup`)");
        let archive = newc(&[
            Entry::Dir("/etc"),
            Entry::File("/etc/motd", 0o644, b"hello"),
        ]);
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "etc\netc/motd\n");
    }
}
