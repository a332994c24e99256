//! Atomic commits of the pool metadata into the slots of a metadata area.
//!
//! The metadata area of a device is split into `slot_count` equal slots. A
//! commit writes generation g+1 into the slot holding the oldest (or an
//! invalid) generation, so the newest valid generation is never overwritten;
//! a reader takes the newest slot whose checksum holds and whose pool UUID
//! matches. A write torn by a crash leaves that slot invalid and the previous
//! generation intact: a torn or corrupted slot is never fatal as long as one
//! valid slot remains.
//!
//! Everything here is over byte buffers, so the server can do the I/O
//! through NBD and tests can tear writes at will. The header is a fixed,
//! hand-written layout (like the label) so it can be recognised and its
//! length read before the payload is fetched:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SANVOLMD"
//!      8     4  crc32c of header (this field zeroed) + payload
//!     12     4  metadata format version
//!     16    16  pool UUID
//!     32     8  generation
//!     40     8  payload length, bytes
//!     48    16  reserved, zero
//!     64     …  payload: bincode PoolMetadata (codec::config)
//! ```
//!
//! Format 3 (the journal's checkpoints, `super::journal`) keeps this header,
//! with the generation field holding the checkpoint number, and appends a
//! fixed trailer (journal anchor and signature) after the payload. This
//! module writes format 2 ([`LEGACY_SLOT_FORMAT_VERSION`]) for the
//! whole-pool commits that still use it, and reads formats 1 and 2; a
//! format-3 slot is read by the journal loader.

use super::journal::CHECKPOINT_TRAILER_BYTES;
use super::{
    PoolMetadata, JOURNAL_FORMAT_VERSION_MIN, LEGACY_SLOT_FORMAT_VERSION, METADATA_FORMAT_VERSION,
    METADATA_FORMAT_VERSION_MIN,
};
use crate::codec::{self, describe_bytes, CodecError};
use crate::label::{DeviceLabel, BLOCK_BYTES};
use uuid::Uuid;

pub const SLOT_MAGIC: [u8; 8] = *b"SANVOLMD";
pub const SLOT_HEADER_BYTES: usize = 64;

mod offset {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 8;
    pub const VERSION: usize = 12;
    pub const POOL_UUID: usize = 16;
    pub const GENERATION: usize = 32;
    pub const PAYLOAD_BYTES: usize = 40;
    pub const RESERVED: usize = 48;
}
const _: () = assert!(offset::PAYLOAD_BYTES + 8 == offset::RESERVED);
const _: () = assert!(offset::RESERVED <= SLOT_HEADER_BYTES);
const _: () = assert!(SLOT_HEADER_BYTES as u64 <= BLOCK_BYTES);

/// Why one slot could not be used. Never fatal by itself: see
/// [`MetadataArea::choose_newest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("slot is empty (never written)")]
    Empty,
    #[error("slot buffer of {len_bytes} bytes is too short: the record needs {needed_bytes}")]
    TooShort { len_bytes: usize, needed_bytes: u64 },
    #[error("slot does not hold sanvol metadata: first bytes are {}", describe_bytes(.first_bytes))]
    BadMagic { first_bytes: [u8; 8] },
    #[error("slot claims a {payload_bytes}-byte payload but holds at most {payload_bytes_max}")]
    BadLength { payload_bytes: u64, payload_bytes_max: u64 },
    #[error("slot checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn write or corruption")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error(
        "metadata written by a newer sanvol (format {found}); this build supports up to {supported}: \
         upgrade sanvol before using this pool"
    )]
    NewerFormat { found: u32, supported: u32, generation: u64 },
    #[error("metadata format {found} is not supported (this build reads format {supported})")]
    UnsupportedFormat { found: u32, supported: u32 },
    #[error("slot holds a journal checkpoint (format {found}); it is read with the journal loader, not as a whole-pool slot")]
    Journaled { found: u32 },
    #[error("slot has non-zero reserved header bytes at offset {offset}")]
    ReservedNotZero { offset: usize },
    #[error("slot belongs to pool {found}, not pool {expected}")]
    WrongPool { expected: Uuid, found: Uuid },
    #[error("slot payload does not decode: {0}")]
    Payload(CodecError),
    #[error("slot passed its checksum but is inconsistent: {0}")]
    Inconsistent(String),
}

