//! The writing side of the journal, as a plain state machine.
//!
//! [`JournalWriter::seal_commit`] turns a batch of changes into the bytes
//! of one commit and the device offsets they go to: normally an entry in the
//! ring, or a commit checkpoint when the batch is too large for an entry, the
//! ring has no room, or the copies must first be brought in step (a new or
//! upgraded pool, a copy that missed a commit). The caller writes the bytes
//! to every target, flushes every copy, and reports which copies took it
//! ([`JournalWriter::commit_written`]). When the ring fills past
//! 1/[`CHECKPOINT_AT_RING_FRACTION`], the sealed commit also carries a
//! covering checkpoint of the state after it, to write once the commit is
//! durable (in the background: later commits do not wait for it) and report
//! with [`JournalWriter::checkpoint_written`].
//!
//! Why no I/O here: the server writes through NBD, the model test through
//! in-memory copies that tear writes and crash at every boundary; both drive
//! this same state machine, so what the test proves is what the server does.
//!
//! Invariants kept:
//! - One commit in flight at a time; its successor is sealed only after it
//!   was reported. (A group commit batches everything that arrived meanwhile.)
//! - An entry never overwrites ring space a durable checkpoint still needs:
//!   the reclaimable tail is the anchor of the newest checkpoint that is
//!   durable on *every* copy (per copy, the oldest of their newest).
//! - A checkpoint is never written over the slot holding a copy's newest
//!   acknowledged checkpoint (or, before the first, its newest format-2
//!   record), so a torn checkpoint leaves the previous one usable.
//! - After a failed entry, the next entry reuses its sequence number and
//!   its ring position, overwriting whatever part of it reached a copy; after
//!   a failed commit checkpoint, the next commit is a commit checkpoint with a
//!   higher number. Either way no copy keeps a refused commit that a restart
//!   would read back, once that next commit is durable on every copy. Until
//!   then the refused commit's outcome is unknown (the server may die and a
//!   restart or a standby load it from a copy that took it), so the server
//!   answers its requests only after a later commit succeeded.

use ed25519_dalek::SigningKey;
use uuid::Uuid;

use super::checkpoint::{encode_checkpoint, Anchor};
use super::entry::{encode_entry, encode_payload, entry_bytes, EntryPlace};
use super::{ChainLink, CHECKPOINT_AT_RING_FRACTION, ENTRY_BYTES_MAX};
use crate::codec::CodecError;
use crate::label::BLOCK_BYTES;
use crate::metadata::{MetaChange, MetadataArea, MetadataError, PoolMetadata};

/// Where one copy of a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index of the metadata copy (as given to the writer).
    pub copy: usize,
    /// Byte offset on that copy's device.
    pub offset: u64,
}

/// A checkpoint ready to be written: `bytes` at every target, a flush of
/// each copy, then [`BLOCK_BYTES`] of zeroes at every `clear_after` target
/// and another flush (clearing format-2 slot headers left inside the ring
/// of an upgraded pool, so they can never be mistaken for the newest state).
#[derive(Debug, Clone)]
pub struct SealedCheckpoint {
    pub number: u64,
    pub anchor: Anchor,
    pub bytes: Vec<u8>,
    pub targets: Vec<Target>,
    pub clear_after: Vec<Target>,
}

#[derive(Debug, Clone)]
pub enum SealedWrite {
    /// One entry: `bytes` (whole blocks) at every target, then a flush of
    /// each copy. One contiguous write per copy, whatever the batch size.
    Entry { ring_offset: u64, bytes: Vec<u8>, targets: Vec<Target> },
    /// A commit checkpoint (see [`SealedCheckpoint`]).
    Checkpoint(SealedCheckpoint),
}

/// A sealed commit. Write it, then call [`JournalWriter::commit_written`].
#[derive(Debug, Clone)]
pub struct SealedCommit {
    /// The commit's sequence number, now the metadata's generation.
    pub seq: u64,
    pub write: SealedWrite,
    /// A covering checkpoint to write after this commit is durable on every
    /// copy (and only then), then report with
    /// [`JournalWriter::checkpoint_written`]. Void if the commit fails.
    pub checkpoint_after: Option<SealedCheckpoint>,
}

