//! The agent's connection to the metadata server, as the owner sees it:
//! when to connect where, when to renew, what the lease is.
//!
//! Reconnection rotates through every configured server address (a standby
//! may be the one answering after a failover): a failed attempt moves to the
//! next address at once, and only after a full round does the agent wait,
//! with exponential backoff capped at a quarter of the lease: once the lease
//! has run out the agent's I/O is held until it resumes, so every backoff
//! step is paid by the applications (bench/restart.sh measured a 5 s cap
//! adding over a second to the pause after a 2 s server outage). A lost
//! connection is retried on the same address first.
//!
//! Leases are recorded conservatively: a renewal sent at `t` that grants
//! `lease_ms` makes the lease run until `t + lease_ms`, never
//! `reply time + lease_ms`, because the server started counting somewhere
//! between the two. Renewals go every `lease_ms / 3` (at least
//! [`RENEW_PERIOD_MIN_MS`]), one at a time: a slow server must not pile them
//! up.
//!
//! Everything here is plain data over injected milliseconds; the shell
//! connects and sends.

use super::{ConnId, Millis, RequestId};
use crate::session::ConnectState;

/// Shortest and longest wait between reconnection rounds.
pub const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
pub const RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;
/// The shortest renewal period, whatever lease the server grants.
pub const RENEW_PERIOD_MIN_MS: u64 = 50;

/// A live connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub conn: ConnId,
    /// Counts successful connections (shown by `status`).
    pub epoch: u64,
    pub lease_ms: u64,
    /// The lease of this connection's handles, recorded conservatively.
    pub lease_until_ms: Millis,
    pub period_ms: u64,
    pub next_renew_ms: Millis,
    /// The renewal in flight, if any.
    pub renewing: Option<RequestId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkPhase {
    /// The next attempt starts at `until_ms`.
    Waiting {
        until_ms: Millis,
    },
    Connecting {
        conn: ConnId,
        addr: usize,
        started_ms: Millis,
    },
    Connected(Live),
    /// The server refused this agent for a reason retrying cannot fix.
    Fatal(String),
    Stopped,
}

