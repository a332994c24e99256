//! Test helpers: sample pools and a proptest strategy for whole, valid
//! `PoolMetadata` values.

use super::*;
use crate::label::DeviceLayout;
use proptest::prelude::*;
use uuid::Uuid;

pub(crate) const EXTENT: u64 = 1 << 20;
pub(crate) const POOL: Uuid = Uuid::from_u128(7);

/// A pool with devices of the given data-area sizes, in extents.
pub(crate) fn pool(extents_per_device: &[u64]) -> PoolMetadata {
    let mut meta = PoolMetadata::new(POOL, "pool", EXTENT, PublicKey([1; 32]), 1);
    for (i, &n) in extents_per_device.iter().enumerate() {
        let device_bytes = (1 + n) * EXTENT;
        let layout = DeviceLayout::plan_with_slots(device_bytes, EXTENT, 64 << 10, 2).unwrap();
        assert_eq!(layout.extent_count(), n);
        meta.add_device(Uuid::from_u128(100 + i as u128), format!("nbd://h{i}/e"), &layout).unwrap();
    }
    meta
}

/// A pool with a bit of everything: mirrored and plain volumes, a failed
/// device, clients, handles and a snapshot with a COW area.
pub(crate) fn rich_pool() -> PoolMetadata {
    let mut meta = pool(&[20, 20, 20]);
    let a = meta.create_volume("alpha", 3 * EXTENT + 4096, 4096, 2, 10).unwrap();
    meta.create_volume("beta", 2 * EXTENT, 512, 1, 11).unwrap();
    meta.devices[2].state = DeviceState::Failed { reason: "I/O error".into(), since_unix_secs: 12 };
    meta.devices[0].holds_metadata = true;
    meta.clients.push(ClientRecord { public_key: PublicKey([2; 32]), name: "host-a".into(), role: ClientRole::Agent });
    meta.clients.push(ClientRecord { public_key: PublicKey([3; 32]), name: "root".into(), role: ClientRole::Admin });
    meta.handles.push(HandleRecord {
        id: HandleId(1),
        volume: a,
        agent_key: PublicKey([2; 32]),
        agent_name: "host-a".into(),
        agent_instance: Uuid::from_u128(99),
        mode: OpenMode::Exclusive,
        opened_at_unix_secs: 13,
        lease_expires_at_unix_ms: 14_000,
        durable_timeout_ms: 30_000,
        state: HandleState::Active,
    });
    meta.next_ids.handle = HandleId(2);
    let s = meta.create_snapshot(a, "before-upgrade", 15).unwrap();
    meta.register_cow(s, &[0, 3, 17]).unwrap();
    meta.generation = 4;
    meta.check().unwrap();
    meta
}

/// Valid pool metadata of varied shape.
pub(crate) fn arb_pool() -> impl Strategy<Value = PoolMetadata> {
    (
        proptest::collection::vec(1u64..16, 1..5),
        proptest::collection::vec((1u64..5, 1u32..3, "[a-z][a-z0-9-]{0,20}"), 0..5),
        proptest::collection::vec((any::<[u8; 32]>(), "[ -~]{1,30}", 0u8..3), 0..4),
        1u64..u64::MAX,
        "[a-zA-Z0-9 ._-]{1,40}",
    )
        .prop_map(|(sizes, volumes, clients, generation, name)| {
            let mut meta = pool(&sizes);
            meta.pool_name = name;
            for (extents, legs, name) in volumes {
                // Some will not fit or repeat a name: fine, they are skipped.
                let _ = meta.create_volume(&name, extents * EXTENT, 4096, legs, extents);
            }
            for (key, name, role) in clients {
                if meta.clients.iter().any(|c| c.public_key.0 == key) {
                    continue;
                }
                let role = [ClientRole::Agent, ClientRole::Admin, ClientRole::Backup][role as usize];
                meta.clients.push(ClientRecord { public_key: PublicKey(key), name, role });
            }
            meta.generation = generation;
            meta.check().unwrap();
            meta
        })
}

