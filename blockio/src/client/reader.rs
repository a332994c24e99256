//! The reader task: parses simple and structured replies and completes the
//! matching requests.
//!
//! Why it is paranoid: everything here comes from the network. Each length
//! is checked against the request it answers before a byte is read, read
//! data only ever lands inside the buffer the request itself sized, and any
//! violation (bad magic, unknown cookie, a chunk outside the request or
//! overlapping an earlier one, a chunk type that makes no sense for the
//! command) is a protocol error: the spec says to hard-disconnect, because
//! the stream can no longer be trusted, so the connection fails and every
//! request on it gets the error. Nothing the server sends can panic us.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::connection::{ConnShared, Pending, PendingState, ReadAssembly, Reply};
use crate::buffer_pool::BufferPool;
use crate::device::StatusExtent;
use crate::error::{IoError, IoErrorKind};
use crate::proto::{self, limits, ReplyHeader};
use crate::splice::SpliceSocket;

/// Receive buffer: replies to a deep queue of small reads arrive in one
/// syscall; large payloads bypass it.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Longest payload accepted for an error chunk of a type we do not know.
const UNKNOWN_ERROR_CHUNK_BYTES_MAX: u32 = 64 * 1024;
/// Spec: servers SHOULD NOT send more extents than this in one chunk.
const STATUS_EXTENTS_MAX: u64 = 1 << 20;

enum Fault {
    /// The server broke the protocol: drop the connection.
    Protocol(String),
    Io(io::Error),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Fault {
        Fault::Io(e)
    }
}

fn violation<T>(msg: impl Into<String>) -> Result<T, Fault> {
    Err(Fault::Protocol(msg.into()))
}

pub(crate) async fn reader_loop<R: AsyncRead + Unpin>(rd: R, shared: Arc<ConnShared>, splice: Option<SpliceSocket>) {
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let fault = loop {
        if let Some(socket) = &splice {
            match next_spliced(&mut rd, &shared, socket).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(f) => break f,
            }
        }
        if let Err(f) = read_one(&mut rd, &shared).await {
            break f;
        }
    };
    let err = match fault {
        Fault::Protocol(msg) => {
            tracing::error!(target: "blockio::client", server = %shared.target, "NBD protocol violation: {msg}; dropping the connection");
            IoError::io(format!("{}: protocol error from the server: {msg} (connection dropped)", shared.target))
        }
        Fault::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            let g = shared.inflight.lock().unwrap();
            let msg = if g.closing && g.map.is_empty() {
                format!("disconnected from {}", shared.target)
            } else {
                format!("{} closed the connection", shared.target)
            };
            IoError::shutdown(msg)
        }
        Fault::Io(e) => IoError::shutdown(format!("reading from {} failed: {e}", shared.target)),
    };
    shared.fail(err);
}

fn take(shared: &ConnShared, cookie: u64) -> Result<Pending, Fault> {
    match shared.inflight.lock().unwrap().map.remove(&cookie) {
        Some(p) => Ok(p),
        None => violation(format!("reply for unknown cookie {cookie:#x}")),
    }
}

fn server_error(shared: &ConnShared, p: &Pending, code: u32, message: &str) -> IoError {
    let kind = IoErrorKind::from_nbd_code(code);
    let detail = if message.is_empty() { format!("error {code}") } else { format!("error {code}: {message}") };
    IoError::new(
        kind,
        format!(
            "{}: server failed {} at offset {} length {}: {detail}",
            shared.target,
            proto::command_name(p.command),
            p.offset,
            p.length
        ),
    )
}

fn complete(shared: &Arc<ConnShared>, p: Pending, result: Result<Reply, IoError>) {
    if let Err(e) = &result {
        if e.kind == IoErrorKind::Shutdown {
            shared.server_shutting_down();
        }
    }
    let _ = p.tx.send(result);
    shared.after_completion();
}

