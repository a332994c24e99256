//! Property tests of the cache log: random write and release sequences
//! (wrapping the ring many times), then a crash: a clean stop, a last batch
//! torn at every sector boundary and at random sector subsets, or one bit
//! flipped anywhere. The scan must return exactly the acknowledged live
//! records (torn batch: plus a prefix of the unacknowledged one), or a clear
//! corruption error; it must never return data that was not written.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use volume_format::cache_log::{
    read_record, scan, Batch, LogAppender, RecordHeader, ScanError, ScannedLog, DATA_START_BYTES, RECORD_HEADER_BYTES,
};
use volume_format::VolumeId;

const LOG_BYTES: u64 = DATA_START_BYTES + 40 * 512;
const SECTOR: usize = 512;

#[derive(Debug, Clone)]
enum Op {
    /// Writes of (block offset, length in bytes).
    Batch(Vec<(u16, u16)>),
    /// Release (destage) this many of the oldest live records.
    Release(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::collection::vec((0u16..64, 1u16..3000), 1..5).prop_map(Op::Batch),
        2 => (1u8..4).prop_map(Op::Release),
    ]
}

/// A record (data or wrap) as placed in the image: where its checked bytes
/// are and which batch it came with.
#[derive(Debug, Clone, Copy)]
struct Placed {
    seq: u64,
    pos: u64,
    checked_bytes: u64,
    batch: usize,
}

struct Sim {
    image: Vec<u8>,
    appender: LogAppender,
    /// Acknowledged, not yet released data records: (seq, pos).
    live: VecDeque<(u64, u64)>,
    history: HashMap<u64, (u64, Vec<u8>)>,
    placed: Vec<Placed>,
    tail_seq: u64,
    batches: usize,
    fill: u8,
}

fn data_for(seq: u64, len: usize, fill: u8) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i * 7 + fill as usize) as u8).collect()
}

impl Sim {
    fn new(fill: u8) -> Sim {
        let appender = LogAppender::create(0xfeed_0001, VolumeId(5), LOG_BYTES);
        let mut image = vec![0u8; LOG_BYTES as usize];
        for sb in appender.initial_superblocks() {
            let at = sb.slot_offset() as usize;
            image[at..at + SECTOR].copy_from_slice(&sb.encode());
        }
        Sim {
            image,
            appender,
            live: VecDeque::new(),
            history: HashMap::new(),
            placed: Vec::new(),
            tail_seq: 1,
            batches: 0,
            fill,
        }
    }

    /// Builds a batch (as much of `writes` as fits) without writing it.
    fn build(&mut self, writes: &[(u16, u16)]) -> Batch {
        let mut batch = self.appender.begin_batch_for(writes.iter().map(|&(_, len)| len as usize));
        for &(block, len) in writes {
            // What is written comes from the regions (see `commit`); the
            // content only has to differ between records.
            let data = data_for(self.appender.next_seq(), len as usize, self.fill);
            if !self.appender.push(&mut batch, block as u64 * 512, &data) {
                break;
            }
        }
        batch
    }

    fn apply_regions(image: &mut [u8], batch: &Batch, persisted: impl Fn(usize) -> bool) {
        let mut sector = 0;
        for region in &batch.regions {
            for (i, chunk) in region.bytes.chunks(SECTOR).enumerate() {
                if persisted(sector) {
                    let at = region.pos as usize + i * SECTOR;
                    image[at..at + chunk.len()].copy_from_slice(chunk);
                }
                sector += 1;
            }
        }
    }

    fn sectors(batch: &Batch) -> usize {
        batch.regions.iter().map(|r| r.bytes.len().div_ceil(SECTOR)).sum()
    }

