//! The cache over in-memory devices and a real log file: read-your-writes,
//! destage order, back-pressure, crash and replay, damaged records. Device
//! writes can be held (a gate in front of the memory device) to keep data
//! in the cache for as long as a test needs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use blockio::memory::MemoryDevice;
use blockio::{BlockDevice, IoError, ZeroFlags};
use bytes::Bytes;
use tokio::sync::watch;
use volume_format::control::messages::MirrorRecord;
use volume_format::VolumeId;

use super::*;

const DEVICE_BYTES: u64 = 4 << 20;

/// A memory device whose writes wait while `held` is true, and whose reads
/// return (what they read at once) only when `reads_held` is false. With
/// `jitter`, every request also yields to the runtime a random number of
/// times before and after it touches the memory: a read returns bytes it
/// took some time ago, as a device read in flight does.
struct HeldDevice {
    inner: Arc<MemoryDevice>,
    jitter: Option<AtomicU64>,
    held: watch::Receiver<bool>,
    reads_held: watch::Receiver<bool>,
    /// Reads that reached the device.
    reads: AtomicU64,
    /// Offsets of the writes that reached the device (held or not).
    arrived: std::sync::Mutex<Vec<u64>>,
    /// Told when a write reaches the device.
    arrival: tokio::sync::Notify,
    writes: AtomicU64,
    /// Whether it asks for write payloads in pipes.
    wants_pipes: std::sync::atomic::AtomicBool,
    /// Write payloads that reached it still in pipes, and read payloads it
    /// returned in pipes.
    piped: AtomicU64,
}

impl HeldDevice {
    async fn jitter(&self) {
        let Some(seed) = &self.jitter else { return };
        let mut x = seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        for _ in 0..x % 6 {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl BlockDevice for HeldDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.jitter().await;
        let data = self.inner.read(offset, len).await?;
        self.jitter().await;
        let _ = self.reads_held.clone().wait_for(|held| !*held).await;
        Ok(data)
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.arrived.lock().unwrap().push(offset);
        self.arrival.notify_one();
        let mut held = self.held.clone();
        let _ = held.wait_for(|held| !*held).await;
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.jitter().await;
        self.inner.write(offset, data, fua).await?;
        self.jitter().await;
        Ok(())
    }
    async fn read_payload(&self, offset: u64, len: u32) -> Result<Payload, IoError> {
        let data = self.read(offset, len).await?;
        if !self.wants_pipes.load(Ordering::SeqCst) {
            return Ok(Payload::Bytes(data));
        }
        self.piped.fetch_add(1, Ordering::SeqCst);
        Ok(Payload::Pipe(blockio::splice::PipeChain::from_slice(&data).map_err(|e| IoError::io(e.to_string()))?))
    }
    fn wants_write_pipe(&self, _offset: u64, _len: u32) -> bool {
        self.wants_pipes.load(Ordering::SeqCst)
    }
    async fn write_payload(&self, offset: u64, data: Payload, fua: bool) -> Result<(), IoError> {
        if let Payload::Pipe(_) = data {
            self.piped.fetch_add(1, Ordering::SeqCst);
        }
        self.write(offset, data.into_bytes().map_err(|e| IoError::io(e.to_string()))?, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.inner.write_zeroes(offset, len, flags).await
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    config: CacheConfig,
    memory: Arc<MemoryDevice>,
    hold: watch::Sender<bool>,
    hold_reads: watch::Sender<bool>,
    device: Arc<HeldDevice>,
}

fn setup(log_bytes: u64, held: bool) -> Setup {
    setup_with(log_bytes, held, None)
}

/// [`setup`], the device's requests taking varying time when `jitter_seed`.
fn setup_with(log_bytes: u64, held: bool, jitter_seed: Option<u64>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // Destaged at once unless a test says otherwise: the tests below hold
    // the device themselves to order what they check; the destage hold has
    // tests of its own (`held_writes_*`).
    let config =
        CacheConfig { destage_hold: Duration::ZERO, ..CacheConfig::new(dir.path().join("vol.cachelog"), log_bytes) };
    let memory = Arc::new(MemoryDevice::new(DEVICE_BYTES));
    let (hold, rx) = watch::channel(held);
    let (hold_reads, reads_held) = watch::channel(false);
    let device = Arc::new(HeldDevice {
        inner: memory.clone(),
        jitter: jitter_seed.map(AtomicU64::new),
        held: rx,
        reads_held,
        reads: AtomicU64::new(0),
        arrived: Default::default(),
        arrival: Default::default(),
        writes: AtomicU64::new(0),
        wants_pipes: Default::default(),
        piped: AtomicU64::new(0),
    });
    Setup { _dir: dir, config, memory, hold, hold_reads, device }
}

impl Setup {
    async fn open(&self) -> Result<CachedDevice, CacheError> {
        CachedDevice::open(self.device.clone(), VolumeId(1), &self.config).await
    }
}

/// Deterministic overlapping writes: (offset, data).
fn writes(count: usize, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count)
        .map(|i| {
            let offset = next() % (64 * 1024);
            let len = 1 + next() % 20_000;
            (offset, vec![(i as u8).wrapping_mul(37).wrapping_add(1); len as usize])
        })
        .collect()
}

fn model(writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut image = vec![0u8; 128 * 1024];
    for (offset, data) in writes {
        image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    image
}

async fn device_image(memory: &MemoryDevice) -> Vec<u8> {
    memory.read(0, 128 * 1024).await.unwrap().to_vec()
}

#[tokio::test]
async fn reads_see_acknowledged_writes_before_and_after_destage() {
    let s = setup(LOG_BYTES_MIN, true);
    let cache = s.open().await.unwrap();
    let all = writes(60, 7);
    for (i, (offset, data)) in all.iter().enumerate() {
        cache.write(*offset, Bytes::from(data.clone()), false).await.unwrap();
        let expected = model(&all[..=i]);
        assert_eq!(cache.read(0, 128 * 1024).await.unwrap(), expected, "after write {i}");
    }
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 0, "writes were held: nothing reached the device");
    assert!(cache.status().dirty_bytes > 0);
    assert_eq!(device_image(&s.memory).await, vec![0u8; 128 * 1024]);
    s.hold.send(false).unwrap();
    cache.destage_all().await;
    assert_eq!(cache.status().dirty_bytes, 0);
    assert_eq!(cache.status().log_used_bytes, 0, "log space is released after destage");
    // Destage applied the writes in order: the device holds the newest bytes.
    assert_eq!(device_image(&s.memory).await, model(&all));
    assert_eq!(cache.read(0, 128 * 1024).await.unwrap(), model(&all));
}

#[tokio::test]
async fn concurrent_writes_share_batches_and_all_land() {
    let s = setup(LOG_BYTES_MIN, false);
    let cache = Arc::new(s.open().await.unwrap());
    // Non-overlapping blocks so concurrent order does not matter.
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.write(i * 4096, Bytes::from(vec![i as u8 + 1; 4096]), false).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    cache.destage_all().await;
    let image = s.memory.read(0, 64 * 4096).await.unwrap();
    for i in 0..64usize {
        assert!(image[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8 + 1), "block {i}");
    }
}

#[tokio::test]
async fn a_full_log_makes_writes_wait_not_fail() {
    let s = setup(LOG_BYTES_MIN, true);
    let cache = Arc::new(s.open().await.unwrap());
    // Twice the log's capacity in writes below the write-around size, the
    // device held.
    const WRITE_BYTES: usize = 256 << 10;
    let all: Vec<(u64, Vec<u8>)> =
        (0..64u64).map(|i| ((i % 5) * WRITE_BYTES as u64, vec![i as u8 + 1; WRITE_BYTES])).collect();
    let writer = {
        let cache = cache.clone();
        let all = all.clone();
        tokio::spawn(async move {
            for (offset, data) in all {
                cache.write(offset, Bytes::from(data), false).await.unwrap();
            }
        })
    };
    // Wait until the log is full (the writer is blocked in back-pressure).
    while cache.status().log_used_bytes + 2 * (WRITE_BYTES as u64) < cache.status().log_capacity_bytes {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!writer.is_finished(), "the writer waits for log space");
    s.hold.send(false).unwrap();
    writer.await.unwrap();
    cache.destage_all().await;
    let mut expected = vec![0u8; 5 * WRITE_BYTES];
    for (offset, data) in &all {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert_eq!(s.memory.read(0, 5 * WRITE_BYTES as u32).await.unwrap(), expected);
}

#[tokio::test]
async fn a_crash_with_a_dirty_cache_is_replayed_on_open() {
    let s = setup(LOG_BYTES_MIN, true);
    let all = writes(40, 11);
    {
        let cache = s.open().await.unwrap();
        for (offset, data) in &all {
            cache.write(*offset, Bytes::from(data.clone()), true).await.unwrap();
        }
        assert!(cache.status().records > 0);
        // Dropped with the device still held: the log is the only copy.
    }
    assert_eq!(device_image(&s.memory).await, vec![0u8; 128 * 1024]);
    s.hold.send(false).unwrap();
    let cache = s.open().await.unwrap();
    assert_eq!(device_image(&s.memory).await, model(&all), "the replay wrote every acknowledged write, in order");
    assert_eq!(cache.status().records, 0, "a fresh log after the replay");
    // And a second reopen replays nothing old.
    drop(cache);
    let writes_before = s.device.writes.load(Ordering::SeqCst);
    let _cache = s.open().await.unwrap();
    assert_eq!(s.device.writes.load(Ordering::SeqCst), writes_before);
}

#[tokio::test]
async fn a_damaged_record_fails_the_open_and_nothing_is_replayed() {
    let s = setup(LOG_BYTES_MIN, true);
    {
        let cache = s.open().await.unwrap();
        // One write per batch (each awaited), so record 1 has later batches.
        for i in 0..3u64 {
            cache.write(i * 4096, Bytes::from(vec![0xaa; 4096]), false).await.unwrap();
        }
    }
    // Flip a bit in the first record's data (the ring starts at 4096; the
    // header is 64 bytes).
    let mut log = std::fs::read(&s.config.log_path).unwrap();
    log[4096 + 64 + 100] ^= 0x04;
    std::fs::write(&s.config.log_path, &log).unwrap();
    s.hold.send(false).unwrap();
    let err = match s.open().await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a damaged log opened"),
    };
    assert!(
        err.contains("corrupt at file offset 4096") && err.contains(&s.config.log_path.display().to_string()),
        "{err}"
    );
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 0, "nothing was destaged");
}

#[tokio::test]
async fn a_log_of_another_volume_is_refused() {
    let s = setup(LOG_BYTES_MIN, false);
    s.open().await.unwrap();
    let err = match CachedDevice::open(s.device.clone(), VolumeId(2), &s.config).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened another volume's log"),
    };
    assert!(err.contains("belongs to volume vol1"), "{err}");
}

