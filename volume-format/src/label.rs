//! The device label: one 4 KiB block at offset 0 of every sanvol device.
//!
//! Why a hand-written fixed layout rather than bincode: the label is how any
//! tool (ours, a future version of ours, `hexdump`, a rescue script) tells a
//! sanvol device from anything else, and finds the metadata on it. Its first
//! bytes must mean the same thing forever, so every field sits at an explicit
//! offset, big-endian (readable in a hex dump), and the block size is checked
//! at compile time.
//!
//! Compatibility promise for future formats: magic at 0..8, crc32c at 8..12
//! (over the whole block with those four bytes zeroed) and format version at
//! 12..16 never move. Everything after may change with the version.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SANVOLDV"
//!      8     4  crc32c of the whole block, this field zeroed
//!     12     4  format version
//!     16    16  pool UUID
//!     32    16  device UUID
//!     48     4  device index
//!     52     4  metadata slot count
//!     56     8  device size, bytes
//!     64     8  metadata area start (inclusive), bytes
//!     72     8  metadata area end (exclusive), bytes
//!     80     8  data area start (inclusive), bytes
//!     88     8  data area end (exclusive), bytes
//!     96     8  extent size, bytes
//!    104     8  created at, unix seconds
//!    112  3984  reserved, zero
//! ```

use crate::codec::describe_bytes;
use crate::ids::DeviceIndex;
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Size of the label, and the alignment of every on-disk area: one block that
/// devices write atomically in practice, and a multiple of every sector size.
pub const LABEL_BYTES: usize = 4096;
/// Alignment of areas and slots on the device. A slot never shares a block
/// with another slot, so a torn write to one cannot damage its neighbour.
pub const BLOCK_BYTES: u64 = 4096;
pub const LABEL_MAGIC: [u8; 8] = *b"SANVOLDV";
/// The label format this build writes and the newest it reads.
pub const LABEL_FORMAT_VERSION: u32 = 1;

/// Smallest extent: one block, so tests can use tiny devices.
pub const EXTENT_BYTES_MIN: u64 = 4096;
/// Largest extent: beyond this, allocation gets too coarse to be useful.
pub const EXTENT_BYTES_MAX: u64 = 1 << 30;
pub const EXTENT_BYTES_DEFAULT: u64 = 64 << 20;

/// At least two slots, so the previous generation survives a torn commit.
pub const METADATA_SLOT_COUNT_MIN: u32 = 2;
pub const METADATA_SLOT_COUNT_MAX: u32 = 16;
pub const METADATA_SLOT_COUNT_DEFAULT: u32 = 4;
/// A slot must hold its header and a small pool.
pub const SLOT_BYTES_MIN: u64 = 16 << 10;
/// Bounded by what the decoder accepts for one record.
pub const SLOT_BYTES_MAX: u64 = crate::codec::RECORD_BYTES_MAX as u64;
/// 4 slots of 8 MiB: room for a few hundred thousand extent legs.
pub const METADATA_AREA_BYTES_DEFAULT: u64 = 32 << 20;

mod offset {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 8;
    pub const VERSION: usize = 12;
    pub const POOL_UUID: usize = 16;
    pub const DEVICE_UUID: usize = 32;
    pub const DEVICE_INDEX: usize = 48;
    pub const SLOT_COUNT: usize = 52;
    pub const DEVICE_BYTES: usize = 56;
    pub const METADATA_START: usize = 64;
    pub const METADATA_END: usize = 72;
    pub const DATA_START: usize = 80;
    pub const DATA_END: usize = 88;
    pub const EXTENT_BYTES: usize = 96;
    pub const CREATED_AT: usize = 104;
    pub const RESERVED: usize = 112;
}
const _: () = assert!(offset::RESERVED <= LABEL_BYTES);
const _: () = assert!(offset::CREATED_AT + 8 == offset::RESERVED);
const _: () = assert!(LABEL_BYTES as u64 == BLOCK_BYTES);

