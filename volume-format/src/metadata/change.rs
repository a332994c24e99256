//! Metadata changes: the deltas a commit is made of.
//!
//! Why deltas: committing the whole [`PoolMetadata`] for every change costs
//! the size of the pool (a 1 TiB volume's copy-on-write map alone is 2 MiB),
//! so a copy-on-write registration after a snapshot took as long as copying
//! megabytes three times. A [`MetaChange`] names exactly what changed: a
//! registration of 16 chunks is a few hundred bytes, whatever the volume size.
//! The journal (`super::journal`) stores changes; checkpoints store the whole.
//!
//! Why decisions live in the change, not in [`PoolMetadata::apply`]: the
//! server applies a change to its in-memory metadata when it accepts a
//! request, and the loader applies the same change again when it replays the
//! journal after a restart. Both must reach the same state bit for bit, on
//! any future build too. So everything that takes a decision (which extents
//! a new volume gets, which pre-images a snapshot delete merges, which broken
//! handle records are dropped) is decided once by a *planner* (`plan_*`,
//! below and in `alloc`/`snapshot`) and recorded in the change; `apply` only
//! executes it. A better allocator in a later release cannot change what an
//! old journal replays to.
//!
//! Why `apply` is cheap and checks little: it touches only the records the
//! change names (found by a linear scan, microseconds even at 10,000 volumes)
//! and checks only what it needs to stay well-formed (the record exists, ids
//! are new, chunks are in range). The full [`PoolMetadata::check`] runs when
//! a checkpoint is written and after loading, never per change. Changes are
//! signed by the metadata server before they reach a device, so a replayed
//! change was planned against exactly this state.
//!
//! Why [`Undo`]: with group commit the server applies changes before they
//! are durable (so a request queued behind them sees them), and must take
//! them back if the commit fails. Reverting the undo records in reverse order
//! restores the previous state exactly, without keeping a copy of the pool.
//!
//! Format note: `MetaChange` is bincode-encoded in journal entries, which is
//! positional. Variants and fields are never reordered or removed; a new
//! variant goes at the end and needs a metadata format version bump.

use serde::{Deserialize, Serialize};

use super::handover::{HandoverLedger, UsedToken};
use super::intent::{IntentEntry, IntentKey};
use super::range_locks::RangeLockEntry;
use super::snapshot::CowMap;
use super::{
    check_block_bytes, check_name, CacheMirrorRecord, ClientRecord, ClientScope, DeviceRecord, DeviceState,
    HandleRecord, HandleState, LogicalExtent, PhysicalExtent, PoolMetadata, SnapshotRecord, VolumeCache, VolumeRecord,
    MIRROR_LEGS_MAX,
};
use crate::ids::{DeviceIndex, HandleId, PublicKey, SnapshotId, VolumeId};
use crate::locks::LockRange;

/// One change of the pool metadata. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaChange {
    /// Authorizes a key, or changes the name or role of an authorized one.
    ClientPut(ClientRecord),
    /// Revokes a key.
    ClientRemove { key: PublicKey },
    /// A new volume with its allocated extents; its id is the next volume id.
    VolumeCreate(VolumeRecord),
    /// Grows a volume to `size_bytes` with `added` extents appended (its
    /// layout generation goes up by one).
    VolumeGrow { volume: VolumeId, size_bytes: u64, added: Vec<LogicalExtent> },
    /// Deletes a volume without active handles or snapshots, and the broken
    /// handle records that name it.
    VolumeDelete { volume: VolumeId },
    /// A new snapshot with an empty copy-on-write map (its volume's layout
    /// generation goes up by one).
    SnapshotCreate(NewSnapshot),
    /// Deletes a snapshot after its pre-images `merged` were copied into
    /// `merge_into` (the next older snapshot); if it `was_newest`, its
    /// volume's layout generation goes up by one.
    SnapshotDelete { snapshot: SnapshotId, merge_into: Option<SnapshotId>, merged: ChunkRuns, was_newest: bool },
    /// Chunks whose pre-images are now in the snapshot's COW area.
    CowRegister { snapshot: SnapshotId, chunks: ChunkRuns },
    /// A new handle; its id is at least the next handle id.
    HandleOpen(HandleRecord),
    /// A handle's recorded lease expiry (a resume or renewal, if the server
    /// chooses to record it).
    HandleRenew { handle: HandleId, lease_expires_at_unix_ms: u64 },
    /// A handle broken by a conflicting open; the record stays to answer a
    /// late resume.
    HandleBreak { handle: HandleId, reason: String, since_unix_secs: u64 },
    /// A handle record goes away: closed, expired, excluded from a
    /// reconfiguration, or an old broken record dropped.
    HandleRemove { handle: HandleId },
    /// A device's state (marked failed, or back online).
    DeviceState { device: DeviceIndex, state: DeviceState },
    /// Sets the volume scope of a backup key; an empty list removes it
    /// (format 4).
    ClientScope { key: PublicKey, volumes: Vec<String> },
    /// The token clock read `clock_unix_ms` (the ledger's floor rises to it);
    /// the used tokens `forget` expired by it; `used` was just used (format
    /// 4; see [`super::handover`]).
    HandoverTokens { clock_unix_ms: u64, used: Option<UsedToken>, forget: Vec<[u8; 16]> },
    /// The volume's layout generation goes up by one with nothing else
    /// changed in its record: what its holders do I/O with changed
    /// elsewhere (a device of it came back and resyncs), committed at a
    /// recall point so every holder confirms before the new layout is used
    /// (format 5).
    LayoutBump { volume: VolumeId },
    /// A device joins the pool (format 6): the record of the device the
    /// server just labelled; its index is the next device index.
    DeviceAdd(DeviceRecord),
    /// A device leaves the pool (format 6): no extent of any volume or
    /// snapshot is on it and it holds no metadata copy.
    DeviceRemove { device: DeviceIndex },
    /// A volume's extents (and its snapshots' copy-on-write areas) as a
    /// whole new map, with its mirror leg count (format 6): legs moved to
    /// other devices, added or removed. Its layout generation goes up by
    /// one. Every new leg was copied and flushed before this was committed.
    VolumeRemap(Remap),
    /// Sets a volume's write-back cache, or removes it with `None` (format
    /// 7). Committed at a recall point: every holder destaged its cache
    /// first.
    VolumeCache { volume: VolumeId, cache: Option<VolumeCache> },
    /// Sets one of a volume's write-intent sets (format 8, see
    /// [`super::intent`]): a handle's dirty regions, or the regions a failed
    /// device's legs missed. An empty set removes it (a stale set created
    /// empty stays: "tracked, nothing missed").
    IntentSet { volume: VolumeId, key: IntentKey, regions: ChunkRuns },
    /// Sets a shared-write handle's byte-range locks (format 9, see
    /// [`super::range_locks`]); an empty list releases them. Refused when
    /// another handle of the volume holds any of those bytes.
    RangeLocks { handle: HandleId, ranges: Vec<LockRange> },
    /// Records whether a device fences (format 10, see
    /// [`super::DeviceFencing`]): at `device add`, or when the server learns
    /// it from a connection.
    DeviceFencing { device: DeviceIndex, fenced: bool },
    /// Records where a cached volume is mirrored now, or that its mirror
    /// holds nothing the devices lack (format 11, see
    /// [`super::CacheMirrorRecord`]). A generation never goes down, and
    /// rises only with `pending` set (mirroring started afresh).
    CacheMirror(CacheMirrorRecord),
}

