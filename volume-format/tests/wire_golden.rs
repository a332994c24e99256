//! Golden bytes of every control-protocol message variant.
//!
//! Why: the control protocol is bincode over serde, where a variant's tag is
//! its position in the enum. Inserting a variant in the middle silently
//! renumbers every later one, and a peer of the previous build then reads
//! `Close` as `RecallDone`. These tests pin the encoding of one sample of
//! every `Request`, `Response`, `ServerEvent` and `ErrorCode` variant (and
//! the message envelopes) in `tests/golden/control-messages.txt`, so any
//! change to the wire shows up as a failing test.
//!
//! A new variant does not compile until it has a sample here (the
//! `samples!` macro matches exhaustively). A deliberate change to the wire
//! must bump `PROTOCOL_VERSION` (with its one-line note in
//! `volume_format::control`); then regenerate the file with
//! `SANVOL_BLESS=1 cargo test -p volume-format --test wire_golden` and
//! review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use uuid::Uuid;
use volume_format::capability::{Capability, Holder, SignedCapability};
use volume_format::control::auth::{
    self, AuthFailure, AuthOutcome, ChannelMode, ClientHello, ClientProof, ConnectionKind, NoiseAnswer, NoiseRequest,
    Role, ServerHello, ServerProof, HELLO_MAGIC,
};
use volume_format::control::frame::encode_payload;
use volume_format::control::messages::{
    CacheMode, CacheStateInfo, ClientInfo, ClientMessage, ControlError, DataChannelGrant, DeviceCapability,
    DeviceFencing, DeviceInfo, ErrorCode, HolderCacheReport, MirrorRecord, OpenMode, OpenedHandle, OperationInfo,
    PoolInfo, RecordedMirror, RecoveryStatus, ReportedCache, Request, Response, ServerEvent, ServerInfo, ServerMessage,
    SnapshotInfo, VolumeCache, VolumeDetail, VolumeInfo,
};
use volume_format::control::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};
use volume_format::description::{DeviceEndpoint, SnapshotEpoch};
use volume_format::label::ByteRange;
use volume_format::locks::{HandleLocks, LockRange, LockTable};
use volume_format::metadata::snapshot::CowMap;
use volume_format::metadata::{DeviceState, LogicalExtent, PhysicalExtent};
use volume_format::{DeviceIndex, HandleId, SnapshotId, VolumeDescription, VolumeId};

fn holder_cache_report() -> HolderCacheReport {
    HolderCacheReport {
        state: "write-through".into(),
        why: "the mirror did not answer".into(),
        dirty_bytes: 1 << 20,
        log_used_bytes: 2 << 20,
        log_capacity_bytes: 32 << 20,
        destage_bytes_per_sec: 4 << 20,
        destaged_bytes: 64 << 20,
    }
}

/// One sample per variant, named `Type::Variant`. The inner `name` function
/// matches every variant without a wildcard: adding a variant to the enum
/// fails to compile here until it gets a sample.
macro_rules! samples {
    ($fn_name:ident, $ty:ident { $($variant:ident => $sample:expr),+ $(,)? }) => {
        fn $fn_name() -> Vec<(String, $ty)> {
            fn name(v: &$ty) -> &'static str {
                match v {
                    $($ty::$variant { .. } => stringify!($variant),)+
                }
            }
            let samples: Vec<(&'static str, $ty)> = vec![$((stringify!($variant), $sample)),+];
            samples
                .into_iter()
                .map(|(claimed, sample)| {
                    assert_eq!(name(&sample), claimed, "the sample listed as {claimed} is another variant");
                    (format!("{}::{}", stringify!($ty), claimed), sample)
                })
                .collect()
        }
    };
}