/// On a connection that can splice: waits until the next reply starts to
/// arrive or a read that may be spliced is sent, whichever is first. While
/// such a read waits and nothing is buffered, the next reply's header is
/// looked at on the socket, before the buffered reader could swallow part
/// of its payload. Returns whether a reply was handled here.
async fn next_spliced<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    shared: &Arc<ConnShared>,
    socket: &SpliceSocket,
) -> Result<bool, Fault> {
    loop {
        if !rd.buffer().is_empty() {
            return Ok(false);
        }
        if shared.splice_reads.load(Ordering::Relaxed) > 0 {
            return spliced_reply(socket, shared).await;
        }
        let submitted = shared.splice_submitted.notified();
        tokio::select! {
            biased;
            filled = rd.fill_buf() => {
                // Bytes (or the end of the stream) for the buffered path.
                filled?;
                return Ok(false);
            }
            () = submitted => {}
        }
    }
}

/// If the reply whose header waits on the socket answers a read that may
/// be spliced with its whole payload at once, consumes the header, moves
/// the payload into pipes and completes the read. Otherwise consumes
/// nothing and returns false: the buffered path reads the reply (and
/// checks it).
async fn spliced_reply(socket: &SpliceSocket, shared: &Arc<ConnShared>) -> Result<bool, Fault> {
    const HEAD: usize = proto::STRUCTURED_REPLY_HEADER_BYTES + 8;
    let mut h = [0u8; HEAD];
    let seen = socket.peek(&mut h).await?;
    if seen < proto::SIMPLE_REPLY_HEADER_BYTES {
        return Ok(false);
    }
    let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
    // (cookie, header bytes, the data chunk's offset and length if structured)
    let (cookie, head_bytes, chunk) = match magic {
        proto::SIMPLE_REPLY_MAGIC if !shared.structured_replies => {
            let hdr = ReplyHeader::decode_simple(h[..proto::SIMPLE_REPLY_HEADER_BYTES].try_into().unwrap());
            if hdr.error != 0 {
                return Ok(false);
            }
            (hdr.cookie, proto::SIMPLE_REPLY_HEADER_BYTES, None)
        }
        proto::STRUCTURED_REPLY_MAGIC if shared.structured_replies && seen == HEAD => {
            let hdr = ReplyHeader::decode_structured(h[..proto::STRUCTURED_REPLY_HEADER_BYTES].try_into().unwrap());
            if hdr.reply_type != proto::REPLY_TYPE_OFFSET_DATA || hdr.flags & proto::REPLY_FLAG_DONE == 0 {
                return Ok(false);
            }
            let offset = u64::from_be_bytes(h[proto::STRUCTURED_REPLY_HEADER_BYTES..].try_into().unwrap());
            (hdr.cookie, HEAD, Some((offset, hdr.length as u64)))
        }
        _ => return Ok(false),
    };
    let p = {
        let mut g = shared.inflight.lock().unwrap();
        let whole = |p: &Pending| {
            p.splice
                && !p.chunks_seen
                && p.command == proto::CMD_READ
                && chunk.is_none_or(|(offset, len)| offset == p.offset && len == 8 + p.length as u64)
        };
        match g.map.get(&cookie) {
            Some(p) if whole(p) => g.map.remove(&cookie).expect("just looked up"),
            _ => return Ok(false),
        }
    };
    let moved = async {
        socket.recv_exact(&mut h[..head_bytes]).await?;
        socket.splice_in(p.length as usize).await
    };
    match moved.await {
        Ok(chain) => {
            complete(shared, p, Ok(Reply::Pipe(chain)));
            Ok(true)
        }
        Err(e) => {
            let err = IoError::shutdown(format!("reading from {} failed: {e}", shared.target));
            complete(shared, p, Err(err));
            Err(Fault::Io(e))
        }
    }
}

/// A read that was to be spliced but is copied after all gets its buffer.
fn ensure_buffer(asm: &mut ReadAssembly, length: u32) {
    if asm.buf.capacity() < length as usize {
        asm.buf = BufferPool::global().take(length as usize);
    }
}