/// A half-open byte range `[start, end)` on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub const fn new(start: u64, end: u64) -> Self {
        ByteRange { start, end }
    }
    /// Length in bytes; zero if the range is inverted.
    pub const fn len_bytes(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub const fn contains(&self, offset: u64) -> bool {
        self.start <= offset && offset < self.end
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label needs {LABEL_BYTES} bytes, got {len_bytes}; read the device's whole first block")]
    TooShort { len_bytes: usize },
    #[error(
        "not a sanvol device: expected magic \"SANVOLDV\" at offset 0, found {}; \
         check the device URI, or initialise the device into a pool",
        describe_bytes(.first_bytes)
    )]
    NotSanvol { first_bytes: [u8; 8] },
    #[error(
        "device label is corrupt: stored crc32c {stored:#010x}, computed {computed:#010x}; \
         the device's first block was damaged or partly overwritten"
    )]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error(
        "device label has format version {found}; this build supports up to {supported}{}",
        if .found > .supported { " (written by a newer sanvol: upgrade this tool)" } else { "" }
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("device label has non-zero reserved bytes at offset {offset}; written by an incompatible tool")]
    ReservedNotZero { offset: usize },
    #[error("device label is inconsistent: {0}")]
    InconsistentBounds(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "extent size {extent_bytes} bytes is not a power of two between {EXTENT_BYTES_MIN} and {EXTENT_BYTES_MAX}"
    )]
    BadExtentSize { extent_bytes: u64 },
    #[error("metadata area cannot be laid out: {0}")]
    BadMetadataArea(String),
    #[error(
        "device of {device_bytes} bytes is too small: the label, metadata area and one extent need \
         {minimum_bytes} bytes; use a bigger device, a smaller extent size or a smaller metadata area"
    )]
    DeviceTooSmall { device_bytes: u64, minimum_bytes: u64 },
}

/// Where the areas of one device go. Computed once when a device joins a
/// pool, then recorded in its label.
///
/// The metadata area is cut into `metadata_slot_count` equal slots. How they
/// are used is the metadata format's business, not the label's: up to
/// format 2 every slot held a whole-pool commit; from format 3 slots 0 and 1
/// hold checkpoints and the rest is the journal ring
/// ([`crate::metadata::journal`]). So a pool upgrades in place, with the
/// same labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceLayout {
    pub device_bytes: u64,
    pub extent_bytes: u64,
    pub metadata: ByteRange,
    pub metadata_slot_count: u32,
    pub data: ByteRange,
}

impl DeviceLayout {
    /// Plans a layout with [`METADATA_SLOT_COUNT_DEFAULT`] slots.
    pub fn plan(device_bytes: u64, extent_bytes: u64, metadata_area_bytes: u64) -> Result<DeviceLayout, LayoutError> {
        Self::plan_with_slots(device_bytes, extent_bytes, metadata_area_bytes, METADATA_SLOT_COUNT_DEFAULT)
    }

    /// Label block, then the metadata area (rounded up so each slot is a
    /// whole number of blocks), then the data area, starting on an extent
    /// boundary so physical extents are naturally aligned, and holding only
    /// whole extents.
    pub fn plan_with_slots(
        device_bytes: u64,
        extent_bytes: u64,
        metadata_area_bytes: u64,
        slot_count: u32,
    ) -> Result<DeviceLayout, LayoutError> {
        if !extent_bytes_valid(extent_bytes) {
            return Err(LayoutError::BadExtentSize { extent_bytes });
        }
        if !(METADATA_SLOT_COUNT_MIN..=METADATA_SLOT_COUNT_MAX).contains(&slot_count) {
            return Err(LayoutError::BadMetadataArea(format!(
                "slot count {slot_count} is outside {METADATA_SLOT_COUNT_MIN}..={METADATA_SLOT_COUNT_MAX}"
            )));
        }
        let slot_bytes = metadata_area_bytes.div_ceil(u64::from(slot_count)).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        if !(SLOT_BYTES_MIN..=SLOT_BYTES_MAX).contains(&slot_bytes) {
            return Err(LayoutError::BadMetadataArea(format!(
                "{metadata_area_bytes} bytes in {slot_count} slots gives {slot_bytes} bytes per slot, \
                 outside {SLOT_BYTES_MIN}..={SLOT_BYTES_MAX}"
            )));
        }
        let metadata_start = LABEL_BYTES as u64;
        let metadata_end = metadata_start + slot_bytes * u64::from(slot_count);
        // The pool lease's sectors go right after the metadata area.
        let data_start = (metadata_end + crate::lease::LEASE_AREA_BYTES).div_ceil(extent_bytes) * extent_bytes;
        let minimum_bytes = data_start + extent_bytes;
        if device_bytes < minimum_bytes {
            return Err(LayoutError::DeviceTooSmall { device_bytes, minimum_bytes });
        }
        let data_end = data_start + (device_bytes - data_start) / extent_bytes * extent_bytes;
        let layout = DeviceLayout {
            device_bytes,
            extent_bytes,
            metadata: ByteRange::new(metadata_start, metadata_end),
            metadata_slot_count: slot_count,
            data: ByteRange::new(data_start, data_end),
        };
        debug_assert_eq!(layout.check(), Ok(()));
        Ok(layout)
    }

