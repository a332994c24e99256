//! What each volume block may hold: the data model the invariants compare
//! devices against.
//!
//! Every workload write carries a unique tag. Per volume block the oracle
//! keeps the writes in the order they were sent to the devices, each marked
//! acknowledged, failed, lost (a device dropped it from its cache) and
//! durable (acknowledged, then covered by a completed flush issued after the
//! acknowledgement, and not lost). The newest durable write is the block's
//! **floor**: a read may return it or any write sent after it — never an
//! older one, never another block's data. Before anything is durable a
//! block may hold any of the writes sent to it or zeros; a block nothing was
//! ever sent to holds zeros (new space is zeroed before it is handed out).
//!
//! Snapshots: when a snapshot's commit is observed, each block's allowed
//! values at that instant are frozen as the snapshot's expectation; a read
//! of the snapshot must return one of them forever after.

use std::collections::BTreeMap;

use crate::device::Content;

#[derive(Debug, Clone)]
struct Entry {
    tag: u64,
    /// When it was acknowledged, in the oracle's order.
    acked_at: Option<u64>,
    lost: bool,
    durable: bool,
    /// Sent by (for messages).
    by: String,
}

#[derive(Debug, Clone, Default)]
struct BlockHist {
    entries: Vec<Entry>,
    /// 1 + index of the newest durable entry; 0: none.
    floor: usize,
}

impl BlockHist {
    fn allowed(&self) -> Option<Vec<u64>> {
        (self.floor > 0).then(|| self.entries[self.floor - 1..].iter().map(|e| e.tag).collect())
    }
}

/// Allowed values of one block: `None` = anything.
pub type Allowed = Option<Vec<u64>>;

#[derive(Default)]
pub struct Oracle {
    volumes: BTreeMap<u64, BTreeMap<u64, BlockHist>>,
    /// tag → (volume, block, index).
    tags: BTreeMap<u64, (u64, u64, usize)>,
    next_tag: u64,
    /// Orders acknowledgements and flushes exactly (many happen in one
    /// simulated millisecond).
    seq: u64,
}

impl Oracle {
    pub fn add_volume(&mut self, volume: u64) {
        self.volumes.entry(volume).or_default();
    }

    pub fn remove_volume(&mut self, volume: u64) {
        self.volumes.remove(&volume);
    }

    pub fn has_volume(&self, volume: u64) -> bool {
        self.volumes.contains_key(&volume)
    }

    pub fn new_tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Write `tag` to `block` of `volume` was sent to the devices now.
    pub fn sent(&mut self, volume: u64, block: u64, tag: u64, by: String) {
        let Some(v) = self.volumes.get_mut(&volume) else { return };
        let h = v.entry(block).or_default();
        h.entries.push(Entry { tag, acked_at: None, lost: false, durable: false, by });
        self.tags.insert(tag, (volume, block, h.entries.len() - 1));
    }

