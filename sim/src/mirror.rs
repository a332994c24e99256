//! The cache mirrors of one server host (issue 15), as
//! `metadata_server::mirror` keeps them: per volume, the mirror *file*
//! (its generation and the records not yet released, oldest first) on the
//! host's disk — it outlives every incarnation of the host's server — and
//! the *worker* that serves one owner (a server incarnation's term), with
//! what production's worker keeps in memory: whether the file is open for
//! appends (its ring, `store::VolumeMirror`), the records staged for the
//! next generation, and the appends waiting for room.
//!
//! Plain state, testable without the world: [`HostMirrors::submit`]
//! queues a [`MirrorOp`] for a volume's worker; the shell (`server.rs`)
//! schedules its file I/O (a random latency, in the volume's order) and
//! calls [`HostMirrors::complete`] when that time comes; the worker then
//! takes every due request in order, as `mirror::worker::Worker::take`
//! does, and says what to answer ([`Done::Answer`]) or what a replay writes
//! ([`Done::Replay`]; the volume's requests wait until
//! [`HostMirrors::replay_finished`], as production's worker answers
//! nothing else while it replays).
//!
//! Durability: a request is on the disk once its time came (an append is
//! durable when answered). What an incarnation that died had in flight —
//! written or not when it died — is decided when the next incarnation
//! first touches the mirrors ([`HostMirrors::forget_dead`]): a random
//! prefix of it took effect (a torn last batch is ignored by the log's
//! scan, so each request is all or nothing). No random number is drawn when
//! nothing was in flight.
//!
//! The ring's accounting is production's own (`store::MirrorLedger`, which
//! `store::VolumeMirror` writes to its file): an append that does not fit
//! waits for a release, never an error. Replays plan their writes
//! with production's `mirror::replay::final_pieces`.
//!
//! Data: a simulated agent mirrors whole blocks, the workload tag as the
//! first 8 bytes (little-endian) followed by zeros ([`encode_tag`],
//! [`decode_tag`]); a replay writes such a block as [`Content::Tag`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use metadata_server::mirror::replay::{final_pieces, Span, REPLAY_WRITE_BYTES_MAX};
use metadata_server::mirror::store::MirrorLedger;
use metadata_server::mirror::MirrorOp;
use volume_format::cache_log::LogAppender;
use volume_format::control::messages::{
    ControlError, ErrorCode, MirrorRecord, Response, MIRROR_APPEND_BYTES_MAX, MIRROR_APPEND_RECORDS_MAX,
};
use volume_format::metadata::{CacheMirrorRecord, PoolMetadata};
use volume_format::VolumeId;

use crate::device::{Content, BLOCK_BYTES};
use crate::rng::Rng;

/// Tokens of mirror file I/O (a server's [`crate::world::Ev::Notify`]):
/// this base plus the request's id; below the lease's tokens, above every
/// term's device tokens (`term << 40`).
pub const MIRROR_TOKEN_BASE: u64 = 1 << 61;

/// Whether `token` is a mirror request's ([`MIRROR_TOKEN_BASE`]).
pub fn is_token(token: u64) -> bool {
    (MIRROR_TOKEN_BASE..crate::lease::LEASE_TOKEN_BASE).contains(&token)
}

/// A simulated agent's mirrored block of workload write `tag`.
pub fn encode_tag(tag: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_BYTES as usize];
    data[..8].copy_from_slice(&tag.to_le_bytes());
    data
}

/// The workload tag of a block made by [`encode_tag`] (`None`: not one, or
/// zeros).
pub fn decode_tag(data: &[u8]) -> Option<u64> {
    if data.len() != BLOCK_BYTES as usize || data[8..].iter().any(|b| *b != 0) {
        return None;
    }
    let tag = u64::from_le_bytes(data[..8].try_into().ok()?);
    (tag != 0).then_some(tag)
}

/// What a block of mirrored bytes is on a simulated device.
pub fn block_content(data: &[u8]) -> Content {
    match decode_tag(data) {
        Some(tag) => Content::Tag(tag),
        None if data.iter().all(|b| *b == 0) => Content::Zero,
        None => Content::Raw(Arc::from(data)),
    }
}

/// Who a worker serves: the server process's incarnation and term
/// (production: one `Mirrors` per owner loop).
pub type Owner = (u64, u64);

/// A volume's mirror file as it is on the host's disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorFile {
    /// The generation header (`None`: a file that never got one).
    pub generation: Option<u64>,
    /// The records not released, oldest first: what a replay writes.
    pub records: VecDeque<MirrorRecord>,
}

/// The ring of an open mirror: production's accounting
/// (`store::MirrorLedger`), without the bytes — the file's records are kept
/// beside it.
struct Ring {
    ledger: MirrorLedger,
}

impl Ring {
    fn new(volume: VolumeId, log_bytes: u64) -> Ring {
        Ring { ledger: MirrorLedger::new(LogAppender::create(0, volume, log_bytes)) }
    }

