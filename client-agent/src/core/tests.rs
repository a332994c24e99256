//! The owner's state machine driven input by input with an injected clock:
//! no sockets, no tasks, no sleeps. Each test plays the shell's part — it
//! reads the effects and answers with inputs — so the interleavings are
//! exactly the ones written down.

use volume_format::control::messages::{
    ControlError, ErrorCode, OpenMode, OpenedHandle, Request, Response, ServerEvent,
};
use volume_format::{HandleId, VolumeDescription};

use super::*;

const LEASE_MS: u64 = 3000;

/// A core connected at `t = 0` on connection 1 with a 3 s lease.
struct Harness {
    core: AgentCore,
    now: Millis,
    conn: ConnId,
    next_caller: u64,
    /// Every effect so far, in order.
    log: Vec<Effect>,
    /// What each `SaveState` wrote, in order (kept out of `apply`'s result
    /// so that tests of other things need not mention it).
    saves: Vec<Vec<HeldHandle>>,
}

fn description(name: &str, generation: u64, extents: u64) -> VolumeDescription {
    let mut d = crate::testing::description(extents, 1, 1, generation);
    d.name = name.into();
    d
}

fn opened(handle: u64, d: VolumeDescription, key: &[u8]) -> Result<Response, RequestError> {
    Ok(Response::Opened(OpenedHandle {
        handle: HandleId(handle),
        mode: OpenMode::Exclusive,
        description: d,
        lease_ms: LEASE_MS,
        resume_key: key.to_vec(),
    }))
}

fn refused(code: ErrorCode, message: &str) -> Result<Response, RequestError> {
    Err(RequestError::Server(ControlError::new(code, message)))
}

impl Harness {
    fn new() -> Harness {
        let core =
            AgentCore::new(CoreConfig { addrs: vec!["unix:/run/mds.sock".into()], export_dir: "/run/exports".into() });
        let mut h = Harness { core, now: 0, conn: ConnId(0), next_caller: 0, log: Vec::new(), saves: Vec::new() };
        let effects = h.apply(Input::Tick);
        let Some(Effect::Connect { conn, addr: 0 }) = effects.first().cloned() else {
            panic!("the core connects at once: {effects:?}")
        };
        h.conn = conn;
        let effects = h.apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 1 });
        assert!(effects.contains(&Effect::State(ConnectState::Connected { epoch: 1 })), "{effects:?}");
        h
    }

    fn apply(&mut self, input: Input) -> Vec<Effect> {
        let effects = self.core.apply(self.now, input);
        self.log.extend(effects.iter().cloned());
        effects
            .into_iter()
            .filter(|e| match e {
                Effect::SaveState { handles } => {
                    self.saves.push(handles.clone());
                    false
                }
                _ => true,
            })
            .collect()
    }

    /// What the state file holds now.
    fn saved(&self) -> Vec<HeldHandle> {
        self.saves.last().cloned().unwrap_or_default()
    }

    fn at(&mut self, now: Millis) -> &mut Harness {
        assert!(now >= self.now, "time only moves forward");
        self.now = now;
        self
    }

    fn command(&mut self, command: Command) -> (CallerId, Vec<Effect>) {
        self.next_caller += 1;
        let caller = CallerId(self.next_caller);
        (caller, self.apply(Input::Command { caller, command }))
    }

    fn attach_cmd(&mut self, volume: &str) -> (CallerId, RequestId) {
        let spec = AttachSpec {
            volume: volume.into(),
            open: OpenWith::Mode(OpenMode::Exclusive),
            socket: None,
            tcp: None,
            kernel: None,
            locks: Vec::new(),
        };
        let (caller, effects) = self.command(Command::Attach(spec));
        let (request, message) = sent_one(&effects);
        assert_eq!(message, Request::Open { volume: volume.into(), mode: OpenMode::Exclusive });
        (caller, request)
    }

    /// Attaches `volume` as handle `handle` at generation 1; returns its attachment.
    fn attach(&mut self, volume: &str, handle: u64, key: &[u8]) -> AttachmentId {
        let (caller, open) = self.attach_cmd(volume);
        let effects =
            self.apply(Input::Reply { request: open, result: opened(handle, description(volume, 1, 2), key) });
        let attachment = started_attach(&effects);
        let effects = self.apply(Input::Prepared { attachment, result: Ok(prepared(volume)) });
        match reply_to(&effects, caller) {
            Reply::Attached(info) => assert_eq!((info.handle, info.state.as_str()), (handle, "open")),
            other => panic!("{other:?}"),
        }
        attachment
    }

    /// The live connection ends at `now`.
    fn lose_connection(&mut self, now: Millis) -> Vec<Effect> {
        let conn = self.conn;
        self.at(now).apply(Input::ConnectionLost { conn })
    }

    fn list(&mut self) -> Vec<AttachmentInfo> {
        let (caller, effects) = self.command(Command::List);
        match reply_to(&effects, caller) {
            Reply::List(list) => list,
            other => panic!("{other:?}"),
        }
    }

    fn state_of(&mut self, volume: &str) -> (String, String, u64) {
        let info = self.list().into_iter().find(|i| i.volume == volume).expect("listed");
        (info.state, info.state_detail, info.layout_generation)
    }

    /// Answers every renewal in `effects` with a lease.
    fn renewals_answered(&mut self, effects: &[Effect]) -> Vec<Effect> {
        let mut out = Vec::new();
        for (request, message) in sent(effects) {
            if message == Request::Renew {
                out.extend(self.apply(Input::Reply { request, result: Ok(Response::Lease { lease_ms: LEASE_MS }) }));
            }
        }
        out
    }
}

fn prepared(volume: &str) -> Prepared {
    Prepared {
        export_uri: format!("nbd+unix:///{volume}?socket=/run/exports/{volume}.sock"),
        kernel_device: None,
        kernel_note: None,
    }
}

fn sent(effects: &[Effect]) -> Vec<(RequestId, Request)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { request, message, .. } => Some((*request, message.clone())),
            _ => None,
        })
        .collect()
}

fn sent_one(effects: &[Effect]) -> (RequestId, Request) {
    let mut s = sent(effects);
    assert_eq!(s.len(), 1, "exactly one request expected: {effects:?}");
    s.remove(0)
}

fn started_attach(effects: &[Effect]) -> AttachmentId {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::StartAttach { attachment, .. } => Some(*attachment),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no attach task started: {effects:?}"))
}

