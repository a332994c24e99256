//! The bincode configuration and checksum helpers shared by every
//! bincode-encoded record (pool metadata, volume descriptions, and later the
//! control messages).
//!
//! Why one fixed configuration: bincode is not self-describing, so writer and
//! reader must agree on integer width and byte order forever. Fixed-width,
//! big-endian integers make hex dumps of records readable and keep field
//! offsets stable when values grow. The size limit bounds what a corrupted or
//! hostile length prefix can make the decoder allocate.

use bincode::config::{BigEndian, Configuration, Fixint, Limit};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Upper bound on any single bincode-encoded record this crate decodes.
/// Also the largest metadata slot payload (see `metadata::SLOT_BYTES_MAX`).
pub const RECORD_BYTES_MAX: usize = 256 << 20;

/// The bincode configuration every sanvol record uses.
pub type Config = Configuration<BigEndian, Fixint, Limit<RECORD_BYTES_MAX>>;

/// The bincode configuration every sanvol record uses.
pub const fn config() -> Config {
    bincode::config::standard().with_big_endian().with_fixed_int_encoding().with_limit::<RECORD_BYTES_MAX>()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode record: {0}")]
    Encode(String),
    #[error("cannot decode record: {0}")]
    Decode(String),
    #[error("record has {trailing_bytes} unexpected trailing bytes after {used_bytes} decoded bytes")]
    TrailingBytes { used_bytes: usize, trailing_bytes: usize },
}

/// Encodes `value` with [`config`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes exactly one `T` from all of `bytes` with [`config`]; trailing bytes
/// are an error because they mean writer and reader disagree on the format.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used_bytes) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used_bytes != bytes.len() {
        return Err(CodecError::TrailingBytes { used_bytes, trailing_bytes: bytes.len() - used_bytes });
    }
    Ok(value)
}

/// crc32c over `parts` in order, as if they were one buffer.
pub fn crc32c_parts(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0u32, |crc, part| crc32c::crc32c_append(crc, part))
}

/// Describes the first bytes of a block for an error message: "all zeroes"
/// tells an operator the device is blank, printable text hints at what else
/// is there.
pub(crate) fn describe_bytes(bytes: &[u8]) -> String {
    if bytes.iter().all(|&b| b == 0) {
        return "all zeroes (blank or never labelled)".to_string();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{hex} (\"{}\")", String::from_utf8_lossy(bytes))
    } else {
        hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_parts_equals_whole() {
        let whole = b"hello, sanvol";
        assert_eq!(crc32c_parts(&[&whole[..5], &whole[5..]]), crc32c::crc32c(whole));
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut bytes = encode(&7u32).unwrap();
        assert_eq!(bytes, vec![0, 0, 0, 7], "fixed-width big-endian");
        bytes.push(0);
        assert!(matches!(decode::<u32>(&bytes), Err(CodecError::TrailingBytes { .. })));
    }

    #[test]
    fn describe() {
        assert!(describe_bytes(&[0; 8]).contains("all zeroes"));
        assert!(describe_bytes(b"EFI PART").contains("\"EFI PART\""));
    }
}
