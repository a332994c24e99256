//! The transmission phase: read requests, run them concurrently, reply.
//!
//! Why this shape: the connection task polls two things at once, the
//! request stream (decode a header, take in-flight budget, read a write's
//! payload) and the set of running handlers. Handlers run on the same task
//! (most complete on their first poll, and a device that blocks spawns its
//! own work), and so does the reply writer ([`super::reply`]): one task per
//! connection, no task hop (and no cross-thread wake-up) per request. The
//! request stream and the writer are persistent futures, so switching
//! between them never loses half-read or half-written bytes.
//!
//! Validation happens before the device is called, so a device only sees
//! requests within its range and the client gets the errno the spec
//! prescribes for each mistake.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::{Either, FutureExt};
use futures::stream::{self, FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, trace, warn};

use super::handshake::{payload_bytes_max, Negotiated};
use super::reply::{write_replies, Frame, InFlight};
use super::{ServerConfig, ServerError};
use crate::buffer_pool::BufferPool;
use crate::device::{BlockDevice, MetaContext, ZeroFlags};
use crate::error::IoError;
use crate::proto::{self, errno, limits, RequestHeader, REQUEST_HEADER_BYTES};
use crate::splice::{Payload, SpliceSocket, SPLICE_BYTES_MIN};

/// Requests at least this long run on their own task, so several large
/// copies proceed on several threads; smaller ones run inline, where a
/// spawn would cost more than it saves.
const SPAWN_BYTES_MIN: u32 = 256 * 1024;

/// After a write payload at least this long, the next request header is
/// read on its own (see `ReadState::exact_header`).
pub(super) const EXACT_HEADER_PAYLOAD_MIN: u32 = 128 * 1024;

/// A write payload goes into pipes only while the process has fewer pipes
/// in payloads than this (each is two descriptors; an agent run by systemd
/// may have 1024): above it, payloads are read into memory.
const WRITE_PIPES_IN_USE_MAX: usize = 128;

/// Spec: servers SHOULD NOT send more than 2^20 extents in one chunk.
const STATUS_EXTENTS_MAX: usize = 1 << 20;

/// What a connection serves and agreed on, shared by its handlers.
pub(super) struct Conn {
    device: Arc<dyn BlockDevice>,
    size: u64,
    read_only: bool,
    structured: bool,
    contexts: Vec<(u32, MetaContext)>,
    flags: u16,
    minimum: u64,
    payload_bytes_max: u32,
    /// Large read payloads may come back in pipes: the reply writer can
    /// splice them into the socket.
    splice_out: bool,
}

/// A decoded request with its payload and budget.
struct Request {
    header: RequestHeader,
    payload: Payload,
    permit: InFlight,
}

enum Incoming {
    Request(Request),
    /// `NBD_CMD_DISC`, or the client closed the socket between requests.
    Done,
}

/// Where write payloads go into pipes: a further registration of the
/// connection's socket, made at the first payload the device wants in pipes
/// (one made for every connection would see every request's readiness
/// event for nothing).
struct SpliceIn<R> {
    register: Option<fn(&R) -> Option<SpliceSocket>>,
    socket: Option<SpliceSocket>,
    device: Arc<dyn BlockDevice>,
}

impl<R> SpliceIn<R> {
    /// Whether the socket can be (or already is) registered for splicing.
    fn available(&self) -> bool {
        self.socket.is_some() || self.register.is_some()
    }

    fn socket(&mut self, reader: &R) -> Option<&SpliceSocket> {
        if self.socket.is_none() {
            // A failed registration is not tried again: payloads are copied.
            self.socket = self.register.take().and_then(|register| register(reader));
        }
        self.socket.as_ref()
    }
}

struct ReadState<R> {
    reader: BufReader<R>,
    /// The last request carried a large payload: read the next header
    /// alone, so the buffer does not swallow (and make us copy) the start
    /// of the next payload too.
    exact_header: bool,
    /// Write payloads the device only passes on are taken from the socket
    /// into pipes ([`BlockDevice::wants_write_pipe`]).
    splice_in: SpliceIn<R>,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    bytes_max: usize,
}

