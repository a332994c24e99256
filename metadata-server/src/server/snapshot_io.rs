//! Chunk I/O the server does itself for snapshots: reading a volume's live
//! chunk, reading and writing a snapshot's COW area. Used by the owner task
//! (copying pre-images for shared-write holders, merging pre-images when a
//! snapshot is deleted) and by the backup pseudo-device.
//!
//! Chunks never cross an extent: the chunk size divides the extent size and
//! chunks are aligned, so every chunk access is one device request per leg.
//! Where a chunk lives and which legs serve it is
//! [`volume_format::mapping`]'s answer, the same the agents use.

use std::collections::HashMap;
use std::sync::Arc;

use blockio::client::NbdClient;
use blockio::uri::NbdUri;
use blockio::{BlockDevice, IoError, Payload};
use bytes::Bytes;
use volume_format::mapping::{Legs, MapError, Segment};
use volume_format::metadata::{ChunkSource, PoolMetadata};
use volume_format::{DeviceIndex, SnapshotId, VolumeId};

use super::data_channel::CHANNEL_DEVICE_CONNECT_TIMEOUT;
use crate::pool::device::client_options;

/// NBD clients by device, connected on first use (or handed in).
#[derive(Default, Clone)]
pub struct DeviceClients {
    clients: Arc<tokio::sync::Mutex<HashMap<DeviceIndex, NbdClient>>>,
    /// The owner's lease guard: data writes stop once the server may no
    /// longer commit (see [`DeviceClients::may_write`]).
    guard: Option<Arc<super::lease_task::LeaseGuard>>,
}

impl DeviceClients {
    /// Clients the caller already has (the pool's own connections).
    pub fn with(clients: impl IntoIterator<Item = (DeviceIndex, NbdClient)>) -> DeviceClients {
        DeviceClients { clients: Arc::new(tokio::sync::Mutex::new(clients.into_iter().collect())), guard: None }
    }

    /// Writes through these clients only while `guard` says this server
    /// holds the pool lease.
    pub fn guarded(mut self, guard: Arc<super::lease_task::LeaseGuard>) -> DeviceClients {
        self.guard = Some(guard);
        self
    }

    /// Refuses a data write once this server may no longer commit (it lost
    /// the pool lease, or handed it on): the active server may have handed
    /// out the space since — zeros or a copy landing there now would
    /// overwrite another volume's data. Checked before every data write, as
    /// the device task checks before every metadata write.
    pub fn may_write(&self) -> Result<(), IoError> {
        match &self.guard {
            Some(g) if !g.may_commit() => {
                Err(IoError::io("this metadata server does not hold the pool lease now; no more data was written"))
            }
            _ => Ok(()),
        }
    }

    async fn get(&self, meta: &PoolMetadata, index: DeviceIndex) -> Result<NbdClient, IoError> {
        let device =
            meta.device(index).ok_or_else(|| IoError::io(format!("device {index} is not in the pool metadata")))?;
        self.get_by_uri(index, &device.uri).await
    }

