//! Checks on volumes seen from outside sanvol: a recognisable pattern
//! written through an agent's export, then read back from the devices
//! themselves at the offsets the extent map gives (bypassing sanvol), and
//! fio's crc32c-verifying workload through an export.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Output};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;

use crate::peers::require_tool;
use crate::system::Stack;

/// Granularity of the pattern.
pub const BLOCK: u64 = 4096;

/// Block `b` of a volume tagged `tag`: the u64 `tag << 48 | b`, repeated.
pub fn block_pattern(tag: u64, b: u64) -> Vec<u8> {
    let word = (tag << 48 | b).to_le_bytes();
    word.iter().copied().cycle().take(BLOCK as usize).collect()
}

pub async fn connect(uri: &NbdUri) -> NbdClient {
    NbdClient::connect(uri, ClientOptions::default()).await.unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

/// Fills the whole volume behind `uri` with `block_pattern(tag, ..)`;
/// returns its size.
pub async fn fill(uri: &NbdUri, tag: u64) -> u64 {
    let c = connect(uri).await;
    let size = c.info().size;
    let chunk = 1u64 << 20;
    let mut offset = 0;
    while offset < size {
        let end = (offset + chunk).min(size);
        let buf: Vec<u8> = (offset / BLOCK..end / BLOCK).flat_map(|b| block_pattern(tag, b)).collect();
        c.write(offset, Bytes::from(buf), false).await.expect("write through the agent");
        offset = end;
    }
    c.flush().await.expect("flush through the agent");
    c.disconnect().await;
    size
}

/// Checks every block of `volume` by reading the devices directly, at the
/// offsets `sanvol volume show --json` gives, on every leg (except legs on
/// `skip_device`, e.g. one the test killed). Legs of one extent must sit on
/// distinct devices.
pub async fn check_placement(stack: &Stack, volume: &str, tag: u64, skip_device: Option<u64>) {
    let detail = stack.sanvol_json(&["volume", "show", volume]);
    let desc = &detail["description"];
    let extent_bytes = desc["extent_bytes"].as_u64().unwrap();
    let size_bytes = desc["size_bytes"].as_u64().unwrap();
    let legs_expected = desc["mirror_legs"].as_u64().unwrap() as usize;
    let mut devices = HashMap::new();
    for d in desc["devices"].as_array().unwrap() {
        let index = d["index"].as_u64().unwrap();
        if Some(index) != skip_device {
            let uri: NbdUri = d["uri"].as_str().unwrap().parse().unwrap();
            devices.insert(index, connect(&uri).await);
        }
    }
    for (e, extent) in desc["extents"].as_array().unwrap().iter().enumerate() {
        let legs = extent["legs"].as_array().unwrap();
        assert_eq!(legs.len(), legs_expected, "extent {e} of {volume}");
        let mut seen = HashSet::new();
        for leg in legs {
            let dev = leg["device"].as_u64().unwrap();
            assert!(seen.insert(dev), "extent {e} of {volume} has two legs on device {dev}");
            let Some(client) = devices.get(&dev) else { continue };
            let offset = leg["offset"].as_u64().unwrap();
            let data = client.read(offset, extent_bytes as u32).await.expect("read the device directly");
            for i in 0..extent_bytes / BLOCK {
                let b = e as u64 * extent_bytes / BLOCK + i;
                if b * BLOCK >= size_bytes {
                    break;
                }
                assert!(
                    data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize] == block_pattern(tag, b)[..],
                    "volume {volume} block {b} is not at device {dev} offset {} as the extent map says",
                    offset + i * BLOCK
                );
            }
        }
    }
    for c in devices.values() {
        c.disconnect().await;
    }
}

/// fio random 4k writes through `uri`, each block verified by crc32c.
pub fn fio_verify(uri: &NbdUri, size: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(require_tool("fio"));
    cmd.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={size}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randrepeat=0",
    ])
    .args(extra);
    cmd
}

/// Panics with fio's output unless it finished with no error.
pub fn assert_fio_ok(out: Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("err= 0"),
        "fio failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
