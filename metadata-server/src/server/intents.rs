//! The server's side of the write-intent log of mirrored volumes
//! (`volume_format::metadata::intent`): committing what agents mark and
//! clear, and resynchronizing what a crashed holder left dirty.
//!
//! **Recording.** `Request::IntentRecord` is a metadata commit like a
//! copy-on-write registration: agents batch it (a region is marked once
//! before its first write, cleared lazily seconds after its last), so the
//! owner loop sees a few small commits per region, never one per I/O, and
//! no data passes through it. Marking a region whose leg is on a device not
//! online records it stale for that device in the same commit, before the
//! agent writes — so a degraded write is recorded durably before it is
//! acknowledged.
//!
//! **After a crash: resync before the open is granted.** A handle that is
//! gone (broken by a conflicting open, expired, excluded) leaves its dirty
//! set *orphaned*: the legs may differ there. The next open of the volume
//! first copies every orphaned region from the first online leg to the
//! others (a job; opens of the volume wait, [`Busy::Resync`]), then commits
//! the orphaned sets away together with the open. Why before the open
//! rather than reading dirty regions from one chosen leg while a background
//! copy runs: it needs nothing of the agents (any agent, of any version,
//! reads consistent data the moment it is granted the volume), and a copy
//! can never race a new holder's writes, because there is none yet. The
//! cost is bounded by what was dirty — a few regions of
//! [`intent_region_bytes`] each — so the open waits milliseconds to
//! seconds, not a whole-volume resync.
//!
//! Known limits: a volume that still has another live writer (shared
//! opens) when one holder's handle is gone is not resynchronized then (the
//! copy would race that writer's writes); its orphaned regions are copied
//! at the first open that finds no live writer.
//!
//! **A restarted agent that resumes its handle** (its state directory kept
//! the resume key) holds the same handle, so its dirty set is not orphaned;
//! but the previous run may have died with writes in flight. Every new
//! attachment of a mirrored volume therefore asks `Request::IntentResync`
//! before its first I/O: the server copies the handle's dirty regions (none
//! for a fresh open: answered at once) and forgets them.

use std::collections::BTreeSet;

use tracing::{info, warn};
use volume_format::control::messages::{ErrorCode, OpenMode, Response};
use volume_format::metadata::intent::union;
use volume_format::metadata::{intent_region_bytes, ChunkRuns, IntentKey, MetaChange};
use volume_format::{HandleId, VolumeId};

use super::core::{AfterCommit, AfterJob, Busy, Core, ReplyId, Step};
use super::jobs::{DeviceExtents, ExtentCopy, Job, JobOutcome};
use super::requests::{done, err};
use crate::handles::SessionId;

pub use volume_format::control::messages::INTENT_PROTOCOL_VERSION;

/// Most regions (marked plus cleared) in one `Request::IntentRecord`.
pub const INTENT_RECORD_REGIONS_MAX: usize = 4096;

/// An open waiting for the orphaned regions of its volume to be copied.
#[derive(Debug)]
pub struct OrphansResync {
    pub session: SessionId,
    pub id: VolumeId,
    pub volume: String,
    pub mode: OpenMode,
    pub reply: ReplyId,
    /// The handles whose dirty sets were copied.
    pub handles: Vec<HandleId>,
    /// Handles the open broke before (a cache replay, `cache`).
    pub carried: Vec<crate::handles::Handle>,
}

