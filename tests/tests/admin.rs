//! The admin reconfiguration commands with real processes: nbdkit devices,
//! sanvol-mds, sanvol-agent, fio verifying every block it writes through
//! the agent while each command runs, and the devices read back directly
//! afterwards at the offsets the extent map names.
//!
//! - every command (`device add|evacuate|remove|replace`, `volume mirror
//!   add|remove`, `volume move`) on a mirrored volume held by an agent under
//!   fio, and on a plain volume nobody holds: the map afterwards is as asked
//!   and every leg holds the volume's data;
//! - `device remove` refused while the device holds data or a metadata copy;
//! - progress as JSON lines, and in `volume show`, `pool status` and
//!   `device list` while a (slowed) move runs;
//! - a failed device replaced under fio: its mirror legs rebuilt from the
//!   surviving legs, the volume whole again;
//! - `kill -9` of the server in the middle of a move: the old map stays in
//!   force, and the agent's writes go on and verify.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use blockio::uri::NbdUri;
use blockio::BlockDevice;
use sanvol_tests::peers::{nbdkit, Peer};
use sanvol_tests::system::{Agent, Stack};
use sanvol_tests::volumes::{check_placement, connect, fill, fio_verify};
use serde_json::Value;

/// Longest wait for a state the server reports (an external process: there
/// is no signal to await, so its listing is polled).
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
const READ_BYTES: u64 = 4 << 20;

