//! The agent's kernel attach, in a guest whose kernel has the NBD driver: the MDS and nbdkit devices
//! run on the host, `sanvol-agent` runs in the guest and attaches a pool volume as `/dev/nbd0`.
//!
//! - scenario 1 (`agent_ext4`): mkfs, mount, write, remount after dropping caches, verify, fsck, detach;
//! - scenario 2 (`agent_reattach`): `kill -9` of the agent while a writer runs in the mounted
//!   filesystem, with the server's default lease and durable time and the agent's default kernel
//!   timeouts; the new agent resumes its handle from its state file and gives the same `/dev/nbd0`
//!   fresh sockets; no I/O error, files verify, fsck is clean;
//! - scenario 3 (`agent_fallback`): the guest's direct path to one device (through a proxy on the
//!   host) is cut while mounted; I/O goes through the metadata server, files verify, fsck clean;
//! - scenario 4 (`agent_grow`): `sanvol volume grow` on the host while the filesystem is mounted in
//!   the guest; the agent pushes the new size to the kernel and `resize2fs` grows the filesystem;
//! - scenario 5 (`agent_persist`): `attach --kernel --nbd-device /dev/nbd2 --persist`, data written,
//!   a clean stop (SIGTERM) and a start with the same config file: the volume is back on
//!   `/dev/nbd2` with its data; `detach --persist` removes the entry.

mod common;

use std::time::Duration;

use common::{CuttableProxy, GoSignal, Pool};
use vm_tests::Vm;

const VOL_BYTES: u64 = 256 << 20;

#[test]
fn scenario_1_agent_attaches_a_volume_as_dev_nbd0_with_a_real_ext4() {
    let pool = Pool::start("ext4", 2, "512M", 3000);
    pool.sanvol(&["volume", "create", "vol", "256M"]);
    let report = pool
        .scenario("agent_ext4", include_str!("scenarios/agent_ext4.sh"))
        .env("VOL_BYTES", VOL_BYTES)
        .timeout(Duration::from_secs(180))
        .run()
        .unwrap();
    eprintln!("agent_ext4: whole run {:.1?}, console log {}", report.elapsed, report.console_log.display());
    report.assert_pass();
}

#[test]
fn scenario_4_grow_while_mounted_and_resize2fs_sees_the_new_size() {
    let pool = Pool::start("grow", 2, "512M", 3000);
    pool.sanvol(&["volume", "create", "vol", "128M"]);
    let scenario = pool
        .scenario("agent_grow", include_str!("scenarios/agent_grow.sh"))
        .env("VOL_BYTES", 128u64 << 20)
        .env("GROWN_BYTES", 256u64 << 20)
        .timeout(Duration::from_secs(180));
    let mut vm = Vm::start(&scenario).unwrap();
    vm.wait_for_line("READY-TO-GROW").unwrap();
    pool.sanvol(&["volume", "grow", "vol", "256M"]);
    let report = vm.wait().unwrap();
    eprintln!("agent_grow: whole run {:.1?}, console log {}", report.elapsed, report.console_log.display());
    report.assert_pass();
}

#[test]
fn scenario_2_kill_9_of_the_agent_under_a_writer_is_a_pause_not_an_error() {
    // The server's defaults (lease 10 s, durable 30 s): a re-open would be refused for 40 s; the
    // new agent resumes instead.
    let pool = Pool::start_defaults("reattach", 2, "512M");
    pool.sanvol(&["volume", "create", "vol", "128M"]);
    let report = pool
        .scenario("agent_reattach", include_str!("scenarios/agent_reattach.sh"))
        .timeout(Duration::from_secs(240))
        .run()
        .unwrap();
    eprintln!("agent_reattach: whole run {:.1?}, console log {}", report.elapsed, report.console_log.display());
    report.assert_pass();
}

#[test]
fn scenario_3_cut_direct_path_falls_back_through_the_server() {
    let pool = Pool::start("fallback", 2, "512M", 3000);
    pool.sanvol(&["volume", "create", "vol", "128M"]);
    // The guest reaches the volume's first device through a proxy the test cuts; the others
    // directly (10.0.2.2). The MDS always reaches every device directly on 127.0.0.1.
    let shown = pool.sanvol_json(&["volume", "show", "vol"]);
    let devices = shown["description"]["devices"].as_array().expect("the volume's devices").clone();
    let port_of = |uri: &str| -> u16 {
        uri.trim_end_matches('/').rsplit(':').next().and_then(|p| p.split('/').next()).unwrap().parse().unwrap()
    };
    let cut_uri = devices[0]["uri"].as_str().unwrap().to_string();
    let proxy = CuttableProxy::start(port_of(&cut_uri));
    let mut uris = vec![format!("--device-uri {cut_uri}=nbd://10.0.2.2:{}/", proxy.port())];
    for d in &devices[1..] {
        let uri = d["uri"].as_str().unwrap();
        uris.push(format!("--device-uri {uri}=nbd://10.0.2.2:{}/", port_of(uri)));
    }
    let go = GoSignal::new();
    let scenario = pool
        .scenario("agent_fallback", include_str!("scenarios/agent_fallback.sh"))
        .env("GO_PORT", go.port())
        .env("DEVICE_URIS", uris.join(" "))
        .timeout(Duration::from_secs(240));
    let mut vm = Vm::start(&scenario).unwrap();
    vm.wait_for_line("READY-TO-CUT").unwrap();
    assert!(proxy.forwarded_bytes() > 0, "the guest's direct path to {cut_uri} runs through the proxy");
    proxy.cut();
    go.go();
    vm.wait_for_line("CUT-WRITES-DONE").unwrap();
    // The server knows this agent is using the fallback path for that device.
    let clients = pool.sanvol_json(&["client", "list"]);
    let guest = clients.as_array().unwrap().iter().find(|c| c["name"] == "guest").cloned().unwrap_or_default();
    let fallback = guest["fallback"].as_array().cloned().unwrap_or_default();
    go.go();
    let report = vm.wait().unwrap();
    eprintln!("agent_fallback: whole run {:.1?}, console log {}", report.elapsed, report.console_log.display());
    report.assert_pass();
    assert!(!fallback.is_empty(), "the MDS lists no fallback for the guest: {guest}");
}

#[test]
fn scenario_5_a_persisted_kernel_attach_comes_back_on_the_same_device_after_a_clean_restart() {
    let pool = Pool::start("persist", 2, "512M", 3000);
    pool.sanvol(&["volume", "create", "vol", "64M"]);
    let report = pool
        .scenario("agent_persist", include_str!("scenarios/agent_persist.sh"))
        .env("VOL_BYTES", 64u64 << 20)
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    eprintln!("agent_persist: whole run {:.1?}, console log {}", report.elapsed, report.console_log.display());
    report.assert_pass();
}
