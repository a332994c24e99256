//! The writer's side of the log as plain state: it numbers records, places
//! them in the ring and turns a batch into the few contiguous file regions
//! to write (one, or two when the batch wraps). The agent does the I/O:
//! write the regions, fdatasync, then acknowledge every write in the batch.
//!
//! Releasing space is two-step on purpose: [`LogAppender::release_superblock`]
//! gives the superblock that moves the tail, and only after it is durable does
//! [`LogAppender::released`] let the ring reuse the space (see the module doc
//! of [`super`]).

use super::record::{RecordHeader, RecordKind, RECORD_HEADER_BYTES};
use super::ring::LogRing;
use super::superblock::{Superblock, DATA_START_BYTES};
use super::{align_up, RECORD_DATA_BYTES_MAX};
use crate::control::frame::FRAME_BYTES_MAX;
use crate::VolumeId;

pub struct LogAppender {
    log_id: u64,
    volume: VolumeId,
    log_bytes: u64,
    ring: LogRing,
    next_seq: u64,
    superblock_generation: u64,
}

/// Bytes to write at one file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub pos: u64,
    pub bytes: Vec<u8>,
}

/// A data record placed in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendedRecord {
    pub seq: u64,
    pub pos: u64,
    pub offset: u64,
    pub length: u32,
}

/// Records appended together: written with one write per region and one
/// fdatasync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_seq: u64,
    pub regions: Vec<Region>,
    pub records: Vec<AppendedRecord>,
    /// Ring bytes the batch is expected to take ([`LogAppender::begin_batch_for`]):
    /// its regions are allocated at that size rather than grown.
    expected_bytes: usize,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn put(&mut self, pos: u64, header: RecordHeader, data: &[u8]) {
        let continues = self.regions.last().is_some_and(|last| last.pos + last.bytes.len() as u64 == pos);
        if !continues {
            let placed: usize = self.regions.iter().map(|r| r.bytes.len()).sum();
            let capacity = self.expected_bytes.saturating_sub(placed);
            self.regions.push(Region { pos, bytes: Vec::with_capacity(capacity) });
        }
        header.encode(data, &mut self.regions.last_mut().expect("just pushed").bytes);
    }
}

impl LogAppender {
    /// A fresh log: its first superblock (write it to both slots: generation
    /// 0 and 1, see [`LogAppender::initial_superblocks`]) and an empty ring.
    pub fn create(log_id: u64, volume: VolumeId, log_bytes: u64) -> LogAppender {
        LogAppender {
            log_id,
            volume,
            log_bytes,
            ring: LogRing::new(log_bytes, DATA_START_BYTES, DATA_START_BYTES),
            next_seq: 1,
            superblock_generation: 1,
        }
    }

    /// Both superblock copies of a fresh log.
    pub fn initial_superblocks(&self) -> [Superblock; 2] {
        let sb = |generation| Superblock {
            generation,
            log_id: self.log_id,
            volume: self.volume,
            log_bytes: self.log_bytes,
            tail_pos: DATA_START_BYTES,
            tail_seq: 1,
        };
        [sb(0), sb(1)]
    }

    /// Continues a scanned log (appends after its last live record).
    pub fn resume(log: &super::ScannedLog) -> LogAppender {
        LogAppender {
            log_id: log.superblock.log_id,
            volume: log.superblock.volume,
            log_bytes: log.superblock.log_bytes,
            ring: log.ring(),
            next_seq: log.next_seq,
            superblock_generation: log.superblock.generation,
        }
    }

    pub fn ring(&self) -> &LogRing {
        &self.ring
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Ring bytes a data record of `length` bytes takes.
    pub fn span_bytes(length: u32) -> u64 {
        align_up(RECORD_HEADER_BYTES as u64 + length as u64)
    }

    /// Whether a write of `length` bytes can be logged at all (in an empty
    /// log; else the caller must split it or bypass the log).
    pub fn fits_ever(&self, length: u32) -> bool {
        length <= RECORD_DATA_BYTES_MAX && self.ring.can_ever_fit(Self::span_bytes(length) + super::RECORD_ALIGN_BYTES)
    }

    pub fn begin_batch(&self) -> Batch {
        self.begin_batch_for(std::iter::empty())
    }

    /// A batch for writes of these data lengths (in the order they will be
    /// pushed; a hint, at most a control frame's limit, [`FRAME_BYTES_MAX`],
    /// since a batch is mirrored in one frame): its bytes are
    /// allocated once, not grown a copy at a time as records are pushed.
    pub fn begin_batch_for(&self, lengths: impl Iterator<Item = usize>) -> Batch {
        let mut expected_bytes = 0usize;
        for length in lengths {
            let span = Self::span_bytes(u32::try_from(length).unwrap_or(u32::MAX)) as usize;
            if expected_bytes + span > FRAME_BYTES_MAX as usize {
                break;
            }
            expected_bytes += span;
        }
        Batch { first_seq: self.next_seq, regions: Vec::new(), records: Vec::new(), expected_bytes }
    }

    /// Adds a write to `batch`, or returns false when the log is too full for
    /// it right now (the batch is unchanged; wait for a release).
    pub fn push(&mut self, batch: &mut Batch, offset: u64, data: &[u8]) -> bool {
        let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if length > RECORD_DATA_BYTES_MAX {
            return false;
        }
        let Some(placement) = self.ring.reserve(Self::span_bytes(length)) else {
            return false;
        };
        let batch_first_seq = batch.first_seq;
        let header = |kind, seq, offset, length| RecordHeader {
            kind,
            log_id: self.log_id,
            volume: self.volume,
            seq,
            batch_first_seq,
            offset,
            length,
        };
        if let Some(wrap_at) = placement.wrap_at {
            let wrap = header(RecordKind::Wrap, self.next_seq, 0, 0);
            batch.put(wrap_at, wrap, &[]);
            self.next_seq += 1;
        }
        let record = header(RecordKind::Data, self.next_seq, offset, length);
        batch.put(placement.pos, record, data);
        batch.records.push(AppendedRecord { seq: self.next_seq, pos: placement.pos, offset, length });
        self.next_seq += 1;
        true
    }

    /// The superblock that makes `tail_pos`/`tail_seq` (the oldest record
    /// still needed, or the head and next sequence number when none is) the
    /// log's tail. Write it at its slot, sync, then call
    /// [`LogAppender::released`].
    pub fn release_superblock(&mut self, tail_pos: u64, tail_seq: u64) -> Superblock {
        self.superblock_generation += 1;
        Superblock {
            generation: self.superblock_generation,
            log_id: self.log_id,
            volume: self.volume,
            log_bytes: self.log_bytes,
            tail_pos,
            tail_seq,
        }
    }

    /// The superblock moving the tail to `tail_pos` is durable: the ring may
    /// reuse the space before it.
    pub fn released(&mut self, tail_pos: u64) {
        self.ring.release_to(tail_pos);
    }
}
