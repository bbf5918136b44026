//! `config` (host only, no emulator): `doppel primary|backup --config FILE`
//! and `doppel config check` (docs/OPERATING.md, "Config file").
//!
//! - Every key: two good files (one role each, since some keys conflict:
//!   `backup`/`record`, `replica`/`standby-ram`) must together hold every
//!   key `doppel config keys` lists for each role (a new flag without a
//!   place here fails the step), and `config check` must accept both.
//! - A real run: `doppel primary --config` from the file alone records
//!   the file's number of epochs from `doppel sim-hv`; with `--epochs` on
//!   the command line it records that many instead (the flag beats the
//!   key).
//! - Bad inputs: each must be refused by `doppel ROLE --config` and by
//!   `doppel config check` with exit 2 (3 for a file that cannot be read)
//!   and a message naming the key (or the file).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::harness::doppel_bin;
use crate::shm::shm_file;

/// Two good files that hold every key of both roles between them. Shared
/// keys at the top level; each role's own in its table.
const GOOD: [(&str, &str); 2] = [
    (
        "good-net.toml",
        r#"witness = "127.0.0.1:2379,127.0.0.1:2479"
witness-key = "doppel/xtask-config"
witness-ttl = 10
tls-cert = "keys/me.crt"
tls-key = "keys/me.key"
peer-cert = "keys/peer.crt"
tls-handshake-timeout = 2.5
wait-control = 60
reply-timeout = 30
serve-clients = "0.0.0.0:7100"
status-socket = "/run/doppel/vm1.sock"
metrics = "127.0.0.1:9700"

[primary]
machine-ram = "/dev/shm/vm1.ram"
backup = "10.0.0.2:7000"
epochs = 10
event-timeout = 120
ack-timeout = 60
compress = true
hello-timeout = 10
heartbeat-ms = 200
net = "tap=tap0,mac=52:54:00:12:34:56"
disk = "/var/lib/doppel/vm1-disk.img"

[backup]
listen = "0.0.0.0:7000"
standby-ram = "/dev/shm/vm1-standby.ram"
net = "tap=tap1,mac=52:54:00:12:34:56"
disk = "/var/lib/doppel/vm1-disk-copy.img"
then-backup = "10.0.0.3:7000"
heartbeat-timeout = 0.5
accept-timeout = 300
no-compress = true
"#,
    ),
    (
        "good-file.toml",
        r#"[primary]
machine-ram = "/dev/shm/vm1.ram"
record = "capture.xen"

[backup]
listen = "0.0.0.0:7000"
replica = "/var/lib/doppel/vm1"
guest-pages = 16384
"#,
    ),
];

/// A bad input: what it is, the role reading it, the file (`None`: no
/// file), the exit code and what the message must name.
struct Bad {
    what: &'static str,
    role: &'static str,
    toml: Option<&'static str>,
    code: i32,
    names: &'static str,
}

const P: &str = "primary";
const B: &str = "backup";

fn bad(
    what: &'static str,
    role: &'static str,
    toml: Option<&'static str>,
    names: &'static str,
) -> Bad {
    let code = if toml.is_some() { 2 } else { 3 };
    Bad {
        what,
        role,
        toml,
        code,
        names,
    }
}