impl SealedCommit {
    /// Bytes this commit writes per copy (for logs and benchmarks).
    pub fn bytes_per_copy(&self) -> usize {
        match &self.write {
            SealedWrite::Entry { bytes, .. } => bytes.len(),
            SealedWrite::Checkpoint(c) => c.bytes.len(),
        }
    }
}

/// What a metadata copy's checkpoint slot holds, as far as the writer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Empty, torn, unreadable, or being written.
    Unusable,
    /// A format-2 whole-pool record (a pool not yet upgraded).
    Legacy { generation: u64 },
    /// A checkpoint. `acked: false` for a commit checkpoint that reached this
    /// copy but not all of them: its state was never acknowledged, so it is
    /// the first slot to overwrite.
    Checkpoint { number: u64, acked: bool },
}

impl SlotState {
    /// Lower is overwritten first; the highest is never overwritten.
    fn rank(self) -> (u8, u64) {
        match self {
            SlotState::Unusable => (0, 0),
            SlotState::Checkpoint { number, acked: false } => (1, number),
            SlotState::Legacy { generation } => (2, generation),
            SlotState::Checkpoint { number, acked: true } => (3, number),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("commit {seq} is still being written; report it before sealing the next")]
    CommitInFlight { seq: u64 },
    #[error(
        "this batch must be committed as a checkpoint, and a checkpoint is being written; \
         retry once it is reported"
    )]
    CheckpointInFlight,
    #[error("no metadata copy to write to")]
    NoCopies,
    #[error("metadata of pool {found} sealed into the journal of pool {expected}")]
    WrongPool { expected: Uuid, found: Uuid },
    #[error("cannot encode the journal entry: {0}")]
    Encode(CodecError),
    #[error("cannot write a checkpoint: {0}")]
    Checkpoint(MetadataError),
}

/// A commit that did not reach every copy. The writer is ready for the next
/// commit, which supersedes this one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("commit {seq} did not reach every metadata copy (failed: copies {failed_copies:?})")]
pub struct WriteFailed {
    pub seq: u64,
    pub failed_copies: Vec<usize>,
}

#[derive(Debug, Clone)]
pub(crate) struct CopyState {
    pub area: MetadataArea,
    pub active: bool,
    pub slots: [SlotState; 2],
    /// Anchor of this copy's newest acknowledged, durable checkpoint.
    pub anchor: Option<Anchor>,
    /// Format-2 slot headers may remain inside the ring.
    pub clear_ring_slots: bool,
}

#[derive(Debug, Clone)]
enum InFlight {
    Entry { seq: u64, ring_offset: u64, end: u64, digest: u64 },
    Checkpoint { seq: u64, number: u64, anchor: Anchor, slots: Vec<Option<(usize, SlotState)>> },
}

#[derive(Debug, Clone)]
struct Covering {
    number: u64,
    after_seq: u64,
    anchor: Anchor,
    slots: Vec<Option<(usize, SlotState)>>,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct JournalWriter {
    pool: Uuid,
    copies: Vec<CopyState>,
    ring_bytes: u64,
    next_seq: u64,
    prev: ChainLink,
    head: u64,
    next_checkpoint_number: u64,
    must_checkpoint: Option<String>,
    pinned: Option<u64>,
    /// Failed writes of the next sequence number so far.
    attempt: u64,
    in_flight: Option<InFlight>,
    covering: Option<Covering>,
}

impl JournalWriter {
    /// A writer for a pool that has no metadata yet: its first commit is a
    /// checkpoint with sequence number `first_seq` (the state's generation).
    pub fn for_new_pool(pool: Uuid, areas: &[MetadataArea], first_seq: u64) -> JournalWriter {
        let copies = areas
            .iter()
            .map(|&area| CopyState {
                area,
                active: true,
                slots: [SlotState::Unusable; 2],
                anchor: None,
                clear_ring_slots: true,
            })
            .collect();
        JournalWriter::from_parts(pool, copies, first_seq, 1, Some("a new pool".into()))
    }