impl Core {
    /// `Request::IntentRecord`: commits the regions `handle` marks dirty
    /// (and stale for legs on devices not online) and those it clears.
    pub(super) fn prepare_intent_record(
        &mut self,
        session: SessionId,
        handle: u64,
        mark: Vec<u64>,
        clear: Vec<u64>,
        reply: ReplyId,
    ) -> Step {
        let h = match self.handles.get(handle) {
            Some(h) if h.held_by(session) => h,
            _ => {
                return done(
                    reply,
                    Err(err(ErrorCode::NotFound, format!("handle {handle} is not open on this session"))),
                )
            }
        };
        if h.mode == OpenMode::ReadOnly {
            return done(reply, Err(err(ErrorCode::PermissionDenied, format!("handle {handle} is read-only"))));
        }
        if self.removing().contains(&handle) || self.revoked.contains(&handle) {
            let msg = format!("handle {handle} is being released; this agent must not write to it any more");
            return done(reply, Err(err(ErrorCode::HandleBroken, msg)));
        }
        let volume = VolumeId(h.volume);
        if mark.len() + clear.len() > INTENT_RECORD_REGIONS_MAX {
            let msg = format!(
                "{} intent regions in one request; at most {INTENT_RECORD_REGIONS_MAX}",
                mark.len() + clear.len()
            );
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        let count = self.meta.intent_regions(volume).unwrap_or(0);
        if let Some(bad) = mark.iter().chain(&clear).find(|&&r| r >= count) {
            let msg = format!("intent region {bad} is beyond volume {volume} ({count} regions)");
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        // Marked while an online copy of the volume runs: copied again.
        self.precopy_marked(volume, mark.iter().copied());
        self.keeps_intent_log(handle);
        let mark = ChunkRuns::from_chunks(mark);
        let clear = ChunkRuns::from_chunks(clear);
        let changes = self.meta.plan_intent_record(volume, HandleId(handle), &mark, &clear);
        if changes.is_empty() {
            return done(reply, Ok(Response::IntentRecorded));
        }
        Step::Commit { changes, then: AfterCommit::Respond { reply, response: Box::new(Response::IntentRecorded) } }
    }

    /// `Request::IntentResync`: a new run of the agent took `handle` back;
    /// copies the regions it recorded dirty (from the first online leg to
    /// the others), then forgets them.
    pub(super) fn prepare_intent_resync(&mut self, session: SessionId, handle: u64, reply: ReplyId) -> Step {
        let h = match self.handles.get(handle) {
            Some(h) if h.held_by(session) => h,
            _ => {
                return done(
                    reply,
                    Err(err(ErrorCode::NotFound, format!("handle {handle} is not open on this session"))),
                )
            }
        };
        let volume = VolumeId(h.volume);
        // Its agent keeps the log (one without never asks).
        self.keeps_intent_log(handle);
        let dirty = self.meta.intent(volume, IntentKey::Dirty(HandleId(handle)));
        if dirty.is_empty() {
            return done(reply, Ok(Response::IntentRecorded));
        }
        let other_writer = self.handles.on_volume(volume.0).any(|o| o.id != handle && o.mode != OpenMode::ReadOnly);
        if other_writer {
            // The copy would race the other writer's writes: left dirty
            // (copied once no other writer holds the volume, `orphaned_dirty`).
            warn!(%volume, handle, "a resumed handle's dirty regions are not copied while another holder writes");
            return done(reply, Ok(Response::IntentRecorded));
        }
        let copies = self.region_copies(volume, &dirty);
        info!(%volume, handle, regions = dirty.len(), copies = copies.len(),
            "copying the regions the handle recorded dirty (its previous run died with writes in flight, or a write failed before its close)");
        let then = AfterJob::HandleResynced { volume, handle: HandleId(handle), reply };
        if copies.is_empty() {
            return self.continue_job(then, JobOutcome::done());
        }
        let job = Job::Resync { extent_bytes: intent_region_bytes(self.meta.extent_bytes), copies, progress: None };
        Step::Job { job, busy: Some((volume, Busy::Resync)), then }
    }

    /// A resumed handle's dirty regions were copied (or not).
    pub(super) fn handle_resynced(
        &mut self,
        volume: VolumeId,
        handle: HandleId,
        reply: ReplyId,
        outcome: JobOutcome,
    ) -> Step {
        self.release(volume);
        if let Err(e) = outcome.result {
            warn!(%volume, %handle, "resync of a resumed handle's dirty regions failed: {e}");
            let msg = format!(
                "copying the regions the previous run of this agent was writing failed ({e}); retried at the next I/O"
            );
            return done(reply, Err(err(ErrorCode::Unavailable, msg)));
        }
        let changes = self.forget_dirty(volume, &[handle]);
        if changes.is_empty() {
            return done(reply, Ok(Response::IntentRecorded));
        }
        Step::Commit { changes, then: AfterCommit::Respond { reply, response: Box::new(Response::IntentRecorded) } }
    }

    /// Whether a handle writing `volume` is held by an agent of a protocol
    /// older than [`INTENT_PROTOCOL_VERSION`]: it writes without marking, so
    /// the regions a failed device missed are not known for that volume.
    pub(super) fn has_legacy_writer(&self, volume: VolumeId) -> bool {
        self.handles.on_volume(volume.0).filter(|h| h.mode != OpenMode::ReadOnly).any(|h| {
            std::iter::once(h.session)
                .chain(h.duplicates.iter().copied())
                .filter_map(|s| self.sessions.get(&s))
                .any(|peer| peer.version < INTENT_PROTOCOL_VERSION)
        })
    }

    /// The changes that make `volume`'s stale sets untracked (its legs on a
    /// failed device are then copied whole when the device comes back).
    pub(super) fn untrack_stale(&self, volume: VolumeId) -> Vec<MetaChange> {
        self.meta
            .intents_of(volume)
            .filter(|e| matches!(e.key, IntentKey::Stale(_)))
            .map(|e| MetaChange::IntentSet { volume, key: e.key, regions: ChunkRuns::default() })
            .collect()
    }

    /// The intent changes that go with marking `device` failed: every region
    /// dirty now is stale for it, except on volumes an agent writes without
    /// the log (those stay untracked: copied whole).
    pub(super) fn device_failed_intents(&self, device: volume_format::DeviceIndex) -> Vec<MetaChange> {
        let mut changes = self.meta.plan_device_failed_intents(device);
        changes.retain(|c| match c {
            MetaChange::IntentSet { volume, .. } => !self.has_legacy_writer(*volume),
            _ => true,
        });
        for v in self.meta.volumes.iter().filter(|v| self.has_legacy_writer(v.id)) {
            changes.extend(self.untrack_stale(v.id));
        }
        changes
    }

    /// The dirty sets of `volume` left by handles that can no longer write
    /// (gone, or about to be broken by an open in `mode`), if no live writer
    /// remains that could race a copy; empty if there is nothing to copy.
    fn orphaned_dirty(&self, volume: VolumeId, mode: OpenMode) -> Vec<(HandleId, ChunkRuns)> {
        let now_ms = self.now.mono_ms;
        let m = self.handles.device_request_max_ms;
        let mut orphans = Vec::new();
        for e in self.meta.intents_of(volume) {
            let IntentKey::Dirty(h) = e.key else { continue };
            match self.handles.get(h.0) {
                None => orphans.push((h, e.regions.clone())),
                Some(live) if crate::handles::modes_conflict(live.mode, mode) && now_ms >= live.breakable_at_ms(m) => {
                    orphans.push((h, e.regions.clone()))
                }
                Some(_) => {}
            }
        }
        let orphaned: BTreeSet<HandleId> = orphans.iter().map(|(h, _)| *h).collect();
        let live_writer = self
            .handles
            .on_volume(volume.0)
            .any(|h| h.mode != OpenMode::ReadOnly && !orphaned.contains(&HandleId(h.id)));
        if live_writer {
            if !orphans.is_empty() {
                warn!(
                    %volume,
                    "a gone holder left dirty regions, but another holder still writes: they are copied at the \
                     first open without one"
                );
            }
            return Vec::new();
        }
        orphans
    }

    /// Before an open of `volume`: the job that copies the regions a gone
    /// holder left dirty, if any (`None`: open now).
    pub(super) fn resync_orphans_before_open(
        &mut self,
        session: SessionId,
        volume: VolumeId,
        name: &str,
        mode: OpenMode,
        reply: ReplyId,
        carried: &[crate::handles::Handle],
    ) -> Option<Step> {
        let orphans = self.orphaned_dirty(volume, mode);
        if orphans.is_empty() {
            return None;
        }
        let regions = union(orphans.iter().map(|(_, r)| r));
        let handles: Vec<HandleId> = orphans.iter().map(|(h, _)| *h).collect();
        let copies = self.region_copies(volume, &regions);
        info!(%volume, regions = regions.len(), copies = copies.len(), ?handles,
            "copying the regions a gone holder left dirty before the volume is opened again");
        let then = AfterJob::OrphansResynced(OrphansResync {
            session,
            id: volume,
            volume: name.to_string(),
            mode,
            reply,
            handles,
            carried: carried.to_vec(),
        });
        if copies.is_empty() {
            // Nothing to copy (one leg online): only forget the sets.
            return Some(self.continue_job(then, JobOutcome::done()));
        }
        let job = Job::Resync { extent_bytes: intent_region_bytes(self.meta.extent_bytes), copies, progress: None };
        Some(Step::Job { job, busy: Some((volume, Busy::Resync)), then })
    }

    /// Copies of `regions` of `volume`: from its first leg on an online
    /// device onto every other leg that takes writes (online or resyncing;
    /// a failed device's legs are in its stale set instead). One source per
    /// region, with no fallback to another leg: the next leg may be the
    /// target itself (a copy onto itself "succeeds" and leaves the legs
    /// different — simulator seed 26961687257383, a server cut off from the
    /// first leg's device), and with three legs two copies falling back
    /// differently could swap their contents. A source that does not
    /// answer fails the copy (the open is refused and tried again); a
    /// device that is gone is marked failed, and the next leg becomes the
    /// first.
    fn region_copies(&self, volume: VolumeId, regions: &ChunkRuns) -> Vec<ExtentCopy> {
        let Some(v) = self.meta.volume(volume) else { return Vec::new() };
        let extent_bytes = self.meta.extent_bytes;
        let region_bytes = intent_region_bytes(extent_bytes);
        let endpoint = |device, offset| -> Option<DeviceExtents> {
            let uri = self.meta.device(device)?.uri.clone();
            Some(DeviceExtents { device, uri, offsets: vec![offset] })
        };
        let mut copies = Vec::new();
        for region in regions.iter() {
            let logical = region * region_bytes;
            let Some(e) = v.extents.get((logical / extent_bytes) as usize) else { continue };
            let at = logical % extent_bytes;
            let state = |d| self.meta.device(d).map(|r| r.state.clone());
            let first = e
                .legs
                .iter()
                .filter(|l| state(l.device).is_some_and(|s| s.is_online()))
                .find_map(|l| endpoint(l.device, l.offset + at));
            let Some(first) = first else { continue };
            let from = vec![first.clone()];
            for leg in e.legs.iter().filter(|l| l.device != first.device) {
                let takes_writes = matches!(
                    state(leg.device),
                    Some(
                        volume_format::metadata::DeviceState::Online
                            | volume_format::metadata::DeviceState::Resyncing { .. }
                    )
                );
                if let (true, Some(to)) = (takes_writes, endpoint(leg.device, leg.offset + at)) {
                    copies.push(ExtentCopy { to, from: from.clone() });
                }
            }
        }
        copies
    }

    /// The orphaned regions were copied (or not): open, forgetting them in
    /// the open's commit, or refuse the open with why.
    pub(super) fn orphans_resynced(&mut self, r: OrphansResync, outcome: JobOutcome) -> Step {
        // The volume is not busy any more: the open below is prepared (and
        // its handle taken in the table) before any other change of it.
        self.release(r.id);
        if let Err(e) = outcome.result {
            warn!(volume = %r.volume, "resync of the regions a gone holder left dirty failed: {e}");
            let msg = format!(
                "volume {}: copying the regions its previous holder was writing when it went away failed ({e}); the \
                 open is refused so that no read sees legs that differ; retry when the devices answer",
                r.volume
            );
            return done(r.reply, Err(err(ErrorCode::Unavailable, msg)));
        }
        self.prepare_open_with(r.session, &r.volume, r.mode, r.reply, r.carried, &r.handles)
    }

    /// The changes that forget `handles`' dirty sets of `volume`.
    pub(super) fn forget_dirty(&self, volume: VolumeId, handles: &[HandleId]) -> Vec<MetaChange> {
        handles
            .iter()
            .filter(|h| self.meta.intents_of(volume).any(|e| e.key == IntentKey::Dirty(**h)))
            .map(|h| MetaChange::IntentSet { volume, key: IntentKey::Dirty(*h), regions: ChunkRuns::default() })
            .collect()
    }
}
