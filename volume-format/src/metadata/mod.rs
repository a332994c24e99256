//! Pool metadata: the one record that says what the pool is made of, and how
//! it is committed atomically to the metadata area of each device.
//!
//! Why it lives on the shared devices rather than on a server's local disk:
//! any metadata server with access to the pool can take over (failover, a
//! planned handoff, a rebuilt host) by reading it back; nothing about the
//! pool is stranded on one machine.
//!
//! Why bincode: the record is large (one entry per extent leg) and only ever
//! read by sanvol. Bincode is positional, not self-describing, so the schema
//! is fixed per [`METADATA_FORMAT_VERSION`]: every change to these types
//! bumps it, and the slot header carries the version so a reader refuses a
//! newer format clearly before trying to decode it. (`#[serde(default)]` on
//! the later additions only helps human-readable encodings such as a `--json`
//! dump fed back to a tool; it does not make bincode tolerant.)
//!
//! - [`slots`]: the commit slots (header, checksum, newest-valid-wins).
//! - [`change`]: changes as deltas ([`MetaChange`]), applied and undone
//!   without copying the pool.
//! - [`journal`]: the signed metadata journal and its checkpoints: a commit
//!   costs what changed.
//! - [`alloc`]: free-extent computation, the extent allocator, and volume
//!   create/grow/delete.
//! - [`snapshot`]: snapshots, copy-on-write maps, changed-block lists.
//! - [`handover`]: used handover tokens and the pool's token clock.
//! - [`remap`]: new maps for a volume (legs moved, added, removed).
//! - [`payload`]: the payload schemas of older formats, decoded into today's.
//! - [`range_locks`]: the byte-range locks of shared-write handles.

pub mod alloc;
pub mod change;
pub mod handover;
pub mod intent;
pub mod journal;
pub mod payload;
pub mod range_locks;
pub mod remap;
pub mod slots;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod testing;

pub use alloc::{allocate, AllocError, FreeExtents};
pub use change::{ApplyError, ChunkRun, ChunkRuns, MetaChange, NewSnapshot, Remap, Undo};
pub use handover::{HandoverLedger, UsedToken, HANDOVER_USED_MAX};
pub use intent::{intent_region_bytes, IntentEntry, IntentKey, INTENT_REGION_BYTES_MAX};
pub use range_locks::RangeLockEntry;
pub use remap::{LegCopy, RemapKind, RemapPlan};
pub use slots::{MetadataArea, MetadataError, NewestSlot, SlotError, SlotHeader, SLOT_HEADER_BYTES, SLOT_MAGIC};
pub use snapshot::{ChunkSource, CowMap, DeletePlan, COW_CHUNK_BYTES};

use crate::ids::{DeviceIndex, HandleId, PublicKey, SnapshotId, VolumeId};
use crate::label::{extent_bytes_valid, ByteRange};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use uuid::Uuid;

