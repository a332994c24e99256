//! The owner's side of write-back caches (issue 15): the cache setting of
//! volumes, the checks before a request reaches a volume's cache mirror
//! ([`crate::mirror`]), and replaying the mirror before a cached volume is
//! opened again.
//!
//! Why replay at the next open rather than when the holder's handle goes:
//! the guarantee is "nobody opens the volume before every mirrored write is
//! on the devices", and the open is where that is decided — after the
//! previous holder's handle is broken or gone (its lease and device
//! request time ran out, so nothing it sent can still land). The open's
//! reservation is undone while the replay runs, and the handles it broke
//! stay out of the table (they cannot resume); the open is prepared again
//! once the replay is done. A volume replayed once is not replayed again
//! until a holder mirrors it again.
//!
//! Snapshots of cached volumes: the holder destages its cache before it
//! confirms the recall, which leaves the mirror empty, and preserves the
//! chunks a snapshot needs before it logs (and mirrors) a write after it —
//! so a replay, which writes the live volume directly, never changes a
//! snapshot (`client_agent::cache`'s "Snapshots"). A holder that did not
//! confirm (excluded by its lease: dead or cut off) destaged nothing, so
//! the mirror is replayed before the change is committed; a snapshot of a
//! volume nobody holds replays it first too. The setting changes only
//! while the volume is closed.

use volume_format::control::messages::{
    CacheStateInfo, ControlError, ErrorCode, OpenMode, Request, Response, MIRROR_APPEND_BYTES_MAX,
    MIRROR_APPEND_RECORDS_MAX,
};
use volume_format::metadata::{CacheMode, HandleState, MetaChange, VolumeCache};
use volume_format::{HandleId, VolumeId};

use super::core::{AfterCommit, AfterJob, Busy, Core, Effect, PendingChange, ReplyId, Step, VolumeChange};
use super::jobs::{Job, JobOutcome};
use super::requests::err;
use crate::handles::{Handle, SessionId};
use crate::mirror::MirrorOp;

/// What continues once a cached volume's mirror was replayed.
#[derive(Debug)]
pub enum AfterReplay {
    /// An open; `broken`: the handles it broke (kept out of the table).
    Open { session: SessionId, name: String, mode: OpenMode, reply: ReplyId, broken: Vec<Handle> },
    /// A change of the cache setting.
    Setting { session: SessionId, request: Request, reply: ReplyId },
    /// A snapshot of a volume nobody holds.
    Reconfigure { name: String, change: VolumeChange, reply: ReplyId, may_prezero: bool },
    /// The commit of a recalled change whose cached holder was excluded.
    Recall { pending: PendingChange, excluded: Vec<u64> },
}

impl Core {
    /// Passes a mirror request of the session holding the volume's
    /// exclusive handle to the volume's mirror; any other request comes
    /// back.
    pub(super) fn mirror_request(
        &mut self,
        session: SessionId,
        request: Request,
        reply: ReplyId,
    ) -> Result<(), Request> {
        if let Request::VolumeCacheShow { name } = &request {
            self.volume_cache_show(name, reply);
            return Ok(());
        }
        let handle = match &request {
            Request::MirrorOpen { handle }
            | Request::MirrorAppend { handle, .. }
            | Request::MirrorRelease { handle, .. } => *handle,
            _ => return Err(request),
        };
        let checked = self.mirror_holder(session, handle);
        let (volume, cache) = match checked {
            Ok(x) => x,
            Err(e) => {
                self.reply(reply, Err(e));
                return Ok(());
            }
        };
        let op = match request {
            Request::MirrorOpen { .. } => {
                // Its holder mirrors again: the next open replays.
                self.mirror_replayed.remove(&volume);
                MirrorOp::Open { cache }
            }
            Request::MirrorAppend { records, .. } => {
                let bytes: usize = records.iter().map(|r| r.data.len()).sum();
                if records.len() > MIRROR_APPEND_RECORDS_MAX || bytes > MIRROR_APPEND_BYTES_MAX {
                    let msg = format!(
                        "a mirror append carries at most {MIRROR_APPEND_RECORDS_MAX} records and \
                         {MIRROR_APPEND_BYTES_MAX} bytes (this one: {} records, {bytes} bytes)",
                        records.len()
                    );
                    self.reply(reply, Err(err(ErrorCode::InvalidArgument, msg)));
                    return Ok(());
                }
                MirrorOp::Append { records }
            }
            Request::MirrorRelease { upto_seq, .. } => MirrorOp::Release { upto_seq },
            _ => unreachable!("matched above"),
        };
        self.push_effect(Effect::Mirror { volume, op, reply });
        Ok(())
    }

