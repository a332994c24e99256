//! `sanvol-target` as a real process (issue 14, real fencing): clients
//! connect with capabilities in the export name, a fence order raises a
//! holder's minimum generation, and the target acknowledges it only after
//! the older connections are closed — even one whose client is stopped
//! with writes queued. The device file is read back directly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, ExportCredential, NbdClient};
use blockio::uri::NbdUri;
use blockio::{BlockDevice, IoErrorKind};
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use sanvol_tests::peers::{nbdkit, require_tool};
use sanvol_tests::system::{bin, poll, Proc};
use uuid::Uuid;
use volume_format::capability::{
    announces_fencing, Capability, FenceAck, FenceOrder, Holder, SignedCapability, SignedFenceOrder, FENCE_ACK_BYTES,
    TARGET_DESCRIPTION_PREFIX,
};
use volume_format::label::{ByteRange, DeviceLabel, DeviceLayout};
use volume_format::{DeviceIndex, HandleId};

const DEVICE_BYTES: u64 = 64 << 20;
const MIB: u64 = 1 << 20;
const DEVICE_UUID: Uuid = Uuid::from_u128(0x51);

/// A running `sanvol-target` over a sparse file, trusting one server key.
struct Target {
    dir: tempfile::TempDir,
    proc: Proc,
    key: SigningKey,
}

impl Target {
    fn start(key: SigningKey) -> Target {
        let dir = tempfile::Builder::new().prefix("sanvol-target-").tempdir().unwrap();
        write_label(&dir.path().join("disk.img"));
        let proc = Target::spawn(dir.path(), &key, 1);
        Target { dir, proc, key }
    }

    fn spawn(dir: &Path, key: &SigningKey, run: u32) -> Proc {
        let socket = dir.join("nbd.sock");
        let public: String = key.verifying_key().to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let mut cmd = Command::new(bin("sanvol-target"));
        cmd.arg("--device")
            .arg(dir.join("disk.img"))
            .arg("--unix")
            .arg(&socket)
            .arg("--server-key")
            .arg(public)
            .arg("--state-dir")
            .arg(dir.join("state"));
        Proc::spawn_until_listening("sanvol-target", cmd, dir.join(format!("target-{run}.log")), &socket)
    }

    /// SIGKILL and start again on the same file and state.
    fn restart(&mut self) {
        self.proc.kill();
        self.proc = Target::spawn(self.dir.path(), &self.key, 2);
    }

    fn uri(&self, export: String) -> NbdUri {
        NbdUri::unix(self.dir.path().join("nbd.sock"), export)
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("disk.img")).unwrap()
    }

    fn capability(&self, handle: u64, generation: u64, writable: Vec<ByteRange>) -> SignedCapability {
        capability_signed_by(&self.key, handle, generation, writable)
    }

    async fn connect(&self, capability: &SignedCapability) -> Result<NbdClient, String> {
        let uri = self.uri(capability.export_name(""));
        NbdClient::connect(&uri, options()).await.map_err(|e| e.to_string())
    }

    /// Sends a fence order and waits for its acknowledgement.
    async fn fence(&self, handle: u64, min_generation: u64) -> FenceAck {
        let order = FenceOrder {
            holder: Holder::Handle(HandleId(handle)),
            min_generation,
            device_uuid: None,
            issued_unix_secs: now_unix_secs(),
        };
        let name = SignedFenceOrder::sign(order, &self.key).export_name("");
        let client = NbdClient::connect(&self.uri(name), options()).await.expect("the target takes the order");
        let block = client.read(0, FENCE_ACK_BYTES).await.expect("the acknowledgement");
        FenceAck::decode(&block).expect("an acknowledgement block")
    }
}

fn options() -> ClientOptions {
    ClientOptions { request_timeout: Some(Duration::from_secs(60)), ..ClientOptions::default() }
}

fn now_unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn capability_signed_by(key: &SigningKey, handle: u64, generation: u64, writable: Vec<ByteRange>) -> SignedCapability {
    let now = now_unix_secs();
    let capability = Capability {
        holder: Holder::Handle(HandleId(handle)),
        generation,
        device_uuid: Some(DEVICE_UUID),
        writable,
        issued_unix_secs: now,
        expires_unix_secs: now + 3600,
    };
    SignedCapability::sign(capability, key)
}