impl SlotError {
    /// A slot that was never written: normal on a fresh device, not worth a
    /// warning.
    pub fn is_empty(&self) -> bool {
        matches!(self, SlotError::Empty)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("refusing to commit invalid pool metadata: {0}")]
    Invalid(String),
    #[error("metadata generation {metadata_generation} does not match the slot generation {slot_generation}")]
    GenerationMismatch { slot_generation: u64, metadata_generation: u64 },
    #[error(transparent)]
    Encode(CodecError),
    #[error(
        "pool metadata needs {record_bytes} bytes but a metadata slot holds {slot_bytes}; \
         the pool has outgrown its metadata area (use a larger extent size or a larger metadata area)"
    )]
    PayloadTooLarge { record_bytes: u64, slot_bytes: u64 },
    #[error("no valid metadata slot: {}", describe_slot_errors(.errors))]
    NoValidSlot { errors: Vec<(u32, SlotError)> },
    #[error(
        "metadata written by a newer sanvol (format {found}); this build supports up to {supported}: \
         upgrade sanvol before using this pool"
    )]
    NewerFormat { found: u32, supported: u32 },
    #[error(
        "slots {first_slot} and {second_slot} both hold generation {generation} with different contents: \
         two metadata servers committed at once; stop all but one and inspect the pool"
    )]
    ConflictingSlots { generation: u64, first_slot: u32, second_slot: u32 },
    #[error(
        "the pool metadata is journaled (format {found}) and this path reads only whole-pool slots; \
         open the pool with the journal (Pool::open_journaled)"
    )]
    Journaled { found: u32 },
}

fn describe_slot_errors(errors: &[(u32, SlotError)]) -> String {
    if errors.is_empty() {
        return "no slots were read".to_string();
    }
    errors.iter().map(|(i, e)| format!("slot {i}: {e}")).collect::<Vec<_>>().join("; ")
}

/// A slot's header, decoded but not yet checked against its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    pub crc: u32,
    pub format_version: u32,
    pub pool_uuid: Uuid,
    pub generation: u64,
    pub payload_bytes: u64,
}

impl SlotHeader {
    /// Total bytes of the record (header + payload, and the checkpoint
    /// trailer from format 3 on) this header announces.
    pub fn record_bytes(&self) -> u64 {
        let trailer = if self.format_version >= 3 { CHECKPOINT_TRAILER_BYTES as u64 } else { 0 };
        (SLOT_HEADER_BYTES as u64).saturating_add(self.payload_bytes).saturating_add(trailer)
    }

    pub(crate) fn encode(&self) -> [u8; SLOT_HEADER_BYTES] {
        let mut h = [0u8; SLOT_HEADER_BYTES];
        h[offset::MAGIC..offset::MAGIC + 8].copy_from_slice(&SLOT_MAGIC);
        h[offset::CRC..offset::CRC + 4].copy_from_slice(&self.crc.to_be_bytes());
        h[offset::VERSION..offset::VERSION + 4].copy_from_slice(&self.format_version.to_be_bytes());
        h[offset::POOL_UUID..offset::POOL_UUID + 16].copy_from_slice(self.pool_uuid.as_bytes());
        h[offset::GENERATION..offset::GENERATION + 8].copy_from_slice(&self.generation.to_be_bytes());
        h[offset::PAYLOAD_BYTES..offset::PAYLOAD_BYTES + 8].copy_from_slice(&self.payload_bytes.to_be_bytes());
        h
    }

    /// Decodes the fixed header fields; checks magic only (the checksum
    /// needs the payload).
    pub fn decode(bytes: &[u8]) -> Result<SlotHeader, SlotError> {
        let Some(h) = bytes.get(..SLOT_HEADER_BYTES) else {
            return Err(SlotError::TooShort { len_bytes: bytes.len(), needed_bytes: SLOT_HEADER_BYTES as u64 });
        };
        if h.iter().all(|&b| b == 0) {
            return Err(SlotError::Empty);
        }
        let first_bytes: [u8; 8] = h[..8].try_into().expect("8 bytes");
        if first_bytes != SLOT_MAGIC {
            return Err(SlotError::BadMagic { first_bytes });
        }
        let u32_at = |at: usize| u32::from_be_bytes(h[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        Ok(SlotHeader {
            crc: u32_at(offset::CRC),
            format_version: u32_at(offset::VERSION),
            pool_uuid: Uuid::from_bytes(h[offset::POOL_UUID..offset::POOL_UUID + 16].try_into().expect("16 bytes")),
            generation: u64_at(offset::GENERATION),
            payload_bytes: u64_at(offset::PAYLOAD_BYTES),
        })
    }
}

fn record_crc(header: &SlotHeader, payload: &[u8]) -> u32 {
    let zeroed = SlotHeader { crc: 0, ..*header }.encode();
    codec::crc32c_parts(&[&zeroed, payload])
}

/// The slot that won [`MetadataArea::choose_newest`], and the slots that were
/// unusable (for logging; empty slots included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewestSlot {
    pub index: u32,
    pub generation: u64,
    pub metadata: PoolMetadata,
    pub bad_slots: Vec<(u32, SlotError)>,
}

/// Where a device's metadata slots are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetadataArea {
    /// Byte offset of slot 0 on the device.
    pub offset: u64,
    pub slot_bytes: u64,
    pub slot_count: u32,
}

