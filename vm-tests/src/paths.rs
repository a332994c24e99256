//! Where the runner keeps things: the kernel cache (kept between runs, gitignored) and the per-run
//! artifacts (console logs, initramfs images) under the cargo target directory.

use std::path::{Path, PathBuf};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `vm-tests/cache/` (or `$SANVOL_VM_CACHE`): the downloaded kernel package and what is unpacked from it.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("SANVOL_VM_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => manifest_dir().join("cache"),
    }
}

/// `<target>/vm-tests/`: console logs (`<scenario>-console.log`) and per-scenario work files.
pub fn artifact_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => manifest_dir().parent().unwrap_or(manifest_dir()).join("target"),
    };
    target.join("vm-tests")
}

/// An exclusive `flock` held until dropped. Used to serialize kernel preparation and VM boots across
/// threads and processes (flock locks belong to the open file, so two opens in one process conflict too).
pub(crate) struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> std::io::Result<FileLock> {
        use std::os::fd::AsRawFd;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        loop {
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}
