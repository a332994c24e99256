//! A device that comes back is used again: failed devices are probed, and
//! one that answers with its label is resynchronized and brought online.
//!
//! Why: one transient failure (an `nbdkit` restarted, a cable pulled and
//! put back) used to mark a device failed for good — its mirror legs never
//! redundant again, its metadata copy lost — until an admin intervened.
//!
//! How:
//! 1. **Probe.** Every device marked [`DeviceState::Failed`] is checked on
//!    a bounded exponential backoff ([`DeviceProbe`]): a label read, whose
//!    device UUID must be the one the pool recorded (a device job, never
//!    in the owner loop).
//! 2. **Resyncing.** When it answers, [`DeviceState::Resyncing`] is
//!    committed. From then on agents given a layout write its legs but never
//!    read them (but for plain volumes' extents, their only copy); the
//!    metadata copy on it rejoins (a checkpoint brings it current in that
//!    very commit).
//! 3. **Copy, per volume: online, then at a recall point.** For each
//!    mirrored volume with a leg on it, every extent of the volume on the
//!    device (live and snapshot copy-on-write areas) is copied from a leg on
//!    an online device, as a job, **while the holders write** (`precopy`).
//!    Then the holders are recalled (drained, I/O complete), the regions
//!    written during that copy — the intent log says which — are copied
//!    again, a [`MetaChange::LayoutBump`] is committed and the holders
//!    resume with the resyncing layout, writing both legs. The second copy,
//!    while drained, is what keeps a write from being lost under the copy:
//!    a holder that still had the layout without the device wrote only the
//!    other legs, or wrote a region after the copy read it; after the
//!    recall it writes every leg itself. A volume without holders (or with
//!    a writer of an older protocol, or a write-back cache) is copied whole
//!    at the recall point, with its opens waiting.
//! 4. **Online.** Once every volume is done the device is committed online
//!    and the holders are told: reads use its legs again.
//!
//! Only the regions written while the device was away are copied (its
//! stale set in the write-intent log, `volume_format::metadata::intent`);
//! a device that failed before the pool recorded stale sets has its live
//! extents copied whole, and snapshot copy-on-write extents are always
//! copied whole (their writes are not in the intent log).
//!
//! **A metadata copy that misses a commit.** A commit must reach every
//! copy on an online device; one on a device that died is refused until the
//! device is marked failed (its copy then leaves the set written). Agents
//! only report devices their own I/O finds dead — and a mirrored volume's
//! first write to a region waits for a commit (its write-intent mark), so
//! the report may never come. So the server checks the device of every copy
//! a commit missed while another copy took it (a failure of every copy is
//! the server's own: its lease, its network), and marks it failed if it
//! cannot read its label; the refused requests are retried by their
//! senders and commit to the copies left. A device that answers its check
//! but whose copy keeps missing commits (its label reads, its writes fail)
//! would stall every commit: after [`COPY_MISSES_WHILE_REACHABLE_MAX`]
//! misses in a row it is marked failed all the same. Only with probing on:
//! a device failed this way must be able to come back.
//!
//! Known limits: holders pause I/O for the second copy (what they wrote
//! during the online one): short for a volume written here and there,
//! as long as a whole copy for one rewritten everywhere meanwhile. A
//! resync that fails marks the device failed again (probing starts over).
//! Progress is kept in memory: after a server restart a resyncing device is
//! resynchronized again from the start.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{info, warn};
use volume_format::control::messages::{ControlError, Response};
use volume_format::metadata::{intent_region_bytes, DeviceState, IntentKey, LogicalExtent, MetaChange, PoolMetadata};
use volume_format::{DeviceIndex, VolumeId};

use super::commit::CommitFailed;
use super::core::{AfterCommit, AfterJob, Change, Core, ReplyId, Step, VolumeChange};
use super::jobs::{DeviceExtents, ExtentCopy, Job, JobOutcome};
use super::precopy::{PrecopyFor, PrecopyNext};

/// First and longest wait between probes of a failed device.
pub const DEVICE_PROBE_MIN_MS: u64 = 500;
pub const DEVICE_PROBE_MAX_MS: u64 = 30_000;
/// Longest reason kept from a commit failure in a device's failed state.
pub const COPY_FAILURE_REASON_CHARS_MAX: usize = 512;

