//! The metadata journal on real NBD devices (memory devices served
//! in-process by blockio's server): open, commits, checkpoints in the
//! background, a refused commit superseded, and the upgrade of a pool
//! written by the release before the journal (the checked-in format-2
//! images of `volume-format/tests/fixtures/format2/`).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use blockio::memory::MemoryDevice;
use blockio::BlockDevice;
use bytes::Bytes;
use common::{key, Devices, MIB};
use ed25519_dalek::SigningKey;
use metadata_server::pool::init::{init, InitOptions};
use metadata_server::pool::{Pool, PoolError};
use volume_format::metadata::{ChunkRuns, ClientRecord, ClientRole, MetaChange, MetadataError, PoolMetadata};
use volume_format::PublicKey;

const GIB: u64 = 1 << 30;

struct Fixture {
    _dir: tempfile::TempDir,
    devices: Devices,
    uris: Vec<blockio::uri::NbdUri>,
    key: Arc<SigningKey>,
}

/// `n` memory devices of `size` bytes, a pool initialized on them (by
/// `pool init`: whole-pool format 2) with `extent_bytes` extents.
async fn pool_on_memory(n: usize, size: u64, extent_bytes: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let devices = Devices::memory(dir.path(), n, size).await;
    pool_on(dir, devices, extent_bytes).await
}

/// A pool initialized (format 2) on `devices`, served from `dir`.
async fn pool_on(dir: tempfile::TempDir, devices: Devices, extent_bytes: u64) -> Fixture {
    let server = key(dir.path(), "mds");
    let admin = key(dir.path(), "admin");
    let uris: Vec<blockio::uri::NbdUri> = devices.uris.iter().map(|u| u.parse().unwrap()).collect();
    init(InitOptions {
        devices: uris.clone(),
        name: "journal".into(),
        extent_bytes,
        server_key: PublicKey(server.public.to_bytes()),
        admin_key: PublicKey(admin.public.to_bytes()),
        admin_name: "admin".into(),
        force: false,
    })
    .await
    .unwrap();
    Fixture { _dir: dir, devices, uris, key: Arc::new(server.signing) }
}

async fn reopen(f: &Fixture) -> (Pool, PoolMetadata) {
    Pool::open_journaled(&f.uris, f.key.clone()).await.unwrap()
}

fn client(i: u64) -> MetaChange {
    MetaChange::ClientPut(ClientRecord {
        public_key: PublicKey([(i % 200) as u8 + 1; 32]),
        name: format!("host-{i}"),
        role: ClientRole::Agent,
    })
}

/// A copy-on-write registration costs one 4 KiB block per copy, on a
/// 1 TiB volume as on a 1 GiB one; everything survives a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_costs_a_block_whatever_the_volume_size() {
    let f = pool_on_memory(3, 1 << 40, 64 * MIB).await;
    let (mut pool, mut meta) = reopen(&f).await;
    assert!(pool.journal_status().unwrap().checkpoint_pending.is_some(), "format 2 until the first commit");

    let mut registration_bytes = Vec::new();
    for (name, size) in [("small", GIB), ("huge", 1 << 40)] {
        let create = meta.plan_create_volume(name, size, 4096, 1, 1).unwrap();
        pool.commit_changes(&mut meta, &[create]).await.unwrap();
        let volume = meta.volume_by_name(name).unwrap().id;
        let snapshot = meta.plan_create_snapshot(volume, "before", 2).unwrap();
        pool.commit_changes(&mut meta, &[snapshot]).await.unwrap();
        let snapshot = meta.newest_snapshot(volume).unwrap().id;
        // 16 scattered chunks, as random 4k writes after a snapshot register.
        let chunks: Vec<u64> = (0..16).map(|i| i * 997).collect();
        let register = meta.plan_register_cow(snapshot, &chunks).unwrap().unwrap();
        let r = pool.commit_changes(&mut meta, &[register]).await.unwrap();
        assert!(!r.checkpoint);
        registration_bytes.push(r.bytes_per_copy);
        assert_eq!(meta.generation, r.seq);
    }
    assert_eq!(registration_bytes, vec![4096, 4096]);
    // The whole metadata (a 2 MiB copy-on-write map among it) is what a
    // whole-pool commit would have written instead.
    let whole = volume_format::codec::encode(&meta).unwrap().len();
    assert!(whole > 2 << 20, "{whole} bytes");

    let (_, reloaded) = reopen(&f).await;
    assert_eq!(reloaded, meta);
    // A release without the journal refuses the pool rather than reading it.
    match Pool::open(&f.uris).await {
        Err(PoolError::Metadata(MetadataError::Journaled {
            found: volume_format::metadata::METADATA_FORMAT_VERSION,
        })) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the whole-pool reader read a journaled pool"),
    }
}

