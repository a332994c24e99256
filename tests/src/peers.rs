//! Real NBD peers for interop tests: nbdkit, qemu-nbd, nbd-server and the
//! `nbd` crate's (blocking) server, each on a temporary unix socket (or a
//! 127.0.0.1 port), stopped when its guard drops, even if the test panics.
//!
//! Why no sleeps: readiness is observed, never assumed. nbdkit writes its
//! `-P` pid file only once it listens; for qemu-nbd and nbd-server we watch
//! `/proc/net/unix` until the socket is in the listening state, which (unlike
//! a probe connection) does not use up nbd-server's single `-d` connection.
//! Every wait is bounded and fails with the peer's stderr.
//!
//! A missing tool is a test failure that says to run
//! `scripts/install-deps.sh`, never a silent skip.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockio::uri::{NbdUri, Transport};

/// How long a peer may take to start listening.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Checks that `tool` is on `PATH`; panics with the fix if not.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{tool}` is not installed, and this test needs it as a real NBD peer: run scripts/install-deps.sh \
         (it installs nbdkit, qemu-utils, nbd-server and libnbd-bin)"
    );
}

/// A running peer process. Killed (by its PID) and reaped on drop.
pub struct Peer {
    name: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    stderr_path: PathBuf,
    uri: NbdUri,
    /// nbdkit's arguments, for [`Peer::restart`].
    nbdkit_args: Option<Vec<std::ffi::OsString>>,
}

impl Peer {
    /// URI of the peer's default export (or the one it was started with).
    pub fn uri(&self) -> NbdUri {
        self.uri.clone()
    }

    /// URI of another export on the same server.
    pub fn uri_for(&self, export: &str) -> NbdUri {
        self.uri.with_export(export)
    }

    /// The peer's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Temporary directory that holds the socket, pid file and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the peer wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Kills the peer at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `cmd` (with stderr captured into the temp dir) and waits until
    /// `ready` says it is listening.
    fn spawn(name: &str, dir: tempfile::TempDir, mut cmd: Command, uri: NbdUri, ready: Ready) -> Peer {
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e} (run scripts/install-deps.sh)"));
        let mut peer = Peer { name: name.to_string(), child: Some(child), dir, stderr_path, uri, nbdkit_args: None };
        peer.wait_ready(&ready);
        peer
    }

    /// Starts an nbdkit peer again (after [`Peer::kill`]), on the same socket
    /// with the same arguments: with `nbdkit_file` the same device comes
    /// back with its data.
    pub fn restart(&mut self) {
        self.kill();
        let args = self.nbdkit_args.clone().expect("only nbdkit peers made by nbdkit_file restart");
        let pid = self.dir.path().join("nbdkit.pid");
        let _ = std::fs::remove_file(&pid);
        let _ = std::fs::remove_file(self.dir.path().join("nbd.sock"));
        let stderr = File::options().append(true).open(&self.stderr_path).expect("open stderr log");
        let mut cmd = Command::new(require_tool("nbdkit"));
        cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("cannot restart nbdkit: {e}")));
        self.wait_ready(&Ready::PidFile(pid));
    }

    fn wait_ready(&mut self, ready: &Ready) {
        let peer = self;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = peer.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("{} exited with {status} before it was ready; stderr:\n{}", peer.name, peer.stderr());
            }
            let is_ready = match &ready {
                Ready::PidFile(p) => std::fs::read_to_string(p).is_ok_and(|s| s.trim().parse::<u32>().is_ok()),
                Ready::UnixListening(p) => unix_socket_listening(p),
                Ready::PidFileAndUnixListening(f, p) => f.exists() && unix_socket_listening(p),
            };
            if is_ready {
                return;
            }
            if Instant::now() > deadline {
                panic!("{} did not become ready within {:?}; stderr:\n{}", peer.name, STARTUP_TIMEOUT, peer.stderr());
            }
            // Polling an external process's state: there is nothing to await.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Ready {
    PidFile(PathBuf),
    UnixListening(PathBuf),
    PidFileAndUnixListening(PathBuf, PathBuf),
}

/// Whether a unix socket bound at `path` is in the listening state, read
/// from `/proc/net/unix` (flag `__SO_ACCEPTCON` = 0x10000).
pub fn unix_socket_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8 && cols[7] == want && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// A 127.0.0.1 port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("create temp dir")
}

/// `nbdkit` on a temp unix socket with `args` (filters, plugin, plugin
/// arguments), e.g. `&["memory", "64M"]` or
/// `&["--filter=error", "memory", "64M", "error-rate=100%"]`.
pub fn nbdkit(args: &[&str]) -> Peer {
    let bin = require_tool("nbdkit");
    let dir = temp_dir("sanvol-nbdkit-");
    let sock = dir.path().join("nbd.sock");
    let pid = dir.path().join("nbdkit.pid");
    let mut cmd = Command::new(bin);
    cmd.arg("--foreground").arg("--exit-with-parent").arg("-U").arg(&sock).arg("-P").arg(&pid).args(args);
    let uri = NbdUri::unix(&sock, "");
    Peer::spawn("nbdkit", dir, cmd, uri, Ready::PidFile(pid))
}

