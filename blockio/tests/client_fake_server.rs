//! The NBD client against scripted fake servers on loopback: each test
//! plays the server's side byte by byte, including malformed replies (bad
//! magic, unknown cookie, chunks outside the request, truncated streams,
//! absurd lengths), and checks the client answers with clean errors — no
//! panic, no hang, no allocation sized by the server.

use std::time::Duration;

use blockio::client::{ClientError, ClientOptions, NbdClient};
use blockio::proto::{self, RequestHeader, SimpleReplyHeader, StructuredReplyHeader};
use blockio::uri::NbdUri;
use blockio::{BlockDevice, IoError, IoErrorKind, MetaContext};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every test finishes well within this; a hang is a failure, not a stall.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORT_BYTES: u64 = 1 << 20;
const TFLAGS: u16 = proto::TFLAG_HAS_FLAGS
    | proto::TFLAG_SEND_FLUSH
    | proto::TFLAG_SEND_FUA
    | proto::TFLAG_SEND_TRIM
    | proto::TFLAG_SEND_WRITE_ZEROES;

#[derive(Clone, Copy)]
struct Script {
    handshake_flags: u16,
    structured: bool,
    go: bool,
}

const MODERN: Script =
    Script { handshake_flags: proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES, structured: true, go: true };

/// The server side of one connection.
struct Fake {
    s: TcpStream,
}

impl Fake {
    async fn u32(&mut self) -> u32 {
        self.s.read_u32().await.unwrap()
    }

    async fn option_reply(&mut self, opt: u32, reply: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::OPTION_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&reply.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    /// Plays a handshake per `script`; returns the export name asked for.
    async fn handshake(&mut self, script: Script) -> String {
        let mut g = Vec::new();
        g.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&script.handshake_flags.to_be_bytes());
        self.s.write_all(&g).await.unwrap();
        let client_flags = self.u32().await;
        let mut expected = 0;
        if script.handshake_flags & proto::FLAG_FIXED_NEWSTYLE != 0 {
            expected |= proto::FLAG_C_FIXED_NEWSTYLE;
        }
        if script.handshake_flags & proto::FLAG_NO_ZEROES != 0 {
            expected |= proto::FLAG_C_NO_ZEROES;
        }
        assert_eq!(client_flags, expected, "client flags must mirror what the server offers");
        loop {
            assert_eq!(self.s.read_u64().await.unwrap(), proto::IHAVEOPT);
            let opt = self.u32().await;
            let len = self.u32().await;
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).await.unwrap();
            match opt {
                proto::OPT_STRUCTURED_REPLY if script.structured => self.option_reply(opt, proto::REP_ACK, &[]).await,
                proto::OPT_SET_META_CONTEXT if script.structured => {
                    let mut d = 1u32.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    self.option_reply(opt, proto::REP_META_CONTEXT, &d).await;
                    let mut d = 2u32.to_be_bytes().to_vec();
                    d.extend_from_slice(b"x-test:other");
                    self.option_reply(opt, proto::REP_META_CONTEXT, &d).await;
                    self.option_reply(opt, proto::REP_ACK, &[]).await;
                }
                proto::OPT_GO if script.go => {
                    let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                    let name = String::from_utf8(data[4..4 + name_len].to_vec()).unwrap();
                    if name == "missing" {
                        self.option_reply(opt, proto::REP_ERR_UNKNOWN, b"no such export here").await;
                        continue;
                    }
                    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&EXPORT_BYTES.to_be_bytes());
                    info.extend_from_slice(&(TFLAGS | proto::TFLAG_CAN_MULTI_CONN).to_be_bytes());
                    self.option_reply(opt, proto::REP_INFO, &info).await;
                    // An info type the client must ignore.
                    self.option_reply(opt, proto::REP_INFO, &[0x77, 0x77, 1, 2, 3]).await;
                    self.option_reply(opt, proto::REP_ACK, &[]).await;
                    return name;
                }
                proto::OPT_EXPORT_NAME => {
                    self.s.write_all(&EXPORT_BYTES.to_be_bytes()).await.unwrap();
                    self.s.write_all(&TFLAGS.to_be_bytes()).await.unwrap();
                    if client_flags & proto::FLAG_C_NO_ZEROES == 0 {
                        self.s.write_all(&[0u8; 124]).await.unwrap();
                    }
                    return String::from_utf8(data).unwrap();
                }
                _ => self.option_reply(opt, proto::REP_ERR_UNSUP, &[]).await,
            }
        }
    }

    /// Reads one request (and a write's payload).
    async fn request(&mut self) -> (RequestHeader, Vec<u8>) {
        let mut b = [0u8; proto::REQUEST_HEADER_BYTES];
        self.s.read_exact(&mut b).await.unwrap();
        let h = RequestHeader::decode(&b).expect("request magic");
        let mut payload = Vec::new();
        if h.command == proto::CMD_WRITE {
            payload.resize(h.length as usize, 0);
            self.s.read_exact(&mut payload).await.unwrap();
        }
        (h, payload)
    }

    async fn simple(&mut self, cookie: u64, error: u32, data: &[u8]) {
        self.s.write_all(&SimpleReplyHeader { error, cookie }.encode()).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    async fn chunk(&mut self, cookie: u64, reply_type: u16, done: bool, payload: &[u8]) {
        let flags = if done { proto::REPLY_FLAG_DONE } else { 0 };
        let h = StructuredReplyHeader { flags, reply_type, cookie, length: payload.len() as u32 };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    async fn data_chunk(&mut self, cookie: u64, offset: u64, data: &[u8], done: bool) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        self.chunk(cookie, proto::REPLY_TYPE_OFFSET_DATA, done, &p).await;
    }

    async fn hole_chunk(&mut self, cookie: u64, offset: u64, len: u32, done: bool) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        self.chunk(cookie, proto::REPLY_TYPE_OFFSET_HOLE, done, &p).await;
    }
}

