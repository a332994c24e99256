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
//! [`Core::meta_watch`](super::core::Core::meta_watch) before answering it),
//! so the bytes read are the snapshot's; if it has become registered, the
//! chunk is read again from the COW area, which held the pre-image before
//! the registration was even sent. The same re-check covers a snapshot
//! deleted (its pre-images merged into an older one) while it was read.
//!
//! **Metadata contexts.** `base:allocation` (everything reported as data)
//! and, on `VOLUME@NEW`, `sanvol:changed-since:OLD` for every older
//! snapshot `OLD` of the volume: flag 1 for each range written between
//! `OLD` and `NEW` ([`PoolMetadata::changed_between`]), at chunk (64 KiB)
//! granularity.

use std::sync::Arc;

use async_trait::async_trait;
use blockio::server::{Export, ExportTable, NbdServer, ServerConfig};
use blockio::{BlockDevice, BlockSizes, IoError, IoErrorKind, MetaContext, StatusExtent, ZeroFlags};
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tracing::{debug, info};
use volume_format::control::messages::{
    changed_context_name, snapshot_export_name, CHANGED_CONTEXT_PREFIX, CHANGED_FLAG,
};
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
    size_bytes: u64,
    chunk_bytes: u64,
    /// Older snapshots of the volume, by name, for the changed-since contexts.
    older: Vec<(String, SnapshotId)>,
    devices: DeviceClients,
}

/// One contiguous piece of a request inside one chunk.
#[derive(Debug, Clone, Copy)]
struct Piece {
    chunk: u64,
    /// Offset of the piece within its chunk.
    within: u64,
    len: u64,
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
            size_bytes: s.size_bytes,
            chunk_bytes: s.chunk_bytes,
            older,
            devices,
            meta,
        })
    }

    pub fn export_name(&self) -> &str {
        &self.name
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let chunk = at / self.chunk_bytes;
            let within = at % self.chunk_bytes;
            let n = (self.chunk_bytes - within).min(offset + len - at);
            pieces.push(Piece { chunk, within, len: n });
            at += n;
        }
        pieces
    }

    fn source(&self, meta: &PoolMetadata, chunk: u64) -> Result<ChunkSource, IoError> {
        meta.snapshot_source(self.snapshot, chunk)
            .ok_or_else(|| IoError::io(format!("snapshot {} was deleted while it was being read", self.name)))
    }

    /// Reads consecutive pieces that share `source` and one extent.
    async fn read_run(&self, meta: &PoolMetadata, source: ChunkSource, run: &[Piece]) -> Result<Bytes, IoError> {
        let first = run[0];
        let len: u64 = run.iter().map(|p| p.len).sum();
        match source {
            ChunkSource::Live => {
                self.devices
                    .read_live(meta, self.volume, first.chunk * self.chunk_bytes + first.within, len as u32)
                    .await
            }
            ChunkSource::Cow(s) => self.devices.read_cow(meta, s, first.chunk, first.within, len as u32).await,
        }
    }

    /// Whether `b` continues `a`'s run: same source, adjacent, same extent.
    fn continues(&self, meta: &PoolMetadata, a: &Piece, b: &Piece) -> bool {
        let extent_chunks = (meta.extent_bytes / self.chunk_bytes).max(1);
        b.chunk == a.chunk + 1
            && a.within + a.len == self.chunk_bytes
            && b.chunk / extent_chunks == a.chunk / extent_chunks
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
        self.size_bytes
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum: 1, preferred: self.chunk_bytes.min(65536) as u32, maximum: SNAPSHOT_REQUEST_BYTES_MAX }
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.older.iter().map(|(name, _)| changed_context_name(name)).collect()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        blockio::error::check_range(offset, u64::from(len), self.size_bytes)?;
        if len > SNAPSHOT_REQUEST_BYTES_MAX {
            return Err(IoError::new(
                IoErrorKind::Overflow,
                format!("reads are at most {SNAPSHOT_REQUEST_BYTES_MAX} bytes"),
            ));
        }
        let pieces = self.pieces(offset, u64::from(len));
        let meta = self.meta.borrow().clone();
        let sources = pieces.iter().map(|p| self.source(&meta, p.chunk)).collect::<Result<Vec<_>, _>>()?;
        // Read runs of pieces with the same source.
        let mut data: Vec<Bytes> = Vec::with_capacity(pieces.len());
        let mut i = 0;
        while i < pieces.len() {
            let mut j = i + 1;
            while j < pieces.len() && sources[j] == sources[i] && self.continues(&meta, &pieces[j - 1], &pieces[j]) {
                j += 1;
            }
            let run = self.read_run(&meta, sources[i], &pieces[i..j]).await?;
            let mut at = 0usize;
            for p in &pieces[i..j] {
                data.push(run.slice(at..at + p.len as usize));
                at += p.len as usize;
            }
            i = j;
        }
        // The re-check (module docs): sources as committed now, after the reads.
        let mut used = sources;
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
            if !changed {
                if data.len() == 1 {
                    return Ok(data.pop().expect("one piece"));
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
        blockio::error::check_range(offset, u64::from(len), self.size_bytes)?;
        let name = match context {
            MetaContext::BaseAllocation => return Ok(vec![StatusExtent { length: u64::from(len), flags: 0 }]),
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
                Some(last) if last.flags == flags => last.length += p.len,
                _ => out.push(StatusExtent { length: p.len, flags }),
            }
        }
        Ok(out)
    }
}

/// Every snapshot of the pool as an export, all sharing `devices`.
pub fn snapshot_exports(meta: &watch::Receiver<Arc<PoolMetadata>>, devices: &DeviceClients) -> ExportTable {
    let table = ExportTable::new();
    let m = meta.borrow().clone();
    for s in &m.snapshots {
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

/// Serves NBD on `stream` with every snapshot as an export, until the
/// client disconnects.
pub async fn serve<S>(stream: S, meta: watch::Receiver<Arc<PoolMetadata>>, client: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let devices = DeviceClients::default();
    let table = snapshot_exports(&meta, &devices);
    info!(client, snapshots = meta.borrow().snapshots.len(), "backup channel open");
    let server = NbdServer::new(Arc::new(table), ServerConfig::default());
    if let Err(e) = server.serve_connection(stream).await {
        debug!(client, "backup channel NBD connection ended: {e}");
    }
    devices.disconnect_all().await;
}
