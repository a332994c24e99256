//! Model test of the journal: random histories of changes, group commits,
//! failed writes and crashes at every write boundary, over in-memory
//! metadata copies that lose or tear whatever was not flushed.
//!
//! The property, after every crash and reload: the loaded metadata is the
//! last acknowledged state, or one of the states whose commit had been
//! written but not acknowledged (the commit in flight when the crash came,
//! or one that failed on some copy and was not yet superseded). Never a
//! state that loses an acknowledged change, never a part of a batch.
//!
//! The copies are driven exactly as the server drives its devices (see
//! `metadata-server/src/pool/journal.rs`): write a sealed commit to every
//! copy, flush every copy, report; on failure revert the batch and supersede
//! it at once; write a covering checkpoint after its commit is durable.

use std::collections::VecDeque;

use ed25519_dalek::SigningKey;
use proptest::prelude::*;

use super::*;
use crate::label::BLOCK_BYTES;
use crate::metadata::testing::{plan_step, pool, POOL};
use crate::metadata::{MetaChange, MetadataArea, PoolMetadata, Undo, METADATA_FORMAT_VERSION};
use crate::PublicKey;

const SECTOR_BYTES: usize = 512;

/// A tiny deterministic generator for tears (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One metadata copy: what is durable, and what was written since the last
/// flush (lost, kept or torn at a crash).
struct ModelCopy {
    area: MetadataArea,
    durable: Vec<u8>,
    pending: Vec<(usize, Vec<u8>)>,
}

impl ModelCopy {
    fn new(area: MetadataArea) -> ModelCopy {
        let bytes = (u64::from(area.slot_count) * area.slot_bytes) as usize;
        ModelCopy { area, durable: vec![0; bytes], pending: Vec::new() }
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        self.pending.push(((offset - self.area.offset) as usize, bytes.to_vec()));
    }

    fn flush(&mut self) {
        for (at, bytes) in self.pending.drain(..) {
            self.durable[at..at + bytes.len()].copy_from_slice(&bytes);
        }
    }