/// Starts a fake server running `play` on its first connection and a
/// client connected to it; returns the client (or the connect error) and
/// the server task.
async fn with_fake<F, Fut>(
    opts: ClientOptions,
    export: &str,
    play: F,
) -> (Result<NbdClient, ClientError>, tokio::task::JoinHandle<()>)
where
    F: FnOnce(Fake) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        play(Fake { s }).await;
    });
    let client = NbdClient::connect(&NbdUri::tcp("127.0.0.1", port, export), opts).await;
    (client, server)
}

/// Runs `test` under [`TEST_TIMEOUT`].
async fn bounded<T>(test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("the client hung")
}

fn assert_dead_error(e: &IoError) {
    assert!(matches!(e.kind, IoErrorKind::Io | IoErrorKind::Shutdown), "{e}");
}

/// Checks that after a protocol error the client refuses further requests
/// at once.
async fn assert_connection_dead(client: &NbdClient) {
    let e = bounded(client.read(0, 512)).await.expect_err("a dead connection must refuse requests");
    assert_dead_error(&e);
}

#[tokio::test]
async fn multi_chunk_read_is_assembled_at_the_right_offsets() {
    let (client, server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        assert_eq!((r.command, r.offset, r.length), (proto::CMD_READ, 4096, 4096));
        // Out of order: tail data, a hole at the start, then the middle.
        f.data_chunk(r.cookie, 4096 + 3072, &[3u8; 1024], false).await;
        f.hole_chunk(r.cookie, 4096, 1024, false).await;
        f.data_chunk(r.cookie, 4096 + 1024, &[2u8; 2048], false).await;
        f.chunk(r.cookie, proto::REPLY_TYPE_NONE, true, &[]).await;
        let (r, _) = f.request().await;
        assert_eq!(r.command, proto::CMD_DISC);
    })
    .await;
    let client = client.unwrap();
    let data = bounded(client.read(4096, 4096)).await.unwrap();
    assert!(data[..1024].iter().all(|&b| b == 0));
    assert!(data[1024..3072].iter().all(|&b| b == 2));
    assert!(data[3072..].iter().all(|&b| b == 3));
    bounded(client.disconnect()).await;
    server.await.unwrap();
}

