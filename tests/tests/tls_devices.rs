//! A pool on devices that require TLS (issue 16): nbdkit `--tls=require`
//! with X.509 certificates, recorded in the pool as `nbds+unix://` URIs
//! naming the CA. `sanvol pool init` (probe and label), `sanvol-mds` (its
//! metadata, the backup pseudo-device), and `sanvol-agent` (direct I/O) all
//! reach the devices over TLS; the devices refuse anything else.

use blockio::client::{ClientOptions, NbdClient};
use blockio::BlockDevice;
use control_client::channel;
use control_client::ControlAddr;
use sanvol_tests::system::{pub_path, Stack};
use sanvol_tests::volumes::{check_placement, fill};
use volume_format::control::auth::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_tls_devices_works_end_to_end() {
    let mut stack = Stack::new_tls(2, "1G");
    stack.start_mds();

    // The pool records that each device needs TLS, and which CA to trust.
    let devices = stack.sanvol_json(&["device", "list"]);
    for d in devices.as_array().unwrap() {
        let uri = d["uri"].as_str().unwrap();
        assert!(uri.starts_with("nbds+unix://") && uri.contains("tls-certificates="), "{uri}");
    }
    // And the devices really refuse plain NBD.
    let plain = stack.devices[0].uri();
    let e = NbdClient::connect(&plain, ClientOptions::default()).await.err().expect("nbdkit requires TLS");
    assert!(e.to_string().contains("ERR_TLS_REQD"), "{e}");

    // The agent's direct path: a mirrored volume written through the agent,
    // every block where the extent map says on both legs (read back over TLS).
    stack.sanvol_ok(&["volume", "create", "m", "128M", "--mirror", "2"]);
    let agent = stack.start_agent("host-a");
    let uri = agent.attach("m", "exclusive");
    fill(&uri, 5).await;
    check_placement(&stack, "m", 5, None).await;

    // The server's own device connections: a snapshot read back through the
    // backup pseudo-device equals the volume.
    stack.sanvol_ok(&["snapshot", "create", "m", "s"]);
    let key = control_client::keys::load_private(&stack.admin_key).unwrap();
    let (pinned, _) = control_client::keys::parse_public(pub_path(&stack.mds_key).to_str().unwrap()).unwrap();
    let addr: ControlAddr = stack.mds_addr().parse().unwrap();
    let stream = channel::open_backup(&addr, &key, Some(&pinned), Role::Admin, "test").await.unwrap();
    let snapshot = NbdClient::connect_stream(stream, "m@s", ClientOptions::default()).await.unwrap();
    let volume = NbdClient::connect(&uri, ClientOptions::default()).await.unwrap();
    for offset in (0..128u64 << 20).step_by(16 << 20) {
        assert_eq!(
            snapshot.read(offset, 1 << 20).await.unwrap(),
            volume.read(offset, 1 << 20).await.unwrap(),
            "snapshot and volume differ at {offset}"
        );
    }
    snapshot.disconnect().await;
    volume.disconnect().await;
    agent.detach("m");
}
