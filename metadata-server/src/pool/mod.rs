//! The pool on its devices: connecting to them, reading the newest valid
//! metadata, and committing new generations.
//!
//! Why the server talks to devices only through here: "an admin change is
//! acknowledged only after it is durable" is a property of one function,
//! [`Pool::commit`], and it is easiest to keep true when nothing else writes
//! metadata. The server's owner task calls it with the metadata it wants;
//! only if it returns `Ok` does the owner adopt that metadata.
//!
//! Commit protocol (the format is in `volume_format::metadata::slots`): the
//! next generation goes into the oldest (or first invalid) slot of every
//! device holding a metadata copy, each written with FUA and then flushed.
//! Generations only grow, even past failed commits, so a partly written
//! failed commit can never be confused with a later successful one.
//!
//! - [`device`]: one device: connect, label, read and write slots.
//! - [`journal`]: the metadata journal on the devices: open = newest
//!   checkpoint + replay, a commit = one signed entry appended to every
//!   copy (what replaces [`Pool::commit`] once the server moves to it).
//! - [`init`]: `sanvol pool init`.
//! - [`add`]: `sanvol device add` (a device labelled for a running pool).
//! - [`probe`]: what a device carries before `init` overwrites it.

pub mod add;
pub mod device;
pub mod init;
pub mod journal;
pub mod probe;

use blockio::uri::NbdUri;
use tracing::{info, warn};
use uuid::Uuid;
use volume_format::metadata::journal::LoadError;
use volume_format::metadata::{DeviceState, MetadataArea, MetadataError, PoolMetadata};
use volume_format::LabelError;

pub use device::PoolDevice;

