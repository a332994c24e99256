//! The metadata server: the **real** [`Core`] in a simulated shell.
//!
//! The core runs unchanged; this file replaces what `server::owner`,
//! `server::session` and `server::device_task` do around it:
//! - sessions: a connection the server accepted becomes
//!   [`Input::Connected`]; each request is checked against its role (as the
//!   session task does) and becomes [`Input::Request`]; replies take the
//!   session task's hop ([`crate::config::Config::reply_hop_ms`]) while
//!   events go straight onto the connection — so an event may overtake a
//!   reply produced before it, as in production;
//! - the device task: the metadata writes the core sealed (journal entries,
//!   checkpoints), one [`RawWrite`] at a time, as `Pool::write_raw` does
//!   them (every copy at once: write, flush, read back if asked; then the
//!   blocks to clear) — the bytes are the real journal format;
//! - jobs: pre-image copies and merges read and write the simulated devices
//!   as `snapshot_io` does (first online leg for reads, every online leg
//!   with FUA for writes);
//! - cache mirrors (issue 15): what `mirror::worker` does with a
//!   [`Effect::Mirror`] and the `MirrorReplay`/`MirrorPrepare` jobs, on
//!   the host's mirror files ([`crate::mirror`], kept in `Env::mirrors`:
//!   they outlive the server's incarnations). Each request's file I/O takes
//!   a latency drawn as a device's (an [`Ev::Notify`] with a mirror token),
//!   in the volume's order; its answer goes straight to the session (or
//!   becomes the job's outcome), and is lost if the incarnation died. A
//!   replay writes the records' final blocks as `write_live` does (every
//!   leg that takes writes, FUA, the pool lease asked first, up to
//!   `REPLAY_WRITES_IN_FLIGHT` writes at once); it leaves the file (the
//!   core removes it once "nothing pending" is committed);
//! - ticks: every `lease_ms / 4` (as the owner loop) and at the core's next
//!   deadline;
//! - boot: the real journal loader over every reachable device (the newest
//!   checkpoint plus the entries after it), as `Pool::open_journaled` reads
//!   the pool, then a new `Core` (handles restored, grace period).
//!
//! What a commit costs in time is the devices' latency; a mirror request,
//! its host disk's; nothing else here takes simulated time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use control_client::handshake::Peer;
use metadata_server::pool::journal::{PoolJournal, RawWrite};
use metadata_server::pool::metadata_holders;
use metadata_server::server::commit::MetaJournal;
use metadata_server::server::core::{Core, CoreConfig, Effect, Entropy, Input, Now, ReplyId, TaskId};
use metadata_server::server::jobs::{DeviceExtents, ExtentCopy, Job, JobOutcome};
use volume_format::control::auth::Role;
use volume_format::control::messages::{ClientMessage, ControlError, ErrorCode, Request, Response, ServerMessage};
use volume_format::metadata::journal::{self, CopyImage, LoadOptions};
use volume_format::metadata::{MetadataArea, PoolMetadata, SnapshotRecord};
use volume_format::{PublicKey, SnapshotId, VolumeId};

use crate::device::{Content, DevOp, DevResult, BLOCK_BYTES};
use crate::net::{ConnId, Proc, Wire};
use crate::rng::Rng;
use crate::world::{DevOrigin, Env, Ev, EPOCH_UNIX_MS};

struct SimEntropy(Rng);

impl Entropy for SimEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }
}

/// What a request was, for the observer's checks on its reply.
#[derive(Debug, Clone)]
pub struct Asked {
    pub conn: ConnId,
    pub id: u64,
    pub request: Request,
}

/// The device task's queue.
enum DeviceWork {
    Write { task: TaskId, write: RawWrite },
    Check { task: TaskId, index: u32 },
}

/// Sealed metadata writes in progress: every copy at once (write, flush,
/// read back if asked), then the blocks to clear on the copies that took
/// them.
struct WriteRun {
    task: TaskId,
    write: RawWrite,
    clearing: bool,
    /// Per target in progress: (copy, sim device, offset, step).
    steps: BTreeMap<u64, (usize, usize, u64, WriteStep)>,
    written: Vec<bool>,
    failures: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WriteStep {
    Write,
    Flush,
    Verify,
}

/// A pre-image copy or merge in progress: one chunk at a time, read then
/// write every leg.
struct JobRun {
    chunks: VecDeque<ChunkStep>,
    chunk_blocks: u64,
    state: JobState,
}

enum JobState {
    Reading { legs: Vec<(usize, u64)>, targets: Vec<(usize, u64)> },
    Writing { data: Vec<Content>, targets: Vec<(usize, u64)>, written: usize },
}

enum Purpose {
    /// A step of the metadata write in progress (the token of the target).
    Meta,
    Job(TaskId),
    /// A leg of write `write` of the cache mirror replay of request `op`.
    Replay {
        op: u64,
        write: usize,
    },
}

/// Who waits for a cache mirror request's answer
/// (production: the oneshot the session or the job's task awaits).
enum MirrorWaiter {
    Reply(ReplyId),
    Job(TaskId),
}

/// One write of a replay: its blocks, and (sim device, byte offset) of
/// every leg.
type ReplayWrite = (Vec<Content>, Vec<(usize, u64)>);

/// A cache mirror replay writing to the devices (`mirror::worker`'s
/// `replay`: up to `REPLAY_WRITES_IN_FLIGHT` writes at once, each on every
/// leg with FUA).
struct ReplayRun {
    volume: VolumeId,
    /// Writes not sent yet.
    queue: VecDeque<ReplayWrite>,
    /// Legs still in flight per write sent.
    legs_left: BTreeMap<usize, usize>,
    next_write: usize,
    total: usize,
    done: usize,
    records: usize,
    failure: Option<String>,
}

pub struct ServerProc {
    pub host: usize,
    pub inc: u64,
    /// The term of its host's process (two-server world; 0 in the one-server
    /// world, where a process serves once).
    pub term: u64,
    pub core: Core,
    boot_ms: u64,
    /// The process's VM-pause lag when the term started (its monotonic
    /// clock misses what is added since).
    lag_at_boot_ms: u64,
    /// Two-server world: the lease task's commit window (`LeaseGuard`),
    /// checked before every metadata write; `None`: always (one server).
    guard: Option<crate::lease::Guard>,
    /// A metadata write waits for a late renewal until then (true ms).
    guard_wait_until: Option<u64>,
    /// The core asked to hand the lease to this host id (the host does it).
    pub handoff_asked: Option<u32>,
    /// The core stopped serving (`Effect::Stop`): the host ends the term.
    pub stopped: Option<String>,
    /// Inputs for the core that arrive as messages (after this event).
    deferred: VecDeque<Input>,
    sessions: BTreeMap<u64, ConnId>,
    conn_sessions: BTreeMap<ConnId, u64>,
    next_session: u64,
    replies: BTreeMap<ReplyId, Asked>,
    next_reply: ReplyId,
    work: VecDeque<DeviceWork>,
    writing: Option<WriteRun>,
    checking: Option<TaskId>,
    jobs: BTreeMap<TaskId, JobRun>,
    /// Cache mirror requests of this term awaiting their answer, by id.
    mirror_waiters: BTreeMap<u64, MirrorWaiter>,
    /// Cache mirror replays writing, by request id.
    replays: BTreeMap<u64, ReplayRun>,
    tokens: BTreeMap<u64, Purpose>,
    next_token: u64,
    tick_ms: u64,
    /// Earliest extra tick already scheduled.
    deadline_tick_at: Option<u64>,
}

fn area_of(env: &Env, dev: usize) -> MetadataArea {
    let l = &env.devices[dev].layout;
    MetadataArea { offset: l.metadata.start, slot_bytes: l.slot_bytes(), slot_count: l.metadata_slot_count }
}

/// The metadata copies on the devices, as the journal loader reads them.
struct RawCopy {
    device: usize,
    area: MetadataArea,
    slots: [Result<Vec<u8>, String>; 2],
    ring: Result<Vec<u8>, String>,
}

impl RawCopy {
    fn read(env: &Env, dev: usize) -> RawCopy {
        let area = area_of(env, dev);
        if !env.devices[dev].up {
            let down = || Err(format!("device {dev} is down"));
            return RawCopy { device: dev, area, slots: [down(), down()], ring: down() };
        }
        let d = &env.devices[dev];
        let slot = |i: u32| Ok(d.read_bytes(area.slot_offset(i), area.slot_bytes));
        let ring = area.ring();
        RawCopy { device: dev, area, slots: [slot(0), slot(1)], ring: Ok(d.read_bytes(ring.start, ring.len_bytes())) }
    }

