//! Free-extent computation, the extent allocator, and the volume operations
//! built on it (create, grow, delete, add a device).
//!
//! Why free space is computed rather than stored: the metadata already says
//! which physical extents every volume and snapshot uses, and a second copy
//! of that fact (a free list, a bitmap) could disagree with the first after a
//! bug. Computing it costs one pass over the metadata per allocation, which
//! is nothing next to a commit.
//!
//! Every operation here either succeeds completely or leaves the metadata
//! exactly as it was: allocation is planned against a snapshot of the free
//! space and applied only once it is known to fit.

use super::change::{ApplyError, MetaChange};
use super::{
    check_block_bytes, check_name, DeviceRecord, DeviceState, HandleState, LogicalExtent, PhysicalExtent, PoolMetadata,
    VolumeRecord, MIRROR_LEGS_MAX,
};
use crate::ids::{DeviceIndex, VolumeId};
use crate::label::DeviceLayout;
use std::collections::{BTreeMap, HashSet};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error(
        "not enough free space: need {needed} extents ({legs} legs on distinct devices each), \
         only {available} usable; add devices or free space"
    )]
    NotEnoughSpace { needed: u64, available: u64, legs: u32 },
    #[error("a volume with {legs} mirror legs needs {legs} online devices; the pool has {online_devices}")]
    TooFewDevices { legs: u32, online_devices: u32 },
    #[error("a volume named {0:?} already exists")]
    VolumeExists(String),
    #[error("volume {0} does not exist")]
    NoSuchVolume(VolumeId),
    #[error("volume {volume} is {size_bytes} bytes; shrinking to {requested_bytes} bytes is not supported")]
    ShrinkRefused { volume: VolumeId, size_bytes: u64, requested_bytes: u64 },
    #[error("volume {volume} has {handles} open handles; close them first")]
    VolumeBusy { volume: VolumeId, handles: usize },
    #[error("volume {volume} has {snapshots} snapshots; delete them first")]
    HasSnapshots { volume: VolumeId, snapshots: usize },
    #[error("device {0} (or its UUID) is already in the pool")]
    DeviceExists(String),
    #[error("invalid request: {0}")]
    BadRequest(String),
}

/// Free physical extents per online device, lowest offsets first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FreeExtents {
    pub per_device: BTreeMap<DeviceIndex, Vec<u64>>,
}

impl FreeExtents {
    /// Free extents of `meta`'s online devices: the data area minus every
    /// extent used by a volume or a snapshot's copy-on-write area.
    pub fn from_metadata(meta: &PoolMetadata) -> FreeExtents {
        let extent_bytes = meta.extent_bytes.max(1);
        let used: HashSet<PhysicalExtent> = meta
            .volumes
            .iter()
            .flat_map(|v| v.extents.iter())
            .chain(meta.snapshots.iter().flat_map(|s| s.cow_extents.iter()))
            .flat_map(|e| e.legs.iter().copied())
            .collect();
        let per_device = meta
            .devices
            .iter()
            .filter(|d| d.state.is_online())
            .map(|d| {
                let free = (0..d.extent_count(extent_bytes))
                    .map(|i| d.data.start + i * extent_bytes)
                    .filter(|&offset| !used.contains(&PhysicalExtent { device: d.index, offset }))
                    .collect();
                (d.index, free)
            })
            .collect();
        FreeExtents { per_device }
    }

    /// Total free extents.
    pub fn count(&self) -> u64 {
        self.per_device.values().map(|v| v.len() as u64).sum()
    }

    pub fn device_count(&self, device: DeviceIndex) -> u64 {
        self.per_device.get(&device).map_or(0, |v| v.len() as u64)
    }

