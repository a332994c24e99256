//! The fallback data path: data channels, device-failure reports and what the
//! listings say about agents on fallback.
//!
//! When an agent's direct path to a device fails, it reports it
//! ([`Request::ReportDeviceFailure`]) and sends that device's I/O through the
//! server over a **data channel**: a connection that starts with
//! [`DATA_CHANNEL_PREAMBLE`], authenticates like any control connection, asks
//! for one volume and one device ([`Request::DataChannel`]) and, once granted,
//! carries NBD. The server serves it with its own NBD connection to the
//! device, restricted to the extents that volume has there — an agent can
//! never use the server to reach data it does not hold open.
//!
//! Why the grant goes through the owner task like every request: whether an
//! agent holds a volume, and where that volume's extents are, is the owner's
//! state. A channel is bound to the handles its key held on the volume when
//! it was granted, and the owner closes it as soon as they end (closed,
//! expired, broken or revoked: `grants`); the channel also asks again every
//! lease period and closes when the volume's extents on the device changed.
//!
//! A report makes the server check the device itself. If it reaches it, the
//! agent's fallback is recorded for the listings (`volume show`, `client
//! list`). If not, the device is marked failed in the pool metadata
//! (committed before anyone is told), and every holder of a volume on it gets
//! the layout with that device offline: a mirrored volume continues on its
//! other legs, a plain one fails only the I/O that touches the device.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use blockio::client::NbdClient;
use blockio::server::{Export, ExportTable, NbdServer, ServerConfig};
use blockio::uri::NbdUri;
use blockio::{BlockDevice, BlockSizes, IoError, IoErrorKind, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn, Instrument};
use volume_format::control::auth::{ConnectionKind, Role};
use volume_format::control::messages::{
    ClientMessage, ControlError, DataChannelGrant, DeviceCapability, ErrorCode, OpenMode, Request, Response,
    ServerMessage, DATA_CHANNEL_PREAMBLE,
};
use volume_format::metadata::{DeviceState, HandleState, MetaChange};
use volume_format::{DeviceIndex, HandleId, VolumeId};

use super::admission::PreAuth;
use super::core::{AfterCommit, AfterJob, Core, ReplyId, Step};
use super::jobs::{Job, JobOutcome};
use super::owner::Command;
use super::session::SessionContext;
use super::stopped;
use crate::handles::SessionId;
use control_client::framed;
use control_client::handshake;
use control_client::ControlStream;

/// Most data channels served at once (on top of the control-session bound);
/// beyond it a channel is refused with `Unavailable`.
pub const DATA_CHANNELS_MAX: usize = 256;
/// Requests in flight per data channel, and payload bytes held for it.
pub const CHANNEL_REQUESTS_IN_FLIGHT_MAX: usize = 64;
pub const CHANNEL_IN_FLIGHT_BYTES_MAX: usize = 32 << 20;
/// How long each step of checking a device an agent reported may take (a
/// read on the existing connection, then a new connection and a read),
/// before the server decides it cannot reach it either. The check is a job
/// (the owner never waits for it), but it runs where metadata commits run,
/// so it is kept short.
pub const DEVICE_CHECK_TIMEOUT: Duration = Duration::from_millis(1000);
/// Time a data channel has to connect to its device.
pub const CHANNEL_DEVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A device request of a data channel without an answer after this fails.
pub const CHANNEL_DEVICE_TIMEOUT: Duration = Duration::from_secs(30);
/// Fallback records kept (agent, device pairs).
pub const FALLBACK_RECORDS_MAX: usize = 4096;

static CHANNEL_SLOTS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(DATA_CHANNELS_MAX)));

/// A slot for one more data or backup connection (the backup socket's
/// included), if fewer than [`DATA_CHANNELS_MAX`] are open.
pub(super) fn channel_slot() -> Option<tokio::sync::OwnedSemaphorePermit> {
    CHANNEL_SLOTS.clone().try_acquire_owned().ok()
}

