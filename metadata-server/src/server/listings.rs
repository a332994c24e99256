//! Read-only answers: pool status, devices, clients, volumes. Built from the
//! committed metadata and the owner's in-memory state at once, never queued
//! behind a change (a listing during a long job or a slow commit answers
//! immediately, showing the last committed state).

use volume_format::control::messages::{
    ClientInfo, ControlError, DeviceFencing, DeviceInfo, ErrorCode, PoolInfo, Response, VolumeDetail, VolumeInfo,
};
use volume_format::metadata::{DeviceRecord, MetaChange, VolumeRecord};
use volume_format::VolumeDescription;

use super::core::{AfterCommit, Core, Step};
use super::requests::err;

impl Core {
    pub(super) fn volume_by_name(&self, name: &str) -> Result<&VolumeRecord, ControlError> {
        self.meta.volume_by_name(name).ok_or_else(|| {
            err(ErrorCode::NotFound, format!("no volume named {name:?} (`sanvol volume list` shows the volumes)"))
        })
    }

    pub(super) fn pool_info(&self) -> PoolInfo {
        let free = self.meta.free_extents();
        let m = &self.meta;
        PoolInfo {
            pool_uuid: m.pool_uuid.to_string(),
            name: m.pool_name.clone(),
            generation: m.generation,
            extent_bytes: m.extent_bytes,
            servers: self.servers.clone(),
            devices: m.devices.len() as u32,
            devices_failed: m.devices.iter().filter(|d| !d.state.is_online()).count() as u32,
            volumes: m.volumes.len() as u32,
            capacity_bytes: m.devices.iter().map(|d| d.data.len_bytes()).sum(),
            free_bytes: free.count() * m.extent_bytes,
            server_key: m.server_public_key.to_string(),
        }
    }

    /// The devices `filter` keeps, as listings show them.
    pub(super) fn device_infos(&self, filter: impl Fn(&DeviceRecord) -> bool) -> Vec<DeviceInfo> {
        let free = self.meta.free_extents();
        self.meta
            .devices
            .iter()
            .filter(|d| filter(d))
            .map(|d| DeviceInfo {
                index: d.index,
                uuid: d.device_uuid.to_string(),
                uri: d.uri.clone(),
                size_bytes: d.device_bytes,
                extents_total: d.extent_count(self.meta.extent_bytes),
                extents_free: free.device_count(d.index),
                state: d.state.clone(),
                reachable: self.reachable.get(&d.device_uuid).copied().unwrap_or(false),
                recovery: join_nonempty(self.device_recovery(d.index), self.device_operation(d.index)),
            })
            .collect()
    }

    /// Whether each device fences: as last learned from a connection to
    /// it, else as the pool metadata records it (format 10), so a restarted
    /// server knows before it reached the device.
    pub(super) fn device_fencing(&self) -> Vec<DeviceFencing> {
        let fences =
            |d: &DeviceRecord| self.fencing.get(&d.device_uuid).copied().or_else(|| self.meta.device_fenced(d.index));
        self.meta.devices.iter().map(|d| DeviceFencing { device: d.index, fences: fences(d) }).collect()
    }

    /// What connections told about devices' fencing that the pool metadata
    /// does not record (yet): a pool of an older format, a device that was
    /// unreachable when it was labelled, or one whose server was replaced.
    pub(super) fn fencing_to_record(&self) -> Vec<MetaChange> {
        self.meta
            .devices
            .iter()
            .filter_map(|d| {
                let learned = *self.fencing.get(&d.device_uuid)?;
                (self.meta.device_fenced(d.index) != Some(learned))
                    .then_some(MetaChange::DeviceFencing { device: d.index, fenced: learned })
            })
            .collect()
    }

    /// `Change::RecordFencing`: commit what [`Core::fencing_to_record`] finds.
    pub(super) fn prepare_record_fencing(&mut self) -> Step {
        let changes = self.fencing_to_record();
        if changes.is_empty() {
            return Step::Done(None);
        }
        let devices = changes.len();
        Step::Commit { changes, then: AfterCommit::FencingRecorded { devices } }
    }

    pub(super) fn client_infos(&self) -> Vec<ClientInfo> {
        self.meta
            .clients
            .iter()
            .map(|c| ClientInfo {
                name: c.name.clone(),
                key: c.public_key.to_string(),
                role: c.role,
                connected: self.sessions.values().filter(|p| p.key == c.public_key.0).count() as u32,
                handles: self
                    .meta
                    .handles
                    .iter()
                    .filter(|h| h.agent_key == c.public_key)
                    .map(|h| {
                        let volume =
                            self.meta.volume(h.volume).map_or_else(|| h.volume.to_string(), |v| v.name.clone());
                        let state = super::durable::record_state_text(self, h);
                        format!("{volume} ({}, handle {}, {state})", h.mode, h.id.0)
                    })
                    .collect(),
                fallback: self.fallback_of_client(c.public_key.0),
                volumes: self.meta.scope_of(&c.public_key).unwrap_or_default().to_vec(),
            })
            .collect()
    }

    pub(super) fn volume_info(&self, v: &VolumeRecord) -> VolumeInfo {
        VolumeInfo {
            name: v.name.clone(),
            id: v.id,
            size_bytes: v.size_bytes,
            legs: v.mirror_legs as u8,
            extents: v.extents.len() as u64,
            layout_generation: v.layout_generation,
            open_by: self
                .meta
                .handles
                .iter()
                .filter(|r| r.volume == v.id)
                .map(|r| {
                    let state = super::durable::record_state_text(self, r);
                    format!("{} ({}, handle {}, {state})", r.agent_name, r.mode, r.id.0)
                })
                .collect(),
            fallback: self.fallback_of_volume(v.id),
            health: join_nonempty(self.volume_health(v.id), self.volume_operation(v.id)),
        }
    }

    pub(super) fn volume_show(&self, name: &str) -> Result<Response, ControlError> {
        let v = self.volume_by_name(name)?;
        let description = VolumeDescription::from_metadata(&self.meta, v.id)
            .map_err(|e| err(ErrorCode::Internal, format!("describing volume {name:?}: {e}")))?;
        Ok(Response::Volume(VolumeDetail { info: self.volume_info(v), description }))
    }

    pub(super) fn holders_text(&self, volume: volume_format::VolumeId) -> Vec<String> {
        self.handles
            .on_volume(volume.0)
            .map(|h| {
                format!(
                    "{} ({}, handle {}, lease until {})",
                    h.holder,
                    h.mode,
                    h.id,
                    self.now.describe(h.lease_until_ms)
                )
            })
            .collect()
    }
}

/// `a; b`, or whichever is not empty.
fn join_nonempty(a: String, b: String) -> String {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a,
        (true, false) => b,
        (false, false) => format!("{a}; {b}"),
    }
}
