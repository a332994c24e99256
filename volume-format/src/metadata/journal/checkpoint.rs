//! Checkpoints: the whole metadata in one of the two checkpoint slots,
//! signed, with the anchor the journal continues from.
//!
//! A checkpoint is a format-3 slot record: the slot header of format 2
//! (`slots`), with the generation field holding the **checkpoint number**
//! (it orders checkpoints; the state's own generation is its last commit's
//! sequence number), the bincode `PoolMetadata`, then a fixed trailer:
//!
//! ```text
//! trailer offset  size  field
//!              0     8  state sequence: the last commit the payload includes
//!              8     8  ring offset where the next entry goes
//!             16     8  ring bytes in use
//!             24    16  link the next entry carries: kind, value
//!             40    24  reserved, zero
//!             64    64  ed25519 signature of header (crc zeroed) + payload
//!                       + trailer bytes 0..64
//! ```
//!
//! The header's crc32c covers header (crc zeroed), payload and trailer.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use uuid::Uuid;

use super::{read_u64, ChainLink, CHECKPOINT_TRAILER_BYTES, SIGNATURE_BYTES};
use crate::codec;
use crate::ids::PublicKey;
use crate::label::BLOCK_BYTES;
use crate::metadata::{
    MetadataArea, MetadataError, PoolMetadata, SlotError, SlotHeader, JOURNAL_FORMAT_VERSION_MIN,
    METADATA_FORMAT_VERSION, SLOT_HEADER_BYTES,
};

mod trailer {
    pub const STATE_SEQ: usize = 0;
    pub const RING_OFFSET: usize = 8;
    pub const RING_BYTES: usize = 16;
    pub const PREV: usize = 24;
    pub const RESERVED: usize = 40;
    pub const SIGNATURE: usize = 64;
}
const _: () = assert!(trailer::SIGNATURE + super::SIGNATURE_BYTES == CHECKPOINT_TRAILER_BYTES);

/// Where the journal continues after a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Anchor {
    /// The last commit the checkpoint includes (its `PoolMetadata::generation`);
    /// the next entry has this plus one.
    pub state_seq: u64,
    /// Where in the ring the next entry goes (or, wrapped, offset 0).
    pub ring_offset: u64,
    /// Bytes of the ring in use (the smallest ring of the copies).
    pub ring_bytes: u64,
    /// What the next entry links to.
    pub prev: ChainLink,
}

/// Encodes checkpoint `number` of `meta`, padded to whole blocks, refusing
/// what a reader would refuse (invalid metadata, a state that is not the
/// anchor's, a record larger than a slot).
pub(crate) fn encode_checkpoint(
    area: &MetadataArea,
    pool: Uuid,
    number: u64,
    anchor: &Anchor,
    meta: &PoolMetadata,
    key: &SigningKey,
) -> Result<Vec<u8>, MetadataError> {
    if meta.pool_uuid != pool {
        return Err(MetadataError::Invalid(format!("metadata of pool {} checkpointed as pool {pool}", meta.pool_uuid)));
    }
    if meta.generation != anchor.state_seq {
        return Err(MetadataError::GenerationMismatch {
            slot_generation: anchor.state_seq,
            metadata_generation: meta.generation,
        });
    }
    if meta.server_public_key.0 != key.verifying_key().to_bytes() {
        return Err(MetadataError::Invalid("the metadata records another server key than the signing one".into()));
    }
    meta.check().map_err(MetadataError::Invalid)?;
    let payload = codec::encode(meta).map_err(MetadataError::Encode)?;
    seal_checkpoint(area, pool, number, anchor, METADATA_FORMAT_VERSION, &payload, key)
}

