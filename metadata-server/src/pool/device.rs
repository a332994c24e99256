//! One pool device as the server sees it: an NBD connection, its label, and
//! the generations in its metadata slots.

use std::time::Duration;

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use tracing::{info, warn};
use uuid::Uuid;
use volume_format::label::{DeviceLabel, LABEL_BYTES};
use volume_format::metadata::{MetadataArea, PoolMetadata, SlotError, SLOT_HEADER_BYTES};

use super::PoolError;

/// Time to connect and finish the NBD handshake with a device.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A device request that takes longer than this fails (and so does a commit
/// waiting on it), rather than hanging the server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest single read or write the pool code issues.
pub(super) const IO_BYTES_MAX: u64 = 4 << 20;

pub struct PoolDevice {
    /// The URI as given (config or metadata), for messages.
    pub uri: String,
    nbd_uri: Option<NbdUri>,
    pub client: Option<NbdClient>,
    /// The label read at connect time.
    pub label: Option<DeviceLabel>,
    /// The device UUID this entry stands for (from its label, or from the
    /// metadata when it could not be reached).
    pub expected_uuid: Option<Uuid>,
    /// Why the device is not usable right now, if it is not.
    pub error: Option<String>,
    /// Valid generation of each metadata slot as last read or written.
    pub generations: Vec<Option<u64>>,
}

pub fn client_options() -> ClientOptions {
    crate::targets::with_server_credential(ClientOptions {
        connect_timeout: CONNECT_TIMEOUT,
        request_timeout: Some(REQUEST_TIMEOUT),
        ..Default::default()
    })
}

impl PoolDevice {
    pub fn unreachable(uri: String, error: String) -> PoolDevice {
        PoolDevice {
            uri,
            nbd_uri: None,
            client: None,
            label: None,
            expected_uuid: None,
            error: Some(error),
            generations: Vec::new(),
        }
    }

    /// Whether the device fences, as its export description on this
    /// connection says (`None` without a connection).
    pub fn fences(&self) -> Option<bool> {
        let client = self.client.as_ref()?;
        Some(client.info().description.as_deref().is_some_and(volume_format::capability::announces_fencing))
    }

    /// Connects and reads the label. Never fails: an unusable device is
    /// returned with `error` set, so the caller can report every device.
    pub async fn connect(uri: String, nbd_uri: &NbdUri) -> PoolDevice {
        let mut d = PoolDevice::unreachable(uri, String::new());
        d.nbd_uri = Some(nbd_uri.clone());
        d.error = None;
        if let Err(e) = d.reconnect().await {
            d.error = Some(e.to_string());
        }
        d
    }

    pub(super) async fn reconnect(&mut self) -> Result<(), PoolError> {
        let Some(nbd_uri) = &self.nbd_uri else {
            return Err(PoolError::Connect { uri: self.uri.clone(), reason: "no usable URI".into() });
        };
        if let Some(old) = self.client.take() {
            old.disconnect().await;
        }
        let client = NbdClient::connect(nbd_uri, client_options())
            .await
            .map_err(|e| PoolError::Connect { uri: self.uri.clone(), reason: e.to_string() })?;
        let block = read_at(&client, &self.uri, 0, LABEL_BYTES as u64, "reading the label").await?;
        let label = DeviceLabel::decode(&block).map_err(|source| PoolError::Label { uri: self.uri.clone(), source })?;
        if label.layout.device_bytes > client.size() {
            return Err(PoolError::Invalid(format!(
                "device {}: its label says {} bytes but the export has {}; it was shrunk, or it is the wrong export",
                self.uri,
                label.layout.device_bytes,
                client.size()
            )));
        }
        if let Some(expected) = self.expected_uuid {
            if expected != label.device_uuid {
                return Err(PoolError::Invalid(format!(
                    "device {}: found device {} where {expected} was",
                    self.uri, label.device_uuid
                )));
            }
        }
        self.label = Some(label);
        self.client = Some(client);
        self.error = None;
        Ok(())
    }

    fn area(&self) -> Option<MetadataArea> {
        self.label.as_ref().map(MetadataArea::from_label)
    }

