//! Control connections: framing over tokio streams, the mutual ed25519
//! handshake (both sides) and a request/reply client.
//!
//! The message formats live in `volume_format::control`; this module moves
//! them over sockets and does the cryptography. The agent and the admin CLI
//! use [`client::ControlClient`]; the server uses [`handshake::accept`].

pub mod addr;
pub mod backup;
pub mod client;
pub mod framed;
pub mod handshake;

pub use addr::ControlAddr;
pub use backup::{connect_backup_channel, BackupChannelError};
pub use client::{ControlClient, ControlClientError};