    pub(crate) fn from_parts(
        pool: Uuid,
        copies: Vec<CopyState>,
        next_seq: u64,
        next_checkpoint_number: u64,
        must_checkpoint: Option<String>,
    ) -> JournalWriter {
        let mut writer = JournalWriter {
            pool,
            copies,
            ring_bytes: 0,
            next_seq,
            prev: ChainLink::Checkpoint { number: 0 },
            head: 0,
            next_checkpoint_number,
            must_checkpoint,
            pinned: None,
            attempt: 0,
            in_flight: None,
            covering: None,
        };
        writer.ring_bytes = writer.active_ring_bytes();
        writer
    }

    /// Continues the chain a loaded copy ended with.
    pub(crate) fn continue_chain(&mut self, ring_bytes: u64, head: u64, prev: ChainLink) {
        self.ring_bytes = ring_bytes;
        self.head = head;
        self.prev = prev;
    }

    /// The sequence number of the last acknowledged commit: the metadata's
    /// generation once every unacknowledged change is reverted.
    pub fn acked_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Why the next commit will be a checkpoint, if it will.
    pub fn checkpoint_pending(&self) -> Option<&str> {
        self.must_checkpoint.as_deref()
    }

    /// Whether a covering checkpoint is sealed and not yet reported.
    pub fn checkpoint_in_flight(&self) -> bool {
        self.covering.is_some()
    }

    /// Number of metadata copies (active or not).
    pub fn copy_count(&self) -> usize {
        self.copies.len()
    }

    /// The metadata area of copy `i`.
    pub fn area(&self, i: usize) -> Option<MetadataArea> {
        self.copies.get(i).map(|c| c.area)
    }

    /// Bytes of the ring in use by entries a checkpoint does not yet cover.
    pub fn ring_used_bytes(&self) -> u64 {
        self.tail().map_or(0, |t| self.used(self.head, t))
    }

    pub fn ring_bytes(&self) -> u64 {
        self.ring_bytes
    }

    /// Which copies receive writes. A copy that comes back after missing
    /// commits is brought in step by a commit checkpoint first.
    pub fn set_active(&mut self, active: &[bool]) {
        for (i, c) in self.copies.iter_mut().enumerate() {
            let now = active.get(i).copied().unwrap_or(false);
            if now && !c.active {
                c.anchor = None;
                self.must_checkpoint = Some(format!("metadata copy {i} rejoined"));
            }
            c.active = now;
        }
    }

    /// Adds a metadata copy (one that could not be read when the pool was
    /// loaded); it receives writes once [`JournalWriter::set_active`] says
    /// so, and is brought in step by a commit checkpoint first. Returns its
    /// index.
    pub fn add_copy(&mut self, area: MetadataArea) -> usize {
        self.copies.push(CopyState {
            area,
            active: false,
            slots: [SlotState::Unusable; 2],
            anchor: None,
            clear_ring_slots: true,
        });
        self.copies.len() - 1
    }

    fn active(&self) -> impl Iterator<Item = (usize, &CopyState)> {
        self.copies.iter().enumerate().filter(|(_, c)| c.active)
    }

    fn active_ring_bytes(&self) -> u64 {
        self.active().map(|(_, c)| c.area.ring_bytes()).min().unwrap_or(0)
    }

    fn entry_bytes_max(&self) -> u64 {
        ENTRY_BYTES_MAX.min(self.ring_bytes / 4 / BLOCK_BYTES * BLOCK_BYTES)
    }

    /// Ring offset of the oldest entry still needed, if every active copy
    /// has a checkpoint in the current chain.
    fn tail(&self) -> Option<u64> {
        let mut oldest: Option<Anchor> = None;
        for (_, c) in self.active() {
            let a = c.anchor?;
            if oldest.is_none_or(|o| a.state_seq < o.state_seq) {
                oldest = Some(a);
            }
        }
        oldest.map(|a| a.ring_offset)
    }

    fn used(&self, head: u64, tail: u64) -> u64 {
        if head >= tail {
            head - tail
        } else {
            self.ring_bytes - tail + head
        }
    }

