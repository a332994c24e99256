//! Serving an attached volume to local users: an NBD export on a unix socket
//! (or TCP on loopback), and the seam for the kernel's `/dev/nbdX`.
//!
//! Why the export is its own server per volume rather than one server with
//! many exports: each volume gets its own socket path that scripts can find
//! (`EXPORT_DIR/VOLUME.sock`), the volume is also the *default* export (so
//! `nbd+unix:///?socket=...` works for tools that do not pass a name), and
//! stopping one export never disturbs another.
//!
//! Kernel attach (a later issue) needs connected sockets whose far end the
//! agent serves: [`socket_for_kernel`] is that seam — the kernel side does the
//! NBD handshake on the returned socket and then hands it to the driver over
//! netlink.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockio::server::{Export, ExportTable, NbdServer, ServerConfig};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use tokio::sync::oneshot;
use tracing::Instrument;

/// Where to serve a volume. Serializable: it is part of what the agent must
/// remember to re-export a volume ([`crate::core::HeldHandle`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExportTarget {
    Unix(PathBuf),
    /// Loopback only, unless TLS with client certificates is configured
    /// ([`EXPORT_TLS_ENV`]): otherwise the export has no authentication.
    Tcp(SocketAddr),
}

/// Environment variable naming a certificates directory (nbdkit layout:
/// `server-cert.pem`, `server-key.pem`, optionally `ca-cert.pem`): when
/// set, TCP exports require TLS; with `ca-cert.pem` they also require a
/// client certificate signed by it, and may then listen beyond loopback.
pub const EXPORT_TLS_ENV: &str = "SANVOL_EXPORT_TLS_DIR";

/// TLS for TCP exports.
#[derive(Debug, Clone)]
pub struct ExportTls {
    pub dir: PathBuf,
    pub server: blockio::server::ServerTls,
    /// Clients must present a certificate signed by the directory's CA.
    pub verifies_clients: bool,
}

impl ExportTls {
    /// Loads the certificates in `dir` (TLS required).
    pub fn from_dir(dir: &Path) -> Result<ExportTls, ExportError> {
        let verifies_clients = dir.join(blockio::tls::CA_CERT_FILE).exists();
        let config = blockio::tls::server_from_dir(dir, verifies_clients)
            .map_err(|e| ExportError::Tls(format!("{EXPORT_TLS_ENV}={}: {e}", dir.display())))?;
        Ok(ExportTls {
            dir: dir.to_path_buf(),
            server: blockio::server::ServerTls { config, required: true },
            verifies_clients,
        })
    }

