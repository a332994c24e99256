//! A preallocated file written durably with synchronous direct writes: the
//! write-back cache's log on the agent and its mirror at the metadata
//! server (issue 15) append to one on every acknowledged write.
//!
//! Why preallocated and written (not sparse, not `fallocate`d): a write into
//! a hole or an unwritten extent makes every `fdatasync` commit file-system
//! metadata too (measured on the build host's ext4, 4 KiB at QD1: 182 µs
//! for a sparse or fallocated file, 94 µs for a written one; 1 MiB: 0.9-1.3
//! ms against 0.4 ms, with tails of several ms). Why `O_DIRECT | O_DSYNC`:
//! one synchronous direct write is a single system call that returns once
//! the data is on the disk, cheaper at 4 KiB than a buffered write and an
//! `fdatasync` (75 µs against 94 µs on the same host), and it copies nothing
//! into the page cache. Where the file system refuses direct writes (no
//! `O_DIRECT`, or a sector bigger than the caller's alignment), writes fall
//! back to buffered writes and one `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Memory alignment of direct writes (enough for 4 KiB-sector devices).
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// Zeroes written at once when a file is preallocated.
pub const FILL_CHUNK_BYTES: usize = 8 << 20;

/// What failed, on which file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot {what}: {source}")]
pub struct DurableError {
    pub path: String,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

pub struct DurableFile {
    path: PathBuf,
    file: File,
    /// The same file opened `O_DIRECT | O_DSYNC`, where allowed.
    direct: Option<File>,
    direct_ok: AtomicBool,
}

impl DurableFile {
    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> DurableError + '_ {
        move |source| DurableError { path: self.path.display().to_string(), what, source }
    }

