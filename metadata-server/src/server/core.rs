//! The owner task: the only holder of the pool metadata, the handle table
//! and the session list.
//!
//! Its loop waits for the next thing to happen (a command, the expiry tick,
//! a recall deadline, shutdown) and applies it. Applying may await a commit
//! to the devices — admin changes are serialized by design — but never an
//! agent: a reconfiguration waiting for agents is state ([`PendingChange`]: a grow, a snapshot create or delete),
//! picked up again by `RecallDone` or the recall deadline.
//!
//! The invariant kept between steps: `meta` is exactly what was last
//! committed, and the `Active` records of `meta.handles` list exactly the
//! handles in `handles`, so a restarted server (or a standby, later) rebuilds
//! the same table. `Broken` records have no entry in `handles`: they are kept
//! only to tell a late resume what happened.
//!
//! After a restart with handles in the metadata, a grace period
//! ([`Grace`]) serves only resumes (and read-only requests) until every
//! restored handle was resumed or closed, or `grace_ms` ran out.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};
use volume_format::control::auth::Role;
use volume_format::control::messages::{ControlError, ErrorCode, Request, Response, ServerEvent, ServerMessage};
use volume_format::metadata::{HandleState, PoolMetadata};
use volume_format::{HandleId, PublicKey, VolumeDescription, VolumeId};

use super::clock::Clock;
use crate::handles::{Grace, Handle, HandleTable, RecallState, SessionId};
use crate::pool::Pool;
use crate::resume::HandoverLedger;
use control_client::handshake::Peer;

/// Authorized keys as the handshake sees them: key → (role, name).
pub type ClientTable = HashMap<[u8; 32], (Role, String)>;

pub type Reply = oneshot::Sender<Result<Response, ControlError>>;

/// What sessions ask of the owner.
pub enum Command {
    Connected {
        session: SessionId,
        peer: Peer,
        addr: String,
        out: mpsc::Sender<ServerMessage>,
        kick: oneshot::Sender<()>,
    },
    Request {
        session: SessionId,
        request: Request,
        reply: Reply,
    },
    Disconnected {
        session: SessionId,
    },
}

pub struct SessionState {
    pub peer: Peer,
    pub addr: String,
    pub out: mpsc::Sender<ServerMessage>,
    pub kick: Option<oneshot::Sender<()>>,
}

/// A reconfiguration of one volume's layout: committed at a recall point
/// (while the volume's holders have drained) when it has holders.
#[derive(Debug, Clone)]
pub enum VolumeChange {
    Grow { size_bytes: u64 },
    SnapshotCreate { name: String },
    SnapshotDelete { name: String },
}

impl VolumeChange {
    /// The volume and change a request asks for, or the request back if it
    /// is not a volume change.
    pub fn of(request: Request) -> Result<(String, VolumeChange), Request> {
        match request {
            Request::VolumeGrow { name, size_bytes } => Ok((name, VolumeChange::Grow { size_bytes })),
            Request::SnapshotCreate { volume, name } => Ok((volume, VolumeChange::SnapshotCreate { name })),
            Request::SnapshotDelete { volume, name } => Ok((volume, VolumeChange::SnapshotDelete { name })),
            other => Err(other),
        }
    }
}

impl std::fmt::Display for VolumeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeChange::Grow { size_bytes } => write!(f, "grow to {size_bytes} bytes"),
            VolumeChange::SnapshotCreate { name } => write!(f, "snapshot {name}"),
            VolumeChange::SnapshotDelete { name } => write!(f, "delete snapshot {name}"),
        }
    }
}

/// A reconfiguration waiting for the volume's holders to drain.
pub struct PendingChange {
    pub volume: VolumeId,
    pub change: VolumeChange,
    pub generation: u64,
    pub reply: Reply,
}