/// A sanvol label on the device, so capabilities can name it.
fn write_label(image: &Path) {
    let layout = DeviceLayout::plan(DEVICE_BYTES, MIB, 4 * MIB).unwrap();
    let label = DeviceLabel {
        pool_uuid: Uuid::from_u128(0x50),
        device_uuid: DEVICE_UUID,
        device_index: DeviceIndex(0),
        layout,
        created_at_unix_secs: now_unix_secs(),
    };
    std::fs::write(image, label.encode()).unwrap();
    std::fs::File::options().write(true).open(image).unwrap().set_len(DEVICE_BYTES).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_holder_cannot_write_and_the_next_one_can() {
    let mut target = Target::start(SigningKey::from_bytes(&[9; 32]));
    let range = vec![ByteRange::new(MIB, 2 * MIB)];

    // A plain connection learns that the device fences, and nothing else.
    let probe = NbdClient::connect(&target.uri(String::new()), options()).await.unwrap();
    let description = probe.info().description.clone().unwrap_or_default();
    assert!(announces_fencing(&description), "{description:?}");
    let e = probe.read(0, 4096).await.expect_err("refused");
    assert_eq!(e.kind, IoErrorKind::PermissionDenied, "{e}");

    // The first holder writes inside its range; outside it is refused.
    let first = target.connect(&target.capability(7, 1, range.clone())).await.unwrap();
    first.write(MIB, Bytes::from(vec![0xaa; 4096]), true).await.unwrap();
    let e = first.write(3 * MIB, Bytes::from(vec![0xee; 4096]), true).await.expect_err("refused");
    assert_eq!(e.kind, IoErrorKind::PermissionDenied, "{e}");

    // Fenced: acknowledged with its connection closed.
    let ack = target.fence(7, 2).await;
    assert_eq!((ack.holder, ack.min_generation, ack.connections_closed), (Holder::Handle(HandleId(7)), 2, 1));
    assert!(first.write(MIB, Bytes::from(vec![0xcc; 4096]), true).await.is_err());
    let e = target.connect(&target.capability(7, 1, range.clone())).await.err().expect("refused");
    assert!(e.contains("fenced") && e.contains("generation 1"), "{e}");

    // The next holder (a newer generation) writes.
    let second = target.connect(&target.capability(7, 2, range.clone())).await.unwrap();
    second.write(MIB + 4096, Bytes::from(vec![0xbb; 4096]), true).await.unwrap();
    drop((first, second, probe));
    let file = target.file();
    assert!(file[MIB as usize..][..4096].iter().all(|&b| b == 0xaa), "written before the fence");
    assert!(file[(MIB + 4096) as usize..][..4096].iter().all(|&b| b == 0xbb));
    assert!(file[(3 * MIB) as usize..][..4096].iter().all(|&b| b == 0), "nothing outside the range");

    // A restart keeps the raised generation.
    target.restart();
    let e = target.connect(&target.capability(7, 1, range.clone())).await.err().expect("refused");
    assert!(e.contains("fenced"), "{e}");
    target.connect(&target.capability(7, 2, range.clone())).await.unwrap();

    // Forged, foreign and expired capabilities are refused, saying why.
    let mut forged = target.capability(8, 1, range.clone());
    forged.capability.writable = vec![ByteRange::new(0, DEVICE_BYTES)];
    let e = target.connect(&forged).await.err().expect("refused");
    assert!(e.contains("forged"), "{e}");
    let foreign = capability_signed_by(&SigningKey::from_bytes(&[3; 32]), 8, 1, range.clone());
    let e = target.connect(&foreign).await.err().expect("refused");
    assert!(e.contains("does not trust"), "{e}");
    let now = now_unix_secs();
    let expired = Capability {
        holder: Holder::Handle(HandleId(8)),
        generation: 1,
        device_uuid: Some(DEVICE_UUID),
        writable: range.clone(),
        issued_unix_secs: now - 7200,
        expires_unix_secs: now - 3600,
    };
    let e = target.connect(&SignedCapability::sign(expired, &target.key)).await.err().expect("refused");
    assert!(e.contains("expired"), "{e}");
    let elsewhere = Capability {
        holder: Holder::Handle(HandleId(8)),
        generation: 1,
        device_uuid: Some(Uuid::from_u128(5)),
        writable: range,
        issued_unix_secs: now,
        expires_unix_secs: now + 60,
    };
    let e = target.connect(&SignedCapability::sign(elsewhere, &target.key)).await.err().expect("refused");
    assert!(e.contains("device"), "{e}");
}

/// A client with a credential presents it to the target (which announces
/// that it fences) and not to a plain nbdkit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_is_presented_only_to_servers_that_ask_for_it() {
    let target = Target::start(SigningKey::from_bytes(&[9; 32]));
    let capability = target.capability(12, 1, vec![ByteRange::new(MIB, 2 * MIB)]);
    let presented = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = presented.clone();
    let credential = ExportCredential {
        description_prefix: TARGET_DESCRIPTION_PREFIX.to_string(),
        export_name: std::sync::Arc::new(move |base: &str| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            capability.export_name(base)
        }),
    };
    let opts = ClientOptions { credential: Some(credential), ..options() };
    let client = NbdClient::connect(&target.uri(String::new()), opts.clone()).await.unwrap();
    client.write(MIB, Bytes::from(vec![0x5a; 4096]), true).await.unwrap();
    assert_eq!(presented.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(target.file()[MIB as usize..][..4096].iter().all(|&b| b == 0x5a));

    let plain = nbdkit(&["memory", "1M"]);
    let client = NbdClient::connect(&plain.uri(), opts).await.unwrap();
    client.write(0, Bytes::from(vec![1; 4096]), true).await.unwrap();
    assert_eq!(presented.load(std::sync::atomic::Ordering::SeqCst), 1, "nbdkit does not ask");
}

