//! The disk lease that makes exactly one metadata server the active one.
//!
//! Why a lease on the devices: the pool metadata lives on the shared
//! devices, so two servers that both reach them would overwrite each
//! other's commits. Like sanlock's delta leases, the lease needs nothing
//! from the storage but reads and writes of whole sectors: no reservations,
//! no network between the servers.
//!
//! **Where.** Every device that holds a metadata copy has a *lease area* of
//! [`LEASE_SECTORS`] sectors right after its metadata area
//! ([`crate::DeviceLayout::lease_area`]). Sector 0 is the *owner* sector of
//! the pool lease; sector `h` (1..=[`HOST_ID_MAX`]) is where the server with
//! host id `h` says it is alive (active or standing by), so listings can
//! show the standbys.
//!
//! **Rules** (all timing from one I/O timeout `T`, see [`LeaseTiming`]):
//! - A server holds the lease while the owner sector names it on a
//!   *majority* of the metadata copies. It renews every `T` (read each
//!   copy, check the record is still its own, write it back with the
//!   counter + 1).
//! - It may commit only until `3T` after the start of its last renewal that
//!   reached a majority; past that it stops committing at once, and when a
//!   renewal finds another owner it has lost the lease for good.
//! - To acquire (a lapsed or free lease) a server writes its own record,
//!   waits `4T`, and reads again: the lease is its own only if a majority
//!   still shows exactly that record. It then waits `D` more (the longest
//!   a device request takes, `device_request_max_ms`) before it loads the
//!   metadata and commits. A standby takes over a held lease only after
//!   watching the owner record unchanged for `5T`.
//! - Why these suffice: the old owner's last good renewal started at some
//!   `r` and landed by `r + T`; the acquirer's record landed after it (or
//!   the read-back would have found the renewal instead). The old owner
//!   sends writes until `r + 3T` at most (its window), and each lands by
//!   `D` later: by `r + 3T + D`. The acquirer loads the metadata at least
//!   `4T + D` after its write, so after `r + 4T + D`: `T` to spare for
//!   clocks running at different rates. (Before `D` was counted, the old
//!   owner's zeroing write stalled in a device landed after a takeover:
//!   simulator seeds 217702335532761 and 3485435320083.)
//! - A planned handoff: the owner writes its record with `handoff_to` set
//!   and stops renewing; the named standby acquires at once (the owner is
//!   known to have stopped).
//!
//! This module is pure: sector encoding and the acquire/renew state
//! machine ([`LeaseMachine`]) over injected time and I/O results; the
//! server does the I/O.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{self, CodecError};

/// Bytes per lease sector.
pub const LEASE_SECTOR_BYTES: u64 = 4096;
/// Sectors in a lease area: the owner sector and one per host id.
pub const LEASE_SECTORS: u64 = 16;
/// Bytes of the lease area after each metadata area.
pub const LEASE_AREA_BYTES: u64 = LEASE_SECTOR_BYTES * LEASE_SECTORS;
/// Largest host id a server may have.
pub const HOST_ID_MAX: u32 = (LEASE_SECTORS - 1) as u32;
pub const LEASE_MAGIC: [u8; 8] = *b"SANVOLLS";
pub const LEASE_FORMAT_VERSION: u32 = 1;
/// Header: magic, crc32c (of header with this field zero + payload), version, payload length.
const HEADER_BYTES: usize = 8 + 4 + 4 + 4;
/// Addresses a record carries at most (for redirects).
pub const LEASE_ADDRS_MAX: usize = 8;

/// What a server says in its sector, or the owner sector says of the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub pool_uuid: Uuid,
    /// The owner's host id (owner sector), or the writer's (host sector);
    /// 0 in the owner sector means free (released).
    pub host_id: u32,
    /// Random per server process: tells a restarted server apart.
    pub instance: [u8; 16],
    /// The server's name, for messages ("mds-a").
    pub name: String,
    /// Owner sector: goes up by one at every acquisition.
    pub generation: u64,
    /// Goes up by one at every renewal (what a standby watches).
    pub counter: u64,
    /// The writer's I/O timeout `T` (a standby uses the owner's timing).
    pub io_timeout_ms: u32,
    /// When the writer became owner (owner sector) or started (host sector).
    pub since_unix_ms: u64,
    /// Owner sector: the host id the owner handed the lease to (0: none).
    pub handoff_to: u32,
    /// The writer's control addresses, so clients can be redirected.
    pub addrs: Vec<String>,
    /// Host sector: what the writer is doing.
    pub role: ServerRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerRole {
    Active,
    Standby,
    Stopped,
}