/// Reads and dispatches one reply message (a simple reply or one chunk).
async fn read_one<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, shared: &Arc<ConnShared>) -> Result<(), Fault> {
    let mut h = [0u8; proto::STRUCTURED_REPLY_HEADER_BYTES];
    rd.read_exact(&mut h[..proto::SIMPLE_REPLY_HEADER_BYTES]).await?;
    let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
    match magic {
        proto::SIMPLE_REPLY_MAGIC => {
            let hdr = ReplyHeader::decode_simple(h[..proto::SIMPLE_REPLY_HEADER_BYTES].try_into().unwrap());
            let mut p = take(shared, hdr.cookie)?;
            if p.chunks_seen {
                return violation(format!("simple reply for cookie {:#x} after structured chunks", hdr.cookie));
            }
            if hdr.error != 0 {
                // Tolerated even for reads under structured replies: an
                // error carries no payload, so the stream stays in sync.
                let e = server_error(shared, &p, hdr.error, "");
                complete(shared, p, Err(e));
                return Ok(());
            }
            match p.command {
                proto::CMD_READ => {
                    if shared.structured_replies {
                        return violation("simple reply with data to a READ after structured replies were negotiated");
                    }
                    let PendingState::Read(asm) = &mut p.state else {
                        return violation("internal: read without a buffer");
                    };
                    let n = p.length as usize;
                    ensure_buffer(asm, p.length);
                    read_into(rd, asm, 0, n).await?;
                    asm.covered_bytes = n as u64;
                    let data = finish_read(asm, p.length);
                    complete(shared, p, Ok(Reply::Data(data)));
                }
                proto::CMD_BLOCK_STATUS => {
                    return violation("simple success reply to BLOCK_STATUS (it must be structured)");
                }
                _ => complete(shared, p, Ok(Reply::Done)),
            }
            Ok(())
        }
        proto::STRUCTURED_REPLY_MAGIC => {
            if !shared.structured_replies {
                return violation("structured reply although structured replies were not negotiated");
            }
            rd.read_exact(&mut h[proto::SIMPLE_REPLY_HEADER_BYTES..]).await?;
            let hdr = ReplyHeader::decode_structured(&h);
            let mut p = take(shared, hdr.cookie)?;
            p.chunks_seen = true;
            chunk(rd, shared, &mut p, hdr.reply_type, hdr.length).await?;
            if hdr.flags & proto::REPLY_FLAG_DONE != 0 {
                let result = finish(shared, &mut p);
                complete(shared, p, result);
            } else {
                if hdr.reply_type == proto::REPLY_TYPE_NONE {
                    return violation("NBD_REPLY_TYPE_NONE without the DONE flag");
                }
                shared.reinsert(hdr.cookie, p);
            }
            Ok(())
        }
        other => violation(format!("bad reply magic {other:#010x}")),
    }
}

/// The result of a structured reply once its DONE chunk arrived.
fn finish(shared: &ConnShared, p: &mut Pending) -> Result<Reply, IoError> {
    if let Some(e) = p.error.take() {
        return Err(e);
    }
    match &mut p.state {
        PendingState::Plain => Ok(Reply::Done),
        PendingState::Read(asm) => {
            if asm.covered_bytes != p.length as u64 {
                return Err(IoError::io(format!(
                    "{}: server's reply to READ at offset {} length {} described only {} bytes",
                    shared.target, p.offset, p.length, asm.covered_bytes
                )));
            }
            Ok(Reply::Data(finish_read(asm, p.length)))
        }
        PendingState::Status { extents, .. } => match extents.take() {
            Some(v) => Ok(Reply::Status(v)),
            None => Err(IoError::io(format!(
                "{}: server's reply to BLOCK_STATUS at offset {} had no extents for the requested context",
                shared.target, p.offset
            ))),
        },
    }
}

fn finish_read(asm: &mut ReadAssembly, length: u32) -> Bytes {
    let mut buf = std::mem::take(&mut asm.buf);
    // Anything not yet materialized is the tail of holes.
    buf.resize(length as usize, 0);
    BufferPool::global().freeze(buf)
}

/// Reads `n` bytes into the assembly at relative offset `rel`.
async fn read_into<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    asm: &mut ReadAssembly,
    rel: usize,
    n: usize,
) -> io::Result<()> {
    let filled = asm.buf.len();
    if rel >= filled {
        // Zero the gap (a hole or a chunk still to come), then append
        // straight into the spare capacity: no zeroing of data we are
        // about to overwrite.
        asm.buf.resize(rel, 0);
        let mut remaining = n;
        while remaining > 0 {
            let got = (&mut *rd).take(remaining as u64).read_buf(&mut asm.buf).await?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            remaining -= got;
        }
        Ok(())
    } else {
        // A chunk earlier than one already placed: its range is a
        // zero-filled gap below `filled` (checked non-overlapping).
        match asm.buf.get_mut(rel..rel + n) {
            Some(dst) => rd.read_exact(dst).await.map(|_| ()),
            None => Err(io::Error::other("chunk placement outside the materialized buffer")),
        }
    }
}

