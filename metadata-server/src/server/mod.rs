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
//! - [`metrics`]: the server's Prometheus metrics.
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
//! - [`cache`]: volumes' write-back cache settings, mirror requests and the
//!   mirror's replay before a cached volume is opened again (the mirror's
//!   file I/O is [`crate::mirror`]).

pub mod admission;
pub mod backup_export;
pub mod backup_socket;
pub mod cache;
pub mod commit;
pub mod core;
pub mod data_channel;
pub mod device_task;
pub mod durable;
pub mod grants;
pub mod intents;
pub mod jobs;
pub mod lease_task;
pub mod listings;
pub mod locks;
pub mod metrics;
pub mod owner;
pub mod precopy;
pub mod reconfig;
pub mod recovery;
pub mod requests;
pub mod session;
pub mod snapshot_io;
pub mod snapshots;
pub mod standby;
pub mod zeroing;

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
    #[error("pool lease: {0}")]
    Lease(String),
    #[error("taking the pool over: {0}")]
    Fence(String),
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound server, not yet serving. Split from [`Server::serve`] so tests
/// (and the binary's logs) learn the bound addresses first.
pub struct Server {
    listeners: Vec<Arc<Listener>>,
    local_addrs: Vec<ControlAddr>,
    config: Config,
    key: Arc<SigningKey>,
    /// The pool's clients as read at start: what a standby authenticates with.
    standby_clients: Arc<ClientTable>,
    pool_meta: (uuid::Uuid, String, u64, volume_format::PublicKey),
    lease: lease_task::LeaseTask,
}

/// Loads the pool, binds every listener and serves until `shutdown`
/// completes, then closes every session and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
    Server::bind(&config).await?.serve(shutdown).await
}

/// How an active term ended.
enum TermEnd {
    Shutdown,
    /// Handed off, or the lease was lost: stand by again.
    NotActive(String),
}

impl Server {
    /// Reads the server key, reads the pool (newest valid metadata, without
    /// writing anything: another server may be active), prepares the disk
    /// lease and binds the listeners.
    pub async fn bind(config: &Config) -> Result<Server, ServerError> {
        let key = control_client::keys::load_private(&config.key).map_err(|e| ServerError::Key(format!("{e:#}")))?;
        let key = Arc::new(key);
        let (pool, meta) = open_pool(config, &key).await?;
        let mut instance = [0u8; 16];
        getrandom::getrandom(&mut instance).map_err(|e| ServerError::Key(format!("no randomness: {e}")))?;
        let holders = crate::pool::metadata_holders(&meta);
        let lease = lease_task::LeaseTask::new(
            &pool,
            &holders,
            &config.availability,
            config.device_request_max_ms,
            instance,
            lease_task::LeaseGuard::new(),
        )
        .await
        .map_err(ServerError::Lease)?;
        // Until it holds the lease, this server writes nothing but lease sectors.
        crate::targets::set_term(crate::targets::ServerTerm::Standby { lease_areas: lease.lease_areas() });
        for d in &pool.devices {
            if let Some(c) = &d.client {
                c.disconnect().await;
            }
        }
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for addr in &config.listen {
            let bind_err = |reason: String| ServerError::Bind { addr: addr.to_string(), reason };
            match addr {
                ControlAddr::Tcp(a) => {
                    let l = TcpListener::bind(a).await.map_err(|e| bind_err(e.to_string()))?;
                    let local = l.local_addr().map_err(|e| bind_err(e.to_string()))?;
                    local_addrs.push(ControlAddr::Tcp(local.to_string()));
                    listeners.push(Arc::new(Listener::Tcp(l)));
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
                    listeners.push(Arc::new(Listener::Unix(l, path.clone())));
                }
            }
        }
        Ok(Server {
            listeners,
            local_addrs,
            config: config.clone(),
            key,
            standby_clients: Arc::new(core::client_table(&meta)),
            pool_meta: (meta.pool_uuid, meta.pool_name.clone(), meta.extent_bytes, meta.server_public_key),
            lease,
        })
    }

    /// The addresses actually bound (TCP port 0 resolved).
    pub fn local_addrs(&self) -> &[ControlAddr] {
        &self.local_addrs
    }