    /// `store::VolumeMirror::append`: as many as fit, in order; an error
    /// takes none.
    fn append(&mut self, records: &[&MirrorRecord], file: &mut MirrorFile) -> Result<usize, String> {
        let plan = self.ledger.plan_append(records.iter().copied()).map_err(|e| e.to_string())?;
        let Some(plan) = plan else { return Ok(0) };
        let taken = plan.taken;
        self.ledger.appended(plan, records.iter().copied());
        file.records.extend(records[..taken].iter().map(|r| (*r).clone()));
        Ok(taken)
    }

    /// `store::VolumeMirror::release`.
    fn release(&mut self, upto_seq: u64, file: &mut MirrorFile) {
        if let Some(plan) = self.ledger.plan_release(upto_seq) {
            let released = self.ledger.released(plan).min(file.records.len());
            file.records.drain(..released);
        }
    }
}

/// What the holder staged for the next generation (worker memory).
struct Staged {
    copy: u64,
    ring: Ring,
    file: MirrorFile,
    records: u64,
}

/// An append not yet wholly durable: `done` of its records are.
struct Pending {
    id: u64,
    records: Vec<MirrorRecord>,
    done: usize,
}

/// A volume's worker: what production's `Worker` holds in memory.
struct Worker {
    owner: Owner,
    /// `Some`: the file is open for appends (`Worker::mirror`).
    open: Option<Ring>,
    staged: Option<Staged>,
    /// The file prepared for a generation being committed.
    prepared: Option<(u64, Ring)>,
    waiting: VecDeque<Pending>,
}

/// A request in the volume's queue.
struct Queued {
    id: u64,
    owner: Owner,
    op: MirrorOp,
    /// Its file I/O time came.
    due: bool,
}

/// A replay in progress: whose, and the records and bytes it writes (for a
/// status).
type Replaying = (Owner, u64, u64);

#[derive(Default)]
struct VolumeState {
    file: Option<MirrorFile>,
    worker: Option<Worker>,
    queue: VecDeque<Queued>,
    replaying: Option<Replaying>,
    /// Copies of another server's file fetched for a queued replay, by the
    /// replay's id ([`HostMirrors::submit_fetched`]).
    fetched: BTreeMap<u64, MirrorFile>,
}

/// What the shell does next for a request.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // an answer is a `Response`, moved once
pub enum Done {
    /// Answer request `id` (to whoever waits for it: a reply, a job, or
    /// nobody).
    Answer { id: u64, result: Result<Response, ControlError> },
    /// Request `id` (a replay) writes these: disjoint writes of whole
    /// blocks (volume byte offset, one [`Content`] per block), in offset
    /// order, on every leg of `meta`'s mapping, then
    /// [`HostMirrors::replay_finished`] and its answer.
    Replay(Box<Replay>),
}

/// A replay's writes ([`Done::Replay`]).
#[derive(Debug)]
pub struct Replay {
    pub id: u64,
    pub volume: VolumeId,
    pub meta: Arc<PoolMetadata>,
    pub writes: Vec<(u64, Vec<Content>)>,
    pub records: usize,
}

/// One host's mirror directory and workers.
#[derive(Default)]
pub struct HostMirrors {
    volumes: BTreeMap<VolumeId, VolumeState>,
    /// Which volume each queued request is for.
    ids: BTreeMap<u64, VolumeId>,
    next_id: u64,
}

fn failed(msg: impl Into<String>) -> ControlError {
    ControlError::new(ErrorCode::Internal, msg.into())
}

impl HostMirrors {
    /// Queues `op` for `volume`'s worker on behalf of `owner`; returns its
    /// id. Nothing happens to it before [`HostMirrors::complete`] of it.
    pub fn submit(&mut self, volume: VolumeId, owner: Owner, op: MirrorOp) -> u64 {
        self.submit_fetched(volume, owner, op, None)
    }

    /// [`HostMirrors::submit`] of a replay with the copy of the file
    /// fetched from the server its record names (`mirror::fetch`; the
    /// shell fetched it: see `server.rs`, `fetch_mirror`). The replay reads
    /// that copy instead of this host's file.
    pub fn submit_fetched(&mut self, volume: VolumeId, owner: Owner, op: MirrorOp, fetched: Option<MirrorFile>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.ids.insert(id, volume);
        let v = self.volumes.entry(volume).or_default();
        v.queue.push_back(Queued { id, owner, op, due: false });
        if let Some(file) = fetched {
            v.fetched.insert(id, file);
        }
        id
    }

    /// Request `id`'s file I/O time came: the worker of its volume takes
    /// every due request in order (up to a replay). `live`: the owner
    /// whose answers are awaited (`None`: none, the server stands by); a
    /// replay of another owner is abandoned (nobody waits for it).
    pub fn complete(&mut self, id: u64, live: Option<Owner>) -> Vec<Done> {
        let Some(volume) = self.ids.get(&id).copied() else { return Vec::new() };
        let Some(v) = self.volumes.get_mut(&volume) else { return Vec::new() };
        if let Some(q) = v.queue.iter_mut().find(|q| q.id == id) {
            q.due = true;
        }
        self.drain(volume, live)
    }

