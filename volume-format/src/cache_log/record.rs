//! One log record: a 64-byte header, then the data, padded to
//! [`RECORD_ALIGN_BYTES`].
//!
//! Why the header carries `batch_first_seq`: records of one batch reach the
//! disk in one write, and a crash may persist any subset of its sectors. A
//! bad record followed only by records of its *own* batch is a torn batch
//! (never acknowledged); a bad record followed by a record of a *later*
//! batch was durable before that batch was written, so it went bad
//! afterwards: corruption, reported.
//!
//! ```text
//! offset size field
//!      0    8 magic "SVCLOGR1"
//!      8    4 crc32c of header (this field zeroed) + data
//!     12    1 kind (1 data, 2 wrap: continue at the ring's start)
//!     13    3 reserved, zero
//!     16    8 log id (random per log file incarnation)
//!     24    8 volume id
//!     32    8 sequence number
//!     40    8 sequence number of the first record of this record's batch
//!     48    8 volume offset of the data
//!     56    4 data length in bytes
//!     60    4 reserved, zero
//! ```

use crate::codec::crc32c_parts;
use crate::VolumeId;

pub const RECORD_MAGIC: [u8; 8] = *b"SVCLOGR1";
pub const RECORD_HEADER_BYTES: usize = 64;
/// Every record starts at a multiple of this (a sector: a torn write tears
/// at sector boundaries, and the reader looks for later records there).
pub const RECORD_ALIGN_BYTES: u64 = 512;

mod at {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 8;
    pub const KIND: usize = 12;
    pub const LOG_ID: usize = 16;
    pub const VOLUME: usize = 24;
    pub const SEQ: usize = 32;
    pub const BATCH_FIRST_SEQ: usize = 40;
    pub const OFFSET: usize = 48;
    pub const LENGTH: usize = 56;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A cached write: `length` bytes of data for `offset`.
    Data,
    /// The rest of the ring is unused; the next record is at the ring's start.
    Wrap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub log_id: u64,
    pub volume: VolumeId,
    pub seq: u64,
    pub batch_first_seq: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a header (or its data) did not check out. Not an error by itself:
/// the scanner decides whether a bad record is a torn tail or corruption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordFault {
    BadMagic,
    BadKind(u8),
    NonZeroReserved,
    TooLong(u32),
    Checksum { stored: u32, computed: u32 },
}

impl std::fmt::Display for RecordFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordFault::BadMagic => write!(f, "no record magic"),
            RecordFault::BadKind(kind) => write!(f, "unknown record kind {kind}"),
            RecordFault::NonZeroReserved => write!(f, "reserved header bytes are not zero"),
            RecordFault::TooLong(length) => write!(f, "data length {length} exceeds the record maximum"),
            RecordFault::Checksum { stored, computed } => {
                write!(f, "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
        }
    }
}

impl RecordHeader {
    /// Bytes the record takes in the ring: header + data, aligned.
    pub fn span_bytes(&self) -> u64 {
        let data = if self.kind == RecordKind::Data { self.length as u64 } else { 0 };
        super::align_up(RECORD_HEADER_BYTES as u64 + data)
    }

    fn header_bytes(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut h = [0u8; RECORD_HEADER_BYTES];
        h[at::MAGIC..at::MAGIC + 8].copy_from_slice(&RECORD_MAGIC);
        h[at::KIND] = match self.kind {
            RecordKind::Data => 1,
            RecordKind::Wrap => 2,
        };
        h[at::LOG_ID..at::LOG_ID + 8].copy_from_slice(&self.log_id.to_be_bytes());
        h[at::VOLUME..at::VOLUME + 8].copy_from_slice(&self.volume.0.to_be_bytes());
        h[at::SEQ..at::SEQ + 8].copy_from_slice(&self.seq.to_be_bytes());
        h[at::BATCH_FIRST_SEQ..at::BATCH_FIRST_SEQ + 8].copy_from_slice(&self.batch_first_seq.to_be_bytes());
        h[at::OFFSET..at::OFFSET + 8].copy_from_slice(&self.offset.to_be_bytes());
        h[at::LENGTH..at::LENGTH + 4].copy_from_slice(&self.length.to_be_bytes());
        h
    }

