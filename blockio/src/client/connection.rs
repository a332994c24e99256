//! One transmission-phase connection: a writer task, a reader task and the
//! table of requests in flight between them.
//!
//! Why this shape: NBD lets a client keep many requests in flight and the
//! server answer them in any order, matched by cookie. Callers register a
//! [`Pending`] entry (with a `oneshot` sender) under a short lock, then hand
//! the encoded request to the writer task, which drains everything queued
//! and sends it with one vectored write: header and payload `Bytes` go to
//! the kernel without being copied, and a deep queue costs one syscall per
//! batch rather than per request. The reader task owns the receive half,
//! parses replies (`reader.rs`) and completes entries.
//!
//! Failure is total and prompt: whichever task first sees the peer go away
//! (or a protocol violation) calls [`ConnShared::fail`], which marks the
//! connection dead under the same lock callers register under, completes
//! every registered entry with the error and aborts the other task. An entry
//! the reader is working on is dropped with the task, which its caller sees
//! as a closed channel. So no request can hang on a dead connection, and
//! every later request is refused at registration.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

use super::reader;
use crate::device::StatusExtent;
use crate::error::{IoError, IoErrorKind};
use crate::proto::{self, RequestHeader};
use crate::splice::{Payload, SpliceSocket};

/// Most requests in flight on one connection; more wait for a slot.
pub(crate) const INFLIGHT_REQUESTS_MAX: usize = 512;
/// Most requests the writer puts into one vectored write (two iovecs each,
/// well under the kernel's IOV_MAX of 1024).
const BATCH_REQUESTS_MAX: usize = 256;
/// Most payload bytes the writer gathers into one batch before writing.
const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// How long a request may wait for its reply, and what a timeout does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestTimeout {
    pub after: Duration,
    /// Close the connection (see `ClientOptions::timeout_closes_connection`).
    pub closes_connection: bool,
}

/// A request as the writer sends it.
pub(crate) struct Outgoing {
    header: [u8; proto::REQUEST_HEADER_BYTES],
    payload: Bytes,
    /// A write payload in pipes, spliced into the socket right after the
    /// header (then `payload` is empty).
    pipe: Option<crate::splice::PipeChain>,
    cookie: u64,
    /// Not to be sent at or after this instant (see `fence.rs`).
    not_after: Option<crate::clock::LeaseInstant>,
    /// `NBD_CMD_DISC`: the writer shuts the socket's send side after it.
    disconnect: bool,
}

/// What a successful request returns.
#[derive(Debug)]
pub(crate) enum Reply {
    Done,
    Data(Bytes),
    /// A read's payload moved from the socket into pipes ([`crate::splice`]).
    Pipe(crate::splice::PipeChain),
    Status(Vec<StatusExtent>),
}

/// A read being assembled from (possibly several, possibly out-of-order)
/// reply chunks.
pub(crate) struct ReadAssembly {
    /// Capacity is at least the request length (large ones come from the
    /// [`crate::buffer_pool`]). `buf.len()` is the prefix that is
    /// materialized: every byte below it was written by a chunk or
    /// zero-filled as a gap, so holes and late chunks never need zeroing.
    pub buf: Vec<u8>,
    /// Bytes described by content chunks so far (they never overlap).
    pub covered_bytes: u64,
    /// Relative ranges `start -> end` of content chunks, kept only once a
    /// reply has more than one chunk (the common single-chunk reply
    /// allocates nothing here).
    pub ranges: std::collections::BTreeMap<u64, u64>,
    /// The caller takes the payload in pipes if the reply is one whole data
    /// chunk; `buf` is then empty until the reply is copied after all.
    pub splice: bool,
}

/// Per-command reply state.
pub(crate) enum PendingState {
    Plain,
    Read(ReadAssembly),
    Status { context_id: u32, extents: Option<Vec<StatusExtent>> },
}

