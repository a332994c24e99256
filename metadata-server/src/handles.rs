//! Handles and leases, as a plain state machine with injected time.
//!
//! No sockets, no clocks: every method takes `now_ms` (milliseconds on a
//! monotonic clock the caller owns), so every rule below is unit-tested with
//! made-up times, including the races.
//!
//! Rules:
//! - A handle lives under its session's lease. Any request on the session
//!   renews the lease to `now + lease_ms`.
//! - Modes conflict as: `Exclusive` with anything; `SharedWrite` and
//!   `ReadOnly` with `Exclusive` only.
//! - An agent stops I/O by itself when it cannot renew in time, so a handle
//!   whose lease has run out, plus its durable grace, can no longer do I/O:
//!   such a handle no longer conflicts, and a conflicting open *breaks* it.
//! - But a write its agent sent just before the lease ran out may still be
//!   on its way, or queued inside a plain NBD device server: nothing about a
//!   holder is acted on before lease + the longest device request
//!   ([`HandleTable::device_request_max_ms`], the fencing timing rules of
//!   `volume_format::fencing`) — no break, no release, no exclusion from a
//!   recall — so that write has landed or failed before anyone else writes.
//! - Reconfiguration recalls every handle of a volume; the new layout is
//!   committed once each has confirmed, or its lease ran out (it is then
//!   excluded: it cannot be doing I/O any more).
//! - Durable handles (`durable_ms > 0`) outlive their session: losing the
//!   connection only detaches it. Nothing but a conflicting open after
//!   lease + durable time removes them, so a late [`HandleTable::resume`]
//!   still finds the handle "unchanged" if nobody else wanted the volume.
//!   Whichever of a resume and a conflicting open the owner applies first
//!   wins; at `breakable_at_ms` exactly the open wins (it is the first
//!   instant the handle may be broken).
//! - A handle may be held by several sessions at once (a *duplicate handle*
//!   on a second control channel): any of them renews it, any may close it.
//! - A handover adds a second handle with the same rights next to the
//!   holder's ([`HandleTable::open_alongside`]), so the volume is never
//!   unheld and a third open conflicts with both.
//! - After a server restart, a [`Grace`] period serves only resumes until
//!   every restored handle was resumed or closed, or the period ran out.

use std::collections::{BTreeMap, BTreeSet};

use volume_format::control::messages::OpenMode;

/// Identifies an authenticated control session.
pub type SessionId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub id: u64,
    pub volume: u64,
    pub mode: OpenMode,
    /// The session events go to; 0 when no session holds it (its agent lost
    /// the connection, or it was restored after a server restart).
    pub session: SessionId,
    /// Further sessions holding the same handle (duplicate handles).
    pub duplicates: BTreeSet<SessionId>,
    /// Who holds it, for messages ("host-a").
    pub holder: String,
    pub opened_at_ms: u64,
    /// The handle may do I/O until this time unless renewed.
    pub lease_until_ms: u64,
    /// Extra time after the lease before a conflicting open may break it
    /// (the durable timeout); 0 for plain handles.
    pub durable_ms: u64,
}

impl Handle {
    /// Whether `session` holds this handle (as its main or a duplicate session).
    pub fn held_by(&self, session: SessionId) -> bool {
        session != 0 && (self.session == session || self.duplicates.contains(&session))
    }

    /// Every session holding it.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        std::iter::once(self.session).filter(|s| *s != 0).chain(self.duplicates.iter().copied())
    }

    /// The instant after which the handle can be broken by a conflicting
    /// open: lease + its durable time, and never before nothing its holder
    /// sent can land any more ([`Handle::quiet_at_ms`]).
    pub fn breakable_at_ms(&self, device_request_max_ms: u64) -> u64 {
        self.lease_until_ms.saturating_add(self.durable_ms.max(device_request_max_ms))
    }

    /// The instant after which nothing the holder sent to a device can still
    /// land: its lease (it sends nothing after) + the longest device request.
    pub fn quiet_at_ms(&self, device_request_max_ms: u64) -> u64 {
        self.lease_until_ms.saturating_add(device_request_max_ms)
    }
}

/// Why an open was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenRefused {
    /// Another live handle conflicts with the requested mode.
    Conflict { holder: String, mode: OpenMode, handle: u64, expires_at_ms: u64 },
}

/// What an open did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub handle: Handle,
    /// Handles that were expired and broken to make room.
    pub broken: Vec<Handle>,
}

