//! `doppel primary|backup --config FILE`, `doppel config check` and the
//! hidden `doppel config keys` (docs/OPERATING.md, "Config file").
//!
//! The file is read before clap parses the command line: each key the
//! role reads becomes one `--key=value` argument placed in front of the
//! user's own, so clap still parses every value (each flag keeps exactly
//! one parser) and checks requirements and conflicts as it always does.
//! Before that, every value is checked here with the flag's own value
//! parser, so a bad value is reported against the file and the key, not
//! against a flag nobody typed.
//!
//! Keys are the subcommand's long flags without the dashes. Top-level keys
//! serve whichever role reads the file (a top-level key only the other
//! role has is left to it); a `[primary]` or `[backup]` table holds keys
//! for that role only and overrides the top level. A flag on the command
//! line drops the file's key of the same flag and every key it conflicts
//! with (clap's conflicts and one-of groups: `--record` drops `backup`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Args, Command, Subcommand};
use toml::{Table, Value};

use crate::exit::{IO, USAGE};

/// The subcommands that read a config file.
pub const ROLES: [&str; 2] = ["primary", "backup"];

/// `--config FILE` of `primary` and `backup`. Clap only accepts it (and
/// shows its help): the file was already read by [`expand`].
#[derive(Args, Debug)]
#[allow(dead_code)] // the value is used from argv, before clap parses
pub struct ConfigArg {
    /// Read flags from this TOML file. Each key is a flag's long name
    /// without the dashes, e.g. `machine-ram = "/dev/shm/vm.ram"`,
    /// `ack-timeout = 30`, `compress = true` (`false` leaves a switch
    /// off). Top-level keys serve both roles; a `[primary]` or `[backup]`
    /// table holds keys for that role only and overrides the top level.
    /// Flags on the command line override the file: a flag drops its own
    /// key and the keys it conflicts with (`--record` drops `backup`).
    /// Unknown keys and bad values are errors naming the key (exit 2).
    /// Relative paths are taken from the working directory. Check a file
    /// with `doppel config check FILE`; docs/doppel.example.toml is an
    /// example.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `doppel config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Check a config file, one line per role.
    ///
    /// The checks of `doppel primary|backup --config FILE` (key names,
    /// value types, each value with its flag's parser), then a full parse
    /// of the role's flags from the file alone
    /// (required flags present, no conflicting keys). Prints one line per
    /// role: `config: FILE: primary ok (N keys)` or its errors. Exit 0
    /// when every checked role is ok, 2 otherwise, 3 if the file cannot be
    /// read.
    #[command(
        after_help = "Without --role: the roles the file is for (a role with a [primary] /
[backup] table, or a top-level key only that role has; both when every
key is shared).

Examples:
  doppel config check /etc/doppel/vm1.toml
  doppel config check /etc/doppel/vm1.toml --role backup"
    )]
    Check {
        /// The config file.
        file: PathBuf,
        /// Check this role only.
        #[arg(long, value_parser = ROLES)]
        role: Option<String>,
    },
    /// List every key: `ROLE KEY switch|value|values VALUE_NAME`.
    #[command(hide = true)]
    Keys,
}

/// Run `doppel config ...`; returns the exit code.
pub fn run(root: Command, cmd: ConfigCmd) -> u8 {
    let mut root = root;
    root.build();
    match cmd {
        ConfigCmd::Check { file, role } => check(&root, &file, role.as_deref()),
        ConfigCmd::Keys => {
            for role in ROLES {
                for k in keys(role_cmd(&root, role)) {
                    let vn = k.arg.get_value_names().and_then(|v| v.first());
                    let vn = match (k.kind, vn) {
                        (Kind::Value | Kind::Values, Some(v)) => v.to_string(),
                        _ => "-".to_string(),
                    };
                    println!("{role} {} {} {vn}", k.name, k.kind.word());
                }
            }
            0
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A flag without a value (`true` adds it, `false` leaves it off).
    Switch,
    /// One value.
    Value,
    /// Several values (a TOML array, or one scalar).
    Values,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Switch => "switch",
            Kind::Value => "value",
            Kind::Values => "values",
        }
    }
}

#[derive(Clone, Copy)]
struct Key<'c> {
    name: &'c str,
    arg: &'c Arg,
    kind: Kind,
}

