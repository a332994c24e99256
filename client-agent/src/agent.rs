//! The agent: attach, detach, list, status, handover and graceful shutdown,
//! as calls to its owner task.
//!
//! [`Agent`] is a handle: every operation is a command sent to the owner
//! ([`crate::owner`], which runs [`crate::core::AgentCore`]) and an awaited
//! reply, so no operation holds anything another one needs — `list` answers
//! while an attach waits for a slow device or server.
//!
//! Attach = open at the metadata server → connect every device of the volume
//! (fail early, naming the device) → serve the volume as an NBD export (and,
//! with `--kernel`, connect `/dev/nbdX`). Any step failing undoes the earlier
//! ones, so a failed attach leaves no handle open at the server.
//!
//! Detach = flush (refused if it fails, nothing changed) → stop the export
//! (connected clients finish their in-flight requests) → flush again (writes
//! that raced the first flush) → close the gate and wait for in-flight I/O →
//! close the handle at the server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;
use volume_format::control::messages::OpenMode;
use volume_format::HandleId;

pub use control_client::agent_api::{AgentStatus, AttachRequest, AttachmentInfo};

use crate::core::{
    AgentCore, AttachSpec, Command, CoreConfig, HeldHandle, Input, KernelPlan, OpenWith, Reply, RestoreSpec,
};
use crate::credentials::HandleCredentials;
use crate::devices::{DevicePool, PoolOptions};
use crate::kernel::reattach::HostAliases;
use crate::kernel::KernelSettings;
use crate::owner::{LayoutBuilder, Shell, ToOwner};
use crate::session::{ConnectState, SessionConfig, SessionError};
use crate::state_dir::StateDir;
use crate::volume::Layout;

/// Everything `sanvol-agent run` is configured with.
#[derive(Clone)]
pub struct AgentConfig {
    pub session: SessionConfig,
    /// Where unix-socket exports go by default (`DIR/VOLUME.sock`).
    pub export_dir: PathBuf,
    pub pool: PoolOptions,
    /// Kernel attach settings (see [`KernelSettings`]).
    pub kernel: KernelSettings,
    /// Device URI host rewrites (`--device-host-alias FROM=TO`), for agents
    /// that reach the devices under another address than the pool records.
    pub host_aliases: Vec<(String, String)>,
    /// Where the handles the agent holds are kept for its next run (`None`:
    /// nowhere; a restarted agent then cannot take them back).
    pub state: Option<Arc<StateDir>>,
    /// Where volumes' write-back cache logs go (`DIR/VOLUME.cachelog`, as
    /// large as the volume's cache). `None`: `cache` in the state
    /// directory; with neither, a cached volume attaches without its cache
    /// (writes go straight to the devices).
    pub cache_dir: Option<PathBuf>,
    /// How many bytes of writes to chunks a snapshot still needs may be
    /// acknowledged before they land, per volume (0: none; see
    /// [`crate::cow_behind`]).
    pub cow_write_behind_bytes: u64,
    /// Memory for clean blocks read from the devices, per cached volume
    /// (0: none; see [`crate::cache::clean`]).
    pub cache_read_bytes: u64,
    /// How long acknowledged writes may wait in a cache before they are
    /// destaged (see "Destage hold" in [`crate::cache`]).
    pub cache_destage_hold: std::time::Duration,
}

impl AgentConfig {
    /// Where volume `volume`'s cache log goes (see [`AgentConfig::cache_dir`]).
    pub fn cache_log_path(&self, volume: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.clone().or_else(|| self.state.as_ref().map(|s| s.dir().join("cache")))?;
        Some(dir.join(format!("{volume}.cachelog")))
    }

    /// Defaults for everything but who the agent is and where exports go.
    pub fn new(session: SessionConfig, export_dir: PathBuf) -> AgentConfig {
        AgentConfig {
            session,
            export_dir,
            pool: PoolOptions::default(),
            kernel: KernelSettings::default(),
            host_aliases: Vec::new(),
            state: None,
            cache_dir: None,
            cow_write_behind_bytes: crate::cow_behind::DEFAULT_BUDGET_BYTES,
            cache_read_bytes: crate::cache::READ_CACHE_BYTES_DEFAULT,
            cache_destage_hold: std::time::Duration::from_millis(crate::cache::DESTAGE_HOLD_MS_DEFAULT),
        }
    }
}

