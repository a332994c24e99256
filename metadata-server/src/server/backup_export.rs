//! The backup pseudo-device: every snapshot of the pool as a read-only NBD
//! export `VOLUME@SNAPSHOT`, served on backup channels (a data channel whose
//! request is `BackupChannel`, from an admin or backup key).
//!
//! Reading chunk `c` of snapshot `S`: if `c` is in the COW map of `S` or of
//! a newer snapshot of the volume, from the first such COW area; otherwise
//! from the live volume ([`PoolMetadata::snapshot_source`]).
//!
//! **The race with an agent's overwrite.** A chunk read from the live volume
//! may be overwritten by an agent at any time after it is registered. So
//! after the live read has *completed*, the source is looked up again in the
//! committed metadata: if the chunk is still unregistered, no agent had been
//! told it may overwrite (the server publishes a registration to
//! [`Effect::Published`](super::core::Effect::Published) before answering it),
//! so the bytes read are the snapshot's; if it has become registered, the
//! chunk is read again from the COW area, which held the pre-image before
//! the registration was even sent. The same re-check covers a snapshot
//! deleted (its pre-images merged into an older one) while it was read.
//!
//! **Metadata contexts.** `base:allocation` (the devices' own answer for
//! chunks still in the live volume, "data" for pre-images) and, on `VOLUME@NEW`, `sanvol:changed-since:OLD` for every older
//! snapshot `OLD` of the volume: flag 1 for each range written between
//! `OLD` and `NEW` ([`PoolMetadata::changed_between`]), at chunk (64 KiB)
//! granularity.

use std::sync::Arc;

use async_trait::async_trait;
use blockio::server::{Export, ExportTable, NbdServer, ServerConfig};
use blockio::{BlockDevice, BlockSizes, IoError, IoErrorKind, MetaContext, Payload, StatusExtent, ZeroFlags};
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tracing::{debug, info};
use volume_format::control::messages::{
    changed_context_name, snapshot_export_name, CHANGED_CONTEXT_PREFIX, CHANGED_FLAG,
};
use volume_format::mapping::{ChunkLayout, ChunkPiece};
use volume_format::metadata::{ChunkSource, PoolMetadata};
use volume_format::{SnapshotId, VolumeId};

use super::snapshot_io::DeviceClients;

/// Largest read the pseudo-device accepts.
pub const SNAPSHOT_REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Times a chunk is read again when its source keeps changing under it.
const REREADS_MAX: usize = 8;

/// One snapshot as a read-only block device.
pub struct SnapshotDevice {
    meta: watch::Receiver<Arc<PoolMetadata>>,
    snapshot: SnapshotId,
    name: String,
    volume: VolumeId,
    /// How the snapshot's chunks sit on the pool's extents.
    chunks: ChunkLayout,
    extent_bytes: u64,
    /// Older snapshots of the volume, by name, for the changed-since contexts.
    older: Vec<(String, SnapshotId)>,
    devices: DeviceClients,
}

impl SnapshotDevice {
    pub fn new(
        meta: watch::Receiver<Arc<PoolMetadata>>,
        snapshot: SnapshotId,
        devices: DeviceClients,
    ) -> Option<SnapshotDevice> {
        let m = meta.borrow().clone();
        let s = m.snapshot(snapshot)?;
        let volume = m.volume(s.volume)?;
        let older =
            m.snapshots_of(s.volume).into_iter().filter(|o| o.id < s.id).map(|o| (o.name.clone(), o.id)).collect();
        Some(SnapshotDevice {
            snapshot,
            name: snapshot_export_name(&volume.name, &s.name),
            volume: s.volume,
            chunks: s.chunk_layout(),
            extent_bytes: m.extent_bytes,
            older,
            devices,
            meta,
        })
    }

