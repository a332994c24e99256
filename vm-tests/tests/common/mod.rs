//! A sanvol pool on the host for guest agents: nbdkit memory devices and `sanvol-mds` on
//! 127.0.0.1 (10.0.2.2 from the guest), the pool initialised and one agent key authorized.
//!
//! The devices are recorded in the pool as `nbd://127.0.0.1:PORT` (the MDS reaches them there); the
//! guest agent runs with `--device-host-alias 127.0.0.1=10.0.2.2`. Every process is killed by PID on
//! drop.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vm_tests::host::NbdkitExport;
use vm_tests::Scenario;

/// A workspace binary (`cargo build --workspace` builds them; `scripts/test.sh` does that first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is not built: run `cargo build --workspace` first", path.display());
    path
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    stdout_of_success(cmd, out)
}

/// The stdout of `out` (from `cmd`), which must have succeeded.
fn stdout_of_success(cmd: &Command, out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sanvol-agent` without debug info, in the runner's artifact directory, one copy per scenario
/// (tests run in parallel threads: a shared file could be read while another test rewrites it).
fn stripped_agent(scenario: &str) -> PathBuf {
    let dir = vm_tests::artifact_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{scenario}-sanvol-agent"));
    run_ok(Command::new("strip").arg("-o").arg(&out).arg(bin("sanvol-agent")));
    out
}

/// How long past its lease a dead agent's handle keeps the volume (the server's `durable_ms`) in
/// pools started with a lease ([`Pool::start`]); [`Pool::start_defaults`] uses the server's.
pub const DURABLE_MS: u64 = 1000;

pub struct Pool {
    pub dir: PathBuf,
    _devices: Vec<NbdkitExport>,
    mds: Child,
    pub mds_port: u16,
    mds_key: PathBuf,
    admin_key: PathBuf,
    pub agent_key: PathBuf,
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.mds.kill();
        let _ = self.mds.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

impl Pool {
    /// `devices` nbdkit memory devices of `device_size` (e.g. "512M"), the MDS with `lease_ms`.
    pub fn start(name: &str, devices: usize, device_size: &str, lease_ms: u64) -> Pool {
        Pool::start_config(name, devices, device_size, &format!("lease_ms = {lease_ms}\ndurable_ms = {DURABLE_MS}\n"))
    }

    /// Like [`Pool::start`], with the server's default lease (10 s) and durable time (30 s) for
    /// agents' handles (the server's own disk lease is short in every pool, so it starts quickly).
    pub fn start_defaults(name: &str, devices: usize, device_size: &str) -> Pool {
        Pool::start_config(name, devices, device_size, "")
    }

    fn start_config(name: &str, devices: usize, device_size: &str, settings: &str) -> Pool {
        let dir = std::env::temp_dir().join(format!("sanvol-vm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let devs: Vec<NbdkitExport> =
            (0..devices).map(|_| NbdkitExport::spawn(&["memory", device_size]).expect("nbdkit")).collect();
        let key = |n: &str| {
            let k = dir.join(n);
            run_ok(Command::new(bin("sanvol")).arg("keygen").arg(&k));
            k
        };
        let (mds_key, admin_key, agent_key) = (key("mds.key"), key("admin.key"), key("agent.key"));
        let uris: Vec<String> = devs.iter().map(|d| format!("nbd://127.0.0.1:{}", d.port())).collect();
        let mut init = Command::new(bin("sanvol"));
        init.args(["pool", "init", "--name", name]);
        for u in &uris {
            init.arg("--device").arg(u);
        }
        init.arg("--server-key").arg(pub_path(&mds_key)).arg("--admin-key").arg(pub_path(&admin_key));
        run_ok(&mut init);
        // A free port for the MDS (bound and released: the MDS binds it again at once).
        let mds_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.join("mds.toml");
        let quoted: Vec<String> = uris.iter().map(|u| format!("{u:?}")).collect();
        std::fs::write(
            &config,
            format!(
                "listen = [\"127.0.0.1:{mds_port}\"]\nkey = {:?}\ndevices = [{}]\nlease_io_timeout_ms = 200\n{settings}",
                mds_key.display().to_string(),
                quoted.join(", ")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("mds.log")).unwrap();
        let mds = Command::new(bin("sanvol-mds"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sanvol-mds");
        let mut pool = Pool { dir, _devices: devs, mds, mds_port, mds_key, admin_key, agent_key };
        // Readiness of another process's listener: nothing to await but its port.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", mds_port)).is_err() {
            if let Ok(Some(status)) = pool.mds.try_wait() {
                panic!("sanvol-mds exited ({status}): {}", pool.mds_log());
            }
            assert!(Instant::now() < deadline, "sanvol-mds did not listen: {}", pool.mds_log());
            std::thread::sleep(Duration::from_millis(20));
        }
        let agent_pub = pub_path(&pool.agent_key);
        pool.sanvol(&["client", "add", agent_pub.to_str().unwrap(), "--role", "agent", "--name", "guest"]);
        pool
    }

    pub fn mds_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mds.log")).unwrap_or_default()
    }

    /// `sanvol ARGS` as the admin; must succeed. A refusal the server calls
    /// transient ("retry shortly": it is renewing its pool lease, on a host
    /// busy with the guest) is retried for up to 20 s, as an operator would;
    /// it changed nothing.
    pub fn sanvol(&self, args: &[&str]) -> String {
        let command = || {
            let mut cmd = Command::new(bin("sanvol"));
            cmd.env("SANVOL_MDS", format!("127.0.0.1:{}", self.mds_port))
                .env("SANVOL_KEY", &self.admin_key)
                .env("SANVOL_SERVER_KEY", pub_path(&self.mds_key))
                .args(args);
            cmd
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = command().output().expect("run sanvol");
        while !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("retry shortly")
            && Instant::now() < deadline
        {
            // The server names no moment to wait for: poll it.
            std::thread::sleep(Duration::from_millis(200));
            out = command().output().expect("run sanvol");
        }
        stdout_of_success(&command(), out)
    }

    /// A scenario with the agent binary, its key, the server's public key and the environment the
    /// guest helper `start_agent` (in `scenarios/agent-lib.sh`) uses.
    pub fn scenario(&self, name: &str, script: &str) -> Scenario {
        let lib = include_str!("../scenarios/agent-lib.sh");
        let agent = stripped_agent(name);
        Scenario::new(name, &format!("{lib}\n{script}"))
            // Stripped (a debug build is ~100 MB, too much for a 512 MiB guest's initramfs); `.binary`
            // brings its libraries, and the binary itself also goes on PATH (the host path may be
            // under /tmp, which the guest mounts a tmpfs over).
            .binary(agent.display().to_string())
            .file("/usr/bin/sanvol-agent", 0o755, std::fs::read(&agent).unwrap())
            .file("/etc/sanvol/agent.key", 0o600, std::fs::read(&self.agent_key).unwrap())
            .file("/etc/sanvol/mds.key.pub", 0o644, std::fs::read(pub_path(&self.mds_key)).unwrap())
            .env("MDS_PORT", self.mds_port)
    }
}

/// A TCP proxy on 127.0.0.1 the test can cut: breaks the guest's path to one device while the MDS
/// (which connects to the device directly) still reaches it. Cutting shuts down every live
/// connection and closes new ones as soon as they are accepted.
pub struct CuttableProxy {
    port: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    forwarded_bytes: std::sync::atomic::AtomicU64,
    live: std::sync::Mutex<Vec<TcpStream>>,
}

impl CuttableProxy {
    pub fn start(target_port: u16) -> CuttableProxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if st.cut.load(Ordering::SeqCst) {
                    continue; // dropped: the guest's connect fails at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else { continue };
                {
                    let mut live = st.live.lock().unwrap();
                    live.push(client.try_clone().unwrap());
                    live.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 256 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            st.forwarded_bytes.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CuttableProxy { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn forwarded_bytes(&self) -> u64 {
        self.state.forwarded_bytes.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn cut(&self) {
        self.state.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.state.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}

/// A host port the guest blocks on (`nc $SANVOL_HOST $GO_PORT`) until the test says go.
pub struct GoSignal(TcpListener);

impl GoSignal {
    pub fn new() -> GoSignal {
        GoSignal(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    pub fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    /// Lets one waiting (or the next) `nc` in the guest return.
    pub fn go(&self) {
        use std::io::Write;
        let (mut s, _) = self.0.accept().unwrap();
        let _ = s.write_all(b"go\n");
    }
}

impl Pool {
    /// The JSON `sanvol ARGS --json` prints.
    pub fn sanvol_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.sanvol(&a)).expect("sanvol --json prints JSON")
    }
}
