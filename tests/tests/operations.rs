//! Issue 18 acceptance, with real processes: the Prometheus endpoints of
//! `sanvol-agent` and `sanvol-mds` scraped during fio and parsed with a
//! Prometheus text parser; systemd readiness (`READY=1`, `STOPPING=1`) on a
//! `NOTIFY_SOCKET` the test binds; the units in `contrib/systemd/` checked by
//! `systemd-analyze verify`; `--help` of every command against the man page
//! generated from the same clap command; `sanvol-backup serve`'s endpoint
//! scraped while nbdcopy reads a snapshot through it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blockio::client::{ClientOptions, NbdClient};
use blockio::BlockDevice;
use sanvol_tests::metrics::{metrics_addr, must, scrape, value};
use sanvol_tests::peers::require_tool;
use sanvol_tests::system::{bin, Stack};

/// fio with `args` over 48 MiB, to completion; its JSON report.
fn fio_report(args: &[&str], report_path: &std::path::Path) -> serde_json::Value {
    let out = Command::new(require_tool("fio"))
        .args(args)
        .args(["--size=48M", "--output-format=json"])
        .arg(format!("--output={}", report_path.display()))
        .output()
        .expect("run fio");
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let report = std::fs::read_to_string(report_path).expect("fio's report");
    serde_json::from_str(&report).unwrap_or_else(|e| panic!("fio's JSON report ({e}):\n{report}"))
}

