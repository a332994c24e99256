//! Copy-on-write registrations on behalf of the data path (see
//! [`crate::cow`]): sent on the live connection under the volume's current
//! handle, and retried across connection loss and server restarts until the
//! server has them (registrations are idempotent). A registration fails only
//! when the server refuses it, the volume's handle is gone or revoked, or the
//! agent stops.
//!
//! "Not now" answers (the server's grace period, a handle not resumed on
//! this connection yet) and transport errors are retried after a pause that
//! doubles from [`PAUSE_MIN_MS`] to [`PAUSE_MAX_MS`], and at once when the
//! connection comes back or the volume's handle is resumed.

use std::collections::BTreeMap;

use tracing::debug;
use volume_format::control::messages::{ErrorCode, Request, Response};
use volume_format::{HandleId, SnapshotId};

use super::{AgentCore, CallerId, Effect, Millis, Purpose, Reply, RequestError};
use crate::gate::Phase;

/// Shortest and longest pause between tries of one registration.
pub const PAUSE_MIN_MS: u64 = 20;
pub const PAUSE_MAX_MS: u64 = 1_000;
/// Failed metadata commits a write-intent request outlasts (the server
/// marks a dead metadata copy's device failed within a few of them; beyond
/// that the write fails: the server cannot commit at all).
pub const INTENT_COMMIT_FAILURES_MAX: u32 = 16;

/// A write-intent request (see `crate::intent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentOp {
    /// Regions to mark dirty, to clear.
    Record { mark: Vec<u64>, clear: Vec<u64> },
    /// A new run took the handle back: resync its dirty regions.
    Resync,
}

#[derive(Debug, Clone)]
struct Registration {
    caller: CallerId,
    volume: String,
    /// The attachment of the volume the registration was asked for
    /// (`None`: none then). Sent only for that attachment (under its
    /// handle, which a re-open after reconnecting may have renewed): one
    /// still waiting when its attachment went away and the volume was
    /// attached again must not act for the new attachment — a write-intent
    /// clear of the old one would clear regions the new one marked and
    /// writes in (simulator seed 290).
    attachment: Option<super::AttachmentId>,
    snapshot: u64,
    chunks: Vec<u64>,
    server_copies: bool,
    /// A write-intent request instead of a copy-on-write registration:
    /// the same retries, another request.
    intent: Option<IntentOp>,
    /// Failed commits of a write-intent request so far.
    commit_failures: u32,
    pause_ms: u64,
    /// When to try again; `None` while a request is in flight.
    retry_at_ms: Option<Millis>,
}

/// The registrations not answered yet.
#[derive(Debug, Default)]
pub struct Registrations {
    by_id: BTreeMap<u64, Registration>,
    next: u64,
}

impl Registrations {
    pub fn deadline(&self) -> Option<Millis> {
        self.by_id.values().filter_map(|r| r.retry_at_ms).min()
    }

    /// The connection changed: try every waiting registration now.
    pub fn retry_all_now(&mut self, now: Millis) {
        for r in self.by_id.values_mut() {
            if r.retry_at_ms.is_some() {
                r.retry_at_ms = Some(now);
            }
        }
    }

    /// `volume`'s handle was resumed: try its waiting registrations now.
    pub fn retry_volume_now(&mut self, volume: &str, now: Millis) {
        for r in self.by_id.values_mut().filter(|r| r.volume == volume) {
            if r.retry_at_ms.is_some() {
                r.retry_at_ms = Some(now);
            }
        }
    }

    pub fn fail_all(&mut self, out: &mut Vec<Effect>, why: &str) {
        for r in std::mem::take(&mut self.by_id).into_values() {
            out.push(Effect::Reply { caller: r.caller, reply: Reply::Registered(Err(why.to_string())) });
        }
    }
}

impl AgentCore {
    pub(super) fn cow_register(
        &mut self,
        now: Millis,
        caller: CallerId,
        volume: String,
        snapshot: u64,
        chunks: Vec<u64>,
        server_copies: bool,
    ) {
        if self.link.is_stopped() {
            let reply = Reply::Registered(Err("the agent is shutting down".to_string()));
            return self.out.push(Effect::Reply { caller, reply });
        }
        let attachment = self.volumes.get(&volume).map(|v| v.id);
        let r = &mut self.registrations;
        r.next += 1;
        let registration = Registration {
            caller,
            volume,
            attachment,
            snapshot,
            chunks,
            server_copies,
            intent: None,
            commit_failures: 0,
            pause_ms: PAUSE_MIN_MS,
            retry_at_ms: Some(now),
        };
        r.by_id.insert(r.next, registration);
    }

    /// Records write-intent regions of `volume` (see `crate::intent`), sent
    /// and retried like a registration.
    pub(super) fn intent_request(&mut self, now: Millis, caller: CallerId, volume: String, op: IntentOp) {
        let before = self.registrations.next;
        self.cow_register(now, caller, volume, 0, Vec::new(), false);
        let next = self.registrations.next;
        if next != before {
            if let Some(r) = self.registrations.by_id.get_mut(&next) {
                r.intent = Some(op);
            }
        }
    }

