//! [`VolumeDevice`]: the direct data path of one attached volume, as a
//! [`BlockDevice`] the agent's NBD export (and anyone embedding the agent)
//! serves.
//!
//! Every request enters the volume's [`Gate`] first, which hands it the
//! [`Layout`] to use; the request is then split at extent boundaries and its
//! pieces go to the devices concurrently. Where each piece lives, and which
//! legs it reads from or writes to, is [`volume_format::mapping`]'s answer
//! (the same code the metadata server maps snapshots with); this module
//! only does the I/O:
//! - reads go to one leg per extent, alternating between legs by request and
//!   extent so a mirror's legs share the load; a failed leg is retried on the
//!   next one. Pieces are reassembled in order (the only copy on the path,
//!   and only for requests that cross an extent boundary);
//! - writes, TRIM and WRITE_ZEROES go to every online leg and are acknowledged
//!   when all legs have acknowledged; payloads are sliced, never copied;
//! - FLUSH goes to every device of the volume in parallel;
//! - BLOCK_STATUS asks the first online leg of each extent and maps the
//!   answer back to volume offsets.
//!
//! A request leaves the gate only after every device request it issued has
//! completed (`join_all`, never `try_join_all`), so a drained gate really has
//! nothing outstanding at the devices — that is what a recall promises the
//! metadata server.
//!
//! Devices are injected as `Arc<dyn BlockDevice>` (see [`Layout::new`]), so
//! tests run the whole data path over in-process memory devices and the agent
//! over its pool of NBD clients (each wrapped for fallback through the
//! metadata server, [`crate::fallback`]).
//!
//! A device can also come with a "marked failed" flag
//! ([`Layout::with_health`]), set once the metadata server has *committed* the
//! device as failed. Its legs are then skipped like offline legs, and a write
//! leg that failed on such a device does not fail the write as long as another
//! leg of the same extent took it: the pool no longer counts that copy, so
//! acknowledging the write is what the published layout (device offline)
//! would have done anyway.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use blockio::splice::PipeChain;
use blockio::{BlockDevice, BlockSizes, IoError, IoErrorKind, MetaContext, Payload, StatusExtent, ZeroFlags};
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use volume_format::description::{DeviceEndpoint, SnapshotEpoch};
use volume_format::locks::LockTable;
use volume_format::mapping::{DeviceTable, Leg, LegState, Legs, MapError, Segment, VolumeMap};
use volume_format::{DescriptionError, HandleId, VolumeDescription};

use crate::cow::{copy_all, wait_for, CowState, Registrations};
use crate::cow_behind::{Ticket, WriteBehind};
use crate::gate::{Gate, OwnedGateGuard};
use crate::intent::IntentLog;

/// Largest request the volume accepts, as advertised to NBD clients.
pub const REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// One device of a layout, with its "marked failed" flag if it has one.
pub type LayoutDevice = (Arc<dyn BlockDevice>, Option<Arc<AtomicBool>>);

/// A volume description with a device handle for each of its devices.
pub struct Layout {
    description: VolumeDescription,
    /// Parallel to `description.devices` (sorted by index).
    devices: Vec<Arc<dyn BlockDevice>>,
    /// Parallel too: set when the server has marked the device failed.
    failed: Vec<Option<Arc<AtomicBool>>>,
}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout")
            .field("volume", &self.description.name)
            .field("generation", &self.description.layout_generation)
            .field("devices", &self.description.devices.len())
            .finish()
    }
}

impl Layout {
    /// Checks `description` and resolves each of its devices with `resolve`.
    pub fn new<E>(
        description: VolumeDescription,
        mut resolve: impl FnMut(&DeviceEndpoint) -> Result<Arc<dyn BlockDevice>, E>,
    ) -> Result<Layout, LayoutError<E>> {
        Layout::with_health(description, |endpoint| resolve(endpoint).map(|d| (d, None)))
    }

    /// Like [`Layout::new`], with each device's "marked failed" flag.
    pub fn with_health<E>(
        description: VolumeDescription,
        resolve: impl FnMut(&DeviceEndpoint) -> Result<LayoutDevice, E>,
    ) -> Result<Layout, LayoutError<E>> {
        description.check().map_err(LayoutError::Description)?;
        let resolved = description.devices.iter().map(resolve).collect::<Result<Vec<_>, E>>();
        let (devices, failed) = resolved.map_err(LayoutError::Device)?.into_iter().unzip();
        Ok(Layout { devices, failed, description })
    }

    /// Whether the server marked the device at position `i` failed.
    fn marked_failed(&self, i: usize) -> bool {
        self.failed.get(i).and_then(|f| f.as_ref()).is_some_and(|f| f.load(Ordering::Acquire))
    }

    pub fn description(&self) -> &VolumeDescription {
        &self.description
    }

    pub fn generation(&self) -> u64 {
        self.description.layout_generation
    }

    /// The volume mapped over this layout's devices and their states.
    pub fn map(&self) -> VolumeMap<'_> {
        self.description.mapping(self)
    }

    /// The device of `leg` (a leg of [`Layout::map`]) and its connection.
    fn device(&self, leg: &Leg) -> (&DeviceEndpoint, &Arc<dyn BlockDevice>) {
        (&self.description.devices[leg.slot], &self.devices[leg.slot])
    }
}

/// The description's devices, with a device the server has marked failed
/// since the description was made counted as failed.
impl DeviceTable for Layout {
    fn slot(&self, index: volume_format::DeviceIndex) -> Option<usize> {
        self.description.devices.slot(index)
    }

    fn device_state(&self, slot: usize) -> LegState {
        if self.marked_failed(slot) {
            return LegState::DeviceFailed;
        }
        self.description.devices.device_state(slot)
    }

    fn describe(&self, slot: usize) -> String {
        self.description.devices.describe(slot)
    }
}

/// Why a [`Layout`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError<E> {
    #[error("{0}")]
    Description(DescriptionError),
    #[error("{0}")]
    Device(E),
}

/// One attached volume as a block device.
pub struct VolumeDevice {
    name: String,
    handle: u64,
    read_only: bool,
    gate: Arc<Gate<Layout>>,
    /// Rotates the leg reads start from.
    next_read: AtomicUsize,
    /// Where preserved chunks are registered (`None`: no server, so a layout
    /// with a snapshot refuses writes).
    registrations: Option<Arc<Registrations>>,
    /// Copy-on-write state of the newest snapshot (see [`crate::cow`]).
    cow: std::sync::Mutex<Option<Arc<CowState>>>,
    /// The write-intent log of a mirrored volume (see [`crate::intent`]).
    intent: Option<Arc<IntentLog>>,
    /// The volume's byte-range locks as the server last told them: a write
    /// overlapping another handle's lock is refused here (locks are
    /// advisory between sanvol agents; plain devices do not enforce them).
    range_locks: std::sync::RwLock<LockTable>,
    /// Writes acknowledged before their chunk was preserved (see
    /// [`crate::cow_behind`]); `None`: every write goes in line.
    behind: Option<WriteBehind>,
    /// Set once a handover to another writer begins: no write goes behind
    /// any more.
    handing_over: AtomicBool,
    /// This device, for the tasks that land writes behind (set by
    /// [`VolumeDevice::into_arc`]).
    this: Weak<VolumeDevice>,
}

impl std::fmt::Debug for VolumeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeDevice")
            .field("name", &self.name)
            .field("handle", &self.handle)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Adds which volume, extent and device an error came from, keeping its kind.
fn at_device(e: IoError, volume: &str, what: &str, endpoint: &DeviceEndpoint) -> IoError {
    IoError::new(
        e.kind,
        format!("volume {volume}: {what} on device {} ({}): {}", endpoint.index, endpoint.uri, e.message),
    )
}

