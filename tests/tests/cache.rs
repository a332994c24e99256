//! The agent's write-back cache with real processes: `cache_serve` (the
//! cache in front of an nbdkit device, served over NBD) is killed with
//! SIGKILL while its cache is dirty, and the device file is read back
//! directly. The device sits behind nbdkit's `delay` filter (1 s per write)
//! so acknowledged writes are still only in the cache log at the kill; a
//! restart over the same device without the delay replays the log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::peers::{self, Peer};
use sanvol_tests::system::{example_bin, Proc};
use tokio::sync::mpsc;

const DEVICE_BYTES: u64 = 64 << 20;
const SLOT_BYTES: u64 = 64 << 10;
const SLOTS: u64 = 24;

struct Rig {
    dir: tempfile::TempDir,
    image: PathBuf,
    nbdkit: Option<Peer>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::Builder::new().prefix("sanvol-cache-").tempdir().unwrap();
        let image = peers::sparse_file(dir.path(), DEVICE_BYTES);
        Rig { dir, image, nbdkit: None }
    }

    /// (Re)starts nbdkit over the image, with `delay-write=1s` or without.
    fn device(&mut self, slow: bool) -> NbdUri {
        self.nbdkit = None; // killed by PID on drop
        let image = self.image.display().to_string();
        let peer = if slow {
            peers::nbdkit(&["--filter=delay", "file", &image, "delay-write=1000ms"])
        } else {
            peers::nbdkit(&["file", &image])
        };
        let uri = peer.uri();
        self.nbdkit = Some(peer);
        uri
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("vol.cachelog")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cache.sock")
    }

    fn cache_serve(&self, device: &NbdUri) -> Proc {
        let mut cmd = Command::new(example_bin("cache_serve"));
        cmd.arg("--unix").arg(self.socket()).arg("--device").arg(device.to_string());
        cmd.arg("--log").arg(self.log_path()).arg("--log-mib").arg("32");
        let log = self.dir.path().join(format!("cache_serve.{}.log", std::process::id()));
        Proc::spawn("cache_serve", cmd, log)
    }

    fn cache_serve_ready(&self, device: &NbdUri) -> Proc {
        let mut p = self.cache_serve(device);
        p.wait_listening(&self.socket());
        p
    }

    async fn client(&self) -> NbdClient {
        let uri = NbdUri::unix(self.socket(), "");
        NbdClient::connect(&uri, ClientOptions::default()).await.expect("connect to cache_serve")
    }

    fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

/// Write `slot` of `round`: inside its slot (so one round's writes never
/// overlap and may run concurrently), overlapping other rounds' writes.
fn round_write(round: u64, slot: u64) -> (u64, Vec<u8>) {
    let offset = slot * SLOT_BYTES + (round * 4096 + slot * 512) % (SLOT_BYTES / 2);
    let len = 4096 + ((round * 7 + slot * 3) % 7) * 4096;
    let data = (0..len).map(|i| (round * 101 + slot * 13 + i / 512) as u8 ^ 0x5a).collect();
    (offset, data)
}

fn apply(model: &mut [u8], (offset, data): &(u64, Vec<u8>)) {
    model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
}

/// Four rounds of writes, then a fifth in flight: once six of its writes
/// are acknowledged, `kill` runs. Returns the model and the fifth round's
/// acknowledged slots (with those acknowledged as the kill went in).
async fn kill_in_the_fifth_round(client: Arc<NbdClient>, kill: impl FnOnce()) -> (Vec<u8>, Vec<u64>) {
    let (model, mut acks) = write_rounds(client.clone(), 4).await;
    let mut acked = Vec::new();
    while acked.len() < 6 {
        acked.push(acks.recv().await.expect("the fifth round's writes are acknowledged"));
    }
    kill();
    while let Ok(slot) = acks.try_recv() {
        acked.push(slot);
    }
    (model, acked)
}

/// Runs `rounds` full rounds (every write acknowledged), then launches one
/// more and reports each of its acknowledgements on the returned channel.
async fn write_rounds(client: Arc<NbdClient>, rounds: u64) -> (Vec<u8>, mpsc::UnboundedReceiver<u64>) {
    let mut model = vec![0u8; (SLOTS * SLOT_BYTES) as usize];
    for round in 0..rounds {
        let writes = (0..SLOTS).map(|slot| {
            let client = client.clone();
            let write = round_write(round, slot);
            async move { client.write(write.0, Bytes::from(write.1), false).await }
        });
        for result in futures::future::join_all(writes).await {
            result.expect("a cached write is acknowledged");
        }
        for slot in 0..SLOTS {
            apply(&mut model, &round_write(round, slot));
        }
    }
    let (acked, rx) = mpsc::unbounded_channel();
    for slot in 0..SLOTS {
        let (client, acked) = (client.clone(), acked.clone());
        tokio::spawn(async move {
            let (offset, data) = round_write(rounds, slot);
            if client.write(offset, Bytes::from(data), false).await.is_ok() {
                let _ = acked.send(slot);
            }
        });
    }
    (model, rx)
}

