//! One volume's mirror file: the holder's cached writes, appended in
//! batches (one write + one fdatasync each) and released once the holder
//! has them on the devices. Blocking file I/O, run by the mirror's worker
//! ([`super::worker`]) on tokio's blocking pool — never on the owner loop.
//!
//! Why the agent's log format ([`volume_format::cache_log`]): it already
//! tells a torn last batch (never acknowledged, ignored) from damage in the
//! middle (reported), and releases space by moving the tail in a
//! superblock before reusing it. The mirror numbers its records itself; the
//! holder's sequence numbers (what releases name) are kept beside them in
//! memory. After a restart they are not needed: the records on disk are
//! either replayed to the devices (the holder is gone) or dropped by the
//! holder's next [`MirrorOpen`](volume_format::control::messages::Request::MirrorOpen)
//! (it destaged everything before mirroring again), or replaced by the
//! file it staged ([`staged_path`], [`VolumeMirror::adopt`]).
//!
//! The file also carries the mirror's generation ([`GenerationHeader`],
//! in the unused bytes between the superblocks and the ring): the pool
//! metadata records the newest generation of each cached volume
//! (`volume_format::metadata::CacheMirrorRecord`), and a file of another
//! generation is stale — never replayed.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

use blockio::durable_file::{DurableError, DurableFile};

use volume_format::cache_log::{scan, LogAppender, ScanError, DATA_START_BYTES, SUPERBLOCK_SLOT_BYTES};
use volume_format::control::messages::MirrorRecord;
use volume_format::VolumeId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache mirror {path}: cannot {what}: {source}")]
    Io { path: String, what: &'static str, source: std::io::Error },
    #[error("cache mirror {}: cannot {}: {}", .0.path, .0.what, .0.source)]
    File(#[from] DurableError),
    #[error("{0}")]
    Scan(#[from] ScanError),
    #[error(
        "cache mirror {path} holds volume {found}, not {expected}: the mirror directory was edited by hand; move \
         the file aside"
    )]
    OtherVolume { path: String, found: VolumeId, expected: VolumeId },
    #[error("mirror record {seq} is out of order (the last one mirrored is {last}); start mirroring again")]
    OutOfOrder { seq: u64, last: u64 },
    #[error("a mirror record of {length} bytes can never fit the volume's {log_bytes}-byte mirror")]
    TooLarge { length: usize, log_bytes: u64 },
}

/// Where the generation header lives: after both superblock copies, before
/// the ring (which starts at [`DATA_START_BYTES`]).
const GENERATION_HEADER_POS: u64 = 2 * SUPERBLOCK_SLOT_BYTES;
const GENERATION_HEADER_BYTES: usize = 512;
const GENERATION_MAGIC: &[u8; 8] = b"SVMIRGEN";

/// A mirror file's generation: magic, volume, generation, and a crc32c of
/// the three (a torn or foreign header reads as "no generation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationHeader {
    pub volume: VolumeId,
    pub generation: u64,
}

impl GenerationHeader {
    fn encode(&self) -> [u8; GENERATION_HEADER_BYTES] {
        let mut bytes = [0u8; GENERATION_HEADER_BYTES];
        bytes[..8].copy_from_slice(GENERATION_MAGIC);
        bytes[8..16].copy_from_slice(&self.volume.0.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.generation.to_be_bytes());
        let crc = crc32c::crc32c(&bytes[..24]);
        bytes[24..28].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<GenerationHeader> {
        let bytes = bytes.get(..28)?;
        if &bytes[..8] != GENERATION_MAGIC || crc32c::crc32c(&bytes[..24]).to_be_bytes() != bytes[24..28] {
            return None;
        }
        let volume = VolumeId(u64::from_be_bytes(bytes[8..16].try_into().ok()?));
        let generation = u64::from_be_bytes(bytes[16..24].try_into().ok()?);
        Some(GenerationHeader { volume, generation })
    }
}

/// A record the mirror holds, oldest first.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The holder's sequence number.
    seq: u64,
    /// Where the mirror's own record starts, and its own sequence number
    /// (the tail moves to the next held record's).
    pos: u64,
    log_seq: u64,
    bytes: u64,
}

