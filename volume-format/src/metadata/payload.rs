//! The payload schema of each metadata format, decoded into today's
//! [`PoolMetadata`].
//!
//! Why a schema per format: bincode is positional, so a payload written
//! before a field existed does not decode as a struct that has it (it ends
//! early), and `#[serde(default)]` does not help. Formats 1, 2 and 3 share
//! one schema ([`PayloadV3`]: everything but the volume scopes of backup keys
//! and the handover ledger); formats 4 to 6 share [`PayloadV6`] (everything
//! but the volume caches); format 7 is [`PayloadV7`] (no write-intent
//! sets), format 8 [`PayloadV8`] (no range locks), format 9 [`PayloadV9`]
//! (no device fencing), format 10 [`PayloadV10`] (no cache mirrors);
//! format 11 is [`PoolMetadata`] itself. Format-2
//! records are also still written (the whole-pool slot commit,
//! [`super::MetadataArea::encode_slot`]), in their own schema.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    ClientRecord, ClientScope, DeviceRecord, HandleRecord, HandoverLedger, NextIds, PoolMetadata, SnapshotRecord,
    VolumeRecord, PAYLOAD_SCHEMA_FORMAT_MIN, PAYLOAD_V10_FORMAT_MIN, PAYLOAD_V6_FORMAT_MIN, PAYLOAD_V7_FORMAT_MIN,
    PAYLOAD_V8_FORMAT_MIN, PAYLOAD_V9_FORMAT_MIN,
};
use crate::codec::{self, CodecError};
use crate::ids::PublicKey;

/// [`PoolMetadata`] as formats 1 to 3 encode it: the same fields, in the
/// same order, without the scopes and the handover ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadV3 {
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub pool_name: String,
    pub generation: u64,
    pub extent_bytes: u64,
    pub created_at_unix_secs: u64,
    pub server_public_key: PublicKey,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub clients: Vec<ClientRecord>,
    pub handles: Vec<HandleRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub next_ids: NextIds,
}

impl From<PayloadV3> for PoolMetadata {
    /// Keeps the payload's `format_version`; no scopes and an empty ledger
    /// (those formats recorded neither).
    fn from(p: PayloadV3) -> PoolMetadata {
        PoolMetadata {
            format_version: p.format_version,
            pool_uuid: p.pool_uuid,
            pool_name: p.pool_name,
            generation: p.generation,
            extent_bytes: p.extent_bytes,
            created_at_unix_secs: p.created_at_unix_secs,
            server_public_key: p.server_public_key,
            devices: p.devices,
            volumes: p.volumes,
            clients: p.clients,
            handles: p.handles,
            snapshots: p.snapshots,
            next_ids: p.next_ids,
            client_scopes: Vec::new(),
            handovers: HandoverLedger::default(),
            volume_caches: Vec::new(),
            intents: Vec::new(),
            range_locks: Vec::new(),
            device_fencing: Vec::new(),
            cache_mirrors: Vec::new(),
        }
    }
}

/// [`PoolMetadata`] as formats 4 to 6 encode it: without the volume caches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadV6 {
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub pool_name: String,
    pub generation: u64,
    pub extent_bytes: u64,
    pub created_at_unix_secs: u64,
    pub server_public_key: PublicKey,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub clients: Vec<ClientRecord>,
    pub handles: Vec<HandleRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub next_ids: NextIds,
    pub client_scopes: Vec<ClientScope>,
    pub handovers: HandoverLedger,
}

impl From<PayloadV6> for PoolMetadata {
    /// Keeps the payload's `format_version`; no volume caches (those
    /// formats recorded none).
    fn from(p: PayloadV6) -> PoolMetadata {
        PoolMetadata {
            format_version: p.format_version,
            pool_uuid: p.pool_uuid,
            pool_name: p.pool_name,
            generation: p.generation,
            extent_bytes: p.extent_bytes,
            created_at_unix_secs: p.created_at_unix_secs,
            server_public_key: p.server_public_key,
            devices: p.devices,
            volumes: p.volumes,
            clients: p.clients,
            handles: p.handles,
            snapshots: p.snapshots,
            next_ids: p.next_ids,
            client_scopes: p.client_scopes,
            handovers: p.handovers,
            volume_caches: Vec::new(),
            intents: Vec::new(),
            range_locks: Vec::new(),
            device_fencing: Vec::new(),
            cache_mirrors: Vec::new(),
        }
    }
}

