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
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};
use volume_format::control::messages::OpenMode;

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
}

/// What `attach` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub volume: String,
    pub mode: OpenMode,
    /// Serve on this unix socket (default `EXPORT_DIR/VOLUME.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Serve on TCP (loopback only) instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<std::net::SocketAddr>,
}

/// One attached volume, as `list` shows it. Field names are part of the CLI's
/// `--json` output: keep them stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub volume: String,
    /// `read-only`, `shared-write` or `exclusive`.
    pub mode: String,
    pub handle: u64,
    pub export_uri: String,
    pub size_bytes: u64,
    pub layout_generation: u64,
    /// `open`, `recalled`, `lease-expired`, `revoked` or `detached`.
    pub state: String,
    /// Why, when the state is not `open` (e.g. the server's revoke reason).
    pub state_detail: String,
    pub io_in_flight: u64,
    pub io_waiting: u64,
}

struct Attachment {
    device: Arc<VolumeDevice>,
    mode: OpenMode,
    export: ExportHandle,
}

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    session: Session,
    pool: Arc<DevicePool>,
    /// Held across attach/detach so they are serialised; never on the data path.
    attached: Mutex<BTreeMap<String, Attachment>>,
}

impl Agent {
    /// Starts the session (connecting in the background).
    pub fn start(config: AgentConfig) -> Arc<Agent> {
        let pool = DevicePool::new(config.pool.clone());
        let builder: LayoutBuilder = {
            let pool = pool.clone();
            Arc::new(move |description| {
                let pool_uuid = description.pool_uuid;
                Layout::new(description, |endpoint| pool.device(endpoint, pool_uuid).map(|d| d as Arc<dyn BlockDevice>))
                    .map_err(|e| e.to_string())
            })
        };
        let (session, _task) = Session::start(config.session.clone(), builder);
        Arc::new(Agent { config, session, pool, attached: Mutex::new(BTreeMap::new()) })
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
        let volume = request.volume.clone();
        if volume.is_empty() || volume.contains('/') || volume.contains('\0') || volume.len() > 200 {
            return Err(AgentError::BadName(volume));
        }
        let mut attached = self.attached.lock().await;
        if attached.contains_key(&volume) {
            return Err(AgentError::AlreadyAttached(volume));
        }
        let opened = self.session.open(&volume, request.mode).await?;
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

        let device = Arc::new(VolumeDevice::new(
            volume.clone(),
            opened.handle,
            opened.mode == OpenMode::ReadOnly,
            opened.gate.clone(),
        ));
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
        attached.insert(volume.clone(), Attachment { device, mode: opened.mode, export });
        Ok(self.info(&volume, &attached[&volume]))
    }

    pub async fn detach(&self, volume: &str) -> Result<(), AgentError> {
        let mut attached = self.attached.lock().await;
        let Some(a) = attached.get(volume) else {
            return Err(AgentError::NotAttached(volume.to_string()));
        };
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
        }
    }

    pub async fn list(&self) -> Vec<AttachmentInfo> {
        let attached = self.attached.lock().await;
        attached.iter().map(|(volume, a)| self.info(volume, a)).collect()
    }

    /// Detaches everything (flush + close) and stops the session.
    pub async fn shutdown(&self) {
        let volumes: Vec<String> = self.attached.lock().await.keys().cloned().collect();
        for volume in volumes {
            if let Err(e) = self.detach(&volume).await {
                warn!(volume, error = %e, "detaching at shutdown failed");
            }
        }
        self.session.shutdown().await;
    }
}