/// Commits in a row a device's metadata copy may miss while the device
/// answers its check (its label reads) before it is marked failed anyway:
/// a device that reads but does not take writes must not stall every
/// commit of the pool. A commit that succeeds resets the count.
pub const COPY_MISSES_WHILE_REACHABLE_MAX: u32 = 3;
/// Tries of one volume's copy before the device is marked failed again.
pub const RESYNC_VOLUME_ATTEMPTS_MAX: u32 = 5;
/// Replies at and above this go to the resync driver, not to a caller.
pub const RESYNC_REPLY_BASE: ReplyId = 1 << 62;

/// The probe backoff of failed devices (`None` on a core: no probing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeBackoff {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl Default for ProbeBackoff {
    fn default() -> Self {
        ProbeBackoff { min_ms: DEVICE_PROBE_MIN_MS, max_ms: DEVICE_PROBE_MAX_MS }
    }
}

/// When a failed device is probed next.
#[derive(Debug, Clone, Default)]
pub struct DeviceProbe {
    pub next_ms: u64,
    pub backoff_ms: u64,
    pub probes_failed: u64,
    pub in_flight: bool,
    pub last_error: String,
}

/// A device's resync in progress.
#[derive(Debug, Clone, Default)]
pub struct Resync {
    /// Volumes left to copy, in order.
    pub remaining: VecDeque<VolumeId>,
    /// The volume being recalled and copied now.
    pub current: Option<VolumeId>,
    pub volumes_total: u64,
    pub extents_total: u64,
    pub extents_done: u64,
    /// Failed tries of the current volume.
    pub attempts: u32,
    /// A failed try waits until then.
    pub retry_at_ms: Option<u64>,
    /// The resync was queued and not yet prepared.
    pub queued: bool,
    /// When it started (monotonic), for the estimate.
    pub started_ms: u64,
    /// Bytes the current volume's copy job has copied, and its total.
    pub copied: Arc<AtomicU64>,
    pub copy_bytes: u64,
}

/// The extents of `volume` (live, then each snapshot's copy-on-write area)
/// with a leg on `device`.
fn extents_on(meta: &PoolMetadata, volume: VolumeId, device: DeviceIndex) -> Vec<&LogicalExtent> {
    let live = meta.volume(volume).into_iter().flat_map(|v| v.extents.iter());
    let cow = meta.snapshots.iter().filter(|s| s.volume == volume).flat_map(|s| s.cow_extents.iter());
    live.chain(cow).filter(|e| e.legs.iter().any(|l| l.device == device)).collect()
}

impl Core {
    /// Turns probing of failed devices on (the real server; cores under a
    /// simulator leave it off).
    pub fn set_device_probe(&mut self, backoff: ProbeBackoff) {
        self.device_probe = Some(backoff);
    }

    /// Starts the probes that are due (at every tick).
    pub(super) fn probe_failed_devices(&mut self) {
        let Some(backoff) = self.device_probe else { return };
        let now_ms = self.now.mono_ms;
        let failed: Vec<(DeviceIndex, uuid::Uuid)> = self
            .meta
            .devices
            .iter()
            .filter(|d| matches!(d.state, DeviceState::Failed { .. }))
            .map(|d| (d.index, d.device_uuid))
            .collect();
        self.probes.retain(|d, _| failed.iter().any(|(f, _)| f == d));
        for (device, uuid) in failed {
            let probe = self.probes.entry(device).or_insert_with(|| DeviceProbe {
                next_ms: now_ms + backoff.min_ms,
                backoff_ms: backoff.min_ms,
                ..DeviceProbe::default()
            });
            if probe.in_flight || probe.next_ms > now_ms {
                continue;
            }
            probe.in_flight = true;
            let job = Job::CheckDevice { index: device.0, uuid };
            self.run_step(Step::Job { job, busy: None, then: AfterJob::Probed { device } });
        }
        // A device left resyncing by a previous run (or a handoff) is
        // resynchronized again from the start: progress lives in memory.
        let orphaned: Vec<DeviceIndex> = self
            .meta
            .devices
            .iter()
            .filter(|d| matches!(d.state, DeviceState::Resyncing { .. }) && !self.resyncs.contains_key(&d.index))
            .map(|d| d.index)
            .collect();
        for device in orphaned {
            info!(%device, "a device is resyncing with no resync running (the server restarted): starting it over");
            self.device_back(device, Ok(()));
        }
        let due: Vec<DeviceIndex> = self
            .resyncs
            .iter()
            .filter(|(_, r)| !r.queued && r.retry_at_ms.is_some_and(|at| at <= now_ms))
            .map(|(d, _)| *d)
            .collect();
        for device in due {
            self.queue_resync(device);
        }
    }