    /// What [`EXPORT_TLS_ENV`] configures, if it is set.
    pub fn from_env() -> Result<Option<ExportTls>, ExportError> {
        match std::env::var_os(EXPORT_TLS_ENV) {
            Some(dir) if !dir.is_empty() => ExportTls::from_dir(Path::new(&dir)).map(Some),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("refusing to serve on {0}: exports have no authentication, so TCP is allowed on loopback only (or set SANVOL_EXPORT_TLS_DIR to a certificates directory with a ca-cert.pem: TLS with client certificates)")]
    NotLoopback(SocketAddr),
    #[error("export TLS: {0}")]
    Tls(String),
    #[error("{path} is in use by another process (something is listening on it); choose another --socket")]
    SocketInUse { path: PathBuf },
    #[error("cannot serve on {what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// A running export. Stop it with [`ExportHandle::stop`].
pub struct ExportHandle {
    uri: String,
    socket_path: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for ExportHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl ExportHandle {
    /// The NBD URI clients use (`nbd+unix:///NAME?socket=PATH` or `nbd://127.0.0.1:PORT/NAME`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Stops accepting, lets connected clients finish their in-flight
    /// requests, and removes the socket file.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn server_for(name: &str, description: String, device: Arc<dyn BlockDevice>) -> NbdServer {
    server_with(name, description, device, ServerConfig::default())
}

fn server_with(name: &str, description: String, device: Arc<dyn BlockDevice>, config: ServerConfig) -> NbdServer {
    let table = ExportTable::new();
    let read_only = device.is_read_only();
    table.insert(Export { name: name.to_string(), description, device, read_only });
    table.set_default(Some(name.to_string()));
    NbdServer::new(Arc::new(table), config)
}

/// Removes a stale socket file left by a crashed agent; refuses if something
/// still listens on it.
async fn clear_stale_socket(path: &Path) -> Result<(), ExportError> {
    if !path.exists() {
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(ExportError::SocketInUse { path: path.to_path_buf() });
    }
    std::fs::remove_file(path).map_err(|source| ExportError::Io { what: path.display().to_string(), source })
}

/// Binds a unix socket only the owner (and group) can use.
pub(crate) async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ExportError> {
    let io = |source| ExportError::Io { what: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    clear_stale_socket(path).await?;
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    Ok(listener)
}

/// Serves `device` as export `name` (also the default export) on `target`;
/// TCP exports require TLS when [`EXPORT_TLS_ENV`] is set.
pub async fn serve_volume(
    name: &str,
    description: String,
    device: Arc<dyn BlockDevice>,
    target: &ExportTarget,
) -> Result<ExportHandle, ExportError> {
    let tls = match target {
        ExportTarget::Tcp(_) => ExportTls::from_env()?,
        ExportTarget::Unix(_) => None,
    };
    serve_volume_with(name, description, device, target, tls.as_ref()).await
}

/// Like [`serve_volume`], with the TLS setup of TCP exports given.
pub async fn serve_volume_with(
    name: &str,
    description: String,
    device: Arc<dyn BlockDevice>,
    target: &ExportTarget,
    tls: Option<&ExportTls>,
) -> Result<ExportHandle, ExportError> {
    let tcp_tls = match target {
        ExportTarget::Tcp(_) => tls,
        ExportTarget::Unix(_) => None,
    };
    let config = ServerConfig { tls: tcp_tls.map(|t| t.server.clone()), ..ServerConfig::default() };
    let server = server_with(name, description, device, config);
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let span = tracing::info_span!("export", volume = name);
    match target {
        ExportTarget::Unix(path) => {
            let listener = bind_unix(path).await?;
            let uri = NbdUri::unix(path, name).to_string();
            let task = tokio::spawn(
                async move {
                    if let Err(e) = server.serve_unix(listener, shutdown).await {
                        tracing::error!(error = %e, "export stopped");
                    }
                }
                .instrument(span),
            );
            Ok(ExportHandle { uri, socket_path: Some(path.clone()), stop: Some(stop), task: Some(task) })
        }
        ExportTarget::Tcp(addr) => {
            if !addr.ip().is_loopback() && !tcp_tls.is_some_and(|t| t.verifies_clients) {
                return Err(ExportError::NotLoopback(*addr));
            }
            let io = |source| ExportError::Io { what: addr.to_string(), source };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(io)?;
            let local = listener.local_addr().map_err(io)?;
            let mut uri = NbdUri::tcp(local.ip().to_string(), local.port(), name);
            if let Some(t) = tcp_tls {
                uri.tls_required = true;
                uri.tls.tls_certificates = Some(t.dir.clone());
            }
            let uri = uri.to_string();
            let task = tokio::spawn(
                async move {
                    if let Err(e) = server.serve_tcp(listener, shutdown).await {
                        tracing::error!(error = %e, "export stopped");
                    }
                }
                .instrument(span),
            );
            Ok(ExportHandle { uri, socket_path: None, stop: Some(stop), task: Some(task) })
        }
    }
}

/// The kernel-attach seam: a connected unix socket whose far end serves
/// `device` as export `name` (handshake not yet done). The serving task ends
/// when the socket is closed.
///
/// Served as a unix socket, not as a plain byte stream, so that the kernel's
/// `/dev/nbdX` gets what a socket export gets: large read payloads spliced
/// from the device's socket ([`blockio::splice`]) and the agent's polling
/// before it parks ([`blockio::park_poll`]) at queue depth 1.
pub fn socket_for_kernel(name: &str, device: Arc<dyn BlockDevice>) -> std::io::Result<std::os::unix::net::UnixStream> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    let server = server_for(name, format!("sanvol volume {name}"), device);
    let span = tracing::info_span!("kernel-export", volume = name);
    tokio::spawn(
        async move {
            if let Err(e) = server.serve_unix_stream(ours, "kernel".to_string()).await {
                tracing::warn!(error = %e, "kernel NBD connection ended");
            }
        }
        .instrument(span),
    );
    Ok(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, pattern, EXTENT};
    use blockio::client::{ClientOptions, NbdClient};

    #[tokio::test]
    async fn a_volume_served_on_a_unix_socket_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, devs) = testing::volume(4, 2, 3, false);
        let path = dir.path().join("vol.sock");
        let export = serve_volume("vol", "test".into(), vol.clone(), &ExportTarget::Unix(path.clone())).await.unwrap();
        assert!(export.uri().starts_with("nbd+unix:///vol?socket="), "{}", export.uri());

        // Through the default export name too.
        let default_uri = NbdUri::unix(&path, "");
        let client = NbdClient::connect(&default_uri, ClientOptions::default()).await.unwrap();
        assert_eq!(client.size(), 4 * EXTENT);
        let data = pattern(1, (EXTENT + 4096) as usize);
        client.write(EXTENT / 2, data.clone(), false).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(client.read(EXTENT / 2, data.len() as u32).await.unwrap(), data);
        assert!(devs.iter().all(|d| d.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1));
        client.disconnect().await;

        export.stop().await;
        assert!(!path.exists(), "the socket file is removed");
    }

    #[tokio::test]
    async fn read_only_volume_export_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, _devs) = testing::volume(1, 1, 1, true);
        let path = dir.path().join("ro.sock");
        let _export = serve_volume("ro", String::new(), vol, &ExportTarget::Unix(path.clone())).await.unwrap();
        let client = NbdClient::connect(&NbdUri::unix(&path, "ro"), ClientOptions::default()).await.unwrap();
        let e = client.write(0, pattern(0, 512), false).await.unwrap_err();
        assert_eq!(e.kind, blockio::IoErrorKind::PermissionDenied, "{e}");
    }

    /// With TLS configured, a TCP export requires it; with client
    /// certificates it may listen beyond loopback (here: any address).
    #[tokio::test]
    async fn tcp_exports_can_require_tls_and_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        if blockio::tls::make_test_certificates(dir.path(), &["localhost", "127.0.0.1"]).is_err() {
            panic!("openssl is needed to make test certificates: run scripts/install-deps.sh");
        }
        let tls = ExportTls::from_dir(dir.path()).unwrap();
        assert!(tls.verifies_clients, "the directory has a ca-cert.pem");
        let (vol, _devs) = testing::volume(1, 1, 1, false);
        let any = ExportTarget::Tcp("0.0.0.0:0".parse().unwrap());
        let export = serve_volume_with("v", String::new(), vol, &any, Some(&tls)).await.unwrap();
        let mut uri: NbdUri = export.uri().parse().unwrap();
        assert!(uri.tls_required && export.uri().starts_with("nbds://"), "{}", export.uri());
        let port = uri.port().unwrap();
        uri.transport = blockio::uri::Transport::Tcp { host: "127.0.0.1".into(), port: Some(port) };
        let client = NbdClient::connect(&uri, ClientOptions::default()).await.expect("TLS with a client certificate");
        client.write(0, pattern(3, 4096), false).await.unwrap();
        assert_eq!(client.read(0, 4096).await.unwrap(), pattern(3, 4096));
        client.disconnect().await;
        let plain = NbdUri::tcp("127.0.0.1", port, "v");
        assert!(NbdClient::connect(&plain, ClientOptions::default()).await.is_err(), "plain NBD is refused");
        export.stop().await;
    }

    #[tokio::test]
    async fn tcp_exports_are_loopback_only() {
        let (vol, _devs) = testing::volume(1, 1, 1, false);
        let e = serve_volume("v", String::new(), vol.clone(), &ExportTarget::Tcp("0.0.0.0:0".parse().unwrap())).await;
        assert!(matches!(e, Err(ExportError::NotLoopback(_))));
        let export =
            serve_volume("v", String::new(), vol, &ExportTarget::Tcp("127.0.0.1:0".parse().unwrap())).await.unwrap();
        let uri: NbdUri = export.uri().parse().unwrap();
        let client = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
        assert_eq!(client.read(0, 512).await.unwrap().len(), 512);
    }

    #[tokio::test]
    async fn a_socket_in_use_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, _devs) = testing::volume(1, 1, 1, false);
        let path = dir.path().join("v.sock");
        let _first = serve_volume("v", String::new(), vol.clone(), &ExportTarget::Unix(path.clone())).await.unwrap();
        let second = serve_volume("v", String::new(), vol, &ExportTarget::Unix(path)).await;
        assert!(matches!(second, Err(ExportError::SocketInUse { .. })));
    }

    #[tokio::test]
    async fn kernel_seam_socket_speaks_nbd() {
        let (vol, _devs) = testing::volume(8, 1, 2, false);
        let sock = socket_for_kernel("v", vol).unwrap();
        sock.set_nonblocking(true).unwrap();
        let stream = tokio::net::UnixStream::from_std(sock).unwrap();
        let client = NbdClient::connect_stream(stream, "v", ClientOptions::default()).await.unwrap();
        assert_eq!(client.size(), 8 * EXTENT);
        // Large requests, which a socket export may splice, come back whole,
        // across extents too.
        let data = pattern(7, (5 * EXTENT) as usize);
        client.write(EXTENT / 4, data.clone(), false).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(client.read(EXTENT / 4, data.len() as u32).await.unwrap(), data);
    }
}