    pub fn export_name(&self) -> &str {
        &self.name
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<ChunkPiece> {
        self.chunks.pieces(offset, len).collect()
    }

    /// Where each piece's chunk is read from, per `meta`.
    fn sources(&self, meta: &PoolMetadata, pieces: &[ChunkPiece]) -> Result<Vec<ChunkSource>, IoError> {
        pieces.iter().map(|p| self.source(meta, p.chunk)).collect()
    }

    fn source(&self, meta: &PoolMetadata, chunk: u64) -> Result<ChunkSource, IoError> {
        meta.snapshot_source(self.snapshot, chunk)
            .ok_or_else(|| IoError::io(format!("snapshot {} was deleted while it was being read", self.name)))
    }

    /// Reads consecutive pieces that share `source` and one extent.
    async fn read_run(&self, meta: &PoolMetadata, source: ChunkSource, run: &[ChunkPiece]) -> Result<Bytes, IoError> {
        let len: u64 = run.iter().map(|p| p.len_bytes).sum();
        self.devices.read_source(meta, self.volume, source, self.chunks.offset_of(&run[0]), len as u32).await
    }

    /// Whether `b` continues `a`'s run (one device request reads both).
    fn continues(&self, a: &ChunkPiece, b: &ChunkPiece) -> bool {
        self.chunks.joins(a, b, self.extent_bytes)
    }
}

impl SnapshotDevice {
    /// `base:allocation` of the first run of `[offset, offset + len)` (a
    /// reply may describe less than asked): the device's answer for a run
    /// still in the live volume — so full backups skip never-written space —
    /// and "data" for anything else. Like a read, it looks the sources up
    /// again afterwards; if a chunk of the run was registered meanwhile, the
    /// device may have described new bytes, so the run is reported as data.
    async fn allocation(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        let pieces = self.pieces(offset, u64::from(len));
        let meta = self.meta.borrow().clone();
        let first = self.source(&meta, pieces[0].chunk)?;
        let mut end = 1;
        while end < pieces.len()
            && self.source(&meta, pieces[end].chunk)? == first
            && self.continues(&pieces[end - 1], &pieces[end])
        {
            end += 1;
        }
        let run_len: u64 = pieces[..end].iter().map(|p| p.len_bytes).sum();
        let data = vec![StatusExtent { length: run_len, flags: 0 }];
        if first != ChunkSource::Live {
            return Ok(data);
        }
        let Ok(status) = self.devices.live_allocation(&meta, self.volume, offset, run_len as u32).await else {
            return Ok(data);
        };
        let now = self.meta.borrow().clone();
        for p in &pieces[..end] {
            if self.source(&now, p.chunk)? != ChunkSource::Live {
                return Ok(data);
            }
        }
        // Clamp to the run and keep only the allocation bits.
        let keep = blockio::proto::STATE_HOLE | blockio::proto::STATE_ZERO;
        let mut out = Vec::new();
        let mut covered = 0u64;
        for e in status {
            let length = e.length.min(run_len - covered);
            if length == 0 {
                break;
            }
            covered += length;
            out.push(StatusExtent { length, flags: e.flags & keep });
        }
        Ok(if out.is_empty() { data } else { out })
    }
}

impl std::fmt::Debug for SnapshotDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotDevice").field("export", &self.name).finish()
    }
}

fn read_only() -> IoError {
    IoError::new(IoErrorKind::PermissionDenied, "snapshots are read-only")
}