    fn image(&self) -> CopyImage<'_> {
        let slot = |i: usize| self.slots[i].as_ref().map(|b| b.as_slice()).map_err(Clone::clone);
        CopyImage {
            device: format!("sim://dev{}", self.device),
            area: self.area,
            checkpoint_slots: [slot(0), slot(1)],
            ring: self.ring.as_ref().map(|b| b.as_slice()).map_err(Clone::clone),
        }
    }
}

/// What a restarted server would load from the devices now: the journal
/// loader over the metadata holders (`Pool::open_journaled`).
pub fn load_pool(env: &Env) -> Result<journal::Loaded, String> {
    let server_key = PublicKey(env.server_key.verifying_key().to_bytes());
    let read: Vec<RawCopy> = (0..env.devices.len()).map(|d| RawCopy::read(env, d)).collect();
    let everything: Vec<CopyImage<'_>> = read.iter().map(RawCopy::image).collect();
    let first =
        journal::load(env.pool_uuid, &server_key, &everything, LoadOptions::default()).map_err(|e| e.to_string())?;
    let holders = metadata_holders(&first.metadata);
    let held: Vec<&RawCopy> = read.iter().filter(|r| holders.contains(&env.devices[r.device].uuid)).collect();
    let images: Vec<CopyImage<'_>> = held.iter().map(|r| r.image()).collect();
    let loaded =
        journal::load(env.pool_uuid, &server_key, &images, LoadOptions::default()).map_err(|e| e.to_string())?;
    Ok(loaded)
}

impl ServerProc {
    /// Reads the pool from the devices and starts a core:
    /// `Pool::open_journaled`, `MetaJournal::new`, then `Core::new`.
    pub fn boot(host: usize, inc: u64, env: &mut Env) -> Result<ServerProc, String> {
        Self::boot_term(host, inc, 0, None, env)
    }

    /// A term of the two-server world (`active_term`): as [`ServerProc::boot`],
    /// with the lease task's window guarding every metadata write.
    pub fn boot_term(
        host: usize,
        inc: u64,
        term: u64,
        guard: impl Into<Option<crate::lease::Guard>>,
        env: &mut Env,
    ) -> Result<ServerProc, String> {
        let guard = guard.into();
        let me = Proc::Server(host);
        // `Pool::open_journaled` flushes every device before reading it:
        // what it loads is durable (seed 6429577280763).
        for d in env.devices.iter_mut().filter(|d| d.up) {
            d.flush_now();
        }
        let loaded = load_pool(env)?;
        let meta = loaded.metadata;
        let holders = metadata_holders(&meta);
        let copies: Vec<uuid::Uuid> =
            env.devices.iter().filter(|d| holders.contains(&d.uuid)).map(|d| d.uuid).collect();
        let areas: Vec<(uuid::Uuid, MetadataArea)> =
            (0..env.devices.len()).map(|d| (env.devices[d].uuid, area_of(env, d))).collect();
        let journal =
            MetaJournal::new(PoolJournal { writer: loaded.writer, copies, key: env.server_key.clone() }, areas);
        env.trace(me, format_args!("loaded pool metadata generation {}", meta.generation));
        crate::observer::loaded(env, &meta);
        let core = Core::new(
            meta,
            journal,
            CoreConfig {
                lease_ms: env.cfg.lease_ms,
                durable_ms: env.cfg.durable_ms,
                device_request_max_ms: env.cfg.device_request_max_ms,
                grace_ms: env.cfg.grace_ms,
                key: env.server_key.clone(),
                entropy: Box::new(SimEntropy(env.rng.fork())),
            },
        );
        let tick_ms = (env.cfg.lease_ms / 4).max(25);
        let mut s = ServerProc {
            host,
            inc,
            term,
            core,
            boot_ms: env.now,
            lag_at_boot_ms: env.proc(me).mono_lag_ms,
            guard,
            guard_wait_until: None,
            handoff_asked: None,
            stopped: None,
            deferred: VecDeque::new(),
            sessions: BTreeMap::new(),
            conn_sessions: BTreeMap::new(),
            next_session: 1,
            replies: BTreeMap::new(),
            next_reply: 1,
            work: VecDeque::new(),
            writing: None,
            checking: None,
            jobs: BTreeMap::new(),
            mirror_waiters: BTreeMap::new(),
            replays: BTreeMap::new(),
            tokens: BTreeMap::new(),
            next_token: (term << 40) + 1,
            tick_ms,
            deadline_tick_at: None,
        };
        // The first input starts the core (restores handles, opens the grace period).
        s.apply(Input::Tick, env);
        env.schedule(env.now + tick_ms, Ev::ServerTick { host, inc, term, periodic: true });
        Ok(s)
    }

    /// Inputs that arrived as messages.
    pub fn on_deferred(&mut self, env: &mut Env) {
        if let Some(input) = self.deferred.pop_front() {
            self.apply(input, env);
            self.next_work(env);
        }
    }

    /// An input from the host (the lease task's news).
    pub fn input(&mut self, input: Input, env: &mut Env) {
        self.apply(input, env);
    }

    /// The connections of this term's sessions.
    pub fn session_conns(&self) -> Vec<ConnId> {
        self.sessions.values().copied().collect()
    }