/// A volume's new map, as [`MetaChange::VolumeRemap`] records it (planned by
/// [`PoolMetadata::plan_remap`](super::remap)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remap {
    pub volume: VolumeId,
    pub mirror_legs: u32,
    /// Every extent of the volume, in logical order.
    pub extents: Vec<LogicalExtent>,
    /// Every snapshot of the volume with its copy-on-write extents.
    pub snapshots: Vec<(SnapshotId, Vec<LogicalExtent>)>,
}

/// A snapshot as [`MetaChange::SnapshotCreate`] records it: a
/// [`SnapshotRecord`] without its copy-on-write map, which starts empty (so a
/// snapshot of a 1 TiB volume is not 2 MiB of zero bits in the journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSnapshot {
    pub id: SnapshotId,
    pub volume: VolumeId,
    pub name: String,
    pub created_generation: u64,
    pub created_at_unix_secs: u64,
    pub cow_extents: Vec<LogicalExtent>,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
}

/// A run of consecutive chunks: `first`, `first + 1`, … `first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRun {
    pub first: u64,
    pub count: u64,
}

/// A set of chunk numbers as ascending, non-touching runs. Why runs: agents
/// register neighbouring chunks together (a sequential write covers many),
/// and a snapshot delete may merge millions; runs keep both small while a
/// registration of a few scattered chunks stays a few bytes each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChunkRuns {
    runs: Vec<ChunkRun>,
}

impl ChunkRuns {
    /// The set of `chunks` (any order, duplicates allowed).
    pub fn from_chunks(chunks: impl IntoIterator<Item = u64>) -> ChunkRuns {
        let mut sorted: Vec<u64> = chunks.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<ChunkRun> = Vec::new();
        for c in sorted {
            match runs.last_mut() {
                Some(run) if run.first + run.count == c => run.count += 1,
                _ => runs.push(ChunkRun { first: c, count: 1 }),
            }
        }
        ChunkRuns { runs }
    }

    pub fn runs(&self) -> &[ChunkRun] {
        &self.runs
    }

    /// Number of chunks.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The chunks, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|r| r.first..r.first + r.count)
    }

    /// Whether every chunk is below `chunks`, runs ascend without touching,
    /// and none is empty (a decoded set is checked before use).
    pub(crate) fn check_within(&self, chunks: u64) -> Result<(), String> {
        let mut next_free = 0u64;
        for (i, r) in self.runs.iter().enumerate() {
            let Some(end) = r.first.checked_add(r.count) else {
                return Err(format!("chunk run {} + {} overflows", r.first, r.count));
            };
            if r.count == 0 || (i > 0 && r.first <= next_free) {
                return Err(format!("chunk runs are not ascending and separate at run {i} ({}+{})", r.first, r.count));
            }
            if end > chunks {
                return Err(format!("chunk {} is beyond the snapshot's {chunks} chunks", end - 1));
            }
            next_free = end;
        }
        Ok(())
    }
}

/// Why a change does not apply. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{change} does not apply: {reason}")]
pub struct ApplyError {
    pub change: &'static str,
    pub reason: String,
}

/// How to take one applied change back: pass it to [`PoolMetadata::revert`]
/// on the state `apply` left (in reverse order, for several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undo(UndoStep);

#[derive(Debug, Clone, PartialEq, Eq)]
enum UndoStep {
    /// The scopes as they were before a `ClientScope` change.
    ScopesReplaced {
        old: Vec<ClientScope>,
    },
    ClientAdded,
    ClientReplaced {
        index: usize,
        old: ClientRecord,
    },
    ClientRemoved {
        index: usize,
        old: ClientRecord,
    },
    VolumeCreated {
        previous_next: VolumeId,
    },
    VolumeGrown {
        volume: VolumeId,
        old_size_bytes: u64,
        added: usize,
    },
    VolumeDeleted {
        index: usize,
        record: VolumeRecord,
        handles: Vec<(usize, HandleRecord)>,
        cache: Option<(usize, VolumeCache)>,
        mirror: Option<(usize, CacheMirrorRecord)>,
    },
    /// The cache mirror records as they were before a `CacheMirror` change.
    MirrorsReplaced {
        old: Vec<CacheMirrorRecord>,
    },
    /// The caches as they were before a `VolumeCache` change.
    CachesReplaced {
        old: Vec<VolumeCache>,
    },
    SnapshotCreated {
        previous_next: SnapshotId,
        volume: VolumeId,
    },
    SnapshotDeleted {
        index: usize,
        record: SnapshotRecord,
        merge_into: Option<SnapshotId>,
        newly_set: Vec<u64>,
        bumped: bool,
    },
    CowRegistered {
        snapshot: SnapshotId,
        newly_set: Vec<u64>,
    },
    HandleOpened {
        previous_next: HandleId,
    },
    HandleRenewed {
        handle: HandleId,
        old: u64,
    },
    HandleBroken {
        handle: HandleId,
        old: HandleState,
        locks: Option<(usize, RangeLockEntry)>,
    },
    HandleRemoved {
        index: usize,
        record: HandleRecord,
        locks: Option<(usize, RangeLockEntry)>,
    },
    RangeLocksSet {
        handle: HandleId,
        old: Option<(usize, RangeLockEntry)>,
    },
    DeviceStateSet {
        device: DeviceIndex,
        old: DeviceState,
    },
    /// The whole ledger before (a few thousand records at most, rarely changed).
    HandoverTokens {
        old: Box<HandoverLedger>,
    },
    LayoutBumped {
        volume: VolumeId,
    },
    DeviceAdded {
        previous_next: DeviceIndex,
    },
    DeviceRemoved {
        index: usize,
        record: DeviceRecord,
        fencing: Option<(usize, super::DeviceFencing)>,
    },
    DeviceFencingSet {
        device: DeviceIndex,
        old: Option<bool>,
    },
    Remapped {
        volume: VolumeId,
        mirror_legs: u32,
        extents: Vec<LogicalExtent>,
        snapshots: Vec<(SnapshotId, Vec<LogicalExtent>)>,
    },
    IntentSet {
        volume: VolumeId,
        key: IntentKey,
        old: Option<(usize, IntentEntry)>,
    },
}

impl Undo {
    /// The snapshot record a [`MetaChange::SnapshotDelete`] removed.
    pub(crate) fn into_deleted_snapshot(self) -> Option<SnapshotRecord> {
        match self.0 {
            UndoStep::SnapshotDeleted { record, .. } => Some(record),
            _ => None,
        }
    }

    /// The volume record a [`MetaChange::VolumeDelete`] removed.
    pub(crate) fn into_deleted_volume(self) -> Option<VolumeRecord> {
        match self.0 {
            UndoStep::VolumeDeleted { record, .. } => Some(record),
            _ => None,
        }
    }
}