    /// A crash: each unflushed write is lost, kept, or torn (any subset of
    /// its sectors).
    fn crash(&mut self, rng: &mut Rng) {
        for (at, bytes) in std::mem::take(&mut self.pending) {
            match rng.next() % 4 {
                0 => {}
                1 => self.durable[at..at + bytes.len()].copy_from_slice(&bytes),
                _ => {
                    for (i, sector) in bytes.chunks(SECTOR_BYTES).enumerate() {
                        if rng.next() % 2 == 0 {
                            let s = at + i * SECTOR_BYTES;
                            self.durable[s..s + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
            }
        }
    }

    fn image(&self, i: usize) -> CopyImage<'_> {
        let slot = |s: u32| {
            let start = (self.area.slot_offset(s) - self.area.offset) as usize;
            Ok(&self.durable[start..start + self.area.slot_bytes as usize])
        };
        let ring = self.area.ring();
        let ring = &self.durable[(ring.start - self.area.offset) as usize..(ring.end - self.area.offset) as usize];
        CopyImage { device: format!("copy{i}"), area: self.area, checkpoint_slots: [slot(0), slot(1)], ring: Ok(ring) }
    }
}

#[derive(Debug)]
struct Crashed;

#[derive(Debug, Clone)]
enum Step {
    /// Plan a change (see `plan_step`) and apply it to the live state.
    Change(u8, u64, u64),
    /// Commit every change planned since the last commit as one batch.
    Commit,
    /// The next write to this copy fails (`true`: but its bytes reach the
    /// device's cache anyway).
    Fail(usize, bool),
}

struct Model {
    pool: uuid::Uuid,
    copies: Vec<ModelCopy>,
    writer: JournalWriter,
    key: SigningKey,
    meta: PoolMetadata,
    acked: PoolMetadata,
    /// States written but not acknowledged that a reload may show.
    possible: Vec<PoolMetadata>,
    batch: Vec<(MetaChange, Undo)>,
    ops: usize,
    crash_at: VecDeque<usize>,
    fail_next: Vec<Option<bool>>,
    rng: Rng,
    reloads: usize,
    checkpoints: usize,
    /// Write covering checkpoints "in the background": after the next
    /// commit, so entries follow their anchor before they are durable.
    background_mode: bool,
    background: Option<SealedCheckpoint>,
}

/// Small areas so histories wrap the ring and checkpoint often; copy 2 has
/// bigger slots (and ring) than the others, as devices of different sizes do.
fn areas() -> Vec<MetadataArea> {
    vec![
        MetadataArea { offset: 4096, slot_bytes: 32 << 10, slot_count: 4 },
        MetadataArea { offset: 4096, slot_bytes: 32 << 10, slot_count: 4 },
        MetadataArea { offset: 4096, slot_bytes: 40 << 10, slot_count: 4 },
    ]
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[0x42; 32])
}

fn new_pool_meta(key: &SigningKey) -> PoolMetadata {
    let mut meta = pool(&[8, 8, 8]);
    meta.server_public_key = PublicKey(key.verifying_key().to_bytes());
    meta
}

impl Model {
    fn new(crash_at: Vec<usize>, seed: u64) -> Model {
        let key = key();
        let meta = new_pool_meta(&key);
        let areas = areas();
        let mut m = Model {
            pool: POOL,
            copies: areas.iter().map(|&a| ModelCopy::new(a)).collect(),
            writer: JournalWriter::for_new_pool(POOL, &areas, 1),
            key,
            acked: meta.clone(),
            meta,
            possible: Vec::new(),
            batch: Vec::new(),
            ops: 0,
            crash_at: crash_at.into(),
            fail_next: vec![None; 3],
            rng: Rng(seed | 1),
            reloads: 0,
            checkpoints: 0,
            background_mode: seed % 2 == 0,
            background: None,
        };
        // `pool init`: the first commit is a checkpoint. No crash here.
        let crashes = std::mem::take(&mut m.crash_at);
        m.commit().expect("no crash planned");
        m.crash_at = crashes;
        m.ops = 0;
        m
    }

    /// A device operation: where a crash can come.
    fn op(&mut self) -> Result<(), Crashed> {
        if self.crash_at.front() == Some(&self.ops) {
            self.crash_at.pop_front();
            return Err(Crashed);
        }
        self.ops += 1;
        Ok(())
    }

    /// Writes `bytes` at every target, then flushes every copy that took
    /// it; returns which copies did.
    fn write_all(&mut self, targets: &[Target], bytes: &[u8]) -> Result<Vec<bool>, Crashed> {
        let mut written = vec![false; self.copies.len()];
        for t in targets {
            self.op()?;
            match self.fail_next[t.copy].take() {
                Some(persisted) => {
                    if persisted {
                        self.copies[t.copy].write(t.offset, bytes);
                    }
                }
                None => {
                    self.copies[t.copy].write(t.offset, bytes);
                    written[t.copy] = true;
                }
            }
        }
        for (i, ok) in written.iter().enumerate() {
            if *ok {
                self.op()?;
                self.copies[i].flush();
            }
        }
        Ok(written)
    }

    fn write_checkpoint(&mut self, cp: &SealedCheckpoint) -> Result<Vec<bool>, Crashed> {
        self.checkpoints += 1;
        let mut written = self.write_all(&cp.targets, &cp.bytes)?;
        let clears: Vec<Target> = cp.clear_after.iter().filter(|t| written[t.copy]).copied().collect();
        if !clears.is_empty() {
            let cleared = self.write_all(&clears, &[0u8; BLOCK_BYTES as usize])?;
            for t in &clears {
                written[t.copy] &= cleared[t.copy];
            }
        }
        Ok(written)
    }

    fn write_commit(&mut self, sealed: &SealedCommit) -> Result<Vec<bool>, Crashed> {
        match &sealed.write {
            SealedWrite::Entry { bytes, targets, .. } => self.write_all(targets, bytes),
            SealedWrite::Checkpoint(cp) => self.write_checkpoint(cp),
        }
    }

    fn change(&mut self, k: u8, a: u64, b: u64) {
        if let Some(change) = plan_step(&self.meta, k, a, b) {
            let undo = self.meta.apply(&change).expect("a planned change applies");
            self.batch.push((change, undo));
        }
    }

    /// Commits the batch as the server does; on failure reverts it and
    /// supersedes it at once (an empty commit in its place, retried once if
    /// that fails too: each injected failure is consumed by one write).
    fn commit(&mut self) -> Result<(), Crashed> {
        let (changes, undos): (Vec<MetaChange>, Vec<Undo>) = self.batch.drain(..).unzip();
        if self.commit_changes(&changes)? {
            return Ok(());
        }
        self.meta.revert_all(undos);
        self.meta.generation = self.writer.acked_seq();
        assert_eq!(self.meta, self.acked, "reverting a failed batch restores the acknowledged state");
        for _ in 0..2 {
            if self.commit_changes(&[])? {
                return Ok(());
            }
            self.meta.generation = self.writer.acked_seq();
        }
        panic!("superseding failed twice with a single failure injected per copy");
    }

    /// Seals, writes and reports one commit of `changes` (already applied
    /// to `meta`), then its covering checkpoint if it has one. Returns
    /// whether the commit was acknowledged.
    fn commit_changes(&mut self, changes: &[MetaChange]) -> Result<bool, Crashed> {
        let sealed = match self.writer.seal_commit(&mut self.meta, changes, &self.key) {
            Ok(s) => s,
            // A commit checkpoint waits for the background one, as the
            // server's owner loop must.
            Err(SealError::CheckpointInFlight) => {
                self.finish_background()?;
                self.writer.seal_commit(&mut self.meta, changes, &self.key).expect("seal")
            }
            Err(e) => panic!("seal: {e}"),
        };
        self.possible.push(self.meta.clone());
        let written = self.write_commit(&sealed)?;
        let acked = self.writer.commit_written(sealed.seq, &written).is_ok();
        if acked {
            self.acked = self.meta.clone();
            self.possible.clear();
        }
        // A background checkpoint sealed by an earlier commit lands now,
        // after this commit's entry.
        self.finish_background()?;
        if let Some(cp) = sealed.checkpoint_after.filter(|_| acked) {
            if self.background_mode {
                self.background = Some(cp);
            } else {
                let written = self.write_checkpoint(&cp)?;
                self.writer.checkpoint_written(cp.number, &written);
            }
        }
        Ok(acked)
    }

    fn finish_background(&mut self) -> Result<(), Crashed> {
        if let Some(cp) = self.background.take() {
            let written = self.write_checkpoint(&cp)?;
            self.writer.checkpoint_written(cp.number, &written);
        }
        Ok(())
    }

    /// Crashes every copy, reloads, checks the property, and carries on
    /// from the loaded state (with the loaded writer).
    fn crash_and_reload(&mut self) {
        for c in &mut self.copies {
            c.crash(&mut self.rng);
        }
        self.reload();
    }

    fn reload(&mut self) {
        self.reloads += 1;
        let images: Vec<CopyImage<'_>> = self.copies.iter().enumerate().map(|(i, c)| c.image(i)).collect();
        let server_key = PublicKey(self.key.verifying_key().to_bytes());
        let loaded = match load(self.pool, &server_key, &images, LoadOptions::default()) {
            Ok(l) => l,
            Err(e) => panic!("reload after {} ops failed: {e}", self.ops),
        };
        let fine = loaded.metadata == self.acked || self.possible.contains(&loaded.metadata);
        assert!(
            fine,
            "reload after {} ops shows generation {}, acknowledged was {}, possible {:?}",
            self.ops,
            loaded.metadata.generation,
            self.acked.generation,
            self.possible.iter().map(|p| p.generation).collect::<Vec<_>>()
        );
        self.meta = loaded.metadata;
        self.acked = self.meta.clone();
        self.possible.clear();
        self.batch.clear();
        self.background = None;
        self.writer = loaded.writer;
        self.fail_next = vec![None; self.copies.len()];
    }

    /// The first commit after loading an older format: applies `changes`,
    /// checks the commit is a checkpoint of today's format, writes it,
    /// reloads (the reload equals what was acknowledged); its generation.
    fn commit_upgrade(&mut self, changes: &[MetaChange]) -> u64 {
        self.meta.apply_all(changes).unwrap();
        let sealed = self.writer.seal_commit(&mut self.meta, changes, &self.key).unwrap();
        let SealedWrite::Checkpoint(cp) = &sealed.write else { panic!("the upgrade is a checkpoint") };
        assert_eq!(crate::metadata::SlotHeader::decode(&cp.bytes).unwrap().format_version, METADATA_FORMAT_VERSION);
        let written = self.write_commit(&sealed).unwrap();
        self.writer.commit_written(sealed.seq, &written).unwrap();
        self.acked = self.meta.clone();
        let generation = self.meta.generation;
        self.reload();
        assert_eq!(self.meta, self.acked);
        generation
    }

    fn run(&mut self, steps: &[Step]) {
        for step in steps {
            let result = match step {
                Step::Change(k, a, b) => {
                    self.change(*k, *a, *b);
                    Ok(())
                }
                Step::Commit => self.commit(),
                Step::Fail(copy, persisted) => {
                    self.fail_next[*copy] = Some(*persisted);
                    Ok(())
                }
            };
            if result.is_err() {
                self.crash_and_reload();
            }
        }
        let mut result = self.commit();
        while result.is_err() {
            self.crash_and_reload();
            result = self.commit();
        }
        // A clean restart shows exactly the acknowledged state.
        for c in &mut self.copies {
            c.crash(&mut self.rng);
        }
        self.reload();
    }
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..15, any::<u64>(), any::<u64>()).prop_map(|(k, a, b)| Step::Change(k, a, b)),
        3 => Just(Step::Commit),
        1 => (0usize..3, any::<bool>()).prop_map(|(c, p)| Step::Fail(c, p)),
    ]
}