fn reply_to(effects: &[Effect], caller: CallerId) -> Reply {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply { caller: c, reply } if *c == caller => Some(reply.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no reply to {caller:?}: {effects:?}"))
}

fn no_reply(effects: &[Effect]) -> bool {
    !effects.iter().any(|e| matches!(e, Effect::Reply { .. }))
}

#[test]
fn list_and_status_answer_while_an_attach_is_in_progress() {
    let mut h = Harness::new();
    h.attach("vol", 11, b"key");
    h.at(10);
    let (attaching, open) = h.attach_cmd("slow");

    // The server has not answered the open: list and status answer at once.
    assert_eq!(h.list().iter().map(|i| i.volume.as_str()).collect::<Vec<_>>(), ["vol"]);
    let (caller, effects) = h.command(Command::Status);
    let Reply::Status(status) = reply_to(&effects, caller) else { panic!("{effects:?}") };
    assert_eq!((status.mds.as_str(), status.volumes), ("connected", 1));
    let (caller, effects) = h.command(Command::Detach { volume: "slow".into() });
    assert_eq!(reply_to(&effects, caller), Reply::Failed(AgentError::Attaching("slow".into())));

    // Opened; the attach task (devices, export) is still running: the same.
    let effects = h.apply(Input::Reply { request: open, result: opened(12, description("slow", 1, 1), b"k2") });
    let attachment = started_attach(&effects);
    assert!(no_reply(&effects), "{effects:?}");
    assert_eq!(h.list().len(), 1);
    // Other volumes detach meanwhile.
    let (caller, effects) = h.command(Command::Detach { volume: "vol".into() });
    assert!(matches!(effects[..], [Effect::StartDetach { flush: true, .. }]), "{effects:?}");
    let effects = h.apply(Input::Detached { attachment: AttachmentId(1), result: Ok(()) });
    let (close, message) = sent_one(&effects);
    assert_eq!(message, Request::Close { handle: HandleId(11) });
    let effects = h.apply(Input::Reply { request: close, result: Ok(Response::Done) });
    assert_eq!(reply_to(&effects, caller), Reply::Done);

    let effects = h.apply(Input::Prepared { attachment, result: Ok(prepared("slow")) });
    assert!(matches!(reply_to(&effects, attaching), Reply::Attached(_)));
    assert_eq!(h.list().iter().map(|i| i.volume.as_str()).collect::<Vec<_>>(), ["slow"]);
}

#[test]
fn a_recall_during_an_attach_is_applied_and_confirmed_before_the_attach_finishes() {
    let mut h = Harness::new();
    let (caller, open) = h.attach_cmd("vol");
    let effects = h.apply(Input::Reply { request: open, result: opened(11, description("vol", 1, 2), b"key") });
    let attachment = started_attach(&effects);

    // The devices are still being connected when the server recalls.
    let effects =
        h.apply(Input::Event { conn: h.conn, event: ServerEvent::Recall { handle: HandleId(11), generation: 2 } });
    assert_eq!(effects, vec![Effect::BeginRecall { attachment, generation: 2 }]);
    let effects = h.apply(Input::Drained { attachment, generation: 2, result: Ok(()) });
    let (done, message) = sent_one(&effects);
    assert_eq!(message, Request::RecallDone { handle: HandleId(11), generation: 2 });
    let pending = h.core.held_handles()[0].pending_recall.unwrap();
    assert!(pending.drained && !pending.confirmed);
    h.apply(Input::Reply { request: done, result: Ok(Response::Done) });
    assert!(h.core.held_handles()[0].pending_recall.unwrap().confirmed);

    // The attach finishes recalled; the publish reopens it.
    let effects = h.apply(Input::Prepared { attachment, result: Ok(prepared("vol")) });
    let Reply::Attached(info) = reply_to(&effects, caller) else { panic!("{effects:?}") };
    assert_eq!((info.state.as_str(), info.layout_generation), ("recalled", 1));
    let grown = description("vol", 2, 3);
    let effects = h.apply(Input::Event {
        conn: h.conn,
        event: ServerEvent::Publish { handle: HandleId(11), description: Box::new(grown.clone()) },
    });
    assert_eq!(
        effects,
        vec![Effect::Publish { attachment, description: Box::new(grown), context: PublishContext::Event }]
    );
    assert_eq!(h.state_of("vol"), ("open".into(), String::new(), 2));
    assert_eq!(h.core.held_handles()[0].pending_recall, None);
}

#[test]
fn events_before_the_open_reply_are_kept_and_replayed_in_order() {
    let mut h = Harness::new();
    let (_, open) = h.attach_cmd("vol");
    // A recall and a publish overtake the reply to the open.
    for event in [
        ServerEvent::Recall { handle: HandleId(11), generation: 2 },
        ServerEvent::Publish { handle: HandleId(11), description: Box::new(description("vol", 2, 3)) },
    ] {
        assert!(h.apply(Input::Event { conn: h.conn, event }).is_empty(), "nothing to apply it to yet");
    }
    let effects = h.apply(Input::Reply { request: open, result: opened(11, description("vol", 1, 2), b"key") });
    let attachment = started_attach(&effects);
    let kinds: Vec<&str> = effects
        .iter()
        .map(|e| match e {
            Effect::StartAttach { .. } => "attach",
            Effect::BeginRecall { generation: 2, .. } => "recall",
            Effect::Publish { .. } => "publish",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["attach", "recall", "publish"], "the gate exists before the events reach it");
    h.apply(Input::Prepared { attachment, result: Ok(prepared("vol")) });
    assert_eq!(h.state_of("vol"), ("open".into(), String::new(), 2));
    // A publish for a handle never registered stays an orphan and changes nothing.
    let stray = ServerEvent::Publish { handle: HandleId(99), description: Box::new(description("x", 5, 1)) };
    assert!(h.apply(Input::Event { conn: h.conn, event: stray }).is_empty());
}

#[test]
fn events_kept_from_an_earlier_connection_are_dropped_at_a_reconnect() {
    // Simulator seed 204625358832636: a recall for a handle whose open was
    // not answered yet came from a server that then lost the pool; the
    // agent reconnected elsewhere, opened again, got the same handle id at
    // an older generation — and applied the old recall: the gate stayed
    // recalled forever.
    let mut h = Harness::new();
    let (_, first_open) = h.attach_cmd("vol");
    let recall = ServerEvent::Recall { handle: HandleId(11), generation: 3 };
    assert!(h.apply(Input::Event { conn: h.conn, event: recall }).is_empty(), "kept for now");
    h.lose_connection(500);
    h.apply(Input::Reply { request: first_open, result: Err(RequestError::Closed) });
    let effects = h.at(600).apply(Input::Tick);
    let Some(Effect::Connect { conn: conn2, .. }) = effects.first().cloned() else { panic!("{effects:?}") };
    let effects = h.at(700).apply(Input::Connected { conn: conn2, lease_ms: LEASE_MS, session: 2 });
    h.conn = conn2;
    // The attach goes on: its open is sent again on the new connection (or
    // was failed; then the application attaches again).
    let open = match sent(&effects).into_iter().find(|(_, m)| matches!(m, Request::Open { .. })) {
        Some((open, _)) => open,
        None => h.attach_cmd("vol").1,
    };
    let effects = h.apply(Input::Reply { request: open, result: opened(11, description("vol", 2, 2), b"key") });
    assert!(!effects.iter().any(|e| matches!(e, Effect::BeginRecall { .. })), "an old recall applied: {effects:?}");
}

#[test]
fn stale_events_are_ignored_by_the_gates_own_rules() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"key");
    let publish = |g| ServerEvent::Publish { handle: HandleId(11), description: Box::new(description("vol", g, 2)) };
    assert_eq!(h.apply(Input::Event { conn: h.conn, event: publish(3) }).len(), 1);
    assert!(h.apply(Input::Event { conn: h.conn, event: publish(2) }).is_empty(), "an older layout");
    let recall = ServerEvent::Recall { handle: HandleId(11), generation: 3 };
    assert!(h.apply(Input::Event { conn: h.conn, event: recall }).is_empty(), "not newer than the layout");
    assert_eq!(h.state_of("vol").2, 3);
    // A drain reported for a recall that is over sends nothing.
    assert!(sent(&h.apply(Input::Drained { attachment: a, generation: 2, result: Ok(()) })).is_empty());
}

#[test]
fn a_reconnect_resumes_the_handle_and_its_lease_runs_from_the_resume() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"resume-key");
    assert_eq!(h.core.volume("vol").unwrap().handle.as_ref().unwrap().lease_until_ms, LEASE_MS);

    // The connection drops at t=500: I/O goes on until the lease runs out.
    let effects = h.lose_connection(500);
    assert!(effects.contains(&Effect::State(ConnectState::Connecting {
        last_error: Some("the connection to the metadata server was lost".into())
    })));
    assert_eq!(h.core.next_deadline_ms(), Some(600), "the first retry after the shortest backoff");
    let effects = h.at(600).apply(Input::Tick);
    let Some(Effect::Connect { conn: conn2, addr: 0 }) = effects.first().cloned() else { panic!("{effects:?}") };

    // The old lease runs out before the new connection is up: held, not failed.
    assert_eq!(h.at(LEASE_MS).state_of("vol").0, "lease-expired");
    let effects = h.at(3100).apply(Input::Connected { conn: conn2, lease_ms: LEASE_MS, session: 2 });
    let (resume, message) = sent_one(&effects);
    assert_eq!(message, Request::Resume { key: b"resume-key".to_vec() });

    // A renewal on the new connection does not extend a handle not yet brought over.
    let effects = h.at(4100).apply(Input::Tick);
    assert_eq!(sent_one(&effects).1, Request::Renew);
    let effects = h.renewals_answered(&effects);
    assert!(!effects.iter().any(|e| matches!(e, Effect::RenewLease { .. })), "{effects:?}");

    // The resume is answered late: the lease counts from when it was sent (3100).
    let effects =
        h.at(4500).apply(Input::Reply { request: resume, result: opened(11, description("vol", 1, 2), b"resume-key") });
    assert_eq!(effects, vec![Effect::RenewLease { attachment: a, until_ms: 3100 + LEASE_MS }]);
    assert_eq!(h.state_of("vol").0, "open");
    // From now on renewals on the new connection extend it.
    let effects = h.at(5100).apply(Input::Tick);
    let effects = h.renewals_answered(&effects);
    assert_eq!(effects, vec![Effect::RenewLease { attachment: a, until_ms: 5100 + LEASE_MS }]);
}

