//! Planning a new map for a volume: legs moved off a device, a mirror leg
//! added or removed. The admin reconfiguration commands (`device
//! evacuate`, `device replace`, `volume move`, `volume mirror add|remove`)
//! are all one [`MetaChange::VolumeRemap`] per volume, committed once the
//! server has copied every new leg.
//!
//! Why one planner for all of them: each is "for every logical extent of the
//! volume and of its snapshots' copy-on-write areas, some legs go and some
//! come", and what must hold is the same — a new leg is a free extent on an
//! online device that holds no other leg of the same extent, and it has a
//! readable source among the old legs to be copied from. Why the whole map
//! is recorded rather than the moved legs: replay must reach the same state
//! on any build (see `change`), and a whole map is the simplest record that
//! does; a remap is rare, and a large one becomes a checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use super::change::{MetaChange, Remap};
use super::{AllocError, DeviceState, LogicalExtent, PhysicalExtent, PoolMetadata, MIRROR_LEGS_MAX};
use crate::ids::{DeviceIndex, VolumeId};

/// What a remap does to each logical extent of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemapKind {
    /// Every leg on `from` moves to `to` (or, without it, to the online
    /// device with the most free extents that holds no leg of that extent).
    Move { from: DeviceIndex, to: Option<DeviceIndex> },
    /// Every extent gets one more leg (copied from a readable one).
    MirrorAdd,
    /// Every extent loses one leg: the one on `device` if given, else one on
    /// a device that is not online, else the last.
    MirrorRemove { device: Option<DeviceIndex> },
}

impl std::fmt::Display for RemapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemapKind::Move { from, to: Some(to) } => write!(f, "move its extents from device {from} to {to}"),
            RemapKind::Move { from, to: None } => write!(f, "move its extents off device {from}"),
            RemapKind::MirrorAdd => f.write_str("add a mirror leg"),
            RemapKind::MirrorRemove { device: Some(d) } => write!(f, "remove its mirror leg on device {d}"),
            RemapKind::MirrorRemove { device: None } => f.write_str("remove a mirror leg"),
        }
    }
}

/// One new leg and the old legs of its extent it can be copied from (in
/// order of preference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegCopy {
    pub to: PhysicalExtent,
    pub from: Vec<PhysicalExtent>,
}

/// A planned remap: the change to commit and the copies that must be done
/// (and flushed) before it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemapPlan {
    pub change: MetaChange,
    pub copies: Vec<LegCopy>,
    /// The volume's layout generation the plan was made against: committed
    /// only if it is still that (nothing else changed the map meanwhile).
    pub layout_generation: u64,
}

/// Per-device free extents still to hand out, and which device was used
/// last (spreading new legs as [`super::allocate`] does).
struct LegAllocator {
    free: BTreeMap<DeviceIndex, std::collections::VecDeque<u64>>,
    last_used: BTreeMap<DeviceIndex, u64>,
    step: u64,
}

impl LegAllocator {
    /// Takes a free extent on `only` (if given) or on the device with the
    /// most free extents among those not in `avoid`.
    fn take(&mut self, only: Option<DeviceIndex>, avoid: &[DeviceIndex]) -> Option<PhysicalExtent> {
        self.step += 1;
        let device = self
            .free
            .iter()
            .filter(|(d, offsets)| !offsets.is_empty() && !avoid.contains(d) && only.is_none_or(|o| o == **d))
            .max_by_key(|(d, offsets)| {
                (offsets.len(), std::cmp::Reverse(self.last_used.get(d).copied().unwrap_or(0)), std::cmp::Reverse(**d))
            })
            .map(|(d, _)| *d)?;
        let offset = self.free.get_mut(&device)?.pop_front()?;
        self.last_used.insert(device, self.step);
        Some(PhysicalExtent { device, offset })
    }
}

