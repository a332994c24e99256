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
//! stay out of the table and are committed as broken before the replay
//! writes (a server that dies mid-replay must not come back with them
//! active: their holders would resume over a half-done replay — found by
//! the simulator); the open is prepared again once the replay is done. A
//! recall that replays for an excluded holder records it as broken first
//! too.
//!
//! Which mirror is replayed, and when (format 11): each `MirrorOpen`
//! commits a new generation of the volume's mirror to the pool metadata
//! ([`CacheMirrorRecord`], `pending`), naming this server — after the
//! worker prepared that generation's file ([`Core::prepare_mirror_open`],
//! `crate::mirror::MirrorOp::Prepare`), so a committed generation always
//! has its file and a missing one was lost (with the file created after
//! the commit, a server that died in between left the volume unopenable:
//! simulator seeds 128124716596664, 123708996430583). A holder starts
//! mirroring afresh only once everything an earlier mirror acknowledged is
//! on the devices — or (protocol 15, `MirrorOpenStaged`) with every record
//! its log still holds, staged here first (`MirrorStage`, a file no replay
//! reads): the preparation makes the staged copy the generation's file,
//! if it is whole. Either way only the newest generation's file can hold
//! writes the devices lack — or the next one's, prepared here for a commit
//! that did not happen, which then holds them. An open replays only while
//! the record is pending, and only a file of the recorded generation (or
//! of the next, prepared here); once replayed, "not pending" is committed
//! before the open goes on (a crash in between replays again: nobody
//! wrote since). A clean
//! close commits "not pending" with the handle's removal (the holder
//! destaged everything first). So a stale file — left on a server that was
//! active before a handoff or takeover — is never replayed over newer
//! writes, and a record naming another server's file refuses the open
//! with that server's name instead of opening without its writes
//! (`sanvol volume cache --forget-mirror` gives them up when both copies
//! are lost for good). Setting a cache records generation 0, "not
//! pending". A volume cached under format 10 has no record yet: its first
//! open replays whatever file this server has, as format 10 did, and
//! records "not pending".
//!
//! Snapshots of cached volumes: the holder destages its cache before it
//! confirms the recall, which leaves the mirror empty, and preserves the
//! chunks a snapshot needs before it logs (and mirrors) a write after it —
//! so a replay, which writes the live volume directly, never changes a
//! snapshot (`client_agent::cache`'s "Snapshots"). A holder that did not
//! confirm (excluded by its lease: dead or cut off) destaged nothing, so
//! the mirror is replayed before the change is committed — also when its
//! expiry released it while the recall waited, leaving the recall nobody
//! to exclude; a snapshot of a volume nobody holds replays it first too.
//! The setting changes only while the volume is closed.

