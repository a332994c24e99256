//! Requests, replies and events on an authenticated control connection.
//!
//! The client numbers its requests; the server answers each with a
//! [`ServerMessage::Reply`] carrying the same id, in any order, and may send
//! [`ServerMessage::Event`]s at any time (recalls, new layouts). The
//! listing types are also what the admin CLI prints with `--json`, so their
//! field names are part of the user interface: keep them stable.

use serde::{Deserialize, Serialize};

use super::auth::Role;
use crate::metadata::DeviceState;
use crate::{DeviceIndex, HandleId, SnapshotId, VolumeDescription, VolumeId};

/// How a volume is opened (the same type the pool metadata stores in its
/// handle records).
pub use crate::metadata::OpenMode;

impl std::fmt::Display for OpenMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpenMode::ReadOnly => "read-only",
            OpenMode::SharedWrite => "shared-write",
            OpenMode::Exclusive => "exclusive",
        })
    }
}

impl std::str::FromStr for OpenMode {
    type Err = String;
    fn from_str(s: &str) -> Result<OpenMode, String> {
        match s {
            "ro" | "read-only" | "readonly" => Ok(OpenMode::ReadOnly),
            "shared" | "shared-write" | "rw-shared" => Ok(OpenMode::SharedWrite),
            "exclusive" | "rw" | "excl" => Ok(OpenMode::Exclusive),
            other => Err(format!("unknown open mode {other:?}: expected read-only, shared-write or exclusive")),
        }
    }
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMessage {
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    // ---- any role ----
    /// Pool summary; also renews the session's lease like every request.
    PoolStatus,
    /// Renews the session's lease (and every handle it holds).
    Renew,

    // ---- admin ----
    DeviceList,
    ClientList,
    /// Authorizes a key, or changes its name, role or scope. `volumes`:
    /// for a backup key, the volumes whose snapshots it may read (empty:
    /// every volume); must be empty for other roles.
    ClientAuthorize {
        key: [u8; 32],
        name: String,
        role: Role,
        volumes: Vec<String>,
    },
    ClientRevoke {
        key: [u8; 32],
    },
    VolumeCreate {
        name: String,
        size_bytes: u64,
        legs: u8,
    },
    VolumeList,
    VolumeShow {
        name: String,
    },
    VolumeDelete {
        name: String,
    },
    VolumeGrow {
        name: String,
        size_bytes: u64,
    },
    /// Takes a snapshot of `volume` at a recall point (holders drain, the
    /// server commits, holders resume copying pre-images into it).
    SnapshotCreate {
        volume: String,
        name: String,
    },
    /// Snapshots of one volume, or of every volume (admin or backup role).
    SnapshotList {
        volume: Option<String>,
    },
    /// Deletes a snapshot; pre-images an older snapshot still needs are
    /// moved into it first.
    SnapshotDelete {
        volume: String,
        name: String,
    },

    // ---- agent ----
    Open {
        volume: String,
        mode: OpenMode,
    },
    Close {
        handle: HandleId,
    },
    /// The agent has drained and holds I/O for `handle` as the server asked
    /// in a [`ServerEvent::Recall`] for `generation`.
    RecallDone {
        handle: HandleId,
        generation: u64,
    },
    /// Re-attaches this session to the handle a resume key names (after a
    /// reconnect, or as a *duplicate handle* on a second channel). Answered
    /// with [`Response::Opened`] when nothing changed, or
    /// [`ErrorCode::HandleBroken`] when another client opened the volume.
    Resume {
        key: Vec<u8>,
    },
    /// Issues a single-use, short-lived token with which the agent holding
    /// `to_key` may attach `handle`'s volume alongside this holder (live
    /// migration). Answered with [`Response::HandoverToken`].
    Handover {
        handle: HandleId,
        to_key: [u8; 32],
    },
    /// Opens a volume with a handover token issued to this agent's key.
    OpenHandover {
        token: Vec<u8>,
    },
    /// The agent holding `handle` has copied these chunks' pre-images into
    /// the COW area of `snapshot` (the volume's newest); the server commits
    /// them to the snapshot's COW map before answering
    /// [`Response::CowRegistered`], and only then may the agent overwrite.
    CowRegister {
        handle: HandleId,
        snapshot: SnapshotId,
        chunks: Vec<u64>,
    },
    /// Like `CowRegister`, but the server copies the pre-images itself
    /// (serialized with every other registration): what agents holding a
    /// volume shared-write use, since another writer may already have
    /// registered and overwritten a chunk they are about to copy.
    CowCopy {
        handle: HandleId,
        snapshot: SnapshotId,
        chunks: Vec<u64>,
    },

    // ---- agent: fallback data path ----
    /// Asks for a grant to do `volume`'s I/O on `device` through the server.
    /// As an ordinary request it only answers what would be granted; as the
    /// first request of a data channel (see [`DATA_CHANNEL_PREAMBLE`]) an OK
    /// answer switches that connection to NBD.
    DataChannel {
        volume: VolumeId,
        device: DeviceIndex,
    },
    /// The agent's direct path to `device` failed (`reason`); it now sends
    /// that device's I/O through the server. The server checks whether it
    /// still reaches the device itself, and marks it failed if not.
    ReportDeviceFailure {
        device: DeviceIndex,
        reason: String,
    },
    /// The agent's direct path to `device` works again.
    ReportDeviceRecovered {
        device: DeviceIndex,
    },

    // ---- admin or backup: the backup pseudo-device ----
    /// As the first request of a data channel (see
    /// [`DATA_CHANNEL_PREAMBLE`]): an OK answer switches the connection to
    /// NBD (fixed newstyle) serving every snapshot of the pool as a
    /// read-only export named [`snapshot_export_name`] (`VOLUME@SNAPSHOT`).
    BackupChannel,

    // ---- admin: availability ----
    /// Hands the pool over to a standby metadata server (by name or host id;
    /// `None`: any standing by): the active server stops taking changes,
    /// passes the disk lease on and redirects its clients there.
    Handoff {
        to: Option<String>,
    },

    // ---- admin: reconfiguration (protocol 5) ----
    /// Labels the device at `uri` for this pool and adds its space. A
    /// device carrying anything (a filesystem, another pool's label) is
    /// refused unless `force`.
    DeviceAdd {
        uri: String,
        force: bool,
    },
    /// Moves every extent off `device` (volume by volume, each at a recall
    /// point); nothing new is placed on it meanwhile. Answered when done;
    /// [`Request::Operations`] shows progress.
    DeviceEvacuate {
        device: DeviceIndex,
    },
    /// Removes a device that holds no extent and no metadata copy.
    DeviceRemove {
        device: DeviceIndex,
    },
    /// Adds the device at `uri`, moves every extent of `device` onto it,
    /// then removes `device`.
    DeviceReplace {
        device: DeviceIndex,
        uri: String,
        force: bool,
    },
    /// Adds a mirror leg to every extent of the volume (copied from a leg
    /// that serves reads).
    VolumeMirrorAdd {
        name: String,
    },
    /// Removes a mirror leg from every extent: the one on `device` if
    /// given, else one on a device that is not online, else the last.
    VolumeMirrorRemove {
        name: String,
        device: Option<DeviceIndex>,
    },
    /// Moves the volume's legs on `from` to `to` (or anywhere else).
    VolumeMove {
        name: String,
        from: DeviceIndex,
        to: Option<DeviceIndex>,
    },
    /// The reconfiguration running now, if any, with its progress.
    Operations,

    // ---- admin: write-back caches (protocol 6) ----
    /// Sets the volume's write-back cache (`mode` `None`: turns it off).
    /// Committed at a recall point: its holders destage their caches first.
    VolumeCache {
        name: String,
        size_bytes: u64,
        mode: Option<CacheMode>,
    },

    // ---- agent: the server's mirror of a write-back cache (protocol 6) ----
    /// Starts mirroring `handle`'s volume afresh: the server drops what its
    /// mirror of the volume holds (the holder has everything it logged on
    /// the devices, or replayed its own log). Answered with
    /// [`Response::MirrorOpened`] and the volume's cache setting. Only the
    /// holder of a writable handle may mirror.
    MirrorOpen {
        handle: HandleId,
    },
    /// Cached writes to keep until the holder releases them: the server
    /// appends them to its mirror of the volume with one write and one
    /// fdatasync (with any other appends waiting) and answers
    /// [`Response::Mirrored`] once they are durable. Sequence numbers
    /// rise across appends.
    MirrorAppend {
        handle: HandleId,
        records: Vec<MirrorRecord>,
    },
    /// Every mirrored write with a sequence number up to `upto_seq` is on
    /// the devices: the server frees its copies.
    MirrorRelease {
        handle: HandleId,
        upto_seq: u64,
    },

    // ---- agent: fencing devices (protocol 7) ----
    /// Capabilities for `handle` on every device its volume has extents on
    /// (see [`crate::capability`]): what the agent presents on its own
    /// connections to devices that fence (`sanvol-target`). Answered with
    /// [`Response::Capabilities`]; only the key holding the handle may ask.
    Capabilities {
        handle: HandleId,
    },

    // ---- agent: the write-intent log of mirrored volumes (protocol 8) ----
    /// The write-intent log of a mirrored volume (protocol 8): the agent
    /// holding `handle` is about to write the intent regions `mark` for the
    /// first time (the server commits them dirty before answering
    /// [`Response::IntentRecorded`], and only then may the agent write), and
    /// every write it made to the regions `clear` has reached every leg.
    /// Regions are `intent_region_bytes(extent_bytes)` of the volume's
    /// logical space (`volume_format::metadata::intent`).
    IntentRecord {
        handle: HandleId,
        mark: Vec<u64>,
        clear: Vec<u64>,
    },
    /// A new run of the agent took `handle` back (a resume after a crash or
    /// restart): the regions the handle recorded dirty may differ between
    /// legs (the previous run died with writes in flight). The server copies
    /// them from one leg to the others, forgets them, and answers
    /// [`Response::IntentRecorded`]; the agent does no I/O to the volume
    /// before that (protocol 8).
    IntentResync {
        handle: HandleId,
    },

    // ---- admin: fencing devices (protocol 9) ----
    /// Whether each device of the pool fences (`sanvol-target`), as the
    /// server learned it from the device's description when it connected:
    /// answered with [`Response::DeviceFencing`]. A request of its own, not
    /// a field of [`DeviceInfo`], so `Response::Devices` encodes as before
    /// for every older peer.
    DeviceFencing,

    // ---- admin: write-back caches' state (protocol 10) ----
    /// What the server knows of volume `name`'s write-back cache: the
    /// setting, its holder and the server's mirror of it (`sanvol volume
    /// show`). Answered with [`Response::VolumeCacheState`].
    VolumeCacheShow {
        name: String,
    },

    // ---- agent: byte-range locks on shared volumes (protocol 11) ----
    /// Sets the byte-range locks of the shared-write `handle` to `ranges`
    /// (an empty list releases them): refused with [`ErrorCode::Conflict`]
    /// naming the holder when another handle of the volume holds any of
    /// those bytes. Answered with [`Response::Locked`] (the volume's lock
    /// table); the volume's other holders get [`ServerEvent::Locks`].
    Lock {
        handle: HandleId,
        ranges: Vec<crate::locks::LockRange>,
    },

    // ---- admin: a lost cache mirror (protocol 13) ----
    /// Gives up the writes volume `name`'s cache mirror may hold: records
    /// "nothing pending" for it, so the next open goes on without
    /// replaying it. For when the server holding the mirror and the last
    /// holder's own log are both lost for good (an open is refused naming
    /// them until then). Only while the volume is closed.
    MirrorForget {
        name: String,
    },

    // ---- the holder's view of a write-back cache (protocol 14) ----
    /// The exclusive holder of a cached volume tells the server how its
    /// cache stands ([`HolderCacheReport`]): what only the holder knows —
    /// why it writes through, how fast it destages. Sent every few seconds
    /// and at each change of state; kept in memory only (the newest per
    /// volume) and shown by `sanvol volume show`. Answered with
    /// [`Response::Done`].
    CacheReport {
        handle: HandleId,
        report: HolderCacheReport,
    },
    /// The holder's last [`Request::CacheReport`] of volume `name`'s cache:
    /// answered with [`Response::CacheReported`].
    VolumeCacheReport {
        name: String,
    },

    // ---- agent: mirroring restarted with the holder's state (protocol 15) ----
    /// Records for the next generation of `handle`'s volume mirror, before
    /// it starts: the server appends them (durably) to a staged file of the
    /// volume that no replay reads, and answers [`Response::Mirrored`].
    /// `copy` names one attempt (the holder picks it at random): a request
    /// with another `copy` starts the staged file afresh. See
    /// [`Request::MirrorOpenStaged`].
    MirrorStage {
        handle: HandleId,
        copy: u64,
        records: Vec<MirrorRecord>,
    },
    /// [`Request::MirrorOpen`], with the staged file of attempt `copy`
    /// (holding exactly `records` records) as the new generation's file
    /// instead of an empty one: the holder restarts mirroring with the
    /// records its log still holds, so it need not write them all to the
    /// devices first. Refused when the server's staged file is not that
    /// attempt's, or not whole (the holder then tries again).
    MirrorOpenStaged {
        handle: HandleId,
        copy: u64,
        records: u64,
    },
    /// Bytes of this server's file of volume `volume`'s cache mirror,
    /// from `offset` (protocol 16; [`Role::Server`] only: another server
    /// of the pool, which must replay a mirror recorded at this one).
    /// Answered by a server standing by, with [`Response::MirrorChunk`],
    /// when its file is of `generation` or the one after it (prepared here,
    /// never committed: it holds what `generation` held); an active server
    /// refuses, its files are in use.
    MirrorFetch {
        volume: VolumeId,
        generation: u64,
        offset: u64,
    },

    // ---- admin: where a cache mirror is recorded (protocol 17) ----
    /// Which server the pool records as holding volume `name`'s cache
    /// mirror, of which generation, and whether it may hold writes the
    /// devices lack: answered with [`Response::CacheMirrorRecorded`].
    VolumeCacheMirror {
        name: String,
    },
}

/// A cached volume's cache as its exclusive holder sees it (protocol 14).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderCacheReport {
    /// "mirrored" (a write is acknowledged once in the holder's log and the
    /// server's mirror) or "write-through" (once on the devices).
    pub state: String,
    /// Why the cache writes through; empty when it mirrors.
    pub why: String,
    /// Acknowledged bytes not yet on the devices (overlapping writes count
    /// once).
    pub dirty_bytes: u64,
    pub log_used_bytes: u64,
    pub log_capacity_bytes: u64,
    /// Bytes destaged per second over the holder's last ten seconds.
    pub destage_bytes_per_sec: u64,
    /// Bytes destaged since the cache opened.
    pub destaged_bytes: u64,
}