impl MetadataArea {
    /// The metadata area a (validated) label describes.
    pub fn from_label(label: &DeviceLabel) -> MetadataArea {
        MetadataArea {
            offset: label.layout.metadata.start,
            slot_bytes: label.layout.slot_bytes(),
            slot_count: label.layout.metadata_slot_count,
        }
    }

    /// Byte offset of slot `i` on the device.
    pub fn slot_offset(&self, i: u32) -> u64 {
        assert!(i < self.slot_count, "slot {i} of {}", self.slot_count);
        self.offset + u64::from(i) * self.slot_bytes
    }

    /// Largest payload a slot holds.
    pub fn payload_bytes_max(&self) -> u64 {
        self.slot_bytes.saturating_sub(SLOT_HEADER_BYTES as u64)
    }

    /// Bytes to read from a slot to get its whole record, given its first
    /// [`SLOT_HEADER_BYTES`] (so a reader need not read a whole large slot).
    pub fn record_bytes(&self, header_bytes: &[u8]) -> Result<u64, SlotError> {
        let header = SlotHeader::decode(header_bytes)?;
        self.check_length(&header)?;
        Ok(header.record_bytes())
    }

    pub(crate) fn check_length(&self, header: &SlotHeader) -> Result<(), SlotError> {
        if header.record_bytes() > self.slot_bytes {
            let trailer = header.record_bytes() - SLOT_HEADER_BYTES as u64 - header.payload_bytes.min(self.slot_bytes);
            return Err(SlotError::BadLength {
                payload_bytes: header.payload_bytes,
                payload_bytes_max: self.payload_bytes_max().saturating_sub(trailer),
            });
        }
        Ok(())
    }

    /// Encodes `meta` as the format-2 record of generation `generation`,
    /// padded with zeroes to whole blocks (the write unit). Checks the
    /// metadata first: never write what a reader would refuse.
    ///
    /// Format 2, not the current format: this is the whole-pool commit that
    /// releases before the journal wrote, kept so a pool written this way
    /// stays readable by them until it is opened with the journal.
    pub fn encode_slot(&self, pool: Uuid, generation: u64, meta: &PoolMetadata) -> Result<Vec<u8>, MetadataError> {
        if meta.pool_uuid != pool {
            return Err(MetadataError::Invalid(format!(
                "metadata of pool {} committed as pool {pool}",
                meta.pool_uuid
            )));
        }
        if meta.generation != generation || generation == 0 {
            return Err(MetadataError::GenerationMismatch {
                slot_generation: generation,
                metadata_generation: meta.generation,
            });
        }
        meta.check().map_err(MetadataError::Invalid)?;
        let payload = super::payload::encode_format2(meta).map_err(MetadataError::Invalid)?;
        let record_bytes = SLOT_HEADER_BYTES as u64 + payload.len() as u64;
        if record_bytes > self.slot_bytes {
            return Err(MetadataError::PayloadTooLarge { record_bytes, slot_bytes: self.slot_bytes });
        }
        let mut header = SlotHeader {
            crc: 0,
            format_version: LEGACY_SLOT_FORMAT_VERSION,
            pool_uuid: pool,
            generation,
            payload_bytes: payload.len() as u64,
        };
        header.crc = record_crc(&header, &payload);
        let padded_bytes = record_bytes.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let mut record = Vec::with_capacity(padded_bytes as usize);
        record.extend_from_slice(&header.encode());
        record.extend_from_slice(&payload);
        record.resize(padded_bytes as usize, 0);
        Ok(record)
    }

