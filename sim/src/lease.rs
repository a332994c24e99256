//! The two-server world: a metadata-server host that runs the **real** pool
//! lease machine (`volume_format::lease::LeaseMachine`) against the lease
//! areas of the simulated metadata devices, stands by while another server
//! holds the lease (answering every request with `NotActive`, named as
//! `server::standby` names the active server), and serves the pool through
//! a [`ServerProc`] term while it holds it.
//!
//! This file replaces what `server::lease_task` and the terms of
//! `server::mod` (`Server::serve`, `active_term`, `standby_when_seen`) do
//! around the machine, step for step:
//! - a *step* is the lease task's `step`: write this server's presence
//!   sector if `T` passed, read the host sectors if active and `2T` passed
//!   (host ids of this world only, not all 15), then the machine's action:
//!   a read of the owner sector of every copy (`reading`, `read_done`, and
//!   the write it may ask for at once), a write, or a wait; each round of
//!   I/O goes to every copy at once and is bounded by `T` (a copy that has
//!   not answered by then counts as failed; its write may still land);
//! - the guard: after every step the commit window is extended to the
//!   machine's `valid_until_ms`; the term's device task checks it before
//!   every metadata write (waiting up to `LEASE_WAIT` for a late renewal);
//! - acquiring: once the machine is owner and may commit, the term starts:
//!   the metadata is loaded from the devices (as `Pool::open_journaled`),
//!   the core is new, standby sessions are closed;
//! - holding: a lost lease becomes `Input::LeaseLost`, a handoff the core
//!   asks for (`Effect::HandOff`) is written between steps
//!   (`LeaseMachine::hand_off`) and answered with `Input::HandedOff`; when
//!   the core stops, the term ends, its sessions close (after the messages
//!   already queued have left), and the server stands by again;
//! - clocks: the lease machine and the core read the process's lease clock
//!   (`CLOCK_BOOTTIME`, `blockio::clock`), which runs through a SIGSTOP and
//!   a VM pause alike (`Config::server_clock`: the monotonic clock, which
//!   stops in a VM pause, for a demonstration).
//!
//! Simplified: a server that has not yet seen another server holding the
//! lease refuses connections (production keeps them in the listen queue);
//! the release at shutdown is not simulated (servers crash, they never shut
//! down).

use std::collections::BTreeSet;

use metadata_server::pool::metadata_holders;
use metadata_server::server::core::Input;
use metadata_server::server::lease_task;
use volume_format::control::messages::{ClientMessage, ControlError, ErrorCode, ServerMessage};
use volume_format::lease::{
    decode_sector, encode_sector, LeaseAction, LeaseMachine, LeasePhase, LeaseRecord, LeaseTiming, ServerRole,
    LEASE_SECTOR_BYTES,
};

use crate::device::{DevOp, DevResult};
use crate::net::{ConnId, Proc};
use crate::server::ServerProc;
use crate::world::{DevOrigin, Env, Ev, EPOCH_UNIX_MS};

/// Device request tokens of the lease task (the term's are below).
pub const LEASE_TOKEN_BASE: u64 = 1 << 62;
/// How long a metadata write waits for a late renewal (`device_task::LEASE_WAIT`).
pub const LEASE_WAIT_MS: u64 = 2_000;

/// The commit window the lease task shares with the device task
/// (`lease_task::LeaseGuard`), on the process's lease clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct Guard {
    pub valid_until_ms: u64,
    pub ended: bool,
}

impl Guard {
    pub fn may_commit(&self, now_ms: u64) -> bool {
        !self.ended && now_ms < self.valid_until_ms
    }
}

/// The process's lease clock: true time since boot (less the VM pauses, on
/// the monotonic clock of [`crate::config::LeaseClock::Monotonic`]).
pub fn mono_ms(env: &Env, host: usize) -> u64 {
    let s = env.proc(Proc::Server(host));
    let lag = if env.cfg.server_clock == crate::config::LeaseClock::Monotonic { s.mono_lag_ms } else { 0 };
    env.now - s.boot_ms - lag
}

#[derive(Debug, Clone)]
enum RoundKind {
    /// This server's host sector.
    Presence,
    /// A host sector (listing the pool's servers).
    Host,
    /// The owner sector (the machine's read).
    ReadOwner,
    /// The owner sector, with this record (the machine's write).
    WriteOwner(LeaseRecord),
    /// The handoff record (answered to the core when done).
    HandOff,
}

