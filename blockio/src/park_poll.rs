//! Polling before the runtime parks, for request/reply chains at queue
//! depth 1 (a process that installs [`before_park`] as its runtime's
//! `on_thread_park` hook and sets a window with [`set_window`]).
//!
//! Why: at queue depth 1 a hop (the agent between an application and a
//! device) waits twice per request — for the device's reply, then for the
//! application's next request — and each wait ends in `epoll_wait`. On a VM
//! whose idle vCPUs halt, the wake-up that ends such a sleep is most of the
//! request's latency (bench/README.md, "Polling before blocking"). Here,
//! when the runtime has nothing left to run and the process waits on one
//! chain of NBD sockets (see `at_queue_depth_one`), the thread first asks
//! the socket the next event is expected on (without blocking, up to the
//! window) before it parks; when the socket becomes readable the runtime's
//! `epoll_wait` returns at once instead of sleeping.
//!
//! What it costs: a thread that polls keeps its CPU busy for up to the
//! window after each event, so a queue-depth-1 stream keeps about one CPU
//! busy. Deeper queues never poll (more than one request in flight), nor
//! does an idle process (one poll of at most the window per event). Other
//! sockets' events (the control channel's) wait for the end of a poll, at
//! most the window.
//!
//! The sockets: the NBD client notes a device connection's socket after
//! sending requests on it ([`expect`]), the NBD server an export
//! connection's after writing replies on it; the counts of requests in
//! flight are kept by both ([`InFlight`]).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The window in nanoseconds; 0: off (the default).
static WINDOW_NS: AtomicU64 = AtomicU64::new(0);
/// The socket the next event is expected on; -1: none.
static EXPECTED: AtomicI32 = AtomicI32::new(-1);
/// Requests the process's NBD servers have read and not yet answered.
static SERVED: AtomicUsize = AtomicUsize::new(0);
/// Requests the process's NBD clients have queued whose replies are not
/// yet taken.
static SENT: AtomicUsize = AtomicUsize::new(0);

/// Sets how long a thread about to park may poll (zero: never).
pub fn set_window(window: Duration) {
    WINDOW_NS.store(u64::try_from(window.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Requests in flight in this process: (read by its NBD servers and not
/// yet answered, sent by its NBD clients and not yet answered).
pub fn in_flight() -> (usize, usize) {
    (SERVED.load(Ordering::Relaxed), SENT.load(Ordering::Relaxed))
}

/// The socket the next park would poll, if one is noted.
pub fn expected() -> Option<RawFd> {
    Some(EXPECTED.load(Ordering::Relaxed)).filter(|fd| *fd >= 0)
}

/// Notes that the next event is expected on `fd`.
pub(crate) fn expect(fd: Option<RawFd>) {
    if let Some(fd) = fd {
        if WINDOW_NS.load(Ordering::Relaxed) != 0 {
            EXPECTED.store(fd, Ordering::Relaxed);
        }
    }
}

/// Counts a request in flight until dropped: one a server read (until its
/// handler ended), or one a client queued (until its reply was taken or its
/// caller gave up).
pub(crate) struct InFlight(&'static AtomicUsize);

impl InFlight {
    pub(crate) fn served() -> InFlight {
        InFlight::start(&SERVED)
    }

    pub(crate) fn sent() -> InFlight {
        InFlight::start(&SENT)
    }

    fn start(count: &'static AtomicUsize) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `on_thread_park` hook: polls the socket last noted, once, for up to
/// the window, if the process looks like a queue-depth-1 chain.
pub fn before_park() {
    let window = WINDOW_NS.load(Ordering::Relaxed);
    if window == 0 {
        return;
    }
    // Taken: the next park polls only after a new event was noted.
    let fd = EXPECTED.swap(-1, Ordering::Relaxed);
    if fd >= 0 && at_queue_depth_one(SERVED.load(Ordering::Relaxed), SENT.load(Ordering::Relaxed)) {
        poll_readable(fd, Duration::from_nanos(window));
    }
}

/// Whether a process with `served` requests read and unanswered and `sent`
/// requests sent and unanswered is waiting on one chain of NBD sockets:
/// for the next request (none of either), or for the device's reply to
/// the one request it passed on (one of each). A request that waits for
/// something else (a cached write for its mirror, a fallback write for the
/// server: one served, none sent) or that went to two devices (a mirror's
/// legs) does not poll: the event that ends its wait comes on a socket
/// not noted here, and polling would only delay it.
fn at_queue_depth_one(served: usize, sent: usize) -> bool {
    served == sent && served <= 1
}

/// Asks `fd` without blocking, spinning in between, until it is readable
/// (or hung up, or in error) or `window` has passed; says whether it became
/// ready.
fn poll_readable(fd: RawFd, window: Duration) -> bool {
    let start = Instant::now();
    loop {
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no timeout. A descriptor closed (or
        // reused) meanwhile is harmless: poll reports it (POLLNVAL) or
        // waits no more than the window.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
        if ready != 0 {
            return true;
        }
        if start.elapsed() >= window {
            return false;
        }
        for _ in 0..64 {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_a_chain_of_one_request_each_way_polls() {
        assert!(at_queue_depth_one(0, 0));
        assert!(at_queue_depth_one(1, 1));
        assert!(!at_queue_depth_one(1, 0), "waits for something other than a device: its mirror, the server");
        assert!(!at_queue_depth_one(1, 2), "a write to two legs");
        assert!(!at_queue_depth_one(0, 1), "a background write (destage, resync) alone");
        assert!(!at_queue_depth_one(2, 1));
        assert!(!at_queue_depth_one(32, 32));
    }

    #[test]
    fn a_readable_socket_ends_the_poll_at_once() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let start = Instant::now();
        // A window far longer than the test may take: only readiness ends it.
        assert!(poll_readable(b.as_raw_fd(), Duration::from_secs(600)));
        assert!(start.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn a_socket_that_stays_quiet_is_polled_for_the_whole_window() {
        let (_a, b) = UnixStream::pair().unwrap();
        let window = Duration::from_millis(20);
        let start = Instant::now();
        assert!(!poll_readable(b.as_raw_fd(), window));
        assert!(start.elapsed() >= window);
    }

    #[test]
    fn a_peer_that_hangs_up_ends_the_poll() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(poll_readable(b.as_raw_fd(), Duration::from_secs(600)));
    }
}
