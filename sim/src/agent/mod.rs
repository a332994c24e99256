//! A simulated agent host: the **real** agent control plane
//! ([`client_agent::core::AgentCore`]), a shell that does what
//! `client-agent`'s owner does around it, and the data path of each
//! attached volume.
//!
//! The shell, as `client_agent::owner` does it: connection attempts and
//! requests go over the simulated network (each request with its timeout:
//! renewals the renewal period, others 30 s); replies and server events
//! reach the core through separate hops, so a reply and an event of one
//! connection may swap (events stay in order, and a lost connection comes
//! after its last event, as the owner's event pump delivers them); requests
//! pending on a lost connection fail as closed. Attach and detach tasks
//! finish at once (there is no export or kernel device to set up).
//!
//! The data path is what `client-agent`'s gate, volume device and
//! copy-on-write do, reduced to the rules that matter for safety:
//! - **Gate**: an I/O is admitted only while the handle's gate is open and
//!   its lease runs (on the agent's clock); otherwise it waits (recall,
//!   lease) or fails (revoked, detached). A recall holds new I/O and reports
//!   `Drained` once admitted I/O has finished.
//! - **Lease again before the device**: every device request is sent only
//!   while the lease still runs; a request whose lease ran out while it was
//!   admitted waits for a renewal (issue 14's rule; an I/O can be admitted
//!   and then wait for a copy-on-write registration for a long time).
//! - **Copy-on-write**: before the first write to a chunk of the newest
//!   snapshot, an exclusive holder reads the chunk, writes it into the
//!   snapshot's area (every leg, FUA) and registers it; a shared writer asks
//!   the server to copy (`CowCopy`). Only after the registration is answered
//!   does the write go out.
//! - **Writes behind** (`client_agent::cow_behind`): such a first write of
//!   an exclusive holder that copies itself is acknowledged to the
//!   application at once, up to [`WRITES_BEHIND_MAX`] outstanding; it stays
//!   admitted (a recall's drain waits for it) and reaches the oracle as
//!   acknowledged only when its legs answered. A read or write of its block
//!   waits for it, a FLUSH waits for every write behind acknowledged before
//!   it and fails if one of them failed.
//! - Mirrored volumes: writes go to every leg and are acknowledged when all
//!   legs answered; reads go to the first leg.
//!
//! The agent's clock is [`crate::Config::agent_clock`]: by default the boot-time clock, which counts
//! a VM pause, as issue 14 requires (a monotonic clock stops during one).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use client_agent::core::{
    AgentCore, AttachmentId, CallerId, ConnId, CoreConfig, Effect, Input, Millis, Prepared, Reply, RequestError,
    RequestId,
};
use client_agent::session::ConnectState;
use volume_format::control::messages::{ClientMessage, OpenMode, Request, Response, ServerEvent, ServerMessage};
use volume_format::VolumeDescription;

use crate::app::AppState;
use crate::device::{Content, DevOp, DevResult, BLOCK_BYTES};
use crate::net::{ConnId as NetConn, Proc, Wire};
use crate::world::{DevOrigin, Env, Ev};

/// How long a request waits for its answer unless the core says otherwise
/// (`control_client::client::REQUEST_TIMEOUT`).
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;

/// Writes acknowledged before their chunk is preserved, per attachment (a
/// few, so that the sim's small volumes see them overlap and wait).
pub const WRITES_BEHIND_MAX: usize = 4;

/// A device request of an I/O: (sim device, request, the (block, tag) a
/// write puts there).
type DevSend = (usize, DevOp, Option<(u64, u64)>);

/// Something for the core that took a hop inside the agent.
///
/// Replies are large next to the other variants; deliveries are events in
/// the simulation's queue, a few at a time per agent, not worth a box each.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Delivery {
    Reply { request: RequestId, result: Result<Response, RequestError> },
    Event { conn: ConnId, event: ServerEvent },
    Lost { conn: ConnId },
    Timeout { request: RequestId },
}

pub use crate::config::LeaseClock;

mod cache;
mod intent;
pub use cache::MirrorState;

/// Most I/O the application keeps in flight per agent.
pub const APP_IO_MAX: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Open,
    Recalled { generation: u64 },
    Revoked(String),
    Closed,
}

/// A chunk being preserved for the newest snapshot.
#[derive(Debug)]
struct Preserve {
    snapshot: u64,
    waiters: Vec<u64>,
    step: PreserveStep,
}

#[derive(Debug)]
enum PreserveStep {
    Reading,
    Writing { remaining: usize, failed: Option<String> },
    Registering,
}

impl Att {
    /// Blocks of the volume in the installed layout.
    pub fn volume_blocks(&self) -> u64 {
        self.desc.size_bytes / BLOCK_BYTES
    }
}

pub struct Att {
    pub volume: String,
    pub volume_id: u64,
    pub handle: u64,
    pub mode: OpenMode,
    desc: Arc<VolumeDescription>,
    phase: Phase,
    lease_until: Millis,
    in_flight: u64,
    held: VecDeque<u64>,
    lease_wait: Vec<u64>,
    drain_for: Option<u64>,
    detaching: bool,
    detach_flush: Option<usize>,
    /// Snapshot id the preserved set is for, and the chunks preserved.
    preserved: (u64, BTreeSet<u64>),
    preserving: BTreeMap<u64, Preserve>,
    /// The server copies the pre-images (a handover's target, or a source
    /// that asked for a token), as production's `Registrations` decide.
    cow_by_server: bool,
    /// I/O ids of writes acknowledged behind, not yet landed.
    behind: BTreeSet<u64>,
    /// The first failure of a write behind since the last FLUSH asked.
    behind_failed: Option<String>,
    /// Admitted I/O waiting for writes behind (their block, or a FLUSH).
    after_behind: Vec<u64>,
    /// The write-back cache of an exclusive holder ([`cache`]).
    cache: Option<cache::Cache>,
    /// The write-intent log of a writer of a mirrored volume ([`intent`]).
    intents: Option<intent::Intents>,
}

