//! The invariants, checked as the world runs. Each check is named (the name
//! is what a violation reports) and documented where it is made:
//!
//! | name | checked when | rule |
//! |---|---|---|
//! | `no-write-after-exclusion` | a device executes a write | no write of a handle lands after a commit excluded that handle (broken, expired, excluded from a recall, closed) |
//! | `excluded-only-after-lease` | a commit excludes a handle | its holder, if still running, no longer believes it may write (its lease, on its own clock, ran out) — unless it closed the handle itself |
//! | `acknowledged-flushed-writes-readable` | a workload read executes; every sweep | a block reads back its newest durable write or something written after it ([`crate::oracle`]) |
//! | `mirror-legs-agree` | every sweep | worlds whose agents keep the write-intent log: the legs of a mirrored volume hold the same block wherever no handle's dirty set in the committed metadata covers its region — unless a device dropped the block's newest write from its cache and nothing was acknowledged since |
//! | `new-space-reads-zeros` | every sweep | every leg of a volume block nothing was ever written to holds zeros (a deleted volume's data never shows in a new or grown one) |
//! | `snapshot-reads-recall-point` | every sweep | a snapshot's block reads back one of the values the block could hold when the snapshot was committed |
//! | `resume-unchanged-only-if-nobody-else` | the server answers a resume | a handle is resumed "unchanged" only if no conflicting open of its volume was committed since it was opened (handovers aside) |
//! | `recall-completes-or-excludes` | every server tick | a recall ends (every holder confirmed or was excluded, and the change committed or failed) within `2 × lease + 1 s` of server time |
//! | `grace-only-resumes` | the server answers | while the grace period lasts, no open, handover or admin change succeeds and no resume is refused as unavailable |
//! | `generations-only-grow` | a commit; a server boot | committed generations strictly grow; a restarted server loads at least the last acknowledged generation, with every acknowledged change |
//! | `no-unasked-availability-change` | the server core emits `HandOff` or `Stop` | one-server world: a server that nobody asked to hand off and that never lost the pool lease keeps serving (that world runs one server at a time and never takes its lease) |
//! | `one-lease-holder-writes` | a device executes a write of a server (not to the lease area) | two-server world: no metadata or pre-image write of a server's term lands after another server's term started (it acquired the lease and loaded the metadata) |
//! | `settled-one-active-server` | the end | two-server world: once settled, one server serves the pool and the other stands by |
//! | `flush-covers-writes-behind` | a workload FLUSH completes | every write its agent acknowledged before the FLUSH was sent, ahead of the snapshot's copy of its chunk (`client_agent::cow_behind`), has landed (checked in the agent shell, [`crate::agent`]) |
//! | `settled-*` | the end | once faults stop: no recall pending at the server, no agent gate stuck recalled, every planned holder attached |
//!
//! Data sweeps read the devices directly through the last committed
//! metadata (the observer's own arithmetic, not the code under test's
//! mapping) after every commit and every [`crate::world::SWEEP_EVERY_MS`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use metadata_server::handles::{modes_conflict, RecallState};
use metadata_server::server::core::Core;
use volume_format::control::messages::{ControlError, ErrorCode, OpenMode, Request, Response};
use volume_format::metadata::{ChunkSource, HandleState, PoolMetadata};

use crate::device::BLOCK_BYTES;
use crate::net::Proc;
use crate::oracle::check_value;
use crate::server::Asked;
use crate::world::{DevOrigin, Env, World};

/// How long a recall may take, beyond twice the lease.
pub const RECALL_SLACK_MS: u64 = 1_000;

/// Defects of today's code that other issues fix, each recognised only by
/// its exact signature (so it never hides anything else). A violation with
/// one of these is reported as known; `tests/known_defects.rs` pins a seed
/// for each and asserts it still reproduces — when the fix lands, that test
/// fails: delete the entry and the test.
///
/// None today. The last one, `no-server-acquires` (seed 13872807266413: the
/// lease copies stayed split between two acquirers' records and no server
/// ever acquired again), is fixed in `volume_format::lease`; its seed is a
/// regression seed. Signatures are plain strings: add one as a `const`
/// here and pass it to `Env::fail_known` where the invariant is checked.
pub const KNOWN_DEFECTS: &[(&str, &str)] = &[];

