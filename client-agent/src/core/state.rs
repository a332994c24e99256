//! What the owner knows about each attachment, and the allow-lists every
//! change of it goes through.
//!
//! Why allow-lists: a volume's lifecycle (opening → preparing → attached →
//! detaching) and its gate's phase (open, recalled, revoked, detached) are
//! where a wrong step loses data or hangs I/O, and both are changed from many
//! places (commands, server events, task results, replies). Every change goes
//! through [`checked_stage`] or [`checked_phase`], which know the legal moves
//! and fail loudly, naming the volume and both states, on any other — a bug in
//! the owner, never a reaction to input (input that does not fit the current
//! state is ignored with a log line before a transition is attempted).

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volume_format::control::messages::OpenMode;
use volume_format::description::DeviceEndpoint;

use super::{AttachmentId, CallerId, ConnId, Millis, OpenWith};
use crate::export::ExportTarget;
use crate::gate::Phase;

/// The lifecycle of one attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// `Open` (or `OpenHandover`) sent; no handle yet.
    Opening,
    /// The handle is open and its gate installed; a task connects the
    /// devices and binds the export. Server events apply already.
    Preparing,
    /// Served; listed.
    Attached,
    /// A task flushes, stops the export and drains the gate; then the handle
    /// is closed. Listed until then.
    Detaching,
}

/// Moves `stage` to `next` if that is a legal step; anything else is a bug
/// in the owner and panics with the volume and both stages.
pub fn checked_stage(volume: &str, stage: &mut Stage, next: Stage) {
    use Stage::*;
    let allowed = matches!(
        (*stage, next),
        (Opening, Preparing) | (Preparing, Attached) | (Attached, Detaching)
            // A failed flush or kernel detach leaves the volume attached.
            | (Detaching, Attached)
    );
    assert!(allowed, "volume {volume}: stage {stage:?} -> {next:?} is not an allowed transition");
    *stage = next;
}

/// Moves a gate's `phase` to `next` if that is a legal step; anything else is
/// a bug in the owner and panics with the volume and both phases.
pub fn checked_phase(volume: &str, phase: &mut Phase, next: Phase) {
    use Phase::*;
    let allowed = matches!(
        (&*phase, &next),
        (Open, Recalled { .. })
            // A newer recall while recalled.
            | (Recalled { .. }, Recalled { .. })
            | (Recalled { .. }, Open)
            // A publish without a recall (a device marked failed, a resume with a new layout).
            | (Open, Open)
            | (Open | Recalled { .. } | Revoked { .. }, Revoked { .. })
            | (Open | Recalled { .. } | Revoked { .. }, Closed)
    );
    assert!(allowed, "volume {volume}: gate {phase:?} -> {next:?} is not an allowed transition");
    *phase = next;
}

/// What the agent must remember to resume a handle and serve its volume
/// again: plain, serializable data in one place. The agent's state file
/// ([`crate::state_dir`]) is a dump of
/// [`AgentCore::held_handles`](super::AgentCore::held_handles), and a
/// restarted agent hands each record back ([`super::Command::Restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldHandle {
    pub volume: String,
    pub handle: u64,
    pub mode: OpenMode,
    /// From the open; sent back in `Resume` after a reconnect. Empty if the
    /// server gave none (the agent then re-opens).
    pub resume_key: Vec<u8>,
    pub pool_uuid: Uuid,
    pub export: ExportTarget,
    /// `/dev/nbd<index>` while the volume is attached to the kernel.
    pub kernel_device: Option<u32>,
    /// A recall the server is waiting on (until its publish arrives).
    pub pending_recall: Option<PendingRecall>,
    /// The devices of the volume's layout when the handle was opened or taken
    /// back (as the pool records them). A restarted agent connects to them
    /// while the server is still answering its resume, so I/O flows as soon
    /// as the handle is back; the layout the server then gives is what
    /// counts (connections only, no I/O, labels checked as always).
    #[serde(default)]
    pub devices: Vec<DeviceEndpoint>,
    /// The server copies this handle's snapshot pre-images (see
    /// [`crate::cow`]): the handle came from a handover, or was handed over,
    /// so another writer may exist.
    #[serde(default)]
    pub cow_by_server: bool,
}

/// A recall in progress: drained and confirmed or not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRecall {
    pub generation: u64,
    /// The gate has drained (in-flight I/O finished).
    pub drained: bool,
    /// The server acknowledged `RecallDone`.
    pub confirmed: bool,
}

/// The owner's record of a volume's gate. The owner decides (with the same
/// rules the gate has, [`crate::gate::recall_allowed`] and
/// [`crate::gate::publish_allowed`]); the data path's gate enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateMirror {
    pub phase: Phase,
    /// Layout generation in use.
    pub generation: u64,
    /// The volume's size in that layout.
    pub size_bytes: u64,
}

