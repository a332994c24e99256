//! Where snapshots are read from: the metadata server's backup
//! pseudo-device (over an authenticated backup channel), or any NBD server
//! that exports `VOLUME@SNAPSHOT` names (`--source URI`, e.g. a
//! `sanvol-backup serve` bridge, or a test server).

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::{NbdUri, Transport};
use blockio::{BlockDevice, MetaContext, StatusExtent};
use bytes::Bytes;
use control_client::handshake::HandshakeError;
use control_client::{channel, ControlAddr, ControlClient, ControlClientError};
use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::io::{AsyncRead, AsyncWrite};
use volume_format::control::auth::{AuthFailure, Role};
use volume_format::control::messages::{snapshot_export_name, Request, Response, SnapshotInfo};

/// Bound on one NBD request to the source or the target.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// `VOLUME@SNAPSHOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub volume: String,
    pub snapshot: String,
}

impl SnapshotRef {
    /// The export name on the backup pseudo-device.
    pub fn export(&self) -> String {
        snapshot_export_name(&self.volume, &self.snapshot)
    }
}

impl std::fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.export())
    }
}

impl FromStr for SnapshotRef {
    type Err = String;
    fn from_str(s: &str) -> Result<SnapshotRef, String> {
        match s.split_once('@') {
            Some((v, snap)) if !v.is_empty() && !snap.is_empty() && !snap.contains('@') => {
                Ok(SnapshotRef { volume: v.to_string(), snapshot: snap.to_string() })
            }
            _ => Err(format!("{s:?} is not VOLUME@SNAPSHOT (e.g. db@nightly-1); `sanvol-backup snapshots` lists them")),
        }
    }
}

/// How to reach the metadata server.
pub struct MdsConn {
    pub addr: ControlAddr,
    pub key: SigningKey,
    pub pinned: VerifyingKey,
    /// The role to ask for; `None`: backup, then admin if the key is
    /// registered as an admin.
    pub role: Option<Role>,
    /// Client name shown in the server's logs.
    pub name: String,
    /// The role that worked (so later connections do not retry).
    chosen: Mutex<Option<Role>>,
}

impl MdsConn {
    pub fn new(addr: ControlAddr, key: SigningKey, pinned: VerifyingKey, role: Option<Role>) -> MdsConn {
        MdsConn { addr, key, pinned, role, name: format!("sanvol-backup@{}", host_name()), chosen: Mutex::new(None) }
    }

    fn roles(&self) -> Vec<Role> {
        if let Some(r) = self.role.or(*self.chosen.lock().unwrap_or_else(|e| e.into_inner())) {
            return vec![r];
        }
        vec![Role::Backup, Role::Admin]
    }

    fn chose(&self, role: Role) {
        *self.chosen.lock().unwrap_or_else(|e| e.into_inner()) = Some(role);
    }

    /// A backup channel, positioned for the NBD handshake.
    pub async fn backup_channel(&self) -> Result<Box<dyn control_client::ControlStream>> {
        let roles = self.roles();
        let mut last = String::new();
        for (i, role) in roles.iter().enumerate() {
            match channel::open_backup(&self.addr, &self.key, Some(&self.pinned), *role, &self.name).await {
                Ok(s) => {
                    self.chose(*role);
                    return Ok(s);
                }
                Err(e) if i + 1 < roles.len() && e.is_wrong_role() => {
                    tracing::info!(role = %role, "key not registered for this role; retrying as the next one: {e}");
                    last = e.to_string();
                }
                Err(e) => return Err(anyhow!(e)).context(access_hint(role)),
            }
        }
        Err(anyhow!(last))
    }

    /// An authenticated control connection.
    pub async fn control(&self) -> Result<ControlClient> {
        let roles = self.roles();
        let mut last = None;
        for (i, role) in roles.iter().enumerate() {
            let instance = *uuid::Uuid::new_v4().as_bytes();
            match ControlClient::connect(&self.addr, &self.key, Some(&self.pinned), *role, &self.name, instance).await {
                Ok((client, _events)) => {
                    self.chose(*role);
                    return Ok(client);
                }
                Err(ControlClientError::Handshake {
                    source: HandshakeError::Refused { failure: AuthFailure::WrongRole, .. },
                    ..
                }) if i + 1 < roles.len() => {
                    tracing::info!(role = %role, "key not registered for this role; retrying as the next one");
                    last = Some(role);
                }
                Err(e) => return Err(anyhow!(e)).context(access_hint(role)),
            }
        }
        bail!("the metadata server refused the key for every role ({last:?})")
    }
}

