//! The NBD client: a remote export as a [`BlockDevice`].
//!
//! Why it is built the way it is: the agent's direct data path runs every
//! volume I/O through this client, so it must be as fast as the best C
//! clients and must never leave a caller hanging. Hence:
//! - many requests in flight per connection, replies matched by cookie, a
//!   writer task that batches queued requests into vectored writes and a
//!   reader task that reads payloads straight into right-sized buffers
//!   (`connection.rs`, `reader.rs`);
//! - several connections per export when the server says that is safe
//!   (`NBD_FLAG_CAN_MULTI_CONN`), each request going to the connection with
//!   the fewest outstanding requests;
//! - large write payloads that arrive in pipes go into the socket with
//!   `splice(2)` ([`crate::splice`]), never through memory;
//! - requests larger than the server's maximum payload split transparently;
//! - per-request timeouts, and a dead peer failing every request at once.
//!
//! Setup errors are [`ClientError`]s; once connected, everything is an
//! [`IoError`].
//!
//! # Layout
//! - `error.rs`: [`ClientError`].
//! - `handshake.rs`: option haggling (GO with EXPORT_NAME fallback,
//!   structured replies, metadata contexts, export listing).
//! - `connection.rs`: one connection's writer task and in-flight table.
//! - `reader.rs`: reply parsing and validation.

mod connection;
mod error;
mod fence;
mod handshake;
mod reader;

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use self::connection::{Connection, PendingState, ReadAssembly, Reply, RequestTimeout};
pub use self::error::ClientError;
pub use self::fence::{send_deadline, with_send_deadline};
use self::handshake::{Handshake, Negotiated};
use crate::buffer_pool::BufferPool;
use crate::device::{BlockDevice, BlockSizes, MetaContext, StatusExtent, ZeroFlags};
use crate::error::{check_range, IoError};
use crate::proto::{self, limits};
use crate::splice::{Payload, SpliceSocket, SPLICE_BYTES_MIN};
use crate::uri::{NbdUri, Transport};

/// A credential a server asks for in the export name (a fencing
/// `sanvol-target` wants a capability there). Presented only to servers
/// whose export description (asked with `NBD_OPT_INFO` first) starts with
/// `description_prefix`; other servers get the plain name.
#[derive(Clone)]
pub struct ExportCredential {
    pub description_prefix: String,
    /// The export name to ask for instead of the plain one (called per
    /// connection, so it can be signed fresh).
    pub export_name: Arc<dyn Fn(&str) -> String + Send + Sync>,
}

impl std::fmt::Debug for ExportCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportCredential").field("description_prefix", &self.description_prefix).finish()
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Connections to open (only honoured if the server advertises
    /// `CAN_MULTI_CONN`; otherwise 1).
    pub connections: usize,
    /// Fail a request whose reply has not arrived after this long.
    pub request_timeout: Option<Duration>,
    /// Close the connection of a request that timed out (failing the other
    /// requests on it): nothing sent on it stays pending here, and no late
    /// reply is read. What a client that must know when its requests can no
    /// longer complete wants (the agent: a timed-out write is then resent
    /// elsewhere); others keep the connection and discard the late reply.
    pub timeout_closes_connection: bool,
    /// Bound on opening the socket plus the handshake, per connection.
    pub connect_timeout: Duration,
    /// Ask for structured replies (sparse reads, error messages, block status).
    pub structured_replies: bool,
    /// Metadata contexts to select for `block_status`.
    pub meta_contexts: Vec<String>,
    /// A credential for servers that check one (see [`ExportCredential`]).
    pub credential: Option<ExportCredential>,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            connections: 1,
            request_timeout: None,
            timeout_closes_connection: false,
            connect_timeout: Duration::from_secs(30),
            structured_replies: true,
            meta_contexts: vec![MetaContext::BASE_ALLOCATION.to_string()],
            credential: None,
        }
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The server's canonical name if it sent one, else the name we asked for.
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub transmission_flags: u16,
    /// The server's constraints, or the spec's defaults if it sent none.
    pub block_sizes: BlockSizes,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & proto::TFLAG_HAS_FLAGS != 0 && self.transmission_flags & flag != 0
    }
}

