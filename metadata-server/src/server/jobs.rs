//! Long jobs the owner starts and never waits for: copying pre-images for
//! shared writers, moving pre-images when a snapshot is deleted, checking a
//! device an agent reported, zeroing new space before it is handed out.
//!
//! A job is plain data ([`Job`]) describing what to do against a snapshot
//! of the committed metadata; the shell runs it on its own task (or, for a
//! device check, on the task that owns the pool's device connections) and
//! posts a [`JobOutcome`] back. The core then continues the change that
//! started it — registering the copied chunks, committing the delete,
//! marking the device failed — from the metadata as it is by then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockio::{BlockDevice, ZeroFlags};
use bytes::Bytes;
use tracing::info;
use volume_format::metadata::PoolMetadata;
use volume_format::{DeviceIndex, SnapshotId, VolumeId};

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
    /// Zero whole extents (of `extent_bytes`) on each target device and
    /// flush it: the new space of a create or grow (see `zeroing`).
    Zero { extent_bytes: u64, targets: Vec<DeviceExtents> },
    /// Copy whole extents, each from the first of its sources that answers,
    /// then flush the targets: onto a device that came back (`recovery`),
    /// or onto a volume's new legs (`reconfig`). `progress`, if given,
    /// counts the bytes copied (for listings).
    Resync { extent_bytes: u64, copies: Vec<ExtentCopy>, progress: Option<Arc<AtomicU64>> },
    /// Label a device for the pool (`sanvol device add`); the shell hands
    /// its connection to the device task before reporting (`pool::add`).
    LabelDevice(crate::pool::add::LabelRequest),
    /// Write every record `volume`'s cache mirror holds to its devices, in
    /// order, if the `expected` record names this server (`named_here`)
    /// and its file is of that generation — or the next one, prepared here
    /// and never committed (its holder is gone; `crate::mirror::replayable`).
    MirrorReplay {
        meta: Arc<PoolMetadata>,
        volume: VolumeId,
        expected: Option<volume_format::metadata::CacheMirrorRecord>,
        named_here: bool,
        source: Option<crate::mirror::fetch::MirrorSource>,
    },
    /// Prepare the file of `volume`'s mirror `generation` before that
    /// generation is committed: empty, or the staged copy of attempt and
    /// record count `staged` if it is whole (`crate::mirror::MirrorOp::Prepare`).
    MirrorPrepare {
        volume: VolumeId,
        cache: volume_format::metadata::VolumeCache,
        generation: u64,
        staged: Option<(u64, u64)>,
    },
    /// Fence `handles` for good on every device of `uris` that fences
    /// (`sanvol-target`; plain devices are skipped): done only once each
    /// such device acknowledged that none of their connections is open
    /// (`crate::targets`).
    Fence { key: Arc<ed25519_dalek::SigningKey>, uris: Vec<String>, handles: Vec<volume_format::HandleId> },
}

/// One extent to copy: `to` and `from` name one extent each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentCopy {
    pub to: DeviceExtents,
    pub from: Vec<DeviceExtents>,
}

/// Bytes read and written per request of a resync copy.
pub const RESYNC_CHUNK_BYTES: u64 = 4 << 20;
/// Resync chunks being copied at once per job.
pub const RESYNC_CHUNKS_IN_FLIGHT_MAX: usize = 4;

/// Extents on one device: their device byte offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceExtents {
    pub device: DeviceIndex,
    pub uri: String,
    pub offsets: Vec<u64>,
}

/// Largest single WRITE_ZEROES request: well inside the device request
/// timeout even where the device writes the zeros rather than deallocating.
pub const ZERO_REQUEST_BYTES_MAX: u64 = 64 << 20;
/// Zeroing requests in flight per job.
pub const ZERO_REQUESTS_IN_FLIGHT_MAX: usize = 8;

/// How a job ended: done, or why not (nothing the job wrote is referenced
/// by any committed metadata until the core commits, so a failed job
/// changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub result: Result<(), String>,
    /// The label a [`Job::LabelDevice`] wrote.
    pub label: Option<volume_format::DeviceLabel>,
    /// Whether the device a [`Job::LabelDevice`] labelled fences, as its
    /// export description said (`None`: it said nothing, or another job).
    pub fences: Option<bool>,
}

