//! Control connections between clients (agents, the admin) and server
//! hosts, as the real transport behaves: one TCP stream per connection.
//!
//! - Within one connection and direction, messages arrive in the order sent
//!   (each one's delivery time is at least the previous one's); across
//!   connections nothing is ordered.
//! - A connection breaks (a drop, a long partition, a crashed peer) at an
//!   instant: whatever had not arrived by then is lost, and each end learns
//!   of it at its own later time.
//! - A partition cuts a client host from a server host for a while: messages
//!   wait (TCP retransmits) and arrive after it heals, unless the connection
//!   broke meanwhile; new connections fail after a connect timeout.

use std::collections::BTreeMap;

use volume_format::control::messages::{ClientMessage, ServerMessage};

use crate::rng::Rng;

pub type ConnId = u64;

/// A process of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proc {
    /// The metadata server on host `n`.
    Server(usize),
    Agent(usize),
    Admin,
}

impl std::fmt::Display for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proc::Server(h) => write!(f, "mds@{h}"),
            Proc::Agent(i) => write!(f, "agent{i}"),
            Proc::Admin => f.write_str("admin"),
        }
    }
}

/// A message on a connection (as the protocol's own types, not bytes:
/// boxing the larger one would only add an allocation per message).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Wire {
    ToServer(ClientMessage),
    ToClient(ServerMessage),
}

#[derive(Debug, Clone)]
pub struct Conn {
    pub id: ConnId,
    pub client: Proc,
    pub client_inc: u64,
    pub server_host: usize,
    pub server_inc: u64,
    /// The server's session id, once the server accepted it.
    pub session: Option<u64>,
    /// Not broken.
    pub open: bool,
    /// The client finished its handshake (a break before that is a failed
    /// attempt, not a lost connection).
    pub client_connected: bool,
    last_to_server_ms: u64,
    last_to_client_ms: u64,
}

#[derive(Default)]
pub struct Net {
    pub conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    /// (client, server host) → cut until.
    cuts: BTreeMap<(Proc, usize), u64>,
}

impl Net {
    pub fn open_conn(&mut self, client: Proc, client_inc: u64, server_host: usize, server_inc: u64) -> ConnId {
        self.next_conn += 1;
        let id = self.next_conn;
        self.conns.insert(
            id,
            Conn {
                id,
                client,
                client_inc,
                server_host,
                server_inc,
                session: None,
                open: true,
                client_connected: false,
                last_to_server_ms: 0,
                last_to_client_ms: 0,
            },
        );
        id
    }

    pub fn get(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(&id)
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&id)
    }

    /// Until when `client` is cut from `server_host` (if it is now).
    pub fn cut_until(&self, client: Proc, server_host: usize, now_ms: u64) -> Option<u64> {
        self.cuts.get(&(client, server_host)).copied().filter(|&u| u > now_ms)
    }

    pub fn cut(&mut self, client: Proc, server_host: usize, until_ms: u64) {
        let e = self.cuts.entry((client, server_host)).or_insert(0);
        *e = (*e).max(until_ms);
    }

    pub fn heal_all(&mut self) {
        self.cuts.clear();
    }

    /// When a message sent now on `conn` arrives (keeping the stream's
    /// order, and waiting out a cut); `None` if the connection is broken.
    pub fn arrival(
        &mut self,
        id: ConnId,
        to_server: bool,
        now_ms: u64,
        delay: (u64, u64),
        rng: &mut Rng,
    ) -> Option<u64> {
        let c = self.conns.get(&id)?;
        if !c.open {
            return None;
        }
        let mut at = now_ms + rng.range(delay.0, delay.1);
        if let Some(until) = self.cut_until(c.client, c.server_host, now_ms) {
            at = at.max(until + rng.range(delay.0, delay.1));
        }
        let c = self.conns.get_mut(&id)?;
        let last = if to_server { &mut c.last_to_server_ms } else { &mut c.last_to_client_ms };
        at = at.max(*last);
        *last = at;
        Some(at)
    }

    /// Breaks `conn` now; false if it already was.
    pub fn break_conn(&mut self, id: ConnId) -> bool {
        match self.conns.get_mut(&id) {
            Some(c) if c.open => {
                c.open = false;
                true
            }
            _ => false,
        }
    }

    /// Forgets connections both ends are done with.
    pub fn forget(&mut self, id: ConnId) {
        self.conns.remove(&id);
    }

    pub fn open_conns(&self) -> Vec<ConnId> {
        self.conns.values().filter(|c| c.open).map(|c| c.id).collect()
    }
}
