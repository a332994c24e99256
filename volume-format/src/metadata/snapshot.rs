//! Snapshots: the copy-on-write (COW) map, where a snapshot's blocks are read
//! from, the changed-block list between two snapshots, and snapshot
//! create/delete on the pool metadata.
//!
//! The model (ARCHITECTURE.md, "Snapshots and backup"):
//! - A snapshot of a volume is taken at a recall point. From then on, before
//!   an agent first modifies a **chunk** ([`COW_CHUNK_BYTES`]) of the volume,
//!   it copies the chunk's unmodified bytes into the snapshot's COW area and
//!   registers the chunk in the snapshot's [`CowMap`] at the server; only
//!   after the server has committed the registration does it overwrite.
//! - The COW area is direct-mapped and as large as the volume was when the
//!   snapshot was taken: chunk `c` lives at byte `c * chunk_bytes` of the
//!   area's extents. Why not allocate COW space as chunks are registered: the
//!   agent must know where to copy *before* it registers, and a thick area
//!   can never run out, so a snapshot never becomes invalid under a heavy
//!   writer. The cost is space (shown by `sanvol snapshot list`). Which
//!   devices and offsets that is: [`crate::mapping::CowArea`].
//! - Only the **newest** snapshot of a volume receives pre-images. Chunk `c`
//!   of an older snapshot `S` reads from the first snapshot, going from `S`
//!   towards newer ones, whose COW map holds `c`; if none does, from the
//!   live volume ([`PoolMetadata::snapshot_source`]). That is correct because
//!   a chunk registered in a newer snapshot `N` but not in `S` was not
//!   modified between `S` and `N`, so `N`'s pre-image is `S`'s content too.
//! - Deleting a snapshot first merges its pre-images into the next older
//!   snapshot for the chunks that one lacks (the server copies them), so the
//!   fall-through above stays correct ([`PoolMetadata::snapshot_delete_plan`]).
//! - The chunks written between two snapshots `A` (older) and `B` are the
//!   union of the COW maps of `A` and every snapshot after it up to (not
//!   including) `B`, plus any chunk the volume grew by in between
//!   ([`PoolMetadata::changed_between`]). Chunk granularity: a write of one
//!   byte marks its whole chunk; a chunk is never missed.

use serde::{Deserialize, Serialize};

use super::alloc::{allocate, planned_change_refused, AllocError};
use super::change::{ChunkRuns, MetaChange, NewSnapshot};
use super::{check_name, PoolMetadata, SnapshotRecord};
use crate::ids::{SnapshotId, VolumeId};

/// The copy-on-write unit, and the granularity of changed-block lists.
/// (Capped at the extent size for pools with tiny extents.)
pub const COW_CHUNK_BYTES: u64 = 64 << 10;

/// Which chunks of a snapshot hold a pre-image in its COW area: one bit per
/// chunk of the snapshot's size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct CowMap {
    chunks: u64,
    words: Vec<u64>,
}

impl CowMap {
    pub fn new(chunks: u64) -> CowMap {
        CowMap { chunks, words: vec![0; chunks.div_ceil(64) as usize] }
    }

    /// Number of chunks the map covers.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    pub fn contains(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.words.get((chunk / 64) as usize).is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// Sets `chunk`; false if it is beyond the map.
    pub fn insert(&mut self, chunk: u64) -> bool {
        if chunk >= self.chunks {
            return false;
        }
        match self.words.get_mut((chunk / 64) as usize) {
            Some(w) => {
                *w |= 1 << (chunk % 64);
                true
            }
            None => false,
        }
    }