    /// Serves until `shutdown` completes: stands by until this server holds
    /// the pool lease, then serves the pool; if it hands the pool off or
    /// loses the lease, it stands by again.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
        let Server { listeners, local_addrs, config, key, standby_clients, pool_meta, mut lease } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let shutdown_task = tokio::spawn({
            let stop_tx = stop_tx.clone();
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            }
        });
        let shutdown_task = AbortOnDrop(shutdown_task);
        info!(
            listen = ?local_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            name = %config.availability.name,
            host_id = config.availability.host_id,
            "sanvol-mds started; acquiring the pool lease"
        );
        let sockets: Vec<PathBuf> = listeners
            .iter()
            .filter_map(|l| match l.as_ref() {
                Listener::Unix(_, path) => Some(path.clone()),
                Listener::Tcp(_) => None,
            })
            .collect();
        let mut result = Ok(());
        loop {
            // Until the lease is ours, connections wait in the listen queue
            // (a client's first request is answered once this server is
            // active); as soon as another server is seen holding the lease,
            // this one stands by and refuses every request, naming it.
            let acquired = {
                let (done_tx, done_rx) = watch::channel(false);
                let standby = tokio::spawn(standby_when_seen(
                    listeners.clone(),
                    key.clone(),
                    config.clone(),
                    lease.owner_seen.subscribe(),
                    standby_clients.clone(),
                    done_rx,
                ));
                let acquired = lease.acquire(stop_rx.clone()).await;
                let _ = done_tx.send(true);
                let _ = standby.await;
                acquired
            };
            if !acquired {
                break;
            }
            info!("this server holds the pool lease: loading the metadata and serving");
            let (returned, term) = active_term(&listeners, &config, &key, lease, &pool_meta, stop_rx.clone()).await;
            lease = returned;
            // Connections made from now on (a task of the ended term that
            // reconnects) may write lease sectors only.
            crate::targets::set_term(crate::targets::ServerTerm::Standby { lease_areas: lease.lease_areas() });
            match term {
                Ok(TermEnd::Shutdown) => break,
                Ok(TermEnd::NotActive(why)) => {
                    warn!("{why}; standing by");
                    lease.stand_by();
                }
                Err(e) => {
                    lease.stand_by();
                    if *stop_rx.borrow() {
                        break;
                    }
                    tracing::error!("serving the pool failed: {e}; standing by");
                    result = Err(e);
                    if matches!(result, Err(ServerError::WrongServerKey { .. })) {
                        break;
                    }
                    result = Ok(());
                }
            }
        }
        drop(shutdown_task);
        for path in sockets {
            let _ = std::fs::remove_file(path);
        }
        info!("sanvol-mds stopped");
        result
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens the pool with its metadata journal (reads only).
async fn open_pool(config: &Config, key: &Arc<SigningKey>) -> Result<(Pool, volume_format::PoolMetadata), ServerError> {
    // Every device connection from here on presents the server's
    // capability to devices that fence.
    crate::targets::install(key.clone());
    match Pool::open_journaled(&config.devices, key.clone()).await {
        Ok(opened) => Ok(opened),
        Err(PoolError::Invalid(why)) if why.contains("initialized for server key") => {
            Err(ServerError::WrongServerKey {
                pool: why,
                config: hex::encode(key.verifying_key().to_bytes()),
                path: config.key.clone(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The listeners while standing by: sessions authenticate, and every
/// request is refused with the active server's name and addresses.
struct StandbyTerm {
    stop: watch::Sender<bool>,
    loops: JoinSet<()>,
    responder: tokio::task::JoinHandle<()>,
}

/// Starts standing by (answering on the listeners) once another server is
/// seen holding the lease, and stops when `done` says so.
async fn standby_when_seen(
    listeners: Vec<Arc<Listener>>,
    key: Arc<SigningKey>,
    config: Config,
    mut owner: watch::Receiver<Option<volume_format::lease::LeaseRecord>>,
    clients: Arc<ClientTable>,
    mut done: watch::Receiver<bool>,
) {
    // Our own host id's record is this server's previous run (killed, or
    // restarted): clients wait in the listen queue until it is taken over,
    // rather than be told to go elsewhere.
    let me = config.availability.host_id;
    tokio::select! {
        seen = owner.wait_for(|o| o.as_ref().is_some_and(|o| o.host_id != me)) => if seen.is_err() { return },
        _ = done.wait_for(|d| *d) => return,
    }
    let (clients_tx, clients_rx) = watch::channel(clients);
    let term = StandbyTerm::start(&listeners, &key, &config, owner, clients_rx);
    // The clients the active server adds (agents, admins) after this one
    // read the pool: read again now and every STANDBY_CLIENTS_REFRESH, so
    // a new key hears "standing by, go there" rather than "unknown key".
    let refresh = async {
        loop {
            match open_pool(&config, &key).await {
                Ok((pool, meta)) => {
                    clients_tx.send_replace(Arc::new(core::client_table(&meta)));
                    for d in &pool.devices {
                        if let Some(c) = &d.client {
                            c.disconnect().await;
                        }
                    }
                }
                Err(e) => tracing::warn!("standby: cannot read the pool's clients again: {e}"),
            }
            tokio::time::sleep(STANDBY_CLIENTS_REFRESH).await;
        }
    };
    tokio::select! {
        _ = done.wait_for(|d| *d) => {}
        _ = refresh => {}
    }
    term.stop().await;
}

/// How often a standby reads the pool's client records again.
const STANDBY_CLIENTS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

impl StandbyTerm {
    fn start(
        listeners: &[Arc<Listener>],
        key: &Arc<SigningKey>,
        config: &Config,
        owner: watch::Receiver<Option<volume_format::lease::LeaseRecord>>,
        clients: watch::Receiver<Arc<ClientTable>>,
    ) -> StandbyTerm {
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMANDS_QUEUED_MAX);
        let (stop, stop_rx) = watch::channel(false);
        let me: Arc<str> = Arc::from(format!("{}, host id {}", config.availability.name, config.availability.host_id));
        let responder = tokio::spawn(standby::run(cmd_rx, owner.clone(), me.clone(), config.cache_mirror_dir.clone()));
        let ctx = Arc::new(session::SessionContext {
            key: key.clone(),
            lease_ms: config.lease_ms,
            clients,
            meta: watch::channel(Arc::new(volume_format::PoolMetadata::new(
                uuid::Uuid::nil(),
                "",
                1 << 20,
                volume_format::PublicKey([0; 32]),
                0,
            )))
            .1,
            meta_readers: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            commands: cmd_tx,
            next_session: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(SESSIONS_MAX)),
            channel_mode_min: config.channel_mode_min,
            gate: Arc::new(admission::Gate::default()),
            standby: Some((owner, me)),
            lanes: None,
        });
        let mut loops = JoinSet::new();
        for l in listeners {
            loops.spawn(accept_loop(l.clone(), ctx.clone(), stop_rx.clone()));
        }
        StandbyTerm { stop, loops, responder }
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.loops.join_next().await.is_some() {}
        let _ = self.responder.await;
    }
}

/// Fences every previous metadata server of the pool on the pool's fencing
/// devices ([`crate::targets::fence_previous_servers`]) once this server
/// holds the pool lease of `generation`, before it reads the metadata it
/// serves: a previous server that is only paused (SIGSTOP, a VM pause) has
/// nothing in flight there any more and can write nothing more. The pool's
/// devices and their fencing record come from a read of the metadata just
/// for that (it is read again after the fence).
async fn fence_previous_servers(config: &Config, key: &Arc<SigningKey>, generation: u64) -> Result<(), ServerError> {
    let (pool, meta) = open_pool(config, key).await?;
    for d in &pool.devices {
        if let Some(c) = &d.client {
            c.disconnect().await;
        }
    }
    let recorded = |index| meta.device_fencing.iter().find(|f| f.device == index).map(|f| f.fenced);
    let devices: Vec<crate::targets::TakeoverDevice> = meta
        .devices
        .iter()
        .map(|d| crate::targets::TakeoverDevice {
            uri: d.uri.clone(),
            recorded_fencing: recorded(d.index),
            in_use: matches!(
                d.state,
                volume_format::metadata::DeviceState::Online | volume_format::metadata::DeviceState::Resyncing { .. }
            ),
        })
        .collect();
    let fenced = crate::targets::fence_previous_servers(&devices, key, generation).await.map_err(ServerError::Fence)?;
    if !fenced.is_empty() {
        info!(generation, devices = ?fenced, "fenced the previous metadata servers on the pool's fencing devices");
    }
    Ok(())
}

/// Serves the pool while this server holds the lease: fences the previous
/// servers, loads the metadata afresh (the previous owner may have
/// committed until it stopped), runs the owner, the device task and the
/// lease renewals.
async fn active_term(
    listeners: &[Arc<Listener>],
    config: &Config,
    key: &Arc<SigningKey>,
    lease: lease_task::LeaseTask,
    pool_meta: &(uuid::Uuid, String, u64, volume_format::PublicKey),
    stop: watch::Receiver<bool>,
) -> (lease_task::LeaseTask, Result<TermEnd, ServerError>) {
    let Some(generation) = lease.generation() else {
        return (lease, Err(ServerError::Lease("the term started without the pool lease".into())));
    };
    // Every device connection from here on carries this term's generation.
    crate::targets::set_term(crate::targets::ServerTerm::Active { generation });
    if let Err(e) = fence_previous_servers(config, key, generation).await {
        return (lease, Err(e));
    }
    let (mut pool, meta) = match open_pool(config, key).await {
        Ok(x) => x,
        Err(e) => return (lease, Err(e)),
    };
    let Some(journal) = pool.take_journal() else {
        let e = ServerError::Pool(PoolError::Invalid("the pool was opened without its metadata journal".into()));
        return (lease, Err(e));
    };
    let journal = commit::MetaJournal::new(journal, pool.metadata_areas());
    let mut core = core::Core::new(
        meta,
        journal,
        core::CoreConfig {
            lease_ms: config.lease_ms,
            durable_ms: config.durable_ms,
            device_request_max_ms: config.device_request_max_ms,
            grace_ms: config.grace_ms,
            key: key.clone(),
            entropy: Box::new(core::OsEntropy),
        },
    );
    core.set_device_probe(recovery::ProbeBackoff::default());
    core.set_device_replace_after(config.device_replace_after_ms);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMANDS_QUEUED_MAX);
    let (term_stop_tx, term_stop_rx) = watch::channel(false);
    // Backup channels read the committed metadata; until one does, the
    // watch holds a placeholder (see `owner::Shell::publish_meta`).
    let (pool_uuid, pool_name, extent_bytes, server_key) = pool_meta.clone();
    let placeholder = Arc::new(volume_format::PoolMetadata::new(pool_uuid, pool_name, extent_bytes, server_key, 0));
    let readers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (meta_tx, meta_rx) = watch::channel(placeholder.clone());
    let (clients_tx, clients_rx) = watch::channel(Arc::new(core::client_table(&core.meta)));
    let published = owner::Published { meta: meta_tx, readers: readers.clone(), placeholder, clients: clients_tx };
    let lanes = crate::mirror::lane::Lanes::new(Some(lease.guard()));
    let ctx = Arc::new(session::SessionContext {
        key: key.clone(),
        lease_ms: config.lease_ms,
        clients: clients_rx,
        meta: meta_rx,
        meta_readers: readers,
        commands: cmd_tx,
        next_session: AtomicU64::new(1),
        slots: Arc::new(Semaphore::new(SESSIONS_MAX)),
        channel_mode_min: config.channel_mode_min,
        gate: Arc::new(admission::Gate::default()),
        standby: None,
        lanes: Some(lanes.clone()),
    });
    let mut accept_loops = JoinSet::new();
    for l in listeners {
        accept_loops.spawn(accept_loop(l.clone(), ctx.clone(), term_stop_rx.clone()));
    }
    if let Some(path) = &config.backup_socket {
        accept_loops.spawn(backup_socket::serve(path.clone(), ctx.clone(), term_stop_rx.clone()));
    }
    drop(ctx);
    let guard = lease.guard();
    let (lease_cmd_tx, lease_cmd_rx) = mpsc::channel(4);
    lease.list_self_active();
    let servers = lease.servers.subscribe();
    let (lease_stop_tx, lease_stop_rx) = watch::channel(false);
    // The lease task runs beside the owner and comes back when it ends.
    let lease_run = tokio::spawn(async move {
        let mut lease = lease;
        let end = lease.hold(lease_cmd_rx, lease_stop_rx).await;
        (lease, end)
    });
    let (lease_end_tx, lease_end_rx) = tokio::sync::oneshot::channel();
    let lease_watch = tokio::spawn(async move {
        let result = lease_run.await;
        // Only a lost lease is news to the owner: a handoff's outcome
        // reaches it as its own input, and a stop is the owner's doing.
        if let Ok((_, lease_task::LeaseEnd::Lost(why))) = &result {
            let _ = lease_end_tx.send(why.clone());
        }
        result
    });
    let control = owner::LeaseControl { commands: lease_cmd_tx, servers, ended: lease_end_rx, guard };
    let mut shutdown = stop.clone();
    let end = owner::run(
        core,
        pool,
        published,
        cmd_rx,
        async move {
            let _ = shutdown.wait_for(|s| *s).await;
        },
        control,
        owner::MirrorSetup { dir: config.cache_mirror_dir.clone(), lanes },
    )
    .await;
    info!("closing sessions");
    let _ = term_stop_tx.send(true);
    while accept_loops.join_next().await.is_some() {}
    let _ = lease_stop_tx.send(true);
    let (lease, lease_end) = match lease_watch.await {
        Ok(Ok(x)) => x,
        // The lease task panicked: nothing to recover; the process ends.
        _ => panic!("the lease task failed"),
    };
    let term = match (end, lease_end) {
        (Some(why), _) => TermEnd::NotActive(why),
        (None, lease_task::LeaseEnd::Lost(why)) => TermEnd::NotActive(why),
        (None, _) => TermEnd::Shutdown,
    };
    (lease, Ok(term))
}

async fn accept_loop(listener: Arc<Listener>, ctx: Arc<session::SessionContext>, mut stop: watch::Receiver<bool>) {
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
            // Data and backup channels send whole 1 MiB replies.
            blockio::socket::tune_unix(&s);
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
