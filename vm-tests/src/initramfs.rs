//! The guest's root filesystem: an uncompressed `newc` cpio archive the kernel unpacks into RAM.
//!
//! Written here rather than with `cpio(1)` because the build machines do not have it, and because an
//! in-memory builder makes "copy this binary with the libraries `ldd` lists, at the same paths" a
//! one-liner for scenarios. The archive is left uncompressed: under software emulation, decompressing
//! in the guest costs more than reading a few more megabytes from the host.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::VmError;

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
}

/// An initramfs under construction. Paths are absolute guest paths; parent directories are implied.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<PathBuf, Entry>,
}

fn guest_path(path: &Path) -> PathBuf {
    // Normalized, relative to the archive root (cpio entries have no leading slash).
    path.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    fn add_parents(&mut self, rel: &Path) {
        let mut p = rel.parent();
        while let Some(dir) = p {
            if dir.as_os_str().is_empty() {
                break;
            }
            self.entries.entry(dir.to_path_buf()).or_insert(Entry::Dir);
            p = dir.parent();
        }
    }

    pub fn dir(&mut self, path: impl AsRef<Path>) -> &mut Self {
        let rel = guest_path(path.as_ref());
        self.add_parents(&rel);
        self.entries.insert(rel, Entry::Dir);
        self
    }

    pub fn file(&mut self, path: impl AsRef<Path>, mode: u32, data: impl Into<Vec<u8>>) -> &mut Self {
        let rel = guest_path(path.as_ref());
        self.add_parents(&rel);
        self.entries.insert(rel, Entry::File { mode: mode & 0o7777, data: data.into() });
        self
    }

    pub fn symlink(&mut self, path: impl AsRef<Path>, target: &str) -> &mut Self {
        let rel = guest_path(path.as_ref());
        self.add_parents(&rel);
        self.entries.insert(rel, Entry::Symlink(target.to_string()));
        self
    }

    /// Copies a host file (following symlinks) to `guest` with the given mode.
    pub fn copy_file(&mut self, host: &Path, guest: impl AsRef<Path>, mode: u32) -> Result<&mut Self, VmError> {
        let data = std::fs::read(host).map_err(VmError::io(format!("reading {}", host.display())))?;
        Ok(self.file(guest, mode, data))
    }

    /// Copies a host executable to the same path in the guest, with every shared library `ldd` lists
    /// (also at the paths `ldd` prints, which is where the guest's dynamic loader looks for them).
    /// `binary` may be a bare name, looked up on `$PATH` and in the sbin directories.
    pub fn host_binary(&mut self, binary: &str) -> Result<&mut Self, VmError> {
        let path = crate::deps::which(binary).ok_or_else(|| VmError::MissingTool {
            what: binary.to_string(),
            hint: format!("`{binary}` is not on this host; install the package that provides it"),
        })?;
        self.copy_file(&path, &path, 0o755)?;
        for lib in shared_libraries(&path)? {
            self.copy_file(&lib, &lib, 0o755)?;
        }
        Ok(self)
    }

    /// The archive in `newc` format.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino = 1u32;
        let mut put = |out: &mut Vec<u8>, name: &[u8], mode: u32, data: &[u8]| {
            let fields = [ino, mode, 0, 0, if mode & 0o170000 == 0o040000 { 2 } else { 1 }, 0, data.len() as u32];
            ino += 1;
            out.extend_from_slice(b"070701");
            for f in fields {
                out.extend_from_slice(format!("{f:08X}").as_bytes());
            }
            // devmajor, devminor, rdevmajor, rdevminor, namesize, check
            for f in [0, 0, 0, 0, name.len() as u32 + 1, 0] {
                out.extend_from_slice(format!("{f:08X}").as_bytes());
            }
            out.extend_from_slice(name);
            out.push(0);
            out.resize(out.len().next_multiple_of(4), 0);
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(4), 0);
        };
        // BTreeMap order puts every directory before what is inside it.
        for (path, entry) in &self.entries {
            let name = path.to_string_lossy();
            match entry {
                Entry::Dir => put(&mut out, name.as_bytes(), 0o040755, &[]),
                Entry::File { mode, data } => put(&mut out, name.as_bytes(), 0o100000 | mode, data),
                Entry::Symlink(target) => put(&mut out, name.as_bytes(), 0o120777, target.as_bytes()),
            }
        }
        put(&mut out, b"TRAILER!!!", 0, &[]);
        out
    }
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`; empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, VmError> {
    let out = Command::new("ldd").arg(binary).output().map_err(VmError::io("running ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to copy.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let candidate = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = candidate.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            return Err(VmError::MissingTool {
                what: format!("a library of {}", binary.display()),
                hint: format!("ldd says: {}", line.trim()),
            });
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut fs = Initramfs::new();
        fs.file("/a/b/c.txt", 0o644, b"hello".to_vec()).symlink("/lib", "usr/lib");
        let cpio = fs.to_cpio();
        assert_eq!(cpio.len() % 4, 0);
        assert!(cpio.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&cpio);
        // parents come before children, the trailer comes last
        let (a, b, c) = (text.find("a\0").unwrap(), text.find("a/b\0").unwrap(), text.find("a/b/c.txt\0").unwrap());
        assert!(a < b && b < c);
        assert!(text.trim_end_matches('\0').ends_with("TRAILER!!!"));
        assert!(text.contains("hello"));
    }

    #[test]
    fn ldd_lists_libc_for_a_dynamic_binary() {
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libs:?}");
    }
}