    /// A commit missed the metadata copies on `failed.failed_devices`:
    /// checks each of their devices (once at a time), see the module doc.
    pub(super) fn check_failed_copies(&mut self, failed: &CommitFailed, why: &str) {
        if self.device_probe.is_none() || !failed.took_some {
            return;
        }
        for uuid in &failed.failed_devices {
            let Some(d) = self.meta.devices.iter().find(|d| d.device_uuid == *uuid) else { continue };
            if matches!(d.state, DeviceState::Failed { .. }) || !self.copy_checks.insert(d.index) {
                continue;
            }
            let device = d.index;
            warn!(%device, "the metadata copy on the device missed a commit: checking the device");
            let why: String = why.chars().take(COPY_FAILURE_REASON_CHARS_MAX).collect();
            let job = Job::CheckDevice { index: device.0, uuid: *uuid };
            self.run_step(Step::Job { job, busy: None, then: AfterJob::CopyChecked { device, why } });
        }
    }

    /// The check of a device whose metadata copy missed a commit came back:
    /// unreachable, it is marked failed (the commit leaves its copy out);
    /// reachable, the next commit writes its copy again.
    pub(super) fn copy_checked(&mut self, device: DeviceIndex, why: String, outcome: JobOutcome) -> Step {
        self.copy_checks.remove(&device);
        match outcome.result {
            Ok(()) => {
                let misses = self.copy_misses.entry(device).or_default();
                *misses += 1;
                if *misses < COPY_MISSES_WHILE_REACHABLE_MAX {
                    info!(%device, "the server reaches the device: its metadata copy is written again by the next commit");
                    return Step::Done(None);
                }
                let misses = *misses;
                self.copy_misses.remove(&device);
                let reason = format!(
                    "its metadata copy missed {misses} commits in a row although its label reads (last: {why})"
                );
                self.prepare_device_failed(device.0, reason, None)
            }
            Err(e) => {
                let reason = format!("its metadata copy missed a commit ({why}) and the server cannot reach it ({e})");
                self.prepare_device_failed(device.0, reason, None)
            }
        }
    }

    /// A probe came back: a device that answered with its label starts
    /// resyncing; one that did not is probed again later.
    pub(super) fn probed(&mut self, device: DeviceIndex, outcome: JobOutcome) -> Step {
        let backoff = self.device_probe.unwrap_or_default();
        let now_ms = self.now.mono_ms;
        let still_failed = self.meta.device(device).is_some_and(|d| matches!(d.state, DeviceState::Failed { .. }));
        match outcome.result {
            Err(why) => {
                if let Some(p) = self.probes.get_mut(&device) {
                    p.in_flight = false;
                    p.probes_failed += 1;
                    p.backoff_ms = (p.backoff_ms * 2).clamp(backoff.min_ms, backoff.max_ms);
                    p.next_ms = now_ms + p.backoff_ms;
                    p.last_error = why;
                }
                Step::Done(None)
            }
            Ok(()) if still_failed => {
                self.probes.remove(&device);
                info!(%device, "a failed device answers with its label again: resyncing it");
                let state = DeviceState::Resyncing { since_unix_secs: self.now.unix_secs() };
                Step::Commit {
                    changes: vec![MetaChange::DeviceState { device, state }],
                    then: AfterCommit::DeviceBack { device },
                }
            }
            Ok(()) => {
                self.probes.remove(&device);
                Step::Done(None)
            }
        }
    }

