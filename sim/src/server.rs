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
//! - the device task: commits one at a time, the way `Pool::commit` does
//!   them (next generation past every one attempted; into the oldest slot
//!   of every metadata copy; write, flush, read back and decode; one retry;
//!   on a partial failure, the acknowledged metadata written over the copies
//!   that took the new one) — with the real slot encoder and decoder;
//! - jobs: pre-image copies and merges read and write the simulated devices
//!   as `snapshot_io` does (first online leg for reads, every online leg
//!   with FUA for writes);
//! - ticks: every `lease_ms / 4` (as the owner loop) and at the core's next
//!   deadline;
//! - boot: the newest valid slot over every reachable device
//!   ([`MetadataArea::choose_newest`]), as `Pool::open` reads it, then a new
//!   `Core` (handles restored, grace period).
//!
//! What a commit costs in time is the devices' latency; nothing else here
//! takes simulated time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use control_client::handshake::Peer;
use metadata_server::server::core::{Core, CoreConfig, Effect, Entropy, Input, Now, ReplyId, TaskId};
use metadata_server::server::jobs::{Job, JobOutcome};
use volume_format::control::auth::Role;
use volume_format::control::messages::{ClientMessage, ControlError, ErrorCode, Request, ServerMessage};
use volume_format::metadata::{MetadataArea, PoolMetadata, SnapshotRecord};
use volume_format::{SnapshotId, VolumeId};

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
    Commit { task: TaskId, current: Arc<PoolMetadata>, next: Box<PoolMetadata> },
    Check { task: TaskId, index: u32 },
}

/// A commit in progress: the copies are written one after the other.
struct CommitRun {
    task: TaskId,
    current: Arc<PoolMetadata>,
    /// What is being written now (the new metadata, or `current` again when
    /// superseding a partial commit).
    meta: PoolMetadata,
    generation: u64,
    copies: Vec<usize>,
    at: usize,
    step: CopyStep,
    retried: bool,
    written: Vec<usize>,
    failures: Vec<String>,
    superseding: bool,
    /// The outcome reported once superseding is done.
    outcome: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CopyStep {
    Write { slot: u32 },
    Flush { slot: u32 },
    ReadBack { slot: u32 },
}

/// A pre-image copy or merge in progress: one chunk at a time, read then
/// write every leg.
struct JobRun {
    task: TaskId,
    meta: Arc<PoolMetadata>,
    /// (chunk, where to read it, where to write it).
    chunks: VecDeque<(u64, Vec<(usize, u64)>, Vec<(usize, u64)>)>,
    chunk_blocks: u64,
    /// Reading: the legs left to try; writing: the data and legs left.
    state: JobState,
}

enum JobState {
    Reading { legs: Vec<(usize, u64)>, targets: Vec<(usize, u64)> },
    Writing { data: Vec<Content>, targets: Vec<(usize, u64)>, written: usize },
}

enum Purpose {
    Commit,
    Job(TaskId),
}

pub struct ServerProc {
    pub host: usize,
    pub inc: u64,
    pub core: Core,
    boot_ms: u64,
    sessions: BTreeMap<u64, ConnId>,
    conn_sessions: BTreeMap<ConnId, u64>,
    next_session: u64,
    replies: BTreeMap<ReplyId, Asked>,
    next_reply: ReplyId,
    work: VecDeque<DeviceWork>,
    commit: Option<CommitRun>,
    checking: Option<TaskId>,
    generation_attempted: u64,
    /// Valid generation of each slot, per sim device (what the device task knows).
    slot_generations: BTreeMap<usize, Vec<Option<u64>>>,
    jobs: BTreeMap<TaskId, JobRun>,
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

impl ServerProc {
    /// Reads the pool from the devices and starts a core: `Pool::open` then
    /// `Core::new`.
    pub fn boot(host: usize, inc: u64, env: &mut Env) -> Result<ServerProc, String> {
        let me = Proc::Server(host);
        let mut slots = Vec::new();
        let mut slot_generations = BTreeMap::new();
        for dev in 0..env.devices.len() {
            if !env.devices[dev].up {
                continue;
            }
            let area = area_of(env, dev);
            let mut gens = Vec::new();
            for i in 0..area.slot_count {
                let bytes = env.devices[dev].read_bytes(area.slot_offset(i), area.slot_bytes);
                let decoded = area.decode_slot(Some(env.pool_uuid), &bytes);
                gens.push(decoded.as_ref().ok().map(|(g, _)| *g));
                slots.push(decoded);
            }
            slot_generations.insert(dev, gens);
        }
        let newest = MetadataArea::choose_newest(slots).map_err(|e| e.to_string())?;
        let meta = newest.metadata;
        let generation_attempted =
            slot_generations.values().flatten().flatten().copied().max().unwrap_or(meta.generation);
        env.trace(me, format_args!("loaded pool metadata generation {}", meta.generation));
        crate::observer::loaded(env, &meta);
        let core = Core::new(
            meta,
            CoreConfig {
                lease_ms: env.cfg.lease_ms,
                durable_ms: env.cfg.durable_ms,
                grace_ms: env.cfg.grace_ms,
                key: env.server_key.clone(),
                entropy: Box::new(SimEntropy(env.rng.fork())),
            },
        );
        let tick_ms = (env.cfg.lease_ms / 4).max(25);
        let mut s = ServerProc {
            host,
            inc,
            core,
            boot_ms: env.now,
            sessions: BTreeMap::new(),
            conn_sessions: BTreeMap::new(),
            next_session: 1,
            replies: BTreeMap::new(),
            next_reply: 1,
            work: VecDeque::new(),
            commit: None,
            checking: None,
            generation_attempted,
            slot_generations,
            jobs: BTreeMap::new(),
            tokens: BTreeMap::new(),
            next_token: 1,
            tick_ms,
            deadline_tick_at: None,
        };
        // The first input starts the core (restores handles, opens the grace period).
        s.apply(Input::Tick, env);
        env.schedule(env.now + tick_ms, Ev::ServerTick { host, inc, periodic: true });
        Ok(s)
    }

