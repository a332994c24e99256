//! `serve`: a local NBD bridge to the snapshots. Every connection accepted
//! on a unix socket gets its own backup channel to the metadata server (or
//! a plain connection to `--source`), and bytes are copied both ways, so
//! standard NBD tools (nbdinfo, nbdcopy, qemu-img) read snapshots and their
//! changed-block lists without knowing about sanvol keys.
//!
//! The socket is created mode 0600: whoever can connect reads every
//! snapshot with the authority of the key `serve` runs with.

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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
    match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking {}", socket.display())),
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                bail!(
                    "{} is in use: another process is serving on it (stop it, or pick another --socket)",
                    socket.display()
                );
            }
            std::fs::remove_file(socket).with_context(|| format!("removing the stale socket {}", socket.display()))
        }
        Ok(_) => {
            bail!("{} exists and is not a socket; refusing to replace it (pick another --socket)", socket.display())
        }
    }
}

/// Serves on `socket` until `shutdown` completes; prints [`ready_line`] on
/// stdout once listening and removes the socket when done.
pub async fn serve(source: Arc<Source>, socket: &Path, shutdown: impl Future<Output = ()>) -> Result<()> {
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
                    let source = source.clone();
                    conns.spawn(bridge(local, source));
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

async fn bridge(mut local: UnixStream, source: Arc<Source>) {
    let mut upstream = match source.raw_stream().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("a local client connected, but the snapshots cannot be reached: {e:#}");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut local, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(up, down, "bridged connection closed"),
        Err(e) => tracing::debug!("bridged connection ended: {e}"),
    }
}
