//! Reply framing and the batching writer.
//!
//! Why a dedicated writer: replies complete out of order on many handlers,
//! and the socket must see whole frames. One future owns the write half and
//! drains every frame that is ready into one vectored write, so under load
//! many replies share a syscall, and data buffers (`Bytes`) are written
//! straight from where the device put them, without copying.
//!
//! Each request's in-flight permit rides on its last frame and is released
//! only after that frame is written: a slow reader on the client side thus
//! holds the server's bytes-in-flight budget and stops us reading more
//! requests (backpressure).

use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::ServerError;
use crate::proto::{self, SimpleReplyHeader, StructuredReplyHeader};
use crate::splice::{Payload, PipeChain, SpliceSocket};

/// Largest fixed header we build: a structured header plus the fixed part of
/// its payload (20 + at most 12).
const HEAD_BYTES_MAX: usize = 32;
/// Most frames per vectored write (two slices each, well under IOV_MAX).
const BATCH_FRAMES_MAX: usize = 64;
/// Below this many bytes per batch, a writer that cannot do vectored writes
/// copies frames into one buffer rather than issuing a write per slice.
const COALESCE_BYTES_MAX: usize = 256 * 1024;

/// Budget a request holds until its reply is written.
pub(super) struct InFlight {
    pub _request: OwnedSemaphorePermit,
    pub _bytes: Option<OwnedSemaphorePermit>,
}

/// One reply frame: a small fixed header, an optional payload, and (on the
/// last frame of a reply) the request's in-flight budget.
pub(super) struct Frame {
    head: [u8; HEAD_BYTES_MAX],
    head_len: u8,
    data: Bytes,
    /// A read payload still in pipes, sent after the head (then `data` is
    /// empty).
    pipe: Option<PipeChain>,
    pub permit: Option<InFlight>,
}

impl Frame {
    fn new(parts: &[&[u8]], data: Bytes) -> Frame {
        let mut head = [0u8; HEAD_BYTES_MAX];
        let mut len = 0;
        for p in parts {
            head[len..len + p.len()].copy_from_slice(p);
            len += p.len();
        }
        Frame { head, head_len: len as u8, data, pipe: None, permit: None }
    }

    /// The frame with `payload` after its head.
    fn carrying(parts: &[&[u8]], payload: Payload) -> Frame {
        match payload {
            Payload::Bytes(data) => Frame::new(parts, data),
            Payload::Pipe(chain) => Frame { pipe: Some(chain), ..Frame::new(parts, Bytes::new()) },
        }
    }

    /// A simple reply; `data` only for a successful read.
    pub fn simple(cookie: u64, error: u32, data: Bytes) -> Frame {
        Frame::new(&[&SimpleReplyHeader { error, cookie }.encode()], data)
    }

    /// A successful read's simple reply.
    pub fn simple_data(cookie: u64, data: Payload) -> Frame {
        Frame::carrying(&[&SimpleReplyHeader { error: 0, cookie }.encode()], data)
    }

    fn structured_header(cookie: u64, reply_type: u16, done: bool, length: usize) -> [u8; 20] {
        let flags = if done { proto::REPLY_FLAG_DONE } else { 0 };
        StructuredReplyHeader { flags, reply_type, cookie, length: length as u32 }.encode()
    }

    /// `NBD_REPLY_TYPE_NONE` (always final).
    pub fn none(cookie: u64) -> Frame {
        Frame::new(&[&Frame::structured_header(cookie, proto::REPLY_TYPE_NONE, true, 0)], Bytes::new())
    }

    /// `NBD_REPLY_TYPE_OFFSET_DATA`; `data` must be non-empty and at most
    /// the maximum payload (so the length fits the header).
    pub fn offset_data(cookie: u64, offset: u64, data: Payload, done: bool) -> Frame {
        let head = Frame::structured_header(cookie, proto::REPLY_TYPE_OFFSET_DATA, done, 8 + data.len());
        Frame::carrying(&[&head, &offset.to_be_bytes()], data)
    }

    /// `NBD_REPLY_TYPE_ERROR` with a human-readable message (always final).
    pub fn error(cookie: u64, error: u32, message: &str) -> Frame {
        let message = super::handshake::truncate(message, proto::limits::STRING_BYTES_MAX);
        let head = Frame::structured_header(cookie, proto::REPLY_TYPE_ERROR, true, 6 + message.len());
        let msg_len = (message.len() as u16).to_be_bytes();
        Frame::new(&[&head, &error.to_be_bytes(), &msg_len], Bytes::copy_from_slice(message.as_bytes()))
    }