/// A reconfiguration in progress on one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recall {
    pub volume: u64,
    pub generation: u64,
    /// Handles that have not confirmed yet.
    pub waiting: BTreeSet<u64>,
}

/// What a recall confirmation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecallAck {
    /// The handle confirmed the pending recall.
    Counted,
    /// Nothing pending for that generation (a retried or late confirmation).
    Stale,
}

/// State of a recall after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecallState {
    /// Still waiting for these handles; the earliest lease among them runs
    /// out at `deadline_ms` (re-check then).
    Waiting { handles: Vec<u64>, deadline_ms: u64 },
    /// Every holder confirmed or was excluded; commit now.
    Ready { excluded: Vec<u64> },
}

#[derive(Debug, Default)]
pub struct HandleTable {
    handles: BTreeMap<u64, Handle>,
    recalls: BTreeMap<u64, Recall>,
    next_id: u64,
    /// The longest a holder's device request may take: how long past a
    /// lease its writes may still land (0 in a new table; the server sets
    /// its `device_request_max_ms`).
    pub device_request_max_ms: u64,
}

pub fn modes_conflict(a: OpenMode, b: OpenMode) -> bool {
    matches!((a, b), (OpenMode::Exclusive, _) | (_, OpenMode::Exclusive))
}

impl HandleTable {
    pub fn new() -> HandleTable {
        HandleTable { next_id: 1, ..Default::default() }
    }

    /// Makes the next opened handle get `next_id` (or later). Why: handle
    /// ids are pool-wide and never reused, so the server keeps them in step
    /// with the pool metadata's `next_ids.handle`.
    pub fn set_next_id(&mut self, next_id: u64) {
        self.next_id = self.next_id.max(next_id);
    }

    /// Puts back a handle known from elsewhere: one rebuilt from the pool
    /// metadata after a restart, or one removed by an open whose commit
    /// failed.
    pub fn restore(&mut self, handle: Handle) {
        self.next_id = self.next_id.max(handle.id + 1);
        self.handles.insert(handle.id, handle);
    }

    pub fn get(&self, id: u64) -> Option<&Handle> {
        self.handles.get(&id)
    }

    pub fn all(&self) -> impl Iterator<Item = &Handle> {
        self.handles.values()
    }

    pub fn on_volume(&self, volume: u64) -> impl Iterator<Item = &Handle> {
        self.handles.values().filter(move |h| h.volume == volume)
    }

    pub fn of_session(&self, session: SessionId) -> impl Iterator<Item = &Handle> {
        self.handles.values().filter(move |h| h.held_by(session))
    }

    /// A session ended: its handles stay (durable ones until broken, plain
    /// ones until their lease runs out) but no longer belong to it.
    pub fn detach_session(&mut self, session: SessionId) {
        for h in self.handles.values_mut() {
            h.duplicates.remove(&session);
            if h.session == session {
                h.session = h.duplicates.pop_first().unwrap_or(0);
            }
        }
    }

    /// Re-attaches `session` to handle `id` and renews its lease. The caller
    /// has checked the resume key. A handle already held by a live session
    /// gets `session` as a duplicate.
    pub fn resume(&mut self, id: u64, session: SessionId, now_ms: u64, lease_ms: u64) -> Option<&Handle> {
        let h = self.handles.get_mut(&id)?;
        if h.session == 0 {
            h.session = session;
        } else if h.session != session {
            h.duplicates.insert(session);
        }
        h.lease_until_ms = h.lease_until_ms.max(now_ms.saturating_add(lease_ms));
        Some(h)
    }

