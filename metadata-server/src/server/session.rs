//! One control connection: handshake, then forwarding requests to the owner
//! task and writing replies and events back.
//!
//! Three small pieces, so that no read is ever cancelled half-way: a reader
//! task turns frames into messages on a bounded channel; this task forwards
//! them (at most [`REQUESTS_IN_FLIGHT_MAX`] waiting for the owner) and
//! collects replies; a writer task owns the write half and sends everything
//! queued for the peer (replies here, events from the owner).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn, Instrument};
use volume_format::control::messages::{ClientMessage, ControlError, ErrorCode, Request, ServerMessage};
use volume_format::HandleId;

use super::admission::{Gate, PreAuth, HANDSHAKE_DEADLINE};
use super::core::ClientTable;
use super::owner::Command;
use super::stopped;
use control_client::framed::{self, FramedError};
use control_client::handshake::{self, Acceptor};
use control_client::{ControlStream, SecureStream};
use volume_format::control::auth::{ChannelMode, ConnectionKind};

/// Requests of one session waiting for the owner at once; beyond it the
/// session stops reading (backpressure on a flooding client).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// Messages queued for the peer (replies and events). The owner drops a
/// session whose queue is full rather than wait for a slow peer.
pub const OUTGOING_QUEUED_MAX: usize = 256;

pub struct SessionContext {
    pub key: Arc<SigningKey>,
    pub lease_ms: u64,
    pub clients: watch::Receiver<Arc<ClientTable>>,
    pub commands: mpsc::Sender<Command>,
    /// The committed pool metadata (backup channels read snapshots with it),
    /// shared while `meta_readers` counts a reader: see [`SessionContext::read_meta`].
    pub meta: watch::Receiver<Arc<volume_format::PoolMetadata>>,
    pub meta_readers: Arc<std::sync::atomic::AtomicUsize>,
    pub next_session: AtomicU64,
    pub slots: Arc<Semaphore>,
    /// The weakest channel mode accepted (`channel_mode_min`).
    pub channel_mode_min: ChannelMode,
    /// Admission of connections before they authenticate.
    pub gate: Arc<Gate>,
    /// On a standby: the active server's lease record as last seen, and this
    /// server's name (channels are refused naming the active server).
    pub standby: Option<(watch::Receiver<Option<volume_format::lease::LeaseRecord>>, Arc<str>)>,
    /// The cache holders' way to their mirror workers (`None` on a standby).
    pub lanes: Option<Arc<crate::mirror::lane::Lanes>>,
}