impl MetaChange {
    /// The change's kind, for messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MetaChange::ClientPut(_) => "client authorize",
            MetaChange::ClientRemove { .. } => "client revoke",
            MetaChange::VolumeCreate(_) => "volume create",
            MetaChange::VolumeGrow { .. } => "volume grow",
            MetaChange::VolumeDelete { .. } => "volume delete",
            MetaChange::SnapshotCreate(_) => "snapshot create",
            MetaChange::SnapshotDelete { .. } => "snapshot delete",
            MetaChange::CowRegister { .. } => "copy-on-write registration",
            MetaChange::HandleOpen(_) => "handle open",
            MetaChange::HandleRenew { .. } => "handle lease",
            MetaChange::HandleBreak { .. } => "handle break",
            MetaChange::HandleRemove { .. } => "handle remove",
            MetaChange::DeviceState { .. } => "device state",
            MetaChange::ClientScope { .. } => "client scope",
            MetaChange::HandoverTokens { .. } => "handover tokens",
            MetaChange::LayoutBump { .. } => "layout generation",
            MetaChange::DeviceAdd(_) => "device add",
            MetaChange::DeviceRemove { .. } => "device remove",
            MetaChange::VolumeRemap(_) => "volume remap",
            MetaChange::IntentSet { .. } => "write-intent set",
            MetaChange::RangeLocks { .. } => "range locks",
            MetaChange::VolumeCache { .. } => "volume cache",
            MetaChange::DeviceFencing { .. } => "device fencing",
            MetaChange::CacheMirror(_) => "cache mirror",
        }
    }

    /// The physical extents this change hands to a volume's data: what a
    /// volume could read the moment it is committed, so they must read as
    /// zeros before it is (a deleted volume's data must never show in the
    /// next one). A snapshot's copy-on-write area is not among them: only
    /// chunks written and then registered are ever read from it.
    pub fn new_volume_extents(&self) -> Vec<PhysicalExtent> {
        let extents: &[LogicalExtent] = match self {
            MetaChange::VolumeCreate(record) => &record.extents,
            MetaChange::VolumeGrow { added, .. } => added,
            _ => &[],
        };
        extents.iter().flat_map(|e| e.legs.iter().copied()).collect()
    }

    /// Every physical extent this change takes out of the free space
    /// (volume data and snapshot copy-on-write areas).
    pub fn allocated_extents(&self) -> Vec<PhysicalExtent> {
        match self {
            MetaChange::SnapshotCreate(s) => s.cow_extents.iter().flat_map(|e| e.legs.iter().copied()).collect(),
            // Every leg, the new ones among them (the copy wrote them whole).
            MetaChange::VolumeRemap(r) => r
                .extents
                .iter()
                .chain(r.snapshots.iter().flat_map(|(_, e)| e.iter()))
                .flat_map(|e| e.legs.iter().copied())
                .collect(),
            other => other.new_volume_extents(),
        }
    }
}

fn index_of<T>(items: &[T], pred: impl Fn(&T) -> bool) -> Option<usize> {
    items.iter().position(pred)
}