    /// The replay of `volume` ended (written or failed): the requests
    /// queued behind it go on.
    pub fn replay_finished(&mut self, volume: VolumeId, live: Option<Owner>) -> Vec<Done> {
        if let Some(v) = self.volumes.get_mut(&volume) {
            v.replaying = None;
        }
        self.drain(volume, live)
    }

    /// A new incarnation `inc` of the host's server touches the mirrors:
    /// what a dead incarnation had queued took effect up to a random point
    /// (its disk writes in flight landed or not) and is never answered;
    /// its workers and a replay it ran are gone. No draw when nothing of a
    /// dead incarnation is left.
    pub fn forget_dead(&mut self, inc: u64, rng: &mut Rng) {
        for (volume, v) in self.volumes.iter_mut() {
            if v.replaying.is_some_and(|(owner, _, _)| owner.0 != inc) {
                v.replaying = None;
            }
            let dead = v.queue.iter().take_while(|q| q.owner.0 != inc).count();
            if dead == 0 {
                continue;
            }
            let kept = rng.range(0, dead as u64) as usize;
            let ops: Vec<Queued> = v.queue.drain(..dead).collect();
            for q in ops.into_iter().take(kept) {
                let _ = apply(*volume, v, q);
            }
            if v.worker.as_ref().is_some_and(|w| w.owner.0 != inc) {
                v.worker = None;
            }
            let queue = &v.queue;
            v.fetched.retain(|id, _| queue.iter().any(|q| q.id == *id));
        }
        let volumes = &self.volumes;
        self.ids.retain(|id, vol| volumes.get(vol).is_some_and(|v| v.queue.iter().any(|q| q.id == *id)));
    }

    /// `volume`'s mirror file (`None`: no file).
    pub fn file(&self, volume: VolumeId) -> Option<&MirrorFile> {
        self.volumes.get(&volume)?.file.as_ref()
    }

    /// Requests queued for `volume` and not taken yet.
    pub fn queued(&self, volume: VolumeId) -> usize {
        self.volumes.get(&volume).map_or(0, |v| v.queue.len())
    }

    fn drain(&mut self, volume: VolumeId, live: Option<Owner>) -> Vec<Done> {
        let mut out = Vec::new();
        let Some(v) = self.volumes.get_mut(&volume) else { return out };
        loop {
            if v.replaying.is_some_and(|(owner, _, _)| live != Some(owner)) {
                // Its server stopped serving (or died): nobody finishes it.
                v.replaying = None;
            }
            if let Some((_, records, bytes)) = v.replaying {
                // `Mirrors::send`: a status is answered at once meanwhile.
                let mut i = 0;
                while i < v.queue.len() {
                    if v.queue[i].due && matches!(v.queue[i].op, MirrorOp::Status { .. }) {
                        let q = v.queue.remove(i).expect("in range");
                        let MirrorOp::Status { mut known } = q.op else { unreachable!("matched") };
                        known.mirroring = false;
                        known.held_records = records;
                        known.held_bytes = bytes;
                        out.push(Done::Answer { id: q.id, result: Ok(Response::VolumeCacheState(known)) });
                    } else {
                        i += 1;
                    }
                }
                break;
            }
            if !v.queue.front().is_some_and(|q| q.due) {
                break;
            }
            let q = v.queue.pop_front().expect("checked");
            let owner = q.owner;
            for done in apply(volume, v, q) {
                match done {
                    Done::Replay(r) if live != Some(owner) => {
                        let e = failed("the metadata server stopped serving; the replay is retried at the next open");
                        out.push(Done::Answer { id: r.id, result: Err(e) });
                    }
                    Done::Replay(r) => {
                        let bytes = v.file.as_ref().map_or(0, |f| f.records.iter().map(|r| r.data.len() as u64).sum());
                        v.replaying = Some((owner, r.records as u64, bytes));
                        out.push(Done::Replay(r));
                    }
                    answer => out.push(answer),
                }
            }
        }
        let volumes = &self.volumes;
        self.ids.retain(|id, vol| volumes.get(vol).is_some_and(|v| v.queue.iter().any(|q| q.id == *id)));
        out
    }
}

