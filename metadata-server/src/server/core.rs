//! The owner of the pool state, as a plain state machine.
//!
//! [`Core`] holds the committed pool metadata, the handle table, the
//! sessions (who they are, not their sockets), recalls in progress and the
//! grace period. It is driven by [`Input`]s and answers with [`Effect`]s:
//! `apply` never awaits, never reads a clock (every input comes with
//! [`Now`]) and never touches a socket or a device. The async shell
//! (`owner`) turns effects into I/O — replies and events to sessions,
//! metadata commits, long jobs — and feeds their results back as inputs.
//!
//! Why: the owner must never wait on bulk data I/O or a device. When it did
//! (copying pre-images for shared writers, merging them on snapshot delete,
//! checking a reported device), every lease renewal in the pool queued
//! behind one slow request and whole pools' I/O could stall. Now renewals
//! are applied the moment they arrive, whatever is in flight. And a core
//! without I/O runs unchanged under a deterministic simulator.
//!
//! **Changes are serialized.** A request that may change the metadata (or
//! the handle table) is queued and *prepared* only when it reaches the head:
//! validated against the state as it is then, it becomes a [`Step`] —
//! answered at once, a commit of the next metadata, a job, or parked until
//! a recall completes. At most one commit is in flight; the next change is
//! prepared from the metadata that commit produced. A job (server-side
//! copy, merge, device check) makes its volume *busy*: later changes to
//! that volume wait, others go on. Reads and renewals never queue.
//!
//! The invariant kept between inputs: `meta` is exactly what was last
//! committed, and the `Active` records of `meta.handles` list exactly the
//! handles in `handles` — except for the one change whose commit is in
//! flight, which has reserved its handle in the table (and undoes that if
//! the commit fails). `Broken` records have no entry in `handles`: they are
//! kept only to tell a late resume what happened.
//!
//! Every map the core iterates is ordered (`BTreeMap`), so the effects of an
//! input depend only on the inputs before it: a simulator replays a seed
//! exactly (a `HashMap`'s order changes from run to run).
//!
//! After a restart with handles in the metadata, a grace period ([`Grace`])
//! serves only resumes (and read-only requests) until every restored handle
//! was resumed or closed, or `grace_ms` ran out.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tracing::{debug, info, warn};
use uuid::Uuid;
use volume_format::control::auth::Role;
use volume_format::control::messages::{ControlError, ErrorCode, Request, Response, ServerEvent, ServerInfo};
use volume_format::lease::ServerRole;
use volume_format::metadata::{HandleState, MetaChange, PoolMetadata, Undo};
use volume_format::{HandleId, PublicKey, VolumeDescription, VolumeId};

use super::commit::{MetaJournal, SealRefused, COMMIT_BATCH_CHANGES_MAX};
use super::jobs::{Job, JobOutcome};
use crate::handles::{Grace, Handle, HandleTable, RecallState, SessionId};
use crate::pool::journal::RawWrite;
use crate::resume::TokenClock;
use control_client::handshake::Peer;

/// Authorized keys as the handshake sees them: key → (role, name).
pub type ClientTable = HashMap<[u8; 32], (Role, String)>;

/// Names a waiting caller; the shell maps it to the caller's reply channel.
pub type ReplyId = u64;

/// Names a commit or a job in flight.
pub type TaskId = u64;

/// Changes queued behind the one in flight before requests are refused
/// with "busy": a bound, so a flood of changes cannot grow memory.
pub const CHANGES_QUEUED_MAX: usize = 4096;

/// The time an input happens at: monotonic milliseconds (leases, deadlines;
/// since the server started) and wall-clock milliseconds (records and
/// messages people read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    pub mono_ms: u64,
    pub unix_ms: u64,
}

impl Now {
    pub fn unix_secs(&self) -> u64 {
        self.unix_ms / 1000
    }

    /// Renders monotonic time `at_ms` as a wall-clock time plus how far away
    /// it is: "14:03:07Z, in 8.2 s".
    pub fn describe(&self, at_ms: u64) -> String {
        let wall_ms = (self.unix_ms as i128 + at_ms as i128 - self.mono_ms as i128).max(0) as u64;
        let delta = at_ms as i64 - self.mono_ms as i64;
        let when = if delta >= 0 {
            format!("in {:.1} s", delta as f64 / 1000.0)
        } else {
            format!("{:.1} s ago", -delta as f64 / 1000.0)
        };
        format!("{}, {when}", super::durable::hms(wall_ms / 1000))
    }
}

/// Random bytes for the core (handover-token nonces). Injected so a
/// simulator can seed it.
pub trait Entropy: Send {
    fn fill(&mut self, buf: &mut [u8]);
}

/// The operating system's random source.
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        getrandom::getrandom(buf).expect("the OS random source failed");
    }
}

/// Something that happened, for the core to apply.
#[derive(Debug)]
pub enum Input {
    /// A session authenticated.
    Connected {
        session: SessionId,
        peer: Peer,
        addr: String,
    },
    Disconnected {
        session: SessionId,
    },
    Request {
        session: SessionId,
        request: Request,
        reply: ReplyId,
    },
    /// Time passed: expire handles, check recall deadlines.
    Tick,
    /// Metadata writes the core asked for (a commit or a checkpoint) are
    /// done: which copies took them (written and flushed), and why the
    /// others did not.
    MetaWritten {
        task: TaskId,
        written: Vec<bool>,
        failures: Vec<String>,
    },
    /// A job the core started finished.
    JobDone {
        task: TaskId,
        outcome: JobOutcome,
    },
    /// Whether the server currently reaches each device (after a commit or
    /// a check); shown in listings.
    Reachability {
        device: Uuid,
        reachable: bool,
        /// Whether it fences, if the server is connected to it (its
        /// description says so; `sanvol-target`).
        fences: Option<bool>,
    },
    /// The pool's metadata servers as the lease sectors say (listings).
    Servers {
        servers: Vec<ServerInfo>,
    },
    /// The disk lease was handed to the standby (or the handoff failed).
    HandedOff {
        result: Result<(), String>,
    },
    /// The disk lease is lost: this server may commit nothing more.
    LeaseLost {
        why: String,
    },
}

/// Something the shell must do for the core, in order.
// Large because `Reply` carries a `Response` (itself allowed large in
// `messages`): a few effects per input, each moved once to the shell.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Effect {
    Reply {
        reply: ReplyId,
        result: Result<Response, ControlError>,
    },
    Event {
        session: SessionId,
        event: ServerEvent,
    },
    /// Close this session (revoked key, or it cannot keep up with events).
    Kick {
        session: SessionId,
    },
    /// Sealed metadata writes (a journal entry or a checkpoint) for every
    /// metadata copy; answer with [`Input::MetaWritten`].
    MetaWrite {
        task: TaskId,
        write: RawWrite,
    },
    /// Run `job` off the owner loop; answer with [`Input::JobDone`].
    Job {
        task: TaskId,
        job: Job,
    },
    /// The committed metadata changed: readers outside the core (backup
    /// channels, and the handshake's client table when `clients` is set)
    /// must see it before any reply to the commit that produced it. The
    /// shell shares [`Core::meta`] only while someone reads it: sharing
    /// makes the next change copy the whole metadata.
    Published {
        clients: Option<Arc<ClientTable>>,
    },
    /// Hand the disk lease to the standby with host id `to`; answer with
    /// [`Input::HandedOff`]. Nothing is in flight and nothing more will be
    /// committed.
    HandOff {
        to: u32,
    },
    /// This server is done serving the pool (handed off, or lost its
    /// lease): the shell stops once the effects before this are out.
    Stop {
        why: String,
    },
    /// Pass `op` to `volume`'s cache mirror ([`crate::mirror`]); the mirror
    /// answers `reply` itself (`None`: nobody waits for the answer).
    Mirror {
        volume: VolumeId,
        op: crate::mirror::MirrorOp,
        reply: Option<ReplyId>,
    },
}