/// What an agent operation can fail with. Plain data: the owner's core
/// decides it, the control socket shows it verbatim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("volume {0} is already attached; detach it first")]
    AlreadyAttached(String),
    #[error("volume {0} is being attached; wait for that attach to finish")]
    Attaching(String),
    #[error("volume {0} is being detached; wait for that detach to finish")]
    Detaching(String),
    #[error("volume {0} is not attached")]
    NotAttached(String),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("volume {volume}: {message}")]
    Device { volume: String, message: String },
    #[error("volume {volume}: {message}")]
    Export { volume: String, message: String },
    #[error("volume {volume}: flushing before detach failed, so it stays attached: {message}")]
    FlushFailed { volume: String, message: String },
    #[error("{0:?} is not a valid volume name for an export socket (no '/', not empty, at most 200 bytes)")]
    BadName(String),
    #[error("volume {volume}: {message}")]
    Kernel { volume: String, message: String },
}

/// The running agent: a handle on its owner task. Cheap to share.
pub struct Agent {
    config: AgentConfig,
    owner: mpsc::Sender<ToOwner>,
    state: watch::Receiver<ConnectState>,
    pool: Arc<DevicePool>,
}

impl Agent {
    /// Starts the owner task (connecting in the background).
    pub fn start(config: AgentConfig) -> Arc<Agent> {
        let (owner, inbox) = mpsc::channel(crate::owner::INBOX_MAX);
        let (results, results_rx) = mpsc::unbounded_channel();
        let pool = DevicePool::new(config.pool.clone());
        // Fallback I/O through the metadata server when a direct path fails;
        // the owner reports it and probes.
        let link = crate::fallback::ServerLink::new(config.session.clone());
        let reporter: crate::devices::PathReporter = {
            let results = results.clone();
            Arc::new(move |device: &str, index: u32, reason: &str| {
                let input = Input::DirectPathFailed { device: device.to_string(), index, reason: reason.to_string() };
                let _ = results.send(ToOwner::Input(input));
            })
        };
        pool.set_server_link(link.clone(), reporter);
        let builder: LayoutBuilder = {
            let pool = pool.clone();
            let aliases = HostAliases::new(config.host_aliases.clone());
            // One set of credentials per handle, shared by its layouts (the
            // fenced state and the capabilities outlive a publish).
            let credentials: std::sync::Mutex<HashMap<u64, std::sync::Weak<HandleCredentials>>> = Default::default();
            let link = link.clone();
            Arc::new(move |description, handle| {
                let pool_uuid = description.pool_uuid;
                let description = aliases.apply(description);
                let volume = description.volume.0;
                let generation = description.layout_generation;
                let creds = {
                    let mut all = credentials.lock().unwrap_or_else(|e| e.into_inner());
                    all.retain(|_, c| c.strong_count() > 0);
                    match all.get(&handle).and_then(std::sync::Weak::upgrade) {
                        Some(c) => c,
                        None => {
                            let c = HandleCredentials::new(HandleId(handle), Some(link.clone()));
                            all.insert(handle, Arc::downgrade(&c));
                            c
                        }
                    }
                };
                Layout::with_health(description, |endpoint| {
                    pool.layout_device(endpoint, pool_uuid, volume, Some(creds.clone()), generation)
                })
                .map_err(|e| e.to_string())
            })
        };
        let core = AgentCore::new(CoreConfig {
            addrs: config.session.addrs().iter().map(|a| a.to_string()).collect(),
            export_dir: config.export_dir.clone(),
        });
        let (state_tx, state) = watch::channel(core.connect_state());
        let span = tracing::info_span!("agent", mds = %config.session.addr, agent = %config.session.name);
        let shell = Shell::new(
            core,
            (owner.clone(), inbox),
            (results, results_rx),
            config.clone(),
            pool.clone(),
            link,
            builder,
            state_tx,
        );
        tokio::spawn(shell.run().instrument(span));
        Arc::new(Agent { config, owner, state, pool })
    }

