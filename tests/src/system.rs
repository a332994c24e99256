//! The whole sanvol stack as real processes, for cross-process tests:
//! nbdkit devices → `sanvol pool init` → `sanvol-mds` → `sanvol-agent`s.
//!
//! Every process is started by the fixture, recorded by PID and killed on
//! drop, even when the test panics. Readiness is observed (the process's
//! unix socket enters the listening state), never assumed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockio::uri::NbdUri;

use crate::peers::{self, Peer};

/// How long one of our processes may take to start listening.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of a workspace binary (built by `cargo build --workspace`, which
/// `scripts/test.sh` runs before the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is not built: run `cargo build --workspace` (scripts/test.sh does)", path.display());
    path
}

/// Path of a workspace example (built by `cargo build --workspace
/// --all-targets`, which `scripts/test.sh` runs before the tests).
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --all-targets` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// One of our processes. Killed (SIGKILL, by PID) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout+stderr in `log` and waits until `socket`
    /// listens.
    pub fn spawn_until_listening(name: &str, cmd: Command, log: PathBuf, socket: &Path) -> Proc {
        let mut p = Proc::spawn(name, cmd, log);
        p.wait_listening(socket);
        p
    }

    /// Starts `cmd` with stdout+stderr in `log`, without waiting for it.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name: name.to_string(), child: Some(child), log }
    }

    /// Waits until `socket` listens (panics with the log if the process
    /// exits first or it takes too long).
    pub fn wait_listening(&mut self, socket: &Path) {
        let name = self.name.clone();
        let p = self;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = p.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("{name} exited with {status} before it was ready; log:\n{}", p.log());
            }
            if peers::unix_socket_listening(socket) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen on {} within {STARTUP_TIMEOUT:?}; log:\n{}",
                socket.display(),
                p.log()
            );
            // Polling another process's socket state: there is nothing to await.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself (e.g. at a fault point).
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().map(|c| c.wait().expect("wait"))
    }

    /// Waits for the process to exit, at most `limit` (panics with its log).
    pub fn wait_exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}; log:\n{}", self.name, self.log());
            // Waiting for another process to exit, with a bound: nothing to await.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, ...) to the process while it runs.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on a process this harness started and has not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit (bounded); SIGKILL if it hangs.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} did not exit within 20 s of SIGTERM; log:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pool on nbdkit memory devices with its metadata server.
/// How long [`Stack::sanvol_ok`] retries a refusal the server calls
/// transient.
pub const TRANSIENT_RETRY_SECS: u64 = 20;

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub devices: Vec<Peer>,
    pub mds: Option<Proc>,
    pub mds_socket: PathBuf,
    pub mds_key: PathBuf,
    pub admin_key: PathBuf,
    pub lease_ms: u64,
    /// `durable_ms` / `grace_ms` in the server config (server defaults if None).
    pub durable_ms: Option<u64>,
    pub grace_ms: Option<u64>,
    /// The longest device request (the fencing timing rules): the server's
    /// `device_request_max_ms` and every agent's `--device-request-max-ms`
    /// started after it is set (both defaults if None).
    pub device_request_max_ms: Option<u64>,
    /// Extra environment for the next `start_mds` (e.g. `SANVOL_FAULT`).
    pub mds_env: Vec<(String, String)>,
    /// Extra lines for the server config of the next `start_mds`.
    pub mds_config_extra: Vec<String>,
    /// The pool lease's I/O timeout `T` of the servers started from now
    /// (500 ms; a stack whose devices delay every write wants more: a lease
    /// write queued behind them must not time out).
    pub lease_io_timeout_ms: u64,
    /// With [`Stack::new_tls`]: the certificates the devices use.
    pub pki: Option<peers::TestPki>,
    /// Addresses of further metadata servers (standbys started with
    /// [`Stack::start_server`]): agents and the CLI get them after the first.
    pub more_mds: Vec<String>,
}

/// A further `sanvol-mds` of the same pool (its own host id, socket and log).
pub struct ServerProc {
    pub host_id: u32,
    pub name: String,
    pub socket: PathBuf,
    pub proc: Proc,
}

impl ServerProc {
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

impl Stack {
    /// `count` nbdkit memory devices of `size` (e.g. "1G"), a fresh pool
    /// initialised on them, and keys for the server and an admin. The server
    /// is not started yet (see [`Stack::start_mds`]).
    pub fn new(count: usize, size: &str) -> Stack {
        Stack::build(count, size, None)
    }

    /// Like [`Stack::new`], with devices served by `nbdkit --tls=require`
    /// (X.509) and recorded in the pool as `nbds+unix://` URIs that name the
    /// CA: everything that talks to a device does it over TLS.
    pub fn new_tls(count: usize, size: &str) -> Stack {
        Stack::build(count, size, Some(peers::TestPki::new()))
    }

    /// Like [`Stack::new`], with `nbdkit file` devices of `size_bytes`
    /// (sparse files): a device's nbdkit can be restarted
    /// ([`Peer::restart`]) and the same device, data and label, comes back.
    pub fn new_file_devices(count: usize, size_bytes: u64) -> Stack {
        Stack::init((0..count).map(|_| peers::nbdkit_file(size_bytes)).collect(), None)
    }

    /// A pool initialised on `devices` (peers the test started itself, e.g.
    /// nbdkit with particular options).
    pub fn with_devices(devices: Vec<Peer>) -> Stack {
        Stack::init(devices, None)
    }

    fn build(count: usize, size: &str, pki: Option<peers::TestPki>) -> Stack {
        let devices: Vec<Peer> = match &pki {
            None => (0..count).map(|_| peers::nbdkit(&["memory", size])).collect(),
            Some(pki) => {
                let certs = format!("--tls-certificates={}", pki.path().display());
                (0..count).map(|_| peers::nbdkit(&["--tls=require", &certs, "memory", size])).collect()
            }
        };
        Stack::init(devices, pki)
    }

    /// Like [`Stack::new_file_devices`], with the devices served by
    /// `sanvol-target` (fencing: they let in only connections with a
    /// capability of the pool's server key).
    pub fn new_target_devices(count: usize, size_bytes: u64) -> Stack {
        let (dir, mds_key, admin_key) = Stack::keys();
        let devices = (0..count).map(|_| peers::sanvol_target(size_bytes, &pub_path(&mds_key))).collect();
        Stack::init_in(dir, mds_key, admin_key, devices, None, true)
    }

    fn keys() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::Builder::new().prefix("sanvol-stack-").tempdir().expect("temp dir");
        let mds_key = dir.path().join("mds.key");
        let admin_key = dir.path().join("admin.key");
        run_ok(Command::new(bin("sanvol")).arg("keygen").arg(&mds_key));
        run_ok(Command::new(bin("sanvol")).arg("keygen").arg(&admin_key));
        (dir, mds_key, admin_key)
    }

    fn init(devices: Vec<Peer>, pki: Option<peers::TestPki>) -> Stack {
        let (dir, mds_key, admin_key) = Stack::keys();
        Stack::init_in(dir, mds_key, admin_key, devices, pki, false)
    }

    fn init_in(
        dir: tempfile::TempDir,
        mds_key: PathBuf,
        admin_key: PathBuf,
        devices: Vec<Peer>,
        pki: Option<peers::TestPki>,
        fencing_devices: bool,
    ) -> Stack {
        let stack = Stack {
            mds_socket: dir.path().join("mds.sock"),
            dir,
            devices,
            mds: None,
            mds_key,
            admin_key,
            lease_ms: 3000,
            durable_ms: None,
            grace_ms: None,
            device_request_max_ms: None,
            mds_env: Vec::new(),
            mds_config_extra: Vec::new(),
            lease_io_timeout_ms: 500,
            pki,
            more_mds: Vec::new(),
        };
        let mut init = Command::new(bin("sanvol"));
        init.args(["pool", "init", "--name", "test"]);
        for uri in stack.device_uris() {
            init.arg("--device").arg(uri.to_string());
        }
        init.arg("--server-key").arg(pub_path(&stack.mds_key)).arg("--admin-key").arg(pub_path(&stack.admin_key));
        if fencing_devices {
            init.arg("--server-signing-key").arg(&stack.mds_key);
        }
        run_ok(&mut init);
        stack
    }

    /// The devices' URIs as the pool records them (`nbds+unix://` with TLS).
    pub fn device_uris(&self) -> Vec<NbdUri> {
        self.devices
            .iter()
            .map(|d| match &self.pki {
                Some(pki) => pki.tls_uri(&d.uri()),
                None => d.uri(),
            })
            .collect()
    }

    pub fn mds_addr(&self) -> String {
        format!("unix:{}", self.mds_socket.display())
    }

    /// The server config of host id `host_id` listening on `socket`.
    fn write_mds_config(&self, host_id: u32, socket: &Path) -> PathBuf {
        let config = self.dir.path().join(format!("mds-{host_id}.toml"));
        let devices: Vec<String> = self.device_uris().iter().map(|u| format!("{:?}", u.to_string())).collect();
        std::fs::write(
            &config,
            format!(
                "listen = [{:?}]\nkey = {:?}\ndevices = [{}]\nlease_ms = {}\nlease_io_timeout_ms = {}\n\
                 host_id = {host_id}\nname = \"mds-{host_id}\"\n",
                format!("unix:{}", socket.display()),
                self.mds_key.display().to_string(),
                devices.join(", "),
                self.lease_ms,
                self.lease_io_timeout_ms
            ) + &self.durable_ms.map(|ms| format!("durable_ms = {ms}\n")).unwrap_or_default()
                + &self.grace_ms.map(|ms| format!("grace_ms = {ms}\n")).unwrap_or_default()
                + &self.device_request_max_ms.map(|ms| format!("device_request_max_ms = {ms}\n")).unwrap_or_default()
                + &self.mds_config_extra.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .expect("write mds.toml");
        config
    }

    /// Writes the server config and starts `sanvol-mds` (host id 1).
    pub fn start_mds(&mut self) {
        let config = self.write_mds_config(1, &self.mds_socket.clone());
        let _ = std::fs::remove_file(&self.mds_socket);
        let mut cmd = Command::new(bin("sanvol-mds"));
        cmd.arg("--config").arg(&config).envs(self.mds_env.iter().map(|(k, v)| (k, v)));
        let log = self.dir.path().join(format!("mds-{}.log", next_log_number()));
        self.mds = Some(Proc::spawn_until_listening("sanvol-mds", cmd, log, &self.mds_socket));
    }

    /// Starts a further `sanvol-mds` of this pool with host id `host_id`
    /// (it stands by while another is active).
    pub fn start_server(&self, host_id: u32) -> ServerProc {
        let mut server = self.spawn_server(host_id);
        server.proc.wait_listening(&server.socket.clone());
        server
    }

    /// Like [`Stack::start_server`], without waiting for it to listen (to
    /// start several at the same moment).
    pub fn spawn_server(&self, host_id: u32) -> ServerProc {
        let socket = self.dir.path().join(format!("mds-{host_id}.sock"));
        let config = self.write_mds_config(host_id, &socket);
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(bin("sanvol-mds"));
        cmd.arg("--config").arg(&config);
        let log = self.dir.path().join(format!("mds-{host_id}-{}.log", next_log_number()));
        let proc = Proc::spawn("sanvol-mds", cmd, log);
        ServerProc { host_id, name: format!("mds-{host_id}"), socket, proc }
    }

    /// `sanvol ARGS` as the admin against the servers at `mds` only.
    pub fn sanvol_at(&self, mds: &str, args: &[&str]) -> Output {
        Command::new(bin("sanvol"))
            .env("SANVOL_MDS", mds)
            .env("SANVOL_KEY", &self.admin_key)
            .env("SANVOL_SERVER_KEY", pub_path(&self.mds_key))
            .args(args)
            .output()
            .expect("run sanvol")
    }

    /// Every metadata server address, first one first (`a,b,...`).
    pub fn all_mds_addrs(&self) -> String {
        std::iter::once(self.mds_addr()).chain(self.more_mds.iter().cloned()).collect::<Vec<_>>().join(",")
    }

    pub fn kill_mds(&mut self) {
        if let Some(mut p) = self.mds.take() {
            p.kill();
        }
    }

    pub fn mds_log(&self) -> String {
        self.mds.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    /// The last `lines` lines of every process log of this stack (servers,
    /// agents), each under its file name: what a failing test prints.
    pub fn all_logs(&self, lines: usize) -> String {
        let mut logs: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
            .unwrap_or_default();
        logs.sort();
        let mut out = String::new();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out += &format!("==== {} ====\n", path.display());
            for line in &all[all.len().saturating_sub(lines)..] {
                out += line;
                out.push('\n');
            }
        }
        // The device servers too: whether each still runs, and what it said.
        for (i, d) in self.devices.iter().enumerate() {
            let pid = d.pid();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
                .map_or("gone".to_string(), |c| if c == 'Z' { "exited".into() } else { format!("running ({c})") });
            let stderr = d.stderr();
            let all: Vec<&str> = stderr.lines().collect();
            out += &format!("==== device {i} ({}), pid {pid}: {state}; its stderr ====\n", d.uri());
            for line in &all[all.len().saturating_sub(lines)..] {
                out += line;
                out.push('\n');
            }
        }
        out
    }

    /// `sanvol ARGS` as the admin; returns the whole output.
    pub fn sanvol(&self, args: &[&str]) -> Output {
        self.sanvol_command(args).output().expect("run sanvol")
    }

    /// The command `sanvol ARGS` as the admin, to run in the background.
    pub fn sanvol_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("sanvol"));
        cmd.env("SANVOL_MDS", self.all_mds_addrs())
            .env("SANVOL_KEY", &self.admin_key)
            .env("SANVOL_SERVER_KEY", pub_path(&self.mds_key))
            .args(args);
        cmd
    }

    /// `sanvol ARGS` that must succeed; returns stdout. A refusal the
    /// server calls transient ("retry shortly": it is renewing its pool
    /// lease on a loaded host) is retried for up to
    /// [`TRANSIENT_RETRY_SECS`], as an operator would; it changed nothing.
    pub fn sanvol_ok(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(TRANSIENT_RETRY_SECS);
        let mut out = self.sanvol(args);
        while !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("retry shortly")
            && Instant::now() < deadline
        {
            // The server names no moment to wait for: poll it.
            std::thread::sleep(Duration::from_millis(200));
            out = self.sanvol(args);
        }
        assert!(
            out.status.success(),
            "sanvol {args:?} failed:\nstdout: {}\nstderr: {}\nmds log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.mds_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sanvol ARGS --json` parsed.
    pub fn sanvol_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.sanvol_ok(&a)).expect("sanvol --json prints JSON")
    }

    /// Creates an agent key, authorizes it and starts `sanvol-agent run`.
    pub fn start_agent(&self, name: &str) -> Agent {
        self.authorize_agent(name);
        self.restart_agent(name)
    }

    /// Creates agent `name`'s key and authorizes it, unless done before.
    pub fn authorize_agent(&self, name: &str) {
        let key = self.dir.path().join(format!("{name}.key"));
        if !key.exists() {
            run_ok(Command::new(bin("sanvol")).arg("keygen").arg(&key));
            self.sanvol_ok(&["client", "add", pub_path(&key).to_str().unwrap(), "--role", "agent", "--name", name]);
        }
    }

    /// Starts `sanvol-agent run` for an already authorized agent `name`.
    pub fn restart_agent(&self, name: &str) -> Agent {
        self.restart_agent_with(name, &[])
    }

    /// Like [`Stack::start_agent`], with extra `sanvol-agent run` arguments.
    pub fn start_agent_with(&self, name: &str, extra: &[String]) -> Agent {
        self.authorize_agent(name);
        self.restart_agent_with(name, extra)
    }

    /// Like [`Stack::restart_agent`], with extra `sanvol-agent run` arguments.
    pub fn restart_agent_with(&self, name: &str, extra: &[String]) -> Agent {
        self.restart_agent_env(name, extra, &[])
    }

    /// Like [`Stack::restart_agent_with`], with extra environment variables.
    pub fn restart_agent_env(&self, name: &str, extra: &[String], env: &[(&str, &str)]) -> Agent {
        self.restart_agent_at(name, &self.all_mds_addrs(), extra, env)
    }

    /// Like [`Stack::restart_agent_env`], reaching the servers at `mds`
    /// (`a,b,...`; e.g. through a proxy the test can cut). The agent keeps its state in
    /// `NAME-state` in the stack's directory, so a restart takes its handles
    /// back.
    pub fn restart_agent_at(&self, name: &str, mds: &str, extra: &[String], env: &[(&str, &str)]) -> Agent {
        let key = self.dir.path().join(format!("{name}.key"));
        let socket = self.dir.path().join(format!("{name}-agent.sock"));
        let export_dir = self.dir.path().join(format!("{name}-exports"));
        std::fs::create_dir_all(&export_dir).expect("export dir");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(bin("sanvol-agent"));
        cmd.arg("run")
            .arg("--mds")
            .arg(mds)
            .arg("--key")
            .arg(&key)
            .arg("--server-key")
            .arg(pub_path(&self.mds_key))
            .arg("--name")
            .arg(name)
            .arg("--control-socket")
            .arg(&socket)
            .arg("--export-dir")
            .arg(&export_dir)
            .arg("--state-dir")
            .arg(self.dir.path().join(format!("{name}-state")))
            .args(self.device_request_max_ms.map(|ms| format!("--device-request-max-ms={ms}")))
            .args(extra)
            .envs(env.iter().copied());
        let log = self.dir.path().join(format!("{name}-{}.log", next_log_number()));
        let proc = Proc::spawn_until_listening("sanvol-agent", cmd, log, &socket);
        Agent { name: name.to_string(), proc, socket, export_dir }
    }
}

