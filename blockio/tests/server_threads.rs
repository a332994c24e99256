//! Connections served on blocking threads (`ServerConfig::connection_threads`):
//! the same answers as the async path for good and bad requests, and the
//! same ends — a client's close, the server's stop, the device's revocation.
//! (Random concurrent requests against a model: `server_concurrent_proptest`.)

mod server_common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockio::memory::MemoryDevice;
use blockio::proto::{self, errno, RequestHeader};
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::{BlockDevice, IoError, ZeroFlags};
use bytes::Bytes;
use server_common::RawClient;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, watch};

const SIZE: u64 = 1 << 20;
/// A test that waits longer than this for the server has found a hang.
const PATIENCE: Duration = Duration::from_secs(20);

/// A server with `threads` connection threads on a unix socket.
struct Threaded {
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Threaded {
    fn start(device: Arc<dyn BlockDevice>, threads: usize) -> Threaded {
        Threaded::start_polling(device, threads, Duration::ZERO)
    }

    /// With `ServerConfig::poll_before_block` = `poll`.
    fn start_polling(device: Arc<dyn BlockDevice>, threads: usize, poll: Duration) -> Threaded {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.path().join("nbd.sock")).unwrap();
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
        Threaded { dir, stop: Some(stop), task }
    }

    async fn client(&self, structured: bool) -> RawClient {
        let stream = tokio::net::UnixStream::connect(self.dir.path().join("nbd.sock")).await.unwrap();
        let mut c = RawClient::new(Box::new(stream));
        c.handshake(structured, if structured { &["base:allocation"] } else { &[] }).await;
        c
    }

    /// Stops the server; returns once every connection has ended.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, self.task).await.expect("the server stopped").unwrap().unwrap();
    }
}

