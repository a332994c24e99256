//! The byte-range locks of shared-write handles as the pool records them
//! (format 9), so they survive a metadata server restart or failover.
//!
//! Why with the handles and nowhere else: a lock belongs to one handle and
//! follows its lease and durable rules. A handle that is broken or removed
//! loses its locks in the same change ([`super::MetaChange::HandleBreak`],
//! [`super::MetaChange::HandleRemove`]), so no lock outlives its holder and
//! no separate expiry exists. Conflicts are decided by
//! [`crate::locks::LockTable`], the rule the agents enforce too.

use serde::{Deserialize, Serialize};

use super::{HandleState, OpenMode, PoolMetadata};
use crate::ids::{HandleId, VolumeId};
use crate::locks::{HandleLocks, LockRange, LockTable};

/// The locks of one handle (format 9), in [`PoolMetadata::range_locks`]
/// sorted by handle; never empty (no locks: no entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLockEntry {
    pub handle: HandleId,
    /// Disjoint, sorted by start, inside the volume.
    pub ranges: Vec<LockRange>,
}

impl PoolMetadata {
    /// The lock table of `volume`: the locks of its handles, each named by
    /// the agent that opened it.
    pub fn lock_table(&self, volume: VolumeId) -> LockTable {
        let holders = self
            .range_locks
            .iter()
            .filter_map(|entry| {
                let h = self.handles.iter().find(|h| h.id == entry.handle && h.volume == volume)?;
                Some(HandleLocks { handle: h.id, holder: h.agent_name.clone(), ranges: entry.ranges.clone() })
            })
            .collect();
        LockTable { holders }
    }

    /// Sets `handle`'s locks to `ranges` after checking them: the handle is
    /// an active shared-write one and no other handle of its volume holds
    /// any of those bytes. Returns the entry it replaced (with its index).
    pub(crate) fn set_range_locks(
        &mut self,
        handle: HandleId,
        ranges: &[LockRange],
    ) -> Result<Option<(usize, RangeLockEntry)>, String> {
        let h =
            self.handles.iter().find(|h| h.id == handle).ok_or_else(|| format!("handle {handle} does not exist"))?;
        if h.mode != OpenMode::SharedWrite {
            return Err(format!("handle {handle} is not open shared: only shared-write handles take range locks"));
        }
        if h.state != HandleState::Active {
            return Err(format!("handle {handle} is broken: it holds no locks"));
        }
        let volume = self.volume(h.volume).ok_or_else(|| format!("volume {} does not exist", h.volume))?;
        let sorted = self
            .lock_table(volume.id)
            .check_request(volume.id, volume.size_bytes, handle, ranges)
            .map_err(|e| e.to_string())?;
        let old = self.take_range_locks(handle);
        if !sorted.is_empty() {
            let at = self.range_locks.partition_point(|e| e.handle < handle);
            self.range_locks.insert(at, RangeLockEntry { handle, ranges: sorted });
        }
        Ok(old)
    }

    /// Removes `handle`'s locks, returning them with their index (for undo).
    pub(crate) fn take_range_locks(&mut self, handle: HandleId) -> Option<(usize, RangeLockEntry)> {
        let index = self.range_locks.iter().position(|e| e.handle == handle)?;
        Some((index, self.range_locks.remove(index)))
    }

    /// Puts back what [`Self::set_range_locks`] or
    /// [`Self::take_range_locks`] replaced (undo).
    pub(crate) fn restore_range_locks(&mut self, handle: HandleId, old: Option<(usize, RangeLockEntry)>) {
        self.range_locks.retain(|e| e.handle != handle);
        if let Some((index, entry)) = old {
            self.range_locks.insert(index.min(self.range_locks.len()), entry);
        }
    }