#[test]
fn a_resume_in_the_grace_period_is_retried_and_a_newer_layout_is_published() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    h.lose_connection(100);
    let effects = h.at(200).apply(Input::Tick);
    let Some(Effect::Connect { conn, .. }) = effects.first().cloned() else { panic!("{effects:?}") };
    let (resume, _) = sent_one(&h.at(210).apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 }));
    let effects =
        h.apply(Input::Reply { request: resume, result: refused(ErrorCode::Unavailable, "grace period, 900 ms left") });
    assert!(effects.is_empty(), "{effects:?}");
    // Retried on the next renewal tick.
    let effects = h.at(1210).apply(Input::Tick);
    let requests: Vec<Request> = sent(&effects).into_iter().map(|(_, m)| m).collect();
    assert_eq!(requests, vec![Request::Renew, Request::Resume { key: b"k".to_vec() }]);
    let resume = sent(&effects)[1].0;
    let effects = h.apply(Input::Reply { request: resume, result: opened(11, description("vol", 4, 5), b"k") });
    assert!(
        matches!(&effects[..], [Effect::Publish { context: PublishContext::Resume, .. }, Effect::RenewLease { .. }]),
        "{effects:?}"
    );
    assert_eq!(h.state_of("vol").2, 4);
    // A layout that cannot be built revokes the volume with the reason.
    h.apply(Input::LayoutRejected {
        attachment: a,
        context: PublishContext::Resume,
        reason: "device 7 is unknown".into(),
    });
    let (state, detail, _) = h.state_of("vol");
    assert_eq!(state, "revoked");
    assert!(detail.contains("the layout after resuming is unusable: device 7 is unknown"), "{detail}");
}

#[test]
fn a_resume_answered_by_a_standby_keeps_the_handle_and_is_resumed_at_the_active_server() {
    let mut h = Harness::new();
    h.attach("vol", 11, b"k");
    h.lose_connection(100);
    let Some(Effect::Connect { conn, .. }) = h.at(200).apply(Input::Tick).first().cloned() else { panic!() };
    let (resume, _) = sent_one(&h.apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 }));
    let why = "this metadata server (mds-2, host id 2) is standing by; the pool is served by mds-1";
    let effects = h.apply(Input::Reply { request: resume, result: refused(ErrorCode::NotActive, why) });
    assert!(!effects.iter().any(|e| matches!(e, Effect::Revoke { .. })), "{effects:?}");
    assert_ne!(h.state_of("vol").0, "revoked");
    // The next server (the link moved on) is asked to resume the same key.
    let mut resumed = false;
    for t in (300..10_000).step_by(100) {
        let effects = h.at(t).apply(Input::Tick);
        if let Some(Effect::Connect { conn, .. }) =
            effects.iter().find(|e| matches!(e, Effect::Connect { .. })).cloned()
        {
            let effects = h.apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 3 });
            let requests: Vec<Request> = sent(&effects).into_iter().map(|(_, m)| m).collect();
            assert!(requests.contains(&Request::Resume { key: b"k".to_vec() }), "{requests:?}");
            resumed = true;
            break;
        }
        if sent(&effects).iter().any(|(_, m)| *m == (Request::Resume { key: b"k".to_vec() })) {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "the handle was never resumed again");
}

#[test]
fn a_broken_handle_is_revoked_on_resume_and_a_revoked_volume_detaches_without_flushing() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    h.lose_connection(100);
    let Some(Effect::Connect { conn, .. }) = h.at(200).apply(Input::Tick).first().cloned() else { panic!() };
    let (resume, _) = sent_one(&h.apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 }));
    let why = "handle 11 was broken at 12:00: host-b opened volume vol";
    let effects = h.apply(Input::Reply { request: resume, result: refused(ErrorCode::HandleBroken, why) });
    assert_eq!(effects, vec![Effect::Revoke { attachment: a, reason: why.into() }]);
    let (state, detail, _) = h.state_of("vol");
    assert_eq!((state.as_str(), detail.contains("host-b opened")), ("revoked", true));
    // Revoked handles are not resumed again.
    assert!(sent(&h.at(1200).apply(Input::Tick)).iter().all(|(_, m)| *m == Request::Renew));

    let (caller, effects) = h.command(Command::Detach { volume: "vol".into() });
    assert_eq!(effects, vec![Effect::StartDetach { attachment: a, flush: false }]);
    let effects = h.apply(Input::Detached { attachment: a, result: Ok(()) });
    assert_eq!(effects[0], Effect::Forget { attachment: a });
    let (close, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request: close, result: refused(ErrorCode::NotFound, "no handle 11") });
    assert_eq!(reply_to(&effects, caller), Reply::Done, "already gone at the server: closed is closed");
}

#[test]
fn a_revoke_event_fails_the_volume_and_pending_registrations() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let effects = h.apply(Input::Event {
        conn: h.conn,
        event: ServerEvent::Revoked { handle: HandleId(11), reason: "broken by host-c".into() },
    });
    assert_eq!(effects, vec![Effect::Revoke { attachment: a, reason: "broken by host-c".into() }]);
    assert_eq!(h.state_of("vol").0, "revoked");
    // A later recall or publish does not reopen it.
    let recall = ServerEvent::Recall { handle: HandleId(11), generation: 2 };
    assert!(h.apply(Input::Event { conn: h.conn, event: recall }).is_empty());
    let effects = h.apply(Input::CowRegister {
        caller: CallerId(900),
        volume: "vol".into(),
        snapshot: 1,
        chunks: vec![0],
        server_copies: false,
    });
    assert_eq!(reply_to(&effects, CallerId(900)), Reply::Registered(Err("volume vol's handle was revoked".into())));
}

#[test]
fn a_detach_during_a_recall_waits_for_its_task_and_the_recall_still_completes() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    h.apply(Input::Event { conn: h.conn, event: ServerEvent::Recall { handle: HandleId(11), generation: 2 } });
    // The detach's flush waits at the recalled gate (in its task); the owner goes on.
    let (detacher, effects) = h.command(Command::Detach { volume: "vol".into() });
    assert_eq!(effects, vec![Effect::StartDetach { attachment: a, flush: true }]);
    assert_eq!(h.state_of("vol").0, "recalled", "listed while detaching");
    let (caller, effects) = h.command(Command::Detach { volume: "vol".into() });
    assert_eq!(reply_to(&effects, caller), Reply::Failed(AgentError::Detaching("vol".into())));
    let spec = AttachSpec {
        volume: "vol".into(),
        open: OpenWith::Mode(OpenMode::Exclusive),
        socket: None,
        tcp: None,
        kernel: None,
        locks: Vec::new(),
    };
    let (caller, effects) = h.command(Command::Attach(spec));
    assert_eq!(reply_to(&effects, caller), Reply::Failed(AgentError::Detaching("vol".into())));

    // The recall drains and is confirmed, then the publish lets the flush through.
    let (_, message) = sent_one(&h.apply(Input::Drained { attachment: a, generation: 2, result: Ok(()) }));
    assert_eq!(message, Request::RecallDone { handle: HandleId(11), generation: 2 });
    let publish = ServerEvent::Publish { handle: HandleId(11), description: Box::new(description("vol", 2, 2)) };
    assert_eq!(h.apply(Input::Event { conn: h.conn, event: publish }).len(), 1);
    let effects = h.apply(Input::Detached { attachment: a, result: Ok(()) });
    let (close, message) = sent_one(&effects);
    assert_eq!(message, Request::Close { handle: HandleId(11) });
    assert!(h.list().is_empty(), "forgotten before the close is answered");
    let effects = h.apply(Input::Reply { request: close, result: Ok(Response::Done) });
    assert_eq!(reply_to(&effects, detacher), Reply::Done);
}

#[test]
fn a_failed_flush_leaves_the_volume_attached() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let (caller, _) = h.command(Command::Detach { volume: "vol".into() });
    let effects = h.apply(Input::Detached { attachment: a, result: Err(DetachFailure::Flush("device 0: EIO".into())) });
    assert_eq!(
        reply_to(&effects, caller),
        Reply::Failed(AgentError::FlushFailed { volume: "vol".into(), message: "device 0: EIO".into() })
    );
    assert!(sent(&effects).is_empty(), "the handle stays open");
    assert_eq!(h.state_of("vol").0, "open");
    let (_, effects) = h.command(Command::Detach { volume: "vol".into() });
    assert!(matches!(effects[..], [Effect::StartDetach { .. }]), "and can be detached again");
}