/// One round of I/O: the same request to every copy, bounded by `T`.
struct Round {
    kind: RoundKind,
    /// Per copy: the token of its request, and its result once in.
    tokens: Vec<u64>,
    reads: Vec<Option<Result<Option<LeaseRecord>, String>>>,
    writes_ok: Vec<Option<bool>>,
}

pub struct ServerHost {
    pub host: usize,
    pub inc: u64,
    pub host_id: u32,
    machine: LeaseMachine,
    pub guard: Guard,
    /// Sim devices holding the lease copies.
    copies: Vec<usize>,
    round: Option<Round>,
    /// The step in progress still has to run the machine's action.
    action_pending: bool,
    /// Host sectors still to read in this step.
    hosts_to_read: Vec<u32>,
    servers: Vec<LeaseRecord>,
    last_presence_ms: Option<u64>,
    last_servers_read_ms: Option<u64>,
    /// The owner record a standby saw last (named in `NotActive`).
    owner_seen: Option<LeaseRecord>,
    /// Timer events carry this; a stale one is ignored.
    seq: u64,
    wake_at_mono: Option<u64>,
    next_token: u64,
    /// The core asked for a handoff: written between steps.
    handoff_asked: Option<u32>,
    pub term: Option<ServerProc>,
    terms: u64,
    /// Connections of standby sessions (answered `NotActive`).
    standby_conns: BTreeSet<ConnId>,
}

impl ServerHost {
    /// A server process starting on `host`: it wants the lease and stands by.
    pub fn start(host: usize, inc: u64, env: &mut Env) -> ServerHost {
        let host_id = host as u32 + 1;
        let instance = env.proc(Proc::Server(host)).instance;
        let t = env.cfg.lease_io_timeout_ms;
        let me = LeaseRecord {
            pool_uuid: env.pool_uuid,
            host_id,
            instance,
            name: format!("mds{host}"),
            generation: 0,
            counter: 0,
            io_timeout_ms: t as u32,
            since_unix_ms: EPOCH_UNIX_MS + env.now,
            handoff_to: 0,
            addrs: vec![format!("sim://mds{host}")],
            role: ServerRole::Standby,
        };
        let holders = metadata_holders(&env.obs.meta);
        let copies = (0..env.devices.len()).filter(|d| holders.contains(&env.devices[*d].uuid)).collect();
        let mut h = ServerHost {
            host,
            inc,
            host_id,
            machine: LeaseMachine::new(
                me,
                LeaseTiming { io_timeout_ms: t, device_request_max_ms: env.cfg.device_request_max_ms },
            ),
            guard: Guard::default(),
            copies,
            round: None,
            action_pending: false,
            hosts_to_read: Vec::new(),
            servers: Vec::new(),
            last_presence_ms: None,
            last_servers_read_ms: None,
            owner_seen: None,
            seq: 0,
            wake_at_mono: None,
            next_token: LEASE_TOKEN_BASE,
            handoff_asked: None,
            term: None,
            terms: 0,
            standby_conns: BTreeSet::new(),
        };
        env.trace(h.me(), format_args!("starts (host id {host_id}); acquiring the pool lease"));
        h.set_listening(env);
        h.wait_until(h.now(env), env);
        h
    }

    fn me(&self) -> Proc {
        Proc::Server(self.host)
    }

    fn now(&self, env: &Env) -> u64 {
        mono_ms(env, self.host)
    }

    pub fn is_active(&self) -> bool {
        self.term.is_some()
    }

    fn set_listening(&self, env: &mut Env) {
        let seen_other = self.owner_seen.as_ref().is_some_and(|o| o.host_id != self.host_id);
        env.listening[self.host] = self.term.is_some() || seen_other;
        env.serving[self.host] = self.term.is_some();
    }

    // ---- the lease task ----

    /// Starts a step (presence, host sectors, the machine's action).
    fn step(&mut self, env: &mut Env) {
        let now = self.now(env);
        let t = self.machine.timing.io_timeout_ms;
        self.action_pending = true;
        self.hosts_to_read.clear();
        let active = matches!(self.machine.phase, LeasePhase::Owner { .. });
        if active && self.last_servers_read_ms.is_none_or(|p| now >= p + 2 * t) {
            self.last_servers_read_ms = Some(now);
            self.hosts_to_read = (1..=env.cfg.server_hosts as u32).rev().collect();
            self.servers.clear();
        }
        if self.last_presence_ms.is_none_or(|p| now >= p + t) {
            self.last_presence_ms = Some(now);
            let me = lease_task::presence_record(&self.machine);
            return self.start_write(RoundKind::Presence, self.host_id as u64, &me, env);
        }
        self.continue_step(env);
    }

