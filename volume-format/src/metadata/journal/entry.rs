//! One journal entry: the changes of one group commit, signed, in whole
//! blocks of the ring.
//!
//! A fixed, hand-written header (like the slot header) so a reader can tell
//! an entry, its length and its place in the chain from its first block
//! before decoding anything, and `hexdump` shows what is there:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SANVOLJE"
//!      8     4  crc32c of bytes 0..192 (this field zeroed) + payload
//!     12     4  metadata format version (3)
//!     16    16  pool UUID
//!     32     8  sequence number
//!     40     8  payload length, bytes
//!     48     8  this entry's offset in the ring
//!     56    16  link to what it follows: kind (1 entry, 2 checkpoint), value
//!     72     8  attempt: how many writes of this sequence number failed before
//!     80    48  reserved, zero
//!    128    64  ed25519 signature of bytes 0..128 (crc zeroed) + payload
//!    192     …  payload: bincode Vec<MetaChange> (codec::config)
//!            …  zeroes to the next block boundary
//! ```
//!
//! Why an attempt number: after a failed commit the next one reuses its
//! sequence number and place (see `writer`), so a crash in between can leave
//! the refused entry on one copy and its replacement on another; the higher
//! attempt is the later write.
//!
//! Why the entry records its own ring offset: a stale entry read at the
//! wrong place (an earlier lap, a wrapped write) can never pass for the one
//! expected there. Why the crc is checked before the signature: a torn write
//! is the common case and must be cheap to recognise; only an entry whose
//! checksum holds is worth a signature check, and if that fails it was not
//! torn but written by someone without the server's key.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use uuid::Uuid;

use super::{digest_of, read_u32, read_u64, ChainLink, ENTRY_BYTES_MAX, SIGNATURE_BYTES};
use crate::codec::{self, CodecError};
use crate::label::BLOCK_BYTES;
use crate::metadata::{MetaChange, JOURNAL_FORMAT_VERSION_MIN, METADATA_FORMAT_VERSION};

pub(crate) const ENTRY_MAGIC: [u8; 8] = *b"SANVOLJE";
pub(crate) const ENTRY_HEADER_BYTES: usize = 192;

mod offset {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 8;
    pub const VERSION: usize = 12;
    pub const POOL_UUID: usize = 16;
    pub const SEQ: usize = 32;
    pub const PAYLOAD_BYTES: usize = 40;
    pub const RING_OFFSET: usize = 48;
    pub const PREV: usize = 56;
    pub const ATTEMPT: usize = 72;
    pub const RESERVED: usize = 80;
    pub const SIGNATURE: usize = 128;
}
const _: () = assert!(offset::PREV + 16 == offset::ATTEMPT);
const _: () = assert!(offset::SIGNATURE + SIGNATURE_BYTES == ENTRY_HEADER_BYTES);
const _: () = assert!(ENTRY_HEADER_BYTES as u64 <= BLOCK_BYTES);

/// Bytes an entry with a `payload_bytes` payload takes in the ring.
pub(crate) fn entry_bytes(payload_bytes: u64) -> u64 {
    (ENTRY_HEADER_BYTES as u64 + payload_bytes).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
}

/// Encodes the payload of an entry holding `changes`.
pub(crate) fn encode_payload(changes: &[MetaChange]) -> Result<Vec<u8>, CodecError> {
    codec::encode(&changes)
}

/// A sealed entry: its bytes (whole blocks) and the digest the next entry
/// links to.
pub(crate) struct EncodedEntry {
    pub bytes: Vec<u8>,
    pub digest: u64,
}

/// Where an entry goes in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryPlace {
    pub seq: u64,
    pub ring_offset: u64,
    pub prev: ChainLink,
    pub attempt: u64,
}

/// Builds and signs the entry at `place`.
pub(crate) fn encode_entry(pool: Uuid, place: EntryPlace, payload: &[u8], key: &SigningKey) -> EncodedEntry {
    let EntryPlace { seq, ring_offset, prev, attempt } = place;
    let total = entry_bytes(payload.len() as u64) as usize;
    let mut bytes = vec![0u8; total];
    bytes[offset::MAGIC..offset::MAGIC + 8].copy_from_slice(&ENTRY_MAGIC);
    bytes[offset::VERSION..offset::VERSION + 4].copy_from_slice(&METADATA_FORMAT_VERSION.to_be_bytes());
    bytes[offset::POOL_UUID..offset::POOL_UUID + 16].copy_from_slice(pool.as_bytes());
    bytes[offset::SEQ..offset::SEQ + 8].copy_from_slice(&seq.to_be_bytes());
    bytes[offset::PAYLOAD_BYTES..offset::PAYLOAD_BYTES + 8].copy_from_slice(&(payload.len() as u64).to_be_bytes());
    bytes[offset::RING_OFFSET..offset::RING_OFFSET + 8].copy_from_slice(&ring_offset.to_be_bytes());
    bytes[offset::PREV..offset::PREV + 16].copy_from_slice(&prev.encode());
    bytes[offset::ATTEMPT..offset::ATTEMPT + 8].copy_from_slice(&attempt.to_be_bytes());
    bytes[ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + payload.len()].copy_from_slice(payload);
    let signature = key.sign(&signed_message(&bytes[..offset::SIGNATURE], payload)).to_bytes();
    bytes[offset::SIGNATURE..ENTRY_HEADER_BYTES].copy_from_slice(&signature);
    let crc = codec::crc32c_parts(&[&bytes[..ENTRY_HEADER_BYTES + payload.len()]]);
    bytes[offset::CRC..offset::CRC + 4].copy_from_slice(&crc.to_be_bytes());
    EncodedEntry { bytes, digest: digest_of(&signature) }
}

