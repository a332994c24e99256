//! The mapping's rules against hand-computed expectations, and property
//! tests: segments cover a range exactly; legs, states and device offsets;
//! the description and the pool metadata map a volume the same way; a
//! snapshot chunk's place follows the snapshot read rules.

use proptest::prelude::*;

use super::*;
use crate::description::testing::description;
use crate::description::SnapshotEpoch;
use crate::metadata::testing::{pool, EXTENT};
use crate::metadata::{CowMap, COW_CHUNK_BYTES};

/// Adds a snapshot of the whole volume whose COW extent `e` is on device
/// `(e + 1 + l) % devices` at `(40 + e) * EXTENT`.
fn with_snapshot(mut d: VolumeDescription, chunk_bytes: u64) -> VolumeDescription {
    let devices = d.devices.len() as u32;
    let cow_extents = (0..d.extents.len() as u64)
        .map(|e| LogicalExtent {
            legs: (0..d.mirror_legs)
                .map(|l| PhysicalExtent {
                    device: DeviceIndex((e as u32 + 1 + l) % devices),
                    offset: (40 + e) * EXTENT,
                })
                .collect(),
        })
        .collect();
    d.snapshot = Some(SnapshotEpoch {
        id: SnapshotId(3),
        name: "s".into(),
        size_bytes: d.size_bytes,
        chunk_bytes,
        cow_extents,
        cow: CowMap::new(d.size_bytes.div_ceil(chunk_bytes)),
    });
    d.check().unwrap();
    d
}

/// A table over the description's devices that also fails `failed`, as
/// the agent's "marked failed" flags do.
#[derive(Debug)]
struct Overlay<'a> {
    endpoints: &'a Vec<DeviceEndpoint>,
    failed: DeviceIndex,
}

impl DeviceTable for Overlay<'_> {
    fn slot(&self, index: DeviceIndex) -> Option<usize> {
        self.endpoints.slot(index)
    }
    fn device_state(&self, slot: usize) -> LegState {
        if self.endpoints[slot].index == self.failed {
            return LegState::DeviceFailed;
        }
        self.endpoints.device_state(slot)
    }
    fn describe(&self, slot: usize) -> String {
        self.endpoints.describe(slot)
    }
}

fn devices_of(legs: &Legs) -> Vec<u32> {
    legs.iter().map(|l| l.device.0).collect()
}

#[test]
fn legs_carry_device_offsets_slots_and_states() {
    let d = description(3, 2, 3, &[2]);
    let segments: Vec<_> = d.map(EXTENT + 4096, 2 * EXTENT - 8192).unwrap().collect();
    assert_eq!(segments.len(), 2);
    // Extent 1: devices 1 and 2 (2 offline); extent 2: devices 2 and 0.
    let legs = segments[0].legs().unwrap();
    assert_eq!(
        &legs[..],
        &[
            Leg { device: DeviceIndex(1), slot: 1, device_offset: 11 * EXTENT + 4096, state: LegState::Online },
            Leg { device: DeviceIndex(2), slot: 2, device_offset: 11 * EXTENT + 4096, state: LegState::DeviceFailed },
        ]
    );
    assert_eq!(devices_of(&segments[0].write_legs().unwrap()), vec![1]);
    assert_eq!(devices_of(&segments[1].read_legs(0).unwrap()), vec![0]);
    assert_eq!(segments[1].legs().unwrap()[1].device_offset, 12 * EXTENT);
}

#[test]
fn reads_rotate_over_the_legs_that_serve_reads() {
    let d = description(1, 3, 3, &[]);
    let s = d.map(0, 4096).unwrap().next().unwrap();
    assert_eq!(devices_of(&s.read_legs(0).unwrap()), vec![0, 1, 2]);
    assert_eq!(devices_of(&s.read_legs(1).unwrap()), vec![1, 2, 0]);
    assert_eq!(devices_of(&s.read_legs(5).unwrap()), vec![2, 0, 1]);
    assert_eq!(devices_of(&s.write_legs().unwrap()), vec![0, 1, 2]);
    let d = description(1, 3, 3, &[1]);
    let s = d.map(0, 4096).unwrap().next().unwrap();
    assert_eq!(devices_of(&s.read_legs(1).unwrap()), vec![2, 0]);
    assert_eq!(devices_of(&s.write_legs().unwrap()), vec![0, 2]);
}