/// The last [`HolderCacheReport`] of a volume's holder, as the server keeps
/// it (protocol 14).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedCache {
    /// The holder, "CLIENT (handle N)".
    pub holder: String,
    pub report: HolderCacheReport,
    /// How long ago the server received it: a holder reports every few
    /// seconds, so an old report means it stopped (dead, cut off).
    pub age_ms: u64,
}

impl ReportedCache {
    /// One line for `sanvol volume show`.
    pub fn summary(&self) -> String {
        let r = &self.report;
        let state = if r.why.is_empty() { r.state.clone() } else { format!("{} ({})", r.state, r.why) };
        format!(
            "{state}; {} bytes dirty, log {} of {} bytes used, destaging {} bytes/s, {} bytes destaged (reported by {} {:.1} s ago)",
            r.dirty_bytes,
            r.log_used_bytes,
            r.log_capacity_bytes,
            r.destage_bytes_per_sec,
            r.destaged_bytes,
            self.holder,
            self.age_ms as f64 / 1000.0
        )
    }
}

/// How a volume's writes are cached (the pool metadata's type).
pub use crate::metadata::{CacheMode, VolumeCache};

/// At most the records of one [`Request::MirrorAppend`], and most data bytes
/// (well inside a control frame, [`super::frame::FRAME_BYTES_MAX`]).
pub const MIRROR_APPEND_RECORDS_MAX: usize = 256;
pub const MIRROR_APPEND_BYTES_MAX: usize = 8 << 20;
/// Most bytes of one [`Response::MirrorChunk`] (well inside a control frame).
pub const MIRROR_CHUNK_BYTES_MAX: usize = 4 << 20;

