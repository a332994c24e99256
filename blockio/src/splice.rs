//! Read and write payloads carried from socket to socket in pipes
//! (`splice(2)`), so a forwarding hop — the agent between a device and its
//! client — never copies them through user space.
//!
//! Why: on the reference host a hop that splices through a pipe served
//! 1 MiB reads at 1.01× of direct I/O, one that copies through a buffer at
//! 0.74× (`../shared/reference/hop-limit/`), and the agent, which copied,
//! at 0.68×. The copy into and out of user space is the cost; `splice`
//! moves page references instead.
//!
//! How: the NBD client, for a read asked for as a [`Payload`], takes a
//! whole-request data reply's payload straight from its socket into a
//! [`PipeChain`]; the chain travels up through the block-device layers as
//! [`Payload::Pipe`]; the NBD server writes the reply header and splices the
//! chain into its client's socket. Anything else (short replies, holes,
//! several chunks, TLS) takes the copying path, with the same result.
//!
//! Writes, the other way: the NBD server takes a large write's payload from
//! its client's socket into a chain when its device says it only passes the
//! payload on (`BlockDevice::wants_write_pipe`), and the NBD client splices
//! the chain into the device's socket right after the request header. A
//! payload in pipes can be sent only once, so a layer that may have to send
//! it again (the agent's fallback through the server, a write retried after
//! a lease renewal) first keeps a [`PipeChain::tee`] of it: the same pages,
//! not a copy. On the 2026-12-06 host (kernel 6.18) this took the agent's
//! CPU per 1 MiB write from 259-324 µs to 71-113 (`bench/README.md`).
//!
//! Readiness: a socket's tokio registration belongs to the half that reads
//! or writes it through `AsyncRead`/`AsyncWrite`. [`SpliceSocket`] registers
//! a duplicate of the descriptor with the same runtime; both registrations
//! see the same edge-triggered events, and the two paths never run at the
//! same time (each connection has one reader and one writer, each
//! sequential).
//!
//! A pipe's capacity is counted in slots, not bytes (a slot holds one page
//! fragment of a socket buffer), so how much a pipe takes is not known in
//! advance: when a splice into it would block although the socket has data
//! waiting, the pipe is full and the next pipe of the chain is used.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Reads at least this long are asked for as [`Payload`]s by the agent's
/// export: below it, the extra system calls cost more than the copy saves.
pub const SPLICE_BYTES_MIN: u32 = 128 * 1024;

/// Capacity asked for each pipe (the kernel caps it at
/// `fs.pipe-max-size`; a refusal leaves the default 64 KiB).
const PIPE_BYTES: libc::c_int = 1024 * 1024;
/// Most idle pipes kept for reuse (each pins up to its capacity only while
/// it holds data; an idle one is two descriptors).
const IDLE_PIPES_MAX: usize = 32;

/// What a read returned: bytes in memory, or bytes waiting in pipes.
pub enum Payload {
    Bytes(Bytes),
    Pipe(PipeChain),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Pipe(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in memory (reads a pipe chain out; for callers that need
    /// to look at the data, and for writers that cannot splice).
    pub fn into_bytes(self) -> io::Result<Bytes> {
        match self {
            Payload::Bytes(b) => Ok(b),
            Payload::Pipe(p) => p.into_bytes(),
        }
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Bytes(b) => write!(f, "Payload::Bytes({} bytes)", b.len()),
            Payload::Pipe(p) => write!(f, "Payload::Pipe({} bytes in {} pipes)", p.len(), p.pipes.len()),
        }
    }
}

/// One pipe and how many bytes it holds.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
}

static IDLE_PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

static BYTES_SPLICED_OUT: AtomicU64 = AtomicU64::new(0);

/// Pipes out of the idle list: each holds two descriptors, and pages while
/// it holds bytes.
static PIPES_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Pipes this process has in payloads now: a caller that may choose
/// between pipes and memory (a write payload) takes memory above its bound,
/// so a burst of large requests cannot run the process out of descriptors.
pub fn pipes_in_use() -> usize {
    PIPES_IN_USE.load(Ordering::Relaxed)
}

