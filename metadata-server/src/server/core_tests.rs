//! The owner's core as a plain state machine: inputs in, effects out, time
//! made up — no sockets, no devices, no clocks.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use uuid::Uuid;
use volume_format::control::auth::Role;
use volume_format::control::messages::{ErrorCode, OpenMode, Request, Response, ServerEvent};
use volume_format::metadata::PoolMetadata;
use volume_format::{DeviceLayout, HandleId, PublicKey};

use super::commit::MetaJournal;
use super::core::{Core, CoreConfig, Effect, Entropy, Input, Now, ReplyId, TaskId};
use super::jobs::{Job, JobOutcome};
use crate::pool::journal::{PoolJournal, RawWrite};
use crate::resume::HANDOVER_TOKEN_MS;
use control_client::handshake::Peer;
use volume_format::metadata::journal::JournalWriter;
use volume_format::metadata::MetadataArea;

const LEASE_MS: u64 = 1_000;

struct Zeros;

impl Entropy for Zeros {
    fn fill(&mut self, buf: &mut [u8]) {
        buf.fill(0);
    }
}

fn meta() -> PoolMetadata {
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut meta = PoolMetadata::new(Uuid::from_u128(1), "t", 1 << 20, PublicKey(key.verifying_key().to_bytes()), 0);
    for i in 0..3u128 {
        let layout = DeviceLayout::plan_with_slots(64 << 20, 1 << 20, 64 << 10, 2).unwrap();
        meta.add_device(Uuid::from_u128(10 + i), format!("nbd://h{i}/e"), &layout).unwrap();
    }
    meta.create_volume("v", 4 << 20, 4096, 1, 0).unwrap();
    meta.create_volume("w", 4 << 20, 4096, 1, 0).unwrap();
    meta.generation = 1;
    meta
}

/// Four slots of 64 KiB per copy: two checkpoint slots and a ring.
fn area() -> MetadataArea {
    MetadataArea { offset: 4096, slot_bytes: 64 << 10, slot_count: 4 }
}

/// A journal over the three devices of `meta()` (the first commit is a
/// checkpoint, the next ones entries).
fn journal() -> MetaJournal {
    let meta = meta();
    let uuids: Vec<Uuid> = meta.devices.iter().map(|d| d.device_uuid).collect();
    let writer = JournalWriter::for_new_pool(meta.pool_uuid, &[area(), area(), area()], meta.generation + 1);
    let key = Arc::new(SigningKey::from_bytes(&[7; 32]));
    MetaJournal::new(PoolJournal { writer, copies: uuids.clone(), key }, uuids.into_iter().map(|u| (u, area())))
}

struct World {
    core: Core,
    now: Now,
    next_reply: ReplyId,
    /// Zeroing jobs (new space) complete at once, as on a device that
    /// zeroes fast; off, they stay in the effects for the test to answer.
    auto_zero: bool,
}

fn peer(n: u8, role: Role) -> Peer {
    Peer {
        key: [n; 32],
        role,
        name: format!("host-{n}"),
        claimed_name: String::new(),
        instance: [n; 16],
        version: volume_format::control::PROTOCOL_VERSION,
        mode: volume_format::control::auth::ChannelMode::Encrypted,
        kind: volume_format::control::auth::ConnectionKind::Control,
    }
}

impl World {
    /// The server restarts at once (the metadata as committed, every
    /// session gone, a fresh monotonic clock) with its wall clock moved by
    /// `wall_step_ms` (a clock step, or a standby whose clock differs).
    fn restart(&mut self, wall_step_ms: i64) {
        let meta = (*self.core.meta).clone();
        let config = CoreConfig {
            lease_ms: LEASE_MS,
            durable_ms: 0,
            // The timing rules' margin is tested in `handles` and the simulator.
            device_request_max_ms: 0,
            grace_ms: 0,
            key: Arc::new(SigningKey::from_bytes(&[7; 32])),
            entropy: Box::new(Counter(100)),
        };
        self.core = Core::new(meta.clone(), journal_after(&meta), config);
        self.now = Now { mono_ms: 0, unix_ms: (self.now.unix_ms as i64 + wall_step_ms) as u64 };
        for (session, n, role) in [(1, 1, Role::Agent), (2, 2, Role::Agent), (3, 3, Role::Admin)] {
            self.apply(Input::Connected { session, peer: peer(n, role), addr: "test".into() });
        }
    }

    fn new() -> World {
        World::with_durable(0)
    }

    /// Handles outlive their lease by `durable_ms` (and never expire by time).
    fn with_durable(durable_ms: u64) -> World {
        let config = CoreConfig {
            lease_ms: LEASE_MS,
            durable_ms,
            device_request_max_ms: 0,
            grace_ms: 0,
            key: Arc::new(SigningKey::from_bytes(&[7; 32])),
            entropy: Box::new(Zeros),
        };
        let mut w = World {
            core: Core::new(meta(), journal(), config),
            now: Now { mono_ms: 0, unix_ms: 1_700_000_000_000 },
            next_reply: 1,
            auto_zero: true,
        };
        for (session, n, role) in [(1, 1, Role::Agent), (2, 2, Role::Agent), (3, 3, Role::Admin)] {
            w.apply(Input::Connected { session, peer: peer(n, role), addr: "test".into() });
        }
        w
    }

    fn apply(&mut self, input: Input) -> Vec<Effect> {
        let mut effects = self.core.apply(self.now, input);
        while self.auto_zero {
            let Some(at) =
                effects.iter().position(|e| matches!(e, Effect::Job { job: Job::Zero { .. } | Job::Fence { .. }, .. }))
            else {
                break;
            };
            let Effect::Job { task, .. } = effects.remove(at) else { unreachable!() };
            effects.extend(self.core.apply(self.now, Input::JobDone { task, outcome: JobOutcome::done() }));
        }
        effects
    }

    fn request(&mut self, session: u64, request: Request) -> (ReplyId, Vec<Effect>) {
        let reply = self.next_reply;
        self.next_reply += 1;
        (reply, self.apply(Input::Request { session, request, reply }))
    }

    fn advance(&mut self, ms: u64) {
        self.now.mono_ms += ms;
        self.now.unix_ms += ms;
    }
}

fn reply_of(
    effects: &[Effect],
    id: ReplyId,
) -> Option<&Result<Response, volume_format::control::messages::ControlError>> {
    effects.iter().find_map(|e| match e {
        Effect::Reply { reply, result } if *reply == id => Some(result),
        _ => None,
    })
}

/// The metadata writes a step asked for, if any.
fn commit_of(effects: &[Effect]) -> Option<(TaskId, RawWrite)> {
    effects.iter().find_map(|e| match e {
        Effect::MetaWrite { task, write } => Some((*task, write.clone())),
        _ => None,
    })
}

/// Every copy took the writes.
fn committed(task: TaskId, write: RawWrite) -> Input {
    Input::MetaWritten { task, written: vec![true; write.copies], failures: Vec::new() }
}

/// No copy took the writes.
fn failed(task: TaskId, write: RawWrite) -> Input {
    Input::MetaWritten { task, written: vec![false; write.copies], failures: vec!["device gone".into()] }
}

#[test]
fn renewals_are_answered_while_a_commit_is_in_flight() {
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).expect("an open commits");
    assert!(reply_of(&effects, open).is_none(), "no answer before the commit");
    // The commit hangs; time passes; renewals and reads are answered at once.
    for _ in 0..10 {
        w.advance(LEASE_MS / 3);
        let (renew, effects) = w.request(2, Request::Renew);
        assert!(matches!(reply_of(&effects, renew), Some(Ok(Response::Lease { .. }))));
        let (list, effects) = w.request(3, Request::VolumeList);
        assert!(matches!(reply_of(&effects, list), Some(Ok(Response::Volumes(_)))));
        assert!(commit_of(&effects).is_none());
    }
    let effects = w.apply(committed(task, next));
    assert!(matches!(effects.first(), Some(Effect::Published { .. })), "published before the reply: {effects:?}");
    assert!(matches!(reply_of(&effects, open), Some(Ok(Response::Opened(_)))));
}

#[test]
fn changes_are_prepared_one_commit_at_a_time_from_the_committed_state() {
    let mut w = World::new();
    let create = |name: &str| Request::VolumeCreate { name: name.into(), size_bytes: 1 << 20, legs: 1 };
    let (first, effects) = w.request(3, create("x"));
    let (task, next) = commit_of(&effects).unwrap();
    let (second, effects) = w.request(3, create("y"));
    assert!(commit_of(&effects).is_none(), "the second change waits for the first commit");
    // The same name again: refused once the first is committed, not before.
    let (dup, effects) = w.request(3, create("x"));
    assert!(reply_of(&effects, dup).is_none());
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, first), Some(Ok(Response::Done))));
    let (task, next) = commit_of(&effects).expect("the second change is prepared now");
    assert!(w.core.meta.volume_by_name("x").is_some() && w.core.meta.volume_by_name("y").is_some());
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, second), Some(Ok(Response::Done))));
    match reply_of(&effects, dup) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::AlreadyExists, "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_commit_changes_nothing_and_undoes_the_reservation() {
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, _) = commit_of(&effects).unwrap();
    let effects = w.apply(Input::MetaWritten { task, written: vec![false; 3], failures: vec!["device gone".into()] });
    assert!(w.core.meta.handles.is_empty(), "its record is taken back");
    // Some copy may hold the refused entry: the answer (and the release of
    // the reserved handle) waits until the empty commit that supersedes it
    // is durable. While that is written, another agent's open waits, then
    // goes through.
    assert!(reply_of(&effects, open).is_none(), "answered before the refused entry was superseded");
    assert!(w.core.handles.all().next().is_some(), "the reservation is kept while the outcome is unknown");
    let (supersede, write) = commit_of(&effects).expect("an empty commit supersedes the refused one");
    let (open2, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    assert!(commit_of(&effects).is_none());
    let effects = w.apply(committed(supersede, write));
    match reply_of(&effects, open) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::CommitFailed, "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(w.core.handles.all().all(|h| h.holder != "host-1"), "the reserved handle is gone");
    let (task, write) = commit_of(&effects).expect("the open commits after the supersede");
    let effects = w.apply(committed(task, write));
    assert!(matches!(reply_of(&effects, open2), Some(Ok(Response::Opened(_)))));
}

/// A change whose answer is only a reply (no holder acts on it) is refused
/// at once, saying the outcome is open until the next commit.
#[test]
fn an_admin_change_whose_commit_failed_is_answered_at_once_as_unsettled() {
    let mut w = World::new();
    let (delete, effects) = w.request(9, Request::VolumeDelete { name: "v".into() });
    let (task, write) = commit_of(&effects).expect("the delete commits");
    let effects = w.apply(failed(task, write));
    match reply_of(&effects, delete) {
        Some(Err(e)) => {
            assert_eq!(e.code, ErrorCode::CommitFailed, "{e}");
            assert!(e.message.contains("next commit voids it"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.core.meta.volume_by_name("v").is_some(), "the delete is taken back");
    assert!(commit_of(&effects).is_some(), "an empty commit supersedes the refused one");
}

/// A failed supersede keeps the refusal unanswered: the server may still
/// die and a standby load the refused entry from the copy that took it.
#[test]
fn a_refused_commit_is_answered_only_once_a_later_commit_overwrote_it() {
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, write) = commit_of(&effects).unwrap();
    let effects = w.apply(failed(task, write));
    let (supersede, write) = commit_of(&effects).expect("an empty commit supersedes the refused one");
    let effects = w.apply(failed(supersede, write));
    assert!(reply_of(&effects, open).is_none(), "answered while the refused entry may still be loaded");
    // The next commit (another empty one) overwrites it on every copy: now
    // the outcome is known.
    let effects = commit_all(&mut w, effects);
    match reply_of(&effects, open) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::CommitFailed, "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(w.core.meta.handles.is_empty());
}

#[test]
fn a_device_check_is_a_job_and_the_owner_goes_on_meanwhile() {
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let handle = match reply_of(&effects, open) {
        Some(Ok(Response::Opened(o))) => o.handle,
        other => panic!("{other:?}"),
    };
    let device = w.core.meta.volume_by_name("v").unwrap().extents[0].legs[0].device;
    let (report, effects) = w.request(1, Request::ReportDeviceFailure { device, reason: "connection refused".into() });
    let job = effects.iter().find_map(|e| match e {
        Effect::Job { task, job: Job::CheckDevice { .. } } => Some(*task),
        _ => None,
    });
    let job = job.expect("the check is a job, not done in the owner");
    // The check hangs: everyone else goes on, changes included.
    w.advance(5 * LEASE_MS);
    let (renew, effects) = w.request(1, Request::Renew);
    assert!(matches!(reply_of(&effects, renew), Some(Ok(_))));
    let (close, effects) = w.request(1, Request::Close { handle: HandleId(handle.0) });
    let (task, next) = commit_of(&effects).expect("a close commits while the check runs");
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, close), Some(Ok(Response::Done))));
    // The server cannot reach it either: the device is marked failed.
    let effects = w.apply(Input::JobDone { task: job, outcome: JobOutcome::failed("no answer within 1000 ms") });
    let (task, next) = commit_of(&effects).expect("marking the device failed commits");
    assert!(!w.core.meta.device(device).unwrap().state.is_online());
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, report), Some(Ok(Response::Devices(_)))));
}

#[test]
fn a_resumed_handle_is_asked_again_for_the_recall_it_owes() {
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let opened = match reply_of(&effects, open) {
        Some(Ok(Response::Opened(o))) => o.clone(),
        other => panic!("{other:?}"),
    };
    // A grow recalls the layout; the connection breaks before the agent
    // confirms (the event may even have been lost with it).
    let (grow, effects) = w.request(3, Request::VolumeGrow { name: "v".into(), size_bytes: 8 << 20 });
    let generation = recall_of(&effects, 1).expect("the holder is recalled");
    w.apply(Input::Disconnected { session: 1 });
    // The agent comes back on a new connection and resumes: the answer, then
    // the recall again.
    w.apply(Input::Connected { session: 4, peer: peer(1, Role::Agent), addr: "test".into() });
    let (resume, effects) = w.request(4, Request::Resume { key: opened.resume_key.clone() });
    let reply_at = effects.iter().position(|e| matches!(e, Effect::Reply { reply, .. } if *reply == resume));
    let recall_at = effects.iter().position(|e| {
        matches!(e, Effect::Event { session: 4, event: ServerEvent::Recall { generation: g, .. } } if *g == generation)
    });
    assert!(matches!(reply_of(&effects, resume), Some(Ok(Response::Opened(_)))));
    assert!(reply_at.unwrap() < recall_at.expect("the recall is sent again"), "{effects:?}");
    // A late confirmation of an older generation is harmless; the real one
    // (retried) completes the grow.
    let (_, effects) = w.request(4, Request::RecallDone { handle: opened.handle, generation: generation - 1 });
    assert!(commit_of(&effects).is_none());
    let (done, effects) = w.request(4, Request::RecallDone { handle: opened.handle, generation });
    assert!(matches!(reply_of(&effects, done), Some(Ok(Response::Done))));
    let (task, next) = commit_of(&effects).expect("the grow commits once the holder drained");
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, grow), Some(Ok(Response::Done))));
    assert!(effects.iter().any(|e| matches!(e, Effect::Event { session: 4, event: ServerEvent::Publish { .. } })));
    let (again, effects) = w.request(4, Request::RecallDone { handle: opened.handle, generation });
    assert!(matches!(reply_of(&effects, again), Some(Ok(Response::Done))), "a retried confirmation is acknowledged");
}

