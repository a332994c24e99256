//! The admin reconfiguration commands: `device add|evacuate|remove|replace`,
//! `volume mirror add|remove`, `volume move`.
//!
//! Every data move is one [`VolumeChange::Remap`] per volume, run like any
//! other reconfiguration of a layout (`requests`): the volume's holders are
//! recalled (they drain their I/O and confirm), the server copies every new
//! leg from a leg that serves reads, flushes the targets, commits the new
//! map ([`MetaChange::VolumeRemap`], a new layout generation) and publishes
//! it; the holders resume on the new map. A volume without holders is
//! copied with its opens waiting.
//!
//! A mirrored volume's new legs are first copied **online**, while its
//! holders write on (`precopy`): at the recall point only the regions
//! written during that copy are copied again, so the pause is as long as
//! copying those takes, not the whole volume. Why the final copy still
//! happens with the holders drained, rather than with the agents writing
//! old and new legs: it needs nothing new of the agents (the
//! recall–commit–publish cycle they already follow), and a write can
//! neither be lost nor overtaken by the copy, because there are no writes
//! while it runs. A volume of one leg keeps no intent log (nothing says
//! which regions were written meanwhile): its I/O pauses for the whole copy
//! of its extents on the device (one volume at a time).
//! Crash safety comes from the order: the new legs are free extents no
//! committed metadata names until the copy is complete and flushed, so a
//! server that dies mid-copy leaves the old map valid and the copies
//! unreferenced; the next allocation zeroes them before handing them out.
//!
//! One operation runs at a time ([`AdminOp`]): a second is refused as busy.
//! A multi-volume operation (evacuate, replace) moves volume after volume,
//! each committed on its own; it is driven from the queue like the
//! resync of a device that came back (`recovery`), its steps answered to
//! reply ids of its own ([`ADMIN_REPLY`]). A step refused because the
//! volume is busy (another change, a resync) is tried again later. While a
//! step's copy is planned or in flight, changes that allocate wait (as while
//! new space is zeroed: the copy's targets are free in the metadata), and
//! devices being evacuated get no new allocations at all.
//!
//! Known limits: the operation lives in memory — a server restart stops it
//! after the volume being moved (whose old map stays valid); the same
//! command run again goes on (volumes already moved are skipped). A device
//! that holds a metadata copy (and so the pool lease) cannot be removed or
//! replaced: moving a metadata copy changes the set of lease devices, which
//! is not built.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{info, warn};
use uuid::Uuid;
use volume_format::control::messages::{ControlError, ErrorCode, OperationInfo, Response};
use volume_format::metadata::{DeviceRecord, DeviceState, MetaChange, MetadataArea, RemapKind, RemapPlan};
use volume_format::{DeviceIndex, VolumeId};

use super::core::{AfterCommit, AfterJob, Change, Core, ReplyId, Step, VolumeChange};
use super::jobs::{DeviceExtents, ExtentCopy, Job, JobOutcome};
use super::precopy::PrecopyFor;
use super::requests::{alloc_error, err};

/// Replies to an operation's steps go to the driver, not to a caller.
pub const ADMIN_REPLY: ReplyId = 1 << 61;
/// The reply id of an operation the server started itself (the automatic
/// replacement of a failed device): nobody waits for it.
pub const AUTO_REPLY: ReplyId = (1 << 61) + 1;
/// Tries of one volume's step refused as busy before the operation fails.
pub const ADMIN_STEP_ATTEMPTS_MAX: u32 = 20;
/// Wait before a busy step is tried again (times the attempt).
pub const ADMIN_STEP_RETRY_MS: u64 = 500;
/// Rescans of an evacuated device for extents that landed on it meanwhile.
pub const EVACUATE_RESCANS_MAX: u32 = 3;

/// What an operation does.
#[derive(Debug, Clone)]
pub enum OpKind {
    /// Label and add a device; for a replace, then move `replacing`'s
    /// extents onto it and remove `replacing`.
    Add { uri: String, force: bool, replacing: Option<DeviceIndex> },
    /// Move every extent off `device` (onto `to`, for a replace), then, for
    /// a replace, remove it.
    Evacuate { device: DeviceIndex, to: Option<DeviceIndex>, remove_after: bool },
    /// One volume's remap.
    Volume { volume: VolumeId, kind: RemapKind },
}

