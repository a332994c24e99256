//! Connection threads that poll before they block
//! (`ServerConfig::poll_before_block`): requests that arrive while a thread
//! polls and requests that find it asleep are answered alike; a waiting
//! connection stops polling once the window has passed, a reader does not
//! poll while two of the connection's requests are running, and only one
//! thread of the process polls at a time.
//!
//! Its own test binary, and its tests one at a time ([`SERIAL`]): they read
//! the states of the process's connection threads, which nothing else may
//! add to meanwhile.

mod server_common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockio::memory::MemoryDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::{BlockDevice, IoError, ZeroFlags};
use bytes::Bytes;
use server_common::RawClient;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// A test that waits longer than this for the server has found a hang.
const PATIENCE: Duration = Duration::from_secs(20);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// States (`/proc/self/task/*/stat`, third field) of this process's
/// connection threads.
fn connection_thread_states() -> Vec<char> {
    let mut states = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "tid (comm) S ...": the comm may hold spaces, the state follows its ')'.
        let Some((comm, rest)) = stat.split_once(") ") else { continue };
        if comm.ends_with("(nbd-conn") {
            states.extend(rest.chars().next());
        }
    }
    states
}

/// Waits until the connection threads' states satisfy `ok` (sampled every
/// few milliseconds); panics with `what` once [`PATIENCE`] has passed.
async fn until_states(what: &str, ok: impl Fn(&[char]) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let states = connection_thread_states();
        if ok(&states) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {states:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A server on a unix socket, stopped by [`Served::stop`].
struct Served {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    fn start(device: Arc<dyn BlockDevice>, threads: usize, poll: Duration) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let config = ServerConfig { connection_threads: threads, poll_before_block: poll, ..ServerConfig::default() };
        let server = NbdServer::new(Arc::new(ExportTable::single("disk", device)), config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve_unix(listener, async move {
                    let _ = stopped.await;
                })
                .await
        });
        Served { _dir: dir, socket, stop, task }
    }

    async fn client(&self) -> RawClient {
        let mut c = RawClient::new(Box::new(tokio::net::UnixStream::connect(&self.socket).await.unwrap()));
        c.handshake(true, &["base:allocation"]).await;
        c
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(PATIENCE, self.task).await.expect("the server stopped").unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_threads_answer_early_and_late_requests_and_then_sleep() {
    const WINDOW: Duration = Duration::from_millis(20);
    let _serial = SERIAL.lock().await;
    let served = Served::start(Arc::new(MemoryDevice::new(1 << 20)), 2, WINDOW);
    let mut c = served.client().await;
    // Requests back to back: each arrives while a thread polls.
    for i in 0..200u64 {
        let block = [(i % 251) as u8; 512];
        assert_eq!(c.write(i * 512, &block, false).await.error, 0);
        assert_eq!(c.read(i * 512, 512).await.data, block);
    }
    // Once the window has passed without a request, the waiting thread
    // sleeps in `recv` and the other waits for the reader: neither runs.
    until_states("connection threads still running after the window", |s| s.len() == 2 && s.iter().all(|s| *s == 'S'))
        .await;
    // A request that finds the reader asleep is answered all the same.
    assert_eq!(c.write(3 << 16, b"late", true).await.error, 0);
    assert_eq!(c.read(3 << 16, 4).await.data, b"late");
    assert_eq!(c.read(0, 512).await.data, vec![0u8; 512]);
    c.disconnect().await;
    served.stop().await;
}

/// A memory device whose writes wait for a permit, and say when they do.
struct Gated {
    inner: MemoryDevice,
    permits: Arc<Semaphore>,
    entered: mpsc::UnboundedSender<()>,
}

#[async_trait]
impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let _ = self.entered.send(());
        self.permits.acquire().await.expect("the gate stays open").forget();
        self.inner.write(offset, data, fua).await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_does_not_poll_while_two_requests_run() {
    let _serial = SERIAL.lock().await;
    let permits = Arc::new(Semaphore::new(0));
    let (entered, mut entries) = mpsc::unbounded_channel();
    let device = Arc::new(Gated { inner: MemoryDevice::new(1 << 20), permits: permits.clone(), entered });
    // A window far longer than the test: only the busy rule ends a poll.
    let served = Served::start(device, 3, Duration::from_secs(3600));
    let mut c = served.client().await;
    let first = c.send(0, blockio::proto::CMD_WRITE, 0, 5, b"first").await;
    let second = c.send(0, blockio::proto::CMD_WRITE, 4096, 6, b"second").await;
    for _ in 0..2 {
        tokio::time::timeout(PATIENCE, entries.recv()).await.expect("both writes reached the device");
    }
    // Two threads wait at the device's gate; the third, reading, must
    // sleep in `recv` rather than poll.
    until_states("a reader polled while two requests ran", |s| s.len() == 3 && s.iter().all(|s| *s == 'S')).await;
    permits.add_permits(2);
    let replies = c.replies(2).await.unwrap();
    assert_eq!((replies[&first].error, replies[&second].error), (0, 0));
    permits.add_permits(1);
    assert_eq!(c.write(8192, b"third", false).await.error, 0);
    assert_eq!(c.read(4096, 6).await.data, b"second");
    c.disconnect().await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thread_of_the_process_polls_at_a_time() {
    let _serial = SERIAL.lock().await;
    let served = Served::start(Arc::new(MemoryDevice::new(1 << 20)), 2, Duration::from_secs(3600));
    let (mut a, mut b) = (served.client().await, served.client().await);
    assert_eq!(a.write(0, b"from a", false).await.error, 0);
    assert_eq!(b.write(512, b"from b", false).await.error, 0);
    // Both connections are quiet with an hour's window: one reader polls
    // (runnable), the other reader and both waiting threads sleep.
    until_states("not exactly one poller", |s| {
        s.len() == 4 && s.iter().filter(|s| **s == 'R').count() == 1 && s.iter().filter(|s| **s == 'S').count() == 3
    })
    .await;
    assert_eq!(b.read(0, 6).await.data, b"from a");
    assert_eq!(a.read(512, 6).await.data, b"from b");
    a.disconnect().await;
    b.disconnect().await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_polls_only_after_requests_that_came_alone() {
    use tokio::io::AsyncWriteExt;
    let _serial = SERIAL.lock().await;
    let served = Served::start(Arc::new(MemoryDevice::new(1 << 20)), 2, Duration::from_secs(3600));
    let mut c = served.client().await;
    // Two requests in one write: one read from the socket brings both.
    let mut two = Vec::new();
    for cookie in [1u64, 2] {
        let h = blockio::proto::RequestHeader {
            flags: 0,
            command: blockio::proto::CMD_FLUSH,
            cookie,
            offset: 0,
            length: 0,
        };
        two.extend_from_slice(&h.encode());
    }
    c.io.write_all(&two).await.unwrap();
    let replies = c.replies(2).await.unwrap();
    assert_eq!((replies[&1].error, replies[&2].error), (0, 0));
    // The client had two in flight: the reader sleeps, hour-long window or not.
    until_states("a reader polled after a batch of two", |s| s.len() == 2 && s.iter().all(|s| *s == 'S')).await;
    // One request alone: now the reader polls for the next.
    assert_eq!(c.write(0, b"alone", false).await.error, 0);
    until_states("no reader polled after a request that came alone", |s| {
        s.len() == 2 && s.iter().filter(|s| **s == 'R').count() == 1
    })
    .await;
    c.disconnect().await;
    served.stop().await;
}
