//! Issue 19 (durable handles, hardened) with real processes: `sanvol-agent`
//! killed with SIGKILL and started again under fio verify writes (it takes its
//! handles back from its state file at once); the agent's control connection
//! cut exactly between a recall and its confirmation, for a grow and a
//! snapshot; `sanvol-mds` killed and restarted while the agent's I/O goes
//! through it (fallback).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use sanvol_tests::peers;
use sanvol_tests::proxy::CuttableProxy;
use sanvol_tests::system::{Agent, Stack};
use sanvol_tests::volumes::{assert_fio_ok, fio_verify};

const WAIT: Duration = Duration::from_secs(60);
/// Agent restarts measured (the issue asks for the median of ten).
const RESTARTS: usize = 10;

fn listed(agent: &Agent, volume: &str) -> Option<serde_json::Value> {
    let out = agent.cli(&["list", "--json"]);
    if !out.status.success() {
        return None;
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    list.as_array()?.iter().find(|v| v["volume"] == volume).cloned()
}

/// Time from `since` until a read through `uri` succeeds. Polls: the export
/// is another process's socket, which offers nothing to wait on.
async fn until_served(uri: &NbdUri, since: Instant) -> Duration {
    loop {
        if let Ok(c) = NbdClient::connect(uri, ClientOptions::default()).await {
            let read = c.read(0, 4096).await;
            c.disconnect().await;
            if read.is_ok() {
                return since.elapsed();
            }
        }
        assert!(since.elapsed() < WAIT, "{uri} was not served again within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// With the server's default lease (10 s) and durable time (30 s): a killed
/// agent's successor resumes the handle instead of waiting 40 s for it, and
/// a client that reconnects (QEMU's NBD client, as a VM would use the
/// export) sees no I/O error and reads back everything it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_under_fio_verify_resumes_at_once_with_default_leases() {
    let mut stack = Stack::new(2, "1G");
    stack.lease_ms = 10_000;
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "256M", "--mirror", "2"]);
    let mut agent = stack.start_agent("host-a");
    let uri = agent.attach("v", "exclusive");
    let handle = listed(&agent, "v").expect("listed")["handle"].as_u64().unwrap();

    let qemu = peers::qemu_nbd_reconnecting(&uri, 120);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::task::spawn_blocking({
        let (uri, stop) = (qemu.uri(), stop.clone());
        move || {
            // Rounds of writes and their verification until the restarts are done.
            let mut rounds = 0;
            while rounds == 0 || !stop.load(Ordering::SeqCst) {
                assert_fio_ok(fio_verify(&uri, "24M", &[]).output().expect("run fio"));
                rounds += 1;
            }
            rounds
        }
    });

    let mut served_ms = Vec::new();
    for round in 0..RESTARTS {
        // Pacing, not synchronization: let I/O flow between restarts.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let killed = Instant::now();
        agent.proc.kill();
        agent = stack.restart_agent("host-a");
        let pause = until_served(&uri, killed).await;
        served_ms.push(pause.as_millis() as u64);
        let log = agent.proc.log();
        assert!(log.contains(&format!("took back volume v (handle {handle})")), "restart {round}:\n{log}");
        // Not by waiting out its own lease: a re-open would have been refused
        // for lease + durable time (40 s).
        assert!(pause < Duration::from_millis(stack.lease_ms), "restart {round} took {pause:?}:\n{log}");
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = writer.await.expect("the writer");
    drop(qemu);

    let info = listed(&agent, "v").expect("still attached");
    assert_eq!((info["handle"].as_u64(), info["state"].as_str()), (Some(handle), Some("open")), "{info}");
    let shown = stack.sanvol_json(&["volume", "show", "v"]);
    let open_by = shown["info"]["open_by"].as_array().unwrap();
    assert!(open_by.len() == 1 && open_by[0].as_str().unwrap().contains("active"), "{shown}");
    served_ms.sort_unstable();
    eprintln!(
        "agent kill -9 -> volume served again: median {} ms, max {} ms over {RESTARTS} restarts (fio rounds: {rounds})",
        served_ms[RESTARTS / 2],
        served_ms[RESTARTS - 1]
    );
    agent.detach("v");
}

/// Whether process `pid` is stopped (SIGSTOP): state `T` in /proc/PID/stat.
fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
}

/// A grow or snapshot recalls the volume; the agent drains and is frozen
/// right before it confirms (a fault point); its control connection is cut
/// and restored; then it goes on. The confirmation it was about to send is
/// lost with the connection: it reconnects, resumes, is asked again and
/// confirms, and the change completes while fio writes on without an error.
async fn cut_between_recall_and_confirmation(change: &[&str]) -> (Stack, Agent) {
    let mut stack = Stack::new(2, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "128M"]);
    let proxy = CuttableProxy::start(&stack.dir.path().join("mds-proxy.sock"), &stack.mds_socket);
    stack.authorize_agent("host-a");
    let via_proxy = format!("unix:{}", proxy.socket.display());
    let agent = stack.restart_agent_at("host-a", &via_proxy, &[], &[("SANVOL_FAULT", "agent-before-recall-done:stop")]);
    let uri = agent.attach("v", "exclusive");
    let fio = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || fio_verify(&uri, "64M", &[]).output().expect("run fio")
    });

    let mut change_cmd = stack.sanvol_command(change).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let pid = agent.proc.pid();
    let since = Instant::now();
    while !stopped(pid) {
        assert!(since.elapsed() < WAIT, "the agent never reached its confirmation:\n{}", agent.proc.log());
        // Polling another process's state: there is nothing to await.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.cut();
    let cuts = proxy.accepted();
    // Both ends closed before anything is forwarded again: the confirmation
    // the agent sends when it goes on cannot slip through.
    while proxy.open_connections() > 0 {
        assert!(since.elapsed() < WAIT, "the proxy did not drop its connections");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    proxy.restore();
    // SAFETY: kill(2) on a child we started.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };

    let since = Instant::now();
    let status = loop {
        if let Some(status) = change_cmd.try_wait().unwrap() {
            break status;
        }
        assert!(since.elapsed() < WAIT, "{change:?} never completed:\n{}", agent.proc.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{change:?} failed; agent log:\n{}\nmds log:\n{}", agent.proc.log(), stack.mds_log());
    assert_fio_ok(fio.await.unwrap());
    assert!(proxy.accepted() > cuts, "the agent reconnected through the proxy");
    let log = agent.proc.log();
    let logs = || format!("agent log:\n{log}\nmds log:\n{}", stack.mds_log());
    assert!(log.contains("reached agent-before-recall-done"), "{}", logs());
    assert!(log.contains("handle resumed after reconnecting: unchanged"), "{}", logs());
    assert!(log.contains("recall confirmed to the metadata server"), "{}", logs());
    let info = listed(&agent, "v").expect("attached");
    assert_eq!((info["state"].as_str(), info["layout_generation"].as_u64()), (Some("open"), Some(2)), "{info}");
    drop(proxy);
    (stack, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grow_completes_when_the_connection_breaks_between_the_recall_and_its_confirmation() {
    let (stack, agent) = cut_between_recall_and_confirmation(&["volume", "grow", "v", "256M"]).await;
    let info = listed(&agent, "v").unwrap();
    assert_eq!(info["size_bytes"].as_u64(), Some(256 << 20), "{info}");
    let shown = stack.sanvol_json(&["volume", "show", "v"]);
    assert_eq!(shown["description"]["size_bytes"].as_u64(), Some(256 << 20), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_completes_when_the_connection_breaks_between_the_recall_and_its_confirmation() {
    let (stack, _agent) = cut_between_recall_and_confirmation(&["snapshot", "create", "v", "s1"]).await;
    let list = stack.sanvol_json(&["snapshot", "list", "v"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// The agent's direct path to the volume's device is cut, so its I/O goes
/// through the server; the server is killed with SIGKILL and started again
/// while fio writes. The agent holds the I/O while the server is away, takes
/// it up again on the restarted server (data channels are served in its
/// grace period), and fio sees no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_io_survives_a_server_restart() {
    let mut stack = Stack::new(1, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "p", "128M"]);
    let device = stack.devices[0].uri().to_string();
    let proxy =
        CuttableProxy::start(&stack.dir.path().join("dev-proxy.sock"), &stack.devices[0].dir().join("nbd.sock"));
    let via_proxy = NbdUri::unix(&proxy.socket, "").to_string();
    let agent = stack.start_agent_with("host-a", &["--device-uri".into(), format!("{device}={via_proxy}")]);
    let uri = agent.attach("p", "exclusive");
    proxy.cut();

    let fio = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || fio_verify(&uri, "64M", &[]).output().expect("run fio")
    });
    let since = Instant::now();
    while !agent.proc.log().contains("data channel through the metadata server open") {
        assert!(since.elapsed() < WAIT, "no fallback:\n{}", agent.proc.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.kill_mds();
    // Down for a moment: requests on fallback find nobody to serve them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.start_mds();
    assert_fio_ok(fio.await.unwrap());
    let log = agent.proc.log();
    assert!(log.contains("holding this device's I/O and retrying"), "{log}");

    // The volume reads through the restarted server.
    let c = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
    c.read(0, 1 << 20).await.expect("reads through the restarted server");
    c.disconnect().await;
    agent.detach("p");
}

/// `systemctl stop` must not hang: with the only device stopped (SIGSTOP)
/// and the metadata server killed, SIGTERM still ends the agent within
/// `--shutdown-timeout-ms`, with an error that says what was left undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_device_and_the_server_gone_ends_within_the_shutdown_timeout() {
    let mut stack = Stack::new(1, "256M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "v", "16M"]);
    let mut agent = stack.start_agent_with("host-a", &["--shutdown-timeout-ms".into(), "2000".into()]);
    let uri = agent.attach("v", "exclusive");
    let c = sanvol_tests::volumes::connect(&uri).await;
    c.write(0, bytes::Bytes::from(vec![1u8; 4096]), false).await.unwrap();
    c.disconnect().await;
    let device = stack.devices[0].pid();
    let signal = |pid: u32, sig: i32| {
        // SAFETY: kill(2) on processes this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    };
    signal(device, libc::SIGSTOP);
    stack.kill_mds();
    signal(agent.proc.pid(), libc::SIGTERM);
    let status = agent.proc.wait_exit_within(Duration::from_secs(30));
    signal(device, libc::SIGCONT);
    assert!(!status.success(), "the flush could not have finished: {}", agent.proc.log());
    assert!(agent.proc.log().contains("the shutdown did not finish within 2 s"), "{}", agent.proc.log());
}
