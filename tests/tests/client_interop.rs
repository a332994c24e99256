//! Our NBD client against real servers: nbdkit (memory, file, and filters
//! that inject errors and delays), qemu-nbd, nbd-server and the `nbd`
//! crate's server (which forces the EXPORT_NAME and simple-reply fallbacks).
//!
//! Each test starts its own peer on a temporary socket; guards kill it even
//! when an assertion fails.

use std::time::{Duration, Instant};

use blockio::client::{ClientError, ClientOptions, NbdClient};
use blockio::proto;
use blockio::{BlockDevice, IoErrorKind, MetaContext, ZeroFlags};
use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use sanvol_tests::peers::{self, Peer};

const MIB: u64 = 1024 * 1024;

fn random_bytes(rng: &mut impl RngCore, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    Bytes::from(v)
}

async fn connect(uri: &blockio::uri::NbdUri, opts: ClientOptions) -> NbdClient {
    NbdClient::connect(uri, opts).await.unwrap_or_else(|e| panic!("connect to {uri}: {e}"))
}

/// Writes 64 random 64 KiB blocks concurrently (all in flight at once),
/// reads them back concurrently and compares; then flush.
async fn write_read_back(client: &NbdClient, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let block = 64 * 1024u32;
    let slots = client.size() / block as u64;
    assert!(slots >= 64, "export too small for the test");
    let blocks: Vec<(u64, Bytes)> =
        (0..64u64).map(|i| (i * (slots / 64) * block as u64, random_bytes(&mut rng, block as usize))).collect();
    let writes = blocks.iter().map(|(off, data)| client.write(*off, data.clone(), false));
    for r in futures::future::join_all(writes).await {
        r.expect("write");
    }
    client.flush().await.expect("flush");
    let reads = blocks.iter().map(|(off, _)| client.read(*off, block));
    for (r, (off, data)) in futures::future::join_all(reads).await.into_iter().zip(&blocks) {
        assert_eq!(r.expect("read"), *data, "data read back at offset {off} differs");
    }
}

/// trim and write_zeroes, then reads that must see zeroes.
async fn zeroing(client: &NbdClient) {
    let len = 128 * 1024u32;
    client.write(0, Bytes::from(vec![0xa5u8; len as usize]), false).await.expect("write");
    client.write_zeroes(0, len, ZeroFlags::default()).await.expect("write_zeroes");
    assert!(client.read(0, len).await.expect("read").iter().all(|&b| b == 0), "write_zeroes left data behind");
    client.write(0, Bytes::from(vec![0x5au8; len as usize]), true).await.expect("write fua");
    client.write_zeroes(0, len, ZeroFlags { may_trim: true, fua: true, ..Default::default() }).await.expect("wz");
    assert!(client.read(0, len).await.expect("read").iter().all(|&b| b == 0));
    client.trim(0, len, false).await.expect("trim");
    client.flush().await.expect("flush");
}