/// Claims `[rel, rel+n)` of a read for one content chunk; errors if it
/// overlaps an earlier chunk.
fn claim(asm: &mut ReadAssembly, rel: u64, n: u64, total: u64) -> Result<(), Fault> {
    if asm.covered_bytes + n > total {
        return violation("content chunks overlap");
    }
    if asm.covered_bytes == 0 && n == total {
        asm.covered_bytes = n;
        return Ok(());
    }
    let end = rel + n;
    if let Some((_, &prev_end)) = asm.ranges.range(..=rel).next_back() {
        if prev_end > rel {
            return violation("content chunks overlap");
        }
    }
    if let Some((&next_start, _)) = asm.ranges.range(rel..).next() {
        if next_start < end {
            return violation("content chunks overlap");
        }
    }
    asm.ranges.insert(rel, end);
    asm.covered_bytes += n;
    Ok(())
}

/// Checks that `[offset, offset+n)` lies within the request; returns the
/// offset relative to the request.
fn within_request(p: &Pending, offset: u64, n: u64, what: &str) -> Result<u64, Fault> {
    let end = offset.checked_add(n);
    let req_end = p.offset + p.length as u64;
    match end {
        Some(end) if offset >= p.offset && end <= req_end => Ok(offset - p.offset),
        _ => violation(format!(
            "{what} chunk at offset {offset} length {n} lies outside the request (offset {} length {})",
            p.offset, p.length
        )),
    }
}

async fn read_u32<R: AsyncRead + Unpin>(rd: &mut BufReader<R>) -> io::Result<u32> {
    let mut b = [0u8; 4];
    rd.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

async fn read_u64<R: AsyncRead + Unpin>(rd: &mut BufReader<R>) -> io::Result<u64> {
    let mut b = [0u8; 8];
    rd.read_exact(&mut b).await?;
    Ok(u64::from_be_bytes(b))
}

async fn skip<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *rd).take(n), &mut tokio::io::sink()).await?;
    if copied != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Processes one structured chunk's payload.