/// A mirror's accounting, without its bytes or its file: which records it
/// holds, where, and what an append or a release writes. [`VolumeMirror`]
/// writes what it says to its file; the simulator (`sanvol-sim`) keeps the
/// same accounting in its model of the worker, so both follow one set of
/// rules.
pub struct MirrorLedger {
    appender: LogAppender,
    held: VecDeque<Held>,
    held_bytes: u64,
    last_seq: u64,
}

/// An append [`MirrorLedger::plan_append`] accepted: the regions to write
/// (one write and one sync), then [`MirrorLedger::appended`].
pub struct PlannedAppend {
    batch: volume_format::cache_log::Batch,
    /// Records taken: a prefix of those offered.
    pub taken: usize,
    last: u64,
}

impl PlannedAppend {
    /// (file position, bytes) of each region to write.
    pub fn regions(&self) -> impl Iterator<Item = (u64, &[u8])> + Clone {
        self.batch.regions.iter().map(|r| (r.pos, r.bytes.as_slice()))
    }
}

/// A release [`MirrorLedger::plan_release`] found: the superblock to write
/// (synced), then [`MirrorLedger::released`].
pub struct PlannedRelease {
    count: usize,
    tail_pos: u64,
    /// The superblock that moves the tail: (file position, bytes).
    pub superblock: (u64, Vec<u8>),
}

impl MirrorLedger {
    pub fn new(appender: LogAppender) -> MirrorLedger {
        MirrorLedger { appender, held: VecDeque::new(), held_bytes: 0, last_seq: 0 }
    }

    /// As many of `records` as fit, in order (`Ok(None)`: none, the mirror
    /// is full); an out-of-order record, or one that can never fit, takes
    /// none.
    pub fn plan_append<'a>(
        &mut self,
        records: impl Iterator<Item = &'a MirrorRecord> + Clone,
    ) -> Result<Option<PlannedAppend>, StoreError> {
        let mut batch = self.appender.begin_batch_for(records.clone().map(|r| r.data.len()));
        let mut taken = 0;
        let mut last = self.last_seq;
        for record in records {
            if record.seq <= last {
                return Err(StoreError::OutOfOrder { seq: record.seq, last });
            }
            if !self.appender.fits_ever(u32::try_from(record.data.len()).unwrap_or(u32::MAX)) {
                return Err(StoreError::TooLarge { length: record.data.len(), log_bytes: self.log_bytes() });
            }
            if !self.appender.push(&mut batch, record.offset, &record.data) {
                break;
            }
            last = record.seq;
            taken += 1;
        }
        Ok((taken > 0).then_some(PlannedAppend { batch, taken, last }))
    }

    /// `plan`'s regions are durable: its records (the first `plan.taken`
    /// of `records`, as offered to [`MirrorLedger::plan_append`]) are held.
    pub fn appended<'a>(&mut self, plan: PlannedAppend, records: impl Iterator<Item = &'a MirrorRecord>) {
        for (appended, record) in plan.batch.records.iter().zip(records) {
            self.held.push_back(Held {
                seq: record.seq,
                pos: appended.pos,
                log_seq: appended.seq,
                bytes: record.data.len() as u64,
            });
            self.held_bytes += record.data.len() as u64;
        }
        self.last_seq = plan.last;
    }

    /// What freeing every record up to the holder's `upto_seq` writes
    /// (`None`: nothing is held up to it).
    pub fn plan_release(&mut self, upto_seq: u64) -> Option<PlannedRelease> {
        let count = self.held.iter().take_while(|h| h.seq <= upto_seq).count();
        if count == 0 {
            return None;
        }
        let (tail_pos, tail_seq) = match self.held.get(count) {
            Some(next) => (next.pos, next.log_seq),
            None => (self.appender.ring().head(), self.appender.next_seq()),
        };
        let superblock = self.appender.release_superblock(tail_pos, tail_seq);
        Some(PlannedRelease { count, tail_pos, superblock: (superblock.slot_offset(), superblock.encode().to_vec()) })
    }

    /// `plan`'s superblock is durable: the space may be reused. Returns how
    /// many records were released.
    pub fn released(&mut self, plan: PlannedRelease) -> usize {
        for held in self.held.drain(..plan.count) {
            self.held_bytes -= held.bytes;
        }
        self.appender.released(plan.tail_pos);
        plan.count
    }

    pub fn log_bytes(&self) -> u64 {
        self.appender.ring().capacity_bytes()
    }

    /// Data bytes held (mirrored, not yet released).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn held_records(&self) -> usize {
        self.held.len()
    }
}

