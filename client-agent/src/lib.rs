//! The sanvol client agent: attaches volumes and does their I/O directly
//! against the pool's devices.
//!
//! # Layout
//! - [`gate`]: the recall gate — admits, holds or fails each I/O of a volume
//!   (reconfiguration and leases), as a plain state machine.
//! - [`devices`]: the pool of NBD connections to devices, shared by volumes.
//! - [`session`]: the control session with the metadata server (lease
//!   renewal, recall/publish/revoke dispatch, reconnection).
//! - [`export`]: serving a volume as an NBD export (unix socket, loopback
//!   TCP) and the kernel-attach seam.
//! - [`volume`]: [`volume::VolumeDevice`], the direct data path of one
//!   attached volume (extent map, mirrors, concurrency) as a `BlockDevice`.
pub mod devices;
pub mod export;
pub mod gate;
pub mod session;
pub mod volume;

#[cfg(test)]
mod testing;
