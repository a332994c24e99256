//! The volume description: everything an agent needs to do I/O to a volume
//! directly against the devices, and nothing more (no other volumes, no
//! clients, no handles).
//!
//! Why a separate type rather than a slice of the pool metadata: it crosses
//! the wire to agents, it is fenced by `layout_generation`, and the agent's
//! hot path wants it self-contained. Device URIs are kept once per device in
//! `devices` rather than repeated in every leg. Where the volume's bytes live
//! (extents, legs, leg states, the COW area) is answered by
//! [`crate::mapping`] ([`VolumeDescription::mapping`]), the same code the
//! metadata server maps its own metadata with.

use crate::ids::{DeviceIndex, SnapshotId, VolumeId};
use crate::label::extent_bytes_valid;
use crate::metadata::{check_block_bytes, CowMap, DeviceState, LogicalExtent, PoolMetadata, MIRROR_LEGS_MAX};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptionError {
    #[error("volume {0} does not exist")]
    NoSuchVolume(VolumeId),
    #[error("volume description is inconsistent: {0}; ask the metadata server for a fresh one")]
    Inconsistent(String),
}

/// A device a volume has legs on, as agents need to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceEndpoint {
    pub index: DeviceIndex,
    /// Agents compare this with the label they read, to refuse a wrong device
    /// behind a right-looking URI.
    pub device_uuid: Uuid,
    pub uri: String,
    /// False if the pool marked the device failed: skip its legs.
    pub online: bool,
    /// The device came back and is being resynchronized (`online` is
    /// false): write to its legs, never read from them (protocol 4).
    #[serde(default)]
    pub resyncing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDescription {
    pub pool_uuid: Uuid,
    pub volume: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub block_bytes: u32,
    pub extent_bytes: u64,
    pub mirror_legs: u32,
    pub layout_generation: u64,
    /// Every device some leg is on, sorted by index.
    pub devices: Vec<DeviceEndpoint>,
    /// One entry per logical extent, in logical order.
    pub extents: Vec<LogicalExtent>,
    /// The volume's newest snapshot, if it has one: before first modifying
    /// a chunk of it, the agent copies the chunk here and registers it.
    #[serde(default)]
    pub snapshot: Option<SnapshotEpoch>,
}

/// What an agent needs to copy pre-images into the newest snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEpoch {
    pub id: SnapshotId,
    pub name: String,
    /// The volume's size when the snapshot was taken: chunks beyond it are
    /// not part of the snapshot and are written without a copy.
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    /// The COW area (same legs per extent as the volume); its devices are in
    /// the description's device table.
    pub cow_extents: Vec<LogicalExtent>,
    /// Chunks already registered when the description was made.
    pub cow: CowMap,
}

impl SnapshotEpoch {
    pub fn chunk_count(&self) -> u64 {
        self.chunk_layout().chunk_count()
    }
}

impl VolumeDescription {
    /// Describes volume `id` of `meta`.
    pub fn from_metadata(meta: &PoolMetadata, id: VolumeId) -> Result<VolumeDescription, DescriptionError> {
        let volume = meta.volume(id).ok_or(DescriptionError::NoSuchVolume(id))?;
        let snapshot = meta.newest_snapshot(id);
        let map = meta.volume_map(id).map_err(|_| DescriptionError::NoSuchVolume(id))?;
        let mut indexes: Vec<DeviceIndex> = map.physical_extents().map(|leg| leg.device).collect();
        indexes.sort_unstable();
        indexes.dedup();
        let devices = indexes
            .into_iter()
            .map(|index| {
                let device = meta.device(index).ok_or_else(|| {
                    DescriptionError::Inconsistent(format!("volume {id} has a leg on unknown device {index}"))
                })?;
                Ok(DeviceEndpoint {
                    index,
                    device_uuid: device.device_uuid,
                    uri: device.uri.clone(),
                    online: device.state.is_online(),
                    resyncing: matches!(device.state, DeviceState::Resyncing { .. }),
                })
            })
            .collect::<Result<Vec<_>, DescriptionError>>()?;
        let description = VolumeDescription {
            pool_uuid: meta.pool_uuid,
            volume: id,
            name: volume.name.clone(),
            size_bytes: volume.size_bytes,
            block_bytes: volume.block_bytes,
            extent_bytes: meta.extent_bytes,
            mirror_legs: volume.mirror_legs,
            layout_generation: volume.layout_generation,
            devices,
            extents: volume.extents.clone(),
            snapshot: snapshot.map(|s| SnapshotEpoch {
                id: s.id,
                name: s.name.clone(),
                size_bytes: s.size_bytes,
                chunk_bytes: s.chunk_bytes,
                cow_extents: s.cow_extents.clone(),
                cow: s.cow.clone(),
            }),
        };
        description.check()?;
        Ok(description)
    }