/// Ranges of `model` the device must hold: everything but the unacknowledged
/// writes of the last round (which may or may not have landed).
fn check_device(image: &[u8], model: &[u8], last_round: u64, acked: &[u64]) -> Result<(), String> {
    let mut expected = model.to_vec();
    let mut unknown = vec![false; model.len()];
    for slot in 0..SLOTS {
        let write = round_write(last_round, slot);
        if acked.contains(&slot) {
            apply(&mut expected, &write);
        } else {
            unknown[write.0 as usize..write.0 as usize + write.1.len()].fill(true);
        }
    }
    for (at, (&want, &unknown)) in expected.iter().zip(&unknown).enumerate() {
        if !unknown && image[at] != want {
            return Err(format!("device byte {at} is {:#04x}, the acknowledged write put {want:#04x}", image[at]));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_dirty_cache_then_restart_replays_every_acknowledged_write() {
    let mut rig = Rig::new();
    let slow = rig.device(true);
    let mut server = rig.cache_serve_ready(&slow);
    let client = Arc::new(rig.client().await);
    let (model, acked) = kill_in_the_fifth_round(client, || server.kill()).await;
    rig.nbdkit = None; // the slow device goes too (its delayed writes with it)

    let before = rig.image_bytes();
    assert!(
        check_device(&before, &model, 4, &acked).is_err(),
        "every acknowledged write reached the 1 s-per-write device before the kill: the test did not exercise \
         the cache log"
    );

    let fast = rig.device(false);
    let mut server = rig.cache_serve_ready(&fast);
    assert!(!server.log().contains(": 0 records replayed"), "{}", server.log());
    server.terminate();
    let after = rig.image_bytes();
    if let Err(e) = check_device(&after, &model, 4, &acked) {
        panic!("after the replay: {e}; cache_serve log:\n{}", server.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_record_is_reported_and_nothing_is_destaged() {
    let mut rig = Rig::new();
    let slow = rig.device(true);
    let mut server = rig.cache_serve_ready(&slow);
    let client = rig.client().await;
    // One write at a time: each its own batch, so a damaged first record has
    // later batches after it.
    for slot in 0..8 {
        let (offset, data) = round_write(0, slot);
        client.write(offset, Bytes::from(data), false).await.unwrap();
    }
    server.kill();
    drop(client);
    rig.nbdkit = None;

    let log_path = rig.log_path();
    let file = std::fs::File::open(&log_path).unwrap();
    let scanned = volume_format::cache_log::scan(&file, "log").expect("the log is intact before the flip");
    assert!(scanned.records.len() >= 2, "{} records", scanned.records.len());
    let damaged = scanned.records[0].pos;
    flip_byte(&log_path, damaged + 64 + 1000);

    let before = rig.image_bytes();
    let fast = rig.device(false);
    let mut server = rig.cache_serve(&fast);
    let status = server.wait_exit_within(std::time::Duration::from_secs(30));
    assert!(!status.success(), "cache_serve started over a damaged log; log:\n{}", server.log());
    let log = server.log();
    assert!(
        log.contains(&format!("corrupt at file offset {damaged}")) && log.contains(&log_path.display().to_string()),
        "the error names the file and the offset:\n{log}"
    );
    assert!(rig.image_bytes() == before, "nothing from the damaged log reached the device");
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    byte[0] ^= 0x10;
    file.write_all_at(&byte, at).unwrap();
}

/// A pool of one device (a file behind nbdkit's `delay` filter, 100 ms per
/// write: slow enough that the cache holds writes, fast enough for the
/// server's disk lease), `sanvol-mds`, and volume `db` with a mirrored cache.
struct MirrorRig {
    stack: sanvol_tests::system::Stack,
    _device_dir: tempfile::TempDir,
    image: PathBuf,
    /// The volume's extent map as created: each extent's offset on the
    /// device, and the extent size.
    extent_offsets: Vec<u64>,
    extent_bytes: u64,
}

impl MirrorRig {
    fn new() -> MirrorRig {
        MirrorRig::with_lease_ms(1000, Some(500))
    }

    /// With the server's lease and durable time (`None`: its default).
    fn with_lease_ms(lease_ms: u64, durable_ms: Option<u64>) -> MirrorRig {
        MirrorRig::build(lease_ms, durable_ms, |_| {})
    }

    /// With a second server (`mds-2`, standing by): each server keeps its
    /// mirrors in a directory of its own; agents and the CLI know both.
    fn with_standby() -> (MirrorRig, sanvol_tests::system::ServerProc) {
        MirrorRig::with_standby_durable(Some(500))
    }

    /// [`MirrorRig::with_standby`] with the servers' durable time (`None`:
    /// their default, 30 s).
    fn with_standby_durable(durable_ms: Option<u64>) -> (MirrorRig, sanvol_tests::system::ServerProc) {
        let rig = MirrorRig::build(1000, durable_ms, |stack| {
            stack.mds_config_extra = vec!["cache_mirror_dir = \"mirror-1\"".into()];
        });
        let mut stack = rig.stack;
        // mds-2 serves metrics too: the fetch test reads its counters.
        stack.mds_config_extra =
            vec!["cache_mirror_dir = \"mirror-2\"".into(), "metrics_addr = \"127.0.0.1:0\"".into()];
        let standby = stack.start_server(2);
        stack.more_mds.push(standby.addr());
        (MirrorRig { stack, ..rig }, standby)
    }

    /// `configure` adjusts the stack before its first server starts.
    fn build(
        lease_ms: u64,
        durable_ms: Option<u64>,
        configure: impl FnOnce(&mut sanvol_tests::system::Stack),
    ) -> MirrorRig {
        MirrorRig::build_sized(lease_ms, durable_ms, (256 << 20, "64M", "32M"), configure)
    }

    /// [`MirrorRig::build`] with the device's size, and `db`'s and its
    /// cache's (as `sanvol` takes them).
    fn build_sized(
        lease_ms: u64,
        durable_ms: Option<u64>,
        (device_bytes, volume_size, cache_size): (u64, &str, &str),
        configure: impl FnOnce(&mut sanvol_tests::system::Stack),
    ) -> MirrorRig {
        use sanvol_tests::system::Stack;
        let device_dir = tempfile::Builder::new().prefix("sanvol-cache-mirror-").tempdir().unwrap();
        let image = peers::sparse_file(device_dir.path(), device_bytes);
        let image_path = image.display().to_string();
        // One thread per connection: nbdkit 1.32 aborts ("Assertion `sock >=
        // 0' failed") when a client dies while other threads of its
        // connection still have delayed writes to answer — the kill below
        // would take the pool's only device with it (seen in CI).
        let device = peers::nbdkit(&["-t", "1", "--filter=delay", "file", &image_path, "delay-write=100ms"]);
        let mut stack = Stack::with_devices(vec![device]);
        // The pool lease's writes queue behind the 100 ms data writes on
        // the one device: T = 1 s (the server's default) rather than 0.5 s.
        stack.lease_io_timeout_ms = 1000;
        stack.lease_ms = lease_ms;
        stack.durable_ms = durable_ms;
        configure(&mut stack);
        stack.start_mds();
        stack.sanvol_ok(&["volume", "create", "db", volume_size]);
        stack.sanvol_ok(&["volume", "cache", "db", "--size", cache_size]);
        let show = stack.sanvol_json(&["volume", "show", "db"]);
        let extent_bytes = show["description"]["extent_bytes"].as_u64().unwrap();
        let extent_offsets = show["description"]["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["legs"][0]["offset"].as_u64().unwrap())
            .collect();
        MirrorRig { stack, _device_dir: device_dir, image, extent_offsets, extent_bytes }
    }

    /// The first slots of the volume, read from the device file directly.
    fn volume_image(&self) -> Vec<u8> {
        self.device_bytes(0, (SLOTS * SLOT_BYTES) as usize)
    }

    /// `len` bytes of the volume at `offset`, read from the device file
    /// directly (through the extent map, which these tests never change).
    fn device_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(&self.image).unwrap();
        let mut out = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let (extent, within) = (at / self.extent_bytes, at % self.extent_bytes);
            let leg = self.extent_offsets[extent as usize];
            let n = (len - done).min((self.extent_bytes - within) as usize);
            file.read_exact_at(&mut out[done..done + n], leg + within).unwrap();
            done += n;
        }
        out
    }

    /// `cache_serve --mds` as agent `name`, holding `db`, ready.
    fn cache_serve(&self, name: &str) -> (Proc, PathBuf) {
        use sanvol_tests::system::pub_path;
        self.stack.authorize_agent(name);
        let dir = self.stack.dir.path();
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(example_bin("cache_serve"));
        cmd.arg("--unix").arg(&socket).arg("--mds").arg(self.stack.mds_addr());
        cmd.arg("--key").arg(dir.join(format!("{name}.key"))).arg("--server-key").arg(pub_path(&self.stack.mds_key));
        cmd.arg("--volume-name").arg("db").arg("--log").arg(dir.join(format!("{name}.cachelog")));
        let mut server = Proc::spawn("cache_serve", cmd, dir.join(format!("cache_serve-{name}.log")));
        server.wait_listening(&socket);
        assert!(server.log().contains("mirrored"), "{}", server.log());
        (server, socket)
    }
}

/// The metadata server's mirror (issue 15) with real processes:
/// `cache_serve --mds` holds the volume and mirrors its cache at
/// `sanvol-mds`, and is killed with SIGKILL with a dirty cache. Another
/// client's open of the volume is answered only after the server wrote the
/// mirror to the device; the device file, read back directly, holds every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_mirrored_cache_the_server_replays_before_the_next_open() {
    let rig = MirrorRig::new();
    let (mut server, socket) = rig.cache_serve("cache-a");
    let client = Arc::new(NbdClient::connect(&NbdUri::unix(&socket, ""), ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || server.kill()).await;
    assert!(
        check_device(&rig.volume_image(), &model, 4, &acked).is_err(),
        "every acknowledged write reached the 100 ms-per-write device before the kill: the test did not exercise \
         the mirror"
    );

    // Another agent opens the volume: answered once the holder's handle
    // ran out and the server replayed the mirror.
    let stack = &rig.stack;
    stack.authorize_agent("cache-b");
    open_once_the_holder_is_gone(stack, "cache-b").await;
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("after the replay: {e}; mds log:\n{}", stack.mds_log());
    }
    assert!(stack.mds_log().contains("cache mirror replayed to the devices"), "{}", stack.mds_log());
}

/// Opens `db` as agent `name` (authorized already; a control connection
/// of its own): answered once the holder's handle ran out and the server
/// replayed its mirror.
async fn open_once_the_holder_is_gone(stack: &sanvol_tests::system::Stack, name: &str) {
    use sanvol_tests::system::pub_path;
    use volume_format::control::auth::Role;
    use volume_format::control::messages::{ErrorCode, OpenMode, Request, Response};

    let key = control_client::keys::load_private(&stack.dir.path().join(format!("{name}.key"))).unwrap();
    let (server_key, _) =
        control_client::keys::parse_public(std::fs::read_to_string(pub_path(&stack.mds_key)).unwrap().trim()).unwrap();
    let addr = stack.mds_addr().parse().unwrap();
    let (b, _events) =
        control_client::ControlClient::connect(&addr, &key, Some(&server_key), Role::Agent, name, [3; 16])
            .await
            .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match b.request(Request::Open { volume: "db".into(), mode: OpenMode::Exclusive }).await {
            Ok(Response::Opened(_)) => break,
            // Held by the old handle, or a restarted server's grace period:
            // the refusal names when it ends; retry soon.
            Err(control_client::ControlClientError::Server(e))
                if e.code == ErrorCode::Conflict || e.code == ErrorCode::Unavailable =>
            {
                assert!(tokio::time::Instant::now() < deadline, "{}", e.message);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("open: {other:?}; mds log:\n{}", stack.mds_log()),
        }
    }
}

/// Where a write-through write of round `round` (3 or 4) goes in `slot`:
/// after the slots, where no `round_write` reaches.
fn fresh_write(round: u64, slot: u64) -> (u64, Vec<u8>) {
    let offset = SLOTS * SLOT_BYTES + ((round - 3) * SLOTS + slot) * 8192;
    let data = (0..8192u64).map(|i| (round * 59 + slot * 17 + i / 512) as u8 ^ 0xa5).collect();
    (offset, data)
}

/// The records of the server's "cache mirror replayed to the devices"
/// line in `mds_log`, if it logged one.
fn replayed_records(mds_log: &str) -> Option<usize> {
    mds_log
        .lines()
        .find(|l| l.contains("cache mirror replayed to the devices"))
        .and_then(|l| l.split("records=").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
}

/// The mirror fails (`sanvol-mds` killed) while it holds records. Writes
/// elsewhere keep being acknowledged, once on the device (write-through).
/// A write over a record the dead server's mirror holds is not
/// acknowledged: a replay of that mirror would put the older record back
/// over it. Then the cache is killed too, the server restarted, and the
/// next open makes it replay its stale mirror. The device file, read
/// directly, holds every acknowledged write — before and after the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_mirror_gone_writes_go_through_and_a_replay_of_the_stale_mirror_undoes_none() {
    let mut rig = MirrorRig::new();
    let (mut server, socket) = rig.cache_serve("cache-a");
    // The agent that opens the volume after the server's restart.
    rig.stack.authorize_agent("cache-b");
    let client = Arc::new(NbdClient::connect(&NbdUri::unix(&socket, ""), ClientOptions::default()).await.unwrap());
    let (mut model, mut acks) = write_rounds(client.clone(), 2).await;
    // Let round 2 finish, then the server goes: the 100 ms-per-write device
    // still lacks most of round 2, so the mirror holds it.
    for _ in 0..SLOTS {
        acks.recv().await.expect("round 2 is acknowledged");
    }
    for slot in 0..SLOTS {
        apply(&mut model, &round_write(2, slot));
    }
    rig.stack.kill_mds();
    // The model also covers the fresh writes (`fresh_write`).
    let image_bytes = (SLOTS * SLOT_BYTES + 2 * SLOTS * 8192) as usize;
    model.resize(image_bytes, 0);

    // Over round 2's write in slot 0.
    let over = (round_write(2, 0).0, vec![0xeeu8; round_write(2, 0).1.len()]);
    let over_acked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let over_write = {
        let (client, over, acked) = (client.clone(), over.clone(), over_acked.clone());
        tokio::spawn(async move {
            if client.write(over.0, Bytes::from(over.1), false).await.is_ok() {
                acked.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while rig.device_bytes(over.0, over.1.len()) != over.1 {
        assert!(std::time::Instant::now() < deadline, "the write over the mirrored record never reached the device");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Writes elsewhere: acknowledged without the mirror.
    for round in 3..5 {
        let writes = (0..SLOTS).map(|slot| {
            let client = client.clone();
            let write = fresh_write(round, slot);
            async move { client.write(write.0, Bytes::from(write.1), false).await }
        });
        let results = tokio::time::timeout(std::time::Duration::from_secs(60), futures::future::join_all(writes))
            .await
            .expect("writes beside the mirrored records are acknowledged without the mirror, once on the device");
        for result in results {
            result.expect("writes are acknowledged without the mirror");
        }
        for slot in 0..SLOTS {
            apply(&mut model, &fresh_write(round, slot));
        }
    }
    server.kill();
    drop(client);
    let _ = over_write.await;
    let over_was_acked = over_acked.load(std::sync::atomic::Ordering::SeqCst);
    if over_was_acked {
        apply(&mut model, &over);
    }
    let log = server.log();
    // The write over the record is on the device but was not acknowledged:
    // there, either its bytes or round 2's are right.
    let check = |when: &str, image: Vec<u8>, mds_log: String| {
        let mut image = image;
        if !over_was_acked {
            let (at, len) = (over.0 as usize, over.1.len());
            if image[at..at + len] == over.1[..] {
                image[at..at + len].copy_from_slice(&model[at..at + len]);
            }
        }
        if let Some(at) = image.iter().zip(&model).position(|(a, b)| a != b) {
            panic!(
                "{when}: device byte {at} is {:#04x}, the acknowledged write put {:#04x} (the write over the \
                 mirrored record was acknowledged: {over_was_acked}); cache_serve log:\n{log}\nmds log:\n{mds_log}",
                image[at], model[at],
            );
        }
    };
    check("with the cache and the server dead", rig.device_bytes(0, image_bytes), String::new());

    // The server comes back; the holder's handle runs out and the next open
    // replays the (stale) mirror.
    rig.stack.start_mds();
    open_once_the_holder_is_gone(&rig.stack, "cache-b").await;
    let mds_log = rig.stack.mds_log();
    let replayed: usize = replayed_records(&mds_log)
        .unwrap_or_else(|| panic!("the restarted server replayed no mirror; mds log:\n{mds_log}"));
    assert!(replayed > 0, "the stale mirror held nothing: the test proves nothing; mds log:\n{mds_log}");
    check("after the server replayed its stale mirror", rig.device_bytes(0, image_bytes), mds_log);
}

/// `sanvol-agent attach` of `db` on agent `name` (started here); the export.
fn attach_cached(stack: &sanvol_tests::system::Stack, name: &str) -> (sanvol_tests::system::Agent, NbdUri) {
    let agent = stack.start_agent(name);
    let uri = agent.attach("db", "exclusive");
    assert!(agent.proc.log().contains("write-back cache open"), "{}", agent.proc.log());
    (agent, uri)
}

/// `sanvol-agent list --json`: the entry of `db`.
fn listed(agent: &sanvol_tests::system::Agent) -> serde_json::Value {
    listed_if(agent).expect("db is listed")
}

/// [`listed`], `None` while `db` is not listed (a restarted agent that has
/// not taken it back yet).
fn listed_if(agent: &sanvol_tests::system::Agent) -> Option<serde_json::Value> {
    let out = agent.cli(&["list", "--json"]);
    assert!(out.status.success(), "list: {}", String::from_utf8_lossy(&out.stderr));
    let volumes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    volumes.as_array().unwrap().iter().find(|v| v["volume"] == "db").cloned()
}

/// Issue 15 as a user runs it: `sanvol volume cache`, then `sanvol-agent
/// attach` serves the volume through a cache mirrored at `sanvol-mds`;
/// the agent is killed with SIGKILL while the 100 ms-per-write device still
/// lacks acknowledged writes. A second agent's attach is answered only once
/// the server replayed the mirror, and the device file, read back directly,
/// holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sanvol_agent_attach_caches_and_a_kill_9_loses_no_acknowledged_write() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    let (mut a, uri) = attach_cached(stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || a.proc.kill()).await;
    assert!(
        check_device(&rig.volume_image(), &model, 4, &acked).is_err(),
        "every acknowledged write reached the 100 ms-per-write device before the kill: the test did not exercise \
         the cache"
    );

    let b = attach_after_replay(stack, "agent-b").await;
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("after the replay: {e}; mds log:\n{}", stack.mds_log());
    }
    assert!(stack.mds_log().contains("cache mirror replayed to the devices"), "{}", stack.mds_log());
    // The new holder caches too, mirrored.
    assert_eq!(listed(&b)["cache"]["state"], "mirrored", "{}", b.proc.log());
}

/// Issue 15's "kill both": the cached holder (`sanvol-agent`) is killed
/// with SIGKILL while the 100 ms-per-write device lacks acknowledged
/// writes, then `sanvol-mds` is killed with SIGKILL too, before anyone
/// opened the volume — so before any replay (a replay runs at the next
/// open). The device file, read directly, still lacks those writes. The
/// server is started again: another agent's attach is answered only once
/// the restarted server replayed the mirror from its file, and the device
/// file then holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_holder_then_of_the_server_before_its_replay_the_restarted_server_replays_first() {
    let mut rig = MirrorRig::new();
    // The agent that attaches after the restart, authorized now (the
    // restarted server serves only resumes in its grace period).
    rig.stack.authorize_agent("agent-b");
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || a.proc.kill()).await;
    let first_log = rig.stack.mds_log();
    rig.stack.kill_mds();
    assert!(
        !first_log.contains("cache mirror replayed"),
        "the first server replayed before it was killed: the test proves nothing\n{first_log}"
    );
    assert!(
        check_device(&rig.volume_image(), &model, 4, &acked).is_err(),
        "every acknowledged write reached the 100 ms-per-write device with the holder and the server dead: the test \
         did not exercise the mirror"
    );

    rig.stack.start_mds();
    let b = rig.stack.restart_agent("agent-b");
    attach_when_connected(&b, &rig.stack).await;
    let mds_log = rig.stack.mds_log();
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("once the volume was opened again: {e}; mds log:\n{mds_log}");
    }
    let replayed: usize = replayed_records(&mds_log)
        .unwrap_or_else(|| panic!("the restarted server replayed no mirror before the open; mds log:\n{mds_log}"));
    assert!(replayed > 0, "the mirror held nothing: the test proves nothing; mds log:\n{mds_log}");
}

/// Writes for a replay longer than the control client's 30 s request
/// timeout: 4 KiB each, 64 KiB apart (the replay cannot join them); each
/// costs the 100 ms-per-write device 0.1 s, one at a time.
const LONG_REPLAY_WRITES: u64 = 400;
const LONG_REPLAY_STRIDE: u64 = 64 << 10;

fn long_replay_block(i: u64) -> Vec<u8> {
    vec![(i % 251) as u8 + 1; 4096]
}

/// The cached holder acknowledges the [`LONG_REPLAY_WRITES`] and is killed
/// with SIGKILL; returns how many of them the device file lacked then.
async fn kill_9_before_a_long_replay(rig: &MirrorRig) -> usize {
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");
    write_long_replay_blocks(&uri).await;
    a.proc.kill();
    let missing = long_replay_lost(|at| rig.device_bytes(at, 4096)).len();
    assert!(missing > 300, "only {missing} acknowledged writes were missing on the device: the replay is too short");
    missing
}

/// Writes the [`LONG_REPLAY_WRITES`] through the export at `uri`, 16 at a
/// time, and waits until every one is acknowledged.
async fn write_long_replay_blocks(uri: &NbdUri) {
    write_first_long_replay_blocks(uri, LONG_REPLAY_WRITES).await
}

/// [`write_long_replay_blocks`], the first `count` of them.
async fn write_first_long_replay_blocks(uri: &NbdUri, count: u64) {
    use futures::StreamExt;
    let client = Arc::new(NbdClient::connect(uri, ClientOptions::default()).await.unwrap());
    let writes = futures::stream::iter(0..count).map(|i| {
        let client = client.clone();
        async move { client.write(i * LONG_REPLAY_STRIDE, Bytes::from(long_replay_block(i)), false).await }
    });
    for result in writes.buffer_unordered(16).collect::<Vec<_>>().await {
        result.expect("a cached write is acknowledged");
    }
}

/// The long-replay writes that `read(offset)` does not return.
fn long_replay_lost(read: impl Fn(u64) -> Vec<u8>) -> Vec<u64> {
    first_long_replay_lost(LONG_REPLAY_WRITES, read)
}

/// [`long_replay_lost`] among the first `count` writes.
fn first_long_replay_lost(count: u64, read: impl Fn(u64) -> Vec<u8>) -> Vec<u64> {
    (0..count).filter(|&i| read(i * LONG_REPLAY_STRIDE) != long_replay_block(i)).collect()
}

/// A replay longer than the request timeout, then an attach: after
/// [`kill_9_before_a_long_replay`], another agent's attach must be
/// answered by one attempt once the replay is done — before, the agent
/// gave up on its `Open` at 30 s while the server opened the handle a
/// little later, and that orphaned handle refused the retries until it ran
/// out. The device file, read directly, then holds every acknowledged
/// write. The server's metrics show the replay while it runs and count it
/// once done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_waits_for_a_replay_longer_than_the_request_timeout() {
    use sanvol_tests::metrics::{metrics_addr, must, scrape};
    let rig = MirrorRig::build(1000, Some(500), |stack| {
        stack.mds_config_extra.push("metrics_addr = \"127.0.0.1:0\"".into());
    });
    let metrics = metrics_addr(rig.stack.mds.as_ref().unwrap());
    let (b, attach, _, missing) = attach_after_a_long_replay_kill(&rig).await;
    wait_for_the_replay_to_start(&rig.stack);
    let during = scrape(&metrics);
    assert_eq!(must(&during, "sanvol_mds_cache_replays_running", &[]), 1.0, "the replay is shown while it runs");
    assert_eq!(must(&during, "sanvol_mds_cache_replays_total", &[("result", "ok")]), 0.0);
    // `sanvol volume show` answers at once meanwhile (it used to wait for
    // the replay and fail after the request timeout), with what the
    // replay writes.
    let asked = std::time::Instant::now();
    let shown = rig.stack.sanvol_json(&["volume", "show", "db"]);
    let took = asked.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "volume show took {took:?} during the replay");
    assert_eq!(shown["cache"]["mirroring"], false, "{shown}");
    let held = shown["cache"]["held_records"].as_u64().unwrap_or_default();
    assert!(held as usize >= missing, "volume show during the replay: {held} records held, {missing} missing: {shown}");
    let text = rig.stack.sanvol_ok(&["volume", "show", "db"]);
    assert!(text.contains("the server is writing them there now"), "{text}");
    let (out, answered) = tokio::task::spawn_blocking(move || attach.join().unwrap()).await.unwrap();
    assert!(
        out.status.success(),
        "attach failed after {answered:?}: {}\nmds log:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        rig.stack.mds_log(),
        b.proc.log()
    );
    let mds_log = rig.stack.mds_log();
    assert!(
        answered > control_client::client::REQUEST_TIMEOUT,
        "the attach was answered in {answered:?}: the replay did not outlast the request timeout, the test proves \
         nothing\n{mds_log}"
    );
    let replayed = replayed_records(&mds_log).unwrap_or_else(|| panic!("no replay before the open:\n{mds_log}"));
    let lost = long_replay_lost(|at| rig.device_bytes(at, 4096));
    assert!(lost.is_empty(), "acknowledged writes missing on the device after the replay: {lost:?}\n{mds_log}");
    let after = scrape(&metrics);
    assert_eq!(must(&after, "sanvol_mds_cache_replays_running", &[]), 0.0);
    assert_eq!(must(&after, "sanvol_mds_cache_replays_total", &[("result", "ok")]), 1.0);
    assert_eq!(must(&after, "sanvol_mds_cache_replays_total", &[("result", "failed")]), 0.0);
    assert_eq!(must(&after, "sanvol_mds_cache_replay_seconds", &[]), 1.0, "the replay is timed");
    // The records are 4 KiB each, 64 KiB apart: written as they are.
    assert_eq!(must(&after, "sanvol_mds_cache_replayed_bytes_total", &[]), (replayed * 4096) as f64);
    println!("attach answered after {answered:?}; {replayed} records replayed, {missing} were missing at the kill");
}

/// `KEY:` of `/proc/PID/status`, in bytes.
fn proc_status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {status}"));
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a size in kB");
    kib << 10
}

/// A replay holds little of a large mirror in memory: it reads each
/// write's bytes from the mirror file as it sends it. A dead holder leaves
/// over 96 MiB of mirrored 256 KiB writes (the 100 ms-per-write device
/// destages slowly); the server's peak resident memory from just before
/// the kill to the end of the replay (`VmHWM`, reset through `clear_refs`)
/// must grow by less than half of what the mirror held — reading the whole
/// file first, as the replay did, grows it by all of it. The device file
/// then holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_a_large_mirror_holds_little_of_it_in_memory() {
    use futures::StreamExt;
    const WRITE: u64 = 256 << 10;
    const WRITES: u64 = 768;
    let rig = MirrorRig::build_sized(1000, Some(500), (640 << 20, "384M", "256M"), |_| {});
    rig.stack.authorize_agent("agent-b");
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let block = |i: u64| vec![(i % 251) as u8 + 1; WRITE as usize];
    let writes = futures::stream::iter(0..WRITES).map(|i| {
        let client = client.clone();
        async move { client.write(i * WRITE, Bytes::from(block(i)), false).await }
    });
    for result in writes.buffer_unordered(16).collect::<Vec<_>>().await {
        result.expect("a cached write is acknowledged");
    }
    let held = listed(&a)["cache"]["dirty_bytes"].as_u64().unwrap();
    assert!(held >= 96 << 20, "only {held} bytes were not on the device: the test proves nothing");
    let mds = rig.stack.mds.as_ref().unwrap().pid();
    std::fs::write(format!("/proc/{mds}/clear_refs"), "5").expect("reset the server's peak memory");
    let before = proc_status_bytes(mds, "VmRSS");
    a.proc.kill();
    drop(client);
    let _b = attach_after_replay(&rig.stack, "agent-b").await;
    let peak = proc_status_bytes(mds, "VmHWM");
    let mds_log = rig.stack.mds_log();
    let replayed = replayed_records(&mds_log).unwrap_or_else(|| panic!("no replay before the open:\n{mds_log}"));
    let grown = peak.saturating_sub(before);
    println!("the mirror held {held} bytes in {replayed} records; the server's peak memory grew by {grown} bytes");
    assert!(grown < held / 2, "the server's peak memory grew by {grown} bytes replaying {held}");
    let lost: Vec<u64> = (0..WRITES).filter(|&i| rig.device_bytes(i * WRITE, WRITE as usize) != block(i)).collect();
    assert!(lost.is_empty(), "acknowledged writes missing on the device after the replay: {lost:?}");
}

