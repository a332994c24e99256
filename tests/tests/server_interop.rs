//! Our NBD server against real NBD clients: libnbd's tools (nbdinfo,
//! nbdcopy), QEMU (qemu-img, qemu-io), fio's nbd engine and the `nbd`
//! crate's client. The server runs in-process; each tool is a real process.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use blockio::file::FileDevice;
use blockio::memory::MemoryDevice;
use blockio::server::{Export, ExportTable, ServerConfig};
use blockio::BlockDevice;
use bytes::Bytes;
use sanvol_tests::tools::{pattern, run_tool, ServedExports};

const MIB: u64 = 1024 * 1024;

/// A table with a writable default export `disk` of `size` bytes.
fn disk(size: u64) -> (Arc<MemoryDevice>, Arc<ExportTable>) {
    let device = Arc::new(MemoryDevice::new(size));
    let table = ExportTable::single("disk", device.clone());
    (device, Arc::new(table))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_list_and_map() {
    let (device, table) = disk(4 * MIB);
    table.insert(Export {
        name: "second".into(),
        description: "the second export".into(),
        device: Arc::new(MemoryDevice::new(MIB)),
        read_only: true,
    });
    // Data in [1 MiB, 1 MiB + 128 KiB), holes elsewhere.
    device.write(MIB, Bytes::from(pattern(128 * 1024, 1)), false).await.unwrap();
    let srv = ServedExports::unix(table).await;

    let info = run_tool("nbdinfo", &["--json", &srv.uri("disk")]).await.success();
    let json: serde_json::Value = serde_json::from_str(&info.stdout()).expect("nbdinfo --json output");
    let export = &json["exports"][0];
    assert_eq!(export["export-size"], 4 * MIB, "{json}");
    assert_eq!(export["is_read_only"], false, "{json}");
    assert_eq!(export["can_flush"], true, "{json}");
    assert_eq!(export["can_trim"], true, "{json}");
    assert_eq!(export["can_zero"], true, "{json}");
    assert_eq!(export["can_multi_conn"], true, "{json}");
    assert_eq!(json["protocol"], "newstyle-fixed", "{json}");
    let contexts = export["contexts"].to_string();
    assert!(contexts.contains("base:allocation"), "{json}");

    let list = run_tool("nbdinfo", &["--list", &srv.uri("")]).await.success().stdout();
    assert!(list.contains("export=\"disk\"") || list.contains("export=disk"), "{list}");
    assert!(list.contains("second"), "{list}");
    assert!(list.contains("the second export"), "{list}");

    let map = run_tool("nbdinfo", &["--map", &srv.uri("disk")]).await.success().stdout();
    let rows: Vec<(u64, u64, String)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3..].join(" "))
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, MIB, "hole,zero".to_string()),
            (MIB, 128 * 1024, "data".to_string()),
            (MIB + 128 * 1024, 3 * MIB - 128 * 1024, "hole,zero".to_string()),
        ],
        "{map}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_in_and_out() {
    let size = 8 * MIB;
    let (device, table) = disk(size);
    let srv = ServedExports::unix(table).await;
    // A sparse source file: data at both ends, a hole in the middle.
    let src = srv.path("src.img");
    let mut content = vec![0u8; size as usize];
    content[..MIB as usize].copy_from_slice(&pattern(MIB as usize, 7));
    content[(size - MIB) as usize..].copy_from_slice(&pattern(MIB as usize, 9));
    std::fs::write(&src, &content).unwrap();

    run_tool("nbdcopy", &[src.to_str().unwrap(), &srv.uri("disk")]).await.success();
    assert!(device.read(0, size as u32).await.unwrap() == content, "device differs after nbdcopy in");

    let dst = srv.path("dst.img");
    run_tool("nbdcopy", &[&srv.uri("disk"), dst.to_str().unwrap()]).await.success();
    assert!(std::fs::read(&dst).unwrap() == content, "file differs after nbdcopy out");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare() {
    let size = 4 * MIB;
    let (device, table) = disk(size);
    let srv = ServedExports::unix(table).await;
    let src = srv.path("src.img");
    let mut content = pattern(size as usize, 3);
    content[MIB as usize..2 * MIB as usize].fill(0);
    std::fs::write(&src, &content).unwrap();
    let uri = srv.uri("disk");

    run_tool("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri]).await.success();
    assert!(device.read(0, size as u32).await.unwrap() == content, "device differs after qemu-img convert");
    run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &uri]).await.success();

    // A changed byte must be noticed (exit status 1: images differ).
    device.write(3 * MIB + 5, Bytes::from_static(b"!"), false).await.unwrap();
    let differ = run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &uri]).await;
    assert_eq!(differ.output.status.code(), Some(1), "{}\n{}", differ.stdout(), differ.stderr());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_pattern_writes_and_reads() {
    let (device, table) = disk(16 * MIB);
    let srv = ServedExports::unix(table).await.with_tcp().await;
    for uri in [srv.uri("disk"), srv.tcp_uri("disk")] {
        let run = run_tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri,
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0xcd 1M 1M",
                "-c",
                "write -z 64k 64k",
                "-c",
                "flush",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "read -P 0 64k 64k",
                "-c",
                "read -P 0xcd 1M 1M",
                "-c",
                "discard 1M 512k",
                "-c",
                "read -P 0 1M 512k",
            ],
        )
        .await
        .success();
        let out = run.stdout();
        assert!(!out.contains("Pattern verification failed") && !out.contains("failed"), "{out}\n{}", run.stderr());
    }
    assert_eq!(device.read(0, 4).await.unwrap(), vec![0xab; 4]);

    // The check can fail: a wrong pattern is reported.
    let bad = run_tool("qemu-io", &["-f", "raw", &srv.uri("disk"), "-c", "read -P 0x11 0 4k"]).await;
    assert!(bad.stdout().contains("Pattern verification failed"), "{}\n{}", bad.stdout(), bad.stderr());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_crc32c() {
    let (_device, table) = disk(64 * MIB);
    let srv = ServedExports::unix(table).await;
    fio_verify(&srv.uri("disk")).await;
    srv.stop().await;
}

