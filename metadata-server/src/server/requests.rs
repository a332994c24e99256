//! What each request does to the owner's state, in two halves.
//!
//! `read` answers what needs no change (listings, renewals, grants) at once.
//! Everything else is queued and *prepared* when its turn comes: validated
//! against the state as it is then, it becomes a [`Step`]; a change that
//! writes metadata builds the next metadata from a copy of the committed
//! one and is *finished* ([`Core::finish_commit`]) when the commit's result
//! is known. Only then does in-memory state change for good and the caller
//! get its answer: a refused or failed change leaves everything exactly as
//! it was (an open's reservation in the handle table is undone).

use tracing::{info, warn};
use volume_format::control::messages::{
    ControlError, ErrorCode, OpenMode, OpenedHandle, Request, Response, ServerEvent,
};
use volume_format::metadata::{AllocError, ClientRecord, HandleRecord, HandleState, MetaChange, MIRROR_LEGS_MAX};
use volume_format::{HandleId, PublicKey, VolumeDescription, VolumeId};

use super::core::{AfterCommit, AfterJob, Busy, Change, Core, PendingChange, ReplyId, Step, VolumeChange};
use super::durable::BROKEN_RECORDS_MAX;
use super::jobs::{Job, JobOutcome};
use crate::handles::{Handle, OpenRefused, RecallState, SessionId};

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

/// An open whose commit is in flight: its handle is reserved in the table.
#[derive(Debug)]
pub struct OpenCommit {
    pub session: SessionId,
    pub reply: ReplyId,
    pub handle: Handle,
    /// Handles the open broke (removed from the table; put back on failure).
    pub broken: Vec<Handle>,
    pub volume: VolumeId,
    pub volume_name: String,
    pub holder: String,
}

pub(super) fn done(reply: ReplyId, result: Result<Response, ControlError>) -> Step {
    Step::Done(Some((reply, result)))
}

impl Core {
    /// Answers a request that changes nothing, or `None` if it must queue.
    pub(super) fn read(&mut self, session: SessionId, request: &Request) -> Option<Result<Response, ControlError>> {
        Some(match request {
            Request::PoolStatus => Ok(Response::Pool(self.pool_info())),
            Request::Renew => Ok(Response::Lease { lease_ms: self.lease_ms }),
            Request::DeviceList => Ok(Response::Devices(self.device_infos(|_| true))),
            Request::DeviceFencing => Ok(Response::DeviceFencing(self.device_fencing())),
            Request::ClientList => Ok(Response::Clients(self.client_infos())),
            Request::VolumeList => {
                Ok(Response::Volumes(self.meta.volumes.iter().map(|v| self.volume_info(v)).collect()))
            }
            Request::VolumeShow { name } => self.volume_show(name),
            Request::Operations => Ok(Response::Operations(self.operation_infos())),
            Request::SnapshotList { volume } => {
                self.snapshot_list(volume.as_deref()).map(|listing| self.scoped_listing(session, listing))
            }
            Request::DataChannel { volume, device } => self.data_channel_grant(session, volume.0, device.0),
            Request::ReportDeviceRecovered { device } => self.report_device_recovered(session, device.0),
            Request::Capabilities { handle } => self.handle_capabilities(session, *handle),
            Request::CacheReport { handle, report } => self.cache_report(session, *handle, report),
            Request::VolumeCacheReport { name } => self.volume_cache_report(name),
            Request::VolumeCacheMirror { name } => self.volume_cache_mirror(name),
            Request::BackupChannel => Err(err(
                ErrorCode::InvalidArgument,
                "a backup channel is asked for as the first request of a data channel (after the data-channel preamble)",
            )),
            _ => return None,
        })
    }

    /// The volume a queued request changes, and which jobs on that volume it
    /// must wait for; `None` for requests no job blocks.
    pub(super) fn volume_of(&self, _session: SessionId, request: &Request) -> Option<(VolumeId, &'static [Busy])> {
        const ANY: &[Busy] = &[Busy::Cow, Busy::Layout, Busy::Resync, Busy::Precopy];
        match request {
            Request::VolumeGrow { name, .. }
            | Request::VolumeDelete { name }
            | Request::SnapshotCreate { volume: name, .. }
            | Request::SnapshotDelete { volume: name, .. }
            | Request::VolumeCache { name, .. }
            | Request::MirrorForget { name } => Some((self.meta.volume_by_name(name)?.id, ANY)),
            // A volume whose extents on a device come back are being copied
            // without holders: an opener would write while the copy runs.
            // Nor while an online copy runs (an open may need a copy of its
            // own, of orphaned regions: one job per volume at a time). Nor
            // while pre-images move for a change committed without a recall
            // (no holders when it started): the opener would get the layout
            // from before the change and never be recalled, and write
            // pre-images into a deleted snapshot's freed COW area, given to
            // another volume meanwhile (the simulator's seed 182565496196980).
            Request::Open { volume: name, .. } => {
                Some((self.meta.volume_by_name(name)?.id, &[Busy::Layout, Busy::Resync, Busy::Precopy]))
            }
            // Registrations wait for pre-images moving between the volume's
            // snapshots too: a chunk registered into a snapshot while its
            // merge runs was committed into the merged snapshot without its
            // data having moved (the simulator's seed 279744025116075: a
            // snapshot read another chunk's stale pre-image).
            // Agents' registrations go on during an online copy (their
            // writes wait for them; `precopy` copies the snapshot areas
            // again); a server-side copy, a job of its own, waits.
            Request::CowRegister { handle, .. } => {
                Some((VolumeId(self.handles.get(handle.0)?.volume), &[Busy::Cow, Busy::Layout, Busy::Resync]))
            }
            Request::CowCopy { handle, .. } => Some((VolumeId(self.handles.get(handle.0)?.volume), ANY)),
            // Marks wait for a resync copy of the volume (which runs with
            // its holders drained, or before an open).
            Request::IntentRecord { handle, .. } => {
                Some((VolumeId(self.handles.get(handle.0)?.volume), &[Busy::Resync]))
            }
            _ => None,
        }
    }