/// Payload bytes this process has spliced from pipes into sockets (for
/// metrics, and for tests that must know the path was taken).
pub fn bytes_spliced_out() -> u64 {
    BYTES_SPLICED_OUT.load(Ordering::Relaxed)
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = IDLE_PIPES.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            PIPES_IN_USE.fetch_add(1, Ordering::Relaxed);
            return Ok(p);
        }
        Pipe::create(PIPE_BYTES)
    }

    /// A new pipe of (about) `capacity` bytes.
    fn create(capacity: libc::c_int) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into a valid array of two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by no one else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; failure only keeps the default size.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, capacity) };
        PIPES_IN_USE.fetch_add(1, Ordering::Relaxed);
        Ok(Pipe { read, write, held: 0 })
    }

    /// Back to the idle list, emptied first if it still holds bytes (a
    /// payload nobody will send: the copy a layer kept in case it had to
    /// send it again, [`PipeChain::tee`]); closed if it cannot be emptied.
    fn release(mut self) {
        PIPES_IN_USE.fetch_sub(1, Ordering::Relaxed);
        if self.held > 0 && !self.discard() {
            return;
        }
        let mut idle = IDLE_PIPES.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_PIPES_MAX {
            idle.push(self);
        }
    }

    /// Lets go of the bytes it holds by splicing them into `/dev/null`,
    /// which drops the page references and copies nothing: one system call
    /// where closing the pipe and making a new one for the next payload
    /// takes four (`pipe2`, `fcntl`, two `close`s; for a write's kept copy,
    /// per request). False if it could not be emptied.
    fn discard(&mut self) -> bool {
        static DEV_NULL: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
        let Some(null) = DEV_NULL.get_or_init(|| std::fs::OpenOptions::new().write(true).open("/dev/null").ok()) else {
            return false;
        };
        while self.held > 0 {
            let n = splice_fds(self.read.as_raw_fd(), null.as_raw_fd(), self.held, libc::SPLICE_F_NONBLOCK);
            if n <= 0 {
                return false;
            }
            self.held -= n as usize;
        }
        true
    }
}

/// A payload held in pipes, in order.
#[derive(Debug, Default)]
pub struct PipeChain {
    pipes: Vec<Pipe>,
    len: usize,
}

impl PipeChain {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A chain holding `data` (copied into pipes; for tests and for bytes a
    /// reader had already buffered).
    pub fn from_slice(data: &[u8]) -> io::Result<PipeChain> {
        let mut chain = PipeChain::default();
        chain.append_slice(data)?;
        Ok(chain)
    }

    fn append_slice(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.pipes.is_empty() {
                self.pipes.push(Pipe::take()?);
            }
            let pipe = self.pipes.last_mut().expect("a pipe was just pushed");
            // SAFETY: writes at most data.len() bytes from a valid slice.
            let n = unsafe { libc::write(pipe.write.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.pipes.push(Pipe::take()?);
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            pipe.held += n;
            self.len += n;
            data = &data[n..];
        }
        Ok(())
    }

    /// A second chain holding the same bytes, made with `tee(2)`: the two
    /// share the pages, nothing is copied, and this chain keeps its bytes.
    /// For a write payload that may have to be sent again (the agent's
    /// fallback path) after the first chain went into a socket. Fails,
    /// leaving this chain as it was, when a new pipe takes fewer of the
    /// bytes than the one it copies (the caller then copies the bytes out).
    pub fn tee(&self) -> io::Result<PipeChain> {
        let mut copy = PipeChain::default();
        for pipe in self.pipes.iter().filter(|p| p.held > 0) {
            // An idle pipe may be smaller than this one (its size was
            // refused): then a new one as large as this is made.
            let mut dst = Pipe::take()?;
            let mut n = tee_into(pipe, &mut dst);
            if matches!(n, Ok(n) if n < pipe.held) {
                dst.release();
                // SAFETY: fcntl on a pipe descriptor we hold.
                let capacity = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
                dst = Pipe::create(capacity.max(PIPE_BYTES))?;
                n = tee_into(pipe, &mut dst);
            }
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    dst.release();
                    return Err(e);
                }
            };
            copy.len += n;
            copy.pipes.push(dst);
            if n != pipe.held {
                return Err(io::Error::other(format!("tee took {n} of a pipe's {} bytes", pipe.held)));
            }
        }
        Ok(copy)
    }

