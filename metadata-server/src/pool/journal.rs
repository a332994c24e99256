//! The metadata journal on the pool's devices: reading it at open, and
//! writing commits and checkpoints to every metadata copy.
//!
//! Why: a whole-pool commit ([`Pool::commit`]) writes every volume's extents
//! and every snapshot's copy-on-write map to every copy, so a copy-on-write
//! registration after a snapshot of a 1 TiB volume wrote megabytes three
//! times. Here a commit appends one signed entry holding just the changes
//! (`volume_format::metadata::journal`): one write of whole blocks (4 KiB for
//! a registration) and one flush per copy, whatever the size of the pool.
//! The whole metadata is written only as a checkpoint, when the ring is half
//! used (in the background: commits go on meanwhile) or when a batch is too
//! large for an entry.
//!
//! The format's writer is a plain state machine ([`JournalWriter`]); this
//! module does its I/O. Two ways to use it:
//!
//! - [`Pool::commit_changes`]: applies changes to the caller's metadata,
//!   commits them, and on failure reverts them and supersedes the refused
//!   commit at once. A drop-in for "clone, change, [`Pool::commit`]".
//! - The job API, for an owner loop that must not wait on device I/O:
//!   [`Pool::seal_commit`] (synchronous, cheap) returns a [`CommitJob`] that
//!   owns its device connections and runs on any task
//!   ([`CommitJob::run`]); [`Pool::finish_commit`] takes its outcome back and
//!   may hand out a [`CheckpointJob`] to run in the background
//!   ([`Pool::finish_checkpoint`] takes that outcome back). One commit job at
//!   a time: everything that arrives while it runs is the next batch.
//!
//! Fault points (`SANVOL_FAULT`, see [`control_client::fault`]):
//! `mds-mid-journal-write` and `mds-mid-checkpoint` (the first copy took the
//! bytes, the others may not have), `mds-after-metadata-write` (every copy
//! written, the owner not told); `mds-mid-cow-metadata-write` and
//! `mds-after-cow-metadata-write` the same, counting only the commits that
//! register copy-on-write chunks (a test's count of them does not depend on
//! what else the server commits: lazy write-intent clears, lease renewals).
//!
//! The whole-pool path stays as it is for pools not opened with the journal;
//! the first journaled commit of a format-2 pool upgrades it (a checkpoint in
//! the older checkpoint slot), after which releases without the journal
//! refuse the pool as "written by a newer sanvol".

use std::sync::Arc;

use blockio::client::NbdClient;
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures::future::join_all;
use tracing::{debug, info, warn};
use uuid::Uuid;
use volume_format::label::BLOCK_BYTES;
use volume_format::metadata::journal::{self, CopyImage, JournalWriter, LoadOptions, SealedCheckpoint, SealedWrite};
use volume_format::metadata::{MetaChange, MetadataArea, PoolMetadata, SlotHeader, Undo, SLOT_HEADER_BYTES};
use volume_format::PublicKey;

use super::device::{read_at, IO_BYTES_MAX};
use super::{connect_labelled, connect_recorded, metadata_holders, Pool, PoolDevice, PoolError};

/// The journal state the pool keeps (and hands to an owner that seals
/// commits itself: [`Pool::take_journal`]).
pub struct PoolJournal {
    pub writer: JournalWriter,
    /// The device (UUID) of each writer copy.
    pub copies: Vec<Uuid>,
    pub key: Arc<SigningKey>,
}

/// Raw metadata writes an owner sealed itself: `bytes` at each target
/// (device, byte offset), a flush of each device, optionally a read-back,
/// then a block of zeroes at each `clear_after` target and another flush.
#[derive(Debug, Clone)]
pub struct RawWrite {
    pub bytes: Bytes,
    /// (copy index, device, byte offset).
    pub targets: Vec<(usize, Uuid, u64)>,
    pub clear_after: Vec<(usize, Uuid, u64)>,
    /// Read the bytes back after the flush (checkpoints).
    pub verify: bool,
    /// Number of copies (the length of the `written` answer).
    pub copies: usize,
    /// The commit registers copy-on-write chunks: only the crash tests'
    /// fault points `mds-mid-cow-metadata-write` and
    /// `mds-after-cow-metadata-write` look at it (they count only such
    /// commits, whatever else the server commits meanwhile).
    pub registers_cow: bool,
}

