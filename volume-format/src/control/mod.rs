//! The control protocol between agents/admins and the metadata server.
//!
//! A control connection carries length-prefixed bincode frames
//! ([`frame`]). It opens with a cleartext version exchange, a Noise
//! handshake that gives both sides fresh session keys, and a mutual ed25519
//! proof over the handshake hash ([`auth`]): the server proves the key the
//! client pinned, the client proves a key the pool authorizes, and both
//! proofs are bound to this connection's keys, so they can be neither
//! replayed nor relayed. From then on every byte travels in protected
//! records ([`record`]): encrypted, or integrity-only where the pool allows
//! it. Inside them, the client sends [`messages::ClientMessage`]s and the
//! server answers with [`messages::ServerMessage`]s, which also carry
//! unsolicited events (recalls, new layouts). Data and backup channels run
//! the same handshake and carry NBD in the same records.
//!
//! Everything here is pure: encoding, decoding and the exact bytes that get
//! signed. Signing and verifying live with the processes that hold keys.

pub mod auth;
pub mod frame;
pub mod messages;
pub mod record;
pub mod resume;

/// The protocol version this build speaks.
///
/// Bump it on **every** change to what crosses the wire (a variant added,
/// removed or reordered, a field changed): `tests/wire_golden.rs` pins the
/// encoding of every message variant and fails until the bump and its
/// regenerated golden file are in. One line per bump:
/// - 1: initial — hello/auth, admin operations, open/lease/recall/publish;
///   later (without a bump, which renumbered tags) resumes, handovers,
///   data and backup channels, snapshots.
/// - 2: ids as newtypes and device state typed on the wire (same bytes for
///   ids); `Publish` boxes its description; the version-1 renumbering made
///   explicit: version-1 peers are refused at the handshake.
/// - 3: one active metadata server per pool (`Request::Handoff`,
///   `ServerEvent::Redirect`, `ErrorCode::NotActive`, `PoolInfo::servers`)
///   and protected channels — a Noise handshake after the cleartext hellos,
///   proofs over its hash, every byte after it in encrypted or
///   integrity-only records; `ServerHello::Noise`, channel modes.
/// - 4: devices that come back (`DeviceEndpoint::resyncing`,
///   `DeviceState::Resyncing`) and recovery in listings
///   (`DeviceInfo::recovery`, `VolumeInfo::health`). A version-3 agent would
///   not write to a resyncing leg: refused.
/// - 5: admin reconfiguration — `Request::DeviceAdd`, `DeviceEvacuate`,
///   `DeviceRemove`, `DeviceReplace`, `VolumeMirrorAdd`,
///   `VolumeMirrorRemove`, `VolumeMove`, `Operations` and
///   `Response::Operations` (`OperationInfo`), all variants added last: a
///   version-4 peer's messages encode the same, so version 4 is still
///   accepted (the admin CLI asks for the new requests only from a server
///   that negotiated 5).
/// - 6: mirrored write-back caches — `Request::VolumeCache` (admin),
///   `MirrorOpen`, `MirrorAppend`, `MirrorRelease` (agent),
///   `Response::MirrorOpened` and `Mirrored`, all variants added last: a
///   version-5 peer's messages encode the same, so 4 and 5 are still
///   accepted (agents mirror, and admins set caches, only with a server
///   that negotiated 6).
/// - 7: agents' capabilities for fencing devices — `Request::Capabilities`
///   (agent) and `Response::Capabilities` (`DeviceCapability`), added last:
///   4 to 6 are still accepted (an agent asks only a server that
///   negotiated 7, and only when a device of its volume fences).
/// - 8: the write-intent log of mirrored volumes — `Request::IntentRecord`,
///   `Request::IntentResync` and `Response::IntentRecorded`, variants added
///   last: older peers' messages encode the same, so 4 to 7 are still
///   accepted (an agent keeps no intent log with a server that negotiated
///   less than 8).
/// - 9: whether devices fence in listings — `Request::DeviceFencing`
///   (admin) and `Response::DeviceFencing` (`DeviceFencing`), added last:
///   4 to 8 are still accepted (the admin CLI asks only a server that
///   negotiated 9).
/// - 10: the state of write-back caches — `Request::VolumeCacheShow` (admin)
///   and `Response::VolumeCacheState` (`CacheStateInfo`), added last: 4 to 9
///   are still accepted (`sanvol volume show` asks only a server that
///   negotiated 10).
/// - 11: byte-range locks on shared volumes — `Request::Lock` (agent),
///   `Response::Locked` and `ServerEvent::Locks` (`LockTable`), added last:
///   4 to 10 are still accepted (an agent asks only a server that
///   negotiated 11, and only when it was told to lock).
/// - 12: recovery status pushed to holders — `ServerEvent::Recovery`
///   (`RecoveryStatus`), added last: 4 to 11 are still accepted (the
///   server tells only holders that negotiated 12).
/// - 13: giving up a lost cache mirror — `Request::MirrorForget` (admin),
///   added last: 4 to 12 are still accepted (the admin CLI asks only a
///   server that negotiated 13).
/// - 14: the holder's view of a write-back cache — `Request::CacheReport`
///   (agent), `Request::VolumeCacheReport` (admin) and
///   `Response::CacheReported` (`ReportedCache`), added last: 4 to 13 are
///   still accepted (an agent reports, and the admin CLI asks, only a
///   server that negotiated 14).
/// - 15: mirroring restarted with the holder's state —
///   `Request::MirrorStage` and `Request::MirrorOpenStaged` (agent), added
///   last: 4 to 14 are still accepted (an agent stages only with a server
///   that negotiated 15; with an older one it destages everything before it
///   mirrors afresh, as before).
/// - 16: one server fetches a cache mirror from another —
///   `Request::MirrorFetch`, `Response::MirrorChunk` and the `server` role
///   (`ClientRole::Server`: the pool's server key, never stored as a
///   client), added last: 4 to 15 are still accepted (a server fetches only
///   from a server that negotiated 16).
/// - 17: where a cache mirror is recorded — `Request::VolumeCacheMirror`
///   (admin) and `Response::CacheMirrorRecorded` (`RecordedMirror`), added
///   last: 4 to 16 are still accepted (`sanvol volume show` asks only a
///   server that negotiated 17).
pub const PROTOCOL_VERSION: u32 = 17;
/// The first protocol version with [`messages::Request::VolumeCacheMirror`].
pub const CACHE_MIRROR_SHOW_PROTOCOL_MIN: u32 = 17;
/// The first protocol version with [`messages::Request::MirrorFetch`].
pub const MIRROR_FETCH_PROTOCOL_MIN: u32 = 16;
/// The first protocol version with [`messages::Request::MirrorStage`].
pub const MIRROR_STAGE_PROTOCOL_MIN: u32 = 15;
/// The first protocol version with [`messages::Request::CacheReport`].
pub const CACHE_REPORT_PROTOCOL_MIN: u32 = 14;
/// The first protocol version with [`messages::Request::MirrorForget`].
pub const MIRROR_FORGET_PROTOCOL_MIN: u32 = 13;
/// The first protocol version with [`messages::ServerEvent::Recovery`].
pub const RECOVERY_PROTOCOL_MIN: u32 = 12;
/// The first protocol version with [`messages::Request::Lock`].
pub const LOCKS_PROTOCOL_MIN: u32 = 11;
/// The first protocol version with [`messages::Request::VolumeCacheShow`].
pub const CACHE_STATE_PROTOCOL_MIN: u32 = 10;

/// The oldest protocol version this build still accepts: a peer outside
/// `PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION` is refused at the handshake
/// with both ranges named ("upgrade the older side").
///
/// Version 2 sent everything after the handshake unprotected: a version-2
/// peer is refused, never served in the clear.
pub const PROTOCOL_VERSION_MIN: u32 = 4;