fn description() -> VolumeDescription {
    let legs = |e: u64| LogicalExtent {
        legs: vec![
            PhysicalExtent { device: DeviceIndex(0), offset: (10 + e) << 20 },
            PhysicalExtent { device: DeviceIndex(1), offset: (20 + e) << 20 },
        ],
    };
    VolumeDescription {
        pool_uuid: Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
        volume: VolumeId(7),
        name: "db".into(),
        size_bytes: 2 << 20,
        block_bytes: 4096,
        extent_bytes: 1 << 20,
        mirror_legs: 2,
        layout_generation: 3,
        devices: (0..2)
            .map(|i| DeviceEndpoint {
                index: DeviceIndex(i),
                device_uuid: Uuid::from_u128(u128::from(i) + 1),
                uri: format!("nbd://h{i}:10809/d"),
                online: i == 0,
                resyncing: i == 1,
            })
            .collect(),
        extents: vec![legs(0), legs(1)],
        snapshot: Some(SnapshotEpoch {
            id: SnapshotId(4),
            name: "s".into(),
            size_bytes: 2 << 20,
            chunk_bytes: 64 << 10,
            cow_extents: vec![legs(2), legs(3)],
            cow: CowMap::new(32),
        }),
    }
}

fn volume_info() -> VolumeInfo {
    VolumeInfo {
        name: "db".into(),
        id: VolumeId(7),
        size_bytes: 2 << 20,
        legs: 2,
        extents: 2,
        layout_generation: 3,
        open_by: vec!["host-a (exclusive, handle 5, active)".into()],
        fallback: vec![],
        health: "resyncing: device 1, 1 of 2 extents copied".into(),
    }
}

samples!(requests, Request {
    PoolStatus => Request::PoolStatus,
    Renew => Request::Renew,
    DeviceList => Request::DeviceList,
    ClientList => Request::ClientList,
    ClientAuthorize => Request::ClientAuthorize {
        key: [0xaa; 32],
        name: "backup-job".into(),
        role: Role::Backup,
        volumes: vec!["db".into(), "web".into()],
    },
    ClientRevoke => Request::ClientRevoke { key: [0xaa; 32] },
    VolumeCreate => Request::VolumeCreate { name: "db".into(), size_bytes: 1 << 30, legs: 2 },
    VolumeList => Request::VolumeList,
    VolumeShow => Request::VolumeShow { name: "db".into() },
    VolumeDelete => Request::VolumeDelete { name: "db".into() },
    VolumeGrow => Request::VolumeGrow { name: "db".into(), size_bytes: 2 << 30 },
    SnapshotCreate => Request::SnapshotCreate { volume: "db".into(), name: "s".into() },
    SnapshotList => Request::SnapshotList { volume: Some("db".into()) },
    SnapshotDelete => Request::SnapshotDelete { volume: "db".into(), name: "s".into() },
    Open => Request::Open { volume: "db".into(), mode: OpenMode::Exclusive },
    Close => Request::Close { handle: HandleId(5) },
    RecallDone => Request::RecallDone { handle: HandleId(5), generation: 3 },
    Resume => Request::Resume { key: vec![1, 2, 3] },
    Handover => Request::Handover { handle: HandleId(5), to_key: [0xbb; 32] },
    OpenHandover => Request::OpenHandover { token: vec![4, 5] },
    CowRegister => Request::CowRegister { handle: HandleId(5), snapshot: SnapshotId(4), chunks: vec![0, 9] },
    CowCopy => Request::CowCopy { handle: HandleId(5), snapshot: SnapshotId(4), chunks: vec![1] },
    DataChannel => Request::DataChannel { volume: VolumeId(7), device: DeviceIndex(1) },
    ReportDeviceFailure => Request::ReportDeviceFailure { device: DeviceIndex(1), reason: "reset".into() },
    ReportDeviceRecovered => Request::ReportDeviceRecovered { device: DeviceIndex(1) },
    BackupChannel => Request::BackupChannel,
    Handoff => Request::Handoff { to: Some("mds-b".into()) },
    DeviceAdd => Request::DeviceAdd { uri: "nbd://10.0.0.9:10809/disk9".into(), force: true },
    DeviceEvacuate => Request::DeviceEvacuate { device: DeviceIndex(2) },
    DeviceRemove => Request::DeviceRemove { device: DeviceIndex(3) },
    DeviceReplace => Request::DeviceReplace { device: DeviceIndex(1), uri: "nbd://h/new".into(), force: false },
    VolumeMirrorAdd => Request::VolumeMirrorAdd { name: "db".into() },
    VolumeMirrorRemove => Request::VolumeMirrorRemove { name: "db".into(), device: Some(DeviceIndex(4)) },
    VolumeMove => Request::VolumeMove { name: "db".into(), from: DeviceIndex(0), to: None },
    Operations => Request::Operations,
    VolumeCache => Request::VolumeCache { name: "db".into(), size_bytes: 1 << 30, mode: Some(CacheMode::Mirrored) },
    MirrorOpen => Request::MirrorOpen { handle: HandleId(5) },
    MirrorAppend => Request::MirrorAppend {
        handle: HandleId(5),
        records: vec![MirrorRecord { seq: 3, offset: 4096, data: vec![1, 2, 3] }],
    },
    MirrorRelease => Request::MirrorRelease { handle: HandleId(5), upto_seq: 3 },
    Capabilities => Request::Capabilities { handle: HandleId(5) },
    IntentRecord => Request::IntentRecord { handle: HandleId(5), mark: vec![3, 4], clear: vec![1] },
    IntentResync => Request::IntentResync { handle: HandleId(5) },
    DeviceFencing => Request::DeviceFencing,
    VolumeCacheShow => Request::VolumeCacheShow { name: "db".into() },
    Lock => Request::Lock { handle: HandleId(5), ranges: vec![LockRange { start: 0, len_bytes: 1 << 20 }] },
    MirrorForget => Request::MirrorForget { name: "db".into() },
    CacheReport => Request::CacheReport { handle: HandleId(5), report: holder_cache_report() },
    VolumeCacheReport => Request::VolumeCacheReport { name: "db".into() },
    MirrorStage => Request::MirrorStage {
        handle: HandleId(5),
        copy: 0x0123_4567_89ab_cdef,
        records: vec![MirrorRecord { seq: 3, offset: 4096, data: vec![1, 2, 3] }],
    },
    MirrorOpenStaged => Request::MirrorOpenStaged { handle: HandleId(5), copy: 0x0123_4567_89ab_cdef, records: 1 },
    MirrorFetch => Request::MirrorFetch { volume: VolumeId(4), generation: 3, offset: 4 << 20 },
    VolumeCacheMirror => Request::VolumeCacheMirror { name: "db".into() },
});