    /// The lease task moved the window: a metadata write waiting for it
    /// goes (or fails) now.
    pub fn guard_changed(&mut self, guard: crate::lease::Guard, env: &mut Env) {
        self.guard = Some(guard);
        if self.guard_wait_until.is_some() {
            self.next_work(env);
        }
    }

    /// The core's clock: the process's lease clock since the term began.
    fn mono_ms(&self, env: &Env) -> u64 {
        let lag = match env.cfg.server_clock {
            crate::config::LeaseClock::Monotonic => env.proc(self.me()).mono_lag_ms - self.lag_at_boot_ms,
            crate::config::LeaseClock::Boottime => 0,
        };
        env.now - self.boot_ms - lag
    }

    fn me(&self) -> Proc {
        Proc::Server(self.host)
    }

    fn now(&self, env: &Env) -> Now {
        Now { mono_ms: self.mono_ms(env), unix_ms: EPOCH_UNIX_MS + env.now }
    }

    pub fn on_accept(&mut self, conn: ConnId, env: &mut Env) {
        let Some(c) = env.net.get(conn).cloned() else { return };
        let session = self.next_session;
        self.next_session += 1;
        if let Some(c) = env.net.get_mut(conn) {
            c.session = Some(session);
        }
        self.sessions.insert(session, conn);
        self.conn_sessions.insert(conn, session);
        let (key, role, name) = match c.client {
            Proc::Agent(a) => (env.agent_keys[a], Role::Agent, format!("agent{a}")),
            Proc::Admin => (env.admin_key, Role::Admin, "admin".to_string()),
            Proc::Server(_) => return,
        };
        let instance = env.proc(c.client).instance;
        let peer = Peer {
            key,
            role,
            name: name.clone(),
            claimed_name: name,
            instance,
            // Agents of a world without the write-intent log (protocol 8)
            // say so, and the server treats their mirrored writes as
            // untracked, as it does a real agent of protocol 7.
            version: if env.cfg.intent_log && role == Role::Agent {
                volume_format::control::messages::INTENT_PROTOCOL_VERSION
            } else {
                volume_format::control::messages::INTENT_PROTOCOL_VERSION - 1
            },
            mode: volume_format::control::auth::ChannelMode::Encrypted,
            kind: volume_format::control::auth::ConnectionKind::Control,
        };
        env.trace(self.me(), format_args!("session {session} for {} (connection {conn})", c.client));
        self.apply(Input::Connected { session, peer, addr: format!("conn{conn}") }, env);
    }

    pub fn on_conn_lost(&mut self, conn: ConnId, env: &mut Env) {
        let Some(session) = self.conn_sessions.remove(&conn) else { return };
        self.sessions.remove(&session);
        env.trace(self.me(), format_args!("session {session} ended (connection {conn} broke)"));
        self.apply(Input::Disconnected { session }, env);
    }

    pub fn on_message(&mut self, conn: ConnId, msg: ClientMessage, env: &mut Env) {
        let Some(&session) = self.conn_sessions.get(&conn) else { return };
        let ClientMessage { id, request } = msg;
        env.trace(self.me(), format_args!("<- s{session}#{id} {}", crate::describe_request(&request)));
        // The session task's role check, before the owner sees it.
        let role = self.core.sessions.get(&session).map(|p| p.role);
        if let (Some(allowed), Some(role)) = (request.allowed_roles(), role) {
            if !allowed.contains(&role) {
                let err = ControlError::new(ErrorCode::PermissionDenied, "wrong role");
                self.send_reply(conn, id, Err(err), env);
                return;
            }
        }
        // The owner's check: nothing is answered without the pool lease.
        if let Some(g) = self.guard.filter(|g| !g.may_commit(crate::lease::mono_ms(env, self.host))) {
            let err = metadata_server::server::lease_task::closed_window_refusal(g.ended);
            env.trace(self.me(), format_args!("-> #{id} refused: {}", err.message));
            self.send_reply(conn, id, Err(err), env);
            return;
        }
        let reply = self.next_reply;
        self.next_reply += 1;
        self.replies.insert(reply, Asked { conn, id, request: request.clone() });
        self.apply(Input::Request { session, request, reply }, env);
    }

    pub fn on_tick(&mut self, periodic: bool, env: &mut Env) {
        if periodic {
            let (host, inc, term) = (self.host, self.inc, self.term);
            env.schedule(env.now + self.tick_ms, Ev::ServerTick { host, inc, term, periodic: true });
        } else if self.deadline_tick_at.is_some_and(|t| t <= env.now) {
            self.deadline_tick_at = None;
        }
        if self.guard_wait_until.is_some_and(|t| t <= env.now) {
            self.next_work(env);
        }
        self.apply(Input::Tick, env);
        crate::observer::after_tick(env, &self.core, (self.host, self.term));
    }

    /// Applies `input` and performs the effects, in order.
    fn apply(&mut self, input: Input, env: &mut Env) {
        let now = self.now(env);
        // What a commit being acknowledged now makes the committed state:
        // the metadata as it is before the input (it includes the batch in
        // flight, and nothing after it unless a batch waits for a checkpoint).
        let candidate = matches!(input, Input::MetaWritten { .. }).then(|| self.core.meta.clone());
        let waiting = self.core.batch_waiting();
        let effects = self.core.apply(now, input);
        for effect in effects {
            if let Effect::Published { .. } = effect {
                env.stats.commits += 1;
                let acked = match (&candidate, waiting) {
                    (Some(meta), false) => Ok(meta.clone()),
                    // Rare: read back what the devices say instead.
                    _ => load_pool(env).map(|l| Arc::new(l.metadata)),
                };
                match acked {
                    Ok(meta) => crate::observer::committed_by(env, &meta, (self.host, self.inc, self.term)),
                    Err(e) => env.fail("generations-only-grow", format!("the committed metadata does not load: {e}")),
                }
                continue;
            }
            self.perform(effect, env);
        }
        if let Some(deadline) = self.core.next_deadline_ms() {
            let at = env.now + deadline.saturating_sub(self.core.now.mono_ms);
            if self.deadline_tick_at.is_none_or(|t| at < t) {
                self.deadline_tick_at = Some(at);
                let (host, inc, term) = (self.host, self.inc, self.term);
                env.schedule(at, Ev::ServerTick { host, inc, term, periodic: false });
            }
        }
    }

    fn send_reply(&mut self, conn: ConnId, id: u64, result: Result<Response, ControlError>, env: &mut Env) {
        let (lo, hi) = env.cfg.reply_hop_ms;
        let at = env.now + env.rng.range(lo, hi);
        env.schedule(at, Ev::SessionOut { conn, msg: ServerMessage::Reply { id, result } });
    }

