//! Making backups: `full` and `incremental`.
//!
//! Both first decide, per 64 KiB chunk, whether to skip it, record it as
//! zero, or read it — from `base:allocation` (holes and zero ranges) and,
//! for an incremental, `sanvol:changed-since:OLD` — then read the chunks
//! to read in requests of up to 1 MiB with several in flight (`buffered`
//! keeps them in order), and hand them to a blocking writer thread that
//! checksums them, stores all-zero chunks as zero entries and appends the
//! rest to the data file. The backup is written in a temporary directory
//! and moved into place only when complete (see [`crate::repo`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockio::proto::STATE_ZERO;
use blockio::MetaContext;
use bytes::Bytes;
use futures::StreamExt;
use volume_format::control::messages::{changed_context_name, CHANGED_FLAG};

use crate::progress::{fmt_bytes, mib_per_sec, Progress, ProgressMode};
use crate::repo::{chunk_count, chunk_len, now_secs, rfc3339, Kind, Manifest, Repo, Staging, CHUNK_BYTES};
use crate::source::{SnapshotReader, SnapshotRef, Source};
use crate::verify::{self, Depth};

/// Tuning of the data movement.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// NBD connections to the snapshot (or the restore target).
    pub connections: usize,
    /// Requests in flight.
    pub queue_depth: usize,
    /// Bytes per read or write request (a multiple of 64 KiB).
    pub request_bytes: u32,
    pub progress: ProgressMode,
}

impl Default for JobOptions {
    fn default() -> JobOptions {
        JobOptions { connections: 2, queue_depth: 8, request_bytes: 1 << 20, progress: ProgressMode::Auto }
    }
}

impl JobOptions {
    fn request_chunks(&self) -> u64 {
        (self.request_bytes as u64 / CHUNK_BYTES).max(1)
    }
}

/// What a finished backup reports.
#[derive(Debug, Clone)]
pub struct BackupSummary {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// Chunks the changed-block list (incremental) or the volume (full) named.
    pub chunks_considered: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for BackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.manifest;
        let secs = self.elapsed.as_secs_f64();
        let what = match m.kind {
            Kind::Full => format!("full backup of {}", m.export()),
            Kind::Incremental => {
                format!("incremental backup of {} since {}", m.export(), m.since.as_deref().unwrap_or("?"))
            }
        };
        write!(
            f,
            "{what} done: {} volume, {} chunks {}, {} data chunks stored ({}), {} zero chunks; {} read in {secs:.2} s ({:.1} MiB/s) -> {}",
            fmt_bytes(m.size_bytes),
            self.chunks_considered,
            if m.kind == Kind::Full { "in all" } else { "changed" },
            m.data_chunks,
            fmt_bytes(m.data_bytes),
            m.zero_chunks,
            fmt_bytes(m.bytes_read),
            mib_per_sec(m.bytes_read, secs),
            self.path.display()
        )
    }
}

/// A set of chunks.
struct ChunkSet {
    bits: Vec<u64>,
    len: u64,
}

impl ChunkSet {
    fn new(len: u64, all: bool) -> ChunkSet {
        let words = len.div_ceil(64) as usize;
        ChunkSet { bits: vec![if all { u64::MAX } else { 0 }; words], len }
    }

    fn set_range(&mut self, from: u64, to: u64) {
        for c in from..to.min(self.len) {
            self.bits[(c / 64) as usize] |= 1 << (c % 64);
        }
    }