/// A replay longer than the request timeout, then `sanvol snapshot
/// create`: the server replays the dead holder's mirror before it commits
/// the snapshot, and the CLI must wait for it (before, it failed at 30 s
/// with "did not answer" while the server went on and made the snapshot).
/// The snapshot, read from the device file directly, holds every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_create_waits_for_a_replay_longer_than_the_request_timeout() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    kill_9_before_a_long_replay(&rig).await;
    let create = stack.sanvol_command(&["snapshot", "create", "db", "s1"]);
    let started = std::time::Instant::now();
    let created = tokio::task::spawn_blocking(move || {
        let mut create = create;
        create.output().expect("run sanvol")
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(
        created.status.success(),
        "snapshot create after {took:?}: {}\nmds log:\n{}",
        String::from_utf8_lossy(&created.stderr),
        stack.mds_log()
    );
    assert!(
        took > control_client::client::REQUEST_TIMEOUT,
        "answered in {took:?}: the replay did not outlast the request timeout, the test proves nothing"
    );
    let image = snapshot_image_of(&rig, LONG_REPLAY_WRITES * LONG_REPLAY_STRIDE);
    let lost = long_replay_lost(|at| image[at as usize..at as usize + 4096].to_vec());
    assert!(lost.is_empty(), "acknowledged writes missing in the snapshot: {lost:?}\n{}", stack.mds_log());
    println!("snapshot create answered after {took:?}");
}

/// Waits until `sanvol-mds` logged the start of a replay.
fn wait_for_the_replay_to_start(stack: &sanvol_tests::system::Stack) {
    sanvol_tests::system::poll("the replay to start", std::time::Duration::from_secs(60), || {
        stack.mds_log().contains("replaying the cache mirror to the devices").then_some(())
    });
}

/// Stops `sanvol-mds` (SIGSTOP) once it logged the start of a replay.
fn stop_the_server_in_its_replay(stack: &sanvol_tests::system::Stack) {
    wait_for_the_replay_to_start(stack);
    stack.mds.as_ref().unwrap().signal(libc::SIGSTOP);
}

/// A server that stops answering (SIGSTOP) while `sanvol snapshot create`
/// waits for its replay: the CLI does not wait for ever — it fails within
/// the request timeout after its last status request, saying that the
/// snapshot may or may not have been made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_create_fails_clearly_when_the_server_stops_answering_during_the_replay() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    kill_9_before_a_long_replay(&rig).await;
    let mut create = stack.sanvol_command(&["snapshot", "create", "db", "s1"]);
    create.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let create = create.spawn().expect("run sanvol");
    stop_the_server_in_its_replay(stack);
    let stopped = std::time::Instant::now();
    let bound = control_client::client::REQUEST_TIMEOUT + std::time::Duration::from_secs(10);
    let cli = create.id() as i32;
    let waited = tokio::time::timeout(bound, tokio::task::spawn_blocking(move || create.wait_with_output())).await;
    let took = stopped.elapsed();
    stack.mds.as_ref().unwrap().signal(libc::SIGCONT);
    let Ok(out) = waited else {
        // SAFETY: kill(2) on the CLI this test started.
        unsafe { libc::kill(cli, libc::SIGKILL) };
        panic!("the CLI still waited {took:?} after the server stopped");
    };
    let out = out.unwrap().expect("sanvol");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "snapshot create succeeded with the server stopped: {stderr}");
    assert!(stderr.contains("stopped answering") && stderr.contains("may or may not have been made"), "{stderr}");
    println!("snapshot create failed {took:?} after the server stopped: {stderr}");
}