#[tokio::test]
async fn trim_waits_for_earlier_cached_writes() {
    let s = setup(LOG_BYTES_MIN, false);
    let cache = s.open().await.unwrap();
    cache.write(0, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
    cache.write_zeroes(0, 4096, ZeroFlags::default()).await.unwrap();
    cache.flush().await.unwrap();
    let image = s.memory.read(0, 8192).await.unwrap();
    assert!(image[..4096].iter().all(|&b| b == 0) && image[4096..].iter().all(|&b| b == 7));
}

#[tokio::test]
async fn a_large_write_goes_around_the_log_unless_a_logged_record_overlaps_it() {
    let s = setup(LOG_BYTES_MIN, false);
    let cache = s.open().await.unwrap();
    cache.write(1 << 20, Bytes::from(vec![3u8; WRITE_AROUND_BYTES_MIN]), false).await.unwrap();
    assert_eq!(cache.status().records, 0, "written around the log");
    assert!(s.memory.read(1 << 20, 4096).await.unwrap().iter().all(|&b| b == 3));

    // With a small write to the same range still in the log (device held),
    // the large write is logged too: written around, it would be overwritten
    // by the older record's destage.
    s.hold.send(true).unwrap();
    cache.write(1 << 20, Bytes::from(vec![4u8; 4096]), false).await.unwrap();
    let big = tokio::time::timeout(
        Duration::from_secs(10),
        cache.write(1 << 20, Bytes::from(vec![5u8; WRITE_AROUND_BYTES_MIN]), false),
    )
    .await
    .expect("the large write was logged, not sent to the held device");
    big.unwrap();
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 1, "only the first large write reached the device");
    s.hold.send(false).unwrap();
    cache.destage_all().await;
    let image = s.memory.read(1 << 20, WRITE_AROUND_BYTES_MIN as u32).await.unwrap();
    assert!(image.iter().all(|&b| b == 5), "the newest write is on the device");
}

/// A large write's payload that the export received into pipes reaches
/// the devices still in them when it goes around the log; asked for while
/// the range was free but handed over once a record lies under it, it is
/// read out of its pipes and logged instead, never put over that record.
#[tokio::test]
async fn a_large_write_in_pipes_goes_around_the_log_in_them_unless_a_logged_record_overlaps_it() {
    use blockio::splice::PipeChain;
    const AT: u64 = 1 << 20;
    const BIG: u32 = WRITE_AROUND_BYTES_MIN as u32;
    let s = setup(LOG_BYTES_MIN, false);
    let cache = s.open().await.unwrap();
    assert!(!cache.wants_write_pipe(AT, BIG), "the device does not take pipes");
    s.device.wants_pipes.store(true, Ordering::SeqCst);
    assert!(cache.wants_write_pipe(AT, BIG));
    assert!(!cache.wants_write_pipe(AT, BIG - 4096), "a smaller write is logged: its bytes are needed");

    let piped = |byte: u8, len: u32| Payload::Pipe(PipeChain::from_slice(&vec![byte; len as usize]).unwrap());
    cache.write_payload(AT, piped(3, BIG), false).await.unwrap();
    assert_eq!(s.device.piped.load(Ordering::SeqCst), 1, "the payload reached the device in its pipes");
    assert_eq!(cache.status().records, 0, "written around the log");
    assert!(s.memory.read(AT, BIG).await.unwrap().iter().all(|&b| b == 3));

    // A small write to the range held in the log: the next large write
    // there must not go around it, even handed over in pipes.
    s.hold.send(true).unwrap();
    cache.write(AT, Bytes::from(vec![4u8; 4096]), false).await.unwrap();
    assert!(!cache.wants_write_pipe(AT, BIG));
    let big = tokio::time::timeout(Duration::from_secs(10), cache.write_payload(AT, piped(5, BIG), false))
        .await
        .expect("the large write was logged, not sent to the held device");
    big.unwrap();
    assert_eq!(s.device.piped.load(Ordering::SeqCst), 1, "the second payload was read out of its pipes");
    assert!(cache.status().records >= 2, "both writes are in the log");
    let read = cache.read(AT, BIG).await.unwrap();
    assert!(read.iter().all(|&b| b == 5), "reads see the logged large write");
    s.hold.send(false).unwrap();
    cache.destage_all().await;
    let image = s.memory.read(AT, BIG).await.unwrap();
    assert!(image.iter().all(|&b| b == 5), "the newest write is on the device");
}

/// A large read that no cached write touches is passed on in the pipes
/// the devices returned; one over a cached write is read into memory with
/// the cached bytes laid over the devices' (read-your-writes), and a small
/// read is always in memory.
#[tokio::test]
async fn a_large_read_stays_in_pipes_unless_a_cached_write_lies_in_it() {
    const AT: u64 = 1 << 20;
    const BIG: u32 = 512 << 10;
    let s = setup(LOG_BYTES_MIN, false);
    s.memory.write(AT, Bytes::from(vec![1u8; BIG as usize]), false).await.unwrap();
    s.device.wants_pipes.store(true, Ordering::SeqCst);
    let cache = s.open().await.unwrap();

    let payload = cache.read_payload(AT, BIG).await.unwrap();
    assert!(matches!(payload, Payload::Pipe(_)), "{payload:?}");
    assert!(payload.into_bytes().unwrap().iter().all(|&b| b == 1));
    let small = cache.read_payload(AT, 4096).await.unwrap();
    assert!(matches!(small, Payload::Bytes(_)), "{small:?}");

    s.hold.send(true).unwrap();
    cache.write(AT + 8192, Bytes::from(vec![2u8; 4096]), false).await.unwrap();
    let piped = s.device.piped.load(Ordering::SeqCst);
    let payload = cache.read_payload(AT, BIG).await.unwrap();
    assert!(matches!(payload, Payload::Bytes(_)), "{payload:?}");
    assert_eq!(s.device.piped.load(Ordering::SeqCst), piped, "the devices were read into memory");
    let data = payload.into_bytes().unwrap();
    assert!(data[..8192].iter().all(|&b| b == 1) && data[12288..].iter().all(|&b| b == 1));
    assert!(data[8192..12288].iter().all(|&b| b == 2), "the cached write lies over the devices' bytes");
    s.hold.send(false).unwrap();
}

