//! The agent's Prometheus metrics (served by `sanvol-agent run
//! --metrics-addr`, see `ops::metrics`).
//!
//! Counting costs the data path no lock: [`Metered`] wraps each attached
//! volume's device and holds that volume's counters and histograms (atomic
//! cells resolved once, at attach), so a request adds a few atomic
//! increments and two clock reads. Control-plane events (fallback, lease
//! renewals, copy-on-write registrations) count where the agent's core
//! decides them.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `sanvol_agent_requests_total` | volume, op | NBD requests served (read, write, flush, trim, zero) |
//! | `sanvol_agent_request_errors_total` | volume, op | of those, failed |
//! | `sanvol_agent_bytes_total` | volume, op | bytes read or written |
//! | `sanvol_agent_read_bytes_spliced_total` | volume | of the bytes read, those passed from a device's socket to the client's in pipes, never copied through the agent (`blockio::splice`) |
//! | `sanvol_agent_write_bytes_spliced_total` | volume | of the bytes written, those taken from the client's socket into pipes, to go to a device's socket without being copied through the agent |
//! | `sanvol_agent_request_seconds` | volume, op | request latency (read, write, flush) |
//! | `sanvol_agent_device_path_fallback` | device | 1 while the device's I/O goes through the metadata server |
//! | `sanvol_agent_fallbacks_total` | device | switches from the direct path to fallback |
//! | `sanvol_agent_lease_renewal_seconds` | — | time from sending a lease renewal to its grant |
//! | `sanvol_agent_lease_renewal_misses_total` | reason | renewals that failed or were still unanswered when the next was due |
//! | `sanvol_agent_cow_registrations_total` | volume | copy-on-write registrations sent to the server |
//! | `sanvol_agent_cow_chunks_registered_total` | volume | chunks they registered |
//! | `sanvol_agent_cow_writes_behind` | volume | writes acknowledged before the snapshot's copy of their chunk, not landed yet |
//! | `sanvol_agent_cow_writes_behind_failed_total` | volume | of those, failed after their acknowledgement (the next FLUSH failed) |
//! | `sanvol_agent_volumes_attached` | — | volumes attached now |
//! | `sanvol_agent_writes_fenced_total` | volume | device writes held back because the lease ran out before they could leave (sent again after the renewal) |
//! | `sanvol_agent_cache_mirrored` | volume | 1 while a cached volume's writes are mirrored, 0 while its cache writes through |
//! | `sanvol_agent_cache_dirty_bytes` | volume | acknowledged bytes not yet on the devices |
//! | `sanvol_agent_cache_log_used_bytes` | volume | cache log in use |
//! | `sanvol_agent_cache_log_bytes` | volume | cache log capacity |
//! | `sanvol_agent_cache_destaged_bytes_total` | volume | bytes written to the devices since the cache opened |
//! | `sanvol_agent_cache_destage_writes_total` | volume | device writes that took (fewer where rewrites were absorbed and neighbours merged) |
//! | `sanvol_agent_cache_read_hits_total` | volume | reads answered from the clean blocks kept in memory |
//! | `sanvol_agent_cache_read_misses_total` | volume | reads of the devices the clean blocks could not answer |
//!
//! The cache metrics are read from each attached cache at the scrape
//! ([`cache_opened`]), not counted on the data path.

use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Instant;