impl std::fmt::Display for ServerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerRole::Active => "active",
            ServerRole::Standby => "standing by",
            ServerRole::Stopped => "stopped",
        })
    }
}

impl LeaseRecord {
    /// Whether this is a record of the same holding as `other` (owner,
    /// process and acquisition), whatever its counter.
    pub fn same_holding(&self, other: &LeaseRecord) -> bool {
        self.host_id == other.host_id && self.instance == other.instance && self.generation == other.generation
    }

    pub fn is_free(&self) -> bool {
        self.host_id == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease sector is {0} bytes, not {LEASE_SECTOR_BYTES}")]
    Size(usize),
    #[error("lease sector does not hold a sanvol lease (magic {0:?})")]
    Magic([u8; 8]),
    #[error("lease sector checksum mismatch (torn write or corruption)")]
    Checksum,
    #[error("lease sector written by a newer sanvol (lease format {0}); upgrade this server")]
    Version(u32),
    #[error("lease sector payload of {0} bytes does not fit the sector")]
    Length(u32),
    #[error("lease sector belongs to pool {found}, not {expected}")]
    WrongPool { expected: Uuid, found: Uuid },
    #[error("lease record does not decode: {0}")]
    Payload(CodecError),
    #[error("lease record too large to encode: {0}")]
    Encode(String),
}

/// Encodes `record` as one whole sector.
pub fn encode_sector(record: &LeaseRecord) -> Result<Vec<u8>, LeaseError> {
    if record.addrs.len() > LEASE_ADDRS_MAX {
        return Err(LeaseError::Encode(format!("{} addresses, at most {LEASE_ADDRS_MAX}", record.addrs.len())));
    }
    let payload = codec::encode(record).map_err(|e| LeaseError::Encode(e.to_string()))?;
    if payload.len() > LEASE_SECTOR_BYTES as usize - HEADER_BYTES {
        return Err(LeaseError::Encode(format!("{} bytes of record", payload.len())));
    }
    let mut sector = vec![0u8; LEASE_SECTOR_BYTES as usize];
    sector[..8].copy_from_slice(&LEASE_MAGIC);
    sector[12..16].copy_from_slice(&LEASE_FORMAT_VERSION.to_be_bytes());
    sector[16..20].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    sector[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(&payload);
    let crc = codec::crc32c_parts(&[&sector[..8], &[0; 4], &sector[12..]]);
    sector[8..12].copy_from_slice(&crc.to_be_bytes());
    Ok(sector)
}

/// Decodes a sector of pool `pool`: `Ok(None)` for a sector never written
/// (all zeroes), which counts as free.
pub fn decode_sector(sector: &[u8], pool: Uuid) -> Result<Option<LeaseRecord>, LeaseError> {
    if sector.len() != LEASE_SECTOR_BYTES as usize {
        return Err(LeaseError::Size(sector.len()));
    }
    if sector.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let magic: [u8; 8] = sector[..8].try_into().unwrap_or_default();
    if magic != LEASE_MAGIC {
        return Err(LeaseError::Magic(magic));
    }
    let stored = u32::from_be_bytes(sector[8..12].try_into().unwrap_or_default());
    if codec::crc32c_parts(&[&sector[..8], &[0; 4], &sector[12..]]) != stored {
        return Err(LeaseError::Checksum);
    }
    let version = u32::from_be_bytes(sector[12..16].try_into().unwrap_or_default());
    if version != LEASE_FORMAT_VERSION {
        return Err(LeaseError::Version(version));
    }
    let len = u32::from_be_bytes(sector[16..20].try_into().unwrap_or_default());
    if len as usize > sector.len() - HEADER_BYTES {
        return Err(LeaseError::Length(len));
    }
    let record: LeaseRecord =
        codec::decode(&sector[HEADER_BYTES..HEADER_BYTES + len as usize]).map_err(LeaseError::Payload)?;
    if record.pool_uuid != pool {
        return Err(LeaseError::WrongPool { expected: pool, found: record.pool_uuid });
    }
    Ok(Some(record))
}

/// The lease's timing, all from one I/O timeout (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// `T`: every lease read or write must finish within it.
    pub io_timeout_ms: u64,
    /// `D`: the longest any device request of a server takes (its
    /// `device_request_max_ms`): a metadata, zeroing or copy write the old
    /// owner sent just before it stopped may land until `D` after it was
    /// sent. Every server of a pool uses the same value.
    pub device_request_max_ms: u64,
}

impl LeaseTiming {
    pub const DEFAULT_IO_TIMEOUT_MS: u64 = 1000;

