//! Chunk I/O the server does itself for snapshots: reading a volume's live
//! chunk, reading and writing a snapshot's COW area. Used by the owner task
//! (copying pre-images for shared-write holders, merging pre-images when a
//! snapshot is deleted) and by the backup pseudo-device.
//!
//! Chunks never cross an extent: the chunk size divides the extent size and
//! chunks are aligned, so every chunk access is one device request per leg.

use std::collections::HashMap;
use std::sync::Arc;

use blockio::client::NbdClient;
use blockio::uri::NbdUri;
use blockio::{BlockDevice, IoError};
use bytes::Bytes;
use volume_format::metadata::{PhysicalExtent, PoolMetadata};
use volume_format::{DeviceIndex, SnapshotId, VolumeId};

use super::data_channel::CHANNEL_DEVICE_CONNECT_TIMEOUT;
use crate::pool::device::client_options;

/// NBD clients by device, connected on first use (or handed in).
#[derive(Default, Clone)]
pub struct DeviceClients {
    clients: Arc<tokio::sync::Mutex<HashMap<DeviceIndex, NbdClient>>>,
}

impl DeviceClients {
    /// Clients the caller already has (the pool's own connections).
    pub fn with(clients: impl IntoIterator<Item = (DeviceIndex, NbdClient)>) -> DeviceClients {
        DeviceClients { clients: Arc::new(tokio::sync::Mutex::new(clients.into_iter().collect())) }
    }

    async fn get(&self, meta: &PoolMetadata, index: DeviceIndex) -> Result<NbdClient, IoError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&index) {
            return Ok(c.clone());
        }
        let device =
            meta.device(index).ok_or_else(|| IoError::io(format!("device {index} is not in the pool metadata")))?;
        let uri = device.uri.parse::<NbdUri>().map_err(|e| IoError::io(format!("device {index}: {e}")))?;
        let opts =
            blockio::client::ClientOptions { connect_timeout: CHANNEL_DEVICE_CONNECT_TIMEOUT, ..client_options() };
        let client = NbdClient::connect(&uri, opts)
            .await
            .map_err(|e| IoError::io(format!("connecting to device {index} ({}): {e}", device.uri)))?;
        clients.insert(index, client.clone());
        Ok(client)
    }

    /// Forgets a client that failed, so the next use reconnects.
    async fn forget(&self, index: DeviceIndex) {
        if let Some(c) = self.clients.lock().await.remove(&index) {
            c.disconnect().await;
        }
    }

    pub async fn disconnect_all(&self) {
        let clients: Vec<NbdClient> = self.clients.lock().await.drain().map(|(_, c)| c).collect();
        for c in clients {
            c.disconnect().await;
        }
    }

    /// Reads `len` bytes at `offset` within extent `legs`, trying each leg on
    /// an online device in turn.
    async fn read_legs(
        &self,
        meta: &PoolMetadata,
        legs: &[PhysicalExtent],
        offset: u64,
        len: u32,
        what: &str,
    ) -> Result<Bytes, IoError> {
        let mut errors = Vec::new();
        for leg in legs {
            if !meta.device(leg.device).is_some_and(|d| d.state.is_online()) {
                continue;
            }
            let result = match self.get(meta, leg.device).await {
                Ok(c) => c.read(leg.offset + offset, len).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(data) if data.len() == len as usize => return Ok(data),
                Ok(data) => errors.push(format!("device {}: short read of {} bytes", leg.device, data.len())),
                Err(e) => {
                    self.forget(leg.device).await;
                    errors.push(format!("device {}: {e}", leg.device));
                }
            }
        }
        if errors.is_empty() {
            errors.push("no leg is on an online device".to_string());
        }
        Err(IoError::io(format!("{what}: {}", errors.join("; "))))
    }

    /// Reads `len` bytes at volume offset `offset` (within one extent).
    pub async fn read_live(
        &self,
        meta: &PoolMetadata,
        volume: VolumeId,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, IoError> {
        let v = meta.volume(volume).ok_or_else(|| IoError::io(format!("volume {volume} no longer exists")))?;
        let extent = v
            .extents
            .get((offset / meta.extent_bytes) as usize)
            .ok_or_else(|| IoError::io(format!("offset {offset} is beyond volume {}", v.name)))?;
        let what = format!("reading volume {} at {offset}", v.name);
        self.read_legs(meta, &extent.legs, offset % meta.extent_bytes, len, &what).await
    }

    /// `base:allocation` of `len` bytes at volume offset `offset` (within one
    /// extent), from the first online leg that answers.
    pub async fn live_allocation(
        &self,
        meta: &PoolMetadata,
        volume: VolumeId,
        offset: u64,
        len: u32,
    ) -> Result<Vec<blockio::StatusExtent>, IoError> {
        let v = meta.volume(volume).ok_or_else(|| IoError::io(format!("volume {volume} no longer exists")))?;
        let extent = v
            .extents
            .get((offset / meta.extent_bytes) as usize)
            .ok_or_else(|| IoError::io(format!("offset {offset} is beyond volume {}", v.name)))?;
        let mut last = IoError::io("no leg is on an online device");
        for leg in &extent.legs {
            if !meta.device(leg.device).is_some_and(|d| d.state.is_online()) {
                continue;
            }
            let client = match self.get(meta, leg.device).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let at = leg.offset + offset % meta.extent_bytes;
            match client.block_status(&blockio::MetaContext::BaseAllocation, at, len).await {
                Ok(status) => return Ok(status),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Reads `len` bytes at `within` of chunk `chunk` of snapshot `id`'s COW area.
    pub async fn read_cow(
        &self,
        meta: &PoolMetadata,
        id: SnapshotId,
        chunk: u64,
        within: u64,
        len: u32,
    ) -> Result<Bytes, IoError> {
        let s = meta.snapshot(id).ok_or_else(|| IoError::io(format!("snapshot {id} no longer exists")))?;
        let (extent, offset) = s
            .cow_location(chunk, meta.extent_bytes)
            .ok_or_else(|| IoError::io(format!("chunk {chunk} is beyond snapshot {}", s.name)))?;
        let what = format!("reading the copy-on-write area of snapshot {} (chunk {chunk})", s.name);
        self.read_legs(meta, &extent.legs, offset + within, len, &what).await
    }

    /// Writes a whole chunk into snapshot `id`'s COW area, on every online
    /// leg, with FUA (a registration follows; the pre-image must be stable).
    pub async fn write_cow(&self, meta: &PoolMetadata, id: SnapshotId, chunk: u64, data: Bytes) -> Result<(), IoError> {
        let s = meta.snapshot(id).ok_or_else(|| IoError::io(format!("snapshot {id} no longer exists")))?;
        let (extent, offset) = s
            .cow_location(chunk, meta.extent_bytes)
            .ok_or_else(|| IoError::io(format!("chunk {chunk} is beyond snapshot {}", s.name)))?;
        let mut written = 0;
        for leg in &extent.legs {
            if !meta.device(leg.device).is_some_and(|d| d.state.is_online()) {
                continue;
            }
            let client = self.get(meta, leg.device).await?;
            client.write(leg.offset + offset, data.clone(), true).await.map_err(|e| {
                IoError::new(
                    e.kind,
                    format!("writing chunk {chunk} to snapshot {}'s area on device {}: {e}", s.name, leg.device),
                )
            })?;
            written += 1;
        }
        if written == 0 {
            return Err(IoError::io(format!("snapshot {}: no leg of chunk {chunk}'s area is online", s.name)));
        }
        Ok(())
    }
}