/// What a due renewal tick asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    NotDue,
    /// Due, but the previous one has not been answered.
    Busy,
    /// Send one on `conn`, timing out after `timeout_ms`.
    Send {
        conn: ConnId,
        timeout_ms: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Link {
    pub phase: LinkPhase,
    addrs: usize,
    next_addr: usize,
    backoff_ms: u64,
    backoff_max_ms: u64,
    ever_connected: bool,
    /// Handshake refusals in a row before the first connection: fatal only
    /// once every address refused (a standby that has not read a newly
    /// authorized key yet refuses it while the active server would not).
    refusals_in_a_row: usize,
    epochs: u64,
    next_conn: u64,
    pub last_error: Option<String>,
}

impl Link {
    /// A link over `addrs` addresses (at least one), connecting at once.
    pub fn new(addrs: usize) -> Link {
        Link {
            phase: LinkPhase::Waiting { until_ms: 0 },
            addrs: addrs.max(1),
            next_addr: 0,
            backoff_ms: RECONNECT_BACKOFF_MIN_MS,
            backoff_max_ms: RECONNECT_BACKOFF_MAX_MS,
            ever_connected: false,
            refusals_in_a_row: 0,
            epochs: 0,
            next_conn: 0,
            last_error: None,
        }
    }

    pub fn live(&self) -> Option<&Live> {
        match &self.phase {
            LinkPhase::Connected(live) => Some(live),
            _ => None,
        }
    }

    pub fn conn(&self) -> Option<ConnId> {
        self.live().map(|l| l.conn)
    }

    pub fn is_stopped(&self) -> bool {
        self.phase == LinkPhase::Stopped
    }

    /// When the link next wants to act (an attempt to start, a renewal to send).
    pub fn deadline(&self) -> Option<Millis> {
        match &self.phase {
            LinkPhase::Waiting { until_ms } => Some(*until_ms),
            LinkPhase::Connected(live) => Some(live.next_renew_ms),
            _ => None,
        }
    }

    /// What readiness waiters and `status` see.
    pub fn state(&self) -> ConnectState {
        match &self.phase {
            LinkPhase::Waiting { .. } | LinkPhase::Connecting { .. } => {
                ConnectState::Connecting { last_error: self.last_error.clone() }
            }
            LinkPhase::Connected(live) => ConnectState::Connected { epoch: live.epoch },
            LinkPhase::Fatal(e) => ConnectState::Fatal(e.clone()),
            LinkPhase::Stopped => ConnectState::Stopped,
        }
    }

    /// Starts an attempt if one is due: `(conn, address index)` to connect.
    pub fn start_attempt(&mut self, now: Millis) -> Option<(ConnId, usize)> {
        let LinkPhase::Waiting { until_ms } = self.phase else { return None };
        if now < until_ms {
            return None;
        }
        self.next_conn += 1;
        let (conn, addr) = (ConnId(self.next_conn), self.next_addr % self.addrs);
        self.phase = LinkPhase::Connecting { conn, addr, started_ms: now };
        Some((conn, addr))
    }

    /// Attempt `conn` succeeded with a session lease of `lease_ms`. False if
    /// it is not the attempt in progress (the shell then closes it).
    pub fn connected(&mut self, conn: ConnId, now: Millis, lease_ms: u64) -> bool {
        let LinkPhase::Connecting { conn: current, started_ms, .. } = self.phase else { return false };
        if current != conn {
            return false;
        }
        self.epochs += 1;
        self.ever_connected = true;
        self.backoff_ms = RECONNECT_BACKOFF_MIN_MS;
        self.backoff_max_ms = RECONNECT_BACKOFF_MAX_MS.min(lease_ms / 4).max(RECONNECT_BACKOFF_MIN_MS);
        let period_ms = (lease_ms / 3).max(RENEW_PERIOD_MIN_MS);
        self.phase = LinkPhase::Connected(Live {
            conn,
            epoch: self.epochs,
            lease_ms,
            lease_until_ms: started_ms + lease_ms,
            period_ms,
            next_renew_ms: now + period_ms,
            renewing: None,
        });
        true
    }

    /// Attempt `conn` failed. A handshake refusal (`fatal`) before the first
    /// success stops the link for good; otherwise the next address is tried
    /// at once, or after the backoff once every address was tried.
    pub fn connect_failed(&mut self, conn: ConnId, now: Millis, error: String, fatal: bool) -> bool {
        if !matches!(self.phase, LinkPhase::Connecting { conn: current, .. } if current == conn) {
            return false;
        }
        if fatal && !self.ever_connected {
            self.refusals_in_a_row += 1;
            if self.refusals_in_a_row >= self.addrs {
                self.phase = LinkPhase::Fatal(error);
                return true;
            }
        } else {
            self.refusals_in_a_row = 0;
        }
        self.last_error = Some(error);
        self.next_addr += 1;
        if !self.next_addr.is_multiple_of(self.addrs) {
            self.phase = LinkPhase::Waiting { until_ms: now };
        } else {
            self.wait_backoff(now);
        }
        true
    }

    /// Connection `conn` ended. False if it was not the live one.
    pub fn lost(&mut self, conn: ConnId, now: Millis) -> bool {
        if self.conn() != Some(conn) {
            return false;
        }
        self.last_error = Some("the connection to the metadata server was lost".into());
        self.wait_backoff(now);
        true
    }

    /// Connection `conn` is dropped on purpose (a redirect, a server that is
    /// not the active one): the address list now has `addrs` entries, and
    /// the next attempt starts at once with the next address (the first one
    /// after a redirect, which put its addresses first).
    pub fn moved(&mut self, conn: ConnId, now: Millis, addrs: usize, why: String) {
        if self.conn() != Some(conn) {
            return;
        }
        self.last_error = Some(why);
        let redirected = addrs != self.addrs;
        self.addrs = addrs.max(1);
        if redirected {
            self.next_addr = 0;
            self.phase = LinkPhase::Waiting { until_ms: now };
            return;
        }
        // Not the active server: the next address at once, and the backoff
        // after a whole round (a lone standby must not be hammered).
        self.next_addr += 1;
        if !self.next_addr.is_multiple_of(self.addrs) {
            self.phase = LinkPhase::Waiting { until_ms: now };
        } else {
            self.wait_backoff(now);
        }
    }

    fn wait_backoff(&mut self, now: Millis) {
        self.phase = LinkPhase::Waiting { until_ms: now + self.backoff_ms };
        self.backoff_ms = (self.backoff_ms * 2).min(self.backoff_max_ms);
    }

    /// Whether a renewal is due now (and schedules the next tick).
    pub fn renewal_due(&mut self, now: Millis) -> Renewal {
        let LinkPhase::Connected(live) = &mut self.phase else { return Renewal::NotDue };
        if now < live.next_renew_ms {
            return Renewal::NotDue;
        }
        live.next_renew_ms = now + live.period_ms;
        if live.renewing.is_some() {
            return Renewal::Busy;
        }
        Renewal::Send { conn: live.conn, timeout_ms: live.period_ms }
    }

    /// Records the renewal request in flight on `conn`.
    pub fn renewing(&mut self, conn: ConnId, request: RequestId) {
        if let LinkPhase::Connected(live) = &mut self.phase {
            if live.conn == conn {
                live.renewing = Some(request);
            }
        }
    }

    /// Renewal `request` was answered (or failed).
    pub fn renewal_done(&mut self, request: RequestId) {
        if let LinkPhase::Connected(live) = &mut self.phase {
            if live.renewing == Some(request) {
                live.renewing = None;
            }
        }
    }

    /// A request sent at `sent_ms` on `conn` granted `lease_ms`: the new end
    /// of `conn`'s lease, or `None` if `conn` is not live any more. Replies
    /// can arrive out of order: the lease never moves back.
    pub fn renewed(&mut self, conn: ConnId, sent_ms: Millis, lease_ms: u64) -> Option<Millis> {
        let LinkPhase::Connected(live) = &mut self.phase else { return None };
        if live.conn != conn {
            return None;
        }
        let until = sent_ms + lease_ms;
        live.lease_until_ms = live.lease_until_ms.max(until);
        live.lease_ms = lease_ms;
        Some(until)
    }

    /// Stops the link; returns the live connection to close.
    pub fn stop(&mut self) -> Option<ConnId> {
        let conn = match &self.phase {
            LinkPhase::Connected(live) => Some(live.conn),
            LinkPhase::Connecting { conn, .. } => Some(*conn),
            _ => None,
        };
        self.phase = LinkPhase::Stopped;
        conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_is_tried_once_before_backing_off() {
        let mut l = Link::new(3);
        let mut tried = Vec::new();
        let mut now = 0;
        for _ in 0..7 {
            let (conn, addr) = loop {
                if let Some(a) = l.start_attempt(now) {
                    break a;
                }
                now = l.deadline().unwrap();
            };
            tried.push((addr, now));
            assert!(l.connect_failed(conn, now, "refused".into(), false));
        }
        // Three at once, then 100 ms, three at once, then 200 ms, ...
        assert_eq!(tried, vec![(0, 0), (1, 0), (2, 0), (0, 100), (1, 100), (2, 100), (0, 300)]);
        assert_eq!(l.state(), ConnectState::Connecting { last_error: Some("refused".into()) });
    }

    #[test]
    fn backoff_is_capped_at_a_quarter_of_the_lease_and_a_loss_retries_the_same_address() {
        let mut l = Link::new(2);
        let (conn, _) = l.start_attempt(0).unwrap();
        assert!(l.connected(conn, 5, 1000));
        let live = l.live().unwrap().clone();
        assert_eq!((live.epoch, live.lease_until_ms, live.period_ms, live.next_renew_ms), (1, 1000, 333, 338));
        assert!(l.lost(conn, 10));
        let mut waits = Vec::new();
        let mut now = 10;
        for _ in 0..6 {
            let at = l.deadline().unwrap();
            waits.push(at - now);
            now = at;
            let (conn, addr) = l.start_attempt(now).unwrap();
            if waits.len() == 1 {
                assert_eq!(addr, 0, "a lost connection is retried on the same address first");
            }
            l.connect_failed(conn, now, "refused".into(), false);
            if let Some(at) = l.deadline().filter(|at| *at == now) {
                let (conn, _) = l.start_attempt(at).unwrap();
                l.connect_failed(conn, now, "refused".into(), false);
            }
        }
        assert_eq!(waits, vec![100, 200, 250, 250, 250, 250], "capped at lease/4 = 250 ms");
    }

    #[test]
    fn a_handshake_refusal_is_fatal_only_before_the_first_connection() {
        let mut l = Link::new(1);
        let (conn, _) = l.start_attempt(0).unwrap();
        l.connect_failed(conn, 0, "wrong key".into(), true);
        assert_eq!(l.state(), ConnectState::Fatal("wrong key".into()));
        assert_eq!(l.deadline(), None);

        // With several addresses, only once every one refused in a row: a
        // standby may not know a key the active server has just authorized.
        let mut l = Link::new(2);
        let (conn, addr) = l.start_attempt(0).unwrap();
        assert_eq!(addr, 0);
        l.connect_failed(conn, 0, "unknown key (standby)".into(), true);
        let (conn, addr) = l.start_attempt(0).expect("the next address at once");
        assert_eq!(addr, 1);
        l.connect_failed(conn, 0, "unreachable".into(), false);
        let at = l.deadline().unwrap();
        let (conn, _) = l.start_attempt(at).unwrap();
        l.connect_failed(conn, at, "unknown key".into(), true);
        assert!(matches!(l.phase, LinkPhase::Waiting { .. }), "one refusal after a failure: {:?}", l.phase);
        let (conn, _) = l.start_attempt(at).unwrap();
        l.connect_failed(conn, at, "unknown key".into(), true);
        assert_eq!(l.state(), ConnectState::Fatal("unknown key".into()), "both refused in a row");

        let mut l = Link::new(1);
        let (conn, _) = l.start_attempt(0).unwrap();
        l.connected(conn, 0, 3000);
        l.lost(conn, 1);
        let (conn, _) = l.start_attempt(101).unwrap();
        l.connect_failed(conn, 101, "wrong key".into(), true);
        assert!(matches!(l.phase, LinkPhase::Waiting { .. }), "{:?}", l.phase);
    }

    #[test]
    fn renewals_are_one_at_a_time_and_the_lease_never_moves_back() {
        let mut l = Link::new(1);
        let (conn, _) = l.start_attempt(0).unwrap();
        l.connected(conn, 0, 3000);
        assert_eq!(l.renewal_due(999), Renewal::NotDue);
        assert_eq!(l.renewal_due(1000), Renewal::Send { conn, timeout_ms: 1000 });
        l.renewing(conn, RequestId(7));
        assert_eq!(l.renewal_due(2000), Renewal::Busy);
        l.renewal_done(RequestId(7));
        assert_eq!(l.renewed(conn, 2000, 3000), Some(5000));
        assert_eq!(l.renewed(conn, 1000, 3000), Some(4000), "an older reply");
        assert_eq!(l.live().unwrap().lease_until_ms, 5000, "the lease did not move back");
        assert_eq!(l.renewed(ConnId(99), 9000, 3000), None, "another connection's renewal");
    }
}