/// `nbdcopy` writing through a capability, stopped (SIGSTOP) mid-copy with
/// requests queued: the fence is acknowledged while it is stopped, and when
/// it continues none of its writes land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_writer_is_cut_off_before_the_fence_is_acknowledged() {
    let target = Target::start(SigningKey::from_bytes(&[9; 32]));
    // A slow source, so the copy is still running when it is stopped.
    let source = nbdkit(&["--filter=delay", "pattern", "size=48M", "rdelay=200ms"]);
    let capability = target.capability(11, 1, vec![ByteRange::new(0, DEVICE_BYTES)]);
    let destination = target.uri(capability.export_name(""));
    let mut copy = Command::new(require_tool("nbdcopy"));
    copy.arg("--connections=1").arg("--requests=8").arg(source.uri().to_string()).arg(destination.to_string());
    let log = target.dir.path().join("nbdcopy.log");
    let mut copy = Proc::spawn("nbdcopy", copy, log);

    // Wait until the copy has written something, then stop it.
    let image = target.dir.path().join("disk.img");
    wait_until(Duration::from_secs(60), || copy_started(&image), || copy.log());
    unsafe { libc::kill(copy.pid() as i32, libc::SIGSTOP) };
    let _continue_on_exit = Continue(copy.pid());

    let ack = target.fence(11, 2).await;
    assert_eq!(ack.connections_closed, 1, "the stopped writer's connection");
    let fenced = target.file();

    unsafe { libc::kill(copy.pid() as i32, libc::SIGCONT) };
    let status = copy.wait_exit_within(Duration::from_secs(60));
    assert!(!status.success(), "the copy must fail once fenced; log:\n{}", copy.log());
    assert!(fenced == target.file(), "a write landed after the fence was acknowledged");
    assert!(fenced[(40 * MIB) as usize..].iter().all(|&b| b == 0), "the copy was cut off, not finished");
}

/// Continues a stopped process if the test fails before it does.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// The label's block is overwritten too; the second block tells.
fn copy_started(image: &PathBuf) -> bool {
    std::fs::read(image).is_ok_and(|data| data[4096..8192].iter().any(|&b| b != 0))
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "not done within {limit:?}; log:\n{}", log());
        // Watching another process's effect on a file: nothing to await.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pool on `sanvol-target` devices: `pool init` (with the server's