pub struct Core {
    pub pool: Pool,
    pub meta: PoolMetadata,
    pub handles: HandleTable,
    pub sessions: HashMap<SessionId, SessionState>,
    pub lease_ms: u64,
    /// Durable timeout given to new handles.
    pub durable_ms: u64,
    /// Signs resume keys and handover tokens.
    pub key: Arc<SigningKey>,
    /// The grace period after a restart, while it lasts.
    pub grace: Option<Grace>,
    pub handovers: HandoverLedger,
    pub clock: Clock,
    pub pending_changes: HashMap<VolumeId, PendingChange>,
    /// The committed metadata, for readers outside the owner task (the
    /// backup pseudo-device). Updated before any reply to the commit.
    meta_tx: watch::Sender<Arc<PoolMetadata>>,
    /// Agents doing a device's I/O through the server (`data_channel`).
    pub fallback: super::data_channel::FallbackTable,
    clients_tx: watch::Sender<Arc<ClientTable>>,
}

pub fn client_table(meta: &PoolMetadata) -> ClientTable {
    meta.clients.iter().map(|c| (c.public_key.0, (c.role, c.name.clone()))).collect()
}

impl Core {
    pub fn new(
        pool: Pool,
        meta: PoolMetadata,
        lease_ms: u64,
        durable_ms: u64,
        grace_ms: u64,
        key: Arc<SigningKey>,
    ) -> Core {
        let clock = Clock::default();
        let mut handles = HandleTable::new();
        handles.set_next_id(meta.next_ids.handle.0);
        // Handles committed by a previous server run: the agents holding them
        // may still be doing I/O and will resume them, so each keeps its
        // volume for a fresh lease plus its durable time, counted from now
        // (this server cannot know how much of the old lease was left).
        for h in meta.handles.iter().filter(|h| matches!(h.state, HandleState::Active)) {
            handles.restore(Handle {
                id: h.id.0,
                volume: h.volume.0,
                mode: h.mode,
                session: 0,
                duplicates: Default::default(),
                holder: h.agent_name.clone(),
                opened_at_ms: 0,
                lease_until_ms: lease_ms,
                durable_ms: h.durable_timeout_ms,
            });
        }
        let restored: Vec<u64> = handles.all().map(|h| h.id).collect();
        let grace = (!restored.is_empty() && grace_ms > 0).then(|| Grace::new(restored.clone(), 0, grace_ms));
        if !restored.is_empty() {
            info!(handles = restored.len(), grace_ms, "handles from the previous run restored; grace period: only resumes are served until they resumed or it ends");
        }
        let (clients_tx, _) = watch::channel(Arc::new(client_table(&meta)));
        let (meta_tx, _) = watch::channel(Arc::new(meta.clone()));
        Core {
            pool,
            meta,
            handles,
            sessions: HashMap::new(),
            lease_ms,
            durable_ms,
            key,
            grace,
            handovers: HandoverLedger::new(super::clock::unix_ms()),
            clock,
            pending_changes: HashMap::new(),
            meta_tx,
            fallback: Default::default(),
            clients_tx,
        }
    }

    pub fn clients_watch(&self) -> watch::Receiver<Arc<ClientTable>> {
        self.clients_tx.subscribe()
    }

    /// The committed metadata as it changes.
    pub fn meta_watch(&self) -> watch::Receiver<Arc<PoolMetadata>> {
        self.meta_tx.subscribe()
    }

    /// Adopts newly committed metadata.
    pub fn adopt(&mut self, committed: PoolMetadata) {
        let clients_changed = committed.clients != self.meta.clients;
        self.meta = committed;
        self.meta_tx.send_replace(Arc::new(self.meta.clone()));
        if clients_changed {
            self.clients_tx.send_replace(Arc::new(client_table(&self.meta)));
        }
    }

