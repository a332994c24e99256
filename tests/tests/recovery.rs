//! A device that comes back is used again, with real processes: nbdkit
//! `file` devices, sanvol-mds, sanvol-agent and fio verifying every block.
//! The nbdkit serving one leg of a mirrored volume is killed under writes
//! and, once the server has marked the device failed, started again on the
//! same socket over the same file. Without an admin the device must come
//! back online (resynchronized), both legs must then read back identical on
//! the devices directly at every extent the map names, and fio's verify must
//! be clean.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use blockio::client::NbdClient;
use blockio::BlockDevice;
use sanvol_tests::system::{pub_path, Stack};
use sanvol_tests::volumes::{connect, fio_verify};
use volume_format::metadata::journal::{load, CopyImage, LoadOptions};
use volume_format::metadata::MetadataArea;
use volume_format::{DeviceLabel, PublicKey};

/// Longest wait for the server to mark the device failed, and to bring it
/// back (probe backoff, recall, copy, commit).
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
const READ_BYTES: u64 = 4 << 20;

/// Device `index` as `sanvol device list --json` shows it: (state, recovery).
fn device_state(stack: &Stack, index: u64) -> (String, String) {
    let list = stack.sanvol_json(&["device", "list"]);
    let d = list.as_array().unwrap().iter().find(|d| d["index"].as_u64() == Some(index)).expect("device listed");
    (d["state"].as_str().unwrap_or_default().to_string(), d["recovery"].as_str().unwrap_or_default().to_string())
}

