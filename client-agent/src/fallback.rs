//! Fallback I/O through the metadata server, for when the agent's direct
//! path to a device fails.
//!
//! Three pieces:
//! - [`PathState`]: direct or fallback, and when to probe the direct path
//!   again — a plain state machine over injected milliseconds, so every
//!   transition is unit-tested without sockets or sleeps.
//! - [`ServerLink`]: what the agent says to the server about paths
//!   (`ReportDeviceFailure`/`ReportDeviceRecovered`, on a small control
//!   connection of its own, so this module needs nothing from the session)
//!   and how it opens **data channels** (preamble, handshake,
//!   `Request::DataChannel`, then NBD over the same stream).
//! - [`FallbackDevice`]: one device of one volume's layout as a
//!   [`BlockDevice`]. While the device's direct path is up, a request costs one
//!   atomic load more than before; when a request fails on the path (connect
//!   refused, reset, NBD I/O error, timeout) the device switches to fallback,
//!   the request is re-sent through the server, and so is every later
//!   request until a probe finds the direct path working again.
//!
//! Why re-sending a failed write is safe: NBD writes are idempotent (same
//! bytes, same offset), and a write is acknowledged to the volume only after
//! one path acknowledged it — so an acknowledged write is on the device
//! whichever path carried it.
//!
//! Why fallback I/O waits out a server restart: while the direct path is
//! down, the server is the volume's only path, and an I/O error handed up
//! becomes a filesystem error or a failed VM disk. So when the server cannot
//! be reached or does not serve data channels yet (restarting, in its grace
//! period) — or a data channel breaks because the server died — the request
//! waits and retries (pauses from [`CHANNEL_RETRY_PAUSE_MIN_MS`] doubling to
//! [`CHANNEL_RETRY_PAUSE_MAX_MS`]) for up to [`FALLBACK_HOLD_MAX`], as the
//! gate holds I/O while a lease cannot be renewed. Safe, because the server
//! is the fence on this path: it grants a data channel only for a volume the
//! agent still holds a handle on. A refusal, a device the server cannot
//! reach either, or an NBD error the server returns, fail the request as
//! before.
//!
//! Why a failed write is re-sent only once the longest device request has
//! passed since it was sent directly: a write that timed out (or whose
//! connection broke) may still be queued inside the device's NBD server and
//! land later — after the copy re-sent through the server, and after a newer
//! write to the same block. A device server executes a request within the
//! longest device request time or never (the fencing timing rules,
//! `volume_format::fencing`), so once that time has passed since the direct
//! send, the direct copy has landed or never will, and the re-sent copy is
//! the last. A direct request times out at that same time
//! ([`crate::devices::PoolOptions::request_timeout`]), so the wait costs
//! nothing then; writes that failed early with it (their connection closed
//! under them) wait the rest. Later requests go through the server at once.

//! Why a data-changing request that failed on the direct path leaves the
//! next ones on the server's path until one is answered there
//! (`FallbackDevice::write_owed`): a device can answer reads — the probe
//! that brings the direct path back — and refuse writes. A write re-sent
//! after its direct copy's wait may find the lease it was sent under
//! passed and be tried again after the renewal; down the direct path
//! again, it would loop for ever instead of failing with the server's
//! answer (`tests/tests/intent.rs`).

//! When the server cannot reach the device either, it marks the device failed
//! in the pool metadata (committed before it answers) and publishes the
//! layout with the device offline. The device's [`FallbackDevice::marked_failed`]
//! flag lets the volume treat a leg that failed *because* the device was
//! marked failed as absent rather than as a failed write: a mirror continues on
//! its other legs, a plain volume fails only the I/O touching the device.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockio::client::{ClientOptions, NbdClient};
use blockio::{BlockDevice, BlockSizes, IoError, IoErrorKind, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use control_client::channel::{self, ChannelIdentity};
use control_client::{ControlAddr, ControlClient};
use tokio::sync::mpsc;
use tracing::{info, warn};
use volume_format::control::auth::Role;
use volume_format::control::messages::{DataChannelGrant, Request, Response, ServerEvent};

use volume_format::{DeviceIndex, HandleId, VolumeId};

use crate::devices::HandleLeg;
use crate::session::SessionConfig;

/// First and longest wait between probes of a failed direct path.
pub const PROBE_BACKOFF_MIN_MS: u64 = 200;
pub const PROBE_BACKOFF_MAX_MS: u64 = 5_000;
/// Time to open a data channel (connect, handshake, grant, NBD handshake).
pub const CHANNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A request on a data channel without a reply after this fails.
pub const CHANNEL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for a report to the server.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause between tries while the server cannot serve a
/// data channel (unreachable, restarting).
pub const CHANNEL_RETRY_PAUSE_MIN_MS: u64 = 50;
pub const CHANNEL_RETRY_PAUSE_MAX_MS: u64 = 1_000;
/// How long a fallback request waits for the server at most before it fails.
pub const FALLBACK_HOLD_MAX: Duration = Duration::from_secs(600);
/// Tries of a request on data channels that answer with an I/O error (a
/// channel that breaks — the server died — is retried until
/// [`FALLBACK_HOLD_MAX`] instead).
pub const CHANNEL_IO_ATTEMPTS_MAX: u32 = 2;

/// Which path a device's I/O takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMode {
    Direct,
    Fallback {
        since_ms: u64,
        reason: String,
        /// When to probe the direct path next.
        next_probe_ms: u64,
        backoff_ms: u64,
        probes_failed: u64,
    },
}