/// A commit that one copy refuses changes nothing the caller holds; the
/// next commit supersedes it on every copy, so a reopen never shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_is_superseded() {
    let f = pool_on_memory(3, 64 * MIB, MIB).await;
    let (mut pool, mut meta) = reopen(&f).await;
    pool.commit_changes(&mut meta, &[client(1)]).await.unwrap();
    let acked = meta.clone();

    // Through the job API: the write fails on one copy, which then recovers.
    let undos = meta.apply_all(&[client(2)]).unwrap();
    let job = pool.seal_commit(&mut meta, &[client(2)]).unwrap();
    f.devices.devices[1].fail_writes.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcome = job.run().await;
    f.devices.devices[1].fail_writes.store(false, std::sync::atomic::Ordering::SeqCst);
    let err = pool.finish_commit(outcome).unwrap_err();
    assert!(err.to_string().contains("injected write failure"), "{err}");
    meta.revert_all(undos);
    meta.generation = pool.acked_generation().unwrap();
    assert_eq!(meta, acked);
    // The two copies that took it would show it after a restart now...
    let (_, shown) = reopen(&f).await;
    assert!(shown.clients.iter().any(|c| c.name == "host-2"), "the refused commit reached two copies");
    // ...until the next commit (here an empty one) takes its place.
    pool.commit_changes(&mut meta, &[]).await.unwrap();
    let (_, reloaded) = reopen(&f).await;
    assert_eq!(reloaded, meta);
    assert!(!reloaded.clients.iter().any(|c| c.name == "host-2"));

    // Through commit_changes, with the copy failing throughout: refused,
    // nothing changed, and the next successful commit supersedes it.
    let before = meta.clone();
    f.devices.devices[2].fail_writes.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = pool.commit_changes(&mut meta, &[client(3)]).await.unwrap_err();
    assert!(matches!(err, PoolError::Commit(_)), "{err}");
    assert_eq!(meta, before);
    f.devices.devices[2].fail_writes.store(false, std::sync::atomic::Ordering::SeqCst);
    pool.commit_changes(&mut meta, &[client(4)]).await.unwrap();
    let (_, reloaded) = reopen(&f).await;
    assert_eq!(reloaded, meta);
    assert!(!reloaded.clients.iter().any(|c| c.name == "host-3"));
    assert!(reloaded.clients.iter().any(|c| c.name == "host-4"));
}

/// Hundreds of commits through the job API, each covering checkpoint
/// written by a background task while commits go on; the ring wraps
/// several times and a reopen reads exactly the acknowledged state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_in_the_background_while_the_ring_wraps() {
    // 16 MiB devices: a 1 MiB metadata area, so a 512 KiB ring.
    let f = pool_on_memory(3, 16 * MIB, MIB).await;
    let (mut pool, mut meta) = reopen(&f).await;
    pool.commit_changes(&mut meta, &[client(0)]).await.unwrap();
    let ring_bytes = pool.journal_status().unwrap().ring_bytes;
    assert_eq!(ring_bytes, 512 << 10);
    let mut background: Option<tokio::task::JoinHandle<_>> = None;
    let mut checkpoints = 0;
    for i in 1..400u64 {
        let changes = vec![client(i), client(i + 1000)];
        meta.apply_all(&changes).unwrap();
        let job = match pool.seal_commit(&mut meta, &changes) {
            Ok(job) => job,
            Err(e) => panic!("commit {i}: {e}"),
        };
        let outcome = job.run().await;
        if let Some(checkpoint) = pool.finish_commit(outcome).unwrap() {
            // One checkpoint at a time: the writer does not hand out another
            // before this one is reported.
            assert!(background.is_none());
            background = Some(tokio::spawn(checkpoint.run()));
            checkpoints += 1;
        }
        if background.as_ref().is_some_and(|t| t.is_finished()) {
            pool.finish_checkpoint(background.take().unwrap().await.unwrap());
        }
    }
    if let Some(t) = background.take() {
        pool.finish_checkpoint(t.await.unwrap());
    }
    let status = pool.journal_status().unwrap();
    assert!(checkpoints >= 3, "{checkpoints} checkpoints, {status:?}");
    assert!(status.ring_used_bytes < ring_bytes);
    let (_, reloaded) = reopen(&f).await;
    assert_eq!(reloaded, meta);
    assert_eq!(reloaded.generation, status.acked_seq);
}

fn fixture_path(i: usize) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../volume-format/tests/fixtures/format2/dev{i}.img"))
}