async fn chunk<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    shared: &ConnShared,
    p: &mut Pending,
    reply_type: u16,
    length: u32,
) -> Result<(), Fault> {
    let cmd = proto::command_name(p.command);
    match reply_type {
        proto::REPLY_TYPE_NONE => {
            if length != 0 {
                return violation(format!("NBD_REPLY_TYPE_NONE with length {length}"));
            }
        }
        proto::REPLY_TYPE_OFFSET_DATA => {
            if p.command != proto::CMD_READ || length < 9 {
                return violation(format!("OFFSET_DATA chunk of length {length} in reply to {cmd}"));
            }
            let offset = read_u64(rd).await?;
            let n = (length - 8) as u64;
            let rel = within_request(p, offset, n, "OFFSET_DATA")?;
            let total = p.length as u64;
            let PendingState::Read(asm) = &mut p.state else {
                return violation("internal: read without a buffer");
            };
            claim(asm, rel, n, total)?;
            ensure_buffer(asm, total as u32);
            read_into(rd, asm, rel as usize, n as usize).await?;
        }
        proto::REPLY_TYPE_OFFSET_HOLE => {
            if p.command != proto::CMD_READ || length != 12 {
                return violation(format!("OFFSET_HOLE chunk of length {length} in reply to {cmd}"));
            }
            let offset = read_u64(rd).await?;
            let n = read_u32(rd).await? as u64;
            if n == 0 {
                return violation("OFFSET_HOLE of size 0");
            }
            let rel = within_request(p, offset, n, "OFFSET_HOLE")?;
            let total = p.length as u64;
            let PendingState::Read(asm) = &mut p.state else {
                return violation("internal: read without a buffer");
            };
            // Holes need no bytes written: gaps are zero-filled when a later
            // chunk or the final resize materializes them.
            claim(asm, rel, n, total)?;
        }
        proto::REPLY_TYPE_BLOCK_STATUS => {
            let PendingState::Status { context_id, extents } = &mut p.state else {
                return violation(format!("BLOCK_STATUS chunk in reply to {cmd}"));
            };
            // One extent per byte of the request at most (each is nonzero
            // and all but the last end inside the request).
            let count_max = STATUS_EXTENTS_MAX.min(p.length as u64);
            let body = length as u64;
            if body < 12 || !(body - 4).is_multiple_of(8) || (body - 4) / 8 > count_max {
                return violation(format!("BLOCK_STATUS chunk of impossible length {length}"));
            }
            let id = read_u32(rd).await?;
            let count = (body - 4) / 8;
            if id != *context_id {
                if !shared.contexts.iter().any(|(_, cid)| *cid == id) {
                    return violation(format!("BLOCK_STATUS chunk for context id {id}, which was never negotiated"));
                }
                skip(rd, body - 4).await?;
                return Ok(());
            }
            if extents.is_some() {
                return violation("two BLOCK_STATUS chunks for the same context");
            }
            let mut raw = vec![0u8; (body - 4) as usize];
            rd.read_exact(&mut raw).await?;
            let requested = p.length as u64;
            let mut out = Vec::with_capacity(count as usize);
            let mut sum = 0u64;
            for (i, e) in raw.chunks_exact(8).enumerate() {
                let len = u32::from_be_bytes(e[0..4].try_into().unwrap()) as u64;
                let flags = u32::from_be_bytes(e[4..8].try_into().unwrap());
                if len == 0 {
                    return violation("BLOCK_STATUS extent of length 0");
                }
                if sum >= requested {
                    return violation(format!("BLOCK_STATUS extent {i} starts past the requested length"));
                }
                // Clip the last extent to the request: callers are promised
                // a reply that never goes past offset+len.
                let len = len.min(requested - sum);
                sum += len;
                out.push(StatusExtent { length: len, flags });
            }
            if p.flags & proto::CMD_FLAG_REQ_ONE != 0 && out.len() != 1 {
                return violation("several extents despite NBD_CMD_FLAG_REQ_ONE");
            }
            *extents = Some(out);
        }
        t if t & 0x8000 != 0 => {
            if length < 6 {
                return violation(format!("error chunk of length {length}"));
            }
            let code = read_u32(rd).await?;
            let mut ml = [0u8; 2];
            rd.read_exact(&mut ml).await?;
            let msg_len = u16::from_be_bytes(ml) as u32;
            let fixed_tail = if t == proto::REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if msg_len as usize > limits::STRING_BYTES_MAX || msg_len + fixed_tail > length - 6 {
                return violation(format!("error chunk message length {msg_len} does not fit its chunk of {length}"));
            }
            let rest = length - 6 - msg_len - fixed_tail;
            if (t == proto::REPLY_TYPE_ERROR || t == proto::REPLY_TYPE_ERROR_OFFSET) && rest != 0 {
                return violation(format!("error chunk of length {length} has {rest} stray bytes"));
            }
            if rest > UNKNOWN_ERROR_CHUNK_BYTES_MAX {
                return violation(format!("unknown error chunk type {t:#06x} of length {length}"));
            }
            let mut msg = vec![0u8; msg_len as usize];
            rd.read_exact(&mut msg).await?;
            let message = String::from_utf8_lossy(&msg).into_owned();
            if t == proto::REPLY_TYPE_ERROR_OFFSET {
                let offset = read_u64(rd).await?;
                if p.command == proto::CMD_FLUSH || p.command == proto::CMD_DISC {
                    return violation(format!("ERROR_OFFSET chunk in reply to {cmd}"));
                }
                within_request(p, offset, 1, "ERROR_OFFSET")?;
            } else {
                skip(rd, rest as u64).await?;
            }
            if code == 0 {
                return violation("error chunk with error code 0");
            }
            if p.error.is_none() {
                p.error = Some(server_error(shared, p, code, &message));
            }
        }
        t => return violation(format!("unknown structured reply type {t} in reply to {cmd}")),
    }
    Ok(())
}