impl PoolMetadata {
    /// Applies `change` (see the module docs). On error nothing changed.
    /// Does not touch `generation`: the journal sets it per commit.
    pub fn apply(&mut self, change: &MetaChange) -> Result<Undo, ApplyError> {
        let fail = |reason: String| ApplyError { change: change.kind(), reason };
        let step = match change {
            MetaChange::ClientPut(record) => match index_of(&self.clients, |c| c.public_key == record.public_key) {
                Some(index) => {
                    let old = std::mem::replace(&mut self.clients[index], record.clone());
                    UndoStep::ClientReplaced { index, old }
                }
                None => {
                    self.clients.push(record.clone());
                    UndoStep::ClientAdded
                }
            },
            MetaChange::ClientRemove { key } => {
                let index = index_of(&self.clients, |c| c.public_key == *key)
                    .ok_or_else(|| fail(format!("key {key} is not authorized")))?;
                UndoStep::ClientRemoved { index, old: self.clients.remove(index) }
            }
            MetaChange::ClientScope { key, volumes } => {
                for v in volumes {
                    check_name("scoped volume name", v).map_err(fail)?;
                }
                let old = self.client_scopes.clone();
                self.client_scopes.retain(|s| s.key != *key);
                if !volumes.is_empty() {
                    self.client_scopes.push(ClientScope { key: *key, volumes: volumes.clone() });
                }
                UndoStep::ScopesReplaced { old }
            }
            MetaChange::VolumeCreate(record) => {
                self.check_new_volume(record).map_err(fail)?;
                let previous_next = self.next_ids.volume;
                self.volumes.push(record.clone());
                self.next_ids.volume = VolumeId(record.id.0 + 1);
                UndoStep::VolumeCreated { previous_next }
            }
            MetaChange::VolumeGrow { volume, size_bytes, added } => {
                let index = index_of(&self.volumes, |v| v.id == *volume)
                    .ok_or_else(|| fail(format!("volume {volume} does not exist")))?;
                let v = &self.volumes[index];
                if *size_bytes <= v.size_bytes || size_bytes % u64::from(v.block_bytes) != 0 {
                    return Err(fail(format!(
                        "{size_bytes} bytes is not a larger multiple of the block size than {}",
                        v.size_bytes
                    )));
                }
                if v.extents.len() as u64 + added.len() as u64 != size_bytes.div_ceil(self.extent_bytes) {
                    return Err(fail(format!("{} extents added do not make {size_bytes} bytes", added.len())));
                }
                for (i, e) in added.iter().enumerate() {
                    self.check_legs(e, v.mirror_legs).map_err(|e| fail(format!("added extent {i}: {e}")))?;
                }
                let v = &mut self.volumes[index];
                let old_size_bytes = v.size_bytes;
                v.extents.extend(added.iter().cloned());
                v.size_bytes = *size_bytes;
                v.layout_generation += 1;
                UndoStep::VolumeGrown { volume: *volume, old_size_bytes, added: added.len() }
            }
            MetaChange::VolumeDelete { volume } => {
                let index = index_of(&self.volumes, |v| v.id == *volume)
                    .ok_or_else(|| fail(format!("volume {volume} does not exist")))?;
                if self.handles.iter().any(|h| h.volume == *volume && matches!(h.state, HandleState::Active)) {
                    return Err(fail(format!("volume {volume} has active handles")));
                }
                if self.snapshots.iter().any(|s| s.volume == *volume) {
                    return Err(fail(format!("volume {volume} has snapshots")));
                }
                let mut handles = Vec::new();
                let mut kept = Vec::with_capacity(self.handles.len());
                for (i, h) in std::mem::take(&mut self.handles).into_iter().enumerate() {
                    if h.volume == *volume {
                        handles.push((i, h));
                    } else {
                        kept.push(h);
                    }
                }
                self.handles = kept;
                let cache =
                    index_of(&self.volume_caches, |c| c.volume == *volume).map(|i| (i, self.volume_caches.remove(i)));
                let mirror =
                    index_of(&self.cache_mirrors, |m| m.volume == *volume).map(|i| (i, self.cache_mirrors.remove(i)));
                UndoStep::VolumeDeleted { index, record: self.volumes.remove(index), handles, cache, mirror }
            }
            MetaChange::SnapshotCreate(s) => {
                self.check_new_snapshot(s).map_err(fail)?;
                let previous_next = self.next_ids.snapshot;
                self.snapshots.push(SnapshotRecord {
                    id: s.id,
                    volume: s.volume,
                    name: s.name.clone(),
                    created_generation: s.created_generation,
                    created_at_unix_secs: s.created_at_unix_secs,
                    cow_extents: s.cow_extents.clone(),
                    size_bytes: s.size_bytes,
                    chunk_bytes: s.chunk_bytes,
                    cow: CowMap::new(s.size_bytes.div_ceil(s.chunk_bytes)),
                });
                self.next_ids.snapshot = SnapshotId(s.id.0 + 1);
                if let Some(v) = self.volumes.iter_mut().find(|v| v.id == s.volume) {
                    v.layout_generation += 1;
                }
                UndoStep::SnapshotCreated { previous_next, volume: s.volume }
            }
            MetaChange::SnapshotDelete { snapshot, merge_into, merged, was_newest } => {
                let index = index_of(&self.snapshots, |s| s.id == *snapshot)
                    .ok_or_else(|| fail(format!("snapshot {snapshot} does not exist")))?;
                let s = &self.snapshots[index];
                let newest = !self.snapshots.iter().any(|o| o.volume == s.volume && o.id > s.id);
                if newest != *was_newest {
                    return Err(fail(format!("snapshot {snapshot} newest is {newest}, the change says {was_newest}")));
                }
                let older = match merge_into {
                    None if !merged.is_empty() => {
                        return Err(fail("chunks to merge but no snapshot to merge into".into()))
                    }
                    None => None,
                    Some(o) => {
                        let older = index_of(&self.snapshots, |x| x.id == *o)
                            .ok_or_else(|| fail(format!("snapshot {o} to merge into does not exist")))?;
                        let older_record = &self.snapshots[older];
                        if older_record.volume != s.volume || older_record.id >= s.id {
                            return Err(fail(format!("snapshot {o} is not an older snapshot of the same volume")));
                        }
                        merged.check_within(older_record.chunk_count()).map_err(fail)?;
                        if let Some(c) = merged.iter().find(|&c| !s.cow.contains(c)) {
                            return Err(fail(format!("chunk {c} has no pre-image in snapshot {snapshot}")));
                        }
                        Some(older)
                    }
                };
                let mut newly_set = Vec::new();
                if let Some(older) = older {
                    let cow = &mut self.snapshots[older].cow;
                    for c in merged.iter() {
                        if !cow.contains(c) {
                            cow.insert(c);
                            newly_set.push(c);
                        }
                    }
                }
                let record = self.snapshots.remove(index);
                if *was_newest {
                    if let Some(v) = self.volumes.iter_mut().find(|v| v.id == record.volume) {
                        v.layout_generation += 1;
                    }
                }
                UndoStep::SnapshotDeleted { index, record, merge_into: *merge_into, newly_set, bumped: *was_newest }
            }
            MetaChange::CowRegister { snapshot, chunks } => {
                let s = self
                    .snapshots
                    .iter_mut()
                    .find(|s| s.id == *snapshot)
                    .ok_or_else(|| fail(format!("snapshot {snapshot} does not exist")))?;
                chunks.check_within(s.chunk_count()).map_err(fail)?;
                let mut newly_set = Vec::new();
                for c in chunks.iter() {
                    if !s.cow.contains(c) {
                        s.cow.insert(c);
                        newly_set.push(c);
                    }
                }
                UndoStep::CowRegistered { snapshot: *snapshot, newly_set }
            }
            MetaChange::HandleOpen(record) => {
                if record.id < self.next_ids.handle {
                    return Err(fail(format!("handle id {} is not new (next is {})", record.id, self.next_ids.handle)));
                }
                if self.volume(record.volume).is_none() {
                    return Err(fail(format!("volume {} does not exist", record.volume)));
                }
                let previous_next = self.next_ids.handle;
                self.handles.push(record.clone());
                self.next_ids.handle = HandleId(record.id.0 + 1);
                UndoStep::HandleOpened { previous_next }
            }
            MetaChange::HandleRenew { handle, lease_expires_at_unix_ms } => {
                let h = self.handle_mut(*handle).ok_or_else(|| fail(format!("handle {handle} does not exist")))?;
                let old = std::mem::replace(&mut h.lease_expires_at_unix_ms, *lease_expires_at_unix_ms);
                UndoStep::HandleRenewed { handle: *handle, old }
            }
            MetaChange::HandleBreak { handle, reason, since_unix_secs } => {
                let h = self.handle_mut(*handle).ok_or_else(|| fail(format!("handle {handle} does not exist")))?;
                let state = HandleState::Broken { reason: reason.clone(), since_unix_secs: *since_unix_secs };
                let old = std::mem::replace(&mut h.state, state);
                UndoStep::HandleBroken { handle: *handle, old, locks: self.take_range_locks(*handle) }
            }
            MetaChange::HandleRemove { handle } => {
                let index = index_of(&self.handles, |h| h.id == *handle)
                    .ok_or_else(|| fail(format!("handle {handle} does not exist")))?;
                let record = self.handles.remove(index);
                UndoStep::HandleRemoved { index, record, locks: self.take_range_locks(*handle) }
            }
            MetaChange::DeviceFencing { device, fenced } => {
                if self.device(*device).is_none() {
                    return Err(fail(format!("device {device} does not exist")));
                }
                let old = self.set_device_fenced(*device, Some(*fenced));
                UndoStep::DeviceFencingSet { device: *device, old }
            }
            MetaChange::RangeLocks { handle, ranges } => {
                let old = self.set_range_locks(*handle, ranges).map_err(fail)?;
                UndoStep::RangeLocksSet { handle: *handle, old }
            }
            MetaChange::DeviceState { device, state } => {
                let d = self
                    .devices
                    .iter_mut()
                    .find(|d| d.index == *device)
                    .ok_or_else(|| fail(format!("device {device} does not exist")))?;
                UndoStep::DeviceStateSet { device: *device, old: std::mem::replace(&mut d.state, state.clone()) }
            }
            MetaChange::HandoverTokens { clock_unix_ms, used, forget } => {
                let mut next = self.handovers.clone();
                next.clock_floor_unix_ms = next.clock_floor_unix_ms.max(*clock_unix_ms);
                for nonce in forget {
                    let i = index_of(&next.used, |u| u.nonce == *nonce)
                        .ok_or_else(|| fail("a token to forget was never recorded".into()))?;
                    if next.used[i].expires_at_unix_ms > next.clock_floor_unix_ms {
                        return Err(fail("a token to forget has not expired".into()));
                    }
                    next.used.remove(i);
                }
                if let Some(u) = used {
                    if next.is_used(&u.nonce) {
                        return Err(fail("the token was already used".into()));
                    }
                    next.used.push(*u);
                }
                next.check().map_err(fail)?;
                UndoStep::HandoverTokens { old: Box::new(std::mem::replace(&mut self.handovers, next)) }
            }
            MetaChange::LayoutBump { volume } => {
                let v = self
                    .volumes
                    .iter_mut()
                    .find(|v| v.id == *volume)
                    .ok_or_else(|| fail(format!("volume {volume} does not exist")))?;
                v.layout_generation += 1;
                UndoStep::LayoutBumped { volume: *volume }
            }
            MetaChange::DeviceAdd(record) => {
                self.check_new_device(record).map_err(fail)?;
                let previous_next = self.next_ids.device;
                self.devices.push(record.clone());
                self.next_ids.device = DeviceIndex(record.index.0 + 1);
                UndoStep::DeviceAdded { previous_next }
            }
            MetaChange::DeviceRemove { device } => {
                let index = index_of(&self.devices, |d| d.index == *device)
                    .ok_or_else(|| fail(format!("device {device} does not exist")))?;
                if self.devices[index].holds_metadata {
                    return Err(fail(format!("device {device} holds a metadata copy")));
                }
                if let Some(what) = self.extents_on(*device).next() {
                    return Err(fail(format!("device {device} still holds an extent of {what}")));
                }
                let fencing =
                    index_of(&self.device_fencing, |f| f.device == *device).map(|i| (i, self.device_fencing.remove(i)));
                UndoStep::DeviceRemoved { index, record: self.devices.remove(index), fencing }
            }
            MetaChange::VolumeRemap(remap) => {
                self.check_remap(remap).map_err(fail)?;
                let v = self.volumes.iter_mut().find(|v| v.id == remap.volume).expect("checked");
                let mirror_legs = std::mem::replace(&mut v.mirror_legs, remap.mirror_legs);
                let extents = std::mem::replace(&mut v.extents, remap.extents.clone());
                v.layout_generation += 1;
                let mut snapshots = Vec::new();
                for (id, cow) in &remap.snapshots {
                    let s = self.snapshots.iter_mut().find(|s| s.id == *id).expect("checked");
                    snapshots.push((*id, std::mem::replace(&mut s.cow_extents, cow.clone())));
                }
                UndoStep::Remapped { volume: remap.volume, mirror_legs, extents, snapshots }
            }
            MetaChange::IntentSet { volume, key, regions } => {
                let old = self.set_intent(*volume, *key, regions).map_err(fail)?;
                UndoStep::IntentSet { volume: *volume, key: *key, old }
            }
            MetaChange::VolumeCache { volume, cache } => {
                if !self.volumes.iter().any(|v| v.id == *volume) {
                    return Err(fail(format!("volume {volume} does not exist")));
                }
                if let Some(c) = cache {
                    if c.volume != *volume {
                        return Err(fail(format!("the cache names volume {}, not {volume}", c.volume)));
                    }
                    if !(super::CACHE_BYTES_MIN..=super::CACHE_BYTES_MAX).contains(&c.size_bytes) {
                        return Err(fail(format!(
                            "cache size {} is outside {}..={} bytes",
                            c.size_bytes,
                            super::CACHE_BYTES_MIN,
                            super::CACHE_BYTES_MAX
                        )));
                    }
                }
                let old = self.volume_caches.clone();
                self.volume_caches.retain(|c| c.volume != *volume);
                if let Some(c) = cache {
                    self.volume_caches.push(*c);
                    self.volume_caches.sort_by_key(|c| c.volume);
                }
                UndoStep::CachesReplaced { old }
            }
            MetaChange::CacheMirror(record) => {
                if !self.volumes.iter().any(|v| v.id == record.volume) {
                    return Err(fail(format!("volume {} does not exist", record.volume)));
                }
                if record.server.len() > 255 {
                    return Err(fail("the cache mirror's server name is over 255 bytes".into()));
                }
                if let Some(now) = self.cache_mirror(record.volume) {
                    let rises = record.generation > now.generation && record.pending;
                    if !(rises || record.generation == now.generation) {
                        return Err(fail(format!(
                            "the cache mirror of volume {} is at generation {}: {} is not the same, nor a new \
                             (higher, pending) one",
                            record.volume, now.generation, record.generation
                        )));
                    }
                }
                let old = self.cache_mirrors.clone();
                self.cache_mirrors.retain(|m| m.volume != record.volume);
                self.cache_mirrors.push(record.clone());
                self.cache_mirrors.sort_by_key(|m| m.volume);
                UndoStep::MirrorsReplaced { old }
            }
        };
        Ok(Undo(step))
    }