/// The pool metadata format (slot header, payload schema and the layout of
/// the metadata area) this build writes and the newest it reads.
///
/// One line per bump:
/// - 1: initial — devices, volumes, clients, handles, snapshots.
/// - 2: snapshots carry their size, chunk size and copy-on-write map. A
///   format-1 pool never stored a snapshot, so its payload decodes as
///   format 2 unchanged; it is read and upgraded at its next commit.
/// - 3: the metadata journal ([`journal`]): slots 0 and 1 hold signed
///   checkpoints (the format-2 record plus a trailer with the journal anchor
///   and an ed25519 signature), the rest of the area is a ring of signed
///   journal entries. The payload schema is format 2's. A format-2 pool is
///   read (all its slots) and upgraded by its next journaled commit.
/// - 4: the used handover tokens and the token clock's floor
///   ([`handover::HandoverLedger`], the last field of [`PoolMetadata`]) and
///   the change that records them ([`MetaChange::HandoverTokens`]); backup
///   keys scoped to volumes ([`ClientScope`], the field before it, and
///   [`MetaChange::ClientScope`]). Older payloads decode without either
///   ([`payload`]); a format-3 pool is read and upgraded by a commit
///   checkpoint at its next commit; format-3 readers refuse format 4 as
///   newer.
/// - 5: [`DeviceState::Resyncing`] and [`MetaChange::LayoutBump`] (a device
///   that came back). Format-4 payloads and entries decode unchanged (both
///   are enum variants added last); format-4 readers refuse format 5.
/// - 6: the admin reconfiguration changes [`MetaChange::DeviceAdd`],
///   [`MetaChange::DeviceRemove`] and [`MetaChange::VolumeRemap`] (variants
///   added last: format-5 payloads and entries decode unchanged, the
///   payload schema is format 4's); format-5 readers refuse format 6.
/// - 7: volume write-back caches ([`VolumeCache`] in
///   [`PoolMetadata::volume_caches`], the new last field, and
///   [`MetaChange::VolumeCache`], a variant added last). Format-4 to -6
///   payloads decode without caches ([`payload::PayloadV6`]); entries of
///   those formats decode unchanged; format-6 readers refuse format 7.
/// - 8: the write-intent log of mirrored volumes ([`intent`]): the
///   [`PoolMetadata::intents`] field (the new last field) and
///   [`MetaChange::IntentSet`] (a variant added last). Format-7 payloads
///   decode without it ([`payload::PayloadV7`]); entries of older formats
///   decode unchanged; format-7 readers refuse format 8.
/// - 9: byte-range locks of shared-write handles ([`range_locks`]): the
///   [`PoolMetadata::range_locks`] field (the new last field) and
///   [`MetaChange::RangeLocks`] (a variant added last). Format-8 payloads
///   decode without it ([`payload::PayloadV8`]); entries of older formats
///   decode unchanged; format-8 readers refuse format 9.
/// - 10: whether each device fences (a `sanvol-target`, see
///   [`crate::capability`]): the [`PoolMetadata::device_fencing`] field (the
///   new last field) and [`MetaChange::DeviceFencing`] (a variant added
///   last). Format-9 payloads decode without it ([`payload::PayloadV9`]):
///   every device "unknown" until the server learns it from a connection
///   and records it; entries of older formats decode unchanged; format-9
///   readers refuse format 10.
/// - 11: where each cached volume is mirrored ([`CacheMirrorRecord`]): the
///   [`PoolMetadata::cache_mirrors`] field (the new last field) and
///   [`MetaChange::CacheMirror`] (a variant added last). Format-10 payloads
///   decode without it ([`payload::PayloadV10`]): no mirror recorded, so
///   the first open of a cached volume replays whatever mirror file the
///   server has, as format 10 did; entries of older formats decode
///   unchanged; format-10 readers refuse format 11.
pub const METADATA_FORMAT_VERSION: u32 = 11;
/// The oldest format whose payload is today's [`PoolMetadata`] schema.
pub const PAYLOAD_SCHEMA_FORMAT_MIN: u32 = 11;
/// The oldest format whose payload is [`payload::PayloadV10`] (today's
/// schema without the cache mirrors).
pub const PAYLOAD_V10_FORMAT_MIN: u32 = 10;
/// The oldest format whose payload is [`payload::PayloadV9`] (today's schema
/// without the devices' fencing).
pub const PAYLOAD_V9_FORMAT_MIN: u32 = 9;
/// The oldest format whose payload is [`payload::PayloadV8`] (today's schema
/// without the range locks).
pub const PAYLOAD_V8_FORMAT_MIN: u32 = 8;
/// The oldest format whose payload is [`payload::PayloadV7`] (today's schema
/// without the write-intent sets).
pub const PAYLOAD_V7_FORMAT_MIN: u32 = 7;
/// The oldest format whose payload is [`payload::PayloadV6`] (today's
/// schema without the volume caches).
pub const PAYLOAD_V6_FORMAT_MIN: u32 = 4;
/// The first format with the journal (checkpoints in slots 0 and 1, entries
/// in the ring), the oldest journaled format this build reads; older ones
/// are whole-pool slot records.
pub const JOURNAL_FORMAT_VERSION_MIN: u32 = 3;
/// The oldest format this build reads.
pub const METADATA_FORMAT_VERSION_MIN: u32 = 1;
/// What [`MetadataArea::encode_slot`] writes: the whole-pool slot commits of
/// format 2, kept while the server's commit path still uses them.
pub const LEGACY_SLOT_FORMAT_VERSION: u32 = 2;