/// Random writes (small ones logged, large ones written around when they
/// can be), reads checked against a model, the device held and let go, and
/// crashes (the cache dropped, its tasks stopped mid-work) followed by a
/// reopen: the device must then hold exactly every acknowledged write.
#[tokio::test]
async fn random_writes_reads_and_crashes_keep_every_acknowledged_write() {
    const SPAN_BYTES: u64 = 2 << 20;
    for seed in 1..=4u64 {
        let s = setup(LOG_BYTES_MIN, false);
        let mut cache = s.open().await.unwrap();
        let mut model = vec![0u8; SPAN_BYTES as usize];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut held = false;
        for step in 0..250u32 {
            match next(20) {
                0..=11 => {
                    let large = !held && next(4) == 0;
                    let len = if large { WRITE_AROUND_BYTES_MIN as u64 + next(4) * 65536 } else { 1 + next(40_000) };
                    let offset = next(SPAN_BYTES - len);
                    let data: Vec<u8> = (0..len).map(|i| (step as u64 * 7 + i / 512) as u8).collect();
                    cache.write(offset, Bytes::from(data.clone()), false).await.unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                12..=15 => {
                    let len = 1 + next(200_000);
                    let offset = next(SPAN_BYTES - len);
                    let got = cache.read(offset, len as u32).await.unwrap();
                    assert!(
                        got[..] == model[offset as usize..(offset + len) as usize],
                        "seed {seed} step {step}: read {offset}+{len} differs from the acknowledged writes"
                    );
                }
                16 | 17 => {
                    held = !held;
                    s.hold.send(held).unwrap();
                }
                18 => {
                    drop(cache);
                    held = false;
                    s.hold.send(false).unwrap();
                    cache = s.open().await.unwrap();
                    let image = s.memory.read(0, SPAN_BYTES as u32).await.unwrap();
                    assert!(image[..] == model[..], "seed {seed} step {step}: after crash and replay");
                }
                _ => {
                    if !held {
                        cache.destage_all().await;
                    }
                }
            }
        }
        s.hold.send(false).unwrap();
        cache.destage_all().await;
        let image = s.memory.read(0, SPAN_BYTES as u32).await.unwrap();
        assert!(image[..] == model[..], "seed {seed}: after the final destage");
    }
}

/// A mirror in memory (the server's worker is tested with the server): it
/// keeps what it is sent in order, drops released records, and can be made
/// to hold appends or fail every call.
#[derive(Default)]
struct MemoryMirror {
    held: std::sync::Mutex<Vec<MirrorRecord>>,
    opens: AtomicU64,
    down: Arc<std::sync::atomic::AtomicBool>,
    hold_appends: std::sync::Mutex<Option<watch::Receiver<bool>>>,
    /// Told when an append arrives.
    appending: tokio::sync::Notify,
    /// Answers of the next appends, in order: `true` fails it (as an answer
    /// lost with the connection); none left: answered by `down`.
    failed_answers: std::sync::Mutex<std::collections::VecDeque<bool>>,
    /// If set, an answer `failed_answers` fails waits for this instead of
    /// `hold_appends`.
    failure_gate: std::sync::Mutex<Option<watch::Receiver<bool>>>,
    /// The `upto_seq` of every release, in order.
    releases: std::sync::Mutex<Vec<u64>>,
    /// Told at every release.
    released: tokio::sync::Notify,
    /// Whether it takes staged records ([`CacheMirror::stages`]).
    stages: std::sync::atomic::AtomicBool,
    /// The attempt being staged and its records.
    staged: std::sync::Mutex<Option<(u64, Vec<MirrorRecord>)>>,
    /// The next `open_staged` starts the mirror with the staged records
    /// but its answer is lost, and the mirror is unreachable from then on
    /// (`down`): the server committed the new generation, then the
    /// connection broke.
    lose_open_staged_answer: std::sync::atomic::AtomicBool,
}

impl MemoryMirror {
    fn check(&self) -> Result<(), String> {
        if self.down.load(Ordering::SeqCst) {
            return Err("the metadata server is unreachable".into());
        }
        Ok(())
    }

    /// The image the server's replay would write: `base` with every held
    /// record applied in order.
    fn replayed(&self, base: &[u8]) -> Vec<u8> {
        let mut image = base.to_vec();
        for r in self.held.lock().unwrap().iter() {
            image[r.offset as usize..r.offset as usize + r.data.len()].copy_from_slice(&r.data);
        }
        image
    }
}

#[async_trait]
impl CacheMirror for MemoryMirror {
    async fn open(&self) -> Result<(), String> {
        self.check()?;
        self.opens.fetch_add(1, Ordering::SeqCst);
        self.held.lock().unwrap().clear();
        Ok(())
    }
    async fn append(&self, records: Vec<MirrorRecord>) -> Result<MirrorAck, String> {
        // Received when sent, as the server's queue takes it; answered once
        // `hold_appends` lets it through.
        self.check()?;
        {
            let mut held = self.held.lock().unwrap();
            assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
            assert!(held.last().is_none_or(|last| last.seq < records[0].seq), "records reach the mirror in order");
            held.extend(records);
        }
        self.appending.notify_one();
        let hold = self.hold_appends.lock().unwrap().clone();
        let down = self.down.clone();
        let fails = self.failed_answers.lock().unwrap().pop_front();
        let gate = self.failure_gate.lock().unwrap().clone().filter(|_| fails == Some(true));
        let hold = gate.or(hold);
        Ok(Box::pin(async move {
            if let Some(mut hold) = hold {
                let _ = hold.wait_for(|held| !*held).await;
            }
            match fails.unwrap_or_else(|| down.load(Ordering::SeqCst)) {
                true => Err("the metadata server is unreachable".to_string()),
                false => Ok(()),
            }
        }))
    }
    async fn release(&self, upto_seq: u64) -> Result<(), String> {
        self.check()?;
        self.held.lock().unwrap().retain(|r| r.seq > upto_seq);
        self.releases.lock().unwrap().push(upto_seq);
        self.released.notify_one();
        Ok(())
    }
    fn stages(&self) -> Option<bool> {
        Some(self.stages.load(Ordering::SeqCst))
    }
    async fn stage(&self, copy: u64, records: Vec<MirrorRecord>) -> Result<(), String> {
        self.check()?;
        let mut staged = self.staged.lock().unwrap();
        if staged.as_ref().is_none_or(|(c, _)| *c != copy) {
            *staged = Some((copy, Vec::new()));
        }
        let (_, held) = staged.as_mut().expect("set above");
        assert!(held.iter().chain(&records).collect::<Vec<_>>().windows(2).all(|w| w[0].seq < w[1].seq));
        held.extend(records);
        Ok(())
    }
    async fn open_staged(&self, copy: u64, records: u64) -> Result<(), String> {
        self.check()?;
        match self.staged.lock().unwrap().take() {
            Some((c, staged)) if c == copy && staged.len() as u64 == records => {
                *self.held.lock().unwrap() = staged;
                self.opens.fetch_add(1, Ordering::SeqCst);
                if self.lose_open_staged_answer.swap(false, Ordering::SeqCst) {
                    self.down.store(true, Ordering::SeqCst);
                    return Err("the metadata server is unreachable".into());
                }
                Ok(())
            }
            _ => Err(format!("no whole staged copy of attempt {copy}")),
        }
    }
}

impl MemoryMirror {
    /// A mirror whose answers wait until the returned sender says `false`.
    fn answering_later() -> (Arc<MemoryMirror>, watch::Sender<bool>) {
        let mirror = Arc::new(MemoryMirror::default());
        let (answer, held) = watch::channel(true);
        *mirror.hold_appends.lock().unwrap() = Some(held);
        (mirror, answer)
    }

    /// Waits until the next batch reaches the mirror.
    async fn sent(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.appending.notified())
            .await
            .expect("a batch is sent to the mirror while an earlier one waits for its answer");
    }
}

impl Setup {
    async fn open_mirrored(&self, mirror: &Arc<MemoryMirror>) -> CachedDevice {
        CachedDevice::open_mirrored(self.device.clone(), VolumeId(1), &self.config, mirror.clone()).await.unwrap()
    }
}