#[async_trait]
impl BlockDevice for SnapshotDevice {
    fn size(&self) -> u64 {
        self.chunks.size_bytes
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: self.chunks.chunk_bytes.min(65536) as u32,
            maximum: SNAPSHOT_REQUEST_BYTES_MAX,
        }
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.older.iter().map(|(name, _)| changed_context_name(name)).collect()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        blockio::error::check_range(offset, u64::from(len), self.chunks.size_bytes)?;
        if len > SNAPSHOT_REQUEST_BYTES_MAX {
            return Err(IoError::new(
                IoErrorKind::Overflow,
                format!("reads are at most {SNAPSHOT_REQUEST_BYTES_MAX} bytes"),
            ));
        }
        let pieces = self.pieces(offset, u64::from(len));
        let meta = self.meta.borrow().clone();
        let sources = self.sources(&meta, &pieces)?;
        // Read runs of pieces with the same source.
        let mut data: Vec<Bytes> = Vec::with_capacity(pieces.len());
        let mut runs: Vec<Bytes> = Vec::new();
        let mut i = 0;
        while i < pieces.len() {
            let mut j = i + 1;
            while j < pieces.len() && sources[j] == sources[i] && self.continues(&pieces[j - 1], &pieces[j]) {
                j += 1;
            }
            let run = self.read_run(&meta, sources[i], &pieces[i..j]).await?;
            let mut at = 0usize;
            for p in &pieces[i..j] {
                data.push(run.slice(at..at + p.len_bytes as usize));
                at += p.len_bytes as usize;
            }
            runs.push(run);
            i = j;
        }
        // The re-check (module docs): sources as committed now, after the reads.
        let mut used = sources;
        let mut reread = false;
        for _ in 0..REREADS_MAX {
            let now = self.meta.borrow().clone();
            let mut changed = false;
            for (k, p) in pieces.iter().enumerate() {
                let source = self.source(&now, p.chunk)?;
                if source != used[k] {
                    debug!(export = %self.name, chunk = p.chunk, ?source, "chunk registered while it was read; reading it again");
                    data[k] = self.read_run(&now, source, std::slice::from_ref(p)).await?;
                    used[k] = source;
                    changed = true;
                }
            }
            reread |= changed;
            if !changed {
                if runs.len() == 1 && !reread {
                    return Ok(runs.pop().expect("one run"));
                }
                let mut out = BytesMut::with_capacity(len as usize);
                for d in data {
                    out.extend_from_slice(&d);
                }
                return Ok(out.freeze());
            }
        }
        Err(IoError::io(format!("snapshot {}: the sources of the chunks kept changing during the read", self.name)))
    }

    /// A read the server only passes on (its reply): when it is one run of
    /// chunks with one source, on one extent, and large enough to splice,
    /// the bytes may stay in pipes from the device's socket to the client's
    /// ([`blockio::splice`]), as an agent passes on a live volume's reads.
    /// The re-check of the module doc is made once the pipes hold the bytes,
    /// before any is sent: if a chunk's source changed meanwhile, the pipes
    /// are dropped and the read is made again, in memory ([`Self::read`]).
    async fn read_payload(&self, offset: u64, len: u32) -> Result<Payload, IoError> {
        let in_range = blockio::error::check_range(offset, u64::from(len), self.chunks.size_bytes).is_ok();
        if !in_range || !(blockio::splice::SPLICE_BYTES_MIN..=SNAPSHOT_REQUEST_BYTES_MAX).contains(&len) {
            return self.read(offset, len).await.map(Payload::Bytes);
        }
        let pieces = self.pieces(offset, u64::from(len));
        let meta = self.meta.borrow().clone();
        let sources = self.sources(&meta, &pieces)?;
        let one_run = sources.iter().all(|s| *s == sources[0])
            && pieces.windows(2).all(|pair| self.continues(&pair[0], &pair[1]));
        if !one_run {
            return self.read(offset, len).await.map(Payload::Bytes);
        }
        let segment = meta.source_segment(self.volume, sources[0], self.chunks.offset_of(&pieces[0]), len.into());
        let payload = self.devices.read_segment_as(&meta, segment, true).await?;
        if self.sources(&self.meta.borrow().clone(), &pieces)? != sources {
            debug!(export = %self.name, "a chunk was registered while it was read; reading again");
            return self.read(offset, len).await.map(Payload::Bytes);
        }
        Ok(payload)
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), IoError> {
        Err(read_only())
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u32, _fua: bool) -> Result<(), IoError> {
        Err(read_only())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u32, _flags: ZeroFlags) -> Result<(), IoError> {
        Err(read_only())
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        blockio::error::check_range(offset, u64::from(len), self.chunks.size_bytes)?;
        let name = match context {
            MetaContext::BaseAllocation => return self.allocation(offset, len).await,
            MetaContext::Custom(name) => name,
        };
        let old = name
            .strip_prefix(CHANGED_CONTEXT_PREFIX)
            .and_then(|old| self.older.iter().find(|(n, _)| n == old))
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                IoError::not_supported(format!("metadata context {name} is not offered by {}", self.name))
            })?;
        let meta = self.meta.borrow().clone();
        let changed =
            meta.changed_between(old, self.snapshot).map_err(|e| IoError::io(format!("{}: {e}", self.name)))?;
        let mut out: Vec<StatusExtent> = Vec::new();
        for p in self.pieces(offset, u64::from(len)) {
            let flags = if changed.contains(p.chunk) { CHANGED_FLAG } else { 0 };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += p.len_bytes,
                _ => out.push(StatusExtent { length: p.len_bytes, flags }),
            }
        }
        Ok(out)
    }
}

