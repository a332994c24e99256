//! Protected channels against a real `sanvol-mds` (issue 16): a proxy on the
//! path that understands the connection layout (cleartext frames, then
//! records) flips a byte, replays, reorders, drops or injects a record of a
//! control connection, a data channel or a backup channel, in either
//! direction and either channel mode. Every tampering is detected by the
//! side that receives it, which logs which record failed and closes the
//! channel. A relay that runs its own key exchange with each side (a
//! man in the middle between two real sessions) is refused by both.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use blockio::client::{ClientOptions, NbdClient};
use blockio::BlockDevice;
use bytes::Bytes;
use control_client::channel::{self, ChannelIdentity};
use control_client::handshake::{self, HandshakeError};
use control_client::{keys, ChannelMode, ControlAddr, ControlClient, ControlClientError};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sanvol_tests::system::{pub_path, Stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use volume_format::control::auth::{AuthFailure, AuthOutcome, ClientProof, ConnectionKind, Role, ServerProof};
use volume_format::control::messages::{OpenMode, Request, Response, DATA_CHANNEL_PREAMBLE};
use volume_format::{DeviceIndex, VolumeId};

const MODES: [ChannelMode; 2] = [ChannelMode::Encrypted, ChannelMode::Integrity];
/// Longest a detection may take to show (a log line, a closed client).
const DETECT_TIMEOUT: Duration = Duration::from_secs(20);

// ---- the tampering proxy ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Flip one bit in the record's body.
    Flip,
    /// Forward the record, then the same bytes again.
    Replay,
    /// Hold the record and forward the next one first.
    Reorder,
    /// Forward a made-up record (of the same length) before it.
    Inject,
    /// Leave the record out.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    dir: Dir,
    /// Index of the record (in `dir`, counting from 0 after the handshake's
    /// cleartext frames) to tamper with.
    record: u64,
    action: Action,
}

/// Forwards connections from its socket to the server's, tampering with
/// one record of each connection as `plan` says.
struct TamperProxy {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl TamperProxy {
    fn start(dir: &Path, name: &str, target: PathBuf, channel: bool, plan: Plan) -> TamperProxy {
        let path = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = UnixStream::connect(&target).await else { return };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = (plan.dir == Dir::Up).then_some(plan);
                let down = (plan.dir == Dir::Down).then_some(plan);
                tokio::spawn(pump(cr, sw, channel, up));
                tokio::spawn(pump(sr, cw, false, down));
            }
        });
        TamperProxy { path, task }
    }

    fn addr(&self) -> ControlAddr {
        ControlAddr::Unix(self.path.clone())
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One direction: an optional preamble, the two cleartext frames of the
/// handshake (hello and Noise message, 4-byte lengths), then records
/// (2-byte lengths), one of which `plan` tampers with.
async fn pump(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, preamble: bool, plan: Option<Plan>) {
    let _ = pump_inner(&mut r, &mut w, preamble, plan).await;
    let _ = w.shutdown().await;
}

async fn pump_inner(
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
    preamble: bool,
    plan: Option<Plan>,
) -> std::io::Result<()> {
    if preamble {
        let mut p = [0u8; DATA_CHANNEL_PREAMBLE.len()];
        r.read_exact(&mut p).await?;
        w.write_all(&p).await?;
    }
    for _ in 0..2 {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        r.read_exact(&mut body).await?;
        w.write_all(&len).await?;
        w.write_all(&body).await?;
    }
    let mut held: Option<Vec<u8>> = None;
    let mut index = 0u64;
    loop {
        let mut len = [0u8; 2];
        r.read_exact(&mut len).await?;
        let mut record = len.to_vec();
        record.resize(2 + usize::from(u16::from_be_bytes(len)), 0);
        r.read_exact(&mut record[2..]).await?;
        let this = index;
        index += 1;
        let Some(plan) = plan.filter(|p| p.record == this) else {
            w.write_all(&record).await?;
            if let Some(h) = held.take() {
                w.write_all(&h).await?;
            }
            continue;
        };
        match plan.action {
            Action::Flip => {
                let at = 2 + (record.len() - 2) / 2;
                record[at] ^= 0x20;
                w.write_all(&record).await?;
            }
            Action::Replay => {
                w.write_all(&record).await?;
                w.write_all(&record).await?;
            }
            Action::Reorder => held = Some(record),
            Action::Inject => {
                let mut fake = record.clone();
                for (i, b) in fake[2..].iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(31).wrapping_add(7);
                }
                w.write_all(&fake).await?;
                w.write_all(&record).await?;
            }
            Action::Drop => {}
        }
    }
}

