//! The records a failed mirror may still hold, by volume range: what the
//! server would write to the devices if this agent died now and the
//! server (restarted, or back on the network) replayed its mirror.
//!
//! Why the cache needs them: while the mirror is gone the cache writes
//! through — a write is acknowledged once it is on the devices. If that
//! write lands over a range an older record of the failed mirror covers, a
//! later replay of that mirror would put the older bytes back over an
//! acknowledged write. So such a write is acknowledged only once the mirror
//! has been started afresh (which empties it, [`super::CacheMirror::open`]);
//! writes elsewhere are acknowledged as soon as they are on the devices.
//! The set is filled when mirroring fails and when the log's records are
//! staged for a new start (an attempt that fails may have left them as the
//! mirror's file), and emptied when mirroring starts again.
//!
//! Each record is kept with its sequence number: a write whose own batch
//! went to the failed mirror is at risk only from *older* records there (a
//! replay writes the mirror in order, so its own record, if the mirror has
//! it, lands last).

use std::collections::BTreeMap;

use super::RECORD_CHUNK_BYTES;

#[derive(Debug, Default)]
pub struct StaleRanges {
    /// (start, seq) -> end. Records are at most [`RECORD_CHUNK_BYTES`]
    /// long, so a record overlapping `[start, end)` starts after
    /// `start - RECORD_CHUNK_BYTES`.
    records: BTreeMap<(u64, u64), u64>,
}

impl StaleRanges {
    /// Records `[offset, offset + len)`, written by record `seq`, as
    /// possibly held by the failed mirror. Longer ranges are split.
    pub fn add(&mut self, offset: u64, len: u64, seq: u64) {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let piece_end = end.min(at + RECORD_CHUNK_BYTES as u64);
            let slot = self.records.entry((at, seq)).or_insert(piece_end);
            *slot = (*slot).max(piece_end);
            at = piece_end;
        }
    }

    /// Whether a record older than `seq` touches `[offset, offset + len)`:
    /// a write there (sequence number `seq`) must wait for the mirror to
    /// be emptied before it is acknowledged.
    pub fn threatens(&self, offset: u64, len: u64, seq: u64) -> bool {
        let end = offset + len;
        let from = offset.saturating_sub(RECORD_CHUNK_BYTES as u64);
        self.records
            .range((from, 0)..(end, 0))
            .any(|(&(start, record_seq), &record_end)| record_seq < seq && start < end && record_end > offset)
    }

    /// The mirror was started afresh: it holds nothing.
    pub fn clear(&mut self) {
        self.records.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_older_overlapping_records_threaten_a_write() {
        let mut stale = StaleRanges::default();
        stale.add(8192, 4096, 5);
        // Overlapping, newer: threatened.
        assert!(stale.threatens(8192, 4096, 9));
        assert!(stale.threatens(4096, 8192, 9));
        assert!(stale.threatens(12287, 1, 9));
        // Its own record (or an older write): not.
        assert!(!stale.threatens(8192, 4096, 5));
        assert!(!stale.threatens(8192, 4096, 2));
        // Beside it: not.
        assert!(!stale.threatens(4096, 4096, 9));
        assert!(!stale.threatens(12288, 4096, 9));
        stale.clear();
        assert!(!stale.threatens(8192, 4096, 9));
    }

    #[test]
    fn a_long_record_far_before_the_write_still_threatens_it() {
        let mut stale = StaleRanges::default();
        // 3 MiB from 0: split into 1 MiB pieces, the last reaching 3 MiB.
        stale.add(0, 3 << 20, 1);
        assert!(stale.threatens((3 << 20) - 512, 512, 2));
        assert!(!stale.threatens(3 << 20, 512, 2));
        // Shorter records after a long one do not hide it.
        let mut stale = StaleRanges::default();
        stale.add(0, 1 << 20, 1);
        stale.add(4096, 512, 2);
        assert!(stale.threatens((1 << 20) - 4096, 4096, 3));
    }
}
