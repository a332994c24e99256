//! The owner never waits on bulk data I/O: a server-side job held in
//! flight (a shared writer's pre-image copy stuck on a device read) does not
//! delay any other agent's lease renewal, nor changes to other volumes;
//! only registrations on the copying volume wait for it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Pool;
use volume_format::control::auth::Role;
use volume_format::control::messages::{OpenMode, Request, Response, ServerEvent};
use volume_format::SnapshotId;

/// Short, so that a stalled owner would let the bystander's lease lapse
/// within the test.
const LEASE_MS: u64 = 600;

fn opened(r: Response) -> volume_format::control::messages::OpenedHandle {
    match r {
        Response::Opened(o) => o,
        other => panic!("expected Opened, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_in_flight_starves_no_lease_renewal() {
    let pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    for name in ["v", "w"] {
        admin.request(Request::VolumeCreate { name: name.into(), size_bytes: 4 << 20, legs: 1 }).await.unwrap();
    }
    // The bystander: host-a holds w.
    let (a, mut a_events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let a_handle = opened(a.request(Request::Open { volume: "w".into(), mode: OpenMode::Exclusive }).await.unwrap());
    // The shared writer: host-b holds v, which gets a snapshot (host-b
    // confirms the recall like an agent).
    let (b, mut b_events) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    let b_handle = opened(b.request(Request::Open { volume: "v".into(), mode: OpenMode::SharedWrite }).await.unwrap());
    let create = tokio::spawn({
        let admin = admin.clone();
        async move { admin.request(Request::SnapshotCreate { volume: "v".into(), name: "s".into() }).await }
    });
    let generation = match b_events.recv().await.unwrap() {
        ServerEvent::Recall { generation, .. } => generation,
        other => panic!("{other:?}"),
    };
    b.request(Request::RecallDone { handle: b_handle.handle, generation }).await.unwrap();
    create.await.unwrap().unwrap();
    let snapshot = match b_events.recv().await.unwrap() {
        ServerEvent::Publish { description, .. } => description.snapshot.expect("the snapshot is published").id,
        other => panic!("{other:?}"),
    };

    // Hold every read of the data area: the server's copy of the pre-image
    // of v's first chunk blocks on it.
    let data_start = b_handle.description.extents[0].legs[0].offset.min(a_handle.description.extents[0].legs[0].offset);
    for d in &pool.devices.devices {
        d.hold_reads_from(data_start);
    }
    let copy = tokio::spawn({
        let b = b.clone();
        let handle = b_handle.handle;
        async move { b.request(Request::CowCopy { handle, snapshot, chunks: vec![0] }).await }
    });
    let held = async {
        loop {
            let notified: Vec<_> = pool.devices.devices.iter().map(|d| d.read_held.notified()).collect();
            if pool.devices.devices.iter().any(|d| d.reads_held.load(Ordering::SeqCst) > 0) {
                return;
            }
            futures::future::select_all(notified.into_iter().map(Box::pin)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), held).await.expect("the copy job reads the device");

    // For five lease periods, host-a renews every third of a lease; each
    // renewal is answered well within the lease, and its handle lives on.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(5 * LEASE_MS) {
        let sent = tokio::time::Instant::now();
        let renewed = a.request_with_timeout(Request::Renew, Duration::from_millis(LEASE_MS / 2)).await;
        assert!(
            matches!(renewed, Ok(Response::Lease { .. })),
            "a renewal {:?} into the job was not answered within half a lease: {renewed:?}",
            started.elapsed()
        );
        tokio::time::sleep_until(sent + Duration::from_millis(LEASE_MS / 3)).await;
    }
    assert!(!copy.is_finished(), "the copy is still held on the device read");
    // Changes elsewhere go on: a new volume is committed, host-a's volume
    // can be closed and opened again.
    admin.request(Request::VolumeCreate { name: "x".into(), size_bytes: 4 << 20, legs: 1 }).await.unwrap();
    // Registrations on the copying volume wait for the copy.
    let register = tokio::spawn({
        let b = b.clone();
        let handle = b_handle.handle;
        async move { b.request(Request::CowRegister { handle, snapshot, chunks: vec![1] }).await }
    });
    let shown = match admin.request(Request::VolumeShow { name: "w".into() }).await.unwrap() {
        Response::Volume(v) => v.info.open_by,
        other => panic!("{other:?}"),
    };
    assert!(shown[0].contains("host-a") && shown[0].contains("active"), "{shown:?}");
    assert!(!register.is_finished(), "a registration on v must wait for the copy of v's chunks");

    // Release the device: the copy finishes and is registered, then the
    // waiting registration.
    for d in &pool.devices.devices {
        d.hold_reads_from(u64::MAX);
    }
    assert_eq!(copy.await.unwrap().unwrap(), Response::CowRegistered { new: 1 });
    assert_eq!(register.await.unwrap().unwrap(), Response::CowRegistered { new: 1 });
    assert!(a_events.try_recv().is_err(), "host-a got no event (no revoke) during the job");
    a.request(Request::Close { handle: a_handle.handle }).await.unwrap();
    let again = a.request(Request::Open { volume: "w".into(), mode: OpenMode::Exclusive }).await.unwrap();
    assert!(matches!(again, Response::Opened(_)));
    let listed = match admin.request(Request::SnapshotList { volume: Some("v".into()) }).await.unwrap() {
        Response::Snapshots(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!((listed[0].id, listed[0].cow_chunks), (SnapshotId(snapshot.0), 2));
}
