//! A pool image in metadata format 2 (slots only, no journal): what every
//! release before the journal wrote. The images in `tests/fixtures/format2/`
//! were written by this generator on the commit before the journal existed;
//! this test regenerates them with today's legacy slot encoder and asserts
//! the bytes are unchanged, so the fixture stays a faithful copy of the old
//! format. `SANVOL_WRITE_FIXTURES=1` rewrites them (only ever needed if the
//! scenario below changes).

use std::path::PathBuf;

use uuid::Uuid;
use volume_format::label::{DeviceLabel, DeviceLayout};
use volume_format::metadata::{
    ClientRecord, ClientRole, HandleRecord, HandleState, MetadataArea, OpenMode, PoolMetadata,
};
use volume_format::{HandleId, PublicKey};

/// Seed of the server key the fixture pool records (tests sign with it).
pub const SERVER_SEED: [u8; 32] = [0x5a; 32];
pub const POOL: Uuid = Uuid::from_u128(0x5a17_0001);
pub const DEVICE_BYTES: u64 = 64 << 20;
pub const EXTENT_BYTES: u64 = 1 << 20;
pub const METADATA_AREA_BYTES: u64 = 64 << 10;

fn server_key() -> PublicKey {
    PublicKey(ed25519_dalek::SigningKey::from_bytes(&SERVER_SEED).verifying_key().to_bytes())
}

/// The labels and, per commit, the metadata as the server committed it.
fn scenario() -> (Vec<DeviceLabel>, Vec<PoolMetadata>) {
    let layout = DeviceLayout::plan_with_slots(DEVICE_BYTES, EXTENT_BYTES, METADATA_AREA_BYTES, 4).unwrap();
    let mut meta = PoolMetadata::new(POOL, "fixture", EXTENT_BYTES, server_key(), 1_700_000_000);
    let mut labels = Vec::new();
    for i in 0..2u128 {
        let device_uuid = Uuid::from_u128(0x5a17_d000 + i);
        let index = meta.add_device(device_uuid, format!("nbd+unix:///?socket=/fixture/dev{i}.sock"), &layout).unwrap();
        meta.devices.last_mut().unwrap().holds_metadata = true;
        labels.push(DeviceLabel {
            pool_uuid: POOL,
            device_uuid,
            device_index: index,
            layout,
            created_at_unix_secs: 1_700_000_000,
        });
    }
    meta.clients.push(ClientRecord { public_key: PublicKey([0xad; 32]), name: "root".into(), role: ClientRole::Admin });
    let mut commits = Vec::new();
    let mut commit = |meta: &mut PoolMetadata| {
        meta.generation += 1;
        commits.push(meta.clone());
    };
    commit(&mut meta);
    meta.clients.push(ClientRecord {
        public_key: PublicKey([0xa1; 32]),
        name: "host-a".into(),
        role: ClientRole::Agent,
    });
    meta.clients.push(ClientRecord {
        public_key: PublicKey([0xb1; 32]),
        name: "backup".into(),
        role: ClientRole::Backup,
    });
    commit(&mut meta);
    let alpha = meta.create_volume("alpha", 4 * EXTENT_BYTES + 4096, 4096, 2, 1_700_000_100).unwrap();
    commit(&mut meta);
    let beta = meta.create_volume("beta", 3 * EXTENT_BYTES, 4096, 1, 1_700_000_200).unwrap();
    commit(&mut meta);
    for (id, volume, state) in [
        (1, alpha, HandleState::Active),
        (
            2,
            beta,
            HandleState::Broken {
                reason: "host-b opened volume beta exclusive".into(),
                since_unix_secs: 1_700_000_400,
            },
        ),
    ] {
        meta.handles.push(HandleRecord {
            id: HandleId(id),
            volume,
            agent_key: PublicKey([0xa1; 32]),
            agent_name: "host-a".into(),
            agent_instance: Uuid::from_u128(0xa1a1),
            mode: OpenMode::Exclusive,
            opened_at_unix_secs: 1_700_000_300,
            lease_expires_at_unix_ms: 1_700_000_310_000,
            durable_timeout_ms: 30_000,
            state,
        });
    }
    meta.next_ids.handle = HandleId(3);
    commit(&mut meta);
    let s1 = meta.create_snapshot(alpha, "s1", 1_700_000_500).unwrap();
    meta.register_cow(s1, &[0, 5, 17, 63]).unwrap();
    commit(&mut meta);
    meta.register_cow(s1, &[1, 2, 3]).unwrap();
    commit(&mut meta);
    meta.grow_volume(beta, 5 * EXTENT_BYTES).unwrap();
    commit(&mut meta);
    (labels, commits)
}

/// Each device's first `metadata.end` bytes (label + metadata area) after
/// committing every generation of the scenario the way `Pool::commit` does.
fn images() -> (Vec<Vec<u8>>, PoolMetadata) {
    let (labels, commits) = scenario();
    let mut images = Vec::new();
    for label in &labels {
        let area = MetadataArea::from_label(label);
        let mut image = vec![0u8; label.layout.metadata.end as usize];
        image[..4096].copy_from_slice(&label.encode());
        let mut generations = vec![None; area.slot_count as usize];
        for meta in &commits {
            let slot = area.next_slot_to_write(&generations);
            let record = area.encode_slot(POOL, meta.generation, meta).unwrap();
            let at = area.slot_offset(slot) as usize;
            image[at..at + record.len()].copy_from_slice(&record);
            generations[slot as usize] = Some(meta.generation);
        }
        images.push(image);
    }
    (images, commits.last().unwrap().clone())
}

fn fixture_path(i: usize) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/format2/dev{i}.img"))
}

#[test]
fn format2_fixture_is_the_legacy_format() {
    let (images, newest) = images();
    for (i, image) in images.iter().enumerate() {
        if std::env::var_os("SANVOL_WRITE_FIXTURES").is_some() {
            std::fs::write(fixture_path(i), image).unwrap();
        }
        let stored = std::fs::read(fixture_path(i)).unwrap();
        assert!(stored == *image, "fixture dev{i}.img differs from what the legacy encoder writes");
        // The newest generation sits in the last slot: an upgrade must not
        // overwrite it before its own checkpoint is durable.
        let label = DeviceLabel::decode(&stored).unwrap();
        let area = MetadataArea::from_label(&label);
        let last = area.slot_offset(area.slot_count - 1) as usize;
        let (generation, meta) = area.decode_slot(Some(POOL), &stored[last..last + area.slot_bytes as usize]).unwrap();
        assert_eq!(generation, 8);
        assert_eq!(meta, newest);
    }
}
