//! Connection threads that poll before they block
//! (`ServerConfig::poll_before_block`): requests that arrive while a thread
//! polls and requests that find it asleep are answered alike, and a
//! waiting connection stops polling once the window has passed.
//!
//! Its own test binary: it reads the states of the process's connection
//! threads, which no other test may add to while it runs.

mod server_common;

use std::sync::Arc;
use std::time::Duration;

use blockio::memory::MemoryDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use server_common::RawClient;

/// A test that waits longer than this for the server has found a hang.
const PATIENCE: Duration = Duration::from_secs(20);

/// States (`/proc/self/task/*/stat`, third field) of this process's
/// connection threads started after `before` was taken.
fn connection_thread_states(before: &[u64]) -> Vec<char> {
    let mut states = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u64>() else { continue };
        if before.contains(&tid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "tid (comm) S ...": the comm may hold spaces, the state follows its ')'.
        let Some((comm, rest)) = stat.split_once(") ") else { continue };
        if comm.ends_with("(nbd-conn") {
            states.extend(rest.chars().next());
        }
    }
    states
}

fn thread_ids() -> Vec<u64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_threads_answer_early_and_late_requests_and_then_sleep() {
    const WINDOW: Duration = Duration::from_millis(20);
    let before = thread_ids();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let config = ServerConfig { connection_threads: 2, poll_before_block: WINDOW, ..ServerConfig::default() };
    let device = Arc::new(MemoryDevice::new(1 << 20));
    let server = NbdServer::new(Arc::new(ExportTable::single("disk", device)), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve_unix(listener, async move {
                let _ = stopped.await;
            })
            .await
    });
    let mut c = RawClient::new(Box::new(tokio::net::UnixStream::connect(&socket).await.unwrap()));
    c.handshake(true, &["base:allocation"]).await;
    // Requests back to back: each arrives while a thread polls.
    for i in 0..200u64 {
        let block = [(i % 251) as u8; 512];
        assert_eq!(c.write(i * 512, &block, false).await.error, 0);
        assert_eq!(c.read(i * 512, 512).await.data, block);
    }
    // Once the window has passed without a request, the waiting thread
    // sleeps in `recv` and the other waits for the reader: neither runs.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        tokio::time::sleep(WINDOW).await;
        let states = connection_thread_states(&before);
        assert_eq!(states.len(), 2, "two connection threads: {states:?}");
        if states.iter().all(|s| *s == 'S') {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection threads still running after the window: {states:?}"
        );
    }
    // A request that finds the reader asleep is answered all the same.
    assert_eq!(c.write(3 << 16, b"late", true).await.error, 0);
    assert_eq!(c.read(3 << 16, 4).await.data, b"late");
    assert_eq!(c.read(0, 512).await.data, vec![0u8; 512]);
    c.disconnect().await;
    let _ = stop.send(());
    tokio::time::timeout(PATIENCE, task).await.expect("the server stopped").unwrap().unwrap();
}
