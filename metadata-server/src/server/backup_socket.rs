//! The backup pseudo-device on a local unix socket (`backup_socket` in
//! mds.toml): plain NBD with every snapshot as export `VOLUME@SNAPSHOT`,
//! for backup tools on the server's own host (`qemu-img`, `nbdcopy`, fio,
//! or `sanvol-backup --source nbd+unix:///?socket=PATH`).
//!
//! Why: a backup host elsewhere reads snapshots over an authenticated,
//! protected backup channel (`sanvol-backup serve` bridges one to a local
//! NBD socket for ordinary NBD clients) — two user-space hops and a cipher
//! pass on each side of the channel. A tool on the server's host needs
//! neither: this socket serves the same exports (the same
//! [`SnapshotDevice`](super::backup_export::SnapshotDevice)s, with the same
//! check against agents' overwrites) in one hop, as an agent serves a live
//! volume — and, like an agent, passes large reads on in pipes from the
//! devices' sockets ([`SnapshotDevice::read_payload`](super::backup_export::SnapshotDevice)).
//!
//! Who may read: whoever may open the socket. It is created mode 0600
//! (the user running sanvol-mds only), like the agent's control socket; no
//! key is asked, and every snapshot of the pool is served. Only the active
//! server serves it: the socket is bound when a term as the active server
//! starts and removed when it ends, so on a standby the path does not
//! exist — a standby's metadata lags the active server's, and the
//! pseudo-device's check needs the committed metadata.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::session::SessionContext;
use super::{backup_export, data_channel, stopped};

/// Serves the socket at `path` until `stop`, then removes it.
pub async fn serve(path: PathBuf, ctx: Arc<SessionContext>, mut stop: watch::Receiver<bool>) {
    let (listener, bound) = match bind(&path) {
        Ok(l) => l,
        Err(e) => return error!(socket = %path.display(), "cannot serve snapshots on the backup socket: {e}"),
    };
    info!(socket = %path.display(), "serving snapshots on the local backup socket");
    let mut readers = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = readers.join_next(), if !readers.is_empty() => continue,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("accepting a backup socket connection failed: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let Some(slot) = data_channel::channel_slot() else {
            warn!(max = data_channel::DATA_CHANNELS_MAX, "too many data channels; closing a backup socket connection");
            continue;
        };
        let who = match stream.peer_cred() {
            Ok(c) => format!("backup socket (uid {})", c.uid()),
            Err(_) => "backup socket".to_string(),
        };
        let (ctx, mut stop) = (ctx.clone(), stop.clone());
        readers.spawn(async move {
            let _slot = slot;
            // The committed metadata is published while this reader reads it.
            let _reader = ctx.read_meta().await;
            tokio::select! {
                _ = backup_export::serve_unix(stream, ctx.meta.clone(), &who) => {}
                _ = stopped(&mut stop) => {}
            }
        });
    }
    readers.shutdown().await;
    drop(listener);
    // Only the socket this term bound: a server that stood still past its
    // lease (paused) must not remove the one its successor bound there.
    if std::fs::symlink_metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == bound) {
        let _ = std::fs::remove_file(&path);
    }
}

/// Binds `path` (mode 0600; its directory is created if missing),
/// replacing a stale socket a server that did not clean up left there;
/// refuses a path another process serves, or that is not a socket
/// ([`blockio::socket::clear_stale_unix_socket`]). Returns the listener
/// and the socket file's (device, inode).
fn bind(path: &Path) -> std::io::Result<(UnixListener, (u64, u64))> {
    blockio::socket::clear_stale_unix_socket(path).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let meta = std::fs::symlink_metadata(path)?;
    Ok((listener, (meta.dev(), meta.ino())))
}