/// What a transition asks the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAction {
    None,
    /// Tell the server the direct path failed, and start probing.
    ReportFailure(String),
    /// Tell the server the direct path works again.
    ReportRecovered,
}

/// The failover state of one device's direct path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    pub mode: PathMode,
}

impl Default for PathState {
    fn default() -> PathState {
        PathState { mode: PathMode::Direct }
    }
}

impl PathState {
    pub fn is_direct(&self) -> bool {
        self.mode == PathMode::Direct
    }

    /// A request on the direct path failed with `reason` at `now_ms`. Only the
    /// first failure switches (and asks for a report); later ones while on
    /// fallback change nothing.
    pub fn direct_failed(&mut self, now_ms: u64, reason: impl Into<String>) -> PathAction {
        match self.mode {
            PathMode::Direct => {
                let reason = reason.into();
                self.mode = PathMode::Fallback {
                    since_ms: now_ms,
                    reason: reason.clone(),
                    next_probe_ms: now_ms + PROBE_BACKOFF_MIN_MS,
                    backoff_ms: PROBE_BACKOFF_MIN_MS,
                    probes_failed: 0,
                };
                PathAction::ReportFailure(reason)
            }
            PathMode::Fallback { .. } => PathAction::None,
        }
    }

    /// When the next probe is due (None on the direct path).
    pub fn next_probe_ms(&self) -> Option<u64> {
        match self.mode {
            PathMode::Direct => None,
            PathMode::Fallback { next_probe_ms, .. } => Some(next_probe_ms),
        }
    }

    pub fn probe_due(&self, now_ms: u64) -> bool {
        self.next_probe_ms().is_some_and(|at| now_ms >= at)
    }

    /// A probe at `now_ms` failed: wait twice as long (capped) for the next.
    pub fn probe_failed(&mut self, now_ms: u64) {
        if let PathMode::Fallback { next_probe_ms, backoff_ms, probes_failed, .. } = &mut self.mode {
            *backoff_ms = (*backoff_ms * 2).min(PROBE_BACKOFF_MAX_MS);
            *next_probe_ms = now_ms + *backoff_ms;
            *probes_failed += 1;
        }
    }

    /// A probe succeeded: back to the direct path.
    pub fn probe_succeeded(&mut self) -> PathAction {
        match self.mode {
            PathMode::Direct => PathAction::None,
            PathMode::Fallback { .. } => {
                self.mode = PathMode::Direct;
                PathAction::ReportRecovered
            }
        }
    }

    /// Why the device is on fallback, for listings.
    pub fn reason(&self) -> Option<&str> {
        match &self.mode {
            PathMode::Direct => None,
            PathMode::Fallback { reason, .. } => Some(reason),
        }
    }
}

/// Whether an error says the *path* failed (and another path may work), as
/// opposed to a refusal the device would repeat on any path.
pub fn is_path_error(e: &IoError) -> bool {
    matches!(e.kind, IoErrorKind::Io | IoErrorKind::Shutdown | IoErrorKind::OutOfMemory)
}

/// The agent's line to the server for fallback: reports and data channels.
pub struct ServerLink {
    config: SessionConfig,
    /// A control connection for reports (opened on first use, reopened when
    /// it breaks), with its event channel kept open.
    control: tokio::sync::Mutex<Option<(ControlClient, mpsc::Receiver<ServerEvent>)>>,
}

