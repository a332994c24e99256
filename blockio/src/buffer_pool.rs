//! Reusable buffers for large payloads.
//!
//! Why it exists: a process that moves megabyte payloads (the agent relays
//! 1 MiB reads from a device socket to a client socket) and allocates a
//! fresh buffer per payload makes glibc grow and trim its heap over and over,
//! and every regrown page is faulted in again before the kernel can copy
//! into it: profiled at ~20 page faults per 1 MiB read through the agent,
//! and ~10% of its CPU. Handing payloads out as [`Bytes`] whose owner puts
//! the buffer back here when the last reference is dropped (typically right
//! after it was written to a socket) keeps the same warm pages in use.
//!
//! Small buffers are not pooled: the allocator's own free lists serve them
//! well, and a lock per small request would cost more than it saves. The
//! pool is process-wide (one lock, taken only for large buffers) and bounded
//! by count and by idle bytes, so it never holds more than
//! [`IDLE_BYTES_MAX`] of memory nobody uses.

use std::sync::{Mutex, OnceLock};

use bytes::Bytes;

/// Buffers at least this large are pooled; smaller ones are plain
/// allocations.
pub const POOLED_BYTES_MIN: usize = 128 * 1024;
/// Most idle buffers kept.
const IDLE_BUFFERS_MAX: usize = 64;
/// Most idle bytes kept (by capacity).
pub const IDLE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct Idle {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

/// Idle large buffers, shared by every user in the process.
#[derive(Default)]
pub struct BufferPool {
    idle: Mutex<Idle>,
}

/// Gives a buffer back to its pool when the last `Bytes` into it is dropped.
struct Pooled {
    data: Vec<u8>,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.data));
    }
}

impl BufferPool {
    /// The process-wide pool.
    pub fn global() -> &'static BufferPool {
        static POOL: OnceLock<BufferPool> = OnceLock::new();
        POOL.get_or_init(BufferPool::default)
    }

    /// An empty buffer with room for at least `len` bytes: an idle one that
    /// fits without wasting more than half of it, else a new one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len >= POOLED_BYTES_MIN {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = idle.buffers.iter().position(|b| b.capacity() >= len && b.capacity() / 2 <= len) {
                let mut buf = idle.buffers.swap_remove(i);
                idle.bytes -= buf.capacity();
                buf.clear();
                return buf;
            }
        }
        Vec::with_capacity(len)
    }

    /// `data` as `Bytes`; a large buffer returns to the pool once the last
    /// reference to it is dropped.
    pub fn freeze(&'static self, data: Vec<u8>) -> Bytes {
        if data.capacity() < POOLED_BYTES_MIN {
            return Bytes::from(data);
        }
        Bytes::from_owner(Pooled { data, pool: self })
    }

    /// Keeps `buf` for reuse if the pool has room.
    fn put(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < POOLED_BYTES_MIN {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.buffers.len() < IDLE_BUFFERS_MAX && idle.bytes + cap <= IDLE_BYTES_MAX {
            idle.bytes += cap;
            idle.buffers.push(buf);
        }
    }

    /// Idle bytes held (for tests).
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.idle.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> &'static BufferPool {
        Box::leak(Box::default())
    }

    #[test]
    fn a_large_buffer_comes_back_when_its_last_reference_drops() {
        let pool = pool();
        let mut buf = pool.take(POOLED_BYTES_MIN);
        buf.extend_from_slice(&vec![7u8; POOLED_BYTES_MIN]);
        let ptr = buf.as_ptr();
        let bytes = pool.freeze(buf);
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle_bytes(), 0, "a slice still holds it");
        assert_eq!(&part[..], &[7u8; 10]);
        drop(part);
        assert_eq!(pool.idle_bytes(), POOLED_BYTES_MIN);
        let again = pool.take(POOLED_BYTES_MIN);
        assert_eq!(again.as_ptr(), ptr, "the same buffer is reused");
        assert!(again.is_empty());
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn small_and_badly_fitting_buffers_are_not_reused() {
        let pool = pool();
        drop(pool.freeze(vec![1u8; 4096]));
        assert_eq!(pool.idle_bytes(), 0);
        drop(pool.freeze(Vec::with_capacity(4 * POOLED_BYTES_MIN)));
        assert_eq!(pool.idle_bytes(), 4 * POOLED_BYTES_MIN);
        // Too big for a request of a quarter of it: a new buffer instead.
        let small = pool.take(POOLED_BYTES_MIN);
        assert_eq!(small.capacity(), POOLED_BYTES_MIN);
        assert_eq!(pool.idle_bytes(), 4 * POOLED_BYTES_MIN);
    }

    #[test]
    fn idle_bytes_are_bounded() {
        let pool = pool();
        let each = IDLE_BYTES_MAX / 4 + 1;
        let held: Vec<Bytes> = (0..8).map(|_| pool.freeze(Vec::with_capacity(each))).collect();
        drop(held);
        assert!(pool.idle_bytes() <= IDLE_BYTES_MAX);
        assert_eq!(pool.idle_bytes(), 3 * each);
    }
}