/// signing key) and `sanvol-mds` reach them through the server's
/// capability; a connection without one reads nothing. `sanvol device
/// list` shows which devices fence: the targets, and not a plain nbdkit
/// added to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_sanvol_targets_is_initialised_and_served() {
    let mut stack = sanvol_tests::system::Stack::new_target_devices(2, 256 * MIB);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "64M", "--mirror", "2"]);
    let plain = nbdkit(&["memory", "256M"]);
    stack.sanvol_ok(&["device", "add", &plain.uri().to_string()]);
    // Learned when the server's device task reports after its next work
    // (the add's own commit): poll the listing, nothing to await.
    let fenced = poll("every device's fencing known", Duration::from_secs(30), || {
        let devices = stack.sanvol_json(&["device", "list"]);
        let fenced: Vec<serde_json::Value> = devices.as_array()?.iter().map(|d| d["fenced"].clone()).collect();
        fenced.iter().all(|f| !f.is_null()).then_some(fenced)
    });
    assert_eq!(fenced, [true, true, false], "dev0 and dev1 are sanvol-target, dev2 is nbdkit");
    let table = stack.sanvol_ok(&["device", "list"]);
    assert!(table.lines().next().is_some_and(|header| header.contains("FENCED")), "{table}");
    let dev2 = table.lines().find(|l| l.starts_with("dev2")).unwrap_or_else(|| panic!("{table}"));
    assert!(dev2.split_whitespace().any(|w| w == "no"), "{table}");
    let devices = stack.sanvol_json(&["device", "list"]);
    assert_eq!(devices.as_array().map(|d| d.len()), Some(3), "{devices}");
    for device in &stack.devices {
        let image = std::fs::read(device.dir().join("disk.img")).unwrap();
        assert_eq!(&image[..8], b"SANVOLDV", "labelled through the capability");
        let plain = NbdClient::connect(&device.uri(), options()).await.unwrap();
        let e = plain.read(0, 4096).await.unwrap_err();
        assert_eq!(e.kind, IoErrorKind::PermissionDenied, "{e}");
    }
    assert!(!stack.mds_log().contains("capability refused"), "{}", stack.mds_log());

    // Recorded in the pool metadata (format 10): dev2 with its `device
    // add`, the targets once the server learned it from its connections
    // (the pool came from `pool init` without the record). A restarted
    // server lists dev2 as plain though it cannot reach it any more.
    poll("the targets' fencing recorded", Duration::from_secs(30), || {
        stack.mds_log().contains("recorded in the pool metadata whether devices fence").then_some(())
    });
    stack.kill_mds();
    drop(plain);
    stack.start_mds();
    let devices = stack.sanvol_json(&["device", "list"]);
    let dev2 = devices.as_array().and_then(|d| d.iter().find(|d| d["index"] == 2)).cloned();
    let dev2 = dev2.unwrap_or_else(|| panic!("{devices}"));
    assert_eq!((dev2["reachable"].clone(), dev2["fenced"].clone()), (false.into(), false.into()), "{devices}");
    let fenced: Vec<serde_json::Value> = devices.as_array().unwrap().iter().map(|d| d["fenced"].clone()).collect();
    assert_eq!(fenced, [true, true, false], "{devices}");
}

/// The metadata server's fence of a broken handle across a pool's devices:
/// the target is fenced (its holder's connection closed), plain nbdkit and
/// an unreachable device are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_fences_a_handle_on_every_device_that_fences() {
    let target = Target::start(SigningKey::from_bytes(&[9; 32]));
    let old = target.connect(&target.capability(21, 1, vec![ByteRange::new(MIB, 2 * MIB)])).await.unwrap();
    let plain = nbdkit(&["memory", "1M"]);
    let gone = NbdUri::unix(target.dir.path().join("nobody.sock"), "");
    let uris = [target.uri(String::new()).to_string(), plain.uri().to_string(), gone.to_string()];
    let holder = Holder::Handle(HandleId(21));
    let fenced = metadata_server::targets::fence_everywhere(&uris, &target.key, holder).await.unwrap();
    assert_eq!(fenced, vec![uris[0].clone()]);
    assert!(old.write(MIB, Bytes::from(vec![1; 4096]), true).await.is_err(), "its connection is closed");
    let e = target
        .connect(&target.capability(21, 1_000, vec![ByteRange::new(MIB, 2 * MIB)]))
        .await
        .err()
        .expect("fenced for good");
    assert!(e.contains("fenced"), "{e}");
}

