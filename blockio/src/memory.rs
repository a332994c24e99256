//! A sparse in-memory [`BlockDevice`].
//!
//! Why it exists: tests, demos and benchmarks need a device that is fast,
//! starts empty at any size, and reports real holes, so block status and
//! sparse copies are exercised without touching a disk.
//!
//! Why this shape: the device is cut into fixed-size chunks (64 KiB) that are
//! allocated on first write, so a 1 TiB device costs nothing until written.
//! Each chunk has its own lock, so concurrent requests to different chunks
//! never contend and no lock is held across more than one chunk's copy.
//! Chunks are grouped, and a group's lock table is itself allocated lazily,
//! so even the per-chunk lock table of a huge, mostly empty device stays small.

use std::sync::{OnceLock, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::buffer_pool::BufferPool;
use crate::device::{BlockDevice, MetaContext, StatusExtent, ZeroFlags};
use crate::error::{check_range, IoError};
use crate::proto::{STATE_HOLE, STATE_ZERO};

/// Bytes per lazily allocated chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks per lazily allocated lock group.
const GROUP_CHUNKS: usize = 1024;

type Chunk = RwLock<Option<Box<[u8]>>>;

/// A sparse, thread-safe block device held in RAM.
pub struct MemoryDevice {
    size: u64,
    read_only: bool,
    groups: Box<[OnceLock<Box<[Chunk]>>]>,
}

impl std::fmt::Debug for MemoryDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDevice").field("size", &self.size).field("read_only", &self.read_only).finish()
    }
}

impl MemoryDevice {
    /// A writable, all-zero device of `size` bytes.
    pub fn new(size: u64) -> MemoryDevice {
        let chunks = size.div_ceil(CHUNK_BYTES as u64);
        let groups = chunks.div_ceil(GROUP_CHUNKS as u64) as usize;
        MemoryDevice { size, read_only: false, groups: (0..groups).map(|_| OnceLock::new()).collect() }
    }

    /// The same device, refusing writes (builder style).
    pub fn read_only(mut self, read_only: bool) -> MemoryDevice {
        self.read_only = read_only;
        self
    }

    /// A writable device whose first bytes are `data` (the rest zeroes).
    pub fn with_contents(size: u64, data: &[u8]) -> MemoryDevice {
        let dev = MemoryDevice::new(size);
        assert!(data.len() as u64 <= size, "initial contents larger than the device");
        dev.write_sync(0, data);
        dev
    }

    /// Bytes currently backed by allocated chunks.
    pub fn allocated_bytes(&self) -> u64 {
        let mut total = 0;
        for group in self.groups.iter().filter_map(|g| g.get()) {
            for chunk in group.iter() {
                if chunk.read().unwrap_or_else(|e| e.into_inner()).is_some() {
                    total += CHUNK_BYTES as u64;
                }
            }
        }
        total
    }

    fn chunk(&self, index: u64) -> Option<&Chunk> {
        let group = self.groups.get((index / GROUP_CHUNKS as u64) as usize)?.get()?;
        group.get((index % GROUP_CHUNKS as u64) as usize)
    }

    fn chunk_or_create(&self, index: u64) -> &Chunk {
        let group = &self.groups[(index / GROUP_CHUNKS as u64) as usize];
        let group = group.get_or_init(|| (0..GROUP_CHUNKS).map(|_| RwLock::new(None)).collect());
        &group[(index % GROUP_CHUNKS as u64) as usize]
    }

