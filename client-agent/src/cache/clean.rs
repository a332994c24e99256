//! Clean blocks read from the devices, kept in memory (least recently used
//! first out): what makes a re-read of a cached volume a memory copy instead
//! of a device round trip.
//!
//! Why it may hold device bytes at all: a cached volume has one exclusive
//! holder, and while it holds the volume its devices change only through
//! this cache (destage, write-around, TRIM and WRITE_ZEROES): reconfiguration
//! copies and snapshots keep the bytes, and the server writes the volume
//! (a mirror's replay) only after the holder is gone. So the rule is: a block here is never
//! older than the devices, wherever no dirty record lies over it.
//!
//! How that holds: every change of the devices' bytes drops its range
//! ([`CleanBlocks::invalidate`]) — before a destaged record leaves the dirty
//! map (until then the record's overlay hides what lies under it), and when
//! a write-around, TRIM or WRITE_ZEROES ends (done, failed or abandoned by
//! its caller). A drop removes the blocks and *spoils* every device read in
//! flight over the range: a read registers before it goes to the devices
//! ([`CleanBlocks::lookup_or_begin`]), and what a spoiled read brings back
//! is returned but not kept — it may predate the change. (A request its
//! caller abandoned may still reach the devices after its drop: it was
//! never acknowledged, and a read may return the older bytes until the
//! block is dropped or pushed out.) Reads of more than [`INSERT_BYTES_MAX`]
//! are not kept (a sequential scan would only push out the hot blocks, as
//! bcache's sequential cutoff), and a block is copied out of a larger read
//! so that a kept 4 KiB never pins the whole read's buffer.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use bytes::{Bytes, BytesMut};
use lru::LruCache;

/// The unit kept: a block of the volume, aligned.
pub const BLOCK_BYTES: u64 = 4096;
/// Device reads up to this size are kept.
pub const INSERT_BYTES_MAX: u64 = 256 << 10;

#[derive(Debug)]
struct Reading {
    start: u64,
    end: u64,
    spoiled: bool,
}

/// What a read finds: the bytes, or a ticket to read the devices and
/// [`CleanBlocks::finish`] with.
pub enum Lookup {
    Hit(Bytes),
    Miss(u64),
}

/// Counters for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanStats {
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

pub struct CleanBlocks {
    blocks: LruCache<u64, Bytes>,
    capacity_bytes: u64,
    reading: HashMap<u64, Reading>,
    next_ticket: u64,
    hits: u64,
    misses: u64,
}

impl CleanBlocks {
    /// `None` when `capacity_bytes` holds no block (the cache is off).
    pub fn new(capacity_bytes: u64) -> Option<CleanBlocks> {
        let blocks = NonZeroUsize::new(usize::try_from(capacity_bytes / BLOCK_BYTES).ok()?)?;
        Some(CleanBlocks {
            blocks: LruCache::new(blocks),
            capacity_bytes: blocks.get() as u64 * BLOCK_BYTES,
            reading: HashMap::new(),
            next_ticket: 0,
            hits: 0,
            misses: 0,
        })
    }

    pub fn stats(&self) -> CleanStats {
        CleanStats {
            bytes: self.blocks.len() as u64 * BLOCK_BYTES,
            capacity_bytes: self.capacity_bytes,
            hits: self.hits,
            misses: self.misses,
        }
    }

    /// The bytes of `[offset, offset + len)` if every block under it is
    /// here; otherwise a ticket for a device read of that range.
    pub fn lookup_or_begin(&mut self, offset: u64, len: u64) -> Lookup {
        if let Some(bytes) = self.lookup(offset, len) {
            self.hits += 1;
            return Lookup::Hit(bytes);
        }
        self.misses += 1;
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.reading.insert(ticket, Reading { start: offset, end: offset + len, spoiled: false });
        Lookup::Miss(ticket)
    }