/// A protocol-level agent on the control channel (the test itself): opens
/// and never renews.
async fn raw_agent(stack: &sanvol_tests::system::Stack, name: &str) -> control_client::ControlClient {
    use sanvol_tests::system::{pub_path, run_ok};
    let path = stack.dir.path().join(format!("{name}.key"));
    run_ok(Command::new(bin("sanvol")).arg("keygen").arg(&path));
    stack.sanvol_ok(&["client", "add", pub_path(&path).to_str().unwrap(), "--role", "agent", "--name", name]);
    let key = control_client::keys::load_private(&path).unwrap();
    let addr: control_client::ControlAddr = stack.mds_addr().parse().unwrap();
    let (server_key, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    let role = volume_format::control::auth::Role::Agent;
    let (client, mut events) =
        control_client::ControlClient::connect(&addr, &key, Some(&server_key), role, name, [name.len() as u8; 16])
            .await
            .unwrap();
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    client
}

/// The metadata server breaking a handle on a pool of `sanvol-target`
/// devices: before the next holder's open is answered, the broken handle's
/// connection to the device (held here under a capability for that handle,
/// as an agent would hold it) is closed, its writes fail, and its
/// capability is refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_fences_a_broken_handle_on_target_devices_before_the_next_open() {
    use volume_format::control::messages::{OpenMode, Request, Response};
    let mut stack = sanvol_tests::system::Stack::new_target_devices(1, 256 * MIB);
    stack.lease_ms = 2000;
    stack.durable_ms = Some(2000);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let a = raw_agent(&stack, "raw-a").await;
    let Ok(Response::Opened(held)) = a.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await
    else {
        panic!("the first open")
    };

    // The old holder's device connection, under its handle's capability
    // (signed with the server's key, bound to the device's label).
    let device = &stack.devices[0];
    let image = device.dir().join("disk.img");
    let (label, capability) = handle_capability_on(&stack, 0, held.handle);
    let old = NbdClient::connect(&device.uri().with_export(capability.export_name("")), options()).await.unwrap();
    let at = label.layout.data.start;
    old.write(at, Bytes::from(vec![0xaa; 4096]), true).await.expect("the holder writes");

    // It stops renewing; another agent opens once lease + durable ran out.
    let b = raw_agent(&stack, "raw-b").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match b.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await {
            Ok(Response::Opened(_)) => break,
            other => assert!(Instant::now() < deadline, "never opened: {other:?}\n{}", stack.mds_log()),
        }
        // Retrying an open that is refused until a deadline: nothing to await.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stack.mds_log().contains("handle fenced on its fencing devices"), "{}", stack.mds_log());
    let e = old.write(at, Bytes::from(vec![0xcc; 4096]), true).await.expect_err("fenced");
    assert_ne!(e.kind, IoErrorKind::Fenced, "refused by the device, not by a local deadline: {e}");
    let e = NbdClient::connect(&device.uri().with_export(capability.export_name("")), options())
        .await
        .err()
        .expect("its capability is refused")
        .to_string();
    assert!(e.contains("fenced"), "{e}");
    let data = std::fs::read(&image).unwrap();
    assert!(data[at as usize..][..4096].iter().all(|&b| b == 0xaa), "only what it wrote before");
    drop(a);
}

/// Device `index`'s label (read from its image) and a capability for
/// `handle` on it, over its whole data area, signed with the server's key:
/// what an agent holding that handle presents.
fn handle_capability_on(
    stack: &sanvol_tests::system::Stack,
    index: usize,
    handle: HandleId,
) -> (DeviceLabel, SignedCapability) {
    let image = stack.devices[index].dir().join("disk.img");
    let label = DeviceLabel::decode(&std::fs::read(&image).unwrap()[..4096]).unwrap();
    let key = control_client::keys::load_private(&stack.mds_key).unwrap();
    let now = now_unix_secs();
    let capability = SignedCapability::sign(
        Capability {
            holder: Holder::Handle(handle),
            generation: metadata_server::targets::HANDLE_GENERATION,
            device_uuid: Some(label.device_uuid),
            writable: vec![ByteRange::new(label.layout.data.start, label.layout.data.end)],
            issued_unix_secs: now,
            expires_unix_secs: now + 3600,
        },
        &key,
    );
    (label, capability)
}

fn attached(agent: &sanvol_tests::system::Agent, volume: &str) -> Option<serde_json::Value> {
    let out = agent.cli(&["list", "--json"]);
    assert!(out.status.success(), "list: {}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list --json");
    list.as_array()?.iter().find(|v| v["volume"] == volume).cloned()
}

/// Where block 0 of `volume` lives: the image file of its device (read
/// directly, not through any NBD server) and the offset in it.
fn first_block_in_image(stack: &sanvol_tests::system::Stack, volume: &str) -> (PathBuf, u64) {
    let detail = stack.sanvol_json(&["volume", "show", volume]);
    let leg = &detail["description"]["extents"][0]["legs"][0];
    let device = leg["device"].as_u64().unwrap() as usize;
    (stack.devices[device].dir().join("disk.img"), leg["offset"].as_u64().unwrap())
}

