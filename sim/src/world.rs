//! The world: one thread, one queue of timed events, virtual time.
//!
//! Everything that happens is an [`Ev`] at a time; events at the same time
//! run in the order they were scheduled, so a seed replays exactly. An event
//! for a process goes to the incarnation it was meant for (one that crashed
//! since never sees it) and waits while the process is paused. After each
//! event the world checks the invariants the event could have broken
//! ([`crate::observer`]); the first violation ends the run.
//!
//! [`Env`] is what every process may use — the queue, the network, the
//! devices, the oracle and observer, the trace; the processes themselves
//! ([`ServerProc`], [`AgentHost`], [`Admin`]) live beside it in [`World`]
//! so a handler borrows its process and the environment at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use uuid::Uuid;
use volume_format::control::auth::Role;
use volume_format::control::messages::ServerMessage;
use volume_format::metadata::{MetadataArea, PoolMetadata};
use volume_format::{DeviceLayout, PublicKey};

use crate::agent::AgentHost;
use crate::app::{Admin, Plan};
use crate::config::Config;
use crate::device::{Content, DevOp, DevResult, Device};
use crate::lease::ServerHost;
use crate::net::{ConnId, Net, Proc, Wire};
use crate::observer::Observer;
use crate::oracle::Oracle;
use crate::rng::Rng;
use crate::server::ServerProc;
use crate::trace::Trace;

/// Wall-clock time at simulated time 0 (a Unix time in ms).
pub const EPOCH_UNIX_MS: u64 = 1_800_000_000_000;
/// Agents' clocks start here after a boot, so no clock is near 0.
pub const CLOCK_BASE_MS: u64 = 1_000_000;
/// How long a connection attempt to a cut-off host takes to fail.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Metadata area of each device: slots × bytes.
pub const METADATA_SLOTS: u32 = 4;
pub const METADATA_AREA_BYTES: u64 = 512 << 10;
/// Events at one simulated instant beyond which the world is livelocked
/// (something reschedules itself without time passing).
pub const LIVELOCK_EVENTS: u64 = 100_000;
/// Data checks of the whole pool run at least this often.
pub const SWEEP_EVERY_MS: u64 = 250;

/// Something that happens at a time.
#[derive(Debug)]
pub enum Ev {
    /// A message reaches its end of `conn`.
    NetDeliver {
        conn: ConnId,
        wire: Wire,
    },
    /// The server side of a handshake completes.
    Accept {
        conn: ConnId,
    },
    /// The client side of a handshake completes.
    Connected {
        conn: ConnId,
    },
    ConnectFailed {
        conn: ConnId,
    },
    /// One end of a broken connection learns of it.
    ConnLost {
        conn: ConnId,
        to_server: bool,
    },
    /// A server reply, after its hop through the session task, enters the
    /// connection.
    SessionOut {
        conn: ConnId,
        msg: ServerMessage,
    },
    /// A device executes a request.
    DeviceDone {
        dev: usize,
        op: u64,
    },
    DeviceRestart {
        dev: usize,
    },
    /// A device request's outcome reaches the process that sent it.
    Notify {
        proc: Proc,
        inc: u64,
        token: u64,
        result: DevResult,
    },
    ServerTick {
        host: usize,
        inc: u64,
        /// The term it is for (two-server world; 0 otherwise).
        term: u64,
        periodic: bool,
    },
    /// Two-server world: a lease task's wait ends, or its round of I/O
    /// runs out of time.
    LeaseTimer {
        host: usize,
        inc: u64,
        seq: u64,
    },
    /// Something for a term's core that came as a message (a refused write).
    ServerDeferred {
        host: usize,
        inc: u64,
        term: u64,
    },
    /// A server closes a session whose term ended (after what was queued).
    ServerClose {
        conn: ConnId,
    },
    ServerBoot {
        host: usize,
        inc: u64,
    },
    AgentWake {
        agent: usize,
        inc: u64,
    },
    /// Something for an agent's core after its hop inside the agent.
    AgentDeliver {
        agent: usize,
        inc: u64,
        delivery: crate::agent::Delivery,
    },
    AppStep {
        agent: usize,
        inc: u64,
    },
    AdminWake {
        inc: u64,
    },
    /// A handover token reaches the target agent's application.
    Token {
        agent: usize,
        volume: String,
        token: Vec<u8>,
    },
    /// The handover target attached: the source may detach.
    HandoverDone {
        agent: usize,
        volume: String,
    },
    /// A connection breaks (a cut outlasted the transport's patience).
    Break {
        conn: ConnId,
    },
    Fault,
    Restart {
        proc: Proc,
    },
    PauseEnd {
        proc: Proc,
    },
    Sweep,
    /// Faults stop; everything down comes back.
    Settle,
}

/// A process's life.
#[derive(Debug, Clone)]
pub struct ProcState {
    pub inc: u64,
    pub up: bool,
    /// Events wait until then.
    pub paused_until: u64,
    /// True time the incarnation started.
    pub boot_ms: u64,
    /// Time the monotonic clock missed (VM pauses).
    pub mono_lag_ms: u64,
    /// Distinguishes runs of an agent (the resume key's agent instance).
    pub instance: [u8; 16],
}

/// A device request's sender and what to check when it executes.
#[derive(Debug, Clone)]
pub struct DevOrigin {
    pub proc: Proc,
    pub inc: u64,
    pub token: u64,
    /// The handle whose I/O this is (fencing check on writes).
    pub handle: Option<u64>,
    /// A workload read of volume block (volume id, block): checked against
    /// the oracle when it executes.
    pub check: Option<(u64, u64)>,
    pub is_write: bool,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub invariant: &'static str,
    pub at_ms: u64,
    pub detail: String,
    /// A defect of today's code that another issue will fix, recognised by
    /// its exact signature ([`crate::observer::KNOWN_DEFECTS`]).
    pub known: Option<&'static str>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invariant `{}` violated at {}.{:03}s: {}",
            self.invariant,
            self.at_ms / 1000,
            self.at_ms % 1000,
            self.detail
        )?;
        if let Some(k) = self.known {
            write!(f, " [known defect: {k}]")?;
        }
        Ok(())
    }
}

