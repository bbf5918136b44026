//! Progress of long transfers (a new backup's epoch 0, the initial sync:
//! every guest page): a progress bar on a terminal (indicatif), and an
//! info line about every five seconds otherwise (logs, systemd, CI).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Transfers smaller than this many pages show nothing (they take no
/// time worth watching).
pub const SHOW_FROM_PAGES: u64 = 16_384;
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// `total` pages of `what` (e.g. "initial sync") are about to go.
    pub fn pages(what: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} pages  {per_sec}  eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(what);
            b
        });
        let now = Instant::now();
        tracing::info!("{what}: {total} pages to send");
        Self {
            what,
            total,
            done: 0,
            bar,
            started: now,
            last_log: now,
        }
    }

    pub fn add(&mut self, pages: u64) {
        self.done = (self.done + pages).min(self.total);
        match &self.bar {
            Some(b) => b.set_position(self.done),
            None if self.last_log.elapsed() >= LOG_EVERY => {
                self.last_log = Instant::now();
                tracing::info!(
                    "{}: {}/{} pages ({:.0} %)",
                    self.what,
                    self.done,
                    self.total,
                    self.done as f64 * 100.0 / self.total.max(1) as f64
                );
            }
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        tracing::info!(
            "{}: {} pages sent in {:.1} s",
            self.what,
            self.done,
            self.started.elapsed().as_secs_f64()
        );
    }
}
