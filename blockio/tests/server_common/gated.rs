//! A device that holds reads at offset 0 until the test opens its gate, so
//! a test, not timing, decides when requests finish.

use async_trait::async_trait;
use blockio::memory::MemoryDevice;
use blockio::{BlockDevice, IoError, ZeroFlags};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};

pub struct GatedDevice {
    inner: MemoryDevice,
    pub gate: Semaphore,
    /// Reads currently waiting at the gate, and the most ever seen.
    pub active: watch::Sender<(usize, usize)>,
}

impl GatedDevice {
    pub fn new() -> Arc<GatedDevice> {
        Arc::new(GatedDevice {
            inner: MemoryDevice::new(1 << 20),
            gate: Semaphore::new(0),
            active: watch::channel((0, 0)).0,
        })
    }

    pub async fn wait_active(&self, n: usize) {
        let mut rx = self.active.subscribe();
        rx.wait_for(|(a, _)| *a >= n).await.unwrap();
    }
}

#[async_trait]
impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        if offset == 0 {
            self.active.send_modify(|(a, m)| {
                *a += 1;
                *m = (*m).max(*a);
            });
            self.gate.acquire().await.unwrap().forget();
            self.active.send_modify(|(a, _)| *a -= 1);
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.inner.write_zeroes(offset, len, flags).await
    }
}