#[test]
fn a_ready_recall_behind_a_commit_in_flight_asks_for_no_tick() {
    let mut w = World::new();
    let (_, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let (snapshot, effects) = w.request(3, Request::SnapshotCreate { volume: "v".into(), name: "s".into() });
    assert!(effects.iter().any(|e| matches!(e, Effect::Event { event: ServerEvent::Recall { .. }, .. })));
    // Another agent's open commits meanwhile, and hangs there.
    let (_, effects) = w.request(2, Request::Open { volume: "w".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).expect("the open commits");
    // The silent holder's lease runs out: the recall is ready, queued behind
    // the commit. Nothing to wake up for until the commit is done (asking
    // for a tick "now" made the owner loop spin for as long as it took).
    w.advance(2 * LEASE_MS);
    let effects = w.apply(Input::Tick);
    assert!(commit_of(&effects).is_none(), "the snapshot waits for the open's commit");
    assert_eq!(w.core.next_deadline_ms(), None);
    // Then the expiry of the holders' handles and the snapshot commit.
    let mut effects = w.apply(committed(task, next));
    for _ in 0..2 {
        let (task, next) = commit_of(&effects).expect("queued changes commit in turn");
        effects = w.apply(committed(task, next));
        if reply_of(&effects, snapshot).is_some() {
            break;
        }
    }
    assert!(matches!(reply_of(&effects, snapshot), Some(Ok(Response::Done))));
}

#[test]
fn a_renewal_while_the_handle_is_being_released_revokes_it_first() {
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let Some(Ok(Response::Opened(opened))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    // The holder's renewals are late (a paused server, a slow link): its
    // lease ran out and the release is being committed when one arrives.
    w.advance(2 * LEASE_MS);
    let effects = w.apply(Input::Tick);
    let (task, next) = commit_of(&effects).expect("the expired handle is released");
    let (renew, effects) = w.request(1, Request::Renew);
    // The answer renews, to the agent, every handle it holds on the session:
    // it must hear that this one is gone first.
    let revoked = effects.iter().position(|e| {
        matches!(e, Effect::Event { session: 1, event: ServerEvent::Revoked { handle, .. } } if *handle == opened.handle)
    });
    let answer = effects.iter().position(|e| matches!(e, Effect::Reply { reply, .. } if *reply == renew));
    assert!(matches!((revoked, answer), (Some(r), Some(a)) if r < a), "{effects:?}");
    // The agent may apply an answer before an event it got first, so the
    // renewal is not granted at all this time.
    match reply_of(&effects, renew) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::Unavailable, "{e}"),
        other => panic!("{other:?}"),
    }
    // A resume waits for the release (it is a change), then finds nothing.
    let (resume, effects) = w.request(1, Request::Resume { key: opened.resume_key.clone() });
    assert!(reply_of(&effects, resume).is_none());
    let effects = w.apply(committed(task, next));
    assert!(w.core.handles.get(opened.handle.0).is_none());
    // Released with its session still live: the session is closed, so no
    // answer on it can extend the handle at the agent any more.
    assert!(effects.iter().any(|e| matches!(e, Effect::Kick { session: 1 })), "{effects:?}");
    match reply_of(&effects, resume) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::NotFound, "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_handle_told_it_is_revoked_is_not_renewed_even_if_its_release_fails() {
    let mut w = World::new();
    let (_, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    w.advance(2 * LEASE_MS);
    let effects = w.apply(Input::Tick);
    let (task, write) = commit_of(&effects).expect("the expired handle is released");
    w.request(1, Request::Renew); // told: revoked
    let effects = w.apply(failed(task, write));
    // An empty commit supersedes the failed one.
    let (task, write) = commit_of(&effects).expect("the failed commit is superseded");
    w.apply(committed(task, write));
    // The agent dropped the handle; its session's renewals must not keep it
    // alive, or the volume is held by nobody forever.
    let (_, effects) = w.request(1, Request::Renew);
    assert!(commit_of(&effects).is_none());
    w.advance(LEASE_MS / 4);
    let effects = w.apply(Input::Tick);
    let (task, next) = commit_of(&effects).expect("released again at the next tick");
    w.apply(committed(task, next));
    let (_, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    assert!(commit_of(&effects).is_some(), "someone else may open it: {effects:?}");
}

#[test]
fn a_failed_recall_commit_publishes_to_the_holders_it_would_have_excluded() {
    let mut w = World::with_durable(10 * LEASE_MS);
    let (_, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let handle = w.core.handles.all().next().unwrap().id;
    let (grow, _) = w.request(3, Request::VolumeGrow { name: "v".into(), size_bytes: 8 << 20 });
    // The holder is paused: its lease runs out, the grow commits without it…
    w.advance(2 * LEASE_MS);
    let effects = w.apply(Input::Tick);
    let (task, write) = commit_of(&effects).expect("the recall commits, excluding the silent holder");
    // …and the commit fails: nothing changed, the holder keeps its handle,
    // and it must be told to go on (its gate is recalled) — but only once
    // the refused entry is overwritten: until then a standby could load the
    // grow from a copy that took it.
    let effects = w.apply(failed(task, write));
    let publish = |effects: &[Effect]| {
        effects.iter().any(
            |e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Publish { handle: h, .. } } if h.0 == handle),
        )
    };
    assert!(reply_of(&effects, grow).is_none() && !publish(&effects), "{effects:?}");
    let (supersede, write) = commit_of(&effects).expect("an empty commit supersedes the refused one");
    let effects = w.apply(committed(supersede, write));
    assert!(matches!(reply_of(&effects, grow), Some(Err(_))));
    assert!(publish(&effects), "{effects:?}");
}

/// The fencing timing rules at the core: a silent holder's lease ran out,
/// but a write it sent just before may still be queued in a device server;
/// the recall's change is committed without it, and another agent may open
/// the volume, only at lease + the longest device request.
#[test]
fn a_silent_holder_is_excluded_and_its_volume_opened_elsewhere_only_after_lease_plus_the_device_margin() {
    const DEVICE_MAX_MS: u64 = LEASE_MS / 2;
    let mut w = World::new();
    w.core.handles.device_request_max_ms = DEVICE_MAX_MS;
    let (_, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    w.request(3, Request::VolumeGrow { name: "v".into(), size_bytes: 8 << 20 });
    // The holder is silent from now on. Past its lease: still waited for.
    w.advance(LEASE_MS + 1);
    assert!(commit_of(&w.apply(Input::Tick)).is_none(), "committed while the holder's writes may still land");
    let (open, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    assert!(matches!(reply_of(&effects, open), Some(Err(_))), "opened elsewhere too early: {effects:?}");
    // Lease + the device margin: excluded, the change commits.
    w.advance(DEVICE_MAX_MS);
    assert!(commit_of(&w.apply(Input::Tick)).is_some(), "the recall commits once the margin has passed");
}

#[test]
fn a_resumed_handle_recalled_for_a_change_the_server_lost_is_sent_the_current_layout() {
    let mut w = World::with_durable(10 * LEASE_MS);
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let Some(Ok(Response::Opened(opened))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    // A grow recalls the holder, which drains and confirms; the server then
    // restarts before committing it: the change is gone, the agent's gate is
    // still recalled and waits for a layout.
    let (_, effects) = w.request(3, Request::VolumeGrow { name: "v".into(), size_bytes: 8 << 20 });
    assert!(effects.iter().any(|e| matches!(e, Effect::Event { event: ServerEvent::Recall { .. }, .. })));
    let config = CoreConfig {
        lease_ms: LEASE_MS,
        durable_ms: 10 * LEASE_MS,
        // The timing rules' margin is tested in `handles` and the simulator.
        device_request_max_ms: 0,
        grace_ms: 0,
        key: Arc::new(SigningKey::from_bytes(&[7; 32])),
        entropy: Box::new(Zeros),
    };
    let meta = (*w.core.meta).clone();
    w.core = Core::new(meta, journal(), config);
    w.apply(Input::Connected { session: 5, peer: peer(1, Role::Agent), addr: "test".into() });
    let (resume, effects) = w.request(5, Request::Resume { key: opened.resume_key.clone() });
    assert!(matches!(reply_of(&effects, resume), Some(Ok(Response::Opened(_)))));
    let published = effects.iter().any(|e| {
        matches!(e, Effect::Event { session: 5, event: ServerEvent::Publish { handle, .. } } if *handle == opened.handle)
    });
    assert!(published, "the resumed holder is told the layout to go on with: {effects:?}");
}

/// Nonces 1, 2, 3, ... (from a start), so tokens differ.
struct Counter(u8);

impl Entropy for Counter {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0 += 1;
        buf.fill(self.0);
    }
}

/// A journal continuing after `meta` (as a restarted server's would).
fn journal_after(meta: &PoolMetadata) -> MetaJournal {
    let uuids: Vec<Uuid> = meta.devices.iter().map(|d| d.device_uuid).collect();
    let writer = JournalWriter::for_new_pool(meta.pool_uuid, &[area(), area(), area()], meta.generation + 1);
    let key = Arc::new(SigningKey::from_bytes(&[7; 32]));
    MetaJournal::new(PoolJournal { writer, copies: uuids.clone(), key }, uuids.into_iter().map(|u| (u, area())))
}

#[test]
fn a_resume_is_followed_by_the_recall_in_progress_or_else_the_current_layout() {
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::SharedWrite });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let a = match reply_of(&effects, open) {
        Some(Ok(Response::Opened(o))) => o.clone(),
        other => panic!("{other:?}"),
    };
    let (open, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::SharedWrite });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, open), Some(Ok(Response::Opened(_)))));

    // Without a recall: the resume is followed by the current layout.
    w.apply(Input::Connected { session: 5, peer: peer(1, Role::Agent), addr: "test".into() });
    let (resume, effects) = w.request(5, Request::Resume { key: a.resume_key.clone() });
    assert!(matches!(reply_of(&effects, resume), Some(Ok(Response::Opened(_)))));
    let generation = w.core.meta.volume_by_name("v").unwrap().layout_generation;
    assert!(effects.iter().any(|e| matches!(e,
        Effect::Event { session: 5, event: ServerEvent::Publish { description, .. } } if description.layout_generation == generation)),
        "{effects:?}");

    // A grow recalls both holders; host-1 confirms, host-2 has not yet.
    let (_, effects) = w.request(3, Request::VolumeGrow { name: "v".into(), size_bytes: 8 << 20 });
    // The recall reaches host-1 on both of its sessions (the first one may be the dead one).
    for s in [1, 5] {
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Event { session, event: ServerEvent::Recall { .. } } if *session == s)),
            "session {s}: {effects:?}"
        );
    }
    let (done, effects) = w.request(5, Request::RecallDone { handle: a.handle, generation: generation + 1 });
    assert!(matches!(reply_of(&effects, done), Some(Ok(Response::Done))));
    // host-1 resumes again (its confirmation may have been the last thing it
    // did before a restart): the recall still in progress is sent again.
    w.apply(Input::Disconnected { session: 1 });
    w.apply(Input::Disconnected { session: 5 });
    w.apply(Input::Connected { session: 6, peer: peer(1, Role::Agent), addr: "test".into() });
    let (resume, effects) = w.request(6, Request::Resume { key: a.resume_key.clone() });
    assert!(matches!(reply_of(&effects, resume), Some(Ok(Response::Opened(_)))));
    assert!(
        effects.iter().any(|e| matches!(e,
            Effect::Event { session: 6, event: ServerEvent::Recall { generation: g, .. } } if *g == generation + 1)),
        "{effects:?}"
    );
    assert!(!effects.iter().any(|e| matches!(e, Effect::Event { event: ServerEvent::Publish { .. }, .. })));
}

/// Runs `request` on `session` through its commit (if it makes one).
fn committed_request(w: &mut World, session: u64, request: Request) -> Result<Response, ErrorCode> {
    let (reply, mut effects) = w.request(session, request);
    while let Some((task, next)) = commit_of(&effects) {
        effects = w.apply(committed(task, next));
    }
    match reply_of(&effects, reply) {
        Some(Ok(r)) => Ok(r.clone()),
        Some(Err(e)) => Err(e.code),
        None => panic!("no answer: {effects:?}"),
    }
}

/// Opens `volume` shared-write on `session`, committed.
fn open_shared(w: &mut World, session: u64, volume: &str) -> volume_format::control::messages::OpenedHandle {
    match committed_request(w, session, Request::Open { volume: volume.into(), mode: OpenMode::SharedWrite }) {
        Ok(Response::Opened(o)) => o,
        other => panic!("{other:?}"),
    }
}

/// A handover's two sides: agent host-b (a real key, authorized; connected
/// as session 7) and v opened exclusively on session 1.
fn handover_pair(w: &mut World) -> (Peer, volume_format::control::messages::OpenedHandle) {
    let b = Peer { key: SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes(), ..peer(2, Role::Agent) };
    w.apply(Input::Connected { session: 7, peer: b.clone(), addr: "test".into() });
    let authorize =
        Request::ClientAuthorize { key: b.key, name: "host-b".into(), role: Role::Agent, volumes: Vec::new() };
    assert_eq!(committed_request(w, 3, authorize), Ok(Response::Done));
    let Ok(Response::Opened(a)) =
        committed_request(w, 1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive })
    else {
        panic!()
    };
    (b, a)
}