/// A reconfiguration of one volume's layout: committed at a recall point
/// (while the volume's holders have drained) when it has holders.
#[derive(Debug, Clone)]
pub enum VolumeChange {
    Grow {
        size_bytes: u64,
    },
    SnapshotCreate {
        name: String,
    },
    SnapshotDelete {
        name: String,
    },
    /// The volume's extents on `device` (come back) are copied while its
    /// holders are drained; they resume writing its legs (`recovery`).
    Resync {
        device: volume_format::DeviceIndex,
    },
    /// The volume's legs move, or a mirror leg is added or removed: the
    /// new legs are copied while its holders are drained, then the new map
    /// is committed (`reconfig`). Planned once, when the step started.
    Remap {
        plan: Box<volume_format::metadata::RemapPlan>,
        kind: volume_format::metadata::RemapKind,
    },
}

impl VolumeChange {
    /// The volume and change a request asks for, or the request back if it
    /// is not a volume change.
    pub fn of(request: Request) -> Result<(String, VolumeChange), Request> {
        match request {
            Request::VolumeGrow { name, size_bytes } => Ok((name, VolumeChange::Grow { size_bytes })),
            Request::SnapshotCreate { volume, name } => Ok((volume, VolumeChange::SnapshotCreate { name })),
            Request::SnapshotDelete { volume, name } => Ok((volume, VolumeChange::SnapshotDelete { name })),
            other => Err(other),
        }
    }
}

impl std::fmt::Display for VolumeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeChange::Grow { size_bytes } => write!(f, "grow to {size_bytes} bytes"),
            VolumeChange::SnapshotCreate { name } => write!(f, "snapshot {name}"),
            VolumeChange::SnapshotDelete { name } => write!(f, "delete snapshot {name}"),
            VolumeChange::Resync { device } => write!(f, "resync its extents on device {device}"),
            VolumeChange::Remap { kind, plan } => write!(f, "{kind} ({} extent legs to copy)", plan.copies.len()),
        }
    }
}

/// A reconfiguration waiting for the volume's holders to drain.
#[derive(Debug)]
pub struct PendingChange {
    pub volume: VolumeId,
    pub change: VolumeChange,
    pub generation: u64,
    pub reply: ReplyId,
}

/// A change waiting in the queue to be prepared.
#[derive(Debug)]
pub enum Change {
    /// A request that may change state.
    Request { session: SessionId, request: Request, reply: ReplyId },
    /// Release handles whose lease (plus durable time) ran out.
    Expire,
    /// Every holder of `volume` confirmed its recall or was excluded:
    /// finish its pending change.
    RecallReady { volume: VolumeId },
    /// A job finished; continue its change.
    JobDone { outcome: JobOutcome, then: AfterJob },
    /// The next step of a device's resync (`recovery`).
    Resync { device: volume_format::DeviceIndex },
    /// Mark a device failed (its resync failed).
    DeviceFailed { device: volume_format::DeviceIndex, reason: String },
    /// The next step of the admin reconfiguration in progress (`reconfig`).
    Admin,
    /// Record in the pool metadata whether devices fence, where a
    /// connection told otherwise than the metadata records (`listings`).
    RecordFencing,
}

/// What preparing a change decided.
#[derive(Debug)]
pub enum Step {
    /// Done without writing metadata; the answer, if someone waits.
    Done(Option<(ReplyId, Result<Response, ControlError>)>),
    /// Done without writing metadata, with an answer for each of several
    /// callers (registrations served together, see `snapshots`).
    Answers(Vec<(ReplyId, Result<Response, ControlError>)>),
    /// Commit `changes`; `then` finishes the change with the commit's result.
    Commit { changes: Vec<MetaChange>, then: AfterCommit },
    /// Run `job` off the loop, with `volume` busy (as `busy` says) until
    /// the change ends; `then` continues when it reports back.
    Job { job: Job, busy: Option<(VolumeId, Busy)>, then: AfterJob },
    /// Answered later (a recall started).
    Parked,
}

/// How a change ends once its commit succeeded or failed.
#[derive(Debug)]
pub enum AfterCommit {
    /// Reply `Done` (or the error) and log `what`.
    Reply {
        reply: ReplyId,
        what: String,
    },
    /// Reply with `response` on success.
    Respond {
        reply: ReplyId,
        response: Box<Response>,
    },
    /// The commit only recorded something on the way to refusing the
    /// request (the token clock, before a token is refused as expired):
    /// refused whatever the commit did.
    Refuse {
        reply: ReplyId,
        error: ControlError,
    },
    /// An open: adopt the handle on success, undo the reservation on failure.
    Open(Box<super::requests::OpenCommit>),
    Close {
        session: SessionId,
        handle: u64,
        reply: ReplyId,
    },
    Revoke {
        session: SessionId,
        key: [u8; 32],
        reply: ReplyId,
        name: String,
    },
    Expire {
        expired: Vec<u64>,
    },
    Recall {
        volume: VolumeId,
        pending: PendingChange,
        excluded: Vec<u64>,
    },
    Handover {
        claims: Box<crate::resume::HandoverToken>,
        handle: Handle,
        reply: ReplyId,
    },
    DeviceFailed {
        device: u32,
        reason: String,
        reply: Option<ReplyId>,
    },
    /// Copy-on-write registrations committed together: each caller's
    /// count of chunks it newly registered, or why its own part was refused.
    CowRegistered {
        volume: VolumeId,
        answers: Vec<(ReplyId, Result<u64, ControlError>)>,
    },
    /// A failed device answered its probe and is resyncing now.
    DeviceBack {
        device: volume_format::DeviceIndex,
    },
    /// A resynchronized device is online again.
    DeviceOnline {
        device: volume_format::DeviceIndex,
    },
    /// A cached volume's new mirror generation is recorded: mirror into
    /// the file prepared for it (`cache`).
    MirrorOpened {
        volume: VolumeId,
        cache: volume_format::metadata::VolumeCache,
        generation: u64,
        reply: ReplyId,
    },
    /// "Nothing pending" is recorded for a replayed mirror: `next` goes on
    /// (`cache`).
    MirrorCleared {
        volume: VolumeId,
        next: Box<super::cache::AfterReplay>,
    },
    /// The handles an open broke are recorded as broken: the replay of the
    /// volume's mirror runs next (`cache`).
    BrokenBeforeReplay {
        volume: VolumeId,
        next: Box<super::cache::AfterReplay>,
    },
    /// A device labelled by `device add` is in the pool (`reconfig`).
    DeviceAdded {
        uuid: Uuid,
        index: volume_format::DeviceIndex,
        area: volume_format::metadata::MetadataArea,
    },
    /// A replaced device was removed: the replace is done (`reconfig`).
    AdminRemoved {
        device: volume_format::DeviceIndex,
    },
    /// Whether devices fence was recorded (logged only: a failure is
    /// retried at the next connection's report).
    FencingRecorded {
        devices: usize,
    },
    /// The change of a job: `volume` stops being busy, then `then`.
    Released {
        volume: VolumeId,
        then: Box<AfterCommit>,
    },
}

