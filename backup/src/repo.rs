//! The backup repository: a directory holding one **chain** of backups of
//! one volume — a full backup followed by zero or more incrementals, each
//! relative to the one before it.
//!
//! # Layout
//!
//! ```text
//! DIR/
//!   .lock                      flock(2)ed exclusively while a backup is written
//!   000001-full-s1/            one directory per backup: SEQUENCE-KIND-SNAPSHOT
//!     manifest.json
//!     index.bin
//!     data.bin
//!   000002-incr-s2/
//!     ...
//!   .tmp-UUID/                 a backup being written (never read; removed by the next writer)
//!   .old-UUID-000001-full-s0/  a chain being replaced by `full --force` (see below)
//! ```
//!
//! The directory name is only a label (the snapshot name is reduced to
//! `[A-Za-z0-9._-]`); the manifest is authoritative, and its sequence and
//! kind must agree with the name.
//!
//! # `manifest.json`
//!
//! A JSON object ([`Manifest`]): `format` (`"sanvol-backup/1"`), `id` (a
//! UUID), `sequence` (1 for the full backup, then 2, 3, …), `kind`
//! (`"full"` | `"incremental"`), `volume`, `snapshot`, `since` (the older
//! snapshot an incremental is relative to, else null), `parent` (the `id`
//! of the previous backup in the chain, else null), `size_bytes` (the
//! snapshot's size), `chunk_bytes` (65536), `data_chunks`, `zero_chunks`,
//! `data_bytes`, `index_entries`, `index_bytes`, `index_crc32c` (crc32c of
//! the whole `index.bin`), `bytes_read` (from the snapshot), `created_unix_secs`,
//! `created` (RFC 3339, UTC), `duration_ms`, `tool` (`sanvol-backup VERSION`)
//! and `manifest_crc32c`: the crc32c of the manifest serialized compactly (in
//! field order) with `manifest_crc32c` set to 0, so an edited manifest is
//! detected.
//!
//! # `index.bin`
//!
//! A 16-byte header — the magic `SVBKIDX1` and `chunk_bytes` as a
//! little-endian u64 — followed by 32-byte entries, little-endian, sorted by
//! chunk number, never overlapping:
//!
//! | bytes | field | data entry | zero entry |
//! |---|---|---|---|
//! | 0..8 | chunk | chunk number (offset / chunk_bytes) | first chunk of the run |
//! | 8..16 | offset | where the chunk's bytes start in `data.bin` | 0 |
//! | 16..20 | length | the chunk's length (chunk_bytes; the volume's last chunk may be shorter) | 0 |
//! | 20..24 | crc32c | crc32c of the chunk's bytes | 0 |
//! | 24..28 | count | 1 | chunks in the run (≥ 1) |
//! | 28 | kind | 0 = data | 1 = zero |
//! | 29..32 | reserved | 0 | 0 |
//!
//! A zero entry stands for a run of chunks that read as zeroes (holes, or
//! chunks that were all zero); restore writes zeroes there. A full backup
//! has an entry for every chunk of the volume; an incremental only for the
//! chunks written since its `since` snapshot (plus, if the volume grew,
//! every chunk from the old size on).
//!
//! # `data.bin`
//!
//! The data entries' bytes back to back, in chunk order: the first data
//! entry at offset 0, each next one right after the previous.
//!
//! # Crash safety
//!
//! A backup is written into `DIR/.tmp-UUID/`; its files are fsynced, the
//! manifest is written last, and only then is the directory renamed to its
//! final name (and `DIR` fsynced). An interrupted backup leaves only a
//! `.tmp-` directory, which nothing reads and the next backup removes.
//! `full --force` first writes the new full backup completely, then moves
//! the old chain away newest-first (so what remains is always a valid chain
//! prefix), renames the new backup in, and deletes the old chain. If that is
//! interrupted, the old backups are in `DIR/.old-*` and every later run
//! says so instead of deleting them.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Value of [`Manifest::format`] this version writes and reads.
pub const FORMAT: &str = "sanvol-backup/1";
/// The backup granularity: the snapshot chunk.
pub const CHUNK_BYTES: u64 = 64 * 1024;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const INDEX_FILE: &str = "index.bin";
pub const DATA_FILE: &str = "data.bin";
pub const LOCK_FILE: &str = ".lock";
pub const INDEX_MAGIC: [u8; 8] = *b"SVBKIDX1";
pub const INDEX_HEADER_BYTES: usize = 16;
pub const INDEX_ENTRY_BYTES: usize = 32;
const TMP_PREFIX: &str = ".tmp-";
const OLD_PREFIX: &str = ".old-";
/// Largest manifest accepted (they are a few hundred bytes).
const MANIFEST_BYTES_MAX: u64 = 1 << 20;

