//! A scenario: what the guest runs, and everything it needs in its initramfs.
//!
//! The scenario itself is a shell script (busybox `ash`) run as `/scenario.sh` by the runner's `/init`
//! with `set -eu -o pipefail`, after `/sanvol-lib.sh` gave it three helpers:
//! - `step NAME` — says what it is doing (printed as `SANVOL-VM-STEP: NAME`); a failure names the step;
//! - `fail REASON...` — stops the scenario with that reason;
//! - `expect_eq WHAT ACTUAL EXPECTED` — fails with both values when they differ.
//!
//! The scenario passes when the script exits 0. Environment variables set with [`Scenario::env`] are
//! exported to it, plus `SANVOL_HOST=10.0.2.2` (the host's loopback as seen from the guest).

use std::path::PathBuf;
use std::time::Duration;

use crate::initramfs::Initramfs;
use crate::{Vm, VmError, VmReport};

/// Modules every scenario gets: the network card, the NBD driver and ext4 (with the crc32c it asks the
/// crypto API for at mount time — through a `softdep`, which `depends=` does not list).
pub const DEFAULT_MODULES: &[&str] = &["virtio_pci", "virtio_net", "nbd", "crc32c_generic", "ext4"];

/// Host binaries every scenario gets (with their libraries).
pub const DEFAULT_BINARIES: &[&str] = &["nbd-client", "mkfs.ext4", "e2fsck", "resize2fs"];

#[derive(Debug, Clone)]
pub struct Scenario {
    pub(crate) name: String,
    pub(crate) script: String,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) modules: Vec<String>,
    pub(crate) module_params: Vec<(String, String)>,
    pub(crate) binaries: Vec<String>,
    pub(crate) files: Vec<(PathBuf, u32, Vec<u8>)>,
    pub(crate) timeout: Duration,
    pub(crate) memory_mib: u32,
    pub(crate) cmdline: Vec<String>,
}

impl Scenario {
    /// A scenario called `name` (used for its console log, `<target>/vm-tests/<name>-console.log`),
    /// running `script` in the guest.
    pub fn new(name: &str, script: &str) -> Self {
        Scenario {
            name: name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                .collect(),
            script: script.to_string(),
            env: Vec::new(),
            modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
            module_params: Vec::new(),
            binaries: DEFAULT_BINARIES.iter().map(|b| b.to_string()).collect(),
            files: Vec::new(),
            timeout: Duration::from_secs(120),
            memory_mib: 512,
            cmdline: Vec::new(),
        }
    }

    /// Exports `key=value` to the scenario script.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Loads this kernel module too (its dependencies are found and loaded first).
    pub fn module(mut self, name: &str) -> Self {
        let name = name.trim_end_matches(".ko").replace('-', "_");
        if !self.modules.contains(&name) {
            self.modules.push(name);
        }
        self
    }

    /// Passes `param` (e.g. `nbds_max=4`) to `insmod` of `module`.
    pub fn module_param(mut self, module: &str, param: &str) -> Self {
        self.module_params.push((module.replace('-', "_"), param.to_string()));
        self
    }

    /// Copies a host binary (a path, or a name looked up on `$PATH`) with its shared libraries.
    pub fn binary(mut self, binary: impl Into<String>) -> Self {
        let binary = binary.into();
        if !self.binaries.contains(&binary) {
            self.binaries.push(binary);
        }
        self
    }

    /// Puts `data` at `guest_path` with `mode`.
    pub fn file(mut self, guest_path: impl Into<PathBuf>, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((guest_path.into(), mode, data.into()));
        self
    }

    /// Wall-clock limit for the whole run, boot included (default 120 s). On expiry QEMU is killed and
    /// the run fails with "timed out".
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Guest memory (default 512 MiB).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Appends a kernel command-line parameter.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.cmdline.push(arg.to_string());
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Boots the VM, runs the scenario to its result marker (or the timeout) and shuts the VM down.
    pub fn run(&self) -> Result<VmReport, VmError> {
        Vm::start(self)?.wait()
    }