/// The keys of a role: its long flags but `--config` (and `--help`).
fn keys(cmd: &Command) -> Vec<Key<'_>> {
    cmd.get_arguments()
        .filter_map(|arg| {
            let name = arg.get_long()?;
            if name == "config" || arg.is_positional() {
                return None;
            }
            let kind = match arg.get_action() {
                ArgAction::SetTrue => Kind::Switch,
                ArgAction::Append => Kind::Values,
                a if a.takes_values() => {
                    if arg.get_num_args().is_some_and(|r| r.max_values() > 1) {
                        Kind::Values
                    } else {
                        Kind::Value
                    }
                }
                // --help, --version
                _ => return None,
            };
            Some(Key { name, arg, kind })
        })
        .collect()
}

fn find<'c>(keys: &[Key<'c>], name: &str) -> Option<Key<'c>> {
    keys.iter().find(|k| k.name == name).copied()
}

fn role_cmd<'c>(root: &'c Command, role: &str) -> &'c Command {
    root.find_subcommand(role)
        .unwrap_or_else(|| unreachable!("`{role}` is a subcommand of doppel"))
}

fn other(role: &str) -> &'static str {
    if role == "primary" {
        "backup"
    } else {
        "primary"
    }
}

fn load(file: &Path) -> Result<Table, (String, u8)> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        (
            format!("{}: cannot read the config file: {e}", file.display()),
            IO,
        )
    })?;
    text.parse::<Table>().map_err(|e| {
        let msg = e.to_string();
        (
            format!("{}: not valid TOML: {}", file.display(), msg.trim_end()),
            USAGE,
        )
    })
}

/// One key a role reads from the file, as the arguments it becomes.
struct Entry<'c> {
    key: Key<'c>,
    args: Vec<OsString>,
}

