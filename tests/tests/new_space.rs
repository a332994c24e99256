//! New space reads as zeros, with real processes: nbdkit devices,
//! sanvol-mds, sanvol-agent. A volume filled with a pattern is deleted; a
//! new volume and a grown one are given its space; both read zeros wherever
//! they were not written — through the agent, and on every leg read from
//! the devices directly at the offsets the extent map names.

use std::collections::HashSet;

use blockio::uri::NbdUri;
use blockio::BlockDevice;
use sanvol_tests::system::Stack;
use sanvol_tests::volumes::{block_pattern, connect, fill, BLOCK};

const MIB: u64 = 1 << 20;
/// Largest read the checks make (inside the default NBD payload bound).
const READ_BYTES: u64 = 4 * MIB;

/// Every (device, offset) leg of `volume`'s extents from extent `from` on.
fn legs(stack: &Stack, volume: &str, from: usize) -> Vec<(u64, u64)> {
    let detail = stack.sanvol_json(&["volume", "show", volume]);
    let extents = detail["description"]["extents"].as_array().unwrap().clone();
    extents[from..]
        .iter()
        .flat_map(|e| {
            e["legs"].as_array().unwrap().iter().map(|l| (l["device"].as_u64().unwrap(), l["offset"].as_u64().unwrap()))
        })
        .collect()
}

fn extent_bytes(stack: &Stack, volume: &str) -> u64 {
    stack.sanvol_json(&["volume", "show", volume])["description"]["extent_bytes"].as_u64().unwrap()
}

/// Panics unless `[offset, offset + len)` of `uri` reads as zeros; `what`
/// names it.
async fn assert_zeros(uri: &NbdUri, offset: u64, len: u64, what: &str) {
    let c = connect(uri).await;
    let mut at = offset;
    while at < offset + len {
        let n = READ_BYTES.min(offset + len - at);
        let data = c.read(at, n as u32).await.expect("read");
        if let Some(i) = data.iter().position(|&b| b != 0) {
            panic!("{what}: byte {} is {:#x}, not zero: a deleted volume's data shows through", at + i as u64, data[i]);
        }
        at += n;
    }
    c.disconnect().await;
}

/// Every leg of `volume` from extent `from` on, read on its device directly.
async fn assert_legs_zero(stack: &Stack, volume: &str, from: usize) {
    let uris = stack.device_uris();
    let extent = extent_bytes(stack, volume);
    for (device, offset) in legs(stack, volume, from) {
        let what = format!("volume {volume}, device {device} at offset {offset}");
        assert_zeros(&uris[device as usize], offset, extent, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_and_a_grown_volume_on_a_deleted_volumes_space_read_zeros() {
    let mut stack = Stack::new(3, "512M");
    stack.start_mds();
    let agent = stack.start_agent("host-a");
    stack.sanvol_ok(&["volume", "create", "old", "192M", "--mirror", "2"]);
    stack.sanvol_ok(&["volume", "create", "g", "64M", "--mirror", "2"]);
    let extent = extent_bytes(&stack, "old");
    assert!(extent <= 64 * MIB, "the test wants several extents per volume, got {extent}-byte extents");

    // A tenant's data on every leg of "old" (read back directly: it is there).
    let uri = agent.attach("old", "exclusive");
    fill(&uri, 1).await;
    agent.detach("old");
    let old_legs: HashSet<(u64, u64)> = legs(&stack, "old", 0).into_iter().collect();
    let uris = stack.device_uris();
    let (device, offset) = *old_legs.iter().next().unwrap();
    let c = connect(&uris[device as usize]).await;
    let raw = c.read(offset, BLOCK as u32).await.unwrap();
    assert!(raw.iter().any(|&b| b != 0), "the pattern is on the device before the delete");
    c.disconnect().await;
    let g_uri = agent.attach("g", "exclusive");
    fill(&g_uri, 2).await;
    stack.sanvol_ok(&["volume", "delete", "old"]);

    // A new volume and a grow (with its holder attached: recall path) take
    // the freed space.
    stack.sanvol_ok(&["volume", "create", "new", "64M", "--mirror", "2"]);
    let g_extents_before = (64 * MIB).div_ceil(extent) as usize;
    stack.sanvol_ok(&["volume", "grow", "g", "192M"]);
    let reused: Vec<(u64, u64)> = legs(&stack, "new", 0)
        .into_iter()
        .chain(legs(&stack, "g", g_extents_before))
        .filter(|l| old_legs.contains(l))
        .collect();
    assert!(!reused.is_empty(), "the new space must include the deleted volume's extents, or the test proves nothing");

    // Through the agent: zeros everywhere in "new", and in g past its old size.
    let new_uri = agent.attach("new", "exclusive");
    assert_zeros(&new_uri, 0, 64 * MIB, "volume new through the agent").await;
    assert_zeros(&g_uri, 64 * MIB, 128 * MIB, "grown volume g's new space through the agent").await;
    // g's old part is untouched by the grow.
    let c = connect(&g_uri).await;
    for b in [0, (64 * MIB) / BLOCK - 1] {
        assert_eq!(&c.read(b * BLOCK, BLOCK as u32).await.unwrap()[..], &block_pattern(2, b)[..], "g block {b}");
    }
    c.disconnect().await;
    // On the devices, every leg the maps name.
    assert_legs_zero(&stack, "new", 0).await;
    assert_legs_zero(&stack, "g", g_extents_before).await;
    agent.detach("new");
    agent.detach("g");
}