    /// Where the pool lease's sectors are on this device (see
    /// [`crate::lease`]): right after the metadata area, if the gap before
    /// the data area holds them. Layouts planned since the lease existed
    /// always have it; older ones have it unless their metadata area ended
    /// within [`crate::lease::LEASE_AREA_BYTES`] of an extent boundary.
    pub fn lease_area(&self) -> Option<ByteRange> {
        let start = self.metadata.end.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let end = start + crate::lease::LEASE_AREA_BYTES;
        (end <= self.data.start).then(|| ByteRange::new(start, end))
    }

    /// Number of whole extents in the data area.
    pub fn extent_count(&self) -> u64 {
        self.data.len_bytes() / self.extent_bytes.max(1)
    }

    /// Bytes in each metadata slot.
    pub fn slot_bytes(&self) -> u64 {
        self.metadata.len_bytes() / u64::from(self.metadata_slot_count.max(1))
    }

    /// Checks every invariant a label relies on; the message names the first
    /// one broken.
    pub fn check(&self) -> Result<(), String> {
        let DeviceLayout { device_bytes, extent_bytes, metadata, metadata_slot_count, data } = *self;
        if !extent_bytes_valid(extent_bytes) {
            return Err(format!(
                "extent size {extent_bytes} is not a power of two in {EXTENT_BYTES_MIN}..={EXTENT_BYTES_MAX}"
            ));
        }
        if !(METADATA_SLOT_COUNT_MIN..=METADATA_SLOT_COUNT_MAX).contains(&metadata_slot_count) {
            return Err(format!(
                "metadata slot count {metadata_slot_count} outside {METADATA_SLOT_COUNT_MIN}..={METADATA_SLOT_COUNT_MAX}"
            ));
        }
        if metadata.start < LABEL_BYTES as u64 {
            return Err(format!("metadata area {metadata} overlaps the label block [0, {LABEL_BYTES})"));
        }
        if metadata.start % BLOCK_BYTES != 0 {
            return Err(format!("metadata area {metadata} does not start on a {BLOCK_BYTES}-byte block"));
        }
        if metadata.is_empty() {
            return Err(format!("metadata area {metadata} is empty"));
        }
        let slot_group_bytes = u64::from(metadata_slot_count) * BLOCK_BYTES;
        if metadata.len_bytes() % slot_group_bytes != 0 {
            return Err(format!(
                "metadata area {metadata} does not divide into {metadata_slot_count} whole-block slots"
            ));
        }
        let slot_bytes = self.slot_bytes();
        if !(SLOT_BYTES_MIN..=SLOT_BYTES_MAX).contains(&slot_bytes) {
            return Err(format!("slot size {slot_bytes} outside {SLOT_BYTES_MIN}..={SLOT_BYTES_MAX}"));
        }
        if data.start < metadata.end {
            return Err(format!("data area {data} overlaps metadata area {metadata}"));
        }
        if data.start % extent_bytes != 0 {
            return Err(format!("data area {data} does not start on an extent boundary ({extent_bytes} bytes)"));
        }
        if data.is_empty() {
            return Err(format!("data area {data} is empty"));
        }
        if data.len_bytes() % extent_bytes != 0 {
            return Err(format!("data area {data} is not a whole number of {extent_bytes}-byte extents"));
        }
        if data.end > device_bytes {
            return Err(format!("data area {data} extends beyond the device size {device_bytes}"));
        }
        Ok(())
    }
}

