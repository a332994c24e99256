//! The agent: the session, the device pool and the attached volumes, with
//! the operations the control socket offers (attach, detach, list) and
//! graceful shutdown.
//!
//! Attach = open at the metadata server → connect every device of the volume
//! (fail early, naming the device) → serve the volume as an NBD export. Any
//! step failing undoes the earlier ones, so a failed attach leaves no handle
//! open at the server.
//!
//! Detach = flush (refused if it fails, nothing changed) → stop the export
//! (connected clients finish their in-flight requests) → flush again (writes
//! that raced the first flush) → close the gate and wait for in-flight I/O →
//! close the handle at the server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use blockio::BlockDevice;
use tokio::sync::Mutex;
use tracing::{info, warn};
use volume_format::control::messages::OpenMode;

pub use control_client::agent_api::{AttachRequest, AttachmentInfo};

use crate::cow::{CowRegistrar, Registrations};
use crate::devices::{DevicePool, PoolOptions};
use crate::export::{serve_volume, ExportHandle, ExportTarget};
use crate::session::{LayoutBuilder, Session, SessionConfig, SessionError};
use crate::volume::{Layout, VolumeDevice};

/// Everything `sanvol-agent run` is configured with.
#[derive(Clone)]
pub struct AgentConfig {
    pub session: SessionConfig,
    /// Where unix-socket exports go by default (`DIR/VOLUME.sock`).
    pub export_dir: PathBuf,
    pub pool: PoolOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("volume {0} is already attached; detach it first")]
    AlreadyAttached(String),
    #[error("volume {0} is not attached")]
    NotAttached(String),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("volume {volume}: {message}")]
    Device { volume: String, message: String },
    #[error("volume {volume}: {source}")]
    Export { volume: String, source: crate::export::ExportError },
    #[error("volume {volume}: flushing before detach failed, so it stays attached: {message}")]
    FlushFailed { volume: String, message: String },
    #[error("{0:?} is not a valid volume name for an export socket (no '/', not empty, at most 200 bytes)")]
    BadName(String),
    #[error("volume {volume}: {source}")]
    Kernel { volume: String, source: crate::kernel::KernelError },
}

struct Attachment {
    device: Arc<VolumeDevice>,
    mode: OpenMode,
    export: ExportHandle,
    /// `/dev/nbdX`, when attached to the kernel (see [`crate::kernel`]).
    kernel: Option<crate::kernel::attach::KernelAttachment>,
}

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    session: Session,
    pool: Arc<DevicePool>,
    /// Held across attach/detach so they are serialised; never on the data path.
    attached: Mutex<BTreeMap<String, Attachment>>,
    /// Kernel attach settings (see [`crate::kernel::KernelSettings`]).
    kernel_settings: std::sync::Mutex<crate::kernel::KernelSettings>,
    /// Device URI host rewrites (`--device-host-alias`), shared with the layout builder.
    host_aliases: crate::kernel::reattach::HostAliases,
}