/// An attach's last attempt: its output, how long it took.
type Attempt = (std::process::Output, std::time::Duration);

/// Attaches `db` on `b` in a thread until an attempt is not refused by the
/// dead holder's handle; with the start of the latest attempt.
fn attach_past_the_dead_holder(
    b: &Arc<sanvol_tests::system::Agent>,
) -> (std::thread::JoinHandle<Attempt>, Arc<std::sync::Mutex<std::time::Instant>>) {
    let latest = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
    let (b, started) = (b.clone(), latest.clone());
    let attach = std::thread::spawn(move || loop {
        let now = std::time::Instant::now();
        *started.lock().unwrap() = now;
        let out = b.cli(&["attach", "db", "--mode", "exclusive"]);
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("open exclusive by") {
            return (out, now.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    });
    (attach, latest)
}

/// The long-replay set-up: agent-b authorized, the cached holder killed
/// ([`kill_9_before_a_long_replay`]: how many writes the device lacked),
/// agent-b started, and its attach of `db` running in the background
/// ([`attach_past_the_dead_holder`]).
async fn attach_after_a_long_replay_kill(
    rig: &MirrorRig,
) -> (
    Arc<sanvol_tests::system::Agent>,
    std::thread::JoinHandle<Attempt>,
    Arc<std::sync::Mutex<std::time::Instant>>,
    usize,
) {
    rig.stack.authorize_agent("agent-b");
    let missing = kill_9_before_a_long_replay(rig).await;
    let b = Arc::new(rig.stack.restart_agent("agent-b"));
    let (attach, latest) = attach_past_the_dead_holder(&b);
    (b, attach, latest, missing)
}

/// The attach of `db` on `b`, retried while a holder refuses it (a closing
/// handle); panics after `limit`, with the refusals.
async fn attach_once_free(
    stack: &sanvol_tests::system::Stack,
    b: &sanvol_tests::system::Agent,
    limit: std::time::Duration,
) -> (NbdUri, Vec<String>) {
    let deadline = std::time::Instant::now() + limit;
    let mut refusals = Vec::new();
    loop {
        let out = b.cli(&["attach", "db", "--mode", "exclusive"]);
        if out.status.success() {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout.lines().find(|l| l.starts_with("nbd")).expect("attach prints the URI");
            return (line.trim().parse::<NbdUri>().expect("an NBD URI"), refusals);
        }
        refusals.push(String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default().to_string());
        assert!(std::time::Instant::now() < deadline, "no attach: {refusals:#?}\n{}", stack.all_logs(80));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A server that stops answering (SIGSTOP) while an agent's attach waits
/// for its replay: the attach fails once the request timeout passed and the
/// agent's lease ran out, saying why. Resumed (SIGCONT), the server either
/// fails that replay (its device writes timed out during the stop: what the
/// runs so far showed, logged as a warning) or finishes it and opens the
/// handle for the given-up attach, which the agent then closes at once
/// (that path, with a shorter stop:
/// `a_handle_opened_after_the_attach_gave_up_is_closed_by_the_agent`). Either way the
/// server opens no second handle for agent-b unless the agent closed the
/// first, the next attach gets the volume, and the device file holds every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_given_up_on_a_stopped_server_leaves_no_handle_behind() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    let (b, attach, _, _) = attach_after_a_long_replay_kill(&rig).await;
    stop_the_server_in_its_replay(stack);
    let (out, took) = tokio::task::spawn_blocking(move || attach.join().unwrap()).await.unwrap();
    stack.mds.as_ref().unwrap().signal(libc::SIGCONT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached with the server stopped");
    assert!(stderr.contains("did not answer the open of db") && stderr.contains("stopped renewing"), "{stderr}");
    assert!(took >= control_client::client::REQUEST_TIMEOUT, "gave up after {took:?}: {stderr}");

    // Resumed, the server either finishes the replay and opens the handle
    // for the given-up attach (the agent closes it at once), or fails that
    // open (its device requests timed out during the stop). Either way the
    // next attach gets the volume; a refusal that names a holder is retried
    // (the late handle's close may be on its way) but must not last.
    let (uri, refusals) = attach_once_free(stack, &b, std::time::Duration::from_secs(180)).await;
    let opened_for_b = stack.mds_log().lines().filter(|l| l.contains("volume opened") && l.contains("agent-b")).count();
    let closed_late = b.proc.log().contains("the open was answered after the attach gave up");
    assert!(
        opened_for_b == 1 || closed_late,
        "the server opened db for agent-b {opened_for_b} times and the agent closed no late handle:\n{}",
        stack.all_logs(80)
    );
    let replays: Vec<String> = stack.mds_log().lines().filter(|l| l.contains("replay")).map(String::from).collect();
    println!(
        "resumed: opened for agent-b {opened_for_b} time(s), late handle closed: {closed_late}; refusals before the \
         attach: {refusals:#?}; the server's replays: {replays:#?}"
    );
    let lost = long_replay_lost(|at| rig.device_bytes(at, 4096));
    assert!(lost.is_empty(), "acknowledged writes missing on the device after the replay: {lost:?}");
    let client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), long_replay_block(0), "read through the new holder");
    client.disconnect().await;
}

/// The late open, with real processes: the server is stopped (SIGSTOP)
/// only briefly, once the attach has waited past the request timeout and
/// before the replay ends. The agent's lease runs out, so the attach fails
/// ("stopped renewing"); resumed at once (SIGCONT), the server finishes the
/// replay and opens the handle the attach gave up on. The agent must close
/// that handle at once (its log says so), the next attach must get the
/// volume, and the device file must hold every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_opened_after_the_attach_gave_up_is_closed_by_the_agent() {
    // The stop must end before the server's own pool lease does (3 T after
    // its last renewal): a server resumed past it refuses to write, and the
    // replay fails instead of opening the late handle (seen in CI with
    // T = 1 s, where the stop lasted about 1.3 s here but longer on a loaded
    // machine). T = 3 s leaves the stop up to 6 s.
    let rig = MirrorRig::build(1000, Some(500), |stack| stack.lease_io_timeout_ms = 3000);
    let stack = &rig.stack;
    let (b, attach, latest, _) = attach_after_a_long_replay_kill(&rig).await;
    wait_for_the_replay_to_start(stack);
    // The replay takes LONG_REPLAY_WRITES × 0.1 s = 40 s; the open was sent
    // after the latest attempt started. Stop the server once the attach's
    // patience is over: from then on it gives up as soon as the lease runs
    // out, with about 8 s of the replay left.
    let patience_over = *latest.lock().unwrap() + control_client::client::REQUEST_TIMEOUT;
    tokio::time::sleep_until((patience_over + std::time::Duration::from_millis(1500)).into()).await;
    assert!(
        !stack.mds_log().contains("cache mirror replayed to the devices"),
        "the replay ended before the server was stopped: the test proves nothing"
    );
    let mds = stack.mds.as_ref().unwrap();
    mds.signal(libc::SIGSTOP);
    let stopped = std::time::Instant::now();
    let given_up = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::task::spawn_blocking(move || attach.join().unwrap()),
    )
    .await;
    let stopped_for = stopped.elapsed();
    mds.signal(libc::SIGCONT);
    let (out, took) = given_up.expect("the attach still waited 20 s after the server stopped").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached with the server stopped");
    assert!(stderr.contains("did not answer the open of db") && stderr.contains("stopped renewing"), "{stderr}");

    // The server finishes the replay and answers the given-up open; the
    // agent closes that handle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !b.proc.log().contains("the open was answered after the attach gave up") {
        let lost_lease = stack.mds_log().contains("does not hold the pool lease");
        assert!(
            !lost_lease && std::time::Instant::now() < deadline,
            "the agent closed no late handle (the server stopped for {stopped_for:?}; it lost its pool lease: \
             {lost_lease}):\n{}",
            stack.all_logs(150)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (uri, refusals) = attach_once_free(stack, &b, std::time::Duration::from_secs(30)).await;
    let mds_log = stack.mds_log();
    let opened_for_b = mds_log.lines().filter(|l| l.contains("volume opened") && l.contains("agent-b")).count();
    assert_eq!(opened_for_b, 2, "the late handle, then the new attach's:\n{mds_log}");
    let replays = mds_log.lines().filter(|l| l.contains("cache mirror replayed to the devices")).count();
    assert_eq!(replays, 1, "the one replay, finished after the stop:\n{mds_log}");
    let lost = long_replay_lost(|at| rig.device_bytes(at, 4096));
    assert!(lost.is_empty(), "acknowledged writes missing on the device after the replay: {lost:?}");
    let client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), long_replay_block(0), "read through the new holder");
    client.disconnect().await;
    println!(
        "attach gave up after {took:?} ({stopped_for:?} after the stop); late handle closed; refusals before the \
         next attach: {refusals:#?}"
    );
}

/// fio's random 64 KiB writes over the whole of `db` (64 MiB), crc32c
/// in every block, a fixed seed, each block written once: `--verify_only`
/// with the same arguments regenerates the same blocks. The verify state
/// (what was written) is saved in, and loaded from, the working directory.
fn fio_job(uri: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(peers::require_tool("fio"));
    cmd.current_dir(dir).args([
        "--name=fill",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        "--size=64M",
        "--verify=crc32c",
        "--randseed=1515",
    ]);
    cmd.args(extra);
    cmd
}

/// Every `offset=N` (or `offset N`) of the lines of `text` that contain
/// `what`.
fn offsets_in(text: &str, what: &str) -> std::collections::BTreeSet<u64> {
    text.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let rest = l.split("offset").nth(1)?;
            let digits: String =
                rest.trim_start_matches(['=', ' ']).chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        })
        .collect()
}

/// `fio --verify_only` of the fill job against `uri`: the blocks that
/// failed, and how many blocks were read.
fn fio_verify_only(uri: &str, dir: &Path) -> (std::collections::BTreeSet<u64>, u64, String) {
    let out = fio_job(uri, dir, &["--verify_only", "--verify_state_load=1", "--verify_fatal=0"]).output().unwrap();
    let text = output_text(&out);
    let bad = offsets_in(&text, "verify");
    let read = issued(&text, 0).unwrap_or_else(|| panic!("fio printed no issued reads:\n{text}"));
    (bad, read, text)
}