    fn perform(&mut self, effect: Effect, env: &mut Env) {
        match effect {
            Effect::Reply { reply, result } => {
                let Some(asked) = self.replies.remove(&reply) else { return };
                env.trace(self.me(), format_args!("-> #{} {}", asked.id, crate::describe_result(&result)));
                crate::observer::replied(env, &self.core, &asked, &result);
                self.send_reply(asked.conn, asked.id, result, env);
            }
            Effect::Event { session, event } => {
                if let Some(&conn) = self.sessions.get(&session) {
                    env.trace(self.me(), format_args!("=> s{session} {}", crate::describe_event(&event)));
                    env.send(conn, Wire::ToClient(ServerMessage::Event(event)));
                }
            }
            Effect::Kick { session } => {
                if let Some(&conn) = self.sessions.get(&session) {
                    env.trace(self.me(), format_args!("closes session {session}"));
                    env.break_conn(conn, false, false);
                }
            }
            Effect::MetaWrite { task, write } => {
                self.work.push_back(DeviceWork::Write { task, write });
                self.next_work(env);
            }
            Effect::Job { task, job } => self.start_job(task, job, env),
            Effect::Published { .. } => {}
            // The two-server world: the host hands the lease over, or ends
            // the term.
            Effect::HandOff { to } if self.guard.is_some() => self.handoff_asked = Some(to),
            Effect::Stop { why } if self.guard.is_some() => self.stopped = Some(why),
            // Nobody in this world asks for a handoff and the pool lease is
            // never lost (one server runs at a time): a core that gives up
            // serving on its own would leave the pool without a server.
            Effect::HandOff { to } => env.fail(
                "no-unasked-availability-change",
                format!("the core asked to hand the pool lease to host id {to}, but nobody asked for a handoff"),
            ),
            Effect::Stop { why } => env.fail(
                "no-unasked-availability-change",
                format!("the core stopped serving ({why}) though nobody asked it to and it never lost its lease"),
            ),
            // The host's mirror worker answers the session itself (a
            // request without a reply is done all the same).
            Effect::Mirror { volume, op, reply } => self.mirror_submit(volume, op, reply.map(MirrorWaiter::Reply), env),
        }
    }

    // ---- the device task ----

    fn next_work(&mut self, env: &mut Env) {
        if self.writing.is_some() || self.checking.is_some() {
            return;
        }
        if let (Some(guard), Some(DeviceWork::Write { .. })) = (self.guard, self.work.front()) {
            // `DeviceTask::run`: checked right before the write leaves, waiting
            // up to LEASE_WAIT for a renewal in flight.
            // The guard's window is on the process's clock (the lease task's).
            let now = crate::lease::mono_ms(env, self.host);
            if !guard.may_commit(now) {
                let waited_out = self.guard_wait_until.is_some_and(|t| t <= env.now);
                if !guard.ended && !waited_out {
                    if self.guard_wait_until.is_none() {
                        let at = env.now + crate::lease::LEASE_WAIT_MS;
                        self.guard_wait_until = Some(at);
                        let (host, inc, term) = (self.host, self.inc, self.term);
                        env.schedule(at, Ev::ServerTick { host, inc, term, periodic: false });
                    }
                    return;
                }
                self.guard_wait_until = None;
                let Some(DeviceWork::Write { task, write }) = self.work.pop_front() else { return };
                let why = "this metadata server does not hold the pool lease now; nothing was written".to_string();
                env.trace(self.me(), format_args!("metadata write refused: {why}"));
                // The device task's answer reaches the owner as a message.
                let input = Input::MetaWritten { task, written: vec![false; write.copies], failures: vec![why] };
                self.deferred.push_back(input);
                let (host, inc, term) = (self.host, self.inc, self.term);
                env.schedule(env.now, Ev::ServerDeferred { host, inc, term });
                return;
            }
        }
        self.guard_wait_until = None;
        let Some(work) = self.work.pop_front() else { return };
        match work {
            DeviceWork::Write { task, write } => {
                let what = if write.verify { "checkpoint" } else { "journal entry" };
                env.trace(self.me(), format_args!("writes a metadata {what} ({} bytes per copy)", write.bytes.len()));
                let copies = write.copies;
                self.writing = Some(WriteRun {
                    task,
                    write,
                    clearing: false,
                    steps: BTreeMap::new(),
                    written: vec![false; copies],
                    failures: Vec::new(),
                });
                self.start_writes(env);
            }
            DeviceWork::Check { task, index } => {
                // A check reads the label over the device task's connection.
                self.checking = Some(task);
                let uuid = self.core.meta.device(volume_format::DeviceIndex(index)).map(|d| d.device_uuid);
                match uuid.and_then(|u| env.device_by_uuid(u)) {
                    Some(dev) => {
                        self.device_op(dev, DevOp::Read { block: 0, count: 1 }, Purpose::Job(task), env);
                    }
                    None => {
                        self.checking = None;
                        self.apply(Input::JobDone { task, outcome: JobOutcome::failed("unknown device") }, env);
                        self.next_work(env);
                    }
                }
            }
        }
    }