    /// `device` is committed resyncing: plan its copies and start them.
    pub(super) fn device_back(&mut self, device: DeviceIndex, result: Result<(), ControlError>) {
        if let Err(e) = result {
            return warn!(%device, "marking the device resyncing failed: {e}; it is probed again");
        }
        let mirrored: Vec<VolumeId> = self
            .meta
            .volumes
            .iter()
            .filter(|v| v.mirror_legs > 1 && !extents_on(&self.meta, v.id, device).is_empty())
            .map(|v| v.id)
            .collect();
        let extents_total = mirrored.iter().map(|v| extents_on(&self.meta, *v, device).len() as u64).sum();
        info!(%device, volumes = mirrored.len(), extents = extents_total, "resync of the device planned");
        self.resyncs.insert(
            device,
            Resync {
                volumes_total: mirrored.len() as u64,
                remaining: mirrored.into(),
                extents_total,
                started_ms: self.now.mono_ms,
                ..Resync::default()
            },
        );
        self.queue_resync(device);
    }

    fn queue_resync(&mut self, device: DeviceIndex) {
        if let Some(r) = self.resyncs.get_mut(&device) {
            r.queued = true;
            r.retry_at_ms = None;
            self.queue.push_back(Change::Resync { device });
        }
    }

    /// The next step of `device`'s resync: recall and copy the next volume,
    /// or, with every volume done, commit the device online.
    pub(super) fn prepare_resync(&mut self, device: DeviceIndex) -> Step {
        // While the grace period lasts, holders restored from the previous
        // run may not have resumed: a recall now would exclude them.
        let in_grace = self.grace.is_some();
        let retry_at_ms = self.now.mono_ms + DEVICE_PROBE_MIN_MS;
        let Some(r) = self.resyncs.get_mut(&device) else { return Step::Done(None) };
        r.queued = false;
        if in_grace {
            r.retry_at_ms = Some(retry_at_ms);
            return Step::Done(None);
        }
        if r.current.is_some() {
            return Step::Done(None);
        }
        // Volumes deleted since are skipped.
        while let Some(volume) = r.remaining.front().copied() {
            if self.meta.volume(volume).is_some() {
                break;
            }
            r.remaining.pop_front();
        }
        let Some(volume) = r.remaining.front().copied() else {
            if !self.meta.device(device).is_some_and(|d| matches!(d.state, DeviceState::Resyncing { .. })) {
                self.resyncs.remove(&device);
                return Step::Done(None);
            }
            // Its stale regions are copied: nothing is stale any more.
            let mut changes = self.meta.plan_forget_stale(device);
            changes.push(MetaChange::DeviceState { device, state: DeviceState::Online });
            return Step::Commit { changes, then: AfterCommit::DeviceOnline { device } };
        };
        r.current = Some(volume);
        let name = self.meta.volume(volume).map(|v| v.name.clone()).unwrap_or_default();
        let reply = RESYNC_REPLY_BASE + ((device.0 as u64) << 32) + volume.0;
        // First online, while the holders write (`precopy`); then, at the
        // recall point, what they wrote meanwhile.
        if self.precopy_allowed(volume)
            && !self.precopies.contains_key(&volume)
            && !self.busy.contains_key(&volume)
            && !self.pending_changes.contains_key(&volume)
        {
            if let Some(job) = self.resync_job(volume, device) {
                if let (Some(r), Job::Resync { copies, extent_bytes, .. }) = (self.resyncs.get_mut(&device), &job) {
                    r.copied.store(0, Ordering::Relaxed);
                    r.copy_bytes = copies.len() as u64 * extent_bytes;
                }
                return self.start_precopy(volume, job, PrecopyNext::Resync { device, reply });
            }
        }
        self.prepare_reconfigure_with(&name, VolumeChange::Resync { device }, reply, false)
    }

