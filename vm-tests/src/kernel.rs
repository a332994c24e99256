//! The guest kernel: Debian's stock `linux-image-*-amd64`, downloaded once and cached.
//!
//! Debian's kernel has the NBD driver, virtio-net and ext4 as modules, which is exactly what a sanvol
//! host runs. `linux-image-amd64` is a metapackage; the package it depends on
//! (`linux-image-6.1.0-NN-amd64`) and its version key the cache directory, so a kernel update in the
//! archive gives a new cache entry instead of a silently mixed one.
//!
//! Cache layout (`vm-tests/cache/<package>_<version>/`):
//! - `package.deb` — the downloaded package, kept so more modules can be unpacked later without a
//!   download;
//! - `vmlinux` — the uncompressed kernel (ELF). QEMU boots it directly through its PVH entry point,
//!   which skips the in-guest xz decompression: about 4 s to `/init` instead of about 8 s under TCG;
//! - `modules/<name>.ko` — the modules unpacked so far (closures of what scenarios asked for), and
//!   `modules.builtin` to tell a built-in module from a misspelt one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::paths::FileLock;
use crate::VmError;

/// A prepared kernel: the image to boot and the modules (already unpacked) in load order.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `<package>_<version>`, e.g. `linux-image-6.1.0-56-amd64_6.1.192-2`.
    pub key: String,
    /// The kernel image passed to QEMU's `-kernel`.
    pub image: PathBuf,
    /// `(name, path)` of each module to load, dependencies first.
    pub modules: Vec<(String, PathBuf)>,
}