    /// Sends every registration whose time has come.
    pub(super) fn registrations_due(&mut self, now: Millis) {
        let due: Vec<u64> = self
            .registrations
            .by_id
            .iter()
            .filter(|(_, r)| r.retry_at_ms.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.try_registration(now, id);
        }
    }

    fn try_registration(&mut self, now: Millis, id: u64) {
        let r = &self.registrations.by_id[&id];
        let attached = self.volumes.get(&r.volume).filter(|v| v.has_gate());
        let attachment = attached.map(|v| v.id);
        let v = attached.and_then(|v| v.handle.as_ref());
        let refusal = match v {
            None => Some(format!("volume {} is no longer attached", r.volume)),
            Some(h) if matches!(h.gate.phase, Phase::Revoked { .. } | Phase::Closed) => {
                Some(format!("volume {}'s handle was {}", r.volume, h.gate.phase.word(false)))
            }
            Some(h) if r.attachment.is_some_and(|asked| Some(asked) != attachment) => Some(format!(
                "volume {} was detached and attached again (now as handle {}) since this was asked",
                r.volume, h.held.handle
            )),
            Some(_) => None,
        };
        if let Some(why) = refusal {
            return self.registration_done(id, Err(why));
        }
        let handle = HandleId(v.expect("checked above").held.handle);
        let Some(conn) = self.link.conn() else {
            let why = self.unreachable().to_string();
            return self.registration_later(now, id, &why);
        };
        let (snapshot, chunks) = (SnapshotId(r.snapshot), r.chunks.clone());
        let message = if let Some(op) = &r.intent {
            match op {
                IntentOp::Record { mark, clear } => {
                    Request::IntentRecord { handle, mark: mark.clone(), clear: clear.clone() }
                }
                IntentOp::Resync => Request::IntentResync { handle },
            }
        } else if r.server_copies {
            Request::CowCopy { handle, snapshot, chunks }
        } else {
            Request::CowRegister { handle, snapshot, chunks }
        };
        self.registrations.by_id.get_mut(&id).expect("checked above").retry_at_ms = None;
        self.requests.send(&mut self.out, conn, now, message, None, Purpose::Cow { registration: id });
    }

    pub(super) fn cow_answered(&mut self, now: Millis, id: u64, result: Result<Response, RequestError>) {
        match result {
            Ok(Response::CowRegistered { .. } | Response::IntentRecorded) => self.registration_done(id, Ok(())),
            Ok(other) => {
                self.registration_done(id, Err(format!("the metadata server answered a registration with {other:?}")))
            }
            // In its grace period, or the handle not resumed on this
            // connection yet: both pass by themselves.
            Err(RequestError::Server(e)) if e.code == ErrorCode::NotFound || super::answers_later(&e) => {
                self.registration_later(now, id, &e.message)
            }
            // A write-intent commit that missed a metadata copy: the server
            // checks the copy's device (marking it failed if it is gone),
            // and marking again is harmless, so it is tried again — the
            // write waits rather than fails while one device dies.
            Err(RequestError::Server(e)) if e.code == ErrorCode::CommitFailed && self.intent_retry(id) => {
                self.registration_later(now, id, &e.message)
            }
            Err(RequestError::Server(e)) => self.registration_done(id, Err(e.message)),
            Err(e) => self.registration_later(now, id, &format!("{:?}", e)),
        }
    }

    /// Whether registration `id` is a write-intent request that may be
    /// tried again after a failed commit (counts the try).
    fn intent_retry(&mut self, id: u64) -> bool {
        let Some(r) = self.registrations.by_id.get_mut(&id) else { return false };
        if r.intent.is_none() || r.commit_failures >= INTENT_COMMIT_FAILURES_MAX {
            return false;
        }
        r.commit_failures += 1;
        true
    }

    fn registration_done(&mut self, id: u64, result: Result<(), String>) {
        if let Some(r) = self.registrations.by_id.remove(&id) {
            self.out.push(Effect::Reply { caller: r.caller, reply: Reply::Registered(result) });
        }
    }

    fn registration_later(&mut self, now: Millis, id: u64, why: &str) {
        if self.link.is_stopped() {
            return self.registration_done(id, Err("the agent is shutting down".to_string()));
        }
        let Some(r) = self.registrations.by_id.get_mut(&id) else { return };
        debug!(
            volume = r.volume,
            snapshot = r.snapshot,
            why,
            retry_in_ms = r.pause_ms,
            "copy-on-write registration not done yet"
        );
        r.retry_at_ms = Some(now + r.pause_ms);
        r.pause_ms = (r.pause_ms * 2).min(PAUSE_MAX_MS);
    }
}
