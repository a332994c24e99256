//! The agent's connections to the pool's devices, shared by every attached
//! volume.
//!
//! Why a pool: volumes of one pool live on the same few devices, and each
//! device wants a few pipelined connections, not one per volume. A
//! [`PooledDevice`] is keyed by URI; volumes hold it through their
//! [`Layout`](crate::volume::Layout), the pool only weakly, so a device's
//! connections close when the last volume using it is detached.
//!
//! Why lazy: a layout must be installable without awaiting (a publish swaps
//! it in one step), so a [`PooledDevice`] connects on first use — or when the
//! agent calls [`PooledDevice::connect`] at attach time to fail early — and
//! reconnects on the next request after its connection died. Every error
//! names the device (index and URI), since "I/O error" on a pool of devices is
//! useless to an operator.
//!
//! On connect the device's label is read and checked against the pool and
//! device UUIDs of the description: a right-looking URI that now leads to
//! another device must never receive this volume's writes.
//!
//! Each device also carries the state of its direct path ([`DevicePath`]):
//! when a request on it fails, [`PooledDevice::direct_failed`] switches the
//! device to fallback (see [`crate::fallback`]) at once — one atomic the hot
//! path reads — and tells the agent's owner ([`PathReporter`]), which reports
//! it to the metadata server, probes the direct path with a bounded backoff
//! ([`PooledDevice::probe`]) and switches the device back
//! ([`PooledDevice::set_direct`]) when it works again.
//!
//! Hosts may reach a device by another address than the one the pool records
//! ([`PoolOptions::uri_map`], `sanvol-agent run --device-uri OLD=NEW`).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::{BlockDevice, BlockSizes, IoError, IoErrorKind, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use uuid::Uuid;
use volume_format::description::DeviceEndpoint;
use volume_format::label::{DeviceLabel, LABEL_BYTES};

use blockio::client::ExportCredential;
use volume_format::capability::{announces_fencing, TARGET_DESCRIPTION_PREFIX};

use crate::credentials::HandleCredentials;
use crate::fallback::{is_path_error, FallbackDevice, ServerLink};

/// How the pool connects to devices.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Connections per device (used only if the device's server advertises
    /// multi-conn). More connections buy parallelism in the device's server.
    pub connections_per_device: usize,
    /// A device request without a reply after this long fails, and its
    /// connection is closed (the fencing timing rules,
    /// `volume_format::fencing`): the longest device request.
    pub request_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// Check each device's label against the description on connect.
    pub verify_labels: bool,
    /// Device URIs this host reaches by another URI (`OLD` → `NEW`): the
    /// direct path uses `NEW`, everything else (names, the server) `OLD`.
    pub uri_map: HashMap<String, String>,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            connections_per_device: 2,
            request_timeout: Some(Duration::from_millis(volume_format::fencing::DEVICE_REQUEST_MAX_MS_DEFAULT)),
            connect_timeout: Duration::from_secs(10),
            verify_labels: true,
            uri_map: HashMap::new(),
        }
    }
}

/// Most connections per device the pool opens, whatever it is asked.
pub const CONNECTIONS_PER_DEVICE_MAX: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {index} has URI {uri:?}, which is not a valid NBD URI: {reason}")]
    BadUri { index: u32, uri: String, reason: String },
}

/// A device's direct path failed (first failure only): its pool URI, its
/// index in the pool, and why.
pub type PathReporter = Arc<dyn Fn(&str, u32, &str) + Send + Sync>;

/// Every device connection of the agent, by URI.
pub struct DevicePool {
    opts: PoolOptions,
    devices: Mutex<HashMap<String, Weak<PooledDevice>>>,
    /// Where fallback I/O goes; without it (tests, tools) a failed direct
    /// path just fails the I/O.
    link: OnceLock<Arc<ServerLink>>,
    /// Who hears of failed direct paths (the agent's owner).
    reporter: OnceLock<PathReporter>,
}

/// A device as listed by `sanvol-agent list --json`'s device section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStatus {
    pub uri: String,
    pub connected: bool,
    pub connections: usize,
    pub size_bytes: u64,
    /// `direct`, or `fallback: REASON` while I/O goes through the server.
    #[serde(default)]
    pub path: String,
    /// The metadata server marked the device failed.
    #[serde(default)]
    pub marked_failed: bool,
}