/// A snapshot's volume, and each checked block with the values it may read.
type SnapshotCheck = (u64, Vec<(u64, Vec<u64>)>);

#[derive(Debug, Clone)]
struct LeaseView {
    agent: usize,
    inc: u64,
    until_clock: u64,
    monotonic: bool,
}

#[derive(Debug, Clone)]
struct OpenRec {
    volume: u64,
    mode: OpenMode,
    at_ms: u64,
    via_handover: bool,
}

pub struct Observer {
    /// The newest committed (acknowledged or loaded) metadata.
    pub meta: Arc<PoolMetadata>,
    /// The newest generation a server acknowledged (adopted after a commit).
    acked_generation: u64,
    acked_meta: Arc<PoolMetadata>,
    /// Handle → when a commit excluded it, and why.
    excluded: BTreeMap<u64, (u64, String)>,
    leases: BTreeMap<u64, LeaseView>,
    closing: BTreeSet<u64>,
    opens: BTreeMap<u64, OpenRec>,
    /// Snapshot id → volume and each checked block's allowed values.
    snapshots: BTreeMap<u64, SnapshotCheck>,
    /// (server host, term, volume) → that term's core time its pending
    /// change was first seen, and the servers' paused time then. Per term:
    /// two terms' cores run at once while a paused server has not yet
    /// learnt it lost the pool lease, each on its own clock.
    recalls: BTreeMap<(usize, u64, u64), (u64, u64)>,
    /// Time the server spent paused (a recall's bound counts running time).
    pub server_paused_ms: u64,
    /// Two-server world: every term that started, in order: (host,
    /// incarnation, term, true ms it started).
    pub terms: Vec<(usize, u64, u64, u64)>,
}

impl Observer {
    pub fn new(meta: Arc<PoolMetadata>) -> Observer {
        Observer {
            acked_generation: meta.generation,
            acked_meta: meta.clone(),
            meta,
            excluded: BTreeMap::new(),
            leases: BTreeMap::new(),
            closing: BTreeSet::new(),
            opens: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            recalls: BTreeMap::new(),
            server_paused_ms: 0,
            terms: Vec::new(),
        }
    }

    /// A server's term started (it holds the lease and loaded the metadata).
    pub fn term_started(&mut self, host: usize, inc: u64, term: u64, at_ms: u64) {
        self.terms.push((host, inc, term, at_ms));
    }

    /// Whether `(host, inc, term)` is the newest term (one-server world:
    /// always).
    pub fn is_current_term(&self, host: usize, inc: u64, term: u64) -> bool {
        self.terms.last().is_none_or(|t| (t.0, t.1, t.2) == (host, inc, term))
    }

    pub fn set_lease(&mut self, handle: u64, agent: usize, inc: u64, until_clock: u64, monotonic: bool) {
        self.leases.insert(handle, LeaseView { agent, inc, until_clock, monotonic });
    }

    pub fn drop_lease(&mut self, handle: u64) {
        self.leases.remove(&handle);
    }

    /// The holder asked to close `handle`: its exclusion is its own doing.
    pub fn closing(&mut self, handle: u64) {
        self.closing.insert(handle);
    }

    pub fn server_down(&mut self) {
        self.recalls.clear();
    }
}

fn active(meta: &PoolMetadata) -> BTreeMap<u64, (u64, OpenMode)> {
    meta.handles
        .iter()
        .filter(|h| matches!(h.state, HandleState::Active))
        .map(|h| (h.id.0, (h.volume.0, h.mode)))
        .collect()
}

/// A device executed a write of `origin` (`no-write-after-exclusion`).
pub fn write_landed(env: &mut Env, dev: usize, origin: &DevOrigin) {
    if let (Proc::Server(host), true) = (origin.proc, env.cfg.two_servers()) {
        return server_write_landed(env, dev, host, origin);
    }
    let Some(handle) = origin.handle else { return };
    if let Some((at, why)) = env.obs.excluded.get(&handle) {
        if *at < env.now {
            let detail = format!(
                "a write of handle {handle} ({}) landed on device {dev} {} ms after the handle was excluded ({why})",
                origin.proc,
                env.now - at
            );
            env.fail("no-write-after-exclusion", detail);
        }
    }
}