/// Frames and signs an encoded checkpoint payload of `format_version`.
fn seal_checkpoint(
    area: &MetadataArea,
    pool: Uuid,
    number: u64,
    anchor: &Anchor,
    format_version: u32,
    payload: &[u8],
    key: &SigningKey,
) -> Result<Vec<u8>, MetadataError> {
    let mut header =
        SlotHeader { crc: 0, format_version, pool_uuid: pool, generation: number, payload_bytes: payload.len() as u64 };
    let record_bytes = header.record_bytes();
    if record_bytes > area.slot_bytes {
        return Err(MetadataError::PayloadTooLarge { record_bytes, slot_bytes: area.slot_bytes });
    }
    let mut tail = [0u8; CHECKPOINT_TRAILER_BYTES];
    tail[trailer::STATE_SEQ..trailer::STATE_SEQ + 8].copy_from_slice(&anchor.state_seq.to_be_bytes());
    tail[trailer::RING_OFFSET..trailer::RING_OFFSET + 8].copy_from_slice(&anchor.ring_offset.to_be_bytes());
    tail[trailer::RING_BYTES..trailer::RING_BYTES + 8].copy_from_slice(&anchor.ring_bytes.to_be_bytes());
    tail[trailer::PREV..trailer::PREV + 16].copy_from_slice(&anchor.prev.encode());
    let zeroed = header.encode();
    let signature = key.sign(&signed_message(&zeroed, payload, &tail[..trailer::SIGNATURE])).to_bytes();
    tail[trailer::SIGNATURE..].copy_from_slice(&signature);
    header.crc = codec::crc32c_parts(&[&zeroed, payload, &tail]);
    let padded = record_bytes.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
    let mut record = Vec::with_capacity(padded as usize);
    record.extend_from_slice(&header.encode());
    record.extend_from_slice(payload);
    record.extend_from_slice(&tail);
    record.resize(padded as usize, 0);
    Ok(record)
}

fn signed_message(zeroed_header: &[u8], payload: &[u8], trailer_head: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(zeroed_header.len() + payload.len() + trailer_head.len());
    message.extend_from_slice(zeroed_header);
    message.extend_from_slice(payload);
    message.extend_from_slice(trailer_head);
    message
}

/// What one slot holds, as the journal loader sees it.
#[derive(Debug)]
pub(crate) enum SlotRead {
    /// A valid format-3 checkpoint.
    /// `meta` reads as the current format; `format` is the one written.
    Checkpoint { number: u64, anchor: Anchor, meta: PoolMetadata, format: u32 },
    /// A valid format-1 or format-2 whole-pool record.
    Legacy { generation: u64, meta: PoolMetadata },
    /// Not usable (empty, torn, another pool's, …): never fatal by itself.
    Unusable(SlotError),
    /// Whole, but not signed by the server's key.
    Forged { number: u64 },
    /// Written by a newer sanvol.
    Newer { found: u32 },
}

