//! Checking a chain: its structure (a full backup, then incrementals each
//! continuing the one before), every manifest and index (checksums, sizes,
//! order, coverage) and, at [`Depth::Data`], every data chunk's crc32c.
//!
//! Damage is reported as [`Problem`]s naming the backup (its directory) and,
//! where it applies, the chunk; nothing here panics or gives up on bad
//! bytes. `restore` runs the same check at `Depth::Data` before it writes
//! anything.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::Path;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::progress::{Progress, ProgressMode};
use crate::repo::{
    first_gap, parse_index, scan_dir, BackupDir, EntryKind, IndexEntry, Kind, Manifest, CHUNK_BYTES, DATA_FILE,
    INDEX_FILE,
};

/// Most chunk problems reported one by one per backup (the rest are counted).
const CHUNK_PROBLEMS_SHOWN: usize = 20;

/// `1 problem`, `3 problems`.
pub fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// One thing wrong with the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The backup's directory name, if the problem is in one backup.
    pub backup: Option<String>,
    /// The chunk (offset / 64 KiB), if the problem is in one chunk.
    pub chunk: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(b) = &self.backup {
            write!(f, "backup {b}: ")?;
        }
        if let Some(c) = self.chunk {
            write!(f, "chunk {c} (offset {}): ", c * CHUNK_BYTES)?;
        }
        f.write_str(&self.message)
    }
}

fn problem(backup: &BackupDir, chunk: Option<u64>, message: impl Into<String>) -> Problem {
    Problem { backup: Some(backup.name.clone()), chunk, message: message.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Manifests, indexes, file sizes and the chain: reads no data.
    Structure,
    /// Also every data chunk's checksum.
    Data,
}

/// A backup whose manifest and index check out.
#[derive(Debug, Clone)]
pub struct Checked {
    pub dir: BackupDir,
    pub manifest: Manifest,
    pub entries: Vec<IndexEntry>,
}

/// One backup's line in a verify report.
#[derive(Debug, Clone, Serialize)]
pub struct BackupStatus {
    pub dir: String,
    pub kind: Kind,
    pub export: Option<String>,
    pub ok: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    /// Every backup looked at, in chain order (after `--upto`).
    pub statuses: Vec<BackupStatus>,
    /// The backups that check out (all of them if `problems` is empty).
    pub backups: Vec<Checked>,
    pub problems: Vec<Problem>,
    pub data_chunks_checked: u64,
    pub data_bytes_checked: u64,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.backups.len() == self.statuses.len()
    }
}