/// How a change continues once its job reported back.
#[derive(Debug)]
pub enum AfterJob {
    /// Pre-images copied by the server: register them.
    CowCopied(CowCopied),
    /// Pre-images moved for a snapshot delete: commit the delete.
    Merged { volume: VolumeId, change: VolumeChange, finish: MergeFinish },
    /// A reported device was checked.
    DeviceChecked { session: SessionId, device: u32, reason: String, reply: ReplyId },
    /// The extents `changes` hand out were zeroed: commit them (`zeroing`).
    Zeroed { extents: Vec<volume_format::metadata::PhysicalExtent>, changes: Vec<MetaChange>, then: Box<AfterCommit> },
    /// A failed device was probed.
    Probed { device: volume_format::DeviceIndex },
    /// A device whose metadata copy missed a commit was checked (`recovery`).
    CopyChecked { device: volume_format::DeviceIndex, why: String },
    /// A device was labelled for `device add` (`reconfig`).
    Labelled,
    /// Expired handles were fenced on the fencing devices: release them.
    ExpireFenced { expired: Vec<u64> },
    /// The handles an open breaks were fenced on the fencing devices:
    /// commit the open.
    OpenFenced { changes: Vec<MetaChange>, open: Box<super::requests::OpenCommit> },
    /// The holders a recall excludes were fenced on the fencing devices:
    /// (merge,) commit the change.
    RecallFenced { volume: VolumeId, pending: PendingChange, excluded: Vec<u64> },
    /// A grow's new extents were zeroed before its holders are recalled.
    Prezeroed {
        extents: Vec<volume_format::metadata::PhysicalExtent>,
        name: String,
        change: VolumeChange,
        reply: ReplyId,
    },
    /// The file of a new mirror generation is prepared (or why not): commit
    /// the generation (`cache`).
    MirrorPrepared {
        session: SessionId,
        handle: volume_format::HandleId,
        volume: VolumeId,
        generation: u64,
        reply: ReplyId,
    },
    /// A cached volume's mirror was replayed to its devices: continue the
    /// request that needed it (`crate::mirror`).
    MirrorReplayed { volume: VolumeId, next: super::cache::AfterReplay, cleared: bool },
    /// The commit of the handles an open broke before a replay reported
    /// (`cache`): replay, or give up the open.
    BrokenRecorded { volume: VolumeId, next: super::cache::AfterReplay },
    /// The regions a gone holder left dirty were copied: open (`intents`).
    OrphansResynced(super::intents::OrphansResync),
    /// The online pass of a volume's copy step is done (`precopy`).
    Precopied { volume: VolumeId, next: super::precopy::PrecopyNext },
    /// A resumed handle's dirty regions were copied: forget them.
    HandleResynced { volume: VolumeId, handle: volume_format::HandleId, reply: ReplyId },
}

/// A server-side copy in flight: the registrations it serves (one job and
/// one commit for all of them), on one volume's newest snapshot.
#[derive(Debug)]
pub struct CowCopied {
    pub volume: VolumeId,
    pub snapshot: u64,
    pub asks: Vec<CowAsk>,
}

/// One caller's registration of copy-on-write chunks.
#[derive(Debug)]
pub struct CowAsk {
    pub session: SessionId,
    pub handle: u64,
    pub chunks: Vec<u64>,
    pub reply: ReplyId,
}

/// Where a snapshot-delete merge goes once done.
#[derive(Debug)]
pub enum MergeFinish {
    /// No holders: reply directly.
    Direct { reply: ReplyId },
    /// At a recall point: finish the pending change.
    Recall { pending: PendingChange, excluded: Vec<u64> },
}

/// What a job in flight on a volume blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Server-side pre-image copies: registrations on the volume wait (a
    /// chunk registered and overwritten meanwhile would be copied wrong),
    /// and so do layout changes.
    Cow,
    /// Pre-images moving between snapshots: layout and snapshot changes and
    /// copy-on-write registrations of the volume wait; I/O to chunks already
    /// registered goes on.
    Layout,
    /// A device's extents of the volume being copied (`recovery`): what
    /// waits for `Layout` waits, and so do opens.
    Resync,
    /// The online pass of a copy (`precopy`): the holders go on writing
    /// (marks and registrations go on); layout and snapshot changes, opens
    /// and server-side pre-image copies wait. Kept apart from the other
    /// kinds (`Core::precopies`), so another job on the volume meanwhile (a
    /// resumed handle's resync) neither hides nor ends it.
    Precopy,
}

/// Changes applied to the metadata and committed together.
#[derive(Default)]
struct Batch {
    changes: Vec<MetaChange>,
    /// Per change of the batch: how to take it back and how it ends.
    parts: Vec<(Vec<Undo>, AfterCommit)>,
    /// Answers computed from the batch's state, sent once it is durable.
    deferred: Vec<(ReplyId, Result<Response, ControlError>)>,
}

/// The commit in flight.
struct InFlight {
    task: TaskId,
    seq: u64,
    batch: Batch,
    checkpoint_after: Option<(u64, RawWrite)>,
}

pub struct Core {
    /// The committed metadata.
    pub meta: Arc<PoolMetadata>,
    pub handles: HandleTable,
    pub sessions: BTreeMap<SessionId, Peer>,
    /// Session address, for logs.
    pub session_addrs: BTreeMap<SessionId, String>,
    pub lease_ms: u64,
    /// Durable timeout given to new handles.
    pub durable_ms: u64,
    /// Signs resume keys and handover tokens.
    pub key: Arc<SigningKey>,
    /// The grace period after a restart, while it lasts (and its length).
    pub grace: Option<Grace>,
    grace_ms: u64,
    /// Handover-token time (see [`TokenClock`]).
    pub token_clock: TokenClock,
    pub pending_changes: BTreeMap<VolumeId, PendingChange>,
    /// Agents doing a device's I/O through the server (`data_channel`).
    pub fallback: super::data_channel::FallbackTable,
    /// What each connection's authorization rests on (`grants`).
    pub grants: super::grants::Grants,
    /// Devices the server reaches right now (listings).
    pub reachable: BTreeMap<Uuid, bool>,
    /// Whether each device fences, as last learned from a connection to it
    /// (listings; recorded in the pool metadata by `Change::RecordFencing`).
    pub fencing: BTreeMap<Uuid, bool>,
    /// The time of the input being applied.
    pub now: Now,
    pub entropy: Box<dyn Entropy>,
    /// Handles whose holder was told they are revoked while a release was
    /// in flight: never renewed again (see `tell_removing`).
    pub(super) revoked: BTreeSet<u64>,
    /// Each volume's lock table as its holders were last told it
    /// (`locks`): a commit that changes one tells them again.
    pub(super) lock_tables_told: BTreeMap<VolumeId, volume_format::locks::LockTable>,
    /// The last cache report of each cached volume's holder, by handle,
    /// with when it came (monotonic ms): volatile, see
    /// [`super::cache::Core::cache_report`].
    pub(super) cache_reports: BTreeMap<u64, (volume_format::control::messages::HolderCacheReport, u64)>,
    pub(super) queue: VecDeque<Change>,
    journal: MetaJournal,
    in_flight: Option<InFlight>,
    /// A covering checkpoint being written: (task, checkpoint number).
    checkpoint: Option<(TaskId, u64)>,
    /// A batch that must become a checkpoint while one is being written.
    waiting: Option<Batch>,
    /// A commit failed: the next one (empty if need be) supersedes it.
    supersede_due: bool,
    /// Failed commits whose entry may have reached some copies, oldest
    /// first: their requests are answered ("nothing was changed") only once
    /// a later commit is durable on every copy, which overwrote it. Until
    /// then the outcome is unknown: a standby taking over could load the
    /// entry from a copy that took it, so no holder may be told to go on
    /// with the old state (a snapshot whose pre-images nobody copied).
    unsettled: Vec<(Batch, String)>,
    /// The pool's metadata servers (active and standing by), for listings.
    pub servers: Vec<ServerInfo>,
    /// A planned handoff in progress: (target, admin's reply, lease handoff asked).
    handoff: Option<(ServerInfo, ReplyId, bool)>,
    /// Set once this server no longer serves the pool: why, and where to go.
    pub(super) not_active: Option<String>,
    /// The lease task ended while a handoff was asked of it (see `apply`).
    lease_lost_in_handoff: Option<String>,
    /// Volumes with a job in flight, and what waits for it.
    pub(super) busy: BTreeMap<VolumeId, Busy>,
    /// Jobs in flight and how their changes continue.
    jobs: BTreeMap<TaskId, AfterJob>,
    /// Free extents zeroed since they were last allocated (`zeroing`).
    pub(super) zeroed: BTreeSet<volume_format::metadata::PhysicalExtent>,
    /// A zeroing job is in flight: changes that allocate wait (`zeroing`).
    pub(super) zeroing: bool,
    /// Probing of failed devices, if on (`recovery`).
    pub(super) device_probe: Option<super::recovery::ProbeBackoff>,
    pub(super) probes: super::recovery::Probes,
    /// Devices being checked because their metadata copy missed a commit
    /// (`recovery`).
    pub(super) copy_checks: BTreeSet<volume_format::DeviceIndex>,
    /// Commits in a row whose copy on the device was missed although the
    /// device answered its check (`recovery`); a commit that succeeds
    /// clears it.
    pub(super) copy_misses: BTreeMap<volume_format::DeviceIndex, u32>,
    pub(super) resyncs: super::recovery::Resyncs,
    /// Online passes of copy steps and what was written meanwhile
    /// (`precopy`).
    pub(super) precopies: BTreeMap<VolumeId, super::precopy::Precopy>,
    /// Handles whose agent showed, in this server's lifetime, that it keeps
    /// the write-intent log (`precopy`).
    pub(super) intent_handles: BTreeSet<u64>,
    /// The admin reconfiguration in progress, if any (`reconfig`).
    pub(super) operation: Option<super::reconfig::AdminOp>,
    /// Failed devices are replaced after this long (`reconfig`; `None`: never).
    pub(super) device_replace_after_ms: Option<u64>,
    /// When each failed device's automatic replacement may be tried again.
    pub(super) auto_replace_next_ms: BTreeMap<volume_format::DeviceIndex, u64>,
    next_task: TaskId,
    effects: Vec<Effect>,
    started: bool,
}

