//! Byte-range locks on shared volumes: which handle holds which bytes of a
//! volume, whether a new request conflicts, and whether a write may go.
//!
//! Why a plain type shared by the server and the agents: the metadata server
//! decides conflicts when a handle asks for locks, and every agent holding
//! the volume refuses writes into another handle's locked range. Both must
//! apply one rule, so the rule lives here, free of sockets and time, and is
//! tested alone. Locks are advisory between sanvol agents: they are enforced
//! by agents, not by plain devices.
//!
//! A lock is exclusive: no two live handles of one volume hold overlapping
//! bytes. A handle's locks are a set of disjoint half-open ranges
//! `[start, start + len)`; they belong to the handle and end with it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{HandleId, VolumeId};

/// The most ranges one handle may lock: a lock request is one control frame
/// and every agent checks each write against the table, so both stay small.
pub const LOCK_RANGES_PER_HANDLE_MAX: usize = 64;

/// A locked range `[start, start + len_bytes)` of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockRange {
    pub start: u64,
    pub len_bytes: u64,
}

impl LockRange {
    /// The first byte past the range; `None` if it would overflow.
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len_bytes)
    }

    /// Whether `[offset, offset + len_bytes)` shares at least one byte with
    /// this range (saturating: a range reaching past `u64::MAX` overlaps
    /// everything above its start).
    pub fn overlaps(&self, offset: u64, len_bytes: u64) -> bool {
        if self.len_bytes == 0 || len_bytes == 0 {
            return false;
        }
        let self_end = self.start.saturating_add(self.len_bytes);
        let other_end = offset.saturating_add(len_bytes);
        self.start < other_end && offset < self_end
    }
}

impl std::fmt::Display for LockRange {
    /// `bytes START..END` (END exclusive), as users read it in errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bytes {}..{}", self.start, self.start.saturating_add(self.len_bytes))
    }
}

/// The locks one handle holds, with the name of the agent that opened it so
/// a refusal can name the holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleLocks {
    pub handle: HandleId,
    pub holder: String,
    pub ranges: Vec<LockRange>,
}

/// Why a lock request or its ranges were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LockError {
    #[error(
        "{wanted} of volume {volume} overlaps {held} locked by agent {holder} (handle {handle}): \
         lock a range that does not overlap it, or wait until that handle is closed"
    )]
    Conflict { volume: VolumeId, wanted: LockRange, held: LockRange, holder: String, handle: HandleId },
    #[error("{range} of volume {volume} is empty: give each lock a length above 0 (START+LEN)")]
    Empty { volume: VolumeId, range: LockRange },
    #[error(
        "{range} reaches past the end of volume {volume} ({volume_bytes} bytes): lock only bytes inside the volume"
    )]
    PastEnd { volume: VolumeId, range: LockRange, volume_bytes: u64 },
    #[error("{first} and {second} of one request overlap: give each byte once")]
    SelfOverlap { first: LockRange, second: LockRange },
    #[error("{count} ranges in one lock request: at most {LOCK_RANGES_PER_HANDLE_MAX} per handle")]
    TooMany { count: usize },
}

/// The lock table of one volume: the locks of its live handles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    pub holders: Vec<HandleLocks>,
}

impl LockTable {
    /// Checks a request of `handle` for `ranges` on `volume` of
    /// `volume_bytes` against itself and every *other* handle's locks
    /// (a handle's own earlier locks are replaced by the request, so they
    /// never conflict). Returns the ranges sorted by start.
    pub fn check_request(
        &self,
        volume: VolumeId,
        volume_bytes: u64,
        handle: HandleId,
        ranges: &[LockRange],
    ) -> Result<Vec<LockRange>, LockError> {
        if ranges.len() > LOCK_RANGES_PER_HANDLE_MAX {
            return Err(LockError::TooMany { count: ranges.len() });
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.start);
        for range in &sorted {
            if range.len_bytes == 0 {
                return Err(LockError::Empty { volume, range: *range });
            }
            match range.end() {
                Some(end) if end <= volume_bytes => {}
                _ => return Err(LockError::PastEnd { volume, range: *range, volume_bytes }),
            }
        }
        for pair in sorted.windows(2) {
            if pair[0].overlaps(pair[1].start, pair[1].len_bytes) {
                return Err(LockError::SelfOverlap { first: pair[0], second: pair[1] });
            }
        }
        for wanted in &sorted {
            if let Some((other, held)) = self.holder_of(wanted.start, wanted.len_bytes, Some(handle)) {
                return Err(LockError::Conflict {
                    volume,
                    wanted: *wanted,
                    held,
                    holder: other.holder.clone(),
                    handle: other.handle,
                });
            }
        }
        Ok(sorted)
    }