samples!(responses, Response {
    Done => Response::Done,
    Pool => Response::Pool(PoolInfo {
        pool_uuid: "u".into(),
        name: "demo".into(),
        generation: 9,
        extent_bytes: 1 << 20,
        servers: vec![ServerInfo {
            name: "mds-a".into(),
            host_id: 1,
            role: "active".into(),
            since_unix_ms: 1_700_000_000_000,
            addrs: vec!["10.0.0.2:7700".into()],
        }],
        devices: 3,
        devices_failed: 1,
        volumes: 2,
        capacity_bytes: 3 << 30,
        free_bytes: 1 << 30,
        server_key: "k".into(),
    }),
    Devices => Response::Devices(vec![
        DeviceInfo {
            index: DeviceIndex(0),
            uuid: "u0".into(),
            uri: "nbd://h0:10809/d".into(),
            size_bytes: 1 << 30,
            extents_total: 1000,
            extents_free: 10,
            state: DeviceState::Online,
            reachable: true,
            recovery: String::new(),
        },
        DeviceInfo {
            index: DeviceIndex(1),
            uuid: "u1".into(),
            uri: "nbd://h1:10809/d".into(),
            size_bytes: 1 << 30,
            extents_total: 1000,
            extents_free: 0,
            state: DeviceState::Failed { reason: "gone".into(), since_unix_secs: 1_700_000_000 },
            reachable: false,
            recovery: "failed: next probe in 4.0 s".into(),
        },
        DeviceInfo {
            index: DeviceIndex(2),
            uuid: "u2".into(),
            uri: "nbd://h2:10809/d".into(),
            size_bytes: 1 << 30,
            extents_total: 1000,
            extents_free: 0,
            state: DeviceState::Resyncing { since_unix_secs: 1_700_000_000 },
            reachable: true,
            recovery: "resyncing: 3 of 10 extents copied".into(),
        },
    ]),
    Clients => Response::Clients(vec![ClientInfo {
        name: "host-a".into(),
        key: "aa".into(),
        role: Role::Agent,
        connected: 1,
        handles: vec!["db (exclusive, handle 5, active)".into()],
        fallback: vec![],
        volumes: vec!["db".into()],
    }]),
    Volumes => Response::Volumes(vec![volume_info()]),
    Volume => Response::Volume(VolumeDetail { info: volume_info(), description: description() }),
    Lease => Response::Lease { lease_ms: 10_000 },
    Opened => Response::Opened(OpenedHandle {
        handle: HandleId(5),
        mode: OpenMode::SharedWrite,
        description: description(),
        lease_ms: 10_000,
        resume_key: vec![9; 4],
    }),
    HandoverToken => Response::HandoverToken { token: vec![1; 4], expires_in_ms: 120_000 },
    DataChannel => Response::DataChannel(DataChannelGrant {
        volume: VolumeId(7),
        device: DeviceIndex(1),
        layout_generation: 3,
        read_only: false,
        ranges: vec![(20 << 20, 1 << 20)],
    }),
    Snapshots => Response::Snapshots(vec![SnapshotInfo {
        volume: "db".into(),
        name: "s".into(),
        id: SnapshotId(4),
        export: "db@s".into(),
        created_at_unix_secs: 1_700_000_000,
        created_generation: 8,
        size_bytes: 2 << 20,
        chunk_bytes: 64 << 10,
        cow_chunks: 2,
        reserved_bytes: 4 << 20,
        newest: true,
    }]),
    CowRegistered => Response::CowRegistered { new: 2 },
    Operations => Response::Operations(vec![OperationInfo {
        what: "evacuate device 2".into(),
        state: "copying volume db".into(),
        volume: Some("db".into()),
        volumes_done: 1,
        volumes_total: 3,
        extents_done: 4,
        extents_total: 9,
        bytes_done: 5 << 20,
        bytes_total: 9 << 20,
        elapsed_ms: 1234,
    }]),
    MirrorOpened => Response::MirrorOpened {
        cache: Some(VolumeCache { volume: VolumeId(7), size_bytes: 1 << 30, mode: CacheMode::Mirrored }),
    },
    Mirrored => Response::Mirrored { upto_seq: 3 },
    Capabilities => Response::Capabilities {
        handle: HandleId(5),
        layout_generation: 4,
        devices: vec![DeviceCapability {
            device: DeviceIndex(1),
            capability: SignedCapability {
                capability: Capability {
                    holder: Holder::Handle(HandleId(5)),
                    generation: 1,
                    device_uuid: Some(Uuid::from_u128(0x11)),
                    writable: vec![ByteRange::new(1 << 20, 2 << 20)],
                    issued_unix_secs: 1_700_000_000,
                    expires_unix_secs: 1_700_086_400,
                },
                signer: volume_format::PublicKey([7; 32]),
                signature: vec![9; 64],
            },
        }],
    },
    IntentRecorded => Response::IntentRecorded,
    DeviceFencing => Response::DeviceFencing(vec![
        DeviceFencing { device: DeviceIndex(0), fences: Some(true) },
        DeviceFencing { device: DeviceIndex(1), fences: Some(false) },
        DeviceFencing { device: DeviceIndex(2), fences: None },
    ]),
    VolumeCacheState => Response::VolumeCacheState(CacheStateInfo {
        cache: Some(VolumeCache { volume: VolumeId(7), size_bytes: 1 << 30, mode: CacheMode::Mirrored }),
        holder: Some("host-a (handle 5)".into()),
        mirroring: true,
        held_records: 3,
        held_bytes: 12288,
    }),
    Locked => Response::Locked(lock_table()),
    CacheReported => Response::CacheReported(Some(ReportedCache {
        holder: "host-a (handle 3)".into(),
        report: holder_cache_report(),
        age_ms: 1500,
    })),
    MirrorChunk => Response::MirrorChunk { generation: 3, total_bytes: 8 << 20, data: vec![0xa5; 8] },
    CacheMirrorRecorded => Response::CacheMirrorRecorded(Some(RecordedMirror {
        server: "mds-1".into(),
        generation: 5,
        pending: true,
    })),
});

