//! Copies that run while the holders write: a resync of a device that came
//! back, or a remap (rebuild onto new space, move, evacuate), first copies
//! everything **online**, then only what was written meanwhile at the
//! recall point.
//!
//! Why: the copy of a volume's extents used to run entirely at a recall
//! point, with its holders drained — correct (no write can race the copy),
//! but the volume's I/O paused for as long as the copy took: seconds to
//! minutes for a large volume. Now the pause lasts as long as copying the
//! regions written *during* the online copy takes, typically a few.
//!
//! How (as md's resync and DRBD's, but with the intent log as the witness
//! instead of a lock per region):
//! 1. **Online pass.** The whole copy of the step runs as a job while the
//!    holders go on writing. The volume is [`super::core::Busy::Precopy`]: layout and
//!    snapshot changes, opens and server-side pre-image copies wait;
//!    intent marks and copy-on-write registrations do not (writes need
//!    them).
//! 2. **The witness.** A mirrored volume's agents record a region dirty at
//!    the server *before* their first write to it, and clear it only once
//!    no write to it is in flight ([`crate::server::intents`]). So a region
//!    that no handle had dirty when the pass started and that nobody marked
//!    while it ran had no write in flight at any moment of the pass: its
//!    copy is exact. The server keeps the others — dirty at the start, or
//!    marked since — as the step's *touched* regions; copy-on-write
//!    registrations of the volume during the pass mark its snapshot areas
//!    touched (their writes are not in the intent log).
//! 3. **At the recall point** (holders drained, as before) only the
//!    touched regions are copied again, then the change is committed and
//!    published as before.
//!
//! **The holders are told** (`ServerEvent::Recovery`, protocol 12): what
//! is copied and how far, at the start, every [`RECOVERY_PUSH_EVERY_MS`]
//! while it runs online, at the second pass, and when it is over. They
//! need not act on it — their writes stay as they are during the online
//! pass, and the second pass comes as a recall — but an operator on the
//! host sees in `sanvol-agent list` why the volume's I/O may pause.
//!
//! When it is used: mirrored volumes (only they keep an intent log) whose
//! writers all speak the intent protocol, and that have no write-back
//! cache (a cache mirror's replay writes to the devices without marks),
//! while they have holders (without, one pass with opens waiting copies
//! the same). Everything else is copied whole at the recall point, as
//! before. A failed online pass fails its step as a failed copy at the
//! recall point does (retried, or the operation ends; nothing committed).
//!
//! Who keeps the log: an agent of the intent protocol run with
//! `SANVOL_INTENT_LOG=off` writes without marks while it speaks the
//! protocol. It is told apart by what it does not send: an agent that
//! keeps the log asks `IntentResync` before its first I/O of every
//! attachment and records marks, so only volumes whose every writing
//! handle did either are copied online.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::atomic::Ordering;
use tracing::{info, warn};

use volume_format::control::messages::{ControlError, ErrorCode, OpenMode, RecoveryStatus, ServerEvent};
use volume_format::control::RECOVERY_PROTOCOL_MIN;
use volume_format::HandleId;

use crate::handles::SessionId;
use volume_format::metadata::{intent_region_bytes, IntentKey, PhysicalExtent};
use volume_format::VolumeId;

use super::core::{AfterJob, Core, Step};
use super::jobs::{DeviceExtents, ExtentCopy, Job, JobOutcome};

/// Which copy step an online pass belongs to: a volume may be the subject
/// of a resync and of an admin remap one after the other, and what one
/// pass copied says nothing of the other's targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecopyFor {
    Resync(volume_format::DeviceIndex),
    Remap,
}

/// The online pass of one volume's copy step and what was written meanwhile.
#[derive(Debug, Clone)]
pub struct Precopy {
    pub step: PrecopyFor,
    /// Regions (intent regions of the volume's live extents) dirty when the
    /// pass started or marked since.
    pub touched: BTreeSet<u64>,
    /// A copy-on-write registration of the volume happened meanwhile: its
    /// snapshot areas are copied again whole.
    pub cow_touched: bool,
    /// The online pass finished: the step's copy at the recall point is
    /// limited to what was touched.
    pub done: bool,
    /// When its holders were last told the progress (monotonic ms).
    pub told_ms: u64,
}

