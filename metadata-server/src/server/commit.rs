//! The owner's side of the metadata journal: sealing commits.
//!
//! A commit is a batch of [`MetaChange`]s, already applied to the owner's
//! metadata, sealed by the journal writer (a plain state machine in
//! `volume_format::metadata::journal`) into bytes and target offsets: one
//! entry of whole blocks per copy for a small batch, or a whole checkpoint.
//! The owner hands the bytes to the device task as a [`RawWrite`] and gets
//! back which copies took them; the writer then acknowledges the commit (a
//! commit is durable only on every copy) or not. So the owner never waits
//! for a device, and a commit costs what changed: a copy-on-write
//! registration is one 4 KiB write and one flush per copy, whatever the
//! size of the pool.
//!
//! After a commit a *covering checkpoint* may fall due (the ring is half
//! used): it is written in the background, while later commits go on.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use uuid::Uuid;
use volume_format::metadata::journal::{JournalWriter, SealError, SealedCheckpoint, SealedWrite, Target};
use volume_format::metadata::{MetaChange, MetadataArea, PoolMetadata};

use crate::pool::journal::{PoolJournal, RawWrite};
use crate::pool::metadata_holders;

/// Changes sealed into one commit at most: a bound on a batch (its latency),
/// not on correctness (a batch too large for an entry becomes a checkpoint).
pub const COMMIT_BATCH_CHANGES_MAX: usize = 256;

/// The journal writer and where its copies are.
pub struct MetaJournal {
    writer: JournalWriter,
    /// Device of each writer copy, by copy index.
    copies: Vec<Uuid>,
    /// The metadata area of every labelled device (for copies that join).
    areas: HashMap<Uuid, MetadataArea>,
    key: Arc<SigningKey>,
}

/// A sealed commit: write `write`, report with `commit_written`.
#[derive(Debug)]
pub struct Sealed {
    pub seq: u64,
    pub write: RawWrite,
    /// Written after this commit is acknowledged.
    pub checkpoint_after: Option<(u64, RawWrite)>,
}

/// A commit that did not reach every metadata copy it was written to.
#[derive(Debug)]
pub struct CommitFailed {
    pub why: String,
    /// The devices of the copies that did not take it.
    pub failed_devices: Vec<Uuid>,
    /// Whether some copy took it (a failure of every copy is the server's
    /// own: its lease, its network — no device is suspect).
    pub took_some: bool,
}

/// Why a batch could not be sealed.
#[derive(Debug)]
pub enum SealRefused {
    /// A checkpoint is being written and this batch must be one too: seal
    /// again once it is reported.
    WaitForCheckpoint,
    Failed(String),
}

impl MetaJournal {
    pub fn new(journal: PoolJournal, areas: impl IntoIterator<Item = (Uuid, MetadataArea)>) -> MetaJournal {
        MetaJournal {
            writer: journal.writer,
            copies: journal.copies,
            areas: areas.into_iter().collect(),
            key: journal.key,
        }
    }

    /// A device labelled while the server runs (`device add`): its metadata
    /// area, should it ever hold a copy.
    pub fn add_area(&mut self, device: Uuid, area: MetadataArea) {
        self.areas.insert(device, area);
    }

    /// The sequence number of the last acknowledged commit.
    pub fn acked_seq(&self) -> u64 {
        self.writer.acked_seq()
    }

    fn raw(&self, bytes: Vec<u8>, targets: &[Target], clear_after: &[Target], verify: bool, cow: bool) -> RawWrite {
        let at = |t: &Target| (t.copy, self.copies[t.copy], t.offset);
        RawWrite {
            bytes: Bytes::from(bytes),
            targets: targets.iter().map(at).collect(),
            clear_after: clear_after.iter().map(at).collect(),
            verify,
            copies: self.copies.len(),
            registers_cow: cow,
        }
    }

    fn checkpoint(&self, c: SealedCheckpoint, cow: bool) -> (u64, RawWrite) {
        (c.number, self.raw(c.bytes, &c.targets, &c.clear_after, true, cow))
    }

    /// Seals `changes` (already applied to `meta`); sets `meta.generation`
    /// to the commit's sequence number. On error nothing changed.
    pub fn seal(&mut self, meta: &mut PoolMetadata, changes: &[MetaChange]) -> Result<Sealed, SealRefused> {
        // The devices that should hold copies: a new holder joins (it is
        // brought in step by a checkpoint); one no longer holding is idle.
        let holders = metadata_holders(meta);
        for uuid in &holders {
            if self.copies.contains(uuid) {
                continue;
            }
            let Some(area) = self.areas.get(uuid) else {
                return Err(SealRefused::Failed(format!(
                    "device {uuid} holding a metadata copy is not reachable; nothing was changed"
                )));
            };
            self.writer.add_copy(*area);
            self.copies.push(*uuid);
        }
        let active: Vec<bool> = self.copies.iter().map(|c| holders.contains(c)).collect();
        self.writer.set_active(&active);
        let sealed = match self.writer.seal_commit(meta, changes, &self.key) {
            Ok(s) => s,
            Err(SealError::CheckpointInFlight) => return Err(SealRefused::WaitForCheckpoint),
            Err(e) => return Err(SealRefused::Failed(format!("{e}; nothing was changed"))),
        };
        let cow = changes.iter().any(|c| matches!(c, MetaChange::CowRegister { .. }));
        let write = match sealed.write {
            SealedWrite::Entry { bytes, targets, .. } => self.raw(bytes, &targets, &[], false, cow),
            SealedWrite::Checkpoint(c) => self.checkpoint(c, cow).1,
        };
        let checkpoint_after = sealed.checkpoint_after.map(|c| self.checkpoint(c, false));
        Ok(Sealed { seq: sealed.seq, write, checkpoint_after })
    }

    /// Which copies took commit `seq`; `Ok` acknowledges it.
    pub fn commit_written(&mut self, seq: u64, written: &[bool]) -> Result<(), CommitFailed> {
        self.writer.commit_written(seq, written).map_err(|e| CommitFailed {
            why: e.to_string(),
            failed_devices: e.failed_copies.iter().filter_map(|&i| self.copies.get(i).copied()).collect(),
            took_some: written.iter().any(|&w| w),
        })
    }

    /// Which copies took checkpoint `number`.
    pub fn checkpoint_written(&mut self, number: u64, written: &[bool]) {
        self.writer.checkpoint_written(number, written);
    }
}