    /// Decodes one format-1 or format-2 slot's bytes (at least its whole
    /// record; more is ignored). With `pool`, a slot of another pool is
    /// refused. A format-3 checkpoint is [`SlotError::Journaled`].
    pub fn decode_slot(&self, pool: Option<Uuid>, bytes: &[u8]) -> Result<(u64, PoolMetadata), SlotError> {
        let header = SlotHeader::decode(bytes)?;
        self.check_length(&header)?;
        let record_bytes = header.record_bytes();
        let Some(payload) = bytes.get(SLOT_HEADER_BYTES..record_bytes as usize) else {
            return Err(SlotError::TooShort { len_bytes: bytes.len(), needed_bytes: record_bytes });
        };
        let computed = record_crc(&header, payload);
        if computed != header.crc {
            return Err(SlotError::ChecksumMismatch { stored: header.crc, computed });
        }
        if (JOURNAL_FORMAT_VERSION_MIN..=METADATA_FORMAT_VERSION).contains(&header.format_version) {
            return Err(SlotError::Journaled { found: header.format_version });
        }
        if header.format_version > METADATA_FORMAT_VERSION {
            return Err(SlotError::NewerFormat {
                found: header.format_version,
                supported: METADATA_FORMAT_VERSION,
                generation: header.generation,
            });
        }
        if header.format_version < METADATA_FORMAT_VERSION_MIN {
            return Err(SlotError::UnsupportedFormat {
                found: header.format_version,
                supported: METADATA_FORMAT_VERSION,
            });
        }
        if let Some(i) = bytes[offset::RESERVED..SLOT_HEADER_BYTES].iter().position(|&b| b != 0) {
            return Err(SlotError::ReservedNotZero { offset: offset::RESERVED + i });
        }
        if let Some(expected) = pool {
            if header.pool_uuid != expected {
                return Err(SlotError::WrongPool { expected, found: header.pool_uuid });
            }
        }
        let mut meta = super::payload::decode(header.format_version, payload).map_err(SlotError::Payload)?;
        if meta.format_version != header.format_version
            || meta.generation != header.generation
            || meta.pool_uuid != header.pool_uuid
        {
            return Err(SlotError::Inconsistent(format!(
                "header says format {} pool {} generation {}, payload says format {} pool {} generation {}",
                header.format_version,
                header.pool_uuid,
                header.generation,
                meta.format_version,
                meta.pool_uuid,
                meta.generation
            )));
        }
        if meta.format_version < METADATA_FORMAT_VERSION {
            // See METADATA_FORMAT_VERSION: older formats decode as the
            // current one (the payload schema did not change after 2); the
            // next journaled commit writes the current format.
            if meta.format_version == 1 && !meta.snapshots.is_empty() {
                return Err(SlotError::Inconsistent("a format-1 record cannot hold snapshots".to_string()));
            }
            meta.format_version = METADATA_FORMAT_VERSION;
        }
        meta.check().map_err(SlotError::Inconsistent)?;
        Ok((header.generation, meta))
    }

    /// Picks the newest valid slot among decode results given in slot order
    /// (or, across devices, in any fixed order: the index is the position).
    ///
    /// Refuses outright if any slot was committed by a newer format: using an
    /// older generation then would silently roll the pool back.
    pub fn choose_newest(
        slots: impl IntoIterator<Item = Result<(u64, PoolMetadata), SlotError>>,
    ) -> Result<NewestSlot, MetadataError> {
        let mut best: Option<(u32, u64, PoolMetadata)> = None;
        let mut bad_slots = Vec::new();
        for (i, slot) in slots.into_iter().enumerate() {
            let i = i as u32;
            match slot {
                Err(SlotError::NewerFormat { found, supported, .. }) => {
                    return Err(MetadataError::NewerFormat { found, supported });
                }
                Err(SlotError::Journaled { found }) => return Err(MetadataError::Journaled { found }),
                Err(e) => bad_slots.push((i, e)),
                Ok((generation, meta)) => match &best {
                    Some((j, g, m)) if *g == generation && *m != meta => {
                        return Err(MetadataError::ConflictingSlots { generation, first_slot: *j, second_slot: i });
                    }
                    Some((_, g, _)) if *g >= generation => {}
                    _ => best = Some((i, generation, meta)),
                },
            }
        }
        match best {
            Some((index, generation, metadata)) => Ok(NewestSlot { index, generation, metadata, bad_slots }),
            None => Err(MetadataError::NoValidSlot { errors: bad_slots }),
        }
    }