/// What the tool writes as [`Manifest::tool`].
pub fn tool_version() -> String {
    format!("sanvol-backup {}", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Incremental,
}

impl Kind {
    /// The word used in directory names.
    pub fn dir_word(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Incremental => "incr",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
        })
    }
}

/// One backup's `manifest.json` (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub id: String,
    pub sequence: u64,
    pub kind: Kind,
    pub volume: String,
    pub snapshot: String,
    pub since: Option<String>,
    pub parent: Option<String>,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub data_bytes: u64,
    pub index_entries: u64,
    pub index_bytes: u64,
    pub index_crc32c: u32,
    pub bytes_read: u64,
    pub created_unix_secs: u64,
    pub created: String,
    pub duration_ms: u64,
    pub tool: String,
    pub manifest_crc32c: u32,
}

impl Manifest {
    fn compute_crc(&self) -> u32 {
        let mut m = self.clone();
        m.manifest_crc32c = 0;
        crc32c::crc32c(&serde_json::to_vec(&m).unwrap_or_default())
    }

    /// Sets `manifest_crc32c`.
    pub fn seal(&mut self) {
        self.manifest_crc32c = self.compute_crc();
    }

    /// Chunks in the snapshot.
    pub fn chunks_total(&self) -> u64 {
        chunk_count(self.size_bytes, self.chunk_bytes)
    }

    /// `VOLUME@SNAPSHOT`.
    pub fn export(&self) -> String {
        volume_format::control::messages::snapshot_export_name(&self.volume, &self.snapshot)
    }

    /// Parses and checks a manifest's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("manifest.json is not valid: {e}"))?;
        if m.format != FORMAT {
            return Err(format!(
                "manifest.json has format {:?}; this sanvol-backup reads {FORMAT:?} (use the version that wrote it)",
                m.format
            ));
        }
        let crc = m.compute_crc();
        if crc != m.manifest_crc32c {
            return Err(format!(
                "manifest.json was altered or damaged: its checksum is {:#010x}, the content gives {crc:#010x}",
                m.manifest_crc32c
            ));
        }
        if m.chunk_bytes != CHUNK_BYTES {
            return Err(format!(
                "manifest.json says chunk_bytes {}; this version only knows {CHUNK_BYTES}",
                m.chunk_bytes
            ));
        }
        if m.sequence == 0 {
            return Err("manifest.json has sequence 0 (sequences start at 1)".into());
        }
        match (m.kind, &m.since, &m.parent) {
            (Kind::Full, None, None) | (Kind::Incremental, Some(_), Some(_)) => {}
            (Kind::Full, _, _) => return Err("manifest.json: a full backup with a `since` or `parent`".into()),
            (Kind::Incremental, _, _) => {
                return Err("manifest.json: an incremental backup without `since` and `parent`".into())
            }
        }
        if m.index_bytes != INDEX_HEADER_BYTES as u64 + m.index_entries.saturating_mul(INDEX_ENTRY_BYTES as u64) {
            return Err(format!(
                "manifest.json: index_bytes {} does not match {} index entries",
                m.index_bytes, m.index_entries
            ));
        }
        Ok(m)
    }
}

