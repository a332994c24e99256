//! Issue 4, fallback through the server, with real processes: nbdkit devices,
//! `sanvol-mds`, `sanvol-agent` whose direct path to one device runs through
//! a proxy the test cuts, fio verify through the agent, and the devices read
//! directly afterwards.

use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::metrics::{metrics_addr, scrape, value};
use sanvol_tests::proxy::CuttableProxy;
use sanvol_tests::system::{Agent, Stack};
use sanvol_tests::volumes::{assert_fio_ok, check_placement, connect, fill, fio_verify};

const WAIT: Duration = Duration::from_secs(30);

/// Polls `cond` (a listing) until it holds; panics with `what` after [`WAIT`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fallback_of(stack: &Stack, client: &str) -> Vec<String> {
    let clients = stack.sanvol_json(&["client", "list"]);
    clients
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == client)
        .map(|c| c["fallback"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Agent host-a, whose direct path to the first device of the volume
/// described by `desc` runs through a proxy the test can cut; returns the
/// proxy, that device's place in the stack, and the agent.
fn agent_through_proxy(stack: &Stack, desc: &serde_json::Value) -> (CuttableProxy, usize, Agent) {
    let cut_uri = desc["description"]["devices"][0]["uri"].as_str().unwrap().to_string();
    let peer = stack.devices.iter().position(|d| d.uri().to_string() == cut_uri).expect("the device's nbdkit");
    let proxy = CuttableProxy::start(&stack.dir.path().join("proxy.sock"), &stack.devices[peer].dir().join("nbd.sock"));
    let via_proxy = NbdUri::unix(&proxy.socket, "").to_string();
    let args = ["--device-uri".into(), format!("{cut_uri}={via_proxy}"), "--metrics-addr".into(), "127.0.0.1:0".into()];
    let agent = stack.start_agent_with("host-a", &args);
    (proxy, peer, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_path_falls_back_through_the_server_and_returns_then_a_dead_device_is_marked_failed() {
    let mut stack = Stack::new(3, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "m", "128M", "--mirror", "2"]);
    stack.sanvol_ok(&["volume", "create", "p", "128M"]);

    // The device to cut: one the plain volume uses.
    let p_desc = stack.sanvol_json(&["volume", "show", "p"]);
    let cut_index = p_desc["description"]["devices"][0]["index"].as_u64().unwrap();
    let (proxy, peer, agent) = agent_through_proxy(&stack, &p_desc);
    let m = agent.attach("m", "exclusive");
    let p = agent.attach("p", "exclusive");
    assert!(proxy.forwarded_bytes() > 0, "the agent's direct path to device {cut_index} runs through the proxy");

    // Cut the agent's path while fio runs on both volumes.
    let fio_p = tokio::task::spawn_blocking({
        let p = p.clone();
        move || fio_verify(&p, "48M", &[]).output().expect("run fio")
    });
    let fio_m = tokio::task::spawn_blocking({
        let m = m.clone();
        move || fio_verify(&m, "48M", &[]).output().expect("run fio")
    });
    let before = proxy.forwarded_bytes();
    until("fio writes through the proxy", || proxy.forwarded_bytes() > before + (4 << 20)).await;
    proxy.cut();
    for fio in [fio_p.await.unwrap(), fio_m.await.unwrap()] {
        let text = String::from_utf8_lossy(&fio.stdout);
        assert!(fio.status.success() && text.contains("err= 0"), "fio failed:\n{text}\n{}", stack.all_logs(60));
    }

    // Still cut: more acknowledged writes, all through the server.
    fill(&m, 1).await;
    fill(&p, 2).await;
    let fallback = fallback_of(&stack, "host-a");
    assert_eq!(fallback.len(), 1, "{fallback:?}");
    assert!(fallback[0].starts_with(&format!("device {cut_index} ")), "{fallback:?}");
    let shown = stack.sanvol_json(&["volume", "show", "p"]);
    let on_fallback = shown["info"]["fallback"].as_array().unwrap();
    assert!(
        on_fallback.len() == 1 && on_fallback[0].as_str().unwrap().starts_with("host-a: device"),
        "volume show: {shown}"
    );
    let text = stack.sanvol_ok(&["client", "list"]);
    assert!(text.contains(&format!("host-a reaches through the server: device {cut_index} (")), "{text}");
    let text = stack.sanvol_ok(&["volume", "show", "p"]);
    assert!(text.contains("fallback through the server: host-a: device"), "{text}");

    // Restore: the agent probes and returns to its direct path.
    proxy.restore();
    until("host-a is back on its direct path", || fallback_of(&stack, "host-a").is_empty()).await;
    assert!(agent.proc.log().contains("back to direct I/O"), "agent log:\n{}", agent.proc.log());
    let before = proxy.forwarded_bytes();
    fill(&m, 3).await;
    fill(&p, 4).await;
    assert!(proxy.forwarded_bytes() > before, "direct I/O runs through the proxy again");
    check_placement(&stack, "m", 3, None).await;
    check_placement(&stack, "p", 4, None).await;

    // Now the writes made during the cut: overwrite with a new tag during
    // another cut, restore, and check them on the devices.
    proxy.cut();
    fill(&m, 5).await;
    fill(&p, 6).await;
    proxy.restore();
    check_placement(&stack, "m", 5, None).await;
    check_placement(&stack, "p", 6, None).await;

    // The server cannot reach the device either.
    stack.devices[peer].kill();
    proxy.cut();
    assert_fio_ok(tokio::task::spawn_blocking(move || fio_verify(&m, "32M", &[]).output().unwrap()).await.unwrap());
    let devices = stack.sanvol_json(&["device", "list"]);
    let dead = devices.as_array().unwrap().iter().find(|d| d["index"] == cut_index).unwrap();
    assert!(dead["state"].as_str().unwrap().starts_with("failed"), "{devices}");
    let log = stack.mds_log();
    assert!(log.contains("device marked failed"), "mds log:\n{log}");

    // The plain volume: only I/O touching the dead device fails.
    let p_client = connect(&p).await;
    let desc = &p_desc["description"];
    let extent_bytes = desc["extent_bytes"].as_u64().unwrap();
    let mut failed = 0;
    for (e, extent) in desc["extents"].as_array().unwrap().iter().enumerate() {
        let on_dead = extent["legs"][0]["device"].as_u64().unwrap() == cut_index;
        let r = p_client.read(e as u64 * extent_bytes, 4096).await;
        assert_eq!(r.is_err(), on_dead, "extent {e}: {r:?}");
        failed += usize::from(on_dead);
    }
    assert!(failed > 0);
    let agent_log = agent.proc.log();
    assert!(agent_log.contains("marked failed"), "agent log:\n{agent_log}");
    p_client.disconnect().await;
}

/// Large writes in flight on the direct path when it is cut are written
/// again through the server, whole. fio verify (1 MiB, QD8) on one volume and a
/// sequential 1 MiB fill of another run across the cut; then the filled
/// volume is read back from the device directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_writes_in_flight_when_the_path_is_cut_are_written_again_through_the_server() {
    let mut stack = Stack::new(1, "1G");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "p", "128M"]);
    stack.sanvol_ok(&["volume", "create", "q", "128M"]);
    let (proxy, _, agent) = agent_through_proxy(&stack, &stack.sanvol_json(&["volume", "show", "p"]));
    let p = agent.attach("p", "exclusive");
    let q = agent.attach("q", "exclusive");

    let fio = tokio::task::spawn_blocking(move || {
        fio_verify(&q, "128M", &["--bs=1m", "--iodepth=8"]).output().expect("run fio")
    });
    let filling = tokio::spawn({
        let p = p.clone();
        async move { fill(&p, 7).await }
    });
    let before = proxy.forwarded_bytes();
    until("1 MiB writes through the proxy", || proxy.forwarded_bytes() > before + (16 << 20)).await;
    proxy.cut();
    let fio = fio.await.unwrap();
    let text = String::from_utf8_lossy(&fio.stdout);
    assert!(fio.status.success() && text.contains("err= 0"), "fio failed:\n{text}\n{}", stack.all_logs(60));
    filling.await.unwrap();
    assert_eq!(fallback_of(&stack, "host-a").len(), 1, "the cut sent the agent through the server");
    proxy.restore();
    until("host-a is back on its direct path", || fallback_of(&stack, "host-a").is_empty()).await;
    // Every block of the fill, read from the device itself.
    check_placement(&stack, "p", 7, None).await;
    // The writes before the cut went to the device in pipes: the path whose
    // payloads the agent keeps a `tee` of, to send again through the server.
    let metrics = scrape(&metrics_addr(&agent.proc));
    let spliced: f64 = ["p", "q"]
        .iter()
        .map(|v| value(&metrics, "sanvol_agent_write_bytes_spliced_total", &[("volume", v)]).unwrap_or(0.0))
        .sum();
    assert!(spliced >= (8 << 20) as f64, "only {spliced} bytes of the 1 MiB writes went through pipes");
}