    fn device_op(&mut self, dev: usize, op: DevOp, purpose: Purpose, env: &mut Env) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(token, purpose);
        let is_write = matches!(op, DevOp::Write { .. });
        let origin = DevOrigin { proc: self.me(), inc: self.inc, token, handle: None, check: None, is_write };
        env.device_submit(dev, op, origin);
        token
    }

    /// Starts every target of the current phase (the writes, or the clears).
    fn start_writes(&mut self, env: &mut Env) {
        let Some(run) = self.writing.as_mut() else { return };
        let (targets, bytes) = if run.clearing {
            let written = run.written.clone();
            let clears: Vec<(usize, uuid::Uuid, u64)> = run
                .write
                .clear_after
                .iter()
                .filter(|(copy, _, _)| written.get(*copy) == Some(&true))
                .cloned()
                .collect();
            (clears, vec![0u8; BLOCK_BYTES as usize])
        } else {
            (run.write.targets.clone(), run.write.bytes.to_vec())
        };
        let mut ops = Vec::new();
        for (copy, uuid, offset) in targets {
            match env.device_by_uuid(uuid) {
                Some(dev) => ops.push((copy, dev, offset)),
                None => run.failures.push(format!("device {uuid} holding a metadata copy is not known")),
            }
        }
        if ops.is_empty() {
            return self.write_phase_done(env);
        }
        for (copy, dev, offset) in ops {
            let token = self.device_op(dev, DevOp::write_bytes(offset, &bytes, false), Purpose::Meta, env);
            self.writing.as_mut().expect("running").steps.insert(token, (copy, dev, offset, WriteStep::Write));
        }
    }

    fn meta_step_done(&mut self, token: u64, result: DevResult, env: &mut Env) {
        let Some(run) = self.writing.as_mut() else { return };
        let Some((copy, dev, offset, step)) = run.steps.remove(&token) else { return };
        let fail = |what: &str, e: &str| format!("device {dev}: {what} at byte offset {offset}: {e}");
        let len = if run.clearing { BLOCK_BYTES } else { run.write.bytes.len() as u64 };
        let next = match (step, result) {
            (WriteStep::Write, DevResult::Failed(e)) => Err(fail("writing metadata", &e)),
            (WriteStep::Flush, DevResult::Failed(e)) => Err(fail("flushing metadata", &e)),
            (WriteStep::Verify, DevResult::Failed(e)) => Err(fail("reading metadata back", &e)),
            (WriteStep::Write, _) => Ok(Some((DevOp::Flush, WriteStep::Flush))),
            (WriteStep::Flush, _) if run.write.verify && !run.clearing => {
                let op = DevOp::Read { block: offset / BLOCK_BYTES, count: len.div_ceil(BLOCK_BYTES) };
                Ok(Some((op, WriteStep::Verify)))
            }
            (WriteStep::Flush, _) => Ok(None),
            (WriteStep::Verify, DevResult::Read(blocks)) => {
                let mut back = blocks_to_bytes(&blocks);
                back.truncate(len as usize);
                if back == run.write.bytes.as_ref() {
                    Ok(None)
                } else {
                    Err(fail("the metadata checkpoint does not read back as written", "device dropped the write"))
                }
            }
            (WriteStep::Verify, DevResult::Done) => Err(fail("reading metadata back", "no data")),
        };
        match next {
            Ok(Some((op, step))) => {
                let token = self.device_op(dev, op, Purpose::Meta, env);
                self.writing.as_mut().expect("running").steps.insert(token, (copy, dev, offset, step));
                return;
            }
            Ok(None) => {
                if !run.clearing {
                    run.written[copy] = true;
                }
            }
            Err(e) => {
                if run.clearing {
                    run.written[copy] = false;
                }
                run.failures.push(e);
            }
        }
        if run.steps.is_empty() {
            self.write_phase_done(env);
        }
    }

    fn write_phase_done(&mut self, env: &mut Env) {
        let lease_gone = self.guard.is_some_and(|g| !g.may_commit(crate::lease::mono_ms(env, self.host)));
        let run = self.writing.as_mut().expect("running");
        if !run.clearing && !run.write.clear_after.is_empty() && lease_gone {
            // `Pool::write_raw`: the lease is asked again before clearing.
            for (copy, _, _) in &run.write.clear_after {
                if let Some(w) = run.written.get_mut(*copy) {
                    *w = false;
                }
            }
            run.failures.push("this metadata server lost the pool lease before clearing the blocks".into());
        } else if !run.clearing && !run.write.clear_after.is_empty() {
            run.clearing = true;
            return self.start_writes(env);
        }
        let run = self.writing.take().expect("running");
        if !run.failures.is_empty() {
            env.trace(self.me(), format_args!("metadata write failed: {}", run.failures.join("; ")));
        }
        self.apply(Input::MetaWritten { task: run.task, written: run.written, failures: run.failures }, env);
        self.next_work(env);
    }

    pub fn on_device_done(&mut self, token: u64, result: DevResult, env: &mut Env) {
        if crate::mirror::is_token(token) {
            return self.on_mirror_io(token - crate::mirror::MIRROR_TOKEN_BASE, env);
        }
        match self.tokens.remove(&token) {
            Some(Purpose::Meta) => self.meta_step_done(token, result, env),
            Some(Purpose::Job(task)) if self.checking == Some(task) => {
                self.checking = None;
                let outcome = match result {
                    DevResult::Failed(e) => JobOutcome::failed(e),
                    _ => JobOutcome::done(),
                };
                self.apply(Input::JobDone { task, outcome }, env);
                self.next_work(env);
            }
            Some(Purpose::Job(task)) => self.job_step_done(task, result, env),
            Some(Purpose::Replay { op, write }) => self.replay_step_done(op, write, result, env),
            None => {}
        }
    }

    // ---- jobs ----

    fn start_job(&mut self, task: TaskId, job: Job, env: &mut Env) {
        env.trace(self.me(), format_args!("job {task}: {}", describe_job(&job)));
        let (meta, chunks, chunk_blocks) = match job {
            Job::CheckDevice { index, .. } => {
                self.work.push_back(DeviceWork::Check { task, index });
                return self.next_work(env);
            }
            Job::CowCopy { meta, volume, snapshot, chunks } => {
                let plan = cow_copy_plan(env, &meta, volume, snapshot, &chunks);
                let cb = meta.snapshot(snapshot).map_or(1, |s| s.chunk_bytes / BLOCK_BYTES);
                (meta, plan, cb)
            }
            Job::Merge { meta, from, into, chunks } => {
                let plan = merge_plan(env, &meta, from, into, &chunks);
                let cb = meta.snapshot(from).map_or(1, |s| s.chunk_bytes / BLOCK_BYTES);
                (meta, plan, cb)
            }
            Job::Zero { extent_bytes, targets } => return self.start_zeroing(task, extent_bytes, &targets, env),
            // The regions a gone holder of a mirrored volume left dirty
            // (`intents`): each copied from the first of its sources that
            // answers onto its target, the lease asked before every write
            // (`copy_chunk`). The simulated server does not probe failed
            // devices (the core's probing is off), so no recovery resync of
            // whole extents onto a device that came back is ever started.
            Job::Resync { extent_bytes, copies, .. } => {
                env.stats.intent_copies += 1;
                let plan = resync_plan(env, &self.core.meta, &copies);
                let meta = self.core.meta.clone();
                (meta, plan, extent_bytes / BLOCK_BYTES)
            }
            // Nor does the simulator run admin reconfigurations.
            Job::LabelDevice(_) => {
                let outcome = JobOutcome::failed("device add is not simulated");
                return self.apply(Input::JobDone { task, outcome }, env);
            }
            // The volume's mirror worker runs them, in its order
            // (`owner::start_job`); the answer is the job's outcome.
            Job::MirrorReplay { meta, volume, expected, named_here, source } => {
                let fetched = match (&source, &expected) {
                    (Some(source), Some(expected)) => {
                        let fetched = fetch_mirror(self.host, source, volume, expected, env);
                        let got = fetched.as_ref().map(|f| (f.generation, f.records.len()));
                        env.stats.mirror_fetches += u64::from(fetched.is_some());
                        env.trace(
                            "mirror",
                            format_args!("{} fetches {volume}'s mirror from {}: {got:?}", self.me(), source.server),
                        );
                        fetched
                    }
                    _ => None,
                };
                let op = metadata_server::mirror::MirrorOp::Replay { meta, expected, named_here, source };
                return self.mirror_submit_fetched(volume, op, fetched, Some(MirrorWaiter::Job(task)), env);
            }
            Job::MirrorPrepare { volume, cache, generation, staged } => {
                let op = metadata_server::mirror::MirrorOp::Prepare { cache, generation, staged };
                return self.mirror_submit(volume, op, Some(MirrorWaiter::Job(task)), env);
            }
            // Simulated devices are plain NBD servers: none fences, so the
            // real job would skip every one (the timing rules cover them).
            Job::Fence { .. } => return self.apply(Input::JobDone { task, outcome: JobOutcome::done() }, env),
        };
        let chunks = match chunks {
            Ok(c) => c,
            Err(e) => return self.apply(Input::JobDone { task, outcome: JobOutcome::failed(e) }, env),
        };
        let _ = meta;
        let run = JobRun {
            chunks: chunks.into(),
            chunk_blocks,
            state: JobState::Reading { legs: Vec::new(), targets: Vec::new() },
        };
        self.jobs.insert(task, run);
        self.job_next_chunk(task, env);
    }

    /// Zeroes whole extents with FUA writes of zero blocks, as the real job
    /// zeroes them with WRITE_ZEROES and a flush.
    fn start_zeroing(&mut self, task: TaskId, extent_bytes: u64, targets: &[DeviceExtents], env: &mut Env) {
        let mut writes = Vec::new();
        for t in targets {
            let dev = self.core.meta.device(t.device).and_then(|d| env.device_by_uuid(d.device_uuid));
            let Some(dev) = dev else {
                let outcome = JobOutcome::failed(format!("device {} is not in the world", t.device));
                return self.apply(Input::JobDone { task, outcome }, env);
            };
            writes.extend(t.offsets.iter().map(|&offset| (dev, offset)));
        }
        let data = vec![Content::Zero; (extent_bytes / BLOCK_BYTES) as usize];
        let run = JobRun {
            chunks: VecDeque::new(),
            chunk_blocks: extent_bytes / BLOCK_BYTES,
            state: JobState::Writing { data, targets: writes, written: 0 },
        };
        self.jobs.insert(task, run);
        self.job_write(task, env);
    }

    fn job_next_chunk(&mut self, task: TaskId, env: &mut Env) {
        let Some(run) = self.jobs.get_mut(&task) else { return };
        let Some((_, sources, targets)) = run.chunks.pop_front() else {
            self.jobs.remove(&task);
            return self.apply(Input::JobDone { task, outcome: JobOutcome::done() }, env);
        };
        run.state = JobState::Reading { legs: sources, targets };
        self.job_read(task, env);
    }

    fn job_read(&mut self, task: TaskId, env: &mut Env) {
        let Some(run) = self.jobs.get_mut(&task) else { return };
        let JobState::Reading { legs, .. } = &mut run.state else { return };
        if legs.is_empty() {
            self.jobs.remove(&task);
            let outcome = JobOutcome::failed("no leg of the chunk could be read");
            return self.apply(Input::JobDone { task, outcome }, env);
        }
        let (dev, offset) = legs.remove(0);
        let op = DevOp::Read { block: offset / BLOCK_BYTES, count: run.chunk_blocks };
        self.device_op(dev, op, Purpose::Job(task), env);
    }

    fn job_step_done(&mut self, task: TaskId, result: DevResult, env: &mut Env) {
        let Some(run) = self.jobs.get_mut(&task) else { return };
        match (&mut run.state, result) {
            (JobState::Reading { .. }, DevResult::Failed(_)) => self.job_read(task, env),
            (JobState::Reading { .. }, DevResult::Read(_))
                if self.guard.is_some_and(|g| !g.may_commit(crate::lease::mono_ms(env, self.host))) =>
            {
                // `run_data_job`: no pre-image write without the pool lease.
                self.jobs.remove(&task);
                let why = metadata_server::server::jobs::NO_LEASE_FOR_JOB;
                env.trace(self.me(), format_args!("job {task}: {why}"));
                self.apply(Input::JobDone { task, outcome: JobOutcome::failed(why) }, env);
            }
            (JobState::Reading { targets, .. }, DevResult::Read(data)) => {
                let targets = std::mem::take(targets);
                run.state = JobState::Writing { data, targets, written: 0 };
                self.job_write(task, env);
            }
            (JobState::Writing { .. }, DevResult::Failed(e)) => {
                self.jobs.remove(&task);
                let outcome = JobOutcome::failed(format!("writing a copy: {e}"));
                self.apply(Input::JobDone { task, outcome }, env);
            }
            (JobState::Writing { written, .. }, _) => {
                *written += 1;
                self.job_write(task, env);
            }
            (JobState::Reading { .. }, DevResult::Done) => self.job_read(task, env),
        }
    }

    fn job_write(&mut self, task: TaskId, env: &mut Env) {
        let Some(run) = self.jobs.get_mut(&task) else { return };
        let JobState::Writing { data, targets, written } = &run.state else { return };
        if *written >= targets.len() {
            return self.job_next_chunk(task, env);
        }
        let (dev, offset) = targets[*written];
        let op = DevOp::Write { block: offset / BLOCK_BYTES, data: data.clone(), fua: true };
        // As production (`run_data_job`, `zero_with`): every data write of a
        // job asks the pool lease first.
        if self.guard.is_some_and(|g| !g.may_commit(crate::lease::mono_ms(env, self.host))) {
            self.jobs.remove(&task);
            let why = metadata_server::server::jobs::NO_LEASE_FOR_JOB;
            env.trace(self.me(), format_args!("job {task}: {why}"));
            return self.apply(Input::JobDone { task, outcome: JobOutcome::failed(why) }, env);
        }
        self.device_op(dev, op, Purpose::Job(task), env);
    }
}