    fn lookup(&mut self, offset: u64, len: u64) -> Option<Bytes> {
        if len == 0 {
            return None;
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len - 1) / BLOCK_BYTES;
        if first == last {
            // One block (the common read): one lookup.
            let data = self.blocks.get(&first)?;
            let from = (offset - first * BLOCK_BYTES) as usize;
            return Some(if len == BLOCK_BYTES { data.clone() } else { data.slice(from..from + len as usize) });
        }
        if (first..=last).any(|b| !self.blocks.contains(&b)) {
            return None;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for block in first..=last {
            let data = self.blocks.get(&block)?;
            let block_start = block * BLOCK_BYTES;
            let from = offset.max(block_start) - block_start;
            let to = (offset + len).min(block_start + BLOCK_BYTES) - block_start;
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        Some(out.freeze())
    }

    /// The device read of `ticket` is over (`data`: what it returned, if it
    /// succeeded): its whole blocks are kept unless an invalidation spoiled
    /// it. Also called, with `None`, when the read is abandoned.
    pub fn finish(&mut self, ticket: u64, data: Option<&Bytes>) {
        let Some(reading) = self.reading.remove(&ticket) else { return };
        let Some(data) = data else { return };
        let len = reading.end - reading.start;
        if reading.spoiled || data.len() as u64 != len || len > INSERT_BYTES_MAX {
            return;
        }
        let first = reading.start.div_ceil(BLOCK_BYTES);
        let end = reading.end / BLOCK_BYTES;
        for block in first..end {
            let from = (block * BLOCK_BYTES - reading.start) as usize;
            let bytes = if data.len() as u64 == BLOCK_BYTES {
                data.clone()
            } else {
                Bytes::copy_from_slice(&data[from..from + BLOCK_BYTES as usize])
            };
            self.blocks.put(block, bytes);
        }
    }

    /// The devices' bytes of `[offset, offset + len)` change (or may have
    /// changed): drops the blocks there and spoils the reads in flight over
    /// it.
    pub fn invalidate(&mut self, offset: u64, len: u64) {
        if len == 0 || (self.blocks.is_empty() && self.reading.is_empty()) {
            return;
        }
        let end = offset.saturating_add(len);
        for reading in self.reading.values_mut() {
            if reading.start < end && offset < reading.end {
                reading.spoiled = true;
            }
        }
        let first = offset / BLOCK_BYTES;
        let last = (end - 1) / BLOCK_BYTES;
        if last - first >= self.blocks.len() as u64 {
            // A long range over few blocks: walk the blocks instead.
            let doomed: Vec<u64> = self.blocks.iter().map(|(&b, _)| b).filter(|b| (first..=last).contains(b)).collect();
            for block in doomed {
                self.blocks.pop(&block);
            }
        } else {
            for block in first..=last {
                self.blocks.pop(&block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: u8) -> Bytes {
        Bytes::from(vec![fill; BLOCK_BYTES as usize])
    }

    fn miss(cache: &mut CleanBlocks, offset: u64, len: u64) -> u64 {
        match cache.lookup_or_begin(offset, len) {
            Lookup::Miss(ticket) => ticket,
            Lookup::Hit(_) => panic!("expected a miss at {offset}+{len}"),
        }
    }

    fn hit(cache: &mut CleanBlocks, offset: u64, len: u64) -> Bytes {
        match cache.lookup_or_begin(offset, len) {
            Lookup::Hit(bytes) => bytes,
            Lookup::Miss(_) => panic!("expected a hit at {offset}+{len}"),
        }
    }

    #[test]
    fn off_below_one_block() {
        assert!(CleanBlocks::new(0).is_none());
        assert!(CleanBlocks::new(BLOCK_BYTES - 1).is_none());
        assert_eq!(CleanBlocks::new(10 * BLOCK_BYTES + 5).unwrap().stats().capacity_bytes, 10 * BLOCK_BYTES);
    }

    #[test]
    fn a_read_is_kept_and_served_whole_or_in_part() {
        let mut cache = CleanBlocks::new(16 * BLOCK_BYTES).unwrap();
        let t = miss(&mut cache, 0, 2 * BLOCK_BYTES);
        let mut data = vec![1u8; BLOCK_BYTES as usize];
        data.extend(vec![2u8; BLOCK_BYTES as usize]);
        cache.finish(t, Some(&Bytes::from(data)));
        assert_eq!(hit(&mut cache, 0, BLOCK_BYTES), block(1));
        let part = hit(&mut cache, BLOCK_BYTES - 10, 20);
        assert_eq!(&part[..10], &[1u8; 10]);
        assert_eq!(&part[10..], &[2u8; 10]);
        // A block never read is a miss, even next to kept ones.
        let t = miss(&mut cache, BLOCK_BYTES, 2 * BLOCK_BYTES);
        cache.finish(t, None);
        assert_eq!(
            cache.stats(),
            CleanStats { bytes: 2 * BLOCK_BYTES, capacity_bytes: 16 * BLOCK_BYTES, hits: 2, misses: 2 }
        );
    }

    #[test]
    fn only_whole_blocks_of_a_read_are_kept() {
        let mut cache = CleanBlocks::new(16 * BLOCK_BYTES).unwrap();
        let t = miss(&mut cache, 100, 2 * BLOCK_BYTES);
        cache.finish(t, Some(&Bytes::from(vec![7u8; 2 * BLOCK_BYTES as usize])));
        assert_eq!(cache.stats().bytes, BLOCK_BYTES, "only block 1 lies wholly inside");
        assert_eq!(hit(&mut cache, BLOCK_BYTES, BLOCK_BYTES), block(7));
        miss(&mut cache, 0, BLOCK_BYTES);
    }

    #[test]
    fn an_invalidation_drops_blocks_and_spoils_reads_in_flight() {
        let mut cache = CleanBlocks::new(16 * BLOCK_BYTES).unwrap();
        let t = miss(&mut cache, 0, 4 * BLOCK_BYTES);
        cache.finish(t, Some(&Bytes::from(vec![1u8; 4 * BLOCK_BYTES as usize])));
        // A read in flight over block 5, one over block 9.
        let spoiled = miss(&mut cache, 5 * BLOCK_BYTES, BLOCK_BYTES);
        let clean = miss(&mut cache, 9 * BLOCK_BYTES, BLOCK_BYTES);
        cache.invalidate(BLOCK_BYTES + 1, 4 * BLOCK_BYTES);
        cache.finish(spoiled, Some(&block(5)));
        cache.finish(clean, Some(&block(9)));
        hit(&mut cache, 0, BLOCK_BYTES);
        for b in 1..=5 {
            miss(&mut cache, b * BLOCK_BYTES, BLOCK_BYTES);
        }
        assert_eq!(hit(&mut cache, 9 * BLOCK_BYTES, BLOCK_BYTES), block(9));
    }

    #[test]
    fn a_long_invalidation_over_few_blocks() {
        let mut cache = CleanBlocks::new(16 * BLOCK_BYTES).unwrap();
        for b in [3u64, 1 << 30] {
            let t = miss(&mut cache, b * BLOCK_BYTES, BLOCK_BYTES);
            cache.finish(t, Some(&block(1)));
        }
        cache.invalidate(0, u64::MAX);
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn least_recently_used_goes_first_and_big_reads_are_not_kept() {
        let mut cache = CleanBlocks::new(2 * BLOCK_BYTES).unwrap();
        for b in 0..2 {
            let t = miss(&mut cache, b * BLOCK_BYTES, BLOCK_BYTES);
            cache.finish(t, Some(&block(b as u8)));
        }
        hit(&mut cache, 0, BLOCK_BYTES);
        let t = miss(&mut cache, 2 * BLOCK_BYTES, BLOCK_BYTES);
        cache.finish(t, Some(&block(2)));
        hit(&mut cache, 0, BLOCK_BYTES);
        miss(&mut cache, BLOCK_BYTES, BLOCK_BYTES);
        let big = INSERT_BYTES_MAX + BLOCK_BYTES;
        let t = miss(&mut cache, 8 * BLOCK_BYTES, big);
        cache.finish(t, Some(&Bytes::from(vec![0u8; big as usize])));
        hit(&mut cache, 0, BLOCK_BYTES);
        hit(&mut cache, 2 * BLOCK_BYTES, BLOCK_BYTES);
    }

    #[test]
    fn a_short_or_failed_read_is_not_kept() {
        let mut cache = CleanBlocks::new(16 * BLOCK_BYTES).unwrap();
        let t = miss(&mut cache, 0, 2 * BLOCK_BYTES);
        cache.finish(t, Some(&block(1)));
        let t = miss(&mut cache, 0, BLOCK_BYTES);
        cache.finish(t, None);
        miss(&mut cache, 0, BLOCK_BYTES);
        assert_eq!(cache.stats().bytes, 0);
    }
}
