//! The sanvol client agent: attaches volumes and does their I/O directly
//! against the pool's devices.
//!
//! # Layout
//! - [`gate`]: the recall gate — admits, holds or fails each I/O of a volume
//!   (reconfiguration and leases), as a plain state machine.
pub mod gate;