/// One cached write as the holder sends it to the server's mirror.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRecord {
    /// The holder's sequence number: releases name it.
    pub seq: u64,
    /// Volume offset of the data.
    pub offset: u64,
    #[serde(with = "byte_buf")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for MirrorRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MirrorRecord {{ seq: {}, offset: {}, {} bytes }}", self.seq, self.offset, self.data.len())
    }
}

/// Data as one byte string (one length and a copy) rather than a sequence
/// of single bytes.
mod byte_buf {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// The first protocol version with the write-intent log of mirrored volumes
/// ([`Request::IntentRecord`], [`Request::IntentResync`]).
pub const INTENT_PROTOCOL_VERSION: u32 = 8;

/// The NBD export name of a snapshot on the backup pseudo-device.
pub fn snapshot_export_name(volume: &str, snapshot: &str) -> String {
    format!("{volume}@{snapshot}")
}

/// The NBD metadata context that lists, on export `VOLUME@NEW`, the blocks
/// written between snapshot `old` and `NEW` (in the manner of QEMU's
/// `qemu:dirty-bitmap:NAME`): flag bit 0 ([`CHANGED_FLAG`]) set means the
/// range was written. Granularity: the snapshot chunk (64 KiB); a write of
/// one byte marks its whole chunk, and no write is ever missed.
pub fn changed_context_name(old: &str) -> String {
    format!("{CHANGED_CONTEXT_PREFIX}{old}")
}

pub const CHANGED_CONTEXT_PREFIX: &str = "sanvol:changed-since:";
/// Bit of a `sanvol:changed-since:` status flag meaning "written".
pub const CHANGED_FLAG: u32 = 1;

impl Request {
    /// The roles a request may come from (`None`: any). Agents and admins
    /// share the read-only status requests; backup jobs may list snapshots
    /// and read them.
    pub fn allowed_roles(&self) -> Option<&'static [Role]> {
        match self {
            Request::PoolStatus | Request::Renew => None,
            Request::DataChannel { .. }
            | Request::ReportDeviceFailure { .. }
            | Request::ReportDeviceRecovered { .. } => Some(&[Role::Agent]),
            Request::Open { .. }
            | Request::Close { .. }
            | Request::RecallDone { .. }
            | Request::Resume { .. }
            | Request::Handover { .. }
            | Request::OpenHandover { .. }
            | Request::CowRegister { .. }
            | Request::CowCopy { .. }
            | Request::MirrorOpen { .. }
            | Request::MirrorAppend { .. }
            | Request::MirrorRelease { .. }
            | Request::MirrorStage { .. }
            | Request::MirrorOpenStaged { .. }
            | Request::Capabilities { .. }
            | Request::IntentRecord { .. }
            | Request::IntentResync { .. }
            | Request::Lock { .. }
            | Request::CacheReport { .. } => Some(&[Role::Agent]),
            Request::MirrorFetch { .. } => Some(&[Role::Server]),
            // Agents and admins share the read-only status requests.
            Request::VolumeCacheShow { .. } | Request::VolumeCacheReport { .. } | Request::VolumeCacheMirror { .. } => {
                Some(&[Role::Admin, Role::Agent])
            }
            Request::SnapshotList { .. } | Request::BackupChannel => Some(&[Role::Admin, Role::Backup]),
            _ => Some(&[Role::Admin]),
        }
    }
}