/// Where one copy of a write goes, with the connection to write through.
#[derive(Clone)]
struct CopyTarget {
    copy: usize,
    uri: String,
    client: Option<NbdClient>,
    offset: u64,
}

/// A sealed commit, ready to be written by any task. Owns what it needs.
pub struct CommitJob {
    seq: u64,
    copies: usize,
    write: JobWrite,
    checkpoint_after: Option<CheckpointJob>,
    bytes_per_copy: usize,
}

enum JobWrite {
    Entry { bytes: Bytes, targets: Vec<CopyTarget> },
    Checkpoint(CheckpointJob),
}

/// A sealed checkpoint, ready to be written by any task.
pub struct CheckpointJob {
    number: u64,
    copies: usize,
    bytes: Bytes,
    targets: Vec<CopyTarget>,
    clear_after: Vec<CopyTarget>,
}

impl std::fmt::Debug for CheckpointJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointJob")
            .field("number", &self.number)
            .field("bytes", &self.bytes.len())
            .field("copies", &self.targets.len())
            .finish()
    }
}

impl std::fmt::Debug for CommitJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitJob").field("seq", &self.seq).field("bytes_per_copy", &self.bytes_per_copy).finish()
    }
}

/// What a [`CommitJob`] did; give it to [`Pool::finish_commit`].
pub struct CommitOutcome {
    seq: u64,
    written: Vec<bool>,
    failures: Vec<String>,
    checkpoint_after: Option<CheckpointJob>,
    bytes_per_copy: usize,
    was_checkpoint: bool,
}

/// What a [`CheckpointJob`] did; give it to [`Pool::finish_checkpoint`].
pub struct CheckpointOutcome {
    number: u64,
    written: Vec<bool>,
    failures: Vec<String>,
}

/// An acknowledged commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitReceipt {
    /// The commit's sequence number: the metadata's generation now.
    pub seq: u64,
    /// Bytes written to each metadata copy (4096 for a small batch).
    pub bytes_per_copy: usize,
    /// Whether the commit was a whole checkpoint (an upgrade, a batch too
    /// large for an entry, copies brought back in step).
    pub checkpoint: bool,
}

/// The journal's state, for status output and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalStatus {
    pub acked_seq: u64,
    pub ring_bytes: u64,
    pub ring_used_bytes: u64,
    /// Why the next commit will be a checkpoint, if it will.
    pub checkpoint_pending: Option<String>,
    pub checkpoint_in_flight: bool,
}

impl Pool {
    /// Connects to `uris` and loads the pool with the journal: on every
    /// device that holds a metadata copy, the newest valid checkpoint plus
    /// the journal entries after it (a format-2 pool is read from its
    /// slots). `key` is the server's key: every checkpoint and entry must be
    /// signed by it. Damaged or lagging copies are logged and rewritten by
    /// the first commit; a lost acknowledged entry, a forged record or a
    /// rollback refuse the open with the device and byte offset.
    pub async fn open_journaled(uris: &[NbdUri], key: Arc<SigningKey>) -> Result<(Pool, PoolMetadata), PoolError> {
        let (mut devices, pool_uuid) = connect_labelled(uris).await?;
        let server_key = PublicKey(key.verifying_key().to_bytes());
        let mut read = Vec::new();
        for d in devices.iter().filter(|d| d.label.is_some()) {
            read.push(read_copy(d).await);
        }
        let options = LoadOptions::default();
        // Which devices hold copies is in the metadata itself: load from
        // every labelled device first, then from the holders only.
        let everything: Vec<CopyImage<'_>> = read.iter().map(RawCopy::image).collect();
        let first = journal::load(pool_uuid, &server_key, &everything, options)?;
        let holders = metadata_holders(&first.metadata);
        let held: Vec<&RawCopy> = read.iter().filter(|r| holders.contains(&r.device)).collect();
        let images: Vec<CopyImage<'_>> = held.iter().map(|r| r.image()).collect();
        let loaded = journal::load(pool_uuid, &server_key, &images, options)?;
        for w in &loaded.warnings {
            warn!("{w}");
        }
        let meta = loaded.metadata;
        if meta.server_public_key != server_key {
            return Err(PoolError::Invalid(format!(
                "the pool was initialized for server key {}, but this server's key is {server_key}; \
                 use the key the pool was created with",
                meta.server_public_key
            )));
        }
        info!(
            pool = %meta.pool_uuid,
            name = %meta.pool_name,
            generation = meta.generation,
            copies = held.len(),
            format2 = loaded.legacy,
            "pool metadata loaded from the journal"
        );
        if loaded.legacy {
            info!("the pool metadata is in format 2; the next commit upgrades it to the journal (format 3)");
        }
        connect_recorded(&mut devices, &meta).await;
        let copies = held.iter().map(|r| r.device).collect();
        let generation_attempted = meta.generation;
        let journal = PoolJournal { writer: loaded.writer, copies, key };
        Ok((Pool { pool_uuid, devices, generation_attempted, journal: Some(journal) }, meta))
    }

