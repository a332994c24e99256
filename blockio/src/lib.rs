//! Async block I/O shared by every sanvol process.
//!
//! `blockio` knows nothing about pools or volumes: it moves blocks. The
//! metadata server, the agent and the backup job compose it with
//! `volume-format` to build the product.
//!
//! # Layout
//! - [`clock`]: the lease clock (`CLOCK_BOOTTIME`), which counts VM pauses.
//! - [`device`]: the [`BlockDevice`] trait every data path is written against.
//! - [`error`]: [`IoError`], an NBD-errno-shaped error every device returns.
//! - [`buffer_pool`]: reused buffers for large payloads (no page faults per
//!   megabyte moved).
//! - [`durable_file`]: a preallocated file appended to with synchronous
//!   direct writes (the write-back cache's log and its mirror).
//! - [`memory`], [`file`]: in-process backends (tests, demos, the server's
//!   own stores).
//! - [`proto`]: NBD wire constants and fixed-size header codecs shared by the
//!   client and the server (the single place the spec's numbers live).
//! - [`uri`]: NBD URI parsing (`nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://`).
//! - [`tls`]: NBD over TLS (`NBD_OPT_STARTTLS`) with rustls: client setup from
//!   a device URI, server setup from a certificates directory.
//! - [`client`]: the pipelined, multi-connection NBD client.
//! - [`server`]: the NBD server that serves any [`BlockDevice`].

pub mod blocking;
pub mod buffer_pool;
pub mod clock;
pub mod device;
pub mod durable_file;
pub mod error;
pub mod file;
pub mod memory;
pub mod park_poll;
pub mod proto;
pub mod server;
pub mod socket;
pub mod splice;

pub use device::{BlockDevice, BlockSizes, MetaContext, StatusExtent, ZeroFlags};
pub use error::{IoError, IoErrorKind};
pub use splice::Payload;
pub mod client;
pub mod tls;
pub mod uri;