fn access_hint(role: &Role) -> String {
    format!(
        "cannot reach the backup pseudo-device as {role}: check --mds, --key and --server-key; the key must be \
         authorized with `sanvol client add KEY.pub --role backup` (or admin)"
    )
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// Where snapshots come from.
pub enum Source {
    Mds(Box<MdsConn>),
    /// An NBD server exporting `VOLUME@SNAPSHOT` names.
    Uri(NbdUri),
}

impl Source {
    /// Human description for messages.
    pub fn describe(&self) -> String {
        match self {
            Source::Mds(m) => format!("the metadata server at {}", m.addr),
            Source::Uri(u) => format!("{u}"),
        }
    }

    /// Opens `export` with these metadata contexts over up to `connections`
    /// NBD connections.
    pub async fn open(&self, export: &str, contexts: &[String], connections: usize) -> Result<SnapshotReader> {
        let connections = connections.clamp(1, blockio::client::CONNECTIONS_MAX);
        let opts = ClientOptions {
            connections,
            request_timeout: Some(REQUEST_TIMEOUT),
            meta_contexts: contexts.to_vec(),
            ..ClientOptions::default()
        };
        let clients = match self {
            Source::Uri(uri) => {
                let uri = uri.with_export(export);
                vec![NbdClient::connect(&uri, opts)
                    .await
                    .with_context(|| format!("opening snapshot {export} at {uri}"))?]
            }
            Source::Mds(m) => {
                let mut clients = Vec::new();
                for i in 0..connections {
                    let stream = match m.backup_channel().await {
                        Ok(s) => s,
                        Err(e) if i > 0 => {
                            tracing::warn!("could not open backup channel {}: {e:#}; continuing with {i}", i + 1);
                            break;
                        }
                        Err(e) => return Err(e),
                    };
                    let c = NbdClient::connect_stream(stream, export, ClientOptions { connections: 1, ..opts.clone() })
                        .await
                        .with_context(|| format!("opening snapshot {export} on {}", self.describe()))?;
                    clients.push(c);
                }
                clients
            }
        };
        let size = clients[0].size();
        if let Some(odd) = clients.iter().find(|c| c.size() != size) {
            bail!("snapshot {export}: two connections report different sizes ({size} and {})", odd.size());
        }
        Ok(SnapshotReader { export: export.to_string(), clients, next: AtomicUsize::new(0) })
    }

    /// A raw byte stream to an NBD server that exports the snapshots (for
    /// `serve`): a backup channel, or a plain connection to `--source`.
    pub async fn raw_stream(&self) -> Result<Box<dyn RawStream>> {
        match self {
            Source::Mds(m) => Ok(Box::new(m.backup_channel().await?)),
            Source::Uri(uri) => match &uri.transport {
                Transport::Unix { socket } => Ok(Box::new(
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .with_context(|| format!("connecting to {}", socket.display()))?,
                )),
                Transport::Tcp { host, .. } => {
                    let port = uri.port().unwrap_or(blockio::uri::DEFAULT_PORT);
                    let s = tokio::net::TcpStream::connect((host.as_str(), port))
                        .await
                        .with_context(|| format!("connecting to {host}:{port}"))?;
                    s.set_nodelay(true)?;
                    Ok(Box::new(s))
                }
            },
        }
    }

    /// Snapshots on the server (of `volume`, or all). With a `--source`
    /// URI, only names are known (from the export list).
    pub async fn snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        match self {
            Source::Mds(m) => {
                let client = m.control().await?;
                let reply = client
                    .request(Request::SnapshotList { volume: volume.map(str::to_string) })
                    .await
                    .context("listing snapshots")?;
                match reply {
                    Response::Snapshots(list) => Ok(list),
                    other => bail!("the metadata server answered SnapshotList with {other:?}"),
                }
            }
            Source::Uri(uri) => {
                let exports = NbdClient::list_exports(uri, Duration::from_secs(30))
                    .await
                    .with_context(|| format!("listing the exports of {uri}"))?;
                Ok(exports
                    .into_iter()
                    .filter_map(|(name, _)| {
                        let r: SnapshotRef = name.parse().ok()?;
                        if volume.is_some_and(|v| v != r.volume) {
                            return None;
                        }
                        Some(SnapshotInfo {
                            export: name,
                            volume: r.volume,
                            name: r.snapshot,
                            id: volume_format::SnapshotId(0),
                            created_at_unix_secs: 0,
                            created_generation: 0,
                            size_bytes: 0,
                            chunk_bytes: 0,
                            cow_chunks: 0,
                            reserved_bytes: 0,
                            newest: false,
                        })
                    })
                    .collect())
            }
        }
    }
}

/// A byte stream `serve` can splice.
pub trait RawStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RawStream for T {}

/// One snapshot opened for reading, over one or more connections.
pub struct SnapshotReader {
    pub export: String,
    clients: Vec<NbdClient>,
    next: AtomicUsize,
}

impl SnapshotReader {
    pub fn size(&self) -> u64 {
        self.clients[0].size()
    }

    /// Contexts the server agreed to.
    pub fn has_context(&self, name: &str) -> bool {
        NbdClient::meta_contexts(&self.clients[0]).iter().any(|c| c == name)
    }

    pub fn connection_count(&self) -> usize {
        self.clients.iter().map(|c| c.connection_count()).sum()
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i]
            .read(offset, len)
            .await
            .with_context(|| format!("reading {len} bytes at offset {offset} of snapshot {}", self.export))
    }

    pub async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>> {
        self.clients[0].block_status(context, offset, len).await.with_context(|| {
            format!("block status ({}) at offset {offset} of snapshot {}", context.name(), self.export)
        })
    }

    pub async fn close(&self) {
        futures::future::join_all(self.clients.iter().map(|c| c.disconnect())).await;
    }
}

/// Parses `--mds/--key/--server-key/--role` into a connection.
pub fn mds_conn(mds: &str, key: &Path, server_key: &str, role: Option<Role>) -> Result<MdsConn> {
    let addr: ControlAddr = mds.parse().map_err(|e: String| anyhow!(e)).context("parsing --mds")?;
    let key = control_client::keys::load_private(key).context("loading --key")?;
    let (pinned, _) = control_client::keys::parse_public(server_key).context("reading --server-key")?;
    Ok(MdsConn::new(addr, key, pinned, role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_refs_parse() {
        let r: SnapshotRef = "db@nightly-1".parse().unwrap();
        assert_eq!((r.volume.as_str(), r.snapshot.as_str(), r.export()), ("db", "nightly-1", "db@nightly-1".into()));
        for bad in ["db", "@s", "db@", "a@b@c", ""] {
            assert!(bad.parse::<SnapshotRef>().is_err(), "{bad}");
        }
    }
}