    pub(super) fn prepare_request(&mut self, session: SessionId, request: Request, reply: ReplyId) -> Step {
        let request = match VolumeChange::of(request) {
            Ok((volume, change)) => return self.prepare_reconfigure(&volume, change, reply),
            Err(request) => request,
        };
        let result = match request {
            Request::ClientAuthorize { key, name, role, volumes } => {
                return self.prepare_authorize(key, name, role, volumes, reply)
            }
            Request::ClientRevoke { key } => return self.prepare_revoke(session, key, reply),
            Request::VolumeCreate { name, size_bytes, legs } => {
                return self.prepare_volume_create(name, size_bytes, legs, reply)
            }
            Request::VolumeDelete { name } => return self.prepare_volume_delete(&name, reply),
            Request::Open { volume, mode } => {
                return self.prepare_open_with(session, &volume, mode, reply, Vec::new(), &[])
            }
            request @ Request::VolumeCache { .. } => return self.prepare_volume_cache(session, request, reply),
            Request::MirrorOpen { handle } => return self.prepare_mirror_open(session, handle, None, reply),
            Request::MirrorOpenStaged { handle, copy, records } => {
                return self.prepare_mirror_open(session, handle, Some((copy, records)), reply)
            }
            Request::MirrorForget { name } => return self.prepare_mirror_forget(&name, reply),
            Request::Close { handle } => return self.prepare_close(session, handle.0, reply),
            Request::OpenHandover { token } => return self.prepare_open_handover(session, &token, reply),
            Request::Handoff { to } => return self.prepare_handoff(to, reply),
            Request::DeviceAdd { uri, force } => return self.prepare_device_add(uri, force, None, reply),
            Request::DeviceReplace { device, uri, force } => {
                return self.prepare_device_add(uri, force, Some(device), reply)
            }
            Request::DeviceEvacuate { device } => return self.prepare_device_evacuate(device, reply),
            Request::DeviceRemove { device } => return self.prepare_device_remove(device, reply),
            Request::VolumeMirrorAdd { name } => {
                return self.prepare_volume_remap(&name, volume_format::metadata::RemapKind::MirrorAdd, reply)
            }
            Request::VolumeMirrorRemove { name, device } => {
                let kind = volume_format::metadata::RemapKind::MirrorRemove { device };
                return self.prepare_volume_remap(&name, kind, reply);
            }
            Request::VolumeMove { name, from, to } => {
                let kind = volume_format::metadata::RemapKind::Move { from, to };
                return self.prepare_volume_remap(&name, kind, reply);
            }
            Request::ReportDeviceFailure { device, reason } => {
                return self.prepare_report_device_failure(session, device.0, reason, reply)
            }
            Request::CowRegister { handle, snapshot, chunks } => {
                return self.prepare_cow(session, handle.0, snapshot.0, chunks, false, reply)
            }
            Request::CowCopy { handle, snapshot, chunks } => {
                return self.prepare_cow(session, handle.0, snapshot.0, chunks, true, reply)
            }
            Request::IntentRecord { handle, mark, clear } => {
                return self.prepare_intent_record(session, handle.0, mark, clear, reply)
            }
            Request::IntentResync { handle } => return self.prepare_intent_resync(session, handle.0, reply),
            Request::Lock { handle, ranges } => return self.prepare_lock(session, handle.0, ranges, reply),
            Request::RecallDone { handle, generation } => self.recall_done(session, handle.0, generation),
            Request::Resume { key } => {
                // The answer first, then where the volume's layout stands
                // (the agent must know the handle before it is told to drain).
                let result = self.resume(session, &key);
                let resumed = match &result {
                    Ok(Response::Opened(o)) => Some((o.handle, o.description.volume)),
                    _ => None,
                };
                self.reply(reply, result);
                if let Some((handle, volume)) = resumed {
                    self.after_resume(session, handle);
                    self.tell_lock_table(session, handle, volume);
                }
                return Step::Done(None);
            }
            Request::Handover { handle, to_key } => self.handover(session, handle.0, to_key),
            // Only a server standing by hands its mirror files out
            // (`standby::run`): here they are in use.
            Request::MirrorFetch { volume, .. } => Err(err(
                ErrorCode::NotActive,
                format!(
                    "this metadata server is active: the cache mirror of volume {volume} here is in use, and it \
                     replays its own files"
                ),
            )),
            other => match self.read(session, &other) {
                Some(result) => result,
                None => Err(err(ErrorCode::Internal, format!("no handler for {other:?}"))),
            },
        };
        done(reply, result)
    }

