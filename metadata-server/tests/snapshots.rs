//! Snapshot requests against an embedded server: create/list/delete and
//! copy-on-write registrations, including the refusals an agent (or a bad
//! peer) can run into.

mod common;

use common::Pool;
use control_client::ControlClientError;
use volume_format::control::auth::Role;
use volume_format::control::messages::{ErrorCode, OpenMode, Request, Response, SnapshotInfo};
use volume_format::{HandleId, SnapshotId};

const LEASE_MS: u64 = 10_000;

fn code(e: ControlClientError) -> (ErrorCode, String) {
    match e {
        ControlClientError::Server(e) => (e.code, e.message),
        other => panic!("expected a server error, got {other}"),
    }
}

async fn snapshots(admin: &control_client::ControlClient) -> Vec<SnapshotInfo> {
    match admin.request(Request::SnapshotList { volume: None }).await.unwrap() {
        Response::Snapshots(s) => s,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_checked_committed_and_idempotent() {
    let pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "v".into(), size_bytes: 4 << 20, legs: 1 }).await.unwrap();
    let (agent, events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let opened = match agent.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await.unwrap() {
        Response::Opened(o) => o,
        other => panic!("{other:?}"),
    };
    assert!(opened.description.snapshot.is_none());
    let handle = opened.handle;

    // No snapshot yet: nothing to register into.
    let e = code(
        agent.request(Request::CowRegister { handle, snapshot: SnapshotId(1), chunks: vec![0] }).await.unwrap_err(),
    );
    assert_eq!(e.0, ErrorCode::InvalidArgument, "{e:?}");

    // A snapshot while the agent holds the volume: the server recalls it
    // (the test plays the agent and confirms).
    let create = tokio::spawn({
        let admin = admin.clone();
        async move { admin.request(Request::SnapshotCreate { volume: "v".into(), name: "s1".into() }).await }
    });
    let mut events = events;
    let generation = match events.recv().await.unwrap() {
        volume_format::control::messages::ServerEvent::Recall { handle: h, generation } if h == handle => generation,
        other => panic!("{other:?}"),
    };
    agent.request(Request::RecallDone { handle, generation }).await.unwrap();
    create.await.unwrap().unwrap();
    let description = match events.recv().await.unwrap() {
        volume_format::control::messages::ServerEvent::Publish { handle: h, description } if h == handle => description,
        other => panic!("{other:?}"),
    };
    let epoch = description.snapshot.expect("the published layout names the snapshot");
    assert_eq!((epoch.name.as_str(), epoch.cow.count()), ("s1", 0));
    let snapshot = epoch.id;

    let chunks = epoch.chunk_count();
    let refused = [
        (Request::CowRegister { handle, snapshot, chunks: vec![chunks] }, ErrorCode::InvalidArgument),
        (
            Request::CowRegister { handle, snapshot: SnapshotId(snapshot.0 + 1), chunks: vec![0] },
            ErrorCode::InvalidArgument,
        ),
        (Request::CowRegister { handle: HandleId(handle.0 + 100), snapshot, chunks: vec![0] }, ErrorCode::NotFound),
    ];
    for (request, expected) in refused {
        let e = code(agent.request(request.clone()).await.unwrap_err());
        assert_eq!(e.0, expected, "{request:?}: {e:?}");
    }
    // Admins cannot register; agents cannot snapshot.
    let e = code(admin.request(Request::CowRegister { handle, snapshot, chunks: vec![0] }).await.unwrap_err());
    assert_eq!(e.0, ErrorCode::PermissionDenied);
    let e = code(agent.request(Request::SnapshotCreate { volume: "v".into(), name: "x".into() }).await.unwrap_err());
    assert_eq!(e.0, ErrorCode::PermissionDenied);

    let registered = agent.request(Request::CowRegister { handle, snapshot, chunks: vec![3, 5, 3] }).await.unwrap();
    assert_eq!(registered, Response::CowRegistered { new: 2 });
    let again = agent.request(Request::CowRegister { handle, snapshot, chunks: vec![5] }).await.unwrap();
    assert_eq!(again, Response::CowRegistered { new: 0 });
    assert_eq!(snapshots(&admin).await[0].cow_chunks, 2);

    // Committed: a restarted server still has them (and the snapshot).
    let mut pool = pool;
    agent.request(Request::Close { handle }).await.unwrap();
    agent.close().await;
    admin.close().await;
    pool.stop_server().await;
    pool.start_server().await;
    let admin = pool.admin().await;
    let list = snapshots(&admin).await;
    assert_eq!((list[0].name.as_str(), list[0].cow_chunks, list[0].export.as_str()), ("s1", 2, "v@s1"));

    // Names are checked; deleting the volume needs its snapshots gone.
    let e = code(admin.request(Request::SnapshotCreate { volume: "v".into(), name: "a@b".into() }).await.unwrap_err());
    assert_eq!(e.0, ErrorCode::InvalidArgument, "{e:?}");
    let e = code(admin.request(Request::SnapshotCreate { volume: "v".into(), name: "s1".into() }).await.unwrap_err());
    assert_eq!(e.0, ErrorCode::InvalidArgument, "{e:?}");
    let e = code(admin.request(Request::SnapshotDelete { volume: "v".into(), name: "nope".into() }).await.unwrap_err());
    assert_eq!(e.0, ErrorCode::NotFound, "{e:?}");
    let e = code(admin.request(Request::VolumeDelete { name: "v".into() }).await.unwrap_err());
    assert_eq!(e.0, ErrorCode::Busy, "{e:?}");
}
