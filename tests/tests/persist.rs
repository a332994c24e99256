//! Issue 18, persistent attachments, with real processes (nbdkit devices,
//! `sanvol-mds`, `sanvol-agent`): the agent's config file lists volumes that
//! every start attaches; `attach --persist` adds one, `detach --persist`
//! removes it; a clean stop (SIGTERM: flush and detach) and a start with the
//! same config bring them back on the same sockets with their data; a
//! `kill -9` leaves them to the state file (resumed, not attached twice); a
//! volume that cannot be attached does not hold the agent back and is
//! retried; a bad config is refused naming the file, line and key.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::system::{bin, Agent, Stack};

const WAIT: Duration = Duration::from_secs(60);

fn list(agent: &Agent) -> Vec<serde_json::Value> {
    let out = agent.cli(&["list", "--json"]);
    assert!(out.status.success(), "list: {}\n{}", String::from_utf8_lossy(&out.stderr), agent.proc.log());
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("list --json").as_array().cloned().unwrap()
}

fn listed(agent: &Agent, volume: &str) -> Option<serde_json::Value> {
    list(agent).into_iter().find(|v| v["volume"] == volume)
}

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

async fn write_through(uri: &NbdUri, offset: u64, data: Bytes) {
    let c = NbdClient::connect(uri, ClientOptions::default()).await.expect("connect to the export");
    c.write(offset, data, false).await.expect("write");
    c.flush().await.expect("flush");
    c.disconnect().await;
}

async fn read_through(uri: &NbdUri, offset: u64, len: u32) -> Bytes {
    let c = NbdClient::connect(uri, ClientOptions::default()).await.expect("connect to the export");
    let data = c.read(offset, len).await.expect("read");
    c.disconnect().await;
    data
}

fn socket_uri(volume: &str, socket: &Path) -> NbdUri {
    format!("nbd+unix:///{volume}?socket={}", socket.display()).parse().unwrap()
}

