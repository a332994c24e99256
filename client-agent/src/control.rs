//! The agent's side of its local control socket: serves the requests of
//! [`control_client::agent_api`] (the protocol and its types live there, so
//! `sanvol-backup` and scripts can call the agent without linking it).
//! At most [`CONNECTIONS_MAX`] clients at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

pub use control_client::agent_api::{
    call, AgentStatus, ControlReply, ControlRequest, DEFAULT_CONTROL_SOCKET, REQUEST_BYTES_MAX,
};

use crate::agent::Agent;
use crate::persist::Persisted;

/// Most simultaneous control connections.
pub const CONNECTIONS_MAX: usize = 16;

async fn handle(agent: &Agent, persisted: Option<&Persisted>, request: ControlRequest) -> ControlReply {
    let ok = ControlReply { ok: true, ..Default::default() };
    let no_config =
        || ControlReply::error("this agent was started without a config file to persist volumes in (--config)");
    match request {
        ControlRequest::AttachPersist(request) => match persisted {
            Some(p) => match p.attach_and_persist(agent, request).await {
                Ok(info) => ControlReply { attached: Some(info), config: Some(p.path().display().to_string()), ..ok },
                Err(e) => ControlReply::error(e),
            },
            None => no_config(),
        },
        ControlRequest::DetachPersist { volume } => match persisted {
            Some(p) => match p.detach_and_forget(agent, &volume).await {
                Ok(()) => ControlReply { config: Some(p.path().display().to_string()), ..ok },
                Err(e) => ControlReply::error(e),
            },
            None => no_config(),
        },
        ControlRequest::Attach(request) => match agent.attach(request).await {
            Ok(info) => ControlReply { attached: Some(info), ..ok },
            Err(e) => ControlReply::error(e),
        },
        ControlRequest::AttachKernel(request) => match agent.attach_kernel(request).await {
            Ok(info) => ControlReply { attached: Some(info), ..ok },
            Err(e) => ControlReply::error(e),
        },
        ControlRequest::AttachHandover { request, token } => match hex::decode(token.trim()) {
            Ok(token) => match agent.attach_with(request, Some(token)).await {
                Ok(info) => ControlReply { attached: Some(info), ..ok },
                Err(e) => ControlReply::error(e),
            },
            Err(e) => ControlReply::error(format!("the handover token is not hex: {e}")),
        },
        ControlRequest::Handover { volume, to_key } => match agent.handover(&volume, &to_key).await {
            Ok(token) => ControlReply { token: Some(hex::encode(token)), ..ok },
            Err(e) => ControlReply::error(e),
        },
        ControlRequest::Detach { volume } => match agent.detach(&volume).await {
            Ok(()) => ok,
            Err(e) => ControlReply::error(e),
        },
        ControlRequest::List => ControlReply { volumes: Some(agent.list().await), ..ok },
        ControlRequest::Status => ControlReply { agent: Some(agent.status().await), ..ok },
    }
}

async fn serve_connection(
    agent: Arc<Agent>,
    persisted: Option<Arc<Persisted>>,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r).take(REQUEST_BYTES_MAX as u64 + 1).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let reply = if n > REQUEST_BYTES_MAX {
            let reply = ControlReply::error(format!("request longer than {REQUEST_BYTES_MAX} bytes"));
            write_reply(&mut w, &reply).await?;
            return Ok(());
        } else if line.trim().is_empty() {
            continue;
        } else {
            match serde_json::from_str::<ControlRequest>(&line) {
                Ok(request) => handle(&agent, persisted.as_deref(), request).await,
                Err(e) => ControlReply::error(format!("malformed control request: {e}")),
            }
        };
        write_reply(&mut w, &reply).await?;
    }
}

async fn write_reply(w: &mut (impl AsyncWriteExt + Unpin), reply: &ControlReply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes).await
}

/// Binds the control socket at `path` (refusing one another agent listens on).
pub async fn bind(path: &Path) -> Result<tokio::net::UnixListener, crate::export::ExportError> {
    crate::export::bind_unix(path).await
}

/// Serves the control socket until `shutdown` resolves; removes the socket file.
/// `attach --persist` is refused (no config file).
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    path: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(agent, None, listener, path, shutdown).await
}

/// Like [`serve`], with the config file `attach/detach --persist` change.
pub async fn serve_with(
    agent: Arc<Agent>,
    persisted: Option<Arc<Persisted>>,
    listener: tokio::net::UnixListener,
    path: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a control connection failed");
                        tokio::task::yield_now().await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!("too many control connections; closing the new one");
                    continue;
                };
                let (agent, persisted) = (agent.clone(), persisted.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = serve_connection(agent, persisted, stream).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}