samples!(events, ServerEvent {
    Recall => ServerEvent::Recall { handle: HandleId(5), generation: 4 },
    Publish => ServerEvent::Publish { handle: HandleId(5), description: Box::new(description()) },
    Revoked => ServerEvent::Revoked { handle: HandleId(5), reason: "broken by host-b".into() },
    Redirect => ServerEvent::Redirect { addrs: vec!["unix:/run/mds-b.sock".into()], reason: "handoff".into() },
    Locks => ServerEvent::Locks { handle: HandleId(5), locks: lock_table() },
    Recovery => ServerEvent::Recovery {
        handle: HandleId(5),
        status: Some(RecoveryStatus { what: "resync of device 2".into(), online: true, bytes_done: 1 << 20, bytes_total: 64 << 20 }),
    },
});

fn lock_table() -> LockTable {
    LockTable {
        holders: vec![HandleLocks {
            handle: HandleId(5),
            holder: "host-a".into(),
            ranges: vec![LockRange { start: 4096, len_bytes: 8192 }],
        }],
    }
}

samples!(error_codes, ErrorCode {
    NotFound => ErrorCode::NotFound,
    AlreadyExists => ErrorCode::AlreadyExists,
    InvalidArgument => ErrorCode::InvalidArgument,
    PermissionDenied => ErrorCode::PermissionDenied,
    NoSpace => ErrorCode::NoSpace,
    Conflict => ErrorCode::Conflict,
    Busy => ErrorCode::Busy,
    CommitFailed => ErrorCode::CommitFailed,
    Unavailable => ErrorCode::Unavailable,
    Internal => ErrorCode::Internal,
    HandleBroken => ErrorCode::HandleBroken,
    NotActive => ErrorCode::NotActive,
});