#[test]
fn metrics_endpoints_count_fio_writes_and_show_server_state() {
    let mut stack = Stack::new(3, "512M");
    stack.mds_config_extra.push("metrics_addr = \"127.0.0.1:0\"".into());
    stack.start_mds();
    let mds_metrics = metrics_addr(stack.mds.as_ref().unwrap());
    stack.sanvol_ok(&["volume", "create", "m", "64M", "--mirror", "2"]);
    let agent = stack.start_agent_with("host-a", &["--metrics-addr".into(), "127.0.0.1:0".into()]);
    let agent_metrics = metrics_addr(&agent.proc);
    let uri = agent.attach("m", "exclusive");

    let before = scrape(&agent_metrics);
    let writes_before =
        value(&before, "sanvol_agent_requests_total", &[("volume", "m"), ("op", "write")]).unwrap_or(0.0);
    let report_path = stack.dir.path().join("fio.json");
    let fio = Command::new(require_tool("fio"))
        .args([
            "--name=metrics",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=48M",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .arg(format!("--output={}", report_path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    // Scrape both while fio runs: the endpoints answer under load.
    let during_agent = scrape(&agent_metrics);
    let during_mds = scrape(&mds_metrics);
    let out = fio.wait_with_output().expect("wait for fio");
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let report = std::fs::read_to_string(&report_path).expect("fio's report");
    let report: serde_json::Value =
        serde_json::from_str(&report).unwrap_or_else(|e| panic!("fio's JSON report ({e}):\n{report}"));
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    let fio_writes = job["write"]["total_ios"].as_f64().expect("fio's write count");
    let fio_bytes = job["write"]["io_bytes"].as_f64().expect("fio's written bytes");
    assert!(fio_writes >= 12288.0, "fio wrote 48M in 4k blocks, counted {fio_writes}");
    assert!(must(&during_agent, "sanvol_agent_volumes_attached", &[]) == 1.0);
    assert!(must(&during_mds, "sanvol_mds_sessions", &[]) >= 1.0);

    let after = scrape(&agent_metrics);
    let writes = must(&after, "sanvol_agent_requests_total", &[("volume", "m"), ("op", "write")]) - writes_before;
    assert!(writes >= fio_writes, "the agent counted {writes} writes, fio did {fio_writes}");
    assert!(must(&after, "sanvol_agent_bytes_total", &[("volume", "m"), ("op", "write")]) >= fio_bytes);
    assert_eq!(must(&after, "sanvol_agent_request_errors_total", &[("volume", "m"), ("op", "write")]), 0.0);
    let timed = must(&after, "sanvol_agent_request_seconds", &[("volume", "m"), ("op", "write")]);
    assert!(timed >= fio_writes, "the latency histogram holds {timed} writes, fio did {fio_writes}");
    assert!(must(&after, "sanvol_agent_lease_renewal_misses_total", &[("reason", "failed")]) == 0.0);
    assert!(value(&after, "sanvol_agent_device_path_fallback", &[]).unwrap_or(0.0) == 0.0, "no device fell back");

    // 1 MiB reads go from the device's socket to fio's in pipes, unread.
    let report = fio_report(
        &["--name=spliced", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=read", "--bs=1m", "--iodepth=4"],
        &report_path,
    );
    let read_bytes = report["jobs"][0]["read"]["io_bytes"].as_f64().expect("fio's read bytes");
    assert_eq!(read_bytes, 48.0 * 1024.0 * 1024.0);
    let spliced = must(&scrape(&agent_metrics), "sanvol_agent_read_bytes_spliced_total", &[("volume", "m")]);
    // A reply that arrives while the reader is already buffering (behind
    // a smaller one) is copied instead: most, not all, go through pipes.
    assert!(spliced >= read_bytes / 2.0, "only {spliced} of {read_bytes} bytes read went through pipes");

    // 1 MiB writes go from fio's socket to the devices' in pipes (on the
    // mirrored volume a `tee` of them to each leg), and read back as written
    // (fio verifies every block after writing; tests/tests/stack.rs reads
    // both legs of a mirror filled this way from the devices).
    stack.sanvol_ok(&["volume", "create", "s", "64M"]);
    let plain = agent.attach("s", "exclusive");
    for (volume, uri) in [("s", &plain), ("m", &uri)] {
        let uri = format!("--uri={uri}");
        let report = fio_report(
            &["--name=spliced-writes", "--ioengine=nbd", &uri, "--rw=write", "--bs=1m", "--iodepth=4"]
                .into_iter()
                .chain(["--verify=crc32c", "--do_verify=1", "--verify_state_save=0"])
                .collect::<Vec<_>>(),
            &report_path,
        );
        assert_eq!(report["jobs"][0]["error"], 0, "{volume}: fio reported an error (a verify failure among them)");
        let written = report["jobs"][0]["write"]["io_bytes"].as_f64().expect("fio's written bytes");
        assert_eq!(written, 48.0 * 1024.0 * 1024.0);
        let spliced = must(&scrape(&agent_metrics), "sanvol_agent_write_bytes_spliced_total", &[("volume", volume)]);
        // A payload whose first bytes the export had buffered with its
        // request header is copied: most, not all, go through pipes.
        assert!(spliced >= written / 2.0, "{volume}: only {spliced} of {written} bytes written went through pipes");
    }
    agent.detach("s");

    let mds = scrape(&mds_metrics);
    assert_eq!(must(&mds, "sanvol_mds_lease_role", &[("role", "active")]), 1.0);
    assert_eq!(must(&mds, "sanvol_mds_lease_role", &[("role", "standby")]), 0.0);
    assert_eq!(must(&mds, "sanvol_mds_handles", &[("state", "held")]), 1.0, "the agent holds one handle");
    assert_eq!(must(&mds, "sanvol_mds_devices", &[("state", "online")]), 3.0);
    assert_eq!(must(&mds, "sanvol_mds_devices", &[("state", "failed")]), 0.0);
    assert_eq!(must(&mds, "sanvol_mds_grace_period_active", &[]), 0.0);
    let commits = must(&mds, "sanvol_mds_commits_total", &[("result", "ok")]);
    assert!(commits >= 2.0, "the volume create and the open committed, counted {commits}");
    assert!(must(&mds, "sanvol_mds_commit_seconds", &[]) >= commits, "every good commit is timed");

    // The agent's lease renewals are timed (renewals go every lease_ms / 3 =
    // 1 s here): poll the endpoint until one was, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let renewals = must(&scrape(&agent_metrics), "sanvol_agent_lease_renewal_seconds", &[]);
        if renewals >= 1.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no lease renewal timed within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A cached volume: its cache is reported while attached, read at the
    // scrape (mirrored, the log's size, a re-read answered from memory).
    stack.sanvol_ok(&["volume", "create", "c", "16M"]);
    stack.sanvol_ok(&["volume", "cache", "c", "--size", "16M"]);
    let cached = agent.attach("c", "exclusive");
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let client = NbdClient::connect(&cached, ClientOptions::default()).await.unwrap();
        client.write(0, bytes::Bytes::from(vec![3u8; 8192]), false).await.unwrap();
        for _ in 0..2 {
            assert_eq!(client.read(1 << 20, 4096).await.unwrap(), vec![0u8; 4096]);
        }
    });
    let c = scrape(&agent_metrics);
    let labels = &[("volume", "c")];
    assert_eq!(must(&c, "sanvol_agent_cache_mirrored", labels), 1.0, "{}", agent.proc.log());
    assert!(must(&c, "sanvol_agent_cache_log_bytes", labels) >= (8 << 20) as f64);
    assert!(must(&c, "sanvol_agent_cache_read_hits_total", labels) >= 1.0, "the re-read came from memory");
    assert!(must(&c, "sanvol_agent_cache_read_misses_total", labels) >= 1.0);
    must(&c, "sanvol_agent_cache_dirty_bytes", labels);
    must(&c, "sanvol_agent_cache_destaged_bytes_total", labels);
    assert_eq!(value(&c, "sanvol_agent_cache_mirrored", &[("volume", "m")]), None, "m has no cache");
    agent.detach("c");
    assert_eq!(value(&scrape(&agent_metrics), "sanvol_agent_cache_mirrored", labels), None, "detached");

    agent.detach("m");
    let detached = scrape(&mds_metrics);
    assert_eq!(must(&detached, "sanvol_mds_handles", &[("state", "held")]), 0.0, "the detach closed the handle");
    assert_eq!(must(&scrape(&agent_metrics), "sanvol_agent_volumes_attached", &[]), 0.0);
}

/// `sanvol-backup serve --metrics-addr`: scraped while a client holds a
/// session on a snapshot and while nbdcopy copies it through the bridge;
/// the counts cover what was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_serve_metrics_count_what_nbdcopy_reads() {
    const SIZE_BYTES: f64 = 32.0 * 1024.0 * 1024.0;
    let mut stack = Stack::new(2, "512M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "b", "32M"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("b", "exclusive");
    // Every byte written (no holes), so a copy reads all of it.
    let fio = Command::new(require_tool("fio"))
        .args(["--name=fill", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=write", "--bs=1M", "--size=32M"])
        .output()
        .expect("run fio");
    assert!(fio.status.success(), "fio: {}", String::from_utf8_lossy(&fio.stderr));
    agent.detach("b");
    stack.sanvol_ok(&["snapshot", "create", "b", "s1"]);

    let socket = stack.dir.path().join("serve.sock");
    let mut serve = Command::new(bin("sanvol-backup"))
        .env("SANVOL_MDS", stack.mds_addr())
        .env("SANVOL_KEY", &stack.admin_key)
        .env("SANVOL_SERVER_KEY", sanvol_tests::system::pub_path(&stack.mds_key))
        .args(["serve", "--metrics-addr", "127.0.0.1:0", "--socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sanvol-backup serve");
    let stdout = serve.stdout.take().unwrap();
    let guard = KillOnDrop(serve);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let metrics = lines.next().expect("a line").expect("read");
    let metrics = metrics.strip_prefix("metrics http://").unwrap_or_else(|| panic!("{metrics}"));
    let metrics = metrics.trim_end_matches("/metrics").to_string();
    let ready = lines.next().expect("a line").expect("read");
    assert!(ready.contains("serving snapshots"), "{ready}");
    let export = [("export", "b@s1")];
    let idle = scrape(&metrics);
    assert_eq!(must(&idle, "sanvol_backup_serve_connections_total", &[]), 0.0);

    // A session held open (blockio's NBD client): counted as open, its read counted.
    let snapshot: blockio::uri::NbdUri =
        format!("nbd+unix:///b@s1?socket={}", socket.display()).parse().expect("a URI");
    let client = NbdClient::connect(&snapshot, ClientOptions::default()).await.expect("connect through serve");
    use blockio::BlockDevice;
    client.read(0, 65536).await.expect("read through serve");
    let during = scrape(&metrics);
    assert_eq!(must(&during, "sanvol_backup_serve_sessions", &export), 1.0);
    assert_eq!(must(&during, "sanvol_backup_serve_reads_total", &export), 1.0);
    assert_eq!(must(&during, "sanvol_backup_serve_read_bytes_total", &export), 65536.0);
    client.disconnect().await;

    let copy = stack.dir.path().join("b-s1.img");
    let nbdcopy = Command::new(require_tool("nbdcopy"))
        .arg(snapshot.to_string())
        .arg(&copy)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nbdcopy");
    // The endpoint answers while the copy runs.
    scrape(&metrics);
    let out = nbdcopy.wait_with_output().expect("wait for nbdcopy");
    assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&copy).unwrap().len() as f64, SIZE_BYTES);

    let after = scrape(&metrics);
    let bytes = must(&after, "sanvol_backup_serve_read_bytes_total", &export);
    assert!(
        bytes >= SIZE_BYTES + 65536.0,
        "serve counted {bytes} bytes read; nbdcopy copied {SIZE_BYTES} after 64 KiB"
    );
    let reads = must(&after, "sanvol_backup_serve_reads_total", &export);
    assert!(reads >= 2.0, "{reads}");
    assert_eq!(must(&after, "sanvol_backup_serve_read_seconds", &export), reads, "every read is timed");
    assert_eq!(must(&after, "sanvol_backup_serve_errors_total", &export), 0.0);
    assert_eq!(must(&after, "sanvol_backup_serve_untracked_total", &[]), 0.0, "every connection was followed");
    assert!(must(&after, "sanvol_backup_serve_connections_total", &[]) >= 2.0);
    // The closed sessions are no longer open: serve notices each end
    // asynchronously, so poll the endpoint (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while must(&scrape(&metrics), "sanvol_backup_serve_sessions", &export) != 0.0 {
        assert!(std::time::Instant::now() < deadline, "sessions still counted as open 30 s after they closed");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(guard);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Binds a `NOTIFY_SOCKET` and returns the datagrams received within `limit`
/// until `done` says stop.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        NotifySocket { socket, path }
    }

    /// The next datagram (panics after the read timeout).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification before the timeout");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[test]
fn agent_and_server_tell_systemd_when_ready_and_when_stopping() {
    let mut stack = Stack::new(3, "256M");
    let mds_notify = NotifySocket::bind(&stack.dir.path().join("."));
    stack.mds_env.push(("NOTIFY_SOCKET".into(), mds_notify.path.display().to_string()));
    stack.start_mds();
    let ready = mds_notify.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "sanvol-mds sent {ready:?}");

    let agent_dir = stack.dir.path().join("agent-notify");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let notify = NotifySocket::bind(&agent_dir);
    let first = stack.start_agent("host-a");
    drop(first); // authorized; now run it under the "systemd" socket
    let notify_path = notify.path.display().to_string();
    let mut agent = stack.restart_agent_env("host-a", &[], &[("NOTIFY_SOCKET", notify_path.as_str())]);
    let ready = notify.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "sanvol-agent sent {ready:?}");
    assert!(ready.contains("STATUS=connected"), "{ready:?}");
    let status = agent.proc.terminate();
    let stopping = notify.next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "on SIGTERM sanvol-agent sent {stopping:?}");
    assert!(status.is_some_and(|s| s.success()), "SIGTERM ends the agent cleanly: {status:?}\n{}", agent.proc.log());
}