#[test]
fn a_used_handover_token_stays_refused_across_restarts_and_clock_steps() {
    let mut w = World::new();
    w.core.entropy = Box::new(Counter(0));
    let (b, a) = handover_pair(&mut w);
    let connect_b = |w: &mut World| w.apply(Input::Connected { session: 7, peer: b.clone(), addr: "test".into() });
    let token = |w: &mut World| match committed_request(w, 1, Request::Handover { handle: a.handle, to_key: b.key }) {
        Ok(Response::HandoverToken { token, .. }) => token,
        other => panic!("{other:?}"),
    };
    let used = token(&mut w);
    let unused = token(&mut w);
    assert!(matches!(
        committed_request(&mut w, 7, Request::OpenHandover { token: used.clone() }),
        Ok(Response::Opened(_))
    ));
    assert!(w.core.meta.handovers.is_used(&[1; 16]), "the use is committed with the handle");
    assert_eq!(
        committed_request(&mut w, 7, Request::OpenHandover { token: used.clone() }),
        Err(ErrorCode::PermissionDenied)
    );

    // Restarted with the wall clock an hour behind: still used. A token
    // issued by the previous run and never used still works (its age is
    // measured from the pool's clock floor, not from this wall clock).
    w.restart(-3_600_000);
    connect_b(&mut w);
    let (reply, effects) = w.request(7, Request::OpenHandover { token: used.clone() });
    let Some(Err(e)) = reply_of(&effects, reply) else { panic!("{effects:?}") };
    assert!(e.message.contains("already used"), "{e:?}");
    let Ok(Response::Opened(_)) = committed_request(&mut w, 1, Request::Resume { key: a.resume_key.clone() }) else {
        panic!()
    };
    assert!(matches!(committed_request(&mut w, 7, Request::OpenHandover { token: unused }), Ok(Response::Opened(_))));

    // A token that expired: refused, and the refusal raises the pool's clock
    // floor first, so a server whose clock is behind refuses it as well.
    let late = token(&mut w);
    w.advance(HANDOVER_TOKEN_MS + 1);
    let (reply, effects) = w.request(7, Request::OpenHandover { token: late.clone() });
    let (task, next) = commit_of(&effects).expect("the token clock is committed before the refusal");
    assert!(reply_of(&effects, reply).is_none());
    let effects = w.apply(committed(task, next));
    let Some(Err(e)) = reply_of(&effects, reply) else { panic!("{effects:?}") };
    assert!(e.message.contains("expired"), "{e:?}");
    w.restart(-3_600_000);
    connect_b(&mut w);
    let (reply, effects) = w.request(7, Request::OpenHandover { token: late });
    let Some(Err(e)) = reply_of(&effects, reply) else { panic!("{effects:?}") };
    assert!(e.message.contains("expired"), "{e:?}");

    // The commit that raised the floor past their expiry forgot the used tokens.
    assert!(w.core.meta.handovers.used.is_empty());
    let Ok(Response::Opened(_)) = committed_request(&mut w, 1, Request::Resume { key: a.resume_key.clone() }) else {
        panic!()
    };
    let next = token(&mut w);
    assert!(matches!(committed_request(&mut w, 7, Request::OpenHandover { token: next }), Ok(Response::Opened(_))));
    assert_eq!(w.core.meta.handovers.used.len(), 1);
}

/// The zeroing job among `effects`: its task and the extents it zeroes.
fn zero_job_of(effects: &[Effect]) -> Option<(TaskId, Vec<(u32, u64)>)> {
    effects.iter().find_map(|e| match e {
        Effect::Job { task, job: Job::Zero { targets, .. } } => {
            Some((*task, targets.iter().flat_map(|t| t.offsets.iter().map(|&o| (t.device.0, o))).collect()))
        }
        _ => None,
    })
}

fn extents_of(core: &Core, name: &str) -> Vec<(u32, u64)> {
    let v = core.meta.volume_by_name(name).expect("the volume exists");
    let mut all: Vec<(u32, u64)> =
        v.extents.iter().flat_map(|e| e.legs.iter().map(|l| (l.device.0, l.offset))).collect();
    all.sort();
    all
}

#[test]
fn new_space_is_zeroed_before_the_commit_that_hands_it_out_and_other_allocations_wait() {
    let mut w = World::new();
    w.auto_zero = false;
    let create = |name: &str| Request::VolumeCreate { name: name.into(), size_bytes: 2 << 20, legs: 2 };
    let (first, effects) = w.request(3, create("x"));
    assert!(commit_of(&effects).is_none(), "nothing is committed before the space is zeroed: {effects:?}");
    let (zero, extents) = zero_job_of(&effects).expect("the new extents are zeroed first");
    assert_eq!(extents.len(), 4, "two extents of two legs: {extents:?}");
    // Meanwhile: renewals and changes that allocate nothing go on; another
    // create and a grow wait (they could take the extents being zeroed).
    let (renew, effects) = w.request(1, Request::Renew);
    assert!(matches!(reply_of(&effects, renew), Some(Ok(_))));
    let (second, effects) = w.request(3, create("y"));
    let (grow, effects2) = w.request(3, Request::VolumeGrow { name: "w".into(), size_bytes: 8 << 20 });
    assert!(zero_job_of(&effects).is_none() && commit_of(&effects).is_none());
    assert!(zero_job_of(&effects2).is_none() && commit_of(&effects2).is_none());
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).expect("an open allocates nothing and commits while space is zeroed");
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, open), Some(Ok(Response::Opened(_)))));
    // Zeroed: the create commits exactly the extents zeroed.
    let effects = w.apply(Input::JobDone { task: zero, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("the create commits once zeroed");
    assert_eq!(extents_of(&w.core, "x"), extents);
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, first), Some(Ok(Response::Done))));
    // Then the next create zeroes its own (different) extents.
    let (zero, more) = zero_job_of(&effects).expect("the second create zeroes its space");
    assert!(more.iter().all(|e| !extents.contains(e)), "{more:?} vs {extents:?}");
    let effects = w.apply(Input::JobDone { task: zero, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, second), Some(Ok(Response::Done))));
    // The grow (no holders) zeroes its added extents too.
    let (zero, added) = zero_job_of(&effects).expect("the grow zeroes its added extents");
    assert_eq!(added.len(), 4);
    let effects = w.apply(Input::JobDone { task: zero, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, grow), Some(Ok(Response::Done))));
}

#[test]
fn space_freed_by_a_delete_is_zeroed_again_and_a_failed_zeroing_changes_nothing() {
    let mut w = World::new();
    w.auto_zero = false;
    let old = extents_of(&w.core, "w");
    let (delete, effects) = w.request(3, Request::VolumeDelete { name: "w".into() });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, delete), Some(Ok(Response::Done))));
    let (create, effects) = w.request(3, Request::VolumeCreate { name: "n".into(), size_bytes: 4 << 20, legs: 1 });
    let (zero, extents) = zero_job_of(&effects).expect("the freed space is zeroed before it is reused");
    assert!(old.iter().any(|e| extents.contains(e)), "the test wants the freed extents reused: {extents:?} {old:?}");
    let generation = w.core.meta.generation;
    let effects = w.apply(Input::JobDone { task: zero, outcome: JobOutcome::failed("device 1: connection refused") });
    assert!(commit_of(&effects).is_none());
    match reply_of(&effects, create) {
        Some(Err(e)) => assert!(e.message.contains("could not be zeroed"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(w.core.meta.volume_by_name("n").is_none() && w.core.meta.generation == generation);
    // Retried: zeroed again (a failed job proves nothing), then committed.
    let (create, effects) = w.request(3, Request::VolumeCreate { name: "n".into(), size_bytes: 4 << 20, legs: 1 });
    let (zero, again) = zero_job_of(&effects).expect("zeroed again");
    assert_eq!(again, extents);
    let effects = w.apply(Input::JobDone { task: zero, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, create), Some(Ok(Response::Done))));
}

#[test]
fn a_grow_with_holders_zeroes_before_recalling_them() {
    let mut w = World::new();
    w.auto_zero = false;
    let (_, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let handle = effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply { result: Ok(Response::Opened(o)), .. } => Some(o.handle),
            _ => None,
        })
        .unwrap();
    let (grow, effects) = w.request(3, Request::VolumeGrow { name: "v".into(), size_bytes: 8 << 20 });
    let recalled = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Event { event: ServerEvent::Recall { generation, .. }, .. } => Some(*generation),
            _ => None,
        })
    };
    assert!(recalled(&effects).is_none(), "the holder keeps going while the new space is zeroed");
    let (zero, _) = zero_job_of(&effects).expect("zeroed before the recall");
    let effects = w.apply(Input::JobDone { task: zero, outcome: JobOutcome::done() });
    let generation = recalled(&effects).expect("then recalled");
    let (_, effects) = w.request(1, Request::RecallDone { handle, generation });
    assert!(zero_job_of(&effects).is_none(), "the recall point does not zero again");
    let (task, next) = commit_of(&effects).expect("the grow commits at the recall point");
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, grow), Some(Ok(Response::Done))));
}

#[test]
fn a_failed_device_that_answers_its_probe_is_copied_online_then_what_was_written_meanwhile_at_a_recall_point() {
    use super::recovery::ProbeBackoff;
    use volume_format::metadata::DeviceState;
    let mut w = World::new();
    w.core.set_device_probe(ProbeBackoff { min_ms: 100, max_ms: 400 });
    // A mirrored volume, open by host-1.
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let (open, effects) = w.request(1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let Some(Ok(Response::Opened(opened))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    // The agent keeps the write-intent log: it asks for its resync first.
    let resync = Request::IntentResync { handle: opened.handle };
    assert_eq!(committed_request(&mut w, 1, resync), Ok(Response::IntentRecorded));
    let device = w.core.meta.volume_by_name("m").unwrap().extents[0].legs[0].device;
    // The holder writes region 0 (one extent here): marked dirty first.
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![0], clear: vec![] };
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    // The device is marked failed (as a report would): what is dirty is
    // stale for it, in the same commit.
    w.core.queue.push_back(super::core::Change::DeviceFailed { device, reason: "gone".into() });
    let effects = w.apply(Input::Tick);
    let (task, next) = commit_of(&effects).expect("the failure commits");
    w.apply(committed(task, next));
    assert!(matches!(w.core.meta.device(device).unwrap().state, DeviceState::Failed { .. }));
    let stale = |w: &World| -> Vec<u64> {
        let v = w.core.meta.volume_by_name("m").unwrap().id;
        w.core.meta.intent(v, volume_format::metadata::IntentKey::Stale(device)).iter().collect()
    };
    assert_eq!(stale(&w), vec![0]);
    // Region 0 cleared, and region 1 written while the device is away:
    // stale only if extent 1 has a leg on the device.
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![1], clear: vec![0] };
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    let extent1_on_device = w.core.meta.volume_by_name("m").unwrap().extents[1].legs.iter().any(|l| l.device == device);
    assert_eq!(stale(&w), if extent1_on_device { vec![0, 1] } else { vec![0] }, "clearing leaves stale regions");
    let probe_of = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Job { task, job: Job::CheckDevice { index, .. } } if *index == device.0 => Some(*task),
            _ => None,
        })
    };
    // Probes back off while it stays away: none before the first is due.
    let effects = w.apply(Input::Tick);
    assert!(probe_of(&effects).is_none());
    w.advance(100);
    let probe = probe_of(&w.apply(Input::Tick)).expect("probed once due");
    w.apply(Input::JobDone { task: probe, outcome: JobOutcome::failed("connection refused") });
    w.advance(100);
    assert!(probe_of(&w.apply(Input::Tick)).is_none(), "the second probe waits twice as long");
    w.advance(100);
    let probe = probe_of(&w.apply(Input::Tick)).expect("probed again");
    // It answers with its label: resyncing is committed.
    let effects = w.apply(Input::JobDone { task: probe, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("resyncing commits");
    assert!(matches!(w.core.meta.device(device).unwrap().state, DeviceState::Resyncing { .. }));
    let effects = w.apply(committed(task, next));
    // The copy starts online, while the holder writes: no recall yet.
    assert!(!effects.iter().any(|e| matches!(e, Effect::Event { event: ServerEvent::Recall { .. }, .. })));
    let (online, online_copies) = copy_job_of(&effects).expect("the online copy starts at once");
    let on_device = w
        .core
        .meta
        .volume_by_name("m")
        .unwrap()
        .extents
        .iter()
        .filter(|e| e.legs.iter().any(|l| l.device == device))
        .count();
    assert_eq!(online_copies.len(), on_device, "only the stale regions (one extent each here) of m on the device");
    assert_eq!(online_copies.len(), stale(&w).len());
    assert!(online_copies.iter().all(|c| c.to.device == device && c.from.iter().all(|f| f.device != device)));
    let listed = w.core.device_infos(|d| d.index == device);
    assert!(listed[0].recovery.contains("online"), "{:?}", listed[0].recovery);
    // The holder goes on: it clears region 1 and marks region 0 again
    // while the copy runs — its marks are not held up by the copy.
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![], clear: vec![1] };
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![0], clear: vec![] };
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    // An open of the volume waits for the online copy.
    let (open2, effects) = w.request(2, Request::Open { volume: "m".into(), mode: OpenMode::SharedWrite });
    assert!(reply_of(&effects, open2).is_none() && commit_of(&effects).is_none(), "{effects:?}");
    // The online copy done, the holder is recalled…
    let effects = w.apply(Input::JobDone { task: online, outcome: JobOutcome::done() });
    let generation = recall_of(&effects, 1).expect("the holder is recalled");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Job { job: Job::Resync { .. }, .. })));
    // …and once it drained, only what was written during the online copy
    // (region 1 was dirty when it started, region 0 marked meanwhile),
    // of the regions on the device, is copied again.
    let (_, effects) = w.request(1, Request::RecallDone { handle: opened.handle, generation });
    let (copy, copies) = copy_job_of(&effects).expect("the copy of the touched regions starts at the recall point");
    assert_eq!(copies.len(), online_copies.len(), "regions 0 and 1 were both touched");
    assert!(copies.iter().all(|c| online_copies.contains(c)));
    // Opens of the volume wait meanwhile; the layout bump commits after it.
    let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("the layout bump commits");
    let effects = w.apply(committed(task, next));
    let published = effects.iter().any(|e| {
        matches!(e, Effect::Event { session: 1, event: ServerEvent::Publish { description, .. } }
            if description.devices.iter().any(|d| d.index == device && d.resyncing && !d.online))
    });
    assert!(published, "the holder resumes writing the resyncing leg: {effects:?}");
    // Every volume done: the device is committed online and published.
    let (task, next) = commit_of(&effects).expect("online commits");
    let effects = w.apply(committed(task, next));
    assert_eq!(w.core.meta.device(device).unwrap().state, DeviceState::Online);
    assert!(stale(&w).is_empty(), "nothing is stale once the device is online");
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Publish { description, .. } }
        if description.devices.iter().any(|d| d.index == device && d.online))));
}

#[test]
fn a_resync_left_by_a_previous_run_starts_over() {
    use super::recovery::ProbeBackoff;
    use volume_format::metadata::DeviceState;
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let device = w.core.meta.volume_by_name("m").unwrap().extents[0].legs[0].device;
    // The previous run committed the device resyncing, then stopped.
    let mut meta = (*w.core.meta).clone();
    meta.devices.iter_mut().find(|d| d.index == device).unwrap().state = DeviceState::Resyncing { since_unix_secs: 1 };
    let config = CoreConfig {
        lease_ms: LEASE_MS,
        durable_ms: 0,
        // The timing rules' margin is tested in `handles` and the simulator.
        device_request_max_ms: 0,
        grace_ms: 0,
        key: Arc::new(SigningKey::from_bytes(&[7; 32])),
        entropy: Box::new(Zeros),
    };
    w.core = Core::new(meta.clone(), journal_after(&meta), config);
    w.core.set_device_probe(ProbeBackoff::default());
    // No holder: the copy starts at the first tick, then the device is online.
    let effects = w.apply(Input::Tick);
    let copy = effects
        .iter()
        .find_map(|e| match e {
            Effect::Job { task, job: Job::Resync { .. } } => Some(*task),
            _ => None,
        })
        .expect("the resync starts over");
    let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("the layout bump commits");
    let effects = w.apply(committed(task, next));
    let (task, next) = commit_of(&effects).expect("online commits");
    w.apply(committed(task, next));
    assert_eq!(w.core.meta.device(device).unwrap().state, DeviceState::Online);
}

