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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use volume_format::cache_log::{scan, Batch, LogAppender, ScanError, ScannedLog, Superblock, DATA_START_BYTES};
use volume_format::VolumeId;

use super::CacheError;

pub struct LogFile {
    pub path: PathBuf,
    pub file: File,
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
        Ok((LogFile { path: path.to_path_buf(), file }, existed))
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
        self.file.set_len(log_bytes).map_err(|e| self.io("size", e))?;
        for superblock in appender.initial_superblocks() {
            self.file.write_all_at(&superblock.encode(), superblock.slot_offset()).map_err(|e| self.io("write", e))?;
        }
        self.sync()?;
        debug_assert!(log_bytes > DATA_START_BYTES);
        Ok(appender)
    }

    /// Writes a batch's regions (no sync: see [`LogFile::sync`]).
    pub fn write_batch(&self, batch: &Batch) -> Result<(), CacheError> {
        for region in &batch.regions {
            self.file.write_all_at(&region.bytes, region.pos).map_err(|e| self.io("append", e))?;
        }
        Ok(())
    }

    pub fn write_superblock(&self, superblock: &Superblock) -> Result<(), CacheError> {
        self.file.write_all_at(&superblock.encode(), superblock.slot_offset()).map_err(|e| self.io("write", e))
    }

    pub fn sync(&self) -> Result<(), CacheError> {
        self.file.sync_data().map_err(|e| self.io("fdatasync", e))
    }
}