/// A request in flight, waiting for its reply.
pub(crate) struct Pending {
    pub command: u16,
    pub offset: u64,
    pub length: u32,
    pub flags: u16,
    pub state: PendingState,
    /// First error chunk seen (a structured reply completes on DONE).
    pub error: Option<IoError>,
    /// Whether a structured chunk has been seen for it.
    pub chunks_seen: bool,
    /// A read whose caller takes its payload in pipes if the reply allows
    /// (its buffer is then allocated only if the reply is copied after all).
    pub splice: bool,
    pub tx: oneshot::Sender<Result<Reply, IoError>>,
}

/// Cookies are our own sequence numbers: hashing them with SipHash would be
/// wasted work, a multiplicative mix spreads them well enough.
#[derive(Default)]
pub(crate) struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ *b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(crate) type PendingMap = HashMap<u64, Pending, BuildHasherDefault<CookieHasher>>;

pub(crate) struct Inflight {
    pub map: PendingMap,
    next_cookie: u64,
    /// Why the connection is dead; set once, never cleared.
    pub dead: Option<IoError>,
    /// A disconnect is under way (ours, or the server said ESHUTDOWN): no
    /// new requests.
    pub closing: bool,
}

/// State shared by callers, the writer and the reader of one connection.
pub(crate) struct ConnShared {
    pub inflight: Mutex<Inflight>,
    /// Woken on every completion while `closing`.
    pub idle: Notify,
    /// Requests queued for sending and not yet returned to their callers
    /// (for least-outstanding connection choice).
    pub outstanding: AtomicUsize,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Who we talk to, for messages.
    pub target: String,
    pub structured_replies: bool,
    /// Selected metadata contexts of this connection: (name, id).
    pub contexts: Vec<(String, u32)>,
    /// Reads waiting for a reply that may be spliced: while there are
    /// any, the reader looks at each reply header before buffering.
    pub splice_reads: AtomicUsize,
    /// Wakes a reader waiting for bytes when such a read is sent.
    pub splice_submitted: Notify,
    /// For the reader to send `NBD_CMD_DISC` after an ESHUTDOWN without
    /// keeping the writer alive on its own.
    writer_tx: Mutex<Option<mpsc::WeakUnboundedSender<Outgoing>>>,
}