/// A finished process's stdout, then its stderr.
fn output_text(out: &std::process::Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// fio's `issued rwts: total=R,W,...`: field `index` (0 reads, 1 writes).
fn issued(text: &str, index: usize) -> Option<u64> {
    let line = text.lines().find(|l| l.contains("issued rwts: total="))?;
    line.split("total=").nth(1)?.split(',').nth(index)?.trim().parse().ok()
}

/// The volume `db` as the device file holds it, read by nbdkit (not by
/// sanvol): its extents must be contiguous on the device. The server and
/// its URI.
fn direct_view(rig: &MirrorRig) -> (Peer, String) {
    let volume_bytes = 64u64 << 20;
    let first = rig.extent_offsets[0];
    let contiguous = rig.extent_offsets.iter().enumerate().all(|(i, o)| *o == first + i as u64 * rig.extent_bytes);
    assert!(
        contiguous && rig.extent_offsets.len() as u64 * rig.extent_bytes >= volume_bytes,
        "{:?}",
        rig.extent_offsets
    );
    let image = rig.image.display().to_string();
    let direct = peers::nbdkit(&[
        "-r",
        "--filter=offset",
        "file",
        &image,
        &format!("offset={first}"),
        &format!("range={volume_bytes}"),
    ]);
    let uri = direct.uri().to_string();
    (direct, uri)
}

/// fio's arguments for the fill job run as the workload: each completed
/// write's offset goes to its completion-latency log (`acked_clat.1.log`),
/// what the agent acknowledged; the verify state is saved.
const FIO_WORKLOAD: [&str; 4] = ["--do_verify=0", "--verify_state_save=1", "--write_lat_log=acked", "--log_offset=1"];

/// Waits for the fio workload, which the holder's kill must have failed:
/// the offsets whose writes fio saw acknowledged, those that failed at the
/// kill, and fio's output.
fn acknowledged_until_the_kill(
    fio: std::process::Child,
    dir: &Path,
) -> (std::collections::BTreeSet<u64>, std::collections::BTreeSet<u64>, String) {
    let out = fio.wait_with_output().unwrap();
    let text = output_text(&out);
    assert!(!out.status.success(), "fio finished before the kill: the test proves nothing\n{text}");
    let failed = offsets_in(&text, "io_u error");
    let written = issued(&text, 1).unwrap_or_else(|| panic!("fio printed no issued writes:\n{text}"));
    let acked: std::collections::BTreeSet<u64> = std::fs::read_to_string(dir.join("acked_clat.1.log"))
        .unwrap_or_else(|e| panic!("fio's completion log: {e}\n{text}"))
        .lines()
        .filter_map(|l| l.split(',').nth(4)?.trim().parse().ok())
        .filter(|offset| !failed.contains(offset))
        .collect();
    assert!(!acked.is_empty() && written >= acked.len() as u64, "{} acknowledged\n{text}", acked.len());
    (acked, failed, text)
}

/// `fio --verify_only` through each `(what, uri)`: no block whose write
/// was acknowledged fails, and at least as many blocks were verified.
fn verify_acknowledged(
    views: &[(&str, String)],
    dir: &Path,
    acked: &std::collections::BTreeSet<u64>,
    failed: &std::collections::BTreeSet<u64>,
    fio_run: &str,
    server_log: &str,
) {
    for (what, uri) in views {
        let (bad, read, text) = fio_verify_only(uri, dir);
        let lost: Vec<_> = bad.intersection(acked).collect();
        assert!(
            lost.is_empty(),
            "after the replay, {what}: blocks at {lost:?} fail fio's verify, and their writes were acknowledged \
             (failed at the kill: {failed:?})\n{text}\nfio's writes:\n{fio_run}\nserver log:\n{server_log}"
        );
        assert!(
            read >= acked.len() as u64,
            "{what}: fio verified {read} blocks, {} were acknowledged\n{text}",
            acked.len()
        );
    }
}

/// Issue 15's first acceptance, with fio as the workload: fio's verify
/// writes through `sanvol-agent` fill the mirrored cache (the 100
/// ms-per-write device destages slowly; the 32 MiB log is full and the
/// writes wait for room) and the agent is killed with SIGKILL. Before
/// anyone opens the volume, `fio --verify_only` reading the device file
/// directly (nbdkit's `offset` filter over the volume's extents) finds
/// acknowledged blocks missing: they are in the log and the mirror only.
/// Another agent's attach is answered once the server replayed the
/// mirror; then fio's verify, on the device file directly and through the
/// new holder, fails on no block whose write fio saw acknowledged (its
/// completion log; the writes in flight at the kill may or may not have
/// landed, and `--verify_only` also reads a few blocks past the last write
/// fio issued, which were never written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_writes_fill_the_cache_kill_9_and_read_back_clean_after_the_replay() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    let (_direct, direct_uri) = direct_view(&rig);
    let fio_dir = tempfile::Builder::new().prefix("sanvol-cache-fio-").tempdir().unwrap();
    stack.authorize_agent("agent-b");

    let (mut a, uri) = attach_cached(stack, "agent-a");
    let fio = fio_job(&uri.to_string(), fio_dir.path(), &FIO_WORKLOAD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Full: the log holds all but the room of a few writes.
    let full = sanvol_tests::system::poll("the cache log to fill", std::time::Duration::from_secs(60), || {
        let cache = listed(&a)["cache"].clone();
        let (used, capacity) = (cache["log_used_bytes"].as_u64()?, cache["log_capacity_bytes"].as_u64()?);
        (used + (4 << 20) >= capacity).then_some(cache)
    });
    a.proc.kill();
    let killed_at = std::time::Instant::now();
    let (acked, failed, first_run) = acknowledged_until_the_kill(fio, fio_dir.path());
    let (bad, _, _) = fio_verify_only(&direct_uri, fio_dir.path());
    assert!(
        bad.intersection(&acked).count() > 0,
        "with the holder dead and nobody opened the volume, the device held every acknowledged block: the test did \
         not exercise the cache (cache at the kill: {full})"
    );

    let b = stack.restart_agent("agent-b");
    let b_uri = attach_when_connected(&b, stack).await;
    // How long the volume stayed closed (seen with --nocapture).
    let closed = killed_at.elapsed();
    verify_acknowledged(
        &[("the device file, read by nbdkit", direct_uri), ("the new holder", b_uri.to_string())],
        fio_dir.path(),
        &acked,
        &failed,
        &first_run,
        &stack.mds_log(),
    );
    let mds_log = stack.mds_log();
    let replayed = mds_log.lines().find(|l| l.contains("cache mirror replayed to the devices"));
    assert!(replayed.is_some(), "{mds_log}");
    println!(
        "{} writes acknowledged, {} failed at the kill; attached again {closed:?} after the kill: {}",
        acked.len(),
        failed.len(),
        replayed.unwrap_or_default()
    );
}

/// Issue 15's second acceptance, on the product path, then a holder kill
/// at the standby:
///
/// 1. fio's verify writes (64 KiB, the volume's upper half, paced to last)
///    go through `sanvol-agent`'s mirrored cache; `sanvol-mds` is killed
///    (SIGKILL) and a standby (with a mirror directory of its own) takes
///    the pool over. The agent goes write-through, destages and mirrors
///    afresh at the standby; fio, which stops at its first error, finishes
///    without one and its read-back verify is clean.
/// 2. Rounds of writes are mirrored at the standby and the agent is killed
///    (SIGKILL) while the device file lacks acknowledged ones: another
///    agent's attach is answered once the standby replayed them.
///
/// Then the device file, read directly, holds every acknowledged write of
/// both: the rounds (against the model) and fio's blocks (`fio
/// --verify_only` through nbdkit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_under_fio_mirroring_resumes_at_the_standby_which_replays_the_next_holder_kill() {
    use sanvol_tests::system::poll;
    let (mut rig, standby) = MirrorRig::with_standby();
    rig.stack.authorize_agent("agent-b");
    let (_direct, direct_uri) = direct_view(&rig);
    let fio_dir = tempfile::Builder::new().prefix("sanvol-cache-fio-").tempdir().unwrap();
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");

    // 1. Paced (40 writes a second, 512 in all): faster than the device
    // destages them, slow enough to go on through the takeover.
    let upper_half = ["--offset=32M", "--size=32M"];
    let mut fio = fio_job(&uri.to_string(), fio_dir.path(), &[&upper_half[..], &["--rate_iops=,40"]].concat())
        .stdout(std::fs::File::create(fio_dir.path().join("fio.out")).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cache = |a: &sanvol_tests::system::Agent| listed(a)["cache"].clone();
    let limit = std::time::Duration::from_secs(60);
    poll("writes mirrored at mds-1 that the device lacks", limit, || {
        let c = cache(&a);
        (c["state"] == "mirrored" && c["dirty_bytes"].as_u64()? >= 1 << 20).then_some(())
    });
    assert!(fio.try_wait().unwrap().is_none(), "fio ended before the server's kill: the test proves nothing");
    rig.stack.kill_mds();
    let why = poll("the cache to write through", limit, || {
        let c = cache(&a);
        (c["state"] == "write-through").then(|| c["state_detail"].to_string())
    });
    poll("mirroring at the standby", std::time::Duration::from_secs(120), || {
        (cache(&a)["state"] == "mirrored").then_some(())
    });
    let fio_run = fio.wait_with_output().unwrap();
    let fio_text = std::fs::read_to_string(fio_dir.path().join("fio.out")).unwrap_or_default() + &output_text(&fio_run);
    assert!(
        fio_run.status.success() && fio_text.contains("err= 0"),
        "fio failed while the server was down or after the standby took over:\n{fio_text}\n{}",
        a.proc.log()
    );

    // 2. The holder dies with writes mirrored only at the standby.
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || a.proc.kill()).await;
    let lacking = check_device(&rig.volume_image(), &model, 4, &acked);
    assert!(lacking.is_err(), "the device held every acknowledged round at the holder's kill: the test proves nothing");
    let b = rig.stack.restart_agent("agent-b");
    attach_when_connected(&b, &rig.stack).await;
    let standby_log = standby.proc.log();
    let replayed = replayed_records(&standby_log)
        .unwrap_or_else(|| panic!("the standby replayed no mirror before the attach:\n{standby_log}"));
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("after the standby's replay: {e}\nstandby log:\n{standby_log}");
    }
    let verify =
        fio_job(&direct_uri, fio_dir.path(), &[&upper_half[..], &["--verify_only"]].concat()).output().unwrap();
    let verify_text = output_text(&verify);
    assert!(
        verify.status.success() && !verify_text.contains("verify:") && issued(&verify_text, 0) == Some(512),
        "fio's blocks, read from the device file: {verify_text}"
    );
    println!(
        "write-through after the server's kill ({why}); {replayed} records replayed by the standby; fio's 512 blocks verified on the device file"
    );
}

/// A server that prepared a mirror generation and lost the pool before it
/// committed it keeps a file with that generation's number, which holds
/// none of the writes the server that did commit it mirrored (simulator
/// seed 260647906676046). That state is made here by copying `mds-1`'s
/// freshly prepared file into `mds-2`'s mirror directory. The holder is
/// killed (SIGKILL) with acknowledged writes the device lacks, then `mds-1`
/// too: `mds-2` takes over and must refuse the next open, naming `mds-1`,
/// rather than replay its own file and open the volume without them. Once
/// `mds-1` is back and handed the pool, it replays; the device file, read
/// directly, holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_the_recorded_generation_at_another_server_is_never_replayed() {
    let (mut rig, _standby) = MirrorRig::with_standby();
    rig.stack.authorize_agent("agent-b");
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");
    let mirrors = |n: u32| rig.stack.dir.path().join(format!("mirror-{n}"));
    let prepared: Vec<PathBuf> = std::fs::read_dir(mirrors(1))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().ends_with(".mirror"))
        .collect();
    let [prepared] = &prepared[..] else { panic!("one mirror file at mds-1: {prepared:?}") };
    std::fs::create_dir_all(mirrors(2)).unwrap();
    std::fs::copy(prepared, mirrors(2).join(prepared.file_name().unwrap())).unwrap();

    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || a.proc.kill()).await;
    let lacking = check_device(&rig.volume_image(), &model, 4, &acked);
    assert!(lacking.is_err(), "the device held every acknowledged round at the holder's kill: the test proves nothing");
    rig.stack.kill_mds();

    let b = rig.stack.restart_agent("agent-b");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let refusal = loop {
        let out = b.cli(&["attach", "db", "--mode", "exclusive"]);
        assert!(
            !out.status.success(),
            "db opened at mds-2 without the writes mirrored at mds-1 (device: {:?})\n{}",
            check_device(&rig.volume_image(), &model, 4, &acked),
            rig.stack.all_logs(200)
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if stderr.contains("prepared here for a commit that did not happen") {
            break stderr;
        }
        assert!(std::time::Instant::now() < deadline, "attach: {stderr}\n{}", rig.stack.all_logs(200));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(refusal.contains("by mds-1"), "the refusal names the server holding the mirror: {refusal}");
    assert!(refusal.contains("fetching the file from mds-1"), "and that it could not fetch it from there: {refusal}");
    assert!(check_device(&rig.volume_image(), &model, 4, &acked).is_err(), "nothing replayed the writes yet");

    rig.stack.mds_config_extra = vec!["cache_mirror_dir = \"mirror-1\"".into()];
    rig.stack.start_mds();
    handoff(&rig.stack, "mds-1").await;
    attach_when_connected(&b, &rig.stack).await;
    let log = rig.stack.mds_log();
    assert!(replayed_records(&log).is_some(), "mds-1 replayed no mirror before the attach:\n{log}");
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("after mds-1's replay: {e}\n{}", rig.stack.all_logs(200));
    }
}

/// Another agent attaches `db`: refused while the dead holder's handle
/// lives, answered once the server replayed the holder's cache mirror.
async fn attach_after_replay(stack: &sanvol_tests::system::Stack, name: &str) -> sanvol_tests::system::Agent {
    stack.authorize_agent(name);
    let agent = stack.restart_agent(name);
    attach_when_connected(&agent, stack).await;
    agent
}