/// Chunks needed for `size` bytes.
pub fn chunk_count(size: u64, chunk_bytes: u64) -> u64 {
    size.div_ceil(chunk_bytes.max(1))
}

/// Length of chunk `chunk` of a `size`-byte volume.
pub fn chunk_len(chunk: u64, size: u64) -> u64 {
    let start = chunk.saturating_mul(CHUNK_BYTES);
    size.saturating_sub(start).min(CHUNK_BYTES)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Data,
    Zero,
}

/// One `index.bin` entry (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub chunk: u64,
    pub offset: u64,
    pub length: u32,
    pub crc32c: u32,
    pub count: u32,
    pub kind: EntryKind,
}

impl IndexEntry {
    pub fn encode(&self) -> [u8; INDEX_ENTRY_BYTES] {
        let mut b = [0u8; INDEX_ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.chunk.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.length.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc32c.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.to_le_bytes());
        b[28] = match self.kind {
            EntryKind::Data => 0,
            EntryKind::Zero => 1,
        };
        b
    }

    pub fn decode(b: &[u8]) -> Result<IndexEntry, String> {
        if b.len() != INDEX_ENTRY_BYTES {
            return Err(format!("index entry of {} bytes", b.len()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let kind = match b[28] {
            0 => EntryKind::Data,
            1 => EntryKind::Zero,
            k => return Err(format!("unknown entry kind {k}")),
        };
        if b[29..32] != [0, 0, 0] {
            return Err("reserved bytes are not zero".into());
        }
        Ok(IndexEntry {
            chunk: u64_at(0),
            offset: u64_at(8),
            length: u32_at(16),
            crc32c: u32_at(20),
            count: u32_at(24),
            kind,
        })
    }

    /// One past the last chunk this entry covers.
    pub fn end(&self) -> u64 {
        self.chunk.saturating_add(self.count as u64)
    }
}

/// Parses `index.bin` and checks it against its manifest: checksum, size,
/// order, ranges, data offsets, totals and coverage. `Err` names the first
/// inconsistency (with its chunk when there is one).
pub fn parse_index(bytes: &[u8], m: &Manifest) -> Result<Vec<IndexEntry>, (Option<u64>, String)> {
    if bytes.len() as u64 != m.index_bytes {
        return Err((None, format!("index.bin has {} bytes, the manifest says {}", bytes.len(), m.index_bytes)));
    }
    let crc = crc32c::crc32c(bytes);
    if crc != m.index_crc32c {
        return Err((
            None,
            format!(
                "index.bin is damaged or altered: its crc32c is {crc:#010x}, the manifest says {:#010x}",
                m.index_crc32c
            ),
        ));
    }
    if bytes.len() < INDEX_HEADER_BYTES || bytes[0..8] != INDEX_MAGIC {
        return Err((None, "index.bin does not start with the SVBKIDX1 magic".into()));
    }
    let chunk_bytes = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    if chunk_bytes != m.chunk_bytes {
        return Err((None, format!("index.bin says chunk_bytes {chunk_bytes}, the manifest {}", m.chunk_bytes)));
    }
    let body = &bytes[INDEX_HEADER_BYTES..];
    if !body.len().is_multiple_of(INDEX_ENTRY_BYTES) {
        return Err((None, "index.bin ends in a partial entry".into()));
    }
    let total = m.chunks_total();
    let mut entries = Vec::with_capacity(body.len() / INDEX_ENTRY_BYTES);
    let (mut next_chunk, mut data_offset, mut data_chunks, mut zero_chunks) = (0u64, 0u64, 0u64, 0u64);
    for raw in body.chunks_exact(INDEX_ENTRY_BYTES) {
        let e = IndexEntry::decode(raw).map_err(|w| (None, format!("index.bin entry {}: {w}", entries.len())))?;
        let at = Some(e.chunk);
        if e.chunk < next_chunk {
            return Err((at, "index entries out of order or overlapping".into()));
        }
        if e.count == 0 || e.end() > total {
            return Err((at, format!("index entry covers chunks past the snapshot's {total} chunks")));
        }
        match e.kind {
            EntryKind::Data => {
                let want = chunk_len(e.chunk, m.size_bytes);
                if e.count != 1 || e.length as u64 != want {
                    return Err((
                        at,
                        format!("data entry of {} bytes × {}, expected {want} bytes × 1", e.length, e.count),
                    ));
                }
                if e.offset != data_offset {
                    return Err((at, format!("data entry at data.bin offset {}, expected {data_offset}", e.offset)));
                }
                data_offset += e.length as u64;
                data_chunks += 1;
            }
            EntryKind::Zero => {
                if e.offset != 0 || e.length != 0 || e.crc32c != 0 {
                    return Err((at, "zero entry with an offset, length or checksum".into()));
                }
                zero_chunks += e.count as u64;
            }
        }
        next_chunk = e.end();
        entries.push(e);
    }
    if entries.len() as u64 != m.index_entries
        || data_chunks != m.data_chunks
        || zero_chunks != m.zero_chunks
        || data_offset != m.data_bytes
    {
        return Err((
            None,
            format!(
                "index.bin holds {} entries ({data_chunks} data, {zero_chunks} zero chunks, {data_offset} data bytes); \
                 the manifest says {} ({}, {}, {})",
                entries.len(),
                m.index_entries,
                m.data_chunks,
                m.zero_chunks,
                m.data_bytes
            ),
        ));
    }
    if m.kind == Kind::Full && data_chunks + zero_chunks != total {
        let missing = first_gap(&entries, 0, total);
        return Err((
            missing,
            format!("a full backup must cover all {total} chunks; it covers {}", data_chunks + zero_chunks),
        ));
    }
    Ok(entries)
}

/// The first chunk in `[from, to)` no entry covers.
pub fn first_gap(entries: &[IndexEntry], from: u64, to: u64) -> Option<u64> {
    let mut c = from;
    for e in entries {
        if e.end() <= c {
            continue;
        }
        if e.chunk > c {
            break;
        }
        c = e.end();
    }
    (c < to).then_some(c)
}

/// A directory entry that looks like a backup.
#[derive(Debug, Clone)]
pub struct BackupDir {
    pub name: String,
    pub path: PathBuf,
    pub sequence: u64,
    pub kind: Kind,
}

impl BackupDir {
    fn parse_name(name: &str) -> Option<(u64, Kind)> {
        let digits = name.get(0..6)?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let rest = name.get(6..)?;
        let kind = if rest.starts_with("-full-") {
            Kind::Full
        } else if rest.starts_with("-incr-") {
            Kind::Incremental
        } else {
            return None;
        };
        Some((digits.parse().ok()?, kind))
    }

    /// Reads and checks the manifest, and that it agrees with the name.
    pub fn load_manifest(&self) -> Result<Manifest, String> {
        let path = self.path.join(MANIFEST_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("manifest.json is missing (a damaged backup: it was deleted or never completed)".into())
            }
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        let len = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
        if len > MANIFEST_BYTES_MAX {
            return Err(format!("manifest.json is {len} bytes: not a manifest"));
        }
        let bytes = fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let m = Manifest::parse(&bytes)?;
        if m.sequence != self.sequence || m.kind != self.kind {
            return Err(format!(
                "manifest.json says backup #{} ({}), the directory name says #{} ({})",
                m.sequence, m.kind, self.sequence, self.kind
            ));
        }
        Ok(m)
    }
}

/// What a repository directory holds.
#[derive(Debug, Default)]
pub struct Scan {
    /// Backup directories, by sequence.
    pub backups: Vec<BackupDir>,
    /// Other things found (leftovers, foreign files), for warnings.
    pub leftovers: Vec<String>,
    /// `.old-*` directories: a chain replacement was interrupted.
    pub old_chains: Vec<String>,
}

/// A repository directory.
pub struct Repo {
    pub dir: PathBuf,
    _lock: Option<File>,
}

impl Repo {
    /// Opens `dir` to read it (no lock: readers only ever see complete
    /// backups). The directory must exist.
    pub fn open_read(dir: &Path) -> Result<Repo> {
        let meta = fs::metadata(dir)
            .with_context(|| format!("cannot open backup repository {}: is the path right?", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory (a backup repository is a directory)", dir.display());
        }
        Ok(Repo { dir: dir.to_path_buf(), _lock: None })
    }

    /// Opens `dir` to add backups: creates it if `create`, takes the
    /// exclusive lock and removes stale `.tmp-` directories.
    pub fn open_write(dir: &Path, create: bool) -> Result<Repo> {
        if create {
            fs::create_dir_all(dir).with_context(|| format!("creating backup repository {}", dir.display()))?;
        }
        let repo = Repo::open_read(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).with_context(|| {
                format!("creating the lock file {} (is the directory writable?)", lock_path.display())
            })?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another sanvol-backup is writing into {} (it holds {}); wait for it to finish",
                    dir.display(),
                    lock_path.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", lock_path.display()));
        }
        let repo = Repo { _lock: Some(lock), ..repo };
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                tracing::info!(dir = %entry.path().display(), "removing an interrupted backup");
                fs::remove_dir_all(entry.path()).with_context(|| {
                    format!("removing the interrupted backup {} (remove it by hand)", entry.path().display())
                })?;
            }
        }
        Ok(repo)
    }

    /// Lists the repository.
    pub fn scan(&self) -> Result<Scan> {
        scan_dir(&self.dir)
    }

    /// Starts writing a backup of a `size_bytes` snapshot.
    pub fn stage(&self, size_bytes: u64) -> Result<Staging> {
        Staging::create(&self.dir, size_bytes)
    }

    /// Moves a complete staged backup into place. With `replace`, the
    /// existing chain is moved away first (newest first) and deleted after.
    pub fn commit(&self, staged: Staged, replace: &[BackupDir]) -> Result<PathBuf> {
        let final_name = format!(
            "{:06}-{}-{}",
            staged.manifest.sequence,
            staged.manifest.kind.dir_word(),
            sanitize(&staged.manifest.snapshot)
        );
        let final_path = self.dir.join(&final_name);
        let mut moved = Vec::new();
        let mut by_seq: Vec<&BackupDir> = replace.iter().collect();
        by_seq.sort_by_key(|b| std::cmp::Reverse(b.sequence));
        for old in by_seq {
            let to = self.dir.join(format!("{OLD_PREFIX}{}-{}", staged.manifest.id, old.name));
            fs::rename(&old.path, &to)
                .with_context(|| format!("moving the old backup {} out of the way", old.path.display()))?;
            moved.push(to);
        }
        if final_path.exists() {
            bail!(
                "{} already exists; the repository changed under us (is another tool writing into it?)",
                final_path.display()
            );
        }
        fs::rename(&staged.path, &final_path).with_context(|| {
            format!("moving the finished backup {} to {}", staged.path.display(), final_path.display())
        })?;
        sync_dir(&self.dir)?;
        for old in moved {
            if let Err(e) = fs::remove_dir_all(&old) {
                tracing::warn!("could not delete the replaced backup {}: {e}; delete it by hand", old.display());
            }
        }
        Ok(final_path)
    }
}

/// Lists a repository directory: backups by sequence, leftovers.
pub fn scan_dir(dir: &Path) -> Result<Scan> {
    let mut scan = Scan::default();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LOCK_FILE || name.starts_with(TMP_PREFIX) {
            continue;
        }
        if name.starts_with(OLD_PREFIX) {
            scan.old_chains.push(name);
            continue;
        }
        match BackupDir::parse_name(&name) {
            Some((sequence, kind)) if entry.path().is_dir() => {
                scan.backups.push(BackupDir { name, path: entry.path(), sequence, kind })
            }
            _ => scan.leftovers.push(name),
        }
    }
    scan.backups.sort_by(|a, b| a.sequence.cmp(&b.sequence).then_with(|| a.name.cmp(&b.name)));
    scan.old_chains.sort();
    scan.leftovers.sort();
    for old in &scan.old_chains {
        tracing::warn!(
            "{} holds {old}, left by an interrupted `full --force`: those are the previous chain's backups; \
             delete it if the current chain is what you want",
            dir.display()
        );
    }
    Ok(scan)
}