/// The unit files with `ExecStart` pointing at this build's binaries.
fn units_for_this_build(dir: &Path) -> Vec<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let bin_dir = bin("sanvol-mds").parent().unwrap().to_path_buf();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(&source).expect("contrib/systemd exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".service") || name.ends_with(".timer")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("/usr/local/bin/") || name.ends_with(".timer"), "{name}: binaries from /usr/local/bin");
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        let out = dir.join(&name);
        std::fs::write(&out, text).unwrap();
        units.push(out);
    }
    units.sort();
    units
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let tool = require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_this_build(dir.path());
    let names: Vec<String> = units.iter().map(|u| u.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["sanvol-agent.service", "sanvol-backup@.service", "sanvol-backup@.timer", "sanvol-mds.service"] {
        assert!(names.iter().any(|n| n == expected), "contrib/systemd lacks {expected}: {names:?}");
    }
    // A template is verified as an instance of itself.
    let mut args: Vec<PathBuf> = Vec::new();
    for u in &units {
        let name = u.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains("@.") {
            let instance = dir.path().join(name.replace("@.", "@db."));
            std::fs::copy(u, &instance).unwrap();
            args.push(instance);
        } else {
            args.push(u.clone());
        }
    }
    // The units' Documentation= names man pages: the ones this build generates.
    let man1 = dir.path().join("man/man1");
    for binary in ["sanvol", "sanvol-mds", "sanvol-agent", "sanvol-backup"] {
        let out = Command::new(bin(binary)).arg("generate").arg("man").arg(&man1).output().unwrap();
        assert!(out.status.success(), "{binary} generate man: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(tool)
        .arg("verify")
        .args(&args)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify {names:?}:\n{stderr}");
    let agent = std::fs::read_to_string(dir.path().join("sanvol-agent.service")).unwrap();
    assert!(agent.contains("Type=notify"), "the agent unit waits for READY=1");
}

/// Subcommand names listed under "Commands:" in a `--help` output.
fn subcommands(help: &str) -> Vec<String> {
    let Some((_, rest)) = help.split_once("\nCommands:\n") else { return Vec::new() };
    rest.lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Roff to plain words: escapes and macros out, whitespace collapsed.
fn man_text(roff: &str) -> String {
    let mut text = String::new();
    for line in roff.lines() {
        let line = if line.starts_with('.') {
            match line.split_once(' ') {
                Some((_, rest)) => rest.to_string(),
                None => continue,
            }
        } else {
            line.to_string()
        };
        text.push_str(&line);
        text.push(' ');
    }
    let text = text
        .replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
        .replace("\\fI", "")
        .replace("\\fP", "")
        .replace("\\(bu", "")
        .replace("\\&", "")
        .replace("\\\\", "\\")
        .replace("\\(aq", "'")
        .replace("\\*(Aq", "'")
        .replace("\\(dq", "\"")
        .replace("\\e", "\\");
    words(&text)
}

fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The descriptions of `--help`: the about text, each argument's help and
/// each subcommand's summary (without clap's bracketed annotations and
/// value lists, which the man page renders in its own layout).
fn help_paragraphs(help: &str) -> Vec<String> {
    let mut paragraphs = Vec::new();
    let mut current = String::new();
    let mut section = "";
    let mut in_values = false;
    for line in help.lines() {
        let trimmed = line.trim();
        if !line.starts_with(' ') && !trimmed.is_empty() && (trimmed.ends_with(':') || trimmed.starts_with("Usage:")) {
            // A section header ("Options:", "Commands:", "Usage: ...").
            paragraphs.push(std::mem::take(&mut current));
            section = if trimmed.starts_with("Usage:") { "usage" } else { trimmed };
            in_values = false;
            continue;
        }
        if section == "usage" {
            continue;
        }
        if trimmed.is_empty() {
            paragraphs.push(std::mem::take(&mut current));
            continue;
        }
        if trimmed == "Possible values:" {
            paragraphs.push(std::mem::take(&mut current));
            in_values = true;
            continue;
        }
        // A new item: an option or argument (indented 2), or a subcommand.
        let item = trimmed.starts_with('-')
            || (section == "Arguments:" && (trimmed.starts_with('<') || trimmed.starts_with('[')))
            || (section == "Commands:" && line.starts_with("  ") && !line.starts_with("   "));
        if item {
            in_values = false;
            paragraphs.push(std::mem::take(&mut current));
            let mut words = trimmed.split_whitespace().peekable();
            if section == "Commands:" {
                words.next();
            } else {
                while let Some(w) = words.peek() {
                    if w.starts_with('-') || w.starts_with('<') || w.starts_with('[') {
                        let flag = words.next().unwrap().trim_end_matches(',');
                        if flag.starts_with("--") {
                            paragraphs.push(flag.to_string());
                        }
                    } else {
                        break;
                    }
                }
            }
            current = words.collect::<Vec<_>>().join(" ");
            continue;
        }
        if in_values {
            continue;
        }
        current.push(' ');
        current.push_str(trimmed);
    }
    paragraphs.push(current);
    paragraphs
        .into_iter()
        .map(|p| words(&strip_annotations(&p)))
        .filter(|p| !p.is_empty() && !p.starts_with("Print this message or the help"))
        .collect()
}

fn strip_annotations(p: &str) -> String {
    let mut out = p.to_string();
    for tag in ["[env: ", "[default: ", "[possible values: ", "[aliases: "] {
        while let Some(start) = out.find(tag) {
            let end = out[start..].find(']').map_or(out.len(), |e| start + e + 1);
            out.replace_range(start..end, "");
        }
    }
    out
}

#[test]
fn every_commands_help_matches_its_generated_man_page() {
    for binary in ["sanvol", "sanvol-mds", "sanvol-agent", "sanvol-backup", "sanvol-target"] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin(binary)).arg("generate").arg("man").arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "{binary} generate man: {}", String::from_utf8_lossy(&out.stderr));
        let mut checked = BTreeMap::new();
        let mut paragraphs = 0;
        let mut queue = vec![vec![]];
        while let Some(path) = queue.pop() {
            let help = Command::new(bin(binary)).args(&path).arg("--help").env_remove("SANVOL_MDS").output().unwrap();
            assert!(help.status.success(), "{binary} {path:?} --help");
            let help = String::from_utf8_lossy(&help.stdout).into_owned();
            let page_name =
                std::iter::once(binary.to_string()).chain(path.iter().cloned()).collect::<Vec<_>>().join("-");
            let page = dir.path().join(format!("{page_name}.1"));
            let roff = std::fs::read_to_string(&page)
                .unwrap_or_else(|_| panic!("no man page {page_name}.1 for `{binary} {}`", path.join(" ")));
            let man = man_text(&roff);
            for paragraph in help_paragraphs(&help) {
                paragraphs += 1;
                assert!(
                    man.contains(&paragraph),
                    "`{binary} {} --help` says {paragraph:?}, which {page_name}.1 does not:\n{man}",
                    path.join(" ")
                );
            }
            for sub in subcommands(&help) {
                let mut p = path.clone();
                p.push(sub);
                queue.push(p);
            }
            checked.insert(page_name, ());
        }
        eprintln!("{binary}: {} commands, {paragraphs} help paragraphs found in their man pages", checked.len());
        assert!(paragraphs >= 4 * checked.len(), "{binary}: the help parser found too little to compare");
        let pages = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(pages, checked.len(), "{binary}: every man page is one command's ({:?})", checked.keys());
    }
}

