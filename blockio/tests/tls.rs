//! NBD over TLS between blockio's own client and server (interop with
//! nbdkit, qemu-nbd and libnbd is in `tests/tests/*_interop.rs`): STARTTLS,
//! certificates checked both ways, and each refusal clear.

use std::path::Path;
use std::sync::Arc;

use blockio::client::{ClientError, ClientOptions, NbdClient};
use blockio::memory::MemoryDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig, ServerTls};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;

const SIZE: u64 = 1 << 20;

/// Serves one memory export on `dir/nbd.sock` with `tls`.
fn serve(dir: &Path, tls: Option<ServerTls>) -> tokio::sync::oneshot::Sender<()> {
    let config = ServerConfig { tls, ..ServerConfig::default() };
    let server = NbdServer::new(Arc::new(ExportTable::single("", Arc::new(MemoryDevice::new(SIZE)))), config);
    let listener = tokio::net::UnixListener::bind(dir.join("nbd.sock")).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .serve_unix(listener, async move {
                let _ = stopped.await;
            })
            .await;
    });
    stop
}

fn uri(dir: &Path, query: &str) -> NbdUri {
    format!("nbds+unix:///?socket={}{query}", dir.join("nbd.sock").display()).parse().unwrap()
}

#[tokio::test]
async fn a_required_tls_connection_carries_io_and_every_refusal_is_clear() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    blockio::tls::make_test_certificates(&pki, &["localhost"]).unwrap();
    let config = blockio::tls::server_from_dir(&pki, false).unwrap();
    let _stop = serve(dir.path(), Some(ServerTls { config, required: true }));

    // TLS with the CA: I/O works.
    let good = uri(dir.path(), &format!("&tls-hostname=localhost&tls-certificates={}", pki.display()));
    let c = NbdClient::connect(&good, ClientOptions::default()).await.expect("TLS connect");
    c.write(4096, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
    assert_eq!(c.read(4096, 8192).await.unwrap(), Bytes::from(vec![7u8; 8192]));
    c.disconnect().await;

    // Without TLS: the server insists.
    let plain = NbdUri::unix(dir.path().join("nbd.sock"), "");
    let e = NbdClient::connect(&plain, ClientOptions::default()).await.err().expect("refused");
    assert!(e.to_string().contains("requires TLS"), "{e}");

    // Another CA: the server's certificate does not verify.
    let other = dir.path().join("other");
    blockio::tls::make_test_certificates(&other, &["localhost"]).unwrap();
    let wrong = uri(dir.path(), &format!("&tls-hostname=localhost&tls-certificates={}", other.display()));
    let e = NbdClient::connect(&wrong, ClientOptions::default()).await.err().expect("refused");
    assert!(matches!(e, ClientError::Tls { .. }) && e.to_string().contains("TLS handshake"), "{e}");

    // The wrong name on the certificate.
    let misnamed = uri(dir.path(), &format!("&tls-hostname=elsewhere&tls-certificates={}", pki.display()));
    assert!(NbdClient::connect(&misnamed, ClientOptions::default()).await.is_err());

    // No CA named, no hostname for a unix socket: said before connecting.
    let e = NbdClient::connect(&uri(dir.path(), "&tls-hostname=localhost"), ClientOptions::default()).await.err();
    assert!(e.unwrap().to_string().contains("add tls-certificates=DIR"));
    let e = NbdClient::connect(&uri(dir.path(), ""), ClientOptions::default()).await.err();
    assert!(e.unwrap().to_string().contains("add tls-hostname=NAME"));
}

#[tokio::test]
async fn offered_tls_is_optional_and_a_server_without_tls_is_refused_by_an_nbds_client() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    blockio::tls::make_test_certificates(&pki, &["localhost"]).unwrap();
    let config = blockio::tls::server_from_dir(&pki, true).unwrap();
    let stop = serve(dir.path(), Some(ServerTls { config, required: false }));
    // Offered, not required: plain clients still get in...
    let plain = NbdUri::unix(dir.path().join("nbd.sock"), "");
    NbdClient::connect(&plain, ClientOptions::default()).await.expect("plain").disconnect().await;
    // ...and TLS clients present their certificate (the server verifies it).
    let good = uri(dir.path(), &format!("&tls-hostname=localhost&tls-certificates={}", pki.display()));
    NbdClient::connect(&good, ClientOptions::default()).await.expect("TLS with a client certificate");
    drop(stop);

    let dir = tempfile::tempdir().unwrap();
    let _stop = serve(dir.path(), None);
    let tls = uri(dir.path(), &format!("&tls-hostname=localhost&tls-certificates={}", pki.display()));
    let e = NbdClient::connect(&tls, ClientOptions::default()).await.err().expect("refused");
    assert!(e.to_string().contains("the server refused TLS"), "{e}");
}
