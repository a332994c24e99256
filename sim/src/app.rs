//! The workload: applications on the agents, a cluster manager deciding who
//! holds which volume, and an admin changing the pool.
//!
//! - The **plan** says which agents hold each volume and how: an exclusive
//!   volume one agent at a time, a shared-write volume two or three (each
//!   writes its own stripe of blocks, so no two writers race on a block).
//! - **Applications** attach what the plan gives them and detach what it no
//!   longer does; on an attached volume they write single blocks with fresh
//!   tags, flush, and read back blocks they own (checked when the device
//!   executes the read). A block is never written or read twice at once by
//!   one application.
//! - The **manager** moves an exclusive volume away from an agent that is
//!   down or cut off (failover: the new holder's open waits until the old
//!   handle's lease and durable time ran out), and hands volumes over live
//!   (the holder quiesces, flushes, asks for a token, the target opens with
//!   it, then the old holder detaches).
//! - The **admin** takes and deletes snapshots, grows volumes, creates new
//!   volumes and deletes ones the manager retired.

use std::collections::{BTreeMap, BTreeSet};

use volume_format::control::messages::{ClientMessage, OpenMode, Request, Response, ServerMessage};

use crate::agent::{AgentHost, IoKind, APP_IO_MAX};
use crate::net::{ConnId, Proc, Wire};
use crate::world::{Env, Ev};
use client_agent::core::{AttachSpec, Command, Input, OpenWith, Reply};

#[derive(Debug, Clone)]
pub struct VolPlan {
    pub id: u64,
    pub mode: OpenMode,
    pub holders: Vec<usize>,
    /// A live handover in progress: (from, to).
    pub handover: Option<(usize, usize)>,
    pub retired: bool,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub vols: BTreeMap<String, VolPlan>,
}

impl Plan {
    pub fn add_volume(&mut self, name: &str, id: u64, agents: usize, rng: &mut crate::rng::Rng) {
        let shared = agents >= 2 && rng.chance(0.3);
        let holders = if shared {
            let n = rng.range(2, 3.min(agents as u64)) as usize;
            let mut all: Vec<usize> = (0..agents).collect();
            let mut pick = Vec::new();
            for _ in 0..n {
                pick.push(all.remove(rng.index(all.len())));
            }
            pick.sort();
            pick
        } else {
            vec![rng.index(agents)]
        };
        let mode = if shared { OpenMode::SharedWrite } else { OpenMode::Exclusive };
        self.vols.insert(name.to_string(), VolPlan { id, mode, holders, handover: None, retired: false });
    }

