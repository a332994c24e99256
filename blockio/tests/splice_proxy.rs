//! A forwarding hop — an NBD server whose device is an NBD client, as the
//! agent serves a volume — passes large read payloads through pipes
//! (`blockio::splice`) and does exactly what a copying hop would: with
//! structured and simple replies on either side, concurrent and unaligned
//! reads, payloads larger than a pipe, and reads too small to splice; and
//! passes large write payloads the same way, from its client's socket
//! through pipes into the device's socket, with writes of the same sizes.
//! Everything is checked against the device behind the hop, read directly.

use std::sync::Arc;

use blockio::client::{ClientOptions, NbdClient};
use blockio::memory::MemoryDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use futures::future::join_all;

const SIZE: u64 = 16 << 20;

fn serve(device: Arc<dyn BlockDevice>, path: &std::path::Path) -> tokio::sync::oneshot::Sender<()> {
    let table = ExportTable::new();
    table.insert(blockio::server::Export::new("", device));
    let server = NbdServer::new(Arc::new(table), ServerConfig::default());
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        server
            .serve_unix(listener, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap()
    });
    stop
}

async fn connect(path: &std::path::Path, structured: bool) -> NbdClient {
    let uri: NbdUri = format!("nbd+unix:///?socket={}", path.display()).parse().unwrap();
    NbdClient::connect(&uri, ClientOptions { structured_replies: structured, ..ClientOptions::default() })
        .await
        .unwrap()
}

/// The splice counter is process-wide: one hop at a time, so a hop's
/// counts are its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn hop(back_structured: bool, front_structured: bool) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (back_path, front_path) = (dir.path().join("back.sock"), dir.path().join("front.sock"));
    let device = Arc::new(MemoryDevice::new(SIZE));
    let pattern: Vec<u8> = (0..SIZE as usize).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect();
    device.write(0, Bytes::from(pattern), false).await.unwrap();
    let _back = serve(device.clone(), &back_path);
    let forwarded = connect(&back_path, back_structured).await;
    let _front = serve(Arc::new(forwarded), &front_path);
    let client = connect(&front_path, front_structured).await;

    let before = blockio::splice::bytes_spliced_out();
    // (offset, length): 1 MiB aligned, 3 MiB (several pipes), unaligned,
    // at the splice threshold, below it, and the last byte of the device.
    let reads: Vec<(u64, u32)> = vec![
        (0, 1 << 20),
        (5 << 20, 3 << 20),
        (12_345, 700_001),
        (9 << 20, blockio::splice::SPLICE_BYTES_MIN),
        (4096, 64 * 1024),
        (SIZE - 200_000, 200_000),
    ];
    for round in 0..3 {
        let results = join_all(reads.iter().map(|&(o, l)| {
            let client = client.clone();
            async move { client.read(o, l).await.unwrap() }
        }))
        .await;
        for (&(o, l), got) in reads.iter().zip(results) {
            let want = device.read(o, l).await.unwrap();
            assert_eq!(got.len(), l as usize);
            assert!(got == want, "round {round}: read at {o} length {l} differs from the device");
        }
    }
    let spliced = blockio::splice::bytes_spliced_out() - before;
    let large: u64 = reads.iter().filter(|r| r.1 >= blockio::splice::SPLICE_BYTES_MIN).map(|r| r.1 as u64).sum();
    assert!(spliced >= large, "only {spliced} bytes were spliced of the {large} bytes of large reads per round");

    // Writes, concurrently, over the same ranges (FUA on some): each lands
    // on the device as sent, the large ones through pipes.
    let before = blockio::splice::bytes_spliced_out();
    let writes = join_all(reads.iter().enumerate().map(|(i, &(o, l))| {
        let client = client.clone();
        let data: Bytes = (0..l).map(|k| (k as usize * 13 + i * 101) as u8).collect();
        async move {
            client.write(o, data.clone(), i % 2 == 0).await.unwrap();
            (o, data)
        }
    }))
    .await;
    client.flush().await.unwrap();
    let spliced = blockio::splice::bytes_spliced_out() - before;
    // Only the hop splices writes out (the client in front of it has
    // nothing in pipes). A payload the hop's reader had partly buffered
    // already is copied: most, not all, go through pipes.
    assert!(spliced >= large / 2, "only {spliced} bytes were spliced of the {large} bytes of large writes");
    // Two of the ranges overlap; where they do, either write may have
    // landed last.
    for (i, (o, data)) in writes.iter().enumerate() {
        let on_device = device.read(*o, data.len() as u32).await.unwrap();
        let overlapped = |k: usize| {
            let at = *o + k as u64;
            writes.iter().enumerate().any(|(j, (oj, dj))| j != i && *oj <= at && at < *oj + dj.len() as u64)
        };
        for (k, (&got, &sent)) in on_device.iter().zip(data.iter()).enumerate() {
            assert!(
                got == sent || overlapped(k),
                "write {i} at {o}: byte {k} on the device differs from what was sent"
            );
        }
    }
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_hop_splices_large_reads_with_structured_replies() {
    hop(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_hop_splices_large_reads_with_simple_replies() {
    hop(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_hop_splices_between_simple_and_structured_replies() {
    hop(false, true).await;
    hop(true, false).await;
}