/// The bad inputs; the primary's are added to a good base
/// (`machine-ram`, `record`), the backup's to (`listen`, `replica`,
/// `guest-pages`), so only the bad line can make them fail (a bad value
/// for a base key goes in the role's table, which overrides the base).
fn bad_inputs() -> Vec<Bad> {
    vec![
        bad("unknown key", P, Some("colour = \"blue\""), "`colour`"),
        bad(
            "typo'd key",
            P,
            Some("ack-timout = 3"),
            "did you mean `ack-timeout`",
        ),
        bad(
            "underscore key",
            B,
            Some("accept_timeout = 3"),
            "did you mean `accept-timeout`",
        ),
        bad(
            "switch given a string",
            P,
            Some("compress = \"yes\""),
            "`compress`",
        ),
        bad(
            "switch given a number",
            B,
            Some("no-compress = 1"),
            "`no-compress`",
        ),
        bad("value given a bool", P, Some("epochs = true"), "`epochs`"),
        bad(
            "value given an array",
            P,
            Some("wait-control = [1, 2]"),
            "`wait-control`",
        ),
        bad(
            "value given a table",
            P,
            Some("serve-clients = { port = 7 }"),
            "`serve-clients`",
        ),
        bad(
            "value given a date",
            P,
            Some("epochs = 1979-05-27"),
            "`epochs`",
        ),
        bad(
            "number given words",
            P,
            Some("epochs = \"five\""),
            "`epochs`",
        ),
        bad(
            "out of range",
            P,
            Some("heartbeat-ms = 0"),
            "`heartbeat-ms`",
        ),
        bad(
            "out of range",
            B,
            Some("[backup]\nguest-pages = 0"),
            "`guest-pages`",
        ),
        bad(
            "fraction for whole seconds",
            P,
            Some("reply-timeout = 1.5"),
            "`reply-timeout`",
        ),
        bad(
            "negative seconds",
            B,
            Some("tls-handshake-timeout = -1"),
            "`tls-handshake-timeout`",
        ),
        bad("bad address", P, Some("witness = \"nohost\""), "`witness`"),
        bad(
            "empty value",
            B,
            Some("[backup]\nlisten = \"\""),
            "`listen`",
        ),
        bad(
            "wrong-role table key",
            P,
            Some("[primary]\nstandby-ram = \"s\""),
            "`standby-ram` is a backup flag",
        ),
        bad(
            "unknown table",
            B,
            Some("[standby]\nlisten = \"x\""),
            "[standby]",
        ),
        bad("syntax error", P, Some("epochs = = 3"), "line "),
        bad(
            "duplicate key",
            B,
            Some("guest-pages = 16"),
            "duplicate key",
        ),
        bad(
            "conflicting keys",
            P,
            Some("backup = \"10.0.0.2:7000\""),
            "`backup` and `record`",
        ),
        bad(
            "conflicting keys",
            B,
            Some("standby-ram = \"s\""),
            "`replica` and `standby-ram`",
        ),
        bad("missing file", P, None, "cannot read the config file"),
    ]
}

fn out_text(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(doppel: &Path, dir: &Path, args: &[&str]) -> Result<Output> {
    Command::new(doppel)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .with_context(|| format!("doppel {args:?}"))
}

/// `(role, key)` of every key, from `doppel config keys`.
fn all_keys(doppel: &Path, dir: &Path) -> Result<BTreeSet<(String, String)>> {
    let o = run(doppel, dir, &["config", "keys"])?;
    if !o.status.success() {
        bail!("doppel config keys: {}", out_text(&o));
    }
    let keys: BTreeSet<(String, String)> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect();
    if keys.len() < 20 {
        bail!("doppel config keys listed only {} keys", keys.len());
    }
    Ok(keys)
}

/// `(role, key)` of the keys in one of [`GOOD`] (its own text: top-level
/// keys count for the roles that have them).
fn keys_in(toml: &str, all: &BTreeSet<(String, String)>) -> BTreeSet<(String, String)> {
    let mut table: Option<&str> = None;
    let mut got = BTreeSet::new();
    for line in toml.lines() {
        if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = Some(t);
            continue;
        }
        let Some((k, _)) = line.split_once(" = ") else {
            continue;
        };
        for role in [P, B] {
            let pair = (role.to_string(), k.to_string());
            if table.is_none_or(|t| t == role) && all.contains(&pair) {
                got.insert(pair);
            }
        }
    }
    got
}

