//! Loading: per copy, the newest valid checkpoint plus the entries that
//! chain from it; across copies, the one that got furthest.
//!
//! What stops a load, and why (each error names the device and the byte
//! offset on it):
//! - a record whose checksum holds but whose signature does not: someone
//!   wrote it without the server's key;
//! - an entry missing or damaged in the middle of the journal (a valid
//!   entry with a higher sequence number exists further on, so the missing
//!   one had been acknowledged), unless another copy got at least as far;
//! - a signed entry that does not apply, or a replayed state that fails
//!   `PoolMetadata::check` (a bug, never papered over);
//! - a format-2 record newer than the newest checkpoint, or signed entries
//!   without any checkpoint: a rollback to an old unsigned copy;
//! - records of a newer format;
//! - two copies that reached the same commit with different contents.
//!
//! What does not: torn tails (the commit being written when the server
//! died, never acknowledged), torn or damaged checkpoints while the other
//! slot is good, and copies that are unreadable or behind while another
//! copy is whole. Those are reported as warnings, and the copies are
//! brought back in step by the next commit (a commit checkpoint).

use ed25519_dalek::VerifyingKey;
use uuid::Uuid;

use super::checkpoint::{read_slot, Anchor, SlotRead};
use super::entry::{decode_payload, peek_header, read_entry, EntryRead};
use super::writer::{CopyState, JournalWriter, SlotState};
use super::{ChainLink, CHECKPOINT_SLOTS};
use crate::ids::PublicKey;
use crate::label::BLOCK_BYTES;
use crate::metadata::{MetadataArea, PoolMetadata, SlotError, METADATA_FORMAT_VERSION};

/// What the caller read from one metadata copy.
#[derive(Debug, Clone)]
pub struct CopyImage<'a> {
    /// The device, for messages (its URI).
    pub device: String,
    pub area: MetadataArea,
    /// Checkpoint slots 0 and 1, each from its start and at least its whole
    /// record (the first [`crate::metadata::SLOT_HEADER_BYTES`] tell how
    /// much), or why they could not be read.
    pub checkpoint_slots: [Result<&'a [u8], String>; 2],
    /// The whole ring ([`MetadataArea::ring`]), or why it could not be read.
    /// (In a format-2 pool it holds slots 2 and up, read from here.)
    pub ring: Result<&'a [u8], String>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Refuse format-2 (unsigned) metadata outright, for a server that
    /// knows its pool was upgraded.
    pub refuse_unsigned: bool,
}

/// Why one copy could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("device {device}: cannot read the metadata: {reason}")]
    Unreadable { device: String, reason: String },
    #[error("device {device}: no valid metadata ({detail})")]
    NoMetadata { device: String, detail: String },
    #[error(
        "device {device}, byte offset {offset}: {what} has a valid checksum but is not signed by this \
         server's key: written by someone else (or the server is configured with the wrong key); \
         refusing to load it"
    )]
    Forged { device: String, offset: u64, what: String },
    #[error(
        "device {device}, byte offset {offset}: a format-2 record of generation {legacy_generation} is newer \
         than the journaled checkpoint {checkpoint_number}: an old unsigned copy over a journaled pool; \
         refusing to roll the pool back"
    )]
    Rollback { device: String, offset: u64, legacy_generation: u64, checkpoint_number: u64 },
    #[error(
        "device {device}, byte offset {offset}: signed journal entries but no journal checkpoint, only \
         format-2 records; refusing to roll the pool back to them"
    )]
    EntriesWithoutCheckpoint { device: String, offset: u64 },
    #[error(
        "device {device}, byte offset {offset}: written by a newer sanvol (format {found}); upgrade sanvol \
         before using this pool"
    )]
    NewerFormat { device: String, offset: u64, found: u32 },
    #[error(
        "device {device}, byte offset {offset}: the journal entry with sequence number {expected_seq} is \
         missing or damaged ({why}), but entry {later_seq} at byte offset {later_offset} follows it: an \
         acknowledged commit was lost. Restore this device's metadata area from another copy or a backup{}",
        if .notes.is_empty() { String::new() } else { format!(" (also: {})", .notes.join("; ")) }
    )]
    Corrupt {
        device: String,
        offset: u64,
        expected_seq: u64,
        why: String,
        later_seq: u64,
        later_offset: u64,
        notes: Vec<String>,
    },
    #[error("device {device}, byte offset {offset}: journal entry {seq} does not replay: {why}")]
    Replay { device: String, offset: u64, seq: u64, why: String },
}

