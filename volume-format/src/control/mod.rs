//! The control protocol between agents/admins and the metadata server.
//!
//! A control connection carries length-prefixed bincode frames
//! ([`frame`]). It opens with a version exchange and a mutual ed25519
//! challenge–response ([`auth`]): the server signs a transcript that
//! includes the client's fresh nonce (so the client can pin the server's key
//! and knows the proof is live), and the client signs a transcript that
//! includes the server's fresh nonce (so a recorded proof cannot be
//! replayed). After that, the client sends [`messages::ClientMessage`]s and
//! the server answers with [`messages::ServerMessage`]s, which also carry
//! unsolicited events (recalls, new layouts).
//!
//! Everything here is pure: encoding, decoding and the exact bytes that get
//! signed. Signing and verifying live with the processes that hold keys.

pub mod auth;
pub mod frame;
pub mod messages;
pub mod resume;

/// The protocol version this build speaks.
///
/// One line per bump:
/// - 1: initial — hello/auth, admin operations, open/lease/recall/publish.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest protocol version this build still accepts.
pub const PROTOCOL_VERSION_MIN: u32 = 1;
