//! The NBD server: serves any [`BlockDevice`](crate::BlockDevice) over a
//! unix socket, TCP, or any already-accepted byte stream.
//!
//! Why it is built this way:
//! - One connection = one handshake ([`handshake`]), then the transmission
//!   phase ([`transmission`]), where a reader decodes requests and drives
//!   their handlers concurrently, and a writer future owns the socket's
//!   write half and sends replies in batches with vectored writes. Replies go
//!   out in completion order, not request order, as the spec allows.
//! - Or, for devices that answer on the calling thread (memory, files:
//!   sanvol-target, the demo's devices), the transmission phase on a few
//!   blocking threads per connection ([`threads`],
//!   `ServerConfig::connection_threads`): a request then never waits for an
//!   event loop to wake up, which is most of a small request's latency.
//! - Everything is bounded: option sizes, option counts, payload sizes, and
//!   the requests and bytes in flight per connection. While a connection is
//!   over its bound the server stops reading from it (backpressure), so a
//!   client can never make it allocate without limit.
//! - The export list is an [`ExportSource`] consulted at handshake time, so
//!   callers (the metadata server's volumes and snapshot pseudo-devices) can
//!   add and remove exports while serving.
//!
//! # Layout
//! - [`exports`]: [`Export`], [`ExportSource`], [`ExportTable`].
//! - [`handshake`]: fixed-newstyle option haggling.
//! - [`transmission`]: request decoding, validation and dispatch.
//! - [`reply`]: reply framing and the batching writer.
//! - [`threads`]: the transmission phase on blocking connection threads
//!   (`ServerConfig::connection_threads`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::splice::SpliceSocket;

pub mod exports;
mod handshake;
mod reply;
mod threads;
mod transmission;

pub use exports::{Export, ExportRefusal, ExportSource, ExportTable};

/// Read buffer per connection: big enough that small requests cost one
/// `read` syscall per batch, small enough for thousands of connections.
pub(super) const READ_BUFFER_BYTES: usize = 128 * 1024;

/// Tunables of the server. Every limit is named and has a bound.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most payload bytes (write data received plus read data not yet sent)
    /// held per connection; above it the server stops reading requests.
    pub in_flight_bytes_max: usize,
    /// Most requests being handled per connection at once.
    pub requests_in_flight_max: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Most simultaneous connections per listener (`serve_unix`/`serve_tcp`);
    /// connections beyond it are closed at once.
    pub connections_max: usize,
    /// TLS (`NBD_OPT_STARTTLS`): offered when set, and optionally required.
    pub tls: Option<ServerTls>,
    /// 0 (the default): each connection is one async task, its requests run
    /// concurrently (up to `requests_in_flight_max`) and its replies are
    /// written in batches. N > 0: each plain unix or TCP connection of
    /// `serve_unix`/`serve_tcp` is served by N OS threads taking turns at
    /// the socket with blocking reads and writes ([`threads`]): lower
    /// latency at low queue depth for devices that answer on the calling
    /// thread (memory, files), at most N requests in flight per connection.
    /// TLS connections and `serve_connection` streams stay async.
    pub connection_threads: usize,
    /// Connection threads only (zero, the default: off). A thread waiting
    /// for the next request first asks the socket without blocking for up
    /// to this long, yielding the CPU between tries, before it sleeps in
    /// `recv`. At low queue depth the next request then usually arrives
    /// while the thread is still awake: no sleep, no wake-up, no idle CPU
    /// to bring back (on a virtual machine whose idle vCPUs halt, that
    /// wake-up is most of a 4 KiB request's latency). The price is CPU:
    /// a connection that is waiting keeps a core busy (yielding to any
    /// other runnable task) for up to this long after each request, so a
    /// reader polls only when its client seems to wait for it: the last
    /// read brought one request, fewer than two of the connection's
    /// requests run, and no other thread of the process polls.
    pub poll_before_block: Duration,
}

/// A server's TLS setup (see [`crate::tls::server_from_dir`]).
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// Refuse every export to clients that do not negotiate TLS
    /// (`nbdkit --tls=require`).
    pub required: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("required", &self.required).finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            in_flight_bytes_max: 64 * 1024 * 1024,
            requests_in_flight_max: 256,
            handshake_timeout: Duration::from_secs(30),
            connections_max: 1024,
            tls: None,
            connection_threads: 0,
            poll_before_block: Duration::ZERO,
        }
    }
}

