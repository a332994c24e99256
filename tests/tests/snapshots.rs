//! Snapshots end to end with real processes: nbdkit devices, sanvol-mds,
//! sanvol-agent, the backup pseudo-device, sanvol-backup and standard NBD
//! tools.
//!
//! The contents a snapshot must show are taken while the volume is quiet
//! (nothing writes between the read and `snapshot create`); then writers
//! run (fio, or our own writes at known blocks) and every check reads the
//! snapshot back and compares bytes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::{BlockDevice, MetaContext};
use bytes::Bytes;
use control_client::{channel, ControlAddr};
use sanvol_tests::peers::{self, require_tool};
use sanvol_tests::proxy::CuttableProxy;
use sanvol_tests::system::{bin, pub_path, run_ok, Agent, Stack};
use sanvol_tests::volumes::{assert_fio_ok, block_pattern, connect, fill, fio_verify, BLOCK};
use volume_format::control::auth::Role;
use volume_format::control::messages::{changed_context_name, CHANGED_FLAG};

const VOLUME_BYTES: u64 = 32 << 20;
const CHUNK: u64 = 64 << 10;

fn stack() -> Stack {
    let mut stack = Stack::new(3, "1G");
    stack.lease_ms = 1000;
    stack.durable_ms = Some(1000);
    stack.mds_config_extra.push(format!("backup_socket = {:?}", backup_socket(&stack).display().to_string()));
    stack.start_mds();
    stack
}

/// Where the server serves the pseudo-device as plain NBD to local tools.
fn backup_socket(stack: &Stack) -> PathBuf {
    stack.dir.path().join("backup.sock")
}

async fn read_all(c: &NbdClient) -> Vec<u8> {
    let size = c.info().size;
    let mut out = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(1 << 20);
        out.extend_from_slice(&c.read(offset, n as u32).await.expect("read"));
        offset += n;
    }
    out
}

async fn read_uri(uri: &NbdUri) -> Vec<u8> {
    let c = connect(uri).await;
    let data = read_all(&c).await;
    c.disconnect().await;
    data
}

/// Opens the backup pseudo-device export `export` as the admin.
async fn pseudo_device(stack: &Stack, export: &str, contexts: &[String]) -> NbdClient {
    let key = control_client::keys::load_private(&stack.admin_key).unwrap();
    let (pinned, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    let addr: ControlAddr = stack.mds_addr().parse().unwrap();
    let stream = channel::open_backup(&addr, &key, Some(&pinned), Role::Admin, "test").await.unwrap();
    let mut opts = ClientOptions::default();
    opts.meta_contexts.extend(contexts.iter().cloned());
    NbdClient::connect_stream(stream, export, opts).await.unwrap_or_else(|e| panic!("open {export}: {e}"))
}

async fn read_snapshot(stack: &Stack, export: &str) -> Vec<u8> {
    let c = pseudo_device(stack, export, &[]).await;
    let data = read_all(&c).await;
    c.disconnect().await;
    data
}

/// Chunks flagged by `sanvol:changed-since:OLD` on `export`.
async fn changed_chunks(stack: &Stack, export: &str, old: &str) -> Vec<u64> {
    let context = changed_context_name(old);
    let c = pseudo_device(stack, export, std::slice::from_ref(&context)).await;
    let size = c.info().size;
    let mut changed = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(16 << 20) as u32;
        let extents = c.block_status(&MetaContext::Custom(context.clone()), offset, len).await.expect("block status");
        assert!(!extents.is_empty());
        for e in extents {
            assert_eq!(offset % CHUNK, 0, "extents start at chunk boundaries");
            if e.flags & CHANGED_FLAG != 0 {
                changed.extend(offset / CHUNK..(offset + e.length).div_ceil(CHUNK));
            }
            offset += e.length;
        }
    }
    c.disconnect().await;
    changed
}

/// Writes `block_pattern(tag, b)` at each block `b` through `uri`.
async fn write_blocks(uri: &NbdUri, tag: u64, blocks: &[u64]) {
    let c = connect(uri).await;
    for &b in blocks {
        c.write(b * BLOCK, Bytes::from(block_pattern(tag, b)), false).await.expect("write");
    }
    c.flush().await.unwrap();
    c.disconnect().await;
}

fn chunks_of(blocks: &[u64]) -> Vec<u64> {
    let mut c: Vec<u64> = blocks.iter().map(|b| b * BLOCK / CHUNK).collect();
    c.sort_unstable();
    c.dedup();
    c
}

fn backup(stack: &Stack, args: &[&str]) -> String {
    run_ok(
        Command::new(bin("sanvol-backup"))
            .env("SANVOL_MDS", stack.mds_addr())
            .env("SANVOL_KEY", &stack.admin_key)
            .env("SANVOL_SERVER_KEY", pub_path(&stack.mds_key))
            .args(args),
    )
}

