//! Confirming recalls: once a recalled gate has drained, `RecallDone` goes to
//! the server, and is sent again until the server has answered it.
//!
//! Why retried: the server commits a reconfiguration only when every holder
//! confirmed or was excluded by its lease, and an agent that keeps renewing
//! is never excluded. So a confirmation lost on the way (the connection
//! broke between the recall and its answer, a timeout) used to hang the
//! grow or snapshot — and the volume's I/O, held at the recalled gate —
//! until someone noticed. Confirmations are idempotent at the server (a
//! retried or late one is acknowledged and counted once), so the agent
//! simply retries: on the connection its handle lives on, once any resume
//! after a reconnect is done, after a pause that doubles from
//! [`CONFIRM_PAUSE_MIN_MS`] to [`CONFIRM_PAUSE_MAX_MS`]. Retries end when
//! the server answers, when the layout is published (the recall is over),
//! or when the handle is revoked or detached.
//!
//! Why the state file is written first: once the server has a confirmation
//! it may commit the new layout at any moment, and an agent restarted in
//! between must not write with the old one. So a pending recall is in the
//! state file ([`super::Effect::SaveState`]) before its `RecallDone` leaves,
//! and a restarted agent starts that volume's gate recalled.

use tracing::{debug, info, warn};
use volume_format::control::messages::{Request, Response};
use volume_format::HandleId;

use super::state::{Confirm, Handle, Recovery, Volume};
use super::{AgentCore, AttachmentId, ConnId, Millis, Purpose, RequestError};
use crate::gate::Phase;

/// Shortest and longest pause between tries of one confirmation.
pub const CONFIRM_PAUSE_MIN_MS: u64 = 50;
pub const CONFIRM_PAUSE_MAX_MS: u64 = 2_000;

impl AgentCore {
    /// The recalled gate of `id` drained for `generation`: confirm it.
    pub(super) fn drained(&mut self, now: Millis, id: AttachmentId, generation: u64, result: Result<(), String>) {
        let Some(v) = self.volumes.values_mut().find(|v| v.id == id) else { return };
        let Some(h) = v.handle.as_mut() else { return };
        let handle = h.held.handle;
        if let Err(e) = result {
            return warn!(volume = v.name, handle, generation, error = %e, "recall abandoned");
        }
        match &mut h.held.pending_recall {
            Some(p) if p.generation == generation => p.drained = true,
            _ => return debug!(volume = v.name, handle, generation, "drained after the recall was over"),
        }
        h.confirm.retry_at_ms = now;
        self.confirm_recalls(now);
    }

    /// Sends `RecallDone` for every drained, unconfirmed recall whose handle
    /// is on the live connection, not being resumed, and due for a try.
    pub(super) fn confirm_recalls(&mut self, now: Millis) {
        let Some(conn) = self.link.conn() else { return };
        let sends: Vec<(AttachmentId, u64, u64)> = self
            .volumes
            .values()
            .filter_map(|v| {
                let (h, generation) = sendable(v, conn)?;
                (now >= h.confirm.retry_at_ms).then_some((v.id, h.held.handle, generation))
            })
            .collect();
        if sends.is_empty() {
            return;
        }
        // The pending recalls must be on disk before any confirmation leaves.
        self.save_state();
        for (attachment, handle, generation) in sends {
            let h = self.volumes.values_mut().find(|v| v.id == attachment).and_then(|v| v.handle.as_mut());
            let Some(h) = h else { continue };
            h.confirm.in_flight = true;
            let message = Request::RecallDone { handle: HandleId(handle), generation };
            let purpose = Purpose::RecallDone { attachment, generation };
            self.requests.send(&mut self.out, conn, now, message, None, purpose);
        }
    }

    /// When the next confirmation is due for a retry.
    pub(super) fn confirm_deadline(&self) -> Option<Millis> {
        // Only confirmations that could go out now: one waiting for a
        // connection or a resume is tried on the tick that follows those
        // (a deadline already past would wake the owner loop at once, again
        // and again).
        let conn = self.link.conn()?;
        self.volumes.values().filter_map(|v| sendable(v, conn)).map(|(h, _)| h.confirm.retry_at_ms).min()
    }

    pub(super) fn recall_confirmed(
        &mut self,
        now: Millis,
        id: AttachmentId,
        generation: u64,
        result: Result<Response, RequestError>,
    ) {
        let Some(v) = self.volumes.values_mut().find(|v| v.id == id) else { return };
        let Some(h) = v.handle.as_mut() else { return };
        h.confirm.in_flight = false;
        let handle = h.held.handle;
        match result {
            Ok(_) => {
                info!(volume = v.name, handle, generation, "recall confirmed to the metadata server");
                if let Some(p) = h.held.pending_recall.as_mut().filter(|p| p.generation == generation) {
                    p.confirmed = true;
                }
                h.confirm = Confirm::default();
            }
            Err(e) => {
                let pause_ms = h.confirm.pause_ms;
                h.confirm.retry_at_ms = now + pause_ms;
                h.confirm.pause_ms = (pause_ms * 2).min(CONFIRM_PAUSE_MAX_MS);
                warn!(volume = v.name, handle, generation, error = ?e, retry_in_ms = pause_ms, "confirming the recall failed; retrying");
            }
        }
    }
}

/// `v`'s handle and recall generation if its drained, unconfirmed recall
/// could be confirmed on `conn` now (whatever its retry time says).
fn sendable(v: &Volume, conn: ConnId) -> Option<(&Handle, u64)> {
    let h = v.handle.as_ref().filter(|_| v.has_gate())?;
    let p = h.held.pending_recall?;
    let ready = p.drained
        && !p.confirmed
        && !h.confirm.in_flight
        && h.conn == conn
        && h.recovery == Recovery::Idle
        && h.gate.phase == (Phase::Recalled { generation: p.generation });
    ready.then_some((h, p.generation))
}