/// How often holders are told an online copy's progress.
pub const RECOVERY_PUSH_EVERY_MS: u64 = 1_000;

/// How a volume's step goes on once its online pass is done.
#[derive(Debug)]
pub enum PrecopyNext {
    /// A device's resync (`recovery`).
    Resync { device: volume_format::DeviceIndex, reply: super::core::ReplyId },
    /// An admin remap (`reconfig`).
    Remap { change: super::core::VolumeChange },
}

/// Copies in a job, for logs: (count, bytes).
fn copy_size(job: &Job) -> (usize, u64) {
    match job {
        Job::Resync { extent_bytes, copies, .. } => (copies.len(), copies.len() as u64 * extent_bytes),
        _ => (0, 0),
    }
}

impl PrecopyNext {
    fn step(&self) -> PrecopyFor {
        match self {
            PrecopyNext::Resync { device, .. } => PrecopyFor::Resync(*device),
            PrecopyNext::Remap { .. } => PrecopyFor::Remap,
        }
    }
}

impl Core {
    /// Whether `volume`'s copy steps may run an online pass first (see the
    /// module docs).
    pub(super) fn precopy_allowed(&self, volume: VolumeId) -> bool {
        // Without holders there is no I/O to keep going: one pass, with
        // opens waiting, copies the same.
        self.handles.on_volume(volume.0).next().is_some()
            && self.meta.volume(volume).is_some_and(|v| v.mirror_legs > 1)
            && self.meta.volume_cache(volume).is_none()
            && !self.has_legacy_writer(volume)
            && self.writers_keep_the_log(volume)
    }

    /// Whether the agent of every writable handle of `volume` showed, in
    /// this server's lifetime, that it keeps the write-intent log: it asked
    /// `IntentResync` (before its first I/O of every attachment) or
    /// recorded a mark. One without the log (`SANVOL_INTENT_LOG=off`, which
    /// still speaks the protocol) never does either. A handle restored
    /// after a server restart shows it at its next mark; until then its
    /// volume's copies run whole at the recall point.
    fn writers_keep_the_log(&self, volume: VolumeId) -> bool {
        self.handles
            .on_volume(volume.0)
            .filter(|h| h.mode != OpenMode::ReadOnly)
            .all(|h| self.intent_handles.contains(&h.id))
    }

    /// `handle`'s agent keeps the write-intent log (it asked a resync or
    /// recorded a mark). Handles gone are forgotten here too (a bound).
    pub(super) fn keeps_intent_log(&mut self, handle: u64) {
        let handles = &self.handles;
        self.intent_handles.retain(|h| handles.get(*h).is_some());
        self.intent_handles.insert(handle);
    }

    /// Whether `volume`'s online pass is running: what waits for
    /// [`super::core::Busy::Precopy`] waits.
    pub(super) fn precopy_running(&self, volume: VolumeId) -> bool {
        self.precopies.get(&volume).is_some_and(|p| !p.done)
    }

    /// Whether `volume`'s online pass for `step` is done (its recall-point
    /// copy is then limited to the touched regions).
    pub(super) fn precopied(&self, volume: VolumeId, step: PrecopyFor) -> bool {
        self.precopies.get(&volume).is_some_and(|p| p.done && p.step == step)
    }