    /// Sets `handle`'s locks to `ranges` (already checked); an empty set
    /// releases them.
    pub fn set(&mut self, handle: HandleId, holder: &str, ranges: Vec<LockRange>) {
        self.release(handle);
        if !ranges.is_empty() {
            self.holders.push(HandleLocks { handle, holder: holder.to_string(), ranges });
            self.holders.sort_by_key(|h| h.handle);
        }
    }

    /// Drops every lock of `handle` (closed, broken or removed).
    pub fn release(&mut self, handle: HandleId) {
        self.holders.retain(|h| h.handle != handle);
    }

    /// The first lock of a handle other than `except` that overlaps
    /// `[offset, offset + len_bytes)`, with the range it holds there.
    pub fn holder_of(
        &self,
        offset: u64,
        len_bytes: u64,
        except: Option<HandleId>,
    ) -> Option<(&HandleLocks, LockRange)> {
        self.holders
            .iter()
            .filter(|h| Some(h.handle) != except)
            .find_map(|h| h.ranges.iter().find(|r| r.overlaps(offset, len_bytes)).map(|r| (h, *r)))
    }

    /// Whether the handle `writer` may write `[offset, offset + len_bytes)`:
    /// refused (with the holder) when another handle locks any of those
    /// bytes; its own locks and unlocked bytes go.
    pub fn check_write(&self, writer: HandleId, offset: u64, len_bytes: u64) -> Result<(), WriteRefused> {
        match self.holder_of(offset, len_bytes, Some(writer)) {
            None => Ok(()),
            Some((other, held)) => {
                Err(WriteRefused { offset, len_bytes, held, holder: other.holder.clone(), handle: other.handle })
            }
        }
    }

    /// The locks `handle` holds (empty if none).
    pub fn of(&self, handle: HandleId) -> &[LockRange] {
        self.holders.iter().find(|h| h.handle == handle).map(|h| h.ranges.as_slice()).unwrap_or(&[])
    }
}

/// A write refused because another handle locks some of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "write of {len_bytes} bytes at {offset} refused: {held} are locked by agent {holder} (handle {handle}); \
     write only into this handle's locks or unlocked bytes"
)]
pub struct WriteRefused {
    pub offset: u64,
    pub len_bytes: u64,
    pub held: LockRange,
    pub holder: String,
    pub handle: HandleId,
}

/// Parses `START+LEN[,START+LEN…]` as given to `sanvol-agent attach --lock`;
/// each number is bytes or has a binary unit (K, M, G, T; `1M` is 2^20).
pub fn parse_lock_spec(spec: &str) -> Result<Vec<LockRange>, String> {
    let mut ranges = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (start, len) = part.split_once('+').ok_or_else(|| {
            format!(
                "{part:?} is not a lock range: write START+LEN (e.g. 0+64M or 1G+512K), several separated by commas"
            )
        })?;
        ranges.push(LockRange { start: parse_bytes(start)?, len_bytes: parse_bytes(len)? });
    }
    if ranges.len() > LOCK_RANGES_PER_HANDLE_MAX {
        return Err(format!("{} lock ranges: at most {LOCK_RANGES_PER_HANDLE_MAX}", ranges.len()));
    }
    Ok(ranges)
}

