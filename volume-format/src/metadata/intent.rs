//! The write-intent log of mirrored volumes, and the regions a failed leg
//! missed (format 7).
//!
//! Why: an agent writes every leg of a mirrored extent concurrently. If it
//! dies (kill -9, a host crash) with writes in flight, or one leg's write
//! fails, the legs of a region hold different data, and reads that rotate
//! between legs return new, then old, then new again for the same block.
//! As Linux md's write-intent bitmap and DRBD's activity log do, a region is
//! recorded **dirty** before the first write to it and cleared lazily once
//! every write to it reached every leg; after a crash only dirty regions
//! can differ, so only those are copied (one leg to the others).
//!
//! The log is kept in the pool metadata, as the journal's
//! [`MetaChange::IntentSet`] changes: an agent sends the regions it starts
//! writing (and those it finished with) in one batched request per group of
//! writes, not one per write — a region is marked once and then written many
//! times (see `client-agent`'s `intent` module), so the journal sees a few
//! records per region and second, not per I/O.
//!
//! Two kinds of sets per volume ([`IntentKey`]):
//! - `Dirty(handle)`: what a handle marked and has not cleared. While the
//!   handle lives the set is its own; once it is gone (broken, expired,
//!   excluded) the set is *orphaned* and the server copies those regions
//!   from one leg to the others before the volume is opened again.
//! - `Stale(device)`: regions written while `device` was failed, so its legs
//!   there missed writes (a degraded write). When the device comes back only
//!   these regions are copied onto it, not its whole legs. When a device is
//!   marked failed, every region dirty at that moment is stale for it too
//!   (a write in flight may have missed it), in that same commit — before
//!   any agent acknowledges a write that skipped the device.
//!
//! A region is [`intent_region_bytes`] of the volume's logical space; it
//! divides the extent size, so a region's bytes sit at one offset of each
//! leg's device.

use serde::{Deserialize, Serialize};

use super::change::{ChunkRuns, MetaChange};
use super::PoolMetadata;
use crate::ids::{DeviceIndex, HandleId, VolumeId};

/// Largest intent region (DRBD's activity-log extent size): small enough
/// that a crash resyncs little, large enough that a sequential writer marks
/// a region once per 4 MiB.
pub const INTENT_REGION_BYTES_MAX: u64 = 4 << 20;

/// The intent region size of a pool whose extents are `extent_bytes` (a
/// power of two, so the smaller of the two divides the other).
pub fn intent_region_bytes(extent_bytes: u64) -> u64 {
    extent_bytes.clamp(1, INTENT_REGION_BYTES_MAX)
}

/// Which of a volume's sets an [`IntentEntry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IntentKey {
    /// Marked by this handle and not cleared yet.
    Dirty(HandleId),
    /// Written while this device was failed: its legs there are stale.
    Stale(DeviceIndex),
}

/// One set of regions of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentEntry {
    pub volume: VolumeId,
    pub key: IntentKey,
    pub regions: ChunkRuns,
}

/// Union of region sets.
pub fn union<'a>(sets: impl IntoIterator<Item = &'a ChunkRuns>) -> ChunkRuns {
    ChunkRuns::from_chunks(sets.into_iter().flat_map(|s| s.iter()))
}

/// `a` without the regions of `b`.
pub fn difference(a: &ChunkRuns, b: &ChunkRuns) -> ChunkRuns {
    let remove: std::collections::BTreeSet<u64> = b.iter().collect();
    ChunkRuns::from_chunks(a.iter().filter(|r| !remove.contains(r)))
}

impl PoolMetadata {
    /// The regions of `volume` under `key` (empty if none).
    pub fn intent(&self, volume: VolumeId, key: IntentKey) -> ChunkRuns {
        self.intents.iter().find(|e| e.volume == volume && e.key == key).map(|e| e.regions.clone()).unwrap_or_default()
    }

    /// Every intent entry of `volume`.
    pub fn intents_of(&self, volume: VolumeId) -> impl Iterator<Item = &IntentEntry> {
        self.intents.iter().filter(move |e| e.volume == volume)
    }

    /// Whether `volume` records which regions a failed `device` missed (a
    /// device failed before this format recorded nothing: all of its legs
    /// are copied).
    pub fn tracks_stale(&self, volume: VolumeId, device: DeviceIndex) -> bool {
        self.intents.iter().any(|e| e.volume == volume && e.key == IntentKey::Stale(device))
    }

    /// Number of intent regions of `volume`.
    pub fn intent_regions(&self, volume: VolumeId) -> Option<u64> {
        let v = self.volume(volume)?;
        Some(v.size_bytes.div_ceil(intent_region_bytes(self.extent_bytes)))
    }