#[test]
fn a_resync_that_keeps_failing_marks_the_device_failed_again_and_probing_starts_over() {
    use super::recovery::{ProbeBackoff, RESYNC_VOLUME_ATTEMPTS_MAX};
    use volume_format::metadata::DeviceState;
    let mut w = World::new();
    w.core.set_device_probe(ProbeBackoff { min_ms: 100, max_ms: 400 });
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let device = w.core.meta.volume_by_name("m").unwrap().extents[0].legs[0].device;
    w.core.queue.push_back(super::core::Change::DeviceFailed { device, reason: "gone".into() });
    let (task, next) = commit_of(&w.apply(Input::Tick)).unwrap();
    w.apply(committed(task, next));
    // A write while it was away (as a holder's mark would record it).
    let v = w.core.meta.volume_by_name("m").unwrap().id;
    let key = volume_format::metadata::IntentKey::Stale(device);
    let regions = volume_format::metadata::ChunkRuns::from_chunks([0]);
    Arc::make_mut(&mut w.core.meta)
        .apply(&volume_format::metadata::MetaChange::IntentSet { volume: v, key, regions })
        .unwrap();
    w.apply(Input::Tick);
    w.advance(100);
    let probe = w
        .apply(Input::Tick)
        .iter()
        .find_map(|e| match e {
            Effect::Job { task, job: Job::CheckDevice { .. } } => Some(*task),
            _ => None,
        })
        .unwrap();
    let (task, next) = commit_of(&w.apply(Input::JobDone { task: probe, outcome: JobOutcome::done() })).unwrap();
    let mut effects = w.apply(committed(task, next));
    // Every copy fails (the device flakes): retried, then failed again.
    for attempt in 1..=RESYNC_VOLUME_ATTEMPTS_MAX {
        let copy = effects
            .iter()
            .find_map(|e| match e {
                Effect::Job { task, job: Job::Resync { .. } } => Some(*task),
                _ => None,
            })
            .unwrap_or_else(|| panic!("attempt {attempt} copies: {effects:?}"));
        let listed = w.core.device_infos(|d| d.index == device);
        assert!(listed[0].recovery.starts_with("resyncing: 0 of"), "{:?}", listed[0].recovery);
        effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::failed("writing: connection reset") });
        if attempt < RESYNC_VOLUME_ATTEMPTS_MAX {
            assert!(commit_of(&effects).is_none());
            w.advance(super::recovery::DEVICE_PROBE_MIN_MS * u64::from(attempt));
            effects = w.apply(Input::Tick);
        }
    }
    let (task, next) = commit_of(&effects).expect("the device is marked failed again");
    w.apply(committed(task, next));
    match &w.core.meta.device(device).unwrap().state {
        DeviceState::Failed { reason, .. } => assert!(reason.contains("resync failed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // And probed again.
    w.advance(100);
    w.apply(Input::Tick);
    assert!(w.core.device_infos(|d| d.index == device)[0].recovery.starts_with("failed: "));
}

/// Runs commits until none is asked for; the effects of the last.
#[test]
fn regions_a_gone_holder_left_dirty_are_copied_before_the_next_open_is_granted() {
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let opened = match committed_request(&mut w, 1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive }) {
        Ok(Response::Opened(o)) => o,
        other => panic!("{other:?}"),
    };
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![1], clear: vec![] };
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    // Out of range, or too many: refused.
    let bad = Request::IntentRecord { handle: opened.handle, mark: vec![2], clear: vec![] };
    assert_eq!(committed_request(&mut w, 1, bad), Err(ErrorCode::InvalidArgument));
    // The holder dies: silent past its lease.
    w.apply(Input::Disconnected { session: 1 });
    w.advance(LEASE_MS + 1);
    let (open, effects) = w.request(2, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive });
    assert!(reply_of(&effects, open).is_none() && commit_of(&effects).is_none(), "not granted before the copy");
    let (copy, copies) = copy_job_of(&effects).expect("the dirty region is copied first");
    let extent = &w.core.meta.volume_by_name("m").unwrap().extents[1];
    assert_eq!(copies.len(), 1, "region 1 only, from one leg onto the other");
    assert_eq!(copies[0].from[0].device, extent.legs[0].device, "from the first online leg");
    assert_eq!(copies[0].from.len(), 1, "and from it only: never from the target itself");
    assert_eq!(copies[0].to.device, extent.legs[1].device);
    assert_eq!(copies[0].to.offsets, vec![extent.legs[1].offset]);
    // Copied: the open commits, forgetting the dead holder's dirty set.
    let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("the open commits after the copy");
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, open), Some(Ok(Response::Opened(_)))), "{effects:?}");
    assert!(w.core.meta.intents.iter().all(|e| e.key != volume_format::metadata::IntentKey::Dirty(opened.handle)));
}

/// A close forgets the closing handle's dirty regions only when no other
/// writer holds the volume: its agent had the regions where a write failed
/// copied before the close (`IntentResync`), which the server does not do
/// while another writer writes — so with one, they stay for the first open
/// that finds no live writer.
#[test]
fn a_close_keeps_its_dirty_regions_while_another_writer_holds_the_volume() {
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let a = open_shared(&mut w, 1, "m");
    let b = open_shared(&mut w, 2, "m");
    let dirty = |w: &World, h: HandleId| {
        w.core.meta.intent(w.core.meta.volume_by_name("m").unwrap().id, volume_format::metadata::IntentKey::Dirty(h))
    };
    for (session, h) in [(1, a.handle), (2, b.handle)] {
        let mark = Request::IntentRecord { handle: h, mark: vec![1], clear: vec![] };
        assert_eq!(committed_request(&mut w, session, mark), Ok(Response::IntentRecorded));
    }
    // The resync a closing agent asks is not made while the other writes.
    assert_eq!(committed_request(&mut w, 1, Request::IntentResync { handle: a.handle }), Ok(Response::IntentRecorded));
    assert!(!dirty(&w, a.handle).is_empty());
    assert_eq!(committed_request(&mut w, 1, Request::Close { handle: a.handle }), Ok(Response::Done));
    assert_eq!(dirty(&w, a.handle).iter().collect::<Vec<_>>(), vec![1], "kept: its holder is gone, the set orphaned");
    // The last writer's close forgets its own set.
    assert_eq!(committed_request(&mut w, 2, Request::Close { handle: b.handle }), Ok(Response::Done));
    assert!(dirty(&w, b.handle).is_empty());
    // The next open copies the orphaned region first.
    let (_, effects) = w.request(1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive });
    let (_, copies) = copy_job_of(&effects).expect("the orphaned region is copied before the open");
    assert_eq!(copies.len(), 1);
}

#[test]
fn a_writer_without_the_intent_log_leaves_a_failed_device_s_legs_untracked_so_they_are_copied_whole() {
    use volume_format::metadata::IntentKey;
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    // An agent of protocol 5 (no intent log) writes the volume.
    let old = Peer { version: super::intents::INTENT_PROTOCOL_VERSION - 1, ..peer(9, Role::Agent) };
    w.apply(Input::Connected { session: 9, peer: old, addr: "test".into() });
    assert!(matches!(
        committed_request(&mut w, 9, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive }),
        Ok(Response::Opened(_))
    ));
    let v = w.core.meta.volume_by_name("m").unwrap().id;
    let device = w.core.meta.volume_by_name("m").unwrap().extents[0].legs[0].device;
    w.core.queue.push_back(super::core::Change::DeviceFailed { device, reason: "gone".into() });
    let (task, next) = commit_of(&w.apply(Input::Tick)).expect("the failure commits");
    w.apply(committed(task, next));
    assert!(!w.core.meta.tracks_stale(v, device), "nothing says which regions it missed");
    assert!(w.core.meta.intents_of(v).all(|e| !matches!(e.key, IntentKey::Stale(_))));
    let Some(Job::Resync { copies, .. }) = w.core.resync_job(v, device) else { panic!("a copy") };
    let extent_bytes = w.core.meta.extent_bytes;
    let region_bytes = volume_format::metadata::intent_region_bytes(extent_bytes);
    let on_device =
        w.core.meta.volume(v).unwrap().extents.iter().filter(|e| e.legs.iter().any(|l| l.device == device)).count();
    assert_eq!(copies.len() as u64, on_device as u64 * (extent_bytes / region_bytes), "its legs are copied whole");
}

#[test]
fn a_failed_copy_of_a_gone_holder_s_regions_refuses_the_open_and_the_next_open_copies_again() {
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let Ok(Response::Opened(opened)) =
        committed_request(&mut w, 1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive })
    else {
        panic!()
    };
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![0], clear: vec![] };
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    w.apply(Input::Disconnected { session: 1 });
    w.advance(LEASE_MS + 1);
    for attempt in 0..2 {
        let (open, effects) = w.request(2, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive });
        let copy = effects
            .iter()
            .find_map(|e| match e {
                Effect::Job { task, job: Job::Resync { .. } } => Some(*task),
                _ => None,
            })
            .unwrap_or_else(|| panic!("attempt {attempt} copies: {effects:?}"));
        if attempt == 0 {
            let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::failed("device gone") });
            assert!(matches!(reply_of(&effects, open), Some(Err(e)) if e.code == ErrorCode::Unavailable));
        } else {
            let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::done() });
            let (task, next) = commit_of(&effects).unwrap();
            let effects = w.apply(committed(task, next));
            assert!(matches!(reply_of(&effects, open), Some(Ok(Response::Opened(_)))));
        }
    }
}

/// The generation of the recall `effects` send to `session`, if any.
fn recall_of(effects: &[Effect], session: crate::handles::SessionId) -> Option<u64> {
    effects.iter().find_map(|e| match e {
        Effect::Event { session: s, event: ServerEvent::Recall { generation, .. } } if *s == session => {
            Some(*generation)
        }
        _ => None,
    })
}

/// The copy job `effects` start, if any: its task and copies.
fn copy_job_of(effects: &[Effect]) -> Option<(TaskId, Vec<super::jobs::ExtentCopy>)> {
    effects.iter().find_map(|e| match e {
        Effect::Job { task, job: Job::Resync { copies, .. } } => Some((*task, copies.clone())),
        _ => None,
    })
}

fn commit_all(w: &mut World, mut effects: Vec<Effect>) -> Vec<Effect> {
    let mut all = Vec::new();
    while let Some((task, next)) = commit_of(&effects) {
        all.extend(effects.drain(..).filter(|e| !matches!(e, Effect::MetaWrite { .. })));
        effects = w.apply(committed(task, next));
    }
    all.extend(effects);
    all
}

#[test]
fn a_plain_volumes_move_copies_at_the_recall_point_and_commits_the_new_map_only_after_the_copy() {
    // A volume of one leg keeps no intent log: its copy runs with the
    // holders drained (`precopy` is for mirrored volumes).
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 3 << 20, legs: 1 });
    commit_all(&mut w, effects);
    let (open, effects) = w.request(1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive });
    let effects = commit_all(&mut w, effects);
    let Some(Ok(Response::Opened(opened))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    let before = w.core.meta.volume_by_name("m").unwrap().clone();
    let from = before.extents[0].legs[0].device;
    let (mv, effects) = w.request(3, Request::VolumeMove { name: "m".into(), from, to: None });
    // The holder is recalled; nothing is copied before it drained.
    let generation = recall_of(&effects, 1).expect("the holder is recalled");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Job { .. })));
    let listed = w.core.operation_infos();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].state.contains("waiting for the holders"), "{:?}", listed[0].state);
    let (_, effects) = w.request(1, Request::RecallDone { handle: opened.handle, generation });
    let (copy, copies) = copy_job_of(&effects).expect("the copy starts at the recall point");
    assert!(copies.iter().all(|c| c.to.device != from && c.from.iter().any(|f| f.device == from)));
    // A create waits while the copy runs (its space could be the copy's target).
    let (create, effects) = w.request(3, Request::VolumeCreate { name: "x".into(), size_bytes: 1 << 20, legs: 1 });
    assert!(commit_of(&effects).is_none() && reply_of(&effects, create).is_none());
    // A failed copy changes nothing: the old map stays, the holder resumes on it.
    let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::failed("device gone") });
    let effects = commit_all(&mut w, effects);
    assert_eq!(w.core.meta.volume_by_name("m").unwrap().extents, before.extents);
    match reply_of(&effects, mv) {
        Some(Err(e)) => assert!(e.message.contains("device gone"), "{e}"),
        other => panic!("the move is answered with the failure: {other:?}"),
    }
    assert!(reply_of(&effects, create).is_some(), "the create goes on once the move ended");
    assert!(w.core.operation_infos().is_empty());
    // Again, to the end: the new map is committed after the copy, published.
    let (mv, effects) = w.request(3, Request::VolumeMove { name: "m".into(), from, to: None });
    let generation = recall_of(&effects, 1).expect("recalled again");
    let (_, effects) = w.request(1, Request::RecallDone { handle: opened.handle, generation });
    let copy = effects
        .iter()
        .find_map(|e| match e {
            Effect::Job { task, job: Job::Resync { .. } } => Some(*task),
            _ => None,
        })
        .unwrap();
    assert_eq!(w.core.meta.volume_by_name("m").unwrap().extents, before.extents, "nothing committed before the copy");
    let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::done() });
    let effects = commit_all(&mut w, effects);
    assert!(matches!(reply_of(&effects, mv), Some(Ok(Response::Done))), "{effects:?}");
    let after = w.core.meta.volume_by_name("m").unwrap();
    assert!(after.extents.iter().all(|e| e.legs.iter().all(|l| l.device != from)));
    assert_eq!(after.layout_generation, before.layout_generation + 1);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Publish { description, .. } }
        if description.layout_generation == after.layout_generation)));
}

