//! `sanvol pool init` and `sanvol keygen` as real processes, against NBD
//! devices served in-process (memory devices, and a file device holding an
//! ext4 filesystem made by mkfs.ext4).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use blockio::client::{ClientOptions, NbdClient};
use blockio::file::FileDevice;
use blockio::memory::MemoryDevice;
use blockio::BlockDevice;
use common::{key, run, Devices, MIB};

fn init_cmd(dir: &std::path::Path, uris: &[String], extra: &[&str]) -> tokio::process::Command {
    let server = dir.join("mds.key.pub");
    let admin = dir.join("admin.key.pub");
    if !server.exists() {
        key(dir, "mds");
        key(dir, "admin");
    }
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_sanvol"));
    c.args(["pool", "init", "--name", "test", "--extent-size", "1M"]);
    for u in uris {
        c.arg("--device").arg(u);
    }
    c.arg("--server-key").arg(server).arg("--admin-key").arg(admin).args(extra).kill_on_drop(true);
    c
}

async fn first_block(uri: &str) -> Vec<u8> {
    let client = NbdClient::connect(&uri.parse().unwrap(), ClientOptions::default()).await.unwrap();
    let b = client.read(0, 4096).await.unwrap().to_vec();
    client.disconnect().await;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_labels_blank_devices_and_refuses_labelled_ones_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let devices = Devices::memory(dir.path(), 3, 64 * MIB).await;
    let (ok, out, err) = run(&mut init_cmd(dir.path(), &devices.uris, &[])).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("pool test") && out.contains("METADATA"), "{out}");
    for uri in &devices.uris {
        let label = volume_format::DeviceLabel::decode(&first_block(uri).await).expect("labelled");
        assert_eq!(label.layout.extent_bytes, MIB);
    }

    let (ok, out, err) = run(&mut init_cmd(dir.path(), &devices.uris, &[])).await;
    assert!(!ok, "{out}");
    assert!(err.contains("carries a sanvol label") && err.contains("use --force"), "{err}");
    assert!(err.contains(&devices.uris[0]), "names the device: {err}");

    let (ok, out, err) = run(&mut init_cmd(dir.path(), &devices.uris, &["--force"])).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("overwrote a sanvol label"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refuses_a_device_with_a_filesystem_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ext4.img");
    std::fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    let status = std::process::Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&image).status().expect("mkfs.ext4");
    assert!(status.success());
    let devices = Devices::serve(
        dir.path(),
        vec![
            Arc::new(MemoryDevice::new(64 * MIB)) as Arc<dyn BlockDevice>,
            Arc::new(FileDevice::open(&image, false).unwrap()),
        ],
    )
    .await;
    let (ok, out, err) = run(&mut init_cmd(dir.path(), &devices.uris, &[])).await;
    assert!(!ok, "{out}");
    let expected =
        format!("device {} carries an ext4 filesystem (blkid); use --force to overwrite it", devices.uris[1]);
    assert!(err.contains(&expected), "{err}");
    assert!(first_block(&devices.uris[0]).await.iter().all(|&b| b == 0), "the blank device was not touched");

    let (ok, out, err) = run(&mut init_cmd(dir.path(), &devices.uris, &["--force"])).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("overwrote an ext4 filesystem"), "{out}");
    assert!(volume_format::DeviceLabel::decode(&first_block(&devices.uris[1]).await).is_ok());
}

#[tokio::test]
async fn keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_sanvol"));
    let (ok, out, err) = run(c.arg("keygen").arg(&path).args(["--comment", "me@host"])).await;
    assert!(ok, "{err}");
    assert!(out.contains("sanvol-ed25519 ") && out.contains("me@host"), "{out}");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_sanvol"));
    let (ok, _, err) = run(c.arg("keygen").arg(&path)).await;
    assert!(!ok && err.contains("refusing to overwrite"), "{err}");
}
