//! `sanvol pool init`: label blank devices and write the first metadata.
//!
//! Why it refuses so readily: labelling a device destroys whatever was on
//! it. Every device is probed before anything is written to any of them, so
//! a refusal leaves all of them untouched.

use std::time::{SystemTime, UNIX_EPOCH};

use blockio::client::NbdClient;
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use tracing::warn;
use uuid::Uuid;
use volume_format::label::{DeviceLabel, DeviceLayout, BLOCK_BYTES, METADATA_AREA_BYTES_DEFAULT};
use volume_format::metadata::{ClientRecord, ClientRole, MetadataArea, PoolMetadata};
use volume_format::{DeviceIndex, PublicKey};

use super::device::{client_options, PoolDevice};
use super::probe::{describe_contents, PROBE_BYTES};
use super::{Pool, PoolError, METADATA_COPIES_MAX};

/// Smallest metadata area planned on a small device (4 slots of 256 KiB).
const METADATA_AREA_BYTES_MIN: u64 = 1 << 20;

pub struct InitOptions {
    pub devices: Vec<NbdUri>,
    pub name: String,
    pub extent_bytes: u64,
    pub server_key: PublicKey,
    pub admin_key: PublicKey,
    pub admin_name: String,
    /// Overwrite devices that carry something.
    pub force: bool,
}

/// What `init` did, for the CLI to print.
#[derive(Debug)]
pub struct InitReport {
    pub metadata: PoolMetadata,
    /// Per overwritten device: what was on it (only with `force`).
    pub overwritten: Vec<(String, String)>,
    /// Per device (in metadata order): whether it fences, as its export
    /// description said when it was labelled. The first commit of `init`
    /// is a format-2 record, which cannot hold it: the server records it
    /// (format 10) at its first commit, from its own connections.
    pub fencing: Vec<Option<bool>>,
}

/// Metadata area for a device: 1/16 of it, between 1 MiB and the default
/// 32 MiB, so test-sized devices stay mostly data.
pub fn metadata_area_bytes(device_bytes: u64) -> u64 {
    (device_bytes / 16).clamp(METADATA_AREA_BYTES_MIN, METADATA_AREA_BYTES_DEFAULT)
}

/// Writes `label` to a device: clears the metadata slot headers of its
/// area first (a previous pool's, or this pool's from before a removal, so
/// no reader ever has to reason about them), then the label, then a flush.
/// An error names the step that failed.
pub(super) async fn write_label(
    client: &NbdClient,
    label: &DeviceLabel,
) -> Result<(), (&'static str, blockio::IoError)> {
    let area = MetadataArea::from_label(label);
    for i in 0..area.slot_count {
        let zero = Bytes::from(vec![0u8; BLOCK_BYTES as usize]);
        client.write(area.slot_offset(i), zero, false).await.map_err(|e| ("clearing metadata slots", e))?;
    }
    client.write(0, Bytes::copy_from_slice(&label.encode()), false).await.map_err(|e| ("writing the label", e))?;
    client.flush().await.map_err(|e| ("flushing the label", e))
}

pub(super) fn now_unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub async fn init(opts: InitOptions) -> Result<InitReport, PoolError> {
    if opts.devices.is_empty() {
        return Err(PoolError::Invalid("give at least one --device".into()));
    }
    let uris: Vec<String> = opts.devices.iter().map(|u| u.to_string()).collect();
    for (i, u) in uris.iter().enumerate() {
        if uris[..i].contains(u) {
            return Err(PoolError::Invalid(format!("device {u} is given twice")));
        }
    }
    // Probe everything before writing anything.
    let mut clients = Vec::new();
    let mut overwritten = Vec::new();
    for (uri, nbd_uri) in uris.iter().zip(&opts.devices) {
        let client = NbdClient::connect(nbd_uri, client_options())
            .await
            .map_err(|e| PoolError::Connect { uri: uri.clone(), reason: e.to_string() })?;
        let probe_bytes = client.size().min(PROBE_BYTES);
        let first = client.read(0, probe_bytes as u32).await.map_err(|e| PoolError::Io {
            uri: uri.clone(),
            what: "reading the first MiB to probe it".into(),
            reason: e.to_string(),
        })?;
        let found = tokio::task::spawn_blocking(move || describe_contents(&first))
            .await
            .map_err(|e| PoolError::Invalid(format!("probe task failed: {e}")))?
            .map_err(|e| PoolError::Invalid(format!("device {uri}: probing its contents failed: {e}")))?;
        if let Some(found) = found {
            if !opts.force {
                return Err(PoolError::InUse { uri: uri.clone(), found });
            }
            warn!(device = %uri, "overwriting {found} (--force)");
            overwritten.push((uri.clone(), found));
        }
        clients.push(client);
    }

    let now = now_unix_secs();
    let pool_uuid = Uuid::new_v4();
    let mut meta = PoolMetadata::new(pool_uuid, opts.name.clone(), opts.extent_bytes, opts.server_key, now);
    meta.check().map_err(PoolError::Invalid)?;
    let mut labels = Vec::new();
    for (uri, client) in uris.iter().zip(&clients) {
        let size = client.size();
        let layout = DeviceLayout::plan(size, opts.extent_bytes, metadata_area_bytes(size))
            .map_err(|e| PoolError::Invalid(format!("device {uri}: {e}")))?;
        let device_uuid = Uuid::new_v4();
        let index: DeviceIndex = meta
            .add_device(device_uuid, uri.clone(), &layout)
            .map_err(|e| PoolError::Invalid(format!("device {uri}: {e}")))?;
        if labels.len() < METADATA_COPIES_MAX {
            meta.devices.last_mut().expect("just added").holds_metadata = true;
        }
        labels.push(DeviceLabel { pool_uuid, device_uuid, device_index: index, layout, created_at_unix_secs: now });
    }
    meta.clients.push(ClientRecord {
        public_key: opts.admin_key,
        name: opts.admin_name.clone(),
        role: ClientRole::Admin,
    });

    let mut devices = Vec::new();
    let mut fencing = Vec::new();
    for ((uri, client), label) in uris.iter().zip(clients).zip(labels) {
        let io = |what: &str| {
            let uri = uri.clone();
            let what = what.to_string();
            move |e: blockio::IoError| PoolError::Io { uri, what, reason: e.to_string() }
        };
        write_label(&client, &label).await.map_err(|(what, e)| io(what)(e))?;
        let nbd_uri: NbdUri = uri.parse().map_err(|e| PoolError::Invalid(format!("{e}")))?;
        client.disconnect().await;
        let d = PoolDevice::connect(uri.clone(), &nbd_uri).await;
        if let Some(e) = d.error {
            return Err(PoolError::Invalid(format!("device {uri}: label does not read back: {e}")));
        }
        let mut d = d;
        fencing.push(d.fences());
        d.expected_uuid = Some(label.device_uuid);
        devices.push(d);
    }
    let mut pool = Pool { pool_uuid, devices, generation_attempted: 0, journal: None };
    let metadata = pool.commit(None, meta).await?;
    for d in &pool.devices {
        if let Some(c) = &d.client {
            c.disconnect().await;
        }
    }
    Ok(InitReport { metadata, overwritten, fencing })
}