/// The worker takes request `q` (`mirror::worker::Worker::take`, then its
/// `write_waiting` for what arrived).
fn apply(volume: VolumeId, v: &mut VolumeState, q: Queued) -> Vec<Done> {
    let mut out = Vec::new();
    if v.worker.as_ref().is_none_or(|w| w.owner != q.owner) {
        // A new owner's `Mirrors` starts new workers: nothing open.
        v.worker = Some(Worker { owner: q.owner, open: None, staged: None, prepared: None, waiting: VecDeque::new() });
    }
    let w = v.worker.as_mut().expect("just set");
    let id = q.id;
    let mut answer = |result| out.push(Done::Answer { id, result });
    match q.op {
        MirrorOp::Append { records } => {
            if w.open.is_none() {
                let msg = format!(
                    "volume {volume} is not being mirrored (the metadata server restarted, or mirroring was never \
                     started): start mirroring again"
                );
                answer(Err(ControlError::new(ErrorCode::Unavailable, msg)));
            } else {
                w.waiting.push_back(Pending { id, records, done: 0 });
            }
        }
        MirrorOp::Release { upto_seq } => {
            write_waiting(w, &mut v.file, &mut out);
            if let (Some(ring), Some(file)) = (w.open.as_mut(), v.file.as_mut()) {
                ring.release(upto_seq, file);
            }
            out.push(Done::Answer { id, result: Ok(Response::Done) });
        }
        MirrorOp::Prepare { cache, generation, staged } => {
            // A start naming no whole staged copy changes nothing.
            let checked = staged.map_or(Ok(()), |(copy, records)| staged_check(volume, w, copy, records));
            if let Err(e) = checked {
                answer(Err(e));
            } else {
                drop_waiting(w, "mirroring started again", &mut out);
                w.open = None;
                let (ring, records) = match staged {
                    Some(_) => {
                        let staged = w.staged.take().expect("checked");
                        (staged.ring, staged.file.records)
                    }
                    None => (Ring::new(volume, cache.size_bytes), VecDeque::new()),
                };
                v.file = Some(MirrorFile { generation: Some(generation), records });
                w.prepared = Some((generation, ring));
                out.push(Done::Answer { id, result: Ok(Response::Done) });
            }
        }
        MirrorOp::Open { cache, generation } => {
            drop_waiting(w, "mirroring started again", &mut out);
            w.open = None;
            let result = match w.prepared.take() {
                Some((g, ring)) if g == generation => {
                    w.open = Some(ring);
                    Ok(Response::MirrorOpened { cache: Some(cache) })
                }
                other => Err(ControlError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "volume {volume}: the file of mirror generation {generation} is not prepared here (prepared: \
                         {}); start mirroring again",
                        other.map_or("none".into(), |(g, _)| format!("generation {g}"))
                    ),
                )),
            };
            out.push(Done::Answer { id, result });
        }
        MirrorOp::Stage { copy, size_bytes, records } => {
            let staged = w.staged.take().filter(|s| s.copy == copy);
            let mut staged = staged.unwrap_or_else(|| Staged {
                copy,
                ring: Ring::new(volume, size_bytes),
                file: MirrorFile { generation: Some(0), records: VecDeque::new() },
                records: 0,
            });
            let last = records.last().map_or(0, |r| r.seq);
            let refs: Vec<&MirrorRecord> = records.iter().collect();
            let result = match staged.ring.append(&refs, &mut staged.file) {
                Ok(taken) if taken < records.len() => Err(failed(format!(
                    "cache mirror of volume {volume} (staged): cannot stage the holder's records: {} of {} records \
                     do not fit the volume's {size_bytes}-byte mirror",
                    records.len() - taken,
                    records.len()
                ))),
                Ok(taken) => {
                    staged.records += taken as u64;
                    w.staged = Some(staged);
                    Ok(Response::Mirrored { upto_seq: last })
                }
                Err(e) => Err(failed(e)),
            };
            answer(result);
        }
        MirrorOp::Replay { meta, expected, named_here, source } => {
            drop_waiting(w, "the holder is gone; its mirror is being replayed", &mut out);
            w.open = None;
            w.staged = None;
            w.prepared = None;
            // A copy fetched from the named server is that server's file
            // (`Worker::replay`); without one (none asked, or the fetch
            // failed) this host's file is checked as before.
            let fetched = v.fetched.remove(&id).filter(|_| source.is_some());
            let (file, named_here) = match &fetched {
                Some(copy) => (Some(copy), true),
                None => (v.file.as_ref(), named_here),
            };
            match replay_plan(volume, file, &meta, expected.as_ref(), named_here) {
                Ok(writes) if writes.is_empty() => out.push(Done::Answer { id, result: Ok(Response::Done) }),
                Ok(writes) => {
                    let records = file.map_or(0, |f| f.records.len());
                    out.push(Done::Replay(Box::new(Replay { id, volume, meta, writes, records })));
                }
                Err(e) => out.push(Done::Answer { id, result: Err(e) }),
            }
        }
        MirrorOp::Remove => {
            drop_waiting(w, "the volume's cache was removed", &mut out);
            w.open = None;
            w.staged = None;
            w.prepared = None;
            v.file = None;
            out.push(Done::Answer { id, result: Ok(Response::Done) });
        }
        MirrorOp::Status { mut known } => {
            write_waiting(w, &mut v.file, &mut out);
            known.mirroring = w.open.is_some();
            if let Some(ring) = &w.open {
                known.held_records = ring.ledger.held_records() as u64;
                known.held_bytes = ring.ledger.held_bytes();
            }
            out.push(Done::Answer { id, result: Ok(Response::VolumeCacheState(known)) });
        }
    }
    // What arrived is written together.
    write_waiting(v.worker.as_mut().expect("set above"), &mut v.file, &mut out);
    out
}