/// A volume's mirror file being written.
pub struct VolumeMirror {
    /// Preallocated and written with synchronous direct writes (see
    /// [`blockio::durable_file`]): an append costs one write to the disk.
    file: DurableFile,
    ledger: MirrorLedger,
}

/// Where volume `volume`'s mirror lives in `dir`.
pub fn mirror_path(dir: &Path, volume: VolumeId) -> PathBuf {
    dir.join(format!("volume-{}.mirror", volume.0))
}

/// Where the records for volume `volume`'s next mirror generation are
/// staged (`Request::MirrorStage`): never read by a replay; renamed to
/// [`mirror_path`] when that generation starts ([`VolumeMirror::adopt`]).
pub fn staged_path(dir: &Path, volume: VolumeId) -> PathBuf {
    dir.join(format!("volume-{}.mirror.staged", volume.0))
}

/// Where a copy of volume `volume`'s mirror fetched from another server is
/// kept while it is replayed ([`super::fetch`]).
pub fn fetched_path(dir: &Path, volume: VolumeId) -> PathBuf {
    dir.join(format!("volume-{}.mirror.fetched", volume.0))
}

/// A piece of a mirror file as another server fetches it
/// (`Request::MirrorFetch`, [`read_chunk`]).
#[derive(Debug)]
pub struct Chunk {
    /// The file's generation, as [`read_index`] reads it.
    pub generation: Option<u64>,
    /// The file's length.
    pub total_bytes: u64,
    pub data: Vec<u8>,
}

/// Up to `max` bytes of `volume`'s mirror file at `path` from `offset`,
/// with the file's generation and length. `None`: no such file. Blocking.
pub fn read_chunk(path: &Path, volume: VolumeId, offset: u64, max: usize) -> Result<Option<Chunk>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path, "open")(e)),
    };
    let total = file.metadata().map_err(io(path, "stat"))?.len();
    let generation = read_generation(&file, path, volume)?;
    let len = total.saturating_sub(offset).min(max as u64) as usize;
    let mut data = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut data, offset).map_err(io(path, "read"))?;
    Ok(Some(Chunk { generation, total_bytes: total, data }))
}

/// The generation in the header of `volume`'s mirror `file` (`None`: a
/// file too short for one, torn, or of another volume).
fn read_generation(file: &File, path: &Path, volume: VolumeId) -> Result<Option<u64>, StoreError> {
    let mut header = [0u8; GENERATION_HEADER_BYTES];
    match std::os::unix::fs::FileExt::read_exact_at(file, &mut header, GENERATION_HEADER_POS) {
        Ok(()) => Ok(GenerationHeader::decode(&header).filter(|h| h.volume == volume).map(|h| h.generation)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io(path, "read")(e)),
    }
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError::Io { path, what, source }
}

