//! Persistent attachments: the config file's `[[volume]]` entries are
//! attached at every start of the agent, like Ceph's `rbdmap` maps RBD
//! images at boot; `attach --persist` and `detach --persist` add and remove
//! entries while the agent runs.
//!
//! At start ([`attach_all`]), after the agent is connected:
//! - An entry whose volume the state file names (a crash or `kill -9`: the
//!   handle is resumed with its key, see [`crate::state_dir`]) is not attached
//!   a second time: it waits for that resume, and is attached afresh only if
//!   the resume failed.
//! - A kernel entry (`nbd_device`) gets the same `/dev/nbdX`: a clean stop
//!   leaves kernel devices connected, and the device is then given fresh
//!   sockets ([`crate::kernel::reattach::persisted_plan`]); the scan for
//!   orphaned kernel devices leaves these devices to this module.
//! - Every entry is tried once before the agent says it is ready (its
//!   control socket, `READY=1` to systemd), so units ordered after the agent
//!   find their volumes — but at most [`READY_WAIT_MAX`]: a volume that cannot
//!   be attached never holds the agent (or the other volumes) back. It is
//!   logged with the file and line of its entry and retried, each pause
//!   doubling from [`RETRY_FIRST`] up to [`RETRY_MAX`], until it is attached,
//!   attached by hand, or its entry is removed with `detach --persist`.
//!
//! A plain `detach` leaves the entry: the volume is attached again at the
//! next start. `detach --persist` detaches and removes it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::agent::{Agent, AgentError, AttachRequest, AttachmentInfo};
use crate::config_file::{self, PersistedTarget, PersistedVolume};
use crate::core::{AttachSpec, OpenWith};
use crate::session::SessionError;
pub use control_client::agent_api::PersistRequest;

/// First pause before a persisted volume that failed is tried again.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between two tries of a persisted volume.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Longest the agent waits for the first try of every persisted volume
/// before it says it is ready anyway (below systemd's default start timeout).
pub const READY_WAIT_MAX: Duration = Duration::from_secs(30);

/// The persisted volumes of a running agent and the file they live in.
pub struct Persisted {
    path: PathBuf,
    volumes: Mutex<Vec<PersistedVolume>>,
    /// One rewrite of the file at a time.
    file: tokio::sync::Mutex<()>,
}

