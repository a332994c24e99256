//! `sanvol-backup`: full and incremental backups of sanvol snapshots, read
//! through the metadata server's backup pseudo-device (an NBD server that
//! exports every snapshot as `VOLUME@SNAPSHOT`, with `base:allocation` and
//! a `sanvol:changed-since:OLDER` block-status context per older snapshot).
//!
//! # Layout
//! - [`repo`]: the repository format (one chain of backups per directory;
//!   manifests, indexes, data files, crash-safe commits). Its module doc is
//!   the format's reference.
//! - [`source`]: where snapshots are read from — backup channels to the
//!   metadata server, or any NBD URI (`--source`).
//! - [`job`]: making full and incremental backups (pipelined reads, zero
//!   detection).
//! - [`verify`]: checking a chain (structure, checksums).
//! - [`restore`]: writing a chain's snapshot to any NBD export.
//! - [`serve`]: a local unix-socket NBD bridge to the snapshots.
//! - [`tap`], [`serve_metrics`]: following a bridged NBD conversation to
//!   count reads per export for `serve --metrics-addr`.
//! - [`progress`]: progress bars and lines.
//! - [`cli`]: the command line.

pub mod cli;
pub mod job;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod serve;
pub mod serve_metrics;
pub mod source;
pub mod tap;
pub mod verify;

pub use job::{full, incremental, BackupSummary, JobOptions};
pub use restore::{restore, RestoreSummary};
pub use source::{SnapshotRef, Source};