/// A message from the server.
// Replies are built once and sent once: their size on the stack does not
// matter, and boxing every `Response` would touch every request handler.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    Reply { id: u64, result: Result<Response, ControlError> },
    Event(ServerEvent),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Done,
    Pool(PoolInfo),
    Devices(Vec<DeviceInfo>),
    Clients(Vec<ClientInfo>),
    Volumes(Vec<VolumeInfo>),
    Volume(VolumeDetail),
    Lease {
        lease_ms: u64,
    },
    Opened(OpenedHandle),
    // A handover token (opaque, signed by the server) and how long it is
    // valid. (A plain comment: a doc comment would make rustfmt spread every
    // struct variant of this enum over several lines.)
    HandoverToken {
        token: Vec<u8>,
        expires_in_ms: u64,
    },
    /// What a data channel for one volume and device may touch.
    DataChannel(DataChannelGrant),
    Snapshots(Vec<SnapshotInfo>),
    /// Chunks committed to the COW map; `new` were not registered before.
    CowRegistered {
        new: u64,
    },
    /// The reconfiguration in progress (at most one), protocol 5.
    Operations(Vec<OperationInfo>),
    /// Mirroring started afresh; the volume's cache setting (protocol 6).
    MirrorOpened {
        cache: Option<VolumeCache>,
    },
    /// Every record up to `upto_seq` is durable in the mirror (protocol 6).
    Mirrored {
        upto_seq: u64,
    },
    /// One capability per device of the handle's volume, for the layout
    /// with `layout_generation` (protocol 7).
    Capabilities {
        handle: HandleId,
        layout_generation: u64,
        devices: Vec<DeviceCapability>,
    },
    /// The write-intent regions of a [`Request::IntentRecord`] are
    /// committed (protocol 8).
    IntentRecorded,
    /// Whether each device fences (protocol 9).
    DeviceFencing(Vec<DeviceFencing>),
    /// A volume's write-back cache as the server sees it (protocol 10).
    VolumeCacheState(CacheStateInfo),
    /// The volume's lock table after a [`Request::Lock`] (protocol 11).
    Locked(crate::locks::LockTable),
    /// The holder's last report of a volume's cache, if it has one
    /// (protocol 14).
    CacheReported(Option<ReportedCache>),
    /// Bytes of a mirror file from the offset asked (protocol 16;
    /// [`Request::MirrorFetch`]): the file's generation and whole length
    /// as read for this chunk; empty `data` only at or past the end.
    MirrorChunk {
        generation: u64,
        total_bytes: u64,
        data: Vec<u8>,
    },
    /// The pool's record of a volume's cache mirror (protocol 17;
    /// [`Request::VolumeCacheMirror`]); `None`: none recorded (no cache,
    /// or never mirrored).
    CacheMirrorRecorded(Option<RecordedMirror>),
}

