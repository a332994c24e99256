//! Issue 12, the write-intent log, with real processes: nbdkit devices,
//! `sanvol-mds`, and a `sanvol-agent` whose path to one leg's device runs
//! through nbdkit's `delay` filter (5 s per write). Mirrored writes are in
//! flight — on the fast leg, not yet on the slow one — when the agent and
//! its slow path die (kill -9, as a host crash takes both). Another agent
//! then opens the volume. Read from the devices directly, both legs must be
//! identical over the whole volume, and reads through the new agent (which
//! rotate between legs) must return the same data every time.
//!
//! Run with `SANVOL_INTENT_LOG=off` in the environment (the agents inherit
//! it) and this test fails: without the log nothing resynchronizes the
//! regions the crash left different.

use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::peers;
use sanvol_tests::system::Stack;
use sanvol_tests::volumes::{block_pattern, connect, BLOCK};

/// Blocks written in flight, one per intent region (spread over the volume).
const WRITES: u64 = 16;
/// Reads of each written block through the new agent.
const READS_PER_BLOCK: usize = 6;
const WAIT: Duration = Duration::from_secs(60);

/// (device index, device offset) of each leg of each extent of `volume`.
fn legs(stack: &Stack, volume: &str) -> (u64, Vec<Vec<(u64, u64)>>) {
    let show = stack.sanvol_json(&["volume", "show", volume]);
    let desc = &show["description"];
    let extents = desc["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["legs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["device"].as_u64().unwrap(), l["offset"].as_u64().unwrap()))
                .collect()
        })
        .collect();
    (desc["extent_bytes"].as_u64().unwrap(), extents)
}

/// Reads `len` bytes at volume offset `offset` from leg `leg`, directly on
/// its device.
async fn read_leg(
    devices: &[(u64, NbdClient)],
    map: &(u64, Vec<Vec<(u64, u64)>>),
    leg: usize,
    offset: u64,
    len: u32,
) -> Bytes {
    let (extent_bytes, extents) = map;
    let (device, at) = extents[(offset / extent_bytes) as usize][leg];
    let client = &devices.iter().find(|(d, _)| *d == device).expect("a client per device").1;
    client.read(at + offset % extent_bytes, len).await.expect("read a leg directly")
}

/// What a crash left: the pool, the volume's map, direct clients of its
/// devices, the blocks written in flight and the dead agent's export.
struct Crashed {
    stack: Stack,
    size: u64,
    map: (u64, Vec<Vec<(u64, u64)>>),
    devices: Vec<(u64, NbdClient)>,
    blocks: Vec<u64>,
    export: NbdUri,
}

/// A mirrored volume on a pool whose handles are kept `durable_ms` past
/// their lease; agent host-a writes [`WRITES`] blocks of it while its path
/// to leg 1's device is delayed, and dies (kill -9) once they reached leg 0
/// only.
async fn crash_with_writes_in_flight(durable_ms: u64) -> Crashed {
    crash_with_writes_in_flight_on(Stack::new(2, "1G"), durable_ms, "256M").await
}