    /// Opens (or creates) `path` for reading and durable writing.
    pub fn open(path: &Path) -> Result<DurableFile, DurableError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| DurableError { path: path.display().to_string(), what: "open", source })?;
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path).ok();
        let direct_ok = AtomicBool::new(direct.is_some());
        Ok(DurableFile { path: path.to_path_buf(), file, direct, direct_ok })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file, for reads (and writes the caller syncs itself).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Makes the file exactly `len` bytes, every one of them written (zeroes
    /// where the file was shorter, or had holes), and synced. A file that is
    /// already that long and fully allocated is left as it is: reopening a
    /// log costs nothing. Either way the file's pages leave the page cache
    /// (see `drop_cached_pages`).
    pub fn preallocate(&self, len: u64) -> Result<(), DurableError> {
        self.fill(len)?;
        self.drop_cached_pages();
        Ok(())
    }

    /// Drops the file's pages from the page cache. The buffered fill left
    /// the whole file there (254 of 256 MiB for each of a 256 MiB cache's
    /// log and mirror, `fincore`, bench/README.md 2026-12-06): memory held
    /// for data no one reads, which every direct write over it then has to
    /// invalidate. Advice only: a refusal costs memory, never data.
    fn drop_cached_pages(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise reads no memory of ours; the descriptor is
        // open for as long as `self.file` is.
        let e = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if e != 0 {
            tracing::debug!(file = %self.path.display(), errno = e, "posix_fadvise(DONTNEED) refused");
        }
    }

    fn fill(&self, len: u64) -> Result<(), DurableError> {
        let meta = self.file.metadata().map_err(self.err("stat"))?;
        let allocated = meta.blocks().saturating_mul(512);
        let mut from = meta.len().min(len);
        if allocated < from {
            // Holes (a sparse file from before): written over whole.
            from = 0;
        }
        if meta.len() > len {
            self.file.set_len(len).map_err(self.err("size"))?;
        }
        if from == len {
            return Ok(());
        }
        let zeroes = vec![0u8; FILL_CHUNK_BYTES];
        let mut at = from;
        while at < len {
            let n = (len - at).min(FILL_CHUNK_BYTES as u64) as usize;
            self.file.write_all_at(&zeroes[..n], at).map_err(self.err("preallocate"))?;
            at += n as u64;
        }
        self.file.sync_all().map_err(self.err("fsync"))
    }

    /// Writes `bytes` at `pos` with a direct synchronous write; `Ok(false)`
    /// when direct I/O is not possible here.
    fn write_direct(&self, pos: u64, bytes: &[u8]) -> Result<bool, DurableError> {
        let Some(direct) = self.direct.as_ref().filter(|_| self.direct_ok.load(Ordering::Relaxed)) else {
            return Ok(false);
        };
        if !pos.is_multiple_of(512) || !bytes.len().is_multiple_of(512) {
            return Ok(false);
        }
        let aligned;
        let bytes = if bytes.as_ptr().align_offset(DIRECT_ALIGN_BYTES) == 0 {
            bytes
        } else {
            let mut buffer = vec![0u8; bytes.len() + DIRECT_ALIGN_BYTES];
            let start = buffer.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
            buffer[start..start + bytes.len()].copy_from_slice(bytes);
            aligned = buffer;
            &aligned[start..start + bytes.len()]
        };
        match direct.write_all_at(bytes, pos) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // A device with bigger sectors than 512 bytes: buffered
                // writes and fdatasync from now on.
                tracing::warn!(file = %self.path.display(), "direct writes refused ({e}); using buffered writes and fdatasync");
                self.direct_ok.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(self.err("write")(e)),
        }
    }

    /// Writes `regions` (position, bytes) durably: direct synchronous
    /// writes, or buffered writes and one `fdatasync`. Positions and lengths
    /// that are multiples of 512 bytes may go direct.
    pub fn write_durable<'a>(
        &self,
        regions: impl Iterator<Item = (u64, &'a [u8])> + Clone,
    ) -> Result<(), DurableError> {
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
        // Some regions may have gone direct already: writing them again
        // buffered is harmless.
        for (pos, bytes) in regions {
            self.file.write_all_at(bytes, pos).map_err(self.err("write"))?;
        }
        self.sync()
    }

    /// `fdatasync`.
    pub fn sync(&self) -> Result<(), DurableError> {
        self.file.sync_data().map_err(self.err("fdatasync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_written_where_told_aligned_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = DurableFile::open(&dir.path().join("log")).unwrap();
        f.preallocate(1 << 20).unwrap();
        let a = vec![7u8; 4096];
        let odd = [9u8; 100]; // not a multiple of 512: buffered + fdatasync
        f.write_durable([(8192u64, &a[..]), (512, &a[..512])].into_iter()).unwrap();
        f.write_durable(std::iter::once((20_000u64, &odd[..]))).unwrap();
        let mut back = vec![0u8; 1 << 20];
        f.file().read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[8192..12288], &a[..]);
        assert_eq!(&back[512..1024], &a[..512]);
        assert_eq!(&back[20_000..20_100], &odd[..]);
        assert!(back[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn preallocation_writes_every_byte_and_keeps_a_full_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let sparse = File::create(&path).unwrap();
        sparse.set_len(4 << 20).unwrap();
        sparse.write_all_at(&[5u8; 512], 1 << 20).unwrap();
        drop(sparse);
        let f = DurableFile::open(&path).unwrap();
        f.preallocate(4 << 20).unwrap();
        let meta = f.file().metadata().unwrap();
        assert_eq!(meta.len(), 4 << 20);
        assert!(meta.blocks() * 512 >= 4 << 20, "no holes left");
        // A full file of the right size is kept as it is.
        f.file().write_all_at(&[6u8; 512], 0).unwrap();
        f.preallocate(4 << 20).unwrap();
        let mut first = [0u8; 512];
        f.file().read_exact_at(&mut first, 0).unwrap();
        assert_eq!(first, [6u8; 512]);
        // Shorter: cut.
        f.preallocate(2 << 20).unwrap();
        assert_eq!(f.file().metadata().unwrap().len(), 2 << 20);
    }

    /// Pages of the first `len` bytes of `file` in the page cache.
    fn resident_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        // SAFETY: a fresh read-only shared mapping of an open file, unmapped
        // below; mincore writes one byte per page into `vec`, which has one
        // per page of the mapping. Mapping touches no page.
        unsafe {
            let at = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(at, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
            let mut vec = vec![0u8; len.div_ceil(page)];
            let rc = libc::mincore(at, len, vec.as_mut_ptr());
            libc::munmap(at, len);
            assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    #[test]
    fn a_preallocated_file_leaves_no_pages_in_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        // On tmpfs the pages are the file: nothing to drop, nothing to check.
        let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
        let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statfs fills the struct it is given on success.
        let tmpfs = unsafe {
            libc::statfs(path.as_ptr(), fs.as_mut_ptr()) == 0 && fs.assume_init().f_type == libc::TMPFS_MAGIC
        };
        let f = DurableFile::open(&dir.path().join("log")).unwrap();
        f.preallocate(4 << 20).unwrap();
        if !tmpfs {
            assert_eq!(resident_pages(f.file(), 4 << 20), 0, "the zeroes written stay out of the page cache");
        }
        // A buffered read of the file (a replay's scan) brings pages back;
        // preallocating the file again (a fresh log over the old) drops them.
        let mut back = vec![0u8; 1 << 20];
        f.file().read_exact_at(&mut back, 0).unwrap();
        assert!(resident_pages(f.file(), 4 << 20) > 0);
        f.preallocate(4 << 20).unwrap();
        if !tmpfs {
            assert_eq!(resident_pages(f.file(), 4 << 20), 0);
        }
    }
}