use async_trait::async_trait;
use blockio::{BlockDevice, BlockSizes, IoError, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use ops::metrics::register;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::cache::{CachedDevice, MirrorState};

/// Latency buckets for block requests: 50 µs .. 10 s.
const REQUEST_SECONDS_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Latency buckets for lease renewals: 1 ms .. 30 s.
const RENEWAL_SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric declaration"))
}

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec("sanvol_agent_requests_total", "NBD requests served, by volume and operation", &["volume", "op"])
});
static REQUEST_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_agent_request_errors_total",
        "NBD requests that failed, by volume and operation",
        &["volume", "op"],
    )
});
static BYTES: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("sanvol_agent_bytes_total", "Bytes read or written, by volume", &["volume", "op"]));
static READ_BYTES_SPLICED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_agent_read_bytes_spliced_total",
        "Bytes read that went from a device's socket to the client's in pipes, not copied through the agent",
        &["volume"],
    )
});
static WRITE_BYTES_SPLICED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_agent_write_bytes_spliced_total",
        "Bytes written that were taken from the client's socket into pipes, to go to a device's socket uncopied",
        &["volume"],
    )
});
static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let opts = HistogramOpts::new("sanvol_agent_request_seconds", "Latency of NBD requests, by volume and operation")
        .buckets(REQUEST_SECONDS_BUCKETS.to_vec());
    register(HistogramVec::new(opts, &["volume", "op"]).expect("valid metric declaration"))
});
static PATH_FALLBACK: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let opts =
        Opts::new("sanvol_agent_device_path_fallback", "1 while the device's I/O goes through the metadata server");
    register(IntGaugeVec::new(opts, &["device"]).expect("valid metric declaration"))
});
static FALLBACKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec("sanvol_agent_fallbacks_total", "Switches of a device from the direct path to fallback", &["device"])
});
static RENEWAL_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    let opts =
        HistogramOpts::new("sanvol_agent_lease_renewal_seconds", "Time from sending a lease renewal to its grant")
            .buckets(RENEWAL_SECONDS_BUCKETS.to_vec());
    register(Histogram::with_opts(opts).expect("valid metric declaration"))
});
static RENEWAL_MISSES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_agent_lease_renewal_misses_total",
        "Lease renewals that failed (reason=failed) or were unanswered when the next was due (reason=late)",
        &["reason"],
    )
});
static COW_REGISTRATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec("sanvol_agent_cow_registrations_total", "Copy-on-write registrations sent to the server", &["volume"])
});
static COW_CHUNKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec("sanvol_agent_cow_chunks_registered_total", "Chunks registered for copy-on-write", &["volume"])
});
static WRITES_FENCED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_agent_writes_fenced_total",
        "Device writes held back because the lease ran out before they could leave",
        &["volume"],
    )
});
static WRITES_BEHIND: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let opts = Opts::new(
        "sanvol_agent_cow_writes_behind",
        "Writes acknowledged before the snapshot's copy of their chunk, not landed yet",
    );
    register(IntGaugeVec::new(opts, &["volume"]).expect("valid metric declaration"))
});
static WRITES_BEHIND_FAILED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "sanvol_agent_cow_writes_behind_failed_total",
        "Writes acknowledged before the snapshot's copy of their chunk that then failed (the next FLUSH failed)",
        &["volume"],
    )
});
static VOLUMES_ATTACHED: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new("sanvol_agent_volumes_attached", "Volumes attached now").expect("valid metric declaration"))
});

/// Attached volumes' caches, by volume name.
type OpenCaches = Mutex<Vec<(String, Weak<CachedDevice>)>>;

/// The caches of attached volumes, read at each scrape.
#[derive(Clone)]
struct CacheCollector {
    caches: Arc<OpenCaches>,
    mirrored: IntGaugeVec,
    dirty: IntGaugeVec,
    log_used: IntGaugeVec,
    log_size: IntGaugeVec,
    destaged: IntCounterVec,
    destage_writes: IntCounterVec,
    hits: IntCounterVec,
    misses: IntCounterVec,
}

impl CacheCollector {
    fn new() -> CacheCollector {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["volume"]).expect("valid");
        let counter = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["volume"]).expect("valid");
        CacheCollector {
            caches: Arc::default(),
            mirrored: gauge(
                "sanvol_agent_cache_mirrored",
                "1 while a cached volume's writes are mirrored, 0 while its cache writes through",
            ),
            dirty: gauge(
                "sanvol_agent_cache_dirty_bytes",
                "Acknowledged bytes of a cached volume not yet on the devices",
            ),
            log_used: gauge("sanvol_agent_cache_log_used_bytes", "Bytes of a cached volume's log in use"),
            log_size: gauge("sanvol_agent_cache_log_bytes", "Bytes a cached volume's log can hold"),
            destaged: counter(
                "sanvol_agent_cache_destaged_bytes_total",
                "Bytes of a cached volume written to the devices since its cache opened",
            ),
            destage_writes: counter(
                "sanvol_agent_cache_destage_writes_total",
                "Device writes a cached volume's destager made since its cache opened",
            ),
            hits: counter("sanvol_agent_cache_read_hits_total", "Reads answered from the clean blocks kept in memory"),
            misses: counter(
                "sanvol_agent_cache_read_misses_total",
                "Reads of the devices the clean blocks kept in memory could not answer",
            ),
        }
    }
}

