//! Where a mirror worker runs its synchronous append (one positional write
//! with `O_DSYNC`): on its own runtime thread, while the disk answers fast;
//! through `block_in_place` once it does not.
//!
//! Why inline: on the QD1 path of a mirrored write the append sits between
//! the session's reader (which routed the request to the worker, waking it
//! on the same thread) and the session's writer (which sends the answer).
//! Run inline, all three run on one thread, one after the other: the
//! writer is woken into that thread's next slot and sends the answer as
//! soon as the data is durable. Through `block_in_place` the runtime first
//! hands the thread's queue to another thread (a wake), and the answer's
//! wake then goes to a thread that sleeps on another vCPU: two hand-offs
//! that cost a 4 KiB mirrored QD1 write 24-55 µs of its 250-290 on a
//! 2-vCPU host (bench/README.md, "The mirror's append on its worker's
//! thread").
//!
//! Why not always: a write blocks its thread. With two or more runtime
//! threads the others run every other task meanwhile (they take the queued
//! ones), which costs nothing while a write takes what a disk normally
//! takes. A disk that stalls is another matter: the first append that takes
//! longer than [`INLINE_WRITE_SLOW`] sends the worker's next appends
//! through `block_in_place` for [`INLINE_PAUSE`], and with a single runtime
//! thread nothing is written inline at all (it would stop the whole server
//! for each write).

use std::time::{Duration, Instant};

/// An inline append that took longer than this turns inline appends off
/// for [`INLINE_PAUSE`]. Not a disk's ordinary hiccup (a first append into
/// a fresh file took 5 ms on the bench host, which turned a 2 ms limit off
/// for whole runs): a thread of the server held this long delays nothing
/// that counts (leases and recalls are bounded in seconds), and one held
/// longer is a disk in trouble.
pub const INLINE_WRITE_SLOW: Duration = Duration::from_millis(50);
/// How long a slow inline append turns them off.
pub const INLINE_PAUSE: Duration = Duration::from_secs(10);

/// One worker's choice, a plain state: whether its next append may run
/// inline, and what a finished one teaches it.
#[derive(Debug, Default)]
pub struct InlineSync {
    /// Inline appends are off until then (a slow one was seen).
    paused_until: Option<Instant>,
}

impl InlineSync {
    /// Whether the next append may run on the worker's thread, on a runtime
    /// of `runtime_threads` threads.
    pub fn allows(&self, runtime_threads: usize, now: Instant) -> bool {
        runtime_threads >= 2 && self.paused_until.is_none_or(|until| now >= until)
    }

    /// An append that ran inline took `took`, finishing at `now`; `true`
    /// when it turned inline appends off (to be logged once).
    pub fn ran_inline(&mut self, took: Duration, now: Instant) -> bool {
        if took > INLINE_WRITE_SLOW {
            self.paused_until = Some(now + INLINE_PAUSE);
            return true;
        }
        false
    }
}

/// Runs a synchronous file write (with its sync) for an append: inline
/// when `inline` (see the module doc), otherwise through `block_in_place`
/// on a multi-threaded runtime, or on the blocking pool elsewhere (a
/// current-thread runtime, as in some tests). A panic comes back as an
/// error.
pub async fn synced<T: Send + 'static>(inline: bool, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() != RuntimeFlavor::MultiThread {
        return tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string());
    }
    let run = || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| "the file code panicked".into());
    if inline {
        run()
    } else {
        tokio::task::block_in_place(run)
    }
}

/// Threads of the current runtime.
pub fn runtime_threads() -> usize {
    tokio::runtime::Handle::current().metrics().num_workers()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_needs_two_runtime_threads() {
        let now = Instant::now();
        let policy = InlineSync::default();
        assert!(!policy.allows(1, now), "one thread: a write would stop the whole server");
        assert!(policy.allows(2, now));
    }

    #[test]
    fn a_slow_append_turns_inline_off_for_the_pause_then_it_comes_back() {
        let t0 = Instant::now();
        let mut policy = InlineSync::default();
        assert!(!policy.ran_inline(INLINE_WRITE_SLOW, t0), "at the limit is not slow");
        assert!(policy.allows(2, t0));
        assert!(policy.ran_inline(INLINE_WRITE_SLOW + Duration::from_micros(1), t0));
        assert!(!policy.allows(2, t0));
        assert!(!policy.allows(2, t0 + INLINE_PAUSE - Duration::from_millis(1)));
        assert!(policy.allows(2, t0 + INLINE_PAUSE));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inline_write_runs_on_the_calling_thread_and_a_handed_off_one_too() {
        // Both run the closure on this thread (block_in_place moves the
        // runtime's other work away, not the closure); what differs is the
        // hand-off, which the bench measures. Here: both give the result,
        // and a panic is an error, not a crash.
        let here = std::thread::current().id();
        assert_eq!(synced(true, move || std::thread::current().id() == here).await, Ok(true));
        assert_eq!(synced(false, move || std::thread::current().id() == here).await, Ok(true));
        let panicked = synced(true, || -> u32 { panic!("file code") }).await;
        assert_eq!(panicked, Err("the file code panicked".to_string()));
        assert_eq!(runtime_threads(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn on_a_current_thread_runtime_it_goes_to_the_blocking_pool() {
        let here = std::thread::current().id();
        assert_eq!(synced(true, move || std::thread::current().id() != here).await, Ok(true));
    }
}