/// A byte count with an optional binary unit (K, M, G, T, with or without
/// `iB`/`B`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a byte count: use a number of bytes or one with K, M, G or T (binary units)");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOL: VolumeId = VolumeId(1);
    const MIB: u64 = 1 << 20;

    fn r(start: u64, len_bytes: u64) -> LockRange {
        LockRange { start, len_bytes }
    }

    fn table_with_a() -> LockTable {
        let mut t = LockTable::default();
        t.set(HandleId(7), "host-a", vec![r(0, 8 * MIB)]);
        t
    }

    #[test]
    fn an_overlapping_request_is_refused_naming_the_holder() {
        let t = table_with_a();
        let err = t.check_request(VOL, 64 * MIB, HandleId(8), &[r(8 * MIB - 1, MIB)]).unwrap_err();
        assert!(matches!(err, LockError::Conflict { ref holder, handle: HandleId(7), .. } if holder == "host-a"));
        let msg = err.to_string();
        assert!(msg.contains("host-a") && msg.contains("handle h7"), "{msg}");
    }

    #[test]
    fn adjacent_and_disjoint_requests_go() {
        let t = table_with_a();
        let got = t.check_request(VOL, 64 * MIB, HandleId(8), &[r(16 * MIB, MIB), r(8 * MIB, MIB)]).unwrap();
        assert_eq!(got, vec![r(8 * MIB, MIB), r(16 * MIB, MIB)], "sorted by start");
    }

    #[test]
    fn a_handle_s_own_locks_never_conflict_with_its_new_request() {
        let t = table_with_a();
        assert!(t.check_request(VOL, 64 * MIB, HandleId(7), &[r(MIB, MIB)]).is_ok());
    }

    #[test]
    fn empty_past_end_self_overlapping_and_too_many_are_refused() {
        let t = LockTable::default();
        assert!(matches!(t.check_request(VOL, MIB, HandleId(1), &[r(0, 0)]), Err(LockError::Empty { .. })));
        assert!(matches!(t.check_request(VOL, MIB, HandleId(1), &[r(1, MIB)]), Err(LockError::PastEnd { .. })));
        assert!(matches!(t.check_request(VOL, MIB, HandleId(1), &[r(u64::MAX, 2)]), Err(LockError::PastEnd { .. })));
        assert!(matches!(
            t.check_request(VOL, MIB, HandleId(1), &[r(100, 10), r(0, 101)]),
            Err(LockError::SelfOverlap { .. })
        ));
        let many: Vec<_> = (0..=LOCK_RANGES_PER_HANDLE_MAX as u64).map(|i| r(i * 2, 1)).collect();
        assert!(matches!(t.check_request(VOL, MIB, HandleId(1), &many), Err(LockError::TooMany { .. })));
    }

    #[test]
    fn writes_into_another_handle_s_lock_are_refused_own_and_unlocked_go() {
        let mut t = table_with_a();
        t.set(HandleId(8), "host-b", vec![r(8 * MIB, 8 * MIB)]);
        assert!(t.check_write(HandleId(7), 0, 4096).is_ok(), "own lock");
        assert!(t.check_write(HandleId(7), 32 * MIB, 4096).is_ok(), "unlocked");
        let refused = t.check_write(HandleId(7), 8 * MIB - 512, 1024).unwrap_err();
        assert_eq!((refused.holder.as_str(), refused.handle), ("host-b", HandleId(8)));
        assert!(refused.to_string().contains("host-b"));
        assert!(t.check_write(HandleId(9), 0, 1).is_err(), "a handle without locks may not write locked bytes");
        assert!(t.check_write(HandleId(9), 16 * MIB, 1).is_ok(), "first byte past B's lock");
    }

    #[test]
    fn release_and_an_empty_set_end_a_handle_s_locks() {
        let mut t = table_with_a();
        t.set(HandleId(8), "host-b", vec![r(8 * MIB, MIB)]);
        t.release(HandleId(7));
        assert!(t.check_write(HandleId(8), 0, 1).is_ok());
        t.set(HandleId(8), "host-b", Vec::new());
        assert!(t.holders.is_empty());
        assert!(t.of(HandleId(8)).is_empty());
    }

    #[test]
    fn the_lock_spec_parses_units_and_lists() {
        assert_eq!(parse_lock_spec("0+64M").unwrap(), vec![r(0, 64 * MIB)]);
        assert_eq!(parse_lock_spec("1G+512K, 4096+4096").unwrap(), vec![r(1 << 30, 512 << 10), r(4096, 4096)]);
        assert!(parse_lock_spec("0-64M").unwrap_err().contains("START+LEN"));
        assert!(parse_lock_spec("x+1").unwrap_err().contains("byte count"));
        assert!(parse_lock_spec("0+1Q").is_err());
        assert!(parse_lock_spec("0+99999999999T").unwrap_err().contains("too large"));
    }

    #[test]
    fn overlap_is_half_open_and_saturating() {
        assert!(!r(0, 10).overlaps(10, 5));
        assert!(r(0, 10).overlaps(9, 5));
        assert!(!r(0, 0).overlaps(0, 5));
        assert!(r(u64::MAX - 1, 10).overlaps(u64::MAX - 1, 1));
    }
}