    /// Appends the whole record (header, data, zero padding) to `out`.
    /// `data.len()` must equal `length` for a data record and be empty for a
    /// wrap record.
    pub fn encode(&self, data: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(data.len() as u64, if self.kind == RecordKind::Data { self.length as u64 } else { 0 });
        let mut header = self.header_bytes();
        let crc = crc32c_parts(&[&header, data]);
        header[at::CRC..at::CRC + 4].copy_from_slice(&crc.to_be_bytes());
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(start + self.span_bytes() as usize, 0);
    }

    /// Decodes a header without checking the data checksum (the caller
    /// reads the data, then calls [`RecordHeader::check`]). Returns the
    /// header and its stored crc.
    pub fn decode(bytes: &[u8; RECORD_HEADER_BYTES]) -> Result<(RecordHeader, u32), RecordFault> {
        if bytes[at::MAGIC..at::MAGIC + 8] != RECORD_MAGIC {
            return Err(RecordFault::BadMagic);
        }
        let kind = match bytes[at::KIND] {
            1 => RecordKind::Data,
            2 => RecordKind::Wrap,
            other => return Err(RecordFault::BadKind(other)),
        };
        if bytes[13..16].iter().chain(&bytes[60..64]).any(|&b| b != 0) {
            return Err(RecordFault::NonZeroReserved);
        }
        let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let length = u32::from_be_bytes(bytes[at::LENGTH..at::LENGTH + 4].try_into().expect("4 bytes"));
        if length > super::RECORD_DATA_BYTES_MAX || (kind == RecordKind::Wrap && length != 0) {
            return Err(RecordFault::TooLong(length));
        }
        let stored = u32::from_be_bytes(bytes[at::CRC..at::CRC + 4].try_into().expect("4 bytes"));
        let header = RecordHeader {
            kind,
            log_id: u64_at(at::LOG_ID),
            volume: VolumeId(u64_at(at::VOLUME)),
            seq: u64_at(at::SEQ),
            batch_first_seq: u64_at(at::BATCH_FIRST_SEQ),
            offset: u64_at(at::OFFSET),
            length,
        };
        Ok((header, stored))
    }

    /// Checks the stored crc against this header and `data`.
    pub fn check(&self, stored_crc: u32, data: &[u8]) -> Result<(), RecordFault> {
        let computed = crc32c_parts(&[&self.header_bytes(), data]);
        if computed != stored_crc {
            return Err(RecordFault::Checksum { stored: stored_crc, computed });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Data,
            log_id: 7,
            volume: VolumeId(3),
            seq: 11,
            batch_first_seq: 10,
            offset: 4096,
            length: 5,
        }
    }

    #[test]
    fn round_trip_and_padding() {
        let mut out = Vec::new();
        sample().encode(b"hello", &mut out);
        assert_eq!(out.len(), 512);
        let (header, crc) = RecordHeader::decode(out[..64].try_into().unwrap()).unwrap();
        assert_eq!(header, sample());
        header.check(crc, &out[64..69]).unwrap();
    }

    #[test]
    fn golden_header_layout() {
        let mut out = Vec::new();
        sample().encode(b"hello", &mut out);
        assert_eq!(&out[0..8], b"SVCLOGR1");
        assert_eq!(out[12], 1);
        assert_eq!(&out[16..24], &7u64.to_be_bytes());
        assert_eq!(&out[24..32], &3u64.to_be_bytes());
        assert_eq!(&out[32..40], &11u64.to_be_bytes());
        assert_eq!(&out[40..48], &10u64.to_be_bytes());
        assert_eq!(&out[48..56], &4096u64.to_be_bytes());
        assert_eq!(&out[56..60], &5u32.to_be_bytes());
    }

    #[test]
    fn flipped_data_bit_fails_the_check() {
        let mut out = Vec::new();
        sample().encode(b"hello", &mut out);
        out[66] ^= 0x10;
        let (header, crc) = RecordHeader::decode(out[..64].try_into().unwrap()).unwrap();
        assert!(matches!(header.check(crc, &out[64..69]), Err(RecordFault::Checksum { .. })));
    }
}