// ---- the stack and its keys ----

struct Keys {
    admin: SigningKey,
    server: VerifyingKey,
}

fn keys_of(stack: &Stack) -> Keys {
    let admin = keys::load_private(&stack.admin_key).unwrap();
    let (server, _) = keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    Keys { admin, server }
}

/// A one-device pool (64 MiB extents) with a volume `v` of one extent and a
/// snapshot `v@s`.
fn stack() -> Stack {
    let mut stack = Stack::new(1, "512M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "64M"]);
    stack.sanvol_ok(&["snapshot", "create", "v", "s"]);
    stack
}

async fn admin_via(addr: &ControlAddr, k: &Keys, mode: ChannelMode) -> ControlClient {
    let (c, _events) =
        ControlClient::connect_with_mode(addr, &k.admin, Some(&k.server), Role::Admin, "t", [1; 16], mode)
            .await
            .unwrap();
    assert_eq!(c.session().mode, mode);
    c
}

/// Waits until the server's log has a line with every one of `parts`
/// (appended since `from` bytes), polling the file it writes.
async fn mds_logs(stack: &Stack, from: usize, parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        let log = stack.mds_log();
        if let Some(line) = log.get(from..).unwrap_or("").lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no mds log line with {parts:?}; log:\n{log}");
        // The server is another process writing a file: nothing to await.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- client-side log capture (the client's detection line) ----

fn client_logs() -> &'static Arc<Mutex<String>> {
    static LOGS: OnceLock<Arc<Mutex<String>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(String::new()));
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        logs
    })
}