/// Which agents do which device's I/O through the server, and why.
#[derive(Debug, Default)]
pub struct FallbackTable {
    entries: BTreeMap<([u8; 32], u32), FallbackRecord>,
}

#[derive(Debug, Clone)]
pub struct FallbackRecord {
    pub client: String,
    pub reason: String,
    pub since_unix_secs: u64,
}

impl FallbackTable {
    pub fn record(&mut self, key: [u8; 32], device: u32, record: FallbackRecord) {
        if self.entries.len() >= FALLBACK_RECORDS_MAX && !self.entries.contains_key(&(key, device)) {
            warn!(device, "too many fallback records; not recording this one");
            return;
        }
        self.entries.entry((key, device)).or_insert(record);
    }

    pub fn clear(&mut self, key: [u8; 32], device: u32) -> bool {
        self.entries.remove(&(key, device)).is_some()
    }

    fn of_key(&self, key: [u8; 32]) -> impl Iterator<Item = (u32, &FallbackRecord)> {
        self.entries.range((key, 0)..=(key, u32::MAX)).map(|((_, d), r)| (*d, r))
    }
}

impl Core {
    fn device_uri(&self, device: u32) -> String {
        self.meta.device(DeviceIndex(device)).map_or_else(|| "?".to_string(), |d| d.uri.clone())
    }

    fn connected(&self, key: [u8; 32]) -> bool {
        self.sessions.values().any(|p| p.key == key)
    }

    /// `client list`: "device N (URI): REASON" for a connected agent key.
    pub fn fallback_of_client(&self, key: [u8; 32]) -> Vec<String> {
        if !self.connected(key) {
            return Vec::new();
        }
        self.fallback
            .of_key(key)
            .map(|(d, r)| format!("device {d} ({}): {} (since {})", self.device_uri(d), r.reason, r.since_unix_secs))
            .collect()
    }

    /// `volume show`: "CLIENT: device N on fallback (REASON)" for holders of `volume`.
    pub fn fallback_of_volume(&self, volume: VolumeId) -> Vec<String> {
        let Some(v) = self.meta.volume(volume) else { return Vec::new() };
        let mut devices: Vec<u32> = v.extents.iter().flat_map(|e| e.legs.iter().map(|l| l.device.0)).collect();
        devices.sort_unstable();
        devices.dedup();
        let mut keys: Vec<[u8; 32]> = self
            .meta
            .handles
            .iter()
            .filter(|h| h.volume == volume && matches!(h.state, HandleState::Active))
            .map(|h| h.agent_key.0)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::new();
        for key in keys.into_iter().filter(|k| self.connected(*k)) {
            for (d, r) in self.fallback.of_key(key).filter(|(d, _)| devices.contains(d)) {
                out.push(format!("{}: device {d} on fallback ({})", r.client, r.reason));
            }
        }
        out
    }

    fn peer_of(&self, session: SessionId) -> Result<control_client::handshake::Peer, ControlError> {
        self.sessions
            .get(&session)
            .cloned()
            .ok_or_else(|| ControlError::new(ErrorCode::Unavailable, "session is closing"))
    }

