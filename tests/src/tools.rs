//! Helpers for testing our NBD server with real external tools (nbdinfo,
//! nbdcopy, qemu-img, qemu-io, fio, ...).
//!
//! Why: each interop test starts our server in-process on a temporary
//! socket, runs one tool against it, and checks the tool's exit status and
//! output. Tools run as child processes that are killed (by PID, via
//! `kill_on_drop`) if the test fails or times out, and the server stops when
//! its guard is dropped. A missing tool fails the test with the fix, never
//! skips it.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blockio::server::{ExportSource, NbdServer, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long one tool run may take before the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Path of `tool` on `PATH`; panics telling how to install it.
pub fn require_tool(tool: &str) -> PathBuf {
    crate::peers::require_tool(tool)
}

/// Our server, running on this test's runtime, on a unix socket (and
/// optionally TCP) in a temporary directory. Stops on drop.
pub struct ServedExports {
    pub server: NbdServer,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp_port: Option<u16>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl ServedExports {
    /// Serves `exports` on a fresh unix socket.
    pub async fn unix(exports: Arc<dyn ExportSource>) -> ServedExports {
        ServedExports::unix_with(exports, ServerConfig::default()).await
    }

    /// Like [`ServedExports::unix`] with a server configuration (e.g. TLS).
    pub async fn unix_with(exports: Arc<dyn ExportSource>, config: ServerConfig) -> ServedExports {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind unix socket");
        let server = NbdServer::new(exports, config);
        let mut served = ServedExports { server, dir, socket, tcp_port: None, stops: Vec::new(), tasks: Vec::new() };
        let (stop, stopped) = oneshot::channel();
        let server = served.server.clone();
        served.tasks.push(tokio::spawn(async move {
            server
                .serve_unix(listener, async {
                    let _ = stopped.await;
                })
                .await
        }));
        served.stops.push(stop);
        served
    }

    /// Also serves on `127.0.0.1` at an ephemeral port.
    pub async fn with_tcp(mut self) -> ServedExports {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        self.tcp_port = Some(listener.local_addr().unwrap().port());
        let (stop, stopped) = oneshot::channel();
        let server = self.server.clone();
        self.tasks.push(tokio::spawn(async move {
            server
                .serve_tcp(listener, async {
                    let _ = stopped.await;
                })
                .await
        }));
        self.stops.push(stop);
        self
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` (after [`ServedExports::with_tcp`]).
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.tcp_port.expect("with_tcp() first"))
    }

    /// A path for scratch files next to the socket.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops accepting, lets connections finish, and checks the server
    /// stopped without error.
    pub async fn stop(mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            t.await.expect("server task panicked").expect("server failed");
        }
    }
}

impl Drop for ServedExports {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The result of one tool run.
#[derive(Debug)]
pub struct ToolRun {
    pub command: String,
    pub output: Output,
}

impl ToolRun {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// Panics with the tool's output unless it exited with status 0.
    pub fn success(self) -> ToolRun {
        assert!(
            self.output.status.success(),
            "`{}` failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.command,
            self.output.status,
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// Runs `tool args...` to completion (killed if it outlives
/// [`TOOL_TIMEOUT`] or the test), capturing its output.
pub async fn run_tool(tool: &str, args: &[&str]) -> ToolRun {
    run_tool_in(tool, args, None).await
}

/// Like [`run_tool`], in working directory `cwd`.
pub async fn run_tool_in(tool: &str, args: &[&str], cwd: Option<&Path>) -> ToolRun {
    let path = require_tool(tool);
    let command = format!("{tool} {}", args.join(" "));
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let output = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{command}` did not finish within {TOOL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("waiting for `{command}`: {e}"));
    ToolRun { command, output }
}

/// Bytes with a recognizable, position-dependent pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i / 512) as u8).wrapping_mul(31).wrapping_add(seed) ^ (i as u8)).collect()
}
