//! `sanvol device add`: labelling a device for a pool that is running.
//!
//! Why the server labels (not the CLI, as `pool init` does): the server is
//! what writes the pool's devices, it reaches them by the addresses it
//! records, and it alone knows the next device index and the pool's extent
//! size at the moment the label is committed. The label is written before
//! the commit that adds the device: a crash in between leaves a labelled
//! device the metadata does not list, which a later `device add` of the same
//! URI takes again (a label of this pool whose device the pool does not
//! list is not "something on it" to protect).
//!
//! As `pool init`, it refuses a device that carries anything libblkid (or
//! sanvol) recognizes unless `force`.

use std::time::Duration;

use blockio::client::NbdClient;
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use uuid::Uuid;
use volume_format::label::{DeviceLabel, DeviceLayout};
use volume_format::DeviceIndex;

use super::device::{client_options, PoolDevice};
use super::init::metadata_area_bytes;
use super::probe::{describe_contents, PROBE_BYTES};

/// Bound on labelling one device (connect, probe, label, read back).
pub const LABEL_TIMEOUT: Duration = Duration::from_secs(60);

/// What to label.
#[derive(Debug, Clone)]
pub struct LabelRequest {
    pub uri: String,
    pub pool_uuid: Uuid,
    pub device_uuid: Uuid,
    pub index: DeviceIndex,
    pub extent_bytes: u64,
    /// Devices already in the pool: a label naming one is refused.
    pub in_pool: Vec<Uuid>,
    pub force: bool,
}

/// Labels the device (bounded by [`LABEL_TIMEOUT`]) and connects to it as
/// a pool device; the label and the connection on success.
pub async fn label_device(req: &LabelRequest) -> Result<(DeviceLabel, PoolDevice), String> {
    match tokio::time::timeout(LABEL_TIMEOUT, label_unbounded(req)).await {
        Ok(result) => result,
        Err(_) => Err(format!("labelling device {} took longer than {} s", req.uri, LABEL_TIMEOUT.as_secs())),
    }
}

async fn label_unbounded(req: &LabelRequest) -> Result<(DeviceLabel, PoolDevice), String> {
    let uri = &req.uri;
    let nbd_uri: NbdUri = uri.parse().map_err(|e| format!("{uri} is not an NBD URI: {e}"))?;
    let client =
        NbdClient::connect(&nbd_uri, client_options()).await.map_err(|e| format!("cannot connect to {uri}: {e}"))?;
    let result = write_label(req, &client).await;
    client.disconnect().await;
    let label = result?;
    let mut device = PoolDevice::connect(uri.clone(), &nbd_uri).await;
    match (&device.label, &device.error) {
        (Some(l), None) if l.device_uuid == label.device_uuid => {}
        (_, Some(e)) => return Err(format!("device {uri}: the label does not read back: {e}")),
        _ => return Err(format!("device {uri}: the label does not read back as written")),
    }
    device.expected_uuid = Some(label.device_uuid);
    Ok((label, device))
}

async fn write_label(req: &LabelRequest, client: &NbdClient) -> Result<DeviceLabel, String> {
    let uri = &req.uri;
    let io = |what: &'static str| move |e: blockio::IoError| format!("device {uri}: {what} failed: {e}");
    let size = client.size();
    let first = client.read(0, size.min(PROBE_BYTES) as u32).await.map_err(io("reading the first MiB"))?;
    let ours = DeviceLabel::decode(&first).ok().filter(|l| l.pool_uuid == req.pool_uuid);
    match ours {
        Some(l) if req.in_pool.contains(&l.device_uuid) => {
            return Err(format!("device {uri} is already in this pool (device {})", l.device_uuid));
        }
        // A device of this pool the pool does not list (removed, or an add
        // interrupted before its commit): taken again.
        Some(_) => {}
        None => {
            let found = tokio::task::spawn_blocking(move || describe_contents(&first))
                .await
                .map_err(|e| format!("the probe task failed: {e}"))?
                .map_err(|e| format!("device {uri}: probing its contents failed: {e}"))?;
            if let (Some(found), false) = (found, req.force) {
                return Err(format!("device {uri} carries {found} (blkid); use --force to overwrite it"));
            }
        }
    }
    let layout = DeviceLayout::plan(size, req.extent_bytes, metadata_area_bytes(size))
        .map_err(|e| format!("device {uri} ({size} bytes): {e}"))?;
    let label = DeviceLabel {
        pool_uuid: req.pool_uuid,
        device_uuid: req.device_uuid,
        device_index: req.index,
        layout,
        created_at_unix_secs: super::init::now_unix_secs(),
    };
    super::init::write_label(client, &label).await.map_err(|(what, e)| io(what)(e))?;
    Ok(label)
}
