//! The agent's control session with the metadata server.
//!
//! One task ([`Session::start`]) owns the connection's life: it connects and
//! authenticates, renews the lease every `lease_ms / 3`, dispatches the
//! server's events to the volumes' gates, and on connection loss keeps going —
//! it logs, reconnects with capped exponential backoff, and lets the lease
//! run out by itself: no timer is needed to stop I/O, because every gate
//! compares the clock with the lease it was last given and holds I/O once it
//! has passed.
//!
//! Leases are recorded conservatively: a renewal sent at `t` that grants
//! `lease_ms` makes the lease run until `t + lease_ms`, never
//! `reply time + lease_ms`, because the server started counting somewhere
//! between the two.
//!
//! Handles belong to the connection (*epoch*) that opened them: a renewal on
//! a new connection does not extend the lease of handles opened on an old
//! one, since the server renews per session. After a reconnect,
//! [`recover`](Shared::recover) brings old handles over to the new
//! connection by *resuming* them with the resume key the open returned:
//! told "unchanged" (the server answers with the same handle), the gate gets
//! the new lease and I/O continues as if the connection had never broken —
//! I/O that was held because the lease ran out is released, none failed.
//! Told the handle was broken (another client opened the volume after the
//! lease and durable timeout ran out), the gate is revoked: from then on the
//! volume's I/O fails with the server's message instead of writing. Servers
//! that return no resume key get the older behaviour (re-open).
//!
//! Reconnection rotates through every configured server address (a standby
//! may be the one answering after a failover), with exponential backoff per
//! full round, capped at a quarter of the lease: once the lease has run out
//! the agent's I/O is held until it resumes, so every backoff step is paid by
//! the applications (bench/restart.sh measured a 5 s cap adding over a
//! second to the pause after a 2 s server outage).
//!
//! Events for a handle the agent has not registered yet (a recall racing the
//! reply to its open) are kept, up to [`ORPHAN_EVENTS_MAX`], and replayed at
//! registration, so no recall is ever missed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use control_client::{ControlAddr, ControlClient, ControlClientError};
use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn, Instrument};
use volume_format::control::auth::Role;
use volume_format::control::messages::{ErrorCode, OpenMode, Request, Response, ServerEvent};
use volume_format::{HandleId, SnapshotId, VolumeDescription};

use crate::gate::{Gate, GateError, GateStatus};
use crate::volume::Layout;

/// Server events kept for handles not registered yet.
pub const ORPHAN_EVENTS_MAX: usize = 256;
/// Shortest and longest wait between reconnection attempts.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The shortest renewal period, whatever lease the server grants.
const RENEW_PERIOD_MIN: Duration = Duration::from_millis(50);

/// Builds a layout from a description (the agent resolves devices through
/// its pool). Must not block: it runs on the event path.
pub type LayoutBuilder = Arc<dyn Fn(VolumeDescription) -> Result<Layout, String> + Send + Sync>;