impl PoolMetadata {
    /// Plans `kind` for `volume`, never placing a new leg on a device in
    /// `excluded` (devices being evacuated). `Ok(None)`: nothing to do (no
    /// leg on the device to move off). Pure: nothing changes until the
    /// returned change is applied.
    pub fn plan_remap(
        &self,
        volume: VolumeId,
        kind: RemapKind,
        excluded: &BTreeSet<DeviceIndex>,
    ) -> Result<Option<RemapPlan>, AllocError> {
        let v = self.volume(volume).ok_or(AllocError::NoSuchVolume(volume))?;
        let snapshots: Vec<_> = self.snapshots.iter().filter(|s| s.volume == volume).collect();
        let all = || v.extents.iter().chain(snapshots.iter().flat_map(|s| s.cow_extents.iter()));
        let mirror_legs = match kind {
            RemapKind::Move { from, to } => {
                if to == Some(from) {
                    return Err(AllocError::BadRequest(format!("moving from device {from} to itself")));
                }
                if let Some(to) = to {
                    match self.device(to) {
                        None => return Err(AllocError::BadRequest(format!("device {to} is not in the pool"))),
                        Some(d) if !d.state.is_online() => {
                            return Err(AllocError::BadRequest(format!("device {to} is {}, not online", d.state)))
                        }
                        Some(_) if excluded.contains(&to) => {
                            return Err(AllocError::BadRequest(format!("device {to} is being evacuated")))
                        }
                        Some(_) => {}
                    }
                }
                if !all().any(|e| e.legs.iter().any(|l| l.device == from)) {
                    return Ok(None);
                }
                v.mirror_legs
            }
            RemapKind::MirrorAdd if v.mirror_legs >= MIRROR_LEGS_MAX => {
                return Err(AllocError::BadRequest(format!(
                    "volume {} has {} legs already, the most a volume may have",
                    v.name, v.mirror_legs
                )))
            }
            RemapKind::MirrorAdd => v.mirror_legs + 1,
            RemapKind::MirrorRemove { .. } if v.mirror_legs <= 1 => {
                return Err(AllocError::BadRequest(format!(
                    "volume {} has a single leg; it has no mirror leg to remove",
                    v.name
                )))
            }
            RemapKind::MirrorRemove { device } => {
                if let Some(d) = device {
                    if !v.extents.iter().any(|e| e.legs.iter().any(|l| l.device == d)) {
                        return Err(AllocError::BadRequest(format!("volume {} has no leg on device {d}", v.name)));
                    }
                }
                v.mirror_legs - 1
            }
        };
        let mut alloc = LegAllocator {
            free: self
                .free_extents()
                .per_device
                .into_iter()
                .filter(|(d, _)| !excluded.contains(d))
                .map(|(d, offsets)| (d, offsets.into()))
                .collect(),
            last_used: BTreeMap::new(),
            step: 0,
        };
        let online = |d: DeviceIndex| self.device(d).is_some_and(|r| r.state.is_online());
        // A resyncing leg is a source only as its extent's only copy (as
        // the agents read it): another leg may be newer.
        let readable = |d: DeviceIndex, legs: usize| {
            self.device(d).is_some_and(|r| match r.state {
                DeviceState::Online => true,
                DeviceState::Resyncing { .. } => legs == 1,
                DeviceState::Failed { .. } => false,
            })
        };
        let mut copies = Vec::new();
        let mut map_one = |i: usize, e: &LogicalExtent| -> Result<LogicalExtent, AllocError> {
            let sources: Vec<PhysicalExtent> =
                e.legs.iter().copied().filter(|l| readable(l.device, e.legs.len())).collect();
            let mut legs = e.legs.clone();
            let mut added = Vec::new();
            match kind {
                RemapKind::Move { from, to } => {
                    for leg in legs.iter_mut().filter(|l| l.device == from) {
                        let avoid: Vec<DeviceIndex> = e.legs.iter().map(|l| l.device).collect();
                        *leg = alloc.take(to, &avoid).ok_or_else(|| no_room(v.mirror_legs, to, i))?;
                        added.push(*leg);
                    }
                }
                RemapKind::MirrorAdd => {
                    let avoid: Vec<DeviceIndex> = e.legs.iter().map(|l| l.device).collect();
                    let leg = alloc.take(None, &avoid).ok_or_else(|| no_room(v.mirror_legs + 1, None, i))?;
                    legs.push(leg);
                    added.push(leg);
                }
                RemapKind::MirrorRemove { device } => {
                    let drop = device
                        .and_then(|d| legs.iter().position(|l| l.device == d))
                        .or_else(|| legs.iter().position(|l| !online(l.device)))
                        .unwrap_or(legs.len() - 1);
                    let dropped = legs.remove(drop);
                    if online(dropped.device) && !legs.iter().any(|l| online(l.device)) {
                        return Err(AllocError::BadRequest(format!(
                            "extent {i}: its leg on device {} is its only one on an online device; remove another \
                             leg",
                            dropped.device
                        )));
                    }
                }
            }
            if !added.is_empty() {
                if sources.is_empty() {
                    return Err(AllocError::BadRequest(format!(
                        "extent {i} has no readable leg to copy from (its devices failed); its data is not \
                         available"
                    )));
                }
                copies.extend(added.into_iter().map(|to| LegCopy { to, from: sources.clone() }));
            }
            Ok(LogicalExtent { legs })
        };
        let extents = v.extents.iter().enumerate().map(|(i, e)| map_one(i, e)).collect::<Result<Vec<_>, _>>()?;
        let mut cow = Vec::new();
        for s in &snapshots {
            let base = v.extents.len();
            let mapped = s.cow_extents.iter().enumerate().map(|(i, e)| map_one(base + i, e));
            cow.push((s.id, mapped.collect::<Result<Vec<_>, _>>()?));
        }
        let change = MetaChange::VolumeRemap(Remap { volume, mirror_legs, extents, snapshots: cow });
        Ok(Some(RemapPlan { change, copies, layout_generation: v.layout_generation }))
    }
}