/// `sanvol-agent run --config CONFIG` with everything else in `dir` (the
/// config is read before any of it is used).
fn run_with(config: &Path, dir: &Path) -> std::process::Output {
    Command::new(bin("sanvol-agent"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .args(["--mds", "unix:/nonexistent.sock", "--server-key", &"00".repeat(32)])
        .arg("--key")
        .arg(dir.join("missing.key"))
        .arg("--control-socket")
        .arg(dir.join("agent.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run sanvol-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_volumes_come_back_after_a_clean_restart_and_a_crash() {
    let mut stack = Stack::new(2, "512M");
    stack.start_mds();
    for v in ["p", "f"] {
        stack.sanvol_ok(&["volume", "create", v, "64M", "--mirror", "2"]);
    }
    let dir = stack.dir.path().to_path_buf();
    let (p_sock, f_sock) = (dir.join("p-export.sock"), dir.join("f-export.sock"));
    let config = dir.join("agent.toml");
    // Written by hand: an option and a volume, with comments that must survive --persist.
    let by_hand = format!(
        "# host-a's agent\nshutdown_timeout_ms = 30000  # flush bound\n\n# the file-only volume\n[[volume]]\nname = \
         \"f\"\nmode = \"exclusive\"\nsocket = \"{}\"\n",
        f_sock.display()
    );
    std::fs::write(&config, &by_hand).unwrap();
    let with_config = ["--config".to_string(), config.display().to_string()];

    let mut agent = stack.start_agent_with("host-a", &with_config);
    // Ready means every persisted volume was tried once: "f" is served already.
    let f = listed(&agent, "f").unwrap_or_else(|| panic!("f is attached at start; log:\n{}", agent.proc.log()));
    assert_eq!(f["export_uri"].as_str().unwrap(), socket_uri("f", &f_sock).to_string());

    let out = agent.cli(&["attach", "p", "--mode", "exclusive", "--socket", p_sock.to_str().unwrap(), "--persist"]);
    assert!(out.status.success(), "attach --persist: {}\n{}", String::from_utf8_lossy(&out.stderr), agent.proc.log());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&config.display().to_string()), "says which file");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.starts_with(&by_hand), "the operator's text is kept as written:\n{text}");
    assert!(text.contains("name = \"p\"") && text.contains(&format!("socket = \"{}\"", p_sock.display())), "{text}");

    let (p_uri, f_uri) = (socket_uri("p", &p_sock), socket_uri("f", &f_sock));
    write_through(&p_uri, 1 << 20, pattern(1, 256 << 10)).await;
    write_through(&f_uri, 0, pattern(2, 64 << 10)).await;

    // A clean stop (SIGTERM: flush, detach every volume) and a start with the same config.
    let status = agent.proc.terminate().expect("running");
    assert!(status.success(), "SIGTERM ends the agent cleanly: {status:?}\n{}", agent.proc.log());
    agent = stack.restart_agent_with("host-a", &with_config);
    for (volume, socket) in [("p", &p_sock), ("f", &f_sock)] {
        let info = listed(&agent, volume)
            .unwrap_or_else(|| panic!("{volume} is attached again at start; log:\n{}", agent.proc.log()));
        assert_eq!(info["export_uri"].as_str().unwrap(), socket_uri(volume, socket).to_string());
    }
    assert_eq!(read_through(&p_uri, 1 << 20, 256 << 10).await, pattern(1, 256 << 10), "p's data after the restart");
    assert_eq!(read_through(&f_uri, 0, 64 << 10).await, pattern(2, 64 << 10), "f's data after the restart");

    // kill -9: the state file resumes both; the config file does not attach them a second time.
    agent.proc.kill();
    agent = stack.restart_agent_with("host-a", &with_config);
    let volumes = list(&agent);
    for v in ["p", "f"] {
        assert_eq!(volumes.iter().filter(|i| i["volume"] == v).count(), 1, "{v} once: {volumes:?}");
    }
    let log = agent.proc.log();
    assert!(log.contains("persisted volume taken back from the state file"), "{log}");
    assert!(!log.contains("persisted volume could not be attached"), "{log}");
    assert_eq!(read_through(&p_uri, 1 << 20, 256 << 10).await, pattern(1, 256 << 10), "p's data after kill -9");

    // A plain detach keeps the entry; detach --persist removes it (and only it).
    agent.detach("f");
    let out = agent.cli(&["detach", "p", "--persist"]);
    assert!(out.status.success(), "detach --persist: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains("name = \"p\"") && text.contains("name = \"f\""), "{text}");
    assert!(text.starts_with("# host-a's agent\nshutdown_timeout_ms = 30000  # flush bound\n"), "{text}");
    let status = agent.proc.terminate().expect("running");
    assert!(status.success(), "{status:?}");
    agent = stack.restart_agent_with("host-a", &with_config);
    assert!(listed(&agent, "f").is_some(), "f is still persisted");
    assert!(listed(&agent, "p").is_none(), "p is no longer persisted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_volume_that_cannot_be_attached_is_retried_without_holding_the_others() {
    let mut stack = Stack::new(2, "256M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "ok", "32M"]);
    let config = stack.dir.path().join("agent.toml");
    // "later" does not exist yet: its attach fails until it is created.
    std::fs::write(&config, "[[volume]]\nname = \"later\"\n\n[[volume]]\nname = \"ok\"\nmode = \"ro\"\n").unwrap();
    let agent = stack.start_agent_with("host-a", &["--config".into(), config.display().to_string()]);
    let ok = listed(&agent, "ok").unwrap_or_else(|| panic!("ok is attached at start; log:\n{}", agent.proc.log()));
    assert_eq!(ok["mode"], "read-only");
    assert!(listed(&agent, "later").is_none());
    let log = agent.proc.log();
    assert!(
        log.lines().any(|l| l.contains("persisted volume could not be attached") && l.contains("later")),
        "the failure is logged with the volume: {log}"
    );
    assert!(log.contains(&config.display().to_string()), "and the file it comes from: {log}");

    stack.sanvol_ok(&["volume", "create", "later", "32M"]);
    // Retried with a growing pause (1 s, 2 s, ...): polled, the agent offers no event for it.
    let since = Instant::now();
    while listed(&agent, "later").is_none() {
        assert!(since.elapsed() < WAIT, "later was not attached by a retry; log:\n{}", agent.proc.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn a_bad_config_file_is_refused_naming_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown.toml", "mds = \"unix:/x\"\nio_thread = 2\n", "line 2: unknown key `io_thread`"),
        ("range.toml", "\nio_threads = 0\n", "line 2: key `io_threads`"),
        ("volume.toml", "[[volume]]\nname = \"v\"\nmod = \"ro\"\n", "line 3: unknown key `mod`"),
        ("mode.toml", "[[volume]]\nname = \"v\"\nmode = \"rw\"\n", "line 3: key `mode`"),
        ("syntax.toml", "key = \"/k\"\nmds = \"a\" \"b\"\n", "line 2"),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = run_with(&path, dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} is refused; stderr: {stderr}");
        assert!(stderr.contains(&format!("{} {expected}", path.display())), "{name}: {stderr}");
    }
    // A --config that does not exist is an error too (the default one may be missing).
    let missing = dir.path().join("missing.toml");
    let out = run_with(&missing, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(&missing.display().to_string()), "{stderr}");
    // The same options from a good file get past the config: the missing key is the next error.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "io_threads = 2\n[[volume]]\nname = \"v\"\nnbd_device = \"/dev/nbd1\"\n").unwrap();
    let out = run_with(&good, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("missing.key"), "{stderr}");
}
