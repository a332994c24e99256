//! The transmission phase on connection threads: blocking reads and writes,
//! a few OS threads per connection taking turns at the socket
//! (`ServerConfig::connection_threads`).
//!
//! Why: at queue depth 1 a request's latency is mostly wake-ups. The async
//! path ([`super::transmission`]) answers and then sleeps in `epoll_wait`,
//! to be woken through the event loop when the next request arrives. Here,
//! as in nbdkit's thread model, the thread that has read a request hands
//! the socket to the next thread (which blocks in `recv` for the following
//! request) before it runs the device call and writes the reply, so the
//! next request finds a reader already waiting. Measured on this project's
//! 2-core VM against a memory device (bench/README.md, "Connection
//! threads"): about 1.7× the async path's 4 KiB QD1 IOPS. Devices that
//! block in the kernel ([`crate::file::FileDevice`]) run their calls in
//! place on these threads ([`crate::blocking`]).
//!
//! What stays the same as the async path: validation and the device call
//! ([`super::transmission::respond`]), framing ([`super::reply`]), the
//! errors a malformed request gets, and the end of a connection: on the
//! server's stop the socket's read side is shut (requests being run finish
//! and are answered); on the device's revocation both sides are shut
//! (requests being run finish at the device, their replies are not waited
//! for). Requests in flight per connection are bounded by the thread
//! count times the requests a thread takes in a turn ([`serve_requests`]);
//! a thread's payloads are at most one maximum payload plus what the
//! reader's buffer held.
//!
//! Only plain unix and TCP connections use it: TLS streams and
//! caller-provided streams stay on the async path.
//!
//! **Polling** (`ServerConfig::poll_before_block`, off by default): the
//! thread about to block for the next request first asks the socket
//! without blocking, yielding the CPU between tries, for up to the window
//! — on a VM whose idle vCPUs halt, waking a sleeping thread on the other
//! vCPU is most of a 4 KiB QD1 request's latency. Polling takes CPU the
//! client may need, so a reader polls only when the client looks like it
//! is waiting for this server: the last read brought one request, fewer
//! than two of the connection's requests run, and no other thread of the
//! process polls ([`SocketReader`], [`PollSlot`]).