#[tokio::test]
async fn pipelined_replies_in_reverse_order_reach_the_right_callers() {
    let (client, server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let mut reqs = Vec::new();
        for _ in 0..16 {
            reqs.push(f.request().await.0);
        }
        for r in reqs.iter().rev() {
            let fill = (r.offset / 512) as u8;
            f.data_chunk(r.cookie, r.offset, &vec![fill; r.length as usize], true).await;
        }
    })
    .await;
    let client = client.unwrap();
    let reads = (0..16u64).map(|i| client.read(i * 512, 512));
    let results = bounded(futures::future::join_all(reads)).await;
    for (i, r) in results.into_iter().enumerate() {
        assert!(r.unwrap().iter().all(|&b| b == i as u8), "read {i} got another request's data");
    }
    server.await.unwrap();
}

#[tokio::test]
async fn bad_reply_magic_drops_the_connection() {
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        f.s.write_all(&0xdead_beefu32.to_be_bytes()).await.unwrap();
        f.s.write_all(&r.cookie.to_be_bytes()).await.unwrap();
        f.s.write_all(&[0u8; 64]).await.unwrap();
        let _ = f.s.read(&mut [0u8; 64]).await;
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.read(0, 512)).await.unwrap_err();
    assert!(e.message.contains("bad reply magic"), "{e}");
    assert_connection_dead(&client).await;
}

#[tokio::test]
async fn unknown_cookie_is_a_protocol_error() {
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        f.simple(r.cookie ^ 0xffff, 0, &[]).await;
        let _ = f.s.read(&mut [0u8; 64]).await;
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.flush()).await.unwrap_err();
    assert!(e.message.contains("unknown cookie"), "{e}");
    assert_connection_dead(&client).await;
}

#[tokio::test]
async fn chunk_outside_the_request_is_a_protocol_error() {
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        // Claims data past the end of the 512-byte request.
        f.data_chunk(r.cookie, r.offset + 256, &[1u8; 512], true).await;
        let _ = f.s.read(&mut [0u8; 64]).await;
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.read(0, 512)).await.unwrap_err();
    assert!(e.message.contains("outside the request"), "{e}");
    assert_connection_dead(&client).await;
}

#[tokio::test]
async fn overlapping_chunks_are_a_protocol_error() {
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        f.data_chunk(r.cookie, 0, &[1u8; 1024], false).await;
        f.hole_chunk(r.cookie, 512, 1024, true).await;
        let _ = f.s.read(&mut [0u8; 64]).await;
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.read(0, 4096)).await.unwrap_err();
    assert!(e.message.contains("overlap"), "{e}");
}

#[tokio::test]
async fn huge_chunk_length_is_refused_before_allocating() {
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        let h = StructuredReplyHeader {
            flags: proto::REPLY_FLAG_DONE,
            reply_type: proto::REPLY_TYPE_OFFSET_DATA,
            cookie: r.cookie,
            length: u32::MAX,
        };
        f.s.write_all(&h.encode()).await.unwrap();
        f.s.write_all(&0u64.to_be_bytes()).await.unwrap();
        let _ = f.s.read(&mut [0u8; 64]).await;
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.read(0, 4096)).await.unwrap_err();
    assert_dead_error(&e);
    assert!(e.message.contains("protocol error"), "{e}");
}

