//! Host-side peers for scenarios.
//!
//! [`NbdkitExport`] serves a file over NBD on 127.0.0.1 (10.0.2.2 from the guest). The test binds the
//! listening socket itself and hands it to nbdkit by systemd socket activation (`LISTEN_FDS`), so the
//! port is known and accepting before nbdkit even starts: no readiness polling, no port races.
//! It is a stand-in until the blockio NBD server can be used in-process.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::VmError;

/// An nbdkit process serving one export, killed (by its PID) when dropped.
pub struct NbdkitExport {
    child: Child,
    port: u16,
}

impl NbdkitExport {
    /// Serves `file` read-write with nbdkit's `file` plugin.
    pub fn file(file: &Path) -> Result<Self, VmError> {
        Self::spawn(&["file", &format!("file={}", file.display())])
    }

    /// Runs `nbdkit -f --exit-with-parent <plugin_args>` on a fresh 127.0.0.1 port.
    pub fn spawn(plugin_args: &[&str]) -> Result<Self, VmError> {
        let nbdkit = crate::deps::which("nbdkit").ok_or_else(|| VmError::MissingTool {
            what: "nbdkit".into(),
            hint: "run scripts/install-deps.sh".into(),
        })?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(VmError::io("binding 127.0.0.1:0"))?;
        let port = listener.local_addr().map_err(VmError::io("reading the listener's port"))?.port();
        let fd = listener.as_raw_fd();
        // `exec` keeps the shell's PID, which is what LISTEN_PID must name.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" -f --exit-with-parent \"$@\"")
            .arg(&nbdkit)
            .args(plugin_args)
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2, fcntl, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    // dup2(3, 3) would keep close-on-exec set.
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(VmError::io(format!("starting {}", nbdkit.display())))?;
        drop(listener); // nbdkit has its own copy of the socket
        Ok(NbdkitExport { child, port })
    }

    /// The port on 127.0.0.1; the guest reaches it as `10.0.2.2:<port>`.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NbdkitExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
