//! What a standby metadata server answers: every request is refused with
//! [`ErrorCode::NotActive`], naming the active server and where to reach
//! it, so an admin sees where to go and an agent moves on to its next
//! address. Connections are authenticated as on the active server (the
//! standby holds the pool's server key and reads the pool's clients), so
//! nobody learns anything without a key the pool authorizes.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use volume_format::control::messages::{ControlError, ErrorCode};
use volume_format::lease::LeaseRecord;

use super::owner::Command;

/// The refusal a standby gives, from the owner record it last saw.
pub fn not_active_message(owner: Option<&LeaseRecord>, me: &str) -> String {
    match owner {
        Some(o) => format!(
            "this metadata server ({me}) is standing by; the pool is served by {} (host id {}) since {} at {}",
            o.name,
            o.host_id,
            super::durable::hms(o.since_unix_ms / 1000),
            if o.addrs.is_empty() { "an address it did not advertise".to_string() } else { o.addrs.join(", ") }
        ),
        None => format!("this metadata server ({me}) is standing by and has not seen the active server yet; retry"),
    }
}

/// Answers the commands of standby sessions until every sender is gone.
pub async fn run(mut commands: mpsc::Receiver<Command>, owner: watch::Receiver<Option<LeaseRecord>>, me: Arc<str>) {
    // Each session's kick sender is kept while it is connected: dropping
    // it would close the session before its first answer went out.
    let mut kicks = std::collections::BTreeMap::new();
    while let Some(cmd) = commands.recv().await {
        match cmd {
            Command::Request { reply, .. } => {
                let msg = not_active_message(owner.borrow().as_ref(), &me);
                let _ = reply.send(Err(ControlError::new(ErrorCode::NotActive, msg)));
            }
            Command::PublishMeta { done } => {
                let _ = done.send(());
            }
            Command::Connected { session, kick, .. } => {
                kicks.insert(session, kick);
            }
            Command::Disconnected { session } => {
                kicks.remove(&session);
            }
        }
    }
}
