//! The agent's control plane as one state machine with one owner:
//! [`AgentCore`].
//!
//! Why one owner: the control plane used to be about eight locks (the
//! attached volumes, the handle registry, the connection, the device paths,
//! ...), one of them held across network round trips, so `sanvol-agent list`
//! waited behind a slow attach and the interleavings of recalls, reconnects
//! and detaches were hard to reason about. Now one task owns all of it
//! (attachments and their stages, handles with their leases, epochs and
//! resume keys, pending recalls and registrations, the connection, the
//! devices' direct paths) and its loop is `select` → `apply`.
//!
//! Why sans-IO: [`AgentCore::apply`] is synchronous over plain data and an
//! injected clock (`now_ms`), and returns [`Effect`]s — send this request,
//! reply to this caller, install this layout, start this attach task — that a
//! thin shell ([`crate::owner`]) performs, posting what comes back (replies,
//! server events, task results, probe results) as [`Input`]s. Nothing here
//! reads a clock, touches a socket or draws a random number, so a
//! deterministic simulator (issue 20) can drive the same logic with virtual
//! time and a simulated network, and unit tests can step it input by input.
//!
//! Long steps never run inside `apply`: an attach's device connects and
//! export bind, a detach's flushes and drain, a recall's drain and a probe
//! are tasks the shell starts on an effect and that report back as inputs.
//! So `list` and `status` answer at once whatever is in progress.
//!
//! The data path is not here: each volume's [`crate::gate::Gate`] (a small
//! lock and counters) admits I/O; the owner tells it what to do through
//! effects (recall, publish, revoke, renew the lease) and keeps its own
//! record of the gate ([`state::GateMirror`]) with the gate's own rules.
//!
//! # Layout
//! - [`state`]: what the owner knows per attachment, the serializable
//!   [`HeldHandle`], and the allow-lists of stage and gate transitions.
//! - [`link`]: the connection: attempts over every address, backoff,
//!   renewals, the lease.
//! - `volumes`: attach, detach, list, server events, resuming handles after
//!   a reconnect.
//! - `open_wait`: how long an attach waits for its `Open` (a live server
//!   replaying a cache mirror is waited for; a stopped one is not).
//! - `restore`: handles a previous run of the agent held (its state file),
//!   resumed and served again after a restart.
//! - `recalls`: draining and confirming recalls, confirmations retried until
//!   the server has them.
//! - `registrations`: copy-on-write registrations for the data path, retried
//!   across reconnects.
//! - `paths`: each device's direct path (fallback reports and probes).

mod closing;
pub mod link;
mod open_wait;
mod paths;
mod recalls;
mod registrations;
mod restore;
pub mod state;
mod volumes;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;

use tracing::{debug, warn};
use uuid::Uuid;
use volume_format::control::messages::{ControlError, ErrorCode, OpenMode, Request, Response, ServerEvent};
use volume_format::VolumeDescription;

pub use control_client::agent_api::{AgentStatus, AttachmentInfo};
pub use recalls::{CONFIRM_PAUSE_MAX_MS, CONFIRM_PAUSE_MIN_MS};
pub use registrations::IntentOp;
pub use state::{HeldHandle, PendingRecall, Stage};

use crate::agent::AgentError;
use crate::export::ExportTarget;
use crate::gate::Phase;
use crate::session::{ConnectState, SessionError};

/// Milliseconds on the shell's monotonic clock (virtual in a simulation).
pub type Millis = u64;

/// Server events kept for handles not registered yet.
pub const ORPHAN_EVENTS_MAX: usize = 256;

/// One connection attempt (and, once it succeeded, that connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One request the core sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Someone waiting for an answer (a control-socket caller, a copy-on-write
/// registration); the shell numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallerId(pub u64);

/// One attachment of a volume (a later attachment of the same volume gets
/// another id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttachmentId(pub u64);