/// `nbdkit file` over a sparse file of `size_bytes` in its temp dir, on a
/// temp unix socket: the data outlives the process, so [`Peer::restart`]
/// brings the same device back (a device that went away and returned).
pub fn nbdkit_file(size_bytes: u64) -> Peer {
    let dir = temp_dir("sanvol-nbdkit-");
    let sock = dir.path().join("nbd.sock");
    let pid = dir.path().join("nbdkit.pid");
    let image = sparse_file(dir.path(), size_bytes);
    let args: Vec<std::ffi::OsString> = vec![
        "--foreground".into(),
        "--exit-with-parent".into(),
        "-U".into(),
        sock.clone().into(),
        "-P".into(),
        pid.clone().into(),
        "file".into(),
        image.into(),
    ];
    let mut cmd = Command::new(require_tool("nbdkit"));
    cmd.args(&args);
    let mut peer = Peer::spawn("nbdkit", dir, cmd, NbdUri::unix(&sock, ""), Ready::PidFile(pid));
    peer.nbdkit_args = Some(args);
    peer
}

/// `nbdkit` on 127.0.0.1 and a free port.
pub fn nbdkit_tcp(args: &[&str]) -> Peer {
    let bin = require_tool("nbdkit");
    let dir = temp_dir("sanvol-nbdkit-");
    let pid = dir.path().join("nbdkit.pid");
    let port = free_tcp_port();
    let mut cmd = Command::new(bin);
    cmd.arg("--foreground")
        .arg("--exit-with-parent")
        .arg("-i")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .arg("-P")
        .arg(&pid)
        .args(args);
    let uri = NbdUri::tcp("127.0.0.1", port, "");
    Peer::spawn("nbdkit", dir, cmd, uri, Ready::PidFile(pid))
}

/// `sanvol-target` over a sparse file of `size_bytes`, on a temp unix
/// socket, trusting the server key in `server_pub` (a `.pub` file).
pub fn sanvol_target(size_bytes: u64, server_pub: &Path) -> Peer {
    let dir = temp_dir("sanvol-target-");
    let sock = dir.path().join("nbd.sock");
    let image = sparse_file(dir.path(), size_bytes);
    let mut cmd = Command::new(crate::system::bin("sanvol-target"));
    cmd.arg("--device")
        .arg(&image)
        .arg("--unix")
        .arg(&sock)
        .arg("--server-key")
        .arg(server_pub)
        .arg("--state-dir")
        .arg(dir.path().join("state"));
    let uri = NbdUri::unix(&sock, "");
    Peer::spawn("sanvol-target", dir, cmd, uri, Ready::UnixListening(sock))
}

/// Creates a sparse file of `size_bytes` in the peer's future temp dir.
pub fn sparse_file(dir: &Path, size_bytes: u64) -> PathBuf {
    let path = dir.join("disk.img");
    File::create(&path).and_then(|f| f.set_len(size_bytes)).expect("create disk image");
    path
}

/// `qemu-nbd` serving a raw sparse file of `size_bytes` as export `export`,
/// `--persistent` so it accepts several connections, on a unix socket.
pub fn qemu_nbd(size_bytes: u64, export: &str, extra: &[&str]) -> Peer {
    let bin = require_tool("qemu-nbd");
    let dir = temp_dir("sanvol-qemu-nbd-");
    let sock = dir.path().join("nbd.sock");
    let pid = dir.path().join("qemu-nbd.pid");
    let image = sparse_file(dir.path(), size_bytes);
    let mut cmd = Command::new(bin);
    cmd.arg("--persistent")
        .arg("-k")
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid)
        .arg("-f")
        .arg("raw")
        .arg("-x")
        .arg(export)
        .arg("--shared=8")
        .args(extra)
        .arg(&image);
    let uri = NbdUri::unix(&sock, export);
    Peer::spawn("qemu-nbd", dir, cmd, uri, Ready::PidFileAndUnixListening(pid, sock))
}

