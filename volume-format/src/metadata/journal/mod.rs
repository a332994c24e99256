//! The metadata journal: a commit costs what changed, not the size of the
//! pool.
//!
//! Before the journal every change rewrote the whole [`PoolMetadata`] (every
//! extent of every volume, every snapshot's copy-on-write map) into a slot
//! of every metadata copy, so a copy-on-write registration on a 1 TiB volume
//! wrote megabytes. Now a commit appends one small **entry** holding the
//! changes ([`MetaChange`]) to a ring next to the slots, and the whole
//! metadata is written only now and then, as a **checkpoint**.
//!
//! # Layout of a metadata area (format 3)
//!
//! The area the label describes keeps its slots (`DeviceLayout`, unchanged,
//! so a pool written by an older release upgrades in place):
//!
//! ```text
//! slot 0, slot 1      checkpoint slots (A/B): the newest valid one wins
//! slot 2 .. slot n-1  the journal ring: entries, block-aligned, wrapping
//! ```
//!
//! With the default 32 MiB area in 4 slots that is two 8 MiB checkpoint
//! slots (as large as a whole-pool slot was) and a 16 MiB ring. An area of
//! only two slots has no ring: every commit is then a checkpoint, which is
//! correct but as slow as before.
//!
//! # Entries (`entry`)
//!
//! One entry per group commit: all the changes the server accepted while the
//! previous commit was being written, in one contiguous write of whole blocks
//! and one flush per copy. An entry carries its sequence number, its
//! position in the ring, a link to what it follows (the previous entry's
//! digest, or the checkpoint that started a new chain), its length, a crc32c
//! and an ed25519 signature by the metadata server's key. The chain makes
//! every stale entry left in the ring (from an earlier lap, or a commit that
//! failed) unmistakable for the next one.
//!
//! # Checkpoints (`checkpoint`)
//!
//! A checkpoint is the format-2 slot record (the whole metadata) plus a
//! trailer: the journal **anchor** (the last commit it includes, where the
//! next entry goes, what that entry links to, the ring size) and a signature.
//! Two kinds:
//! - a *covering* checkpoint copies the state after an entry that is already
//!   durable; it can be written in the background while later entries are
//!   appended (they chain to that entry either way), and it frees the ring
//!   space before its anchor once it is durable on every copy;
//! - a *commit* checkpoint is itself the commit of a batch (one too large for
//!   an entry, the ring full, the first commit of an upgraded pool, or a
//!   copy to bring back in step). It starts a new chain at ring offset 0.
//!
//! # Loading (`load`)
//!
//! Per copy: the newest valid checkpoint, then the entries that chain from
//! its anchor, in order. The replay ends at the first position that holds no
//! entry continuing the chain. If that position is damaged but a valid entry
//! with a higher sequence number exists further on, an acknowledged entry was
//! lost (a later one is only written after the earlier one was durable):
//! loading stops with an error naming the device and byte offset. Otherwise
//! the damage is a torn tail, the commit that was being written when the
//! server died, never acknowledged, and it is ignored. Across copies the one
//! that reached the furthest wins; copies that differ are brought back in
//! step by a commit checkpoint before anything else is written.
//!
//! # Signatures
//!
//! Entries and checkpoints are signed with the metadata server's ed25519 key
//! and verified against the key the server was configured with (which must
//! also be the one the metadata records). A host that can write to a device
//! can damage the metadata but cannot slip in a change: an entry or
//! checkpoint whose checksum holds but whose signature does not is refused
//! loudly rather than skipped. Why ed25519-dalek in this crate rather than a
//! signer trait: refusing forged records is part of decoding the format, and
//! it should not depend on every reader wiring up a verifier; the crate is
//! pure Rust and does no I/O.
//!
//! A format-2 pool (unsigned) is still read, as the upgrade path; a format-2
//! record is refused once a journaled checkpoint with a higher number exists,
//! or if signed entries exist without any checkpoint (a wiped checkpoint
//! pair must not roll the pool back to an old unsigned copy). A host able to
//! wipe every signed record of every copy can still present an old unsigned
//! pool; a server that wants to rule that out refuses format 2 altogether
//! ([`load::LoadOptions::refuse_unsigned`]).
//!
//! # Writing (`writer`)
//!
//! [`JournalWriter`] is the writing side as a plain state machine: it seals
//! commits and checkpoints into bytes and the device offsets they go to, and
//! is told what reached which copy. The server does the I/O (`blockio`), and
//! the model test (`model_tests`) does it over in-memory copies that tear
//! writes and crash at every write boundary.

mod checkpoint;
mod entry;
pub mod load;
pub mod writer;

#[cfg(test)]
mod model_tests;

pub use checkpoint::Anchor;
pub use load::{load, CopyError, CopyImage, LoadError, LoadOptions, Loaded};
pub use writer::{
    JournalWriter, SealError, SealedCheckpoint, SealedCommit, SealedWrite, SlotState, Target, WriteFailed,
};

use crate::label::{ByteRange, BLOCK_BYTES};

use super::MetadataArea;
#[allow(unused_imports)] // for the docs
use super::{MetaChange, PoolMetadata};

/// Checkpoint slots at the start of a format-3 metadata area.
pub const CHECKPOINT_SLOTS: u32 = 2;
/// Bytes after a checkpoint's payload: the journal anchor and the signature.
pub const CHECKPOINT_TRAILER_BYTES: usize = 128;
/// Largest journal entry; a batch that does not fit is committed as a
/// checkpoint (so a huge snapshot merge cannot fill the ring).
pub const ENTRY_BYTES_MAX: u64 = 1 << 20;
/// A covering checkpoint is started once this fraction (1/n) of the ring
/// is in use, so it normally finishes long before the ring is full.
pub const CHECKPOINT_AT_RING_FRACTION: u64 = 2;
/// Length of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;

/// What the next entry of a chain links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainLink {
    /// The previous entry (sequence number one less), by its digest: the
    /// first eight bytes of its signature.
    Entry { digest: u64 },
    /// A commit checkpoint that started a new chain, by its number.
    Checkpoint { number: u64 },
}

impl ChainLink {
    const ENTRY: u64 = 1;
    const CHECKPOINT: u64 = 2;

    fn encode(self) -> [u8; 16] {
        let (kind, value) = match self {
            ChainLink::Entry { digest } => (Self::ENTRY, digest),
            ChainLink::Checkpoint { number } => (Self::CHECKPOINT, number),
        };
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&kind.to_be_bytes());
        out[8..].copy_from_slice(&value.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<ChainLink> {
        let kind = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let value = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        match kind {
            Self::ENTRY => Some(ChainLink::Entry { digest: value }),
            Self::CHECKPOINT => Some(ChainLink::Checkpoint { number: value }),
            _ => None,
        }
    }
}

impl MetadataArea {
    /// The journal ring of a format-3 area: everything after the checkpoint
    /// slots (empty with two slots).
    pub fn ring(&self) -> ByteRange {
        let end = self.offset + u64::from(self.slot_count) * self.slot_bytes;
        let start = self.offset + u64::from(self.slot_count.min(CHECKPOINT_SLOTS)) * self.slot_bytes;
        ByteRange::new(start, end)
    }

    /// Usable bytes of the ring (whole blocks).
    pub fn ring_bytes(&self) -> u64 {
        self.ring().len_bytes() / BLOCK_BYTES * BLOCK_BYTES
    }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The digest an entry is linked by: the first eight bytes of its signature
/// (unique per signed content, and already there).
fn digest_of(signature: &[u8; SIGNATURE_BYTES]) -> u64 {
    read_u64(signature, 0)
}
