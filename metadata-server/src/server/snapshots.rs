//! Snapshot requests in the owner: create and delete (volume changes
//! committed at a recall point, see `prepare_reconfigure`), listing, and
//! the registration of copy-on-write chunks.
//!
//! The copy-on-write protocol's durability point is here: a registration is
//! answered only after the chunks are committed to the snapshot's COW map
//! in the pool metadata (every copy, flushed), and the committed metadata is
//! published to the backup pseudo-device ([`super::core::Effect::Published`])
//! before the answer leaves. So an agent never overwrites a chunk whose
//! pre-image a restarted server would not find, and a pseudo-device read
//! that finds a chunk unregistered *after* reading it from the live volume
//! knows no overwrite had begun (see `backup_export`).
//!
//! Data movement is a job, never done by the owner: the pre-image copies of
//! shared writers (`CowCopy`) and the move of pre-images into the next older
//! snapshot when one is deleted. While a copy runs, registrations on that
//! volume wait (a chunk registered and overwritten meanwhile must not be
//! copied); while a merge runs, the volume's layout and snapshot changes
//! wait. Every other volume, and every lease, goes on.
//!
//! Fault points (`SANVOL_FAULT`, see [`control_client::fault`]):
//! `mds-before-cow-commit` (pre-images copied, registration not committed)
//! and `mds-after-cow-commit` (committed, agent not answered).

use tracing::{debug, warn};
use volume_format::control::messages::{
    snapshot_export_name, ControlError, ErrorCode, OpenMode, Request, Response, SnapshotInfo,
};
use volume_format::metadata::{MetaChange, PoolMetadata};
use volume_format::{SnapshotId, VolumeId};

use super::core::{
    AfterCommit, AfterJob, Busy, Change, Core, CowAsk, CowCopied, MergeFinish, ReplyId, Step, VolumeChange,
};
use super::jobs::{Job, JobOutcome};
use super::requests::{alloc_error, err};
use crate::handles::SessionId;

/// A planned volume change: its metadata change, and whether the volume's
/// holders must be recalled for it (the layout they do I/O with changes).
#[derive(Debug)]
pub struct PlannedChange {
    pub change: MetaChange,
    pub layout_changes: bool,
}

/// Most chunks in one registration.
pub const COW_CHUNKS_PER_REQUEST_MAX: usize = 1 << 16;

fn done(reply: ReplyId, result: Result<Response, ControlError>) -> Step {
    Step::Done(Some((reply, result)))
}

/// The chunks the accepted registrations of `checked` ask for, each once.
fn fresh_of(checked: &[(ReplyId, Result<Vec<u64>, ControlError>)]) -> Vec<u64> {
    let mut fresh: Vec<u64> = checked.iter().filter_map(|(_, c)| c.as_ref().ok()).flatten().copied().collect();
    fresh.sort_unstable();
    fresh.dedup();
    fresh
}

impl Core {
    fn snapshot_id(&self, meta: &PoolMetadata, volume: VolumeId, name: &str) -> Result<SnapshotId, ControlError> {
        meta.snapshot_by_name(volume, name).map(|s| s.id).ok_or_else(|| {
            let v = meta.volume(volume).map_or_else(|| volume.to_string(), |v| v.name.clone());
            err(ErrorCode::NotFound, format!("volume {v} has no snapshot named {name:?} (`sanvol snapshot list {v}`)"))
        })
    }

    /// The metadata change for `change` of `volume`, planned against the
    /// current metadata (no device I/O: a snapshot delete's pre-images must
    /// already be where the plan wants them, see [`Core::merge_job`]);
    /// `None` if it changes nothing.
    pub fn plan_change(&self, volume: VolumeId, change: &VolumeChange) -> Result<Option<PlannedChange>, ControlError> {
        let view = self.alloc_view();
        let meta = &*view;
        Ok(match change {
            VolumeChange::Grow { size_bytes } => meta
                .plan_grow_volume(volume, *size_bytes)
                .map_err(alloc_error)?
                .map(|change| PlannedChange { change, layout_changes: true }),
            VolumeChange::SnapshotCreate { name } => {
                let change = meta.plan_create_snapshot(volume, name, self.now.unix_secs()).map_err(alloc_error)?;
                Some(PlannedChange { change, layout_changes: true })
            }
            VolumeChange::SnapshotDelete { name } => {
                let id = self.snapshot_id(meta, volume, name)?;
                let plan = meta.snapshot_delete_plan(id).ok_or_else(|| err(ErrorCode::NotFound, "no such snapshot"))?;
                Some(PlannedChange { change: plan.change(), layout_changes: plan.was_newest })
            }
            VolumeChange::Resync { .. } => {
                Some(PlannedChange { change: MetaChange::LayoutBump { volume }, layout_changes: true })
            }
            VolumeChange::Remap { plan, .. } => {
                Some(PlannedChange { change: self.remap_change(volume, plan)?, layout_changes: true })
            }
        })
    }

