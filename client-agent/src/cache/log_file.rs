//! The cache log's file I/O: create a fresh log, read an old one back and
//! replay it, append a batch, move the tail. Blocking calls (positional
//! writes and `fdatasync`), run by the cache's tasks on tokio's blocking
//! pool.
//!
//! Why a fresh log after every open: the old log is replayed to the devices
//! first, so nothing in it is needed any more; a new log id makes every old
//! record unreadable as part of the new chain, so stale records from before
//! a crash can never be mistaken for new ones.

use std::path::{Path, PathBuf};

use blockio::durable_file::{DurableError, DurableFile};
use volume_format::cache_log::{scan, Batch, LogAppender, ScanError, ScannedLog, Superblock, DATA_START_BYTES};
use volume_format::VolumeId;

use super::CacheError;

/// Written with synchronous direct writes into a preallocated file (see
/// [`blockio::durable_file`]): the append is on every cached write's path.
pub struct LogFile {
    pub path: PathBuf,
    file: DurableFile,
}

fn failed(e: DurableError) -> CacheError {
    CacheError::Io { path: e.path, what: e.what.to_string(), message: e.source.to_string() }
}

impl LogFile {
    fn io(&self, what: &str, e: std::io::Error) -> CacheError {
        CacheError::Io { path: self.path.display().to_string(), what: what.to_string(), message: e.to_string() }
    }

    /// Opens (or creates) the log file; `true` when it held something
    /// (there may be a log to replay).
    pub fn open(path: &Path) -> Result<(LogFile, bool), CacheError> {
        let existed = path.metadata().map(|m| m.len() > 0).unwrap_or(false);
        let file = DurableFile::open(path).map_err(failed)?;
        Ok((LogFile { path: path.to_path_buf(), file }, existed))
    }

    /// Reads the old log back (see [`volume_format::cache_log::scan`]).
    pub fn scan(&self, volume: VolumeId) -> Result<ScannedLog, CacheError> {
        let path = self.path.display().to_string();
        let log = scan(self.file.file(), &path).map_err(CacheError::Log)?;
        if log.superblock.volume != volume {
            return Err(CacheError::OtherVolume { path, found: log.superblock.volume, expected: volume });
        }
        Ok(log)
    }

    /// Reads one scanned record's data, checked again.
    pub fn read_record(&self, record: &volume_format::cache_log::ScannedRecord) -> Result<Vec<u8>, ScanError> {
        volume_format::cache_log::read_record(self.file.file(), &self.path.display().to_string(), record)
    }

    /// Makes the file an empty log of `log_bytes` with a new log id
    /// (preallocated: every byte written, see [`blockio::durable_file`]).
    pub fn create(&self, volume: VolumeId, log_bytes: u64) -> Result<LogAppender, CacheError> {
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).map_err(|e| self.io("pick a log id", std::io::Error::other(e.to_string())))?;
        let appender = LogAppender::create(u64::from_be_bytes(id), volume, log_bytes);
        self.file.preallocate(log_bytes).map_err(failed)?;
        let superblocks = appender.initial_superblocks().map(|s| (s.slot_offset(), s.encode()));
        self.file.write_durable(superblocks.iter().map(|(pos, bytes)| (*pos, &bytes[..]))).map_err(failed)?;
        debug_assert!(log_bytes > DATA_START_BYTES);
        Ok(appender)
    }

    /// Appends a batch durably.
    pub fn append(&self, batch: &Batch) -> Result<(), CacheError> {
        self.file
            .write_durable(batch.regions.iter().map(|region| (region.pos, region.bytes.as_slice())))
            .map_err(failed)
    }

    /// Writes a superblock durably.
    pub fn write_superblock(&self, superblock: &Superblock) -> Result<(), CacheError> {
        let slot = superblock.encode();
        self.file.write_durable(std::iter::once((superblock.slot_offset(), &slot[..]))).map_err(failed)
    }
}