/// Who the agent is and where its server is.
#[derive(Clone)]
pub struct SessionConfig {
    pub addr: ControlAddr,
    /// Further server addresses tried in turn when `addr` does not answer
    /// (`--mds` given several times).
    pub more_addrs: Vec<ControlAddr>,
    pub key: SigningKey,
    pub server_key: VerifyingKey,
    /// Shown by the server in client listings and conflict messages.
    pub name: String,
    /// Random per agent process; tells the server a restarted agent apart.
    pub instance: [u8; 16],
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("not connected to the metadata server at {addr} (reconnecting{})", last.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    NotConnected { addr: String, last: Option<String> },
    /// The server's own message, verbatim (e.g. who holds the volume).
    #[error("{0}")]
    Server(String),
    #[error("metadata server: {0}")]
    Control(ControlClientError),
    #[error("the metadata server answered {request} with an unexpected {response}")]
    Unexpected { request: &'static str, response: String },
    #[error("volume {volume}: {reason}")]
    Layout { volume: String, reason: String },
    #[error("the session has shut down")]
    ShutDown,
}

impl From<ControlClientError> for SessionError {
    fn from(e: ControlClientError) -> SessionError {
        match e {
            ControlClientError::Server(e) => SessionError::Server(e.message),
            ControlClientError::Closed => SessionError::NotConnected { addr: String::new(), last: None },
            other => SessionError::Control(other),
        }
    }
}

/// A volume opened through the session.
pub struct OpenedVolume {
    pub handle: u64,
    pub mode: OpenMode,
    pub gate: Arc<Gate<Layout>>,
}

/// A registered handle, as listings show it.
#[derive(Debug, Clone)]
pub struct HandleStatus {
    pub volume: String,
    pub handle: u64,
    pub mode: OpenMode,
    pub gate: GateStatus,
}

struct Entry {
    volume: String,
    handle: u64,
    mode: OpenMode,
    gate: Arc<Gate<Layout>>,
    /// The connection the handle lives on.
    epoch: u64,
    /// From the open; sent back in `Resume` after a reconnect. Empty if the
    /// server gave none.
    resume_key: Vec<u8>,
}

#[derive(Default)]
struct Registry {
    entries: Vec<Entry>,
    orphans: VecDeque<ServerEvent>,
}

struct Connection {
    client: ControlClient,
    epoch: u64,
    /// The lease of this connection's handles, recorded conservatively.
    lease_until: Instant,
    lease_ms: u64,
}

struct Shared {
    config: SessionConfig,
    builder: LayoutBuilder,
    registry: Mutex<Registry>,
    connection: Mutex<Option<Connection>>,
    /// Bumps on every state change readiness waiters care about.
    status: watch::Sender<ConnectState>,
    stop: watch::Sender<bool>,
}

/// What [`Session::wait_connected`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectState {
    Connecting {
        last_error: Option<String>,
    },
    Connected {
        epoch: u64,
    },
    /// The server refused us for a reason retrying cannot fix (wrong key, not
    /// authorized): the agent should exit and say why.
    Fatal(String),
    Stopped,
}

/// A handle on the running session. Cheap to clone.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    /// Starts the session task. It connects in the background; see
    /// [`Session::wait_connected`].
    pub fn start(config: SessionConfig, builder: LayoutBuilder) -> (Session, tokio::task::JoinHandle<()>) {
        let (status, _) = watch::channel(ConnectState::Connecting { last_error: None });
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            builder,
            registry: Mutex::new(Registry::default()),
            connection: Mutex::new(None),
            status,
            stop,
        });
        let span = tracing::info_span!("session", mds = %shared.config.addr, agent = %shared.config.name);
        let task = tokio::spawn(shared.clone().run().instrument(span));
        (Session { shared }, task)
    }

    /// Waits until connected (Ok), or the server refused us for good (Err).
    pub async fn wait_connected(&self) -> Result<(), String> {
        let mut rx = self.shared.status.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, ConnectState::Connecting { .. }))
            .await
            .map_err(|_| "the session stopped".to_string())?
            .clone();
        match state {
            ConnectState::Connected { .. } => Ok(()),
            ConnectState::Fatal(e) => Err(e),
            _ => Err("the session stopped".to_string()),
        }
    }

    pub fn state(&self) -> ConnectState {
        self.shared.status.borrow().clone()
    }

    /// Opens `volume` in `mode` at the server and registers its gate.
    pub async fn open(&self, volume: &str, mode: OpenMode) -> Result<OpenedVolume, SessionError> {
        self.open_with(volume, Request::Open { volume: volume.to_string(), mode }).await
    }

    /// Opens `volume` with a handover token its holder issued for this
    /// agent's key (live migration): both hold it until the holder detaches.
    pub async fn open_handover(&self, volume: &str, token: Vec<u8>) -> Result<OpenedVolume, SessionError> {
        self.open_with(volume, Request::OpenHandover { token }).await
    }

    /// Asks the server for a handover token for `volume`'s handle, for the
    /// agent with public key `to_key`.
    pub async fn handover(&self, volume: &str, to_key: [u8; 32]) -> Result<Vec<u8>, SessionError> {
        let handle = self
            .handle_status(volume)
            .map(|h| h.handle)
            .ok_or_else(|| SessionError::Server(format!("volume {volume} is not attached here")))?;
        let (client, _) = self.shared.client()?;
        match client.request(Request::Handover { handle: HandleId(handle), to_key }).await? {
            Response::HandoverToken { token, .. } => Ok(token),
            other => Err(SessionError::Unexpected { request: "Handover", response: format!("{other:?}") }),
        }
    }

    /// The resume key of `volume`'s handle (for a duplicate handle on another
    /// channel, or tests).
    pub fn resume_key(&self, volume: &str) -> Option<Vec<u8>> {
        lock(&self.shared.registry).entries.iter().find(|e| e.volume == volume).map(|e| e.resume_key.clone())
    }

    async fn open_with(&self, volume: &str, request: Request) -> Result<OpenedVolume, SessionError> {
        let (client, epoch) = self.shared.client()?;
        let sent = Instant::now();
        let what = if matches!(request, Request::OpenHandover { .. }) { "OpenHandover" } else { "Open" };
        let response = client.request(request).await?;
        let Response::Opened(opened) = response else {
            return Err(SessionError::Unexpected { request: what, response: format!("{response:?}") });
        };
        if opened.description.name != volume {
            let _ = client.request(Request::Close { handle: opened.handle }).await;
            return Err(SessionError::Server(format!(
                "the handover token is for volume {}, not {volume}",
                opened.description.name
            )));
        }
        let handle = opened.handle.0;
        let generation = opened.description.layout_generation;
        let layout = match (self.shared.builder)(opened.description) {
            Ok(layout) => layout,
            Err(reason) => {
                let _ = client.request(Request::Close { handle: HandleId(handle) }).await;
                return Err(SessionError::Layout { volume: volume.to_string(), reason });
            }
        };
        let gate = Arc::new(Gate::new(Arc::new(layout), generation));
        let lease_until = sent + Duration::from_millis(opened.lease_ms);
        gate.renew_lease(lease_until);
        self.shared.renewed(epoch, sent, opened.lease_ms);
        self.shared.register(Entry {
            volume: volume.to_string(),
            handle,
            mode: opened.mode,
            gate: gate.clone(),
            epoch,
            resume_key: opened.resume_key,
        });
        info!(volume, handle, mode = %opened.mode, generation, "volume opened");
        Ok(OpenedVolume { handle, mode: opened.mode, gate })
    }

    /// Closes `volume`'s handle at the server and forgets it. The caller has
    /// drained its I/O first.
    pub async fn close(&self, volume: &str) -> Result<(), SessionError> {
        let entry = {
            let mut r = lock(&self.shared.registry);
            let i = r.entries.iter().position(|e| e.volume == volume);
            i.map(|i| r.entries.remove(i))
        };
        let Some(entry) = entry else { return Ok(()) };
        entry.gate.close();
        let (client, _) = self.shared.client()?;
        match client.request(Request::Close { handle: HandleId(entry.handle) }).await {
            Ok(_) => Ok(()),
            // Already gone at the server (revoked, broken): closed is closed.
            Err(ControlClientError::Server(e)) if e.code == ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The current handle of `volume` (it changes when a handle is recovered
    /// after a reconnect).
    pub fn handle_status(&self, volume: &str) -> Option<HandleStatus> {
        let r = lock(&self.shared.registry);
        r.entries.iter().find(|e| e.volume == volume).map(|e| HandleStatus {
            volume: e.volume.clone(),
            handle: e.handle,
            mode: e.mode,
            gate: e.gate.status(),
        })
    }

    /// Registers preserved copy-on-write chunks of `volume`'s newest
    /// snapshot (see [`crate::cow`]). Survives connection loss and server
    /// restarts: it waits for the session to reconnect and resume the
    /// handle, then sends again (registrations are idempotent). Fails only
    /// when the server refuses or the volume's handle is gone.
    pub async fn cow_register(
        &self,
        volume: &str,
        snapshot: u64,
        chunks: Vec<u64>,
        server_copies: bool,
    ) -> Result<(), String> {
        let mut status = self.shared.status.subscribe();
        let mut pause = Duration::from_millis(20);
        loop {
            let Some(h) = self.handle_status(volume) else {
                return Err(format!("volume {volume} is no longer attached"));
            };
            if matches!(h.gate.phase, crate::gate::Phase::Revoked { .. } | crate::gate::Phase::Closed) {
                return Err(format!("volume {volume}'s handle was {}", h.gate.state_word()));
            }
            let (handle, snapshot, chunks) = (HandleId(h.handle), SnapshotId(snapshot), chunks.clone());
            let request = if server_copies {
                Request::CowCopy { handle, snapshot, chunks }
            } else {
                Request::CowRegister { handle, snapshot, chunks }
            };
            let why = match self.shared.client() {
                Ok((client, _)) => match client.request(request).await {
                    Ok(Response::CowRegistered { .. }) => return Ok(()),
                    Ok(other) => return Err(format!("the metadata server answered a registration with {other:?}")),
                    // In its grace period, or the handle not resumed on this
                    // connection yet: both pass by themselves.
                    Err(ControlClientError::Server(e))
                        if matches!(e.code, ErrorCode::Unavailable | ErrorCode::NotFound) =>
                    {
                        e.message
                    }
                    Err(ControlClientError::Server(e)) => return Err(e.message),
                    Err(e) => e.to_string(),
                },
                Err(SessionError::ShutDown) => return Err("the agent is shutting down".to_string()),
                Err(e) => e.to_string(),
            };
            debug!(volume, %snapshot, %why, retry_in_ms = pause.as_millis() as u64, "copy-on-write registration not done yet");
            // Retry on the next connection change, or after a pause (a
            // resume after reconnecting does not change the state).
            let _ = tokio::time::timeout(pause, status.changed()).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Stops the session task and closes the connection.
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        let conn = lock(&self.shared.connection).take();
        if let Some(c) = conn {
            c.client.close().await;
        }
    }
}

impl Shared {
    fn client(&self) -> Result<(ControlClient, u64), SessionError> {
        if *self.stop.borrow() {
            return Err(SessionError::ShutDown);
        }
        match &*lock(&self.connection) {
            Some(c) if !c.client.is_closed() => Ok((c.client.clone(), c.epoch)),
            _ => Err(SessionError::NotConnected {
                addr: self.config.addr.to_string(),
                last: match &*self.status.borrow() {
                    ConnectState::Connecting { last_error } => last_error.clone(),
                    _ => None,
                },
            }),
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    async fn run(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = RECONNECT_BACKOFF_MIN;
        let mut backoff_max = RECONNECT_BACKOFF_MAX;
        let mut epoch = 0u64;
        let mut ever_connected = false;
        let addrs: Vec<ControlAddr> =
            std::iter::once(self.config.addr.clone()).chain(self.config.more_addrs.iter().cloned()).collect();
        let mut next_addr = 0usize;
        while !self.stopped() {
            let started = Instant::now();
            let c = &self.config;
            let addr = &addrs[next_addr % addrs.len()];
            let connected = tokio::select! {
                r = ControlClient::connect(addr, &c.key, Some(&c.server_key), Role::Agent, &c.name, c.instance) => r,
                _ = until_stopped(&mut stop) => break,
            };
            match connected {
                Ok((client, events)) => {
                    epoch += 1;
                    ever_connected = true;
                    backoff = RECONNECT_BACKOFF_MIN;
                    backoff_max = RECONNECT_BACKOFF_MAX
                        .min(Duration::from_millis(client.session().lease_ms / 4))
                        .max(RECONNECT_BACKOFF_MIN);
                    let lease_ms = client.session().lease_ms;
                    info!(epoch, lease_ms, %addr, session = client.session().session, "connected to the metadata server");
                    *lock(&self.connection) = Some(Connection {
                        client: client.clone(),
                        epoch,
                        lease_until: started + Duration::from_millis(lease_ms),
                        lease_ms,
                    });
                    self.renewed(epoch, started, lease_ms);
                    self.status.send_replace(ConnectState::Connected { epoch });
                    self.clone().serve(client, epoch, lease_ms, events).await;
                    lock(&self.connection).take();
                    if self.stopped() {
                        break;
                    }
                    warn!(epoch, "lost the connection to the metadata server; I/O continues until the lease runs out, reconnecting");
                    self.status.send_replace(ConnectState::Connecting {
                        last_error: Some("the connection to the metadata server was lost".into()),
                    });
                }
                Err(e) => {
                    let fatal = matches!(&e, ControlClientError::Handshake { .. });
                    if fatal && !ever_connected {
                        error!(error = %e, "the metadata server refused this agent");
                        self.status.send_replace(ConnectState::Fatal(e.to_string()));
                        return;
                    }
                    warn!(error = %e, %addr, retry_in_ms = backoff.as_millis() as u64, "cannot reach the metadata server");
                    self.status.send_replace(ConnectState::Connecting { last_error: Some(format!("{addr}: {e}")) });
                    next_addr += 1;
                    // Try every address once before backing off.
                    if !next_addr.is_multiple_of(addrs.len()) {
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = until_stopped(&mut stop) => break,
            }
            backoff = (backoff * 2).min(backoff_max);
        }
        self.status.send_replace(ConnectState::Stopped);
    }

    /// Serves one connection until it closes or the session stops.
    async fn serve(
        self: Arc<Self>,
        client: ControlClient,
        epoch: u64,
        lease_ms: u64,
        mut events: mpsc::Receiver<ServerEvent>,
    ) {
        self.recover(&client, epoch).await;
        let period = Duration::from_millis(lease_ms / 3).max(RENEW_PERIOD_MIN);
        let mut renew = tokio::time::interval_at(Instant::now() + period, period);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewing: Option<tokio::task::JoinHandle<()>> = None;
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    // One renewal at a time; a slow server must not pile them up.
                    if renewing.as_ref().is_some_and(|t| !t.is_finished()) {
                        warn!(epoch, "the previous lease renewal has not been answered yet");
                        continue;
                    }
                    renewing = Some(tokio::spawn(self.clone().renew(client.clone(), epoch, period)));
                    self.retry_recovery(&client, epoch).await;
                }
                event = events.recv() => match event {
                    Some(event) => self.clone().dispatch(event, &client),
                    None => break,
                },
                _ = until_stopped(&mut stop) => break,
            }
        }
        if let Some(t) = renewing {
            t.abort();
        }
    }

    async fn renew(self: Arc<Self>, client: ControlClient, epoch: u64, timeout: Duration) {
        let sent = Instant::now();
        match client.request_with_timeout(Request::Renew, timeout).await {
            Ok(Response::Lease { lease_ms }) => self.renewed(epoch, sent, lease_ms),
            Ok(other) => warn!(epoch, "unexpected answer to a lease renewal: {other:?}"),
            Err(e) => warn!(epoch, error = %e, "lease renewal failed"),
        }
    }

    /// A renewal sent at `sent` on connection `epoch` granted `lease_ms`.
    fn renewed(&self, epoch: u64, sent: Instant, lease_ms: u64) {
        let until = sent + Duration::from_millis(lease_ms);
        {
            let mut conn = lock(&self.connection);
            match conn.as_mut() {
                Some(c) if c.epoch == epoch => {
                    // Replies can arrive out of order: never move the lease back.
                    c.lease_until = c.lease_until.max(until);
                    c.lease_ms = lease_ms;
                }
                _ => return,
            }
        }
        for e in lock(&self.registry).entries.iter().filter(|e| e.epoch == epoch) {
            if e.gate.lease_until().is_none_or(|old| until > old) {
                e.gate.renew_lease(until);
            }
        }
        debug!(epoch, lease_ms, "lease renewed");
    }

    fn register(&self, entry: Entry) {
        let handle = entry.handle;
        let gate = entry.gate.clone();
        let replay: Vec<ServerEvent> = {
            let mut r = lock(&self.registry);
            r.entries.push(entry);
            let (mine, others) = r.orphans.drain(..).partition(|e| event_handle(e) == handle);
            r.orphans = others;
            mine.into()
        };
        for event in replay {
            debug!(handle, "replaying an event that arrived before the handle was registered");
            self.apply(event, &gate, None);
        }
    }

    /// Routes one server event to its volume's gate.
    fn dispatch(self: Arc<Self>, event: ServerEvent, client: &ControlClient) {
        let handle = event_handle(&event);
        let gate = {
            let mut r = lock(&self.registry);
            match r.entries.iter().find(|e| e.handle == handle) {
                Some(e) => e.gate.clone(),
                None => {
                    if r.orphans.len() >= ORPHAN_EVENTS_MAX {
                        r.orphans.pop_front();
                    }
                    debug!(handle, "event for a handle not registered (yet); keeping it");
                    r.orphans.push_back(event);
                    return;
                }
            }
        };
        self.apply(event, &gate, Some(client));
    }

    fn apply(&self, event: ServerEvent, gate: &Arc<Gate<Layout>>, client: Option<&ControlClient>) {
        match event {
            ServerEvent::Recall { handle, generation } => {
                let handle = handle.0;
                info!(handle, generation, "recall: draining I/O");
                if let Err(e) = gate.begin_recall(generation) {
                    warn!(handle, generation, error = %e, "cannot recall");
                    return;
                }
                let gate = gate.clone();
                let client = match client {
                    Some(c) => c.clone(),
                    None => match self.client() {
                        Ok((c, _)) => c,
                        Err(e) => return warn!(handle, error = %e, "cannot confirm the recall"),
                    },
                };
                tokio::spawn(
                    async move {
                        match gate.drained().await {
                            Ok(()) => {
                                match client.request(Request::RecallDone { handle: HandleId(handle), generation }).await
                                {
                                    Ok(_) => info!(handle, generation, "recall confirmed to the metadata server"),
                                    Err(e) => warn!(handle, generation, error = %e, "confirming the recall failed"),
                                }
                            }
                            Err(e) => warn!(handle, generation, error = %e, "recall abandoned"),
                        }
                    }
                    .in_current_span(),
                );
            }
            ServerEvent::Publish { handle, description } => {
                let (handle, description) = (handle.0, *description);
                let generation = description.layout_generation;
                match (self.builder)(description) {
                    Ok(layout) => match gate.publish(Arc::new(layout), generation) {
                        Ok(()) => info!(handle, generation, "new layout published; I/O resumes"),
                        Err(e) => warn!(handle, generation, error = %e, "ignoring published layout"),
                    },
                    Err(reason) => {
                        error!(handle, generation, %reason, "the published layout is unusable");
                        gate.revoke(format!("the metadata server published an unusable layout: {reason}"));
                    }
                }
            }
            ServerEvent::Revoked { handle, reason } => {
                let handle = handle.0;
                warn!(handle, %reason, "handle revoked by the metadata server");
                gate.revoke(reason);
            }
        }
    }

    /// Brings handles opened on an older connection over to `client`.
    ///
    /// With a resume key: [`resume`](Shared::resume) — same handle, new
    /// lease, nothing else changes. Until the resume succeeds the handle keeps
    /// its old lease, so its I/O is held (not failed) once that lease has run
    /// out; "not now" (the server's grace period, a transport error) is
    /// retried on every renewal tick.
    ///
    /// Without one (a server that issues none): close the old handle (best
    /// effort) and re-open the volume in the same mode, then publish the new
    /// description into the same gate. A conflict (the server still counts
    /// our old handle) is retried on every renewal tick; any other refusal
    /// revokes the volume with the server's message.
    async fn recover(&self, client: &ControlClient, epoch: u64) {
        type Stale = (String, u64, OpenMode, Arc<Gate<Layout>>, Vec<u8>);
        let stale: Vec<Stale> = lock(&self.registry)
            .entries
            .iter()
            .filter(|e| e.epoch != epoch && !matches!(e.gate.status().phase, crate::gate::Phase::Revoked { .. }))
            .map(|e| (e.volume.clone(), e.handle, e.mode, e.gate.clone(), e.resume_key.clone()))
            .collect();
        for (volume, old_handle, mode, gate, key) in stale {
            if !key.is_empty() {
                self.resume(client, epoch, &volume, old_handle, &gate, key).await;
                continue;
            }
            let _ = client.request(Request::Close { handle: HandleId(old_handle) }).await;
            let sent = Instant::now();
            match client.request(Request::Open { volume: volume.clone(), mode }).await {
                Ok(Response::Opened(opened)) => {
                    let generation = opened.description.layout_generation;
                    let published = (self.builder)(opened.description)
                        .map_err(|reason| GateError::Revoked { reason })
                        .and_then(|layout| gate.publish(Arc::new(layout), generation));
                    if let Err(e) = published {
                        gate.revoke(format!("could not re-open after reconnecting: {e}"));
                        continue;
                    }
                    gate.renew_lease(sent + Duration::from_millis(opened.lease_ms));
                    let mut r = lock(&self.registry);
                    if let Some(e) = r.entries.iter_mut().find(|e| e.volume == volume) {
                        e.handle = opened.handle.0;
                        e.epoch = epoch;
                    }
                    info!(volume, old_handle, handle = opened.handle.0, "re-opened after reconnecting");
                }
                Err(ControlClientError::Server(e)) if e.code == ErrorCode::Conflict => {
                    info!(volume, reason = %e.message, "cannot re-open yet; I/O stays held, retrying");
                }
                Err(ControlClientError::Server(e)) => {
                    gate.revoke(format!("re-opening after reconnecting was refused: {}", e.message));
                }
                Ok(other) => warn!(volume, "unexpected answer to Open: {other:?}"),
                Err(e) => warn!(volume, error = %e, "re-opening after reconnecting failed; retrying"),
            }
        }
    }

    /// Resumes `handle` on connection `epoch` with its resume key.
    async fn resume(
        &self,
        client: &ControlClient,
        epoch: u64,
        volume: &str,
        handle: u64,
        gate: &Arc<Gate<Layout>>,
        key: Vec<u8>,
    ) {
        let sent = Instant::now();
        match client.request(Request::Resume { key }).await {
            Ok(Response::Opened(opened)) if opened.handle.0 == handle => {
                let generation = opened.description.layout_generation;
                if generation != gate.status().generation {
                    let published = (self.builder)(opened.description)
                        .map_err(|reason| GateError::Revoked { reason })
                        .and_then(|layout| gate.publish(Arc::new(layout), generation));
                    if let Err(e) = published {
                        gate.revoke(format!("the layout after resuming is unusable: {e}"));
                        return;
                    }
                }
                gate.renew_lease(sent + Duration::from_millis(opened.lease_ms));
                if let Some(e) = lock(&self.registry).entries.iter_mut().find(|e| e.handle == handle) {
                    e.epoch = epoch;
                }
                info!(volume, handle, "handle resumed after reconnecting: unchanged");
            }
            Ok(other) => warn!(volume, handle, "unexpected answer to Resume: {other:?}; retrying"),
            Err(ControlClientError::Server(e)) if e.code == ErrorCode::Unavailable => {
                info!(volume, handle, reason = %e.message, "cannot resume yet; I/O stays held, retrying");
            }
            Err(ControlClientError::Server(e)) => {
                // Broken (another client has the volume), closed, or a key
                // the server does not accept: writing on would be unsafe.
                error!(volume, handle, reason = %e.message, "the metadata server refused the resume; failing the volume's I/O");
                gate.revoke(e.message);
            }
            Err(e) => warn!(volume, handle, error = %e, "resuming failed; retrying"),
        }
    }

    async fn retry_recovery(&self, client: &ControlClient, epoch: u64) {
        let pending = lock(&self.registry).entries.iter().any(|e| e.epoch != epoch);
        if pending {
            self.recover(client, epoch).await;
        }
    }
}

fn event_handle(event: &ServerEvent) -> u64 {
    match event {
        ServerEvent::Recall { handle, .. }
        | ServerEvent::Publish { handle, .. }
        | ServerEvent::Revoked { handle, .. } => handle.0,
    }
}

/// Resolves once the session is told to stop (the guard `wait_for` returns
/// must not live across an await).
async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
