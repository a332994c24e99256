//! On a host without the kernel NBD driver (the build machines), `sanvol-agent attach --kernel` says
//! so clearly and the volume stays attached on its socket export, which works.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, run_ok, Pool};

#[test]
fn attach_kernel_without_the_driver_says_so_and_serves_the_socket_export() {
    if std::path::Path::new("/sys/module/nbd").exists() {
        eprintln!("this host has the NBD driver; nothing to check here");
        return;
    }
    let pool = Pool::start("nodriver", 1, "256M", 3000);
    pool.sanvol(&["volume", "create", "vol", "64M"]);
    let control = pool.dir.join("agent.sock");
    let log = std::fs::File::create(pool.dir.join("agent.log")).unwrap();
    let mut agent = Command::new(bin("sanvol-agent"))
        .arg("--control-socket")
        .arg(&control)
        .args(["run", "--mds", &format!("127.0.0.1:{}", pool.mds_port), "--name", "host"])
        .arg("--key")
        .arg(&pool.agent_key)
        .arg("--server-key")
        .arg(pool.dir.join("mds.key.pub"))
        .arg("--export-dir")
        .arg(pool.dir.join("exports"))
        .arg("--state-dir")
        .arg(pool.dir.join("agent-state"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_cli = |args: &[&str]| {
        Command::new(bin("sanvol-agent")).arg("--control-socket").arg(&control).args(args).output().unwrap()
    };
    let out = agent_cli(&["wait-ready", "--timeout-secs", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = agent_cli(&["attach", "vol", "--kernel"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("the kernel NBD driver is not loaded: modprobe nbd, or use the socket export"), "{stderr}");
    assert!(stderr.contains("stays attached at nbd+unix:///vol?socket="), "{stderr}");

    // The socket export serves the volume.
    let list = run_ok(Command::new(bin("sanvol-agent")).arg("--control-socket").arg(&control).args(["list", "--json"]));
    assert!(list.contains("\"volume\": \"vol\"") && !list.contains("kernel_device"), "{list}");
    let socket = pool.dir.join("exports").join("vol.sock");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no export socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///vol?socket={}", socket.display());
    if let Some(qemu_img) = vm_tests::deps::which("qemu-img") {
        let info = run_ok(Command::new(qemu_img).args(["info", "--output=json", &uri]));
        assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
    }
    let out = agent_cli(&["detach", "vol"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = agent.kill();
    let _ = agent.wait();
}