    /// How often the owner renews.
    pub fn renew_every_ms(&self) -> u64 {
        self.io_timeout_ms
    }
    /// How long after the start of its last good renewal the owner may commit.
    pub fn owner_valid_ms(&self) -> u64 {
        3 * self.io_timeout_ms
    }
    /// How long a standby watches an unchanged owner record before taking
    /// over. Longer than an acquirer's wait plus `T`: an acquirer's record
    /// does not change while it waits, and a standby that took it over
    /// meanwhile would make the two overwrite each other's records forever.
    pub fn expire_ms(&self) -> u64 {
        5 * self.io_timeout_ms
    }
    /// How long an acquirer waits after writing before reading back.
    pub fn acquire_wait_ms(&self) -> u64 {
        4 * self.io_timeout_ms
    }
    /// How long a new owner waits after its read-back before it loads the
    /// metadata and commits: `D`, the longest a device request takes. The
    /// old owner may have renewed just before the acquirer's record went
    /// over its own (a standby's read that saw the older record was still
    /// in flight), so it may send writes until `3T` after that renewal, and
    /// each lands up to `D` later; the read-back wait covers `3T` of that
    /// with `T` to spare, this covers `D`. Not after a handoff (the owner
    /// had nothing in flight when it wrote the handoff).
    pub fn quiet_ms(&self) -> u64 {
        self.device_request_max_ms
    }
    /// How often a standby reads the owner sector.
    pub fn watch_every_ms(&self) -> u64 {
        (self.io_timeout_ms / 4).max(10)
    }
}

/// The owner record a majority of copies agree on, if any: `Ok(None)` if a
/// majority shows the lease free; `Err` if no majority agrees (a write in
/// progress, or copies unreadable).
///
/// Copies agree when they show the same *holding* (owner, process,
/// acquisition; [`LeaseRecord::same_holding`]), whatever their counters:
/// renewals that reached only some copies (a copy down for a while, an
/// owner that died in the middle of a renewal) leave the copies of one
/// holding at different counters for good, and requiring equal records
/// would then leave the lease with no majority forever — nobody could ever
/// take it over. The record returned is the holding's newest (highest
/// counter), so a standby sees it change while the owner renews any copy.
pub fn majority(records: &[Result<Option<LeaseRecord>, String>]) -> Result<Option<LeaseRecord>, String> {
    let need = records.len() / 2 + 1;
    let mut free = 0;
    let mut candidates: Vec<(&LeaseRecord, usize)> = Vec::new();
    let mut errors = Vec::new();
    for r in records {
        match r {
            Ok(None) => free += 1,
            Ok(Some(rec)) if rec.is_free() => free += 1,
            Ok(Some(rec)) => match candidates.iter_mut().find(|(c, _)| c.same_holding(rec)) {
                Some((newest, n)) => {
                    *n += 1;
                    if rec.counter > newest.counter {
                        *newest = rec;
                    }
                }
                None => candidates.push((rec, 1)),
            },
            Err(e) => errors.push(e.clone()),
        }
    }
    if free >= need {
        return Ok(None);
    }
    if let Some((rec, _)) = candidates.iter().find(|(_, n)| *n >= need) {
        return Ok(Some((*rec).clone()));
    }
    Err(if errors.is_empty() {
        format!("no majority of the {} lease copies agrees on an owner", records.len())
    } else {
        format!("no majority of the {} lease copies is readable and agrees ({})", records.len(), errors.join("; "))
    })
}

/// The highest generation among the readable copies (free or held); 0 if
/// none shows one.
fn newest_generation(records: &[Result<Option<LeaseRecord>, String>]) -> u64 {
    records.iter().filter_map(|r| r.as_ref().ok()?.as_ref().map(|r| r.generation)).max().unwrap_or(0)
}

/// Where a server stands with the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeasePhase {
    /// Watching the owner sector. `owner` is the record last seen and since
    /// when (this server's monotonic ms) it has not changed.
    Standby { owner: Option<(LeaseRecord, u64)> },
    /// Wrote `record` at `written_at_ms`; reads back `wait_ms` later (the
    /// acquire wait, or none when the owner handed the lease to us).
    Acquiring { record: LeaseRecord, written_at_ms: u64, wait_ms: u64 },
    /// Holds the lease; may commit until `valid_until_ms`.
    Owner { record: LeaseRecord, valid_until_ms: u64 },
    /// Handed the lease on (planned handoff): commits nothing more.
    HandedOff { to: u32 },
    /// Lost it (another owner found, or could not renew in time).
    Lost { why: String },
}