    /// What a data channel of this session's key for `volume` on `device` may
    /// do. A data channel is bound to the handles the key holds on the
    /// volume now, and closes when they end (`grants`).
    pub fn data_channel_grant(
        &mut self,
        session: SessionId,
        volume: u64,
        device: u32,
    ) -> Result<Response, ControlError> {
        let peer = self.peer_of(session)?;
        let v = self.meta.volume(VolumeId(volume)).ok_or_else(|| {
            ControlError::new(ErrorCode::NotFound, format!("no volume with id {volume}; it was deleted"))
        })?;
        let handles = self.handles_of(peer.key, volume);
        let modes: Vec<OpenMode> =
            self.meta.handles.iter().filter(|h| handles.contains(&h.id.0)).map(|h| h.mode).collect();
        if modes.is_empty() {
            return Err(ControlError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "{} holds no open handle on volume {}; open it before asking for a data channel",
                    peer.name, v.name
                ),
            ));
        }
        let record = self
            .meta
            .device(DeviceIndex(device))
            .ok_or_else(|| ControlError::new(ErrorCode::NotFound, format!("the pool has no device {device}")))?;
        if let DeviceState::Failed { reason, .. } = &record.state {
            return Err(ControlError::new(
                ErrorCode::Unavailable,
                format!("device {device} ({}) is marked failed in the pool: {reason}", record.uri),
            ));
        }
        // The volume's extents and its newest snapshot's copy-on-write area
        // (where the agent copies pre-images before overwriting).
        let map = self.meta.volume_map(v.id).map_err(|e| ControlError::new(ErrorCode::NotFound, e.to_string()))?;
        let mut ranges: Vec<(u64, u64)> = map
            .physical_extents()
            .filter(|l| l.device.0 == device)
            .map(|l| (l.offset, self.meta.extent_bytes))
            .collect();
        if ranges.is_empty() {
            return Err(ControlError::new(
                ErrorCode::InvalidArgument,
                format!("volume {} has no extent on device {device}", v.name),
            ));
        }
        ranges.sort_unstable();
        let ranges = merge_ranges(ranges);
        let layout_generation = v.layout_generation;
        self.bind_data_channel(session, handles);
        Ok(Response::DataChannel(DataChannelGrant {
            volume: VolumeId(volume),
            device: DeviceIndex(device),
            layout_generation,
            read_only: modes.iter().all(|m| *m == OpenMode::ReadOnly),
            ranges,
        }))
    }

    /// Capabilities for `handle` on every device of its volume
    /// ([`Request::Capabilities`]): only for the key that holds it, active
    /// (a broken or closed handle gets none), writable in the volume's
    /// extents on each device (nothing for a read-only handle). Signed
    /// here, without I/O: an ed25519 signature per device.
    pub fn handle_capabilities(&self, session: SessionId, handle: HandleId) -> Result<Response, ControlError> {
        let peer = self.peer_of(session)?;
        let record = self
            .meta
            .handles
            .iter()
            .find(|h| h.id == handle && h.agent_key.0 == peer.key && matches!(h.state, HandleState::Active))
            .ok_or_else(|| {
                ControlError::new(
                    ErrorCode::HandleBroken,
                    format!(
                        "handle {handle} is not open by {} (closed, broken by another open, or another client's); \
                         stop I/O on it and reopen the volume",
                        peer.name
                    ),
                )
            })?;
        let v = self.meta.volume(record.volume).ok_or_else(|| {
            ControlError::new(ErrorCode::NotFound, format!("no volume with id {}; it was deleted", record.volume))
        })?;
        let map = self.meta.volume_map(v.id).map_err(|e| ControlError::new(ErrorCode::NotFound, e.to_string()))?;
        let mut by_device: BTreeMap<DeviceIndex, Vec<(u64, u64)>> = BTreeMap::new();
        for leg in map.physical_extents() {
            by_device.entry(leg.device).or_default().push((leg.offset, self.meta.extent_bytes));
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut devices = Vec::with_capacity(by_device.len());
        for (index, mut ranges) in by_device {
            let Some(device) = self.meta.device(index) else { continue };
            let ranges = if record.mode == OpenMode::ReadOnly {
                Vec::new()
            } else {
                ranges.sort_unstable();
                merge_ranges(ranges)
            };
            let capability = crate::targets::handle_capability(&self.key, handle, device.device_uuid, &ranges, now);
            devices.push(DeviceCapability { device: index, capability });
        }
        Ok(Response::Capabilities { handle, layout_generation: v.layout_generation, devices })
    }

    /// An agent cannot reach `device` directly. The server checks whether it
    /// reaches the device itself (a job: never in the owner loop); the
    /// answer is the device as the server sees it afterwards (`state` says
    /// whether it was marked failed).
    pub(super) fn prepare_report_device_failure(
        &mut self,
        session: SessionId,
        device: u32,
        reason: String,
        reply: ReplyId,
    ) -> Step {
        let peer = match self.peer_of(session) {
            Ok(p) => p,
            Err(e) => return Step::Done(Some((reply, Err(e)))),
        };
        let Some(record) = self.meta.device(DeviceIndex(device)).cloned() else {
            let e = ControlError::new(ErrorCode::NotFound, format!("the pool has no device {device}"));
            return Step::Done(Some((reply, Err(e))));
        };
        let reason: String = reason.chars().take(512).collect();
        warn!(client = %peer.name, device, uri = %record.uri, %reason, "agent reports its direct path to a device failed");
        if matches!(record.state, DeviceState::Failed { .. }) {
            return Step::Done(Some((reply, Ok(Response::Devices(self.device_infos(|d| d.index.0 == device))))));
        }
        let job = Job::CheckDevice { index: device, uuid: record.device_uuid };
        Step::Job { job, busy: None, then: AfterJob::DeviceChecked { session, device, reason, reply } }
    }

    /// The server's own check of a reported device came back.
    pub(super) fn device_checked(
        &mut self,
        session: SessionId,
        device: u32,
        reason: String,
        reply: ReplyId,
        outcome: JobOutcome,
    ) -> Step {
        let peer_name = self.sessions.get(&session).map_or_else(|| "an agent".to_string(), |p| p.name.clone());
        match outcome.result {
            Ok(()) => {
                info!(client = %peer_name, device, "the server reaches the device: the agent uses the fallback path");
                if let Some(peer) = self.sessions.get(&session) {
                    let record = FallbackRecord { client: peer_name, reason, since_unix_secs: self.now.unix_secs() };
                    self.fallback.record(peer.key, device, record);
                }
                let devices = self.device_infos(|d| d.index.0 == device);
                Step::Done(Some((reply, Ok(Response::Devices(devices)))))
            }
            Err(server_reason) => {
                let why =
                    format!("unreachable from {peer_name} ({reason}) and from the metadata server ({server_reason})");
                self.prepare_device_failed(device, why, Some(reply))
            }
        }
    }

    /// Commits `device` as failed (then publishes the changed layouts).
    pub(super) fn prepare_device_failed(&mut self, device: u32, reason: String, reply: Option<ReplyId>) -> Step {
        // A device resyncing fails again like an online one (its resync
        // starts over once it answers a probe again).
        self.resyncs.remove(&DeviceIndex(device));
        let failed = |d: &volume_format::metadata::DeviceRecord| matches!(d.state, DeviceState::Failed { .. });
        if self.meta.device(DeviceIndex(device)).is_none_or(failed) {
            let devices = self.device_infos(|d| d.index.0 == device);
            return Step::Done(reply.map(|r| (r, Ok(Response::Devices(devices)))));
        }
        let state = DeviceState::Failed { reason: reason.clone(), since_unix_secs: self.now.unix_secs() };
        // Every region dirty now may have missed the device (a write in
        // flight): stale for it, in this very commit — before any agent
        // acknowledges a write that skipped the device (`intent`).
        let mut changes = self.device_failed_intents(DeviceIndex(device));
        changes.push(MetaChange::DeviceState { device: DeviceIndex(device), state });
        Step::Commit { changes, then: AfterCommit::DeviceFailed { device, reason, reply } }
    }

    pub(super) fn finish_device_failed(
        &mut self,
        device: u32,
        reason: String,
        reply: Option<ReplyId>,
        result: Result<(), ControlError>,
    ) {
        if let Err(e) = result {
            if let Some(reply) = reply {
                self.reply(reply, Err(e));
            }
            return;
        }
        tracing::error!(device, %reason, "device marked failed in the pool metadata");
        let affected: Vec<VolumeId> = self
            .meta
            .volumes
            .iter()
            .filter(|v| v.extents.iter().any(|e| e.legs.iter().any(|l| l.device.0 == device)))
            .map(|v| v.id)
            .collect();
        for volume in affected {
            // A pending reconfiguration publishes the new state itself when
            // it finishes; publishing now would reopen a recalled gate.
            if !self.pending_changes.contains_key(&volume) {
                self.publish_volume(volume, &[]);
            }
        }
        if let Some(reply) = reply {
            let devices = self.device_infos(|d| d.index.0 == device);
            self.reply(reply, Ok(Response::Devices(devices)));
        }
    }

    pub fn report_device_recovered(&mut self, session: SessionId, device: u32) -> Result<Response, ControlError> {
        let peer = self.peer_of(session)?;
        if self.fallback.clear(peer.key, device) {
            info!(client = %peer.name, device, "agent is back on its direct path to the device");
        }
        Ok(Response::Done)
    }
}