    /// Whether an entry of `len` bytes may go at ring offset `at`: inside
    /// the ring and not over space still needed (it may never reach the tail
    /// from behind, so head == tail always means "nothing in use").
    fn fits(&self, at: u64, len: u64, tail: u64) -> bool {
        let head = self.head;
        if len > self.ring_bytes {
            return false;
        }
        if head >= tail {
            (at == head && head + len <= self.ring_bytes) || (at == 0 && head != 0 && len < tail)
        } else {
            at == head && head + len < tail
        }
    }

    fn place(&self, len: u64) -> Option<u64> {
        let tail = self.tail()?;
        match self.pinned {
            Some(at) => self.fits(at, len, tail).then_some(at),
            None => [self.head, 0].into_iter().find(|&at| self.fits(at, len, tail)),
        }
    }

    /// The checkpoint slot of each active copy to write next, with what it
    /// held (to restore if the write is called off).
    fn pick_slots(&mut self) -> Vec<Option<(usize, SlotState)>> {
        self.copies
            .iter_mut()
            .map(|c| {
                if !c.active {
                    return None;
                }
                let slot = if c.slots[0].rank() <= c.slots[1].rank() { 0 } else { 1 };
                let old = std::mem::replace(&mut c.slots[slot], SlotState::Unusable);
                Some((slot, old))
            })
            .collect()
    }

    fn restore_slots(&mut self, slots: &[Option<(usize, SlotState)>]) {
        for (c, s) in self.copies.iter_mut().zip(slots) {
            if let Some((slot, old)) = s {
                c.slots[*slot] = *old;
            }
        }
    }

    fn checkpoint_targets(&self, slots: &[Option<(usize, SlotState)>]) -> Vec<Target> {
        slots
            .iter()
            .enumerate()
            .filter_map(|(copy, s)| {
                let (slot, _) = (*s)?;
                Some(Target { copy, offset: self.copies[copy].area.slot_offset(slot as u32) })
            })
            .collect()
    }

    fn encode_for_active(
        &self,
        meta: &PoolMetadata,
        key: &SigningKey,
        number: u64,
        anchor: &Anchor,
    ) -> Result<Vec<u8>, SealError> {
        // Every copy gets the same bytes; the smallest slot decides the fit.
        let smallest = self.active().map(|(_, c)| c.area).min_by_key(|a| a.slot_bytes).ok_or(SealError::NoCopies)?;
        encode_checkpoint(&smallest, self.pool, number, anchor, meta, key).map_err(SealError::Checkpoint)
    }

