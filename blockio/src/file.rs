//! A [`BlockDevice`] over a regular file or a block device.
//!
//! Why positioned I/O on one shared descriptor: `pread`/`pwrite` carry their
//! own offset, so any number of requests run at once on the blocking pool
//! without a seek lock. Every syscall runs in `spawn_blocking` because file
//! I/O blocks whatever tokio thinks of it (in place on the server's
//! connection threads, which may block: [`crate::blocking`]).
//!
//! Zeroing and trimming use `fallocate` (punch a hole, or zero a range) so
//! sparse files stay sparse and zeroing is fast; where the filesystem refuses,
//! we fall back to writing zeroes, so callers get the same contents either
//! way. Block status asks the filesystem (`SEEK_DATA`/`SEEK_HOLE`) where the
//! holes are.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::device::{BlockDevice, MetaContext, StatusExtent, ZeroFlags};
use crate::error::{check_range, IoError};
use crate::proto::{STATE_HOLE, STATE_ZERO};

/// Size of the zero buffer used when writing zeroes by hand.
const ZERO_WRITE_BYTES: usize = 1024 * 1024;
/// Most extents one block-status call returns (the reply may be shorter
/// than asked; clients come back for the rest).
const STATUS_EXTENTS_MAX: usize = 4096;

/// A file or block device served through positioned I/O.
#[derive(Clone)]
pub struct FileDevice {
    inner: Arc<Inner>,
}

struct Inner {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    block_device: bool,
    /// Cleared the first time the filesystem refuses the operation, so we
    /// stop asking.
    punch_hole_ok: AtomicBool,
    zero_range_ok: AtomicBool,
}

impl std::fmt::Debug for FileDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDevice")
            .field("path", &self.inner.path)
            .field("size", &self.inner.size)
            .field("read_only", &self.inner.read_only)
            .finish()
    }
}

fn with_path(path: &Path, what: &str, e: std::io::Error) -> IoError {
    let base = IoError::from(e);
    IoError::new(base.kind, format!("{what} {}: {}", path.display(), base.message))
}

impl FileDevice {
    /// Opens an existing file or block device; its current size is the
    /// device size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<FileDevice, IoError> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| with_path(path, "cannot open", e))?;
        let meta = file.metadata().map_err(|e| with_path(path, "cannot stat", e))?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            file.seek(SeekFrom::End(0)).map_err(|e| with_path(path, "cannot find the size of", e))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(IoError::invalid(format!("{} is neither a regular file nor a block device", path.display())));
        };
        Ok(FileDevice::from_parts(file, path, size, read_only, block_device))
    }

    /// Creates (or truncates) a sparse regular file of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<FileDevice, IoError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| with_path(path, "cannot create", e))?;
        file.set_len(size).map_err(|e| with_path(path, "cannot size", e))?;
        Ok(FileDevice::from_parts(file, path, size, false, false))
    }

    fn from_parts(file: File, path: &Path, size: u64, read_only: bool, block_device: bool) -> FileDevice {
        FileDevice {
            inner: Arc::new(Inner {
                file,
                path: path.to_path_buf(),
                size,
                read_only,
                block_device,
                punch_hole_ok: AtomicBool::new(true),
                zero_range_ok: AtomicBool::new(true),
            }),
        }
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn check_writable(&self) -> Result<(), IoError> {
        if self.inner.read_only {
            Err(IoError::read_only())
        } else {
            Ok(())
        }
    }

    /// Runs blocking file work on tokio's blocking pool, or in place on a
    /// thread that may block (the server's connection threads,
    /// [`crate::blocking`]).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, IoError> + Send + 'static,
    ) -> Result<T, IoError> {
        if crate::blocking::inline_allowed() {
            return f(&self.inner);
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| IoError::io(format!("file I/O task failed: {e}")))?
    }
}

impl Inner {
    fn err(&self, what: &str, e: std::io::Error) -> IoError {
        with_path(&self.path, what, e)
    }

    fn sync(&self) -> Result<(), IoError> {
        self.file.sync_data().map_err(|e| self.err("cannot fdatasync", e))
    }