pub(super) async fn run<R, W>(
    reader: BufReader<R>,
    writer: W,
    negotiated: Negotiated,
    config: &ServerConfig,
    stop: Option<watch::Receiver<bool>>,
    splice: Option<SpliceSocket>,
    splice_in: Option<fn(&R) -> Option<SpliceSocket>>,
) -> Result<(), ServerError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn::new(negotiated);
    conn.splice_out = splice.is_some();
    let conn = Arc::new(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    // Polled by this task, not spawned: no cross-thread hop per reply.
    let writer_task = write_replies(writer, rx, splice);
    tokio::pin!(writer_task);

    let bytes_max = config.in_flight_bytes_max.clamp(1, u32::MAX as usize);
    let state = ReadState {
        reader,
        exact_header: false,
        splice_in: SpliceIn { register: splice_in, socket: None, device: conn.device.clone() },
        requests: Arc::new(Semaphore::new(config.requests_in_flight_max.max(1))),
        bytes: Arc::new(Semaphore::new(bytes_max)),
        bytes_max,
    };
    let requests = stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let item = next_request(&mut state).await;
        let more = matches!(item, Ok(Incoming::Request(_)));
        Some((item, if more { Some(state) } else { None }))
    });
    tokio::pin!(requests);

    let mut handlers = FuturesUnordered::new();
    let mut reading = true;
    let mut error = None;
    let mut stop = stop;
    let mut revocation = conn.device.revoked();
    let mut revoked = false;
    loop {
        tokio::select! {
            // Order matters: finish handlers, then read every request already
            // buffered, and only then write, so replies batch up.
            biased;
            Some(()) = handlers.next(), if !handlers.is_empty() => {}
            item = requests.next(), if reading => match item {
                Some(Ok(Incoming::Request(req))) => {
                    let served = crate::park_poll::InFlight::served();
                    if req.header.length >= SPAWN_BYTES_MIN {
                        // Big copies run on other worker threads in parallel.
                        let task = tokio::spawn(handle(conn.clone(), req, tx.clone()));
                        handlers.push(Either::Right(task.map(move |_| drop(served))));
                    } else {
                        handlers.push(Either::Left(handle(conn.clone(), req, tx.clone()).map(move |()| drop(served))));
                    }
                }
                Some(Ok(Incoming::Done)) | None => reading = false,
                Some(Err(e)) => {
                    error = Some(e);
                    reading = false;
                }
            },
            _ = stopped(&mut stop), if reading => {
                debug!("server shutting down: finishing in-flight requests");
                reading = false;
            }
            _ = stopped(&mut revocation), if reading => {
                debug!("export revoked for this connection: finishing in-flight requests, then closing");
                reading = false;
                revoked = true;
            }
            finished = &mut writer_task => {
                // The writer only ends early when the socket failed.
                return Err(match finished {
                    Err(e) => e,
                    Ok(()) => ServerError::WriterFailed("it stopped while replies were pending".into()),
                });
            }
        }
        if !reading && handlers.is_empty() {
            break;
        }
    }
    drop(handlers);
    drop(tx);
    if revoked {
        // Every request it sent has finished at the device; its replies are
        // not waited for (a stopped client could hold the socket forever).
        return Ok(());
    }
    let written = writer_task.await;
    match error {
        Some(e) => Err(e),
        None => written,
    }
}