/// Everything a plain data path needs, against any peer.
async fn exercise(client: &NbdClient, seed: u64) {
    write_read_back(client, seed).await;
    zeroing(client).await;
    // Out-of-range and misaligned requests are refused locally.
    let size = client.size();
    assert_eq!(client.read(size, 512).await.unwrap_err().kind, IoErrorKind::Overflow);
    assert_eq!(
        client.write(size - 512, Bytes::from(vec![1u8; 1024]), false).await.unwrap_err().kind,
        IoErrorKind::Overflow
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_full_feature_set() {
    let peer = peers::nbdkit(&["memory", "64M"]);
    let client = connect(&peer.uri(), ClientOptions::default()).await;
    let info = client.info();
    assert_eq!(info.size, 64 * MIB);
    assert!(info.transmission_flags & proto::TFLAG_SEND_FLUSH != 0);
    assert!(client.structured_replies(), "nbdkit supports structured replies");
    assert_eq!(client.meta_contexts(), vec!["base:allocation".to_string()]);
    exercise(&client, 1).await;

    // base:allocation: nbdkit memory reports never-written space as a hole.
    let base = MetaContext::BaseAllocation;
    // write_read_back wrote 64 KiB at each MiB boundary; this is between.
    let far = 40 * MIB + 256 * 1024;
    let span = 512 * 1024u32;
    let ext = client.block_status(&base, far, span).await.expect("block_status");
    assert!(!ext.is_empty() && ext.iter().map(|e| e.length).sum::<u64>() <= span as u64);
    assert_eq!(ext[0].flags & (proto::STATE_HOLE | proto::STATE_ZERO), proto::STATE_HOLE | proto::STATE_ZERO);
    client.write(far, Bytes::from(vec![7u8; 4096]), false).await.unwrap();
    let ext = client.block_status(&base, far, span).await.expect("block_status");
    assert_eq!(ext[0].flags & proto::STATE_HOLE, 0, "written data is not a hole: {ext:?}");
    assert!(ext[0].length >= 4096);
    // A context that was not negotiated is refused, not sent.
    let e = client.block_status(&MetaContext::Custom("x-foo:bar".into()), 0, 4096).await.unwrap_err();
    assert_eq!(e.kind, IoErrorKind::NotSupported);

    // Sparse reads come back as OFFSET_HOLE chunks; the data must be zeroes
    // around the written block, assembled at the right offsets.
    let r = client.read(far - 8192, 16384).await.unwrap();
    assert!(r[..8192].iter().all(|&b| b == 0));
    assert!(r[8192..12288].iter().all(|&b| b == 7));
    assert!(r[12288..].iter().all(|&b| b == 0));

    client.disconnect().await;
    let e = client.read(0, 512).await.unwrap_err();
    assert_eq!(e.kind, IoErrorKind::Shutdown, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_file_plugin_data_lands_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = peers::sparse_file(dir.path(), 16 * MIB);
    let peer = peers::nbdkit(&["file", image.to_str().unwrap()]);
    let client = connect(&peer.uri(), ClientOptions::default()).await;
    assert_eq!(client.size(), 16 * MIB);
    exercise(&client, 2).await;
    let data = Bytes::from((0..65536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    client.write(MIB, data.clone(), true).await.unwrap();
    client.flush().await.unwrap();
    client.disconnect().await;
    let file = peers::read_file(&image);
    assert_eq!(&file[MIB as usize..MIB as usize + 65536], &data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_servers_maximum_are_split() {
    // The policy filter advertises a 64 KiB maximum and fails anything
    // bigger, so only a client that splits can pass.
    let peer = peers::nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "16M",
        "blocksize-maximum=65536",
        "blocksize-preferred=4096",
        "blocksize-minimum=512",
        "blocksize-error-policy=error",
    ]);
    let client = connect(&peer.uri(), ClientOptions::default()).await;
    assert_eq!(client.block_sizes().maximum, 65536);
    assert_eq!(client.block_sizes().minimum, 512);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let data = random_bytes(&mut rng, 3 * MIB as usize + 4096);
    client.write(4096, data.clone(), false).await.expect("split write");
    assert_eq!(client.read(4096, data.len() as u32).await.expect("split read"), data);
    // Minimum block size is enforced locally.
    assert_eq!(client.read(100, 512).await.unwrap_err().kind, IoErrorKind::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_when_the_server_allows_them() {
    let peer = peers::nbdkit(&["memory", "64M"]);
    let opts = ClientOptions { connections: 4, ..ClientOptions::default() };
    let client = connect(&peer.uri(), opts.clone()).await;
    assert!(client.can_multi_conn());
    assert_eq!(client.connection_count(), 4);
    write_read_back(&client, 4).await;
    client.disconnect().await;

    // The same server told to deny multi-conn: fall back to one connection.
    let peer = peers::nbdkit(&["--filter=multi-conn", "memory", "64M", "multi-conn-mode=disable"]);
    let client = connect(&peer.uri(), opts).await;
    assert!(!client.can_multi_conn());
    assert_eq!(client.connection_count(), 1);
    write_read_back(&client, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_over_tcp() {
    let peer = peers::nbdkit_tcp(&["memory", "32M"]);
    let client = connect(&peer.uri(), ClientOptions { connections: 2, ..Default::default() }).await;
    assert_eq!(client.connection_count(), 2);
    write_read_back(&client, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_raw_file() {
    let peer: Peer = peers::qemu_nbd(32 * MIB, "vol0", &["--allocation-depth"]);
    let opts = ClientOptions {
        meta_contexts: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
        ..ClientOptions::default()
    };
    let client = connect(&peer.uri(), opts).await;
    assert_eq!(client.info().name, "vol0");
    assert_eq!(client.size(), 32 * MIB);
    let mut agreed = client.meta_contexts();
    agreed.sort();
    assert_eq!(agreed, vec!["base:allocation".to_string(), "qemu:allocation-depth".to_string()]);
    exercise(&client, 7).await;
    // Both contexts answer; a custom one works like base:allocation.
    let depth = client.block_status(&MetaContext::Custom("qemu:allocation-depth".into()), 0, MIB as u32).await;
    assert!(!depth.expect("qemu:allocation-depth").is_empty());
    let base = client.block_status(&MetaContext::BaseAllocation, 0, MIB as u32).await.expect("base");
    assert!(base.iter().map(|e| e.length).sum::<u64>() <= MIB);

    let exports = NbdClient::list_exports(&peer.uri(), Duration::from_secs(5)).await.expect("list");
    assert_eq!(exports.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["vol0"]);

    // Unknown export: the server's refusal is reported with the name.
    let e = NbdClient::connect(&peer.uri_for("nope"), ClientOptions::default()).await.err().expect("must fail");
    let msg = e.to_string();
    assert!(
        matches!(e, ClientError::Refused { .. }) && msg.contains("ERR_UNKNOWN") && msg.contains("\"nope\""),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_server_reference_implementation() {
    let peer = peers::nbd_server(16 * MIB, "disk");
    let client = connect(&peer.uri(), ClientOptions::default()).await;
    assert_eq!(client.size(), 16 * MIB);
    assert!(client.info().transmission_flags & proto::TFLAG_SEND_TRIM != 0);
    exercise(&client, 8).await;
    client.disconnect().await;

    // nbd-server -d serves one connection per process: a fresh one to list.
    let peer = peers::nbd_server(16 * MIB, "disk");
    let exports = NbdClient::list_exports(&peer.uri(), Duration::from_secs(5)).await.expect("list");
    assert!(exports.iter().any(|(n, _)| n == "disk"), "{exports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_nbd_crate_server_needs_export_name_fallback() {
    let server = peers::RustNbdServer::start(8 * MIB);
    let client = connect(&server.uri(), ClientOptions::default()).await;
    assert_eq!(client.size(), 8 * MIB);
    assert!(!client.structured_replies(), "the nbd crate refuses structured replies");
    assert!(client.meta_contexts().is_empty());
    write_read_back(&client, 9).await;
    // No WRITE_ZEROES on this server: the client emulates it with writes.
    client.write(0, Bytes::from(vec![9u8; 8192]), false).await.unwrap();
    client.write_zeroes(0, 8192, ZeroFlags::default()).await.unwrap();
    assert!(client.read(0, 8192).await.unwrap().iter().all(|&b| b == 0));
    // Block status needs structured replies: refused locally.
    let e = client.block_status(&MetaContext::BaseAllocation, 0, 4096).await.unwrap_err();
    assert_eq!(e.kind, IoErrorKind::NotSupported);
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_server_fails_every_in_flight_request_promptly() {
    // Reads stall in the server for 60 s, so all 32 are surely in flight;
    // enough server threads that an undelayed write is not stuck behind them.
    let mut peer = peers::nbdkit(&["--threads=64", "--filter=delay", "memory", "16M", "rdelay=60"]);
    let client = connect(&peer.uri(), ClientOptions::default()).await;
    let reads: Vec<_> = (0..32u64)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    // Wait (bounded) until all 32 are registered and queued, then
    // round-trip an undelayed write: it is queued behind the reads, so its
    // reply proves the server has read every one of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.in_flight() < 32 {
        assert!(Instant::now() < deadline, "reads never got in flight: {}", client.in_flight());
        tokio::task::yield_now().await;
    }
    client.write(MIB, Bytes::from(vec![1u8; 4096]), false).await.expect("undelayed write");
    assert_eq!(client.in_flight(), 32, "the delayed reads must still be in flight");
    let killed_at = Instant::now();
    peer.kill();
    for r in reads {
        let r = tokio::time::timeout(Duration::from_secs(5), r).await.expect("an in-flight read hung").unwrap();
        let e = r.expect_err("read must fail when the server dies");
        assert!(matches!(e.kind, IoErrorKind::Shutdown | IoErrorKind::Io), "{e}");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(5));
    // Later requests fail at once, too.
    let later = tokio::time::timeout(Duration::from_secs(1), client.write(0, Bytes::from(vec![0u8; 512]), false))
        .await
        .expect("a request after the peer died hung");
    let e = later.expect_err("write after death");
    assert!(matches!(e.kind, IoErrorKind::Shutdown | IoErrorKind::Io), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_fires_against_a_stalled_server() {
    let peer = peers::nbdkit(&["--filter=delay", "memory", "16M", "rdelay=30"]);
    let opts = ClientOptions { request_timeout: Some(Duration::from_millis(300)), ..ClientOptions::default() };
    let client = connect(&peer.uri(), opts).await;
    let started = Instant::now();
    let e = client.read(0, 4096).await.expect_err("the read must time out");
    assert_eq!(e.kind, IoErrorKind::Io);
    assert!(e.message.contains("timed out"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "timeout took {:?}", started.elapsed());
    // The connection survives: undelayed requests still work.
    client.write(0, Bytes::from(vec![3u8; 4096]), false).await.expect("write after a timeout");
    client.flush().await.expect("flush after a timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_replies_become_io_errors() {
    let peer = peers::nbdkit(&["--filter=error", "memory", "16M", "error-pread=EIO", "error-pread-rate=100%"]);
    let client = connect(&peer.uri(), ClientOptions::default()).await;
    let e = client.read(0, 4096).await.expect_err("injected EIO");
    assert_eq!(e.kind, IoErrorKind::Io, "{e}");
    assert!(e.message.contains("READ"), "{e}");
    // Errors are per request: writes still work and the connection lives.
    client.write(0, Bytes::from(vec![1u8; 4096]), false).await.expect("write");
    let e = client.read(4096, 4096).await.unwrap_err();
    assert_eq!(e.kind, IoErrorKind::Io);

    let peer = peers::nbdkit(&["--filter=error", "memory", "16M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%"]);
    let client = connect(&peer.uri(), ClientOptions::default()).await;
    let e = client.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap_err();
    assert_eq!(e.kind, IoErrorKind::NoSpace, "{e}");

    // Same with simple replies only.
    let opts = ClientOptions { structured_replies: false, ..ClientOptions::default() };
    let peer = peers::nbdkit(&["--filter=error", "memory", "16M", "error-pread=EPERM", "error-pread-rate=100%"]);
    let client = connect(&peer.uri(), opts).await;
    assert!(!client.structured_replies());
    assert_eq!(client.read(0, 4096).await.unwrap_err().kind, IoErrorKind::PermissionDenied);
    client.write(0, Bytes::from(vec![1u8; 4096]), false).await.expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_exports_and_connect_errors() {
    let peer = peers::nbdkit(&["memory", "1M"]);
    let exports = NbdClient::list_exports(&peer.uri(), Duration::from_secs(5)).await.expect("list");
    assert_eq!(exports.len(), 1, "{exports:?}");

    // An nbds URI without a CA to trust is refused before connecting.
    let tls: blockio::uri::NbdUri =
        format!("nbds+unix:///?socket={}&tls-hostname=localhost", peer.dir().join("nbd.sock").display())
            .parse()
            .unwrap();
    let e = NbdClient::connect(&tls, ClientOptions::default()).await.err().unwrap();
    assert!(matches!(e, ClientError::Tls { .. }) && e.to_string().contains("tls-certificates"), "{e}");

    let missing = blockio::uri::NbdUri::unix(peer.dir().join("no-such.sock"), "");
    let e = NbdClient::connect(&missing, ClientOptions::default()).await.err().unwrap();
    assert!(matches!(e, ClientError::Connect { .. }) && e.to_string().contains("no-such.sock"), "{e}");

    // Simple replies on request, and a structured-reply peer still works.
    let opts = ClientOptions { structured_replies: false, meta_contexts: vec![], ..Default::default() };
    let client = connect(&peer.uri(), opts).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let data = random_bytes(&mut rng, 8192);
    client.write(8192, data.clone(), false).await.unwrap();
    assert_eq!(client.read(8192, 8192).await.unwrap(), data);
    let _ = rng.gen::<u8>();
}

// ---- NBD over TLS (STARTTLS), X.509 certificates ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_nbdkit_requiring_it() {
    let pki = peers::TestPki::new();
    let certs = format!("--tls-certificates={}", pki.path().display());
    let peer = peers::nbdkit(&["--tls=require", &certs, "memory", "8M"]);
    let client = connect(&pki.tls_uri(&peer.uri()), ClientOptions { connections: 2, ..Default::default() }).await;
    write_read_back(&client, 71).await;
    client.disconnect().await;

    // Without TLS nbdkit answers every option with ERR_TLS_REQD.
    let e = NbdClient::connect(&peer.uri(), ClientOptions::default()).await.err().expect("refused");
    assert!(e.to_string().contains("ERR_TLS_REQD"), "{e}");

    // nbdkit checking client certificates too (ours is in the directory).
    let verifying = peers::nbdkit(&["--tls=require", &certs, "--tls-verify-peer", "memory", "8M"]);
    let client = connect(&pki.tls_uri(&verifying.uri()), ClientOptions::default()).await;
    write_read_back(&client, 72).await;
    client.disconnect().await;

    // Over TCP, where the server name is the URI's host.
    let tcp = peers::nbdkit_tcp(&["--tls=require", &certs, "memory", "8M"]);
    let mut uri = pki.tls_uri(&tcp.uri());
    if let blockio::uri::Transport::Tcp { host, .. } = &mut uri.transport {
        *host = "localhost".into();
    }
    let client = connect(&uri, ClientOptions::default()).await;
    write_read_back(&client, 73).await;
    client.disconnect().await;

    // A CA that did not sign nbdkit's certificate: the handshake fails.
    let other = peers::TestPki::new();
    let e = NbdClient::connect(&other.tls_uri(&peer.uri()), ClientOptions::default()).await.err().expect("refused");
    assert!(matches!(e, ClientError::Tls { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_qemu_nbd_with_x509_credentials() {
    let pki = peers::TestPki::new();
    // qemu's server credentials verify the client's certificate by default.
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", pki.path().display());
    let peer = peers::qemu_nbd(8 * MIB, "disk", &["--object", &creds, "--tls-creds", "tls0"]);
    let client = connect(&pki.tls_uri(&peer.uri()), ClientOptions::default()).await;
    assert_eq!(client.size(), 8 * MIB);
    write_read_back(&client, 74).await;
    client.disconnect().await;
    let e = NbdClient::connect(&peer.uri(), ClientOptions::default()).await.err().expect("refused");
    assert!(e.to_string().contains("TLS"), "{e}");
}