/// [`PoolMetadata`] as format 7 encodes it: without the write-intent sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadV7 {
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub pool_name: String,
    pub generation: u64,
    pub extent_bytes: u64,
    pub created_at_unix_secs: u64,
    pub server_public_key: PublicKey,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub clients: Vec<ClientRecord>,
    pub handles: Vec<HandleRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub next_ids: NextIds,
    pub client_scopes: Vec<ClientScope>,
    pub handovers: HandoverLedger,
    pub volume_caches: Vec<super::VolumeCache>,
}

impl From<PayloadV7> for PoolMetadata {
    /// Keeps the payload's `format_version`; no write-intent sets (a device
    /// failed then has its legs copied whole when it comes back).
    fn from(p: PayloadV7) -> PoolMetadata {
        PoolMetadata {
            format_version: p.format_version,
            pool_uuid: p.pool_uuid,
            pool_name: p.pool_name,
            generation: p.generation,
            extent_bytes: p.extent_bytes,
            created_at_unix_secs: p.created_at_unix_secs,
            server_public_key: p.server_public_key,
            devices: p.devices,
            volumes: p.volumes,
            clients: p.clients,
            handles: p.handles,
            snapshots: p.snapshots,
            next_ids: p.next_ids,
            client_scopes: p.client_scopes,
            handovers: p.handovers,
            volume_caches: p.volume_caches,
            intents: Vec::new(),
            range_locks: Vec::new(),
            device_fencing: Vec::new(),
            cache_mirrors: Vec::new(),
        }
    }
}

/// [`PoolMetadata`] as format 8 encodes it: without the range locks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadV8 {
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub pool_name: String,
    pub generation: u64,
    pub extent_bytes: u64,
    pub created_at_unix_secs: u64,
    pub server_public_key: PublicKey,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub clients: Vec<ClientRecord>,
    pub handles: Vec<HandleRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub next_ids: NextIds,
    pub client_scopes: Vec<ClientScope>,
    pub handovers: HandoverLedger,
    pub volume_caches: Vec<super::VolumeCache>,
    pub intents: Vec<super::IntentEntry>,
}

impl From<PayloadV8> for PoolMetadata {
    /// Keeps the payload's `format_version`; no range locks (that format
    /// had none).
    fn from(p: PayloadV8) -> PoolMetadata {
        PoolMetadata {
            format_version: p.format_version,
            pool_uuid: p.pool_uuid,
            pool_name: p.pool_name,
            generation: p.generation,
            extent_bytes: p.extent_bytes,
            created_at_unix_secs: p.created_at_unix_secs,
            server_public_key: p.server_public_key,
            devices: p.devices,
            volumes: p.volumes,
            clients: p.clients,
            handles: p.handles,
            snapshots: p.snapshots,
            next_ids: p.next_ids,
            client_scopes: p.client_scopes,
            handovers: p.handovers,
            volume_caches: p.volume_caches,
            intents: p.intents,
            range_locks: Vec::new(),
            device_fencing: Vec::new(),
            cache_mirrors: Vec::new(),
        }
    }
}

/// [`PoolMetadata`] as format 9 encodes it: without the devices' fencing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadV9 {
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub pool_name: String,
    pub generation: u64,
    pub extent_bytes: u64,
    pub created_at_unix_secs: u64,
    pub server_public_key: PublicKey,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub clients: Vec<ClientRecord>,
    pub handles: Vec<HandleRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub next_ids: NextIds,
    pub client_scopes: Vec<ClientScope>,
    pub handovers: HandoverLedger,
    pub volume_caches: Vec<super::VolumeCache>,
    pub intents: Vec<super::IntentEntry>,
    pub range_locks: Vec<super::RangeLockEntry>,
}

impl From<PayloadV9> for PoolMetadata {
    /// Keeps the payload's `format_version`; every device's fencing unknown
    /// (the server learns it from its connections and records it).
    fn from(p: PayloadV9) -> PoolMetadata {
        PoolMetadata {
            format_version: p.format_version,
            pool_uuid: p.pool_uuid,
            pool_name: p.pool_name,
            generation: p.generation,
            extent_bytes: p.extent_bytes,
            created_at_unix_secs: p.created_at_unix_secs,
            server_public_key: p.server_public_key,
            devices: p.devices,
            volumes: p.volumes,
            clients: p.clients,
            handles: p.handles,
            snapshots: p.snapshots,
            next_ids: p.next_ids,
            client_scopes: p.client_scopes,
            handovers: p.handovers,
            volume_caches: p.volume_caches,
            intents: p.intents,
            range_locks: p.range_locks,
            device_fencing: Vec::new(),
            cache_mirrors: Vec::new(),
        }
    }
}