impl Collector for CacheCollector {
    fn desc(&self) -> Vec<&Desc> {
        [self.mirrored.desc(), self.dirty.desc(), self.log_used.desc(), self.log_size.desc()]
            .into_iter()
            .chain([self.destaged.desc(), self.destage_writes.desc(), self.hits.desc(), self.misses.desc()])
            .flatten()
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // One scrape at a time: each resets the vectors and fills them.
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        caches.retain(|(_, cache)| cache.strong_count() > 0);
        for gauge in [&self.mirrored, &self.dirty, &self.log_used, &self.log_size] {
            gauge.reset();
        }
        for counter in [&self.destaged, &self.destage_writes, &self.hits, &self.misses] {
            counter.reset();
        }
        for (volume, cache) in caches.iter() {
            let Some(cache) = cache.upgrade() else { continue };
            let report = cache.report();
            let labels = [volume.as_str()];
            let mirrored = matches!(report.mirror, MirrorState::Mirrored);
            self.mirrored.with_label_values(&labels).set(mirrored as i64);
            self.dirty.with_label_values(&labels).set(report.status.dirty_bytes as i64);
            self.log_used.with_label_values(&labels).set(report.status.log_used_bytes as i64);
            self.log_size.with_label_values(&labels).set(report.status.log_capacity_bytes as i64);
            self.destaged.with_label_values(&labels).inc_by(report.destaged_bytes);
            self.destage_writes.with_label_values(&labels).inc_by(report.destage_writes);
            self.hits.with_label_values(&labels).inc_by(report.read_cache.hits);
            self.misses.with_label_values(&labels).inc_by(report.read_cache.misses);
        }
        [self.mirrored.collect(), self.dirty.collect(), self.log_used.collect(), self.log_size.collect()]
            .into_iter()
            .chain([self.destaged.collect(), self.destage_writes.collect(), self.hits.collect(), self.misses.collect()])
            .flatten()
            .collect()
    }
}

static CACHES: LazyLock<CacheCollector> = LazyLock::new(|| register(CacheCollector::new()));

/// `volume`'s cache opened: the scrapes report it while it lives.
pub fn cache_opened(volume: &str, cache: &Arc<CachedDevice>) {
    let mut caches = CACHES.caches.lock().unwrap_or_else(|p| p.into_inner());
    // Closed ones go here too, in case nobody scrapes.
    caches.retain(|(_, cache)| cache.strong_count() > 0);
    caches.push((volume.to_string(), Arc::downgrade(cache)));
}

/// Registers every agent metric, so a scrape shows them (at zero) before
/// the first event.
pub fn init() {
    LazyLock::force(&CACHES);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_ERRORS);
    LazyLock::force(&BYTES);
    LazyLock::force(&REQUEST_SECONDS);
    LazyLock::force(&PATH_FALLBACK);
    LazyLock::force(&FALLBACKS);
    LazyLock::force(&RENEWAL_SECONDS);
    RENEWAL_MISSES.with_label_values(&["failed"]);
    RENEWAL_MISSES.with_label_values(&["late"]);
    LazyLock::force(&COW_REGISTRATIONS);
    LazyLock::force(&COW_CHUNKS);
    LazyLock::force(&VOLUMES_ATTACHED);
    LazyLock::force(&WRITES_FENCED);
    LazyLock::force(&WRITES_BEHIND);
    LazyLock::force(&WRITES_BEHIND_FAILED);
}

/// A write of `volume` was acknowledged before its chunk was preserved.
pub fn write_behind_started(volume: &str) {
    WRITES_BEHIND.with_label_values(&[volume]).inc();
}

/// A write acknowledged behind landed (`ok`) or failed.
pub fn write_behind_ended(volume: &str, ok: bool) {
    WRITES_BEHIND.with_label_values(&[volume]).dec();
    if !ok {
        WRITES_BEHIND_FAILED.with_label_values(&[volume]).inc();
    }
}

/// A device write of `volume` found the lease run out before it could leave.
pub fn write_fenced(volume: &str) {
    WRITES_FENCED.with_label_values(&[volume]).inc();
}

