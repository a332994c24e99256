//! Keeping every connection within what its key may do *now*.
//!
//! A session, data channel or backup channel is authorized once, at its
//! handshake; what the pool allows that key can change afterwards. So after
//! every input the owner checks, for each connection it has not checked
//! against the current committed metadata:
//! - the key is still authorized, with the same role — a revoked key or a
//!   role change closes every session, data channel and backup channel of
//!   that key at once (the check also catches a handshake that was still in
//!   progress when the change committed); the pool's server key in the
//!   `server` role (another server of the pool) is no client and stays;
//! - a backup key's volume scope is unchanged — a narrowed (or widened)
//!   scope closes its backup channels, which reopen with the new scope;
//! - a data channel's grant still rests on a live handle — a data channel is
//!   bound to the handles its key held on the volume when the channel was
//!   granted, and closes as soon as the last of them is closed, expires, is
//!   broken or revoked (not a lease later).
//!
//! Why in the owner: whether a key is authorized and which handles are live
//! is its state, and every change to either is a commit; checking after
//! each input (cheaply: only when the committed metadata's generation moved,
//! or a connection is new) needs no hook in each of the many places a
//! handle or a client record changes.

use std::collections::{BTreeMap, HashMap, HashSet};

use tracing::info;
use volume_format::control::auth::{ConnectionKind, Role};
use volume_format::control::messages::{ControlError, ErrorCode, Response};
use volume_format::metadata::{HandleState, NAME_BYTES_MAX};
use volume_format::PublicKey;

use super::core::Core;
use crate::handles::SessionId;

/// The owner's record of what each connection's authorization rests on.
#[derive(Debug, Default)]
pub struct Grants {
    /// Data channels and the handles their grant rests on.
    bound: BTreeMap<SessionId, Vec<u64>>,
    /// The committed metadata generation the checks below were made at.
    generation: Option<u64>,
    /// Connections already checked at that generation.
    checked: HashSet<SessionId>,
    /// The volume scope each connection's key had when it was first checked.
    scopes: HashMap<SessionId, Option<Vec<String>>>,
}

/// Most volumes one backup key's scope may name.
pub const SCOPE_VOLUMES_MAX: usize = 256;

/// Checks a requested scope: only backup keys have one, of valid names.
pub fn check_scope(role: Role, volumes: &[String]) -> Result<(), ControlError> {
    let invalid = |m: String| Err(ControlError::new(ErrorCode::InvalidArgument, m));
    if volumes.is_empty() {
        return Ok(());
    }
    if role != Role::Backup {
        return invalid(format!("--volumes scopes backup keys; a {role} key cannot be scoped"));
    }
    if volumes.len() > SCOPE_VOLUMES_MAX {
        return invalid(format!("a scope names at most {SCOPE_VOLUMES_MAX} volumes, not {}", volumes.len()));
    }
    if let Some(bad) =
        volumes.iter().find(|v| v.is_empty() || v.len() > NAME_BYTES_MAX || v.chars().any(char::is_control))
    {
        return invalid(format!("{bad:?} is not a volume name"));
    }
    Ok(())
}

impl Grants {
    /// Binds a data channel to `handles` (its first grant; later grants of
    /// the same channel do not widen it).
    pub fn bind(&mut self, session: SessionId, handles: Vec<u64>) {
        self.bound.entry(session).or_insert(handles);
    }

    /// The handles a data channel is bound to.
    pub fn bound_to(&self, session: SessionId) -> Option<&[u64]> {
        self.bound.get(&session).map(Vec::as_slice)
    }
}

impl Core {
    /// The active handles `key` holds on `volume` (what a data channel for
    /// that volume is bound to).
    pub(super) fn handles_of(&self, key: [u8; 32], volume: u64) -> Vec<u64> {
        self.meta
            .handles
            .iter()
            .filter(|h| h.volume.0 == volume && h.agent_key.0 == key && matches!(h.state, HandleState::Active))
            .map(|h| h.id.0)
            .collect()
    }

    /// Records what a data channel's grant rests on (only for channels: the
    /// same request on a control session just answers what would be granted).
    pub(super) fn bind_data_channel(&mut self, session: SessionId, handles: Vec<u64>) {
        if self.sessions.get(&session).is_some_and(|p| p.kind == ConnectionKind::Channel) {
            self.grants.bind(session, handles);
        }
    }

    /// Closes every connection whose key, role, scope or handle no longer
    /// allows it (see the module doc). Runs after each input.
    pub(super) fn enforce_grants(&mut self) {
        let generation = self.meta.generation;
        if self.grants.generation != Some(generation) {
            self.grants.generation = Some(generation);
            self.grants.checked.clear();
        }
        let sessions = &self.sessions;
        self.grants.checked.retain(|s| sessions.contains_key(s));
        self.grants.bound.retain(|s, _| sessions.contains_key(s));
        self.grants.scopes.retain(|s, _| sessions.contains_key(s));
        let unchecked: Vec<SessionId> =
            self.sessions.keys().filter(|s| !self.grants.checked.contains(s)).copied().collect();
        let mut close = Vec::new();
        for session in unchecked {
            self.grants.checked.insert(session);
            let peer = &self.sessions[&session];
            let scope = self.meta.scope_of(&PublicKey(peer.key)).map(<[String]>::to_vec);
            let scope_changed = self.grants.scopes.entry(session).or_insert_with(|| scope.clone()) != &scope;
            // Another server of the pool (the `server` role): the pool's
            // server key, never a client record.
            let server = peer.role == Role::Server && peer.key == self.key.verifying_key().to_bytes();
            let why = match self.meta.clients.iter().find(|c| c.public_key.0 == peer.key) {
                None if server => None,
                None => Some("its key was revoked".to_string()),
                Some(c) if c.role != peer.role => {
                    Some(format!("its key's role changed from {} to {}", peer.role, c.role))
                }
                Some(_) if scope_changed => Some("its key's volume scope changed".to_string()),
                Some(_) => match self.grants.bound_to(session) {
                    Some(handles) if !handles.iter().any(|h| self.handle_active(*h)) => Some(format!(
                        "the handle{} its data channel was granted for ended",
                        if handles.len() == 1 { "" } else { "s" }
                    )),
                    _ => None,
                },
            };
            if let Some(why) = why {
                close.push((session, why));
            }
        }
        for (session, why) in close {
            let peer = &self.sessions[&session];
            info!(session, client = %peer.name, kind = ?peer.kind, "closing the connection: {why}");
            self.grants.bound.remove(&session);
            self.kick(session);
        }
    }

    fn handle_active(&self, id: u64) -> bool {
        self.meta.handles.iter().any(|h| h.id.0 == id && matches!(h.state, HandleState::Active))
    }

    /// A snapshot listing as `session`'s key may see it: a scoped backup
    /// key sees only its volumes' snapshots.
    pub(super) fn scoped_listing(&self, session: SessionId, listing: Response) -> Response {
        let Some(peer) = self.sessions.get(&session) else { return listing };
        let Some(scope) = self.meta.scope_of(&PublicKey(peer.key)) else { return listing };
        match listing {
            Response::Snapshots(list) => {
                Response::Snapshots(list.into_iter().filter(|s| scope.contains(&s.volume)).collect())
            }
            other => other,
        }
    }
}
