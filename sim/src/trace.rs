//! What happened, for people: every step of the world as one line with its
//! simulated time. The last [`RING_LINES`] lines are kept and printed with a
//! violation; a replay (`SIM_SEED=N`) prints every line as it happens, and
//! the logs of the code under test (the server core's `tracing` events)
//! with the same simulated timestamps.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt::Write as _;

/// Lines kept for the excerpt printed with a violation.
pub const RING_LINES: usize = 400;

thread_local! {
    /// The simulated time, for log lines of the code under test.
    static SIM_NOW_MS: Cell<u64> = const { Cell::new(0) };
}

pub fn set_now(ms: u64) {
    SIM_NOW_MS.with(|c| c.set(ms));
}

pub struct Trace {
    pub verbose: bool,
    ring: VecDeque<String>,
    pub lines: u64,
    /// FNV-1a over every line: equal for two runs of one seed.
    pub hash: u64,
}

impl Trace {
    pub fn new(verbose: bool) -> Trace {
        Trace { verbose, ring: VecDeque::with_capacity(RING_LINES), lines: 0, hash: 0xcbf2_9ce4_8422_2325 }
    }

    pub fn line(&mut self, now_ms: u64, who: &str, what: std::fmt::Arguments<'_>) {
        let mut s = String::with_capacity(96);
        let _ = write!(s, "{:>8}.{:03}s {who:<9} {what}", now_ms / 1000, now_ms % 1000);
        if self.verbose {
            eprintln!("{s}");
        }
        for b in s.bytes().chain(std::iter::once(b'\n')) {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        if self.ring.len() == RING_LINES {
            self.ring.pop_front();
        }
        self.ring.push_back(s);
        self.lines += 1;
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let skip = self.ring.len().saturating_sub(n);
        self.ring.iter().skip(skip).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    }
}

/// Formats timestamps of `tracing` events as simulated time.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let ms = SIM_NOW_MS.with(|c| c.get());
        write!(w, "{:>8}.{:03}s", ms / 1000, ms % 1000)
    }
}

/// Runs `f` with the code under test logging to stderr in simulated time
/// (`RUST_LOG` filters, default `info`).
pub fn with_logs<T>(f: impl FnOnce() -> T) -> T {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(SimTime)
        .with_target(false)
        .with_writer(std::io::stderr)
        .finish();
    tracing::subscriber::with_default(subscriber, f)
}
