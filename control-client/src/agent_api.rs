//! The agent's local control socket API: how `sanvol-agent attach/detach/list`,
//! `sanvol-backup restore --to volume:NAME` and scripts talk to a running
//! agent. The agent serves it (`client_agent::control`); anyone may call it
//! with [`call`] without linking the agent (its kernel and netlink code).
//!
//! Protocol: JSON lines over a unix socket (mode 0660). Each request is one
//! JSON object on one line; each gets exactly one reply line, in order.
//!
//! ```text
//! {"op":"attach","volume":"db","mode":"Exclusive"}                 (optional "socket":"/path" or "tcp":"127.0.0.1:10809")
//! {"op":"attach-kernel","volume":"db","mode":"Exclusive"}          (optional "nbd_device":"/dev/nbd0")
//! {"op":"detach","volume":"db"}
//! {"op":"attach-persist","volume":"db","mode":"Exclusive"}         (as attach, or "kernel":true and optional "nbd_device")
//! {"op":"detach-persist","volume":"db"}
//! {"op":"list"}
//! {"op":"status"}
//! ```
//! Replies: `{"ok":true,"attached":{...}}` for attach, `{"ok":true}` for
//! detach, `{"ok":true,"volumes":[...]}` for list, `{"ok":true,"agent":{...}}`
//! for status, `{"ok":true,"attached":{...},"config":"/etc/sanvol/agent.toml"}`
//! for attach-persist (the config file the entry went into), and `{"ok":false,"error":"..."}` on failure — the error text
//! is meant for people and is printed verbatim by the CLI. `mode` is one of
//! `ReadOnly`, `SharedWrite`, `Exclusive`.
//!
//! Why JSON lines: scripts can drive it with `socat` or `nc -U`, and it
//! needs no schema tooling. Bounded: a request line is at most
//! [`REQUEST_BYTES_MAX`], a reply at most [`REPLY_BYTES_MAX`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use volume_format::control::messages::OpenMode;

/// Where `sanvol-agent run` listens by default (and its clients look).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/sanvol/agent.sock";

/// Longest request line an agent accepts.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Longest reply line a caller reads.
pub const REPLY_BYTES_MAX: u64 = 16 * 1024 * 1024;

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
    /// Byte-range locks to take on the shared handle (`--lock`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<volume_format::locks::LockRange>,
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
    /// The kernel device (`/dev/nbdX`) backing this volume, if it is attached to the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_device: Option<String>,
    /// Why a requested kernel attach did not happen (the socket export still serves the volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_note: Option<String>,
    /// The volume's write-back cache on this agent, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheInfo>,
    /// The volume's byte-range locks (every holder's), one line each:
    /// `bytes START..END by HOLDER (handle hN)`, this handle's marked `(this handle)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<String>,
    /// The server's copy of the volume's extents in progress (a resync,
    /// a move), as it last told: "move its extents off device 1: copying
    /// online, 40% of 512 MiB (writes go on)"; empty when none runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recovery: String,
    /// Writes acknowledged before the snapshot's copy of their chunk was
    /// made (`--cow-write-behind-kib`), not yet on the devices; a FLUSH
    /// waits for them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub writes_behind: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A volume's write-back cache as `sanvol-agent list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInfo {
    /// `mirrored`, `write-through` or `local`.
    pub state: String,
    /// Why it writes through (the mirror's failure), else empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state_detail: String,
    /// Acknowledged bytes not yet on the devices.
    pub dirty_bytes: u64,
    pub log_used_bytes: u64,
    pub log_capacity_bytes: u64,
    /// Bytes written to the devices per second, over the last 10 s.
    pub destage_bytes_per_sec: u64,
    /// Bytes of acknowledged writes written to the devices since the cache
    /// opened, and the device writes that took (fewer where rewrites of a
    /// block were absorbed and neighbouring blocks merged).
    #[serde(default)]
    pub destaged_bytes: u64,
    #[serde(default)]
    pub destage_writes: u64,
    /// Bytes of large writes sent straight to the devices since the cache
    /// opened (write-around: no logged record touched their range).
    #[serde(default)]
    pub written_around_bytes: u64,
    /// Write-through writes already on the devices, not yet acknowledged:
    /// the failed mirror may hold older writes under them, and they wait
    /// until it has been emptied (mirroring started again).
    #[serde(default)]
    pub writes_waiting_for_mirror: u64,
    /// Clean blocks kept in memory for reads, of how many at most (bytes),
    /// and reads they answered (hits) or not (misses) since the cache
    /// opened.
    #[serde(default)]
    pub read_cache_bytes: u64,
    #[serde(default)]
    pub read_cache_capacity_bytes: u64,
    #[serde(default)]
    pub read_hits: u64,
    #[serde(default)]
    pub read_misses: u64,
    pub log_path: String,
}

/// What `attach --kernel` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelAttachRequest {
    pub volume: String,
    pub mode: OpenMode,
    /// `/dev/nbdN` to use; default the first free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_device: Option<String>,
}

/// What `attach --persist` asks for: an attach (socket, TCP or kernel) that
/// the agent also adds to its config file's volumes, attached at every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistRequest {
    /// Volume, mode, socket or TCP: as `attach` (the same JSON fields).
    #[serde(flatten)]
    pub attach: AttachRequest,
    /// Connect it to a kernel NBD device too (`nbd_device`, or the first free one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kernel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_device: Option<String>,
}

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
    AttachKernel(KernelAttachRequest),
    Detach {
        volume: String,
    },
    /// Attach and add the volume to the agent's config file (`attach --persist`).
    AttachPersist(PersistRequest),
    /// Detach (if attached) and remove the volume from the agent's config
    /// file (`detach --persist`).
    DetachPersist {
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
    /// The config file an `attach-persist` or `detach-persist` changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

impl ControlReply {
    pub fn error(e: impl ToString) -> ControlReply {
        ControlReply { ok: false, error: Some(e.to_string()), ..Default::default() }
    }
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
        .take(REPLY_BYTES_MAX)
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

    #[test]
    fn request_encoding_is_stable() {
        let attach = ControlRequest::Attach(AttachRequest {
            volume: "db".into(),
            mode: OpenMode::Exclusive,
            socket: None,
            tcp: None,
            locks: Vec::new(),
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