pub fn client_table(meta: &PoolMetadata) -> ClientTable {
    meta.clients.iter().map(|c| (c.public_key.0, (c.role, c.name.clone()))).collect()
}

/// Settings of a core.
pub struct CoreConfig {
    pub lease_ms: u64,
    pub durable_ms: u64,
    /// How long past a lease a holder's device requests may still land
    /// ([`HandleTable::device_request_max_ms`]).
    pub device_request_max_ms: u64,
    pub grace_ms: u64,
    pub key: Arc<SigningKey>,
    pub entropy: Box<dyn Entropy>,
}

impl Core {
    /// A core over the loaded `meta`. Handles committed by a previous run
    /// are restored; [`Core::start`] (at the first input's time) opens the
    /// grace period for them.
    pub fn new(meta: PoolMetadata, journal: MetaJournal, config: CoreConfig) -> Core {
        let mut handles = HandleTable::new();
        handles.set_next_id(meta.next_ids.handle.0);
        handles.device_request_max_ms = config.device_request_max_ms;
        Core {
            meta: Arc::new(meta),
            handles,
            sessions: BTreeMap::new(),
            session_addrs: BTreeMap::new(),
            lease_ms: config.lease_ms,
            durable_ms: config.durable_ms,
            key: config.key,
            grace: None,
            grace_ms: config.grace_ms,
            token_clock: TokenClock::default(),
            pending_changes: BTreeMap::new(),
            fallback: Default::default(),
            grants: Default::default(),
            reachable: BTreeMap::new(),
            fencing: BTreeMap::new(),
            now: Now::default(),
            entropy: config.entropy,
            revoked: BTreeSet::new(),
            lock_tables_told: BTreeMap::new(),
            cache_reports: BTreeMap::new(),
            queue: VecDeque::new(),
            journal,
            in_flight: None,
            checkpoint: None,
            waiting: None,
            supersede_due: false,
            unsettled: Vec::new(),
            servers: Vec::new(),
            handoff: None,
            not_active: None,
            lease_lost_in_handoff: None,
            busy: BTreeMap::new(),
            jobs: BTreeMap::new(),
            zeroed: BTreeSet::new(),
            zeroing: false,
            device_probe: None,
            probes: Default::default(),
            copy_checks: BTreeSet::new(),
            copy_misses: BTreeMap::new(),
            resyncs: Default::default(),
            precopies: BTreeMap::new(),
            intent_handles: BTreeSet::new(),
            operation: None,
            device_replace_after_ms: None,
            auto_replace_next_ms: BTreeMap::new(),
            next_task: 1,
            effects: Vec::new(),
            started: false,
        }
    }

    /// Restores the handles of the previous run at `now`: the agents holding
    /// them may still be doing I/O and will resume them, so each keeps its
    /// volume for a fresh lease plus its durable time, counted from now
    /// (this server cannot know how much of the old lease was left).
    fn start(&mut self, now: Now) {
        self.started = true;
        self.token_clock = TokenClock::start(now.mono_ms, now.unix_ms, self.meta.handovers.clock_floor_unix_ms);
        for h in self.meta.handles.iter().filter(|h| matches!(h.state, HandleState::Active)) {
            self.handles.restore(Handle {
                id: h.id.0,
                volume: h.volume.0,
                mode: h.mode,
                session: 0,
                duplicates: Default::default(),
                holder: h.agent_name.clone(),
                opened_at_ms: now.mono_ms,
                lease_until_ms: now.mono_ms + self.lease_ms,
                durable_ms: h.durable_timeout_ms,
            });
        }
        // Where each cached volume's writes are mirrored: after a handoff or
        // a takeover, a file another server holds (see `cache`).
        for m in self.meta.cache_mirrors.iter().filter(|m| m.pending) {
            let volume = self.meta.volume(m.volume).map_or("?", |v| v.name.as_str());
            info!(
                volume,
                generation = m.generation,
                server = %m.server,
                "a cached volume's mirror may hold writes not on the devices yet: its holder mirrors afresh here, \
                 or the next open replays that generation's file if this server has it, and is refused naming its \
                 server if not"
            );
        }
        let restored: Vec<u64> = self.handles.all().map(|h| h.id).collect();
        if !restored.is_empty() && self.grace_ms > 0 {
            self.grace = Some(Grace::new(restored.clone(), now.mono_ms, self.grace_ms));
            info!(
                handles = restored.len(),
                grace_ms = self.grace_ms,
                "handles from the previous run restored; grace period: only resumes are served until they resumed or \
                 it ends"
            );
        }
    }

    /// Applies one input at `now`; returns what the shell must do, in order.
    pub fn apply(&mut self, now: Now, input: Input) -> Vec<Effect> {
        self.now = Now { mono_ms: now.mono_ms.max(self.now.mono_ms), unix_ms: now.unix_ms };
        if !self.started {
            self.start(self.now);
        }
        match input {
            Input::Connected { session, peer, addr } => {
                self.sessions.insert(session, peer);
                self.session_addrs.insert(session, addr);
            }
            Input::Disconnected { session } => {
                if let Some(peer) = self.sessions.remove(&session) {
                    let held = self.handles.of_session(session).count();
                    if held > 0 {
                        info!(session, client = %peer.name, held, "session gone; its handles stay reserved for a resume");
                    }
                }
                self.session_addrs.remove(&session);
                self.handles.detach_session(session);
            }
            Input::Request { session, request, reply } => self.request(session, request, reply),
            Input::Tick => self.tick(),
            Input::MetaWritten { task, written, failures } => self.meta_written(task, written, failures),
            Input::JobDone { task, outcome } => self.job_done(task, outcome),
            Input::Reachability { device, reachable, fences } => {
                self.reachable.insert(device, reachable);
                if let Some(fences) = fences {
                    self.fencing.insert(device, fences);
                    let queued = self.queue.iter().any(|c| matches!(c, Change::RecordFencing));
                    if !queued && !self.fencing_to_record().is_empty() {
                        self.queue.push_back(Change::RecordFencing);
                    }
                }
            }
            Input::Servers { servers } => self.servers = servers,
            Input::HandedOff { result } => self.handed_off(result),
            // The lease task also ends once it handed the lease over: then
            // the handoff's answer (`HandedOff`) follows, and decides.
            Input::LeaseLost { why } if matches!(self.handoff, Some((_, _, true))) => {
                self.lease_lost_in_handoff = Some(why);
            }
            Input::LeaseLost { why } => self.lease_lost(why),
        }
        self.pump();
        self.enforce_grants();
        std::mem::take(&mut self.effects)
    }