    /// The changes that record `handle` marking `mark` and clearing `clear`
    /// of `volume`'s regions: its dirty set, and for every leg of a marked
    /// region on a failed device, that device's stale set.
    pub fn plan_intent_record(
        &self,
        volume: VolumeId,
        handle: HandleId,
        mark: &ChunkRuns,
        clear: &ChunkRuns,
    ) -> Vec<MetaChange> {
        let mut changes = Vec::new();
        let key = IntentKey::Dirty(handle);
        let old = self.intent(volume, key);
        let new = difference(&union([&old, mark]), clear);
        if new != old {
            changes.push(MetaChange::IntentSet { volume, key, regions: new });
        }
        if mark.is_empty() {
            return changes;
        }
        let region_bytes = intent_region_bytes(self.extent_bytes);
        let Some(v) = self.volume(volume) else { return changes };
        let mut stale: std::collections::BTreeMap<DeviceIndex, Vec<u64>> = Default::default();
        for region in mark.iter() {
            let extent = (region * region_bytes / self.extent_bytes.max(1)) as usize;
            for leg in v.extents.get(extent).map(|e| e.legs.as_slice()).unwrap_or_default() {
                // Resyncing too: a holder may still write with the layout
                // that skips the device until its volume's copy (`recovery`).
                if self.device(leg.device).is_some_and(|d| !d.state.is_online()) {
                    stale.entry(leg.device).or_default().push(region);
                }
            }
        }
        for (device, regions) in stale {
            let key = IntentKey::Stale(device);
            let old = self.intent(volume, key);
            let new = union([&old, &ChunkRuns::from_chunks(regions)]);
            if new != old || !self.tracks_stale(volume, device) {
                changes.push(MetaChange::IntentSet { volume, key, regions: new });
            }
        }
        changes
    }

    /// The changes that go with marking `device` failed: for every mirrored
    /// volume with a leg on it, its stale set grows by every region dirty
    /// now (a write in flight there may have missed the device).
    pub fn plan_device_failed_intents(&self, device: DeviceIndex) -> Vec<MetaChange> {
        let mut changes = Vec::new();
        for v in self.volumes.iter().filter(|v| v.mirror_legs > 1) {
            if !v.extents.iter().any(|e| e.legs.iter().any(|l| l.device == device)) {
                continue;
            }
            let key = IntentKey::Stale(device);
            let dirty = self.intents_of(v.id).filter(|e| matches!(e.key, IntentKey::Dirty(_))).map(|e| &e.regions);
            let old = self.intent(v.id, key);
            let new = union(dirty.chain([&old]));
            if new != old || !self.tracks_stale(v.id, device) {
                changes.push(MetaChange::IntentSet { volume: v.id, key, regions: new });
            }
        }
        changes
    }

    /// The changes that forget every stale set of `device` (it was copied
    /// whole again, or left the pool).
    pub fn plan_forget_stale(&self, device: DeviceIndex) -> Vec<MetaChange> {
        self.intents
            .iter()
            .filter(|e| e.key == IntentKey::Stale(device))
            .map(|e| MetaChange::IntentSet { volume: e.volume, key: e.key, regions: ChunkRuns::default() })
            .collect()
    }

    /// Sets `volume`'s regions under `key` (empty removes the set, except a
    /// stale set, which stays to say "tracked, nothing missed"). Checked:
    /// the volume exists (unless the set is emptied) and every region is in
    /// it.
    pub(crate) fn set_intent(
        &mut self,
        volume: VolumeId,
        key: IntentKey,
        regions: &ChunkRuns,
    ) -> Result<Option<(usize, IntentEntry)>, String> {
        let index = self.intents.iter().position(|e| e.volume == volume && e.key == key);
        match self.intent_regions(volume) {
            Some(count) => regions.check_within(count)?,
            None if regions.is_empty() => {}
            None => return Err(format!("volume {volume} does not exist")),
        }
        let old = index.map(|i| (i, self.intents.remove(i)));
        let keep_empty = matches!(key, IntentKey::Stale(_)) && self.volume(volume).is_some() && old.is_none();
        if !regions.is_empty() || keep_empty {
            self.intents.push(IntentEntry { volume, key, regions: regions.clone() });
        }
        Ok(old)
    }