/// Every snapshot of the pool (of the volumes in `scope`, when the key has
/// one) as an export, all sharing `devices`.
pub fn snapshot_exports(
    meta: &watch::Receiver<Arc<PoolMetadata>>,
    devices: &DeviceClients,
    scope: Option<&[String]>,
) -> ExportTable {
    let table = ExportTable::new();
    let m = meta.borrow().clone();
    let in_scope = |s: &volume_format::metadata::SnapshotRecord| {
        scope.is_none_or(|volumes| m.volume(s.volume).is_some_and(|v| volumes.contains(&v.name)))
    };
    for s in m.snapshots.iter().filter(|s| in_scope(s)) {
        let Some(device) = SnapshotDevice::new(meta.clone(), s.id, devices.clone()) else { continue };
        table.insert(Export {
            name: device.export_name().to_string(),
            description: format!(
                "sanvol snapshot {} ({} bytes, taken at unix time {})",
                device.export_name(),
                s.size_bytes,
                s.created_at_unix_secs
            ),
            device: Arc::new(device),
            read_only: true,
        });
    }
    table
}

/// Serves NBD on `stream` with every snapshot (in `scope`, if the key has
/// one) as an export, until the client disconnects.
pub async fn serve<S>(stream: S, meta: watch::Receiver<Arc<PoolMetadata>>, client: &str, scope: Option<Vec<String>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (server, devices) = backup_server(&meta, client, scope);
    if let Err(e) = server.serve_connection(stream).await {
        debug!(client, "backup channel NBD connection ended: {e}");
    }
    devices.disconnect_all().await;
}

/// [`serve`] on a local unix socket connection (the server's backup
/// socket): large reads may be spliced from the devices' sockets into it
/// ([`SnapshotDevice::read_payload`]).
pub async fn serve_unix(stream: tokio::net::UnixStream, meta: watch::Receiver<Arc<PoolMetadata>>, client: &str) {
    let (server, devices) = backup_server(&meta, client, None);
    if let Err(e) = server.serve_unix_stream(stream, client.to_string()).await {
        debug!(client, "backup socket NBD connection ended: {e}");
    }
    devices.disconnect_all().await;
}