/// Polls the server's listing (an external process's state: there is no
/// signal to await) until `done` holds; returns every (state, recovery) seen.
fn wait_device(stack: &Stack, index: u64, what: &str, done: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    let mut seen: Vec<(String, String)> = Vec::new();
    loop {
        let now = device_state(stack, index);
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if done(&now.0) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "device {index} not {what} within {STATE_TIMEOUT:?}; states seen: {seen:?}\nserver log:\n{}",
            stack.mds_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn read_range(c: &NbdClient, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let n = READ_BYTES.min(offset + len - at);
        out.extend_from_slice(&c.read(at, n as u32).await.expect("read the device"));
        at += n;
    }
    out
}

/// The pool metadata as the copy on device `index` alone says it (label,
/// checkpoint slots and journal ring read from the device directly, loaded
/// and verified as the server loads it): its generation and what it says of
/// device `index`'s state.
async fn metadata_copy(stack: &Stack, index: u64) -> (u64, String) {
    let c = connect(&stack.device_uris()[index as usize]).await;
    let label = DeviceLabel::decode(&c.read(0, 4096).await.unwrap()).expect("the device has its label");
    let area = MetadataArea::from_label(&label);
    let s0 = read_range(&c, area.slot_offset(0), area.slot_bytes).await;
    let s1 = read_range(&c, area.slot_offset(1), area.slot_bytes).await;
    let ring = area.ring();
    let ring = read_range(&c, ring.start, ring.len_bytes()).await;
    c.disconnect().await;
    let (key, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    let image = CopyImage {
        device: format!("device {index}"),
        area,
        checkpoint_slots: [Ok(&s0[..]), Ok(&s1[..])],
        ring: Ok(&ring[..]),
    };
    let loaded = load(label.pool_uuid, &PublicKey(key.to_bytes()), &[image], LoadOptions::default())
        .unwrap_or_else(|e| panic!("the metadata copy on device {index} does not load: {e}"));
    let state = loaded.metadata.devices.iter().find(|d| d.index.0 as u64 == index).unwrap().state.to_string();
    (loaded.metadata.generation, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_restarted_under_fio_comes_back_resynchronized() {
    let mut stack = Stack::new_file_devices(3, 512 << 20);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "64M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("m", "exclusive");
    let show = stack.sanvol_json(&["volume", "show", "m"]);
    let victim = show["description"]["extents"][0]["legs"][0]["device"].as_u64().unwrap();

    let mut fio =
        fio_verify(&uri, "64M", &["--loops=12"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(fio.stdout.take().unwrap()).lines();
    let started = lines.by_ref().map_while(Result::ok).any(|l| l.contains("connected to NBD server"));
    assert!(started, "fio did not connect");

    // The device goes away under writes: the server marks it failed and the
    // mirror goes on with its other leg.
    stack.devices[victim as usize].kill();
    wait_device(&stack, victim, "marked failed", |s| s.starts_with("failed"));
    let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap().to_string();
    assert!(health.contains("degraded"), "volume show says the volume is degraded: {health:?}");

    // It comes back on the same socket, label and data intact: no admin.
    stack.devices[victim as usize].restart();
    let seen = wait_device(&stack, victim, "back online", |s| s == "online");
    assert!(
        seen.iter().any(|(s, r)| s == "resyncing" || r.starts_with("resyncing")),
        "the resync shows in `device list` while it runs: {seen:?}"
    );
    for line in stack.mds_log().lines().filter(|l| l.contains("extents resynchronized")) {
        eprintln!("{line}");
    }
    // The copy ran online first (the holder wrote on), then again where
    // fio wrote meanwhile, at the recall point.
    let log = stack.mds_log();
    assert!(log.contains("copying online while the holders write"), "the resync copies online first");
    assert!(log.contains("copying at the recall point what was written during the online copy"));
    let finished_early = fio.try_wait().unwrap().is_some();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = fio.wait().unwrap();
    let out = rest.join("\n");
    assert!(
        status.success() && out.contains("err= 0"),
        "fio across the device's return failed:\n{out}\nagent log:\n{}\nserver log:\n{}",
        agent.proc.log(),
        stack.mds_log()
    );
    assert!(!finished_early, "fio finished before the device was back: the test proves nothing; make the job bigger");
    let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap().to_string();
    assert!(health.is_empty(), "the volume is whole again: {health:?}");

    // The metadata copy on the device is current again: the same generation
    // as a copy that never went away, and it knows the device is online.
    let other = (0..3).find(|&i| i != victim).unwrap();
    let (generation, state) = metadata_copy(&stack, victim).await;
    let (current, _) = metadata_copy(&stack, other).await;
    assert_eq!((generation, state.as_str()), (current, "online"), "the returned device's metadata copy");

    // Both legs of every extent read back identical on the devices.
    let show = stack.sanvol_json(&["volume", "show", "m"]);
    let extent_bytes = show["description"]["extent_bytes"].as_u64().unwrap();
    let uris = stack.device_uris();
    for (e, extent) in show["description"]["extents"].as_array().unwrap().iter().enumerate() {
        let legs: Vec<(u64, u64)> = extent["legs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["device"].as_u64().unwrap(), l["offset"].as_u64().unwrap()))
            .collect();
        assert_eq!(legs.len(), 2);
        let (a, b) = (connect(&uris[legs[0].0 as usize]).await, connect(&uris[legs[1].0 as usize]).await);
        let mut at = 0;
        while at < extent_bytes {
            let n = READ_BYTES.min(extent_bytes - at) as u32;
            let (x, y) = (a.read(legs[0].1 + at, n).await.unwrap(), b.read(legs[1].1 + at, n).await.unwrap());
            if x != y {
                let i = x.iter().zip(y.iter()).position(|(p, q)| p != q).unwrap();
                panic!(
                    "extent {e}: legs differ at byte {} of the extent (device {} vs device {})",
                    at + i as u64,
                    legs[0].0,
                    legs[1].0
                );
            }
            at += u64::from(n);
        }
        a.disconnect().await;
        b.disconnect().await;
    }
    agent.detach("m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_comes_back_without_its_label_stays_failed() {
    let mut stack = Stack::new_file_devices(3, 512 << 20);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "64M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("m", "exclusive");
    let show = stack.sanvol_json(&["volume", "show", "m"]);
    let victim = show["description"]["extents"][0]["legs"][0]["device"].as_u64().unwrap();
    stack.devices[victim as usize].kill();
    // A write reaches the dead leg: the agent reports it, the server marks
    // the device failed.
    let c = connect(&uri).await;
    c.write(0, bytes::Bytes::from(vec![7u8; 4096]), true).await.expect("the mirror takes the write on its other leg");
    c.disconnect().await;
    wait_device(&stack, victim, "marked failed", |s| s.starts_with("failed"));
    // Something else answers at the same address: the same file with its
    // label wiped (an empty disk put back in its place).
    let image = stack.devices[victim as usize].dir().join("disk.img");
    let mut f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 4096]).unwrap();
    f.sync_all().unwrap();
    stack.devices[victim as usize].restart();
    // Its probes say why it is not taken back, and it stays failed.
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let (state, recovery) = device_state(&stack, victim);
        assert!(state.starts_with("failed"), "a device without its label must not come back: {state} ({recovery})");
        if recovery.contains("without a sanvol label") {
            break;
        }
        assert!(Instant::now() < deadline, "no probe found the missing label: {recovery}\n{}", stack.mds_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap().to_string();
    assert!(health.contains("degraded"), "{health:?}");
    agent.detach("m");
}