/// A device's direct path failed: its I/O now goes through the server.
pub fn path_fell_back(device: &str) {
    FALLBACKS.with_label_values(&[device]).inc();
    PATH_FALLBACK.with_label_values(&[device]).set(1);
}

/// A device's direct path works again (or the device is no longer used).
pub fn path_direct(device: &str) {
    PATH_FALLBACK.with_label_values(&[device]).set(0);
}

/// A lease renewal was granted `latency_ms` after it was sent.
pub fn lease_renewed(latency_ms: u64) {
    RENEWAL_SECONDS.observe(latency_ms as f64 / 1000.0);
}

/// A lease renewal failed.
pub fn lease_renewal_failed() {
    RENEWAL_MISSES.with_label_values(&["failed"]).inc();
}

/// A renewal was due while the previous one was still unanswered.
pub fn lease_renewal_late() {
    RENEWAL_MISSES.with_label_values(&["late"]).inc();
}

/// A copy-on-write registration of `chunks` chunks of `volume` was sent.
pub fn cow_registered(volume: &str, chunks: usize) {
    COW_REGISTRATIONS.with_label_values(&[volume]).inc();
    COW_CHUNKS.with_label_values(&[volume]).inc_by(chunks as u64);
}

/// One operation's counters, resolved once per volume.
#[derive(Clone)]
struct OpMetrics {
    requests: IntCounter,
    errors: IntCounter,
    bytes: IntCounter,
    seconds: Option<Histogram>,
}

impl OpMetrics {
    fn new(volume: &str, op: &str, timed: bool) -> OpMetrics {
        OpMetrics {
            requests: REQUESTS.with_label_values(&[volume, op]),
            errors: REQUEST_ERRORS.with_label_values(&[volume, op]),
            bytes: BYTES.with_label_values(&[volume, op]),
            seconds: timed.then(|| REQUEST_SECONDS.with_label_values(&[volume, op])),
        }
    }

    fn record<T>(&self, started: Option<Instant>, bytes: u64, result: &Result<T, IoError>) {
        self.requests.inc();
        match result {
            Ok(_) => self.bytes.inc_by(bytes),
            Err(_) => self.errors.inc(),
        }
        if let (Some(h), Some(started)) = (&self.seconds, started) {
            h.observe(started.elapsed().as_secs_f64());
        }
    }

    fn start(&self) -> Option<Instant> {
        self.seconds.as_ref().map(|_| Instant::now())
    }
}

/// An attached volume's device, counting every request it serves.
pub struct Metered {
    inner: Arc<dyn BlockDevice>,
    read: OpMetrics,
    read_spliced: IntCounter,
    write_spliced: IntCounter,
    write: OpMetrics,
    flush: OpMetrics,
    trim: OpMetrics,
    zero: OpMetrics,
}

