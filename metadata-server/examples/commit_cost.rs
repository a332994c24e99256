//! What a copy-on-write registration costs to commit: whole-pool commits
//! (`Pool::commit`, what the server does today) against the metadata journal
//! (`Pool::commit_changes`), after a snapshot of a 1 GiB and of a 1 TiB
//! volume. Three in-process memory devices served over unix sockets by
//! blockio's NBD server, 64 MiB extents, 16 scattered chunks per
//! registration (what random 4k writes register), one commit at a time.
//!
//! `cargo run --release -p metadata-server --example commit_cost`
//! (`BENCH_SECONDS`, default 3, per row).

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockio::memory::MemoryDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use ed25519_dalek::SigningKey;
use metadata_server::pool::init::{init, InitOptions};
use metadata_server::pool::Pool;
use volume_format::metadata::PoolMetadata;
use volume_format::{PublicKey, SnapshotId};

const DEVICES: usize = 3;
const DEVICE_BYTES: u64 = 1 << 40;
const EXTENT_BYTES: u64 = 64 << 20;
const CHUNKS_PER_REGISTRATION: u64 = 16;

async fn serve_devices(dir: &std::path::Path) -> Vec<blockio::uri::NbdUri> {
    let mut uris = Vec::new();
    for i in 0..DEVICES {
        let path = dir.join(format!("dev{i}.sock"));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let device = Arc::new(MemoryDevice::new(DEVICE_BYTES));
        let server = NbdServer::new(Arc::new(ExportTable::single("", device)), ServerConfig::default());
        tokio::spawn(async move { server.serve_unix(listener, std::future::pending()).await });
        uris.push(format!("nbd+unix:///?socket={}", path.display()).parse().unwrap());
    }
    uris
}

/// A fresh pool with a volume of `volume_bytes` and a snapshot of it.
async fn setup(volume_bytes: u64, key: &SigningKey) -> (tempfile::TempDir, Vec<blockio::uri::NbdUri>) {
    let dir = tempfile::tempdir().unwrap();
    let uris = serve_devices(dir.path()).await;
    init(InitOptions {
        devices: uris.clone(),
        name: "bench".into(),
        extent_bytes: EXTENT_BYTES,
        server_key: PublicKey(key.verifying_key().to_bytes()),
        admin_key: PublicKey([9; 32]),
        admin_name: "admin".into(),
        force: false,
    })
    .await
    .unwrap();
    let (mut pool, meta) = Pool::open(&uris).await.unwrap();
    let mut next = meta.clone();
    let v = next.create_volume("v", volume_bytes, 4096, 1, 0).unwrap();
    next.create_snapshot(v, "s", 0).unwrap();
    pool.commit(Some(&meta), next).await.unwrap();
    (dir, uris)
}

/// The next registration: 16 chunks not registered yet, spread out (an odd
/// stride over a power-of-two chunk count visits every chunk once), or
/// `None` once every chunk is registered.
fn chunks(meta: &PoolMetadata, snapshot: SnapshotId, n: &mut u64) -> Option<Vec<u64>> {
    let count = meta.snapshot(snapshot).unwrap().chunk_count();
    if *n + CHUNKS_PER_REGISTRATION > count {
        return None;
    }
    let next = (0..CHUNKS_PER_REGISTRATION).map(|i| ((*n + i) * 7919) % count).collect();
    *n += CHUNKS_PER_REGISTRATION;
    Some(next)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let key = SigningKey::from_bytes(&[0x5e; 32]);
    println!(
        "| volume | whole-pool commits/s | bytes per copy | journal commits/s | entry bytes per copy | checkpoints | journal / whole |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, volume_bytes) in [("1 GiB", 1u64 << 30), ("1 TiB", 1u64 << 40)] {
        // Whole-pool commits, as the server commits a registration today.
        let (_dir, uris) = setup(volume_bytes, &key).await;
        let (mut pool, mut meta) = Pool::open(&uris).await.unwrap();
        let snapshot = meta.snapshots[0].id;
        let whole_bytes = volume_format::codec::encode(&meta).unwrap().len();
        let (mut n, mut commits) = (0u64, 0u64);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            let Some(fresh) = chunks(&meta, snapshot, &mut n) else { break };
            let mut next = meta.clone();
            next.register_cow(snapshot, &fresh).unwrap();
            meta = pool.commit(Some(&meta), next).await.unwrap();
            commits += 1;
        }
        let whole_rate = commits as f64 / start.elapsed().as_secs_f64();
        drop(pool);

        // The journal: the first commit upgrades the pool (a checkpoint).
        let (_dir, uris) = setup(volume_bytes, &key).await;
        let (mut pool, mut meta) = Pool::open_journaled(&uris, Arc::new(key.clone())).await.unwrap();
        pool.commit_changes(&mut meta, &[]).await.unwrap();
        // Covering checkpoints fall due every half ring; `commit_changes`
        // writes them inline, so their cost is in the rate.
        let (mut n, mut commits, mut bytes, mut checkpoints) = (0u64, 0u64, 0usize, 0u64);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            let Some(fresh) = chunks(&meta, snapshot, &mut n) else { break };
            let change = meta.plan_register_cow(snapshot, &fresh).unwrap().unwrap();
            let used = pool.journal_status().unwrap().ring_used_bytes;
            let receipt = pool.commit_changes(&mut meta, &[change]).await.unwrap();
            checkpoints += u64::from(pool.journal_status().unwrap().ring_used_bytes < used);
            bytes = bytes.max(receipt.bytes_per_copy);
            commits += 1;
        }
        let journal_rate = commits as f64 / start.elapsed().as_secs_f64();
        println!(
            "| {name} | {whole_rate:.0} | {whole_bytes} | {journal_rate:.0} | {bytes} | {checkpoints} | {:.1} |",
            journal_rate / whole_rate
        );
    }
}