/// The one reconfiguration in progress.
#[derive(Debug)]
pub struct AdminOp {
    /// For people: "evacuate dev2".
    pub what: String,
    pub kind: OpKind,
    /// The admin waiting for the answer.
    pub reply: ReplyId,
    /// Volumes still to remap, in order.
    pub remaining: VecDeque<VolumeId>,
    /// The volume being moved now and its plan's size.
    pub current: Option<CurrentStep>,
    pub volumes_done: u64,
    pub volumes_total: u64,
    pub extents_done: u64,
    pub extents_total: u64,
    pub bytes_done: u64,
    pub attempts: u32,
    pub retry_at_ms: Option<u64>,
    pub queued: bool,
    pub rescans: u32,
    pub started_ms: u64,
    /// A step (label, commit) of the operation itself is in flight.
    pub busy: bool,
}

#[derive(Debug)]
pub struct CurrentStep {
    pub volume: VolumeId,
    pub copies: u64,
    pub bytes_total: u64,
    /// Bytes the copy job has copied so far.
    pub copied: Arc<AtomicU64>,
}

impl AdminOp {
    fn new(what: String, kind: OpKind, reply: ReplyId, now_ms: u64) -> AdminOp {
        AdminOp {
            what,
            kind,
            reply,
            remaining: VecDeque::new(),
            current: None,
            volumes_done: 0,
            volumes_total: 0,
            extents_done: 0,
            extents_total: 0,
            bytes_done: 0,
            attempts: 0,
            retry_at_ms: None,
            queued: false,
            rescans: 0,
            started_ms: now_ms,
            busy: false,
        }
    }
}

fn done(reply: ReplyId, result: Result<Response, ControlError>) -> Step {
    Step::Done(Some((reply, result)))
}

impl Core {
    /// Devices no allocation may use now (being evacuated).
    pub(super) fn alloc_excluded(&self) -> BTreeSet<DeviceIndex> {
        match self.operation.as_ref().map(|o| &o.kind) {
            Some(OpKind::Evacuate { device, .. }) => [*device].into(),
            Some(OpKind::Add { replacing: Some(device), .. }) => [*device].into(),
            _ => BTreeSet::new(),
        }
    }

    /// Whether an operation's copy is planned or in flight: its targets are
    /// free in the metadata, so nothing else may allocate meanwhile.
    pub(super) fn moving(&self) -> bool {
        self.operation.as_ref().is_some_and(|o| o.current.is_some() || o.busy)
    }

