//! Byte-range locks on a shared volume (issue 14) with real processes: two
//! agents attach one shared volume with disjoint `--lock` ranges and run
//! fio verify in them at the same time; an overlapping lock is refused
//! naming the holder, also after `sanvol-mds` is killed with SIGKILL and
//! restarted; a write by one agent into the other's locked range is
//! refused and leaves the device unchanged. Device contents are read from
//! the devices directly.

use std::process::{Output, Stdio};
use std::time::Duration;

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::system::{poll, Agent, Stack};
use sanvol_tests::volumes::{assert_fio_ok, fio_verify};

const MIB: u64 = 1 << 20;
/// Each agent's locked range: A holds `[0, RANGE)`, B `[RANGE, 2 * RANGE)`.
const RANGE: u64 = 8 * MIB;

fn list(agent: &Agent) -> serde_json::Value {
    let out = agent.cli(&["list", "--json"]);
    assert!(out.status.success(), "list: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("list --json")
}

/// The lock lines `list` shows for `volume` on `agent`.
fn locks_shown(agent: &Agent, volume: &str) -> Vec<String> {
    let l = list(agent);
    let v = l.as_array().unwrap().iter().find(|v| v["volume"] == volume).expect("attached");
    v["locks"].as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn attach_locked(agent: &Agent, volume: &str, lock: &str) -> Output {
    agent.cli(&["attach", volume, "--mode", "shared", "--lock", lock])
}

fn uri_of(out: &Output, agent: &Agent) -> NbdUri {
    assert!(
        out.status.success(),
        "attach failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.proc.log()
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("attach prints an NBD URI")
}

async fn connect(uri: &NbdUri) -> NbdClient {
    NbdClient::connect(uri, ClientOptions::default()).await.unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

/// `len` bytes of `volume` at `offset`, read from the devices directly
/// (first leg of each extent, as `sanvol volume show` describes them).
async fn read_direct(stack: &Stack, volume: &str, offset: u64, len: u64) -> Vec<u8> {
    let detail = stack.sanvol_json(&["volume", "show", volume]);
    let desc = &detail["description"];
    let extent_bytes = desc["extent_bytes"].as_u64().unwrap();
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let index = at / extent_bytes;
        let within = at % extent_bytes;
        let piece = (extent_bytes - within).min(offset + len - at).min(4 * MIB);
        let leg = &desc["extents"][index as usize]["legs"][0];
        let dev = leg["device"].as_u64().unwrap();
        let d = desc["devices"].as_array().unwrap().iter().find(|d| d["index"].as_u64() == Some(dev)).unwrap();
        let uri: NbdUri = d["uri"].as_str().unwrap().parse().unwrap();
        let c = connect(&uri).await;
        let data = c.read(leg["offset"].as_u64().unwrap() + within, piece as u32).await.expect("read the device");
        c.disconnect().await;
        out.extend_from_slice(&data);
        at += piece;
    }
    out
}

/// `len` bytes at `offset` through an agent's export.
async fn read_export(uri: &NbdUri, offset: u64, len: u64) -> Vec<u8> {
    let c = connect(uri).await;
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let piece = (offset + len - at).min(4 * MIB);
        out.extend_from_slice(&c.read(at, piece as u32).await.expect("read the export"));
        at += piece;
    }
    c.disconnect().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disjoint_locked_ranges_verify_and_conflicts_and_foreign_writes_are_refused_across_a_restart() {
    let mut stack = Stack::new(2, "256M");
    stack.lease_ms = 1500;
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "shared", "32M"]);
    let mut a = stack.start_agent("host-a");
    let b = stack.start_agent("host-b");
    let c = stack.start_agent("host-c");
    let uri_a = uri_of(&attach_locked(&a, "shared", &format!("0+{}M", RANGE / MIB)), &a);
    let uri_b = uri_of(&attach_locked(&b, "shared", &format!("{}M+{}M", RANGE / MIB, RANGE / MIB)), &b);
    // A learns B's lock from the server's event: `list` shows it.
    poll("agent A to learn B's lock", Duration::from_secs(10), || {
        locks_shown(&a, "shared").iter().any(|l| l.contains("host-b")).then_some(())
    });
    assert!(
        locks_shown(&b, "shared").iter().any(|l| l.contains("host-b") && l.contains("(this handle)")),
        "{:?}",
        locks_shown(&b, "shared")
    );

    // (1) fio verify in each range at the same time.
    let size = format!("{}M", RANGE / MIB);
    let spawn =
        |mut cmd: std::process::Command| cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start fio");
    let fio_a = spawn(fio_verify(&uri_a, &size, &["--offset=0"]));
    let fio_b = spawn(fio_verify(&uri_b, &size, &[&format!("--offset={RANGE}")]));
    assert_fio_ok(fio_a.wait_with_output().unwrap());
    assert_fio_ok(fio_b.wait_with_output().unwrap());
    for (name, uri, offset) in [("A", &uri_a, 0), ("B", &uri_b, RANGE)] {
        let seen = read_export(uri, offset, RANGE).await;
        assert!(seen.iter().any(|&x| x != 0), "agent {name}'s range holds nothing");
        let direct = read_direct(&stack, "shared", offset, RANGE).await;
        assert!(direct == seen, "agent {name}'s range on the devices differs from what it wrote");
    }

    // (2) An overlapping lock is refused, naming the holder.
    let refused = attach_locked(&c, "shared", &format!("{}M+2M", RANGE / MIB - 1));
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && err.contains("host-a"), "expected a refusal naming host-a: {err}");
    assert!(list(&c).as_array().unwrap().is_empty(), "a refused attach leaves nothing attached");

    // (3) A write by A into B's range is refused; the device is unchanged there.
    let before = read_direct(&stack, "shared", RANGE, 4096).await;
    let client = connect(&uri_a).await;
    let write = client.write(RANGE, Bytes::from(vec![0xAB; 4096]), true).await;
    assert!(write.is_err(), "agent A wrote into B's locked range");
    client.write(0, Bytes::from(vec![0xCD; 4096]), true).await.expect("A writes its own range");
    client.disconnect().await;
    assert_eq!(read_direct(&stack, "shared", RANGE, 4096).await, before, "B's range changed");
    assert!(a.proc.log().contains("locked by agent host-b"), "the refusal is logged:\n{}", a.proc.log());

    // (4) After kill -9 and a restart of the server the locks still hold.
    stack.kill_mds();
    stack.start_mds();
    let err = poll("the server to answer C's overlapping attach", Duration::from_secs(30), || {
        let out = attach_locked(&c, "shared", &format!("{}M+4K", RANGE / MIB));
        assert!(!out.status.success(), "an overlapping lock was granted after the restart");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.contains("locked by").then_some(err)
    });
    assert!(err.contains("host-b"), "{err}");
    // A range nobody holds is granted to C.
    uri_of(&attach_locked(&c, "shared", &format!("{}M+1M", 2 * RANGE / MIB)), &c);

    // (5) A new run of agent A (kill -9, restart) takes its handle back and
    // is told the table with it: it refuses B's range at once.
    a.proc.kill();
    let a = stack.restart_agent("host-a");
    poll("agent A to take the volume back with the lock table", Duration::from_secs(30), || {
        let l = list(&a);
        let back = l.as_array().unwrap().iter().any(|v| v["volume"] == "shared" && v["state"] == "open");
        (back && locks_shown(&a, "shared").iter().any(|l| l.contains("host-b"))).then_some(())
    });
    let client = connect(&uri_a).await;
    assert!(client.write(RANGE, Bytes::from(vec![0xEF; 4096]), true).await.is_err(), "the new run wrote into B's lock");
    client.disconnect().await;
    assert_eq!(read_direct(&stack, "shared", RANGE, 4096).await, before, "B's range changed");
}