/// fio writes 32 MiB at random (4 KiB, 16 in flight) with crc32c checksums
/// and reads every block back, failing on the first mismatch.
async fn fio_verify(uri: &str) {
    let run = run_tool(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    )
    .await
    .success();
    let out = run.stdout();
    let json_start = out.find('{').unwrap_or_else(|| panic!("no JSON from fio:\n{out}\n{}", run.stderr()));
    let json: serde_json::Value = serde_json::from_str(&out[json_start..]).expect("fio JSON");
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 32 * MIB, "{job}");
    assert_eq!(job["read"]["io_bytes"], 32 * MIB, "verification must read everything back: {job}");
}

/// Connection threads (`ServerConfig::connection_threads`) against real
/// clients: fio's verify on a file device (whose calls then run in place on
/// the threads) over unix, QEMU's pattern checks over unix and TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_threads_against_fio_verify_and_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(FileDevice::create(dir.path().join("disk.img"), 64 * MIB).unwrap());
    let table = Arc::new(ExportTable::single("disk", file.clone()));
    let config = ServerConfig { connection_threads: 2, ..ServerConfig::default() };
    let srv = ServedExports::unix_with(table, config).await.with_tcp().await;
    fio_verify(&srv.uri("disk")).await;
    for uri in [srv.uri("disk"), srv.tcp_uri("disk")] {
        let commands =
            ["write -P 0x5a 40M 1M", "write -z 41M 64k", "flush", "read -P 0x5a 40M 1M", "read -P 0 41M 64k"];
        let mut args = vec!["-f", "raw", uri.as_str()];
        for c in &commands {
            args.extend(["-c", c]);
        }
        let run = run_tool("qemu-io", &args).await.success();
        assert!(!run.stdout().contains("failed"), "{}\n{}", run.stdout(), run.stderr());
    }
    // The bytes are in the file itself.
    assert_eq!(file.read(40 * MIB, 4).await.unwrap(), vec![0x5a; 4]);
    let bad = run_tool("qemu-io", &["-f", "raw", &srv.uri("disk"), "-c", "read -P 0x11 40M 4k"]).await;
    assert!(bad.stdout().contains("Pattern verification failed"), "{}\n{}", bad.stdout(), bad.stderr());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_crate_client_over_unix_and_tcp() {
    let (device, table) = disk(2 * MIB);
    let srv = ServedExports::unix(table).await.with_tcp().await;
    let socket = srv.socket.clone();
    let port = srv.tcp_port.unwrap();
    let unix = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        let export = nbd::client::handshake(&mut s, b"disk").expect("handshake");
        assert_eq!(export.size, 2 * MIB);
        assert!(!export.readonly);
        assert!(export.send_flush && export.send_trim);
        let mut c = nbd::client::NbdClient::new(&mut s, &export);
        let data = pattern(192 * 1024, 5);
        c.seek(SeekFrom::Start(4096)).unwrap();
        c.write_all(&data).unwrap();
        c.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        c.seek(SeekFrom::Start(4096)).unwrap();
        c.read_exact(&mut back).unwrap();
        assert!(back == data, "read back differs");
    });
    unix.await.unwrap();
    assert!(device.read(4096, 192 * 1024).await.unwrap() == pattern(192 * 1024, 5));

    let tcp = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        // The default export, by its empty name.
        let export = nbd::client::handshake(&mut s, b"").expect("handshake");
        let mut c = nbd::client::NbdClient::new(&mut s, &export);
        let mut back = vec![0u8; 512];
        c.seek(SeekFrom::Start(4096)).unwrap();
        c.read_exact(&mut back).unwrap();
        back
    });
    assert_eq!(tcp.await.unwrap(), pattern(192 * 1024, 5)[..512]);
    srv.stop().await;
}