    /// When the core next needs a [`Input::Tick`] (a recall deadline), if
    /// sooner than the periodic tick.
    ///
    /// A recall that is ready and already queued needs no tick: it runs as
    /// soon as the commit or job ahead of it is done (asking for one "now"
    /// made the owner loop spin on ticks for as long as a commit took).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let now_ms = self.now.mono_ms;
        self.pending_changes
            .keys()
            .filter_map(|v| match self.handles.recall_state(v.0, now_ms) {
                Some(RecallState::Waiting { deadline_ms, .. }) => Some(deadline_ms),
                Some(RecallState::Ready { .. }) if !self.recall_queued(*v) => Some(now_ms),
                Some(RecallState::Ready { .. }) | None => None,
            })
            .min()
    }

    fn recall_queued(&self, volume: VolumeId) -> bool {
        self.queue.iter().any(|c| matches!(c, Change::RecallReady { volume: v } if *v == volume))
    }

    /// Fails every waiting caller (the server is shutting down).
    pub fn shut_down(&mut self) -> Vec<Effect> {
        let unavailable = || Err(ControlError::new(ErrorCode::Unavailable, "the server is shutting down"));
        for (_, change) in std::mem::take(&mut self.pending_changes) {
            self.effects.push(Effect::Reply { reply: change.reply, result: unavailable() });
        }
        if let Some(op) = self.operation.take() {
            let why = format!("{}: stopped: the server is shutting down; run the command again to go on", op.what);
            self.effects
                .push(Effect::Reply { reply: op.reply, result: Err(ControlError::new(ErrorCode::Unavailable, why)) });
        }
        for change in std::mem::take(&mut self.queue) {
            if let Change::Request { reply, .. } = change {
                self.effects.push(Effect::Reply { reply, result: unavailable() });
            }
        }
        let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        for session in sessions {
            self.effects.push(Effect::Kick { session });
        }
        std::mem::take(&mut self.effects)
    }

    // ---- inputs ----

    fn request(&mut self, session: SessionId, request: Request, reply: ReplyId) {
        if let Some(why) = &self.not_active {
            let e = ControlError::new(ErrorCode::NotActive, why.clone());
            return self.reply(reply, Err(e));
        }
        // Every request renews the session's handles — but not those a
        // commit (or job) in flight is releasing, and their holder hears so
        // before this request's answer: an answer renews, to the agent,
        // every handle it holds on the session.
        let mut skip = self.removing();
        skip.extend(self.revoked.iter().copied());
        self.handles.renew_except(session, self.now.mono_ms, self.lease_ms, &skip);
        if self.tell_removing(session) && matches!(request, Request::Renew) {
            // The agent extends every handle of the session by a renewal's
            // answer, and may apply the answer before the Revoked event (its
            // replies and events take different paths): no answer that
            // renews while one of them is being released.
            let msg = "a handle of this session is being released; the renewal is refused this time, renew again";
            return self.reply(reply, Err(ControlError::new(ErrorCode::Unavailable, msg)));
        }
        if !super::durable::allowed_in_grace(&request) {
            if let Some(left_ms) = self.grace_left_ms() {
                let msg = format!(
                    "the metadata server restarted and is in its grace period, {left_ms} ms left: only resumes are \
                     served until the agents that held volumes have resumed; retry then"
                );
                return self.reply(reply, Err(ControlError::new(ErrorCode::Unavailable, msg)));
            }
        }
        let request = match self.mirror_request(session, request, reply) {
            Ok(()) => return,
            Err(request) => request,
        };
        if let Some(result) = self.read(session, &request) {
            return self.reply(reply, result);
        }
        if self.queue.len() >= CHANGES_QUEUED_MAX {
            let msg = format!("the metadata server has {CHANGES_QUEUED_MAX} changes queued; retry in a moment");
            return self.reply(reply, Err(ControlError::new(ErrorCode::Unavailable, msg)));
        }
        self.queue.push_back(Change::Request { session, request, reply });
    }

    fn tick(&mut self) {
        self.grace_left_ms();
        let handles = &self.handles;
        self.revoked.retain(|id| handles.get(*id).is_some());
        let expired = self.handles.expired(self.now.mono_ms);
        let queued = self.queue.iter().any(|c| matches!(c, Change::Expire));
        let in_flight = self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.batch.parts.iter().any(|(_, then)| matches!(then, AfterCommit::Expire { .. })))
            || self.jobs.values().any(|then| matches!(then, AfterJob::ExpireFenced { .. }));
        if !expired.is_empty() && !queued && !in_flight {
            self.queue.push_back(Change::Expire);
        }
        self.check_recalls();
        self.probe_failed_devices();
        self.admin_tick();
        self.replace_failed_devices();
        self.push_precopy_progress();
    }

    fn meta_written(&mut self, task: TaskId, written: Vec<bool>, failures: Vec<String>) {
        if let Some((t, number)) = self.checkpoint {
            if t == task {
                self.checkpoint = None;
                self.journal.checkpoint_written(number, &written);
                if failures.is_empty() {
                    info!(number, "metadata checkpoint written to every copy");
                } else {
                    warn!(number, "metadata checkpoint failed on some copies: {}", failures.join("; "));
                }
                if let Some(batch) = self.waiting.take() {
                    self.seal(batch);
                }
                return;
            }
        }
        let Some(in_flight) = self.in_flight.take_if(|f| f.task == task) else {
            return warn!(task, "metadata writes nobody waits for");
        };
        let InFlight { seq, batch, checkpoint_after, .. } = in_flight;
        match self.journal.commit_written(seq, &written) {
            Ok(()) => {
                debug!(seq, changes = batch.changes.len(), "metadata committed");
                // Every copy on an online device took it.
                self.copy_misses.clear();
                // This commit overwrote every refused one on every copy:
                // their outcome is known now.
                for (refused, why) in std::mem::take(&mut self.unsettled) {
                    self.answer_refused(refused, &why);
                }
                let clients_changed = batch
                    .changes
                    .iter()
                    .any(|c| matches!(c, MetaChange::ClientPut(_) | MetaChange::ClientRemove { .. }));
                let clients = clients_changed.then(|| Arc::new(client_table(&self.meta)));
                self.effects.push(Effect::Published { clients });
                self.allocated(&batch.changes);
                for (_, then) in batch.parts {
                    self.finish_commit(then, Ok(()));
                }
                self.tell_lock_tables(&batch.changes);
                for (reply, result) in batch.deferred {
                    self.reply(reply, result);
                }
                if let Some((number, write)) = checkpoint_after {
                    let task = self.next_task();
                    self.checkpoint = Some((task, number));
                    self.effects.push(Effect::MetaWrite { task, write });
                }
            }
            Err(failed) => {
                let why = if failures.is_empty() { failed.why.clone() } else { failures.join("; ") };
                warn!(seq, "metadata commit failed: {why}; answered once a later commit supersedes it");
                let batch = self.revert_batch(batch);
                let held = self.answer_plain_refusals(batch, &why);
                self.check_failed_copies(&failed, &why);
                if !held.parts.is_empty() {
                    self.unsettled.push((held, why));
                }
                self.supersede_due = true;
            }
        }
    }

    /// Takes a batch's changes back (they were applied when prepared) and
    /// fails its requests: nothing of it happened.
    fn fail_batch(&mut self, batch: Batch, why: &str) {
        let batch = self.revert_batch(batch);
        self.answer_refused(batch, why);
    }

    /// Takes a batch's changes back from the metadata (they were applied
    /// when prepared); what is left are its answers.
    fn revert_batch(&mut self, batch: Batch) -> Batch {
        let Batch { parts, deferred, changes } = batch;
        let meta = Arc::make_mut(&mut self.meta);
        let mut kept = Vec::with_capacity(parts.len());
        for (undos, then) in parts.into_iter().rev() {
            meta.revert_all(undos);
            kept.push((Vec::new(), then));
        }
        kept.reverse();
        meta.generation = self.journal.acked_seq();
        Batch { parts: kept, deferred, changes }
    }

    /// Answers at once the parts of a failed, reverted batch whose answer
    /// is only a reply (an admin's change, a registration's refusal): the
    /// requester is told the outcome is unknown until this server's next
    /// commit, which voids it. Keeps back the parts whose failure would let
    /// a holder go on with the old state (recalls, opens, closes,
    /// releases…): they are answered once a later commit overwrote the
    /// refused one (`unsettled`). Answers computed from the batch's state
    /// are refused now.
    fn answer_plain_refusals(&mut self, batch: Batch, why: &str) -> Batch {
        let Batch { parts, deferred, changes } = batch;
        let e = ControlError::new(
            ErrorCode::CommitFailed,
            format!(
                "{why}; the change was not made, unless a metadata copy took it before the failure: this \
                 server's next commit voids it; if this server stops first, its successor may load it — check \
                 (e.g. `sanvol volume list`) before retrying"
            ),
        );
        let mut held = Vec::new();
        for (undos, then) in parts {
            match then {
                AfterCommit::Reply { .. } | AfterCommit::Respond { .. } | AfterCommit::Refuse { .. } => {
                    self.finish_commit(then, Err(e.clone()))
                }
                then => held.push((undos, then)),
            }
        }
        for (reply, _) in deferred {
            let retry = "the metadata commit this answer depended on failed; retry";
            self.reply(reply, Err(ControlError::new(ErrorCode::Unavailable, retry)));
        }
        Batch { parts: held, deferred: Vec::new(), changes }
    }

    /// Fails a reverted batch's requests: nothing of it happened.
    fn answer_refused(&mut self, batch: Batch, why: &str) {
        let Batch { parts, deferred, .. } = batch;
        let e = ControlError::new(ErrorCode::CommitFailed, format!("{why}; nothing was changed"));
        for (_, then) in parts {
            self.finish_commit(then, Err(e.clone()));
        }
        for (reply, _) in deferred {
            let retry = "the metadata commit this answer depended on failed; retry";
            self.reply(reply, Err(ControlError::new(ErrorCode::Unavailable, retry)));
        }
    }

    /// Seals a batch (applied to the metadata already) into a commit.
    fn seal(&mut self, batch: Batch) {
        let meta = Arc::make_mut(&mut self.meta);
        match self.journal.seal(meta, &batch.changes) {
            Ok(sealed) => {
                self.supersede_due = false;
                let task = self.next_task();
                self.effects.push(Effect::MetaWrite { task, write: sealed.write });
                self.in_flight =
                    Some(InFlight { task, seq: sealed.seq, batch, checkpoint_after: sealed.checkpoint_after });
            }
            Err(SealRefused::WaitForCheckpoint) => self.waiting = Some(batch),
            Err(SealRefused::Failed(why)) => {
                warn!("sealing a metadata commit failed: {why}");
                self.fail_batch(batch, &why);
            }
        }
    }

    fn job_done(&mut self, task: TaskId, outcome: JobOutcome) {
        let Some(then) = self.jobs.remove(&task) else {
            return warn!(task, "a job result nobody waits for");
        };
        // First in line: its volume is busy until it is done.
        self.queue.push_front(Change::JobDone { outcome, then });
    }

    /// Prepares queued changes while nothing blocks them, into batches: at
    /// most one commit in flight, the next batch prepared from the state it
    /// left; changes to a busy volume wait. A batch starts with any change
    /// and is joined by copy-on-write registrations queued behind it (many
    /// agents' registrations, one write and one flush per copy); answers
    /// computed from a batch's state leave only once it is durable.
    fn pump(&mut self) {
        loop {
            if self.in_flight.is_some() || self.waiting.is_some() {
                return;
            }
            if let Some((target, _, asked)) = &mut self.handoff {
                // Handing off: nothing new is prepared; once nothing is in
                // flight, the lease goes to the standby.
                if !*asked && self.jobs.is_empty() && self.checkpoint.is_none() {
                    *asked = true;
                    let to = target.host_id;
                    self.effects.push(Effect::HandOff { to });
                }
                return;
            }
            let mut batch = Batch::default();
            while batch.parts.len() < COMMIT_BATCH_CHANGES_MAX {
                let Some(i) = self.queue.iter().position(|c| self.runnable(c)) else { break };
                if !batch.parts.is_empty() && !joins_batch(&self.queue[i]) {
                    break;
                }
                let change = self.queue.remove(i).expect("position is in range");
                match self.prepare(change) {
                    Step::Commit { changes, then } if !self.unzeroed(&changes).is_empty() => {
                        let step = self.zero_then_commit(self.unzeroed(&changes), changes, then);
                        self.run_step(step);
                    }
                    Step::Commit { changes, then } => match Arc::make_mut(&mut self.meta).apply_all(&changes) {
                        Ok(undos) => {
                            batch.changes.extend(changes);
                            batch.parts.push((undos, then));
                        }
                        Err(e) => {
                            let e = ControlError::new(ErrorCode::Internal, format!("{e}; nothing was changed"));
                            self.finish_commit(then, Err(e));
                        }
                    },
                    Step::Done(Some(answer)) if !batch.parts.is_empty() => batch.deferred.push(answer),
                    Step::Answers(answers) if !batch.parts.is_empty() => batch.deferred.extend(answers),
                    step => self.run_step(step),
                }
            }
            if batch.parts.is_empty() {
                if self.supersede_due {
                    // An empty commit in place of the refused one; if it
                    // fails too, its result sets this again (no spinning).
                    self.supersede_due = false;
                    self.seal(batch);
                    continue;
                }
                return;
            }
            self.seal(batch);
        }
    }

    fn runnable(&self, change: &Change) -> bool {
        match change {
            Change::JobDone { .. } | Change::Expire => true,
            // While new space is zeroed, nothing else may take free space.
            // So must a copy of an admin reconfiguration (its targets are
            // free in the metadata until its commit).
            Change::Request { request, .. } if (self.zeroing || self.moving()) && Core::allocates(request) => false,
            Change::RecallReady { volume }
                if (self.zeroing || self.moving())
                    && self.pending_changes.get(volume).is_some_and(|p| Core::change_allocates(&p.change)) =>
            {
                false
            }
            Change::Request { request, session, .. } => match self.volume_of(*session, request) {
                Some((volume, waits_for)) => {
                    self.busy.get(&volume).is_none_or(|busy| !waits_for.contains(busy))
                        && !(waits_for.contains(&Busy::Precopy) && self.precopy_running(volume))
                }
                None => true,
            },
            Change::RecallReady { volume } => !self.busy.contains_key(volume) && !self.precopy_running(*volume),
            Change::Resync { .. } | Change::DeviceFailed { .. } => true,
            Change::Admin => !self.zeroing,
            Change::RecordFencing => true,
        }
    }

    pub(super) fn run_step(&mut self, step: Step) {
        match step {
            Step::Done(Some((reply, result))) => self.reply(reply, result),
            Step::Done(None) | Step::Parked => {}
            Step::Answers(answers) => {
                for (reply, result) in answers {
                    self.reply(reply, result);
                }
            }
            Step::Commit { changes, then } => {
                // Only `pump` commits (in batches); a commit step anywhere
                // else is a bug, answered as such rather than lost.
                warn!(changes = changes.len(), "a commit step outside a batch");
                let e = ControlError::new(ErrorCode::Internal, "a change was prepared outside a batch");
                self.finish_commit(then, Err(e));
            }
            Step::Job { job, busy, then } => {
                if let Some((volume, kind)) = busy {
                    self.busy.insert(volume, kind);
                }
                let task = self.next_task();
                self.jobs.insert(task, then);
                self.effects.push(Effect::Job { task, job });
            }
        }
    }

    pub(super) fn push_effect(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    fn next_task(&mut self) -> TaskId {
        let t = self.next_task;
        self.next_task += 1;
        t
    }

    fn prepare(&mut self, change: Change) -> Step {
        match change {
            Change::Request { session, request, reply } => self.prepare_request(session, request, reply),
            Change::Expire => self.prepare_expire(),
            Change::RecallReady { volume } => self.prepare_recall(volume),
            Change::JobDone { outcome, then } => self.continue_job(then, outcome),
            Change::Resync { device } => self.prepare_resync(device),
            Change::DeviceFailed { device, reason } => self.prepare_device_failed(device.0, reason, None),
            Change::Admin => self.prepare_admin(),
            Change::RecordFencing => self.prepare_record_fencing(),
        }
    }

    /// A device labelled while the server runs: its metadata area.
    pub(super) fn journal_add_area(&mut self, uuid: Uuid, area: volume_format::metadata::MetadataArea) {
        self.journal.add_area(uuid, area);
    }

    /// Ends a volume's busy time (its job's change is complete).
    pub fn release(&mut self, volume: VolumeId) {
        self.busy.remove(&volume);
    }

    /// Jobs in flight (for tests and listings).
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Whether a batch, applied to [`Core::meta`] already, waits for a
    /// checkpoint before it can be sealed (for a simulator telling the
    /// acknowledged metadata from what is being committed).
    pub fn batch_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// The batches whose handles are on their way out: in flight, waiting
    /// for a checkpoint, or refused but not yet superseded (`unsettled`: a
    /// successor may still load their release).
    fn batches_releasing(&self) -> impl Iterator<Item = &Batch> {
        self.in_flight.iter().map(|f| &f.batch).chain(self.waiting.iter()).chain(self.unsettled.iter().map(|(b, _)| b))
    }

    /// Handles the commits or jobs in flight release: expired, excluded
    /// from a recall, broken by a conflicting open (also while a cache
    /// mirror is replayed on the way). Until they are done these are not
    /// renewed.
    pub fn removing(&self) -> Vec<u64> {
        let mut ids = Vec::new();
        self.for_each_leaving(|excluded, broken| {
            ids.extend(excluded);
            ids.extend(broken.iter().map(|h| h.id));
        });
        ids
    }

    /// Calls `f` with the handles each commit or job in flight releases:
    /// ids still in the table (expired, excluded), and handles an open
    /// broke (out of the table).
    fn for_each_leaving(&self, mut f: impl FnMut(&[u64], &[Handle])) {
        use super::cache::AfterReplay;
        fn replay(next: &AfterReplay, f: &mut impl FnMut(&[u64], &[Handle])) {
            match next {
                AfterReplay::Recall { excluded, .. } => f(excluded, &[]),
                AfterReplay::Open { broken, .. } => f(&[], broken),
                AfterReplay::Setting { .. } | AfterReplay::Reconfigure { .. } => {}
            }
        }
        fn of(then: &AfterCommit, f: &mut impl FnMut(&[u64], &[Handle])) {
            match then {
                AfterCommit::Expire { expired } => f(expired, &[]),
                AfterCommit::Recall { excluded, .. } => f(excluded, &[]),
                AfterCommit::Open(open) => f(&[], &open.broken),
                AfterCommit::Released { then, .. } => of(then, f),
                AfterCommit::MirrorCleared { next, .. } | AfterCommit::BrokenBeforeReplay { next, .. } => {
                    replay(next, f)
                }
                _ => {}
            }
        }
        for (_, then) in self.batches_releasing().flat_map(|b| b.parts.iter()) {
            of(then, &mut f);
        }
        // A job's result waits in the queue (first in line) while another
        // commit is in flight: its handles are still on their way out.
        let queued = self.queue.iter().filter_map(|c| match c {
            Change::JobDone { then, .. } => Some(then),
            _ => None,
        });
        for job in self.jobs.values().chain(queued) {
            match job {
                AfterJob::Merged { finish: MergeFinish::Recall { excluded, .. }, .. } => f(excluded, &[]),
                AfterJob::Zeroed { then, .. } => of(then, &mut f),
                AfterJob::OpenFenced { open, .. } => f(&[], &open.broken),
                AfterJob::ExpireFenced { expired } => f(expired, &[]),
                AfterJob::RecallFenced { excluded, .. } => f(excluded, &[]),
                AfterJob::MirrorReplayed { next, .. } | AfterJob::BrokenRecorded { next, .. } => replay(next, &mut f),
                _ => {}
            }
        }
    }

    /// Tells `session` about the handles it holds that are being released
    /// (before anything else it is answered); whether there were any. Once
    /// told, a handle is never renewed again, even if its release fails: it
    /// then expires, or a conflicting open breaks it.
    fn tell_removing(&mut self, session: SessionId) -> bool {
        let mut told: Vec<(u64, &str)> = Vec::new();
        self.for_each_leaving(|ids, broken| {
            // Broken handles have left the table already; the open knows them.
            for h in broken.iter().filter(|h| h.held_by(session)) {
                told.push((h.id, "broken by a conflicting open after its lease ran out"));
            }
            for &id in ids {
                if self.handles.get(id).is_some_and(|h| h.held_by(session)) {
                    told.push((id, "its lease ran out; it is being released"));
                }
            }
        });
        let told: Vec<(u64, String)> = told.into_iter().map(|(id, why)| (id, format!("handle {id}: {why}"))).collect();
        let any = !told.is_empty();
        for (id, reason) in told {
            self.revoked.insert(id);
            self.send_event(session, ServerEvent::Revoked { handle: HandleId(id), reason });
        }
        any
    }

    /// A commit released `handle` (expired, excluded, broken): its holder is
    /// told, and every session still holding it is closed. Why close: the
    /// agent extends all of a session's handles by a renewal's answer and
    /// may apply one sent before the release after it (its replies and
    /// events take different paths), so no answer on that session may reach
    /// it again; its other handles resume on a new session.
    pub fn released(&mut self, handle: &Handle, reason: String) {
        self.send_handle_event(handle, ServerEvent::Revoked { handle: HandleId(handle.id), reason });
        let sessions: Vec<SessionId> = handle.sessions().filter(|s| self.sessions.contains_key(s)).collect();
        for session in sessions {
            info!(handle = handle.id, session, "closing the session of a released handle");
            self.kick(session);
        }
    }

    /// Puts back the handles an open took out of the table to break them,
    /// when the open gave up — each while its record is still in the pool
    /// metadata. A handle whose record went meanwhile was released by
    /// another path (its lease ran out and the expiry committed its removal
    /// while the open held it aside, so the expiry could not tell its
    /// holder): it is released now — its holder told, its session closed —
    /// never put back. Put back, the holder's next renewal let it write
    /// again after the pool had fenced and released it (simulator seed
    /// 48276156797555).
    pub fn restore_broken(&mut self, broken: Vec<Handle>) {
        for handle in broken {
            if self.meta.handles.iter().any(|r| r.id.0 == handle.id) {
                self.handles.restore(handle);
            } else {
                let why = "an open that would have broken it failed";
                warn!(handle = handle.id, holder = %handle.holder, "{why}; the handle was released meanwhile: it stays released");
                self.released(&handle, format!("released while {why}"));
            }
        }
    }

    // ---- helpers for the request modules ----

    pub fn reply(&mut self, reply: ReplyId, result: Result<Response, ControlError>) {
        if self.resync_reply(reply, &result) || self.admin_reply(reply, &result) {
            return;
        }
        if reply == super::reconfig::AUTO_REPLY {
            // An operation the server started itself: nobody waits (its
            // outcome is logged where it ends).
            return;
        }
        self.effects.push(Effect::Reply { reply, result });
    }

    pub fn kick(&mut self, session: SessionId) {
        self.effects.push(Effect::Kick { session });
    }

    /// Sends an event to a session (the shell drops a session that cannot
    /// take it; its lease then does the rest).
    pub fn send_event(&mut self, session: SessionId, event: ServerEvent) {
        if self.sessions.contains_key(&session) {
            self.effects.push(Effect::Event { session, event });
        }
    }

    /// Sends an event to every session holding `handle`.
    pub fn send_handle_event(&mut self, handle: &Handle, event: ServerEvent) {
        let sessions: Vec<SessionId> = handle.sessions().collect();
        for s in sessions {
            self.send_event(s, event.clone());
        }
    }

    /// Milliseconds of grace left, or `None` once it is over (and forgotten).
    pub fn grace_left_ms(&mut self) -> Option<u64> {
        let left = self.grace.as_ref().and_then(|g| g.left_ms(self.now.mono_ms));
        if left.is_none() && self.grace.take().is_some() {
            info!("grace period over: serving opens and changes again");
        }
        left
    }

    /// Queues the pending change of every volume whose recall is ready.
    pub fn check_recalls(&mut self) {
        let now_ms = self.now.mono_ms;
        let ready: Vec<VolumeId> = self
            .pending_changes
            .keys()
            .copied()
            .filter(|v| matches!(self.handles.recall_state(v.0, now_ms), Some(RecallState::Ready { .. })))
            .collect();
        for volume in ready {
            if !self.recall_queued(volume) {
                self.queue.push_back(Change::RecallReady { volume });
            }
        }
    }

    /// Sends `volume`'s current description to every holder (but `skip`),
    /// on every session holding each handle (a duplicate session may be the
    /// live one while the first has not been seen to die yet).
    pub fn publish_volume(&mut self, volume: VolumeId, skip: &[u64]) {
        match VolumeDescription::from_metadata(&self.meta, volume) {
            Ok(description) => {
                let holders: Vec<Handle> =
                    self.handles.on_volume(volume.0).filter(|h| !skip.contains(&h.id)).cloned().collect();
                for h in holders {
                    let description = Box::new(description.clone());
                    self.send_handle_event(&h, ServerEvent::Publish { handle: HandleId(h.id), description });
                }
            }
            Err(e) => warn!(%volume, "cannot describe the volume: {e}"),
        }
    }

    /// The pool's name for a key, for messages.
    pub fn client_name(&self, key: &PublicKey) -> String {
        self.meta
            .clients
            .iter()
            .find(|c| c.public_key == *key)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| key.to_string())
    }

    /// Changes queued or in flight (for tests and listings).
    pub fn changes_waiting(&self) -> usize {
        self.queue.len() + usize::from(self.in_flight.is_some())
    }
}