/// Where the pool records a volume's cache mirror (protocol 17): what a
/// replay after its holder's death reads, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedMirror {
    /// The metadata server holding the file (its name, as `mds.toml` sets it).
    pub server: String,
    /// The mirror's generation (rises by one each time mirroring starts).
    pub generation: u64,
    /// Whether the file may hold acknowledged writes the devices lack: a
    /// holder mirrors there now, or died before its writes were replayed.
    pub pending: bool,
}

impl RecordedMirror {
    /// One line for `sanvol volume show`.
    pub fn summary(&self) -> String {
        let what = if self.pending {
            "may hold acknowledged writes the devices lack (replayed before the next open)"
        } else {
            "holds nothing the devices lack"
        };
        format!("generation {} at {}; {what}", self.generation, self.server)
    }
}

/// The protocol version from which a server answers
/// [`Request::DeviceFencing`].
pub const DEVICE_FENCING_SINCE_PROTOCOL: u32 = 9;

/// Whether one device fences (protocol 9): learned at run time from the
/// description a device announces (the pool metadata has no field for it);
/// `None` while the server has not connected to the device since it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFencing {
    pub device: DeviceIndex,
    pub fences: Option<bool>,
}

/// A volume's write-back cache as the metadata server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStateInfo {
    /// The setting (`None`: the volume has no cache).
    pub cache: Option<VolumeCache>,
    /// The exclusive holder serving it through its cache, "CLIENT (handle N)".
    pub holder: Option<String>,
    /// Whether the server mirrors the holder's writes now: the holder
    /// acknowledges a write once it is in its log and here ("mirrored").
    /// A holder that is not mirroring writes through (acknowledges once on
    /// the devices): its agent's `sanvol-agent list` says why.
    pub mirroring: bool,
    /// Acknowledged writes the mirror holds that the holder has not
    /// reported on the devices yet (its dirty data; a byte written twice
    /// counts twice).
    pub held_records: u64,
    pub held_bytes: u64,
}