/// Large writes go around a mirrored cache only where its mirror holds
/// nothing (issue 15, the 1 MiB row). Through `sanvol-agent`: small writes
/// (logged and mirrored; the 100 ms-per-write device keeps them dirty),
/// then a 1 MiB write over them — which must be logged, or the server's
/// replay of the small ones would land over it — then a 1 MiB write over a
/// fresh range (written around: on the device file when acknowledged),
/// then small writes over that one. The agent is killed with SIGKILL; once
/// the server replayed the mirror, the device file holds every write in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_go_around_a_mirrored_cache_only_where_the_mirror_holds_nothing() {
    const BIG: usize = 1 << 20;
    const LOGGED_AT: u64 = 4 << 20;
    const AROUND_AT: u64 = 6 << 20;
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    let (mut a, uri) = attach_cached(stack, "agent-a");
    let client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
    let mut model = vec![0u8; (AROUND_AT + BIG as u64 - LOGGED_AT) as usize];
    let mut write = |offset: u64, data: Vec<u8>| {
        let at = (offset - LOGGED_AT) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
        client.write(offset, Bytes::from(data), false)
    };
    for i in 0..8u64 {
        write(LOGGED_AT + i * (128 << 10) + 4096, vec![0x10 + i as u8; 8192]).await.unwrap();
    }
    write(LOGGED_AT, vec![0xb1; BIG]).await.unwrap();
    write(AROUND_AT, vec![0xb2; BIG]).await.unwrap();
    let on_device = rig.device_bytes(AROUND_AT, BIG);
    assert!(on_device.iter().all(|&b| b == 0xb2), "a write around the cache was acknowledged before the device had it");
    for i in 0..4u64 {
        write(AROUND_AT + i * (256 << 10), vec![0xc0 + i as u8; 4096]).await.unwrap();
    }
    let cache = &listed(&a)["cache"];
    assert_eq!(cache["state"], "mirrored", "{}", a.proc.log());
    assert_eq!(cache["written_around_bytes"], BIG as u64, "only the write over a fresh range goes around: {cache}");
    a.proc.kill();

    let _b = attach_after_replay(stack, "agent-b").await;
    let image = rig.device_bytes(LOGGED_AT, model.len());
    if let Some(at) = image.iter().zip(&model).position(|(got, want)| got != want) {
        panic!(
            "after the replay, volume byte {} is {:#04x}, the last acknowledged write there put {:#04x}; mds log:\n{}",
            LOGGED_AT + at as u64,
            image[at],
            model[at],
            stack.mds_log()
        );
    }
    assert!(stack.mds_log().contains("cache mirror replayed to the devices"), "{}", stack.mds_log());
}

/// `sanvol-agent list` shows the cache: mirrored, its log, the dirty bytes
/// right after a burst of writes to the slow device; a detach writes every
/// acknowledged write to the devices before it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sanvol_agent_list_shows_the_cache_and_a_detach_destages_it() {
    let rig = MirrorRig::new();
    let (a, uri) = attach_cached(&rig.stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (mut model, mut acks) = write_rounds(client.clone(), 2).await;
    for _ in 0..SLOTS {
        acks.recv().await.expect("round 2 is acknowledged");
    }
    for slot in 0..SLOTS {
        apply(&mut model, &round_write(2, slot));
    }
    // 72 writes at 100 ms each: most are still only in the cache.
    let entry = listed(&a);
    let cache = &entry["cache"];
    assert_eq!(cache["state"], "mirrored", "{entry}");
    // The volume's cache size, less the log's superblocks.
    let capacity = cache["log_capacity_bytes"].as_u64().unwrap();
    assert!(((31 << 20)..=(32 << 20)).contains(&capacity), "{entry}");
    assert!(cache["dirty_bytes"].as_u64().unwrap() > 0, "{entry}");
    assert!(cache["log_path"].as_str().unwrap().ends_with("db.cachelog"), "{entry}");
    let text = a.cli(&["list"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("cache mirrored:") && text.contains("dirty"), "{text}");
    // `sanvol volume show` too: the server's side (its mirror holds what
    // the holder has not destaged).
    let show = rig.stack.sanvol_json(&["volume", "show", "db"]);
    assert_eq!(show["cache"]["mirroring"], true, "{show}");
    assert!(show["cache"]["held_bytes"].as_u64().unwrap() > 0, "{show}");
    let text = rig.stack.sanvol_ok(&["volume", "show", "db"]);
    assert!(text.contains("cache: mirrored of 33554432 bytes; holder ") && text.contains("bytes held ("), "{text}");
    // And the holder's own view, which it reports to the server at once
    // and every two seconds: its state, log and destage rate.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let report = loop {
        let show = rig.stack.sanvol_json(&["volume", "show", "db"]);
        let report = show["cache"]["holder_report"].clone();
        if !report.is_null() {
            break report;
        }
        assert!(std::time::Instant::now() < deadline, "the holder never reported its cache: {show}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(report["report"]["state"], "mirrored", "{report}");
    assert_eq!(report["report"]["why"], "", "{report}");
    assert_eq!(report["report"]["log_capacity_bytes"].as_u64(), Some(capacity), "{report}");
    assert!(report["holder"].as_str().unwrap().contains("(handle "), "{report}");
    let text = rig.stack.sanvol_ok(&["volume", "show", "db"]);
    assert!(text.contains("cache at its holder: mirrored; ") && text.contains("destaging "), "{text}");

    drop(client);
    a.detach("db");
    let text = rig.stack.sanvol_ok(&["volume", "show", "db"]);
    assert!(text.contains("cache: mirrored of 33554432 bytes; no holder"), "{text}");
    assert!(!text.contains("cache at its holder"), "a report shown after the holder detached: {text}");
    let image = rig.volume_image();
    if let Some(at) = image.iter().zip(&model).position(|(a, b)| a != b) {
        panic!(
            "after the detach, device byte {at} is {:#04x}, the acknowledged write put {:#04x}",
            image[at], model[at]
        );
    }
}

/// A killed agent restarted with its state directory takes its handle back
/// (a resume: the server replays nothing) and replays its own cache log to
/// the devices before it serves the volume again; then mirrors afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_takes_its_handle_back_and_replays_its_own_cache_log() {
    // A lease long enough that the restart resumes the handle.
    let rig = MirrorRig::with_lease_ms(10_000, None);
    let stack = &rig.stack;
    let (mut a, uri) = attach_cached(stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || a.proc.kill()).await;
    assert!(check_device(&rig.volume_image(), &model, 4, &acked).is_err(), "the test did not exercise the cache");

    let a = stack.restart_agent("agent-a");
    // Served again only after the log was replayed (the attach opens the
    // cache before the export).
    let since = std::time::Instant::now();
    loop {
        if let Ok(c) = NbdClient::connect(&uri, ClientOptions::default()).await {
            c.disconnect().await;
            break;
        }
        assert!(since.elapsed() < std::time::Duration::from_secs(60), "not served again:\n{}", a.proc.log());
        // Polling a socket the restarted agent has not made yet.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = a.proc.log();
    assert!(log.contains("took back volume db"), "{log}");
    assert!(log.contains("cache log replayed to the devices"), "{log}");
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("after the restart: {e}; agent log:\n{log}");
    }
    assert!(!stack.mds_log().contains("cache mirror replayed to the devices"), "{}", stack.mds_log());
    assert_eq!(listed(&a)["cache"]["state"], "mirrored", "{log}");
}

/// The active server and the holder both die (SIGKILL, the server first)
/// while the server's mirror holds acknowledged writes the device lacks;
/// the standby, which has no copy of that mirror, takes the pool over. The
/// holder's own log is the other copy: restarted with its state, the agent
/// takes its handle back at the standby, writes its log to the devices
/// before it serves the volume, and mirrors afresh there. Then the device
/// file, read directly, holds every acknowledged write; the standby
/// replayed nothing; and after a clean detach another agent opens the
/// volume with no refusal naming the dead server's mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_killed_with_the_active_server_takes_its_handle_back_at_the_standby_and_replays_its_own_log() {
    let (mut rig, standby) = MirrorRig::with_standby_durable(None);
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || {
        rig.stack.kill_mds();
        a.proc.kill();
    })
    .await;
    let lacking = check_device(&rig.volume_image(), &model, 4, &acked);
    assert!(lacking.is_err(), "the device held every acknowledged round at the kills: the test proves nothing");

    let a = rig.stack.restart_agent("agent-a");
    let since = std::time::Instant::now();
    while listed_if(&a).is_none_or(|db| db["cache"]["state"] != "mirrored") {
        assert!(
            since.elapsed() < std::time::Duration::from_secs(90),
            "not mirrored at the standby:\n{}\n{}",
            a.proc.log(),
            standby.proc.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let log = a.proc.log();
    assert!(log.contains("took back volume db"), "{log}");
    assert!(log.contains("cache log replayed to the devices"), "{log}");
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("after the restarted holder replayed its log: {e}\nagent log:\n{log}");
    }
    let standby_log = standby.proc.log();
    assert!(!standby_log.contains("cache mirror replayed to the devices"), "{standby_log}");
    println!(
        "the restarted holder mirrored again at the standby {:.1} s after its restart",
        since.elapsed().as_secs_f64()
    );

    a.detach("db");
    let b = attach_after_replay(&rig.stack, "agent-b").await;
    assert!(listed(&b)["cache"]["state"] == "mirrored", "{}", b.proc.log());
    if let Err(e) = check_device(&rig.volume_image(), &model, 4, &acked) {
        panic!("after another agent opened the volume: {e}\n{}", rig.stack.all_logs(300));
    }
}

/// Mirroring restarts with what the holder's log holds (protocol 15): the
/// active server is killed (SIGKILL) while the mirror holds
/// [`LONG_REPLAY_WRITES`] unjoinable writes the 100 ms-per-write device
/// lacks (about 40 s of destaging). The holder goes write-through, then
/// mirrors again at the standby as soon as it takes over, with the records
/// its log still holds: the device file must still lack some of them at
/// that point (before, the holder destaged everything first). Then the
/// holder is killed too: the standby's replay must put every acknowledged
/// write on the device file, read directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_takeover_the_holder_mirrors_its_log_at_the_standby_at_once_and_the_standby_replays_it() {
    use sanvol_tests::system::poll;
    let (mut rig, standby) = MirrorRig::with_standby();
    rig.stack.authorize_agent("agent-b");
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");
    write_long_replay_blocks(&uri).await;
    rig.stack.kill_mds();
    let killed = std::time::Instant::now();
    let cache = |a: &sanvol_tests::system::Agent| listed(a)["cache"].clone();
    let limit = std::time::Duration::from_secs(60);
    poll("the cache to write through", limit, || (cache(&a)["state"] == "write-through").then_some(()));
    poll("mirroring at the standby", limit, || (cache(&a)["state"] == "mirrored").then_some(()));
    let mirrored_after = killed.elapsed();
    let lacking = long_replay_lost(|at| rig.device_bytes(at, 4096)).len();
    assert!(
        lacking > 0,
        "the device held every write when the holder mirrored again: it destaged everything first\n{}",
        a.proc.log()
    );
    let standby_log = standby.proc.log();
    assert!(standby_log.contains("cache mirror started with the holder's staged records"), "{standby_log}");

    a.proc.kill();
    let lacking_at_kill = long_replay_lost(|at| rig.device_bytes(at, 4096)).len();
    assert!(lacking_at_kill > 0, "the device held every write at the holder's kill: the test proves nothing");
    let b = rig.stack.restart_agent("agent-b");
    attach_when_connected(&b, &rig.stack).await;
    let standby_log = standby.proc.log();
    let replayed = replayed_records(&standby_log)
        .unwrap_or_else(|| panic!("the standby replayed no mirror before the attach:\n{standby_log}"));
    let lost = long_replay_lost(|at| rig.device_bytes(at, 4096));
    assert!(lost.is_empty(), "after the standby's replay the device file lacks writes {lost:?}\n{standby_log}");
    println!(
        "mirrored again at the standby {:.1} s after the server's kill, with {lacking} of {LONG_REPLAY_WRITES} writes \
         not yet on the device; {lacking_at_kill} lacking at the holder's kill; the standby replayed {replayed} records",
        mirrored_after.as_secs_f64()
    );
}

/// Writes every slot of `round` and waits for all the acknowledgements.
async fn write_round(client: &Arc<NbdClient>, model: &mut [u8], round: u64) {
    let writes = (0..SLOTS).map(|slot| {
        let client = client.clone();
        let write = round_write(round, slot);
        async move { client.write(write.0, Bytes::from(write.1), false).await }
    });
    for result in futures::future::join_all(writes).await {
        result.expect("a cached write is acknowledged");
    }
    for slot in 0..SLOTS {
        apply(model, &round_write(round, slot));
    }
}

/// Whether `chunk` is set in a snapshot's COW map as `volume show --json` prints it.
fn cow_has(cow: &serde_json::Value, chunk: u64) -> bool {
    let words = cow["words"].as_array().unwrap();
    words[(chunk / 64) as usize].as_u64().unwrap() & (1 << (chunk % 64)) != 0
}