#[derive(Debug, Clone)]
pub enum IoKind {
    Write { block: u64, tag: u64 },
    Read { block: u64 },
    Flush,
}

struct Io {
    att: AttachmentId,
    kind: IoKind,
    desc: Option<Arc<VolumeDescription>>,
    remaining: usize,
    error: Option<String>,
    /// When the flush was sent, in the oracle's order.
    flush_seq: u64,
    /// Acknowledged to the application already (a write behind), at this
    /// point of the oracle's order.
    behind: Option<u64>,
    /// A FLUSH: when the application sent it, in the oracle's order.
    submitted: u64,
}

enum DevPurpose {
    Io(u64),
    Preserve {
        att: AttachmentId,
        chunk: u64,
    },
    DetachFlush(AttachmentId),
    /// A write or flush of the cache's destage round.
    Destage(AttachmentId),
}

enum CallerPurpose {
    App(crate::app::AppCall),
    Cow { att: AttachmentId, chunk: u64 },
    Intent { att: AttachmentId, call: intent::IntentCall },
}

pub struct AgentHost {
    pub index: usize,
    pub inc: u64,
    pub core: AgentCore,
    conns: BTreeMap<ConnId, NetConn>,
    net_conns: BTreeMap<NetConn, ConnId>,
    /// Requests sent and not answered: on which connection.
    pending: BTreeMap<RequestId, ConnId>,
    /// Events (and losses) reach the core in order: the last one's time.
    events_at: u64,
    pub atts: BTreeMap<AttachmentId, Att>,
    ios: BTreeMap<u64, Io>,
    next_io: u64,
    tokens: BTreeMap<u64, DevPurpose>,
    next_token: u64,
    callers: BTreeMap<CallerId, CallerPurpose>,
    next_caller: u64,
    wake_at: Option<u64>,
    pub app: AppState,
    /// The core's server addresses (`sim://mdsN`: host N).
    addrs: Vec<String>,
    /// Agent clock before which no write leaves (production's
    /// `client_agent::gate::hold_writes_until`): a restarted agent's
    /// previous run may have writes stalled in a device until
    /// `device_request_max_ms` after it died.
    writes_from: Millis,
    /// The caches' own requests to the server ([`cache`]).
    cache_reqs: BTreeMap<u64, cache::Pending>,
    next_cache_req: u64,
    /// When the intent sweeper wakes next ([`intent`]).
    intent_sweep_at: Option<u64>,
}

impl AgentHost {
    pub fn start(index: usize, inc: u64, env: &mut Env) -> AgentHost {
        let addrs: Vec<String> = (0..env.cfg.server_hosts).map(|h| format!("sim://mds{h}")).collect();
        let config = CoreConfig { addrs: addrs.clone(), export_dir: PathBuf::from("/nonexistent") };
        let mut h = AgentHost {
            index,
            inc,
            core: AgentCore::new(config),
            conns: BTreeMap::new(),
            net_conns: BTreeMap::new(),
            pending: BTreeMap::new(),
            events_at: 0,
            atts: BTreeMap::new(),
            ios: BTreeMap::new(),
            next_io: 1,
            tokens: BTreeMap::new(),
            next_token: 1,
            callers: BTreeMap::new(),
            next_caller: 1,
            wake_at: None,
            app: AppState::default(),
            addrs,
            writes_from: 0,
            cache_reqs: BTreeMap::new(),
            intent_sweep_at: None,
            next_cache_req: 0,
        };
        // Every restart here follows a crash (an unclean stop).
        if inc > 1 {
            h.writes_from = h.clock(env) + env.cfg.device_request_max_ms;
        }
        h.input(Input::Tick, env);
        let at = env.now + env.rng.range(1, env.cfg.app_step_ms);
        env.schedule(at, Ev::AppStep { agent: index, inc });
        h
    }

    pub fn me(&self) -> Proc {
        Proc::Agent(self.index)
    }

    /// The agent's clock now.
    pub fn clock(&self, env: &Env) -> Millis {
        env.agent_clock_ms(self.index, env.cfg.agent_clock == LeaseClock::Monotonic)
    }

    pub fn connected(&self) -> bool {
        matches!(self.core.connect_state(), ConnectState::Connected { .. })
    }

    // ---- the core and its effects ----