impl DevicePool {
    pub fn new(mut opts: PoolOptions) -> Arc<DevicePool> {
        opts.connections_per_device = opts.connections_per_device.clamp(1, CONNECTIONS_PER_DEVICE_MAX);
        Arc::new(DevicePool {
            opts,
            devices: Mutex::new(HashMap::new()),
            link: OnceLock::new(),
            reporter: OnceLock::new(),
        })
    }

    /// Enables fallback through the metadata server (once; later calls are
    /// ignored): failed direct paths go to `reporter`, which must report
    /// them, probe and switch back.
    pub fn set_server_link(&self, link: Arc<ServerLink>, reporter: PathReporter) {
        let _ = self.link.set(link);
        let _ = self.reporter.set(reporter);
    }

    /// The pooled device the pool records as `uri`, if a volume uses it.
    pub fn find(&self, uri: &str) -> Option<Arc<PooledDevice>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).get(uri).and_then(Weak::upgrade)
    }

    /// The device for `endpoint` as a leg of volume `volume`'s layout: with a
    /// server link, wrapped for fallback, together with its "marked failed" flag.
    ///
    /// `creds`: the handle the layout is for; its I/O to a device that
    /// fences goes over that handle's own connections ([`HandleLeg`]).
    pub fn layout_device(
        &self,
        endpoint: &DeviceEndpoint,
        pool_uuid: Uuid,
        volume: u64,
        creds: Option<Arc<HandleCredentials>>,
        layout_generation: u64,
    ) -> Result<crate::volume::LayoutDevice, DeviceError> {
        let device = self.device(endpoint, pool_uuid)?;
        let flag = device.path.marked_failed.clone();
        let device = Arc::new(HandleLeg { device, creds, layout_generation });
        // The layout says what the pool decided: a device that came back
        // (resyncing or online again) is written again.
        flag.store(!endpoint.online && !endpoint.resyncing, Ordering::Release);
        match self.link.get() {
            Some(link) => {
                let wrapped = FallbackDevice::new(device, link.clone(), volume, endpoint.index.0);
                Ok((Arc::new(wrapped), Some(flag)))
            }
            None => Ok((device, Some(flag))),
        }
    }

    /// The pooled device for `endpoint` of a volume in pool `pool_uuid`;
    /// does not connect.
    pub fn device(&self, endpoint: &DeviceEndpoint, pool_uuid: Uuid) -> Result<Arc<PooledDevice>, DeviceError> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = devices.get(&endpoint.uri).and_then(Weak::upgrade) {
            return Ok(device);
        }
        let direct_uri = self.opts.uri_map.get(&endpoint.uri).unwrap_or(&endpoint.uri);
        let uri = NbdUri::from_str(direct_uri).map_err(|e| DeviceError::BadUri {
            index: endpoint.index.0,
            uri: direct_uri.clone(),
            reason: e.to_string(),
        })?;
        let name = if *direct_uri == endpoint.uri {
            format!("{} ({})", endpoint.index, endpoint.uri)
        } else {
            format!("{} ({} via {direct_uri})", endpoint.index, endpoint.uri)
        };
        let device = Arc::new(PooledDevice {
            uri,
            key: endpoint.uri.clone(),
            index: endpoint.index.0,
            reporter: self.reporter.get().cloned(),
            path: DevicePath::default(),
            name,
            expected: self.opts.verify_labels.then_some((pool_uuid, endpoint.device_uuid)),
            opts: self.opts.clone(),
            client: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            size_bytes: AtomicU64::new(0),
            fences: AtomicBool::new(false),
            handle_clients: Mutex::new(HashMap::new()),
        });
        devices.retain(|_, d| d.strong_count() > 0);
        devices.insert(endpoint.uri.clone(), Arc::downgrade(&device));
        Ok(device)
    }

    /// Devices some attached volume uses.
    pub fn status(&self) -> Vec<DeviceStatus> {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<DeviceStatus> = devices.values().filter_map(Weak::upgrade).map(|d| d.status()).collect();
        list.sort_by(|a, b| a.uri.cmp(&b.uri));
        list
    }
}

/// The direct path's state of one device, as the data path sees it (the
/// owner keeps the rest: when to probe, [`crate::fallback::PathState`]).
pub struct DevicePath {
    /// The only thing the hot path reads.
    direct: AtomicBool,
    /// Why the device is on fallback (set with `direct`, off the hot path).
    reason: Mutex<Option<String>>,
    /// The metadata server marked the device failed: I/O on it fails at once.
    pub marked_failed: Arc<AtomicBool>,
}