    /// Acknowledges a batch: it is fully in the image.
    fn commit(&mut self, batch: &Batch) {
        Self::apply_regions(&mut self.image, batch, |_| true);
        for region in &batch.regions {
            let mut at = 0usize;
            while at < region.bytes.len() {
                let (header, _) = RecordHeader::decode(region.bytes[at..at + 64].try_into().unwrap()).unwrap();
                let data = &region.bytes[at + 64..at + 64 + header.length as usize];
                self.placed.push(Placed {
                    seq: header.seq,
                    pos: region.pos + at as u64,
                    checked_bytes: (RECORD_HEADER_BYTES + data.len()) as u64,
                    batch: self.batches,
                });
                if header.length > 0 || header.kind == volume_format::cache_log::RecordKind::Data {
                    self.history.insert(header.seq, (header.offset, data.to_vec()));
                }
                at += header.span_bytes() as usize;
            }
        }
        for record in &batch.records {
            self.live.push_back((record.seq, record.pos));
        }
        self.batches += 1;
    }

    fn release(&mut self, count: usize) {
        for _ in 0..count.min(self.live.len()) {
            self.live.pop_front();
        }
        let (tail_pos, tail_seq) = match self.live.front() {
            Some(&(seq, pos)) => (pos, seq),
            None => (self.appender.ring().head(), self.appender.next_seq()),
        };
        let sb = self.appender.release_superblock(tail_pos, tail_seq);
        let at = sb.slot_offset() as usize;
        self.image[at..at + SECTOR].copy_from_slice(&sb.encode());
        self.appender.released(tail_pos);
        self.tail_seq = tail_seq;
    }