#[tokio::test]
async fn truncated_stream_fails_every_request_without_hanging() {
    let (client, server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        for _ in 0..7 {
            f.request().await;
        }
        // Half a data chunk, then the server vanishes.
        let h = StructuredReplyHeader {
            flags: 0,
            reply_type: proto::REPLY_TYPE_OFFSET_DATA,
            cookie: r.cookie,
            length: 4104,
        };
        f.s.write_all(&h.encode()).await.unwrap();
        f.s.write_all(&[0u8; 100]).await.unwrap();
    })
    .await;
    let client = client.unwrap();
    let reads = (0..8u64).map(|i| client.read(i * 4096, 4096));
    let results = bounded(futures::future::join_all(reads)).await;
    for r in results {
        assert_dead_error(&r.unwrap_err());
    }
    server.await.unwrap();
    assert_connection_dead(&client).await;
}

#[tokio::test]
async fn error_chunks_fail_only_their_request() {
    let (client, server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        let msg = b"disk on fire";
        let mut p = proto::errno::ENOSPC.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        p.extend_from_slice(&(r.offset + 512).to_be_bytes());
        f.chunk(r.cookie, proto::REPLY_TYPE_ERROR_OFFSET, true, &p).await;
        let (r, payload) = f.request().await;
        assert_eq!(payload, vec![9u8; 1024]);
        f.simple(r.cookie, 0, &[]).await;
        // An error type the client does not know still only fails its request.
        let (r, _) = f.request().await;
        let mut p = proto::errno::EPERM.to_be_bytes().to_vec();
        p.extend_from_slice(&0u16.to_be_bytes());
        p.extend_from_slice(&[0u8; 4]);
        f.chunk(r.cookie, 0x8000 | 77, true, &p).await;
        let (r, _) = f.request().await;
        f.simple(r.cookie, proto::errno::EIO, &[]).await;
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.write(0, Bytes::from(vec![1u8; 1024]), false)).await.unwrap_err();
    assert_eq!(e.kind, IoErrorKind::NoSpace);
    assert!(e.message.contains("disk on fire"), "{e}");
    bounded(client.write(0, Bytes::from(vec![9u8; 1024]), false)).await.expect("connection still usable");
    assert_eq!(bounded(client.trim(0, 512, false)).await.unwrap_err().kind, IoErrorKind::PermissionDenied);
    assert_eq!(bounded(client.flush()).await.unwrap_err().kind, IoErrorKind::Io);
    server.await.unwrap();
}

#[tokio::test]
async fn block_status_is_validated_and_clipped() {
    let (client, server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        assert_eq!(r.command, proto::CMD_BLOCK_STATUS);
        // Context 2 first (must be skipped), then ours with an extent that
        // runs past the request.
        let mut other = 2u32.to_be_bytes().to_vec();
        other.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]);
        f.chunk(r.cookie, proto::REPLY_TYPE_BLOCK_STATUS, false, &other).await;
        let mut p = 1u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, 0u32), (1 << 20, proto::STATE_HOLE | proto::STATE_ZERO)] {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        f.chunk(r.cookie, proto::REPLY_TYPE_BLOCK_STATUS, true, &p).await;
        // A zero-length extent breaks the protocol.
        let (r, _) = f.request().await;
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&[0u8; 8]);
        f.chunk(r.cookie, proto::REPLY_TYPE_BLOCK_STATUS, true, &p).await;
        let _ = f.s.read(&mut [0u8; 64]).await;
    })
    .await;
    let client = client.unwrap();
    let mut contexts = client.meta_contexts();
    contexts.sort();
    assert_eq!(contexts, vec!["base:allocation".to_string(), "x-test:other".to_string()]);
    let ext = bounded(client.block_status(&MetaContext::BaseAllocation, 0, 65536)).await.unwrap();
    assert_eq!(ext.len(), 2);
    assert_eq!((ext[0].length, ext[0].flags), (4096, 0));
    assert_eq!(ext[1].length, 65536 - 4096, "the last extent is clipped to the request");
    let e = bounded(client.block_status(&MetaContext::BaseAllocation, 0, 4096)).await.unwrap_err();
    assert!(e.message.contains("length 0"), "{e}");
    server.await.unwrap();
}