impl JobOutcome {
    pub fn done() -> JobOutcome {
        JobOutcome { result: Ok(()), label: None, fences: None }
    }

    pub fn failed(why: impl Into<String>) -> JobOutcome {
        JobOutcome { result: Err(why.into()), label: None, fences: None }
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
        Job::Zero { extent_bytes, targets } => match zero_extents(extent_bytes, &targets, devices).await {
            Ok(()) => JobOutcome::done(),
            Err(e) => JobOutcome::failed(e),
        },
        Job::Resync { extent_bytes, copies, progress } => {
            match copy_extents(extent_bytes, &copies, devices, progress.as_deref()).await {
                Ok(()) => {
                    // Fault point (tests): a copy done but not reported yet
                    // (`:sleep=MS` widens the window an online copy's
                    // holders write in after it copied their regions).
                    if let Some(wait) = control_client::fault::hit("mds-after-copy-job") {
                        tokio::time::sleep(wait).await;
                    }
                    JobOutcome::done()
                }
                Err(e) => JobOutcome::failed(e),
            }
        }
        Job::LabelDevice(_) => JobOutcome::failed("a device is labelled where the pool's connections are"),
        Job::MirrorReplay { .. } => JobOutcome::failed("a cache mirror is replayed by its mirror's worker"),
        Job::MirrorPrepare { .. } => JobOutcome::failed("a mirror file is prepared by its mirror's worker"),
        Job::Fence { key, uris, handles } => {
            for handle in handles {
                let holder = volume_format::capability::Holder::Handle(handle);
                match crate::targets::fence_everywhere(&uris, &key, holder).await {
                    Ok(fenced) if fenced.is_empty() => {}
                    Ok(fenced) => info!(%handle, devices = ?fenced, "handle fenced on its fencing devices"),
                    Err(e) => return JobOutcome::failed(format!("fencing handle {handle}: {e}")),
                }
            }
            JobOutcome::done()
        }
    }
}

/// Zeroes every extent of `targets` (deallocating where the device can),
/// then flushes each device: the zeros are durable before the extents are
/// committed to a volume.
async fn zero_extents(extent_bytes: u64, targets: &[DeviceExtents], devices: &DeviceClients) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut clients = Vec::with_capacity(targets.len());
    for t in targets {
        let client = devices.get_by_uri(t.device, &t.uri).await.map_err(|e| e.to_string())?;
        clients.push((t.device, client));
    }
    let result = zero_with(extent_bytes, targets, &clients, devices).await;
    if result.is_err() {
        // A connection that failed is not reused: the next zeroing reconnects.
        for (device, _) in &clients {
            devices.forget(*device).await;
        }
    }
    result?;
    let extents: usize = targets.iter().map(|t| t.offsets.len()).sum();
    info!(extents, elapsed_ms = started.elapsed().as_millis() as u64, "new space zeroed");
    Ok(())
}

async fn zero_with(
    extent_bytes: u64,
    targets: &[DeviceExtents],
    clients: &[(DeviceIndex, blockio::client::NbdClient)],
    devices: &DeviceClients,
) -> Result<(), String> {
    use futures::stream::StreamExt;
    let mut requests = Vec::new();
    for (t, (device, client)) in targets.iter().zip(clients) {
        for &extent in &t.offsets {
            let mut offset = extent;
            while offset < extent + extent_bytes {
                let len = ZERO_REQUEST_BYTES_MAX.min(extent + extent_bytes - offset);
                requests.push((*device, client.clone(), offset, len as u32));
                offset += len;
            }
        }
    }
    let flags = ZeroFlags { may_trim: true, ..ZeroFlags::default() };
    let mut zeroing = futures::stream::iter(requests.into_iter().map(|(device, client, offset, len)| async move {
        devices.may_write().map_err(|e| e.to_string())?;
        client
            .write_zeroes(offset, len, flags)
            .await
            .map_err(|e| format!("zeroing {len} bytes at offset {offset} of device {device}: {e}"))
    }))
    .buffer_unordered(ZERO_REQUESTS_IN_FLIGHT_MAX);
    while let Some(result) = zeroing.next().await {
        result?;
    }
    for (device, client) in clients {
        client.flush().await.map_err(|e| format!("flushing device {device} after zeroing: {e}"))?;
    }
    Ok(())
}