impl Persisted {
    pub fn new(path: PathBuf, volumes: Vec<PersistedVolume>) -> Arc<Persisted> {
        Arc::new(Persisted { path, volumes: Mutex::new(volumes), file: tokio::sync::Mutex::new(()) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn volumes(&self) -> Vec<PersistedVolume> {
        self.volumes.lock().expect("persisted volumes").clone()
    }

    fn current(&self, name: &str) -> Option<PersistedVolume> {
        self.volumes.lock().expect("persisted volumes").iter().find(|v| v.name == name).cloned()
    }

    /// The kernel devices entries name (the orphan scan leaves them alone).
    pub fn kernel_devices(&self) -> Vec<u32> {
        self.volumes()
            .iter()
            .filter_map(|v| match v.target {
                PersistedTarget::Kernel(index) => index,
                _ => None,
            })
            .collect()
    }

    /// `attach --persist`: attaches as asked, then adds (or replaces) the
    /// volume's entry in the file — with the kernel device it got.
    pub async fn attach_and_persist(&self, agent: &Agent, request: PersistRequest) -> Result<AttachmentInfo, String> {
        let _file = self.file.lock().await;
        let device = match &request.nbd_device {
            Some(name) => Some(crate::kernel::parse_device(name).map_err(|e| e.to_string())?),
            None => None,
        };
        let AttachRequest { volume, mode, socket, tcp, locks } = request.attach;
        if !locks.is_empty() {
            return Err("--persist does not record --lock yet: attach with locks without --persist".into());
        }
        let target = match (request.kernel || device.is_some(), socket, tcp) {
            (true, None, None) => PersistedTarget::Kernel(device),
            (true, _, _) => return Err("a kernel attach is served without --socket or --tcp".into()),
            (false, Some(_), Some(_)) => return Err("give --socket or --tcp, not both".into()),
            (false, socket, None) => PersistedTarget::Socket(socket),
            (false, None, Some(tcp)) => PersistedTarget::Tcp(tcp),
        };
        let mut entry = PersistedVolume { name: volume, mode, target, line: 0 };
        let info = match &entry.target {
            PersistedTarget::Kernel(_) => {
                let request = crate::kernel::KernelAttachRequest {
                    volume: entry.name.clone(),
                    mode: entry.mode,
                    nbd_device: request.nbd_device,
                };
                agent.attach_kernel(request).await
            }
            _ => attach_entry(agent, &entry).await,
        }
        .map_err(|e| e.to_string())?;
        if let (PersistedTarget::Kernel(_), Some(device)) = (&entry.target, &info.kernel_device) {
            entry.target = PersistedTarget::Kernel(crate::kernel::parse_device(device).ok());
        }
        let (path, saved) = (self.path.clone(), entry.clone());
        let written = tokio::task::spawn_blocking(move || config_file::add_volume(&path, &saved))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = written {
            return Err(format!(
                "volume {} is attached ({}), but it was not added to the config file: {e}",
                entry.name,
                info.kernel_device.as_deref().unwrap_or(&info.export_uri)
            ));
        }
        info!(volume = entry.name, config = %self.path.display(), "volume attached and persisted");
        let mut volumes = self.volumes.lock().expect("persisted volumes");
        volumes.retain(|v| v.name != entry.name);
        volumes.push(entry);
        Ok(info)
    }

    /// `detach --persist`: detaches (if attached) and removes the entry. A
    /// detach that fails (the flush) changes nothing, the entry included.
    pub async fn detach_and_forget(&self, agent: &Agent, volume: &str) -> Result<(), String> {
        let _file = self.file.lock().await;
        let attached = match agent.detach(volume).await {
            Ok(()) => true,
            Err(AgentError::NotAttached(_)) => false,
            Err(e) => return Err(e.to_string()),
        };
        let (path, name) = (self.path.clone(), volume.to_string());
        let removed = tokio::task::spawn_blocking(move || config_file::remove_volume(&path, &name))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| {
                let done = if attached { "it is detached, but " } else { "" };
                format!("volume {volume}: {done}its entry could not be removed from the config file: {e}")
            })?;
        self.volumes.lock().expect("persisted volumes").retain(|v| v.name != volume);
        if !attached && !removed {
            return Err(format!("volume {volume} is neither attached nor in {}", self.path.display()));
        }
        info!(volume, config = %self.path.display(), "volume detached and removed from the config file");
        Ok(())
    }
}

/// Attaches one entry as the file says.
pub async fn attach_entry(agent: &Agent, entry: &PersistedVolume) -> Result<AttachmentInfo, AgentError> {
    match &entry.target {
        PersistedTarget::Socket(socket) => {
            agent
                .attach(AttachRequest {
                    volume: entry.name.clone(),
                    mode: entry.mode,
                    socket: socket.clone(),
                    tcp: None,
                    locks: Vec::new(),
                })
                .await
        }
        PersistedTarget::Tcp(tcp) => {
            agent
                .attach(AttachRequest {
                    volume: entry.name.clone(),
                    mode: entry.mode,
                    socket: None,
                    tcp: Some(*tcp),
                    locks: Vec::new(),
                })
                .await
        }
        PersistedTarget::Kernel(index) => {
            // Without a device named: the one a clean stop left connected to this volume, if any.
            let (volume, index) = (entry.name.clone(), *index);
            let plan = tokio::task::spawn_blocking(move || {
                match index.or_else(|| crate::kernel::reattach::orphan_of(&volume)) {
                    Some(index) => crate::kernel::reattach::persisted_plan(&volume, index),
                    None => Ok(crate::core::KernelPlan::Connect { index: None }),
                }
            })
            .await
            .map_err(|e| AgentError::Kernel { volume: entry.name.clone(), message: e.to_string() })?
            .map_err(|message| AgentError::Kernel { volume: entry.name.clone(), message })?;
            let spec = AttachSpec {
                volume: entry.name.clone(),
                open: OpenWith::Mode(entry.mode),
                socket: None,
                tcp: None,
                kernel: Some(plan),
                locks: Vec::new(),
            };
            agent.attach_spec(spec).await
        }
    }
}

/// Starts keeping every persisted volume attached; resolves once each had
/// its first try (the caller bounds the wait with [`READY_WAIT_MAX`]).
/// `from_state` are the volumes the state file names; `restored` turns true
/// once their resumes are done.
pub async fn attach_all(
    agent: Arc<Agent>,
    persisted: Arc<Persisted>,
    from_state: HashSet<String>,
    restored: watch::Receiver<bool>,
) {
    let mut first_tries = Vec::new();
    for entry in persisted.volumes() {
        let (tx, rx) = oneshot::channel();
        first_tries.push(rx);
        let resumed = from_state.contains(&entry.name);
        tokio::spawn(keep_attached(agent.clone(), persisted.clone(), entry, resumed, restored.clone(), tx));
    }
    for rx in first_tries {
        let _ = rx.await;
    }
}

fn served(info: &AttachmentInfo) -> &str {
    info.kernel_device.as_deref().unwrap_or(&info.export_uri)
}

async fn keep_attached(
    agent: Arc<Agent>,
    persisted: Arc<Persisted>,
    mut entry: PersistedVolume,
    resumed: bool,
    mut restored: watch::Receiver<bool>,
    first_try: oneshot::Sender<()>,
) {
    let mut first_try = Some(first_try);
    let config = persisted.path().display().to_string();
    if resumed {
        let _ = restored.wait_for(|done| *done).await;
    }
    let mut pause = RETRY_FIRST;
    for attempt in 1u64.. {
        match persisted.current(&entry.name) {
            Some(current) => entry = current,
            None => {
                info!(volume = entry.name, "no longer persisted (detach --persist); not attaching it");
                break;
            }
        }
        if let Some(info) = agent.list().await.into_iter().find(|i| i.volume == entry.name) {
            let how = if resumed { "taken back from the state file" } else { "already attached" };
            info!(volume = entry.name, served = served(&info), "persisted volume {how}");
            break;
        }
        match attach_entry(&agent, &entry).await {
            Ok(info) => {
                info!(
                    volume = entry.name,
                    served = served(&info),
                    config,
                    line = entry.line,
                    "persisted volume attached"
                );
                if persisted.current(&entry.name).is_none() {
                    // Removed by `detach --persist` while this attach was on its way.
                    let _ = agent.detach(&entry.name).await;
                }
                break;
            }
            Err(AgentError::AlreadyAttached(_)) => break,
            Err(AgentError::Session(SessionError::ShutDown)) => break,
            Err(e) => warn!(
                volume = entry.name,
                config,
                line = entry.line,
                attempt,
                retry_in_ms = pause.as_millis() as u64,
                "persisted volume could not be attached: {e}; trying again (detach --persist removes it)"
            ),
        }
        if let Some(tx) = first_try.take() {
            let _ = tx.send(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
    if let Some(tx) = first_try.take() {
        let _ = tx.send(());
    }
}