impl CacheStateInfo {
    /// One line for `sanvol volume show`: the setting, then the holder's
    /// state (mirrored / write-through and why / dirty bytes).
    pub fn summary(&self) -> String {
        let Some(cache) = &self.cache else { return "none".into() };
        let setting = format!("{} of {} bytes", cache.mode, cache.size_bytes);
        match (&self.holder, self.mirroring) {
            (None, _) if self.held_records > 0 => format!(
                "{setting}; no holder; {} bytes ({} writes) its last holder acknowledged are in the mirror, not yet \
                 on the devices: {}",
                self.held_bytes,
                self.held_records,
                if self.mirroring {
                    "the next open or snapshot of the volume writes them there first"
                } else {
                    "the server is writing them there now (opens and snapshots of the volume wait for it)"
                }
            ),
            (None, _) => format!("{setting}; no holder"),
            (Some(holder), true) => format!(
                "{setting}; holder {holder}: mirrored, {} bytes held ({} writes the holder has not released yet)",
                self.held_bytes, self.held_records
            ),
            (Some(holder), false) => format!(
                "{setting}; holder {holder}: write-through (it is not mirroring at this server: the mirror failed, \
                 or the server changed; the holder's report, or `sanvol-agent list` on the holder, says why)"
            ),
        }
    }
}

/// A handle's capability on one device (protocol 7): the volume's extents
/// there (its newest snapshot's copy-on-write area included) writable, for
/// a read-only handle nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCapability {
    pub device: DeviceIndex,
    pub capability: crate::capability::SignedCapability,
}

/// A reconfiguration in progress (`sanvol device evacuate`, `volume move`,
/// …): what it does and how far it is (protocol 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationInfo {
    /// What was asked, for people: "evacuate device 2".
    pub what: String,
    /// Where it is: "copying volume db", "waiting for the holders of db".
    pub state: String,
    /// The volume being moved now, if any.
    pub volume: Option<String>,
    pub volumes_done: u64,
    pub volumes_total: u64,
    /// Extent legs copied so far and to copy in all (the volumes planned
    /// so far: the total grows as volumes are planned).
    pub extents_done: u64,
    pub extents_total: u64,
    /// Bytes copied so far, the current volume's copy included.
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub elapsed_ms: u64,
}