    /// The job that copies `volume`'s data on `device` from a leg on an
    /// online device: of its live extents only the regions written while
    /// the device was away (its stale set, `intent`), or all of them where
    /// the pool recorded none (the device failed before the intent log);
    /// snapshot copy-on-write extents whole. `None` if there is nothing to
    /// copy.
    pub(super) fn resync_job(&self, volume: VolumeId, device: DeviceIndex) -> Option<Job> {
        let extent_bytes = self.meta.extent_bytes;
        let region_bytes = intent_region_bytes(extent_bytes);
        let regions_per_extent = extent_bytes / region_bytes;
        let stale: Option<BTreeSet<u64>> = self
            .meta
            .tracks_stale(volume, device)
            .then(|| self.meta.intent(volume, IntentKey::Stale(device)).iter().collect());
        let target = |d: DeviceIndex, offset: u64| -> Option<DeviceExtents> {
            let uri = self.meta.device(d)?.uri.clone();
            Some(DeviceExtents { device: d, uri, offsets: vec![offset] })
        };
        // One copy of `region_bytes` at `at` within extent `e`.
        let copy = |e: &LogicalExtent, at: u64| -> Option<ExtentCopy> {
            let to = e.legs.iter().find(|l| l.device == device)?;
            let from: Vec<DeviceExtents> = e
                .legs
                .iter()
                .filter(|l| self.meta.device(l.device).is_some_and(|d| d.state.is_online()))
                .filter_map(|l| target(l.device, l.offset + at))
                .collect();
            (!from.is_empty()).then_some(ExtentCopy { to: target(to.device, to.offset + at)?, from })
        };
        let mut copies = Vec::new();
        let live = self.meta.volume(volume).into_iter().flat_map(|v| v.extents.iter().enumerate());
        for (i, e) in live.filter(|(_, e)| e.legs.iter().any(|l| l.device == device)) {
            for r in 0..regions_per_extent {
                let region = i as u64 * regions_per_extent + r;
                if stale.as_ref().is_none_or(|s| s.contains(&region)) {
                    copies.extend(copy(e, r * region_bytes));
                }
            }
        }
        let cow = self.meta.snapshots.iter().filter(|s| s.volume == volume).flat_map(|s| s.cow_extents.iter());
        for e in cow.filter(|e| e.legs.iter().any(|l| l.device == device)) {
            copies.extend((0..regions_per_extent).filter_map(|r| copy(e, r * region_bytes)));
        }
        if let Some(s) = &stale {
            info!(
                %device, %volume, stale_regions = s.len(), copies = copies.len(),
                "resync copies only the regions written while the device was away"
            );
        }
        // After an online pass, only what was written meanwhile.
        let (region_bytes, copies) = self.limit_to_touched(volume, PrecopyFor::Resync(device), region_bytes, copies);
        let progress = self.resyncs.get(&device).map(|r| r.copied.clone());
        (!copies.is_empty()).then_some(Job::Resync { extent_bytes: region_bytes, copies, progress })
    }

    /// Whether `reply` is the resync driver's; if so it is handled here.
    pub(super) fn resync_reply(&mut self, reply: ReplyId, result: &Result<Response, ControlError>) -> bool {
        if reply < RESYNC_REPLY_BASE {
            return false;
        }
        let device = DeviceIndex(((reply - RESYNC_REPLY_BASE) >> 32) as u32);
        let volume = VolumeId((reply - RESYNC_REPLY_BASE) & 0xffff_ffff);
        let extents = extents_on(&self.meta, volume, device).len() as u64;
        let now_ms = self.now.mono_ms;
        if self.resyncs.get(&device).is_some_and(|r| r.current == Some(volume)) {
            // Its step ended, either way: a retry starts with an online pass.
            self.precopy_end(volume, PrecopyFor::Resync(device));
        }
        let Some(r) = self.resyncs.get_mut(&device) else { return true };
        if r.current != Some(volume) {
            return true;
        }
        r.current = None;
        match result {
            Ok(_) => {
                r.remaining.pop_front();
                r.attempts = 0;
                r.extents_done += extents;
                info!(%device, %volume, copied = r.extents_done, of = r.extents_total, "volume resynchronized");
                self.queue_resync(device);
            }
            Err(e) => {
                r.attempts += 1;
                warn!(%device, %volume, attempt = r.attempts, "resync of the volume failed: {e}");
                if r.attempts >= RESYNC_VOLUME_ATTEMPTS_MAX {
                    let why = format!("resync failed {} times: {}", r.attempts, e.message);
                    self.resyncs.remove(&device);
                    self.queue.push_back(Change::DeviceFailed { device, reason: why });
                } else {
                    r.retry_at_ms = Some(now_ms + DEVICE_PROBE_MIN_MS * u64::from(r.attempts));
                }
            }
        }
        true
    }