#[test]
fn a_mirrored_volumes_move_copies_online_then_only_the_regions_written_meanwhile_at_the_recall_point() {
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 6 << 20, legs: 2 });
    commit_all(&mut w, effects);
    let opened = match committed_request(&mut w, 1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive }) {
        Ok(Response::Opened(o)) => o,
        other => panic!("{other:?}"),
    };
    // Until its agent shows it keeps the write-intent log (it asks for
    // its resync before its first I/O), the volume is copied at the
    // recall point only: an agent without the log writes without marks.
    let v = w.core.meta.volume_by_name("m").unwrap().id;
    assert!(!w.core.precopy_allowed(v));
    let resync = Request::IntentResync { handle: opened.handle };
    assert_eq!(committed_request(&mut w, 1, resync), Ok(Response::IntentRecorded));
    assert!(w.core.precopy_allowed(v));
    let before = w.core.meta.volume_by_name("m").unwrap().clone();
    let from = before.extents[0].legs[0].device;
    let (mv, effects) = w.request(3, Request::VolumeMove { name: "m".into(), from, to: None });
    // No recall: the whole copy runs while the holder writes.
    assert!(!effects.iter().any(|e| matches!(e, Effect::Event { event: ServerEvent::Recall { .. }, .. })));
    // The holder is told (protocol 12): copying online.
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Recovery { status: Some(s), .. } }
            if s.online && s.what.contains("move"))),
        "{effects:?}"
    );
    let (online, online_copies) = copy_job_of(&effects).expect("the online copy starts at once");
    let on_from = before.extents.iter().filter(|e| e.legs.iter().any(|l| l.device == from)).count();
    assert_eq!(online_copies.len(), on_from);
    assert!(on_from > 1, "the test needs more than one extent on the device");
    // The holder writes region 0 (extent 0) meanwhile: its mark commits.
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![0], clear: vec![] };
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    // Nothing committed yet; then the recall, and only extent 0's region
    // is copied again once the holder drained.
    assert_eq!(w.core.meta.volume_by_name("m").unwrap().extents, before.extents);
    let effects = w.apply(Input::JobDone { task: online, outcome: JobOutcome::done() });
    let generation = recall_of(&effects, 1).expect("the holder is recalled after the online copy");
    let (_, effects) = w.request(1, Request::RecallDone { handle: opened.handle, generation });
    let (copy, copies) = copy_job_of(&effects).expect("the touched region is copied at the recall point");
    assert_eq!(copies.len(), 1, "only the region written meanwhile: {copies:?}");
    let leg0 = before.extents[0].legs.iter().find(|l| l.device == from).unwrap();
    assert!(copies[0].from.iter().any(|f| f.device == from && f.offsets == vec![leg0.offset]), "{copies:?}");
    let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::done() });
    let effects = commit_all(&mut w, effects);
    assert!(matches!(reply_of(&effects, mv), Some(Ok(Response::Done))), "{effects:?}");
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Recovery { status: None, .. } })),
        "the holder is told the copy is over: {effects:?}"
    );
    let after = w.core.meta.volume_by_name("m").unwrap();
    assert!(after.extents.iter().all(|e| e.legs.iter().all(|l| l.device != from)));
}

#[test]
fn a_registration_during_an_online_copy_has_the_snapshot_areas_copied_again_at_the_recall_point() {
    let mut w = World::new();
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 4 << 20, legs: 2 });
    commit_all(&mut w, effects);
    // A snapshot taken while nobody holds the volume (no recall needed).
    assert_eq!(
        committed_request(&mut w, 3, Request::SnapshotCreate { volume: "m".into(), name: "s".into() }),
        Ok(Response::Done)
    );
    let opened = match committed_request(&mut w, 1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive }) {
        Ok(Response::Opened(o)) => o,
        other => panic!("{other:?}"),
    };
    let resync = Request::IntentResync { handle: opened.handle };
    assert_eq!(committed_request(&mut w, 1, resync), Ok(Response::IntentRecorded));
    let snap = w.core.meta.snapshots.iter().find(|s| s.name == "s").unwrap().clone();
    let from = snap.cow_extents[0].legs[0].device;
    let cow_legs: Vec<u64> =
        snap.cow_extents.iter().flat_map(|e| e.legs.iter()).filter(|l| l.device == from).map(|l| l.offset).collect();
    let (mv, effects) = w.request(3, Request::VolumeMove { name: "m".into(), from, to: None });
    let online = effects
        .iter()
        .find_map(|e| match e {
            Effect::Job { task, job: Job::Resync { .. } } => Some(*task),
            _ => None,
        })
        .expect("the online copy starts at once");
    // The holder copies a pre-image and registers it during the online
    // copy: the registration is not held up by it.
    let register = Request::CowRegister { handle: opened.handle, snapshot: snap.id, chunks: vec![0] };
    assert!(matches!(committed_request(&mut w, 1, register), Ok(Response::CowRegistered { new: 1 })));
    let effects = w.apply(Input::JobDone { task: online, outcome: JobOutcome::done() });
    let generation = recall_of(&effects, 1).expect("recalled after the online copy");
    let (_, effects) = w.request(1, Request::RecallDone { handle: opened.handle, generation });
    let (copy, copies) = copy_job_of(&effects).expect("the snapshot areas are copied again at the recall point");
    // Every piece of the snapshot area on the device, and no live region
    // (none was marked).
    let extent_bytes = w.core.meta.extent_bytes;
    for offset in &cow_legs {
        assert!(
            copies.iter().any(|c| c.from.iter().any(|f| f.device == from && f.offsets == vec![*offset])),
            "the snapshot area at {offset} on device {from} is copied again: {copies:?}"
        );
    }
    assert!(copies.iter().all(|c| c
        .from
        .iter()
        .any(|f| f.device == from && cow_legs.iter().any(|o| (*o..*o + extent_bytes).contains(&f.offsets[0])))));
    let effects = w.apply(Input::JobDone { task: copy, outcome: JobOutcome::done() });
    let effects = commit_all(&mut w, effects);
    assert!(matches!(reply_of(&effects, mv), Some(Ok(Response::Done))), "{effects:?}");
}

#[test]
fn device_add_labels_then_commits_and_remove_is_refused_for_data_and_metadata_copies() {
    use volume_format::DeviceIndex;
    let mut w = World::new();
    // The pool's three devices hold the metadata copies, as `pool init` makes them.
    let mut meta = (*w.core.meta).clone();
    for d in meta.devices.iter_mut() {
        d.holds_metadata = true;
    }
    let config = CoreConfig {
        lease_ms: LEASE_MS,
        durable_ms: 0,
        device_request_max_ms: 0,
        grace_ms: 0,
        key: Arc::new(SigningKey::from_bytes(&[7; 32])),
        entropy: Box::new(Zeros),
    };
    w.core = Core::new(meta.clone(), journal_after(&meta), config);
    w.apply(Input::Connected { session: 3, peer: peer(3, Role::Admin), addr: "test".into() });
    let (add, effects) = w.request(3, Request::DeviceAdd { uri: "nbd://new/e".into(), force: false });
    let (task, request) = effects
        .iter()
        .find_map(|e| match e {
            Effect::Job { task, job: Job::LabelDevice(r) } => Some((*task, r.clone())),
            _ => None,
        })
        .expect("the device is labelled first");
    assert_eq!(request.index, DeviceIndex(3));
    assert!(commit_of(&effects).is_none());
    // A second operation meanwhile is refused as busy.
    let (other, effects) = w.request(3, Request::DeviceEvacuate { device: DeviceIndex(0) });
    assert!(matches!(reply_of(&effects, other), Some(Err(e)) if e.code == ErrorCode::Busy));
    let layout = DeviceLayout::plan_with_slots(64 << 20, 1 << 20, 64 << 10, 2).unwrap();
    let label = volume_format::DeviceLabel {
        pool_uuid: request.pool_uuid,
        device_uuid: request.device_uuid,
        device_index: request.index,
        layout,
        created_at_unix_secs: 0,
    };
    let outcome = JobOutcome { result: Ok(()), label: Some(label), fences: Some(true) };
    let effects = w.apply(Input::JobDone { task, outcome });
    let effects = commit_all(&mut w, effects);
    assert!(matches!(reply_of(&effects, add), Some(Ok(Response::Done))), "{effects:?}");
    let added = w.core.meta.device(DeviceIndex(3)).expect("committed");
    assert_eq!((added.uri.as_str(), added.holds_metadata), ("nbd://new/e", false));
    assert_eq!(w.core.meta.device_fenced(DeviceIndex(3)), Some(true), "decided at the labelling, committed with it");
    // Remove: refused for a metadata copy and for data, done for the empty one.
    let refused = |w: &mut World, device: u32| {
        let (r, effects) = w.request(3, Request::DeviceRemove { device: DeviceIndex(device) });
        match reply_of(&effects, r) {
            Some(Err(e)) => e.message.clone(),
            other => panic!("removing device {device}: {other:?}"),
        }
    };
    assert!(refused(&mut w, 0).contains("metadata"));
    let v = w.core.meta.volume_by_name("v").unwrap().extents[0].legs[0].device;
    let mut meta = (*w.core.meta).clone();
    meta.devices.iter_mut().find(|d| d.index == v).unwrap().holds_metadata = false;
    w.core.meta = Arc::new(meta);
    let msg = refused(&mut w, v.0);
    assert!(msg.contains("still holds") && msg.contains("volume v") && msg.contains("evacuate"), "{msg}");
    assert!(matches!(
        committed_request(&mut w, 3, Request::DeviceRemove { device: DeviceIndex(3) }),
        Ok(Response::Done)
    ));
    assert!(w.core.meta.device(DeviceIndex(3)).is_none());
    assert_eq!(w.core.meta.device_fenced(DeviceIndex(3)), None, "its fencing record went with it");
}

#[test]
fn whether_a_device_fences_is_recorded_once_a_connection_tells_and_listed_before_any() {
    let mut w = World::new();
    let devices: Vec<_> = w.core.meta.devices.iter().map(|d| (d.index, d.device_uuid)).collect();
    assert!(w.core.meta.device_fencing.is_empty(), "unknown, as in a format-9 pool");
    let (index, uuid) = devices[0];
    let effects = w.apply(Input::Reachability { device: uuid, reachable: true, fences: Some(true) });
    let (task, write) = commit_of(&effects).expect("what a connection told is recorded");
    // Told again while the commit is in flight: nothing more is queued.
    let again = w.apply(Input::Reachability { device: uuid, reachable: true, fences: Some(true) });
    assert!(commit_of(&again).is_none());
    let effects = w.apply(committed(task, write));
    assert!(commit_of(&effects).is_none());
    assert_eq!(w.core.meta.device_fenced(index), Some(true));
    // A device that stopped fencing (its server replaced by a plain one) is recorded again.
    let effects = w.apply(Input::Reachability { device: uuid, reachable: true, fences: Some(false) });
    let effects = commit_all(&mut w, effects);
    assert!(commit_of(&effects).is_none());
    assert_eq!(w.core.meta.device_fenced(index), Some(false));
    // A restarted server lists the recorded value before it reached the device.
    let meta = (*w.core.meta).clone();
    let config = CoreConfig {
        lease_ms: LEASE_MS,
        durable_ms: 0,
        device_request_max_ms: 0,
        grace_ms: 0,
        key: Arc::new(SigningKey::from_bytes(&[7; 32])),
        entropy: Box::new(Zeros),
    };
    w.core = Core::new(meta.clone(), journal_after(&meta), config);
    w.apply(Input::Connected { session: 3, peer: peer(3, Role::Admin), addr: "test".into() });
    let (list, effects) = w.request(3, Request::DeviceFencing);
    let Some(Ok(Response::DeviceFencing(listed))) = reply_of(&effects, list) else { panic!("{effects:?}") };
    assert_eq!(listed.iter().find(|f| f.device == index).and_then(|f| f.fences), Some(false));
    assert_eq!(listed.iter().find(|f| f.device == devices[1].0).and_then(|f| f.fences), None, "never told");
}

/// While a volume has two writable handles (a handover), an agent's own
/// pre-image copies are refused — whether or not the chunk is registered
/// already — and server copies go ahead.
#[test]
fn own_pre_image_copies_are_refused_while_a_volume_has_two_writers() {
    let mut w = World::new();
    let (b, a) = handover_pair(&mut w);
    // A snapshot of v, put straight into the metadata (how it is taken is
    // not the point here).
    let volume = w.core.meta.volume_by_name("v").unwrap().id;
    let change = w.core.meta.plan_create_snapshot(volume, "s1", 0).unwrap();
    std::sync::Arc::make_mut(&mut w.core.meta).apply(&change).unwrap();
    let snapshot = w.core.meta.newest_snapshot(volume).unwrap().id;
    let register = |handle| Request::CowRegister { handle, snapshot, chunks: vec![1, 2] };
    // One writer: its own copies are fine.
    assert!(matches!(committed_request(&mut w, 1, register(a.handle)), Ok(Response::CowRegistered { new: 2 })));

    let Ok(Response::HandoverToken { token, .. }) =
        committed_request(&mut w, 1, Request::Handover { handle: a.handle, to_key: b.key })
    else {
        panic!()
    };
    let Ok(Response::Opened(bh)) = committed_request(&mut w, 7, Request::OpenHandover { token }) else { panic!() };
    for (session, handle) in [(1, a.handle), (7, bh.handle)] {
        let (reply, effects) = w.request(session, register(handle));
        let Some(Err(e)) = reply_of(&effects, reply) else { panic!("{effects:?}") };
        assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
        assert!(e.message.contains("2 writable handles"), "{e:?}");
    }
    // The server's copy of a chunk registered already: nothing to copy.
    let copy = Request::CowCopy { handle: bh.handle, snapshot, chunks: vec![1] };
    assert!(matches!(committed_request(&mut w, 7, copy), Ok(Response::CowRegistered { new: 0 })));
}