samples!(server_messages, ServerMessage {
    Reply => ServerMessage::Reply { id: 3, result: Err(ControlError::new(ErrorCode::Conflict, "held")) },
    Event => ServerMessage::Event(ServerEvent::Recall { handle: HandleId(5), generation: 4 }),
});

// ---- the handshake (protocol 3: cleartext hellos, Noise, proofs) ----

samples!(server_hellos, ServerHello {
    Accept => ServerHello::Accept { version: 2, server_key: [0x11; 32], nonce: [0x22; 32], signature: vec![0x33; 64] },
    Refuse => ServerHello::Refuse { failure: AuthFailure::VersionMismatch, reason: "upgrade".into() },
    Noise => ServerHello::Noise { version: 3 },
});

samples!(noise_answers, NoiseAnswer {
    Proceed => NoiseAnswer::Proceed { mode: ChannelMode::Integrity },
    Refuse => NoiseAnswer::Refuse { failure: AuthFailure::ChannelMode, reason: "encrypted only".into() },
});

samples!(outcomes, AuthOutcome {
    Welcome => AuthOutcome::Welcome { session: 5, lease_ms: 10_000 },
    Refused => AuthOutcome::Refused { failure: AuthFailure::UnknownKey, reason: "who".into() },
});

samples!(auth_failures, AuthFailure {
    UnknownKey => AuthFailure::UnknownKey,
    WrongRole => AuthFailure::WrongRole,
    BadSignature => AuthFailure::BadSignature,
    VersionMismatch => AuthFailure::VersionMismatch,
    Malformed => AuthFailure::Malformed,
    Unavailable => AuthFailure::Unavailable,
    ChannelMode => AuthFailure::ChannelMode,
});

samples!(channel_modes, ChannelMode {
    Integrity => ChannelMode::Integrity,
    Encrypted => ChannelMode::Encrypted,
});

