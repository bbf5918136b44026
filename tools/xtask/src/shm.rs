//! Machine RAM files in /dev/shm (each up to 256 MiB): named after the
//! xtask process that made them, removed when dropped, and removed at the
//! next run when their process was killed before it could.

use std::fs;
use std::path::{Path, PathBuf};

/// A file removed when dropped.
pub(crate) struct TempFile(pub(crate) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Prefix of the machine RAM files in /dev/shm: `doppel-xtask-<pid>-<tag>`.
const SHM_PREFIX: &str = "doppel-xtask-";

/// A machine RAM file `/dev/shm/doppel-xtask-<pid>-<tag>`, removed when
/// dropped. Files of earlier runs whose process is gone (stopped by
/// Ctrl-C or killed, so their drop never ran; each is up to 256 MiB of
/// RAM) are removed first.
pub(crate) fn shm_file(tag: &str) -> TempFile {
    remove_stale_shm(Path::new("/dev/shm"));
    TempFile(PathBuf::from(format!(
        "/dev/shm/{SHM_PREFIX}{}-{tag}",
        std::process::id()
    )))
}

/// The pid in a file name made by [`shm_file`].
fn shm_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(SHM_PREFIX)?;
    let (pid, _tag) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Remove the [`shm_file`] files in `dir` whose process no longer exists.
fn remove_stale_shm(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(shm_pid) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let path = e.path();
            match fs::remove_file(&path) {
                Ok(()) => println!("removed {} (its run, pid {pid}, is gone)", path.display()),
                Err(err) => println!("cannot remove stale {}: {err}", path.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_names_carry_the_pid() {
        let f = shm_file("failover-qemu-1-standby");
        let name = f.0.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(shm_pid(&name), Some(std::process::id()));
        assert!(name.ends_with("-failover-qemu-1-standby"), "{name}");
        assert_eq!(shm_pid("doppel-replica-123"), None);
        assert_eq!(shm_pid("doppel-xtask-12x-a"), None);
    }

    #[test]
    fn only_files_of_gone_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // pid_max is at most 2^22: this pid cannot exist.
        let gone = format!("{SHM_PREFIX}{}-replica", (1u32 << 22) + 1);
        let live = format!("{SHM_PREFIX}{}-sim", std::process::id());
        let other = "doppel-replica-999999999".to_string();
        for n in [&gone, &live, &other] {
            fs::write(dir.join(n), b"x").unwrap();
        }
        remove_stale_shm(dir);
        let mut left: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![live, other];
        want.sort();
        assert_eq!(left, want);
    }
}