    /// Write `tag` was acknowledged (every leg answered).
    pub fn acked(&mut self, tag: u64) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.entry_mut(tag) {
            e.acked_at = Some(seq);
        }
    }

    /// Write `tag`, acknowledged, is durable by itself: a mirrored
    /// write-back cache acknowledged it once its log and the server's mirror
    /// held it (issue 15), so no FLUSH is needed to make it the floor — and
    /// it must stay readable through the holder's death (the server's
    /// replay puts it on the devices before anyone opens the volume again).
    pub fn durable(&mut self, tag: u64) {
        let Some(&(v, b, i)) = self.tags.get(&tag) else { return };
        let Some(h) = self.volumes.get_mut(&v).and_then(|x| x.get_mut(&b)) else { return };
        let e = &mut h.entries[i];
        if e.acked_at.is_some() && !e.lost {
            e.durable = true;
            h.floor = h.floor.max(i + 1);
        }
    }

    /// A flush is sent now: what it covers is what was acknowledged before.
    pub fn flush_sent(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// A device dropped `tag` from its cache — and with it every earlier
    /// write of the block it had cached (`tag` overwrote them there): none
    /// of them can become durable any more (a later flush does not bring
    /// them back).
    pub fn lost(&mut self, tag: u64, _device: usize) {
        let Some(&(v, b, i)) = self.tags.get(&tag) else { return };
        let Some(h) = self.volumes.get_mut(&v).and_then(|x| x.get_mut(&b)) else { return };
        for e in h.entries[..=i].iter_mut().rev() {
            if e.durable {
                break;
            }
            e.lost = true;
        }
    }

    /// A flush of every device of `volume`, sent at `issued` (from
    /// [`Oracle::flush_sent`]), completed: writes acknowledged before it are
    /// durable.
    pub fn flushed(&mut self, volume: u64, issued: u64) {
        let Some(v) = self.volumes.get_mut(&volume) else { return };
        for h in v.values_mut() {
            for (i, e) in h.entries.iter_mut().enumerate() {
                if !e.durable && !e.lost && e.acked_at.is_some_and(|a| a < issued) {
                    e.durable = true;
                    h.floor = h.floor.max(i + 1);
                }
            }
        }
    }

    fn entry_mut(&mut self, tag: u64) -> Option<&mut Entry> {
        let (v, b, i) = *self.tags.get(&tag)?;
        self.volumes.get_mut(&v)?.get_mut(&b)?.entries.get_mut(i)
    }

    pub fn allowed(&self, volume: u64, block: u64) -> Allowed {
        self.volumes.get(&volume)?.get(&block)?.allowed()
    }

    /// Blocks of `volume` with a durable write (the only ones checked).
    pub fn checked_blocks(&self, volume: u64) -> Vec<(u64, Vec<u64>)> {
        self.volumes
            .get(&volume)
            .map(|v| v.iter().filter_map(|(b, h)| h.allowed().map(|a| (*b, a))).collect())
            .unwrap_or_default()
    }

    /// Blocks of `volume` something was sent to.
    pub fn written_blocks(&self, volume: u64) -> Vec<u64> {
        self.volumes
            .get(&volume)
            .map(|v| v.iter().filter(|(_, h)| !h.entries.is_empty()).map(|(b, _)| *b).collect())
            .unwrap_or_default()
    }

    /// Whether a device may have dropped a write of `block` from its cache
    /// (a power loss, [`Oracle::lost`]) with no write acknowledged since:
    /// then the legs of a mirror may differ there without any write in
    /// flight (one lost what the other kept), until the next write.
    pub fn lost_since_last_ack(&self, volume: u64, block: u64) -> bool {
        let Some(h) = self.volumes.get(&volume).and_then(|v| v.get(&block)) else { return false };
        match h.entries.iter().rposition(|e| e.lost) {
            None => false,
            Some(i) => !h.entries[i + 1..].iter().any(|e| e.acked_at.is_some()),
        }
    }

    /// Whether the oracle follows `volume` and nothing was ever sent to its
    /// `block`: then it must read as zeros (new space reads as zeros).
    pub fn never_written(&self, volume: u64, block: u64) -> bool {
        self.volumes.get(&volume).is_some_and(|v| v.get(&block).is_none_or(|h| h.entries.is_empty()))
    }

    /// Whether `got` may be what `block` of `volume` holds now.
    pub fn check_read(&self, volume: u64, block: u64, got: &Content) -> Result<(), String> {
        let Some(allowed) = self.allowed(volume, block) else { return Ok(()) };
        check_value(&allowed, got).map_err(|e| format!("{e}; {}", self.history(volume, block)))
    }

    /// Where `tag` was written (for messages).
    pub fn describe_tag(&self, tag: u64) -> String {
        match self.tags.get(&tag) {
            Some((v, b, i)) => {
                let by = self
                    .volumes
                    .get(v)
                    .and_then(|x| x.get(b))
                    .and_then(|h| h.entries.get(*i))
                    .map_or("?".to_string(), |e| e.by.clone());
                format!("w{tag} (volume {v} block {b}, by {by})")
            }
            None => format!("w{tag} (unknown)"),
        }
    }

    /// The block's writes, for a violation message.
    pub fn history(&self, volume: u64, block: u64) -> String {
        let Some(h) = self.volumes.get(&volume).and_then(|v| v.get(&block)) else { return "no writes".into() };
        let items: Vec<String> = h
            .entries
            .iter()
            .enumerate()
            .rev()
            .take(6)
            .map(|(i, e)| {
                let mut s = format!("w{} by {}", e.tag, e.by);
                if e.acked_at.is_some() {
                    s += " acked";
                }
                if e.durable {
                    s += " durable";
                }
                if e.lost {
                    s += " lost";
                }
                if i + 1 == h.floor {
                    s += " (floor)";
                }
                s
            })
            .collect();
        format!("newest writes of the block: [{}]", items.join(", "))
    }
}

/// Whether `got` is one of `allowed`.
pub fn check_value(allowed: &[u64], got: &Content) -> Result<(), String> {
    match got.tag() {
        Some(t) if allowed.contains(&t) => Ok(()),
        _ => Err(format!(
            "read {got}, but only {} may be there",
            allowed.iter().map(|t| format!("w{t}")).collect::<Vec<_>>().join(" or ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_moves_with_flushes_and_never_back() {
        let mut o = Oracle::default();
        o.add_volume(1);
        o.sent(1, 7, 10, "a".into());
        assert!(o.check_read(1, 7, &Content::Zero).is_ok(), "nothing durable: anything goes");
        let early = o.flush_sent();
        o.acked(10);
        o.flushed(1, early);
        assert!(o.allowed(1, 7).is_none(), "acked after the flush was sent: not covered");
        let f = o.flush_sent();
        o.flushed(1, f);
        assert_eq!(o.allowed(1, 7), Some(vec![10]));
        o.sent(1, 7, 11, "a".into());
        o.acked(11);
        assert!(o.check_read(1, 7, &Content::Tag(10)).is_ok(), "unflushed: the older may come back");
        o.lost(11, 0);
        let f = o.flush_sent();
        o.flushed(1, f);
        assert_eq!(o.allowed(1, 7), Some(vec![10, 11]), "a lost write never becomes durable");
        // Two cached writes, the later dropped: both are gone.
        o.sent(1, 8, 20, "a".into());
        o.acked(20);
        o.sent(1, 8, 21, "a".into());
        o.acked(21);
        o.lost(21, 0);
        let f = o.flush_sent();
        o.flushed(1, f);
        assert_eq!(o.allowed(1, 8), None, "the earlier cached write went with the later one");
        o.sent(1, 7, 12, "a".into());
        o.acked(12);
        let f = o.flush_sent();
        o.flushed(1, f);
        assert!(o.check_read(1, 7, &Content::Tag(10)).is_err(), "older than the floor");
        assert!(o.check_read(1, 7, &Content::Tag(12)).is_ok());
    }
}