/// A snapshot name made safe for a directory name.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(64)
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing directory {}", dir.display()))
}

/// Whether `buf` is all zero bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// A backup being written (in `DIR/.tmp-UUID/`). Chunks must be added in
/// increasing order. Dropped unfinished, it removes its directory.
pub struct Staging {
    pub path: PathBuf,
    /// Written in runs straight from the read buffers (no extra copy).
    data: File,
    /// Bytes of `data.bin` written, and up to where writeback was started.
    data_written: u64,
    writeback_started: u64,
    index: BufWriter<File>,
    index_crc: u32,
    index_bytes: u64,
    entries: u64,
    data_offset: u64,
    data_chunks: u64,
    zero_chunks: u64,
    pending_zero: Option<(u64, u32)>,
    next_chunk: u64,
    size_bytes: u64,
    finished: bool,
}

/// A complete backup, not yet in place.
pub struct Staged {
    pub path: PathBuf,
    pub manifest: Manifest,
}

const INDEX_BUFFER_BYTES: usize = 256 << 10;
/// Every this many bytes of data, writeback of what was written is started
/// (so the final fsync does not have the whole backup to write).
const WRITEBACK_BYTES: u64 = 64 << 20;

impl Staging {
    fn create(dir: &Path, size_bytes: u64) -> Result<Staging> {
        let path = dir.join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let open = |name: &str| {
            let p = path.join(name);
            File::create(&p).with_context(|| format!("creating {}", p.display()))
        };
        let (data, index) = match (open(DATA_FILE), open(INDEX_FILE)) {
            (Ok(d), Ok(i)) => (d, i),
            (Err(e), _) | (_, Err(e)) => {
                let _ = fs::remove_dir_all(&path);
                return Err(e);
            }
        };
        let mut s = Staging {
            path,
            data,
            data_written: 0,
            writeback_started: 0,
            index: BufWriter::with_capacity(INDEX_BUFFER_BYTES, index),
            index_crc: 0,
            index_bytes: 0,
            entries: 0,
            data_offset: 0,
            data_chunks: 0,
            zero_chunks: 0,
            pending_zero: None,
            next_chunk: 0,
            size_bytes,
            finished: false,
        };
        let mut header = [0u8; INDEX_HEADER_BYTES];
        header[0..8].copy_from_slice(&INDEX_MAGIC);
        header[8..16].copy_from_slice(&CHUNK_BYTES.to_le_bytes());
        s.write_index(&header)?;
        Ok(s)
    }

