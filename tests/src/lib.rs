//! Helpers for the integration tests: start real peers (nbdkit, qemu-nbd,
//! nbd-server, the project's binaries) on temporary sockets and stop them
//! when the test ends, even on failure.

pub mod metrics;
pub mod peers;
pub mod proxy;
pub mod system;
pub mod tools;
pub mod volumes;
