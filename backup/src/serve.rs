//! `serve`: a local NBD bridge to the snapshots. Every connection accepted
//! on a unix socket gets its own backup channel to the metadata server (or
//! a plain connection to `--source`), and bytes are copied both ways, so
//! standard NBD tools (nbdinfo, nbdcopy, qemu-img) read snapshots and their
//! changed-block lists without knowing about sanvol keys.
//!
//! The socket is created mode 0600: whoever can connect reads every
//! snapshot with the authority of the key `serve` runs with.
//!
//! With `--metrics-addr`, each connection's bytes pass through an NBD tap
//! on their way ([`crate::serve_metrics`]): reads, bytes and latency per
//! export, without terminating the protocol.

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

use crate::source::Source;

/// What `serve` prints on stdout once it accepts connections.
pub fn ready_line(socket: &Path) -> String {
    format!("serving snapshots on {}", socket.display())
}

/// Removes the socket file when serving ends.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Refuses a path that is in use or is not a socket; removes a stale socket.
fn prepare_path(socket: &Path) -> Result<()> {
    use blockio::socket::SocketPathError;
    match blockio::socket::clear_stale_unix_socket(socket) {
        Ok(()) => Ok(()),
        Err(SocketPathError::InUse) => bail!(
            "{} is in use: another process is serving on it (stop it, or pick another --socket)",
            socket.display()
        ),
        Err(SocketPathError::NotASocket) => {
            bail!("{} exists and is not a socket; refusing to replace it (pick another --socket)", socket.display())
        }
        Err(SocketPathError::Io(e)) => {
            Err(e).with_context(|| format!("clearing the stale socket {}", socket.display()))
        }
    }
}

/// Serves on `socket` until `shutdown` completes; prints [`ready_line`] on
/// stdout once listening and removes the socket when done. `metered`:
/// count every connection in [`crate::serve_metrics`].
pub async fn serve(
    source: Arc<Source>,
    socket: &Path,
    metered: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    prepare_path(socket)?;
    let listener = UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    let _guard = SocketGuard(socket.to_path_buf());
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", socket.display()))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", ready_line(socket))?;
        out.flush()?;
    }
    tracing::info!(socket = %socket.display(), source = %source.describe(), "serving snapshots");
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((local, _)) => {
                    // Replies to the local reader leave in one write each.
                    blockio::socket::tune_unix(&local);
                    let source = source.clone();
                    conns.spawn(bridge(local, source, metered));
                }
                Err(e) => {
                    tracing::warn!("accepting a connection on {} failed: {e}", socket.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    conns.abort_all();
    eprintln!("stopped serving snapshots on {}", socket.display());
    Ok(())
}

async fn bridge(mut local: UnixStream, source: Arc<Source>, metered: bool) {
    if metered {
        crate::serve_metrics::accepted();
    }
    let mut upstream = match source.raw_stream().await {
        Ok(s) => s,
        Err(e) => {
            if metered {
                crate::serve_metrics::connect_failed();
            }
            tracing::warn!("a local client connected, but the snapshots cannot be reached: {e:#}");
            return;
        }
    };
    if metered {
        match tapped_copy(local, upstream).await {
            Ok(()) => tracing::debug!("bridged connection closed"),
            Err(e) => tracing::debug!("bridged connection ended: {e}"),
        }
        return;
    }
    // Buffers of a whole large read (the default 8 KiB meant 128 reads and
    // writes per 1 MiB reply on each side of the bridge).
    match tokio::io::copy_bidirectional_with_sizes(&mut local, &mut upstream, BRIDGE_BUFFER_BYTES, BRIDGE_BUFFER_BYTES)
        .await
    {
        Ok((up, down)) => tracing::debug!(up, down, "bridged connection closed"),
        Err(e) => tracing::debug!("bridged connection ended: {e}"),
    }
}

/// Bytes copied per read from either side of a metered connection.
const TAP_BUFFER_BYTES: usize = 256 * 1024;
/// Bytes copied per read from either side of a connection that is not metered.
const BRIDGE_BUFFER_BYTES: usize = 1024 * 1024;

/// Copies both ways like `copy_bidirectional` (an end's EOF shuts down the
/// other side's writing half), showing every chunk to the connection's tap
/// before forwarding it.
async fn tapped_copy(local: UnixStream, upstream: Box<dyn crate::source::RawStream>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let session = std::sync::Mutex::new(crate::serve_metrics::Session::new());
    let (mut local_read, mut local_write) = tokio::io::split(local);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_server = async {
        let mut buf = vec![0u8; TAP_BUFFER_BYTES];
        loop {
            let n = local_read.read(&mut buf).await?;
            if n == 0 {
                return up_write.shutdown().await;
            }
            session.lock().expect("tap").from_client(&buf[..n]);
            up_write.write_all(&buf[..n]).await?;
        }
    };
    let to_client = async {
        let mut buf = vec![0u8; TAP_BUFFER_BYTES];
        loop {
            let n = up_read.read(&mut buf).await?;
            if n == 0 {
                return local_write.shutdown().await;
            }
            session.lock().expect("tap").from_server(&buf[..n]);
            local_write.write_all(&buf[..n]).await?;
        }
    };
    tokio::try_join!(to_server, to_client).map(|_| ())
}
