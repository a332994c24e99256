//! One active metadata server per pool, with real processes: two servers
//! started at once (exactly one becomes active), a standby taking over after
//! `kill -9` of the active one under fio, a stopped (SIGSTOP) server that
//! comes back after losing its lease and commits nothing, and planned
//! handoffs under fio; on `sanvol-target` devices, a server paused with a
//! commit in flight, fenced by the server that takes over; damaged server
//! sectors in the lease area, reported once. The metadata is
//! read back from the devices directly (`Pool::open_journaled`, or the
//! device image files), not only through the servers.

use std::process::Stdio;
use std::time::{Duration, Instant};

use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::peers::require_tool;
use sanvol_tests::system::{pub_path, ServerProc, Stack};
use sanvol_tests::volumes::{connect, fio_verify, BLOCK};

/// Polls `f` every 50 ms until it returns `Some`, at most `limit` (then
/// fails with every process log of `stack`).
fn poll<T>(stack: &Stack, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}\n{}", stack.all_logs(80));
        // Polling other processes' observable state: there is nothing to await.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the server at `addr` answers to `pool status`: Ok(status JSON) if
/// it is active, Err(its refusal) otherwise.
fn status_at(stack: &Stack, addr: &str) -> Result<serde_json::Value, String> {
    let out = stack.sanvol_at(addr, &["pool", "status", "--json"]);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("pool status --json"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Waits until the server at `active` serves and the one at `standby`
/// refuses, naming `active_name`.
fn wait_roles(stack: &Stack, active: &str, standby: &str, active_name: &str) {
    poll(stack, &format!("{active} active and {standby} standing by"), Duration::from_secs(30), || {
        let a = status_at(stack, active).ok()?;
        let b = status_at(stack, standby).err()?;
        (b.contains("standing by") && b.contains(active_name)).then_some(a)
    });
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid} {sig}");
}

/// The pool metadata as the devices hold it, read directly.
async fn metadata_on_devices(stack: &Stack) -> volume_format::PoolMetadata {
    let key = std::sync::Arc::new(control_client::keys::load_private(&stack.mds_key).unwrap());
    let (pool, meta) = metadata_server::pool::Pool::open_journaled(&stack.device_uris(), key).await.unwrap();
    for d in &pool.devices {
        if let Some(c) = &d.client {
            c.disconnect().await;
        }
    }
    meta
}

/// Real processes racing for the lease, a few rounds (≈ 7 s each): the
/// simulator's `settled-one-active-server` invariant covers the race under
/// thousands of seeded schedules (sim/README.md), this checks the binaries.
const ELECTION_ROUNDS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_servers_started_together_exactly_one_becomes_active() {
    let stack = Stack::new(3, "256M");
    for round in 0..ELECTION_ROUNDS {
        let mut a = stack.spawn_server(1);
        let mut b = stack.spawn_server(2);
        a.proc.wait_listening(&a.socket.clone());
        b.proc.wait_listening(&b.socket.clone());
        let (active, standby) = poll(&stack, "one server active", Duration::from_secs(30), || {
            match (status_at(&stack, &a.addr()), status_at(&stack, &b.addr())) {
                (Ok(_), Err(e)) if e.contains("standing by") && e.contains("mds-1") => Some((&a, &b)),
                (Err(e), Ok(_)) if e.contains("standing by") && e.contains("mds-2") => Some((&b, &a)),
                (Ok(_), Ok(_)) => panic!("round {round}: both servers answer as active"),
                _ => None,
            }
        });
        assert!(active.proc.log().contains("acquired the pool lease"), "{}", active.proc.log());
        assert!(
            standby.proc.log().contains("the pool is served by another metadata server; standing by"),
            "{}",
            standby.proc.log()
        );
        // Both stop; the active one releases the lease for the next round.
        for s in [&mut a, &mut b] {
            s.proc.terminate();
        }
    }
}

/// Starts host 1 (via the stack) and host 2 as its standby; agents and the
/// CLI know both addresses.
/// Waits until `nbdinfo --list` at the backup socket `socket` shows export
/// `name` (the active server serves it).
fn snapshots_listed_at(stack: &Stack, socket: &std::path::Path, name: &str) {
    poll(stack, "the active server's backup socket", Duration::from_secs(30), || {
        let list = std::process::Command::new(require_tool("nbdinfo"))
            .arg("--list")
            .arg(format!("nbd+unix:///?socket={}", socket.display()))
            .output()
            .ok()?;
        String::from_utf8_lossy(&list.stdout).contains(name).then_some(())
    });
}

fn active_and_standby(stack: &mut Stack) -> ServerProc {
    stack.start_mds();
    // A server listens before it acquires the lease: started within the
    // acquire wait of the first, the second would win the race for the
    // free lease (the later writer wins). The first is active, then.
    poll(stack, "the first server to become active", Duration::from_secs(30), || {
        status_at(stack, &stack.mds_addr()).ok()
    });
    let standby = stack.start_server(2);
    stack.more_mds.push(standby.addr());
    wait_roles(stack, &stack.mds_addr(), &standby.addr(), "mds-1");
    standby
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_after_kill_9_of_the_active_server_under_fio() {
    let mut stack = Stack::new(3, "512M");
    // One backup socket path for both: the killed server leaves its socket
    // behind, and the new active one replaces it.
    let backup_socket = stack.dir.path().join("backup.sock");
    stack.mds_config_extra.push(format!("backup_socket = {:?}", backup_socket.display().to_string()));
    let standby = active_and_standby(&mut stack);
    stack.sanvol_ok(&["volume", "create", "plain", "64M"]);
    stack.sanvol_ok(&["snapshot", "create", "plain", "s"]);
    stack.sanvol_ok(&["volume", "create", "mirrored", "64M", "--mirror", "2"]);
    let a = stack.start_agent("host-a");
    let b = stack.start_agent("host-b");
    let uri_a = a.attach("plain", "exclusive");
    let uri_b = b.attach("mirrored", "exclusive");
    let fio = |uri| {
        fio_verify(uri, "64M", &["--time_based", "--runtime=12", "--verify_backlog=64"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fio")
    };
    let (fio_a, fio_b) = (fio(&uri_a), fio(&uri_b));
    // Both write (some blocks of ours first, so the kill lands under load).
    for uri in [&uri_a, &uri_b] {
        let c = connect(uri).await;
        c.write(60 << 20, Bytes::from(vec![7u8; BLOCK as usize]), false).await.unwrap();
        c.disconnect().await;
    }
    stack.kill_mds();
    poll(&stack, "the standby to take over", Duration::from_secs(30), || status_at(&stack, &standby.addr()).ok());
    for fio in [fio_a, fio_b] {
        let out = fio.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("err= 0"), "fio failed:\n{text}\n{}", stack.all_logs(60));
    }
    // Both handles live on, resumed at the new server.
    for (volume, agent) in [("plain", "host-a"), ("mirrored", "host-b")] {
        let shown = stack.sanvol_json(&["volume", "show", volume]);
        let open_by = shown["info"]["open_by"].as_array().unwrap();
        assert!(open_by.len() == 1 && open_by[0].as_str().unwrap().contains(agent), "{volume}: {open_by:?}");
        assert!(open_by[0].as_str().unwrap().contains("active"), "{volume}: {open_by:?}");
    }
    snapshots_listed_at(&stack, &backup_socket, "plain@s");
    // The devices hold what the new server serves.
    let on_devices = metadata_on_devices(&stack).await;
    let served = status_at(&stack, &standby.addr()).unwrap();
    assert_eq!(served["generation"].as_u64().unwrap(), on_devices.generation);
    a.detach("plain");
    b.detach("mirrored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_past_its_lease_commits_nothing_after_the_takeover() {
    let mut stack = Stack::new(3, "256M");
    let standby = active_and_standby(&mut stack);
    stack.sanvol_ok(&["volume", "create", "v1", "16M"]);
    let old = stack.mds.as_ref().unwrap().pid();
    signal(old, libc::SIGSTOP);
    // The standby takes over once the stopped server's record stayed
    // unchanged for the expiry, and commits.
    poll(&stack, "the standby to become active", Duration::from_secs(30), || status_at(&stack, &standby.addr()).ok());
    let out = stack.sanvol_at(&standby.addr(), &["volume", "create", "v2", "16M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generation = status_at(&stack, &standby.addr()).unwrap()["generation"].as_u64().unwrap();
    // A change sent to the stopped server waits in its queue...
    let late = {
        let mds = stack.mds_addr();
        let (key, server_key) = (stack.admin_key.clone(), pub_path(&stack.mds_key));
        std::thread::spawn(move || {
            std::process::Command::new(sanvol_tests::system::bin("sanvol"))
                .env("SANVOL_MDS", mds)
                .env("SANVOL_KEY", key)
                .env("SANVOL_SERVER_KEY", server_key)
                .args(["volume", "create", "from-the-old-server", "16M"])
                .output()
                .unwrap()
        })
    };
    // ...and fails once it runs again: it lost the lease, and says so.
    signal(old, libc::SIGCONT);
    let out = late.join().unwrap();
    assert!(!out.status.success(), "the old server must not commit: {}", String::from_utf8_lossy(&out.stdout));
    let mut refusal = String::from_utf8_lossy(&out.stderr).into_owned();
    if !(refusal.contains("lease") || refusal.contains("standing by")) {
        // The request reached the old server as it noticed the loss and
        // closed its sessions (the connection broke under the handshake):
        // asked again, it must say why.
        assert!(
            refusal.contains("Broken pipe") || refusal.contains("closed") || refusal.contains("reset"),
            "{refusal}"
        );
        let again = stack.sanvol_at(&stack.mds_addr(), &["volume", "create", "from-the-old-server", "16M"]);
        assert!(!again.status.success(), "the old server must not commit: {}", String::from_utf8_lossy(&again.stdout));
        refusal = String::from_utf8_lossy(&again.stderr).into_owned();
        assert!(refusal.contains("lease") || refusal.contains("standing by"), "{refusal}");
    }
    poll(&stack, "the old server to say it lost the lease", Duration::from_secs(20), || {
        let log = stack.mds_log();
        (log.contains("lost the pool lease (another metadata server took the pool lease: mds-2")).then_some(())
    });
    poll(&stack, "the old server to stand by", Duration::from_secs(20), || {
        status_at(&stack, &stack.mds_addr()).err().filter(|e| e.contains("standing by") && e.contains("mds-2"))
    });
    // On the devices: v1 and v2, nothing of the old server after the takeover.
    let meta = metadata_on_devices(&stack).await;
    assert!(meta.volume_by_name("v1").is_some() && meta.volume_by_name("v2").is_some());
    assert!(meta.volume_by_name("from-the-old-server").is_none(), "the old server committed after the takeover");
    assert_eq!(meta.generation, generation, "nothing was committed after the new server's last change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_handoffs_under_fio_move_the_pool_and_every_agent() {
    let mut stack = Stack::new(3, "512M");
    // Both servers are told one backup socket: only the active one serves
    // it, and each handoff passes it on.
    let backup_socket = stack.dir.path().join("backup.sock");
    stack.mds_config_extra.push(format!("backup_socket = {:?}", backup_socket.display().to_string()));
    let standby = active_and_standby(&mut stack);
    stack.sanvol_ok(&["volume", "create", "v", "64M"]);
    stack.sanvol_ok(&["snapshot", "create", "v", "s"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("v", "exclusive");
    let fio = fio_verify(&uri, "32M", &["--time_based", "--runtime=600", "--verify_backlog=64"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fio");
    // Our own writer beside fio, timing every write: the longest gap around
    // each handoff is the pause an application sees.
    let probe_uri = uri.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let probe = tokio::spawn(async move {
        let c = connect(&probe_uri).await;
        let mut done = Vec::new();
        let mut block = 0u64;
        while !*stop_rx.borrow_and_update() {
            c.write((48 << 20) + block % 1024 * BLOCK, Bytes::from(vec![1u8; BLOCK as usize]), false)
                .await
                .expect("probe write");
            done.push(Instant::now());
            block += 1;
        }
        c.disconnect().await;
        done
    });
    let addrs = [stack.mds_addr(), standby.addr()];
    let mut windows = Vec::new();
    for i in 0..10 {
        let (from, to) = (&addrs[i % 2], &addrs[(i + 1) % 2]);
        let to_name = if i % 2 == 0 { "mds-2" } else { "mds-1" };
        // As an operator would: the target shows as standing by in the
        // active server's list (a server that just handed off writes its
        // new role within one lease I/O timeout).
        let target_name = to_name;
        poll(&stack, "the target listed as standing by", Duration::from_secs(30), || {
            let status = status_at(&stack, from).ok()?;
            status["servers"]
                .as_array()?
                .iter()
                .any(|s| s["name"] == target_name && s["role"] == "standing by")
                .then_some(())
        });
        let started = Instant::now();
        let out = stack.sanvol_at(&stack.all_mds_addrs(), &["mds", "handoff"]);
        assert!(out.status.success(), "handoff {i}: {}\n{}", String::from_utf8_lossy(&out.stderr), stack.all_logs(400));
        wait_roles(&stack, to, from, to_name);
        windows.push((started, Instant::now()));
        snapshots_listed_at(&stack, &backup_socket, "v@s");
        // The agent follows: its handle is active at the new server.
        poll(&stack, "the agent's handle at the new server", Duration::from_secs(30), || {
            let shown = stack.sanvol_at(to, &["volume", "show", "v", "--json"]);
            let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).ok()?;
            let open_by = shown["info"]["open_by"].as_array()?.clone();
            open_by
                .iter()
                .any(|o| o.as_str().is_some_and(|s| s.contains("host-a") && s.contains("active")))
                .then_some(())
        });
    }
    let _ = stop_tx.send(true);
    let writes = probe.await.unwrap();
    signal(fio.id(), libc::SIGINT);
    // Stopped by SIGINT, fio exits non-zero; it reports err= 0 unless an
    // I/O or a verification (EILSEQ) failed.
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("err= 0") && !text.contains("bad magic"), "fio failed:\n{text}");
    // The pauses, for the record (speed is measured by bench/failover.sh).
    let mut pauses_ms: Vec<f64> = windows
        .iter()
        .map(|(from, to)| {
            writes
                .windows(2)
                .filter(|w| w[1] >= *from && w[0] <= *to + Duration::from_secs(1))
                .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
                .fold(0.0, f64::max)
        })
        .collect();
    pauses_ms.sort_by(f64::total_cmp);
    println!("longest write gap per handoff (ms, sorted): {pauses_ms:.1?}");
    agent.detach("v");
}

/// The pool metadata as the image files of `stack`'s `sanvol-target`
/// devices hold it (label, checkpoint slots and journal ring of every copy,
/// read from the files, loaded like the server loads them).
fn metadata_in_target_files(stack: &Stack) -> volume_format::PoolMetadata {
    use std::os::unix::fs::FileExt;
    use volume_format::metadata::journal::{load, CopyImage, LoadOptions};
    let read = |file: &std::fs::File, offset: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).expect("read the device image");
        buf
    };
    let mut copies = Vec::new();
    for d in &stack.devices {
        let file = std::fs::File::open(d.dir().join("disk.img")).expect("the device image");
        let label = volume_format::DeviceLabel::decode(&read(&file, 0, 4096)).expect("the device has its label");
        let area = volume_format::metadata::MetadataArea::from_label(&label);
        let slots =
            [read(&file, area.slot_offset(0), area.slot_bytes), read(&file, area.slot_offset(1), area.slot_bytes)];
        let ring = area.ring();
        copies.push((label.pool_uuid, area, slots, read(&file, ring.start, ring.len_bytes())));
    }
    let (key, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    let images: Vec<CopyImage> = copies
        .iter()
        .enumerate()
        .map(|(i, (_, area, slots, ring))| CopyImage {
            device: format!("device {i}"),
            area: *area,
            checkpoint_slots: [Ok(&slots[0][..]), Ok(&slots[1][..])],
            ring: Ok(&ring[..]),
        })
        .collect();
    let loaded = load(copies[0].0, &volume_format::PublicKey(key.to_bytes()), &images, LoadOptions::default())
        .unwrap_or_else(|e| panic!("the metadata in the device images does not load: {e}"));
    loaded.metadata
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_paused_with_a_commit_in_flight_is_fenced_on_fencing_devices_by_the_server_taking_over() {
    let mut stack = Stack::new_target_devices(3, 256 << 20);
    // A first run commits what it learns at its start (that the devices
    // fence), then stops and releases the lease: the next run has nothing
    // to commit until asked.
    stack.start_mds();
    poll(&stack, "the first run to serve", Duration::from_secs(30), || status_at(&stack, &stack.mds_addr()).ok());
    stack.sanvol_ok(&["volume", "create", "v1", "16M"]);
    stack.mds.take().unwrap().terminate();
    // The next run stops itself (SIGSTOP) at its first metadata write, past
    // its lease check, before the write leaves: paused with a commit in
    // flight.
    stack.mds_env.push(("SANVOL_FAULT".into(), "mds-before-metadata-write:stop".into()));
    let standby = active_and_standby(&mut stack);
    let old = stack.mds.as_ref().unwrap().pid();
    let late = {
        let mds = stack.mds_addr();
        let (key, server_key) = (stack.admin_key.clone(), pub_path(&stack.mds_key));
        std::thread::spawn(move || {
            std::process::Command::new(sanvol_tests::system::bin("sanvol"))
                .env("SANVOL_MDS", mds)
                .env("SANVOL_KEY", key)
                .env("SANVOL_SERVER_KEY", server_key)
                .args(["volume", "create", "from-the-old-server", "16M"])
                .output()
                .unwrap()
        })
    };
    poll(&stack, "the first server to stop in its commit", Duration::from_secs(20), || {
        stack.mds_log().contains("SANVOL_FAULT: reached mds-before-metadata-write").then_some(())
    });
    // The standby takes over (its lease, then the fence) and commits.
    poll(&stack, "the standby to become active", Duration::from_secs(30), || status_at(&stack, &standby.addr()).ok());
    let out = stack.sanvol_at(&standby.addr(), &["volume", "create", "v2", "16M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generation = status_at(&stack, &standby.addr()).unwrap()["generation"].as_u64().unwrap();
    assert!(
        standby.proc.log().contains("fenced the previous metadata servers on the pool's fencing devices"),
        "{}",
        standby.proc.log()
    );
    // The first server goes on with its write: the targets refuse it.
    signal(old, libc::SIGCONT);
    let out = late.join().unwrap();
    assert!(
        !out.status.success(),
        "the old server must not commit: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stack.all_logs(60)
    );
    poll(&stack, "the old server to stand by", Duration::from_secs(30), || {
        status_at(&stack, &stack.mds_addr()).err().filter(|e| e.contains("standing by") && e.contains("mds-2"))
    });
    // The targets closed its connections when the new server fenced it, so
    // its write found them gone.
    for (i, device) in stack.devices.iter().enumerate() {
        let said = device.stderr();
        assert!(said.contains("fenced: closing older connections"), "device {i} did not fence the old server:\n{said}");
    }
    let log = stack.mds_log();
    // Said by its device task: whether its core still answers the commit
    // races the lease task that finds the takeover once it runs again.
    assert!(log.contains("metadata write failed on the devices: device"), "the old server's write must fail:\n{log}");
    // On the devices: what the new server committed, and nothing of the old one.
    let meta = metadata_in_target_files(&stack);
    assert!(meta.volume_by_name("v1").is_some() && meta.volume_by_name("v2").is_some(), "the commits before and after");
    assert!(
        meta.volume_by_name("from-the-old-server").is_none(),
        "the old server's write landed after the takeover:\n{}",
        stack.all_logs(60)
    );
    assert_eq!(meta.generation, generation, "nothing was committed after the new server's last change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_a_fencing_device_it_cannot_reach() {
    // Devices 0-2 hold the metadata and the pool lease, device 3 data only.
    let mut stack = Stack::new_target_devices(4, 256 << 20);
    let standby = active_and_standby(&mut stack);
    // The first commit records that the devices fence.
    stack.sanvol_ok(&["volume", "create", "v1", "16M"]);
    let old = stack.mds.as_ref().unwrap().pid();
    signal(old, libc::SIGSTOP);
    // A fencing data device stalls: the previous server cannot be fenced
    // there, so the standby must not serve, though it gets the lease.
    let stalled = stack.devices[3].pid();
    signal(stalled, libc::SIGSTOP);
    // It tries and stands by again; the takeover below, once the device
    // answers, is a later attempt (a new lease generation).
    poll(&stack, "the standby to find that it cannot fence", Duration::from_secs(90), || {
        let log = standby.proc.log();
        log.contains("fences but cannot be reached to fence the previous metadata server").then_some(())
    });
    let refused = status_at(&stack, &standby.addr());
    signal(stalled, libc::SIGCONT);
    assert!(refused.is_err(), "the standby served without fencing the previous server: {refused:?}");
    // Once the device answers, the next attempt fences and serves.
    poll(&stack, "the standby to take over", Duration::from_secs(60), || status_at(&stack, &standby.addr()).ok());
    assert!(standby.proc.log().contains("fenced the previous metadata servers"), "{}", standby.proc.log());
    let out = stack.sanvol_at(&standby.addr(), &["volume", "create", "v2", "16M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    signal(old, libc::SIGCONT);
    poll(&stack, "the old server to stand by", Duration::from_secs(30), || {
        status_at(&stack, &stack.mds_addr()).err().filter(|e| e.contains("standing by") && e.contains("mds-2"))
    });
    let meta = metadata_in_target_files(&stack);
    assert!(meta.volume_by_name("v1").is_some() && meta.volume_by_name("v2").is_some());
}

/// A server that wins the pool lease and loses it before it serves (stopped
/// or cut off from the devices between winning and the renewal that opens
/// its window) stands by again. Found by the simulator (exploration seed
/// 268100476750943): a lost lease waits for nothing, so the server stayed
/// "stopped" for good — listed so, no standby to hand over to, and a cache
/// mirror only it held could never be replayed. Here mds-1 stops itself
/// (SIGSTOP) right after winning; mds-2 takes the pool over; mds-1 runs
/// again, finds the lease lost, and must stand by: listed as standing by,
/// and the pool can be handed back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_loses_the_lease_before_it_serves_stands_by_again() {
    let mut stack = Stack::new(3, "256M");
    stack.mds_env.push(("SANVOL_FAULT".into(), "mds-lease-won-before-serving:stop".into()));
    stack.start_mds();
    poll(&stack, "mds-1 to stop once it won the lease", Duration::from_secs(30), || {
        stack.mds_log().contains("SANVOL_FAULT: reached mds-lease-won-before-serving").then_some(())
    });
    let first = stack.mds.as_ref().unwrap().pid();
    let second = stack.start_server(2);
    stack.more_mds.push(second.addr());
    poll(&stack, "mds-2 to take the pool over", Duration::from_secs(60), || status_at(&stack, &second.addr()).ok());
    stack.sanvol_ok(&["volume", "create", "v1", "16M"]);

    signal(first, libc::SIGCONT);
    // As an operator would: hand the pool to mds-1 once it is listed as
    // standing by (before, it stayed "stopped" and every handoff was
    // refused for want of a standby).
    poll(&stack, "a handoff to mds-1", Duration::from_secs(30), || {
        let status = status_at(&stack, &second.addr()).ok()?;
        let servers = status["servers"].as_array()?.clone();
        servers.iter().any(|s| s["name"] == "mds-1" && s["role"] == "standing by").then_some(())?;
        stack.sanvol_at(&stack.all_mds_addrs(), &["mds", "handoff"]).status.success().then_some(())
    });
    wait_roles(&stack, &stack.mds_addr(), &second.addr(), "mds-1");
    let shown = stack.sanvol_at(&stack.mds_addr(), &["volume", "show", "v1"]);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
}

/// Damaged server sectors in the lease area (someone wrote over them) cost
/// the active server nothing but one warning: it keeps its pool lease and
/// commits, says once how many sectors it cannot read and why, and does not
/// say it again every time it reads them (every 2 T) — where it used to log
/// a line per sector per read and reconnect to the device for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_server_sectors_are_reported_once_and_the_server_keeps_serving() {
    let mut stack = Stack::new(1, "256M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "before", "16M"]);

    // Sectors 3..=15 (not the owner's, not the servers 1 and 2 a stack
    // starts) overwritten with bytes that are no lease record.
    let c = connect(&stack.device_uris()[0]).await;
    let label = volume_format::DeviceLabel::decode(&c.read(0, 4096).await.unwrap()).expect("the device has its label");
    let area = label.layout.lease_area().expect("the device has a lease area");
    let sector = volume_format::lease::LEASE_SECTOR_BYTES;
    let damaged = 3..=volume_format::lease::HOST_ID_MAX as u64;
    for s in damaged.clone() {
        c.write(area.start + s * sector, Bytes::from(vec![0xa5; sector as usize]), true).await.unwrap();
    }
    c.disconnect().await;

    let expected = format!("lease read failed for {} of the servers' sectors", damaged.count());
    poll(&stack, "the server's warning about the damaged sectors", Duration::from_secs(30), || {
        stack.mds_log().contains(&expected).then_some(())
    });
    // Still the active server, committing.
    stack.sanvol_ok(&["volume", "create", "after", "16M"]);
    // The server reads the sectors every 2 T (T = 500 ms here): watch a few
    // more reads. Nothing to await — the absence of lines is what is checked.
    std::thread::sleep(Duration::from_millis(4 * stack.lease_io_timeout_ms));
    let log = stack.mds_log();
    assert_eq!(log.matches(&expected).count(), 1, "the warning repeated:\n{log}");
    assert!(!log.contains("lease read failed: "), "a line per sector came back:\n{log}");
    assert!(status_at(&stack, &stack.mds_addr()).is_ok(), "the server stopped serving:\n{}", stack.all_logs(40));
}