    /// Serving (booted).
    pub fn ready(&self) -> bool {
        true
    }

    fn me(&self) -> Proc {
        Proc::Server(self.host)
    }

    fn now(&self, env: &Env) -> Now {
        Now { mono_ms: env.now - self.boot_ms, unix_ms: EPOCH_UNIX_MS + env.now }
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
        let peer = Peer { key, role, name: name.clone(), claimed_name: name, instance, version: 2 };
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
        let reply = self.next_reply;
        self.next_reply += 1;
        self.replies.insert(reply, Asked { conn, id, request: request.clone() });
        self.apply(Input::Request { session, request, reply }, env);
    }

    pub fn on_tick(&mut self, periodic: bool, env: &mut Env) {
        if periodic {
            env.schedule(env.now + self.tick_ms, Ev::ServerTick { host: self.host, inc: self.inc, periodic: true });
        } else if self.deadline_tick_at.is_some_and(|t| t <= env.now) {
            self.deadline_tick_at = None;
        }
        self.apply(Input::Tick, env);
        crate::observer::after_tick(env, &self.core);
    }

    /// Applies `input` and performs the effects, in order.
    fn apply(&mut self, input: Input, env: &mut Env) {
        let now = self.now(env);
        let effects = self.core.apply(now, input);
        for effect in effects {
            self.perform(effect, env);
        }
        if let Some(deadline) = self.core.next_deadline_ms() {
            let at = env.now + deadline.saturating_sub(self.core.now.mono_ms);
            if self.deadline_tick_at.is_none_or(|t| at < t) {
                self.deadline_tick_at = Some(at);
                env.schedule(at, Ev::ServerTick { host: self.host, inc: self.inc, periodic: false });
            }
        }
    }

    fn send_reply(&mut self, conn: ConnId, id: u64, result: Result<volume_format::control::messages::Response, ControlError>, env: &mut Env) {
        let (lo, hi) = env.cfg.reply_hop_ms;
        let at = env.now + env.rng.range(lo, hi);
        env.schedule(at, Ev::SessionOut { conn, msg: ServerMessage::Reply { id, result } });
    }