#[tokio::test]
async fn a_mirrored_write_is_acknowledged_once_the_mirror_has_it_and_released_after_destage() {
    let s = setup(LOG_BYTES_MIN, true);
    let (mirror, hold_mirror) = MemoryMirror::answering_later();
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    assert_eq!(cache.report().mirror, MirrorState::Mirrored);
    assert_eq!(mirror.opens.load(Ordering::SeqCst), 1, "mirroring starts afresh at open");
    let write = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.write(4096, Bytes::from(vec![7u8; 8192]), false).await })
    };
    // Sent to the mirror, which holds it: not acknowledged.
    mirror.appending.notified().await;
    tokio::task::yield_now().await;
    assert!(!write.is_finished(), "acknowledged before the mirror had it");
    hold_mirror.send(false).unwrap();
    write.await.unwrap().unwrap();
    // A large write over logged records is logged and mirrored too.
    let all = writes(30, 5);
    for (offset, data) in &all {
        cache.write(*offset, Bytes::from(data.clone()), false).await.unwrap();
    }
    const BIG_AT: u64 = 0;
    cache.write(BIG_AT, Bytes::from(vec![9u8; WRITE_AROUND_BYTES_MIN]), false).await.unwrap();
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 0, "the device is held: everything is in the cache");
    let mut model_all = vec![0u8; BIG_AT as usize + WRITE_AROUND_BYTES_MIN];
    model_all[4096..4096 + 8192].fill(7);
    for (offset, data) in &all {
        model_all[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    model_all[BIG_AT as usize..].fill(9);
    assert_eq!(mirror.replayed(&vec![0u8; model_all.len()]), model_all, "the mirror alone restores every write");
    s.hold.send(false).unwrap();
    cache.destage_all().await;
    assert!(mirror.held.lock().unwrap().is_empty(), "destaged records are released at the mirror");
}

#[test]
fn a_round_writes_the_union_of_its_records_merged_with_the_newest_bytes() {
    let queued = |seq: u64, offset: u64, len: usize, fill: u8| Queued {
        seq,
        pos: 0,
        offset,
        data: Bytes::from(vec![fill; len]),
        logged_at: tokio::time::Instant::now(),
    };
    let (a, b, c) = (queued(1, 0, 8192, 1), queued(2, 4096, 8192, 2), queued(3, 0, 4096, 3));
    let far = queued(4, 4 << 20, 4096, 4);
    let long = queued(5, 8 << 20, 3 << 19, 5);
    let mut dirty = DirtyMap::default();
    for r in [&a, &b, &c, &far, &long] {
        dirty.insert(r.offset, r.data.clone(), r.seq);
    }
    // `c` is newer than the round: its bytes go with it (it stays queued).
    let planned = plan_round(&[a, b, far, long], &dirty).unwrap();
    let writes: Vec<(u64, Bytes)> = planned.into_iter().map(|(at, pieces)| (at, dirty::join(pieces))).collect();
    let mut first = vec![3u8; 4096];
    first.extend(vec![2u8; 8192]);
    assert_eq!(writes[0], (0, Bytes::from(first)), "overlapping records: one write, newest bytes");
    assert_eq!(writes[1], (4 << 20, Bytes::from(vec![4u8; 4096])));
    // Longer than one device write: cut.
    assert_eq!(writes[2], (8 << 20, Bytes::from(vec![5u8; 1 << 20])));
    assert_eq!(writes[3], ((8 << 20) + (1 << 20), Bytes::from(vec![5u8; 1 << 19])));
    assert_eq!(writes.len(), 4);
    // A byte of the round missing from the dirty map: no plan.
    let mut partial = DirtyMap::default();
    partial.insert(0, Bytes::from(vec![1u8; 4096]), 1);
    assert!(plan_round(&[queued(1, 0, 8192, 1)], &partial).is_none());
}

#[tokio::test]
async fn destage_merges_neighbouring_writes_and_writes_each_byte_once() {
    let s = setup(LOG_BYTES_MIN, true);
    let cache = s.open().await.unwrap();
    // 64 neighbouring 4 KiB writes in a scattered order, then 16 of them
    // again: 80 records, 256 KiB of the volume.
    let mut model = vec![0u8; 64 * 4096];
    let mut count = 0;
    for pass in 0..2u64 {
        for i in 0..64u64 {
            let block = (i * 37) % 64;
            if pass == 1 && block % 4 != 0 {
                continue;
            }
            let fill = (block + pass * 64 + 1) as u8;
            logged(cache.write(block * 4096, Bytes::from(vec![fill; 4096]), false), "a small write").await;
            model[block as usize * 4096..(block as usize + 1) * 4096].fill(fill);
            count += 1;
        }
    }
    assert_eq!(count, 80);
    s.hold.send(false).unwrap();
    cache.destage_all().await;
    assert_eq!(s.memory.read(0, model.len() as u32).await.unwrap(), model);
    // The first round may have taken only the first write (the device was
    // held while the rest were logged); the rest go as one.
    let device_writes = s.device.writes.load(Ordering::SeqCst);
    assert!(device_writes <= 3, "{device_writes} device writes for 80 records over 256 contiguous KiB");
}

/// Spawns a 4 KiB write of `fill` at `offset`.
fn spawn_write(cache: &Arc<CachedDevice>, offset: u64, fill: u8) -> tokio::task::JoinHandle<Result<(), IoError>> {
    let cache = cache.clone();
    tokio::spawn(async move { cache.write(offset, Bytes::from(vec![fill; 4096]), false).await })
}

/// Yields to the cache's tasks a while (for checks that something did not
/// happen: a wrong implementation would have done it by then).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn records_on_the_devices_are_released_together_once_the_destager_has_nothing_left_to_write() {
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    // A's round reaches the (held) device; B is logged and mirrored
    // meanwhile, so the destager has B to write right after A.
    spawn_write(&cache, 0, 1).await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.device.arrival.notified()).await.expect("A's round is written");
    spawn_write(&cache, 1 << 20, 2).await.unwrap().unwrap();
    let last_seq = mirror.held.lock().unwrap().last().unwrap().seq;
    s.hold.send(false).unwrap();
    // No one waits and the log has room: A's space is not released between
    // the two rounds (a release costs a synchronous write on each side),
    // but with B's, once the destager is idle.
    tokio::time::timeout(Duration::from_secs(10), mirror.released.notified()).await.expect("released once idle");
    assert_eq!(*mirror.releases.lock().unwrap(), vec![last_seq], "one release for both rounds");
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 2);
    assert!(mirror.held.lock().unwrap().is_empty());
    let status = cache.status();
    assert_eq!((status.records, status.dirty_bytes), (0, 0), "{status:?}");
    // Waiting for the destage (as a recall or a write-through
    // acknowledgement does) is answered once it is released.
    spawn_write(&cache, 2 << 20, 3).await.unwrap().unwrap();
    cache.destage_all().await;
    assert_eq!(mirror.releases.lock().unwrap().len(), 2);
    assert_eq!(s.memory.read(2 << 20, 4096).await.unwrap(), vec![3u8; 4096]);
}

#[tokio::test]
async fn mirror_appends_are_pipelined_and_each_write_waits_for_its_answer() {
    let s = setup(LOG_BYTES_MIN, true);
    let (mirror, answer) = MemoryMirror::answering_later();
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    // One write after another, each sent to the mirror while the earlier
    // ones' answers are still to come.
    let mut writes = Vec::new();
    for i in 0..MIRROR_APPENDS_IN_FLIGHT_MAX as u64 {
        writes.push(spawn_write(&cache, i * 8192, i as u8 + 1));
        mirror.sent().await;
    }
    // No more than that many wait for an answer: the next one is logged but
    // not sent yet.
    let last = spawn_write(&cache, 1 << 20, 0xee);
    settle().await;
    assert_eq!(mirror.held.lock().unwrap().len(), MIRROR_APPENDS_IN_FLIGHT_MAX, "more appends than allowed in flight");
    assert!(writes.iter().chain([&last]).all(|w| !w.is_finished()), "acknowledged before the mirror answered");
    answer.send(false).unwrap();
    for w in writes {
        w.await.unwrap().unwrap();
    }
    last.await.unwrap().unwrap();
    assert_eq!(mirror.held.lock().unwrap().len(), MIRROR_APPENDS_IN_FLIGHT_MAX + 1);
    assert_eq!(cache.report().mirror, MirrorState::Mirrored);
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 0, "acknowledged from the log and the mirror, not the device");
}

