//! A tiny raw NBD client for the server tests.
//!
//! Why our own: the tests must drive the protocol byte by byte (including
//! malformed bytes) and must not depend on the project's real client, whose
//! bugs could hide the server's.

#![allow(dead_code)]

pub mod gated;

use std::collections::HashMap;
use std::sync::Arc;

use blockio::proto::{self, RequestHeader};
use blockio::server::{ExportSource, NbdServer, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// A complete reply to one request.
#[derive(Debug, Default)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success.
    pub error: u32,
    /// Read data, reassembled (holes as zeroes).
    pub data: Vec<u8>,
    /// Block status: (context id, [(length, flags)]).
    pub status: Vec<(u32, Vec<(u32, u32)>)>,
    pub chunks: usize,
}

pub struct RawClient {
    pub io: Box<dyn Io>,
    pub structured: bool,
    /// Read lengths by cookie, to parse simple read replies.
    reads: HashMap<u64, (u64, u32)>,
    next_cookie: u64,
}

/// Starts `server` on an in-process pipe; returns the client end and the
/// connection's task.
pub fn connect(server: &NbdServer) -> (RawClient, tokio::task::JoinHandle<Result<(), blockio::server::ServerError>>) {
    let (a, b) = tokio::io::duplex(4 << 20);
    let server = server.clone();
    let task = tokio::spawn(async move { server.serve_connection(b).await });
    (RawClient::new(Box::new(a)), task)
}

pub fn server(exports: Arc<dyn ExportSource>) -> NbdServer {
    NbdServer::new(exports, ServerConfig::default())
}

impl RawClient {
    pub fn new(io: Box<dyn Io>) -> RawClient {
        RawClient { io, structured: false, reads: HashMap::new(), next_cookie: 1 }
    }

    /// Reads the greeting and sends client flags.
    pub async fn greet(&mut self, client_flags: u32) -> u16 {
        let mut g = [0u8; 18];
        self.io.read_exact(&mut g).await.expect("greeting");
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        self.io.write_all(&client_flags.to_be_bytes()).await.unwrap();
        u16::from_be_bytes([g[16], g[17]])
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.io.write_all(&b).await.unwrap();
    }

    pub async fn read_opt_reply(&mut self) -> std::io::Result<OptReply> {
        let magic = self.io.read_u64().await?;
        assert_eq!(magic, proto::OPTION_REPLY_MAGIC);
        let option = self.io.read_u32().await?;
        let reply_type = self.io.read_u32().await?;
        let len = self.io.read_u32().await?;
        assert!(len < 1 << 20, "absurd option reply length {len}");
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await?;
        Ok(OptReply { option, reply_type, data })
    }