impl ServerLink {
    pub fn new(config: SessionConfig) -> Arc<ServerLink> {
        Arc::new(ServerLink { config, control: tokio::sync::Mutex::new(None) })
    }

    /// The server addresses, in the order the session tries them.
    fn addrs(&self) -> impl Iterator<Item = &ControlAddr> {
        std::iter::once(&self.config.addr).chain(self.config.more_addrs.iter())
    }

    async fn request(&self, request: Request) -> Result<Response, String> {
        self.request_typed(request).await.map_err(|e| e.to_string())
    }

    async fn request_typed(&self, request: Request) -> Result<Response, LinkError> {
        let mut control = self.control.lock().await;
        if control.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            let c = &self.config;
            let mut errors = Vec::new();
            for addr in self.addrs() {
                match ControlClient::connect(addr, &c.key, Some(&c.server_key), Role::Agent, &c.name, c.instance).await
                {
                    Ok(connected) => {
                        *control = Some(connected);
                        break;
                    }
                    Err(e) => errors.push(format!("{addr}: {e}")),
                }
            }
            if control.is_none() {
                return Err(LinkError::Other(format!("cannot reach the metadata server ({})", errors.join("; "))));
            }
        }
        let (client, _) = control.as_ref().expect("connected above");
        client.request_with_timeout(request, REPORT_TIMEOUT).await.map_err(|e| match e {
            control_client::ControlClientError::Server(e) => LinkError::Server(e),
            other => LinkError::Other(other.to_string()),
        })
    }

    /// `handle`'s capabilities for the devices of its volume (protocol 7;
    /// see [`crate::credentials`]).
    pub async fn capabilities(&self, handle: HandleId) -> Result<Response, LinkError> {
        self.request_typed(Request::Capabilities { handle }).await
    }

    /// Reports that the direct path to `device` failed. Ok(true) if the
    /// server answered that the device is now marked failed in the pool.
    pub async fn report_failure(&self, device: u32, reason: &str) -> Result<bool, String> {
        let device = DeviceIndex(device);
        match self.request(Request::ReportDeviceFailure { device, reason: reason.to_string() }).await? {
            Response::Devices(list) => Ok(list.iter().any(|d| d.index == device && !d.state.is_online())),
            _ => Ok(false),
        }
    }

    pub async fn report_recovered(&self, device: u32) -> Result<(), String> {
        self.request(Request::ReportDeviceRecovered { device: DeviceIndex(device) }).await.map(|_| ())
    }

    /// Opens a data channel for `volume` on `device`.
    pub async fn open_channel(&self, volume: u64, device: u32) -> Result<(NbdClient, DataChannelGrant), ChannelError> {
        tokio::time::timeout(CHANNEL_OPEN_TIMEOUT, self.open_channel_inner(volume, device))
            .await
            .map_err(|_| ChannelError::Other(format!("no data channel within {} s", CHANNEL_OPEN_TIMEOUT.as_secs())))?
    }

    async fn open_channel_inner(
        &self,
        volume: u64,
        device: u32,
    ) -> Result<(NbdClient, DataChannelGrant), ChannelError> {
        let c = &self.config;
        let who = ChannelIdentity {
            key: &c.key,
            pinned: Some(&c.server_key),
            role: Role::Agent,
            name: &c.name,
            instance: c.instance,
        };
        let mut errors = Vec::new();
        let mut opened = None;
        for addr in self.addrs() {
            let request = Request::DataChannel { volume: VolumeId(volume), device: DeviceIndex(device) };
            match channel::open(addr, &who, request).await {
                Ok(ok) => {
                    opened = Some(ok);
                    break;
                }
                // Not served now (grace period, device unreachable from the
                // server too): the caller retries later.
                Err(e) if e.is_unavailable() => return Err(ChannelError::Unavailable(e.to_string())),
                Err(control_client::ChannelError::Refused(e)) => return Err(ChannelError::Refused(e.message)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some((stream, response)) = opened else {
            return Err(ChannelError::Other(format!("opening a data channel: {}", errors.join("; "))));
        };
        let Response::DataChannel(grant) = response else {
            return Err(ChannelError::Other(format!("unexpected answer to a data channel request: {response:?}")));
        };
        let opts = ClientOptions {
            request_timeout: Some(CHANNEL_REQUEST_TIMEOUT),
            connect_timeout: CHANNEL_OPEN_TIMEOUT,
            ..ClientOptions::default()
        };
        let client = NbdClient::connect_stream(stream, "", opts)
            .await
            .map_err(|e| ChannelError::Other(format!("NBD on the data channel: {e}")))?;
        Ok((client, grant))
    }
}

/// A request on the link failed: the server's answer, or no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Server(volume_format::control::messages::ControlError),
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    /// The server cannot serve it (e.g. it cannot reach the device either).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

/// One device of one volume's layout: direct while that works, else through
/// the server.
pub struct FallbackDevice {
    direct: Arc<HandleLeg>,
    link: Arc<ServerLink>,
    volume: u64,
    device: u32,
    /// The data channel (numbered, so a failed one is dropped only once),
    /// opened on first use on fallback.
    channel: tokio::sync::Mutex<Option<(u64, NbdClient)>>,
    channels_opened: AtomicU64,
    /// A data-changing request failed on the direct path and has not been
    /// answered through the server yet: until one is, data-changing
    /// requests skip the direct path even if a probe found it working. A
    /// device that answers reads (the probe) but fails writes would
    /// otherwise send a write down the direct path again on every try —
    /// the wait for its direct copy outlasts the lease the try was sent
    /// under, so the try through the server never happens and the write
    /// loops for ever instead of failing with the server's answer.
    write_owed: AtomicBool,
}

impl std::fmt::Debug for FallbackDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackDevice").field("device", &self.direct.name()).field("volume", &self.volume).finish()
    }
}