/// [`PoolMetadata`] as format 10 encodes it: without the cache mirrors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadV10 {
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub pool_name: String,
    pub generation: u64,
    pub extent_bytes: u64,
    pub created_at_unix_secs: u64,
    pub server_public_key: PublicKey,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub clients: Vec<ClientRecord>,
    pub handles: Vec<HandleRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub next_ids: NextIds,
    pub client_scopes: Vec<ClientScope>,
    pub handovers: HandoverLedger,
    pub volume_caches: Vec<super::VolumeCache>,
    pub intents: Vec<super::IntentEntry>,
    pub range_locks: Vec<super::RangeLockEntry>,
    pub device_fencing: Vec<super::DeviceFencing>,
}

impl From<PayloadV10> for PoolMetadata {
    /// Keeps the payload's `format_version`; no cache mirror recorded (the
    /// first open of a cached volume replays the server's file, as format
    /// 10 did).
    fn from(p: PayloadV10) -> PoolMetadata {
        PoolMetadata {
            format_version: p.format_version,
            pool_uuid: p.pool_uuid,
            pool_name: p.pool_name,
            generation: p.generation,
            extent_bytes: p.extent_bytes,
            created_at_unix_secs: p.created_at_unix_secs,
            server_public_key: p.server_public_key,
            devices: p.devices,
            volumes: p.volumes,
            clients: p.clients,
            handles: p.handles,
            snapshots: p.snapshots,
            next_ids: p.next_ids,
            client_scopes: p.client_scopes,
            handovers: p.handovers,
            volume_caches: p.volume_caches,
            intents: p.intents,
            range_locks: p.range_locks,
            device_fencing: p.device_fencing,
            cache_mirrors: Vec::new(),
        }
    }
}

/// Decodes the payload of a record of format `format` (whose header said
/// so); `format_version` is left as the payload has it.
pub fn decode(format: u32, bytes: &[u8]) -> Result<PoolMetadata, CodecError> {
    if format >= PAYLOAD_SCHEMA_FORMAT_MIN {
        return codec::decode(bytes);
    }
    if format >= PAYLOAD_V10_FORMAT_MIN {
        return codec::decode::<PayloadV10>(bytes).map(PoolMetadata::from);
    }
    if format >= PAYLOAD_V9_FORMAT_MIN {
        return codec::decode::<PayloadV9>(bytes).map(PoolMetadata::from);
    }
    if format >= PAYLOAD_V8_FORMAT_MIN {
        return codec::decode::<PayloadV8>(bytes).map(PoolMetadata::from);
    }
    if format >= PAYLOAD_V7_FORMAT_MIN {
        return codec::decode::<PayloadV7>(bytes).map(PoolMetadata::from);
    }
    if format >= PAYLOAD_V6_FORMAT_MIN {
        return codec::decode::<PayloadV6>(bytes).map(PoolMetadata::from);
    }
    codec::decode::<PayloadV3>(bytes).map(PoolMetadata::from)
}

