//! Shared test harness: NBD devices served in-process by blockio's server,
//! keys, an embedded metadata server, control clients, and captured logs.
//!
//! Everything started here stops in `Drop` (servers get a shutdown signal;
//! temp dirs are removed), and waits are on events, never on sleeps.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use blockio::memory::MemoryDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::{BlockDevice, BlockSizes, IoError, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use control_client::keys;
use control_client::{ControlAddr, ControlClient};
use ed25519_dalek::{SigningKey, VerifyingKey};
use metadata_server::config::Config;
use metadata_server::pool::init::{init, InitOptions};
use metadata_server::server::Server;
use tokio::sync::{mpsc, oneshot, Notify};
use volume_format::control::auth::Role;
use volume_format::control::messages::ServerEvent;
use volume_format::PublicKey;

pub const MIB: u64 = 1 << 20;

/// A device whose writes can be made to fail (to test failed commits) and
/// whose reads at or beyond an offset can be held (to keep a server-side job
/// in flight for as long as a test needs).
pub struct FaultyDevice {
    inner: Arc<dyn BlockDevice>,
    pub fail_writes: AtomicBool,
    /// Reads at offsets >= this wait until it changes (`u64::MAX`: none held).
    hold_reads_from: tokio::sync::watch::Sender<u64>,
    /// Reads waiting right now, and a signal when one starts waiting.
    pub reads_held: std::sync::atomic::AtomicU64,
    pub read_held: Notify,
    /// Writes at offsets in this range wait until it changes (empty: none held).
    hold_writes: tokio::sync::watch::Sender<std::ops::Range<u64>>,
    /// Writes waiting right now, and a signal when one starts waiting.
    pub writes_held: std::sync::atomic::AtomicU64,
    pub write_held: Notify,
}

impl FaultyDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> FaultyDevice {
        FaultyDevice {
            inner,
            fail_writes: AtomicBool::new(false),
            hold_reads_from: tokio::sync::watch::channel(u64::MAX).0,
            reads_held: Default::default(),
            read_held: Notify::new(),
            hold_writes: tokio::sync::watch::channel(0..0).0,
            writes_held: Default::default(),
            write_held: Notify::new(),
        }
    }

    /// Holds every write at or beyond `offset` (`u64::MAX` releases them).
    pub fn hold_writes_from(&self, offset: u64) {
        self.hold_writes.send_replace(offset..u64::MAX);
    }

    /// Holds every write starting in `range` (an empty range releases them).
    pub fn hold_writes_in(&self, range: std::ops::Range<u64>) {
        self.hold_writes.send_replace(range);
    }

    /// Holds every read at or beyond `offset` (`u64::MAX` releases them).
    pub fn hold_reads_from(&self, offset: u64) {
        self.hold_reads_from.send_replace(offset);
    }

    fn check(&self) -> Result<(), IoError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(IoError::io("injected write failure"));
        }
        Ok(())
    }
}

/// Waits while `offset` is at or beyond what `hold` says, counted in
/// `count` and announced on `started`.
async fn held(
    hold: &tokio::sync::watch::Sender<u64>,
    count: &std::sync::atomic::AtomicU64,
    started: &Notify,
    offset: u64,
) {
    let mut hold = hold.subscribe();
    if offset >= *hold.borrow_and_update() {
        count.fetch_add(1, Ordering::SeqCst);
        started.notify_waiters();
        while offset >= *hold.borrow_and_update() {
            if hold.changed().await.is_err() {
                break;
            }
        }
        count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl BlockDevice for FaultyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        held(&self.hold_reads_from, &self.reads_held, &self.read_held, offset).await;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let mut hold = self.hold_writes.subscribe();
        if hold.borrow_and_update().contains(&offset) {
            self.writes_held.fetch_add(1, Ordering::SeqCst);
            self.write_held.notify_waiters();
            while hold.borrow_and_update().contains(&offset) {
                if hold.changed().await.is_err() {
                    break;
                }
            }
            self.writes_held.fetch_sub(1, Ordering::SeqCst);
        }
        self.check()?;
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.check()?;
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.check()?;
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.check()?;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.inner.block_status(context, offset, len).await
    }
}

/// A device with a volatile write cache, as a disk or an array has: a
/// write (without FUA) is readable at once but survives a power loss only
/// once a flush (or a later FUA write) made it durable. Flushes can be made
/// to fail, for a server that wrote and never flushed.
pub struct VolatileDevice {
    durable: MemoryDevice,
    /// Unflushed writes, in order: (offset, bytes).
    cached: Mutex<Vec<(u64, Bytes)>>,
    pub fail_flushes: AtomicBool,
}

impl VolatileDevice {
    pub fn new(size: u64) -> VolatileDevice {
        VolatileDevice {
            durable: MemoryDevice::new(size),
            cached: Mutex::new(Vec::new()),
            fail_flushes: AtomicBool::new(false),
        }
    }