/// Most legs (copies) a mirrored volume may have.
pub const MIRROR_LEGS_MAX: u32 = 4;
/// Longest pool, volume, snapshot, device-URI or client name, in bytes.
pub const NAME_BYTES_MAX: usize = 255;
/// Smallest and largest volume block size (the block size agents expose).
pub const BLOCK_BYTES_MIN: u32 = 512;
pub const BLOCK_BYTES_MAX: u32 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMetadata {
    /// First field, so its position is the same in every format version.
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub pool_name: String,
    /// Equals the generation of the slot it was committed in.
    pub generation: u64,
    pub extent_bytes: u64,
    pub created_at_unix_secs: u64,
    /// Clients pin this key, like an SSH known host.
    pub server_public_key: PublicKey,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub clients: Vec<ClientRecord>,
    #[serde(default)]
    pub handles: Vec<HandleRecord>,
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    pub next_ids: NextIds,
    /// Volume scopes of backup keys (format 4).
    #[serde(default)]
    pub client_scopes: Vec<ClientScope>,
    /// Used handover tokens and the token clock (format 4).
    #[serde(default)]
    pub handovers: HandoverLedger,
    /// Volumes with a write-back cache (format 7), sorted by volume id.
    #[serde(default)]
    pub volume_caches: Vec<VolumeCache>,
    /// Write-intent sets of mirrored volumes (format 8, [`intent`]).
    #[serde(default)]
    pub intents: Vec<IntentEntry>,
    /// Byte-range locks of shared-write handles (format 9, [`range_locks`]),
    /// sorted by handle.
    #[serde(default)]
    pub range_locks: Vec<RangeLockEntry>,
    /// Whether each device fences (format 10), sorted by device index; a
    /// device without an entry is "unknown" (a pool of an older format, or
    /// a device not reached since): the server learns it from a connection
    /// and records it. Last field.
    ///
    /// Why not a field of [`DeviceRecord`]: that record is inside
    /// [`MetaChange::DeviceAdd`] of journal entries of formats 6 to 9, which
    /// decode positionally whatever their format; a new field there would
    /// make those journals unreadable.
    #[serde(default)]
    pub device_fencing: Vec<DeviceFencing>,
    /// Where each cached volume's writes are mirrored (format 11), sorted
    /// by volume. Last field.
    #[serde(default)]
    pub cache_mirrors: Vec<CacheMirrorRecord>,
}

/// Where a cached volume's writes are mirrored (format 11), committed each
/// time its holder starts mirroring afresh (`MirrorOpen`).
///
/// Why in the pool metadata: a mirror is a file on one metadata server's
/// local disk, and the pool moves between servers (handoff, takeover). A
/// holder starts mirroring afresh only once every write an earlier mirror
/// acknowledged is on the devices, so only the file of the newest
/// generation can hold writes the devices lack; an older file anywhere is
/// stale and replaying it would put old data over newer writes. The file
/// carries its generation, and a replay writes it only when it matches
/// this record ("a stale mirror is never replayed"); when the record names
/// a generation this server's file does not hold, the open is refused with
/// the server that holds it, rather than opened without its writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMirrorRecord {
    pub volume: VolumeId,
    /// Rises by one at each `MirrorOpen` of the volume.
    pub generation: u64,
    /// The metadata server holding that generation's file (its name, as
    /// `mds.toml` sets it), for messages.
    pub server: String,
    /// Whether the file may hold writes the devices lack: set when
    /// mirroring starts, cleared once the file was replayed or the holder
    /// closed the volume (having written everything to the devices).
    pub pending: bool,
}

/// Whether one device fences (format 10): decided when the device is
/// labelled (`pool init`, `device add`) from its NBD export description,
/// and corrected by the server whenever a connection says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFencing {
    pub device: DeviceIndex,
    /// `true`: a `sanvol-target` (capabilities, fence orders: an excluded
    /// holder's writes are refused at the device). `false`: a plain NBD
    /// server (only the timing rules of [`crate::fencing`] keep them off).
    pub fenced: bool,
}

