//! Issue 3 acceptance, with real processes: nbdkit devices, `sanvol pool
//! init`, `sanvol-mds`, `sanvol-agent`, and fio / qemu-img / blockio's client
//! through the agent's export. Placement is checked by reading the devices
//! themselves, bypassing sanvol.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::peers::require_tool;
use sanvol_tests::system::{Stack, STARTUP_TIMEOUT};
use sanvol_tests::volumes::{assert_fio_ok, block_pattern, check_placement, connect, fill, fio_verify, BLOCK};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_lands_where_the_extent_map_says_and_survives_reattach_and_restart() {
    let mut stack = Stack::new(3, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "128M", "--mirror", "2"]);
    stack.sanvol_ok(&["volume", "create", "p", "192M"]);
    let agent = stack.start_agent("host-a");
    let m = agent.attach("m", "exclusive");
    let p = agent.attach("p", "exclusive");

    // Standard tools through the agent's export.
    assert_fio_ok(fio_verify(&m, "32M", &[]).output().expect("run fio"));
    assert_fio_ok(fio_verify(&p, "32M", &["--bs=64k", "--iodepth=8"]).output().expect("run fio"));
    // A full-size image: an 8 MiB pattern, then zeroes (converted as
    // WRITE_ZEROES over what fio left there).
    let image = stack.dir.path().join("pattern.raw");
    let pattern: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &pattern).unwrap();
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(192 << 20).unwrap();
    let qemu_img = require_tool("qemu-img");
    let status = Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&image)
        .arg(p.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert into the volume failed");
    let out = Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(p.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Images are identical"),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let c = connect(&p).await;
    assert_eq!(&c.read(0, 8 << 20).await.unwrap()[..], &pattern[..], "qemu-img's bytes read back through the agent");
    c.disconnect().await;

    // Every block where the extent map says, on both legs of the mirror.
    fill(&m, 1).await;
    fill(&p, 2).await;
    check_placement(&stack, "m", 1, None).await;
    check_placement(&stack, "p", 2, None).await;

    // Detach and reattach keeps the data.
    agent.detach("m");
    let listed = stack.sanvol_json(&["volume", "list"]);
    let m_info = listed.as_array().unwrap().iter().find(|v| v["name"] == "m").unwrap().clone();
    assert!(m_info["open_by"].as_array().unwrap().is_empty(), "detach closed the handle: {m_info}");
    let m = agent.attach("m", "exclusive");
    let c = connect(&m).await;
    let size = c.info().size;
    for b in [0, 1, size / BLOCK / 2, size / BLOCK - 1] {
        assert_eq!(&c.read(b * BLOCK, BLOCK as u32).await.unwrap()[..], block_pattern(1, b).as_slice());
    }
    c.disconnect().await;

    // kill -9 of the server and a restart: volumes and open handles stay.
    stack.kill_mds();
    stack.start_mds();
    let listed = stack.sanvol_json(&["volume", "list"]);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["m", "p"]);
    for v in listed.as_array().unwrap() {
        let open_by: Vec<&str> = v["open_by"].as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect();
        assert!(
            open_by.iter().any(|o| o.starts_with("host-a")),
            "{} lost its open handle across the restart: {v}",
            v["name"]
        );
    }
    // And the agent's I/O still works afterwards.
    let c = connect(&p).await;
    c.write(0, Bytes::from(block_pattern(9, 0)), true).await.expect("write after the server restart");
    assert_eq!(&c.read(0, BLOCK as u32).await.unwrap()[..], block_pattern(9, 0).as_slice());
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_exclusive_open_is_refused_naming_the_holder() {
    let mut stack = Stack::new(2, "512M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "db", "64M"]);
    let a = stack.start_agent("host-a");
    let b = stack.start_agent("host-b");
    a.attach("db", "exclusive");
    let out = b.cli(&["attach", "db", "--mode", "exclusive"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second exclusive open must fail");
    assert!(stderr.contains("host-a") && stderr.contains("exclusive"), "the refusal names the holder: {stderr}");
    let out = stack.sanvol(&["volume", "delete", "db"]);
    assert!(!out.status.success(), "delete of an open volume must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("host-a"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_while_fio_runs() {
    let mut stack = Stack::new(3, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "g", "64M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("g", "exclusive");

    // A verify job big enough to still run when the grow completes.
    let mut fio =
        fio_verify(&uri, "64M", &["--loops=4"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(fio.stdout.take().unwrap()).lines();
    // fio prints this once its NBD connection is up: the workload has started.
    let started = lines.by_ref().map_while(Result::ok).any(|l| l.contains("connected to NBD server"));
    assert!(started, "fio did not connect");
    let deadline = std::time::Instant::now() + STARTUP_TIMEOUT;
    stack.sanvol_ok(&["volume", "grow", "g", "192M"]);
    assert!(std::time::Instant::now() < deadline);
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio finished before the grow did: the test proves nothing; make the job bigger"
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = fio.wait().unwrap();
    let out = rest.join("\n");
    assert!(
        status.success() && out.contains("err= 0"),
        "fio across the grow failed:\n{out}\nagent log:\n{}",
        agent.proc.log()
    );

    // The new size is visible through the agent, and the new space works.
    let detail = stack.sanvol_json(&["volume", "show", "g"]);
    assert_eq!(detail["info"]["size_bytes"], 192 << 20);
    assert!(detail["info"]["layout_generation"].as_u64().unwrap() >= 2);
    let c = connect(&uri).await;
    assert_eq!(c.info().size, 192 << 20, "a new connection sees the grown volume");
    let last = (192 << 20) - BLOCK;
    c.write(last, Bytes::from(block_pattern(5, last / BLOCK)), true).await.unwrap();
    assert_eq!(&c.read(last, BLOCK as u32).await.unwrap()[..], block_pattern(5, last / BLOCK).as_slice());
    c.disconnect().await;
    // The grown layout, new extents included, is where the map says on both legs.
    fill(&uri, 3).await;
    check_placement(&stack, "g", 3, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_bad_credentials_are_refused_clearly() {
    let mut stack = Stack::new(1, "512M");
    stack.start_mds();
    let stranger = stack.dir.path().join("stranger.key");
    sanvol_tests::system::run_ok(Command::new(sanvol_tests::system::bin("sanvol")).arg("keygen").arg(&stranger));
    let out = Command::new(sanvol_tests::system::bin("sanvol"))
        .env("SANVOL_MDS", stack.mds_addr())
        .env("SANVOL_KEY", &stranger)
        .env("SANVOL_SERVER_KEY", sanvol_tests::system::pub_path(&stack.mds_key))
        .args(["volume", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not authorized"), "{stderr}");
    // The admin pins the wrong server key: refused before anything is sent.
    let out = Command::new(sanvol_tests::system::bin("sanvol"))
        .env("SANVOL_MDS", stack.mds_addr())
        .env("SANVOL_KEY", &stack.admin_key)
        .env("SANVOL_SERVER_KEY", sanvol_tests::system::pub_path(&stranger))
        .args(["volume", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("pinned"), "{stderr}");
    // An agent key used as admin: wrong role.
    let agent = stack.start_agent("host-a");
    drop(agent);
    let out = Command::new(sanvol_tests::system::bin("sanvol"))
        .env("SANVOL_MDS", stack.mds_addr())
        .env("SANVOL_KEY", stack.dir.path().join("host-a.key"))
        .env("SANVOL_SERVER_KEY", sanvol_tests::system::pub_path(&stack.mds_key))
        .args(["volume", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("wrong role"), "{stderr}");
    // The server logged each refusal and still serves.
    stack.sanvol_ok(&["pool", "status"]);
    let log = stack.mds_log();
    assert!(
        log.matches("refused").count() >= 3 || log.to_lowercase().matches("handshake").count() >= 3,
        "mds log:\n{log}"
    );
}

/// Issue 10: the agent's control plane never waits on an attach in progress.
/// The agent reaches the volume's device through a socket that accepts and
/// never answers (`--device-uri`), so its attach hangs connecting; `list` and
/// `status` must answer meanwhile, while the attach is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_status_answer_while_an_attach_hangs_on_a_device() {
    let mut stack = Stack::new(1, "256M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "slow", "64M"]);
    let stuck_path = stack.dir.path().join("stuck.sock");
    let stuck = std::os::unix::net::UnixListener::bind(&stuck_path).expect("bind the stuck device");
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Holds every connection open without a word; ends when the test drops the receiver.
        let mut open = Vec::new();
        while let Ok((stream, _)) = stuck.accept() {
            open.push(stream);
            if accepted_tx.send(open.len()).is_err() {
                return;
            }
        }
    });
    let device = stack.device_uris()[0].to_string();
    let remap = format!("{device}=nbd+unix:///stuck?socket={}", stuck_path.display());
    let agent = stack.start_agent_with("host-a", &["--device-uri".into(), remap]);

    let mut attach = Command::new(sanvol_tests::system::bin("sanvol-agent"))
        .args(["attach", "slow", "--control-socket"])
        .arg(&agent.socket)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sanvol-agent attach");
    // The agent is now connecting to the device that never answers.
    accepted.recv_timeout(STARTUP_TIMEOUT).expect("the agent never connected to the device");

    let out = agent.cli(&["list", "--json"]);
    assert!(out.status.success(), "list: {}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list --json");
    assert_eq!(listed, serde_json::json!([]), "the volume being attached is not listed yet");
    let status = control_client::agent_api::call(&agent.socket, &control_client::agent_api::ControlRequest::Status)
        .await
        .expect("status");
    assert_eq!(status.agent.expect("status reply").mds, "connected");
    assert!(
        attach.try_wait().expect("attach process").is_none(),
        "list and status answered only after the attach had finished"
    );
    let _ = attach.kill();
    let _ = attach.wait();
    // Lets the stuck device's thread see the receiver gone and end.
    drop(accepted);
    let _ = std::os::unix::net::UnixStream::connect(&stuck_path);
}