    /// Opens a second handle on `source`'s volume with its mode, for
    /// `session` (a handover). No conflict check against `source` — that is
    /// the point — but none is needed against others either: they already
    /// coexist with `source`, whose mode this one copies.
    pub fn open_alongside(
        &mut self,
        source: u64,
        session: SessionId,
        holder: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Option<Handle> {
        let src = self.handles.get(&source)?.clone();
        let id = self.next_id;
        self.next_id += 1;
        let handle = Handle {
            id,
            volume: src.volume,
            mode: src.mode,
            session,
            duplicates: BTreeSet::new(),
            holder: holder.to_string(),
            opened_at_ms: now_ms,
            lease_until_ms: now_ms.saturating_add(lease_ms),
            durable_ms: src.durable_ms,
        };
        self.handles.insert(id, handle.clone());
        Some(handle)
    }

    /// Opens `volume` in `mode`. Live conflicting handles refuse the open;
    /// expired ones (past lease + durable time) are broken.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &mut self,
        volume: u64,
        mode: OpenMode,
        session: SessionId,
        holder: &str,
        now_ms: u64,
        lease_ms: u64,
        durable_ms: u64,
    ) -> Result<Opened, OpenRefused> {
        let conflicting: Vec<&Handle> =
            self.handles.values().filter(|h| h.volume == volume && modes_conflict(h.mode, mode)).collect();
        let m = self.device_request_max_ms;
        if let Some(live) = conflicting.iter().find(|h| now_ms < h.breakable_at_ms(m)) {
            return Err(OpenRefused::Conflict {
                holder: live.holder.clone(),
                mode: live.mode,
                handle: live.id,
                expires_at_ms: live.breakable_at_ms(m),
            });
        }
        let broken_ids: Vec<u64> = conflicting.iter().map(|h| h.id).collect();
        let broken: Vec<Handle> = broken_ids.iter().filter_map(|id| self.remove(*id)).collect();
        let id = self.next_id;
        self.next_id += 1;
        let handle = Handle {
            id,
            volume,
            mode,
            session,
            duplicates: BTreeSet::new(),
            holder: holder.to_string(),
            opened_at_ms: now_ms,
            lease_until_ms: now_ms.saturating_add(lease_ms),
            durable_ms,
        };
        self.handles.insert(id, handle.clone());
        Ok(Opened { handle, broken })
    }

    /// Renews every handle of `session` until `now + lease_ms`.
    pub fn renew(&mut self, session: SessionId, now_ms: u64, lease_ms: u64) {
        self.renew_except(session, now_ms, lease_ms, &[]);
    }

    /// Renews every handle of `session` but those in `removing` (a commit
    /// in flight releases them: a renewal must not revive them).
    pub fn renew_except(&mut self, session: SessionId, now_ms: u64, lease_ms: u64, removing: &[u64]) {
        for h in self.handles.values_mut().filter(|h| h.held_by(session) && !removing.contains(&h.id)) {
            h.lease_until_ms = h.lease_until_ms.max(now_ms.saturating_add(lease_ms));
        }
    }

    /// Removes a handle (close, or broken), withdrawing it from any recall.
    pub fn remove(&mut self, id: u64) -> Option<Handle> {
        let h = self.handles.remove(&id)?;
        for r in self.recalls.values_mut() {
            r.waiting.remove(&id);
        }
        Some(h)
    }

    /// Closes `id` if `session` owns it.
    pub fn close(&mut self, id: u64, session: SessionId) -> Option<Handle> {
        match self.handles.get(&id) {
            Some(h) if h.held_by(session) => self.remove(id),
            _ => None,
        }
    }

    /// Plain (non-durable) handles whose lease ran out by `now_ms`, and the
    /// longest device request after it: they are released. Durable handles
    /// stay until a conflicting open breaks them.
    pub fn expired(&self, now_ms: u64) -> Vec<u64> {
        let m = self.device_request_max_ms;
        self.handles.values().filter(|h| h.durable_ms == 0 && now_ms >= h.breakable_at_ms(m)).map(|h| h.id).collect()
    }

    /// Starts a recall of `volume` for a new layout `generation`: every
    /// current handle must confirm (or be excluded by its lease).
    pub fn start_recall(&mut self, volume: u64, generation: u64) -> Result<Recall, String> {
        if let Some(r) = self.recalls.get(&volume) {
            return Err(format!("volume is already being reconfigured (generation {})", r.generation));
        }
        let waiting = self.on_volume(volume).map(|h| h.id).collect();
        let recall = Recall { volume, generation, waiting };
        self.recalls.insert(volume, recall.clone());
        Ok(recall)
    }

    pub fn recall_of(&self, volume: u64) -> Option<&Recall> {
        self.recalls.get(&volume)
    }