/// Merges sorted `(offset, len)` ranges that touch.
fn merge_ranges(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (offset, len) in sorted {
        match out.last_mut() {
            Some((o, l)) if *o + *l >= offset => *l = (*l).max(offset + len - *o),
            _ => out.push((offset, len)),
        }
    }
    out
}

/// A device that admits only requests inside `ranges` (sorted, merged).
pub struct RestrictedDevice {
    inner: Arc<dyn BlockDevice>,
    ranges: Vec<(u64, u64)>,
    read_only: bool,
    name: String,
}

impl RestrictedDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, grant: &DataChannelGrant) -> RestrictedDevice {
        RestrictedDevice {
            inner,
            ranges: grant.ranges.clone(),
            read_only: grant.read_only,
            name: format!("volume {} on device {}", grant.volume, grant.device),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let end = offset.checked_add(len).ok_or_else(|| IoError::invalid("offset + length overflows"))?;
        let i = self.ranges.partition_point(|(o, _)| *o <= offset);
        let inside = i > 0 && {
            let (o, l) = self.ranges[i - 1];
            end <= o + l
        };
        if !inside {
            return Err(IoError::new(
                IoErrorKind::PermissionDenied,
                format!("{}: bytes {offset}..{end} are outside the extents this data channel grants", self.name),
            ));
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::new(IoErrorKind::PermissionDenied, format!("{}: read-only data channel", self.name)));
        }
        self.check(offset, len)
    }
}