// ---- NBD over TLS: our server requiring TLS, real TLS clients ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_nbdinfo_and_qemu_img_against_our_server() {
    let pki = sanvol_tests::peers::TestPki::new();
    let (device, table) = disk(4 * MIB);
    device.write(0, Bytes::from(pattern(64 * 1024, 3)), false).await.unwrap();
    let config = blockio::tls::server_from_dir(pki.path(), false).unwrap();
    let srv = ServedExports::unix_with(
        table,
        blockio::server::ServerConfig {
            tls: Some(blockio::server::ServerTls { config, required: true }),
            ..Default::default()
        },
    )
    .await;
    let tls_uri = format!("{}&tls-certificates={}&tls-hostname=localhost", srv.uri("disk"), pki.path().display())
        .replacen("nbd+unix://", "nbds+unix://", 1);

    // libnbd (nbdinfo) over TLS.
    let info = run_tool("nbdinfo", &["--json", &tls_uri]).await.success();
    let json: serde_json::Value = serde_json::from_str(&info.stdout()).expect("nbdinfo --json output");
    assert_eq!(json["exports"][0]["export-size"], 4 * MIB, "{json}");
    // ...and refused without it.
    let plain = run_tool("nbdinfo", &[&srv.uri("disk")]).await;
    assert!(!plain.output.status.success(), "a plain client got in: {}", plain.stdout());

    // QEMU over TLS: read the pattern back through qemu-img.
    let out = srv.path("copy.raw");
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.path().display());
    let source = format!("driver=nbd,path={},export=disk,tls-creds=tls0,tls-hostname=localhost", srv.socket.display());
    run_tool("qemu-img", &["convert", "--object", &creds, "--image-opts", &source, "-O", "raw", out.to_str().unwrap()])
        .await
        .success();
    let copied = std::fs::read(&out).unwrap();
    assert_eq!(copied.len() as u64, 4 * MIB);
    assert_eq!(&copied[..64 * 1024], &pattern(64 * 1024, 3)[..]);
    srv.stop().await;
}