/// A fixed history long enough to wrap the ring several times, checkpoint,
/// fail and supersede.
fn fixed_history() -> Vec<Step> {
    let mut steps = Vec::new();
    for i in 0..120u64 {
        steps.push(Step::Change((i % 12) as u8, i * 7919, i * 104_729));
        if i % 3 == 2 {
            steps.push(Step::Commit);
        }
        if i == 20 {
            steps.push(Step::Fail(1, true));
        }
        if i == 70 {
            steps.push(Step::Fail(2, false));
        }
    }
    steps
}

#[test]
fn a_history_without_crashes_wraps_the_ring_and_checkpoints() {
    let mut m = Model::new(Vec::new(), 1);
    m.run(&fixed_history());
    assert!(m.checkpoints >= 4, "only {} checkpoints", m.checkpoints);
    assert!(m.ops > 100);
    eprintln!("{} device operations, {} checkpoints", m.ops, m.checkpoints);
}

/// Crash at every write boundary of the fixed history, with several tear
/// patterns each.
#[test]
fn crash_at_every_write_boundary() {
    let ops = {
        let mut m = Model::new(Vec::new(), 1);
        m.run(&fixed_history());
        m.ops
    };
    for crash in 0..ops {
        for seed in 1..=3 {
            let mut m = Model::new(vec![crash], seed * 7 + crash as u64);
            m.run(&fixed_history());
            assert!(m.reloads >= 2, "crash at op {crash} was not reached");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random histories with crashes (several per history) at random write
    /// boundaries.
    #[test]
    fn random_histories_survive_crashes(
        steps in proptest::collection::vec(arb_step(), 1..120),
        crashes in proptest::collection::vec(0usize..200, 0..4),
        seed in any::<u64>(),
    ) {
        let mut crashes = crashes;
        crashes.sort_unstable();
        crashes.dedup();
        let mut m = Model::new(crashes, seed);
        m.run(&steps);
    }

    /// One flipped bit anywhere in one copy's metadata area never changes
    /// what loads (another copy has it), and the next commit heals it.
    #[test]
    fn a_bit_flip_in_one_copy_loses_nothing(
        steps in proptest::collection::vec(arb_step(), 1..80),
        copy in 0usize..3,
        bit in any::<proptest::sample::Index>(),
        more in proptest::collection::vec(arb_step(), 0..20),
    ) {
        let mut m = Model::new(Vec::new(), 5);
        m.run(&steps);
        let c = &mut m.copies[copy];
        let bit = bit.index(c.durable.len() * 8);
        c.durable[bit / 8] ^= 1 << (bit % 8);
        m.reload();
        m.run(&more);
    }
}

// ---- single-copy behaviour: what a flip or a forgery does when no other
// ---- copy covers it

fn one_copy_with_entries(n: usize) -> (Model, Vec<u64>) {
    let mut m = Model::new(Vec::new(), 9);
    m.copies.truncate(1);
    let areas = areas();
    m.writer = JournalWriter::for_new_pool(POOL, &areas[..1], 1);
    m.meta = new_pool_meta(&m.key);
    m.fail_next = vec![None];
    m.copies[0] = ModelCopy::new(areas[0]);
    m.commit().unwrap();
    let mut offsets = Vec::new();
    for i in 0..n as u64 {
        m.change(9, i, i);
        let (changes, _): (Vec<MetaChange>, Vec<Undo>) = m.batch.drain(..).unzip();
        let sealed = m.writer.seal_commit(&mut m.meta, &changes, &m.key).unwrap();
        assert!(sealed.checkpoint_after.is_none(), "keep the test below the checkpoint point");
        let SealedWrite::Entry { targets, .. } = &sealed.write else { panic!("an entry") };
        offsets.push(targets[0].offset);
        let written = m.write_commit(&sealed).unwrap();
        m.writer.commit_written(sealed.seq, &written).unwrap();
        m.acked = m.meta.clone();
    }
    (m, offsets)
}

fn load_one(m: &Model, key: &SigningKey) -> Result<Loaded, LoadError> {
    let server_key = PublicKey(key.verifying_key().to_bytes());
    load(POOL, &server_key, &[m.copies[0].image(0)], LoadOptions::default())
}

#[test]
fn a_damaged_entry_in_the_middle_stops_the_load_naming_device_and_offset() {
    let (mut m, offsets) = one_copy_with_entries(4);
    let at = (offsets[1] - m.copies[0].area.offset) as usize;
    m.copies[0].durable[at + 200] ^= 0x04;
    let err = load_one(&m, &m.key).unwrap_err();
    let LoadError::Copy(CopyError::Corrupt { device, offset, expected_seq, later_seq, .. }) = &err else {
        panic!("{err}")
    };
    assert_eq!((device.as_str(), *offset, *expected_seq, *later_seq), ("copy0", offsets[1], 3, 4));
    let text = err.to_string();
    assert!(text.contains("device copy0, byte offset") && text.contains("acknowledged commit was lost"), "{text}");
}

#[test]
fn a_damaged_last_entry_is_a_torn_tail() {
    let (mut m, offsets) = one_copy_with_entries(4);
    let at = (offsets[3] - m.copies[0].area.offset) as usize;
    m.copies[0].durable[at + 200] ^= 0x04;
    let loaded = load_one(&m, &m.key).unwrap();
    // Indistinguishable from a commit torn by a crash: the copies are what
    // protects an acknowledged last commit against a flipped bit.
    assert_eq!(loaded.metadata.generation, m.acked.generation - 1);
    assert!(loaded.warnings.iter().any(|w| w.contains("torn journal entry")), "{:?}", loaded.warnings);
}

#[test]
fn forged_entries_and_checkpoints_are_refused() {
    let (m, _) = one_copy_with_entries(3);
    // A forger appends a well-formed entry, chained correctly, with another key.
    let (mut forged, _) = one_copy_with_entries(3);
    let intruder = SigningKey::from_bytes(&[0x66; 32]);
    forged.change(9, 77, 77);
    let (changes, _): (Vec<MetaChange>, Vec<Undo>) = forged.batch.drain(..).unzip();
    let sealed = forged.writer.seal_commit(&mut forged.meta, &changes, &intruder).unwrap();
    let written = forged.write_commit(&sealed).unwrap();
    forged.writer.commit_written(sealed.seq, &written).unwrap();
    let err = load_one(&forged, &forged.key).unwrap_err();
    assert!(matches!(err, LoadError::Copy(CopyError::Forged { .. })), "{err}");
    assert!(err.to_string().contains("not signed by this server's key"), "{err}");
    // Loading with the wrong key refuses the checkpoint itself.
    let err = load_one(&m, &intruder).unwrap_err();
    assert!(matches!(err, LoadError::Copy(CopyError::Forged { .. })), "{err}");
}

#[test]
fn a_huge_batch_is_committed_as_a_checkpoint() {
    let mut m = Model::new(Vec::new(), 3);
    // More changes than an entry may hold (a quarter of the ring).
    for i in 0..600u64 {
        m.change(9, i % 4, i);
    }
    let (changes, undos): (Vec<MetaChange>, Vec<Undo>) = m.batch.drain(..).unzip();
    let sealed = m.writer.seal_commit(&mut m.meta, &changes, &m.key).unwrap();
    assert!(matches!(sealed.write, SealedWrite::Checkpoint(_)));
    let written = m.write_commit(&sealed).unwrap();
    m.writer.commit_written(sealed.seq, &written).unwrap();
    m.acked = m.meta.clone();
    drop(undos);
    m.reload();
}

// ---- upgrade of a pool written by the release before the journal

/// `tests/fixtures/format2/`: two devices' label and metadata area, eight
/// whole-pool commits by the format-2 code (see `tests/format2_fixture.rs`).
const FORMAT2_IMAGES: [&[u8]; 2] = [
    include_bytes!("../../../tests/fixtures/format2/dev0.img"),
    include_bytes!("../../../tests/fixtures/format2/dev1.img"),
];

fn fixture_key() -> SigningKey {
    SigningKey::from_bytes(&[0x5a; 32])
}

fn fixture_area(image: &[u8]) -> (uuid::Uuid, MetadataArea) {
    let label = crate::label::DeviceLabel::decode(image).unwrap();
    (label.pool_uuid, MetadataArea::from_label(&label))
}

/// The newest state as the format-2 reader sees it.
fn fixture_legacy_state() -> PoolMetadata {
    let (pool, area) = fixture_area(FORMAT2_IMAGES[0]);
    let slots = (0..area.slot_count).map(|i| {
        let at = area.slot_offset(i) as usize;
        area.decode_slot(Some(pool), &FORMAT2_IMAGES[0][at..at + area.slot_bytes as usize])
    });
    MetadataArea::choose_newest(slots).unwrap().metadata
}

impl Model {
    /// A model over the format-2 fixture's two copies, loaded with the journal.
    fn from_fixture(crash_at: Vec<usize>, seed: u64) -> (Model, Loaded) {
        Model::from_images(FORMAT2_IMAGES, crash_at, seed)
    }

    /// A model over two fixture copies, loaded with the journal.
    fn from_images(images: [&[u8]; 2], crash_at: Vec<usize>, seed: u64) -> (Model, Loaded) {
        let (pool, area) = fixture_area(images[0]);
        let mut copies = Vec::new();
        for image in images {
            let mut c = ModelCopy::new(area);
            let start = area.offset as usize;
            let len = c.durable.len();
            c.durable.copy_from_slice(&image[start..start + len]);
            copies.push(c);
        }
        let key = fixture_key();
        let images: Vec<CopyImage<'_>> = copies.iter().enumerate().map(|(i, c)| c.image(i)).collect();
        let loaded = load(pool, &PublicKey(key.verifying_key().to_bytes()), &images, LoadOptions::default()).unwrap();
        drop(images);
        let model = Model {
            pool,
            copies,
            writer: loaded.writer.clone(),
            key,
            meta: loaded.metadata.clone(),
            acked: loaded.metadata.clone(),
            possible: Vec::new(),
            batch: Vec::new(),
            ops: 0,
            crash_at: crash_at.into(),
            fail_next: vec![None; 2],
            rng: Rng(seed | 1),
            reloads: 0,
            checkpoints: 0,
            background_mode: seed % 2 == 0,
            background: None,
        };
        (model, loaded)
    }
}

#[test]
fn a_format2_pool_is_read_and_upgraded_at_its_next_commit() {
    let (mut m, loaded) = Model::from_fixture(Vec::new(), 1);
    assert!(loaded.legacy);
    assert_eq!(loaded.metadata, fixture_legacy_state());
    assert_eq!(loaded.metadata.generation, 8);
    assert!(m.writer.checkpoint_pending().is_some_and(|why| why.contains("format-2")));

    // The first commit is the upgrade: a checkpoint into the older of the
    // two checkpoint slots, then the format-2 headers inside the ring cleared.
    let snapshot = m.meta.snapshots[0].id;
    let change = m.meta.plan_register_cow(snapshot, &[9, 10]).unwrap().unwrap();
    let undo = m.meta.apply(&change).unwrap();
    m.batch.push((change, undo));
    let (changes, _): (Vec<MetaChange>, Vec<Undo>) = m.batch.drain(..).unzip();
    let sealed = m.writer.seal_commit(&mut m.meta, &changes, &m.key).unwrap();
    let SealedWrite::Checkpoint(cp) = &sealed.write else { panic!("the upgrade is a checkpoint") };
    let (_, area) = fixture_area(FORMAT2_IMAGES[0]);
    assert_eq!(cp.number, 9, "numbered past every format-2 generation");
    assert!(cp.targets.iter().all(|t| t.offset == area.slot_offset(0)), "slot 0 held generation 5, the oldest");
    assert_eq!(cp.clear_after.len(), 4, "slots 2 and 3 of both copies");
    let written = m.write_commit(&sealed).unwrap();
    m.writer.commit_written(sealed.seq, &written).unwrap();
    m.acked = m.meta.clone();
    assert_eq!(m.meta.generation, 9);

    m.reload();
    assert_eq!(m.meta, m.acked);
    let c = &m.copies[0];
    let slot3 = (area.slot_offset(3) - area.offset) as usize;
    assert_eq!(area.decode_slot(None, &c.durable[slot3..]).unwrap_err(), crate::metadata::SlotError::Empty);
    // The whole-pool reader of this build refuses the journaled pool rather
    // than reading the format-2 leftover in slot 1 (and so do older
    // releases: a journaled slot is "written by a newer sanvol" to them).
    let slots = (0..2).map(|i| {
        let at = (area.slot_offset(i) - area.offset) as usize;
        area.decode_slot(None, &c.durable[at..at + area.slot_bytes as usize])
    });
    assert!(matches!(
        MetadataArea::choose_newest(slots),
        Err(crate::metadata::MetadataError::Journaled { found: METADATA_FORMAT_VERSION })
    ));

    // Later commits are journal entries.
    m.run(&fixed_history()[..30]);
    assert!(m.reloads >= 2);
}

/// Crash at every write boundary of the upgrade and the commits after it:
/// the pool reloads as format 2 (generation 8) or as an upgraded state.
#[test]
fn a_crash_anywhere_in_the_upgrade_loses_nothing() {
    let history = fixed_history()[..24].to_vec();
    let ops = {
        let (mut m, _) = Model::from_fixture(Vec::new(), 1);
        m.run(&history);
        m.ops
    };
    for crash in 0..ops {
        for seed in 1..=3 {
            let (mut m, _) = Model::from_fixture(vec![crash], seed * 31 + crash as u64);
            m.run(&history);
        }
    }
}

#[test]
fn a_format2_record_newer_than_the_checkpoint_is_refused() {
    let (mut m, _) = Model::from_fixture(Vec::new(), 1);
    m.run(&fixed_history()[..6]);
    // Someone writes an old, unsigned, whole-pool record with a high generation.
    let (pool, area) = fixture_area(FORMAT2_IMAGES[0]);
    let mut old = fixture_legacy_state();
    old.generation = 1000;
    let record = area.encode_slot(pool, 1000, &old).unwrap();
    let c = &mut m.copies[1];
    let slot0 = (area.slot_offset(0) - area.offset) as usize;
    let slot1 = (area.slot_offset(1) - area.offset) as usize;
    let target = if matches!(crate::metadata::SlotHeader::decode(&c.durable[slot0..]), Ok(h) if h.format_version == METADATA_FORMAT_VERSION)
    {
        slot1
    } else {
        slot0
    };
    c.durable[target..target + record.len()].copy_from_slice(&record);
    let images: Vec<CopyImage<'_>> = m.copies.iter().enumerate().map(|(i, c)| c.image(i)).collect();
    let err = load(pool, &PublicKey(m.key.verifying_key().to_bytes()), &images, LoadOptions::default()).unwrap_err();
    assert!(matches!(err, LoadError::Copy(CopyError::Rollback { .. })), "{err}");

    // With both checkpoint slots wiped, the signed entries left in the
    // ring still refuse a rollback to an unsigned record.
    let c = &mut m.copies[1];
    c.durable[slot0..slot0 + area.slot_bytes as usize].fill(0);
    c.durable[slot1..slot1 + area.slot_bytes as usize].fill(0);
    c.durable[slot0..slot0 + record.len()].copy_from_slice(&record);
    let images: Vec<CopyImage<'_>> = m.copies[1..].iter().enumerate().map(|(i, c)| c.image(i)).collect();
    let err = load(pool, &PublicKey(m.key.verifying_key().to_bytes()), &images, LoadOptions::default()).unwrap_err();
    assert!(matches!(err, LoadError::Copy(CopyError::EntriesWithoutCheckpoint { .. })), "{err}");
    // And a server that knows its pool is journaled refuses unsigned metadata outright.
    let fresh: Vec<CopyImage<'_>> = FORMAT2_IMAGES
        .iter()
        .map(|image| {
            let (_, area) = fixture_area(image);
            let s = |i: u32| Ok(&image[area.slot_offset(i) as usize..(area.slot_offset(i) + area.slot_bytes) as usize]);
            let ring = area.ring();
            CopyImage {
                device: "fixture".into(),
                area,
                checkpoint_slots: [s(0), s(1)],
                ring: Ok(&image[ring.start as usize..ring.end as usize]),
            }
        })
        .collect();
    let strict = LoadOptions { refuse_unsigned: true };
    assert!(load(pool, &PublicKey(m.key.verifying_key().to_bytes()), &fresh, strict).is_err());
}

// ---- upgrade of a pool written by the release before format 4

/// `tests/fixtures/format3/`: the format-2 fixture upgraded to the journal
/// and committed to five more times by the format-3 code (see its README).
const FORMAT3_IMAGES: [&[u8]; 2] = [
    include_bytes!("../../../tests/fixtures/format3/dev0.img"),
    include_bytes!("../../../tests/fixtures/format3/dev1.img"),
];
const FORMAT3_STATE: &str = include_str!("../../../tests/fixtures/format3/expected.json");

#[test]
fn a_format3_pool_is_read_and_upgraded_by_a_checkpoint_at_its_next_commit() {
    let (mut m, loaded) = Model::from_images(FORMAT3_IMAGES, Vec::new(), 1);
    assert!(!loaded.legacy);
    let mut expected: PoolMetadata = serde_json::from_str(FORMAT3_STATE).unwrap();
    assert_eq!((expected.format_version, expected.generation), (3, 14));
    expected.format_version = METADATA_FORMAT_VERSION;
    assert_eq!(loaded.metadata, expected, "the checkpoint and the five entries after it, replayed");
    assert!(
        m.writer.checkpoint_pending().is_some_and(|why| why.contains("format-3")),
        "{:?}",
        m.writer.checkpoint_pending()
    );

    // The first commit (a used handover token) is the upgrade: a format-4 checkpoint.
    let used = crate::metadata::UsedToken { nonce: [0x77; 16], expires_at_unix_ms: 1_700_000_900_000 };
    let change = m.meta.plan_handover_tokens(1_700_000_800_000, Some(used)).unwrap();
    assert_eq!(m.commit_upgrade(&[change]), 15);
    assert!(m.meta.handovers.is_used(&[0x77; 16]), "the ledger survives the reload");
    assert!(m.writer.checkpoint_pending().is_none());

    // Later commits are journal entries.
    m.run(&fixed_history()[..30]);
    assert!(m.reloads >= 2);
}

/// Crashes at every write boundary of the upgrade of the pool in `images`
/// (an older format) and of the commits after it: each reload is the last
/// acknowledged state, in the old format or upgraded.
fn crash_anywhere_in_the_upgrade(images: [&[u8]; 2]) {
    let history = fixed_history()[..24].to_vec();
    let ops = {
        let (mut m, _) = Model::from_images(images, Vec::new(), 1);
        m.run(&history);
        m.ops
    };
    for crash in 0..ops {
        for seed in 1..=2 {
            let (mut m, _) = Model::from_images(images, vec![crash], seed * 31 + crash as u64);
            m.run(&history);
        }
    }
}

/// Crash at every write boundary of the format-3 upgrade and the commits
/// after it: the pool reloads as format 3 (generation 14) or upgraded.
#[test]
fn a_crash_anywhere_in_the_format3_upgrade_loses_nothing() {
    crash_anywhere_in_the_upgrade(FORMAT3_IMAGES);
}

// ---- upgrade of a pool written by the release before format 10

/// `tests/fixtures/format9/`: the format-3 fixture upgraded and committed
/// to five more times by the format-9 code (see its README).
const FORMAT9_IMAGES: [&[u8]; 2] = [
    include_bytes!("../../../tests/fixtures/format9/dev0.img"),
    include_bytes!("../../../tests/fixtures/format9/dev1.img"),
];
const FORMAT9_STATE: &str = include_str!("../../../tests/fixtures/format9/expected.json");

#[test]
fn a_format9_pool_is_read_with_fencing_unknown_and_upgraded_by_a_checkpoint_at_its_next_commit() {
    let (mut m, loaded) = Model::from_images(FORMAT9_IMAGES, Vec::new(), 1);
    let mut expected: PoolMetadata = serde_json::from_str(FORMAT9_STATE).unwrap();
    assert_eq!((expected.format_version, expected.generation), (9, 19));
    expected.format_version = METADATA_FORMAT_VERSION;
    assert_eq!(loaded.metadata, expected, "the checkpoint and the four entries after it, replayed");
    assert!(loaded.metadata.range_locks.iter().any(|l| l.handle == crate::ids::HandleId(3)), "format 9's locks kept");
    assert!(loaded.metadata.device_fencing.is_empty());
    let devices: Vec<_> = loaded.metadata.devices.iter().map(|d| d.index).collect();
    assert!(devices.iter().all(|d| loaded.metadata.device_fenced(*d).is_none()), "unknown: learned at runtime");
    assert!(
        m.writer.checkpoint_pending().is_some_and(|why| why.contains("format-9")),
        "{:?}",
        m.writer.checkpoint_pending()
    );

    // The first commit records what a connection told: the upgrade, a format-10 checkpoint.
    let changes: Vec<MetaChange> =
        devices.iter().enumerate().map(|(i, d)| MetaChange::DeviceFencing { device: *d, fenced: i == 0 }).collect();
    assert_eq!(m.commit_upgrade(&changes), 20);
    assert_eq!(m.meta.device_fenced(devices[0]), Some(true), "recorded across the reload");
    assert_eq!(m.meta.device_fenced(devices[1]), Some(false));
    assert!(m.writer.checkpoint_pending().is_none());

    // Later commits are journal entries.
    m.run(&fixed_history()[..30]);
    assert!(m.reloads >= 2);
}

/// Crash at every write boundary of the format-9 upgrade and the commits
/// after it: the pool reloads as format 9 (generation 19) or upgraded.
#[test]
fn a_crash_anywhere_in_the_format9_upgrade_loses_nothing() {
    crash_anywhere_in_the_upgrade(FORMAT9_IMAGES);
}

// ---- upgrade of a pool written by the release before format 11

/// `tests/fixtures/format10/`: the format-9 fixture upgraded and committed
/// to four more times by the format-10 code (see its README).
const FORMAT10_IMAGES: [&[u8]; 2] = [
    include_bytes!("../../../tests/fixtures/format10/dev0.img"),
    include_bytes!("../../../tests/fixtures/format10/dev1.img"),
];
const FORMAT10_STATE: &str = include_str!("../../../tests/fixtures/format10/expected.json");

#[test]
fn a_format10_pool_is_read_without_cache_mirrors_and_upgraded_by_a_checkpoint_at_its_next_commit() {
    let (mut m, loaded) = Model::from_images(FORMAT10_IMAGES, Vec::new(), 1);
    let mut expected: PoolMetadata = serde_json::from_str(FORMAT10_STATE).unwrap();
    assert_eq!((expected.format_version, expected.generation), (10, 23));
    expected.format_version = METADATA_FORMAT_VERSION;
    assert_eq!(loaded.metadata, expected, "the checkpoint and the three entries after it, replayed");
    let volume = loaded.metadata.volumes[0].id;
    assert_eq!(loaded.metadata.volume_cache(volume).map(|c| c.size_bytes), Some(128 << 20), "format 10's cache kept");
    assert!(loaded.metadata.device_fencing.len() == 2, "format 10's fencing kept");
    assert!(loaded.metadata.cache_mirrors.is_empty() && loaded.metadata.cache_mirror(volume).is_none());
    assert!(
        m.writer.checkpoint_pending().is_some_and(|why| why.contains("format-10")),
        "{:?}",
        m.writer.checkpoint_pending()
    );

    // The first commit records the cached volume's replayed mirror: the
    // upgrade, a format-11 checkpoint.
    let record = crate::metadata::CacheMirrorRecord { volume, generation: 0, server: "mds-a".into(), pending: false };
    assert_eq!(m.commit_upgrade(&[MetaChange::CacheMirror(record.clone())]), 24);
    assert_eq!(m.meta.cache_mirror(volume), Some(&record), "recorded across the reload");
    assert!(m.writer.checkpoint_pending().is_none());

    // Later commits are journal entries.
    m.run(&fixed_history()[..30]);
    assert!(m.reloads >= 2);
}

/// Crash at every write boundary of the format-10 upgrade and the commits
/// after it: the pool reloads as format 10 (generation 23) or upgraded.
#[test]
fn a_crash_anywhere_in_the_format10_upgrade_loses_nothing() {
    crash_anywhere_in_the_upgrade(FORMAT10_IMAGES);
}