#[test]
fn an_extent_on_failed_devices_only_is_unavailable_and_says_which() {
    let d = description(2, 1, 2, &[0]);
    let s = d.map(0, 512).unwrap().next().unwrap();
    let e = s.read_legs(0).unwrap_err();
    assert!(matches!(e, MapError::Unavailable { extent_index: 0, action: "read from", .. }), "{e:?}");
    let message = e.to_string();
    assert!(message.contains("volume v") && message.contains("device dev0 (nbd://host0:10809/export)"), "{message}");
    assert!(message.contains("marked failed"), "{message}");
    assert!(matches!(s.write_legs(), Err(MapError::Unavailable { action: "write to", .. })));
    // Its legs are still listed, with their state.
    assert_eq!(s.legs().unwrap()[0].state, LegState::DeviceFailed);
    assert!(d.map(EXTENT, 512).unwrap().next().unwrap().read_legs(0).is_ok());
}

#[test]
fn a_table_can_fail_a_device_the_description_calls_online() {
    let d = description(1, 2, 2, &[]);
    let overlay = Overlay { endpoints: &d.devices, failed: DeviceIndex(0) };
    let s = d.mapping(&overlay).segments(0, 4096).unwrap().next().unwrap();
    assert_eq!(devices_of(&s.write_legs().unwrap()), vec![1]);
    assert_eq!(devices_of(&s.read_legs(0).unwrap()), vec![1]);
    assert_eq!(s.legs().unwrap()[0].state, LegState::DeviceFailed);
}

#[test]
fn a_leg_on_a_device_missing_from_the_table_is_an_error_not_a_panic() {
    let mut d = description(1, 2, 2, &[]);
    d.extents[0].legs[1].device = DeviceIndex(9);
    let s = d.map(0, 4096).unwrap().next().unwrap();
    assert!(matches!(s.legs(), Err(MapError::Inconsistent(_))));
    assert!(matches!(s.read_legs(0), Err(MapError::Inconsistent(_))));
    let mut d = description(1, 1, 2, &[]);
    d.extents[0].legs = vec![d.extents[0].legs[0]; LEGS_MAX + 1];
    assert!(matches!(d.map(0, 1).unwrap().next().unwrap().legs(), Err(MapError::Inconsistent(_))));
}

#[test]
fn segment_refuses_a_range_across_an_extent() {
    let d = description(2, 1, 2, &[]);
    let map = d.mapping(&d.devices);
    assert_eq!(map.live.segment(EXTENT - 512, 512).unwrap().extent_index, 0);
    assert!(matches!(map.live.segment(EXTENT - 512, 1024), Err(MapError::CrossesExtent { .. })));
    assert!(matches!(map.live.segment(2 * EXTENT, 1), Err(MapError::OutOfRange { .. })));
}

#[test]
fn the_newest_snapshots_pre_images_live_at_the_same_offset_of_its_area() {
    let d = with_snapshot(description(2, 2, 3, &[]), 16 << 10);
    let cow = d.mapping(&d.devices).newest.unwrap();
    assert_eq!((cow.snapshot, cow.name, cow.chunks.chunk_count()), (SnapshotId(3), "s", 2 * EXTENT / (16 << 10)));
    // Chunk 70 (16 KiB chunks, 64 per MiB extent): extent 1, offset 6 chunks in.
    let s = cow.chunk(70, 100, 50).unwrap();
    assert_eq!((s.extent_index, s.extent_offset, s.len_bytes), (1, 6 * (16 << 10) + 100, 50));
    let legs = s.legs().unwrap();
    assert_eq!(devices_of(&legs), vec![2, 0]);
    assert_eq!(legs[0].device_offset, 41 * EXTENT + 6 * (16 << 10) + 100);
    assert_eq!(s.area(), Area::Cow("s"));
    assert!(matches!(cow.chunk(128, 0, 1), Err(MapError::OutOfRange { .. })));
    assert!(matches!(cow.chunk(u64::MAX, 0, 1), Err(MapError::OutOfRange { .. })));
    // A run of chunks within an extent is one segment; across one, an error.
    assert_eq!(cow.chunk(1, 100, 2 * (16 << 10)).unwrap().len_bytes, 2 * (16 << 10));
    assert!(matches!(cow.chunk(63, 0, 2 * (16 << 10)), Err(MapError::CrossesExtent { .. })));
}