    /// Seals the commit of `changes`, which `meta` already includes (they
    /// were applied to it). Sets `meta.generation` to the commit's sequence
    /// number. On error nothing changed (`meta.generation` included).
    pub fn seal_commit(
        &mut self,
        meta: &mut PoolMetadata,
        changes: &[MetaChange],
        key: &SigningKey,
    ) -> Result<SealedCommit, SealError> {
        if let Some(f) = &self.in_flight {
            let seq = match f {
                InFlight::Entry { seq, .. } | InFlight::Checkpoint { seq, .. } => *seq,
            };
            return Err(SealError::CommitInFlight { seq });
        }
        if meta.pool_uuid != self.pool {
            return Err(SealError::WrongPool { expected: self.pool, found: meta.pool_uuid });
        }
        if self.active().next().is_none() {
            return Err(SealError::NoCopies);
        }
        let seq = self.next_seq;
        let previous_generation = meta.generation;
        if self.must_checkpoint.is_none() && self.ring_bytes > 0 {
            let payload = encode_payload(changes).map_err(SealError::Encode)?;
            let len = entry_bytes(payload.len() as u64);
            if let Some(at) = (len <= self.entry_bytes_max()).then(|| self.place(len)).flatten() {
                let place = EntryPlace { seq, ring_offset: at, prev: self.prev, attempt: self.attempt };
                let entry = encode_entry(self.pool, place, &payload, key);
                meta.generation = seq;
                let end = at + len;
                let due = self.covering.is_none()
                    && self.tail().is_some_and(|t| self.used(end, t) >= self.ring_bytes / CHECKPOINT_AT_RING_FRACTION);
                let checkpoint_after = if due {
                    let number = self.next_checkpoint_number;
                    let anchor = Anchor {
                        state_seq: seq,
                        ring_offset: end,
                        ring_bytes: self.ring_bytes,
                        prev: ChainLink::Entry { digest: entry.digest },
                    };
                    let bytes = match self.encode_for_active(meta, key, number, &anchor) {
                        Ok(b) => b,
                        Err(e) => {
                            meta.generation = previous_generation;
                            return Err(e);
                        }
                    };
                    self.next_checkpoint_number += 1;
                    let slots = self.pick_slots();
                    let targets = self.checkpoint_targets(&slots);
                    self.covering = Some(Covering { number, after_seq: seq, anchor, slots });
                    Some(SealedCheckpoint { number, anchor, bytes, targets, clear_after: Vec::new() })
                } else {
                    None
                };
                let ring_start = |c: &CopyState| c.area.ring().start;
                let targets = self.active().map(|(copy, c)| Target { copy, offset: ring_start(c) + at }).collect();
                self.in_flight = Some(InFlight::Entry { seq, ring_offset: at, end, digest: entry.digest });
                return Ok(SealedCommit {
                    seq,
                    write: SealedWrite::Entry { ring_offset: at, bytes: entry.bytes, targets },
                    checkpoint_after,
                });
            }
        }
        // A commit checkpoint: it starts a new chain at ring offset 0.
        if self.covering.is_some() {
            return Err(SealError::CheckpointInFlight);
        }
        meta.generation = seq;
        let number = self.next_checkpoint_number;
        let anchor = Anchor {
            state_seq: seq,
            ring_offset: 0,
            ring_bytes: self.active_ring_bytes(),
            prev: ChainLink::Checkpoint { number },
        };
        let bytes = match self.encode_for_active(meta, key, number, &anchor) {
            Ok(b) => b,
            Err(e) => {
                meta.generation = previous_generation;
                return Err(e);
            }
        };
        self.next_checkpoint_number += 1;
        let slots = self.pick_slots();
        let targets = self.checkpoint_targets(&slots);
        let clear_after = self
            .active()
            .filter(|(_, c)| c.clear_ring_slots)
            .flat_map(|(copy, c)| {
                (super::CHECKPOINT_SLOTS..c.area.slot_count)
                    .map(move |i| Target { copy, offset: c.area.slot_offset(i) })
            })
            .collect();
        self.in_flight = Some(InFlight::Checkpoint { seq, number, anchor, slots });
        Ok(SealedCommit {
            seq,
            write: SealedWrite::Checkpoint(SealedCheckpoint { number, anchor, bytes, targets, clear_after }),
            checkpoint_after: None,
        })
    }

    /// Reports which copies took the commit `seq` (`written[copy]`, written
    /// and flushed). Only a commit on every active copy is acknowledged.
    pub fn commit_written(&mut self, seq: u64, written: &[bool]) -> Result<(), WriteFailed> {
        let in_flight_seq = match &self.in_flight {
            Some(InFlight::Entry { seq, .. } | InFlight::Checkpoint { seq, .. }) => Some(*seq),
            None => None,
        };
        if in_flight_seq != Some(seq) {
            return Err(WriteFailed { seq, failed_copies: Vec::new() });
        }
        let ok = |i: usize| written.get(i).copied().unwrap_or(false);
        let failed_copies: Vec<usize> = self.active().map(|(i, _)| i).filter(|&i| !ok(i)).collect();
        let all_ok = failed_copies.is_empty();
        match self.in_flight.take().expect("checked above") {
            InFlight::Entry { seq, ring_offset, end, digest } => {
                if all_ok {
                    self.head = end;
                    self.prev = ChainLink::Entry { digest };
                    self.next_seq = seq + 1;
                    self.pinned = None;
                    self.attempt = 0;
                    return Ok(());
                }
                self.pinned = Some(ring_offset);
                self.attempt += 1;
                if let Some(c) = self.covering.take_if(|c| c.after_seq == seq) {
                    self.restore_slots(&c.slots);
                }
            }
            InFlight::Checkpoint { seq, number, anchor, slots } => {
                for (i, s) in slots.iter().enumerate() {
                    if let Some((slot, _)) = s {
                        self.copies[i].slots[*slot] =
                            if ok(i) { SlotState::Checkpoint { number, acked: all_ok } } else { SlotState::Unusable };
                    }
                }
                if all_ok {
                    for c in self.copies.iter_mut().filter(|c| c.active) {
                        c.anchor = Some(anchor);
                        c.clear_ring_slots = false;
                    }
                    self.ring_bytes = anchor.ring_bytes;
                    self.head = 0;
                    self.prev = anchor.prev;
                    self.next_seq = seq + 1;
                    self.must_checkpoint = None;
                    self.pinned = None;
                    self.attempt = 0;
                    return Ok(());
                }
                self.must_checkpoint = Some(format!("commit checkpoint {number} reached only some copies"));
            }
        }
        Err(WriteFailed { seq, failed_copies })
    }