use volume_format::control::messages::{
    CacheStateInfo, ControlError, ErrorCode, HolderCacheReport, OpenMode, RecordedMirror, ReportedCache, Request,
    Response,
};
use volume_format::metadata::{CacheMirrorRecord, CacheMode, HandleState, MetaChange, VolumeCache};
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
        // An open commits the mirror's new generation first: queued.
        let handle = match &request {
            Request::MirrorAppend { handle, .. }
            | Request::MirrorRelease { handle, .. }
            | Request::MirrorStage { handle, .. } => *handle,
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
            Request::MirrorAppend { records, .. } => {
                if let Some(msg) = crate::mirror::append_size_error(&records) {
                    self.reply(reply, Err(err(ErrorCode::InvalidArgument, msg)));
                    return Ok(());
                }
                MirrorOp::Append { records }
            }
            Request::MirrorRelease { upto_seq, .. } => MirrorOp::Release { upto_seq },
            Request::MirrorStage { copy, records, .. } => {
                if let Some(msg) = crate::mirror::append_size_error(&records) {
                    self.reply(reply, Err(err(ErrorCode::InvalidArgument, msg)));
                    return Ok(());
                }
                MirrorOp::Stage { copy, size_bytes: cache.size_bytes, records }
            }
            _ => unreachable!("matched above"),
        };
        self.push_effect(Effect::Mirror { volume, op, reply: Some(reply) });
        Ok(())
    }

    /// Who may send appends and releases by the lane
    /// ([`crate::mirror::lane`]): every session holding a handle that
    /// [`Core::mirror_holder`] accepts; nobody while this server is not
    /// active or in its grace period (the owner's path refuses then).
    pub fn mirror_holders(&mut self) -> crate::mirror::lane::Holders {
        let mut holders = crate::mirror::lane::Holders::new();
        if self.not_active.is_some() || self.grace_left_ms().is_some() {
            return holders;
        }
        // The owner's rule, asked of the handles of cached volumes only.
        for h in self.handles.all().filter(|h| self.meta.volume_cache(VolumeId(h.volume)).is_some()) {
            for session in h.sessions() {
                if let Ok((volume, _)) = self.mirror_holder(session, HandleId(h.id)) {
                    holders.insert((session, h.id), volume);
                }
            }
        }
        holders
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
        self.push_effect(Effect::Mirror { volume, op: MirrorOp::Status { known }, reply: Some(reply) });
    }

    /// `CacheReport`: keeps the holder's view of its cache (why it writes
    /// through, its destage rate: what only the holder knows) for `sanvol
    /// volume show`. Only from the session holding `handle` exclusively on
    /// a cached volume; kept in memory only — after a restart or takeover
    /// the holder's next report (every few seconds) fills it again. A
    /// report of a handle no longer in the table is dropped with the next
    /// report of any holder, and never shown (the show asks by the
    /// volume's holder now).
    pub(super) fn cache_report(
        &mut self,
        session: SessionId,
        handle: HandleId,
        report: &HolderCacheReport,
    ) -> Result<Response, ControlError> {
        let h = self
            .handles
            .get(handle.0)
            .filter(|h| h.held_by(session))
            .ok_or_else(|| err(ErrorCode::HandleBroken, format!("handle {handle} is not held on this session")))?;
        if h.mode != OpenMode::Exclusive || self.meta.volume_cache(VolumeId(h.volume)).is_none() {
            let msg = format!("handle {handle} is not the exclusive holder of a cached volume");
            return Err(err(ErrorCode::InvalidArgument, msg));
        }
        let handles = &self.handles;
        self.cache_reports.retain(|id, _| handles.get(*id).is_some());
        self.cache_reports.insert(handle.0, (report.clone(), self.now.mono_ms));
        Ok(Response::Done)
    }

    /// `VolumeCacheMirror`: the pool's record of volume `name`'s cache
    /// mirror (where a replay after its holder's death reads it from).
    pub(super) fn volume_cache_mirror(&self, name: &str) -> Result<Response, ControlError> {
        let volume = self.volume_by_name(name)?.id;
        // Generation 0 is what setting a cache records: never mirrored.
        let recorded = self.meta.cache_mirror(volume).filter(|m| m.generation > 0).map(|m| RecordedMirror {
            server: m.server.clone(),
            generation: m.generation,
            pending: m.pending,
        });
        Ok(Response::CacheMirrorRecorded(recorded))
    }

    /// `VolumeCacheReport`: the last report of volume `name`'s exclusive
    /// holder, if it sent one.
    pub(super) fn volume_cache_report(&self, name: &str) -> Result<Response, ControlError> {
        let volume = self.volume_by_name(name)?.id;
        let reported = self.handles.on_volume(volume.0).find(|h| h.mode == OpenMode::Exclusive).and_then(|h| {
            let (report, at_ms) = self.cache_reports.get(&h.id)?;
            Some(ReportedCache {
                holder: format!("{} (handle {})", h.holder, h.id),
                report: report.clone(),
                age_ms: self.now.mono_ms.saturating_sub(*at_ms),
            })
        });
        Ok(Response::CacheReported(reported))
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

    /// `MirrorOpen` (or, with `staged`, `MirrorOpenStaged`: the attempt
    /// and its record count) of the holder of `handle`: the worker first
    /// prepares the file of the volume's next mirror generation — empty,
    /// or the staged copy if it is whole — and only then is the generation
    /// committed (pending, at this server), so a committed generation
    /// always has its file ([`crate::mirror::MirrorOp::Prepare`]).
    pub(super) fn prepare_mirror_open(
        &mut self,
        session: SessionId,
        handle: HandleId,
        staged: Option<(u64, u64)>,
        reply: ReplyId,
    ) -> Step {
        let (volume, cache) = match self.mirror_holder(session, handle) {
            Ok(x) => x,
            Err(e) => return Step::Done(Some((reply, Err(e)))),
        };
        let generation = self.meta.cache_mirror(volume).map_or(1, |m| m.generation + 1);
        Step::Job {
            job: Job::MirrorPrepare { volume, cache, generation, staged },
            busy: None,
            then: AfterJob::MirrorPrepared { session, handle, volume, generation, reply },
        }
    }

    /// The file of `volume`'s mirror `generation` is prepared (or why
    /// not): commits the generation, if the holder and the record are
    /// still as they were when it was prepared.
    pub(super) fn mirror_prepared(
        &mut self,
        session: SessionId,
        handle: HandleId,
        volume: VolumeId,
        generation: u64,
        reply: ReplyId,
        outcome: JobOutcome,
    ) -> Step {
        if let Err(why) = outcome.result {
            return Step::Done(Some((reply, Err(err(ErrorCode::Unavailable, why)))));
        }
        let cache = match self.mirror_holder(session, handle) {
            Ok((_, cache)) => cache,
            Err(e) => return Step::Done(Some((reply, Err(e)))),
        };
        let now = self.meta.cache_mirror(volume).map_or(1, |m| m.generation + 1);
        if now != generation {
            let msg = format!(
                "volume {volume}: its mirror record changed while generation {generation} was prepared (the next is \
                 {now} now); start mirroring again"
            );
            return Step::Done(Some((reply, Err(err(ErrorCode::Unavailable, msg)))));
        }
        let record = CacheMirrorRecord { volume, generation, server: self.own_name(), pending: true };
        Step::Commit {
            changes: vec![MetaChange::CacheMirror(record)],
            then: AfterCommit::MirrorOpened { volume, cache, generation, reply },
        }
    }

    /// The commit of a new mirror generation is durable: the worker
    /// mirrors into the file prepared for it (and answers the holder).
    pub(super) fn finish_mirror_open(
        &mut self,
        volume: VolumeId,
        cache: VolumeCache,
        generation: u64,
        reply: ReplyId,
        result: Result<(), ControlError>,
    ) {
        match result {
            Ok(()) => self.push_effect(Effect::Mirror {
                volume,
                op: MirrorOp::Open { cache, generation },
                reply: Some(reply),
            }),
            Err(e) => self.reply(reply, Err(e)),
        }
    }

    /// This server's name, as the pool's server listing has it (for the
    /// mirror records; empty when it has none).
    fn own_name(&self) -> String {
        self.servers.iter().find(|s| s.role == "active").map(|s| s.name.clone()).unwrap_or_default()
    }

    /// The change that records "`volume`'s mirror holds nothing the
    /// devices lack", when that is not recorded yet.
    pub(super) fn mirror_clear(&self, volume: VolumeId) -> Option<MetaChange> {
        match self.meta.cache_mirror(volume) {
            Some(m) if !m.pending => None,
            Some(m) => Some(MetaChange::CacheMirror(CacheMirrorRecord { pending: false, ..m.clone() })),
            // A pool of format 10: recorded once its file was replayed.
            None if self.meta.volume_cache(volume).is_some() => Some(MetaChange::CacheMirror(CacheMirrorRecord {
                volume,
                generation: 0,
                server: self.own_name(),
                pending: false,
            })),
            None => None,
        }
    }

    /// Whether an open (or setting change) of `volume` must replay its
    /// mirror first: it is cached, and its mirror record is pending (or, in
    /// a pool of format 10, absent).
    pub(super) fn needs_replay(&self, volume: VolumeId) -> bool {
        self.meta.volume_cache(volume).is_some() && self.meta.cache_mirror(volume).is_none_or(|m| m.pending)
    }

    /// Runs the replay of `volume`'s mirror, then `next`.
    pub(super) fn replay_then(&mut self, volume: VolumeId, next: AfterReplay) -> Step {
        let expected = self.meta.cache_mirror(volume).cloned();
        let me = self.own_name();
        let named_here = expected.as_ref().is_some_and(|m| m.server == me);
        // Recorded at another server that stands by: its file is fetched.
        let source = expected.as_ref().filter(|_| !named_here).and_then(|m| {
            let other = self.servers.iter().find(|s| s.name == m.server && s.role != "active")?;
            Some(crate::mirror::fetch::MirrorSource {
                server: format!("{} (host id {})", other.name, other.host_id),
                addrs: other.addrs.clone(),
                key: self.key.clone(),
                me: me.clone(),
            })
        });
        Step::Job {
            job: Job::MirrorReplay { meta: self.meta.clone(), volume, expected, named_here, source },
            busy: Some((volume, Busy::Resync)),
            then: AfterJob::MirrorReplayed { volume, next, cleared: false },
        }
    }

    /// The replay job reported (`cleared: false`), or the commit of "not
    /// pending" after it did (`cleared: true`): that commit comes first,
    /// then `next` goes on.
    pub(super) fn mirror_replayed(
        &mut self,
        volume: VolumeId,
        next: AfterReplay,
        cleared: bool,
        outcome: JobOutcome,
    ) -> Step {
        if let Err(why) = &outcome.result {
            // The caller hears it too, but it may have stopped waiting.
            tracing::warn!(volume = %volume, "the cache mirror's replay failed: {why}");
        }
        if !cleared {
            self.release(volume);
        } else if outcome.result.is_ok() {
            // Recorded: the replayed file goes (it is as large as the cache).
            // Queued before any later `MirrorOpen` of the volume can be.
            self.push_effect(Effect::Mirror { volume, op: MirrorOp::Remove, reply: None });
        }
        if outcome.result.is_ok() && !cleared {
            if let Some(clear) = self.mirror_clear(volume) {
                return Step::Commit {
                    changes: vec![clear],
                    then: AfterCommit::MirrorCleared { volume, next: Box::new(next) },
                };
            }
        }
        match (next, outcome.result) {
            (AfterReplay::Open { session, name, mode, reply, broken }, Ok(())) => {
                self.prepare_open_with(session, &name, mode, reply, broken, &[])
            }
            (AfterReplay::Open { reply, broken, name, .. }, Err(why)) => {
                // Recorded as broken before the replay: they stay broken.
                for h in broken {
                    self.released(
                        &h,
                        format!("volume {name} was opened by another host after this handle's lease ran out"),
                    );
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
                    "volume {name}: its cache mirror (writes its last holder acknowledged) must be on the devices before a snapshot, and replaying it failed: {why}; nothing was changed; retry"
                );
                Step::Done(Some((reply, Err(err(ErrorCode::Unavailable, msg)))))
            }
            (AfterReplay::Recall { pending, excluded }, Ok(())) => self.recall_continue(volume, pending, excluded),
            (AfterReplay::Recall { pending, excluded }, Err(why)) => {
                let msg = format!(
                    "the volume's cache mirror (writes its excluded holder acknowledged) must be on the devices before the change, and replaying it failed: {why}; nothing was changed; retry"
                );
                // Recorded as broken before the replay: they go now (the
                // others resume with the old layout).
                for id in &excluded {
                    if let Some(h) = self.handles.remove(*id) {
                        self.released(&h, format!("excluded from a reconfiguration that then failed: {why}"));
                    }
                }
                self.finish_recall(volume, pending, Vec::new(), Err(err(ErrorCode::Unavailable, msg)));
                Step::Done(None)
            }
        }
    }

    /// The handles an open broke are on record as broken (or their commit
    /// failed): replay the mirror, or give the open up and put them back.
    pub(super) fn broken_recorded(&mut self, volume: VolumeId, next: AfterReplay, outcome: JobOutcome) -> Step {
        match (next, outcome.result) {
            (next, Ok(())) => self.replay_then(volume, next),
            (AfterReplay::Open { reply, broken, name, .. }, Err(why)) => {
                self.restore_broken(broken);
                let msg = format!(
                    "volume {name} cannot be opened yet: recording the handles it breaks (before its cache mirror \
                     is replayed) failed: {why}; retry"
                );
                Step::Done(Some((reply, Err(err(ErrorCode::Unavailable, msg)))))
            }
            (AfterReplay::Recall { pending, excluded }, Err(why)) => {
                let msg = format!(
                    "recording the holders the change excludes (before the volume's cache mirror is replayed) \
                     failed: {why}; nothing was changed; retry"
                );
                self.finish_recall(volume, pending, excluded, Err(err(ErrorCode::Unavailable, msg)));
                Step::Done(None)
            }
            (next, Err(why)) => {
                tracing::warn!(volume = %volume, "recording broken handles before a replay failed: {why}");
                self.replay_then(volume, next)
            }
        }
    }

    /// `sanvol volume cache NAME --forget-mirror`: records "nothing
    /// pending" for the volume's mirror without replaying it (the writes it
    /// held are given up). Only while the volume is closed.
    pub(super) fn prepare_mirror_forget(&mut self, name: &str, reply: ReplyId) -> Step {
        let volume = match self.volume_by_name(name) {
            Ok(v) => v.id,
            Err(e) => return Step::Done(Some((reply, Err(e)))),
        };
        // A holder that may still write or resume (an open could not break
        // its handle yet) keeps its mirror; a dead one's handle goes with
        // the next open, as ever.
        let (now, max) = (self.now.mono_ms, self.handles.device_request_max_ms);
        if let Some(h) = self.handles.on_volume(volume.0).find(|h| now < h.breakable_at_ms(max)) {
            let msg = format!(
                "volume {name} is held by {} (handle {}), alive or within its lease and durable time: a holder \
                 keeps its cache mirror; forgetting it is only for a volume whose holder and mirror are lost; retry \
                 in {} ms if the holder is gone",
                h.holder,
                h.id,
                h.breakable_at_ms(max) - now
            );
            return Step::Done(Some((reply, Err(err(ErrorCode::Busy, msg)))));
        }
        match self.mirror_clear(volume) {
            None => Step::Done(Some((reply, Ok(Response::Done)))),
            Some(change) => {
                let what = match self.meta.cache_mirror(volume) {
                    Some(m) => format!(
                        "volume {name}: the writes its cache mirror (generation {} at {}) may hold are given up",
                        m.generation,
                        if m.server.is_empty() { "an unnamed server" } else { &m.server }
                    ),
                    None => format!("volume {name}: the writes its cache mirror may hold are given up"),
                };
                tracing::warn!("{what}");
                Step::Commit { changes: vec![change], then: AfterCommit::Reply { reply, what } }
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
        let mut changes = vec![MetaChange::VolumeCache { volume, cache }];
        if cache.is_some() && self.meta.cache_mirror(volume).is_none() {
            // Nothing mirrored yet: recorded, so the first open need not
            // look for a file.
            let record = CacheMirrorRecord { volume, generation: 0, server: self.own_name(), pending: false };
            changes.push(MetaChange::CacheMirror(record));
        }
        Step::Commit { changes, then: AfterCommit::Reply { reply, what } }
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