    /// Commits `next`; on success adopts it. On failure nothing changes and
    /// the error is the one to send to the client.
    pub async fn commit(&mut self, next: PoolMetadata) -> Result<(), ControlError> {
        match self.pool.commit(Some(&self.meta), next).await {
            Ok(committed) => {
                self.adopt(committed);
                Ok(())
            }
            Err(e) => Err(ControlError::new(ErrorCode::CommitFailed, format!("{e}; nothing was changed"))),
        }
    }

    /// Sends an event to every session holding `handle`.
    pub fn send_handle_event(&mut self, handle: &Handle, event: ServerEvent) {
        let sessions: Vec<SessionId> = handle.sessions().collect();
        for s in sessions {
            self.send_event(s, event.clone());
        }
    }

    /// Milliseconds of grace left, or `None` once it is over (and forgotten).
    pub fn grace_left_ms(&mut self) -> Option<u64> {
        let now_ms = self.clock.now_ms();
        let left = self.grace.as_ref().and_then(|g| g.left_ms(now_ms));
        if left.is_none() && self.grace.take().is_some() {
            info!("grace period over: serving opens and changes again");
        }
        left
    }

    /// Sends an event to a session; a session that cannot take it (gone, or
    /// its queue full) is dropped — its lease then does the rest.
    pub fn send_event(&mut self, session: SessionId, event: ServerEvent) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        if let Err(e) = s.out.try_send(ServerMessage::Event(event)) {
            warn!(session, client = %s.peer.name, "cannot queue an event for the session ({e}); closing it");
            if let Some(kick) = s.kick.take() {
                let _ = kick.send(());
            }
        }
    }

    /// The owner loop. Returns when `shutdown` completes or every sender is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let tick_ms = (self.lease_ms / 4).max(25);
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.next_recall_deadline_ms().map(|ms| self.clock.instant_at(ms));
            tokio::select! {
                _ = &mut shutdown => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.apply(cmd).await,
                    None => break,
                },
                _ = tick.tick() => self.expire_handles().await,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.check_recalls().await;
                }
            }
        }
        for (_, change) in self.pending_changes.drain() {
            let _ = change.reply.send(Err(ControlError::new(ErrorCode::Unavailable, "the server is shutting down")));
        }
        for s in self.sessions.values_mut() {
            if let Some(kick) = s.kick.take() {
                let _ = kick.send(());
            }
        }
        for d in &self.pool.devices {
            if let Some(c) = &d.client {
                c.disconnect().await;
            }
        }
    }

    async fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Connected { session, peer, addr, out, kick } => {
                self.sessions.insert(session, SessionState { peer, addr, out, kick: Some(kick) });
            }
            Command::Disconnected { session } => {
                if let Some(s) = self.sessions.remove(&session) {
                    let held = self.handles.of_session(session).count();
                    if held > 0 {
                        info!(session, client = %s.peer.name, held, "session gone; its handles stay reserved for a resume");
                    }
                }
                self.handles.detach_session(session);
            }
            Command::Request { session, request, reply } => {
                let now_ms = self.clock.now_ms();
                self.handles.renew(session, now_ms, self.lease_ms);
                if !super::durable::allowed_in_grace(&request) {
                    if let Some(left_ms) = self.grace_left_ms() {
                        let msg = format!(
                            "the metadata server restarted and is in its grace period, {left_ms} ms left: only resumes \
                             are served until the agents that held volumes have resumed; retry then"
                        );
                        let _ = reply.send(Err(ControlError::new(ErrorCode::Unavailable, msg)));
                        return;
                    }
                }
                self.handle_request(session, request, reply).await;
            }
        }
    }

    /// Releases handles whose lease (plus durable time) ran out.
    async fn expire_handles(&mut self) {
        let now_ms = self.clock.now_ms();
        let expired = self.handles.expired(now_ms);
        if expired.is_empty() {
            return;
        }
        let mut next = self.meta.clone();
        next.handles.retain(|h| !expired.contains(&h.id.0));
        if next.handles != self.meta.handles {
            if let Err(e) = self.commit(next).await {
                warn!("releasing expired handles: {e}; retrying at the next tick");
                return;
            }
        }
        for id in expired {
            if let Some(h) = self.handles.remove(id) {
                warn!(handle = id, volume = h.volume, holder = %h.holder, "lease ran out; handle released");
                let reason = format!("the lease ran out at {}", self.clock.describe(h.lease_until_ms));
                self.send_handle_event(&h, ServerEvent::Revoked { handle: HandleId(id), reason });
            }
        }
        self.check_recalls().await;
    }

    fn next_recall_deadline_ms(&self) -> Option<u64> {
        let now_ms = self.clock.now_ms();
        self.pending_changes
            .keys()
            .filter_map(|v| match self.handles.recall_state(v.0, now_ms) {
                Some(RecallState::Waiting { deadline_ms, .. }) => Some(deadline_ms),
                Some(RecallState::Ready { .. }) => Some(now_ms),
                None => None,
            })
            .min()
    }

    pub async fn check_recalls(&mut self) {
        let volumes: Vec<VolumeId> = self.pending_changes.keys().copied().collect();
        for v in volumes {
            self.check_recall(v).await;
        }
    }

    /// Finishes the pending change of `volume` if every holder confirmed or
    /// was excluded by its lease: apply, commit, publish, reply.
    pub async fn check_recall(&mut self, volume: VolumeId) {
        let now_ms = self.clock.now_ms();
        let Some(RecallState::Ready { excluded }) = self.handles.recall_state(volume.0, now_ms) else { return };
        let Some(pending) = self.pending_changes.remove(&volume) else {
            self.handles.finish_recall(volume.0);
            return;
        };
        let mut next = self.meta.clone();
        next.handles.retain(|h| !excluded.contains(&h.id.0));
        let result = match self.apply_change(&mut next, volume, &pending.change).await {
            Ok(()) => self.commit(next).await,
            Err(e) => Err(e),
        };
        if result.is_ok() {
            for id in &excluded {
                if let Some(h) = self.handles.remove(*id) {
                    warn!(handle = id, holder = %h.holder, "excluded from the reconfiguration: it did not confirm the recall within its lease");
                    let reason = format!(
                        "excluded from the reconfiguration of layout generation {}: no confirmation within the lease",
                        pending.generation
                    );
                    self.send_event(h.session, ServerEvent::Revoked { handle: HandleId(*id), reason });
                }
            }
        }
        // Holders resume either way: with the new layout, or the old one if
        // the change failed.
        self.handles.finish_recall(volume.0);
        self.publish_volume(volume, &excluded);
        match &result {
            Ok(()) => {
                info!(%volume, change = %pending.change, generation = self.meta.generation, "volume reconfigured")
            }
            Err(e) => warn!(%volume, change = %pending.change, "reconfiguration failed: {e}"),
        }
        let _ = pending.reply.send(result.map(|()| Response::Done));
    }

    /// Sends `volume`'s current description to every holder (but `skip`).
    pub fn publish_volume(&mut self, volume: VolumeId, skip: &[u64]) {
        match VolumeDescription::from_metadata(&self.meta, volume) {
            Ok(description) => {
                let holders: Vec<(u64, SessionId)> = self
                    .handles
                    .on_volume(volume.0)
                    .filter(|h| !skip.contains(&h.id))
                    .map(|h| (h.id, h.session))
                    .collect();
                for (handle, session) in holders {
                    let description = Box::new(description.clone());
                    self.send_event(session, ServerEvent::Publish { handle: HandleId(handle), description });
                }
            }
            Err(e) => warn!(%volume, "cannot describe the volume after reconfiguration: {e}"),
        }
    }

    /// The pool's name for a key, for messages.
    pub fn client_name(&self, key: &PublicKey) -> String {
        self.meta
            .clients
            .iter()
            .find(|c| c.public_key == *key)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| key.to_string())
    }
}
