//! The client side of sanvol's control protocol, shared by the agent, the
//! admin CLI and the backup job — so none of them links the metadata
//! server (its pool code, libblkid, the admin CLI).
//!
//! The message formats live in `volume_format::control`; this crate moves
//! them over sockets and does the cryptography. The metadata server uses
//! the server side of the same handshake ([`handshake::accept`]) and the
//! same framing, so both sides of every transcript live in one place.
//!
//! # Layout
//! - [`addr`]: where a metadata server listens (`HOST:PORT`, `unix:PATH`).
//! - [`framed`]: whole control frames over a tokio stream.
//! - [`handshake`]: both sides of the handshake: cleartext hellos, a Noise
//!   key exchange, mutual ed25519 proofs bound to it.
//! - [`secure`]: [`SecureStream`], the encrypted or integrity-only records
//!   every byte travels in after the handshake.
//! - [`client`]: [`ControlClient`], one authenticated connection with many
//!   requests in flight and server events on a channel.
//! - [`channel`]: opening data and backup channels (authenticated, then NBD).
//! - [`keys`]: ed25519 key files (`sanvol keygen`).
//! - [`fault`]: fault injection for crash tests (`SANVOL_FAULT`).
//! - [`agent_api`]: the agent's local control socket (JSON lines): types and
//!   a client.

pub mod addr;
pub mod agent_api;
pub mod channel;
pub mod client;
pub mod fault;
pub mod framed;
pub mod handshake;
pub mod keys;
pub mod secure;

pub use addr::{ControlAddr, ControlStream};
pub use channel::{ChannelError, ChannelIdentity};
pub use client::{ControlClient, ControlClientError, SentRequest};
pub use secure::SecureStream;
pub use volume_format::control::auth::ChannelMode;
