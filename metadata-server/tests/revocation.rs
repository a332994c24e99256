//! Revocation that bites (issue 16): removing a key or changing its role
//! closes every session, data channel and backup channel of that key at
//! once, and a data channel ends with the handle it was granted for — not a
//! lease later (the lease here is a minute, far longer than any wait).

mod common;

use std::time::Duration;

use blockio::client::{ClientOptions, NbdClient};
use blockio::BlockDevice;
use common::{key, wait_for_log, Pool, MIB};
use control_client::channel::{self, ChannelIdentity};
use control_client::ControlClient;
use volume_format::control::auth::Role;
use volume_format::control::messages::{OpenMode, Request, Response};
use volume_format::DeviceIndex;

/// Longer than any wait below: whatever closes a connection here is the
/// change itself, never a lease running out.
const LEASE_MS: u64 = 60_000;
/// How long a closed connection may take to show it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

async fn closed(client: &ControlClient, what: &str) {
    tokio::time::timeout(CLOSE_TIMEOUT, client.closed()).await.unwrap_or_else(|_| panic!("{what} was not closed"));
}

/// Reads until a read fails (the channel was closed under it).
async fn fails(nbd: &NbdClient, what: &str) {
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    loop {
        if nbd.read(0, 4096).await.is_err() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} still serves reads");
        // Polling a remote close with real reads: nothing else to await.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn backup_channel(pool: &Pool, key: &ed25519_dalek::SigningKey, role: Role) -> NbdClient {
    let who = ChannelIdentity { key, pinned: Some(&pool.server_key.public), role, name: "backup", instance: [9; 16] };
    let (stream, _) = channel::open(&pool.addr(), &who, Request::BackupChannel).await.unwrap();
    NbdClient::connect_stream(stream, "v@s", ClientOptions::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_role_changes_close_every_connection_of_the_key_at_once() {
    let pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "v".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    admin.request(Request::SnapshotCreate { volume: "v".into(), name: "s".into() }).await.unwrap();
    let backup = key(pool.dir.path(), "backup");
    let authorize = |k: &common::Key, role| Request::ClientAuthorize {
        key: k.public.to_bytes(),
        name: "backup-job".into(),
        role,
        volumes: Vec::new(),
    };
    admin.request(authorize(&backup, Role::Backup)).await.unwrap();

    // A backup key with a control session and two backup channels.
    let (session, _) = pool.connect(&backup, Role::Backup, "job").await;
    let one = backup_channel(&pool, &backup.signing, Role::Backup).await;
    let two = backup_channel(&pool, &backup.signing, Role::Backup).await;
    assert_eq!(one.read(0, 4096).await.unwrap().len(), 4096);
    // Another key's backup channel, which must stay open.
    let admins = backup_channel(&pool, &pool.admin.signing, Role::Admin).await;

    admin.request(Request::ClientRevoke { key: backup.public.to_bytes() }).await.unwrap();
    closed(&session, "the revoked key's control session").await;
    fails(&one, "the revoked key's first backup channel").await;
    fails(&two, "the revoked key's second backup channel").await;
    wait_for_log(&["closing the connection: its key was revoked", "Channel"]).await;
    assert_eq!(admins.read(0, 4096).await.unwrap().len(), 4096, "another key's channel is untouched");

    // A role change closes the key's sessions too: the backup key comes back
    // as an agent key (its backup channel must not outlive that), and an
    // agent key becomes an admin.
    admin.request(authorize(&backup, Role::Backup)).await.unwrap();
    let (session, _) = pool.connect(&backup, Role::Backup, "job").await;
    let three = backup_channel(&pool, &backup.signing, Role::Backup).await;
    admin.request(authorize(&backup, Role::Agent)).await.unwrap();
    closed(&session, "the re-roled key's control session").await;
    fails(&three, "the re-roled key's backup channel").await;
    wait_for_log(&["closing the connection: its key's role changed from backup to agent"]).await;
    let (agent_b, _) = pool.connect(&pool.agent_b, Role::Agent, "host-b").await;
    admin
        .request(Request::ClientAuthorize {
            key: pool.agent_b.public.to_bytes(),
            name: "host-b".into(),
            role: Role::Admin,
            volumes: Vec::new(),
        })
        .await
        .unwrap();
    closed(&agent_b, "the agent-turned-admin's agent session").await;
    assert!(matches!(admin.request(Request::PoolStatus).await.unwrap(), Response::Pool(_)), "the admin stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_channel_ends_with_its_handle() {
    let pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "v".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    let (agent, _events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let Response::Opened(opened) =
        agent.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await.unwrap()
    else {
        panic!("open")
    };
    let device = opened.description.extents[0].legs[0].device;
    let offset = opened.description.extents[0].legs[0].offset;
    let who = ChannelIdentity {
        key: &pool.agent_a.signing,
        pinned: Some(&pool.server_key.public),
        role: Role::Agent,
        name: "host-a",
        instance: [7; 16],
    };
    let open_channel = || async {
        let request = Request::DataChannel { volume: opened.description.volume, device };
        let (stream, _) = channel::open(&pool.addr(), &who, request).await.unwrap();
        NbdClient::connect_stream(stream, "", ClientOptions::default()).await.unwrap()
    };
    let nbd = open_channel().await;
    assert_eq!(nbd.read(offset, 4096).await.unwrap().len(), 4096);

    // Closing the handle ends the channel at once (the lease is a minute).
    agent.request(Request::Close { handle: opened.handle }).await.unwrap();
    fails(&nbd, "the data channel of a closed handle").await;
    wait_for_log(&["closing the connection: the handle its data channel was granted for ended"]).await;

    // Without a handle there is no channel to be had either.
    let request = Request::DataChannel { volume: opened.description.volume, device: DeviceIndex(device.0) };
    let e = channel::open(&pool.addr(), &who, request).await.err().expect("refused");
    assert!(e.to_string().contains("holds no open handle"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_backup_key_reads_only_its_volumes_snapshots() {
    let pool = Pool::start(LEASE_MS).await;
    let admin = pool.admin().await;
    for v in ["db", "web", "logs"] {
        admin.request(Request::VolumeCreate { name: v.into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
        admin.request(Request::SnapshotCreate { volume: v.into(), name: "s".into() }).await.unwrap();
    }
    let backup = key(pool.dir.path(), "backup");
    let (ok, out, err) = common::run(pool.cli().args([
        "client",
        "add",
        backup.public_path.to_str().unwrap(),
        "--role",
        "backup",
        "--volumes",
        "db,web",
    ]))
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("for volumes db, web"), "{out}");
    let (ok, out, err) = common::run(pool.cli().args(["client", "list", "--json"])).await;
    assert!(ok, "{err}");
    let clients: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed = clients.as_array().unwrap().iter().find(|c| c["name"] == "backup").expect("listed");
    assert_eq!(listed["volumes"], serde_json::json!(["db", "web"]), "{out}");

    // Only db's and web's snapshots exist for it.
    let (session, _) = pool.connect(&backup, Role::Backup, "job").await;
    let Response::Snapshots(list) = session.request(Request::SnapshotList { volume: None }).await.unwrap() else {
        panic!("list")
    };
    let mut seen: Vec<&str> = list.iter().map(|s| s.volume.as_str()).collect();
    seen.sort_unstable();
    assert_eq!(seen, ["db", "web"]);
    let who = |k| ChannelIdentity {
        key: k,
        pinned: Some(&pool.server_key.public),
        role: Role::Backup,
        name: "b",
        instance: [1; 16],
    };
    let open = |export: &'static str| {
        let who = who(&backup.signing);
        let addr = pool.addr();
        async move {
            let (stream, _) = channel::open(&addr, &who, Request::BackupChannel).await.unwrap();
            NbdClient::connect_stream(stream, export, ClientOptions::default()).await
        }
    };
    let db = open("db@s").await.expect("db@s is in scope");
    assert!(open("logs@s").await.is_err(), "logs@s is not in scope");

    // Narrowing the scope closes its channels; reopened, web is gone too.
    admin
        .request(Request::ClientAuthorize {
            key: backup.public.to_bytes(),
            name: "backup".into(),
            role: Role::Backup,
            volumes: vec!["db".into()],
        })
        .await
        .unwrap();
    fails(&db, "a backup channel whose key's scope narrowed").await;
    closed(&session, "the re-scoped key's control session").await;
    wait_for_log(&["closing the connection: its key's volume scope changed"]).await;
    assert!(open("web@s").await.is_err(), "web@s left the scope");
    open("db@s").await.expect("db@s is still in scope").disconnect().await;

    // Only backup keys are scoped.
    let e = admin
        .request(Request::ClientAuthorize {
            key: pool.agent_a.public.to_bytes(),
            name: "host-a".into(),
            role: Role::Agent,
            volumes: vec!["db".into()],
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("scopes backup keys"), "{e}");
}