fn image_block(image: &Path, offset: u64) -> Vec<u8> {
    std::fs::read(image).unwrap()[offset as usize..][..4096].to_vec()
}

/// A log without its ANSI colour sequences.
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn fill_of(block: &[u8]) -> Option<u8> {
    block.iter().all(|b| *b == block[0]).then(|| block[0])
}

/// The acceptance test of issue 14 with real processes: agents write to a
/// pool of `sanvol-target` devices over per-handle connections under their
/// handles' capabilities. Host-a is stopped (SIGSTOP) while it holds the
/// volume and has a connection to the device open; host-b's open breaks
/// host-a's handle once its lease and durable time ran out, after the
/// server fenced it at the target (which closes host-a's connection);
/// host-b writes. When host-a goes on, a write queued on its export fails,
/// with a clear error, and the device image — read directly — holds host-b's
/// data: nothing of host-a landed after the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_write_under_handle_capabilities_and_a_fenced_holder_writes_nothing_more() {
    let mut stack = sanvol_tests::system::Stack::new_target_devices(1, 256 * MIB);
    stack.lease_ms = 1000;
    stack.durable_ms = Some(1000);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let a = stack.start_agent("host-a");
    let uri_a = a.attach("v", "exclusive");
    let b = stack.start_agent("host-b");
    let handle_a = attached(&a, "v").unwrap()["handle"].as_u64().unwrap();
    let ca = NbdClient::connect(&uri_a, ClientOptions::default()).await.unwrap();
    ca.write(0, Bytes::from(vec![0xaa; 4096]), true)
        .await
        .unwrap_or_else(|e| panic!("host-a writes to a sanvol-target device: {e}\n{}", a.proc.log()));
    let (image, offset) = first_block_in_image(&stack, "v");
    assert_eq!(fill_of(&image_block(&image, offset)), Some(0xaa), "host-a's write is on the device");
    assert!(a.proc.log().contains("capabilities received"), "{}", a.proc.log());

    // host-a stops with its per-handle connection open; host-b takes over.
    let a_pid = a.proc.pid() as i32;
    // SAFETY: signals to a child process this test started.
    unsafe { libc::kill(a_pid, libc::SIGSTOP) };
    poll("host-b's open to break host-a's handle", Duration::from_secs(30), || {
        b.cli(&["attach", "v", "--mode", "exclusive"]).status.success().then_some(())
    });
    let fenced = format!("holder=handle {}", HandleId(handle_a));
    let target_log = without_colours(&stack.devices[0].stderr());
    let line = target_log
        .lines()
        .find(|l| l.contains("fenced: closing older connections") && l.contains(&fenced))
        .unwrap_or_else(|| panic!("the target fenced {fenced}:\n{target_log}"));
    assert!(
        line.contains("connections=") && !line.contains("connections=0"),
        "host-a's open connections were closed by the fence: {line}"
    );
    let uri_b: NbdUri = attached(&b, "v").unwrap()["export_uri"].as_str().unwrap().parse().unwrap();
    let cb = NbdClient::connect(&uri_b, ClientOptions::default()).await.unwrap();
    cb.write(0, Bytes::from(vec![0xbb; 4096]), true).await.expect("host-b writes");
    cb.disconnect().await;
    assert_eq!(fill_of(&image_block(&image, offset)), Some(0xbb));

    // host-a goes on with a write queued on its export.
    let late = {
        let ca = ca.clone();
        tokio::spawn(async move { ca.write(0, Bytes::from(vec![0xa2; 4096]), true).await })
    };
    // SAFETY: as above.
    unsafe { libc::kill(a_pid, libc::SIGCONT) };
    let result = tokio::time::timeout(Duration::from_secs(30), late).await.expect("the late write is answered");
    let e = result.unwrap().expect_err("host-a's write after the fence must fail");
    assert!(e.to_string().contains("broken"), "{e}");
    ca.write(4096, Bytes::from(vec![0xa3; 4096]), true).await.expect_err("and so do later ones");
    assert_eq!(
        fill_of(&image_block(&image, offset)),
        Some(0xbb),
        "host-a wrote after the fence\nhost-a:\n{}",
        a.proc.log()
    );
    assert_ne!(fill_of(&image_block(&image, offset + 4096)), Some(0xa3), "host-a wrote after the fence");
}