    /// The metadata allocations are planned against: devices being
    /// evacuated look failed (so they get nothing). A copy only while an
    /// evacuation runs.
    pub(super) fn alloc_view(&self) -> std::borrow::Cow<'_, volume_format::metadata::PoolMetadata> {
        let excluded = self.alloc_excluded();
        if excluded.is_empty() {
            return std::borrow::Cow::Borrowed(&self.meta);
        }
        let mut view = (*self.meta).clone();
        for d in view.devices.iter_mut().filter(|d| excluded.contains(&d.index)) {
            d.state = DeviceState::Failed { reason: "being evacuated".into(), since_unix_secs: 0 };
        }
        std::borrow::Cow::Owned(view)
    }

    fn refuse_if_running(&self, reply: ReplyId) -> Option<Step> {
        let op = self.operation.as_ref()?;
        let msg = format!(
            "another reconfiguration is running ({}); wait for it (`sanvol pool status` shows its progress) and retry",
            op.what
        );
        Some(done(reply, Err(err(ErrorCode::Busy, msg))))
    }

    fn device_arg(&self, device: DeviceIndex) -> Result<&DeviceRecord, ControlError> {
        self.meta.device(device).ok_or_else(|| {
            err(ErrorCode::NotFound, format!("no device {device} in the pool (`sanvol device list` shows them)"))
        })
    }

    /// Refuses removing `device` if it holds a metadata copy.
    fn metadata_holder_refusal(&self, device: &DeviceRecord) -> Option<ControlError> {
        // A pool whose records flag no copy keeps one on every device.
        let holds = crate::pool::metadata_holders(&self.meta).contains(&device.device_uuid) || device.holds_metadata;
        holds.then(|| {
            err(
                ErrorCode::InvalidArgument,
                format!(
                    "device {} ({}) holds a copy of the pool metadata and the pool lease; moving them to another \
                     device is not supported, so it cannot be removed or replaced (its data can be moved off with \
                     `sanvol device evacuate`)",
                    device.index, device.uri
                ),
            )
        })
    }

    /// `Request::DeviceAdd` and `Request::DeviceReplace`: label the device
    /// first (a job), then commit it.
    pub(super) fn prepare_device_add(
        &mut self,
        uri: String,
        force: bool,
        replacing: Option<DeviceIndex>,
        reply: ReplyId,
    ) -> Step {
        if let Some(refused) = self.refuse_if_running(reply) {
            return refused;
        }
        if let Err(e) = uri.parse::<blockio::uri::NbdUri>() {
            return done(reply, Err(err(ErrorCode::InvalidArgument, format!("{uri:?} is not an NBD URI: {e}"))));
        }
        if let Some(d) = self.meta.devices.iter().find(|d| d.uri == uri) {
            let msg = format!("{uri} is already device {} of the pool", d.index);
            return done(reply, Err(err(ErrorCode::AlreadyExists, msg)));
        }
        // A pool that flags no metadata device keeps a copy on every device
        // (`metadata_holders`): a new device would add a metadata copy, and
        // a lease device, online — not supported.
        if !self.meta.devices.iter().any(|d| d.holds_metadata) {
            let msg = "this pool keeps a metadata copy on every device (none is flagged as a metadata device), so a \
                       new device would hold one too, which cannot be added online; nothing was changed";
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        let what = match replacing {
            Some(old) => {
                let d = match self.device_arg(old) {
                    Ok(d) => d,
                    Err(e) => return done(reply, Err(e)),
                };
                if let Some(e) = self.metadata_holder_refusal(d) {
                    return done(reply, Err(e));
                }
                format!("replace {old} with {uri}")
            }
            None => format!("add device {uri}"),
        };
        let mut id = [0u8; 16];
        self.entropy.fill(&mut id);
        let request = crate::pool::add::LabelRequest {
            uri: uri.clone(),
            pool_uuid: self.meta.pool_uuid,
            device_uuid: Uuid::from_bytes(id),
            index: self.meta.next_ids.device,
            extent_bytes: self.meta.extent_bytes,
            in_pool: self.meta.devices.iter().map(|d| d.device_uuid).collect(),
            force,
        };
        info!(%uri, "labelling a device to add it to the pool");
        let mut op = AdminOp::new(what, OpKind::Add { uri, force, replacing }, reply, self.now.mono_ms);
        op.busy = true;
        self.operation = Some(op);
        Step::Job { job: Job::LabelDevice(request), busy: None, then: AfterJob::Labelled }
    }

    /// The label job reported back: commit the device.
    pub(super) fn labelled(&mut self, outcome: JobOutcome) -> Step {
        let Some(OpKind::Add { uri, .. }) = self.operation.as_ref().map(|o| o.kind.clone()) else {
            return Step::Done(None);
        };
        let label = match (outcome.result, outcome.label) {
            (Ok(()), Some(label)) => label,
            (Err(why), _) => {
                return self.finish_op(Err(err(ErrorCode::InvalidArgument, format!("{why}; nothing was changed"))))
            }
            (Ok(()), None) => return self.finish_op(Err(err(ErrorCode::Internal, "the label job wrote no label"))),
        };
        if label.device_index != self.meta.next_ids.device {
            let msg = format!("the device index changed while {uri} was labelled; nothing was changed, retry");
            return self.finish_op(Err(err(ErrorCode::Unavailable, msg)));
        }
        let record = DeviceRecord {
            index: label.device_index,
            device_uuid: label.device_uuid,
            uri,
            device_bytes: label.layout.device_bytes,
            data: label.layout.data,
            state: DeviceState::Online,
            holds_metadata: false,
        };
        let area = MetadataArea::from_label(&label);
        // Decided at the labelling, from the device's own export
        // description: does it speak sanvol-target's fencing handshake?
        let fencing = outcome.fences.map(|fenced| MetaChange::DeviceFencing { device: record.index, fenced });
        Step::Commit {
            changes: std::iter::once(MetaChange::DeviceAdd(record)).chain(fencing).collect(),
            then: AfterCommit::DeviceAdded { uuid: label.device_uuid, index: label.device_index, area },
        }
    }

    /// A device add was committed (or not).
    pub(super) fn device_added(
        &mut self,
        uuid: Uuid,
        index: DeviceIndex,
        area: MetadataArea,
        result: Result<(), ControlError>,
    ) {
        if let Err(e) = result {
            let step = self.finish_op(Err(e));
            return self.run_step(step);
        }
        self.journal_add_area(uuid, area);
        info!(device = %index, "device added to the pool");
        let replacing = match self.operation.as_ref().map(|o| &o.kind) {
            Some(OpKind::Add { replacing, .. }) => *replacing,
            _ => None,
        };
        match replacing {
            None => {
                let step = self.finish_op(Ok(Response::Done));
                self.run_step(step);
            }
            Some(old) => {
                if let Some(op) = self.operation.as_mut() {
                    op.busy = false;
                    op.kind = OpKind::Evacuate { device: old, to: Some(index), remove_after: true };
                }
                self.plan_evacuation(old);
            }
        }
    }

    /// `Request::DeviceEvacuate`.
    pub(super) fn prepare_device_evacuate(&mut self, device: DeviceIndex, reply: ReplyId) -> Step {
        if let Some(refused) = self.refuse_if_running(reply) {
            return refused;
        }
        if let Err(e) = self.device_arg(device) {
            return done(reply, Err(e));
        }
        let what = format!("evacuate {device}");
        let kind = OpKind::Evacuate { device, to: None, remove_after: false };
        self.operation = Some(AdminOp::new(what, kind, reply, self.now.mono_ms));
        self.plan_evacuation(device);
        Step::Parked
    }

    /// Failed devices are replaced after `after_ms` (`device_replace_after_ms`
    /// in mds.toml); `None` never.
    pub fn set_device_replace_after(&mut self, after_ms: Option<u64>) {
        self.device_replace_after_ms = after_ms;
    }

    /// At every tick: a device failed for longer than
    /// `device_replace_after_ms` that still holds extents is evacuated — its
    /// extents reallocated on the other devices and rebuilt from their
    /// surviving legs, as `sanvol device evacuate` does — when no other
    /// operation runs. One that fails (no room, an extent with no surviving
    /// leg) is tried again after the same time; the outcome is logged. The
    /// failure time is the pool's record (`since`), so a restarted server
    /// counts from the failure, not from its start.
    pub(super) fn replace_failed_devices(&mut self) {
        let Some(after_ms) = self.device_replace_after_ms else { return };
        if self.operation.is_some() {
            return;
        }
        let (now_unix_ms, now_ms) = (self.now.unix_ms, self.now.mono_ms);
        let due: Vec<(DeviceIndex, String, u64)> = self
            .meta
            .devices
            .iter()
            .filter_map(|d| match &d.state {
                DeviceState::Failed { reason, since_unix_secs }
                    if now_unix_ms.saturating_sub(since_unix_secs * 1000) >= after_ms =>
                {
                    Some((d.index, reason.clone(), *since_unix_secs))
                }
                _ => None,
            })
            .collect();
        self.auto_replace_next_ms.retain(|d, _| due.iter().any(|(f, _, _)| f == d));
        for (device, reason, since) in due {
            if self.auto_replace_next_ms.get(&device).is_some_and(|&at| at > now_ms)
                || self.volumes_on(device).is_empty()
            {
                continue;
            }
            self.auto_replace_next_ms.insert(device, now_ms + after_ms);
            let away_secs = (now_unix_ms / 1000).saturating_sub(since);
            warn!(
                %device,
                away_secs,
                device_replace_after_ms = after_ms,
                "device failed ({reason}) for longer than device_replace_after_ms: moving its extents onto the other \
                 devices, rebuilt from their surviving legs"
            );
            let what = format!("replace failed {device} automatically (evacuate onto the other devices)");
            let kind = OpKind::Evacuate { device, to: None, remove_after: false };
            self.operation = Some(AdminOp::new(what, kind, AUTO_REPLY, now_ms));
            self.plan_evacuation(device);
            return;
        }
    }

    /// Queues every volume with an extent on `device` (live or a snapshot's).
    fn plan_evacuation(&mut self, device: DeviceIndex) {
        let volumes: Vec<VolumeId> = self.volumes_on(device);
        if let Some(op) = self.operation.as_mut() {
            op.volumes_total += volumes.len() as u64;
            op.remaining.extend(volumes);
            info!(what = %op.what, volumes = op.remaining.len(), "reconfiguration planned");
        }
        self.queue_admin();
    }

    fn volumes_on(&self, device: DeviceIndex) -> Vec<VolumeId> {
        let on = |e: &volume_format::metadata::LogicalExtent| e.legs.iter().any(|l| l.device == device);
        self.meta
            .volumes
            .iter()
            .filter(|v| {
                v.extents.iter().any(on)
                    || self.meta.snapshots.iter().filter(|s| s.volume == v.id).any(|s| s.cow_extents.iter().any(on))
            })
            .map(|v| v.id)
            .collect()
    }

    /// `Request::VolumeMove`, `VolumeMirrorAdd`, `VolumeMirrorRemove`.
    pub(super) fn prepare_volume_remap(&mut self, name: &str, kind: RemapKind, reply: ReplyId) -> Step {
        if let Some(refused) = self.refuse_if_running(reply) {
            return refused;
        }
        let volume = match self.volume_by_name(name) {
            Ok(v) => v.id,
            Err(e) => return done(reply, Err(e)),
        };
        for d in [
            match kind {
                RemapKind::Move { from, .. } => Some(from),
                _ => None,
            },
            match kind {
                RemapKind::Move { to, .. } => to,
                RemapKind::MirrorRemove { device } => device,
                RemapKind::MirrorAdd => None,
            },
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = self.device_arg(d) {
                return done(reply, Err(e));
            }
        }
        // Refused now ("no space", "single leg") before anyone is disturbed.
        match self.meta.plan_remap(volume, kind, &BTreeSet::new()) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let msg = format!("volume {name} has nothing to move ({kind}: no leg there)");
                return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
            }
            Err(e) => return done(reply, Err(alloc_error(e))),
        }
        let what = format!("volume {name}: {kind}");
        let mut op = AdminOp::new(what, OpKind::Volume { volume, kind }, reply, self.now.mono_ms);
        op.remaining.push_back(volume);
        op.volumes_total = 1;
        self.operation = Some(op);
        self.queue_admin();
        Step::Parked
    }

    /// `Request::DeviceRemove`: refused while it holds an extent or a
    /// metadata copy.
    pub(super) fn prepare_device_remove(&mut self, device: DeviceIndex, reply: ReplyId) -> Step {
        if let Some(refused) = self.refuse_if_running(reply) {
            return refused;
        }
        let d = match self.device_arg(device) {
            Ok(d) => d,
            Err(e) => return done(reply, Err(e)),
        };
        if let Some(e) = self.metadata_holder_refusal(d) {
            return done(reply, Err(e));
        }
        let mut users: Vec<String> = self.meta.extents_on(device).collect();
        if !users.is_empty() {
            let extents = users.len();
            users.dedup();
            let msg = format!(
                "device {device} ({}) still holds {extents} extent(s) of {}; move them off first with `sanvol device \
                 evacuate {device}` (or `sanvol device replace`)",
                d.uri,
                users.join(", ")
            );
            return done(reply, Err(err(ErrorCode::Busy, msg)));
        }
        let what = format!("device {device} ({}) removed from the pool", d.uri);
        Step::Commit { changes: vec![MetaChange::DeviceRemove { device }], then: AfterCommit::Reply { reply, what } }
    }

    fn queue_admin(&mut self) {
        if let Some(op) = self.operation.as_mut() {
            if !op.queued {
                op.queued = true;
                op.retry_at_ms = None;
                self.queue.push_back(Change::Admin);
            }
        }
    }

    /// At every tick: a step that waits for a retry is queued when due.
    pub(super) fn admin_tick(&mut self) {
        let now_ms = self.now.mono_ms;
        if self.operation.as_ref().is_some_and(|o| !o.queued && o.retry_at_ms.is_some_and(|at| at <= now_ms)) {
            self.queue_admin();
        }
    }

    /// The next step of the operation: remap the next volume, or finish.
    pub(super) fn prepare_admin(&mut self) -> Step {
        let excluded = self.alloc_excluded();
        let Some(op) = self.operation.as_mut() else { return Step::Done(None) };
        op.queued = false;
        if op.current.is_some() || op.busy {
            return Step::Done(None);
        }
        let kind = op.kind.clone();
        let volume = loop {
            match op.remaining.front().copied() {
                Some(v) if self.meta.volume(v).is_none() => {
                    op.remaining.pop_front();
                }
                other => break other,
            }
        };
        let Some(volume) = volume else { return self.admin_all_moved(kind) };
        if self.busy.contains_key(&volume) || self.pending_changes.contains_key(&volume) {
            return self.admin_retry_later(volume, "the volume is busy with another change");
        }
        let remap = match kind {
            OpKind::Evacuate { device, to, .. } => RemapKind::Move { from: device, to },
            OpKind::Volume { kind, .. } => kind,
            OpKind::Add { .. } => return Step::Done(None),
        };
        let plan = match self.meta.plan_remap(volume, remap, &excluded) {
            Ok(Some(plan)) => plan,
            Ok(None) => {
                let op = self.operation.as_mut().expect("checked");
                op.remaining.pop_front();
                op.volumes_done += 1;
                self.queue_admin();
                return Step::Done(None);
            }
            Err(e) => return self.finish_op(Err(alloc_error(e))),
        };
        // The copy writes the targets: they are not zero any more, whether
        // or not the remap is committed.
        for c in &plan.copies {
            self.zeroed.remove(&c.to);
        }
        let name = self.meta.volume(volume).map(|v| v.name.clone()).unwrap_or_default();
        let copies = plan.copies.len() as u64;
        let copied = Arc::new(AtomicU64::new(0));
        let op = self.operation.as_mut().expect("checked");
        op.extents_total += copies;
        op.current = Some(CurrentStep { volume, copies, bytes_total: copies * self.meta.extent_bytes, copied });
        info!(volume = %name, %remap, copies, "moving the volume's legs");
        let change = VolumeChange::Remap { plan: Box::new(plan), kind: remap };
        // First online, while the holders write (`precopy`); then, at the
        // recall point, what they wrote meanwhile.
        if self.precopy_allowed(volume) && !self.precopies.contains_key(&volume) {
            if let VolumeChange::Remap { plan, .. } = &change {
                if let Some(job) = self.remap_job(volume, plan) {
                    return self.start_precopy(volume, job, super::precopy::PrecopyNext::Remap { change });
                }
            }
        }
        self.prepare_reconfigure_with(&name, change, ADMIN_REPLY, false)
    }

    fn admin_retry_later(&mut self, volume: VolumeId, why: &str) -> Step {
        let now_ms = self.now.mono_ms;
        let Some(op) = self.operation.as_mut() else { return Step::Done(None) };
        op.attempts += 1;
        if op.attempts > ADMIN_STEP_ATTEMPTS_MAX {
            let name = self.meta.volume(volume).map(|v| v.name.clone()).unwrap_or_default();
            let msg = format!("volume {name} stayed busy ({why}) through {ADMIN_STEP_ATTEMPTS_MAX} tries");
            return self.finish_op(Err(err(ErrorCode::Busy, msg)));
        }
        op.retry_at_ms = Some(now_ms + ADMIN_STEP_RETRY_MS * u64::from(op.attempts.min(10)));
        Step::Done(None)
    }

    /// Every queued volume is moved: rescan an evacuated device (something
    /// may have landed on it before the evacuation started), then finish.
    fn admin_all_moved(&mut self, kind: OpKind) -> Step {
        let OpKind::Evacuate { device, remove_after, .. } = kind else {
            return self.finish_op(Ok(Response::Done));
        };
        let left = self.volumes_on(device);
        let Some(op) = self.operation.as_mut() else { return Step::Done(None) };
        if !left.is_empty() {
            if op.rescans >= EVACUATE_RESCANS_MAX {
                let msg = format!("device {device} still holds extents after {} rescans", op.rescans);
                return self.finish_op(Err(err(ErrorCode::Busy, msg)));
            }
            op.rescans += 1;
            self.plan_evacuation(device);
            return Step::Done(None);
        }
        if !remove_after {
            return self.finish_op(Ok(Response::Done));
        }
        op.busy = true;
        Step::Commit { changes: vec![MetaChange::DeviceRemove { device }], then: AfterCommit::AdminRemoved { device } }
    }

    /// The replaced device's removal was committed (or not).
    pub(super) fn admin_removed(&mut self, device: DeviceIndex, result: Result<(), ControlError>) {
        let result = result.map(|()| {
            info!(%device, "the replaced device was removed from the pool");
            Response::Done
        });
        let step = self.finish_op(result);
        self.run_step(step);
    }

    /// Ends the operation and answers its admin.
    pub(super) fn finish_op(&mut self, result: Result<Response, ControlError>) -> Step {
        let Some(op) = self.operation.take() else { return Step::Done(None) };
        let result = result.map_err(|e| {
            let moved = if op.volumes_done > 0 {
                format!(
                    "; {} volume(s) were moved before that (their new maps are committed), the rest is unchanged: run \
                     the command again to go on",
                    op.volumes_done
                )
            } else {
                String::new()
            };
            ControlError::new(e.code, format!("{}: {}{moved}", op.what, e.message))
        });
        match &result {
            Ok(_) => {
                info!(what = %op.what, volumes = op.volumes_done, extents = op.extents_done, "reconfiguration done")
            }
            Err(e) => warn!("reconfiguration failed: {e}"),
        }
        done(op.reply, result)
    }

    /// Whether `reply` is a step of the operation; if so it is handled here.
    pub(super) fn admin_reply(&mut self, reply: ReplyId, result: &Result<Response, ControlError>) -> bool {
        if reply != ADMIN_REPLY {
            return false;
        }
        let Some(op) = self.operation.as_mut() else { return true };
        let Some(step) = op.current.take() else { return true };
        self.precopy_end(step.volume, PrecopyFor::Remap);
        let Some(op) = self.operation.as_mut() else { return true };
        match result {
            Ok(_) => {
                op.remaining.pop_front();
                op.attempts = 0;
                op.volumes_done += 1;
                op.extents_done += step.copies;
                op.bytes_done += step.bytes_total;
                self.queue_admin();
            }
            Err(e) if matches!(e.code, ErrorCode::Busy | ErrorCode::Unavailable) => {
                op.extents_total -= step.copies;
                warn!(volume = %step.volume, "moving the volume was refused for now ({e}); trying again");
                let step = self.admin_retry_later(step.volume, &e.message);
                self.run_step(step);
            }
            Err(e) => {
                let name = self.meta.volume(step.volume).map(|v| v.name.clone()).unwrap_or_default();
                let e = ControlError::new(e.code, format!("moving volume {name}: {}", e.message));
                let step = self.finish_op(Err(e));
                self.run_step(step);
            }
        }
        true
    }

    /// The copy job of a remap: every new leg from its sources.
    pub(super) fn remap_job(&self, volume: VolumeId, plan: &RemapPlan) -> Option<Job> {
        if plan.copies.is_empty() {
            return None;
        }
        let at = |e: volume_format::metadata::PhysicalExtent| DeviceExtents {
            device: e.device,
            uri: self.meta.device(e.device).map(|d| d.uri.clone()).unwrap_or_default(),
            offsets: vec![e.offset],
        };
        let copies =
            plan.copies.iter().map(|c| ExtentCopy { to: at(c.to), from: c.from.iter().copied().map(at).collect() });
        let progress = self.operation.as_ref().and_then(|o| o.current.as_ref()).map(|c| c.copied.clone());
        // After an online pass, only what was written meanwhile (the bytes
        // done already count it all).
        if self.precopied(volume, PrecopyFor::Remap) {
            let (unit, copies) =
                self.limit_to_touched(volume, PrecopyFor::Remap, self.meta.extent_bytes, copies.collect());
            return (!copies.is_empty()).then_some(Job::Resync { extent_bytes: unit, copies, progress: None });
        }
        Some(Job::Resync { extent_bytes: self.meta.extent_bytes, copies: copies.collect(), progress })
    }

    /// A remap's change, if the volume's map is still the one it was
    /// planned from.
    pub(super) fn remap_change(&self, volume: VolumeId, plan: &RemapPlan) -> Result<MetaChange, ControlError> {
        let v = self.meta.volume(volume).ok_or_else(|| err(ErrorCode::NotFound, "the volume was deleted"))?;
        if v.layout_generation != plan.layout_generation {
            let msg = "the volume's layout changed while its legs were being copied; nothing was changed, retry";
            return Err(err(ErrorCode::Unavailable, msg));
        }
        Ok(plan.change.clone())
    }

    /// For listings: the operation in progress.
    pub(super) fn operation_infos(&self) -> Vec<OperationInfo> {
        let Some(op) = &self.operation else { return Vec::new() };
        let current = op.current.as_ref();
        let volume = current.and_then(|c| self.meta.volume(c.volume)).map(|v| v.name.clone());
        let state = match (&op.kind, current, &volume) {
            (OpKind::Add { uri, .. }, _, _) if op.busy => format!("labelling {uri}"),
            (_, Some(c), Some(name)) if self.pending_changes.contains_key(&c.volume) => {
                format!("waiting for the holders of volume {name} to pause")
            }
            (_, Some(c), Some(name)) if self.precopies.get(&c.volume).is_some_and(|p| !p.done) => {
                format!("copying volume {name} online (its holders write on)")
            }
            (_, Some(c), Some(name)) if self.precopied(c.volume, PrecopyFor::Remap) => {
                format!("copying what was written to volume {name} meanwhile (its I/O held)")
            }
            (_, Some(_), Some(name)) => format!("copying volume {name}"),
            _ if op.retry_at_ms.is_some() => format!("waiting to retry a busy volume ({} tries)", op.attempts),
            _ if op.busy => "committing".to_string(),
            _ => "planning the next volume".to_string(),
        };
        let copied = current.map_or(0, |c| c.copied.load(Ordering::Relaxed).min(c.bytes_total));
        vec![OperationInfo {
            what: op.what.clone(),
            state,
            volume,
            volumes_done: op.volumes_done,
            volumes_total: op.volumes_total,
            extents_done: op.extents_done,
            extents_total: op.extents_total,
            bytes_done: op.bytes_done + copied,
            bytes_total: op.bytes_done + current.map_or(0, |c| c.bytes_total),
            elapsed_ms: self.now.mono_ms.saturating_sub(op.started_ms),
        }]
    }

    /// For listings: what the operation does to `device` ("" if nothing).
    pub(super) fn device_operation(&self, device: DeviceIndex) -> String {
        let Some(op) = &self.operation else { return String::new() };
        let involved = match &op.kind {
            OpKind::Evacuate { device: d, to, .. } => *d == device || *to == Some(device),
            OpKind::Add { replacing, .. } => *replacing == Some(device),
            OpKind::Volume { kind: RemapKind::Move { from, to }, .. } => *from == device || *to == Some(device),
            OpKind::Volume { .. } => false,
        };
        if !involved {
            return String::new();
        }
        let info = &self.operation_infos()[0];
        format!(
            "{}: {} of {} volumes, {} of {} extents moved; {}",
            op.what, info.volumes_done, info.volumes_total, info.extents_done, info.extents_total, info.state
        )
    }

    /// For listings: whether `volume` is being moved now ("" if not).
    pub(super) fn volume_operation(&self, volume: VolumeId) -> String {
        let Some(op) = &self.operation else { return String::new() };
        match &op.current {
            Some(c) if c.volume == volume => {
                let copied = c.copied.load(Ordering::Relaxed).min(c.bytes_total);
                let pct = (copied * 100).checked_div(c.bytes_total).unwrap_or(100);
                let online = if self.precopies.get(&volume).is_some_and(|p| !p.done) { ", online" } else { "" };
                format!("moving ({}): {pct}% of {} extent(s) copied{online}", op.what, c.copies)
            }
            _ if op.remaining.contains(&volume) => format!("waiting to be moved ({})", op.what),
            _ => String::new(),
        }
    }
}