/// Counts a reader of the committed metadata while it lives.
pub struct MetaReader {
    readers: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for MetaReader {
    fn drop(&mut self) {
        self.readers.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl SessionContext {
    /// Starts reading the committed metadata: counts this reader (so the
    /// owner keeps publishing) and waits until the current state is
    /// published. Reading stops when the returned guard drops.
    pub async fn read_meta(&self) -> MetaReader {
        self.meta_readers.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let guard = MetaReader { readers: self.meta_readers.clone() };
        let (done, published) = oneshot::channel();
        if self.commands.send(Command::PublishMeta { done }).await.is_ok() {
            let _ = published.await;
        }
        guard
    }

    /// The server side of the handshake, authorizing against the pool's
    /// client table as it is right now. Every kind of connection (control
    /// session, data channel) authenticates through here, within its
    /// admission's deadline and until it is evicted to make room; what comes
    /// back is the protected stream the rest of the connection runs over.
    pub async fn accept(
        &self,
        stream: Box<dyn ControlStream>,
        session: u64,
        kind: ConnectionKind,
        mut preauth: PreAuth,
    ) -> Result<(SecureStream<Box<dyn ControlStream>>, handshake::Peer), handshake::HandshakeError> {
        let evicted = preauth.take_eviction();
        let clients = self.clients.borrow().clone();
        // The pool's server key is another server of the pool (all of them
        // hold it): the `server` role, for what one server asks of another.
        let server_key = self.key.verifying_key().to_bytes();
        let authorize = |key: &[u8; 32]| {
            if *key == server_key {
                return Some((vec![volume_format::control::auth::Role::Server], "metadata server".to_string()));
            }
            clients.get(key).map(|(role, name)| (vec![*role], name.clone()))
        };
        let on_hello = |hello: &volume_format::control::auth::ClientHello| {
            if clients.contains_key(&hello.client_key) {
                preauth.known_key(hello.client_key);
            }
        };
        let acceptor =
            Acceptor { server_key: &self.key, session, lease_ms: self.lease_ms, kind, mode_min: self.channel_mode_min };
        tokio::select! {
            r = tokio::time::timeout_at(preauth.deadline, acceptor.accept_with(stream, on_hello, authorize)) => {
                r.map_err(|_| handshake::HandshakeError::Timeout(HANDSHAKE_DEADLINE))?
            }
            why = evicted => Err(handshake::HandshakeError::Abandoned(why)),
        }
    }
}

pub async fn run(
    stream: Box<dyn ControlStream>,
    peer: String,
    session: u64,
    ctx: Arc<SessionContext>,
    stop: watch::Receiver<bool>,
    preauth: PreAuth,
) {
    let span = tracing::info_span!("session", id = session, %peer);
    run_inner(stream, peer, session, ctx, stop, preauth).instrument(span).await
}

/// How long a stopping session waits to send the answers already given.
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

async fn run_inner(
    stream: Box<dyn ControlStream>,
    peer: String,
    session: u64,
    ctx: Arc<SessionContext>,
    mut stop: watch::Receiver<bool>,
    preauth: PreAuth,
) {
    let accepted = tokio::select! {
        r = ctx.accept(stream, session, ConnectionKind::Control, preauth) => r,
        _ = stopped(&mut stop) => return,
    };
    let (mut stream, who) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => {
            // Every refusal is logged with the peer; the connection closes
            // when the stream drops.
            warn!(%peer, "control handshake failed: {e}");
            return;
        }
    };
    stream.set_label(format!("control connection from {peer} ({} {})", who.role, who.name));
    info!(client = %who.name, role = %who.role, host = %who.claimed_name, mode = %who.mode, "control session authenticated");

    let (mut reader, mut writer) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<ServerMessage>(OUTGOING_QUEUED_MAX);
    let writer_task = tokio::spawn(
        async move {
            while let Some(msg) = out_rx.recv().await {
                if let Err(e) = framed::write_message(&mut writer, &msg).await {
                    debug!("writing to the control peer failed: {e}");
                    break;
                }
            }
            let _ = writer.shutdown().await;
        }
        .in_current_span(),
    );
    let (in_tx, mut in_rx) = mpsc::channel::<Result<ClientMessage, FramedError>>(REQUESTS_IN_FLIGHT_MAX);
    // An agent's cache mirror appends and releases go from here to the
    // volume's mirror worker, answered straight to the writer
    // (crate::mirror::lane); everything else goes through this session's loop.
    let lane = ctx.lanes.clone().filter(|_| {
        Request::MirrorAppend { handle: HandleId(0), records: Vec::new() }
            .allowed_roles()
            .is_none_or(|roles| roles.contains(&who.role))
    });
    let lane_out = out_tx.clone();
    let reader_task = tokio::spawn(async move {
        loop {
            let msg = match (&lane, framed::read_message::<ClientMessage, _>(&mut reader).await) {
                (Some(lanes), Ok(ClientMessage { id, request })) => {
                    match lanes.route(session, id, request, &lane_out) {
                        Ok(()) => continue,
                        Err(request) => Ok(ClientMessage { id, request }),
                    }
                }
                (_, msg) => msg,
            };
            let end = msg.is_err();
            if in_tx.send(msg).await.is_err() || end {
                break;
            }
        }
    });

    let (kick_tx, mut kick_rx) = oneshot::channel();
    let connected =
        Command::Connected { session, peer: who.clone(), addr: peer.clone(), out: out_tx.clone(), kick: kick_tx };
    if ctx.commands.send(connected).await.is_err() {
        reader_task.abort();
        return;
    }

    let mut in_flight = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => {
                stopping = true;
                break;
            }
            kicked = &mut kick_rx => {
                // Kicked, or the owner is gone (its end of the kick dropped):
                // either way the answers it already gave go out first.
                if kicked.is_ok() {
                    info!("session closed by the server");
                }
                stopping = true;
                break;
            }
            Some((id, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if out_tx.send(ServerMessage::Reply { id, result }).await.is_err() {
                    break;
                }
            }
            msg = in_rx.recv(), if in_flight.len() < REQUESTS_IN_FLIGHT_MAX => {
                let msg = match msg {
                    Some(Ok(msg)) => msg,
                    Some(Err(FramedError::Closed)) | None => {
                        debug!("peer closed the control connection");
                        break;
                    }
                    Some(Err(e)) => {
                        warn!(%peer, client = %who.name, "bad control message, closing the connection: {e}");
                        break;
                    }
                };
                let ClientMessage { id, request } = msg;
                if let Some(allowed) = request.allowed_roles() {
                    if !allowed.contains(&who.role) {
                        let needed: Vec<String> = allowed.iter().map(|r| r.to_string()).collect();
                        let err = ControlError::new(
                            ErrorCode::PermissionDenied,
                            format!("this request needs the {} role; this session is authenticated as {}", needed.join(" or "), who.role),
                        );
                        if out_tx.send(ServerMessage::Reply { id, result: Err(err) }).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
                let (reply_tx, reply_rx) = oneshot::channel();
                if ctx.commands.send(Command::Request { session, request, reply: reply_tx }).await.is_err() {
                    break;
                }
                in_flight.push(async move {
                    let result = reply_rx.await.unwrap_or_else(|_| {
                        Err(ControlError::new(
                            ErrorCode::NotActive,
                            "this metadata server stopped serving before it answered (it shut down, handed the pool \
                             off or lost the pool lease); `sanvol pool status` shows the active server",
                        ))
                    });
                    (id, result)
                });
            }
        }
    }
    reader_task.abort();
    if stopping {
        // The server closes this session or stops serving (shutdown,
        // handoff, lost lease): the answers it gave before (a handoff's own
        // "done", NotActive to what was queued) still go out, then the
        // connection closes.
        let drain = async {
            while let Some((id, result)) = in_flight.next().await {
                if out_tx.send(ServerMessage::Reply { id, result }).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(STOP_DRAIN, drain).await;
    }
    let _ = ctx.commands.send(Command::Disconnected { session }).await;
    drop(out_tx);
    let _ = writer_task.await;
    info!("control session ended");
}
