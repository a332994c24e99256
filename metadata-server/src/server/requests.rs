//! What each control request does to the owner's state.
//!
//! Every change follows one pattern: build the next metadata from a clone,
//! commit it, and only then change in-memory state and answer. A refused or
//! failed request leaves everything exactly as it was.

use tracing::info;
use volume_format::control::messages::{
    ClientInfo, ControlError, DeviceInfo, ErrorCode, OpenMode, OpenedHandle, PoolInfo, Request, Response, ServerEvent,
    VolumeDetail, VolumeInfo,
};
use volume_format::metadata::{AllocError, ClientRecord, HandleRecord, HandleState, VolumeRecord, MIRROR_LEGS_MAX};
use volume_format::{HandleId, PublicKey, VolumeDescription, VolumeId};

use super::clock::{unix_ms, unix_secs};
use super::core::{Core, PendingChange, Reply, VolumeChange};
use crate::handles::{OpenRefused, SessionId};

/// Block size of new volumes (what agents expose).
pub const VOLUME_BLOCK_BYTES: u32 = 4096;

pub(super) fn err(code: ErrorCode, message: impl Into<String>) -> ControlError {
    ControlError::new(code, message)
}

pub fn alloc_error(e: AllocError) -> ControlError {
    let code = match &e {
        AllocError::NotEnoughSpace { .. } | AllocError::TooFewDevices { .. } => ErrorCode::NoSpace,
        AllocError::VolumeExists(_) | AllocError::DeviceExists(_) => ErrorCode::AlreadyExists,
        AllocError::NoSuchVolume(_) => ErrorCode::NotFound,
        AllocError::VolumeBusy { .. } | AllocError::HasSnapshots { .. } => ErrorCode::Busy,
        AllocError::ShrinkRefused { .. } | AllocError::BadRequest(_) => ErrorCode::InvalidArgument,
    };
    err(code, format!("{e}; nothing was changed"))
}

impl Core {
    pub async fn handle_request(&mut self, session: SessionId, request: Request, reply: Reply) {
        let request = match VolumeChange::of(request) {
            Ok((volume, change)) => {
                // `None`: the reply is kept until the holders have drained.
                if let Some((reply, result)) = self.reconfigure(&volume, change, reply).await {
                    let _ = reply.send(result);
                }
                return;
            }
            Err(request) => request,
        };
        let result = match request {
            Request::PoolStatus => Ok(Response::Pool(self.pool_info())),
            Request::Renew => Ok(Response::Lease { lease_ms: self.lease_ms }),
            Request::DeviceList => Ok(Response::Devices(self.device_infos())),
            Request::ClientList => Ok(Response::Clients(self.client_infos())),
            Request::ClientAuthorize { key, name, role } => self.client_authorize(key, name, role).await,
            Request::ClientRevoke { key } => self.client_revoke(session, key).await,
            Request::VolumeCreate { name, size_bytes, legs } => self.volume_create(name, size_bytes, legs).await,
            Request::VolumeList => {
                Ok(Response::Volumes(self.meta.volumes.iter().map(|v| self.volume_info(v)).collect()))
            }
            Request::VolumeShow { name } => self.volume_show(&name),
            Request::VolumeDelete { name } => self.volume_delete(&name).await,
            Request::VolumeGrow { .. } | Request::SnapshotCreate { .. } | Request::SnapshotDelete { .. } => {
                Err(err(ErrorCode::Internal, "volume changes are handled before this point"))
            }
            Request::Open { volume, mode } => self.open(session, &volume, mode).await,
            Request::Close { handle } => self.close(session, handle.0).await,
            Request::RecallDone { handle, generation } => self.recall_done(session, handle.0, generation).await,
            Request::Resume { key } => self.resume(session, &key).await,
            Request::Handover { handle, to_key } => self.handover(session, handle.0, to_key),
            Request::OpenHandover { token } => self.open_handover(session, &token).await,
            Request::DataChannel { volume, device } => self.data_channel_grant(session, volume.0, device.0),
            Request::ReportDeviceFailure { device, reason } => {
                self.report_device_failure(session, device.0, reason).await
            }
            Request::ReportDeviceRecovered { device } => self.report_device_recovered(session, device.0),
            Request::SnapshotList { volume } => self.snapshot_list(volume.as_deref()),
            Request::CowRegister { handle, snapshot, chunks } => {
                self.cow_register(session, handle.0, snapshot.0, &chunks, false).await
            }
            Request::CowCopy { handle, snapshot, chunks } => self.cow_register(session, handle.0, snapshot.0, &chunks, true).await,
            Request::BackupChannel => Err(err(
                ErrorCode::InvalidArgument,
                "a backup channel is asked for as the first request of a data channel (after the data-channel preamble)",
            )),
        };
        let _ = reply.send(result);
    }

