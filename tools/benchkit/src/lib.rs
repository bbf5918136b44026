//! The ratios `cargo bench` prints after criterion's own output.
//!
//! Criterion times each function for a few seconds, one after another. On
//! this project's VM the speed of memory access changes in phases that
//! last seconds to minutes (docs/perf/dirtylog.md, docs/perf/ring.md), so
//! a ratio of two criterion medians taken seconds apart mixes phases. Here
//! the case and its baseline run in alternating blocks of a few
//! milliseconds each, many times, so both see the same phases; the ratio
//! is the ratio of the two medians over all blocks. The spread of the
//! per-round ratios (p10-p90) and how many rounds met the target show how
//! much the phases moved it.
//!
//! The pass runs only under `cargo bench` (the harness gets `--bench`),
//! not when `cargo test` runs the bench targets once, nor with criterion's
//! `--list`, `--test` or `--profile-time`. With a criterion filter
//! (`cargo bench -- FILTER`, a regex, or the whole name with `--exact`) a
//! ratio runs only if its name matches; `cargo bench -- ratio` runs the
//! ratios alone. Criterion's timing options (`--quick`,
//! `--measurement-time`, ...) do not change the pass: each bench sets its
//! own rounds and block size.

use std::fmt::Write as _;
use std::time::Duration;

/// Whether the ratio named `name` should run, from this process's
/// arguments (see the module docs).
pub fn wanted(name: &str) -> bool {
    wanted_with(std::env::args().skip(1), name)
}

fn wanted_with(args: impl Iterator<Item = String>, name: &str) -> bool {
    let mut bench = false;
    let mut exact = false;
    let mut filter = None;
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        match a.as_str() {
            "--bench" => bench = true,
            "--exact" => exact = true,
            // Criterion lists, tests or profiles instead of measuring.
            "--list" | "--test" | "--profile-time" | "--ignored" => return false,
            // Criterion's options that take a value as the next argument.
            "-s"
            | "-b"
            | "-c"
            | "--warm-up-time"
            | "--measurement-time"
            | "--sample-size"
            | "--save-baseline"
            | "--baseline"
            | "--baseline-lenient"
            | "--load-baseline"
            | "--color"
            | "--format"
            | "--output-format"
            | "--plotting-backend"
            | "--nresamples"
            | "--noise-threshold"
            | "--confidence-level"
            | "--significance-level" => skip_value = true,
            _ if a.starts_with("--profile-time=") => return false,
            _ if a.starts_with('-') => {}
            _ if filter.is_none() => filter = Some(a),
            _ => {}
        }
    }
    bench && filter.is_none_or(|f| f == "ratio" || matches(&f, name, exact))
}

/// Criterion's filter rule: the whole name under `--exact`, else a regex
/// search (a filter that is no regex is searched for as text).
fn matches(filter: &str, name: &str, exact: bool) -> bool {
    if exact {
        return filter == name;
    }
    match regex::Regex::new(filter) {
        Ok(re) => re.is_match(name),
        Err(_) => name.contains(filter),
    }
}

/// How a ratio is shown, and its target if it has one.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// `case / baseline` time; target: at most this.
    Ratio(Option<f64>),
    /// `baseline / case` time (the case's speed-up); target: at least this.
    Speedup(Option<f64>),
}

/// Times `case` and `baseline` in `rounds` rounds of `block` calls each,
/// the two alternating (and which goes first alternating too). Each call
/// returns the time of its own timed part, so untimed set-up stays out.
pub fn interleave(
    rounds: usize,
    block: usize,
    mut case: impl FnMut() -> Duration,
    mut baseline: impl FnMut() -> Duration,
) -> Samples {
    assert!(rounds > 0 && block > 0, "rounds and block must be non-zero");
    let mut s = Samples {
        block,
        case: Vec::with_capacity(rounds * block),
        baseline: Vec::with_capacity(rounds * block),
    };
    for r in 0..rounds {
        for first in [r % 2 == 0, r % 2 != 0] {
            for _ in 0..block {
                if first {
                    s.case.push(case());
                } else {
                    s.baseline.push(baseline());
                }
            }
        }
    }
    s
}

/// The times of one interleaved run, in call order.
#[derive(Clone, Debug)]
pub struct Samples {
    block: usize,
    case: Vec<Duration>,
    baseline: Vec<Duration>,
}

/// What a [`Samples`] comes to.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub case_median: Duration,
    pub baseline_median: Duration,
    /// `case_median / baseline_median`.
    pub ratio: f64,
    /// 10th and 90th percentile of the per-round ratios (each round's
    /// case median over its baseline median).
    pub round_p10: f64,
    pub round_p90: f64,
    pub rounds: usize,
    /// Every round's ratio (case over baseline), in round order.
    pub round_ratios: Vec<f64>,
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

