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
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn, Instrument};
use volume_format::control::messages::{ClientMessage, ControlError, ErrorCode, ServerMessage};

use super::core::ClientTable;
use super::owner::Command;
use super::stopped;
use control_client::framed::{self, FramedError};
use control_client::handshake;
use control_client::ControlStream;

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
    /// On a standby: the active server's lease record as last seen, and this
    /// server's name (channels are refused naming the active server).
    pub standby: Option<(watch::Receiver<Option<volume_format::lease::LeaseRecord>>, Arc<str>)>,
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
    /// session, data channel) authenticates through here.
    pub async fn accept(
        &self,
        stream: &mut Box<dyn ControlStream>,
        session: u64,
    ) -> Result<handshake::Peer, handshake::HandshakeError> {
        let clients = self.clients.borrow().clone();
        let authorize = |key: &[u8; 32]| clients.get(key).map(|(role, name)| (vec![*role], name.clone()));
        handshake::accept(stream, &self.key, session, self.lease_ms, authorize).await
    }
}

pub async fn run(
    stream: Box<dyn ControlStream>,
    peer: String,
    session: u64,
    ctx: Arc<SessionContext>,
    stop: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("session", id = session, %peer);
    run_inner(stream, peer, session, ctx, stop).instrument(span).await
}

async fn run_inner(
    mut stream: Box<dyn ControlStream>,
    peer: String,
    session: u64,
    ctx: Arc<SessionContext>,
    mut stop: watch::Receiver<bool>,
) {
    let accepted = tokio::select! {
        r = ctx.accept(&mut stream, session) => r,
        _ = stopped(&mut stop) => return,
    };
    let who = match accepted {
        Ok(who) => who,
        Err(e) => {
            // Every refusal is logged with the peer; the connection closes
            // when `stream` drops.
            warn!(%peer, "control handshake failed: {e}");
            let _ = stream.shutdown().await;
            return;
        }
    };
    info!(client = %who.name, role = %who.role, host = %who.claimed_name, "control session authenticated");

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
    let reader_task = tokio::spawn(async move {
        loop {
            let msg = framed::read_message::<ClientMessage, _>(&mut reader).await;
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

    let mut kick_pending = true;
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            kicked = &mut kick_rx, if kick_pending => match kicked {
                Ok(()) => {
                    info!("session closed by the server");
                    break;
                }
                // Let go of without a kick (a standby keeps no sessions, an
                // owner that stopped dropped them): the replies decide.
                Err(_) => kick_pending = false,
            },
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
                    // The owner is gone: this server stopped serving the pool.
                    let err = ControlError::new(
                        ErrorCode::NotActive,
                        "this metadata server stopped serving the pool (its lease was lost or handed off); \
                         ask another of the pool's servers",
                    );
                    let _ = out_tx.send(ServerMessage::Reply { id, result: Err(err) }).await;
                    break;
                }
                in_flight.push(async move {
                    let result = reply_rx.await.unwrap_or_else(|_| {
                        let why = "this metadata server stopped serving the pool before answering (it shut down, or \
                                   lost or handed off its lease); retry, at another of the pool's servers if there is one";
                        Err(ControlError::new(ErrorCode::Unavailable, why))
                    });
                    (id, result)
                });
            }
        }
    }
    // Replies given before the session ended (to a handoff, or NotActive to
    // changes queued when the lease was lost) still go out.
    while let Some(Some((id, result))) = in_flight.next().now_or_never() {
        if out_tx.send(ServerMessage::Reply { id, result }).await.is_err() {
            break;
        }
    }
    reader_task.abort();
    let _ = ctx.commands.send(Command::Disconnected { session }).await;
    drop(out_tx);
    let _ = writer_task.await;
    info!("control session ended");
}