/// Two-server world: a server's write landed (`one-lease-holder-writes`).
/// Lease sectors are the lease machine's business (any server writes them);
/// every other write of a server belongs to one of its terms (the token's
/// high bits), and must land before any later term started.
fn server_write_landed(env: &mut Env, dev: usize, host: usize, origin: &DevOrigin) {
    if origin.token >= crate::lease::LEASE_TOKEN_BASE {
        return;
    }
    let term = origin.token >> 40;
    let Some(pos) = env.obs.terms.iter().position(|t| (t.0, t.1, t.2) == (host, origin.inc, term)) else {
        return env.fail(
            "one-lease-holder-writes",
            format!("{} wrote to device {dev} outside any term it held the lease in", origin.proc),
        );
    };
    if let Some(&(h, _, _, started)) = env.obs.terms.get(pos + 1) {
        let detail = format!(
            "a write of {}'s term {term} (started {} ms) landed on device {dev} at {} ms, after {} took the pool lease \
             and started serving at {started} ms",
            origin.proc,
            env.obs.terms[pos].3,
            env.now,
            Proc::Server(h)
        );
        env.fail("one-lease-holder-writes", detail);
    }
}

/// A server adopted newly committed metadata. Two-server world: a server
/// whose term another has superseded may still acknowledge a commit that
/// landed before the other loaded (it was paused in between); that commit
/// is in what the other loaded, so it is not news.
pub fn committed_by(env: &mut Env, meta: &Arc<PoolMetadata>, (host, inc, term): (usize, u64, u64)) {
    if !env.obs.is_current_term(host, inc, term) {
        env.trace("observer", format_args!("a superseded term acknowledged generation {}", meta.generation));
        return;
    }
    committed(env, meta);
}

/// A server adopted newly committed metadata.
pub fn committed(env: &mut Env, meta: &Arc<PoolMetadata>) {
    if meta.generation <= env.obs.acked_generation {
        let detail = format!(
            "generation {} committed after generation {} was acknowledged",
            meta.generation, env.obs.acked_generation
        );
        env.fail("generations-only-grow", detail);
    }
    env.obs.acked_generation = meta.generation;
    env.obs.acked_meta = meta.clone();
    observe(env, meta.clone(), "committed");
}

/// A server loaded `meta` at boot (`generations-only-grow`: nothing
/// acknowledged is lost).
pub fn loaded(env: &mut Env, meta: &PoolMetadata) {
    let acked = env.obs.acked_meta.clone();
    if meta.generation < acked.generation {
        let detail = format!(
            "the server loaded generation {} but generation {} had been acknowledged",
            meta.generation, acked.generation
        );
        return env.fail("generations-only-grow", detail);
    }
    if meta.generation == acked.generation && *meta != *acked {
        let (a, b) = (format!("{acked:#?}"), format!("{meta:#?}"));
        let first = a.lines().zip(b.lines()).enumerate().find(|(_, (x, y))| x != y);
        let at = first.map_or(String::new(), |(n, (x, y))| {
            format!(" (debug form line {n}: acknowledged `{}`, loaded `{}`)", x.trim(), y.trim())
        });
        return env.fail(
            "generations-only-grow",
            format!("generation {} loaded differs from the one acknowledged{at}", meta.generation),
        );
    }
    for s in &acked.snapshots {
        if let Some(l) = meta.snapshot(s.id) {
            if let Some(c) = s.cow.iter().find(|c| !l.cow.contains(*c)) {
                let detail =
                    format!("snapshot {} lost the acknowledged registration of chunk {c} across a restart", s.name);
                return env.fail("generations-only-grow", detail);
            }
        }
    }
    observe(env, Arc::new(meta.clone()), "loaded");
}