/// What the core needs to know of its configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The server addresses, in the order they are tried (for messages).
    pub addrs: Vec<String>,
    /// Where unix-socket exports go by default (`DIR/VOLUME.sock`).
    pub export_dir: PathBuf,
}

/// What a caller asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Attach(AttachSpec),
    Detach {
        volume: String,
    },
    List,
    Status,
    /// A handover token for `volume` to the agent with public key `to_key`.
    Handover {
        volume: String,
        to_key: [u8; 32],
    },
    /// Detach everything (kernel devices stay connected) and stop.
    Shutdown,
    /// Take back a handle a previous run of this agent held (from its state
    /// file): resume it with its key and serve it again as it was served.
    /// Answered like an attach.
    Restore(RestoreSpec),
}

/// A handle to restore after a restart, and how to serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSpec {
    pub held: HeldHandle,
    /// What to do with the kernel device the handle had, as the shell found
    /// it (`None`: serve the export only).
    pub kernel: Option<KernelPlan>,
}

/// An attach as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    pub volume: String,
    pub open: OpenWith,
    /// Unix socket to serve on (default `EXPORT_DIR/VOLUME.sock`).
    pub socket: Option<PathBuf>,
    /// Loopback TCP instead.
    pub tcp: Option<SocketAddr>,
    pub kernel: Option<KernelPlan>,
    /// Byte-range locks to take on the shared handle before the export
    /// serves (`attach --lock`); a refusal fails the attach.
    pub locks: Vec<volume_format::locks::LockRange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenWith {
    Mode(OpenMode),
    /// A handover token its holder issued for this agent.
    Handover(Vec<u8>),
    /// The handle a previous run held, resumed with its key (a restart).
    Restore(Box<HeldHandle>),
}

/// Kernel attach as part of an attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelPlan {
    /// Connect a free device (or `/dev/nbd<index>`).
    Connect { index: Option<u32> },
    /// Give a device a previous agent left connected fresh sockets, if the
    /// volume is in `pool` (the backend identifier's pool).
    Reconnect { index: u32, backend: String, pool: Uuid },
}

/// What the shell reports to the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A caller's command (the shell keeps the reply channel under `caller`).
    Command {
        caller: CallerId,
        command: Command,
    },
    /// The data path asks to register preserved copy-on-write chunks.
    CowRegister {
        caller: CallerId,
        volume: String,
        snapshot: u64,
        chunks: Vec<u64>,
        server_copies: bool,
    },
    /// The data path asks to record write-intent regions (`crate::intent`);
    /// answered like a registration.
    IntentRecord {
        caller: CallerId,
        volume: String,
        op: registrations::IntentOp,
    },
    /// Connection attempt `conn` succeeded.
    Connected {
        conn: ConnId,
        lease_ms: u64,
        session: u64,
    },
    /// Connection attempt `conn` failed; `fatal` for a handshake refusal.
    ConnectFailed {
        conn: ConnId,
        error: String,
        fatal: bool,
    },
    /// Connection `conn` ended (its event stream closed).
    ConnectionLost {
        conn: ConnId,
    },
    Event {
        conn: ConnId,
        event: ServerEvent,
    },
    Reply {
        request: RequestId,
        result: Result<Response, RequestError>,
    },
    /// The attach task of `attachment` finished.
    Prepared {
        attachment: AttachmentId,
        result: Result<Prepared, AgentError>,
    },
    /// A layout the core asked to install could not be built.
    LayoutRejected {
        attachment: AttachmentId,
        context: PublishContext,
        reason: String,
    },
    /// The gate of `attachment`, recalled for `generation`, drained (or was
    /// revoked meanwhile).
    Drained {
        attachment: AttachmentId,
        generation: u64,
        result: Result<(), String>,
    },
    /// The detach task of `attachment` finished.
    Detached {
        attachment: AttachmentId,
        result: Result<(), DetachFailure>,
    },
    /// The data path found `device`'s direct path broken (first failure only).
    DirectPathFailed {
        device: String,
        index: u32,
        reason: String,
    },
    ProbeDone {
        device: String,
        outcome: ProbeOutcome,
    },
    /// The server answered a failure report of `device`.
    FailureReported {
        device: String,
        marked_failed: bool,
    },
    /// Time passed (a deadline was reached).
    Tick,
}