impl ServerProc {
    // ---- cache mirrors ----

    fn owner(&self) -> crate::mirror::Owner {
        (self.inc, self.term)
    }

    /// Queues `op` for `volume`'s mirror worker on this host
    /// (`Mirrors::send`); its file I/O takes a latency of the host's disk
    /// (drawn as a device's), then [`ServerProc::on_mirror_io`].
    fn mirror_submit(
        &mut self,
        volume: VolumeId,
        op: metadata_server::mirror::MirrorOp,
        waiter: Option<MirrorWaiter>,
        env: &mut Env,
    ) {
        self.mirror_submit_fetched(volume, op, None, waiter, env)
    }

    /// [`Self::mirror_submit`], with a copy of another server's file for a
    /// replay ([`fetch_mirror`]).
    fn mirror_submit_fetched(
        &mut self,
        volume: VolumeId,
        op: metadata_server::mirror::MirrorOp,
        fetched: Option<crate::mirror::MirrorFile>,
        waiter: Option<MirrorWaiter>,
        env: &mut Env,
    ) {
        let host = self.host;
        env.mirrors[host].forget_dead(self.inc, &mut env.rng);
        let id = env.mirrors[host].submit_fetched(volume, self.owner(), op, fetched);
        if let Some(waiter) = waiter {
            self.mirror_waiters.insert(id, waiter);
        }
        let (lo, hi) = env.cfg.device_latency_ms;
        let at = env.now + env.rng.range(lo, hi);
        let token = crate::mirror::MIRROR_TOKEN_BASE + id;
        env.schedule(at, Ev::Notify { proc: self.me(), inc: self.inc, token, result: DevResult::Done });
    }

    /// Mirror request `id`'s file I/O is done (durable): the worker takes
    /// what is due.
    fn on_mirror_io(&mut self, id: u64, env: &mut Env) {
        let host = self.host;
        env.mirrors[host].forget_dead(self.inc, &mut env.rng);
        let dones = env.mirrors[host].complete(id, Some(self.owner()));
        self.mirror_dones(dones, env);
    }