    /// `device` is committed online: its legs serve reads again.
    pub(super) fn device_online(&mut self, device: DeviceIndex, result: Result<(), ControlError>) {
        if let Err(e) = result {
            warn!(%device, "committing the resynchronized device online failed: {e}; retrying");
            return self.queue_resync(device);
        }
        self.resyncs.remove(&device);
        info!(%device, "device resynchronized and online again");
        let affected: Vec<VolumeId> = self
            .meta
            .volumes
            .iter()
            .filter(|v| !extents_on(&self.meta, v.id, device).is_empty())
            .map(|v| v.id)
            .collect();
        for volume in affected {
            if !self.pending_changes.contains_key(&volume) {
                self.publish_volume(volume, &[]);
            }
        }
    }

    /// For listings: what recovery says about `device` ("" if nothing).
    pub(super) fn device_recovery(&self, device: DeviceIndex) -> String {
        if let Some(r) = self.resyncs.get(&device) {
            let now = r.current.and_then(|v| self.meta.volume(v).map(|m| (v, m))).map(|(v, m)| {
                match self.precopies.get(&v).filter(|p| p.step == PrecopyFor::Resync(device)) {
                    Some(p) if !p.done => format!(
                        ", copying volume {} online ({} of {} MiB; its holders write on)",
                        m.name,
                        r.copied.load(Ordering::Relaxed).min(r.copy_bytes) >> 20,
                        r.copy_bytes >> 20
                    ),
                    Some(_) => format!(", copying volume {} again where it was written meanwhile (I/O held)", m.name),
                    None => format!(", copying volume {}", m.name),
                }
            });
            // At the rate so far (whole volumes at a time: coarse).
            let elapsed_ms = self.now.mono_ms.saturating_sub(r.started_ms);
            let estimate = (r.extents_done > 0).then(|| {
                let left_ms = elapsed_ms * (r.extents_total - r.extents_done.min(r.extents_total)) / r.extents_done;
                format!(", about {:.0} s left", left_ms as f64 / 1000.0)
            });
            return format!(
                "resyncing: {} of {} extents copied ({} of {} volumes){}{}",
                r.extents_done,
                r.extents_total,
                r.volumes_total - r.remaining.len() as u64,
                r.volumes_total,
                now.unwrap_or_default(),
                estimate.unwrap_or_default()
            );
        }
        match self.probes.get(&device) {
            Some(p) if p.in_flight => format!("failed: probing now ({} probes failed)", p.probes_failed),
            Some(p) => {
                let last = if p.last_error.is_empty() { String::new() } else { format!("; last: {}", p.last_error) };
                format!("failed: next probe {}{last}", self.now.describe(p.next_ms))
            }
            None => String::new(),
        }
    }

    /// For listings: whether every leg of `volume` is whole ("" if so).
    pub(super) fn volume_health(&self, volume: VolumeId) -> String {
        let mut devices: BTreeSet<DeviceIndex> = BTreeSet::new();
        if let Some(v) = self.meta.volume(volume) {
            devices.extend(v.extents.iter().flat_map(|e| e.legs.iter().map(|l| l.device)));
        }
        let mut parts = Vec::new();
        for d in devices {
            match self.meta.device(d).map(|r| &r.state) {
                Some(DeviceState::Failed { .. }) => parts.push(format!("degraded: device {d} failed")),
                Some(DeviceState::Resyncing { .. }) => {
                    let state = match self.resyncs.get(&d) {
                        Some(r)
                            if r.current == Some(volume)
                                && self
                                    .precopies
                                    .get(&volume)
                                    .is_some_and(|p| !p.done && p.step == PrecopyFor::Resync(d)) =>
                        {
                            "copying now, online"
                        }
                        Some(r) if r.current == Some(volume) => "copying now",
                        Some(r) if r.remaining.contains(&volume) => "waiting",
                        _ => "copied, the device finishes with other volumes",
                    };
                    parts.push(format!("resyncing: device {d} ({state}; {})", self.device_recovery(d)));
                }
                _ => {}
            }
        }
        parts.join("; ")
    }
}

/// Devices being probed, for tests and listings.
pub type Probes = BTreeMap<DeviceIndex, DeviceProbe>;
/// Resyncs in progress by device.
pub type Resyncs = BTreeMap<DeviceIndex, Resync>;