impl Agent {
    /// Starts the session (connecting in the background).
    pub fn start(config: AgentConfig) -> Arc<Agent> {
        let pool = DevicePool::new(config.pool.clone());
        // Fallback I/O through the metadata server when a direct path fails.
        pool.set_server_link(crate::fallback::ServerLink::new(config.session.clone()));
        let host_aliases = crate::kernel::reattach::HostAliases::default();
        let builder: LayoutBuilder = {
            let pool = pool.clone();
            let aliases = host_aliases.clone();
            Arc::new(move |description| {
                let pool_uuid = description.pool_uuid;
                let description = aliases.apply(description);
                let volume = description.volume.0;
                Layout::with_health(description, |endpoint| pool.layout_device(endpoint, pool_uuid, volume))
                    .map_err(|e| e.to_string())
            })
        };
        let (session, _task) = Session::start(config.session.clone(), builder);
        Arc::new(Agent {
            config,
            session,
            pool,
            attached: Mutex::new(BTreeMap::new()),
            kernel_settings: Default::default(),
            host_aliases,
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn device_pool(&self) -> &Arc<DevicePool> {
        &self.pool
    }

    /// Waits for the first connection to the metadata server; Err if it
    /// refused this agent for good (wrong keys).
    pub async fn wait_ready(&self) -> Result<(), String> {
        self.session.wait_connected().await
    }

    /// The default export socket of `volume`.
    pub fn default_socket(&self, volume: &str) -> PathBuf {
        self.config.export_dir.join(format!("{volume}.sock"))
    }

    pub async fn attach(&self, request: AttachRequest) -> Result<AttachmentInfo, AgentError> {
        self.attach_with(request, None).await
    }

    /// Issues a handover token for `volume` to the agent whose public key is
    /// `to_key` (a `.pub` file's content, `sanvol-ed25519 HEX`, or hex).
    pub async fn handover(&self, volume: &str, to_key: &str) -> Result<Vec<u8>, AgentError> {
        let (key, _) = control_client::keys::parse_public(to_key)
            .map_err(|e| AgentError::Session(SessionError::Server(format!("the target agent's key: {e:#}"))))?;
        Ok(self.session.handover(volume, key.to_bytes()).await?)
    }

    /// Attaches `request.volume`; with `handover_token`, with the token its
    /// holder issued for this agent (the mode is the holder's).
    pub async fn attach_with(
        &self,
        request: AttachRequest,
        handover_token: Option<Vec<u8>>,
    ) -> Result<AttachmentInfo, AgentError> {
        let volume = request.volume.clone();
        if volume.is_empty() || volume.contains('/') || volume.contains('\0') || volume.len() > 200 {
            return Err(AgentError::BadName(volume));
        }
        let mut attached = self.attached.lock().await;
        if attached.contains_key(&volume) {
            return Err(AgentError::AlreadyAttached(volume));
        }
        let opened = match handover_token {
            Some(token) => self.session.open_handover(&volume, token).await?,
            None => self.session.open(&volume, request.mode).await?,
        };
        let undo = |e: AgentError| async {
            opened.gate.close();
            if let Err(close) = self.session.close(&volume).await {
                warn!(volume, error = %close, "closing the handle after a failed attach failed");
            }
            Err(e)
        };

        // Connect every device now, so an unreachable one fails the attach
        // with its name instead of failing the first I/O.
        let layout = opened.gate.layout();
        let description = layout.description();
        let connects = description.devices.iter().filter(|e| e.online).map(|endpoint| {
            let pool = self.pool.clone();
            let pool_uuid = description.pool_uuid;
            async move {
                match pool.device(endpoint, pool_uuid) {
                    Ok(device) => device.connect().await.map_err(|e| e.message),
                    Err(e) => Err(e.to_string()),
                }
            }
        });
        if let Some(Err(message)) = futures::future::join_all(connects).await.into_iter().find(|r| r.is_err()) {
            return undo(AgentError::Device { volume: volume.clone(), message }).await;
        }

        let registrar = Arc::new(SessionRegistrar { session: self.session.clone(), volume: volume.clone() });
        let registrations = Registrations::new(registrar, opened.mode == OpenMode::SharedWrite);
        let device = Arc::new(
            VolumeDevice::new(volume.clone(), opened.handle, opened.mode == OpenMode::ReadOnly, opened.gate.clone())
                .with_cow(registrations),
        );
        let target = match (request.tcp, request.socket) {
            (Some(addr), _) => ExportTarget::Tcp(addr),
            (None, Some(path)) => ExportTarget::Unix(path),
            (None, None) => ExportTarget::Unix(self.default_socket(&volume)),
        };
        let text = format!("sanvol volume {volume} ({}, handle {})", opened.mode, opened.handle);
        let export = match serve_volume(&volume, text, device.clone(), &target).await {
            Ok(export) => export,
            Err(source) => return undo(AgentError::Export { volume: volume.clone(), source }).await,
        };
        info!(volume, handle = opened.handle, uri = export.uri(), "volume attached");
        attached.insert(volume.clone(), Attachment { device, mode: opened.mode, export, kernel: None });
        Ok(self.info(&volume, &attached[&volume]))
    }

    pub async fn detach(&self, volume: &str) -> Result<(), AgentError> {
        let mut attached = self.attached.lock().await;
        let Some(a) = attached.get_mut(volume) else {
            return Err(AgentError::NotAttached(volume.to_string()));
        };
        if let Some(kernel) = a.kernel.as_mut() {
            // Flush and disconnect /dev/nbdX first; if the flush fails it stays attached.
            kernel.detach().await.map_err(|source| AgentError::Kernel { volume: volume.to_string(), source })?;
            a.kernel = None;
        }
        let a = &attached[volume];
        let revoked = matches!(a.device.gate().status().phase, crate::gate::Phase::Revoked { .. });
        if !revoked && a.mode != OpenMode::ReadOnly {
            a.device
                .flush()
                .await
                .map_err(|e| AgentError::FlushFailed { volume: volume.to_string(), message: e.to_string() })?;
        }
        let a = attached.remove(volume).expect("checked above");
        a.export.stop().await;
        if !revoked && a.mode != OpenMode::ReadOnly {
            if let Err(e) = a.device.flush().await {
                warn!(volume, error = %e, "flush after stopping the export failed");
            }
        }
        a.device.gate().close();
        let _ = a.device.gate().drained().await;
        self.session.close(volume).await?;
        info!(volume, "volume detached");
        Ok(())
    }

    fn info(&self, volume: &str, a: &Attachment) -> AttachmentInfo {
        let status = a.device.gate().status();
        let handle = self.session.handle_status(volume).map_or(a.device.handle(), |h| h.handle);
        AttachmentInfo {
            volume: volume.to_string(),
            mode: a.mode.to_string(),
            handle,
            export_uri: a.export.uri().to_string(),
            size_bytes: a.device.size(),
            layout_generation: status.generation,
            state: status.state_word().to_string(),
            state_detail: match &status.phase {
                crate::gate::Phase::Open if status.lease_expired => {
                    "the lease ran out; I/O is held until it is renewed".to_string()
                }
                crate::gate::Phase::Open => String::new(),
                phase => phase.to_string(),
            },
            io_in_flight: status.in_flight,
            io_waiting: status.waiting,
            kernel_device: a.kernel.as_ref().map(|k| k.device_path()),
            kernel_note: None,
        }
    }

    pub async fn list(&self) -> Vec<AttachmentInfo> {
        let attached = self.attached.lock().await;
        attached.iter().map(|(volume, a)| self.info(volume, a)).collect()
    }

    /// Detaches everything (flush + close) and stops the session. Kernel devices stay connected
    /// (their I/O waits up to the dead-connection timeout), so that the next agent can reattach them.
    pub async fn shutdown(&self) {
        for (volume, a) in self.attached.lock().await.iter_mut() {
            if let Some(kernel) = a.kernel.take() {
                info!(volume, device = kernel.device_path(), "leaving the kernel device connected for the next agent");
            }
        }
        let volumes: Vec<String> = self.attached.lock().await.keys().cloned().collect();
        for volume in volumes {
            if let Err(e) = self.detach(&volume).await {
                warn!(volume, error = %e, "detaching at shutdown failed");
            }
        }
        self.session.shutdown().await;
    }
}

/// Kernel attach (see [`crate::kernel`]).
impl Agent {
    pub fn set_kernel_settings(&self, settings: crate::kernel::KernelSettings) {
        *self.kernel_settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    pub fn kernel_settings(&self) -> crate::kernel::KernelSettings {
        *self.kernel_settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rewrites device URIs' hosts (`FROM=TO`), for agents that reach the devices under another
    /// address than the one recorded in the pool. Set before attaching anything.
    pub fn set_device_host_aliases(&self, aliases: Vec<(String, String)>) {
        self.host_aliases.set(aliases);
    }

    /// Attaches `volume` (socket export as usual) and connects it to a kernel NBD device.
    /// Without the driver, the volume stays attached on its socket export and the reply says why.
    pub async fn attach_kernel(
        &self,
        request: crate::kernel::KernelAttachRequest,
    ) -> Result<AttachmentInfo, AgentError> {
        let volume = request.volume.clone();
        let index = match &request.nbd_device {
            Some(name) => Some(
                crate::kernel::parse_device(name)
                    .map_err(|source| AgentError::Kernel { volume: volume.clone(), source })?,
            ),
            None => None,
        };
        let mut info =
            self.attach(AttachRequest { volume: volume.clone(), mode: request.mode, socket: None, tcp: None }).await?;
        let settings = self.kernel_settings();
        let mut attached = self.attached.lock().await;
        let Some(a) = attached.get_mut(&volume) else {
            return Err(AgentError::NotAttached(volume));
        };
        let backend = crate::kernel::BackendId {
            pool: a.device.gate().layout().description().pool_uuid,
            mode: a.mode,
            handle: a.device.handle(),
            volume: volume.clone(),
        };
        let device: Arc<dyn BlockDevice> = a.device.clone();
        match crate::kernel::attach::KernelAttachment::connect(&volume, device, index, backend.to_string(), settings)
            .await
        {
            Ok(kernel) => {
                info.kernel_device = Some(kernel.device_path());
                a.kernel = Some(kernel);
                Ok(info)
            }
            Err(crate::kernel::KernelError::NotLoaded) => {
                warn!(volume, "{}; serving {} only", crate::kernel::NOT_LOADED, info.export_uri);
                info.kernel_note = Some(format!("{} ({})", crate::kernel::NOT_LOADED, info.export_uri));
                Ok(info)
            }
            Err(source) => {
                drop(attached);
                if let Err(e) = self.detach(&volume).await {
                    warn!(volume, error = %e, "detaching after a failed kernel attach failed");
                }
                Err(AgentError::Kernel { volume, source })
            }
        }
    }

    /// After a restart: finds the kernel devices a previous agent left connected (sanvol backend
    /// identifiers, no live process behind them), re-opens their volumes and gives the same
    /// devices fresh sockets. Returns one line per device for the log.
    pub async fn reattach_kernel_devices(&self) -> Vec<String> {
        crate::kernel::reattach::reattach_all(self).await
    }

    /// Binds a kernel attachment the reattach code made to an attached volume.
    pub(crate) async fn set_kernel(
        &self,
        volume: &str,
        make: impl std::future::Future<Output = Result<crate::kernel::attach::KernelAttachment, crate::kernel::KernelError>>,
    ) -> Result<String, AgentError> {
        let mut attached = self.attached.lock().await;
        let Some(a) = attached.get_mut(volume) else {
            return Err(AgentError::NotAttached(volume.to_string()));
        };
        let kernel = make.await.map_err(|source| AgentError::Kernel { volume: volume.to_string(), source })?;
        let path = kernel.device_path();
        a.kernel = Some(kernel);
        Ok(path)
    }

    /// The attached volume's device, pool and handle (for the reattach code).
    pub(crate) async fn attached_device(&self, volume: &str) -> Option<(Arc<VolumeDevice>, uuid::Uuid)> {
        let attached = self.attached.lock().await;
        let a = attached.get(volume)?;
        Some((a.device.clone(), a.device.gate().layout().description().pool_uuid))
    }
}

/// Registers copy-on-write chunks of one volume through the agent's session.
struct SessionRegistrar {
    session: Session,
    volume: String,
}

#[async_trait::async_trait]
impl CowRegistrar for SessionRegistrar {
    async fn register(&self, snapshot: u64, chunks: Vec<u64>, server_copies: bool) -> Result<(), String> {
        self.session.cow_register(&self.volume, snapshot, chunks, server_copies).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use blockio::client::{ClientOptions, NbdClient};
    use blockio::uri::NbdUri;
    use volume_format::control::messages::{Request, ServerEvent};
    use volume_format::description::DeviceEndpoint;
    use volume_format::HandleId;

    use super::*;
    use crate::testing::fake_mds::FakeMds;
    use crate::testing::{self, description, labelled_device, pattern, serve, Served, EXTENT};

    /// Waits (bounded) until `cond` holds on the agent's listing of `volume`.
    async fn until_listed(agent: &Agent, volume: &str, cond: impl Fn(&AttachmentInfo) -> bool) -> AttachmentInfo {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(info) = agent.list().await.into_iter().find(|i| i.volume == volume) {
                if cond(&info) {
                    return info;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "condition on {volume} never held");
            tokio::task::yield_now().await;
        }
    }

    struct Pool {
        dir: tempfile::TempDir,
        mems: Vec<Arc<blockio::memory::MemoryDevice>>,
        _served: Vec<Served>,
        endpoints: Vec<DeviceEndpoint>,
    }

    /// Three labelled memory devices served over NBD.
    fn pool() -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let d = description(1, 1, 3, 1);
        let mems: Vec<_> = (0..3).map(|i| labelled_device(d.pool_uuid, d.devices[i].device_uuid, i as u32)).collect();
        let served: Vec<_> =
            mems.iter().enumerate().map(|(i, m)| serve(m.clone(), dir.path(), &format!("dev{i}"))).collect();
        let endpoints =
            d.devices.iter().zip(&served).map(|(e, s)| DeviceEndpoint { uri: s.uri.clone(), ..e.clone() }).collect();
        Pool { dir, mems, _served: served, endpoints }
    }

    fn volume_on(
        pool: &Pool,
        name: &str,
        extents: u64,
        legs: u32,
        generation: u64,
    ) -> volume_format::VolumeDescription {
        let mut d = description(extents, legs, 3, generation);
        d.name = name.into();
        d.devices = pool.endpoints.clone();
        d
    }

    fn agent_for(mds: &FakeMds, pool: &Pool) -> Arc<Agent> {
        Agent::start(AgentConfig {
            session: mds.session_config(),
            export_dir: pool.dir.path().join("exports"),
            pool: PoolOptions::default(),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attach_io_recall_publish_revoke_detach() {
        let pool = pool();
        let mut mds = FakeMds::start(
            pool.dir.path(),
            vec![volume_on(&pool, "vol", 2, 2, 1), volume_on(&pool, "ro", 1, 1, 1)],
            10_000,
        );
        let agent = agent_for(&mds, &pool);
        agent.wait_ready().await.unwrap();

        // Attach and do I/O through the export.
        let info = agent
            .attach(AttachRequest { volume: "vol".into(), mode: OpenMode::Exclusive, socket: None, tcp: None })
            .await
            .unwrap();
        assert!(info.export_uri.starts_with("nbd+unix:///vol?socket="), "{}", info.export_uri);
        assert_eq!((info.handle, info.state.as_str(), info.layout_generation), (11, "open", 1));
        let uri: NbdUri = info.export_uri.parse().unwrap();
        let client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
        assert_eq!(client.size(), 2 * EXTENT);
        let data = pattern(1, 8192);
        client.write(EXTENT - 4096, data.clone(), false).await.unwrap();
        let d = volume_on(&pool, "vol", 2, 2, 1);
        for leg in 0..2 {
            for (logical, at) in [(EXTENT - 4096, 0usize), (EXTENT, 4096)] {
                let (dev, off) = testing::placement(&d, logical, leg);
                assert_eq!(&pool.mems[dev].read(off, 4096).await.unwrap()[..], &data[at..at + 4096]);
            }
        }

        // A second attach of the same volume, and a conflicting open elsewhere.
        let again = AttachRequest { volume: "vol".into(), mode: OpenMode::Exclusive, socket: None, tcp: None };
        assert!(matches!(agent.attach(again).await, Err(AgentError::AlreadyAttached(_))));
        let busy = AttachRequest { volume: "busy".into(), mode: OpenMode::Exclusive, socket: None, tcp: None };
        let e = agent.attach(busy).await.unwrap_err().to_string();
        assert_eq!(e, "volume busy is open exclusive by host-b (handle 9); it can be opened once host-b closes it");

        // Recall: the agent drains and confirms; I/O through the export is held.
        mds.events.send(ServerEvent::Recall { handle: HandleId(11), generation: 2 }).await.unwrap();
        let done = mds.expect(|r| matches!(r, Request::RecallDone { .. })).await;
        assert_eq!(done, Request::RecallDone { handle: HandleId(11), generation: 2 });
        assert_eq!(until_listed(&agent, "vol", |i| i.state == "recalled").await.layout_generation, 1);
        let held = tokio::spawn({
            let client = client.clone();
            async move { client.read(EXTENT - 4096, 8192).await }
        });
        until_listed(&agent, "vol", |i| i.io_waiting == 1).await;
        assert!(!held.is_finished());

        // Publish a grown layout: held I/O completes; new connections see the new size
        // (an NBD export's size is fixed per connection at its handshake).
        let grown = volume_on(&pool, "vol", 3, 2, 2);
        mds.events.send(ServerEvent::Publish { handle: HandleId(11), description: Box::new(grown) }).await.unwrap();
        assert_eq!(held.await.unwrap().unwrap(), data);
        let info = until_listed(&agent, "vol", |i| i.state == "open").await;
        assert_eq!((info.layout_generation, info.size_bytes), (2, 3 * EXTENT));
        let grown_client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
        assert_eq!(grown_client.size(), 3 * EXTENT);
        grown_client.write(2 * EXTENT, pattern(4, 4096), false).await.unwrap();
        assert_eq!(grown_client.read(2 * EXTENT, 4096).await.unwrap(), pattern(4, 4096));

        // Read-only attach on TCP refuses writes.
        let ro = AttachRequest {
            volume: "ro".into(),
            mode: OpenMode::ReadOnly,
            socket: None,
            tcp: Some("127.0.0.1:0".parse().unwrap()),
        };
        let ro_info = agent.attach(ro).await.unwrap();
        let ro_client =
            NbdClient::connect(&ro_info.export_uri.parse().unwrap(), ClientOptions::default()).await.unwrap();
        assert_eq!(
            ro_client.write(0, pattern(2, 512), false).await.unwrap_err().kind,
            blockio::IoErrorKind::PermissionDenied
        );

        // Revoke: I/O fails with the server's reason.
        mds.events
            .send(ServerEvent::Revoked { handle: HandleId(11), reason: "broken by host-c".into() })
            .await
            .unwrap();
        let info = until_listed(&agent, "vol", |i| i.state == "revoked").await;
        assert!(info.state_detail.contains("broken by host-c"), "{info:?}");
        assert!(client.read(0, 512).await.is_err());

        // Detach closes the handle and removes the export socket.
        let socket = agent.default_socket("vol");
        assert!(socket.exists());
        agent.detach("vol").await.unwrap();
        assert_eq!(mds.expect(|r| matches!(r, Request::Close { .. })).await, Request::Close { handle: HandleId(11) });
        assert!(!socket.exists());
        assert!(matches!(agent.detach("vol").await, Err(AgentError::NotAttached(_))));
        agent.shutdown().await;
        assert_eq!(mds.expect(|r| matches!(r, Request::Close { .. })).await, Request::Close { handle: HandleId(12) });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_is_renewed_and_survives_a_reconnect() {
        let pool = pool();
        let mut mds = FakeMds::start(pool.dir.path(), vec![volume_on(&pool, "vol", 1, 1, 1)], 300);
        let agent = agent_for(&mds, &pool);
        agent.wait_ready().await.unwrap();
        let req = AttachRequest { volume: "vol".into(), mode: OpenMode::SharedWrite, socket: None, tcp: None };
        let info = agent.attach(req).await.unwrap();
        for _ in 0..3 {
            mds.expect(|r| matches!(r, Request::Renew)).await;
        }
        // The connection drops: the agent reconnects and brings the handle over.
        mds.hang_up.send(()).await.unwrap();
        assert_eq!(
            mds.expect(|r| matches!(r, Request::Close { .. })).await,
            Request::Close { handle: HandleId(info.handle) }
        );
        mds.expect(|r| matches!(r, Request::Open { .. })).await;
        let info = until_listed(&agent, "vol", |i| i.handle == 12 && i.state == "open").await;
        let client = NbdClient::connect(&info.export_uri.parse().unwrap(), ClientOptions::default()).await.unwrap();
        client.write(0, pattern(3, 4096), false).await.unwrap();
        mds.expect(|r| matches!(r, Request::Renew)).await;
        agent.shutdown().await;
    }

    #[tokio::test]
    async fn an_unreachable_device_fails_the_attach_and_closes_the_handle() {
        let pool = pool();
        let mut d = volume_on(&pool, "vol", 1, 1, 1);
        d.devices[0].uri = format!("nbd+unix:///gone?socket={}", pool.dir.path().join("gone.sock").display());
        let mut mds = FakeMds::start(pool.dir.path(), vec![d], 10_000);
        let agent = agent_for(&mds, &pool);
        agent.wait_ready().await.unwrap();
        let req = AttachRequest { volume: "vol".into(), mode: OpenMode::Exclusive, socket: None, tcp: None };
        let e = agent.attach(req).await.unwrap_err().to_string();
        assert!(e.contains("dev0") && e.contains("gone.sock"), "{e}");
        assert_eq!(mds.expect(|r| matches!(r, Request::Close { .. })).await, Request::Close { handle: HandleId(11) });
        assert!(agent.list().await.is_empty());
    }

    #[tokio::test]
    async fn a_wrong_server_key_is_fatal() {
        let pool = pool();
        let mds = FakeMds::start(pool.dir.path(), vec![], 10_000);
        let mut config = mds.session_config();
        config.server_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        let agent = Agent::start(AgentConfig {
            session: config,
            export_dir: pool.dir.path().into(),
            pool: PoolOptions::default(),
        });
        let e = agent.wait_ready().await.unwrap_err();
        assert!(e.contains("pinned"), "{e}");
    }
}