/// Whether a queued change may join a batch another change started: only
/// copy-on-write registrations, the changes that come many at a time.
fn joins_batch(change: &Change) -> bool {
    matches!(change, Change::Request { request: Request::CowRegister { .. }, .. })
}

impl Core {
    /// `Request::Handoff`: starts handing the pool to a standby (by name or
    /// host id; any standing by if `to` is `None`).
    pub(super) fn prepare_handoff(&mut self, to: Option<String>, reply: ReplyId) -> Step {
        let standby = |s: &&ServerInfo| s.role == ServerRole::Standby.to_string();
        let target = match &to {
            Some(t) => self.servers.iter().filter(standby).find(|s| &s.name == t || s.host_id.to_string() == *t),
            None => self.servers.iter().find(standby),
        };
        let Some(target) = target.cloned() else {
            let known: Vec<String> =
                self.servers.iter().map(|s| format!("{} (host id {}, {})", s.name, s.host_id, s.role)).collect();
            let msg = format!(
                "no metadata server {}is standing by for this pool (servers: {}); start one with the same devices \
                 and its own host_id, then retry",
                to.as_deref().map(|t| format!("named {t} ")).unwrap_or_default(),
                if known.is_empty() { "none seen yet".to_string() } else { known.join(", ") }
            );
            return Step::Done(Some((reply, Err(ControlError::new(ErrorCode::NotFound, msg)))));
        };
        if self.handoff.is_some() {
            let e = ControlError::new(ErrorCode::Busy, "a handoff is already in progress");
            return Step::Done(Some((reply, Err(e))));
        }
        info!(to = %target.name, host_id = target.host_id, "handing the pool off: no new changes from now on");
        self.handoff = Some((target, reply, false));
        Step::Parked
    }