    pub fn device_pool(&self) -> &Arc<DevicePool> {
        &self.pool
    }

    async fn call(&self, command: Command) -> Reply {
        let (reply, answer) = oneshot::channel();
        let shut_down = || Reply::Failed(AgentError::Session(SessionError::ShutDown));
        if self.owner.send(ToOwner::Command { command, reply }).await.is_err() {
            return shut_down();
        }
        answer.await.unwrap_or_else(|_| shut_down())
    }

    /// Waits for the first connection to the metadata server; Err if it
    /// refused this agent for good (wrong keys).
    pub async fn wait_ready(&self) -> Result<(), String> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, ConnectState::Connecting { .. }))
            .await
            .map_err(|_| "the agent stopped".to_string())?
            .clone();
        match state {
            ConnectState::Connected { .. } => Ok(()),
            ConnectState::Fatal(e) => Err(e),
            ConnectState::Stopped => Err("the agent stopped".to_string()),
            ConnectState::Connecting { .. } => unreachable!("waited for another state"),
        }
    }

    /// The connection to the metadata server.
    pub fn connect_state(&self) -> ConnectState {
        self.state.borrow().clone()
    }

    /// The default export socket of `volume`.
    pub fn default_socket(&self, volume: &str) -> PathBuf {
        self.config.export_dir.join(format!("{volume}.sock"))
    }

    pub fn kernel_settings(&self) -> KernelSettings {
        self.config.kernel
    }

    pub async fn attach(&self, request: AttachRequest) -> Result<AttachmentInfo, AgentError> {
        self.attach_with(request, None).await
    }

    /// Attaches `request.volume`; with `handover_token`, with the token its
    /// holder issued for this agent (the mode is the holder's).
    pub async fn attach_with(
        &self,
        request: AttachRequest,
        handover_token: Option<Vec<u8>>,
    ) -> Result<AttachmentInfo, AgentError> {
        let open = match handover_token {
            Some(token) => OpenWith::Handover(token),
            None => OpenWith::Mode(request.mode),
        };
        let spec = AttachSpec {
            volume: request.volume,
            open,
            socket: request.socket,
            tcp: request.tcp,
            kernel: None,
            locks: request.locks,
        };
        self.attach_spec(spec).await
    }

    pub(crate) async fn attach_spec(&self, spec: AttachSpec) -> Result<AttachmentInfo, AgentError> {
        match self.call(Command::Attach(spec)).await {
            Reply::Attached(info) => Ok(*info),
            other => Err(failed(other)),
        }
    }

    /// Issues a handover token for `volume` to the agent whose public key is
    /// `to_key` (a `.pub` file's content, `sanvol-ed25519 HEX`, or hex).
    pub async fn handover(&self, volume: &str, to_key: &str) -> Result<Vec<u8>, AgentError> {
        let (key, _) = control_client::keys::parse_public(to_key)
            .map_err(|e| AgentError::Session(SessionError::Server(format!("the target agent's key: {e:#}"))))?;
        match self.call(Command::Handover { volume: volume.to_string(), to_key: key.to_bytes() }).await {
            Reply::Token(token) => Ok(token),
            other => Err(failed(other)),
        }
    }

    pub async fn detach(&self, volume: &str) -> Result<(), AgentError> {
        match self.call(Command::Detach { volume: volume.to_string() }).await {
            Reply::Done => Ok(()),
            other => Err(failed(other)),
        }
    }

    /// The attached volumes (not those still being attached).
    pub async fn list(&self) -> Vec<AttachmentInfo> {
        match self.call(Command::List).await {
            Reply::List(list) => list,
            _ => Vec::new(),
        }
    }

    pub async fn status(&self) -> AgentStatus {
        match self.call(Command::Status).await {
            Reply::Status(status) => status,
            _ => AgentStatus { mds: "stopped".into(), mds_detail: String::new(), volumes: 0 },
        }
    }

    /// Takes back a handle the previous run of this agent held (from its
    /// state file) and serves it as it was served; `kernel` says what to do
    /// with its kernel device ([`crate::kernel::reattach::restore_plan`]).
    pub async fn restore(&self, held: HeldHandle, kernel: Option<KernelPlan>) -> Result<AttachmentInfo, AgentError> {
        let _warm = self.connect_early(&held);
        match self.call(Command::Restore(RestoreSpec { held, kernel })).await {
            Reply::Attached(info) => Ok(*info),
            other => Err(failed(other)),
        }
    }

    /// Starts connecting to the devices `held`'s volume was on (the state
    /// file's list) so that the connections and label checks overlap the
    /// server's answer to the resume instead of following it. Nothing is
    /// written: the attach that follows the resume uses these connections
    /// (the pool shares devices by URI and serializes connecting) for the
    /// layout the server gives, and connects anything else it names. The
    /// devices stay pooled while the returned handles live.
    fn connect_early(&self, held: &HeldHandle) -> Vec<Arc<crate::devices::PooledDevice>> {
        let aliases = HostAliases::new(self.config.host_aliases.clone());
        held.devices
            .iter()
            .filter(|endpoint| endpoint.online || endpoint.resyncing)
            .filter_map(|endpoint| {
                let endpoint = volume_format::description::DeviceEndpoint {
                    uri: aliases.rewrite(&endpoint.uri),
                    ..endpoint.clone()
                };
                let device = self.pool.device(&endpoint, held.pool_uuid).ok()?;
                let connecting = device.clone();
                tokio::spawn(async move {
                    if let Err(e) = connecting.connect().await {
                        // The attach after the resume tries again and reports it.
                        tracing::debug!(error = %e, "connecting early to a device failed");
                    }
                });
                Some(device)
            })
            .collect()
    }

    /// Detaches everything (flush + close) and stops. Kernel devices stay connected (their I/O
    /// waits up to the dead-connection timeout), so that the next agent can reattach them.
    pub async fn shutdown(&self) {
        self.call(Command::Shutdown).await;
    }
}