    /// Runs the next part of the step in progress, or ends it.
    fn continue_step(&mut self, env: &mut Env) {
        if let Some(h) = self.hosts_to_read.pop() {
            return self.start_read(RoundKind::Host, h as u64, env);
        }
        if !std::mem::take(&mut self.action_pending) {
            return self.step_done(env);
        }
        let now = self.now(env);
        match self.machine.next(now) {
            LeaseAction::Read => {
                self.machine.reading(now);
                self.start_read(RoundKind::ReadOwner, 0, env)
            }
            LeaseAction::Write(record) => self.start_write(RoundKind::WriteOwner(record.clone()), 0, &record, env),
            LeaseAction::WaitUntil(_) => self.step_done(env),
        }
    }

    /// What follows a step: a handoff the core asked for, the next step at
    /// once, or a wait (`LeaseTask::step`'s `WaitUntil`, ended early by the
    /// presence's period).
    fn schedule_next(&mut self, env: &mut Env) {
        if self.round.is_some() {
            return;
        }
        if self.handoff_asked.is_some() && self.term.is_some() {
            return self.hand_off(env);
        }
        let now = self.now(env);
        let until = match self.machine.next(now) {
            LeaseAction::WaitUntil(t) => {
                let presence = self.last_presence_ms.map_or(now, |p| p + self.machine.timing.io_timeout_ms);
                t.min(presence).max(now + 1)
            }
            _ => now,
        };
        self.wait_until(until, env);
    }

    fn wait_until(&mut self, until_mono: u64, env: &mut Env) {
        self.seq += 1;
        self.wake_at_mono = Some(until_mono);
        let at = env.now + until_mono.saturating_sub(self.now(env));
        env.schedule(at, Ev::LeaseTimer { host: self.host, inc: self.inc, seq: self.seq });
    }

    /// A timer: a wait ended, or a round's time ran out.
    pub fn on_timer(&mut self, seq: u64, env: &mut Env) {
        if seq != self.seq {
            return;
        }
        if self.round.is_some() {
            return self.round_done(env);
        }
        if let Some(at) = self.wake_at_mono {
            let now = self.now(env);
            if now < at {
                // The clock stood still meanwhile (a VM pause): sleep on.
                return self.wait_until(at, env);
            }
            self.wake_at_mono = None;
            self.step(env);
        }
    }

    /// After every step: extend the window; start or end a term.
    fn step_done(&mut self, env: &mut Env) {
        let now = self.now(env);
        if let LeasePhase::Owner { valid_until_ms, .. } = &self.machine.phase {
            self.guard.valid_until_ms = self.guard.valid_until_ms.max(*valid_until_ms);
        }
        match &self.machine.phase {
            LeasePhase::Owner { record, .. } if self.term.is_none() && self.machine.may_commit(now) => {
                let generation = record.generation;
                self.start_term(generation, env);
            }
            LeasePhase::Lost { why } if self.term.is_some() => {
                let why = why.clone();
                self.guard.ended = true;
                env.trace(self.me(), format_args!("lease task: {why}"));
                self.with_term(env, |t, env| t.input(Input::LeaseLost { why }, env));
            }
            // `LeaseTask::acquire`: won and lost before serving — standing
            // by again (seed 268100476750943: it stayed "stopped" for good).
            LeasePhase::Lost { why } => {
                env.trace(self.me(), format_args!("lost the pool lease before serving ({why}); standing by"));
                self.stand_by(env);
            }
            LeasePhase::HandedOff { .. } => self.guard.ended = true,
            LeasePhase::Standby { owner: Some((rec, _)) } if self.owner_seen.as_ref() != Some(rec) => {
                if self.owner_seen.as_ref().is_none_or(|o| !o.same_holding(rec)) {
                    env.trace(
                        self.me(),
                        format_args!(
                            "the pool is served by {} (host id {}, generation {}); standing by",
                            rec.name, rec.host_id, rec.generation
                        ),
                    );
                }
                self.owner_seen = Some(rec.clone());
                self.set_listening(env);
            }
            _ => {}
        }
        if let Some(term) = self.term.as_mut() {
            term.guard_changed(self.guard, env);
        }
        self.after_term(env);
        self.schedule_next(env);
    }