    /// Applies `changes` in order, all or nothing.
    pub fn apply_all(&mut self, changes: &[MetaChange]) -> Result<Vec<Undo>, ApplyError> {
        let mut undos = Vec::with_capacity(changes.len());
        for change in changes {
            match self.apply(change) {
                Ok(undo) => undos.push(undo),
                Err(e) => {
                    self.revert_all(undos);
                    return Err(e);
                }
            }
        }
        Ok(undos)
    }

    /// Takes back applied changes, given their undo records in the order
    /// they were applied (reverted last first).
    pub fn revert_all(&mut self, undos: Vec<Undo>) {
        for undo in undos.into_iter().rev() {
            self.revert(undo);
        }
    }

    /// Takes back the last applied change. `undo` must be the record of the
    /// last change applied to this state and not yet reverted.
    pub fn revert(&mut self, undo: Undo) {
        match undo.0 {
            UndoStep::ScopesReplaced { old } => self.client_scopes = old,
            UndoStep::ClientAdded => {
                self.clients.pop();
            }
            UndoStep::ClientReplaced { index, old } => {
                if let Some(c) = self.clients.get_mut(index) {
                    *c = old;
                }
            }
            UndoStep::ClientRemoved { index, old } => self.clients.insert(index.min(self.clients.len()), old),
            UndoStep::VolumeCreated { previous_next } => {
                self.volumes.pop();
                self.next_ids.volume = previous_next;
            }
            UndoStep::VolumeGrown { volume, old_size_bytes, added } => {
                if let Some(v) = self.volumes.iter_mut().find(|v| v.id == volume) {
                    v.extents.truncate(v.extents.len().saturating_sub(added));
                    v.size_bytes = old_size_bytes;
                    v.layout_generation -= 1;
                }
            }
            UndoStep::VolumeDeleted { index, record, handles, cache, mirror } => {
                self.volumes.insert(index.min(self.volumes.len()), record);
                if let Some((i, c)) = cache {
                    self.volume_caches.insert(i.min(self.volume_caches.len()), c);
                }
                if let Some((i, m)) = mirror {
                    self.cache_mirrors.insert(i.min(self.cache_mirrors.len()), m);
                }
                for (i, h) in handles {
                    self.handles.insert(i.min(self.handles.len()), h);
                }
            }
            UndoStep::SnapshotCreated { previous_next, volume } => {
                self.snapshots.pop();
                self.next_ids.snapshot = previous_next;
                if let Some(v) = self.volumes.iter_mut().find(|v| v.id == volume) {
                    v.layout_generation -= 1;
                }
            }
            UndoStep::SnapshotDeleted { index, record, merge_into, newly_set, bumped } => {
                if let Some(o) = merge_into.and_then(|o| self.snapshots.iter_mut().find(|s| s.id == o)) {
                    for c in newly_set {
                        o.cow.remove(c);
                    }
                }
                if bumped {
                    if let Some(v) = self.volumes.iter_mut().find(|v| v.id == record.volume) {
                        v.layout_generation -= 1;
                    }
                }
                self.snapshots.insert(index.min(self.snapshots.len()), record);
            }
            UndoStep::CowRegistered { snapshot, newly_set } => {
                if let Some(s) = self.snapshots.iter_mut().find(|s| s.id == snapshot) {
                    for c in newly_set {
                        s.cow.remove(c);
                    }
                }
            }
            UndoStep::HandleOpened { previous_next } => {
                self.handles.pop();
                self.next_ids.handle = previous_next;
            }
            UndoStep::HandleRenewed { handle, old } => {
                if let Some(h) = self.handle_mut(handle) {
                    h.lease_expires_at_unix_ms = old;
                }
            }
            UndoStep::HandleBroken { handle, old, locks } => {
                if let Some(h) = self.handle_mut(handle) {
                    h.state = old;
                }
                self.restore_range_locks(handle, locks);
            }
            UndoStep::HandleRemoved { index, record, locks } => {
                let handle = record.id;
                self.handles.insert(index.min(self.handles.len()), record);
                self.restore_range_locks(handle, locks);
            }
            UndoStep::RangeLocksSet { handle, old } => self.restore_range_locks(handle, old),
            UndoStep::DeviceStateSet { device, old } => {
                if let Some(d) = self.devices.iter_mut().find(|d| d.index == device) {
                    d.state = old;
                }
            }
            UndoStep::HandoverTokens { old } => self.handovers = *old,
            UndoStep::CachesReplaced { old } => self.volume_caches = old,
            UndoStep::MirrorsReplaced { old } => self.cache_mirrors = old,
            UndoStep::LayoutBumped { volume } => {
                if let Some(v) = self.volumes.iter_mut().find(|v| v.id == volume) {
                    v.layout_generation -= 1;
                }
            }
            UndoStep::DeviceAdded { previous_next } => {
                self.devices.pop();
                self.next_ids.device = previous_next;
            }
            UndoStep::DeviceRemoved { index, record, fencing } => {
                self.devices.insert(index.min(self.devices.len()), record);
                if let Some((i, f)) = fencing {
                    self.device_fencing.insert(i.min(self.device_fencing.len()), f);
                }
            }
            UndoStep::DeviceFencingSet { device, old } => {
                self.set_device_fenced(device, old);
            }
            UndoStep::Remapped { volume, mirror_legs, extents, snapshots } => {
                if let Some(v) = self.volumes.iter_mut().find(|v| v.id == volume) {
                    v.mirror_legs = mirror_legs;
                    v.extents = extents;
                    v.layout_generation -= 1;
                }
                for (id, cow) in snapshots {
                    if let Some(s) = self.snapshots.iter_mut().find(|s| s.id == id) {
                        s.cow_extents = cow;
                    }
                }
            }
            UndoStep::IntentSet { volume, key, old } => self.unset_intent(volume, key, old),
        }
    }