impl CopyError {
    /// Errors that stop the whole load, whatever the other copies say.
    fn is_fatal(&self) -> bool {
        !matches!(self, CopyError::Unreadable { .. } | CopyError::NoMetadata { .. } | CopyError::Corrupt { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("the configured server key is not a valid ed25519 public key")]
    BadServerKey,
    #[error("no metadata copy could be loaded: {}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    NoCopy { errors: Vec<CopyError> },
    #[error(transparent)]
    Copy(CopyError),
    #[error(
        "the copies on {first} and {second} both reached commit {seq} with different contents: two \
         metadata servers wrote at once, or a refused commit survived on one of them; stop all but one \
         server and inspect the pool"
    )]
    Conflicting { seq: u64, first: String, second: String },
}

/// The loaded pool: its metadata, and the writer that continues it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub metadata: PoolMetadata,
    pub writer: JournalWriter,
    /// Index of the copy the state was read from.
    pub source: usize,
    /// Format-2 metadata: upgraded by the first commit.
    pub legacy: bool,
    /// What was tolerated, for the log (torn tails, damaged or lagging copies).
    pub warnings: Vec<String>,
}

#[derive(Debug)]
struct LoadedCopy {
    meta: PoolMetadata,
    /// The last commit the state includes.
    state_seq: u64,
    /// The checkpoint the replay started from (none: format 2).
    checkpoint: Option<(u64, Anchor)>,
    /// The format that checkpoint (or format-2 record) was written in.
    format: u32,
    head: u64,
    prev: ChainLink,
    /// How the last commit was written, to order copies that reached the
    /// same sequence number differently (a refused commit and what replaced
    /// it): an entry by its attempt, below a commit checkpoint by its number.
    tip: (u8, u64),
    slots: [SlotState; 2],
    clear_ring_slots: bool,
    notes: Vec<String>,
}