    fn mirror_dones(&mut self, dones: Vec<crate::mirror::Done>, env: &mut Env) {
        for done in dones {
            match done {
                crate::mirror::Done::Answer { id, result } => match self.mirror_waiters.remove(&id) {
                    Some(MirrorWaiter::Reply(reply)) => self.perform(Effect::Reply { reply, result }, env),
                    Some(MirrorWaiter::Job(task)) => {
                        let outcome = match result {
                            Ok(_) => JobOutcome::done(),
                            Err(e) => JobOutcome::failed(e.message),
                        };
                        self.apply(Input::JobDone { task, outcome }, env);
                    }
                    None => {}
                },
                crate::mirror::Done::Replay(r) => {
                    let crate::mirror::Replay { id, volume, meta, writes, records } = *r;
                    self.start_replay(id, volume, &meta, writes, records, env)
                }
            }
        }
    }

    /// Writes the final blocks of a mirror's records to the volume's
    /// devices, as `DeviceClients::write_live` does: split at extents, every
    /// leg that takes writes, with FUA, the pool lease asked before each.
    fn start_replay(
        &mut self,
        id: u64,
        volume: VolumeId,
        meta: &PoolMetadata,
        writes: Vec<(u64, Vec<Content>)>,
        records: usize,
        env: &mut Env,
    ) {
        let total = writes.len();
        env.trace(
            self.me(),
            format_args!("replays the cache mirror of volume {volume}: {records} records, {total} writes"),
        );
        let mut queue = VecDeque::new();
        let mut failure = None;
        for (offset, blocks) in writes {
            match replay_targets(env, meta, volume, offset, &blocks) {
                Ok(pieces) => queue.extend(pieces),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let run =
            ReplayRun { volume, queue, legs_left: BTreeMap::new(), next_write: 0, total, done: 0, records, failure };
        self.replays.insert(id, run);
        self.replay_pump(id, env);
    }

    /// Sends writes up to the limit in flight; finishes when all are done
    /// (or one failed and the others are back).
    fn replay_pump(&mut self, id: u64, env: &mut Env) {
        let lease_gone = self.guard.is_some_and(|g| !g.may_commit(crate::lease::mono_ms(env, self.host)));
        loop {
            let Some(run) = self.replays.get_mut(&id) else { return };
            if run.failure.is_some()
                || run.queue.is_empty()
                || run.legs_left.len() >= metadata_server::mirror::replay::REPLAY_WRITES_IN_FLIGHT
            {
                break;
            }
            if lease_gone {
                // `DeviceClients::may_write`.
                let why = "this metadata server does not hold the pool lease now; no more data was written";
                run.failure = Some(why.into());
                break;
            }
            let (data, legs) = run.queue.pop_front().expect("checked");
            let write = run.next_write;
            run.next_write += 1;
            if legs.is_empty() {
                run.done += 1;
                continue;
            }
            run.legs_left.insert(write, legs.len());
            for (dev, offset) in legs {
                let op = DevOp::Write { block: offset / BLOCK_BYTES, data: data.clone(), fua: true };
                self.device_op(dev, op, Purpose::Replay { op: id, write }, env);
            }
        }
        let Some(run) = self.replays.get(&id) else { return };
        if !run.legs_left.is_empty() || (run.failure.is_none() && !run.queue.is_empty()) {
            return;
        }
        let run = self.replays.remove(&id).expect("checked");
        let volume = run.volume;
        let result = match run.failure {
            None => {
                env.trace(self.me(), format_args!("cache mirror of volume {volume} replayed to the devices"));
                Ok(Response::Done)
            }
            Some(e) => {
                let msg = format!(
                    "replaying the cache mirror of volume {volume} to its devices failed after {} of {} writes ({}                      records; {e}); the mirror is kept and the replay is retried at the next open",
                    run.done, run.total, run.records
                );
                env.trace(self.me(), format_args!("{msg}"));
                Err(ControlError::new(ErrorCode::Unavailable, msg))
            }
        };
        let mut dones = vec![crate::mirror::Done::Answer { id, result }];
        dones.extend(env.mirrors[self.host].replay_finished(volume, Some(self.owner())));
        self.mirror_dones(dones, env);
    }

    fn replay_step_done(&mut self, id: u64, write: usize, result: DevResult, env: &mut Env) {
        let Some(run) = self.replays.get_mut(&id) else { return };
        if let DevResult::Failed(e) = result {
            run.failure.get_or_insert(e);
        }
        let Some(left) = run.legs_left.get_mut(&write) else { return };
        *left -= 1;
        if *left == 0 {
            run.legs_left.remove(&write);
            if run.failure.is_none() {
                run.done += 1;
            }
        }
        self.replay_pump(id, env);
    }
}

/// A standing-by server's mirror request `token` is done (its term ended
/// meanwhile): the worker goes on; nobody hears the answers.
pub fn mirror_io_without_term(host: usize, inc: u64, token: u64, env: &mut Env) {
    env.mirrors[host].forget_dead(inc, &mut env.rng);
    let _ = env.mirrors[host].complete(token - crate::mirror::MIRROR_TOKEN_BASE, None);
}

/// The writes of `blocks` at volume byte `offset`: per extent, the blocks
/// and (sim device, byte offset) of every leg that takes writes.
fn replay_targets(
    env: &Env,
    meta: &PoolMetadata,
    volume: VolumeId,
    offset: u64,
    blocks: &[Content],
) -> Result<Vec<ReplayWrite>, String> {
    let len = blocks.len() as u64 * BLOCK_BYTES;
    let map = meta.volume_map(volume).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for segment in map.segments(offset, len).map_err(|e| e.to_string())? {
        let first = ((segment.logical_offset - offset) / BLOCK_BYTES) as usize;
        let count = (segment.len_bytes / BLOCK_BYTES) as usize;
        let legs = segment.write_legs().map_err(|e| e.to_string())?;
        let mut targets = Vec::new();
        for leg in legs.iter() {
            let device = meta.device(leg.device).ok_or_else(|| format!("device {} is not in the pool", leg.device))?;
            let dev = env
                .device_by_uuid(device.device_uuid)
                .ok_or_else(|| format!("device {} is not in the world", leg.device))?;
            targets.push((dev, leg.device_offset));
        }
        out.push((blocks[first..first + count].to_vec(), targets));
    }
    Ok(out)
}

fn blocks_to_bytes(blocks: &[Content]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * BLOCK_BYTES as usize);
    for b in blocks {
        match b {
            Content::Raw(r) => out.extend_from_slice(r),
            _ => out.extend(std::iter::repeat_n(0u8, BLOCK_BYTES as usize)),
        }
    }
    out
}

/// (sim device, byte offset) of every online leg of `legs`.
fn online_legs(
    env: &Env,
    meta: &PoolMetadata,
    legs: &[volume_format::metadata::PhysicalExtent],
    within: u64,
) -> Vec<(usize, u64)> {
    legs.iter()
        .filter_map(|leg| {
            let d = meta.device(leg.device).filter(|d| d.state.is_online())?;
            Some((env.device_by_uuid(d.device_uuid)?, leg.offset + within))
        })
        .collect()
}

/// Where snapshot `s` keeps `chunk`'s pre-image (the pool's mapping, as
/// the server's copy job uses it).
fn cow_chunk<'a>(
    meta: &'a PoolMetadata,
    s: &SnapshotRecord,
    chunk: u64,
) -> Result<volume_format::mapping::Segment<'a>, String> {
    meta.cow_area(s.id)
        .and_then(|area| area.chunk(chunk, 0, s.chunk_bytes))
        .map_err(|e| format!("chunk {chunk} of snapshot {}: {e}", s.name))
}