    /// Reads replies up to and including the final one (ACK or error).
    pub async fn read_opt_replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.read_opt_reply().await.expect("option reply");
            let last = r.reply_type == proto::REP_ACK || r.reply_type & proto::REP_FLAG_ERROR != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data).await;
        self.read_opt_replies().await
    }

    pub async fn structured_reply(&mut self) {
        let r = self.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r.last().unwrap().reply_type, proto::REP_ACK);
        self.structured = true;
    }

    /// Option data for LIST/SET_META_CONTEXT.
    pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Option data for INFO/GO.
    pub fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// `NBD_OPT_GO`; returns (size, transmission flags) or the error reply type.
    pub async fn go(&mut self, export: &str) -> Result<(u64, u16), u32> {
        let replies = self.option(proto::OPT_GO, &RawClient::go_data(export, &[proto::INFO_BLOCK_SIZE])).await;
        let last = replies.last().unwrap();
        if last.reply_type != proto::REP_ACK {
            return Err(last.reply_type);
        }
        let info = replies
            .iter()
            .find(|r| r.reply_type == proto::REP_INFO && r.data[0..2] == proto::INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT before ACK");
        assert_eq!(info.data.len(), 12);
        Ok((
            u64::from_be_bytes(info.data[2..10].try_into().unwrap()),
            u16::from_be_bytes([info.data[10], info.data[11]]),
        ))
    }

    /// Greets, optionally negotiates structured replies and contexts, then GO.
    pub async fn handshake(&mut self, structured: bool, contexts: &[&str]) -> (u64, u16) {
        self.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
        if structured {
            self.structured_reply().await;
        }
        if !contexts.is_empty() {
            let r = self.option(proto::OPT_SET_META_CONTEXT, &RawClient::meta_data("", contexts)).await;
            assert_eq!(r.last().unwrap().reply_type, proto::REP_ACK);
        }
        self.go("").await.expect("GO")
    }

    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends one request; returns its cookie.
    pub async fn send(&mut self, flags: u16, command: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        let cookie = self.cookie();
        if command == proto::CMD_READ {
            self.reads.insert(cookie, (offset, length));
        }
        let mut b = RequestHeader { flags, command, cookie, offset, length }.encode().to_vec();
        b.extend_from_slice(payload);
        self.io.write_all(&b).await.unwrap();
        cookie
    }

    /// Reads one complete reply (all chunks of one cookie; other cookies'
    /// chunks must not interleave in these sequential tests).
    pub async fn reply(&mut self) -> std::io::Result<Reply> {
        let mut reply = Reply::default();
        loop {
            let magic = self.io.read_u32().await?;
            if magic == proto::SIMPLE_REPLY_MAGIC {
                reply.error = self.io.read_u32().await?;
                reply.cookie = self.io.read_u64().await?;
                reply.chunks += 1;
                if let Some((_, len)) = self.reads.remove(&reply.cookie) {
                    if reply.error == 0 {
                        reply.data = vec![0u8; len as usize];
                        self.io.read_exact(&mut reply.data).await?;
                    }
                }
                return Ok(reply);
            }
            assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "bad reply magic");
            assert!(self.structured, "structured reply without negotiation");
            let flags = self.io.read_u16().await?;
            let rtype = self.io.read_u16().await?;
            reply.cookie = self.io.read_u64().await?;
            let len = self.io.read_u32().await?;
            assert!(len <= (32 << 20) + 8, "chunk too long");
            let mut payload = vec![0u8; len as usize];
            self.io.read_exact(&mut payload).await?;
            reply.chunks += 1;
            let (req_off, req_len) = self.reads.get(&reply.cookie).copied().unwrap_or((0, 0));
            if reply.data.len() != req_len as usize {
                reply.data = vec![0u8; req_len as usize];
            }
            match rtype {
                proto::REPLY_TYPE_NONE => assert_eq!(len, 0),
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                    let at = (off - req_off) as usize;
                    reply.data[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(len, 12);
                }
                proto::REPLY_TYPE_BLOCK_STATUS => {
                    assert!(len >= 12 && (len - 4) % 8 == 0, "bad block status length {len}");
                    let id = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                    let extents = payload[4..]
                        .chunks(8)
                        .map(|c| {
                            (
                                u32::from_be_bytes(c[0..4].try_into().unwrap()),
                                u32::from_be_bytes(c[4..8].try_into().unwrap()),
                            )
                        })
                        .collect();
                    reply.status.push((id, extents));
                }
                t if t & 0x8000 != 0 => {
                    reply.error = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                    let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                    assert!(msg_len + 6 <= payload.len());
                    assert_ne!(reply.error, 0);
                }
                t => panic!("unknown chunk type {t}"),
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                self.reads.remove(&reply.cookie);
                return Ok(reply);
            }
        }
    }

    /// Reads replies until `n` requests are complete, in whatever order
    /// (and chunk interleaving) the server chose; returns them by cookie.
    pub async fn replies(&mut self, n: usize) -> std::io::Result<HashMap<u64, Reply>> {
        let mut done = HashMap::new();
        let mut partial: HashMap<u64, Reply> = HashMap::new();
        while done.len() < n {
            let magic = self.io.read_u32().await?;
            let (cookie, last) = if magic == proto::SIMPLE_REPLY_MAGIC {
                let error = self.io.read_u32().await?;
                let cookie = self.io.read_u64().await?;
                let reply = partial.entry(cookie).or_default();
                reply.cookie = cookie;
                reply.error = error;
                reply.chunks += 1;
                if let Some((_, len)) = self.reads.get(&cookie).copied() {
                    if error == 0 {
                        reply.data = vec![0u8; len as usize];
                        self.io.read_exact(&mut reply.data).await?;
                    }
                }
                (cookie, true)
            } else {
                assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "bad reply magic");
                let flags = self.io.read_u16().await?;
                let rtype = self.io.read_u16().await?;
                let cookie = self.io.read_u64().await?;
                let len = self.io.read_u32().await?;
                assert!(len <= (32 << 20) + 8, "chunk too long");
                let mut payload = vec![0u8; len as usize];
                self.io.read_exact(&mut payload).await?;
                let (req_off, req_len) = self.reads.get(&cookie).copied().unwrap_or((0, 0));
                let reply = partial.entry(cookie).or_default();
                reply.cookie = cookie;
                reply.chunks += 1;
                if reply.data.len() != req_len as usize {
                    reply.data = vec![0u8; req_len as usize];
                }
                match rtype {
                    proto::REPLY_TYPE_NONE => assert_eq!(len, 0),
                    proto::REPLY_TYPE_OFFSET_DATA => {
                        let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                        let at = (off - req_off) as usize;
                        reply.data[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                    }
                    proto::REPLY_TYPE_OFFSET_HOLE => assert_eq!(len, 12),
                    proto::REPLY_TYPE_BLOCK_STATUS => {
                        assert!(len >= 12 && (len - 4) % 8 == 0, "bad block status length {len}");
                        let id = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                        let extents = payload[4..]
                            .chunks(8)
                            .map(|c| {
                                (
                                    u32::from_be_bytes(c[0..4].try_into().unwrap()),
                                    u32::from_be_bytes(c[4..8].try_into().unwrap()),
                                )
                            })
                            .collect();
                        reply.status.push((id, extents));
                    }
                    t if t & 0x8000 != 0 => {
                        reply.error = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                        assert_ne!(reply.error, 0);
                    }
                    t => panic!("unknown chunk type {t}"),
                }
                (cookie, flags & proto::REPLY_FLAG_DONE != 0)
            };
            if last {
                self.reads.remove(&cookie);
                let reply = partial.remove(&cookie).expect("reply being assembled");
                assert!(done.insert(cookie, reply).is_none(), "two final replies for cookie {cookie}");
            }
        }
        assert!(partial.is_empty(), "chunks for requests that never completed: {:?}", partial.keys());
        Ok(done)
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&mut self, flags: u16, command: u16, offset: u64, length: u32, payload: &[u8]) -> Reply {
        let cookie = self.send(flags, command, offset, length, payload).await;
        let reply = self.reply().await.expect("reply");
        assert_eq!(reply.cookie, cookie);
        reply
    }

    pub async fn read(&mut self, offset: u64, length: u32) -> Reply {
        self.request(0, proto::CMD_READ, offset, length, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Reply {
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        self.request(flags, proto::CMD_WRITE, offset, data.len() as u32, data).await
    }

    /// Sends NBD_CMD_DISC and expects the server to close.
    pub async fn disconnect(mut self) {
        self.send(0, proto::CMD_DISC, 0, 0, &[]).await;
        let mut rest = Vec::new();
        self.io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "server sent {} bytes after DISC", rest.len());
    }

    /// Asserts the server closes the connection (reads to EOF; a server
    /// that keeps it open fails the test after 10 s instead of hanging).
    pub async fn expect_closed(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), self.io.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the server did not close the connection");
        rest
    }
}
