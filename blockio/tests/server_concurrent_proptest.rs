//! Random batches of concurrent requests against the server and a model.
//!
//! Why a second property test: `server_proptest.rs` sends one request at a
//! time, but the server reads requests ahead, runs them concurrently, batches
//! replies, and hands payloads out of a shared buffer pool; the bugs those
//! create (a reply matched to the wrong cookie, a buffer reused while a
//! reply still points into it, stale bytes from a recycled buffer) only show
//! when several requests, some large enough to be pooled, are in flight at
//! once. Each batch is pipelined on one connection before any reply is read.
//!
//! The model allows exactly what NBD allows for concurrent requests: for
//! every byte covered by a request of the batch, a read may see the value
//! before the batch or any value a covering write/trim/zero stores, and once
//! the batch is done the byte holds one of the values the covering mutations
//! stored. After each batch the whole device is read back, checked against
//! that, and becomes the model for the next batch. Uncovered bytes must not
//! change. Runs over both reply styles and three devices: memory, file, and
//! a blockio client of a second blockio server (the agent's shape: a server
//! whose device is an NBD client).

mod server_common;

use std::collections::HashMap;
use std::sync::Arc;

use blockio::client::{ClientOptions, NbdClient};
use blockio::file::FileDevice;
use blockio::memory::MemoryDevice;
use blockio::proto;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::BlockDevice;
use proptest::prelude::*;
use server_common::{connect, server, RawClient};

/// Several 64 KiB memory chunks and several pooled-size payloads wide.
const DEVICE_BYTES: u64 = 768 * 1024;
/// Longest request: above the buffer pool's threshold (128 KiB).
const REQUEST_BYTES_MAX: u32 = 300_000;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u32, seed: u8, fua: bool },
    Read { offset: u64, len: u32 },
    Trim { offset: u64, len: u32 },
    Zero { offset: u64, len: u32, no_hole: bool, fast: bool },
    Flush,
    Cache { offset: u64, len: u32 },
    Status { offset: u64, len: u32, req_one: bool },
}

impl Op {
    /// The byte range a mutation covers, and the value it stores at `i`.
    fn stores(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { offset, len, .. } | Op::Trim { offset, len } | Op::Zero { offset, len, .. } => {
                Some((offset, offset + len as u64))
            }
            _ => None,
        }
    }

    fn value_at(&self, i: u64) -> u8 {
        match *self {
            Op::Write { offset, seed, .. } => pattern_byte(seed, (i - offset) as u32),
            _ => 0,
        }
    }
}

fn range() -> impl Strategy<Value = (u64, u32)> {
    // Mostly 512-aligned (like real clients), sometimes byte-granular.
    (0..DEVICE_BYTES, 1u32..REQUEST_BYTES_MAX, any::<bool>()).prop_map(|(off, len, align)| {
        let (off, len) = if align { (off & !511, (len + 511) & !511) } else { (off, len) };
        let len = len.min((DEVICE_BYTES - off) as u32).max(1);
        let off = off.min(DEVICE_BYTES - len as u64);
        (off, len)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (range(), any::<u8>(), any::<bool>()).prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
        5 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (range(), any::<bool>(), any::<bool>()).prop_map(|((offset, len), no_hole, fast)| Op::Zero { offset, len, no_hole, fast }),
        1 => Just(Op::Flush),
        1 => range().prop_map(|(offset, len)| Op::Cache { offset, len }),
        1 => (range(), any::<bool>()).prop_map(|((offset, len), req_one)| Op::Status { offset, len, req_one }),
    ]
}

/// Never zero, so a stored pattern byte is told apart from a trimmed one.
fn pattern_byte(seed: u8, i: u32) -> u8 {
    seed.wrapping_add((i % 251) as u8) | 1
}

fn pattern(seed: u8, len: u32) -> Vec<u8> {
    (0..len).map(|i| pattern_byte(seed, i)).collect()
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    File,
    /// A blockio client of a second blockio server over a memory device.
    Relayed,
    /// The same over a real unix socket, so large reads come up in pipes
    /// (`blockio::splice`); the second server's replies structured or not.
    RelayedOverSocket {
        structured_below: bool,
    },
}

async fn device(backend: Backend, dir: &tempfile::TempDir) -> Arc<dyn BlockDevice> {
    match backend {
        Backend::Memory => Arc::new(MemoryDevice::new(DEVICE_BYTES)),
        Backend::File => Arc::new(FileDevice::create(dir.path().join("disk"), DEVICE_BYTES).unwrap()),
        Backend::Relayed => {
            let below = server(Arc::new(ExportTable::single("below", Arc::new(MemoryDevice::new(DEVICE_BYTES)))));
            let (ours, theirs) = tokio::io::duplex(4 << 20);
            tokio::spawn(async move { below.serve_connection(theirs).await });
            Arc::new(NbdClient::connect_stream(ours, "below", ClientOptions::default()).await.unwrap())
        }
        Backend::RelayedOverSocket { structured_below } => {
            let below = server(Arc::new(ExportTable::single("below", Arc::new(MemoryDevice::new(DEVICE_BYTES)))));
            let socket = dir.path().join("below.sock");
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            // Lives as long as the test's runtime.
            tokio::spawn(async move { below.serve_unix(listener, std::future::pending()).await });
            let uri = format!("nbd+unix:///below?socket={}", socket.display()).parse().unwrap();
            let options = ClientOptions { structured_replies: structured_below, ..ClientOptions::default() };
            Arc::new(NbdClient::connect(&uri, options).await.unwrap())
        }
    }
}

/// Every batch op's allowed values at byte `i`, besides the value before the batch.
fn covering(batch: &[Op], i: u64) -> impl Iterator<Item = u8> + '_ {
    batch.iter().filter(move |op| op.stores().is_some_and(|(s, e)| s <= i && i < e)).map(move |op| op.value_at(i))
}