/// How long `disconnect` waits for in-flight requests before sending
/// `NBD_CMD_DISC` anyway.
const DISCONNECT_DRAIN_MAX: Duration = Duration::from_secs(30);
/// Most connections one client opens.
pub const CONNECTIONS_MAX: usize = 16;

/// A connected NBD export. Cheap to clone; all clones share the connections.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

struct Inner {
    info: ExportInfo,
    target: String,
    conns: Vec<Connection>,
    contexts: Vec<String>,
    request_timeout: Option<RequestTimeout>,
    /// Largest READ/WRITE we send in one request: the server's maximum,
    /// capped at 32 MiB and rounded down to its minimum block size.
    payload_bytes_max: u32,
    /// Unique among this process's clients ([`NbdClient::connection_epoch`]).
    id: u64,
}

/// Numbers the clients a process connects (never 0).
static CLIENTS_CONNECTED: AtomicU64 = AtomicU64::new(1);

/// Source of zero payloads for emulating WRITE_ZEROES on servers without it.
static ZEROES: [u8; ZEROES_BYTES] = [0; ZEROES_BYTES];
const ZEROES_BYTES: usize = 1024 * 1024;

/// An open socket before the handshake.
enum Socket {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn open_socket(uri: &NbdUri, target: &str) -> Result<Socket, ClientError> {
    let connect_err = |source| ClientError::Connect { target: target.to_string(), source };
    match &uri.transport {
        Transport::Tcp { host, .. } => {
            let port = uri.port().unwrap_or(crate::uri::DEFAULT_PORT);
            let s = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(connect_err)?;
            // Requests are latency-bound; Nagle would hold back small ones.
            s.set_nodelay(true).map_err(connect_err)?;
            Ok(Socket::Tcp(s))
        }
        Transport::Unix { socket } => {
            let s = connect_unix(socket).await.map_err(connect_err)?;
            crate::socket::tune_unix(&s);
            Ok(Socket::Unix(s))
        }
    }
}

async fn connect_unix(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if bytes.first() == Some(&0) {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            s.set_nonblocking(true)?;
            return tokio::net::UnixStream::from_std(s);
        }
        #[cfg(not(target_os = "linux"))]
        return Err(std::io::Error::other("abstract unix sockets exist only on Linux"));
    }
    tokio::net::UnixStream::connect(path).await
}

/// Runs the handshake for `export` over `stream`.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    export: &str,
    opts: &ClientOptions,
    target: &str,
) -> Result<Negotiated, ClientError> {
    if export.len() > limits::STRING_BYTES_MAX {
        return Err(ClientError::Unsupported {
            target: target.to_string(),
            what: format!("export name is longer than {} bytes", limits::STRING_BYTES_MAX),
        });
    }
    let hs = Handshake::start(stream, target).await?;
    negotiate_options(hs, export, opts, target).await
}

/// The options after the greeting (after TLS, if any).
async fn negotiate_options<S: AsyncRead + AsyncWrite + Unpin>(
    mut hs: Handshake<'_, S>,
    export: &str,
    opts: &ClientOptions,
    target: &str,
) -> Result<Negotiated, ClientError> {
    if !hs.fixed_newstyle {
        tracing::info!(target: "blockio::client", server = target, "server lacks fixed newstyle; using NBD_OPT_EXPORT_NAME");
        return hs.export_name(export).await;
    }
    let structured = opts.structured_replies && hs.structured_replies().await?;
    let credential_name;
    let export = match &opts.credential {
        Some(credential) => {
            // A server that refuses the question (some refuse INFO but not
            // GO) does not ask for a credential either.
            let info = match hs.info(export).await {
                Ok(info) => info,
                Err(ClientError::Refused { .. }) => None,
                Err(e) => return Err(e),
            };
            let asks = info.and_then(|n| n.description).is_some_and(|d| d.starts_with(&credential.description_prefix));
            if asks {
                credential_name = (credential.export_name)(export);
                credential_name.as_str()
            } else {
                export
            }
        }
        None => export,
    };
    let mut contexts = Vec::new();
    if structured && !opts.meta_contexts.is_empty() {
        contexts = hs.set_meta_contexts(export, &opts.meta_contexts).await?;
    }
    let mut n = match hs.go(export).await? {
        Some(n) => n,
        None => {
            tracing::info!(target: "blockio::client", server = target, "server does not support NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME");
            hs.export_name(export).await?
        }
    };
    n.structured_replies = structured;
    n.contexts = contexts;
    Ok(n)
}