    /// Reports which copies took the covering checkpoint `number`. A copy
    /// that did not keeps its previous checkpoint (and so the ring space it
    /// needs).
    pub fn checkpoint_written(&mut self, number: u64, written: &[bool]) {
        let Some(c) = self.covering.take_if(|c| c.number == number) else { return };
        for (i, s) in c.slots.iter().enumerate() {
            if let Some((slot, _)) = s {
                let ok = written.get(i).copied().unwrap_or(false);
                let copy = &mut self.copies[i];
                if ok {
                    copy.slots[*slot] = SlotState::Checkpoint { number, acked: true };
                    copy.anchor = Some(c.anchor);
                } else {
                    copy.slots[*slot] = SlotState::Unusable;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::POOL;

    fn area(slot_bytes: u64) -> MetadataArea {
        MetadataArea { offset: 4096, slot_bytes, slot_count: 4 }
    }

    fn writer_with_ring(ring_bytes: u64, tail: u64, head: u64) -> JournalWriter {
        let mut w = JournalWriter::for_new_pool(POOL, &[area(ring_bytes / 2)], 1);
        w.must_checkpoint = None;
        w.copies[0].anchor =
            Some(Anchor { state_seq: 1, ring_offset: tail, ring_bytes, prev: ChainLink::Checkpoint { number: 1 } });
        w.head = head;
        w
    }

    #[test]
    fn placement_never_reaches_the_tail_from_behind() {
        const B: u64 = BLOCK_BYTES;
        // Empty ring, head at the tail.
        let w = writer_with_ring(8 * B, 3 * B, 3 * B);
        assert_eq!(w.place(5 * B), Some(3 * B));
        assert_eq!(w.place(6 * B), None, "would not fit before the end, nor wrapped below the tail");
        assert_eq!(w.place(2 * B), Some(3 * B));
        // Head near the end: wrap to 0 when it does not fit, only below the tail.
        let w = writer_with_ring(8 * B, 3 * B, 7 * B);
        assert_eq!(w.place(B), Some(7 * B));
        assert_eq!(w.place(2 * B), Some(0));
        assert_eq!(w.place(3 * B), None, "would end exactly at the tail");
        // Wrapped: head below the tail.
        let w = writer_with_ring(8 * B, 5 * B, 2 * B);
        assert_eq!(w.place(2 * B), Some(2 * B));
        assert_eq!(w.place(3 * B), None);
        assert_eq!(w.used(2 * B, 5 * B), 5 * B);
        // Pinned after a failure: only that position.
        let mut w = writer_with_ring(8 * B, 3 * B, 7 * B);
        w.pinned = Some(0);
        assert_eq!(w.place(B), Some(0), "goes where the failed entry went, even if it fits at the head");
    }

    #[test]
    fn slot_choice_spares_the_newest_acknowledged() {
        let rank = |a: SlotState, b: SlotState| if a.rank() <= b.rank() { 0 } else { 1 };
        let cp = |number, acked| SlotState::Checkpoint { number, acked };
        assert_eq!(rank(cp(5, true), cp(4, true)), 1);
        assert_eq!(rank(cp(5, false), cp(4, true)), 0, "an unacknowledged checkpoint goes first");
        assert_eq!(rank(SlotState::Legacy { generation: 9 }, cp(2, true)), 0);
        assert_eq!(rank(SlotState::Legacy { generation: 9 }, SlotState::Legacy { generation: 8 }), 1);
        assert_eq!(rank(cp(3, true), SlotState::Unusable), 1);
    }
}