    /// Hands the journal state to an owner that seals commits itself (and
    /// writes them with [`Pool::write_raw`]); the pool keeps its devices.
    pub fn take_journal(&mut self) -> Option<PoolJournal> {
        self.journal.take()
    }

    /// The metadata area of every labelled device, by device: what a new
    /// metadata copy is written into.
    pub fn metadata_areas(&self) -> Vec<(Uuid, MetadataArea)> {
        self.devices
            .iter()
            .filter_map(|d| Some((d.expected_uuid?, MetadataArea::from_label(d.label.as_ref()?))))
            .collect()
    }

    /// Performs sealed metadata writes on every target concurrently; returns
    /// which copies took them (written, flushed, and read back if asked)
    /// and why the others did not.
    ///
    /// `may_write` is asked again before the blocks are cleared: the
    /// writes, flushes and read-backs take time (and the process may be
    /// stopped in between), and a server that lost the pool lease meanwhile
    /// must not zero blocks of a ring the server now active writes. The
    /// copies whose blocks were not cleared count as not written.
    pub async fn write_raw(&self, write: &RawWrite, may_write: impl Fn() -> bool) -> (Vec<bool>, Vec<String>) {
        let target = |(copy, uuid, offset): &(usize, Uuid, u64)| {
            let device = self.devices.iter().find(|d| d.expected_uuid == Some(*uuid));
            CopyTarget {
                copy: *copy,
                uri: device.map_or_else(|| uuid.to_string(), |d| d.uri.clone()),
                client: device.and_then(|d| d.client.clone()),
                offset: *offset,
            }
        };
        let targets: Vec<CopyTarget> = write.targets.iter().map(target).collect();
        let verify = write.verify.then_some("metadata checkpoint");
        let mut faults = vec![if write.verify { "mds-mid-checkpoint" } else { "mds-mid-journal-write" }];
        if write.registers_cow {
            faults.push("mds-mid-cow-metadata-write");
        }
        let (mut written, mut failures) = write_everywhere(write.copies, &targets, &write.bytes, verify, &faults).await;
        let clears: Vec<CopyTarget> =
            write.clear_after.iter().map(target).filter(|t| written.get(t.copy) == Some(&true)).collect();
        if !clears.is_empty() && !may_write() {
            for t in &clears {
                written[t.copy] = false;
            }
            failures.push(
                "this metadata server lost the pool lease before clearing the blocks after the write; nothing more \
                 was written"
                    .into(),
            );
        } else if !clears.is_empty() {
            let zero = Bytes::from(vec![0u8; BLOCK_BYTES as usize]);
            let (cleared, f) = write_everywhere(write.copies, &clears, &zero, None, &[]).await;
            for t in &clears {
                written[t.copy] &= cleared[t.copy];
            }
            failures.extend(f);
        }
        control_client::fault::hit("mds-after-metadata-write");
        if write.registers_cow {
            control_client::fault::hit("mds-after-cow-metadata-write");
        }
        (written, failures)
    }