#[test]
fn completions_are_generated_for_every_shell() {
    for binary in ["sanvol", "sanvol-mds", "sanvol-agent", "sanvol-backup", "sanvol-target"] {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(bin(binary)).args(["generate", "completions", shell]).output().unwrap();
            let script = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && script.contains(binary), "{binary} completions {shell}: {script:.200}");
        }
        let bash = Command::new(bin(binary)).args(["generate", "completions", "bash"]).output().unwrap();
        let status = Command::new("bash").arg("-n").stdin(Stdio::piped()).spawn().and_then(|mut c| {
            c.stdin.take().unwrap().write_all(&bash.stdout)?;
            c.wait()
        });
        assert!(status.is_ok_and(|s| s.success()), "{binary}'s bash completion parses");
    }
}

#[test]
fn json_logs_are_one_object_per_line_with_fields() {
    let mut stack = Stack::new(3, "256M");
    stack.mds_config_extra.push("log_format = \"json\"".into());
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let log = stack.mds_log();
    let objects: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!objects.is_empty(), "no JSON log lines:\n{log}");
    for o in &objects {
        assert!(o["level"].is_string() && o["fields"]["message"].is_string() && o["target"].is_string(), "{o}");
    }
    assert!(
        log.lines().all(|l| l.starts_with('{') || l.starts_with("listening on") || l.starts_with("metrics")),
        "{log}"
    );
}