/// Bringing a handle over to a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing in flight (on the current connection, or waiting for the next try).
    Idle,
    /// `Resume` with the resume key sent.
    Resuming,
    /// No resume key: `Close` of the old handle sent, `Open` follows.
    ClosingOld,
    /// No resume key: `Open` sent.
    Reopening,
}

/// An open handle as the owner tracks it.
#[derive(Debug, Clone)]
pub struct Handle {
    pub held: HeldHandle,
    pub gate: GateMirror,
    /// The connection the handle lives on: a renewal on another one does not
    /// extend its lease (the server renews per session).
    pub conn: ConnId,
    /// Recorded conservatively: the renewal's send time plus the lease.
    pub lease_until_ms: Millis,
    pub recovery: Recovery,
    /// Confirming the pending recall (`RecallDone`), retried until answered.
    pub confirm: Confirm,
}

/// Where confirming a drained recall stands. Not persisted: a restarted
/// agent drains again (nothing is in flight in a new process) and confirms
/// again (the server counts a confirmation once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    /// A `RecallDone` is in flight.
    pub in_flight: bool,
    /// The next try, not before (after a failed one).
    pub retry_at_ms: Millis,
    /// The pause after the next failure.
    pub pause_ms: u64,
}

impl Default for Confirm {
    fn default() -> Confirm {
        Confirm { in_flight: false, retry_at_ms: 0, pause_ms: super::recalls::CONFIRM_PAUSE_MIN_MS }
    }
}

/// One attachment (by volume name; at most one per volume).
#[derive(Debug, Clone)]
pub struct Volume {
    /// Distinguishes this attachment from an earlier one of the same volume,
    /// so a late task result never lands on the wrong one.
    pub id: AttachmentId,
    pub name: String,
    pub stage: Stage,
    pub open: OpenWith,
    pub export: ExportTarget,
    pub kernel: Option<super::KernelPlan>,
    /// `None` while opening.
    pub handle: Option<Handle>,
    /// Who waits for the attach or detach in progress.
    pub caller: Option<CallerId>,
    pub export_uri: Option<String>,
    /// Byte-range locks to take right after the open (`attach --lock`).
    pub locks: Vec<volume_format::locks::LockRange>,
    /// The volume's lock table as the server last told it.
    pub lock_table: volume_format::locks::LockTable,
    /// The server's copy of the volume in progress, as it last told.
    pub recovery: Option<volume_format::control::messages::RecoveryStatus>,
    /// An open waiting for its locks: the answer and when/where its `Open`
    /// was sent (the lease counts from then).
    pub locking: Option<Box<(volume_format::control::messages::OpenedHandle, super::Millis, super::ConnId)>>,
}

impl Volume {
    /// Whether server events for its handle apply (it has a gate).
    pub fn has_gate(&self) -> bool {
        self.handle.is_some() && matches!(self.stage, Stage::Preparing | Stage::Attached | Stage::Detaching)
    }

    /// Whether `list` shows it.
    pub fn listed(&self) -> bool {
        matches!(self.stage, Stage::Attached | Stage::Detaching)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_allow_list() {
        let mut s = Stage::Opening;
        for next in [Stage::Preparing, Stage::Attached, Stage::Detaching, Stage::Attached, Stage::Detaching] {
            checked_stage("v", &mut s, next);
        }
        for (from, to) in [
            (Stage::Opening, Stage::Attached),
            (Stage::Preparing, Stage::Detaching),
            (Stage::Attached, Stage::Opening),
            (Stage::Detaching, Stage::Preparing),
        ] {
            let r = std::panic::catch_unwind(|| checked_stage("v", &mut from.clone(), to));
            assert!(r.is_err(), "{from:?} -> {to:?} must be refused");
        }
    }

    #[test]
    fn the_gate_allow_list() {
        let mut p = Phase::Open;
        checked_phase("v", &mut p, Phase::Recalled { generation: 2 });
        checked_phase("v", &mut p, Phase::Recalled { generation: 3 });
        checked_phase("v", &mut p, Phase::Open);
        checked_phase("v", &mut p, Phase::Revoked { reason: "x".into() });
        checked_phase("v", &mut p, Phase::Closed);
        for (from, to) in [
            (Phase::Revoked { reason: "x".into() }, Phase::Open),
            (Phase::Revoked { reason: "x".into() }, Phase::Recalled { generation: 9 }),
            (Phase::Closed, Phase::Open),
            (Phase::Closed, Phase::Revoked { reason: "x".into() }),
        ] {
            let r = std::panic::catch_unwind(|| checked_phase("v", &mut from.clone(), to.clone()));
            assert!(r.is_err(), "{from:?} -> {to:?} must be refused");
        }
    }
}