/// The newest snapshot of `db` over the first slots, read from the device
/// file directly: a chunk registered in its COW map from the COW area, any
/// other from the live volume (what the snapshot's readers do).
fn snapshot_image(rig: &MirrorRig) -> Vec<u8> {
    snapshot_image_of(rig, SLOTS * SLOT_BYTES)
}

/// The first `len` bytes of the newest snapshot of `db`, read as
/// [`snapshot_image`] reads them.
fn snapshot_image_of(rig: &MirrorRig, len: u64) -> Vec<u8> {
    let show = rig.stack.sanvol_json(&["volume", "show", "db"]);
    let description = &show["description"];
    let snapshot = &description["snapshot"];
    let chunk_bytes = snapshot["chunk_bytes"].as_u64().expect("db has a snapshot");
    let extent_bytes = description["extent_bytes"].as_u64().unwrap();
    let file = std::fs::read(&rig.image).unwrap();
    let mut out = Vec::with_capacity(len as usize);
    for chunk in 0..len.div_ceil(chunk_bytes) {
        let at = chunk * chunk_bytes;
        let extents = if cow_has(&snapshot["cow"], chunk) { &snapshot["cow_extents"] } else { &description["extents"] };
        let leg = &extents[(at / extent_bytes) as usize]["legs"][0];
        let on_device = (leg["offset"].as_u64().unwrap() + at % extent_bytes) as usize;
        out.extend_from_slice(&file[on_device..on_device + chunk_bytes as usize]);
    }
    out
}

/// The first slots of snapshot `db@NAME` through the server's backup
/// pseudo-device (as `sanvol-backup` reads it).
async fn snapshot_through_the_pseudo_device(stack: &sanvol_tests::system::Stack, name: &str) -> Vec<u8> {
    use sanvol_tests::system::pub_path;
    use volume_format::control::auth::Role;
    let key = control_client::keys::load_private(&stack.admin_key).unwrap();
    let (pinned, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    let addr: control_client::ControlAddr = stack.mds_addr().parse().unwrap();
    let stream = control_client::channel::open_backup(&addr, &key, Some(&pinned), Role::Admin, "test").await.unwrap();
    let export = volume_format::control::messages::snapshot_export_name("db", name);
    let c = NbdClient::connect_stream(stream, &export, ClientOptions::default()).await.unwrap();
    let mut out = Vec::new();
    for at in (0..SLOTS * SLOT_BYTES).step_by(1 << 20) {
        let len = (SLOTS * SLOT_BYTES - at).min(1 << 20);
        out.extend_from_slice(&c.read(at, len as u32).await.expect("read the snapshot"));
    }
    c.disconnect().await;
    out
}

/// Where `got` first differs from `want`, as a message.
fn differs(what: &str, got: &[u8], want: &[u8]) -> Option<String> {
    let at = got.iter().zip(want).position(|(a, b)| a != b)?;
    Some(format!("{what}: byte {at} is {:#04x}, expected {:#04x}", got[at], want[at]))
}

/// Issue 15's recall point: `sanvol snapshot create` of a cached volume
/// while its cache holds acknowledged writes the 100 ms-per-write device
/// does not have yet, and while more writes are in flight. The snapshot,
/// read from the device file directly and through the backup
/// pseudo-device, holds every write acknowledged before the command
/// started, and each write in flight during it wholly or not at all.
/// Then new cached writes, and `kill -9` of the agent: the server's replay
/// of its mirror (before the next attach) puts them on the live volume and
/// leaves the snapshot as it was (the agent preserved the chunks before it
/// mirrored those writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_cached_volume_holds_every_acknowledged_write_and_a_replay_keeps_it() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    let (mut a, uri) = attach_cached(stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    // Rounds 0-3 acknowledged; round 4 in flight as the snapshot starts.
    let (before, mut acks) = write_rounds(client.clone(), 4).await;
    let dirty_bytes = listed(&a)["cache"]["dirty_bytes"].as_u64().unwrap();
    assert!(dirty_bytes > 0, "the cache held nothing at the snapshot: the test would not exercise its destage");
    let create = stack.sanvol_command(&["snapshot", "create", "db", "s1"]);
    let created = tokio::task::spawn_blocking(move || {
        let mut create = create;
        create.output().expect("run sanvol")
    })
    .await
    .unwrap();
    assert!(
        created.status.success(),
        "snapshot create: {}\nmds log:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&created.stderr),
        stack.mds_log(),
        a.proc.log()
    );
    for _ in 0..SLOTS {
        acks.recv().await.expect("round 4 is acknowledged");
    }
    let mut model = before.clone();
    for slot in 0..SLOTS {
        apply(&mut model, &round_write(4, slot));
    }

    let snapshot = snapshot_image(&rig);
    // Outside round 4's writes: the state before; each of round 4's writes
    // wholly in or wholly out.
    let mut expected = before.clone();
    for slot in 0..SLOTS {
        let (offset, data) = round_write(4, slot);
        let range = offset as usize..offset as usize + data.len();
        if snapshot[range.clone()] == data[..] {
            expected[range].copy_from_slice(&data);
        }
    }
    if let Some(e) = differs("the snapshot, read from the device file", &snapshot, &expected) {
        panic!("{e} (an acknowledged write is missing or torn)\nagent log:\n{}", a.proc.log());
    }
    let through_pseudo_device = snapshot_through_the_pseudo_device(stack, "s1").await;
    if let Some(e) = differs("the snapshot through the pseudo-device", &through_pseudo_device, &snapshot) {
        panic!("{e}");
    }

    // After the snapshot: cached writes, then kill -9 with them only in
    // the cache (and the server's mirror).
    write_round(&client, &mut model, 5).await;
    a.proc.kill();
    drop(client);
    assert!(
        rig.volume_image() != model,
        "every acknowledged write reached the 100 ms-per-write device before the kill: the test did not exercise \
         the mirror"
    );
    stack.authorize_agent("agent-b");
    let b = stack.restart_agent("agent-b");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = b.cli(&["attach", "db", "--mode", "exclusive"]);
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(std::time::Instant::now() < deadline, "attach on agent-b: {stderr}\nmds log:\n{}", stack.mds_log());
        // The refusal names when the old handle runs out; retry soon.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(stack.mds_log().contains("cache mirror replayed to the devices"), "{}", stack.mds_log());
    if let Some(e) = differs("after the replay, the live volume", &rig.volume_image(), &model) {
        panic!("{e}\nmds log:\n{}", stack.mds_log());
    }
    if let Some(e) = differs("after the replay, the snapshot", &snapshot_image(&rig), &snapshot) {
        panic!("{e} (the replay wrote over a chunk the snapshot needed)\nmds log:\n{}", stack.mds_log());
    }
    let through_pseudo_device = snapshot_through_the_pseudo_device(stack, "s1").await;
    if let Some(e) =
        differs("after the replay, the snapshot through the pseudo-device", &through_pseudo_device, &snapshot)
    {
        panic!("{e}");
    }
}

/// A holder that dies with a dirty cache never destages for the recall: the
/// snapshot taken right after `kill -9` (committed once the dead holder's
/// lease excluded it) must still hold every write it acknowledged — the
/// server replays its mirror before it commits the snapshot. The snapshot
/// is read from the device file directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_after_kill_9_of_the_cached_holder_holds_what_its_mirror_held() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    let (mut a, uri) = attach_cached(stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let (model, acked) = kill_in_the_fifth_round(client, || a.proc.kill()).await;
    assert!(
        check_device(&rig.volume_image(), &model, 4, &acked).is_err(),
        "every acknowledged write reached the 100 ms-per-write device before the kill: the test did not exercise \
         the mirror"
    );
    let create = stack.sanvol_command(&["snapshot", "create", "db", "s1"]);
    let created = tokio::task::spawn_blocking(move || {
        let mut create = create;
        create.output().expect("run sanvol")
    })
    .await
    .unwrap();
    assert!(
        created.status.success(),
        "snapshot create: {}\nmds log:\n{}",
        String::from_utf8_lossy(&created.stderr),
        stack.mds_log()
    );
    if let Err(e) = check_device(&snapshot_image(&rig), &model, 4, &acked) {
        panic!("the snapshot, read from the device file: {e}\nmds log:\n{}", stack.mds_log());
    }
    assert!(stack.mds_log().contains("cache mirror replayed to the devices"), "{}", stack.mds_log());
}

/// A recall that reaches the agent while the attach of a cached volume is
/// being completed: the export already serves through the cache
/// (`agent-attach-serving:sleep=6000` holds the attach there, as a slow
/// owner loop would), writes are acknowledged into the cache, and `sanvol
/// snapshot create` recalls the holder. The snapshot, read from the device
/// file directly, holds every write acknowledged before the command — the
/// owner knew of the cache before the export served, so the recall destaged
/// it (without that, it drained only the device I/O in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_while_a_cached_attach_completes_holds_every_acknowledged_write() {
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    stack.authorize_agent("agent-a");
    let a = stack.restart_agent_env("agent-a", &[], &[("SANVOL_FAULT", "agent-attach-serving:sleep=6000")]);
    let mut attach = Command::new(sanvol_tests::system::bin("sanvol-agent"));
    attach.args(["attach", "db", "--mode", "exclusive", "--control-socket"]).arg(&a.socket);
    let attach = tokio::task::spawn_blocking(move || attach.output().expect("run sanvol-agent attach"));
    let socket = a.export_dir.join("db.sock");
    sanvol_tests::system::poll("the export's socket", std::time::Duration::from_secs(30), || {
        socket.exists().then_some(())
    });
    let uri: NbdUri = format!("nbd+unix:///db?socket={}", socket.display()).parse().unwrap();
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    let mut model = rig.volume_image();
    // More records than one destage round takes (records logged while a
    // round is on its way to the 100 ms device wait for the next): a recall
    // that only drains the device I/O in flight misses some.
    for round in 0..5 {
        write_round(&client, &mut model, round).await;
    }
    assert!(rig.volume_image() != model, "every write reached the device at once: the cache held nothing");
    assert!(!attach.is_finished(), "the attach finished before the snapshot: the test missed its window");
    let create = stack.sanvol_command(&["snapshot", "create", "db", "s1"]);
    let created = tokio::task::spawn_blocking(move || {
        let mut create = create;
        create.output().expect("run sanvol")
    })
    .await
    .unwrap();
    assert!(created.status.success(), "snapshot create: {}", String::from_utf8_lossy(&created.stderr));
    let attached = attach.await.unwrap();
    assert!(attached.status.success(), "attach: {}\n{}", String::from_utf8_lossy(&attached.stderr), a.proc.log());
    if let Some(e) = differs("the snapshot, read from the device file", &snapshot_image(&rig), &model) {
        panic!("{e} (a write acknowledged into the cache is missing)\nagent log:\n{}", a.proc.log());
    }
    drop(client);
}

