//! A simulated agent control plane that follows the protocol, in the shape
//! of the real agent's sans-IO core (`client-agent`'s `core::AgentCore`,
//! work in progress on the `agentloop` branch): [`AgentModel::apply`] takes
//! an [`Input`] at the agent's clock and returns [`Effect`]s for its shell.
//! The shell ([`super::AgentHost`]) never looks inside, so the real core can
//! replace this one behind the same inputs and effects (an adapter maps
//! them) once it is on main.
//!
//! The protocol as this agent follows it:
//! - One control connection at a time; on failure, reconnect with capped
//!   exponential backoff over the server addresses in turn.
//! - `Renew` every `lease_ms / 3`. The lease of a handle runs until *send
//!   time* of the renewal + `lease_ms` (the server counts from receipt, so
//!   the agent's lease always ends first), and only renewals on the
//!   connection the handle lives on extend it.
//! - Open: the lease starts at the `Open`'s send time.
//! - Recall: hold new I/O, drain, then `RecallDone` on the handle's
//!   connection. `Publish` installs the new layout and reopens.
//!   `Revoked`: fail all I/O.
//! - After a reconnect, every handle is resumed with its resume key on the
//!   new connection (lease from the `Resume`'s send time). A handle whose
//!   recall is drained is confirmed again there (`RecallDone` is idempotent
//!   at the server): if the server answers that no such recall is pending
//!   (it restarted, or the change failed), the recall is over and the
//!   layout from the resume answer is installed. (Issue 19: a pending recall
//!   survives a blip; `RecallDone` is retried until the server has it.)
//! - Events for a handle not known yet (an event overtaking the reply to
//!   its `Open`) are kept and replayed when the handle is registered.
//! - Copy-on-write registrations are retried across reconnects until
//!   answered.

use std::collections::{BTreeMap, VecDeque};

use volume_format::control::messages::{ControlError, ErrorCode, OpenMode, Request, Response, ServerEvent};
use volume_format::{HandleId, SnapshotId, VolumeDescription};

/// Milliseconds on the agent's clock.
pub type Millis = u64;
/// The model's own connection numbers (the shell maps them to the network).
pub type ConnId = u64;
pub type RequestId = u64;
pub type CallerId = u64;
pub type AttachmentId = u64;

/// Most server events kept for handles not registered yet.
pub const ORPHAN_EVENTS_MAX: usize = 256;
/// First and largest wait before reconnecting.
pub const BACKOFF_MIN_MS: u64 = 20;

#[derive(Debug, Clone)]
pub enum OpenWith {
    Mode(OpenMode),
    Handover(Vec<u8>),
}

#[derive(Debug, Clone)]
pub enum Command {
    Attach { volume: String, open: OpenWith },
    Detach { volume: String },
    Handover { volume: String, to_key: [u8; 32] },
}

#[derive(Debug, Clone)]
pub enum RequestError {
    Server(ControlError),
    Closed,
}

#[derive(Debug, Clone)]
pub enum Input {
    Command { caller: CallerId, command: Command },
    CowRegister { caller: CallerId, volume: String, snapshot: u64, chunks: Vec<u64>, server_copies: bool },
    Connected { conn: ConnId, lease_ms: u64 },
    ConnectFailed { conn: ConnId },
    ConnectionLost { conn: ConnId },
    Event { event: ServerEvent },
    Reply { request: RequestId, result: Result<Response, RequestError> },
    Prepared { attachment: AttachmentId },
    Drained { attachment: AttachmentId, generation: u64 },
    Detached { attachment: AttachmentId },
    Tick,
}

#[derive(Debug, Clone)]
pub enum Reply {
    Attached { handle: u64 },
    Done,
    Token(Vec<u8>),
    Registered(Result<(), String>),
    Failed(String),
}