#[test]
fn a_handle_whose_failed_regions_could_not_be_copied_is_left_to_run_out() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let (caller, _) = h.command(Command::Detach { volume: "vol".into() });
    let failure = DetachFailure::LeaveHandle("the regions [3] could not be resynchronized".into());
    let effects = h.apply(Input::Detached { attachment: a, result: Err(failure) });
    assert_eq!(reply_to(&effects, caller), Reply::Done, "detached here");
    assert!(effects.contains(&Effect::Forget { attachment: a }));
    assert!(sent(&effects).is_empty(), "no Close: the server must see the handle gone uncleanly");
    assert!(h.core.held_handles().is_empty(), "nor renewed any more");
}

#[test]
fn a_failed_attach_closes_the_handle_before_the_caller_hears() {
    let mut h = Harness::new();
    let (caller, open) = h.attach_cmd("vol");
    let effects = h.apply(Input::Reply { request: open, result: opened(11, description("vol", 1, 1), b"k") });
    let attachment = started_attach(&effects);
    let error = AgentError::Device { volume: "vol".into(), message: "device 0 (nbd://x): cannot connect".into() };
    let effects = h.apply(Input::Prepared { attachment, result: Err(error.clone()) });
    assert_eq!(effects[0], Effect::Forget { attachment });
    let (close, message) = sent_one(&effects);
    assert_eq!(message, Request::Close { handle: HandleId(11) });
    assert!(no_reply(&effects), "not before the handle is closed");
    let effects = h.apply(Input::Reply { request: close, result: Ok(Response::Done) });
    assert_eq!(reply_to(&effects, caller), Reply::Failed(error));
    assert!(h.core.held_handles().is_empty());
    // An open refused by the server is the server's message.
    let (caller, open) = h.attach_cmd("busy");
    let effects = h.apply(Input::Reply {
        request: open,
        result: refused(ErrorCode::Conflict, "volume busy is open exclusive by host-b"),
    });
    assert_eq!(
        reply_to(&effects, caller),
        Reply::Failed(AgentError::Session(SessionError::Server("volume busy is open exclusive by host-b".into())))
    );
}

#[test]
fn a_lease_runs_from_when_its_renewal_was_sent() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let effects = h.at(1000).apply(Input::Tick);
    let (renew, message) = sent_one(&effects);
    assert_eq!(message, Request::Renew);
    // Answered 1.5 s later: the lease runs until 1000 + 3000, not 2500 + 3000.
    let effects = h.at(2500).apply(Input::Reply { request: renew, result: Ok(Response::Lease { lease_ms: LEASE_MS }) });
    assert_eq!(effects[0], Effect::RenewLease { attachment: a, until_ms: 4000 });
    // The renewal due at 2000 goes out once the previous one is answered (one at a time).
    assert_eq!(sent_one(&effects).1, Request::Renew);
    h.at(3999);
    assert_eq!(h.state_of("vol").0, "open");
    h.at(4000);
    assert_eq!(h.state_of("vol").0, "lease-expired");
}

#[test]
fn a_renewal_is_not_sent_while_the_previous_is_unanswered() {
    let mut h = Harness::new();
    h.attach("vol", 11, b"k");
    assert_eq!(sent_one(&h.at(1000).apply(Input::Tick)).1, Request::Renew);
    assert!(sent(&h.at(2000).apply(Input::Tick)).is_empty());
}

#[test]
fn registrations_wait_for_the_connection_and_the_resume_then_retry_until_answered() {
    let mut h = Harness::new();
    h.attach("vol", 11, b"k");
    h.lose_connection(100);
    let register = |h: &mut Harness| {
        h.apply(Input::CowRegister {
            caller: CallerId(500),
            volume: "vol".into(),
            snapshot: 3,
            chunks: vec![1, 2],
            server_copies: false,
        })
    };
    assert!(sent(&register(&mut h)).is_empty(), "not connected: waits");
    let effects = h.at(200).apply(Input::Tick);
    let Some(Effect::Connect { conn, .. }) = effects.iter().find(|e| matches!(e, Effect::Connect { .. })).cloned()
    else {
        panic!("{effects:?}")
    };
    let effects = h.at(210).apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 });
    // Resume and the registration go out together; the server has not resumed the handle yet.
    let requests = sent(&effects);
    assert_eq!(requests.len(), 2, "{effects:?}");
    let (resume, register_request) = (requests[0].0, requests[1].0);
    assert!(matches!(requests[1].1, Request::CowRegister { handle: HandleId(11), .. }));
    let effects = h.apply(Input::Reply {
        request: register_request,
        result: refused(ErrorCode::NotFound, "handle 11 is not resumed"),
    });
    assert!(effects.is_empty());
    // Tried at 100 and 200 while disconnected, and at 210 on connecting: the pause doubled each time.
    assert_eq!(h.core.next_deadline_ms(), Some(210 + 80));
    // The resume succeeds: retried at once.
    let effects = h.apply(Input::Reply { request: resume, result: opened(11, description("vol", 1, 2), b"k") });
    let (again, message) = sent_one(&effects);
    assert!(matches!(message, Request::CowRegister { .. }));
    let effects = h.apply(Input::Reply { request: again, result: Ok(Response::CowRegistered { new: 2 }) });
    assert_eq!(reply_to(&effects, CallerId(500)), Reply::Registered(Ok(())));
}