    /// `fallocate(mode)` over the range; `Ok(false)` when the filesystem
    /// does not support that mode.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<bool, IoError> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(IoError::out_of_range(offset, len, self.size));
        };
        loop {
            // SAFETY: fallocate only reads its scalar arguments; the fd is
            // owned by `self.file` and open for the duration of the call.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if rc == 0 {
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV) => {
                    return Ok(false)
                }
                _ => return Err(self.err("fallocate failed on", e)),
            }
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool, IoError> {
        if !self.punch_hole_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let ok = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)?;
        if !ok {
            self.punch_hole_ok.store(false, Ordering::Relaxed);
        }
        Ok(ok)
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<bool, IoError> {
        if !self.zero_range_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let ok = self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len)?;
        if !ok {
            self.zero_range_ok.store(false, Ordering::Relaxed);
        }
        Ok(ok)
    }

    /// Zeroes a range the fast way if the filesystem can; `Ok(false)` if not.
    /// With `may_trim` the range may become a hole; without, it stays
    /// allocated.
    fn zero_fast(&self, offset: u64, len: u64, may_trim: bool) -> Result<bool, IoError> {
        if may_trim && self.punch_hole(offset, len)? {
            return Ok(true);
        }
        if self.zero_range(offset, len)? {
            return Ok(true);
        }
        // Punch then re-allocate: zeroes, fully provisioned (what nbdkit's
        // file plugin does on filesystems without ZERO_RANGE, e.g. tmpfs).
        if !self.block_device && self.punch_hole(offset, len)? {
            // If re-allocation is unsupported the range is still zero, just sparse.
            self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn write_zeroes_slow(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let zeroes = vec![0u8; ZERO_WRITE_BYTES.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done).map_err(|e| self.err("cannot write zeroes to", e))?;
            done += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Result<Option<u64>, std::io::Error> {
        let off = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek only reads scalars. It moves the shared file
        // position, which no other code here uses (all I/O is positioned).
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<StatusExtent>, IoError> {
        let end = offset + len;
        let mut extents: Vec<StatusExtent> = Vec::new();
        let push = |extents: &mut Vec<StatusExtent>, length: u64, flags: u32| match extents.last_mut() {
            Some(last) if last.flags == flags => last.length += length,
            _ => extents.push(StatusExtent { length, flags }),
        };
        if self.block_device {
            push(&mut extents, len, 0);
            return Ok(extents);
        }
        let mut pos = offset;
        while pos < end && extents.len() < STATUS_EXTENTS_MAX {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                // No data after pos: the rest of the file is a hole.
                Ok(None) => end,
                // SEEK_DATA unsupported: say "data", which is always safe.
                Err(_) => {
                    push(&mut extents, end - pos, 0);
                    break;
                }
            };
            if data > pos {
                let hole_end = data.min(end);
                push(&mut extents, hole_end - pos, STATE_HOLE | STATE_ZERO);
                pos = hole_end;
                continue;
            }
            let hole = match self.seek(pos, libc::SEEK_HOLE) {
                Ok(Some(h)) if h > pos => h,
                _ => end,
            };
            let data_end = hole.min(end);
            push(&mut extents, data_end - pos, 0);
            pos = data_end;
        }
        Ok(extents)
    }
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        check_range(offset, len as u64, self.inner.size)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.blocking(move |inner| {
            let mut buf = BytesMut::zeroed(len as usize);
            let mut done = 0usize;
            while done < buf.len() {
                match inner.file.read_at(&mut buf[done..], offset + done as u64) {
                    // The file shrank under us: what is past its end reads as zeroes.
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(inner.err("cannot read", e)),
                }
            }
            Ok(buf.freeze())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.check_writable()?;
        check_range(offset, data.len() as u64, self.inner.size)?;
        self.blocking(move |inner| {
            inner.file.write_all_at(&data, offset).map_err(|e| inner.err("cannot write", e))?;
            if fua {
                inner.sync()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), IoError> {
        if self.inner.read_only {
            return Ok(());
        }
        self.blocking(|inner| inner.sync()).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.check_writable()?;
        check_range(offset, len as u64, self.inner.size)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(move |inner| {
            // Trimmed ranges read back as zeroes on our backends, so when the
            // filesystem cannot punch, write the zeroes.
            if !inner.punch_hole(offset, len as u64)? {
                inner.write_zeroes_slow(offset, len as u64)?;
            }
            if fua {
                inner.sync()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.check_writable()?;
        check_range(offset, len as u64, self.inner.size)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(move |inner| {
            if !inner.zero_fast(offset, len as u64, flags.may_trim)? {
                if flags.fast_only {
                    return Err(IoError::not_supported(format!(
                        "{} cannot zero quickly (fallocate unsupported)",
                        inner.path.display()
                    )));
                }
                inner.write_zeroes_slow(offset, len as u64)?;
            }
            if flags.fua {
                inner.sync()?;
            }
            Ok(())
        })
        .await
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        check_range(offset, len as u64, self.inner.size)?;
        if *context != MetaContext::BaseAllocation {
            return Err(IoError::not_supported(format!(
                "metadata context {} is not offered by file devices",
                context.name()
            )));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        self.blocking(move |inner| inner.allocation(offset, len as u64)).await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        check_range(offset, len as u64, self.inner.size)?;
        self.blocking(move |inner| {
            // SAFETY: posix_fadvise only reads scalars; a failure is harmless
            // (CACHE is a hint).
            unsafe {
                libc::posix_fadvise(
                    inner.file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap()
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn create_write_read_back_and_reopen() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.img");
            let dev = FileDevice::create(&path, 4 * MIB).unwrap();
            assert_eq!(dev.size(), 4 * MIB);
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
            dev.write(12345, Bytes::from(data.clone()), true).await.unwrap();
            dev.flush().await.unwrap();
            assert_eq!(dev.read(12345, data.len() as u32).await.unwrap(), data);
            drop(dev);
            let ro = FileDevice::open(&path, true).unwrap();
            assert_eq!(ro.size(), 4 * MIB);
            assert_eq!(ro.read(12345, data.len() as u32).await.unwrap(), data);
            let e = ro.write(0, Bytes::from_static(b"x"), false).await.unwrap_err();
            assert_eq!(e.kind, crate::IoErrorKind::PermissionDenied);
        });
    }

    #[test]
    fn out_of_range_is_refused() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let dev = FileDevice::create(dir.path().join("d"), MIB).unwrap();
            assert_eq!(dev.read(MIB - 1, 2).await.unwrap_err().kind, crate::IoErrorKind::Overflow);
            let e = dev.write(MIB, Bytes::from_static(b"x"), false).await.unwrap_err();
            assert_eq!(e.kind, crate::IoErrorKind::Overflow);
        });
    }

    #[test]
    fn holes_show_in_block_status_and_trim_makes_them() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let dev = FileDevice::create(dir.path().join("sparse"), 8 * MIB).unwrap();
            let ctx = MetaContext::BaseAllocation;
            let map = dev.block_status(&ctx, 0, 8 * MIB as u32).await.unwrap();
            assert_eq!(map, vec![StatusExtent { length: 8 * MIB, flags: STATE_HOLE | STATE_ZERO }]);

            dev.write(2 * MIB, Bytes::from(vec![7u8; MIB as usize]), false).await.unwrap();
            let map = dev.block_status(&ctx, 0, 8 * MIB as u32).await.unwrap();
            assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), 8 * MIB);
            assert_eq!(map[0], StatusExtent { length: 2 * MIB, flags: STATE_HOLE | STATE_ZERO });
            assert_eq!(map[1], StatusExtent { length: MIB, flags: 0 });

            dev.trim(2 * MIB, MIB as u32, false).await.unwrap();
            assert_eq!(dev.read(2 * MIB, MIB as u32).await.unwrap(), vec![0u8; MIB as usize]);
            let map = dev.block_status(&ctx, 0, 8 * MIB as u32).await.unwrap();
            assert!(map.iter().all(|e| e.flags == STATE_HOLE | STATE_ZERO), "{map:?}");
        });
    }

    #[test]
    fn write_zeroes_in_every_mode_reads_back_zero() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let dev = FileDevice::create(dir.path().join("z"), 4 * MIB).unwrap();
            for (i, may_trim) in [(0u64, true), (1, false)] {
                let off = i * 2 * MIB;
                dev.write(off, Bytes::from(vec![9u8; 2 * MIB as usize]), false).await.unwrap();
                let flags = ZeroFlags { may_trim, fua: true, fast_only: false };
                dev.write_zeroes(off + 4096, MIB as u32, flags).await.unwrap();
                let back = dev.read(off, 2 * MIB as u32).await.unwrap();
                for (j, b) in back.iter().enumerate() {
                    let zero = (4096..4096 + MIB as usize).contains(&j);
                    assert_eq!(*b, if zero { 0 } else { 9 }, "mode may_trim={may_trim} byte {j}");
                }
            }
        });
    }
}