/// Opens a data channel with `key` (any role): one `DataChannel` request.
/// Returns the stream (ready for NBD) or the refusal.
async fn raw_channel(
    stack: &Stack,
    key: &str,
    role: volume_format::control::auth::Role,
    volume: u64,
    device: u32,
) -> Result<Box<dyn control_client::ControlStream>, volume_format::control::messages::ControlError> {
    use control_client::channel::{self, ChannelError, ChannelIdentity};
    use control_client::ControlAddr;
    use volume_format::control::messages::Request;
    let addr: ControlAddr = stack.mds_addr().parse().unwrap();
    let key = control_client::keys::load_private(&stack.dir.path().join(key)).unwrap();
    let who = ChannelIdentity { key: &key, pinned: None, role, name: "test", instance: [0; 16] };
    match channel::open(
        &addr,
        &who,
        Request::DataChannel { volume: volume_format::VolumeId(volume), device: volume_format::DeviceIndex(device) },
    )
    .await
    {
        Ok((stream, _grant)) => Ok(stream),
        Err(ChannelError::Refused(e)) => Err(e),
        Err(other) => panic!("unexpected failure {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_channels_reach_only_what_the_agent_holds() {
    use volume_format::control::auth::Role;
    use volume_format::control::messages::ErrorCode;
    let mut stack = Stack::new(2, "512M");
    stack.start_mds();
    stack.sanvol_ok(&["volume", "create", "p", "64M"]);
    let shown = stack.sanvol_json(&["volume", "show", "p"]);
    let desc = &shown["description"];
    let volume = desc["volume"].as_u64().unwrap();
    let on = desc["devices"][0]["index"].as_u64().unwrap() as u32;
    let leg_offset = desc["extents"][0]["legs"][0]["offset"].as_u64().unwrap();
    let agent = stack.start_agent("host-a");
    let _other = stack.start_agent("host-b");
    let _p = agent.attach("p", "exclusive");

    // Nobody gets a channel to a volume it does not hold, or as an admin.
    let e = raw_channel(&stack, "host-b.key", Role::Agent, volume, on).await.err().expect("host-b holds nothing");
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
    assert!(e.message.contains("holds no open handle"), "{e}");
    let e = raw_channel(&stack, "admin.key", Role::Admin, volume, on).await.err().expect("admins get no channel");
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
    let elsewhere = 1 - on;
    let e = raw_channel(&stack, "host-a.key", Role::Agent, volume, elsewhere).await.err().expect("no extent there");
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");

    // The holder gets NBD over the channel, restricted to the volume's extents.
    let stream = raw_channel(&stack, "host-a.key", Role::Agent, volume, on).await.unwrap();
    let c = NbdClient::connect_stream(stream, "", ClientOptions::default()).await.unwrap();
    c.write(leg_offset, Bytes::from(vec![9u8; 4096]), false).await.unwrap();
    assert_eq!(c.read(leg_offset, 4096).await.unwrap(), Bytes::from(vec![9u8; 4096]));
    assert_eq!(
        c.read(0, 4096).await.unwrap_err().kind,
        blockio::IoErrorKind::PermissionDenied,
        "the label is no extent of the volume"
    );
    assert!(c.write(0, Bytes::from(vec![0u8; 4096]), false).await.is_err());
    c.disconnect().await;
    // The label survived: the pool still opens.
    stack.sanvol_ok(&["device", "list"]);
}