    /// Reconnects devices whose connection failed (after a failed write).
    pub async fn reconnect_failed(&mut self) {
        for d in self.devices.iter_mut().filter(|d| d.client.is_none() || d.error.is_some()) {
            if d.label.is_some() {
                if let Err(e) = d.reconnect().await {
                    d.error = Some(e.to_string());
                }
            }
        }
    }

    /// The journal's state, if the pool was opened with it.
    pub fn journal_status(&self) -> Option<JournalStatus> {
        let w = &self.journal.as_ref()?.writer;
        Some(JournalStatus {
            acked_seq: w.acked_seq(),
            ring_bytes: w.ring_bytes(),
            ring_used_bytes: w.ring_used_bytes(),
            checkpoint_pending: w.checkpoint_pending().map(str::to_string),
            checkpoint_in_flight: w.checkpoint_in_flight(),
        })
    }

    /// The generation of the last acknowledged commit: what the metadata's
    /// generation must be set back to after reverting a failed batch.
    pub fn acked_generation(&self) -> Option<u64> {
        self.journal.as_ref().map(|j| j.writer.acked_seq())
    }

    /// Applies `changes` to `meta` and commits them to every metadata copy.
    /// On `Ok`, `meta` includes them and carries the commit's generation. On
    /// error `meta` is exactly as it was, and the refused commit has been
    /// superseded on every copy that could be written (as [`Pool::commit`]
    /// does), so a restart does not show it.
    ///
    /// A covering checkpoint that falls due is written before this returns
    /// (an owner loop that must not wait uses the job API instead).
    pub async fn commit_changes(
        &mut self,
        meta: &mut PoolMetadata,
        changes: &[MetaChange],
    ) -> Result<CommitReceipt, PoolError> {
        let undos = meta.apply_all(changes).map_err(|e| PoolError::Invalid(format!("{e}; nothing was changed")))?;
        match self.commit_applied(meta, changes).await {
            Ok(receipt) => Ok(receipt),
            Err(e) => {
                self.revert(meta, undos);
                if matches!(e, PoolError::Commit(_)) {
                    self.supersede_refused(meta).await;
                }
                Err(e)
            }
        }
    }

    /// Seals, writes and finishes one commit of `changes` (already applied
    /// to `meta`), then writes its covering checkpoint if one is due.
    async fn commit_applied(
        &mut self,
        meta: &mut PoolMetadata,
        changes: &[MetaChange],
    ) -> Result<CommitReceipt, PoolError> {
        let job = self.seal_commit(meta, changes)?;
        let outcome = job.run().await;
        let receipt = CommitReceipt {
            seq: outcome.seq,
            bytes_per_copy: outcome.bytes_per_copy,
            checkpoint: outcome.was_checkpoint,
        };
        if let Some(checkpoint) = self.finish_commit(outcome)? {
            let outcome = checkpoint.run().await;
            self.finish_checkpoint(outcome);
        }
        Ok(receipt)
    }

    fn revert(&self, meta: &mut PoolMetadata, undos: Vec<Undo>) {
        meta.revert_all(undos);
        if let Some(acked) = self.acked_generation() {
            meta.generation = acked;
        }
    }

    /// After a refused commit: reconnects the copies that failed, then
    /// commits an empty batch in its place.
    async fn supersede_refused(&mut self, meta: &mut PoolMetadata) {
        for d in self.devices.iter_mut().filter(|d| d.client.is_none() || d.error.is_some()) {
            if d.label.is_some() {
                if let Err(e) = d.reconnect().await {
                    d.error = Some(e.to_string());
                }
            }
        }
        match self.commit_applied(meta, &[]).await {
            Ok(receipt) => info!(seq = receipt.seq, "superseded the refused commit on every metadata copy"),
            Err(e) => {
                if let Some(acked) = self.acked_generation() {
                    meta.generation = acked;
                }
                tracing::error!(
                    "could not supersede a refused commit on every metadata copy ({e}): until the next \
                     successful commit, a restart may show the refused change"
                );
            }
        }
    }

