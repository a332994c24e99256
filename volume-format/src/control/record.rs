//! Protected records: how every byte travels after the handshake.
//!
//! ```text
//! record    = len (u16, big-endian: bytes of body) ‖ body
//! encrypted: body = AEAD(key of this direction, nonce = seq, plaintext)        plaintext ‖ 16-byte tag
//! integrity: body = plaintext ‖ BLAKE3-keyed(key of this direction, seq ‖ len(plaintext) ‖ plaintext)
//! seq       = u64 big-endian, 0 for the first record in each direction, +1 per record; never sent
//! ```
//!
//! Why this shape: the sequence number is implicit, so a replayed,
//! reordered, dropped or injected record is checked against the wrong
//! number and fails its tag, like a flipped byte does — no window, no
//! reordering buffer, one rule. Records are bounded (a 16-bit length), so
//! a peer can make the reader buffer at most one record. An empty record is
//! the sender's orderly close (a "close notify"): end of stream without it
//! means the stream was cut.
//!
//! The keys come from the Noise handshake (`auth`): in encrypted mode its
//! transport ciphers (AES-256-GCM), in integrity mode MAC keys derived from
//! the same split (BLAKE3's key derivation, context
//! [`INTEGRITY_KEY_CONTEXT`]). Why BLAKE3 rather than HMAC-SHA256 for the
//! MAC: it is a keyed PRF by design and several times faster in software
//! (SIMD), which is the point of a mode chosen to save CPU on hosts without
//! AES instructions. Sealing and opening live with the processes
//! (`control-client`); this module is the wire layout, checked before
//! anything is allocated.

use super::auth::ChannelMode;

/// Bytes of a record's length prefix.
pub const RECORD_HEADER_BYTES: usize = 2;
/// Largest body (Noise's message limit, and what a u16 can say).
pub const RECORD_BODY_BYTES_MAX: usize = 65535;
/// The AEAD tag of an encrypted record.
pub const AEAD_TAG_BYTES: usize = 16;
/// The BLAKE3 keyed-hash tag of an integrity-only record.
pub const MAC_TAG_BYTES: usize = 32;
/// Most plaintext bytes in one record, the same in both modes (so a
/// stream splits into the same records whichever mode protects it).
pub const RECORD_PLAINTEXT_BYTES_MAX: usize = RECORD_BODY_BYTES_MAX - MAC_TAG_BYTES;

/// Why a record header is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("protected record of {body} bytes is shorter than its {tag}-byte tag")]
    Short { body: usize, tag: usize },
    #[error("protected record carries {0} plaintext bytes, more than the {RECORD_PLAINTEXT_BYTES_MAX}-byte limit")]
    TooLarge(usize),
}

/// Tag bytes at the end of a record's body in `mode`.
pub fn tag_bytes(mode: ChannelMode) -> usize {
    match mode {
        ChannelMode::Encrypted => AEAD_TAG_BYTES,
        ChannelMode::Integrity => MAC_TAG_BYTES,
    }
}

/// Bytes of body for `plaintext` bytes in `mode`.
pub fn body_bytes(mode: ChannelMode, plaintext: usize) -> usize {
    plaintext + tag_bytes(mode)
}

/// Checks a record header; returns the body length to read.
pub fn check_record_header(header: [u8; RECORD_HEADER_BYTES], mode: ChannelMode) -> Result<usize, RecordError> {
    let body = usize::from(u16::from_be_bytes(header));
    let tag = tag_bytes(mode);
    if body < tag {
        return Err(RecordError::Short { body, tag });
    }
    if body - tag > RECORD_PLAINTEXT_BYTES_MAX {
        return Err(RecordError::TooLarge(body - tag));
    }
    Ok(body)
}

/// The header of a record carrying `plaintext` bytes in `mode`.
pub fn record_header(mode: ChannelMode, plaintext: usize) -> [u8; RECORD_HEADER_BYTES] {
    debug_assert!(plaintext <= RECORD_PLAINTEXT_BYTES_MAX);
    (body_bytes(mode, plaintext) as u16).to_be_bytes()
}

/// What an integrity-only record's MAC covers before the plaintext.
pub fn mac_prefix(seq: u64, plaintext: usize) -> [u8; 10] {
    let mut p = [0u8; 10];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    p[8..].copy_from_slice(&(plaintext as u16).to_be_bytes());
    p
}

/// The BLAKE3 key-derivation context under which integrity-only MAC keys
/// are derived from the Noise split (so a key is never used both as a
/// cipher key and a MAC key).
pub const INTEGRITY_KEY_CONTEXT: &str = "sanvol 2026-12 protocol 3 integrity-only record MAC key";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_bounded_in_both_modes() {
        for mode in [ChannelMode::Encrypted, ChannelMode::Integrity] {
            let h = record_header(mode, RECORD_PLAINTEXT_BYTES_MAX);
            assert_eq!(check_record_header(h, mode), Ok(body_bytes(mode, RECORD_PLAINTEXT_BYTES_MAX)));
            assert_eq!(check_record_header(record_header(mode, 0), mode), Ok(tag_bytes(mode)));
            assert!(matches!(check_record_header([0, 3], mode), Err(RecordError::Short { .. })));
        }
        // The largest body the u16 allows is too much plaintext in encrypted mode.
        assert_eq!(
            check_record_header([0xff, 0xff], ChannelMode::Encrypted),
            Err(RecordError::TooLarge(RECORD_BODY_BYTES_MAX - AEAD_TAG_BYTES))
        );
        assert_eq!(check_record_header([0xff, 0xff], ChannelMode::Integrity), Ok(RECORD_BODY_BYTES_MAX));
    }

    #[test]
    fn the_mac_covers_sequence_and_length() {
        assert_ne!(mac_prefix(0, 5), mac_prefix(1, 5));
        assert_ne!(mac_prefix(0, 5), mac_prefix(0, 6));
        assert_eq!(mac_prefix(0x0102, 3), [0, 0, 0, 0, 0, 0, 1, 2, 0, 3]);
    }

    proptest::proptest! {
        #[test]
        fn any_header_is_accepted_or_refused_without_panic(header in proptest::prelude::any::<[u8; 2]>()) {
            for mode in [ChannelMode::Encrypted, ChannelMode::Integrity] {
                if let Ok(body) = check_record_header(header, mode) {
                    proptest::prop_assert!(body >= tag_bytes(mode) && body <= RECORD_BODY_BYTES_MAX);
                    proptest::prop_assert!(body - tag_bytes(mode) <= RECORD_PLAINTEXT_BYTES_MAX);
                }
            }
        }
    }
}