    /// Checks what the [mapping](crate::mapping) and the agent rely on. Run by agents on
    /// every description received from the wire.
    pub fn check(&self) -> Result<(), DescriptionError> {
        let bad = |why: String| Err(DescriptionError::Inconsistent(why));
        if !extent_bytes_valid(self.extent_bytes) {
            return bad(format!("extent size {} is not a valid power of two", self.extent_bytes));
        }
        if let Err(why) = check_block_bytes(self.block_bytes, self.extent_bytes) {
            return bad(why);
        }
        if self.size_bytes % u64::from(self.block_bytes) != 0 {
            return bad(format!("size {} is not a multiple of block size {}", self.size_bytes, self.block_bytes));
        }
        if self.extents.len() as u64 != self.size_bytes.div_ceil(self.extent_bytes) {
            return bad(format!("{} extents cannot hold {} bytes", self.extents.len(), self.size_bytes));
        }
        if !(1..=MIRROR_LEGS_MAX).contains(&self.mirror_legs) {
            return bad(format!("{} mirror legs", self.mirror_legs));
        }
        if self.devices.windows(2).any(|w| w[0].index >= w[1].index) {
            return bad("device table is not sorted by unique index".to_string());
        }
        if let Some(s) = &self.snapshot {
            if !s.chunk_bytes.is_power_of_two() || s.chunk_bytes > self.extent_bytes || s.chunk_bytes < 512 {
                return bad(format!("snapshot chunk size {}", s.chunk_bytes));
            }
            if s.size_bytes > self.size_bytes || s.cow_extents.len() as u64 != s.size_bytes.div_ceil(self.extent_bytes)
            {
                return bad(format!(
                    "snapshot {} of {} bytes with {} COW extents",
                    s.name,
                    s.size_bytes,
                    s.cow_extents.len()
                ));
            }
            if s.cow.chunks() != s.chunk_count() || !s.cow.is_consistent() {
                return bad(format!("snapshot {} has a copy-on-write map of the wrong size", s.name));
            }
        }
        let cow_extents = self.snapshot.iter().flat_map(|s| s.cow_extents.iter());
        for (i, extent) in self.extents.iter().chain(cow_extents).enumerate() {
            if extent.legs.len() != self.mirror_legs as usize {
                return bad(format!("extent {i} has {} legs, expected {}", extent.legs.len(), self.mirror_legs));
            }
            for (j, leg) in extent.legs.iter().enumerate() {
                if self.device(leg.device).is_none() {
                    return bad(format!("extent {i} is on device {} missing from the device table", leg.device));
                }
                if extent.legs[..j].iter().any(|other| other.device == leg.device) {
                    return bad(format!("extent {i} has two legs on device {}", leg.device));
                }
                if leg.offset % self.extent_bytes != 0 || leg.offset.checked_add(self.extent_bytes).is_none() {
                    return bad(format!("extent {i} leg {leg} is not extent-aligned"));
                }
            }
        }
        Ok(())
    }

    pub fn device(&self, index: DeviceIndex) -> Option<&DeviceEndpoint> {
        self.devices.binary_search_by_key(&index, |d| d.index).ok().map(|i| &self.devices[i])
    }
}