    /// Starts the online pass of `job` for `volume`: records what is dirty
    /// now, and runs the copy with the volume [`super::core::Busy::Precopy`].
    pub(super) fn start_precopy(&mut self, volume: VolumeId, job: Job, next: PrecopyNext) -> Step {
        let mut touched = BTreeSet::new();
        for e in self.meta.intents_of(volume) {
            if let IntentKey::Dirty(_) = e.key {
                touched.extend(e.regions.iter());
            }
        }
        let (copies, bytes) = copy_size(&job);
        info!(%volume, copies, bytes, dirty_regions = touched.len(), "copying online while the holders write");
        let told_ms = self.now.mono_ms;
        self.precopies.insert(volume, Precopy { step: next.step(), touched, cow_touched: false, done: false, told_ms });
        let status = self.precopy_status(volume);
        self.push_recovery(volume, status);
        // One step per volume at a time: a resync and an admin step never
        // both start one (each checks `precopies` first).
        // Not in `busy` (see [`super::core::Busy::Precopy`]): `runnable` asks
        // `precopy_running`.
        Step::Job { job, busy: None, then: AfterJob::Precopied { volume, next } }
    }

    /// The online pass of `volume` reported back: the step goes on to its
    /// recall point (limited to the touched regions if the pass succeeded).
    pub(super) fn precopy_done(&mut self, volume: VolumeId, next: PrecopyNext, outcome: JobOutcome) -> Step {
        if let Err(why) = outcome.result {
            // As a failed copy at the recall point: the step failed (and is
            // retried, or the operation ends), nothing was committed.
            warn!(%volume, "the online copy failed: {why}");
            self.precopies.remove(&volume);
            self.push_recovery(volume, None);
            let reply = match next {
                PrecopyNext::Resync { reply, .. } => reply,
                PrecopyNext::Remap { .. } => super::reconfig::ADMIN_REPLY,
            };
            let e = ControlError::new(ErrorCode::Internal, format!("{why}; nothing was changed"));
            return Step::Done(Some((reply, Err(e))));
        }
        if let Some(p) = self.precopies.get_mut(&volume) {
            p.done = true;
            info!(%volume, touched_regions = p.touched.len(), snapshot_areas_touched = p.cow_touched,
                "online copy done; the regions written meanwhile are copied at the recall point");
        }
        let status = self.precopy_status(volume);
        self.push_recovery(volume, status);
        let name = self.meta.volume(volume).map(|v| v.name.clone()).unwrap_or_default();
        match next {
            PrecopyNext::Resync { device, reply } => {
                self.prepare_reconfigure_with(&name, super::core::VolumeChange::Resync { device }, reply, false)
            }
            PrecopyNext::Remap { change } => {
                self.prepare_reconfigure_with(&name, change, super::reconfig::ADMIN_REPLY, false)
            }
        }
    }

    /// Agents of `volume` marked `regions`: touched, if an online pass runs.
    pub(super) fn precopy_marked(&mut self, volume: VolumeId, regions: impl IntoIterator<Item = u64>) {
        if let Some(p) = self.precopies.get_mut(&volume) {
            if !p.done {
                p.touched.extend(regions);
            }
        }
    }

    /// A copy-on-write registration of `volume` is being committed.
    pub(super) fn precopy_cow_registered(&mut self, volume: VolumeId) {
        if let Some(p) = self.precopies.get_mut(&volume) {
            p.cow_touched = true;
        }
    }