#[tokio::test]
async fn after_a_failed_answer_later_answers_do_not_acknowledge_until_the_devices_have_the_writes() {
    let s = setup(LOG_BYTES_MIN, true);
    let (mirror, answer) = MemoryMirror::answering_later();
    // The first append's answer is lost; the second's says "mirrored".
    mirror.failed_answers.lock().unwrap().extend([true, false]);
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    let first = spawn_write(&cache, 0, 1);
    mirror.sent().await;
    let second = spawn_write(&cache, 8192, 2);
    mirror.sent().await;
    answer.send(false).unwrap();
    while !matches!(cache.report().mirror, MirrorState::WriteThrough { .. }) {
        tokio::task::yield_now().await;
    }
    settle().await;
    // The mirror may hold the second without the first: only the devices
    // make either durable now.
    assert!(!first.is_finished() && !second.is_finished(), "acknowledged by a mirror that failed meanwhile");
    s.hold.send(false).unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(s.memory.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
    assert_eq!(s.memory.read(8192, 4096).await.unwrap(), vec![2u8; 4096]);
}

#[tokio::test]
async fn after_a_failed_answer_writes_still_in_flight_do_not_wait_for_their_answers() {
    let s = setup(LOG_BYTES_MIN, true);
    // Answers never come, except the first one's failure, when let go.
    let (mirror, _never) = MemoryMirror::answering_later();
    let (fail_first, gate) = watch::channel(true);
    *mirror.failure_gate.lock().unwrap() = Some(gate);
    mirror.failed_answers.lock().unwrap().push_back(true);
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    // Three batches, each sent while the ones before wait for an answer.
    let mut writes = Vec::new();
    for i in 0..3u64 {
        writes.push((spawn_write(&cache, i * 8192, i as u8 + 1), i));
        mirror.sent().await;
    }
    fail_first.send(false).unwrap();
    s.hold.send(false).unwrap();
    // Written through: acknowledged once on the device, not after the
    // answers (which never come) time out.
    for (w, i) in writes {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap_or_else(|_| panic!("write {i} waits for the answer of a mirror that failed"))
            .unwrap()
            .unwrap();
        assert_eq!(s.memory.read(i * 8192, 4096).await.unwrap(), vec![i as u8 + 1; 4096]);
    }
    assert!(matches!(cache.report().mirror, MirrorState::WriteThrough { .. }));
}

/// Awaits `write`, which must be acknowledged without the (held) device.
async fn logged(write: impl std::future::Future<Output = Result<(), IoError>>, what: &str) {
    match tokio::time::timeout(Duration::from_secs(10), write).await {
        Ok(result) => result.unwrap(),
        Err(_) => panic!("{what}: not acknowledged while the device is held, so it was not logged"),
    }
}

#[tokio::test]
async fn a_mirrored_cache_writes_large_writes_around_only_where_the_mirror_holds_nothing() {
    const A: u64 = 1 << 20;
    const B: u64 = 2 << 20;
    const BIG: usize = WRITE_AROUND_BYTES_MIN;
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    // Over a logged (and mirrored) record: logged, so the mirror's replay
    // writes both in order.
    logged(cache.write(A + 4096, Bytes::from(vec![1u8; 8192]), false), "a small write").await;
    logged(cache.write(A, Bytes::from(vec![2u8; BIG]), false), "a large write over a logged record").await;
    assert_eq!(cache.report().written_around_bytes, 0);
    let replayed = mirror.replayed(&vec![0u8; DEVICE_BYTES as usize]);
    assert_eq!(&replayed[A as usize..A as usize + BIG], &vec![2u8; BIG][..]);
    // Where nothing is logged: straight to the (held) device, not mirrored.
    let around = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.write(B, Bytes::from(vec![3u8; BIG]), false).await })
    };
    while !s.device.arrived.lock().unwrap().contains(&B) && !around.is_finished() {
        tokio::task::yield_now().await;
    }
    assert!(!around.is_finished(), "a write around the cache was acknowledged before the device had it");
    s.hold.send(false).unwrap();
    around.await.unwrap().unwrap();
    assert_eq!(s.memory.read(B, BIG as u32).await.unwrap(), vec![3u8; BIG]);
    assert!(mirror.held.lock().unwrap().iter().all(|r| r.offset != B), "written around, yet mirrored");
    assert_eq!(cache.report().written_around_bytes, BIG as u64);
    // Once destaged (and released at the mirror), the first range is free
    // to be written around too.
    cache.destage_all().await;
    cache.write(A, Bytes::from(vec![4u8; BIG]), false).await.unwrap();
    assert_eq!(cache.report().written_around_bytes, 2 * BIG as u64);
    // A newer small write over a written-around range is mirrored, and the
    // replay of what the mirror holds (if this agent died now) keeps every
    // acknowledged write in order.
    s.hold.send(true).unwrap();
    logged(cache.write(B + 4096, Bytes::from(vec![5u8; 4096]), false), "a small write").await;
    let mut want = vec![0u8; DEVICE_BYTES as usize];
    want[A as usize..A as usize + BIG].fill(4);
    want[B as usize..B as usize + BIG].fill(3);
    want[B as usize + 4096..B as usize + 8192].fill(5);
    let device = s.memory.read(0, DEVICE_BYTES as u32).await.unwrap();
    assert!(mirror.replayed(&device) == want, "the mirror's replay over the device differs from the writes");
    // Writing through (the mirror is down): the mirror may hold records
    // released here, so nothing goes around.
    s.hold.send(false).unwrap();
    mirror.down.store(true, Ordering::SeqCst);
    cache.write(0, Bytes::from(vec![6u8; 4096]), false).await.unwrap();
    assert!(matches!(cache.report().mirror, MirrorState::WriteThrough { .. }));
    cache.write(3 << 20, Bytes::from(vec![7u8; BIG]), false).await.unwrap();
    assert_eq!(cache.report().written_around_bytes, 2 * BIG as u64, "written around while writing through");
    cache.destage_all().await;
}

#[tokio::test]
async fn a_failed_mirror_means_write_through_until_it_answers_again() {
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    cache.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
    mirror.down.store(true, Ordering::SeqCst);
    let write = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.write(8192, Bytes::from(vec![2u8; 4096]), false).await })
    };
    while !matches!(cache.report().mirror, MirrorState::WriteThrough { .. }) {
        tokio::task::yield_now().await;
    }
    assert!(!write.is_finished(), "without the mirror a write waits for the devices");
    s.hold.send(false).unwrap();
    write.await.unwrap().unwrap();
    assert_eq!(s.memory.read(8192, 4096).await.unwrap(), vec![2u8; 4096], "on the device when acknowledged");
    // The mirror comes back: once everything it acknowledged is on the
    // devices, mirroring starts afresh.
    mirror.down.store(false, Ordering::SeqCst);
    while cache.report().mirror != MirrorState::Mirrored {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mirror.opens.load(Ordering::SeqCst), 2);
    s.hold.send(true).unwrap();
    cache.write(16384, Bytes::from(vec![3u8; 4096]), false).await.unwrap();
    assert_eq!(mirror.held.lock().unwrap().len(), 1, "mirrored again");
    s.hold.send(false).unwrap();
    cache.destage_all().await;
}

/// Mirroring again with the log's records: a mirror that answers again
/// (a server of protocol 15) is started holding every record the log still
/// holds — without waiting for the devices, which are held here the whole
/// time — and the writes after it are acknowledged once mirrored, as
/// before the failure. At every point the mirror alone restores every
/// acknowledged write.
#[tokio::test]
async fn a_mirror_that_answers_again_starts_with_the_records_the_log_holds_without_waiting_for_the_devices() {
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    mirror.stages.store(true, Ordering::SeqCst);
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    let mut model = vec![0u8; 64 << 10];
    cache.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
    model[..4096].fill(1);
    mirror.down.store(true, Ordering::SeqCst);
    let through = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.write(8192, Bytes::from(vec![2u8; 4096]), false).await })
    };
    while !matches!(cache.report().mirror, MirrorState::WriteThrough { .. }) {
        tokio::task::yield_now().await;
    }
    mirror.down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), async {
        while cache.report().mirror != MirrorState::Mirrored {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("mirrored again while the devices still lack the cached writes");
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 0, "nothing reached the held device");
    assert_eq!(mirror.opens.load(Ordering::SeqCst), 2);
    // The write made while the mirror was down is in the mirror now; it
    // is acknowledged once on the devices (it was written through).
    model[8192..12288].fill(2);
    assert_eq!(mirror.replayed(&vec![0u8; model.len()]), model, "the mirror holds both records");
    assert!(!through.is_finished(), "a write-through write was acknowledged before the devices had it");
    // Mirrored again: acknowledged once the mirror has it.
    tokio::time::timeout(Duration::from_secs(10), cache.write(16384, Bytes::from(vec![3u8; 4096]), false))
        .await
        .expect("a write after mirroring started again waited for the devices")
        .unwrap();
    model[16384..20480].fill(3);
    assert_eq!(mirror.replayed(&vec![0u8; model.len()]), model, "the mirror alone restores every write");
    s.hold.send(false).unwrap();
    through.await.unwrap().unwrap();
    cache.destage_all().await;
    assert_eq!(device_image(&s.memory).await[..model.len()], model[..]);
    assert!(mirror.held.lock().unwrap().is_empty(), "released at the mirror once on the devices");
}

/// The known-gap scenario of issue 15: the mirror fails while it holds a
/// record; a write-through write over that record's range would be put
/// back under the record's older bytes if the agent died and the server
/// replayed its mirror. So it is acknowledged only once the mirror has been
/// emptied; a write-through write elsewhere once it is on the devices.
#[tokio::test]
async fn a_write_through_write_over_a_record_the_failed_mirror_holds_waits_until_the_mirror_is_emptied() {
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    cache.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
    mirror.down.store(true, Ordering::SeqCst);
    let spawn_write = |offset: u64, byte: u8| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.write(offset, Bytes::from(vec![byte; 4096]), false).await })
    };
    let over = spawn_write(0, 2);
    while !matches!(cache.report().mirror, MirrorState::WriteThrough { .. }) {
        tokio::task::yield_now().await;
    }
    let beside = spawn_write(8192, 3);
    s.hold.send(false).unwrap();
    beside.await.unwrap().unwrap();
    cache.destage_all().await;
    let image = device_image(&s.memory).await;
    assert_eq!(&image[..4096], &[2u8; 4096][..], "the write over the record is on the device");
    assert_eq!(&image[8192..12288], &[3u8; 4096][..]);
    // What a replay of the failed mirror would do now: put the older
    // record back over the newer write.
    assert_eq!(&mirror.replayed(&image)[..4096], &[1u8; 4096][..], "the failed mirror still holds the old record");
    // Every task has had its turn (one thread): the write over the record
    // is still not acknowledged.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!over.is_finished(), "a write the failed mirror's replay would undo was acknowledged");
    assert_eq!(cache.report().writes_waiting_for_mirror, 1, "the report shows the write waiting");
    // The mirror answers again: started afresh (emptied), the write is
    // acknowledged.
    mirror.down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), over)
        .await
        .expect("acknowledged once the mirror is emptied")
        .unwrap()
        .unwrap();
    assert_eq!(cache.report().mirror, MirrorState::Mirrored);
    assert_eq!(cache.report().writes_waiting_for_mirror, 0);
    assert!(mirror.held.lock().unwrap().is_empty(), "emptied when mirroring started again");
}