/// A pool written by the release before the journal (two devices, eight
/// whole-pool commits, the newest in the last slot) opens with the journal
/// unchanged, is upgraded by its next commit, and reads back upgraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format2_pool_is_upgraded_at_its_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut memory: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for i in 0..2 {
        let image = std::fs::read(fixture_path(i)).unwrap();
        let device = MemoryDevice::new(64 * MIB);
        device.write(0, Bytes::from(image), false).await.unwrap();
        memory.push(Arc::new(device));
    }
    let devices = Devices::serve(dir.path(), memory).await;
    let uris: Vec<blockio::uri::NbdUri> = devices.uris.iter().map(|u| u.parse().unwrap()).collect();
    let key = Arc::new(SigningKey::from_bytes(&[0x5a; 32]));

    let (_, legacy) = Pool::open(&uris).await.unwrap();
    assert_eq!(legacy.generation, 8);
    let (mut pool, mut meta) = Pool::open_journaled(&uris, key.clone()).await.unwrap();
    assert_eq!(meta, legacy, "read unchanged");
    // A wrong key is refused, naming both.
    let wrong = Arc::new(SigningKey::from_bytes(&[1; 32]));
    let err = Pool::open_journaled(&uris, wrong).await.map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("initialized for server key"), "{err}");

    let snapshot = meta.snapshots[0].id;
    let change = MetaChange::CowRegister { snapshot, chunks: ChunkRuns::from_chunks([40, 41]) };
    let receipt = pool.commit_changes(&mut meta, &[change]).await.unwrap();
    assert!(receipt.checkpoint, "the upgrade is a checkpoint");
    assert_eq!(receipt.seq, 9);
    let r = pool.commit_changes(&mut meta, &[client(7)]).await.unwrap();
    assert_eq!((r.checkpoint, r.bytes_per_copy), (false, 4096), "then entries");

    let (_, reloaded) = Pool::open_journaled(&uris, key).await.unwrap();
    assert_eq!(reloaded, meta);
    assert!(reloaded.snapshots[0].cow.contains(41));
    match Pool::open(&uris).await {
        Err(PoolError::Metadata(MetadataError::Journaled { .. })) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the whole-pool reader read an upgraded pool"),
    }
}

/// A server stopped between writing the upgrade checkpoint and flushing it
/// leaves the checkpoint in the devices' volatile caches. The next server
/// flushes every device before it reads the metadata, so what it builds on
/// is durable: a power loss of one device right after that open loses
/// nothing, and every device, read back on its own after a power loss of
/// all of them, holds the whole journal. (Before the flush, that device kept
/// the next server's signed entries without the checkpoint they chain to,
/// and every later open refused the pool as rolled back: simulator seed
/// 6429577280763.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_left_unflushed_by_a_stopped_server_is_made_durable_before_it_is_built_upon() {
    use common::VolatileDevice;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let volatile: Vec<Arc<VolatileDevice>> = (0..3).map(|_| Arc::new(VolatileDevice::new(64 * MIB))).collect();
    let devices =
        Devices::serve(dir.path(), volatile.iter().map(|d| d.clone() as Arc<dyn BlockDevice>).collect()).await;
    let f = pool_on(dir, devices, MIB).await;
    let (uris, key) = (f.uris.clone(), f.key.clone());
    for d in &volatile {
        d.flush().await.unwrap();
    }

    // Server A: the pool's first journaled commit (the upgrade checkpoint)
    // reaches every device's cache; no flush gets through, and A is gone.
    let (mut a, mut a_meta) = Pool::open_journaled(&uris, key.clone()).await.unwrap();
    a_meta.apply_all(&[client(1)]).unwrap();
    let job = a.seal_commit(&mut a_meta, &[client(1)]).unwrap();
    for d in &volatile {
        d.fail_flushes.store(true, Ordering::SeqCst);
    }
    let _refused = job.run().await;
    drop(a);
    for d in &volatile {
        assert!(d.cached_bytes() > 0, "the checkpoint waits in every cache");
        d.fail_flushes.store(false, Ordering::SeqCst);
    }

    // Server B opens, device 0 loses power, B commits (a journal entry).
    let (mut b, mut b_meta) = Pool::open_journaled(&uris, key.clone()).await.unwrap();
    assert!(b_meta.clients.iter().any(|c| c.name == "host-1"), "B builds on the checkpoint A left");
    volatile[0].power_loss();
    let receipt = b.commit_changes(&mut b_meta, &[client(2)]).await.unwrap();
    assert!(!receipt.checkpoint, "B continues A's journal with an entry");

    // Every device loses power; each one, read back alone, holds B's commit.
    for d in &volatile {
        d.power_loss();
    }
    let (_, reloaded) = Pool::open_journaled(&uris, key.clone()).await.unwrap();
    assert_eq!(reloaded, b_meta);
    for (i, uri) in uris.iter().enumerate() {
        let alone = Pool::open_journaled(std::slice::from_ref(uri), key.clone()).await;
        let (_, meta) = alone.unwrap_or_else(|e| panic!("device {i} read back alone: {e}"));
        assert_eq!(meta, b_meta, "device {i} read back alone");
    }
}