/// Why a connection ended abnormally. Each variant says what failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("NBD connection I/O failed while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the client did not finish the NBD handshake within {timeout_ms} ms")]
    HandshakeTimeout { timeout_ms: u64 },
    #[error("the client sent unknown handshake flags {flags:#x}; the NBD spec requires closing the connection")]
    UnknownClientFlags { flags: u32 },
    #[error("bad option magic {magic:#x} during the handshake (expected IHAVEOPT): the client does not speak fixed-newstyle NBD")]
    BadOptionMagic { magic: u64 },
    #[error("option {option} announces {length} bytes of data, more than the {max} this server accepts")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    #[error("the client sent more than {max} options without entering transmission")]
    TooManyOptions { max: usize },
    #[error("NBD_OPT_EXPORT_NAME asked for {name:?}, which is not exported (the option cannot carry an error, so the connection is closed)")]
    UnknownExport { name: String },
    #[error(
        "NBD_OPT_EXPORT_NAME was refused: {message} (the option cannot carry an error, so the connection is closed)"
    )]
    ExportRefused { message: String },
    #[error("NBD_OPT_EXPORT_NAME carried an export name that is not valid UTF-8 or is longer than 4096 bytes")]
    BadExportName,
    #[error("the client asked for an export without TLS, which this server requires (the option cannot carry an error, so the connection is closed)")]
    TlsRequired,
    #[error("TLS handshake with the client failed: {0}")]
    Tls(String),
    #[error("bad request magic {magic:#x}: the request stream is out of sync, closing the connection")]
    BadRequestMagic { magic: u32 },
    #[error("{command} request announces a {length}-byte payload, more than the {max}-byte maximum; closing the connection because its data cannot be skipped safely")]
    PayloadTooLarge { command: &'static str, length: u32, max: u32 },
    #[error("the reply writer ended unexpectedly: {0}")]
    WriterFailed(String),
}

impl ServerError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> ServerError {
        move |source| ServerError::Io { context, source }
    }
}

struct Inner {
    exports: Arc<dyn ExportSource>,
    config: ServerConfig,
    next_connection_id: AtomicU64,
}

