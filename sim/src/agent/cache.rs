//! The write-back cache of an exclusive holder (issue 15), reduced to the
//! rules that make it safe — what `client_agent::cache` does, one record per
//! write:
//!
//! - **Which volumes**: every exclusive attach asks the server to start
//!   mirroring (`MirrorOpen`, the probe); the answer carries the volume's
//!   cache setting. I/O waits for the answer. A failed probe leaves the
//!   volume uncached until the next probe, sent only when no I/O is in
//!   flight (so no uncached write is still on its way when caching starts).
//! - **Mirrored**: a write is logged (in memory: a crash loses the log, as
//!   a host that is gone does), sent to the mirror (`MirrorAppend`), and
//!   acknowledged once the mirror answered — then it is durable
//!   ([`crate::oracle::Oracle::durable`]): no FLUSH needed, and it must
//!   survive this agent's death (the server replays the mirror before the
//!   volume is opened again). Reads of a block the log holds return the
//!   newest logged write.
//! - **Destage**: rounds of the oldest records, each block written once
//!   with its newest logged data (every leg, under the lease like any
//!   write), then the devices flushed, then the records released at the
//!   mirror (`MirrorRelease`), and only then dropped from the log.
//! - **Mirror failure** (an error, a lost connection, a timeout): the cache
//!   writes through: writes are still logged, and acknowledged once a round
//!   destaged them. The failed mirror may still hold records (its server
//!   replays them if this agent dies), so a write-through write to a block
//!   an older one of them covers ("stale") is acknowledged only once
//!   mirroring started afresh, which empties it. Mirroring starts again every
//!   [`MIRROR_RETRY_MS`] until it answers: with an empty log afresh
//!   (`MirrorOpen`); otherwise (protocol 15, production's
//!   `restart_with_records`) **with the log's records**: every record in the
//!   log is staged at the server (`MirrorStage`, a few per request, attempt
//!   `copy`), then the mirror is started holding them (`MirrorOpenStaged`).
//!   Destage rounds go on meanwhile, but no release: a round done while
//!   staging keeps its records (production's release waits for the staging
//!   to end), so the new mirror holds exactly records still in the log.
//!   Writes logged while staging are not in the copy: written through,
//!   each is acknowledged once destaged and released — at the new mirror
//!   first when it started. The staged records are stale from the start of
//!   the attempt: one that fails may still have left its copy as the
//!   mirror's file (committed, the answer lost; or prepared by a server
//!   that died before the commit, whose replay takes the prepared file).
//! - **Recall points and detach** wait for an empty log and no release in
//!   flight: a snapshot holds every acknowledged write, and a clean close
//!   leaves the mirror nothing the devices lack.
//! - **Revoked**: the log is dropped, nothing more is destaged (the lease is
//!   gone); what the mirror holds is the server's to replay.
//! - A cached volume is not handed over (the agent refuses, as production's
//!   owner does).

use super::*;
use crate::mirror::encode_tag;
use volume_format::control::messages::MirrorRecord;
use volume_format::metadata::CacheMode;

/// How long a mirror request waits for its answer (production's
/// `MIRROR_REQUEST_TIMEOUT` is of the same order: well under the lease).
pub const CACHE_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Between two attempts to start mirroring again.
pub const MIRROR_RETRY_MS: u64 = 500;
/// Records per `MirrorStage` request (small, for more interleavings).
const STAGE_RECORDS: usize = 3;
/// Records per destage round (small, for more interleavings), and while
/// the volume is recalled (the confirmation waits for the destage) or the
/// world settles (it must come back within its bound). Then a round is
/// what production's is: up to half the log (`client_agent::cache`:
/// `DESTAGE_ROUND_BYTES_MAX` or half the log, whichever is less), 1024
/// records of the 8 MiB caches the worlds draw. Rounds of 64 took a recall
/// past its bound when the holder was paused and reconnected in the middle
/// (seed 51837511537883: some 250 records in four rounds); rounds of 4
/// took a settling world past its end with 200 records left, each round
/// a device write, a flush and a release, one in three delayed by a
/// device's stall (seed 20003807887391: writes logged while the mirror was
/// down wait for their destage, so their holder never looked settled).
const ROUND_RECORDS: usize = 4;
const ROUND_RECORDS_WHOLE: usize = 1024;
/// How [`AgentHost::on_cache_message`] marks a refusal for a volume
/// without a cache (`InvalidArgument` to `MirrorOpen`).
const NO_CACHE: &str = "no cache: ";

