//! The live side of [`crate::fence`]: one [`Fencer`] per target shares the
//! table between connections, tells revoked connections to close, persists
//! raises, and waits for the acknowledgement's condition.
//!
//! Each connection admitted under a capability serves a [`FencedDevice`]:
//! the exported device behind a check of every request against the table.
//! A request that passes runs on a task of its own holding the
//! connection's registration, so even if the connection is torn down
//! meanwhile, the connection counts as open until that request's write has
//! returned from the kernel — the acknowledgement can never overtake it.
//! (On the server's connection threads it runs in place: a thread always
//! finishes its request.)

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use blockio::{BlockDevice, BlockSizes, IoError, IoErrorKind, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use std::collections::HashMap;
use tokio::sync::watch;
use tracing::{info, warn};
use volume_format::capability::{Capability, FenceAck, Holder, FENCE_ACK_BYTES};

use crate::fence::{ConnId, FenceTable, Op, Refusal};
use crate::state_file::{StateFile, StateFileError};

/// Why a raise could not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum RaiseError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the raise could not be saved, so it is not acknowledged: {0}")]
    Persist(#[from] StateFileError),
}

struct Inner {
    table: FenceTable,
    /// Tells a connection's server loop to stop (see `BlockDevice::revoked`).
    revokers: HashMap<ConnId, watch::Sender<bool>>,
    /// Per holder, the latest minimum and how many connections raises to it
    /// revoked (an order is applied at every lookup of its name, so the
    /// count spans them). Bounded like the fences.
    revoked_counts: HashMap<Holder, (u64, u64)>,
}

/// The fencing state of one target, shared by its connections.
pub struct Fencer {
    inner: Mutex<Inner>,
    /// Bumped whenever a connection closes: raises wait on it.
    closed: watch::Sender<u64>,
    state: Option<StateFile>,
    /// One save at a time, each of the table as it is when it starts.
    saving: tokio::sync::Mutex<()>,
}

pub fn now_unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Fencer {
    /// A fencer starting from `state`'s saved fences (none without a state
    /// file: tests).
    pub fn new(state: Option<StateFile>) -> Result<Arc<Fencer>, StateFileError> {
        let fences = match &state {
            Some(file) => file.load()?,
            None => Vec::new(),
        };
        Ok(Arc::new(Fencer {
            inner: Mutex::new(Inner {
                table: FenceTable::with_fences(fences),
                revokers: HashMap::new(),
                revoked_counts: HashMap::new(),
            }),
            closed: watch::channel(0).0,
            state,
            saving: tokio::sync::Mutex::new(()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn min_generation(&self, holder: Holder) -> u64 {
        self.lock().table.min_generation(holder)
    }

    /// Admits a connection under a verified capability.
    pub fn admit(self: &Arc<Fencer>, capability: &Capability) -> Result<Arc<Registration>, Refusal> {
        let mut inner = self.lock();
        let id = inner.table.admit(capability)?;
        let (tx, rx) = watch::channel(false);
        inner.revokers.insert(id, tx);
        Ok(Arc::new(Registration { id, holder: capability.holder, fencer: self.clone(), revoked: rx }))
    }

    /// Raises `holder`'s minimum in the table and revokes older connections
    /// at once; returns how many it revoked. [`Fencer::raise`] also saves
    /// and waits.
    pub fn raise_now(&self, holder: Holder, min_generation: u64) -> Result<usize, Refusal> {
        let mut inner = self.lock();
        let revoked = inner.table.raise(holder, min_generation, now_unix_secs())?;
        if inner.revoked_counts.len() >= crate::fence::FENCES_MAX {
            inner.revoked_counts.clear();
        }
        let count = inner.revoked_counts.entry(holder).or_insert((min_generation, 0));
        if count.0 == min_generation {
            count.1 += revoked.len() as u64;
        } else if count.0 < min_generation {
            *count = (min_generation, revoked.len() as u64);
        }
        for id in &revoked {
            if let Some(tx) = inner.revokers.get(id) {
                let _ = tx.send(true);
            }
        }
        if !revoked.is_empty() {
            info!(%holder, min_generation, connections = revoked.len(), "fenced: closing older connections");
        }
        Ok(revoked.len())
    }

    /// Raises `holder`'s minimum to `min_generation`, saves it, and returns
    /// once no connection of `holder` below it is open any more.
    pub async fn raise(&self, holder: Holder, min_generation: u64) -> Result<FenceAck, RaiseError> {
        let revoked = self.raise_now(holder, min_generation)?;
        self.save().await?;
        let mut closed = self.closed.subscribe();
        loop {
            let pending = self.lock().table.pending(holder, min_generation);
            if pending == 0 {
                break;
            }
            // The sender lives in `self`: `changed` cannot fail while we run.
            if closed.changed().await.is_err() {
                break;
            }
        }
        let closed = match self.lock().revoked_counts.get(&holder) {
            Some((min, count)) if *min == min_generation => *count,
            _ => revoked as u64,
        };
        info!(%holder, min_generation, connections_closed = closed, "fence acknowledged: no older connection is open");
        Ok(FenceAck { holder, min_generation, connections_closed: closed })
    }

    async fn save(&self) -> Result<(), StateFileError> {
        let Some(file) = self.state.clone() else { return Ok(()) };
        let _one_at_a_time = self.saving.lock().await;
        let fences: Vec<_> = self.lock().table.fences().collect();
        match tokio::task::spawn_blocking(move || file.save(&fences)).await {
            Ok(result) => result,
            Err(e) => Err(StateFileError::Io {
                what: "save",
                path: self.state.as_ref().map(|s| s.path()).unwrap_or_default(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    fn begin(&self, id: ConnId, op: Op) -> Result<(), Refusal> {
        self.lock().table.begin(id, op)
    }

    fn end(&self, id: ConnId) {
        self.lock().table.end(id);
    }

    fn close(&self, id: ConnId) {
        {
            let mut inner = self.lock();
            inner.table.close(id);
            inner.revokers.remove(&id);
        }
        self.closed.send_modify(|n| *n += 1);
    }
}

/// One connection's place in the table; the connection is closed (for the
/// table) when the last reference — its device, or a request still running —
/// is dropped.
pub struct Registration {
    id: ConnId,
    holder: Holder,
    fencer: Arc<Fencer>,
    revoked: watch::Receiver<bool>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.fencer.close(self.id);
    }
}

/// A request admitted by the table; ends it when dropped.
struct Running {
    registration: Arc<Registration>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.registration.fencer.end(self.registration.id);
    }
}

/// The exported device as one connection under a capability sees it.
pub struct FencedDevice {
    inner: Arc<dyn BlockDevice>,
    registration: Arc<Registration>,
}

impl FencedDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, registration: Arc<Registration>) -> FencedDevice {
        FencedDevice { inner, registration }
    }

    fn admit(&self, op: Op) -> Result<Running, IoError> {
        let r = &self.registration;
        match r.fencer.begin(r.id, op) {
            Ok(()) => Ok(Running { registration: r.clone() }),
            Err(refusal) => {
                warn!(holder = %r.holder, %refusal, "request refused");
                Err(IoError::new(IoErrorKind::PermissionDenied, refusal.to_string()))
            }
        }
    }

    /// Runs an admitted request on its own task: it finishes (and keeps the
    /// connection open for the table) even if the connection goes away. On
    /// the server's connection threads (`blockio::blocking`) it runs in
    /// place: a thread is never cancelled mid-request, so the request
    /// finishes there before `running` is dropped, without two hops.
    async fn run<T, F>(&self, op: Op, call: impl FnOnce(Arc<dyn BlockDevice>) -> F) -> Result<T, IoError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, IoError>> + Send + 'static,
    {
        let running = self.admit(op)?;
        let fut = call(self.inner.clone());
        if blockio::blocking::inline_allowed() {
            let result = fut.await;
            drop(running);
            return result;
        }
        let task = tokio::spawn(async move {
            let result = fut.await;
            drop(running);
            result
        });
        task.await.unwrap_or_else(|e| Err(IoError::io(format!("the request's task failed: {e}"))))
    }
}

#[async_trait]
impl BlockDevice for FencedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
    fn can_trim(&self) -> bool {
        self.inner.can_trim()
    }
    fn can_fast_zero(&self) -> bool {
        self.inner.can_fast_zero()
    }
    fn revoked(&self) -> Option<watch::Receiver<bool>> {
        Some(self.registration.revoked.clone())
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.run(Op::Read, move |d| async move { d.read(offset, len).await }).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let op = Op::Write { offset, len: data.len() as u64 };
        self.run(op, move |d| async move { d.write(offset, data, fua).await }).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.run(Op::Read, move |d| async move { d.flush().await }).await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        let op = Op::Write { offset, len: len as u64 };
        self.run(op, move |d| async move { d.trim(offset, len, fua).await }).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        let op = Op::Write { offset, len: len as u64 };
        self.run(op, move |d| async move { d.write_zeroes(offset, len, flags).await }).await
    }
    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        let context = context.clone();
        self.run(Op::Read, move |d| async move { d.block_status(&context, offset, len).await }).await
    }
    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.run(Op::Read, move |d| async move { d.cache(offset, len).await }).await
    }
}

/// What a plain export name gets: the size and the description (so a probe
/// learns the device fences), no data.
pub struct RefusingDevice {
    pub size: u64,
}

fn no_capability() -> IoError {
    IoError::new(
        IoErrorKind::PermissionDenied,
        "this sanvol-target device serves only connections that present a capability of the pool's metadata server",
    )
}

#[async_trait]
impl BlockDevice for RefusingDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn is_read_only(&self) -> bool {
        true
    }
    async fn read(&self, _: u64, _: u32) -> Result<Bytes, IoError> {
        Err(no_capability())
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), IoError> {
        Err(no_capability())
    }
    async fn flush(&self) -> Result<(), IoError> {
        Err(no_capability())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), IoError> {
        Err(no_capability())
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: ZeroFlags) -> Result<(), IoError> {
        Err(no_capability())
    }
}

/// What a fence order's connection reads: the acknowledgement, in a block
/// that can be read only once the raise is acknowledged.
pub struct AckDevice {
    pub fencer: Arc<Fencer>,
    pub holder: Holder,
    pub min_generation: u64,
}

#[async_trait]
impl BlockDevice for AckDevice {
    fn size(&self) -> u64 {
        FENCE_ACK_BYTES as u64
    }
    fn is_read_only(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        blockio::error::check_range(offset, len as u64, self.size())?;
        let ack =
            self.fencer.raise(self.holder, self.min_generation).await.map_err(|e| {
                IoError::new(IoErrorKind::PermissionDenied, format!("fence order not acknowledged: {e}"))
            })?;
        let block = ack.encode();
        Ok(Bytes::copy_from_slice(&block[offset as usize..(offset + len as u64) as usize]))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), IoError> {
        Err(IoError::read_only())
    }
    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), IoError> {
        Err(IoError::read_only())
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: ZeroFlags) -> Result<(), IoError> {
        Err(IoError::read_only())
    }
}
