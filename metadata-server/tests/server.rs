//! The metadata server end to end: an embedded `sanvol-mds` over NBD devices
//! served in-process, driven by the real `sanvol` binary and by control
//! clients acting as agents.

mod common;

use common::{run, Pool, MIB};
use control_client::ControlClientError;
use volume_format::control::auth::Role;
use volume_format::control::messages::{ErrorCode, OpenMode, Request, Response, ServerEvent, VolumeDetail, VolumeInfo};
use volume_format::DeviceIndex;

const LEASE_MS: u64 = 10_000;

fn code(e: ControlClientError) -> (ErrorCode, String) {
    match e {
        ControlClientError::Server(e) => (e.code, e.message),
        other => panic!("expected a server error, got {other}"),
    }
}

async fn volumes(admin: &control_client::ControlClient) -> Vec<VolumeInfo> {
    match admin.request(Request::VolumeList).await.unwrap() {
        Response::Volumes(v) => v,
        other => panic!("{other:?}"),
    }
}

async fn open(
    client: &control_client::ControlClient,
    volume: &str,
    mode: OpenMode,
) -> Result<volume_format::control::messages::OpenedHandle, ControlClientError> {
    match client.request(Request::Open { volume: volume.into(), mode }).await? {
        Response::Opened(h) => Ok(h),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_lifecycle_through_the_cli() {
    let pool = Pool::start(LEASE_MS).await;
    let (ok, out, err) = run(pool.cli().args(["volume", "create", "plain", "8M"])).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(pool.cli().args(["volume", "create", "mirrored", "4MiB", "--mirror", "2"])).await;
    assert!(ok, "{out}{err}");

    let (ok, out, err) = run(pool.cli().args(["volume", "list", "--json"])).await;
    assert!(ok, "{err}");
    let list: Vec<VolumeInfo> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list.iter().map(|v| (v.name.as_str(), v.size_bytes, v.legs)).collect::<Vec<_>>(),
        vec![("plain", 8 * MIB, 1), ("mirrored", 4 * MIB, 2)]
    );
    let (ok, out, _) = run(pool.cli().args(["volume", "list"])).await;
    assert!(ok && out.starts_with("NAME") && out.contains("mirrored"), "{out}");

    let (ok, out, err) = run(pool.cli().args(["volume", "show", "mirrored", "--json"])).await;
    assert!(ok, "{err}");
    let detail: VolumeDetail = serde_json::from_str(&out).unwrap();
    assert_eq!(detail.description.extents.len(), 4);
    for e in &detail.description.extents {
        assert_eq!(e.legs.len(), 2);
        assert_ne!(e.legs[0].device, e.legs[1].device, "mirror legs on distinct devices");
    }
    let (ok, out, _) = run(pool.cli().args(["volume", "show", "mirrored"])).await;
    assert!(ok && out.contains("LEG 2") && out.contains("[0, 1048576)"), "{out}");

    // Extents are spread over the devices.
    let (ok, out, _) = run(pool.cli().args(["volume", "show", "plain", "--json"])).await;
    assert!(ok);
    let plain: VolumeDetail = serde_json::from_str(&out).unwrap();
    assert_eq!(plain.description.devices.len(), 3, "{:?}", plain.description.extents);

    let (ok, out, err) = run(pool.cli().args(["volume", "grow", "plain", "16M"])).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(pool.cli().args(["volume", "grow", "plain", "1G"])).await;
    assert!(!ok, "{out}");
    assert!(err.contains("not enough free space"), "{err}");
    let (ok, out, err) = run(pool.cli().args(["volume", "create", "huge", "10G"])).await;
    assert!(!ok, "{out}");
    assert!(err.contains("not enough free space") && err.contains("nothing was changed"), "{err}");

    let (ok, out, _) = run(pool.cli().args(["pool", "status", "--json"])).await;
    assert!(ok);
    let status: volume_format::control::messages::PoolInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(status.volumes, 2);
    assert_eq!(status.free_bytes, status.capacity_bytes - (16 + 2 * 4) * MIB);
    let (ok, out, _) = run(pool.cli().args(["device", "list", "--json"])).await;
    assert!(ok);
    let devices: Vec<volume_format::control::messages::DeviceInfo> = serde_json::from_str(&out).unwrap();
    assert!(
        devices.iter().all(|d| d.reachable && d.state == volume_format::metadata::DeviceState::Online),
        "{devices:?}"
    );
    let (ok, out, _) = run(pool.cli().args(["client", "list"])).await;
    assert!(ok && out.contains("host-a") && out.contains("agent"), "{out}");

    let (ok, out, err) = run(pool.cli().args(["volume", "delete", "plain"])).await;
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(pool.cli().args(["volume", "show", "plain"])).await;
    assert!(!ok && err.contains("no volume named \"plain\""), "{err}");
    let (ok, out, _) = run(pool.cli().args(["volume", "list", "--json"])).await;
    assert!(ok);
    let list: Vec<VolumeInfo> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_and_handles_survive_a_restart() {
    let mut pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 4 * MIB, legs: 2 }).await.unwrap();
    admin.request(Request::VolumeGrow { name: "db".into(), size_bytes: 6 * MIB }).await.unwrap();
    let (agent, _events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let handle = open(&agent, "db", OpenMode::Exclusive).await.unwrap();
    let before = volumes(&admin).await;
    admin.close().await;

    pool.stop_server().await;
    pool.start_server().await;
    let admin = pool.admin().await;
    let after = volumes(&admin).await;
    let strip = |v: &[VolumeInfo]| v.iter().map(|v| VolumeInfo { open_by: vec![], ..v.clone() }).collect::<Vec<_>>();
    assert_eq!(strip(&after), strip(&before));
    assert_eq!(after[0].size_bytes, 6 * MIB);
    assert_eq!(before[0].open_by, vec![format!("host-a (exclusive, handle {}, active)", handle.handle.0)]);
    assert!(
        after[0].open_by[0]
            .starts_with(&format!("host-a (exclusive, handle {}, in grace, awaiting resume", handle.handle.0)),
        "the handle is known after the restart, awaiting its resume: {:?}",
        after[0].open_by
    );
    let Response::Clients(clients) = admin.request(Request::ClientList).await.unwrap() else { panic!() };
    let a = clients.iter().find(|c| c.name == "host-a").unwrap();
    assert!(
        a.handles[0].starts_with(&format!("db (exclusive, handle {}, in grace", handle.handle.0)),
        "{:?}",
        a.handles
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_changes_nothing() {
    let mut pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "x".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    let Response::Pool(before) = admin.request(Request::PoolStatus).await.unwrap() else { panic!() };
    pool.devices.fail_writes(true);
    let e = admin.request(Request::VolumeDelete { name: "x".into() }).await.unwrap_err();
    let (c, message) = code(e);
    assert_eq!(c, ErrorCode::CommitFailed, "{message}");
    assert!(message.contains("injected write failure") && message.contains("next commit voids it"), "{message}");
    // A create does not even get to its commit: its new space cannot be
    // zeroed, and it is refused the same way.
    let e = admin.request(Request::VolumeCreate { name: "y".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap_err();
    let (c, message) = code(e);
    assert_eq!(c, ErrorCode::Unavailable, "{message}");
    assert!(
        message.contains("could not be zeroed")
            && message.contains("injected write failure")
            && message.contains("nothing was changed"),
        "{message}"
    );
    let names = |v: Vec<VolumeInfo>| v.into_iter().map(|v| v.name).collect::<Vec<_>>();
    assert_eq!(names(volumes(&admin).await), ["x"]);
    let Response::Pool(status) = admin.request(Request::PoolStatus).await.unwrap() else { panic!() };
    assert_eq!(status.free_bytes, before.free_bytes);

    pool.devices.fail_writes(false);
    admin.close().await;
    pool.stop_server().await;
    pool.start_server().await;
    let admin = pool.admin().await;
    assert_eq!(names(volumes(&admin).await), ["x"], "the failed changes are not there after a restart");
    admin.request(Request::VolumeCreate { name: "y".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    assert_eq!(volumes(&admin).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_conflicts_name_the_holder_and_delete_waits_for_close() {
    let pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    let (a, _ea) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let (b, _eb) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();
    assert_eq!(h.description.size_bytes, 4 * MIB);

    let (c, message) = code(open(&b, "db", OpenMode::Exclusive).await.unwrap_err());
    assert_eq!(c, ErrorCode::Conflict);
    assert!(
        message.contains("volume db is open exclusive by host-a")
            && message.contains(&format!("handle {}", h.handle.0))
            && message.contains("reserved for it until"),
        "{message}"
    );
    let (c, message) = code(open(&b, "db", OpenMode::ReadOnly).await.unwrap_err());
    assert_eq!(c, ErrorCode::Conflict, "{message}");

    // Agents cannot do admin things, and admins are not agents.
    let (c, _) = code(b.request(Request::VolumeDelete { name: "db".into() }).await.unwrap_err());
    assert_eq!(c, ErrorCode::PermissionDenied);

    let (c, message) = code(admin.request(Request::VolumeDelete { name: "db".into() }).await.unwrap_err());
    assert_eq!(c, ErrorCode::Busy);
    assert!(message.contains("host-a"), "{message}");

    a.request(Request::Close { handle: h.handle }).await.unwrap();
    let hb = open(&b, "db", OpenMode::SharedWrite).await.unwrap();
    open(&a, "db", OpenMode::ReadOnly).await.unwrap();
    b.request(Request::Close { handle: hb.handle }).await.unwrap();
    a.close().await;
    // a's handle lives on under its lease after its session is gone.
    let (c, _) = code(admin.request(Request::VolumeDelete { name: "db".into() }).await.unwrap_err());
    assert_eq!(c, ErrorCode::Busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_while_open_is_recall_commit_publish() {
    let pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 4 * MIB, legs: 2 }).await.unwrap();
    let (a, mut events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::SharedWrite).await.unwrap();

    let grow = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.request(Request::VolumeGrow { name: "db".into(), size_bytes: 8 * MIB }).await })
    };
    let Some(ServerEvent::Recall { handle, generation }) = events.recv().await else { panic!("no recall") };
    assert_eq!(handle, h.handle);
    assert_eq!(generation, h.description.layout_generation + 1);
    // Opening while the layout is recalled is refused, not given a stale layout.
    let (b, _eb) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let (c, _) = code(open(&b, "db", OpenMode::SharedWrite).await.unwrap_err());
    assert_eq!(c, ErrorCode::Unavailable);
    assert!(!grow.is_finished());

    a.request(Request::RecallDone { handle, generation }).await.unwrap();
    let Some(ServerEvent::Publish { handle: ph, description }) = events.recv().await else { panic!("no publish") };
    assert_eq!(ph, h.handle);
    assert_eq!(description.size_bytes, 8 * MIB);
    assert_eq!(description.layout_generation, generation);
    assert_eq!(grow.await.unwrap().unwrap(), Response::Done);
    assert_eq!(volumes(&admin).await[0].size_bytes, 8 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_excludes_a_silent_holder_once_its_lease_runs_out() {
    let pool = Pool::start(1_000).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "db".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    let (a, mut events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let h = open(&a, "db", OpenMode::Exclusive).await.unwrap();

    // host-a gets the recall but never confirms nor renews.
    let started = tokio::time::Instant::now();
    let grown = admin.request(Request::VolumeGrow { name: "db".into(), size_bytes: 8 * MIB }).await.unwrap();
    assert_eq!(grown, Response::Done);
    assert!(started.elapsed().as_millis() >= 500, "the grow waited for the lease");
    assert!(matches!(events.recv().await, Some(ServerEvent::Recall { .. })));
    match events.recv().await {
        Some(ServerEvent::Revoked { handle, reason }) => {
            assert_eq!(handle, h.handle);
            assert!(reason.contains("lease") || reason.contains("confirmation"), "{reason}");
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    let v = volumes(&admin).await;
    assert_eq!(v[0].size_bytes, 8 * MIB);
    assert!(v[0].open_by.is_empty(), "{v:?}");
}

/// A commit that reaches some metadata copies but not all is refused, and
/// the copies that took it are superseded at once: a restart shows only what
/// was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_commit_does_not_resurface_after_a_restart() {
    let mut pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "kept".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    admin.request(Request::VolumeCreate { name: "also-kept".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    // The first copy takes the next generation; the last one refuses it.
    pool.devices.devices.last().unwrap().fail_writes.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = admin.request(Request::VolumeDelete { name: "also-kept".into() }).await.unwrap_err();
    assert_eq!(code(e).0, ErrorCode::CommitFailed);
    pool.devices.fail_writes(false);
    admin.close().await;
    pool.stop_server().await;
    pool.start_server().await;
    let admin = pool.admin().await;
    let names: Vec<String> = volumes(&admin).await.into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["kept", "also-kept"], "only acknowledged changes survive the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_report_answers_with_the_device_as_device_list_shows_it() {
    let pool = Pool::start(LEASE_MS).await;
    let (agent, _events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    // The server still reaches the device, so it only records the fallback.
    let report = Request::ReportDeviceFailure { device: DeviceIndex(0), reason: "cut by the test".into() };
    let reported = match agent.request(report).await.unwrap() {
        Response::Devices(d) => d,
        other => panic!("{other:?}"),
    };
    let listed = match pool.admin().await.request(Request::DeviceList).await.unwrap() {
        Response::Devices(d) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(reported.len(), 1);
    assert!(reported[0].extents_free > 0, "{reported:?}");
    assert_eq!(Some(&reported[0]), listed.iter().find(|d| d.index == DeviceIndex(0)));
}
