//! What a replay of a cache mirror writes: the bytes the held records leave
//! on the volume, as few, large, disjoint writes that may go to the devices
//! all at once.
//!
//! Why not the records one by one, in order: each one waited for the
//! device's answer before the next was sent, so a replay took records ×
//! device latency — 507 records of 64 KiB behind a device answering a write
//! in 100 ms kept the volume closed for 51 s (`cargo test -p sanvol-tests
//! --test cache fio_verify`, before this module), and a full 1 GiB log of
//! 4 KiB writes behind a 1 ms array would take over four minutes. Order
//! matters only where records overlap, and there the later one wins; so the
//! replay computes what the records leave, byte for byte, with the later
//! record on top ([`final_pieces`]), joins neighbours into writes of up to
//! [`REPLAY_WRITE_BYTES_MAX`], and sends up to [`REPLAY_WRITES_IN_FLIGHT`]
//! of them at a time (`super::worker`). The writes are disjoint, so the
//! order in which they land changes nothing.
//!
//! Memory: the plan is made of [`Span`]s (where the bytes are in the
//! mirror file), and each write's bytes are read from the file as it is
//! sent, so a replay holds the records' index and at most
//! [`REPLAY_WRITES_IN_FLIGHT`] × [`REPLAY_WRITE_BYTES_MAX`] (32 MiB) of
//! data, whatever the size of the mirror (before, the whole file: a server
//! replaying the 1 GiB mirrors of ten volumes of a dead host at once held
//! 10 GiB).
//!
//! Why that is as safe as the ordered replay: nobody reads or writes the
//! volume until the replay has finished (the open waits for it, and "not
//! pending" is committed only after it); a replay that fails or is cut by a
//! crash is run again, whole, before the next open, and writes the same
//! bytes — what the devices held in between is never seen.

use std::collections::BTreeMap;

/// Largest write a replay sends (neighbouring records are joined up to it).
pub const REPLAY_WRITE_BYTES_MAX: usize = 1 << 20;
/// Replay writes sent before the first answer is awaited.
pub const REPLAY_WRITES_IN_FLIGHT: usize = 32;

/// Bytes a replay plans with: where they are in a mirror file ([`Span`]);
/// the tests plan with the bytes themselves. A piece can be cut.
pub trait Piece: Sized {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `range` of it.
    fn slice(&self, range: std::ops::Range<usize>) -> Self;
}

/// `len` bytes from `skip` into record `record` (its index in the
/// mirror's [`super::store::HeldIndex`]): what the replay plans with, so a
/// mirror of any size costs its index in memory, and each write's bytes
/// are read from the file when it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub record: usize,
    pub skip: usize,
    pub len: usize,
}

impl Piece for Span {
    fn len(&self) -> usize {
        self.len
    }
    fn slice(&self, range: std::ops::Range<usize>) -> Span {
        Span { record: self.record, skip: self.skip + range.start, len: range.end - range.start }
    }
}

/// What `records` (volume offset, piece; oldest first) leave on the volume,
/// where a later record wins over an earlier one: disjoint writes in offset
/// order, each the pieces to join (neighbours joined, none longer than
/// `max_bytes` in all).
pub fn final_pieces<P: Piece>(records: impl IntoIterator<Item = (u64, P)>, max_bytes: usize) -> Vec<(u64, Vec<P>)> {
    let max_bytes = max_bytes.max(1);
    // Disjoint pieces by start offset: what the records so far leave.
    let mut pieces: BTreeMap<u64, P> = BTreeMap::new();
    for (start, data) in records {
        if data.is_empty() {
            continue;
        }
        let end = start.saturating_add(data.len() as u64);
        // Every piece that overlaps [start, end): keep what lies outside it.
        let overlapping: Vec<u64> = pieces
            .range(..end)
            .rev()
            .take_while(|(at, piece)| *at + piece.len() as u64 > start)
            .map(|(at, _)| *at)
            .collect();
        for at in overlapping {
            let Some(piece) = pieces.remove(&at) else { continue };
            let piece_end = at + piece.len() as u64;
            if at < start {
                pieces.insert(at, piece.slice(0..(start - at) as usize));
            }
            if piece_end > end {
                pieces.insert(end, piece.slice((end - at) as usize..piece.len()));
            }
        }
        pieces.insert(start, data);
    }
    join_neighbours(pieces, max_bytes)
}