    /// The invariants of the recorded locks: sorted by handle, each of an
    /// active shared-write handle, non-empty, and no two handles of a volume
    /// holding the same byte.
    pub(crate) fn check_range_locks(&self) -> Result<(), String> {
        for pair in self.range_locks.windows(2) {
            if pair[0].handle >= pair[1].handle {
                return Err(format!("range locks of handle {} are out of order or twice", pair[1].handle));
            }
        }
        let mut checked = LockTable::default();
        for entry in &self.range_locks {
            let Some(h) = self.handles.iter().find(|h| h.id == entry.handle) else {
                return Err(format!("range locks of unknown handle {}", entry.handle));
            };
            if h.mode != OpenMode::SharedWrite || h.state != HandleState::Active || entry.ranges.is_empty() {
                return Err(format!("range locks of handle {}: not an active shared-write handle, or empty", h.id));
            }
            let Some(volume) = self.volume(h.volume) else {
                return Err(format!("range locks of handle {}: unknown volume {}", h.id, h.volume));
            };
            let mut per_volume = LockTable {
                holders: checked
                    .holders
                    .iter()
                    .filter(|l| self.volume_of(l.handle) == Some(h.volume))
                    .cloned()
                    .collect(),
            };
            let sorted = per_volume
                .check_request(volume.id, volume.size_bytes, h.id, &entry.ranges)
                .map_err(|e| format!("range locks of handle {}: {e}", h.id))?;
            if sorted != entry.ranges {
                return Err(format!("range locks of handle {} are not sorted by start", h.id));
            }
            per_volume.set(h.id, &h.agent_name, sorted.clone());
            checked.set(h.id, &h.agent_name, sorted);
        }
        Ok(())
    }

    fn volume_of(&self, handle: HandleId) -> Option<VolumeId> {
        self.handles.iter().find(|h| h.id == handle).map(|h| h.volume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::rich_pool;
    use crate::metadata::MetaChange;

    fn shared_handles(meta: &mut PoolMetadata) -> (HandleId, HandleId, u64) {
        let volume = meta.volumes[0].clone();
        let template = meta.handles.first().cloned().expect("the rich pool has a handle");
        let a = meta.next_ids.handle;
        for (i, name) in ["host-a", "host-b"].iter().enumerate() {
            let record = super::super::HandleRecord {
                id: HandleId(a.0 + i as u64),
                volume: volume.id,
                agent_name: name.to_string(),
                mode: OpenMode::SharedWrite,
                state: HandleState::Active,
                ..template.clone()
            };
            meta.apply(&MetaChange::HandleOpen(record)).unwrap();
        }
        (a, HandleId(a.0 + 1), volume.size_bytes)
    }

    fn r(start: u64, len_bytes: u64) -> LockRange {
        LockRange { start, len_bytes }
    }

    #[test]
    fn locks_are_set_checked_refused_on_conflict_and_end_with_the_handle() {
        let mut meta = rich_pool();
        let (a, b, size) = shared_handles(&mut meta);
        let half = size / 2;
        meta.apply(&MetaChange::RangeLocks { handle: a, ranges: vec![r(0, half)] }).unwrap();
        meta.check().unwrap();
        let err = meta.apply(&MetaChange::RangeLocks { handle: b, ranges: vec![r(half - 1, 2)] }).unwrap_err();
        assert!(err.to_string().contains("host-a"), "{err}");
        meta.apply(&MetaChange::RangeLocks { handle: b, ranges: vec![r(half, half)] }).unwrap();
        meta.check().unwrap();
        let table = meta.lock_table(meta.volumes[0].id);
        assert_eq!(table.holders.len(), 2);
        assert!(table.check_write(a, half, 1).is_err());
        let undo =
            meta.apply(&MetaChange::HandleBreak { handle: b, reason: "gone".into(), since_unix_secs: 1 }).unwrap();
        assert!(meta.lock_table(meta.volumes[0].id).check_write(a, half, 1).is_ok(), "broken: its locks end");
        meta.check().unwrap();
        meta.revert(undo);
        assert!(meta.lock_table(meta.volumes[0].id).check_write(a, half, 1).is_err(), "undo restores them");
        meta.apply(&MetaChange::HandleRemove { handle: a }).unwrap();
        assert_eq!(meta.lock_table(meta.volumes[0].id).holders.len(), 1);
        meta.check().unwrap();
    }

    #[test]
    fn only_shared_write_handles_lock() {
        let mut meta = rich_pool();
        let (a, _, _) = shared_handles(&mut meta);
        meta.handles.iter_mut().find(|h| h.id == a).unwrap().mode = OpenMode::Exclusive;
        let err = meta.apply(&MetaChange::RangeLocks { handle: a, ranges: vec![r(0, 4096)] }).unwrap_err();
        assert!(err.to_string().contains("shared"), "{err}");
    }

    #[test]
    fn check_refuses_overlapping_recorded_locks() {
        let mut meta = rich_pool();
        let (a, b, _) = shared_handles(&mut meta);
        meta.range_locks.push(RangeLockEntry { handle: a, ranges: vec![r(0, 8192)] });
        meta.range_locks.push(RangeLockEntry { handle: b, ranges: vec![r(4096, 8192)] });
        assert!(meta.check().unwrap_err().contains("host-a"));
    }
}