    /// Number of chunks set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The chunks set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(i, &w)| (0..64u64).filter(move |b| w & (1 << b) != 0).map(move |b| i as u64 * 64 + b))
    }

    /// Clears `chunk` (undoing a registration).
    pub fn remove(&mut self, chunk: u64) {
        if let Some(w) = self.words.get_mut((chunk / 64) as usize) {
            *w &= !(1 << (chunk % 64));
        }
    }

    /// Sets every chunk set in `other` (within this map's range).
    pub fn union_with(&mut self, other: &CowMap) {
        for c in other.iter() {
            self.insert(c);
        }
    }

    /// Whether the word vector matches the chunk count (decoded maps are
    /// checked before use) and no bit beyond `chunks` is set.
    pub fn is_consistent(&self) -> bool {
        self.words.len() as u64 == self.chunks.div_ceil(64)
            && (self.chunks % 64 == 0 || self.words.last().is_none_or(|w| w >> (self.chunks % 64) == 0))
    }
}

/// Where chunk `c` of a snapshot reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSource {
    /// The COW area of this snapshot (the one asked for, or a newer one).
    Cow(SnapshotId),
    /// The live volume.
    Live,
}

/// What deleting a snapshot takes: pre-images to copy into the next older
/// snapshot first (chunk numbers), if there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletePlan {
    pub snapshot: SnapshotId,
    pub merge_into: Option<SnapshotId>,
    pub chunks: Vec<u64>,
    /// Deleting the newest changes where agents copy pre-images to: their
    /// layout is recalled and republished.
    pub was_newest: bool,
}

impl SnapshotRecord {
    /// Chunks the snapshot covers.
    pub fn chunk_count(&self) -> u64 {
        self.chunk_layout().chunk_count()
    }

    /// Byte range of `chunk` in the volume (the last chunk may be short).
    pub fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        self.chunk_layout().chunk_range(chunk)
    }
}

