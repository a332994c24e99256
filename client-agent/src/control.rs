//! The agent's local control socket: how `sanvol-agent attach/detach/list`
//! (and scripts) talk to the running agent.
//!
//! Protocol: JSON lines over a unix socket (mode 0660). Each request is one
//! JSON object on one line; each gets exactly one reply line, in order.
//!
//! ```text
//! {"op":"attach","volume":"db","mode":"Exclusive"}                 (optional "socket":"/path" or "tcp":"127.0.0.1:10809")
//! {"op":"attach-kernel","volume":"db","mode":"Exclusive"}          (optional "nbd_device":"/dev/nbd0")
//! {"op":"detach","volume":"db"}
//! {"op":"list"}
//! {"op":"status"}
//! ```
//! Replies: `{"ok":true,"attached":{...}}` for attach, `{"ok":true}` for
//! detach, `{"ok":true,"volumes":[...]}` for list, `{"ok":true,"agent":{...}}`
//! for status, and `{"ok":false,"error":"..."}` on failure — the error text
//! is meant for people and is printed verbatim by the CLI. `mode` is one of
//! `ReadOnly`, `SharedWrite`, `Exclusive`.
//!
//! Why JSON lines: scripts can drive it with `socat` or `nc -U`, and it
//! needs no schema tooling. Bounded: a request line is at most
//! [`REQUEST_BYTES_MAX`], and at most [`CONNECTIONS_MAX`] clients at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use crate::agent::{Agent, AttachRequest, AttachmentInfo};
use crate::session::ConnectState;

/// Where `sanvol-agent run` listens by default (and its clients look).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/sanvol/agent.sock";

/// Longest request line accepted.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Most simultaneous control connections.
pub const CONNECTIONS_MAX: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    Attach(AttachRequest),
    /// Attach with a handover token (hex) the holder's agent printed: live
    /// migration, the volume stays held by the holder until it detaches.
    AttachHandover {
        #[serde(flatten)]
        request: AttachRequest,
        token: String,
    },
    /// Issue a handover token for `volume` to the agent with public key
    /// `to_key` (hex); the reply's `token` carries it (hex).
    Handover {
        volume: String,
        to_key: String,
    },
    /// Attach and connect to a kernel NBD device (`/dev/nbdX`).
    AttachKernel(crate::kernel::KernelAttachRequest),
    Detach {
        volume: String,
    },
    List,
    Status,
}

/// The agent as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// `connected`, `connecting` or `stopped`.
    pub mds: String,
    pub mds_detail: String,
    pub volumes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<AttachmentInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<AttachmentInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    /// A handover token (hex), from `handover`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl ControlReply {
    fn error(e: impl ToString) -> ControlReply {
        ControlReply { ok: false, error: Some(e.to_string()), ..Default::default() }
    }
}

async fn handle(agent: &Agent, request: ControlRequest) -> ControlReply {
    let ok = ControlReply { ok: true, ..Default::default() };
    match request {
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
        ControlRequest::Status => {
            let (mds, mds_detail) = match agent.session().state() {
                ConnectState::Connected { epoch } => ("connected", format!("connection {epoch}")),
                ConnectState::Connecting { last_error } => ("connecting", last_error.unwrap_or_default()),
                ConnectState::Fatal(e) => ("stopped", e),
                ConnectState::Stopped => ("stopped", String::new()),
            };
            let agent_status = AgentStatus { mds: mds.to_string(), mds_detail, volumes: agent.list().await.len() };
            ControlReply { agent: Some(agent_status), ..ok }
        }
    }
}

async fn serve_connection(agent: Arc<Agent>, stream: UnixStream) -> std::io::Result<()> {
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
                Ok(request) => handle(&agent, request).await,
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
pub async fn serve(
    agent: Arc<Agent>,
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
                let agent = agent.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = serve_connection(agent, stream).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Client side: sends one request to the agent at `path`, returns its reply.
pub async fn call(path: &Path, request: &ControlRequest) -> Result<ControlReply, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the agent's control socket {}: {e} (is `sanvol-agent run` running? see --control-socket)",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut bytes = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    w.write_all(&bytes).await.map_err(|e| format!("sending to the agent: {e}"))?;
    let mut line = String::new();
    BufReader::new(r)
        .take(16 * 1024 * 1024)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the agent's reply: {e}"))?;
    if line.is_empty() {
        return Err("the agent closed the control connection without replying".to_string());
    }
    serde_json::from_str(&line).map_err(|e| format!("the agent sent a malformed reply: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume_format::control::messages::OpenMode;

    #[test]
    fn request_encoding_is_stable() {
        let attach = ControlRequest::Attach(AttachRequest {
            volume: "db".into(),
            mode: OpenMode::Exclusive,
            socket: None,
            tcp: None,
        });
        assert_eq!(serde_json::to_string(&attach).unwrap(), r#"{"op":"attach","volume":"db","mode":"Exclusive"}"#);
        assert_eq!(serde_json::to_string(&ControlRequest::List).unwrap(), r#"{"op":"list"}"#);
        let detach: ControlRequest = serde_json::from_str(r#"{"op":"detach","volume":"db"}"#).unwrap();
        assert_eq!(detach, ControlRequest::Detach { volume: "db".into() });
        let tcp: ControlRequest =
            serde_json::from_str(r#"{"op":"attach","volume":"v","mode":"ReadOnly","tcp":"127.0.0.1:0"}"#).unwrap();
        assert!(matches!(tcp, ControlRequest::Attach(AttachRequest { tcp: Some(_), .. })));
        assert_eq!(serde_json::to_string(&ControlReply::error("no")).unwrap(), r#"{"ok":false,"error":"no"}"#);
    }
}