/// `qemu-nbd` re-exporting the NBD export `target` (a unix socket) through
/// QEMU's own NBD client with `reconnect-delay`: when `target`'s server goes
/// away and comes back, QEMU reconnects and resends what was in flight, and
/// requests wait (up to `reconnect_delay_secs`) instead of failing — what a VM
/// whose disk is a sanvol export sees across an agent restart.
pub fn qemu_nbd_reconnecting(target: &NbdUri, reconnect_delay_secs: u32) -> Peer {
    let bin = require_tool("qemu-nbd");
    let dir = temp_dir("sanvol-qemu-nbd-");
    let sock = dir.path().join("nbd.sock");
    let pid = dir.path().join("qemu-nbd.pid");
    let Transport::Unix { socket: target_socket } = &target.transport else {
        panic!("{target}: a unix-socket export expected")
    };
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={},reconnect-delay={reconnect_delay_secs}",
        target_socket.display(),
        target.export
    );
    let mut cmd = Command::new(bin);
    cmd.arg("--persistent")
        .arg("-k")
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid)
        .arg("--shared=8")
        .arg("--image-opts")
        .arg(opts);
    let uri = NbdUri::unix(&sock, "");
    Peer::spawn("qemu-nbd", dir, cmd, uri, Ready::PidFileAndUnixListening(pid, sock))
}

/// `nbd-server` 3.x in the foreground (`-d`) with a generated config
/// (`-C`) exporting a sparse file of `size_bytes` as `export` on a unix
/// socket (`unixsock`), with flush, FUA and trim enabled and listing
/// allowed.
///
/// Note: with `-d` nbd-server serves exactly one connection and then exits,
/// so each test connection needs its own server.
pub fn nbd_server(size_bytes: u64, export: &str) -> Peer {
    let bin = require_tool("nbd-server");
    let dir = temp_dir("sanvol-nbd-server-");
    let sock = dir.path().join("nbd.sock");
    let image = sparse_file(dir.path(), size_bytes);
    let config = dir.path().join("config");
    let text = format!(
        "[generic]\n    unixsock = {}\n    allowlist = true\n[{export}]\n    exportname = {}\n    flush = true\n    fua = true\n    trim = true\n",
        sock.display(),
        image.display()
    );
    std::fs::write(&config, text).expect("write nbd-server config");
    let mut cmd = Command::new(bin);
    cmd.arg("-d").arg("-C").arg(&config);
    let uri = NbdUri::unix(&sock, export);
    Peer::spawn("nbd-server", dir, cmd, uri, Ready::UnixListening(sock))
}

/// The `nbd` crate's blocking server on a std thread: fixed newstyle, but it
/// answers `NBD_OPT_GO` and structured replies with `ERR_UNSUP`, so clients
/// must fall back to `NBD_OPT_EXPORT_NAME` and simple replies. Each
/// connection gets its own thread and file handle on one shared file.
pub struct RustNbdServer {
    dir: tempfile::TempDir,
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RustNbdServer {
    pub fn start(size_bytes: u64) -> RustNbdServer {
        let dir = temp_dir("sanvol-rust-nbd-");
        let sock = dir.path().join("nbd.sock");
        let image = sparse_file(dir.path(), size_bytes);
        let listener = UnixListener::bind(&sock).expect("bind unix socket");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let image = image.clone();
                std::thread::spawn(move || {
                    let result = nbd::server::handshake(&mut conn, |_name| {
                        let file = std::fs::OpenOptions::new().read(true).write(true).open(&image)?;
                        Ok(nbd::server::Export {
                            size: size_bytes,
                            data: file,
                            readonly: false,
                            resizeable: false,
                            rotational: false,
                            send_trim: false,
                            send_flush: true,
                        })
                    })
                    .and_then(|file| nbd::server::transmission(&mut conn, file));
                    if let Err(e) = result {
                        if e.kind() != std::io::ErrorKind::UnexpectedEof {
                            eprintln!("nbd crate server: {e}");
                        }
                    }
                });
            }
        });
        RustNbdServer { dir, sock, stop, thread: Some(thread) }
    }

    pub fn uri(&self) -> NbdUri {
        NbdUri::unix(&self.sock, "")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RustNbdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = std::os::unix::net::UnixStream::connect(&self.sock);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a peer's whole file (e.g. to check what a client wrote).
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut v)).expect("read file");
    v
}

/// A certificates directory (CA, server and client certificates for
/// `localhost` and 127.0.0.1, in the layout nbdkit, qemu and libnbd read)
/// in a temporary directory; removed on drop.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        require_tool("openssl");
        let dir = temp_dir("sanvol-pki-");
        blockio::tls::make_test_certificates(dir.path(), &["localhost", "127.0.0.1"])
            .unwrap_or_else(|e| panic!("making test certificates: {e}"));
        TestPki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `uri` as an `nbds` URI that trusts this CA (server name `localhost`).
    pub fn tls_uri(&self, uri: &NbdUri) -> NbdUri {
        let mut u = uri.clone();
        u.tls_required = true;
        u.tls.tls_certificates = Some(self.path().to_path_buf());
        if matches!(u.transport, blockio::uri::Transport::Unix { .. }) {
            u.tls.tls_hostname = Some("localhost".into());
        }
        u
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