/// Encodes `meta` in the format-2 schema with `format_version` set to 2.
/// Refuses what format 2 cannot hold (used handover tokens).
pub fn encode_format2(meta: &PoolMetadata) -> Result<Vec<u8>, String> {
    if !meta.handovers.used.is_empty() {
        return Err("format 2 cannot record used handover tokens; commit with the journal".into());
    }
    if !meta.client_scopes.is_empty() {
        return Err("format 2 cannot record volume scopes of backup keys; commit with the journal".into());
    }
    if !meta.intents.is_empty() {
        return Err("format 2 cannot record write-intent sets; commit with the journal".into());
    }
    if !meta.volume_caches.is_empty() {
        return Err("format 2 cannot record volume caches; commit with the journal".into());
    }
    if !meta.range_locks.is_empty() {
        return Err("format 2 cannot record range locks; commit with the journal".into());
    }
    if !meta.device_fencing.is_empty() {
        return Err("format 2 cannot record whether devices fence; commit with the journal".into());
    }
    if !meta.cache_mirrors.is_empty() {
        return Err("format 2 cannot record cache mirrors; commit with the journal".into());
    }
    let p = PayloadV3 {
        format_version: super::LEGACY_SLOT_FORMAT_VERSION,
        pool_uuid: meta.pool_uuid,
        pool_name: meta.pool_name.clone(),
        generation: meta.generation,
        extent_bytes: meta.extent_bytes,
        created_at_unix_secs: meta.created_at_unix_secs,
        server_public_key: meta.server_public_key,
        devices: meta.devices.clone(),
        volumes: meta.volumes.clone(),
        clients: meta.clients.clone(),
        handles: meta.handles.clone(),
        snapshots: meta.snapshots.clone(),
        next_ids: meta.next_ids,
    };
    codec::encode(&p).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::rich_pool;

    #[test]
    fn an_older_payload_decodes_without_the_ledger_and_today_s_with_it() {
        let mut meta = rich_pool();
        let old = encode_format2(&meta).unwrap();
        let decoded = decode(2, &old).unwrap();
        assert_eq!(decoded.format_version, 2);
        assert_eq!(PoolMetadata { format_version: meta.format_version, ..decoded }, meta);
        assert!(codec::decode::<PoolMetadata>(&old).is_err(), "positional: the old payload ends before the ledger");
        meta.apply(
            &meta
                .plan_handover_tokens(
                    1_000,
                    Some(crate::metadata::UsedToken { nonce: [1; 16], expires_at_unix_ms: 9_000 }),
                )
                .unwrap(),
        )
        .unwrap();
        assert!(encode_format2(&meta).unwrap_err().contains("handover"));
        assert_eq!(decode(crate::metadata::METADATA_FORMAT_VERSION, &codec::encode(&meta).unwrap()).unwrap(), meta);
        assert_eq!(decode(PAYLOAD_SCHEMA_FORMAT_MIN, &codec::encode(&meta).unwrap()).unwrap(), meta);
    }

    #[test]
    fn a_format_6_payload_decodes_without_volume_caches() {
        let meta = rich_pool();
        let v6 = PayloadV6 {
            format_version: 6,
            pool_uuid: meta.pool_uuid,
            pool_name: meta.pool_name.clone(),
            generation: meta.generation,
            extent_bytes: meta.extent_bytes,
            created_at_unix_secs: meta.created_at_unix_secs,
            server_public_key: meta.server_public_key,
            devices: meta.devices.clone(),
            volumes: meta.volumes.clone(),
            clients: meta.clients.clone(),
            handles: meta.handles.clone(),
            snapshots: meta.snapshots.clone(),
            next_ids: meta.next_ids,
            client_scopes: meta.client_scopes.clone(),
            handovers: meta.handovers.clone(),
        };
        let decoded = decode(6, &codec::encode(&v6).unwrap()).unwrap();
        assert_eq!(PoolMetadata { format_version: meta.format_version, ..decoded }, meta);
        let mut cached = meta.clone();
        let volume = cached.volumes[0].id;
        cached.volume_caches.push(super::super::VolumeCache {
            volume,
            size_bytes: 64 << 20,
            mode: super::super::CacheMode::Mirrored,
        });
        let today = codec::encode(&cached).unwrap();
        assert_eq!(decode(crate::metadata::METADATA_FORMAT_VERSION, &today).unwrap(), cached);
        assert!(codec::decode::<PayloadV6>(&today).is_err(), "positional: today's payload has one more field");
    }

    #[test]
    fn a_format_8_payload_decodes_without_range_locks() {
        let meta = rich_pool();
        let v8 = PayloadV8 {
            format_version: 8,
            pool_uuid: meta.pool_uuid,
            pool_name: meta.pool_name.clone(),
            generation: meta.generation,
            extent_bytes: meta.extent_bytes,
            created_at_unix_secs: meta.created_at_unix_secs,
            server_public_key: meta.server_public_key,
            devices: meta.devices.clone(),
            volumes: meta.volumes.clone(),
            clients: meta.clients.clone(),
            handles: meta.handles.clone(),
            snapshots: meta.snapshots.clone(),
            next_ids: meta.next_ids,
            client_scopes: meta.client_scopes.clone(),
            handovers: meta.handovers.clone(),
            volume_caches: meta.volume_caches.clone(),
            intents: meta.intents.clone(),
        };
        let decoded = decode(8, &codec::encode(&v8).unwrap()).unwrap();
        assert_eq!(decoded.format_version, 8);
        assert_eq!(PoolMetadata { format_version: meta.format_version, ..decoded }, meta);
        let mut locked = meta.clone();
        locked.range_locks.push(super::super::RangeLockEntry {
            handle: crate::ids::HandleId(1),
            ranges: vec![crate::locks::LockRange { start: 0, len_bytes: 4096 }],
        });
        let today = codec::encode(&locked).unwrap();
        assert_eq!(decode(crate::metadata::METADATA_FORMAT_VERSION, &today).unwrap(), locked);
        assert!(codec::decode::<PayloadV8>(&today).is_err(), "positional: today's payload has one more field");
    }

    #[test]
    fn a_format_9_payload_decodes_with_every_device_s_fencing_unknown() {
        let meta = rich_pool();
        let v9 = PayloadV9 {
            format_version: 9,
            pool_uuid: meta.pool_uuid,
            pool_name: meta.pool_name.clone(),
            generation: meta.generation,
            extent_bytes: meta.extent_bytes,
            created_at_unix_secs: meta.created_at_unix_secs,
            server_public_key: meta.server_public_key,
            devices: meta.devices.clone(),
            volumes: meta.volumes.clone(),
            clients: meta.clients.clone(),
            handles: meta.handles.clone(),
            snapshots: meta.snapshots.clone(),
            next_ids: meta.next_ids,
            client_scopes: meta.client_scopes.clone(),
            handovers: meta.handovers.clone(),
            volume_caches: meta.volume_caches.clone(),
            intents: meta.intents.clone(),
            range_locks: meta.range_locks.clone(),
        };
        let decoded = decode(9, &codec::encode(&v9).unwrap()).unwrap();
        assert_eq!(decoded.format_version, 9);
        assert!(decoded.device_fencing.is_empty());
        assert_eq!(decoded.device_fenced(meta.devices[0].index), None, "unknown");
        assert_eq!(PoolMetadata { format_version: meta.format_version, ..decoded }, meta);
        let mut recorded = meta.clone();
        let device = recorded.devices[0].index;
        recorded.apply(&crate::metadata::MetaChange::DeviceFencing { device, fenced: true }).unwrap();
        assert_eq!(recorded.device_fenced(device), Some(true));
        let today = codec::encode(&recorded).unwrap();
        assert_eq!(decode(crate::metadata::METADATA_FORMAT_VERSION, &today).unwrap(), recorded);
        assert!(codec::decode::<PayloadV9>(&today).is_err(), "positional: today's payload has one more field");
        assert!(encode_format2(&recorded).unwrap_err().contains("fence"));
    }

    #[test]
    fn a_format_10_payload_decodes_without_cache_mirrors() {
        let meta = rich_pool();
        let v10 = PayloadV10 {
            format_version: 10,
            pool_uuid: meta.pool_uuid,
            pool_name: meta.pool_name.clone(),
            generation: meta.generation,
            extent_bytes: meta.extent_bytes,
            created_at_unix_secs: meta.created_at_unix_secs,
            server_public_key: meta.server_public_key,
            devices: meta.devices.clone(),
            volumes: meta.volumes.clone(),
            clients: meta.clients.clone(),
            handles: meta.handles.clone(),
            snapshots: meta.snapshots.clone(),
            next_ids: meta.next_ids,
            client_scopes: meta.client_scopes.clone(),
            handovers: meta.handovers.clone(),
            volume_caches: meta.volume_caches.clone(),
            intents: meta.intents.clone(),
            range_locks: meta.range_locks.clone(),
            device_fencing: meta.device_fencing.clone(),
        };
        let decoded = decode(10, &codec::encode(&v10).unwrap()).unwrap();
        assert_eq!(decoded.format_version, 10);
        assert!(decoded.cache_mirrors.is_empty());
        assert_eq!(PoolMetadata { format_version: meta.format_version, ..decoded }, meta);
        let mut recorded = meta.clone();
        let volume = recorded.volumes[0].id;
        let mirror = super::super::CacheMirrorRecord { volume, generation: 1, server: "mds-a".into(), pending: true };
        recorded.apply(&crate::metadata::MetaChange::CacheMirror(mirror.clone())).unwrap();
        assert_eq!(recorded.cache_mirror(volume), Some(&mirror));
        let today = codec::encode(&recorded).unwrap();
        assert_eq!(decode(crate::metadata::METADATA_FORMAT_VERSION, &today).unwrap(), recorded);
        assert!(codec::decode::<PayloadV10>(&today).is_err(), "positional: today's payload has one more field");
        assert!(encode_format2(&recorded).unwrap_err().contains("cache mirrors"));
    }
}
