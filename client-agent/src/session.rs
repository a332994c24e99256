//! The agent's control session with the metadata server: who the agent is,
//! where its servers are, and how the session can fail.
//!
//! The session's logic — connecting over every configured address with
//! backoff, renewing the lease, dispatching the server's events to the
//! volumes' gates, resuming handles after a reconnect — is part of the
//! agent's owner state machine ([`crate::core::link`] and
//! [`crate::core`]'s volume logic); the connection itself is a
//! [`ControlClient`](control_client::ControlClient) the owner's shell
//! ([`crate::owner`]) opens and reads.
//!
//! No timer is needed to stop I/O when the lease runs out: every gate
//! compares the clock with the lease it was last given and holds I/O once it
//! has passed.

use control_client::{ControlAddr, ControlClientError};
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Who the agent is and where its server is.
#[derive(Clone)]
pub struct SessionConfig {
    pub addr: ControlAddr,
    /// Further server addresses tried in turn when `addr` does not answer
    /// (`--mds` given several times).
    pub more_addrs: Vec<ControlAddr>,
    pub key: SigningKey,
    pub server_key: VerifyingKey,
    /// Shown by the server in client listings and conflict messages.
    pub name: String,
    /// Random per agent process; tells the server a restarted agent apart.
    pub instance: [u8; 16],
}

impl SessionConfig {
    /// Every server address, in the order they are tried.
    pub fn addrs(&self) -> Vec<ControlAddr> {
        std::iter::once(self.addr.clone()).chain(self.more_addrs.iter().cloned()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("not connected to the metadata server at {addr} (reconnecting{})", last.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    NotConnected { addr: String, last: Option<String> },
    /// The server's own message, verbatim (e.g. who holds the volume).
    #[error("{0}")]
    Server(String),
    #[error("metadata server: {0}")]
    Control(String),
    #[error("the metadata server answered {request} with an unexpected {response}")]
    Unexpected { request: &'static str, response: String },
    #[error("volume {volume}: {reason}")]
    Layout { volume: String, reason: String },
    #[error("the session has shut down")]
    ShutDown,
}

impl From<ControlClientError> for SessionError {
    fn from(e: ControlClientError) -> SessionError {
        match e {
            ControlClientError::Server(e) => SessionError::Server(e.message),
            ControlClientError::Closed => SessionError::NotConnected { addr: String::new(), last: None },
            other => SessionError::Control(other.to_string()),
        }
    }
}

/// Where the connection to the metadata server stands (what readiness
/// waiters and `status` see).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectState {
    Connecting {
        last_error: Option<String>,
    },
    Connected {
        epoch: u64,
    },
    /// The server refused us for a reason retrying cannot fix (wrong key, not
    /// authorized): the agent should exit and say why.
    Fatal(String),
    Stopped,
}
