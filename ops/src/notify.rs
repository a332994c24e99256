//! systemd readiness: with `Type=notify` systemd starts a unit's dependents
//! (`After=`) only once the service says `READY=1` on the datagram socket
//! named by `NOTIFY_SOCKET`. Without that variable (not under systemd)
//! these are no-ops.

/// Tells systemd the service is ready, with a one-line status. Failures are logged, never fatal: a service
/// that works but cannot say so is better than one that exits.
pub fn ready(status: &str) {
    send(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping (flushing and detaching).
pub fn stopping() {
    send(&[sd_notify::NotifyState::Stopping]);
}

fn send(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd through NOTIFY_SOCKET: {e}");
    }
}
