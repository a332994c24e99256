//! One volume's mirror worker: takes the owner's requests in order, writes
//! appends queued together with one write + one fdatasync, holds appends
//! that do not fit until a release makes room (back-pressure, never an
//! error), and replays the mirror to the devices when asked.
//!
//! Fault point (`SANVOL_FAULT`, see `control_client::fault`):
//! `mds-after-mirror-prepare` — a new generation's file is prepared, its
//! commit not started (the owner hears of the preparation after it).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use blockio::IoError;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};
use volume_format::control::messages::{
    ControlError, ErrorCode, MirrorRecord, Response, MIRROR_APPEND_BYTES_MAX, MIRROR_APPEND_RECORDS_MAX,
};
use volume_format::metadata::CacheMirrorRecord;
use volume_format::VolumeId;

use super::inline::{self, InlineSync};
use super::lane::Lanes;
use super::replay::{self, Span};
use super::store::{self, StoreError, VolumeMirror};
use super::{MirrorOp, MirrorReply, MirrorWork, ReplayProgress, MIRROR_QUEUED_MAX};
use crate::server::metrics;
use crate::server::snapshot_io::DeviceClients;

/// Starts `volume`'s worker; it ends when the sender is dropped.
pub fn spawn(
    dir: PathBuf,
    devices: DeviceClients,
    volume: VolumeId,
    lanes: Arc<Lanes>,
    progress: Arc<ReplayProgress>,
) -> mpsc::Sender<MirrorWork> {
    let (tx, rx) = mpsc::channel(MIRROR_QUEUED_MAX);
    let worker = Worker {
        dir,
        devices,
        volume,
        lanes,
        progress,
        mirror: None,
        staged: None,
        prepared: None,
        waiting: VecDeque::new(),
        inline: InlineSync::default(),
    };
    tokio::spawn(worker.run(rx));
    tx
}

/// The records staged for the next generation (`MirrorOp::Stage`): one
/// attempt's, all durable in the staged file.
struct Staged {
    copy: u64,
    mirror: VolumeMirror,
    records: u64,
}

/// An append not yet (wholly) durable: `done` of its records are.
struct Pending {
    records: Vec<MirrorRecord>,
    done: usize,
    reply: MirrorReply,
}

struct Worker {
    dir: PathBuf,
    devices: DeviceClients,
    volume: VolumeId,
    /// What the owner published: checked for every lane request.
    lanes: Arc<Lanes>,
    /// This worker's replay, for status requests while it runs.
    progress: Arc<ReplayProgress>,
    mirror: Option<VolumeMirror>,
    /// What the holder staged for the next generation (in memory only: a
    /// restarted server has none, and the holder stages again).
    staged: Option<Staged>,
    /// The file prepared for a generation being committed
    /// ([`MirrorOp::Prepare`]), until [`MirrorOp::Open`] mirrors into it.
    prepared: Option<(u64, VolumeMirror)>,
    /// Appends in arrival order; only the first may be partly done.
    waiting: VecDeque<Pending>,
    /// Whether the next append runs on this worker's thread.
    inline: InlineSync,
}

