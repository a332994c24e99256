//! New space reads as zeros: extents are zeroed before a commit hands them
//! to a volume.
//!
//! Why: a deleted volume's data stays on its extents, and without this the
//! next volume (or a grown one) given those extents could read it — one
//! tenant's data shown to the next.
//!
//! Why zero *before the commit that allocates* rather than on delete: it is
//! crash safe with nothing recorded. Until the commit, the extents are free
//! and no volume can read them; a crash mid-zeroing leaves free space that
//! is zeroed again at the next allocation. Zeroing on delete would have to
//! record "freed but not yet zeroed" extents durably (a crash between the
//! delete's commit and the zeroing would otherwise leave stale free space),
//! and it would not cover space that held data before it joined the pool.
//! The price: a create or grow waits for its zeroing. With NBD WRITE_ZEROES
//! (the client emulates it with writes where a device lacks it) a device
//! that can zero fast (nbdkit's file plugin, a thin LV, an SSD with
//! deallocate) makes that milliseconds per GiB; a device that must write the
//! zeros makes a 1 TiB create take as long as writing 1 TiB, off the owner
//! loop (a job), leases and other volumes unaffected.
//!
//! How, in the core: a commit that hands out extents the server has not
//! zeroed since they were last used becomes a [`Job::Zero`] first; when it
//! reports back, the same changes are committed if every extent is still
//! free. While a zeroing job runs, no other change that allocates is
//! prepared (so nothing can take, write and free an extent the job is
//! zeroing, and the planned extents stay free). [`Core::zeroed`] remembers
//! extents zeroed and not allocated since, so a grow zeroed before its
//! recall is not zeroed again while the holders wait; it lives in memory
//! only (after a restart, space is simply zeroed again).

use std::collections::BTreeSet;

use tracing::info;
use volume_format::control::messages::{ControlError, ErrorCode, Request};
use volume_format::metadata::{MetaChange, PhysicalExtent};

use super::core::{AfterCommit, AfterJob, Core, Step, VolumeChange};
use super::jobs::{DeviceExtents, Job, JobOutcome};

impl Core {
    /// The extents `changes` would hand to volumes that are not known zero.
    pub(super) fn unzeroed(&self, changes: &[MetaChange]) -> Vec<PhysicalExtent> {
        let extents: BTreeSet<PhysicalExtent> =
            changes.iter().flat_map(|c| c.new_volume_extents()).filter(|e| !self.zeroed.contains(e)).collect();
        extents.into_iter().collect()
    }

    /// The job that zeroes `extents`, grouped by device.
    pub(super) fn zero_job(&self, extents: &[PhysicalExtent]) -> Job {
        let mut targets: Vec<DeviceExtents> = Vec::new();
        for e in extents {
            match targets.last_mut() {
                Some(t) if t.device == e.device => t.offsets.push(e.offset),
                _ => {
                    let uri = self.meta.device(e.device).map(|d| d.uri.clone()).unwrap_or_default();
                    targets.push(DeviceExtents { device: e.device, uri, offsets: vec![e.offset] });
                }
            }
        }
        Job::Zero { extent_bytes: self.meta.extent_bytes, targets }
    }

    /// A commit of `changes` that must first zero `extents`: the zeroing
    /// job, which then commits them (see [`Core::zeroing_done`]).
    pub(super) fn zero_then_commit(
        &mut self,
        extents: Vec<PhysicalExtent>,
        changes: Vec<MetaChange>,
        then: AfterCommit,
    ) -> Step {
        info!(extents = extents.len(), "zeroing the new space before handing it out");
        self.zeroing = true;
        let job = self.zero_job(&extents);
        Step::Job { job, busy: None, then: AfterJob::Zeroed { extents, changes, then: Box::new(then) } }
    }

    /// A zeroing job reported back: commit what waited for it, if every
    /// extent it hands out is still free (a device may have failed meanwhile).
    pub(super) fn zeroing_done(
        &mut self,
        extents: Vec<PhysicalExtent>,
        changes: Vec<MetaChange>,
        then: AfterCommit,
        outcome: JobOutcome,
    ) -> Step {
        self.zeroing = false;
        if let Err(why) = outcome.result {
            self.finish_commit(then, Err(zeroing_failed(&why)));
            return Step::Done(None);
        }
        let free: BTreeSet<PhysicalExtent> = self
            .meta
            .free_extents()
            .per_device
            .iter()
            .flat_map(|(&device, offsets)| offsets.iter().map(move |&offset| PhysicalExtent { device, offset }))
            .collect();
        // Zeroed and still free: later allocations need not zero them again.
        self.zeroed.extend(extents.iter().copied().filter(|e| free.contains(e)));
        let taken = changes.iter().flat_map(|c| c.new_volume_extents()).find(|e| !free.contains(e));
        if let Some(extent) = taken {
            let msg = format!(
                "extent {extent} stopped being free while it was zeroed (its device failed?); nothing was changed, retry"
            );
            self.finish_commit(then, Err(ControlError::new(ErrorCode::Unavailable, msg)));
            return Step::Done(None);
        }
        Step::Commit { changes, then }
    }

    /// A commit of `changes` succeeded: the extents it allocated are no
    /// longer known zero (their volume or snapshot writes them).
    pub(super) fn allocated(&mut self, changes: &[MetaChange]) {
        if self.zeroed.is_empty() {
            return;
        }
        for extent in changes.iter().flat_map(|c| c.allocated_extents()) {
            self.zeroed.remove(&extent);
        }
    }

    /// Whether a queued request allocates extents (and so waits while a
    /// zeroing job runs).
    pub(super) fn allocates(request: &Request) -> bool {
        matches!(request, Request::VolumeCreate { .. } | Request::VolumeGrow { .. } | Request::SnapshotCreate { .. })
    }

    /// Whether a volume change allocates extents.
    pub(super) fn change_allocates(change: &VolumeChange) -> bool {
        matches!(change, VolumeChange::Grow { .. } | VolumeChange::SnapshotCreate { .. })
    }
}

/// The answer to a change whose new space could not be zeroed.
pub(super) fn zeroing_failed(why: &str) -> ControlError {
    ControlError::new(
        ErrorCode::Unavailable,
        format!(
            "the new space could not be zeroed ({why}); nothing was changed: check the devices (`sanvol device \
             list`) and retry"
        ),
    )
}