/// What an attach task achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub export_uri: String,
    pub kernel_device: Option<u32>,
    pub kernel_note: Option<String>,
}

/// Why a detach task stopped; the volume stays attached, except after
/// [`DetachFailure::LeaveHandle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetachFailure {
    /// Flushing or disconnecting the kernel device failed; it stays connected.
    Kernel(String),
    /// Flushing the volume failed (a kernel device was already disconnected).
    Flush(String),
    /// Everything is stopped and drained, but the handle must not be closed:
    /// a write failed in a region of a mirrored volume and the server could
    /// not copy that region before the close (`crate::intent`). A close
    /// would make the server forget it; a handle left to run out is gone
    /// uncleanly, and the server copies its regions before the volume opens
    /// again. The volume is detached here all the same.
    LeaveHandle(String),
}

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The server refused it.
    Server(ControlError),
    /// The connection closed (or the shell had none for it).
    Closed,
    /// Anything else on the way (timeout, framing).
    Transport(String),
}

impl RequestError {
    pub fn to_session_error(&self) -> SessionError {
        match self {
            RequestError::Server(e) => SessionError::Server(e.message.clone()),
            RequestError::Closed => SessionError::NotConnected { addr: String::new(), last: None },
            RequestError::Transport(e) => SessionError::Control(e.clone()),
        }
    }
}

/// Where a layout to install comes from (for the message if it is unusable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishContext {
    /// A `Publish` event.
    Event,
    /// A resume answered with a newer layout.
    Resume,
    /// A re-open after a reconnect (no resume key).
    Reopen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    Works,
    Fails,
    /// No volume uses the device any more.
    Gone,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Connect to address `addr` (index into the configured list); report
    /// `Connected` or `ConnectFailed` for `conn`, then its events, then
    /// `ConnectionLost`.
    Connect {
        conn: ConnId,
        addr: usize,
    },
    Disconnect {
        conn: ConnId,
    },
    /// The metadata-server addresses changed (a redirect put new ones first):
    /// `Connect`'s indexes refer to this list from now on.
    Addresses {
        addrs: Vec<String>,
    },
    /// Send `message` on `conn`; report its `Reply` under `request`.
    Send {
        conn: ConnId,
        request: RequestId,
        message: Request,
        timeout_ms: Option<u64>,
    },
    Reply {
        caller: CallerId,
        reply: Reply,
    },
    /// Install the gate of a newly opened handle (lease until
    /// `lease_until_ms`), then run the attach task: connect the online
    /// devices, serve the export, attach the kernel device; report `Prepared`.
    StartAttach {
        attachment: AttachmentId,
        volume: String,
        handle: u64,
        mode: OpenMode,
        description: Box<VolumeDescription>,
        lease_until_ms: Millis,
        export: ExportTarget,
        kernel: Option<KernelPlan>,
        /// The server copies the pre-images ([`HeldHandle::cow_by_server`]).
        cow_by_server: bool,
        /// Taken back after a restart (a resume, not an open): the server
        /// did not replay the volume's cache mirror, so this agent's own
        /// cache log must be replayed (see [`crate::cache::OldLog`]).
        resumed: bool,
    },
    /// Close the gate for `generation` and report `Drained` once in-flight
    /// I/O finished.
    BeginRecall {
        attachment: AttachmentId,
        generation: u64,
    },
    /// Build a layout and publish it into the gate (reopening it); report
    /// `LayoutRejected` if it cannot be built.
    Publish {
        attachment: AttachmentId,
        description: Box<VolumeDescription>,
        context: PublishContext,
    },
    Revoke {
        attachment: AttachmentId,
        reason: String,
    },
    /// Install the volume's lock table in its device: writes into another
    /// handle's locked bytes are refused from now on.
    Locks {
        attachment: AttachmentId,
        table: volume_format::locks::LockTable,
    },
    RenewLease {
        attachment: AttachmentId,
        until_ms: Millis,
    },
    /// Run the detach task: kernel device (flush, disconnect), flush, stop
    /// the export, flush again, close and drain the gate (flushes only with
    /// `flush`); report `Detached`.
    StartDetach {
        attachment: AttachmentId,
        flush: bool,
    },
    /// Let go of the kernel device without disconnecting it (shutdown: the
    /// next agent reattaches it).
    LeaveKernelConnected {
        attachment: AttachmentId,
    },
    /// Close the gate and drop everything of the attachment.
    Forget {
        attachment: AttachmentId,
    },
    ReportPathFailure {
        device: String,
        index: u32,
        reason: String,
    },
    ReportPathRecovered {
        device: String,
        index: u32,
    },
    /// Try `device`'s direct path once; report `ProbeDone`.
    Probe {
        device: String,
    },
    /// Send `device`'s I/O on its direct path again.
    DirectPathBack {
        device: String,
    },
    MarkDeviceFailed {
        device: String,
    },
    /// Write the agent's state file with `handles` (everything
    /// [`AgentCore::held_handles`] returns) before performing the effects
    /// that follow: a recall is on disk before it is confirmed, so a
    /// restarted agent never writes with a layout the server took back.
    SaveState {
        handles: Vec<HeldHandle>,
    },
    /// The connection state changed (for readiness waiters).
    State(ConnectState),
    /// Everything is detached and the connection closed.
    Stopped,
}