#[test]
fn physical_extents_are_the_volumes_then_the_newest_cow_areas() {
    let d = with_snapshot(description(2, 1, 3, &[]), 16 << 10);
    let all: Vec<PhysicalExtent> = d.mapping(&d.devices).physical_extents().copied().collect();
    let expected: Vec<PhysicalExtent> = d
        .extents
        .iter()
        .chain(&d.snapshot.as_ref().unwrap().cow_extents)
        .flat_map(|e| e.legs.iter().copied())
        .collect();
    assert_eq!(all, expected);
}

#[test]
fn chunk_layout_pieces_touches_and_runs() {
    let chunks = ChunkLayout { chunk_bytes: 16 << 10, size_bytes: 2 * EXTENT - 4096 };
    assert_eq!(chunks.chunk_count(), 128);
    assert_eq!(chunks.chunk_range(127), (127 * (16 << 10), (16 << 10) - 4096), "the last chunk is short");
    assert_eq!(chunks.chunks_range(2, 3), (2 * (16 << 10), 3 * (16 << 10)));
    assert_eq!(chunks.chunks_touched(100, 16 << 10), Some(0..=1));
    assert_eq!(chunks.chunks_touched(2 * EXTENT - 4096, 4096), None, "beyond the snapshot");
    assert_eq!(chunks.chunks_touched(0, 0), None);
    let pieces: Vec<ChunkPiece> = chunks.pieces((16 << 10) - 10, 30).collect();
    assert_eq!(
        pieces,
        vec![
            ChunkPiece { chunk: 0, within: (16 << 10) - 10, len_bytes: 10 },
            ChunkPiece { chunk: 1, within: 0, len_bytes: 20 }
        ]
    );
    assert_eq!(chunks.offset_of(&pieces[1]), 16 << 10);
    assert!(chunks.joins(&pieces[0], &pieces[1], EXTENT));
    let per_extent = EXTENT / (16 << 10);
    let across = [
        ChunkPiece { chunk: per_extent - 1, within: 0, len_bytes: 16 << 10 },
        ChunkPiece { chunk: per_extent, within: 0, len_bytes: 1 },
    ];
    assert!(!chunks.joins(&across[0], &across[1], EXTENT), "not across an extent");
    assert_eq!(
        chunks.runs(&[0, 1, 2, per_extent - 1, per_extent, per_extent + 2], EXTENT),
        vec![(0, 3), (per_extent - 1, 1), (per_extent, 1), (per_extent + 2, 1)]
    );
    assert!(chunks.runs(&[], EXTENT).is_empty());
}

#[test]
fn pool_metadata_maps_older_snapshots_through_the_read_rules() {
    let mut meta = pool(&[10, 10, 10]);
    let v = meta.create_volume("v", 2 * EXTENT, 4096, 2, 0).unwrap();
    let s1 = meta.create_snapshot(v, "s1", 1).unwrap();
    meta.register_cow(s1, &[1]).unwrap();
    let s2 = meta.create_snapshot(v, "s2", 2).unwrap();
    meta.register_cow(s2, &[1, 2]).unwrap();
    let chunk = COW_CHUNK_BYTES;
    let place = |id: SnapshotId, c: u64| {
        let source = meta.snapshot_source(id, c).unwrap();
        let s = meta.source_segment(v, source, c * chunk, chunk).unwrap();
        (source, s.physical_legs().to_vec(), s.extent_offset)
    };
    let cow = |id: SnapshotId| meta.snapshot(id).unwrap().cow_extents[0].legs.clone();
    let live = meta.volume(v).unwrap().extents[0].legs.clone();
    assert_eq!(place(s1, 1), (ChunkSource::Cow(s1), cow(s1), chunk));
    assert_eq!(place(s1, 2), (ChunkSource::Cow(s2), cow(s2), 2 * chunk));
    assert_eq!(place(s1, 3), (ChunkSource::Live, live.clone(), 3 * chunk));
    assert_eq!(place(s2, 0), (ChunkSource::Live, live, 0));
    assert_eq!(meta.volume_map(v).unwrap().newest.unwrap().snapshot, s2);
    assert!(matches!(meta.cow_area(SnapshotId(99)), Err(MapError::NoSuchSnapshot(_))));
    assert!(matches!(meta.volume_map(VolumeId(99)), Err(MapError::NoSuchVolume(_))));
}

/// Every leg of a segment, as comparable values.
fn leg_view(s: &Segment<'_>) -> Vec<(DeviceIndex, u64, LegState)> {
    s.legs().unwrap().iter().map(|l| (l.device, l.device_offset, l.state)).collect()
}