/// What is signed: the header before the signature (crc zeroed: it is
/// computed last) and the payload.
fn signed_message(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(header.len() + payload.len());
    message.extend_from_slice(header);
    message[offset::CRC..offset::CRC + 4].fill(0);
    message.extend_from_slice(payload);
    message
}

/// The fixed fields of an entry header, read before anything is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryHeader {
    pub format_version: u32,
    pub seq: u64,
    pub payload_bytes: u64,
    pub ring_offset: u64,
    pub prev: Option<ChainLink>,
    pub attempt: u64,
}

impl EntryHeader {
    pub fn total_bytes(&self) -> u64 {
        entry_bytes(self.payload_bytes)
    }
}

/// What a ring position holds.
#[derive(Debug)]
pub(crate) enum EntryRead<'a> {
    /// No entry starts here (blank, or the middle of something else).
    NotAnEntry,
    /// An entry of another pool (a device reused with `--force`).
    OtherPool,
    /// Starts like an entry but is not whole: torn, or damaged.
    Damaged {
        header: Option<EntryHeader>,
        why: String,
    },
    /// Whole, but not signed by the server's key.
    Forged {
        header: EntryHeader,
    },
    /// Written by a newer sanvol.
    Newer {
        found: u32,
    },
    Valid {
        header: EntryHeader,
        payload: &'a [u8],
        digest: u64,
    },
}

/// Reads the entry header at `at` without checking anything but the magic
/// and the pool.
pub(crate) fn peek_header(ring: &[u8], at: u64, pool: Uuid) -> Result<EntryHeader, EntryRead<'static>> {
    let Some(h) = usize::try_from(at).ok().and_then(|at| ring.get(at..at.checked_add(ENTRY_HEADER_BYTES)?)) else {
        return Err(EntryRead::NotAnEntry);
    };
    if h[offset::MAGIC..offset::MAGIC + 8] != ENTRY_MAGIC {
        return Err(EntryRead::NotAnEntry);
    }
    if h[offset::POOL_UUID..offset::POOL_UUID + 16] != *pool.as_bytes() {
        return Err(EntryRead::OtherPool);
    }
    Ok(EntryHeader {
        format_version: read_u32(h, offset::VERSION),
        seq: read_u64(h, offset::SEQ),
        payload_bytes: read_u64(h, offset::PAYLOAD_BYTES),
        ring_offset: read_u64(h, offset::RING_OFFSET),
        prev: ChainLink::decode(&h[offset::PREV..offset::PREV + 16]),
        attempt: read_u64(h, offset::ATTEMPT),
    })
}

/// Reads and checks the entry at ring offset `at` (the ring's first
/// `ring_bytes` bytes are in use): length, checksum, version, reserved
/// bytes, signature.
pub(crate) fn read_entry<'a>(
    ring: &'a [u8],
    ring_bytes: u64,
    at: u64,
    pool: Uuid,
    key: &VerifyingKey,
) -> EntryRead<'a> {
    let header = match peek_header(ring, at, pool) {
        Ok(h) => h,
        Err(other) => return other,
    };
    let damaged = |why: String| EntryRead::Damaged { header: Some(header), why };
    if header.payload_bytes > ENTRY_BYTES_MAX || at.saturating_add(header.total_bytes()) > ring_bytes {
        return damaged(format!(
            "an entry of {} payload bytes at ring offset {at} does not fit the {ring_bytes}-byte ring",
            header.payload_bytes
        ));
    }
    let start = at as usize;
    let end = start + ENTRY_HEADER_BYTES + header.payload_bytes as usize;
    let Some(bytes) = ring.get(start..end) else {
        return damaged(format!("the ring holds only {} bytes", ring.len()));
    };
    let stored = read_u32(bytes, offset::CRC);
    let computed = codec::crc32c_parts(&[&bytes[..offset::CRC], &[0u8; 4], &bytes[offset::CRC + 4..]]);
    if stored != computed {
        return damaged(format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"));
    }
    if header.format_version > METADATA_FORMAT_VERSION {
        return EntryRead::Newer { found: header.format_version };
    }
    if !(JOURNAL_FORMAT_VERSION_MIN..=METADATA_FORMAT_VERSION).contains(&header.format_version)
        || header.prev.is_none()
        || bytes[offset::RESERVED..offset::SIGNATURE].iter().any(|&b| b != 0)
    {
        return damaged("malformed header (version, link or reserved bytes)".to_string());
    }
    let signature: [u8; SIGNATURE_BYTES] = bytes[offset::SIGNATURE..ENTRY_HEADER_BYTES].try_into().expect("64 bytes");
    let payload = &bytes[ENTRY_HEADER_BYTES..];
    let message = signed_message(&bytes[..offset::SIGNATURE], payload);
    if key.verify(&message, &ed25519_dalek::Signature::from_bytes(&signature)).is_err() {
        return EntryRead::Forged { header };
    }
    EntryRead::Valid { header, payload, digest: digest_of(&signature) }
}