use std::io::{BufReader, Chain, Cursor, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::handshake::Negotiated;
use super::reply::write_frames_blocking;
use super::transmission::{decode_header, respond, stopped, Conn, EXACT_HEADER_PAYLOAD_MIN};
use super::{ServerError, READ_BUFFER_BYTES};
use crate::buffer_pool::BufferPool;
use crate::proto::{RequestHeader, REQUEST_HEADER_BYTES};

/// A connection's socket, switched to blocking mode.
pub(super) enum Socket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

/// Takes a connection out of the async world after its handshake: the bytes
/// its reader had already buffered, and its socket (from `into_std`) in
/// blocking mode.
pub(super) fn hand_over<R: tokio::io::AsyncRead>(
    reader: tokio::io::BufReader<R>,
    into_std: impl FnOnce(R) -> std::io::Result<Socket>,
) -> std::io::Result<(Socket, Vec<u8>)> {
    let buffered = reader.buffer().to_vec();
    let socket = into_std(reader.into_inner())?;
    match &socket {
        Socket::Unix(s) => s.set_nonblocking(false)?,
        Socket::Tcp(s) => s.set_nonblocking(false)?,
    }
    Ok((socket, buffered))
}

impl Socket {
    fn shutdown(&self, how: Shutdown) {
        // Fails only if the peer is already gone, which is what we want.
        let _ = match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        };
    }

    fn read_some(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Unix(s) => (&*s).read(buf),
            Socket::Tcp(s) => (&*s).read(buf),
        }
    }

    /// Like [`Socket::read_some`], but first asks the socket without
    /// blocking for up to `window`, yielding the CPU between tries, so a
    /// request that arrives within it is taken without this thread being
    /// put to sleep and woken (see `ServerConfig::poll_before_block`).
    /// Stops polling as soon as `busy()`: other threads have work to do,
    /// the CPU would not go idle, and a poller would only take their time.
    /// Polls only with the process's [`PollSlot`].
    fn read_polling(&self, buf: &mut [u8], window: Duration, busy: impl Fn() -> bool) -> std::io::Result<usize> {
        let start = Instant::now();
        let mut slot = None;
        loop {
            // SAFETY: `buf` is writable memory of the length given; the
            // kernel writes at most that many bytes into it.
            let n =
                unsafe { libc::recv(self.fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => {}
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
            if slot.is_none() {
                slot = PollSlot::claim();
            }
            if slot.is_none() || busy() || start.elapsed() >= window {
                drop(slot);
                return self.read_some(buf);
            }
            std::thread::yield_now();
        }
    }

    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// Appends exactly `len` bytes from the socket to `buf`, received
    /// straight into its spare capacity with `MSG_WAITALL`: a large payload
    /// costs one system call and no zero-filling, where reads through a
    /// buffer cost one call (and one wake-up) per piece that arrived.
    fn recv_exact(&self, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
        buf.reserve(len);
        let end = buf.len() + len;
        while buf.len() < end {
            let want = end - buf.len();
            let spare = &mut buf.spare_capacity_mut()[..want];
            // SAFETY: `spare` is writable memory of `buf` of the length
            // given; the kernel writes at most that many bytes into it.
            let n = unsafe {
                libc::recv(self.fd(), spare.as_mut_ptr() as *mut libc::c_void, spare.len(), libc::MSG_WAITALL)
            };
            match n {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                // SAFETY: the kernel initialised the next `n` bytes.
                n => unsafe { buf.set_len(buf.len() + n as usize) },
            }
        }
        Ok(())
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match *self {
            Socket::Unix(s) => (&*s).write(buf),
            Socket::Tcp(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match *self {
            Socket::Unix(s) => (&*s).write_vectored(bufs),
            Socket::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Threads of this process polling at once: one. Polling pays only when
/// the CPU would otherwise go idle; two quiet connections polling would
/// burn the same idle time twice, and many connections each at a low queue
/// depth (an agent spreads its requests over several) would take the CPU
/// from the requests themselves (measured: sanvol-target at 4 KiB QD32
/// through the agent fell from 1.06 of nbdkit to 0.68 with every reader
/// polling; bench/README.md, "Polling before blocking").
const POLLERS_MAX: usize = 1;
static POLLERS: AtomicUsize = AtomicUsize::new(0);

/// The right to poll, held while polling ([`POLLERS_MAX`]).
struct PollSlot;

impl PollSlot {
    fn claim() -> Option<PollSlot> {
        if POLLERS.fetch_add(1, Ordering::AcqRel) < POLLERS_MAX {
            Some(PollSlot)
        } else {
            POLLERS.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        POLLERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The read side, shared by the threads through the reader lock.
struct SocketReader {
    socket: Arc<Socket>,
    /// `ServerConfig::poll_before_block`.
    poll: Duration,
    /// Requests of the connection being run (read, not yet answered).
    running: Arc<AtomicUsize>,
    /// Requests taken from what the last read from the socket brought.
    batch: usize,
    /// The last request carried a large payload: the next header is read
    /// alone, so the buffer does not take in (and make us copy) the start
    /// of the next payload too — as the async path does
    /// (`transmission::EXACT_HEADER_PAYLOAD_MIN`).
    exact_header: bool,
}

/// Requests running at once from which a waiting reader stops polling:
/// with two or more, the connection is busy (queue depth above 1), the
/// next request will come without the CPU going idle, and polling would
/// take CPU from the threads running them.
const RUNNING_POLL_MAX: usize = 1;

impl Read for SocketReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Called once the buffer is used up. A read that brought several
        // requests means the client keeps more than one in flight: the next
        // ones come without the CPU going idle, so no polling for them.
        let alone = self.batch <= 1;
        self.batch = 0;
        if self.poll.is_zero() || !alone {
            self.socket.read_some(buf)
        } else {
            let running = &self.running;
            self.socket.read_polling(buf, self.poll, || running.load(Ordering::Relaxed) > RUNNING_POLL_MAX)
        }
    }
}

/// Bytes the handshake's reader had already taken in, then the socket.
type Requests = BufReader<Chain<Cursor<Vec<u8>>, SocketReader>>;

struct Shared {
    conn: Conn,
    socket: Arc<Socket>,
    /// Held while a thread reads one request (header and payload).
    reader: Mutex<Requests>,
    /// Held while a thread writes one reply.
    writer: Mutex<()>,
    /// No thread reads another request once set.
    done: AtomicBool,
    /// Requests read and not yet answered (see [`SocketReader`]).
    running: Arc<AtomicUsize>,
    /// The first error that ended the connection.
    error: Mutex<Option<ServerError>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked mid-request leaves nothing half-done that the
    // others could trip on: the reader is then at a request boundary or the
    // connection is failed anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Ends the connection with `error` (the first one is kept).
    fn fail(&self, error: ServerError, shutdown: Option<Shutdown>) {
        self.done.store(true, Ordering::SeqCst);
        let mut first = lock(&self.error);
        if first.is_none() {
            *first = Some(error);
        }
        drop(first);
        if let Some(how) = shutdown {
            self.socket.shutdown(how);
        }
    }
}

/// Serves the connection's requests on `threads` OS threads until the
/// client disconnects, the server stops or the device is revoked.
pub(super) async fn run(
    socket: Socket,
    buffered: Vec<u8>,
    negotiated: Negotiated,
    threads: usize,
    poll: Duration,
    stop: Option<watch::Receiver<bool>>,
) -> Result<(), ServerError> {
    let socket = Arc::new(socket);
    let conn = Conn::new(negotiated);
    let mut revocation = conn.revoked();
    let requests_running = Arc::new(AtomicUsize::new(0));
    let reader =
        SocketReader { socket: socket.clone(), poll, running: requests_running.clone(), batch: 0, exact_header: false };
    let requests = Cursor::new(buffered).chain(reader);
    let shared = Arc::new(Shared {
        conn,
        socket: socket.clone(),
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER_BYTES, requests)),
        writer: Mutex::new(()),
        done: AtomicBool::new(false),
        running: requests_running,
        error: Mutex::new(None),
    });
    let runtime = tokio::runtime::Handle::current();
    let span = tracing::Span::current();
    // Every thread holds a sender; the channel closes when the last one ends.
    let (running, mut all_ended) = mpsc::channel::<()>(1);
    for _ in 0..threads.max(1) {
        let (mine, runtime, span, running) = (shared.clone(), runtime.clone(), span.clone(), running.clone());
        let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
            let _running = running;
            let _span = span.enter();
            // Device calls may use the runtime (spawn, timers, sockets).
            let _runtime = runtime.enter();
            crate::blocking::allow_inline_on_this_thread();
            serve_requests(&mine, &runtime, threads);
            // The connection (and its device) is let go before this thread
            // counts as ended.
            drop(mine);
        });
        if let Err(e) = spawned {
            shared.fail(ServerError::io("starting a connection thread")(e), Some(Shutdown::Both));
            break;
        }
    }
    drop(running);

    let mut stop = stop;
    let (mut stopping, mut revoked) = (false, false);
    loop {
        tokio::select! {
            _ = all_ended.recv() => break,
            _ = stopped(&mut stop), if !stopping && !revoked => {
                debug!("server shutting down: finishing in-flight requests");
                stopping = true;
                shared.done.store(true, Ordering::SeqCst);
                socket.shutdown(Shutdown::Read);
            }
            _ = stopped(&mut revocation), if !revoked => {
                debug!("export revoked for this connection: finishing in-flight requests, then closing");
                revoked = true;
                shared.done.store(true, Ordering::SeqCst);
                socket.shutdown(Shutdown::Both);
            }
        }
    }
    // Every thread has ended: no request is running at the device.
    socket.shutdown(Shutdown::Write);
    if revoked {
        return Ok(());
    }
    let error = lock(&shared.error).take();
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One thread's loop: take the reader, read a request (and this thread's
/// share of the requests already whole in the reader's buffer), give the
/// reader to the next thread, run them, write their replies in one go.
///
/// Why a share: under load one read from the socket brings many requests.
/// Taken one per turn, each costs a hand-off of the reader and a reply
/// write of its own; taken together, a turn's replies share one vectored
/// write. Only a share (the buffered requests split over the threads), so
/// that at a low queue depth every thread still has a request to run and
/// slow device calls still overlap.
fn serve_requests(shared: &Shared, runtime: &tokio::runtime::Handle, threads: usize) {
    let mut batch: Vec<(RequestHeader, Bytes)> = Vec::with_capacity(TURN_REQUESTS_MAX);
    let mut frames = Vec::new();
    loop {
        // Set when this turn's requests are the thread's last (the client
        // is gone or sent garbage): those read are still run and answered.
        let mut last = false;
        {
            let mut reader = lock(&shared.reader);
            if shared.done.load(Ordering::SeqCst) {
                return;
            }
            // One request, then this thread's share of it and those whole
            // behind it in the buffer.
            let mut turn = 1;
            while batch.len() < turn {
                match read_request(&mut reader) {
                    Ok(Some(request)) => batch.push(request),
                    Ok(None) => {
                        shared.done.store(true, Ordering::SeqCst);
                        last = true;
                        break;
                    }
                    Err(e) => {
                        // Requests already read still finish and are answered.
                        shared.fail(e, None);
                        last = true;
                        break;
                    }
                }
                if batch.len() == 1 {
                    turn = (1 + whole_requests(reader.buffer(), TURN_REQUESTS_MAX - 1)).div_ceil(threads.max(1));
                }
            }
            if batch.is_empty() {
                return;
            }
            shared.running.fetch_add(batch.len(), Ordering::Relaxed);
            reader.get_mut().get_mut().1.batch += batch.len();
        }
        let taken = batch.len();
        for (header, payload) in batch.drain(..) {
            frames.extend(run_here(runtime, respond(&shared.conn, &header, crate::splice::Payload::Bytes(payload))));
        }
        let written = {
            let _writer = lock(&shared.writer);
            write_frames_blocking(&mut &*shared.socket, &frames)
        };
        frames.clear();
        shared.running.fetch_sub(taken, Ordering::Relaxed);
        if let Err(e) = written {
            shared.fail(ServerError::io("sending replies")(e), Some(Shutdown::Both));
            return;
        }
        if last {
            return;
        }
    }
}

/// Most requests one thread takes in a turn (see [`serve_requests`]).
const TURN_REQUESTS_MAX: usize = 16;

/// How many whole requests (header and payload, up to `max`) `buf` holds
/// from its start: those can be taken without reading the socket. Stops at
/// the first header that does not decode; reading it reports the error.
fn whole_requests(buf: &[u8], max: usize) -> usize {
    let (mut n, mut at) = (0, 0);
    while n < max {
        let Some(raw) =
            buf.get(at..at + REQUEST_HEADER_BYTES).and_then(|r| <&[u8; REQUEST_HEADER_BYTES]>::try_from(r).ok())
        else {
            break;
        };
        let Ok(header) = RequestHeader::decode(raw) else { break };
        let payload = if header.command == crate::proto::CMD_WRITE { header.length as usize } else { 0 };
        at += REQUEST_HEADER_BYTES + payload;
        if at > buf.len() {
            break;
        }
        n += 1;
    }
    n
}

/// Reads a write's payload: what the reader holds already, then the rest
/// straight from the socket (once the handshake's leftover bytes are used up).
fn read_payload(r: &mut Requests, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
    use std::io::BufRead;
    let held = r.buffer().len().min(len);
    buf.extend_from_slice(&r.buffer()[..held]);
    r.consume(held);
    let (leftover, socket) = r.get_ref().get_ref();
    if buf.len() < len && leftover.position() == leftover.get_ref().len() as u64 {
        return socket.socket.recv_exact(buf, len - buf.len());
    }
    // Rare: the handshake's leftover bytes hold part of it.
    let start = buf.len();
    buf.resize(len, 0);
    r.read_exact(&mut buf[start..])
}

/// Runs `request` on this thread. Most device calls here finish on their
/// first poll (memory; files, which block in place); those polls skip
/// `block_on`'s set-up. A call that is not done then (it waits for I/O or a
/// lock) is driven to the end by `block_on`, which polls it again with a
/// waker that wakes this thread.
fn run_here<F: std::future::Future>(runtime: &tokio::runtime::Handle, request: F) -> F::Output {
    let mut request = std::pin::pin!(request);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if let std::task::Poll::Ready(out) = request.as_mut().poll(&mut cx) {
        return out;
    }
    runtime.block_on(request)
}

/// Reads one request: `None` at `NBD_CMD_DISC` or a clean close between
/// requests.
fn read_request(r: &mut Requests) -> Result<Option<(RequestHeader, Bytes)>, ServerError> {
    let mut raw = [0u8; REQUEST_HEADER_BYTES];
    let exact = r.get_ref().get_ref().1.exact_header && r.buffer().is_empty();
    let first = loop {
        let read = if exact { r.get_mut().read(&mut raw) } else { r.read(&mut raw) };
        match read {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ServerError::io("reading a request header")(e)),
        }
    };
    if first == 0 {
        debug!("client closed the connection without NBD_CMD_DISC");
        return Ok(None);
    }
    r.read_exact(&mut raw[first..]).map_err(ServerError::io("reading a request header"))?;
    let Some((header, payload_len)) = decode_header(&raw)? else {
        return Ok(None);
    };
    r.get_mut().get_mut().1.exact_header = payload_len >= EXACT_HEADER_PAYLOAD_MIN;
    let payload = if payload_len > 0 {
        let pool = BufferPool::global();
        let mut buf = pool.take(payload_len as usize);
        read_payload(r, &mut buf, payload_len as usize).map_err(ServerError::io("reading a write payload"))?;
        pool.freeze(buf)
    } else {
        Bytes::new()
    };
    Ok(Some((header, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CMD_READ, CMD_WRITE};

    fn request(command: u16, length: u32) -> Vec<u8> {
        let mut b = RequestHeader { flags: 0, command, cookie: 7, offset: 0, length }.encode().to_vec();
        if command == CMD_WRITE {
            b.resize(b.len() + length as usize, 0xab);
        }
        b
    }

    #[test]
    fn whole_requests_counts_headers_with_their_payloads_and_stops_at_a_partial_or_bad_one() {
        let mut buf = [request(CMD_READ, 4096), request(CMD_WRITE, 512), request(CMD_READ, 1 << 20)].concat();
        assert_eq!(whole_requests(&buf, 16), 3, "a read's length is not a payload");
        assert_eq!(whole_requests(&buf, 2), 2, "at most the maximum");
        buf.extend_from_slice(&request(CMD_WRITE, 4096)[..REQUEST_HEADER_BYTES + 100]);
        assert_eq!(whole_requests(&buf, 16), 3, "a write whose payload is not all here is not whole");
        let mut bad = request(CMD_READ, 4096);
        bad[0] ^= 0xff;
        let buf = [request(CMD_READ, 4096), bad, request(CMD_READ, 4096)].concat();
        assert_eq!(whole_requests(&buf, 16), 1, "stops at a header that does not decode");
        assert_eq!(whole_requests(&buf[..REQUEST_HEADER_BYTES - 1], 16), 0);
    }
}