/// Each start of a process gets its own log file, so a restart keeps the
/// previous run's log for the failure message.
fn next_log_number() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Polls `f` every 50 ms until it returns `Some`, at most `limit` (panics
/// naming `what`).
pub fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        // Polling other processes' observable state: there is nothing to await.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `PATH.pub` beside a private key.
pub fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

/// A running `sanvol-agent`.
pub struct Agent {
    pub name: String,
    pub proc: Proc,
    pub socket: PathBuf,
    pub export_dir: PathBuf,
}

impl Agent {
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("sanvol-agent"))
            .args(args)
            .arg("--control-socket")
            .arg(&self.socket)
            .output()
            .expect("run sanvol-agent")
    }

    /// `sanvol-agent attach VOLUME --mode MODE`; returns the export URI.
    pub fn attach(&self, volume: &str, mode: &str) -> NbdUri {
        let out = self.cli(&["attach", volume, "--mode", mode]);
        assert!(
            out.status.success(),
            "attach {volume} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.log()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line =
            stdout.lines().find(|l| l.starts_with("nbd")).unwrap_or_else(|| panic!("attach printed no URI: {stdout}"));
        line.trim().parse().expect("attach prints an NBD URI")
    }

    pub fn detach(&self, volume: &str) {
        let out = self.cli(&["detach", volume]);
        assert!(out.status.success(), "detach {volume} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}