/// What changed from the previous committed metadata.
fn observe(env: &mut Env, meta: Arc<PoolMetadata>, how: &str) {
    let before = env.obs.meta.clone();
    let now = env.now;
    let was = active(&before);
    let is = active(&meta);
    // Excluded handles.
    for (id, (volume, _)) in &was {
        if is.contains_key(id) {
            continue;
        }
        let why = match meta.handles.iter().find(|h| h.id.0 == *id).map(|h| &h.state) {
            Some(HandleState::Broken { reason, .. }) => format!("broken: {reason}"),
            _ if env.obs.closing.contains(id) => "closed by its holder".to_string(),
            _ => "released (lease expired, or excluded from a recall)".to_string(),
        };
        env.trace(
            "observer",
            format_args!("handle {id} of volume {volume} excluded in generation {} ({why})", meta.generation),
        );
        env.obs.excluded.insert(*id, (now, why.clone()));
        if env.obs.closing.contains(id) {
            continue;
        }
        if let Some(l) = env.obs.leases.get(id).cloned() {
            if env.alive(Proc::Agent(l.agent), l.inc) {
                let clock = env.agent_clock_ms(l.agent, l.monotonic);
                if l.until_clock > clock {
                    let detail = format!(
                        "handle {id} (agent{}) was excluded ({why}) while the agent's lease runs {} ms more on its clock",
                        l.agent,
                        l.until_clock - clock
                    );
                    env.fail("excluded-only-after-lease", detail);
                }
            }
        }
    }
    // New handles. One that conflicts with another active handle of its
    // volume was opened alongside it (a handover): the only way two
    // conflicting handles coexist (a conflicting open breaks the other).
    for (id, (volume, mode)) in &is {
        if !was.contains_key(id) && !env.obs.opens.contains_key(id) {
            let via_handover = is.iter().any(|(other, (v, m))| other != id && v == volume && modes_conflict(*m, *mode));
            env.obs.opens.insert(*id, OpenRec { volume: *volume, mode: *mode, at_ms: now, via_handover });
        }
    }
    // Volumes.
    for v in &meta.volumes {
        if !env.oracle.has_volume(v.id.0) && before.volume(v.id).is_none() {
            env.oracle.add_volume(v.id.0);
        }
    }
    for v in &before.volumes {
        if meta.volume(v.id).is_none() {
            env.oracle.remove_volume(v.id.0);
            let name = v.name.clone();
            env.plan.vols.remove(&name);
        }
    }
    // Snapshots: freeze what each block may hold at the recall point.
    for s in &meta.snapshots {
        if before.snapshot(s.id).is_none() && !env.obs.snapshots.contains_key(&s.id.0) {
            env.stats.snapshots += 1;
            let blocks = s.size_bytes / BLOCK_BYTES;
            let expect: Vec<(u64, Vec<u64>)> =
                env.oracle.checked_blocks(s.volume.0).into_iter().filter(|(b, _)| *b < blocks).collect();
            env.trace(
                "observer",
                format_args!("snapshot {} of volume {} {how} ({} blocks to check)", s.name, s.volume, expect.len()),
            );
            env.obs.snapshots.insert(s.id.0, (s.volume.0, expect));
        }
    }
    let gone: Vec<u64> = env
        .obs
        .snapshots
        .keys()
        .copied()
        .filter(|id| meta.snapshot(volume_format::SnapshotId(*id)).is_none())
        .collect();
    for id in gone {
        env.obs.snapshots.remove(&id);
    }
    env.obs.meta = meta;
    sweep(env);
}