/// The keys of `table` that `role` reads, each checked (name, type, value
/// by the flag's parser). Errors are without the file name.
fn resolve<'c>(
    table: &Table,
    root: &'c Command,
    role: &str,
) -> Result<Vec<Entry<'c>>, Vec<String>> {
    let cmd = role_cmd(root, role);
    let mine = keys(cmd);
    let theirs = keys(role_cmd(root, other(role)));
    let mut errs = Vec::new();
    // name -> (key, value, where it came from)
    let mut chosen: BTreeMap<&str, (Key<'c>, &Value, String)> = BTreeMap::new();
    for (k, v) in table {
        if ROLES.contains(&k.as_str()) && v.is_table() {
            continue;
        }
        if let Some(key) = find(&mine, k) {
            chosen.insert(key.name, (key, v, String::new()));
        } else if find(&theirs, k).is_some() {
            // The other role's flag: not for this role.
        } else if v.is_table() {
            errs.push(format!(
                "unknown table [{k}] (the tables are [primary] and [backup])"
            ));
        } else {
            errs.push(unknown(k, "", &mine, &theirs));
        }
    }
    if let Some(Value::Table(t)) = table.get(role) {
        for (k, v) in t {
            let at = format!(" in [{role}]");
            if let Some(key) = find(&mine, k) {
                chosen.insert(key.name, (key, v, at));
            } else if find(&theirs, k).is_some() {
                let them = other(role);
                errs.push(format!(
                    "key `{k}`{at}: `{k}` is a {them} flag, not a {role} flag (move it to [{them}])"
                ));
            } else {
                errs.push(unknown(k, &at, &mine, &theirs));
            }
        }
    }
    let mut out = Vec::new();
    for (key, v, at) in chosen.into_values() {
        match key_args(key, v) {
            Ok(args) => out.push(Entry { key, args }),
            Err(e) => errs.push(format!("key `{}`{at}: {e}", key.name)),
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

fn unknown(k: &str, at: &str, mine: &[Key], theirs: &[Key]) -> String {
    let best = mine
        .iter()
        .chain(theirs)
        .map(|c| (edit_distance(k, c.name), c.name))
        .min();
    match best {
        Some((d, name)) if d <= (k.len() / 3).max(1) => {
            format!("unknown key `{k}`{at} (did you mean `{name}`?)")
        }
        _ => format!("unknown key `{k}`{at} (`doppel primary --help` and `doppel backup --help` list the flags; a key is a flag without its dashes)"),
    }
}

/// Levenshtein distance (insert, delete, substitute a character).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = diag + usize::from(ca != cb);
            diag = row[j + 1];
            row[j + 1] = sub.min(row[j] + 1).min(diag + 1);
        }
    }
    row[b.len()]
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "a number",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "true/false",
        Value::Datetime(_) => "a date/time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// The arguments one key becomes, its values checked by the flag's parser.
fn key_args(key: Key, v: &Value) -> Result<Vec<OsString>, String> {
    let name = key.name;
    if key.kind == Kind::Switch {
        return match v {
            Value::Boolean(true) => Ok(vec![format!("--{name}").into()]),
            Value::Boolean(false) => Ok(Vec::new()),
            v => Err(format!(
                "`{name}` is a switch: give true or false, not {}",
                describe(v)
            )),
        };
    }
    let vn = key
        .arg
        .get_value_names()
        .and_then(|v| v.first())
        .map_or("value".to_string(), |s| s.to_string());
    let items: Vec<&Value> = match v {
        Value::Array(a) if key.kind == Kind::Values => a.iter().collect(),
        Value::Array(_) => return Err(format!("takes one value ({vn}), not an array")),
        v => vec![v],
    };
    let mut out = Vec::new();
    for item in items {
        let s = match item {
            Value::String(s) if s.trim().is_empty() => {
                return Err(format!(
                    "empty value: give a {vn}, or remove the key (the flag's default applies)"
                ))
            }
            Value::String(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            other => return Err(format!("takes a value ({vn}), not {}", describe(other))),
        };
        check_value(key, &s).map_err(|why| format!("invalid value `{s}`: {why}"))?;
        out.push(format!("--{name}={s}").into());
    }
    Ok(out)
}

/// Parse `value` with the flag's own value parser (on a command holding
/// only that parser); the error is clap's reason.
fn check_value(key: Key, value: &str) -> Result<(), String> {
    let action = if key.kind == Kind::Values {
        ArgAction::Append
    } else {
        ArgAction::Set
    };
    // A positional: the reason reads "for '<SECS>'", naming no flag.
    let mut probe = Arg::new(key.arg.get_id().clone())
        .action(action)
        .allow_hyphen_values(true)
        .value_parser(key.arg.get_value_parser().clone());
    if let Some(vn) = key.arg.get_value_names() {
        probe = probe.value_names(vn.iter().cloned());
    }
    let cmd = Command::new("doppel")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(probe);
    cmd.try_get_matches_from([value])
        .map(|_| ())
        .map_err(|e| match std::error::Error::source(&e) {
            Some(src) => src.to_string(),
            None => clap_reason(&e),
        })
}

/// A clap error as one line: its text up to the first blank line, without
/// the `error: ` prefix.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    lines.join(" ").trim_start_matches("error: ").to_string()
}

/// Whether `a` and `b` cannot be given together: clap's conflicts (either
/// way) or two members of a one-of group.
fn conflict(cmd: &Command, a: &Arg, b: &Arg) -> bool {
    let names = |x: &Arg, y: &Arg| {
        cmd.get_arg_conflicts_with(x)
            .iter()
            .any(|c| c.get_id() == y.get_id())
    };
    names(a, b)
        || names(b, a)
        || cmd.get_groups().any(|g| {
            let mut g = g.clone();
            let ids: Vec<_> = g.get_args().cloned().collect();
            !g.is_multiple() && ids.contains(a.get_id()) && ids.contains(b.get_id())
        })
}

/// Two keys of the file that clap would refuse together.
fn conflicts_in(cmd: &Command, entries: &[Entry]) -> Result<(), Vec<String>> {
    let on: Vec<&Entry> = entries.iter().filter(|e| !e.args.is_empty()).collect();
    let mut errs = Vec::new();
    for (i, a) in on.iter().enumerate() {
        for b in &on[i + 1..] {
            if conflict(cmd, a.key.arg, b.key.arg) {
                errs.push(format!(
                    "keys `{}` and `{}` cannot be used together (give one of them)",
                    a.key.name, b.key.name
                ));
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// The `--config` file in the arguments after the subcommand.
fn config_path(rest: &[OsString]) -> Option<PathBuf> {
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            return None;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(f) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(f));
        }
    }
    None
}

/// The flags given on the command line (long names; `--` ends them).
fn given<'c>(cmd: &'c Command, rest: &[OsString]) -> Vec<&'c Arg> {
    rest.iter()
        .map(|a| a.to_string_lossy())
        .take_while(|s| s != "--")
        .filter_map(|s| {
            let name = s.strip_prefix("--")?.split('=').next()?.to_string();
            cmd.get_arguments().find(|a| a.get_long() == Some(&name))
        })
        .collect()
}

