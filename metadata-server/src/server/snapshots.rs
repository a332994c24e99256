//! Snapshot requests in the owner task: create and delete (volume changes
//! committed at a recall point, see [`Core::reconfigure`]), listing, and the
//! registration of copy-on-write chunks.
//!
//! The copy-on-write protocol's durability point is here: a registration is
//! answered only after the chunks are committed to the snapshot's COW map
//! in the pool metadata (every copy, flushed), and the committed metadata is
//! published to the backup pseudo-device ([`Core::meta_watch`]) before the
//! answer leaves. So an agent never overwrites a chunk whose pre-image a
//! restarted server would not find, and a pseudo-device read that finds a
//! chunk unregistered *after* reading it from the live volume knows no
//! overwrite had begun (see `backup_export`).
//!
//! Fault points (`SANVOL_FAULT`, see [`crate::fault`]):
//! `mds-before-cow-commit` (pre-images copied, registration not committed)
//! and `mds-after-cow-commit` (committed, agent not answered).

use tracing::{info, warn};
use volume_format::control::messages::{
    snapshot_export_name, ControlError, ErrorCode, OpenMode, Response, SnapshotInfo,
};
use volume_format::metadata::PoolMetadata;
use volume_format::{SnapshotId, VolumeId};

use super::clock::unix_secs;
use super::core::{Core, VolumeChange};
use super::requests::{alloc_error, err};
use super::snapshot_io::DeviceClients;
use crate::handles::SessionId;

/// Most chunks in one registration.
pub const COW_CHUNKS_PER_REQUEST_MAX: usize = 1 << 16;

impl Core {
    /// The pool's own device connections, for chunk I/O in the owner task.
    fn pool_clients(&self) -> DeviceClients {
        DeviceClients::with(self.meta.devices.iter().filter_map(|d| {
            let client = self.pool.device(d.device_uuid)?.client.clone()?;
            Some((d.index, client))
        }))
    }

    fn snapshot_id(&self, meta: &PoolMetadata, volume: VolumeId, name: &str) -> Result<SnapshotId, ControlError> {
        meta.snapshot_by_name(volume, name).map(|s| s.id).ok_or_else(|| {
            let v = meta.volume(volume).map_or_else(|| volume.to_string(), |v| v.name.clone());
            err(ErrorCode::NotFound, format!("volume {v} has no snapshot named {name:?} (`sanvol snapshot list {v}`)"))
        })
    }

    /// Applies `change` to `trial` without any device I/O: what
    /// [`Core::reconfigure`] checks before disturbing agents.
    pub fn plan_change(
        &self,
        trial: &mut PoolMetadata,
        volume: VolumeId,
        change: &VolumeChange,
    ) -> Result<(), ControlError> {
        match change {
            VolumeChange::Grow { size_bytes } => trial.grow_volume(volume, *size_bytes).map_err(alloc_error),
            VolumeChange::SnapshotCreate { name } => {
                trial.create_snapshot(volume, name, unix_secs()).map(|_| ()).map_err(alloc_error)
            }
            VolumeChange::SnapshotDelete { name } => {
                let id = self.snapshot_id(trial, volume, name)?;
                let plan =
                    trial.snapshot_delete_plan(id).ok_or_else(|| err(ErrorCode::NotFound, "no such snapshot"))?;
                trial.delete_snapshot(&plan).map(|_| ()).map_err(alloc_error)
            }
        }
    }

    /// Applies `change` to `next` for real: a snapshot delete first copies
    /// the pre-images the next older snapshot lacks into its COW area.
    pub async fn apply_change(
        &mut self,
        next: &mut PoolMetadata,
        volume: VolumeId,
        change: &VolumeChange,
    ) -> Result<(), ControlError> {
        let VolumeChange::SnapshotDelete { name } = change else {
            return self.plan_change(next, volume, change);
        };
        let id = self.snapshot_id(next, volume, name)?;
        let plan = next.snapshot_delete_plan(id).ok_or_else(|| err(ErrorCode::NotFound, "no such snapshot"))?;
        if let Some(older) = plan.merge_into {
            let devices = self.pool_clients();
            for &chunk in &plan.chunks {
                let s = next.snapshot(id).expect("planned above");
                let (_, len) = s.chunk_range(chunk);
                let data = devices.read_cow(next, id, chunk, 0, len as u32).await.map_err(|e| {
                    err(ErrorCode::Internal, format!("moving pre-images of snapshot {name}: {e}; nothing was changed"))
                })?;
                devices.write_cow(next, older, chunk, data).await.map_err(|e| {
                    err(ErrorCode::Internal, format!("moving pre-images of snapshot {name}: {e}; nothing was changed"))
                })?;
            }
            if !plan.chunks.is_empty() {
                info!(snapshot = %name, chunks = plan.chunks.len(), "pre-images moved to the next older snapshot");
            }
        }
        next.delete_snapshot(&plan).map(|_| ()).map_err(alloc_error)
    }

