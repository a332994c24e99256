//! The counts and the socket that polling before parking goes by
//! (`blockio::park_poll`), kept by a real NBD server and client over a unix
//! socket: one request each way while one read is held, three while three
//! are, none once they are answered; the socket noted after a reply, and
//! taken by the hook.
//!
//! Its own test binary: the counts are process-wide.

mod server_common;

use std::sync::Arc;
use std::time::Duration;

use blockio::client::{ClientOptions, NbdClient};
use blockio::park_poll;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::BlockDevice;
use server_common::gated::GatedDevice;

#[tokio::test]
async fn a_server_and_a_client_count_their_requests_and_note_the_socket_to_poll() {
    park_poll::set_window(Duration::from_millis(1));
    let device = GatedDevice::new();
    let server = NbdServer::new(Arc::new(ExportTable::single("g", device.clone())), ServerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("g.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move { server.serve_unix(listener, std::future::pending()).await });
    let uri = format!("nbd+unix:///g?socket={}", socket.display()).parse().unwrap();
    let client = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await.unwrap());

    assert_eq!(park_poll::in_flight(), (0, 0));
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.read(0, 4096).await }
    });
    device.wait_active(1).await;
    assert_eq!(park_poll::in_flight(), (1, 1), "one read held: one request each way");
    let more: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.read(0, 4096).await })
        })
        .collect();
    device.wait_active(3).await;
    assert_eq!(park_poll::in_flight(), (3, 3), "three reads held: a deeper queue, which never polls");
    device.gate.add_permits(3);
    first.await.unwrap().unwrap();
    for read in more {
        read.await.unwrap().unwrap();
    }
    assert_eq!(park_poll::in_flight(), (0, 0), "every request answered");

    // A reply written notes its connection's socket: the next request comes there.
    client.read(4096, 4096).await.unwrap();
    assert!(park_poll::expected().is_some(), "no socket noted after a reply");
    // The hook polls it (the client sends nothing: the whole 1 ms window), once.
    park_poll::before_park();
    assert_eq!(park_poll::expected(), None, "the hook takes the socket it polled");
}