/// A pool with one mirrored volume of `extents` extents, snapshots of it
/// with some chunks registered in each, and maybe a failed device.
fn arb_snapshotted_pool() -> impl Strategy<Value = (PoolMetadata, VolumeId)> {
    (1u64..4, 1u32..3, proptest::collection::vec(proptest::collection::vec(0u64..64, 0..12), 0..4), 0usize..5).prop_map(
        |(extents, legs, snapshots, failed)| {
            let mut meta = pool(&[12, 12, 12]);
            let v = meta.create_volume("v", extents * EXTENT, 4096, legs, 0).unwrap();
            for (i, chunks) in snapshots.iter().enumerate() {
                let s = meta.create_snapshot(v, &format!("s{i}"), i as u64).unwrap();
                let count = meta.snapshot(s).unwrap().chunk_count();
                let chunks: Vec<u64> = chunks.iter().map(|c| c % count).collect();
                meta.register_cow(s, &chunks).unwrap();
            }
            if let Some(d) = meta.devices.get_mut(failed) {
                d.state = crate::metadata::DeviceState::Failed { reason: "test".into(), since_unix_secs: 0 };
            }
            meta.check().unwrap();
            (meta, v)
        },
    )
}

proptest! {
    #[test]
    fn segments_cover_a_range_exactly(
        extents in 1u64..6,
        legs in 1u32..4,
        failed in proptest::collection::vec(0u32..4, 0..3),
        a in 0u64..6 * EXTENT,
        b in 0u64..6 * EXTENT,
        rotation in 0usize..8,
    ) {
        let d = description(extents, legs, 4, &failed);
        let size = d.size_bytes;
        let (start, end) = (a.min(b) % (size + 1), a.max(b) % (size + 1));
        let (start, end) = (start.min(end), start.max(end));
        let segments = d.map(start, end - start).unwrap();
        let expected_count = segments.len();
        let mut next = start;
        let mut count = 0;
        for s in segments {
            prop_assert_eq!(s.logical_offset, next);
            prop_assert!(s.len_bytes > 0);
            prop_assert!(s.extent_offset + s.len_bytes <= EXTENT);
            prop_assert_eq!(s.extent_index * EXTENT + s.extent_offset, s.logical_offset);
            let all = s.legs().unwrap();
            prop_assert_eq!(all.len(), legs as usize);
            for (leg, physical) in all.iter().zip(&d.extents[s.extent_index as usize].legs) {
                prop_assert_eq!(leg.device, physical.device);
                prop_assert_eq!(leg.device_offset, physical.offset + s.extent_offset);
                prop_assert_eq!(d.devices[leg.slot].index, leg.device);
                let online = !failed.contains(&leg.device.0);
                prop_assert_eq!(leg.state, if online { LegState::Online } else { LegState::DeviceFailed });
            }
            let online: Vec<Leg> = all.iter().copied().filter(|l| l.state == LegState::Online).collect();
            match (s.write_legs(), s.read_legs(rotation)) {
                (Ok(write), Ok(read)) => {
                    prop_assert_eq!(&write[..], &online[..]);
                    let mut rotated = online.clone();
                    rotated.rotate_left(rotation % online.len());
                    prop_assert_eq!(&read[..], &rotated[..]);
                }
                (Err(MapError::Unavailable { .. }), Err(MapError::Unavailable { .. })) => prop_assert!(online.is_empty()),
                other => prop_assert!(false, "{:?}", other),
            }
            next += s.len_bytes;
            count += 1;
        }
        prop_assert_eq!(next, end);
        prop_assert_eq!(count, expected_count);
    }

    #[test]
    fn the_description_and_the_pool_map_a_volume_alike((meta, v) in arb_snapshotted_pool(), a: u64, b: u64) {
        let d = VolumeDescription::from_metadata(&meta, v).unwrap();
        let from_meta = meta.volume_map(v).unwrap();
        let from_description = d.mapping(&d.devices);
        let size = d.size_bytes;
        let (start, end) = ((a % (size + 1)).min(b % (size + 1)), (a % (size + 1)).max(b % (size + 1)));
        let ours: Vec<_> = from_description.segments(start, end - start).unwrap().collect();
        let theirs: Vec<_> = from_meta.segments(start, end - start).unwrap().collect();
        prop_assert_eq!(ours.len(), theirs.len());
        for (x, y) in ours.iter().zip(&theirs) {
            prop_assert_eq!((x.logical_offset, x.len_bytes, x.extent_index), (y.logical_offset, y.len_bytes, y.extent_index));
            prop_assert_eq!(leg_view(x), leg_view(y));
            prop_assert_eq!(x.write_legs().ok().map(|l| devices_of(&l)), y.write_legs().ok().map(|l| devices_of(&l)));
        }
        prop_assert_eq!(from_description.newest.map(|c| c.snapshot), from_meta.newest.map(|c| c.snapshot));
        if let (Some(x), Some(y)) = (from_description.newest, from_meta.newest) {
            prop_assert_eq!(x.chunks, y.chunks);
            for c in 0..x.chunks.chunk_count() {
                let (offset, len) = x.chunks.chunk_range(c);
                prop_assert_eq!(leg_view(&x.pre_image(offset, len).unwrap()), leg_view(&y.pre_image(offset, len).unwrap()));
                prop_assert_eq!(leg_view(&x.chunk(c, 0, len).unwrap()), leg_view(&y.pre_image(offset, len).unwrap()));
            }
        }
        let mut ours: Vec<_> = from_description.physical_extents().collect();
        let mut theirs: Vec<_> = from_meta.physical_extents().collect();
        ours.sort();
        theirs.sort();
        prop_assert_eq!(ours, theirs);
    }

    #[test]
    fn a_snapshot_chunk_reads_where_the_snapshot_rules_say((meta, v) in arb_snapshotted_pool(), pick: usize, c: u64, within in 0u64..COW_CHUNK_BYTES) {
        let snapshots = meta.snapshots_of(v);
        prop_assume!(!snapshots.is_empty());
        let s = snapshots[pick % snapshots.len()];
        let chunks = s.chunk_layout();
        let c = c % chunks.chunk_count();
        let (offset, len) = chunks.chunk_range(c);
        let within = within % len;
        let source = meta.snapshot_source(s.id, c).unwrap();
        let segment = meta.source_segment(v, source, offset + within, len - within).unwrap();
        // The rule, written out: the first snapshot from `s` on whose map
        // holds the chunk, else the live volume; the area is direct-mapped.
        let holder = snapshots.iter().filter(|o| o.id >= s.id).find(|o| o.cow.contains(c));
        let extents = match holder {
            Some(o) => { prop_assert_eq!(source, ChunkSource::Cow(o.id)); &o.cow_extents }
            None => { prop_assert_eq!(source, ChunkSource::Live); &meta.volume(v).unwrap().extents }
        };
        let byte = offset + within;
        let expected = &extents[(byte / EXTENT) as usize].legs;
        prop_assert_eq!(segment.physical_legs(), &expected[..]);
        prop_assert_eq!(segment.len_bytes, len - within);
        for (leg, physical) in segment.legs().unwrap().iter().zip(expected) {
            prop_assert_eq!(leg.device_offset, physical.offset + byte % EXTENT);
            prop_assert_eq!(leg.state, LegState::of_device(&meta.device(physical.device).unwrap().state));
        }
        if let ChunkSource::Cow(id) = source {
            let area = meta.cow_area(id).unwrap();
            prop_assert_eq!(leg_view(&area.chunk(c, within, len - within).unwrap()), leg_view(&segment));
        }
    }
}

