//! Issue 4 (durable handles) with real processes: `sanvol-mds` killed with
//! SIGKILL and restarted under a running fio verify job, a vanished agent, an
//! agent partitioned (SIGSTOP) past its lease and durable timeout while
//! another opens the volume, duplicate handles, handover, and forged or
//! replayed keys and tokens. Device contents are checked by reading the
//! devices directly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use control_client::{ControlAddr, ControlClient, ControlClientError};
use sanvol_tests::peers::require_tool;
use sanvol_tests::system::{poll, pub_path, run_ok, Agent, Stack};
use volume_format::control::auth::Role;
use volume_format::control::messages::{ErrorCode, OpenMode, OpenedHandle, Request, Response};

const BLOCK: u64 = 4096;

fn list(agent: &Agent) -> serde_json::Value {
    let out = agent.cli(&["list", "--json"]);
    assert!(out.status.success(), "list: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("list --json")
}

fn volume_state(agent: &Agent, volume: &str) -> (u64, String, String) {
    let l = list(agent);
    let v = l.as_array().unwrap().iter().find(|v| v["volume"] == volume).expect("attached");
    (v["handle"].as_u64().unwrap(), v["state"].as_str().unwrap().into(), v["state_detail"].as_str().unwrap().into())
}

fn attach_err(agent: &Agent, volume: &str) -> Option<String> {
    let out = agent.cli(&["attach", volume, "--mode", "exclusive"]);
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `agent` attaches `volume` as soon as its open breaks the previous
/// holder's handle, and writes `data` at offset 0 through its export.
async fn take_over_and_write(agent: &Agent, volume: &str, data: Bytes) {
    poll("the open to break the previous holder's handle", Duration::from_secs(30), || {
        attach_err(agent, volume).is_none().then_some(())
    });
    let uri = poll("the new holder's export", Duration::from_secs(5), || {
        list(agent)
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["volume"] == volume)
            .map(|v| v["export_uri"].as_str().unwrap().to_string())
    });
    let c = connect(&uri.parse().unwrap()).await;
    c.write(0, data, true).await.expect("the new holder writes");
    c.disconnect().await;
}

async fn connect(uri: &NbdUri) -> NbdClient {
    NbdClient::connect(uri, ClientOptions::default()).await.unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

fn pattern(tag: u8) -> Bytes {
    Bytes::from(vec![tag; BLOCK as usize])
}

/// The first block of `volume`, read from its first leg's device directly.
async fn read_first_block_on_device(stack: &Stack, volume: &str) -> Vec<u8> {
    let (uri, offset) = first_block_on_device(stack, volume);
    read_block_at(&uri, offset).await
}

/// Where the first block of `volume` lives: its first leg's device (as the
/// pool records it) and the offset there.
fn first_block_on_device(stack: &Stack, volume: &str) -> (NbdUri, u64) {
    let detail = stack.sanvol_json(&["volume", "show", volume]);
    let desc = &detail["description"];
    let leg = &desc["extents"][0]["legs"][0];
    let dev = leg["device"].as_u64().unwrap();
    let d = desc["devices"].as_array().unwrap().iter().find(|d| d["index"].as_u64() == Some(dev)).unwrap();
    (d["uri"].as_str().unwrap().parse().unwrap(), leg["offset"].as_u64().unwrap())
}

/// The byte a block is filled with, if it is filled with one (the tests
/// write uniform blocks): short messages when a check fails.
fn fill_of(block: &[u8]) -> Option<u8> {
    block.iter().all(|b| *b == block[0]).then(|| block[0])
}

async fn read_block_at(uri: &NbdUri, offset: u64) -> Vec<u8> {
    let c = connect(uri).await;
    let data = c.read(offset, BLOCK as u32).await.expect("read the device directly");
    c.disconnect().await;
    data.to_vec()
}

fn sigstop(agent: &Agent) {
    unsafe { libc::kill(agent.proc.pid() as i32, libc::SIGSTOP) };
}

fn sigcont(agent: &Agent) {
    unsafe { libc::kill(agent.proc.pid() as i32, libc::SIGCONT) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_survives_kill_9_and_restart_of_the_metadata_server() {
    let mut stack = Stack::new(2, "1G");
    stack.lease_ms = 1500;
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "data", "64M"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("data", "exclusive");
    let (handle, _, _) = volume_state(&agent, "data");

    let mut fio = Command::new(require_tool("fio"))
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=32M",
            "--loops=3",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(fio.stdout.take().unwrap()).lines();
    // fio prints this once its NBD connection is up: the workload has started.
    assert!(lines.any(|l| l.map(|l| l.contains("connected to NBD server")).unwrap_or(false)), "fio did not start");

    stack.kill_mds();
    // The agent holds I/O once its lease runs out (observable in `list`).
    poll("the agent to hold I/O with its lease run out", Duration::from_secs(20), || {
        (volume_state(&agent, "data").1 == "lease-expired").then_some(())
    });
    assert!(fio.try_wait().unwrap().is_none(), "fio ended while the server was down; make the job bigger");
    stack.start_mds();
    poll("the agent to resume", Duration::from_secs(20), || {
        agent.proc.log().contains("handle resumed after reconnecting: unchanged").then_some(())
    });

    let status = fio.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = rest.join("\n");
    assert!(
        status.success() && out.contains("err= 0"),
        "fio across the restart failed ({status}):\n{out}\nagent log:\n{}",
        agent.proc.log()
    );
    let (after, state, _) = volume_state(&agent, "data");
    assert_eq!((after, state.as_str()), (handle, "open"), "same handle, no re-open");
    assert!(!agent.proc.log().contains("re-opened after reconnecting"));
    assert!(stack.mds_log().contains("handle resumed: unchanged"), "{}", stack.mds_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_agents_handle_is_reserved_until_lease_plus_durable_then_broken() {
    let mut stack = Stack::new(1, "256M");
    stack.lease_ms = 1000;
    stack.durable_ms = Some(2000);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let mut a = stack.start_agent("host-a");
    a.attach("v", "exclusive");
    let b = stack.start_agent("host-b");
    a.proc.kill();
    let opened_at = Instant::now();

    let err = attach_err(&b, "v").expect("a conflicting open before lease + durable time is refused");
    assert!(err.contains("host-a") && err.contains("reserved for it until"), "{err}");
    let shown = stack.sanvol_json(&["volume", "show", "v"]);
    let by = shown["info"]["open_by"][0].as_str().unwrap().to_string();
    assert!(by.starts_with("host-a (exclusive") && by.contains("reserved for a resume"), "{by}");

    poll("the conflicting open to succeed", Duration::from_secs(20), || attach_err(&b, "v").is_none().then_some(()));
    assert!(opened_at.elapsed() >= Duration::from_millis(2000), "broken before lease + durable time had passed");
    let shown = stack.sanvol_json(&["volume", "show", "v"]);
    let open_by: Vec<String> =
        shown["info"]["open_by"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert!(
        open_by.iter().any(|s| s.starts_with("host-a") && s.contains("broken") && s.contains("host-b")),
        "{open_by:?}"
    );
    assert!(open_by.iter().any(|s| s.starts_with("host-b") && s.contains("active")), "{open_by:?}");
}

/// The agent is partitioned from the server (SIGSTOP) past its lease and
/// durable time while the server restarts and another agent opens the volume;
/// when it comes back it resumes, is told the handle was broken, and fails
/// the volume's I/O — the device keeps the other agent's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_resume_after_another_open_is_told_and_writes_nothing() {
    let mut stack = Stack::new(1, "256M");
    stack.lease_ms = 1000;
    stack.durable_ms = Some(1000);
    stack.grace_ms = Some(2000);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let a = stack.start_agent("host-a");
    let uri_a = a.attach("v", "exclusive");
    let b = stack.start_agent("host-b");
    let ca = connect(&uri_a).await;
    ca.write(0, pattern(0xAA), true).await.expect("host-a writes while it holds the volume");

    sigstop(&a);
    stack.kill_mds();
    stack.start_mds();
    take_over_and_write(&b, "v", pattern(0xBB)).await;

    // host-a comes back; its export already has a write queued in the socket.
    let late = {
        let ca = ca.clone();
        tokio::spawn(async move { ca.write(0, pattern(0xAA), true).await })
    };
    sigcont(&a);
    let result =
        tokio::time::timeout(Duration::from_secs(30), late).await.expect("the held write is answered").unwrap();
    let e = result.expect_err("host-a's write after its handle was broken must fail");
    let (_, state, detail) = volume_state(&a, "v");
    assert_eq!(state, "revoked", "{detail}");
    assert!(detail.contains("broken") && detail.contains("host-b opened volume v"), "{detail}");
    assert!(a.proc.log().contains("refused the resume"), "{e}");
    assert_eq!(
        read_first_block_on_device(&stack, "v").await,
        vec![0xBB; BLOCK as usize],
        "host-a wrote after the break"
    );
    ca.write(BLOCK, pattern(0xAA), true).await.expect_err("later writes fail too");
    assert_eq!(read_first_block_on_device(&stack, "v").await, vec![0xBB; BLOCK as usize]);
}

/// Fencing on plain NBD devices: the agent is stopped (SIGSTOP, a fault
/// point) after admitting a write and before sending it to the device, and
/// stays stopped past its lease and durable time; another agent opens the
/// volume and writes. When the first goes on, its write — admitted while it
/// held the lease — must not reach the device: it is checked against the
/// lease again right before it leaves, finds it run out, waits for a renewal,
/// is told the handle was broken and fails. The device keeps the other
/// agent's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_admitted_before_a_stop_past_the_lease_never_reaches_the_device() {
    let mut stack = Stack::new(1, "256M");
    stack.lease_ms = 1000;
    stack.durable_ms = Some(1000);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    stack.authorize_agent("host-a");
    let a = stack.restart_agent_env("host-a", &[], &[("SANVOL_FAULT", "agent-before-device-write:stop@2")]);
    let uri_a = a.attach("v", "exclusive");
    let b = stack.start_agent("host-b");
    let ca = connect(&uri_a).await;
    ca.write(0, pattern(0xAA), true).await.expect("host-a writes while it holds the volume");

    // The second write stops host-a between admitting it and sending it.
    let late = {
        let ca = ca.clone();
        tokio::spawn(async move { ca.write(0, pattern(0xA2), true).await })
    };
    poll("host-a to stop at the fault point", Duration::from_secs(30), || stopped(a.proc.pid()).then_some(()));
    take_over_and_write(&b, "v", pattern(0xBB)).await;

    sigcont(&a);
    let result =
        tokio::time::timeout(Duration::from_secs(30), late).await.expect("the held write is answered").unwrap();
    result.expect_err("host-a's write held past its lease must fail once the handle is broken");
    assert!(a.proc.log().contains("waited past the lease"), "{}", a.proc.log());
    assert_eq!(
        read_first_block_on_device(&stack, "v").await,
        vec![0xBB; BLOCK as usize],
        "host-a's write landed after host-b took the volume"
    );
}

/// The fencing timing rules, a VM pause (issue 14): the agent's lease
/// clock (`CLOCK_BOOTTIME`) jumps a minute between admitting a write and
/// sending it — the fault point `agent-before-device-write:jump=60000`,
/// standing for a VM paused that long, during which the monotonic clock
/// stood still — while the server is stopped, so no renewal can come. On
/// resuming the agent must find its lease run out and hold the write:
/// nothing reaches the device (read back directly) until the server answers
/// a renewal again. An agent that measured its lease on the monotonic clock
/// would send it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_vm_pause_past_its_lease_the_agent_writes_nothing_until_a_renewal() {
    let mut stack = Stack::new(1, "256M");
    stack.lease_ms = 2000;
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    stack.authorize_agent("host-a");
    let a = stack.restart_agent_env("host-a", &[], &[("SANVOL_FAULT", "agent-before-device-write:jump=60000@2")]);
    let uri_a = a.attach("v", "exclusive");
    let (device, offset) = first_block_on_device(&stack, "v");
    let ca = connect(&uri_a).await;
    ca.write(0, pattern(0xAA), true).await.expect("host-a writes while it holds the volume");

    let mds_pid = stack.mds.as_ref().unwrap().pid() as i32;
    unsafe { libc::kill(mds_pid, libc::SIGSTOP) };
    let late = {
        let ca = ca.clone();
        tokio::spawn(async move { ca.write(0, pattern(0xA2), true).await })
    };
    poll("host-a to hold the write after the jump", Duration::from_secs(30), || {
        a.proc.log().contains("waited past the lease").then_some(())
    });
    let held = read_block_at(&device, offset).await;
    unsafe { libc::kill(mds_pid, libc::SIGCONT) };
    assert_eq!(fill_of(&held), Some(0xAA), "host-a wrote after the VM pause without a renewal");
    assert!(!late.is_finished(), "the write waits for a renewal");

    // The server answers again: the write goes once renewed (or fails if
    // the handle was lost meanwhile); either way the device says which.
    let result =
        tokio::time::timeout(Duration::from_secs(60), late).await.expect("the held write is answered").unwrap();
    let expected = if result.is_ok() { 0xA2 } else { 0xAA };
    assert_eq!(fill_of(&read_block_at(&device, offset).await), Some(expected), "write result {result:?}");
}

/// The fencing timing rules, a write stuck in the device server (issue
/// 14): host-a reaches its device through a second nbdkit over the same
/// file whose `delay` filter holds every write 2 s; a write of host-a
/// arrives there and host-a is stopped (SIGSTOP) with it stuck, past its
/// lease. The server gives the volume to host-b only after lease + the
/// longest device request (4 s here), so the stuck write has landed before
/// host-b writes; host-a is continued. Nothing of host-a is on the device
/// afterwards: the block holds host-b's data (read back directly). A server
/// that released the handle when the lease ran out would let host-b write
/// first and host-a's stuck write land over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stuck_in_the_device_server_lands_before_the_next_holder_is_let_in() {
    let mut stack = Stack::new_file_devices(1, 256 << 20);
    stack.lease_ms = 1000;
    stack.durable_ms = Some(0);
    stack.device_request_max_ms = Some(4000);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let image = stack.devices[0].dir().join("disk.img");
    let log = stack.devices[0].dir().join("slow-writes.log");
    let slow = sanvol_tests::peers::nbdkit(&[
        "--filter=log",
        "--filter=delay",
        "file",
        image.to_str().unwrap(),
        "delay-write=2",
        &format!("logfile={}", log.display()),
    ]);
    let writes_arrived =
        || std::fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| l.contains(" Write id=")).count();
    stack.authorize_agent("host-a");
    let device_uri = format!("--device-uri={}={}", stack.device_uris()[0], slow.uri());
    let a = stack.restart_agent_with("host-a", &[device_uri]);
    let uri_a = a.attach("v", "exclusive");
    let b = stack.start_agent("host-b");
    let ca = connect(&uri_a).await;
    ca.write(0, pattern(0xAA), true).await.expect("host-a writes (slowly) while it holds the volume");
    let before = writes_arrived();

    let late = {
        let ca = ca.clone();
        tokio::spawn(async move { ca.write(0, pattern(0xA2), true).await })
    };
    poll("host-a's write to reach the slow device server", Duration::from_secs(30), || {
        (writes_arrived() > before).then_some(())
    });
    sigstop(&a);
    let stopped_at = Instant::now();
    take_over_and_write(&b, "v", pattern(0xBB)).await;
    assert!(
        stopped_at.elapsed() >= Duration::from_millis(2000),
        "host-b was let in {:?} after host-a stopped, before host-a's stuck write could land",
        stopped_at.elapsed()
    );
    sigcont(&a);
    let result =
        tokio::time::timeout(Duration::from_secs(30), late).await.expect("host-a's write is answered").unwrap();
    assert_eq!(
        fill_of(&read_first_block_on_device(&stack, "v").await),
        Some(0xBB),
        "host-a's stuck write (0xA2, answered {result:?}) landed after host-b took the volume and wrote"
    );
    drop(slow);
}

/// A write of an agent killed while the write sat in a device server's
/// queue lands late — here while the restarted agent already runs. The
/// restarted agent (same --state-dir: it resumes its handle at once) must
/// not let a newer write of its own reach the device before that: after an
/// unclean stop its writes wait `--device-request-max-ms` from its start.
/// The proxy on the first run's device path holds the write (the stuck
/// queue) and releases it halfway through that time, as a device that
/// executes each request within the bound would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agents_writes_wait_for_its_previous_runs_stuck_writes() {
    const DEVICE_MAX_MS: u64 = 5000;
    let mut stack = Stack::new_file_devices(1, 256 << 20);
    stack.device_request_max_ms = Some(DEVICE_MAX_MS);
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let proxy = sanvol_tests::proxy::CuttableProxy::start(
        &stack.dir.path().join("stuck-queue.sock"),
        &stack.devices[0].dir().join("nbd.sock"),
    );
    let via_proxy = NbdUri::unix(&proxy.socket, "").to_string();
    let device = stack.device_uris()[0].clone();
    let mut a = stack.start_agent_with("host-a", &["--device-uri".into(), format!("{device}={via_proxy}")]);
    let uri = a.attach("v", "exclusive");
    let c = connect(&uri).await;
    c.write(0, pattern(0xAA), true).await.expect("the first run writes");

    proxy.hold();
    let stuck = {
        let c = c.clone();
        tokio::spawn(async move { c.write(0, pattern(0xA2), true).await })
    };
    poll("the first run's write to reach the stuck queue", Duration::from_secs(30), || {
        (proxy.held_bytes() >= BLOCK).then_some(())
    });
    a.proc.kill();
    let _ = stuck.await;

    // The restart reaches the device directly and resumes the handle.
    let b = stack.restart_agent("host-a");
    let uri = poll("the resumed export", Duration::from_secs(30), || {
        list(&b)
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["volume"] == "v")
            .and_then(|v| v["export_uri"].as_str().map(str::to_string))
    });
    let c = connect(&uri.parse().unwrap()).await;
    let newer = {
        let c = c.clone();
        tokio::spawn(async move { c.write(0, pattern(0xBB), true).await })
    };
    // Half the bound: the stuck write is still "within" it; a newer write
    // that went at once has landed by now, one that waits has not.
    let went_at_once = tokio::time::timeout(Duration::from_millis(DEVICE_MAX_MS / 2), async {
        while !newer.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    proxy.release();
    poll("the stuck write to be delivered to the device", Duration::from_secs(30), || {
        (proxy.open_connections() == 0).then_some(())
    });
    newer.await.unwrap().expect("the restarted agent's write is acknowledged");
    assert_eq!(
        fill_of(&read_first_block_on_device(&stack, "v").await),
        Some(0xBB),
        "the previous run's stuck write (0xA2) landed over the restarted agent's acknowledged write \
         (which went {})",
        if went_at_once { "at once" } else { "after the wait" }
    );
    assert!(!went_at_once, "the restarted agent's write did not wait for the previous run's writes");
    let log = b.proc.log();
    assert!(log.contains("did not stop cleanly"), "the agent says why its writes wait; log:\n{log}");
}

fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
}

/// A protocol-level agent (the test itself) with its own key, for the key and
/// token checks that the agent binary never lets go wrong.
struct RawAgent {
    key: ed25519_dalek::SigningKey,
    name: String,
}

impl RawAgent {
    fn new(stack: &Stack, name: &str) -> RawAgent {
        let path = stack.dir.path().join(format!("{name}.key"));
        run_ok(Command::new(sanvol_tests::system::bin("sanvol")).arg("keygen").arg(&path));
        stack.sanvol_ok(&["client", "add", pub_path(&path).to_str().unwrap(), "--role", "agent", "--name", name]);
        RawAgent { key: control_client::keys::load_private(&path).unwrap(), name: name.into() }
    }

    async fn connect(&self, stack: &Stack, instance: [u8; 16]) -> ControlClient {
        let addr: ControlAddr = stack.mds_addr().parse().unwrap();
        let (server_key, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
        let (c, mut events) =
            ControlClient::connect(&addr, &self.key, Some(&server_key), Role::Agent, &self.name, instance)
                .await
                .unwrap();
        // Events are not looked at here, but consumed: a client whose events
        // go unread is disconnected (a resume is followed by one).
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        c
    }

    fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
}

fn opened(r: Result<Response, ControlClientError>) -> OpenedHandle {
    match r {
        Ok(Response::Opened(h)) => h,
        other => panic!("expected Opened, got {other:?}"),
    }
}

fn refused(r: Result<Response, ControlClientError>) -> (ErrorCode, String) {
    match r {
        Err(ControlClientError::Server(e)) => (e.code, e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_handles_handover_and_forged_or_replayed_keys_and_tokens() {
    let mut stack = Stack::new(1, "256M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let a = RawAgent::new(&stack, "raw-a");
    let b = RawAgent::new(&stack, "raw-b");
    let c = RawAgent::new(&stack, "raw-c");
    let a1 = a.connect(&stack, [1; 16]).await;
    let h = opened(a1.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await);
    assert!(!h.resume_key.is_empty());

    // Duplicate handle: a second channel of the same agent, same handle.
    let a2 = a.connect(&stack, [1; 16]).await;
    let dup = opened(a2.request(Request::Resume { key: h.resume_key.clone() }).await);
    assert_eq!((dup.handle, dup.mode), (h.handle, OpenMode::Exclusive));
    a1.close().await;
    a2.request(Request::Renew).await.unwrap();
    let cc = c.connect(&stack, [3; 16]).await;
    let (code, msg) = refused(cc.request(Request::Open { volume: "v".into(), mode: OpenMode::ReadOnly }).await);
    assert_eq!(code, ErrorCode::Conflict, "{msg}");
    assert!(msg.contains("raw-a"), "{msg}");

    // Forged, altered, foreign-instance and foreign-agent resume keys.
    let mut altered = h.resume_key.clone();
    altered[20] ^= 1;
    let (code, msg) = refused(a2.request(Request::Resume { key: altered }).await);
    assert!(code == ErrorCode::PermissionDenied && msg.contains("forged or altered"), "{code:?} {msg}");
    let (code, msg) = refused(a2.request(Request::Resume { key: vec![0; 10] }).await);
    assert!(code == ErrorCode::PermissionDenied && msg.contains("bytes"), "{code:?} {msg}");
    let other_run = a.connect(&stack, [9; 16]).await;
    let (_, msg) = refused(other_run.request(Request::Resume { key: h.resume_key.clone() }).await);
    assert!(msg.contains("another run of this agent"), "{msg}");
    let (_, msg) = refused(cc.request(Request::Resume { key: h.resume_key.clone() }).await);
    assert!(msg.contains("issued to agent key"), "{msg}");

    // Handover to b: both hold it, a third cannot take it, token single-use.
    let Response::HandoverToken { token, .. } =
        a2.request(Request::Handover { handle: h.handle, to_key: b.public() }).await.unwrap()
    else {
        panic!("no token")
    };
    let (_, msg) = refused(cc.request(Request::OpenHandover { token: token.clone() }).await);
    assert!(msg.contains("issued to agent key"), "{msg}");
    let mut forged = token.clone();
    let last = forged.len() - 1;
    forged[last] ^= 0x80;
    let b1 = b.connect(&stack, [2; 16]).await;
    let (_, msg) = refused(b1.request(Request::OpenHandover { token: forged }).await);
    assert!(msg.contains("forged or altered"), "{msg}");
    let hb = opened(b1.request(Request::OpenHandover { token: token.clone() }).await);
    let token_used_by_b = token.clone();
    assert_ne!(hb.handle, h.handle);
    assert_eq!(hb.mode, OpenMode::Exclusive);
    let (_, msg) = refused(b1.request(Request::OpenHandover { token: token.clone() }).await);
    assert!(msg.contains("already used"), "{msg}");
    let (code, _) = refused(cc.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await);
    assert_eq!(code, ErrorCode::Conflict);
    // The first detaches; the second still holds it.
    a2.request(Request::Close { handle: h.handle }).await.unwrap();
    let (code, msg) = refused(cc.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await);
    assert!(code == ErrorCode::Conflict && msg.contains("raw-b"), "{msg}");
    // A resume key of a closed handle is refused with the reason.
    let (code, msg) = refused(a2.request(Request::Resume { key: h.resume_key.clone() }).await);
    assert!(code == ErrorCode::NotFound && msg.contains("closed"), "{msg}");
    // b's own key resumes fine on a new channel.
    let b2 = b.connect(&stack, [2; 16]).await;
    assert_eq!(opened(b2.request(Request::Resume { key: hb.resume_key.clone() }).await).handle, hb.handle);

    // After a restart: grace refuses opens; a token used before is still
    // used (recorded with the handle it opened), one issued and not used
    // before works once.
    let Response::HandoverToken { token, .. } =
        b2.request(Request::Handover { handle: hb.handle, to_key: a.public() }).await.unwrap()
    else {
        panic!("no token")
    };
    let used_before = token_used_by_b.clone();
    stack.kill_mds();
    stack.start_mds();
    let cc = c.connect(&stack, [3; 16]).await;
    let (code, msg) = refused(cc.request(Request::Open { volume: "v".into(), mode: OpenMode::ReadOnly }).await);
    assert!(code == ErrorCode::Unavailable && msg.contains("grace period") && msg.contains("ms left"), "{msg}");
    let b3 = b.connect(&stack, [2; 16]).await;
    assert_eq!(opened(b3.request(Request::Resume { key: hb.resume_key.clone() }).await).handle, hb.handle);
    // Every restored handle resumed: the grace period is over early.
    let (code, msg) = refused(cc.request(Request::Open { volume: "v".into(), mode: OpenMode::ReadOnly }).await);
    assert_eq!(code, ErrorCode::Conflict, "{msg}");
    let (_, msg) = refused(b3.request(Request::OpenHandover { token: used_before }).await);
    assert!(msg.contains("already used"), "a token used before the restart: {msg}");
    let a3 = a.connect(&stack, [1; 16]).await;
    let ha = opened(a3.request(Request::OpenHandover { token: token.clone() }).await);
    assert_ne!(ha.handle, hb.handle);
    // And once more after another restart: used.
    stack.kill_mds();
    stack.start_mds();
    let a4 = a.connect(&stack, [1; 16]).await;
    let b4 = b.connect(&stack, [2; 16]).await;
    opened(b4.request(Request::Resume { key: hb.resume_key.clone() }).await);
    opened(a4.request(Request::Resume { key: ha.resume_key.clone() }).await);
    let (_, msg) = refused(a4.request(Request::OpenHandover { token }).await);
    assert!(msg.contains("already used"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_between_real_agents_keeps_the_volume_held_throughout() {
    let mut stack = Stack::new(1, "256M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let a = stack.start_agent("host-a");
    let b = stack.start_agent("host-b");
    let c = stack.start_agent("host-c");
    let uri_a = a.attach("v", "exclusive");
    let b_pub = pub_path(&stack.dir.path().join("host-b.key"));
    let out = a.cli(&["handover", "v", "--to", b_pub.to_str().unwrap()]);
    assert!(out.status.success(), "handover: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let token_file = stack.dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();

    let out = b.cli(&["attach", "v", "--handover-token", token_file.to_str().unwrap()]);
    assert!(out.status.success(), "attach with token: {}\n{}", String::from_utf8_lossy(&out.stderr), b.proc.log());
    let uri_b: NbdUri = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // Both do I/O.
    let ca = connect(&uri_a).await;
    ca.write(0, pattern(1), true).await.unwrap();
    ca.disconnect().await;
    let cb = connect(&uri_b).await;
    assert_eq!(cb.read(0, BLOCK as u32).await.unwrap().to_vec(), vec![1; BLOCK as usize]);
    cb.write(BLOCK, pattern(2), true).await.unwrap();
    // Nobody else can take it, before or after the first detaches.
    assert!(attach_err(&c, "v").unwrap().contains("host-"));
    a.detach("v");
    assert!(attach_err(&c, "v").unwrap().contains("host-b"));
    cb.write(2 * BLOCK, pattern(3), true).await.unwrap();
    cb.disconnect().await;
    // The token was single-use.
    let out = c.cli(&["attach", "v", "--handover-token", &token]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("handover token refused"), "{err}");
}

/// `--mds` given twice: when the server comes back at the *other* address (a
/// standby taking over), the agent finds it there and resumes its handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_resumes_at_another_configured_server_address() {
    let mut stack = Stack::new(1, "256M");
    stack.lease_ms = 1000;
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let standby = stack.dir.path().join("standby.sock");
    let a = stack.start_agent_with("host-a", &["--mds".into(), format!("unix:{}", standby.display())]);
    let uri = a.attach("v", "exclusive");
    let (handle, _, _) = volume_state(&a, "v");
    stack.kill_mds();
    stack.mds_socket = standby;
    stack.start_mds();
    poll("the agent to resume at the standby address", Duration::from_secs(30), || {
        a.proc.log().contains("handle resumed after reconnecting: unchanged").then_some(())
    });
    assert_eq!(volume_state(&a, "v"), (handle, "open".to_string(), String::new()));
    let c = connect(&uri).await;
    c.write(0, pattern(7), true).await.expect("I/O goes on after the resume");
    c.disconnect().await;
}
