//! A control-protocol client: one authenticated connection, many requests in
//! flight (replies matched by id), events delivered on a channel.
//!
//! Shape: the caller's tasks write requests under a short lock on the write
//! half; one reader task owns the read half and completes waiters. When the
//! connection breaks, every waiter and every later request fails with
//! [`ControlClientError::Closed`] at once, and the event channel ends — which
//! is how the agent learns it must reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use volume_format::control::auth::{ChannelMode, ConnectionKind, Role};
use volume_format::control::frame;
use volume_format::control::messages::{ClientMessage, ControlError, Request, Response, ServerEvent, ServerMessage};

use crate::addr::{ControlAddr, ControlStream};
use crate::framed::{self, FramedError};
use crate::handshake::{self, ClientHandshake, ClientSession, HandshakeError};
use crate::secure::SecureStream;

/// The protected stream a client talks over.
type Stream = SecureStream<Box<dyn ControlStream>>;

/// How long a request may wait for its reply before the caller gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Events buffered for a slow consumer before the connection is dropped.
const EVENTS_QUEUED_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("cannot connect to metadata server at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("metadata server at {addr}: {source}")]
    Handshake { addr: String, source: HandshakeError },
    #[error("the connection to the metadata server is closed before it answered (it stopped, or lost the pool lease to another server: a change it had not confirmed may or may not have been made; `sanvol pool status` shows the active server and the pool as it is)")]
    Closed,
    #[error("the metadata server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Server(#[from] ControlError),
    #[error("control connection: {0}")]
    Transport(#[from] FramedError),
}

type Waiter = oneshot::Sender<Result<Response, ControlError>>;

struct Shared {
    next_id: AtomicU64,
    /// `None` once the connection is closed: no new waiter may register.
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    writer: tokio::sync::Mutex<WriteHalf<Stream>>,
    closed: watch::Sender<bool>,
    session: ClientSession,
}

/// An authenticated control connection. Cheap to clone.
#[derive(Clone)]
pub struct ControlClient {
    shared: Arc<Shared>,
}

/// A request written to the connection, its reply still to come
/// ([`ControlClient::send_request`]).
pub struct SentRequest {
    client: ControlClient,
    id: u64,
    rx: oneshot::Receiver<Result<Response, ControlError>>,
    /// How long the reply may take, counted from when it is awaited.
    timeout: Duration,
}

impl SentRequest {
    /// Waits for the reply (at most the timeout given when it was sent).
    pub async fn answer(self) -> Result<Response, ControlClientError> {
        match tokio::time::timeout(self.timeout, self.rx).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(e))) => Err(ControlClientError::Server(e)),
            Ok(Err(_)) => Err(ControlClientError::Closed),
            Err(_) => {
                self.client.forget(self.id);
                Err(ControlClientError::Timeout(self.timeout))
            }
        }
    }
}

impl ControlClient {
    /// Connects, authenticates and starts the reader. Returns the client and
    /// the stream of server events. The connection is protected in the mode
    /// `SANVOL_CHANNEL_MODE` names (encrypted unless it says `integrity`).
    pub async fn connect(
        addr: &ControlAddr,
        key: &SigningKey,
        pinned: Option<&VerifyingKey>,
        role: Role,
        name: &str,
        instance: [u8; 16],
    ) -> Result<(ControlClient, mpsc::Receiver<ServerEvent>), ControlClientError> {
        let mode = handshake::channel_mode_from_env();
        ControlClient::connect_with_mode(addr, key, pinned, role, name, instance, mode).await
    }

