//! `restore`: writes the state of a snapshot, as recorded by a chain (the
//! full backup plus the incrementals up to `--upto`), to any NBD export.
//!
//! Order of events: the whole chain up to `--upto` is verified first, every
//! data chunk included (a damaged chain is reported and nothing is
//! written); then the target is opened and must be writable and at least as
//! large as the snapshot; then, for every chunk, the newest backup that
//! holds it supplies it — data chunks as writes of up to 1 MiB, zero runs
//! as WRITE_ZEROES (the client falls back to writing zeroes when the export
//! lacks it) — with several requests in flight; then a flush. Bytes of the
//! target past the snapshot's size are left as they were.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::{BlockDevice, ZeroFlags};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::job::JobOptions;
use crate::progress::{fmt_bytes, mib_per_sec, Progress};
use crate::repo::{chunk_count, chunk_len, EntryKind, Manifest, CHUNK_BYTES, DATA_FILE};
use crate::source::REQUEST_TIMEOUT;
use crate::verify::{self, Checked, Depth};

/// Largest WRITE_ZEROES request (a multiple of the chunk size).
const ZERO_REQUEST_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct RestoreSummary {
    pub target: String,
    /// The newest backup restored.
    pub restored: Manifest,
    pub backups_applied: usize,
    pub data_chunks: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub target_size: u64,
    pub verify_elapsed: Duration,
    pub elapsed: Duration,
}

impl std::fmt::Display for RestoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "restore of {} ({}) to {} done: {} written ({} data chunks), {} zeroed, in {secs:.2} s \
             ({:.1} MiB/s) after {:.2} s of verification",
            self.restored.export(),
            verify::count(self.backups_applied, "backup"),
            self.target,
            fmt_bytes(self.data_bytes),
            self.data_chunks,
            fmt_bytes(self.zero_bytes),
            mib_per_sec(self.data_bytes + self.zero_bytes, secs),
            self.verify_elapsed.as_secs_f64()
        )?;
        if self.target_size > self.restored.size_bytes {
            write!(
                f,
                "; the target's last {} (past the snapshot's size) were left as they were",
                fmt_bytes(self.target_size - self.restored.size_bytes)
            )?;
        }
        Ok(())
    }
}

/// One chunk's bytes in a backup's data file.
#[derive(Debug, Clone, Copy)]
struct Piece {
    backup: usize,
    chunk: u64,
    file_offset: u64,
    len: u32,
    crc: u32,
}

#[derive(Debug)]
enum WriteOp {
    Zero { offset: u64, len: u64 },
    Data { offset: u64, pieces: Vec<Piece> },
}

/// For every chunk, the newest backup holding it; runs merged into writes.
fn plan(chain: &[Checked], request_chunks: u64) -> Result<Vec<WriteOp>> {
    let last = chain.last().ok_or_else(|| anyhow!("nothing to restore"))?;
    let size = last.manifest.size_bytes;
    let chunks = chunk_count(size, CHUNK_BYTES);
    let mut cursors = vec![0usize; chain.len()];
    let mut ops: Vec<WriteOp> = Vec::new();
    for c in 0..chunks {
        let mut found = None;
        for b in (0..chain.len()).rev() {
            let entries = &chain[b].entries;
            let i = &mut cursors[b];
            while *i < entries.len() && entries[*i].end() <= c {
                *i += 1;
            }
            if let Some(e) = entries.get(*i).filter(|e| e.chunk <= c) {
                found = Some((b, *e));
                break;
            }
        }
        let Some((b, e)) = found else {
            bail!("internal: no backup in the chain holds chunk {c}, though the chain verified");
        };
        let offset = c * CHUNK_BYTES;
        let len = chunk_len(c, size);
        match e.kind {
            EntryKind::Zero => match ops.last_mut() {
                Some(WriteOp::Zero { offset: o, len: l }) if *o + *l == offset && *l + len <= ZERO_REQUEST_BYTES => {
                    *l += len
                }
                _ => ops.push(WriteOp::Zero { offset, len }),
            },
            EntryKind::Data => {
                if e.length as u64 != len {
                    bail!(
                        "backup {}: chunk {c} holds {} bytes, but the restored snapshot's chunk has {len}",
                        chain[b].dir.name,
                        e.length
                    );
                }
                let piece = Piece { backup: b, chunk: c, file_offset: e.offset, len: e.length, crc: e.crc32c };
                match ops.last_mut() {
                    Some(WriteOp::Data { offset: o, pieces })
                        if *o + pieces.iter().map(|p| p.len as u64).sum::<u64>() == offset
                            && (pieces.len() as u64) < request_chunks =>
                    {
                        pieces.push(piece)
                    }
                    _ => ops.push(WriteOp::Data { offset, pieces: vec![piece] }),
                }
            }
        }
    }
    Ok(ops)
}

/// Reads the pieces from the data files, checking every checksum again.
fn read_pieces(files: &[File], chain: &[Checked], pieces: &[Piece]) -> Result<Bytes> {
    let total: usize = pieces.iter().map(|p| p.len as usize).sum();
    let mut buf = BytesMut::zeroed(total);
    let mut at = 0usize;
    for p in pieces {
        let dst = &mut buf[at..at + p.len as usize];
        let name = &chain[p.backup].dir.name;
        files[p.backup]
            .read_exact_at(dst, p.file_offset)
            .with_context(|| format!("reading chunk {} from backup {name}", p.chunk))?;
        let crc = crc32c::crc32c(dst);
        if crc != p.crc {
            bail!(
                "backup {name}: chunk {} changed after it was verified (crc32c {crc:#010x}, expected {:#010x}); \
                 the target is partly written: fix or replace the repository and restore again",
                p.chunk,
                p.crc
            );
        }
        at += p.len as usize;
    }
    Ok(buf.freeze())
}