/// A volume's write-back cache setting (`sanvol volume cache`, format 7):
/// its holder acknowledges writes once they are in its local cache log and
/// in the metadata server's mirror of it, and writes them to the devices
/// in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCache {
    pub volume: VolumeId,
    /// Size of the holder's cache log and of the server's mirror of it.
    pub size_bytes: u64,
    pub mode: CacheMode,
}

/// How a volume's writes are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheMode {
    /// Write-back, every cached write mirrored at the metadata server.
    Mirrored,
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::Mirrored => "mirrored",
        })
    }
}

/// Smallest and largest cache of a volume: the log must hold several of
/// the largest records, and the server keeps a mirror file of this size per
/// cached volume.
pub const CACHE_BYTES_MIN: u64 = 8 << 20;
pub const CACHE_BYTES_MAX: u64 = 64 << 30;

impl PoolMetadata {
    /// The volume's cache setting, if it has one.
    pub fn volume_cache(&self, volume: VolumeId) -> Option<VolumeCache> {
        self.volume_caches.iter().find(|c| c.volume == volume).copied()
    }
}

/// The volumes a backup key may read (their snapshots on the backup
/// pseudo-device); a key without a scope reads every volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientScope {
    pub key: PublicKey,
    /// Volume names (a volume created later under one of these names is in
    /// scope too: scopes name what operators name).
    pub volumes: Vec<String>,
}

/// The next id of each kind to hand out. Ids are never reused, so a stale
/// reference (an old handle, a deleted volume) can never name a new object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextIds {
    pub volume: VolumeId,
    pub handle: HandleId,
    pub snapshot: SnapshotId,
    pub device: DeviceIndex,
}

