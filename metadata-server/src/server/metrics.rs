//! The metadata server's Prometheus metrics (served with `--metrics-addr`
//! or `metrics_addr` in the config, see `ops::metrics`).
//!
//! State gauges are set from the owner's [`Core`] after each input it
//! applies (sessions, handles, grace, devices: counts over small tables,
//! cheaper than the input itself); commits are timed on the device task
//! around the metadata write; the lease role is set where the lease task
//! writes this server's presence.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `sanvol_mds_sessions` | — | authenticated control sessions |
//! | `sanvol_mds_handles` | state | open handles: `held` (a session holds it), `detached` (waiting for its agent to resume) |
//! | `sanvol_mds_grace_period_active` | — | 1 while only resumes are served after a restart |
//! | `sanvol_mds_commits_total` | result | metadata commits written to every copy (`ok`) or not (`failed`: a copy failed, or the lease was not held) |
//! | `sanvol_mds_commit_seconds` | — | time to write a commit to every metadata copy |
//! | `sanvol_mds_devices` | state | pool devices `online` or `failed` (as committed) |
//! | `sanvol_mds_devices_unreachable` | — | devices this server cannot reach now |
//! | `sanvol_mds_lease_role` | role | 1 for this server's role: `active`, `standby` or `stopped` |
//! | `sanvol_mds_cache_replays_running` | — | cache mirrors being written to the devices now (each keeps its volume closed) |
//! | `sanvol_mds_cache_replays_total` | result | replays of a mirror that held writes: `ok`, or `failed` (the mirror could not be read or a device write failed; retried at the next open) |
//! | `sanvol_mds_cache_replay_seconds` | — | how long a replay that wrote something took |
//! | `sanvol_mds_cache_replayed_bytes_total` | — | bytes replays wrote to the devices |
//! | `sanvol_mds_cache_mirror_fetches_total` | result | mirror files fetched from the server standing by that the pool records as holding them, before a replay: `ok`, or `failed` (unreachable, refused, changed while copied; the replay is then refused) |
//! | `sanvol_mds_cache_mirror_fetched_bytes_total` | — | bytes of mirror files fetched |
//!
//! The replay and fetch metrics are counted on the volume's mirror worker
//! ([`crate::mirror::worker`]), around the replay itself.

use std::sync::LazyLock;
use std::time::Duration;

use ops::metrics::register;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use super::core::Core;

/// Commit latency buckets: 1 ms .. 30 s.
const COMMIT_SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric declaration"))
}

fn gauge_vec(name: &str, help: &str, label: &str) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric declaration"))
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric declaration"))
}

static SESSIONS: LazyLock<IntGauge> = LazyLock::new(|| gauge("sanvol_mds_sessions", "Authenticated control sessions"));
static HANDLES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec("sanvol_mds_handles", "Open handles: held by a session, or detached (waiting for a resume)", "state")
});
static GRACE: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("sanvol_mds_grace_period_active", "1 while only resumes are served after a restart"));
static COMMITS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("sanvol_mds_commits_total", "Metadata commits, by result (ok, failed)", "result"));
static COMMIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    let opts = HistogramOpts::new("sanvol_mds_commit_seconds", "Time to write a commit to every metadata copy")
        .buckets(COMMIT_SECONDS_BUCKETS.to_vec());
    register(Histogram::with_opts(opts).expect("valid metric declaration"))
});
static DEVICES: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge_vec("sanvol_mds_devices", "Pool devices by committed state (online, failed)", "state"));
static UNREACHABLE: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("sanvol_mds_devices_unreachable", "Devices this metadata server cannot reach now"));
static ROLE: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge_vec("sanvol_mds_lease_role", "1 for this server's role in the pool lease", "role"));

/// Replay time buckets: 10 ms .. 30 min (behind slow devices a full
/// cache's replay takes minutes).
const REPLAY_SECONDS_BUCKETS: &[f64] = &[0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

static REPLAYS_RUNNING: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "sanvol_mds_cache_replays_running",
        "Cache mirrors being written to the devices now (their volumes stay closed)",
    )
});
static REPLAYS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_mds_cache_replays_total",
        "Replays of cache mirrors that held writes, by result (ok, failed)",
        "result",
    )
});
static REPLAY_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    let opts = HistogramOpts::new("sanvol_mds_cache_replay_seconds", "Time to write a cache mirror to the devices")
        .buckets(REPLAY_SECONDS_BUCKETS.to_vec());
    register(Histogram::with_opts(opts).expect("valid metric declaration"))
});
static REPLAYED_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    let counter =
        IntCounter::new("sanvol_mds_cache_replayed_bytes_total", "Bytes cache mirror replays wrote to the devices");
    register(counter.expect("valid metric declaration"))
});

static FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_mds_cache_mirror_fetches_total",
        "Cache mirror files fetched from the server recorded as holding them, by result (ok, failed)",
        "result",
    )
});
static FETCHED_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    let counter = IntCounter::new("sanvol_mds_cache_mirror_fetched_bytes_total", "Bytes of cache mirror files fetched");
    register(counter.expect("valid metric declaration"))
});

/// A fetch of a mirror file from another server ended: `Some(bytes)`
/// copied, or `None` (failed).
pub fn mirror_fetched(bytes: Option<u64>) {
    FETCHES.with_label_values(&[if bytes.is_some() { "ok" } else { "failed" }]).inc();
    FETCHED_BYTES.inc_by(bytes.unwrap_or(0));
}

/// One replay of a cache mirror that holds writes, counted while it runs
/// ([`REPLAYS_RUNNING`]); [`Replay::done`] counts its result. Dropped
/// without it (the worker ended mid-replay), it counts as failed.
pub struct Replay {
    started: std::time::Instant,
    result: Option<bool>,
}

impl Replay {
    pub fn start() -> Replay {
        REPLAYS_RUNNING.inc();
        Replay { started: std::time::Instant::now(), result: None }
    }

    /// The replay wrote `bytes` and ended (`ok`: every write is on the devices).
    pub fn done(mut self, bytes: u64, ok: bool) {
        REPLAYED_BYTES.inc_by(bytes);
        if ok {
            REPLAY_SECONDS.observe(self.started.elapsed().as_secs_f64());
        }
        self.result = Some(ok);
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        REPLAYS_RUNNING.dec();
        REPLAYS.with_label_values(&[if self.result == Some(true) { "ok" } else { "failed" }]).inc();
    }
}

/// A replay could not read its mirror file: failed before it began.
pub fn replay_unreadable() {
    REPLAYS.with_label_values(&["failed"]).inc();
}

/// Registers every metric so a scrape shows them before the first event.
pub fn init() {
    LazyLock::force(&SESSIONS);
    for state in ["held", "detached"] {
        HANDLES.with_label_values(&[state]);
    }
    LazyLock::force(&GRACE);
    for result in ["ok", "failed"] {
        COMMITS.with_label_values(&[result]);
    }
    LazyLock::force(&COMMIT_SECONDS);
    for state in ["online", "failed", "resyncing"] {
        DEVICES.with_label_values(&[state]);
    }
    LazyLock::force(&UNREACHABLE);
    LazyLock::force(&REPLAYS_RUNNING);
    for result in ["ok", "failed"] {
        REPLAYS.with_label_values(&[result]);
        FETCHES.with_label_values(&[result]);
    }
    LazyLock::force(&REPLAY_SECONDS);
    LazyLock::force(&REPLAYED_BYTES);
    LazyLock::force(&FETCHED_BYTES);
    set_role("standby");
}

/// Sets the state gauges from the owner's core.
pub fn observe(core: &Core) {
    SESSIONS.set(core.sessions.len() as i64);
    let held = core.handles.all().filter(|h| h.session != 0).count();
    let detached = core.handles.all().filter(|h| h.session == 0).count();
    HANDLES.with_label_values(&["held"]).set(held as i64);
    HANDLES.with_label_values(&["detached"]).set(detached as i64);
    GRACE.set(core.grace.is_some() as i64);
    let count = |state: &str| core.meta.devices.iter().filter(|d| d.state.to_string().starts_with(state)).count();
    for state in ["online", "failed", "resyncing"] {
        DEVICES.with_label_values(&[state]).set(count(state) as i64);
    }
    UNREACHABLE.set(core.reachable.values().filter(|up| !**up).count() as i64);
}

/// A commit was written in `took` (`ok`: to every copy).
pub fn committed(took: Duration, ok: bool) {
    COMMITS.with_label_values(&[if ok { "ok" } else { "failed" }]).inc();
    if ok {
        COMMIT_SECONDS.observe(took.as_secs_f64());
    }
}

/// This server's role in the pool lease: `active`, `standby` or `stopped`.
pub fn set_role(role: &str) {
    for r in ["active", "standby", "stopped"] {
        ROLE.with_label_values(&[r]).set((r == role) as i64);
    }
}