pub(crate) fn extent_bytes_valid(extent_bytes: u64) -> bool {
    extent_bytes.is_power_of_two() && (EXTENT_BYTES_MIN..=EXTENT_BYTES_MAX).contains(&extent_bytes)
}

/// The decoded label of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceLabel {
    pub pool_uuid: Uuid,
    pub device_uuid: Uuid,
    pub device_index: DeviceIndex,
    pub layout: DeviceLayout,
    pub created_at_unix_secs: u64,
}

impl DeviceLabel {
    /// Encodes the label block. Panics if the layout is inconsistent: labels
    /// are built from [`DeviceLayout::plan`], so that is a bug, and writing a
    /// label no reader would accept must never happen.
    pub fn encode(&self) -> [u8; LABEL_BYTES] {
        if let Err(why) = self.layout.check() {
            panic!("refusing to encode an inconsistent device label: {why}");
        }
        let mut block = [0u8; LABEL_BYTES];
        let l = &self.layout;
        block[offset::MAGIC..offset::MAGIC + 8].copy_from_slice(&LABEL_MAGIC);
        put_u32(&mut block, offset::VERSION, LABEL_FORMAT_VERSION);
        block[offset::POOL_UUID..offset::POOL_UUID + 16].copy_from_slice(self.pool_uuid.as_bytes());
        block[offset::DEVICE_UUID..offset::DEVICE_UUID + 16].copy_from_slice(self.device_uuid.as_bytes());
        put_u32(&mut block, offset::DEVICE_INDEX, self.device_index.0);
        put_u32(&mut block, offset::SLOT_COUNT, l.metadata_slot_count);
        put_u64(&mut block, offset::DEVICE_BYTES, l.device_bytes);
        put_u64(&mut block, offset::METADATA_START, l.metadata.start);
        put_u64(&mut block, offset::METADATA_END, l.metadata.end);
        put_u64(&mut block, offset::DATA_START, l.data.start);
        put_u64(&mut block, offset::DATA_END, l.data.end);
        put_u64(&mut block, offset::EXTENT_BYTES, l.extent_bytes);
        put_u64(&mut block, offset::CREATED_AT, self.created_at_unix_secs);
        let crc = crc32c::crc32c(&block);
        put_u32(&mut block, offset::CRC, crc);
        block
    }

    /// Decodes and validates a label from the first block of a device. Only
    /// the first [`LABEL_BYTES`] of `bytes` are looked at.
    pub fn decode(bytes: &[u8]) -> Result<DeviceLabel, LabelError> {
        let Some(block) = bytes.get(..LABEL_BYTES) else {
            return Err(LabelError::TooShort { len_bytes: bytes.len() });
        };
        let first_bytes: [u8; 8] = block[offset::MAGIC..offset::MAGIC + 8].try_into().expect("8 bytes");
        if first_bytes != LABEL_MAGIC {
            return Err(LabelError::NotSanvol { first_bytes });
        }
        let stored = get_u32(block, offset::CRC);
        let computed = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(&block[..offset::CRC]), &[0u8; 4]),
            &block[offset::CRC + 4..],
        );
        if stored != computed {
            return Err(LabelError::ChecksumMismatch { stored, computed });
        }
        let found = get_u32(block, offset::VERSION);
        if found != LABEL_FORMAT_VERSION {
            return Err(LabelError::UnsupportedVersion { found, supported: LABEL_FORMAT_VERSION });
        }
        if let Some(i) = block[offset::RESERVED..].iter().position(|&b| b != 0) {
            return Err(LabelError::ReservedNotZero { offset: offset::RESERVED + i });
        }
        let label = DeviceLabel {
            pool_uuid: get_uuid(block, offset::POOL_UUID),
            device_uuid: get_uuid(block, offset::DEVICE_UUID),
            device_index: DeviceIndex(get_u32(block, offset::DEVICE_INDEX)),
            layout: DeviceLayout {
                device_bytes: get_u64(block, offset::DEVICE_BYTES),
                extent_bytes: get_u64(block, offset::EXTENT_BYTES),
                metadata: ByteRange::new(get_u64(block, offset::METADATA_START), get_u64(block, offset::METADATA_END)),
                metadata_slot_count: get_u32(block, offset::SLOT_COUNT),
                data: ByteRange::new(get_u64(block, offset::DATA_START), get_u64(block, offset::DATA_END)),
            },
            created_at_unix_secs: get_u64(block, offset::CREATED_AT),
        };
        label.layout.check().map_err(LabelError::InconsistentBounds)?;
        Ok(label)
    }
}