    fn handle_mut(&mut self, id: HandleId) -> Option<&mut HandleRecord> {
        self.handles.iter_mut().find(|h| h.id == id)
    }

    /// Checks one extent's legs: the right count, distinct known devices,
    /// extent-aligned offsets inside their data areas.
    fn check_legs(&self, extent: &LogicalExtent, legs: u32) -> Result<(), String> {
        if extent.legs.len() != legs as usize {
            return Err(format!("{} legs, expected {legs}", extent.legs.len()));
        }
        for (j, leg) in extent.legs.iter().enumerate() {
            if extent.legs[..j].iter().any(|o| o.device == leg.device) {
                return Err(format!("two legs on device {}", leg.device));
            }
            let device = self.device(leg.device).ok_or_else(|| format!("leg on unknown device {}", leg.device))?;
            if !device.data.contains(leg.offset) || leg.offset % self.extent_bytes.max(1) != 0 {
                return Err(format!("leg {leg} is not an extent of the data area {}", device.data));
            }
        }
        Ok(())
    }

    fn check_new_volume(&self, v: &VolumeRecord) -> Result<(), String> {
        if v.id < self.next_ids.volume {
            return Err(format!("volume id {} is not new (next is {})", v.id, self.next_ids.volume));
        }
        check_name("volume name", &v.name)?;
        if self.volume_by_name(&v.name).is_some() {
            return Err(format!("a volume named {:?} exists", v.name));
        }
        if !(1..=MIRROR_LEGS_MAX).contains(&v.mirror_legs) {
            return Err(format!("{} mirror legs outside 1..={MIRROR_LEGS_MAX}", v.mirror_legs));
        }
        check_block_bytes(v.block_bytes, self.extent_bytes)?;
        if v.size_bytes == 0 || v.size_bytes % u64::from(v.block_bytes) != 0 {
            return Err(format!("size {} is not a positive multiple of the block size", v.size_bytes));
        }
        if v.extents.len() as u64 != v.size_bytes.div_ceil(self.extent_bytes) {
            return Err(format!("{} extents for {} bytes", v.extents.len(), v.size_bytes));
        }
        for (i, e) in v.extents.iter().enumerate() {
            self.check_legs(e, v.mirror_legs).map_err(|e| format!("extent {i}: {e}"))?;
        }
        Ok(())
    }

    /// Sets (or with `None` forgets) whether `device` fences, keeping the
    /// records sorted; returns what was recorded before.
    fn set_device_fenced(&mut self, device: DeviceIndex, fenced: Option<bool>) -> Option<bool> {
        let at = self.device_fencing.binary_search_by_key(&device, |f| f.device);
        match (at, fenced) {
            (Ok(i), Some(fenced)) => Some(std::mem::replace(&mut self.device_fencing[i].fenced, fenced)),
            (Ok(i), None) => Some(self.device_fencing.remove(i).fenced),
            (Err(i), Some(fenced)) => {
                self.device_fencing.insert(i, super::DeviceFencing { device, fenced });
                None
            }
            (Err(_), None) => None,
        }
    }

    fn check_new_device(&self, d: &DeviceRecord) -> Result<(), String> {
        if d.index < self.next_ids.device || d.index.0 == u32::MAX {
            return Err(format!("device index {} is not new (next is {})", d.index, self.next_ids.device));
        }
        if d.uri.is_empty() || d.uri.len() > 4096 {
            return Err("the device URI is empty or oversized".into());
        }
        if self.devices.iter().any(|o| o.device_uuid == d.device_uuid || o.uri == d.uri) {
            return Err(format!("device {} ({}) is already in the pool", d.device_uuid, d.uri));
        }
        let extent_bytes = self.extent_bytes.max(1);
        if d.data.start % extent_bytes != 0 || d.data.len_bytes() % extent_bytes != 0 || d.data.end > d.device_bytes {
            return Err(format!("data area {} is not whole extents within {} bytes", d.data, d.device_bytes));
        }
        Ok(())
    }

    /// Whether `remap` applies: its volume and every one of its snapshots
    /// are named, the extent counts are unchanged, every extent has the new
    /// leg count on distinct devices, and a leg the volume did not have
    /// before is free.
    fn check_remap(&self, remap: &Remap) -> Result<(), String> {
        let v = self.volume(remap.volume).ok_or_else(|| format!("volume {} does not exist", remap.volume))?;
        if !(1..=MIRROR_LEGS_MAX).contains(&remap.mirror_legs) {
            return Err(format!("{} mirror legs outside 1..={MIRROR_LEGS_MAX}", remap.mirror_legs));
        }
        if remap.extents.len() != v.extents.len() {
            return Err(format!("{} extents for a volume of {}", remap.extents.len(), v.extents.len()));
        }
        let mut old: std::collections::HashSet<PhysicalExtent> =
            v.extents.iter().flat_map(|e| e.legs.iter().copied()).collect();
        let snapshots: Vec<&SnapshotRecord> = self.snapshots.iter().filter(|s| s.volume == v.id).collect();
        if snapshots.len() != remap.snapshots.len() {
            return Err(format!("{} snapshots for a volume with {}", remap.snapshots.len(), snapshots.len()));
        }
        for (id, cow) in &remap.snapshots {
            let s =
                snapshots.iter().find(|s| s.id == *id).ok_or_else(|| format!("snapshot {id} is not the volume's"))?;
            if cow.len() != s.cow_extents.len() {
                return Err(format!("{} COW extents for snapshot {id} of {}", cow.len(), s.cow_extents.len()));
            }
            old.extend(s.cow_extents.iter().flat_map(|e| e.legs.iter().copied()));
        }
        let all = remap.extents.iter().chain(remap.snapshots.iter().flat_map(|(_, e)| e.iter()));
        let free = self.free_extents();
        let mut seen = std::collections::HashSet::new();
        for (i, e) in all.enumerate() {
            self.check_legs(e, remap.mirror_legs).map_err(|e| format!("extent {i}: {e}"))?;
            for leg in &e.legs {
                if !seen.insert(*leg) {
                    return Err(format!("leg {leg} is used twice"));
                }
                let is_free = free.per_device.get(&leg.device).is_some_and(|f| f.binary_search(&leg.offset).is_ok());
                if !old.contains(leg) && !is_free {
                    return Err(format!("new leg {leg} is not a free extent of an online device"));
                }
            }
        }
        Ok(())
    }