impl PoolMetadata {
    pub fn snapshot(&self, id: SnapshotId) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.id == id)
    }

    /// Snapshots of `volume`, oldest first (ids grow with creation).
    pub fn snapshots_of(&self, volume: VolumeId) -> Vec<&SnapshotRecord> {
        let mut list: Vec<&SnapshotRecord> = self.snapshots.iter().filter(|s| s.volume == volume).collect();
        list.sort_by_key(|s| s.id);
        list
    }

    pub fn snapshot_by_name(&self, volume: VolumeId, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.volume == volume && s.name == name)
    }

    /// The snapshot agents copy pre-images into.
    pub fn newest_snapshot(&self, volume: VolumeId) -> Option<&SnapshotRecord> {
        self.snapshots.iter().filter(|s| s.volume == volume).max_by_key(|s| s.id)
    }

    /// Creates a snapshot of `volume` named `name`, with a COW area as large
    /// as the volume, and bumps the volume's layout generation (agents learn
    /// the new snapshot through a recall and publish).
    pub fn create_snapshot(
        &mut self,
        volume: VolumeId,
        name: &str,
        now_unix_secs: u64,
    ) -> Result<SnapshotId, AllocError> {
        let change = self.plan_create_snapshot(volume, name, now_unix_secs)?;
        self.apply(&change).map_err(planned_change_refused)?;
        Ok(SnapshotId(self.next_ids.snapshot.0 - 1))
    }

    /// The change that creates a snapshot (see
    /// [`PoolMetadata::create_snapshot`]): its COW area allocated now, its
    /// id the next snapshot id, created at the next generation.
    pub fn plan_create_snapshot(
        &self,
        volume: VolumeId,
        name: &str,
        now_unix_secs: u64,
    ) -> Result<MetaChange, AllocError> {
        check_name("snapshot name", name).map_err(AllocError::BadRequest)?;
        if name.contains('@') || name.contains('/') {
            return Err(AllocError::BadRequest(format!("snapshot name {name:?} may not contain '@' or '/'")));
        }
        let v = self.volume(volume).ok_or(AllocError::NoSuchVolume(volume))?;
        if self.snapshot_by_name(volume, name).is_some() {
            return Err(AllocError::BadRequest(format!("volume {} already has a snapshot named {name:?}", v.name)));
        }
        let cow_extents = allocate(&self.free_extents(), v.extents.len() as u64, v.mirror_legs)?;
        Ok(MetaChange::SnapshotCreate(NewSnapshot {
            id: self.next_ids.snapshot,
            volume,
            name: name.to_string(),
            created_generation: self.generation + 1,
            created_at_unix_secs: now_unix_secs,
            cow_extents,
            size_bytes: v.size_bytes,
            chunk_bytes: COW_CHUNK_BYTES.min(self.extent_bytes),
        }))
    }

    /// Where chunk `chunk` of snapshot `id` reads from, or `None` if there is
    /// no such snapshot or chunk.
    pub fn snapshot_source(&self, id: SnapshotId, chunk: u64) -> Option<ChunkSource> {
        let snapshot = self.snapshot(id)?;
        if chunk >= snapshot.chunk_count() {
            return None;
        }
        let source = self
            .snapshots_of(snapshot.volume)
            .into_iter()
            .filter(|s| s.id >= id)
            .find(|s| s.cow.contains(chunk))
            .map_or(ChunkSource::Live, |s| ChunkSource::Cow(s.id));
        Some(source)
    }

    /// The chunks (of `new`'s size) written between snapshots `old` and
    /// `new` of one volume (`old` taken first). See the module docs.
    pub fn changed_between(&self, old: SnapshotId, new: SnapshotId) -> Result<CowMap, String> {
        let (Some(o), Some(n)) = (self.snapshot(old), self.snapshot(new)) else {
            return Err("no such snapshot".to_string());
        };
        if o.volume != n.volume {
            return Err(format!("snapshots {} and {} are of different volumes", o.name, n.name));
        }
        if o.id >= n.id {
            return Err(format!("snapshot {} is not older than {}", o.name, n.name));
        }
        if o.chunk_bytes != n.chunk_bytes {
            return Err("the snapshots use different chunk sizes".to_string());
        }
        let mut changed = CowMap::new(n.chunk_count());
        for s in self.snapshots_of(n.volume).into_iter().filter(|s| s.id >= o.id && s.id < n.id) {
            changed.union_with(&s.cow);
        }
        for c in o.chunk_count()..n.chunk_count() {
            changed.insert(c);
        }
        // The old snapshot's last chunk was short if the volume grew since.
        if o.size_bytes % o.chunk_bytes != 0 && n.size_bytes > o.size_bytes {
            changed.insert(o.chunk_count() - 1);
        }
        Ok(changed)
    }

    /// Plans deleting snapshot `id`: which pre-images move to the next older
    /// snapshot first.
    pub fn snapshot_delete_plan(&self, id: SnapshotId) -> Option<DeletePlan> {
        let s = self.snapshot(id)?;
        let list = self.snapshots_of(s.volume);
        let position = list.iter().position(|x| x.id == id)?;
        let older = position.checked_sub(1).map(|p| list[p]);
        let chunks = older
            .map_or_else(Vec::new, |o| s.cow.iter().filter(|&c| c < o.chunk_count() && !o.cow.contains(c)).collect());
        Some(DeletePlan {
            snapshot: id,
            merge_into: older.map(|o| o.id),
            chunks,
            was_newest: position + 1 == list.len(),
        })
    }

    /// Applies a delete plan whose pre-images have been copied: marks them
    /// in the older snapshot, removes the snapshot (its COW area becomes
    /// free) and, if it was the newest, bumps the volume's layout generation.
    pub fn delete_snapshot(&mut self, plan: &DeletePlan) -> Result<SnapshotRecord, AllocError> {
        if self.snapshot(plan.snapshot).is_none() {
            return Err(AllocError::BadRequest(format!("snapshot {} does not exist", plan.snapshot)));
        }
        if let Some(older) = plan.merge_into.filter(|o| self.snapshot(*o).is_none()) {
            return Err(AllocError::BadRequest(format!("snapshot {older} does not exist")));
        }
        let undo = self.apply(&plan.change()).map_err(planned_change_refused)?;
        undo.into_deleted_snapshot()
            .ok_or_else(|| AllocError::BadRequest("internal error: snapshot delete returned no record".into()))
    }

    /// Registers `chunks` in snapshot `id`'s COW map. Returns how many were
    /// new; chunks beyond the snapshot are an error (nothing changes).
    pub fn register_cow(&mut self, id: SnapshotId, chunks: &[u64]) -> Result<usize, String> {
        let Some(change) = self.plan_register_cow(id, chunks)? else { return Ok(0) };
        let MetaChange::CowRegister { chunks: fresh, .. } = &change else { unreachable!("planned a registration") };
        let new = fresh.len() as usize;
        self.apply(&change).map_err(|e| e.to_string())?;
        Ok(new)
    }

    /// The change that registers the chunks of `chunks` not yet in snapshot
    /// `id`'s COW map, or `None` if all are. Chunks beyond the snapshot are
    /// an error.
    pub fn plan_register_cow(&self, id: SnapshotId, chunks: &[u64]) -> Result<Option<MetaChange>, String> {
        let s = self.snapshot(id).ok_or_else(|| format!("snapshot {id} does not exist"))?;
        if let Some(bad) = chunks.iter().find(|&&c| c >= s.chunk_count()) {
            return Err(format!("chunk {bad} is beyond snapshot {} ({} chunks)", s.name, s.chunk_count()));
        }
        let fresh = ChunkRuns::from_chunks(chunks.iter().copied().filter(|&c| !s.cow.contains(c)));
        Ok((!fresh.is_empty()).then_some(MetaChange::CowRegister { snapshot: id, chunks: fresh }))
    }
}

