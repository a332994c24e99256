//! The `sanvol-backup` binary end to end against the in-process snapshot
//! server (`--source`): exit codes, summaries, listings, verify's report,
//! and `serve` bridging standard NBD tools (nbdinfo, nbdcopy).

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sanvol-backup");

/// Runs the binary with `--source` pointing at the fixture (no mds
/// variables from the environment leak in).
async fn run(fx: &Fixture, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SANVOL_MDS")
        .env_remove("SANVOL_KEY")
        .env_remove("SANVOL_SERVER_KEY")
        .env("SANVOL_BACKUP_SOURCE", fx.uri_string());
    tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("sanvol-backup hung").unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", o.status.code(), text(&o.stdout), text(&o.stderr))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_incremental_list_restore_and_verify_through_the_cli() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");

    let o = run(&fx, &["full", "vol@s1", "--to", p(&repo), "--progress", "lines"]).await;
    assert!(o.status.success(), "{}", show(&o));
    let out = text(&o.stdout);
    assert!(out.starts_with("full backup of vol@s1 done:") && out.contains("30 data chunks stored"), "{}", show(&o));
    assert!(text(&o.stderr).contains("full vol@s1: 100%"), "{}", show(&o));

    let o = run(&fx, &["incremental", "vol@s2", "--since", "s1", "--to", p(&repo), "--progress", "none"]).await;
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        text(&o.stdout).contains("incremental backup of vol@s2 since s1 done: 4.0 MiB volume, 7 chunks changed"),
        "{}",
        show(&o)
    );
    assert!(o.stderr.is_empty(), "{}", show(&o));

    let o = run(&fx, &["list", p(&repo), "--json"]).await;
    assert!(o.status.success(), "{}", show(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["kind"], "full");
    assert_eq!(list[0]["since"], serde_json::Value::Null);
    assert_eq!(list[1]["kind"], "incremental");
    assert_eq!(list[1]["snapshot"], "s2");
    assert_eq!(list[1]["since"], "s1");
    assert_eq!(list[1]["dir"], "000002-incr-s2");
    assert_eq!(list[1]["size_bytes"], SIZE);
    let o = run(&fx, &["list", p(&repo)]).await;
    let out = text(&o.stdout);
    assert!(out.starts_with("#  KIND") && out.contains("incremental  vol     s2        s1"), "{}", show(&o));

    let target = fx.target("t", SIZE);
    let to = format!("nbd+unix:///t?socket={}", fx.socket.display());
    let o = run(&fx, &["restore", p(&repo), "--to", &to, "--progress", "none"]).await;
    assert!(o.status.success(), "{}", show(&o));
    assert!(text(&o.stdout).starts_with("restore of vol@s2 (2 backups) to nbd+unix:///t?socket="), "{}", show(&o));
    assert!(target.contents().await == fx.s2_model);

    let o = run(&fx, &["verify", p(&repo), "--progress", "none"]).await;
    assert!(o.status.success(), "{}", show(&o));
    assert!(text(&o.stdout).contains("verified: 2 backups"), "{}", show(&o));

    // Damage: one flipped byte in chunk 9 of the incremental.
    let data = backup_dir(&repo, "000002").join("data.bin");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[CHUNK as usize + 1] ^= 1;
    std::fs::write(&data, bytes).unwrap();
    let o = run(&fx, &["verify", p(&repo), "--progress", "none"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let out = text(&o.stdout);
    assert!(out.contains("ok      000001-full-s1") && out.contains("DAMAGED 000002-incr-s2"), "{}", show(&o));
    assert!(out.contains("problem: backup 000002-incr-s2: chunk 9 (offset 589824): damaged data"), "{}", show(&o));
    assert!(text(&o.stderr).contains("is damaged (1 problem)"), "{}", show(&o));
    let o = run(&fx, &["verify", p(&repo), "--json", "--progress", "none"]).await;
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"][0]["chunk"], 9);
    assert_eq!(v["problems"][0]["backup"], "000002-incr-s2");

    let writes = target.writes();
    let o = run(&fx, &["restore", p(&repo), "--to", &to]).await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stderr).contains("refusing to restore"), "{}", show(&o));
    assert_eq!(target.writes(), writes, "a damaged chain was partly restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_bad_input_with_clear_messages() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");
    let o = run(&fx, &["full", "vol", "--to", p(&repo)]).await;
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(text(&o.stderr).contains("is not VOLUME@SNAPSHOT"), "{}", show(&o));

    let o = run(&fx, &["full", "vol@nope", "--to", p(&repo)]).await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stderr).contains("opening snapshot vol@nope"), "{}", show(&o));

    assert!(run(&fx, &["full", "vol@s1", "--to", p(&repo), "--progress", "none"]).await.status.success());
    let o = run(&fx, &["incremental", "vol@s2", "--since", "s0", "--to", p(&repo)]).await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("is of vol@s1, not of vol@s0: an incremental must continue the chain"),
        "{}",
        show(&o)
    );

    let o = run(&fx, &["full", "vol@s2", "--to", p(&repo)]).await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stderr).contains("already holds a backup chain"), "{}", show(&o));

    let o = run(&fx, &["restore", p(&repo), "--to", "http://x"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stderr).contains("is not an NBD URI"), "{}", show(&o));

    let o = run(&fx, &["verify", p(&fx.repo("nothing-here"))]).await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));

    // Without --source nor --mds: say what is missing.
    let o = Command::new(BIN)
        .args(["snapshots"])
        .env_remove("SANVOL_MDS")
        .env_remove("SANVOL_BACKUP_SOURCE")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stderr).contains("no metadata server given: use --mds"), "{}", show(&o));

    for sub in ["full", "incremental", "restore", "verify", "list", "snapshots", "serve"] {
        let o = run(&fx, &[sub, "--help"]).await;
        assert!(o.status.success() && text(&o.stdout).contains("Usage: sanvol-backup"), "{sub}: {}", show(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_lists_the_exports_of_a_source() {
    let fx = Fixture::start().await;
    fx.target("not-a-snapshot", CHUNK);
    let o = run(&fx, &["snapshots", "--json"]).await;
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|s| s["export"].as_str().unwrap()).collect();
    assert_eq!(names, ["vol@s1", "vol@s2", "vol@s3"]);
    let o = run(&fx, &["snapshots", "other"]).await;
    assert_eq!(text(&o.stdout), "no snapshots\n", "{}", show(&o));
}

/// Kills a child by its PID with SIGTERM (and SIGKILL on drop if it is
/// still there).
struct ChildGuard(tokio::process::Child);

impl ChildGuard {
    fn signal(&self, sig: i32) {
        if let Some(pid) = self.0.id() {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn tool(args: &[&str]) -> Output {
    let o = tokio::time::timeout(Duration::from_secs(60), Command::new(args[0]).args(&args[1..]).output())
        .await
        .expect("tool hung")
        .unwrap_or_else(|e| panic!("{} is not installed ({e}): run scripts/install-deps.sh", args[0]));
    assert!(o.status.success(), "{args:?}: {}", show(&o));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_bridges_standard_nbd_tools_to_the_snapshots() {
    let fx = Fixture::start().await;
    let socket = fx.dir.path().join("bridge.sock");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--socket", p(&socket), "--source", &fx.uri_string()])
        .env_remove("SANVOL_MDS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = ChildGuard(cmd.spawn().unwrap());
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.expect("serve did not start");
    assert_eq!(first.unwrap().unwrap(), format!("serving snapshots on {}", socket.display()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);

    let o = tool(&["nbdinfo", "--list", &format!("nbd+unix:///?socket={}", socket.display())]).await;
    let out = text(&o.stdout);
    for name in ["vol@s1", "vol@s2", "vol@s3"] {
        assert!(out.contains(&format!("export=\"{name}\"")) || out.contains(name), "{name} missing: {out}");
    }

    let s2 = format!("nbd+unix:///vol@s2?socket={}", socket.display());
    let o = tool(&["nbdinfo", "--map=sanvol:changed-since:s1", &s2]).await;
    let changed: Vec<(u64, u64)> = text(&o.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect();
    let want = [
        (2 * CHUNK, CHUNK),
        (9 * CHUNK, CHUNK),
        (21 * CHUNK, CHUNK),
        (30 * CHUNK, 3 * CHUNK),
        (64 * CHUNK, SIZE - 64 * CHUNK),
    ];
    assert_eq!(changed, want, "{}", text(&o.stdout));

    let copy = fx.dir.path().join("s2.img");
    tool(&["nbdcopy", &s2, p(&copy)]).await;
    assert!(std::fs::read(&copy).unwrap() == fx.s2_model, "nbdcopy through the bridge read other bytes");

    child.signal(libc::SIGTERM);
    let status =
        tokio::time::timeout(Duration::from_secs(20), child.0.wait()).await.expect("serve did not stop").unwrap();
    assert!(status.success(), "serve exited with {status}");
    assert!(!socket.exists(), "serve left its socket behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backup_leaves_the_repository_as_it_was() {
    let fx = Fixture::start().await;
    // A snapshot that takes seconds to read.
    let mut slow = TestDevice::new(SIZE, true);
    slow.read_delay = Duration::from_millis(300);
    fill(&slow, &s1_writes()).await;
    let slow: std::sync::Arc<dyn blockio::BlockDevice> = std::sync::Arc::new(slow);
    fx.table.insert(blockio::server::Export { read_only: true, ..blockio::server::Export::new("slow@s1", slow) });
    let repo = fx.repo("repo");
    let mut cmd = Command::new(BIN);
    cmd.args(["full", "slow@s1", "--to", p(&repo), "--queue-depth", "1", "--progress", "none"])
        .env("SANVOL_BACKUP_SOURCE", fx.uri_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = ChildGuard(cmd.spawn().unwrap());
    // Wait until the backup is being written.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let tmp_exists = || {
        std::fs::read_dir(&repo)
            .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with(".tmp-")))
            .unwrap_or(false)
    };
    while !tmp_exists() {
        assert!(std::time::Instant::now() < deadline, "the backup never started writing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.signal(libc::SIGINT);
    let o = tokio::time::timeout(Duration::from_secs(20), child.0.wait()).await.expect("full did not stop").unwrap();
    assert_eq!(o.code(), Some(1));
    let mut err = String::new();
    use tokio::io::AsyncReadExt;
    child.0.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    assert!(err.contains("interrupted: the unfinished backup was removed"), "{err}");
    let names: Vec<String> =
        std::fs::read_dir(&repo).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, [".lock"], "an interrupted backup left something behind");
}