/// fio writing (and at its end verifying) the volume behind `uri`.
struct Fio {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Fio {
    /// Starts fio and waits until it is connected to the export.
    fn start(uri: &NbdUri, size: &str, loops: u32) -> Fio {
        let mut child = fio_verify(uri, size, &[&format!("--loops={loops}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fio");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = lines.by_ref().map_while(Result::ok).any(|l| l.contains("connected to NBD server"));
        assert!(started, "fio did not connect to {uri}");
        Fio { child, lines }
    }

    /// Whether fio is still writing (so the command ran under it).
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for fio's end; panics with its output unless its verify is clean.
    fn finish(mut self, what: &str, stack: &Stack, agent: &Agent) {
        let rest: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
        let status = self.child.wait().unwrap();
        let out = rest.join("\n");
        assert!(
            status.success() && out.contains("err= 0"),
            "fio across {what} failed:\n{out}\nagent log:\n{}\nserver log:\n{}",
            agent.proc.log(),
            stack.mds_log()
        );
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `sanvol ARGS` while fio writes through `uri`; the command must
/// succeed and fio still be writing when it returns (else the test proves
/// nothing), and fio's verify must be clean.
fn under_fio(stack: &Stack, agent: &Agent, uri: &NbdUri, args: &[&str]) -> String {
    let mut fio = Fio::start(uri, "192M", 2);
    let out = stack.sanvol_ok(args);
    assert!(fio.running(), "fio finished before `sanvol {args:?}` did: the test proves nothing; make the job bigger");
    fio.finish(&format!("sanvol {args:?}"), stack, agent);
    out
}

/// The legs of every extent of `volume` (live map): (device, offset) each.
fn legs_of(stack: &Stack, volume: &str) -> Vec<Vec<(u64, u64)>> {
    legs_in(&stack.sanvol_json(&["volume", "show", volume])["description"]["extents"])
}

/// The legs of each extent of an `extents` list as `volume show --json` prints it.
fn legs_in(extents: &Value) -> Vec<Vec<(u64, u64)>> {
    extents
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["legs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["device"].as_u64().unwrap(), l["offset"].as_u64().unwrap()))
                .collect()
        })
        .collect()
}

fn devices_of(legs: &[Vec<(u64, u64)>]) -> BTreeSet<u64> {
    legs.iter().flatten().map(|(d, _)| *d).collect()
}

/// The device list as `--json` gives it.
fn device_list(stack: &Stack) -> Vec<Value> {
    stack.sanvol_json(&["device", "list"]).as_array().unwrap().clone()
}

/// Every leg of every extent of `volume`, read from its device directly,
/// equals what the agent's export reads there (fio's data, whatever it is):
/// the map is where the data is, and mirror legs are identical.
async fn legs_hold_the_volume(stack: &Stack, export: &NbdUri, volume: &str) {
    let show = stack.sanvol_json(&["volume", "show", volume]);
    let desc = &show["description"];
    let extent_bytes = desc["extent_bytes"].as_u64().unwrap();
    let size_bytes = desc["size_bytes"].as_u64().unwrap();
    let mut uris = std::collections::HashMap::new();
    for d in desc["devices"].as_array().unwrap() {
        uris.insert(d["index"].as_u64().unwrap(), d["uri"].as_str().unwrap().parse::<NbdUri>().unwrap());
    }
    let through = connect(export).await;
    for (e, legs) in legs_of(stack, volume).iter().enumerate() {
        let start = e as u64 * extent_bytes;
        let len = extent_bytes.min(size_bytes - start);
        for &(device, offset) in legs {
            let direct = connect(&uris[&device]).await;
            let mut at = 0;
            while at < len {
                let n = READ_BYTES.min(len - at) as u32;
                let want = through.read(start + at, n).await.expect("read through the agent");
                let got = direct.read(offset + at, n).await.expect("read the device directly");
                if want != got {
                    let i = want.iter().zip(got.iter()).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "volume {volume} extent {e}: device {device} offset {} differs from the volume at byte {}",
                        offset + at + i as u64,
                        start + at + i as u64
                    );
                }
                at += u64::from(n);
            }
            direct.disconnect().await;
        }
    }
    through.disconnect().await;
}

/// An nbdkit memory device outside the pool, and its URI as the pool would
/// record it.
fn spare(args: &[&str]) -> (Peer, String) {
    let peer = nbdkit(args);
    let uri = peer.uri().to_string();
    (peer, uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_command_under_fio_leaves_the_map_as_asked_and_the_data_intact() {
    let mut stack = Stack::new(4, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "192M", "--mirror", "2"]);
    stack.sanvol_ok(&["volume", "create", "p", "256M"]);
    let agent = stack.start_agent("host-a");
    // The plain volume: a known pattern, then nobody holds it (its moves
    // take the path without a recall).
    let p_uri = agent.attach("p", "exclusive");
    fill(&p_uri, 0x70).await;
    agent.detach("p");
    let uri = agent.attach("m", "exclusive");

    // device add: labelled by the server, its space free at once.
    let (_dev4, dev4_uri) = spare(&["memory", "1G"]);
    stack.sanvol_ok(&["device", "add", &dev4_uri]);
    let list = device_list(&stack);
    let added = list.iter().find(|d| d["uri"] == dev4_uri.as_str()).expect("the new device is listed");
    assert_eq!(added["index"], 4);
    assert_eq!(added["state"], "online");
    assert_eq!(added["extents_free"], added["extents_total"]);
    let out = stack.sanvol(&["device", "add", &dev4_uri]);
    assert!(!out.status.success(), "the same device twice");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"), "{}", String::from_utf8_lossy(&out.stderr));

    // volume move --from X --to dev4.
    let before = legs_of(&stack, "m");
    let from = before[0][0].0;
    under_fio(&stack, &agent, &uri, &["volume", "move", "m", "--from", &format!("dev{from}"), "--to", "dev4"]);
    let after = legs_of(&stack, "m");
    for (old, new) in before.iter().zip(&after) {
        for (o, n) in old.iter().zip(new) {
            if o.0 == from {
                assert_eq!(n.0, 4, "a leg on device {from} went to device 4: {old:?} -> {new:?}");
            } else {
                assert_eq!(o, n, "legs elsewhere stay put");
            }
        }
    }
    assert!(!devices_of(&after).contains(&from));
    legs_hold_the_volume(&stack, &uri, "m").await;

    // volume mirror add: three legs on distinct devices.
    under_fio(&stack, &agent, &uri, &["volume", "mirror", "add", "m"]);
    let after = legs_of(&stack, "m");
    for legs in &after {
        assert_eq!(legs.len(), 3);
        assert_eq!(legs.iter().map(|l| l.0).collect::<BTreeSet<_>>().len(), 3, "{legs:?}");
    }
    assert_eq!(stack.sanvol_json(&["volume", "show", "m"])["info"]["legs"], 3);
    legs_hold_the_volume(&stack, &uri, "m").await;

    // volume mirror remove --device dev4: two legs, none on device 4.
    under_fio(&stack, &agent, &uri, &["volume", "mirror", "remove", "m", "--device", "dev4"]);
    let after = legs_of(&stack, "m");
    assert!(after.iter().all(|legs| legs.len() == 2 && legs.iter().all(|l| l.0 != 4)), "{after:?}");
    legs_hold_the_volume(&stack, &uri, "m").await;

    // device remove: refused while the device holds data, and for a
    // device with a metadata copy.
    let list = device_list(&stack);
    assert_ne!(list[3]["extents_free"], list[3]["extents_total"], "device 3 holds data (allocations spread)");
    let out = stack.sanvol(&["device", "remove", "dev3"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "removing a device that holds data must be refused");
    assert!(err.contains("still holds") && err.contains("evacuate"), "the refusal says why and what to do: {err}");
    let out = stack.sanvol(&["device", "remove", "dev0"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("metadata"), "dev0 holds a metadata copy: {err}");

    // device evacuate dev3 (with --json progress lines), then remove it.
    let mut fio = Fio::start(&uri, "192M", 2);
    let json = stack.sanvol_ok(&["device", "evacuate", "dev3", "--json"]);
    assert!(fio.running(), "fio finished before the evacuation: make the job bigger");
    fio.finish("device evacuate", &stack, &agent);
    let last: Value = serde_json::from_str(json.lines().last().unwrap()).expect("--json prints JSON lines");
    assert_eq!(last["result"], "done", "{json}");
    for line in json.lines() {
        let v: Value = serde_json::from_str(line).expect("every line is JSON");
        assert!(v.get("progress").is_some() || v.get("result").is_some(), "{line}");
    }
    let list = device_list(&stack);
    assert_eq!(list[3]["extents_free"], list[3]["extents_total"], "device 3 holds nothing after the evacuation");
    assert!(!devices_of(&legs_of(&stack, "m")).contains(&3));
    assert!(!devices_of(&legs_of(&stack, "p")).contains(&3));
    legs_hold_the_volume(&stack, &uri, "m").await;
    check_placement(&stack, "p", 0x70, None).await;
    stack.sanvol_ok(&["device", "remove", "dev3"]);
    assert!(device_list(&stack).iter().all(|d| d["index"] != 3), "device 3 is gone from the list");

    // device replace dev4: everything on dev4 lands on the new device,
    // dev4 is removed. (Progress while a move runs is checked on a slowed
    // device in the next test: here the new device joins the volume, and
    // a slowed one would slow every later write.)
    let on4 = legs_of(&stack, "m").iter().flatten().filter(|l| l.0 == 4).count()
        + legs_of(&stack, "p").iter().flatten().filter(|l| l.0 == 4).count();
    if on4 == 0 {
        // Give dev4 something to replace.
        under_fio(&stack, &agent, &uri, &["volume", "move", "m", "--from", "dev1", "--to", "dev4"]);
    }
    let (_dev5, dev5_uri) = spare(&["memory", "1G"]);
    under_fio(&stack, &agent, &uri, &["device", "replace", "dev4", &dev5_uri]);
    let list = device_list(&stack);
    assert!(list.iter().all(|d| d["index"] != 4), "the replaced device is removed");
    let new = list.iter().find(|d| d["uri"] == dev5_uri.as_str()).expect("the new device is in the pool");
    let new_index = new["index"].as_u64().unwrap();
    let m_devices = devices_of(&legs_of(&stack, "m"));
    let p_devices = devices_of(&legs_of(&stack, "p"));
    assert!(!m_devices.contains(&4) && !p_devices.contains(&4));
    assert!(m_devices.contains(&new_index) || p_devices.contains(&new_index), "what was on dev4 is on the new one");
    legs_hold_the_volume(&stack, &uri, "m").await;
    check_placement(&stack, "p", 0x70, None).await;
    // The copies' rates, as the server logged them.
    for line in stack.mds_log().lines().filter(|l| l.contains("extents resynchronized")) {
        eprintln!("{line}");
    }
    assert!(stack.sanvol_json(&["volume", "list"]).as_array().unwrap().iter().all(|v| v["health"] == ""));
    agent.detach("m");
}

/// A mirrored volume's move copies online: its holder's writes go on while
/// the extents are copied, and what it writes to a region after that region
/// was copied reaches the new legs too (copied again at the recall point,
/// the server's `precopy`). The online copy, once it has copied everything,
/// waits (fault point `mds-after-copy-job:sleep`) before it reports: the
/// test writes in that window, so without the second pass the new legs
/// would miss those writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_copies_online_and_what_the_holder_writes_meanwhile_reaches_the_new_legs() {
    let mut stack = Stack::new(3, "1G");
    stack.mds_env.push(("SANVOL_FAULT".into(), "mds-after-copy-job:sleep=8000@1".into()));
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "64M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("m", "exclusive");
    // The volume in use: the agent's first I/O shows the server it keeps
    // the write-intent log (it asks for its resync first).
    let c = connect(&uri).await;
    c.read(0, 4096).await.expect("a first read");
    let before = legs_of(&stack, "m");
    let from = before[0][0].0;
    let mut mv = stack
        .sanvol_command(&["volume", "move", "m", "--from", &format!("dev{from}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sanvol volume move");
    sanvol_tests::system::poll("the online copy to have copied everything", STATE_TIMEOUT, || {
        stack.mds_log().contains("SANVOL_FAULT: reached mds-after-copy-job").then_some(())
    });
    let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap_or("").to_string();
    assert!(health.contains("moving") && health.contains("online"), "volume show says it copies online: {health:?}");
    let status = stack.sanvol_ok(&["pool", "status"]);
    assert!(status.contains("copying volume m online"), "pool status shows the online copy: {status}");
    // The holder was told too (`sanvol-agent list`): pushed by the server
    // when the copy started and every second while it runs.
    let listed = String::from_utf8_lossy(&agent.cli(&["list"]).stdout).to_string();
    assert!(
        listed.contains("recovery volume m: move its extents off device") && listed.contains("copying online"),
        "the agent shows the server's copy: {listed}"
    );
    // The holder writes every extent now, after its regions were copied:
    // the writes complete while the move is still in its online pass.
    let extent_bytes = stack.sanvol_json(&["volume", "show", "m"])["description"]["extent_bytes"].as_u64().unwrap();
    for e in 0..before.len() as u64 {
        let data = bytes::Bytes::from(vec![0x40 + e as u8; 256 << 10]);
        c.write(e * extent_bytes + 4096, data, false).await.expect("a write during the online copy");
    }
    c.flush().await.expect("flush");
    assert!(
        mv.try_wait().unwrap().is_none(),
        "the move ended before the writes did: the holder's I/O was not shown to go on during the copy"
    );
    let out = mv.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the move failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.mds_log()
    );
    let after = legs_of(&stack, "m");
    assert!(!devices_of(&after).contains(&from), "no leg left on device {from}: {after:?}");
    // The news that the copy is over reaches the agent on its own
    // connection, not with the CLI's answer: polled.
    sanvol_tests::system::poll("the agent to be told the copy is over", STATE_TIMEOUT, || {
        (!String::from_utf8_lossy(&agent.cli(&["list"]).stdout).contains("recovery")).then_some(())
    });
    for e in 0..before.len() as u64 {
        let got = c.read(e * extent_bytes + 4096, 256 << 10).await.unwrap();
        assert!(got.iter().all(|b| *b == 0x40 + e as u8), "extent {e} reads back what was written through the agent");
    }
    c.disconnect().await;
    // Every leg, read from its device directly, holds what the volume reads.
    legs_hold_the_volume(&stack, &uri, "m").await;
    let log = stack.mds_log();
    assert!(log.contains("copying online while the holders write"), "the server says it copied online");
    agent.detach("m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_in_the_middle_of_a_move_leaves_the_old_map_in_force() {
    // One nbdkit thread per device: nbdkit 1.32 aborts ("raw_send_socket:
    // Assertion `sock >= 0' failed") when a client dies while other threads
    // still send it replies — which is what killing the server mid-copy does
    // (seen in 2 of 3 runs with the default threads).
    let mut stack = Stack::with_devices((0..3).map(|_| nbdkit(&["-t", "1", "memory", "1G"])).collect());
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "192M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("m", "exclusive");
    // A slow target: the copy takes seconds.
    let (_slow, slow_uri) = spare(&["-t", "1", "--filter=delay", "memory", "1G", "delay-write=200ms"]);
    stack.sanvol_ok(&["device", "add", &slow_uri]);
    let before = legs_of(&stack, "m");
    let from = before[0][0].0;

    let fio = Fio::start(&uri, "192M", 3);
    let mut mv = stack
        .sanvol_command(&["volume", "move", "m", "--from", &format!("dev{from}"), "--to", "dev3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap_or("").to_string();
        if health.contains("moving") && health.contains("copied") {
            let status = stack.sanvol_ok(&["pool", "status"]);
            assert!(status.contains("reconfiguring: volume m"), "`pool status` shows the move: {status}");
            let devices = device_list(&stack);
            let target = devices.iter().find(|d| d["index"] == 3).unwrap()["recovery"].as_str().unwrap().to_string();
            assert!(target.contains("extents moved"), "`device list` shows it on the target: {target:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the move never started copying: {health:?}\n{}", stack.mds_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mid-copy: the server dies.
    stack.kill_mds();
    let _ = mv.wait();
    std::thread::sleep(Duration::from_millis(500));
    let gone: Vec<String> = stack
        .devices
        .iter()
        .chain([&_slow])
        .filter(|d| !std::path::Path::new(&format!("/proc/{}", d.pid())).exists() || zombie(d.pid()))
        .map(|d| format!("{} (pid {}): {}", d.uri(), d.pid(), d.stderr()))
        .collect();
    assert!(gone.is_empty(), "a device server died with the metadata server: {gone:?}\n{}", stack.all_logs(30));
    stack.start_mds();
    // The old map is in force: nothing on the target, every leg where it was.
    let deadline = Instant::now() + STATE_TIMEOUT;
    let after = loop {
        let out = stack.sanvol(&["volume", "show", "m", "--json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            break v["description"]["extents"].clone();
        }
        assert!(Instant::now() < deadline, "the restarted server does not answer\n{}", stack.mds_log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let after = legs_in(&after);
    assert_eq!(after, before, "the map after a crash mid-move is the old one");
    // The agent resumes and fio's writes, across the crash, verify.
    fio.finish("a server crash in the middle of a move", &stack, &agent);
    legs_hold_the_volume(&stack, &uri, "m").await;
    // The same command again completes.
    stack.sanvol_ok(&["volume", "move", "m", "--from", &format!("dev{from}"), "--to", "dev3"]);
    assert!(!devices_of(&legs_of(&stack, "m")).contains(&from));
    legs_hold_the_volume(&stack, &uri, "m").await;
    agent.detach("m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_device_is_replaced_under_fio_and_the_mirror_is_whole_again() {
    let mut stack = Stack::new(4, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "256M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("m", "exclusive");
    assert!(devices_of(&legs_of(&stack, "m")).contains(&3), "m has legs on device 3 (allocations spread)");
    // Device 3 (no metadata copy) dies under writes; the server marks it failed.
    let mut fio = Fio::start(&uri, "256M", 2);
    stack.devices[3].kill();
    let deadline = Instant::now() + STATE_TIMEOUT;
    while !device_list(&stack)[3]["state"].as_str().unwrap().starts_with("failed") {
        assert!(Instant::now() < deadline, "device 3 not marked failed\n{}", stack.mds_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap().to_string();
    assert!(health.contains("degraded"), "{health:?}");
    // Replaced by a new device: its legs rebuilt there from the survivors.
    let (_new, new_uri) = spare(&["memory", "1G"]);
    stack.sanvol_ok(&["device", "replace", "dev3", &new_uri]);
    assert!(fio.running(), "fio finished before the replace did: make the job bigger");
    fio.finish("the replace of a failed device", &stack, &agent);
    let list = device_list(&stack);
    assert!(list.iter().all(|d| d["index"] != 3), "the failed device is removed");
    let new_index = list.iter().find(|d| d["uri"] == new_uri.as_str()).unwrap()["index"].as_u64().unwrap();
    let legs = legs_of(&stack, "m");
    assert!(devices_of(&legs).contains(&new_index) && !devices_of(&legs).contains(&3), "{legs:?}");
    let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap().to_string();
    assert!(health.is_empty(), "the mirror is whole again: {health:?}");
    legs_hold_the_volume(&stack, &uri, "m").await;
    for line in stack.mds_log().lines().filter(|l| l.contains("extents resynchronized")) {
        eprintln!("{line}");
    }
    agent.detach("m");
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_none_or(|c| c == 'Z')
}

/// A device gone for good under writes, with `device_replace_after_ms`: the
/// server rebuilds its mirror legs on the other devices by itself (no
/// admin command) while fio writes, and the volume is whole again with every
/// leg holding its data, read from the devices directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gone_for_good_is_replaced_automatically_under_fio() {
    let mut stack = Stack::new(4, "1G");
    stack.mds_config_extra = vec!["device_replace_after_ms = 2000".into()];
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "256M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("m", "exclusive");
    assert!(devices_of(&legs_of(&stack, "m")).contains(&3), "m has legs on device 3 (allocations spread)");
    let mut fio = Fio::start(&uri, "256M", 3);
    stack.devices[3].kill();
    let deadline = Instant::now() + STATE_TIMEOUT;
    while !stack.mds_log().contains("for longer than device_replace_after_ms") {
        assert!(Instant::now() < deadline, "no automatic replacement started\n{}", stack.mds_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fio.running(), "fio finished before the replacement started: make the job bigger");
    loop {
        let legs = legs_of(&stack, "m");
        let health = stack.sanvol_json(&["volume", "show", "m"])["info"]["health"].as_str().unwrap().to_string();
        if !devices_of(&legs).contains(&3) && health.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "m not whole again: legs {legs:?}, health {health:?}\n{}", stack.mds_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    fio.finish("the automatic replacement of a failed device", &stack, &agent);
    assert!(
        stack.mds_log().lines().any(|l| l.contains("reconfiguration done") && l.contains("automatically")),
        "{}",
        stack.mds_log()
    );
    let legs = legs_of(&stack, "m");
    assert!(legs.iter().all(|l| l.len() == 2), "every extent has two legs again: {legs:?}");
    legs_hold_the_volume(&stack, &uri, "m").await;
    agent.detach("m");
}