#[tokio::test]
async fn simple_data_reply_after_structured_negotiation_is_a_protocol_error() {
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, _) = f.request().await;
        f.simple(r.cookie, 0, &[0u8; 512]).await;
        let _ = f.s.read(&mut [0u8; 64]).await;
    })
    .await;
    let e = bounded(client.unwrap().read(0, 512)).await.unwrap_err();
    assert!(e.message.contains("simple reply"), "{e}");
}

#[tokio::test]
async fn old_server_without_fixed_newstyle_gets_export_name() {
    let script = Script { handshake_flags: 0, structured: false, go: false };
    let (client, server) = with_fake(ClientOptions::default(), "legacy", move |mut f| async move {
        assert_eq!(f.handshake(script).await, "legacy");
        let (r, _) = f.request().await;
        f.simple(r.cookie, 0, &[5u8; 512]).await;
    })
    .await;
    let client = client.unwrap();
    assert_eq!(client.size(), EXPORT_BYTES);
    assert!(!client.structured_replies());
    assert!(bounded(client.read(0, 512)).await.unwrap().iter().all(|&b| b == 5));
    server.await.unwrap();
}

#[tokio::test]
async fn go_unsupported_falls_back_to_export_name_with_no_zeroes() {
    let script =
        Script { handshake_flags: proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES, structured: false, go: false };
    let (client, server) = with_fake(ClientOptions::default(), "e", move |mut f| async move {
        assert_eq!(f.handshake(script).await, "e");
        let (r, payload) = f.request().await;
        assert_eq!(payload, vec![4u8; 1024]);
        f.simple(r.cookie, 0, &[]).await;
    })
    .await;
    let client = client.unwrap();
    assert_eq!(client.info().transmission_flags, TFLAGS);
    bounded(client.write(0, Bytes::from(vec![4u8; 1024]), false)).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn refused_export_is_reported_with_name_and_message() {
    let (client, _server) = with_fake(ClientOptions::default(), "missing", |mut f| async move {
        f.handshake(MODERN).await;
    })
    .await;
    let e = client.err().expect("must be refused");
    let msg = e.to_string();
    assert!(msg.contains("ERR_UNKNOWN") && msg.contains("\"missing\"") && msg.contains("no such export here"), "{msg}");
}

#[tokio::test]
async fn server_closing_mid_handshake_is_a_clean_error() {
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.s.write_all(&proto::NBDMAGIC.to_be_bytes()).await.unwrap();
    })
    .await;
    let e = client.err().expect("must fail");
    assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
    let (client, _server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
    })
    .await;
    assert!(client.err().unwrap().to_string().contains("not an NBD server"));
}

#[tokio::test]
async fn timeout_then_late_reply_is_discarded_quietly() {
    let opts = ClientOptions { request_timeout: Some(Duration::from_millis(100)), ..ClientOptions::default() };
    let (client, server) = with_fake(opts, "", |mut f| async move {
        f.handshake(MODERN).await;
        let (slow, _) = f.request().await;
        let (next, _) = f.request().await;
        // Answer the timed-out request late, then the next one.
        f.data_chunk(slow.cookie, slow.offset, &[1u8; 512], true).await;
        f.simple(next.cookie, 0, &[]).await;
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.read(0, 512)).await.unwrap_err();
    assert!(e.message.contains("timed out"), "{e}");
    bounded(client.flush()).await.expect("the late reply must not break the connection");
    server.await.unwrap();
}

/// The agent's device connections (`timeout_closes_connection`): a request
/// that timed out closes its connection — nothing more is read from it (a
/// late reply is never taken as an answer), the server sees the socket
/// closed, and later requests fail as on a dead connection.
#[tokio::test]
async fn a_timeout_closes_the_connection_when_asked_to() {
    let opts = ClientOptions {
        request_timeout: Some(Duration::from_millis(100)),
        timeout_closes_connection: true,
        ..ClientOptions::default()
    };
    let (client, server) = with_fake(opts, "", |mut f| async move {
        f.handshake(MODERN).await;
        let (stuck, _) = f.request().await;
        assert_eq!(stuck.command, proto::CMD_WRITE);
        // Not answered: the client gives up and closes the socket.
        let mut rest = Vec::new();
        let _ = f.s.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "nothing more was sent: {rest:?}");
    })
    .await;
    let client = client.unwrap();
    let e = bounded(client.write(0, Bytes::from(vec![1u8; 512]), false)).await.unwrap_err();
    assert!(e.message.contains("timed out"), "{e}");
    bounded(server).await.unwrap();
    assert_eq!(bounded(client.read(0, 512)).await.unwrap_err().kind, IoErrorKind::Shutdown);
}