impl Default for DevicePath {
    fn default() -> DevicePath {
        DevicePath {
            direct: AtomicBool::new(true),
            reason: Mutex::new(None),
            marked_failed: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl DevicePath {
    pub fn is_direct(&self) -> bool {
        self.direct.load(Ordering::Acquire)
    }

    fn reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `direct`, or `fallback: REASON`.
    pub fn describe(&self) -> String {
        match (self.is_direct(), self.reason().as_deref()) {
            (false, Some(reason)) => format!("fallback: {reason}"),
            (false, None) => "fallback".to_string(),
            (true, _) => "direct".to_string(),
        }
    }
}

/// One device, connected on demand. Implements [`BlockDevice`].
pub struct PooledDevice {
    uri: NbdUri,
    /// The URI the pool records (the pool's key; `uri` may be remapped).
    key: String,
    /// The device's index in the pool, for reports.
    index: u32,
    reporter: Option<PathReporter>,
    path: DevicePath,
    /// `devN (URI)`, for messages.
    name: String,
    /// (pool UUID, device UUID) the label must carry.
    expected: Option<(Uuid, Uuid)>,
    opts: PoolOptions,
    client: RwLock<Option<NbdClient>>,
    /// Serialises connection attempts, so a burst of requests to a dead
    /// device makes one attempt, not one each.
    connecting: tokio::sync::Mutex<()>,
    size_bytes: AtomicU64,
    /// The device said it fences (`sanvol-target`): I/O goes only through
    /// per-handle connections ([`HandleLeg`]).
    fences: AtomicBool,
    /// Per-handle connections to a fencing device: handle id → (the layout
    /// generation its capability was asked for, the client).
    handle_clients: Mutex<HashMap<u64, (u64, NbdClient)>>,
}

impl std::fmt::Debug for PooledDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledDevice").field("name", &self.name).finish()
    }
}

impl PooledDevice {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &DevicePath {
        &self.path
    }

    fn status(&self) -> DeviceStatus {
        let client = self.cached();
        DeviceStatus {
            uri: self.uri.to_string(),
            connected: client.is_some(),
            connections: client.map_or(0, |c| c.connection_count()),
            size_bytes: self.size_bytes.load(Ordering::Relaxed),
            path: self.path.describe(),
            marked_failed: self.path.marked_failed.load(Ordering::Acquire),
        }
    }

    /// A request on the direct path failed on the path itself. The first such
    /// failure switches the device to fallback, drops its connection and
    /// tells the owner (which reports and probes); later ones change nothing.
    pub fn direct_failed(&self, reason: &str) {
        if !self.path.direct.swap(false, Ordering::AcqRel) {
            return;
        }
        *self.path.reason() = Some(reason.to_string());
        tracing::warn!(device = %self.name, %reason, "direct path failed");
        if let Some(old) = self.client.write().unwrap_or_else(|e| e.into_inner()).take() {
            tokio::spawn(async move { old.disconnect().await });
        }
        if let Some(report) = &self.reporter {
            report(&self.key, self.index, reason);
        }
    }

    /// The longest a request on the direct path may take
    /// ([`PoolOptions::request_timeout`]), if bounded.
    pub fn request_max(&self) -> Option<Duration> {
        self.opts.request_timeout
    }

    /// One probe of the direct path: a fresh connection with the label check
    /// (to a fencing device, which reads nothing without a capability: a
    /// plain connection that reaches its handshake).
    pub async fn probe(&self) -> bool {
        if self.fences() {
            let opts = ClientOptions { connect_timeout: self.opts.connect_timeout, ..ClientOptions::default() };
            return match NbdClient::connect(&self.uri, opts).await {
                Ok(c) => {
                    c.disconnect().await;
                    true
                }
                Err(_) => false,
            };
        }
        self.client().await.is_ok()
    }

    /// A probe found the direct path working: I/O goes direct again.
    pub fn set_direct(&self) {
        *self.path.reason() = None;
        self.path.direct.store(true, Ordering::Release);
    }