    /// Takes back a [`PoolMetadata::set_intent`] that returned `old` (the
    /// entry it replaced, and where it was): the entries end up exactly as
    /// before, in the same order — a server that took back a failed commit
    /// must hold what one that never saw it loads (simulator seed
    /// 209121354547448: the order differed after an undo).
    pub(crate) fn unset_intent(&mut self, volume: VolumeId, key: IntentKey, old: Option<(usize, IntentEntry)>) {
        self.intents.retain(|e| !(e.volume == volume && e.key == key));
        if let Some((index, old)) = old {
            self.intents.insert(index.min(self.intents.len()), old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::rich_pool;
    use crate::metadata::DeviceState;

    fn runs(r: &[u64]) -> ChunkRuns {
        ChunkRuns::from_chunks(r.iter().copied())
    }

    #[test]
    fn union_and_difference_are_set_operations() {
        assert_eq!(union([&runs(&[1, 2]), &runs(&[2, 3, 9])]), runs(&[1, 2, 3, 9]));
        assert_eq!(difference(&runs(&[1, 2, 3, 9]), &runs(&[2, 9, 10])), runs(&[1, 3]));
    }

    #[test]
    fn marks_and_clears_apply_and_revert() {
        let mut meta = rich_pool();
        let v = meta.volumes.iter().find(|v| v.mirror_legs > 1).expect("a mirrored volume").id;
        let h = HandleId(7);
        let before = meta.clone();
        let changes = meta.plan_intent_record(v, h, &runs(&[0, 1]), &ChunkRuns::default());
        let undo = meta.apply_all(&changes).unwrap();
        assert_eq!(meta.intent(v, IntentKey::Dirty(h)), runs(&[0, 1]));
        let clear = meta.plan_intent_record(v, h, &ChunkRuns::default(), &runs(&[0]));
        meta.apply_all(&clear).unwrap();
        assert_eq!(meta.intent(v, IntentKey::Dirty(h)), runs(&[1]));
        meta.apply_all(&meta.plan_intent_record(v, h, &ChunkRuns::default(), &runs(&[1]))).unwrap();
        assert!(!meta.intents.iter().any(|e| e.key == IntentKey::Dirty(h)), "a cleared dirty set goes away");
        let mut again = before.clone();
        let undo2 = again.apply_all(&changes).unwrap();
        again.revert_all(undo2);
        assert_eq!(again, before);
        drop(undo);
    }

    /// A change taken back restores the entries in their order too: a
    /// server that took back a failed commit holds exactly what a server
    /// that never saw it loads (simulator seed 209121354547448).
    #[test]
    fn taking_a_change_back_restores_the_order_of_the_entries() {
        let mut meta = rich_pool();
        let v = meta.volumes.iter().find(|v| v.mirror_legs > 1).expect("a mirrored volume").id;
        for h in [3, 10, 2] {
            meta.apply_all(&meta.plan_intent_record(v, HandleId(h), &runs(&[0]), &ChunkRuns::default())).unwrap();
        }
        let before = meta.clone();
        // Changing the first entry moves it (a set is replaced, not edited).
        let change = meta.plan_intent_record(v, HandleId(3), &runs(&[1]), &ChunkRuns::default());
        let undo = meta.apply_all(&change).unwrap();
        assert_ne!(meta.intents, before.intents);
        meta.revert_all(undo);
        assert_eq!(meta, before, "the same entries, in the same order");
    }

    #[test]
    fn a_failed_device_makes_dirty_and_later_marked_regions_stale_for_it() {
        let mut meta = rich_pool();
        let v = meta.volumes.iter().find(|v| v.mirror_legs > 1).expect("a mirrored volume").clone();
        let device = v.extents[0].legs[1].device;
        let h = HandleId(7);
        meta.apply_all(&meta.plan_intent_record(v.id, h, &runs(&[0]), &ChunkRuns::default())).unwrap();
        let mut failing = meta.plan_device_failed_intents(device);
        failing.push(MetaChange::DeviceState {
            device,
            state: DeviceState::Failed { reason: "test".into(), since_unix_secs: 1 },
        });
        meta.apply_all(&failing).unwrap();
        assert_eq!(meta.intent(v.id, IntentKey::Stale(device)), runs(&[0]));
        // A region marked while the device is failed is stale for it at once.
        let last = meta.intent_regions(v.id).unwrap() - 1;
        meta.apply_all(&meta.plan_intent_record(v.id, h, &runs(&[last]), &runs(&[0]))).unwrap();
        let stale = meta.intent(v.id, IntentKey::Stale(device));
        let extent_of_last = (last * intent_region_bytes(meta.extent_bytes) / meta.extent_bytes) as usize;
        if v.extents[extent_of_last].legs.iter().any(|l| l.device == device) {
            assert_eq!(stale, runs(&[0, last]));
        } else {
            assert_eq!(stale, runs(&[0]));
        }
        // Clearing the dirty set leaves the stale set alone.
        assert_eq!(meta.intent(v.id, IntentKey::Dirty(h)), runs(&[last]));
        meta.apply_all(&meta.plan_forget_stale(device)).unwrap();
        assert!(!meta.tracks_stale(v.id, device));
    }

    #[test]
    fn regions_beyond_the_volume_are_refused() {
        let mut meta = rich_pool();
        let v = meta.volumes.iter().find(|v| v.mirror_legs > 1).unwrap().id;
        let count = meta.intent_regions(v).unwrap();
        let bad = MetaChange::IntentSet { volume: v, key: IntentKey::Dirty(HandleId(1)), regions: runs(&[count]) };
        assert!(meta.apply(&bad).is_err());
    }
}
