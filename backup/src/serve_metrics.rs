//! Prometheus metrics of `sanvol-backup serve --metrics-addr` (served by
//! `ops::metrics`), counted by following each bridged connection's NBD
//! conversation with [`crate::tap::NbdTap`].
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `sanvol_backup_serve_connections_total` | — | local connections accepted |
//! | `sanvol_backup_serve_connect_errors_total` | — | of those, whose snapshots' server could not be reached |
//! | `sanvol_backup_serve_sessions` | export | connections in transmission on the export now |
//! | `sanvol_backup_serve_reads_total` | export | read requests answered |
//! | `sanvol_backup_serve_read_bytes_total` | export | bytes those reads asked for and got |
//! | `sanvol_backup_serve_read_seconds` | export | read latency, from the request to the reply's last chunk |
//! | `sanvol_backup_serve_requests_total` | export | other requests answered (block status, cache, ...) |
//! | `sanvol_backup_serve_errors_total` | export | requests the server answered with an error |
//! | `sanvol_backup_serve_untracked_total` | — | connections not followed (TLS, extended headers, lost sync): bridged, not counted |
//!
//! The export label is the name the client asked for (`VOLUME@SNAPSHOT`).

use std::sync::LazyLock;
use std::time::Instant;

use ops::metrics::register;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts};

use crate::tap::{NbdTap, TapEvent};

/// Read latency buckets: 100 µs .. 30 s (reads go through the metadata
/// server's backup channel: slower than an agent's direct reads).
const READ_SECONDS_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric declaration"))
}
fn by_export(name: &str, help: &str) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), &["export"]).expect("valid metric declaration"))
}

static CONNECTIONS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("sanvol_backup_serve_connections_total", "Local connections accepted"));
static CONNECT_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("sanvol_backup_serve_connect_errors_total", "Local connections whose snapshots' server was unreachable")
});
static UNTRACKED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "sanvol_backup_serve_untracked_total",
        "Connections bridged without being counted (TLS, extended headers, lost sync)",
    )
});
static SESSIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let opts = Opts::new("sanvol_backup_serve_sessions", "Connections in transmission on each export now");
    register(IntGaugeVec::new(opts, &["export"]).expect("valid metric declaration"))
});
static READS: LazyLock<IntCounterVec> =
    LazyLock::new(|| by_export("sanvol_backup_serve_reads_total", "Read requests answered, by export"));
static READ_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    by_export("sanvol_backup_serve_read_bytes_total", "Bytes of the read requests answered without error, by export")
});
static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    by_export("sanvol_backup_serve_requests_total", "Other requests answered (block status, cache, ...), by export")
});
static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    by_export("sanvol_backup_serve_errors_total", "Requests the snapshots' server answered with an error, by export")
});
static READ_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let opts = HistogramOpts::new("sanvol_backup_serve_read_seconds", "Read latency through serve, by export")
        .buckets(READ_SECONDS_BUCKETS.to_vec());
    register(HistogramVec::new(opts, &["export"]).expect("valid metric declaration"))
});

/// Registers every metric, so a scrape shows them (at zero) before the
/// first connection.
pub fn init() {
    LazyLock::force(&CONNECTIONS);
    LazyLock::force(&CONNECT_ERRORS);
    LazyLock::force(&UNTRACKED);
    LazyLock::force(&SESSIONS);
    LazyLock::force(&READS);
    LazyLock::force(&READ_BYTES);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&ERRORS);
    LazyLock::force(&READ_SECONDS);
}

/// A local connection was accepted.
pub fn accepted() {
    CONNECTIONS.inc();
}

/// The snapshots' server could not be reached for a local connection.
pub fn connect_failed() {
    CONNECT_ERRORS.inc();
}

/// One export's metrics, resolved once per session (so a request costs a
/// few atomic increments, and every metric of an export in use shows, at
/// zero until something happens).
struct ExportMetrics {
    name: String,
    sessions: prometheus::IntGauge,
    reads: IntCounter,
    read_bytes: IntCounter,
    read_seconds: prometheus::Histogram,
    requests: IntCounter,
    errors: IntCounter,
}

impl ExportMetrics {
    fn new(name: String) -> ExportMetrics {
        let label = [name.as_str()];
        ExportMetrics {
            sessions: SESSIONS.with_label_values(&label),
            reads: READS.with_label_values(&label),
            read_bytes: READ_BYTES.with_label_values(&label),
            read_seconds: READ_SECONDS.with_label_values(&label),
            requests: REQUESTS.with_label_values(&label),
            errors: ERRORS.with_label_values(&label),
            name,
        }
    }
}

/// One bridged connection: its tap and the export it is on.
pub struct Session {
    tap: NbdTap,
    export: Option<ExportMetrics>,
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    pub fn new() -> Session {
        Session { tap: NbdTap::new(), export: None }
    }

    /// Bytes from the client, before they are forwarded.
    pub fn from_client(&mut self, bytes: &[u8]) {
        if self.tap.following() {
            let events = self.tap.from_client(bytes, Instant::now());
            self.count(events);
        }
    }

    /// Bytes from the server, before they are forwarded.
    pub fn from_server(&mut self, bytes: &[u8]) {
        if self.tap.following() {
            let events = self.tap.from_server(bytes, Instant::now());
            self.count(events);
        }
    }

    fn count(&mut self, events: Vec<TapEvent>) {
        for event in events {
            match (event, &self.export) {
                (TapEvent::Export(name), _) => {
                    let export = ExportMetrics::new(name);
                    export.sessions.inc();
                    if let Some(old) = self.export.replace(export) {
                        old.sessions.dec();
                    }
                }
                (TapEvent::Read { bytes, latency, ok }, Some(export)) => {
                    export.reads.inc();
                    export.read_seconds.observe(latency.as_secs_f64());
                    if ok {
                        export.read_bytes.inc_by(bytes);
                    } else {
                        export.errors.inc();
                    }
                }
                (TapEvent::Other { ok }, Some(export)) => {
                    export.requests.inc();
                    if !ok {
                        export.errors.inc();
                    }
                }
                // Requests come only after the export is chosen.
                (TapEvent::Read { .. } | TapEvent::Other { .. }, None) => {}
                (TapEvent::Untracked(why), export) => {
                    UNTRACKED.inc();
                    let name = export.as_ref().map(|e| e.name.as_str()).unwrap_or_default();
                    tracing::debug!(export = name, "connection not counted: {why}");
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(export) = &self.export {
            export.sessions.dec();
        }
    }
}
