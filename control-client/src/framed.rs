//! Reads and writes whole control frames on a tokio stream.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use volume_format::control::frame::{self, FrameError, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error("connection closed by peer")]
    Closed,
    #[error("I/O error on control connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame longer than the caller's limit (the small limit that holds
    /// before a peer is authenticated).
    #[error("frame of {len} bytes exceeds the {max}-byte limit before authentication")]
    Oversized { len: usize, max: usize },
}

/// Reads one frame's payload bytes (length checked before allocating).
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FramedError> {
    read_payload_max(r, FRAME_BYTES_MAX as usize).await
}

/// Like [`read_payload`], refusing frames longer than `max` bytes before
/// allocating (the handshake reads with a small `max`).
pub async fn read_payload_max<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FramedError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FramedError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = frame::check_frame_header(header)?;
    if len > max {
        return Err(FramedError::Oversized { len, max });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(payload)
}

/// Reads and decodes one message of at most `max` bytes.
pub async fn read_message_max<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<T, FramedError> {
    let payload = read_payload_max(r, max).await?;
    Ok(frame::decode_payload(&payload)?)
}

/// Reads and decodes one message.
pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<T, FramedError> {
    let payload = read_payload(r).await?;
    Ok(frame::decode_payload(&payload)?)
}

/// Writes an already-encoded payload as one frame.
pub async fn write_payload<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> Result<(), FramedError> {
    let mut buf = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Writes a whole frame made by [`frame::encode_frame`] (length prefix
/// included), without copying it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FramedError> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}

/// Encodes and writes one message.
pub async fn write_message<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), FramedError> {
    write_frame(w, &frame::encode_frame(msg)?).await
}