    pub fn input(&mut self, input: Input, env: &mut Env) {
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            let now = self.clock(env);
            for effect in self.core.apply(now, input) {
                self.perform(effect, env, &mut queue);
            }
        }
        self.schedule_wake(env);
    }

    fn schedule_wake(&mut self, env: &mut Env) {
        let Some(deadline) = self.core.next_deadline_ms() else { return };
        let at = env.now + deadline.saturating_sub(self.clock(env));
        if self.wake_at.is_some_and(|w| w <= at && w > env.now) {
            return;
        }
        self.wake_at = Some(at);
        env.schedule(at, Ev::AgentWake { agent: self.index, inc: self.inc });
    }

    pub fn on_wake(&mut self, env: &mut Env) {
        if self.wake_at.is_some_and(|w| w <= env.now) {
            self.wake_at = None;
        }
        self.input(Input::Tick, env);
        self.release_lease_waiters(env);
        self.cache_tick(env);
        self.intent_tick(env);
    }

    fn deliver(&mut self, delivery: Delivery, env: &mut Env) {
        let (lo, hi) = env.cfg.reply_hop_ms;
        let hop = env.rng.range(lo, hi);
        let at = match delivery {
            Delivery::Event { .. } | Delivery::Lost { .. } => {
                self.events_at = self.events_at.max(env.now + hop);
                self.events_at
            }
            _ => env.now + hop,
        };
        env.schedule(at, Ev::AgentDeliver { agent: self.index, inc: self.inc, delivery });
    }

    pub fn on_delivery(&mut self, delivery: Delivery, env: &mut Env) {
        let input = match delivery {
            Delivery::Reply { request, result } => Input::Reply { request, result },
            Delivery::Event { conn, event } => Input::Event { conn, event },
            Delivery::Lost { conn } => Input::ConnectionLost { conn },
            Delivery::Timeout { request } => {
                if self.pending.remove(&request).is_none() {
                    return;
                }
                env.trace(self.me(), format_args!("#{} timed out", request.0));
                Input::Reply { request, result: Err(RequestError::Transport("the request timed out".into())) }
            }
        };
        self.input(input, env);
    }

    fn perform(&mut self, effect: Effect, env: &mut Env, queue: &mut VecDeque<Input>) {
        let me = self.me();
        match effect {
            Effect::Connect { conn, addr } => {
                // Two-server world: the address the core picked names the
                // host (redirects reorder the list).
                let host = match self.addrs.get(addr).and_then(|a| a.strip_prefix("sim://mds")) {
                    Some(h) if env.cfg.two_servers() => h.parse().unwrap_or(0) % env.cfg.server_hosts,
                    _ => addr % env.cfg.server_hosts,
                };
                let net = env.connect(me, self.inc, host);
                env.trace(me, format_args!("connecting to mds@{host} (connection {net})"));
                self.conns.insert(conn, net);
                self.net_conns.insert(net, conn);
            }
            // One-server world: the simulated agent reaches server host
            // `addr % server_hosts` whatever the list says (nothing
            // redirects there).
            Effect::Addresses { addrs } => {
                env.trace(me, format_args!("server addresses now {addrs:?}"));
                self.addrs = addrs;
            }
            // No state file in this world: a restarted simulated agent starts
            // empty (resuming from a state file is tested with real processes).
            Effect::SaveState { handles } => env.trace(me, format_args!("state saved: {} handles", handles.len())),
            Effect::Disconnect { conn } => {
                if let Some(&net) = self.conns.get(&conn) {
                    env.break_conn(net, false, false);
                }
            }
            Effect::Send { conn, request, message, timeout_ms } => {
                let open = self.conns.get(&conn).copied().filter(|n| env.net.get(*n).is_some_and(|c| c.open));
                let Some(net) = open else {
                    return queue.push_back(Input::Reply { request, result: Err(RequestError::Closed) });
                };
                env.trace(me, format_args!("-> #{} {}", request.0, crate::describe_request(&message)));
                if let Request::Close { handle } = &message {
                    env.obs.closing(handle.0);
                }
                self.pending.insert(request, conn);
                let timeout = timeout_ms.unwrap_or(REQUEST_TIMEOUT_MS);
                let at = env.now + timeout;
                env.schedule(
                    at,
                    Ev::AgentDeliver { agent: self.index, inc: self.inc, delivery: Delivery::Timeout { request } },
                );
                env.send(net, Wire::ToServer(ClientMessage { id: request.0, request: message }));
            }
            Effect::Reply { caller, reply } => match self.callers.remove(&caller) {
                Some(CallerPurpose::App(call)) => self.app_reply(call, reply, env),
                Some(CallerPurpose::Cow { att, chunk }) => self.registered(att, chunk, reply, env),
                Some(CallerPurpose::Intent { att, call }) => self.intent_answered(att, call, reply, env),
                None => {}
            },
            Effect::StartAttach {
                attachment,
                volume,
                handle,
                mode,
                description,
                lease_until_ms,
                cow_by_server,
                ..
            } => {
                env.trace(
                    me,
                    format_args!(
                        "attached {volume} handle {handle} ({mode}), layout generation {}",
                        description.layout_generation
                    ),
                );
                let snapshot = description.snapshot.as_ref().map_or(0, |s| s.id.0);
                let att = Att {
                    volume,
                    volume_id: description.volume.0,
                    handle,
                    mode,
                    desc: Arc::new(*description),
                    phase: Phase::Open,
                    lease_until: lease_until_ms,
                    in_flight: 0,
                    held: VecDeque::new(),
                    lease_wait: Vec::new(),
                    drain_for: None,
                    detaching: false,
                    detach_flush: None,
                    preserved: (snapshot, BTreeSet::new()),
                    preserving: BTreeMap::new(),
                    cow_by_server: cow_by_server || mode == OpenMode::SharedWrite,
                    behind: BTreeSet::new(),
                    behind_failed: None,
                    after_behind: Vec::new(),
                    cache: None,
                    intents: None,
                };
                self.atts.insert(attachment, att);
                self.note_lease(attachment, env);
                self.cache_attached(attachment, env);
                self.intent_attached(attachment, env);
                let prepared = Prepared {
                    export_uri: format!("sim://agent{}/{attachment:?}", self.index),
                    kernel_device: None,
                    kernel_note: None,
                };
                queue.push_back(Input::Prepared { attachment, result: Ok(prepared) });
            }
            Effect::BeginRecall { attachment, generation } => {
                // The cache is destaged first (a snapshot holds every
                // acknowledged write): the drain waits for it.
                let cache_idle = self.cache_idle(attachment);
                let Some(a) = self.atts.get_mut(&attachment) else { return };
                env.trace(
                    me,
                    format_args!("{}: recalled for generation {generation}, draining {} I/O", a.volume, a.in_flight),
                );
                a.phase = Phase::Recalled { generation };
                a.drain_for = Some(generation);
                if a.in_flight == 0 && cache_idle {
                    a.drain_for = None;
                    queue.push_back(Input::Drained { attachment, generation, result: Ok(()) });
                }
            }
            Effect::Publish { attachment, description, .. } => {
                let Some(a) = self.atts.get_mut(&attachment) else { return };
                env.trace(
                    me,
                    format_args!(
                        "{}: layout generation {} installed, I/O resumes",
                        a.volume, description.layout_generation
                    ),
                );
                let snapshot = description.snapshot.as_ref().map_or(0, |s| s.id.0);
                if snapshot != a.preserved.0 {
                    a.preserved = (snapshot, BTreeSet::new());
                }
                a.desc = Arc::new(*description);
                if a.phase != Phase::Closed {
                    a.phase = Phase::Open;
                }
                a.drain_for = None;
                self.release_held(attachment, env);
            }
            // The simulated agents take no range locks.
            Effect::Locks { .. } => {}
            Effect::Revoke { attachment, reason } => {
                let Some(a) = self.atts.get_mut(&attachment) else { return };
                env.trace(me, format_args!("{}: handle {} revoked: {reason}", a.volume, a.handle));
                a.phase = Phase::Revoked(reason);
                env.obs.drop_lease(a.handle);
                self.cache_revoked(attachment, env);
                self.fail_waiting(attachment, env);
                self.check_drain(attachment, queue, env);
            }
            Effect::RenewLease { attachment, until_ms } => {
                if let Some(a) = self.atts.get_mut(&attachment) {
                    a.lease_until = a.lease_until.max(until_ms);
                    self.note_lease(attachment, env);
                    self.release_held(attachment, env);
                    self.release_lease_waiters(env);
                    self.cache_kick(attachment, env);
                }
            }
            Effect::StartDetach { attachment, flush } => {
                let Some(a) = self.atts.get_mut(&attachment) else {
                    return queue.push_back(Input::Detached { attachment, result: Ok(()) });
                };
                a.detaching = true;
                // Flush every device of the layout, then drain.
                let devices: Vec<usize> = layout_devices(&a.desc, env);
                if devices.is_empty() || !flush {
                    a.detach_flush = Some(0);
                    self.check_detached(attachment, queue, env);
                } else {
                    a.detach_flush = Some(devices.len());
                    for dev in devices {
                        self.dev_send(dev, DevOp::Flush, DevPurpose::DetachFlush(attachment), None, None, env);
                    }
                }
            }
            Effect::Forget { attachment } => {
                if let Some(a) = self.atts.remove(&attachment) {
                    env.trace(me, format_args!("{}: handle {} forgotten", a.volume, a.handle));
                    if a.cache.as_ref().is_some_and(|c| c.holds_writes()) {
                        env.cache_orphaned(a.volume_id);
                    }
                    let index = self.index;
                    env.cache_dirty.retain(|(agent, v, _)| !(*agent == index && *v == a.volume_id));
                    env.obs.drop_lease(a.handle);
                    let ids: Vec<u64> =
                        self.ios.iter().filter(|(_, io)| io.att == attachment).map(|(id, _)| *id).collect();
                    for id in ids {
                        self.finish_io(id, Err("the volume is detached".into()), env);
                    }
                }
            }
            // No direct path fails in this world (see the crate docs), so
            // the fallback's effects never come; kernel devices do not exist.
            Effect::LeaveKernelConnected { .. }
            | Effect::ReportPathFailure { .. }
            | Effect::ReportPathRecovered { .. }
            | Effect::Probe { .. }
            | Effect::DirectPathBack { .. }
            | Effect::MarkDeviceFailed { .. }
            | Effect::State(_)
            | Effect::Stopped => {}
        }
    }

    /// Tells the observer how long this handle may write (for the check that
    /// the server never excludes a holder whose lease still runs).
    fn note_lease(&self, attachment: AttachmentId, env: &mut Env) {
        if let Some(a) = self.atts.get(&attachment).filter(|a| !matches!(a.phase, Phase::Revoked(_))) {
            let monotonic = env.cfg.agent_clock == LeaseClock::Monotonic;
            env.obs.set_lease(a.handle, self.index, self.inc, a.lease_until, monotonic);
        }
    }

    // ---- network ----

    pub fn on_connected(&mut self, net: NetConn, env: &mut Env) {
        let Some(&conn) = self.net_conns.get(&net) else { return };
        let session = env.net.get(net).and_then(|c| c.session).unwrap_or(0);
        env.trace(self.me(), format_args!("connected (connection {net})"));
        self.input(Input::Connected { conn, lease_ms: env.cfg.lease_ms, session }, env);
    }

    pub fn on_connect_failed(&mut self, net: NetConn, env: &mut Env) {
        let Some(&conn) = self.net_conns.get(&net) else { return };
        env.trace(self.me(), format_args!("connection {net} failed"));
        let error = "connection refused or timed out".to_string();
        self.input(Input::ConnectFailed { conn, error, fatal: false }, env);
    }

    pub fn on_conn_lost(&mut self, net: NetConn, env: &mut Env) {
        let Some(&conn) = self.net_conns.get(&net) else { return };
        env.trace(self.me(), format_args!("lost connection {net}"));
        self.cache_conn_lost(net, env);
        let lost: Vec<RequestId> = self.pending.iter().filter(|(_, c)| **c == conn).map(|(r, _)| *r).collect();
        for request in lost {
            self.pending.remove(&request);
            self.deliver(Delivery::Reply { request, result: Err(RequestError::Closed) }, env);
        }
        self.deliver(Delivery::Lost { conn }, env);
    }

    pub fn on_message(&mut self, net: NetConn, msg: ServerMessage, env: &mut Env) {
        let Some(&conn) = self.net_conns.get(&net) else { return };
        match msg {
            ServerMessage::Reply { id, result } if id >= cache::CACHE_REQUEST_BASE => {
                self.on_cache_message(id, result.map_err(cache::error_text), env);
            }
            ServerMessage::Reply { id, result } => {
                let request = RequestId(id);
                if self.pending.remove(&request).is_none() {
                    return; // timed out already
                }
                env.trace(self.me(), format_args!("<- #{id} {}", crate::describe_result(&result)));
                self.deliver(Delivery::Reply { request, result: result.map_err(RequestError::Server) }, env);
            }
            ServerMessage::Event(event) => {
                env.trace(self.me(), format_args!("<= {}", crate::describe_event(&event)));
                self.deliver(Delivery::Event { conn, event }, env);
            }
        }
    }

    // ---- the data path ----

    /// Starts an application I/O; its outcome comes back through
    /// [`AgentHost::app_io_done`].
    pub fn submit(&mut self, att: AttachmentId, kind: IoKind, env: &mut Env) -> u64 {
        let id = self.next_io;
        self.next_io += 1;
        let submitted = if matches!(kind, IoKind::Flush) { env.oracle.flush_sent() } else { 0 };
        self.ios
            .insert(id, Io { att, kind, desc: None, remaining: 0, error: None, flush_seq: 0, behind: None, submitted });
        self.admit(id, env);
        id
    }

    fn admit(&mut self, id: u64, env: &mut Env) {
        let now = self.clock(env);
        let Some(io) = self.ios.get(&id) else { return };
        let probing = self.cache_probing(io.att);
        let Some(a) = self.atts.get_mut(&io.att) else {
            return self.finish_io(id, Err("the volume is detached".into()), env);
        };
        match &a.phase {
            Phase::Revoked(reason) => {
                let why = format!("handle revoked: {reason}");
                return self.finish_io(id, Err(why), env);
            }
            Phase::Closed => return self.finish_io(id, Err("the volume is detached".into()), env),
            Phase::Recalled { .. } => return a.held.push_back(id),
            Phase::Open if a.detaching => return self.finish_io(id, Err("the volume is detaching".into()), env),
            Phase::Open if now >= a.lease_until || probing => return a.held.push_back(id),
            Phase::Open => {}
        }
        a.in_flight += 1;
        let desc = a.desc.clone();
        let io = self.ios.get_mut(&id).expect("present");
        io.desc = Some(desc);
        self.proceed(id, env);
    }

    /// An admitted I/O: wait for the writes behind it must follow, preserve
    /// its chunk if needed, then send it.
    fn proceed(&mut self, id: u64, env: &mut Env) {
        let me = self.me();
        let Some(io) = self.ios.get(&id) else { return };
        let desc = io.desc.clone().expect("admitted");
        let Some(a) = self.atts.get_mut(&io.att) else { return };
        let waits = match io.kind {
            IoKind::Flush => a.behind.range(..id).next().is_some(),
            IoKind::Write { block, .. } | IoKind::Read { block } => a.behind.iter().any(|other| {
                *other != id
                    && self.ios.get(other).is_some_and(
                        |o| matches!(o.kind, IoKind::Write { block: b, .. } | IoKind::Read { block: b } if b == block),
                    )
            }),
        };
        if waits {
            env.trace(me, format_args!("io{id} waits for writes behind"));
            return a.after_behind.push(id);
        }
        if matches!(io.kind, IoKind::Flush) {
            if let Some(e) = a.behind_failed.take() {
                return self.finish_io(id, Err(format!("a write acknowledged before it landed failed: {e}")), env);
            }
        }
        if let IoKind::Write { block, .. } = io.kind {
            if let Some(epoch) = &desc.snapshot {
                let chunk = block * BLOCK_BYTES / epoch.chunk_bytes;
                let a = self.atts.get_mut(&io.att).expect("admitted I/O has its attachment");
                let known =
                    epoch.cow.contains(chunk) || (a.preserved.0 == epoch.id.0 && a.preserved.1.contains(&chunk));
                if chunk < epoch.chunk_count() && !known {
                    let att = io.att;
                    let behind = !a.cow_by_server && a.behind.len() < WRITES_BEHIND_MAX;
                    match a.preserving.get_mut(&chunk) {
                        Some(p) => p.waiters.push(id),
                        None => {
                            let p = Preserve { snapshot: epoch.id.0, waiters: vec![id], step: PreserveStep::Reading };
                            a.preserving.insert(chunk, p);
                            self.start_preserve(att, chunk, env);
                        }
                    }
                    if behind {
                        if let (Some(a), Some(io)) = (self.atts.get_mut(&att), self.ios.get_mut(&id)) {
                            a.behind.insert(id);
                            // A point in the oracle's order (flushes sent later must cover it).
                            io.behind = Some(env.oracle.flush_sent());
                            let kind = io.kind.clone();
                            env.stats.writes_behind += 1;
                            env.trace(self.me(), format_args!("io{id} acknowledged behind"));
                            self.app_io_done(id, kind, Ok(()), env);
                        }
                    }
                    return;
                }
            }
        }
        self.send_io(id, env);
    }

    /// Sends an admitted I/O to the devices (lease permitting).
    fn send_io(&mut self, id: u64, env: &mut Env) {
        let now = self.clock(env);
        let Some(io) = self.ios.get(&id) else { return };
        let att = io.att;
        let Some(a) = self.atts.get_mut(&att) else { return };
        if let Phase::Revoked(reason) = &a.phase {
            let why = format!("handle revoked: {reason}");
            return self.finish_io(id, Err(why), env);
        }
        if now >= a.lease_until {
            return a.lease_wait.push(id);
        }
        if now < self.writes_from && matches!(io.kind, IoKind::Write { .. }) {
            a.lease_wait.push(id);
            let at = env.now + (self.writes_from - now);
            return env.schedule(at, Ev::AgentWake { agent: self.index, inc: self.inc });
        }
        let cached = match io.kind.clone() {
            IoKind::Write { block, tag } => self.cache_write(id, block, tag, env),
            IoKind::Read { block } => self.cache_read(id, block, env),
            IoKind::Flush => false,
        };
        if cached || self.intent_wait(id, env) {
            return;
        }
        let Some(io) = self.ios.get(&id) else { return };
        let Some(a) = self.atts.get(&att) else { return };
        let handle = a.handle;
        let volume_id = a.volume_id;
        let volume = a.volume.clone();
        let me = Proc::Agent(self.index);
        let desc = io.desc.clone().expect("admitted");
        let kind = io.kind.clone();
        // (device, request, the (block, tag) a write puts there)
        let mut sends: Vec<DevSend> = Vec::new();
        match &kind {
            IoKind::Write { block, tag } => {
                for (dev, offset) in block_legs(&desc, *block, env) {
                    let op = DevOp::Write { block: offset / BLOCK_BYTES, data: vec![Content::Tag(*tag)], fua: false };
                    sends.push((dev, op, None));
                }
                env.oracle.sent(volume_id, *block, *tag, format!("{me}/h{handle}"));
            }
            IoKind::Read { block } => {
                if let Some((dev, offset)) = block_legs(&desc, *block, env).into_iter().next() {
                    sends.push((dev, DevOp::Read { block: offset / BLOCK_BYTES, count: 1 }, Some((volume_id, *block))));
                }
            }
            IoKind::Flush => {
                for dev in layout_devices(&desc, env) {
                    sends.push((dev, DevOp::Flush, None));
                }
            }
        }
        if sends.is_empty() {
            return self.finish_io(id, Err("no device for the block".into()), env);
        }
        let devs: Vec<usize> = sends.iter().map(|(d, _, _)| *d).collect();
        let what = match &kind {
            IoKind::Write { block, tag } => format!("write {volume} b{block} w{tag}"),
            IoKind::Read { block } => format!("read {volume} b{block}"),
            IoKind::Flush => format!("flush {volume}"),
        };
        env.trace(me, format_args!("io{id} {what} (h{handle}) -> devices {devs:?}"));
        let io = self.ios.get_mut(&id).expect("present");
        io.remaining = sends.len();
        io.flush_seq = env.oracle.flush_sent();
        for (dev, op, check) in sends {
            self.dev_send(dev, op, DevPurpose::Io(id), Some(handle), check, env);
        }
    }

    fn dev_send(
        &mut self,
        dev: usize,
        op: DevOp,
        purpose: DevPurpose,
        handle: Option<u64>,
        check: Option<(u64, u64)>,
        env: &mut Env,
    ) {
        let token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(token, purpose);
        let is_write = matches!(op, DevOp::Write { .. });
        let origin = DevOrigin { proc: self.me(), inc: self.inc, token, handle, check, is_write };
        env.device_submit(dev, op, origin);
    }

    pub fn on_device_done(&mut self, token: u64, result: DevResult, env: &mut Env) {
        match self.tokens.remove(&token) {
            Some(DevPurpose::Io(id)) => {
                let Some(io) = self.ios.get_mut(&id) else { return };
                if let DevResult::Failed(e) = &result {
                    io.error.get_or_insert_with(|| e.clone());
                }
                io.remaining = io.remaining.saturating_sub(1);
                if io.remaining == 0 {
                    let r = match io.error.take() {
                        Some(e) => Err(e),
                        None => Ok(result),
                    };
                    self.finish_io(id, r, env);
                }
            }
            Some(DevPurpose::Preserve { att, chunk }) => self.preserve_step(att, chunk, result, env),
            Some(DevPurpose::Destage(att)) => self.round_step(att, Some(result), env),
            Some(DevPurpose::DetachFlush(att)) => {
                if let Some(a) = self.atts.get_mut(&att) {
                    if let Some(n) = a.detach_flush.as_mut() {
                        *n = n.saturating_sub(1);
                    }
                    let mut queue = VecDeque::new();
                    self.check_detached(att, &mut queue, env);
                    for input in queue {
                        self.input(input, env);
                    }
                }
            }
            None => {}
        }
    }

    /// An I/O ends (admitted or not): tell the application, drain.
    fn finish_io(&mut self, id: u64, result: Result<DevResult, String>, env: &mut Env) {
        let Some(io) = self.ios.remove(&id) else { return };
        let admitted = io.desc.is_some();
        self.intent_end(io.att, id, result.is_ok(), env);
        match &result {
            Ok(DevResult::Read(b)) => {
                let got = b.first().map_or("nothing".to_string(), |c| c.to_string());
                env.trace(self.me(), format_args!("io{id} done: {got}"));
            }
            Ok(_) => env.trace(self.me(), format_args!("io{id} done")),
            Err(e) => env.trace(self.me(), format_args!("io{id} failed: {e}")),
        }
        if let (IoKind::Write { tag, .. }, Ok(_)) = (&io.kind, &result) {
            env.oracle.acked(*tag);
            env.stats.writes_acked += 1;
        }
        if let (IoKind::Flush, Ok(_)) = (&io.kind, &result) {
            // What a FLUSH promises: every write acknowledged before the
            // application sent it has landed.
            let early = self.atts.get(&io.att).and_then(|a| {
                a.behind.iter().find(|w| self.ios.get(w).and_then(|w| w.behind).is_some_and(|at| at < io.submitted))
            });
            if let Some(w) = early {
                env.fail("flush-covers-writes-behind", format!("io{id} (a FLUSH) completed before write behind io{w}"));
            }
        }
        let mut after_behind = Vec::new();
        if io.behind.is_some() {
            if let Some(a) = self.atts.get_mut(&io.att) {
                a.behind.remove(&id);
                if let Err(e) = &result {
                    a.behind_failed.get_or_insert_with(|| e.clone());
                }
                after_behind = std::mem::take(&mut a.after_behind);
            }
        }
        if let (IoKind::Flush, Ok(_)) = (&io.kind, &result) {
            if let Some(a) = self.atts.get(&io.att) {
                env.oracle.flushed(a.volume_id, io.flush_seq);
            }
        }
        if admitted {
            if let Some(a) = self.atts.get_mut(&io.att) {
                a.in_flight = a.in_flight.saturating_sub(1);
            }
            let mut queue = VecDeque::new();
            self.check_drain(io.att, &mut queue, env);
            for input in queue {
                self.input(input, env);
            }
        }
        // Those that waited for it look again (in the order they came).
        for waiting in after_behind {
            self.proceed(waiting, env);
        }
        if io.behind.is_none() {
            self.app_io_done(id, io.kind, result.map(|_| ()), env);
        }
    }

    fn check_drain(&mut self, att: AttachmentId, queue: &mut VecDeque<Input>, env: &mut Env) {
        let cache_idle = self.cache_idle(att);
        let Some(a) = self.atts.get_mut(&att) else { return };
        if a.in_flight == 0 && cache_idle {
            if let Some(generation) = a.drain_for.take() {
                queue.push_back(Input::Drained { attachment: att, generation, result: Ok(()) });
            }
        }
        self.check_detached(att, queue, env);
    }

    fn check_detached(&mut self, att: AttachmentId, queue: &mut VecDeque<Input>, env: &mut Env) {
        let cache_idle = self.cache_idle(att);
        let Some(a) = self.atts.get(&att) else { return };
        if a.detaching && a.detach_flush == Some(0) && a.in_flight == 0 && cache_idle {
            let Some(result) = self.intent_before_close(att, queue, env) else { return };
            let Some(a) = self.atts.get_mut(&att) else { return };
            a.detach_flush = None;
            a.phase = Phase::Closed;
            let result = result.map_err(client_agent::core::DetachFailure::LeaveHandle);
            queue.push_back(Input::Detached { attachment: att, result });
        }
    }

    /// Re-admits I/O held at the gate (after a publish or a renewal).
    fn release_held(&mut self, att: AttachmentId, env: &mut Env) {
        let Some(a) = self.atts.get_mut(&att) else { return };
        let held: Vec<u64> = a.held.drain(..).collect();
        for id in held {
            self.admit(id, env);
        }
    }

    fn release_lease_waiters(&mut self, env: &mut Env) {
        let now = self.clock(env);
        let ready: Vec<AttachmentId> = self
            .atts
            .iter()
            .filter(|(_, a)| now < a.lease_until && (!a.lease_wait.is_empty() || !a.held.is_empty()))
            .map(|(id, _)| *id)
            .collect();
        for att in ready {
            let waiting: Vec<u64> = std::mem::take(&mut self.atts.get_mut(&att).expect("present").lease_wait);
            for id in waiting {
                self.send_io(id, env);
            }
            if self.atts.get(&att).is_some_and(|a| a.phase == Phase::Open) {
                self.release_held(att, env);
            }
        }
    }

    /// Fails I/O that waits at the gate or for the lease (revoked).
    fn fail_waiting(&mut self, att: AttachmentId, env: &mut Env) {
        let Some(a) = self.atts.get_mut(&att) else { return };
        let reason = match &a.phase {
            Phase::Revoked(r) => format!("handle revoked: {r}"),
            _ => "the volume is detached".into(),
        };
        let mut ids: Vec<u64> = a.held.drain(..).collect();
        ids.append(&mut a.lease_wait);
        let waiters: Vec<u64> = a.preserving.values_mut().flat_map(|p| p.waiters.drain(..)).collect();
        ids.extend(waiters);
        for id in ids {
            self.finish_io(id, Err(reason.clone()), env);
        }
    }

    // ---- copy-on-write ----

    fn start_preserve(&mut self, att: AttachmentId, chunk: u64, env: &mut Env) {
        let now = self.clock(env);
        let Some(a) = self.atts.get_mut(&att) else { return };
        let desc = a.desc.clone();
        let epoch = desc.snapshot.as_ref().expect("preserving needs a snapshot");
        if a.cow_by_server {
            // Another writer may have registered and overwritten it meanwhile:
            // the server copies.
            if let Some(p) = a.preserving.get_mut(&chunk) {
                p.step = PreserveStep::Registering;
            }
            let (volume, snapshot) = (a.volume.clone(), epoch.id.0);
            self.register(att, chunk, volume, snapshot, true, env);
            return;
        }
        // Lease check before touching a device, as for any request.
        if now >= a.lease_until {
            return self.preserve_failed(att, chunk, "the lease ran out before the copy".into(), env);
        }
        let start = chunk * epoch.chunk_bytes;
        let handle = a.handle;
        let Some((dev, offset)) = range_legs(&desc, start, env).into_iter().next() else {
            return self.preserve_failed(att, chunk, "no leg to read the pre-image from".into(), env);
        };
        let op = DevOp::Read { block: offset / BLOCK_BYTES, count: epoch.chunk_bytes / BLOCK_BYTES };
        self.dev_send(dev, op, DevPurpose::Preserve { att, chunk }, Some(handle), None, env);
    }

    fn preserve_step(&mut self, att: AttachmentId, chunk: u64, result: DevResult, env: &mut Env) {
        let now = self.clock(env);
        let Some(a) = self.atts.get_mut(&att) else { return };
        let lease_ran_out = now >= a.lease_until;
        let handle = a.handle;
        let desc = a.desc.clone();
        let volume = a.volume.clone();
        let Some(p) = a.preserving.get_mut(&chunk) else { return };
        let snapshot = p.snapshot;
        match &mut p.step {
            PreserveStep::Reading => {
                let data = match result {
                    DevResult::Read(data) => data,
                    DevResult::Failed(e) => {
                        return self.preserve_failed(att, chunk, format!("reading the pre-image: {e}"), env)
                    }
                    DevResult::Done => return self.preserve_failed(att, chunk, "a read answered Done".into(), env),
                };
                let Some(epoch) = desc.snapshot.as_ref().filter(|e| e.id.0 == snapshot) else {
                    return self.preserve_failed(att, chunk, "the snapshot changed".into(), env);
                };
                // The lease again before the next device request (the copy
                // may have waited: a paused process, a slow device).
                if lease_ran_out {
                    return self.preserve_failed(att, chunk, "the lease ran out during the copy".into(), env);
                }
                let legs = cow_legs(&desc, epoch, chunk, env);
                if legs.is_empty() {
                    return self.preserve_failed(att, chunk, "no leg of the COW area".into(), env);
                }
                p.step = PreserveStep::Writing { remaining: legs.len(), failed: None };
                for (dev, offset) in legs {
                    let op = DevOp::Write { block: offset / BLOCK_BYTES, data: data.clone(), fua: true };
                    self.dev_send(dev, op, DevPurpose::Preserve { att, chunk }, Some(handle), None, env);
                }
            }
            PreserveStep::Writing { remaining, failed } => {
                if let DevResult::Failed(e) = result {
                    failed.get_or_insert(e);
                }
                *remaining -= 1;
                if *remaining > 0 {
                    return;
                }
                if let Some(e) = failed.take() {
                    return self.preserve_failed(att, chunk, format!("copying the pre-image: {e}"), env);
                }
                p.step = PreserveStep::Registering;
                self.register(att, chunk, volume, snapshot, false, env);
            }
            PreserveStep::Registering => {}
        }
    }

    fn register(
        &mut self,
        att: AttachmentId,
        chunk: u64,
        volume: String,
        snapshot: u64,
        server_copies: bool,
        env: &mut Env,
    ) {
        let caller = CallerId(self.next_caller);
        self.next_caller += 1;
        self.callers.insert(caller, CallerPurpose::Cow { att, chunk });
        let input = Input::CowRegister { caller, volume, snapshot, chunks: vec![chunk], server_copies };
        self.input(input, env);
    }

    fn registered(&mut self, att: AttachmentId, chunk: u64, reply: Reply, env: &mut Env) {
        match reply {
            Reply::Registered(Ok(())) => {
                let Some(a) = self.atts.get_mut(&att) else { return };
                let Some(p) = a.preserving.remove(&chunk) else { return };
                if a.preserved.0 != p.snapshot {
                    a.preserved = (p.snapshot, BTreeSet::new());
                }
                a.preserved.1.insert(chunk);
                for id in p.waiters {
                    self.send_io(id, env);
                }
            }
            Reply::Registered(Err(e)) => self.preserve_failed(att, chunk, format!("registering: {e}"), env),
            _ => {}
        }
    }

    fn preserve_failed(&mut self, att: AttachmentId, chunk: u64, why: String, env: &mut Env) {
        let Some(p) = self.atts.get_mut(&att).and_then(|a| a.preserving.remove(&chunk)) else { return };
        for id in p.waiters {
            self.finish_io(id, Err(format!("copy-on-write of chunk {chunk}: {why}")), env);
        }
    }

    // ---- what the application and the checks see ----

    pub fn attachment_of(&self, volume: &str) -> Option<AttachmentId> {
        self.atts.iter().find(|(_, a)| a.volume == volume).map(|(id, _)| *id)
    }

    pub fn att(&self, id: AttachmentId) -> Option<&Att> {
        self.atts.get(&id)
    }

    /// From now on the server copies `volume`'s pre-images (a handover's
    /// source asks for its token only with nothing in flight, so no copy of
    /// its own is pending, as production's switch waits for).
    pub fn use_server_copies(&mut self, volume: &str) {
        for a in self.atts.values_mut().filter(|a| a.volume == volume) {
            a.cow_by_server = true;
        }
    }

    /// Whether the gate of `volume` is recalled (for the settled check).
    pub fn recalled(&self, volume: &str) -> Option<u64> {
        self.atts.values().find(|a| a.volume == volume).and_then(|a| match a.phase {
            Phase::Recalled { generation } => Some(generation),
            _ => None,
        })
    }

    /// Whether the handle of `volume` was revoked (its I/O fails).
    pub fn is_revoked(&self, volume: &str) -> bool {
        self.atts.values().any(|a| a.volume == volume && matches!(a.phase, Phase::Revoked(_)))
    }

    pub fn is_open(&self, volume: &str) -> bool {
        self.atts.values().any(|a| a.volume == volume && a.phase == Phase::Open)
    }

    /// The id the next [`AgentHost::submit`] returns.
    pub fn next_io_id(&self) -> u64 {
        self.next_io
    }

    pub fn new_caller(&mut self, call: crate::app::AppCall) -> CallerId {
        let caller = CallerId(self.next_caller);
        self.next_caller += 1;
        self.callers.insert(caller, CallerPurpose::App(call));
        caller
    }
}