#[tokio::test]
async fn disconnect_is_not_stalled_by_an_abandoned_request() {
    let opts = ClientOptions { request_timeout: Some(Duration::from_millis(100)), ..ClientOptions::default() };
    let (client, server) = with_fake(opts, "", |mut f| async move {
        f.handshake(MODERN).await;
        let (never_answered, _) = f.request().await;
        assert_eq!(never_answered.command, proto::CMD_READ);
        let (disc, _) = f.request().await;
        assert_eq!(disc.command, proto::CMD_DISC);
    })
    .await;
    let client = client.unwrap();
    assert!(bounded(client.read(0, 512)).await.unwrap_err().message.contains("timed out"));
    tokio::time::timeout(Duration::from_secs(2), client.disconnect())
        .await
        .expect("disconnect waited on a request nobody awaits");
    assert_eq!(bounded(client.read(0, 512)).await.unwrap_err().kind, IoErrorKind::Shutdown);
    server.await.unwrap();
}

#[tokio::test]
async fn a_write_past_its_send_deadline_fails_fenced_and_never_reaches_the_server() {
    let (client, server) = with_fake(ClientOptions::default(), "", |mut f| async move {
        f.handshake(MODERN).await;
        let (r, payload) = f.request().await;
        assert_eq!((r.command, payload), (proto::CMD_WRITE, vec![1u8; 512]), "the write within its deadline");
        f.simple(r.cookie, 0, &[]).await;
        // Next on the wire is the read: none of the data-changing requests past their deadline.
        let (r, _) = f.request().await;
        assert_eq!((r.command, r.offset, r.length), (proto::CMD_READ, 0, 512));
        f.data_chunk(r.cookie, 0, &[1u8; 512], true).await;
        let (r, _) = f.request().await;
        assert_eq!(r.command, proto::CMD_DISC);
    })
    .await;
    let client = client.unwrap();
    let later = blockio::clock::LeaseInstant::now() + Duration::from_secs(60);
    bounded(blockio::client::with_send_deadline(later, client.write(0, Bytes::from(vec![1u8; 512]), false)))
        .await
        .unwrap();
    let passed = blockio::clock::LeaseInstant::now();
    let fenced = |r: Result<(), IoError>| {
        let e = r.expect_err("past its send deadline");
        assert_eq!(e.kind, IoErrorKind::Fenced, "{e}");
        assert!(e.message.contains("not sent"), "{e}");
    };
    let write = client.write(0, Bytes::from(vec![2u8; 512]), true);
    fenced(bounded(blockio::client::with_send_deadline(passed, write)).await);
    fenced(bounded(blockio::client::with_send_deadline(passed, client.trim(0, 512, false))).await);
    let zeroes = client.write_zeroes(0, 512, blockio::ZeroFlags::default());
    fenced(bounded(blockio::client::with_send_deadline(passed, zeroes)).await);
    // Reads are not fenced.
    let data = bounded(blockio::client::with_send_deadline(passed, client.read(0, 512))).await.unwrap();
    assert!(data.iter().all(|&b| b == 1));
    bounded(client.disconnect()).await;
    server.await.unwrap();
}