impl DeletePlan {
    /// The change that carries out this plan once its pre-images are copied.
    pub fn change(&self) -> MetaChange {
        MetaChange::SnapshotDelete {
            snapshot: self.snapshot,
            merge_into: self.merge_into,
            merged: ChunkRuns::from_chunks(self.chunks.iter().copied()),
            was_newest: self.was_newest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::{pool, EXTENT};

    fn with_volume() -> (PoolMetadata, VolumeId) {
        let mut meta = pool(&[10, 10, 10]);
        let v = meta.create_volume("v", 2 * EXTENT, 4096, 1, 0).unwrap();
        (meta, v)
    }

    #[test]
    fn cow_map_sets_counts_and_iterates() {
        let mut m = CowMap::new(130);
        assert!(m.insert(0) && m.insert(64) && m.insert(129));
        assert!(!m.insert(130));
        assert!(m.contains(64) && !m.contains(65) && !m.contains(1000));
        assert_eq!(m.count(), 3);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(m.is_consistent());
        let bad = CowMap { chunks: 10, words: vec![1 << 20] };
        assert!(!bad.is_consistent());
    }

    #[test]
    fn create_allocates_a_full_cow_area_and_bumps_the_layout() {
        let (mut meta, v) = with_volume();
        let free = meta.free_extents().count();
        let generation = meta.volume(v).unwrap().layout_generation;
        let s = meta.create_snapshot(v, "s1", 5).unwrap();
        let rec = meta.snapshot(s).unwrap();
        assert_eq!(rec.cow_extents.len(), 2);
        assert_eq!(rec.chunk_bytes, COW_CHUNK_BYTES);
        assert_eq!(rec.chunk_count(), 2 * EXTENT / COW_CHUNK_BYTES);
        assert_eq!(meta.free_extents().count(), free - 2);
        assert_eq!(meta.volume(v).unwrap().layout_generation, generation + 1);
        meta.check().unwrap();
        assert!(meta.create_snapshot(v, "s1", 6).is_err(), "duplicate name");
        assert!(meta.create_snapshot(v, "a@b", 6).is_err());
    }

    #[test]
    fn older_snapshots_fall_through_newer_cow_areas_to_live() {
        let (mut meta, v) = with_volume();
        let s1 = meta.create_snapshot(v, "s1", 1).unwrap();
        meta.register_cow(s1, &[1]).unwrap();
        let s2 = meta.create_snapshot(v, "s2", 2).unwrap();
        meta.register_cow(s2, &[1, 2]).unwrap();
        assert_eq!(meta.snapshot_source(s1, 1), Some(ChunkSource::Cow(s1)));
        assert_eq!(meta.snapshot_source(s1, 2), Some(ChunkSource::Cow(s2)));
        assert_eq!(meta.snapshot_source(s1, 3), Some(ChunkSource::Live));
        assert_eq!(meta.snapshot_source(s2, 1), Some(ChunkSource::Cow(s2)));
        assert_eq!(meta.snapshot_source(s2, 0), Some(ChunkSource::Live));
        assert_eq!(meta.snapshot_source(s2, 1 << 40), None);
    }

    #[test]
    fn changed_between_is_the_union_of_cow_maps_in_between() {
        let (mut meta, v) = with_volume();
        let s1 = meta.create_snapshot(v, "s1", 1).unwrap();
        meta.register_cow(s1, &[3, 4]).unwrap();
        let s2 = meta.create_snapshot(v, "s2", 2).unwrap();
        meta.register_cow(s2, &[4, 7]).unwrap();
        let s3 = meta.create_snapshot(v, "s3", 3).unwrap();
        meta.register_cow(s3, &[9]).unwrap();
        assert_eq!(meta.changed_between(s1, s2).unwrap().iter().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(meta.changed_between(s1, s3).unwrap().iter().collect::<Vec<_>>(), vec![3, 4, 7]);
        assert_eq!(meta.changed_between(s2, s3).unwrap().iter().collect::<Vec<_>>(), vec![4, 7]);
        assert!(meta.changed_between(s3, s1).is_err());
    }

    #[test]
    fn growth_between_snapshots_counts_as_changed() {
        let (mut meta, v) = with_volume();
        let s1 = meta.create_snapshot(v, "s1", 1).unwrap();
        meta.grow_volume(v, 3 * EXTENT).unwrap();
        let s2 = meta.create_snapshot(v, "s2", 2).unwrap();
        let changed = meta.changed_between(s1, s2).unwrap();
        let per_extent = EXTENT / COW_CHUNK_BYTES;
        assert_eq!(changed.count(), per_extent);
        assert!(changed.contains(2 * per_extent) && !changed.contains(2 * per_extent - 1));
    }

    #[test]
    fn deleting_a_snapshot_merges_missing_pre_images_into_the_older_one() {
        let (mut meta, v) = with_volume();
        let s1 = meta.create_snapshot(v, "s1", 1).unwrap();
        meta.register_cow(s1, &[1]).unwrap();
        let s2 = meta.create_snapshot(v, "s2", 2).unwrap();
        meta.register_cow(s2, &[1, 2]).unwrap();
        let s3 = meta.create_snapshot(v, "s3", 3).unwrap();
        let generation = meta.volume(v).unwrap().layout_generation;

        let plan = meta.snapshot_delete_plan(s2).unwrap();
        assert_eq!(plan, DeletePlan { snapshot: s2, merge_into: Some(s1), chunks: vec![2], was_newest: false });
        meta.delete_snapshot(&plan).unwrap();
        assert_eq!(meta.snapshot_source(s1, 2), Some(ChunkSource::Cow(s1)));
        assert_eq!(meta.volume(v).unwrap().layout_generation, generation, "agents unaffected");

        let plan = meta.snapshot_delete_plan(s3).unwrap();
        assert!(plan.was_newest && plan.chunks.is_empty());
        meta.delete_snapshot(&plan).unwrap();
        assert_eq!(meta.volume(v).unwrap().layout_generation, generation + 1);
        let plan = meta.snapshot_delete_plan(s1).unwrap();
        assert_eq!(plan.merge_into, None);
        meta.delete_snapshot(&plan).unwrap();
        meta.check().unwrap();
        assert!(meta.snapshots.is_empty());
        meta.delete_volume(v).unwrap();
    }

    #[test]
    fn registering_beyond_the_snapshot_changes_nothing() {
        let (mut meta, v) = with_volume();
        let s1 = meta.create_snapshot(v, "s1", 1).unwrap();
        let chunks = meta.snapshot(s1).unwrap().chunk_count();
        assert!(meta.register_cow(s1, &[0, chunks]).is_err());
        assert_eq!(meta.snapshot(s1).unwrap().cow.count(), 0);
        assert_eq!(meta.register_cow(s1, &[0, 0, 5]).unwrap(), 2);
    }
}
