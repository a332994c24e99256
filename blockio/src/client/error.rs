//! Errors of connecting to an NBD export.
//!
//! Only setting up a connection has its own error type: once connected, the
//! client is a [`crate::BlockDevice`] and every request fails with an
//! [`crate::IoError`]. Each variant names the server it talked to, so an
//! operator reading a log knows which device of a pool is at fault.

use std::io;

/// Why [`super::NbdClient::connect`] (or `list_exports`) failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be opened (nothing listening, no such file, ...).
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    /// Connecting plus handshaking took longer than `connect_timeout`.
    #[error("{target}: connect and handshake timed out after {after_ms} ms")]
    Timeout { target: String, after_ms: u64 },
    /// An operation this client does only without TLS (listing exports)
    /// was asked of an `nbds` URI.
    #[error("{uri}: listing exports over TLS is not supported; connect to an export instead")]
    TlsUnsupported { uri: String },
    /// TLS was required but could not be set up or negotiated.
    #[error("{target}: TLS: {reason}")]
    Tls { target: String, reason: String },
    /// The server refused an option with an error reply.
    #[error("{target}: handshake: server said {reply} to {option} for export {export:?}{}", message_suffix(message))]
    Refused { target: String, option: &'static str, export: String, reply: String, message: String },
    /// The server broke the protocol during the handshake (bad magic,
    /// impossible lengths, closed the connection, ...).
    #[error("{target}: handshake: {reason}")]
    Protocol { target: String, reason: String },
    /// Reading or writing the socket failed during the handshake.
    #[error("{target}: handshake I/O failed while {doing}: {source}")]
    Io {
        target: String,
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    /// The server lacks something the caller asked for.
    #[error("{target}: {what}")]
    Unsupported { target: String, what: String },
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}