/// A registration still waiting when its attachment went away is never
/// sent for a later attachment of the same volume: an
/// intent clear of the old one would clear regions the new one writes in
/// (simulator seed 290).
#[test]
fn a_waiting_registration_does_not_act_for_a_later_handle_of_its_volume() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let op = super::IntentOp::Record { mark: vec![], clear: vec![0, 1, 2] };
    let effects = h.at(100).apply(Input::IntentRecord { caller: CallerId(500), volume: "vol".into(), op });
    let (request, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request, result: Err(RequestError::Transport("timed out".into())) });
    assert!(effects.iter().all(|e| !matches!(e, Effect::Reply { .. })), "tried again later: {effects:?}");
    // Detached and attached again before the retry.
    let (detacher, _) = h.command(Command::Detach { volume: "vol".into() });
    let (close, _) = sent_one(&h.apply(Input::Detached { attachment: a, result: Ok(()) }));
    let effects = h.apply(Input::Reply { request: close, result: Ok(Response::Done) });
    assert_eq!(reply_to(&effects, detacher), Reply::Done);
    h.attach("vol", 12, b"k");
    let answer = loop {
        let now = h.core.next_deadline_ms().expect("the registration is still due");
        let effects = h.at(now).apply(Input::Tick);
        h.renewals_answered(&effects);
        let stale = sent(&effects).into_iter().find(|(_, m)| matches!(m, Request::IntentRecord { .. }));
        assert!(stale.is_none(), "sent for the new handle: {stale:?}");
        if let Some(Effect::Reply { reply, .. }) =
            effects.iter().find(|e| matches!(e, Effect::Reply { caller: CallerId(500), .. }))
        {
            break reply.clone();
        }
    };
    match answer {
        Reply::Registered(Err(e)) => assert!(e.contains("detached and attached again"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// A write-intent mark whose commit failed is asked again (the server
/// marks a dead metadata copy's device failed meanwhile), a bounded number
/// of times; a copy-on-write registration's failed commit is not retried.
#[test]
fn a_failed_intent_commit_is_retried_a_bounded_number_of_times() {
    use super::registrations::INTENT_COMMIT_FAILURES_MAX;
    let mut h = Harness::new();
    h.attach("vol", 11, b"k");
    let op = super::IntentOp::Record { mark: vec![0, 1], clear: vec![] };
    let effects = h.at(100).apply(Input::IntentRecord { caller: CallerId(500), volume: "vol".into(), op });
    let (mut request, message) = sent_one(&effects);
    assert!(matches!(message, Request::IntentRecord { handle: HandleId(11), .. }), "{message:?}");
    let mut now = 100;
    for _ in 0..INTENT_COMMIT_FAILURES_MAX {
        let failed = refused(ErrorCode::CommitFailed, "metadata copy 1 missed the commit");
        let effects = h.apply(Input::Reply { request, result: failed });
        assert!(effects.iter().all(|e| !matches!(e, Effect::Reply { .. })), "not answered yet: {effects:?}");
        // Ticks at each deadline (renewals answered) until the mark goes again.
        request = loop {
            now = h.core.next_deadline_ms().expect("tried again later");
            let effects = h.at(now).apply(Input::Tick);
            h.renewals_answered(&effects);
            let retried = sent(&effects).into_iter().find(|(_, m)| matches!(m, Request::IntentRecord { .. }));
            if let Some((request, _)) = retried {
                break request;
            }
        };
    }
    let failed = refused(ErrorCode::CommitFailed, "no metadata copy takes commits");
    let effects = h.at(now).apply(Input::Reply { request, result: failed });
    assert!(matches!(reply_to(&effects, CallerId(500)), Reply::Registered(Err(_))), "the write fails in the end");

    let effects = h.apply(Input::CowRegister {
        caller: CallerId(501),
        volume: "vol".into(),
        snapshot: 3,
        chunks: vec![1],
        server_copies: false,
    });
    let (request, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request, result: refused(ErrorCode::CommitFailed, "missed") });
    assert!(matches!(reply_to(&effects, CallerId(501)), Reply::Registered(Err(_))));
}

#[test]
fn shutdown_detaches_everything_leaves_kernel_devices_and_stops() {
    let mut h = Harness::new();
    let (caller, open) = h.attach_cmd("k");
    let effects = h.apply(Input::Reply { request: open, result: opened(11, description("k", 1, 1), b"k") });
    let kernel = started_attach(&effects);
    let result = Ok(Prepared { kernel_device: Some(3), ..prepared("k") });
    let effects = h.apply(Input::Prepared { attachment: kernel, result });
    let Reply::Attached(info) = reply_to(&effects, caller) else { panic!() };
    assert_eq!(info.kernel_device.as_deref(), Some("/dev/nbd3"));
    let plain = h.attach("p", 12, b"p");

    let (stopper, effects) = h.command(Command::Shutdown);
    assert_eq!(
        effects,
        vec![
            Effect::LeaveKernelConnected { attachment: kernel },
            Effect::StartDetach { attachment: kernel, flush: true },
            Effect::StartDetach { attachment: plain, flush: true },
        ]
    );
    assert_eq!(h.list().len(), 2, "listed until detached");
    let mut closes = Vec::new();
    for a in [kernel, plain] {
        closes.push(sent_one(&h.apply(Input::Detached { attachment: a, result: Ok(()) })).0);
    }
    assert!(no_reply(&h.apply(Input::Reply { request: closes[0], result: Ok(Response::Done) })));
    let effects = h.apply(Input::Reply { request: closes[1], result: Ok(Response::Done) });
    assert_eq!(
        effects[effects.len() - 4..],
        [
            Effect::Disconnect { conn: h.conn },
            Effect::Reply { caller: stopper, reply: Reply::Done },
            Effect::Stopped,
            Effect::State(ConnectState::Stopped),
        ]
    );
    assert!(h.core.is_stopped());
    assert_eq!(h.core.next_deadline_ms(), None);
}

#[test]
fn a_direct_path_is_reported_probed_with_backoff_and_switched_back() {
    let mut h = Harness::new();
    let dev = "nbd://10.0.0.5:10809/d0".to_string();
    let effects = h.at(1000).apply(Input::DirectPathFailed { device: dev.clone(), index: 0, reason: "reset".into() });
    assert!(effects.contains(&Effect::ReportPathFailure { device: dev.clone(), index: 0, reason: "reset".into() }));
    // Later failures of requests already in flight change nothing.
    assert!(h.apply(Input::DirectPathFailed { device: dev.clone(), index: 0, reason: "again".into() }).is_empty());
    let effects = h.apply(Input::FailureReported { device: dev.clone(), marked_failed: true });
    assert_eq!(effects, vec![Effect::MarkDeviceFailed { device: dev.clone() }]);
    // Probes at the core's deadlines, each failing: 200 ms, then twice as long each time.
    let mut probes = Vec::new();
    while probes.len() < 4 {
        let at = h.core.next_deadline_ms().unwrap();
        let effects = h.at(at).apply(Input::Tick);
        if effects.contains(&Effect::Probe { device: dev.clone() }) {
            probes.push(at);
            if probes.len() < 4 {
                h.apply(Input::ProbeDone { device: dev.clone(), outcome: ProbeOutcome::Fails });
            }
        }
    }
    assert_eq!(probes, [1200, 1600, 2400, 4000]);
    let effects = h.apply(Input::ProbeDone { device: dev.clone(), outcome: ProbeOutcome::Works });
    assert_eq!(
        effects,
        vec![Effect::DirectPathBack { device: dev.clone() }, Effect::ReportPathRecovered { device: dev, index: 0 }]
    );
}

#[test]
fn held_handles_are_one_serializable_record() {
    let mut h = Harness::new();
    h.attach("vol", 11, b"resume-key");
    h.apply(Input::Event { conn: h.conn, event: ServerEvent::Recall { handle: HandleId(11), generation: 2 } });
    let held = h.core.held_handles();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].handle, held[0].resume_key.as_slice(), &held[0].export),
        (11, &b"resume-key"[..], &ExportTarget::Unix("/run/exports/vol.sock".into()))
    );
    let json = serde_json::to_string(&held).unwrap();
    let back: Vec<HeldHandle> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, held);
}

#[test]
fn attach_refusals_need_no_server() {
    let mut h = Harness::new();
    for (name, e) in [("a/b", AgentError::BadName("a/b".into())), ("", AgentError::BadName(String::new()))] {
        let spec = AttachSpec {
            volume: name.into(),
            open: OpenWith::Mode(OpenMode::ReadOnly),
            socket: None,
            tcp: None,
            kernel: None,
            locks: Vec::new(),
        };
        let (caller, effects) = h.command(Command::Attach(spec));
        assert_eq!(reply_to(&effects, caller), Reply::Failed(e));
    }
    h.attach("vol", 11, b"k");
    let spec = AttachSpec {
        volume: "vol".into(),
        open: OpenWith::Mode(OpenMode::ReadOnly),
        socket: None,
        tcp: None,
        kernel: None,
        locks: Vec::new(),
    };
    let (caller, effects) = h.command(Command::Attach(spec.clone()));
    assert_eq!(reply_to(&effects, caller), Reply::Failed(AgentError::AlreadyAttached("vol".into())));
    h.lose_connection(10);
    let (caller, effects) = h.command(Command::Attach(AttachSpec { volume: "other".into(), ..spec }));
    let Reply::Failed(AgentError::Session(SessionError::NotConnected { addr, last })) = reply_to(&effects, caller)
    else {
        panic!("{effects:?}")
    };
    assert_eq!(
        (addr.as_str(), last.as_deref()),
        ("unix:/run/mds.sock", Some("the connection to the metadata server was lost"))
    );
}

#[test]
fn a_recall_asked_again_after_a_resume_is_drained_and_confirmed_again() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let recall = ServerEvent::Recall { handle: HandleId(11), generation: 2 };
    h.apply(Input::Event { conn: h.conn, event: recall.clone() });
    // Drained, but the connection breaks before `RecallDone` is answered.
    let (done, _) = sent_one(&h.apply(Input::Drained { attachment: a, generation: 2, result: Ok(()) }));
    h.lose_connection(100);
    h.apply(Input::Reply { request: done, result: Err(RequestError::Closed) });
    assert!(!h.core.held_handles()[0].pending_recall.unwrap().confirmed);
    let Some(Effect::Connect { conn, .. }) = h.at(200).apply(Input::Tick).first().cloned() else { panic!() };
    let (resume, _) = sent_one(&h.apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 }));
    // Resumed: the confirmation the old connection lost goes out on the new one at once.
    let effects = h.apply(Input::Reply { request: resume, result: opened(11, description("vol", 1, 2), b"k") });
    let (retried, message) = sent_one(&effects);
    assert_eq!(message, Request::RecallDone { handle: HandleId(11), generation: 2 });
    assert_eq!(h.state_of("vol").0, "recalled", "still recalled: the layout has not been published");
    // The server asks again for the recall it is owed: drained again; the
    // confirmation in flight answers it.
    assert_eq!(
        h.apply(Input::Event { conn, event: recall }),
        vec![Effect::BeginRecall { attachment: a, generation: 2 }]
    );
    assert!(sent(&h.apply(Input::Drained { attachment: a, generation: 2, result: Ok(()) })).is_empty());
    h.apply(Input::Reply { request: retried, result: Ok(Response::Done) });
    assert!(h.core.held_handles()[0].pending_recall.unwrap().confirmed);
    assert_eq!(h.core.next_deadline_ms(), Some(200 + LEASE_MS / 3), "nothing left to retry but the renewal");
}

