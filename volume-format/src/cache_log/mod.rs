//! The write-back cache's persistent log: the bytes an agent appends to a
//! local file before it acknowledges a cached write, and the rules for
//! reading them back after a crash.
//!
//! Why a format of its own (not bincode): the log is read after a crash,
//! when any byte may be torn or flipped; a fixed hand-written header at
//! fixed offsets, checked by a crc32c over header *and* data, lets the
//! reader tell "the last batch never finished" (ignored: it was never
//! acknowledged) from "a record in the middle went bad" (reported with file
//! offset and sequence number, never returned as data).
//!
//! # File layout
//!
//! ```text
//!      0  superblock copy A (512 bytes)   newest valid copy wins
//!    512  superblock copy B (512 bytes)
//!   4096  ring of records, each aligned to RECORD_ALIGN_BYTES
//! ```
//!
//! Records are appended at the ring's head in **batches** (one write + one
//! fdatasync for many records; the next batch starts only after the previous
//! one is durable). Space is released from the tail once the records were
//! written to the devices; the superblock records the tail *before* the space
//! is reused, so a reader starting at the superblock's tail never meets a
//! half-overwritten live record.
//!
//! # Modules
//!
//! - [`append`]: the writer's side: records grouped into batches, placed in
//!   the ring, and the superblock that releases space.
//! - [`record`]: the 64-byte record header, encoding and checking a record.
//! - [`superblock`]: the two superblock copies (tail position and sequence).
//! - [`ring`]: space accounting of the ring (where the next record goes,
//!   when the log is full) — a plain type, no I/O.
//! - [`scan`]: reading the log back from the tail: the acknowledged records,
//!   or a corruption error.

pub mod append;
pub mod record;
pub mod ring;
pub mod scan;
pub mod superblock;

pub use append::{AppendedRecord, Batch, LogAppender, Region};
pub use record::{RecordHeader, RecordKind, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES};
pub use ring::{LogRing, Placement};
pub use scan::{read_record, scan, LogSource, ScanError, ScannedLog, ScannedRecord};
pub use superblock::{Superblock, SuperblockError, DATA_START_BYTES, SUPERBLOCK_SLOT_BYTES};

/// Largest data payload of one record (one NBD request of the agent's
/// export is at most 32 MiB; bigger requests are split before logging).
pub const RECORD_DATA_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Rounds `bytes` up to the record alignment.
pub const fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}