    /// What uses extents on `device`: "volume NAME" or "snapshot NAME",
    /// once per extent leg.
    pub fn extents_on(&self, device: DeviceIndex) -> impl Iterator<Item = String> + '_ {
        let on = move |e: &&LogicalExtent| e.legs.iter().any(|l| l.device == device);
        let live = self
            .volumes
            .iter()
            .flat_map(move |v| v.extents.iter().filter(on).map(move |_| format!("volume {}", v.name)));
        let cow = self
            .snapshots
            .iter()
            .flat_map(move |s| s.cow_extents.iter().filter(on).map(move |_| format!("snapshot {}", s.name)));
        live.chain(cow)
    }

    fn check_new_snapshot(&self, s: &NewSnapshot) -> Result<(), String> {
        if s.id < self.next_ids.snapshot {
            return Err(format!("snapshot id {} is not new (next is {})", s.id, self.next_ids.snapshot));
        }
        check_name("snapshot name", &s.name)?;
        let v = self.volume(s.volume).ok_or_else(|| format!("volume {} does not exist", s.volume))?;
        if self.snapshot_by_name(s.volume, &s.name).is_some() {
            return Err(format!("volume {} already has a snapshot named {:?}", v.name, s.name));
        }
        if !s.chunk_bytes.is_power_of_two() || s.chunk_bytes > self.extent_bytes || s.chunk_bytes < 4096 {
            return Err(format!("chunk size {} is not a power of two in 4096..=extent size", s.chunk_bytes));
        }
        if s.size_bytes == 0 || s.size_bytes > v.size_bytes {
            return Err(format!("size {} is not within the volume's {}", s.size_bytes, v.size_bytes));
        }
        if s.cow_extents.len() as u64 != s.size_bytes.div_ceil(self.extent_bytes) {
            return Err(format!("{} COW extents for {} bytes", s.cow_extents.len(), s.size_bytes));
        }
        for (i, e) in s.cow_extents.iter().enumerate() {
            self.check_legs(e, v.mirror_legs).map_err(|e| format!("COW extent {i}: {e}"))?;
        }
        Ok(())
    }

    /// The changes that mark `handles` broken for `reason`, then drop the
    /// oldest broken records beyond `broken_records_max` (they only exist to
    /// answer late resumes, and must not grow without bound).
    pub fn plan_break_handles(
        &self,
        handles: &[HandleId],
        reason: &str,
        since_unix_secs: u64,
        broken_records_max: usize,
    ) -> Vec<MetaChange> {
        let mut changes = Vec::new();
        let mut broken: Vec<(u64, HandleId)> = Vec::new();
        for h in &self.handles {
            if handles.contains(&h.id) {
                changes.push(MetaChange::HandleBreak { handle: h.id, reason: reason.to_string(), since_unix_secs });
                broken.push((since_unix_secs, h.id));
            } else if let HandleState::Broken { since_unix_secs, .. } = &h.state {
                broken.push((*since_unix_secs, h.id));
            }
        }
        if broken.len() > broken_records_max {
            broken.sort();
            let excess = broken.len() - broken_records_max;
            changes.extend(broken[..excess].iter().map(|&(_, handle)| MetaChange::HandleRemove { handle }));
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::{plan_step, pool, rich_pool, EXTENT};
    use crate::metadata::OpenMode;
    use proptest::prelude::*;
    use uuid::Uuid;

    #[test]
    fn chunk_runs() {
        let runs = ChunkRuns::from_chunks([9, 3, 4, 5, 5, 100, 8]);
        assert_eq!(
            runs.runs(),
            &[ChunkRun { first: 3, count: 3 }, ChunkRun { first: 8, count: 2 }, ChunkRun { first: 100, count: 1 }]
        );
        assert_eq!(runs.len(), 6);
        assert_eq!(runs.iter().collect::<Vec<_>>(), vec![3, 4, 5, 8, 9, 100]);
        assert!(runs.check_within(101).is_ok());
        assert!(runs.check_within(100).is_err());
        let touching = ChunkRuns { runs: vec![ChunkRun { first: 0, count: 2 }, ChunkRun { first: 2, count: 1 }] };
        assert!(touching.check_within(10).is_err());
        let empty = ChunkRuns { runs: vec![ChunkRun { first: 0, count: 0 }] };
        assert!(empty.check_within(10).is_err());
        let overflow = ChunkRuns { runs: vec![ChunkRun { first: u64::MAX, count: 2 }] };
        assert!(overflow.check_within(u64::MAX).is_err());
    }

    /// A 16-chunk registration is bytes, whatever the volume size.
    #[test]
    fn cow_registration_is_small() {
        let chunks = ChunkRuns::from_chunks((0..16).map(|i| i * 1000));
        let change = MetaChange::CowRegister { snapshot: SnapshotId(1), chunks };
        let bytes = crate::codec::encode(&change).unwrap();
        assert!(bytes.len() <= 4 + 8 + 8 + 16 * 16, "{} bytes", bytes.len());
    }

    #[test]
    fn refused_changes_change_nothing() {
        let mut meta = rich_pool();
        let before = meta.clone();
        let bad = [
            MetaChange::ClientRemove { key: PublicKey([9; 32]) },
            MetaChange::VolumeDelete { volume: VolumeId(1) },
            MetaChange::VolumeGrow { volume: VolumeId(2), size_bytes: 4096, added: vec![] },
            MetaChange::CowRegister { snapshot: SnapshotId(1), chunks: ChunkRuns::from_chunks([1 << 30]) },
            MetaChange::HandleRemove { handle: HandleId(77) },
            MetaChange::HandleOpen(meta.handles[0].clone()),
            MetaChange::VolumeCreate(meta.volumes[0].clone()),
            MetaChange::DeviceState { device: DeviceIndex(9), state: DeviceState::Online },
            MetaChange::SnapshotDelete {
                snapshot: SnapshotId(1),
                merge_into: None,
                merged: ChunkRuns::from_chunks([0]),
                was_newest: true,
            },
        ];
        for change in &bad {
            let err = meta.apply(change).unwrap_err();
            assert_eq!(err.change, change.kind());
            assert_eq!(meta, before, "{change:?}");
        }
        // All or nothing over several.
        let good = MetaChange::DeviceState { device: DeviceIndex(2), state: DeviceState::Online };
        assert!(meta.apply_all(&[good, bad[0].clone()]).is_err());
        assert_eq!(meta, before);
    }

    #[test]
    fn volume_delete_takes_its_broken_handles_and_reverts_them_in_place() {
        let mut meta = rich_pool();
        let beta = meta.volume_by_name("beta").unwrap().id;
        let mut record = meta.handles[0].clone();
        for (id, volume) in [(5, beta), (6, meta.handles[0].volume), (7, beta)] {
            record.id = HandleId(id);
            record.volume = volume;
            record.state = HandleState::Broken { reason: "x".into(), since_unix_secs: id };
            meta.apply(&MetaChange::HandleOpen(record.clone())).unwrap();
        }
        let before = meta.clone();
        let undo = meta.apply(&MetaChange::VolumeDelete { volume: beta }).unwrap();
        assert!(meta.handles.iter().all(|h| h.volume != beta));
        assert_eq!(meta.handles.len(), 2);
        meta.revert(undo);
        assert_eq!(meta, before);
    }

    #[test]
    fn volume_cache_is_set_replaced_removed_and_goes_with_its_volume() {
        use crate::metadata::{CacheMode, VolumeCache};
        let mut meta = rich_pool();
        let beta = meta.volume_by_name("beta").unwrap().id;
        let cache = |size_bytes| VolumeCache { volume: beta, size_bytes, mode: CacheMode::Mirrored };
        let before = meta.clone();
        let set = meta.apply(&MetaChange::VolumeCache { volume: beta, cache: Some(cache(64 << 20)) }).unwrap();
        assert_eq!(meta.volume_cache(beta), Some(cache(64 << 20)));
        let bigger = meta.apply(&MetaChange::VolumeCache { volume: beta, cache: Some(cache(128 << 20)) }).unwrap();
        assert_eq!(meta.volume_caches, vec![cache(128 << 20)], "replaced, not added");
        meta.revert(bigger);
        assert_eq!(meta.volume_cache(beta), Some(cache(64 << 20)));
        for bad in [
            MetaChange::VolumeCache { volume: VolumeId(99), cache: None },
            MetaChange::VolumeCache { volume: beta, cache: Some(cache(1 << 20)) },
            MetaChange::VolumeCache {
                volume: beta,
                cache: Some(VolumeCache { volume: VolumeId(1), ..cache(64 << 20) }),
            },
        ] {
            let kept = meta.clone();
            assert!(meta.apply(&bad).is_err(), "{bad:?}");
            assert_eq!(meta, kept);
        }
        let with_cache = meta.clone();
        let undo = meta.apply(&MetaChange::VolumeDelete { volume: beta }).unwrap();
        assert!(meta.volume_caches.is_empty(), "a deleted volume's cache goes with it");
        meta.revert(undo);
        assert_eq!(meta, with_cache);
        let off = meta.apply(&MetaChange::VolumeCache { volume: beta, cache: None }).unwrap();
        assert_eq!(meta.volume_cache(beta), None);
        meta.revert(off);
        meta.revert(set);
        assert_eq!(meta, before);
    }

    #[test]
    fn a_cache_mirror_generation_only_rises_when_mirroring_starts_and_goes_with_its_volume() {
        let mut meta = rich_pool();
        let beta = meta.volume_by_name("beta").unwrap().id;
        let at = |generation, pending| CacheMirrorRecord { volume: beta, generation, server: "mds-a".into(), pending };
        let before = meta.clone();
        let first = meta.apply(&MetaChange::CacheMirror(at(1, true))).unwrap();
        let cleared = meta.apply(&MetaChange::CacheMirror(at(1, false))).unwrap();
        assert_eq!(meta.cache_mirror(beta), Some(&at(1, false)));
        for bad in [
            at(0, true),  // lower
            at(2, false), // higher without starting afresh
            CacheMirrorRecord { volume: VolumeId(99), ..at(2, true) },
            CacheMirrorRecord { server: "x".repeat(256), ..at(2, true) },
        ] {
            let kept = meta.clone();
            assert!(meta.apply(&MetaChange::CacheMirror(bad.clone())).is_err(), "{bad:?}");
            assert_eq!(meta, kept);
        }
        let second = meta.apply(&MetaChange::CacheMirror(at(2, true))).unwrap();
        assert_eq!(meta.cache_mirrors, vec![at(2, true)], "replaced, not added");
        meta.check().unwrap();
        let with_mirror = meta.clone();
        let undo = meta.apply(&MetaChange::VolumeDelete { volume: beta }).unwrap();
        assert!(meta.cache_mirrors.is_empty(), "a deleted volume's mirror record goes with it");
        meta.revert(undo);
        assert_eq!(meta, with_mirror);
        for undo in [second, cleared, first] {
            meta.revert(undo);
        }
        assert_eq!(meta, before);
    }

    #[test]
    fn break_plan_keeps_a_bounded_number_of_broken_records() {
        let mut meta = pool(&[4]);
        let v = meta.create_volume("v", EXTENT, 4096, 1, 0).unwrap();
        for id in 1..=4 {
            let record = HandleRecord {
                id: HandleId(id),
                volume: v,
                agent_key: PublicKey([1; 32]),
                agent_name: "a".into(),
                agent_instance: Uuid::from_u128(1),
                mode: OpenMode::SharedWrite,
                opened_at_unix_secs: 0,
                lease_expires_at_unix_ms: 0,
                durable_timeout_ms: 0,
                state: if id <= 2 {
                    HandleState::Broken { reason: "old".into(), since_unix_secs: 10 + id }
                } else {
                    HandleState::Active
                },
            };
            meta.apply(&MetaChange::HandleOpen(record)).unwrap();
        }
        let changes = meta.plan_break_handles(&[HandleId(4)], "taken", 100, 2);
        assert_eq!(
            changes,
            vec![
                MetaChange::HandleBreak { handle: HandleId(4), reason: "taken".into(), since_unix_secs: 100 },
                MetaChange::HandleRemove { handle: HandleId(1) },
            ]
        );
        meta.apply_all(&changes).unwrap();
        assert_eq!(meta.handles.iter().map(|h| h.id.0).collect::<Vec<_>>(), vec![2, 3, 4]);
    }

    /// Changes a random walk over a pool tries: some refused, most not.
    fn arb_step() -> impl Strategy<Value = (u8, u64, u64)> {
        (0u8..15, any::<u64>(), any::<u64>())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Planned changes keep the metadata valid, survive an encode and
        /// decode unchanged, and their undo records restore every earlier
        /// state exactly, in reverse order.
        #[test]
        fn planned_changes_apply_round_trip_and_revert(steps in proptest::collection::vec(arb_step(), 1..60)) {
            let mut meta = pool(&[8, 8, 8]);
            let mut history = vec![meta.clone()];
            let mut undos = Vec::new();
            for (k, a, b) in steps {
                let Some(change) = plan_step(&meta, k, a, b) else { continue };
                let decoded: MetaChange = crate::codec::decode(&crate::codec::encode(&change).unwrap()).unwrap();
                prop_assert_eq!(&decoded, &change);
                let undo = meta.apply(&decoded).unwrap();
                meta.check().unwrap();
                undos.push(undo);
                history.push(meta.clone());
            }
            history.pop();
            while let Some(undo) = undos.pop() {
                meta.revert(undo);
                prop_assert_eq!(&meta, &history.pop().unwrap());
            }
        }
    }

    #[test]
    fn a_client_scope_is_set_replaced_removed_and_reverted() {
        let mut meta = crate::metadata::testing::rich_pool();
        let key = PublicKey([5; 32]);
        let before = meta.clone();
        let set = |volumes: &[&str]| MetaChange::ClientScope {
            key,
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
        };
        let u1 = meta.apply(&set(&["db", "web"])).unwrap();
        assert_eq!(meta.scope_of(&key), Some(&["db".to_string(), "web".to_string()][..]));
        let u2 = meta.apply(&set(&["db"])).unwrap();
        assert_eq!(meta.scope_of(&key), Some(&["db".to_string()][..]));
        let u3 = meta.apply(&set(&[])).unwrap();
        assert_eq!(meta.scope_of(&key), None);
        meta.check().unwrap();
        meta.revert_all(vec![u1, u2, u3]);
        assert_eq!(meta, before);
        assert!(meta.apply(&set(&["bad\nname"])).is_err());
        let decoded: MetaChange = crate::codec::decode(&crate::codec::encode(&set(&["db"])).unwrap()).unwrap();
        assert_eq!(decoded, set(&["db"]));
    }
}