/// A staging attempt that fails may still have become the mirror: the
/// server committed the generation holding the staged records and the
/// answer was lost (or it prepared the generation and died before the
/// commit, and its replay takes the prepared file). A record logged after
/// the mirror failed (written through, not among what the failed mirror
/// held) is staged; a later write-through write over its range would be put
/// back under the staged record's older bytes by that replay — so it waits
/// for the mirror to start again, as a write over a record of the failed
/// mirror does (before, it was acknowledged once on the devices).
#[tokio::test]
async fn a_write_through_write_over_a_record_staged_by_a_failed_attempt_waits_until_the_mirror_starts_again() {
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    mirror.stages.store(true, Ordering::SeqCst);
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    mirror.down.store(true, Ordering::SeqCst);
    let spawn_write = |offset: u64, byte: u8| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.write(offset, Bytes::from(vec![byte; 4096]), false).await })
    };
    // A write elsewhere finds the mirror failed.
    let first = spawn_write(0, 9);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(cache.report().mirror, MirrorState::WriteThrough { .. }) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the failed mirror is noticed");
    // Logged once mirroring failed: the failed mirror never had it.
    let older = spawn_write(8192, 1);
    // The mirror answers again: the log's record is staged, the mirror
    // started with it, and the answer lost.
    mirror.lose_open_staged_answer.store(true, Ordering::SeqCst);
    mirror.down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), async {
        while mirror.opens.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the staged records are started as the mirror");
    assert!(matches!(cache.report().mirror, MirrorState::WriteThrough { .. }), "the attempt failed here");
    let newer = spawn_write(8192, 2);
    tokio::time::timeout(Duration::from_secs(10), async {
        while cache.read(8192, 4096).await.unwrap()[..] != [2u8; 4096][..] {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the newer write is logged");
    s.hold.send(false).unwrap();
    first.await.unwrap().unwrap();
    older.await.unwrap().unwrap();
    cache.destage_all().await;
    let image = device_image(&s.memory).await;
    assert!(image[8192..12288].iter().all(|b| *b == 2), "the newer write is on the device");
    // What a replay of the mirror the failed attempt left would do now.
    let replayed = mirror.replayed(&image);
    assert!(replayed[8192..12288].iter().all(|b| *b == 1), "the staged copy holds the older record");
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!newer.is_finished(), "a write the staged copy's replay would undo was acknowledged");
    assert_eq!(cache.report().writes_waiting_for_mirror, 1, "the report shows the write waiting");
    // The mirror answers again and starts afresh: the write is acknowledged.
    mirror.down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), newer)
        .await
        .expect("acknowledged once mirroring started again")
        .unwrap()
        .unwrap();
    assert_eq!(cache.report().mirror, MirrorState::Mirrored);
    assert_eq!(cache.report().writes_waiting_for_mirror, 0);
}

#[tokio::test]
async fn a_log_larger_than_the_free_space_fails_the_open_with_how_much_is_missing() {
    // More than any test machine's file system holds.
    let s = setup(1 << 60, false);
    match s.open().await {
        Err(CacheError::NoRoom { need_bytes, free_bytes, .. }) => {
            assert_eq!(need_bytes, 1 << 60);
            assert!(free_bytes < need_bytes);
        }
        Err(e) => panic!("expected NoRoom, got {e}"),
        Ok(_) => panic!("a {} byte log was opened", 1u64 << 60),
    }
    assert!(device_image(&s.memory).await.iter().all(|&b| b == 0));
}

/// An old log with acknowledged records (a crash): `OldLog::Replay` writes
/// them to the devices, `OldLog::Discard` (the server replayed its mirror
/// before a fresh open) writes nothing; both start an empty log.
#[tokio::test]
async fn an_old_log_is_replayed_after_a_resume_and_dropped_after_a_fresh_open() {
    for old in [OldLog::Replay, OldLog::Discard] {
        let s = setup(LOG_BYTES_MIN, true);
        let mirror = Arc::new(MemoryMirror::default());
        let all = writes(20, 3);
        {
            let cache = s.open_mirrored(&mirror).await;
            for (offset, data) in &all {
                cache.write(*offset, Bytes::from(data.clone()), false).await.unwrap();
            }
            // Dropped with the devices held: the crash.
        }
        assert!(device_image(&s.memory).await.iter().all(|&b| b == 0));
        s.hold.send_replace(false);
        let cache =
            CachedDevice::open_mirrored_with(s.device.clone(), VolumeId(1), &s.config, mirror.clone(), old, None)
                .await
                .unwrap();
        let image = device_image(&s.memory).await;
        match old {
            OldLog::Replay => {
                assert_eq!(cache.replayed_records(), all.len());
                assert_eq!(image, model(&all));
            }
            OldLog::Discard => {
                assert_eq!(cache.replayed_records(), 0);
                assert!(image.iter().all(|&b| b == 0), "a discarded log was written to the devices");
            }
        }
        assert_eq!(cache.status().records, 0);
    }
}

#[tokio::test]
async fn quiesce_destages_everything_empties_the_mirror_and_holds_new_writes_until_resumed() {
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    let all = writes(20, 11);
    for (offset, data) in &all {
        cache.write(*offset, Bytes::from(data.clone()), false).await.unwrap();
    }
    let quiesce = {
        let cache = cache.clone();
        let hold = cache.hold_writes();
        tokio::spawn(async move {
            let quiesced = cache.quiesce().await;
            (quiesced, cache.hold_is_current(hold))
        })
    };
    // A write arriving during the recall point waits, unacknowledged.
    let late = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.write(0, Bytes::from(vec![0xee; 4096]), false).await })
    };
    tokio::task::yield_now().await;
    assert!(!quiesce.is_finished(), "quiesced while the device still lacked acknowledged writes");
    s.hold.send(false).unwrap();
    let (quiesced, current) = quiesce.await.unwrap();
    quiesced.unwrap();
    assert!(current, "nothing ended the hold");
    let mut model = vec![0u8; DEVICE_BYTES as usize];
    for (offset, data) in &all {
        model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert_eq!(s.memory.read(0, DEVICE_BYTES as u32).await.unwrap(), model, "every acknowledged write is destaged");
    assert!(mirror.held.lock().unwrap().is_empty(), "the mirror holds nothing after a quiesce");
    assert_eq!(cache.status().records, 0);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!late.is_finished(), "a write was acknowledged during the recall point");
    assert_eq!(s.memory.read(0, 4096).await.unwrap(), model[..4096], "a held write reached the device");
    let hold = cache.hold_writes();
    cache.resume_writes();
    assert!(!cache.hold_is_current(hold), "a resume ends the hold");
    late.await.unwrap().unwrap();
    assert_eq!(cache.read(0, 4096).await.unwrap(), vec![0xee; 4096]);
}