/// An answer to a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `io_in_flight` and `io_waiting` are the shell's to fill in.
    Attached(Box<AttachmentInfo>),
    Done,
    List(Vec<AttachmentInfo>),
    Status(AgentStatus),
    Token(Vec<u8>),
    Registered(Result<(), String>),
    Failed(AgentError),
}

/// What a request was for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    Renew,
    Open {
        attachment: AttachmentId,
    },
    /// The locks an attach takes after its open.
    Lock {
        attachment: AttachmentId,
    },
    /// Close of a handle already forgotten locally; then `outcome`.
    Close {
        caller: Option<CallerId>,
        volume: String,
        handle: u64,
        outcome: CloseOutcome,
    },
    Resume {
        attachment: AttachmentId,
    },
    /// The resume of a handle a previous run held.
    Restore {
        attachment: AttachmentId,
    },
    CloseOld {
        attachment: AttachmentId,
    },
    Reopen {
        attachment: AttachmentId,
    },
    RecallDone {
        attachment: AttachmentId,
        generation: u64,
    },
    Handover {
        caller: CallerId,
    },
    Cow {
        registration: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CloseOutcome {
    /// A detach: the caller hears how the close went.
    Detached,
    /// An attach undone: the caller hears this error however the close went.
    Undone(AgentError),
}

#[derive(Debug, Clone)]
struct Pending {
    conn: ConnId,
    sent_ms: Millis,
    purpose: Purpose,
}

/// The requests in flight.
#[derive(Debug, Default)]
struct Requests {
    pending: BTreeMap<RequestId, Pending>,
    next: u64,
}

impl Requests {
    fn send(
        &mut self,
        out: &mut Vec<Effect>,
        conn: ConnId,
        now: Millis,
        message: Request,
        timeout_ms: Option<u64>,
        purpose: Purpose,
    ) -> RequestId {
        self.next += 1;
        let request = RequestId(self.next);
        self.pending.insert(request, Pending { conn, sent_ms: now, purpose });
        out.push(Effect::Send { conn, request, message, timeout_ms });
        request
    }

    fn closes_in_flight(&self) -> bool {
        self.pending.values().any(|p| matches!(p.purpose, Purpose::Close { .. }))
    }

    /// Whether a request for `purpose` is in flight.
    fn in_flight(&self, purpose: &Purpose) -> bool {
        self.pending.values().any(|p| p.purpose == *purpose)
    }
}

/// The agent's control state and its transitions. See the module doc.
pub struct AgentCore {
    config: CoreConfig,
    link: link::Link,
    /// By volume name.
    volumes: BTreeMap<String, state::Volume>,
    next_attachment: u64,
    requests: Requests,
    /// Events for handles not registered yet (a recall racing the reply to
    /// its open), replayed at registration so none is missed.
    orphans: VecDeque<ServerEvent>,
    /// Handles forgotten locally whose close the server has not confirmed.
    closing: closing::ClosingTable,
    registrations: registrations::Registrations,
    /// Devices whose direct path failed, by URI.
    paths: BTreeMap<String, paths::DevicePath>,
    /// Callers of `Shutdown`, once it was asked for.
    stopping: Option<Vec<CallerId>>,
    /// The connection state last announced.
    announced: ConnectState,
    /// What the last [`Effect::SaveState`] wrote (`None`: nothing yet).
    saved: Option<Vec<HeldHandle>>,
    /// Handles left for the next run (a shutdown while they were being
    /// taken back): kept in the state file.
    successor: Vec<HeldHandle>,
    out: Vec<Effect>,
}

impl AgentCore {
    pub fn new(config: CoreConfig) -> AgentCore {
        let link = link::Link::new(config.addrs.len());
        AgentCore {
            announced: link.state(),
            config,
            link,
            volumes: BTreeMap::new(),
            next_attachment: 0,
            requests: Requests::default(),
            orphans: VecDeque::new(),
            closing: closing::ClosingTable::new(),
            registrations: Default::default(),
            paths: BTreeMap::new(),
            stopping: None,
            saved: None,
            successor: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Applies one input at `now` and returns what the shell must do, in order.
    pub fn apply(&mut self, now: Millis, input: Input) -> Vec<Effect> {
        match input {
            Input::Command { caller, command } => self.command(now, caller, command),
            Input::CowRegister { caller, volume, snapshot, chunks, server_copies } => {
                self.cow_register(now, caller, volume, snapshot, chunks, server_copies)
            }
            Input::IntentRecord { caller, volume, op } => self.intent_request(now, caller, volume, op),
            Input::Connected { conn, lease_ms, session } => self.connected(now, conn, lease_ms, session),
            Input::ConnectFailed { conn, error, fatal } => {
                let addr = match self.link.phase {
                    link::LinkPhase::Connecting { addr, .. } => self.config.addrs.get(addr).cloned(),
                    _ => None,
                };
                let error = match addr {
                    Some(addr) if !fatal => format!("{addr}: {error}"),
                    _ => error,
                };
                if self.link.connect_failed(conn, now, error.clone(), fatal) {
                    warn!(error, "cannot reach the metadata server");
                }
            }
            Input::ConnectionLost { conn } => {
                if self.link.lost(conn, now) {
                    warn!(conn = conn.0, "lost the connection to the metadata server; I/O continues until the lease runs out, reconnecting");
                    self.registrations.retry_all_now(now);
                }
            }
            Input::Event { conn, event: ServerEvent::Redirect { addrs, reason } } => {
                self.redirect(now, conn, addrs, reason)
            }
            Input::Event { conn, event } => self.event(now, conn, event),
            Input::Reply { request, result } => self.reply(now, request, result),
            Input::Prepared { attachment, result } => self.prepared(now, attachment, result),
            Input::LayoutRejected { attachment, context, reason } => self.layout_rejected(attachment, context, reason),
            Input::Drained { attachment, generation, result } => self.drained(now, attachment, generation, result),
            Input::Detached { attachment, result } => self.detached(now, attachment, result),
            Input::DirectPathFailed { device, index, reason } => self.direct_path_failed(now, device, index, reason),
            Input::ProbeDone { device, outcome } => self.probe_done(now, device, outcome),
            Input::FailureReported { device, marked_failed } => self.failure_reported(device, marked_failed),
            Input::Tick => {}
        }
        self.timers(now);
        self.save_state();
        let state = self.link.state();
        if state != self.announced {
            self.announced = state.clone();
            self.out.push(Effect::State(state));
        }
        std::mem::take(&mut self.out)
    }

    /// When the core next wants an [`Input::Tick`] (at the latest).
    pub fn next_deadline_ms(&self) -> Option<Millis> {
        [
            self.link.deadline(),
            self.registrations.deadline(),
            paths::deadline(&self.paths),
            self.confirm_deadline(),
            self.close_deadline(),
            self.open_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Every handle the agent holds or is taking back after a restart, as
    /// its state file keeps them: those a restarted agent resumes. Revoked
    /// handles are left out (resuming them would only be refused).
    pub fn held_handles(&self) -> Vec<HeldHandle> {
        self.volumes
            .values()
            .filter_map(|v| match (&v.handle, &v.open) {
                (Some(h), _) if matches!(h.gate.phase, Phase::Revoked { .. } | Phase::Closed) => None,
                (Some(h), _) => Some(h.held.clone()),
                (None, OpenWith::Restore(held)) => Some((**held).clone()),
                (None, _) => None,
            })
            .chain(self.successor.iter().cloned())
            .collect()
    }

    /// Asks the shell to write the state file if what it holds changed.
    fn save_state(&mut self) {
        let handles = self.held_handles();
        if self.saved.as_ref() != Some(&handles) {
            self.saved = Some(handles.clone());
            self.out.push(Effect::SaveState { handles });
        }
    }

    /// The connection state.
    pub fn connect_state(&self) -> ConnectState {
        self.link.state()
    }

    pub fn is_stopped(&self) -> bool {
        self.link.is_stopped()
    }

    /// One attachment's state (tests, the simulator).
    pub fn volume(&self, name: &str) -> Option<&state::Volume> {
        self.volumes.get(name)
    }

    fn command(&mut self, now: Millis, caller: CallerId, command: Command) {
        match command {
            Command::Attach(spec) => self.attach(now, caller, spec),
            Command::Detach { volume } => self.detach(caller, &volume),
            Command::List => {
                let list = self.list(now);
                self.out.push(Effect::Reply { caller, reply: Reply::List(list) });
            }
            Command::Status => {
                let (mds, mds_detail) = match self.link.state() {
                    ConnectState::Connected { epoch } => ("connected", format!("connection {epoch}")),
                    ConnectState::Connecting { last_error } => ("connecting", last_error.unwrap_or_default()),
                    ConnectState::Fatal(e) => ("stopped", e),
                    ConnectState::Stopped => ("stopped", String::new()),
                };
                let volumes = self.volumes.values().filter(|v| v.listed()).count();
                let status = AgentStatus { mds: mds.to_string(), mds_detail, volumes };
                self.out.push(Effect::Reply { caller, reply: Reply::Status(status) });
            }
            Command::Handover { volume, to_key } => self.handover(now, caller, &volume, to_key),
            Command::Shutdown => self.shutdown(caller),
            Command::Restore(spec) => self.restore(now, caller, spec),
        }
    }

    /// Why a request cannot be sent now.
    fn unreachable(&self) -> SessionError {
        if self.link.is_stopped() || self.stopping.is_some() && self.link.conn().is_none() {
            return SessionError::ShutDown;
        }
        SessionError::NotConnected {
            addr: self.config.addrs.first().cloned().unwrap_or_default(),
            last: self.link.last_error.clone(),
        }
    }

    fn connected(&mut self, now: Millis, conn: ConnId, lease_ms: u64, session: u64) {
        if !self.link.connected(conn, now, lease_ms) {
            debug!(conn = conn.0, "a connection nobody waits for; closing it");
            self.out.push(Effect::Disconnect { conn });
            return;
        }
        let epoch = self.link.live().map_or(0, |l| l.epoch);
        tracing::info!(epoch, lease_ms, session, "connected to the metadata server");
        // Events kept for handles not registered yet came from an earlier
        // connection — maybe from a server that has lost the pool since: a
        // recall of a change it never committed would hold a handle the
        // next server gives out (with the same id) recalled forever. What
        // a handle needs, the new connection's answers and events carry.
        self.orphans.clear();
        self.recover(now);
        self.registrations.retry_all_now(now);
    }

    fn reply(&mut self, now: Millis, request: RequestId, result: Result<Response, RequestError>) {
        let Some(pending) = self.requests.pending.remove(&request) else {
            debug!(request = request.0, "a reply nobody waits for");
            return;
        };
        if let Err(RequestError::Server(e)) = &result {
            if e.code == ErrorCode::NotActive {
                self.not_active(now, pending.conn, &e.message);
            }
        }
        match pending.purpose.clone() {
            Purpose::Renew => {
                self.link.renewal_done(request);
                match result {
                    Ok(Response::Lease { lease_ms }) => {
                        crate::metrics::lease_renewed(now.saturating_sub(pending.sent_ms));
                        self.renewed(pending.conn, pending.sent_ms, lease_ms)
                    }
                    Ok(other) => {
                        crate::metrics::lease_renewal_failed();
                        warn!("unexpected answer to a lease renewal: {other:?}")
                    }
                    Err(e) => {
                        crate::metrics::lease_renewal_failed();
                        warn!(error = ?e, "lease renewal failed")
                    }
                }
            }
            Purpose::Open { attachment } => self.opened(now, &pending, attachment, result),
            Purpose::Lock { attachment } => self.locked(now, attachment, result),
            Purpose::Close { caller, volume, handle, outcome } => {
                let closed = match &result {
                    Ok(_) => true,
                    // Already gone at the server (revoked, broken): closed is closed.
                    Err(RequestError::Server(e)) => e.code == ErrorCode::NotFound,
                    Err(_) => false,
                };
                self.close_answered(now, handle, closed);
                self.closed(caller, &volume, outcome, result)
            }
            Purpose::Resume { attachment } => self.resumed(now, &pending, attachment, result),
            Purpose::Restore { attachment } => self.restored(now, &pending, attachment, result),
            Purpose::CloseOld { attachment } => self.closed_old(now, attachment),
            Purpose::Reopen { attachment } => self.reopened(now, &pending, attachment, result),
            Purpose::RecallDone { attachment, generation } => {
                self.recall_confirmed(now, attachment, generation, result)
            }
            Purpose::Handover { caller } => {
                let reply = match result {
                    Ok(Response::HandoverToken { token, .. }) => Reply::Token(token),
                    Ok(other) => Reply::Failed(AgentError::Session(SessionError::Unexpected {
                        request: "Handover",
                        response: format!("{other:?}"),
                    })),
                    Err(e) => Reply::Failed(AgentError::Session(e.to_session_error())),
                };
                self.out.push(Effect::Reply { caller, reply });
            }
            Purpose::Cow { registration } => self.cow_answered(now, registration, result),
        }
        self.shutdown_progress();
    }

    /// A request sent at `sent_ms` on `conn` granted `lease_ms`: extends the
    /// lease of every handle living on `conn`.
    fn renewed(&mut self, conn: ConnId, sent_ms: Millis, lease_ms: u64) {
        let Some(until) = self.link.renewed(conn, sent_ms, lease_ms) else { return };
        for v in self.volumes.values_mut() {
            let Some(h) = v.handle.as_mut() else { continue };
            if h.conn == conn && until > h.lease_until_ms {
                h.lease_until_ms = until;
                self.out.push(Effect::RenewLease { attachment: v.id, until_ms: until });
            }
        }
        debug!(conn = conn.0, lease_ms, "lease renewed");
    }

    /// Fires whatever is due: a connection attempt, a renewal (and retries of
    /// handles not yet brought over), registration retries, probes.
    fn timers(&mut self, now: Millis) {
        if let Some((conn, addr)) = self.link.start_attempt(now) {
            self.out.push(Effect::Connect { conn, addr });
        }
        match self.link.renewal_due(now) {
            link::Renewal::NotDue => {}
            link::Renewal::Busy => {
                crate::metrics::lease_renewal_late();
                warn!("the previous lease renewal has not been answered yet")
            }
            link::Renewal::Send { conn, timeout_ms } => {
                let request =
                    self.requests.send(&mut self.out, conn, now, Request::Renew, Some(timeout_ms), Purpose::Renew);
                self.link.renewing(conn, request);
                self.recover(now);
            }
        }
        self.opens_due(now);
        self.registrations_due(now);
        self.probes_due(now);
        self.confirm_recalls(now);
        self.closes_due(now);
    }
}

/// The handle an event is for (0 for events about the connection).
fn event_handle(event: &ServerEvent) -> u64 {
    match event {
        ServerEvent::Recall { handle, .. }
        | ServerEvent::Publish { handle, .. }
        | ServerEvent::Revoked { handle, .. }
        | ServerEvent::Locks { handle, .. }
        | ServerEvent::Recovery { handle, .. } => handle.0,
        ServerEvent::Redirect { .. } => 0,
    }
}

impl AgentCore {
    /// The server handed the pool to another (a planned handoff): put its
    /// addresses first, drop this connection and connect there at once;
    /// every handle is resumed on the new connection as after any reconnect.
    fn redirect(&mut self, now: Millis, conn: ConnId, addrs: Vec<String>, reason: String) {
        if self.link.conn() != Some(conn) {
            return;
        }
        tracing::info!(?addrs, %reason, "the metadata server redirects this agent");
        let mut list: Vec<String> = addrs.into_iter().filter(|a| !a.is_empty()).collect();
        for a in std::mem::take(&mut self.config.addrs) {
            if !list.contains(&a) {
                list.push(a);
            }
        }
        list.truncate(ADDRS_MAX);
        self.config.addrs = list.clone();
        self.out.push(Effect::Addresses { addrs: list });
        self.out.push(Effect::Disconnect { conn });
        self.link.moved(conn, now, self.config.addrs.len(), reason);
        self.registrations.retry_all_now(now);
    }

    /// A request on `conn` was refused because that server is not the
    /// pool's active one (a standby, or one that handed off or lost its
    /// lease): move on to the next address at once.
    fn not_active(&mut self, now: Millis, conn: ConnId, message: &str) {
        if self.link.conn() != Some(conn) {
            return;
        }
        warn!(reason = %message, "the metadata server is not the active one; trying the next address");
        self.out.push(Effect::Disconnect { conn });
        self.link.moved(conn, now, self.config.addrs.len(), message.to_string());
        self.registrations.retry_all_now(now);
    }
}

/// Whether a refusal passes by itself, so a handle's recovery keeps its I/O
/// held and tries again instead of giving the volume up: the server is in
/// its grace period (`Unavailable`), or it is not the pool's active server
/// (`NotActive`: a standby, or one that handed off or lost its lease; the
/// agent moves on to its next address).
fn answers_later(e: &ControlError) -> bool {
    matches!(e.code, ErrorCode::Unavailable | ErrorCode::NotActive)
}

/// Addresses the agent keeps at most (configured ones plus redirects).
pub const ADDRS_MAX: usize = 16;