    fn cached(&self) -> Option<NbdClient> {
        self.client.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Connects now if not connected (attach uses this to fail early). A
    /// device that fences is reachable once it said so: its per-handle
    /// connections open on the handle's first request.
    pub async fn connect(&self) -> Result<(), IoError> {
        match self.client().await {
            Ok(_) => Ok(()),
            Err(_) if self.fences() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn client(&self) -> Result<NbdClient, IoError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        if self.fences() {
            return Err(self.needs_handle());
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let opts = ClientOptions {
            connections: self.opts.connections_per_device,
            request_timeout: self.opts.request_timeout,
            timeout_closes_connection: true,
            connect_timeout: self.opts.connect_timeout,
            ..ClientOptions::default()
        };
        let client = NbdClient::connect(&self.uri, opts).await.map_err(|e| {
            IoError::io(format!(
                "device {}: cannot connect: {e}; check that its NBD server runs and is reachable from this host",
                self.name
            ))
        })?;
        if client.info().description.as_deref().is_some_and(announces_fencing) {
            // A plain connection gets no data from a fencing device: its I/O
            // goes over per-handle connections under capabilities.
            client.disconnect().await;
            self.fences.store(true, Ordering::Release);
            tracing::info!(device = %self.name, "the device fences: connecting per handle with capabilities");
            return Err(self.needs_handle());
        }
        self.finish_connect(client).await
    }

    /// Checks the label of a new connection and reports it.
    async fn finish_connect(&self, client: NbdClient) -> Result<NbdClient, IoError> {
        if let Some((pool, device)) = self.expected {
            if let Err(why) = check_label(&client, pool, device).await {
                client.disconnect().await;
                return Err(IoError::io(format!("device {}: {why}; refusing to do I/O to it", self.name)));
            }
        }
        tracing::info!(device = %self.name, connections = client.connection_count(), "connected to device");
        self.size_bytes.store(client.size(), Ordering::Relaxed);
        if !self.fences() {
            *self.client.write().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        }
        Ok(client)
    }

    /// Whether the device said it fences (known after the first connection).
    pub fn fences(&self) -> bool {
        self.fences.load(Ordering::Acquire)
    }

    fn needs_handle(&self) -> IoError {
        IoError::new(
            IoErrorKind::PermissionDenied,
            format!("device {} fences (sanvol-target): its I/O needs a handle's capability", self.name),
        )
    }

    /// The connection of `creds`' handle to this fencing device, opened
    /// with the handle's capability for `layout_generation` (or a newer
    /// layout's) if it has none yet or only one for an older layout.
    /// Returns it and whether it is a new connection.
    async fn handle_client(
        &self,
        creds: &HandleCredentials,
        layout_generation: u64,
    ) -> Result<(NbdClient, bool), IoError> {
        let handle = creds.handle().0;
        let cached = |me: &Self| {
            me.handle_clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&handle)
                .filter(|(generation, _)| *generation >= layout_generation)
                .map(|(_, c)| c.clone())
        };
        if let Some(c) = cached(self) {
            return Ok((c, false));
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = cached(self) {
            return Ok((c, false));
        }
        let capability = creds.capability(self.index, layout_generation).await?;
        let name = Arc::new(move |base: &str| capability.export_name(base));
        let opts = ClientOptions {
            connections: self.opts.connections_per_device,
            request_timeout: self.opts.request_timeout,
            timeout_closes_connection: true,
            connect_timeout: self.opts.connect_timeout,
            credential: Some(ExportCredential {
                description_prefix: TARGET_DESCRIPTION_PREFIX.to_string(),
                export_name: name,
            }),
            ..ClientOptions::default()
        };
        let client = match NbdClient::connect(&self.uri, opts).await {
            Ok(client) => client,
            // The target refuses a fenced holder's capability at the
            // handshake and says so.
            Err(e) if e.to_string().contains("fenced") => {
                return Err(creds.set_fenced(&format!("device {} refused it: {e}", self.name)))
            }
            Err(e) => {
                return Err(IoError::io(format!(
                    "device {}: cannot connect for handle {handle}: {e}; check that its NBD server runs and is \
                     reachable from this host",
                    self.name
                )))
            }
        };
        let client = self.finish_connect(client).await?;
        let old = self
            .handle_clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle, (layout_generation, client.clone()));
        if let Some((_, old)) = old {
            tokio::spawn(async move { old.disconnect().await });
        }
        Ok((client, true))
    }

    /// Forgets `handle`'s connection (it failed, or the handle is done).
    pub(crate) fn drop_handle_client(&self, handle: u64) {
        let old = self.handle_clients.lock().unwrap_or_else(|e| e.into_inner()).remove(&handle);
        if let (Some((_, old)), Ok(rt)) = (old, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move { old.disconnect().await });
        }
    }

    /// After a failed request: a connection-level failure (the client is
    /// shut down) drops the client so the next request reconnects.
    fn failed(&self, e: IoError) -> IoError {
        if e.kind == IoErrorKind::Shutdown {
            tracing::warn!(device = %self.name, error = %e, "device connection lost; will reconnect on the next request");
            self.client.write().unwrap_or_else(|e| e.into_inner()).take();
        }
        e
    }
}

/// One device as a leg of one handle's layout: the device's shared
/// connections while it is a plain NBD server, the handle's own connections
/// under its capability once the device said it fences (see
/// [`crate::credentials`]). Derefs to the [`PooledDevice`] for its path
/// state and name.
pub struct HandleLeg {
    device: Arc<PooledDevice>,
    /// `None` outside a handle (tests, tools): a fencing device refuses.
    creds: Option<Arc<HandleCredentials>>,
    layout_generation: u64,
}

impl std::ops::Deref for HandleLeg {
    type Target = PooledDevice;
    fn deref(&self) -> &PooledDevice {
        &self.device
    }
}

impl std::fmt::Debug for HandleLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandleLeg").field("device", &self.device.name).field("creds", &self.creds).finish()
    }
}