/// `sanvol mds handoff --to TO` through every server, once `to` stands by
/// (a server that just handed the pool off is listed as standing by again
/// within a lease I/O timeout; until then the handoff is refused, naming
/// the servers).
async fn handoff(stack: &sanvol_tests::system::Stack, to: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = stack.sanvol_at(&stack.all_mds_addrs(), &["mds", "handoff", "--to", to]);
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("is standing by") && std::time::Instant::now() < deadline,
            "handoff to {to}: {stderr}\n{}",
            stack.all_logs(200)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `sanvol-agent attach db` on `agent`, retried while the agent reconnects
/// after a handoff (or while a refusal names when an old handle ends);
/// the export's URI.
async fn attach_when_connected(agent: &sanvol_tests::system::Agent, stack: &sanvol_tests::system::Stack) -> NbdUri {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = agent.cli(&["attach", "db", "--mode", "exclusive"]);
        if out.status.success() {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout.lines().find(|l| l.starts_with("nbd")).expect("attach prints the URI");
            return line.trim().parse().expect("an NBD URI");
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(std::time::Instant::now() < deadline, "attach: {stderr}\n{}", stack.all_logs(300));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Waits until `agent`'s cache of `db` is mirrored (again).
async fn mirrored_again(agent: &sanvol_tests::system::Agent, stack: &sanvol_tests::system::Stack) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while listed(agent)["cache"]["state"] != "mirrored" {
        assert!(std::time::Instant::now() < deadline, "not mirrored again:\n{}", stack.all_logs(200));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The volume image (the slots) read from the device file equals `model`.
fn device_is(rig: &MirrorRig, model: &[u8], when: &str) {
    let image = rig.volume_image();
    if let Some(at) = image.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{when}: device byte {at} is {:#04x}, the acknowledged write put {:#04x}\n{}",
            image[at],
            model[at],
            rig.stack.all_logs(300)
        );
    }
}

/// Mirrors follow the pool across metadata servers (metadata format 11),
/// with two `sanvol-mds` of one pool, each with its own mirror directory,
/// and the pool handed between them (`sanvol mds handoff`).
///
/// 1. Round 1 is mirrored at mds-1; the pool moves to mds-2 while mds-1's
///    file still holds it (the 100 ms-per-write device lags): the agent
///    destages and mirrors afresh at mds-2. Round 2 overwrites round 1;
///    a clean detach. The pool moves back to mds-1 and the volume is
///    attached again: mds-1 must not replay its stale file (round 1 over
///    round 2) — the device file, read directly, holds round 2.
/// 2. Round 3 is mirrored at mds-1, the agent is killed (kill -9) and the
///    pool moves to mds-2, which lacks that mirror (protocol 16): another
///    agent's attach goes through once mds-2 fetched mds-1's file (mds-1
///    stands by) and replayed it, and the device file holds every
///    acknowledged write. (With mds-1 gone the attach is refused, naming
///    it: `a_file_of_the_recorded_generation_at_another_server_is_never_replayed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_follow_the_pool_across_servers_a_stale_one_is_never_replayed_a_missing_one_is_fetched() {
    let (rig, mds2) = MirrorRig::with_standby();
    let stack = &rig.stack;
    let model_len = (SLOTS * SLOT_BYTES) as usize;
    let mut model = vec![0u8; model_len];

    // The agent that attaches once the first one is killed (part 2),
    // started while the server that authorized it is active.
    stack.authorize_agent("agent-b");
    let b = stack.restart_agent("agent-b");

    // 1. A stale mirror on a formerly active server.
    let (a, uri) = attach_cached(stack, "agent-a");
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    write_round(&client, &mut model, 1).await;
    assert!(rig.volume_image() != model, "round 1 reached the device before the handoff: the test proves nothing");
    handoff(stack, "mds-2").await;
    mirrored_again(&a, stack).await;
    write_round(&client, &mut model, 2).await;
    drop(client);
    a.detach("db");
    device_is(&rig, &model, "after a clean detach");
    handoff(stack, "mds-1").await;
    let uri = attach_when_connected(&a, stack).await;
    device_is(&rig, &model, "after mds-1, active again, opened the volume (its stale mirror holds round 1)");

    // 2. The newest mirror on a server that is not active.
    mirrored_again(&a, stack).await;
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());
    write_round(&client, &mut model, 3).await;
    assert!(rig.volume_image() != model, "round 3 reached the device before the kill: the test proves nothing");
    let mut a = a;
    a.proc.kill();
    drop(client);
    // `sanvol volume show` says where the replay will read from.
    let recorded = |stack: &sanvol_tests::system::Stack| {
        stack.sanvol_json(&["volume", "show", "db"])["cache"]["mirror_recorded"].clone()
    };
    let at_mds1 = recorded(stack);
    assert_eq!((at_mds1["server"].as_str(), at_mds1["pending"].as_bool()), (Some("mds-1"), Some(true)), "{at_mds1}");
    let shown = stack.sanvol_ok(&["volume", "show", "db"]);
    let generation = at_mds1["generation"].as_u64().unwrap();
    assert!(
        shown.contains(&format!("cache mirror: generation {generation} at mds-1; may hold acknowledged writes")),
        "{shown}"
    );
    handoff(stack, "mds-2").await;
    attach_when_connected(&b, stack).await;
    device_is(&rig, &model, "after mds-2 replayed round 3's mirror, fetched from mds-1");
    let at_mds2 = recorded(stack);
    assert_eq!(at_mds2["server"].as_str(), Some("mds-2"), "agent-b mirrors at mds-2 now: {at_mds2}");
    assert!(at_mds2["generation"].as_u64().unwrap() > generation, "{at_mds2}");
    // mds-2 said so when it took the pool, and then fetched the file; mds-1
    // handed it out.
    let log = mds2.proc.log();
    assert!(
        log.lines().any(|l| l.contains("a cached volume's mirror may hold writes") && l.contains("server=mds-1")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("fetched the cache mirror recorded at another server") && l.contains("mds-1")),
        "{log}"
    );
    assert!(replayed_records(&log).is_some_and(|n| n > 0), "mds-2 replayed no records:\n{log}");
    // Its metrics count the one fetch, and the bytes it copied.
    {
        use sanvol_tests::metrics::{metrics_addr, must, scrape};
        let scraped = scrape(&metrics_addr(&mds2.proc));
        assert_eq!(must(&scraped, "sanvol_mds_cache_mirror_fetches_total", &[("result", "ok")]), 1.0);
        assert_eq!(must(&scraped, "sanvol_mds_cache_mirror_fetches_total", &[("result", "failed")]), 0.0);
        assert!(must(&scraped, "sanvol_mds_cache_mirror_fetched_bytes_total", &[]) > 0.0);
    }
    let log = stack.mds_log();
    assert!(log.contains("handing this server's cache mirror to the active server"), "{log}");
    drop(mds2);
}

/// The cache's clean blocks, as a user meets them (issue 15: "a clean-block
/// read cache where it pays off"): through `sanvol-agent`, a re-read is
/// answered from memory (the listing counts it), a cached write is read
/// back before and after its destage, and after the destage the device
/// file (read directly) and the re-read agree on the new bytes — a kept
/// block is never older than the devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_reads_come_from_memory_and_never_read_older_than_the_devices() {
    const AT: u64 = 8 << 20;
    const LEN: usize = 64 << 10;
    let rig = MirrorRig::new();
    let stack = &rig.stack;
    let (a, uri) = attach_cached(stack, "agent-a");
    let client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
    let mut model = vec![0u8; LEN];
    for _ in 0..2 {
        assert_eq!(client.read(AT, LEN as u32).await.unwrap(), model);
    }
    let cache = &listed(&a)["cache"];
    assert!(cache["read_hits"].as_u64().unwrap() >= 1, "the re-read came from the devices: {cache}");
    assert!(cache["read_cache_bytes"].as_u64().unwrap() >= LEN as u64, "{cache}");

    model[..4096].fill(0x5a);
    model[8192..8192 + 100].fill(0x5b);
    client.write(AT, Bytes::from(model[..4096].to_vec()), false).await.unwrap();
    client.write(AT + 8192, Bytes::from(model[8192..8192 + 100].to_vec()), false).await.unwrap();
    assert_eq!(client.read(AT, LEN as u32).await.unwrap(), model, "before the destage");
    // The device takes 100 ms per write: wait for the agent to report the
    // cache clean (its own account; the device file is checked next).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while listed(&a)["cache"]["dirty_bytes"].as_u64().unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "not destaged in 60 s: {}", a.proc.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if let Some(e) = differs("the device file after the destage", &rig.device_bytes(AT, LEN), &model) {
        panic!("{e}");
    }
    for _ in 0..2 {
        if let Some(e) = differs("a re-read after the destage", &client.read(AT, LEN as u32).await.unwrap(), &model) {
            panic!("{e}");
        }
    }
}

/// Acknowledged writes the 100 ms-per-write device takes 15 s to destage.
const PREPARE_KILL_WRITES: u64 = 150;

/// kill -9 of `sanvol-mds` between preparing a new mirror generation's
/// file and committing it, then of the holder: nothing acknowledged is
/// lost and nobody has to give the mirror up. The holder mirrors
/// generation 1 and acknowledges writes the device lacks; the server is
/// killed and started again with `SANVOL_FAULT=mds-after-mirror-prepare`;
/// the agent stages its log at it and starts generation 2, and the server
/// kills itself once generation 2's file holds the staged records — before
/// the record of generation 2 is committed. The agent is killed too. The
/// server is started again: another agent's attach is answered once the
/// server replayed generation 2's file (the record still names generation
/// 1 at this server; before, such a server either had no file of the
/// recorded generation or one of another, and refused the volume until an
/// operator ran `--forget-mirror`). The device file, read directly, then
/// holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_between_preparing_a_mirror_generation_and_committing_it_loses_no_acknowledged_write() {
    let mut rig = MirrorRig::new();
    rig.stack.authorize_agent("agent-b");
    let (mut a, uri) = attach_cached(&rig.stack, "agent-a");
    write_first_long_replay_blocks(&uri, PREPARE_KILL_WRITES).await;
    let lost = |rig: &MirrorRig| first_long_replay_lost(PREPARE_KILL_WRITES, |at| rig.device_bytes(at, 4096));

    rig.stack.kill_mds();
    rig.stack.mds_env.push(("SANVOL_FAULT".into(), "mds-after-mirror-prepare".into()));
    rig.stack.start_mds();
    let status = rig.stack.mds.as_mut().unwrap().wait_exit_within(std::time::Duration::from_secs(60));
    let killed_log = rig.stack.mds_log();
    assert!(
        killed_log.contains("SANVOL_FAULT: reached mds-after-mirror-prepare"),
        "{status:?}\n{}",
        rig.stack.all_logs(200)
    );
    assert!(killed_log.contains("prepared with the holder's staged records"), "{killed_log}");
    a.proc.kill();
    let missing = lost(&rig).len();
    assert!(
        missing > 0,
        "every acknowledged write reached the device before the kills: the test did not exercise the mirror"
    );

    rig.stack.mds_env.clear();
    rig.stack.start_mds();
    let b = rig.stack.restart_agent("agent-b");
    attach_when_connected(&b, &rig.stack).await;
    let mds_log = rig.stack.mds_log();
    let lost = lost(&rig);
    assert!(lost.is_empty(), "{} acknowledged writes lost: {lost:?}\n{}", lost.len(), rig.stack.all_logs(200));
    let replayed = replayed_records(&mds_log).unwrap_or_else(|| panic!("no replay before the open:\n{mds_log}"));
    assert!(replayed >= missing, "replayed {replayed} records, {missing} were missing on the device");
}

/// Large writes go around the mirrored cache's log — spliced from the
/// export's socket to the device's, as on a volume without a cache — and
/// small ones are logged, over the same blocks: fio's random 4 KiB-1 MiB
/// writes with crc32c through `sanvol-agent`, verified by fio through the
/// agent (large reads passed on in pipes where nothing cached lies under
/// them), then, after a detach, on the device file directly (nbdkit, not
/// sanvol): every block reads back as fio wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_around_the_log_and_small_ones_logged_read_back_clean_on_the_device() {
    use sanvol_tests::metrics::{metrics_addr, scrape, value};
    let rig = MirrorRig::new();
    let (_direct, direct_uri) = direct_view(&rig);
    let agent = rig.stack.start_agent_with("agent-a", &["--metrics-addr".into(), "127.0.0.1:0".into()]);
    let uri = agent.attach("db", "exclusive").to_string();
    let fio = |uri: &str, extra: &[&str]| {
        let mut cmd = Command::new(peers::require_tool("fio"));
        cmd.args([
            "--name=mix",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-1m",
            "--iodepth=8",
            "--size=16M",
            "--verify=crc32c",
            "--randseed=2024",
            "--verify_state_save=0",
        ]);
        let out = cmd.args(extra).output().unwrap();
        (out.status.success(), output_text(&out))
    };
    let (ok, text) = fio(&uri, &[]);
    assert!(ok && text.contains("err= 0"), "fio's writes and verify through the agent:\n{text}\n{}", agent.proc.log());

    let cache = listed(&agent)["cache"].clone();
    assert_eq!(cache["state"], "mirrored", "{cache}");
    let around = cache["written_around_bytes"].as_u64().unwrap();
    assert!(around >= 1 << 20, "no large write went around the log: {cache}");
    let logged = cache["destaged_bytes"].as_u64().unwrap() + cache["dirty_bytes"].as_u64().unwrap();
    assert!(logged > 0, "no small write was logged: {cache}");
    let metrics = scrape(&metrics_addr(&agent.proc));
    let spliced = value(&metrics, "sanvol_agent_write_bytes_spliced_total", &[("volume", "db")]).unwrap_or(0.0);
    // Those within one extent of the volume came in pipes (one that spans
    // two is split, from memory, as on a volume without a cache).
    assert!(
        spliced >= around as f64 / 2.0,
        "{around} bytes went around the log, only {spliced} of the writes came in pipes"
    );

    agent.detach("db");
    let (ok, text) = fio(&direct_uri, &["--verify_only"]);
    assert!(ok && text.contains("err= 0"), "fio's verify of the device file, read by nbdkit:\n{text}");
}