    /// Records that `handle` (owned by `session`) drained for `generation`.
    ///
    /// Idempotent, so an agent may retry a confirmation until it has an
    /// answer (a connection can break between the confirmation and its
    /// reply): a confirmation of a recall already finished, or of an older
    /// generation than the one pending, is acknowledged as [`RecallAck::Stale`]
    /// and counts for nothing.
    pub fn recall_done(&mut self, handle: u64, session: SessionId, generation: u64) -> Result<RecallAck, String> {
        let h = self.handles.get(&handle).ok_or_else(|| format!("no handle {handle}"))?;
        if !h.held_by(session) {
            return Err(format!("handle {handle} is not held by this session"));
        }
        let Some(r) = self.recalls.get_mut(&h.volume) else { return Ok(RecallAck::Stale) };
        if generation < r.generation {
            return Ok(RecallAck::Stale);
        }
        if generation > r.generation {
            return Err(format!("recall generation {generation} was never asked for (pending: {})", r.generation));
        }
        r.waiting.remove(&handle);
        Ok(RecallAck::Counted)
    }

    /// The generation of the recall `handle` has not confirmed yet, if any:
    /// what a session that resumes the handle must be told again.
    pub fn pending_recall(&self, handle: u64) -> Option<u64> {
        let h = self.handles.get(&handle)?;
        let r = self.recalls.get(&h.volume)?;
        r.waiting.contains(&handle).then_some(r.generation)
    }

    /// The generation of the recall in progress on `handle`'s volume, if
    /// any, whether `handle` confirmed it or not.
    pub fn recall_in_progress(&self, handle: u64) -> Option<u64> {
        let h = self.handles.get(&handle)?;
        self.recalls.get(&h.volume).map(|r| r.generation)
    }

    /// Where the recall of `volume` stands at `now_ms`. Handles whose lease
    /// ran out, and the longest device request after it, are excluded
    /// (their agent stopped I/O by itself, and what it sent has landed).
    pub fn recall_state(&self, volume: u64, now_ms: u64) -> Option<RecallState> {
        let r = self.recalls.get(&volume)?;
        let mut excluded = Vec::new();
        let mut live = Vec::new();
        let mut deadline_ms = u64::MAX;
        for id in &r.waiting {
            match self.handles.get(id) {
                Some(h) if now_ms < h.quiet_at_ms(self.device_request_max_ms) => {
                    live.push(*id);
                    deadline_ms = deadline_ms.min(h.quiet_at_ms(self.device_request_max_ms));
                }
                _ => excluded.push(*id),
            }
        }
        Some(if live.is_empty() {
            RecallState::Ready { excluded }
        } else {
            RecallState::Waiting { handles: live, deadline_ms }
        })
    }

    /// Ends the recall of `volume` (committed or abandoned).
    pub fn finish_recall(&mut self, volume: u64) -> Option<Recall> {
        self.recalls.remove(&volume)
    }
}

/// The period after a server restart in which only resumes are served.
///
/// Why: agents that held handles before the restart are still doing I/O
/// under their leases; until they had the chance to resume, a new open could
/// be handed a volume one of them still writes to, and an admin change could
/// move extents under them. The period ends at `until_ms`, or earlier once
/// every restored handle has been resumed or closed (nothing left to
/// protect) — so a restart without open handles has no grace at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grace {
    pub until_ms: u64,
    /// Restored handles not resumed or closed yet.
    pub waiting: BTreeSet<u64>,
}

impl Grace {
    pub fn new(restored: impl IntoIterator<Item = u64>, now_ms: u64, grace_ms: u64) -> Grace {
        Grace { until_ms: now_ms.saturating_add(grace_ms), waiting: restored.into_iter().collect() }
    }

    /// Milliseconds of grace left at `now_ms`, or `None` when it is over.
    pub fn left_ms(&self, now_ms: u64) -> Option<u64> {
        (!self.waiting.is_empty() && now_ms < self.until_ms).then(|| self.until_ms - now_ms)
    }