    /// Reads the whole payload out of the pipes, for a write that must be
    /// sent from memory after all; the error says so.
    pub fn into_write_data(self) -> Result<Bytes, crate::IoError> {
        self.into_bytes().map_err(|e| crate::IoError::io(format!("reading a write payload out of its pipes: {e}")))
    }

    /// Reads the whole payload out of the pipes.
    pub fn into_bytes(mut self) -> io::Result<Bytes> {
        let mut out = BytesMut::with_capacity(self.len);
        for pipe in &mut self.pipes {
            while pipe.held > 0 {
                let start = out.len();
                out.resize(start + pipe.held, 0);
                // SAFETY: reads at most `held` bytes into the just-resized tail.
                let n = unsafe { libc::read(pipe.read.as_raw_fd(), out[start..].as_mut_ptr().cast(), pipe.held) };
                if n <= 0 {
                    let e = if n == 0 { io::ErrorKind::UnexpectedEof.into() } else { io::Error::last_os_error() };
                    return Err(e);
                }
                out.truncate(start + n as usize);
                pipe.held -= n as usize;
            }
        }
        self.len = 0;
        Ok(out.freeze())
    }
}

impl Drop for PipeChain {
    fn drop(&mut self) {
        for pipe in self.pipes.drain(..) {
            pipe.release();
        }
    }
}

/// Duplicates what `src` holds into the empty pipe `dst` (shared pages).
fn tee_into(src: &Pipe, dst: &mut Pipe) -> io::Result<usize> {
    // SAFETY: tee between two pipe descriptors we hold; no user memory.
    let n = unsafe { libc::tee(src.read.as_raw_fd(), dst.write.as_raw_fd(), src.held, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    dst.held = n as usize;
    Ok(n as usize)
}

/// A stream socket's descriptor, duplicated and registered for readiness,
/// for splicing into and out of it (see the module docs).
pub struct SpliceSocket {
    fd: AsyncFd<OwnedFd>,
}

impl SpliceSocket {
    /// The duplicate's descriptor (the same socket as the original's).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    /// Duplicates `socket`'s descriptor (already non-blocking: the duplicate
    /// shares its file status flags) and registers it with the current
    /// runtime for the one direction it splices (a side that only reads
    /// must not be woken by every write event, nor the other way round).
    pub fn dup(socket: &impl AsFd, interest: Interest) -> io::Result<SpliceSocket> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        // SAFETY: the OwnedFd stays open, and is the same descriptor, for
        // as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, interest)? };
        Ok(SpliceSocket { fd })
    }

    fn raw(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    /// Copies up to `buf.len()` bytes waiting on the socket without
    /// consuming them, once some are there; 0 at end of stream.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_op(|fd| {
            // SAFETY: receives at most buf.len() bytes into a valid buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            ok_or_errno(n)
        })
        .await
    }

    /// Consumes exactly `buf.len()` bytes.
    pub async fn recv_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let n = self
                .read_op(|fd| {
                    // SAFETY: receives at most rest.len() bytes into a valid buffer.
                    let n = unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_DONTWAIT) };
                    ok_or_errno(n)
                })
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }

    /// Moves the next `n` bytes of the stream into a new pipe chain.
    pub async fn splice_in(&self, n: usize) -> io::Result<PipeChain> {
        self.splice_in_with(n, Pipe::take).await
    }

    async fn splice_in_with(&self, n: usize, new_pipe: fn() -> io::Result<Pipe>) -> io::Result<PipeChain> {
        let mut chain = PipeChain::default();
        chain.pipes.push(new_pipe()?);
        while chain.len < n {
            let want = n - chain.len;
            let pipe_w = chain.pipes.last().expect("the chain has a pipe").write.as_raw_fd();
            let mut guard = self.fd.readable().await?;
            let moved = splice_fds(self.raw(), pipe_w, want, SPLICE_FLAGS);
            if moved > 0 {
                chain.pipes.last_mut().expect("the chain has a pipe").held += moved as usize;
                chain.len += moved as usize;
                continue;
            }
            if moved == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock if self.bytes_waiting()? > 0 => chain.pipes.push(new_pipe()?),
                io::ErrorKind::WouldBlock => guard.clear_ready(),
                _ => return Err(e),
            }
        }
        Ok(chain)
    }

    /// Sends every byte of `chain`, in order.
    pub async fn splice_out(&self, chain: &mut PipeChain) -> io::Result<()> {
        let count = chain.pipes.len();
        for (i, pipe) in chain.pipes.iter_mut().enumerate() {
            let more = if i + 1 < count { libc::SPLICE_F_MORE } else { 0 };
            while pipe.held > 0 {
                let mut guard = self.fd.writable().await?;
                let moved = splice_fds(pipe.read.as_raw_fd(), self.raw(), pipe.held, SPLICE_FLAGS | more);
                if moved > 0 {
                    pipe.held -= moved as usize;
                    chain.len -= moved as usize;
                    BYTES_SPLICED_OUT.fetch_add(moved as u64, Ordering::Relaxed);
                    continue;
                }
                if moved == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "the socket accepted no bytes"));
                }
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    // The pipe holds bytes, so only the socket can be full.
                    io::ErrorKind::WouldBlock => guard.clear_ready(),
                    _ => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Bytes queued on the socket for reading (`FIONREAD`).
    fn bytes_waiting(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through a valid pointer.
        if unsafe { libc::ioctl(self.raw(), libc::FIONREAD, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.max(0) as usize)
    }

    async fn read_op(&self, mut op: impl FnMut(RawFd) -> io::Result<usize>) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| op(fd.get_ref().as_raw_fd())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

const SPLICE_FLAGS: libc::c_uint = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

/// `splice(2)` of up to `len` bytes from `from` to `to` (one of them a
/// pipe), at their current positions: what it returns.
fn splice_fds(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> isize {
    // SAFETY: splice between two descriptors; no user memory is touched,
    // and a descriptor that is not open only makes the call fail.
    unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) }
}