    /// Bytes written and not yet flushed.
    pub fn cached_bytes(&self) -> usize {
        self.cached.lock().unwrap().iter().map(|(_, b)| b.len()).sum()
    }

    /// Power loss: the unflushed writes are gone.
    pub fn power_loss(&self) {
        self.cached.lock().unwrap().clear();
    }

    /// What the device holds durably, read past the cache.
    pub async fn read_durable(&self, offset: u64, len: u32) -> Bytes {
        self.durable.read(offset, len).await.unwrap()
    }

    async fn persist(&self) -> Result<(), IoError> {
        let cached = std::mem::take(&mut *self.cached.lock().unwrap());
        for (offset, bytes) in cached {
            self.durable.write(offset, bytes, false).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for VolatileDevice {
    fn size(&self) -> u64 {
        self.durable.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.durable.block_sizes()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let mut out = self.durable.read(offset, len).await?.to_vec();
        for (at, bytes) in self.cached.lock().unwrap().iter() {
            let (start, end) = ((*at).max(offset), (at + bytes.len() as u64).min(offset + len as u64));
            if start < end {
                out[(start - offset) as usize..(end - offset) as usize]
                    .copy_from_slice(&bytes[(start - at) as usize..(end - at) as usize]);
            }
        }
        Ok(Bytes::from(out))
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.cached.lock().unwrap().push((offset, data));
        if fua {
            return self.flush().await;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), IoError> {
        if self.fail_flushes.load(Ordering::SeqCst) {
            return Err(IoError::io("injected flush failure"));
        }
        self.persist().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.write(offset, Bytes::from(vec![0u8; len as usize]), fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.write(offset, Bytes::from(vec![0u8; len as usize]), flags.fua).await
    }
    async fn block_status(&self, _: &MetaContext, _: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        // Everything reads as data: the cache may hold what the durable
        // part does not.
        Ok(vec![StatusExtent { length: len as u64, flags: 0 }])
    }
}

/// NBD exports served in-process on unix sockets; stopped on drop.
pub struct Devices {
    pub uris: Vec<String>,
    pub devices: Vec<Arc<FaultyDevice>>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Devices {
    /// Serves each device at `dir/devN.sock`.
    pub async fn serve(dir: &Path, devices: Vec<Arc<dyn BlockDevice>>) -> Devices {
        let mut out = Devices { uris: Vec::new(), devices: Vec::new(), stops: Vec::new() };
        for (i, dev) in devices.into_iter().enumerate() {
            let faulty = Arc::new(FaultyDevice::new(dev));
            let path = dir.join(format!("dev{i}.sock"));
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let server = NbdServer::new(Arc::new(ExportTable::single("", faulty.clone())), ServerConfig::default());
            let (tx, rx) = oneshot::channel::<()>();
            tokio::spawn(async move {
                let _ = server
                    .serve_unix(listener, async move {
                        let _ = rx.await;
                    })
                    .await;
            });
            out.uris.push(format!("nbd+unix:///?socket={}", path.display()));
            out.devices.push(faulty);
            out.stops.push(tx);
        }
        out
    }

    /// `n` sparse memory devices of `size` bytes each.
    pub async fn memory(dir: &Path, n: usize, size: u64) -> Devices {
        let devices = (0..n).map(|_| Arc::new(MemoryDevice::new(size)) as Arc<dyn BlockDevice>).collect();
        Devices::serve(dir, devices).await
    }

    pub fn fail_writes(&self, fail: bool) {
        for d in &self.devices {
            d.fail_writes.store(fail, Ordering::SeqCst);
        }
    }
}

pub struct Key {
    pub path: PathBuf,
    pub public_path: PathBuf,
    pub signing: SigningKey,
    pub public: VerifyingKey,
}

pub fn key(dir: &Path, name: &str) -> Key {
    let path = dir.join(format!("{name}.key"));
    let public = keys::generate(&path, name).unwrap();
    Key { signing: keys::load_private(&path).unwrap(), public_path: keys::public_path_for(&path), path, public }
}

/// A pool on memory devices with keys for the server, an admin and two
/// agents, and an embedded server.
pub struct Pool {
    pub dir: tempfile::TempDir,
    pub devices: Devices,
    pub server_key: Key,
    pub admin: Key,
    pub agent_a: Key,
    pub agent_b: Key,
    pub config: Config,
    pub server: Option<RunningServer>,
}

pub const EXTENT_BYTES: u64 = MIB;

impl Pool {
    /// Three 64 MiB devices, 1 MiB extents, agents authorized, server up.
    pub async fn start(lease_ms: u64) -> Pool {
        Pool::start_with(lease_ms, metadata_server::config::DURABLE_MS_DEFAULT).await
    }

    /// [`Pool::start`] with handles reserved `durable_ms` past their lease.
    pub async fn start_with(lease_ms: u64, durable_ms: u64) -> Pool {
        logs();
        let dir = tempfile::tempdir().unwrap();
        let devices = Devices::memory(dir.path(), 3, 64 * MIB).await;
        let server_key = key(dir.path(), "mds");
        let admin = key(dir.path(), "admin");
        let agent_a = key(dir.path(), "host-a");
        let agent_b = key(dir.path(), "host-b");
        init(InitOptions {
            devices: devices.uris.iter().map(|u| u.parse().unwrap()).collect(),
            name: "test".into(),
            extent_bytes: EXTENT_BYTES,
            server_key: PublicKey(server_key.public.to_bytes()),
            admin_key: PublicKey(admin.public.to_bytes()),
            admin_name: "admin".into(),
            force: false,
        })
        .await
        .unwrap();
        let config = Config {
            listen: vec![ControlAddr::Unix(dir.path().join("mds.sock"))],
            key: server_key.path.clone(),
            devices: devices.uris.iter().map(|u| u.parse().unwrap()).collect(),
            lease_ms,
            durable_ms,
            // The tests' agents are the tests themselves, with nothing stuck
            // in a device: the shortest margin keeps exclusions prompt.
            device_request_max_ms: volume_format::fencing::DEVICE_REQUEST_MAX_MS_MIN,
            grace_ms: lease_ms + durable_ms,
            channel_mode_min: control_client::ChannelMode::Integrity,
            log: None,
            log_format: Default::default(),
            metrics_addr: None,
            availability: metadata_server::config::Availability {
                lease_io_timeout_ms: 250,
                ..metadata_server::config::Availability::defaults(&[ControlAddr::Unix(dir.path().join("mds.sock"))])
            },
            device_replace_after_ms: None,
            cache_mirror_dir: dir.path().join("cache-mirror"),
            backup_socket: None,
        };
        let mut pool = Pool { dir, devices, server_key, admin, agent_a, agent_b, config, server: None };
        pool.start_server().await;
        let admin = pool.admin().await;
        for (k, name) in [(&pool.agent_a, "host-a"), (&pool.agent_b, "host-b")] {
            admin
                .request(volume_format::control::messages::Request::ClientAuthorize {
                    key: k.public.to_bytes(),
                    name: name.into(),
                    role: Role::Agent,
                    volumes: Vec::new(),
                })
                .await
                .unwrap();
        }
        admin.close().await;
        pool
    }

    pub async fn start_server(&mut self) {
        self.server = Some(RunningServer::start(&self.config).await);
    }

    pub async fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    pub fn addr(&self) -> ControlAddr {
        self.config.listen[0].clone()
    }

    pub async fn connect(&self, key: &Key, role: Role, name: &str) -> (ControlClient, mpsc::Receiver<ServerEvent>) {
        ControlClient::connect(&self.addr(), &key.signing, Some(&self.server_key.public), role, name, [7; 16])
            .await
            .unwrap()
    }

    pub async fn admin(&self) -> ControlClient {
        self.connect(&self.admin, Role::Admin, "admin-cli").await.0
    }

    /// `sanvol` with the connection flags of this pool.
    pub fn cli(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_sanvol"));
        c.env("SANVOL_MDS", self.addr().to_string())
            .env("SANVOL_KEY", &self.admin.path)
            .env("SANVOL_SERVER_KEY", &self.server_key.public_path)
            .kill_on_drop(true);
        c
    }
}

/// An embedded `sanvol-mds`; stopped (gracefully) by `stop` or on drop.
pub struct RunningServer {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    pub async fn start(config: &Config) -> RunningServer {
        let server = Server::bind(config).await.unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        RunningServer { stop: Some(tx), task: Some(task) }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Runs a command to completion; returns (success, stdout, stderr).
pub async fn run(cmd: &mut tokio::process::Command) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("command timed out").unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

// ---- captured logs ----

struct Logs {
    text: Mutex<String>,
    changed: Notify,
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<&'static Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Logs = Box::leak(Box::new(Logs { text: Mutex::new(String::new()), changed: Notify::new() }));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || LogWriter(logs))
            .try_init();
        logs
    })
}

struct LogWriter(&'static Logs);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let s = String::from_utf8_lossy(buf);
        eprint!("{s}");
        self.0.text.lock().unwrap().push_str(&s);
        self.0.changed.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits (up to 10 s) until a log line contains every one of `parts`.
pub async fn wait_for_log(parts: &[&str]) -> String {
    let logs = logs();
    let found = || logs.text.lock().unwrap().lines().find(|l| parts.iter().all(|p| l.contains(p))).map(str::to_string);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let notified = logs.changed.notified();
            if let Some(line) = found() {
                return line;
            }
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line contains all of {parts:?}"))
}