/// An NBD server over an [`ExportSource`]. Cheap to clone.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl NbdServer {
    pub fn new(exports: Arc<dyn ExportSource>, config: ServerConfig) -> NbdServer {
        NbdServer { inner: Arc::new(Inner { exports, config, next_connection_id: AtomicU64::new(1) }) }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Serves one already-accepted (possibly already-authenticated) byte
    /// stream: handshake then transmission, until the client disconnects.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), ServerError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.serve_halves(r, w, None, "stream".to_string(), None).await
    }

    /// Serves one connection the caller accepted on a unix socket (after
    /// checking its peer, say) as [`NbdServer::serve_unix`] serves its own:
    /// large read payloads may be spliced into it ([`crate::splice`]),
    /// which a plain byte stream ([`NbdServer::serve_connection`]) never is.
    pub async fn serve_unix_stream(&self, stream: tokio::net::UnixStream, peer: String) -> Result<(), ServerError> {
        crate::socket::tune_unix(&stream);
        let (r, w) = stream.into_split();
        self.serve_halves(r, w, None, peer, Some(<tokio::net::UnixListener as Listener>::native())).await
    }

    /// Accepts connections on a unix socket until `shutdown` completes, then
    /// lets every connection finish its in-flight requests and returns.
    pub async fn serve_unix(
        &self,
        listener: tokio::net::UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_listener(listener, shutdown).await
    }

    /// Like [`NbdServer::serve_unix`] on TCP (with `TCP_NODELAY`: NBD is
    /// request/response and small replies must not wait for Nagle).
    pub async fn serve_tcp(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_listener(listener, shutdown).await
    }

    async fn serve_listener<L: Listener>(
        &self,
        listener: L,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.inner.config.connections_max));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = listener.accept_split() => {
                    let (r, w, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Per-connection failures (the peer reset before we
                            // accepted, fd exhaustion) must not stop the server.
                            warn!(error = %e, "accepting an NBD connection failed");
                            tokio::task::yield_now().await;
                            continue;
                        }
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        warn!(%peer, max = self.inner.config.connections_max, "too many NBD connections; closing the new one");
                        continue;
                    };
                    let server = self.clone();
                    let stop = stop_rx.clone();
                    tasks.spawn(async move {
                        let _slot = slot;
                        if let Err(e) = server.serve_halves(r, w, Some(stop), peer, Some(L::native())).await {
                            debug!(error = %e, "NBD connection ended with an error");
                        }
                    });
                }
            }
        }
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    async fn serve_halves<R, W>(
        &self,
        r: R,
        mut w: W,
        stop: Option<watch::Receiver<bool>>,
        peer: String,
        native: Option<Native<R, W>>,
    ) -> Result<(), ServerError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.inner.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("nbd_conn", id, %peer);
        async move {
            let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, r);
            let timeout = self.inner.config.handshake_timeout;
            let deadline = tokio::time::Instant::now() + timeout;
            let timed_out = || ServerError::HandshakeTimeout { timeout_ms: timeout.as_millis() as u64 };
            let tls = handshake::TlsState {
                offered: self.inner.config.tls.is_some(),
                required: self.inner.config.tls.as_ref().is_some_and(|t| t.required),
                active: false,
            };
            let exports = &*self.inner.exports;
            let outcome = tokio::time::timeout_at(deadline, async {
                let no_zeroes = handshake::greet(&mut reader, &mut w).await?;
                Ok::<_, ServerError>((
                    no_zeroes,
                    handshake::options(&mut reader, &mut w, exports, no_zeroes, tls).await?,
                ))
            })
            .await
            .map_err(|_| timed_out())
            .and_then(|r| r);
            let (no_zeroes, outcome) = match outcome {
                Ok(x) => x,
                Err(e) => {
                    info!(error = %e, "NBD handshake failed");
                    let _ = w.shutdown().await;
                    return Err(e);
                }
            };
            if let handshake::Outcome::StartTls = outcome {
                let Some(config) = self.inner.config.tls.as_ref().map(|t| t.config.clone()) else {
                    unreachable!("STARTTLS is acknowledged only with a TLS setup")
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let accepted = tokio::time::timeout_at(deadline, acceptor.accept(tokio::io::join(reader, w)))
                    .await
                    .map_err(|_| timed_out())
                    .and_then(|r| r.map_err(|e| ServerError::Tls(e.to_string())));
                let stream = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        info!(error = %e, "NBD handshake failed");
                        return Err(e);
                    }
                };
                let (r, mut w) = tokio::io::split(stream);
                let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, r);
                let tls = handshake::TlsState { active: true, ..tls };
                let outcome =
                    tokio::time::timeout_at(deadline, handshake::options(&mut reader, &mut w, exports, no_zeroes, tls))
                        .await
                        .map_err(|_| timed_out())
                        .and_then(|r| r);
                return self.transmit(reader, w, outcome, stop, true, None).await;
            }
            self.transmit(reader, w, Ok(outcome), stop, false, native).await
        }
        .instrument(span)
        .await
    }

    /// The end of a handshake: transmission, or a clean close.
    async fn transmit<R, W>(
        &self,
        reader: BufReader<R>,
        mut w: W,
        outcome: Result<handshake::Outcome, ServerError>,
        stop: Option<watch::Receiver<bool>>,
        tls: bool,
        native: Option<Native<R, W>>,
    ) -> Result<(), ServerError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        {
            let negotiated = match outcome {
                Ok(handshake::Outcome::Transmission(n)) => n,
                Ok(handshake::Outcome::Aborted) => {
                    debug!("client aborted the handshake");
                    let _ = w.shutdown().await;
                    return Ok(());
                }
                Ok(handshake::Outcome::StartTls) => {
                    // Refused by `options` once TLS is active.
                    let _ = w.shutdown().await;
                    return Err(ServerError::Tls("STARTTLS inside TLS".into()));
                }
                Err(e) => {
                    info!(error = %e, "NBD handshake failed");
                    let _ = w.shutdown().await;
                    return Err(e);
                }
            };
            info!(
                export = %negotiated.export.name,
                structured = negotiated.structured,
                contexts = negotiated.contexts.len(),
                tls,
                "NBD transmission started"
            );
            let threads = self.inner.config.connection_threads;
            let result = match native {
                Some(native) if threads > 0 => match (native.into_blocking)(reader, w) {
                    Ok((socket, buffered)) => {
                        let poll = self.inner.config.poll_before_block;
                        threads::run(socket, buffered, negotiated, threads, poll, stop).await
                    }
                    Err(e) => Err(ServerError::io("handing the connection to its threads")(e)),
                },
                native => {
                    let splice = native.as_ref().and_then(|n| (n.splice_socket)(&w));
                    let splice_in = native.map(|n| n.splice_in_socket);
                    transmission::run(reader, w, negotiated, &self.inner.config, stop, splice, splice_in).await
                }
            };
            match &result {
                Ok(()) => debug!("NBD connection closed"),
                Err(e) => info!(error = %e, "NBD connection closed with an error"),
            }
            result
        }
    }
}