    /// Seals the commit of `changes`, which `meta` already includes, and sets
    /// `meta.generation` to its sequence number. Cheap and synchronous: the
    /// returned job does the I/O. On error nothing changed (the caller
    /// reverts its changes). Refused while a commit job is out.
    pub fn seal_commit(&mut self, meta: &mut PoolMetadata, changes: &[MetaChange]) -> Result<CommitJob, PoolError> {
        let holders = metadata_holders(meta);
        let Some(journal) = self.journal.as_mut() else {
            return Err(PoolError::Commit("the pool was not opened with the journal (Pool::open_journaled)".into()));
        };
        // A holder read at open is a copy; one that was unreachable then but
        // is labelled now joins (and is brought in step by a checkpoint).
        for uuid in &holders {
            if journal.copies.contains(uuid) {
                continue;
            }
            let Some(label) = self.devices.iter().find(|d| d.expected_uuid == Some(*uuid)).and_then(|d| d.label) else {
                return Err(PoolError::Commit(format!(
                    "device {uuid} holding a metadata copy is not reachable; nothing was changed"
                )));
            };
            journal.writer.add_copy(MetadataArea::from_label(&label));
            journal.copies.push(*uuid);
        }
        let active: Vec<bool> = journal.copies.iter().map(|c| holders.contains(c)).collect();
        journal.writer.set_active(&active);
        let sealed = journal
            .writer
            .seal_commit(meta, changes, &journal.key)
            .map_err(|e| PoolError::Commit(format!("{e}; nothing was changed")))?;
        let copies = journal.copies.len();
        let target = |t: &journal::Target| {
            let device = self.devices.iter().find(|d| d.expected_uuid == Some(journal.copies[t.copy]));
            CopyTarget {
                copy: t.copy,
                uri: device.map_or_else(|| journal.copies[t.copy].to_string(), |d| d.uri.clone()),
                client: device.and_then(|d| d.client.clone()),
                offset: t.offset,
            }
        };
        let checkpoint_job = |c: SealedCheckpoint| CheckpointJob {
            number: c.number,
            copies,
            bytes: Bytes::from(c.bytes),
            targets: c.targets.iter().map(target).collect(),
            clear_after: c.clear_after.iter().map(target).collect(),
        };
        let bytes_per_copy = sealed.bytes_per_copy();
        let write = match sealed.write {
            SealedWrite::Entry { bytes, targets, .. } => {
                JobWrite::Entry { bytes: Bytes::from(bytes), targets: targets.iter().map(target).collect() }
            }
            SealedWrite::Checkpoint(c) => JobWrite::Checkpoint(checkpoint_job(c)),
        };
        Ok(CommitJob {
            seq: sealed.seq,
            copies,
            write,
            checkpoint_after: sealed.checkpoint_after.map(checkpoint_job),
            bytes_per_copy,
        })
    }

    /// Takes a commit job's outcome back. `Ok` acknowledges the commit, and
    /// may hand out a covering checkpoint to run (in the background is
    /// fine) and then give to [`Pool::finish_checkpoint`]. On error the
    /// caller must revert every change it applied since the last
    /// acknowledged commit, set the metadata's generation to
    /// [`Pool::acked_generation`], and commit again soon (an empty batch
    /// will do): the next commit supersedes the refused one.
    pub fn finish_commit(&mut self, outcome: CommitOutcome) -> Result<Option<CheckpointJob>, PoolError> {
        let journal = self.journal.as_mut().ok_or_else(|| PoolError::Commit("no journal".into()))?;
        match journal.writer.commit_written(outcome.seq, &outcome.written) {
            Ok(()) => {
                debug!(
                    seq = outcome.seq,
                    bytes = outcome.bytes_per_copy,
                    checkpoint = outcome.was_checkpoint,
                    "metadata committed"
                );
                if outcome.was_checkpoint {
                    info!(seq = outcome.seq, "metadata checkpoint committed to every copy");
                }
                Ok(outcome.checkpoint_after)
            }
            Err(e) => {
                warn!(seq = outcome.seq, "metadata commit failed: {}", outcome.failures.join("; "));
                let why = if outcome.failures.is_empty() { e.to_string() } else { outcome.failures.join("; ") };
                Err(PoolError::Commit(why))
            }
        }
    }