async fn with_timeout<T>(
    t: Duration,
    target: &str,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(t, f).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout { target: target.to_string(), after_ms: t.as_millis() as u64 }),
    }
}

/// Greeting, `NBD_OPT_STARTTLS`, the TLS handshake, then the options inside
/// TLS; the connection's tasks run over the TLS stream.
async fn open_tls<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut s: S,
    tls: &crate::tls::ClientTls,
    export: &str,
    opts: &ClientOptions,
    target: &str,
) -> Result<(Connection, Negotiated), ClientError> {
    if export.len() > limits::STRING_BYTES_MAX {
        return Err(ClientError::Unsupported {
            target: target.to_string(),
            what: format!("export name is longer than {} bytes", limits::STRING_BYTES_MAX),
        });
    }
    let (fixed_newstyle, no_zeroes) = {
        let mut hs = Handshake::start(&mut s, target).await?;
        hs.starttls().await?;
        hs.flags()
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let mut stream = connector
        .connect(tls.server_name.clone(), s)
        .await
        .map_err(|e| ClientError::Tls { target: target.to_string(), reason: format!("TLS handshake: {e}") })?;
    let hs = Handshake::resume(&mut stream, target, fixed_newstyle, no_zeroes);
    let n = negotiate_options(hs, export, opts, target).await?;
    tracing::debug!(target: "blockio::client", server = target, "NBD connection is TLS-protected");
    let (r, w) = tokio::io::split(stream);
    Ok((Connection::start(r, w, target.to_string(), n.structured_replies, n.contexts.clone(), None, None), n))
}

/// Two more registrations of a plain socket, one for taking read payloads
/// into pipes and one for splicing write payloads out of pipes
/// ([`crate::splice`]); without them, payloads are copied.
fn splice_sockets(socket: &impl std::os::fd::AsFd, target: &str) -> (Option<SpliceSocket>, Option<SpliceSocket>) {
    let dup = |interest| {
        SpliceSocket::dup(socket, interest)
            .inspect_err(|e| tracing::debug!(target: "blockio::client", server = target, error = %e, "payloads will be copied: no descriptor for splicing"))
            .ok()
    };
    (dup(tokio::io::Interest::READABLE), dup(tokio::io::Interest::WRITABLE))
}

/// Opens one socket, handshakes and starts its tasks.
async fn open_connection(
    uri: &NbdUri,
    opts: &ClientOptions,
    target: &str,
) -> Result<(Connection, Negotiated), ClientError> {
    let tls = crate::tls::client_for(uri)
        .map_err(|e| ClientError::Tls { target: target.to_string(), reason: e.to_string() })?;
    with_timeout(opts.connect_timeout, target, async {
        match (open_socket(uri, target).await?, &tls) {
            (Socket::Tcp(s), Some(tls)) => open_tls(s, tls, &uri.export, opts, target).await,
            (Socket::Unix(s), Some(tls)) => open_tls(s, tls, &uri.export, opts, target).await,
            (Socket::Tcp(mut s), None) => {
                let n = negotiate(&mut s, &uri.export, opts, target).await?;
                let (splice, splice_out) = splice_sockets(&s, target);
                let (r, w) = s.into_split();
                let contexts = n.contexts.clone();
                Ok((Connection::start(r, w, target.to_string(), n.structured_replies, contexts, splice, splice_out), n))
            }
            (Socket::Unix(mut s), None) => {
                let n = negotiate(&mut s, &uri.export, opts, target).await?;
                let (splice, splice_out) = splice_sockets(&s, target);
                let (r, w) = s.into_split();
                let contexts = n.contexts.clone();
                Ok((Connection::start(r, w, target.to_string(), n.structured_replies, contexts, splice, splice_out), n))
            }
        }
    })
    .await
}

fn context_names(n: &Negotiated) -> Vec<String> {
    let mut v: Vec<String> = n.contexts.iter().map(|(name, _)| name.clone()).collect();
    v.sort();
    v
}

impl NbdClient {
    /// Connects to the export `uri` names.
    pub async fn connect(uri: &NbdUri, opts: ClientOptions) -> Result<NbdClient, ClientError> {
        let target = uri.to_string();
        let (first, n) = open_connection(uri, &opts, &target).await?;
        let mut conns = vec![first];
        let wanted = opts.connections.clamp(1, CONNECTIONS_MAX);
        if wanted > 1 {
            if n.transmission_flags & proto::TFLAG_CAN_MULTI_CONN == 0 {
                tracing::warn!(target: "blockio::client", server = %target, wanted, "server does not advertise NBD_FLAG_CAN_MULTI_CONN; using 1 connection, since several would not see each other's writes consistently");
            } else {
                let more = futures::future::join_all((1..wanted).map(|_| open_connection(uri, &opts, &target))).await;
                for r in more {
                    match r {
                        Ok((c, m))
                            if m.size == n.size
                                && m.transmission_flags == n.transmission_flags
                                && m.structured_replies == n.structured_replies
                                && context_names(&m) == context_names(&n) =>
                        {
                            conns.push(c)
                        }
                        Ok((c, _)) => {
                            tracing::warn!(target: "blockio::client", server = %target, "an extra connection negotiated differently from the first; not using it");
                            c.disconnect(Duration::ZERO).await;
                        }
                        Err(e) => {
                            tracing::warn!(target: "blockio::client", server = %target, error = %e, "could not open an extra connection; continuing with fewer");
                        }
                    }
                }
            }
        }
        Ok(NbdClient::from_parts(n, target, conns, &opts))
    }

    /// Handshake over an already-open stream (e.g. one the caller
    /// authenticated first). Always one connection.
    pub async fn connect_stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        mut stream: S,
        export: &str,
        opts: ClientOptions,
    ) -> Result<NbdClient, ClientError> {
        let target = format!("stream (export {export:?})");
        if opts.connections > 1 {
            tracing::info!(target: "blockio::client", server = %target, "connect_stream uses the one stream it is given; ignoring connections > 1");
        }
        let n = with_timeout(opts.connect_timeout, &target, negotiate(&mut stream, export, &opts, &target)).await?;
        let (r, w) = tokio::io::split(stream);
        let conn = Connection::start(r, w, target.clone(), n.structured_replies, n.contexts.clone(), None, None);
        Ok(NbdClient::from_parts(n, target, vec![conn], &opts))
    }

    fn from_parts(n: Negotiated, target: String, conns: Vec<Connection>, opts: &ClientOptions) -> NbdClient {
        let block_sizes = n.block_sizes.unwrap_or_default();
        let cap = block_sizes.maximum.min(limits::PAYLOAD_BYTES_MAX);
        let payload_bytes_max = (cap - cap % block_sizes.minimum).max(block_sizes.minimum);
        let contexts = n.contexts.iter().map(|(name, _)| name.clone()).collect();
        tracing::debug!(target: "blockio::client", server = %target, size = n.size, flags = n.transmission_flags, connections = conns.len(), structured = n.structured_replies, "NBD export connected");
        NbdClient {
            inner: Arc::new(Inner {
                info: ExportInfo {
                    name: n.name,
                    description: n.description,
                    size: n.size,
                    transmission_flags: n.transmission_flags,
                    block_sizes,
                },
                target,
                conns,
                contexts,
                request_timeout: opts
                    .request_timeout
                    .map(|after| RequestTimeout { after, closes_connection: opts.timeout_closes_connection }),
                payload_bytes_max,
                id: CLIENTS_CONNECTED.fetch_add(1, Ordering::Relaxed),
            }),
        }
    }

    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// The metadata contexts the server agreed to.
    pub fn meta_contexts(&self) -> Vec<String> {
        self.inner.contexts.clone()
    }

    /// How many connections are open (after the CAN_MULTI_CONN check).
    pub fn connection_count(&self) -> usize {
        self.inner.conns.len()
    }

    /// Requests submitted and not yet returned to their callers, over all
    /// connections (for metrics and tests).
    pub fn in_flight(&self) -> usize {
        self.inner.conns.iter().map(|c| c.outstanding()).sum()
    }

    /// Whether replies may be structured (sparse reads, block status).
    pub fn structured_replies(&self) -> bool {
        self.inner.conns[0].shared.structured_replies
    }

    /// Lists the server's exports as (name, description).
    pub async fn list_exports(uri: &NbdUri, connect_timeout: Duration) -> Result<Vec<(String, String)>, ClientError> {
        let target = uri.to_string();
        if uri.tls_required {
            return Err(ClientError::TlsUnsupported { uri: target });
        }
        with_timeout(connect_timeout, &target, async {
            match open_socket(uri, &target).await? {
                Socket::Tcp(mut s) => list_over(&mut s, &target).await,
                Socket::Unix(mut s) => list_over(&mut s, &target).await,
            }
        })
        .await
    }

    /// `NBD_CMD_DISC` on every connection once its in-flight requests have
    /// finished; later requests fail with `Shutdown`.
    pub async fn disconnect(&self) {
        futures::future::join_all(self.inner.conns.iter().map(|c| c.disconnect(DISCONNECT_DRAIN_MAX))).await;
    }

    /// The connection for the next request: the usable one with the fewest
    /// outstanding requests.
    fn pick(&self) -> Result<&Connection, IoError> {
        let conns = &self.inner.conns;
        if conns.len() == 1 {
            return Ok(&conns[0]);
        }
        conns
            .iter()
            .filter(|c| c.is_usable())
            .min_by_key(|c| c.outstanding())
            .ok_or_else(|| conns[0].unusable_reason().unwrap_or_else(|| IoError::shutdown("no usable connection")))
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Bytes,
        state: PendingState,
    ) -> Result<Reply, IoError> {
        let payload = Payload::Bytes(payload);
        self.pick()?.submit(command, flags, offset, length, payload, state, self.inner.request_timeout).await
    }

    fn check_io(&self, offset: u64, len: u64, write: bool) -> Result<(), IoError> {
        let info = &self.inner.info;
        if write && info.has(proto::TFLAG_READ_ONLY) {
            return Err(IoError::read_only());
        }
        check_range(offset, len, info.size)?;
        let min = info.block_sizes.minimum as u64;
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(IoError::invalid(format!(
                "offset {offset} length {len} is not aligned to {}'s minimum block size of {min} bytes",
                self.inner.target
            )));
        }
        Ok(())
    }

    async fn read_one(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let buf = BufferPool::global().take(len as usize);
        let asm = ReadAssembly { buf, covered_bytes: 0, ranges: Default::default(), splice: false };
        match self.request(proto::CMD_READ, 0, offset, len, Bytes::new(), PendingState::Read(asm)).await? {
            Reply::Data(b) => Ok(b),
            other => Err(IoError::io(format!("internal: READ completed with {other:?}"))),
        }
    }

    async fn write_one(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        let len = data.len() as u32;
        self.request(proto::CMD_WRITE, flags, offset, len, data, PendingState::Plain).await.map(|_| ())
    }

    /// FUA for a server without it: a flush after the write (said once).
    async fn emulate_fua(&self) -> Result<(), IoError> {
        if FUA_EMULATION_LOGGED.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::info!(target: "blockio::client", server = %self.inner.target, "server lacks FUA; emulating it with a flush");
        }
        self.flush().await
    }

    /// Splits `[offset, offset+len)` into pieces of at most the payload limit.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let step = self.inner.payload_bytes_max as u64;
        (0..len.div_ceil(step)).map(move |i| (offset + i * step, (len - i * step).min(step) as u32))
    }
}