/// Turns a connection's halves back into one blocking socket, with the bytes
/// its reader had already buffered ([`threads`]).
type ToBlocking<R, W> = fn(BufReader<R>, W) -> std::io::Result<(threads::Socket, Vec<u8>)>;

/// What a listener's own sockets can do beyond byte streams: become
/// blocking sockets for connection threads, or lend their descriptor for
/// splicing read payloads into ([`crate::splice`]).
struct Native<R, W> {
    into_blocking: ToBlocking<R, W>,
    splice_socket: fn(&W) -> Option<SpliceSocket>,
    splice_in_socket: fn(&R) -> Option<SpliceSocket>,
}

/// A listener whose connections split into owned halves without locks.
trait Listener {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept_split(&self) -> impl Future<Output = std::io::Result<(Self::Read, Self::Write, String)>> + Send;
    fn into_blocking(reader: BufReader<Self::Read>, w: Self::Write) -> std::io::Result<(threads::Socket, Vec<u8>)>;
    fn splice_socket(w: &Self::Write) -> Option<SpliceSocket>;
    fn splice_in_socket(r: &Self::Read) -> Option<SpliceSocket>;

    fn native() -> Native<Self::Read, Self::Write> {
        Native {
            into_blocking: Self::into_blocking,
            splice_socket: Self::splice_socket,
            splice_in_socket: Self::splice_in_socket,
        }
    }
}

/// A second registration of an accepted socket, for splicing read payloads
/// into; without one every reply is written from memory.
fn splice_socket(socket: &impl std::os::fd::AsFd) -> Option<SpliceSocket> {
    SpliceSocket::dup(socket, tokio::io::Interest::WRITABLE)
        .inspect_err(|e| debug!(error = %e, "read payloads will be copied: no descriptor for splicing"))
        .ok()
}

/// A third registration, for taking write payloads into pipes; without one
/// every write payload is read into memory.
fn splice_in_socket(socket: &impl std::os::fd::AsFd) -> Option<SpliceSocket> {
    SpliceSocket::dup(socket, tokio::io::Interest::READABLE)
        .inspect_err(|e| debug!(error = %e, "write payloads will be copied: no descriptor for splicing"))
        .ok()
}

impl Listener for tokio::net::UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept_split(&self) -> std::io::Result<(Self::Read, Self::Write, String)> {
        let (stream, _) = self.accept().await?;
        crate::socket::tune_unix(&stream);
        let (r, w) = stream.into_split();
        Ok((r, w, "unix".to_string()))
    }

    fn into_blocking(reader: BufReader<Self::Read>, w: Self::Write) -> std::io::Result<(threads::Socket, Vec<u8>)> {
        threads::hand_over(reader, |r| {
            Ok(threads::Socket::Unix(r.reunite(w).map_err(std::io::Error::other)?.into_std()?))
        })
    }

    fn splice_socket(w: &Self::Write) -> Option<SpliceSocket> {
        splice_socket(w.as_ref())
    }

    fn splice_in_socket(r: &Self::Read) -> Option<SpliceSocket> {
        splice_in_socket(r.as_ref())
    }
}

impl Listener for tokio::net::TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept_split(&self) -> std::io::Result<(Self::Read, Self::Write, String)> {
        let (stream, peer) = self.accept().await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok((r, w, peer.to_string()))
    }

    fn into_blocking(reader: BufReader<Self::Read>, w: Self::Write) -> std::io::Result<(threads::Socket, Vec<u8>)> {
        threads::hand_over(reader, |r| {
            Ok(threads::Socket::Tcp(r.reunite(w).map_err(std::io::Error::other)?.into_std()?))
        })
    }

    fn splice_socket(w: &Self::Write) -> Option<SpliceSocket> {
        splice_socket(w.as_ref())
    }

    fn splice_in_socket(r: &Self::Read) -> Option<SpliceSocket> {
        splice_in_socket(r.as_ref())
    }
}