    /// Reads and decodes every metadata slot, remembering each valid
    /// generation. Read failures are reported as unusable slots.
    pub async fn read_slots(&mut self, pool: Uuid) -> Vec<Result<(u64, PoolMetadata), SlotError>> {
        let (Some(area), Some(client)) = (self.area(), self.client.clone()) else { return Vec::new() };
        let mut out = Vec::new();
        for i in 0..area.slot_count {
            out.push(read_slot(&client, &self.uri, &area, i, pool).await);
        }
        self.generations = out.iter().map(|r| r.as_ref().ok().map(|(g, _)| *g)).collect();
        out
    }

    /// Writes `meta` (already carrying `generation`) into this device's next
    /// slot, flushes, and reads it back. Retries once over a new connection
    /// if the first attempt fails (the device server may have restarted).
    pub async fn write_generation(
        &mut self,
        pool: Uuid,
        generation: u64,
        meta: &PoolMetadata,
    ) -> Result<(), PoolError> {
        match self.try_write_generation(pool, generation, meta).await {
            Ok(()) => Ok(()),
            Err(first) => {
                warn!(device = %self.uri, "metadata write failed ({first}); reconnecting and retrying once");
                if let Err(e) = self.reconnect().await {
                    self.error = Some(e.to_string());
                    return Err(first);
                }
                info!(device = %self.uri, "reconnected");
                self.try_write_generation(pool, generation, meta).await.inspect_err(|e| {
                    self.error = Some(e.to_string());
                })
            }
        }
    }

    async fn try_write_generation(
        &mut self,
        pool: Uuid,
        generation: u64,
        meta: &PoolMetadata,
    ) -> Result<(), PoolError> {
        let (Some(area), Some(client)) = (self.area(), self.client.clone()) else {
            return Err(PoolError::Connect {
                uri: self.uri.clone(),
                reason: self.error.clone().unwrap_or_else(|| "not connected".into()),
            });
        };
        let record = area.encode_slot(pool, generation, meta)?;
        if self.generations.len() != area.slot_count as usize {
            self.generations = vec![None; area.slot_count as usize];
        }
        let slot = area.next_slot_to_write(&self.generations);
        // Until the write is known good the slot holds nothing we trust.
        self.generations[slot as usize] = None;
        let offset = area.slot_offset(slot);
        let record = Bytes::from(record);
        let mut done = 0u64;
        while done < record.len() as u64 {
            let n = (record.len() as u64 - done).min(IO_BYTES_MAX);
            let chunk = record.slice(done as usize..(done + n) as usize);
            client.write(offset + done, chunk, false).await.map_err(|e| PoolError::Io {
                uri: self.uri.clone(),
                what: format!("writing metadata slot {slot}"),
                reason: e.to_string(),
            })?;
            done += n;
        }
        client.flush().await.map_err(|e| PoolError::Io {
            uri: self.uri.clone(),
            what: "flushing the metadata".into(),
            reason: e.to_string(),
        })?;
        // Check it after writing: a device that silently drops writes must
        // fail the commit, not be discovered at the next restart.
        let back = read_slot(&client, &self.uri, &area, slot, pool).await;
        match back {
            Ok((g, _)) if g == generation => {
                self.generations[slot as usize] = Some(generation);
                Ok(())
            }
            Ok((g, _)) => Err(PoolError::Commit(format!(
                "device {}: slot {slot} reads back generation {g}, not {generation}",
                self.uri
            ))),
            Err(e) => Err(PoolError::Commit(format!("device {}: slot {slot} does not read back: {e}", self.uri))),
        }
    }
}

pub(super) async fn read_at(
    client: &NbdClient,
    uri: &str,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, PoolError> {
    let mut out = Vec::with_capacity(len as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(IO_BYTES_MAX);
        let bytes = client.read(offset + done, n as u32).await.map_err(|e| PoolError::Io {
            uri: uri.to_string(),
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        out.extend_from_slice(&bytes);
        done += n;
    }
    Ok(out)
}

async fn read_slot(
    client: &NbdClient,
    uri: &str,
    area: &MetadataArea,
    i: u32,
    pool: Uuid,
) -> Result<(u64, PoolMetadata), SlotError> {
    let offset = area.slot_offset(i);
    let io_err = |e: PoolError| SlotError::Inconsistent(e.to_string());
    let header = read_at(client, uri, offset, SLOT_HEADER_BYTES as u64, "reading a metadata slot header")
        .await
        .map_err(io_err)?;
    let record_bytes = area.record_bytes(&header)?;
    let bytes = read_at(client, uri, offset, record_bytes, "reading a metadata slot").await.map_err(io_err)?;
    area.decode_slot(Some(pool), &bytes)
}
