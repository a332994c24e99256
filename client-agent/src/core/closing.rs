//! Closing handles at the server until the server has them closed.
//!
//! A detach (or an attach undone after its `Open`) forgets the volume
//! locally — its export is gone and its writes are flushed — and then sends
//! `Close`. Why the close is retried rather than sent once: until the server
//! has closed the handle it still holds the volume for this agent, and this
//! agent's session keeps renewing it (leases are per session, not per
//! handle). A `Close` that failed (a metadata commit that failed, a
//! connection that broke under it) used to leave a handle nobody would ever
//! close: opens by others refused for as long as the agent lives, and a
//! recall for it (a snapshot, a grow) never confirmed, so that change hung.
//! The simulator found it (`agent-forgets-handle-on-failed-close`).
//!
//! So every close stays in [`Closing`] until the server answers it with
//! success or "no such handle", and is sent again after a pause that doubles
//! from [`CLOSE_PAUSE_MIN_MS`] to [`CLOSE_PAUSE_MAX_MS`] (on a new connection
//! too: the server then either closes it or no longer knows it). A recall for
//! a closing handle makes the next try go at once: the close answers it (the
//! handle has no I/O left to drain). At shutdown a failed close is given up:
//! the handle is no longer renewed once the process is gone, so its lease runs
//! out at the server.

use std::collections::BTreeMap;

use tracing::{info, warn};
use volume_format::control::messages::Request;
use volume_format::HandleId;

use super::{AgentCore, CloseOutcome, Millis, Purpose};

/// Shortest and longest pause between tries of one close.
pub const CLOSE_PAUSE_MIN_MS: u64 = 50;
pub const CLOSE_PAUSE_MAX_MS: u64 = 2_000;
/// Handles closed at most at once; past it the oldest is given up (its
/// lease then runs out only when the agent's session ends).
pub const CLOSING_MAX: usize = 4_096;

/// One handle being closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Closing {
    pub volume: String,
    pub in_flight: bool,
    pub retry_at_ms: Millis,
    pub pause_ms: u64,
}

/// The handles being closed, by handle id.
pub(super) type ClosingTable = BTreeMap<u64, Closing>;

impl AgentCore {
    /// Keeps `handle` (already forgotten locally) for closing until the
    /// server has it closed.
    pub(super) fn track_close(&mut self, now: Millis, volume: &str, handle: u64) {
        if self.closing.len() >= CLOSING_MAX && !self.closing.contains_key(&handle) {
            if let Some((&oldest, _)) = self.closing.iter().next() {
                warn!(handle = oldest, "too many handles being closed; giving up on the oldest");
                self.closing.remove(&oldest);
            }
        }
        self.closing.insert(
            handle,
            Closing { volume: volume.to_string(), in_flight: false, retry_at_ms: now, pause_ms: CLOSE_PAUSE_MIN_MS },
        );
    }

    /// Sends the close of `handle` if there is a connection; false if not.
    pub(super) fn send_close_now(
        &mut self,
        now: Millis,
        handle: u64,
        caller: Option<super::CallerId>,
        outcome: CloseOutcome,
    ) -> bool {
        let Some(conn) = self.link.conn() else { return false };
        let Some(c) = self.closing.get_mut(&handle) else { return false };
        c.in_flight = true;
        let purpose = Purpose::Close { caller, volume: c.volume.clone(), handle, outcome };
        self.requests.send(&mut self.out, conn, now, Request::Close { handle: HandleId(handle) }, None, purpose);
        true
    }

    /// The server answered a close of `handle`: done (`closed`), or to be
    /// tried again.
    pub(super) fn close_answered(&mut self, now: Millis, handle: u64, closed: bool) {
        let Some(c) = self.closing.get_mut(&handle) else { return };
        if closed || self.stopping.is_some() {
            self.closing.remove(&handle);
            return;
        }
        c.in_flight = false;
        c.retry_at_ms = now + c.pause_ms;
        warn!(volume = c.volume, handle, retry_in_ms = c.pause_ms, "closing the handle failed; retrying");
        c.pause_ms = (c.pause_ms * 2).min(CLOSE_PAUSE_MAX_MS);
    }

    /// A recall for a handle being closed: close it now (that answers it).
    /// False if `handle` is not being closed.
    pub(super) fn recall_of_closing(&mut self, now: Millis, handle: u64) -> bool {
        let Some(c) = self.closing.get_mut(&handle) else { return false };
        info!(volume = c.volume, handle, "recall of a handle being closed: closing it now");
        c.retry_at_ms = now;
        c.pause_ms = CLOSE_PAUSE_MIN_MS;
        true
    }

    /// Sends every close due for a try.
    pub(super) fn closes_due(&mut self, now: Millis) {
        if self.link.conn().is_none() {
            return;
        }
        let due: Vec<u64> =
            self.closing.iter().filter(|(_, c)| !c.in_flight && now >= c.retry_at_ms).map(|(&h, _)| h).collect();
        for handle in due {
            self.send_close_now(now, handle, None, CloseOutcome::Detached);
        }
    }

    /// When the next close is due (only while connected: one waiting for a
    /// connection goes on the tick after connecting).
    pub(super) fn close_deadline(&self) -> Option<Millis> {
        self.link.conn()?;
        self.closing.values().filter(|c| !c.in_flight).map(|c| c.retry_at_ms).min()
    }
}