impl Metered {
    pub fn new(volume: &str, inner: Arc<dyn BlockDevice>) -> Metered {
        VOLUMES_ATTACHED.inc();
        Metered {
            inner,
            read: OpMetrics::new(volume, "read", true),
            read_spliced: READ_BYTES_SPLICED.with_label_values(&[volume]),
            write_spliced: WRITE_BYTES_SPLICED.with_label_values(&[volume]),
            write: OpMetrics::new(volume, "write", true),
            flush: OpMetrics::new(volume, "flush", true),
            trim: OpMetrics::new(volume, "trim", false),
            zero: OpMetrics::new(volume, "zero", false),
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        VOLUMES_ATTACHED.dec();
    }
}

#[async_trait]
impl BlockDevice for Metered {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn connection_epoch(&self) -> u64 {
        self.inner.connection_epoch()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
    fn can_trim(&self) -> bool {
        self.inner.can_trim()
    }
    fn can_fast_zero(&self) -> bool {
        self.inner.can_fast_zero()
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.inner.meta_contexts()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let started = self.read.start();
        let result = self.inner.read(offset, len).await;
        self.read.record(started, len as u64, &result);
        result
    }
    async fn read_payload(&self, offset: u64, len: u32) -> Result<blockio::Payload, IoError> {
        let started = self.read.start();
        let result = self.inner.read_payload(offset, len).await;
        self.read.record(started, len as u64, &result);
        if let Ok(blockio::Payload::Pipe(chain)) = &result {
            self.read_spliced.inc_by(chain.len() as u64);
        }
        result
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let (started, len) = (self.write.start(), data.len() as u64);
        let result = self.inner.write(offset, data, fua).await;
        self.write.record(started, len, &result);
        result
    }
    fn wants_write_pipe(&self, offset: u64, len: u32) -> bool {
        self.inner.wants_write_pipe(offset, len)
    }
    async fn write_payload(&self, offset: u64, data: blockio::Payload, fua: bool) -> Result<(), IoError> {
        let (started, len) = (self.write.start(), data.len() as u64);
        if matches!(data, blockio::Payload::Pipe(_)) {
            self.write_spliced.inc_by(len);
        }
        let result = self.inner.write_payload(offset, data, fua).await;
        self.write.record(started, len, &result);
        result
    }
    async fn flush(&self) -> Result<(), IoError> {
        let started = self.flush.start();
        let result = self.inner.flush().await;
        self.flush.record(started, 0, &result);
        result
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        let result = self.inner.trim(offset, len, fua).await;
        self.trim.record(None, len as u64, &result);
        result
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        let result = self.inner.write_zeroes(offset, len, flags).await;
        self.zero.record(None, len as u64, &result);
        result
    }
    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.inner.block_status(context, offset, len).await
    }
    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.inner.cache(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockio::memory::MemoryDevice;

    fn counter(name: &str, volume: &str, op: &str) -> u64 {
        prometheus::gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                let labels: Vec<_> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
                labels.contains(&("volume", volume)) && labels.contains(&("op", op))
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The value of `name` for `volume` (a gauge or a counter: the other reads 0), if scraped.
    fn volume_value(name: &str, volume: &str) -> Option<f64> {
        prometheus::gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .find(|m| m.get_label().iter().any(|l| l.name() == "volume" && l.value() == volume))
            .map(|m| m.get_gauge().get_value() + m.get_counter().get_value())
    }

    #[tokio::test]
    async fn a_cache_is_scraped_while_it_lives() {
        use crate::cache::{CacheConfig, CachedDevice};
        init();
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 << 20));
        let config = CacheConfig::new(dir.path().join("v.cachelog"), crate::cache::LOG_BYTES_MIN);
        let cache = Arc::new(CachedDevice::open(inner, volume_format::VolumeId(7), &config).await.unwrap());
        cache_opened("metrics-cache-test", &cache);
        cache.write(0, Bytes::from(vec![1u8; 8192]), false).await.unwrap();
        cache.destage_all().await;
        for _ in 0..3 {
            cache.read(1 << 20, 4096).await.unwrap();
        }
        let value = |name: &str| volume_value(name, "metrics-cache-test");
        assert_eq!(value("sanvol_agent_cache_read_hits_total"), Some(2.0));
        assert_eq!(value("sanvol_agent_cache_read_misses_total"), Some(1.0));
        assert_eq!(value("sanvol_agent_cache_destaged_bytes_total"), Some(8192.0));
        assert_eq!(value("sanvol_agent_cache_destage_writes_total"), Some(1.0));
        assert_eq!(value("sanvol_agent_cache_dirty_bytes"), Some(0.0));
        assert_eq!(value("sanvol_agent_cache_mirrored"), Some(0.0), "a cache without a mirror");
        drop(cache);
        assert_eq!(value("sanvol_agent_cache_dirty_bytes"), None, "a closed cache is no longer reported");
    }

    #[tokio::test]
    async fn metered_device_counts_requests_bytes_and_errors_per_volume() {
        let inner: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20));
        let dev = Metered::new("metered-test", inner);
        dev.write(0, Bytes::from(vec![7u8; 4096]), false).await.unwrap();
        dev.write(4096, Bytes::from(vec![7u8; 512]), false).await.unwrap();
        assert_eq!(dev.read(0, 4096).await.unwrap().len(), 4096);
        assert!(dev.read(1 << 20, 4096).await.is_err(), "past the end");
        assert_eq!(counter("sanvol_agent_requests_total", "metered-test", "write"), 2);
        assert_eq!(counter("sanvol_agent_bytes_total", "metered-test", "write"), 4608);
        assert_eq!(counter("sanvol_agent_requests_total", "metered-test", "read"), 2);
        assert_eq!(counter("sanvol_agent_bytes_total", "metered-test", "read"), 4096);
        assert_eq!(counter("sanvol_agent_request_errors_total", "metered-test", "read"), 1);
    }
}