impl Drop for FallbackDevice {
    fn drop(&mut self) {
        if let Some((_, c)) = self.channel.get_mut().take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { c.disconnect().await });
            }
        }
    }
}

impl FallbackDevice {
    pub fn new(direct: Arc<HandleLeg>, link: Arc<ServerLink>, volume: u64, device: u32) -> FallbackDevice {
        FallbackDevice {
            direct,
            link,
            volume,
            device,
            channel: tokio::sync::Mutex::new(None),
            channels_opened: AtomicU64::new(0),
            write_owed: AtomicBool::new(false),
        }
    }

    /// Set once the server said the device is marked failed in the pool.
    pub fn marked_failed_flag(&self) -> Arc<AtomicBool> {
        self.direct.path().marked_failed.clone()
    }

    pub fn marked_failed(&self) -> bool {
        self.direct.path().marked_failed.load(Ordering::Acquire)
    }

    fn failed_error(&self) -> IoError {
        IoError::io(format!(
            "device {} is marked failed in the pool (neither this host nor the metadata server reaches it)",
            self.direct.name()
        ))
    }

    /// The data channel, opened if need be; while the server cannot serve
    /// one, waits and retries until `deadline` (see the module docs).
    /// Waits until a data-changing request sent directly at `sent` can no
    /// longer land (the longest device request has passed since), before
    /// its copy goes through the server (see the module docs).
    async fn wait_out_direct_copy(&self, sent: blockio::clock::LeaseInstant) {
        let Some(max) = self.direct.request_max() else { return };
        let safe = sent + max;
        if !safe.has_passed() {
            info!(device = %self.direct.name(), volume = self.volume, wait_ms = safe.remaining().as_millis() as u64,
                "a failed write waits out its direct copy before going through the server");
            safe.sleep_until().await;
        }
    }

    async fn channel(&self, deadline: tokio::time::Instant) -> Result<(u64, NbdClient), IoError> {
        let mut slot = self.channel.lock().await;
        if let Some((n, c)) = slot.as_ref() {
            return Ok((*n, c.clone()));
        }
        let mut pause_ms = CHANNEL_RETRY_PAUSE_MIN_MS;
        let mut waiting = false;
        loop {
            if self.marked_failed() {
                return Err(self.failed_error());
            }
            let e = match self.link.open_channel(self.volume, self.device).await {
                Ok((client, grant)) => {
                    info!(device = %self.direct.name(), volume = self.volume, ranges = grant.ranges.len(),
                        "data channel through the metadata server open");
                    let n = self.channels_opened.fetch_add(1, Ordering::Relaxed) + 1;
                    *slot = Some((n, client.clone()));
                    return Ok((n, client));
                }
                Err(ChannelError::Unavailable(why))
                    if why.contains("marked failed") || why.contains("cannot reach") =>
                {
                    self.direct.path().marked_failed.store(true, Ordering::Release);
                    return Err(IoError::io(format!("device {}: {why}", self.direct.name())));
                }
                Err(e @ ChannelError::Refused(_)) => {
                    return Err(IoError::io(format!(
                        "device {}: the direct path failed and the metadata server refused a data channel: {e}",
                        self.direct.name()
                    )))
                }
                Err(e) => e,
            };
            let now = tokio::time::Instant::now();
            if now + Duration::from_millis(pause_ms) > deadline {
                return Err(IoError::io(format!(
                    "device {}: the direct path failed and the metadata server served no data channel for {} s: {e}",
                    self.direct.name(),
                    FALLBACK_HOLD_MAX.as_secs()
                )));
            }
            if !waiting {
                waiting = true;
                warn!(device = %self.direct.name(), volume = self.volume, error = %e,
                    "the metadata server serves no data channel now; holding this device's I/O and retrying");
            }
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            pause_ms = (pause_ms * 2).min(CHANNEL_RETRY_PAUSE_MAX_MS);
        }
    }