    /// Builds the initramfs for this scenario against a prepared kernel.
    pub fn initramfs(&self, kernel: &crate::kernel::Kernel) -> Result<Initramfs, VmError> {
        let busybox = crate::deps::which("busybox").ok_or_else(|| VmError::MissingTool {
            what: "busybox".into(),
            hint: format!("run {}", crate::deps::install_script().display()),
        })?;
        let mut fs = Initramfs::new();
        for d in ["/proc", "/sys", "/dev", "/tmp", "/run", "/mnt", "/etc", "/root", "/usr/bin", "/usr/sbin"] {
            fs.dir(d);
        }
        fs.copy_file(&busybox, "/bin/busybox", 0o755)?;
        fs.symlink("/bin/sh", "busybox");
        fs.symlink("/etc/mtab", "/proc/mounts");
        for b in &self.binaries {
            fs.host_binary(b)?;
        }
        let mut loads = String::new();
        for (name, path) in &kernel.modules {
            fs.copy_file(path, format!("/lib/modules/{name}.ko"), 0o644)?;
            let params: Vec<&str> =
                self.module_params.iter().filter(|(m, _)| m == name).map(|(_, p)| p.as_str()).collect();
            loads.push_str(&format!("load_module {name} {}\n", params.join(" ")));
        }
        for (path, mode, data) in &self.files {
            fs.file(path, *mode, data.clone());
        }
        let mut env = String::new();
        for (k, v) in &self.env {
            env.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        fs.file("/init", 0o755, INIT.replace("@MODULES@", &loads).replace("@ENV@", &env));
        fs.file("/sanvol-lib.sh", 0o644, LIB);
        fs.file("/scenario.sh", 0o755, self.script.clone());
        Ok(fs)
    }
}

pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's PID 1. Prints the result marker on every path (including a failed module load or
/// network setup) and powers off; if it somehow dies, the kernel panics (`panic=-1` → QEMU exits
/// because of `-no-reboot`) and the runner reports "no result marker".
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
echo "SANVOL-VM-INIT: $(cut -d' ' -f1 /proc/uptime)"

result() {
    echo "SANVOL-VM-RESULT: $*"
    sync
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

load_module() {
    name=$1; shift
    insmod "/lib/modules/$name.ko" "$@" || result "FAIL insmod $name failed"
}
@MODULES@
# Network: 10.0.2.15 with a host route to 10.0.2.2 (the host's loopback through QEMU's slirp) and no
# other route, so the guest can reach the test's services and nothing else.
ip link set lo up || result "FAIL network: lo"
ip link set eth0 up || result "FAIL network: no eth0 (virtio-net missing?)"
ip addr add 10.0.2.15/32 dev eth0 || result "FAIL network: address"
ip route add 10.0.2.2/32 dev eth0 || result "FAIL network: route"
export SANVOL_HOST=10.0.2.2
@ENV@
echo "SANVOL-VM-READY: $(cut -d' ' -f1 /proc/uptime)"
/bin/sh -c 'set -eu -o pipefail; . /sanvol-lib.sh; . /scenario.sh' </dev/console >/dev/console 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then
    result PASS
elif [ -s /run/sanvol-fail-reason ]; then
    result "FAIL $(cat /run/sanvol-fail-reason) (step: $(cat /run/sanvol-step 2>/dev/null || echo none))"
else
    result "FAIL scenario exited with status $rc in step '$(cat /run/sanvol-step 2>/dev/null || echo none)'"
fi
"#;

/// Helpers sourced by every scenario.
const LIB: &str = r#"# sanvol vm-tests helpers (see vm-tests/src/scenario.rs)
step() {
    echo "$*" > /run/sanvol-step
    echo "SANVOL-VM-STEP: $* ($(cut -d' ' -f1 /proc/uptime))"
}
fail() {
    echo "$*" > /run/sanvol-fail-reason
    exit 1
}
expect_eq() {
    [ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"
}
"#;