fn first_mismatch(a: &[u8], b: &[u8]) -> Option<u64> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()) as u64);
    }
    a.chunks(BLOCK as usize).zip(b.chunks(BLOCK as usize)).position(|(x, y)| x != y).map(|p| p as u64 * BLOCK)
}

#[track_caller]
fn assert_same(what: &str, got: &[u8], expected: &[u8]) {
    if let Some(at) = first_mismatch(got, expected) {
        panic!("{what}: differs at byte {at} (lengths {} and {})", got.len(), expected.len());
    }
}

fn attach(agent: &Agent, volume: &str) -> NbdUri {
    agent.attach(volume, "exclusive")
}

/// Volume `v` (32 MiB, `create_args` added) attached exclusively by agent
/// host-a and filled; returns the agent, the export and the volume's bytes.
async fn filled_volume(stack: &Stack, create_args: &[&str]) -> (Agent, NbdUri, Vec<u8>) {
    let mut args = vec!["volume", "create", "v", "32M"];
    args.extend_from_slice(create_args);
    stack.sanvol_ok(&args);
    let agent = stack.start_agent("host-a");
    let uri = attach(&agent, "v");
    fill(&uri, 1).await;
    let image = read_uri(&uri).await;
    (agent, uri, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_keeps_its_image_while_fio_writes_and_backups_restore_it() {
    let stack = stack();
    let (agent, uri, image1) = filled_volume(&stack, &["--mirror", "2"]).await;

    let out = stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    assert!(out.contains("v@s1"), "{out}");

    // fio overwrites the volume at random (and verifies what it wrote) while
    // the snapshot is read, and another snapshot is taken under it.
    let writer = fio_verify(&uri, "32M", &["--time_based", "--runtime=4", "--verify_backlog=64"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fio");
    let mut reads = 0;
    let mut during: Option<Vec<u8>> = None;
    let writer = tokio::task::spawn_blocking(move || writer.wait_with_output());
    loop {
        let seen = read_snapshot(&stack, "v@s1").await;
        assert_same("v@s1 read while fio writes", &seen, &image1);
        reads += 1;
        match &during {
            None => {
                stack.sanvol_ok(&["snapshot", "create", "v", "during"]);
                during = Some(read_snapshot(&stack, "v@during").await);
            }
            Some(first) => {
                assert_same("v@during read again while fio writes", &read_snapshot(&stack, "v@during").await, first)
            }
        }
        if writer.is_finished() {
            break;
        }
    }
    assert_fio_ok(writer.await.unwrap().expect("fio"));
    assert!(reads >= 2, "the snapshot was read while fio was writing");
    stack.sanvol_ok(&["snapshot", "delete", "v", "during"]);
    let image2 = read_uri(&uri).await;
    assert_ne!(image1, image2, "fio changed the volume");
    assert_same("v@s1 after fio", &read_snapshot(&stack, "v@s1").await, &image1);

    let list = stack.sanvol_json(&["snapshot", "list", "v"]);
    let copied = list[0]["cow_chunks"].as_u64().unwrap();
    assert!(copied > 0 && copied <= VOLUME_BYTES / CHUNK, "{list}");

    // Second snapshot, then writes at known blocks, then a third.
    stack.sanvol_ok(&["snapshot", "create", "v", "s2"]);
    let blocks = [0u64, 1, 17, 400, 401, 4095, 8191];
    write_blocks(&uri, 3, &blocks).await;
    let image3 = read_uri(&uri).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s3"]);
    write_blocks(&uri, 4, &[5, 6000]).await;

    assert_same("v@s2", &read_snapshot(&stack, "v@s2").await, &image2);
    assert_same("v@s3", &read_snapshot(&stack, "v@s3").await, &image3);
    assert_eq!(changed_chunks(&stack, "v@s3", "s2").await, chunks_of(&blocks), "changed between s2 and s3");
    // Between s1 and s2: every chunk whose content differs is listed.
    let changed = changed_chunks(&stack, "v@s2", "s1").await;
    for (i, (a, b)) in image1.chunks(CHUNK as usize).zip(image2.chunks(CHUNK as usize)).enumerate() {
        if a != b {
            assert!(changed.contains(&(i as u64)), "chunk {i} changed between s1 and s2 but is not listed");
        }
    }

    // Backups: full of s1, then incrementals s2 and s3; restores to nbdkit.
    let repo = stack.dir.path().join("backups");
    let repo_s = repo.to_str().unwrap();
    backup(&stack, &["full", "v@s1", "--to", repo_s]);
    let target = peers::nbdkit(&["memory", "32M"]);
    backup(&stack, &["restore", repo_s, "--to", &target.uri().to_string()]);
    assert_same("restore of the full backup of s1", &read_uri(&target.uri()).await, &image1);
    backup(&stack, &["incremental", "v@s2", "--since", "s1", "--to", repo_s]);
    backup(&stack, &["incremental", "v@s3", "--since", "s2", "--to", repo_s]);
    let target = peers::nbdkit(&["memory", "32M"]);
    backup(&stack, &["restore", repo_s, "--to", &target.uri().to_string()]);
    assert_same("restore of full s1 + incrementals s2, s3", &read_uri(&target.uri()).await, &image3);
    let target = peers::nbdkit(&["memory", "32M"]);
    backup(&stack, &["restore", repo_s, "--to", &target.uri().to_string(), "--upto", "s2"]);
    assert_same("restore of full s1 + incremental s2", &read_uri(&target.uri()).await, &image2);
    backup(&stack, &["verify", repo_s]);
    // Into a new sanvol volume (the local agent attaches it for the restore).
    stack.sanvol_ok(&["volume", "create", "restored", "32M"]);
    let agent_socket = agent.socket.to_str().unwrap();
    let out = backup(&stack, &["restore", repo_s, "--to", "volume:restored", "--agent-socket", agent_socket]);
    assert!(out.contains("done"), "{out}");
    let listed = String::from_utf8_lossy(&agent.cli(&["list"]).stdout).into_owned();
    assert!(!listed.contains("restored"), "detached after the restore: {listed}");
    let restored = attach(&agent, "restored");
    assert_same("restore into a new volume", &read_uri(&restored).await, &image3);
    agent.detach("restored");

    // Standard tools read the same bytes through the local bridge, and
    // from the server's own backup socket (owner-only, one hop).
    standard_tools_read_the_snapshot(&stack, &image1, &blocks).await;
    let socket = backup_socket(&stack);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the backup socket is for its owner only");
    standard_tools_read_the_snapshot_at(&socket, &image1, &blocks);
    // sanvol-backup reads from it too (`--source`): full s1, incremental s3.
    let local = format!("nbd+unix:///?socket={}", socket.display());
    let repo = stack.dir.path().join("backups-local");
    let repo_s = repo.to_str().unwrap();
    backup(&stack, &["full", "v@s1", "--to", repo_s, "--source", &local]);
    backup(&stack, &["incremental", "v@s3", "--since", "s1", "--to", repo_s, "--source", &local]);
    let target = peers::nbdkit(&["memory", "32M"]);
    backup(&stack, &["restore", repo_s, "--to", &target.uri().to_string()]);
    assert_same("restore of backups read from the backup socket", &read_uri(&target.uri()).await, &image3);

    agent.detach("v");
}

/// `sanvol-backup serve` + nbdinfo / nbdcopy.
async fn standard_tools_read_the_snapshot(stack: &Stack, image1: &[u8], blocks: &[u64]) {
    let socket = stack.dir.path().join("snapshots.sock");
    let mut bridge = Command::new(bin("sanvol-backup"))
        .env("SANVOL_MDS", stack.mds_addr())
        .env("SANVOL_KEY", &stack.admin_key)
        .env("SANVOL_SERVER_KEY", pub_path(&stack.mds_key))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sanvol-backup serve");
    let stdout = bridge.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let first = lines.next().expect("a line").expect("read");
    assert!(first.contains("serving snapshots"), "{first}");
    let guard = KillOnDrop(bridge);
    standard_tools_read_the_snapshot_at(&socket, image1, blocks);
    drop(guard);
    let _ = std::fs::remove_file(Path::new(&socket));
}

/// nbdinfo lists the snapshots at `socket` and maps v@s3's changes since s2
/// (`blocks`); nbdcopy copies v@s1, which must be `image1`.
fn standard_tools_read_the_snapshot_at(socket: &Path, image1: &[u8], blocks: &[u64]) {
    let list = run_ok(
        Command::new(require_tool("nbdinfo")).arg("--list").arg(format!("nbd+unix:///?socket={}", socket.display())),
    );
    for name in ["v@s1", "v@s2", "v@s3"] {
        assert!(list.contains(name), "nbdinfo --list shows {name}: {list}");
    }
    let map = run_ok(
        Command::new(require_tool("nbdinfo"))
            .arg(format!("--map={}", changed_context_name("s2")))
            .arg(format!("nbd+unix:///v@s3?socket={}", socket.display())),
    );
    // Lines: "OFFSET LENGTH FLAGS [DESCRIPTION]"; flag 1 = changed.
    let mut listed = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (offset, length, flags): (u64, u64, u32) =
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        if flags & CHANGED_FLAG != 0 {
            listed.extend(offset / CHUNK..(offset + length).div_ceil(CHUNK));
        }
    }
    assert_eq!(listed, chunks_of(blocks), "nbdinfo --map:\n{map}");

    let copy = socket.with_extension("s1.img");
    run_ok(
        Command::new(require_tool("nbdcopy")).arg(format!("nbd+unix:///v@s1?socket={}", socket.display())).arg(&copy),
    );
    assert_same(&format!("nbdcopy of v@s1 at {}", socket.display()), &std::fs::read(&copy).unwrap(), image1);
    let _ = std::fs::remove_file(&copy);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_snapshots_fall_through_and_survive_deletes() {
    let stack = stack();
    let (agent, uri, image1) = filled_volume(&stack, &[]).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    write_blocks(&uri, 2, &[0, 100, 200]).await;
    let image2 = read_uri(&uri).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s2"]);
    // Chunk 0 was preserved in s1; 3000 only in s2 (s1 reads it through s2).
    write_blocks(&uri, 3, &[0, 3000, 5000]).await;
    let image3 = read_uri(&uri).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s3"]);
    write_blocks(&uri, 4, &[3000, 7000]).await;

    assert_same("s1", &read_snapshot(&stack, "v@s1").await, &image1);
    assert_same("s2", &read_snapshot(&stack, "v@s2").await, &image2);
    assert_same("s3", &read_snapshot(&stack, "v@s3").await, &image3);

    // Deleting the middle one moves its pre-images into s1.
    stack.sanvol_ok(&["snapshot", "delete", "v", "s2"]);
    assert_same("s1 after deleting s2", &read_snapshot(&stack, "v@s1").await, &image1);
    assert_same("s3 after deleting s2", &read_snapshot(&stack, "v@s3").await, &image3);
    // Deleting the newest while attached: writes copy into s1 from then on.
    stack.sanvol_ok(&["snapshot", "delete", "v", "s3"]);
    write_blocks(&uri, 5, &[3000, 6500, 8000]).await;
    assert_same("s1 after deleting s3 and writing", &read_snapshot(&stack, "v@s1").await, &image1);
    let list = stack.sanvol_json(&["snapshot", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert!(stack.sanvol(&["volume", "delete", "v"]).status.code() != Some(0));
    agent.detach("v");
    stack.sanvol_ok(&["snapshot", "delete", "v", "s1"]);
    stack.sanvol_ok(&["volume", "delete", "v"]);
}

/// `kill -9` of the agent at a point of the copy-on-write protocol: the
/// snapshot still reads its image; a new agent finishes the write.
/// `behind`: the write is acknowledged before its chunk is preserved (the
/// default, `client_agent::cow_behind`), so the FLUSH after it is what
/// fails; otherwise (`--cow-write-behind-kib 0`) the write itself.
async fn agent_crash_at(point: &str, behind: bool) {
    let stack = stack();
    let (agent, _, image1) = filled_volume(&stack, &["--mirror", "2"]).await;
    agent.detach("v");
    drop(agent);
    let mut env = vec![("SANVOL_FAULT", point)];
    if !behind {
        env.push(("SANVOL_AGENT_COW_WRITE_BEHIND_KIB", "0"));
    }
    let agent = stack.restart_agent_env("host-a", &[], &env);
    let uri = attach(&agent, "v");
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    let c = connect(&uri).await;
    let write = c.write(3 * CHUNK, Bytes::from(block_pattern(9, 3 * CHUNK / BLOCK)), false).await;
    if behind {
        write.expect("acknowledged before its chunk is preserved");
        assert!(c.flush().await.is_err(), "the agent died before the write landed");
    } else {
        assert!(write.is_err(), "the agent died during the write");
    }
    let mut agent = agent;
    agent.proc.wait_exit_within(std::time::Duration::from_secs(60));
    assert!(agent.proc.log().contains(&format!("reached {point}")), "{}", agent.proc.log());
    assert_same(&format!("v@s1 after the agent died at {point}"), &read_snapshot(&stack, "v@s1").await, &image1);

    // A new agent process takes the volume back at once (its state file:
    // the handle is resumed, not re-opened) and finishes the write.
    let agent = stack.restart_agent("host-a");
    let uri = served_again(&agent, "v").await;
    assert!(agent.proc.log().contains("took back volume v"), "{}", agent.proc.log());
    write_blocks(&uri, 9, &[3 * CHUNK / BLOCK, 10]).await;
    assert_same(&format!("v@s1 after the write ({point})"), &read_snapshot(&stack, "v@s1").await, &image1);
    let live = read_uri(&uri).await;
    assert_eq!(&live[(3 * CHUNK) as usize..(3 * CHUNK + BLOCK) as usize], &block_pattern(9, 3 * CHUNK / BLOCK)[..]);
    agent.detach("v");
}

/// The export URI of `volume` once the restarted agent serves it again.
async fn served_again(agent: &Agent, volume: &str) -> NbdUri {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = agent.cli(&["list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let found = list.as_array().and_then(|l| l.iter().find(|v| v["volume"] == volume).cloned());
        if let Some(info) = found {
            return info["export_uri"].as_str().unwrap().parse().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "{volume} was not taken back:\n{}", agent.proc.log());
        // Polling another process's listing: there is nothing to await.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_copying_a_pre_image_before_registering_it() {
    agent_crash_at("agent-after-cow-copy", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_registering_before_overwriting() {
    agent_crash_at("agent-after-cow-register", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_copying_a_pre_image_for_a_write_acknowledged_behind() {
    agent_crash_at("agent-after-cow-copy", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_registering_for_a_write_acknowledged_behind() {
    agent_crash_at("agent-after-cow-register", true).await;
}

/// `kill -9` of the agent while first writes after a snapshot are
/// acknowledged behind (many outstanding at once): every write a FLUSH
/// covered is on every leg, its chunk registered and its pre-image in the
/// COW area (read from the devices directly); a write no FLUSH covered is
/// either there or not, never half; and the snapshot reads its image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_with_writes_behind_loses_only_unflushed_ones() {
    let stack = stack();
    let (mut agent, uri, image1) = filled_volume(&stack, &["--mirror", "2"]).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    let c = connect(&uri).await;
    let block_of = |chunk: u64| chunk * CHUNK / BLOCK + chunk % (CHUNK / BLOCK);
    let flushed: Vec<u64> = (0..40).map(|i| i * 7 % (VOLUME_BYTES / CHUNK)).collect();
    let unflushed: Vec<u64> = (0..(VOLUME_BYTES / CHUNK)).filter(|c| !flushed.contains(c)).take(120).collect();
    for &chunk in &flushed {
        c.write(block_of(chunk) * BLOCK, Bytes::from(block_pattern(12, block_of(chunk))), false).await.unwrap();
    }
    c.flush().await.expect("flush");
    for &chunk in &unflushed {
        c.write(block_of(chunk) * BLOCK, Bytes::from(block_pattern(13, block_of(chunk))), false).await.unwrap();
    }
    agent.proc.kill();
    drop(c);

    let shown = stack.sanvol_json(&["volume", "show", "v"]);
    let description = &shown["description"];
    assert_pre_images_on_devices(description, &flushed, &image1).await;
    for &chunk in &flushed {
        let at = block_of(chunk) * BLOCK;
        for (device, got) in volume_block_on_legs(description, at).await {
            assert!(got == block_pattern(12, at / BLOCK), "chunk {chunk}: a flushed write is not on {device}");
        }
    }
    let mut landed = 0;
    for &chunk in &unflushed {
        let at = block_of(chunk) * BLOCK;
        let old = &image1[at as usize..(at + BLOCK) as usize];
        for (_, got) in volume_block_on_legs(description, at).await {
            if got == block_pattern(13, at / BLOCK) {
                landed += 1;
                assert!(cow_has(&description["snapshot"]["cow"], chunk), "chunk {chunk} overwritten unregistered");
            } else {
                assert!(got == old, "chunk {chunk}: an unflushed write left neither the old nor the new block");
            }
        }
    }
    eprintln!("{landed} of {} unflushed legs had landed at the kill", 2 * unflushed.len());
    assert_same("v@s1 after the agent died with writes behind", &read_snapshot(&stack, "v@s1").await, &image1);
}

/// `kill -9` of the server at a point of a registration: the agent's write
/// waits, the restarted server takes the registration again, the write
/// completes and the snapshot still reads its image.
async fn server_crash_at(point: &str) {
    let mut stack = stack();
    let (agent, uri, image1) = filled_volume(&stack, &[]).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    // Restart the server armed with the fault; the agent resumes its handle.
    stack.kill_mds();
    stack.mds_env = vec![("SANVOL_FAULT".into(), point.into())];
    stack.start_mds();
    let c = connect(&uri).await;
    let blocks = [7 * CHUNK / BLOCK];
    // Acknowledged before its chunk is preserved; the FLUSH waits for it.
    let write = tokio::spawn({
        let c = c.clone();
        async move {
            c.write(blocks[0] * BLOCK, Bytes::from(block_pattern(9, blocks[0])), false).await?;
            c.flush().await
        }
    });
    stack.mds.as_mut().unwrap().wait_exit_within(std::time::Duration::from_secs(60));
    assert!(stack.mds_log().contains(&format!("reached {point}")), "{}", stack.mds_log());
    assert!(!write.is_finished(), "the write's FLUSH waits for its registration");
    stack.mds_env.clear();
    stack.start_mds();
    write.await.unwrap().expect("the write completes after the server restarted");
    c.disconnect().await;
    assert_same(&format!("v@s1 after the server died at {point}"), &read_snapshot(&stack, "v@s1").await, &image1);
    let live = read_uri(&uri).await;
    assert_eq!(&live[(7 * CHUNK) as usize..(7 * CHUNK + BLOCK) as usize], &block_pattern(9, blocks[0])[..]);
    agent.detach("v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_before_committing_a_registration() {
    server_crash_at("mds-before-cow-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_after_committing_before_answering() {
    server_crash_at("mds-after-cow-commit").await;
}

/// Reads `len` bytes at `offset` of the device the pool records as `uri`,
/// directly (not through sanvol).
async fn read_device(uri: &str, offset: u64, len: u64) -> Vec<u8> {
    let c = NbdClient::connect(&uri.parse().unwrap(), ClientOptions::default()).await.expect("device");
    let data = c.read(offset, len as u32).await.expect("device read").to_vec();
    c.disconnect().await;
    data
}

/// Every leg of the `extents` entry holding byte `at` (of a volume or a COW
/// area): (device URI, byte offset on it).
fn legs_at(description: &serde_json::Value, extents: &serde_json::Value, at: u64) -> Vec<(String, u64)> {
    let extent_bytes = description["extent_bytes"].as_u64().unwrap();
    let extent = &extents[(at / extent_bytes) as usize];
    extent["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|leg| {
            let index = leg["device"].as_u64().unwrap();
            let device = description["devices"].as_array().unwrap().iter().find(|d| d["index"] == index).unwrap();
            (device["uri"].as_str().unwrap().to_string(), leg["offset"].as_u64().unwrap() + at % extent_bytes)
        })
        .collect()
}

/// The block of the volume at byte `at` as each of its legs holds it, read
/// from the devices directly: (device URI, bytes).
async fn volume_block_on_legs(description: &serde_json::Value, at: u64) -> Vec<(String, Vec<u8>)> {
    let mut blocks = Vec::new();
    for (device, offset) in legs_at(description, &description["extents"], at) {
        let got = read_device(&device, offset, BLOCK).await;
        blocks.push((device, got));
    }
    blocks
}

/// Whether `chunk` is set in a snapshot's COW map as `volume show --json` prints it.
fn cow_has(cow: &serde_json::Value, chunk: u64) -> bool {
    let words = cow["words"].as_array().unwrap();
    words[(chunk / 64) as usize].as_u64().unwrap() & (1 << (chunk % 64)) != 0
}

/// Each of `chunks` is registered in the newest snapshot of `description`
/// (as `volume show --json` prints it) and its COW area holds the chunk's
/// bytes from `image` on every leg, read from the devices directly.
async fn assert_pre_images_on_devices(description: &serde_json::Value, chunks: &[u64], image: &[u8]) {
    let snapshot = &description["snapshot"];
    for &chunk in chunks {
        assert!(cow_has(&snapshot["cow"], chunk), "chunk {chunk} was written but is not registered");
        let at = chunk * CHUNK;
        let pre_image = &image[at as usize..(at + CHUNK) as usize];
        for (device, offset) in legs_at(description, &snapshot["cow_extents"], at) {
            let got = read_device(&device, offset, CHUNK).await;
            assert!(got == pre_image, "chunk {chunk}: the COW area on {device} at {offset} is not the pre-image");
        }
    }
}

/// `kill -9` of the server in the middle of the metadata journal's group
/// commits, under copy-on-write load: many writers at once, so their
/// registrations share commits. After a restart every registration that
/// was acknowledged before the crash is still in the snapshot's COW map,
/// every write completes, and the devices, read directly, hold each
/// pre-image in the snapshot's COW area and each new block in the volume,
/// on every leg.
async fn server_crash_under_cow_load(point: &str) {
    let mut stack = stack();
    let (agent, uri, image1) = filled_volume(&stack, &["--mirror", "2"]).await;
    // The server restarted armed. The points count only the commits that
    // register copy-on-write chunks (the agent's write-intent marks and lazy
    // clears commit too, at times of their own): a first registration (1)
    // and the next (2: the fault fires).
    stack.kill_mds();
    stack.mds_env = vec![("SANVOL_FAULT".into(), format!("{point}@2"))];
    stack.start_mds();
    // Until the agent resumed its handle the server is in its grace period.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = stack.sanvol(&["snapshot", "create", "v", "s1"]);
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("grace period") && std::time::Instant::now() < deadline, "snapshot create: {err}");
        // Polling the server's state (its grace period ends when the agent resumes).
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let chunks: Vec<u64> = (0..48).map(|i| i * 5 % (VOLUME_BYTES / CHUNK)).collect();
    let c = connect(&uri).await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    // The first write alone (its registration is the first counted commit
    // and is acknowledged), then the others at once (the first commit of
    // their registrations is the second, where the server dies). A write
    // counts as acknowledged once a FLUSH after it completed: before, it
    // may be acknowledged ahead of its registration (`cow_behind`).
    let first = chunks[0] * CHUNK / BLOCK;
    c.write(first * BLOCK, Bytes::from(block_pattern(11, first)), false).await.unwrap();
    c.flush().await.unwrap();
    acked.lock().unwrap().push(chunks[0]);
    let writes: Vec<_> = chunks[1..]
        .iter()
        .map(|&chunk| {
            let (c, acked) = (c.clone(), acked.clone());
            tokio::spawn(async move {
                let block = chunk * CHUNK / BLOCK;
                c.write(block * BLOCK, Bytes::from(block_pattern(11, block)), false).await?;
                c.flush().await?;
                acked.lock().unwrap().push(chunk);
                Ok::<_, blockio::IoError>(())
            })
        })
        .collect();
    stack.mds.as_mut().unwrap().wait_exit_within(std::time::Duration::from_secs(60));
    let acked_before: Vec<u64> = acked.lock().unwrap().clone();
    assert!(stack.mds_log().contains(&format!("reached {point}")), "{}", stack.mds_log());
    assert!(acked_before.len() < chunks.len(), "the server died with writes waiting for registrations");
    assert!(acked_before.contains(&chunks[0]));
    stack.mds_env.clear();
    stack.start_mds();
    for w in writes {
        w.await.unwrap().expect("every write completes after the server restarted");
    }
    c.disconnect().await;

    let shown = stack.sanvol_json(&["volume", "show", "v"]);
    let description = &shown["description"];
    let snapshot = &description["snapshot"];
    for &chunk in &acked_before {
        assert!(cow_has(&snapshot["cow"], chunk), "chunk {chunk} was acknowledged before the crash, then lost");
    }
    assert_pre_images_on_devices(description, &chunks, &image1).await;
    for &chunk in &chunks {
        let at = chunk * CHUNK;
        for (device, got) in volume_block_on_legs(description, at).await {
            assert!(got == block_pattern(11, at / BLOCK), "chunk {chunk}: the new block is not on {device}");
        }
    }
    assert_same(&format!("v@s1 after the server died at {point}"), &read_snapshot(&stack, "v@s1").await, &image1);
    agent.detach("v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_in_the_middle_of_a_journal_write_under_cow_load() {
    server_crash_under_cow_load("mds-mid-cow-metadata-write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_after_a_journal_write_before_acknowledging_it() {
    server_crash_under_cow_load("mds-after-cow-metadata-write").await;
}

/// Two agents holding the volume shared-write: the server copies the
/// pre-images (an agent could otherwise copy a chunk the other had already
/// registered and overwritten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_writers_keep_the_snapshot_intact() {
    let stack = stack();
    stack.sanvol_ok(&["volume", "create", "v", "32M", "--mirror", "2"]);
    let a = stack.start_agent("host-a");
    let b = stack.start_agent("host-b");
    let uri_a = a.attach("v", "shared");
    let uri_b = b.attach("v", "shared");
    fill(&uri_a, 1).await;
    let image1 = read_uri(&uri_b).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    // Both write the same chunks, interleaved.
    let blocks: Vec<u64> = (0..64).map(|i| i * 37 % 8192).collect();
    let (even, odd): (Vec<u64>, Vec<u64>) = blocks.iter().partition(|b| *b % 2 == 0);
    tokio::join!(write_blocks(&uri_a, 2, &even), write_blocks(&uri_b, 3, &odd), write_blocks(&uri_b, 4, &even));
    assert_same("v@s1 after two shared writers", &read_snapshot(&stack, "v@s1").await, &image1);
    assert!(stack.mds_log().contains("volume reconfigured"), "{}", stack.mds_log());
    a.detach("v");
    b.detach("v");
}

/// A live-migration handover under a snapshot: the source and the target
/// both hold the volume writable and write the same chunks — first the
/// source alone (its registrations never reach the target's view of the
/// COW map), then the target, then both at once. Each chunk's pre-image is
/// copied once, by the server: the snapshot reads back exactly as it was,
/// and so do the COW areas on every device, read directly. (Before, both
/// agents copied pre-images themselves, and the target copied the source's
/// new data over the pre-images the source had registered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_under_a_snapshot_keeps_its_pre_images() {
    let stack = stack();
    let (a, uri_a, image1) = filled_volume(&stack, &["--mirror", "2"]).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    let b = stack.start_agent("host-b");
    let b_pub = pub_path(&stack.dir.path().join("host-b.key"));
    let out = a.cli(&["handover", "v", "--to", b_pub.to_str().unwrap()]);
    assert!(out.status.success(), "handover: {}", String::from_utf8_lossy(&out.stderr));
    let token_file = stack.dir.path().join("token");
    std::fs::write(&token_file, String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let out = b.cli(&["attach", "v", "--handover-token", token_file.to_str().unwrap()]);
    assert!(out.status.success(), "attach with token: {}\n{}", String::from_utf8_lossy(&out.stderr), b.proc.log());
    let uri_b: NbdUri = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();

    let first: Vec<u64> = (0..24).map(|i| i * 53 % (VOLUME_BYTES / BLOCK)).collect();
    let both: Vec<u64> = (0..24).map(|i| (i * 97 + 11) % (VOLUME_BYTES / BLOCK)).collect();
    // The target's first write (its view of the COW map starts here).
    let last_block = VOLUME_BYTES / BLOCK - 1;
    write_blocks(&uri_b, 6, &[last_block]).await;
    write_blocks(&uri_a, 2, &first).await;
    write_blocks(&uri_b, 3, &first).await;
    tokio::join!(write_blocks(&uri_a, 4, &both), write_blocks(&uri_b, 5, &both));
    assert_same("v@s1 after a handover with both agents writing", &read_snapshot(&stack, "v@s1").await, &image1);

    let shown = stack.sanvol_json(&["volume", "show", "v"]);
    let written = chunks_of(&[first.clone(), both.clone(), vec![last_block]].concat());
    assert_pre_images_on_devices(&shown["description"], &written, &image1).await;
    assert!(
        !stack.mds_log().contains("copied pre-images of chunks already registered"),
        "an agent copied pre-images itself: {}",
        stack.mds_log()
    );
    a.detach("v");
    b.detach("v");
}

/// With every direct path cut, the agent's copies into the COW area go
/// through the server's data channels like its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_on_write_works_on_the_fallback_path() {
    let stack = stack();
    stack.sanvol_ok(&["volume", "create", "v", "32M", "--mirror", "2"]);
    let mut proxies = Vec::new();
    let mut maps = Vec::new();
    for (i, d) in stack.devices.iter().enumerate() {
        let proxy = CuttableProxy::start(&stack.dir.path().join(format!("proxy{i}.sock")), &d.dir().join("nbd.sock"));
        maps.push("--device-uri".to_string());
        maps.push(format!("{}={}", d.uri(), NbdUri::unix(&proxy.socket, "")));
        proxies.push(proxy);
    }
    let agent = stack.start_agent_with("host-a", &maps);
    let uri = attach(&agent, "v");
    fill(&uri, 1).await;
    let image1 = read_uri(&uri).await;
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    for p in &proxies {
        p.cut();
    }
    let blocks = [0u64, 100, 5000, 8000];
    write_blocks(&uri, 2, &blocks).await;
    let live = read_uri(&uri).await;
    for &b in &blocks {
        assert_eq!(&live[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize], &block_pattern(2, b)[..]);
    }
    assert_same("v@s1 after writes on the fallback path", &read_snapshot(&stack, "v@s1").await, &image1);
    let clients = stack.sanvol_json(&["client", "list"]);
    assert!(clients.to_string().contains("fallback"), "{clients}");
    agent.detach("v");
}

/// Backup keys read snapshots; agent keys may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_and_backup_keys_reach_the_pseudo_device() {
    let stack = stack();
    stack.sanvol_ok(&["volume", "create", "v", "32M"]);
    stack.sanvol_ok(&["snapshot", "create", "v", "s1"]);
    let backup_key = stack.dir.path().join("backup.key");
    run_ok(Command::new(bin("sanvol")).arg("keygen").arg(&backup_key));
    stack.sanvol_ok(&[
        "client",
        "add",
        pub_path(&backup_key).to_str().unwrap(),
        "--role",
        "backup",
        "--name",
        "nightly",
    ]);
    let listed = run_ok(
        Command::new(bin("sanvol-backup"))
            .env("SANVOL_MDS", stack.mds_addr())
            .env("SANVOL_KEY", &backup_key)
            .env("SANVOL_SERVER_KEY", pub_path(&stack.mds_key))
            .args(["snapshots", "--json"]),
    );
    assert!(listed.contains("v@s1"), "{listed}");

    let agent_key = stack.dir.path().join("agent.key");
    run_ok(Command::new(bin("sanvol")).arg("keygen").arg(&agent_key));
    stack.sanvol_ok(&["client", "add", pub_path(&agent_key).to_str().unwrap(), "--role", "agent"]);
    let key = control_client::keys::load_private(&agent_key).unwrap();
    let (pinned, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    let addr: ControlAddr = stack.mds_addr().parse().unwrap();
    let refused =
        channel::open_backup(&addr, &key, Some(&pinned), Role::Agent, "sneaky").await.err().unwrap().to_string();
    assert!(refused.contains("backup channels are for admin and backup keys"), "{refused}");
    // Nor can a backup key write to a snapshot.
    let c = pseudo_device(&stack, "v@s1", &[]).await;
    assert!(c.write(0, Bytes::from(vec![1u8; 4096]), false).await.is_err());
    c.disconnect().await;
}