    /// Forgets channel number `failed` if it is still the current one (the
    /// next request opens a new one).
    async fn drop_channel(&self, failed: u64) {
        let mut slot = self.channel.lock().await;
        if slot.as_ref().is_some_and(|(n, _)| *n == failed) {
            if let Some((_, c)) = slot.take() {
                tokio::spawn(async move { c.disconnect().await });
            }
        }
    }
}

macro_rules! with_fallback {
    ($self:ident, $changes_data:expr, |$dev:ident| $op:expr) => {{
        let owed = $changes_data && $self.write_owed.load(Ordering::Acquire);
        if $self.direct.path().is_direct() && !owed {
            let $dev: &HandleLeg = &$self.direct;
            let sent = blockio::clock::LeaseInstant::now();
            match $op.await {
                Ok(v) => return Ok(v),
                Err(e) if !is_path_error(&e) => return Err(e),
                Err(e) => {
                    $self.direct.direct_failed(&e.message);
                    if $changes_data {
                        $self.write_owed.store(true, Ordering::Release);
                        $self.wait_out_direct_copy(sent).await;
                    }
                }
            }
        }
        // A fenced handle's requests go nowhere (see `crate::credentials`).
        if let Some(e) = $self.direct.fenced() {
            return Err(e);
        }
        let deadline = tokio::time::Instant::now() + FALLBACK_HOLD_MAX;
        let mut io_errors = 0;
        let result = loop {
            let (number, client) = match $self.channel(deadline).await {
                Ok(channel) => channel,
                Err(e) => break Err(e),
            };
            let $dev: &NbdClient = &client;
            match $op.await {
                Ok(v) => break Ok(v),
                Err(e) if !is_path_error(&e) => break Err(e),
                Err(e) => {
                    warn!(device = %$self.direct.name(), volume = $self.volume, error = %e, "request on the data channel failed; reopening it");
                    $self.drop_channel(number).await;
                    // A broken channel (the server went away) is waited out;
                    // an error the server answered is tried again once.
                    if e.kind != IoErrorKind::Shutdown {
                        io_errors += 1;
                    }
                    if io_errors >= CHANNEL_IO_ATTEMPTS_MAX || tokio::time::Instant::now() >= deadline {
                        break Err(e);
                    }
                }
            }
        };
        // Settled through the server, either way — unless it was not sent
        // at all (its lease had passed): it goes again, through the server.
        if $changes_data && !matches!(&result, Err(e) if e.kind == IoErrorKind::Fenced) {
            $self.write_owed.store(false, Ordering::Release);
        }
        result
    }};
}

#[async_trait]
impl BlockDevice for FallbackDevice {
    fn size(&self) -> u64 {
        self.direct.size()
    }

