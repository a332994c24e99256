//! The timing rules that keep an excluded holder's writes off plain NBD
//! devices, and their one shared number.
//!
//! A plain NBD server (nbdkit, qemu-nbd) accepts any write from anyone
//! connected, so nothing at the device stops a holder the metadata server
//! gave up on. What does, is time, on both sides:
//!
//! 1. Leases run on `CLOCK_BOOTTIME` (agent and server), which counts a VM
//!    pause or a suspend: a paused agent resumes with its lease run out.
//! 2. A data-changing request leaves the agent for a device only while the
//!    handle's lease runs, checked right before its bytes go to the socket.
//! 3. Every direct device request is given at most
//!    [`DEVICE_REQUEST_MAX_MS_DEFAULT`] (the agent's
//!    `--device-request-max-ms`); on the timeout the agent closes that
//!    device connection, so nothing sent on it is still waited for, and the
//!    request fails or goes through the server (fallback) — by then it was
//!    sent at least that long ago.
//! 4. The metadata server acts on a holder's lease only once lease + the
//!    longest device request (its `device_request_max_ms`, at least every
//!    agent's) has passed: it breaks a handle, releases an expired one,
//!    excludes a silent holder from a recall (and commits the layout change
//!    that waited for it) only then.
//!
//! So a write sent under the lease, even one stuck in a device server's
//! queue, has landed or failed before anyone else can be given the volume —
//! provided the device server executes a request within that time after
//! receiving it, or never. A device server that can hold a request longer
//! (a stalled storage backend behind it) needs real fencing at the device.

/// Default of the longest a direct device request may take (agent) and is
/// waited for past a lease (server), in milliseconds. Shorter than the
/// default lease (10 s), so a request that times out does so while a
/// renewed lease still runs.
pub const DEVICE_REQUEST_MAX_MS_DEFAULT: u64 = 5_000;
/// Shortest accepted: below it, a busy device would fail requests.
pub const DEVICE_REQUEST_MAX_MS_MIN: u64 = 100;
/// Longest accepted: the server waits this long past a lease before it may
/// give a dead holder's volume to anyone else.
pub const DEVICE_REQUEST_MAX_MS_MAX: u64 = 600_000;
