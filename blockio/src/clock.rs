//! The lease clock: `CLOCK_BOOTTIME`, which keeps counting while the
//! machine is suspended or its VM paused.
//!
//! Why not `CLOCK_MONOTONIC` (`std`'s and tokio's `Instant`): it stops
//! while a VM is paused or a host suspended. A guest paused longer than its
//! lease would resume believing the lease still runs — while the metadata
//! server (on another machine, its clock running) released the volume and
//! another host writes to it — and write over the new holder's data. Every
//! lease, send deadline and lease window in sanvol is measured on this
//! clock instead: the agent's handle leases and device send deadlines, the
//! metadata server's handle leases and its pool-lease commit window.
//!
//! How: a [`LeaseInstant`] is tokio's monotonic `Instant` shifted by the
//! time the monotonic clock missed — `CLOCK_BOOTTIME − CLOCK_MONOTONIC`,
//! which grows by the length of every suspend or VM pause. So it reads
//! `CLOCK_BOOTTIME` (up to a constant), compares and adds like an
//! `Instant`, sleeps with tokio's timers (which wake late after a pause, and
//! the reader then sees the lease gone), and tests that pause tokio's clock
//! still move it with `tokio::time::advance`.
//!
//! Tests stand a VM pause in with [`jump`]: the whole process's lease clock
//! moves on by that much at once (the fault point `POINT:jump=MS`, see
//! `control_client::fault`), as if the VM had been paused that long with
//! the monotonic clock stopped.

use std::ops::Add;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A reading of the lease clock (`CLOCK_BOOTTIME`, see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseInstant(Instant);

impl LeaseInstant {
    /// Now, on the lease clock.
    pub fn now() -> LeaseInstant {
        LeaseInstant(Instant::now() + missed())
    }

    /// How long ago this was, on the lease clock (zero if it is ahead).
    pub fn elapsed(self) -> Duration {
        LeaseInstant::now().saturating_duration_since(self)
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: LeaseInstant) -> Duration {
        self.0.saturating_duration_since(earlier.0)
    }

    /// How long from now until this instant (zero if it has passed).
    pub fn remaining(self) -> Duration {
        self.saturating_duration_since(LeaseInstant::now())
    }

    /// Whether this instant has come.
    pub fn has_passed(self) -> bool {
        LeaseInstant::now() >= self
    }

    /// The tokio instant at which this lease instant comes if nothing is
    /// missed meanwhile: what to give tokio's timers. A timer can only wake
    /// late (after a pause), never early, so a waker re-reads the lease
    /// clock rather than trusting the timer.
    pub fn to_timer(self) -> Instant {
        self.0.checked_sub(missed()).unwrap_or(self.0)
    }

    /// Sleeps until this instant has come on the lease clock.
    pub async fn sleep_until(self) {
        while !self.has_passed() {
            tokio::time::sleep_until(self.to_timer()).await;
        }
    }
}

impl Add<Duration> for LeaseInstant {
    type Output = LeaseInstant;
    fn add(self, d: Duration) -> LeaseInstant {
        LeaseInstant(self.0 + d)
    }
}

/// Nanoseconds the monotonic clock missed, as seen so far (never shrinks).
static MISSED_NS: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds tests jumped the clock by ([`jump`]).
static JUMPED_NS: AtomicU64 = AtomicU64::new(0);
/// A reading of the two clocks further apart than this is not trusted (the
/// thread was preempted between them): the last good offset stands.
const READ_GAP_MAX_NS: u64 = 1_000_000;

/// Time the lease clock ran while the monotonic clock stood still.
fn missed() -> Duration {
    static FIRST: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    FIRST.get_or_init(first_reading);
    let seen = MISSED_NS.load(Ordering::Relaxed);
    let now = match boottime_minus_monotonic_ns() {
        Some(ns) if ns > seen => MISSED_NS.fetch_max(ns, Ordering::Relaxed).max(ns),
        _ => seen,
    };
    Duration::from_nanos(now.saturating_add(JUMPED_NS.load(Ordering::Relaxed)))
}

/// The offset before anything reads the clock: the suspends since boot,
/// retried until a reading is trusted, so the clock never leaps by them later
/// (a server's leases would then all run out at once).
fn first_reading() {
    for _ in 0..1000 {
        if let Some(ns) = boottime_minus_monotonic_ns() {
            MISSED_NS.fetch_max(ns, Ordering::Relaxed);
            return;
        }
    }
}

/// `CLOCK_BOOTTIME − CLOCK_MONOTONIC`, read between two monotonic readings
/// and taken against the later one, so it never overestimates (a lease
/// clock a little behind errs the safe way for the agent, by at most
/// [`READ_GAP_MAX_NS`] for the server, which waits seconds of margin).
fn boottime_minus_monotonic_ns() -> Option<u64> {
    let before = read(libc::CLOCK_MONOTONIC)?;
    let boot = read(libc::CLOCK_BOOTTIME)?;
    let after = read(libc::CLOCK_MONOTONIC)?;
    if after.saturating_sub(before) > READ_GAP_MAX_NS {
        return None;
    }
    Some(boot.saturating_sub(after))
}

fn read(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the pointer we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Moves this process's lease clock on by `by` at once: for tests, standing
/// for a VM pause of that length during which the monotonic clock stopped.
pub fn jump(by: Duration) {
    JUMPED_NS.fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_clock_never_runs_behind_the_monotonic_clock_and_never_goes_back() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let a = LeaseInstant::now();
            let m = Instant::now();
            let b = LeaseInstant::now();
            assert!(b >= a);
            assert!(b.saturating_duration_since(LeaseInstant(m)) < Duration::from_secs(3600 * 24 * 365));
            assert!(a.0 >= m.checked_sub(Duration::from_millis(1)).unwrap_or(m));
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_is_reached_by_tokio_time_and_timers_wake_for_it() {
        let deadline = LeaseInstant::now() + Duration::from_secs(3);
        assert!(!deadline.has_passed());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(deadline.has_passed());
        let later = LeaseInstant::now() + Duration::from_secs(5);
        later.sleep_until().await;
        assert!(later.has_passed());
    }
}