#[test]
fn a_failed_confirmation_is_retried_until_answered_and_the_recall_is_saved_first() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let conn = h.conn;
    h.at(10).apply(Input::Event { conn, event: ServerEvent::Recall { handle: HandleId(11), generation: 2 } });
    let saved = h.saved();
    assert_eq!(saved[0].pending_recall, Some(PendingRecall { generation: 2, drained: false, confirmed: false }));
    let log_before = h.log.len();
    let (done, _) = sent_one(&h.at(20).apply(Input::Drained { attachment: a, generation: 2, result: Ok(()) }));
    // The state file says "recalled" before the confirmation leaves.
    let after = &h.log[log_before..];
    let save = after.iter().position(|e| matches!(e, Effect::SaveState { .. })).expect("saved");
    let send = after.iter().position(|e| matches!(e, Effect::Send { .. })).expect("sent");
    assert!(save < send, "{after:?}");

    // A timeout on a live connection: retried after a pause that doubles.
    let mut request = done;
    let mut tries = Vec::new();
    for _ in 0..3 {
        h.apply(Input::Reply { request, result: Err(RequestError::Transport("timed out".into())) });
        let at = h.core.next_deadline_ms().unwrap();
        tries.push(at - h.now);
        let (again, message) = sent_one(&h.at(at).apply(Input::Tick));
        assert_eq!(message, Request::RecallDone { handle: HandleId(11), generation: 2 });
        request = again;
    }
    assert_eq!(tries, [CONFIRM_PAUSE_MIN_MS, 2 * CONFIRM_PAUSE_MIN_MS, 4 * CONFIRM_PAUSE_MIN_MS]);
    h.apply(Input::Reply { request, result: Ok(Response::Done) });
    assert!(h.core.held_handles()[0].pending_recall.unwrap().confirmed);
    // The publish ends the recall; nothing is retried any more.
    let grown = description("vol", 2, 3);
    h.apply(Input::Event {
        conn: h.conn,
        event: ServerEvent::Publish { handle: HandleId(11), description: Box::new(grown) },
    });
    assert_eq!(h.saved()[0].pending_recall, None);
    let at = h.core.next_deadline_ms().unwrap();
    assert!(sent(&h.at(at).apply(Input::Tick)).iter().all(|(_, m)| *m == Request::Renew));
}

fn held(volume: &str, handle: u64, key: &[u8]) -> HeldHandle {
    HeldHandle {
        volume: volume.into(),
        handle,
        mode: OpenMode::Exclusive,
        resume_key: key.to_vec(),
        pool_uuid: description(volume, 1, 1).pool_uuid,
        export: ExportTarget::Unix(format!("/srv/{volume}.sock").into()),
        kernel_device: None,
        pending_recall: None,
        devices: Vec::new(),
        cow_by_server: false,
    }
}

impl Harness {
    /// Asks to take `held` back; returns the caller.
    fn restore(&mut self, held: HeldHandle, kernel: Option<KernelPlan>) -> (CallerId, Vec<Effect>) {
        self.command(Command::Restore(RestoreSpec { held, kernel }))
    }
}

#[test]
fn a_restored_handle_is_resumed_and_served_as_before() {
    let mut h = Harness::new();
    let mut record = held("vol", 11, b"old-key");
    record.kernel_device = Some(4);
    let plan = KernelPlan::Reconnect { index: 4, backend: "sanvol:x".into(), pool: record.pool_uuid };
    let (caller, effects) = h.at(5).restore(record.clone(), Some(plan.clone()));
    let (resume, message) = sent_one(&effects);
    assert_eq!(message, Request::Resume { key: b"old-key".to_vec() });
    assert_eq!(h.saved(), vec![record.clone()], "kept in the state file while being taken back");
    assert!(h.list().is_empty(), "listed once served");

    let effects =
        h.at(8).apply(Input::Reply { request: resume, result: opened(11, description("vol", 1, 2), b"old-key") });
    let Some(Effect::StartAttach { attachment, handle: 11, export, kernel, lease_until_ms, .. }) =
        effects.first().cloned()
    else {
        panic!("{effects:?}")
    };
    assert_eq!((export, kernel, lease_until_ms), (record.export.clone(), Some(plan), 5 + LEASE_MS));
    assert!(!effects.iter().any(|e| matches!(e, Effect::BeginRecall { .. })), "nothing was recalled");
    let effects =
        h.apply(Input::Prepared { attachment, result: Ok(Prepared { kernel_device: Some(4), ..prepared("vol") }) });
    let Reply::Attached(info) = reply_to(&effects, caller) else { panic!("{effects:?}") };
    assert_eq!((info.handle, info.state.as_str(), info.kernel_device.as_deref()), (11, "open", Some("/dev/nbd4")));
    // Saved again with the devices of the layout the server gave (a later restart connects to
    // them early).
    let devices = description("vol", 1, 2).devices;
    assert!(!devices.is_empty());
    assert_eq!(h.saved(), vec![HeldHandle { devices, ..record }]);
    // It is an ordinary attachment from now on.
    let (caller, effects) = h.command(Command::Detach { volume: "vol".into() });
    assert!(effects.contains(&Effect::StartDetach { attachment, flush: true }));
    let (close, _) = sent_one(&h.apply(Input::Detached { attachment, result: Ok(()) }));
    let effects = h.apply(Input::Reply { request: close, result: Ok(Response::Done) });
    assert_eq!(reply_to(&effects, caller), Reply::Done);
    assert!(h.saved().is_empty());
}

#[test]
fn a_restore_waits_for_the_connection_and_retries_not_now() {
    let mut h = Harness::new();
    h.lose_connection(10);
    let (_, effects) = h.restore(held("vol", 11, b"k"), None);
    assert!(sent(&effects).is_empty(), "not connected: nothing sent");
    let at = h.core.next_deadline_ms().unwrap();
    let Some(Effect::Connect { conn, .. }) = h.at(at).apply(Input::Tick).first().cloned() else { panic!() };
    let (resume, message) = sent_one(&h.apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 }));
    assert_eq!(message, Request::Resume { key: b"k".to_vec() });
    let grace = refused(ErrorCode::Unavailable, "grace period, 900 ms left");
    assert!(sent(&h.apply(Input::Reply { request: resume, result: grace })).is_empty());
    // Tried again with the renewal.
    let at = h.now + LEASE_MS / 3;
    let messages: Vec<Request> = sent(&h.at(at).apply(Input::Tick)).into_iter().map(|(_, m)| m).collect();
    assert_eq!(messages, [Request::Renew, Request::Resume { key: b"k".to_vec() }]);
}

#[test]
fn a_restore_the_server_refuses_fails_and_leaves_the_state_file() {
    let mut h = Harness::new();
    let (caller, effects) = h.restore(held("vol", 11, b"k"), None);
    let (resume, _) = sent_one(&effects);
    let broken =
        "handle 11 of volume vol was broken at 10:00:00Z: opened by host-b; this agent must not write to it any more";
    let effects = h.apply(Input::Reply { request: resume, result: refused(ErrorCode::HandleBroken, broken) });
    let Reply::Failed(e) = reply_to(&effects, caller) else { panic!("{effects:?}") };
    assert!(e.to_string().contains("host-b"), "{e}");
    assert!(h.saved().is_empty());
    assert!(h.core.volume("vol").is_none());
    // A key for another volume or handle is not taken for this one.
    let (caller, effects) = h.restore(held("vol", 12, b"k2"), None);
    let (resume, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request: resume, result: opened(13, description("vol", 1, 2), b"k2") });
    assert!(matches!(reply_to(&effects, caller), Reply::Failed(_)), "{effects:?}");
    assert!(!h.log.iter().any(|e| matches!(e, Effect::StartAttach { .. })));
}