fn check_read(batch: &[Op], model: &[u8], offset: u64, data: &[u8]) {
    for (k, &got) in data.iter().enumerate() {
        let i = offset + k as u64;
        if got != model[i as usize] && !covering(batch, i).any(|v| v == got) {
            panic!(
                "read at {offset} saw {got:#x} at byte {i}: neither the old {:#x} nor any concurrent store",
                model[i as usize]
            );
        }
    }
}

fn check_status(batch: &[Op], model: &[u8], offset: u64, len: u32, req_one: bool, extents: &[(u32, u32)]) {
    assert!(!extents.is_empty(), "block status at {offset} returned no extent");
    if req_one {
        assert_eq!(extents.len(), 1, "REQ_ONE answered with several extents");
    }
    let mut pos = offset;
    for (k, &(elen, eflags)) in extents.iter().enumerate() {
        assert!(elen > 0, "zero-length extent");
        if k + 1 < extents.len() {
            assert!(pos + (elen as u64) < offset + len as u64, "non-final extents reach past the request");
        }
        let end = (pos + elen as u64).min(DEVICE_BYTES);
        if eflags & proto::STATE_ZERO != 0 {
            for i in pos..end {
                let may_be_zero = model[i as usize] == 0 || covering(batch, i).any(|v| v == 0);
                assert!(may_be_zero, "claimed zero at {i}, which held {:#x} throughout", model[i as usize]);
            }
        }
        pos = end;
    }
}

/// How the test reaches the server.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// An in-process pipe: the async transmission path.
    Pipe,
    /// A unix socket to a server with this many connection threads
    /// (`ServerConfig::connection_threads`): the blocking path (0: the
    /// async path on a socket, which splices payloads that come in pipes); polling
    /// before each blocking read when the flag is set
    /// (`ServerConfig::poll_before_block`).
    Threads(usize, bool),
}

async fn run_batches(backend: Backend, structured: bool, batches: Vec<Vec<Op>>) {
    run_batches_over(Transport::Pipe, backend, structured, batches).await
}