async fn list_over<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: &str,
) -> Result<Vec<(String, String)>, ClientError> {
    let mut hs = Handshake::start(s, target).await?;
    let list = hs.list().await;
    hs.abort().await;
    list
}

static FUA_EMULATION_LOGGED: AtomicUsize = AtomicUsize::new(0);

#[async_trait]
impl BlockDevice for NbdClient {
    fn size(&self) -> u64 {
        self.inner.info.size
    }

    fn block_sizes(&self) -> BlockSizes {
        self.inner.info.block_sizes
    }

    fn is_read_only(&self) -> bool {
        self.inner.info.has(proto::TFLAG_READ_ONLY)
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.info.has(proto::TFLAG_CAN_MULTI_CONN)
    }

    fn can_trim(&self) -> bool {
        self.inner.info.has(proto::TFLAG_SEND_TRIM)
    }

    fn can_fast_zero(&self) -> bool {
        self.inner.info.has(proto::TFLAG_SEND_WRITE_ZEROES) && self.inner.info.has(proto::TFLAG_SEND_FAST_ZERO)
    }

    /// This client's number: a new connection is a new client.
    fn connection_epoch(&self) -> u64 {
        self.inner.id
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.inner.contexts.iter().filter(|c| c.as_str() != MetaContext::BASE_ALLOCATION).cloned().collect()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.check_io(offset, len as u64, false)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len <= self.inner.payload_bytes_max {
            return self.read_one(offset, len).await;
        }
        let parts =
            futures::future::try_join_all(self.pieces(offset, len as u64).map(|(o, l)| self.read_one(o, l))).await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    /// One request whose payload stays in pipes when the connection can
    /// splice and the server answers with the whole payload at once; bytes
    /// otherwise.
    async fn read_payload(&self, offset: u64, len: u32) -> Result<Payload, IoError> {
        let conn = self.pick()?;
        if len < SPLICE_BYTES_MIN || len > self.inner.payload_bytes_max || !conn.can_splice {
            return self.read(offset, len).await.map(Payload::Bytes);
        }
        self.check_io(offset, len as u64, false)?;
        let asm = ReadAssembly { buf: Vec::new(), covered_bytes: 0, ranges: Default::default(), splice: true };
        let state = PendingState::Read(asm);
        let none = Payload::Bytes(Bytes::new());
        match conn.submit(proto::CMD_READ, 0, offset, len, none, state, self.inner.request_timeout).await? {
            Reply::Pipe(chain) => Ok(Payload::Pipe(chain)),
            Reply::Data(bytes) => Ok(Payload::Bytes(bytes)),
            other => Err(IoError::io(format!("internal: READ completed with {other:?}"))),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.check_io(offset, data.len() as u64, true)?;
        if data.is_empty() {
            return Ok(());
        }
        let native_fua = fua && self.inner.info.has(proto::TFLAG_SEND_FUA);
        if data.len() <= self.inner.payload_bytes_max as usize {
            self.write_one(offset, data, native_fua).await?;
        } else {
            futures::future::try_join_all(self.pieces(offset, data.len() as u64).map(|(o, l)| {
                self.write_one(o, data.slice((o - offset) as usize..(o - offset) as usize + l as usize), native_fua)
            }))
            .await?;
        }
        if fua && !native_fua {
            self.emulate_fua().await?;
        }
        Ok(())
    }

    /// A payload in pipes goes to the socket with `splice(2)` when it fits
    /// one request and the connection can splice; otherwise it is copied.
    async fn write_payload(&self, offset: u64, data: Payload, fua: bool) -> Result<(), IoError> {
        let chain = match data {
            Payload::Bytes(data) => return self.write(offset, data, fua).await,
            Payload::Pipe(chain) => chain,
        };
        let conn = self.pick()?;
        let len = chain.len();
        if len == 0 || len > self.inner.payload_bytes_max as usize || !conn.can_splice_out {
            return self.write(offset, chain.into_write_data()?, fua).await;
        }
        self.check_io(offset, len as u64, true)?;
        let native_fua = fua && self.inner.info.has(proto::TFLAG_SEND_FUA);
        let flags = if native_fua { proto::CMD_FLAG_FUA } else { 0 };
        let (state, timeout) = (PendingState::Plain, self.inner.request_timeout);
        conn.submit(proto::CMD_WRITE, flags, offset, len as u32, Payload::Pipe(chain), state, timeout).await?;
        if fua && !native_fua {
            self.emulate_fua().await?;
        }
        Ok(())
    }

    fn wants_write_pipe(&self, _offset: u64, len: u32) -> bool {
        len >= SPLICE_BYTES_MIN && len <= self.inner.payload_bytes_max
    }

    async fn flush(&self) -> Result<(), IoError> {
        if !self.inner.info.has(proto::TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(proto::CMD_FLUSH, 0, 0, 0, Bytes::new(), PendingState::Plain).await.map(|_| ())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.check_io(offset, len as u64, true)?;
        if len == 0 || !self.can_trim() {
            return Ok(());
        }
        let flags = if fua && self.inner.info.has(proto::TFLAG_SEND_FUA) { proto::CMD_FLAG_FUA } else { 0 };
        self.request(proto::CMD_TRIM, flags, offset, len, Bytes::new(), PendingState::Plain).await?;
        if fua && flags == 0 {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, zf: ZeroFlags) -> Result<(), IoError> {
        self.check_io(offset, len as u64, true)?;
        if len == 0 {
            return Ok(());
        }
        let info = &self.inner.info;
        if zf.fast_only && !self.can_fast_zero() {
            return Err(IoError::not_supported(format!("{} cannot promise fast zeroing", self.inner.target)));
        }
        if !info.has(proto::TFLAG_SEND_WRITE_ZEROES) {
            // Emulate with plain writes of zeroes.
            let step = (ZEROES_BYTES as u64).min(self.inner.payload_bytes_max as u64);
            let (end, mut o) = (offset + len as u64, offset);
            let mut writes = Vec::new();
            while o < end {
                let l = (end - o).min(step) as usize;
                writes.push(self.write_one(o, Bytes::from_static(&ZEROES[..l]), false));
                o += l as u64;
            }
            futures::future::try_join_all(writes).await?;
            if zf.fua {
                self.flush().await?;
            }
            return Ok(());
        }
        let native_fua = zf.fua && info.has(proto::TFLAG_SEND_FUA);
        let mut flags = 0;
        if native_fua {
            flags |= proto::CMD_FLAG_FUA;
        }
        if !zf.may_trim {
            flags |= proto::CMD_FLAG_NO_HOLE;
        }
        if zf.fast_only {
            flags |= proto::CMD_FLAG_FAST_ZERO;
        }
        self.request(proto::CMD_WRITE_ZEROES, flags, offset, len, Bytes::new(), PendingState::Plain).await?;
        if zf.fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.check_io(offset, len as u64, false)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let conn = self.pick()?;
        let Some(context_id) = conn.shared.context_id(context.name()) else {
            return Err(IoError::not_supported(format!(
                "{}: metadata context {} was not negotiated (server agreed to: {:?})",
                self.inner.target,
                context.name(),
                self.inner.contexts
            )));
        };
        let state = PendingState::Status { context_id, extents: None };
        match conn
            .submit(
                proto::CMD_BLOCK_STATUS,
                0,
                offset,
                len,
                Payload::Bytes(Bytes::new()),
                state,
                self.inner.request_timeout,
            )
            .await?
        {
            Reply::Status(v) => Ok(v),
            other => Err(IoError::io(format!("internal: BLOCK_STATUS completed with {other:?}"))),
        }
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.check_io(offset, len as u64, false)?;
        if len == 0 || !self.inner.info.has(proto::TFLAG_SEND_CACHE) {
            return Ok(());
        }
        self.request(proto::CMD_CACHE, 0, offset, len, Bytes::new(), PendingState::Plain).await.map(|_| ())
    }
}
