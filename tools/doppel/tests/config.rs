//! `doppel primary|backup --config FILE` and `doppel config check`, on the
//! real binary: the file alone runs a primary, flags on the command line
//! beat the file (also a flag that conflicts with a key), role tables
//! override the top level, and each kind of bad file is a clear error that
//! names the key (or the file) with its exit code.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, BIN};

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("config-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn doppel(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `doppel ROLE --config FILE` (FILE holding `toml`) must exit with `code`
/// and say each of `says`, without a panic.
fn rejects(role: &str, toml: &str, code: i32, says: &[&str]) -> String {
    let d = scratch(&format!("bad-{role}-{:x}", fxhash(toml)));
    std::fs::write(d.join("c.toml"), toml).unwrap();
    let o = doppel(&[role, "--config", "c.toml"], &d);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "{toml}\n{t}");
    assert!(t.contains("c.toml: "), "names the file: {t}");
    for s in says {
        assert!(t.contains(s), "expected {s:?} for\n{toml}\nin:\n{t}");
    }
    assert!(!t.contains("panicked"), "{t}");
    t
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Epochs of a capture, from `doppel stream verify`.
fn epochs_of(dir: &Path, cap: &str) -> u64 {
    let o = doppel(&["stream", "verify", cap], dir);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    out.lines()
        .find_map(|l| l.strip_prefix("valid: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stream verify {cap}: {}", text(&o)))
}

/// A hypervisor simulator posting checkpoints on `ram` until killed.
fn sim(dir: &Path, ram: &Path) -> Proc {
    let ram = ram.to_str().unwrap();
    let p = Proc::spawn(
        "sim-hv",
        dir,
        &[
            "sim-hv",
            "--machine-ram",
            ram,
            "--epochs",
            "100000",
            "--guest-pages",
            "64",
        ],
    );
    let t = Instant::now();
    while !Path::new(ram).exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

#[test]
fn the_file_runs_a_primary_and_flags_beat_it() {
    let d = scratch("run");
    let ram = d.join("m.ram");
    let _sim = sim(&d, &ram);
    // The file alone: the [primary] table's epochs beats the top level's,
    // and `listen` (a backup flag at the top level) is left to the backup.
    std::fs::write(
        d.join("rec.toml"),
        format!(
            "machine-ram = {:?}\nrecord = \"a.xen\"\nepochs = 5\nwait-control = 10\n\
             listen = \"0.0.0.0:7000\"\n[primary]\nepochs = 2\n",
            ram.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = doppel(&["primary", "--config", "rec.toml"], &d);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(epochs_of(&d, "a.xen"), 2, "the [primary] table's epochs");

    // A flag beats its key (--epochs), and a flag drops the keys it
    // conflicts with: --record beats `backup` (the `dest` group) and
    // `compress`, `ack-timeout` (not with --record). With any of them
    // kept, the run would fail (no backup listens on port 9; clap refuses
    // --compress with --record).
    std::fs::write(
        d.join("net.toml"),
        format!(
            "machine-ram = {:?}\nbackup = \"127.0.0.1:9\"\ncompress = true\nack-timeout = 5\n\
             epochs = 5\nwait-control = 10\n",
            ram.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = doppel(
        &[
            "primary",
            "--config=net.toml",
            "--record",
            "b.xen",
            "--epochs",
            "3",
        ],
        &d,
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert_eq!(epochs_of(&d, "b.xen"), 3, "--epochs on the command line");
    assert!(
        t.contains("overridden by the command line: ack-timeout, backup, compress, epochs"),
        "{t}"
    );
}

#[test]
fn without_the_override_the_conflicting_key_is_used() {
    // The same kind of file as above, without --record: the file's
    // `backup` is used (nothing listens there: the connection is refused,
    // exit 3).
    let d = scratch("no-override");
    let ram = d.join("m.ram");
    let _sim = sim(&d, &ram);
    std::fs::write(
        d.join("net.toml"),
        format!(
            "machine-ram = {:?}\nbackup = \"127.0.0.1:9\"\nepochs = 1\nwait-control = 10\n",
            ram.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = doppel(&["primary", "--config", "net.toml"], &d);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(3), "{t}");
    assert!(t.contains("connecting to 127.0.0.1:9"), "{t}");
}

#[test]
fn unknown_keys_are_errors_with_the_closest_key() {
    rejects(
        "primary",
        "machine-ram = \"m\"\nack-timout = 3\n",
        2,
        &["unknown key `ack-timout`", "did you mean `ack-timeout`?"],
    );
    rejects(
        "backup",
        "[backup]\nguest_pages = 4\n",
        2,
        &[
            "unknown key `guest_pages` in [backup]",
            "did you mean `guest-pages`?",
        ],
    );
    let t = rejects(
        "primary",
        "colour = \"blue\"\n",
        2,
        &["unknown key `colour`"],
    );
    assert!(!t.contains("did you mean"), "{t}");
    // `config` and `help` are not keys.
    rejects(
        "primary",
        "config = \"x.toml\"\n",
        2,
        &["unknown key `config`"],
    );
}

#[test]
fn a_key_in_the_wrong_roles_table_is_an_error() {
    rejects(
        "primary",
        "[primary]\nmachine-ram = \"m\"\nstandby-ram = \"s\"\n",
        2,
        &[
            "key `standby-ram` in [primary]",
            "`standby-ram` is a backup flag",
        ],
    );
    rejects(
        "backup",
        "[backup]\nlisten = \"127.0.0.1:0\"\nmachine-ram = \"m\"\n",
        2,
        &["key `machine-ram` in [backup]", "is a primary flag"],
    );
    rejects(
        "primary",
        "[standby]\nx = 1\n",
        2,
        &["unknown table [standby]"],
    );
}

#[test]
fn bad_values_are_reported_with_the_flags_own_reason() {
    for (toml, says) in [
        ("ack-timeout = 0", "0 is not in 1..=604800"),
        ("ack-timeout = -3", "invalid value `-3`"),
        ("epochs = \"five\"", "invalid digit"),
        ("heartbeat-ms = 60001", "60001 is not in 1..=60000"),
        ("witness-ttl = 1", "1 is not in 2..=3600"),
        ("tls-handshake-timeout = 0.0", "out of range"),
        ("witness = \"nohost\"", "invalid value `nohost`"),
    ] {
        let key = toml.split(' ').next().unwrap();
        rejects(
            "primary",
            &format!("machine-ram = \"m\"\n{toml}\n"),
            2,
            &[&format!("key `{key}`"), says],
        );
    }
    // Fractions where the flag takes them.
    let d = scratch("fraction");
    std::fs::write(
        d.join("c.toml"),
        "[backup]\nlisten = \"x\"\nstandby-ram = \"s\"\nserve-clients = \"y\"\nheartbeat-timeout = 0.25\n",
    )
    .unwrap();
    let o = doppel(&["config", "check", "c.toml", "--role", "backup"], &d);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn wrong_types_are_errors_naming_the_key() {
    for (toml, says) in [
        (
            "compress = \"yes\"",
            "`compress` is a switch: give true or false, not a string",
        ),
        ("compress = 1", "give true or false, not a number"),
        ("ack-timeout = true", "takes a value (SECS), not true/false"),
        (
            "backup = [\"a:1\", \"b:2\"]",
            "takes one value (ADDR), not an array",
        ),
        (
            "serve-clients = { host = \"a\" }",
            "takes a value (ADDR), not a table",
        ),
        ("epochs = 1979-05-27", "not a date/time"),
        ("backup = \"\"", "empty value"),
        ("backup = \"  \"", "empty value"),
    ] {
        let key = toml.split(' ').next().unwrap();
        rejects(
            "primary",
            &format!("machine-ram = \"m\"\n{toml}\n"),
            2,
            &[&format!("key `{key}`"), says],
        );
    }
}

#[test]
fn toml_errors_give_the_line_and_column() {
    let t = rejects(
        "primary",
        "machine-ram = \"m\"\nepochs = = 3\n",
        2,
        &["not valid TOML", "line 2"],
    );
    assert!(t.contains("column"), "{t}");
    rejects(
        "backup",
        "listen = \"a:1\"\nlisten = \"b:2\"\n",
        2,
        &["not valid TOML", "line 2", "duplicate key"],
    );
}

#[test]
fn conflicting_keys_in_the_file_are_an_error() {
    rejects(
        "primary",
        "machine-ram = \"m\"\nbackup = \"a:1\"\nrecord = \"r.xen\"\n",
        2,
        &["keys `backup` and `record` cannot be used together"],
    );
    rejects(
        "backup",
        "listen = \"a:1\"\nreplica = \"r\"\nstandby-ram = \"s\"\n",
        2,
        &["keys `replica` and `standby-ram` cannot be used together"],
    );
    // `false` leaves a switch off: no conflict.
    let d = scratch("false-switch");
    std::fs::write(
        d.join("c.toml"),
        "machine-ram = \"m\"\nrecord = \"r.xen\"\ncompress = false\n",
    )
    .unwrap();
    let o = doppel(&["config", "check", "c.toml"], &d);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn an_unreadable_file_is_an_io_error() {
    let d = scratch("missing");
    for args in [
        &["primary", "--config", "nope.toml"][..],
        &["backup", "--config=nope.toml"][..],
        &["config", "check", "nope.toml"][..],
    ] {
        let o = doppel(args, &d);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {t}");
        assert!(t.contains("nope.toml: cannot read the config file"), "{t}");
    }
}

#[test]
fn config_check_checks_each_role_fully() {
    let d = scratch("check");
    // Both roles: their tables.
    std::fs::write(
        d.join("both.toml"),
        "witness = \"127.0.0.1:2379\"\n[primary]\nmachine-ram = \"m\"\nbackup = \"b:1\"\n\
         [backup]\nlisten = \"0.0.0.0:7000\"\nreplica = \"r\"\nguest-pages = 64\n",
    )
    .unwrap();
    let o = doppel(&["config", "check", "both.toml"], &d);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "config: both.toml: primary ok (3 keys)",
            "config: both.toml: backup ok (4 keys)"
        ]
    );
    // A required flag missing: what clap would refuse on a full parse.
    std::fs::write(d.join("half.toml"), "backup = \"b:1\"\nepochs = 3\n").unwrap();
    let o = doppel(&["config", "check", "half.toml"], &d);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(out.contains("config: half.toml: primary: "), "{out}");
    assert!(out.contains("--machine-ram"), "{out}");
    assert!(!out.contains("backup:"), "only the primary's keys: {out}");
    // --role: only that role.
    let o = doppel(&["config", "check", "both.toml", "--role", "backup"], &d);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        out.trim(),
        "config: both.toml: backup ok (4 keys)",
        "{}",
        text(&o)
    );
}

#[test]
fn the_example_config_passes_config_check() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/doppel.example.toml");
    let d = scratch("example");
    let o = doppel(&["config", "check", example.to_str().unwrap()], &d);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(out.contains(" primary ok ("), "{out}");
    assert!(out.contains(" backup ok ("), "{out}");
}

#[test]
fn every_flag_is_a_key_and_help_teaches_the_file() {
    let d = scratch("keys");
    let o = doppel(&["config", "keys"], &d);
    let keys = String::from_utf8_lossy(&o.stdout).to_string();
    for role in ["primary", "backup"] {
        let h = doppel(&[role, "--help"], &d);
        let help = String::from_utf8_lossy(&h.stdout).to_string();
        assert!(help.contains("--config <FILE>"), "{help}");
        assert!(help.contains("doppel config check"), "{help}");
        // Every long flag of --help but --config and --help is a key.
        let mut n = 0;
        // The option lines: `      --flag <VALUE>` (or `-h, --help`).
        for line in help.lines() {
            let Some(rest) = line.trim_start().strip_prefix("--") else {
                continue;
            };
            let flag = rest.split([' ', '=']).next().unwrap();
            if ["config", "help"].contains(&flag) {
                continue;
            }
            n += 1;
            assert!(
                keys.lines()
                    .any(|l| l.starts_with(&format!("{role} {flag} "))),
                "{role} --{flag} is no key:\n{keys}"
            );
        }
        assert!(n > 10, "{role}: {n} flags in --help");
    }
}