    fn get(&self, c: u64) -> bool {
        c < self.len && self.bits[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    fn count(&self) -> u64 {
        (0..self.len).filter(|&c| self.get(c)).count() as u64
    }
}

/// Largest block-status request.
const STATUS_REQUEST_BYTES: u64 = 1 << 30;

/// The chunks overlapping a range whose flags satisfy `pick`, under `context`.
async fn scan(
    reader: &SnapshotReader,
    context: &MetaContext,
    size: u64,
    pick: impl Fn(u32) -> bool,
) -> Result<ChunkSet> {
    let mut set = ChunkSet::new(chunk_count(size, CHUNK_BYTES), false);
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(STATUS_REQUEST_BYTES) as u32;
        let extents = reader.block_status(context, off, len).await?;
        let mut at = off;
        for e in extents {
            let end = (at + e.length).min(off + len as u64);
            if end > at && pick(e.flags) {
                set.set_range(at / CHUNK_BYTES, end.div_ceil(CHUNK_BYTES));
            }
            at = end;
        }
        if at == off {
            bail!("{}: the server answered block status at offset {off} with no extent", reader.export);
        }
        off = at;
    }
    Ok(set)
}

/// Chunks that may hold data (not entirely in zero ranges), or `None` if
/// the server gives no allocation information.
async fn data_chunks(reader: &SnapshotReader, size: u64) -> Result<Option<ChunkSet>> {
    if !reader.has_context(MetaContext::BASE_ALLOCATION) {
        tracing::info!(export = %reader.export, "no base:allocation: reading every chunk");
        return Ok(None);
    }
    match scan(reader, &MetaContext::BaseAllocation, size, |flags| flags & STATE_ZERO == 0).await {
        Ok(set) => Ok(Some(set)),
        Err(e) => {
            tracing::warn!("{e:#}; reading every chunk instead");
            Ok(None)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Skip,
    Zero,
    Read,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Zero { chunk: u64, count: u64 },
    Read { chunk: u64, count: u64 },
}

/// Groups runs of chunks with the same action into operations.
fn plan(chunks: u64, request_chunks: u64, action: impl Fn(u64) -> Action) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut c = 0;
    while c < chunks {
        let a = action(c);
        let max = match a {
            Action::Read => request_chunks,
            _ => u64::MAX,
        };
        let mut n = 1;
        while c + n < chunks && n < max && action(c + n) == a {
            n += 1;
        }
        match a {
            Action::Skip => {}
            Action::Zero => ops.push(Op::Zero { chunk: c, count: n }),
            Action::Read => ops.push(Op::Read { chunk: c, count: n }),
        }
        c += n;
    }
    ops
}

enum Item {
    Zero { chunk: u64, count: u64 },
    Data { chunk: u64, bytes: Bytes },
}

/// Reads the planned chunks and writes them into `staging`; returns it and
/// the bytes read.
async fn run(
    reader: &SnapshotReader,
    mut staging: Staging,
    ops: Vec<Op>,
    size: u64,
    opts: &JobOptions,
    progress: &Progress,
) -> Result<(Staging, u64)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Item>(opts.queue_depth.max(1) * 2);
    let writer = tokio::task::spawn_blocking(move || -> Result<Staging> {
        while let Some(item) = rx.blocking_recv() {
            match item {
                Item::Zero { chunk, count } => staging.add_zero(chunk, count)?,
                Item::Data { chunk, bytes } => {
                    staging.add_chunks(chunk, &bytes)?;
                }
            }
        }
        Ok(staging)
    });
    let produce = async move {
        let mut bytes_read = 0u64;
        let reads = futures::stream::iter(ops)
            .map(|op| async move {
                match op {
                    Op::Zero { chunk, count } => Ok::<_, anyhow::Error>((Item::Zero { chunk, count }, 0u64, count)),
                    Op::Read { chunk, count } => {
                        let offset = chunk * CHUNK_BYTES;
                        let len = ((chunk + count) * CHUNK_BYTES).min(size) - offset;
                        let bytes = reader.read(offset, len as u32).await?;
                        if bytes.len() as u64 != len {
                            bail!("{}: asked for {len} bytes at {offset}, got {}", reader.export, bytes.len());
                        }
                        Ok((Item::Data { chunk, bytes }, len, count))
                    }
                }
            })
            .buffered(opts.queue_depth.max(1));
        futures::pin_mut!(reads);
        while let Some(r) = reads.next().await {
            let (item, read, count) = r?;
            let done = match &item {
                Item::Zero { chunk, count } => ((chunk + count) * CHUNK_BYTES).min(size) - chunk * CHUNK_BYTES,
                Item::Data { .. } => read,
            };
            bytes_read += read;
            if tx.send(item).await.is_err() {
                // The writer failed; its error is reported below.
                break;
            }
            progress.add(done, count);
        }
        Ok::<u64, anyhow::Error>(bytes_read)
    };
    let produced = produce.await;
    let written = writer.await.map_err(|e| anyhow!("the backup writer thread failed: {e}"))?;
    let bytes_read = produced?;
    let staging = written?;
    Ok((staging, bytes_read))
}

fn draft(kind: Kind, sequence: u64, snap: &SnapshotRef, since: Option<&str>, parent: Option<&str>) -> Manifest {
    let created = now_secs();
    Manifest {
        format: String::new(),
        id: uuid::Uuid::new_v4().to_string(),
        sequence,
        kind,
        volume: snap.volume.clone(),
        snapshot: snap.snapshot.clone(),
        since: since.map(str::to_string),
        parent: parent.map(str::to_string),
        size_bytes: 0,
        chunk_bytes: CHUNK_BYTES,
        data_chunks: 0,
        zero_chunks: 0,
        data_bytes: 0,
        index_entries: 0,
        index_bytes: 0,
        index_crc32c: 0,
        bytes_read: 0,
        created_unix_secs: created,
        created: rfc3339(created),
        duration_ms: 0,
        tool: String::new(),
        manifest_crc32c: 0,
    }
}

/// A full backup of `snap` into `dir`: starts a new chain. `dir` must not
/// hold backups yet, unless `force`, which replaces its chain once the new
/// backup is complete.
pub async fn full(
    source: &Source,
    snap: &SnapshotRef,
    dir: &Path,
    force: bool,
    opts: &JobOptions,
) -> Result<BackupSummary> {
    let repo = Repo::open_write(dir, true)?;
    let existing = repo.scan()?.backups;
    if !existing.is_empty() && !force {
        bail!(
            "{} already holds a backup chain ({}, the newest {}); a full backup starts a new chain: \
             use an empty or new directory, add an incremental with `sanvol-backup incremental`, or pass --force \
             to replace the chain once the new full backup is complete",
            dir.display(),
            crate::verify::count(existing.len(), "backup"),
            existing.last().map(|b| b.name.as_str()).unwrap_or("?")
        );
    }
    let export = snap.export();
    let reader = source.open(&export, &[MetaContext::BASE_ALLOCATION.to_string()], opts.connections).await?;
    let result = full_inner(&repo, &reader, snap, &existing, opts).await;
    reader.close().await;
    result
}

async fn full_inner(
    repo: &Repo,
    reader: &SnapshotReader,
    snap: &SnapshotRef,
    existing: &[crate::repo::BackupDir],
    opts: &JobOptions,
) -> Result<BackupSummary> {
    let size = reader.size();
    let chunks = chunk_count(size, CHUNK_BYTES);
    let data = data_chunks(reader, size).await?;
    let ops = plan(chunks, opts.request_chunks(), |c| match &data {
        Some(set) if !set.get(c) => Action::Zero,
        _ => Action::Read,
    });
    let progress = Progress::new(opts.progress, format!("full {snap}"), size);
    let staging = repo.stage(size)?;
    let (staging, bytes_read) = run(reader, staging, ops, size, opts, &progress).await?;
    progress.finish();
    let m = draft(Kind::Full, 1, snap, None, None);
    seal(repo, staging, m, bytes_read, &progress, existing, chunks).await
}

/// Finishes the staged backup with manifest `m` and moves it into the
/// repository (replacing `replace`, for a full backup with --force).
async fn seal(
    repo: &Repo,
    staging: Staging,
    mut m: Manifest,
    bytes_read: u64,
    progress: &Progress,
    replace: &[crate::repo::BackupDir],
    chunks_considered: u64,
) -> Result<BackupSummary> {
    m.bytes_read = bytes_read;
    m.duration_ms = progress.elapsed().as_millis() as u64;
    let staged = tokio::task::spawn_blocking(move || staging.finish(m))
        .await
        .map_err(|e| anyhow!("finishing the backup failed: {e}"))??;
    let manifest = staged.manifest.clone();
    let path = repo.commit(staged, replace)?;
    Ok(BackupSummary { path, manifest, chunks_considered, elapsed: progress.elapsed() })
}

/// An incremental backup of `snap` with the chunks written since snapshot
/// `since`, appended to the chain in `dir`, whose newest backup must be of
/// `VOLUME@since`.
pub async fn incremental(
    source: &Source,
    snap: &SnapshotRef,
    since: &str,
    dir: &Path,
    opts: &JobOptions,
) -> Result<BackupSummary> {
    if since == snap.snapshot {
        bail!("--since {since} is the snapshot being backed up; give the older snapshot the last backup was made of");
    }
    if !dir.is_dir() {
        bail!(
            "{} does not exist; an incremental continues a chain: start it with `sanvol-backup full {}@{since} --to {}`",
            dir.display(),
            snap.volume,
            dir.display()
        );
    }
    let repo = Repo::open_write(dir, false)?;
    let dir_owned = dir.to_path_buf();
    let report =
        tokio::task::spawn_blocking(move || verify::check(&dir_owned, None, Depth::Structure, ProgressMode::Quiet))
            .await
            .map_err(|e| anyhow!("checking the chain failed: {e}"))??;
    if !report.is_ok() {
        let mut msg = format!("the backup chain in {} is damaged, so nothing can be added to it:", dir.display());
        for p in report.problems.iter().take(5) {
            msg.push_str(&format!("\n  {p}"));
        }
        msg.push_str(
            "\nrun `sanvol-backup verify` on it, and start a new chain with a full backup in another directory",
        );
        bail!(msg);
    }
    let last = report.backups.last().ok_or_else(|| anyhow!("internal: a checked chain without backups"))?;
    let lm = &last.manifest;
    if lm.volume != snap.volume || lm.snapshot != since {
        bail!(
            "the newest backup in {} is of {}, not of {}@{since}: an incremental must continue the chain \
             (use --since {} for volume {}, or start a new chain with a full backup in another directory)",
            dir.display(),
            lm.export(),
            snap.volume,
            lm.snapshot,
            lm.volume
        );
    }
    let export = snap.export();
    let changed_ctx = changed_context_name(since);
    let reader = source
        .open(&export, &[MetaContext::BASE_ALLOCATION.to_string(), changed_ctx.clone()], opts.connections)
        .await?;
    let result = incremental_inner(&repo, &reader, snap, lm, &changed_ctx, opts).await;
    reader.close().await;
    result
}

async fn incremental_inner(
    repo: &Repo,
    reader: &SnapshotReader,
    snap: &SnapshotRef,
    last: &Manifest,
    changed_ctx: &str,
    opts: &JobOptions,
) -> Result<BackupSummary> {
    if !reader.has_context(changed_ctx) {
        bail!(
            "snapshot {} does not offer the changed-block list {changed_ctx}: is {} an older snapshot of the same \
             volume, and does it still exist? (`sanvol-backup snapshots {}` lists them; if it was deleted, start a \
             new chain with a full backup)",
            reader.export,
            last.snapshot,
            snap.volume
        );
    }
    let size = reader.size();
    if size < last.size_bytes {
        bail!(
            "{} is {size} bytes, smaller than {} ({} bytes): a chain cannot express a shrunk volume; make a full backup",
            reader.export,
            last.export(),
            last.size_bytes
        );
    }
    let chunks = chunk_count(size, CHUNK_BYTES);
    let mut changed = scan(reader, &MetaContext::Custom(changed_ctx.to_string()), size, |f| f & CHANGED_FLAG != 0)
        .await
        .context("reading the changed-block list")?;
    // Growth: everything from the chunk holding the old end on is new.
    changed.set_range(last.size_bytes / CHUNK_BYTES, chunks);
    let data = data_chunks(reader, size).await?;
    let considered = changed.count();
    let ops = plan(chunks, opts.request_chunks(), |c| match (changed.get(c), &data) {
        (false, _) => Action::Skip,
        (true, Some(set)) if !set.get(c) => Action::Zero,
        (true, _) => Action::Read,
    });
    let total: u64 = (0..chunks).filter(|&c| changed.get(c)).map(|c| chunk_len(c, size)).sum();
    let progress = Progress::new(opts.progress, format!("incremental {snap} since {}", last.snapshot), total);
    let staging = repo.stage(size)?;
    let (staging, bytes_read) = run(reader, staging, ops, size, opts, &progress).await?;
    progress.finish();
    let m = draft(Kind::Incremental, last.sequence + 1, snap, Some(&last.snapshot), Some(&last.id));
    seal(repo, staging, m, bytes_read, &progress, &[], considered).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_groups_runs_and_caps_reads() {
        let actions =
            [Action::Read, Action::Read, Action::Read, Action::Zero, Action::Zero, Action::Skip, Action::Read];
        let ops = plan(actions.len() as u64, 2, |c| actions[c as usize]);
        let got: Vec<String> = ops
            .iter()
            .map(|op| match op {
                Op::Zero { chunk, count } => format!("z{chunk}+{count}"),
                Op::Read { chunk, count } => format!("r{chunk}+{count}"),
            })
            .collect();
        assert_eq!(got, ["r0+2", "r2+1", "z3+2", "r6+1"]);
    }

    #[test]
    fn chunk_set_ranges() {
        let mut s = ChunkSet::new(130, false);
        s.set_range(63, 66);
        s.set_range(129, 500);
        assert!(!s.get(62) && s.get(63) && s.get(65) && !s.get(66) && s.get(129) && !s.get(130));
        assert_eq!(s.count(), 4);
    }
}