/// What an agent gets when it opens a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenedHandle {
    pub handle: HandleId,
    pub mode: OpenMode,
    pub description: VolumeDescription,
    /// The lease the handle lives under; renewed with the session.
    pub lease_ms: u64,
    /// Opaque to the agent, signed by the server: `Request::Resume` with it
    /// re-attaches the handle on a new connection. Empty from servers that
    /// do not support resumes (the agent then re-opens instead).
    #[serde(default)]
    pub resume_key: Vec<u8>,
}

/// First bytes a client sends on a **data channel**: a connection that
/// carries one device's I/O of one volume through the server (the agent's
/// fallback path). After the preamble come the usual handshake (role agent),
/// one [`ClientMessage`] with [`Request::DataChannel`], and the server's
/// [`ServerMessage::Reply`]. If that reply is OK, the same stream carries
/// NBD from then on (fixed newstyle, default export): the server serves,
/// over its own connection to the device, an export of the device's size
/// that only admits requests inside the granted ranges (anything else fails
/// with EPERM), read-only if the agent holds the volume only read-only.
///
/// Why a preamble rather than a field of the hello: the hello and its
/// signatures stay exactly as pinned, and a control frame starts with a
/// big-endian length whose first byte is 0, so the two never look alike.
pub const DATA_CHANNEL_PREAMBLE: [u8; 8] = *b"SANVOLD1";

/// What a data channel may touch: byte ranges on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataChannelGrant {
    pub volume: VolumeId,
    pub device: DeviceIndex,
    /// The layout generation the ranges were computed from.
    pub layout_generation: u64,
    pub read_only: bool,
    /// `(offset, length)` in bytes on the device, sorted, not overlapping:
    /// the extents the volume has there.
    pub ranges: Vec<(u64, u64)>,
}

/// Unsolicited news from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerEvent {
    /// Drain and hold I/O on `handle`, then confirm with `RecallDone`; a new
    /// layout with `generation` will follow.
    Recall { handle: HandleId, generation: u64 },
    /// Resume I/O on `handle` with this layout.
    Publish { handle: HandleId, description: Box<VolumeDescription> },
    /// The handle is no longer valid; stop I/O on it.
    Revoked { handle: HandleId, reason: String },
    /// This server no longer serves the pool (a handoff): reconnect to one
    /// of `addrs` (and resume every handle there).
    Redirect { addrs: Vec<String>, reason: String },
    /// The lock table of `handle`'s volume changed (protocol 11): writes
    /// into another handle's locked bytes are refused from now on.
    Locks { handle: HandleId, locks: crate::locks::LockTable },
    /// The server copies `handle`'s volume (a resync or a remap; protocol
    /// 12): where it stands, or `None` once the copy is over. News for the
    /// holder's operators (`sanvol-agent list`): nothing the agent must do
    /// — an online copy needs no change of its writes, and the pause at
    /// the end comes as a recall.
    Recovery { handle: HandleId, status: Option<RecoveryStatus> },
}

/// A copy of a volume's extents in progress, as its holders are told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// What runs: "resync of device 2", "move its extents off device 1".
    pub what: String,
    /// Copying while the holders write (`true`), or the second pass over
    /// what they wrote meanwhile, with their I/O held (`false`).
    pub online: bool,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl std::fmt::Display for RecoveryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.online {
            let pct = (self.bytes_done.min(self.bytes_total) * 100).checked_div(self.bytes_total).unwrap_or(100);
            write!(f, "{}: copying online, {pct}% of {} MiB (writes go on)", self.what, self.bytes_total >> 20)
        } else {
            write!(f, "{}: copying again what was written during the online copy (I/O held)", self.what)
        }
    }
}

/// A failed request: a stable code for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
}

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ControlError {
        ControlError { code, message: message.into() }
    }
}

/// Stable error codes that cross the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    NoSpace,
    /// The volume is open in a conflicting mode by someone else.
    Conflict,
    /// The volume is open and the operation needs it closed.
    Busy,
    /// Writing the pool metadata to the devices failed; nothing changed.
    CommitFailed,
    /// The server is not serving this now (e.g. in its grace period).
    Unavailable,
    Internal,
    /// A resumed handle was broken: another client opened the volume after
    /// its lease and durable timeout ran out. Stop I/O on it.
    HandleBroken,
    /// This metadata server is not the pool's active one (it stands by);
    /// the message names the active server and where to reach it.
    NotActive,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub pool_uuid: String,
    pub name: String,
    pub generation: u64,
    pub extent_bytes: u64,
    /// The pool's metadata servers as their lease sectors say: the active
    /// one and those standing by.
    #[serde(default)]
    pub servers: Vec<ServerInfo>,
    pub devices: u32,
    pub devices_failed: u32,
    pub volumes: u32,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub server_key: String,
}

