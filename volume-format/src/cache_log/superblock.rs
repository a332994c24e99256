//! The log file's superblock: which log this is (log id, volume, size) and
//! where its oldest live record is (tail position and sequence number).
//!
//! Why two copies written alternately, each with a generation: a crash in
//! the middle of a superblock write leaves the other copy intact; the
//! reader takes the newest copy whose checksum holds.
//!
//! ```text
//! offset size field (in each 512-byte slot)
//!      0    8 magic "SVCLOGSB"
//!      8    4 crc32c of bytes 0..64 with this field zeroed
//!     12    4 format version (1)
//!     16    8 generation (the newest valid copy wins)
//!     24    8 log id
//!     32    8 volume id
//!     40    8 log file size in bytes
//!     48    8 tail position (file offset of the oldest live record)
//!     56    8 tail sequence number (the sequence expected there)
//! ```

use crate::VolumeId;

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"SVCLOGSB";
pub const SUPERBLOCK_VERSION: u32 = 1;
pub const SUPERBLOCK_SLOT_BYTES: u64 = 512;
/// Where the ring of records starts.
pub const DATA_START_BYTES: u64 = 4096;
const SUPERBLOCK_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    pub log_id: u64,
    pub volume: VolumeId,
    pub log_bytes: u64,
    pub tail_pos: u64,
    pub tail_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error(
        "cache log has no valid superblock (copy A: {a}; copy B: {b}); it is not a sanvol cache log or both \
         copies are damaged: move it aside, and recover the volume's cached writes from the mirror"
    )]
    NoValidCopy { a: String, b: String },
    #[error("cache log superblock says tail {tail_pos} in a log of {log_bytes} bytes: out of range (corrupt)")]
    TailOutOfRange { tail_pos: u64, log_bytes: u64 },
}

impl Superblock {
    /// File offset of the slot this generation is written to.
    pub fn slot_offset(&self) -> u64 {
        (self.generation % 2) * SUPERBLOCK_SLOT_BYTES
    }

    /// The 512-byte slot image for this superblock.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SLOT_BYTES as usize] {
        let mut s = [0u8; SUPERBLOCK_SLOT_BYTES as usize];
        s[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        s[12..16].copy_from_slice(&SUPERBLOCK_VERSION.to_be_bytes());
        for (at, value) in [
            (16, self.generation),
            (24, self.log_id),
            (32, self.volume.0),
            (40, self.log_bytes),
            (48, self.tail_pos),
            (56, self.tail_seq),
        ] {
            s[at..at + 8].copy_from_slice(&value.to_be_bytes());
        }
        let crc = crc32c::crc32c(&s[..SUPERBLOCK_BYTES]);
        s[8..12].copy_from_slice(&crc.to_be_bytes());
        s
    }

    fn decode_slot(slot: &[u8]) -> Result<Superblock, String> {
        if slot.len() < SUPERBLOCK_BYTES {
            return Err("short".into());
        }
        if slot[0..8] != SUPERBLOCK_MAGIC {
            return Err(format!("no magic (first bytes {})", crate::codec::describe_bytes(&slot[0..8])));
        }
        let stored = u32::from_be_bytes(slot[8..12].try_into().expect("4 bytes"));
        let mut copy = [0u8; SUPERBLOCK_BYTES];
        copy.copy_from_slice(&slot[..SUPERBLOCK_BYTES]);
        copy[8..12].fill(0);
        let computed = crc32c::crc32c(&copy);
        if stored != computed {
            return Err(format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"));
        }
        let version = u32::from_be_bytes(slot[12..16].try_into().expect("4 bytes"));
        if version != SUPERBLOCK_VERSION {
            return Err(format!("format version {version}, this build reads {SUPERBLOCK_VERSION}"));
        }
        let u64_at = |i: usize| u64::from_be_bytes(slot[i..i + 8].try_into().expect("8 bytes"));
        Ok(Superblock {
            generation: u64_at(16),
            log_id: u64_at(24),
            volume: VolumeId(u64_at(32)),
            log_bytes: u64_at(40),
            tail_pos: u64_at(48),
            tail_seq: u64_at(56),
        })
    }

    /// The newest valid copy among the two slots (`head` holds at least the
    /// first [`DATA_START_BYTES`] of the file).
    pub fn decode(head: &[u8]) -> Result<Superblock, SuperblockError> {
        let slot = |i: u64| {
            let start = (i * SUPERBLOCK_SLOT_BYTES) as usize;
            head.get(start..start + SUPERBLOCK_SLOT_BYTES as usize).unwrap_or(&[])
        };
        let best = match (Self::decode_slot(slot(0)), Self::decode_slot(slot(1))) {
            (Ok(a), Ok(b)) => Ok(if a.generation >= b.generation { a } else { b }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(a), Err(b)) => Err(SuperblockError::NoValidCopy { a, b }),
        }?;
        let in_ring = best.tail_pos >= DATA_START_BYTES
            && best.tail_pos < best.log_bytes
            && (best.tail_pos - DATA_START_BYTES) % super::RECORD_ALIGN_BYTES == 0;
        if !in_ring {
            return Err(SuperblockError::TailOutOfRange { tail_pos: best.tail_pos, log_bytes: best.log_bytes });
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(generation: u64) -> Superblock {
        Superblock { generation, log_id: 9, volume: VolumeId(2), log_bytes: 1 << 20, tail_pos: 4096, tail_seq: 1 }
    }

    fn image(copies: &[Superblock]) -> Vec<u8> {
        let mut head = vec![0u8; DATA_START_BYTES as usize];
        for copy in copies {
            let at = copy.slot_offset() as usize;
            head[at..at + 512].copy_from_slice(&copy.encode());
        }
        head
    }

    #[test]
    fn newest_valid_copy_wins() {
        let head = image(&[sb(4), sb(5)]);
        assert_eq!(Superblock::decode(&head).unwrap().generation, 5);
        let mut torn = head.clone();
        torn[512 + 20] ^= 1; // copy B (generation 5) damaged
        assert_eq!(Superblock::decode(&torn).unwrap().generation, 4);
    }

    #[test]
    fn blank_file_is_refused_with_advice() {
        let err = Superblock::decode(&[0u8; 4096]).unwrap_err();
        assert!(err.to_string().contains("not a sanvol cache log"), "{err}");
    }
}
