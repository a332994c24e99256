//! The metadata server's mirror of a volume's write-back cache (issue 15),
//! end to end: an embedded `sanvol-mds` over in-process NBD devices,
//! control clients acting as agents, the devices read back directly.

mod common;

use std::time::Duration;

use blockio::BlockDevice;
use common::{Pool, MIB};
use control_client::{ControlClient, ControlClientError};
use volume_format::control::auth::Role;
use volume_format::control::messages::{
    CacheMode, ErrorCode, MirrorRecord, OpenMode, OpenedHandle, Request, Response, VolumeCache,
};
use volume_format::{HandleId, VolumeDescription};

const LEASE_MS: u64 = 500;
const DURABLE_MS: u64 = 500;
const CACHE_BYTES: u64 = 8 * MIB;

fn code(e: ControlClientError) -> (ErrorCode, String) {
    match e {
        ControlClientError::Server(e) => (e.code, e.message),
        other => panic!("expected a server error, got {other}"),
    }
}

async fn open(client: &ControlClient, volume: &str, mode: OpenMode) -> Result<OpenedHandle, ControlClientError> {
    match client.request(Request::Open { volume: volume.into(), mode }).await? {
        Response::Opened(h) => Ok(h),
        other => panic!("{other:?}"),
    }
}

/// Opens `volume` as soon as the server lets it: a conflict names when the
/// old holder's reservation ends, and is retried until then (so is a
/// restarted server's grace period).
async fn open_when_free(client: &ControlClient, volume: &str) -> OpenedHandle {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match open(client, volume, OpenMode::Exclusive).await {
            Ok(h) => return h,
            Err(ControlClientError::Server(e))
                if e.code == ErrorCode::Conflict || e.message.contains("in its grace period") =>
            {
                assert!(tokio::time::Instant::now() < deadline, "still refused: {}", e.message);
                tokio::time::sleep(Duration::from_millis(LEASE_MS / 5)).await;
            }
            Err(e) => panic!("open failed: {e}"),
        }
    }
}

fn record(seq: u64, offset: u64, fill: u8, len: usize) -> MirrorRecord {
    MirrorRecord { seq, offset, data: vec![fill; len] }
}

async fn append(
    client: &ControlClient,
    handle: HandleId,
    records: Vec<MirrorRecord>,
) -> Result<u64, ControlClientError> {
    match client.request(Request::MirrorAppend { handle, records }).await? {
        Response::Mirrored { upto_seq } => Ok(upto_seq),
        other => panic!("{other:?}"),
    }
}

/// Creates volume `db` (two legs) with a mirrored cache.
async fn create_cached_db(admin: &ControlClient) {
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 4 * MIB, legs: 2 }).await.unwrap();
    let set = Request::VolumeCache { name: "db".into(), size_bytes: CACHE_BYTES, mode: Some(CacheMode::Mirrored) };
    admin.request(set).await.unwrap();
}

/// Whether every byte of `data` is `value`.
fn all(data: &[u8], value: u8) -> bool {
    data.iter().all(|&b| b == value)
}

/// Reads `len` bytes at volume offset `offset` (inside the first extent)
/// from every leg, straight from the devices.
async fn read_legs(pool: &Pool, description: &VolumeDescription, offset: u64, len: u32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for leg in &description.extents[0].legs {
        let device = &pool.devices.devices[leg.device.0 as usize];
        out.push(device.read(leg.offset + offset, len).await.unwrap().to_vec());
    }
    out
}

/// The replayed mirror file of volume `db` (id `volume`) is gone. The
/// server removes it on the volume's mirror worker once "not pending" is
/// committed, which may be just after the open's reply; `volume show` asks
/// the same worker, in order, so its answer comes after the removal.
async fn assert_replayed_mirror_removed(pool: &Pool, admin: &ControlClient, volume: u64) {
    admin.request(Request::VolumeCacheShow { name: "db".into() }).await.unwrap();
    let mirror = pool.config.cache_mirror_dir.join(format!("volume-{volume}.mirror"));
    assert!(!mirror.exists(), "the replayed mirror is gone");
}