/// Resolves when the server asks connections to stop; never without a signal.
pub(super) async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    if let Some(rx) = stop {
        loop {
            if *rx.borrow_and_update() {
                return;
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
    std::future::pending::<()>().await
}

async fn next_request<R: AsyncRead + Unpin>(st: &mut ReadState<R>) -> Result<Incoming, ServerError> {
    let mut raw = [0u8; REQUEST_HEADER_BYTES];
    // A clean EOF between requests is a (rude but harmless) disconnect.
    let first = if st.exact_header && st.reader.buffer().is_empty() {
        st.reader.get_mut().read(&mut raw).await
    } else {
        st.reader.read(&mut raw).await
    }
    .map_err(ServerError::io("reading a request header"))?;
    if first == 0 {
        debug!("client closed the connection without NBD_CMD_DISC");
        return Ok(Incoming::Done);
    }
    st.reader.read_exact(&mut raw[first..]).await.map_err(ServerError::io("reading a request header"))?;
    let Some((header, payload_len)) = decode_header(&raw)? else {
        return Ok(Incoming::Done);
    };
    // Budget: write payloads now, read data until its reply is written.
    let cost = match header.command {
        proto::CMD_WRITE => payload_len,
        proto::CMD_READ => header.length.min(limits::PAYLOAD_BYTES_MAX),
        _ => 0,
    };
    let closed = |_| ServerError::WriterFailed("in-flight budget closed".into());
    let request_permit = st.requests.clone().acquire_owned().await.map_err(closed)?;
    let bytes_permit = if cost > 0 {
        let n = (cost as usize).min(st.bytes_max) as u32;
        Some(st.bytes.clone().acquire_many_owned(n).await.map_err(closed)?)
    } else {
        None
    };
    let piped = payload_len >= SPLICE_BYTES_MIN
        && st.reader.buffer().is_empty()
        && st.splice_in.available()
        && crate::splice::pipes_in_use() < WRITE_PIPES_IN_USE_MAX
        && st.splice_in.device.wants_write_pipe(header.offset, payload_len);
    let payload = if let Some(socket) = piped.then(|| st.splice_in.socket(st.reader.get_ref())).flatten() {
        Payload::Pipe(socket.splice_in(payload_len as usize).await.map_err(ServerError::io("reading a write payload"))?)
    } else if payload_len > 0 {
        let pool = BufferPool::global();
        let mut buf = pool.take(payload_len as usize);
        while buf.len() < payload_len as usize {
            let want = (payload_len as usize - buf.len()) as u64;
            // Bytes already buffered first; the rest straight from the
            // socket into the payload, never through the buffer.
            let n = if st.reader.buffer().is_empty() {
                st.reader.get_mut().take(want).read_buf(&mut buf).await
            } else {
                (&mut st.reader).take(want).read_buf(&mut buf).await
            }
            .map_err(ServerError::io("reading a write payload"))?;
            if n == 0 {
                return Err(ServerError::Io {
                    context: "reading a write payload",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
        Payload::Bytes(pool.freeze(buf))
    } else {
        Payload::Bytes(Bytes::new())
    };
    st.exact_header = payload_len >= EXACT_HEADER_PAYLOAD_MIN;
    Ok(Incoming::Request(Request {
        header,
        payload,
        permit: InFlight { _request: request_permit, _bytes: bytes_permit },
    }))
}

/// Decodes a request header: `None` for `NBD_CMD_DISC`, else the header and
/// the length of the payload that follows it (refused above the maximum).
pub(super) fn decode_header(raw: &[u8; REQUEST_HEADER_BYTES]) -> Result<Option<(RequestHeader, u32)>, ServerError> {
    let header = RequestHeader::decode(raw).map_err(|magic| ServerError::BadRequestMagic { magic })?;
    trace!(?header, command = proto::command_name(header.command), "request");
    if header.command == proto::CMD_DISC {
        debug!("client sent NBD_CMD_DISC");
        return Ok(None);
    }
    let payload_len = if header.command == proto::CMD_WRITE { header.length } else { 0 };
    if payload_len > limits::PAYLOAD_BYTES_MAX {
        return Err(ServerError::PayloadTooLarge {
            command: proto::command_name(header.command),
            length: payload_len,
            max: limits::PAYLOAD_BYTES_MAX,
        });
    }
    Ok(Some((header, payload_len)))
}

fn err(code: u32, message: impl Into<String>) -> (u32, String) {
    (code, message.into())
}

impl Conn {
    pub(super) fn new(negotiated: Negotiated) -> Conn {
        let export = &negotiated.export;
        Conn {
            device: export.device.clone(),
            size: export.device.size(),
            read_only: export.is_read_only(),
            structured: negotiated.structured,
            contexts: negotiated.contexts,
            flags: negotiated.flags,
            minimum: export.device.block_sizes().minimum.max(1) as u64,
            payload_bytes_max: payload_bytes_max(&negotiated.export),
            splice_out: false,
        }
    }

    /// The device's revocation signal, if it has one.
    pub(super) fn revoked(&self) -> Option<watch::Receiver<bool>> {
        self.device.revoked()
    }

    /// Checks a request against the spec and the negotiated features.
    /// Returns the NBD errno and a message for the client.
    fn validate(&self, h: &RequestHeader) -> Result<(), (u32, String)> {
        let name = proto::command_name(h.command);
        let mut allowed = proto::CMD_FLAG_FUA;
        match h.command {
            proto::CMD_READ if self.structured => allowed |= proto::CMD_FLAG_DF,
            proto::CMD_WRITE_ZEROES => {
                allowed |= proto::CMD_FLAG_NO_HOLE;
                if self.flags & proto::TFLAG_SEND_FAST_ZERO != 0 {
                    allowed |= proto::CMD_FLAG_FAST_ZERO;
                }
            }
            proto::CMD_BLOCK_STATUS => allowed |= proto::CMD_FLAG_REQ_ONE,
            proto::CMD_READ | proto::CMD_WRITE | proto::CMD_FLUSH | proto::CMD_TRIM | proto::CMD_CACHE => {}
            _ => return Err(err(errno::EINVAL, format!("unknown command {}", h.command))),
        }
        if h.flags & !allowed != 0 {
            return Err(err(errno::EINVAL, format!("flags {:#x} are not valid for {name}", h.flags & !allowed)));
        }
        if h.command == proto::CMD_FLUSH {
            return Ok(());
        }
        let writes = matches!(h.command, proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES);
        if writes && self.read_only {
            return Err(err(errno::EPERM, "the export is read-only"));
        }
        if h.command == proto::CMD_TRIM && self.flags & proto::TFLAG_SEND_TRIM == 0 {
            return Err(err(errno::EINVAL, "TRIM was not advertised for this export"));
        }
        if !h.offset.is_multiple_of(self.minimum) || !(h.length as u64).is_multiple_of(self.minimum) {
            let msg = format!("{name} at {} length {} is not aligned to {} bytes", h.offset, h.length, self.minimum);
            return Err(err(errno::EINVAL, msg));
        }
        if matches!(h.command, proto::CMD_READ | proto::CMD_WRITE) && h.length > self.payload_bytes_max {
            let msg =
                format!("{name} of {} bytes exceeds the {}-byte maximum payload", h.length, self.payload_bytes_max);
            return Err(err(errno::EINVAL, msg));
        }
        let in_range = h.offset.checked_add(h.length as u64).is_some_and(|end| end <= self.size);
        if !in_range {
            // Spec, "Error values": ENOSPC for writes past the end, EINVAL otherwise.
            let code = if matches!(h.command, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            let msg = format!("{name} at {} length {} is beyond the {}-byte export", h.offset, h.length, self.size);
            return Err(err(code, msg));
        }
        if h.command == proto::CMD_BLOCK_STATUS {
            if self.contexts.is_empty() {
                return Err(err(errno::EINVAL, "BLOCK_STATUS needs a metadata context selected during the handshake"));
            }
            if h.length == 0 {
                return Err(err(errno::EINVAL, "BLOCK_STATUS of length 0"));
            }
        }
        Ok(())
    }

    fn error_frame(&self, cookie: u64, code: u32, message: &str) -> Frame {
        if self.structured {
            Frame::error(cookie, code, message)
        } else {
            Frame::simple(cookie, code, Bytes::new())
        }
    }
}

/// Runs one request and queues its reply.
async fn handle(conn: Arc<Conn>, req: Request, tx: mpsc::UnboundedSender<Frame>) {
    let mut frames = respond(&conn, &req.header, req.payload).await;
    if let Some(last) = frames.last_mut() {
        last.permit = Some(req.permit);
    }
    for f in frames {
        // Fails only if the writer is gone, which the connection loop sees.
        let _ = tx.send(f);
    }
}

/// Validates and runs one request; returns its reply frames.
pub(super) async fn respond(conn: &Conn, h: &RequestHeader, payload: Payload) -> Vec<Frame> {
    match conn.validate(h) {
        Ok(()) => execute(conn, h, payload).await,
        Err((code, message)) => {
            debug!(command = proto::command_name(h.command), code, %message, "refusing request");
            vec_one(conn.error_frame(h.cookie, code, &message))
        }
    }
}

fn vec_one(f: Frame) -> Vec<Frame> {
    vec![f]
}

fn io_error_frames(conn: &Conn, cookie: u64, command: u16, e: IoError) -> Vec<Frame> {
    warn!(command = proto::command_name(command), error = %e, "device request failed");
    vec_one(conn.error_frame(cookie, e.kind.nbd_code(), &e.message))
}

async fn execute(conn: &Conn, h: &RequestHeader, payload: Payload) -> Vec<Frame> {
    let dev = &conn.device;
    let fua = h.flags & proto::CMD_FLAG_FUA != 0;
    let done = |r: Result<(), IoError>| match r {
        Ok(()) => vec_one(Frame::simple(h.cookie, 0, Bytes::new())),
        Err(e) => io_error_frames(conn, h.cookie, h.command, e),
    };
    match h.command {
        proto::CMD_READ => {
            if h.length == 0 {
                return vec_one(if conn.structured {
                    Frame::none(h.cookie)
                } else {
                    Frame::simple(h.cookie, 0, Bytes::new())
                });
            }
            let read = if conn.splice_out && h.length >= SPLICE_BYTES_MIN {
                dev.read_payload(h.offset, h.length).await
            } else {
                dev.read(h.offset, h.length).await.map(Payload::Bytes)
            };
            match read {
                Ok(data) if data.len() == h.length as usize => vec_one(if conn.structured {
                    Frame::offset_data(h.cookie, h.offset, data, true)
                } else {
                    Frame::simple_data(h.cookie, data)
                }),
                Ok(data) => {
                    let msg = format!("device returned {} bytes for a {}-byte read", data.len(), h.length);
                    io_error_frames(conn, h.cookie, h.command, IoError::io(msg))
                }
                Err(e) => io_error_frames(conn, h.cookie, h.command, e),
            }
        }
        proto::CMD_WRITE => {
            if h.length == 0 {
                return done(Ok(()));
            }
            done(match payload {
                Payload::Bytes(data) => dev.write(h.offset, data, fua).await,
                piped => dev.write_payload(h.offset, piped, fua).await,
            })
        }
        proto::CMD_FLUSH => done(dev.flush().await),
        proto::CMD_TRIM => {
            if h.length == 0 {
                return done(Ok(()));
            }
            done(dev.trim(h.offset, h.length, fua).await)
        }
        proto::CMD_WRITE_ZEROES => {
            if h.length == 0 {
                return done(Ok(()));
            }
            let flags = ZeroFlags {
                fua,
                may_trim: h.flags & proto::CMD_FLAG_NO_HOLE == 0,
                fast_only: h.flags & proto::CMD_FLAG_FAST_ZERO != 0,
            };
            done(dev.write_zeroes(h.offset, h.length, flags).await)
        }
        proto::CMD_CACHE => {
            if h.length == 0 {
                return done(Ok(()));
            }
            done(dev.cache(h.offset, h.length).await)
        }
        proto::CMD_BLOCK_STATUS => block_status(conn, h).await,
        _ => vec_one(conn.error_frame(h.cookie, errno::EINVAL, "unknown command")),
    }
}

async fn block_status(conn: &Conn, h: &RequestHeader) -> Vec<Frame> {
    let req_one = h.flags & proto::CMD_FLAG_REQ_ONE != 0;
    // Largest descriptor length that fits u32 and keeps block alignment.
    let length_max = (u32::MAX as u64 / conn.minimum) * conn.minimum;
    let mut frames = Vec::with_capacity(conn.contexts.len());
    for (i, (id, ctx)) in conn.contexts.iter().enumerate() {
        let extents = match conn.device.block_status(ctx, h.offset, h.length).await {
            Ok(e) => e,
            Err(e) => return io_error_frames(conn, h.cookie, h.command, e),
        };
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(extents.len().min(1024));
        let mut covered = 0u64;
        for e in extents.iter().filter(|e| e.length > 0) {
            if covered >= h.length as u64 || out.len() >= STATUS_EXTENTS_MAX {
                break;
            }
            let mut length = e.length.min(length_max);
            if req_one {
                length = length.min(h.length as u64);
            }
            out.push((length as u32, e.flags));
            covered += length;
            if req_one {
                break;
            }
        }
        if out.is_empty() {
            let msg = format!("device reported no extents for {} at {}", ctx.name(), h.offset);
            return io_error_frames(conn, h.cookie, h.command, IoError::io(msg));
        }
        frames.push(Frame::block_status(h.cookie, *id, &out, i + 1 == conn.contexts.len()));
    }
    frames
}