fn no_room(legs: u32, to: Option<DeviceIndex>, extent: usize) -> AllocError {
    match to {
        Some(to) => AllocError::BadRequest(format!(
            "device {to} has no free extent left for extent {extent} (or already holds a leg of it); free space \
             there or move to another device"
        )),
        None => AllocError::NotEnoughSpace { needed: u64::from(legs), available: 0, legs },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::{pool, rich_pool, EXTENT};

    fn devices_of(meta: &PoolMetadata, volume: VolumeId) -> Vec<Vec<u32>> {
        meta.volume(volume).unwrap().extents.iter().map(|e| e.legs.iter().map(|l| l.device.0).collect()).collect()
    }

    #[test]
    fn a_move_replaces_only_the_legs_on_the_device_and_copies_from_readable_legs() {
        let mut meta = pool(&[10, 10, 10, 10]);
        let v = meta.create_volume("m", 4 * EXTENT, 4096, 2, 0).unwrap();
        let before = meta.volume(v).unwrap().clone();
        let from = DeviceIndex(0);
        let plan = meta.plan_remap(v, RemapKind::Move { from, to: None }, &BTreeSet::new()).unwrap().unwrap();
        let on_from = before.extents.iter().filter(|e| e.legs.iter().any(|l| l.device == from)).count();
        assert_eq!(plan.copies.len(), on_from);
        for c in &plan.copies {
            assert_ne!(c.to.device, from);
            assert!(!c.from.is_empty());
        }
        meta.apply(&plan.change).unwrap();
        meta.check().unwrap();
        let after = meta.volume(v).unwrap();
        assert_eq!(after.layout_generation, before.layout_generation + 1);
        for (old, new) in before.extents.iter().zip(&after.extents) {
            for (o, n) in old.legs.iter().zip(&new.legs) {
                if o.device == from {
                    assert_ne!(n.device, from);
                    assert!(!old.legs.iter().any(|l| l.device == n.device), "a leg moved next to its twin");
                } else {
                    assert_eq!(o, n, "legs not on the device stay put");
                }
            }
        }
        assert_eq!(meta.plan_remap(v, RemapKind::Move { from, to: None }, &BTreeSet::new()).unwrap(), None);
    }

    #[test]
    fn a_move_to_a_device_lands_there_and_excluded_devices_get_nothing() {
        let mut meta = pool(&[10, 10, 10]);
        let v = meta.create_volume("p", 6 * EXTENT, 4096, 1, 0).unwrap();
        let plan = meta
            .plan_remap(v, RemapKind::Move { from: DeviceIndex(0), to: Some(DeviceIndex(2)) }, &BTreeSet::new())
            .unwrap()
            .unwrap();
        meta.apply(&plan.change).unwrap();
        assert!(devices_of(&meta, v).iter().all(|legs| legs != &vec![0]));
        assert_eq!(devices_of(&meta, v).iter().filter(|l| l == &&vec![2]).count(), 4);
        let excluded: BTreeSet<DeviceIndex> = [DeviceIndex(2)].into();
        let plan = meta.plan_remap(v, RemapKind::Move { from: DeviceIndex(1), to: None }, &excluded).unwrap().unwrap();
        meta.apply(&plan.change).unwrap();
        // Plain volume: the only legs left are on the one device not moved off nor excluded.
        assert!(devices_of(&meta, v).iter().all(|legs| legs == &vec![2] || legs == &vec![0]));
        assert!(devices_of(&meta, v).iter().any(|legs| legs == &vec![0]));
        meta.check().unwrap();
    }

    #[test]
    fn mirror_add_and_remove_round_trip_and_snapshots_follow() {
        let mut meta = rich_pool();
        // rich_pool's device 2 failed: give the pool an online third device.
        meta.devices[2].state = DeviceState::Online;
        let beta = meta.volume_by_name("beta").unwrap().id;
        let s = meta.create_snapshot(beta, "s", 1).unwrap();
        let plan = meta.plan_remap(beta, RemapKind::MirrorAdd, &BTreeSet::new()).unwrap().unwrap();
        let extents = meta.volume(beta).unwrap().extents.len() + meta.snapshot(s).unwrap().cow_extents.len();
        assert_eq!(plan.copies.len(), extents);
        let undo = meta.apply(&plan.change).unwrap();
        meta.check().unwrap();
        assert_eq!(meta.volume(beta).unwrap().mirror_legs, 2);
        assert!(meta.snapshot(s).unwrap().cow_extents.iter().all(|e| e.legs.len() == 2));
        let before_remove = meta.clone();
        // A leg another volume uses is refused, and refusing changes nothing.
        let MetaChange::VolumeRemap(mut stolen) = plan.change.clone() else { unreachable!() };
        let alpha = meta.volume_by_name("alpha").unwrap();
        stolen.extents[0].legs[1] = alpha.extents[0].legs[0];
        stolen.extents[0].legs.sort_by_key(|l| l.device);
        let stolen = MetaChange::VolumeRemap(stolen);
        assert!(meta.apply(&stolen).is_err());
        assert_eq!(meta, before_remove);
        let plan = meta.plan_remap(beta, RemapKind::MirrorRemove { device: None }, &BTreeSet::new()).unwrap().unwrap();
        assert!(plan.copies.is_empty());
        meta.apply(&plan.change).unwrap();
        meta.check().unwrap();
        assert_eq!(meta.volume(beta).unwrap().mirror_legs, 1);
        assert!(meta.plan_remap(beta, RemapKind::MirrorRemove { device: None }, &BTreeSet::new()).is_err());
        // Undo of the add restores the single-leg map exactly.
        let mut back = before_remove.clone();
        back.revert(undo);
        assert_eq!(back.volume(beta).unwrap().mirror_legs, 1);
    }

    #[test]
    fn mirror_remove_drops_the_failed_leg_first_and_a_move_copies_from_the_survivor() {
        let mut meta = rich_pool();
        let alpha = meta.volume_by_name("alpha").unwrap().id;
        // Device 2 failed: a move off it copies from the other leg only.
        let plan =
            meta.plan_remap(alpha, RemapKind::Move { from: DeviceIndex(2), to: None }, &BTreeSet::new()).unwrap();
        if let Some(plan) = plan {
            assert!(plan.copies.iter().all(|c| c.from.iter().all(|f| f.device != DeviceIndex(2))));
        }
        let plan = meta.plan_remap(alpha, RemapKind::MirrorRemove { device: None }, &BTreeSet::new()).unwrap().unwrap();
        meta.apply(&plan.change).unwrap();
        meta.check().unwrap();
        assert!(devices_of(&meta, alpha).iter().all(|legs| legs.len() == 1 && legs[0] != 2));
    }

    #[test]
    fn device_add_and_remove_apply_revert_and_refuse_a_device_with_data() {
        let mut meta = pool(&[4, 4]);
        let v = meta.create_volume("v", EXTENT, 4096, 1, 0).unwrap();
        let mut record = meta.devices[0].clone();
        record.index = meta.next_ids.device;
        record.device_uuid = uuid::Uuid::from_u128(555);
        record.uri = "nbd://new/e".into();
        record.holds_metadata = false;
        let before = meta.clone();
        let undo = meta.apply(&MetaChange::DeviceAdd(record.clone())).unwrap();
        meta.check().unwrap();
        assert!(meta.apply(&MetaChange::DeviceAdd(record.clone())).is_err(), "twice");
        meta.revert(undo);
        assert_eq!(meta, before);
        meta.apply(&MetaChange::DeviceAdd(record.clone())).unwrap();
        let used = meta.volume(v).unwrap().extents[0].legs[0].device;
        let err = meta.apply(&MetaChange::DeviceRemove { device: used }).unwrap_err();
        assert!(err.reason.contains("volume v"), "{err}");
        let before = meta.clone();
        let undo = meta.apply(&MetaChange::DeviceRemove { device: record.index }).unwrap();
        meta.check().unwrap();
        assert!(meta.device(record.index).is_none());
        meta.revert(undo);
        assert_eq!(meta, before);
        let decoded: MetaChange =
            crate::codec::decode(&crate::codec::encode(&MetaChange::DeviceAdd(record.clone())).unwrap()).unwrap();
        assert_eq!(decoded, MetaChange::DeviceAdd(record));
    }

    #[test]
    fn a_device_s_fencing_is_recorded_reverted_and_goes_with_the_device() {
        let mut meta = pool(&[4, 4]);
        let (a, b) = (meta.devices[0].index, meta.devices[1].index);
        assert_eq!(meta.device_fenced(a), None, "unknown until recorded");
        let before = meta.clone();
        let first = meta.apply(&MetaChange::DeviceFencing { device: b, fenced: false }).unwrap();
        let second = meta.apply(&MetaChange::DeviceFencing { device: a, fenced: true }).unwrap();
        meta.check().unwrap();
        assert_eq!((meta.device_fenced(a), meta.device_fenced(b)), (Some(true), Some(false)));
        assert_eq!(meta.device_fencing.iter().map(|f| f.device).collect::<Vec<_>>(), vec![a, b], "sorted");
        let learned = meta.apply(&MetaChange::DeviceFencing { device: b, fenced: true }).unwrap();
        assert_eq!(meta.device_fenced(b), Some(true));
        meta.revert(learned);
        assert_eq!(meta.device_fenced(b), Some(false));
        meta.revert(second);
        meta.revert(first);
        assert_eq!(meta, before);
        let unknown = DeviceIndex(99);
        assert!(meta.apply(&MetaChange::DeviceFencing { device: unknown, fenced: true }).is_err());

        // A removed device takes its record with it (and gets it back on a revert).
        let mut record = meta.devices[0].clone();
        record.index = meta.next_ids.device;
        record.device_uuid = uuid::Uuid::from_u128(556);
        record.uri = "nbd://new/f".into();
        record.holds_metadata = false;
        meta.apply(&MetaChange::DeviceAdd(record.clone())).unwrap();
        meta.apply(&MetaChange::DeviceFencing { device: record.index, fenced: true }).unwrap();
        let before = meta.clone();
        let undo = meta.apply(&MetaChange::DeviceRemove { device: record.index }).unwrap();
        meta.check().unwrap();
        assert_eq!(meta.device_fenced(record.index), None);
        meta.revert(undo);
        assert_eq!(meta, before);
        let change = MetaChange::DeviceFencing { device: a, fenced: true };
        assert_eq!(crate::codec::decode::<MetaChange>(&crate::codec::encode(&change).unwrap()).unwrap(), change);
    }
}
