//! The cached bytes not yet on the devices, by volume offset: what a read
//! must take from the cache instead of the devices (read-your-writes).
//!
//! Why non-overlapping pieces keyed by start: a later write that overlaps
//! earlier ones replaces exactly the bytes it covers, so a read overlays at
//! most one piece per byte, and a destaged record removes only the pieces
//! still carrying its sequence number (bytes a newer write replaced stay).
//! Pieces share the written payload (`Bytes` slices), never copy it.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

#[derive(Debug, Clone)]
struct Piece {
    data: Bytes,
    seq: u64,
}

#[derive(Debug, Default)]
pub struct DirtyMap {
    pieces: BTreeMap<u64, Piece>,
    bytes: u64,
}

impl DirtyMap {
    /// Bytes held (the "dirty bytes" a status shows).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Removes `[start, end)` from every piece, keeping the parts outside.
    fn cut(&mut self, start: u64, end: u64) {
        let overlapping: Vec<u64> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(&at, piece)| at + piece.data.len() as u64 > start)
            .map(|(&at, _)| at)
            .collect();
        for at in overlapping {
            let piece = self.pieces.remove(&at).expect("listed");
            let piece_end = at + piece.data.len() as u64;
            self.bytes -= piece.data.len() as u64;
            if at < start {
                let keep = piece.data.slice(..(start - at) as usize);
                self.bytes += keep.len() as u64;
                self.pieces.insert(at, Piece { data: keep, seq: piece.seq });
            }
            if piece_end > end {
                let keep = piece.data.slice((end - at) as usize..);
                self.bytes += keep.len() as u64;
                self.pieces.insert(end, Piece { data: keep, seq: piece.seq });
            }
        }
    }

    /// Records an acknowledged write (it replaces whatever it overlaps).
    pub fn insert(&mut self, offset: u64, data: Bytes, seq: u64) {
        if data.is_empty() {
            return;
        }
        self.cut(offset, offset + data.len() as u64);
        self.bytes += data.len() as u64;
        self.pieces.insert(offset, Piece { data, seq });
    }

    /// The record `seq` covering `[offset, offset+len)` is on the devices:
    /// drops the pieces that still carry it.
    pub fn destaged(&mut self, offset: u64, len: u64, seq: u64) {
        let ours: Vec<u64> =
            self.pieces.range(offset..offset + len).filter(|(_, piece)| piece.seq == seq).map(|(&at, _)| at).collect();
        for at in ours {
            let piece = self.pieces.remove(&at).expect("listed");
            self.bytes -= piece.data.len() as u64;
        }
    }

    /// The cached parts of `[offset, offset+len)`: (volume offset, bytes),
    /// in order, clipped to the range.
    pub fn overlay(&self, offset: u64, len: u64) -> Vec<(u64, Bytes)> {
        let end = offset + len;
        let mut found: Vec<(u64, Bytes)> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(&at, piece)| at + piece.data.len() as u64 > offset)
            .map(|(&at, piece)| {
                let from = offset.max(at);
                let to = end.min(at + piece.data.len() as u64);
                (from, piece.data.slice((from - at) as usize..(to - at) as usize))
            })
            .collect();
        found.reverse();
        found
    }
}

/// Whether `pieces`, an [`DirtyMap::overlay`] of `len` bytes, hold every
/// byte of it (pieces never overlap, so their lengths then add up to `len`).
pub fn covers(pieces: &[(u64, Bytes)], len: u64) -> bool {
    pieces.iter().map(|(_, data)| data.len() as u64).sum::<u64>() == len
}

/// The bytes of consecutive pieces as one buffer (no copy for one piece).
pub fn join(pieces: Vec<(u64, Bytes)>) -> Bytes {
    if pieces.len() == 1 {
        return pieces.into_iter().next().expect("one piece").1;
    }
    let mut out = BytesMut::with_capacity(pieces.iter().map(|(_, data)| data.len()).sum());
    for (_, data) in pieces {
        out.extend_from_slice(&data);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flat model: the newest write per byte.
    fn apply(model: &mut [Option<(u8, u64)>], offset: u64, len: u64, value: u8, seq: u64) {
        for b in &mut model[offset as usize..(offset + len) as usize] {
            *b = Some((value, seq));
        }
    }

    #[test]
    fn overlapping_partial_writes_read_back_newest_bytes() {
        let mut map = DirtyMap::default();
        let mut model = vec![None; 64];
        let writes = [(0u64, 16u64, 1u8), (8, 4, 2), (4, 20, 3), (30, 2, 4), (2, 1, 5), (0, 64, 6), (10, 3, 7)];
        for (seq, &(offset, len, value)) in writes.iter().enumerate() {
            map.insert(offset, Bytes::from(vec![value; len as usize]), seq as u64);
            apply(&mut model, offset, len, value, seq as u64);
            let mut seen = vec![None; 64];
            for (at, data) in map.overlay(0, 64) {
                for (i, b) in data.iter().enumerate() {
                    seen[at as usize + i] = Some(*b);
                }
            }
            let expected: Vec<Option<u8>> = model.iter().map(|b| b.map(|(v, _)| v)).collect();
            assert_eq!(seen, expected, "after write {seq}");
            assert_eq!(map.bytes(), expected.iter().filter(|b| b.is_some()).count() as u64);
        }
        // Destaging the big write (seq 5) leaves the newer seq 6 bytes.
        map.destaged(0, 64, 5);
        assert_eq!(map.bytes(), 3);
        assert_eq!(map.overlay(0, 64), vec![(10, Bytes::from(vec![7u8; 3]))]);
        map.destaged(10, 3, 6);
        assert_eq!(map.bytes(), 0);
    }

    #[test]
    fn overlay_is_clipped_to_the_range() {
        let mut map = DirtyMap::default();
        map.insert(100, Bytes::from(vec![9u8; 100]), 1);
        assert_eq!(map.overlay(150, 10), vec![(150, Bytes::from(vec![9u8; 10]))]);
        assert_eq!(map.overlay(0, 100), vec![]);
        assert_eq!(map.overlay(199, 50), vec![(199, Bytes::from(vec![9u8; 1]))]);
    }
}