/// Copies every extent of `copies` onto its target, chunk by chunk
/// ([`RESYNC_CHUNKS_IN_FLIGHT_MAX`] at a time), each from the first source
/// that answers, then flushes each target device. Runs while nobody writes
/// the extents (their volume's holders are drained, or it has none and
/// opens wait): see `recovery`.
async fn copy_extents(
    extent_bytes: u64,
    copies: &[ExtentCopy],
    devices: &DeviceClients,
    progress: Option<&AtomicU64>,
) -> Result<(), String> {
    use futures::stream::StreamExt;
    let started = std::time::Instant::now();
    let mut targets = std::collections::BTreeMap::new();
    let mut chunks = Vec::new();
    for (i, copy) in copies.iter().enumerate() {
        let Some(&to) = copy.to.offsets.first() else { continue };
        if let std::collections::btree_map::Entry::Vacant(slot) = targets.entry(copy.to.device) {
            // The device just came back: a connection from before it went
            // away is dead.
            devices.forget(copy.to.device).await;
            slot.insert(devices.get_by_uri(copy.to.device, &copy.to.uri).await.map_err(|e| e.to_string())?);
        }
        let mut at = 0;
        while at < extent_bytes {
            let len = RESYNC_CHUNK_BYTES.min(extent_bytes - at);
            chunks.push((i, to, at, len as u32));
            at += len;
        }
    }
    let mut copying = futures::stream::iter(chunks.into_iter().map(|(i, to, at, len)| {
        let copy = &copies[i];
        copy_chunk(copy.from.clone(), copy.to.device, targets[&copy.to.device].clone(), to + at, at, len, devices)
    }))
    .buffer_unordered(RESYNC_CHUNKS_IN_FLIGHT_MAX);
    while let Some(result) = copying.next().await {
        let copied = result?;
        if let Some(p) = progress {
            p.fetch_add(u64::from(copied), Ordering::Relaxed);
        }
    }
    drop(copying);
    for (device, client) in &targets {
        client.flush().await.map_err(|e| format!("flushing device {device} after the resync: {e}"))?;
    }
    let bytes = copies.len() as u64 * extent_bytes;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    info!(extents = copies.len(), bytes, elapsed_ms, "extents resynchronized");
    Ok(())
}

/// Copies `len` bytes at `at` within an extent from `sources` to `target`
/// (device `device`) at `to`.
async fn copy_chunk(
    sources: Vec<DeviceExtents>,
    device: DeviceIndex,
    target: blockio::client::NbdClient,
    to: u64,
    at: u64,
    len: u32,
    devices: &DeviceClients,
) -> Result<u32, String> {
    let data = read_chunk(&sources, at, len, devices).await?;
    devices.may_write().map_err(|e| e.to_string())?;
    if let Err(e) = target.write(to, data, false).await {
        devices.forget(device).await;
        return Err(format!("writing resync data at offset {to} of device {device}: {e}"));
    }
    Ok(len)
}

/// `len` bytes at `at` within an extent, from the first of `sources` (one
/// extent each) that answers.
async fn read_chunk(sources: &[DeviceExtents], at: u64, len: u32, devices: &DeviceClients) -> Result<Bytes, String> {
    let mut errors = Vec::new();
    for from in sources {
        let Some(&offset) = from.offsets.first() else { continue };
        let read = async {
            let source = devices.get_by_uri(from.device, &from.uri).await?;
            source.read(offset + at, len).await
        };
        match read.await {
            Ok(d) if d.len() == len as usize => return Ok(d),
            Ok(d) => errors.push(format!("device {}: short read of {} bytes", from.device, d.len())),
            Err(e) => {
                devices.forget(from.device).await;
                errors.push(format!("device {}: {e}", from.device));
            }
        }
    }
    Err(format!("reading extent data to resync: {}", errors.join("; ")))
}