impl ConnShared {
    /// Marks the connection dead with `err`, fails everything registered
    /// and stops both tasks. Idempotent; the first error is kept.
    pub fn fail(&self, err: IoError) {
        let (drained, err) = {
            let mut g = self.inflight.lock().unwrap();
            let err = g.dead.get_or_insert(err).clone();
            (std::mem::take(&mut g.map), err)
        };
        if !drained.is_empty() {
            tracing::warn!(target: "blockio::client", server = %self.target, requests = drained.len(), error = %err, "NBD connection failed with requests in flight");
        }
        for (_, p) in drained {
            let _ = p.tx.send(Err(err.clone()));
        }
        self.idle.notify_waiters();
        for h in self.tasks.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Puts back an entry the reader took out to process a non-final chunk;
    /// fails it at once if the connection died meanwhile.
    pub fn reinsert(&self, cookie: u64, p: Pending) {
        let mut g = self.inflight.lock().unwrap();
        if let Some(err) = &g.dead {
            let err = err.clone();
            drop(g);
            let _ = p.tx.send(Err(err));
        } else {
            g.map.insert(cookie, p);
        }
    }

    /// Called by the reader after completing a request: wakes a pending
    /// disconnect, which re-checks whether anything is still awaited.
    pub fn after_completion(&self) {
        let closing = self.inflight.lock().unwrap().closing;
        if closing {
            self.idle.notify_waiters();
        }
    }

    /// The server asked us to go (`NBD_ESHUTDOWN`): refuse new requests and
    /// send `NBD_CMD_DISC` once the others are answered.
    pub fn server_shutting_down(self: &Arc<Self>) {
        let first = {
            let mut g = self.inflight.lock().unwrap();
            !std::mem::replace(&mut g.closing, true)
        };
        if first {
            tracing::info!(target: "blockio::client", server = %self.target, "server is shutting down (ESHUTDOWN); disconnecting");
            let shared = self.clone();
            tokio::spawn(async move {
                shared.wait_idle(Duration::from_secs(30)).await;
                let tx = shared.writer_tx.lock().unwrap().as_ref().and_then(|w| w.upgrade());
                if let Some(tx) = tx {
                    let _ = tx.send(disc_request());
                }
            });
        }
    }

    /// Waits until no request still has a caller waiting for it, at most
    /// `max`. Requests whose callers gave up (timed out) do not count: a
    /// server that never answers them must not stall a disconnect.
    pub async fn wait_idle(&self, max: Duration) {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight.lock().unwrap().map.values().all(|p| p.tx.is_closed()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(n, _)| n == name).map(|(_, id)| *id)
    }
}

fn disc_request() -> Outgoing {
    let header = RequestHeader { flags: 0, command: proto::CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode();
    Outgoing { header, payload: Bytes::new(), pipe: None, cookie: 0, not_after: None, disconnect: true }
}

/// Decrements the outstanding count however the caller's future ends
/// (completion, timeout, or being dropped).
struct OutstandingGuard<'a>(&'a AtomicUsize);

impl Drop for OutstandingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection of a client.
pub(crate) struct Connection {
    pub shared: Arc<ConnShared>,
    /// Whether the reader can splice payloads out of the socket.
    pub can_splice: bool,
    /// Write payloads in pipes are spliced into the socket.
    pub can_splice_out: bool,
    tx: mpsc::UnboundedSender<Outgoing>,
    slots: Semaphore,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Connection {
    /// Starts the writer and reader tasks over the two halves of a
    /// handshaken stream.
    pub fn start<R, W>(
        rd: R,
        wr: W,
        target: String,
        structured_replies: bool,
        contexts: Vec<(String, u32)>,
        splice: Option<crate::splice::SpliceSocket>,
        splice_out: Option<crate::splice::SpliceSocket>,
    ) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(ConnShared {
            inflight: Mutex::new(Inflight { map: PendingMap::default(), next_cookie: 1, dead: None, closing: false }),
            idle: Notify::new(),
            outstanding: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
            target,
            structured_replies,
            contexts,
            splice_reads: AtomicUsize::new(0),
            splice_submitted: Notify::new(),
            writer_tx: Mutex::new(Some(tx.downgrade())),
        });
        let can_splice = splice.is_some();
        let can_splice_out = splice_out.is_some();
        let writer = tokio::spawn(writer_loop(wr, rx, shared.clone(), splice_out));
        let reader = tokio::spawn(reader::reader_loop(rd, shared.clone(), splice));
        shared.tasks.lock().unwrap().extend([writer.abort_handle(), reader.abort_handle()]);
        Connection {
            shared,
            can_splice,
            can_splice_out,
            tx,
            slots: Semaphore::new(INFLIGHT_REQUESTS_MAX),
            reader: Mutex::new(Some(reader)),
        }
    }