    /// The slot the next commit goes to: the first invalid slot, else the
    /// one with the oldest generation. Never the newest valid slot (with at
    /// least two slots), so a torn commit cannot destroy the last good copy.
    /// `generations[i]` is slot `i`'s valid generation; missing entries count
    /// as invalid.
    pub fn next_slot_to_write(&self, generations: &[Option<u64>]) -> u32 {
        let generation = |i: u32| generations.get(i as usize).copied().flatten();
        (0..self.slot_count)
            .min_by_key(|&i| match generation(i) {
                None => (0, 0),
                Some(g) => (1, g),
            })
            .unwrap_or(0)
    }

    /// The generation the next commit must carry: one past the newest valid
    /// slot, so generations only ever increase.
    pub fn next_generation(generations: &[Option<u64>]) -> u64 {
        generations.iter().flatten().max().map_or(1, |g| g + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::{arb_pool, rich_pool, POOL};
    use proptest::prelude::*;

    const AREA: MetadataArea = MetadataArea { offset: 4096, slot_bytes: 256 << 10, slot_count: 4 };

    /// A device's metadata area in memory, written the way the server does.
    struct Device {
        area: MetadataArea,
        bytes: Vec<u8>,
    }

    impl Device {
        fn new(area: MetadataArea) -> Device {
            Device { area, bytes: vec![0; (area.slot_bytes * u64::from(area.slot_count)) as usize] }
        }

        fn slot(&self, i: u32) -> &[u8] {
            let start = (self.area.slot_offset(i) - self.area.offset) as usize;
            &self.bytes[start..start + self.area.slot_bytes as usize]
        }

        fn slot_mut(&mut self, i: u32) -> &mut [u8] {
            let start = (self.area.slot_offset(i) - self.area.offset) as usize;
            &mut self.bytes[start..start + self.area.slot_bytes as usize]
        }

        fn decoded(&self) -> Vec<Result<(u64, PoolMetadata), SlotError>> {
            (0..self.area.slot_count).map(|i| self.area.decode_slot(Some(POOL), self.slot(i))).collect()
        }

        fn generations(&self) -> Vec<Option<u64>> {
            self.decoded().into_iter().map(|r| r.ok().map(|(g, _)| g)).collect()
        }

        fn read(&self) -> Result<NewestSlot, MetadataError> {
            MetadataArea::choose_newest(self.decoded())
        }

        /// Commits `meta` as the next generation; returns the slot written.
        fn commit(&mut self, meta: &mut PoolMetadata) -> u32 {
            let generations = self.generations();
            meta.generation = MetadataArea::next_generation(&generations);
            let slot = self.area.next_slot_to_write(&generations);
            let record = self.area.encode_slot(POOL, meta.generation, meta).unwrap();
            self.slot_mut(slot)[..record.len()].copy_from_slice(&record);
            slot
        }
    }

    #[test]
    fn empty_area_has_no_valid_slot() {
        let device = Device::new(AREA);
        match device.read() {
            Err(MetadataError::NoValidSlot { errors }) => {
                assert_eq!(errors.len(), 4);
                assert!(errors.iter().all(|(_, e)| e.is_empty()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commits_rotate_through_oldest_slots() {
        let mut device = Device::new(AREA);
        let mut meta = rich_pool();
        let mut written = Vec::new();
        for _ in 0..9 {
            written.push(device.commit(&mut meta));
            let newest = device.read().unwrap();
            assert_eq!(newest.generation, meta.generation);
            assert_eq!(newest.metadata, meta);
        }
        assert_eq!(written, vec![0, 1, 2, 3, 0, 1, 2, 3, 0]);
        assert_eq!(device.generations(), vec![Some(9), Some(6), Some(7), Some(8)]);
    }

    #[test]
    fn torn_write_of_newest_falls_back_to_previous() {
        let mut device = Device::new(AREA);
        let mut meta = rich_pool();
        device.commit(&mut meta);
        let previous = meta.clone();
        meta.create_volume("gamma", 1 << 20, 4096, 1, 20).unwrap();
        let record = {
            let generations = device.generations();
            meta.generation = MetadataArea::next_generation(&generations);
            AREA.encode_slot(POOL, meta.generation, &meta).unwrap()
        };
        let slot = AREA.next_slot_to_write(&device.generations());
        // Several ways a write can tear: only the first half landed, the
        // tail is garbage, only the header landed (over an older record).
        let n = AREA.record_bytes(&record).unwrap() as usize;
        type Tear<'a> = Box<dyn Fn(&mut [u8]) + 'a>;
        let tears: Vec<Tear> = vec![
            Box::new(|dst| dst[..n / 2].copy_from_slice(&record[..n / 2])),
            Box::new(|dst| {
                dst[..n].copy_from_slice(&record[..n]);
                dst[n - 100..n].fill(0xa5);
            }),
            Box::new(|dst| dst[..SLOT_HEADER_BYTES].copy_from_slice(&record[..SLOT_HEADER_BYTES])),
        ];
        for tear in tears {
            let mut torn = Device { area: AREA, bytes: device.bytes.clone() };
            tear(torn.slot_mut(slot));
            let newest = torn.read().unwrap();
            assert_eq!(newest.generation, previous.generation);
            assert_eq!(newest.metadata, previous);
            assert!(newest.bad_slots.iter().any(|(i, e)| *i == slot && !e.is_empty()), "{:?}", newest.bad_slots);
            // The next commit reuses the torn slot, never the good one.
            assert_eq!(AREA.next_slot_to_write(&torn.generations()), slot);
        }
    }

    #[test]
    fn corrupted_older_slots_are_not_fatal() {
        let mut device = Device::new(AREA);
        let mut meta = rich_pool();
        for _ in 0..4 {
            device.commit(&mut meta);
        }
        for i in 0..3 {
            device.slot_mut(i)[100] ^= 0xff;
        }
        let newest = device.read().unwrap();
        assert_eq!((newest.index, newest.generation), (3, 4));
        assert_eq!(newest.bad_slots.len(), 3);
    }

    #[test]
    fn wrong_pool_refused() {
        let meta = rich_pool();
        let record = AREA.encode_slot(POOL, meta.generation, &meta).unwrap();
        let other = Uuid::from_u128(8);
        assert_eq!(AREA.decode_slot(Some(other), &record), Err(SlotError::WrongPool { expected: other, found: POOL }));
        assert!(AREA.decode_slot(None, &record).is_ok());
        assert!(matches!(AREA.encode_slot(other, meta.generation, &meta), Err(MetadataError::Invalid(_))));
    }

    /// Writes a record whose header claims `version` and re-seals it (from
    /// format 3 on with a trailer, as the format promises).
    fn with_version(record: &[u8], version: u32) -> Vec<u8> {
        let mut header = SlotHeader::decode(record).unwrap();
        header.format_version = version;
        let mut payload = record[SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + header.payload_bytes as usize].to_vec();
        if version >= 3 {
            payload.extend_from_slice(&[0; crate::metadata::journal::CHECKPOINT_TRAILER_BYTES]);
        }
        header.crc = record_crc(&header, &payload);
        let mut out = header.encode().to_vec();
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn newer_format_refused_clearly() {
        let meta = rich_pool();
        let record = with_version(&AREA.encode_slot(POOL, meta.generation, &meta).unwrap(), 12);
        let err = AREA.decode_slot(Some(POOL), &record).unwrap_err();
        assert_eq!(err, SlotError::NewerFormat { found: 12, supported: 11, generation: meta.generation });
        assert!(
            err.to_string().contains("written by a newer sanvol (format 12); this build supports up to 11"),
            "{err}"
        );

        // Even with an older valid slot around, reading refuses rather than
        // rolling the pool back.
        let mut older = meta.clone();
        older.generation -= 1;
        let older = AREA.decode_slot(Some(POOL), &AREA.encode_slot(POOL, older.generation, &older).unwrap());
        let err = MetadataArea::choose_newest([older.clone(), Err(err)]).unwrap_err();
        assert_eq!(err, MetadataError::NewerFormat { found: 12, supported: 11 });
        assert!(err.to_string().contains("written by a newer sanvol (format 12); this build supports up to 11"));

        // A journaled pool (any journaled format) is refused by the
        // whole-pool reader, never rolled back.
        for found in [3, 4, 5] {
            let journaled = with_version(&AREA.encode_slot(POOL, meta.generation, &meta).unwrap(), found);
            let err = AREA.decode_slot(Some(POOL), &journaled).unwrap_err();
            assert_eq!(err, SlotError::Journaled { found });
            let err = MetadataArea::choose_newest([older.clone(), Err(err)]).unwrap_err();
            assert!(err.to_string().contains("journaled"), "{err}");
        }

        let record = with_version(&record, 0);
        assert!(matches!(AREA.decode_slot(Some(POOL), &record), Err(SlotError::UnsupportedFormat { .. })));
    }

    #[test]
    fn payload_too_large_is_a_clear_error() {
        let small = MetadataArea { offset: 4096, slot_bytes: 512, slot_count: 2 };
        let meta = rich_pool();
        let Err(err) = small.encode_slot(POOL, meta.generation, &meta) else { panic!("record fits 512 bytes") };
        assert!(matches!(err, MetadataError::PayloadTooLarge { slot_bytes: 512, .. }), "{err}");
        assert!(err.to_string().contains("outgrown"));
    }

    #[test]
    fn encode_refuses_invalid_or_mismatched_metadata() {
        let mut meta = rich_pool();
        assert!(matches!(
            AREA.encode_slot(POOL, meta.generation + 1, &meta),
            Err(MetadataError::GenerationMismatch { .. })
        ));
        meta.volumes[0].extents[1] = meta.volumes[0].extents[0].clone();
        assert!(matches!(AREA.encode_slot(POOL, meta.generation, &meta), Err(MetadataError::Invalid(_))));
    }

    #[test]
    fn conflicting_slots_of_one_generation_refused() {
        let a = rich_pool();
        let mut b = a.clone();
        b.pool_name = "other".into();
        let err = MetadataArea::choose_newest([Ok((4, a.clone())), Ok((4, b))]).unwrap_err();
        assert!(matches!(err, MetadataError::ConflictingSlots { generation: 4, first_slot: 0, second_slot: 1 }));
        // Identical copies (e.g. across devices) are fine.
        assert_eq!(MetadataArea::choose_newest([Ok((4, a.clone())), Ok((4, a))]).unwrap().index, 0);
    }

    #[test]
    fn record_bytes_from_header() {
        let meta = rich_pool();
        let record = AREA.encode_slot(POOL, meta.generation, &meta).unwrap();
        let needed = AREA.record_bytes(&record[..SLOT_HEADER_BYTES]).unwrap();
        assert!(needed <= record.len() as u64);
        assert_eq!(record.len() as u64 % BLOCK_BYTES, 0);
        assert!(AREA.decode_slot(Some(POOL), &record[..needed as usize]).is_ok());
        assert!(matches!(
            AREA.decode_slot(Some(POOL), &record[..needed as usize - 1]),
            Err(SlotError::TooShort { .. })
        ));
    }

    /// Pins the header layout: changing it needs a format version bump.
    #[test]
    fn golden_header() {
        let meta = rich_pool();
        let record = AREA.encode_slot(POOL, meta.generation, &meta).unwrap();
        assert_eq!(&record[..8], b"SANVOLMD");
        assert_eq!(&record[12..16], &[0, 0, 0, 2], "format version");
        assert_eq!(&record[16..32], POOL.as_bytes());
        assert_eq!(&record[32..40], &4u64.to_be_bytes(), "generation");
        let payload_bytes = u64::from_be_bytes(record[40..48].try_into().unwrap());
        assert_eq!(payload_bytes, crate::metadata::payload::encode_format2(&meta).unwrap().len() as u64);
        assert!(record[48..64].iter().all(|&b| b == 0));
        // The payload starts with PoolMetadata::format_version.
        assert_eq!(&record[64..68], &[0, 0, 0, 2]);
    }

    /// A format-1 pool (never any snapshot) is read and upgraded in memory;
    /// one claiming snapshots is refused.
    #[test]
    fn format_1_records_are_read_and_upgraded() {
        let mut meta = rich_pool();
        meta.snapshots.clear();
        meta.format_version = 1;
        // encode_slot checks the record first, which wants the current version.
        let mut payload = crate::metadata::payload::encode_format2(&meta).unwrap();
        payload[..4].copy_from_slice(&1u32.to_be_bytes());
        meta.format_version = METADATA_FORMAT_VERSION;
        let mut record = with_version(&AREA.encode_slot(POOL, meta.generation, &meta).unwrap(), 1);
        let mut header = SlotHeader::decode(&record).unwrap();
        assert_eq!(header.payload_bytes, payload.len() as u64, "only the version field differs");
        record.truncate(SLOT_HEADER_BYTES);
        record.extend_from_slice(&payload);
        header.crc = record_crc(&header, &payload);
        record[..SLOT_HEADER_BYTES].copy_from_slice(&header.encode());
        let (_, read) = AREA.decode_slot(Some(POOL), &record).unwrap();
        assert_eq!(read, meta);

        let with_snapshots = rich_pool();
        let mut bad = crate::metadata::payload::encode_format2(&with_snapshots).unwrap();
        bad[..4].copy_from_slice(&1u32.to_be_bytes());
        let mut header =
            SlotHeader::decode(&AREA.encode_slot(POOL, with_snapshots.generation, &with_snapshots).unwrap()).unwrap();
        header.format_version = 1;
        header.crc = record_crc(&header, &bad);
        let mut record = header.encode().to_vec();
        record.extend_from_slice(&bad);
        assert!(matches!(AREA.decode_slot(Some(POOL), &record), Err(SlotError::Inconsistent(_))));
    }

    #[test]
    fn area_from_label() {
        let layout = crate::label::DeviceLayout::plan(1 << 30, 1 << 20, 1 << 20).unwrap();
        let label = DeviceLabel {
            pool_uuid: POOL,
            device_uuid: Uuid::from_u128(1),
            device_index: crate::ids::DeviceIndex(0),
            layout,
            created_at_unix_secs: 0,
        };
        let area = MetadataArea::from_label(&label);
        assert_eq!(area, MetadataArea { offset: 4096, slot_bytes: 256 << 10, slot_count: 4 });
        assert_eq!(area.slot_offset(3) + area.slot_bytes, layout.metadata.end);
    }

    #[test]
    fn next_slot_to_write_cases() {
        let area = MetadataArea { offset: 0, slot_bytes: 1 << 16, slot_count: 4 };
        assert_eq!(area.next_slot_to_write(&[]), 0);
        assert_eq!(area.next_slot_to_write(&[Some(5), None, Some(3), None]), 1);
        assert_eq!(area.next_slot_to_write(&[Some(5), Some(6), Some(3), Some(4)]), 2);
        assert_eq!(area.next_slot_to_write(&[Some(5), Some(6)]), 2, "missing entries are invalid");
        assert_eq!(MetadataArea::next_generation(&[Some(5), None, Some(3)]), 6);
        assert_eq!(MetadataArea::next_generation(&[None, None]), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn pool_metadata_round_trips(meta in arb_pool()) {
            let bytes = crate::codec::encode(&meta).unwrap();
            prop_assert_eq!(crate::codec::decode::<PoolMetadata>(&bytes).unwrap(), meta.clone());
            let record = AREA.encode_slot(POOL, meta.generation, &meta).unwrap();
            let (generation, decoded) = AREA.decode_slot(Some(POOL), &record).unwrap();
            prop_assert_eq!(generation, meta.generation);
            prop_assert_eq!(decoded, meta);
        }

        #[test]
        fn any_bit_flip_in_a_slot_detected(meta in arb_pool(), bit in any::<proptest::sample::Index>()) {
            let record = AREA.encode_slot(POOL, meta.generation, &meta).unwrap();
            // Padding after the record is not part of it: flip within the record.
            let record_bytes = AREA.record_bytes(&record).unwrap() as usize;
            let bit = bit.index(record_bytes * 8);
            let mut flipped = record.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(AREA.decode_slot(Some(POOL), &flipped).is_err(), "bit {} not detected", bit);
        }

        #[test]
        fn next_slot_is_never_the_newest(generations in proptest::collection::vec(proptest::option::of(0u64..50), 2..8)) {
            let area = MetadataArea { offset: 0, slot_bytes: 1 << 16, slot_count: generations.len() as u32 };
            let chosen = area.next_slot_to_write(&generations) as usize;
            match generations[chosen] {
                None => prop_assert!(generations[..chosen].iter().all(Option::is_some), "first invalid slot"),
                Some(g) => {
                    prop_assert!(generations.iter().all(|x| x.is_some_and(|x| x >= g)), "oldest slot");
                }
            }
            let valid = generations.iter().flatten().count();
            if valid >= 1 {
                let newest = generations.iter().flatten().max().copied();
                // Among equal newest generations another copy may be chosen;
                // with a single newest it never is.
                if generations.iter().filter(|g| **g == newest).count() == 1 {
                    prop_assert_ne!(generations[chosen], newest);
                }
            }
            prop_assert!(MetadataArea::next_generation(&generations) > generations.iter().flatten().copied().max().unwrap_or(0));
        }

        #[test]
        fn garbage_slot_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), magic in any::<bool>()) {
            let mut bytes = bytes;
            if magic && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&SLOT_MAGIC);
            }
            let _ = AREA.decode_slot(None, &bytes);
        }
    }
}