#[derive(Debug, Clone)]
pub enum Effect {
    Connect { conn: ConnId, addr: usize },
    Send { conn: ConnId, request: RequestId, message: Request },
    Reply { caller: CallerId, reply: Reply },
    /// Install the gate of a newly opened handle, then report `Prepared`.
    StartAttach { attachment: AttachmentId, volume: String, handle: u64, mode: OpenMode, description: Box<VolumeDescription>, lease_until_ms: Millis },
    /// Hold new I/O; report `Drained` once in-flight I/O finished.
    BeginRecall { attachment: AttachmentId, generation: u64 },
    Publish { attachment: AttachmentId, description: Box<VolumeDescription> },
    Revoke { attachment: AttachmentId, reason: String },
    RenewLease { attachment: AttachmentId, until_ms: Millis },
    /// Flush and drain; report `Detached`.
    StartDetach { attachment: AttachmentId },
    Forget { attachment: AttachmentId },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkPhase {
    Idle { retry_at: Millis },
    Connecting { conn: ConnId },
    Live { conn: ConnId, lease_ms: u64, next_renew: Millis, renewing: Option<RequestId> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatePhase {
    Open,
    Recalled { generation: u64 },
    Revoked,
}

#[derive(Debug, Clone)]
struct PendingRecall {
    generation: u64,
    drained: bool,
    confirmed: bool,
}

#[derive(Debug, Clone)]
struct Held {
    handle: u64,
    mode: OpenMode,
    resume_key: Vec<u8>,
    conn: ConnId,
    lease_until: Millis,
    phase: GatePhase,
    generation: u64,
    description: VolumeDescription,
    recall: Option<PendingRecall>,
    resuming: bool,
    /// Detached locally; the `Close` waits for the handle's connection.
    closing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Opening,
    Preparing,
    Attached,
    Detaching,
}

#[derive(Debug, Clone)]
struct Vol {
    id: AttachmentId,
    caller: Option<CallerId>,
    stage: Stage,
    held: Option<Held>,
}

#[derive(Debug, Clone)]
enum Purpose {
    Renew,
    Open { volume: String },
    Resume { volume: String },
    RecallDone { volume: String, generation: u64, after_resume: bool },
    Close { volume: String },
    Handover { caller: CallerId },
    Cow { reg: u64 },
}

#[derive(Debug, Clone)]
struct Pending {
    conn: ConnId,
    sent: Millis,
    purpose: Purpose,
}

#[derive(Debug, Clone)]
struct Registration {
    caller: CallerId,
    volume: String,
    snapshot: u64,
    chunks: Vec<u64>,
    server_copies: bool,
    in_flight: Option<RequestId>,
    retry_at: Option<Millis>,
}

pub struct AgentModel {
    addrs: usize,
    addr: usize,
    backoff_ms: u64,
    backoff_max_ms: u64,
    phase: LinkPhase,
    next_conn: ConnId,
    next_request: RequestId,
    next_attachment: AttachmentId,
    next_reg: u64,
    volumes: BTreeMap<String, Vol>,
    requests: BTreeMap<RequestId, Pending>,
    registrations: BTreeMap<u64, Registration>,
    orphans: VecDeque<ServerEvent>,
    out: Vec<Effect>,
}

impl AgentModel {
    pub fn new(addrs: usize, lease_ms_hint: u64) -> AgentModel {
        AgentModel {
            addrs: addrs.max(1),
            addr: 0,
            backoff_ms: BACKOFF_MIN_MS,
            backoff_max_ms: (lease_ms_hint / 4).max(BACKOFF_MIN_MS),
            phase: LinkPhase::Idle { retry_at: 0 },
            next_conn: 0,
            next_request: 0,
            next_attachment: 0,
            next_reg: 0,
            volumes: BTreeMap::new(),
            requests: BTreeMap::new(),
            registrations: BTreeMap::new(),
            orphans: VecDeque::new(),
            out: Vec::new(),
        }
    }

    pub fn apply(&mut self, now: Millis, input: Input) -> Vec<Effect> {
        match input {
            Input::Command { caller, command } => self.command(now, caller, command),
            Input::CowRegister { caller, volume, snapshot, chunks, server_copies } => {
                self.next_reg += 1;
                let reg = Registration { caller, volume, snapshot, chunks, server_copies, in_flight: None, retry_at: None };
                self.registrations.insert(self.next_reg, reg);
                self.send_registration(now, self.next_reg);
            }
            Input::Connected { conn, lease_ms } => {
                if self.phase == (LinkPhase::Connecting { conn }) {
                    self.phase = LinkPhase::Live { conn, lease_ms, next_renew: now + lease_ms / 3, renewing: None };
                    self.backoff_ms = BACKOFF_MIN_MS;
                    self.backoff_max_ms = (lease_ms / 4).max(BACKOFF_MIN_MS);
                    self.recover(now);
                    let regs: Vec<u64> = self.registrations.keys().copied().collect();
                    for r in regs {
                        self.send_registration(now, r);
                    }
                }
            }
            Input::ConnectFailed { conn } => {
                if self.phase == (LinkPhase::Connecting { conn }) {
                    self.idle(now);
                }
            }
            Input::ConnectionLost { conn } => {
                let live = match self.phase {
                    LinkPhase::Live { conn: c, .. } | LinkPhase::Connecting { conn: c } => c == conn,
                    LinkPhase::Idle { .. } => false,
                };
                if live {
                    self.idle(now);
                }
                let lost: Vec<RequestId> =
                    self.requests.iter().filter(|(_, p)| p.conn == conn).map(|(id, _)| *id).collect();
                for request in lost {
                    self.reply(now, request, Err(RequestError::Closed));
                }
            }
            Input::Event { event } => self.event(now, event),
            Input::Reply { request, result } => self.reply(now, request, result),
            Input::Prepared { attachment } => {
                if let Some(v) = self.volumes.values_mut().find(|v| v.id == attachment) {
                    if v.stage == Stage::Preparing {
                        v.stage = Stage::Attached;
                        let handle = v.held.as_ref().map_or(0, |h| h.handle);
                        if let Some(caller) = v.caller.take() {
                            self.out.push(Effect::Reply { caller, reply: Reply::Attached { handle } });
                        }
                    }
                }
            }
            Input::Drained { attachment, generation } => self.drained(now, attachment, generation),
            Input::Detached { attachment } => {
                let found = self.volumes.iter().find(|(_, v)| v.id == attachment).map(|(n, _)| n.clone());
                if let Some(name) = found {
                    let revoked = self.volumes[&name].held.as_ref().is_none_or(|h| h.phase == GatePhase::Revoked);
                    if revoked {
                        // The server dropped it already (or will): nothing to close.
                        self.forget(&name, Reply::Done);
                    } else {
                        if let Some(h) = self.volumes.get_mut(&name).and_then(|v| v.held.as_mut()) {
                            h.closing = true;
                        }
                        self.send_close(now, &name);
                    }
                }
            }
            Input::Tick => {}
        }
        self.timers(now);
        std::mem::take(&mut self.out)
    }

    /// When the model next needs a `Tick`.
    pub fn next_deadline(&self) -> Option<Millis> {
        let link = match self.phase {
            LinkPhase::Idle { retry_at } => Some(retry_at),
            LinkPhase::Live { next_renew, .. } => Some(next_renew),
            LinkPhase::Connecting { .. } => None,
        };
        // Registrations wait for a connection; only a live one has retry times.
        let regs = self.live_conn().and_then(|_| self.registrations.values().filter_map(|r| r.retry_at).min());
        [link, regs].into_iter().flatten().min()
    }

    /// The lease of the handle of `volume` (on the agent's clock).
    pub fn lease_until(&self, volume: &str) -> Option<Millis> {
        self.volumes.get(volume)?.held.as_ref().map(|h| h.lease_until)
    }

    /// The gate phase of `volume`'s handle, for the liveness checks.
    pub fn gate_phase(&self, volume: &str) -> Option<GatePhase> {
        self.volumes.get(volume)?.held.as_ref().map(|h| h.phase.clone())
    }

    pub fn is_attached(&self, volume: &str) -> bool {
        self.volumes.get(volume).is_some_and(|v| v.stage == Stage::Attached)
    }

    pub fn connected(&self) -> bool {
        matches!(self.phase, LinkPhase::Live { .. })
    }

    fn live_conn(&self) -> Option<ConnId> {
        match self.phase {
            LinkPhase::Live { conn, .. } => Some(conn),
            _ => None,
        }
    }

    fn idle(&mut self, now: Millis) {
        self.phase = LinkPhase::Idle { retry_at: now + self.backoff_ms };
        self.backoff_ms = (self.backoff_ms * 2).min(self.backoff_max_ms);
        self.addr = (self.addr + 1) % self.addrs;
    }

    fn send(&mut self, conn: ConnId, now: Millis, message: Request, purpose: Purpose) -> RequestId {
        self.next_request += 1;
        let request = self.next_request;
        self.requests.insert(request, Pending { conn, sent: now, purpose });
        self.out.push(Effect::Send { conn, request, message });
        request
    }

    fn timers(&mut self, now: Millis) {
        match self.phase.clone() {
            LinkPhase::Idle { retry_at } if now >= retry_at => {
                self.next_conn += 1;
                let conn = self.next_conn;
                self.phase = LinkPhase::Connecting { conn };
                self.out.push(Effect::Connect { conn, addr: self.addr });
            }
            LinkPhase::Live { conn, lease_ms, next_renew, renewing } if now >= next_renew => {
                let renewing = match renewing {
                    Some(r) => Some(r),
                    None => Some(self.send(conn, now, Request::Renew, Purpose::Renew)),
                };
                self.phase = LinkPhase::Live { conn, lease_ms, next_renew: now + lease_ms / 3, renewing };
                self.recover(now);
            }
            _ => {}
        }
        let due: Vec<u64> = self
            .registrations
            .iter()
            .filter(|(_, r)| r.in_flight.is_none() && r.retry_at.is_some_and(|t| now >= t))
            .map(|(id, _)| *id)
            .collect();
        for r in due {
            self.send_registration(now, r);
        }
    }

    fn command(&mut self, now: Millis, caller: CallerId, command: Command) {
        match command {
            Command::Attach { volume, open } => {
                if self.volumes.contains_key(&volume) {
                    let reply = Reply::Failed(format!("volume {volume} is already attached"));
                    return self.out.push(Effect::Reply { caller, reply });
                }
                let Some(conn) = self.live_conn() else {
                    let reply = Reply::Failed("not connected to the metadata server".into());
                    return self.out.push(Effect::Reply { caller, reply });
                };
                self.next_attachment += 1;
                let vol = Vol { id: self.next_attachment, caller: Some(caller), stage: Stage::Opening, held: None };
                self.volumes.insert(volume.clone(), vol);
                let message = match open {
                    OpenWith::Mode(mode) => Request::Open { volume: volume.clone(), mode },
                    OpenWith::Handover(token) => Request::OpenHandover { token },
                };
                self.send(conn, now, message, Purpose::Open { volume });
            }
            Command::Detach { volume } => {
                let Some(v) = self.volumes.get_mut(&volume).filter(|v| v.stage == Stage::Attached) else {
                    let reply = Reply::Failed(format!("volume {volume} is not attached (or busy)"));
                    return self.out.push(Effect::Reply { caller, reply });
                };
                v.stage = Stage::Detaching;
                v.caller = Some(caller);
                let attachment = v.id;
                self.out.push(Effect::StartDetach { attachment });
            }
            Command::Handover { volume, to_key } => {
                let held = self.volumes.get(&volume).and_then(|v| v.held.as_ref()).map(|h| (h.handle, h.conn));
                match (held, self.live_conn()) {
                    (Some((handle, hconn)), Some(conn)) if hconn == conn => {
                        let message = Request::Handover { handle: HandleId(handle), to_key };
                        self.send(conn, now, message, Purpose::Handover { caller });
                    }
                    _ => {
                        let reply = Reply::Failed("not attached or not connected".into());
                        self.out.push(Effect::Reply { caller, reply });
                    }
                }
            }
        }
    }

    fn event(&mut self, now: Millis, event: ServerEvent) {
        let handle = match &event {
            ServerEvent::Recall { handle, .. }
            | ServerEvent::Publish { handle, .. }
            | ServerEvent::Revoked { handle, .. } => handle.0,
        };
        let Some(name) = self.volume_of_handle(handle) else {
            if self.orphans.len() >= ORPHAN_EVENTS_MAX {
                self.orphans.pop_front();
            }
            self.orphans.push_back(event);
            return;
        };
        let v = self.volumes.get_mut(&name).expect("found above");
        let attachment = v.id;
        let h = v.held.as_mut().expect("found by handle");
        match event {
            ServerEvent::Recall { generation, .. } => {
                if h.phase == GatePhase::Revoked || generation <= h.generation {
                    return;
                }
                if h.phase == (GatePhase::Recalled { generation }) {
                    // Sent again (a resume, or a new change with the same
                    // generation after an abandoned one): confirm again if drained.
                    if h.recall.as_ref().is_some_and(|r| r.drained) {
                        let (conn, handle) = (h.conn, h.handle);
                        if self.live_conn() == Some(conn) {
                            let message = Request::RecallDone { handle: HandleId(handle), generation };
                            let purpose = Purpose::RecallDone { volume: name, generation, after_resume: false };
                            self.send(conn, now, message, purpose);
                        }
                    }
                    return;
                }
                h.phase = GatePhase::Recalled { generation };
                h.recall = Some(PendingRecall { generation, drained: false, confirmed: false });
                self.out.push(Effect::BeginRecall { attachment, generation });
            }
            ServerEvent::Publish { description, .. } => {
                if h.phase == GatePhase::Revoked || description.layout_generation < h.generation {
                    return;
                }
                h.phase = GatePhase::Open;
                h.generation = description.layout_generation;
                h.recall = None;
                h.description = (*description).clone();
                self.out.push(Effect::Publish { attachment, description });
            }
            ServerEvent::Revoked { reason, .. } => self.revoke(&name, reason),
        }
    }

    fn volume_of_handle(&self, handle: u64) -> Option<String> {
        self.volumes
            .iter()
            .find(|(_, v)| v.stage != Stage::Opening && v.held.as_ref().is_some_and(|h| h.handle == handle))
            .map(|(n, _)| n.clone())
    }

    fn revoke(&mut self, name: &str, reason: String) {
        let Some(v) = self.volumes.get_mut(name) else { return };
        let attachment = v.id;
        if let Some(h) = v.held.as_mut() {
            if h.phase == GatePhase::Revoked {
                return;
            }
            h.phase = GatePhase::Revoked;
            h.recall = None;
        }
        self.out.push(Effect::Revoke { attachment, reason });
    }

    fn drained(&mut self, now: Millis, attachment: AttachmentId, generation: u64) {
        let live = self.live_conn();
        let Some((name, v)) = self.volumes.iter_mut().find(|(_, v)| v.id == attachment) else { return };
        let name = name.clone();
        let Some(h) = v.held.as_mut() else { return };
        match h.recall.as_mut() {
            Some(r) if r.generation == generation => r.drained = true,
            _ => return,
        }
        if live == Some(h.conn) {
            let message = Request::RecallDone { handle: HandleId(h.handle), generation };
            let conn = h.conn;
            self.send(conn, now, message, Purpose::RecallDone { volume: name, generation, after_resume: false });
        }
    }

    /// Resumes every handle living on an older connection.
    fn recover(&mut self, now: Millis) {
        let Some(conn) = self.live_conn() else { return };
        let todo: Vec<(String, Vec<u8>)> = self
            .volumes
            .iter_mut()
            .filter_map(|(name, v)| {
                let h = v.held.as_mut()?;
                if h.conn == conn || h.resuming || h.phase == GatePhase::Revoked || v.stage == Stage::Opening {
                    return None;
                }
                h.resuming = true;
                Some((name.clone(), h.resume_key.clone()))
            })
            .collect();
        for (volume, key) in todo {
            self.send(conn, now, Request::Resume { key }, Purpose::Resume { volume });
        }
        let closes: Vec<String> = self
            .volumes
            .iter()
            .filter(|(_, v)| v.held.as_ref().is_some_and(|h| h.closing && h.conn == conn))
            .map(|(n, _)| n.clone())
            .collect();
        for name in closes {
            if !self.requests.values().any(|p| matches!(&p.purpose, Purpose::Close { volume } if *volume == name)) {
                self.send_close(now, &name);
            }
        }
    }

    fn send_close(&mut self, now: Millis, name: &str) {
        let Some(conn) = self.live_conn() else { return };
        let Some(h) = self.volumes.get(name).and_then(|v| v.held.as_ref()) else { return };
        if h.conn != conn {
            return; // after the resume
        }
        let message = Request::Close { handle: HandleId(h.handle) };
        self.send(conn, now, message, Purpose::Close { volume: name.to_string() });
    }

    fn send_registration(&mut self, now: Millis, id: u64) {
        let Some(conn) = self.live_conn() else { return };
        let Some(r) = self.registrations.get(&id) else { return };
        if r.in_flight.is_some() {
            return;
        }
        let Some(h) = self.volumes.get(&r.volume).and_then(|v| v.held.as_ref()) else {
            let r = self.registrations.remove(&id).expect("present");
            let reply = Reply::Registered(Err(format!("volume {} is not attached", r.volume)));
            return self.out.push(Effect::Reply { caller: r.caller, reply });
        };
        if h.conn != conn {
            return; // after the resume
        }
        let (handle, snapshot, chunks) = (HandleId(h.handle), SnapshotId(r.snapshot), r.chunks.clone());
        let message = if r.server_copies {
            Request::CowCopy { handle, snapshot, chunks }
        } else {
            Request::CowRegister { handle, snapshot, chunks }
        };
        let request = self.send(conn, now, message, Purpose::Cow { reg: id });
        let r = self.registrations.get_mut(&id).expect("present");
        r.in_flight = Some(request);
        r.retry_at = None;
    }

    fn reply(&mut self, now: Millis, request: RequestId, result: Result<Response, RequestError>) {
        let Some(pending) = self.requests.remove(&request) else { return };
        match pending.purpose {
            Purpose::Renew => {
                if let LinkPhase::Live { renewing, .. } = &mut self.phase {
                    if *renewing == Some(request) {
                        *renewing = None;
                    }
                }
                if let Ok(Response::Lease { lease_ms }) = result {
                    let until = pending.sent + lease_ms;
                    let mut renewed = Vec::new();
                    for v in self.volumes.values_mut() {
                        // A revoked handle has no lease to extend.
                        let renewable = |h: &&mut Held| h.conn == pending.conn && h.phase != GatePhase::Revoked;
                        if let Some(h) = v.held.as_mut().filter(renewable) {
                            if until > h.lease_until {
                                h.lease_until = until;
                                renewed.push(v.id);
                            }
                        }
                    }
                    for attachment in renewed {
                        self.out.push(Effect::RenewLease { attachment, until_ms: until });
                    }
                }
            }
            Purpose::Open { volume } => self.opened(now, pending.conn, pending.sent, volume, result),
            Purpose::Resume { volume } => self.resumed(now, pending.conn, pending.sent, volume, result),
            Purpose::RecallDone { volume, generation, after_resume } => {
                let Some(v) = self.volumes.get_mut(&volume) else { return };
                let attachment = v.id;
                let Some(h) = v.held.as_mut() else { return };
                let ours = h.recall.as_ref().is_some_and(|r| r.generation == generation)
                    && h.phase == (GatePhase::Recalled { generation });
                match result {
                    Ok(_) => {
                        if let Some(r) = h.recall.as_mut().filter(|r| r.generation == generation) {
                            r.confirmed = true;
                        }
                    }
                    // Asked right after a successful resume (so the handle
                    // is alive and ours): the server has no such recall any
                    // more; it will never publish for it.
                    Err(RequestError::Server(e)) if after_resume && ours && e.code == ErrorCode::InvalidArgument => {
                        h.phase = GatePhase::Open;
                        h.generation = h.description.layout_generation;
                        h.recall = None;
                        let description = Box::new(h.description.clone());
                        self.out.push(Effect::Publish { attachment, description });
                    }
                    Err(_) => {}
                }
            }
            Purpose::Close { volume } => match result {
                Ok(_) => self.forget(&volume, Reply::Done),
                Err(RequestError::Server(e)) if e.code == ErrorCode::NotFound => self.forget(&volume, Reply::Done),
                // Not closed (a failed commit, the grace period): the handle
                // lives on at the server, so it is kept, and the close is sent
                // again with the next renewal.
                Err(RequestError::Server(_)) | Err(RequestError::Closed) => {}
            },
            Purpose::Handover { caller } => {
                let reply = match result {
                    Ok(Response::HandoverToken { token, .. }) => Reply::Token(token),
                    Ok(other) => Reply::Failed(format!("unexpected answer {other:?}")),
                    Err(RequestError::Server(e)) => Reply::Failed(e.message),
                    Err(RequestError::Closed) => Reply::Failed("the connection closed".into()),
                };
                self.out.push(Effect::Reply { caller, reply });
            }
            Purpose::Cow { reg } => {
                let Some(r) = self.registrations.get_mut(&reg) else { return };
                r.in_flight = None;
                match result {
                    Ok(Response::CowRegistered { .. }) => {
                        let r = self.registrations.remove(&reg).expect("present");
                        self.out.push(Effect::Reply { caller: r.caller, reply: Reply::Registered(Ok(())) });
                    }
                    Err(RequestError::Server(e)) if e.code == ErrorCode::Unavailable => r.retry_at = Some(now + 50),
                    Err(RequestError::Closed) => {} // after the resume
                    Err(RequestError::Server(e)) => {
                        let r = self.registrations.remove(&reg).expect("present");
                        let reply = Reply::Registered(Err(e.message));
                        self.out.push(Effect::Reply { caller: r.caller, reply });
                    }
                    Ok(other) => {
                        let r = self.registrations.remove(&reg).expect("present");
                        let reply = Reply::Registered(Err(format!("unexpected answer {other:?}")));
                        self.out.push(Effect::Reply { caller: r.caller, reply });
                    }
                }
            }
        }
    }

    fn forget(&mut self, volume: &str, reply: Reply) {
        let Some(v) = self.volumes.remove(volume) else { return };
        self.out.push(Effect::Forget { attachment: v.id });
        if let Some(caller) = v.caller {
            self.out.push(Effect::Reply { caller, reply });
        }
        let regs: Vec<u64> =
            self.registrations.iter().filter(|(_, r)| r.volume == volume).map(|(id, _)| *id).collect();
        for id in regs {
            let r = self.registrations.remove(&id).expect("present");
            let reply = Reply::Registered(Err("the volume was detached".into()));
            self.out.push(Effect::Reply { caller: r.caller, reply });
        }
    }

    fn opened(&mut self, now: Millis, conn: ConnId, sent: Millis, volume: String, result: Result<Response, RequestError>) {
        let Some(v) = self.volumes.get_mut(&volume) else { return };
        match result {
            Ok(Response::Opened(o)) => {
                let lease_until = sent + o.lease_ms;
                let generation = o.description.layout_generation;
                v.held = Some(Held {
                    handle: o.handle.0,
                    mode: o.mode,
                    resume_key: o.resume_key,
                    conn,
                    lease_until,
                    phase: GatePhase::Open,
                    generation,
                    description: o.description.clone(),
                    recall: None,
                    resuming: false,
                    closing: false,
                });
                v.stage = Stage::Preparing;
                let (attachment, handle, mode) = (v.id, o.handle.0, o.mode);
                self.out.push(Effect::StartAttach {
                    attachment,
                    volume,
                    handle,
                    mode,
                    description: Box::new(o.description),
                    lease_until_ms: lease_until,
                });
                let (mine, others): (Vec<ServerEvent>, Vec<ServerEvent>) = self.orphans.drain(..).partition(|e| {
                    matches!(e, ServerEvent::Recall { handle: h, .. } | ServerEvent::Publish { handle: h, .. } | ServerEvent::Revoked { handle: h, .. } if h.0 == handle)
                });
                self.orphans = others.into();
                for e in mine {
                    self.event(now, e);
                }
            }
            other => {
                let why = match other {
                    Err(RequestError::Server(e)) => e.message,
                    Err(RequestError::Closed) => "the connection closed before the answer".into(),
                    Ok(o) => format!("unexpected answer {o:?}"),
                };
                let v = self.volumes.remove(&volume).expect("present");
                if let Some(caller) = v.caller {
                    self.out.push(Effect::Reply { caller, reply: Reply::Failed(why) });
                }
            }
        }
    }

    fn resumed(&mut self, now: Millis, conn: ConnId, sent: Millis, volume: String, result: Result<Response, RequestError>) {
        let Some(v) = self.volumes.get_mut(&volume) else { return };
        let attachment = v.id;
        let Some(h) = v.held.as_mut() else { return };
        h.resuming = false;
        match result {
            Ok(Response::Opened(o)) if o.handle.0 == h.handle => {
                let until = sent + o.lease_ms;
                h.conn = conn;
                h.description = o.description.clone();
                if until > h.lease_until {
                    h.lease_until = until;
                }
                let lease = h.lease_until;
                self.out.push(Effect::RenewLease { attachment, until_ms: lease });
                let generation = o.description.layout_generation;
                let mut confirm = None;
                match h.phase.clone() {
                    GatePhase::Open if generation != h.generation => {
                        h.generation = generation;
                        self.out.push(Effect::Publish { attachment, description: Box::new(o.description) });
                    }
                    GatePhase::Recalled { generation: g } if generation >= g => {
                        // The change committed; its Publish was lost.
                        h.phase = GatePhase::Open;
                        h.generation = generation;
                        h.recall = None;
                        self.out.push(Effect::Publish { attachment, description: Box::new(o.description) });
                    }
                    GatePhase::Recalled { generation: g } => {
                        if h.recall.as_ref().is_some_and(|r| r.drained) {
                            confirm = Some((h.handle, g));
                        }
                    }
                    _ => {}
                }
                if h.closing {
                    self.send_close(now, &volume);
                } else if let Some((handle, generation)) = confirm {
                    let message = Request::RecallDone { handle: HandleId(handle), generation };
                    self.send(conn, now, message, Purpose::RecallDone { volume: volume.clone(), generation, after_resume: true });
                }
                let regs: Vec<u64> =
                    self.registrations.iter().filter(|(_, r)| r.volume == volume).map(|(id, _)| *id).collect();
                for r in regs {
                    self.send_registration(now, r);
                }
            }
            Ok(_) | Err(RequestError::Closed) => {}
            Err(RequestError::Server(e)) if e.code == ErrorCode::Unavailable => {}
            Err(RequestError::Server(e)) => {
                if h.closing {
                    self.forget(&volume, Reply::Done);
                } else {
                    self.revoke(&volume, e.message);
                }
            }
        }
    }
}