/// Kernel attach (see [`crate::kernel`]).
impl Agent {
    /// Attaches `volume` (socket export as usual) and connects it to a kernel NBD device.
    /// Without the driver, the volume stays attached on its socket export and the reply says why.
    pub async fn attach_kernel(
        &self,
        request: crate::kernel::KernelAttachRequest,
    ) -> Result<AttachmentInfo, AgentError> {
        let index = match &request.nbd_device {
            Some(name) => Some(
                crate::kernel::parse_device(name)
                    .map_err(|e| AgentError::Kernel { volume: request.volume.clone(), message: e.to_string() })?,
            ),
            None => None,
        };
        let spec = AttachSpec {
            volume: request.volume,
            open: OpenWith::Mode(request.mode),
            socket: None,
            tcp: None,
            kernel: Some(KernelPlan::Connect { index }),
            locks: Vec::new(),
        };
        self.attach_spec(spec).await
    }

    /// Re-opens `volume` and gives `/dev/nbd<index>`, which a previous agent left connected with
    /// backend identifier `backend` of pool `pool`, fresh sockets (see [`crate::kernel::reattach`]).
    pub(crate) async fn reattach_kernel(
        &self,
        volume: &str,
        mode: OpenMode,
        index: u32,
        backend: String,
        pool: uuid::Uuid,
    ) -> Result<AttachmentInfo, AgentError> {
        let spec = AttachSpec {
            volume: volume.to_string(),
            open: OpenWith::Mode(mode),
            socket: None,
            tcp: None,
            kernel: Some(KernelPlan::Reconnect { index, backend, pool }),
            locks: Vec::new(),
        };
        self.attach_spec(spec).await
    }

