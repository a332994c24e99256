//! Malformed and hostile input: the server answers with the error the spec
//! prescribes, or closes the connection cleanly, and never panics; other
//! connections keep being served.

mod server_common;

use std::sync::Arc;

use blockio::memory::MemoryDevice;
use blockio::proto::{self, errno, RequestHeader};
use blockio::server::{Export, ExportTable, NbdServer, ServerConfig, ServerError};
use server_common::{connect, server, RawClient};
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 1 << 20;

fn table() -> Arc<ExportTable> {
    let t = ExportTable::single("disk", Arc::new(MemoryDevice::new(SIZE)));
    t.insert(Export {
        name: "ro".into(),
        description: "read-only disk".into(),
        device: Arc::new(MemoryDevice::new(SIZE)),
        read_only: true,
    });
    Arc::new(t)
}

async fn ready(structured: bool) -> (RawClient, tokio::task::JoinHandle<Result<(), ServerError>>) {
    let srv = server(table());
    let (mut c, task) = connect(&srv);
    c.handshake(structured, if structured { &["base:allocation"] } else { &[] }).await;
    (c, task)
}

#[tokio::test]
async fn unknown_client_flags_close_the_connection() {
    let (mut c, task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | 0x80).await;
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::UnknownClientFlags { flags: 0x81 })));
}

#[tokio::test]
async fn bad_option_magic_closes() {
    let (mut c, task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.io.write_all(&[0xde; 16]).await.unwrap();
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::BadOptionMagic { .. })));
}

#[tokio::test]
async fn huge_option_length_closes_without_allocating() {
    let (mut c, task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.io.write_all(&b).await.unwrap();
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::OptionTooLong { length: u32::MAX, .. })));
}