    /// `sanvol volume show`'s cache line: the setting and holder from here,
    /// the mirror's state from its worker (which answers).
    fn volume_cache_show(&mut self, name: &str, reply: ReplyId) {
        let volume = match self.volume_by_name(name) {
            Ok(v) => v.id,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let cache = self.meta.volume_cache(volume);
        let holder = self
            .handles
            .on_volume(volume.0)
            .find(|h| h.mode == OpenMode::Exclusive)
            .map(|h| format!("{} (handle {})", h.holder, h.id));
        let known = CacheStateInfo { cache, holder, mirroring: false, held_records: 0, held_bytes: 0 };
        if known.cache.is_none() {
            return self.reply(reply, Ok(Response::VolumeCacheState(known)));
        }
        self.push_effect(Effect::Mirror { volume, op: MirrorOp::Status { known }, reply });
    }

    /// The volume and cache setting of `handle`, if `session` holds it
    /// exclusively, it is not being released, and its volume is cached.
    fn mirror_holder(&self, session: SessionId, handle: HandleId) -> Result<(VolumeId, VolumeCache), ControlError> {
        let h = self
            .handles
            .get(handle.0)
            .filter(|h| h.held_by(session))
            .ok_or_else(|| err(ErrorCode::HandleBroken, format!("handle {handle} is not held on this session")))?;
        if self.removing().contains(&h.id) || self.revoked.contains(&h.id) {
            return Err(err(ErrorCode::HandleBroken, format!("handle {handle} is being released")));
        }
        if h.mode != OpenMode::Exclusive {
            let msg = format!("handle {handle} is open {}: only an exclusive holder caches writes", h.mode);
            return Err(err(ErrorCode::InvalidArgument, msg));
        }
        let volume = VolumeId(h.volume);
        let cache = self.meta.volume_cache(volume).ok_or_else(|| {
            err(ErrorCode::InvalidArgument, format!("volume {volume} has no cache (`sanvol volume cache` sets one)"))
        })?;
        Ok((volume, cache))
    }

    /// Whether an open (or setting change) of `volume` must replay its
    /// mirror first.
    pub(super) fn needs_replay(&self, volume: VolumeId) -> bool {
        self.meta.volume_cache(volume).is_some() && !self.mirror_replayed.contains(&volume)
    }

    /// Runs the replay of `volume`'s mirror, then `next`.
    pub(super) fn replay_then(&mut self, volume: VolumeId, next: AfterReplay) -> Step {
        Step::Job {
            job: Job::MirrorReplay { meta: self.meta.clone(), volume },
            busy: Some((volume, Busy::Resync)),
            then: AfterJob::MirrorReplayed { volume, next },
        }
    }

    pub(super) fn mirror_replayed(&mut self, volume: VolumeId, next: AfterReplay, outcome: JobOutcome) -> Step {
        self.release(volume);
        if outcome.result.is_ok() {
            self.mirror_replayed.insert(volume);
        }
        match (next, outcome.result) {
            (AfterReplay::Open { session, name, mode, reply, broken }, Ok(())) => {
                self.prepare_open_with(session, &name, mode, reply, broken, &[])
            }
            (AfterReplay::Open { reply, broken, name, .. }, Err(why)) => {
                for h in broken {
                    self.handles.restore(h);
                }
                let msg = format!(
                    "volume {name} cannot be opened yet: its cache mirror (writes its last holder acknowledged) \
                     must be on the devices first, and replaying it failed: {why}; retry"
                );
                Step::Done(Some((reply, Err(err(ErrorCode::Unavailable, msg)))))
            }
            (AfterReplay::Setting { session, request, reply }, Ok(())) => self.prepare_request(session, request, reply),
            (AfterReplay::Setting { reply, .. }, Err(why)) => {
                let msg = format!("replaying the volume's cache mirror failed: {why}; nothing was changed; retry");
                Step::Done(Some((reply, Err(err(ErrorCode::Unavailable, msg)))))
            }
            (AfterReplay::Reconfigure { name, change, reply, may_prezero }, Ok(())) => {
                self.prepare_reconfigure_with(&name, change, reply, may_prezero)
            }
            (AfterReplay::Reconfigure { name, reply, .. }, Err(why)) => {
                let msg = format!(
                    "volume {name}: its cache mirror (writes its last holder acknowledged) must be on the devices                      before a snapshot, and replaying it failed: {why}; nothing was changed; retry"
                );
                Step::Done(Some((reply, Err(err(ErrorCode::Unavailable, msg)))))
            }
            (AfterReplay::Recall { pending, excluded }, Ok(())) => self.recall_continue(volume, pending, excluded),
            (AfterReplay::Recall { pending, excluded }, Err(why)) => {
                let msg = format!(
                    "the volume's cache mirror (writes its excluded holder acknowledged) must be on the devices                      before the change, and replaying it failed: {why}; nothing was changed; retry"
                );
                self.finish_recall(volume, pending, excluded, Err(err(ErrorCode::Unavailable, msg)));
                Step::Done(None)
            }
        }
    }

    /// `sanvol volume cache NAME --size --mode`: only while the volume is
    /// closed, after its mirror (if any) was replayed.
    pub(super) fn prepare_volume_cache(&mut self, session: SessionId, request: Request, reply: ReplyId) -> Step {
        let Request::VolumeCache { name, size_bytes, mode } = &request else {
            unreachable!("called for VolumeCache requests")
        };
        let volume = match self.volume_by_name(name) {
            Ok(v) => v.id,
            Err(e) => return Step::Done(Some((reply, Err(e)))),
        };
        let open = self.meta.handles.iter().any(|h| h.volume == volume && matches!(h.state, HandleState::Active));
        if open {
            let msg = format!(
                "volume {name} is open: its cache setting changes only while it is closed (detach it everywhere, \
                 then retry)"
            );
            return Step::Done(Some((reply, Err(err(ErrorCode::Busy, msg)))));
        }
        let cache = mode.map(|mode| VolumeCache { volume, size_bytes: *size_bytes, mode });
        if self.meta.volume_cache(volume) == cache {
            return Step::Done(Some((reply, Ok(Response::Done))));
        }
        if self.needs_replay(volume) {
            return self.replay_then(volume, AfterReplay::Setting { session, request, reply });
        }
        let what = match cache {
            Some(c) => format!("volume {name}: cache {} of {} bytes", c.mode, c.size_bytes),
            None => format!("volume {name}: cache off"),
        };
        Step::Commit {
            changes: vec![MetaChange::VolumeCache { volume, cache }],
            then: AfterCommit::Reply { reply, what },
        }
    }
}

/// How the CLI names a cache mode (`--mode mirrored|off`).
pub fn parse_cache_mode(text: &str) -> Result<Option<CacheMode>, String> {
    match text {
        "mirrored" => Ok(Some(CacheMode::Mirrored)),
        "off" | "none" => Ok(None),
        other => Err(format!("unknown cache mode {other:?}: expected mirrored or off")),
    }
}