    /// After a restart: finds the kernel devices a previous agent left connected (sanvol backend
    /// identifiers, no live process behind them) other than `skip` (those the state file named),
    /// re-opens their volumes and gives the same devices fresh sockets. Returns one line per device
    /// for the log.
    pub async fn reattach_kernel_devices(&self, skip: &[u32]) -> Vec<String> {
        crate::kernel::reattach::reattach_all(self, skip).await
    }
}

/// The error of a reply that is not the expected one.
fn failed(reply: Reply) -> AgentError {
    match reply {
        Reply::Failed(e) => e,
        other => AgentError::Session(SessionError::Unexpected { request: "agent", response: format!("{other:?}") }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use blockio::client::{ClientOptions, NbdClient};
    use blockio::uri::NbdUri;
    use blockio::BlockDevice;
    use volume_format::control::messages::{Request, ServerEvent};
    use volume_format::description::DeviceEndpoint;
    use volume_format::HandleId;

    use super::*;
    use crate::control::ControlRequest;
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
        Agent::start(AgentConfig::new(mds.session_config(), pool.dir.path().join("exports")))
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
            .attach(AttachRequest {
                volume: "vol".into(),
                mode: OpenMode::Exclusive,
                socket: None,
                tcp: None,
                locks: Vec::new(),
            })
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
        let again = AttachRequest {
            volume: "vol".into(),
            mode: OpenMode::Exclusive,
            socket: None,
            tcp: None,
            locks: Vec::new(),
        };
        assert!(matches!(agent.attach(again).await, Err(AgentError::AlreadyAttached(_))));
        let busy = AttachRequest {
            volume: "busy".into(),
            mode: OpenMode::Exclusive,
            socket: None,
            tcp: None,
            locks: Vec::new(),
        };
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
            locks: Vec::new(),
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
        let req = AttachRequest {
            volume: "vol".into(),
            mode: OpenMode::SharedWrite,
            socket: None,
            tcp: None,
            locks: Vec::new(),
        };
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
        let req = AttachRequest {
            volume: "vol".into(),
            mode: OpenMode::Exclusive,
            socket: None,
            tcp: None,
            locks: Vec::new(),
        };
        let e = agent.attach(req).await.unwrap_err().to_string();
        assert!(e.contains("dev0") && e.contains("gone.sock"), "{e}");
        assert_eq!(mds.expect(|r| matches!(r, Request::Close { .. })).await, Request::Close { handle: HandleId(11) });
        assert!(agent.list().await.is_empty());
    }

    /// A unix socket that accepts NBD connections and never answers: a device
    /// whose connect does not complete. Reports each accepted connection;
    /// [`StuckDevice::hang_up`] closes them (the connect then fails).
    struct StuckDevice {
        uri: String,
        accepted: tokio::sync::mpsc::Receiver<()>,
        task: tokio::task::JoinHandle<()>,
    }

    impl StuckDevice {
        fn start(dir: &std::path::Path) -> StuckDevice {
            let path = dir.join("stuck.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let (tx, accepted) = tokio::sync::mpsc::channel(16);
            let task = tokio::spawn(async move {
                let mut open = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    open.push(stream);
                    let _ = tx.send(()).await;
                }
            });
            StuckDevice { uri: format!("nbd+unix:///stuck?socket={}", path.display()), accepted, task }
        }

        fn hang_up(&self) {
            self.task.abort();
        }
    }

    impl Drop for StuckDevice {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn attach_request(volume: &str) -> AttachRequest {
        AttachRequest { volume: volume.into(), mode: OpenMode::Exclusive, socket: None, tcp: None, locks: Vec::new() }
    }

    /// Bounds a call that must answer at once; on failure it names what waited.
    async fn promptly<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what} waited behind the attach in progress"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_and_status_answer_while_an_attach_waits_for_a_device() {
        let pool = pool();
        let mut stuck = StuckDevice::start(pool.dir.path());
        let mut slow = volume_on(&pool, "slow", 1, 1, 1);
        slow.devices[0].uri = stuck.uri.clone();
        let mut mds = FakeMds::start(pool.dir.path(), vec![volume_on(&pool, "vol", 1, 1, 1), slow], 10_000);
        let agent = Agent::start(AgentConfig {
            // The stuck device must stay stuck for the whole test.
            pool: PoolOptions { connect_timeout: Duration::from_secs(3600), ..PoolOptions::default() },
            ..AgentConfig::new(mds.session_config(), pool.dir.path().join("exports"))
        });
        agent.wait_ready().await.unwrap();
        agent.attach(attach_request("vol")).await.unwrap();
        let socket = pool.dir.path().join("agent.sock");
        let listener = crate::control::bind(&socket).await.unwrap();
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(crate::control::serve(agent.clone(), listener, socket.clone(), async move {
            let _ = stopped.await;
        }));

        let attaching = tokio::spawn({
            let agent = agent.clone();
            async move { agent.attach(attach_request("slow")).await }
        });
        // The agent is connecting to the stuck device now: the attach cannot finish.
        stuck.accepted.recv().await.unwrap();

        let listed = promptly("list", agent.list()).await;
        assert_eq!(listed.iter().map(|i| i.volume.as_str()).collect::<Vec<_>>(), ["vol"]);
        let status = promptly("status", crate::control::call(&socket, &ControlRequest::Status)).await.unwrap();
        assert_eq!(status.agent.unwrap().volumes, 1);
        let listed = promptly("list", crate::control::call(&socket, &ControlRequest::List)).await.unwrap();
        assert_eq!(listed.volumes.unwrap().len(), 1);
        let again = promptly("a second attach", agent.attach(attach_request("slow"))).await;
        assert!(again.is_err(), "{again:?}");
        assert!(!attaching.is_finished());

        // The device hangs up: the attach fails naming it and closes its handle.
        stuck.hang_up();
        let e = attaching.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("stuck.sock"), "{e}");
        assert_eq!(mds.expect(|r| matches!(r, Request::Close { .. })).await, Request::Close { handle: HandleId(12) });
        assert_eq!(agent.list().await.len(), 1);
        agent.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_and_detach_go_on_while_the_server_has_not_answered_an_open() {
        let pool = pool();
        let mut mds = FakeMds::start(
            pool.dir.path(),
            vec![volume_on(&pool, "vol", 1, 1, 1), volume_on(&pool, "slow", 1, 1, 1)],
            10_000,
        );
        let agent = agent_for(&mds, &pool);
        agent.wait_ready().await.unwrap();
        agent.attach(attach_request("vol")).await.unwrap();

        mds.hold_opens.store(true, std::sync::atomic::Ordering::SeqCst);
        let attaching = tokio::spawn({
            let agent = agent.clone();
            async move { agent.attach(attach_request("slow")).await }
        });
        mds.expect(|r| matches!(r, Request::Open { volume, .. } if volume == "slow")).await;

        let listed = promptly("list", agent.list()).await;
        assert_eq!(listed.iter().map(|i| i.volume.as_str()).collect::<Vec<_>>(), ["vol"]);
        promptly("detaching another volume", agent.detach("vol")).await.unwrap();
        assert_eq!(mds.expect(|r| matches!(r, Request::Close { .. })).await, Request::Close { handle: HandleId(11) });
        assert!(promptly("list", agent.list()).await.is_empty());
        assert!(!attaching.is_finished());

        mds.release_opens().await;
        let info = attaching.await.unwrap().unwrap();
        assert_eq!((info.volume.as_str(), info.handle, info.state.as_str()), ("slow", 12, "open"));
        assert_eq!(agent.list().await.len(), 1);
        agent.shutdown().await;
    }

    #[tokio::test]
    async fn a_wrong_server_key_is_fatal() {
        let pool = pool();
        let mds = FakeMds::start(pool.dir.path(), vec![], 10_000);
        let mut config = mds.session_config();
        config.server_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        let agent = Agent::start(AgentConfig::new(config, pool.dir.path().into()));
        let e = agent.wait_ready().await.unwrap_err();
        assert!(e.contains("pinned"), "{e}");
    }
}
