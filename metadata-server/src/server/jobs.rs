//! Long jobs the owner starts and never waits for: copying pre-images for
//! shared writers, moving pre-images when a snapshot is deleted, checking a
//! device an agent reported.
//!
//! A job is plain data ([`Job`]) describing what to do against a snapshot
//! of the committed metadata; the shell runs it on its own task (or, for a
//! device check, on the task that owns the pool's device connections) and
//! posts a [`JobOutcome`] back. The core then continues the change that
//! started it — registering the copied chunks, committing the delete,
//! marking the device failed — from the metadata as it is by then.

use std::sync::Arc;

use tracing::info;
use volume_format::metadata::PoolMetadata;
use volume_format::{SnapshotId, VolumeId};

use super::snapshot_io::DeviceClients;

/// What a job does.
#[derive(Debug)]
pub enum Job {
    /// Copy the live pre-images of `chunks` (unregistered, so nobody has
    /// overwritten them) into `snapshot`'s copy-on-write area.
    CowCopy { meta: Arc<PoolMetadata>, volume: VolumeId, snapshot: SnapshotId, chunks: Vec<u64> },
    /// Move the pre-images `chunks` of snapshot `from` (being deleted) into
    /// the COW area of `into`, the next older snapshot, which lacks them.
    Merge { meta: Arc<PoolMetadata>, from: SnapshotId, into: SnapshotId, chunks: Vec<u64> },
    /// Whether the server reaches device `index` (a label read on its
    /// connection, else on a new one, each bounded).
    CheckDevice { index: u32, uuid: uuid::Uuid },
}

/// How a job ended: done, or why not (nothing the job wrote is referenced
/// by any committed metadata until the core commits, so a failed job
/// changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub result: Result<(), String>,
}

impl JobOutcome {
    pub fn done() -> JobOutcome {
        JobOutcome { result: Ok(()) }
    }

    pub fn failed(why: impl Into<String>) -> JobOutcome {
        JobOutcome { result: Err(why.into()) }
    }
}

/// Why a job stopped before writing a pre-image: the pool lease is gone.
pub const NO_LEASE_FOR_JOB: &str = "this metadata server does not hold the pool lease now; no pre-image was written";

/// Runs a data job ([`Job::CowCopy`] or [`Job::Merge`]) with `devices`.
///
/// Every pre-image write first asks `may_write` (the pool lease's commit
/// window, as metadata writes do): a server that lost the lease (paused
/// past it, cut off) must not write into a snapshot's copy-on-write area
/// that the server now active maps and fills itself.
pub async fn run_data_job(job: Job, devices: &DeviceClients, may_write: impl Fn() -> bool) -> JobOutcome {
    match job {
        Job::CowCopy { meta, volume, snapshot, chunks } => {
            let Some(s) = meta.snapshot(snapshot) else {
                return JobOutcome::failed(format!("snapshot {snapshot} no longer exists"));
            };
            for &chunk in &chunks {
                let (start, len) = s.chunk_range(chunk);
                let copied = async {
                    let data = devices.read_live(&meta, volume, start, len as u32).await?;
                    if !may_write() {
                        return Ok(Err(NO_LEASE_FOR_JOB));
                    }
                    devices.write_cow(&meta, snapshot, chunk, data).await.map(Ok)
                };
                match copied.await {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => {
                        return JobOutcome::failed(format!("copying the pre-image of chunk {chunk}: {why}"))
                    }
                    Err(e) => return JobOutcome::failed(format!("copying the pre-image of chunk {chunk}: {e}")),
                }
            }
            JobOutcome::done()
        }
        Job::Merge { meta, from, into, chunks } => {
            let Some(s) = meta.snapshot(from) else {
                return JobOutcome::failed(format!("snapshot {from} no longer exists"));
            };
            for &chunk in &chunks {
                let (_, len) = s.chunk_range(chunk);
                let moved = async {
                    let data = devices.read_cow(&meta, from, chunk, 0, len as u32).await?;
                    if !may_write() {
                        return Ok(Err(NO_LEASE_FOR_JOB));
                    }
                    devices.write_cow(&meta, into, chunk, data).await.map(Ok)
                };
                match moved.await {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => {
                        return JobOutcome::failed(format!("moving pre-images of snapshot {}: {why}", s.name))
                    }
                    Err(e) => return JobOutcome::failed(format!("moving pre-images of snapshot {}: {e}", s.name)),
                }
            }
            if !chunks.is_empty() {
                info!(snapshot = %s.name, chunks = chunks.len(), "pre-images moved to the next older snapshot");
            }
            JobOutcome::done()
        }
        Job::CheckDevice { .. } => JobOutcome::failed("a device check runs where the pool's connections are"),
    }
}