fn ok_or_errno(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A pipe that still holds a payload's bytes is emptied for reuse,
    /// not closed: afterwards it holds nothing and takes new bytes.
    #[test]
    fn a_pipe_holding_bytes_is_emptied_for_reuse() {
        let mut pipe = Pipe::create(PIPE_BYTES).unwrap();
        let data = pattern(200_000);
        let mut written = 0;
        while written < data.len() {
            // SAFETY: writes from a valid slice into a pipe we hold.
            let n =
                unsafe { libc::write(pipe.write.as_raw_fd(), data[written..].as_ptr().cast(), data.len() - written) };
            assert!(n > 0, "{}", io::Error::last_os_error());
            written += n as usize;
        }
        pipe.held = written;
        assert!(pipe.discard());
        assert_eq!(pipe.held, 0);
        let mut byte = [0u8; 1];
        // SAFETY: reads at most one byte into a valid buffer.
        let n = unsafe { libc::read(pipe.read.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        assert_eq!((n, io::Error::last_os_error().kind()), (-1, io::ErrorKind::WouldBlock), "the pipe is empty");
        let mut chain = PipeChain { pipes: vec![pipe], len: 0 };
        chain.append_slice(&data[..4096]).unwrap();
        assert_eq!(chain.into_bytes().unwrap(), &data[..4096]);
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// A payload larger than a pipe holds goes socket → pipes → socket
    /// intact: pipes of one page fill at once, so the chain must grow (a
    /// pipe takes a socket buffer's page fragments, not bytes, so a pipe of
    /// the default size may hold it all), with the writer slower than the
    /// splice and a reader on the far side slower still.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payload_crosses_pipes_from_socket_to_socket_intact() {
        let data = pattern(3 * 1024 * 1024 + 123);
        let (mut source, source_peer) = tokio::net::UnixStream::pair().unwrap();
        let to_send = data.clone();
        let sender = tokio::spawn(async move {
            for piece in to_send.chunks(100_000) {
                source.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            source
        });
        let inbound = SpliceSocket::dup(&source_peer, Interest::READABLE).unwrap();
        let mut chain = inbound.splice_in_with(data.len(), || Pipe::create(4096)).await.unwrap();
        assert_eq!(chain.len(), data.len());
        assert!(chain.pipes.len() > 1, "3 MiB fit one page-sized pipe: the chain never grew");
        let (outbound, receiver) = receiving(data.len());
        outbound.splice_out(&mut chain).await.unwrap();
        assert!(chain.is_empty());
        assert_eq!(receiver.await.unwrap(), data);
        drop(sender.await.unwrap());
    }

    /// A socket to splice into, and a task reading `len` bytes at its far end.
    fn receiving(len: usize) -> (SpliceSocket, tokio::task::JoinHandle<Vec<u8>>) {
        let (near, mut far) = tokio::net::UnixStream::pair().unwrap();
        let outbound = SpliceSocket::dup(&near, Interest::WRITABLE).unwrap();
        let receiver = tokio::spawn(async move {
            let _near = near;
            let mut got = vec![0u8; len];
            far.read_exact(&mut got).await.unwrap();
            got
        });
        (outbound, receiver)
    }

    #[tokio::test]
    async fn peek_leaves_the_bytes_and_recv_exact_takes_them() {
        let (mut a, b) = tokio::net::UnixStream::pair().unwrap();
        a.write_all(b"headerpayload").await.unwrap();
        let s = SpliceSocket::dup(&b, Interest::READABLE).unwrap();
        let mut head = [0u8; 6];
        assert_eq!(s.peek(&mut head).await.unwrap(), 6);
        assert_eq!(&head, b"header");
        let mut again = [0u8; 6];
        s.recv_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"header");
        let chain = s.splice_in(7).await.unwrap();
        assert_eq!(&chain.into_bytes().unwrap()[..], b"payload");
        drop(a);
        assert_eq!(s.peek(&mut head).await.unwrap(), 0, "end of stream reads as 0");
        assert_eq!(s.splice_in(1).await.err().map(|e| e.kind()), Some(io::ErrorKind::UnexpectedEof));
    }

    /// The kept copy of a write payload: after the chain went into a
    /// socket, its tee still holds every byte, in order, across pipes.
    #[tokio::test]
    async fn a_tee_keeps_the_bytes_after_the_chain_is_sent() {
        let data = pattern(3 * 1024 * 1024 + 77);
        let (mut source, source_peer) = tokio::net::UnixStream::pair().unwrap();
        let to_send = data.clone();
        let sender = tokio::spawn(async move {
            source.write_all(&to_send).await.unwrap();
            source
        });
        let inbound = SpliceSocket::dup(&source_peer, Interest::READABLE).unwrap();
        let mut chain = inbound.splice_in_with(data.len(), || Pipe::create(64 * 1024)).await.unwrap();
        assert!(chain.pipes.len() > 1, "the payload fit one pipe: the tee of a chain is not tested");
        let kept = chain.tee().unwrap();
        assert_eq!(kept.len(), data.len());
        let (outbound, receiver) = receiving(data.len());
        outbound.splice_out(&mut chain).await.unwrap();
        assert!(receiver.await.unwrap() == data, "the chain sent other bytes");
        assert!(kept.into_bytes().unwrap() == data, "the tee lost or changed bytes once the chain was sent");
        drop(sender.await.unwrap());
    }

    #[test]
    fn a_chain_from_memory_reads_back_the_same_bytes() {
        let data = pattern(2 * 1024 * 1024 + 5);
        let chain = PipeChain::from_slice(&data).unwrap();
        assert_eq!(chain.len(), data.len());
        assert_eq!(&chain.into_bytes().unwrap()[..], &data[..]);
        assert_eq!(Payload::Bytes(Bytes::from_static(b"ab")).into_bytes().unwrap(), Bytes::from_static(b"ab"));
    }
}
