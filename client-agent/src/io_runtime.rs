//! The runtime the agent's I/O runs on: how many threads, and how long an
//! idle one polls before it sleeps ([`blockio::park_poll`]). One place, so
//! every process that stands for the agent (`sanvol-agent run`, and the
//! `cache_serve` example that `bench/cache.sh` measures the cache through)
//! runs its I/O the same way.
//!
//! Why one thread by default: each request then crosses no thread boundary,
//! which measured ~2× the IOPS of a multi-threaded runtime at 4k QD32 on a
//! 2-core host shared with the workload (bench/agent.sh); and an
//! unmirrored cached 4k QD1 write 1.18-1.22× (bench/README.md, "cache_serve
//! on the agent's runtime").

use std::time::Duration;

/// The polling window with more than one CPU, in µs.
pub const POLL_US_DEFAULT: u64 = 50;

/// How long an idle I/O thread polls before it sleeps: `poll_us` as
/// given, or [`POLL_US_DEFAULT`] with more than one CPU and none with one
/// (where polling would take the CPU from the application).
pub fn poll_window(poll_us: Option<u64>) -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let us = poll_us.unwrap_or(if cpus > 1 { POLL_US_DEFAULT } else { 0 });
    Duration::from_micros(us)
}

/// Builds the I/O runtime: `io_threads` threads (one: a current-thread
/// runtime), polling for `poll` before parking (zero: never).
pub fn build(io_threads: usize, poll: Duration) -> std::io::Result<tokio::runtime::Runtime> {
    blockio::park_poll::set_window(poll);
    if io_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(blockio::park_poll::before_park)
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(io_threads)
            .enable_all()
            .on_thread_park(blockio::park_poll::before_park)
            .build()
    }
}