/// The first error of a set of results, if any.
fn first_error(results: impl IntoIterator<Item = Result<(), IoError>>) -> Result<(), IoError> {
    results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

fn map_error(e: MapError) -> IoError {
    match e {
        MapError::OutOfRange { .. } => IoError::new(IoErrorKind::Overflow, e.to_string()),
        _ => IoError::io(e.to_string()),
    }
}

impl VolumeDevice {
    /// The data path of handle `handle` of volume `name`, behind `gate`.
    pub fn new(name: impl Into<String>, handle: u64, read_only: bool, gate: Arc<Gate<Layout>>) -> VolumeDevice {
        VolumeDevice {
            name: name.into(),
            handle,
            read_only,
            gate,
            next_read: AtomicUsize::new(0),
            registrations: None,
            cow: std::sync::Mutex::new(None),
            intent: None,
            range_locks: std::sync::RwLock::new(LockTable::default()),
            behind: None,
            handing_over: AtomicBool::new(false),
            this: Weak::new(),
        }
    }

    /// Acknowledges writes to chunks the newest snapshot still needs
    /// before they land, up to `budget_bytes` outstanding (0: never; see
    /// [`crate::cow_behind`]). Takes effect once in an `Arc` through
    /// [`VolumeDevice::into_arc`].
    pub fn with_write_behind(mut self, budget_bytes: u64) -> VolumeDevice {
        self.behind = WriteBehind::new(budget_bytes);
        self
    }

    /// The device in an `Arc` that its write-behind tasks can hold.
    pub fn into_arc(mut self) -> Arc<VolumeDevice> {
        Arc::new_cyclic(|this| {
            self.this = this.clone();
            self
        })
    }

    /// Writes acknowledged and not yet landed.
    pub fn writes_behind(&self) -> usize {
        self.behind.as_ref().map_or(0, WriteBehind::outstanding)
    }

    /// Installs the volume's lock table (every handle's byte-range locks):
    /// later writes into another handle's locked bytes are refused.
    pub fn set_range_locks(&self, table: LockTable) {
        *self.range_locks.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    /// The volume's lock table as this device enforces it.
    pub fn range_locks(&self) -> LockTable {
        self.range_locks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the regions it writes in `intent` first (a mirrored volume).
    pub fn with_intent(mut self, intent: Arc<IntentLog>) -> VolumeDevice {
        self.intent = Some(intent);
        self
    }

    /// The volume's write-intent log, if it keeps one.
    pub fn intent(&self) -> Option<&Arc<IntentLog>> {
        self.intent.as_ref()
    }

    /// Runs a data-changing request on `[offset, offset + len)` with its
    /// intent regions recorded dirty first (mirrored layouts, when the
    /// device keeps a log); the request's outcome ends the regions' hold.
    async fn with_intent_held<F>(&self, layout: &Layout, offset: u64, len: u64, op: F) -> Result<(), IoError>
    where
        F: std::future::Future<Output = Result<(), IoError>>,
    {
        let guard = match &self.intent {
            Some(log) if layout.description.mirror_legs > 1 && len > 0 => {
                // Out of range: the request fails below, no region recorded.
                if offset.checked_add(len).is_none_or(|end| end > layout.description.size_bytes) {
                    None
                } else {
                    Some(log.begin(offset, len).await?)
                }
            }
            _ => None,
        };
        let result = op.await;
        if let Some(g) = guard {
            g.finish(result.is_ok());
        }
        result
    }

    /// Registers copy-on-write chunks through `registrations` when the
    /// volume has a snapshot.
    pub fn with_cow(mut self, registrations: Arc<Registrations>) -> VolumeDevice {
        self.registrations = Some(registrations);
        self
    }

    /// Whether the server copies this volume's pre-images now (a device
    /// without a server to register with copies nothing at all).
    pub fn server_copies_now(&self) -> bool {
        self.registrations.as_ref().is_none_or(|r| r.server_copies_now())
    }

    /// From now on the server copies this volume's pre-images; returns once
    /// no copy of this agent's own is in flight (see [`crate::cow`]).
    pub async fn use_server_copies(&self) {
        // No write lands after the other writer starts: the writes
        // acknowledged behind land first (their copies are this agent's).
        self.handing_over.store(true, Ordering::SeqCst);
        if let Some(behind) = &self.behind {
            behind.landed().await;
        }
        if let Some(r) = &self.registrations {
            r.use_server_copies().await;
        }
    }

    /// Chunks of the newest snapshot preserved so far, as this agent knows.
    pub fn cow_preserved(&self) -> Option<(u64, u64)> {
        let cow = self.cow.lock().unwrap_or_else(|e| e.into_inner());
        cow.as_ref().map(|c| (c.snapshot, c.preserved()))
    }

    fn cow_state(&self, epoch: &SnapshotEpoch) -> Arc<CowState> {
        let mut cow = self.cow.lock().unwrap_or_else(|e| e.into_inner());
        match &*cow {
            Some(state) if state.snapshot == epoch.id.0 => state.clone(),
            _ => {
                let state = Arc::new(CowState::new(epoch));
                *cow = Some(state.clone());
                state
            }
        }
    }

    /// Preserves every chunk of `[offset, offset + len)` the newest
    /// snapshot still needs, before the range is modified.
    async fn preserve(&self, layout: &Layout, offset: u64, len: u64) -> Result<(), IoError> {
        // Nothing here that the mapping borrows is kept across an await:
        // this future is part of every write's, and boxed with it.
        let Some(epoch) = &layout.description.snapshot else { return Ok(()) };
        // Out-of-range requests fail in the write itself, before any copy.
        layout.map().segments(offset, len).map_err(map_error)?;
        let Some(touched) = epoch.chunk_layout().chunks_touched(offset, len) else { return Ok(()) };
        let Some(registrations) = &self.registrations else {
            return Err(IoError::io(format!(
                "volume {} has snapshot {} but this device has no metadata server to register copies with",
                self.name, epoch.name
            )));
        };
        let state = self.cow_state(epoch);
        let claim = state.claim(touched);
        if !claim.mine.is_empty() {
            let chunks: Vec<u64> = claim.mine.iter().map(|m| m.0).collect();
            let result = async {
                // Held until the registration is answered (see `cow`: a
                // handover waits for self-made copies in flight).
                let server_copies = registrations.copy_mode().await;
                if !*server_copies {
                    let runs = epoch.chunk_layout().runs(&chunks, layout.description.extent_bytes);
                    copy_all(&runs, |(first, count)| self.copy_chunks(layout, first, count))
                        .await
                        .map_err(|e| e.message)?;
                    control_client::fault::hit("agent-after-cow-copy");
                }
                registrations.register(epoch.id.0, *server_copies, chunks.clone()).await?;
                control_client::fault::hit("agent-after-cow-register");
                Ok(())
            }
            .await;
            state.finish(claim.mine, &result);
            result.map_err(|e| {
                IoError::io(format!("volume {}: preserving chunks for snapshot {}: {e}", self.name, epoch.name))
            })?;
        }
        wait_for(claim.others).await
    }

    /// Preserves the chunks of every range (offset, length) the newest
    /// snapshot still needs, under the current layout: what a write-back
    /// cache does before it logs a batch (see [`crate::cache`]'s
    /// "Snapshots"). Concurrent ranges' registrations are merged.
    pub async fn preserve_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), IoError> {
        for &(offset, len) in ranges {
            self.check_writable(offset, len)?;
        }
        let layout = self.gate.enter().await?;
        if layout.description.snapshot.is_none() {
            return Ok(());
        }
        let layout: &Layout = &layout;
        first_error(join_all(ranges.iter().map(|&(offset, len)| self.preserve(layout, offset, len))).await)
    }

    /// Copies chunks `first..first + count` (within one extent) of the live
    /// volume into the snapshot's COW area (every online leg, FUA): one read
    /// and one write per leg, since both places are laid out alike.
    async fn copy_chunks(&self, layout: &Layout, first: u64, count: u64) -> Result<(), IoError> {
        let map = layout.map();
        let cow = map.newest.ok_or_else(|| IoError::io(format!("volume {} has no snapshot", self.name)))?;
        let (start, len) = cow.chunks.chunks_range(first, count);
        let live = map.live.segment(start, len).map_err(map_error)?;
        let data = copied(self.read_segment(layout, live, first as usize, false).await?)?;
        let legs = cow.pre_image(start, len).and_then(|s| s.write_legs()).map_err(map_error)?;
        let lease_until = self.gate.lease_until();
        let writes = legs.into_iter().map(|leg| {
            let (endpoint, device) = layout.device(&leg);
            let data = data.clone();
            async move {
                self.under_lease(lease_until, || device.write(leg.device_offset, data.clone(), true)).await.map_err(
                    |e| at_device(e, &self.name, &format!("copy of chunk {first} for snapshot {}", cow.name), endpoint),
                )
            }
        });
        first_error(join_all(writes).await)
    }

    /// Runs one data-changing device request (`op`, which may be called
    /// again) under the volume's lease: the request may leave for the device
    /// only before the lease's end, checked right before its bytes go to the
    /// socket ([`blockio::client::with_send_deadline`]). Why again here and
    /// not only at the gate: an admitted I/O can wait long after the gate
    /// checked the lease — a copy-on-write step, a busy connection, a stopped
    /// process — and a write that lands after the lease ran out may land on
    /// the volume's next holder's data. A request that was too late was not
    /// sent; it is sent again once the lease is renewed.
    /// `lease_until` is the gate's lease as the caller read it.
    async fn under_lease<T, F, Fut>(
        &self,
        lease_until: Option<blockio::clock::LeaseInstant>,
        op: F,
    ) -> Result<T, IoError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, IoError>>,
    {
        // A test stops the agent here (`agent-before-device-write:stop`):
        // admitted, not sent; or jumps its lease clock (`:jump=MS`, a VM pause).
        if let Some(pause) = control_client::fault::hit("agent-before-device-write") {
            blockio::clock::jump(pause);
        }
        // After an unclean stop, the previous run's writes land first.
        crate::gate::previous_run_writes_landed().await;
        let mut deadline = lease_until;
        loop {
            let Some(until) = deadline else { return op().await };
            match blockio::client::with_send_deadline(until, op()).await {
                Err(e) if e.kind == IoErrorKind::Fenced => {
                    tracing::warn!(volume = %self.name, handle = self.handle, error = %e,
                        "a write waited past the lease; it goes once the lease is renewed");
                    crate::metrics::write_fenced(&self.name);
                    deadline = self.gate.wait_for_lease().await?;
                }
                r => return r,
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn handle(&self) -> u64 {
        self.handle
    }

    pub fn gate(&self) -> &Arc<Gate<Layout>> {
        &self.gate
    }

    fn check_writable(&self, offset: u64, len_bytes: u64) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::new(
                IoErrorKind::PermissionDenied,
                format!("volume {} is attached read-only; attach it shared or exclusive to write", self.name),
            ));
        }
        let locks = self.range_locks.read().unwrap_or_else(|e| e.into_inner());
        if let Err(refused) = locks.check_write(HandleId(self.handle), offset, len_bytes) {
            let message = format!("volume {}: {refused}", self.name);
            tracing::warn!("{message}");
            return Err(IoError::new(IoErrorKind::PermissionDenied, message));
        }
        Ok(())
    }

    /// Reads one segment from one leg, trying the other online legs if it
    /// fails; `passed_on`: the caller only sends the bytes on, so they may
    /// come in pipes ([`BlockDevice::read_payload`]).
    async fn read_segment(
        &self,
        layout: &Layout,
        segment: Segment<'_>,
        start_leg: usize,
        passed_on: bool,
    ) -> Result<Payload, IoError> {
        let legs = segment.read_legs(start_leg).map_err(map_error)?;
        let len = segment.len_bytes as u32;
        let mut last_error = None;
        for (attempt, leg) in legs.iter().enumerate() {
            let (endpoint, device) = layout.device(leg);
            let read = if passed_on {
                device.read_payload(leg.device_offset, len).await
            } else {
                device.read(leg.device_offset, len).await.map(Payload::Bytes)
            };
            match read {
                Ok(data) if data.len() == len as usize => return Ok(data),
                Ok(data) => {
                    last_error = Some(at_device(
                        IoError::io(format!("returned {} bytes for a {len}-byte read", data.len())),
                        &self.name,
                        "read",
                        endpoint,
                    ))
                }
                Err(e) => last_error = Some(at_device(e, &self.name, "read", endpoint)),
            }
            if attempt + 1 < legs.len() {
                tracing::warn!(volume = %self.name, handle = self.handle, device = %endpoint.index,
                    error = %last_error.as_ref().unwrap(), "read failed; trying the next mirror leg");
            }
        }
        Err(last_error.expect("at least one leg was tried"))
    }

    /// A read; within one extent, a payload that is only passed on may come
    /// in pipes from the device's socket.
    async fn read_as(&self, offset: u64, len: u32, passed_on: bool) -> Result<Payload, IoError> {
        if let Some(log) = &self.intent {
            log.ready().await?;
        }
        self.after_writes_behind(offset, u64::from(len)).await;
        let layout = self.gate.enter().await?;
        let mut segments = layout.map().segments(offset, u64::from(len)).map_err(map_error)?;
        let start_leg = self.next_read.fetch_add(1, Ordering::Relaxed);
        match segments.len() {
            0 => Ok(Payload::Bytes(Bytes::new())),
            1 => self.read_segment(&layout, segments.next().unwrap(), start_leg, passed_on).await,
            _ => {
                let reads = segments.map(|s| self.read_segment(&layout, s, start_leg + s.extent_index as usize, false));
                let pieces = join_all(reads).await;
                let mut out = BytesMut::with_capacity(len as usize);
                for piece in pieces {
                    out.extend_from_slice(&copied(piece?)?);
                }
                Ok(Payload::Bytes(out.freeze()))
            }
        }
    }

    /// A write as it goes to the devices: its chunks preserved first when the
    /// newest snapshot needs them, then every online leg.
    async fn write_in_line(&self, layout: &Layout, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        self.preserve(layout, offset, len).await?;
        let write = self.on_all_legs(layout, offset, len, "write", |device, device_offset, segment| {
            let start = (segment.logical_offset - offset) as usize;
            device.write(device_offset, data.slice(start..start + segment.len_bytes as usize), fua)
        });
        self.with_intent_held(layout, offset, len, write).await
    }

    /// The legs a write to `[offset, offset + len)` goes to as it is, if
    /// it goes to them as it is: within one extent, with no snapshot whose
    /// chunks it might have to preserve first. Only such a write takes its
    /// payload in pipes ([`BlockDevice::write_payload`]), one `tee(2)` of
    /// it per leg; every other is split, copied or preceded by other I/O.
    fn pipe_legs(&self, layout: &Layout, offset: u64, len: u64) -> Option<Legs> {
        if self.read_only || layout.description.snapshot.is_some() {
            return None;
        }
        let mut segments = layout.map().segments(offset, len).ok()?;
        match (segments.next(), segments.next()) {
            (Some(segment), None) => segment.write_legs().ok().filter(|legs| !legs.is_empty()),
            _ => None,
        }
    }

    /// Whether a write to `[offset, offset + len)` under `layout` may be
    /// acknowledged before it lands: it is in range, this holder copies its
    /// own pre-images, and a chunk it touches is not preserved yet.
    fn needs_preserving(&self, layout: &Layout, offset: u64, len: u64) -> bool {
        let Some(epoch) = &layout.description.snapshot else { return false };
        // Out of range: the write goes in line, to fail there.
        let in_range = offset.checked_add(len).is_some_and(|end| end <= layout.description.size_bytes);
        if !in_range
            || self.handing_over.load(Ordering::SeqCst)
            || self.registrations.as_ref().is_none_or(|r| r.server_copies_now())
        {
            return false;
        }
        let Some(touched) = epoch.chunk_layout().chunks_touched(offset, len) else { return false };
        !self.cow_state(epoch).all_preserved(touched)
    }

    /// The rest of a write acknowledged before it landed (see
    /// [`crate::cow_behind`]), under the admission it was acknowledged in.
    async fn land_behind(
        self: Arc<Self>,
        layout: OwnedGateGuard<Layout>,
        mut ticket: Ticket,
        offset: u64,
        data: Bytes,
    ) {
        ticket.wait_for_earlier().await;
        let len = data.len();
        let result = self.write_in_line(&layout, offset, data, false).await;
        if let Err(e) = &result {
            tracing::error!(volume = %self.name, handle = self.handle, offset, len, error = %e,
                "a write acknowledged before its chunk was preserved failed; the next FLUSH fails");
        }
        crate::metrics::write_behind_ended(&self.name, result.is_ok());
        if let Some(behind) = &self.behind {
            behind.finish(ticket, result.map_err(|e| e.message));
        }
        drop(layout);
    }

    /// Waits for the writes acknowledged behind that `[offset, offset +
    /// len)` overlaps, so a request after them sees (or follows) them.
    async fn after_writes_behind(&self, offset: u64, len: u64) {
        if let Some(behind) = &self.behind {
            behind.wait_overlapping(offset, len).await;
        }
    }

    /// Runs `op` on every online leg of every segment of `[offset, offset+len)`,
    /// concurrently; succeeds when all succeed.
    async fn on_all_legs<'a, F>(
        &self,
        layout: &'a Layout,
        offset: u64,
        len: u64,
        what: &str,
        op: F,
    ) -> Result<(), IoError>
    where
        F: Fn(&'a Arc<dyn BlockDevice>, u64, &Segment<'a>) -> futures::future::BoxFuture<'a, Result<(), IoError>>
            + Sync,
    {
        let segments = layout.map().segments(offset, len).map_err(map_error)?;
        let mut ops = Vec::with_capacity(segments.len() * layout.description.mirror_legs as usize);
        // (endpoint, device slot, segment number) of each op.
        let mut targets = Vec::with_capacity(ops.capacity());
        // The lease as it stands now, read once for every leg.
        let lease_until = self.gate.lease_until();
        for (n, segment) in segments.enumerate() {
            for leg in segment.write_legs().map_err(map_error)? {
                let (endpoint, device) = layout.device(&leg);
                let op = &op;
                let device_offset = leg.device_offset;
                ops.push(self.under_lease(lease_until, move || op(device, device_offset, &segment)));
                targets.push((endpoint, leg.slot, n));
            }
        }
        if ops.len() == 1 {
            return ops.pop().unwrap().await.map_err(|e| at_device(e, &self.name, what, targets[0].0));
        }
        let results = join_all(ops).await;
        // A leg that failed because its device was marked failed meanwhile
        // counts as absent if another leg of the same segment succeeded.
        let ok_segments: Vec<usize> =
            results.iter().zip(&targets).filter(|(r, _)| r.is_ok()).map(|(_, (_, _, n))| *n).collect();
        first_error(results.into_iter().zip(targets).map(|(r, (endpoint, slot, n))| match r {
            Err(e) if layout.marked_failed(slot) && ok_segments.contains(&n) => {
                tracing::warn!(volume = %self.name, handle = self.handle, device = %endpoint.index, error = %e,
                    "leg on a device marked failed skipped; the other legs have the data");
                Ok(())
            }
            r => r.map_err(|e| at_device(e, &self.name, what, endpoint)),
        }))
    }
}

#[async_trait]
impl crate::cache::BeforeLogged for VolumeDevice {
    async fn before_logged(&self, ranges: &[(u64, u64)]) -> Result<(), IoError> {
        self.preserve_ranges(ranges).await
    }
}

/// A write payload in pipes for the ops that send it: one per leg, each
/// of which may run more than once (one sent past the lease goes again
/// once the lease is renewed, `VolumeDevice::under_lease`). The first run
/// of each takes a chain of its own (`tee(2)`s of the payload: shared
/// pages, no copy); a later run takes the bytes of one more tee kept for
/// it, read out only when needed.
struct PipedOnce {
    /// (a chain per leg not sent yet, the kept tee, the tee read out once a
    /// retry needed it)
    parts: std::sync::Mutex<(Vec<PipeChain>, Option<PipeChain>, Option<Bytes>)>,
}

impl PipedOnce {
    /// A chain for each of `legs` legs and one kept; `Err` gives the chain
    /// back when the tees cannot be made (then copy it).
    fn new(chain: PipeChain, legs: usize) -> Result<PipedOnce, PipeChain> {
        let copies: Result<Vec<PipeChain>, _> = (0..legs).map(|_| chain.tee()).collect();
        match copies {
            Ok(mut chains) => {
                let kept = chains.pop();
                chains.push(chain);
                Ok(PipedOnce { parts: std::sync::Mutex::new((chains, kept, None)) })
            }
            Err(e) => {
                tracing::debug!(error = %e, "a write payload in pipes could not be copied for its legs; copying it");
                Err(chain)
            }
        }
    }

    fn next(&self) -> Result<Payload, IoError> {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(chain) = parts.0.pop() {
            return Ok(Payload::Pipe(chain));
        }
        if parts.2.is_none() {
            let kept = parts.1.take().ok_or_else(|| IoError::io("internal: a kept write payload is gone"))?;
            parts.2 = Some(kept.into_write_data()?);
        }
        Ok(Payload::Bytes(parts.2.clone().expect("read out just above")))
    }
}

/// The bytes of a read asked for in memory (`passed_on` false): a device
/// returns pipes only to `read_payload`.
fn copied(payload: Payload) -> Result<Bytes, IoError> {
    match payload {
        Payload::Bytes(data) => Ok(data),
        Payload::Pipe(_) => Err(IoError::io("internal: a read asked for in memory came back in pipes")),
    }
}

#[async_trait]
impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.gate.layout().description.size_bytes
    }

    /// Over the current layout's devices: changes when any of their
    /// connections was replaced.
    fn connection_epoch(&self) -> u64 {
        self.gate.layout().devices.iter().fold(0, |acc, d| acc.rotate_left(13) ^ d.connection_epoch())
    }

    fn block_sizes(&self) -> BlockSizes {
        let block = self.gate.layout().description.block_bytes;
        // Any byte granularity works on this path (extent boundaries are
        // block-aligned, and each device enforces its own minimum), so the
        // volume's block size is advertised as the preferred size only.
        BlockSizes { minimum: 1, preferred: block.max(4096), maximum: REQUEST_BYTES_MAX }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        copied(self.read_as(offset, len, false).await?)
    }

    async fn read_payload(&self, offset: u64, len: u32) -> Result<Payload, IoError> {
        self.read_as(offset, len, true).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.check_writable(offset, data.len() as u64)?;
        let layout = self.gate.enter().await?;
        let len = data.len() as u64;
        if let Some(behind) = &self.behind {
            if let Some(this) = self.this.upgrade().filter(|_| !fua && self.needs_preserving(&layout, offset, len)) {
                if let Some(ticket) = behind.admit(offset, len).await {
                    // A handover may have begun while the write waited for room.
                    if !self.handing_over.load(Ordering::SeqCst) {
                        let admitted = layout.to_owned(self.gate.clone());
                        crate::metrics::write_behind_started(&self.name);
                        tokio::spawn(this.land_behind(admitted, ticket, offset, data));
                        return Ok(());
                    }
                    behind.finish(ticket, Ok(()));
                }
            }
            behind.wait_overlapping(offset, len).await;
        }
        self.write_in_line(&layout, offset, data, fua).await
    }

    fn wants_write_pipe(&self, offset: u64, len: u32) -> bool {
        let layout = self.gate.layout();
        self.pipe_legs(&layout, offset, u64::from(len))
            .is_some_and(|legs| legs.iter().all(|leg| layout.device(leg).1.wants_write_pipe(leg.device_offset, len)))
    }

    /// A payload in pipes goes to each leg as it is (a `tee(2)` of it per
    /// leg); a write that turned out to need more (a snapshot, two
    /// extents) is read out of the pipes and written as any other.
    async fn write_payload(&self, offset: u64, data: Payload, fua: bool) -> Result<(), IoError> {
        let chain = match data {
            Payload::Bytes(data) => return self.write(offset, data, fua).await,
            Payload::Pipe(chain) => chain,
        };
        let len = chain.len() as u64;
        self.check_writable(offset, len)?;
        let layout = self.gate.enter().await?;
        if let Some(behind) = &self.behind {
            behind.wait_overlapping(offset, len).await;
        }
        let chain = match self.pipe_legs(&layout, offset, len) {
            Some(legs) => PipedOnce::new(chain, legs.len()),
            None => Err(chain),
        };
        let payload = match chain {
            Ok(payload) => payload,
            Err(chain) => {
                drop(layout);
                return self.write(offset, chain.into_write_data()?, fua).await;
            }
        };
        let write = self.on_all_legs(&layout, offset, len, "write", |device, device_offset, _| {
            let data = payload.next();
            Box::pin(async move { device.write_payload(device_offset, data?, fua).await })
        });
        self.with_intent_held(&layout, offset, len, write).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        if let Some(behind) = &self.behind {
            behind.drain().await.map_err(|e| {
                IoError::io(format!("volume {}: a write acknowledged before it landed failed: {e}", self.name))
            })?;
        }
        let layout = self.gate.enter().await?;
        let d = &layout.description;
        let flushes = d
            .devices
            .iter()
            .zip(&layout.devices)
            .enumerate()
            .filter(|(slot, _)| layout.device_state(*slot).takes_writes())
            .map(|(_, (endpoint, device))| {
                let name = &self.name;
                async move { device.flush().await.map_err(|e| at_device(e, name, "flush", endpoint)) }
            });
        first_error(join_all(flushes).await)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.check_writable(offset, u64::from(len))?;
        self.after_writes_behind(offset, u64::from(len)).await;
        let layout = self.gate.enter().await?;
        self.preserve(&layout, offset, u64::from(len)).await?;
        let trim = self.on_all_legs(&layout, offset, u64::from(len), "trim", |device, device_offset, segment| {
            device.trim(device_offset, segment.len_bytes as u32, fua)
        });
        self.with_intent_held(&layout, offset, u64::from(len), trim).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.check_writable(offset, u64::from(len))?;
        self.after_writes_behind(offset, u64::from(len)).await;
        let layout = self.gate.enter().await?;
        self.preserve(&layout, offset, u64::from(len)).await?;
        let zero =
            self.on_all_legs(&layout, offset, u64::from(len), "write zeroes", |device, device_offset, segment| {
                device.write_zeroes(device_offset, segment.len_bytes as u32, flags)
            });
        self.with_intent_held(&layout, offset, u64::from(len), zero).await
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        if let MetaContext::Custom(name) = context {
            return Err(IoError::not_supported(format!("metadata context {name} is not offered by sanvol volumes")));
        }
        self.after_writes_behind(offset, u64::from(len)).await;
        let layout = self.gate.enter().await?;
        let segments = layout.map().segments(offset, u64::from(len)).map_err(map_error)?;
        let queries = segments.map(|segment| {
            let layout = &layout;
            let name = &self.name;
            async move {
                let leg = segment.read_legs(0).map_err(map_error)?[0];
                let (endpoint, device) = layout.device(&leg);
                let seg_len = segment.len_bytes as u32;
                let extents = device
                    .block_status(context, leg.device_offset, seg_len)
                    .await
                    .map_err(|e| at_device(e, name, "block status", endpoint))?;
                Ok::<_, IoError>((seg_len, extents))
            }
        });
        let mut out: Vec<StatusExtent> = Vec::new();
        for result in join_all(queries).await {
            let (seg_len, extents) = result?;
            // Clamp to the segment (a device must not answer beyond what was
            // asked, but we do not trust it to) and merge runs with equal flags.
            let mut covered = 0u64;
            for extent in extents {
                let length = extent.length.min(u64::from(seg_len) - covered);
                if length == 0 {
                    break;
                }
                covered += length;
                match out.last_mut() {
                    Some(last) if last.flags == extent.flags => last.length += length,
                    _ => out.push(StatusExtent { length, flags: extent.flags }),
                }
            }
            // A short answer ends the reply: what follows is not described.
            if covered < u64::from(seg_len) {
                break;
            }
        }
        if out.is_empty() && len > 0 {
            return Err(IoError::io(format!("volume {}: a device answered block status with no extents", self.name)));
        }
        Ok(out)
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        let layout = self.gate.enter().await?;
        let segments = layout.map().segments(offset, u64::from(len)).map_err(map_error)?;
        let hints = segments.map(|segment| {
            let layout = &layout;
            async move {
                let leg = segment.read_legs(0).map_err(map_error)?[0];
                layout.device(&leg).1.cache(leg.device_offset, segment.len_bytes as u32).await
            }
        });
        first_error(join_all(hints).await)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use blockio::clock::LeaseInstant as Instant;
    use blockio::proto::{STATE_HOLE, STATE_ZERO};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::testing::{self, description, pattern, placement, TestDevice, EXTENT};

    /// Checks that `data` written at logical `offset` sits on every leg where
    /// the description says.
    async fn assert_placed(d: &VolumeDescription, devs: &[Arc<TestDevice>], offset: u64, data: &[u8]) {
        for leg in 0..d.mirror_legs as usize {
            let mut pos = 0usize;
            while pos < data.len() {
                let logical = offset + pos as u64;
                let in_extent = (EXTENT - logical % EXTENT).min((data.len() - pos) as u64) as usize;
                let (dev, dev_offset) = placement(d, logical, leg);
                let got = devs[dev].contents(dev_offset, in_extent as u32).await;
                assert_eq!(
                    &got[..],
                    &data[pos..pos + in_extent],
                    "leg {leg}, logical offset {logical} on device {dev}"
                );
                pos += in_extent;
            }
        }
    }

    #[tokio::test]
    async fn boundary_crossing_write_and_read_land_on_the_right_device_offsets() {
        let (vol, devs) = testing::volume(4, 1, 3, false);
        let d = description(4, 1, 3, 1);
        // Spans the end of extent 0, all of extent 1 and the start of extent 2.
        let offset = EXTENT - 4096;
        let data = pattern(1, (EXTENT + 8192) as usize);
        vol.write(offset, data.clone(), false).await.unwrap();
        assert_placed(&d, &devs, offset, &data).await;
        // Three extents on three devices: every device got its piece.
        assert!(devs.iter().all(|dev| dev.writes.load(Ordering::SeqCst) == 1));
        assert_eq!(vol.read(offset, data.len() as u32).await.unwrap(), data);
        assert_eq!(vol.read(offset + 100, 5000).await.unwrap(), data.slice(100..5100));
    }

    #[tokio::test]
    async fn mirrored_write_lands_on_both_legs() {
        let (vol, devs) = testing::volume(4, 2, 3, false);
        let d = description(4, 2, 3, 1);
        let offset = 2 * EXTENT - 512;
        let data = pattern(2, 4096);
        vol.write(offset, data.clone(), true).await.unwrap();
        assert_placed(&d, &devs, offset, &data).await;
        let writes: u64 = devs.iter().map(|dev| dev.writes.load(Ordering::SeqCst)).sum();
        assert_eq!(writes, 4, "two segments times two legs");
    }

    #[tokio::test]
    async fn reads_spread_across_mirror_legs() {
        let (vol, devs) = testing::volume(1, 2, 2, false);
        for _ in 0..10 {
            vol.read(0, 4096).await.unwrap();
        }
        let reads: Vec<u64> = devs.iter().map(|dev| dev.reads.load(Ordering::SeqCst)).collect();
        assert_eq!(reads, vec![5, 5]);
    }

    #[tokio::test]
    async fn read_falls_back_to_the_other_leg() {
        let (vol, devs) = testing::volume(1, 2, 2, false);
        let data = pattern(3, 8192);
        vol.write(0, data.clone(), false).await.unwrap();
        devs[0].fail_reads.store(true, Ordering::SeqCst);
        for _ in 0..4 {
            assert_eq!(vol.read(0, 8192).await.unwrap(), data);
        }
        devs[1].fail_reads.store(true, Ordering::SeqCst);
        let err = vol.read(0, 8192).await.unwrap_err();
        assert!(err.message.contains("injected read failure") && err.message.contains("dev"), "{err}");
    }

    #[tokio::test]
    async fn offline_legs_are_skipped() {
        let devs: Vec<_> = (0..2).map(|_| TestDevice::new()).collect();
        let mut d = description(1, 2, 2, 1);
        d.devices[1].online = false;
        let vol = VolumeDevice::new("vol", 1, false, Arc::new(Gate::new(testing::layout(d, &devs), 1)));
        vol.write(0, pattern(4, 4096), false).await.unwrap();
        vol.read(0, 4096).await.unwrap();
        vol.read(0, 4096).await.unwrap();
        assert_eq!(devs[1].writes.load(Ordering::SeqCst) + devs[1].reads.load(Ordering::SeqCst), 0);
    }

    /// A device whose every request fails; with `marks`, the failure also
    /// sets the flag, as the fallback path does once the server says the
    /// device is marked failed.
    struct Dead {
        flag: Arc<AtomicBool>,
        marks: bool,
    }

    impl Dead {
        fn fail(&self) -> IoError {
            if self.marks {
                self.flag.store(true, Ordering::Release);
            }
            IoError::io("device gone")
        }
    }

    #[async_trait]
    impl BlockDevice for Dead {
        fn size(&self) -> u64 {
            1 << 40
        }
        async fn read(&self, _: u64, _: u32) -> Result<Bytes, IoError> {
            Err(self.fail())
        }
        async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), IoError> {
            Err(self.fail())
        }
        async fn flush(&self) -> Result<(), IoError> {
            Err(self.fail())
        }
        async fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), IoError> {
            Err(self.fail())
        }
        async fn write_zeroes(&self, _: u64, _: u32, _: ZeroFlags) -> Result<(), IoError> {
            Err(self.fail())
        }
    }

    /// A mirrored (or plain) volume whose device 0 is dead.
    fn with_dead_device(legs: u32, marks: bool) -> (VolumeDevice, Arc<AtomicBool>, Vec<Arc<TestDevice>>) {
        let devs: Vec<_> = (0..2).map(|_| TestDevice::new()).collect();
        let flag = Arc::new(AtomicBool::new(false));
        let d = description(2, legs, 2, 1);
        let layout = Layout::with_health(d, |e| {
            Ok::<_, String>(if e.index.0 == 0 {
                (Arc::new(Dead { flag: flag.clone(), marks }) as Arc<dyn BlockDevice>, Some(flag.clone()))
            } else {
                (devs[e.index.0 as usize].clone() as Arc<dyn BlockDevice>, None)
            })
        })
        .unwrap();
        (VolumeDevice::new("vol", 1, false, Arc::new(Gate::new(Arc::new(layout), 1))), flag, devs)
    }

    #[tokio::test]
    async fn a_mirror_continues_on_its_other_leg_once_the_dead_device_is_marked_failed() {
        // Not marked: the write fails (one copy is not a mirrored write).
        let (vol, _, _) = with_dead_device(2, false);
        assert!(vol.write(0, pattern(12, 4096), false).await.is_err());
        // Marked while the write is in flight: the other leg has it, the write succeeds.
        let (vol, flag, devs) = with_dead_device(2, true);
        vol.write(0, pattern(13, 4096), false).await.unwrap();
        assert!(flag.load(Ordering::Acquire));
        assert_eq!(devs[1].writes.load(Ordering::SeqCst), 1);
        // From then on the dead leg is skipped entirely.
        vol.write(EXTENT, pattern(14, 4096), false).await.unwrap();
        assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(13, 4096));
        vol.flush().await.unwrap();
    }

    #[tokio::test]
    async fn a_plain_volume_fails_only_the_io_on_the_failed_device_and_names_it() {
        let (vol, flag, _) = with_dead_device(1, true);
        flag.store(true, Ordering::Release);
        let d = description(2, 1, 2, 1);
        let (dead_extent, live_extent) = if d.extents[0].legs[0].device.0 == 0 { (0, 1) } else { (1, 0) };
        let e = vol.read(dead_extent * EXTENT, 4096).await.unwrap_err();
        assert!(e.message.contains("marked failed") && e.message.contains("device dev0"), "{e}");
        let e = vol.write(dead_extent * EXTENT, pattern(15, 4096), false).await.unwrap_err();
        assert!(e.message.contains("marked failed"), "{e}");
        vol.write(live_extent * EXTENT, pattern(16, 4096), false).await.unwrap();
        assert_eq!(vol.read(live_extent * EXTENT, 4096).await.unwrap(), pattern(16, 4096));
    }

    #[tokio::test]
    async fn flush_reaches_every_device() {
        let (vol, devs) = testing::volume(4, 2, 3, false);
        vol.flush().await.unwrap();
        assert!(devs.iter().all(|dev| dev.flushes.load(Ordering::SeqCst) == 1));
    }

    #[tokio::test]
    async fn read_only_refuses_writes_with_eperm() {
        let (vol, devs) = testing::volume(2, 1, 2, true);
        assert!(vol.is_read_only());
        let e = vol.write(0, pattern(5, 512), false).await.unwrap_err();
        assert_eq!(e.kind, IoErrorKind::PermissionDenied);
        assert_eq!(e.kind.nbd_code(), blockio::proto::errno::EPERM);
        assert_eq!(vol.trim(0, 512, false).await.unwrap_err().kind, IoErrorKind::PermissionDenied);
        let zero = vol.write_zeroes(0, 512, ZeroFlags::default()).await.unwrap_err();
        assert_eq!(zero.kind, IoErrorKind::PermissionDenied);
        assert_eq!(devs.iter().map(|d| d.writes_started.load(Ordering::SeqCst)).sum::<u64>(), 0);
        vol.read(0, 512).await.unwrap();
    }

    #[tokio::test]
    async fn writes_into_another_handle_s_lock_are_refused_with_eperm() {
        use volume_format::locks::LockRange;
        let (vol, devs) = testing::volume(2, 1, 2, false);
        let mut table = LockTable::default();
        table.set(HandleId(vol.handle), "me", vec![LockRange { start: 0, len_bytes: 8192 }]);
        table.set(HandleId(vol.handle + 1), "host-b", vec![LockRange { start: 8192, len_bytes: 8192 }]);
        vol.set_range_locks(table);
        vol.write(0, pattern(1, 4096), false).await.unwrap();
        vol.write(EXTENT, pattern(2, 4096), false).await.unwrap();
        let writes_before = devs.iter().map(|d| d.writes_started.load(Ordering::SeqCst)).sum::<u64>();
        let e = vol.write(4096, pattern(3, 8192), false).await.unwrap_err();
        assert_eq!(e.kind.nbd_code(), blockio::proto::errno::EPERM);
        assert!(e.to_string().contains("host-b"), "{e}");
        assert_eq!(vol.trim(12288, 512, false).await.unwrap_err().kind, IoErrorKind::PermissionDenied);
        let zero = vol.write_zeroes(8192, 512, ZeroFlags::default()).await.unwrap_err();
        assert_eq!(zero.kind, IoErrorKind::PermissionDenied);
        let writes_after = devs.iter().map(|d| d.writes_started.load(Ordering::SeqCst)).sum::<u64>();
        assert_eq!(writes_after, writes_before, "a refused write reaches no device");
        vol.read(8192, 512).await.unwrap();
        vol.set_range_locks(LockTable::default());
        vol.write(8192, pattern(4, 512), false).await.unwrap();
    }

    #[tokio::test]
    async fn out_of_range_is_overflow() {
        let (vol, _devs) = testing::volume(2, 1, 2, false);
        assert_eq!(vol.read(2 * EXTENT - 1, 2).await.unwrap_err().kind, IoErrorKind::Overflow);
        assert_eq!(vol.write(2 * EXTENT, pattern(0, 1), false).await.unwrap_err().kind, IoErrorKind::Overflow);
    }

    #[tokio::test]
    async fn write_zeroes_and_trim_pass_through_per_segment() {
        let (vol, devs) = testing::volume(3, 2, 3, false);
        let d = description(3, 2, 3, 1);
        let data = pattern(6, (3 * EXTENT) as usize);
        vol.write(0, data.clone(), false).await.unwrap();
        let (zero_at, zero_len) = (EXTENT - 4096, 8192u32);
        vol.write_zeroes(zero_at, zero_len, ZeroFlags::default()).await.unwrap();
        assert_placed(&d, &devs, zero_at, &vec![0u8; zero_len as usize]).await;
        assert_placed(&d, &devs, zero_at - 4096, &data[(zero_at - 4096) as usize..zero_at as usize]).await;
        vol.trim(2 * EXTENT - 4096, 8192, false).await.unwrap();
        // Memory devices read trimmed ranges back as zeroes.
        assert_placed(&d, &devs, 2 * EXTENT - 4096, &[0u8; 8192]).await;
    }

    #[tokio::test]
    async fn block_status_maps_device_answers_back() {
        let (vol, _devs) = testing::volume(3, 1, 3, false);
        // Data in extent 1 only (memory devices allocate in 64 KiB chunks, one extent); 0 and 2 are holes.
        vol.write(EXTENT, pattern(7, EXTENT as usize), false).await.unwrap();
        let st = vol.block_status(&MetaContext::BaseAllocation, 0, (3 * EXTENT) as u32).await.unwrap();
        let hole = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            st,
            vec![
                StatusExtent { length: EXTENT, flags: hole },
                StatusExtent { length: EXTENT, flags: 0 },
                StatusExtent { length: EXTENT, flags: hole }
            ]
        );
        // Clamped to the request; adjacent equal runs across extents merge.
        let st = vol.block_status(&MetaContext::BaseAllocation, EXTENT + 10, 100).await.unwrap();
        assert_eq!(st, vec![StatusExtent { length: 100, flags: 0 }]);
        vol.write_zeroes(EXTENT, EXTENT as u32, ZeroFlags { may_trim: true, ..Default::default() }).await.unwrap();
        let st = vol.block_status(&MetaContext::BaseAllocation, 0, (3 * EXTENT) as u32).await.unwrap();
        assert_eq!(st.iter().map(|e| e.length).sum::<u64>(), 3 * EXTENT);
        assert!(st.len() < 3 || st.iter().all(|e| e.flags & STATE_ZERO != 0), "{st:?}");
        let custom = MetaContext::Custom("qemu:dirty-bitmap:x".into());
        assert_eq!(vol.block_status(&custom, 0, 10).await.unwrap_err().kind, IoErrorKind::NotSupported);
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition never became true");
    }

    #[tokio::test]
    async fn recall_drains_in_flight_io_and_holds_new_io_until_a_grown_layout_is_published() {
        let release = Arc::new(Semaphore::new(0));
        let devs: Vec<_> = (0..2).map(|_| TestDevice::holding_writes(release.clone())).collect();
        let gate = Arc::new(Gate::new(testing::layout(description(2, 1, 2, 1), &devs), 1));
        let vol = Arc::new(VolumeDevice::new("vol", 1, false, gate.clone()));
        assert_eq!(vol.size(), 2 * EXTENT);

        // A write that crosses into both devices and stays in flight.
        let data = pattern(8, 8192);
        let write = tokio::spawn({
            let (vol, data) = (vol.clone(), data.clone());
            async move { vol.write(EXTENT - 4096, data, false).await }
        });
        until(|| devs.iter().all(|d| d.writes_started.load(Ordering::SeqCst) == 1)).await;

        gate.begin_recall(2).unwrap();
        let drained = tokio::spawn({
            let gate = gate.clone();
            async move { gate.drained().await }
        });
        // A new read arrives during the recall: it must wait, not fail.
        let read = tokio::spawn({
            let vol = vol.clone();
            async move { vol.read(2 * EXTENT, 4096).await }
        });
        until(|| gate.status().waiting == 1).await;
        assert!(!drained.is_finished(), "the write is still in flight");

        // Only one leg completes: still not drained.
        release.add_permits(1);
        until(|| devs.iter().map(|d| d.writes.load(Ordering::SeqCst)).sum::<u64>() == 1).await;
        assert!(!drained.is_finished());
        release.add_permits(1);
        drained.await.unwrap().unwrap();
        write.await.unwrap().unwrap();
        assert!(!read.is_finished(), "held until the publish");

        // Publish a grown layout: the held read (beyond the old end) now succeeds.
        gate.publish(testing::layout(description(3, 1, 2, 2), &devs), 2).unwrap();
        assert_eq!(read.await.unwrap().unwrap().len(), 4096);
        assert_eq!(vol.size(), 3 * EXTENT);
        assert_eq!(vol.read(EXTENT - 4096, 8192).await.unwrap(), data);
    }

    #[tokio::test]
    async fn revoke_fails_held_and_new_io() {
        let (vol, _devs) = testing::volume(2, 1, 2, false);
        vol.gate().begin_recall(2).unwrap();
        let read = tokio::spawn({
            let vol = vol.clone();
            async move { vol.read(0, 512).await }
        });
        until(|| vol.gate().status().waiting == 1).await;
        vol.gate().revoke("another client opened the volume exclusively");
        let e = read.await.unwrap().unwrap_err();
        assert!(e.message.contains("another client"), "{e}");
        assert!(vol.write(0, pattern(9, 512), false).await.is_err());
        assert!(vol.flush().await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_holds_io_until_renewed() {
        let (vol, devs) = testing::volume(2, 1, 2, false);
        vol.gate().renew_lease(Instant::now() + Duration::from_secs(3));
        vol.write(0, pattern(10, 512), false).await.unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        let write = tokio::spawn({
            let vol = vol.clone();
            async move { vol.write(0, pattern(11, 512), false).await }
        });
        until(|| vol.gate().status().waiting == 1).await;
        tokio::time::advance(Duration::from_secs(30)).await;
        until(|| vol.gate().status().waiting == 1).await;
        assert_eq!(devs[0].writes.load(Ordering::SeqCst), 1, "no I/O reaches a device without a lease");
        vol.gate().renew_lease(Instant::now() + Duration::from_secs(3));
        write.await.unwrap().unwrap();
        assert_eq!(devs[0].writes.load(Ordering::SeqCst), 2);
    }

    /// A write admitted under the lease, then held in the agent (a busy
    /// connection, a stopped process) until the lease has run out and let go:
    /// the gate, the device, the write's task and its device offset.
    async fn write_held_past_the_lease(
    ) -> (Arc<Gate<Layout>>, Arc<TestDevice>, tokio::task::JoinHandle<Result<(), IoError>>, u64) {
        write_held_past_the_lease_as(false).await
    }

    /// `piped`: the write's payload comes in pipes, as a large write's
    /// from the agent's export does (`BlockDevice::write_payload`).
    async fn write_held_past_the_lease_as(
        piped: bool,
    ) -> (Arc<Gate<Layout>>, Arc<TestDevice>, tokio::task::JoinHandle<Result<(), IoError>>, u64) {
        let hold = Arc::new(tokio::sync::Semaphore::new(0));
        let dev = TestDevice::holding_writes(hold.clone());
        let d = testing::description(2, 1, 1, 1);
        let (_, offset) = testing::placement(&d, 0, 0);
        let gate = Arc::new(Gate::new(testing::layout(d, std::slice::from_ref(&dev)), 1));
        let vol = Arc::new(VolumeDevice::new("vol", 1, false, gate.clone()));
        gate.renew_lease(Instant::now() + Duration::from_secs(3));
        let write = tokio::spawn(async move {
            if piped {
                let chain = PipeChain::from_slice(&pattern(1, 512)).unwrap();
                vol.write_payload(0, Payload::Pipe(chain), false).await
            } else {
                vol.write(0, pattern(1, 512), false).await
            }
        });
        until(|| dev.writes_started.load(Ordering::SeqCst) == 1).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        // One permit for this try, one for the try after a renewal.
        hold.add_permits(2);
        until(|| hold.available_permits() == 1).await;
        (gate, dev, write, offset)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_held_in_the_agent_past_its_lease_is_sent_only_after_the_renewal() {
        let (gate, dev, write, offset) = write_held_past_the_lease().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!write.is_finished(), "the write waits for a renewal");
        assert_eq!(dev.writes.load(Ordering::SeqCst), 0, "nothing reached the device after the lease ran out");
        assert_eq!(dev.contents(offset, 512).await, Bytes::from(vec![0u8; 512]));
        assert_eq!(gate.status().in_flight, 1, "still admitted: a recall's drain waits for it");
        gate.renew_lease(Instant::now() + Duration::from_secs(3));
        write.await.unwrap().unwrap();
        assert_eq!(dev.writes.load(Ordering::SeqCst), 1, "sent once, after the renewal");
        assert_eq!(dev.contents(offset, 512).await, pattern(1, 512));
    }

    /// Only a write to one extent, with no snapshot, on a writable handle,
    /// takes its payload in pipes (a chain per leg); anything the network
    /// may send (out of range, an offset that overflows) is just refused.
    #[test]
    fn only_a_write_to_one_extent_takes_its_payload_in_pipes() {
        let dev = |_| TestDevice::new();
        let plain: Vec<_> = (0..1).map(dev).collect();
        let gate = Gate::new(testing::layout(testing::description(2, 1, 1, 1), &plain), 1);
        let vol = VolumeDevice::new("vol", 1, false, Arc::new(gate));
        let layout = vol.gate.layout();
        assert_eq!(vol.pipe_legs(&layout, 0, EXTENT).map(|legs| legs.len()), Some(1), "one extent, one leg");
        assert!(vol.pipe_legs(&layout, EXTENT / 2, EXTENT).is_none(), "two extents");
        assert!(vol.pipe_legs(&layout, 2 * EXTENT - 4096, 8192).is_none(), "past the end");
        assert!(vol.pipe_legs(&layout, u64::MAX - 4095, 1 << 20).is_none(), "an offset that overflows");

        let mirrored: Vec<_> = (0..2).map(dev).collect();
        let gate = Gate::new(testing::layout(testing::description(2, 2, 2, 1), &mirrored), 1);
        let vol = VolumeDevice::new("vol", 1, false, Arc::new(gate));
        let legs = vol.pipe_legs(&vol.gate.layout(), 0, EXTENT).map(|legs| legs.len());
        assert_eq!(legs, Some(2), "one extent, two legs: a chain for each");

        let snapshot = testing::with_snapshot(testing::description(2, 1, 1, 1), 16 * 1024);
        let gate = Gate::new(testing::layout(snapshot, &plain), 1);
        let vol = VolumeDevice::new("vol", 1, false, Arc::new(gate));
        assert!(vol.pipe_legs(&vol.gate.layout(), 0, EXTENT).is_none(), "a snapshot's chunks may need copying first");

        let gate = Gate::new(testing::layout(testing::description(2, 1, 1, 1), &plain), 1);
        let vol = VolumeDevice::new("vol", 1, true, Arc::new(gate));
        assert!(vol.pipe_legs(&vol.gate.layout(), 0, EXTENT).is_none(), "read-only");
    }

    /// The first try took the pipes; the try after the renewal sends the
    /// bytes of the copy kept for it.
    #[tokio::test(start_paused = true)]
    async fn a_write_in_pipes_held_past_its_lease_goes_from_its_kept_copy_after_the_renewal() {
        let (gate, dev, write, offset) = write_held_past_the_lease_as(true).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!write.is_finished(), "the write waits for a renewal");
        assert_eq!(dev.writes.load(Ordering::SeqCst), 0, "nothing reached the device after the lease ran out");
        gate.renew_lease(Instant::now() + Duration::from_secs(3));
        write.await.unwrap().unwrap();
        assert_eq!(dev.writes.load(Ordering::SeqCst), 1, "sent once, after the renewal");
        assert_eq!(dev.contents(offset, 512).await, pattern(1, 512));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_waiting_for_a_renewal_fails_when_the_handle_is_revoked() {
        let (gate, dev, write, _) = write_held_past_the_lease().await;
        gate.revoke("handle 1 was broken: host-b opened volume vol");
        let e = write.await.unwrap().unwrap_err();
        assert!(e.message.contains("host-b opened"), "{e}");
        assert_eq!(dev.writes.load(Ordering::SeqCst), 0);
    }

    mod cow {
        use super::*;
        use crate::cow::{CowRegistrar, Registrations};
        use crate::testing::with_snapshot;
        use std::sync::Mutex;

        const CHUNK: u64 = 16 * 1024;

        /// Checks, at each registration, that every chunk's pre-image is in
        /// the COW area and the live volume is not yet modified.
        struct Checking {
            d: VolumeDescription,
            devs: Vec<Arc<TestDevice>>,
            before: Bytes,
            fail: bool,
            seen: Mutex<Vec<(Vec<u64>, bool)>>,
        }

        #[async_trait]
        impl CowRegistrar for Checking {
            async fn register(&self, snapshot: u64, chunks: Vec<u64>, copy: bool) -> Result<(), String> {
                assert_eq!(snapshot, 7);
                let cow = self.d.mapping(&self.d.devices).newest.unwrap();
                for &c in &chunks {
                    let range = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
                    let (live_dev, live_at) = placement(&self.d, c * CHUNK, 0);
                    let live = self.devs[live_dev].contents(live_at, CHUNK as u32).await;
                    assert_eq!(&live[..], &self.before[range.clone()], "chunk {c} overwritten before registration");
                    if !copy {
                        for leg in cow.chunk(c, 0, CHUNK).unwrap().legs().unwrap() {
                            let got = self.devs[leg.device.0 as usize].contents(leg.device_offset, CHUNK as u32).await;
                            assert_eq!(
                                &got[..],
                                &self.before[range.clone()],
                                "chunk {c}: COW area lacks the pre-image"
                            );
                        }
                    }
                }
                self.seen.lock().unwrap().push((chunks, copy));
                if self.fail {
                    return Err("refused by the test".into());
                }
                Ok(())
            }
        }

        /// A 4-extent mirrored volume filled with a pattern, then a snapshot.
        async fn snapshotted(
            fail: bool,
            server_copies: bool,
        ) -> (Arc<VolumeDevice>, Arc<Checking>, Vec<Arc<TestDevice>>) {
            let (plain, devs) = testing::volume(4, 2, 3, false);
            let before = pattern(21, (4 * EXTENT) as usize);
            plain.write(0, before.clone(), false).await.unwrap();
            let d = with_snapshot(description(4, 2, 3, 2), CHUNK);
            let checking =
                Arc::new(Checking { d: d.clone(), devs: devs.clone(), before, fail, seen: Mutex::new(Vec::new()) });
            let gate = Arc::new(Gate::new(testing::layout(d, &devs), 2));
            let vol =
                VolumeDevice::new("vol", 1, false, gate).with_cow(Registrations::new(checking.clone(), server_copies));
            (Arc::new(vol), checking, devs)
        }

        #[tokio::test]
        async fn a_write_preserves_each_touched_chunk_once_before_overwriting() {
            let (vol, checking, _devs) = snapshotted(false, false).await;
            // Chunks 1..=4 (crossing an extent boundary at chunk 4).
            let data = pattern(22, (3 * CHUNK) as usize);
            vol.write(CHUNK + 100, data.clone(), false).await.unwrap();
            assert_eq!(checking.seen.lock().unwrap().clone(), vec![(vec![1, 2, 3, 4], false)]);
            assert_eq!(vol.read(CHUNK + 100, data.len() as u32).await.unwrap(), data);
            // Rewrites of preserved chunks register nothing more.
            vol.write(2 * CHUNK, pattern(23, 4096), false).await.unwrap();
            vol.write_zeroes(3 * CHUNK, 4096, ZeroFlags::default()).await.unwrap();
            assert_eq!(checking.seen.lock().unwrap().len(), 1);
            // TRIM and WRITE_ZEROES preserve too.
            vol.trim(8 * CHUNK, 512, false).await.unwrap();
            vol.write_zeroes(12 * CHUNK, 512, ZeroFlags::default()).await.unwrap();
            assert_eq!(checking.seen.lock().unwrap()[1..], [(vec![8], false), (vec![12], false)]);
            assert_eq!(vol.cow_preserved(), Some((7, 6)));
        }

        #[tokio::test]
        async fn a_sequential_writer_registers_once_per_chunk_not_per_block() {
            let (vol, checking, _devs) = snapshotted(false, false).await;
            for i in 0..(4 * CHUNK / 4096) {
                vol.write(i * 4096, pattern(24, 4096), false).await.unwrap();
            }
            let seen = checking.seen.lock().unwrap().clone();
            assert_eq!(seen, (0..4).map(|c| (vec![c], false)).collect::<Vec<_>>());
        }

        #[tokio::test]
        async fn a_refused_registration_fails_the_write_and_leaves_the_volume_alone() {
            let (vol, checking, _devs) = snapshotted(true, false).await;
            let e = vol.write(0, pattern(25, 4096), false).await.unwrap_err();
            assert!(e.message.contains("refused by the test"), "{e}");
            assert_eq!(vol.read(0, 4096).await.unwrap(), checking.before.slice(0..4096));
        }

        #[tokio::test]
        async fn shared_holders_let_the_server_copy() {
            let (vol, checking, devs) = snapshotted(false, true).await;
            let cow_writes_before: u64 = devs.iter().map(|d| d.writes.load(Ordering::SeqCst)).sum();
            vol.write(5 * CHUNK, pattern(26, 4096), false).await.unwrap();
            assert_eq!(checking.seen.lock().unwrap().clone(), vec![(vec![5], true)]);
            let writes: u64 = devs.iter().map(|d| d.writes.load(Ordering::SeqCst)).sum();
            assert_eq!(writes - cow_writes_before, 2, "only the two legs of the write itself");
        }

        #[test]
        fn runs_of_chunks_stop_at_gaps_and_extent_boundaries() {
            let chunks = volume_format::mapping::ChunkLayout { chunk_bytes: CHUNK, size_bytes: 4 * EXTENT };
            assert_eq!(chunks.runs(&[0, 1, 2, 3, 4, 6, 7], EXTENT), vec![(0, 4), (4, 1), (6, 2)]);
            assert!(chunks.runs(&[], EXTENT).is_empty());
        }

        #[tokio::test]
        async fn out_of_range_writes_copy_nothing() {
            let (vol, checking, _devs) = snapshotted(false, false).await;
            let e = vol.write(4 * EXTENT - 512, pattern(27, 1024), false).await.unwrap_err();
            assert_eq!(e.kind, IoErrorKind::Overflow);
            assert!(checking.seen.lock().unwrap().is_empty());
        }

        /// A registrar that holds every registration until the test lets
        /// it go, then checks it as [`Checking`] does.
        struct Held {
            checking: Arc<Checking>,
            hold: Arc<Semaphore>,
        }

        #[async_trait]
        impl CowRegistrar for Held {
            async fn register(&self, snapshot: u64, chunks: Vec<u64>, copy: bool) -> Result<(), String> {
                self.hold.acquire().await.unwrap().forget();
                self.checking.register(snapshot, chunks, copy).await
            }
        }

        /// [`snapshotted`], writing behind, with registrations held.
        async fn behind(fail: bool) -> (Arc<VolumeDevice>, Arc<Checking>, Arc<Semaphore>) {
            let (vol, checking, devs) = snapshotted(fail, false).await;
            let hold = Arc::new(Semaphore::new(0));
            let held = Arc::new(Held { checking: checking.clone(), hold: hold.clone() });
            let d = with_snapshot(description(4, 2, 3, 2), CHUNK);
            drop(vol);
            let gate = Arc::new(Gate::new(testing::layout(d, &devs), 2));
            let vol = VolumeDevice::new("vol", 1, false, gate)
                .with_cow(Registrations::new(held, false))
                .with_write_behind(1 << 20)
                .into_arc();
            (vol, checking, hold)
        }

        async fn settle() {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        }

        #[tokio::test]
        async fn a_first_write_is_acknowledged_before_its_chunk_is_preserved_and_lands_after() {
            let (vol, checking, hold) = behind(false).await;
            let data = pattern(30, 4096);
            vol.write(CHUNK + 4096, data.clone(), false).await.unwrap();
            assert_eq!(vol.writes_behind(), 1);
            assert_eq!(vol.gate().status().in_flight, 1, "a recall waits for it");
            // A read of it and a FLUSH wait for it; a read elsewhere does not.
            let read = tokio::spawn({
                let vol = vol.clone();
                async move { vol.read(CHUNK, 3 * 4096).await }
            });
            let flush = tokio::spawn({
                let vol = vol.clone();
                async move { vol.flush().await }
            });
            assert_eq!(
                vol.read(3 * CHUNK, 4096).await.unwrap(),
                checking.before.slice(3 * CHUNK as usize..).slice(..4096)
            );
            settle().await;
            assert!(!read.is_finished() && !flush.is_finished());
            // Checking asserts at the registration that the live chunk is
            // untouched and the COW area holds its pre-image.
            hold.add_permits(1);
            let got = read.await.unwrap().unwrap();
            assert_eq!(got.slice(4096..8192), data);
            assert_eq!(got.slice(..4096), checking.before.slice(CHUNK as usize..).slice(..4096));
            flush.await.unwrap().unwrap();
            assert_eq!(checking.seen.lock().unwrap().clone(), vec![(vec![1], false)]);
            assert_eq!((vol.writes_behind(), vol.gate().status().in_flight), (0, 0));
        }

        #[tokio::test]
        async fn overlapping_writes_behind_land_in_the_order_acknowledged() {
            let (vol, _checking, hold) = behind(false).await;
            vol.write(2 * CHUNK, pattern(31, 8192), false).await.unwrap();
            vol.write(2 * CHUNK + 4096, pattern(32, 8192), false).await.unwrap();
            assert_eq!(vol.writes_behind(), 2);
            hold.add_permits(4);
            vol.flush().await.unwrap();
            let got = vol.read(2 * CHUNK, 3 * 4096).await.unwrap();
            assert_eq!(got.slice(..4096), pattern(31, 8192).slice(..4096));
            assert_eq!(got.slice(4096..), pattern(32, 8192));
        }

        #[tokio::test]
        async fn a_failed_write_behind_fails_the_next_flush_once_and_leaves_the_volume_alone() {
            let (vol, checking, hold) = behind(true).await;
            vol.write(0, pattern(33, 4096), false).await.unwrap();
            hold.add_permits(1);
            let e = vol.flush().await.unwrap_err();
            assert!(
                e.message.contains("acknowledged before it landed") && e.message.contains("refused by the test"),
                "{e}"
            );
            vol.flush().await.unwrap();
            assert_eq!(vol.read(0, 4096).await.unwrap(), checking.before.slice(0..4096));
        }

        #[tokio::test]
        async fn fua_writes_and_writes_after_a_handover_go_in_line() {
            let (vol, _checking, hold) = behind(false).await;
            let fua = tokio::spawn({
                let vol = vol.clone();
                async move { vol.write(5 * CHUNK, pattern(34, 4096), true).await }
            });
            settle().await;
            assert!(!fua.is_finished(), "a FUA write waits for its chunk");
            assert_eq!(vol.writes_behind(), 0);
            hold.add_permits(1);
            fua.await.unwrap().unwrap();
            // An outstanding write lands before the handover completes.
            vol.write(6 * CHUNK, pattern(35, 4096), false).await.unwrap();
            let handover = tokio::spawn({
                let vol = vol.clone();
                async move { vol.use_server_copies().await }
            });
            settle().await;
            assert!(!handover.is_finished(), "the handover waits for the write behind");
            hold.add_permits(1);
            handover.await.unwrap();
            assert_eq!(vol.writes_behind(), 0);
            let later = tokio::spawn({
                let vol = vol.clone();
                async move { vol.write(7 * CHUNK, pattern(36, 4096), false).await }
            });
            settle().await;
            assert!(!later.is_finished(), "after a handover a first write waits for its chunk");
            hold.add_permits(1);
            later.await.unwrap().unwrap();
        }
    }
}