fn client_hello() -> ClientHello {
    ClientHello {
        magic: HELLO_MAGIC,
        version: 3,
        version_min: 3,
        role: Role::Agent,
        client_key: [0xaa; 32],
        nonce: [0xbb; 32],
        name: "host-a".into(),
        instance: [0xcc; 16],
    }
}

/// The handshake's messages and the exact bytes it binds and signs.
fn handshake_encodings() -> Vec<(String, Vec<u8>)> {
    let hello = encode_payload(&client_hello()).unwrap();
    let server_hello = encode_payload(&ServerHello::Noise { version: 3 }).unwrap();
    let mut out = vec![
        ("ClientHello".to_string(), hello.clone()),
        ("NoiseRequest".into(), encode_payload(&NoiseRequest { mode: ChannelMode::Encrypted }).unwrap()),
        (
            "ServerProof".into(),
            encode_payload(&ServerProof { server_key: [0x44; 32], signature: vec![0x55; 64] }).unwrap(),
        ),
        ("ClientProof".into(), encode_payload(&ClientProof { signature: vec![0x66; 64] }).unwrap()),
        ("noise_prologue(Control)".into(), auth::noise_prologue(ConnectionKind::Control, &hello, &server_hello)),
        ("noise_prologue(Channel)".into(), auth::noise_prologue(ConnectionKind::Channel, &hello, &server_hello)),
        ("server_binding".into(), auth::server_binding(&[0x77; 32])),
        ("client_binding".into(), auth::client_binding(&[0x77; 32])),
    ];
    let enums = server_hellos()
        .into_iter()
        .map(|(n, v)| (n, encode_payload(&v).unwrap()))
        .chain(noise_answers().into_iter().map(|(n, v)| (n, encode_payload(&v).unwrap())))
        .chain(outcomes().into_iter().map(|(n, v)| (n, encode_payload(&v).unwrap())))
        .chain(auth_failures().into_iter().map(|(n, v)| (n, encode_payload(&v).unwrap())))
        .chain(channel_modes().into_iter().map(|(n, v)| (n, encode_payload(&v).unwrap())));
    out.extend(enums);
    out
}

/// Every sample's name and its encoding (hex), in a stable order.
fn encodings() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |name: String, bytes: Vec<u8>| {
        assert!(out.insert(name.clone(), hex(&bytes)).is_none(), "two samples named {name}");
    };
    for (name, r) in requests() {
        put(name, encode_payload(&r).unwrap());
    }
    for (name, r) in responses() {
        put(name, encode_payload(&r).unwrap());
    }
    for (name, e) in events() {
        put(name, encode_payload(&e).unwrap());
    }
    for (name, c) in error_codes() {
        put(name, encode_payload(&c).unwrap());
    }
    for (name, m) in server_messages() {
        put(name, encode_payload(&m).unwrap());
    }
    put("ClientMessage".into(), encode_payload(&ClientMessage { id: 3, request: Request::Renew }).unwrap());
    for (name, bytes) in handshake_encodings() {
        put(format!("handshake:{name}"), bytes);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/control-messages.txt")
}

fn render(encodings: &BTreeMap<String, String>) -> String {
    let mut text = format!(
        "# Golden encodings of the sanvol control protocol, version {PROTOCOL_VERSION}.\n\
         # Generated by tests/wire_golden.rs (SANVOL_BLESS=1); see its module doc before changing.\n"
    );
    for (name, hex) in encodings {
        text.push_str(&format!("{name} {hex}\n"));
    }
    text
}

