//! Space accounting of the record ring: where the next record goes, whether
//! it fits, and how much is in use. A plain type (no I/O) so the writer's
//! rules are tested alone and the property tests drive the same code as the
//! agent.
//!
//! The ring spans `[DATA_START_BYTES, log_bytes)`. `head` is where the next
//! record goes, `tail` the oldest live record. `head == tail` means empty: a
//! reservation must leave at least one alignment unit free, so a full ring
//! never looks empty. A record that does not fit before the end is preceded
//! by a wrap record at `head` (the rest of the ring is skipped).

use super::superblock::DATA_START_BYTES;
use super::RECORD_ALIGN_BYTES;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRing {
    end: u64,
    head: u64,
    tail: u64,
}

/// Where a reserved record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// A wrap record must be written here first (the record did not fit
    /// before the end of the ring).
    pub wrap_at: Option<u64>,
    /// File offset of the record.
    pub pos: u64,
}

impl LogRing {
    /// An empty ring in a log file of `log_bytes` whose head and tail are at
    /// `pos` (a fresh log: [`DATA_START_BYTES`]; after a scan: its end).
    pub fn new(log_bytes: u64, tail: u64, head: u64) -> LogRing {
        let end =
            DATA_START_BYTES + (log_bytes.saturating_sub(DATA_START_BYTES) / RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES;
        LogRing { end, head, tail }
    }

    /// Bytes of records the ring can hold at most.
    pub fn capacity_bytes(&self) -> u64 {
        self.end - DATA_START_BYTES
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Bytes between tail and head (records and skipped ends).
    pub fn used_bytes(&self) -> u64 {
        if self.head >= self.tail {
            self.head - self.tail
        } else {
            (self.end - self.tail) + (self.head - DATA_START_BYTES)
        }
    }

    /// Whether a record of `span_bytes` could ever fit (in an empty ring).
    pub fn can_ever_fit(&self, span_bytes: u64) -> bool {
        span_bytes < self.capacity_bytes()
    }

    /// Reserves `span_bytes` (aligned) at the head, or `None` when the ring
    /// is too full right now (the caller waits for a release).
    pub fn reserve(&mut self, span_bytes: u64) -> Option<Placement> {
        debug_assert_eq!(span_bytes % RECORD_ALIGN_BYTES, 0);
        let free = self.capacity_bytes() - self.used_bytes();
        if self.head + span_bytes <= self.end {
            if span_bytes >= free {
                return None;
            }
            let pos = self.head;
            self.head = if pos + span_bytes == self.end { DATA_START_BYTES } else { pos + span_bytes };
            return Some(Placement { wrap_at: None, pos });
        }
        let skipped = self.end - self.head;
        if skipped + span_bytes >= free {
            return None;
        }
        let wrap_at = self.head;
        self.head = DATA_START_BYTES + span_bytes;
        Some(Placement { wrap_at: Some(wrap_at), pos: DATA_START_BYTES })
    }

    /// Moves the tail to `new_tail` (the oldest record still live, or the
    /// head when none is). Only call after the superblock saying so is
    /// durable.
    pub fn release_to(&mut self, new_tail: u64) {
        self.tail = new_tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_wraps_and_never_overtakes_the_tail() {
        let mut ring = LogRing::new(DATA_START_BYTES + 4 * 512, DATA_START_BYTES, DATA_START_BYTES);
        assert_eq!(ring.reserve(1024), Some(Placement { wrap_at: None, pos: 4096 }));
        assert_eq!(ring.reserve(512), Some(Placement { wrap_at: None, pos: 4096 + 1024 }));
        // One unit left free: full.
        assert_eq!(ring.reserve(512), None);
        ring.release_to(4096 + 1024);
        // 1024 bytes at the end are free but only 512 fit before the tail...
        assert_eq!(ring.reserve(1024), None);
        assert_eq!(ring.reserve(512), Some(Placement { wrap_at: None, pos: 4096 + 1536 }));
        assert_eq!(ring.head(), DATA_START_BYTES);
        ring.release_to(4096 + 1536);
        assert_eq!(ring.reserve(1024), Some(Placement { wrap_at: None, pos: 4096 }));
        assert_eq!(ring.used_bytes(), 1536);
    }

    #[test]
    fn a_record_that_does_not_fit_before_the_end_wraps() {
        let mut ring = LogRing::new(DATA_START_BYTES + 4 * 512, DATA_START_BYTES + 1024, DATA_START_BYTES + 1536);
        assert_eq!(ring.reserve(1024), None); // skip 512 + 1024 leaves nothing free
        ring.release_to(DATA_START_BYTES + 1536);
        assert_eq!(ring.reserve(1024), Some(Placement { wrap_at: Some(4096 + 1536), pos: 4096 }));
    }
}
