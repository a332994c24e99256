//! The sanvol client agent: attaches volumes and does their I/O directly
//! against the pool's devices.
//!
//! A volume's data never passes through the metadata server: the agent
//! opens the volume there (getting its description, extent map and a lease),
//! connects to the devices itself and serves the volume locally as an NBD
//! export. The metadata server stays in control through the lease and the
//! recall–publish cycle, both enforced by each volume's [`gate::Gate`].
//!
//! Embedding: [`volume::VolumeDevice`] is a plain `BlockDevice` over injected
//! device handles; [`agent::Agent`] is the whole agent without its CLI;
//! [`core::AgentCore`] is its control logic without any I/O (for tests and
//! simulation).
//!
//! # Layout
//! - [`gate`]: the recall gate — admits, holds or fails each I/O of a volume
//!   (reconfiguration and leases), as a plain state machine.
//! - [`volume`]: [`volume::VolumeDevice`], the direct data path of one
//!   attached volume (extent map, mirrors, concurrency) as a `BlockDevice`.
//! - [`cache`]: the write-back cache (a local log acknowledged on append
//!   and on the server's mirror, background destage, replay after a crash)
//!   as a `BlockDevice` in front of an exclusively attached cached volume.
//! - [`intent`]: the write-intent log of mirrored volumes (regions recorded
//!   dirty before their first write, cleared lazily).
//! - [`cow`]: client-side copy-on-write for snapshots (preserve a chunk
//!   before its first overwrite; batched registrations).
//! - [`devices`]: the pool of NBD connections to devices, shared by volumes,
//!   with each device's direct-path state.
//! - [`fallback`]: I/O through the metadata server when a direct path fails
//!   (data channels, reports, probing back).
//! - [`core`]: the agent's control plane as one sans-IO state machine —
//!   attachments, handles, leases, the connection, recalls, registrations,
//!   device paths — applied input by input with an injected clock.
//! - [`owner`]: the one task that owns the core (select → apply → perform
//!   effects; long steps run as tasks that report back).
//! - [`session`]: who the agent is, its server addresses, session errors.
//! - [`state_dir`]: the state file (resume keys, how each volume is served)
//!   that lets a restarted agent take its handles back at once, and the lock
//!   that makes it safe.
//! - [`export`]: serving a volume as an NBD export (unix socket, loopback
//!   TCP) and the kernel-attach seam.
//! - [`agent`]: the handle callers use (attach/detach/list/status, graceful
//!   shutdown), each a command to the owner.
//! - [`config_file`]: the agent's config file (every `run` option and the
//!   volumes to attach at start), rewritten in place by `attach --persist`.
//! - [`persist`]: attaching the config file's volumes at start (retried with
//!   a bounded backoff) and `attach/detach --persist`.
//! - [`control`]: the local control socket (JSON lines) and its client.
//! - [`io_runtime`]: the runtime the agent's I/O runs on (threads, polling
//!   before sleeping), shared with the `cache_serve` example.
//! - [`metrics`]: the agent's Prometheus metrics (a counting wrapper around
//!   each attached volume; control-plane events).
//! - [`kernel`]: kernel attach — a volume as `/dev/nbdX` through the NBD driver's netlink
//!   interface, and reattach after an agent restart.

pub mod agent;
pub mod cache;
pub mod config_file;
pub mod control;
pub mod core;
pub mod cow;
pub mod cow_behind;
pub mod credentials;
pub mod devices;
pub mod export;
pub mod fallback;
pub mod gate;
pub mod intent;
pub mod io_runtime;
pub mod kernel;
pub mod metrics;
pub mod owner;
pub mod persist;
pub mod session;
pub mod state_dir;
pub mod volume;

#[cfg(test)]
mod testing;