fn cow_targets(env: &Env, meta: &PoolMetadata, s: &SnapshotRecord, chunk: u64) -> Result<Vec<(usize, u64)>, String> {
    let seg = cow_chunk(meta, s, chunk)?;
    let legs = online_legs(env, meta, seg.physical_legs(), seg.extent_offset);
    if legs.is_empty() {
        return Err(format!("snapshot {}: no leg of chunk {chunk}'s area is online", s.name));
    }
    Ok(legs)
}

/// A chunk to copy: (chunk, the legs to read it from, the legs to write it to).
type ChunkStep = (u64, Vec<(usize, u64)>, Vec<(usize, u64)>);
type ChunkPlan = Vec<ChunkStep>;

fn cow_copy_plan(
    env: &Env,
    meta: &PoolMetadata,
    volume: VolumeId,
    snapshot: SnapshotId,
    chunks: &[u64],
) -> Result<ChunkPlan, String> {
    let s = meta.snapshot(snapshot).ok_or_else(|| format!("snapshot {snapshot} no longer exists"))?;
    let v = meta.volume(volume).ok_or_else(|| format!("volume {volume} no longer exists"))?;
    chunks
        .iter()
        .map(|&chunk| {
            let (start, _) = s.chunk_range(chunk);
            let extent = v
                .extents
                .get((start / meta.extent_bytes) as usize)
                .ok_or_else(|| format!("chunk {chunk} is beyond the volume"))?;
            let sources = online_legs(env, meta, &extent.legs, start % meta.extent_bytes);
            Ok((chunk, sources, cow_targets(env, meta, s, chunk)?))
        })
        .collect()
}

/// The chunks of a resync job: each copy's region, read from its sources
/// in order, written to its target.
fn resync_plan(env: &Env, meta: &PoolMetadata, copies: &[ExtentCopy]) -> Result<ChunkPlan, String> {
    let sim_device = |index: volume_format::DeviceIndex| -> Result<usize, String> {
        meta.device(index)
            .and_then(|d| env.device_by_uuid(d.device_uuid))
            .ok_or_else(|| format!("device {index} is not in the world"))
    };
    copies
        .iter()
        .enumerate()
        .map(|(n, copy)| {
            let &to = copy.to.offsets.first().ok_or("a copy without a target")?;
            let mut sources = Vec::new();
            for from in &copy.from {
                if let Some(&at) = from.offsets.first() {
                    sources.push((sim_device(from.device)?, at));
                }
            }
            Ok((n as u64, sources, vec![(sim_device(copy.to.device)?, to)]))
        })
        .collect()
}

fn merge_plan(
    env: &Env,
    meta: &PoolMetadata,
    from: SnapshotId,
    into: SnapshotId,
    chunks: &[u64],
) -> Result<ChunkPlan, String> {
    let s = meta.snapshot(from).ok_or_else(|| format!("snapshot {from} no longer exists"))?;
    let o = meta.snapshot(into).ok_or_else(|| format!("snapshot {into} no longer exists"))?;
    chunks
        .iter()
        .map(|&chunk| {
            let seg = cow_chunk(meta, s, chunk)?;
            let from = online_legs(env, meta, seg.physical_legs(), seg.extent_offset);
            Ok((chunk, from, cow_targets(env, meta, o, chunk)?))
        })
        .collect()
}

fn describe_job(job: &Job) -> String {
    match job {
        Job::CowCopy { volume, snapshot, chunks, .. } => {
            format!("copy pre-images of volume {volume} chunks {chunks:?} into snapshot {snapshot}")
        }
        Job::Merge { from, into, chunks, .. } => {
            format!("move {} pre-images from snapshot {from} to {into}", chunks.len())
        }
        Job::CheckDevice { index, .. } => format!("check device {index}"),
        Job::Resync { copies, .. } => format!("resync {} extents", copies.len()),
        Job::LabelDevice(request) => format!("label device {}", request.uri),
        Job::MirrorReplay { volume, .. } => format!("replay the cache mirror of volume {volume}"),
        Job::MirrorPrepare { volume, generation, .. } => {
            format!("prepare the file of generation {generation} of the cache mirror of volume {volume}")
        }
        Job::Fence { handles, .. } => format!("fence handles {handles:?} on fencing devices (none simulated)"),
        Job::Zero { targets, .. } => {
            format!("zero {} extents", targets.iter().map(|t| t.offsets.len()).sum::<usize>())
        }
    }
}

/// The model of `mirror::fetch`: the copy of `volume`'s mirror file at the
/// server `source` names, as the active server on `host` fetches it — when
/// that server's process is up and not paused (production: a stopped one
/// does not answer, and the fetch gives up after its timeouts), accepts
/// connections, stands by (the active server refuses: its files are in
/// use), and holds a file of the recorded generation or the next one (its
/// answer's rule, `standby::mirror_chunk`). Taken at once: a server
/// standing by writes nothing to its mirror files. `None`: the fetch fails
/// and the replay is refused, naming that server.
pub fn fetch_mirror(
    host: usize,
    source: &metadata_server::mirror::fetch::MirrorSource,
    volume: VolumeId,
    expected: &volume_format::metadata::CacheMirrorRecord,
    env: &Env,
) -> Option<crate::mirror::MirrorFile> {
    let other = source.addrs.iter().find_map(|a| a.strip_prefix("sim://mds")?.parse::<usize>().ok())?;
    if other == host || !fetchable(other, env) {
        return None;
    }
    let file = env.mirrors.get(other)?.file(volume)?;
    metadata_server::mirror::replayable(file.generation, expected.generation, true).then(|| file.clone())
}

/// Whether the server on `host` would answer a fetch: up, not paused,
/// accepting connections, and standing by (not in an active term, even one
/// it lost without knowing yet: its core refuses, its files are in use).
pub fn fetchable(host: usize, env: &Env) -> bool {
    let up = env.procs.get(&Proc::Server(host)).is_some_and(|p| p.up && p.paused_until <= env.now);
    let serving = env.serving.get(host).copied().unwrap_or(false);
    up && env.listening.get(host).copied().unwrap_or(false) && !serving
}