/// Checks the chain in `dir` up to (and including) the newest backup of
/// snapshot `upto`, or the whole chain. `Err` means the check could not run
/// (no backups, no such snapshot, unreadable directory); damage is in the
/// report's problems.
pub fn check(dir: &Path, upto: Option<&str>, depth: Depth, mode: ProgressMode) -> Result<Report> {
    let scan = scan_dir(dir)?;
    if scan.backups.is_empty() {
        bail!("{} holds no backups (start a chain with `sanvol-backup full VOLUME@SNAP --to DIR`)", dir.display());
    }
    let mut loaded: Vec<(BackupDir, Result<Manifest, String>)> =
        scan.backups.into_iter().map(|b| (b.clone(), b.load_manifest())).collect();
    if let Some(upto) = upto {
        let Some(last) = loaded.iter().rposition(|(_, m)| m.as_ref().is_ok_and(|m| m.snapshot == upto)) else {
            let names: Vec<String> =
                loaded.iter().filter_map(|(_, m)| m.as_ref().ok().map(|m| m.snapshot.clone())).collect();
            bail!(
                "{} holds no readable backup of snapshot {upto:?} (it has: {}); run `sanvol-backup list` to see the chain",
                dir.display(),
                if names.is_empty() { "none readable".to_string() } else { names.join(", ") }
            );
        };
        loaded.truncate(last + 1);
    }

    let mut report = Report::default();
    for (b, m) in &loaded {
        report.statuses.push(BackupStatus {
            dir: b.name.clone(),
            kind: b.kind,
            export: m.as_ref().ok().map(|m| m.export()),
            ok: true,
        });
        if let Err(e) = m {
            report.problems.push(problem(b, None, e.clone()));
        }
    }
    check_chain(&loaded, &mut report.problems);

    let total: u64 = loaded.iter().filter_map(|(_, m)| m.as_ref().ok()).map(|m| m.data_bytes).sum();
    let progress = (depth == Depth::Data).then(|| Progress::new(mode, format!("verify {}", dir.display()), total));
    for (i, (b, m)) in loaded.iter().enumerate() {
        let Ok(m) = m else { continue };
        let entries = match read_index(b, m) {
            Ok(e) => e,
            Err(p) => {
                report.problems.push(p);
                continue;
            }
        };
        let before = report.problems.len();
        // A grown volume: the incremental must hold every chunk from the old end on.
        if let (Kind::Incremental, Some((_, Ok(prev)))) = (m.kind, i.checked_sub(1).and_then(|p| loaded.get(p))) {
            let from = prev.size_bytes / CHUNK_BYTES;
            if m.size_bytes > prev.size_bytes {
                if let Some(c) = first_gap(&entries, from, m.chunks_total()) {
                    report.problems.push(problem(
                        b,
                        Some(c),
                        format!(
                            "the volume grew from {} to {} bytes, but this chunk of the new part is not in the backup",
                            prev.size_bytes, m.size_bytes
                        ),
                    ));
                }
            }
        }
        check_data(b, m, &entries, depth, progress.as_ref(), &mut report);
        if report.problems.len() == before {
            report.backups.push(Checked { dir: b.clone(), manifest: m.clone(), entries });
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    for s in &mut report.statuses {
        s.ok = !report.problems.iter().any(|p| p.backup.as_deref() == Some(&s.dir));
    }
    Ok(report)
}

/// Sequence, kinds and links between neighbours.
fn check_chain(loaded: &[(BackupDir, Result<Manifest, String>)], problems: &mut Vec<Problem>) {
    for (i, (b, m)) in loaded.iter().enumerate() {
        let want = i as u64 + 1;
        if b.sequence != want {
            let message = if b.sequence < want {
                format!("a second backup numbered {} (only one may have each number)", b.sequence)
            } else {
                format!("backup #{want} is missing from the chain (the next one found is #{})", b.sequence)
            };
            problems.push(problem(b, None, message));
        }
        let want_kind = if i == 0 { Kind::Full } else { Kind::Incremental };
        if b.kind != want_kind {
            let message = if i == 0 {
                "the chain does not start with a full backup".to_string()
            } else {
                "a full backup in the middle of the chain (a full backup starts a new chain in its own directory)"
                    .to_string()
            };
            problems.push(problem(b, None, message));
        }
        let (Ok(m), Some((_, Ok(prev)))) = (m, i.checked_sub(1).and_then(|p| loaded.get(p))) else { continue };
        if m.volume != prev.volume {
            problems.push(problem(b, None, format!("is of volume {}, the chain of volume {}", m.volume, prev.volume)));
        }
        if m.since.as_deref() != Some(prev.snapshot.as_str()) {
            problems.push(problem(
                b,
                None,
                format!(
                    "holds the changes since snapshot {:?}, but the backup before it is of snapshot {:?}",
                    m.since.as_deref().unwrap_or(""),
                    prev.snapshot
                ),
            ));
        }
        if m.parent.as_deref() != Some(prev.id.as_str()) {
            problems.push(problem(
                b,
                None,
                format!("was made on top of backup {:?}, not on the backup before it ({})", m.parent, prev.id),
            ));
        }
        if m.size_bytes < prev.size_bytes {
            problems.push(problem(
                b,
                None,
                format!(
                    "the volume shrank from {} to {} bytes, which a chain cannot express",
                    prev.size_bytes, m.size_bytes
                ),
            ));
        }
    }
}

fn read_index(b: &BackupDir, m: &Manifest) -> Result<Vec<IndexEntry>, Problem> {
    let path = b.path.join(INDEX_FILE);
    let mut f = File::open(&path).map_err(|e| problem(b, None, format!("cannot open {INDEX_FILE}: {e}")))?;
    let len = f.metadata().map_err(|e| problem(b, None, format!("{INDEX_FILE}: {e}")))?.len();
    if len != m.index_bytes {
        return Err(problem(
            b,
            None,
            format!("{INDEX_FILE} has {len} bytes, the manifest says {} (truncated or altered)", m.index_bytes),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes).map_err(|e| problem(b, None, format!("reading {INDEX_FILE}: {e}")))?;
    parse_index(&bytes, m).map_err(|(chunk, message)| problem(b, chunk, message))
}

fn check_data(b: &BackupDir, m: &Manifest, entries: &[IndexEntry], depth: Depth, p: Option<&Progress>, r: &mut Report) {
    let path = b.path.join(DATA_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return r.problems.push(problem(b, None, format!("cannot open {DATA_FILE}: {e}"))),
    };
    let len = match file.metadata() {
        Ok(md) => md.len(),
        Err(e) => return r.problems.push(problem(b, None, format!("{DATA_FILE}: {e}"))),
    };
    if len != m.data_bytes {
        let what = if len < m.data_bytes { "truncated" } else { "has extra bytes" };
        r.problems.push(problem(
            b,
            None,
            format!("{DATA_FILE} is {what}: {len} bytes, the index holds {} bytes of chunks", m.data_bytes),
        ));
    }
    if depth == Depth::Structure {
        if len < m.data_bytes {
            if let Some(e) = entries.iter().find(|e| e.kind == EntryKind::Data && e.offset + e.length as u64 > len) {
                r.problems.push(problem(
                    b,
                    Some(e.chunk),
                    format!("this and later chunks are past the end of {DATA_FILE}"),
                ));
            }
        }
        return;
    }
    let mut rd = BufReader::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    let mut bad = 0usize;
    let data: Vec<&IndexEntry> = entries.iter().filter(|e| e.kind == EntryKind::Data).collect();
    for (i, e) in data.iter().enumerate() {
        let chunk = &mut buf[..e.length as usize];
        match rd.read_exact(chunk) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::UnexpectedEof => {
                r.problems.push(problem(
                    b,
                    Some(e.chunk),
                    format!(
                        "{DATA_FILE} ends inside this chunk: it and {} later data chunks are missing",
                        data.len() - i - 1
                    ),
                ));
                return;
            }
            Err(err) => {
                r.problems.push(problem(b, Some(e.chunk), format!("reading {DATA_FILE}: {err}")));
                return;
            }
        }
        let crc = crc32c::crc32c(chunk);
        if crc != e.crc32c {
            bad += 1;
            if bad <= CHUNK_PROBLEMS_SHOWN {
                r.problems.push(problem(
                    b,
                    Some(e.chunk),
                    format!(
                        "damaged data: crc32c {crc:#010x}, the index says {:#010x} (data.bin offset {})",
                        e.crc32c, e.offset
                    ),
                ));
            }
        }
        r.data_chunks_checked += 1;
        r.data_bytes_checked += e.length as u64;
        if let Some(p) = p {
            p.add(e.length as u64, 1);
        }
    }
    if bad > CHUNK_PROBLEMS_SHOWN {
        r.problems.push(problem(b, None, format!("{} more damaged chunks not listed", bad - CHUNK_PROBLEMS_SHOWN)));
    }
}