    fn run(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Batch(writes) => {
                    let batch = self.build(writes);
                    if !batch.is_empty() {
                        self.commit(&batch);
                    }
                }
                Op::Release(count) => self.release(*count as usize),
            }
        }
    }

    /// Checks every returned record's data against what was written.
    fn check_data(&self, image: &[u8], log: &ScannedLog) -> Vec<u64> {
        let mut seqs = Vec::new();
        for record in &log.records {
            let data = read_record(image, "img", record).expect("scanned record reads back");
            let (offset, written) = self.history.get(&record.header.seq).expect("record was written");
            assert_eq!((record.header.offset, &data), (*offset, written), "seq {}", record.header.seq);
            seqs.push(record.header.seq);
        }
        seqs
    }

    fn live_seqs(&self) -> Vec<u64> {
        self.live.iter().map(|&(seq, _)| seq).collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn clean_stop_returns_exactly_the_live_records(ops in prop::collection::vec(op(), 0..40), fill: u8) {
        let mut sim = Sim::new(fill);
        sim.run(&ops);
        let log = scan(&sim.image[..], "img").expect("clean log scans");
        prop_assert_eq!(sim.check_data(&sim.image, &log), sim.live_seqs());
        // Appending after a scan continues the same chain.
        let mut resumed = Sim { appender: LogAppender::resume(&log), ..sim };
        resumed.run(&[Op::Batch(vec![(1, 100), (2, 2000)]), Op::Release(1), Op::Batch(vec![(3, 700)])]);
        let again = scan(&resumed.image[..], "img").expect("resumed log scans");
        prop_assert_eq!(resumed.check_data(&resumed.image, &again), resumed.live_seqs());
    }

    #[test]
    fn torn_last_batch_returns_the_acknowledged_prefix(
        ops in prop::collection::vec(op(), 0..40),
        last in prop::collection::vec((0u16..64, 1u16..3000), 1..5),
        masks in prop::collection::vec(prop::collection::vec(any::<bool>(), 64), 4),
        fill: u8,
    ) {
        let mut sim = Sim::new(fill);
        sim.run(&ops);
        let batch = sim.build(&last);
        let acknowledged = sim.live_seqs();
        let batch_seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
        let sectors = Sim::sectors(&batch);
        // Every prefix cut at a sector boundary, then random sector subsets
        // (a crash may persist any sectors of an unsynced write).
        let cuts = (0..=sectors).map(|cut| Box::new(move |s: usize| s < cut) as Box<dyn Fn(usize) -> bool>);
        let subsets = masks.into_iter().map(|mask| Box::new(move |s: usize| mask[s % 64]) as Box<dyn Fn(usize) -> bool>);
        for persisted in cuts.chain(subsets) {
            let mut image = sim.image.clone();
            Sim::apply_regions(&mut image, &batch, &persisted);
            let all = (0..sectors).all(&persisted);
            // Record data for the unacknowledged batch, for check_data.
            let mut with_batch = Sim { image: vec![0u8; LOG_BYTES as usize], appender: LogAppender::create(0, VolumeId(0), LOG_BYTES),
                live: VecDeque::new(), history: sim.history.clone(), placed: Vec::new(), tail_seq: 0, batches: 0, fill };
            with_batch.commit(&batch);
            let log = scan(&image[..], "img").expect("a torn last batch is not corruption");
            let seqs = with_batch.check_data(&image, &log);
            prop_assert!(seqs.len() >= acknowledged.len(), "lost acknowledged records: {:?} vs {:?}", seqs, acknowledged);
            prop_assert_eq!(&seqs[..acknowledged.len()], &acknowledged[..]);
            prop_assert_eq!(&seqs[acknowledged.len()..], &batch_seqs[..seqs.len() - acknowledged.len()]);
            if all {
                prop_assert_eq!(seqs.len(), acknowledged.len() + batch_seqs.len());
            }
        }
    }

    #[test]
    fn a_flipped_bit_is_reported_or_only_drops_the_newest_batch(
        ops in prop::collection::vec(op(), 1..40),
        at in 0..LOG_BYTES,
        bit in 0u8..8,
        fill: u8,
    ) {
        let mut sim = Sim::new(fill);
        sim.run(&ops);
        let mut image = sim.image.clone();
        image[at as usize] ^= 1 << bit;
        let hit = sim.placed.iter().find(|p| p.seq >= sim.tail_seq && at >= p.pos && at < p.pos + p.checked_bytes).copied();
        let in_superblock = at < 1024;
        let newest_batch = sim.batches.saturating_sub(1);
        match scan(&image[..], "img") {
            Ok(log) => {
                let seqs = sim.check_data(&image, &log);
                match hit {
                    None if !in_superblock => prop_assert_eq!(seqs, sim.live_seqs()),
                    Some(placed) => {
                        prop_assert_eq!(placed.batch, newest_batch, "damage in an older batch went unreported");
                        prop_assert!(seqs.iter().all(|&s| s < placed.seq));
                        prop_assert_eq!(&seqs[..], &sim.live_seqs()[..seqs.len()]);
                    }
                    // An older superblock copy: consecutive, true records
                    // (checked above) ending with every live record.
                    None => prop_assert!(seqs.ends_with(&sim.live_seqs()) || seqs.windows(2).all(|w| w[1] == w[0] + 1)),
                }
            }
            Err(ScanError::Corrupt { pos, seq, .. }) => {
                prop_assert!(hit.is_some() || in_superblock, "corruption reported at {pos} seq {seq} for a flip at {at} outside live records");
                let message = scan(&image[..], "img").unwrap_err().to_string();
                prop_assert!(message.contains("img") && message.contains(&format!("offset {pos}")), "{}", message);
            }
            Err(ScanError::Superblock { .. }) => prop_assert!(in_superblock),
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

/// A batch begun with its writes' lengths holds them in one allocation of
/// its size (no copy as records are pushed), and the same bytes as a batch
/// begun without them.
#[test]
fn a_batch_begun_with_its_lengths_is_allocated_once() {
    let lengths = [4096usize, 512, 65536, 4096];
    let log_bytes = DATA_START_BYTES + (1 << 20);
    let mut a = LogAppender::create(1, VolumeId(1), log_bytes);
    let mut b = LogAppender::create(1, VolumeId(1), log_bytes);
    let mut sized = a.begin_batch_for(lengths.iter().copied());
    let mut plain = b.begin_batch();
    for (i, &n) in lengths.iter().enumerate() {
        let data = vec![i as u8 + 1; n];
        assert!(a.push(&mut sized, (i as u64) << 20, &data));
        assert!(b.push(&mut plain, (i as u64) << 20, &data));
    }
    assert_eq!(sized.regions.len(), 1);
    let region = &sized.regions[0].bytes;
    assert_eq!(region.capacity(), region.len(), "allocated once, at its size");
    assert_eq!(sized.regions, plain.regions);
    assert_eq!(sized.records, plain.records);
}