/// The agent's data path against a real target, without the lease checks
/// in front of it: a leg of handle 77 writes under that handle's
/// capability; a leg of handle 78 on the same device (no capability) does
/// not borrow handle 77's connection; once the server fenced handle 77, its
/// next request fails as fenced — a refusal, not a path error, so nothing
/// is re-sent through the server — every later one fails at once, and
/// nothing more lands (the image is read back directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_leg_of_a_fenced_handle_fails_its_requests_and_writes_nothing() {
    use client_agent::credentials::HandleCredentials;
    use client_agent::devices::{DevicePool, PoolOptions};
    use volume_format::description::DeviceEndpoint;

    let target = Target::start(SigningKey::from_bytes(&[5; 32]));
    let endpoint = DeviceEndpoint {
        index: DeviceIndex(0),
        device_uuid: DEVICE_UUID,
        uri: target.uri(String::new()).to_string(),
        online: true,
        resyncing: false,
    };
    let pool = DevicePool::new(PoolOptions::default());
    let capability =
        target.capability(77, metadata_server::targets::HANDLE_GENERATION, vec![ByteRange::new(MIB, 2 * MIB)]);
    let creds = HandleCredentials::with_capabilities(HandleId(77), 1, [(0, capability)]);
    let (leg, _) = pool.layout_device(&endpoint, Uuid::from_u128(0x50), 1, Some(creds.clone()), 1).unwrap();
    leg.write(MIB, Bytes::from(vec![1; 4096]), true).await.expect("handle 77 writes under its capability");
    assert_eq!(&target.file()[MIB as usize..][..4096], &[1; 4096][..]);

    let stranger = HandleCredentials::with_capabilities(HandleId(78), 1, []);
    let (other, _) = pool.layout_device(&endpoint, Uuid::from_u128(0x50), 2, Some(stranger), 1).unwrap();
    let e = other.write(MIB, Bytes::from(vec![8; 4096]), true).await.expect_err("no capability, no write");
    assert!(e.message.contains("handle 78") && e.message.contains("capability"), "{e}");

    let holder = Holder::Handle(HandleId(77));
    metadata_server::targets::fence(&target.uri(String::new()), &target.key, holder, metadata_server::targets::BROKEN)
        .await
        .unwrap();
    let e = leg.write(MIB, Bytes::from(vec![2; 4096]), true).await.expect_err("fenced");
    assert_eq!(e.kind, IoErrorKind::PermissionDenied, "{e}");
    assert!(e.message.contains("fenced") && e.message.contains("reopen the volume"), "{e}");
    assert!(creds.fenced().is_some());
    let e = leg.read(MIB, 4096).await.expect_err("every later request fails at once");
    assert_eq!(e.kind, IoErrorKind::PermissionDenied, "{e}");
    assert_eq!(&target.file()[MIB as usize..][..4096], &[1; 4096][..], "nothing landed after the fence");

    // A request the target refuses with EPERM (here a write outside the
    // capability, which a layout's own legs never send) ends the handle
    // too: nothing of it is tried again on any path.
    let capability =
        target.capability(79, metadata_server::targets::HANDLE_GENERATION, vec![ByteRange::new(MIB, 2 * MIB)]);
    let creds = HandleCredentials::with_capabilities(HandleId(79), 1, [(0, capability)]);
    let (leg, _) = pool.layout_device(&endpoint, Uuid::from_u128(0x50), 3, Some(creds.clone()), 1).unwrap();
    let e = leg.write(3 * MIB, Bytes::from(vec![3; 4096]), true).await.expect_err("outside its capability");
    assert_eq!(e.kind, IoErrorKind::PermissionDenied, "{e}");
    assert!(e.message.contains("handle 79 was fenced"), "{e}");
    leg.write(MIB, Bytes::from(vec![3; 4096]), true).await.expect_err("and nothing after");
    assert_eq!(&target.file()[MIB as usize..][..4096], &[1; 4096][..]);
}

/// Whether any 4 KiB block of the image file (read directly) is all `byte`.
fn image_has_block_of(image: &Path, byte: u8) -> bool {
    use std::io::Read;
    let mut file = std::fs::File::open(image).unwrap();
    let mut chunk = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut chunk).unwrap();
        if n == 0 {
            return false;
        }
        if chunk[..n].chunks(4096).any(|b| b.len() == 4096 && b.iter().all(|&x| x == byte)) {
            return true;
        }
    }
}