    pub(super) fn volume_by_name(&self, name: &str) -> Result<&VolumeRecord, ControlError> {
        self.meta.volume_by_name(name).ok_or_else(|| {
            err(ErrorCode::NotFound, format!("no volume named {name:?} (`sanvol volume list` shows the volumes)"))
        })
    }

    fn pool_info(&self) -> PoolInfo {
        let free = self.meta.free_extents();
        let m = &self.meta;
        PoolInfo {
            pool_uuid: m.pool_uuid.to_string(),
            name: m.pool_name.clone(),
            generation: m.generation,
            extent_bytes: m.extent_bytes,
            devices: m.devices.len() as u32,
            devices_failed: m.devices.iter().filter(|d| !d.state.is_online()).count() as u32,
            volumes: m.volumes.len() as u32,
            capacity_bytes: m.devices.iter().map(|d| d.data.len_bytes()).sum(),
            free_bytes: free.count() * m.extent_bytes,
            server_key: m.server_public_key.to_string(),
        }
    }

    fn device_infos(&self) -> Vec<DeviceInfo> {
        let free = self.meta.free_extents();
        self.meta
            .devices
            .iter()
            .map(|d| DeviceInfo {
                index: d.index,
                uuid: d.device_uuid.to_string(),
                uri: d.uri.clone(),
                size_bytes: d.device_bytes,
                extents_total: d.extent_count(self.meta.extent_bytes),
                extents_free: free.device_count(d.index),
                state: d.state.clone(),
                reachable: self.pool.reachable(d.device_uuid),
            })
            .collect()
    }

    fn client_infos(&self) -> Vec<ClientInfo> {
        self.meta
            .clients
            .iter()
            .map(|c| ClientInfo {
                name: c.name.clone(),
                key: c.public_key.to_string(),
                role: c.role,
                connected: self.sessions.values().filter(|s| s.peer.key == c.public_key.0).count() as u32,
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
            })
            .collect()
    }