#[async_trait::async_trait]
impl BlockDevice for RestrictedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.check(offset, u64::from(len))?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.check_write(offset, data.len() as u64)?;
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.check_write(offset, u64::from(len))?;
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.check_write(offset, u64::from(len))?;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.check(offset, u64::from(len))?;
        self.inner.block_status(context, offset, len).await
    }
    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.check(offset, u64::from(len))?;
        self.inner.cache(offset, len).await
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Rewound<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let pos = self.pos;
            buf.put_slice(&self.prefix[pos..pos + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accept-path hook: a connection that starts with the data-channel
/// preamble is served here, any other goes to the control session with the
/// bytes read put back.
pub async fn route(
    mut stream: Box<dyn ControlStream>,
    peer: String,
    session: u64,
    ctx: Arc<SessionContext>,
    mut stop: watch::Receiver<bool>,
    mut preauth: PreAuth,
) {
    let mut first = [0u8; DATA_CHANNEL_PREAMBLE.len()];
    let read = tokio::select! {
        r = tokio::time::timeout_at(preauth.deadline, stream.read_exact(&mut first)) => r,
        why = preauth.evicted() => return debug!(%peer, "closed before its first bytes: {why}"),
        _ = stopped(&mut stop) => return,
    };
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return debug!(%peer, "connection closed before its first bytes: {e}"),
        Err(_) => return debug!(%peer, "no bytes within the handshake deadline; closing"),
    }
    if first == DATA_CHANNEL_PREAMBLE {
        let span = tracing::info_span!("data_channel", id = session, %peer);
        return serve_channel(stream, peer, session, ctx, stop, preauth).instrument(span).await;
    }
    let stream: Box<dyn ControlStream> = Box::new(Rewound { prefix: first.to_vec(), pos: 0, inner: stream });
    super::session::run(stream, peer, session, ctx, stop, preauth).await
}

async fn ask(ctx: &SessionContext, session: SessionId, request: Request) -> Result<Response, ControlError> {
    let (reply, rx) = oneshot::channel();
    let unavailable = || ControlError::new(ErrorCode::Unavailable, "the server is shutting down");
    ctx.commands.send(Command::Request { session, request, reply }).await.map_err(|_| unavailable())?;
    rx.await.map_err(|_| unavailable())?
}

async fn serve_channel(
    stream: Box<dyn ControlStream>,
    peer: String,
    session: u64,
    ctx: Arc<SessionContext>,
    mut stop: watch::Receiver<bool>,
    preauth: PreAuth,
) {
    let (mut stream, who) = tokio::select! {
        r = ctx.accept(stream, session, ConnectionKind::Channel, preauth) => match r {
            Ok(accepted) => accepted,
            Err(e) => return warn!(%peer, "data channel handshake failed: {e}"),
        },
        _ = stopped(&mut stop) => return,
    };
    stream.set_label(format!("channel from {peer} ({} {})", who.role, who.name));
    let first =
        tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, framed::read_message::<ClientMessage, _>(&mut stream));
    let ClientMessage { id, request } = match first.await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return warn!(client = %who.name, "data channel: bad first message: {e}"),
        Err(_) => return warn!(client = %who.name, "data channel: no request within the handshake timeout"),
    };
    let refuse = |code, message: String| ServerMessage::Reply { id, result: Err(ControlError::new(code, message)) };
    let (allowed, who_may) = match &request {
        Request::BackupChannel => {
            (matches!(who.role, Role::Admin | Role::Backup), "backup channels are for admin and backup keys")
        }
        Request::DataChannel { .. } => (who.role == Role::Agent, "data channels are for agents"),
        _ => {
            let msg = refuse(
                ErrorCode::InvalidArgument,
                "a data channel must start with a DataChannel or BackupChannel request".into(),
            );
            let _ = framed::write_message(&mut stream, &msg).await;
            return;
        }
    };
    if !allowed {
        let msg = refuse(ErrorCode::PermissionDenied, format!("{who_may}, not {}", who.role));
        let _ = framed::write_message(&mut stream, &msg).await;
        return;
    }
    let Some(_slot) = channel_slot() else {
        let msg =
            refuse(ErrorCode::Unavailable, format!("the server serves {DATA_CHANNELS_MAX} data channels already"));
        let _ = framed::write_message(&mut stream, &msg).await;
        return;
    };
    if let Some((owner, me)) = &ctx.standby {
        let why = super::standby::not_active_message(owner.borrow().as_ref(), me);
        let _ = framed::write_message(&mut stream, &refuse(ErrorCode::NotActive, why)).await;
        return;
    }
    // Registered as a session (no handles of its own) so the owner knows
    // whose key asks and can close it like any session: when the key is
    // revoked or its role changes, or (a data channel) its handle ends.
    let (out, mut out_rx) = mpsc::channel::<ServerMessage>(1);
    let (kick, mut kicked) = oneshot::channel();
    let connected = Command::Connected { session, peer: who.clone(), addr: peer.clone(), out, kick };
    if ctx.commands.send(connected).await.is_err() {
        return;
    }
    let Request::DataChannel { volume, device } = request else {
        // A backup channel: NBD over every snapshot, until the peer leaves.
        // The committed metadata is published while this channel reads it.
        let _reader = ctx.read_meta().await;
        let scope = ctx.meta.borrow().scope_of(&volume_format::PublicKey(who.key)).map(<[String]>::to_vec);
        let ok = ServerMessage::Reply { id, result: Ok(Response::Done) };
        if framed::write_message(&mut stream, &ok).await.is_ok() {
            tokio::select! {
                _ = super::backup_export::serve(stream, ctx.meta.clone(), &who.name, scope) => {}
                _ = &mut kicked => info!(client = %who.name, "backup channel closed by the server"),
                _ = stopped(&mut stop) => {}
            }
        }
        let _ = ctx.commands.send(Command::Disconnected { session }).await;
        return;
    };
    let stream: Box<dyn ControlStream> = Box::new(stream);
    serve_granted(stream, &ctx, session, id, volume, device, &who.name, &mut kicked, &mut out_rx, &mut stop).await;
    let _ = ctx.commands.send(Command::Disconnected { session }).await;
    debug!("data channel ended");
}