fn put_u32(block: &mut [u8], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u64(block: &mut [u8], at: usize, value: u64) {
    block[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

// The getters index a block whose length was checked against LABEL_BYTES, and
// every offset is a compile-time constant inside it.
fn get_u32(block: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(block: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(block[at..at + 8].try_into().expect("8 bytes"))
}

fn get_uuid(block: &[u8], at: usize) -> Uuid {
    Uuid::from_bytes(block[at..at + 16].try_into().expect("16 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> DeviceLabel {
        DeviceLabel {
            pool_uuid: Uuid::from_u128(0x1111),
            device_uuid: Uuid::from_u128(0x2222),
            device_index: DeviceIndex(3),
            layout: DeviceLayout::plan(1 << 30, 1 << 20, 1 << 20).unwrap(),
            created_at_unix_secs: 1_700_000_000,
        }
    }

    /// Re-seals a hand-modified block so the test reaches the check after
    /// the checksum.
    fn reseal(block: &mut [u8; LABEL_BYTES]) {
        put_u32(block, offset::CRC, 0);
        let crc = crc32c::crc32c(block);
        put_u32(block, offset::CRC, crc);
    }

    #[test]
    fn golden_prefix() {
        let block = sample().encode();
        assert_eq!(&block[..8], b"SANVOLDV");
        assert_eq!(&block[12..16], &[0, 0, 0, 1]);
        assert_eq!(&block[48..52], &[0, 0, 0, 3]);
        assert!(block[offset::RESERVED..].iter().all(|&b| b == 0));
    }

    #[test]
    fn plan_default_layout() {
        let layout = DeviceLayout::plan(10 << 30, EXTENT_BYTES_DEFAULT, METADATA_AREA_BYTES_DEFAULT).unwrap();
        assert_eq!(layout.metadata, ByteRange::new(4096, 4096 + (32 << 20)));
        assert_eq!(layout.slot_bytes(), 8 << 20);
        assert_eq!(layout.data.start, 64 << 20);
        assert_eq!(layout.extent_count(), (10 << 30) / (64 << 20) - 1);
    }

    #[test]
    fn plan_rounds_and_refuses() {
        let layout = DeviceLayout::plan(1 << 30, 1 << 20, 100_000).unwrap();
        assert_eq!(layout.slot_bytes() % BLOCK_BYTES, 0);
        assert!(layout.metadata.len_bytes() >= 100_000);
        assert!(matches!(DeviceLayout::plan(1 << 30, 3 << 20, 1 << 20), Err(LayoutError::BadExtentSize { .. })));
        assert!(matches!(DeviceLayout::plan(1 << 30, 1 << 20, 1024), Err(LayoutError::BadMetadataArea(_))));
        assert!(matches!(
            DeviceLayout::plan_with_slots(1 << 30, 1 << 20, 1 << 20, 1),
            Err(LayoutError::BadMetadataArea(_))
        ));
        let err = DeviceLayout::plan(2 << 20, 1 << 20, 1 << 20).unwrap_err();
        assert_eq!(err, LayoutError::DeviceTooSmall { device_bytes: 2 << 20, minimum_bytes: 3 << 20 });
    }

    #[test]
    fn blank_device_is_not_sanvol() {
        let err = DeviceLabel::decode(&[0u8; 4096]).unwrap_err();
        assert!(matches!(err, LabelError::NotSanvol { .. }));
        assert!(err.to_string().contains("all zeroes"), "{err}");
    }

    #[test]
    fn short_buffer() {
        assert_eq!(DeviceLabel::decode(&[0u8; 512]), Err(LabelError::TooShort { len_bytes: 512 }));
    }

    #[test]
    fn newer_version_refused() {
        let mut block = sample().encode();
        put_u32(&mut block, offset::VERSION, 7);
        reseal(&mut block);
        let err = DeviceLabel::decode(&block).unwrap_err();
        assert_eq!(err, LabelError::UnsupportedVersion { found: 7, supported: 1 });
        assert!(err.to_string().contains("newer sanvol"), "{err}");
    }

    #[test]
    fn reserved_must_be_zero() {
        let mut block = sample().encode();
        block[4000] = 1;
        reseal(&mut block);
        assert_eq!(DeviceLabel::decode(&block), Err(LabelError::ReservedNotZero { offset: 4000 }));
    }

    #[test]
    fn inconsistent_bounds_detected() {
        type Edit = fn(&mut [u8; LABEL_BYTES]);
        let cases: &[(&str, Edit)] = &[
            ("overlaps the label", |b| put_u64(b, offset::METADATA_START, 0)),
            ("overlaps metadata", |b| put_u64(b, offset::DATA_START, 4096)),
            ("beyond the device", |b| put_u64(b, offset::DEVICE_BYTES, 1 << 20)),
            ("power of two", |b| put_u64(b, offset::EXTENT_BYTES, 3 << 20)),
            ("power of two", |b| put_u64(b, offset::EXTENT_BYTES, 1 << 40)),
            ("extent boundary", |b| put_u64(b, offset::DATA_START, (2 << 20) + 4096)),
            ("whole number", |b| put_u64(b, offset::DATA_END, (1 << 30) - 4096)),
            ("slot count", |b| put_u32(b, offset::SLOT_COUNT, 1)),
            ("whole-block slots", |b| put_u32(b, offset::SLOT_COUNT, 3)),
            ("empty", |b| put_u64(b, offset::DATA_END, 2 << 20)),
        ];
        for (want, edit) in cases {
            let mut block = sample().encode();
            edit(&mut block);
            reseal(&mut block);
            match DeviceLabel::decode(&block) {
                Err(LabelError::InconsistentBounds(why)) => assert!(why.contains(want), "{want}: {why}"),
                other => panic!("{want}: expected InconsistentBounds, got {other:?}"),
            }
        }
    }

    fn arb_label() -> impl Strategy<Value = DeviceLabel> {
        (
            any::<u128>(),
            any::<u128>(),
            any::<u32>(),
            12u32..=30,
            1u64..=4096,
            2u32..=8,
            (16u64 << 10)..(64 << 20),
            any::<u64>(),
        )
            .prop_filter_map(
                "device must fit",
                |(pool, device, index, extent_shift, extents, slots, metadata_bytes, created)| {
                    let extent_bytes = 1u64 << extent_shift;
                    let device_bytes = (metadata_bytes * 2 + (8 << 10)).div_ceil(extent_bytes) * extent_bytes
                        + extents * extent_bytes
                        + (device % extent_bytes as u128) as u64;
                    let layout =
                        DeviceLayout::plan_with_slots(device_bytes, extent_bytes, metadata_bytes * slots as u64, slots)
                            .ok()?;
                    Some(DeviceLabel {
                        pool_uuid: Uuid::from_u128(pool),
                        device_uuid: Uuid::from_u128(device),
                        device_index: DeviceIndex(index),
                        layout,
                        created_at_unix_secs: created,
                    })
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(label in arb_label()) {
            let block = label.encode();
            prop_assert_eq!(DeviceLabel::decode(&block), Ok(label));
            // Extra bytes after the label block (the rest of a bigger read) are ignored.
            let mut longer = block.to_vec();
            longer.extend_from_slice(&[0xee; 100]);
            prop_assert_eq!(DeviceLabel::decode(&longer), Ok(label));
        }

        #[test]
        fn any_bit_flip_detected(label in arb_label(), bit in 0usize..LABEL_BYTES * 8) {
            let mut block = label.encode();
            block[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(DeviceLabel::decode(&block).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = DeviceLabel::decode(&bytes);
        }
    }
}