impl HandleLeg {
    /// A leg without a handle (what tests and tools use).
    pub fn shared(device: Arc<PooledDevice>) -> HandleLeg {
        HandleLeg { device, creds: None, layout_generation: 0 }
    }

    /// The error every request fails with once the handle was fenced.
    pub fn fenced(&self) -> Option<IoError> {
        self.creds.as_ref().and_then(|c| c.fenced())
    }

    async fn with_client<T, Fut>(&self, op: impl FnOnce(NbdClient) -> Fut) -> Result<T, IoError>
    where
        Fut: std::future::Future<Output = Result<T, IoError>>,
    {
        let Some(creds) = &self.creds else {
            return op(self.device.client().await?).await.map_err(|e| self.device.failed(e));
        };
        if let Some(e) = creds.fenced() {
            return Err(e);
        }
        if !self.device.fences() {
            match self.device.client().await {
                Ok(c) => return op(c).await.map_err(|e| self.device.failed(e)),
                // It said just now that it fences: on to the handle's own.
                Err(_) if self.device.fences() => {}
                Err(e) => return Err(e),
            }
        }
        let handle = creds.handle().0;
        let (client, new) = self.device.handle_client(creds, self.layout_generation).await?;
        if new {
            creds.remember(&self.device);
        }
        match op(client).await {
            Ok(v) => Ok(v),
            // A fencing target answers EPERM to a fenced holder's requests
            // (and to writes outside its capability, which a layout's own
            // extents never are).
            Err(e) if e.kind == IoErrorKind::PermissionDenied => {
                self.device.drop_handle_client(handle);
                Err(creds.set_fenced(&format!("device {} refused a request: {e}", self.device.name)))
            }
            // Closed under the request: by a fence (the target then refuses
            // the handle's capability, which makes it fenced here), or the
            // path failed (the error goes up as a path error: fallback).
            Err(e) if is_path_error(&e) => {
                self.device.drop_handle_client(handle);
                match self.device.handle_client(creds, self.layout_generation).await {
                    Err(fenced) if creds.fenced().is_some() => Err(fenced),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl BlockDevice for HandleLeg {
    fn size(&self) -> u64 {
        self.device.size()
    }

    /// The handle's own connection's on a device that fences, the shared
    /// one's otherwise.
    fn connection_epoch(&self) -> u64 {
        match (&self.creds, self.device.fences()) {
            (Some(creds), true) => {
                let clients = self.device.handle_clients.lock().unwrap_or_else(|e| e.into_inner());
                clients.get(&creds.handle().0).map_or(0, |(_, c)| c.connection_epoch())
            }
            _ => self.device.connection_epoch(),
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        let handle = self.creds.as_ref().map(|c| c.handle().0);
        let own = handle.and_then(|h| {
            self.device.handle_clients.lock().unwrap_or_else(|e| e.into_inner()).get(&h).map(|(_, c)| c.block_sizes())
        });
        own.unwrap_or_else(|| self.device.block_sizes())
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.with_client(|c| async move { c.read(offset, len).await }).await
    }

    async fn read_payload(&self, offset: u64, len: u32) -> Result<blockio::Payload, IoError> {
        self.with_client(|c| async move { c.read_payload(offset, len).await }).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.with_client(|c| async move { c.write(offset, data, fua).await }).await
    }

    fn wants_write_pipe(&self, _offset: u64, len: u32) -> bool {
        len >= blockio::splice::SPLICE_BYTES_MIN
    }

    /// Sent once, as every request here (the fallback above keeps its own
    /// copy to send again, [`crate::fallback`]).
    async fn write_payload(&self, offset: u64, data: blockio::Payload, fua: bool) -> Result<(), IoError> {
        self.with_client(|c| async move { c.write_payload(offset, data, fua).await }).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.with_client(|c| async move { c.flush().await }).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.with_client(|c| async move { c.trim(offset, len, fua).await }).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.with_client(|c| async move { c.write_zeroes(offset, len, flags).await }).await
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.with_client(|c| async move { c.block_status(context, offset, len).await }).await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.with_client(|c| async move { c.cache(offset, len).await }).await
    }
}

async fn check_label(client: &NbdClient, pool: Uuid, device: Uuid) -> Result<(), String> {
    let block = client.read(0, LABEL_BYTES as u32).await.map_err(|e| format!("reading its label failed: {e}"))?;
    let label = DeviceLabel::decode(&block).map_err(|e| e.to_string())?;
    if label.pool_uuid != pool {
        return Err(format!("its label says pool {}, but the volume is in pool {pool}", label.pool_uuid));
    }
    if label.device_uuid != device {
        return Err(format!("its label says device {}, but the pool expects device {device} there", label.device_uuid));
    }
    Ok(())
}

#[async_trait]
impl BlockDevice for PooledDevice {
    /// The device's size once connected, 0 before (volumes do not use it).
    fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Relaxed)
    }

    /// The shared connection's (0 while there is none).
    fn connection_epoch(&self) -> u64 {
        self.cached().map_or(0, |c| c.connection_epoch())
    }

    fn block_sizes(&self) -> BlockSizes {
        self.cached().map(|c| c.block_sizes()).unwrap_or_default()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.client().await?.read(offset, len).await.map_err(|e| self.failed(e))
    }

    async fn read_payload(&self, offset: u64, len: u32) -> Result<blockio::Payload, IoError> {
        self.client().await?.read_payload(offset, len).await.map_err(|e| self.failed(e))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.client().await?.write(offset, data, fua).await.map_err(|e| self.failed(e))
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.client().await?.flush().await.map_err(|e| self.failed(e))
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.client().await?.trim(offset, len, fua).await.map_err(|e| self.failed(e))
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.client().await?.write_zeroes(offset, len, flags).await.map_err(|e| self.failed(e))
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.client().await?.block_status(context, offset, len).await.map_err(|e| self.failed(e))
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.client().await?.cache(offset, len).await.map_err(|e| self.failed(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Gate;
    use crate::testing::{self, description, labelled_device, pattern, serve, EXTENT};
    use crate::volume::{Layout, VolumeDevice};

    fn endpoint(d: &volume_format::VolumeDescription, i: usize, uri: &str) -> DeviceEndpoint {
        DeviceEndpoint { uri: uri.to_string(), ..d.devices[i].clone() }
    }

    #[tokio::test]
    async fn volume_over_pooled_nbd_devices_places_data_on_the_legs() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = description(4, 2, 3, 1);
        let mems: Vec<_> = (0..3).map(|i| labelled_device(d.pool_uuid, d.devices[i].device_uuid, i as u32)).collect();
        let served: Vec<_> =
            mems.iter().enumerate().map(|(i, m)| serve(m.clone(), dir.path(), &format!("dev{i}"))).collect();
        for (i, s) in served.iter().enumerate() {
            d.devices[i] = endpoint(&d, i, &s.uri);
        }
        let pool = DevicePool::new(PoolOptions::default());
        let layout =
            Layout::new(d.clone(), |e| pool.device(e, d.pool_uuid).map(|p| p as Arc<dyn BlockDevice>)).unwrap();
        let vol = VolumeDevice::new("vol", 1, false, Arc::new(Gate::new(Arc::new(layout), 1)));
        let data = pattern(1, (2 * EXTENT) as usize);
        vol.write(EXTENT / 2, data.clone(), false).await.unwrap();
        vol.flush().await.unwrap();
        for leg in 0..2 {
            for piece in [EXTENT / 2, EXTENT, 2 * EXTENT] {
                let (dev, off) = testing::placement(&d, piece, leg);
                let got = mems[dev].read(off, 4096).await.unwrap();
                let at = (piece - EXTENT / 2) as usize;
                assert_eq!(&got[..], &data[at..at + 4096], "leg {leg} piece {piece}");
            }
        }
        assert_eq!(vol.read(EXTENT / 2, data.len() as u32).await.unwrap(), data);
        let status = pool.status();
        assert_eq!(status.len(), 3);
        assert!(status.iter().all(|s| s.connected && s.connections >= 1));

        // The pool shares one device per URI and lets go when volumes do.
        let again = pool.device(&d.devices[0], d.pool_uuid).unwrap();
        assert!(again.cached().is_some(), "the same pooled device is reused");
        drop((vol, again));
        assert!(pool.status().is_empty());
    }

    #[tokio::test]
    async fn unreachable_device_is_named_in_the_error() {
        let d = description(1, 1, 1, 1);
        let pool = DevicePool::new(PoolOptions::default());
        let dev = pool.device(&d.devices[0], d.pool_uuid).unwrap();
        let e = dev.connect().await.unwrap_err();
        assert!(e.message.contains("dev0") && e.message.contains("/nonexistent/dev0.sock"), "{e}");
        let e = dev.read(0, 512).await.unwrap_err();
        assert!(e.message.contains("cannot connect"), "{e}");
    }

    #[tokio::test]
    async fn a_device_with_the_wrong_label_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = description(1, 1, 1, 1);
        let wrong = labelled_device(d.pool_uuid, Uuid::from_u128(999), 0);
        let served = serve(wrong, dir.path(), "dev0");
        let pool = DevicePool::new(PoolOptions::default());
        let dev = pool.device(&endpoint(&d, 0, &served.uri), d.pool_uuid).unwrap();
        let e = dev.connect().await.unwrap_err();
        assert!(e.message.contains("expects device"), "{e}");
        let unlabelled = serve(Arc::new(blockio::memory::MemoryDevice::new(1 << 20)), dir.path(), "blank");
        let dev = pool.device(&endpoint(&d, 0, &unlabelled.uri), d.pool_uuid).unwrap();
        assert!(dev.connect().await.unwrap_err().message.contains("not a sanvol device"));
    }

    /// What a destage round checks (`crate::cache`): a restarted device
    /// server is answered on a new connection, and the epoch says so.
    #[tokio::test]
    async fn the_connection_epoch_changes_when_the_device_server_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let d = description(1, 1, 1, 1);
        let memory = labelled_device(d.pool_uuid, d.devices[0].device_uuid, 0);
        let served = serve(memory.clone(), dir.path(), "dev0");
        let pool = DevicePool::new(PoolOptions::default());
        let dev = pool.device(&endpoint(&d, 0, &served.uri), d.pool_uuid).unwrap();
        assert_eq!(dev.connection_epoch(), 0, "not connected yet");
        dev.write(EXTENT, pattern(3, 4096), false).await.unwrap();
        let first = dev.connection_epoch();
        assert_ne!(first, 0);
        dev.flush().await.unwrap();
        assert_eq!(dev.connection_epoch(), first, "same connection");

        // The server goes away and comes back at the same address.
        drop(served);
        std::fs::remove_file(dir.path().join("dev0.sock")).unwrap();
        let _again = serve(memory, dir.path(), "dev0");
        // The first request finds the old connection dead; the next one
        // connects anew.
        let mut flushed = dev.flush().await;
        for _ in 0..3 {
            if flushed.is_ok() {
                break;
            }
            flushed = dev.flush().await;
        }
        flushed.unwrap();
        assert_ne!(dev.connection_epoch(), first, "a new connection, a new epoch");
    }

    #[test]
    fn bad_uri_is_a_clear_error() {
        let d = description(1, 1, 1, 1);
        let pool = DevicePool::new(PoolOptions::default());
        let e = pool.device(&endpoint(&d, 0, "http://x"), d.pool_uuid).unwrap_err();
        assert!(e.to_string().contains("device 0"), "{e}");
    }
}