/// What the server must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// Read the owner sector of every copy; report with [`LeaseMachine::read_done`].
    Read,
    /// Write this owner record to every copy; report with [`LeaseMachine::write_done`].
    Write(LeaseRecord),
    /// Nothing until this time (monotonic ms); then [`LeaseMachine::tick`].
    WaitUntil(u64),
}

/// The acquire/renew logic of one server, over injected time and I/O
/// results (the server performs the reads and writes it asks for).
#[derive(Debug, Clone)]
pub struct LeaseMachine {
    pub me: LeaseRecord,
    pub timing: LeaseTiming,
    pub phase: LeasePhase,
    /// Start of the renewal in flight (its reads), for the validity window.
    renew_started_ms: Option<u64>,
    /// Last time the owner sector was read (standby pacing, renew pacing).
    last_read_ms: Option<u64>,
    /// Standby: the copies last seen agreeing on no owner (two acquirers
    /// that each reached some copies, a copy lost meanwhile) and since when
    /// they have not changed.
    split_seen: Option<(Vec<Option<LeaseRecord>>, u64)>,
    /// A new owner commits nothing before this ([`LeaseTiming::quiet_ms`]),
    /// nor does a server whose own last term ended less than `D` ago
    /// ([`LeaseMachine::stand_by`]).
    quiet_until_ms: u64,
    /// The highest generation any copy showed this server, or that it
    /// held: the next one it acquires is above it.
    newest_generation_seen: u64,
}

impl LeaseMachine {
    /// A server that wants the lease; `me` has its host id, instance, name,
    /// addresses (generation and counter are set when it acquires).
    pub fn new(me: LeaseRecord, timing: LeaseTiming) -> LeaseMachine {
        LeaseMachine {
            me,
            timing,
            phase: LeasePhase::Standby { owner: None },
            renew_started_ms: None,
            last_read_ms: None,
            split_seen: None,
            quiet_until_ms: 0,
            newest_generation_seen: 0,
        }
    }

    /// This server's term ended at `now_ms` (lost, failed, or handed off):
    /// watch for the lease again. A term that did not end with a handoff
    /// (which writes only once nothing is in flight) may have sent a write
    /// just before it ended that lands until `D` later, so the next term
    /// this server holds commits nothing before then — even one handed to
    /// it, which waits for nothing else (the handing owner had nothing in
    /// flight, but this server may). Without it, a server that lost the
    /// lease to stale copies of its predecessor's lease record and was
    /// handed it again by the same stale handoff record served at once,
    /// and a journal write of its previous term landed after the new term
    /// had loaded the metadata (simulator exploration seed
    /// 139267659683386).
    pub fn stand_by(&mut self, now_ms: u64) {
        if !matches!(self.phase, LeasePhase::HandedOff { .. }) {
            self.quiet_until_ms = self.quiet_until_ms.max(now_ms.saturating_add(self.timing.quiet_ms()));
        }
        self.phase = LeasePhase::Standby { owner: None };
    }

    /// Whether the server may commit metadata at `now_ms`.
    pub fn may_commit(&self, now_ms: u64) -> bool {
        now_ms >= self.quiet_until_ms
            && matches!(&self.phase, LeasePhase::Owner { valid_until_ms, .. } if now_ms < *valid_until_ms)
    }

    /// The next action at `now_ms` (call after every report and tick).
    pub fn next(&mut self, now_ms: u64) -> LeaseAction {
        match &self.phase {
            LeasePhase::Standby { .. } => match self.last_read_ms {
                Some(t) if now_ms < t + self.timing.watch_every_ms() => {
                    LeaseAction::WaitUntil(t + self.timing.watch_every_ms())
                }
                _ => LeaseAction::Read,
            },
            LeasePhase::Acquiring { written_at_ms, wait_ms, .. } => {
                let at = written_at_ms + wait_ms;
                if now_ms < at {
                    LeaseAction::WaitUntil(at)
                } else {
                    LeaseAction::Read
                }
            }
            LeasePhase::Owner { valid_until_ms, .. } => {
                if now_ms >= *valid_until_ms && self.renew_started_ms.is_none() {
                    // Could not renew in time: stop committing (already, by
                    // `may_commit`) and keep trying — the record may still
                    // be ours if nobody took it.
                }
                match self.last_read_ms {
                    Some(t) if now_ms < t + self.timing.renew_every_ms() => {
                        LeaseAction::WaitUntil(t + self.timing.renew_every_ms())
                    }
                    _ => LeaseAction::Read,
                }
            }
            LeasePhase::HandedOff { .. } | LeasePhase::Lost { .. } => LeaseAction::WaitUntil(u64::MAX),
        }
    }

