//! Test helpers: sample pools and a proptest strategy for whole, valid
//! `PoolMetadata` values.

use super::*;
use crate::label::DeviceLayout;
use proptest::prelude::*;

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