    /// The direct connection's, or (on fallback) the data channels'
    /// count, marked apart: switching paths changes it too.
    fn connection_epoch(&self) -> u64 {
        if self.direct.path().is_direct() {
            self.direct.connection_epoch()
        } else {
            1 << 63 | self.channels_opened.load(Ordering::Acquire)
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        self.direct.block_sizes()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        with_fallback!(self, false, |d| d.read(offset, len))
    }

    async fn read_payload(&self, offset: u64, len: u32) -> Result<blockio::Payload, IoError> {
        with_fallback!(self, false, |d| d.read_payload(offset, len))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        with_fallback!(self, true, |d| d.write(offset, data.clone(), fua))
    }

    /// Only while the direct path works: the data channels copy.
    fn wants_write_pipe(&self, offset: u64, len: u32) -> bool {
        self.direct.path().is_direct() && self.direct.wants_write_pipe(offset, len)
    }

    /// A payload in pipes goes down the direct path with a `tee(2)` of it
    /// kept (shared pages, no copy): if the direct path fails, the kept
    /// copy is read out and the write goes through [`Self::write`], which
    /// tries the direct path again and falls back as any write does.
    async fn write_payload(&self, offset: u64, data: blockio::Payload, fua: bool) -> Result<(), IoError> {
        let chain = match data {
            blockio::Payload::Bytes(data) => return self.write(offset, data, fua).await,
            blockio::Payload::Pipe(chain) => chain,
        };
        let kept = match self.direct.path().is_direct().then(|| chain.tee()) {
            Some(Ok(kept)) => kept,
            _ => return self.write(offset, chain.into_write_data()?, fua).await,
        };
        match self.direct.write_payload(offset, blockio::Payload::Pipe(chain), fua).await {
            Ok(()) => Ok(()),
            Err(e) if !is_path_error(&e) => Err(e),
            Err(e) => {
                warn!(device = %self.direct.name(), volume = self.volume, error = %e,
                    "a write whose payload was in pipes failed on the direct path; sending it again from memory");
                self.write(offset, kept.into_write_data()?, fua).await
            }
        }
    }

    async fn flush(&self) -> Result<(), IoError> {
        with_fallback!(self, false, |d| d.flush())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        with_fallback!(self, true, |d| d.trim(offset, len, fua))
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        with_fallback!(self, true, |d| d.write_zeroes(offset, len, flags))
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        with_fallback!(self, false, |d| d.block_status(context, offset, len))
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        with_fallback!(self, false, |d| d.cache(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_failure_switches_and_asks_for_one_report() {
        let mut p = PathState::default();
        assert!(p.is_direct());
        assert_eq!(p.direct_failed(1000, "connection reset"), PathAction::ReportFailure("connection reset".into()));
        assert!(!p.is_direct());
        assert_eq!(p.reason(), Some("connection reset"));
        // Further failures of requests already in flight change nothing.
        assert_eq!(p.direct_failed(1001, "again"), PathAction::None);
        assert_eq!(p.reason(), Some("connection reset"));
        assert_eq!(p.next_probe_ms(), Some(1000 + PROBE_BACKOFF_MIN_MS));
    }

    #[test]
    fn probes_back_off_exponentially_up_to_the_cap() {
        let mut p = PathState::default();
        p.direct_failed(0, "refused");
        assert!(!p.probe_due(PROBE_BACKOFF_MIN_MS - 1));
        assert!(p.probe_due(PROBE_BACKOFF_MIN_MS));
        let mut now = PROBE_BACKOFF_MIN_MS;
        let mut waits = Vec::new();
        for _ in 0..8 {
            p.probe_failed(now);
            let next = p.next_probe_ms().unwrap();
            waits.push(next - now);
            now = next;
        }
        assert_eq!(waits, vec![400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
        assert!(matches!(p.mode, PathMode::Fallback { probes_failed: 8, .. }));
    }

    #[test]
    fn a_successful_probe_returns_to_direct_and_asks_for_a_recovery_report() {
        let mut p = PathState::default();
        assert_eq!(p.probe_succeeded(), PathAction::None, "nothing to recover from");
        p.direct_failed(5, "timeout");
        p.probe_failed(205);
        assert_eq!(p.probe_succeeded(), PathAction::ReportRecovered);
        assert!(p.is_direct());
        assert_eq!(p.next_probe_ms(), None);
        assert!(!p.probe_due(u64::MAX));
        // A new failure starts over with the shortest backoff.
        p.direct_failed(10_000, "reset");
        assert_eq!(p.next_probe_ms(), Some(10_000 + PROBE_BACKOFF_MIN_MS));
    }

    #[test]
    fn path_errors_are_told_apart_from_refusals() {
        assert!(is_path_error(&IoError::io("reset")));
        assert!(is_path_error(&IoError::shutdown("gone")));
        assert!(!is_path_error(&IoError::new(IoErrorKind::PermissionDenied, "ro")));
        assert!(!is_path_error(&IoError::new(IoErrorKind::Overflow, "range")));
        assert!(!is_path_error(&IoError::invalid("bad")));
    }
}