/// An NBD server of the snapshots in `scope` (every one: `None`) over its
/// own device connections.
fn backup_server(
    meta: &watch::Receiver<Arc<PoolMetadata>>,
    client: &str,
    scope: Option<Vec<String>>,
) -> (NbdServer, DeviceClients) {
    let devices = DeviceClients::default();
    let table = snapshot_exports(meta, &devices, scope.as_deref());
    info!(client, scope = ?scope, "backup channel open");
    (NbdServer::new(Arc::new(table), ServerConfig::default()), devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockio::client::{ClientOptions, NbdClient};
    use blockio::memory::MemoryDevice;
    use futures::future::BoxFuture;
    use std::sync::Mutex;
    use volume_format::{DeviceIndex, DeviceLayout, PublicKey};

    const EXTENT: u64 = 1 << 20;

    type Hook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

    /// A memory device that runs a hook before serving its first read: the
    /// hook plays an agent registering and overwriting a chunk while the
    /// pseudo-device's read of it is on its way.
    struct Racing {
        mem: Arc<MemoryDevice>,
        hook: Mutex<Option<Hook>>,
    }

    #[async_trait]
    impl BlockDevice for Racing {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook().await;
            }
            self.mem.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
            self.mem.write(offset, data, fua).await
        }
        async fn flush(&self) -> Result<(), IoError> {
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
            self.mem.trim(offset, len, fua).await
        }
        async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
            self.mem.write_zeroes(offset, len, flags).await
        }
        async fn block_status(&self, c: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
            self.mem.block_status(c, offset, len).await
        }
    }

    async fn client_for(device: Arc<Racing>) -> NbdClient {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let server = NbdServer::new(Arc::new(ExportTable::single("", device)), ServerConfig::default());
        tokio::spawn(async move { server.serve_connection(theirs).await });
        NbdClient::connect_stream(ours, "", ClientOptions::default()).await.unwrap()
    }

    #[tokio::test]
    async fn a_read_racing_a_registration_and_overwrite_returns_the_pre_image() {
        race(false).await;
    }

    /// The same race for a read the server only passes on: the re-check
    /// comes after the device's bytes are in hand (in pipes, when spliced),
    /// before any is sent.
    #[tokio::test]
    async fn a_passed_on_read_racing_a_registration_and_overwrite_returns_the_pre_image() {
        race(true).await;
    }

    async fn race(passed_on: bool) {
        let mut meta = PoolMetadata::new(uuid::Uuid::from_u128(1), "p", EXTENT, PublicKey([1; 32]), 0);
        for i in 0..2u32 {
            let layout = DeviceLayout::plan_with_slots(9 * EXTENT, EXTENT, 64 << 10, 2).unwrap();
            meta.add_device(uuid::Uuid::from_u128(10 + u128::from(i)), format!("nbd://h{i}/e"), &layout).unwrap();
        }
        let v = meta.create_volume("v", 2 * EXTENT, 4096, 1, 0).unwrap();
        let s = meta.create_snapshot(v, "s", 0).unwrap();
        let chunk_bytes = meta.snapshot(s).unwrap().chunk_bytes;
        let live = meta.volume(v).unwrap().extents[0].legs[0];
        let cow_leg = meta.cow_area(s).unwrap().chunk(0, 0, chunk_bytes).unwrap().legs().unwrap()[0];
        let (cow, cow_at) = (cow_leg.device, cow_leg.device_offset);

        let mems: Vec<Arc<MemoryDevice>> = (0..2).map(|_| Arc::new(MemoryDevice::new(9 * EXTENT))).collect();
        let pre = Bytes::from(vec![0xAA; chunk_bytes as usize]);
        let new = Bytes::from(vec![0x55; chunk_bytes as usize]);
        mems[live.device.0 as usize].write(live.offset, pre.clone(), false).await.unwrap();

        let (tx, rx) = watch::channel(Arc::new(meta.clone()));
        let hook: Hook = {
            let (mems, pre, new, meta) = (mems.clone(), pre.clone(), new.clone(), meta.clone());
            Box::new(move || {
                Box::pin(async move {
                    // The agent: copy, register (committed and published), overwrite.
                    mems[cow.0 as usize].write(cow_at, pre, true).await.unwrap();
                    let mut next = meta;
                    next.register_cow(s, &[0]).unwrap();
                    tx.send_replace(Arc::new(next));
                    mems[live.device.0 as usize].write(live.offset, new, false).await.unwrap();
                })
            })
        };
        let mut hooks = vec![None, None];
        hooks[live.device.0 as usize] = Some(hook);
        let mut clients = Vec::new();
        for (i, hook) in hooks.into_iter().enumerate() {
            let device = Arc::new(Racing { mem: mems[i].clone(), hook: Mutex::new(hook) });
            clients.push((DeviceIndex(i as u32), client_for(device).await));
        }
        let snapshot = SnapshotDevice::new(rx, s, DeviceClients::with(clients)).unwrap();
        assert_eq!(snapshot.export_name(), "v@s");
        // The live read returns the new bytes; the re-check finds the chunk
        // registered and reads the COW area instead.
        let len = chunk_bytes as u32 * 2;
        assert!(len >= blockio::splice::SPLICE_BYTES_MIN, "large enough to be passed on in pipes");
        let got = if passed_on {
            match snapshot.read_payload(0, len).await.unwrap() {
                Payload::Bytes(data) => data,
                Payload::Pipe(pipes) => pipes.into_bytes().unwrap(),
            }
        } else {
            snapshot.read(0, len).await.unwrap()
        };
        assert_eq!(&got[..chunk_bytes as usize], &pre[..], "the read raced the overwrite and must show the pre-image");
        let live_now = mems[live.device.0 as usize].read(live.offset, 16).await.unwrap();
        assert_eq!(&live_now[..], &new[..16], "the live volume was overwritten meanwhile");
        assert_eq!(snapshot.read(100, 10).await.unwrap(), pre.slice(100..110));
        assert!(snapshot.write(0, pre.clone(), false).await.is_err(), "snapshots are read-only");
    }

    #[tokio::test]
    async fn allocation_passes_the_live_answer_through_and_pre_images_are_data() {
        let mut meta = PoolMetadata::new(uuid::Uuid::from_u128(1), "p", EXTENT, PublicKey([1; 32]), 0);
        let layout = DeviceLayout::plan_with_slots(9 * EXTENT, EXTENT, 64 << 10, 2).unwrap();
        meta.add_device(uuid::Uuid::from_u128(10), "nbd://h/e", &layout).unwrap();
        let v = meta.create_volume("v", 2 * EXTENT, 4096, 1, 0).unwrap();
        let s = meta.create_snapshot(v, "s", 0).unwrap();
        let chunk = meta.snapshot(s).unwrap().chunk_bytes;
        let live = meta.volume(v).unwrap().extents[0].legs[0];
        let mem = Arc::new(MemoryDevice::new(9 * EXTENT));
        // Chunk 0 written in the live volume; chunk 2 registered (pre-image).
        mem.write(live.offset, Bytes::from(vec![7; chunk as usize]), false).await.unwrap();
        meta.register_cow(s, &[2]).unwrap();
        let device = Arc::new(Racing { mem, hook: Mutex::new(None) });
        let clients = DeviceClients::with([(DeviceIndex(0), client_for(device).await)]);
        let (_tx, rx) = watch::channel(Arc::new(meta));
        let snapshot = SnapshotDevice::new(rx, s, clients).unwrap();
        let hole = blockio::proto::STATE_HOLE | blockio::proto::STATE_ZERO;
        let status = |offset: u64| {
            let snapshot = &snapshot;
            async move { snapshot.block_status(&MetaContext::BaseAllocation, offset, (4 * chunk) as u32).await.unwrap() }
        };
        let at0 = status(0).await;
        assert_eq!(at0[0], StatusExtent { length: chunk, flags: 0 }, "{at0:?}");
        assert_eq!(at0[1].flags & hole, hole, "never-written space is a hole: {at0:?}");
        assert_eq!(at0.iter().map(|e| e.length).sum::<u64>(), 2 * chunk, "one run: chunks 0 and 1");
        assert_eq!(status(2 * chunk).await, vec![StatusExtent { length: chunk, flags: 0 }], "a pre-image is data");
    }

    /// Over real unix sockets a large read of one run comes back in pipes,
    /// holding the device's bytes; a read across two extents (two runs)
    /// and a small one come back in memory.
    #[tokio::test]
    async fn a_large_read_of_one_run_is_passed_on_in_pipes_from_the_devices_socket() {
        let mut meta = PoolMetadata::new(uuid::Uuid::from_u128(1), "p", EXTENT, PublicKey([1; 32]), 0);
        let layout = DeviceLayout::plan_with_slots(9 * EXTENT, EXTENT, 64 << 10, 2).unwrap();
        meta.add_device(uuid::Uuid::from_u128(10), "nbd://h/e", &layout).unwrap();
        let v = meta.create_volume("v", 2 * EXTENT, 4096, 1, 0).unwrap();
        let s = meta.create_snapshot(v, "s", 0).unwrap();
        let extents = meta.volume(v).unwrap().extents.clone();
        let mem = Arc::new(MemoryDevice::new(9 * EXTENT));
        let mut image = Vec::new();
        for (i, extent) in extents.iter().enumerate() {
            let data: Vec<u8> = (0..EXTENT).map(|b| (b as usize * 7 + i * 13) as u8).collect();
            mem.write(extent.legs[0].offset, Bytes::from(data.clone()), false).await.unwrap();
            image.extend_from_slice(&data);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = NbdServer::new(Arc::new(ExportTable::single("", mem.clone())), ServerConfig::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            server
                .serve_unix(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        let uri: blockio::uri::NbdUri = format!("nbd+unix:///?socket={}", path.display()).parse().unwrap();
        let client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
        let (_tx, rx) = watch::channel(Arc::new(meta));
        let snapshot = SnapshotDevice::new(rx, s, DeviceClients::with([(DeviceIndex(0), client.clone())])).unwrap();

        match snapshot.read_payload(4096, EXTENT as u32 - 4096).await.unwrap() {
            Payload::Pipe(pipes) => {
                let got = pipes.into_bytes().unwrap();
                assert!(got[..] == image[4096..EXTENT as usize], "the piped bytes are the device's");
            }
            Payload::Bytes(_) => panic!("a large read of one run should come in pipes"),
        }
        let across = (EXTENT - 65536, 131072u32);
        match snapshot.read_payload(across.0, across.1).await.unwrap() {
            Payload::Bytes(got) => {
                assert!(got[..] == image[across.0 as usize..(across.0 + u64::from(across.1)) as usize])
            }
            Payload::Pipe(_) => panic!("two extents are two runs: read in memory"),
        }
        match snapshot.read_payload(8192, 4096).await.unwrap() {
            Payload::Bytes(got) => assert!(got[..] == image[8192..12288]),
            Payload::Pipe(_) => panic!("a small read is read in memory"),
        }
        client.disconnect().await;
        let _ = stop.send(());
        serving.await.unwrap().unwrap();
    }
}