    /// Like [`ControlClient::connect`], with the channel mode given.
    pub async fn connect_with_mode(
        addr: &ControlAddr,
        key: &SigningKey,
        pinned: Option<&VerifyingKey>,
        role: Role,
        name: &str,
        instance: [u8; 16],
        mode: ChannelMode,
    ) -> Result<(ControlClient, mpsc::Receiver<ServerEvent>), ControlClientError> {
        let stream =
            addr.connect().await.map_err(|source| ControlClientError::Connect { addr: addr.to_string(), source })?;
        let who = ClientHandshake { key, pinned, role, name, instance, mode, kind: ConnectionKind::Control };
        let (mut stream, session) =
            who.run(stream).await.map_err(|source| ControlClientError::Handshake { addr: addr.to_string(), source })?;
        stream.set_label(format!("control connection to the metadata server at {addr}"));
        let (reader, writer) = tokio::io::split(stream);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Some(HashMap::new())),
            writer: tokio::sync::Mutex::new(writer),
            closed,
            session,
        });
        let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUED_MAX);
        tokio::spawn(read_loop(reader, shared.clone(), events_tx));
        Ok((ControlClient { shared }, events_rx))
    }

    pub fn session(&self) -> &ClientSession {
        &self.shared.session
    }

    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Resolves once the connection is closed.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, request: Request) -> Result<Response, ControlClientError> {
        self.request_with_timeout(request, REQUEST_TIMEOUT).await
    }

    pub async fn request_with_timeout(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ControlClientError> {
        self.send_request(request, timeout).await?.answer().await
    }

    /// Sends a request and returns once it is written to the connection;
    /// the reply comes with [`SentRequest::answer`]. Requests sent one after
    /// the other reach the server in that order (the server takes the
    /// requests of one connection in order), so a caller may keep several in
    /// flight and still rely on their order — the cache mirror's pipelined
    /// appends do.
    pub async fn send_request(&self, request: Request, timeout: Duration) -> Result<SentRequest, ControlClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = frame::encode_frame(&ClientMessage { id, request }).map_err(FramedError::from)?;
        let (tx, rx) = oneshot::channel();
        match self.shared.pending.lock().unwrap().as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(ControlClientError::Closed),
        };
        let sent = {
            let mut w = self.shared.writer.lock().await;
            framed::write_frame(&mut *w, &frame).await
        };
        if let Err(e) = sent {
            self.forget(id);
            shutdown(&self.shared);
            return Err(e.into());
        }
        Ok(SentRequest { client: self.clone(), id, rx, timeout })
    }

    fn forget(&self, id: u64) {
        if let Some(p) = self.shared.pending.lock().unwrap().as_mut() {
            p.remove(&id);
        }
    }

    /// Closes the connection; pending requests fail with `Closed`.
    pub async fn close(&self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.shared.writer.lock().await.shutdown().await;
        shutdown(&self.shared);
    }
}

/// Marks the connection closed and fails every waiter (by dropping them).
fn shutdown(shared: &Shared) {
    shared.pending.lock().unwrap().take();
    shared.closed.send_replace(true);
}

async fn read_loop(mut reader: ReadHalf<Stream>, shared: Arc<Shared>, events: mpsc::Sender<ServerEvent>) {
    loop {
        let msg = match framed::read_message::<ServerMessage, _>(&mut reader).await {
            Ok(m) => m,
            Err(FramedError::Closed) => break,
            Err(e) => {
                tracing::warn!("control connection to the metadata server failed: {e}");
                break;
            }
        };
        match msg {
            ServerMessage::Reply { id, result } => {
                let waiter = shared.pending.lock().unwrap().as_mut().and_then(|p| p.remove(&id));
                match waiter {
                    Some(w) => {
                        let _ = w.send(result);
                    }
                    None => tracing::debug!("reply to request {id}, which no longer waits (timed out)"),
                }
            }
            ServerMessage::Event(event) => match events.try_send(event) {
                Ok(()) => {}
                // Nobody listens for events (an admin command): they are
                // not for this client.
                Err(mpsc::error::TrySendError::Closed(event)) => {
                    tracing::debug!(?event, "control event ignored: this client does not take events")
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("control events are not being consumed; dropping the connection");
                    break;
                }
            },
        }
    }
    shutdown(&shared);
}
