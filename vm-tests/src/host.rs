//! Host-side peers for scenarios. Both bind their listening socket on 127.0.0.1 (10.0.2.2 from the
//! guest) *before* anything serves it, so the port is known and accepting at once: no readiness
//! polling, no port races.
//!
//! - [`BlockioExport`]: sanvol's own NBD server (blockio) over any [`BlockDevice`], in-process on its
//!   own tokio runtime; the test can read the device directly afterwards.
//! - [`NbdkitExport`]: an nbdkit process (a real third-party peer, as the pool's devices are), handed
//!   the socket by systemd socket activation (`LISTEN_FDS`).

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::sync::Arc;

use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::BlockDevice;

use crate::VmError;

/// blockio's NBD server serving one device (as the default export) until dropped.
pub struct BlockioExport<D: BlockDevice + 'static> {
    device: Arc<D>,
    port: u16,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<D: BlockDevice + 'static> BlockioExport<D> {
    pub fn serve(device: D) -> Result<Self, VmError> {
        let device = Arc::new(device);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vm-tests-nbd")
            .enable_all()
            .build()
            .map_err(VmError::io("starting a tokio runtime"))?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(VmError::io("binding 127.0.0.1:0"))?;
        let port = listener.local_addr().map_err(VmError::io("reading the listener's port"))?.port();
        listener.set_nonblocking(true).map_err(VmError::io("setting the listener non-blocking"))?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(VmError::io("registering the listener"))?
        };
        let dyn_device: Arc<dyn BlockDevice> = device.clone();
        let server = NbdServer::new(Arc::new(ExportTable::single("", dyn_device)), ServerConfig::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            if let Err(e) = server
                .serve_tcp(listener, async {
                    let _ = stopped.await;
                })
                .await
            {
                eprintln!("vm-tests: blockio NBD server stopped: {e}");
            }
        });
        Ok(BlockioExport { device, port, runtime: Some(runtime), stop: Some(stop) })
    }

    /// The port on 127.0.0.1; the guest reaches it as `10.0.2.2:<port>`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The served device, for checks from the host side.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// Reads `len` bytes at `offset` straight from the device.
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, blockio::IoError> {
        let rt = self.runtime.as_ref().expect("runtime lives until drop");
        rt.block_on(self.device.read(offset, len)).map(|b| b.to_vec())
    }
}

impl<D: BlockDevice + 'static> Drop for BlockioExport<D> {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

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