    /// Handle `id` was resumed or closed.
    pub fn settled(&mut self, id: u64) {
        self.waiting.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OpenMode::*;

    const LEASE: u64 = 10_000;

    #[test]
    fn exclusive_conflicts_with_everything_shared_with_exclusive_only() {
        let mut t = HandleTable::new();
        t.open(1, SharedWrite, 1, "a", 0, LEASE, 0).unwrap();
        t.open(1, ReadOnly, 2, "b", 0, LEASE, 0).unwrap();
        t.open(1, SharedWrite, 3, "c", 0, LEASE, 0).unwrap();
        let err = t.open(1, Exclusive, 4, "d", 0, LEASE, 0).unwrap_err();
        assert!(matches!(err, OpenRefused::Conflict { ref holder, .. } if holder == "a"));
        // Another volume is independent.
        t.open(2, Exclusive, 4, "d", 0, LEASE, 0).unwrap();
        let err = t.open(2, ReadOnly, 1, "a", 0, LEASE, 0).unwrap_err();
        assert_eq!(err, OpenRefused::Conflict { holder: "d".into(), mode: Exclusive, handle: 4, expires_at_ms: LEASE });
    }

    #[test]
    fn expired_handle_is_broken_by_a_conflicting_open_only_after_lease_plus_durable_time() {
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 1, "a", 0, LEASE, 5_000).unwrap().handle;
        assert!(t.open(1, Exclusive, 2, "b", LEASE, LEASE, 0).is_err(), "inside the durable window");
        assert!(t.open(1, Exclusive, 2, "b", LEASE + 4_999, LEASE, 0).is_err());
        let opened = t.open(1, Exclusive, 2, "b", LEASE + 5_000, LEASE, 0).unwrap();
        assert_eq!(opened.broken, vec![h]);
        assert!(t.get(1).is_none());
    }

    #[test]
    fn renewal_keeps_a_handle_alive() {
        let mut t = HandleTable::new();
        t.open(1, Exclusive, 7, "a", 0, LEASE, 0).unwrap();
        t.renew(7, 9_000, LEASE);
        assert!(t.open(1, Exclusive, 8, "b", 15_000, LEASE, 0).is_err());
        assert_eq!(t.expired(18_999), Vec::<u64>::new());
        assert_eq!(t.expired(19_000), vec![1]);
        // Renewing another session does nothing for this one.
        t.renew(8, 19_000, LEASE);
        assert!(t.open(1, Exclusive, 8, "b", 19_000, LEASE, 0).is_ok());
    }