/// Restores the chain in `dir` (up to the newest backup of snapshot
/// `upto`, or all of it) to `target`.
pub async fn restore(dir: &Path, target: &NbdUri, upto: Option<&str>, opts: &JobOptions) -> Result<RestoreSummary> {
    let started = std::time::Instant::now();
    let (dir_owned, upto_owned, mode) = (dir.to_path_buf(), upto.map(str::to_string), opts.progress);
    let report =
        tokio::task::spawn_blocking(move || verify::check(&dir_owned, upto_owned.as_deref(), Depth::Data, mode))
            .await
            .map_err(|e| anyhow!("verifying the chain failed: {e}"))??;
    if !report.is_ok() {
        let mut msg = format!(
            "refusing to restore: the backup chain in {} is damaged ({}); nothing was written to {target}:",
            dir.display(),
            verify::count(report.problems.len(), "problem")
        );
        for p in report.problems.iter().take(10) {
            msg.push_str(&format!("\n  {p}"));
        }
        if report.problems.len() > 10 {
            msg.push_str(&format!(
                "\n  ... and {} more (`sanvol-backup verify` lists them all)",
                report.problems.len() - 10
            ));
        }
        bail!(msg);
    }
    let verify_elapsed = started.elapsed();
    let chain = Arc::new(report.backups);
    let last = chain.last().ok_or_else(|| anyhow!("nothing to restore"))?.manifest.clone();

    let client_opts = ClientOptions {
        connections: opts.connections,
        request_timeout: Some(REQUEST_TIMEOUT),
        meta_contexts: Vec::new(),
        ..ClientOptions::default()
    };
    let dev = NbdClient::connect(target, client_opts)
        .await
        .with_context(|| format!("opening the restore target {target}"))?;
    let result = restore_to(&dev, target, chain, last, verify_elapsed, opts).await;
    dev.disconnect().await;
    result
}

async fn restore_to(
    dev: &NbdClient,
    target: &NbdUri,
    chain: Arc<Vec<Checked>>,
    last: Manifest,
    verify_elapsed: Duration,
    opts: &JobOptions,
) -> Result<RestoreSummary> {
    let size = last.size_bytes;
    if dev.is_read_only() {
        bail!("the restore target {target} is read-only; nothing was written");
    }
    if dev.size() < size {
        bail!(
            "the restore target {target} is {} bytes ({}), smaller than the snapshot {} ({} bytes, {}); nothing was written",
            dev.size(),
            fmt_bytes(dev.size()),
            last.export(),
            size,
            fmt_bytes(size)
        );
    }
    let min = dev.block_sizes().minimum.max(1) as u64;
    if !CHUNK_BYTES.is_multiple_of(min) || !size.is_multiple_of(min) {
        bail!(
            "the restore target {target} needs I/O aligned to {min} bytes, which the snapshot's {size} bytes in \
             64 KiB chunks are not; nothing was written"
        );
    }
    if dev.info().transmission_flags & blockio::proto::TFLAG_SEND_WRITE_ZEROES == 0 {
        tracing::info!(%target, "the target lacks WRITE_ZEROES: zero runs are written as zeroes");
    }
    let ops = plan(&chain, (opts.request_bytes as u64 / CHUNK_BYTES).max(1))?;
    let files: Arc<Vec<File>> = Arc::new(
        chain
            .iter()
            .map(|b| {
                let p = b.dir.path.join(DATA_FILE);
                File::open(&p).with_context(|| format!("opening {}", p.display()))
            })
            .collect::<Result<_>>()?,
    );
    let progress = Progress::new(opts.progress, format!("restore {}", last.export()), size);
    let (mut data_chunks, mut data_bytes, mut zero_bytes) = (0u64, 0u64, 0u64);
    let writes = futures::stream::iter(ops)
        .map(|op| {
            let (files, chain) = (files.clone(), chain.clone());
            async move {
                match op {
                    WriteOp::Zero { offset, len } => {
                        let flags = ZeroFlags { may_trim: true, ..ZeroFlags::default() };
                        dev.write_zeroes(offset, len as u32, flags)
                            .await
                            .with_context(|| format!("zeroing {len} bytes at offset {offset} of {target}"))?;
                        Ok::<_, anyhow::Error>((0u64, 0u64, len))
                    }
                    WriteOp::Data { offset, pieces } => {
                        let n = pieces.len() as u64;
                        let buf = tokio::task::spawn_blocking(move || read_pieces(&files, &chain, &pieces))
                            .await
                            .map_err(|e| anyhow!("reading the backup failed: {e}"))??;
                        let len = buf.len() as u64;
                        dev.write(offset, buf, false)
                            .await
                            .with_context(|| format!("writing {len} bytes at offset {offset} of {target}"))?;
                        Ok((n, len, 0))
                    }
                }
            }
        })
        .buffer_unordered(opts.queue_depth.max(1));
    futures::pin_mut!(writes);
    while let Some(r) = writes.next().await {
        let (n, d, z) = r.context("the target is partly written; restore again once the problem is fixed")?;
        data_chunks += n;
        data_bytes += d;
        zero_bytes += z;
        progress.add(d + z, n + z.div_ceil(CHUNK_BYTES));
    }
    dev.flush().await.with_context(|| format!("flushing {target}"))?;
    progress.finish();
    Ok(RestoreSummary {
        target: target.to_string(),
        restored: last,
        backups_applied: chain.len(),
        data_chunks,
        data_bytes,
        zero_bytes,
        target_size: dev.size(),
        verify_elapsed,
        elapsed: progress.elapsed(),
    })
}
