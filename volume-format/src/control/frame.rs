//! Length-prefixed bincode frames.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload, a
//! bincode (2.x, fixed-int, big-endian) encoding of one message. The length
//! is checked against [`FRAME_BYTES_MAX`] before anything is allocated, so a
//! peer cannot make us allocate by sending a huge length.

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame payload accepted (fallback I/O carries up to a few MiB).
pub const FRAME_BYTES_MAX: u32 = 16 * 1024 * 1024;

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("control frame of {0} bytes exceeds the {FRAME_BYTES_MAX}-byte limit")]
    TooLarge(u64),
    #[error("control frame is empty")]
    Empty,
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("control message has {0} trailing bytes after its end")]
    TrailingBytes(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_big_endian().with_fixed_int_encoding().with_limit::<{ FRAME_BYTES_MAX as usize }>()
}

/// Encodes one message as a payload (no length prefix).
pub fn encode_payload<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    encode(msg, false)
}

/// Encodes one message as a whole frame (length prefix + payload).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    encode(msg, true)
}

/// Counts the payload's bytes first (checked against [`FRAME_BYTES_MAX`]),
/// then encodes it into one allocation of its exact size: a mirror append
/// carries up to a megabyte of cached writes, and a vector grown to fit it
/// copied that data about twice more.
fn encode<T: Serialize>(msg: &T, with_length: bool) -> Result<Vec<u8>, FrameError> {
    let malformed = |e: bincode::error::EncodeError| FrameError::Malformed(e.to_string());
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, config()).map_err(malformed)?;
    let len = size.bytes_written;
    if len as u64 > FRAME_BYTES_MAX as u64 {
        return Err(FrameError::TooLarge(len as u64));
    }
    let mut out = Vec::with_capacity(if with_length { FRAME_HEADER_BYTES } else { 0 } + len);
    if with_length {
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    bincode::serde::encode_into_std_write(msg, &mut out, config()).map_err(malformed)?;
    Ok(out)
}

/// Validates a frame's length prefix; returns the payload length to read.
pub fn check_frame_header(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len as u64));
    }
    Ok(len as usize)
}

/// Decodes one message from a whole payload; trailing bytes are an error
/// (they mean the peer and we disagree on the format).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::messages::{ClientMessage, Request};

    #[test]
    fn frame_round_trip() {
        let msg = ClientMessage { id: 9, request: Request::VolumeShow { name: "vol".into() } };
        let frame = encode_frame(&msg).unwrap();
        let len = check_frame_header(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        let back: ClientMessage = decode_payload(&frame[4..]).unwrap();
        assert_eq!(back, msg);
    }

    /// A mirror append of a megabyte round-trips, in one allocation of its
    /// exact size; one past the frame limit is refused before encoding.
    #[test]
    fn large_messages_encode_at_their_exact_size_and_oversized_ones_are_refused() {
        use crate::control::messages::MirrorRecord;
        use crate::HandleId;
        let append = |bytes: usize| ClientMessage {
            id: 3,
            request: Request::MirrorAppend {
                handle: HandleId(7),
                records: vec![
                    MirrorRecord { seq: 1, offset: 0, data: vec![0xa5; bytes / 2] },
                    MirrorRecord { seq: 2, offset: 1 << 20, data: vec![0x5a; bytes / 2] },
                ],
            },
        };
        let msg = append(1 << 20);
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(frame.capacity(), frame.len(), "one allocation of the frame's size");
        let len = check_frame_header(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_payload::<ClientMessage>(&frame[4..]).unwrap(), msg);
        assert_eq!(encode_payload(&msg).unwrap(), frame[4..]);

        match encode_frame(&append(FRAME_BYTES_MAX as usize)) {
            Err(FrameError::TooLarge(n)) => assert!(n > FRAME_BYTES_MAX as u64),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn oversized_and_empty_frames_are_refused_before_allocation() {
        assert_eq!(
            check_frame_header((FRAME_BYTES_MAX + 1).to_be_bytes()),
            Err(FrameError::TooLarge(FRAME_BYTES_MAX as u64 + 1))
        );
        assert_eq!(check_frame_header([0; 4]), Err(FrameError::Empty));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors_not_panics() {
        for garbage in [&[0xffu8; 3][..], &[0xff; 64][..], &[0u8, 0, 0, 0, 0, 0, 0, 9, 0xee][..]] {
            assert!(decode_payload::<ClientMessage>(garbage).is_err());
        }
        let mut payload = encode_payload(&ClientMessage { id: 1, request: Request::PoolStatus }).unwrap();
        payload.push(0);
        assert_eq!(decode_payload::<ClientMessage>(&payload), Err(FrameError::TrailingBytes(1)));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode_payload::<ClientMessage>(&bytes);
            let _ = decode_payload::<crate::control::messages::ServerMessage>(&bytes);
            let _ = decode_payload::<crate::control::auth::ClientHello>(&bytes);
        }
    }
}