    /// The block stripe of `agent` on a shared volume: block % n == slot.
    fn owns(&self, volume: &str, agent: usize, block: u64) -> bool {
        match self.vols.get(volume) {
            Some(p) if p.mode == OpenMode::SharedWrite => {
                let n = p.holders.len().max(1) as u64;
                p.holders.iter().position(|h| *h == agent).is_some_and(|slot| block % n == slot as u64)
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// What the application asked its agent for.
#[derive(Debug, Clone)]
pub enum AppCall {
    Attach { volume: String },
    Detach { volume: String },
    Handover { volume: String, to: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum VolState {
    Attaching,
    Ready,
    Detaching,
    /// Quiescing for a handover; then asking for the token; then waiting
    /// for the target to attach.
    HandingOver {
        to: usize,
        asked: bool,
    },
}

#[derive(Debug, Clone)]
struct AppVol {
    state: VolState,
    /// Stripe of a shared volume, fixed when attached (the plan's holders
    /// then).
    stripe: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct AppState {
    vols: BTreeMap<String, AppVol>,
    busy: BTreeSet<(String, u64)>,
    /// I/O in flight: id → (volume, block).
    ios: BTreeMap<u64, (String, Option<u64>)>,
    retry_at: BTreeMap<String, u64>,
    flushing: BTreeSet<String>,
    tokens: BTreeMap<String, Vec<u8>>,
}

impl AgentHost {
    pub fn on_app_step(&mut self, env: &mut Env) {
        let next = env.now + env.rng.range(1, 2 * env.cfg.app_step_ms);
        env.schedule(next, Ev::AppStep { agent: self.index, inc: self.inc });
        let me = self.index;
        // Attach what the plan gives us.
        let plan: Vec<(String, VolPlan)> = env.plan.vols.iter().map(|(n, p)| (n.clone(), p.clone())).collect();
        for (name, p) in &plan {
            if p.holders.contains(&me) && !self.app.vols.contains_key(name) {
                if self.app.retry_at.get(name).is_some_and(|t| *t > env.now) || !self.connected() {
                    continue;
                }
                if let Some(token) = self.app.tokens.remove(name) {
                    self.attach(name, OpenWith::Handover(token), env);
                } else {
                    self.attach(name, OpenWith::Mode(p.mode), env);
                }
            }
        }
        // Detach what it no longer does, and move handovers along.
        let mine: Vec<String> = self.app.vols.keys().cloned().collect();
        for name in mine {
            let p = env.plan.vols.get(&name).cloned();
            let in_flight = self.app.ios.values().any(|(v, _)| *v == name) || self.app.flushing.contains(&name);
            let state = self.app.vols[&name].state.clone();
            match state {
                VolState::Ready if self.is_revoked(&name) && !in_flight => {
                    // The handle is gone (its I/O fails): detach, and attach
                    // again if the volume is still ours.
                    env.trace(self.me(), format_args!("app: {name}: the handle was revoked; detaching"));
                    self.detach(&name, env);
                }
                VolState::Ready => {
                    let holder = p.as_ref().is_some_and(|p| p.holders.contains(&me));
                    let handover_to =
                        p.as_ref().and_then(|p| p.handover).filter(|(from, _)| *from == me).map(|(_, to)| to);
                    if let Some(to) = handover_to {
                        self.app.vols.get_mut(&name).expect("present").state =
                            VolState::HandingOver { to, asked: false };
                    } else if !holder && !in_flight {
                        self.detach(&name, env);
                    } else if holder && !env.settling_late() {
                        self.random_io(&name, env);
                    }
                }
                VolState::HandingOver { .. } if p.as_ref().is_none_or(|p| p.handover.is_none()) && !in_flight => {
                    // Called off (settling, the target failed): carry on as the holder.
                    self.app.vols.get_mut(&name).expect("present").state = VolState::Ready;
                }
                VolState::HandingOver { to, asked: false } if !in_flight => {
                    // Quiesced; flush once, then ask for the token.
                    if let Some(att) = self.attachment_of(&name) {
                        self.app.flushing.insert(name.clone());
                        self.app.ios.insert(self.next_io_id(), (name.clone(), None));
                        self.submit(att, IoKind::Flush, env);
                    }
                    self.app.vols.get_mut(&name).expect("present").state = VolState::HandingOver { to, asked: true };
                }
                _ => {}
            }
        }
    }

    fn attach(&mut self, name: &str, open: OpenWith, env: &mut Env) {
        self.app.vols.insert(name.to_string(), AppVol { state: VolState::Attaching, stripe: None });
        let caller = self.new_caller(AppCall::Attach { volume: name.to_string() });
        let command = Command::Attach(AttachSpec {
            volume: name.to_string(),
            open,
            socket: None,
            tcp: None,
            kernel: None,
            locks: Vec::new(),
        });
        self.input(Input::Command { caller, command }, env);
    }

    fn detach(&mut self, name: &str, env: &mut Env) {
        if let Some(v) = self.app.vols.get_mut(name) {
            v.state = VolState::Detaching;
        }
        let caller = self.new_caller(AppCall::Detach { volume: name.to_string() });
        let command = Command::Detach { volume: name.to_string() };
        self.input(Input::Command { caller, command }, env);
    }

    fn random_io(&mut self, name: &str, env: &mut Env) {
        if self.app.ios.len() >= APP_IO_MAX {
            return;
        }
        let Some(att) = self.attachment_of(name) else { return };
        let blocks = self.att(att).map_or(0, |a| a.volume_blocks());
        if blocks == 0 {
            return;
        }
        let roll = env.rng.below(100);
        if roll < 12 {
            if self.app.flushing.insert(name.to_string()) {
                self.app.ios.insert(self.next_io_id(), (name.to_string(), None));
                self.submit(att, IoKind::Flush, env);
            }
            return;
        }
        // Pick a block of ours that nobody of ours is using.
        let stripe = self.app.vols.get(name).and_then(|v| v.stripe);
        let mut block = None;
        for _ in 0..8 {
            let b = env.rng.below(blocks);
            let ours = match stripe {
                Some((n, slot)) => b % n == slot,
                None => env.plan.owns(name, self.index, b),
            };
            if ours && !self.app.busy.contains(&(name.to_string(), b)) {
                block = Some(b);
                break;
            }
        }
        let Some(block) = block else { return };
        let kind = if roll < 70 { IoKind::Write { block, tag: env.oracle.new_tag() } } else { IoKind::Read { block } };
        self.app.busy.insert((name.to_string(), block));
        self.app.ios.insert(self.next_io_id(), (name.to_string(), Some(block)));
        self.submit(att, kind, env);
    }

    /// An I/O the application started has ended.
    pub fn app_io_done(&mut self, id: u64, kind: IoKind, result: Result<(), String>, env: &mut Env) {
        let name = self.app.ios.remove(&id).map(|(n, _)| n);
        match kind {
            IoKind::Write { block, .. } | IoKind::Read { block } => {
                if let Some(n) = &name {
                    self.app.busy.remove(&(n.clone(), block));
                }
            }
            IoKind::Flush => {
                if let Some(n) = &name {
                    self.app.flushing.remove(n);
                    if result.is_ok() {
                        if let Some(VolState::HandingOver { to, asked: true }) =
                            self.app.vols.get(n).map(|v| v.state.clone())
                        {
                            self.ask_token(n, to, env);
                        }
                    }
                }
            }
        }
        if let Err(e) = result {
            if let Some(n) = name {
                if e.contains("revoked") && self.app.vols.get(&n).is_some_and(|v| v.state == VolState::Ready) {
                    // The handle is gone: detach, and attach again if still ours.
                    env.trace(self.me(), format_args!("app: {n}: I/O failed ({e}); detaching"));
                    self.detach(&n, env);
                }
            }
        }
    }

    fn ask_token(&mut self, name: &str, to: usize, env: &mut Env) {
        if self.caches(name) {
            // As production's owner: a cached volume is not handed over.
            env.trace(self.me(), format_args!("app: {name} has a write-back cache: no handover"));
            if let Some(p) = env.plan.vols.get_mut(name) {
                p.handover = None;
            }
            if let Some(v) = self.app.vols.get_mut(name) {
                v.state = VolState::Ready;
            }
            return;
        }
        let caller = self.new_caller(AppCall::Handover { volume: name.to_string(), to });
        let to_key = env.agent_keys[to];
        self.use_server_copies(name);
        self.input(Input::Command { caller, command: Command::Handover { volume: name.to_string(), to_key } }, env);
    }

    pub fn app_reply(&mut self, call: AppCall, reply: Reply, env: &mut Env) {
        match (call, reply) {
            (AppCall::Attach { volume }, Reply::Attached(_)) => {
                let stripe = env.plan.vols.get(&volume).filter(|p| p.mode == OpenMode::SharedWrite).and_then(|p| {
                    let slot = p.holders.iter().position(|h| *h == self.index)?;
                    Some((p.holders.len() as u64, slot as u64))
                });
                if let Some(v) = self.app.vols.get_mut(&volume) {
                    v.state = VolState::Ready;
                    v.stripe = stripe;
                }
                // A handover target: take the volume over; the source detaches.
                let handover = env.plan.vols.get(&volume).and_then(|p| p.handover);
                if let Some((from, to)) = handover.filter(|(_, to)| *to == self.index) {
                    if let Some(p) = env.plan.vols.get_mut(&volume) {
                        p.holders = vec![to];
                        p.handover = None;
                    }
                    let at = env.now + env.rng.range(1, 20);
                    env.schedule(at, Ev::HandoverDone { agent: from, volume });
                }
            }
            (AppCall::Attach { volume }, Reply::Failed(why)) => {
                env.trace(self.me(), format_args!("app: attaching {volume} failed: {why}"));
                self.app.vols.remove(&volume);
                let backoff = env.rng.range(20, env.cfg.lease_ms / 2);
                self.app.retry_at.insert(volume.clone(), env.now + backoff);
                // A handover that failed: the source keeps the volume.
                if let Some(p) = env.plan.vols.get_mut(&volume) {
                    if p.handover.is_some_and(|(_, to)| to == self.index) {
                        p.handover = None;
                    }
                }
            }
            (AppCall::Detach { volume }, _) => {
                self.app.vols.remove(&volume);
            }
            (AppCall::Handover { volume, to }, Reply::Token(token)) => {
                let at = env.now + env.rng.range(1, 30);
                env.schedule(at, Ev::Token { agent: to, volume, token });
            }
            (AppCall::Handover { volume, .. }, _) => {
                if let Some(p) = env.plan.vols.get_mut(&volume) {
                    p.handover = None;
                }
                if let Some(v) = self.app.vols.get_mut(&volume) {
                    v.state = VolState::Ready;
                }
            }
            (AppCall::Attach { .. }, _) => {}
        }
    }

    pub fn on_token(&mut self, volume: String, token: Vec<u8>, env: &mut Env) {
        let still = env.plan.vols.get(&volume).is_some_and(|p| p.handover.is_some_and(|(_, to)| to == self.index));
        if !still || self.app.vols.contains_key(&volume) || !self.connected() {
            if let Some(p) = env.plan.vols.get_mut(&volume) {
                if p.handover.is_some_and(|(_, to)| to == self.index) {
                    p.handover = None;
                }
            }
            return;
        }
        self.attach(&volume, OpenWith::Handover(token), env);
    }

    pub fn on_handover_done(&mut self, volume: String, env: &mut Env) {
        if let Some(v) = self.app.vols.get_mut(&volume) {
            if matches!(v.state, VolState::HandingOver { .. }) {
                v.state = VolState::Ready;
            }
        }
        let holder = env.plan.vols.get(&volume).is_some_and(|p| p.holders.contains(&self.index));
        if !holder && self.app.vols.get(&volume).is_some_and(|v| v.state == VolState::Ready) {
            self.detach(&volume, env);
        }
    }

    /// Whether the application has `volume` attached and usable.
    pub fn app_ready(&self, volume: &str) -> bool {
        self.app.vols.get(volume).is_some_and(|v| v.state == VolState::Ready)
    }
}

impl Env {
    /// Late in the settle phase: no new I/O, so the world can be checked
    /// quiet.
    pub fn settling_late(&self) -> bool {
        self.settling && self.now + 2 * self.cfg.lease_ms >= self.cfg.duration_ms + self.cfg.settle_ms
    }
}

/// Agent `a` crashed: handovers it was part of are off.
pub fn agent_down(env: &mut Env, a: usize) {
    for p in env.plan.vols.values_mut() {
        if p.handover.is_some_and(|(from, to)| from == a || to == a) {
            p.handover = None;
        }
    }
}

/// The manager's rounds: failovers and handovers (not while settling).
pub fn manager(env: &mut Env) {
    if env.settling {
        return;
    }
    let agents = env.cfg.agents;
    let now = env.now;
    let live: Vec<usize> = (0..agents).filter(|a| env.proc(Proc::Agent(*a)).up).collect();
    let names: Vec<String> = env.plan.vols.keys().cloned().collect();
    for name in names {
        let p = env.plan.vols[&name].clone();
        if p.retired || p.mode != OpenMode::Exclusive || p.handover.is_some() {
            continue;
        }
        let holder = p.holders.first().copied();
        let down = holder.is_some_and(|h| !env.proc(Proc::Agent(h)).up);
        let cut = holder
            .is_some_and(|h| (0..env.cfg.server_hosts).any(|s| env.net.cut_until(Proc::Agent(h), s, now).is_some()));
        let others: Vec<usize> = live.iter().copied().filter(|a| Some(*a) != holder).collect();
        if (down || cut) && env.rng.chance(0.3) {
            if let Some(&to) = env.rng.pick(&others) {
                env.trace("manager", format_args!("fails {name} over from agent{} to agent{to}", holder.unwrap_or(0)));
                env.plan.vols.get_mut(&name).expect("present").holders = vec![to];
            }
        } else if !down && !cut && env.rng.chance(0.03) {
            if let (Some(from), Some(&to)) = (holder, env.rng.pick(&others)) {
                env.trace("manager", format_args!("hands {name} over from agent{from} to agent{to}"));
                env.plan.vols.get_mut(&name).expect("present").handover = Some((from, to));
            }
        }
    }
    // Now and then retire a volume (its holders detach; the admin deletes it).
    if env.rng.chance(0.02) {
        let names: Vec<String> = env.plan.vols.iter().filter(|(_, p)| !p.retired).map(|(n, _)| n.clone()).collect();
        if names.len() > 1 {
            let name = env.rng.pick(&names).cloned().expect("non-empty");
            env.trace("manager", format_args!("retires {name}"));
            let p = env.plan.vols.get_mut(&name).expect("present");
            p.retired = true;
            p.holders.clear();
            p.handover = None;
        }
    }
}

/// The settle phase: the plan stops changing.
pub fn settle(env: &mut Env) {
    for p in env.plan.vols.values_mut() {
        p.handover = None;
    }
}

// ---- the admin ----

/// What an operator does about a cache mirror the active server cannot
/// replay (also while the world settles), as the open's refusal tells
/// them. Two-server world: a mirror (with writes the devices may lack) on
/// the server standing by, of a volume nobody holds — that server is made
/// active again (`Handoff`), unless the active one still has a mirror of
/// its own to replay for a volume someone is to open (else the two would
/// take turns forever). (The admin never gives a mirror up: a committed
/// generation always has its file since files are prepared before the
/// commit — seeds 128124716596664 and 123708996430583 needed
/// `MirrorForget` before.)
fn stranded_mirror(env: &mut Env) -> Option<Request> {
    use volume_format::metadata::{CacheMirrorRecord, HandleState};
    if env.cfg.cache_mask == 0 {
        return None;
    }
    let meta = &env.obs.meta;
    // Whether `host`'s server would replay its file for record `m`
    // (`mirror::replayable`: only the named server's file of the
    // generation, or of the next one prepared there and never committed).
    // The file of a committed generation always exists (it is prepared
    // before the commit), so no record is without one: the operator never
    // has to give one up.
    let has = |host: usize, m: &CacheMirrorRecord| {
        let named_here = m.server == format!("mds{host}");
        let file = env.mirrors.get(host).and_then(|h| h.file(m.volume));
        file.is_some_and(|f| metadata_server::mirror::replayable(f.generation, m.generation, named_here))
    };
    // (A volume held has a pending generation: a live mirror.)
    let held = |m: &CacheMirrorRecord| {
        meta.handles.iter().any(|h| h.volume == m.volume && matches!(h.state, HandleState::Active))
    };
    if !env.cfg.two_servers() {
        return None;
    }
    let active = env.obs.terms.last()?.0;
    // (A file at a server standing by is fetched by the active server at
    // the next open: `mirror::fetch`. Stranded only where nobody answers.)
    let elsewhere = |m: &CacheMirrorRecord| {
        !has(active, m) && (0..env.cfg.server_hosts).any(|host| has(host, m) && !crate::server::fetchable(host, env))
    };
    // (A held volume's holder mirrors here afresh once it resumed.)
    meta.cache_mirrors.iter().find(|m| m.pending && elsewhere(m) && !held(m))?;
    let wanted = |m: &CacheMirrorRecord| {
        !held(m) && env.plan.vols.values().any(|p| p.id == m.volume.0 && !p.retired && !p.holders.is_empty())
    };
    if meta.cache_mirrors.iter().any(|m| m.pending && has(active, m) && wanted(m)) {
        return None;
    }
    // While settling, at once: the world must come back within its bound.
    (env.settling || env.rng.chance(0.5)).then_some(Request::Handoff { to: None })
}

pub struct Admin {
    inc: u64,
    conn: Option<ConnId>,
    connecting: bool,
    pending: Option<(u64, Request)>,
    next_id: u64,
    next_name: u64,
    retry_at: u64,
}

impl Admin {
    pub fn start(inc: u64, env: &mut Env) -> Admin {
        let mut a = Admin { inc, conn: None, connecting: false, pending: None, next_id: 1, next_name: 1, retry_at: 0 };
        a.on_wake(env);
        a
    }

    pub fn on_wake(&mut self, env: &mut Env) {
        // While settling, an operator watching for what is left (a
        // stranded mirror) comes back sooner.
        let step = if env.settling && env.cfg.cache_mask != 0 { 100 } else { env.cfg.admin_step_ms };
        let next = env.now + env.rng.range(1, 2 * step);
        env.schedule(next, Ev::AdminWake { inc: self.inc });
        crate::app::manager(env);
        if self.conn.is_none() {
            if !self.connecting && env.now >= self.retry_at {
                let host = env.rng.index(env.cfg.server_hosts);
                self.connecting = true;
                self.conn = None;
                let conn = env.connect(Proc::Admin, self.inc, host);
                self.conn = Some(conn);
                self.connecting = true;
            }
            return;
        }
        if self.connecting || self.pending.is_some() {
            return;
        }
        let request = if env.settling { stranded_mirror(env) } else { self.choose(env) };
        if let Some(request) = request {
            let id = self.next_id;
            self.next_id += 1;
            env.trace(Proc::Admin, format_args!("-> #{id} {}", crate::describe_request(&request)));
            self.pending = Some((id, request.clone()));
            let conn = self.conn.expect("connected");
            env.send(conn, Wire::ToServer(ClientMessage { id, request }));
        }
    }

    fn choose(&mut self, env: &mut Env) -> Option<Request> {
        if std::mem::take(&mut env.handoff_wanted) {
            return Some(Request::Handoff { to: None });
        }
        if let Some(r) = stranded_mirror(env) {
            return Some(r);
        }
        if let Some(name) = env.to_cache.first() {
            let mode = Some(volume_format::metadata::CacheMode::Mirrored);
            let size_bytes = volume_format::metadata::CACHE_BYTES_MIN;
            return Some(Request::VolumeCache { name: name.clone(), size_bytes, mode });
        }
        let meta = env.obs.meta.clone();
        let extent = env.cfg.extent_bytes;
        let n = self.next_name;
        self.next_name += 1;
        // Retired volumes nobody holds any more go first.
        for (name, p) in &env.plan.vols {
            if p.retired
                && !meta
                    .handles
                    .iter()
                    .any(|h| h.volume.0 == p.id && matches!(h.state, volume_format::metadata::HandleState::Active))
            {
                if meta.volume_by_name(name).is_some() && !meta.snapshots.iter().any(|s| s.volume.0 == p.id) {
                    return Some(Request::VolumeDelete { name: name.clone() });
                }
                if let Some(s) = meta.snapshots.iter().find(|s| s.volume.0 == p.id) {
                    return Some(Request::SnapshotDelete { volume: name.clone(), name: s.name.clone() });
                }
            }
        }
        let live: Vec<&volume_format::metadata::VolumeRecord> =
            meta.volumes.iter().filter(|v| env.plan.vols.get(&v.name).is_some_and(|p| !p.retired)).collect();
        let roll = env.rng.below(100);
        if roll < 40 {
            let v = env.rng.pick(&live)?;
            Some(Request::SnapshotCreate { volume: v.name.clone(), name: format!("s{n}") })
        } else if roll < 65 {
            let s = env.rng.pick(&meta.snapshots)?;
            let v = meta.volume(s.volume)?;
            Some(Request::SnapshotDelete { volume: v.name.clone(), name: s.name.clone() })
        } else if roll < 80 {
            let v = env.rng.pick(&live)?;
            if v.extents.len() >= 6 {
                return None;
            }
            Some(Request::VolumeGrow { name: v.name.clone(), size_bytes: v.size_bytes + extent })
        } else if roll < 90 && meta.volumes.len() < 8 {
            let legs = if env.rng.chance(0.3) { 2 } else { 1 };
            Some(Request::VolumeCreate { name: format!("x{n}"), size_bytes: env.rng.range(1, 2) * extent, legs })
        } else {
            None
        }
    }

    pub fn on_connected(&mut self, conn: ConnId, env: &mut Env) {
        if self.conn == Some(conn) {
            self.connecting = false;
            env.trace(Proc::Admin, format_args!("connected (connection {conn})"));
        }
    }

    pub fn on_connect_failed(&mut self, conn: ConnId, env: &mut Env) {
        if self.conn == Some(conn) {
            self.conn = None;
            self.connecting = false;
            self.retry_at = env.now + 100;
        }
    }

    pub fn on_conn_lost(&mut self, conn: ConnId, env: &mut Env) {
        if self.conn == Some(conn) {
            self.conn = None;
            self.connecting = false;
            self.pending = None;
            self.retry_at = env.now + 50;
        }
    }

    pub fn on_message(&mut self, _conn: ConnId, msg: ServerMessage, env: &mut Env) {
        if let ServerMessage::Reply { id, result } = msg {
            if self.pending.as_ref().is_some_and(|(p, _)| *p == id) {
                env.trace(Proc::Admin, format_args!("<- #{id} {}", crate::describe_result(&result)));
                let (_, request) = self.pending.take().expect("checked");
                // A standby (or a server that handed off): the CLI moves on
                // to another address.
                if let Err(e) = &result {
                    if e.code == volume_format::control::messages::ErrorCode::NotActive {
                        env.break_conn(_conn, false, false);
                        self.conn = None;
                        self.connecting = false;
                        self.retry_at = env.now + 20;
                        return;
                    }
                }
                let planned = match (&request, &result) {
                    (Request::VolumeCreate { name, .. }, Ok(Response::Done)) => {
                        if env.cfg.cache_mask & 1 << 63 != 0 && env.rng.chance(0.5) {
                            env.to_cache.push(name.clone());
                            None
                        } else {
                            Some(name.clone())
                        }
                    }
                    // Set (or refused: then the volume goes uncached, or
                    // cached if the refusal came after the commit).
                    (Request::VolumeCache { name, .. }, _) => {
                        env.to_cache.retain(|n| n != name);
                        Some(name.clone())
                    }
                    _ => None,
                };
                if let Some(name) = planned {
                    if let Some(v) = env.obs.meta.volume_by_name(&name) {
                        let id = v.id.0;
                        let agents = env.cfg.agents;
                        let mut rng = env.rng.fork();
                        env.plan.add_volume(&name, id, agents, &mut rng);
                    }
                }
            }
        }
    }
}