    fn perform(&mut self, effect: Effect, env: &mut Env) {
        match effect {
            Effect::Reply { reply, result } => {
                let Some(asked) = self.replies.remove(&reply) else { return };
                env.trace(
                    self.me(),
                    format_args!("-> #{} {}", asked.id, crate::describe_result(&result)),
                );
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
            Effect::Commit { task, current, next } => {
                self.work.push_back(DeviceWork::Commit { task, current, next: Box::new(next) });
                self.next_work(env);
            }
            Effect::Job { task, job } => self.start_job(task, job, env),
            Effect::Published { meta, .. } => {
                env.stats.commits += 1;
                crate::observer::committed(env, &meta);
            }
        }
    }

    // ---- the device task ----

    fn next_work(&mut self, env: &mut Env) {
        if self.commit.is_some() || self.checking.is_some() {
            return;
        }
        let Some(work) = self.work.pop_front() else { return };
        match work {
            DeviceWork::Commit { task, current, next } => self.start_commit(task, current, *next, env),
            DeviceWork::Check { task, index } => {
                // A check reads the label over the device task's connection.
                self.checking = Some(task);
                let uuid = self.core.meta.device(volume_format::DeviceIndex(index)).map(|d| d.device_uuid);
                let dev = uuid.and_then(|u| env.device_by_uuid(u));
                match dev {
                    Some(dev) => self.device_op(dev, DevOp::Read { block: 0, count: 1 }, Purpose::Job(task), env),
                    None => {
                        self.checking = None;
                        self.apply(Input::JobDone { task, outcome: JobOutcome::failed("unknown device") }, env);
                        self.next_work(env);
                    }
                }
            }
        }
    }

    fn device_op(&mut self, dev: usize, op: DevOp, purpose: Purpose, env: &mut Env) {
        let token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(token, purpose);
        let is_write = matches!(op, DevOp::Write { .. });
        let origin = DevOrigin { proc: self.me(), inc: self.inc, token, handle: None, check: None, is_write };
        env.device_submit(dev, op, origin);
    }

    fn start_commit(&mut self, task: TaskId, current: Arc<PoolMetadata>, mut next: PoolMetadata, env: &mut Env) {
        let generation = self.generation_attempted.max(next.generation) + 1;
        self.generation_attempted = generation;
        next.generation = generation;
        if let Err(e) = next.check() {
            let result = Err(format!("commit failed: refusing to write inconsistent metadata: {e}"));
            self.apply(Input::Committed { task, result }, env);
            return self.next_work(env);
        }
        let online: Vec<&volume_format::metadata::DeviceRecord> =
            next.devices.iter().filter(|d| d.state.is_online()).collect();
        let holders: Vec<uuid::Uuid> = online.iter().filter(|d| d.holds_metadata).map(|d| d.device_uuid).collect();
        let uuids = if holders.is_empty() { online.iter().map(|d| d.device_uuid).collect() } else { holders };
        let copies: Vec<usize> = uuids.iter().filter_map(|u| env.device_by_uuid(*u)).collect();
        self.commit = Some(CommitRun {
            task,
            current,
            meta: next,
            generation,
            copies,
            at: 0,
            step: CopyStep::Write { slot: 0 },
            retried: false,
            written: Vec::new(),
            failures: Vec::new(),
            superseding: false,
            outcome: None,
        });
        self.commit_copy(env);
    }

    /// Starts writing the current copy (or finishes the commit).
    fn commit_copy(&mut self, env: &mut Env) {
        let Some(run) = self.commit.as_mut() else { return };
        if run.at >= run.copies.len() {
            return self.commit_done(env);
        }
        let dev = run.copies[run.at];
        let area = area_of(env, dev);
        let record = match area.encode_slot(env.pool_uuid, run.generation, &run.meta) {
            Ok(r) => r,
            Err(e) => {
                run.failures.push(format!("device {dev}: {e}"));
                run.at += 1;
                run.retried = false;
                return self.commit_copy(env);
            }
        };
        let gens = self.slot_generations.entry(dev).or_insert_with(|| vec![None; area.slot_count as usize]);
        if gens.len() != area.slot_count as usize {
            *gens = vec![None; area.slot_count as usize];
        }
        let slot = area.next_slot_to_write(gens);
        gens[slot as usize] = None;
        run.step = CopyStep::Write { slot };
        let op = DevOp::write_bytes(area.slot_offset(slot), &record, false);
        self.device_op(dev, op, Purpose::Commit, env);
    }

    fn commit_step_done(&mut self, result: DevResult, env: &mut Env) {
        let Some(run) = self.commit.as_mut() else { return };
        let dev = run.copies[run.at];
        let area = area_of(env, dev);
        let failed = |why: String| Err(format!("device {dev}: {why}"));
        let outcome: Result<Option<DevOp>, String> = match (run.step, result) {
            (_, DevResult::Failed(e)) => failed(e),
            (CopyStep::Write { slot }, _) => {
                run.step = CopyStep::Flush { slot };
                Ok(Some(DevOp::Flush))
            }
            (CopyStep::Flush { slot }, _) => {
                run.step = CopyStep::ReadBack { slot };
                let blocks = area.slot_bytes / BLOCK_BYTES;
                Ok(Some(DevOp::Read { block: area.slot_offset(slot) / BLOCK_BYTES, count: blocks }))
            }
            (CopyStep::ReadBack { slot }, DevResult::Read(blocks)) => {
                let bytes = blocks_to_bytes(&blocks);
                match area.decode_slot(Some(env.pool_uuid), &bytes) {
                    Ok((g, _)) if g == run.generation => {
                        self.slot_generations.get_mut(&dev).expect("set at write")[slot as usize] = Some(g);
                        Ok(None)
                    }
                    Ok((g, _)) => failed(format!("slot {slot} reads back generation {g}, not {}", run.generation)),
                    Err(e) => failed(format!("slot {slot} does not read back: {e}")),
                }
            }
            (CopyStep::ReadBack { .. }, _) => failed("unexpected answer to a read".into()),
        };
        let run = self.commit.as_mut().expect("still running");
        match outcome {
            Ok(Some(op)) => self.device_op(dev, op, Purpose::Commit, env),
            Ok(None) => {
                run.written.push(dev);
                run.at += 1;
                run.retried = false;
                self.commit_copy(env);
            }
            Err(e) => {
                // `write_generation`: one retry over a new connection.
                if !run.retried && env.devices[dev].up {
                    run.retried = true;
                    self.commit_copy(env);
                } else {
                    run.failures.push(e);
                    run.at += 1;
                    run.retried = false;
                    self.commit_copy(env);
                }
            }
        }
    }

    fn commit_done(&mut self, env: &mut Env) {
        let mut run = self.commit.take().expect("a commit runs");
        if !run.superseding && !run.failures.is_empty() {
            let why = run.failures.join("; ");
            env.trace(self.me(), format_args!("commit of generation {} failed: {why}", run.generation));
            if !run.written.is_empty() {
                // Supersede the copies that took it with the acknowledged metadata.
                let generation = self.generation_attempted + 1;
                self.generation_attempted = generation;
                let mut meta = (*run.current).clone();
                meta.generation = generation;
                let copies = std::mem::take(&mut run.written);
                self.commit = Some(CommitRun {
                    meta,
                    generation,
                    copies,
                    at: 0,
                    step: CopyStep::Write { slot: 0 },
                    retried: false,
                    written: Vec::new(),
                    failures: Vec::new(),
                    superseding: true,
                    outcome: Some(why),
                    ..run
                });
                return self.commit_copy(env);
            }
            run.outcome = Some(why);
        }
        let task = run.task;
        let result = match run.outcome {
            Some(why) => Err(format!("commit failed: {why}")),
            None => Ok(run.meta),
        };
        self.apply(Input::Committed { task, result }, env);
        self.next_work(env);
    }

    pub fn on_device_done(&mut self, token: u64, result: DevResult, env: &mut Env) {
        match self.tokens.remove(&token) {
            Some(Purpose::Commit) => self.commit_step_done(result, env),
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
        };
        let chunks = match chunks {
            Ok(c) => c,
            Err(e) => return self.apply(Input::JobDone { task, outcome: JobOutcome::failed(e) }, env),
        };
        let run = JobRun {
            task,
            meta,
            chunks: chunks.into(),
            chunk_blocks,
            state: JobState::Reading { legs: Vec::new(), targets: Vec::new() },
        };
        self.jobs.insert(task, run);
        self.job_next_chunk(task, env);
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
            (JobState::Reading { targets, .. }, DevResult::Read(data)) => {
                let targets = std::mem::take(targets);
                run.state = JobState::Writing { data, targets, written: 0 };
                self.job_write(task, env);
            }
            (JobState::Writing { .. }, DevResult::Failed(e)) => {
                self.jobs.remove(&task);
                let outcome = JobOutcome::failed(format!("writing a pre-image: {e}"));
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
        let _ = &run.meta;
        self.device_op(dev, op, Purpose::Job(task), env);
    }
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
fn online_legs(env: &Env, meta: &PoolMetadata, legs: &[volume_format::metadata::PhysicalExtent], within: u64) -> Vec<(usize, u64)> {
    legs.iter()
        .filter_map(|leg| {
            let d = meta.device(leg.device).filter(|d| d.state.is_online())?;
            Some((env.device_by_uuid(d.device_uuid)?, leg.offset + within))
        })
        .collect()
}

fn cow_targets(env: &Env, meta: &PoolMetadata, s: &SnapshotRecord, chunk: u64) -> Result<Vec<(usize, u64)>, String> {
    let (extent, offset) =
        s.cow_location(chunk, meta.extent_bytes).ok_or_else(|| format!("chunk {chunk} is beyond snapshot {}", s.name))?;
    let legs = online_legs(env, meta, &extent.legs, offset);
    if legs.is_empty() {
        return Err(format!("snapshot {}: no leg of chunk {chunk}'s area is online", s.name));
    }
    Ok(legs)
}

type ChunkPlan = Vec<(u64, Vec<(usize, u64)>, Vec<(usize, u64)>)>;

fn cow_copy_plan(env: &Env, meta: &PoolMetadata, volume: VolumeId, snapshot: SnapshotId, chunks: &[u64]) -> Result<ChunkPlan, String> {
    let s = meta.snapshot(snapshot).ok_or_else(|| format!("snapshot {snapshot} no longer exists"))?;
    let v = meta.volume(volume).ok_or_else(|| format!("volume {volume} no longer exists"))?;
    chunks
        .iter()
        .map(|&chunk| {
            let (start, _) = s.chunk_range(chunk);
            let extent =
                v.extents.get((start / meta.extent_bytes) as usize).ok_or_else(|| format!("chunk {chunk} is beyond the volume"))?;
            let sources = online_legs(env, meta, &extent.legs, start % meta.extent_bytes);
            Ok((chunk, sources, cow_targets(env, meta, s, chunk)?))
        })
        .collect()
}

fn merge_plan(env: &Env, meta: &PoolMetadata, from: SnapshotId, into: SnapshotId, chunks: &[u64]) -> Result<ChunkPlan, String> {
    let s = meta.snapshot(from).ok_or_else(|| format!("snapshot {from} no longer exists"))?;
    let o = meta.snapshot(into).ok_or_else(|| format!("snapshot {into} no longer exists"))?;
    chunks
        .iter()
        .map(|&chunk| {
            let (extent, offset) =
                s.cow_location(chunk, meta.extent_bytes).ok_or_else(|| format!("chunk {chunk} is beyond snapshot {}", s.name))?;
            Ok((chunk, online_legs(env, meta, &extent.legs, offset), cow_targets(env, meta, o, chunk)?))
        })
        .collect()
}

fn describe_job(job: &Job) -> String {
    match job {
        Job::CowCopy { volume, snapshot, chunks, .. } => {
            format!("copy pre-images of volume {volume} chunks {chunks:?} into snapshot {snapshot}")
        }
        Job::Merge { from, into, chunks, .. } => format!("move {} pre-images from snapshot {from} to {into}", chunks.len()),
        Job::CheckDevice { index, .. } => format!("check device {index}"),
    }
}