/// Issue 14, fencing at a recall: host-a holds the volume on a
/// `sanvol-target` device, writing over its per-handle connection, and is
/// stopped (SIGSTOP). An admin grow recalls the layout; host-a does not
/// confirm, so the grow commits without it — but only after the server
/// fenced host-a's handle at the target (its connection closed, its
/// capability refused from then on: checked before host-a goes on). When
/// host-a continues with a write queued on its export, the write fails and
/// the device image, read directly, holds no byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_excluded_from_a_recall_is_fenced_before_the_change_commits() {
    let mut stack = sanvol_tests::system::Stack::new_target_devices(1, 256 * MIB);
    stack.lease_ms = 1000;
    // Long enough that host-a is excluded by the recall, not released at
    // expiry (which fences too): the fence seen is the recall's.
    stack.durable_ms = Some(120_000);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let a = stack.start_agent("host-a");
    let uri_a = a.attach("v", "exclusive");
    let handle_a = HandleId(attached(&a, "v").unwrap()["handle"].as_u64().unwrap());
    let ca = NbdClient::connect(&uri_a, ClientOptions::default()).await.unwrap();
    ca.write(0, Bytes::from(vec![0xaa; 4096]), true)
        .await
        .unwrap_or_else(|e| panic!("host-a writes to a sanvol-target device: {e}\n{}", a.proc.log()));
    let (image, offset) = first_block_in_image(&stack, "v");
    assert_eq!(fill_of(&image_block(&image, offset)), Some(0xaa), "host-a's write is on the device");

    // host-a stops with its per-handle connection open; the grow excludes it.
    let a_pid = a.proc.pid() as i32;
    // SAFETY: signals to a child process this test started.
    unsafe { libc::kill(a_pid, libc::SIGSTOP) };
    let _continue_on_exit = Continue(a_pid as u32);
    stack.sanvol_ok(&["volume", "grow", "v", "32M"]);

    // The fence came before the commit, and closed host-a's connection.
    let mds_log = without_colours(&stack.mds_log());
    let fenced_at = mds_log
        .lines()
        .position(|l| l.contains("handle fenced on its fencing devices") && l.contains(&format!("handle={handle_a} ")))
        .unwrap_or_else(|| panic!("host-a's handle {handle_a} was not fenced:\n{mds_log}"));
    let committed_at = mds_log
        .lines()
        .position(|l| l.contains("volume reconfigured"))
        .unwrap_or_else(|| panic!("the grow did not commit:\n{mds_log}"));
    assert!(fenced_at < committed_at, "committed before host-a was fenced:\n{mds_log}");
    let holder = format!("holder=handle {handle_a}");
    let target_log = without_colours(&stack.devices[0].stderr());
    let line = target_log
        .lines()
        .find(|l| l.contains("fenced: closing older connections") && l.contains(&holder))
        .unwrap_or_else(|| panic!("the target fenced {holder}:\n{target_log}"));
    assert!(!line.contains("connections=0"), "host-a's open connection was closed by the fence: {line}");
    // The device itself refuses host-a's handle now.
    let (_, capability) = handle_capability_on(&stack, 0, handle_a);
    let refused = NbdClient::connect(&stack.devices[0].uri().with_export(capability.export_name("")), options()).await;
    let e = refused.err().expect("host-a's capability is refused once the grow committed").to_string();
    assert!(e.contains("fenced"), "{e}");

    // host-a goes on with a write queued on its export: it fails, and no
    // byte of it is on the device.
    let late = {
        let ca = ca.clone();
        tokio::spawn(async move { ca.write(0, Bytes::from(vec![0xa2; 4096]), true).await })
    };
    // SAFETY: as above.
    unsafe { libc::kill(a_pid, libc::SIGCONT) };
    let result = tokio::time::timeout(Duration::from_secs(30), late).await.expect("the late write is answered");
    result.unwrap().expect_err("host-a's write after the fence must fail");
    ca.write(4096, Bytes::from(vec![0xa3; 4096]), true).await.expect_err("and so do later ones");
    assert_eq!(fill_of(&image_block(&image, offset)), Some(0xaa), "host-a wrote after the fence\n{}", a.proc.log());
    for late_byte in [0xa2, 0xa3] {
        assert!(!image_has_block_of(&image, late_byte), "a block of host-a's late write {late_byte:#x} landed");
    }
    let size = stack.sanvol_json(&["volume", "show", "v"]);
    assert!(size.to_string().contains(&(32 * MIB).to_string()), "grown: {size}");
}