impl VolumeMirror {
    /// Starts an empty mirror of `log_bytes` at `path` (whatever the file
    /// held is gone): a new log id, both superblocks, durable. The file is
    /// preallocated, every byte written, the first time (a mirror as large
    /// as the volume's cache on the server's disk): appends into a written
    /// file do not commit file-system metadata. A file of the right size
    /// from an earlier open is reused as it is: its old records belong to
    /// another log id, which no scan of the new log accepts. `generation`:
    /// the pool metadata's record of this mirror (written with the cleared
    /// superblocks, so a file with records always has its generation).
    pub fn create(path: &Path, volume: VolumeId, log_bytes: u64, generation: u64) -> Result<VolumeMirror, StoreError> {
        let existed = path.exists();
        let file = DurableFile::open(path)?;
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).map_err(|e| StoreError::Io {
            path: path.display().to_string(),
            what: "pick a log id",
            source: std::io::Error::other(e.to_string()),
        })?;
        let appender = LogAppender::create(u64::from_be_bytes(id), volume, log_bytes);
        file.preallocate(log_bytes)?;
        // The old superblocks go first, durably: a crash while the new ones
        // are written must not leave an old one (of a higher generation)
        // to win over a new one.
        let cleared = [0u8; 2 * SUPERBLOCK_SLOT_BYTES as usize];
        let header = GenerationHeader { volume, generation }.encode();
        file.write_durable([(0, &cleared[..]), (GENERATION_HEADER_POS, &header[..])].into_iter())?;
        let superblocks = appender.initial_superblocks().map(|s| (s.slot_offset(), s.encode()));
        file.write_durable(superblocks.iter().map(|(pos, bytes)| (*pos, &bytes[..])))?;
        if !existed {
            if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
                dir.sync_all().map_err(io(path, "fsync its directory"))?;
            }
        }
        debug_assert!(log_bytes > DATA_START_BYTES);
        Ok(VolumeMirror { file, ledger: MirrorLedger::new(appender) })
    }

    /// Makes this staged file (at `from`) the mirror of `generation` at
    /// `to`: the generation header first, durably, then the rename, then
    /// the directory synced — so the file at `to` is either the previous
    /// one or this one with its records and generation, never a mix.
    pub fn adopt(&mut self, from: &Path, to: &Path, volume: VolumeId, generation: u64) -> Result<(), StoreError> {
        let header = GenerationHeader { volume, generation }.encode();
        self.file.write_durable(std::iter::once((GENERATION_HEADER_POS, &header[..])))?;
        std::fs::rename(from, to).map_err(io(to, "take the staged mirror file as"))?;
        if let Some(dir) = to.parent().and_then(|d| File::open(d).ok()) {
            dir.sync_all().map_err(io(to, "fsync its directory"))?;
        }
        Ok(())
    }

    pub fn log_bytes(&self) -> u64 {
        self.ledger.log_bytes()
    }

    /// Data bytes held (mirrored, not yet released).
    pub fn held_bytes(&self) -> u64 {
        self.ledger.held_bytes()
    }

    pub fn held_records(&self) -> usize {
        self.ledger.held_records()
    }

    /// Appends as many of `records` as fit, in order, with one write per
    /// region and one fdatasync; returns how many were taken (the rest wait
    /// for a release). Nothing taken means the mirror is full.
    pub fn append<'a, I>(&mut self, records: I) -> Result<usize, StoreError>
    where
        I: IntoIterator<Item = &'a MirrorRecord>,
        I::IntoIter: Clone,
    {
        let records = records.into_iter();
        let Some(plan) = self.ledger.plan_append(records.clone())? else { return Ok(0) };
        self.file.write_durable(plan.regions())?;
        let taken = plan.taken;
        self.ledger.appended(plan, records);
        Ok(taken)
    }

    /// Frees every record up to the holder's `upto_seq` (the superblock
    /// moves the tail, synced, before the space is reused).
    pub fn release(&mut self, upto_seq: u64) -> Result<(), StoreError> {
        let Some(plan) = self.ledger.plan_release(upto_seq) else { return Ok(()) };
        self.file.write_durable(std::iter::once((plan.superblock.0, &plan.superblock.1[..])))?;
        self.ledger.released(plan);
        Ok(())
    }
}

/// What a mirror file holds, by position: its generation and where each
/// live record is, in order — not the data. A replay holds only this in
/// memory and reads each write's bytes as it sends it
/// ([`HeldIndex::read`]): a full 1 GiB mirror (or ten of them, replayed at
/// once after a host with ten cached volumes died) would otherwise be read
/// into the server's memory whole.
#[derive(Debug, Default)]
pub struct HeldIndex {
    pub generation: Option<u64>,
    /// Volume offset and length of each record, oldest first.
    pub records: Vec<(u64, usize)>,
    /// Where each record's data starts in the file.
    data_pos: Vec<u64>,
    file: Option<File>,
    name: String,
}