/// Records the ranges [`BeforeLogged`] saw, and what the mirror held then;
/// fails while `fail` is set.
#[derive(Default)]
struct Preserving {
    mirror: Arc<MemoryMirror>,
    seen: std::sync::Mutex<Vec<(u64, u64)>>,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl BeforeLogged for Preserving {
    async fn before_logged(&self, ranges: &[(u64, u64)]) -> Result<(), IoError> {
        for &(offset, len) in ranges {
            let mirrored =
                self.mirror.held.lock().unwrap().iter().any(|r| r.offset == offset && r.data.len() as u64 == len);
            assert!(!mirrored, "a write was mirrored before its chunks were preserved");
        }
        self.seen.lock().unwrap().extend_from_slice(ranges);
        if self.fail.load(Ordering::SeqCst) {
            return Err(IoError::io("preserving failed"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn every_batch_is_preserved_before_it_is_logged_and_a_failed_preserve_fails_its_writes() {
    let s = setup(LOG_BYTES_MIN, true);
    let mirror = Arc::new(MemoryMirror::default());
    let preserving = Arc::new(Preserving { mirror: mirror.clone(), ..Preserving::default() });
    let before: Arc<dyn BeforeLogged> = preserving.clone();
    let cache = CachedDevice::open_mirrored_with(
        s.device.clone(),
        VolumeId(1),
        &s.config,
        mirror.clone(),
        OldLog::Replay,
        Some(before),
    )
    .await
    .unwrap();
    cache.write(8192, Bytes::from(vec![3u8; 4096]), false).await.unwrap();
    assert_eq!(*preserving.seen.lock().unwrap(), vec![(8192, 4096)]);
    assert_eq!(mirror.held.lock().unwrap().len(), 1);
    preserving.fail.store(true, Ordering::SeqCst);
    let e = cache.write(65536, Bytes::from(vec![4u8; 4096]), false).await.unwrap_err();
    assert!(e.message.contains("preserving failed"), "{e}");
    assert_eq!(mirror.held.lock().unwrap().len(), 1, "a write that was not preserved is neither logged nor mirrored");
    assert_eq!(cache.status().records, 1);
}

// The clean blocks kept for reads (`clean`): never older than the devices
// where no dirty record lies over them.

const BLOCK: u64 = clean::BLOCK_BYTES;

fn filled(fill: u8, len: u64) -> Bytes {
    Bytes::from(vec![fill; len as usize])
}

#[tokio::test]
async fn re_reads_come_from_memory_until_the_devices_change() {
    let s = setup(LOG_BYTES_MIN, false);
    s.memory.write(0, filled(1, 4 * BLOCK), false).await.unwrap();
    let cache = s.open().await.unwrap();
    assert_eq!(cache.read(0, 4 * BLOCK as u32).await.unwrap(), filled(1, 4 * BLOCK));
    let device_reads = s.device.reads.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(cache.read(BLOCK, BLOCK as u32).await.unwrap(), filled(1, BLOCK));
        assert_eq!(cache.read(10, 3 * BLOCK as u32).await.unwrap(), filled(1, 3 * BLOCK));
    }
    assert_eq!(s.device.reads.load(Ordering::SeqCst), device_reads, "re-reads stay in memory");
    let stats = cache.report().read_cache;
    assert_eq!((stats.bytes, stats.hits, stats.misses), (4 * BLOCK, 6, 1));

    // A cached write, destaged: the block is read from the devices again.
    cache.write(BLOCK, filled(2, BLOCK), false).await.unwrap();
    assert_eq!(cache.read(BLOCK, BLOCK as u32).await.unwrap(), filled(2, BLOCK));
    cache.destage_all().await;
    assert_eq!(cache.read(BLOCK, BLOCK as u32).await.unwrap(), filled(2, BLOCK), "after its destage");

    // A write around the log, TRIM and WRITE_ZEROES.
    let big = WRITE_AROUND_BYTES_MIN as u64;
    cache.write(4 << 20 >> 1, filled(3, big), false).await.unwrap();
    cache.read(4 << 20 >> 1, BLOCK as u32).await.unwrap();
    cache.write(4 << 20 >> 1, filled(4, big), false).await.unwrap();
    assert_eq!(cache.report().written_around_bytes, 2 * big);
    assert_eq!(cache.read(4 << 20 >> 1, BLOCK as u32).await.unwrap(), filled(4, BLOCK), "after a write-around");
    cache.trim(2 * BLOCK, BLOCK as u32, false).await.unwrap();
    assert_eq!(cache.read(2 * BLOCK, BLOCK as u32).await.unwrap(), filled(0, BLOCK), "after a TRIM");
    cache.write_zeroes(3 * BLOCK, BLOCK as u32, ZeroFlags::default()).await.unwrap();
    assert_eq!(cache.read(3 * BLOCK, BLOCK as u32).await.unwrap(), filled(0, BLOCK), "after WRITE_ZEROES");
    assert_eq!(cache.read(0, BLOCK as u32).await.unwrap(), filled(1, BLOCK), "an untouched block is still kept");
}

#[tokio::test]
async fn a_device_read_that_overlaps_a_destage_is_returned_but_not_kept() {
    let s = setup(LOG_BYTES_MIN, true);
    let cache = Arc::new(s.open().await.unwrap());
    cache.write(0, filled(5, BLOCK), false).await.unwrap();
    // A read over the dirty block and the next one reads the devices (old
    // bytes), and is held there while the write is destaged.
    s.hold_reads.send(true).unwrap();
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.read(0, 2 * BLOCK as u32).await })
    };
    while s.device.reads.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    s.hold.send(false).unwrap();
    cache.destage_all().await;
    s.hold_reads.send(false).unwrap();
    let read = reader.await.unwrap().unwrap();
    assert_eq!(&read[..BLOCK as usize], &filled(5, BLOCK)[..], "the overlay taken first covers the write");
    // Had it been kept, block 0 would now read the old bytes.
    assert_eq!(cache.read(0, BLOCK as u32).await.unwrap(), filled(5, BLOCK));
    assert_eq!(s.memory.read(0, BLOCK as u32).await.unwrap(), filled(5, BLOCK));
}

#[tokio::test]
async fn nbd_cache_prefetches_into_memory_and_no_room_means_no_clean_blocks() {
    let s = setup(LOG_BYTES_MIN, false);
    let cache = s.open().await.unwrap();
    cache.cache(0, 64 * BLOCK as u32).await.unwrap();
    let device_reads = s.device.reads.load(Ordering::SeqCst);
    cache.read(5 * BLOCK, 7 * BLOCK as u32).await.unwrap();
    assert_eq!(s.device.reads.load(Ordering::SeqCst), device_reads, "prefetched");
    drop(cache);

    let mut s = setup(LOG_BYTES_MIN, false);
    s.config.read_cache_bytes = 0;
    let cache = s.open().await.unwrap();
    cache.read(0, BLOCK as u32).await.unwrap();
    cache.read(0, BLOCK as u32).await.unwrap();
    assert_eq!(s.device.reads.load(Ordering::SeqCst), 2);
    assert_eq!(cache.report().read_cache, clean::CleanStats::default());
}

/// Concurrent writers (each owns its blocks and writes them with rising
/// versions; one owns a region it writes in large writes, around the log)
/// and readers of random ranges, over a device whose requests take varying
/// time, with a log small enough that destage rounds run all along. Every
/// block a read returns must hold a version at least as new as the last
/// one acknowledged before the read began, and no newer than the last one
/// begun before it ended: a clean block kept from a device read that
/// overlapped a destage, or not dropped by one, reads older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_never_see_a_block_older_than_its_last_acknowledged_write() {
    const BLOCKS: u64 = 640; // 2.5 MiB
    const WRITERS: u64 = 3;
    // Blocks 384..576 belong to the large writer (writes of 512 KiB).
    const LARGE_FIRST: u64 = 384;
    for seed in 1..=3u64 {
        let mut s = setup_with(LOG_BYTES_MIN, false, Some(seed));
        s.config.read_cache_bytes = 256 * BLOCK; // half the blocks: evictions too
        let cache = Arc::new(s.open().await.unwrap());
        let started: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
        let acked: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
        let version_block = |version: u64| Bytes::from(version.to_le_bytes().repeat(BLOCK as usize / 8));
        let mut tasks = Vec::new();
        for writer in 0..=WRITERS {
            let (cache, started, acked) = (cache.clone(), started.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = (seed * 31 + writer) | 1;
                for version in 1..=300u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (first, count) = if writer == WRITERS {
                        (LARGE_FIRST + (x % 2) * 64, WRITE_AROUND_BYTES_MIN as u64 / BLOCK)
                    } else {
                        // Blocks of this writer: b % WRITERS == writer, below LARGE_FIRST.
                        (writer + WRITERS * (x % (LARGE_FIRST / WRITERS)), 1)
                    };
                    let mut data = BytesMut::new();
                    for b in first..first + count {
                        started[b as usize].store(version, Ordering::SeqCst);
                        data.extend_from_slice(&version_block(version));
                    }
                    cache.write(first * BLOCK, data.freeze(), false).await.unwrap();
                    for b in first..first + count {
                        acked[b as usize].store(version, Ordering::SeqCst);
                    }
                }
            }));
        }
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for reader in 0..3u64 {
            let (cache, started, acked, done) = (cache.clone(), started.clone(), acked.clone(), done.clone());
            readers.push(tokio::spawn(async move {
                let mut x = (seed * 131 + reader) | 1;
                let mut reads = 0u64;
                loop {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let first = x % BLOCKS;
                    let count = (1 + (x >> 20) % 8).min(BLOCKS - first);
                    let low: Vec<u64> =
                        (first..first + count).map(|b| acked[b as usize].load(Ordering::SeqCst)).collect();
                    let data = cache.read(first * BLOCK, (count * BLOCK) as u32).await.unwrap();
                    for (i, b) in (first..first + count).enumerate() {
                        let at = i * BLOCK as usize;
                        let got = u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
                        let high = started[b as usize].load(Ordering::SeqCst);
                        assert!(
                            low[i] <= got && got <= high,
                            "seed {seed}: block {b} read version {got}; acknowledged before the read: {}, \
                             begun before its end: {high}",
                            low[i]
                        );
                    }
                    reads += 1;
                    if done.load(Ordering::SeqCst) {
                        return reads;
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let mut reads = 0;
        for reader in readers {
            reads += reader.await.unwrap();
        }
        cache.destage_all().await;
        for b in 0..BLOCKS {
            let got = cache.read(b * BLOCK, BLOCK as u32).await.unwrap();
            let want = acked[b as usize].load(Ordering::SeqCst);
            assert_eq!(u64::from_le_bytes(got[..8].try_into().unwrap()), want, "seed {seed}: block {b} at the end");
        }
        let report = cache.report();
        assert!(
            report.read_cache.hits > 0 && report.destaged_bytes > 0 && report.written_around_bytes > 0,
            "seed {seed}: {reads} reads, {:?}, {} bytes destaged, {} written around: the test would not exercise \
             the clean blocks across destages and write-arounds",
            report.read_cache,
            report.destaged_bytes,
            report.written_around_bytes
        );
    }
}

/// The next report, within 20 s (`None`: the reporter ended).
async fn next_report(
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<volume_format::control::messages::HolderCacheReport>,
) -> Option<volume_format::control::messages::HolderCacheReport> {
    tokio::time::timeout(Duration::from_secs(20), reports.recv()).await.expect("a report within 20 s")
}

/// The holder's reports to the server (`report`): the state at once, each
/// change of it with the reason, and none once the cache is gone.
#[tokio::test]
async fn the_cache_reports_its_state_and_each_change_until_it_is_gone() {
    let s = setup(LOG_BYTES_MIN, false);
    let mirror = Arc::new(MemoryMirror::default());
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let send = move |r| {
        let tx = tx.clone();
        async move { tx.send(r).map_err(|e| e.to_string()) }
    };
    super::report::spawn(Arc::downgrade(&cache), send, "v".into());
    let first = next_report(&mut reports).await.unwrap();
    assert_eq!((first.state.as_str(), first.why.as_str()), ("mirrored", ""));
    assert_eq!(first.log_capacity_bytes, cache.report().status.log_capacity_bytes);

    cache.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
    mirror.down.store(true, Ordering::SeqCst);
    cache.write(8192, Bytes::from(vec![2u8; 4096]), false).await.unwrap();
    loop {
        let r = next_report(&mut reports).await.unwrap();
        if r.state == "write-through" {
            assert!(r.why.contains("unreachable"), "{r:?}");
            break;
        }
        assert_eq!(r.state, "mirrored", "{r:?}");
    }
    drop(cache);
    while let Some(r) = next_report(&mut reports).await {
        assert_eq!(r.state, "write-through", "a report sent while the cache was dropped");
    }
}

/// A device whose completed writes are durable only once flushed, and that
/// can restart at its next flush: it forgets what was not flushed yet and
/// answers on a new connection (a new [`BlockDevice::connection_epoch`]),
/// as an NBD server that crashed and came back does to a client that
/// reconnects.
struct Forgetful {
    durable: MemoryDevice,
    unflushed: std::sync::Mutex<Vec<(u64, Bytes)>>,
    restart_at_next_flush: std::sync::atomic::AtomicBool,
    epoch: AtomicU64,
    flushes: AtomicU64,
}

#[async_trait]
impl BlockDevice for Forgetful {
    fn size(&self) -> u64 {
        self.durable.size()
    }
    fn connection_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let mut data = self.durable.read(offset, len).await?.to_vec();
        for (at, bytes) in self.unflushed.lock().unwrap().iter() {
            let (start, end) = ((*at).max(offset), (at + bytes.len() as u64).min(offset + u64::from(len)));
            if start < end {
                let src = &bytes[(start - at) as usize..(end - at) as usize];
                data[(start - offset) as usize..(end - offset) as usize].copy_from_slice(src);
            }
        }
        Ok(Bytes::from(data))
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        if fua {
            return self.durable.write(offset, data, true).await;
        }
        self.unflushed.lock().unwrap().push((offset, data));
        Ok(())
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let pending = std::mem::take(&mut *self.unflushed.lock().unwrap());
        if self.restart_at_next_flush.swap(false, Ordering::SeqCst) {
            // Restarted: the old connection's unflushed writes are gone; the
            // flush is answered on the new connection, truthfully.
            self.epoch.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        for (offset, data) in pending {
            self.durable.write(offset, data, false).await?;
        }
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), IoError> {
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u32, _: ZeroFlags) -> Result<(), IoError> {
        self.write(offset, Bytes::from(vec![0u8; len as usize]), false).await
    }
}

/// Found by the simulator: a destage round whose device restarted between
/// its writes and its flush (the flush then ran on a new connection) is
/// written again, so the log never releases a write the device lost.
#[tokio::test]
async fn a_round_whose_device_connection_was_replaced_before_its_flush_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig::new(dir.path().join("vol.cachelog"), LOG_BYTES_MIN);
    let device = Arc::new(Forgetful {
        durable: MemoryDevice::new(DEVICE_BYTES),
        unflushed: Default::default(),
        restart_at_next_flush: true.into(),
        epoch: AtomicU64::new(1),
        flushes: AtomicU64::new(0),
    });
    let cache = CachedDevice::open(device.clone(), VolumeId(1), &config).await.unwrap();
    let data = Bytes::from(vec![0x5a; 8192]);
    cache.write(4096, data.clone(), false).await.unwrap();
    cache.destage_all().await;
    assert!(device.flushes.load(Ordering::SeqCst) >= 2, "the round was flushed again after the restart");
    assert_eq!(device.durable.read(4096, 8192).await.unwrap(), data, "the device holds the write durably");
    assert_eq!(cache.status().dirty_bytes, 0);
}

/// [`setup`] with a destage hold of `hold` and a device that is not held.
fn setup_holding(log_bytes: u64, hold: Duration) -> Setup {
    let mut s = setup(log_bytes, false);
    s.config.destage_hold = hold;
    s
}

#[tokio::test]
async fn held_writes_reach_the_devices_once_however_often_they_were_rewritten() {
    let s = setup_holding(LOG_BYTES_MIN, Duration::from_secs(600));
    let mirror = Arc::new(MemoryMirror::default());
    let cache = Arc::new(s.open_mirrored(&mirror).await);
    let mut model = vec![0u8; 64 << 10];
    // Sixteen neighbouring blocks, each written four times, one write at a
    // time: without the hold each would reach the devices on its own.
    for pass in 0..4u8 {
        for block in 0..16usize {
            let fill = pass * 16 + block as u8 + 1;
            spawn_write(&cache, block as u64 * 4096, fill).await.unwrap().unwrap();
            model[block * 4096..(block + 1) * 4096].fill(fill);
        }
    }
    settle().await;
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 0, "nothing is destaged while the hold lasts");
    assert_eq!(cache.status().dirty_bytes, 64 << 10);
    // Someone waits (a recall point, a detach): the hold ends at once.
    cache.destage_all().await;
    assert_eq!(s.memory.read(0, model.len() as u32).await.unwrap(), model);
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 1, "64 writes of 16 blocks: one device write");
    assert!(mirror.held.lock().unwrap().is_empty(), "released at the mirror");
}

#[tokio::test]
async fn held_writes_are_destaged_once_the_oldest_is_as_old_as_the_hold() {
    let hold = Duration::from_millis(300);
    let s = setup_holding(LOG_BYTES_MIN, hold);
    let cache = Arc::new(s.open().await.unwrap());
    let arrival = s.device.arrival.notified();
    tokio::pin!(arrival);
    arrival.as_mut().enable();
    let logged = tokio::time::Instant::now();
    spawn_write(&cache, 0, 7).await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), arrival).await.expect("destaged once the hold ended");
    let waited = logged.elapsed();
    assert!(waited >= hold, "destaged after {waited:?}, before the {hold:?} hold ended");
    cache.destage_all().await;
    assert_eq!(s.memory.read(0, 4096).await.unwrap(), Bytes::from(vec![7u8; 4096]));
}

#[tokio::test]
async fn held_writes_are_destaged_once_they_fill_a_quarter_of_the_log() {
    let s = setup_holding(LOG_BYTES_MIN, Duration::from_secs(600));
    let cache = Arc::new(s.open().await.unwrap());
    let arrival = s.device.arrival.notified();
    tokio::pin!(arrival);
    arrival.as_mut().enable();
    // A quarter of the log in 64 KiB writes, nobody waiting for them.
    let quarter = LOG_BYTES_MIN / DESTAGE_HOLD_LOG_DIVISOR;
    for i in 0..quarter / (64 << 10) {
        cache.write(i * (64 << 10), Bytes::from(vec![i as u8; 64 << 10]), false).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), arrival).await.expect("destaged without waiting for the hold");
    cache.destage_all().await;
    assert_eq!(cache.status().dirty_bytes, 0);
}