#[tokio::test]
async fn truncated_handshake_is_an_error_not_a_panic() {
    for cut in [0usize, 2, 9, 14, 17] {
        let (mut c, task) = connect(&server(table()));
        c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        b.extend_from_slice(&10u32.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        c.io.write_all(&b[..cut.min(b.len())]).await.unwrap();
        c.io.shutdown().await.unwrap();
        drop(c);
        assert!(matches!(task.await.unwrap(), Err(ServerError::Io { .. })), "cut at {cut}");
    }
}

#[tokio::test]
async fn option_errors_leave_the_handshake_usable() {
    let (mut c, task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    let reply = |r: Vec<server_common::OptReply>| r.last().unwrap().reply_type;
    assert_eq!(reply(c.option(999, b"whatever").await), proto::REP_ERR_UNSUP);
    assert_eq!(reply(c.option(proto::OPT_STARTTLS, &[]).await), proto::REP_ERR_POLICY);
    assert_eq!(reply(c.option(proto::OPT_EXTENDED_HEADERS, &[]).await), proto::REP_ERR_UNSUP);
    assert_eq!(reply(c.option(proto::OPT_LIST, b"x").await), proto::REP_ERR_INVALID);
    assert_eq!(reply(c.option(proto::OPT_STRUCTURED_REPLY, b"x").await), proto::REP_ERR_INVALID);
    // Metadata contexts need structured replies first.
    let meta = RawClient::meta_data("", &["base:allocation"]);
    assert_eq!(reply(c.option(proto::OPT_SET_META_CONTEXT, &meta).await), proto::REP_ERR_INVALID);
    // GO: name length beyond the data, trailing garbage, unknown export.
    let mut bad = RawClient::go_data("disk", &[]);
    bad[3] = 200;
    assert_eq!(reply(c.option(proto::OPT_GO, &bad).await), proto::REP_ERR_INVALID);
    let mut trailing = RawClient::go_data("disk", &[]);
    trailing.push(1);
    assert_eq!(reply(c.option(proto::OPT_INFO, &trailing).await), proto::REP_ERR_INVALID);
    assert_eq!(reply(c.option(proto::OPT_INFO, &RawClient::go_data("nope", &[])).await), proto::REP_ERR_UNKNOWN);
    assert_eq!(reply(c.option(proto::OPT_GO, &[0, 0]).await), proto::REP_ERR_INVALID);

    // Still negotiable after all that.
    let list = c.option(proto::OPT_LIST, &[]).await;
    let names: Vec<String> = list
        .iter()
        .filter(|r| r.reply_type == proto::REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["disk", "ro"]);
    let info = c.option(proto::OPT_INFO, &RawClient::go_data("ro", &[proto::INFO_NAME, proto::INFO_DESCRIPTION])).await;
    assert_eq!(info.last().unwrap().reply_type, proto::REP_ACK);
    let desc = info.iter().find(|r| r.data.starts_with(&proto::INFO_DESCRIPTION.to_be_bytes())).unwrap();
    assert_eq!(&desc.data[2..], b"read-only disk");
    let (size, flags) = c.go("").await.unwrap();
    assert_eq!(size, SIZE);
    assert_eq!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_ne!(flags & proto::TFLAG_SEND_TRIM, 0);
    assert_eq!(flags & proto::TFLAG_SEND_DF, 0, "DF needs structured replies");
    let r = c.write(0, b"hello", false).await;
    assert_eq!(r.error, 0);
    assert_eq!(c.read(0, 5).await.data, b"hello");
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn meta_context_queries() {
    let (mut c, _task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.structured_reply().await;
    let names = |r: &[server_common::OptReply]| -> Vec<String> {
        r.iter()
            .filter(|r| r.reply_type == proto::REP_META_CONTEXT)
            .map(|r| String::from_utf8(r.data[4..].to_vec()).unwrap())
            .collect()
    };
    let all = c.option(proto::OPT_LIST_META_CONTEXT, &RawClient::meta_data("disk", &[])).await;
    assert_eq!(names(&all), ["base:allocation"]);
    let ns = c.option(proto::OPT_LIST_META_CONTEXT, &RawClient::meta_data("disk", &["base:"])).await;
    assert_eq!(names(&ns), ["base:allocation"]);
    let other = c.option(proto::OPT_LIST_META_CONTEXT, &RawClient::meta_data("disk", &["x-foo:bar"])).await;
    assert_eq!(names(&other), Vec::<String>::new());
    assert_eq!(other.last().unwrap().reply_type, proto::REP_ACK);
    // "base:" selects nothing in SET.
    let set = c.option(proto::OPT_SET_META_CONTEXT, &RawClient::meta_data("disk", &["base:"])).await;
    assert_eq!(names(&set), Vec::<String>::new());
    let nocolon = c.option(proto::OPT_SET_META_CONTEXT, &RawClient::meta_data("disk", &["nocolon"])).await;
    assert_eq!(nocolon.last().unwrap().reply_type, proto::REP_ERR_INVALID);
    let mut truncated = RawClient::meta_data("disk", &["base:allocation"]);
    truncated.pop();
    let t = c.option(proto::OPT_SET_META_CONTEXT, &truncated).await;
    assert_eq!(t.last().unwrap().reply_type, proto::REP_ERR_INVALID);
    let mut many = RawClient::meta_data("disk", &[]);
    many[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    let m = c.option(proto::OPT_SET_META_CONTEXT, &many).await;
    assert_eq!(m.last().unwrap().reply_type, proto::REP_ERR_TOO_BIG);
    let set = c
        .option(proto::OPT_SET_META_CONTEXT, &RawClient::meta_data("disk", &["base:allocation", "base:allocation"]))
        .await;
    assert_eq!(names(&set), ["base:allocation"]);
    let id = u32::from_be_bytes(set[0].data[0..4].try_into().unwrap());
    c.go("disk").await.unwrap();
    let r = c.request(0, proto::CMD_BLOCK_STATUS, 0, SIZE as u32, &[]).await;
    assert_eq!(r.error, 0);
    assert_eq!(r.status, vec![(id, vec![(SIZE as u32, proto::STATE_HOLE | proto::STATE_ZERO)])]);
}

#[tokio::test]
async fn export_name_for_unknown_export_closes() {
    let (mut c, task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"missing").await;
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::UnknownExport { .. })));
}

#[tokio::test]
async fn export_name_sends_124_zeroes_unless_no_zeroes() {
    for no_zeroes in [false, true] {
        let (mut c, _task) = connect(&server(table()));
        let flags = proto::FLAG_C_FIXED_NEWSTYLE | if no_zeroes { proto::FLAG_C_NO_ZEROES } else { 0 };
        c.greet(flags).await;
        c.send_option(proto::OPT_EXPORT_NAME, b"disk").await;
        let mut head = [0u8; 10];
        tokio::io::AsyncReadExt::read_exact(&mut c.io, &mut head).await.unwrap();
        assert_eq!(u64::from_be_bytes(head[0..8].try_into().unwrap()), SIZE);
        if !no_zeroes {
            let mut z = [1u8; 124];
            tokio::io::AsyncReadExt::read_exact(&mut c.io, &mut z).await.unwrap();
            assert_eq!(z, [0u8; 124]);
        }
        // The next bytes are a reply to our request, not padding.
        let r = c.read(0, 8).await;
        assert_eq!((r.error, r.data), (0, vec![0u8; 8]));
    }
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_continues() {
    for structured in [false, true] {
        let (mut c, task) = ready(structured).await;
        // Unknown command and unknown flags: EINVAL.
        assert_eq!(c.request(0, 77, 0, 0, &[]).await.error, errno::EINVAL);
        assert_eq!(c.request(1 << 9, proto::CMD_READ, 0, 512, &[]).await.error, errno::EINVAL);
        assert_eq!(c.request(proto::CMD_FLAG_REQ_ONE, proto::CMD_WRITE, 0, 1, b"x").await.error, errno::EINVAL);
        // Out of range: EINVAL for reads and trims, ENOSPC for writes.
        assert_eq!(c.read(SIZE - 10, 20).await.error, errno::EINVAL);
        assert_eq!(c.read(u64::MAX - 1, 20).await.error, errno::EINVAL);
        assert_eq!(c.request(0, proto::CMD_TRIM, SIZE, 1, &[]).await.error, errno::EINVAL);
        assert_eq!(c.request(0, proto::CMD_WRITE_ZEROES, SIZE, 1, &[]).await.error, errno::ENOSPC);
        // A bad write still has its payload consumed: the stream stays in sync.
        assert_eq!(c.write(SIZE - 2, &[7u8; 4000], false).await.error, errno::ENOSPC);
        // Reads longer than the maximum payload: EINVAL, nothing allocated.
        assert_eq!(c.read(0, u32::MAX).await.error, errno::EINVAL);
        // BLOCK_STATUS needs a context (and structured replies).
        let bs = c.request(0, proto::CMD_BLOCK_STATUS, 0, 4096, &[]).await;
        if structured {
            assert_eq!(bs.error, 0);
            let one = c.request(proto::CMD_FLAG_REQ_ONE, proto::CMD_BLOCK_STATUS, 0, 100, &[]).await;
            assert_eq!(one.status[0].1, vec![(100, proto::STATE_HOLE | proto::STATE_ZERO)]);
        } else {
            assert_eq!(bs.error, errno::EINVAL);
        }
        // DF is only valid with structured replies.
        let df = c.request(proto::CMD_FLAG_DF, proto::CMD_READ, 0, 512, &[]).await;
        assert_eq!(df.error, if structured { 0 } else { errno::EINVAL });
        // Zero-length requests are harmless.
        assert_eq!(c.read(0, 0).await.error, 0);
        assert_eq!(c.write(0, &[], false).await.error, 0);
        // And the connection still works.
        assert_eq!(c.write(100, b"still here", true).await.error, 0);
        assert_eq!(c.read(100, 10).await.data, b"still here");
        c.disconnect().await;
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let (mut c, _task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    let (_, flags) = c.go("ro").await.unwrap();
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(flags & (proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(c.write(0, b"abc", false).await.error, errno::EPERM);
    assert_eq!(c.request(0, proto::CMD_TRIM, 0, 512, &[]).await.error, errno::EPERM);
    assert_eq!(c.request(0, proto::CMD_WRITE_ZEROES, 0, 512, &[]).await.error, errno::EPERM);
    assert_eq!(c.read(0, 3).await.data, vec![0u8; 3]);
    assert_eq!(c.request(0, proto::CMD_FLUSH, 0, 0, &[]).await.error, 0);
}

#[tokio::test]
async fn bad_request_magic_closes() {
    let (mut c, task) = ready(false).await;
    let mut h = RequestHeader { flags: 0, command: proto::CMD_READ, cookie: 1, offset: 0, length: 1 }.encode();
    h[0] ^= 0xff;
    c.io.write_all(&h).await.unwrap();
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::BadRequestMagic { .. })));
}

#[tokio::test]
async fn huge_write_length_closes_instead_of_buffering() {
    let (mut c, task) = ready(true).await;
    c.send(0, proto::CMD_WRITE, 0, u32::MAX, b"only a few bytes").await;
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::PayloadTooLarge { length: u32::MAX, .. })));
}

#[tokio::test]
async fn garbage_after_handshake_closes() {
    let (mut c, task) = ready(false).await;
    c.io.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await.unwrap();
    c.expect_closed().await;
    assert!(task.await.unwrap().is_err());
}

#[tokio::test]
async fn truncated_request_and_payload_end_cleanly() {
    let (mut c, task) = ready(false).await;
    let h = RequestHeader { flags: 0, command: proto::CMD_WRITE, cookie: 1, offset: 0, length: 4096 }.encode();
    c.io.write_all(&h).await.unwrap();
    c.io.write_all(&[1u8; 100]).await.unwrap();
    c.io.shutdown().await.unwrap();
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::Io { .. })));
}

