//! Send deadlines: a write that would leave for the server after its
//! deadline fails unsent.
//!
//! Why: a shared-storage client may write to a device only while its lease
//! holds. It checks the lease when it admits an I/O, but a request can wait
//! after that — behind a busy connection, in a copy-on-write step, or while
//! the process is stopped (SIGSTOP, a paused VM) — and a write that reaches
//! the device after the lease ran out can overwrite what the volume's next
//! holder wrote. So the caller runs its device requests inside
//! [`with_send_deadline`], and the connection's writer task checks the
//! deadline right before a request's bytes go to the socket: a write past it
//! fails with [`IoErrorKind::Fenced`](crate::IoErrorKind::Fenced) and was
//! never sent, so the caller may send it again once its lease is renewed.
//!
//! Deadlines are on the lease clock ([`crate::clock`], `CLOCK_BOOTTIME`):
//! a process whose VM was paused past its deadline finds it passed.
//!
//! Only requests that change data carry the deadline (WRITE, TRIM,
//! WRITE_ZEROES); reads, FLUSH, BLOCK_STATUS and CACHE go as before.
//!
//! What this cannot cover: a request already in the socket buffer or in the
//! server's queue when the deadline passes, nor the instant between the
//! check and the write system call. Those are the device side's part (the
//! metadata server's timing rules, or a device server that fences).
//!
//! Why a task-local rather than a parameter: the deadline belongs to the
//! caller's I/O, and the request passes through layers that know nothing
//! about leases (device wrappers for metrics and fallback) on its way to the
//! connection; each of them runs in the caller's task.

use std::future::Future;

use crate::clock::LeaseInstant as Instant;

use crate::proto;

tokio::task_local! {
    static SEND_DEADLINE: Instant;
}

/// Runs `fut` with every data-changing NBD request it sends (through
/// [`NbdClient`](super::NbdClient)) bound to leave before `deadline`.
pub async fn with_send_deadline<F: Future>(deadline: Instant, fut: F) -> F::Output {
    SEND_DEADLINE.scope(deadline, fut).await
}

/// The send deadline the current task runs under, if any: for a device that
/// is not an NBD connection to enforce it the same way.
pub fn send_deadline() -> Option<Instant> {
    SEND_DEADLINE.try_with(|d| *d).ok()
}

/// The deadline a request of `command` sent now must leave by, if any.
pub(crate) fn deadline_for(command: u16) -> Option<Instant> {
    if !changes_data(command) {
        return None;
    }
    send_deadline()
}

fn changes_data(command: u16) -> bool {
    matches!(command, proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES)
}