#[test]
fn every_message_variant_encodes_exactly_as_pinned() {
    let now = encodings();
    if std::env::var_os("SANVOL_BLESS").is_some() {
        std::fs::create_dir_all(golden_path().parent().unwrap()).unwrap();
        std::fs::write(golden_path(), render(&now)).unwrap();
        return;
    }
    let pinned_text = std::fs::read_to_string(golden_path())
        .unwrap_or_else(|e| panic!("{}: {e} (generate it with SANVOL_BLESS=1)", golden_path().display()));
    assert!(
        pinned_text
            .starts_with(&format!("# Golden encodings of the sanvol control protocol, version {PROTOCOL_VERSION}.\n")),
        "the golden file was written for another protocol version than {PROTOCOL_VERSION}: \
         a wire change needs a version bump and a regenerated file"
    );
    let pinned: BTreeMap<String, String> = pinned_text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, hex) = l.split_once(' ').expect("NAME HEX lines");
            (name.to_string(), hex.to_string())
        })
        .collect();
    let mut problems = Vec::new();
    for (name, hex) in &now {
        match pinned.get(name) {
            None => problems.push(format!("{name}: new, not pinned yet")),
            Some(p) if p != hex => problems.push(format!("{name}: encodes as\n  {hex}\nbut was pinned as\n  {p}")),
            Some(_) => {}
        }
    }
    for name in pinned.keys().filter(|n| !now.contains_key(*n)) {
        problems.push(format!("{name}: pinned but no longer sampled (a variant was removed?)"));
    }
    assert!(
        problems.is_empty(),
        "the control protocol's encoding changed (bump PROTOCOL_VERSION and regenerate with SANVOL_BLESS=1 \
         if that was deliberate):\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_sample_decodes_back_to_itself() {
    use volume_format::control::frame::decode_payload;
    for (name, r) in requests() {
        assert_eq!(decode_payload::<Request>(&encode_payload(&r).unwrap()).unwrap(), r, "{name}");
    }
    for (name, r) in responses() {
        assert_eq!(decode_payload::<Response>(&encode_payload(&r).unwrap()).unwrap(), r, "{name}");
    }
    for (name, e) in events() {
        assert_eq!(decode_payload::<ServerEvent>(&encode_payload(&e).unwrap()).unwrap(), e, "{name}");
    }
}

#[test]
fn device_state_is_typed_on_the_wire_and_text_in_json_listings() {
    let Response::Devices(devices) = &responses().into_iter().find(|(n, _)| n == "Response::Devices").unwrap().1 else {
        unreachable!()
    };
    let json = serde_json::to_value(devices).unwrap();
    assert_eq!(json[0]["state"], "online");
    assert_eq!(json[1]["state"], "failed: gone");
    assert_eq!(json[1]["index"], 1, "ids are plain numbers in JSON");
    let back: Vec<DeviceInfo> = serde_json::from_value(json).unwrap();
    assert_eq!(back[1].state, DeviceState::Failed { reason: "gone".into(), since_unix_secs: 0 });
    // On the wire the reason and the time survive.
    let wire: Vec<DeviceInfo> =
        volume_format::control::frame::decode_payload(&encode_payload(devices).unwrap()).unwrap();
    assert_eq!(&wire, devices);
}

/// A peer of any version reads the cleartext refusal: `Refuse` keeps its
/// tag (1) and shape, so an old client is told to upgrade, not confused.
#[test]
fn the_cleartext_refusal_keeps_its_tag_for_every_version() {
    let bytes =
        encode_payload(&ServerHello::Refuse { failure: AuthFailure::VersionMismatch, reason: "r".into() }).unwrap();
    assert_eq!(bytes, [0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, b'r']);
}

#[test]
fn the_protocol_version_range_refuses_version_2_peers() {
    // Version 2 sent everything after the handshake unprotected: it must be
    // refused at the hello, never served in the clear.
    const { assert!(PROTOCOL_VERSION_MIN >= 3) };
    assert_eq!(volume_format::control::auth::negotiate_version(2, 2, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION), None);
}

#[test]
fn the_protocol_version_range_refuses_version_1_peers() {
    // Version 1 numbered `SnapshotList` and later variants differently (the
    // snapshot requests were inserted in the middle); a v1 peer must be
    // refused at the handshake, not misread.
    const { assert!(PROTOCOL_VERSION_MIN >= 2) };
    const { assert!(PROTOCOL_VERSION >= PROTOCOL_VERSION_MIN) };
    assert_eq!(volume_format::control::auth::negotiate_version(1, 1, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION), None);
}