#[test]
fn a_resyncing_leg_takes_writes_and_serves_reads_only_as_the_only_copy() {
    let resyncing = |mut d: VolumeDescription| {
        d.devices[0].online = false;
        d.devices[0].resyncing = true;
        d
    };
    // Mirrored: reads from the other leg only, writes to both.
    let d = resyncing(description(1, 2, 2, &[]));
    let s = d.map(0, 4096).unwrap().next().unwrap();
    assert_eq!(devices_of(&s.read_legs(0).unwrap()), vec![1]);
    assert_eq!(devices_of(&s.read_legs(1).unwrap()), vec![1]);
    assert_eq!(devices_of(&s.write_legs().unwrap()), vec![0, 1]);
    assert_eq!(s.legs().unwrap()[0].state, LegState::Resyncing);
    // Plain: its only copy is read and written.
    let d = resyncing(description(2, 1, 2, &[]));
    let s = d.map(0, 4096).unwrap().next().unwrap();
    assert_eq!(s.physical_legs().len(), 1);
    assert_eq!(s.physical_legs()[0].device, DeviceIndex(0));
    assert_eq!(devices_of(&s.read_legs(0).unwrap()), vec![0]);
    assert_eq!(devices_of(&s.write_legs().unwrap()), vec![0]);
}