/// Real fencing at the core (issue 14): an open that breaks a handle first
/// has the broken holder fenced on the pool's fencing devices (a job), and
/// commits only once that is done; if it fails, the old holder keeps the
/// volume and the open is refused saying why.
#[test]
fn an_open_that_breaks_a_handle_commits_only_after_the_holder_is_fenced() {
    let mut w = World::with_durable(2 * LEASE_MS);
    w.auto_zero = false;
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let first = match reply_of(&effects, open) {
        Some(Ok(Response::Opened(o))) => o.handle,
        other => panic!("{other:?}"),
    };
    // The holder goes silent past its lease and durable timeout.
    w.advance(3 * LEASE_MS + 1);
    let fence_job = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Job { task, job: Job::Fence { handles, uris, .. } } => Some((*task, handles.clone(), uris.len())),
            _ => None,
        })
    };
    let (open, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, handles, devices) = fence_job(&effects).expect("the broken holder is fenced first");
    assert_eq!((handles, devices), (vec![first], w.core.meta.devices.len()));
    assert!(commit_of(&effects).is_none() && reply_of(&effects, open).is_none(), "nothing before the fence");

    // A fence that fails: refused, the old holder keeps its handle.
    let effects = w.apply(Input::JobDone { task, outcome: JobOutcome::failed("device d0: no acknowledgement") });
    match reply_of(&effects, open) {
        Some(Err(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.message.contains("no acknowledgement"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.core.handles.get(first.0).is_some(), "the old handle is restored");

    // Fenced: the open commits and the new holder gets the volume.
    let (open, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, _, _) = fence_job(&effects).expect("fenced again");
    let effects = w.apply(Input::JobDone { task, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("the open commits after the fence");
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, open), Some(Ok(Response::Opened(_)))));
}

/// A handle released at lease expiry is fenced on the fencing devices
/// first; while that fails, it is not released (retried at the next tick).
#[test]
fn an_expired_handle_is_released_only_after_it_is_fenced() {
    let mut w = World::new();
    w.auto_zero = false;
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let held = match reply_of(&effects, open) {
        Some(Ok(Response::Opened(o))) => o.handle,
        other => panic!("{other:?}"),
    };
    let fence_job = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Job { task, job: Job::Fence { handles, .. } } => Some((*task, handles.clone())),
            _ => None,
        })
    };
    w.advance(LEASE_MS + 1);
    let effects = w.apply(Input::Tick);
    let (task, handles) = fence_job(&effects).expect("fenced before it is released");
    assert_eq!(handles, vec![held]);
    assert!(commit_of(&effects).is_none());
    assert!(fence_job(&w.apply(Input::Tick)).is_none(), "one fence at a time");
    let effects = w.apply(Input::JobDone { task, outcome: JobOutcome::failed("device d0: no acknowledgement") });
    assert!(commit_of(&effects).is_none(), "not released while it may still write");
    assert!(w.core.handles.get(held.0).is_some());
    let effects = w.apply(Input::Tick);
    let (task, _) = fence_job(&effects).expect("retried at the next tick");
    let effects = w.apply(Input::JobDone { task, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("released once fenced");
    w.apply(committed(task, next));
    assert!(w.core.handles.get(held.0).is_none());
}

/// Found by the simulator (seed 48276156797555): an expired holder's
/// handle is fenced for release while a conflicting open takes it aside to
/// break it; the expiry commits the handle's removal first, so the open's
/// commit cannot apply and the open fails. The handle must not come back
/// into the table — its holder's next renewal would let it write after the
/// pool fenced and released it — and the holder is told and cut off.
#[test]
fn a_handle_released_while_a_failed_open_held_it_aside_stays_released() {
    let mut w = World::new();
    w.auto_zero = false;
    let fence_job = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Job { task, job: Job::Fence { handles, .. } } => Some((*task, handles.clone())),
            _ => None,
        })
    };
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let Some(Ok(Response::Opened(first))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    let held = first.handle;
    w.advance(LEASE_MS + 1);
    let (expiry_fence, handles) = fence_job(&w.apply(Input::Tick)).expect("the expiry fences first");
    assert_eq!(handles, vec![held]);
    // The conflicting open breaks the same handle and fences it too.
    let (open, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (open_fence, handles) = fence_job(&effects).expect("the open fences the broken holder");
    assert_eq!(handles, vec![held]);
    // The expiry's release commits first.
    let effects = w.apply(Input::JobDone { task: expiry_fence, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("the release commits");
    w.apply(committed(task, next));
    assert!(!w.core.meta.handles.iter().any(|h| h.id == held), "released in the pool metadata");
    // Then the open's fence ends; its break no longer applies, so it fails.
    let told = |effects: &[Effect]| {
        effects.iter().any(|e| match e {
            Effect::Event { session: 1, event: ServerEvent::Revoked { handle, .. } } => handle.0 == held.0,
            _ => false,
        })
    };
    let kicked = |effects: &[Effect]| effects.iter().any(|e| matches!(e, Effect::Kick { session: 1 }));
    let mut effects = w.apply(Input::JobDone { task: open_fence, outcome: JobOutcome::done() });
    let (mut answered, mut was_told, mut was_kicked) =
        (reply_of(&effects, open).is_some(), told(&effects), kicked(&effects));
    while let Some((task, next)) = commit_of(&effects) {
        effects = w.apply(committed(task, next));
        answered |= reply_of(&effects, open).is_some();
        was_told |= told(&effects);
        was_kicked |= kicked(&effects);
    }
    assert!(answered, "the open is answered");
    assert!(w.core.handles.get(held.0).is_none(), "a released handle was put back into the table");
    assert!(was_told, "the holder was not told its handle is released");
    assert!(was_kicked, "the holder's session stays open");
}

/// A write-intent mark whose commit misses the metadata copy on a dead
/// device: the server checks that device, marks it failed (the commit
/// leaves its copy out) and the mark, asked again, commits to the copies
/// left — stale for the failed device. No agent had to report it.
#[test]
fn a_commit_that_misses_the_copy_on_a_dead_device_marks_it_failed_then_commits_to_the_rest() {
    use super::recovery::ProbeBackoff;
    use volume_format::metadata::DeviceState;
    let mut w = World::new();
    w.core.set_device_probe(ProbeBackoff { min_ms: 100, max_ms: 400 });
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let (open, effects) = w.request(1, Request::Open { volume: "m".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let Some(Ok(Response::Opened(opened))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    let device = w.core.meta.volume_by_name("m").unwrap().extents[0].legs[0].device;
    let uuid = w.core.meta.device(device).unwrap().device_uuid;
    let check_of = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Job { task, job: Job::CheckDevice { index, .. } } if *index == device.0 => Some(*task),
            _ => None,
        })
    };
    let missing = |write: &RawWrite| {
        let mut written = vec![true; write.copies];
        let copy = write.targets.iter().find(|t| t.1 == uuid).expect("the device holds a copy").0;
        written[copy] = false;
        written
    };
    let mark = Request::IntentRecord { handle: opened.handle, mark: vec![0], clear: vec![] };
    let (first, effects) = w.request(1, mark.clone());
    let (task, write) = commit_of(&effects).expect("the mark commits");
    let effects = w.apply(Input::MetaWritten { task, written: missing(&write), failures: vec!["refused".into()] });
    match reply_of(&effects, first) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::CommitFailed, "{e}"),
        other => panic!("a failed mark is never acknowledged: {other:?}"),
    }
    let check = check_of(&effects).expect("the device of the copy that missed the commit is checked");
    // The superseding commit misses it too: checked once at a time.
    let (task, write) = commit_of(&effects).expect("an empty commit supersedes the refused one");
    let effects = w.apply(Input::MetaWritten { task, written: missing(&write), failures: vec!["refused".into()] });
    assert!(check_of(&effects).is_none(), "one check at a time");
    let (supersede, write) = commit_of(&effects).expect("superseded again");
    // It is gone: marked failed, in a commit that leaves its copy out.
    let effects = w.apply(Input::JobDone { task: check, outcome: JobOutcome::failed("connection refused") });
    assert!(commit_of(&effects).is_none(), "one commit in flight");
    let effects = w.apply(Input::MetaWritten { task: supersede, written: missing(&write), failures: vec!["x".into()] });
    let (task, write) = commit_of(&effects).expect("the failure commits");
    assert!(write.targets.iter().all(|t| t.1 != uuid), "the failed device's copy is left out: {:?}", write.targets);
    w.apply(committed(task, write));
    assert!(matches!(w.core.meta.device(device).unwrap().state, DeviceState::Failed { .. }));
    // The agent asks again: durable on the copies left, stale for the device.
    assert_eq!(committed_request(&mut w, 1, mark), Ok(Response::IntentRecorded));
    let v = w.core.meta.volume_by_name("m").unwrap().id;
    let stale: Vec<u64> = w.core.meta.intent(v, volume_format::metadata::IntentKey::Stale(device)).iter().collect();
    assert_eq!(stale, vec![0]);
}

/// A device whose label reads but whose metadata copy keeps missing
/// commits (it answers reads, fails writes) would stall every commit: after
/// `COPY_MISSES_WHILE_REACHABLE_MAX` checks that found it reachable it is
/// marked failed all the same, and the commit goes on without its copy.
#[test]
fn a_device_that_reads_but_keeps_missing_commits_is_marked_failed_after_a_bound() {
    use super::recovery::{ProbeBackoff, COPY_MISSES_WHILE_REACHABLE_MAX};
    use volume_format::metadata::DeviceState;
    let mut w = World::new();
    w.core.set_device_probe(ProbeBackoff { min_ms: 100, max_ms: 400 });
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "m".into(), size_bytes: 2 << 20, legs: 2 });
    let (task, next) = commit_of(&effects).unwrap();
    w.apply(committed(task, next));
    let device = w.core.meta.volume_by_name("m").unwrap().extents[0].legs[0].device;
    let uuid = w.core.meta.device(device).unwrap().device_uuid;
    let check_of = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Job { task, job: Job::CheckDevice { index, .. } } if *index == device.0 => Some(*task),
            _ => None,
        })
    };
    let missing = |write: &RawWrite| {
        let mut written = vec![true; write.copies];
        let copy = write.targets.iter().find(|t| t.1 == uuid).expect("the device holds a copy").0;
        written[copy] = false;
        written
    };
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "n".into(), size_bytes: 1 << 20, legs: 1 });
    let (mut task, mut write) = commit_of(&effects).unwrap();
    for round in 1..=COPY_MISSES_WHILE_REACHABLE_MAX {
        let effects = w.apply(Input::MetaWritten { task, written: missing(&write), failures: vec!["EIO".into()] });
        let check = check_of(&effects).unwrap_or_else(|| panic!("round {round}: the device is checked"));
        (task, write) = commit_of(&effects).expect("an empty commit supersedes the refused one");
        // Its label reads; the answer is taken once no commit is in flight.
        let effects = w.apply(Input::JobDone { task: check, outcome: JobOutcome::done() });
        assert!(commit_of(&effects).is_none(), "one commit in flight");
        let effects = w.apply(Input::MetaWritten { task, written: missing(&write), failures: vec!["EIO".into()] });
        assert!(check_of(&effects).is_none(), "round {round}: one check at a time");
        (task, write) = commit_of(&effects).expect("the next commit");
        let failed = matches!(w.core.meta.device(device).unwrap().state, DeviceState::Failed { .. });
        assert_eq!(failed, round == COPY_MISSES_WHILE_REACHABLE_MAX, "round {round}: failed only at the bound");
        let writes_copy = write.targets.iter().any(|t| t.1 == uuid);
        assert_eq!(writes_copy, round < COPY_MISSES_WHILE_REACHABLE_MAX, "round {round}: {:?}", write.targets);
    }
    // The last check found it reachable too: it is marked failed all the
    // same, in a commit that leaves its copy out.
    w.apply(committed(task, write));
    match &w.core.meta.device(device).unwrap().state {
        DeviceState::Failed { reason, .. } => assert!(reason.contains("although its label reads"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// A commit no copy took is the server's own failure (its lease, its
/// network): no device is suspected, and a device that answers its check
/// stays online.
#[test]
fn a_commit_no_copy_took_checks_no_device_and_a_reachable_one_stays_online() {
    use super::recovery::ProbeBackoff;
    use volume_format::metadata::DeviceState;
    let mut w = World::new();
    w.core.set_device_probe(ProbeBackoff { min_ms: 100, max_ms: 400 });
    let is_check = |e: &Effect| matches!(e, Effect::Job { job: Job::CheckDevice { .. }, .. });
    let (_, effects) = w.request(3, Request::VolumeCreate { name: "a".into(), size_bytes: 1 << 20, legs: 1 });
    let (task, write) = commit_of(&effects).unwrap();
    let effects = w.apply(failed(task, write));
    assert!(!effects.iter().any(is_check), "{effects:?}");
    let (task, write) = commit_of(&effects).expect("superseded");
    let mut written = vec![true; write.copies];
    let (copy, uuid, _) = write.targets[0];
    written[copy] = false;
    let effects = w.apply(Input::MetaWritten { task, written, failures: vec!["a timeout".into()] });
    let check = effects
        .iter()
        .find_map(|e| match e {
            Effect::Job { task, job: Job::CheckDevice { uuid: u, .. } } if *u == uuid => Some(*task),
            _ => None,
        })
        .expect("checked");
    w.apply(Input::JobDone { task: check, outcome: JobOutcome::done() });
    assert!(w.core.meta.devices.iter().all(|d| matches!(d.state, DeviceState::Online)));
}

/// `Request::Capabilities` (issue 14): the holder of a handle gets one
/// capability per device of its volume, signed by the server's key, naming
/// the handle and the device's label UUID, writable exactly in the volume's
/// extents there; another key, and anyone once the handle is closed, gets
/// none.
#[test]
fn the_holder_of_a_handle_gets_its_capabilities_and_nobody_else_does() {
    use volume_format::capability::Holder;
    let mut w = World::new();
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let Some(Ok(Response::Opened(held))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    let handle = held.handle;
    let (asked, effects) = w.request(1, Request::Capabilities { handle });
    let Some(Ok(Response::Capabilities { handle: named, layout_generation, devices })) = reply_of(&effects, asked)
    else {
        panic!("{effects:?}")
    };
    assert_eq!((*named, *layout_generation), (handle, held.description.layout_generation));
    let trusted = [volume_format::PublicKey(SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes())];
    assert_eq!(devices.len(), held.description.devices.len());
    let map = w.core.meta.volume_map(held.description.volume).unwrap();
    for d in devices {
        let uuid = w.core.meta.device(d.device).unwrap().device_uuid;
        let now = 1_700_000_000;
        let c = d.capability.verify(&trusted, Some(uuid), now.max(d.capability.capability.issued_unix_secs)).unwrap();
        assert_eq!(c.holder, Holder::Handle(handle));
        for leg in map.physical_extents().filter(|l| l.device == d.device) {
            assert!(c.may_write(leg.offset, w.core.meta.extent_bytes), "extent at {} writable", leg.offset);
        }
        let end = c.writable.iter().map(|r| r.end).max().unwrap();
        assert!(!c.may_write(end, 1), "nothing past the volume's extents");
    }
    let (stranger, effects) = w.request(2, Request::Capabilities { handle });
    match reply_of(&effects, stranger) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::HandleBroken, "{e}"),
        other => panic!("another key's request: {other:?}"),
    }
    let (close, effects) = w.request(1, Request::Close { handle });
    let effects = match commit_of(&effects) {
        Some((task, next)) => w.apply(committed(task, next)),
        None => effects,
    };
    assert!(matches!(reply_of(&effects, close), Some(Ok(Response::Done))), "{effects:?}");
    let (late, effects) = w.request(1, Request::Capabilities { handle });
    assert!(matches!(reply_of(&effects, late), Some(Err(e)) if e.code == ErrorCode::HandleBroken), "{effects:?}");
}

/// Real fencing at a recall (issue 14): a holder that did not confirm a
/// recall in time is fenced on the pool's fencing devices before the change
/// is committed without it; if the fence is not acknowledged, nothing is
/// committed, the change is refused saying why, and the holder keeps its
/// handle and is told to go on with the old layout.
#[test]
fn a_recall_commits_without_a_silent_holder_only_after_it_is_fenced() {
    let mut w = World::with_durable(10 * LEASE_MS);
    w.auto_zero = false;
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    let (task, next) = commit_of(&effects).unwrap();
    let effects = w.apply(committed(task, next));
    let held = match reply_of(&effects, open) {
        Some(Ok(Response::Opened(o))) => o.handle,
        other => panic!("{other:?}"),
    };
    let fence_job = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::Job { task, job: Job::Fence { handles, uris, .. } } => Some((*task, handles.clone(), uris.len())),
            _ => None,
        })
    };
    let generation = w.core.meta.generation;
    let (snapshot, _) = w.request(3, Request::SnapshotCreate { volume: "v".into(), name: "s1".into() });
    // The holder is silent past its lease: excluded, but fenced first.
    w.advance(LEASE_MS + 1);
    let effects = w.apply(Input::Tick);
    let (task, handles, devices) = fence_job(&effects).expect("the excluded holder is fenced first");
    assert_eq!((handles, devices), (vec![held], w.core.meta.devices.len()));
    assert!(commit_of(&effects).is_none() && reply_of(&effects, snapshot).is_none(), "nothing before the fence");
    assert!(w.core.removing().contains(&held.0), "not renewed while it is being fenced");

    // Not acknowledged: refused, nothing committed, the holder goes on.
    let effects = w.apply(Input::JobDone { task, outcome: JobOutcome::failed("device d0: no acknowledgement") });
    match reply_of(&effects, snapshot) {
        Some(Err(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.message.contains("no acknowledgement") && e.message.contains("not committed"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(commit_of(&effects).is_none(), "{effects:?}");
    assert_eq!(w.core.meta.generation, generation);
    assert!(w.core.handles.get(held.0).is_some());
    let published = effects.iter().any(
        |e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Publish { handle, .. } } if *handle == held),
    );
    assert!(published, "the holder is told to go on: {effects:?}");

    // Acknowledged: the change commits without the holder.
    // (The holder is still silent past its lease: excluded at once.)
    let (again, effects) = w.request(3, Request::SnapshotCreate { volume: "v".into(), name: "s1".into() });
    let (task, _, _) = fence_job(&effects).expect("fenced again");
    let effects = w.apply(Input::JobDone { task, outcome: JobOutcome::done() });
    let (task, next) = commit_of(&effects).expect("the change commits once the holder is fenced");
    let effects = w.apply(committed(task, next));
    assert!(matches!(reply_of(&effects, again), Some(Ok(Response::Done))), "{effects:?}");
    assert!(w.core.handles.get(held.0).is_none(), "excluded");
}

/// Range locks (issue 14): a shared holder's locks are committed and its
/// volume's other holders told the table; an overlapping request of another
/// handle is refused naming the holder, also after a restart (the locks are
/// in the pool metadata); closing the handle ends its locks and tells the
/// others; an exclusive handle cannot lock.
#[test]
fn range_locks_conflict_naming_the_holder_survive_a_restart_and_end_with_the_handle() {
    use volume_format::locks::LockRange;
    let mut w = World::new();
    let a = open_shared(&mut w, 1, "v");
    let b = open_shared(&mut w, 2, "v");
    let lock = |handle, start, len_bytes| Request::Lock { handle, ranges: vec![LockRange { start, len_bytes }] };
    let (asked, effects) = w.request(1, lock(a.handle, 0, 1 << 20));
    let (task, next) = commit_of(&effects).expect("a lock is committed");
    let effects = w.apply(committed(task, next));
    let Some(Ok(Response::Locked(table))) = reply_of(&effects, asked) else { panic!("{effects:?}") };
    assert_eq!(table.of(a.handle), &[LockRange { start: 0, len_bytes: 1 << 20 }]);
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Event { session: 2, event: ServerEvent::Locks { handle, locks } }
            if *handle == b.handle && locks.check_write(b.handle, 4096, 1).is_err())),
        "the other holder is told: {effects:?}"
    );
    let (refused, effects) = w.request(2, lock(b.handle, (1 << 20) - 4096, 8192));
    match reply_of(&effects, refused) {
        Some(Err(e)) => {
            assert_eq!(e.code, ErrorCode::Conflict);
            assert!(e.message.contains("host-1") && e.message.contains(&a.handle.to_string()), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(committed_request(&mut w, 2, lock(b.handle, 1 << 20, 1 << 20)).map(|_| ()), Ok(()));

    w.restart(0);
    let resumed =
        |w: &mut World, session, key: &Vec<u8>| committed_request(w, session, Request::Resume { key: key.clone() });
    let (resume, effects) = w.request(1, Request::Resume { key: a.resume_key.clone() });
    let effects = commit_all(&mut w, effects);
    assert!(matches!(reply_of(&effects, resume), Some(Ok(Response::Opened(_)))), "{effects:?}");
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Locks { locks, .. } }
            if locks.holders.len() == 2)),
        "a resumed holder is told the table: {effects:?}"
    );
    assert!(matches!(resumed(&mut w, 2, &b.resume_key), Ok(Response::Opened(_))));
    assert_eq!(
        committed_request(&mut w, 2, lock(b.handle, 4096, 4096)),
        Err(ErrorCode::Conflict),
        "kept across a restart"
    );

    let (close, effects) = w.request(1, Request::Close { handle: a.handle });
    let effects = commit_all(&mut w, effects);
    assert!(matches!(reply_of(&effects, close), Some(Ok(Response::Done))), "{effects:?}");
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Event { session: 2, event: ServerEvent::Locks { locks, .. } }
            if locks.of(a.handle).is_empty() && !locks.of(b.handle).is_empty())),
        "closing ends the locks and tells the others: {effects:?}"
    );
    assert!(w.core.meta.lock_table(a.description.volume).of(a.handle).is_empty());
    assert_eq!(committed_request(&mut w, 2, lock(b.handle, 0, 4096)).map(|_| ()), Ok(()));

    let c = match committed_request(&mut w, 1, Request::Open { volume: "w".into(), mode: OpenMode::Exclusive }) {
        Ok(Response::Opened(o)) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(committed_request(&mut w, 1, lock(c.handle, 0, 4096)), Err(ErrorCode::InvalidArgument));
}