fn staged_check(volume: VolumeId, w: &Worker, copy: u64, records: u64) -> Result<(), ControlError> {
    match &w.staged {
        Some(s) if s.copy == copy && s.records == records => Ok(()),
        other => {
            let had =
                other.as_ref().map_or("none".into(), |s| format!("attempt {:x} with {} records", s.copy, s.records));
            Err(ControlError::new(
                ErrorCode::Unavailable,
                format!(
                    "volume {volume}: no whole staged copy of attempt {copy:x} ({records} records) here (staged: \
                     {had}); stage the records again"
                ),
            ))
        }
    }
}

fn drop_waiting(w: &mut Worker, why: &str, out: &mut Vec<Done>) {
    for pending in w.waiting.drain(..) {
        let msg = format!("not mirrored: {why}");
        out.push(Done::Answer { id: pending.id, result: Err(ControlError::new(ErrorCode::Unavailable, msg)) });
    }
}

/// `Worker::write_waiting`: the waiting appends, in batches, as many as
/// fit; each answered once all its records are held.
fn write_waiting(w: &mut Worker, file: &mut Option<MirrorFile>, out: &mut Vec<Done>) {
    while !w.waiting.is_empty() {
        let (Some(ring), Some(file)) = (w.open.as_mut(), file.as_mut()) else {
            return drop_waiting(w, "mirroring stopped", out);
        };
        let mut bytes = 0;
        let batch: Vec<&MirrorRecord> = w
            .waiting
            .iter()
            .flat_map(|p| &p.records[p.done..])
            .take(MIRROR_APPEND_RECORDS_MAX)
            .take_while(|record| {
                let fits = bytes < MIRROR_APPEND_BYTES_MAX;
                bytes += record.data.len();
                fits
            })
            .collect();
        let mut taken = match ring.append(&batch, file) {
            Ok(0) => return, // full: wait for a release
            Ok(taken) => taken,
            Err(e) => {
                // Mirroring stops: the holder hears so and starts again.
                w.open = None;
                for pending in w.waiting.drain(..) {
                    out.push(Done::Answer { id: pending.id, result: Err(failed(e.clone())) });
                }
                return;
            }
        };
        while taken > 0 {
            let front = w.waiting.front_mut().expect("taken records came from waiting appends");
            let n = (front.records.len() - front.done).min(taken);
            front.done += n;
            taken -= n;
            if front.done == front.records.len() {
                let pending = w.waiting.pop_front().expect("front");
                let upto_seq = pending.records.last().map_or(0, |r| r.seq);
                out.push(Done::Answer { id: pending.id, result: Ok(Response::Mirrored { upto_seq }) });
            }
        }
        while w.waiting.front().is_some_and(|p| p.done == p.records.len()) {
            let pending = w.waiting.pop_front().expect("front");
            let upto_seq = pending.records.last().map_or(0, |r| r.seq);
            out.push(Done::Answer { id: pending.id, result: Ok(Response::Mirrored { upto_seq }) });
        }
    }
}