#[test]
fn a_restored_recall_keeps_the_gate_closed_until_the_layout_is_published() {
    let mut h = Harness::new();
    let mut record = held("vol", 11, b"k");
    record.pending_recall = Some(PendingRecall { generation: 2, drained: true, confirmed: true });
    let (caller, effects) = h.restore(record.clone(), None);
    let (resume, _) = sent_one(&effects);
    // The server's follow-up (the recall still in progress) overtakes the answer.
    let recall = ServerEvent::Recall { handle: HandleId(11), generation: 2 };
    assert!(h.apply(Input::Event { conn: h.conn, event: recall }).is_empty());
    let effects = h.apply(Input::Reply { request: resume, result: opened(11, description("vol", 1, 2), b"k") });
    let attachment = started_attach(&effects);
    let recalls: Vec<&Effect> = effects.iter().filter(|e| matches!(e, Effect::BeginRecall { .. })).collect();
    assert_eq!(recalls, [&Effect::BeginRecall { attachment, generation: 2 }; 2], "from the record, then the event");
    assert_eq!(h.core.volume("vol").unwrap().handle.as_ref().unwrap().gate.phase, Phase::Recalled { generation: 2 });
    // Drained (at once: nothing in flight in a new process) and confirmed again.
    let (done, message) = sent_one(&h.apply(Input::Drained { attachment, generation: 2, result: Ok(()) }));
    assert_eq!(message, Request::RecallDone { handle: HandleId(11), generation: 2 });
    h.apply(Input::Reply { request: done, result: Ok(Response::Done) });
    let effects = h.apply(Input::Prepared { attachment, result: Ok(prepared("vol")) });
    let Reply::Attached(info) = reply_to(&effects, caller) else { panic!() };
    assert_eq!(info.state, "recalled");
    let grown = Box::new(description("vol", 2, 3));
    h.apply(Input::Event { conn: h.conn, event: ServerEvent::Publish { handle: HandleId(11), description: grown } });
    assert_eq!(h.state_of("vol"), ("open".into(), String::new(), 2));

    // The server committed before the restart: the resume returns the new layout, nothing is recalled.
    let mut h = Harness::new();
    let (_, effects) = h.restore(record.clone(), None);
    let (resume, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request: resume, result: opened(11, description("vol", 2, 3), b"k") });
    assert!(!effects.iter().any(|e| matches!(e, Effect::BeginRecall { .. })), "{effects:?}");

    // The recall was abandoned (the server restarted): its follow-up republishes the current layout.
    let mut h = Harness::new();
    let (_, effects) = h.restore(record, None);
    let (resume, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request: resume, result: opened(11, description("vol", 1, 2), b"k") });
    let attachment = started_attach(&effects);
    let same = Box::new(description("vol", 1, 2));
    let effects =
        h.apply(Input::Event { conn: h.conn, event: ServerEvent::Publish { handle: HandleId(11), description: same } });
    assert!(matches!(effects[..], [Effect::Publish { attachment: a, .. }] if a == attachment), "{effects:?}");
    assert_eq!(h.core.volume("vol").unwrap().handle.as_ref().unwrap().gate.phase, Phase::Open);
}

#[test]
fn a_shutdown_while_taking_handles_back_leaves_them_for_the_next_run() {
    let mut h = Harness::new();
    h.lose_connection(10);
    let (caller, _) = h.restore(held("vol", 11, b"k"), None);
    let (stopper, effects) = h.command(Command::Shutdown);
    assert_eq!(reply_to(&effects, caller), Reply::Failed(AgentError::Session(SessionError::ShutDown)));
    assert_eq!(reply_to(&effects, stopper), Reply::Done);
    assert_eq!(h.saved(), vec![held("vol", 11, b"k")], "still ours: the next run takes it back");
}

#[test]
fn a_resume_refused_by_a_server_that_is_not_active_keeps_the_volume_and_resumes_at_the_next() {
    let mut h = Harness::new();
    h.attach("vol", 11, b"k");
    h.lose_connection(100);
    let effects = h.at(200).apply(Input::Tick);
    let Some(Effect::Connect { conn, .. }) = effects.first().cloned() else { panic!("{effects:?}") };
    let (resume, _) = sent_one(&h.at(210).apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 }));
    // A standby answers (the active server was killed a moment ago).
    let standing_by = "this metadata server (mds-2) is standing by and has not seen the active server yet; retry";
    let effects = h.apply(Input::Reply { request: resume, result: refused(ErrorCode::NotActive, standing_by) });
    assert!(effects.contains(&Effect::Disconnect { conn }), "moves on at once: {effects:?}");
    assert_ne!(h.state_of("vol").0, "revoked", "a standby's refusal is no verdict on the handle");
    // The next server is active and has the handle.
    let conn = (300..LEASE_MS)
        .step_by(100)
        .find_map(|t| match h.at(t).apply(Input::Tick).first() {
            Some(Effect::Connect { conn, .. }) => Some(*conn),
            _ => None,
        })
        .expect("connects again within the lease");
    let now = h.now;
    let (resume, message) = sent_one(&h.at(now + 10).apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 3 }));
    assert_eq!(message, Request::Resume { key: b"k".to_vec() });
    h.apply(Input::Reply { request: resume, result: opened(11, description("vol", 1, 2), b"k") });
    assert_eq!(h.state_of("vol").0, "open");
}

#[test]
fn a_failed_close_is_retried_until_the_server_has_it_and_a_recall_for_it_hurries_it() {
    let mut h = Harness::new();
    let a = h.attach("vol", 11, b"k");
    let (caller, _) = h.command(Command::Detach { volume: "vol".into() });
    let effects = h.apply(Input::Detached { attachment: a, result: Ok(()) });
    let (close, message) = sent_one(&effects);
    assert_eq!(message, Request::Close { handle: HandleId(11) });
    let effects = h.at(10).apply(Input::Reply {
        request: close,
        result: refused(ErrorCode::CommitFailed, "writing the pool metadata failed"),
    });
    assert!(matches!(reply_to(&effects, caller), Reply::Failed(_)), "the caller hears the first answer");
    let closes =
        |effects: &[Effect]| sent(effects).into_iter().filter(|(_, m)| matches!(m, Request::Close { .. })).count();
    assert_eq!(closes(&effects), 0, "not at once: after a pause");
    let (close, _) = sent(&h.at(10 + closing::CLOSE_PAUSE_MIN_MS).apply(Input::Tick))
        .into_iter()
        .find(|(_, m)| *m == Request::Close { handle: HandleId(11) })
        .expect("tried again after the pause");
    // The connection breaks under the second try: tried again on the next one.
    h.apply(Input::Reply { request: close, result: Err(RequestError::Closed) });
    h.lose_connection(100);
    let Some(Effect::Connect { conn, .. }) = h.at(300).apply(Input::Tick).first().cloned() else { panic!() };
    h.conn = conn;
    let effects = h.apply(Input::Connected { conn, lease_ms: LEASE_MS, session: 2 });
    let (close, _) = sent(&effects)
        .into_iter()
        .find(|(_, m)| *m == Request::Close { handle: HandleId(11) })
        .expect("tried again on the new connection");
    let effects = h.at(305).apply(Input::Reply { request: close, result: refused(ErrorCode::CommitFailed, "again") });
    assert_eq!(closes(&effects), 0);
    // A recall of that handle (a snapshot waits for it): the close goes at once.
    let effects =
        h.at(310).apply(Input::Event { conn, event: ServerEvent::Recall { handle: HandleId(11), generation: 2 } });
    let (close, _) = sent(&effects)
        .into_iter()
        .find(|(_, m)| *m == Request::Close { handle: HandleId(11) })
        .expect("a recall of a closing handle sends its close now");
    h.apply(Input::Reply { request: close, result: Ok(Response::Done) });
    // Closed: never sent again.
    for t in [1_000, 5_000, 20_000] {
        let effects = h.at(t).apply(Input::Tick);
        assert_eq!(closes(&effects), 0, "{effects:?}");
        h.renewals_answered(&effects);
    }
}

/// A handover's source records that the server copies its pre-images before
/// the token request leaves (a restart keeps it); its target is served
/// with server copies, and so is a restarted target.
#[test]
fn both_sides_of_a_handover_copy_pre_images_through_the_server() {
    let mut h = Harness::new();
    h.attach("vol", 11, b"k");
    assert!(!h.saved()[0].cow_by_server, "an exclusive holder copies itself");
    let log_before = h.log.len();
    let (_, effects) = h.command(Command::Handover { volume: "vol".into(), to_key: [5; 32] });
    let (_, message) = sent_one(&effects);
    assert_eq!(message, Request::Handover { handle: HandleId(11), to_key: [5; 32] });
    let after = &h.log[log_before..];
    let save = after.iter().position(|e| matches!(e, Effect::SaveState { .. })).expect("saved");
    let send = after.iter().position(|e| matches!(e, Effect::Send { .. })).expect("sent");
    assert!(save < send, "{after:?}");
    assert!(h.saved()[0].cow_by_server);

    // The target: opened with the token.
    let mut t = Harness::new();
    let spec = AttachSpec {
        volume: "vol".into(),
        open: OpenWith::Handover(vec![1, 2]),
        socket: None,
        tcp: None,
        kernel: None,
        locks: Vec::new(),
    };
    let (_, effects) = t.command(Command::Attach(spec));
    let (open, message) = sent_one(&effects);
    assert_eq!(message, Request::OpenHandover { token: vec![1, 2] });
    let effects = t.apply(Input::Reply { request: open, result: opened(12, description("vol", 1, 2), b"t") });
    assert!(effects.iter().any(|e| matches!(e, Effect::StartAttach { cow_by_server: true, .. })), "{effects:?}");
    assert!(t.core.held_handles()[0].cow_by_server);

    // A restarted target takes the handle back the same way.
    let mut r = Harness::new();
    let (_, effects) = r.restore(HeldHandle { cow_by_server: true, ..held("vol", 12, b"t") }, None);
    let (resume, _) = sent_one(&effects);
    let effects = r.apply(Input::Reply { request: resume, result: opened(12, description("vol", 1, 2), b"t") });
    assert!(effects.iter().any(|e| matches!(e, Effect::StartAttach { cow_by_server: true, .. })), "{effects:?}");
}

