//! Admission before authentication: what an unauthenticated connection may
//! hold, and for how long.
//!
//! Why: before a peer has proved a key, anyone who can reach the port can
//! open connections and say nothing. Left unbounded, a handful of idle
//! connections would hold the server's session slots until their timeout,
//! and reconnecting agents — whose leases lapse while they cannot get in —
//! would be locked out. So:
//! - every connection must finish its handshake within
//!   [`HANDSHAKE_DEADLINE`] of being accepted, reading frames of at most a
//!   few KiB (`control_client::handshake::HANDSHAKE_FRAME_BYTES_MAX`);
//! - a **peer** (a TCP connection's IP address; for a unix socket, the
//!   connecting process's uid from `SO_PEERCRED` — a pid is no bound, a
//!   process forks) holds at most [`PREAUTH_PER_PEER_MAX`] unauthenticated
//!   connections, and all peers together at most [`PREAUTH_MAX`], so at
//!   least `SESSIONS_MAX - PREAUTH_MAX` session slots are always left for
//!   authenticated clients;
//! - at a cap, the **oldest** unauthenticated connection is closed to make
//!   room, never the new one: an agent that shares its address (or uid)
//!   with a flood of idle connections still gets in, because its own
//!   connection is the newest and sends its hello at once;
//! - a connection whose hello names a key the pool knows leaves the
//!   anonymous pool for a small per-key pool ([`HANDSHAKES_PER_KEY_MAX`],
//!   oldest closed first too), so anonymous churn cannot close it either.
//!   Claiming a known key costs nothing (public keys are public), which is
//!   why that pool is per key and also bounded by the deadline: to keep an
//!   agent out, an attacker would have to out-race each of its handshakes.
//!
//! [`Admission`] is the bookkeeping as a plain type; [`Gate`] shares it
//! between the accept loop and the connection tasks and tells an evicted
//! connection to close.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// Time from accept to a finished handshake (preamble, hellos, key
/// exchange, proofs) before the server closes the connection.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Unauthenticated connections one peer may hold at once.
pub const PREAUTH_PER_PEER_MAX: usize = 8;
/// Unauthenticated connections all peers together may hold at once.
pub const PREAUTH_MAX: usize = 256;
/// Handshakes in progress that claim the same known key.
pub const HANDSHAKES_PER_KEY_MAX: usize = 4;

/// Who a connection comes from, for the per-peer cap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerId {
    Ip(IpAddr),
    /// A unix-socket peer's user id.
    Uid(u32),
    /// The peer could not be identified (counted as one peer).
    Unknown,
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerId::Ip(ip) => write!(f, "{ip}"),
            PeerId::Uid(uid) => write!(f, "uid {uid}"),
            PeerId::Unknown => f.write_str("an unidentified peer"),
        }
    }
}

/// Why a connection was closed to make room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub ticket: u64,
    pub reason: String,
}

/// The unauthenticated connections, oldest first. No I/O.
#[derive(Debug, Default)]
pub struct Admission {
    next_ticket: u64,
    /// Anonymous connections by ticket (tickets grow: oldest first).
    anonymous: BTreeMap<u64, PeerId>,
    by_peer: HashMap<PeerId, VecDeque<u64>>,
    /// Handshakes whose hello named a known key.
    by_key: HashMap<[u8; 32], VecDeque<u64>>,
    key_of: HashMap<u64, [u8; 32]>,
}