/// [`crash_with_writes_in_flight`] on `stack`'s devices, with a volume of
/// `size` (one extent, so one pair of devices, on a pool of more than two).
async fn crash_with_writes_in_flight_on(mut stack: Stack, durable_ms: u64, size: &str) -> Crashed {
    stack.durable_ms = Some(durable_ms);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", size, "--mirror", "2"]);
    let show = stack.sanvol_json(&["volume", "show", "m"]);
    let size = show["description"]["size_bytes"].as_u64().unwrap();
    let map = legs(&stack, "m");
    // Leg 1's device is slow for the first agent only.
    let slow_index = map.1[0][1].0;
    let slow_uri = show["description"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["index"].as_u64() == Some(slow_index))
        .unwrap()["uri"]
        .as_str()
        .unwrap()
        .to_string();
    let peer = stack.devices.iter().position(|d| d.uri().to_string() == slow_uri).expect("the device's nbdkit");
    let socket = stack.devices[peer].dir().join("nbd.sock");
    let mut slow = peers::nbdkit(&[
        "--filter=delay",
        "nbd",
        &format!("socket={}", socket.display()),
        "delay-write=5000ms",
        "delay-zero=5000ms",
        "delay-trim=5000ms",
    ]);
    let mut agent = stack.start_agent_with("host-a", &["--device-uri".into(), format!("{slow_uri}={}", slow.uri())]);
    let export = agent.attach("m", "exclusive");

    let mut devices = Vec::new();
    for d in show["description"]["devices"].as_array().unwrap() {
        let uri: NbdUri = d["uri"].as_str().unwrap().parse().unwrap();
        devices.push((d["index"].as_u64().unwrap(), connect(&uri).await));
    }
    let blocks: Vec<u64> = (0..WRITES).map(|i| i * (size / BLOCK / WRITES) + 1).collect();

    // The writes, all at once; they complete on leg 0 at once, on leg 1
    // after the delay — too late.
    let writer = connect(&export).await;
    let in_flight = tokio::spawn({
        let writer = writer.clone();
        let blocks = blocks.clone();
        async move {
            let writes = blocks.iter().map(|&b| writer.write(b * BLOCK, Bytes::from(block_pattern(7, b)), false));
            futures::future::join_all(writes).await
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let mut landed = 0;
        for &b in &blocks {
            if read_leg(&devices, &map, 0, b * BLOCK, BLOCK as u32).await[..] == block_pattern(7, b)[..] {
                landed += 1;
            }
        }
        if landed == blocks.len() {
            break;
        }
        assert!(Instant::now() < deadline, "the writes never reached the fast leg\n{}", stack.all_logs(40));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The host dies: the agent and its slow path with it.
    agent.proc.kill();
    slow.kill();
    in_flight.abort();
    // The precondition: the crash left the legs different.
    for &b in &blocks {
        let on_slow = read_leg(&devices, &map, 1, b * BLOCK, BLOCK as u32).await;
        assert!(on_slow.iter().all(|&x| x == 0), "block {b} reached the slow leg before the crash");
    }

    Crashed { stack, size, map, devices, blocks, export }
}

/// A connection to `export` once the agent serves it (a restarted agent
/// takes its volumes back in the background: another process's state,
/// polled).
async fn connect_when_served(export: &NbdUri) -> NbdClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match NbdClient::connect(export, ClientOptions::default()).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "{export} not served within {WAIT:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Both legs identical over the volume (read from the devices directly),
/// reads of every written block through `export` never flip, and a write
/// through it lands on both legs.
async fn assert_consistent_through(c: &Crashed, export: &NbdUri) {
    let Crashed { stack, size, map, devices, blocks, .. } = c;
    let size = *size;
    // Reads through the agent rotate between legs and never flip: the
    // first I/O is also what makes a restarted agent's copy happen.
    let reader = connect_when_served(export).await;
    let mut first_reads = Vec::new();
    for &b in blocks {
        let mut seen = Vec::new();
        for _ in 0..READS_PER_BLOCK {
            seen.push(reader.read(b * BLOCK, BLOCK as u32).await.expect("read through the agent"));
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "block {b} read differently through the agent");
        first_reads.push(seen.swap_remove(0));
    }
    // Both legs, read from the devices directly, are identical everywhere.
    let extent_bytes = map.0;
    let step = 4u64 << 20;
    let mut offset = 0;
    while offset < size {
        let len = step.min(size - offset).min(extent_bytes - offset % extent_bytes) as u32;
        let a = read_leg(devices, map, 0, offset, len).await;
        let b = read_leg(devices, map, 1, offset, len).await;
        if a != b {
            let first = a.iter().zip(b.iter()).position(|(x, y)| x != y).unwrap() as u64;
            panic!(
                "the legs differ at volume offset {} after the reopen (a crashed holder's dirty regions were not \
                 resynchronized)\n{}",
                offset + first,
                stack.all_logs(40)
            );
        }
        offset += u64::from(len);
    }
    // What the agent read is what both legs hold.
    for (&b, read) in blocks.iter().zip(&first_reads) {
        let on_device = read_leg(devices, map, 0, b * BLOCK, BLOCK as u32).await;
        assert_eq!(*read, on_device, "block {b} through the agent vs its legs");
    }
    // And the new holder writes (its own marks are not held up by the copy).
    let b = blocks[0];
    reader.write(b * BLOCK, Bytes::from(block_pattern(9, b)), false).await.expect("write through the new agent");
    reader.flush().await.expect("flush through the new agent");
    for leg in 0..2 {
        let on_leg = read_leg(devices, map, leg, b * BLOCK, BLOCK as u32).await;
        assert_eq!(on_leg[..], block_pattern(9, b)[..], "leg {leg} after the new holder's write");
    }
    reader.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_mirrored_writes_in_flight_leaves_identical_legs_once_another_agent_opens_the_volume() {
    let c = crash_with_writes_in_flight(1000).await;
    let stack = &c.stack;
    // Another agent opens the volume once the dead holder's lease ran out.
    let other = stack.start_agent("host-b");
    let deadline = Instant::now() + WAIT;
    let export = loop {
        let out = other.cli(&["attach", "m", "--mode", "exclusive"]);
        if out.status.success() {
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = stdout.lines().find(|l| l.starts_with("nbd")).expect("attach prints the export").to_string();
            break line.trim().parse::<NbdUri>().unwrap();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            Instant::now() < deadline && stderr.contains("open"),
            "attach of m by host-b failed: {stderr}\n{}",
            stack.all_logs(40)
        );
        // The old holder's lease is another process's state: poll.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    assert_consistent_through(&c, &export).await;
    let log = stack.mds_log();
    assert!(log.contains("copying the regions a gone holder left dirty"), "the server says what it copied:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_that_takes_its_handle_back_resyncs_before_its_first_io() {
    // Handles outlive their lease long enough for the restart to resume.
    let c = crash_with_writes_in_flight(60_000).await;
    // The same agent again (its state directory kept the resume key), its
    // path to the slow device direct now: it takes its handle back and
    // serves the same export.
    let _agent = c.stack.restart_agent("host-a");
    assert_consistent_through(&c, &c.export).await;
    let log = c.stack.mds_log();
    assert!(
        log.contains("copying the regions the handle recorded dirty (its previous run died"),
        "the server says what it copied:\n{log}"
    );
}

/// The copy of a gone holder's dirty regions reads one source, the first
/// leg: when that leg's device does not answer, the copy fails — it never
/// reads the next leg, which is the copy's own target, and "copies" it onto
/// itself (before, the open was then granted, the regions forgotten, and
/// the legs stayed different). Here the crash leaves the new data on leg 0
/// only, and leg 0's device server is stopped (its data kept) before
/// another agent opens the volume; once it is back, both legs must end up
/// identical, read from the devices directly. (Simulator seed
/// 26961687257383.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_holder_s_regions_are_copied_from_the_first_leg_never_from_their_target() {
    // Devices 0-2 hold the pool's metadata and lease copies; the volume's
    // legs go to 3 and 4 (the largest: the most free space), which hold
    // none, so nothing else notices leg 0's device is gone.
    let mut devices: Vec<_> = (0..3).map(|_| peers::nbdkit_file(1 << 30)).collect();
    devices.extend((0..2).map(|_| peers::nbdkit_file(2 << 30)));
    let mut c = crash_with_writes_in_flight_on(Stack::with_devices(devices), 1000, "64M").await;
    let first = c.map.1[0][0].0;
    assert!(first >= 3, "the volume's first leg is on device {first}, one holding metadata");
    let show = c.stack.sanvol_json(&["volume", "show", "m"]);
    let first_uri =
        show["description"]["devices"].as_array().unwrap().iter().find(|d| d["index"].as_u64() == Some(first)).unwrap()
            ["uri"]
            .as_str()
            .unwrap()
            .to_string();
    let peer = c.stack.devices.iter().position(|d| d.uri().to_string() == first_uri).expect("leg 0's nbdkit");
    // Another agent (authorized while every metadata copy answers) opens
    // the volume once leg 0's device is gone: the copy cannot read leg 0.
    let other = c.stack.start_agent("host-b");
    c.stack.devices[peer].kill();
    // The server answers the open: refused (the copy's source does not
    // answer), or granted — then host-b's attach fails on connecting to
    // the dead device (before, the copy onto its target "succeeded" here
    // and the regions were forgotten).
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        let out = other.cli(&["attach", "m", "--mode", "exclusive"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stderr.contains("copying the regions its previous holder was writing")
            || stderr.contains("cannot connect")
            || out.status.success()
        {
            break !out.status.success();
        }
        assert!(Instant::now() < deadline, "attach of m by host-b: {stderr}\n{}", c.stack.all_logs(40));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Once leg 0's device is back, both legs must end up identical.
    c.stack.devices[peer].restart();
    if refused {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = other.cli(&["attach", "m", "--mode", "exclusive"]);
            if out.status.success() {
                break;
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(Instant::now() < deadline, "attach of m by host-b: {stderr}\n{}", c.stack.all_logs(40));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut devices = Vec::new();
    for d in show["description"]["devices"].as_array().unwrap() {
        let uri: NbdUri = d["uri"].as_str().unwrap().parse().unwrap();
        devices.push((d["index"].as_u64().unwrap(), connect(&uri).await));
    }
    c.devices = devices;
    // The legs of every written block agree (the server's copies after the
    // device came back are another process's work: polled).
    let deadline = Instant::now() + WAIT;
    loop {
        let mut differ = Vec::new();
        for &b in &c.blocks {
            let l0 = read_leg(&c.devices, &c.map, 0, b * BLOCK, BLOCK as u32).await;
            let l1 = read_leg(&c.devices, &c.map, 1, b * BLOCK, BLOCK as u32).await;
            if l0 != l1 {
                differ.push(b);
            }
        }
        if differ.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks {differ:?} still differ between the legs (refused: {refused})\n{}",
            c.stack.all_logs(60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A mirrored write that failed on one leg and landed on the other, then a
/// clean detach. The agent's log keeps that region dirty (a failed write is
/// never cleared), but a close makes the server forget the handle's dirty
/// regions: unless the region is copied first, the legs stay different for
/// good, and reads that rotate between legs see the block flip. Read from
/// the devices directly, the legs must be identical after the detach.
/// (Found by the simulator's `mirror-legs-agree`, seed 131.)
///
/// The failure: one leg's device answers EIO to every write while a
/// trigger file exists (nbdkit's error filter), to the agent and to the
/// server's fallback path alike; with `cut_path`, the agent's direct path
/// to it (a proxy of its own) is also killed, so the write goes through
/// the server at once.
async fn a_failed_write_then_a_detach(cut_path: bool) {
    let trigger_dir = tempfile::tempdir().expect("a temp dir");
    let trigger = trigger_dir.path().join("fail-writes");
    // The first three devices hold the pool's metadata and lease copies;
    // the fourth, the largest, holds none (its write errors touch no
    // metadata) and has the most free space, so a mirrored volume takes a
    // leg on it.
    let mut devices: Vec<_> = (0..3).map(|_| peers::nbdkit(&["memory", "1G"])).collect();
    devices.push(peers::nbdkit(&[
        "--filter=error",
        "memory",
        "2G",
        "error-pwrite=EIO",
        "error-pwrite-rate=100%",
        &format!("error-pwrite-file={}", trigger.display()),
    ]));
    let faulty_uri = devices[3].uri().to_string();
    let faulty_socket = devices[3].dir().join("nbd.sock");
    let mut stack = Stack::with_devices(devices);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "256M", "--mirror", "2"]);
    let show = stack.sanvol_json(&["volume", "show", "m"]);
    let map = legs(&stack, "m");
    let mut clients = Vec::new();
    let mut faulty = None;
    for d in show["description"]["devices"].as_array().unwrap() {
        let uri: NbdUri = d["uri"].as_str().unwrap().parse().unwrap();
        let index = d["index"].as_u64().unwrap();
        if d["uri"].as_str() == Some(faulty_uri.as_str()) {
            faulty = Some(index);
        }
        clients.push((index, connect(&uri).await));
    }
    let faulty_leg = map.1[0].iter().position(|(d, _)| Some(*d) == faulty).expect("a leg on the faulty device");
    let healthy_leg = 1 - faulty_leg;

    // The agent reaches the faulty device through a proxy of its own.
    let mut proxy = peers::nbdkit(&["nbd", &format!("socket={}", faulty_socket.display())]);
    let agent = stack.start_agent_with("host-a", &["--device-uri".into(), format!("{faulty_uri}={}", proxy.uri())]);
    let export = agent.attach("m", "exclusive");
    let writer = connect(&export).await;
    let b = 3;
    writer.write(b * BLOCK, Bytes::from(block_pattern(1, b)), false).await.expect("the first write");
    writer.flush().await.expect("flush");
    std::fs::write(&trigger, b"").unwrap();
    if cut_path {
        proxy.kill();
    }
    let refused = tokio::time::timeout(WAIT, writer.write(b * BLOCK, Bytes::from(block_pattern(2, b)), false)).await;
    std::fs::remove_file(&trigger).unwrap();
    let Ok(refused) = refused else {
        panic!("the write was not answered within {WAIT:?}\n{}", agent.proc.log());
    };
    assert!(refused.is_err(), "the write must fail: one leg's device refused it\n{}", agent.proc.log());
    // The precondition: the legs differ now.
    let on_healthy = read_leg(&clients, &map, healthy_leg, b * BLOCK, BLOCK as u32).await;
    let on_faulty = read_leg(&clients, &map, faulty_leg, b * BLOCK, BLOCK as u32).await;
    assert_eq!(on_healthy[..], block_pattern(2, b)[..], "the healthy leg took the failed write");
    assert_eq!(on_faulty[..], block_pattern(1, b)[..], "the faulty leg kept the block's older data");
    writer.disconnect().await;

    agent.detach("m");
    let on_healthy = read_leg(&clients, &map, healthy_leg, b * BLOCK, BLOCK as u32).await;
    let on_faulty = read_leg(&clients, &map, faulty_leg, b * BLOCK, BLOCK as u32).await;
    assert!(
        on_healthy == on_faulty,
        "the legs still differ after the detach: the region where the write failed was not resynchronized\n{}",
        stack.all_logs(40)
    );
    let log = agent.proc.log();
    assert!(log.contains("resynchronizing them before the handle is closed"), "the agent says what it did:\n{log}");
    let log = stack.mds_log();
    assert!(log.contains("copying the regions the handle recorded dirty"), "and the server:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_failed_on_one_leg_is_resynchronized_before_the_handle_closes() {
    a_failed_write_then_a_detach(true).await;
}

/// The same, the agent's direct path intact: the device answers its reads
/// (so a probe finds the path working) and refuses its writes. The write
/// must fail with the server's answer — not go down the direct path again
/// on every try, for ever (before, its wait for the direct copy outlasted
/// the lease it was sent under, and the try after the renewal went direct
/// again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_a_device_refuses_fails_instead_of_looping_on_its_direct_path() {
    a_failed_write_then_a_detach(false).await;
}