    /// How many logical extents of `legs` legs on distinct devices fit: the
    /// largest `n` with `sum over devices of min(free, n) >= n * legs` (a
    /// device can give each logical extent at most one leg).
    pub fn capacity(&self, legs: u32) -> u64 {
        if legs == 0 {
            return 0;
        }
        let counts: Vec<u64> = self.per_device.values().map(|v| v.len() as u64).collect();
        let fits = |n: u64| counts.iter().map(|&c| c.min(n)).sum::<u64>() >= n * u64::from(legs);
        let (mut low, mut high) = (0u64, self.count() / u64::from(legs));
        while low < high {
            let mid = low + (high - low).div_ceil(2);
            if fits(mid) {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        low
    }
}

/// Allocates `count` logical extents of `legs` legs each, every leg of an
/// extent on a distinct device. Pure: `free` is not changed; the caller
/// applies the result.
///
/// Spreading: each logical extent takes its legs from the devices with the
/// most free extents left, ties going to the device used least recently, so
/// a volume's extents round-robin across equal devices and fuller devices
/// are spared. Taking the most-free devices first is also what makes the
/// greedy choice succeed whenever [`FreeExtents::capacity`] says it fits.
pub fn allocate(free: &FreeExtents, count: u64, legs: u32) -> Result<Vec<LogicalExtent>, AllocError> {
    if !(1..=MIRROR_LEGS_MAX).contains(&legs) {
        return Err(AllocError::BadRequest(format!("{legs} mirror legs is outside 1..={MIRROR_LEGS_MAX}")));
    }
    let online_devices = free.per_device.len() as u32;
    if legs > online_devices {
        return Err(AllocError::TooFewDevices { legs, online_devices });
    }
    let capacity = free.capacity(legs);
    if count > capacity {
        return Err(AllocError::NotEnoughSpace {
            needed: count.saturating_mul(u64::from(legs)),
            available: capacity * u64::from(legs),
            legs,
        });
    }
    // (device, its free offsets, next unused position, step last used at)
    let mut devices: Vec<(DeviceIndex, &[u64], usize, u64)> =
        free.per_device.iter().map(|(&d, offsets)| (d, offsets.as_slice(), 0, 0)).collect();
    let mut extents = Vec::with_capacity(count as usize);
    for step in 1..=count {
        devices.sort_by_key(|&(index, offsets, next, last_used)| {
            (std::cmp::Reverse(offsets.len() - next), last_used, index)
        });
        let mut legs_of_extent = Vec::with_capacity(legs as usize);
        for (index, offsets, next, last_used) in devices.iter_mut().take(legs as usize) {
            // The capacity check above guarantees a free extent here; stay
            // an error rather than a panic should that reasoning ever break.
            let Some(&offset) = offsets.get(*next) else {
                return Err(AllocError::NotEnoughSpace {
                    needed: count * u64::from(legs),
                    available: capacity * u64::from(legs),
                    legs,
                });
            };
            *next += 1;
            *last_used = step;
            legs_of_extent.push(PhysicalExtent { device: *index, offset });
        }
        legs_of_extent.sort_by_key(|leg| leg.device);
        extents.push(LogicalExtent { legs: legs_of_extent });
    }
    Ok(extents)
}

impl PoolMetadata {
    /// See [`FreeExtents::from_metadata`].
    pub fn free_extents(&self) -> FreeExtents {
        FreeExtents::from_metadata(self)
    }

    /// Adds a device whose label will carry the returned index. Call on the
    /// metadata to be committed, write the label, then commit.
    pub fn add_device(
        &mut self,
        device_uuid: Uuid,
        uri: impl Into<String>,
        layout: &DeviceLayout,
    ) -> Result<DeviceIndex, AllocError> {
        let uri = uri.into();
        layout.check().map_err(AllocError::BadRequest)?;
        if layout.extent_bytes != self.extent_bytes {
            return Err(AllocError::BadRequest(format!(
                "device extent size {} differs from the pool's {}",
                layout.extent_bytes, self.extent_bytes
            )));
        }
        if uri.is_empty() {
            return Err(AllocError::BadRequest("device URI is empty".to_string()));
        }
        if self.devices.iter().any(|d| d.device_uuid == device_uuid || d.uri == uri) {
            return Err(AllocError::DeviceExists(uri));
        }
        let index = self.next_ids.device;
        let next = index.0.checked_add(1).ok_or(AllocError::BadRequest("device indexes exhausted".into()))?;
        self.devices.push(DeviceRecord {
            index,
            device_uuid,
            uri,
            device_bytes: layout.device_bytes,
            data: layout.data,
            state: DeviceState::Online,
            holds_metadata: false,
        });
        self.next_ids.device = DeviceIndex(next);
        Ok(index)
    }

    /// Creates a volume of `size_bytes` (a multiple of `block_bytes`), with
    /// `mirror_legs` copies of every extent on distinct devices.
    pub fn create_volume(
        &mut self,
        name: &str,
        size_bytes: u64,
        block_bytes: u32,
        mirror_legs: u32,
        now_unix_secs: u64,
    ) -> Result<VolumeId, AllocError> {
        let change = self.plan_create_volume(name, size_bytes, block_bytes, mirror_legs, now_unix_secs)?;
        self.apply(&change).map_err(planned_change_refused)?;
        Ok(VolumeId(self.next_ids.volume.0 - 1))
    }

    /// The change that creates a volume (see [`PoolMetadata::create_volume`]):
    /// its extents allocated now, its id the next volume id.
    pub fn plan_create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        block_bytes: u32,
        mirror_legs: u32,
        now_unix_secs: u64,
    ) -> Result<MetaChange, AllocError> {
        check_name("volume name", name).map_err(AllocError::BadRequest)?;
        if self.volume_by_name(name).is_some() {
            return Err(AllocError::VolumeExists(name.to_string()));
        }
        check_block_bytes(block_bytes, self.extent_bytes).map_err(AllocError::BadRequest)?;
        if size_bytes == 0 || size_bytes % u64::from(block_bytes) != 0 {
            return Err(AllocError::BadRequest(format!(
                "volume size {size_bytes} must be a positive multiple of the block size {block_bytes}"
            )));
        }
        let extents = allocate(&self.free_extents(), size_bytes.div_ceil(self.extent_bytes), mirror_legs)?;
        Ok(MetaChange::VolumeCreate(VolumeRecord {
            id: self.next_ids.volume,
            name: name.to_string(),
            size_bytes,
            block_bytes,
            mirror_legs,
            layout_generation: 1,
            created_at_unix_secs: now_unix_secs,
            extents,
        }))
    }

    /// Grows volume `id` to `new_size_bytes`, allocating the extents it now
    /// needs and bumping its layout generation. Same size is a no-op.
    pub fn grow_volume(&mut self, id: VolumeId, new_size_bytes: u64) -> Result<(), AllocError> {
        if let Some(change) = self.plan_grow_volume(id, new_size_bytes)? {
            self.apply(&change).map_err(planned_change_refused)?;
        }
        Ok(())
    }

    /// The change that grows volume `id` (see [`PoolMetadata::grow_volume`]),
    /// or `None` for the same size.
    pub fn plan_grow_volume(&self, id: VolumeId, new_size_bytes: u64) -> Result<Option<MetaChange>, AllocError> {
        let volume = self.volume(id).ok_or(AllocError::NoSuchVolume(id))?;
        if new_size_bytes < volume.size_bytes {
            return Err(AllocError::ShrinkRefused {
                volume: id,
                size_bytes: volume.size_bytes,
                requested_bytes: new_size_bytes,
            });
        }
        if new_size_bytes == volume.size_bytes {
            return Ok(None);
        }
        if new_size_bytes % u64::from(volume.block_bytes) != 0 {
            return Err(AllocError::BadRequest(format!(
                "volume size {new_size_bytes} must be a multiple of the block size {}",
                volume.block_bytes
            )));
        }
        let more = new_size_bytes.div_ceil(self.extent_bytes) - volume.extents.len() as u64;
        let added = allocate(&self.free_extents(), more, volume.mirror_legs)?;
        Ok(Some(MetaChange::VolumeGrow { volume: id, size_bytes: new_size_bytes, added }))
    }

    /// Deletes volume `id`, returning its record; its extents become free.
    /// Refused while it has active handles or snapshots.
    pub fn delete_volume(&mut self, id: VolumeId) -> Result<VolumeRecord, AllocError> {
        let change = self.plan_delete_volume(id)?;
        let undo = self.apply(&change).map_err(planned_change_refused)?;
        undo.into_deleted_volume().ok_or_else(|| planned_change_refused_msg("volume delete returned no record"))
    }

    /// The change that deletes volume `id` (see [`PoolMetadata::delete_volume`]).
    /// Broken handles only exist to answer late resumes; they name a volume
    /// that is gone, so they go with it.
    pub fn plan_delete_volume(&self, id: VolumeId) -> Result<MetaChange, AllocError> {
        self.volume(id).ok_or(AllocError::NoSuchVolume(id))?;
        let handles = self.handles.iter().filter(|h| h.volume == id && matches!(h.state, HandleState::Active)).count();
        if handles > 0 {
            return Err(AllocError::VolumeBusy { volume: id, handles });
        }
        let snapshots = self.snapshots.iter().filter(|s| s.volume == id).count();
        if snapshots > 0 {
            return Err(AllocError::HasSnapshots { volume: id, snapshots });
        }
        Ok(MetaChange::VolumeDelete { volume: id })
    }
}

/// A change a planner produced did not apply: a bug, reported rather than
/// panicking.
pub(crate) fn planned_change_refused(e: ApplyError) -> AllocError {
    planned_change_refused_msg(&e.to_string())
}

fn planned_change_refused_msg(why: &str) -> AllocError {
    AllocError::BadRequest(format!("internal error, please report: a planned change was refused: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::metadata::testing::{pool, EXTENT};

    fn per_device_use(meta: &PoolMetadata) -> BTreeMap<DeviceIndex, u64> {
        let free = meta.free_extents();
        meta.devices.iter().map(|d| (d.index, d.extent_count(EXTENT) - free.device_count(d.index))).collect()
    }

    #[test]
    fn free_extents_of_empty_pool() {
        let meta = pool(&[3, 5]);
        let free = meta.free_extents();
        assert_eq!(free.count(), 8);
        assert_eq!(free.per_device[&DeviceIndex(0)], vec![EXTENT, 2 * EXTENT, 3 * EXTENT]);
    }

    #[test]
    fn single_leg_round_robins_across_equal_devices() {
        let mut meta = pool(&[10, 10, 10]);
        let id = meta.create_volume("v", 6 * EXTENT, 4096, 1, 0).unwrap();
        let devices: Vec<u32> = meta.volume(id).unwrap().extents.iter().map(|e| e.legs[0].device.0).collect();
        assert_eq!(devices, vec![0, 1, 2, 0, 1, 2]);
        meta.check().unwrap();
    }

    #[test]
    fn mirror_legs_on_distinct_devices_and_spread() {
        let mut meta = pool(&[10, 10, 10, 10]);
        let id = meta.create_volume("m", 8 * EXTENT, 4096, 2, 0).unwrap();
        for extent in &meta.volume(id).unwrap().extents {
            assert_eq!(extent.legs.len(), 2);
            assert_ne!(extent.legs[0].device, extent.legs[1].device);
        }
        // 16 legs over 4 equal devices: 4 each.
        assert!(per_device_use(&meta).values().all(|&n| n == 4), "{:?}", per_device_use(&meta));
        meta.check().unwrap();
    }

    #[test]
    fn prefers_emptier_devices() {
        let mut meta = pool(&[2, 10]);
        meta.create_volume("v", 6 * EXTENT, 4096, 1, 0).unwrap();
        let used = per_device_use(&meta);
        assert_eq!(used[&DeviceIndex(1)], 6 - used[&DeviceIndex(0)]);
        assert!(used[&DeviceIndex(1)] >= 5, "{used:?}");
    }

    #[test]
    fn uses_all_space_when_it_fits_exactly() {
        // 3 devices of 4, 4, 2 extents and 2 legs: capacity 5 logical extents.
        let mut meta = pool(&[4, 4, 2]);
        assert_eq!(meta.free_extents().capacity(2), 5);
        meta.create_volume("v", 5 * EXTENT, 4096, 2, 0).unwrap();
        assert_eq!(meta.free_extents().count(), 0);
        meta.check().unwrap();
    }

    #[test]
    fn capacity_limited_by_distinct_devices() {
        // One big device cannot hold both legs of anything.
        let meta = pool(&[100, 1]);
        assert_eq!(meta.free_extents().capacity(2), 1);
        assert_eq!(meta.free_extents().capacity(1), 101);
    }

    #[test]
    fn not_enough_space_changes_nothing() {
        let mut meta = pool(&[100, 1]);
        let before = meta.clone();
        let err = meta.create_volume("v", 2 * EXTENT, 4096, 2, 0).unwrap_err();
        assert_eq!(err, AllocError::NotEnoughSpace { needed: 4, available: 2, legs: 2 });
        assert!(err.to_string().contains("need 4 extents"), "{err}");
        assert_eq!(meta, before);

        let id = meta.create_volume("w", EXTENT, 4096, 1, 0).unwrap();
        let before = meta.clone();
        assert!(matches!(meta.grow_volume(id, 1000 * EXTENT), Err(AllocError::NotEnoughSpace { .. })));
        assert_eq!(meta, before);
    }

    #[test]
    fn too_few_devices() {
        let mut meta = pool(&[10]);
        assert_eq!(
            meta.create_volume("v", EXTENT, 4096, 2, 0),
            Err(AllocError::TooFewDevices { legs: 2, online_devices: 1 })
        );
    }

    #[test]
    fn failed_devices_get_nothing() {
        let mut meta = pool(&[10, 10, 10]);
        meta.devices[1].state = DeviceState::Failed { reason: "gone".into(), since_unix_secs: 5 };
        let id = meta.create_volume("v", 4 * EXTENT, 4096, 2, 0).unwrap();
        assert!(meta.volume(id).unwrap().extents.iter().all(|e| e.legs.iter().all(|l| l.device != DeviceIndex(1))));
    }

    #[test]
    fn create_validates() {
        let mut meta = pool(&[10, 10]);
        assert!(matches!(meta.create_volume("", EXTENT, 4096, 1, 0), Err(AllocError::BadRequest(_))));
        assert!(matches!(meta.create_volume("v", 0, 4096, 1, 0), Err(AllocError::BadRequest(_))));
        assert!(matches!(meta.create_volume("v", 1000, 4096, 1, 0), Err(AllocError::BadRequest(_))));
        assert!(matches!(meta.create_volume("v", EXTENT, 1000, 1, 0), Err(AllocError::BadRequest(_))));
        assert!(matches!(meta.create_volume("v", EXTENT, 4096, 0, 0), Err(AllocError::BadRequest(_))));
        assert!(matches!(meta.create_volume("v", EXTENT, 4096, 9, 0), Err(AllocError::BadRequest(_))));
        meta.create_volume("v", EXTENT, 4096, 1, 0).unwrap();
        assert_eq!(meta.create_volume("v", EXTENT, 4096, 1, 0), Err(AllocError::VolumeExists("v".into())));
    }

    #[test]
    fn partial_last_extent() {
        let mut meta = pool(&[10]);
        let id = meta.create_volume("v", EXTENT + 4096, 4096, 1, 0).unwrap();
        assert_eq!(meta.volume(id).unwrap().extents.len(), 2);
        meta.check().unwrap();
    }

    #[test]
    fn grow_and_delete() {
        let mut meta = pool(&[10, 10]);
        let id = meta.create_volume("v", 2 * EXTENT, 4096, 2, 0).unwrap();
        let before = meta.volume(id).unwrap().clone();
        meta.grow_volume(id, 2 * EXTENT).unwrap();
        assert_eq!(meta.volume(id).unwrap(), &before, "same size is a no-op");
        meta.grow_volume(id, 5 * EXTENT).unwrap();
        let grown = meta.volume(id).unwrap();
        assert_eq!(grown.extents.len(), 5);
        assert_eq!(grown.extents[..2], before.extents[..], "existing extents stay put");
        assert_eq!(grown.layout_generation, 2);
        assert!(matches!(meta.grow_volume(id, EXTENT), Err(AllocError::ShrinkRefused { .. })));
        meta.check().unwrap();
        assert_eq!(meta.free_extents().count(), 10);

        let removed = meta.delete_volume(id).unwrap();
        assert_eq!(removed.name, "v");
        assert_eq!(meta.free_extents().count(), 20);
        assert_eq!(meta.delete_volume(id), Err(AllocError::NoSuchVolume(id)));
        // Ids are never reused.
        assert_eq!(meta.create_volume("v", EXTENT, 4096, 1, 0).unwrap(), VolumeId(id.0 + 1));
    }

    #[test]
    fn add_device_refuses_duplicates() {
        let mut meta = pool(&[4]);
        let layout = DeviceLayout::plan_with_slots(10 * EXTENT, EXTENT, 64 << 10, 2).unwrap();
        assert!(matches!(
            meta.add_device(Uuid::from_u128(100), "nbd://x/e", &layout),
            Err(AllocError::DeviceExists(_))
        ));
        assert!(matches!(meta.add_device(Uuid::from_u128(1), "nbd://h0/e", &layout), Err(AllocError::DeviceExists(_))));
        let other = DeviceLayout::plan_with_slots(10 * EXTENT, 2 * EXTENT, 64 << 10, 2).unwrap();
        assert!(matches!(meta.add_device(Uuid::from_u128(1), "nbd://x/e", &other), Err(AllocError::BadRequest(_))));
        assert_eq!(meta.add_device(Uuid::from_u128(1), "nbd://x/e", &layout), Ok(DeviceIndex(1)));
    }

    proptest::proptest! {
        /// Whatever the device sizes, allocation succeeds exactly when
        /// capacity allows, legs are distinct, and metadata stays valid.
        #[test]
        fn allocation_invariants(
            sizes in proptest::collection::vec(1u64..12, 1..6),
            legs in 1u32..4,
            count in 0u64..20,
        ) {
            let mut meta = pool(&sizes);
            let capacity = meta.free_extents().capacity(legs);
            let before = meta.clone();
            let result = meta.create_volume("v", count.max(1) * EXTENT, 4096, legs, 0);
            let online = sizes.len() as u32;
            if legs > online {
                proptest::prop_assert_eq!(result, Err(AllocError::TooFewDevices { legs, online_devices: online }));
                proptest::prop_assert_eq!(&meta, &before);
            } else if count.max(1) <= capacity {
                let id = result.unwrap();
                meta.check().unwrap();
                proptest::prop_assert_eq!(meta.volume(id).unwrap().extents.len() as u64, count.max(1));
            } else {
                let is_not_enough_space = matches!(result, Err(AllocError::NotEnoughSpace { .. }));
                proptest::prop_assert!(is_not_enough_space);
                proptest::prop_assert_eq!(&meta, &before);
            }
        }
    }
}