impl Admission {
    /// A new connection from `peer`: its ticket, and the connections to
    /// close to make room for it.
    pub fn admit(&mut self, peer: PeerId) -> (u64, Vec<Eviction>) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let mut evicted = Vec::new();
        let held = self.by_peer.get(&peer).map_or(0, VecDeque::len);
        if held >= PREAUTH_PER_PEER_MAX {
            if let Some(oldest) = self.by_peer.get(&peer).and_then(|q| q.front().copied()) {
                self.forget_anonymous(oldest);
                evicted.push(Eviction {
                    ticket: oldest,
                    reason: format!(
                        "{peer} holds {PREAUTH_PER_PEER_MAX} unauthenticated connections; closing its oldest"
                    ),
                });
            }
        }
        if self.anonymous.len() >= PREAUTH_MAX {
            if let Some((&oldest, _)) = self.anonymous.iter().next() {
                self.forget_anonymous(oldest);
                evicted.push(Eviction {
                    ticket: oldest,
                    reason: format!("{PREAUTH_MAX} unauthenticated connections in all; closing the oldest"),
                });
            }
        }
        self.anonymous.insert(ticket, peer.clone());
        self.by_peer.entry(peer).or_default().push_back(ticket);
        (ticket, evicted)
    }

    /// The connection's hello named `key`, which the pool knows: it leaves
    /// the anonymous pool. Returns the handshakes to close to make room.
    pub fn known_key(&mut self, ticket: u64, key: [u8; 32]) -> Vec<Eviction> {
        if !self.anonymous.contains_key(&ticket) {
            return Vec::new();
        }
        self.forget_anonymous(ticket);
        let mut evicted = Vec::new();
        let queue = self.by_key.entry(key).or_default();
        if queue.len() >= HANDSHAKES_PER_KEY_MAX {
            if let Some(oldest) = queue.pop_front() {
                self.key_of.remove(&oldest);
                evicted.push(Eviction {
                    ticket: oldest,
                    reason: format!(
                        "{HANDSHAKES_PER_KEY_MAX} handshakes claim key {} at once; closing the oldest",
                        hex::encode(&key[..8])
                    ),
                });
            }
        }
        self.by_key.entry(key).or_default().push_back(ticket);
        self.key_of.insert(ticket, key);
        evicted
    }

    /// The connection authenticated, failed or closed.
    pub fn release(&mut self, ticket: u64) {
        self.forget_anonymous(ticket);
        if let Some(key) = self.key_of.remove(&ticket) {
            if let Some(q) = self.by_key.get_mut(&key) {
                q.retain(|t| *t != ticket);
                if q.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// Unauthenticated connections without a known key.
    pub fn anonymous(&self) -> usize {
        self.anonymous.len()
    }

    /// Handshakes in progress that named a known key.
    pub fn known(&self) -> usize {
        self.key_of.len()
    }

    fn forget_anonymous(&mut self, ticket: u64) {
        let Some(peer) = self.anonymous.remove(&ticket) else { return };
        if let Some(q) = self.by_peer.get_mut(&peer) {
            q.retain(|t| *t != ticket);
            if q.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }
}

/// [`Admission`] shared by the accept loop and the connection tasks.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    admission: Admission,
    /// How to tell each admitted connection to close.
    evict: HashMap<u64, oneshot::Sender<String>>,
}

impl GateState {
    fn evict(&mut self, evictions: Vec<Eviction>) {
        for e in evictions {
            if let Some(tx) = self.evict.remove(&e.ticket) {
                let _ = tx.send(e.reason);
            }
        }
    }
}

impl Gate {
    /// Admits a new connection from `peer` (closing older ones if a cap is
    /// reached). The connection is unauthenticated until the returned
    /// [`PreAuth`] is dropped.
    pub fn admit(self: &Arc<Gate>, peer: PeerId) -> PreAuth {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().unwrap();
        let (ticket, evictions) = state.admission.admit(peer.clone());
        state.evict(evictions);
        state.evict.insert(ticket, tx);
        PreAuth {
            gate: self.clone(),
            ticket,
            peer,
            evicted: Some(rx),
            deadline: tokio::time::Instant::now() + HANDSHAKE_DEADLINE,
        }
    }

    /// (anonymous, known-key) connections in their handshake right now.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap();
        (state.admission.anonymous(), state.admission.known())
    }
}

/// One connection's place before authentication; released on drop.
pub struct PreAuth {
    gate: Arc<Gate>,
    ticket: u64,
    pub peer: PeerId,
    evicted: Option<oneshot::Receiver<String>>,
    /// When the handshake must be done.
    pub deadline: tokio::time::Instant,
}

impl PreAuth {
    /// The hello named `key`, which the pool authorizes.
    pub fn known_key(&self, key: [u8; 32]) {
        let mut state = self.gate.state.lock().unwrap();
        let evictions = state.admission.known_key(self.ticket, key);
        state.evict(evictions);
    }

    /// Resolves with the reason when this connection is closed to make room
    /// (never, once taken: see [`PreAuth::take_eviction`]).
    pub async fn evicted(&mut self) -> String {
        match self.evicted.as_mut() {
            Some(rx) => rx.await.unwrap_or_else(|_| "the server is shutting down".into()),
            None => std::future::pending().await,
        }
    }

    /// The eviction notice as a future of its own, so the connection can
    /// wait for it while the handshake holds `&self` (for
    /// [`PreAuth::known_key`]).
    pub fn take_eviction(&mut self) -> impl std::future::Future<Output = String> + Send + 'static {
        let rx = self.evicted.take();
        async move {
            match rx {
                Some(rx) => rx.await.unwrap_or_else(|_| "the server is shutting down".into()),
                None => std::future::pending().await,
            }
        }
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap();
        state.admission.release(self.ticket);
        state.evict.remove(&self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> PeerId {
        PeerId::Ip(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn a_peer_at_its_cap_loses_its_oldest_connection_not_the_new_one() {
        let mut a = Admission::default();
        let first: Vec<u64> = (0..PREAUTH_PER_PEER_MAX).map(|_| a.admit(ip(1)).0).collect();
        let other = a.admit(ip(2)).0;
        let (newest, evicted) = a.admit(ip(1));
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].ticket, first[0]);
        assert!(evicted[0].reason.contains("10.0.0.1 holds 8 unauthenticated connections"), "{}", evicted[0].reason);
        assert_eq!(a.anonymous(), PREAUTH_PER_PEER_MAX + 1);
        // 500 more from the same peer: it never holds more than its cap,
        // and the other peer's connection is never touched.
        let mut last = newest;
        for _ in 0..500 {
            let (t, evicted) = a.admit(ip(1));
            assert!(evicted.iter().all(|e| e.ticket != other));
            last = t;
        }
        assert_eq!(a.anonymous(), PREAUTH_PER_PEER_MAX + 1);
        a.release(last);
        a.release(other);
        assert_eq!(a.anonymous(), PREAUTH_PER_PEER_MAX - 1);
    }

    #[test]
    fn all_peers_together_are_capped_too() {
        let mut a = Admission::default();
        let mut tickets = Vec::new();
        for i in 0..PREAUTH_MAX {
            let peer = PeerId::Ip(IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]));
            let (t, evicted) = a.admit(peer);
            assert!(evicted.is_empty());
            tickets.push(t);
        }
        let (_, evicted) = a.admit(ip(9));
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].ticket, tickets[0], "the oldest of all goes");
        assert_eq!(a.anonymous(), PREAUTH_MAX);
    }

    #[test]
    fn a_known_key_leaves_the_anonymous_pool_and_has_its_own_cap() {
        let mut a = Admission::default();
        let agent = a.admit(ip(1)).0;
        assert!(a.known_key(agent, [7; 32]).is_empty());
        // A flood from the same peer no longer reaches it.
        for _ in 0..100 {
            let (_, evicted) = a.admit(ip(1));
            assert!(evicted.iter().all(|e| e.ticket != agent));
        }
        assert_eq!(a.known(), 1);
        // Others claiming the same (public) key: the oldest claim goes first.
        let claims: Vec<u64> = (0..HANDSHAKES_PER_KEY_MAX).map(|_| a.admit(ip(3)).0).collect();
        let mut evicted = Vec::new();
        for c in &claims {
            evicted.extend(a.known_key(*c, [7; 32]));
        }
        assert_eq!(evicted.iter().map(|e| e.ticket).collect::<Vec<_>>(), vec![agent]);
        assert_eq!(a.known(), HANDSHAKES_PER_KEY_MAX);
        for c in claims {
            a.release(c);
        }
        assert_eq!(a.known(), 0);
        a.release(agent); // already gone: harmless
    }

    #[tokio::test]
    async fn the_gate_tells_an_evicted_connection_why() {
        let gate = Arc::new(Gate::default());
        let mut first = gate.admit(PeerId::Uid(1000));
        let rest: Vec<PreAuth> = (0..PREAUTH_PER_PEER_MAX).map(|_| gate.admit(PeerId::Uid(1000))).collect();
        let why = first.evicted().await;
        assert!(why.contains("uid 1000 holds"), "{why}");
        assert_eq!(gate.counts(), (PREAUTH_PER_PEER_MAX, 0));
        drop(rest);
        drop(first);
        assert_eq!(gate.counts(), (0, 0));
    }
}