/// An agent mirrors writes and dies with some unreleased: the next open of
/// the volume is answered only after the server wrote every one of them to
/// every leg, in order; released ones are not written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_s_mirrored_writes_are_on_the_devices_before_the_next_open() {
    let pool = Pool::start_with(LEASE_MS, DURABLE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 4 * MIB, legs: 2 }).await.unwrap();
    let (a, _a_events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();

    // No cache yet: nothing to mirror to; and the setting waits for a close.
    let e = a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap_err();
    assert_eq!(code(e).0, ErrorCode::InvalidArgument);
    let set = Request::VolumeCache { name: "db".into(), size_bytes: CACHE_BYTES, mode: Some(CacheMode::Mirrored) };
    let e = admin.request(set.clone()).await.unwrap_err();
    assert_eq!(code(e).0, ErrorCode::Busy, "the setting changes only while the volume is closed");
    a.request(Request::Close { handle: h.handle }).await.unwrap();
    assert_eq!(admin.request(set).await.unwrap(), Response::Done);

    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();
    let cache = VolumeCache { volume: h.description.volume, size_bytes: CACHE_BYTES, mode: CacheMode::Mirrored };
    assert_eq!(
        a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap(),
        Response::MirrorOpened { cache: Some(cache) }
    );
    // Only the holder's session mirrors.
    let (b, _b_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let e = append(&b, h.handle, vec![record(1, 0, 9, 512)]).await.unwrap_err();
    assert_eq!(code(e).0, ErrorCode::HandleBroken);

    // Released (on the devices already, as far as the server knows):
    // never written by the replay.
    assert_eq!(append(&a, h.handle, vec![record(1, MIB / 2, b'r', 4096)]).await.unwrap(), 1);
    a.request(Request::MirrorRelease { handle: h.handle, upto_seq: 1 }).await.unwrap();
    // Unreleased: two concurrent appends, the later one overwriting part
    // of the earlier; replayed in order, the later bytes win.
    let first = append(&a, h.handle, vec![record(2, 0, b'a', 8192), record(3, 65536, b'b', 512)]);
    let second = append(&a, h.handle, vec![record(5, 4096, b'c', 4096)]);
    let (first, second) = tokio::join!(first, second);
    assert_eq!((first.unwrap(), second.unwrap()), (3, 5));
    let e = append(&a, h.handle, vec![record(4, 0, 1, 512)]).await.unwrap_err();
    assert!(code(e).1.contains("out of order"), "sequence numbers only rise");

    // The holder dies (its connection drops, nothing released, no close).
    a.close().await;
    let h2 = open_when_free(&b, "db").await;
    for leg in read_legs(&pool, &h2.description, 0, 8192).await {
        assert!(all(&leg[..4096], b'a'), "record 2 replayed");
        assert!(all(&leg[4096..], b'c'), "the later write (record 5) wins");
    }
    for leg in read_legs(&pool, &h2.description, 65536, 512).await {
        assert!(all(&leg, b'b'), "record 3 replayed");
    }
    for leg in read_legs(&pool, &h2.description, MIB / 2, 4096).await {
        assert!(all(&leg, 0), "a released record is not replayed");
    }
    assert_replayed_mirror_removed(&pool, &admin, h2.description.volume.0).await;

    // The new holder mirrors afresh.
    assert!(matches!(
        b.request(Request::MirrorOpen { handle: h2.handle }).await.unwrap(),
        Response::MirrorOpened { .. }
    ));
    assert_eq!(append(&b, h2.handle, vec![record(1, 0, b'n', 512)]).await.unwrap(), 1);
}

/// A snapshot of a cached volume whose holder died (no close: a close
/// says the holder destaged everything), and whose mirror still holds
/// writes it acknowledged, is committed only after the server wrote the
/// mirror to the devices: the snapshot holds those writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_cached_volume_nobody_holds_writes_its_mirror_first() {
    let pool = Pool::start_with(LEASE_MS, DURABLE_MS).await;
    let admin = pool.admin().await;
    create_cached_db(&admin).await;
    let (a, _a_events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();
    a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap();
    append(&a, h.handle, vec![record(1, 0, b'a', 8192), record(2, 65536, b'b', 512)]).await.unwrap();
    a.close().await;
    for leg in read_legs(&pool, &h.description, 0, 8192).await {
        assert!(all(&leg, 0), "only the mirror holds the writes before the snapshot");
    }

    let snapshot = Request::SnapshotCreate { volume: "db".into(), name: "s".into() };
    assert_eq!(admin.request(snapshot).await.unwrap(), Response::Done);
    // Nothing wrote since: the snapshot's bytes are the live volume's.
    for leg in read_legs(&pool, &h.description, 0, 8192).await {
        assert!(all(&leg, b'a'), "the mirror's write is on the devices when the snapshot is taken");
    }
    for leg in read_legs(&pool, &h.description, 65536, 512).await {
        assert!(all(&leg, b'b'), "the mirror's write is on the devices when the snapshot is taken");
    }
    assert_replayed_mirror_removed(&pool, &admin, h.description.volume.0).await;
}

/// What `sanvol volume show` shows of a cache (protocol 9): the setting,
/// the holder, whether the server mirrors it, and what the mirror holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_state_shows_the_holder_mirroring_and_the_dirty_bytes() {
    let pool = Pool::start_with(LEASE_MS, DURABLE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    let show = || async {
        match admin.request(Request::VolumeCacheShow { name: "db".into() }).await.unwrap() {
            Response::VolumeCacheState(state) => state,
            other => panic!("{other:?}"),
        }
    };
    let state = show().await;
    assert_eq!(state.cache, None);
    assert_eq!(state.summary(), "none");
    let set = Request::VolumeCache { name: "db".into(), size_bytes: CACHE_BYTES, mode: Some(CacheMode::Mirrored) };
    admin.request(set).await.unwrap();
    let (a, _a_events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();
    let state = show().await;
    assert!(state.holder.as_deref().unwrap().starts_with("host-a"), "{state:?}");
    assert!(!state.mirroring, "not mirroring before MirrorOpen: {state:?}");
    assert!(state.summary().contains("write-through"), "{}", state.summary());

    a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap();
    append(&a, h.handle, vec![record(1, 0, b'a', 8192), record(2, 65536, b'b', 512)]).await.unwrap();
    let state = show().await;
    assert!(state.mirroring, "{state:?}");
    assert_eq!((state.held_records, state.held_bytes), (2, 8192 + 512));
    assert!(state.summary().contains("mirrored, 8704 bytes held (2 writes"), "{}", state.summary());
    a.request(Request::MirrorRelease { handle: h.handle, upto_seq: 2 }).await.unwrap();
    assert_eq!(show().await.held_bytes, 0);
    a.request(Request::Close { handle: h.handle }).await.unwrap();
    assert_eq!(show().await.holder, None);
}

/// Appends that do not fit the mirror wait for a release (back-pressure),
/// they never fail; many appends queued together are answered together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mirror_holds_appends_until_a_release() {
    let pool = Pool::start_with(LEASE_MS, DURABLE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 16 * MIB, legs: 1 }).await.unwrap();
    let set = Request::VolumeCache { name: "db".into(), size_bytes: CACHE_BYTES, mode: Some(CacheMode::Mirrored) };
    admin.request(set).await.unwrap();
    let (a, _events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();
    a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap();

    // 3 MiB each: two fit the 8 MiB mirror, the third must wait.
    let big = |seq: u64| vec![record(seq, (seq - 1) * 3 * MIB, seq as u8, 3 * MIB as usize)];
    assert_eq!(append(&a, h.handle, big(1)).await.unwrap(), 1);
    assert_eq!(append(&a, h.handle, big(2)).await.unwrap(), 2);
    // Then, sent in this order on the one connection: the third (which must
    // wait), many small appends queued behind it, and the release that makes
    // room. The small ones never overtake the third.
    let third = append(&a, h.handle, big(3));
    let small = futures::future::join_all(
        (0..16u64).map(|i| append(&a, h.handle, vec![record(10 + i, 12 * MIB + i * 4096, 7, 4096)])),
    );
    let release = a.request(Request::MirrorRelease { handle: h.handle, upto_seq: 2 });
    let (third, small, released) = tokio::join!(third, small, release);
    assert_eq!(released.unwrap(), Response::Done);
    assert_eq!(third.unwrap(), 3);
    let answered: Vec<u64> = small.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(answered, (10..26).collect::<Vec<u64>>());
}

/// Which mirror file a replay may write (format 11): only the newest
/// generation's. A file of an older generation — what a server that was
/// active before a handoff keeps — is never replayed over newer writes
/// (the mirror was started afresh since, which the holder does only with
/// everything before on the devices). When the newest generation's file is
/// not on this server (it is at the server the holder mirrored at), the
/// open is refused, naming the generation; once the file is back the
/// replay writes it; `MirrorForget` gives it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_newest_mirror_generation_is_replayed_and_a_missing_one_refuses_the_open() {
    let pool = Pool::start_with(LEASE_MS, DURABLE_MS).await;
    let admin = pool.admin().await;
    create_cached_db(&admin).await;
    let (a, _a_events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();
    let file = pool.config.cache_mirror_dir.join(format!("volume-{}.mirror", h.description.volume.0));
    let aside = pool.config.cache_mirror_dir.join("aside.mirror");

    // Generation 1 holds an old write; its file is kept aside (a server
    // that stopped being active keeps it so).
    a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap();
    append(&a, h.handle, vec![record(1, 0, b'o', 8192)]).await.unwrap();
    std::fs::copy(&file, &aside).unwrap();
    // The holder mirrors afresh (generation 2), releases everything and
    // closes cleanly: nothing pending.
    a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap();
    append(&a, h.handle, vec![record(1, 4096, b'n', 4096)]).await.unwrap();
    a.request(Request::MirrorRelease { handle: h.handle, upto_seq: 1 }).await.unwrap();
    a.request(Request::Close { handle: h.handle }).await.unwrap();

    // The stale file comes back: the next open does not replay it.
    std::fs::copy(&aside, &file).unwrap();
    let (b, _b_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let h = open(&b, "db", OpenMode::Exclusive).await.unwrap();
    for leg in read_legs(&pool, &h.description, 0, 8192).await {
        assert!(all(&leg, 0), "the stale mirror (an older generation) was replayed over the volume");
    }

    // Generation 3 holds an acknowledged write and its holder dies; this
    // server's file is not that generation's (the stale one is back).
    b.request(Request::MirrorOpen { handle: h.handle }).await.unwrap();
    append(&b, h.handle, vec![record(1, 65536, b'z', 512)]).await.unwrap();
    let newest = pool.config.cache_mirror_dir.join("newest.mirror");
    std::fs::copy(&file, &newest).unwrap();
    std::fs::copy(&aside, &file).unwrap();
    b.close().await;
    let (c, _c_events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        match open(&c, "db", OpenMode::Exclusive).await {
            Err(ControlClientError::Server(e)) if e.code == ErrorCode::Conflict => {
                assert!(tokio::time::Instant::now() < deadline, "still reserved: {}", e.message);
                tokio::time::sleep(Duration::from_millis(LEASE_MS / 5)).await;
            }
            Err(ControlClientError::Server(e)) => break e,
            Ok(h) => panic!("opened without generation 3's writes: {h:?}"),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(refused.code, ErrorCode::Unavailable, "{}", refused.message);
    assert!(refused.message.contains("generation 3"), "{}", refused.message);
    assert!(refused.message.contains("--forget-mirror"), "{}", refused.message);
    for leg in read_legs(&pool, &h.description, 0, 8192).await {
        assert!(all(&leg, 0), "the stale mirror was replayed");
    }

    // The newest file is back (its server is active again): replayed.
    std::fs::copy(&newest, &file).unwrap();
    let h = open(&c, "db", OpenMode::Exclusive).await.unwrap();
    for leg in read_legs(&pool, &h.description, 65536, 512).await {
        assert!(all(&leg, b'z'), "generation 3's write replayed");
    }
    assert_replayed_mirror_removed(&pool, &admin, h.description.volume.0).await;

    // Generation 4, holder dies, its file is lost for good: given up.
    c.request(Request::MirrorOpen { handle: h.handle }).await.unwrap();
    append(&c, h.handle, vec![record(1, 131072, b'l', 512)]).await.unwrap();
    std::fs::remove_file(&file).unwrap();
    c.close().await;
    let forget = Request::MirrorForget { name: "db".into() };
    loop {
        match admin.request(forget.clone()).await {
            Ok(r) => break assert_eq!(r, Response::Done),
            // The dead holder's handle is active until its lease and
            // durable time are out.
            Err(ControlClientError::Server(e)) if e.code == ErrorCode::Busy => {
                assert!(tokio::time::Instant::now() < deadline, "still busy: {}", e.message);
                tokio::time::sleep(Duration::from_millis(LEASE_MS / 5)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (d, _d_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let h = open_when_free(&d, "db").await;
    for leg in read_legs(&pool, &h.description, 131072, 512).await {
        assert!(all(&leg, 0), "a forgotten mirror is not replayed");
    }
}

/// A pool with `db` (two legs, a mirrored cache), held by agent host-a,
/// which has started mirroring.
async fn holder_mirroring_db() -> (Pool, ControlClient, OpenedHandle) {
    let pool = Pool::start_with(LEASE_MS, DURABLE_MS).await;
    let admin = pool.admin().await;
    create_cached_db(&admin).await;
    let (a, _a_events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();
    assert!(matches!(
        a.request(Request::MirrorOpen { handle: h.handle }).await.unwrap(),
        Response::MirrorOpened { cache: Some(_) }
    ));
    (pool, a, h)
}

/// A replay writes a two-leg volume's legs at once (one device's write
/// time, not the sum): while the first leg's device holds its writes, the
/// second leg gets the replayed bytes; the open is answered only once both
/// legs have them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_writes_both_legs_at_once_and_answers_the_open_once_both_have_it() {
    use std::sync::atomic::Ordering;
    let (pool, a, h) = holder_mirroring_db().await;
    assert_eq!(append(&a, h.handle, vec![record(1, 0, b'x', 8192)]).await.unwrap(), 1);
    let legs = &h.description.extents[0].legs;
    assert_eq!(legs.len(), 2);
    let (first, second) = (&legs[0], &legs[1]);
    assert_ne!(first.device, second.device);
    let held = pool.devices.devices[first.device.0 as usize].clone();
    let other = pool.devices.devices[second.device.0 as usize].clone();
    held.hold_writes_from(first.offset);

    // The holder dies; another agent's open waits for the replay.
    a.close().await;
    let (b, _b_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let opening = open_when_free(&b, "db");
    tokio::pin!(opening);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // The replay's write reaches the first leg's device and is held there.
    loop {
        let started = held.write_held.notified();
        tokio::pin!(started);
        started.as_mut().enable();
        if held.writes_held.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::select! {
            _ = started => {}
            h = &mut opening => panic!("the open was answered with the first leg's write held: {h:?}"),
            _ = tokio::time::sleep_until(deadline) => panic!("the replay never wrote the first leg"),
        }
    }
    // Meanwhile the second leg gets its copy.
    loop {
        let on_second = other.read(second.offset, 8192).await.unwrap();
        if all(&on_second, b'x') {
            break;
        }
        tokio::select! {
            h = &mut opening => panic!("the open was answered with the first leg's write held: {h:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second leg was not written while the first leg's write was held: the legs are written one after \
             the other"
        );
    }
    // Still held: not answered yet.
    tokio::select! {
        h = &mut opening => panic!("the open was answered with the first leg's write held: {h:?}"),
        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
    }
    held.hold_writes_from(u64::MAX);
    let h2 = tokio::time::timeout(Duration::from_secs(20), opening).await.expect("the open is answered");
    for leg in read_legs(&pool, &h2.description, 0, 8192).await {
        assert!(all(&leg, b'x'), "both legs hold the replayed record");
    }
}

/// A damaged record in a dead holder's mirror file (one flipped bit) is
/// found by its checksum when the server replays: the open is refused,
/// naming the file, and nothing of the mirror — not even its good records
/// — reaches the devices (the replay reads the file as it writes; the
/// scan before it checks every record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_mirror_record_refuses_the_open_and_nothing_is_replayed() {
    use std::os::unix::fs::FileExt;
    let (pool, a, h) = holder_mirroring_db().await;
    // One append at a time: each its own batch, so the damaged first
    // record has later batches after it (damage, not a torn tail).
    for i in 0..4u64 {
        assert_eq!(append(&a, h.handle, vec![record(i + 1, i * 65536, b'd', 8192)]).await.unwrap(), i + 1);
    }
    a.close().await;
    let path = pool.config.cache_mirror_dir.join(format!("volume-{}.mirror", h.description.volume.0));
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let scanned = volume_format::cache_log::scan(&file, "mirror").expect("the mirror is intact before the flip");
    assert_eq!(scanned.records.len(), 4);
    let at = scanned.records[0].pos + volume_format::cache_log::RECORD_HEADER_BYTES as u64 + 100;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], at).unwrap();

    let (b, _b_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        match open(&b, "db", OpenMode::Exclusive).await {
            Ok(h) => panic!("opened over a damaged mirror: {h:?}"),
            Err(ControlClientError::Server(e))
                if e.code == ErrorCode::Conflict || e.message.contains("in its grace period") =>
            {
                assert!(tokio::time::Instant::now() < deadline, "still refused: {}", e.message);
                tokio::time::sleep(Duration::from_millis(LEASE_MS / 5)).await;
            }
            Err(e) => break code(e),
        }
    };
    assert_eq!(refusal.0, ErrorCode::Unavailable, "{}", refusal.1);
    assert!(refusal.1.contains(&path.display().to_string()), "the refusal names the file: {}", refusal.1);
    for leg in read_legs(&pool, &h.description, 0, 4 * 65536).await {
        assert!(all(&leg, 0), "a record of the damaged mirror reached the devices");
    }
}

async fn stage(
    client: &ControlClient,
    handle: HandleId,
    copy: u64,
    records: Vec<MirrorRecord>,
) -> Result<u64, ControlClientError> {
    match client.request(Request::MirrorStage { handle, copy, records }).await? {
        Response::Mirrored { upto_seq } => Ok(upto_seq),
        other => panic!("{other:?}"),
    }
}

/// Mirroring restarted with the holder's records (protocol 15). Records
/// staged for the next generation are no replay's until a start adopts
/// them; a start naming another attempt, or a count the staged file does
/// not hold, is refused and changes nothing (the current generation stays
/// the one a replay writes). Once adopted, the staged file is the
/// generation's: the holder dies, and the next open writes exactly the
/// staged records and the appends after them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_records_become_the_mirror_only_when_mirroring_starts_with_them() {
    let (pool, a, h) = holder_mirroring_db().await;
    let admin = pool.admin().await;
    let volume = h.description.volume;
    // Generation 1 holds record 1.
    assert_eq!(append(&a, h.handle, vec![record(1, 0, b'a', 4096)]).await.unwrap(), 1);
    // Only the holder stages.
    let (b, _b_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let e = stage(&b, h.handle, 7, vec![record(1, 0, b'x', 512)]).await.unwrap_err();
    assert_eq!(code(e).0, ErrorCode::HandleBroken);
    // Attempt 7: record 1 and a later one, in two requests.
    assert_eq!(stage(&a, h.handle, 7, vec![record(1, 0, b'a', 4096)]).await.unwrap(), 1);
    assert_eq!(stage(&a, h.handle, 7, vec![record(2, 8192, b'b', 4096)]).await.unwrap(), 2);
    let show = |admin: &ControlClient| {
        let admin = admin.clone();
        async move {
            match admin.request(Request::VolumeCacheShow { name: "db".into() }).await.unwrap() {
                Response::VolumeCacheState(s) => s,
                other => panic!("{other:?}"),
            }
        }
    };
    let before = show(&admin).await;
    for (copy, records) in [(8, 2), (7, 3)] {
        let e = a.request(Request::MirrorOpenStaged { handle: h.handle, copy, records }).await.unwrap_err();
        let (code, message) = code(e);
        assert_eq!(code, ErrorCode::Unavailable, "{message}");
        assert!(message.contains("no whole staged copy"), "{message}");
    }
    let after = show(&admin).await;
    assert_eq!((after.mirroring, after.held_records), (true, 1), "a refused start changed the mirror: {after:?}");
    assert_eq!(before.held_records, 1);
    // The refused starts committed no generation: appends still go on.
    assert_eq!(append(&a, h.handle, vec![record(3, 16384, b'c', 4096)]).await.unwrap(), 3);
    // Attempt 9 replaces attempt 7 (the records as the log now holds them).
    assert_eq!(stage(&a, h.handle, 9, vec![record(1, 0, b'a', 4096)]).await.unwrap(), 1);
    assert_eq!(
        stage(&a, h.handle, 9, vec![record(2, 8192, b'b', 4096), record(3, 16384, b'c', 4096)]).await.unwrap(),
        3
    );
    assert!(matches!(
        a.request(Request::MirrorOpenStaged { handle: h.handle, copy: 9, records: 3 }).await.unwrap(),
        Response::MirrorOpened { cache: Some(_) }
    ));
    let adopted = show(&admin).await;
    assert_eq!((adopted.mirroring, adopted.held_records), (true, 3), "{adopted:?}");
    assert!(!pool.config.cache_mirror_dir.join(format!("volume-{}.mirror.staged", volume.0)).exists());
    // Appends go on after the staged records; a release frees the first.
    assert_eq!(append(&a, h.handle, vec![record(4, 0, b'd', 512)]).await.unwrap(), 4);
    a.request(Request::MirrorRelease { handle: h.handle, upto_seq: 2 }).await.unwrap();

    // The holder dies: the next open writes records 3 and 4, not 1 or 2.
    a.close().await;
    let h2 = open_when_free(&b, "db").await;
    for leg in read_legs(&pool, &h2.description, 0, 4096).await {
        assert!(all(&leg[..512], b'd'), "record 4 replayed");
        assert!(all(&leg[512..], 0), "record 1 was released: not replayed");
    }
    for leg in read_legs(&pool, &h2.description, 8192, 4096).await {
        assert!(all(&leg, 0), "record 2 was released: not replayed");
    }
    for leg in read_legs(&pool, &h2.description, 16384, 4096).await {
        assert!(all(&leg, b'c'), "record 3, staged, replayed");
    }
}

/// The file of a new mirror generation is prepared before that generation
/// is committed (`mirror::MirrorOp::Prepare`), so a committed generation
/// always has its file. Here the other order's gap is closed from the
/// other side: the holder restarts mirroring with its staged records, the
/// file of generation 2 is prepared from them, and the commit of
/// generation 2 fails on every copy (the server never records it). The
/// server restarts, the holder is gone: the record still says generation
/// 1, pending, at this server, and this server's file is generation 2's —
/// the next open replays it (it holds everything generation 1 held that
/// the devices lack) instead of refusing the volume for a file "of another
/// generation". Devices read back directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_prepared_but_never_committed_is_replayed_at_the_next_open() {
    use std::sync::atomic::Ordering;
    let (mut pool, a, h) = holder_mirroring_db().await;
    // Generation 1 holds record 1; the holder stages it and a later one.
    assert_eq!(append(&a, h.handle, vec![record(1, 0, b'a', 4096)]).await.unwrap(), 1);
    assert_eq!(stage(&a, h.handle, 7, vec![record(1, 0, b'a', 4096), record(2, 8192, b'b', 4096)]).await.unwrap(), 2);

    // Every metadata copy holds the commit of generation 2 back (writes to
    // the metadata area, not the pool lease after it), then fails it.
    for d in &pool.devices.devices {
        let label = volume_format::label::DeviceLabel::decode(&d.read(0, 4096).await.unwrap()).unwrap();
        d.hold_writes_in(label.layout.metadata.start..label.layout.metadata.end);
    }
    let start = {
        let a = a.clone();
        tokio::spawn(
            async move { a.request(Request::MirrorOpenStaged { handle: h.handle, copy: 7, records: 2 }).await },
        )
    };
    for d in &pool.devices.devices {
        while d.writes_held.load(Ordering::SeqCst) == 0 {
            let started = d.write_held.notified();
            if d.writes_held.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::timeout(Duration::from_secs(10), started).await.expect("the commit reaches every copy");
        }
    }
    assert!(
        !pool.config.cache_mirror_dir.join(format!("volume-{}.mirror.staged", h.description.volume.0)).exists(),
        "the staged file became generation 2's before the commit"
    );
    pool.devices.fail_writes(true);
    for d in &pool.devices.devices {
        d.hold_writes_in(0..0);
    }
    // The holder dies with the server (which never recorded generation 2:
    // the devices fail every write until it stopped).
    a.close().await;
    start.abort();
    pool.stop_server().await;
    pool.devices.fail_writes(false);
    pool.start_server().await;

    let (b, _b_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let h2 = open_when_free(&b, "db").await;
    for leg in read_legs(&pool, &h2.description, 0, 4096).await {
        assert!(all(&leg, b'a'), "record 1 replayed");
    }
    for leg in read_legs(&pool, &h2.description, 8192, 4096).await {
        assert!(all(&leg, b'b'), "record 2, staged into the prepared file, replayed");
    }
}