/// Loads the pool from its copies' images. `server_key` is the key the
/// server is configured with: every checkpoint and entry must be signed by
/// it, and the metadata must record it.
pub fn load(
    pool: Uuid,
    server_key: &PublicKey,
    images: &[CopyImage<'_>],
    options: LoadOptions,
) -> Result<Loaded, LoadError> {
    let verifying_key = VerifyingKey::from_bytes(&server_key.0).map_err(|_| LoadError::BadServerKey)?;
    let mut numbers_max = 0u64;
    let results: Vec<Result<LoadedCopy, CopyError>> = images
        .iter()
        .map(|image| load_copy(image, pool, server_key, &verifying_key, options, &mut numbers_max))
        .collect();
    choose(pool, images, results, numbers_max)
}

fn choose(
    pool: Uuid,
    images: &[CopyImage<'_>],
    results: Vec<Result<LoadedCopy, CopyError>>,
    numbers_max: u64,
) -> Result<Loaded, LoadError> {
    if let Some(fatal) = results.iter().find_map(|r| r.as_ref().err().filter(|e| e.is_fatal())) {
        return Err(LoadError::Copy(fatal.clone()));
    }
    let best = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|c| (i, c)))
        .max_by_key(|(i, c)| (c.state_seq, c.tip, std::cmp::Reverse(*i)))
        .map(|(i, _)| i);
    let Some(source) = best else {
        let errors: Vec<CopyError> = results.into_iter().filter_map(Result::err).collect();
        // A lost acknowledged commit is the one to tell about.
        if let Some(corrupt) = errors.iter().find(|e| matches!(e, CopyError::Corrupt { .. })) {
            return Err(LoadError::Copy(corrupt.clone()));
        }
        return Err(LoadError::NoCopy { errors });
    };
    let mut warnings = Vec::new();
    let best_seq = results[source].as_ref().map(|c| c.state_seq).unwrap_or(0);
    for r in &results {
        match r {
            Err(e @ CopyError::Corrupt { later_seq, .. }) if *later_seq > best_seq => {
                return Err(LoadError::Copy(e.clone()));
            }
            Err(e) => warnings.push(format!("{e}; another copy is used and this one is rewritten")),
            Ok(c) => warnings.extend(c.notes.iter().cloned()),
        }
    }
    let best = results[source].as_ref().expect("chosen among the loaded");
    for (i, r) in results.iter().enumerate() {
        if let Ok(c) = r {
            if i != source && c.state_seq == best.state_seq && c.tip == best.tip && c.meta != best.meta {
                return Err(LoadError::Conflicting {
                    seq: c.state_seq,
                    first: images[source].device.clone(),
                    second: images[i].device.clone(),
                });
            }
        }
    }
    let in_step = |c: &LoadedCopy| {
        c.state_seq == best.state_seq
            && c.checkpoint.is_some()
            && c.head == best.head
            && c.prev == best.prev
            && c.checkpoint.map(|(_, a)| a.ring_bytes) == best.checkpoint.map(|(_, a)| a.ring_bytes)
    };
    let mut must_checkpoint = None;
    if best.checkpoint.is_none() {
        must_checkpoint = Some("upgrading format-2 metadata to the journal".to_string());
    } else if best.format < METADATA_FORMAT_VERSION {
        must_checkpoint =
            Some(format!("upgrading format-{} metadata to format {METADATA_FORMAT_VERSION}", best.format));
    }
    let mut copies = Vec::with_capacity(images.len());
    for (i, (image, r)) in images.iter().zip(&results).enumerate() {
        let state = match r {
            Ok(c) => CopyState {
                area: image.area,
                active: true,
                slots: c.slots,
                anchor: if in_step(c) { c.checkpoint.map(|(_, a)| a) } else { None },
                clear_ring_slots: c.clear_ring_slots,
            },
            Err(_) => CopyState {
                area: image.area,
                active: true,
                slots: [SlotState::Unusable; 2],
                anchor: None,
                clear_ring_slots: true,
            },
        };
        if state.anchor.is_none() && must_checkpoint.is_none() {
            must_checkpoint = Some(format!("metadata copy {i} ({}) is not in step with the others", image.device));
            warnings.push(format!(
                "device {}: its metadata is behind or unreadable; the next commit rewrites it",
                image.device
            ));
        }
        copies.push(state);
    }
    let mut writer = JournalWriter::from_parts(pool, copies, best.state_seq + 1, numbers_max + 1, must_checkpoint);
    if let Some((_, anchor)) = best.checkpoint {
        writer.continue_chain(anchor.ring_bytes, best.head, best.prev);
    }
    let legacy = best.checkpoint.is_none();
    let Ok(best) = results.into_iter().nth(source).expect("index in range") else { unreachable!("chosen Ok") };
    Ok(Loaded { metadata: best.meta, writer, source, legacy, warnings })
}

