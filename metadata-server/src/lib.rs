//! The sanvol metadata server: pool metadata, authentication, handles and
//! leases, reconfiguration and the fallback data path — plus the pieces the
//! agent and the admin CLI share with it.
//!
//! # Layout
//! - [`keys`]: ed25519 key files (`sanvol keygen`).
//! - [`handles`]: handles and leases as a plain state machine.
//! - [`control`]: control connections — framing, the mutual handshake, the
//!   request/reply client.

pub mod control;
pub mod handles;
pub mod keys;