impl Default for NextIds {
    /// Volume, handle and snapshot ids start at 1 so that 0 never names one.
    fn default() -> Self {
        NextIds { volume: VolumeId(1), handle: HandleId(1), snapshot: SnapshotId(1), device: DeviceIndex(0) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub index: DeviceIndex,
    pub device_uuid: Uuid,
    /// NBD URI: `nbd://host:port/export` or `nbd+unix:///export?socket=PATH`.
    pub uri: String,
    pub device_bytes: u64,
    /// The data area from the device's label.
    pub data: ByteRange,
    pub state: DeviceState,
    /// Whether this device's metadata area holds a copy of the metadata.
    #[serde(default)]
    pub holds_metadata: bool,
}

impl DeviceRecord {
    pub fn extent_count(&self, extent_bytes: u64) -> u64 {
        self.data.len_bytes() / extent_bytes.max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Online,
    /// Reported failed (by a client or the server); nothing new is allocated
    /// on it and its extents are due for recovery.
    Failed {
        reason: String,
        since_unix_secs: u64,
    },
    /// Failed, then found again with its label (format 5): its legs take
    /// writes but serve no reads until the server has copied every mirrored
    /// extent on it from a leg that stayed online; then it is online again.
    /// Nothing new is allocated on it meanwhile.
    Resyncing {
        since_unix_secs: u64,
    },
}

impl DeviceState {
    pub fn is_online(&self) -> bool {
        matches!(self, DeviceState::Online)
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceState::Online => f.write_str("online"),
            DeviceState::Failed { reason, .. } => write!(f, "failed: {reason}"),
            DeviceState::Resyncing { .. } => f.write_str("resyncing"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub block_bytes: u32,
    /// Copies of every logical extent, each on a distinct device (1 = not
    /// mirrored).
    pub mirror_legs: u32,
    /// Bumped by every change of `extents` (grow, move, add/remove leg);
    /// agents holding an older layout are fenced by it.
    pub layout_generation: u64,
    pub created_at_unix_secs: u64,
    /// `size_bytes.div_ceil(extent_bytes)` entries, in logical order.
    pub extents: Vec<LogicalExtent>,
}

/// One extent of a volume's address space and the physical extents that
/// hold it: one per mirror leg, on distinct devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogicalExtent {
    pub legs: Vec<PhysicalExtent>,
}

/// An extent on a device: `offset` is the byte offset from the start of the
/// device (not of the data area), a multiple of the extent size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PhysicalExtent {
    pub device: DeviceIndex,
    pub offset: u64,
}

impl fmt::Display for PhysicalExtent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.device, self.offset)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub public_key: PublicKey,
    pub name: String,
    pub role: ClientRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientRole {
    Agent,
    Admin,
    Backup,
    /// Another metadata server of the pool, authenticated with the pool's
    /// server key (protocol 16): never stored as a client, granted to that
    /// key alone, for the requests one server makes of another
    /// (`Request::MirrorFetch`).
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpenMode {
    ReadOnly,
    SharedWrite,
    Exclusive,
}

/// An open handle. Part of the metadata so handles survive a server restart
/// or failover: the new server rebuilds its handle table from these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleRecord {
    pub id: HandleId,
    pub volume: VolumeId,
    pub agent_key: PublicKey,
    pub agent_name: String,
    /// Which process instance of the agent opened it (changes on restart).
    pub agent_instance: Uuid,
    pub mode: OpenMode,
    pub opened_at_unix_secs: u64,
    pub lease_expires_at_unix_ms: u64,
    /// How long past lease expiry the handle stays reserved for a resume.
    pub durable_timeout_ms: u64,
    pub state: HandleState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandleState {
    Active,
    /// Broken by a conflicting open after the lease and durable timeout ran
    /// out; kept so a late resume can be told what happened.
    Broken {
        reason: String,
        since_unix_secs: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub volume: VolumeId,
    pub name: String,
    /// The pool generation that committed the snapshot (its recall point).
    pub created_generation: u64,
    pub created_at_unix_secs: u64,
    /// The copy-on-write area: as many extents as the volume had (each with
    /// the volume's mirror legs); chunk `c` lives at byte `c * chunk_bytes`.
    #[serde(default)]
    pub cow_extents: Vec<LogicalExtent>,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
    /// Copy-on-write granularity ([`snapshot::COW_CHUNK_BYTES`]).
    pub chunk_bytes: u64,
    /// Chunks whose pre-image is in the COW area (registered by agents).
    pub cow: CowMap,
}

impl PoolMetadata {
    /// A new, empty pool at generation 0 (the first commit writes 1).
    pub fn new(
        pool_uuid: Uuid,
        pool_name: impl Into<String>,
        extent_bytes: u64,
        server_public_key: PublicKey,
        created_at_unix_secs: u64,
    ) -> PoolMetadata {
        PoolMetadata {
            format_version: METADATA_FORMAT_VERSION,
            pool_uuid,
            pool_name: pool_name.into(),
            generation: 0,
            extent_bytes,
            created_at_unix_secs,
            server_public_key,
            devices: Vec::new(),
            volumes: Vec::new(),
            clients: Vec::new(),
            handles: Vec::new(),
            snapshots: Vec::new(),
            next_ids: NextIds::default(),
            client_scopes: Vec::new(),
            handovers: HandoverLedger::default(),
            intents: Vec::new(),
            volume_caches: Vec::new(),
            range_locks: Vec::new(),
            device_fencing: Vec::new(),
            cache_mirrors: Vec::new(),
        }
    }

    /// Where the volume is mirrored, if it ever was (format 11).
    pub fn cache_mirror(&self, volume: VolumeId) -> Option<&CacheMirrorRecord> {
        self.cache_mirrors.iter().find(|m| m.volume == volume)
    }

    /// Whether device `index` fences, as recorded (`None`: unknown).
    pub fn device_fenced(&self, index: DeviceIndex) -> Option<bool> {
        self.device_fencing.iter().find(|f| f.device == index).map(|f| f.fenced)
    }

    /// The volume scope of `key`, if it has one.
    pub fn scope_of(&self, key: &PublicKey) -> Option<&[String]> {
        self.client_scopes.iter().find(|s| s.key == *key).map(|s| s.volumes.as_slice())
    }

    pub fn device(&self, index: DeviceIndex) -> Option<&DeviceRecord> {
        self.devices.iter().find(|d| d.index == index)
    }

    pub fn volume(&self, id: VolumeId) -> Option<&VolumeRecord> {
        self.volumes.iter().find(|v| v.id == id)
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// Checks every invariant the rest of sanvol relies on. Run before a
    /// commit (never write what a reader would refuse) and after a read
    /// (never act on damaged metadata); the message names the first broken.
    pub fn check(&self) -> Result<(), String> {
        if self.format_version != METADATA_FORMAT_VERSION {
            return Err(format!("format version {} is not {METADATA_FORMAT_VERSION}", self.format_version));
        }
        if !extent_bytes_valid(self.extent_bytes) {
            return Err(format!("extent size {} is not a valid power of two", self.extent_bytes));
        }
        check_name("pool name", &self.pool_name)?;
        let mut scoped = HashSet::new();
        for scope in &self.client_scopes {
            if !scoped.insert(scope.key) {
                return Err(format!("key {} has two volume scopes", scope.key));
            }
            if scope.volumes.is_empty() {
                return Err(format!("key {} has an empty volume scope", scope.key));
            }
            for v in &scope.volumes {
                check_name("scoped volume name", v)?;
            }
        }
        let extent_bytes = self.extent_bytes;

        let mut device_indexes = HashSet::new();
        let mut device_uuids = HashSet::new();
        for d in &self.devices {
            if !device_indexes.insert(d.index) {
                return Err(format!("device index {} appears twice", d.index));
            }
            if !device_uuids.insert(d.device_uuid) {
                return Err(format!("device UUID {} appears twice", d.device_uuid));
            }
            if d.index >= self.next_ids.device {
                return Err(format!("device {} is not below the next device index {}", d.index, self.next_ids.device));
            }
            if d.uri.is_empty() || d.uri.len() > 4096 {
                return Err(format!("device {} has an empty or oversized URI", d.index));
            }
            if d.data.start % extent_bytes != 0 || d.data.len_bytes() % extent_bytes != 0 || d.data.end > d.device_bytes
            {
                return Err(format!(
                    "device {} data area {} is not whole extents within its {} bytes",
                    d.index, d.data, d.device_bytes
                ));
            }
        }

        for (i, f) in self.device_fencing.iter().enumerate() {
            if self.device(f.device).is_none() {
                return Err(format!("the fencing of unknown device {} is recorded", f.device));
            }
            if i > 0 && self.device_fencing[i - 1].device >= f.device {
                return Err(format!("the fencing records are not sorted by device (at device {})", f.device));
            }
        }

        for (i, m) in self.cache_mirrors.iter().enumerate() {
            if self.volume(m.volume).is_none() {
                return Err(format!("the cache mirror of unknown volume {} is recorded", m.volume));
            }
            if i > 0 && self.cache_mirrors[i - 1].volume >= m.volume {
                return Err(format!("the cache mirror records are not sorted by volume (at volume {})", m.volume));
            }
            if m.server.len() > 255 {
                return Err(format!("the cache mirror record of volume {} names an oversized server", m.volume));
            }
        }

        let mut used = HashSet::new();
        let mut check_extents = |what: &str, extents: &[LogicalExtent], legs: u32| -> Result<(), String> {
            for (i, extent) in extents.iter().enumerate() {
                if extent.legs.len() != legs as usize {
                    return Err(format!("{what} extent {i} has {} legs, expected {legs}", extent.legs.len()));
                }
                for (j, leg) in extent.legs.iter().enumerate() {
                    if extent.legs[..j].iter().any(|other| other.device == leg.device) {
                        return Err(format!("{what} extent {i} has two legs on device {}", leg.device));
                    }
                    let Some(device) = self.device(leg.device) else {
                        return Err(format!("{what} extent {i} is on unknown device {}", leg.device));
                    };
                    if !device.data.contains(leg.offset) || leg.offset % extent_bytes != 0 {
                        return Err(format!(
                            "{what} extent {i} leg {leg} is not an extent of the data area {}",
                            device.data
                        ));
                    }
                    if !used.insert(*leg) {
                        return Err(format!("{what} extent {i} leg {leg} is allocated twice"));
                    }
                }
            }
            Ok(())
        };

        let mut volume_ids = HashSet::new();
        let mut volume_names = HashSet::new();
        for v in &self.volumes {
            let what = format!("volume {} ({})", v.name, v.id);
            if !volume_ids.insert(v.id) || !volume_names.insert(v.name.as_str()) {
                return Err(format!("{what}: id or name appears twice"));
            }
            if v.id >= self.next_ids.volume {
                return Err(format!("{what}: id not below the next volume id {}", self.next_ids.volume));
            }
            check_name("volume name", &v.name)?;
            if !(1..=MIRROR_LEGS_MAX).contains(&v.mirror_legs) {
                return Err(format!("{what}: {} mirror legs outside 1..={MIRROR_LEGS_MAX}", v.mirror_legs));
            }
            check_block_bytes(v.block_bytes, extent_bytes).map_err(|e| format!("{what}: {e}"))?;
            if v.size_bytes % u64::from(v.block_bytes) != 0 {
                return Err(format!("{what}: size {} is not a multiple of block size {}", v.size_bytes, v.block_bytes));
            }
            if v.extents.len() as u64 != v.size_bytes.div_ceil(extent_bytes) {
                return Err(format!("{what}: {} extents for {} bytes", v.extents.len(), v.size_bytes));
            }
            check_extents(&what, &v.extents, v.mirror_legs)?;
        }

        let mut snapshot_ids = HashSet::new();
        for s in &self.snapshots {
            let what = format!("snapshot {} ({})", s.name, s.id);
            if !snapshot_ids.insert(s.id) || s.id >= self.next_ids.snapshot {
                return Err(format!("{what}: id appears twice or is not below the next snapshot id"));
            }
            check_name("snapshot name", &s.name)?;
            let Some(volume) = self.volume(s.volume) else {
                return Err(format!("{what}: unknown volume {}", s.volume));
            };
            check_extents(&what, &s.cow_extents, volume.mirror_legs)?;
            if !s.chunk_bytes.is_power_of_two() || s.chunk_bytes > extent_bytes || s.chunk_bytes < 4096 {
                return Err(format!(
                    "{what}: chunk size {} is not a power of two in 4096..=extent size",
                    s.chunk_bytes
                ));
            }
            if s.size_bytes == 0 || s.size_bytes > volume.size_bytes {
                return Err(format!("{what}: size {} is not within the volume's {}", s.size_bytes, volume.size_bytes));
            }
            if s.cow_extents.len() as u64 != s.size_bytes.div_ceil(extent_bytes) {
                return Err(format!("{what}: {} COW extents for {} bytes", s.cow_extents.len(), s.size_bytes));
            }
            if s.cow.chunks() != s.chunk_count() || !s.cow.is_consistent() {
                return Err(format!("{what}: the copy-on-write map does not match {} chunks", s.chunk_count()));
            }
        }

        let mut handle_ids = HashSet::new();
        for h in &self.handles {
            if !handle_ids.insert(h.id) || h.id >= self.next_ids.handle {
                return Err(format!("handle {}: id appears twice or is not below the next handle id", h.id));
            }
            if self.volume(h.volume).is_none() {
                return Err(format!("handle {}: unknown volume {}", h.id, h.volume));
            }
        }

        let mut client_keys = HashSet::new();
        for c in &self.clients {
            if !client_keys.insert(c.public_key) {
                return Err(format!("client key {} appears twice", c.public_key));
            }
        }
        self.check_range_locks()?;
        self.handovers.check()
    }
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(format!("{what} {name:?} must be 1..={NAME_BYTES_MAX} bytes without control characters"));
    }
    Ok(())
}

pub(crate) fn check_block_bytes(block_bytes: u32, extent_bytes: u64) -> Result<(), String> {
    if !block_bytes.is_power_of_two()
        || !(BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX).contains(&block_bytes)
        || u64::from(block_bytes) > extent_bytes
    {
        return Err(format!(
            "block size {block_bytes} is not a power of two in {BLOCK_BYTES_MIN}..={BLOCK_BYTES_MAX} \
             and at most the extent size {extent_bytes}"
        ));
    }
    Ok(())
}