/// Reads `volume`'s mirror file at `path` (nothing when there is no file),
/// keeping only where the records are. The scan checks every record's data
/// against its checksum: a damaged record fails the whole replay before
/// anything is written, as it always has.
pub fn read_index(path: &Path, volume: VolumeId) -> Result<HeldIndex, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HeldIndex::default()),
        Err(e) => return Err(io(path, "open")(e)),
    };
    if file.metadata().map_err(io(path, "stat"))?.len() == 0 {
        return Ok(HeldIndex::default());
    }
    let name = path.display().to_string();
    let generation = read_generation(&file, path, volume)?;
    let log = scan(&file, &name)?;
    if log.superblock.volume != volume {
        return Err(StoreError::OtherVolume { path: name, found: log.superblock.volume, expected: volume });
    }
    let mut index = HeldIndex { generation, name, ..HeldIndex::default() };
    for record in &log.records {
        index.records.push((record.header.offset, record.header.length as usize));
        index.data_pos.push(record.pos + volume_format::cache_log::RECORD_HEADER_BYTES as u64);
    }
    index.file = Some(file);
    Ok(index)
}

impl HeldIndex {
    /// The bytes of `spans` (parts of this index's records), one after the
    /// other. Blocking.
    pub fn read(&self, spans: &[super::replay::Span]) -> Result<Vec<u8>, StoreError> {
        use volume_format::cache_log::LogSource;
        let file = self.file.as_ref().ok_or_else(|| StoreError::Io {
            path: self.name.clone(),
            what: "read",
            source: std::io::Error::other("the mirror holds no records"),
        })?;
        let mut out = vec![0u8; spans.iter().map(|s| s.len).sum()];
        let mut at = 0;
        for span in spans {
            let (Some(pos), Some(&(_, len))) = (self.data_pos.get(span.record), self.records.get(span.record)) else {
                return Err(StoreError::Io {
                    path: self.name.clone(),
                    what: "read",
                    source: std::io::Error::other(format!("no record {} in the index", span.record)),
                });
            };
            if span.skip + span.len > len {
                return Err(StoreError::Io {
                    path: self.name.clone(),
                    what: "read",
                    source: std::io::Error::other(format!(
                        "bytes {}+{} past record {}",
                        span.skip, span.len, span.record
                    )),
                });
            }
            LogSource::read_at(file, pos + span.skip as u64, &mut out[at..at + span.len])
                .map_err(|source| StoreError::Io { path: self.name.clone(), what: "read", source })?;
            at += span.len;
        }
        Ok(out)
    }
}