#[tokio::test]
async fn handshake_times_out() {
    let config = ServerConfig { handshake_timeout: std::time::Duration::from_millis(50), ..ServerConfig::default() };
    let srv = NbdServer::new(table(), config);
    let (mut c, task) = connect(&srv);
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    // Say nothing more: the server must give up on its own.
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(ServerError::HandshakeTimeout { .. })));
}

#[tokio::test]
async fn abort_gets_an_ack() {
    let (mut c, task) = connect(&server(table()));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    let r = c.option(proto::OPT_ABORT, &[]).await;
    assert_eq!(r[0].reply_type, proto::REP_ACK);
    c.expect_closed().await;
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_keeps_serving_after_bad_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let srv = server(table());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn({
        let srv = srv.clone();
        async move {
            srv.serve_unix(listener, async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    // A few hostile connections.
    for garbage in [&b"\xff\xff\xff\xff"[..], b"", &[0u8; 64][..]] {
        let s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut c = RawClient::new(Box::new(s));
        c.greet(0).await;
        c.io.write_all(garbage).await.unwrap();
        c.io.shutdown().await.unwrap();
        c.expect_closed().await;
    }
    // A proper one still works, on two connections at once.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut c = RawClient::new(Box::new(s));
        c.handshake(true, &[]).await;
        clients.push(c);
    }
    assert_eq!(clients[0].write(4096, b"shared", true).await.error, 0);
    assert_eq!(clients[1].read(4096, 6).await.data, b"shared");
    for c in clients {
        c.disconnect().await;
    }
    stop_tx.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