/// Most devices holding a copy of the pool metadata: enough to survive two
/// device failures, few enough that a commit stays cheap.
pub const METADATA_COPIES_MAX: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("device {uri}: cannot connect: {reason}")]
    Connect { uri: String, reason: String },
    #[error("device {uri}: {what} failed: {reason}")]
    Io { uri: String, what: String, reason: String },
    #[error("device {uri} has no valid sanvol label ({source}); is it a device of this pool? (`sanvol pool init` labels devices)")]
    Label { uri: String, source: LabelError },
    #[error(
        "device {uri} belongs to pool {found}, but the other devices belong to pool {expected}; fix the `devices` list"
    )]
    WrongPool { uri: String, expected: Uuid, found: Uuid },
    #[error("none of the configured devices could be read as a sanvol pool: {0}")]
    NoPool(String),
    #[error("no valid pool metadata on any device ({0}); the metadata copies are lost or the devices are wrong")]
    NoMetadata(String),
    #[error("pool metadata: {0}")]
    Metadata(#[from] MetadataError),
    #[error("pool metadata: {0}")]
    Journal(#[from] LoadError),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("device {uri} carries {found} (blkid); use --force to overwrite it")]
    InUse { uri: String, found: String },
    #[error("{0}")]
    Invalid(String),
}

/// The pool's devices, as the server holds them.
pub struct Pool {
    pub pool_uuid: Uuid,
    /// Every device reached or recorded, in metadata order where known.
    pub devices: Vec<PoolDevice>,
    /// The highest generation ever attempted (committed or not).
    generation_attempted: u64,
    /// The metadata journal, when the pool was opened with it
    /// ([`Pool::open_journaled`]); whole-pool commits are refused then.
    journal: Option<journal::PoolJournal>,
}

impl Pool {
    /// Connects to `uris`, checks they form one pool, and reads the newest
    /// valid metadata. Devices the metadata records but `uris` misses are
    /// connected through their recorded URIs. Unreachable devices are logged
    /// and kept (marked unreachable); bad slots are logged.
    pub async fn open(uris: &[NbdUri]) -> Result<(Pool, PoolMetadata), PoolError> {
        let (mut devices, pool_uuid) = connect_labelled(uris).await?;
        let mut slots = Vec::new();
        let mut slot_names = Vec::new();
        for d in devices.iter_mut().filter(|d| d.label.is_some()) {
            for (i, slot) in d.read_slots(pool_uuid).await.into_iter().enumerate() {
                slots.push(slot);
                slot_names.push((d.uri.clone(), i));
            }
        }
        let newest = MetadataArea::choose_newest(slots).map_err(|e| match e {
            MetadataError::NoValidSlot { errors } => {
                let nonempty: Vec<String> = errors
                    .iter()
                    .filter(|(_, e)| !e.is_empty())
                    .map(|(i, e)| format!("{} slot {}: {e}", slot_names[*i as usize].0, slot_names[*i as usize].1))
                    .collect();
                PoolError::NoMetadata(if nonempty.is_empty() {
                    "every slot is empty".into()
                } else {
                    nonempty.join("; ")
                })
            }
            other => PoolError::Metadata(other),
        })?;
        for (i, e) in &newest.bad_slots {
            if !e.is_empty() {
                let (uri, slot) = &slot_names[*i as usize];
                warn!(device = %uri, slot, "metadata slot unusable (an older or torn copy is harmless): {e}");
            }
        }
        let meta = newest.metadata;
        info!(pool = %meta.pool_uuid, name = %meta.pool_name, generation = meta.generation, "pool metadata loaded");
        connect_recorded(&mut devices, &meta).await;
        let generation_attempted = devices.iter().flat_map(|d| d.generations.iter().flatten()).copied().max();
        let pool = Pool {
            pool_uuid,
            devices,
            generation_attempted: generation_attempted.unwrap_or(meta.generation),
            journal: None,
        };
        Ok((pool, meta))
    }

    /// The device with `uuid`, if reached.
    pub fn device(&self, uuid: Uuid) -> Option<&PoolDevice> {
        self.devices.iter().find(|d| d.expected_uuid == Some(uuid))
    }

    /// Whether the device with `uuid` fences, as its description on the
    /// server's connection says (`None` without a connection).
    pub fn fences(&self, uuid: Uuid) -> Option<bool> {
        self.device(uuid)?.fences()
    }

    /// Whether the server currently reaches the device with `uuid`.
    pub fn reachable(&self, uuid: Uuid) -> bool {
        self.device(uuid).is_some_and(|d| d.client.is_some() && d.error.is_none())
    }

    /// Writes `next` as the next generation to every metadata copy and
    /// flushes each. Returns the committed metadata (with its generation);
    /// on error nothing the caller holds has changed, and the caller must not
    /// acknowledge the change.
    ///
    /// `current` is the last acknowledged metadata (`None` at pool init). If
    /// the new generation reached some copies but not all, those copies are
    /// at once overwritten with `current` at a newer generation: otherwise a
    /// restart would read the refused change back and show something that
    /// was never acknowledged.
    pub async fn commit(
        &mut self,
        current: Option<&PoolMetadata>,
        mut next: PoolMetadata,
    ) -> Result<PoolMetadata, PoolError> {
        if self.journal.is_some() {
            return Err(PoolError::Commit(
                "the pool was opened with the metadata journal; commit changes with Pool::commit_changes".into(),
            ));
        }
        let generation = self.generation_attempted.max(next.generation) + 1;
        self.generation_attempted = generation;
        next.generation = generation;
        next.check().map_err(|e| PoolError::Commit(format!("refusing to write inconsistent metadata: {e}")))?;
        let copies = metadata_holders(&next);
        let (written, failures) = self.write_copies(&copies, generation, &next).await;
        // Every copy must be current: a copy left behind would let an older
        // generation win if the others are lost later.
        if !failures.is_empty() {
            warn!(generation, written = written.len(), "commit failed: {}", failures.join("; "));
            if let (false, Some(current)) = (written.is_empty(), current) {
                self.supersede(&written, current).await;
            }
            return Err(PoolError::Commit(failures.join("; ")));
        }
        let written = written.len();
        // Debug: copy-on-write registrations commit often; the requests log what changed.
        tracing::debug!(generation, copies = written, "pool metadata committed");
        Ok(next)
    }

    /// Writes `meta` as `generation` to each copy; returns the copies written
    /// and the failures.
    async fn write_copies(
        &mut self,
        copies: &[Uuid],
        generation: u64,
        meta: &PoolMetadata,
    ) -> (Vec<Uuid>, Vec<String>) {
        let mut written = Vec::new();
        let mut failures = Vec::new();
        for uuid in copies {
            let Some(device) = self.devices.iter_mut().find(|d| d.expected_uuid == Some(*uuid)) else {
                failures.push(format!("device {uuid} holding a metadata copy is not reachable"));
                continue;
            };
            match device.write_generation(self.pool_uuid, generation, meta).await {
                Ok(()) => written.push(*uuid),
                Err(e) => failures.push(e.to_string()),
            }
        }
        (written, failures)
    }

    /// After a partial commit, rewrites the copies that took it with the
    /// acknowledged metadata at a newer generation.
    async fn supersede(&mut self, copies: &[Uuid], current: &PoolMetadata) {
        let generation = self.generation_attempted + 1;
        self.generation_attempted = generation;
        let mut meta = current.clone();
        meta.generation = generation;
        let (written, failures) = self.write_copies(copies, generation, &meta).await;
        if failures.is_empty() {
            info!(generation, copies = written.len(), "superseded the partial commit with the acknowledged metadata");
        } else {
            tracing::error!(
                generation,
                "could not supersede a partial commit on every copy ({}): until the next successful commit, a restart may show the refused change",
                failures.join("; ")
            );
        }
    }
}

/// The devices that hold a metadata copy: the online devices flagged so, or
/// every online device if none is. A device marked failed holds no current
/// copy: writing to it would fail every commit, including the one that marks
/// it failed.
pub fn metadata_holders(meta: &PoolMetadata) -> Vec<Uuid> {
    // A device resyncing is reachable and labelled: its copy rejoins (a
    // checkpoint brings it current) as soon as it is back.
    let online = |d: &&volume_format::metadata::DeviceRecord| {
        matches!(d.state, DeviceState::Online | DeviceState::Resyncing { .. })
    };
    let holders: Vec<Uuid> =
        meta.devices.iter().filter(|d| d.holds_metadata).filter(online).map(|d| d.device_uuid).collect();
    if holders.is_empty() {
        meta.devices.iter().filter(online).map(|d| d.device_uuid).collect()
    } else {
        holders
    }
}

/// Connects to `uris` and checks they form one pool; returns the devices
/// (unusable ones logged and kept) and the pool's UUID.
async fn connect_labelled(uris: &[NbdUri]) -> Result<(Vec<PoolDevice>, Uuid), PoolError> {
    let mut devices = Vec::new();
    for uri in uris {
        devices.push(PoolDevice::connect(uri.to_string(), uri).await);
    }
    let mut pool_uuid = None;
    for d in &devices {
        match (&d.label, &d.error) {
            (Some(label), _) => match pool_uuid {
                None => pool_uuid = Some((label.pool_uuid, d.uri.clone())),
                Some((expected, _)) if expected != label.pool_uuid => {
                    return Err(PoolError::WrongPool { uri: d.uri.clone(), expected, found: label.pool_uuid })
                }
                Some(_) => {}
            },
            (None, Some(e)) => warn!(device = %d.uri, "pool device unusable: {e}"),
            (None, None) => {}
        }
    }
    let Some((pool_uuid, _)) = pool_uuid else {
        let reasons: Vec<String> =
            devices.iter().map(|d| format!("{}: {}", d.uri, d.error.as_deref().unwrap_or("no label"))).collect();
        return Err(PoolError::NoPool(reasons.join("; ")));
    };
    Ok((devices, pool_uuid))
}

/// Connects the devices `meta` records but `devices` misses (through their
/// recorded URIs), and records which device each entry stands for.
async fn connect_recorded(devices: &mut Vec<PoolDevice>, meta: &PoolMetadata) {
    for record in &meta.devices {
        let known = devices.iter().any(|d| d.label.is_some_and(|l| l.device_uuid == record.device_uuid));
        if !known {
            let mut d = match record.uri.parse::<NbdUri>() {
                Ok(uri) => PoolDevice::connect(record.uri.clone(), &uri).await,
                Err(e) => PoolDevice::unreachable(record.uri.clone(), format!("bad recorded URI: {e}")),
            };
            if let Some(label) = d.label {
                if label.device_uuid != record.device_uuid {
                    d = PoolDevice::unreachable(
                        record.uri.clone(),
                        format!("the device there is {}, not {}", label.device_uuid, record.device_uuid),
                    );
                }
            }
            if let Some(e) = &d.error {
                warn!(device = %record.uri, index = %record.index, "pool device unreachable: {e}");
            }
            d.expected_uuid = Some(record.device_uuid);
            devices.push(d);
        }
    }
    for d in devices.iter_mut() {
        if let Some(label) = d.label {
            d.expected_uuid = Some(label.device_uuid);
            if meta.devices.iter().all(|r| r.device_uuid != label.device_uuid) {
                warn!(device = %d.uri, "device is labelled for this pool but the metadata does not list it (an interrupted init?); ignoring it");
            }
        }
    }
}
