//! How long an attach waits for the server's answer to its `Open`.
//!
//! Why not the control client's 30 s request timeout: a cached volume whose
//! last holder died is opened only after the server replayed that holder's
//! cache mirror to the devices, and a replay can take longer than 30 s
//! behind slow devices (bench/README.md, "How long a dead holder's volume
//! stays closed"). With the 30 s timeout the attach failed while the server
//! went on and opened the handle a little later: nobody closed it, and the
//! retried attach was refused by that orphaned handle until its lease and
//! durable time ran out.
//!
//! So an `Open` is sent with [`OPEN_TIMEOUT_MS`], and the attach waits as
//! long as the server shows it is alive: after [`OPEN_PATIENCE_MS`] it gives
//! up only once the connection's lease has run out (renewals unanswered: a
//! stopped or unreachable server), with the same message as before. An
//! answer that arrives after the attach gave up is closed at once
//! (`AgentCore::opened` finds no attachment for it), so a late open never
//! leaves a handle behind.

use super::{AgentCore, AttachmentId, Millis, Purpose, Reply, Stage};
use crate::agent::AgentError;
use crate::session::SessionError;

/// What the shell waits for an `Open` answer at most (a replay of a full
/// cache behind very slow devices).
pub(super) const OPEN_TIMEOUT_MS: u64 = 30 * 60_000;
/// How long an attach waits in any case: the control client's request
/// timeout, as before.
pub(super) const OPEN_PATIENCE_MS: u64 = control_client::client::REQUEST_TIMEOUT.as_millis() as u64;

impl AgentCore {
    /// The opens still waited for: attachment, when sent, whether the
    /// connection it went on is the live one.
    fn waiting_opens(&self) -> impl Iterator<Item = (AttachmentId, Millis, bool)> + '_ {
        let live = self.link.live().map(|l| l.conn);
        self.requests.pending.values().filter_map(move |p| match p.purpose {
            Purpose::Open { attachment }
                if self.volumes.values().any(|v| v.id == attachment && v.stage == Stage::Opening) =>
            {
                Some((attachment, p.sent_ms, live == Some(p.conn)))
            }
            _ => None,
        })
    }

    /// The end of the live connection's lease (0: no live connection).
    fn lease_until(&self) -> Millis {
        self.link.live().map_or(0, |l| l.lease_until_ms)
    }

    /// Fails the attaches whose open waited [`OPEN_PATIENCE_MS`] on a server
    /// whose lease ran out.
    pub(super) fn opens_due(&mut self, now: Millis) {
        let lease_until = self.lease_until();
        let overdue: Vec<(AttachmentId, Millis)> = self
            .waiting_opens()
            .filter(|&(_, sent, live)| now >= sent + OPEN_PATIENCE_MS && !(live && now < lease_until))
            .map(|(id, sent, _)| (id, sent))
            .collect();
        for (id, sent) in overdue {
            let Some(name) = super::volumes::find(&mut self.volumes, id).map(|v| v.name.clone()) else { continue };
            let caller = self.volumes.remove(&name).and_then(|v| v.caller);
            let waited = (now - sent) / 1000;
            let e = SessionError::Control(format!(
                "the metadata server did not answer the open of {name} within {waited}s and stopped renewing the \
                 lease (stopped or unreachable); if it answers later, the handle it opens is closed at once"
            ));
            self.reply_to(caller, Reply::Failed(AgentError::Session(e)));
        }
    }

    /// When [`AgentCore::opens_due`] next has something to check.
    pub(super) fn open_deadline(&self) -> Option<Millis> {
        let lease_until = self.lease_until();
        self.waiting_opens()
            .map(|(_, sent, live)| (sent + OPEN_PATIENCE_MS).max(if live { lease_until } else { 0 }))
            .min()
    }
}
