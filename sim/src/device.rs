//! In-memory block devices, standing for NBD exports.
//!
//! Each 4 KiB block holds [`Content`]: zeros, a workload **tag** (a data
//! block is represented by the unique number of the write that produced it,
//! so a read says exactly which write it sees), or raw bytes (metadata
//! slots, written with the real slot encoder and read back with the real
//! decoder).
//!
//! Writes become visible when they complete; without FUA they sit in the
//! device's volatile cache until a flush. A power loss ([`Device::crash`])
//! keeps or drops each cached block at random and applies a random prefix
//! of every write in flight (a torn write); every request in flight fails,
//! and requests fail while the device is down.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;
use volume_format::DeviceLayout;

use crate::rng::Rng;

pub const BLOCK_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Zero,
    /// A workload write's tag.
    Tag(u64),
    /// Exactly [`BLOCK_BYTES`] bytes.
    Raw(Arc<[u8]>),
}

impl Content {
    pub fn tag(&self) -> Option<u64> {
        match self {
            Content::Tag(t) => Some(*t),
            _ => None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Content::Zero => vec![0; BLOCK_BYTES as usize],
            Content::Raw(b) => b.to_vec(),
            Content::Tag(t) => {
                let mut v = vec![0; BLOCK_BYTES as usize];
                v[..8].copy_from_slice(b"SIMTAG\0\0");
                v[8..16].copy_from_slice(&t.to_le_bytes());
                v
            }
        }
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Zero => f.write_str("zeros"),
            Content::Tag(t) => write!(f, "w{t}"),
            Content::Raw(_) => f.write_str("raw bytes"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum DevOp {
    Read { block: u64, count: u64 },
    Write { block: u64, data: Vec<Content>, fua: bool },
    Flush,
}

impl DevOp {
    pub fn write_bytes(offset: u64, bytes: &[u8], fua: bool) -> DevOp {
        assert!(offset % BLOCK_BYTES == 0 && bytes.len() as u64 % BLOCK_BYTES == 0, "whole blocks only");
        let data = bytes.chunks(BLOCK_BYTES as usize).map(|c| Content::Raw(Arc::from(c))).collect();
        DevOp::Write { block: offset / BLOCK_BYTES, data, fua }
    }
}

#[derive(Debug, Clone)]
pub enum DevResult {
    Read(Vec<Content>),
    Done,
    Failed(String),
}

pub struct Device {
    pub index: usize,
    pub uuid: Uuid,
    pub layout: DeviceLayout,
    pub up: bool,
    /// Power-loss count (for traces).
    pub crashes: u64,
    durable: BTreeMap<u64, Content>,
    volatile: BTreeMap<u64, Content>,
    in_flight: BTreeMap<u64, DevOp>,
    next_op: u64,
}

/// What a power loss did.
pub struct Crash {
    /// Requests in flight (all fail).
    pub failed: Vec<u64>,
    /// Tags of cached writes that were dropped.
    pub lost_tags: Vec<u64>,
}

impl Device {
    pub fn new(index: usize, uuid: Uuid, layout: DeviceLayout) -> Device {
        Device {
            index,
            uuid,
            layout,
            up: true,
            crashes: 0,
            durable: BTreeMap::new(),
            volatile: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_op: 1,
        }
    }

    /// Accepts a request; it completes at [`Device::complete`].
    pub fn submit(&mut self, op: DevOp) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.in_flight.insert(id, op);
        id
    }

    /// Executes request `id` now (a write lands now). `None` if it was
    /// failed by a crash meanwhile.
    pub fn complete(&mut self, id: u64) -> Option<DevResult> {
        let op = self.in_flight.remove(&id)?;
        Some(match op {
            DevOp::Read { block, count } => DevResult::Read((block..block + count).map(|b| self.peek(b)).collect()),
            DevOp::Write { block, data, fua } => {
                for (i, c) in data.into_iter().enumerate() {
                    let b = block + i as u64;
                    if fua {
                        self.volatile.remove(&b);
                        self.durable.insert(b, c);
                    } else {
                        self.volatile.insert(b, c);
                    }
                }
                DevResult::Done
            }
            DevOp::Flush => {
                let cached = std::mem::take(&mut self.volatile);
                self.durable.extend(cached);
                DevResult::Done
            }
        })
    }

    /// A flush that completes at once: the flush a server sends every
    /// device before it reads the metadata (`Pool::open_journaled`), in
    /// the simulator's one-step load.
    pub fn flush_now(&mut self) {
        let cached = std::mem::take(&mut self.volatile);
        self.durable.extend(cached);
    }

    /// What a read of `block` returns now.
    pub fn peek(&self, block: u64) -> Content {
        self.volatile.get(&block).or_else(|| self.durable.get(&block)).cloned().unwrap_or(Content::Zero)
    }

    /// The bytes at `offset` (whole blocks), as a read would return them.
    pub fn read_bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let first = offset / BLOCK_BYTES;
        for b in first..(offset + len).div_ceil(BLOCK_BYTES) {
            out.extend_from_slice(&self.peek(b).bytes());
        }
        let skip = (offset - first * BLOCK_BYTES) as usize;
        out.drain(..skip);
        out.truncate(len as usize);
        out
    }

    /// Writes bytes durably at once (pool creation).
    pub fn format(&mut self, offset: u64, bytes: &[u8]) {
        if let DevOp::Write { block, data, .. } = DevOp::write_bytes(offset, bytes, true) {
            for (i, c) in data.into_iter().enumerate() {
                self.durable.insert(block + i as u64, c);
            }
        }
    }

    /// Power loss: see the module docs. The device is down until
    /// [`Device::restart`].
    pub fn crash(&mut self, rng: &mut Rng) -> Crash {
        self.up = false;
        self.crashes += 1;
        let mut lost_tags = Vec::new();
        for (b, c) in std::mem::take(&mut self.volatile) {
            if rng.chance(0.5) {
                self.durable.insert(b, c);
            } else if let Content::Tag(t) = c {
                lost_tags.push(t);
            }
        }
        let mut failed = Vec::new();
        for (id, op) in std::mem::take(&mut self.in_flight) {
            if let DevOp::Write { block, data, .. } = op {
                // A torn write: some prefix of its blocks reached the media.
                let n = rng.below(data.len() as u64 + 1) as usize;
                for (i, c) in data.into_iter().take(n).enumerate() {
                    self.durable.insert(block + i as u64, c);
                }
            }
            failed.push(id);
        }
        Crash { failed, lost_tags }
    }

    pub fn restart(&mut self) {
        self.up = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        let layout = DeviceLayout::plan_with_slots(8 << 20, 128 << 10, 64 << 10, 2).unwrap();
        Device::new(0, Uuid::from_u128(1), layout)
    }

    #[test]
    fn unflushed_writes_may_be_lost_flushed_ones_never() {
        let mut lost_some = false;
        for seed in 0..20 {
            let mut d = device();
            let mut rng = Rng::new(seed);
            let w = d.submit(DevOp::Write { block: 10, data: vec![Content::Tag(1)], fua: false });
            d.complete(w);
            let f = d.submit(DevOp::Flush);
            d.complete(f);
            let w = d.submit(DevOp::Write { block: 10, data: vec![Content::Tag(2)], fua: false });
            d.complete(w);
            assert_eq!(d.peek(10), Content::Tag(2), "visible before the flush");
            let crash = d.crash(&mut rng);
            match d.peek(10) {
                Content::Tag(1) => {
                    lost_some = true;
                    assert_eq!(crash.lost_tags, vec![2]);
                }
                Content::Tag(2) => assert!(crash.lost_tags.is_empty()),
                other => panic!("{other}"),
            }
        }
        assert!(lost_some);
    }

    #[test]
    fn a_crash_tears_writes_in_flight_and_fails_them() {
        let mut d = device();
        let w = d.submit(DevOp::write_bytes(0, &[7u8; 4 * 4096], false));
        let crash = d.crash(&mut Rng::new(3));
        assert_eq!(crash.failed, vec![w]);
        assert!(d.complete(w).is_none());
        let written = (0..4).take_while(|b| d.peek(*b) != Content::Zero).count();
        assert!((0..4).skip(written).all(|b| d.peek(b) == Content::Zero), "a prefix, not holes");
    }
}