    /// The client of device `index`, connected to `uri` if there is none.
    pub async fn get_by_uri(&self, index: DeviceIndex, device_uri: &str) -> Result<NbdClient, IoError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&index) {
            return Ok(c.clone());
        }
        let uri = device_uri.parse::<NbdUri>().map_err(|e| IoError::io(format!("device {index}: {e}")))?;
        let opts =
            blockio::client::ClientOptions { connect_timeout: CHANNEL_DEVICE_CONNECT_TIMEOUT, ..client_options() };
        let client = NbdClient::connect(&uri, opts)
            .await
            .map_err(|e| IoError::io(format!("connecting to device {index} ({device_uri}): {e}")))?;
        clients.insert(index, client.clone());
        Ok(client)
    }

    /// Forgets a client that failed, so the next use reconnects.
    pub async fn forget(&self, index: DeviceIndex) {
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

    /// Reads `segment` from its legs that serve reads, in order, trying
    /// the next on failure.
    async fn read_segment(
        &self,
        meta: &PoolMetadata,
        segment: Result<Segment<'_>, MapError>,
    ) -> Result<Bytes, IoError> {
        match self.read_segment_as(meta, segment, false).await? {
            Payload::Bytes(data) => Ok(data),
            Payload::Pipe(_) => Err(IoError::io("internal: a read asked for in memory came back in pipes")),
        }
    }

    /// Reads one segment from the first leg that answers; `passed_on`: the
    /// caller only sends the bytes on, so they may come in pipes
    /// ([`BlockDevice::read_payload`]).
    pub async fn read_segment_as(
        &self,
        meta: &PoolMetadata,
        segment: Result<Segment<'_>, MapError>,
        passed_on: bool,
    ) -> Result<Payload, IoError> {
        let segment = segment.map_err(|e| IoError::io(format!("reading for a snapshot: {e}")))?;
        let what = format!("reading {} at offset {}", segment.area(), segment.logical_offset);
        let legs = segment.read_legs(0).map_err(|e| IoError::io(format!("{what}: {e}")))?;
        let len = segment.len_bytes as u32;
        let mut errors = Vec::new();
        for leg in legs {
            let result = match self.get(meta, leg.device).await {
                Ok(c) if passed_on => c.read_payload(leg.device_offset, len).await,
                Ok(c) => c.read(leg.device_offset, len).await.map(Payload::Bytes),
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
        self.read_source(meta, volume, ChunkSource::Live, offset, len).await
    }

    /// Reads `len` bytes at volume offset `offset` (within one extent) of a
    /// snapshot of `volume` from where `source` says its chunks are.
    pub async fn read_source(
        &self,
        meta: &PoolMetadata,
        volume: VolumeId,
        source: ChunkSource,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, IoError> {
        self.read_segment(meta, meta.source_segment(volume, source, offset, len.into())).await
    }

    /// `base:allocation` of `len` bytes at volume offset `offset` (within one
    /// extent), from the first leg that serves reads and answers.
    pub async fn live_allocation(
        &self,
        meta: &PoolMetadata,
        volume: VolumeId,
        offset: u64,
        len: u32,
    ) -> Result<Vec<blockio::StatusExtent>, IoError> {
        let map = meta.volume_map(volume).map_err(|e| IoError::io(e.to_string()))?;
        let legs = map.live.segment(offset, len.into()).and_then(|s| s.read_legs(0));
        let mut last = IoError::io("no leg answered");
        for leg in legs.map_err(|e| IoError::io(e.to_string()))? {
            let client = match self.get(meta, leg.device).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match client.block_status(&blockio::MetaContext::BaseAllocation, leg.device_offset, len).await {
                Ok(status) => return Ok(status),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Reads `len` bytes from `within` of chunk `chunk` on of snapshot
    /// `id`'s COW area (within one extent).
    pub async fn read_cow(
        &self,
        meta: &PoolMetadata,
        id: SnapshotId,
        chunk: u64,
        within: u64,
        len: u32,
    ) -> Result<Bytes, IoError> {
        self.read_segment(meta, meta.cow_area(id).and_then(|area| area.chunk(chunk, within, len.into()))).await
    }

    /// Writes a whole chunk into snapshot `id`'s COW area, on every leg that
    /// takes writes, with FUA (a registration follows; the pre-image must be
    /// stable).
    pub async fn write_cow(&self, meta: &PoolMetadata, id: SnapshotId, chunk: u64, data: Bytes) -> Result<(), IoError> {
        let area = meta.cow_area(id).map_err(|e| IoError::io(e.to_string()))?;
        let legs = area.chunk(chunk, 0, data.len() as u64).and_then(|s| s.write_legs());
        let legs = legs.map_err(|e| IoError::io(format!("writing chunk {chunk} to snapshot {}: {e}", area.name)))?;
        self.write_legs(meta, legs, &data, |device, e| {
            format!("writing chunk {chunk} to snapshot {}'s area on device {device}: {e}", area.name)
        })
        .await
    }

    /// Writes `data` with FUA on every leg of `legs` at once — a mirrored
    /// extent's legs are on different devices, so the write takes one
    /// device's time, not the sum — and returns once all have it, or with
    /// the first failure (`what` describes it; the failed device's client
    /// is dropped so the next use reconnects).
    async fn write_legs(
        &self,
        meta: &PoolMetadata,
        legs: Legs,
        data: &Bytes,
        what: impl Fn(DeviceIndex, &IoError) -> String,
    ) -> Result<(), IoError> {
        let what = &what;
        let writes = legs.into_iter().map(|leg| async move {
            let client = self.get(meta, leg.device).await?;
            self.may_write()?;
            if let Err(e) = client.write(leg.device_offset, data.clone(), true).await {
                // Reconnect next time (the device may have come back since).
                self.forget(leg.device).await;
                return Err(IoError::new(e.kind, what(leg.device, &e)));
            }
            Ok(())
        });
        futures::future::try_join_all(writes).await.map(|_| ())
    }

    /// Writes `data` at volume offset `offset` (any length; split at
    /// extent boundaries) on every leg that takes writes, with FUA (a cache
    /// mirror's replay: every write is stable when the replay is done).
    pub async fn write_live(
        &self,
        meta: &PoolMetadata,
        volume: VolumeId,
        offset: u64,
        data: Bytes,
    ) -> Result<(), IoError> {
        let map = meta.volume_map(volume).map_err(|e| IoError::io(e.to_string()))?;
        let segments = map.segments(offset, data.len() as u64).map_err(|e| IoError::io(e.to_string()))?;
        for segment in segments {
            let start = (segment.logical_offset - offset) as usize;
            let piece = data.slice(start..start + segment.len_bytes as usize);
            let legs = segment.write_legs().map_err(|e| IoError::io(e.to_string()))?;
            self.write_legs(meta, legs, &piece, |device, e| {
                format!("writing volume {volume} at offset {} on device {device}: {e}", segment.logical_offset)
            })
            .await?;
        }
        Ok(())
    }
}
