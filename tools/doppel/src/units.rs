//! The limits of the command's flags and the value parsers that hold
//! them (shared by every subcommand's arguments, the TLS ones too).

use std::time::Duration;

/// Longest timeout any flag takes: one week.
pub const MAX_SECS: u64 = 7 * 24 * 3600;

/// Largest guest a replica may have (`--guest-pages`): 2^32 pages, 16 TiB.
pub const MAX_GUEST_PAGES: u64 = 1 << 32;

/// Most requests one `client` run sends (the workload and its expected
/// answers are held in memory, 48 bytes per request).
pub const MAX_OPS: u64 = 1_000_000;

/// A timeout in seconds (fractions allowed): finite, at least 1 ms, at most
/// [`MAX_SECS`].
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v.is_finite() && (0.001..=MAX_SECS as f64).contains(&v)) {
        return Err(format!(
            "{s} s is out of range: give a finite number of seconds from 0.001 to {MAX_SECS}"
        ));
    }
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s} s: {e}"))
}

/// Whole seconds for a timeout flag: 1 to [`MAX_SECS`].
pub(crate) fn secs_u64() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=MAX_SECS)
}

/// A guest size in pages: 1 to [`MAX_GUEST_PAGES`].
pub fn guest_pages_parser() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=MAX_GUEST_PAGES)
}