    fn handed_off(&mut self, result: Result<(), String>) {
        let Some((target, reply, _)) = self.handoff.take() else { return };
        match result {
            Ok(()) => {
                info!(to = %target.name, "pool handed off; redirecting every client there");
                let why = format!(
                    "the pool was handed off to metadata server {} (host id {}) at {}",
                    target.name,
                    target.host_id,
                    target.addrs.join(", ")
                );
                self.reply(reply, Ok(Response::Done));
                self.stop_serving(why, Some(target.addrs.clone()));
            }
            // A failed handoff gives the lease up all the same: the lease
            // task commits nothing more once it started writing the handoff
            // record (a write that timed out may still have reached the
            // copies, and the standby then acquires at once), so serving on
            // would only refuse every commit, forever. Stop; the standby (or
            // this server again) acquires once the record expires.
            Err(e) => {
                let why = match self.lease_lost_in_handoff.take() {
                    Some(why) => format!("the handoff failed: {e}; {why}"),
                    None => format!(
                        "the handoff to {} failed ({e}); the pool lease was given up with it, so the pool is served \
                         again once its record expires",
                        target.name
                    ),
                };
                warn!(to = %target.name, "{why}");
                self.reply(reply, Err(ControlError::new(ErrorCode::Internal, why.clone())));
                self.lease_lost(why);
            }
        }
    }