async fn run_batches_over(transport: Transport, backend: Backend, structured: bool, batches: Vec<Vec<Op>>) {
    let dir = tempfile::tempdir().unwrap();
    let exports = Arc::new(ExportTable::single("d", device(backend, &dir).await));
    let (mut c, served) = match transport {
        Transport::Pipe => {
            let (c, task) = connect(&server(exports));
            (c, Served::Pipe(task))
        }
        Transport::Threads(n, poll) => {
            let poll_before_block = if poll { std::time::Duration::from_micros(200) } else { Default::default() };
            let config = ServerConfig { connection_threads: n, poll_before_block, ..ServerConfig::default() };
            let socket = dir.path().join("nbd.sock");
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            let srv = NbdServer::new(exports, config);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                srv.serve_unix(listener, async move {
                    let _ = stopped.await;
                })
                .await
            });
            let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            (RawClient::new(Box::new(stream)), Served::Listener(stop, task))
        }
    };
    let contexts: &[&str] = if structured { &["base:allocation"] } else { &[] };
    let (size, flags) = c.handshake(structured, contexts).await;
    assert_eq!(size, DEVICE_BYTES);
    let fast_zero = flags & proto::TFLAG_SEND_FAST_ZERO != 0;
    let mut model = vec![0u8; DEVICE_BYTES as usize];
    for batch in batches {
        // Pipeline the whole batch, then collect the replies in any order.
        let mut sent: HashMap<u64, usize> = HashMap::new();
        for (index, op) in batch.iter().enumerate() {
            let cookie = match *op {
                Op::Write { offset, len, seed, fua } => {
                    let f = if fua { proto::CMD_FLAG_FUA } else { 0 };
                    c.send(f, proto::CMD_WRITE, offset, len, &pattern(seed, len)).await
                }
                Op::Read { offset, len } => c.send(0, proto::CMD_READ, offset, len, &[]).await,
                Op::Trim { offset, len } => c.send(0, proto::CMD_TRIM, offset, len, &[]).await,
                Op::Zero { offset, len, no_hole, fast } => {
                    let mut f = 0;
                    if no_hole {
                        f |= proto::CMD_FLAG_NO_HOLE;
                    }
                    if fast && fast_zero {
                        f |= proto::CMD_FLAG_FAST_ZERO;
                    }
                    c.send(f, proto::CMD_WRITE_ZEROES, offset, len, &[]).await
                }
                Op::Flush => c.send(0, proto::CMD_FLUSH, 0, 0, &[]).await,
                Op::Cache { offset, len } => c.send(0, proto::CMD_CACHE, offset, len, &[]).await,
                Op::Status { offset, len, req_one } => {
                    if !structured {
                        continue;
                    }
                    let f = if req_one { proto::CMD_FLAG_REQ_ONE } else { 0 };
                    c.send(f, proto::CMD_BLOCK_STATUS, offset, len, &[]).await
                }
            };
            sent.insert(cookie, index);
        }
        let replies = c.replies(sent.len()).await.expect("replies");
        assert_eq!(replies.len(), sent.len());
        // Spec: a fast zero the device cannot promise fails (ENOTSUP)
        // without writing anything; every other request must succeed.
        let mut refused = Vec::new();
        for (cookie, reply) in &replies {
            let index = *sent.get(cookie).unwrap_or_else(|| panic!("reply for unknown cookie {cookie}"));
            let op = &batch[index];
            match *op {
                Op::Zero { fast: true, .. } if fast_zero && reply.error == proto::errno::ENOTSUP => refused.push(index),
                _ => assert_eq!(reply.error, 0, "{op:?} failed"),
            }
            match *op {
                Op::Read { offset, len } => {
                    assert_eq!(reply.data.len(), len as usize);
                    check_read(&batch, &model, offset, &reply.data);
                }
                Op::Status { offset, len, req_one } => {
                    assert_eq!(reply.status.len(), 1);
                    check_status(&batch, &model, offset, len, req_one, &reply.status[0].1);
                }
                _ => {}
            }
        }
        // Settle the model from the device itself, checking every byte.
        let applied: Vec<Op> =
            batch.iter().enumerate().filter(|(i, _)| !refused.contains(i)).map(|(_, op)| op.clone()).collect();
        let after = c.read(0, DEVICE_BYTES as u32).await;
        assert_eq!(after.error, 0);
        for (i, &got) in after.data.iter().enumerate() {
            let mut stores = covering(&applied, i as u64).peekable();
            if stores.peek().is_none() {
                assert_eq!(got, model[i], "byte {i} changed with no request storing to it");
            } else {
                assert!(stores.any(|v| v == got), "byte {i} holds {got:#x}, which no concurrent store wrote");
            }
        }
        model = after.data;
    }
    c.disconnect().await;
    match served {
        Served::Pipe(task) => task.await.unwrap().unwrap(),
        Served::Listener(stop, task) => {
            // The listener returns once its connection has ended.
            let _ = stop.send(());
            task.await.unwrap().unwrap();
        }
    }
}

enum Served {
    Pipe(tokio::task::JoinHandle<Result<(), blockio::server::ServerError>>),
    Listener(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>),
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn batches(ops_max: usize, batches_max: usize) -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..ops_max), 1..batches_max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn concurrent_requests_on_memory_match_the_model(structured in any::<bool>(), b in batches(12, 6)) {
        runtime().block_on(run_batches(Backend::Memory, structured, b));
    }

    #[test]
    fn concurrent_requests_on_a_file_match_the_model(structured in any::<bool>(), b in batches(8, 4)) {
        runtime().block_on(run_batches(Backend::File, structured, b));
    }

    #[test]
    fn concurrent_requests_on_connection_threads_match_the_model(structured in any::<bool>(), b in batches(12, 6), threads in 1usize..4, poll in any::<bool>()) {
        runtime().block_on(run_batches_over(Transport::Threads(threads, poll), Backend::Memory, structured, b));
    }

    #[test]
    fn concurrent_requests_on_a_file_on_connection_threads_match_the_model(structured in any::<bool>(), b in batches(8, 4)) {
        runtime().block_on(run_batches_over(Transport::Threads(2, false), Backend::File, structured, b));
    }

    #[test]
    fn concurrent_requests_spliced_through_a_client_match_the_model(structured in any::<bool>(), structured_below in any::<bool>(), b in batches(12, 5)) {
        // Block status needs structured replies below (a client without
        // them refuses it), so only the other commands go over simple ones.
        let b = if structured_below {
            b
        } else {
            b.into_iter().map(|batch| batch.into_iter().filter(|op| !matches!(op, Op::Status { .. })).collect()).collect()
        };
        runtime().block_on(run_batches_over(Transport::Threads(0, false), Backend::RelayedOverSocket { structured_below }, structured, b));
    }

    #[test]
    fn concurrent_requests_relayed_through_a_client_match_the_model(structured in any::<bool>(), b in batches(12, 5)) {
        runtime().block_on(run_batches(Backend::Relayed, structured, b));
    }
}
