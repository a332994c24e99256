//! The control server: listeners, sessions and the one task that owns the
//! pool state.
//!
//! Shape (after Crucible's upstairs and mini-redis): one **owner** holds the
//! pool metadata, the handle table and the session list. Its state and rules
//! are [`core::Core`], a plain state machine (inputs in, effects out, no
//! I/O, no clock reads); its loop ([`owner`]) selects the next input and
//! applies it, and performs the effects. Session tasks ([`session`]) are
//! thin: they authenticate the peer, forward each request with a oneshot
//! for its reply, and write replies and events back. Why: handles, leases,
//! recalls and commits interact in many edge cases, and with a single owner
//! every one of them is a plain sequential step instead of a lock-ordering
//! puzzle. The owner never waits for an agent, a device or a copy: a grow
//! that needs agents to drain keeps the admin's reply in its state; commits
//! and device checks run on the device task ([`device_task`]); copies and
//! merges are jobs ([`jobs`]) — each posts its result back as an input.
//!
//! - [`admission`]: what connections may hold before they authenticate
//!   (deadline, per-peer and total caps, room kept for known keys).
//! - [`core`]: the owner's state, inputs and effects; the change queue.
//! - [`owner`]: the owner loop (the shell around the core).
//! - [`device_task`]: the pool's own device connections: commits, checks.
//! - [`jobs`]: long jobs (pre-image copies, merges, device checks).
//! - [`requests`]: what each request does to the state (prepare, finish).
//! - [`listings`]: read-only answers (pool, devices, clients, volumes).
//! - [`durable`]: resumes, duplicate handles, handovers and the grace period.
//! - [`session`]: one control connection.
//! - [`grants`]: closing connections whose key, role, scope or handle no
//!   longer allows them (revocation that bites at once).
//! - [`data_channel`]: the agents' fallback data path through the server
//!   (connections that start with the data-channel preamble), device-failure
//!   reports and fallback listings.
//! - [`snapshots`]: snapshot create/delete/list and copy-on-write
//!   registrations; [`snapshot_io`]: the chunk I/O the server does for them.
//! - [`backup_export`]: the backup pseudo-device (snapshots as read-only NBD
//!   exports with a changed-block metadata context).

pub mod admission;
pub mod backup_export;
pub mod commit;
pub mod core;
pub mod data_channel;
pub mod device_task;
pub mod durable;
pub mod grants;
pub mod jobs;
pub mod listings;
pub mod owner;
pub mod requests;
pub mod session;
pub mod snapshot_io;
pub mod snapshots;

#[cfg(test)]
mod core_tests;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::Config;
use crate::pool::{Pool, PoolError};
use control_client::ControlAddr;

pub use self::core::ClientTable;

/// Most control sessions at once; more are closed on accept. At most
/// [`admission::PREAUTH_MAX`] of them are unauthenticated, so the rest are
/// always there for clients that prove a key.
pub const SESSIONS_MAX: usize = 1024;
const _: () = assert!(admission::PREAUTH_MAX < SESSIONS_MAX / 2);
/// Commands queued for the owner task before senders wait.
pub const COMMANDS_QUEUED_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("server key: {0}")]
    Key(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(
        "the pool was initialized for server key {pool}, but this server's key ({path}) is {config}; \
         use the key the pool was created with"
    )]
    WrongServerKey { pool: String, config: String, path: PathBuf },
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound, loaded server, not yet serving. Split from [`Server::serve`] so
/// tests (and the binary's logs) learn the bound addresses first.
pub struct Server {
    listeners: Vec<Listener>,
    local_addrs: Vec<ControlAddr>,
    core: core::Core,
    pool: Pool,
    key: Arc<SigningKey>,
    lease_ms: u64,
    channel_mode_min: control_client::ChannelMode,
}

/// Loads the pool, binds every listener and serves until `shutdown`
/// completes, then closes every session and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(&config).await?.serve(shutdown).await
}