/// Plans one change of kind `k` against `meta` with the planners the
/// server uses (or a plain record), or `None` if it does not apply.
pub(crate) fn plan_step(meta: &PoolMetadata, k: u8, a: u64, b: u64) -> Option<MetaChange> {
    let volume_ids: Vec<VolumeId> = meta.volumes.iter().map(|v| v.id).collect();
    let pick_volume = || volume_ids.get((a % volume_ids.len().max(1) as u64) as usize).copied();
    match k {
        0 => meta.plan_create_volume(&format!("v{}", a % 50), (1 + b % 3) * EXTENT, 4096, 1 + (a % 2) as u32, a).ok(),
        1 => meta.plan_grow_volume(pick_volume()?, (1 + b % 5) * EXTENT).ok().flatten(),
        2 => meta.plan_delete_volume(pick_volume()?).ok(),
        3 => meta.plan_create_snapshot(pick_volume()?, &format!("s{}", b % 10), b).ok(),
        4 | 5 => {
            let s = meta.snapshots.get((a % meta.snapshots.len().max(1) as u64) as usize)?;
            let n = s.chunk_count();
            meta.plan_register_cow(s.id, &[b % n, (b / 7) % n, (b / 13) % n]).ok().flatten()
        }
        6 => {
            let s = meta.snapshots.get((a % meta.snapshots.len().max(1) as u64) as usize)?;
            Some(meta.snapshot_delete_plan(s.id)?.change())
        }
        7 => Some(MetaChange::HandleOpen(HandleRecord {
            id: meta.next_ids.handle,
            volume: pick_volume()?,
            agent_key: PublicKey([(a % 3) as u8; 32]),
            agent_name: format!("agent{}", a % 3),
            agent_instance: Uuid::from_u128(u128::from(b)),
            mode: OpenMode::SharedWrite,
            opened_at_unix_secs: b,
            lease_expires_at_unix_ms: b,
            durable_timeout_ms: 1000,
            state: HandleState::Active,
        })),
        8 => {
            let h = meta.handles.get((a % meta.handles.len().max(1) as u64) as usize)?;
            if b % 2 == 0 {
                Some(MetaChange::HandleRemove { handle: h.id })
            } else {
                meta.plan_break_handles(&[h.id], "broken", b, 2).into_iter().next()
            }
        }
        9 => Some(MetaChange::ClientPut(ClientRecord {
            public_key: PublicKey([(a % 4) as u8; 32]),
            name: format!("c{b}"),
            role: [ClientRole::Agent, ClientRole::Admin, ClientRole::Backup][(b % 3) as usize],
        })),
        10 => {
            let c = meta.clients.get((a % meta.clients.len().max(1) as u64) as usize)?;
            Some(MetaChange::ClientRemove { key: c.public_key })
        }
        11 => {
            let kind = match b % 3 {
                0 => super::RemapKind::MirrorAdd,
                1 => super::RemapKind::MirrorRemove { device: None },
                _ => super::RemapKind::Move {
                    from: meta.devices.get((b as usize / 3) % meta.devices.len())?.index,
                    to: None,
                },
            };
            Some(meta.plan_remap(pick_volume()?, kind, &Default::default()).ok()??.change)
        }
        12 => {
            let clock = meta.handovers.clock_floor_unix_ms + a % 5_000;
            let used = (b % 3 != 0).then(|| super::UsedToken {
                nonce: (u128::from(a) << 64 | u128::from(b)).to_be_bytes(),
                expires_at_unix_ms: clock + 1 + b % 10_000,
            });
            meta.plan_handover_tokens(clock, used).ok()
        }
        13 => {
            // A cached volume's mirror started afresh (a new generation), or
            // recorded replayed (the same one, not pending).
            let volume = pick_volume()?;
            let (generation, pending) = match meta.cache_mirror(volume) {
                Some(m) if b % 2 == 1 => (m.generation, false),
                Some(m) => (m.generation + 1, true),
                None => (b % 3, true),
            };
            let server = format!("mds-{}", a % 3);
            Some(MetaChange::CacheMirror(super::CacheMirrorRecord { volume, generation, server, pending }))
        }
        _ => {
            let d = meta.devices.get((a % meta.devices.len() as u64) as usize)?;
            let state = if b % 2 == 0 {
                DeviceState::Online
            } else {
                DeviceState::Failed { reason: "test".into(), since_unix_secs: b }
            };
            Some(MetaChange::DeviceState { device: d.index, state })
        }
    }
}