impl Samples {
    /// The per-round ratios, case over baseline.
    pub fn round_ratios(&self) -> Vec<f64> {
        self.case
            .chunks(self.block)
            .zip(self.baseline.chunks(self.block))
            .map(|(c, b)| ratio(median(c), median(b)))
            .collect()
    }

    pub fn summary(&self) -> Summary {
        let (c, b) = (median(&self.case), median(&self.baseline));
        let round_ratios = self.round_ratios();
        let mut rounds = round_ratios.clone();
        rounds.sort_unstable_by(f64::total_cmp);
        Summary {
            case_median: c,
            baseline_median: b,
            ratio: ratio(c, b),
            round_p10: quantile(&rounds, 0.1),
            round_p90: quantile(&rounds, 0.9),
            rounds: rounds.len(),
            round_ratios,
        }
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} us")
    }
}

/// The line for one ratio: `ratio NAME: CASE / BASELINE = R` (or the
/// speed-up `BASELINE / CASE` for a [`Goal::Speedup`]), the spread over
/// rounds, both medians and, with a target, whether it was met.
pub fn line(name: &str, case: &str, baseline: &str, s: &Summary, goal: Goal) -> String {
    let speedup = matches!(goal, Goal::Speedup(_));
    let (r, lo, hi) = if speedup {
        (1.0 / s.ratio, 1.0 / s.round_p90, 1.0 / s.round_p10)
    } else {
        (s.ratio, s.round_p10, s.round_p90)
    };
    let mut out = if speedup {
        format!("ratio {name}: {baseline} / {case} = {r:.3}x")
    } else {
        format!("ratio {name}: {case} / {baseline} = {r:.3}x")
    };
    let _ = write!(
        out,
        " (rounds p10-p90 {lo:.3}x-{hi:.3}x over {}; {case} {}, {baseline} {})",
        s.rounds,
        dur(s.case_median),
        dur(s.baseline_median)
    );
    let target = match goal {
        Goal::Ratio(t) => t.map(|x| (x, format!("<= {x}x"))),
        Goal::Speedup(t) => t.map(|x| (x, format!(">= {x}x"))),
    };
    if let Some((x, want)) = target {
        // Judged on each figure as printed (3 decimals).
        let meets = |case_over_baseline: f64| {
            let v = if speedup {
                1.0 / case_over_baseline
            } else {
                case_over_baseline
            };
            let v = (v * 1000.0).round() / 1000.0;
            if speedup {
                v >= x
            } else {
                v <= x
            }
        };
        let met_rounds = s.round_ratios.iter().filter(|&&q| meets(q)).count();
        let _ = write!(
            out,
            "; target {want}: {} (met in {met_rounds} of {} rounds)",
            if meets(s.ratio) { "met" } else { "NOT met" },
            s.round_ratios.len()
        );
    }
    out
}