    fn write_index(&mut self, bytes: &[u8]) -> Result<()> {
        self.index.write_all(bytes).with_context(|| format!("writing {}", self.path.join(INDEX_FILE).display()))?;
        self.index_crc = crc32c::crc32c_append(self.index_crc, bytes);
        self.index_bytes += bytes.len() as u64;
        Ok(())
    }

    fn push_entry(&mut self, e: IndexEntry) -> Result<()> {
        self.write_index(&e.encode())?;
        self.entries += 1;
        Ok(())
    }

    fn check_order(&mut self, chunk: u64, count: u64) -> Result<()> {
        let total = chunk_count(self.size_bytes, CHUNK_BYTES);
        if chunk < self.next_chunk || chunk + count > total {
            bail!("internal: chunk {chunk} (+{count}) added out of order or past the end ({total} chunks)");
        }
        self.next_chunk = chunk + count;
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<()> {
        if let Some((chunk, count)) = self.pending_zero.take() {
            self.push_entry(IndexEntry { chunk, offset: 0, length: 0, crc32c: 0, count, kind: EntryKind::Zero })?;
            self.zero_chunks += count as u64;
        }
        Ok(())
    }

    /// Records `count` chunks from `chunk` on as zero.
    pub fn add_zero(&mut self, chunk: u64, count: u64) -> Result<()> {
        self.check_order(chunk, count)?;
        let (mut chunk, mut count) = (chunk, count);
        while count > 0 {
            match &mut self.pending_zero {
                Some((first, n)) if *first + *n as u64 == chunk && *n < u32::MAX => {
                    let take = count.min((u32::MAX - *n) as u64);
                    *n += take as u32;
                    chunk += take;
                    count -= take;
                }
                _ => {
                    self.flush_zero()?;
                    let take = count.min(u32::MAX as u64);
                    self.pending_zero = Some((chunk, take as u32));
                    chunk += take;
                    count -= take;
                }
            }
        }
        Ok(())
    }

    fn write_data(&mut self, bytes: &[u8]) -> Result<()> {
        self.data.write_all(bytes).with_context(|| format!("writing {}", self.path.join(DATA_FILE).display()))?;
        self.data_written += bytes.len() as u64;
        if self.data_written - self.writeback_started >= WRITEBACK_BYTES {
            #[cfg(target_os = "linux")]
            // SAFETY: a hint on a file descriptor we own; no memory is involved.
            unsafe {
                libc::sync_file_range(
                    self.data.as_raw_fd(),
                    self.writeback_started as libc::off64_t,
                    (self.data_written - self.writeback_started) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.writeback_started = self.data_written;
        }
        Ok(())
    }

    /// Records consecutive chunks from `first` on, whose bytes are `bytes`
    /// (the last chunk of the volume may be short). All-zero chunks become
    /// zero entries; runs of the others are written to the data file in one
    /// go. Returns how many were stored as data.
    pub fn add_chunks(&mut self, first: u64, bytes: &[u8]) -> Result<u64> {
        let (mut at, mut chunk, mut stored) = (0usize, first, 0u64);
        // The run of data chunks not yet written: bytes[run..at].
        let mut run = 0usize;
        while at < bytes.len() {
            let len = chunk_len(chunk, self.size_bytes) as usize;
            let Some(piece) = bytes.get(at..at + len).filter(|_| len > 0) else {
                bail!("internal: {} bytes from chunk {first} do not end at a chunk boundary", bytes.len());
            };
            if is_zero(piece) {
                if run < at {
                    self.write_data(&bytes[run..at])?;
                }
                self.add_zero(chunk, 1)?;
                run = at + len;
            } else {
                self.check_order(chunk, 1)?;
                self.flush_zero()?;
                let e = IndexEntry {
                    chunk,
                    offset: self.data_offset,
                    length: len as u32,
                    crc32c: crc32c::crc32c(piece),
                    count: 1,
                    kind: EntryKind::Data,
                };
                self.push_entry(e)?;
                self.data_offset += len as u64;
                self.data_chunks += 1;
                stored += 1;
            }
            at += len;
            chunk += 1;
        }
        if run < at {
            self.write_data(&bytes[run..at])?;
        }
        Ok(stored)
    }

    /// Makes the files durable and writes the manifest: `m`'s statistics
    /// and checksums are filled in here.
    pub fn finish(mut self, mut m: Manifest) -> Result<Staged> {
        self.flush_zero()?;
        let ctx = |what: &str| format!("finishing {} in {}", what, self.path.display());
        self.data.sync_all().with_context(|| ctx(DATA_FILE))?;
        self.index.flush().with_context(|| ctx(INDEX_FILE))?;
        self.index.get_ref().sync_all().with_context(|| ctx(INDEX_FILE))?;
        m.format = FORMAT.to_string();
        m.size_bytes = self.size_bytes;
        m.chunk_bytes = CHUNK_BYTES;
        m.data_chunks = self.data_chunks;
        m.zero_chunks = self.zero_chunks;
        m.data_bytes = self.data_offset;
        m.index_entries = self.entries;
        m.index_bytes = self.index_bytes;
        m.index_crc32c = self.index_crc;
        m.tool = tool_version();
        m.seal();
        let json = serde_json::to_vec_pretty(&m).map_err(|e| anyhow!("encoding the manifest: {e}"))?;
        let mpath = self.path.join(MANIFEST_FILE);
        let mut f = File::create(&mpath).with_context(|| format!("creating {}", mpath.display()))?;
        f.write_all(&json)
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .with_context(|| ctx(MANIFEST_FILE))?;
        sync_dir(&self.path)?;
        self.finished = true;
        Ok(Staged { path: self.path.clone(), manifest: m })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// `secs` since the epoch as RFC 3339 UTC (`2024-05-01T12:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Now, in seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            id: "id".into(),
            sequence: 1,
            kind: Kind::Full,
            volume: "v".into(),
            snapshot: "s".into(),
            since: None,
            parent: None,
            size_bytes: 0,
            chunk_bytes: CHUNK_BYTES,
            data_chunks: 0,
            zero_chunks: 0,
            data_bytes: 0,
            index_entries: 0,
            index_bytes: INDEX_HEADER_BYTES as u64,
            index_crc32c: 0,
            bytes_read: 0,
            created_unix_secs: 0,
            created: String::new(),
            duration_ms: 0,
            tool: String::new(),
            manifest_crc32c: 0,
        }
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn entry_round_trip_and_bad_kind() {
        let e = IndexEntry { chunk: 7, offset: 99, length: 65536, crc32c: 5, count: 1, kind: EntryKind::Data };
        assert_eq!(IndexEntry::decode(&e.encode()).unwrap(), e);
        let mut b = e.encode();
        b[28] = 9;
        assert!(IndexEntry::decode(&b).is_err());
    }

    #[test]
    fn manifest_checksum_catches_edits_and_garbage() {
        let mut m = manifest();
        m.seal();
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::parse(&json).unwrap(), m);
        let edited = String::from_utf8(json).unwrap().replace("\"snapshot\":\"s\"", "\"snapshot\":\"t\"");
        assert!(Manifest::parse(edited.as_bytes()).unwrap_err().contains("altered"));
        assert!(Manifest::parse(b"{").is_err());
        assert!(Manifest::parse(b"").is_err());
        assert!(Manifest::parse(&[0xff; 40]).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        assert!(is_zero(&[]));
        let mut b = vec![0u8; 1000];
        b[999] = 1;
        assert!(!is_zero(&b));
        b[999] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn names_and_gaps() {
        assert_eq!(BackupDir::parse_name("000012-incr-s2"), Some((12, Kind::Incremental)));
        assert_eq!(BackupDir::parse_name("000001-full-x"), Some((1, Kind::Full)));
        assert_eq!(BackupDir::parse_name("00001-full-x"), None);
        assert_eq!(BackupDir::parse_name("000001-part-x"), None);
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(".."), "_..");
        let z = |chunk, count| IndexEntry { chunk, offset: 0, length: 0, crc32c: 0, count, kind: EntryKind::Zero };
        assert_eq!(first_gap(&[z(0, 2), z(2, 3)], 0, 5), None);
        assert_eq!(first_gap(&[z(0, 2), z(3, 2)], 0, 5), Some(2));
        assert_eq!(first_gap(&[z(0, 2)], 0, 5), Some(2));
    }
}