fn failed(e: impl std::fmt::Display) -> ControlError {
    ControlError::new(ErrorCode::Internal, format!("{e}"))
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<MirrorWork>) {
        while let Some(work) = rx.recv().await {
            let mut works = vec![work];
            while let Ok(more) = rx.try_recv() {
                works.push(more);
            }
            for work in works {
                self.take(work).await;
            }
            // Everything that arrived together is queued: write it together.
            self.write_waiting().await;
        }
    }

    async fn take(&mut self, work: MirrorWork) {
        let MirrorWork { op, reply } = work;
        if let MirrorReply::Lane(lane) = &reply {
            // Checked now, not when the reader routed it (`super::lane`).
            if self.lanes.holder(lane.session, lane.handle.0) != Some(self.volume) {
                let msg = format!("handle {} is not held on this session", lane.handle);
                return reply.send(Err(ControlError::new(ErrorCode::HandleBroken, msg)));
            }
        }
        match op {
            MirrorOp::Append { records } => {
                if self.mirror.is_none() {
                    let msg = format!(
                        "volume {} is not being mirrored (the metadata server restarted, or mirroring was never \
                         started): start mirroring again",
                        self.volume
                    );
                    reply.send(Err(ControlError::new(ErrorCode::Unavailable, msg)));
                    return;
                }
                self.waiting.push_back(Pending { records, done: 0, reply });
            }
            MirrorOp::Release { upto_seq } => {
                // Appends before it are written first: the release may name them.
                self.write_waiting().await;
                let started = std::time::Instant::now();
                let result = match self.mirror.take() {
                    Some(mut mirror) => {
                        let (mirror, result) = blocking(move || {
                            let result = mirror.release(upto_seq);
                            (Some(mirror), result)
                        })
                        .await;
                        self.mirror = mirror;
                        result.map(|()| Response::Done).map_err(failed)
                    }
                    None => Ok(Response::Done),
                };
                tracing::debug!(release_us = started.elapsed().as_micros() as u64, "mirror release");
                reply.send(result);
            }
            MirrorOp::Prepare { cache, generation, staged } => {
                // A start that names no whole staged copy changes nothing:
                // the current generation goes on.
                if let Some((copy, records)) = staged {
                    if let Err(e) = self.staged_check(copy, records) {
                        return reply.send(Err(e));
                    }
                }
                self.drop_waiting("mirroring started again");
                self.mirror = None;
                self.prepared = None;
                let result = match staged {
                    Some((copy, records)) => self.adopt_staged(copy, records, generation).await,
                    None => self.create(cache, generation).await,
                };
                if result.is_ok() {
                    control_client::fault::hit("mds-after-mirror-prepare");
                }
                reply.send(result.map(|()| Response::Done));
            }
            MirrorOp::Stage { copy, size_bytes, records } => {
                let result = self.stage(copy, size_bytes, records).await;
                reply.send(result);
            }
            MirrorOp::Open { cache, generation } => {
                self.drop_waiting("mirroring started again");
                self.mirror = None;
                let result = match self.prepared.take() {
                    Some((g, mirror)) if g == generation => {
                        let (volume, records) = (self.volume, mirror.held_records());
                        if records > 0 {
                            info!(%volume, records, generation, "cache mirror started with the holder's staged records");
                        } else {
                            info!(%volume, size_bytes = cache.size_bytes, generation, "cache mirror started");
                        }
                        self.mirror = Some(mirror);
                        Ok(Response::MirrorOpened { cache: Some(cache) })
                    }
                    other => {
                        let had = other.map_or("none".into(), |(g, _)| format!("generation {g}"));
                        Err(ControlError::new(
                            ErrorCode::Unavailable,
                            format!(
                                "volume {}: the file of mirror generation {generation} is not prepared here (prepared: \
                                 {had}); start mirroring again",
                                self.volume
                            ),
                        ))
                    }
                };
                reply.send(result);
            }
            MirrorOp::Replay { meta, expected, named_here, source } => {
                // Appends not yet durable were never acknowledged: dropped.
                self.drop_waiting("the holder is gone; its mirror is being replayed");
                self.mirror = None;
                self.staged = None;
                self.prepared = None;
                let result = self.replay(&meta, expected.as_ref(), named_here, source.as_ref()).await;
                reply.send(result.map(|()| Response::Done));
            }
            MirrorOp::Status { mut known } => {
                // Appends queued before it are counted once written.
                self.write_waiting().await;
                known.mirroring = self.mirror.is_some();
                if let Some(mirror) = &self.mirror {
                    known.held_records = mirror.held_records() as u64;
                    known.held_bytes = mirror.held_bytes();
                }
                reply.send(Ok(Response::VolumeCacheState(known)));
            }
            MirrorOp::Remove => {
                self.drop_waiting("the volume's cache was removed");
                self.mirror = None;
                self.staged = None;
                self.prepared = None;
                let path = store::mirror_path(&self.dir, self.volume);
                let staged = store::staged_path(&self.dir, self.volume);
                let (_, result) = blocking(move || {
                    (None::<VolumeMirror>, store::remove(&staged).and_then(|()| store::remove(&path)))
                })
                .await;
                reply.send(result.map(|()| Response::Done).map_err(failed));
            }
        }
    }

    /// Appends `records` to the staged file of attempt `copy` (started
    /// afresh, `size_bytes` large, for a new attempt), durably; answered
    /// `Mirrored` with the last record's sequence number. Every record must
    /// fit: the holder stages only what its log of the same size holds.
    async fn stage(
        &mut self,
        copy: u64,
        size_bytes: u64,
        records: Vec<MirrorRecord>,
    ) -> Result<Response, ControlError> {
        let (volume, dir) = (self.volume, self.dir.clone());
        let staged = self.staged.take().filter(|s| s.copy == copy);
        let last = records.last().map_or(0, |r| r.seq);
        let joined = tokio::task::spawn_blocking(move || -> Result<Staged, StoreError> {
            let mut staged = match staged {
                Some(staged) => staged,
                None => {
                    std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
                        path: dir.display().to_string(),
                        what: "create",
                        source,
                    })?;
                    let path = store::staged_path(&dir, volume);
                    Staged { copy, mirror: VolumeMirror::create(&path, volume, size_bytes, 0)?, records: 0 }
                }
            };
            let taken = staged.mirror.append(records.iter())?;
            if taken < records.len() {
                return Err(StoreError::Io {
                    path: store::staged_path(&dir, volume).display().to_string(),
                    what: "stage the holder's records",
                    source: std::io::Error::other(format!(
                        "{} of {} records do not fit the volume's {size_bytes}-byte mirror",
                        records.len() - taken,
                        records.len()
                    )),
                });
            }
            staged.records += taken as u64;
            Ok(staged)
        })
        .await;
        match joined {
            Ok(Ok(staged)) => {
                self.staged = Some(staged);
                Ok(Response::Mirrored { upto_seq: last })
            }
            Ok(Err(e)) => Err(failed(e)),
            Err(e) => Err(failed(format!("staging the holder's records: {e}"))),
        }
    }

    /// Starts the file of `generation` afresh (empty), prepared for it.
    async fn create(
        &mut self,
        cache: volume_format::metadata::VolumeCache,
        generation: u64,
    ) -> Result<(), ControlError> {
        let path = store::mirror_path(&self.dir, self.volume);
        let (volume, dir) = (self.volume, self.dir.clone());
        let created = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|source| StoreError::Io { path: dir.display().to_string(), what: "create", source })
                .and_then(|()| VolumeMirror::create(&path, volume, cache.size_bytes, generation))
        })
        .await;
        match created {
            Ok(Ok(mirror)) => {
                self.prepared = Some((generation, mirror));
                Ok(())
            }
            Ok(Err(e)) => Err(failed(e)),
            Err(e) => Err(failed(format!("creating the mirror file: {e}"))),
        }
    }

    /// Makes the staged file of attempt `copy`, holding `records` records,
    /// the file of `generation`, prepared for it (see [`VolumeMirror::adopt`]).
    async fn adopt_staged(&mut self, copy: u64, records: u64, generation: u64) -> Result<(), ControlError> {
        self.staged_check(copy, records)?;
        let staged = self.staged.take().expect("checked above");
        let (volume, dir) = (self.volume, self.dir.clone());
        let joined = tokio::task::spawn_blocking(move || -> Result<VolumeMirror, StoreError> {
            let mut mirror = staged.mirror;
            mirror.adopt(&store::staged_path(&dir, volume), &store::mirror_path(&dir, volume), volume, generation)?;
            Ok(mirror)
        })
        .await;
        match joined {
            Ok(Ok(mirror)) => {
                info!(volume = %self.volume, records, generation, "cache mirror file prepared with the holder's staged records");
                self.prepared = Some((generation, mirror));
                Ok(())
            }
            Ok(Err(e)) => Err(failed(e)),
            Err(e) => Err(failed(format!("adopting the staged mirror file: {e}"))),
        }
    }

    /// Whether the staged file is the whole copy of attempt `copy`.
    fn staged_check(&self, copy: u64, records: u64) -> Result<(), ControlError> {
        match &self.staged {
            Some(s) if s.copy == copy && s.records == records => Ok(()),
            other => {
                let had = other
                    .as_ref()
                    .map_or("none".into(), |s| format!("attempt {:x} with {} records", s.copy, s.records));
                Err(ControlError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "volume {}: no whole staged copy of attempt {copy:x} ({records} records) here (staged: \
                         {had}); stage the records again",
                        self.volume
                    ),
                ))
            }
        }
    }

    fn drop_waiting(&mut self, why: &str) {
        for pending in self.waiting.drain(..) {
            let msg = format!("not mirrored: {why}");
            pending.reply.send(Err(ControlError::new(ErrorCode::Unavailable, msg)));
        }
    }

    /// Writes the waiting appends, as many as fit, in batches of bounded
    /// size; answers each append once all its records are durable.
    async fn write_waiting(&mut self) {
        while !self.waiting.is_empty() {
            let Some(mut mirror) = self.mirror.take() else {
                return self.drop_waiting("mirroring stopped");
            };
            // The waiting appends go to the writing thread and come back:
            // their records are written from where they are, not copied.
            let waiting = std::mem::take(&mut self.waiting);
            let started = std::time::Instant::now();
            let allowed = self.inline.allows(inline::runtime_threads(), started);
            let joined = inline::synced(&inline::PROCESS_SLOT, allowed, move || {
                let records = || waiting.iter().flat_map(|p| &p.records[p.done..]);
                let mut bytes = 0;
                let count = records()
                    .take(MIRROR_APPEND_RECORDS_MAX)
                    .take_while(|record| {
                        let fits = bytes < MIRROR_APPEND_BYTES_MAX;
                        bytes += record.data.len();
                        fits
                    })
                    .count();
                let batch = records().take(count);
                let result = mirror.append(batch);
                (mirror, waiting, result)
            })
            .await;
            let (result, inline) = match joined {
                Ok(((mirror, waiting, result), inline)) => {
                    self.mirror = Some(mirror);
                    self.waiting = waiting;
                    (result, inline)
                }
                // A panic in the file code: the appends' replies are gone
                // with it (their holders hear the request failed) and
                // mirroring stops.
                Err(e) => return warn!(volume = %self.volume, "cache mirror append failed: {e}"),
            };
            let took = started.elapsed();
            tracing::debug!(append_us = took.as_micros() as u64, inline, "mirror append");
            if inline && self.inline.ran_inline(took, std::time::Instant::now()) {
                info!(
                    volume = %self.volume,
                    took_ms = took.as_millis() as u64,
                    "a mirror append on the worker's thread was slow: the next ones are handed off for {} s",
                    inline::INLINE_PAUSE.as_secs()
                );
            }
            let mut taken = match result {
                Ok(0) => return, // full: wait for a release
                Ok(taken) => taken,
                Err(e) => {
                    // Mirroring stops: the holder hears so and starts again.
                    self.mirror = None;
                    warn!(volume = %self.volume, "cache mirror append failed: {e}");
                    let e = failed(e);
                    for pending in self.waiting.drain(..) {
                        pending.reply.send(Err(e.clone()));
                    }
                    return;
                }
            };
            while taken > 0 {
                let front = self.waiting.front_mut().expect("taken records came from waiting appends");
                let n = (front.records.len() - front.done).min(taken);
                front.done += n;
                taken -= n;
                if front.done == front.records.len() {
                    let pending = self.waiting.pop_front().expect("front");
                    let upto_seq = pending.records.last().map_or(0, |r| r.seq);
                    pending.reply.send(Ok(Response::Mirrored { upto_seq }));
                }
            }
            // Empty appends are answered at once.
            while self.waiting.front().is_some_and(|p| p.done == p.records.len()) {
                let pending = self.waiting.pop_front().expect("front");
                let upto_seq = pending.records.last().map_or(0, |r| r.seq);
                pending.reply.send(Ok(Response::Mirrored { upto_seq }));
            }
        }
    }

    /// Writes the file's records to the devices, in order, when `expected`
    /// names this server (`named_here`) and the file is of its generation
    /// or the one after it (prepared here, never committed: see
    /// [`MirrorOp::Prepare`]) — or, with `None`, a pool that never
    /// recorded one: whatever the file holds. The file stays: the owner
    /// records "nothing pending" next, and a file of an older generation is
    /// never replayed again (a crash before that record replays it again,
    /// harmlessly: nobody wrote the volume since).
    ///
    /// Recorded at another server that can be reached (`source`), the file
    /// is fetched from it and the copy replayed instead ([`super::fetch`]).
    async fn replay(
        &mut self,
        meta: &volume_format::metadata::PoolMetadata,
        expected: Option<&CacheMirrorRecord>,
        named_here: bool,
        source: Option<&super::fetch::MirrorSource>,
    ) -> Result<(), ControlError> {
        let volume = self.volume;
        let here = store::mirror_path(&self.dir, volume);
        let (Some(recorded), Some(source), false) = (expected, source, named_here) else {
            return self.replay_file(meta, expected, named_here, None, &here).await;
        };
        let copy = store::fetched_path(&self.dir, volume);
        let generation = recorded.generation;
        let fetched = super::fetch::fetch(source, volume, generation, &copy).await;
        metrics::mirror_fetched(fetched.as_ref().ok().copied());
        let result = match fetched {
            Ok(bytes) => {
                info!(volume = %volume, from = %source.server, bytes, generation, "fetched the cache mirror recorded at another server");
                self.replay_file(meta, expected, true, None, &copy).await
            }
            Err(e) => {
                warn!(volume = %volume, "{e}");
                self.replay_file(meta, expected, false, Some(e), &here).await
            }
        };
        // Replayed or not, the copy goes (a failed replay fetches it again).
        let _ = tokio::fs::remove_file(&copy).await;
        result
    }

    /// [`Worker::replay`] of the file at `path`, of the named server's
    /// (`named_here`: here, or fetched from it).
    async fn replay_file(
        &mut self,
        meta: &volume_format::metadata::PoolMetadata,
        expected: Option<&CacheMirrorRecord>,
        named_here: bool,
        fetch_failed: Option<String>,
        path: &std::path::Path,
    ) -> Result<(), ControlError> {
        let devices = &self.devices;
        let volume = self.volume;
        let read_path = path.to_path_buf();
        let (_, held) = blocking(move || (None::<VolumeMirror>, store::read_index(&read_path, volume))).await;
        let held = held.map_err(|e| {
            metrics::replay_unreadable();
            ControlError::new(
                ErrorCode::Unavailable,
                format!("reading the cache mirror of volume {volume} failed: {e}; the volume cannot be opened until it is fixed"),
            )
        })?;
        if let Some(expected) = expected {
            if !super::replayable(held.generation, expected.generation, named_here) {
                let server = if expected.server.is_empty() { "another metadata server" } else { &expected.server };
                let here = super::not_replayable_here(held.generation, expected.generation, server, path);
                let fetch = match fetch_failed {
                    Some(e) => format!("; {e}"),
                    None => String::new(),
                };
                return Err(ControlError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the writes its last holder acknowledged are mirrored at generation {} by {server}, and {here}{fetch}; \
                         make {server} the active server again (it replays them), or start the last holder's agent \
                         again (resuming its handle, it writes its own log to the devices); if both are lost for \
                         good, `sanvol volume cache {volume_name} --forget-mirror` gives up those writes",
                        expected.generation,
                        volume_name = meta.volume(volume).map_or_else(|| volume.to_string(), |v| v.name.clone()),
                    ),
                ));
            }
        }
        let count = held.records.len();
        let spans =
            held.records.iter().enumerate().map(|(record, &(offset, len))| (offset, Span { record, skip: 0, len }));
        let writes = replay::final_pieces(spans, replay::REPLAY_WRITE_BYTES_MAX);
        let total = writes.len();
        let generation = held.generation;
        let held = Arc::new(held);
        if count == 0 {
            return Ok(());
        }
        // Opens (and snapshots) of the volume wait for it: say so.
        info!(volume = %volume, records = count, writes = total, "replaying the cache mirror to the devices");
        let counted = metrics::Replay::start();
        let record_bytes = held.records.iter().map(|&(_, len)| len as u64).sum();
        self.progress.started(count as u64, record_bytes);
        let _running = ReplayRunning(&self.progress);
        let mut said = tokio::time::Instant::now();
        let mut sent = futures::stream::iter(writes)
            .map(|(offset, parts)| {
                let held = held.clone();
                async move {
                    // Read from the file as it is sent: at most the writes
                    // in flight are in memory.
                    let data = tokio::task::spawn_blocking(move || held.read(&parts))
                        .await
                        .map_err(|e| IoError::io(format!("reading the mirror file: {e}")))?
                        .map_err(|e| IoError::io(e.to_string()))?;
                    let len = data.len() as u64;
                    devices.write_live(meta, volume, offset, Bytes::from(data)).await.map(|()| len)
                }
            })
            .buffer_unordered(replay::REPLAY_WRITES_IN_FLIGHT);
        let (mut done, mut bytes) = (0, 0);
        while let Some(result) = sent.next().await {
            match result {
                Ok(len) => bytes += len,
                Err(e) => {
                    counted.done(bytes, false);
                    return Err(ControlError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "replaying the cache mirror of volume {volume} to its devices failed after {done} of \
                             {total} writes ({count} records; {e}); the mirror is kept and the replay is retried at \
                             the next open"
                        ),
                    ));
                }
            }
            done += 1;
            if said.elapsed() >= REPLAY_PROGRESS_EVERY {
                said = tokio::time::Instant::now();
                info!(volume = %volume, done, writes = total, "cache mirror replay in progress");
            }
        }
        // Everything is on the devices (each write with FUA).
        counted.done(bytes, true);
        info!(volume = %volume, records = count, writes = total, generation = ?generation, "cache mirror replayed to the devices");
        Ok(())
    }
}

/// How often a long replay logs how far it got.
const REPLAY_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Marks the replay ended when dropped (done, failed or cut short).
struct ReplayRunning<'a>(&'a ReplayProgress);

impl Drop for ReplayRunning<'_> {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// Runs a file operation on the blocking pool; the mirror (if any) comes
/// back with its result.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> (Option<VolumeMirror>, Result<T, StoreError>) + Send + 'static,
) -> (Option<VolumeMirror>, Result<T, StoreError>) {
    match tokio::task::spawn_blocking(f).await {
        Ok(x) => x,
        Err(e) => (
            None,
            Err(StoreError::Io {
                path: String::new(),
                what: "run a file operation",
                source: std::io::Error::other(e.to_string()),
            }),
        ),
    }
}