/// One metadata server of the pool (`pool status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub name: String,
    pub host_id: u32,
    /// `active`, `standing by` or `stopped`.
    pub role: String,
    pub since_unix_ms: u64,
    pub addrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub index: DeviceIndex,
    pub uuid: String,
    pub uri: String,
    pub size_bytes: u64,
    pub extents_total: u64,
    pub extents_free: u64,
    /// On the wire the typed state; in JSON listings the text `online` or
    /// `failed: REASON` (what operators and scripts have always read).
    #[serde(with = "state_text")]
    pub state: DeviceState,
    /// Whether the server reaches it right now.
    pub reachable: bool,
    /// Recovery in progress, for people: "resyncing: 3 of 10 extents
    /// copied", "failed: next probe in 4.0 s"; empty when there is none
    /// (protocol 4).
    #[serde(default)]
    pub recovery: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub name: String,
    pub key: String,
    pub role: Role,
    /// Sessions currently connected with this key.
    pub connected: u32,
    /// Handles open by this key: "VOLUME (MODE, handle N)".
    pub handles: Vec<String>,
    /// Devices this client's agent reaches only through the server right
    /// now: "device N (URI): REASON".
    #[serde(default)]
    pub fallback: Vec<String>,
    /// A backup key's volume scope (empty: every volume).
    #[serde(default)]
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: VolumeId,
    pub size_bytes: u64,
    pub legs: u8,
    pub extents: u64,
    pub layout_generation: u64,
    /// Who holds it open: "CLIENT (MODE)".
    pub open_by: Vec<String>,
    /// Holders doing this volume's I/O to a device through the server:
    /// "CLIENT: device N on fallback (REASON)".
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Whether every leg is whole: empty if so, else "degraded: …" or
    /// "resyncing: …" with progress (protocol 4).
    #[serde(default)]
    pub health: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    pub id: SnapshotId,
    /// The backup pseudo-device's export name: `VOLUME@SNAPSHOT`.
    pub export: String,
    pub created_at_unix_secs: u64,
    pub created_generation: u64,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    /// Chunks whose pre-image is in this snapshot's COW area.
    pub cow_chunks: u64,
    /// Space the COW area reserves in the pool (as large as the volume).
    pub reserved_bytes: u64,
    /// The volume's newest snapshot (the one writes copy pre-images into).
    pub newest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDetail {
    pub info: VolumeInfo,
    pub description: VolumeDescription,
}

/// `DeviceInfo::state`: the typed [`DeviceState`] in binary encodings (the
/// control protocol), the text `online` / `failed: REASON` in human-readable
/// ones (the CLI's `--json`), so listings keep the shape scripts read.
mod state_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::metadata::DeviceState;

    pub fn serialize<S: Serializer>(state: &DeviceState, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(state)
        } else {
            state.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DeviceState, D::Error> {
        if !d.is_human_readable() {
            return DeviceState::deserialize(d);
        }
        let text = String::deserialize(d)?;
        match text.strip_prefix("failed: ") {
            Some(reason) => Ok(DeviceState::Failed { reason: reason.to_string(), since_unix_secs: 0 }),
            None if text == "online" => Ok(DeviceState::Online),
            None if text == "resyncing" => Ok(DeviceState::Resyncing { since_unix_secs: 0 }),
            None => Err(serde::de::Error::custom(format!("unknown device state {text:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sanvol volume show`'s cache line with no holder: nothing held, held
    /// and waiting for the next open, held and being replayed.
    #[test]
    fn a_cache_with_no_holder_says_what_its_mirror_still_holds() {
        let cache = VolumeCache { volume: VolumeId(1), size_bytes: 1 << 20, mode: CacheMode::Mirrored };
        let state = |mirroring, held_records, held_bytes| CacheStateInfo {
            cache: Some(cache),
            holder: None,
            mirroring,
            held_records,
            held_bytes,
        };
        assert_eq!(state(true, 0, 0).summary(), "mirrored of 1048576 bytes; no holder");
        let waiting = state(true, 3, 12288).summary();
        assert!(waiting.contains("12288 bytes (3 writes)") && waiting.contains("the next open"), "{waiting}");
        let replaying = state(false, 3, 12288).summary();
        assert!(replaying.contains("writing them there now"), "{replaying}");
    }
}