/// Groups pieces that meet into writes of at most `max_bytes`; a piece
/// longer than that is cut.
fn join_neighbours<P: Piece>(pieces: BTreeMap<u64, P>, max_bytes: usize) -> Vec<(u64, Vec<P>)> {
    let mut writes = Vec::new();
    // The write being built: its start, its parts and their length.
    let mut run: Option<(u64, Vec<P>, usize)> = None;
    for (mut at, mut piece) in pieces {
        while !piece.is_empty() {
            let meets = matches!(&run, Some((start, _, len)) if start + *len as u64 == at && *len < max_bytes);
            if !meets {
                if let Some((start, parts, _)) = run.take() {
                    writes.push((start, parts));
                }
                run = Some((at, Vec::new(), 0));
            }
            let Some((_, parts, len)) = run.as_mut() else { break };
            let take = piece.len().min(max_bytes - *len);
            parts.push(piece.slice(0..take));
            *len += take;
            piece = piece.slice(take..piece.len());
            at += take as u64;
        }
    }
    if let Some((start, parts, _)) = run {
        writes.push((start, parts));
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    impl Piece for Bytes {
        fn len(&self) -> usize {
            Bytes::len(self)
        }
        fn slice(&self, range: std::ops::Range<usize>) -> Bytes {
            Bytes::slice(self, range)
        }
    }

    /// [`final_pieces`] of bytes in memory, each write's pieces joined.
    fn final_writes(records: impl IntoIterator<Item = (u64, Bytes)>, max_bytes: usize) -> Vec<(u64, Bytes)> {
        final_pieces(records, max_bytes)
            .into_iter()
            .map(|(at, parts)| {
                let data = if parts.len() == 1 {
                    parts.into_iter().next().unwrap_or_default()
                } else {
                    let mut joined = bytes::BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
                    parts.iter().for_each(|p| joined.extend_from_slice(p));
                    joined.freeze()
                };
                (at, data)
            })
            .collect()
    }

    fn record(at: u64, len: usize, fill: u8) -> (u64, Bytes) {
        (at, Bytes::from(vec![fill; len]))
    }

    /// The records (or writes) applied one by one, in order, to a zeroed
    /// image.
    fn in_order(records: &[(u64, Bytes)], size: usize) -> Vec<u8> {
        let mut image = vec![0u8; size];
        for (at, data) in records {
            image[*at as usize..*at as usize + data.len()].copy_from_slice(data);
        }
        image
    }

    #[test]
    fn a_later_record_wins_where_records_overlap_and_the_rest_of_each_stays() {
        let records = vec![record(0, 100, 1), record(50, 100, 2), record(20, 10, 3), record(140, 20, 4)];
        let writes = final_writes(records.clone(), 1 << 20);
        assert_eq!(in_order(&writes, 200), in_order(&records, 200));
        // One run from 0 to 160: joined into one write.
        assert_eq!(writes.len(), 1);
        assert_eq!((writes[0].0, writes[0].1.len()), (0, 160));
    }

    #[test]
    fn neighbours_are_joined_up_to_the_limit_and_gaps_are_kept() {
        let records: Vec<_> = (0..10).map(|i| record(i * 10, 10, i as u8 + 1)).chain([record(200, 5, 9)]).collect();
        let writes = final_writes(records.clone(), 30);
        let shape: Vec<_> = writes.iter().map(|(at, d)| (*at, d.len())).collect();
        assert_eq!(shape, vec![(0, 30), (30, 30), (60, 30), (90, 10), (200, 5)]);
        assert_eq!(in_order(&writes, 300), in_order(&records, 300));
    }

    #[test]
    fn a_record_longer_than_the_limit_is_cut() {
        let writes = final_writes(vec![record(7, 25, 5)], 10);
        let shape: Vec<_> = writes.iter().map(|(at, d)| (*at, d.len())).collect();
        assert_eq!(shape, vec![(7, 10), (17, 10), (27, 5)]);
    }

    /// Planned as spans of the records, then read: the same writes as
    /// planned with the bytes in memory (what the replay sends from a
    /// mirror file it never holds whole).
    #[test]
    fn spans_of_the_records_plan_the_same_writes_as_their_bytes() {
        let records =
            vec![record(0, 100, 1), record(50, 100, 2), record(20, 10, 3), record(140, 20, 4), record(400, 70, 5)];
        let spans = records.iter().enumerate().map(|(i, (at, d))| (*at, Span { record: i, skip: 0, len: d.len() }));
        let read = |s: &Span| records[s.record].1.slice(s.skip..s.skip + s.len);
        for max in [1, 7, 30, 64, 1 << 20] {
            let planned: Vec<(u64, Bytes)> = final_pieces(spans.clone(), max)
                .into_iter()
                .map(|(at, parts)| (at, parts.iter().flat_map(|s| read(s).to_vec()).collect::<Vec<u8>>().into()))
                .collect();
            assert_eq!(planned, final_writes(records.clone(), max), "max {max}");
        }
    }

    /// Against the ordered replay, on random records (a small xorshift: no
    /// dependency, the seeds are fixed): the same bytes everywhere, writes
    /// disjoint, in order and within the limit.
    #[test]
    fn random_records_leave_what_the_ordered_replay_leaves() {
        const SIZE: usize = 4096;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for round in 0..500 {
            let count = 1 + next(40) as usize;
            let records: Vec<_> = (0..count)
                .map(|i| {
                    let at = next(SIZE as u64 - 1);
                    let len = 1 + next((SIZE as u64 - at).min(600)) as usize;
                    record(at, len, (i % 250) as u8 + 1)
                })
                .collect();
            let max = 1 + next(900) as usize;
            let writes = final_writes(records.clone(), max);
            assert_eq!(in_order(&writes, SIZE), in_order(&records, SIZE), "round {round}: {records:?}");
            for pair in writes.windows(2) {
                assert!(pair[0].0 + pair[0].1.len() as u64 <= pair[1].0, "round {round}: overlapping writes");
            }
            assert!(writes.iter().all(|(_, d)| !d.is_empty() && d.len() <= max), "round {round}");
            // Every written byte was written by some record.
            let mut covered = vec![false; SIZE];
            for (at, data) in &records {
                covered[*at as usize..*at as usize + data.len()].fill(true);
            }
            let written: usize = writes.iter().map(|(_, d)| d.len()).sum();
            assert_eq!(written, covered.iter().filter(|c| **c).count(), "round {round}");
        }
    }
}