    /// Takes a covering checkpoint's outcome back. A copy that did not take
    /// it keeps its previous checkpoint (and the ring space that needs).
    pub fn finish_checkpoint(&mut self, outcome: CheckpointOutcome) {
        let Some(journal) = self.journal.as_mut() else { return };
        journal.writer.checkpoint_written(outcome.number, &outcome.written);
        if outcome.failures.is_empty() {
            info!(number = outcome.number, "metadata checkpoint written to every copy");
        } else {
            warn!(
                number = outcome.number,
                "metadata checkpoint failed on some copies: {}",
                outcome.failures.join("; ")
            );
        }
    }
}

impl CommitJob {
    /// The commit's sequence number (the metadata's generation once done).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Writes the commit to every copy (concurrently), flushing each.
    pub async fn run(self) -> CommitOutcome {
        let (written, failures, was_checkpoint) = match &self.write {
            JobWrite::Entry { bytes, targets } => {
                let (w, f) = write_everywhere(self.copies, targets, bytes, None, &[]).await;
                (w, f, false)
            }
            JobWrite::Checkpoint(c) => {
                let (w, f) = c.write().await;
                (w, f, true)
            }
        };
        CommitOutcome {
            seq: self.seq,
            written,
            failures,
            checkpoint_after: self.checkpoint_after,
            bytes_per_copy: self.bytes_per_copy,
            was_checkpoint,
        }
    }
}

impl CheckpointJob {
    /// Writes the checkpoint to every copy, flushes, reads it back, then
    /// clears what it supersedes.
    pub async fn run(self) -> CheckpointOutcome {
        let (written, failures) = self.write().await;
        CheckpointOutcome { number: self.number, written, failures }
    }

    async fn write(&self) -> (Vec<bool>, Vec<String>) {
        let (mut written, mut failures) =
            write_everywhere(self.copies, &self.targets, &self.bytes, Some("metadata checkpoint"), &[]).await;
        let clears: Vec<CopyTarget> = self.clear_after.iter().filter(|t| written[t.copy]).cloned().collect();
        if !clears.is_empty() {
            let zero = Bytes::from(vec![0u8; BLOCK_BYTES as usize]);
            let (cleared, f) = write_everywhere(self.copies, &clears, &zero, None, &[]).await;
            for t in &clears {
                written[t.copy] &= cleared[t.copy];
            }
            failures.extend(f);
        }
        (written, failures)
    }
}

/// Writes `bytes` at every target (one per copy; concurrently across
/// copies), durably (FUA, or a flush after the write); with `verify`, reads the bytes
/// back after the flush (a device that drops writes fails here, not at the
/// next restart). Returns which copies took it, and why the others did not.
/// `faults` are `SANVOL_FAULT` points hit once the first copy took the
/// bytes (the others may or may not have): a crash in the middle of a
/// metadata write, for the crash tests.
async fn write_everywhere(
    copies: usize,
    targets: &[CopyTarget],
    bytes: &Bytes,
    verify: Option<&str>,
    faults: &[&str],
) -> (Vec<bool>, Vec<String>) {
    let results = join_all(targets.iter().map(|t| async move {
        let result = write_copy(t, bytes, verify).await;
        if t.copy == 0 {
            for fault in faults {
                control_client::fault::hit(fault);
            }
        }
        result
    }))
    .await;
    let mut written = vec![false; copies];
    let mut failures = Vec::new();
    for (t, r) in targets.iter().zip(results) {
        match r {
            Ok(()) => written[t.copy] = true,
            Err(e) => failures.push(e),
        }
    }
    (written, failures)
}