/// Counts for the report.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub events: u64,
    pub commits: u64,
    pub writes_acked: u64,
    /// Writes acknowledged before their chunk was preserved.
    pub writes_behind: u64,
    pub reads_checked: u64,
    pub snapshots: u64,
    pub recalls: u64,
    pub resumes: u64,
    pub faults: u64,
    pub server_restarts: u64,
    pub agent_restarts: u64,
    /// Two-server world: terms served (the first, takeovers, handoffs).
    pub terms: u64,
    pub handoffs: u64,
    pub sweeps: u64,
    /// Writes a write-back cache acknowledged once mirrored.
    pub writes_mirrored: u64,
    /// Writes a write-back cache acknowledged once destaged (writing through).
    pub writes_through: u64,
    /// Times a write-back cache started mirroring again with its log's
    /// records (staged at the server first).
    pub mirror_staged_starts: u64,
    /// Replays of a mirror fetched from the server standing by that holds
    /// it (`mirror::fetch`).
    pub mirror_fetches: u64,
    /// Copies of write-intent regions a server ran (`Job::Resync`: a gone
    /// holder's regions before an open, a resumed or closing handle's).
    pub intent_copies: u64,
    /// Closes that asked for the regions where a write failed to be copied
    /// first (`IntentLog::resync_before_close`).
    pub intent_close_resyncs: u64,
}

pub struct Env {
    pub cfg: Config,
    pub now: u64,
    pub rng: Rng,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    seq: u64,
    pub net: Net,
    pub devices: Vec<Device>,
    pub dev_ops: BTreeMap<(usize, u64), DevOrigin>,
    pub procs: BTreeMap<Proc, ProcState>,
    pub oracle: Oracle,
    pub obs: Observer,
    pub plan: Plan,
    pub trace: Trace,
    pub violation: Option<Violation>,
    pub stats: Stats,
    pub pool_uuid: Uuid,
    pub server_key: Arc<SigningKey>,
    pub agent_keys: Vec<[u8; 32]>,
    pub admin_key: [u8; 32],
    /// No more faults or workload (the settle phase).
    pub settling: bool,
    /// The server host currently running (or booting) a server (one-server
    /// world).
    pub server_host: Option<usize>,
    /// Two-server world: whether each host's server accepts connections.
    pub listening: Vec<bool>,
    /// Two-server world: whether each host's server is in an active term
    /// (as it sees itself: a deposed one may not know yet).
    pub serving: Vec<bool>,
    /// Two-server world: each host is cut off from the devices until then.
    pub device_cut: Vec<u64>,
    /// Two-server world: the admin asks for a handoff at its next chance.
    pub handoff_wanted: bool,
    /// Cached volumes whose holder died (or lost its handle) with writes the
    /// devices lack, and the mirror generation that holds them: the devices
    /// are not checked against those writes until the server replayed that
    /// generation or a later one (the record is no longer pending).
    pub cache_orphans: BTreeMap<u64, u64>,
    /// Volumes the admin is to give a cache before the plan has them.
    pub to_cache: Vec<String>,
    /// One-server world: the host the server last ran on.
    pub last_server_host: usize,
    /// (agent, volume, block): blocks live caches hold that the devices may
    /// still lack (the cache answers their reads); not checked on the
    /// devices.
    pub cache_dirty: BTreeSet<(usize, u64, u64)>,
    /// Each server host's cache mirrors: on its disk, they outlive its
    /// server's incarnations ([`crate::mirror`]).
    pub mirrors: Vec<crate::mirror::HostMirrors>,
}

impl Env {
    /// A cache died holding writes of `volume` the devices lack (see
    /// [`Env::cache_orphans`]).
    pub fn cache_orphaned(&mut self, volume: u64) {
        let mirror = self.obs.meta.cache_mirrors.iter().find(|m| m.volume.0 == volume);
        let generation = mirror.map_or(0, |m| m.generation);
        self.trace(
            "world",
            format_args!("volume {volume}: a cache holding writes is gone; mirror generation {generation} holds them"),
        );
        self.cache_orphans.insert(volume, generation);
    }