fn load_copy(
    image: &CopyImage<'_>,
    pool: Uuid,
    server_key: &PublicKey,
    key: &VerifyingKey,
    options: LoadOptions,
    numbers_max: &mut u64,
) -> Result<LoadedCopy, CopyError> {
    let device = image.device.clone();
    let area = image.area;
    let ring_start = area.ring().start;
    let ring: Result<&[u8], String> = image.ring.clone();

    // Every slot, as far as it can be read: the checkpoint slots from their
    // own buffers, any further slot (legacy) from the ring.
    let mut checkpoints: Vec<(u32, u64, Anchor, PoolMetadata, u32)> = Vec::new();
    let mut legacy: Vec<(u32, u64, PoolMetadata)> = Vec::new();
    let mut slot_errors: Vec<String> = Vec::new();
    let mut slots = [SlotState::Unusable; 2];
    let mut clear_ring_slots = false;
    for i in 0..area.slot_count {
        let bytes: Result<&[u8], String> = if i < CHECKPOINT_SLOTS {
            image.checkpoint_slots[i as usize].clone()
        } else {
            let at = ((i - CHECKPOINT_SLOTS) as u64 * area.slot_bytes) as usize;
            ring.clone().map(|r| r.get(at..).unwrap_or(&[]))
        };
        let offset = area.slot_offset(i);
        let bytes = match bytes {
            Ok(b) => b,
            Err(reason) => {
                slot_errors.push(format!("slot {i}: unreadable: {reason}"));
                continue;
            }
        };
        if let Ok(h) = crate::metadata::SlotHeader::decode(bytes) {
            *numbers_max = (*numbers_max).max(h.generation);
            clear_ring_slots |= i >= CHECKPOINT_SLOTS && h.format_version < crate::metadata::JOURNAL_FORMAT_VERSION_MIN;
        }
        match read_slot(&area, i, bytes, pool, server_key, key) {
            SlotRead::Checkpoint { number, anchor, meta, format } => {
                slots[i as usize] = SlotState::Checkpoint { number, acked: true };
                checkpoints.push((i, number, anchor, meta, format));
            }
            SlotRead::Legacy { generation, meta } => {
                if let Some(s) = slots.get_mut(i as usize) {
                    *s = SlotState::Legacy { generation };
                }
                legacy.push((i, generation, meta));
            }
            SlotRead::Forged { number } => {
                return Err(CopyError::Forged { device, offset, what: format!("checkpoint {number} (slot {i})") })
            }
            SlotRead::Newer { found } => return Err(CopyError::NewerFormat { device, offset, found }),
            SlotRead::Unusable(SlotError::Empty) => {}
            SlotRead::Unusable(e) => {
                // Inside the ring of a journaled pool nearly every block is
                // "not a slot": only the checkpoint slots are worth a note.
                if i < CHECKPOINT_SLOTS {
                    slot_errors.push(format!("slot {i} at byte offset {offset}: {e}"));
                }
            }
        }
    }
    let newest_checkpoint = checkpoints.iter().max_by_key(|c| c.1).map(|c| c.1);
    if let Some((i, generation, _)) = legacy.iter().max_by_key(|l| l.1) {
        if let Some(number) = newest_checkpoint.filter(|&n| *generation >= n) {
            return Err(CopyError::Rollback {
                device,
                offset: area.slot_offset(*i),
                legacy_generation: *generation,
                checkpoint_number: number,
            });
        }
    }
    let mut notes: Vec<String> = Vec::new();
    if newest_checkpoint.is_some() {
        for e in &slot_errors {
            notes.push(format!("device {device}: {e} (the other checkpoint slot is used)"));
        }
    }
    let Some(position) = checkpoints.iter().enumerate().max_by_key(|(_, c)| c.1).map(|(p, _)| p) else {
        let Some(position) = legacy.iter().enumerate().max_by_key(|(_, l)| l.1).map(|(p, _)| p) else {
            let detail =
                if slot_errors.is_empty() { "every slot is empty".to_string() } else { slot_errors.join("; ") };
            return Err(CopyError::NoMetadata { device, detail });
        };
        if options.refuse_unsigned {
            return Err(CopyError::NoMetadata {
                device,
                detail: "only format-2 (unsigned) records, and this server refuses them".into(),
            });
        }
        if let Ok(r) = ring {
            let ring_bytes = area.ring_bytes().min(r.len() as u64 / BLOCK_BYTES * BLOCK_BYTES);
            if let Some((_, at)) = later_entry(r, ring_bytes, pool, key, 0) {
                return Err(CopyError::EntriesWithoutCheckpoint { device, offset: ring_start + at });
            }
        }
        let (_, generation, meta) = legacy.swap_remove(position);
        return Ok(LoadedCopy {
            meta,
            state_seq: generation,
            checkpoint: None,
            format: crate::metadata::LEGACY_SLOT_FORMAT_VERSION,
            head: 0,
            prev: ChainLink::Checkpoint { number: 0 },
            tip: (0, 0),
            slots,
            clear_ring_slots: true,
            notes,
        });
    };
    let (_, number, anchor, mut meta, format) = checkpoints.swap_remove(position);
    let ring = ring.map_err(|reason| CopyError::Unreadable { device: device.clone(), reason })?;
    if (ring.len() as u64) < anchor.ring_bytes {
        return Err(CopyError::Unreadable {
            device,
            reason: format!("read {} ring bytes, the journal uses {}", ring.len(), anchor.ring_bytes),
        });
    }
    let ring_bytes = anchor.ring_bytes;
    let mut pos = anchor.ring_offset;
    let mut prev = anchor.prev;
    let mut state_seq = anchor.state_seq;
    let mut first_damage: Option<(u64, String)> = None;
    // A commit checkpoint consumed its own sequence number; a covering one
    // copies an entry's state (ordered like that entry).
    let mut tip = match anchor.prev {
        ChainLink::Checkpoint { number } => (1, number),
        ChainLink::Entry { .. } => (0, 0),
    };
    loop {
        if ring_bytes == 0 {
            break;
        }
        let expected = state_seq + 1;
        let mut found = None;
        let mut damage = None;
        // The next entry is where the previous one ended, or, if it did not
        // fit before the end of the ring, at its start.
        let candidates = if pos == 0 || pos >= ring_bytes { vec![0] } else { vec![pos, 0] };
        for at in candidates {
            match read_entry(ring, ring_bytes, at, pool, key) {
                EntryRead::Valid { header, payload, digest }
                    if header.seq == expected && header.prev == Some(prev) && header.ring_offset == at =>
                {
                    found = Some((at, header.total_bytes(), payload, digest, header.attempt));
                    break;
                }
                EntryRead::Forged { header }
                    if header.seq == expected && header.prev == Some(prev) && header.ring_offset == at =>
                {
                    return Err(CopyError::Forged {
                        device,
                        offset: ring_start + at,
                        what: format!("journal entry {expected}"),
                    });
                }
                EntryRead::Newer { found } => {
                    return Err(CopyError::NewerFormat { device, offset: ring_start + at, found });
                }
                // Damage only matters where the next entry could be: a
                // damaged block with a stale sequence number is old.
                EntryRead::Damaged { header, why } if header.is_none_or(|h| h.seq >= expected) && damage.is_none() => {
                    damage = Some((at, why));
                }
                _ => {}
            }
        }
        let Some((at, len, payload, digest, attempt)) = found else {
            first_damage = damage;
            break;
        };
        let replay_err =
            |why: String| CopyError::Replay { device: device.clone(), offset: ring_start + at, seq: expected, why };
        let changes = decode_payload(payload).map_err(|e| replay_err(e.to_string()))?;
        meta.apply_all(&changes).map_err(|e| replay_err(e.to_string()))?;
        meta.generation = expected;
        state_seq = expected;
        prev = ChainLink::Entry { digest };
        pos = at + len;
        tip = (0, attempt);
    }
    // The replay ended where no entry continues the chain. If a later entry
    // exists, the one expected here had been acknowledged: it was lost.
    let expected = state_seq + 1;
    if let Some((later_seq, later_at)) = later_entry(ring, ring_bytes, pool, key, expected) {
        let (offset, why) = match &first_damage {
            Some((at, why)) => (ring_start + at, why.clone()),
            None => {
                (ring_start + pos.min(ring_bytes.saturating_sub(BLOCK_BYTES)), "no entry continues the chain".into())
            }
        };
        return Err(CopyError::Corrupt {
            device,
            offset,
            expected_seq: expected,
            why,
            later_seq,
            later_offset: ring_start + later_at,
            notes,
        });
    }
    if let Some((at, why)) = first_damage {
        notes.push(format!(
            "device {device}: a torn journal entry at byte offset {} was ignored ({why}); it was never acknowledged",
            ring_start + at
        ));
    }
    if let Err(why) = meta.check() {
        return Err(CopyError::Replay {
            device,
            offset: ring_start + pos.min(ring_bytes),
            seq: state_seq,
            why: format!("the replayed metadata is inconsistent: {why}"),
        });
    }
    Ok(LoadedCopy {
        meta,
        state_seq,
        checkpoint: Some((number, anchor)),
        format,
        head: pos,
        prev,
        tip,
        slots,
        clear_ring_slots,
        notes,
    })
}

/// A valid, signed entry of this pool anywhere in the ring with a sequence
/// number above `above`, and where.
fn later_entry(ring: &[u8], ring_bytes: u64, pool: Uuid, key: &VerifyingKey, above: u64) -> Option<(u64, u64)> {
    (0..ring_bytes / BLOCK_BYTES).map(|b| b * BLOCK_BYTES).find_map(|at| {
        let header = peek_header(ring, at, pool).ok()?;
        if header.seq <= above {
            return None;
        }
        match read_entry(ring, ring_bytes, at, pool, key) {
            EntryRead::Valid { header, .. } => Some((header.seq, at)),
            _ => None,
        }
    })
}