    /// The data job a change needs before its commit, if any: moving a
    /// deleted snapshot's pre-images into the next older one, or copying a
    /// volume's extents onto a device that came back (`recovery`).
    pub(super) fn merge_job(&self, volume: VolumeId, change: &VolumeChange) -> Option<Job> {
        if let VolumeChange::Resync { device } = change {
            return self.resync_job(volume, *device);
        }
        if let VolumeChange::Remap { plan, .. } = change {
            return self.remap_job(volume, plan);
        }
        let VolumeChange::SnapshotDelete { name } = change else { return None };
        let id = self.snapshot_id(&self.meta, volume, name).ok()?;
        let plan = self.meta.snapshot_delete_plan(id)?;
        let into = plan.merge_into?;
        if plan.chunks.is_empty() {
            return None;
        }
        Some(Job::Merge { meta: self.meta.clone(), from: id, into, chunks: plan.chunks })
    }

    /// A merge job reported back: commit the delete (or give up on it).
    pub(super) fn merged(
        &mut self,
        volume: VolumeId,
        change: VolumeChange,
        finish: MergeFinish,
        outcome: JobOutcome,
    ) -> Step {
        if let Err(why) = outcome.result {
            self.release(volume);
            let e = err(ErrorCode::Internal, format!("{why}; nothing was changed"));
            return match finish {
                MergeFinish::Direct { reply } => done(reply, Err(e)),
                MergeFinish::Recall { pending, excluded } => {
                    self.finish_recall(volume, pending, excluded, Err(e));
                    Step::Done(None)
                }
            };
        }
        match finish {
            MergeFinish::Direct { reply } => {
                let planned = match self.plan_change(volume, &change) {
                    Ok(p) => p,
                    Err(e) => {
                        self.release(volume);
                        return done(reply, Err(e));
                    }
                };
                let what = format!("volume {volume} reconfigured: {change}");
                let then = AfterCommit::Released { volume, then: Box::new(AfterCommit::Reply { reply, what }) };
                Step::Commit { changes: planned.map(|p| p.change).into_iter().collect(), then }
            }
            MergeFinish::Recall { pending, excluded } => match self.recall_commit(volume, pending, excluded) {
                Step::Commit { changes, then } => {
                    Step::Commit { changes, then: AfterCommit::Released { volume, then: Box::new(then) } }
                }
                other => {
                    self.release(volume);
                    other
                }
            },
        }
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

    /// Checks a registration of `chunks` for the newest snapshot of the
    /// handle's volume; returns the volume and the chunks not registered yet.
    fn check_cow(
        &self,
        session: SessionId,
        handle: u64,
        snapshot: u64,
        chunks: &[u64],
    ) -> Result<(VolumeId, Vec<u64>), ControlError> {
        let h = match self.handles.get(handle) {
            Some(h) if h.held_by(session) => h,
            _ => return Err(err(ErrorCode::NotFound, format!("handle {handle} is not open on this session"))),
        };
        if h.mode == OpenMode::ReadOnly {
            return Err(err(ErrorCode::PermissionDenied, format!("handle {handle} is read-only")));
        }
        let volume = VolumeId(h.volume);
        let id = SnapshotId(snapshot);
        let s = match self.meta.newest_snapshot(volume) {
            Some(s) if s.id == id => s,
            _ => {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!(
                        "snapshot {id} is not the newest snapshot of volume {volume}; the layout changed, wait for \
                         the new one"
                    ),
                ))
            }
        };
        if chunks.len() > COW_CHUNKS_PER_REQUEST_MAX {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("{} chunks in one registration; at most {COW_CHUNKS_PER_REQUEST_MAX}", chunks.len()),
            ));
        }
        if let Some(bad) = chunks.iter().find(|&&c| c >= s.chunk_count()) {
            return Err(err(ErrorCode::InvalidArgument, format!("chunk {bad} is beyond snapshot {}", s.name)));
        }
        Ok((volume, chunks.iter().copied().filter(|&c| !s.cow.contains(c)).collect()))
    }

    /// Registers copy-on-write chunks of the newest snapshot of the handle's
    /// volume; with `copy`, the server first copies their pre-images itself
    /// (a job: nobody overwrites an unregistered chunk, so the live volume
    /// still holds every pre-image, and registrations on the volume wait
    /// until it is done). The server-side copies queued behind this one on
    /// the same volume and snapshot join it: one job and one commit for
    /// all of them, not one each (a holder draining for a recall may wait
    /// on many; the simulator's seed 114450128283725).
    pub(super) fn prepare_cow(
        &mut self,
        session: SessionId,
        handle: u64,
        snapshot: u64,
        chunks: Vec<u64>,
        copy: bool,
        reply: ReplyId,
    ) -> Step {
        let (volume, fresh) = match self.check_cow(session, handle, snapshot, &chunks) {
            Ok(x) => x,
            Err(e) => return done(reply, Err(e)),
        };
        if !copy {
            if let Err(e) = self.check_own_copies(volume, handle, snapshot, &chunks, &fresh) {
                return done(reply, Err(e));
            }
            return self.register_step(volume, snapshot, vec![(reply, Ok(fresh))]);
        }
        let room = COW_CHUNKS_PER_REQUEST_MAX - chunks.len();
        let mut asks = vec![CowAsk { session, handle, chunks, reply }];
        asks.extend(self.take_queued_copies(volume, snapshot, room));
        let checked = self.check_asks(&asks, snapshot);
        let to_copy = fresh_of(&checked);
        if to_copy.is_empty() {
            return self.register_step(volume, snapshot, checked);
        }
        if asks.len() > 1 {
            debug!(%volume, registrations = asks.len(), chunks = to_copy.len(), "one server-side copy for several registrations");
        }
        let job = Job::CowCopy { meta: self.meta.clone(), volume, snapshot: SnapshotId(snapshot), chunks: to_copy };
        let then = AfterJob::CowCopied(CowCopied { volume, snapshot, asks });
        Step::Job { job, busy: Some((volume, Busy::Cow)), then }
    }

    /// Takes the server-side copies queued on `volume`'s `snapshot` out of
    /// the queue, up to `room` chunks in all, to join the copy being
    /// prepared. Only changes they may overtake are passed: other volumes'
    /// requests, and the volume's own registrations (idempotent, and in no
    /// order among themselves); anything else on the volume or the pool
    /// (a recall, an expiry, a job's result, a close...) stops the search.
    fn take_queued_copies(&mut self, volume: VolumeId, snapshot: u64, mut room: usize) -> Vec<CowAsk> {
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let Change::Request { session, request, .. } = &self.queue[i] else { break };
            let Some((v, _)) = self.volume_of(*session, request) else { break };
            let take = match request {
                _ if v != volume => false,
                Request::CowCopy { snapshot: s, chunks, .. } if s.0 == snapshot && chunks.len() <= room => true,
                Request::CowRegister { snapshot: s, .. } if s.0 == snapshot => false,
                _ => break,
            };
            if !take {
                i += 1;
                continue;
            }
            let Some(Change::Request { session, request: Request::CowCopy { handle, chunks, .. }, reply }) =
                self.queue.remove(i)
            else {
                unreachable!("the change at {i} is a server-side copy");
            };
            room -= chunks.len();
            taken.push(CowAsk { session, handle: handle.0, chunks, reply });
        }
        taken
    }

    /// Each registration checked: its chunks not registered yet, or why it
    /// is refused.
    fn check_asks(&self, asks: &[CowAsk], snapshot: u64) -> Vec<(ReplyId, Result<Vec<u64>, ControlError>)> {
        asks.iter()
            .map(|a| (a.reply, self.check_cow(a.session, a.handle, snapshot, &a.chunks).map(|(_, fresh)| fresh)))
            .collect()
    }

    /// An agent's own copies are refused while the volume has more than
    /// one writable handle (a handover, shared writers): the other writer
    /// may have registered and overwritten a chunk before this agent read
    /// it, so its copy may be new data (see the agent's `cow` module). Those
    /// agents ask the server to copy; one that did not has broken the
    /// protocol, and if a chunk was registered already its copy may have
    /// overwritten the snapshot's pre-image: said loudly, never accepted.
    fn check_own_copies(
        &self,
        volume: VolumeId,
        handle: u64,
        snapshot: u64,
        chunks: &[u64],
        fresh: &[u64],
    ) -> Result<(), ControlError> {
        let writers = self.handles.on_volume(volume.0).filter(|h| h.mode != OpenMode::ReadOnly).count();
        if writers <= 1 {
            return Ok(());
        }
        let registered: Vec<u64> = chunks.iter().copied().filter(|c| !fresh.contains(c)).collect();
        if !registered.is_empty() {
            tracing::error!(
                handle,
                snapshot,
                chunks = ?registered,
                "an agent copied pre-images of chunks already registered while the volume has {writers} writers: \
                 its copies may have overwritten the snapshot's pre-images in the COW area"
            );
        }
        Err(err(
            ErrorCode::Conflict,
            format!(
                "volume {volume} has {writers} writable handles (a handover or shared writers): its snapshot \
                 pre-images are copied by the server (CowCopy), not by an agent; upgrade this agent"
            ),
        ))
    }

    /// The commit that registers the chunks of `checked` registrations
    /// (each: its chunks not registered yet, or why it is refused); each
    /// caller is answered once it is durable.
    fn register_step(
        &mut self,
        volume: VolumeId,
        snapshot: u64,
        checked: Vec<(ReplyId, Result<Vec<u64>, ControlError>)>,
    ) -> Step {
        let fresh = fresh_of(&checked);
        let planned = if fresh.is_empty() {
            Ok(None)
        } else {
            control_client::fault::hit("mds-before-cow-commit");
            self.meta.plan_register_cow(SnapshotId(snapshot), &fresh)
        };
        match planned {
            Ok(Some(change)) => {
                self.precopy_cow_registered(volume);
                // Each chunk counts as new for the first caller that asked.
                let mut new_chunks: std::collections::BTreeSet<u64> = match &change {
                    MetaChange::CowRegister { chunks, .. } => chunks.iter().collect(),
                    _ => Default::default(),
                };
                let answers = checked
                    .into_iter()
                    .map(|(reply, c)| {
                        (reply, c.map(|chunks| chunks.iter().filter(|c| new_chunks.remove(c)).count() as u64))
                    })
                    .collect();
                Step::Commit { changes: vec![change], then: AfterCommit::CowRegistered { volume, answers } }
            }
            Ok(None) => Step::Answers(
                checked.into_iter().map(|(reply, c)| (reply, c.map(|_| Response::CowRegistered { new: 0 }))).collect(),
            ),
            Err(e) => Step::Answers(
                checked
                    .into_iter()
                    .map(|(reply, c)| (reply, c.and_then(|_| Err(err(ErrorCode::InvalidArgument, e.clone())))))
                    .collect(),
            ),
        }
    }

    /// The server copied pre-images: register them (the ones still
    /// unregistered; the volume was busy, so none should have changed).
    pub(super) fn cow_copied(&mut self, copied: CowCopied, outcome: JobOutcome) -> Step {
        let CowCopied { volume, snapshot, asks } = copied;
        if let Err(why) = outcome.result {
            warn!(%volume, snapshot, registrations = asks.len(), "server-side copy-on-write failed: {why}");
            self.release(volume);
            return Step::Answers(
                asks.into_iter().map(|a| (a.reply, Err(err(ErrorCode::Internal, why.clone())))).collect(),
            );
        }
        let checked = self.check_asks(&asks, snapshot);
        match self.register_step(volume, snapshot, checked) {
            Step::Commit { changes, then } => {
                Step::Commit { changes, then: AfterCommit::Released { volume, then: Box::new(then) } }
            }
            other => {
                self.release(volume);
                other
            }
        }
    }
}