    /// Starting a read at `now_ms` (renewals count their validity from here).
    pub fn reading(&mut self, now_ms: u64) {
        self.last_read_ms = Some(now_ms);
        if matches!(self.phase, LeasePhase::Owner { .. }) {
            self.renew_started_ms = Some(now_ms);
        }
    }

    /// The owner sectors read (one result per copy); returns the action.
    pub fn read_done(&mut self, now_ms: u64, records: &[Result<Option<LeaseRecord>, String>]) -> LeaseAction {
        // A read is evidence only if it finished within T of its start: a
        // server paused between its read and acting on it would otherwise
        // write a renewal (or take ownership) on what the sectors said
        // before another server took the lease, and overwrite it.
        let fresh = self.last_read_ms.is_some_and(|t| now_ms.saturating_sub(t) <= self.timing.io_timeout_ms);
        self.newest_generation_seen = self.newest_generation_seen.max(newest_generation(records));
        let seen =
            if fresh { majority(records) } else { Err("the read finished more than T after it started".to_string()) };
        match std::mem::replace(&mut self.phase, LeasePhase::Standby { owner: None }) {
            LeasePhase::Standby { owner } => {
                self.phase = LeasePhase::Standby { owner: owner.clone() };
                if seen.is_ok() {
                    self.split_seen = None;
                }
                match seen {
                    // No majority agrees: someone is writing; watch on —
                    // unless the copies stayed as they are for a whole
                    // expiry: then nobody is (two acquirers that each
                    // reached some copies, then a copy lost, leave the
                    // copies split for good, and waiting for a majority
                    // would leave the pool with no server forever).
                    Err(_) => {
                        if !fresh {
                            return self.next(now_ms);
                        }
                        // Only what a majority of readable copies shows is
                        // evidence: copies this server cannot read (cut off
                        // from the devices) say nothing about whether the
                        // owner still renews.
                        let readable = records.iter().filter(|r| r.is_ok()).count();
                        if readable <= records.len() / 2 {
                            self.split_seen = None;
                            return self.next(now_ms);
                        }
                        let copies: Vec<Option<LeaseRecord>> =
                            records.iter().map(|r| r.as_ref().ok().cloned().flatten()).collect();
                        match &self.split_seen {
                            Some((same, since)) if *same == copies => {
                                let newest = copies.iter().flatten().max_by_key(|r| r.generation).cloned();
                                let expire = newest.as_ref().map_or(self.timing.expire_ms(), |r| self.expire_ms(r));
                                if now_ms >= since + expire {
                                    self.split_seen = None;
                                    return self.start_acquire(now_ms, newest.as_ref(), self.timing.acquire_wait_ms());
                                }
                            }
                            _ => self.split_seen = Some((copies, now_ms)),
                        }
                    }
                    // A free lease goes on from the newest generation any
                    // copy shows (a release keeps its term's; this read is
                    // among those `start_acquire` goes above): generations
                    // only ever go up, as fencing devices require of the
                    // server generation (they refuse one below the newest
                    // they were fenced to).
                    Ok(None) => return self.start_acquire(now_ms, None, self.timing.acquire_wait_ms()),
                    // Handed to us: the owner has stopped, nobody else may
                    // take it for a whole expiry: no wait.
                    Ok(Some(rec)) if rec.handoff_to == self.me.host_id && self.me.host_id != 0 => {
                        return self.start_acquire(now_ms, Some(&rec), 0);
                    }
                    Ok(Some(rec)) => match owner {
                        Some((old, since)) if old == rec => {
                            if now_ms >= since + self.expire_ms(&rec) {
                                return self.start_acquire(now_ms, Some(&rec), self.timing.acquire_wait_ms());
                            }
                        }
                        _ => self.phase = LeasePhase::Standby { owner: Some((rec, now_ms)) },
                    },
                }
            }
            LeasePhase::Acquiring { record, written_at_ms, wait_ms } => match seen {
                Ok(Some(rec)) if rec == record => {
                    if wait_ms > 0 {
                        self.quiet_until_ms = self.quiet_until_ms.max(now_ms + self.timing.quiet_ms());
                    }
                    // Ours. The window counted from the acquiring write has
                    // mostly passed during the wait, so renew at once: the
                    // read just done counts as the renewal's read, and
                    // committing starts when its write is done.
                    let valid_until_ms = written_at_ms + self.timing.owner_valid_ms();
                    self.me = record.clone();
                    let mut next = record.clone();
                    next.counter += 1;
                    self.renew_started_ms = self.last_read_ms;
                    self.phase = LeasePhase::Owner { record, valid_until_ms };
                    return LeaseAction::Write(next);
                }
                // Lost the race (or no majority): watch again.
                _ => self.phase = LeasePhase::Standby { owner: None },
            },
            LeasePhase::Owner { record, valid_until_ms } => match seen {
                Ok(Some(rec)) if rec.same_holding(&record) => {
                    let mut next = record.clone();
                    next.counter = rec.counter.max(record.counter) + 1;
                    self.phase = LeasePhase::Owner { record, valid_until_ms };
                    return LeaseAction::Write(next);
                }
                Ok(Some(rec)) => {
                    self.phase = LeasePhase::Lost {
                        why: format!(
                            "another metadata server took the pool lease: {} (host id {}, generation {})",
                            rec.name, rec.host_id, rec.generation
                        ),
                    };
                }
                Ok(None) => {
                    self.phase = LeasePhase::Lost { why: "the pool lease was released under this server".to_string() };
                }
                // Unreadable this time: keep the lease while it is valid.
                Err(_) => self.phase = LeasePhase::Owner { record, valid_until_ms },
            },
            other => self.phase = other,
        }
        self.next(now_ms)
    }