fn memory() -> Arc<dyn BlockDevice> {
    Arc::new(MemoryDevice::new(SIZE))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_and_bad_requests_get_the_async_paths_answers() {
    for structured in [false, true] {
        let served = Threaded::start(memory(), 2);
        let mut c = served.client(structured).await;
        assert_eq!(c.request(0, 77, 0, 0, &[]).await.error, errno::EINVAL);
        assert_eq!(c.request(1 << 9, proto::CMD_READ, 0, 512, &[]).await.error, errno::EINVAL);
        assert_eq!(c.read(SIZE - 10, 20).await.error, errno::EINVAL);
        assert_eq!(c.request(0, proto::CMD_WRITE_ZEROES, SIZE, 1, &[]).await.error, errno::ENOSPC);
        // A refused write's payload is still consumed: the stream stays in sync.
        assert_eq!(c.write(SIZE - 2, &[7u8; 4000], false).await.error, errno::ENOSPC);
        assert_eq!(c.read(0, u32::MAX).await.error, errno::EINVAL);
        let bs = c.request(proto::CMD_FLAG_REQ_ONE, proto::CMD_BLOCK_STATUS, 0, 100, &[]).await;
        if structured {
            assert_eq!(bs.status[0].1, vec![(100, proto::STATE_HOLE | proto::STATE_ZERO)]);
        } else {
            assert_eq!(bs.error, errno::EINVAL);
        }
        assert_eq!(c.write(100, b"still here", true).await.error, 0);
        assert_eq!(c.read(100, 10).await.data, b"still here");
        // Many requests in flight at once, answered whatever the order.
        let mut sent = Vec::new();
        for i in 0..64u64 {
            sent.push(c.send(0, proto::CMD_WRITE, i * 4096, 4096, &[i as u8; 4096]).await);
        }
        let replies = c.replies(sent.len()).await.unwrap();
        assert!(sent.iter().all(|cookie| replies[cookie].error == 0));
        for i in 0..64u64 {
            assert_eq!(c.read(i * 4096, 4096).await.data, vec![i as u8; 4096]);
        }
        c.disconnect().await;
        served.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_close_the_connection_and_others_are_served() {
    let served = Threaded::start(memory(), 2);
    // Bad magic.
    let mut c = served.client(false).await;
    let mut h = RequestHeader { flags: 0, command: proto::CMD_READ, cookie: 1, offset: 0, length: 1 }.encode();
    h[0] ^= 0xff;
    c.io.write_all(&h).await.unwrap();
    tokio::time::timeout(PATIENCE, c.expect_closed()).await.expect("closed after a bad magic");
    // A write longer than any payload: closed, not buffered.
    let mut c = served.client(true).await;
    c.send(0, proto::CMD_WRITE, 0, u32::MAX, b"only a few bytes").await;
    tokio::time::timeout(PATIENCE, c.expect_closed()).await.expect("closed after a huge write");
    // A payload cut short by the client's close.
    let mut c = served.client(false).await;
    let h = RequestHeader { flags: 0, command: proto::CMD_WRITE, cookie: 1, offset: 0, length: 4096 }.encode();
    c.io.write_all(&h).await.unwrap();
    c.io.write_all(&[1u8; 100]).await.unwrap();
    c.io.shutdown().await.unwrap();
    tokio::time::timeout(PATIENCE, c.expect_closed()).await.expect("closed after a truncated payload");
    // The truncated write wrote nothing; the server still serves.
    let mut c = served.client(false).await;
    assert_eq!(c.read(0, 4096).await.data, vec![0u8; 4096]);
    c.disconnect().await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_right_behind_the_handshake_is_answered() {
    // The handshake's reader may already hold the first request's bytes
    // when the connection moves to its threads; they must not be lost.
    let served = Threaded::start(memory(), 2);
    let stream = tokio::net::UnixStream::connect(served.dir.path().join("nbd.sock")).await.unwrap();
    let mut c = RawClient::new(Box::new(stream));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    let mut bytes = Vec::new();
    let go = RawClient::go_data("disk", &[]);
    bytes.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    bytes.extend_from_slice(&(go.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&go);
    let write = RequestHeader { flags: 0, command: proto::CMD_WRITE, cookie: 7, offset: 512, length: 5 };
    bytes.extend_from_slice(&write.encode());
    bytes.extend_from_slice(b"ahead");
    c.io.write_all(&bytes).await.unwrap();
    let replies = c.read_opt_replies().await;
    assert_eq!(replies.last().unwrap().reply_type, proto::REP_ACK);
    let reply = tokio::time::timeout(PATIENCE, c.reply()).await.expect("the early write was answered").unwrap();
    assert_eq!((reply.cookie, reply.error), (7, 0));
    assert_eq!(c.read(512, 5).await.data, b"ahead");
    c.disconnect().await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_stop_ends_idle_connections() {
    // Both threads wait (one in `recv`, one for the reader): the stop must
    // wake them, not wait for the client. Polling or not, and stopped
    // while the reader may still be polling (a long window).
    for poll in [Duration::ZERO, Duration::from_secs(3600)] {
        let served = Threaded::start_polling(memory(), 2, poll);
        let mut c = served.client(false).await;
        assert_eq!(c.write(0, b"before the stop", false).await.error, 0);
        served.stop().await;
        tokio::time::timeout(PATIENCE, c.expect_closed()).await.expect("closed by the stop");
    }
}

/// A memory device whose export can be revoked (as sanvol-target's fenced
/// devices are).
struct Revocable {
    inner: MemoryDevice,
    revoked: watch::Receiver<bool>,
}

#[async_trait]
impl BlockDevice for Revocable {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn revoked(&self) -> Option<watch::Receiver<bool>> {
        Some(self.revoked.clone())
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
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
async fn revocation_closes_the_connection_and_the_server_goes_on() {
    let (revoke, revoked) = watch::channel(false);
    let served = Threaded::start(Arc::new(Revocable { inner: MemoryDevice::new(SIZE), revoked }), 2);
    let mut c = served.client(false).await;
    assert_eq!(c.write(0, b"acknowledged", true).await.error, 0);
    revoke.send(true).unwrap();
    tokio::time::timeout(PATIENCE, c.expect_closed()).await.expect("closed by the revocation");
    served.stop().await;
}