    /// Keeps, of `copies` (made for `volume`, `unit_bytes` each), what must
    /// be copied again at the recall point after its online pass: the
    /// intent regions touched meanwhile, and the snapshot areas whole if a
    /// registration happened. The copies come back one intent region each,
    /// with that size; unchanged if no online pass is done.
    pub(super) fn limit_to_touched(
        &self,
        volume: VolumeId,
        step: PrecopyFor,
        unit_bytes: u64,
        copies: Vec<ExtentCopy>,
    ) -> (u64, Vec<ExtentCopy>) {
        let Some(p) = self.precopies.get(&volume).filter(|p| p.done && p.step == step) else {
            return (unit_bytes, copies);
        };
        let extent_bytes = self.meta.extent_bytes.max(1);
        let region_bytes = intent_region_bytes(extent_bytes);
        if !unit_bytes.is_multiple_of(region_bytes) {
            return (unit_bytes, copies);
        }
        let regions_per_extent = extent_bytes / region_bytes;
        // Where each live extent's legs are → its index.
        let live: BTreeMap<PhysicalExtent, u64> = self
            .meta
            .volume(volume)
            .into_iter()
            .flat_map(|v| v.extents.iter().enumerate())
            .flat_map(|(i, e)| e.legs.iter().map(move |l| (*l, i as u64)))
            .collect();
        let shift = |d: &DeviceExtents, by: u64| DeviceExtents {
            device: d.device,
            uri: d.uri.clone(),
            offsets: d.offsets.iter().map(|o| o + by).collect(),
        };
        let mut kept = Vec::new();
        for c in copies {
            for piece in 0..unit_bytes / region_bytes {
                let by = piece * region_bytes;
                let copy = ExtentCopy { to: shift(&c.to, by), from: c.from.iter().map(|f| shift(f, by)).collect() };
                let source = copy.from.first().and_then(|f| f.offsets.first().map(|at| (f.device, *at)));
                let keep = match source {
                    None => true,
                    Some((device, at)) => {
                        let start = at - at % extent_bytes;
                        match live.get(&PhysicalExtent { device, offset: start }) {
                            Some(i) => p.touched.contains(&(i * regions_per_extent + (at - start) / region_bytes)),
                            None => p.cow_touched,
                        }
                    }
                };
                if keep {
                    kept.push(copy);
                }
            }
        }
        info!(%volume, copies = kept.len(), region_bytes,
            "copying at the recall point what was written during the online copy");
        (region_bytes, kept)
    }

    /// Forgets `volume`'s online pass for `step` (the step ended, either
    /// way).
    pub(super) fn precopy_end(&mut self, volume: VolumeId, step: PrecopyFor) {
        if self.precopies.get(&volume).is_some_and(|p| p.step == step) {
            self.precopies.remove(&volume);
            self.push_recovery(volume, None);
        }
    }

    /// Where `volume`'s copy step stands, for its holders.
    fn precopy_status(&self, volume: VolumeId) -> Option<RecoveryStatus> {
        let p = self.precopies.get(&volume)?;
        let (what, done, total) = match p.step {
            PrecopyFor::Resync(device) => {
                let r = self.resyncs.get(&device)?;
                (format!("resync of device {device}"), r.copied.load(Ordering::Relaxed), r.copy_bytes)
            }
            PrecopyFor::Remap => {
                let op = self.operation.as_ref()?;
                let c = op.current.as_ref()?;
                (op.what.clone(), c.copied.load(Ordering::Relaxed), c.bytes_total)
            }
        };
        Some(RecoveryStatus { what, online: !p.done, bytes_done: done.min(total), bytes_total: total })
    }

    /// Tells `volume`'s holders (those that speak protocol 12) where its
    /// copy stands (`None`: it is over).
    fn push_recovery(&mut self, volume: VolumeId, status: Option<RecoveryStatus>) {
        let told: Vec<(SessionId, u64)> = self
            .handles
            .on_volume(volume.0)
            .flat_map(|h| h.sessions().map(move |s| (s, h.id)))
            .filter(|(s, _)| self.sessions.get(s).is_some_and(|peer| peer.version >= RECOVERY_PROTOCOL_MIN))
            .collect();
        for (session, handle) in told {
            self.send_event(session, ServerEvent::Recovery { handle: HandleId(handle), status: status.clone() });
        }
    }

    /// At every tick: holders of volumes copied online hear the progress
    /// every [`RECOVERY_PUSH_EVERY_MS`].
    pub(super) fn push_precopy_progress(&mut self) {
        let now_ms = self.now.mono_ms;
        let due: Vec<VolumeId> = self
            .precopies
            .iter()
            .filter(|(_, p)| !p.done && now_ms.saturating_sub(p.told_ms) >= RECOVERY_PUSH_EVERY_MS)
            .map(|(v, _)| *v)
            .collect();
        for volume in due {
            if let Some(p) = self.precopies.get_mut(&volume) {
                p.told_ms = now_ms;
            }
            let status = self.precopy_status(volume);
            self.push_recovery(volume, status);
        }
    }
}
