//! Everything in sanvol that is a *format*: bytes on a device or on the wire.
//!
//! Pure code over byte buffers and `Read`/`Write`: no sockets, no tokio. The
//! servers compose this crate with `blockio`; keeping the formats free of I/O
//! lets every decode path be tested exhaustively (property tests over bit
//! flips and torn writes) without a device in sight.
//!
//! Decoding never panics on input from a device or a peer: every decode path
//! returns a typed error that says what was wrong and what to do about it.
//!
//! # Layout
//!
//! - [`cache_log`]: the write-back cache's persistent log (records, superblock,
//!   ring space, crash-safe read back).
//! - [`codec`]: the one bincode configuration (fixed-width, big-endian, size
//!   limited) and crc32c helpers shared by every bincode-encoded record.
//! - `control`: the control protocol between agents/admins and the metadata
//!   server (framing, authentication, messages).
//! - [`ids`]: newtypes for identifiers (`VolumeId`, `DeviceIndex`, `HandleId`,
//!   `SnapshotId`) and ed25519 public keys (raw bytes; only the journal
//!   verifies signatures in this crate, see [`metadata::journal`]).
//! - [`label`]: the 4 KiB device label at offset 0 of every device (a fixed,
//!   hand-written layout so any tool can recognise a sanvol device), and
//!   [`label::DeviceLayout`], which plans where the metadata and data areas go.
//! - [`metadata`]: the pool metadata ([`metadata::PoolMetadata`]) and its
//!   atomic commit slots ([`metadata::MetadataArea`]); changes as deltas
//!   ([`metadata::MetaChange`]) and the signed metadata journal that commits
//!   them ([`metadata::journal`]); the extent allocator
//!   and volume create/grow/delete; snapshots and their copy-on-write maps
//!   ([`metadata::snapshot`]: where a snapshot's chunk reads from, the
//!   changed-block list between two snapshots, delete with merge).
//! - [`locks`]: byte-range locks on shared volumes: conflicts between
//!   handles and which writes an agent admits.
//! - [`description`]: the volume description the metadata server hands to
//!   agents.
//! - [`capability`]: capabilities and fence orders a fencing device server
//!   (`sanvol-target`) checks: who may write where, under which generation.
//! - [`fencing`]: the timing rules that keep an excluded holder's writes off
//!   plain NBD devices, and the longest device request they rest on.
//! - [`mapping`]: where a volume's bytes live (extents, legs, leg states,
//!   snapshot COW areas), built from a description (agents) or from the
//!   pool metadata (the server): one set of rules for both.

pub mod cache_log;
pub mod capability;
pub mod codec;
pub mod control;
pub mod description;
pub mod fencing;
pub mod ids;
pub mod label;
pub mod lease;
pub mod locks;
pub mod mapping;
pub mod metadata;

pub use description::{DescriptionError, DeviceEndpoint, VolumeDescription};
pub use ids::{DeviceIndex, HandleId, PublicKey, SnapshotId, VolumeId};
pub use label::{ByteRange, DeviceLabel, DeviceLayout, LabelError};
pub use mapping::{LegState, MapError, Segment, VolumeMap};
pub use metadata::{MetadataArea, MetadataError, PoolMetadata, SlotError};