async fn write_copy(t: &CopyTarget, bytes: &Bytes, verify: Option<&str>) -> Result<(), String> {
    let Some(client) = &t.client else { return Err(format!("device {}: not connected", t.uri)) };
    let fail =
        |what: &str, e: &dyn std::fmt::Display| format!("device {}: {what} at byte offset {}: {e}", t.uri, t.offset);
    // A journal entry (small, not read back) is written with FUA: durable
    // when answered, one round trip instead of a write and a flush (blockio
    // emulates FUA with a flush on a device that lacks it). A checkpoint is
    // written, flushed, then read back.
    let fua = verify.is_none();
    let mut done = 0u64;
    while done < bytes.len() as u64 {
        let n = (bytes.len() as u64 - done).min(IO_BYTES_MAX);
        client
            .write(t.offset + done, bytes.slice(done as usize..(done + n) as usize), fua)
            .await
            .map_err(|e| fail("writing metadata", &e))?;
        done += n;
    }
    if !fua {
        client.flush().await.map_err(|e| fail("flushing metadata", &e))?;
    }
    if let Some(what) = verify {
        let back = read_at(client, &t.uri, t.offset, bytes.len() as u64, "reading metadata back")
            .await
            .map_err(|e| e.to_string())?;
        if back != bytes.as_ref() {
            return Err(fail(&format!("the {what} does not read back as written"), &"device dropped the write"));
        }
    }
    Ok(())
}

/// What was read from one device holding (or perhaps holding) a copy.
struct RawCopy {
    device: Uuid,
    uri: String,
    area: MetadataArea,
    slots: [Result<Vec<u8>, String>; 2],
    ring: Result<Vec<u8>, String>,
}

impl RawCopy {
    fn image(&self) -> CopyImage<'_> {
        let slot = |i: usize| self.slots[i].as_ref().map(|b| b.as_slice()).map_err(Clone::clone);
        CopyImage {
            device: self.uri.clone(),
            area: self.area,
            checkpoint_slots: [slot(0), slot(1)],
            ring: self.ring.as_ref().map(|b| b.as_slice()).map_err(Clone::clone),
        }
    }
}

/// Reads a labelled device's checkpoint slots (each as far as its header
/// says) and its whole ring, after a flush of the device.
///
/// Why the flush: a read returns what the device holds in its volatile
/// cache too. A server that lost the pool lease (stopped, or cut off)
/// between writing a checkpoint and flushing it leaves the checkpoint
/// there, readable but not durable. Built upon without the flush, a power
/// loss of that device drops the checkpoint while the entries this server
/// chains to it survive: a copy with signed entries and no checkpoint,
/// which every later load refuses as a rollback (simulator seed
/// 6429577280763). Flushed first, everything read is durable. A copy whose
/// flush fails is unreadable: what it shows may not survive.
async fn read_copy(d: &PoolDevice) -> RawCopy {
    let label = d.label.expect("only labelled devices are read");
    let area = MetadataArea::from_label(&label);
    let unreadable = |why: String| RawCopy {
        device: label.device_uuid,
        uri: d.uri.clone(),
        area,
        slots: [Err(why.clone()), Err(why.clone())],
        ring: Err(why),
    };
    let Some(client) = d.client.clone() else {
        return unreadable(d.error.clone().unwrap_or_else(|| "not connected".into()));
    };
    if let Err(e) = client.flush().await {
        return unreadable(format!("device {}: flushing before reading the metadata: {e}", d.uri));
    }
    let mut slots = [Err(String::new()), Err(String::new())];
    for (i, slot) in slots.iter_mut().enumerate() {
        let offset = area.slot_offset(i as u32);
        *slot = async {
            let header = read_at(&client, &d.uri, offset, SLOT_HEADER_BYTES as u64, "reading a metadata slot header")
                .await
                .map_err(|e| e.to_string())?;
            // Only a plausible length is read; anything else is the loader's to judge.
            let len = SlotHeader::decode(&header)
                .map(|h| h.record_bytes())
                .ok()
                .filter(|&n| n <= area.slot_bytes)
                .unwrap_or(SLOT_HEADER_BYTES as u64);
            if len <= SLOT_HEADER_BYTES as u64 {
                return Ok(header);
            }
            read_at(&client, &d.uri, offset, len, "reading a metadata slot").await.map_err(|e| e.to_string())
        }
        .await;
    }
    let ring = area.ring();
    let ring = read_at(&client, &d.uri, ring.start, ring.len_bytes(), "reading the metadata journal")
        .await
        .map_err(|e| e.to_string());
    RawCopy { device: label.device_uuid, uri: d.uri.clone(), area, slots, ring }
}