/// v with a mirrored cache opened exclusively on session 1, w (no cache)
/// on session 2.
fn cached_v_and_plain_w(
) -> (World, volume_format::control::messages::OpenedHandle, volume_format::control::messages::OpenedHandle) {
    use volume_format::metadata::CacheMode;
    let mut w = World::new();
    let cache = Request::VolumeCache { name: "v".into(), size_bytes: 8 << 20, mode: Some(CacheMode::Mirrored) };
    committed_request(&mut w, 3, cache).unwrap();
    let open = |volume: &str| Request::Open { volume: volume.into(), mode: OpenMode::Exclusive };
    let Ok(Response::Opened(v)) = committed_request(&mut w, 1, open("v")) else { panic!("v not opened") };
    let Ok(Response::Opened(u)) = committed_request(&mut w, 2, open("w")) else { panic!("w not opened") };
    (w, v, u)
}

/// What the owner publishes for the mirror lane (crate::mirror::lane):
/// the exclusive holders of cached volumes, and a holder no longer from
/// the moment its release starts (the owner's path refuses it then too).
#[test]
fn the_mirror_lane_is_open_to_exclusive_holders_of_cached_volumes_until_their_release_starts() {
    use crate::mirror::lane::Holders;
    let (mut w, v, _) = cached_v_and_plain_w();
    let volume = w.core.handles.get(v.handle.0).unwrap().volume;
    assert_eq!(w.core.mirror_holders(), Holders::from([((1, v.handle.0), volume_format::VolumeId(volume))]));
    // Silent past its lease: the release is being committed.
    w.advance(2 * LEASE_MS);
    let effects = w.apply(Input::Tick);
    let (task, next) = commit_of(&effects).expect("the expired handles are released");
    assert!(w.core.handles.get(v.handle.0).is_some(), "still in the table while its release commits");
    assert_eq!(w.core.mirror_holders(), Holders::new());
    w.apply(committed(task, next));
    assert_eq!(w.core.mirror_holders(), Holders::new());
}

/// `CacheReport` (protocol 14): the server keeps the last report of a
/// cached volume's exclusive holder, in memory, and shows it with its age
/// while that handle holds the volume — from nobody else, and not after
/// the holder closed it.
#[test]
fn the_holder_of_a_cached_volume_reports_its_cache_and_the_server_shows_the_last_report() {
    use volume_format::control::messages::HolderCacheReport;
    let (mut w, v, u) = cached_v_and_plain_w();
    let show = || Request::VolumeCacheReport { name: "v".into() };
    assert_eq!(committed_request(&mut w, 3, show()), Ok(Response::CacheReported(None)), "nothing reported yet");

    let report = |state: &str, why: &str, dirty_bytes| HolderCacheReport {
        state: state.into(),
        why: why.into(),
        dirty_bytes,
        log_used_bytes: 2 * dirty_bytes,
        log_capacity_bytes: 8 << 20,
        destage_bytes_per_sec: 1 << 20,
        destaged_bytes: 5 << 20,
    };
    let from = |handle, r| Request::CacheReport { handle, report: r };
    assert_eq!(committed_request(&mut w, 1, from(v.handle, report("mirrored", "", 4096))), Ok(Response::Done));
    w.advance(1500);
    let why = "the mirror did not answer within 5 s";
    let through = report("write-through", why, 8192);
    assert_eq!(committed_request(&mut w, 1, from(v.handle, through.clone())), Ok(Response::Done));
    w.advance(700);
    match committed_request(&mut w, 3, show()) {
        Ok(Response::CacheReported(Some(r))) => {
            assert_eq!(r.report, through, "the last report is shown");
            assert_eq!(r.age_ms, 700);
            assert_eq!(r.holder, format!("host-1 (handle {})", v.handle.0));
            let line = r.summary();
            assert!(line.starts_with(&format!("write-through ({why}); 8192 bytes dirty")), "{line}");
        }
        other => panic!("{other:?}"),
    }

    // Only the session holding the handle, of a cached volume, reports.
    assert_eq!(committed_request(&mut w, 2, from(v.handle, report("mirrored", "", 0))), Err(ErrorCode::HandleBroken));
    assert_eq!(
        committed_request(&mut w, 2, from(u.handle, report("mirrored", "", 0))),
        Err(ErrorCode::InvalidArgument),
        "w has no cache"
    );
    let Ok(Response::CacheReported(Some(r))) = committed_request(&mut w, 3, show()) else { panic!() };
    assert_eq!(r.report, through, "refused reports change nothing");

    // Closed: the report is not shown (and is dropped with the next report).
    let (close, effects) = w.request(1, Request::Close { handle: v.handle });
    let mut effects = effects;
    while let Some((task, next)) = commit_of(&effects) {
        effects = w.apply(committed(task, next));
    }
    assert_eq!(reply_of(&effects, close), Some(&Ok(Response::Done)));
    assert_eq!(committed_request(&mut w, 3, show()), Ok(Response::CacheReported(None)));
    assert_eq!(
        committed_request(&mut w, 3, Request::VolumeCacheReport { name: "nope".into() }),
        Err(ErrorCode::NotFound)
    );
}

/// `VolumeCacheMirror` (protocol 17): nothing recorded before the holder
/// mirrors; then this server, the generation, pending — what `sanvol volume
/// show` prints so an operator sees where a replay reads from.
#[test]
fn the_recorded_mirror_of_a_cached_volume_names_its_server_and_generation() {
    let (mut w, v, _) = cached_v_and_plain_w();
    let ask = |name: &str| Request::VolumeCacheMirror { name: name.into() };
    assert_eq!(committed_request(&mut w, 3, ask("v")), Ok(Response::CacheMirrorRecorded(None)), "never mirrored");
    assert_eq!(committed_request(&mut w, 3, ask("w")), Ok(Response::CacheMirrorRecorded(None)), "w has no cache");
    assert_eq!(committed_request(&mut w, 3, ask("nope")), Err(ErrorCode::NotFound));
    let (_, effects) = w.request(1, Request::MirrorOpen { handle: v.handle });
    let prepare = prepare_job(&effects).expect("the file is prepared first");
    let effects = w.apply(Input::JobDone { task: prepare, outcome: JobOutcome::done() });
    commit_all(&mut w, effects);
    let volume = v.description.volume;
    let record = w.core.meta.cache_mirror(volume).cloned().expect("recorded once mirroring starts");
    match committed_request(&mut w, 3, ask("v")) {
        Ok(Response::CacheMirrorRecorded(Some(r))) => {
            assert_eq!((r.server.as_str(), r.generation, r.pending), (record.server.as_str(), record.generation, true));
            let line = r.summary();
            assert!(line.starts_with(&format!("generation {} at {}; may hold", r.generation, r.server)), "{line}");
        }
        other => panic!("{other:?}"),
    }
}

/// v as [`cached_v_and_plain_w`] has it, its holder mirroring (a generation
/// pending), then silent past its lease.
fn mirrored_v_silent_past_its_lease() -> (World, volume_format::control::messages::OpenedHandle) {
    let (mut w, v, _) = cached_v_and_plain_w();
    let (_, effects) = w.request(1, Request::MirrorOpen { handle: v.handle });
    let prepare = prepare_job(&effects).expect("the file is prepared first");
    let effects = w.apply(Input::JobDone { task: prepare, outcome: JobOutcome::done() });
    commit_all(&mut w, effects);
    w.advance(2 * LEASE_MS);
    (w, v)
}

/// Found by the simulator (seed 2192): a cached holder silent past its
/// lease comes back while a recall that excluded it is replaying its
/// mirror; told its handle is being released, it closes it.
/// That close must not record the mirror as holding nothing the devices
/// lack — the holder never destaged, and the replay is still writing: a
/// server that died then would come back without replaying the rest.
#[test]
fn a_close_of_a_handle_being_released_keeps_its_mirror_pending() {
    let (mut w, v) = mirrored_v_silent_past_its_lease();
    let volume = v.description.volume;
    // A snapshot recalls the holder, which does not answer: excluded, its
    // mirror is replayed before the change.
    let (_, effects) = w.request(3, Request::SnapshotCreate { volume: "v".into(), name: "s".into() });
    let effects = commit_all(&mut w, effects);
    assert!(replays(&effects), "the recall replays the mirror: {effects:?}");
    // The old holder comes back and closes its handle meanwhile.
    let (_, effects) = w.request(1, Request::Close { handle: v.handle });
    commit_all(&mut w, effects);
    assert!(
        w.core.meta.cache_mirror(volume).is_some_and(|m| m.pending),
        "the mirror was recorded as replayed while its replay was still writing: {:?}",
        w.core.meta.cache_mirror(volume)
    );
}

/// The task of the mirror file's preparation `effects` start, if any.
fn prepare_job(effects: &[Effect]) -> Option<TaskId> {
    effects.iter().find_map(|e| match e {
        Effect::Job { task, job: Job::MirrorPrepare { .. }, .. } => Some(*task),
        _ => None,
    })
}

/// Found by the simulator (seeds 128124716596664, 123708996430583): a
/// server that died between committing a new mirror generation and creating
/// its file left the volume unopenable — the record named a file the server
/// could not tell from a lost one. The file is prepared first now; the
/// generation is committed only once it exists, and mirroring starts into
/// it after the commit. A failed preparation commits nothing.
#[test]
fn a_mirror_generation_is_committed_only_after_its_file_is_prepared() {
    let (mut w, v, _) = cached_v_and_plain_w();
    let volume = v.description.volume;
    let before = w.core.meta.cache_mirror(volume).cloned().expect("recorded with the setting");

    let (open, effects) = w.request(1, Request::MirrorOpen { handle: v.handle });
    assert!(commit_of(&effects).is_none(), "nothing is committed before the file exists: {effects:?}");
    let prepare = prepare_job(&effects).expect("the file is prepared first");
    let Some(Effect::Job { job: Job::MirrorPrepare { generation, staged, .. }, .. }) =
        effects.iter().find(|e| matches!(e, Effect::Job { job: Job::MirrorPrepare { .. }, .. }))
    else {
        unreachable!("found above")
    };
    assert_eq!((*generation, *staged), (before.generation + 1, None));
    let effects = w.apply(Input::JobDone { task: prepare, outcome: JobOutcome::failed("disk full") });
    assert!(commit_of(&effects).is_none(), "a failed preparation commits nothing");
    assert!(matches!(reply_of(&effects, open), Some(Err(e)) if e.message.contains("disk full")), "{effects:?}");
    assert_eq!(w.core.meta.cache_mirror(volume), Some(&before));

    let (open, effects) = w.request(1, Request::MirrorOpen { handle: v.handle });
    let prepare = prepare_job(&effects).expect("prepared again");
    let effects = w.apply(Input::JobDone { task: prepare, outcome: JobOutcome::done() });
    let (task, write) = commit_of(&effects).expect("then the generation is committed");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Mirror { .. })), "mirroring waits for the commit");
    let effects = w.apply(committed(task, write));
    let record = w.core.meta.cache_mirror(volume).unwrap();
    assert_eq!((record.generation, record.pending), (before.generation + 1, true));
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Mirror { op: crate::mirror::MirrorOp::Open { generation, .. }, reply: Some(r), .. } if *generation == record.generation && *r == open)),
        "{effects:?}"
    );
}