/// Sample descriptions for tests here and in [`crate::mapping`].
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::metadata::PhysicalExtent;

    pub(crate) const EXTENT: u64 = 1 << 20;

    /// A volume of `extents` extents with `legs` legs over `devices`
    /// devices: extent `e` leg `l` on device `(e + l) % devices` at device
    /// offset `(10 + e) * EXTENT`; devices in `failed` are offline.
    pub(crate) fn description(extents: u64, legs: u32, devices: u32, failed: &[u32]) -> VolumeDescription {
        VolumeDescription {
            pool_uuid: Uuid::from_u128(1),
            volume: VolumeId(1),
            name: "v".into(),
            size_bytes: extents * EXTENT,
            block_bytes: 4096,
            extent_bytes: EXTENT,
            mirror_legs: legs,
            layout_generation: 1,
            devices: (0..devices)
                .map(|i| DeviceEndpoint {
                    index: DeviceIndex(i),
                    device_uuid: Uuid::from_u128(i.into()),
                    uri: format!("nbd://host{i}:10809/export"),
                    online: !failed.contains(&i),
                    resyncing: false,
                })
                .collect(),
            extents: (0..extents)
                .map(|e| LogicalExtent {
                    legs: (0..legs)
                        .map(|l| PhysicalExtent {
                            device: DeviceIndex((e as u32 + l) % devices),
                            offset: (10 + e) * EXTENT,
                        })
                        .collect(),
                })
                .collect(),
            snapshot: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::EXTENT;
    use super::*;
    use crate::mapping::MapError;

    fn description(extents: u64, legs: u32) -> VolumeDescription {
        super::testing::description(extents, legs, legs.max(2), &[])
    }

    fn segments(d: &VolumeDescription, offset: u64, len: u64) -> Vec<(u64, u64, u64, u64)> {
        d.map(offset, len).unwrap().map(|s| (s.logical_offset, s.len_bytes, s.extent_index, s.extent_offset)).collect()
    }

    #[test]
    fn check_accepts_sample() {
        description(4, 2).check().unwrap();
        description(4, 1).check().unwrap();
    }

    #[test]
    fn map_within_one_extent() {
        let d = description(4, 1);
        assert_eq!(segments(&d, 4096, 8192), vec![(4096, 8192, 0, 4096)]);
        assert_eq!(segments(&d, 0, EXTENT), vec![(0, EXTENT, 0, 0)]);
        assert_eq!(segments(&d, EXTENT, EXTENT), vec![(EXTENT, EXTENT, 1, 0)]);
    }

    #[test]
    fn map_ending_exactly_on_boundary() {
        let d = description(4, 1);
        assert_eq!(segments(&d, EXTENT - 512, 512), vec![(EXTENT - 512, 512, 0, EXTENT - 512)]);
    }

    #[test]
    fn map_crossing_one_boundary() {
        let d = description(4, 1);
        assert_eq!(segments(&d, EXTENT - 512, 1024), vec![(EXTENT - 512, 512, 0, EXTENT - 512), (EXTENT, 512, 1, 0)]);
    }

    #[test]
    fn map_spanning_many_extents() {
        let d = description(4, 2);
        let all = segments(&d, 100, 4 * EXTENT - 200);
        assert_eq!(
            all,
            vec![
                (100, EXTENT - 100, 0, 100),
                (EXTENT, EXTENT, 1, 0),
                (2 * EXTENT, EXTENT, 2, 0),
                (3 * EXTENT, EXTENT - 100, 3, 0)
            ]
        );
        assert_eq!(d.map(100, 4 * EXTENT - 200).unwrap().len(), 4);
    }

    #[test]
    fn map_whole_volume_and_last_byte() {
        let d = description(3, 1);
        assert_eq!(d.map(0, 3 * EXTENT).unwrap().count(), 3);
        assert_eq!(segments(&d, 3 * EXTENT - 1, 1), vec![(3 * EXTENT - 1, 1, 2, EXTENT - 1)]);
    }

    #[test]
    fn map_empty_and_out_of_range() {
        let d = description(2, 1);
        assert_eq!(d.map(2 * EXTENT, 0).unwrap().count(), 0);
        assert!(matches!(d.map(2 * EXTENT, 1), Err(MapError::OutOfRange { .. })));
        assert!(matches!(d.map(2 * EXTENT - 1, 2), Err(MapError::OutOfRange { .. })));
        assert!(matches!(d.map(u64::MAX, 2), Err(MapError::OutOfRange { .. })));
    }

    #[test]
    fn map_legs_and_device_offsets() {
        let d = description(2, 2);
        let s: Vec<_> = d.map(EXTENT + 4096, 4096).unwrap().collect();
        assert_eq!(s.len(), 1);
        let legs = s[0].legs().unwrap();
        assert_eq!(legs.len(), 2);
        assert_eq!(legs[0].device_offset, 11 * EXTENT + 4096);
        let endpoint = d.device(legs[0].device).unwrap();
        assert_eq!(endpoint.uri, "nbd://host1:10809/export");
    }

    #[test]
    fn inconsistent_description_is_an_error_not_a_panic() {
        let mut d = description(2, 1);
        d.extents.pop();
        assert!(matches!(d.map(EXTENT, 1), Err(MapError::Inconsistent(_))));
        assert!(d.check().is_err());
        let mut d = description(2, 1);
        d.extent_bytes = 0;
        assert!(d.map(0, 1).is_err());
    }

    proptest::proptest! {
        #[test]
        fn map_covers_range_exactly(extents in 1u64..6, a in 0u64..6 * EXTENT, b in 0u64..6 * EXTENT) {
            let d = description(extents, 1);
            let size = d.size_bytes;
            let (start, end) = (a.min(b) % (size + 1), a.max(b) % (size + 1));
            let (start, end) = (start.min(end), start.max(end));
            let mut next = start;
            for s in d.map(start, end - start).unwrap() {
                proptest::prop_assert_eq!(s.logical_offset, next);
                proptest::prop_assert!(s.len_bytes > 0);
                proptest::prop_assert!(s.extent_offset + s.len_bytes <= EXTENT);
                proptest::prop_assert_eq!(s.extent_index * EXTENT + s.extent_offset, s.logical_offset);
                next += s.len_bytes;
            }
            proptest::prop_assert_eq!(next, end);
        }
    }
}
