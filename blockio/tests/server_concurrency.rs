//! Requests on one connection run concurrently and are answered out of
//! order; in-flight requests and bytes stay within the configured bounds;
//! `NBD_CMD_DISC` finishes in-flight requests before closing.
//!
//! A gated device holds reads at offset 0 until the test opens the gate, so
//! ordering is controlled by the test, not by timing.

mod server_common;

use std::sync::Arc;

use blockio::memory::MemoryDevice;
use blockio::proto;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use server_common::connect;
use server_common::gated::GatedDevice;

fn serve(device: Arc<GatedDevice>, config: ServerConfig) -> NbdServer {
    NbdServer::new(Arc::new(ExportTable::single("g", device)), config)
}

#[tokio::test]
async fn replies_come_back_out_of_order() {
    let device = GatedDevice::new();
    let (mut c, task) = connect(&serve(device.clone(), ServerConfig::default()));
    c.handshake(true, &[]).await;
    let slow = c.send(0, proto::CMD_READ, 0, 4096, &[]).await;
    device.wait_active(1).await;
    let fast = c.send(0, proto::CMD_WRITE, 8192, 5, b"quick").await;
    let first = c.reply().await.unwrap();
    assert_eq!(first.cookie, fast, "the write must not wait for the blocked read");
    device.gate.add_permits(1);
    let second = c.reply().await.unwrap();
    assert_eq!((second.cookie, second.error, second.data.len()), (slow, 0, 4096));
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

/// Lets every other task run until nothing is runnable (single-threaded
/// runtime: the server has then done all it can).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

async fn check_bound(config: ServerConfig, expected_max: usize) {
    let device = GatedDevice::new();
    let (mut c, task) = connect(&serve(device.clone(), config));
    c.handshake(false, &[]).await;
    let mut cookies = Vec::new();
    for _ in 0..6 {
        cookies.push(c.send(0, proto::CMD_READ, 0, 4096, &[]).await);
    }
    device.wait_active(expected_max).await;
    settle().await;
    assert_eq!(*device.active.borrow(), (expected_max, expected_max), "the server went past its in-flight bound");
    device.gate.add_permits(6);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let r = c.reply().await.unwrap();
        assert_eq!(r.error, 0);
        seen.push(r.cookie);
    }
    seen.sort();
    assert_eq!(seen, cookies);
    assert_eq!(device.active.borrow().1, expected_max);
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn requests_in_flight_are_bounded() {
    check_bound(ServerConfig { requests_in_flight_max: 2, ..ServerConfig::default() }, 2).await;
}

#[tokio::test]
async fn bytes_in_flight_are_bounded() {
    check_bound(ServerConfig { in_flight_bytes_max: 3 * 4096, ..ServerConfig::default() }, 3).await;
}

#[tokio::test]
async fn disconnect_finishes_in_flight_requests_first() {
    let device = GatedDevice::new();
    let (mut c, task) = connect(&serve(device.clone(), ServerConfig::default()));
    c.handshake(true, &[]).await;
    let read = c.send(0, proto::CMD_READ, 0, 512, &[]).await;
    device.wait_active(1).await;
    c.send(0, proto::CMD_DISC, 0, 0, &[]).await;
    settle().await;
    device.gate.add_permits(1);
    let r = c.reply().await.unwrap();
    assert_eq!((r.cookie, r.error), (read, 0));
    assert!(c.expect_closed().await.is_empty());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_requests_all_answered() {
    let device = Arc::new(MemoryDevice::new(64 << 20));
    let srv = NbdServer::new(Arc::new(ExportTable::single("m", device)), ServerConfig::default());
    let (mut c, task) = connect(&srv);
    c.handshake(true, &[]).await;
    // Mixed sizes, including large ones that run on their own tasks; the
    // total stays below the pipe buffer, since this client only reads
    // replies after sending everything.
    let mut expected = std::collections::HashMap::new();
    for i in 0..64u64 {
        let len = if i % 8 == 0 { 256 << 10 } else { 4096 };
        let data = vec![i as u8 + 1; len];
        let cookie = c.send(0, proto::CMD_WRITE, i << 20, len as u32, &data).await;
        expected.insert(cookie, None);
        let cookie = c.send(0, proto::CMD_READ, i << 20, len as u32, &[]).await;
        expected.insert(cookie, Some(len));
    }
    for _ in 0..128 {
        let r = c.reply().await.unwrap();
        assert_eq!(r.error, 0);
        let len = expected.remove(&r.cookie).expect("unknown or repeated cookie");
        if let Some(len) = len {
            assert_eq!(r.data.len(), len);
        }
    }
    assert!(expected.is_empty());
    c.disconnect().await;
    task.await.unwrap().unwrap();
}