    /// Whether new requests may be sent here.
    pub fn is_usable(&self) -> bool {
        let g = self.shared.inflight.lock().unwrap();
        g.dead.is_none() && !g.closing
    }

    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Relaxed)
    }

    /// Why this connection cannot take requests, if it cannot.
    pub fn unusable_reason(&self) -> Option<IoError> {
        let g = self.shared.inflight.lock().unwrap();
        match (&g.dead, g.closing) {
            (Some(e), _) => Some(e.clone()),
            (None, true) => Some(IoError::shutdown(format!("connection to {} is disconnecting", self.shared.target))),
            (None, false) => None,
        }
    }

    /// Sends one request and waits for its reply (or `timeout`).
    #[allow(clippy::too_many_arguments)]
    pub async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Payload,
        state: PendingState,
        timeout: Option<RequestTimeout>,
    ) -> Result<Reply, IoError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| IoError::shutdown(format!("connection to {} is closed", self.shared.target)))?;
        // Checked by the writer, right before sending (see `fence.rs`).
        let not_after = super::fence::deadline_for(command);
        let (tx, rx) = oneshot::channel();
        let splice = matches!(&state, PendingState::Read(asm) if asm.splice);
        // Counted before the request can be sent, so its reply is looked at.
        let _splicing = splice.then(|| {
            self.shared.splice_reads.fetch_add(1, Ordering::Relaxed);
            self.shared.splice_submitted.notify_one();
            OutstandingGuard(&self.shared.splice_reads)
        });
        let cookie = {
            let mut g = self.shared.inflight.lock().unwrap();
            if let Some(e) = &g.dead {
                return Err(e.clone());
            }
            if g.closing {
                return Err(IoError::shutdown(format!("connection to {} is disconnecting", self.shared.target)));
            }
            let cookie = g.next_cookie;
            g.next_cookie = g.next_cookie.wrapping_add(1).max(1);
            g.map.insert(
                cookie,
                Pending { command, offset, length, flags, state, error: None, chunks_seen: false, splice, tx },
            );
            cookie
        };
        let header = RequestHeader { flags, command, cookie, offset, length }.encode();
        let (payload, pipe) = match payload {
            Payload::Bytes(b) => (b, None),
            Payload::Pipe(chain) => (Bytes::new(), Some(chain)),
        };
        if self.tx.send(Outgoing { header, payload, pipe, cookie, not_after, disconnect: false }).is_err() {
            // The writer is gone: the connection is dead or dying.
            let reason = self.shared.inflight.lock().unwrap().dead.clone();
            let err =
                reason.unwrap_or_else(|| IoError::shutdown(format!("connection to {} is closed", self.shared.target)));
            self.shared.fail(err.clone());
            return Err(err);
        }
        // Counted once queued, so `outstanding` never includes requests the
        // server cannot have been sent yet.
        self.shared.outstanding.fetch_add(1, Ordering::Relaxed);
        let _guard = OutstandingGuard(&self.shared.outstanding);
        let _sent = crate::park_poll::InFlight::sent();
        let closed = || {
            self.shared.inflight.lock().unwrap().dead.clone().unwrap_or_else(|| {
                IoError::shutdown(format!("connection to {} closed before the reply arrived", self.shared.target))
            })
        };
        match timeout {
            None => rx.await.unwrap_or_else(|_| Err(closed())),
            Some(t) => match tokio::time::timeout(t.after, rx).await {
                Ok(r) => r.unwrap_or_else(|_| Err(closed())),
                Err(_) => {
                    let e = IoError::new(
                        IoErrorKind::Io,
                        format!(
                            "{}: {} at offset {offset} length {length} timed out after {} ms",
                            self.shared.target,
                            proto::command_name(command),
                            t.after.as_millis()
                        ),
                    );
                    if t.closes_connection {
                        // Nothing of this connection stays pending here,
                        // and nothing more is read from it.
                        self.shared.fail(IoError::shutdown(format!("{e}; connection closed")));
                    }
                    // Otherwise the entry stays registered: a late reply is
                    // then read and discarded instead of looking like an
                    // unknown cookie.
                    Err(e)
                }
            },
        }
    }

    /// Soft disconnect: refuse new requests, let in-flight ones finish (at
    /// most `drain_max`), send `NBD_CMD_DISC`, wait for the server to close.
    pub async fn disconnect(&self, drain_max: Duration) {
        {
            let mut g = self.shared.inflight.lock().unwrap();
            if g.dead.is_some() {
                return;
            }
            g.closing = true;
        }
        self.shared.wait_idle(drain_max).await;
        let _ = self.tx.send(disc_request());
        let reader = self.reader.lock().unwrap().take();
        if let Some(reader) = reader {
            // The server closes after DISC; don't wait on one that doesn't.
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        self.shared.fail(IoError::shutdown(format!("disconnected from {}", self.shared.target)));
    }
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<ConnShared>,
    splice_out: Option<SpliceSocket>,
) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH_REQUESTS_MAX);
    loop {
        let first = match rx.recv().await {
            Some(o) => o,
            None => {
                // Every handle to the client is gone: leave politely.
                let disc = disc_request();
                let _ = wr.write_all(&disc.header).await;
                let _ = wr.shutdown().await;
                return;
            }
        };
        let mut bytes = first.len();
        let mut stop = first.disconnect;
        batch.push(first);
        while !stop && batch.len() < BATCH_REQUESTS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(o) => {
                    bytes += o.len();
                    stop = o.disconnect;
                    batch.push(o);
                }
                Err(_) => break,
            }
        }
        if batch.iter().any(|o| o.not_after.is_some()) {
            drop_past_deadline(&mut batch, &shared);
            if batch.is_empty() {
                continue;
            }
        }
        if let Err(e) = write_batch(&mut wr, &mut batch, splice_out.as_ref()).await {
            shared.fail(IoError::shutdown(format!("sending to {} failed: {e}", shared.target)));
            return;
        }
        // The replies come on this socket.
        crate::park_poll::expect(splice_out.as_ref().map(SpliceSocket::raw_fd));
        batch.clear();
        if stop {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// Fails, unsent, every request of `batch` whose send deadline has passed.
fn drop_past_deadline(batch: &mut Vec<Outgoing>, shared: &ConnShared) {
    let now = crate::clock::LeaseInstant::now();
    let mut failed = Vec::new();
    batch.retain(|o| {
        let late = o.not_after.is_some_and(|d| now >= d);
        if late {
            failed.push(o.cookie);
        }
        !late
    });
    if failed.is_empty() {
        return;
    }
    let pending: Vec<Pending> = {
        let mut g = shared.inflight.lock().unwrap();
        failed.iter().filter_map(|cookie| g.map.remove(cookie)).collect()
    };
    for p in pending {
        let e = fenced(&shared.target, p.command, p.offset, p.length);
        let _ = p.tx.send(Err(e));
    }
    shared.after_completion();
}

fn fenced(target: &str, command: u16, offset: u64, length: u32) -> IoError {
    IoError::new(
        IoErrorKind::Fenced,
        format!(
            "{target}: {} at offset {offset} length {length} not sent: its send deadline (the lease) had passed",
            proto::command_name(command)
        ),
    )
}

impl Outgoing {
    /// Payload bytes, in memory or in pipes.
    fn len(&self) -> usize {
        self.payload.len() + self.pipe.as_ref().map_or(0, |p| p.len())
    }
}

/// Writes every header and payload of `batch` with as few syscalls as the
/// kernel allows: runs of requests in memory in one vectored write each, a
/// payload in pipes spliced in right after its header.
async fn write_batch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &mut [Outgoing],
    splice_out: Option<&SpliceSocket>,
) -> std::io::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        // A run ends after a request whose payload is in pipes, or at the end.
        let end = batch[start..].iter().position(|o| o.pipe.is_some()).map_or(batch.len(), |i| start + i + 1);
        let run = &mut batch[start..end];
        write_run(wr, run).await?;
        if let Some(chain) = run.last_mut().and_then(|o| o.pipe.as_mut()) {
            match splice_out {
                Some(socket) => socket.splice_out(chain).await?,
                None => {
                    // Not sent here by `submit`; written from memory all the same.
                    let data = std::mem::take(chain).into_bytes()?;
                    wr.write_all(&data).await?;
                    wr.flush().await?;
                }
            }
        }
        start = end;
    }
    Ok(())
}

/// One vectored write (or as few as the socket takes) of every header and
/// in-memory payload of `run`.
async fn write_run<W: AsyncWrite + Unpin>(wr: &mut W, run: &[Outgoing]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(run.len() * 2);
    for o in run {
        slices.push(IoSlice::new(&o.header));
        if !o.payload.is_empty() {
            slices.push(IoSlice::new(&o.payload));
        }
    }
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = wr.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    wr.flush().await
}