/// `Worker::replay`'s checks and plan: the file must be replayable for the
/// `expected` generation (`mirror::replayable`; with `None`: whatever it
/// holds); the writes are the final bytes of its records
/// (`replay::final_pieces`), as whole blocks.
pub fn replay_plan(
    volume: VolumeId,
    file: Option<&MirrorFile>,
    meta: &PoolMetadata,
    expected: Option<&CacheMirrorRecord>,
    named_here: bool,
) -> Result<Vec<(u64, Vec<Content>)>, ControlError> {
    let path = format!("volume-{}.mirror", volume.0);
    let generation = file.and_then(|f| f.generation);
    if let Some(expected) = expected {
        if !metadata_server::mirror::replayable(generation, expected.generation, named_here) {
            let server = if expected.server.is_empty() { "another metadata server" } else { &expected.server };
            let here = metadata_server::mirror::not_replayable_here(
                generation,
                expected.generation,
                server,
                std::path::Path::new(&path),
            );
            return Err(ControlError::new(
                ErrorCode::Unavailable,
                format!(
                    "the writes its last holder acknowledged are mirrored at generation {} by {server}, and {here}; \
                     make {server} the active server again (it replays them), or start the last holder's agent \
                     again (resuming its handle, it writes its own log to the devices); if both are lost for \
                     good, `sanvol volume cache {volume_name} --forget-mirror` gives up those writes",
                    expected.generation,
                    volume_name = meta.volume(volume).map_or_else(|| volume.to_string(), |v| v.name.clone()),
                ),
            ));
        }
    }
    let Some(file) = file else { return Ok(Vec::new()) };
    let spans =
        file.records.iter().enumerate().map(|(record, r)| (r.offset, Span { record, skip: 0, len: r.data.len() }));
    let mut writes = Vec::new();
    for (offset, parts) in final_pieces(spans, REPLAY_WRITE_BYTES_MAX) {
        let mut data = Vec::new();
        for s in parts {
            data.extend_from_slice(&file.records[s.record].data[s.skip..s.skip + s.len]);
        }
        if offset % BLOCK_BYTES != 0 || data.len() as u64 % BLOCK_BYTES != 0 {
            return Err(ControlError::new(
                ErrorCode::Unavailable,
                format!(
                    "replaying the cache mirror of volume {volume}: {} bytes at offset {offset} are not whole \
                     blocks (the simulated devices hold whole blocks)",
                    data.len()
                ),
            ));
        }
        writes.push((offset, data.chunks(BLOCK_BYTES as usize).map(block_content).collect()));
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume_format::control::messages::CacheStateInfo;
    use volume_format::metadata::{CacheMode, VolumeCache};

    const V: VolumeId = VolumeId(3);
    const A: Owner = (1, 0);

    fn cache() -> VolumeCache {
        VolumeCache { volume: V, size_bytes: volume_format::metadata::CACHE_BYTES_MIN, mode: CacheMode::Mirrored }
    }

    fn rec(seq: u64, block: u64, tag: u64) -> MirrorRecord {
        MirrorRecord { seq, offset: block * BLOCK_BYTES, data: encode_tag(tag) }
    }

    /// Submits `op` and completes it at once; its answers.
    fn run(m: &mut HostMirrors, owner: Owner, op: MirrorOp) -> Vec<Done> {
        let id = m.submit(V, owner, op);
        m.complete(id, Some(owner))
    }

    fn answer(done: &[Done]) -> &Result<Response, ControlError> {
        match done.last() {
            Some(Done::Answer { result, .. }) => result,
            other => panic!("not an answer: {other:?}"),
        }
    }

    fn open(m: &mut HostMirrors, owner: Owner, generation: u64) {
        let done = run(m, owner, MirrorOp::Prepare { cache: cache(), generation, staged: None });
        assert!(matches!(answer(&done), Ok(Response::Done)), "{done:?}");
        let done = run(m, owner, MirrorOp::Open { cache: cache(), generation });
        assert!(matches!(answer(&done), Ok(Response::MirrorOpened { .. })), "{done:?}");
    }

    fn meta() -> Arc<PoolMetadata> {
        let key = volume_format::PublicKey([0; 32]);
        Arc::new(PoolMetadata::new(uuid::Uuid::nil(), "t", 1 << 20, key, 0))
    }

    fn expected(generation: u64, server: &str) -> Option<CacheMirrorRecord> {
        Some(CacheMirrorRecord { volume: V, generation, server: server.into(), pending: true })
    }

    fn tags(m: &HostMirrors) -> Vec<u64> {
        m.file(V).map_or(Vec::new(), |f| f.records.iter().filter_map(|r| decode_tag(&r.data)).collect())
    }

    #[test]
    fn tags_round_trip() {
        assert_eq!(decode_tag(&encode_tag(42)), Some(42));
        assert_eq!(decode_tag(&encode_tag(0)), None);
        assert_eq!(decode_tag(&[1; 8]), None);
        assert_eq!(block_content(&encode_tag(7)), Content::Tag(7));
        assert_eq!(block_content(&[0; BLOCK_BYTES as usize]), Content::Zero);
    }

    #[test]
    fn appends_are_held_until_released_and_answered_in_order() {
        let mut m = HostMirrors::default();
        let done = run(&mut m, A, MirrorOp::Append { records: vec![rec(1, 0, 1)] });
        assert!(matches!(answer(&done), Err(e) if e.code == ErrorCode::Unavailable), "not open: {done:?}");
        open(&mut m, A, 1);
        assert_eq!(m.file(V).unwrap().generation, Some(1));
        let done = run(&mut m, A, MirrorOp::Append { records: vec![rec(1, 0, 11), rec(2, 1, 12)] });
        assert!(matches!(answer(&done), Ok(Response::Mirrored { upto_seq: 2 })));
        // Queued in order, the later one's time comes first: nothing until the first.
        let a = m.submit(V, A, MirrorOp::Append { records: vec![rec(3, 2, 13)] });
        let b = m.submit(V, A, MirrorOp::Release { upto_seq: 1 });
        assert!(m.complete(b, Some(A)).is_empty());
        let done = m.complete(a, Some(A));
        let ids: Vec<u64> = done
            .iter()
            .map(|d| match d {
                Done::Answer { id, .. } => *id,
                Done::Replay(_) => panic!("no replay"),
            })
            .collect();
        assert_eq!(ids, vec![a, b]);
        assert_eq!(tags(&m), vec![12, 13]);
        let done = run(&mut m, A, MirrorOp::Append { records: vec![rec(3, 0, 1)] });
        assert!(matches!(answer(&done), Err(e) if e.message.contains("out of order")), "{done:?}");
        let status = CacheStateInfo { cache: None, holder: None, mirroring: true, held_records: 0, held_bytes: 0 };
        let done = run(&mut m, A, MirrorOp::Status { known: status });
        assert!(matches!(answer(&done), Ok(Response::VolumeCacheState(s)) if !s.mirroring), "stopped: {done:?}");
        assert_eq!(tags(&m), vec![12, 13], "the file stays");
    }

    #[test]
    fn a_full_mirror_holds_appends_until_a_release() {
        let mut m = HostMirrors::default();
        open(&mut m, A, 1);
        let blocks = volume_format::metadata::CACHE_BYTES_MIN / BLOCK_BYTES;
        let mut seq = 0;
        let mut answered = 0;
        let mut waiting = None;
        while waiting.is_none() {
            let records: Vec<MirrorRecord> = (0..64)
                .map(|_| {
                    seq += 1;
                    rec(seq, seq % blocks, seq)
                })
                .collect();
            let id = m.submit(V, A, MirrorOp::Append { records });
            if m.complete(id, Some(A)).is_empty() {
                waiting = Some(id);
            } else {
                answered += 64;
            }
        }
        assert!(answered > 0 && (answered as u64) < blocks, "{answered} records fit");
        let done = run(&mut m, A, MirrorOp::Release { upto_seq: 256 });
        let answered_now: Vec<u64> =
            done.iter().filter_map(|d| if let Done::Answer { id, .. } = d { Some(*id) } else { None }).collect();
        assert!(answered_now.contains(&waiting.unwrap()), "the waiting append went in: {done:?}");
    }

    #[test]
    fn a_new_owner_must_open_again_and_the_file_survives() {
        let mut m = HostMirrors::default();
        open(&mut m, A, 4);
        run(&mut m, A, MirrorOp::Append { records: vec![rec(1, 0, 5)] });
        let next = (2, 0);
        m.forget_dead(2, &mut Rng::new(1));
        let done = run(&mut m, next, MirrorOp::Append { records: vec![rec(2, 1, 6)] });
        assert!(matches!(answer(&done), Err(e) if e.message.contains("not being mirrored")), "{done:?}");
        assert_eq!(m.file(V).unwrap().generation, Some(4));
        assert_eq!(tags(&m), vec![5]);
        run(&mut m, next, MirrorOp::Remove);
        assert!(m.file(V).is_none());
    }

    #[test]
    fn a_crash_keeps_or_drops_what_was_not_answered() {
        let mut kept = [0; 2];
        for seed in 0..64 {
            let mut m = HostMirrors::default();
            open(&mut m, A, 1);
            run(&mut m, A, MirrorOp::Append { records: vec![rec(1, 0, 1)] });
            m.submit(V, A, MirrorOp::Append { records: vec![rec(2, 1, 2)] });
            m.submit(V, A, MirrorOp::Append { records: vec![rec(3, 2, 3)] });
            m.forget_dead(2, &mut Rng::new(seed));
            let t = tags(&m);
            assert!(t.starts_with(&[1]), "the answered append is durable: {t:?}");
            assert!(t == [1] || t == [1, 2] || t == [1, 2, 3], "a prefix in order: {t:?}");
            kept[(t.len() > 1) as usize] += 1;
            assert_eq!(m.queued(V), 0);
            // The next incarnation's requests are not touched again.
            let mut rng = Rng::new(seed);
            let before = rng.clone().u64();
            m.forget_dead(2, &mut rng);
            assert_eq!(rng.u64(), before, "no draw when nothing is left");
        }
        assert!(kept[0] > 0 && kept[1] > 0, "both outcomes happen: {kept:?}");
    }

    #[test]
    fn a_replay_checks_the_generation_and_writes_the_newest_record_of_each_block() {
        let mut m = HostMirrors::default();
        let done = run(&mut m, A, MirrorOp::Replay { meta: meta(), expected: None, named_here: false, source: None });
        assert!(matches!(answer(&done), Ok(Response::Done)), "no file, nothing expected: {done:?}");
        let done = run(
            &mut m,
            A,
            MirrorOp::Replay { meta: meta(), expected: expected(2, "mds0"), named_here: false, source: None },
        );
        assert!(matches!(answer(&done), Err(e) if e.message.contains("has no mirror file")), "{done:?}");
        open(&mut m, A, 2);
        let records = vec![rec(1, 5, 1), rec(2, 6, 2), rec(3, 5, 3), rec(4, 9, 4)];
        run(&mut m, A, MirrorOp::Append { records });
        let done = run(
            &mut m,
            A,
            MirrorOp::Replay { meta: meta(), expected: expected(1, "mds1"), named_here: false, source: None },
        );
        assert!(
            matches!(answer(&done), Err(e) if e.message.contains("generation 1 by mds1") && e.message.contains("of generation 2")),
            "{done:?}"
        );
        assert_eq!(tags(&m).len(), 4, "a refused replay keeps the file");
        // The same generation, but the record names another server: this
        // file was prepared for a commit that did not happen (seed
        // 260647906676046 replayed it and lost the named server's writes).
        let done = run(
            &mut m,
            A,
            MirrorOp::Replay { meta: meta(), expected: expected(2, "mds1"), named_here: false, source: None },
        );
        assert!(
            matches!(answer(&done), Err(e) if e.message.contains("generation 2 by mds1")
                && e.message.contains("prepared here for a commit that did not happen")),
            "{done:?}"
        );
        assert_eq!(tags(&m).len(), 4, "a refused replay keeps the file");
        let id = m.submit(
            V,
            A,
            MirrorOp::Replay { meta: meta(), expected: expected(2, "mds0"), named_here: true, source: None },
        );
        let status = CacheStateInfo { cache: None, holder: None, mirroring: true, held_records: 0, held_bytes: 0 };
        let after = m.submit(V, A, MirrorOp::Status { known: status.clone() });
        let remove = m.submit(V, A, MirrorOp::Remove);
        assert!(m.complete(after, Some(A)).is_empty());
        assert!(m.complete(remove, Some(A)).is_empty());
        let done = m.complete(id, Some(A));
        let Some(Done::Replay(r)) = done.first() else { panic!("a replay: {done:?}") };
        let (writes, records) = (&r.writes, r.records);
        assert_eq!(records, 4);
        let b = BLOCK_BYTES;
        assert_eq!(
            writes,
            &vec![(5 * b, vec![Content::Tag(3), Content::Tag(2)]), (9 * b, vec![Content::Tag(4)])],
            "the later record of block 5 wins, neighbours are joined"
        );
        // While it runs, a status is answered at once; the rest waits.
        assert!(matches!(&done[1..], [Done::Answer { id, result: Ok(Response::VolumeCacheState(s)) }]
            if *id == after && !s.mirroring && s.held_records == 4));
        assert!(m.file(V).is_some());
        let done = m.replay_finished(V, Some(A));
        assert!(matches!(&done[..], [Done::Answer { id, result: Ok(Response::Done) }] if *id == remove));
        assert!(m.file(V).is_none());
    }

    #[test]
    fn staged_records_become_the_next_generation() {
        let mut m = HostMirrors::default();
        let stage = |copy, records| MirrorOp::Stage { copy, size_bytes: cache().size_bytes, records };
        let done = run(&mut m, A, stage(7, vec![rec(1, 0, 1), rec(2, 1, 2)]));
        assert!(matches!(answer(&done), Ok(Response::Mirrored { upto_seq: 2 })));
        let prepare =
            |copy, records| MirrorOp::Prepare { cache: cache(), generation: 5, staged: Some((copy, records)) };
        let done = run(&mut m, A, prepare(7, 3));
        assert!(matches!(answer(&done), Err(e) if e.message.contains("attempt 7 with 2 records")), "{done:?}");
        assert!(m.file(V).is_none(), "a refused start changes nothing");
        run(&mut m, A, stage(7, vec![rec(3, 2, 3)]));
        let done = run(&mut m, A, prepare(7, 3));
        assert!(matches!(answer(&done), Ok(Response::Done)));
        // Prepared before the commit: a replay of the generation before it,
        // recorded at this server, writes it.
        assert_eq!(m.file(V).unwrap().generation, Some(5));
        let plan = replay_plan(V, m.file(V), &meta(), expected(4, "mds0").as_ref(), true).unwrap();
        assert_eq!(plan.len(), 1, "blocks 0..3, joined: {plan:?}");
        assert!(replay_plan(V, m.file(V), &meta(), expected(4, "mds1").as_ref(), false).is_err(), "not at another's");
        assert!(replay_plan(V, m.file(V), &meta(), expected(3, "mds0").as_ref(), true).is_err(), "only the next one");
        let done = run(&mut m, A, MirrorOp::Open { cache: cache(), generation: 5 });
        assert!(matches!(answer(&done), Ok(Response::MirrorOpened { .. })));
        assert_eq!(m.file(V).unwrap().generation, Some(5));
        assert_eq!(tags(&m), vec![1, 2, 3]);
        let done = run(&mut m, A, MirrorOp::Append { records: vec![rec(4, 3, 4)] });
        assert!(matches!(answer(&done), Ok(Response::Mirrored { upto_seq: 4 })), "open after adopting: {done:?}");
        // Another attempt starts afresh; a new owner knows none.
        run(&mut m, A, stage(8, vec![rec(1, 0, 9)]));
        let done = run(&mut m, (1, 1), MirrorOp::Prepare { cache: cache(), generation: 6, staged: Some((8, 1)) });
        assert!(matches!(answer(&done), Err(e) if e.message.contains("staged: none")), "{done:?}");
    }
}