/// Runs [`interleave`] and prints [`line`] if [`wanted`]`(name)`.
pub fn report(
    name: &str,
    (case, baseline): (&str, &str),
    goal: Goal,
    (rounds, block): (usize, usize),
    run_case: impl FnMut() -> Duration,
    run_baseline: impl FnMut() -> Duration,
) -> Option<Summary> {
    if !wanted(name) {
        return None;
    }
    let s = interleave(rounds, block, run_case, run_baseline).summary();
    println!("{}", line(name, case, baseline, &s, goal));
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> impl Iterator<Item = String> {
        a.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn runs_only_under_cargo_bench_and_its_filter() {
        assert!(wanted_with(args(&["--bench"]), "clean_0.1%"));
        assert!(!wanted_with(args(&[]), "clean_0.1%"), "cargo test mode");
        assert!(wanted_with(args(&["--bench", "clean"]), "clean_0.1%"));
        assert!(wanted_with(args(&["--bench", "ratio"]), "clean_0.1%"));
        assert!(!wanted_with(args(&["--bench", "ring"]), "clean_0.1%"));
        // An option's value is not a filter.
        assert!(wanted_with(
            args(&["--bench", "--measurement-time", "3", "clean"]),
            "clean_0.1%"
        ));
        assert!(wanted_with(
            args(&["--measurement-time", "3", "--bench"]),
            "x"
        ));
        // Short options and --format take values too.
        for opt in ["-s", "-b", "-c", "--format", "--baseline-lenient"] {
            assert!(
                wanted_with(args(&["--bench", opt, "v", "clean"]), "clean_0.1%"),
                "{opt}"
            );
        }
        // Listing, testing, profiling: criterion does not measure.
        for opt in ["--list", "--test", "--ignored"] {
            assert!(!wanted_with(args(&["--bench", opt]), "clean_0.1%"), "{opt}");
        }
        assert!(!wanted_with(
            args(&["--bench", "--profile-time", "5"]),
            "clean_0.1%"
        ));
        assert!(!wanted_with(args(&["--bench", "--profile-time=5"]), "x"));
        // Filters are regexes, or whole names with --exact; a filter that
        // happens to be part of "ratio" does not select every ratio.
        assert!(wanted_with(
            args(&["--bench", "^clean_.*/scan$"]),
            "clean_0.1%/scan"
        ));
        assert!(!wanted_with(args(&["--bench", "^ring"]), "clean_0.1%/scan"));
        assert!(!wanted_with(args(&["--bench", "tio"]), "clean_0.1%/scan"));
        assert!(wanted_with(args(&["--bench", "(unclosed"]), "x(unclosed"));
        assert!(wanted_with(
            args(&["--bench", "--exact", "clean_0.1%/scan"]),
            "clean_0.1%/scan"
        ));
        assert!(!wanted_with(
            args(&["--bench", "--exact", "clean_0.1%"]),
            "clean_0.1%/scan"
        ));
    }

    #[test]
    fn blocks_alternate_and_the_ratio_is_of_medians() {
        let order = std::cell::RefCell::new(Vec::new());
        let s = interleave(
            3,
            2,
            || {
                order.borrow_mut().push('c');
                Duration::from_micros(10)
            },
            || {
                order.borrow_mut().push('b');
                Duration::from_micros(40)
            },
        );
        assert_eq!(
            order.into_inner().iter().collect::<String>(),
            "ccbbbbccccbb"
        );
        let m = s.summary();
        assert_eq!(m.case_median, Duration::from_micros(10));
        assert_eq!(m.baseline_median, Duration::from_micros(40));
        assert_eq!(
            (m.ratio, m.round_p10, m.round_p90, m.rounds),
            (0.25, 0.25, 0.25, 3)
        );
    }

    #[test]
    fn medians_of_even_counts_take_the_middle_two() {
        let us = Duration::from_micros;
        assert_eq!(median(&[us(3), us(1), us(2)]), us(2));
        assert_eq!(median(&[us(40), us(10)]), us(25));
        assert_eq!(
            median(&[us(4), us(1), us(3), us(2)]),
            Duration::from_nanos(2500)
        );
    }

    #[test]
    fn round_ratios_show_a_phase_change() {
        // The case is slow in the second half: the median ratio stays at
        // the usual value, the spread shows the slow rounds.
        let mut n = 0;
        let s = interleave(
            10,
            1,
            || {
                n += 1;
                Duration::from_micros(if n > 5 { 30 } else { 10 })
            },
            || Duration::from_micros(100),
        )
        .summary();
        assert_eq!(s.round_p10, 0.1);
        assert_eq!(s.round_p90, 0.3);
    }

    #[test]
    fn lines_say_whether_the_target_was_met() {
        let s = Summary {
            case_median: Duration::from_micros(50),
            baseline_median: Duration::from_micros(400),
            ratio: 0.125,
            round_p10: 0.1,
            round_p90: 0.2,
            rounds: 4,
            round_ratios: vec![0.1, 0.1004, 0.2, 0.15],
        };
        assert_eq!(
            line("clean_0.1%", "tree", "scan", &s, Goal::Ratio(Some(0.1))),
            "ratio clean_0.1%: tree / scan = 0.125x (rounds p10-p90 0.100x-0.200x over 4; \
             tree 50.0 us, scan 400.0 us); target <= 0.1x: NOT met (met in 2 of 4 rounds)"
        );
        assert_eq!(
            line("ring", "ring", "mpsc", &s, Goal::Speedup(Some(2.0))),
            "ratio ring: mpsc / ring = 8.000x (rounds p10-p90 5.000x-10.000x over 4; \
             ring 50.0 us, mpsc 400.0 us); target >= 2x: met (met in 4 of 4 rounds)"
        );
        assert!(line("x", "a", "b", &s, Goal::Ratio(None)).ends_with("b 400.0 us)"));
        assert!(line("x", "a", "b", &s, Goal::Speedup(None)).starts_with("ratio x: b / a = 8.000x"));
        // Judged as printed: 0.1004 shows as 0.100x, which meets <= 0.1x.
        let edge = Summary {
            ratio: 0.1004,
            ..s.clone()
        };
        assert!(line("e", "a", "b", &edge, Goal::Ratio(Some(0.1))).contains("0.100x (rounds"));
        assert!(line("e", "a", "b", &edge, Goal::Ratio(Some(0.1))).contains(": met (met in 2 of 4"));
    }
}
