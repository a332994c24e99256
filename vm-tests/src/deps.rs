//! Host tools the runner needs, and installing them when they are missing.
//!
//! CI runs on a fresh machine, so the runner cannot assume QEMU is there. The install itself lives in
//! `vm-tests/install-deps.sh` (it has to pair qemu-system-x86 with a matching qemu-utils, see there);
//! the runner calls it once when something is missing, unless `SANVOL_VM_NO_INSTALL=1`, in which case
//! it fails and says what to run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::VmError;

/// The host tools the runner itself uses (scenario binaries are checked when they are added).
const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("xz", "xz-utils"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
    ("ldd", "libc-bin"),
];

/// The install script shipped with this crate.
pub fn install_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("install-deps.sh")
}

/// Finds `name` on `$PATH` (plus the sbin directories, which a non-root `$PATH` may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.exists().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn busybox_is_static() -> bool {
    // busybox-static and the dynamic busybox package both install /bin/busybox; the guest has no libc
    // for a dynamic one. `ldd` says "not a dynamic executable" (and fails) on a static binary.
    match which("busybox") {
        Some(p) => Command::new("ldd").arg(p).output().map(|o| !o.status.success()).unwrap_or(false),
        None => false,
    }
}

fn missing_tools() -> Vec<&'static str> {
    let mut missing: Vec<&str> = TOOLS.iter().filter(|(tool, _)| which(tool).is_none()).map(|(_, pkg)| *pkg).collect();
    if which("busybox").is_some() && !busybox_is_static() {
        missing.push("busybox-static");
    }
    missing
}

/// Makes sure the runner's host tools are there, installing them (once per process) if allowed.
pub fn ensure_host_tools() -> Result<(), VmError> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| ensure_inner().map_err(|e| e.to_string()))
        .clone()
        .map_err(|hint| VmError::MissingTool { what: "host tools".into(), hint })
}

fn ensure_inner() -> Result<(), VmError> {
    let missing = missing_tools();
    if missing.is_empty() {
        return Ok(());
    }
    let script = install_script();
    let hint = format!("run `{}` (as root) to install {}", script.display(), missing.join(", "));
    if std::env::var("SANVOL_VM_NO_INSTALL").is_ok_and(|v| v == "1") {
        return Err(VmError::MissingTool { what: missing.join(", "), hint });
    }
    eprintln!("vm-tests: missing {}; running {}", missing.join(", "), script.display());
    let _lock = crate::paths::FileLock::acquire(&crate::cache_dir().join(".install.lock"))
        .map_err(VmError::io("locking the install"))?;
    let status =
        Command::new("bash").arg(&script).status().map_err(VmError::io(format!("running {}", script.display())))?;
    let still = missing_tools();
    if !status.success() || !still.is_empty() {
        return Err(VmError::MissingTool {
            what: still.join(", "),
            hint: format!("{} exited with {status}; {hint}", script.display()),
        });
    }
    Ok(())
}