    pub fn snapshot_list(&self, volume: Option<&str>) -> Result<Response, ControlError> {
        let volume = match volume {
            Some(name) => Some(self.volume_by_name(name)?.id),
            None => None,
        };
        let meta = &self.meta;
        let mut list: Vec<SnapshotInfo> = meta
            .snapshots
            .iter()
            .filter(|s| volume.is_none_or(|v| s.volume == v))
            .filter_map(|s| {
                let v = meta.volume(s.volume)?;
                Some(SnapshotInfo {
                    volume: v.name.clone(),
                    name: s.name.clone(),
                    id: s.id,
                    export: snapshot_export_name(&v.name, &s.name),
                    created_at_unix_secs: s.created_at_unix_secs,
                    created_generation: s.created_generation,
                    size_bytes: s.size_bytes,
                    chunk_bytes: s.chunk_bytes,
                    cow_chunks: s.cow.count(),
                    reserved_bytes: s.cow_extents.len() as u64 * meta.extent_bytes * u64::from(v.mirror_legs),
                    newest: meta.newest_snapshot(s.volume).is_some_and(|n| n.id == s.id),
                })
            })
            .collect();
        list.sort_by(|a, b| (&a.volume, a.id).cmp(&(&b.volume, b.id)));
        Ok(Response::Snapshots(list))
    }

    /// Registers copy-on-write chunks of the newest snapshot of the handle's
    /// volume; with `copy`, the server first copies their pre-images itself.
    pub async fn cow_register(
        &mut self,
        session: SessionId,
        handle: u64,
        snapshot: u64,
        chunks: &[u64],
        copy: bool,
    ) -> Result<Response, ControlError> {
        let h = match self.handles.get(handle) {
            Some(h) if h.held_by(session) => h,
            _ => return Err(err(ErrorCode::NotFound, format!("handle {handle} is not open on this session"))),
        };
        if h.mode == OpenMode::ReadOnly {
            return Err(err(ErrorCode::PermissionDenied, format!("handle {handle} is read-only")));
        }
        let volume = VolumeId(h.volume);
        let id = SnapshotId(snapshot);
        match self.meta.newest_snapshot(volume) {
            Some(s) if s.id == id => {}
            _ => {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!(
                        "snapshot {id} is not the newest snapshot of volume {volume}; the layout changed, \
                         wait for the new one"
                    ),
                ))
            }
        }
        if chunks.len() > COW_CHUNKS_PER_REQUEST_MAX {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("{} chunks in one registration; at most {COW_CHUNKS_PER_REQUEST_MAX}", chunks.len()),
            ));
        }
        let s = self.meta.snapshot(id).expect("checked above");
        if let Some(bad) = chunks.iter().find(|&&c| c >= s.chunk_count()) {
            return Err(err(ErrorCode::InvalidArgument, format!("chunk {bad} is beyond snapshot {}", s.name)));
        }
        let fresh: Vec<u64> = chunks.iter().copied().filter(|&c| !s.cow.contains(c)).collect();
        if fresh.is_empty() {
            return Ok(Response::CowRegistered { new: 0 });
        }
        if copy {
            // Nobody overwrites an unregistered chunk, so the live volume
            // still holds every pre-image here.
            let devices = self.pool_clients();
            for &chunk in &fresh {
                let (start, len) = s.chunk_range(chunk);
                let data = devices.read_live(&self.meta, volume, start, len as u32).await;
                let data = match data {
                    Ok(d) => d,
                    Err(e) => return Err(err(ErrorCode::Internal, format!("copying pre-image of chunk {chunk}: {e}"))),
                };
                if let Err(e) = devices.write_cow(&self.meta, id, chunk, data).await {
                    return Err(err(ErrorCode::Internal, format!("copying pre-image of chunk {chunk}: {e}")));
                }
            }
        }
        control_client::fault::hit("mds-before-cow-commit");
        let mut next = self.meta.clone();
        let new = next.register_cow(id, &fresh).map_err(|e| err(ErrorCode::InvalidArgument, e))?;
        if let Err(e) = self.commit(next).await {
            warn!(%volume, snapshot = %id, "registering copy-on-write chunks: {e}");
            return Err(e);
        }
        control_client::fault::hit("mds-after-cow-commit");
        Ok(Response::CowRegistered { new: new as u64 })
    }
}