/// The server answered `asked` with `result`.
pub fn replied(env: &mut Env, core: &Core, asked: &Asked, result: &Result<Response, ControlError>) {
    let in_grace = core.grace.as_ref().is_some_and(|g| g.left_ms(core.now.mono_ms).is_some());
    let change = !metadata_server::server::durable::allowed_in_grace(&asked.request);
    match (&asked.request, result) {
        (Request::Resume { .. }, Ok(Response::Opened(o))) => {
            env.stats.resumes += 1;
            let h = o.handle.0;
            let Some(mine) = env.obs.opens.get(&h).cloned() else { return };
            let intruder = env.obs.opens.iter().find(|(id, r)| {
                **id != h
                    && r.volume == mine.volume
                    && r.at_ms > mine.at_ms
                    && !r.via_handover
                    && modes_conflict(r.mode, mine.mode)
            });
            if let Some((id, r)) = intruder {
                let detail = format!(
                    "handle {h} was resumed unchanged, but handle {id} opened volume {} {} at {} ms, after it",
                    mine.volume, r.mode, r.at_ms
                );
                env.fail("resume-unchanged-only-if-nobody-else", detail);
            }
        }
        (Request::OpenHandover { .. }, Ok(Response::Opened(o))) => {
            if let Some(r) = env.obs.opens.get_mut(&o.handle.0) {
                r.via_handover = true;
            }
        }
        // Refused for the grace period itself (other refusals, such as a
        // session closing meanwhile, are not the grace rule's business).
        (Request::Resume { .. }, Err(e))
            if in_grace && e.code == ErrorCode::Unavailable && e.message.contains("grace period") =>
        {
            env.fail("grace-only-resumes", format!("a resume was refused during the grace period: {}", e.message));
        }
        _ => {}
    }
    if in_grace && change && result.is_ok() {
        let detail = format!("{:?} succeeded during the grace period", crate::describe_request(&asked.request));
        env.fail("grace-only-resumes", detail);
    }
}

/// After every server tick: `recall-completes-or-excludes`. Counted in the
/// server's running time (a paused server decides nothing), and only while
/// some holder has neither confirmed nor been excluded: once the recall is
/// ready, the commit follows (the settled checks see that it does).
pub fn after_tick(env: &mut Env, core: &Core, (host, term): (usize, u64)) {
    let now_ms = core.now.mono_ms;
    let paused = env.obs.server_paused_ms;
    let bound = 2 * env.cfg.lease_ms + env.cfg.device_request_max_ms + RECALL_SLACK_MS;
    let pending: BTreeSet<u64> = core.pending_changes.keys().map(|v| v.0).collect();
    env.obs.recalls.retain(|(h, t, v), _| (*h, *t) != (host, term) || pending.contains(v));
    for v in pending {
        let (started, paused_then) = *env.obs.recalls.entry((host, term, v)).or_insert_with(|| {
            env.stats.recalls += 1;
            (now_ms, paused)
        });
        let age = (now_ms - started).saturating_sub(paused - paused_then);
        let waiting = match core.handles.recall_state(v, now_ms) {
            Some(RecallState::Waiting { handles, .. }) => handles,
            _ => continue,
        };
        if age > bound {
            let holders: Vec<String> = waiting
                .iter()
                .filter_map(|h| core.handles.get(*h))
                .map(|h| {
                    format!(
                        "handle {} of {} (session {}, lease until {} ms)",
                        h.id, h.holder, h.session, h.lease_until_ms
                    )
                })
                .collect();
            let detail = format!(
                "the recall of volume {v} has waited {age} ms of server time (bound {bound} ms); no confirmation or \
                 exclusion yet from [{}]",
                holders.join(", ")
            );
            env.fail("recall-completes-or-excludes", detail);
            return;
        }
    }
}

