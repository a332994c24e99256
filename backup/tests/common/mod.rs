//! Test fixture: an in-process blockio NBD server on a unix socket that
//! plays the backup pseudo-device — read-only exports `vol@s1`, `vol@s2`
//! (offering `sanvol:changed-since:s1`) and `vol@s3` (grown, offering
//! `sanvol:changed-since:s2`) — plus writable restore targets, every
//! device counting what it is asked to do.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backup::source::Source;
use blockio::memory::MemoryDevice;
use blockio::server::{Export, ExportTable, NbdServer, ServerConfig};
use blockio::uri::NbdUri;
use blockio::{BlockDevice, BlockSizes, IoError, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use volume_format::control::messages::{changed_context_name, CHANGED_FLAG};

pub const CHUNK: u64 = 64 * 1024;
/// 64 full chunks and a short last one.
pub const SIZE: u64 = 64 * CHUNK + 20 * 1024;
/// `vol@s3`: the volume grown by 3 chunks and a bit.
pub const SIZE3: u64 = SIZE + 3 * CHUNK + 4096;

/// A memory device that counts reads and writes and can offer a
/// changed-block context.
pub struct TestDevice {
    pub mem: MemoryDevice,
    read_only: bool,
    /// (context name, granularity in bytes, changed blocks of that size).
    changed: Option<(String, u64, Vec<bool>)>,
    pub reads: Mutex<Vec<(u64, u32)>>,
    pub writes: AtomicU64,
    /// Added to every read.
    pub read_delay: Duration,
}

impl TestDevice {
    pub fn new(size: u64, read_only: bool) -> TestDevice {
        TestDevice {
            mem: MemoryDevice::new(size),
            read_only,
            changed: None,
            reads: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            read_delay: Duration::ZERO,
        }
    }

    /// Offers `sanvol:changed-since:OLD` marking the `granularity`-sized
    /// blocks that overlap any of `changed` (byte ranges).
    pub fn with_changed(mut self, old: &str, granularity: u64, changed: &[(u64, u64)]) -> TestDevice {
        let blocks = self.mem.size().div_ceil(granularity) as usize;
        let mut map = vec![false; blocks];
        for &(off, len) in changed {
            for b in off / granularity..(off + len).div_ceil(granularity) {
                map[b as usize] = true;
            }
        }
        self.changed = Some((changed_context_name(old), granularity, map));
        self
    }

    pub fn reads(&self) -> Vec<(u64, u32)> {
        self.reads.lock().unwrap().clone()
    }

    pub fn clear_reads(&self) {
        self.reads.lock().unwrap().clear();
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    pub async fn contents(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let size = self.mem.size();
        let mut off = 0;
        while off < size {
            let len = (size - off).min(1 << 20) as u32;
            out.extend_from_slice(&self.mem.read(off, len).await.unwrap());
            off += len as u64;
        }
        out
    }
}

#[async_trait]
impl BlockDevice for TestDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.mem.block_sizes()
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.changed.iter().map(|(name, _, _)| name.clone()).collect()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.reads.lock().unwrap().push((offset, len));
        if !self.read_delay.is_zero() {
            tokio::time::sleep(self.read_delay).await;
        }
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.mem.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.mem.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.mem.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.mem.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        match (context, &self.changed) {
            (MetaContext::Custom(name), Some((ours, gran, map))) if name == ours => {
                let end = offset + len as u64;
                let mut out: Vec<StatusExtent> = Vec::new();
                let mut at = offset;
                while at < end {
                    let block = at / gran;
                    let stop = ((block + 1) * gran).min(end);
                    let flags = if map[block as usize] { CHANGED_FLAG } else { 0 };
                    match out.last_mut() {
                        Some(last) if last.flags == flags => last.length += stop - at,
                        _ => out.push(StatusExtent { length: stop - at, flags }),
                    }
                    at = stop;
                }
                Ok(out)
            }
            _ => self.mem.block_status(context, offset, len).await,
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes applied to a fresh device: (offset, bytes).
pub type Writes = Vec<(u64, Vec<u8>)>;

/// `vol@s1`: data in chunks 0..8, a hole in 8..16, explicitly written
/// zeroes in 16..20, data in 20..40, a hole in 40..64 but for one byte at
/// the end of chunk 50, data in the short last chunk 64.
pub fn s1_writes() -> Writes {
    let mut w = vec![
        (0, pattern(1, 8 * CHUNK as usize)),
        (16 * CHUNK, vec![0u8; 4 * CHUNK as usize]),
        (20 * CHUNK, pattern(2, 20 * CHUNK as usize)),
    ];
    w.push((51 * CHUNK - 1, vec![0xA5]));
    w.push((64 * CHUNK, pattern(3, (SIZE - 64 * CHUNK) as usize)));
    w
}

/// What changes from s1 to s2 (byte ranges written), and the writes.
pub fn s2_changes() -> Writes {
    vec![
        (2 * CHUNK + 1000, pattern(10, 4096)),                  // chunk 2, partly
        (9 * CHUNK + 100, pattern(11, 300)),                    // chunk 9, was a hole
        (21 * CHUNK, vec![0u8; CHUNK as usize]),                // chunk 21 zeroed
        (30 * CHUNK + 5, pattern(12, 3 * CHUNK as usize - 10)), // chunks 30..33
        (SIZE - 100, pattern(13, 100)),                         // the short last chunk
    ]
}

/// Chunks s2 changed.
pub const S2_CHANGED: [u64; 7] = [2, 9, 21, 30, 31, 32, 64];

/// What changes from s2 to s3 (within s2's size; s3 is also larger).
pub fn s3_changes() -> Writes {
    vec![(5 * CHUNK, pattern(20, 100)), (SIZE - 10, pattern(21, 10)), (SIZE + CHUNK, pattern(22, 2 * CHUNK as usize))]
}

pub fn apply(model: &mut [u8], writes: &Writes) {
    for (off, data) in writes {
        model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
}

pub async fn fill(dev: &TestDevice, writes: &Writes) {
    for (off, data) in writes {
        dev.mem.write(*off, Bytes::from(data.clone()), false).await.unwrap();
    }
}

fn ranges(w: &Writes) -> Vec<(u64, u64)> {
    w.iter().map(|(o, d)| (*o, d.len() as u64)).collect()
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub table: Arc<ExportTable>,
    pub s1: Arc<TestDevice>,
    pub s2: Arc<TestDevice>,
    pub s3: Arc<TestDevice>,
    pub s1_model: Vec<u8>,
    pub s2_model: Vec<u8>,
    pub s3_model: Vec<u8>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Fixture {
    /// Starts the server; `granularity` is the changed-block list's.
    pub async fn start_with(granularity: u64) -> Fixture {
        let dir = tempfile::Builder::new().prefix("sanvol-backup-test-").tempdir().unwrap();
        let socket = dir.path().join("snapshots.sock");
        let mut s1_model = vec![0u8; SIZE as usize];
        apply(&mut s1_model, &s1_writes());
        let mut s2_model = s1_model.clone();
        apply(&mut s2_model, &s2_changes());
        let mut s3_model = s2_model.clone();
        s3_model.resize(SIZE3 as usize, 0);
        apply(&mut s3_model, &s3_changes());

        let s1 = TestDevice::new(SIZE, true);
        fill(&s1, &s1_writes()).await;
        let s2 = TestDevice::new(SIZE, true).with_changed("s1", granularity, &ranges(&s2_changes()));
        fill(&s2, &s1_writes()).await;
        fill(&s2, &s2_changes()).await;
        // The changed list of s3 names only the writes inside the old size:
        // the grown part must be picked up by the backup tool itself.
        let inside: Writes = s3_changes().into_iter().filter(|(o, _)| *o < SIZE).collect();
        let s3 = TestDevice::new(SIZE3, true).with_changed("s2", granularity, &ranges(&inside));
        fill(&s3, &s1_writes()).await;
        fill(&s3, &s2_changes()).await;
        fill(&s3, &s3_changes()).await;
        let (s1, s2, s3) = (Arc::new(s1), Arc::new(s2), Arc::new(s3));

        let table = Arc::new(ExportTable::new());
        for (name, dev) in [("vol@s1", &s1), ("vol@s2", &s2), ("vol@s3", &s3)] {
            table.insert(Export { read_only: true, ..Export::new(name, dev.clone() as Arc<dyn BlockDevice>) });
        }
        let server = NbdServer::new(table.clone(), ServerConfig::default());
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = server
                .serve_unix(listener, async {
                    let _ = rx.await;
                })
                .await;
        });
        Fixture { dir, socket, table, s1, s2, s3, s1_model, s2_model, s3_model, stop: Some(tx) }
    }

    pub async fn start() -> Fixture {
        Fixture::start_with(CHUNK).await
    }

    /// The server's URI (default export).
    pub fn uri(&self) -> NbdUri {
        NbdUri::unix(&self.socket, "")
    }

    pub fn uri_string(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn source(&self) -> Source {
        Source::Uri(self.uri())
    }

    /// A fresh writable export `name` of `size` bytes.
    pub fn target(&self, name: &str, size: u64) -> Arc<TestDevice> {
        let dev = Arc::new(TestDevice::new(size, false));
        self.table.insert(Export::new(name, dev.clone() as Arc<dyn BlockDevice>));
        dev
    }

    pub fn target_uri(&self, name: &str) -> NbdUri {
        NbdUri::unix(&self.socket, name)
    }

    /// A path for a repository (not created).
    pub fn repo(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn quiet() -> backup::JobOptions {
    backup::JobOptions { progress: backup::progress::ProgressMode::Quiet, ..backup::JobOptions::default() }
}

/// The one backup directory whose name starts with `prefix`.
pub fn backup_dir(repo: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(repo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    assert_eq!(found.len(), 1, "expected one backup named {prefix}* in {}: {found:?}", repo.display());
    found[0].clone()
}

/// A real nbdkit (`memory SIZE`) on a unix socket, killed by its PID on drop.
pub struct Nbdkit {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Nbdkit {
    pub fn memory(size: u64) -> Nbdkit {
        Nbdkit::start(&["memory", &size.to_string()])
    }

    /// nbdkit with these filters, plugin and plugin arguments.
    pub fn start(args: &[&str]) -> Nbdkit {
        let dir = tempfile::Builder::new().prefix("sanvol-backup-nbdkit-").tempdir().unwrap();
        let socket = dir.path().join("nbdkit.sock");
        let pid = dir.path().join("nbdkit.pid");
        let child = Command::new("nbdkit")
            .arg("--foreground")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(&socket)
            .arg("-P")
            .arg(&pid)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("nbdkit is not installed: run scripts/install-deps.sh (it is a real NBD peer for this test)");
        let mut kit = Nbdkit { child, dir, socket };
        // nbdkit writes its pid file only once it listens.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pid.exists() {
            if let Ok(Some(status)) = kit.child.try_wait() {
                panic!("nbdkit exited at startup: {status}");
            }
            assert!(Instant::now() < deadline, "nbdkit did not start listening within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        kit
    }

    pub fn uri(&self) -> NbdUri {
        NbdUri::unix(&self.socket, "")
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