    /// Finishes a change once its commit's result is known (the committed
    /// metadata is already adopted on success).
    pub(super) fn finish_commit(&mut self, then: AfterCommit, result: Result<(), ControlError>) {
        match then {
            AfterCommit::Reply { reply, what } => {
                if result.is_ok() {
                    info!("{what}");
                }
                self.reply(reply, result.map(|()| Response::Done));
            }
            AfterCommit::Respond { reply, response } => self.reply(reply, result.map(|()| *response)),
            AfterCommit::Refuse { reply, error } => self.reply(reply, Err(error)),
            AfterCommit::Open(open) => self.finish_open(*open, result),
            AfterCommit::Close { session, handle, reply } => self.finish_close(session, handle, reply, result),
            AfterCommit::Revoke { session, key, reply, name } => {
                if result.is_ok() {
                    info!(client = %name, "client revoked; closing its sessions and channels");
                    let sessions: Vec<SessionId> = self
                        .sessions
                        .iter()
                        .filter(|(id, peer)| peer.key == key && **id != session)
                        .map(|(id, _)| *id)
                        .collect();
                    for s in sessions {
                        self.kick(s);
                    }
                }
                self.reply(reply, result.map(|()| Response::Done));
            }
            AfterCommit::Expire { expired } => self.finish_expire(expired, result),
            AfterCommit::Recall { volume, pending, excluded } => self.finish_recall(volume, pending, excluded, result),
            AfterCommit::Handover { claims, handle, reply } => {
                self.finish_open_handover(*claims, handle, reply, result)
            }
            AfterCommit::DeviceFailed { device, reason, reply } => {
                self.finish_device_failed(device, reason, reply, result)
            }
            AfterCommit::DeviceBack { device } => self.device_back(device, result),
            AfterCommit::DeviceOnline { device } => self.device_online(device, result),
            AfterCommit::DeviceAdded { uuid, index, area } => self.device_added(uuid, index, area, result),
            AfterCommit::AdminRemoved { device } => self.admin_removed(device, result),
            AfterCommit::FencingRecorded { devices } => match result {
                Ok(()) => info!(devices, "recorded in the pool metadata whether devices fence"),
                Err(e) => warn!(devices, "recording whether devices fence failed (retried): {e}"),
            },
            AfterCommit::CowRegistered { volume, answers } => {
                if let Err(e) = &result {
                    warn!(%volume, "registering copy-on-write chunks: {e}");
                } else {
                    control_client::fault::hit("mds-after-cow-commit");
                }
                for (reply, answer) in answers {
                    let answer = answer.and_then(|new| result.clone().map(|()| Response::CowRegistered { new }));
                    self.reply(reply, answer);
                }
            }
            AfterCommit::Released { volume, then } => {
                self.release(volume);
                self.finish_commit(*then, result);
            }
            AfterCommit::MirrorOpened { volume, cache, generation, reply } => {
                self.finish_mirror_open(volume, cache, generation, reply, result)
            }
            AfterCommit::MirrorCleared { volume, next } => {
                let outcome = match result {
                    Ok(()) => JobOutcome::done(),
                    Err(e) => JobOutcome::failed(format!("recording that it was replayed failed: {}", e.message)),
                };
                let then = AfterJob::MirrorReplayed { volume, next: *next, cleared: true };
                self.queue.push_front(Change::JobDone { outcome, then });
            }
            AfterCommit::BrokenBeforeReplay { volume, next } => {
                let outcome = match result {
                    Ok(()) => JobOutcome::done(),
                    Err(e) => JobOutcome::failed(e.message),
                };
                let then = AfterJob::BrokenRecorded { volume, next: *next };
                self.queue.push_front(Change::JobDone { outcome, then });
            }
        }
    }

    /// Continues a change whose job reported back.
    pub(super) fn continue_job(&mut self, then: AfterJob, outcome: JobOutcome) -> Step {
        match then {
            AfterJob::CowCopied(copied) => self.cow_copied(copied, outcome),
            AfterJob::Merged { volume, change, finish } => self.merged(volume, change, finish, outcome),
            AfterJob::DeviceChecked { session, device, reason, reply } => {
                self.device_checked(session, device, reason, reply, outcome)
            }
            AfterJob::Probed { device } => self.probed(device, outcome),
            AfterJob::CopyChecked { device, why } => self.copy_checked(device, why, outcome),
            AfterJob::Labelled => self.labelled(outcome),
            AfterJob::Precopied { volume, next } => self.precopy_done(volume, next, outcome),
            AfterJob::Zeroed { extents, changes, then } => self.zeroing_done(extents, changes, *then, outcome),
            AfterJob::Prezeroed { extents, name, change, reply } => {
                self.prezeroed(extents, &name, change, reply, outcome)
            }
            AfterJob::MirrorReplayed { volume, next, cleared } => self.mirror_replayed(volume, next, cleared, outcome),
            AfterJob::BrokenRecorded { volume, next } => self.broken_recorded(volume, next, outcome),
            AfterJob::MirrorPrepared { session, handle, volume, generation, reply } => {
                self.mirror_prepared(session, handle, volume, generation, reply, outcome)
            }
            AfterJob::ExpireFenced { expired } => self.expire_fenced(expired, outcome),
            AfterJob::RecallFenced { volume, pending, excluded } => match outcome.result {
                Ok(()) => self.recall_fenced(volume, pending, excluded),
                Err(why) => {
                    let name = self.meta.volume(volume).map_or_else(|| volume.to_string(), |v| v.name.clone());
                    let handles: Vec<String> = excluded.iter().map(|id| HandleId(*id).to_string()).collect();
                    let msg = format!(
                        "volume {name}: {} was not committed: holders that did not confirm the recall ({}) could \
                         not be fenced: {why}; nothing was changed — check the device named, then retry",
                        pending.change,
                        handles.join(", ")
                    );
                    self.finish_recall(volume, pending, excluded, Err(err(ErrorCode::Unavailable, msg)));
                    Step::Done(None)
                }
            },
            AfterJob::OpenFenced { changes, open } => match outcome.result {
                Ok(()) => Step::Commit { changes, then: AfterCommit::Open(open) },
                Err(why) => {
                    let msg = format!(
                        "volume {} could not be taken from its previous holder: {why}; the previous holder keeps \
                         it — retry, or check the device named",
                        open.volume_name
                    );
                    self.finish_open(*open, Err(err(ErrorCode::Unavailable, msg)));
                    Step::Done(None)
                }
            },
            AfterJob::OrphansResynced(r) => self.orphans_resynced(r, outcome),
            AfterJob::HandleResynced { volume, handle, reply } => self.handle_resynced(volume, handle, reply, outcome),
        }
    }