    fn start_read(&mut self, kind: RoundKind, sector: u64, env: &mut Env) {
        let copies = self.copies.clone();
        let mut round = self.new_round(kind);
        for dev in copies {
            let at = env.devices[dev].layout.lease_area().map(|a| a.start + sector * LEASE_SECTOR_BYTES);
            let token = self.submit(dev, at.map(|at| DevOp::Read { block: at / 4096, count: 1 }), env);
            round.tokens.push(token);
            round.reads.push(None);
            round.writes_ok.push(None);
        }
        self.round = Some(round);
        self.arm_round(env);
    }

    fn start_write(&mut self, kind: RoundKind, sector: u64, record: &LeaseRecord, env: &mut Env) {
        let bytes = match encode_sector(record) {
            Ok(b) => b,
            Err(e) => {
                env.fail("sim-model", format!("a lease record does not encode: {e}"));
                return;
            }
        };
        let copies = self.copies.clone();
        let mut round = self.new_round(kind);
        for dev in copies {
            let at = env.devices[dev].layout.lease_area().map(|a| a.start + sector * LEASE_SECTOR_BYTES);
            let token = self.submit(dev, at.map(|at| DevOp::write_bytes(at, &bytes, true)), env);
            round.tokens.push(token);
            round.reads.push(None);
            round.writes_ok.push(None);
        }
        self.round = Some(round);
        self.arm_round(env);
    }

    fn new_round(&mut self, kind: RoundKind) -> Round {
        self.seq += 1;
        Round { kind, tokens: Vec::new(), reads: Vec::new(), writes_ok: Vec::new() }
    }

    fn arm_round(&mut self, env: &mut Env) {
        let seq = self.seq;
        let at = env.now + self.machine.timing.io_timeout_ms;
        env.schedule(at, Ev::LeaseTimer { host: self.host, inc: self.inc, seq });
    }