#[allow(clippy::too_many_arguments)]
async fn serve_granted(
    mut stream: Box<dyn ControlStream>,
    ctx: &SessionContext,
    session: SessionId,
    id: u64,
    volume: VolumeId,
    device: DeviceIndex,
    client: &str,
    kicked: &mut oneshot::Receiver<()>,
    events: &mut mpsc::Receiver<ServerMessage>,
    stop: &mut watch::Receiver<bool>,
) {
    let result = ask(ctx, session, Request::DataChannel { volume, device }).await;
    let grant = match result {
        Ok(Response::DataChannel(grant)) => grant,
        Ok(other) => {
            let e = ControlError::new(ErrorCode::Internal, format!("unexpected grant answer {other:?}"));
            let _ = framed::write_message(&mut stream, &ServerMessage::Reply { id, result: Err(e) }).await;
            return;
        }
        Err(e) => {
            info!(client, %volume, %device, "data channel refused: {e}");
            let _ = framed::write_message(&mut stream, &ServerMessage::Reply { id, result: Err(e) }).await;
            return;
        }
    };
    // The server's own connection to the device.
    let uri = match ask_uri(ctx, session, device).await {
        Some(uri) => uri,
        None => {
            let e = ControlError::new(ErrorCode::NotFound, format!("the server has no URI for device {device}"));
            let _ = framed::write_message(&mut stream, &ServerMessage::Reply { id, result: Err(e) }).await;
            return;
        }
    };
    let mut opts = crate::pool::device::client_options();
    opts.request_timeout = Some(CHANNEL_DEVICE_TIMEOUT);
    opts.connect_timeout = CHANNEL_DEVICE_CONNECT_TIMEOUT;
    let connected = match uri.parse::<NbdUri>() {
        Ok(u) => NbdClient::connect(&u, opts).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let client_dev = match connected {
        Ok(c) => c,
        Err(e) => {
            warn!(client, %device, %uri, "data channel: the server cannot reach the device either: {e}");
            let reason = format!("data channel for {client}: {e}");
            let _ = ask(ctx, session, Request::ReportDeviceFailure { device, reason }).await;
            let e = ControlError::new(
                ErrorCode::Unavailable,
                format!("the metadata server cannot reach device {device} ({uri}) either: {e}"),
            );
            let _ = framed::write_message(&mut stream, &ServerMessage::Reply { id, result: Err(e) }).await;
            return;
        }
    };
    let ok = ServerMessage::Reply { id, result: Ok(Response::DataChannel(grant.clone())) };
    if let Err(e) = framed::write_message(&mut stream, &ok).await {
        client_dev.disconnect().await;
        return debug!("data channel closed before its grant was sent: {e}");
    }
    info!(client, %volume, %device, ranges = grant.ranges.len(), read_only = grant.read_only, "data channel open");
    let table = ExportTable::new();
    table.insert(Export {
        name: String::new(),
        description: format!("sanvol fallback: volume {volume} on device {device}"),
        device: Arc::new(RestrictedDevice::new(Arc::new(client_dev.clone()), &grant)),
        read_only: grant.read_only,
    });
    table.set_default(Some(String::new()));
    let config = ServerConfig {
        in_flight_bytes_max: CHANNEL_IN_FLIGHT_BYTES_MAX,
        requests_in_flight_max: CHANNEL_REQUESTS_IN_FLIGHT_MAX,
        ..ServerConfig::default()
    };
    let server = NbdServer::new(Arc::new(table), config);
    let recheck = Duration::from_millis(ctx.lease_ms.max(100));
    let still_granted = async {
        loop {
            tokio::time::sleep(recheck).await;
            match ask(ctx, session, Request::DataChannel { volume, device }).await {
                Ok(Response::DataChannel(g)) if g.ranges == grant.ranges && g.read_only == grant.read_only => {}
                Ok(_) => return "the volume's layout on the device changed".to_string(),
                Err(e) => return e.message,
            }
        }
    };
    let drain_events = async { while events.recv().await.is_some() {} };
    tokio::select! {
        r = server.serve_connection(stream) => if let Err(e) = r { debug!("data channel NBD connection ended: {e}") },
        why = still_granted => info!(client, %volume, %device, "closing the data channel: {why}"),
        _ = kicked => info!(client, "data channel closed by the server"),
        _ = stopped(stop) => {}
        _ = drain_events => {}
    }
    client_dev.disconnect().await;
}

async fn ask_uri(ctx: &SessionContext, session: SessionId, device: DeviceIndex) -> Option<String> {
    // The URI is part of the owner's state too; PoolStatus-like requests do
    // not carry it, so the device listing is asked for it.
    match ask(ctx, session, Request::DeviceList).await {
        Ok(Response::Devices(list)) => list.into_iter().find(|d| d.index == device).map(|d| d.uri),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use blockio::memory::MemoryDevice;

    fn grant(read_only: bool) -> DataChannelGrant {
        DataChannelGrant {
            volume: VolumeId(1),
            device: DeviceIndex(0),
            layout_generation: 1,
            read_only,
            ranges: vec![(8192, 8192), (32768, 4096)],
        }
    }

    #[tokio::test]
    async fn a_channel_reaches_only_the_granted_ranges() {
        let dev = RestrictedDevice::new(Arc::new(MemoryDevice::new(1 << 20)), &grant(false));
        dev.write(8192, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
        assert_eq!(dev.read(12288, 4096).await.unwrap(), Bytes::from(vec![7u8; 4096]));
        dev.read(32768, 4096).await.unwrap();
        for (offset, len) in [(0u64, 512u32), (4096, 8192), (12288, 8192), (16384, 1), (32768 + 4095, 2), (u64::MAX, 1)]
        {
            let e = dev.read(offset, len).await.unwrap_err();
            assert!(
                matches!(e.kind, IoErrorKind::PermissionDenied | IoErrorKind::InvalidArgument),
                "{offset}+{len}: {e}"
            );
        }
        let e = dev.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap_err();
        assert_eq!(e.kind, IoErrorKind::PermissionDenied, "the label is outside every grant: {e}");
        assert!(e.message.contains("outside the extents"), "{e}");
        assert_eq!(dev.trim(16384, 4096, false).await.unwrap_err().kind, IoErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn a_read_only_grant_refuses_every_write() {
        let dev = RestrictedDevice::new(Arc::new(MemoryDevice::new(1 << 20)), &grant(true));
        assert!(dev.is_read_only());
        dev.read(8192, 4096).await.unwrap();
        let e = dev.write(8192, Bytes::from(vec![1u8; 4096]), false).await.unwrap_err();
        assert_eq!(e.kind, IoErrorKind::PermissionDenied);
        let zero = dev.write_zeroes(8192, 4096, ZeroFlags::default()).await.unwrap_err();
        assert_eq!(zero.kind, IoErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn a_rewound_stream_gives_back_the_sniffed_bytes_first() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"world").await.unwrap();
        drop(a);
        let mut r = Rewound { prefix: b"hello ".to_vec(), pos: 0, inner: b };
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn ranges_merge_when_they_touch() {
        assert_eq!(merge_ranges(vec![(0, 10), (10, 5), (20, 5), (22, 10)]), vec![(0, 15), (20, 12)]);
        assert_eq!(merge_ranges(vec![]), vec![]);
    }
}
