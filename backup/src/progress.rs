//! Progress reporting: a bar on a terminal, plain lines otherwise (every
//! 10 % and at the end), nothing when quiet. Everything goes to stderr; the
//! one-line summaries of the commands go to stdout.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar if stderr is a terminal, else log lines.
    #[default]
    Auto,
    /// Log lines.
    Lines,
    /// Nothing.
    Quiet,
}

pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    chunks: AtomicU64,
    start: Instant,
    bar: Option<ProgressBar>,
    lines: bool,
    /// Next tenth (1..=10) to log at.
    next_tenth: AtomicU64,
}

impl Progress {
    /// `total` bytes of work called `label` (e.g. "full vol@s1").
    pub fn new(mode: ProgressMode, label: impl Into<String>, total: u64) -> Progress {
        let label = label.into();
        let tty = std::io::stderr().is_terminal();
        let (bar, lines) = match mode {
            ProgressMode::Quiet => (None, false),
            ProgressMode::Lines => (None, true),
            ProgressMode::Auto if tty => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template(
                    "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_message(label.clone());
                bar.enable_steady_tick(Duration::from_millis(200));
                (Some(bar), false)
            }
            ProgressMode::Auto => (None, true),
        };
        Progress {
            label,
            total,
            done: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            start: Instant::now(),
            bar,
            lines,
            next_tenth: AtomicU64::new(1),
        }
    }

    /// `bytes` more of the total are done, `chunks` of them chunks handled.
    pub fn add(&self, bytes: u64, chunks: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.chunks.fetch_add(chunks, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
        if self.lines && self.total > 0 {
            let tenth = (done.saturating_mul(10) / self.total).min(10);
            let next = self.next_tenth.load(Ordering::Relaxed);
            if tenth >= next
                && tenth < 10
                && self.next_tenth.compare_exchange(next, tenth + 1, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            {
                eprintln!("{}", self.line(done));
            }
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let pct = done.saturating_mul(100).checked_div(self.total).unwrap_or(100);
        format!(
            "{}: {pct:>3}% ({} of {}, {} chunks, {:.1} MiB/s, {secs:.1} s)",
            self.label,
            fmt_bytes(done),
            fmt_bytes(self.total),
            self.chunks.load(Ordering::Relaxed),
            mib_per_sec(done, secs),
        )
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Ends the bar, or prints the last line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.lines {
            eprintln!("{}", self.line(self.done.load(Ordering::Relaxed)));
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

pub fn mib_per_sec(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / (1024.0 * 1024.0) / secs
    }
}

/// `1.5 GiB`, `64.0 KiB`, `512 B`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_format() {
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(1023), "1023 B");
        assert_eq!(fmt_bytes(65536), "64.0 KiB");
        assert_eq!(fmt_bytes(3 << 30), "3.0 GiB");
    }
}