/// Decodes a valid entry's changes.
pub(crate) fn decode_payload(payload: &[u8]) -> Result<Vec<MetaChange>, CodecError> {
    codec::decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{ChunkRuns, MetaChange};
    use crate::SnapshotId;
    use proptest::prelude::*;

    const POOL: Uuid = Uuid::from_u128(7);

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn sample(seq: u64, at: u64) -> EncodedEntry {
        let changes =
            vec![MetaChange::CowRegister { snapshot: SnapshotId(2), chunks: ChunkRuns::from_chunks([1, 2, 9]) }];
        let place = EntryPlace { seq, ring_offset: at, prev: ChainLink::Entry { digest: 5 }, attempt: 0 };
        encode_entry(POOL, place, &encode_payload(&changes).unwrap(), &key())
    }

    fn ring_with(entry: &[u8], at: usize, ring_bytes: usize) -> Vec<u8> {
        let mut ring = vec![0u8; ring_bytes];
        ring[at..at + entry.len()].copy_from_slice(entry);
        ring
    }

    #[test]
    fn round_trip_and_golden_header() {
        let e = sample(42, 8192);
        assert_eq!(e.bytes.len() as u64, BLOCK_BYTES, "a small entry is one block");
        assert_eq!(&e.bytes[..8], b"SANVOLJE");
        assert_eq!(&e.bytes[12..16], &[0, 0, 0, 11]);
        assert_eq!(&e.bytes[32..40], &42u64.to_be_bytes());
        assert_eq!(&e.bytes[48..56], &8192u64.to_be_bytes());
        assert_eq!(&e.bytes[56..64], &1u64.to_be_bytes(), "links to an entry");
        assert_eq!(&e.bytes[64..72], &5u64.to_be_bytes());
        let ring = ring_with(&e.bytes, 8192, 16384);
        match read_entry(&ring, 16384, 8192, POOL, &key().verifying_key()) {
            EntryRead::Valid { header, payload, digest } => {
                assert_eq!((header.seq, header.ring_offset, digest), (42, 8192, e.digest));
                assert_eq!(header.prev, Some(ChainLink::Entry { digest: 5 }));
                assert_eq!(decode_payload(payload).unwrap().len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forged_entry_is_told_from_a_torn_one() {
        let e = sample(1, 0);
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert!(matches!(read_entry(&e.bytes, 4096, 0, POOL, &other), EntryRead::Forged { .. }));
        let mut torn = e.bytes.clone();
        torn[ENTRY_HEADER_BYTES + 3] ^= 1;
        assert!(matches!(read_entry(&torn, 4096, 0, POOL, &key().verifying_key()), EntryRead::Damaged { .. }));
        assert!(matches!(read_entry(&e.bytes, 4096, 0, Uuid::from_u128(8), &other), EntryRead::OtherPool));
        assert!(matches!(read_entry(&[0u8; 4096], 4096, 0, POOL, &other), EntryRead::NotAnEntry));
        // An entry that claims to run past the ring is damaged, never read beyond.
        assert!(matches!(read_entry(&e.bytes, 2048, 0, POOL, &other), EntryRead::Damaged { .. }));
    }

    proptest! {
        #[test]
        fn any_bit_flip_is_detected(bit in any::<proptest::sample::Index>()) {
            let e = sample(9, 0);
            // The zero padding after the payload is not part of the entry.
            let used = ENTRY_HEADER_BYTES + read_u64(&e.bytes, offset::PAYLOAD_BYTES) as usize;
            let bit = bit.index(used * 8);
            let mut flipped = e.bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let read = read_entry(&flipped, 4096, 0, POOL, &key().verifying_key());
            prop_assert!(!matches!(read, EntryRead::Valid { .. }), "bit {} not detected", bit);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..9000), magic in any::<bool>(), at in 0u64..9000) {
            let mut bytes = bytes;
            let at_usize = at as usize;
            if magic && bytes.len() >= at_usize + 32 {
                bytes[at_usize..at_usize + 8].copy_from_slice(&ENTRY_MAGIC);
                bytes[at_usize + 16..at_usize + 32].copy_from_slice(POOL.as_bytes());
            }
            let _ = read_entry(&bytes, bytes.len() as u64, at, POOL, &key().verifying_key());
        }
    }
}