/// (sim device, byte offset) of every leg of volume `block`.
fn block_legs(desc: &VolumeDescription, block: u64, env: &Env) -> Vec<(usize, u64)> {
    range_legs(desc, block * BLOCK_BYTES, env)
}

fn range_legs(desc: &VolumeDescription, offset: u64, env: &Env) -> Vec<(usize, u64)> {
    let Ok(mut segments) = desc.map(offset, BLOCK_BYTES) else { return Vec::new() };
    let Some(seg) = segments.next() else { return Vec::new() };
    sim_legs(desc, seg, env)
}

/// (sim device, byte offset) of every leg of `seg` that takes writes
/// (the legs on online devices), in the extent's order.
fn sim_legs(desc: &VolumeDescription, seg: volume_format::mapping::Segment<'_>, env: &Env) -> Vec<(usize, u64)> {
    let Ok(legs) = seg.legs() else { return Vec::new() };
    legs.iter()
        .filter(|leg| leg.state.takes_writes())
        .filter_map(|leg| Some((env.device_by_uuid(desc.device(leg.device)?.device_uuid)?, leg.device_offset)))
        .collect()
}

/// Where `chunk`'s pre-image goes: the description's newest snapshot's COW
/// area, which must be `epoch`.
fn cow_legs(
    desc: &VolumeDescription,
    epoch: &volume_format::description::SnapshotEpoch,
    chunk: u64,
    env: &Env,
) -> Vec<(usize, u64)> {
    let map = desc.mapping(&desc.devices);
    let Some(area) = map.newest.filter(|a| a.snapshot == epoch.id) else { return Vec::new() };
    let Ok(seg) = area.chunk(chunk, 0, epoch.chunk_bytes) else { return Vec::new() };
    sim_legs(desc, seg, env)
}

/// Every sim device the volume's layout uses.
fn layout_devices(desc: &VolumeDescription, env: &Env) -> Vec<usize> {
    let set: BTreeSet<usize> =
        desc.devices.iter().filter(|d| d.online).filter_map(|d| env.device_by_uuid(d.device_uuid)).collect();
    set.into_iter().collect()
}