/// `doppel primary|backup ... --config FILE ...`: the arguments with the
/// file's keys in front of the user's own (the same arguments without
/// `--config`). Errors name the file and the key; exit code 2, or 3 when
/// the file cannot be read.
pub fn expand(root: Command, argv: Vec<OsString>) -> Result<Vec<OsString>, (String, u8)> {
    let Some(role) = argv.get(1).and_then(|s| s.to_str()) else {
        return Ok(argv);
    };
    let Some(role) = ROLES.iter().copied().find(|r| *r == role) else {
        return Ok(argv);
    };
    let Some(file) = config_path(&argv[2..]) else {
        return Ok(argv);
    };
    let f = file.display();
    let mut root = root;
    root.build();
    let cmd = role_cmd(&root, role);
    let table = load(&file)?;
    let fail = |errs: Vec<String>| {
        let lines: Vec<String> = errs.iter().map(|e| format!("{f}: {e}")).collect();
        (lines.join("\ndoppel: "), USAGE)
    };
    let entries = resolve(&table, &root, role).map_err(fail)?;
    let given = given(cmd, &argv[2..]);
    let (kept, dropped): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| {
        !given
            .iter()
            .any(|g| g.get_id() == e.key.arg.get_id() || conflict(cmd, g, e.key.arg))
    });
    conflicts_in(cmd, &kept).map_err(fail)?;
    let names = |v: &[Entry]| v.iter().map(|e| e.key.name).collect::<Vec<_>>().join(", ");
    if dropped.is_empty() {
        tracing::info!("{f}: {} keys for {role}: {}", kept.len(), names(&kept));
    } else {
        tracing::info!(
            "{f}: {} keys for {role}: {}; overridden by the command line: {}",
            kept.len(),
            names(&kept),
            names(&dropped)
        );
    }
    let mut out: Vec<OsString> = argv[..2].to_vec();
    out.extend(kept.into_iter().flat_map(|e| e.args));
    out.extend(argv[2..].iter().cloned());
    Ok(out)
}

/// The roles `config check` checks without `--role`.
fn roles_of(table: &Table, root: &Command) -> Vec<&'static str> {
    let has = |role: &str| {
        let mine = keys(role_cmd(root, role));
        let theirs = keys(role_cmd(root, other(role)));
        table.get(role).is_some_and(Value::is_table)
            || table.iter().any(|(k, v)| {
                !(ROLES.contains(&k.as_str()) && v.is_table())
                    && find(&mine, k).is_some()
                    && find(&theirs, k).is_none()
            })
    };
    let v: Vec<&'static str> = ROLES.iter().copied().filter(|r| has(r)).collect();
    if v.is_empty() {
        ROLES.to_vec()
    } else {
        v
    }
}

fn check_role(root: &Command, table: &Table, role: &str) -> Result<usize, Vec<String>> {
    let entries = resolve(table, root, role)?;
    conflicts_in(role_cmd(root, role), &entries)?;
    let mut args: Vec<OsString> = vec!["doppel".into(), role.into()];
    args.extend(entries.iter().flat_map(|e| e.args.iter().cloned()));
    root.clone()
        .try_get_matches_from(args)
        .map_err(|e| vec![clap_reason(&e)])?;
    Ok(entries.len())
}

fn check(root: &Command, file: &Path, role: Option<&str>) -> u8 {
    let f = file.display();
    let table = match load(file) {
        Ok(t) => t,
        Err((m, code)) => {
            println!("config: {m}");
            return code;
        }
    };
    let roles = match role {
        Some(r) => ROLES.iter().copied().filter(|x| *x == r).collect(),
        None => roles_of(&table, root),
    };
    let mut code = 0;
    for role in roles {
        match check_role(root, &table, role) {
            Ok(n) => println!("config: {f}: {role} ok ({n} keys)"),
            Err(errs) => {
                for e in errs {
                    println!("config: {f}: {role}: {e}");
                }
                code = USAGE;
            }
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("ack-timout", "ack-timeout"), 1);
        assert_eq!(edit_distance("machine_ram", "machine-ram"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