/// Prepares the cached kernel and the dependency closure of `modules`, downloading on first use.
pub fn prepare(modules: &[String]) -> Result<Kernel, VmError> {
    let cache = crate::cache_dir();
    std::fs::create_dir_all(&cache).map_err(VmError::io(format!("creating {}", cache.display())))?;
    let _lock = FileLock::acquire(&cache.join(".lock")).map_err(VmError::io("locking the kernel cache"))?;
    let (package, version) = match resolve_package() {
        Ok(pv) => pv,
        Err(err) => match newest_cached(&cache) {
            // Offline, or apt's lists are gone: a kernel we already have is as good as any.
            Some(key) => {
                eprintln!("vm-tests: {err}; using cached kernel {key}");
                let (p, v) = key.split_once('_').unwrap_or((&key, ""));
                (p.to_string(), v.to_string())
            }
            None => return Err(err),
        },
    };
    let key = format!("{package}_{version}");
    let dir = cache.join(&key);
    std::fs::create_dir_all(dir.join("modules")).map_err(VmError::io(format!("creating {}", dir.display())))?;

    let deb = dir.join("package.deb");
    if !deb.exists() {
        download(&package, &version, &dir, &deb)?;
    }
    let image = dir.join("vmlinux");
    if !image.exists() {
        unpack_image(&deb, &dir, &image)?;
    }
    let order = resolve_modules(&deb, &dir, modules);
    // The unpacked tree (~400 MB) is only a scratch copy shared by the two steps above.
    let _ = std::fs::remove_file(dir.join("unpacked.done"));
    let _ = std::fs::remove_dir_all(dir.join("unpacked"));
    Ok(Kernel { key, image, modules: order? })
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, VmError> {
    let command = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().map_err(VmError::io(format!("running {command}")))?;
    if !out.status.success() {
        return Err(VmError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Which real kernel package `linux-image-amd64` currently points at, and its version.
fn resolve_package() -> Result<(String, String), VmError> {
    let attempt = || -> Result<(String, String), VmError> {
        let deps = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
        let deps = String::from_utf8_lossy(&deps);
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
            .ok_or_else(|| {
                VmError::Kernel("`apt-cache depends linux-image-amd64` names no linux-image-*-amd64".into())
            })?
            .trim()
            .to_string();
        let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
        let version = String::from_utf8_lossy(&show)
            .lines()
            .find_map(|l| l.strip_prefix("Version: ").map(|v| v.trim().to_string()))
            .ok_or_else(|| VmError::Kernel(format!("`apt-cache show {package}` has no Version")))?;
        Ok((package, version))
    };
    attempt().or_else(|first| {
        // A fresh machine may have no package lists yet.
        eprintln!("vm-tests: {first}; running apt-get update");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        attempt()
    })
}

fn newest_cached(cache: &Path) -> Option<String> {
    let mut keys: Vec<String> = std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("vmlinux").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    keys.sort();
    keys.pop()
}

fn download(package: &str, version: &str, dir: &Path, deb: &Path) -> Result<(), VmError> {
    eprintln!("vm-tests: downloading {package} {version} (about 70 MB, once)");
    let tmp = dir.join("download");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(VmError::io(format!("creating {}", tmp.display())))?;
    // apt-get download drops privileges to _apt where it can; a root-owned 0755 directory is fine for that
    // on most machines, and where it is not, apt falls back to downloading as root with a warning.
    run(Command::new("apt-get").current_dir(&tmp).args(["download", "-qq", &format!("{package}={version}")]))?;
    let file = std::fs::read_dir(&tmp)
        .map_err(VmError::io(format!("listing {}", tmp.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| VmError::Kernel(format!("apt-get download {package} left no .deb")))?;
    std::fs::rename(&file, deb).map_err(VmError::io(format!("moving {} into the cache", file.display())))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Unpacks the package into a scratch directory under `dir` (reused within one [`prepare`]).
fn unpack(deb: &Path, dir: &Path) -> Result<PathBuf, VmError> {
    let root = dir.join("unpacked");
    let done = dir.join("unpacked.done");
    if done.exists() && root.is_dir() {
        return Ok(root);
    }
    let _ = std::fs::remove_file(&done);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(VmError::io(format!("creating {}", root.display())))?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    std::fs::write(&done, b"").map_err(VmError::io(format!("writing {}", done.display())))?;
    Ok(root)
}

fn module_root(root: &Path) -> Result<PathBuf, VmError> {
    let base = root.join("lib/modules");
    let entry = std::fs::read_dir(&base)
        .map_err(VmError::io(format!("listing {}", base.display())))?
        .filter_map(|e| e.ok())
        .find(|e| e.path().join("kernel").is_dir())
        .ok_or_else(|| VmError::Kernel(format!("no lib/modules/<version>/kernel in {}", root.display())))?;
    Ok(entry.path())
}

fn unpack_image(deb: &Path, dir: &Path, image: &Path) -> Result<(), VmError> {
    let root = unpack(deb, dir)?;
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(VmError::io(format!("listing {}", boot.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or_else(|| VmError::Kernel("the package has no boot/vmlinuz-*".into()))?;
    let bz = std::fs::read(&vmlinuz).map_err(VmError::io(format!("reading {}", vmlinuz.display())))?;
    let elf = decompress_bzimage(&bz)?;
    let tmp = image.with_extension("tmp");
    std::fs::write(&tmp, &elf).map_err(VmError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, image).map_err(VmError::io(format!("writing {}", image.display())))?;
    // While the tree is unpacked anyway, keep modules.builtin for later lookups.
    let mroot = module_root(&root)?;
    let _ = std::fs::copy(mroot.join("modules.builtin"), dir.join("modules.builtin"));
    Ok(())
}

/// The kernel ELF inside a bzImage: the payload is one xz stream (CONFIG_KERNEL_XZ), found by its magic.
fn decompress_bzimage(bz: &[u8]) -> Result<Vec<u8>, VmError> {
    use std::io::Write;
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let start = bz
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .ok_or_else(|| VmError::Kernel("vmlinuz has no xz payload (is the kernel xz-compressed?)".into()))?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(VmError::io("running xz"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let payload = bz[start..].to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let out = child.wait_with_output().map_err(VmError::io("running xz"))?;
    let _ = writer.join();
    if !out.status.success() || !out.stdout.starts_with(b"\x7fELF") {
        return Err(VmError::Kernel(format!(
            "decompressing vmlinuz failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// What a module's `.modinfo` ELF section says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    pub name: String,
    pub depends: Vec<String>,
}

/// Reads `name=` and `depends=` from the `.modinfo` section of an (uncompressed) kernel module.
///
/// Parsing the section ourselves spares the host `kmod` (depmod/modinfo), which the build machines lack.
pub fn modinfo(ko: &[u8]) -> Option<ModInfo> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(ko.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(ko.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(ko.get(o..o + 8)?.try_into().ok()?));
    if !ko.starts_with(b"\x7fELF\x02\x01") {
        return None; // not a little-endian ELF64
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h + 0x18)? as usize, u64_at(h + 0x20)? as usize))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let names = ko.get(stroff..stroff.checked_add(strsize)?)?;
    let (_, off, size) = (0..shnum).filter_map(section).find(|(name, _, _)| {
        let n = &names[(*name as usize).min(names.len())..];
        n.split(|&b| b == 0).next() == Some(b".modinfo")
    })?;
    let data = ko.get(off..off.checked_add(size)?)?;
    let mut info = ModInfo { name: String::new(), depends: Vec::new() };
    for field in data.split(|&b| b == 0).filter_map(|f| std::str::from_utf8(f).ok()) {
        if let Some(v) = field.strip_prefix("name=") {
            info.name = v.to_string();
        } else if let Some(v) = field.strip_prefix("depends=") {
            info.depends = v.split(',').filter(|d| !d.is_empty()).map(str::to_string).collect();
        }
    }
    (!info.name.is_empty()).then_some(info)
}

fn read_modinfo(path: &Path) -> Result<ModInfo, VmError> {
    let bytes = std::fs::read(path).map_err(VmError::io(format!("reading {}", path.display())))?;
    modinfo(&bytes).ok_or_else(|| VmError::Kernel(format!("{} has no readable .modinfo", path.display())))
}

fn builtin(dir: &Path, name: &str) -> bool {
    std::fs::read_to_string(dir.join("modules.builtin")).is_ok_and(|list| {
        list.lines().any(|l| {
            let stem = l.rsplit('/').next().unwrap_or(l).trim_end_matches(".ko");
            stem.replace('-', "_") == name
        })
    })
}

/// Orders `wanted` and everything they depend on so that dependencies load first, unpacking modules
/// from the package when the cache does not have them yet.
fn resolve_modules(deb: &Path, dir: &Path, wanted: &[String]) -> Result<Vec<(String, PathBuf)>, VmError> {
    let cached = dir.join("modules");
    let mut infos: BTreeMap<String, ModInfo> = BTreeMap::new();
    let mut missing = closure(&cached, dir, wanted, &mut infos)?;
    if !missing.is_empty() {
        // Unpack the whole tree once, copy the closure of what was asked, drop the tree (~400 MB).
        let root = unpack(deb, dir)?;
        let mroot = module_root(&root)?;
        let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut stack = vec![mroot.join("kernel")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(VmError::io(format!("listing {}", d.display())))?.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "ko") {
                    let stem = p.file_stem().unwrap_or_default().to_string_lossy().replace('-', "_");
                    index.insert(stem, p);
                }
            }
        }
        let _ = std::fs::copy(mroot.join("modules.builtin"), dir.join("modules.builtin"));
        while let Some(name) = missing.pop_first() {
            if cached.join(format!("{name}.ko")).exists() || builtin(dir, &name) {
                continue;
            }
            let src = index.get(&name).ok_or_else(|| VmError::ModuleNotFound(name.clone()))?;
            let dst = cached.join(format!("{name}.ko"));
            std::fs::copy(src, &dst).map_err(VmError::io(format!("copying {}", src.display())))?;
            missing.extend(read_modinfo(&dst)?.depends);
        }
        infos.clear();
        let still = closure(&cached, dir, wanted, &mut infos)?;
        if let Some(name) = still.first() {
            return Err(VmError::ModuleNotFound(name.clone()));
        }
    }
    // Topological order: a module after all of its dependencies; ties in the order they were asked for.
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    fn visit(
        name: &str,
        infos: &BTreeMap<String, ModInfo>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if depth > 64 || done.contains(name) || !infos.contains_key(name) {
            return;
        }
        for dep in &infos[name].depends {
            visit(dep, infos, done, order, depth + 1);
        }
        done.insert(name.to_string());
        order.push(name.to_string());
    }
    for name in wanted {
        visit(name, &infos, &mut done, &mut order, 0);
    }
    Ok(order.into_iter().map(|n| (n.clone(), cached.join(format!("{n}.ko")))).collect())
}

/// Reads the cached closure of `wanted` into `infos`; returns the names not cached (built-ins excluded).
fn closure(
    cached: &Path,
    dir: &Path,
    wanted: &[String],
    infos: &mut BTreeMap<String, ModInfo>,
) -> Result<BTreeSet<String>, VmError> {
    let mut missing = BTreeSet::new();
    let mut stack: Vec<String> = wanted.to_vec();
    while let Some(name) = stack.pop() {
        if infos.contains_key(&name) || missing.contains(&name) {
            continue;
        }
        let path = cached.join(format!("{name}.ko"));
        if path.exists() {
            let info = read_modinfo(&path)?;
            stack.extend(info.depends.iter().cloned());
            infos.insert(name, info);
        } else if !builtin(dir, &name) {
            missing.insert(name);
        }
    }
    Ok(missing)
}
