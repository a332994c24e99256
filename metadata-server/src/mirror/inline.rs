//! Where a mirror worker runs its synchronous append (a durable write,
//! [`blockio::durable_file`]): on its own runtime thread, while the disk
//! answers fast; through `block_in_place` once it does not.
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
//! Why not always: a write blocks its thread. So at most **one** runtime
//! thread of the process is ever blocked by an append ([`PROCESS_SLOT`]),
//! and only on a runtime of two or more: the others run every other task
//! meanwhile (they take the queued ones), which costs nothing while a write
//! takes what a disk normally takes. Another volume's append that comes
//! while one runs inline goes through `block_in_place`, as before, so
//! several volumes' appends still reach the disk at once. A disk that
//! stalls is another matter: the first append that takes longer than
//! [`INLINE_WRITE_SLOW`] sends the worker's next appends through
//! `block_in_place` for [`INLINE_PAUSE`]; and with a single runtime thread
//! nothing is written inline at all (it would stop the whole server for
//! each write).

use std::sync::atomic::{AtomicBool, Ordering};
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

/// The right to block a runtime thread with an append: one holder at a
/// time.
#[derive(Debug, Default)]
pub struct InlineSlot(AtomicBool);

/// The process's slot, shared by every volume's worker.
pub static PROCESS_SLOT: InlineSlot = InlineSlot::new();

impl InlineSlot {
    pub const fn new() -> InlineSlot {
        InlineSlot(AtomicBool::new(false))
    }

    fn try_take(&self) -> Option<SlotHeld<'_>> {
        self.0.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).ok().map(|_| SlotHeld(self))
    }
}

/// Gives the slot back when dropped (after the write, or a panic in it).
struct SlotHeld<'a>(&'a InlineSlot);

impl Drop for SlotHeld<'_> {
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Release);
    }
}

/// Runs a synchronous file write (with its sync) for an append: inline
/// when `allowed` and `slot` is free (see the module doc), otherwise
/// through `block_in_place` on a multi-threaded runtime, or on the blocking
/// pool elsewhere (a current-thread runtime, as in some tests). Returns
/// the result and whether it ran inline; a panic comes back as an error.
pub async fn synced<T: Send + 'static>(
    slot: &InlineSlot,
    allowed: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<(T, bool), String> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() != RuntimeFlavor::MultiThread {
        return tokio::task::spawn_blocking(f).await.map(|t| (t, false)).map_err(|e| e.to_string());
    }
    let run = || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| "the file code panicked".into());
    match allowed.then(|| slot.try_take()).flatten() {
        Some(_held) => run().map(|t| (t, true)),
        None => tokio::task::block_in_place(run).map(|t| (t, false)),
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
    async fn an_append_runs_inline_when_allowed_and_the_slot_is_free_and_a_panic_is_an_error() {
        let slot = InlineSlot::new();
        let here = std::thread::current().id();
        // Both ways run the closure on this thread (block_in_place moves the
        // runtime's other work away, not the closure); what differs is the
        // hand-off, which the bench measures.
        let same_thread = move || std::thread::current().id() == here;
        assert_eq!(synced(&slot, true, same_thread).await, Ok((true, true)));
        assert_eq!(synced(&slot, false, same_thread).await, Ok((true, false)), "not allowed: handed off");
        let panicked = synced(&slot, true, || -> u32 { panic!("file code") }).await;
        assert_eq!(panicked, Err("the file code panicked".to_string()));
        assert_eq!(synced(&slot, true, || 7).await, Ok((7, true)), "a panic gives the slot back");
        assert_eq!(runtime_threads(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_one_append_runs_inline_another_is_handed_off() {
        static SLOT: InlineSlot = InlineSlot::new();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn(synced(&SLOT, true, move || {
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            1
        }));
        tokio::task::block_in_place(|| started_rx.recv().unwrap());
        assert_eq!(synced(&SLOT, true, || 2).await, Ok((2, false)), "the slot is held: handed off");
        go_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok((1, true)));
        assert_eq!(synced(&SLOT, true, || 3).await, Ok((3, true)), "given back");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn on_a_current_thread_runtime_it_goes_to_the_blocking_pool() {
        let here = std::thread::current().id();
        let slot = InlineSlot::new();
        assert_eq!(synced(&slot, true, move || std::thread::current().id() != here).await, Ok((true, false)));
    }
}