    /// `NBD_REPLY_TYPE_BLOCK_STATUS` for one context; `extents` are
    /// `(length, flags)` pairs, already validated by the caller.
    pub fn block_status(cookie: u64, context_id: u32, extents: &[(u32, u32)], done: bool) -> Frame {
        let mut data = BytesMut::with_capacity(extents.len() * 8);
        for (length, flags) in extents {
            data.put_u32(*length);
            data.put_u32(*flags);
        }
        let head = Frame::structured_header(cookie, proto::REPLY_TYPE_BLOCK_STATUS, done, 4 + data.len());
        Frame::new(&[&head, &context_id.to_be_bytes()], data.freeze())
    }
}

/// Writes frames until every sender is gone, then closes the write half.
/// `splice` is the socket's descriptor for payloads in pipes; without it
/// they are read out and written from memory.
pub(super) async fn write_replies<W>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    splice: Option<SpliceSocket>,
) -> Result<(), ServerError>
where
    W: AsyncWrite + Unpin,
{
    let vectored = w.is_write_vectored();
    let mut batch: Vec<Frame> = Vec::with_capacity(BATCH_FRAMES_MAX);
    let mut coalesced = BytesMut::new();
    while rx.recv_many(&mut batch, BATCH_FRAMES_MAX).await > 0 {
        // Runs of frames in memory, each ending at a frame whose payload is
        // in pipes (sent right after its head) or at the end of the batch.
        let mut start = 0;
        while start < batch.len() {
            let end = batch[start..].iter().position(|f| f.pipe.is_some()).map_or(batch.len(), |i| start + i + 1);
            let run = &mut batch[start..end];
            let total: usize = run.iter().map(|f| f.head_len as usize + f.data.len()).sum();
            if vectored || total > COALESCE_BYTES_MAX {
                write_vectored_all(&mut w, run).await?;
            } else {
                coalesced.clear();
                for f in run.iter() {
                    coalesced.extend_from_slice(&f.head[..f.head_len as usize]);
                    coalesced.extend_from_slice(&f.data);
                }
                w.write_all(&coalesced).await.map_err(ServerError::io("sending replies"))?;
            }
            w.flush().await.map_err(ServerError::io("sending replies"))?;
            if let Some(chain) = run.last_mut().and_then(|f| f.pipe.as_mut()) {
                send_pipe(&mut w, splice.as_ref(), chain).await?;
            }
            start = end;
        }
        // The client's next requests come on this socket.
        crate::park_poll::expect(splice.as_ref().map(SpliceSocket::raw_fd));
        // Releases the in-flight budget of every reply just written.
        batch.clear();
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// Sends a payload held in pipes, after everything written before it.
async fn send_pipe<W: AsyncWrite + Unpin>(
    w: &mut W,
    splice: Option<&SpliceSocket>,
    chain: &mut PipeChain,
) -> Result<(), ServerError> {
    match splice {
        Some(socket) => socket.splice_out(chain).await.map_err(ServerError::io("sending replies")),
        None => {
            let data = std::mem::take(chain).into_bytes().map_err(ServerError::io("sending replies"))?;
            w.write_all(&data).await.map_err(ServerError::io("sending replies"))?;
            w.flush().await.map_err(ServerError::io("sending replies"))
        }
    }
}

async fn write_vectored_all<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Frame]) -> Result<(), ServerError> {
    let mut storage = [IoSlice::new(&[]); 2 * BATCH_FRAMES_MAX];
    let mut slices = frame_slices(batch, &mut storage);
    while !slices.is_empty() {
        let written = w.write_vectored(slices).await.map_err(ServerError::io("sending replies"))?;
        if written == 0 {
            return Err(ServerError::Io {
                context: "sending replies",
                source: std::io::Error::new(std::io::ErrorKind::WriteZero, "the socket accepted no bytes"),
            });
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// The slices of at most [`BATCH_FRAMES_MAX`] frames: each header, and its
/// data if any.
fn frame_slices<'a, 's>(batch: &'a [Frame], storage: &'s mut [IoSlice<'a>]) -> &'s mut [IoSlice<'a>] {
    let mut n = 0;
    for f in batch {
        storage[n] = IoSlice::new(&f.head[..f.head_len as usize]);
        n += 1;
        if !f.data.is_empty() {
            storage[n] = IoSlice::new(&f.data);
            n += 1;
        }
    }
    &mut storage[..n]
}

/// Writes `frames` to a blocking socket with vectored writes (the
/// connection-thread path, [`super::threads`]): one system call for a
/// reply and its data unless the socket takes less.
pub(super) fn write_frames_blocking<W: std::io::Write>(w: &mut W, frames: &[Frame]) -> std::io::Result<()> {
    for batch in frames.chunks(BATCH_FRAMES_MAX) {
        let mut storage = [IoSlice::new(&[]); 2 * BATCH_FRAMES_MAX];
        let mut slices = frame_slices(batch, &mut storage);
        while !slices.is_empty() {
            match w.write_vectored(slices) {
                Ok(0) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the socket accepted no bytes"))
                }
                Ok(written) => IoSlice::advance_slices(&mut slices, written),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