    /// Calls `f(chunk_index, offset_in_chunk, position_in_request, len)` for
    /// every chunk piece of `[offset, offset+len)`.
    fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let index = pos / CHUNK_BYTES as u64;
            let in_chunk = (pos % CHUNK_BYTES as u64) as usize;
            let piece = ((CHUNK_BYTES - in_chunk) as u64).min(len - done) as usize;
            f(index, in_chunk, done as usize, piece);
            done += piece as u64;
        }
    }

    fn write_sync(&self, offset: u64, data: &[u8]) {
        MemoryDevice::for_each_piece(offset, data.len() as u64, |index, in_chunk, at, piece| {
            let mut guard = self.chunk_or_create(index).write().unwrap_or_else(|e| e.into_inner());
            let chunk = guard.get_or_insert_with(|| vec![0u8; CHUNK_BYTES].into_boxed_slice());
            chunk[in_chunk..in_chunk + piece].copy_from_slice(&data[at..at + piece]);
        });
    }

    /// Zeroes `[offset, offset+len)`; whole chunks are freed when `may_free`,
    /// else zero-filled (kept allocated, as `NBD_CMD_FLAG_NO_HOLE` asks).
    fn zero_sync(&self, offset: u64, len: u64, may_free: bool) {
        MemoryDevice::for_each_piece(offset, len, |index, in_chunk, _, piece| {
            if may_free && piece == CHUNK_BYTES {
                if let Some(chunk) = self.chunk(index) {
                    *chunk.write().unwrap_or_else(|e| e.into_inner()) = None;
                }
                return;
            }
            if may_free {
                // A partial chunk that is not allocated already reads as zeroes.
                if let Some(chunk) = self.chunk(index) {
                    if let Some(data) = chunk.write().unwrap_or_else(|e| e.into_inner()).as_mut() {
                        data[in_chunk..in_chunk + piece].fill(0);
                    }
                }
                return;
            }
            let mut guard = self.chunk_or_create(index).write().unwrap_or_else(|e| e.into_inner());
            match guard.as_mut() {
                Some(data) => data[in_chunk..in_chunk + piece].fill(0),
                None => *guard = Some(vec![0u8; CHUNK_BYTES].into_boxed_slice()),
            }
        });
    }

    fn check_writable(&self) -> Result<(), IoError> {
        if self.read_only {
            Err(IoError::read_only())
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        check_range(offset, len as u64, self.size)?;
        // Every byte is written exactly once: copied from a chunk, or
        // zero-filled for a hole.
        let fill = |buf: &mut Vec<u8>| {
            MemoryDevice::for_each_piece(offset, len as u64, |index, in_chunk, _, piece| {
                let guard = self.chunk(index).map(|c| c.read().unwrap_or_else(|e| e.into_inner()));
                match guard.as_deref() {
                    Some(Some(data)) => buf.extend_from_slice(&data[in_chunk..in_chunk + piece]),
                    _ => buf.resize(buf.len() + piece, 0),
                }
            });
        };
        // Large reads reuse pooled buffers: allocating and faulting in fresh
        // megabytes per read costs more than the copy itself.
        let pool = BufferPool::global();
        let mut data = pool.take(len as usize);
        fill(&mut data);
        Ok(pool.freeze(data))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        self.check_writable()?;
        check_range(offset, data.len() as u64, self.size)?;
        self.write_sync(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), IoError> {
        self.check_writable()?;
        check_range(offset, len as u64, self.size)?;
        self.zero_sync(offset, len as u64, true);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.check_writable()?;
        check_range(offset, len as u64, self.size)?;
        self.zero_sync(offset, len as u64, flags.may_trim);
        Ok(())
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        check_range(offset, len as u64, self.size)?;
        if *context != MetaContext::BaseAllocation {
            return Err(IoError::not_supported(format!(
                "metadata context {} is not offered by the memory device",
                context.name()
            )));
        }
        let mut extents: Vec<StatusExtent> = Vec::new();
        MemoryDevice::for_each_piece(offset, len as u64, |index, _, _, piece| {
            let allocated = self.chunk(index).is_some_and(|c| c.read().unwrap_or_else(|e| e.into_inner()).is_some());
            let flags = if allocated { 0 } else { STATE_HOLE | STATE_ZERO };
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += piece as u64,
                _ => extents.push(StatusExtent { length: piece as u64, flags }),
            }
        });
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    #[test]
    fn reads_zero_until_written_and_back() {
        rt().block_on(async {
            let dev = MemoryDevice::new(1 << 20);
            assert_eq!(dev.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            dev.write(1000, Bytes::from(data.clone()), false).await.unwrap();
            assert_eq!(dev.read(1000, data.len() as u32).await.unwrap(), data);
            assert_eq!(dev.read(0, 1000).await.unwrap(), vec![0u8; 1000]);
            assert_eq!(dev.allocated_bytes(), 4 * CHUNK_BYTES as u64);
        });
    }

    #[test]
    fn out_of_range_is_overflow() {
        rt().block_on(async {
            let dev = MemoryDevice::new(4096);
            let e = dev.read(4000, 200).await.unwrap_err();
            assert_eq!(e.kind, crate::IoErrorKind::Overflow);
            let e = dev.write(u64::MAX, Bytes::from_static(b"x"), false).await.unwrap_err();
            assert_eq!(e.kind, crate::IoErrorKind::Overflow);
        });
    }

    #[test]
    fn read_only_refuses_writes() {
        rt().block_on(async {
            let dev = MemoryDevice::new(4096).read_only(true);
            let e = dev.write(0, Bytes::from_static(b"x"), false).await.unwrap_err();
            assert_eq!(e.kind, crate::IoErrorKind::PermissionDenied);
            assert!(dev.trim(0, 10, false).await.is_err());
        });
    }

    #[test]
    fn trim_frees_whole_chunks_and_zeroes_partial_ones() {
        rt().block_on(async {
            let size = 4 * CHUNK_BYTES as u64;
            let dev = MemoryDevice::new(size);
            dev.write(0, Bytes::from(vec![0xaa; size as usize]), false).await.unwrap();
            // Covers the end of chunk 0, all of chunk 1, the start of chunk 2.
            let start = CHUNK_BYTES as u64 - 100;
            dev.trim(start, CHUNK_BYTES as u32 + 200, false).await.unwrap();
            assert_eq!(dev.allocated_bytes(), 3 * CHUNK_BYTES as u64);
            let all = dev.read(0, size as u32).await.unwrap();
            for (i, b) in all.iter().enumerate() {
                let zero = (start as usize..start as usize + CHUNK_BYTES + 200).contains(&i);
                assert_eq!(*b, if zero { 0 } else { 0xaa }, "byte {i}");
            }
            let map = dev.block_status(&MetaContext::BaseAllocation, 0, size as u32).await.unwrap();
            assert_eq!(
                map,
                vec![
                    StatusExtent { length: CHUNK_BYTES as u64, flags: 0 },
                    StatusExtent { length: CHUNK_BYTES as u64, flags: STATE_HOLE | STATE_ZERO },
                    StatusExtent { length: 2 * CHUNK_BYTES as u64, flags: 0 },
                ]
            );
        });
    }

    #[test]
    fn write_zeroes_no_hole_keeps_allocation() {
        rt().block_on(async {
            let dev = MemoryDevice::new(2 * CHUNK_BYTES as u64);
            let flags = ZeroFlags { may_trim: false, ..ZeroFlags::default() };
            dev.write_zeroes(0, 2 * CHUNK_BYTES as u32, flags).await.unwrap();
            assert_eq!(dev.allocated_bytes(), 2 * CHUNK_BYTES as u64);
            dev.write_zeroes(0, 2 * CHUNK_BYTES as u32, ZeroFlags { may_trim: true, ..flags }).await.unwrap();
            assert_eq!(dev.allocated_bytes(), 0);
        });
    }

    #[test]
    fn block_status_rejects_unknown_context() {
        rt().block_on(async {
            let dev = MemoryDevice::new(4096);
            let e = dev.block_status(&MetaContext::Custom("x-a:b".into()), 0, 10).await.unwrap_err();
            assert_eq!(e.kind, crate::IoErrorKind::NotSupported);
        });
    }

    #[test]
    fn concurrent_writers_to_distinct_chunks() {
        let dev = std::sync::Arc::new(MemoryDevice::new(64 * CHUNK_BYTES as u64));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    for i in 0..8u64 {
                        let off = (t as u64 * 8 + i) * CHUNK_BYTES as u64;
                        dev.write_sync(off, &vec![t + 1; CHUNK_BYTES]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        rt().block_on(async {
            for t in 0..8u8 {
                let off = t as u64 * 8 * CHUNK_BYTES as u64;
                assert_eq!(dev.read(off, 8 * CHUNK_BYTES as u32).await.unwrap(), vec![t + 1; 8 * CHUNK_BYTES]);
            }
        });
    }
}