/// Epochs of a capture, from `doppel stream verify`.
fn epochs_of(doppel: &Path, dir: &Path, cap: &str) -> Result<u64> {
    let o = run(doppel, dir, &["stream", "verify", cap])?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("valid: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("doppel stream verify {cap}: {}", out_text(&o)))
}

/// The file alone, then a flag overriding one of its keys: (epochs from
/// the file, epochs with `--epochs 2`).
fn real_run(doppel: &Path, dir: &Path) -> Result<(u64, u64)> {
    let ram = shm_file("config");
    let mut sim = crate::harness::spawn_sim_hv(
        doppel,
        &ram.0,
        &["--epochs", "100000", "--guest-pages", "64", "--dirty", "8"],
    )?;
    // One file for both roles: the primary reads its table and the
    // top level, and leaves the backup's keys alone.
    let file = format!(
        "wait-control = 30\n[primary]\nmachine-ram = {:?}\nrecord = \"run.xen\"\nepochs = 3\n\
         [backup]\nlisten = \"127.0.0.1:0\"\nreplica = \"rep\"\nguest-pages = 64\n",
        ram.0.display()
    );
    fs::write(dir.join("run.toml"), file)?;
    let mut got = Vec::new();
    for extra in [&[][..], &["--epochs", "2"][..]] {
        let mut args = vec!["primary", "--config", "run.toml"];
        args.extend_from_slice(extra);
        let o = run(doppel, dir, &args)?;
        if !o.status.success() {
            bail!("doppel {args:?}: {}", out_text(&o));
        }
        got.push(epochs_of(doppel, dir, "run.xen")?);
        println!(
            "config: doppel {} -> {} epochs recorded",
            args.join(" "),
            got[got.len() - 1]
        );
    }
    sim.kill();
    Ok((got[0], got[1]))
}

/// Whether `bad` is refused by both the role and `config check`; the
/// message must name what it names.
fn rejected(doppel: &Path, dir: &Path, i: usize, bad: &Bad) -> Result<bool> {
    let name = format!("bad-{i}.toml");
    if let Some(line) = bad.toml {
        let base = match bad.role {
            P => "machine-ram = \"m.ram\"\nrecord = \"r.xen\"\n",
            _ => "listen = \"127.0.0.1:0\"\nreplica = \"rep\"\nguest-pages = 16\n",
        };
        // Tables go after the base's top-level keys.
        fs::write(dir.join(&name), format!("{base}{line}\n"))?;
    }
    // Should a bad file be taken, the run ends quickly on its own.
    let quick = match bad.role {
        P => "--wait-control=1",
        _ => "--accept-timeout=1",
    };
    let runs = [
        vec![bad.role, "--config", &name, quick],
        vec!["config", "check", &name, "--role", bad.role],
    ];
    let mut ok = true;
    for args in runs {
        let o = run(doppel, dir, &args)?;
        let t = out_text(&o);
        let named = t.contains(bad.names) && t.contains(&name);
        if o.status.code() != Some(bad.code) || !named {
            println!(
                "config: bad input {} ({}) NOT rejected as expected (exit {} with {:?}): {t}",
                i, bad.what, bad.code, bad.names
            );
            ok = false;
        }
    }
    Ok(ok)
}

pub fn step_config(_: &mut Ctx) -> Result<String> {
    let doppel = doppel_bin()?;
    let dir = crate::out_dir().join("config");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;

    let all = all_keys(&doppel, &dir)?;
    let mut covered = BTreeSet::new();
    for (name, toml) in GOOD {
        fs::write(dir.join(name), toml)?;
        let o = run(&doppel, &dir, &["config", "check", name])?;
        let t = out_text(&o);
        let oks = [P, B]
            .iter()
            .filter(|r| t.contains(&format!("config: {name}: {r} ok (")))
            .count();
        if !o.status.success() || oks != 2 {
            bail!("doppel config check {name} refused a good file: {t}");
        }
        covered.extend(keys_in(toml, &all));
    }
    let missing: Vec<String> = all
        .difference(&covered)
        .map(|(r, k)| format!("{r} {k}"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "keys in no good config (add them to GOOD in tools/xtask/src/config.rs): {}",
            missing.join(", ")
        );
    }
    let keys: BTreeSet<&str> = covered.iter().map(|(_, k)| k.as_str()).collect();
    println!(
        "config: {} keys of primary and backup ({} distinct) accepted by config check",
        covered.len(),
        keys.len()
    );

    let (from_file, overridden) = real_run(&doppel, &dir)?;
    if (from_file, overridden) != (3, 2) {
        bail!("epochs recorded: {from_file} from the file (want 3), {overridden} with --epochs 2 (want 2)");
    }

    let bads = bad_inputs();
    let mut all_rejected = true;
    for (i, b) in bads.iter().enumerate() {
        all_rejected &= rejected(&doppel, &dir, i, b)?;
    }
    let line = format!(
        "config: keys={} bad_inputs={} all_rejected={all_rejected} result={}",
        keys.len(),
        bads.len(),
        if all_rejected { "pass" } else { "fail" }
    );
    if !all_rejected {
        bail!("{line}");
    }
    Ok(line)
}