    fn volume_info(&self, v: &VolumeRecord) -> VolumeInfo {
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
        }
    }

    fn volume_show(&self, name: &str) -> Result<Response, ControlError> {
        let v = self.volume_by_name(name)?;
        let description = VolumeDescription::from_metadata(&self.meta, v.id)
            .map_err(|e| err(ErrorCode::Internal, format!("describing volume {name:?}: {e}")))?;
        Ok(Response::Volume(VolumeDetail { info: self.volume_info(v), description }))
    }

    async fn client_authorize(
        &mut self,
        key: [u8; 32],
        name: String,
        role: volume_format::control::auth::Role,
    ) -> Result<Response, ControlError> {
        if ed25519_dalek::VerifyingKey::from_bytes(&key).is_err() {
            return Err(err(ErrorCode::InvalidArgument, "that is not a valid ed25519 public key"));
        }
        let name = if name.is_empty() { hex::encode(&key[..8]) } else { name };
        let mut next = self.meta.clone();
        match next.clients.iter_mut().find(|c| c.public_key.0 == key) {
            Some(c) if c.role == role && c.name == name => {
                return Err(err(ErrorCode::AlreadyExists, format!("key is already authorized as {role} {name:?}")))
            }
            Some(c) => {
                c.role = role;
                c.name = name.clone();
            }
            None => next.clients.push(ClientRecord { public_key: PublicKey(key), name: name.clone(), role }),
        }
        self.commit(next).await?;
        info!(client = %name, %role, "client authorized");
        Ok(Response::Done)
    }

    async fn client_revoke(&mut self, session: SessionId, key: [u8; 32]) -> Result<Response, ControlError> {
        let Some(record) = self.meta.clients.iter().find(|c| c.public_key.0 == key).cloned() else {
            return Err(err(ErrorCode::NotFound, format!("key {} is not authorized in this pool", hex::encode(key))));
        };
        let admins = self.meta.clients.iter().filter(|c| c.role == volume_format::control::auth::Role::Admin).count();
        if record.role == volume_format::control::auth::Role::Admin && admins == 1 {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "{:?} is the last admin key; authorize another admin first, or nobody could manage the pool",
                    record.name
                ),
            ));
        }
        let mut next = self.meta.clone();
        next.clients.retain(|c| c.public_key.0 != key);
        self.commit(next).await?;
        info!(client = %record.name, "client revoked; closing its sessions");
        for (id, s) in self.sessions.iter_mut() {
            if s.peer.key == key && *id != session {
                if let Some(kick) = s.kick.take() {
                    let _ = kick.send(());
                }
            }
        }
        Ok(Response::Done)
    }

    async fn volume_create(&mut self, name: String, size_bytes: u64, legs: u8) -> Result<Response, ControlError> {
        if !(1..=MIRROR_LEGS_MAX).contains(&u32::from(legs)) {
            return Err(err(ErrorCode::InvalidArgument, format!("legs must be 1..={MIRROR_LEGS_MAX}, not {legs}")));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(VOLUME_BLOCK_BYTES)) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("volume size {size_bytes} must be a positive multiple of {VOLUME_BLOCK_BYTES} bytes"),
            ));
        }
        let mut next = self.meta.clone();
        next.create_volume(&name, size_bytes, VOLUME_BLOCK_BYTES, u32::from(legs), unix_secs()).map_err(alloc_error)?;
        self.commit(next).await?;
        info!(volume = %name, size_bytes, legs, "volume created");
        Ok(Response::Done)
    }

    fn holders_text(&self, volume: VolumeId) -> Vec<String> {
        self.handles
            .on_volume(volume.0)
            .map(|h| {
                format!(
                    "{} ({}, handle {}, lease until {})",
                    h.holder,
                    h.mode,
                    h.id,
                    self.clock.describe(h.lease_until_ms)
                )
            })
            .collect()
    }

    async fn volume_delete(&mut self, name: &str) -> Result<Response, ControlError> {
        let id = self.volume_by_name(name)?.id;
        let holders = self.holders_text(id);
        if !holders.is_empty() {
            return Err(err(
                ErrorCode::Busy,
                format!("volume {name} is open by {}; detach it there first", holders.join(", ")),
            ));
        }
        let mut next = self.meta.clone();
        next.delete_volume(id).map_err(alloc_error)?;
        self.commit(next).await?;
        info!(volume = %name, "volume deleted");
        Ok(Response::Done)
    }

    /// Applies `change` to `name`. Without holders it is one commit; with
    /// holders it starts a recall and keeps `reply` (returns `None`) until
    /// [`Core::check_recall`] finishes it.
    pub async fn reconfigure(
        &mut self,
        name: &str,
        change: VolumeChange,
        reply: Reply,
    ) -> Option<(Reply, Result<Response, ControlError>)> {
        let id = match self.volume_by_name(name) {
            Ok(v) => v.id,
            Err(e) => return Some((reply, Err(e))),
        };
        // Plan it now so "no space", "shrink" or "no such snapshot" is refused
        // before any agent is disturbed.
        let mut trial = self.meta.clone();
        if let Err(e) = self.plan_change(&mut trial, id, &change) {
            return Some((reply, Err(e)));
        }
        if trial == self.meta {
            return Some((reply, Ok(Response::Done)));
        }
        // Holders only need a recall when what they do I/O with changes.
        let layout_changes =
            trial.volume(id).map(|v| v.layout_generation) != self.meta.volume(id).map(|v| v.layout_generation);
        if self.handles.on_volume(id.0).next().is_none() || !layout_changes {
            let mut next = self.meta.clone();
            let result = match self.apply_change(&mut next, id, &change).await {
                Ok(()) => self.commit(next).await.map(|()| Response::Done),
                Err(e) => Err(e),
            };
            if result.is_ok() {
                info!(volume = %name, %change, "volume reconfigured");
            }
            return Some((reply, result));
        }
        if self.pending_changes.contains_key(&id) {
            let msg = format!("volume {name} is being reconfigured; retry when it is done");
            return Some((reply, Err(err(ErrorCode::Busy, msg))));
        }
        let generation = trial.volume(id).map(|v| v.layout_generation).unwrap_or_default();
        let recall = match self.handles.start_recall(id.0, generation) {
            Ok(r) => r,
            Err(e) => {
                return Some((reply, Err(err(ErrorCode::Busy, format!("volume {name}: {e}; retry when it is done")))))
            }
        };
        info!(volume = %name, %change, generation, holders = recall.waiting.len(), "recalling the layout from its holders");
        for handle in recall.waiting {
            if let Some(session) = self.handles.get(handle).map(|h| h.session) {
                self.send_event(session, ServerEvent::Recall { handle: HandleId(handle), generation });
            }
        }
        self.pending_changes.insert(id, PendingChange { volume: id, change, generation, reply });
        self.check_recall(id).await;
        None
    }

    async fn open(&mut self, session: SessionId, volume: &str, mode: OpenMode) -> Result<Response, ControlError> {
        let v = self.volume_by_name(volume)?;
        let id = v.id;
        if self.handles.recall_of(id.0).is_some() {
            return Err(err(
                ErrorCode::Unavailable,
                format!("volume {volume} is being reconfigured; retry in a moment"),
            ));
        }
        let Some(peer) = self.sessions.get(&session).map(|s| s.peer.clone()) else {
            return Err(err(ErrorCode::Unavailable, "session is closing"));
        };
        let now_ms = self.clock.now_ms();
        self.handles.set_next_id(self.meta.next_ids.handle.0);
        let opened = match self.handles.open(id.0, mode, session, &peer.name, now_ms, self.lease_ms, self.durable_ms) {
            Ok(o) => o,
            Err(OpenRefused::Conflict { holder, mode: held, handle, expires_at_ms }) => {
                return Err(err(
                    ErrorCode::Conflict,
                    format!(
                        "volume {volume} is open {held} by {holder} (handle {handle}, reserved for it until {}); \
                         a {mode} open has to wait until it is closed or its lease and durable timeout ran out",
                        self.clock.describe(expires_at_ms)
                    ),
                ))
            }
        };
        let handle = opened.handle.clone();
        let mut next = self.meta.clone();
        let broken: Vec<u64> = opened.broken.iter().map(|h| h.id).collect();
        let broken_reason =
            format!("{} opened volume {volume} {mode} at {}", peer.name, super::durable::hms(unix_secs()));
        super::durable::mark_broken(&mut next, &broken, &broken_reason);
        next.handles.push(HandleRecord {
            id: HandleId(handle.id),
            volume: id,
            agent_key: PublicKey(peer.key),
            agent_name: peer.name.clone(),
            agent_instance: uuid::Uuid::from_bytes(peer.instance),
            mode,
            opened_at_unix_secs: unix_secs(),
            lease_expires_at_unix_ms: unix_ms() + self.lease_ms,
            durable_timeout_ms: handle.durable_ms,
            state: HandleState::Active,
        });
        next.next_ids.handle = HandleId(handle.id + 1);
        if let Err(e) = self.commit(next).await {
            self.handles.remove(handle.id);
            for h in opened.broken {
                self.handles.restore(h);
            }
            return Err(e);
        }
        for h in opened.broken {
            info!(handle = h.id, holder = %h.holder, "handle broken by a conflicting open after its lease ran out");
            let reason = format!("{} opened the volume {mode} after this handle's lease ran out", peer.name);
            self.send_handle_event(&h, ServerEvent::Revoked { handle: HandleId(h.id), reason });
        }
        let description = VolumeDescription::from_metadata(&self.meta, id)
            .map_err(|e| err(ErrorCode::Internal, format!("describing volume {volume}: {e}")))?;
        info!(volume, handle = handle.id, %mode, holder = %peer.name, "volume opened");
        let resume_key = self.resume_key_for(handle.id);
        Ok(Response::Opened(OpenedHandle {
            handle: HandleId(handle.id),
            mode,
            description,
            lease_ms: self.lease_ms,
            resume_key,
        }))
    }

    async fn close(&mut self, session: SessionId, handle: u64) -> Result<Response, ControlError> {
        match self.handles.get(handle) {
            Some(h) if h.held_by(session) => {}
            _ => return Err(err(ErrorCode::NotFound, format!("handle {handle} is not open on this session"))),
        }
        let mut next = self.meta.clone();
        next.handles.retain(|h| h.id.0 != handle);
        self.commit(next).await?;
        if let Some(g) = self.grace.as_mut() {
            g.settled(handle);
        }
        if let Some(h) = self.handles.close(handle, session) {
            info!(handle, volume = h.volume, "handle closed");
            if self.pending_changes.contains_key(&VolumeId(h.volume)) {
                self.check_recall(VolumeId(h.volume)).await;
            }
        }
        Ok(Response::Done)
    }

    async fn recall_done(
        &mut self,
        session: SessionId,
        handle: u64,
        generation: u64,
    ) -> Result<Response, ControlError> {
        self.handles.recall_done(handle, session, generation).map_err(|e| err(ErrorCode::InvalidArgument, e))?;
        if let Some(volume) = self.handles.get(handle).map(|h| VolumeId(h.volume)) {
            self.check_recall(volume).await;
        }
        Ok(Response::Done)
    }
}