/// `attach --lock`: the locks are asked for right after the open and
/// before the attach task starts; granted, the table goes to the device
/// with the attach and `list` shows it; refused, the handle is closed and
/// the caller gets the server's message. A later `Locks` event replaces
/// the table.
#[test]
fn an_attach_with_locks_takes_them_before_serving_and_a_refusal_closes_the_handle() {
    use volume_format::locks::{LockRange, LockTable};
    let range = LockRange { start: 0, len_bytes: 8192 };
    let shared = |handle, name: &str| match opened(handle, description(name, 1, 1), b"k") {
        Ok(Response::Opened(o)) => Ok(Response::Opened(OpenedHandle { mode: OpenMode::SharedWrite, ..o })),
        other => other,
    };
    let mut h = Harness::new();
    let spec = AttachSpec {
        volume: "vol".into(),
        open: OpenWith::Mode(OpenMode::SharedWrite),
        socket: None,
        tcp: None,
        kernel: None,
        locks: vec![range],
    };
    let (caller, effects) = h.command(Command::Attach(spec.clone()));
    let (open, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request: open, result: shared(11, "vol") });
    assert!(!effects.iter().any(|e| matches!(e, Effect::StartAttach { .. })), "not before the locks: {effects:?}");
    let (lock, message) = sent_one(&effects);
    assert_eq!(message, Request::Lock { handle: HandleId(11), ranges: vec![range] });
    let mut table = LockTable::default();
    table.set(HandleId(11), "me", vec![range]);
    let effects = h.apply(Input::Reply { request: lock, result: Ok(Response::Locked(table.clone())) });
    let attachment = started_attach(&effects);
    assert!(effects.contains(&Effect::Locks { attachment, table: table.clone() }), "{effects:?}");
    let effects = h.apply(Input::Prepared { attachment, result: Ok(prepared("vol")) });
    match reply_to(&effects, caller) {
        Reply::Attached(info) => assert_eq!(info.locks, vec!["bytes 0..8192 by me (handle h11) (this handle)"]),
        other => panic!("{other:?}"),
    }
    table.set(HandleId(12), "host-b", vec![LockRange { start: 8192, len_bytes: 4096 }]);
    let effects = h
        .apply(Input::Event { conn: h.conn, event: ServerEvent::Locks { handle: HandleId(11), locks: table.clone() } });
    assert_eq!(effects, vec![Effect::Locks { attachment, table }]);
    assert_eq!(h.list()[0].locks.len(), 2);

    let (caller, effects) = h.command(Command::Attach(AttachSpec { volume: "other".into(), ..spec }));
    let (open, _) = sent_one(&effects);
    let effects = h.apply(Input::Reply { request: open, result: shared(13, "other") });
    let (lock, _) = sent_one(&effects);
    let why = "bytes 0..8192 of volume vol1 overlaps bytes 0..8192 locked by agent host-b (handle h12)";
    let effects = h.apply(Input::Reply { request: lock, result: refused(ErrorCode::Conflict, why) });
    assert!(!effects.iter().any(|e| matches!(e, Effect::StartAttach { .. })));
    let (close, message) = sent_one(&effects);
    assert_eq!(message, Request::Close { handle: HandleId(13) });
    let effects = h.apply(Input::Reply { request: close, result: Ok(Response::Done) });
    assert_eq!(reply_to(&effects, caller), Reply::Failed(AgentError::Session(SessionError::Server(why.into()))));
}

/// The server's news of a copy of the volume (protocol 12) shows in `list`
/// until it says the copy is over; it changes nothing of the I/O.
#[test]
fn a_copy_of_the_volume_the_server_reports_shows_in_list_until_it_is_over() {
    use volume_format::control::messages::RecoveryStatus;
    let mut h = Harness::new();
    h.attach("vol", 11, b"key");
    assert_eq!(h.list()[0].recovery, "");
    let status =
        RecoveryStatus { what: "resync of device 2".into(), online: true, bytes_done: 16 << 20, bytes_total: 64 << 20 };
    let effects = h.apply(Input::Event {
        conn: h.conn,
        event: ServerEvent::Recovery { handle: HandleId(11), status: Some(status) },
    });
    assert!(effects.is_empty(), "nothing to do for the I/O: {effects:?}");
    assert_eq!(h.list()[0].recovery, "resync of device 2: copying online, 25% of 64 MiB (writes go on)");
    h.apply(Input::Event { conn: h.conn, event: ServerEvent::Recovery { handle: HandleId(11), status: None } });
    assert_eq!(h.list()[0].recovery, "");
}

/// A server that renews the lease while it replays a cached volume's mirror
/// is waited for past the request timeout: the attach goes on when the open
/// is answered, a minute later.
#[test]
fn an_open_a_live_server_answers_late_is_waited_for() {
    let mut h = Harness::new();
    let (caller, open) = h.attach_cmd("vol");
    let timeout = h.log.iter().find_map(|e| match e {
        Effect::Send { request, timeout_ms, .. } if *request == open => Some(*timeout_ms),
        _ => None,
    });
    assert!(matches!(timeout, Some(Some(t)) if t > 60_000), "the shell would give up first: {timeout:?}");
    let mut t = 0;
    while t < 60_000 {
        t += LEASE_MS / 3;
        let effects = h.at(t).apply(Input::Tick);
        assert!(!effects.iter().any(|e| matches!(e, Effect::Reply { .. })), "at {t} ms: {effects:?}");
        h.renewals_answered(&effects);
    }
    let effects = h.apply(Input::Reply { request: open, result: opened(7, description("vol", 1, 2), b"k") });
    let attachment = started_attach(&effects);
    let effects = h.apply(Input::Prepared { attachment, result: Ok(prepared("vol")) });
    assert!(matches!(reply_to(&effects, caller), Reply::Attached(info) if info.handle == 7));
}

/// A server that stops answering (renewals too) fails the attach once the
/// request timeout passed and the lease ran out; a handle it opens after
/// all is closed at once, and the volume can be attached again.
#[test]
fn an_open_a_stopped_server_answers_after_the_attach_gave_up_is_closed() {
    let mut h = Harness::new();
    let (caller, open) = h.attach_cmd("vol");
    let patience = super::open_wait::OPEN_PATIENCE_MS;
    let deadline = h.core.next_deadline_ms().unwrap();
    assert!(deadline <= LEASE_MS, "the renewals still tick: {deadline}");
    let effects = h.at(patience - 1).apply(Input::Tick);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Reply { .. })), "{effects:?}");
    let effects = h.at(patience).apply(Input::Tick);
    match reply_to(&effects, caller) {
        Reply::Failed(e) => {
            let msg = e.to_string();
            assert!(msg.contains("did not answer the open of vol within 30s"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(h.list().is_empty(), "the attach is gone");
    // The late answer: its handle is closed, nothing attached.
    let effects =
        h.at(patience + 5000).apply(Input::Reply { request: open, result: opened(7, description("vol", 1, 2), b"k") });
    assert!(!effects.iter().any(|e| matches!(e, Effect::StartAttach { .. })), "{effects:?}");
    assert!(
        sent(&effects).iter().any(|(_, m)| matches!(m, Request::Close { handle, .. } if handle.0 == 7)),
        "the late handle is closed: {effects:?}"
    );
    // A new attach of the same volume is sent (not refused as attaching).
    let (_, again) = h.attach_cmd("vol");
    assert_ne!(again, open);
}