    pub fn schedule(&mut self, at_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at_ms.max(self.now), self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn pop(&mut self) -> Option<(u64, Ev)> {
        let Reverse((at, seq)) = self.queue.pop()?;
        Some((at, self.events.remove(&seq).expect("every queued event is stored")))
    }

    pub fn trace(&mut self, who: impl std::fmt::Display, what: std::fmt::Arguments<'_>) {
        let who = who.to_string();
        self.trace.line(self.now, &who, what);
    }

    /// Records the first violation; the run stops after this event.
    pub fn fail(&mut self, invariant: &'static str, detail: String) {
        self.fail_known(invariant, detail, None);
    }

    /// Records a violation that matches a known defect's signature.
    pub fn fail_known(&mut self, invariant: &'static str, detail: String, known: Option<&'static str>) {
        if self.violation.is_none() {
            let now = self.now;
            self.trace.line(now, "VIOLATION", format_args!("{invariant}: {detail}"));
            self.violation = Some(Violation { invariant, at_ms: now, detail, known });
        }
    }

    pub fn proc(&self, p: Proc) -> &ProcState {
        &self.procs[&p]
    }

    pub fn alive(&self, p: Proc, inc: u64) -> bool {
        self.procs.get(&p).is_some_and(|s| s.up && s.inc == inc)
    }

    /// An agent's clock: boot time (counts pauses) or monotonic (misses VM
    /// pauses), in its own milliseconds.
    pub fn agent_clock_ms(&self, agent: usize, monotonic: bool) -> u64 {
        let s = &self.procs[&Proc::Agent(agent)];
        let lag = if monotonic { s.mono_lag_ms } else { 0 };
        CLOCK_BASE_MS + self.now - s.boot_ms - lag
    }

    /// Sends `wire` on `conn` (dropped if the connection is broken).
    pub fn send(&mut self, conn: ConnId, wire: Wire) {
        let to_server = matches!(wire, Wire::ToServer(_));
        let delay = self.cfg.net_delay_ms;
        if let Some(at) = self.net.arrival(conn, to_server, self.now, delay, &mut self.rng) {
            self.schedule(at, Ev::NetDeliver { conn, wire });
        }
    }

    /// Breaks `conn`; each end learns of it after a delay (`server_gone` or
    /// `client_gone`: that end is dead and learns nothing).
    pub fn break_conn(&mut self, conn: ConnId, server_gone: bool, client_gone: bool) {
        if !self.net.break_conn(conn) {
            return;
        }
        let (lo, hi) = self.cfg.net_delay_ms;
        if !server_gone {
            let at = self.now + self.rng.range(lo, hi * 2);
            self.schedule(at, Ev::ConnLost { conn, to_server: true });
        }
        if !client_gone {
            let at = self.now + self.rng.range(lo, hi * 2);
            // Mid-handshake, the client's attempt fails instead.
            let connected = self.net.get(conn).is_some_and(|c| c.client_connected);
            let ev = if connected { Ev::ConnLost { conn, to_server: false } } else { Ev::ConnectFailed { conn } };
            self.schedule(at, ev);
        }
    }

    /// Starts a connection attempt from `client` to `host`.
    pub fn connect(&mut self, client: Proc, client_inc: u64, host: usize) -> ConnId {
        let server = Proc::Server(host);
        let server_inc = self.procs.get(&server).map_or(0, |s| s.inc);
        let conn = self.net.open_conn(client, client_inc, host, server_inc);
        let (lo, hi) = self.cfg.net_delay_ms;
        if self.net.cut_until(client, host, self.now).is_some() {
            self.net.break_conn(conn);
            self.schedule(self.now + CONNECT_TIMEOUT_MS, Ev::ConnectFailed { conn });
        } else if !self.procs.get(&server).is_some_and(|s| s.up) || !self.host_listening(host) {
            // Nobody listens: refused at once.
            self.net.break_conn(conn);
            let at = self.now + 2 * self.rng.range(lo, hi);
            self.schedule(at, Ev::ConnectFailed { conn });
        } else {
            let at = self.now + self.rng.range(lo, hi) * 2;
            self.schedule(at, Ev::Accept { conn });
        }
        conn
    }

    /// Whether a server listens on `host`.
    pub fn host_listening(&self, host: usize) -> bool {
        if self.cfg.two_servers() {
            self.listening.get(host).copied().unwrap_or(false)
        } else {
            self.server_host == Some(host)
        }
    }

    /// Sends a request to device `dev`; its outcome comes back as a
    /// [`Ev::Notify`] with `origin.token`.
    pub fn device_submit(&mut self, dev: usize, op: DevOp, origin: DevOrigin) {
        if let Proc::Server(h) = origin.proc {
            let until = self.device_cut.get(h).copied().unwrap_or(0);
            if until > self.now {
                // Cut off: the request never arrives; it fails when the
                // connection gives up (or the cut heals and it notices).
                let at = until.min(self.now + CONNECT_TIMEOUT_MS);
                let (proc, inc, token) = (origin.proc, origin.inc, origin.token);
                let result = DevResult::Failed(format!("device {dev}: no answer (cut off from the devices)"));
                self.schedule(at, Ev::Notify { proc, inc, token, result });
                return;
            }
        }
        let (lo, hi) = self.cfg.device_latency_ms;
        if !self.devices[dev].up {
            let at = self.now + 1;
            let (proc, inc, token) = (origin.proc, origin.inc, origin.token);
            let result = DevResult::Failed(format!("device {dev}: connection refused (the device is down)"));
            self.schedule(at, Ev::Notify { proc, inc, token, result });
            return;
        }
        let id = self.devices[dev].submit(op);
        self.dev_ops.insert((dev, id), origin);
        let (p, stall_ms) = self.cfg.device_stall;
        let stall = if p > 0.0 && self.rng.chance(p) { self.rng.range(1, stall_ms) } else { 0 };
        let at = self.now + self.rng.range(lo, hi) + stall;
        self.schedule(at, Ev::DeviceDone { dev, op: id });
    }

    /// The sim device holding pool device `uuid`.
    pub fn device_by_uuid(&self, uuid: Uuid) -> Option<usize> {
        self.devices.iter().position(|d| d.uuid == uuid)
    }
}

pub struct World {
    pub env: Env,
    /// One-server world: the server.
    pub server: Option<ServerProc>,
    /// Two-server world: each host's server process.
    pub hosts: Vec<Option<ServerHost>>,
    pub agents: Vec<Option<AgentHost>>,
    pub admin: Option<Admin>,
}

/// How a run ended.
pub struct Outcome {
    pub seed: u64,
    pub violation: Option<Violation>,
    pub stats: Stats,
    pub end_ms: u64,
    /// The last lines of the trace.
    pub trace_tail: String,
    /// A hash of the whole trace (two runs of one seed give the same).
    pub trace_hash: u64,
}

impl World {
    pub fn new(cfg: Config, verbose: bool) -> World {
        let mut rng = Rng::new(cfg.seed);
        let pool_uuid = Uuid::from_u64_pair(rng.u64(), rng.u64());
        let mut seed = [0u8; 32];
        rng.fill(&mut seed);
        let server_key = Arc::new(SigningKey::from_bytes(&seed));
        let agent_keys: Vec<[u8; 32]> =
            (0..cfg.agents).map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]).verifying_key().to_bytes()).collect();
        let admin_key = SigningKey::from_bytes(&[0xAD; 32]).verifying_key().to_bytes();

        let mut meta =
            PoolMetadata::new(pool_uuid, "sim", cfg.extent_bytes, PublicKey(server_key.verifying_key().to_bytes()), 0);
        let mut devices = Vec::new();
        for i in 0..cfg.devices {
            let probe = DeviceLayout::plan_with_slots(1 << 30, cfg.extent_bytes, METADATA_AREA_BYTES, METADATA_SLOTS)
                .expect("a valid layout");
            let device_bytes = probe.data.start + cfg.device_extents * cfg.extent_bytes;
            let layout =
                DeviceLayout::plan_with_slots(device_bytes, cfg.extent_bytes, METADATA_AREA_BYTES, METADATA_SLOTS)
                    .expect("a valid layout");
            let uuid = Uuid::from_u64_pair(rng.u64(), rng.u64());
            meta.add_device(uuid, format!("sim://dev{i}"), &layout).expect("a new device");
            if i < 3 {
                meta.devices[i].holds_metadata = true;
            }
            devices.push(Device::new(i, uuid, layout));
        }
        for (i, key) in agent_keys.iter().enumerate() {
            meta.clients.push(volume_format::metadata::ClientRecord {
                public_key: PublicKey(*key),
                name: format!("agent{i}"),
                role: Role::Agent,
            });
        }
        meta.clients.push(volume_format::metadata::ClientRecord {
            public_key: PublicKey(admin_key),
            name: "admin".into(),
            role: Role::Admin,
        });
        let mut plan = Plan::default();
        let mut to_cache = Vec::new();
        for v in 0..cfg.volumes {
            let name = format!("v{v}");
            let legs = if rng.chance(0.3) { 2 } else { 1 };
            let extents = rng.range(cfg.volume_extents.0, cfg.volume_extents.1);
            let id = meta.create_volume(&name, extents * cfg.extent_bytes, 4096, legs, 0).expect("room for volumes");
            if v < 63 && cfg.cache_mask & (1 << v) != 0 {
                // Cached by the admin (`sanvol volume cache`) before the
                // plan gives it to anyone.
                to_cache.push(name);
            } else {
                plan.add_volume(&name, id.0, cfg.agents, &mut rng);
            }
        }
        meta.generation = 1;
        for d in devices.iter_mut().take(3) {
            let area = MetadataArea {
                offset: d.layout.metadata.start,
                slot_bytes: d.layout.slot_bytes(),
                slot_count: d.layout.metadata_slot_count,
            };
            let record = area.encode_slot(pool_uuid, 1, &meta).expect("the first metadata encodes");
            d.format(area.slot_offset(0), &record);
        }

        let mut procs = BTreeMap::new();
        let proc_state = |rng: &mut Rng| {
            let mut instance = [0u8; 16];
            rng.fill(&mut instance);
            ProcState { inc: 1, up: true, paused_until: 0, boot_ms: 0, mono_lag_ms: 0, instance }
        };
        let two = cfg.two_servers();
        for h in 0..cfg.server_hosts {
            let mut s = proc_state(&mut rng);
            s.up = h == 0 || two;
            s.inc = if h == 0 || two { 1 } else { 0 };
            procs.insert(Proc::Server(h), s);
        }
        for a in 0..cfg.agents {
            procs.insert(Proc::Agent(a), proc_state(&mut rng));
        }
        procs.insert(Proc::Admin, proc_state(&mut rng));

        let mut oracle = Oracle::default();
        for v in &meta.volumes {
            oracle.add_volume(v.id.0);
        }
        let obs = Observer::new(Arc::new(meta.clone()));
        let env = Env {
            now: 0,
            rng,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            net: Net::default(),
            devices,
            dev_ops: BTreeMap::new(),
            procs,
            oracle,
            obs,
            plan,
            trace: Trace::new(verbose),
            violation: None,
            stats: Stats::default(),
            pool_uuid,
            server_key,
            agent_keys,
            admin_key,
            settling: false,
            server_host: if two { None } else { Some(0) },
            listening: vec![false; cfg.server_hosts],
            serving: vec![false; cfg.server_hosts],
            device_cut: vec![0; cfg.server_hosts],
            handoff_wanted: false,
            cache_orphans: BTreeMap::new(),
            to_cache,
            last_server_host: 0,
            cache_dirty: BTreeSet::new(),
            mirrors: (0..cfg.server_hosts).map(|_| crate::mirror::HostMirrors::default()).collect(),
            cfg,
        };
        let mut w = World { env, server: None, hosts: Vec::new(), agents: Vec::new(), admin: None };
        if two {
            for h in 0..w.env.cfg.server_hosts {
                let s = ServerHost::start(h, 1, &mut w.env);
                w.hosts.push(Some(s));
            }
        } else {
            w.env.schedule(0, Ev::ServerBoot { host: 0, inc: 1 });
        }
        for a in 0..w.env.cfg.agents {
            let host = AgentHost::start(a, 1, &mut w.env);
            w.agents.push(Some(host));
        }
        w.admin = Some(Admin::start(1, &mut w.env));
        let first_fault = w.next_fault_in();
        w.env.schedule(first_fault, Ev::Fault);
        w.env.schedule(SWEEP_EVERY_MS, Ev::Sweep);
        let settle_at = w.env.cfg.duration_ms;
        w.env.schedule(settle_at, Ev::Settle);
        w
    }

    /// Runs to the end (or the first violation) and checks the settled world.
    pub fn run(mut self) -> Outcome {
        let end_ms = self.env.cfg.duration_ms + self.env.cfg.settle_ms;
        let mut same_instant = 0u64;
        while let Some((at, ev)) = self.env.pop() {
            if at > end_ms {
                break;
            }
            if at == self.env.now {
                same_instant += 1;
                if same_instant > LIVELOCK_EVENTS {
                    let detail = format!("more than {LIVELOCK_EVENTS} events at one instant (last: {ev:?})");
                    self.env.fail("no-livelock", detail);
                    break;
                }
            } else {
                same_instant = 0;
            }
            self.env.now = at;
            crate::trace::set_now(at);
            self.env.stats.events += 1;
            self.dispatch(ev);
            if self.env.violation.is_some() {
                break;
            }
        }
        if self.env.violation.is_none() {
            self.env.now = end_ms;
            crate::trace::set_now(end_ms);
            self.final_checks();
        }
        Outcome {
            seed: self.env.cfg.seed,
            violation: self.env.violation.clone(),
            stats: self.env.stats.clone(),
            end_ms: self.env.now,
            trace_tail: self.env.trace.tail(crate::trace::RING_LINES),
            trace_hash: self.env.trace.hash,
        }
    }

    /// Whether an event for `proc` (incarnation `inc`) runs now: dropped if
    /// that incarnation is gone, put off while the process is paused.
    fn admit(&mut self, proc: Proc, inc: u64, ev: Ev) -> Option<Ev> {
        let s = self.env.procs.get(&proc)?;
        if !s.up || s.inc != inc {
            return None;
        }
        if s.paused_until > self.env.now {
            let at = s.paused_until;
            self.env.schedule(at, ev);
            return None;
        }
        Some(ev)
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::NetDeliver { conn, wire } => {
                let Some(c) = self.env.net.get(conn).cloned() else { return };
                if !c.open {
                    return;
                }
                // Still cut off: the message waits for the link (in order).
                if self.env.net.cut_until(c.client, c.server_host, self.env.now).is_some() {
                    let to_server = matches!(wire, Wire::ToServer(_));
                    let delay = self.env.cfg.net_delay_ms;
                    if let Some(at) = self.env.net.arrival(conn, to_server, self.env.now, delay, &mut self.env.rng) {
                        self.env.schedule(at, Ev::NetDeliver { conn, wire });
                    }
                    return;
                }
                match wire {
                    Wire::ToServer(msg) => {
                        let ev = Ev::NetDeliver { conn, wire: Wire::ToServer(msg) };
                        let Some(Ev::NetDeliver { wire: Wire::ToServer(msg), .. }) =
                            self.admit(Proc::Server(c.server_host), c.server_inc, ev)
                        else {
                            return;
                        };
                        if let Some(Some(h)) = self.hosts.get_mut(c.server_host) {
                            h.on_message(conn, msg, &mut self.env);
                        } else if let Some(s) = self.server.as_mut().filter(|s| s.host == c.server_host) {
                            s.on_message(conn, msg, &mut self.env);
                        }
                    }
                    Wire::ToClient(msg) => {
                        let ev = Ev::NetDeliver { conn, wire: Wire::ToClient(msg) };
                        let Some(Ev::NetDeliver { wire: Wire::ToClient(msg), .. }) =
                            self.admit(c.client, c.client_inc, ev)
                        else {
                            return;
                        };
                        match c.client {
                            Proc::Agent(a) => {
                                if let Some(h) = self.agents[a].as_mut() {
                                    h.on_message(conn, msg, &mut self.env);
                                }
                            }
                            Proc::Admin => {
                                if let Some(adm) = self.admin.as_mut() {
                                    adm.on_message(conn, msg, &mut self.env);
                                }
                            }
                            Proc::Server(_) => {}
                        }
                    }
                }
            }
            Ev::Accept { conn } => {
                let Some(c) = self.env.net.get(conn).cloned() else { return };
                if !c.open {
                    return;
                }
                let Some(Ev::Accept { .. }) =
                    self.admit(Proc::Server(c.server_host), c.server_inc, Ev::Accept { conn })
                else {
                    return;
                };
                let host = self.hosts.get_mut(c.server_host).and_then(|h| h.as_mut());
                if let Some(h) = host {
                    h.on_accept(conn, &mut self.env);
                    let at =
                        self.env.now + self.env.rng.range(self.env.cfg.net_delay_ms.0, self.env.cfg.net_delay_ms.1);
                    self.env.schedule(at, Ev::Connected { conn });
                    return;
                }
                match self.server.as_mut().filter(|s| s.host == c.server_host) {
                    Some(s) => {
                        s.on_accept(conn, &mut self.env);
                        let at =
                            self.env.now + self.env.rng.range(self.env.cfg.net_delay_ms.0, self.env.cfg.net_delay_ms.1);
                        self.env.schedule(at, Ev::Connected { conn });
                    }
                    None => {
                        self.env.net.break_conn(conn);
                        let at = self.env.now + self.env.cfg.net_delay_ms.1;
                        self.env.schedule(at, Ev::ConnectFailed { conn });
                    }
                }
            }
            ev @ (Ev::Connected { .. } | Ev::ConnectFailed { .. } | Ev::ConnLost { to_server: false, .. }) => {
                let conn = match &ev {
                    Ev::Connected { conn } | Ev::ConnectFailed { conn } | Ev::ConnLost { conn, .. } => *conn,
                    _ => unreachable!("matched above"),
                };
                let Some(c) = self.env.net.get(conn).cloned() else { return };
                let Some(ev) = self.admit(c.client, c.client_inc, ev) else { return };
                // 0: connected, 1: the attempt failed, 2: the connection broke.
                let kind = match ev {
                    Ev::Connected { .. } if c.open => 0,
                    // Broken meanwhile: its break reports the failure.
                    Ev::Connected { .. } => return,
                    Ev::ConnectFailed { .. } => 1,
                    _ => 2,
                };
                if kind == 0 {
                    if let Some(c) = self.env.net.get_mut(conn) {
                        c.client_connected = true;
                    }
                }
                match c.client {
                    Proc::Agent(a) => {
                        if let Some(h) = self.agents[a].as_mut() {
                            match kind {
                                0 => h.on_connected(conn, &mut self.env),
                                1 => h.on_connect_failed(conn, &mut self.env),
                                _ => h.on_conn_lost(conn, &mut self.env),
                            }
                        }
                    }
                    Proc::Admin => {
                        if let Some(adm) = self.admin.as_mut() {
                            match kind {
                                0 => adm.on_connected(conn, &mut self.env),
                                1 => adm.on_connect_failed(conn, &mut self.env),
                                _ => adm.on_conn_lost(conn, &mut self.env),
                            }
                        }
                    }
                    Proc::Server(_) => {}
                }
            }
            Ev::ConnLost { conn, to_server: true } => {
                let Some(c) = self.env.net.get(conn).cloned() else { return };
                let ev = Ev::ConnLost { conn, to_server: true };
                if self.admit(Proc::Server(c.server_host), c.server_inc, ev).is_none() {
                    return;
                }
                if let Some(Some(h)) = self.hosts.get_mut(c.server_host) {
                    h.on_conn_lost(conn, &mut self.env);
                } else if let Some(s) = self.server.as_mut().filter(|s| s.host == c.server_host) {
                    s.on_conn_lost(conn, &mut self.env);
                }
            }
            Ev::SessionOut { conn, msg } => {
                let Some(c) = self.env.net.get(conn).cloned() else { return };
                let ev = Ev::SessionOut { conn, msg };
                let Some(Ev::SessionOut { msg, .. }) = self.admit(Proc::Server(c.server_host), c.server_inc, ev) else {
                    return;
                };
                self.env.send(conn, Wire::ToClient(msg));
            }
            Ev::DeviceDone { dev, op } => self.device_done(dev, op),
            Ev::DeviceRestart { dev } => {
                self.env.devices[dev].restart();
                self.env.trace("world", format_args!("device {dev} is back"));
            }
            Ev::Notify { proc, inc, token, result } => {
                let ev = Ev::Notify { proc, inc, token, result };
                let Some(Ev::Notify { result, .. }) = self.admit(proc, inc, ev) else { return };
                match proc {
                    Proc::Server(h) => {
                        if let Some(Some(host)) = self.hosts.get_mut(h) {
                            host.on_device_done(token, result, &mut self.env);
                        } else if let Some(s) = self.server.as_mut().filter(|s| s.host == h) {
                            s.on_device_done(token, result, &mut self.env);
                        }
                    }
                    Proc::Agent(a) => {
                        if let Some(h) = self.agents[a].as_mut() {
                            h.on_device_done(token, result, &mut self.env);
                        }
                    }
                    Proc::Admin => {}
                }
            }
            Ev::ServerTick { host, inc, term, periodic } => {
                if self.admit(Proc::Server(host), inc, Ev::ServerTick { host, inc, term, periodic }).is_none() {
                    return;
                }
                if let Some(Some(h)) = self.hosts.get_mut(host) {
                    h.on_tick(term, periodic, &mut self.env);
                } else if let Some(s) = self.server.as_mut().filter(|s| s.host == host) {
                    s.on_tick(periodic, &mut self.env);
                }
            }
            Ev::LeaseTimer { host, inc, seq } => {
                if self.admit(Proc::Server(host), inc, Ev::LeaseTimer { host, inc, seq }).is_none() {
                    return;
                }
                if let Some(Some(h)) = self.hosts.get_mut(host) {
                    h.on_timer(seq, &mut self.env);
                }
            }
            Ev::ServerDeferred { host, inc, term } => {
                if self.admit(Proc::Server(host), inc, Ev::ServerDeferred { host, inc, term }).is_none() {
                    return;
                }
                if let Some(Some(h)) = self.hosts.get_mut(host) {
                    h.on_deferred(term, &mut self.env);
                }
            }
            Ev::ServerClose { conn } => {
                let Some(c) = self.env.net.get(conn).cloned() else { return };
                if !c.open {
                    return;
                }
                let ev = Ev::ServerClose { conn };
                if self.admit(Proc::Server(c.server_host), c.server_inc, ev).is_none() {
                    return;
                }
                self.env.trace(Proc::Server(c.server_host), format_args!("closes connection {conn} (its term ended)"));
                self.env.break_conn(conn, false, false);
                if let Some(Some(h)) = self.hosts.get_mut(c.server_host) {
                    h.on_conn_lost(conn, &mut self.env);
                }
            }
            Ev::ServerBoot { host, inc } => {
                if self.admit(Proc::Server(host), inc, Ev::ServerBoot { host, inc }).is_none() {
                    return;
                }
                match ServerProc::boot(host, inc, &mut self.env) {
                    Ok(s) => self.server = Some(s),
                    Err(e) => {
                        self.env.trace(Proc::Server(host), format_args!("cannot start: {e}; retrying"));
                        let at = self.env.now + 200;
                        self.env.schedule(at, Ev::ServerBoot { host, inc });
                    }
                }
            }
            Ev::AgentWake { agent, inc } => {
                if self.admit(Proc::Agent(agent), inc, Ev::AgentWake { agent, inc }).is_none() {
                    return;
                }
                if let Some(h) = self.agents[agent].as_mut() {
                    h.on_wake(&mut self.env);
                }
            }
            Ev::AgentDeliver { agent, inc, delivery } => {
                let ev = Ev::AgentDeliver { agent, inc, delivery };
                let Some(Ev::AgentDeliver { delivery, .. }) = self.admit(Proc::Agent(agent), inc, ev) else { return };
                if let Some(h) = self.agents[agent].as_mut() {
                    h.on_delivery(delivery, &mut self.env);
                }
            }
            Ev::AppStep { agent, inc } => {
                if self.admit(Proc::Agent(agent), inc, Ev::AppStep { agent, inc }).is_none() {
                    return;
                }
                if let Some(h) = self.agents[agent].as_mut() {
                    h.on_app_step(&mut self.env);
                }
            }
            Ev::AdminWake { inc } => {
                if self.admit(Proc::Admin, inc, Ev::AdminWake { inc }).is_none() {
                    return;
                }
                if let Some(a) = self.admin.as_mut() {
                    a.on_wake(&mut self.env);
                }
            }
            Ev::Token { agent, volume, token } => {
                let inc = self.env.proc(Proc::Agent(agent)).inc;
                let ev = Ev::Token { agent, volume, token };
                let Some(Ev::Token { volume, token, .. }) = self.admit(Proc::Agent(agent), inc, ev) else { return };
                if let Some(h) = self.agents[agent].as_mut() {
                    h.on_token(volume, token, &mut self.env);
                }
            }
            Ev::HandoverDone { agent, volume } => {
                let inc = self.env.proc(Proc::Agent(agent)).inc;
                let ev = Ev::HandoverDone { agent, volume };
                let Some(Ev::HandoverDone { volume, .. }) = self.admit(Proc::Agent(agent), inc, ev) else { return };
                if let Some(h) = self.agents[agent].as_mut() {
                    h.on_handover_done(volume, &mut self.env);
                }
            }
            Ev::Fault => {
                if !self.env.settling {
                    self.inject_fault();
                    let next = self.next_fault_in();
                    self.env.schedule(next, Ev::Fault);
                }
            }
            Ev::Restart { proc } => self.restart(proc),
            Ev::Break { conn } => {
                if self.env.net.get(conn).is_some_and(|c| c.open) {
                    self.env.trace("fault", format_args!("connection {conn} breaks (cut off too long)"));
                    self.env.break_conn(conn, false, false);
                }
            }
            Ev::PauseEnd { proc } => {
                self.env.trace(proc, format_args!("continues"));
            }
            Ev::Sweep => {
                crate::observer::sweep(&mut self.env);
                let at = self.env.now + SWEEP_EVERY_MS;
                self.env.schedule(at, Ev::Sweep);
            }
            Ev::Settle => self.settle(),
        }
    }

    fn device_done(&mut self, dev: usize, op: u64) {
        let Some(origin) = self.env.dev_ops.remove(&(dev, op)) else { return };
        let Some(result) = self.env.devices[dev].complete(op) else { return };
        if origin.is_write {
            crate::observer::write_landed(&mut self.env, dev, &origin);
        }
        if let (Some((volume, block)), DevResult::Read(blocks)) = (origin.check, &result) {
            let got = blocks.first().cloned().unwrap_or(Content::Zero);
            self.env.stats.reads_checked += 1;
            if let Err(e) = self.env.oracle.check_read(volume, block, &got) {
                let detail = format!("{} read volume {volume} block {block} from device {dev}: {e}", origin.proc);
                self.env.fail("acknowledged-flushed-writes-readable", detail);
            }
        }
        let ev = Ev::Notify { proc: origin.proc, inc: origin.inc, token: origin.token, result };
        let at = self.env.now;
        self.env.schedule(at, ev);
    }

    fn next_fault_in(&mut self) -> u64 {
        let f = &self.env.cfg.faults;
        let total = f.conn_drop
            + f.partition
            + f.server_crash
            + f.server_pause
            + f.agent_crash
            + f.agent_pause
            + f.agent_vm_pause
            + f.device_crash
            + f.server_vm_pause
            + f.server_device_cut
            + f.handoff;
        if total <= 0.0 {
            return u64::MAX / 4;
        }
        let mean_ms = (1000.0 / total) as u64;
        self.env.now + 1 + self.env.rng.range(0, 2 * mean_ms)
    }

    fn inject_fault(&mut self) {
        let f = self.env.cfg.faults.clone();
        let kinds = [
            f.conn_drop,
            f.partition,
            f.server_crash,
            f.server_pause,
            f.agent_crash,
            f.agent_pause,
            f.agent_vm_pause,
            f.device_crash,
            f.server_vm_pause,
            f.server_device_cut,
            f.handoff,
        ];
        let total: f64 = kinds.iter().sum();
        let mut x = (self.env.rng.u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        // Rounding leaves it on the device crash (the last kind before the
        // two-server world's).
        let mut kind = 7;
        for (i, k) in kinds.iter().enumerate() {
            if x < *k {
                kind = i;
                break;
            }
            x -= k;
        }
        self.env.stats.faults += 1;
        let lease = self.env.cfg.lease_ms;
        let durable = self.env.cfg.durable_ms;
        match kind {
            0 => {
                let open = self.env.net.open_conns();
                if let Some(&conn) = self.env.rng.pick(&open) {
                    self.env.trace("fault", format_args!("connection {conn} drops"));
                    self.env.break_conn(conn, false, false);
                }
            }
            1 => {
                let clients: Vec<Proc> =
                    (0..self.env.cfg.agents).map(Proc::Agent).chain(std::iter::once(Proc::Admin)).collect();
                let client = *self.env.rng.pick(&clients).expect("clients");
                let long = self.env.rng.chance(0.5);
                let d = if long { self.env.rng.range(lease / 2, 4 * lease) } else { self.env.rng.range(5, lease / 2) };
                let until = self.env.now + d;
                let hosts = self.env.cfg.server_hosts;
                self.env.trace("fault", format_args!("{client} is cut off from the server hosts for {d} ms"));
                for h in 0..hosts {
                    self.env.net.cut(client, h, until);
                }
                // A cut longer than the transport's patience breaks its connections.
                let conns: Vec<ConnId> =
                    self.env.net.conns.values().filter(|c| c.open && c.client == client).map(|c| c.id).collect();
                for conn in conns {
                    let patience = self.env.rng.range(lease / 2, 2 * lease);
                    if d > patience {
                        self.schedule_break(conn, patience);
                    }
                }
            }
            2 | 3 | 8 if self.env.cfg.two_servers() => {
                let up: Vec<usize> =
                    (0..self.env.cfg.server_hosts).filter(|h| self.env.proc(Proc::Server(*h)).up).collect();
                let Some(&host) = self.env.rng.pick(&up) else { return };
                let t = self.env.cfg.lease_io_timeout_ms;
                match kind {
                    2 => {
                        self.crash_host(host);
                        let back = self.env.rng.range(10, 2 * lease);
                        self.env.schedule(self.env.now + back, Ev::Restart { proc: Proc::Server(host) });
                    }
                    // Paused past its lease now and then (the standby takes over).
                    3 => {
                        let d = self.env.rng.range(10, 2 * lease.max(12 * t));
                        self.pause(Proc::Server(host), d, false);
                    }
                    _ => {
                        let d = self.env.rng.range(10, 2 * lease.max(12 * t));
                        self.pause(Proc::Server(host), d, true);
                    }
                }
            }
            9 => {
                let host = self.env.rng.index(self.env.cfg.server_hosts);
                let t = self.env.cfg.lease_io_timeout_ms;
                let d = self.env.rng.range(t, 12 * t);
                self.env.trace("fault", format_args!("{} is cut off from the devices for {d} ms", Proc::Server(host)));
                let until = self.env.now + d;
                let cut = &mut self.env.device_cut[host];
                *cut = (*cut).max(until);
            }
            10 => {
                self.env.trace("fault", format_args!("the admin will ask for a handoff"));
                self.env.handoff_wanted = true;
            }
            2 => {
                if let Some(host) = self.env.server_host {
                    self.crash_server(host);
                    let back = self.env.rng.range(10, 2 * lease);
                    self.env.schedule(self.env.now + back, Ev::Restart { proc: Proc::Server(host) });
                }
            }
            3 => {
                if let Some(host) = self.env.server_host {
                    let d = self.env.rng.range(10, 2 * lease);
                    self.pause(Proc::Server(host), d, false);
                }
            }
            4 => {
                let a = self.env.rng.index(self.env.cfg.agents);
                if self.env.proc(Proc::Agent(a)).up {
                    self.crash_agent(a);
                    let back = self.env.rng.range(100, 3 * lease);
                    self.env.schedule(self.env.now + back, Ev::Restart { proc: Proc::Agent(a) });
                }
            }
            5 => {
                let a = self.env.rng.index(self.env.cfg.agents);
                let d = self.env.rng.range(10, 2 * lease);
                self.pause(Proc::Agent(a), d, false);
            }
            6 => {
                let a = self.env.rng.index(self.env.cfg.agents);
                let d = self.env.rng.range(lease / 2, 3 * (lease + durable));
                self.pause(Proc::Agent(a), d, true);
            }
            _ => {
                let dev = self.env.rng.index(self.env.cfg.devices);
                if self.env.devices[dev].up {
                    self.crash_device(dev);
                    let back = self.env.rng.range(10, 500);
                    self.env.schedule(self.env.now + back, Ev::DeviceRestart { dev });
                }
            }
        }
    }

    fn schedule_break(&mut self, conn: ConnId, after_ms: u64) {
        let at = self.env.now + after_ms;
        self.env.schedule(at, Ev::Break { conn });
    }

    fn pause(&mut self, proc: Proc, d: u64, vm: bool) {
        let now = self.env.now;
        let Some(s) = self.env.procs.get_mut(&proc) else { return };
        if !s.up || s.paused_until > now {
            return;
        }
        s.paused_until = now + d;
        if vm {
            s.mono_lag_ms += d;
        }
        if matches!(proc, Proc::Server(_)) {
            self.env.obs.server_paused_ms += d;
        }
        let what = if vm { "VM paused (its monotonic clock stops)" } else { "paused" };
        self.env.trace("fault", format_args!("{proc} {what} for {d} ms"));
        self.env.schedule(now + d, Ev::PauseEnd { proc });
    }

    fn crash_server(&mut self, host: usize) {
        self.env.trace("fault", format_args!("{} crashes", Proc::Server(host)));
        if let Some(s) = self.env.procs.get_mut(&Proc::Server(host)) {
            s.up = false;
            s.paused_until = 0;
        }
        self.server = None;
        self.env.server_host = None;
        let conns: Vec<ConnId> =
            self.env.net.conns.values().filter(|c| c.open && c.server_host == host).map(|c| c.id).collect();
        for conn in conns {
            self.env.break_conn(conn, true, false);
        }
        self.env.obs.server_down();
    }

    /// Two-server world: the server process on `host` dies (its lease
    /// requests in flight still land).
    fn crash_host(&mut self, host: usize) {
        self.env.trace("fault", format_args!("{} crashes", Proc::Server(host)));
        if let Some(s) = self.env.procs.get_mut(&Proc::Server(host)) {
            s.up = false;
            s.paused_until = 0;
        }
        let was_active = self.hosts[host].take().is_some_and(|h| h.is_active());
        self.env.listening[host] = false;
        self.env.serving[host] = false;
        let conns: Vec<ConnId> =
            self.env.net.conns.values().filter(|c| c.open && c.server_host == host).map(|c| c.id).collect();
        for conn in conns {
            self.env.break_conn(conn, true, false);
        }
        if was_active {
            self.env.obs.server_down();
        }
    }

    fn crash_agent(&mut self, a: usize) {
        self.env.trace("fault", format_args!("{} crashes", Proc::Agent(a)));
        if let Some(s) = self.env.procs.get_mut(&Proc::Agent(a)) {
            s.up = false;
            s.paused_until = 0;
        }
        let orphans = self.agents[a].as_ref().map(|h| h.cached_volumes_holding_writes()).unwrap_or_default();
        for volume in orphans {
            self.env.cache_orphaned(volume);
        }
        self.env.cache_dirty.retain(|(agent, _, _)| *agent != a);
        self.agents[a] = None;
        let conns: Vec<ConnId> =
            self.env.net.conns.values().filter(|c| c.open && c.client == Proc::Agent(a)).map(|c| c.id).collect();
        for conn in conns {
            self.env.break_conn(conn, false, true);
        }
        crate::app::agent_down(&mut self.env, a);
    }

    fn crash_device(&mut self, dev: usize) {
        let crash = self.env.devices[dev].crash(&mut self.env.rng);
        self.env.trace(
            "fault",
            format_args!(
                "device {dev} loses power ({} requests in flight fail, {} cached writes lost)",
                crash.failed.len(),
                crash.lost_tags.len()
            ),
        );
        if !crash.lost_tags.is_empty() {
            let lost: Vec<String> = crash.lost_tags.iter().map(|t| format!("w{t}")).collect();
            self.env.trace("fault", format_args!("device {dev} lost {}", lost.join(" ")));
        }
        for t in crash.lost_tags {
            self.env.oracle.lost(t, dev);
        }
        for op in crash.failed {
            if let Some(origin) = self.env.dev_ops.remove(&(dev, op)) {
                let result = DevResult::Failed(format!("device {dev} lost power"));
                let at = self.env.now + 1;
                self.env.schedule(at, Ev::Notify { proc: origin.proc, inc: origin.inc, token: origin.token, result });
            }
        }
    }

    fn restart(&mut self, proc: Proc) {
        match proc {
            Proc::Server(host) if self.env.cfg.two_servers() => {
                if self.hosts[host].is_some() {
                    return;
                }
                let mut instance = [0u8; 16];
                self.env.rng.fill(&mut instance);
                let now = self.env.now;
                let s = self.env.procs.get_mut(&Proc::Server(host)).expect("a server host");
                s.inc += 1;
                s.up = true;
                s.paused_until = 0;
                s.boot_ms = now;
                s.mono_lag_ms = 0;
                s.instance = instance;
                let inc = s.inc;
                self.env.stats.server_restarts += 1;
                self.hosts[host] = Some(ServerHost::start(host, inc, &mut self.env));
            }
            Proc::Server(_) => {
                if self.env.server_host.is_some() {
                    return;
                }
                // With write-back caches the server comes back where it ran:
                // its cache mirrors are files on that host's disk (elsewhere
                // it would refuse to open their volumes, rightly, until the
                // operator brought it back there).
                let host = if self.env.cfg.cache_mask != 0 {
                    self.env.last_server_host
                } else {
                    self.env.rng.index(self.env.cfg.server_hosts)
                };
                self.env.last_server_host = host;
                let s = self.env.procs.get_mut(&Proc::Server(host)).expect("a server host");
                s.inc += 1;
                s.up = true;
                s.paused_until = 0;
                s.boot_ms = self.env.now;
                let inc = s.inc;
                self.env.server_host = Some(host);
                self.env.stats.server_restarts += 1;
                self.env.trace("world", format_args!("{} starts", Proc::Server(host)));
                let at = self.env.now + self.env.rng.range(5, 50);
                self.env.schedule(at, Ev::ServerBoot { host, inc });
            }
            Proc::Agent(a) => {
                if self.agents[a].is_some() {
                    return;
                }
                let now = self.env.now;
                let mut instance = [0u8; 16];
                self.env.rng.fill(&mut instance);
                let s = self.env.procs.get_mut(&Proc::Agent(a)).expect("an agent");
                s.inc += 1;
                s.up = true;
                s.paused_until = 0;
                s.boot_ms = now;
                s.mono_lag_ms = 0;
                s.instance = instance;
                let inc = s.inc;
                self.env.stats.agent_restarts += 1;
                self.env.trace("world", format_args!("{} starts (a new instance)", Proc::Agent(a)));
                self.agents[a] = Some(AgentHost::start(a, inc, &mut self.env));
            }
            Proc::Admin => {}
        }
    }

    /// Faults stop; partitions heal; what is down comes back.
    fn settle(&mut self) {
        self.env.settling = true;
        self.env.trace("world", format_args!("settling: no more faults, everything comes back"));
        self.env.net.heal_all();
        for dev in 0..self.env.devices.len() {
            if !self.env.devices[dev].up {
                self.env.schedule(self.env.now + 1, Ev::DeviceRestart { dev });
            }
        }
        if self.env.cfg.two_servers() {
            for h in 0..self.hosts.len() {
                self.env.device_cut[h] = 0;
                if self.hosts[h].is_none() {
                    self.env.schedule(self.env.now + 1, Ev::Restart { proc: Proc::Server(h) });
                }
            }
        } else if self.env.server_host.is_none() {
            self.env.schedule(self.env.now + 1, Ev::Restart { proc: Proc::Server(0) });
        }
        for a in 0..self.agents.len() {
            if self.agents[a].is_none() {
                self.env.schedule(self.env.now + 1, Ev::Restart { proc: Proc::Agent(a) });
            }
        }
        crate::app::settle(&mut self.env);
    }

    /// Once settled: nothing is stuck, and every byte is where it should be.
    fn final_checks(&mut self) {
        crate::observer::sweep(&mut self.env);
        if self.env.violation.is_some() {
            return;
        }
        crate::observer::final_liveness(self);
    }

    /// The server serving the pool now, if any.
    pub fn active_server(&self) -> Option<&ServerProc> {
        self.server.as_ref().or_else(|| self.hosts.iter().flatten().find_map(|h| h.term.as_ref()))
    }
}
