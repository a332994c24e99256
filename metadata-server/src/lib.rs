//! The sanvol metadata server: pool metadata, authentication, handles and
//! leases, reconfiguration, the fallback data path, snapshots and the backup
//! pseudo-device — plus the pieces the agent, the admin CLI and the backup
//! job share with it.
//!
//! # Layout
//! - [`keys`]: ed25519 key files (`sanvol keygen`).
//! - [`handles`]: handles and leases as a plain state machine.
//! - [`resume`]: signed resume keys and handover tokens.
//! - [`control`]: control connections — framing, the mutual handshake, the
//!   request/reply client.
//! - [`config`]: `sanvol-mds --config FILE`.
//! - [`pool`]: the pool on its devices — open, read the newest metadata,
//!   commit, and `pool init`.
//! - [`server`]: the control server (`sanvol-mds`): one owner task for the
//!   pool state, thin session tasks.
//! - [`cli`]: the admin CLI (`sanvol`).
//! - [`fault`]: fault injection for crash tests (`SANVOL_FAULT`).

pub mod cli;
pub mod config;
pub mod control;
pub mod fault;
pub mod handles;
pub mod keys;
pub mod pool;
pub mod resume;
pub mod server;