/// The task of the cache mirror replay `effects` start, if any.
fn replay_job(effects: &[Effect]) -> Option<TaskId> {
    effects.iter().find_map(|e| match e {
        Effect::Job { task, job: Job::MirrorReplay { .. }, .. } => Some(*task),
        _ => None,
    })
}

/// Whether `effects` start a replay of a cache mirror.
fn replays(effects: &[Effect]) -> bool {
    replay_job(effects).is_some()
}

/// Found by the simulator (seed 1121): an open that must replay a cached
/// volume's mirror breaks the previous holder's handle on record before the
/// replay writes. Had it only taken the handle out of its table, a server
/// that crashed mid-replay would come back with the handle active; its
/// holder would resume, start a fresh mirror and acknowledge writes the
/// partial replay had overwritten on the devices.
#[test]
fn an_open_that_replays_a_mirror_records_the_broken_holder_before_the_replay_writes() {
    let (mut w, v) = mirrored_v_silent_past_its_lease();
    assert!(w.core.meta.cache_mirror(v.description.volume).is_some_and(|m| m.pending), "a generation is pending");

    // Another host opens the volume.
    let (open, effects) = w.request(2, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    assert!(!replays(&effects), "the replay waits for the broken handle's record: {effects:?}");
    let (task, write) = commit_of(&effects).expect("the broken handle is committed first");
    assert!(reply_of(&effects, open).is_none());
    let effects = w.apply(committed(task, write));
    assert!(replays(&effects), "then the replay runs: {effects:?}");

    // The server dies mid-replay: the restarted one knows the handle broken.
    w.restart(0);
    assert_eq!(
        committed_request(&mut w, 1, Request::Resume { key: v.resume_key.clone() }),
        Err(ErrorCode::HandleBroken)
    );
}

/// Found by the simulator (seed 1626): a holder a recall excludes is not
/// renewed while the cache mirror it left is replayed before the change
/// (nor is a holder an open broke before its replay). Its session's
/// renewal is refused and it hears why — an answer would have extended
/// its lease, to the agent, over the replay and the new layout.
#[test]
fn a_holder_excluded_from_a_recall_is_not_renewed_while_its_mirror_is_replayed() {
    let (mut w, v) = mirrored_v_silent_past_its_lease();
    let (snap, effects) = w.request(3, Request::SnapshotCreate { volume: "v".into(), name: "s".into() });
    let effects = commit_all(&mut w, effects);
    assert!(replays(&effects), "the silent holder is excluded and its mirror replayed first: {effects:?}");
    assert!(reply_of(&effects, snap).is_none());
    let (renew, effects) = w.request(1, Request::Renew);
    match reply_of(&effects, renew) {
        Some(Err(e)) => assert_eq!(e.code, ErrorCode::Unavailable, "{e}"),
        other => panic!("a renewal answered while the excluded handle's mirror is replayed: {other:?}"),
    }
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Revoked { handle, .. } }
            if *handle == v.handle)),
        "the holder is told: {effects:?}"
    );
}

/// The recall's side of the rule above: a holder a recall excludes (silent
/// past its lease) is recorded as broken before its cache mirror is
/// replayed for the change; a server that dies mid-replay does not come
/// back with it active.
#[test]
fn a_recall_records_its_excluded_cached_holder_as_broken_before_the_replay_writes() {
    let (mut w, v) = mirrored_v_silent_past_its_lease();
    let (_, effects) = w.request(3, Request::SnapshotCreate { volume: "v".into(), name: "s".into() });
    assert!(!replays(&effects), "the replay waits for the excluded handle's record: {effects:?}");
    let effects = commit_all(&mut w, effects);
    assert!(replays(&effects), "then the replay runs: {effects:?}");
    w.restart(0);
    assert_eq!(
        committed_request(&mut w, 1, Request::Resume { key: v.resume_key.clone() }),
        Err(ErrorCode::HandleBroken)
    );
}

/// The `server` role is the pool's server key's alone (protocol 16): no
/// client is authorized with it, and the active server hands out none of
/// its mirror files (they are in use; only a server standing by does).
#[test]
fn no_client_gets_the_server_role_and_the_active_server_hands_out_no_mirror() {
    let mut w = World::new();
    let key = SigningKey::from_bytes(&[9; 32]).verifying_key().to_bytes();
    let authorize = Request::ClientAuthorize { key, name: "impostor".into(), role: Role::Server, volumes: Vec::new() };
    assert_eq!(committed_request(&mut w, 3, authorize), Err(ErrorCode::InvalidArgument));
    assert!(w.core.meta.clients.iter().all(|c| c.public_key.0 != key), "nothing was recorded");
    let fetch = Request::MirrorFetch { volume: volume_format::VolumeId(1), generation: 1, offset: 0 };
    assert_eq!(committed_request(&mut w, 3, fetch), Err(ErrorCode::NotActive));
}

/// Found by the simulator (seed 120380633692710): a recall excludes a
/// cached holder silent past its lease, records it as broken and replays
/// its mirror; then the change's own commit fails. The holder must not be
/// given the old layout back like a holder that was only slow: the pool
/// has it broken and the replay wrote over what it cached. (It resumed,
/// back from a VM pause, and wrote again as an excluded handle.)
#[test]
fn a_holder_recorded_broken_before_a_replay_does_not_resume_when_the_change_then_fails() {
    let (mut w, v) = mirrored_v_silent_past_its_lease();
    let (snap, effects) = w.request(3, Request::SnapshotCreate { volume: "v".into(), name: "s".into() });
    let effects = commit_all(&mut w, effects);
    let replay = replay_job(&effects).expect("the excluded holder's mirror is replayed first");
    let effects = w.apply(Input::JobDone { task: replay, outcome: JobOutcome::done() });
    let (task, write) = commit_of(&effects).expect("the mirror is recorded as replayed");
    let effects = w.apply(committed(task, write));
    let (task, write) = commit_of(&effects).expect("then the snapshot is committed");
    // A failed commit is answered once a later one settles what it wrote.
    let effects = w.apply(failed(task, write));
    let effects = commit_all(&mut w, effects);
    let events: Vec<&Effect> = effects.iter().filter(|e| matches!(e, Effect::Event { .. })).collect();
    assert!(matches!(reply_of(&effects, snap), Some(Err(_))), "the snapshot failed: {events:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Effect::Event { event: ServerEvent::Publish { handle, .. }, .. }
            if *handle == v.handle)),
        "the broken holder was given the old layout back: {events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Effect::Event { session: 1, event: ServerEvent::Revoked { handle, .. } }
            if *handle == v.handle)),
        "the holder is told: {events:?}"
    );
    assert_eq!(
        committed_request(&mut w, 1, Request::Resume { key: v.resume_key.clone() }),
        Err(ErrorCode::HandleBroken)
    );
}

/// The server-side copy jobs `effects` start: task, volume and chunks.
fn cow_jobs_of(effects: &[Effect]) -> Vec<(TaskId, volume_format::VolumeId, Vec<u64>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Job { task, job: Job::CowCopy { volume, chunks, .. } } => Some((*task, *volume, chunks.clone())),
            _ => None,
        })
        .collect()
}

/// Server-side copies queued on one volume behind a copy in flight are
/// served by one job and one commit, not one each (the simulator's seed
/// 114450128283725: a holder draining for a recall waited on them one
/// slow commit at a time). A registration refused on its own is refused
/// alone; another volume's copy queued in between is not held back.
#[test]
fn server_side_copies_queued_on_a_volume_are_served_by_one_job_and_one_commit() {
    let mut w = World::new();
    let open = |w: &mut World, session, name: &str| {
        let Ok(Response::Opened(o)) =
            committed_request(w, session, Request::Open { volume: name.into(), mode: OpenMode::Exclusive })
        else {
            panic!()
        };
        let volume = w.core.meta.volume_by_name(name).unwrap().id;
        let change = w.core.meta.plan_create_snapshot(volume, "s1", 0).unwrap();
        std::sync::Arc::make_mut(&mut w.core.meta).apply(&change).unwrap();
        (o.handle, w.core.meta.newest_snapshot(volume).unwrap().id, volume)
    };
    let (a, v_snap, v) = open(&mut w, 1, "v");
    let (b, w_snap, w_volume) = open(&mut w, 2, "w");
    let copy = |handle, snapshot, chunks: &[u64]| Request::CowCopy { handle, snapshot, chunks: chunks.to_vec() };

    // A copy of v's chunk 1 runs: v is busy.
    let (r1, effects) = w.request(1, copy(a, v_snap, &[1]));
    let [(t1, job_volume, chunks)] = &cow_jobs_of(&effects)[..] else { panic!("{effects:?}") };
    assert_eq!((*job_volume, chunks.as_slice()), (v, &[1][..]));
    let t1 = *t1;
    let (r2, _) = w.request(1, copy(a, v_snap, &[2]));
    // A commit on w in flight: everything after it queues.
    let (r3, effects) = w.request(2, Request::CowRegister { handle: b, snapshot: w_snap, chunks: vec![1] });
    let (c3, write3) = commit_of(&effects).unwrap();
    let (r4, _) = w.request(2, copy(b, w_snap, &[2]));
    let (r5, _) = w.request(1, copy(a, v_snap, &[3]));
    let (r6, _) = w.request(2, copy(a, v_snap, &[5])); // not session 2's handle
    let (r7, _) = w.request(1, copy(a, v_snap, &[2, 4]));
    let mut effects = w.apply(Input::JobDone { task: t1, outcome: JobOutcome::done() });
    effects.extend(w.apply(committed(c3, write3)));
    assert!(matches!(reply_of(&effects, r3), Some(Ok(Response::CowRegistered { new: 1 }))), "{effects:?}");
    let (c1, write1) = commit_of(&effects).expect("the first copy's registration is committed");
    let effects = w.apply(committed(c1, write1));
    assert!(matches!(reply_of(&effects, r1), Some(Ok(Response::CowRegistered { new: 1 }))), "{effects:?}");

    // v's four queued copies: one job; w's copy: a job of its own.
    let jobs = cow_jobs_of(&effects);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let (tv, _, chunks) = jobs.iter().find(|(_, vol, _)| *vol == v).unwrap();
    assert_eq!(chunks, &[2, 3, 4], "one copy of every chunk the queued registrations asked for");
    let (tw, _, w_chunks) = jobs.iter().find(|(_, vol, _)| *vol == w_volume).unwrap();
    assert_eq!(w_chunks, &[2]);
    let effects = w.apply(Input::JobDone { task: *tv, outcome: JobOutcome::done() });
    let (cv, write) = commit_of(&effects).expect("one commit for the four");
    for r in [r2, r5, r6, r7] {
        assert!(reply_of(&effects, r).is_none(), "nothing answered before the commit: {effects:?}");
    }
    let effects = w.apply(committed(cv, write));
    assert!(commit_of(&effects).is_none(), "no second commit: {effects:?}");
    for (r, new) in [(r2, 1), (r5, 1), (r7, 1)] {
        assert_eq!(reply_of(&effects, r), Some(&Ok(Response::CowRegistered { new })), "reply {r}: {effects:?}");
    }
    let Some(Err(refused)) = reply_of(&effects, r6) else { panic!("{effects:?}") };
    assert_eq!(refused.code, ErrorCode::NotFound, "{refused:?}");
    let registered: Vec<u64> = w.core.meta.newest_snapshot(v).unwrap().cow.iter().collect();
    assert_eq!(registered, vec![1, 2, 3, 4]);
    let effects = w.apply(Input::JobDone { task: *tw, outcome: JobOutcome::done() });
    let effects = commit_all(&mut w, effects);
    assert_eq!(reply_of(&effects, r4), Some(&Ok(Response::CowRegistered { new: 1 })), "{effects:?}");
}

/// An open that arrives while a snapshot delete, started with no holders,
/// moves the deleted snapshot's pre-images waits for the delete's commit:
/// granted before it, the holder would get a layout naming the deleted
/// snapshot, never be recalled, and write pre-images into its freed COW
/// area (the simulator's seed 182565496196980: another volume's snapshot
/// got that space and read this volume's data).
#[test]
fn an_open_during_a_snapshot_delete_s_merge_waits_for_the_delete_and_gets_the_new_layout() {
    let mut w = World::new();
    let volume = w.core.meta.volume_by_name("v").unwrap().id;
    for name in ["s1", "s2"] {
        let change = w.core.meta.plan_create_snapshot(volume, name, 0).unwrap();
        std::sync::Arc::make_mut(&mut w.core.meta).apply(&change).unwrap();
    }
    let older = w.core.meta.snapshot_by_name(volume, "s1").unwrap().id;
    let newer = w.core.meta.newest_snapshot(volume).unwrap().id;
    let register = w.core.meta.plan_register_cow(newer, &[1]).unwrap().unwrap();
    std::sync::Arc::make_mut(&mut w.core.meta).apply(&register).unwrap();

    let (delete, effects) = w.request(3, Request::SnapshotDelete { volume: "v".into(), name: "s2".into() });
    let Some(merge) = effects.iter().find_map(|e| match e {
        Effect::Job { task, job: Job::Merge { .. } } => Some(*task),
        _ => None,
    }) else {
        panic!("no merge job: {effects:?}")
    };
    let (open, effects) = w.request(1, Request::Open { volume: "v".into(), mode: OpenMode::Exclusive });
    assert!(reply_of(&effects, open).is_none(), "the open was answered during the merge: {effects:?}");
    assert!(commit_of(&effects).is_none(), "the open was committed during the merge: {effects:?}");

    let effects = w.apply(Input::JobDone { task: merge, outcome: JobOutcome::done() });
    let effects = commit_all(&mut w, effects);
    assert_eq!(reply_of(&effects, delete), Some(&Ok(Response::Done)), "{effects:?}");
    let Some(Ok(Response::Opened(opened))) = reply_of(&effects, open) else { panic!("{effects:?}") };
    assert_eq!(opened.description.snapshot.as_ref().map(|s| s.id), Some(older), "the layout after the delete");
    assert!(w.core.meta.snapshot(newer).is_none());
}