    fn lease_lost(&mut self, why: String) {
        tracing::error!("{why}: this server commits and serves nothing more");
        self.stop_serving(format!("this metadata server lost the pool lease ({why})"), None);
    }

    /// Serves nothing more: every waiting caller is told why (and, for a
    /// handoff, every session where to go), then the shell stops.
    fn stop_serving(&mut self, why: String, redirect: Option<Vec<String>>) {
        self.not_active = Some(why.clone());
        if let Some(addrs) = redirect {
            let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
            for session in sessions {
                let event = ServerEvent::Redirect { addrs: addrs.clone(), reason: why.clone() };
                self.effects.push(Effect::Event { session, event });
            }
        }
        let not_active = || Err(ControlError::new(ErrorCode::NotActive, why.clone()));
        for (_, change) in std::mem::take(&mut self.pending_changes) {
            self.effects.push(Effect::Reply { reply: change.reply, result: not_active() });
        }
        // An admin reconfiguration stops after the volume being moved (whose
        // old map stays in force): run again at the active server, it goes on.
        if let Some(op) = self.operation.take() {
            let e = ControlError::new(ErrorCode::NotActive, format!("{}: stopped: {why}; run it again", op.what));
            self.effects.push(Effect::Reply { reply: op.reply, result: Err(e) });
        }
        for change in std::mem::take(&mut self.queue) {
            if let Change::Request { reply, .. } = change {
                self.effects.push(Effect::Reply { reply, result: not_active() });
            }
        }
        self.effects.push(Effect::Stop { why });
    }
}