    fn submit(&mut self, dev: usize, op: Option<DevOp>, env: &mut Env) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        let Some(op) = op else { return token };
        let is_write = matches!(op, DevOp::Write { .. });
        let origin = DevOrigin { proc: self.me(), inc: self.inc, token, handle: None, check: None, is_write };
        env.device_submit(dev, op, origin);
        token
    }

    /// A device answered a lease request (or a request of the term).
    pub fn on_device_done(&mut self, token: u64, result: DevResult, env: &mut Env) {
        if token < LEASE_TOKEN_BASE {
            if self.term.is_none() && crate::mirror::is_token(token) {
                // The host's mirror file I/O goes on without a term.
                return crate::server::mirror_io_without_term(self.host, self.inc, token, env);
            }
            self.with_term(env, |t, env| t.on_device_done(token, result, env));
            return;
        }
        let pool = env.pool_uuid;
        let Some(round) = self.round.as_mut() else { return };
        let Some(i) = round.tokens.iter().position(|t| *t == token) else { return };
        let dev = self.copies[i];
        match result {
            DevResult::Read(blocks) => {
                let bytes = match blocks.first() {
                    Some(crate::device::Content::Raw(b)) => b.to_vec(),
                    Some(crate::device::Content::Zero) | None => vec![0; LEASE_SECTOR_BYTES as usize],
                    Some(other) => {
                        let e = format!("device {dev}: the lease sector holds {other}, not a lease record");
                        round.reads[i] = Some(Err(e));
                        return self.maybe_round_done(env);
                    }
                };
                round.reads[i] = Some(decode_sector(&bytes, pool).map_err(|e| format!("device {dev}: {e}")));
            }
            DevResult::Done => round.writes_ok[i] = Some(true),
            DevResult::Failed(e) => {
                round.reads[i] = Some(Err(format!("device {dev}: {e}")));
                round.writes_ok[i] = Some(false);
            }
        }
        self.maybe_round_done(env);
    }

    fn maybe_round_done(&mut self, env: &mut Env) {
        let Some(round) = &self.round else { return };
        let all = match round.kind {
            RoundKind::Host | RoundKind::ReadOwner => round.reads.iter().all(Option::is_some),
            _ => round.writes_ok.iter().all(Option::is_some),
        };
        if all {
            self.round_done(env);
        }
    }

    /// Every copy answered, or `T` passed.
    fn round_done(&mut self, env: &mut Env) {
        let Some(round) = self.round.take() else { return };
        self.seq += 1;
        let now = self.now(env);
        let t = self.machine.timing.io_timeout_ms;
        let reads: Vec<Result<Option<LeaseRecord>, String>> =
            round.reads.into_iter().map(|r| r.unwrap_or_else(|| Err(format!("lease read took over {t} ms")))).collect();
        let ok = round.writes_ok.iter().filter(|w| **w == Some(true)).count();
        let copies = self.copies.len();
        match round.kind {
            RoundKind::Presence => self.continue_step(env),
            RoundKind::Host => {
                let newest =
                    reads.into_iter().filter_map(|r| r.ok().flatten()).max_by_key(|r| (r.since_unix_ms, r.counter));
                self.servers.extend(newest);
                if self.hosts_to_read.is_empty() {
                    self.servers_read(env);
                }
                self.continue_step(env)
            }
            RoundKind::ReadOwner => {
                if lease_debug() {
                    let summary: Vec<String> = reads
                        .iter()
                        .map(|r| match r {
                            Ok(Some(r)) => {
                                format!("h{} g{} c{} to{}", r.host_id, r.generation, r.counter, r.handoff_to)
                            }
                            Ok(None) => "free".into(),
                            Err(e) => format!("err {e}"),
                        })
                        .collect();
                    env.trace(self.me(), format_args!("owner sectors: {summary:?}"));
                }
                let before = phase_name(&self.machine.phase);
                let action = self.machine.read_done(now, &reads);
                self.trace_phase(before, env);
                match action {
                    LeaseAction::Write(record) => {
                        self.start_write(RoundKind::WriteOwner(record.clone()), 0, &record, env)
                    }
                    _ => self.continue_step(env),
                }
            }
            RoundKind::WriteOwner(record) => {
                let before = phase_name(&self.machine.phase);
                self.machine.write_done(now, &record, ok, copies);
                self.trace_phase(before, env);
                self.continue_step(env)
            }
            RoundKind::HandOff => {
                let result = if ok > copies / 2 {
                    env.trace(self.me(), format_args!("handed the pool lease over"));
                    env.stats.handoffs += 1;
                    Ok(())
                } else {
                    Err(format!("the handoff record reached only {ok} of {copies} lease copies"))
                };
                self.with_term(env, |t, env| t.input(Input::HandedOff { result }, env));
                self.step(env);
            }
        }
    }

    fn trace_phase(&self, before: &'static str, env: &mut Env) {
        let after = phase_name(&self.machine.phase);
        if before != after {
            env.trace(self.me(), format_args!("pool lease: {before} -> {after}"));
        }
    }

    /// The active server's listing of the pool's servers (as the lease
    /// task's `presence`).
    fn servers_read(&mut self, env: &mut Env) {
        let servers = lease_task::active_servers_listing(&self.machine.me, std::mem::take(&mut self.servers));
        let list = servers.iter().map(metadata_server::server::owner::server_info).collect();
        self.with_term(env, |t, env| t.input(Input::Servers { servers: list }, env));
    }

    /// The core asked for a handoff: written between steps.
    fn hand_off(&mut self, env: &mut Env) {
        let Some(to) = self.handoff_asked.take() else { return };
        self.seq += 1;
        self.wake_at_mono = None;
        let Some(record) = self.machine.hand_off(to) else {
            let result = Err("this server does not hold the pool lease".to_string());
            self.with_term(env, |t, env| t.input(Input::HandedOff { result }, env));
            return self.step(env);
        };
        self.guard.ended = true;
        if let Some(term) = self.term.as_mut() {
            term.guard_changed(self.guard, env);
        }
        env.trace(self.me(), format_args!("hands the pool lease to host id {to}"));
        self.start_write(RoundKind::HandOff, 0, &record, env);
    }

    // ---- terms ----

    fn start_term(&mut self, generation: u64, env: &mut Env) {
        self.terms += 1;
        let term = self.terms;
        env.trace(self.me(), format_args!("holds the pool lease (generation {generation}): loading the metadata"));
        for conn in std::mem::take(&mut self.standby_conns) {
            env.break_conn(conn, false, false);
        }
        match ServerProc::boot_term(self.host, self.inc, term, self.guard, env) {
            Ok(s) => {
                env.stats.terms += 1;
                env.obs.term_started(self.host, self.inc, term, env.now);
                self.term = Some(s);
                self.owner_seen = None;
                // `LeaseTask::list_self_active`, read by the owner at its start.
                let servers = lease_task::active_servers_listing(&self.machine.me, self.servers.clone());
                let list = servers.iter().map(metadata_server::server::owner::server_info).collect();
                self.with_term(env, |t, env| t.input(Input::Servers { servers: list }, env));
            }
            Err(e) => {
                // Production: the term fails and the server stands by.
                env.trace(self.me(), format_args!("serving the pool failed: {e}; standing by"));
                self.stand_by(env);
            }
        }
        self.set_listening(env);
    }

    /// Runs `f` on the term, then ends the term if the core stopped.
    fn with_term(&mut self, env: &mut Env, f: impl FnOnce(&mut ServerProc, &mut Env)) {
        if let Some(t) = self.term.as_mut() {
            f(t, env);
        }
        self.after_term(env);
    }

    /// After anything the term did: a handoff it asked for, or its end.
    pub fn after_term(&mut self, env: &mut Env) {
        let Some(t) = self.term.as_mut() else { return };
        if let Some(to) = t.handoff_asked.take() {
            self.handoff_asked = Some(to);
            // A wait ends at once for a command.
            if self.round.is_none() && self.wake_at_mono.is_some() {
                self.hand_off(env);
            }
        }
        let Some(t) = self.term.as_mut() else { return };
        let Some(why) = t.stopped.take() else { return };
        env.trace(self.me(), format_args!("{why}; standing by"));
        let term = self.term.take().expect("checked");
        // Sessions close once what is queued for them has left.
        let (_, hi) = env.cfg.net_delay_ms;
        let (_, hop) = env.cfg.reply_hop_ms;
        let at = env.now + hop + 2 * hi + 1;
        for conn in term.session_conns() {
            self.standby_conns.insert(conn);
            env.schedule(at, Ev::ServerClose { conn });
        }
        env.obs.server_down();
        self.stand_by(env);
    }

    /// `LeaseTask::stand_by`: watch for the lease again with a fresh window.
    fn stand_by(&mut self, env: &mut Env) {
        self.guard = Guard::default();
        let now = self.now(env);
        self.machine.stand_by(now);
        self.last_servers_read_ms = None;
        self.owner_seen = None;
        self.handoff_asked = None;
        self.set_listening(env);
        self.schedule_next(env);
    }

    // ---- sessions ----

    pub fn on_accept(&mut self, conn: ConnId, env: &mut Env) {
        match self.term.as_mut() {
            Some(t) => t.on_accept(conn, env),
            None => {
                env.trace(self.me(), format_args!("standby session (connection {conn})"));
                self.standby_conns.insert(conn);
            }
        }
        self.after_term(env);
    }

    pub fn on_conn_lost(&mut self, conn: ConnId, env: &mut Env) {
        self.standby_conns.remove(&conn);
        self.with_term(env, |t, env| t.on_conn_lost(conn, env));
    }

    pub fn on_message(&mut self, conn: ConnId, msg: ClientMessage, env: &mut Env) {
        if self.standby_conns.contains(&conn) || self.term.is_none() {
            let owner = self.owner_seen.as_ref().filter(|o| o.host_id != self.host_id);
            let me = format!("mds{}, host id {}", self.host, self.host_id);
            let text = metadata_server::server::standby::not_active_message(owner, &me);
            env.trace(self.me(), format_args!("<- #{} {}: not active", msg.id, crate::describe_request(&msg.request)));
            let (lo, hi) = env.cfg.reply_hop_ms;
            let at = env.now + env.rng.range(lo, hi);
            let result = Err(ControlError::new(ErrorCode::NotActive, text));
            env.schedule(at, Ev::SessionOut { conn, msg: ServerMessage::Reply { id: msg.id, result } });
            return;
        }
        self.with_term(env, |t, env| t.on_message(conn, msg, env));
    }

    pub fn on_deferred(&mut self, term: u64, env: &mut Env) {
        if self.term.as_ref().is_some_and(|t| t.term == term) {
            self.with_term(env, |t, env| t.on_deferred(env));
        }
    }

    pub fn on_tick(&mut self, term: u64, periodic: bool, env: &mut Env) {
        if self.term.as_ref().is_some_and(|t| t.term == term) {
            self.with_term(env, |t, env| t.on_tick(periodic, env));
        }
    }
}

/// `SIM_LEASE_DEBUG`: trace every owner-sector read (read once).
fn lease_debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SIM_LEASE_DEBUG").is_some())
}

fn phase_name(p: &LeasePhase) -> &'static str {
    match p {
        LeasePhase::Standby { .. } => "standing by",
        LeasePhase::Acquiring { .. } => "acquiring",
        LeasePhase::Owner { .. } => "owner",
        LeasePhase::HandedOff { .. } => "handed off",
        LeasePhase::Lost { .. } => "lost",
    }
}
