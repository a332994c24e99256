//! The sanvol metadata server: pool metadata, authentication, handles and
//! leases, reconfiguration, the fallback data path, snapshots and the backup
//! pseudo-device; and the admin CLI. What clients share with it (framing,
//! the handshake, the control client, key files) is the `control-client`
//! crate, so no client links this one.
//!
//! # Layout
//! - [`handles`]: handles and leases as a plain state machine.
//! - [`resume`]: signed resume keys and handover tokens.
//! - [`config`]: `sanvol-mds --config FILE`.
//! - [`mirror`]: the server's mirror of agents' write-back caches.
//! - [`pool`]: the pool on its devices — open, read the newest metadata,
//!   commit, and `pool init`.
//! - [`server`]: the control server (`sanvol-mds`): one owner task for the
//!   pool state, thin session tasks.
//! - [`cli`]: the admin CLI (`sanvol`).

pub mod cli;
pub mod config;
pub mod handles;
pub mod mirror;
pub mod pool;
pub mod resume;
pub mod server;
pub mod targets;