/// Message ids of the cache's own requests, apart from the core's.
pub const CACHE_REQUEST_BASE: u64 = 1 << 40;

/// A server's refusal as the cache sees it.
pub(super) fn error_text(e: volume_format::control::messages::ControlError) -> String {
    match e.code {
        volume_format::control::messages::ErrorCode::InvalidArgument => format!("{NO_CACHE}{e}"),
        _ => e.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorState {
    /// The first `MirrorOpen` (or one after a failed probe) is out: I/O waits.
    Probing,
    /// Not cached: the volume has no cache (`known`), or the probe failed.
    Off {
        known: bool,
    },
    Mirrored,
    /// The mirror failed: writes are logged and acknowledged once destaged;
    /// `opening`: a `MirrorOpen` is out.
    Through {
        opening: bool,
    },
}

#[derive(Debug)]
struct Rec {
    block: u64,
    tag: u64,
    /// A write-through write acknowledged once this record is destaged.
    io: Option<u64>,
}

#[derive(Debug)]
struct Round {
    upto: u64,
    left: usize,
    flushing: bool,
    failed: bool,
    /// Each device's power-loss count when the round began: a device that
    /// lost power (its connections reset) before the round's flush
    /// completed may have dropped the round's writes from its cache, and
    /// the flush, on a new connection, does not vouch for them.
    devices: Vec<(usize, u64)>,
}

/// Starting the mirror again with the log's records (see the module doc).
#[derive(Debug)]
struct Staging {
    /// The attempt's id at the server.
    copy: u64,
    /// The log's records when the attempt began, in order.
    records: Vec<MirrorRecord>,
    /// Records sent in `MirrorStage` requests so far.
    sent: usize,
}

#[derive(Debug)]
pub struct Cache {
    pub state: MirrorState,
    /// Rises each time mirroring starts or fails: an append answered for
    /// an older epoch acknowledges nothing.
    epoch: u64,
    next_seq: u64,
    log: BTreeMap<u64, Rec>,
    /// Block → newest logged record.
    dirty: BTreeMap<u64, u64>,
    /// Block → the oldest record there a failed mirror (or a failed
    /// staging attempt) may hold: a write-through write of a later record
    /// there waits for mirroring to start again (production's
    /// `StaleRanges`).
    stale: BTreeMap<u64, u64>,
    /// Write-through writes destaged over stale blocks, acknowledged once
    /// mirroring starts afresh.
    stale_waiters: Vec<(u64, u64)>,
    round: Option<Round>,
    releasing: bool,
    retry_at: u64,
    /// Mirroring is being started again with the log's records.
    staging: Option<Staging>,
    /// Records up to here are on the devices, and their release waits for
    /// the staging to end.
    held_release: Option<u64>,
    /// Staging attempts so far (their ids).
    attempts: u64,
}

impl Cache {
    fn new() -> Cache {
        Cache {
            state: MirrorState::Probing,
            epoch: 0,
            next_seq: 1,
            log: BTreeMap::new(),
            dirty: BTreeMap::new(),
            stale: BTreeMap::new(),
            stale_waiters: Vec::new(),
            round: None,
            releasing: false,
            retry_at: 0,
            staging: None,
            held_release: None,
            attempts: 0,
        }
    }

    /// Nothing logged, destaged or released right now.
    pub fn idle(&self) -> bool {
        self.log.is_empty() && self.round.is_none() && !self.releasing && self.held_release.is_none()
    }

    /// Every record in the log may be held by a mirror that failed (or by
    /// a staging attempt's copy).
    fn log_stale(&mut self) {
        for (seq, r) in &self.log {
            let oldest = self.stale.entry(r.block).or_insert(*seq);
            *oldest = (*oldest).min(*seq);
        }
    }

    /// Whether the devices may lack what this cache acknowledged.
    pub fn holds_writes(&self) -> bool {
        !self.log.is_empty()
    }

    fn logs_writes(&self) -> bool {
        matches!(self.state, MirrorState::Mirrored | MirrorState::Through { .. }) || !self.log.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
pub enum CacheReq {
    Open,
    /// A `MirrorStage` (`last`: its last record's seq) or, `last` `None`,
    /// the `MirrorOpenStaged` of attempt `copy`.
    Stage {
        copy: u64,
        last: Option<u64>,
    },
    Append {
        epoch: u64,
        io: u64,
        seq: u64,
    },
    Release {
        epoch: u64,
        upto: u64,
    },
}

#[derive(Debug)]
pub struct Pending {
    att: AttachmentId,
    req: CacheReq,
    net: NetConn,
    deadline: u64,
}

impl AgentHost {
    /// A new exclusive attachment: probe for its cache (worlds with caches).
    pub(super) fn cache_attached(&mut self, att: AttachmentId, env: &mut Env) {
        if env.cfg.cache_mask == 0 {
            return;
        }
        let Some(a) = self.atts.get_mut(&att) else { return };
        if a.mode != OpenMode::Exclusive {
            return;
        }
        a.cache = Some(Cache::new());
        self.send_open(att, env);
    }

    /// The connection the core is connected on, if any.
    fn current_net(&self, env: &Env) -> Option<NetConn> {
        if !self.connected() {
            return None;
        }
        self.conns.iter().rev().map(|(_, n)| *n).find(|n| env.net.get(*n).is_some_and(|c| c.open))
    }

    fn cache_send(&mut self, att: AttachmentId, req: CacheReq, request: Request, env: &mut Env) -> bool {
        let Some(net) = self.current_net(env) else { return false };
        let id = CACHE_REQUEST_BASE + self.next_cache_req;
        self.next_cache_req += 1;
        env.trace(self.me(), format_args!("-> #{id} {}", crate::describe_request(&request)));
        let deadline = env.now + CACHE_REQUEST_TIMEOUT_MS;
        self.cache_reqs.insert(id, Pending { att, req, net, deadline });
        env.schedule(deadline, Ev::AgentWake { agent: self.index, inc: self.inc });
        env.send(net, Wire::ToServer(ClientMessage { id, request }));
        true
    }

    fn send_open(&mut self, att: AttachmentId, env: &mut Env) {
        let Some(handle) = self.atts.get(&att).map(|a| a.handle) else { return };
        let request = Request::MirrorOpen { handle: volume_format::HandleId(handle) };
        if !self.cache_send(att, CacheReq::Open, request, env) {
            self.cache_reply(att, CacheReq::Open, Err("not connected".into()), env);
        }
    }

    /// A reply (or a loss) for one of the cache's requests.
    pub(super) fn on_cache_message(&mut self, id: u64, result: Result<Response, String>, env: &mut Env) {
        let Some(p) = self.cache_reqs.remove(&id) else { return };
        let shown = match &result {
            Ok(r) => format!("{r:?}"),
            Err(e) => format!("error: {e}"),
        };
        env.trace(self.me(), format_args!("<- #{id} {}", shown.chars().take(120).collect::<String>()));
        self.cache_reply(p.att, p.req, result, env);
    }

    /// The connection `net` is gone: its cache requests fail.
    pub(super) fn cache_conn_lost(&mut self, net: NetConn, env: &mut Env) {
        let ids: Vec<u64> = self.cache_reqs.iter().filter(|(_, p)| p.net == net).map(|(id, _)| *id).collect();
        for id in ids {
            self.on_cache_message(id, Err("the connection was lost".into()), env);
        }
    }

    /// Timeouts, and every cache's next step.
    pub(super) fn cache_tick(&mut self, env: &mut Env) {
        let late: Vec<u64> = self.cache_reqs.iter().filter(|(_, p)| p.deadline <= env.now).map(|(id, _)| *id).collect();
        for id in late {
            self.on_cache_message(id, Err("the request timed out".into()), env);
        }
        let atts: Vec<AttachmentId> = self.atts.iter().filter(|(_, a)| a.cache.is_some()).map(|(id, _)| *id).collect();
        for att in atts {
            self.cache_kick(att, env);
        }
    }

    fn cache_reply(&mut self, att: AttachmentId, req: CacheReq, result: Result<Response, String>, env: &mut Env) {
        let me = self.me();
        match req {
            CacheReq::Open => {
                let Some(a) = self.atts.get_mut(&att) else { return };
                let Some(c) = a.cache.as_mut() else { return };
                let probing = c.state == MirrorState::Probing;
                match result {
                    Ok(Response::MirrorOpened { cache: Some(s) }) if s.mode == CacheMode::Mirrored => {
                        self.mirroring_started(att, env);
                    }
                    Ok(Response::MirrorOpened { .. }) => {
                        env.trace(me, format_args!("{}: no cache", a.volume));
                        c.state = MirrorState::Off { known: true };
                    }
                    // The volume has no cache setting (production's
                    // attach then serves it uncached).
                    Err(e) if probing && e.starts_with(NO_CACHE) => {
                        env.trace(me, format_args!("{}: no cache", a.volume));
                        c.state = MirrorState::Off { known: true };
                    }
                    other => {
                        let why = match other {
                            Err(e) => e,
                            Ok(r) => format!("unexpected answer {r:?}"),
                        };
                        env.trace(me, format_args!("{}: starting the mirror failed: {why}", a.volume));
                        c.retry_at = env.now + MIRROR_RETRY_MS;
                        c.state = if probing {
                            MirrorState::Off { known: false }
                        } else {
                            MirrorState::Through { opening: false }
                        };
                        env.schedule(c.retry_at, Ev::AgentWake { agent: self.index, inc: self.inc });
                    }
                }
                if probing {
                    self.release_held(att, env);
                }
            }
            CacheReq::Stage { copy, last } => {
                let Some(a) = self.atts.get_mut(&att) else { return };
                let volume = a.volume.clone();
                let Some(c) = a.cache.as_mut() else { return };
                if c.staging.as_ref().is_none_or(|s| s.copy != copy) {
                    return;
                }
                let why = match (result, last) {
                    (Ok(Response::Mirrored { upto_seq }), Some(last)) if upto_seq == last => None,
                    (Ok(Response::MirrorOpened { cache: Some(_) }), None) => None,
                    (Err(e), _) => Some(e),
                    (Ok(r), _) => Some(format!("unexpected answer {r:?}")),
                };
                match (why, last) {
                    (Some(why), _) => {
                        env.trace(
                            me,
                            format_args!("{volume}: starting the mirror with the log's records failed: {why}"),
                        );
                        c.staging = None;
                        c.state = MirrorState::Through { opening: false };
                        c.retry_at = env.now + MIRROR_RETRY_MS;
                        env.schedule(c.retry_at, Ev::AgentWake { agent: self.index, inc: self.inc });
                        self.release_after_staging(att, env);
                    }
                    (None, Some(_)) => self.stage_next(att, env),
                    (None, None) => {
                        c.staging = None;
                        env.stats.mirror_staged_starts += 1;
                        self.mirroring_started(att, env);
                        self.release_after_staging(att, env);
                    }
                }
            }
            CacheReq::Append { epoch, io, seq } => {
                let Some(c) = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()) else { return };
                let current = epoch == c.epoch && c.state == MirrorState::Mirrored;
                match result {
                    Ok(Response::Mirrored { .. }) if current => self.finish_cached_write(io, seq, true, env),
                    other => {
                        if current {
                            let why = match other {
                                Err(e) => e,
                                Ok(r) => format!("unexpected answer {r:?}"),
                            };
                            self.mirror_failed(att, &why, env);
                        }
                        // Written through: acknowledged once destaged.
                        let Some(c) = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()) else { return };
                        match c.log.get_mut(&seq) {
                            Some(r) => r.io = Some(io),
                            // Destaged already (and released: its append
                            // reached the server before the release).
                            None => self.finish_cached_write(io, seq, false, env),
                        }
                    }
                }
            }
            CacheReq::Release { epoch, upto } => {
                let Some(c) = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()) else { return };
                c.releasing = false;
                let current = epoch == c.epoch && c.state == MirrorState::Mirrored;
                if current && !matches!(result, Ok(Response::Done)) {
                    let why = match result {
                        Err(e) => e,
                        Ok(r) => format!("unexpected answer {r:?}"),
                    };
                    self.mirror_failed(att, &why, env);
                }
                self.drop_upto(att, upto, env);
            }
        }
        self.cache_kick(att, env);
        self.cache_settled(att, env);
    }

    /// The mirror answered a start: writes are mirrored from now on, and it
    /// holds nothing a stale block was waiting for.
    fn mirroring_started(&mut self, att: AttachmentId, env: &mut Env) {
        let me = self.me();
        let Some(a) = self.atts.get_mut(&att) else { return };
        let Some(c) = a.cache.as_mut() else { return };
        env.trace(me, format_args!("{}: cache mirrored (epoch {})", a.volume, c.epoch + 1));
        c.state = MirrorState::Mirrored;
        c.epoch += 1;
        c.stale.clear();
        let waiters = std::mem::take(&mut c.stale_waiters);
        for (io, seq) in waiters {
            self.finish_cached_write(io, seq, false, env);
        }
    }

    /// Starts mirroring again with the log's records (see the module doc):
    /// the first `MirrorStage` of a new attempt.
    fn start_staging(&mut self, att: AttachmentId, env: &mut Env) {
        let (index, inc) = (self.index as u64, self.inc);
        let me = self.me();
        let Some(a) = self.atts.get_mut(&att) else { return };
        let Some(c) = a.cache.as_mut() else { return };
        c.attempts += 1;
        let copy = index << 48 | (inc & 0xffff) << 32 | c.attempts;
        let records: Vec<MirrorRecord> = c
            .log
            .iter()
            .map(|(seq, r)| MirrorRecord { seq: *seq, offset: r.block * BLOCK_BYTES, data: encode_tag(r.tag) })
            .collect();
        // Stale from now on: see the module doc.
        c.log_stale();
        env.trace(me, format_args!("{}: staging the log's {} records (attempt {copy:x})", a.volume, records.len()));
        c.staging = Some(Staging { copy, records, sent: 0 });
        c.state = MirrorState::Through { opening: true };
        self.stage_next(att, env);
    }

    /// The staging's next request: more records, or the start with them.
    fn stage_next(&mut self, att: AttachmentId, env: &mut Env) {
        let Some(a) = self.atts.get_mut(&att) else { return };
        let handle = volume_format::HandleId(a.handle);
        let Some(s) = a.cache.as_mut().and_then(|c| c.staging.as_mut()) else { return };
        let copy = s.copy;
        let (req, request) = if s.sent < s.records.len() {
            let records: Vec<MirrorRecord> = s.records[s.sent..].iter().take(STAGE_RECORDS).cloned().collect();
            s.sent += records.len();
            let last = records.last().map(|r| r.seq);
            (CacheReq::Stage { copy, last }, Request::MirrorStage { handle, copy, records })
        } else {
            let records = s.records.len() as u64;
            (CacheReq::Stage { copy, last: None }, Request::MirrorOpenStaged { handle, copy, records })
        };
        if !self.cache_send(att, req, request, env) {
            self.cache_reply(att, req, Err("not connected".into()), env);
        }
    }

    /// The staging ended: the round done meanwhile is released — at the
    /// mirror first if it started.
    fn release_after_staging(&mut self, att: AttachmentId, env: &mut Env) {
        let Some(a) = self.atts.get_mut(&att) else { return };
        let handle = a.handle;
        let Some(c) = a.cache.as_mut() else { return };
        let Some(upto) = c.held_release.take() else { return };
        if c.state != MirrorState::Mirrored {
            return self.drop_upto(att, upto, env);
        }
        let epoch = c.epoch;
        self.send_release(att, handle, epoch, upto, env);
    }

    /// Releases records up to `upto` at the mirror (started in `epoch`);
    /// they leave the log once it answered.
    fn send_release(&mut self, att: AttachmentId, handle: u64, epoch: u64, upto: u64, env: &mut Env) {
        if let Some(c) = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()) {
            c.releasing = true;
        }
        let release = CacheReq::Release { epoch, upto };
        let request = Request::MirrorRelease { handle: volume_format::HandleId(handle), upto_seq: upto };
        if !self.cache_send(att, release, request, env) {
            self.cache_reply(att, release, Err("not connected".into()), env);
        }
    }

    /// A logged write (record `seq`) is acknowledged, unless an older
    /// record a failed mirror may hold covers its block and the mirror has
    /// not started again.
    ///
    /// Durable once acknowledged: mirrored, or destaged and flushed.
    fn finish_cached_write(&mut self, io: u64, seq: u64, mirrored: bool, env: &mut Env) {
        let Some(i) = self.ios.get(&io) else { return };
        let (att, block, tag) = match i.kind {
            IoKind::Write { block, tag } => (i.att, block, tag),
            _ => return,
        };
        let me = self.me();
        if let Some(c) = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()) {
            if c.state != MirrorState::Mirrored && c.stale.get(&block).is_some_and(|oldest| *oldest < seq) {
                env.trace(me, format_args!("io{io} waits for the mirror to start afresh (stale block)"));
                return c.stale_waiters.push((io, seq));
            }
        }
        if mirrored {
            env.stats.writes_mirrored += 1;
        } else {
            env.stats.writes_through += 1;
        }
        self.finish_io(io, Ok(DevResult::Done), env);
        env.oracle.durable(tag);
    }

    fn mirror_failed(&mut self, att: AttachmentId, why: &str, env: &mut Env) {
        let me = self.me();
        let Some(a) = self.atts.get_mut(&att) else { return };
        let Some(c) = a.cache.as_mut() else { return };
        if c.state != MirrorState::Mirrored {
            return;
        }
        env.trace(me, format_args!("{}: the mirror failed ({why}): writing through", a.volume));
        c.state = MirrorState::Through { opening: false };
        c.epoch += 1;
        c.log_stale();
    }

    /// Records up to `upto` are on the devices (and released where needed).
    fn drop_upto(&mut self, att: AttachmentId, upto: u64, env: &mut Env) {
        let index = self.index;
        let Some(a) = self.atts.get_mut(&att) else { return };
        let volume_id = a.volume_id;
        let Some(c) = a.cache.as_mut() else { return };
        let seqs: Vec<u64> = c.log.range(..=upto).map(|(s, _)| *s).collect();
        let mut acks = Vec::new();
        for seq in seqs {
            let r = c.log.remove(&seq).expect("listed");
            if c.dirty.get(&r.block) == Some(&seq) {
                c.dirty.remove(&r.block);
                env.cache_dirty.remove(&(index, volume_id, r.block));
            }
            if let Some(io) = r.io {
                acks.push((io, seq));
            }
        }
        for (io, seq) in acks {
            self.finish_cached_write(io, seq, false, env);
        }
    }

    /// What happens next in `att`'s cache: a destage round, a release, or
    /// starting the mirror again.
    pub(super) fn cache_kick(&mut self, att: AttachmentId, env: &mut Env) {
        let now = self.clock(env);
        let writes_from = self.writes_from;
        let Some(a) = self.atts.get_mut(&att) else { return };
        let usable = matches!(a.phase, Phase::Open | Phase::Recalled { .. }) && now < a.lease_until;
        let (handle, desc, volume) = (a.handle, a.desc.clone(), a.volume.clone());
        let in_flight = a.in_flight;
        let whole = matches!(a.phase, Phase::Recalled { .. }) || env.settling;
        let per_round = if whole { ROUND_RECORDS_WHOLE } else { ROUND_RECORDS };
        let Some(c) = a.cache.as_mut() else { return };
        if !usable {
            return;
        }
        if c.round.is_none() && !c.releasing && c.held_release.is_none() && !c.log.is_empty() && now >= writes_from {
            let seqs: Vec<u64> = c.log.keys().take(per_round).copied().collect();
            let upto = *seqs.last().expect("not empty");
            let blocks: BTreeSet<u64> = seqs.iter().map(|s| c.log[s].block).collect();
            // As production's destage writes through the volume's intent
            // log: the round's regions are recorded dirty first.
            let listed: Vec<u64> = blocks.iter().copied().collect();
            if !self.intent_round_begin(att, &listed, env) {
                return;
            }
            let Some(c) = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()) else { return };
            let mut sends = Vec::new();
            for block in blocks {
                let tag = c.log[&c.dirty[&block]].tag;
                for (dev, offset) in block_legs(&desc, block, env) {
                    sends.push((dev, offset, tag));
                }
            }
            let mut devices: Vec<(usize, u64)> = sends.iter().map(|(d, _, _)| (*d, env.devices[*d].crashes)).collect();
            devices.sort();
            devices.dedup();
            c.round = Some(Round { upto, left: sends.len(), flushing: false, failed: false, devices });
            env.trace(self.me(), format_args!("{volume}: destaging records up to {upto} ({} writes)", sends.len()));
            for (dev, offset, tag) in sends {
                let op = DevOp::Write { block: offset / BLOCK_BYTES, data: vec![Content::Tag(tag)], fua: false };
                self.dev_send(dev, op, DevPurpose::Destage(att), Some(handle), None, env);
            }
            return self.round_sent(att, env);
        }
        match c.state {
            MirrorState::Through { opening: false } if c.idle() && env.now >= c.retry_at => {
                c.state = MirrorState::Through { opening: true };
                self.send_open(att, env);
            }
            // No release may run while staging (a round may).
            MirrorState::Through { opening: false }
                if !c.releasing && c.held_release.is_none() && env.now >= c.retry_at =>
            {
                self.start_staging(att, env);
            }
            MirrorState::Off { known: false } if in_flight == 0 && env.now >= c.retry_at => {
                c.state = MirrorState::Probing;
                self.send_open(att, env);
            }
            _ => {}
        }
    }

    /// The requests of a round step are sent: with nothing to wait for (no
    /// device to write or flush), the step is done at once.
    fn round_sent(&mut self, att: AttachmentId, env: &mut Env) {
        let round = self.atts.get(&att).and_then(|a| a.cache.as_ref()).and_then(|c| c.round.as_ref());
        if round.is_some_and(|r| r.left == 0) {
            self.round_step(att, None, env);
        }
    }

    /// A destage write or flush of `att`'s round answered (`None`: nothing
    /// to wait for).
    pub(super) fn round_step(&mut self, att: AttachmentId, result: Option<DevResult>, env: &mut Env) {
        let Some(a) = self.atts.get_mut(&att) else { return };
        let handle = a.handle;
        let epoch_state = a.cache.as_ref().map(|c| (c.epoch, c.state.clone()));
        let Some(r) = a.cache.as_mut().and_then(|c| c.round.as_mut()) else { return };
        if let Some(result) = result {
            r.left = r.left.saturating_sub(1);
            r.failed |= matches!(result, DevResult::Failed(_));
        }
        if r.left > 0 {
            return;
        }
        if !r.flushing {
            // The round's writes ended: their regions are let go.
            let ok = !r.failed;
            self.intent_round_end(att, ok, env);
        }
        let Some(a) = self.atts.get_mut(&att) else { return };
        let Some(r) = a.cache.as_mut().and_then(|c| c.round.as_mut()) else { return };
        if r.flushing && r.devices.iter().any(|(d, crashes)| env.devices[*d].crashes != *crashes) {
            env.trace(Proc::Agent(self.index), format_args!("a device lost power during the destage round: again"));
            r.failed = true;
        }
        if r.failed {
            // Retried later, never dropped.
            let c = a.cache.as_mut().expect("has a round");
            c.round = None;
            c.retry_at = env.now + MIRROR_RETRY_MS;
            return env.schedule(env.now + 50, Ev::AgentWake { agent: self.index, inc: self.inc });
        }
        if !r.flushing {
            r.flushing = true;
            let devices: Vec<usize> = r.devices.iter().map(|(d, _)| *d).collect();
            r.left = devices.len();
            for dev in devices {
                self.dev_send(dev, DevOp::Flush, DevPurpose::Destage(att), Some(handle), None, env);
            }
            return self.round_sent(att, env);
        }
        let c = a.cache.as_mut().expect("has a round");
        let upto = c.round.take().expect("present").upto;
        if c.staging.is_some() {
            let me = Proc::Agent(self.index);
            env.trace(me, format_args!("records up to {upto} destaged: released once the staging ended"));
            c.held_release = Some(upto);
            return;
        }
        let (epoch, state) = epoch_state.expect("has a cache");
        if state == MirrorState::Mirrored {
            return self.send_release(att, handle, epoch, upto, env);
        }
        self.drop_upto(att, upto, env);
        self.cache_kick(att, env);
        self.cache_settled(att, env);
    }

    /// A drain or a detach may be waiting for the cache.
    fn cache_settled(&mut self, att: AttachmentId, env: &mut Env) {
        let mut queue = VecDeque::new();
        self.check_drain(att, &mut queue, env);
        for input in queue {
            self.input(input, env);
        }
    }

    /// Sends a write through the cache if it takes it (`true`).
    pub(super) fn cache_write(&mut self, id: u64, block: u64, tag: u64, env: &mut Env) -> bool {
        let me = self.me();
        let Some(io) = self.ios.get(&id) else { return false };
        let att = io.att;
        let Some(a) = self.atts.get_mut(&att) else { return false };
        let (handle, volume_id, volume) = (a.handle, a.volume_id, a.volume.clone());
        let Some(c) = a.cache.as_mut() else { return false };
        if !c.logs_writes() {
            return false;
        }
        let seq = c.next_seq;
        c.next_seq += 1;
        c.log.insert(seq, Rec { block, tag, io: None });
        c.dirty.insert(block, seq);
        env.cache_dirty.insert((self.index, volume_id, block));
        env.oracle.sent(volume_id, block, tag, format!("{me}/h{handle}"));
        let mirrored = c.state == MirrorState::Mirrored;
        let epoch = c.epoch;
        env.trace(me, format_args!("io{id} write {volume} b{block} w{tag} logged as record {seq}"));
        if mirrored {
            let record = MirrorRecord { seq, offset: block * BLOCK_BYTES, data: encode_tag(tag) };
            let request = Request::MirrorAppend { handle: volume_format::HandleId(handle), records: vec![record] };
            if !self.cache_send(att, CacheReq::Append { epoch, io: id, seq }, request, env) {
                let append = CacheReq::Append { epoch, io: id, seq };
                self.cache_reply(att, append, Err("not connected".into()), env);
            }
        } else if let Some(r) = c.log.get_mut(&seq) {
            r.io = Some(id);
        }
        self.cache_kick(att, env);
        true
    }

    /// A read the cache answers (`true`): the newest logged write of its block.
    pub(super) fn cache_read(&mut self, id: u64, block: u64, env: &mut Env) -> bool {
        let Some(io) = self.ios.get(&id) else { return false };
        let Some(a) = self.atts.get(&io.att) else { return false };
        let Some(c) = a.cache.as_ref() else { return false };
        let Some(tag) = c.dirty.get(&block).map(|s| c.log[s].tag) else { return false };
        let got = Content::Tag(tag);
        env.stats.reads_checked += 1;
        if let Err(e) = env.oracle.check_read(a.volume_id, block, &got) {
            let detail = format!("{} read volume {} block {block} from its cache: {e}", self.me(), a.volume_id);
            env.fail("acknowledged-flushed-writes-readable", detail);
        }
        self.finish_io(id, Ok(DevResult::Read(vec![got])), env);
        true
    }

    /// Whether I/O must wait for the probe.
    pub(super) fn cache_probing(&self, att: AttachmentId) -> bool {
        self.atts.get(&att).and_then(|a| a.cache.as_ref()).is_some_and(|c| c.state == MirrorState::Probing)
    }

    /// Whether `att` may report drained or detached as far as its cache goes.
    pub(super) fn cache_idle(&self, att: AttachmentId) -> bool {
        self.atts.get(&att).and_then(|a| a.cache.as_ref()).is_none_or(|c| c.idle())
    }

    /// The handle is gone: the log is dropped (the server replays the
    /// mirror), and writes waiting on the cache fail.
    pub(super) fn cache_revoked(&mut self, att: AttachmentId, env: &mut Env) {
        let mut fail: Vec<u64> = Vec::new();
        let ids: Vec<u64> = self.cache_reqs.iter().filter(|(_, p)| p.att == att).map(|(id, _)| *id).collect();
        for id in ids {
            if let Some(Pending { req: CacheReq::Append { io, .. }, .. }) = self.cache_reqs.remove(&id) {
                fail.push(io);
            }
        }
        if let Some(c) = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()) {
            if c.holds_writes() {
                let volume = self.atts[&att].volume_id;
                env.cache_orphaned(volume);
            }
            let c = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()).expect("present");
            fail.extend(c.log.values().filter_map(|r| r.io));
            fail.extend(c.stale_waiters.drain(..).map(|(io, _)| io));
            let index = self.index;
            let volume_id = self.atts[&att].volume_id;
            env.cache_dirty.retain(|(a, v, _)| !(*a == index && *v == volume_id));
            let c = self.atts.get_mut(&att).and_then(|a| a.cache.as_mut()).expect("present");
            c.log.clear();
            c.dirty.clear();
            c.round = None;
            c.releasing = false;
            c.staging = None;
            c.held_release = None;
            c.state = MirrorState::Off { known: true };
        }
        for io in fail {
            self.finish_io(io, Err("handle revoked: the cache was dropped".into()), env);
        }
    }

    /// Whether `volume`'s attachment here caches writes (it is not handed over).
    pub fn caches(&self, volume: &str) -> bool {
        self.attachment_of(volume)
            .and_then(|att| self.atts.get(&att))
            .and_then(|a| a.cache.as_ref())
            .is_some_and(|c| !matches!(c.state, MirrorState::Off { known: true }))
    }

    /// This agent dies: volumes whose cache held writes the devices lack.
    pub fn cached_volumes_holding_writes(&self) -> Vec<u64> {
        self.atts.values().filter(|a| a.cache.as_ref().is_some_and(|c| c.holds_writes())).map(|a| a.volume_id).collect()
    }
}