/// Decodes slot `index`'s bytes (at least its whole record). Checkpoints
/// are only accepted in the checkpoint slots.
pub(crate) fn read_slot(
    area: &MetadataArea,
    index: u32,
    bytes: &[u8],
    pool: Uuid,
    server_key: &PublicKey,
    verifying_key: &VerifyingKey,
) -> SlotRead {
    let header = match SlotHeader::decode(bytes) {
        Ok(h) => h,
        Err(e) => return SlotRead::Unusable(e),
    };
    if header.format_version < JOURNAL_FORMAT_VERSION_MIN {
        return match area.decode_slot(Some(pool), bytes) {
            Ok((generation, meta)) => SlotRead::Legacy { generation, meta },
            Err(SlotError::NewerFormat { found, .. }) => SlotRead::Newer { found },
            Err(e) => SlotRead::Unusable(e),
        };
    }
    if index >= super::CHECKPOINT_SLOTS
        && (JOURNAL_FORMAT_VERSION_MIN..=METADATA_FORMAT_VERSION).contains(&header.format_version)
    {
        return SlotRead::Unusable(SlotError::Inconsistent(format!(
            "a checkpoint in slot {index}, which belongs to the journal ring"
        )));
    }
    if let Err(e) = area.check_length(&header) {
        return SlotRead::Unusable(e);
    }
    let record_bytes = header.record_bytes() as usize;
    let Some(record) = bytes.get(..record_bytes) else {
        return SlotRead::Unusable(SlotError::TooShort { len_bytes: bytes.len(), needed_bytes: record_bytes as u64 });
    };
    let zeroed = SlotHeader { crc: 0, ..header }.encode();
    let payload = &record[SLOT_HEADER_BYTES..record_bytes - CHECKPOINT_TRAILER_BYTES];
    let tail = &record[record_bytes - CHECKPOINT_TRAILER_BYTES..];
    let computed = codec::crc32c_parts(&[&zeroed, payload, tail]);
    if computed != header.crc {
        return SlotRead::Unusable(SlotError::ChecksumMismatch { stored: header.crc, computed });
    }
    // Only a whole record says it is newer: a flipped version bit must read
    // as damage, not as "upgrade sanvol". (Later formats keep this framing.)
    if header.format_version > METADATA_FORMAT_VERSION {
        return SlotRead::Newer { found: header.format_version };
    }
    if let Some(i) = record[48..SLOT_HEADER_BYTES].iter().position(|&b| b != 0) {
        return SlotRead::Unusable(SlotError::ReservedNotZero { offset: 48 + i });
    }
    if header.pool_uuid != pool {
        return SlotRead::Unusable(SlotError::WrongPool { expected: pool, found: header.pool_uuid });
    }
    let signature: [u8; SIGNATURE_BYTES] = tail[trailer::SIGNATURE..].try_into().expect("64 bytes");
    let message = signed_message(&zeroed, payload, &tail[..trailer::SIGNATURE]);
    if verifying_key.verify(&message, &ed25519_dalek::Signature::from_bytes(&signature)).is_err() {
        return SlotRead::Forged { number: header.generation };
    }
    let inconsistent = |why: String| SlotRead::Unusable(SlotError::Inconsistent(why));
    let Some(prev) = ChainLink::decode(&tail[trailer::PREV..trailer::PREV + 16]) else {
        return inconsistent("the checkpoint's journal link is malformed".into());
    };
    if tail[trailer::RESERVED..trailer::SIGNATURE].iter().any(|&b| b != 0) {
        return inconsistent("non-zero reserved trailer bytes".into());
    }
    let anchor = Anchor {
        state_seq: read_u64(tail, trailer::STATE_SEQ),
        ring_offset: read_u64(tail, trailer::RING_OFFSET),
        ring_bytes: read_u64(tail, trailer::RING_BYTES),
        prev,
    };
    if anchor.ring_bytes % BLOCK_BYTES != 0
        || anchor.ring_bytes > area.ring_bytes()
        || anchor.ring_offset > anchor.ring_bytes
        || anchor.ring_offset % BLOCK_BYTES != 0
    {
        return inconsistent(format!(
            "journal anchor at ring offset {} of {} bytes does not fit this device's {}-byte ring",
            anchor.ring_offset,
            anchor.ring_bytes,
            area.ring_bytes()
        ));
    }
    let mut meta = match crate::metadata::payload::decode(header.format_version, payload) {
        Ok(m) => m,
        Err(e) => return SlotRead::Unusable(SlotError::Payload(e)),
    };
    if meta.format_version != header.format_version
        || meta.pool_uuid != pool
        || meta.generation != anchor.state_seq
        || meta.server_public_key != *server_key
    {
        return inconsistent(format!(
            "checkpoint {} says format {} pool {} state {} server key {}, its anchor state {}",
            header.generation,
            meta.format_version,
            meta.pool_uuid,
            meta.generation,
            meta.server_public_key,
            anchor.state_seq
        ));
    }
    // An older journaled format reads as today's; the loader has the next
    // commit rewrite it (`format`).
    let format = std::mem::replace(&mut meta.format_version, METADATA_FORMAT_VERSION);
    if let Err(why) = meta.check() {
        return inconsistent(why);
    }
    SlotRead::Checkpoint { number: header.generation, anchor, meta, format }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::{rich_pool, POOL};
    use proptest::prelude::*;

    const AREA: MetadataArea = MetadataArea { offset: 4096, slot_bytes: 64 << 10, slot_count: 4 };

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn signed_pool() -> PoolMetadata {
        let mut meta = rich_pool();
        meta.server_public_key = PublicKey(key().verifying_key().to_bytes());
        meta.format_version = METADATA_FORMAT_VERSION;
        meta
    }

    fn anchor(meta: &PoolMetadata) -> Anchor {
        Anchor {
            state_seq: meta.generation,
            ring_offset: 8192,
            ring_bytes: 128 << 10,
            prev: ChainLink::Checkpoint { number: 9 },
        }
    }

    fn read(bytes: &[u8], index: u32) -> SlotRead {
        let k = key().verifying_key();
        read_slot(&AREA, index, bytes, POOL, &PublicKey(k.to_bytes()), &k)
    }

    #[test]
    fn round_trip_and_golden_layout() {
        let meta = signed_pool();
        let record = encode_checkpoint(&AREA, POOL, 9, &anchor(&meta), &meta, &key()).unwrap();
        assert_eq!(&record[..8], b"SANVOLMD");
        assert_eq!(&record[12..16], &[0, 0, 0, 11]);
        assert_eq!(&record[32..40], &9u64.to_be_bytes(), "the checkpoint number");
        match read(&record, 0) {
            SlotRead::Checkpoint { number, anchor: a, meta: m, format } => {
                assert_eq!((number, a, m, format), (9, anchor(&meta), meta.clone(), 11));
            }
            other => panic!("{other:?}"),
        }
        // Only the checkpoint slots hold checkpoints.
        assert!(matches!(read(&record, 2), SlotRead::Unusable(_)));
        // The whole-pool reader refuses it clearly instead of misreading it.
        assert_eq!(
            AREA.decode_slot(Some(POOL), &record).unwrap_err(),
            SlotError::Journaled { found: METADATA_FORMAT_VERSION }
        );
    }

    /// A format-3 checkpoint (its payload ends before the volume scopes and
    /// the handover ledger of format 4) reads as format 4 without them.
    #[test]
    fn a_format3_checkpoint_reads_as_format4_without_scopes() {
        let mut meta = signed_pool();
        meta.format_version = 3;
        let mut payload = crate::metadata::payload::encode_format2(&meta).unwrap();
        payload[..4].copy_from_slice(&3u32.to_be_bytes());
        let record = seal_checkpoint(&AREA, POOL, 9, &anchor(&meta), 3, &payload, &key()).unwrap();
        match read(&record, 0) {
            SlotRead::Checkpoint { meta: m, .. } => {
                meta.format_version = METADATA_FORMAT_VERSION;
                assert_eq!(m, meta);
            }
            other => panic!("{other:?}"),
        }
        // And a format-4 one keeps its scopes.
        let mut scoped = signed_pool();
        scoped.client_scopes.push(crate::metadata::ClientScope { key: PublicKey([5; 32]), volumes: vec!["db".into()] });
        let record = encode_checkpoint(&AREA, POOL, 9, &anchor(&scoped), &scoped, &key()).unwrap();
        match read(&record, 0) {
            SlotRead::Checkpoint { meta: m, .. } => {
                assert_eq!(m.scope_of(&PublicKey([5; 32])), Some(&["db".to_string()][..]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forged_checkpoint_is_told_from_a_torn_one() {
        let meta = signed_pool();
        let other = SigningKey::from_bytes(&[4; 32]);
        let mut forged_meta = meta.clone();
        forged_meta.server_public_key = PublicKey(other.verifying_key().to_bytes());
        let forged = encode_checkpoint(&AREA, POOL, 9, &anchor(&meta), &forged_meta, &other).unwrap();
        assert!(matches!(read(&forged, 0), SlotRead::Forged { number: 9 }));
        let mut torn = encode_checkpoint(&AREA, POOL, 9, &anchor(&meta), &meta, &key()).unwrap();
        torn[200] ^= 0x10;
        assert!(matches!(read(&torn, 0), SlotRead::Unusable(SlotError::ChecksumMismatch { .. })));
    }

    #[test]
    fn refuses_to_encode_what_a_reader_would_refuse() {
        let meta = signed_pool();
        let mut wrong = anchor(&meta);
        wrong.state_seq += 1;
        assert!(matches!(
            encode_checkpoint(&AREA, POOL, 9, &wrong, &meta, &key()),
            Err(MetadataError::GenerationMismatch { .. })
        ));
        let small = MetadataArea { offset: 4096, slot_bytes: 1024, slot_count: 4 };
        assert!(matches!(
            encode_checkpoint(&small, POOL, 9, &anchor(&meta), &meta, &key()),
            Err(MetadataError::PayloadTooLarge { .. })
        ));
        let other = SigningKey::from_bytes(&[4; 32]);
        assert!(encode_checkpoint(&AREA, POOL, 9, &anchor(&meta), &meta, &other).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_bit_flip_is_detected(bit in any::<proptest::sample::Index>()) {
            let meta = signed_pool();
            let record = encode_checkpoint(&AREA, POOL, 9, &anchor(&meta), &meta, &key()).unwrap();
            let used = SlotHeader::decode(&record).unwrap().record_bytes() as usize;
            let bit = bit.index(used * 8);
            let mut flipped = record.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let read = read(&flipped, 0);
            prop_assert!(!matches!(read, SlotRead::Checkpoint { .. }), "bit {} not detected", bit);
        }
    }
}
