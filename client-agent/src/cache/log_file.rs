//! The cache log's file I/O: create a fresh log, read an old one back and
//! replay it, append a batch, move the tail. Blocking calls (positional
//! writes and `fdatasync`), run by the cache's tasks on tokio's blocking
//! pool.
//!
//! Why a fresh log after every open: the old log is replayed to the devices
//! first, so nothing in it is needed any more; a new log id makes every old
//! record unreadable as part of the new chain, so stale records from before
//! a crash can never be mistaken for new ones.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use volume_format::cache_log::{scan, Batch, LogAppender, ScanError, ScannedLog, Superblock, DATA_START_BYTES};
use volume_format::VolumeId;

use tracing::warn;

use super::CacheError;

/// Memory alignment of direct writes (enough for 4 KiB-sector devices).
const DIRECT_ALIGN_BYTES: usize = 4096;

/// Zeroes written at once when a new log file is preallocated.
const FILL_CHUNK_BYTES: usize = 1 << 20;

pub struct LogFile {
    pub path: PathBuf,
    pub file: File,
    /// The same file opened `O_DIRECT | O_DSYNC` for appends, where the
    /// file system allows it. Why: one synchronous direct write costs about
    /// half of a buffered write + `fdatasync` on a preallocated file (measured
    /// on the build host: 4k at QD1, 215 µs vs 457 µs), and the append is on
    /// every cached write's path.
    direct: Option<File>,
    direct_ok: AtomicBool,
}

impl LogFile {
    fn io(&self, what: &str, e: std::io::Error) -> CacheError {
        CacheError::Io { path: self.path.display().to_string(), what: what.to_string(), message: e.to_string() }
    }

    /// Opens (or creates) the log file; `None` in the scan when the file is
    /// new or empty (nothing to replay).
    pub fn open(path: &Path) -> Result<(LogFile, bool), CacheError> {
        let existed = path.metadata().map(|m| m.len() > 0).unwrap_or(false);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(|e| {
            CacheError::Io { path: path.display().to_string(), what: "open".into(), message: e.to_string() }
        })?;
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path).ok();
        let direct_ok = AtomicBool::new(direct.is_some());
        Ok((LogFile { path: path.to_path_buf(), file, direct, direct_ok }, existed))
    }

    /// Reads the old log back (see [`volume_format::cache_log::scan`]).
    pub fn scan(&self, volume: VolumeId) -> Result<ScannedLog, CacheError> {
        let path = self.path.display().to_string();
        let log = scan(&self.file, &path).map_err(CacheError::Log)?;
        if log.superblock.volume != volume {
            return Err(CacheError::OtherVolume { path, found: log.superblock.volume, expected: volume });
        }
        Ok(log)
    }

    /// Reads one scanned record's data, checked again.
    pub fn read_record(&self, record: &volume_format::cache_log::ScannedRecord) -> Result<Vec<u8>, ScanError> {
        volume_format::cache_log::read_record(&self.file, &self.path.display().to_string(), record)
    }

    /// Makes the file an empty log of `log_bytes` with a new log id.
    pub fn create(&self, volume: VolumeId, log_bytes: u64) -> Result<LogAppender, CacheError> {
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).map_err(|e| self.io("pick a log id", std::io::Error::other(e.to_string())))?;
        let appender = LogAppender::create(u64::from_be_bytes(id), volume, log_bytes);
        self.fill_to(log_bytes)?;
        for superblock in appender.initial_superblocks() {
            self.file.write_all_at(&superblock.encode(), superblock.slot_offset()).map_err(|e| self.io("write", e))?;
        }
        self.sync()?;
        debug_assert!(log_bytes > DATA_START_BYTES);
        Ok(appender)
    }

    /// Writes zeroes up to `log_bytes` where the file is shorter (and cuts
    /// it where it is longer). Why write rather than `set_len`: an append
    /// into a hole or an unwritten extent makes every `fdatasync` commit
    /// file-system metadata too; a written file syncs only its data.
    fn fill_to(&self, log_bytes: u64) -> Result<(), CacheError> {
        let len = self.file.metadata().map_err(|e| self.io("stat", e))?.len();
        if len > log_bytes {
            self.file.set_len(log_bytes).map_err(|e| self.io("size", e))?;
        }
        let zeroes = vec![0u8; FILL_CHUNK_BYTES];
        let mut at = len;
        while at < log_bytes {
            let n = (log_bytes - at).min(FILL_CHUNK_BYTES as u64) as usize;
            self.file.write_all_at(&zeroes[..n], at).map_err(|e| self.io("preallocate", e))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Writes `bytes` at `pos` with a direct synchronous write; `Ok(false)`
    /// when direct I/O is not possible here (the caller writes buffered and
    /// syncs). Positions and lengths are multiples of 512 by the log format;
    /// the memory is aligned here.
    fn write_direct(&self, pos: u64, bytes: &[u8]) -> Result<bool, CacheError> {
        let Some(direct) = self.direct.as_ref().filter(|_| self.direct_ok.load(Ordering::Relaxed)) else {
            return Ok(false);
        };
        let mut buffer = vec![0u8; bytes.len() + DIRECT_ALIGN_BYTES];
        let start = buffer.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
        buffer[start..start + bytes.len()].copy_from_slice(bytes);
        match direct.write_all_at(&buffer[start..start + bytes.len()], pos) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // A device with bigger sectors than the log's 512-byte
                // alignment: buffered writes and fdatasync from now on.
                warn!(log = %self.path.display(), "direct writes refused ({e}); using buffered writes and fdatasync");
                self.direct_ok.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(self.io("append", e)),
        }
    }

    /// Writes `regions` durably (direct synchronous writes, or buffered
    /// writes and one fdatasync).
    fn write_durable<'a>(&self, regions: impl Iterator<Item = (u64, &'a [u8])> + Clone) -> Result<(), CacheError> {
        let mut direct = true;
        for (pos, bytes) in regions.clone() {
            if !self.write_direct(pos, bytes)? {
                direct = false;
                break;
            }
        }
        if direct {
            return Ok(());
        }
        for (pos, bytes) in regions {
            self.file.write_all_at(bytes, pos).map_err(|e| self.io("append", e))?;
        }
        self.sync()
    }

    /// Appends a batch durably.
    pub fn append(&self, batch: &Batch) -> Result<(), CacheError> {
        self.write_durable(batch.regions.iter().map(|region| (region.pos, region.bytes.as_slice())))
    }

    /// Writes a superblock durably.
    pub fn write_superblock(&self, superblock: &Superblock) -> Result<(), CacheError> {
        let slot = superblock.encode();
        self.write_durable(std::iter::once((superblock.slot_offset(), &slot[..])))
    }

    pub fn sync(&self) -> Result<(), CacheError> {
        self.file.sync_data().map_err(|e| self.io("fdatasync", e))
    }
}