struct LogSink(Arc<Mutex<String>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let s = String::from_utf8_lossy(buf);
        eprint!("{s}");
        self.0.lock().unwrap().push_str(&s);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn client_log_has(parts: &[&str]) -> bool {
    client_logs().lock().unwrap().lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

// ---- control connections ----

/// Client records: 0 the proof, 1 the first request, 2 the second...
/// Server records: 0 its proof, 1 the welcome, 2 the first reply...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tampering_of_a_control_connection_is_detected_by_the_receiver() {
    client_logs();
    let stack = stack();
    let k = keys_of(&stack);
    let mut case = 0;
    for mode in MODES {
        for action in [Action::Flip, Action::Replay, Action::Reorder, Action::Inject, Action::Drop] {
            // Client → server: the server detects it.
            case += 1;
            let plan = Plan { dir: Dir::Up, record: 2, action };
            let proxy =
                TamperProxy::start(stack.dir.path(), &format!("up{case}"), stack.mds_socket.clone(), false, plan);
            let from = stack.mds_log().len();
            let admin = admin_via(&proxy.addr(), &k, mode).await;
            assert!(matches!(admin.request(Request::PoolStatus).await.unwrap(), Response::Pool(_)));
            // Two requests at once, so that a reordered or dropped record
            // has a successor to be checked against.
            let (a, b) = tokio::join!(admin.request(Request::VolumeList), admin.request(Request::PoolStatus));
            assert!(a.is_err() || b.is_err(), "{mode} {action:?}: a tampered request was answered");
            // A replayed record is checked as the one after it.
            let record = if action == Action::Replay { "record 3 failed" } else { "record 2 failed" };
            let line =
                mds_logs(&stack, from, &[record, &format!("failed its {mode} check"), "closing the channel"]).await;
            assert!(line.contains("control connection from"), "{line}");
            tokio::time::timeout(DETECT_TIMEOUT, admin.closed()).await.expect("the server closed the connection");

            // Server → client: the client detects it.
            case += 1;
            let plan = Plan { dir: Dir::Down, record: 3, action };
            let proxy2 =
                TamperProxy::start(stack.dir.path(), &format!("down{case}"), stack.mds_socket.clone(), false, plan);
            let admin = admin_via(&proxy2.addr(), &k, mode).await;
            admin.request(Request::PoolStatus).await.unwrap();
            let (a, b) = tokio::join!(admin.request(Request::VolumeList), admin.request(Request::PoolStatus));
            let _ = (a, b);
            if action == Action::Replay {
                // The replayed reply is record 4 on the client's side; one
                // more reply pulls it in.
                let _ = admin.request(Request::PoolStatus).await;
            }
            tokio::time::timeout(DETECT_TIMEOUT, admin.closed()).await.expect("the client closed the connection");
            assert!(
                client_log_has(&["control connection to the metadata server", &format!("failed its {mode} check")]),
                "{mode} {action:?}: no client-side log line"
            );
            drop((proxy, proxy2));
        }
    }
    // The server still serves everyone who is not tampered with.
    stack.sanvol_ok(&["pool", "status"]);
}

// ---- data and backup channels ----

fn identity<'a>(key: &'a SigningKey, pinned: &'a VerifyingKey, role: Role) -> ChannelIdentity<'a> {
    ChannelIdentity { key, pinned: Some(pinned), role, name: "test", instance: [2; 16] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_a_backup_or_data_channel_closes_it() {
    client_logs();
    let stack = stack();
    let k = keys_of(&stack);
    for mode in MODES {
        // A backup channel, tampered on the way to the server (an NBD read
        // request): the server detects it and closes the channel.
        // (Record 20: past the request and the NBD negotiation, among the reads.)
        let plan = Plan { dir: Dir::Up, record: 20, action: Action::Flip };
        let proxy = TamperProxy::start(stack.dir.path(), &format!("bu-{mode}"), stack.mds_socket.clone(), true, plan);
        let from = stack.mds_log().len();
        let who = identity(&k.admin, &k.server, Role::Admin);
        let (stream, _) = channel::open_with_mode(&proxy.addr(), &who, Request::BackupChannel, mode).await.unwrap();
        let nbd = NbdClient::connect_stream(stream, "v@s", ClientOptions::default()).await.unwrap();
        let mut failed = false;
        for i in 0..64u64 {
            if nbd.read(i * 65536, 65536).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "{mode}: reads went on over a tampered backup channel");
        let line = mds_logs(&stack, from, &["channel from", "failed its", "closing the channel"]).await;
        assert!(line.contains(&format!("{mode} check")), "{line}");

        // A backup channel, tampered on the way back (a read's data): the
        // client detects it.
        let plan = Plan { dir: Dir::Down, record: 30, action: Action::Flip };
        let proxy = TamperProxy::start(stack.dir.path(), &format!("bd-{mode}"), stack.mds_socket.clone(), true, plan);
        let (stream, _) = channel::open_with_mode(&proxy.addr(), &who, Request::BackupChannel, mode).await.unwrap();
        let nbd = NbdClient::connect_stream(stream, "v@s", ClientOptions::default()).await.unwrap();
        let mut failed = false;
        for i in 0..64u64 {
            if nbd.read(i * 65536, 65536).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "{mode}: a tampered read was returned");
        assert!(client_log_has(&["channel to the metadata server", &format!("failed its {mode} check")]));
    }

    // A data channel (an agent's fallback path), tampered on the way to the
    // server (a write): the server detects it; nothing reaches the device.
    let agent_key = stack.dir.path().join("agent.key");
    keys::generate(&agent_key, "agent").unwrap();
    stack.sanvol_ok(&["client", "add", pub_path(&agent_key).to_str().unwrap(), "--role", "agent", "--name", "a"]);
    let agent = keys::load_private(&agent_key).unwrap();
    let addr: ControlAddr = stack.mds_addr().parse().unwrap();
    let (control, _events) =
        ControlClient::connect(&addr, &agent, Some(&k.server), Role::Agent, "a", [3; 16]).await.unwrap();
    let Response::Opened(opened) =
        control.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await.unwrap()
    else {
        panic!("open")
    };
    let range = opened.description.extents[0].legs[0].offset;
    for mode in MODES {
        let plan = Plan { dir: Dir::Up, record: 20, action: Action::Flip };
        let proxy = TamperProxy::start(stack.dir.path(), &format!("du-{mode}"), stack.mds_socket.clone(), true, plan);
        let from = stack.mds_log().len();
        let who = identity(&agent, &k.server, Role::Agent);
        let request = Request::DataChannel { volume: VolumeId(opened.description.volume.0), device: DeviceIndex(0) };
        let (stream, _) = channel::open_with_mode(&proxy.addr(), &who, request, mode).await.unwrap();
        let nbd = NbdClient::connect_stream(stream, "", ClientOptions::default()).await.unwrap();
        let mut failed = false;
        for i in 0..64u64 {
            if nbd.write(range + i * 4096, Bytes::from(vec![0xee; 4096]), false).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "{mode}: writes went on over a tampered data channel");
        mds_logs(&stack, from, &["channel from", &format!("failed its {mode} check"), "closing the channel"]).await;
    }
    control.close().await;
}

// ---- a relay in the middle ----

/// A man in the middle between a real client and the real server: it
/// forwards the cleartext hellos, runs its own key exchange with each side
/// (Noise NN authenticates nobody by itself), and forwards the proofs.
async fn relay(client: UnixStream, server_socket: &Path) -> Result<(), HandshakeError> {
    let mut client = client;
    let mut server = UnixStream::connect(server_socket).await.unwrap();
    let hello = control_client::framed::read_payload(&mut client).await?;
    control_client::framed::write_payload(&mut server, &hello).await?;
    let server_hello = control_client::framed::read_payload(&mut server).await?;
    control_client::framed::write_payload(&mut client, &server_hello).await?;
    let prologue = volume_format::control::auth::noise_prologue(ConnectionKind::Control, &hello, &server_hello);
    let (to_server, to_client) = tokio::join!(
        handshake::noise_initiator(server, &prologue, ChannelMode::Encrypted),
        handshake::noise_responder(client, &prologue, |mode| volume_format::control::auth::NoiseAnswer::Proceed {
            mode
        })
    );
    let ((mut to_server, _), (mut to_client, _)) = (to_server?, to_client?);
    // Forward the server's proof, then whatever the client answers, then
    // the server's outcome.
    let proof: ServerProof = control_client::framed::read_message(&mut to_server).await?;
    control_client::framed::write_message(&mut to_client, &proof).await?;
    let answer: ClientProof = control_client::framed::read_message(&mut to_client).await?;
    control_client::framed::write_message(&mut to_server, &answer).await?;
    let outcome: AuthOutcome = control_client::framed::read_message(&mut to_server).await?;
    control_client::framed::write_message(&mut to_client, &outcome).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_between_two_real_sessions_is_refused_by_both_sides() {
    let stack = stack();
    let k = keys_of(&stack);
    let relay_path = stack.dir.path().join("relay.sock");
    let listener = UnixListener::bind(&relay_path).unwrap();
    let server_socket = stack.mds_socket.clone();
    let relays = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (c, _) = listener.accept().await.unwrap();
            results.push(relay(c, &server_socket).await);
        }
        results
    });
    let relay_addr = ControlAddr::Unix(relay_path);

    // A real client, with the server's key pinned: the server's proof was
    // made for the relay's key exchange, not the client's.
    let e = ControlClient::connect(&relay_addr, &k.admin, Some(&k.server), Role::Admin, "victim", [4; 16])
        .await
        .err()
        .expect("the relayed handshake fails");
    let ControlClientError::Handshake { source, .. } = e else { panic!("{e}") };
    assert!(matches!(source, HandshakeError::BadServerSignature), "{source}");
    assert!(source.to_string().contains("relaying"), "{source}");

    // A client that does not check the server's proof (as a victim that
    // did would never send its own): its proof was made for its own key
    // exchange, and the server refuses it.
    let mut s = UnixStream::connect(match &relay_addr {
        ControlAddr::Unix(p) => p.clone(),
        _ => unreachable!(),
    })
    .await
    .unwrap();
    let who = handshake::ClientHandshake {
        key: &k.admin,
        pinned: None,
        role: Role::Admin,
        name: "careless",
        instance: [5; 16],
        mode: ChannelMode::Encrypted,
        kind: ConnectionKind::Control,
    };
    let hellos = handshake::client_hellos(&mut s, &who.hello(), ConnectionKind::Control).await.unwrap();
    let (mut secure, hash) = handshake::noise_initiator(s, &hellos.prologue, ChannelMode::Encrypted).await.unwrap();
    let _unchecked: ServerProof = control_client::framed::read_message(&mut secure).await.unwrap();
    let proof = ClientProof {
        signature: k.admin.sign(&volume_format::control::auth::client_binding(&hash)).to_bytes().to_vec(),
    };
    let outcome = handshake::prove_client(&mut secure, &proof).await;
    let Err(HandshakeError::Refused { failure, reason }) = outcome else { panic!("{outcome:?}") };
    assert_eq!(failure, AuthFailure::BadSignature);
    assert!(reason.contains("relayed"), "{reason}");
    mds_logs(&stack, 0, &["control handshake failed", "does not verify for this connection"]).await;
    relays.await.unwrap();
}

// ---- modes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_interoperate_and_a_server_can_require_encryption() {
    let mut stack = stack();
    let k = keys_of(&stack);
    let addr: ControlAddr = stack.mds_addr().parse().unwrap();
    for mode in MODES {
        let admin = admin_via(&addr, &k, mode).await;
        assert!(matches!(admin.request(Request::VolumeList).await.unwrap(), Response::Volumes(_)));
        let who = identity(&k.admin, &k.server, Role::Admin);
        let (stream, _) = channel::open_with_mode(&addr, &who, Request::BackupChannel, mode).await.unwrap();
        let nbd = NbdClient::connect_stream(stream, "v@s", ClientOptions::default()).await.unwrap();
        assert_eq!(nbd.read(0, 1 << 20).await.unwrap(), Bytes::from(vec![0u8; 1 << 20]));
        nbd.disconnect().await;
        admin.close().await;
    }

    // The CLI asks for what SANVOL_CHANNEL_MODE says.
    let out = std::process::Command::new(sanvol_tests::system::bin("sanvol"))
        .env("SANVOL_MDS", stack.mds_addr())
        .env("SANVOL_KEY", &stack.admin_key)
        .env("SANVOL_SERVER_KEY", pub_path(&stack.mds_key))
        .env("SANVOL_CHANNEL_MODE", "integrity")
        .args(["pool", "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    mds_logs(&stack, 0, &["control session authenticated", "mode", "integrity"]).await;

    // channel_mode_min = "encrypted": integrity-only clients are refused
    // with a sentence that says what to change.
    stack.kill_mds();
    stack.mds_config_extra.push("channel_mode_min = \"encrypted\"".into());
    stack.start_mds();
    let e = ControlClient::connect_with_mode(
        &addr,
        &k.admin,
        Some(&k.server),
        Role::Admin,
        "t",
        [1; 16],
        ChannelMode::Integrity,
    )
    .await
    .err()
    .expect("refused");
    let ControlClientError::Handshake { source: HandshakeError::Refused { failure, reason }, .. } = e else {
        panic!("{e}")
    };
    assert_eq!(failure, AuthFailure::ChannelMode);
    assert!(reason.contains("requires encrypted channels") && reason.contains("SANVOL_CHANNEL_MODE"), "{reason}");
    admin_via(&addr, &k, ChannelMode::Encrypted).await.close().await;
}

// ---- a standby server ----

/// A standby `sanvol-mds` (one active server per pool) is reached over the
/// same protected channels and admission limits as the active one: in both
/// modes a control session and a backup channel are refused with
/// `NotActive` naming the active server (the refusal itself travels in
/// records), and a peer's silent connections are closed to make room and
/// by the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_refuses_with_not_active_over_protected_channels_and_limits_idle_peers() {
    use metadata_server::server::admission::{HANDSHAKE_DEADLINE, PREAUTH_PER_PEER_MAX};
    use volume_format::control::messages::ErrorCode;

    let stack = stack();
    let standby = stack.start_server(2);
    let k = keys_of(&stack);
    let addr: ControlAddr = standby.addr().parse().unwrap();

    // Until the standby has seen the active server's lease it keeps
    // connections in its listen queue; then it answers every request.
    let not_active = |e: ControlClientError| match e {
        ControlClientError::Server(e) if e.code == ErrorCode::NotActive => e.message,
        other => panic!("expected NotActive from the standby, got {other}"),
    };
    for mode in MODES {
        let admin = tokio::time::timeout(DETECT_TIMEOUT, admin_via(&addr, &k, mode)).await.expect("standby answers");
        let why = not_active(admin.request(Request::PoolStatus).await.unwrap_err());
        assert!(why.contains("standing by") && why.contains("mds-1"), "{mode}: {why}");
        // The session stays open: the next request is refused the same way.
        not_active(admin.request(Request::VolumeList).await.unwrap_err());
        admin.close().await;

        let who = identity(&k.admin, &k.server, Role::Admin);
        match channel::open_with_mode(&addr, &who, Request::BackupChannel, mode).await {
            Err(channel::ChannelError::Refused(e)) if e.code == ErrorCode::NotActive => {
                assert!(e.message.contains("mds-1"), "{mode}: {}", e.message)
            }
            Err(e) => panic!("{mode}: a backup channel to the standby failed otherwise: {e}"),
            Ok(_) => panic!("{mode}: the standby served a backup channel"),
        }
    }

    // More silent connections from this peer than it may hold before
    // authenticating: the admin still gets its answer, and the standby
    // closes every silent one.
    let mut idle = Vec::new();
    for _ in 0..PREAUTH_PER_PEER_MAX + 8 {
        idle.push(UnixStream::connect(&standby.socket).await.unwrap());
    }
    let admin = admin_via(&addr, &k, ChannelMode::Encrypted).await;
    not_active(admin.request(Request::PoolStatus).await.unwrap_err());
    admin.close().await;
    let all_closed = async {
        for mut s in idle {
            let mut buf = [0u8; 64];
            // Closed by the server: end of stream (or a reset), never bytes.
            if let Ok(n) = s.read(&mut buf).await {
                assert_eq!(n, 0, "a silent connection to the standby got bytes");
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_DEADLINE + DETECT_TIMEOUT, all_closed)
        .await
        .expect("the standby closed every silent connection by its handshake deadline");
    assert!(standby.proc.log().contains("standing by"), "{}", standby.proc.log());
}