    /// The writes of `Write(record)` finished: `ok` copies took it, of `copies`.
    pub fn write_done(&mut self, now_ms: u64, record: &LeaseRecord, ok: usize, copies: usize) -> LeaseAction {
        let majority = ok > copies / 2;
        match &mut self.phase {
            LeasePhase::Owner { record: current, valid_until_ms } if majority => {
                if let Some(started) = self.renew_started_ms.take() {
                    *valid_until_ms = (*valid_until_ms).max(started + self.timing.owner_valid_ms());
                }
                *current = record.clone();
            }
            LeasePhase::Owner { .. } => {
                self.renew_started_ms = None;
            }
            LeasePhase::Acquiring { .. } if !majority => self.phase = LeasePhase::Standby { owner: None },
            _ => {}
        }
        self.next(now_ms)
    }

    /// The owner hands the lease to `host_id`: the record to write; the
    /// machine commits nothing more whatever the write's outcome.
    pub fn hand_off(&mut self, to: u32) -> Option<LeaseRecord> {
        let LeasePhase::Owner { record, .. } = &self.phase else { return None };
        let mut r = record.clone();
        r.handoff_to = to;
        r.counter += 1;
        self.phase = LeasePhase::HandedOff { to };
        Some(r)
    }

    fn expire_ms(&self, owner: &LeaseRecord) -> u64 {
        // The owner's own timing decides how long it may be silent.
        let t =
            LeaseTiming { io_timeout_ms: u64::from(owner.io_timeout_ms).max(self.timing.io_timeout_ms), ..self.timing };
        t.expire_ms()
    }

    /// Acquires above `previous` (the record that let it) and above every
    /// generation seen: stale copies of an older owner's record can make a
    /// majority over a newer one (its writes landing late), and a term
    /// that reused the newer one's generation would share it with the
    /// term before — fencing devices, which refuse only generations below
    /// the newest, could not tell the two apart.
    fn start_acquire(&mut self, now_ms: u64, previous: Option<&LeaseRecord>, wait_ms: u64) -> LeaseAction {
        let mut record = self.me.clone();
        record.generation = previous.map_or(0, |p| p.generation).max(self.newest_generation_seen) + 1;
        self.newest_generation_seen = record.generation;
        record.counter = 0;
        record.handoff_to = 0;
        record.role = ServerRole::Active;
        self.phase = LeasePhase::Acquiring { record: record.clone(), written_at_ms: now_ms, wait_ms };
        LeaseAction::Write(record)
    }
}

#[cfg(test)]
mod tests;