/// Reads every checked block of every volume and snapshot from the devices
/// and compares it with the oracle.
///
/// Blocks live write-back caches hold are not checked on the devices
/// ([`Env::cache_dirty`]), nor volumes whose cache died holding writes,
/// until the server replayed that mirror ([`Env::cache_orphans`]).
pub fn sweep(env: &mut Env) {
    env.stats.sweeps += 1;
    let meta = env.obs.meta.clone();
    // A generation committed after the holder died is still its: a start
    // with the log's records staged that landed after the crash (seed 2973:
    // `MirrorOpenStaged` answered by no one, its generation holds every
    // record of the dead cache); a new holder starts only once a replay
    // cleared the record.
    env.cache_orphans.retain(|volume, generation| {
        meta.cache_mirrors.iter().any(|m| m.volume.0 == *volume && m.generation >= *generation && m.pending)
    });
    let cached: std::collections::BTreeSet<(u64, u64)> = env.cache_dirty.iter().map(|(_, v, b)| (*v, *b)).collect();
    let eb = meta.extent_bytes;
    let device_of = |env: &Env, index| up_device(env, &meta, index);
    for v in &meta.volumes {
        for block in 0..v.size_bytes / BLOCK_BYTES {
            if !env.oracle.never_written(v.id.0, block) {
                continue;
            }
            let off = block * BLOCK_BYTES;
            let Some(extent) = v.extents.get((off / eb) as usize) else { continue };
            for leg in &extent.legs {
                let Some(dev) = device_of(env, leg.device) else { continue };
                let got = env.devices[dev].peek((leg.offset + off % eb) / BLOCK_BYTES);
                if got != crate::device::Content::Zero {
                    let detail = format!(
                        "volume {} block {block} on device {dev} at byte {} holds {got}, and nothing was ever \
                         written to it: new space must read as zeros",
                        v.name,
                        leg.offset + off % eb
                    );
                    return env.fail("new-space-reads-zeros", detail);
                }
            }
        }
        if env.cache_orphans.contains_key(&v.id.0) {
            continue;
        }
        for (block, allowed) in env.oracle.checked_blocks(v.id.0) {
            if cached.contains(&(v.id.0, block)) {
                continue;
            }
            let off = block * BLOCK_BYTES;
            let Some(extent) = v.extents.get((off / eb) as usize) else { continue };
            for leg in &extent.legs {
                let Some(dev) = device_of(env, leg.device) else { continue };
                let got = env.devices[dev].peek((leg.offset + off % eb) / BLOCK_BYTES);
                if let Err(e) = check_value(&allowed, &got) {
                    let detail = format!(
                        "volume {} block {block} on device {dev}: {e}; {}",
                        v.name,
                        env.oracle.history(v.id.0, block)
                    );
                    return env.fail("acknowledged-flushed-writes-readable", detail);
                }
            }
        }
    }
    if env.cfg.intent_log {
        if let Some((name, detail)) = legs_disagree(env, &meta) {
            return env.fail(name, detail);
        }
    }
    let snapshots: Vec<(u64, SnapshotCheck)> = env.obs.snapshots.iter().map(|(k, v)| (*k, v.clone())).collect();
    for (sid, (_, blocks)) in snapshots {
        let Some(s) = meta.snapshot(volume_format::SnapshotId(sid)) else { continue };
        let Some(volume) = meta.volume(s.volume) else { continue };
        for (block, allowed) in blocks {
            let off = block * BLOCK_BYTES;
            let chunk = off / s.chunk_bytes;
            let legs: Vec<(volume_format::DeviceIndex, u64)> = match meta.snapshot_source(s.id, chunk) {
                Some(ChunkSource::Cow(from)) => {
                    let Some(f) = meta.snapshot(from) else { continue };
                    // The observer's own arithmetic: the COW area is
                    // direct-mapped (chunk c at c × chunk size).
                    let at = chunk * f.chunk_bytes;
                    let Some(extent) = f.cow_extents.get((at / eb) as usize) else { continue };
                    let within = at % eb;
                    extent.legs.iter().map(|l| (l.device, l.offset + within + off % s.chunk_bytes)).collect()
                }
                Some(ChunkSource::Live) => {
                    let Some(extent) = volume.extents.get((off / eb) as usize) else { continue };
                    extent.legs.iter().map(|l| (l.device, l.offset + off % eb)).collect()
                }
                None => continue,
            };
            for (index, at) in legs {
                let Some(dev) = device_of(env, index) else { continue };
                let got = env.devices[dev].peek(at / BLOCK_BYTES);
                if let Err(e) = check_value(&allowed, &got) {
                    let source = match meta.snapshot_source(s.id, chunk) {
                        Some(ChunkSource::Cow(f)) => format!("the COW area of snapshot {f}"),
                        _ => "the live volume (chunk not registered)".to_string(),
                    };
                    let detail = format!(
                        "snapshot {} of volume {} block {block} (chunk {chunk}, read from {source}, device {dev}): {e}; {}",
                        s.name,
                        volume.name,
                        env.oracle.history(volume.id.0, block)
                    );
                    return env.fail("snapshot-reads-recall-point", detail);
                }
            }
        }
    }
}