    fn prepare_authorize(
        &mut self,
        key: [u8; 32],
        name: String,
        role: volume_format::control::auth::Role,
        volumes: Vec<String>,
        reply: ReplyId,
    ) -> Step {
        if ed25519_dalek::VerifyingKey::from_bytes(&key).is_err() {
            return done(reply, Err(err(ErrorCode::InvalidArgument, "that is not a valid ed25519 public key")));
        }
        if role == volume_format::control::auth::Role::Server {
            let msg = "the server role is the pool's server key's alone; authorize a client as agent, admin or backup";
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        if let Err(e) = super::grants::check_scope(role, &volumes) {
            return done(reply, Err(e));
        }
        let name = if name.is_empty() { hex::encode(&key[..8]) } else { name };
        let scope_now = self.meta.scope_of(&PublicKey(key)).unwrap_or_default().to_vec();
        if let Some(c) = self.meta.clients.iter().find(|c| c.public_key.0 == key) {
            if c.role == role && c.name == name && scope_now == volumes {
                let msg = format!("key is already authorized as {role} {name:?}");
                return done(reply, Err(err(ErrorCode::AlreadyExists, msg)));
            }
        }
        let mut changes =
            vec![MetaChange::ClientPut(ClientRecord { public_key: PublicKey(key), name: name.clone(), role })];
        if scope_now != volumes {
            changes.push(MetaChange::ClientScope { key: PublicKey(key), volumes: volumes.clone() });
        }
        let scope = if volumes.is_empty() { String::new() } else { format!(" for volumes {}", volumes.join(", ")) };
        let what = format!("client {name} authorized as {role}{scope}");
        Step::Commit { changes, then: AfterCommit::Reply { reply, what } }
    }

    fn prepare_revoke(&mut self, session: SessionId, key: [u8; 32], reply: ReplyId) -> Step {
        let Some(record) = self.meta.clients.iter().find(|c| c.public_key.0 == key).cloned() else {
            let msg = format!("key {} is not authorized in this pool", hex::encode(key));
            return done(reply, Err(err(ErrorCode::NotFound, msg)));
        };
        let admins = self.meta.clients.iter().filter(|c| c.role == volume_format::control::auth::Role::Admin).count();
        if record.role == volume_format::control::auth::Role::Admin && admins == 1 {
            let msg = format!(
                "{:?} is the last admin key; authorize another admin first, or nobody could manage the pool",
                record.name
            );
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        let mut changes = vec![MetaChange::ClientRemove { key: PublicKey(key) }];
        if self.meta.scope_of(&PublicKey(key)).is_some() {
            changes.push(MetaChange::ClientScope { key: PublicKey(key), volumes: Vec::new() });
        }
        Step::Commit { changes, then: AfterCommit::Revoke { session, key, reply, name: record.name } }
    }

    fn prepare_volume_create(&mut self, name: String, size_bytes: u64, legs: u8, reply: ReplyId) -> Step {
        if !(1..=MIRROR_LEGS_MAX).contains(&u32::from(legs)) {
            let msg = format!("legs must be 1..={MIRROR_LEGS_MAX}, not {legs}");
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(VOLUME_BLOCK_BYTES)) {
            let msg = format!("volume size {size_bytes} must be a positive multiple of {VOLUME_BLOCK_BYTES} bytes");
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        let now = self.now.unix_secs();
        let change =
            match self.alloc_view().plan_create_volume(&name, size_bytes, VOLUME_BLOCK_BYTES, u32::from(legs), now) {
                Ok(c) => c,
                Err(e) => return done(reply, Err(alloc_error(e))),
            };
        let what = format!("volume {name} created ({size_bytes} bytes, {legs} legs)");
        Step::Commit { changes: vec![change], then: AfterCommit::Reply { reply, what } }
    }

    fn prepare_volume_delete(&mut self, name: &str, reply: ReplyId) -> Step {
        let id = match self.volume_by_name(name) {
            Ok(v) => v.id,
            Err(e) => return done(reply, Err(e)),
        };
        let holders = self.holders_text(id);
        if !holders.is_empty() {
            let msg = format!("volume {name} is open by {}; detach it there first", holders.join(", "));
            return done(reply, Err(err(ErrorCode::Busy, msg)));
        }
        if self.pending_changes.contains_key(&id) {
            let msg = format!("volume {name} is being reconfigured; retry when it is done");
            return done(reply, Err(err(ErrorCode::Busy, msg)));
        }
        let change = match self.meta.plan_delete_volume(id) {
            Ok(c) => c,
            Err(e) => return done(reply, Err(alloc_error(e))),
        };
        // Its write-intent sets go with it (their regions mean nothing now).
        let mut changes: Vec<MetaChange> = self
            .meta
            .intents_of(id)
            .map(|e| MetaChange::IntentSet { volume: id, key: e.key, regions: Default::default() })
            .collect();
        changes.push(change);
        Step::Commit { changes, then: AfterCommit::Reply { reply, what: format!("volume {name} deleted") } }
    }

    /// Applies `change` to `name`. Without holders (or when the layout the
    /// holders use does not change) it is one commit, after a merge job for
    /// a snapshot delete that needs one; with holders it starts a recall and
    /// parks the reply until [`Core::prepare_recall`] finishes it.
    fn prepare_reconfigure(&mut self, name: &str, change: VolumeChange, reply: ReplyId) -> Step {
        self.prepare_reconfigure_with(name, change, reply, true)
    }

    /// [`Core::prepare_reconfigure`]; with `may_prezero`, a change that
    /// recalls holders and hands out extents not yet zeroed zeroes them
    /// first, so the holders are not kept drained while it runs.
    pub(super) fn prepare_reconfigure_with(
        &mut self,
        name: &str,
        change: VolumeChange,
        reply: ReplyId,
        may_prezero: bool,
    ) -> Step {
        let id = match self.volume_by_name(name) {
            Ok(v) => v.id,
            Err(e) => return done(reply, Err(e)),
        };
        // Plan it now so "no space", "shrink" or "no such snapshot" is refused
        // before any agent is disturbed.
        let planned = match self.plan_change(id, &change) {
            Ok(Some(p)) => p,
            Ok(None) => return done(reply, Ok(Response::Done)),
            Err(e) => return done(reply, Err(e)),
        };
        if self.pending_changes.contains_key(&id) {
            let msg = format!("volume {name} is being reconfigured; retry when it is done");
            return done(reply, Err(err(ErrorCode::Busy, msg)));
        }
        // Holders only need a recall when what they do I/O with changes.
        if self.handles.on_volume(id.0).next().is_none() || !planned.layout_changes {
            // A snapshot holds what a dead holder's cache acknowledged: its
            // mirror goes to the devices first (see `super::cache`).
            if matches!(change, VolumeChange::SnapshotCreate { .. }) && self.needs_replay(id) {
                let next =
                    super::cache::AfterReplay::Reconfigure { name: name.to_string(), change, reply, may_prezero };
                return self.replay_then(id, next);
            }
            if let Some(job) = self.merge_job(id, &change) {
                let busy = Some((id, data_job_busy(&change)));
                let then = AfterJob::Merged { volume: id, change, finish: super::core::MergeFinish::Direct { reply } };
                return Step::Job { job, busy, then };
            }
            let what = format!("volume {name} reconfigured: {change}");
            return Step::Commit { changes: vec![planned.change], then: AfterCommit::Reply { reply, what } };
        }
        let unzeroed = self.unzeroed(std::slice::from_ref(&planned.change));
        if may_prezero && !unzeroed.is_empty() {
            self.zeroing = true;
            let job = self.zero_job(&unzeroed);
            let then = AfterJob::Prezeroed { extents: unzeroed, name: name.to_string(), change, reply };
            return Step::Job { job, busy: None, then };
        }
        let generation = self.meta.volume(id).map(|v| v.layout_generation + 1).unwrap_or_default();
        let recall = match self.handles.start_recall(id.0, generation) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("volume {name}: {e}; retry when it is done");
                return done(reply, Err(err(ErrorCode::Busy, msg)));
            }
        };
        info!(volume = %name, %change, generation, holders = recall.waiting.len(), "recalling the layout from its holders");
        for handle in recall.waiting {
            if let Some(h) = self.handles.get(handle).cloned() {
                self.send_handle_event(&h, ServerEvent::Recall { handle: HandleId(handle), generation });
            }
        }
        self.pending_changes.insert(id, PendingChange { volume: id, change, generation, reply });
        self.check_recalls();
        Step::Parked
    }

    /// A grow's new extents were zeroed before its recall: recall now (if
    /// the plan changed meanwhile, the commit zeroes what is new).
    fn prezeroed(
        &mut self,
        extents: Vec<volume_format::metadata::PhysicalExtent>,
        name: &str,
        change: VolumeChange,
        reply: ReplyId,
        outcome: JobOutcome,
    ) -> Step {
        self.zeroing = false;
        if let Err(why) = outcome.result {
            return done(reply, Err(super::zeroing::zeroing_failed(&why)));
        }
        let free = self.meta.free_extents();
        let still_free = |e: &volume_format::metadata::PhysicalExtent| {
            free.per_device.get(&e.device).is_some_and(|offsets| offsets.contains(&e.offset))
        };
        self.zeroed.extend(extents.into_iter().filter(still_free));
        self.prepare_reconfigure_with(name, change, reply, false)
    }

    /// Finishes the pending change of `volume` if every holder confirmed or
    /// was excluded by its lease: (merge,) commit, then publish and reply.
    pub(super) fn prepare_recall(&mut self, volume: VolumeId) -> Step {
        let Some(RecallState::Ready { excluded }) = self.handles.recall_state(volume.0, self.now.mono_ms) else {
            // A holder renewed in time after all: the deadline tick re-checks.
            return Step::Done(None);
        };
        let Some(pending) = self.pending_changes.remove(&volume) else {
            self.handles.finish_recall(volume.0);
            return Step::Done(None);
        };
        if !excluded.is_empty() {
            // Before the layout changes under them: the holders left out are
            // cut off on every device that fences (the timing rules have run
            // out already; plain devices rely on them alone).
            let job = Job::Fence {
                key: self.key.clone(),
                uris: self.fence_uris(),
                handles: excluded.iter().map(|id| HandleId(*id)).collect(),
            };
            return Step::Job { job, busy: None, then: AfterJob::RecallFenced { volume, pending, excluded } };
        }
        self.recall_fenced(volume, pending, excluded)
    }

    /// A recalled change whose excluded holders are fenced: an excluded
    /// holder of a cached volume did not destage its cache, so what its
    /// mirror holds goes to the devices before the change (a snapshot must
    /// hold every acknowledged write; see `super::cache`) — after the fence,
    /// so the holder cannot write over the replay. Then merge and commit.
    ///
    /// The excluded holders are recorded as broken before the replay
    /// writes: a server that dies mid-replay must not come back with them
    /// active (they would resume over a half-done replay).
    ///
    /// A holder whose lease ran out while the recall waited was released by
    /// the expiry (fenced, its record removed) rather than excluded here: it
    /// destaged nothing either. So with nobody holding the volume now, a
    /// mirror still pending is replayed before the change too (simulator
    /// seed 117556401225247: a snapshot of a cached volume whose holder's
    /// VM was paused committed without the writes its mirror held).
    fn recall_fenced(&mut self, volume: VolumeId, pending: PendingChange, excluded: Vec<u64>) -> Step {
        let nobody_left = excluded.is_empty() && self.handles.on_volume(volume.0).next().is_none();
        if nobody_left && self.needs_replay(volume) {
            let next = super::cache::AfterReplay::Recall { pending, excluded };
            return self.replay_then(volume, next);
        }
        if !excluded.is_empty() && self.needs_replay(volume) {
            let ids: Vec<HandleId> = excluded.iter().map(|id| HandleId(*id)).collect();
            let reason = format!(
                "excluded from the reconfiguration of layout generation {}: no confirmation within the lease",
                pending.generation
            );
            let changes = self.meta.plan_break_handles(&ids, &reason, self.now.unix_secs(), BROKEN_RECORDS_MAX);
            let next = Box::new(super::cache::AfterReplay::Recall { pending, excluded });
            return Step::Commit { changes, then: AfterCommit::BrokenBeforeReplay { volume, next } };
        }
        self.recall_continue(volume, pending, excluded)
    }

    /// [`Core::prepare_recall`] once the excluded holders are fenced and any
    /// cache mirror is replayed: the merge a snapshot delete needs, then the
    /// commit.
    pub(super) fn recall_continue(&mut self, volume: VolumeId, pending: PendingChange, excluded: Vec<u64>) -> Step {
        if let Some(job) = self.merge_job(volume, &pending.change) {
            let change = pending.change.clone();
            let busy = Some((volume, data_job_busy(&change)));
            let finish = super::core::MergeFinish::Recall { pending, excluded };
            return Step::Job { job, busy, then: AfterJob::Merged { volume, change, finish } };
        }
        self.recall_commit(volume, pending, excluded)
    }

    /// The commit of a recalled change (holders drained or excluded).
    pub(super) fn recall_commit(&mut self, volume: VolumeId, pending: PendingChange, excluded: Vec<u64>) -> Step {
        let mut changes: Vec<MetaChange> = self
            .meta
            .handles
            .iter()
            .filter(|h| excluded.contains(&h.id.0))
            .map(|h| MetaChange::HandleRemove { handle: h.id })
            .collect();
        match self.plan_change(volume, &pending.change) {
            Ok(planned) => {
                changes.extend(planned.map(|p| p.change));
                Step::Commit { changes, then: AfterCommit::Recall { volume, pending, excluded } }
            }
            Err(e) => {
                self.finish_recall(volume, pending, excluded, Err(e));
                Step::Done(None)
            }
        }
    }

    pub(super) fn finish_recall(
        &mut self,
        volume: VolumeId,
        pending: PendingChange,
        excluded: Vec<u64>,
        result: Result<(), ControlError>,
    ) {
        // The excluded holders go if the change committed — and, if it
        // failed, those already recorded as broken: an excluded holder of a
        // cached volume is, before its mirror is replayed (`recall_fenced`),
        // and the replay wrote over what it cached; resumed with the old
        // layout, it wrote on as a handle the pool has broken (simulator
        // seed 120380633692710: the snapshot's commit failed after the
        // replay, and the holder, back from a VM pause, wrote again).
        let broken = |id: &u64| self.meta.handles.iter().any(|h| h.id.0 == *id && h.state != HandleState::Active);
        let gone: Vec<u64> =
            if result.is_ok() { excluded.clone() } else { excluded.iter().copied().filter(broken).collect() };
        for id in &gone {
            if let Some(h) = self.handles.remove(*id) {
                warn!(handle = id, holder = %h.holder, "excluded from the reconfiguration: it did not confirm the recall within its lease");
                let reason = format!(
                    "excluded from the reconfiguration of layout generation {}: no confirmation within the lease",
                    pending.generation
                );
                self.released(&h, reason);
            }
        }
        // The others resume either way: with the new layout, or the old one
        // if the change failed — then those it would have excluded too: they
        // were not removed, and a holder that was only slow (paused, cut
        // off) would otherwise wait for a layout forever.
        self.handles.finish_recall(volume.0);
        self.publish_volume(volume, &gone);
        match &result {
            Ok(()) => {
                info!(%volume, change = %pending.change, generation = self.meta.generation, "volume reconfigured")
            }
            Err(e) => warn!(%volume, change = %pending.change, "reconfiguration failed: {e}"),
        }
        self.reply(pending.reply, result.map(|()| Response::Done));
    }

    /// Opens `volume`; `carried`: handles an earlier preparation of this
    /// open broke before it replayed the volume's cache mirror
    /// ([`super::cache`]); `resynced`: the gone holders whose dirty regions
    /// were copied (none: they are looked for first, `intents`) — their
    /// dirty sets go away in the open's commit.
    pub(super) fn prepare_open_with(
        &mut self,
        session: SessionId,
        volume: &str,
        mode: OpenMode,
        reply: ReplyId,
        carried: Vec<Handle>,
        resynced: &[HandleId],
    ) -> Step {
        let id = match self.volume_by_name(volume) {
            Ok(v) => v.id,
            Err(e) => return done(reply, Err(e)),
        };
        if self.handles.recall_of(id.0).is_some() {
            let msg = format!("volume {volume} is being reconfigured; retry in a moment");
            return done(reply, Err(err(ErrorCode::Unavailable, msg)));
        }
        if resynced.is_empty() {
            if let Some(step) = self.resync_orphans_before_open(session, id, volume, mode, reply, &carried) {
                return step;
            }
        }
        let Some(peer) = self.sessions.get(&session).cloned() else {
            return done(reply, Err(err(ErrorCode::Unavailable, "session is closing")));
        };
        let now_ms = self.now.mono_ms;
        self.handles.set_next_id(self.meta.next_ids.handle.0);
        let opened = match self.handles.open(id.0, mode, session, &peer.name, now_ms, self.lease_ms, self.durable_ms) {
            Ok(o) => o,
            Err(OpenRefused::Conflict { holder, mode: held, handle, expires_at_ms }) => {
                let msg = format!(
                    "volume {volume} is open {held} by {holder} (handle {handle}, reserved for it until {}); a {mode} \
                     open has to wait until it is closed or its lease and durable timeout ran out",
                    self.now.describe(expires_at_ms)
                );
                return done(reply, Err(err(ErrorCode::Conflict, msg)));
            }
        };
        let mut opened = opened;
        opened.broken.extend(carried);
        let broken: Vec<HandleId> = opened.broken.iter().map(|h| HandleId(h.id)).collect();
        let broken_reason =
            format!("{} opened volume {volume} {mode} at {}", peer.name, super::durable::hms(self.now.unix_secs()));
        let now_secs = self.now.unix_secs();
        if self.needs_replay(id) {
            // Nothing of the open stays but the handles it broke: out of the
            // table, and recorded as broken before the replay writes — a
            // server that dies mid-replay must not come back with them
            // active (their holders would resume over a half-done replay).
            self.handles.remove(opened.handle.id);
            let next = super::cache::AfterReplay::Open {
                session,
                name: volume.to_string(),
                mode,
                reply,
                broken: opened.broken,
            };
            if broken.is_empty() {
                return self.replay_then(id, next);
            }
            let changes = self.meta.plan_break_handles(&broken, &broken_reason, now_secs, BROKEN_RECORDS_MAX);
            return Step::Commit {
                changes,
                then: AfterCommit::BrokenBeforeReplay { volume: id, next: Box::new(next) },
            };
        }
        let handle = opened.handle.clone();
        let mut changes = self.meta.plan_break_handles(&broken, &broken_reason, now_secs, BROKEN_RECORDS_MAX);
        changes.extend(self.forget_dirty(id, resynced));
        // An agent that writes without the intent log: what a failed device
        // misses from now on is not known (copied whole when it is back).
        if mode != OpenMode::ReadOnly && peer.version < super::intents::INTENT_PROTOCOL_VERSION {
            changes.extend(self.untrack_stale(id));
        }
        changes.push(MetaChange::HandleOpen(HandleRecord {
            id: HandleId(handle.id),
            volume: id,
            agent_key: PublicKey(peer.key),
            agent_name: peer.name.clone(),
            agent_instance: uuid::Uuid::from_bytes(peer.instance),
            mode,
            opened_at_unix_secs: self.now.unix_secs(),
            lease_expires_at_unix_ms: self.now.unix_ms + self.lease_ms,
            durable_timeout_ms: handle.durable_ms,
            state: HandleState::Active,
        }));
        let open = OpenCommit {
            session,
            reply,
            handle,
            broken: opened.broken,
            volume: id,
            volume_name: volume.to_string(),
            holder: peer.name,
        };
        if broken.is_empty() {
            return Step::Commit { changes, then: AfterCommit::Open(Box::new(open)) };
        }
        // Before anyone else may write: the broken holders are cut off on
        // every device that fences (the timing rules have run out already).
        let job = Job::Fence { key: self.key.clone(), uris: self.fence_uris(), handles: broken };
        Step::Job { job, busy: None, then: AfterJob::OpenFenced { changes, open: Box::new(open) } }
    }

    fn finish_open(&mut self, open: OpenCommit, result: Result<(), ControlError>) {
        let OpenCommit { reply, handle, broken, volume, volume_name, holder, .. } = open;
        if let Err(e) = result {
            self.handles.remove(handle.id);
            self.restore_broken(broken);
            return self.reply(reply, Err(e));
        }
        let mode = handle.mode;
        for h in broken {
            info!(handle = h.id, holder = %h.holder, "handle broken by a conflicting open after its lease ran out");
            let reason = format!("{holder} opened the volume {mode} after this handle's lease ran out");
            self.released(&h, reason);
        }
        let description = match VolumeDescription::from_metadata(&self.meta, volume) {
            Ok(d) => d,
            Err(e) => {
                let msg = format!("describing volume {volume_name}: {e}");
                return self.reply(reply, Err(err(ErrorCode::Internal, msg)));
            }
        };
        info!(volume = %volume_name, handle = handle.id, %mode, holder = %holder, "volume opened");
        let resume_key = self.resume_key_for(handle.id);
        let opened =
            OpenedHandle { handle: HandleId(handle.id), mode, description, lease_ms: self.lease_ms, resume_key };
        self.reply(reply, Ok(Response::Opened(opened)));
    }

    fn prepare_close(&mut self, session: SessionId, handle: u64, reply: ReplyId) -> Step {
        match self.handles.get(handle) {
            Some(h) if h.held_by(session) => {}
            _ => {
                let msg = format!("handle {handle} is not open on this session");
                return done(reply, Err(err(ErrorCode::NotFound, msg)));
            }
        }
        let mut changes = if self.meta.handles.iter().any(|h| h.id.0 == handle) {
            vec![MetaChange::HandleRemove { handle: HandleId(handle) }]
        } else {
            Vec::new()
        };
        // A close comes after the agent drained its I/O, and after it had
        // the regions where a write failed copied (`IntentResync`; an agent
        // that could not have them copied leaves its handle to run out
        // instead): its dirty regions need no copy (`intents`). Unless
        // another writer holds the volume: the copy was then not made (it
        // would race that writer), so the regions stay, copied at the first
        // open that finds no live writer. Nor for a handle being released
        // (its lease ran out, or a recall excluded it): its holder lost the
        // right to write before it could drain or destage, and closes what
        // it was told is gone.
        let leaving = self.removing().contains(&handle) || self.revoked.contains(&handle);
        if let Some(h) = self.handles.get(handle).filter(|_| !leaving) {
            let volume = VolumeId(h.volume);
            // Nor anything in its write-back cache: its mirror holds nothing
            // the devices lack (`super::cache`). (A holder that closed
            // after its handle was released had not destaged: clearing its
            // mirror here lost acknowledged writes — simulator seed 2192.)
            if h.mode == OpenMode::Exclusive {
                changes.extend(self.mirror_clear(volume));
            }
            let other_writer = self.handles.on_volume(volume.0).any(|o| o.id != handle && o.mode != OpenMode::ReadOnly);
            if !other_writer {
                changes.extend(self.forget_dirty(volume, &[HandleId(handle)]));
            }
        }
        Step::Commit { changes, then: AfterCommit::Close { session, handle, reply } }
    }

    fn finish_close(&mut self, _session: SessionId, handle: u64, reply: ReplyId, result: Result<(), ControlError>) {
        if let Err(e) = result {
            return self.reply(reply, Err(e));
        }
        if let Some(g) = self.grace.as_mut() {
            g.settled(handle);
        }
        // Authorized when prepared; the session may have gone since.
        if let Some(h) = self.handles.remove(handle) {
            info!(handle, volume = h.volume, "handle closed");
            if self.pending_changes.contains_key(&VolumeId(h.volume)) {
                self.check_recalls();
            }
        }
        self.reply(reply, Ok(Response::Done));
    }

    fn recall_done(&mut self, session: SessionId, handle: u64, generation: u64) -> Result<Response, ControlError> {
        let ack =
            self.handles.recall_done(handle, session, generation).map_err(|e| err(ErrorCode::InvalidArgument, e))?;
        if ack == crate::handles::RecallAck::Counted {
            self.check_recalls();
        }
        Ok(Response::Done)
    }

    /// Releases handles whose lease (plus durable time) ran out.
    pub(super) fn prepare_expire(&mut self) -> Step {
        let expired = self.handles.expired(self.now.mono_ms);
        if expired.is_empty() {
            return Step::Done(None);
        }
        let changes = self.handle_removals(&expired);
        if changes.is_empty() {
            self.finish_expire(expired, Ok(()));
            return Step::Done(None);
        }
        // Released for good: first cut off on every device that fences.
        let job = Job::Fence {
            key: self.key.clone(),
            uris: self.fence_uris(),
            handles: expired.iter().map(|id| HandleId(*id)).collect(),
        };
        Step::Job { job, busy: None, then: AfterJob::ExpireFenced { expired } }
    }

    /// The records of `expired` still in the metadata, as removals.
    fn handle_removals(&self, expired: &[u64]) -> Vec<MetaChange> {
        let records = self.meta.handles.iter().filter(|h| expired.contains(&h.id.0));
        records.map(|h| MetaChange::HandleRemove { handle: h.id }).collect()
    }

    /// The expired handles were fenced (or could not be): release them.
    fn expire_fenced(&mut self, expired: Vec<u64>, outcome: JobOutcome) -> Step {
        if let Err(why) = outcome.result {
            warn!("releasing expired handles: {why}; retrying at the next tick");
            return Step::Done(None);
        }
        let changes = self.handle_removals(&expired);
        if changes.is_empty() {
            self.finish_expire(expired, Ok(()));
            return Step::Done(None);
        }
        Step::Commit { changes, then: AfterCommit::Expire { expired } }
    }

    /// The devices a fence goes to: every device of the pool not marked
    /// failed (a failed device is not written by anyone: its legs are skipped).
    fn fence_uris(&self) -> Vec<String> {
        self.meta
            .devices
            .iter()
            .filter(|d| !matches!(d.state, volume_format::metadata::DeviceState::Failed { .. }))
            .map(|d| d.uri.clone())
            .collect()
    }

    fn finish_expire(&mut self, expired: Vec<u64>, result: Result<(), ControlError>) {
        if let Err(e) = result {
            return warn!("releasing expired handles: {e}; retrying at the next tick");
        }
        for id in expired {
            if let Some(h) = self.handles.remove(id) {
                warn!(handle = id, volume = h.volume, holder = %h.holder, "lease ran out; handle released");
                let reason = format!("the lease ran out at {}", self.now.describe(h.lease_until_ms));
                self.released(&h, reason);
            }
        }
        self.check_recalls();
    }
}

/// What a data job run for `change` blocks on its volume.
fn data_job_busy(change: &VolumeChange) -> Busy {
    match change {
        VolumeChange::Resync { .. } | VolumeChange::Remap { .. } => Busy::Resync,
        _ => Busy::Layout,
    }
}