/// Removes a volume's mirror file (the volume has no cache any more, or
/// was deleted); a missing file is fine.
pub fn remove(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, "remove")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held write: its volume offset and data.
    type HeldWrite = (u64, Vec<u8>);

    /// What a mirror file holds: its generation (`None`: a file of a release
    /// before generations, or never finished) and its records in order (what
    /// a replay writes; empty when there is no file or it holds none).
    #[derive(Debug, Default, PartialEq, Eq)]
    struct HeldMirror {
        generation: Option<u64>,
        records: Vec<HeldWrite>,
    }

    /// Reads what `volume`'s mirror file at `path` holds, data and all (nothing
    /// when there is no file), through [`read_index`] as a replay does.
    fn read_held(path: &Path, volume: VolumeId) -> Result<HeldMirror, StoreError> {
        let index = read_index(path, volume)?;
        let mut records = Vec::with_capacity(index.records.len());
        for (i, &(offset, len)) in index.records.iter().enumerate() {
            records.push((offset, index.read(&[super::super::replay::Span { record: i, skip: 0, len }])?));
        }
        Ok(HeldMirror { generation: index.generation, records })
    }

    const LOG_BYTES: u64 = 1 << 20;

    fn rec(seq: u64, offset: u64, fill: u8, len: usize) -> MirrorRecord {
        MirrorRecord { seq, offset, data: vec![fill; len] }
    }

    /// What a file of generation 7 holding `records` reads as.
    fn held(records: &[HeldWrite]) -> HeldMirror {
        HeldMirror { generation: Some(7), records: records.to_vec() }
    }

    #[test]
    fn the_file_carries_its_generation_and_a_new_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = mirror_path(dir.path(), VolumeId(2));
        assert_eq!(read_held(&path, VolumeId(2)).unwrap(), HeldMirror::default(), "no file: nothing, no generation");
        let mut m = VolumeMirror::create(&path, VolumeId(2), LOG_BYTES, 7).unwrap();
        m.append(&[rec(1, 0, 1, 4096)]).unwrap();
        assert_eq!(read_held(&path, VolumeId(2)).unwrap(), held(&[(0, vec![1; 4096])]));
        let m = VolumeMirror::create(&path, VolumeId(2), LOG_BYTES, 8).unwrap();
        assert_eq!(m.held_records(), 0);
        assert_eq!(read_held(&path, VolumeId(2)).unwrap(), HeldMirror { generation: Some(8), records: Vec::new() });
        // A damaged header reads as "no generation" (never as another one).
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xff], GENERATION_HEADER_POS + 20).unwrap();
        assert_eq!(read_held(&path, VolumeId(2)).unwrap().generation, None);
        assert_eq!(
            GenerationHeader::decode(&GenerationHeader { volume: VolumeId(2), generation: 9 }.encode()),
            Some(GenerationHeader { volume: VolumeId(2), generation: 9 })
        );
    }

    #[test]
    fn appended_records_read_back_in_order_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = mirror_path(dir.path(), VolumeId(3));
        let mut m = VolumeMirror::create(&path, VolumeId(3), LOG_BYTES, 7).unwrap();
        assert_eq!(read_held(&path, VolumeId(3)).unwrap(), held(&[]), "a fresh mirror holds nothing");
        assert_eq!(m.append(&[rec(1, 0, 1, 4096), rec(4, 8192, 2, 512)]).unwrap(), 2);
        assert_eq!(m.append(&[rec(9, 0, 3, 4096)]).unwrap(), 1);
        assert_eq!(m.held_bytes(), 4096 + 512 + 4096);
        let records = read_held(&path, VolumeId(3)).unwrap().records;
        assert_eq!(records, vec![(0, vec![1; 4096]), (8192, vec![2; 512]), (0, vec![3; 4096])]);
        m.release(4).unwrap();
        assert_eq!(read_held(&path, VolumeId(3)).unwrap(), held(&[(0, vec![3; 4096])]));
        m.release(9).unwrap();
        assert_eq!(read_held(&path, VolumeId(3)).unwrap(), held(&[]));
        assert_eq!(m.held_bytes(), 0);
        assert!(matches!(read_held(&path, VolumeId(4)), Err(StoreError::OtherVolume { .. })));
    }

    #[test]
    fn a_full_mirror_takes_what_fits_and_the_rest_after_a_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = mirror_path(dir.path(), VolumeId(1));
        let mut m = VolumeMirror::create(&path, VolumeId(1), LOG_BYTES, 7).unwrap();
        let big = 300 << 10;
        let records: Vec<MirrorRecord> = (1..=5).map(|i| rec(i, i * 4096, i as u8, big)).collect();
        let taken = m.append(&records).unwrap();
        assert!((1..5).contains(&taken), "{taken} of 5 fit in 1 MiB");
        assert_eq!(m.append(&records[taken..]).unwrap(), 0, "full: nothing is taken");
        m.release(taken as u64).unwrap();
        let more = m.append(&records[taken..]).unwrap();
        assert!(more > 0);
        // Wrapped around the ring: still read back in order.
        let read = read_held(&path, VolumeId(1)).unwrap().records;
        let expected: Vec<(u64, Vec<u8>)> =
            records[taken..taken + more].iter().map(|r| (r.offset, r.data.clone())).collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn out_of_order_and_oversized_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = mirror_path(dir.path(), VolumeId(1));
        let mut m = VolumeMirror::create(&path, VolumeId(1), LOG_BYTES, 7).unwrap();
        m.append(&[rec(5, 0, 1, 512)]).unwrap();
        assert!(matches!(m.append(&[rec(5, 0, 1, 512)]), Err(StoreError::OutOfOrder { seq: 5, last: 5 })));
        assert!(matches!(m.append(&[rec(6, 0, 1, 2 << 20)]), Err(StoreError::TooLarge { .. })));
        // Creating again empties it.
        let m = VolumeMirror::create(&path, VolumeId(1), LOG_BYTES, 7).unwrap();
        assert_eq!(m.held_records(), 0);
        assert_eq!(read_held(&path, VolumeId(1)).unwrap(), held(&[]));
    }
}