impl Server {
    /// Reads the server key, opens the pool (newest valid metadata) and
    /// binds the listeners.
    pub async fn bind(config: &Config) -> Result<Server, ServerError> {
        let key = control_client::keys::load_private(&config.key).map_err(|e| ServerError::Key(format!("{e:#}")))?;
        let key = Arc::new(key);
        let (mut pool, meta) = match Pool::open_journaled(&config.devices, key.clone()).await {
            Ok(opened) => opened,
            Err(PoolError::Invalid(why)) if why.contains("initialized for server key") => {
                return Err(ServerError::WrongServerKey {
                    pool: why,
                    config: hex::encode(key.verifying_key().to_bytes()),
                    path: config.key.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let journal = pool.take_journal().ok_or_else(|| {
            ServerError::Pool(PoolError::Invalid("the pool was opened without its metadata journal".into()))
        })?;
        let journal = commit::MetaJournal::new(journal, pool.metadata_areas());
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for addr in &config.listen {
            let bind_err = |reason: String| ServerError::Bind { addr: addr.to_string(), reason };
            match addr {
                ControlAddr::Tcp(a) => {
                    let l = TcpListener::bind(a).await.map_err(|e| bind_err(e.to_string()))?;
                    let local = l.local_addr().map_err(|e| bind_err(e.to_string()))?;
                    local_addrs.push(ControlAddr::Tcp(local.to_string()));
                    listeners.push(Listener::Tcp(l));
                }
                ControlAddr::Unix(path) => {
                    if path.exists() {
                        if tokio::net::UnixStream::connect(path).await.is_ok() {
                            return Err(bind_err("another server is listening there".into()));
                        }
                        // A stale socket from a server that did not clean up.
                        let _ = std::fs::remove_file(path);
                    }
                    let l = UnixListener::bind(path).map_err(|e| bind_err(e.to_string()))?;
                    local_addrs.push(addr.clone());
                    listeners.push(Listener::Unix(l, path.clone()));
                }
            }
        }
        let core = core::Core::new(
            meta,
            journal,
            core::CoreConfig {
                lease_ms: config.lease_ms,
                durable_ms: config.durable_ms,
                grace_ms: config.grace_ms,
                key: key.clone(),
                entropy: Box::new(core::OsEntropy),
            },
        );
        Ok(Server {
            listeners,
            local_addrs,
            core,
            pool,
            key,
            lease_ms: config.lease_ms,
            channel_mode_min: config.channel_mode_min,
        })
    }

    /// The addresses actually bound (TCP port 0 resolved).
    pub fn local_addrs(&self) -> &[ControlAddr] {
        &self.local_addrs
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server { listeners, local_addrs, core, pool, key, lease_ms, channel_mode_min } = self;
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMANDS_QUEUED_MAX);
        let (stop_tx, stop_rx) = watch::channel(false);
        // Backup channels read the committed metadata; until one does, the
        // watch holds a placeholder (see `owner::Shell::publish_meta`).
        let placeholder = Arc::new(volume_format::PoolMetadata::new(
            core.meta.pool_uuid,
            core.meta.pool_name.clone(),
            core.meta.extent_bytes,
            core.meta.server_public_key,
            0,
        ));
        let readers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (meta_tx, meta_rx) = watch::channel(placeholder.clone());
        let (clients_tx, clients_rx) = watch::channel(Arc::new(core::client_table(&core.meta)));
        let published = owner::Published { meta: meta_tx, readers: readers.clone(), placeholder, clients: clients_tx };
        let ctx = Arc::new(session::SessionContext {
            key,
            lease_ms,
            clients: clients_rx,
            meta: meta_rx,
            meta_readers: readers,
            commands: cmd_tx,
            next_session: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(SESSIONS_MAX)),
            channel_mode_min,
            gate: Arc::new(admission::Gate::default()),
        });
        info!(listen = ?local_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(), "sanvol-mds serving");
        let mut accept_loops = JoinSet::new();
        let mut sockets = Vec::new();
        for l in listeners {
            if let Listener::Unix(_, path) = &l {
                sockets.push(path.clone());
            }
            accept_loops.spawn(accept_loop(l, ctx.clone(), stop_rx.clone()));
        }
        drop(ctx);
        owner::run(core, pool, published, cmd_rx, shutdown).await;
        info!("shutting down: closing sessions");
        let _ = stop_tx.send(true);
        while accept_loops.join_next().await.is_some() {}
        for path in sockets {
            let _ = std::fs::remove_file(path);
        }
        info!("sanvol-mds stopped");
        Ok(())
    }
}

async fn accept_loop(listener: Listener, ctx: Arc<session::SessionContext>, mut stop: watch::Receiver<bool>) {
    let mut sessions = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            a = accept(&listener) => a,
        };
        let (stream, peer, peer_id) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!("accepting a control connection failed: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let Ok(slot) = ctx.slots.clone().try_acquire_owned() else {
            warn!(%peer, max = SESSIONS_MAX, "too many control sessions; closing the new connection");
            continue;
        };
        // Unauthenticated until the handshake is done: may close older
        // unauthenticated connections of this peer to make room.
        let preauth = ctx.gate.admit(peer_id);
        let id = ctx.next_session.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        let stop = stop.clone();
        sessions.spawn(async move {
            let _slot = slot;
            data_channel::route(stream, peer, id, ctx, stop, preauth).await;
        });
    }
    while sessions.join_next().await.is_some() {}
}

async fn accept(
    listener: &Listener,
) -> std::io::Result<(Box<dyn control_client::ControlStream>, String, admission::PeerId)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Box::new(s), peer.to_string(), admission::PeerId::Ip(peer.ip())))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            // SO_PEERCRED: the connecting process's uid is the peer.
            let id = s.peer_cred().map_or(admission::PeerId::Unknown, |c| admission::PeerId::Uid(c.uid()));
            Ok((Box::new(s), format!("unix:{}", path.display()), id))
        }
    }
}

/// Resolves once `stop` says true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
