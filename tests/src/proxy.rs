//! A unix-socket proxy the test can cut and restore: breaks one host's path
//! to a device while every other process still reaches it.
//!
//! Cutting drops every live connection at once (the client sees a reset or
//! EOF mid-request) and closes new connections as soon as they are accepted
//! (the client's handshake fails), until [`CuttableProxy::restore`].
//!
//! [`CuttableProxy::hold`] keeps what clients send in the proxy (a device
//! server's queue that stopped moving) until [`CuttableProxy::release`],
//! which forwards it even if the client has died meanwhile: the request of
//! a killed process that lands late.
//!
//! The device server's side of a cut connection is closed gently: the proxy
//! sends it EOF and reads (and discards) its replies until it closes, as a
//! server behind a partitioned network would finish its requests and find
//! its peer gone. Closing that side abruptly instead made nbdkit (1.32,
//! memory plugin) abort now and then — a reply thread's send failed with
//! EPIPE and another's then asserted `sock >= 0` in `raw_send_socket` — so
//! the device died with the cut and the test saw a dead device instead of
//! a cut path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// Bytes copied per read, each direction.
const COPY_BUFFER_BYTES: usize = 256 * 1024;
/// Longest wait for a device server to close its side of a cut connection.
const SERVER_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

struct State {
    cut: AtomicBool,
    /// Bumped on every cut: connection tasks watch it and drop their streams.
    cuts: watch::Sender<u64>,
    forwarded_bytes: AtomicU64,
    accepted: AtomicU64,
    /// Connections being forwarded right now.
    open: AtomicU64,
    /// True while client bytes are held (see [`CuttableProxy::hold`]).
    hold: watch::Sender<bool>,
    /// Client bytes held back so far (all connections, not reset).
    held_bytes: AtomicU64,
}

pub struct CuttableProxy {
    pub socket: PathBuf,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    /// Listens on `socket` and forwards each connection to `target`.
    pub fn start(socket: &Path, target: &Path) -> CuttableProxy {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind the proxy socket");
        let (cuts, _) = watch::channel(0);
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            cuts,
            forwarded_bytes: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            hold: watch::channel(false).0,
            held_bytes: AtomicU64::new(0),
        });
        let target = target.to_path_buf();
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    state.accepted.fetch_add(1, Ordering::Relaxed);
                    if state.cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(forward(client, target.clone(), state.clone()));
                }
            }
        });
        CuttableProxy { socket: socket.to_path_buf(), state, task }
    }

    /// Drops every live connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Holds every byte clients send from now on in the proxy (replies still
    /// flow), until [`CuttableProxy::release`].
    pub fn hold(&self) {
        self.state.hold.send_replace(true);
    }

    /// Forwards what was held, also for clients that have gone since.
    pub fn release(&self) {
        self.state.hold.send_replace(false);
    }

    /// Client bytes held back so far.
    pub fn held_bytes(&self) -> u64 {
        self.state.held_bytes.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far in both directions.
    pub fn forwarded_bytes(&self) -> u64 {
        self.state.forwarded_bytes.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (including refused ones).
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections being forwarded now (after a cut: until each has dropped
    /// both its sockets).
    pub fn open_connections(&self) -> u64 {
        self.state.open.load(Ordering::SeqCst)
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn forward(client: UnixStream, target: PathBuf, state: Arc<State>) {
    state.open.fetch_add(1, Ordering::SeqCst);
    forward_until_cut(client, target, &state).await;
    state.open.fetch_sub(1, Ordering::SeqCst);
}

async fn forward_until_cut(client: UnixStream, target: PathBuf, state: &State) {
    let mut cuts = state.cuts.subscribe();
    let Ok(server) = UnixStream::connect(&target).await else { return };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = copy_up(&mut cr, &mut sw, state);
    let down = copy(&mut sr, &mut cw, state);
    let cut = tokio::select! {
        _ = async { tokio::join!(up, down) } => false,
        _ = cuts.changed() => true,
    };
    if cut {
        // The client's side goes at once; the server's gets EOF and is
        // drained until it closes (bounded: a server that never closes is
        // dropped after SERVER_DRAIN).
        drop((cr, cw));
        let _ = sw.shutdown().await;
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let drain = async {
            while let Ok(n) = sr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(SERVER_DRAIN, drain).await;
    }
    // Dropping the halves closes both sockets.
}

async fn copy<R: AsyncReadExt + Unpin, W: AsyncWriteExt + Unpin>(r: &mut R, w: &mut W, state: &State) {
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.cut.load(Ordering::SeqCst) || w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        state.forwarded_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = w.shutdown().await;
}

/// The client-to-server direction: like [`copy`], but bytes read while the
/// proxy holds are queued and forwarded at the release — after the client's
/// EOF too (the server then gets its EOF after them).
async fn copy_up<R: AsyncReadExt + Unpin, W: AsyncWriteExt + Unpin>(r: &mut R, w: &mut W, state: &State) {
    let mut hold = state.hold.subscribe();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut queued: Vec<u8> = Vec::new();
    let mut eof = false;
    loop {
        if !queued.is_empty() && !*hold.borrow_and_update() {
            if state.cut.load(Ordering::SeqCst) || w.write_all(&queued).await.is_err() {
                break;
            }
            state.forwarded_bytes.fetch_add(queued.len() as u64, Ordering::Relaxed);
            queued.clear();
        }
        if eof && queued.is_empty() {
            break;
        }
        tokio::select! {
            read = r.read(&mut buf), if !eof => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => {
                    if *hold.borrow() {
                        state.held_bytes.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    queued.extend_from_slice(&buf[..n]);
                }
            },
            changed = hold.changed(), if !queued.is_empty() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}