    #[test]
    fn close_needs_the_owning_session() {
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 7, "a", 0, LEASE, 0).unwrap().handle;
        assert!(t.close(h.id, 8).is_none());
        assert!(t.close(h.id, 7).is_some());
        assert!(t.open(1, Exclusive, 8, "b", 1, LEASE, 0).is_ok());
    }

    #[test]
    fn recall_completes_when_all_confirm() {
        let mut t = HandleTable::new();
        let a = t.open(1, SharedWrite, 1, "a", 0, LEASE, 0).unwrap().handle.id;
        let b = t.open(1, SharedWrite, 2, "b", 0, LEASE, 0).unwrap().handle.id;
        t.start_recall(1, 5).unwrap();
        assert!(t.start_recall(1, 6).is_err(), "one reconfiguration at a time");
        assert_eq!(t.recall_state(1, 10), Some(RecallState::Waiting { handles: vec![a, b], deadline_ms: LEASE }));
        assert!(t.recall_done(a, 2, 5).is_err(), "wrong session");
        assert_eq!(t.recall_done(a, 1, 4), Ok(RecallAck::Stale), "an older generation counts for nothing");
        assert!(t.recall_done(a, 1, 6).is_err(), "a generation never asked for");
        assert_eq!(t.pending_recall(a), Some(5));
        assert_eq!(t.recall_done(a, 1, 5), Ok(RecallAck::Counted));
        assert_eq!(t.pending_recall(a), None);
        assert_eq!(t.recall_done(a, 1, 5), Ok(RecallAck::Counted), "a retried confirmation is harmless");
        t.recall_done(b, 2, 5).unwrap();
        assert_eq!(t.recall_state(1, 10), Some(RecallState::Ready { excluded: vec![] }));
        t.finish_recall(1);
        assert_eq!(t.recall_state(1, 10), None);
    }

    #[test]
    fn recall_excludes_a_silent_holder_once_its_lease_runs_out() {
        let mut t = HandleTable::new();
        let a = t.open(1, SharedWrite, 1, "a", 0, LEASE, 0).unwrap().handle.id;
        let b = t.open(1, SharedWrite, 2, "b", 0, LEASE, 0).unwrap().handle.id;
        t.start_recall(1, 2).unwrap();
        t.recall_done(a, 1, 2).unwrap();
        t.renew(1, 5_000, LEASE); // a keeps renewing; b is silent
        assert!(matches!(t.recall_state(1, LEASE - 1), Some(RecallState::Waiting { .. })));
        assert_eq!(t.recall_state(1, LEASE), Some(RecallState::Ready { excluded: vec![b] }));
    }

    /// The fencing timing rules: nothing about a holder is acted on before
    /// its lease + the longest device request (a write it sent just before
    /// the lease ran out may still be queued in a device server).
    #[test]
    fn nothing_is_broken_released_or_excluded_before_lease_plus_the_longest_device_request() {
        const DEVICE_MAX: u64 = 3_000;
        let mut t = HandleTable::new();
        t.device_request_max_ms = DEVICE_MAX;
        // A plain handle: released, and breakable, only at lease + 3 s.
        let plain = t.open(1, Exclusive, 1, "a", 0, LEASE, 0).unwrap().handle.id;
        assert!(t.expired(LEASE).is_empty(), "its lease ran out, but its last writes may still land");
        assert!(matches!(
            t.open(1, Exclusive, 2, "b", LEASE + DEVICE_MAX - 1, LEASE, 0),
            Err(OpenRefused::Conflict { expires_at_ms, .. }) if expires_at_ms == LEASE + DEVICE_MAX
        ));
        assert_eq!(t.expired(LEASE + DEVICE_MAX), vec![plain]);
        assert_eq!(t.open(1, Exclusive, 2, "b", LEASE + DEVICE_MAX, LEASE, 0).unwrap().broken.len(), 1);
        // A durable handle with a longer durable time keeps it; a shorter
        // one is stretched to the device margin.
        let long = t.open(2, Exclusive, 1, "a", 0, LEASE, 5_000).unwrap().handle.id;
        assert!(t.open(2, Exclusive, 2, "b", LEASE + 4_999, LEASE, 0).is_err());
        assert_eq!(t.open(2, Exclusive, 2, "b", LEASE + 5_000, LEASE, 0).unwrap().broken[0].id, long);
        t.open(3, Exclusive, 1, "a", 0, LEASE, 1_000).unwrap();
        assert!(t.open(3, Exclusive, 2, "b", LEASE + 1_000, LEASE, 0).is_err(), "durable 1 s < device margin 3 s");
        assert!(t.open(3, Exclusive, 2, "b", LEASE + DEVICE_MAX, LEASE, 0).is_ok());
        // A silent holder is excluded from a recall (and the change
        // committed) only at lease + 3 s; the recall re-checks then.
        let silent = t.open(4, SharedWrite, 1, "a", 0, LEASE, 0).unwrap().handle.id;
        t.start_recall(4, 2).unwrap();
        assert_eq!(
            t.recall_state(4, LEASE),
            Some(RecallState::Waiting { handles: vec![silent], deadline_ms: LEASE + DEVICE_MAX })
        );
        assert_eq!(t.recall_state(4, LEASE + DEVICE_MAX), Some(RecallState::Ready { excluded: vec![silent] }));
    }

    #[test]
    fn closing_a_handle_withdraws_it_from_the_recall() {
        let mut t = HandleTable::new();
        let a = t.open(1, Exclusive, 1, "a", 0, LEASE, 0).unwrap().handle.id;
        t.start_recall(1, 2).unwrap();
        t.close(a, 1);
        assert_eq!(t.recall_state(1, 1), Some(RecallState::Ready { excluded: vec![] }));
    }

    const DURABLE: u64 = 5_000;

    #[test]
    fn a_durable_handle_outlives_its_session_and_a_late_resume_finds_it_unchanged() {
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 7, "a", 0, LEASE, DURABLE).unwrap().handle;
        t.detach_session(7);
        assert_eq!(t.get(h.id).unwrap().session, 0, "no session holds it");
        // Nobody else wanted the volume: long past lease + durable time, the
        // handle is still there and not released by expiry.
        assert!(t.expired(10 * LEASE).is_empty());
        let resumed = t.resume(h.id, 9, 10 * LEASE, LEASE).unwrap();
        assert_eq!((resumed.session, resumed.lease_until_ms), (9, 11 * LEASE));
        assert!(t.open(1, Exclusive, 8, "b", 10 * LEASE + 1, LEASE, 0).is_err(), "resumed: it conflicts again");
    }

    #[test]
    fn conflicting_open_is_refused_until_lease_plus_durable_then_breaks_the_handle() {
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 7, "a", 0, LEASE, DURABLE).unwrap().handle;
        t.detach_session(7);
        let err = t.open(1, Exclusive, 8, "b", LEASE + DURABLE - 1, LEASE, DURABLE).unwrap_err();
        assert_eq!(
            err,
            OpenRefused::Conflict { holder: "a".into(), mode: Exclusive, handle: h.id, expires_at_ms: LEASE + DURABLE }
        );
        let opened = t.open(1, Exclusive, 8, "b", LEASE + DURABLE, LEASE, DURABLE).unwrap();
        assert_eq!(opened.broken.iter().map(|b| b.id).collect::<Vec<_>>(), vec![h.id]);
        assert!(t.resume(h.id, 9, LEASE + DURABLE, LEASE).is_none(), "a broken handle cannot be resumed");
    }

    #[test]
    fn resume_and_conflicting_open_at_the_expiry_boundary_first_applied_wins() {
        // Resume one millisecond before the boundary, then the open at the
        // boundary: the resume renewed the lease, so the open is refused.
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 7, "a", 0, LEASE, DURABLE).unwrap().handle;
        t.detach_session(7);
        t.resume(h.id, 9, LEASE + DURABLE - 1, LEASE).unwrap();
        assert!(t.open(1, Exclusive, 8, "b", LEASE + DURABLE, LEASE, 0).is_err());
        // Resume exactly at the boundary with no open before it: still fine.
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 7, "a", 0, LEASE, DURABLE).unwrap().handle;
        t.detach_session(7);
        assert!(t.resume(h.id, 9, LEASE + DURABLE, LEASE).is_some());
        // The open applied first at the boundary: it breaks the handle and the
        // resume that follows in the same millisecond finds nothing.
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 7, "a", 0, LEASE, DURABLE).unwrap().handle;
        t.detach_session(7);
        assert_eq!(t.open(1, Exclusive, 8, "b", LEASE + DURABLE, LEASE, 0).unwrap().broken.len(), 1);
        assert!(t.resume(h.id, 9, LEASE + DURABLE, LEASE).is_none());
    }

    #[test]
    fn a_duplicate_handle_on_a_second_session_has_the_same_rights() {
        let mut t = HandleTable::new();
        let h = t.open(1, Exclusive, 7, "a", 0, LEASE, DURABLE).unwrap().handle;
        let dup = t.resume(h.id, 8, 100, LEASE).unwrap().clone();
        assert_eq!((dup.id, dup.session), (h.id, 7), "same handle, first session stays the main one");
        assert!(dup.held_by(7) && dup.held_by(8));
        // Either session renews it and may confirm recalls.
        t.detach_session(7);
        assert_eq!(t.get(h.id).unwrap().session, 8, "the duplicate takes over when the first goes");
        t.renew(8, 9_000, LEASE);
        assert!(t.open(1, Exclusive, 9, "c", 18_000, LEASE, 0).is_err());
        t.start_recall(1, 2).unwrap();
        t.recall_done(h.id, 8, 2).unwrap();
        t.finish_recall(1);
        assert!(t.close(h.id, 8).is_some());
    }

    #[test]
    fn handover_leaves_no_gap_and_no_room_for_a_third() {
        let mut t = HandleTable::new();
        let a = t.open(1, Exclusive, 7, "a", 0, LEASE, DURABLE).unwrap().handle;
        let b = t.open_alongside(a.id, 8, "b", 100, LEASE).unwrap();
        assert_eq!((b.volume, b.mode, b.durable_ms), (1, Exclusive, DURABLE));
        assert_ne!(b.id, a.id);
        // Both hold it: a third open conflicts, naming one of them.
        assert!(t.open(1, Exclusive, 9, "c", 200, LEASE, 0).is_err());
        assert!(t.open(1, ReadOnly, 9, "c", 200, LEASE, 0).is_err());
        // The first detaches; the second still holds it, so still no room.
        t.close(a.id, 7).unwrap();
        let err = t.open(1, Exclusive, 9, "c", 300, LEASE, 0).unwrap_err();
        assert!(matches!(err, OpenRefused::Conflict { ref holder, .. } if holder == "b"));
        assert!(t.open_alongside(a.id, 9, "c", 300, LEASE).is_none(), "a closed handle cannot be handed over");
    }

    #[test]
    fn grace_lasts_until_every_restored_handle_settled_or_it_runs_out() {
        let mut g = Grace::new([1, 2], 0, 1_000);
        assert_eq!(g.left_ms(0), Some(1_000));
        g.settled(1);
        assert_eq!(g.left_ms(400), Some(600));
        assert_eq!(g.left_ms(1_000), None, "ran out");
        g.settled(2);
        assert_eq!(g.left_ms(500), None, "everyone resumed: over early");
        assert_eq!(Grace::new([], 0, 1_000).left_ms(0), None, "nothing restored: no grace");
    }
}