/// The settled world: nothing stuck.
pub fn final_liveness(w: &mut World) {
    if w.env.cfg.two_servers() {
        let active: Vec<usize> = w.hosts.iter().flatten().filter(|h| h.is_active()).map(|h| h.host).collect();
        if active.len() != 1 {
            let detail = format!("after the world settled, {} servers serve the pool (hosts {active:?})", active.len());
            return w.env.fail("settled-one-active-server", detail);
        }
    }
    if let Some(s) = w.active_server() {
        if let Some((v, _)) = s.core.pending_changes.iter().next() {
            let detail = format!("a change of volume {v} is still pending after the world settled");
            return w.env.fail("settled-recalls-done", detail);
        }
    }
    for (i, a) in w.agents.iter().enumerate() {
        let Some(a) = a else { continue };
        for att in a.atts.values() {
            if let Some(g) = a.recalled(&att.volume) {
                let detail = format!(
                    "agent{i}'s gate of {} is still recalled for generation {g} after the world settled (the server has no recall pending)",
                    att.volume
                );
                return w.env.fail("settled-no-gate-stuck", detail);
            }
        }
    }
    let plan: Vec<(String, Vec<usize>)> =
        w.env.plan.vols.iter().filter(|(_, p)| !p.retired).map(|(n, p)| (n.clone(), p.holders.clone())).collect();
    for (name, holders) in plan {
        for h in holders {
            let ok = w.agents[h].as_ref().is_some_and(|a| a.app_ready(&name) && a.is_open(&name));
            if !ok {
                let detail = format!("agent{h} should hold {name} but has not attached it after the world settled");
                return w.env.fail("settled-holders-attached", detail);
            }
        }
    }
}

/// `mirror-legs-agree`: a block whose legs differ is one a reader rotating
/// between legs would see flip. The write-intent log exists so that this
/// only happens where the committed metadata says so: a region some handle
/// recorded dirty (a live writer's writes in flight, or a gone holder's
/// regions the next open copies first). A volume whose dead cached
/// holder's mirror awaits its replay is checked once replayed (the replay
/// writes every leg; one cut short leaves them different until the next).
fn legs_disagree(env: &Env, meta: &PoolMetadata) -> Option<(&'static str, String)> {
    let eb = meta.extent_bytes;
    let region_bytes = volume_format::metadata::intent_region_bytes(eb);
    for v in &meta.volumes {
        if env.cache_orphans.contains_key(&v.id.0) {
            continue;
        }
        let dirty: BTreeSet<u64> = meta.intents_of(v.id).flat_map(|e| e.regions.iter()).collect();
        for block in env.oracle.written_blocks(v.id.0) {
            let off = block * BLOCK_BYTES;
            let Some(extent) = v.extents.get((off / eb) as usize) else { continue };
            if extent.legs.len() < 2 || dirty.contains(&(off / region_bytes)) {
                continue;
            }
            let mut seen: Vec<(usize, crate::device::Content)> = Vec::new();
            for leg in &extent.legs {
                let Some(dev) = up_device(env, meta, leg.device) else { continue };
                seen.push((dev, env.devices[dev].peek((leg.offset + off % eb) / BLOCK_BYTES)));
            }
            if seen.windows(2).all(|w| w[0].1 == w[1].1) || env.oracle.lost_since_last_ack(v.id.0, block) {
                continue;
            }
            let legs: Vec<String> = seen.iter().map(|(d, c)| format!("device {d}: {c}")).collect();
            let detail = format!(
                "volume {} block {block} (region {}, not recorded dirty): the legs differ ({}); {}",
                v.name,
                off / region_bytes,
                legs.join(", "),
                env.oracle.history(v.id.0, block)
            );
            return Some(("mirror-legs-agree", detail));
        }
    }
    None
}

/// The sim device of pool device `index`, if it is up (a down device is
/// not read by the sweeps).
fn up_device(env: &Env, meta: &PoolMetadata, index: volume_format::DeviceIndex) -> Option<usize> {
    let dev = env.device_by_uuid(meta.device(index)?.device_uuid)?;
    env.devices[dev].up.then_some(dev)
}
