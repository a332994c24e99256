//! Attach, detach, list and handover; the server's events for each handle;
//! and bringing handles over to a new connection.
//!
//! Attach = `Open` → the handle's gate installed (events apply from here on)
//! → the attach task (devices, export, kernel device) → attached. Any step
//! failing closes the handle at the server before the caller hears the
//! error, so a failed attach leaves no handle open.
//!
//! Detach = the detach task (kernel device, flush, stop the export, flush,
//! close and drain the gate; a failed flush leaves the volume attached) →
//! `Close`.
//!
//! After a reconnect, handles opened on an older connection are *resumed*
//! with the resume key their open returned: told "unchanged" (the same
//! handle), the gate gets the new lease and I/O continues as if the
//! connection had never broken — I/O held because the lease ran out is
//! released, none failed. Told the handle was broken (another client opened
//! the volume after the lease and durable timeout ran out), the gate is
//! revoked: from then on the volume's I/O fails with the server's message
//! instead of writing. "Not now" (the server's grace period, a transport
//! error) is retried on every renewal tick, while the handle keeps its old
//! lease, so its I/O is held, not failed. Servers that give no resume key
//! get the older behaviour: close the old handle (best effort), re-open in
//! the same mode and publish the new description into the same gate.

use tracing::{debug, error, info, warn};
use volume_format::control::messages::{ErrorCode, OpenMode, Request, Response, ServerEvent};
use volume_format::HandleId;

use super::state::{
    checked_phase, checked_stage, Confirm, GateMirror, Handle, HeldHandle, PendingRecall, Recovery, Volume,
};
use super::{
    AgentCore, AttachSpec, AttachmentId, AttachmentInfo, CallerId, CloseOutcome, ConnId, Effect, Millis, OpenWith,
    Pending, Prepared, PublishContext, Purpose, Reply, RequestError, Stage, ORPHAN_EVENTS_MAX,
};
use crate::agent::AgentError;
use crate::export::ExportTarget;
use crate::gate::{publish_allowed, recall_allowed, Phase};
use crate::session::SessionError;

/// What a volume name must be to name an export socket.
pub(super) fn valid_name(volume: &str) -> bool {
    !volume.is_empty() && !volume.contains('/') && !volume.contains('\0') && volume.len() <= 200
}

pub(super) fn find(volumes: &mut std::collections::BTreeMap<String, Volume>, id: AttachmentId) -> Option<&mut Volume> {
    volumes.values_mut().find(|v| v.id == id)
}

impl AgentCore {
    pub(super) fn attach(&mut self, now: Millis, caller: CallerId, spec: AttachSpec) {
        if let OpenWith::Restore(held) = spec.open {
            return self.restore(now, caller, super::RestoreSpec { held: *held, kernel: spec.kernel });
        }
        let name = spec.volume.clone();
        let refusal = if !valid_name(&name) {
            Some(AgentError::BadName(name.clone()))
        } else if let Some(v) = self.volumes.get(&name) {
            Some(match v.stage {
                Stage::Opening | Stage::Preparing => AgentError::Attaching(name.clone()),
                Stage::Attached => AgentError::AlreadyAttached(name.clone()),
                Stage::Detaching => AgentError::Detaching(name.clone()),
            })
        } else if self.stopping.is_some() {
            Some(AgentError::Session(SessionError::ShutDown))
        } else {
            None
        };
        if let Some(e) = refusal {
            return self.out.push(Effect::Reply { caller, reply: Reply::Failed(e) });
        }
        let Some(conn) = self.link.conn() else {
            let e = AgentError::Session(self.unreachable());
            return self.out.push(Effect::Reply { caller, reply: Reply::Failed(e) });
        };
        let export = match (spec.tcp, spec.socket) {
            (Some(addr), _) => ExportTarget::Tcp(addr),
            (None, Some(path)) => ExportTarget::Unix(path),
            (None, None) => ExportTarget::Unix(self.config.export_dir.join(format!("{name}.sock"))),
        };
        self.next_attachment += 1;
        let id = AttachmentId(self.next_attachment);
        let message = match &spec.open {
            OpenWith::Mode(mode) => Request::Open { volume: name.clone(), mode: *mode },
            OpenWith::Handover(token) => Request::OpenHandover { token: token.clone() },
            OpenWith::Restore(_) => unreachable!("handled above"),
        };
        let timeout = Some(super::open_wait::OPEN_TIMEOUT_MS);
        self.requests.send(&mut self.out, conn, now, message, timeout, Purpose::Open { attachment: id });
        self.volumes.insert(
            name.clone(),
            Volume {
                id,
                name,
                stage: Stage::Opening,
                open: spec.open,
                export,
                kernel: spec.kernel,
                handle: None,
                caller: Some(caller),
                export_uri: None,
                locks: spec.locks,
                lock_table: Default::default(),
                recovery: None,
                locking: None,
            },
        );
    }

    /// The answer to an attach's `Open`.
    pub(super) fn opened(
        &mut self,
        now: Millis,
        pending: &Pending,
        id: AttachmentId,
        result: Result<Response, RequestError>,
    ) {
        let Some(v) = find(&mut self.volumes, id) else {
            // The attach gave up waiting (`open_wait`): a handle opened
            // after all is closed at once, so none is left behind.
            if let Ok(Response::Opened(o)) = result {
                let (volume, handle) = (o.description.name, o.handle.0);
                info!(volume, handle, "the open was answered after the attach gave up: closing the handle");
                self.track_close(now, &volume, handle);
                self.send_close_now(now, handle, None, CloseOutcome::Detached);
            }
            return;
        };
        let (name, caller) = (v.name.clone(), v.caller.take());
        let what = if matches!(v.open, OpenWith::Handover(_)) { "OpenHandover" } else { "Open" };
        let opened = match result {
            Ok(Response::Opened(o)) => o,
            Ok(other) => {
                self.volumes.remove(&name);
                let e = SessionError::Unexpected { request: what, response: format!("{other:?}") };
                return self.reply_to(caller, Reply::Failed(AgentError::Session(e)));
            }
            Err(e) => {
                self.volumes.remove(&name);
                return self.reply_to(caller, Reply::Failed(AgentError::Session(e.to_session_error())));
            }
        };
        let handle = opened.handle.0;
        let undo = if self.stopping.is_some() {
            Some(AgentError::Session(SessionError::ShutDown))
        } else if opened.description.name != name {
            Some(AgentError::Session(SessionError::Server(format!(
                "the handover token is for volume {}, not {name}",
                opened.description.name
            ))))
        } else {
            None
        };
        let wants_locks = !self.volumes[&name].locks.is_empty();
        let undo = undo.or_else(|| {
            (wants_locks && opened.mode != OpenMode::SharedWrite).then(|| {
                AgentError::Session(SessionError::Server(format!(
                    "volume {name} is open {}: byte-range locks need --mode shared",
                    opened.mode
                )))
            })
        });
        if let Some(e) = undo {
            self.volumes.remove(&name);
            return self.send_close(now, caller, &name, handle, CloseOutcome::Undone(e));
        }
        let v = self.volumes.get_mut(&name).expect("found above");
        v.caller = caller;
        if wants_locks {
            let message = Request::Lock { handle: opened.handle, ranges: v.locks.clone() };
            self.requests.send(&mut self.out, pending.conn, now, message, None, Purpose::Lock { attachment: id });
            self.renewed(pending.conn, pending.sent_ms, opened.lease_ms);
            let v = self.volumes.get_mut(&name).expect("found above");
            v.locking = Some(Box::new((opened, pending.sent_ms, pending.conn)));
            return;
        }
        self.start_opened(id, &name, opened, pending.sent_ms, pending.conn);
    }

    /// The answer to the `Lock` an attach sends after its open: on success
    /// the attach goes on with the lock table installed; a refusal closes
    /// the handle and fails the attach with the server's message.
    pub(super) fn locked(&mut self, now: Millis, id: AttachmentId, result: Result<Response, RequestError>) {
        let Some(v) = find(&mut self.volumes, id) else { return };
        let name = v.name.clone();
        let Some(stash) = v.locking.take() else { return };
        let (opened, sent_ms, conn) = *stash;
        let handle = opened.handle.0;
        let table = match result {
            Ok(Response::Locked(table)) => table,
            Ok(other) => {
                let caller = self.volumes.remove(&name).and_then(|v| v.caller);
                let e = SessionError::Unexpected { request: "Lock", response: format!("{other:?}") };
                return self.send_close(now, caller, &name, handle, CloseOutcome::Undone(AgentError::Session(e)));
            }
            Err(e) => {
                let caller = self.volumes.remove(&name).and_then(|v| v.caller);
                warn!(volume = name, handle, error = ?e, "range locks refused; closing the handle");
                let e = AgentError::Session(e.to_session_error());
                return self.send_close(now, caller, &name, handle, CloseOutcome::Undone(e));
            }
        };
        self.start_opened(id, &name, opened, sent_ms, conn);
        if let Some(v) = self.volumes.get_mut(&name) {
            v.lock_table = table.clone();
        }
        self.out.push(Effect::Locks { attachment: id, table });
    }

    /// The open of attachment `id` succeeded (and its locks, if it asked
    /// for any): records the handle and starts the attach task.
    fn start_opened(
        &mut self,
        id: AttachmentId,
        name: &str,
        opened: volume_format::control::messages::OpenedHandle,
        sent_ms: Millis,
        conn: ConnId,
    ) {
        let name = name.to_string();
        let handle = opened.handle.0;
        let v = self.volumes.get_mut(&name).expect("the caller found it");
        // A handover's target writes next to its source until the source
        // lets go: the server copies the pre-images (see `crate::cow`).
        let cow_by_server = matches!(v.open, OpenWith::Handover(_));
        let description = opened.description;
        let generation = description.layout_generation;
        let lease_until_ms = sent_ms + opened.lease_ms;
        v.handle = Some(Handle {
            held: HeldHandle {
                volume: name.clone(),
                handle,
                mode: opened.mode,
                resume_key: opened.resume_key,
                pool_uuid: description.pool_uuid,
                export: v.export.clone(),
                kernel_device: None,
                pending_recall: None,
                devices: description.devices.clone(),
                cow_by_server,
            },
            gate: GateMirror { phase: Phase::Open, generation, size_bytes: description.size_bytes },
            conn,
            lease_until_ms,
            recovery: Recovery::Idle,
            confirm: Confirm::default(),
        });
        checked_stage(&name, &mut v.stage, Stage::Preparing);
        info!(volume = name, handle, mode = %opened.mode, generation, "volume opened");
        self.out.push(Effect::StartAttach {
            attachment: id,
            volume: name.clone(),
            handle,
            mode: opened.mode,
            description: Box::new(description),
            lease_until_ms,
            export: v.export.clone(),
            kernel: v.kernel.clone(),
            cow_by_server,
            resumed: false,
        });
        self.renewed(conn, sent_ms, opened.lease_ms);
        self.replay_orphans(handle);
    }

    /// The attach task finished.
    pub(super) fn prepared(&mut self, now: Millis, id: AttachmentId, result: Result<Prepared, AgentError>) {
        let Some(v) = find(&mut self.volumes, id) else { return };
        if v.stage != Stage::Preparing {
            return warn!(volume = v.name, stage = ?v.stage, "an attach task reported for an attachment not preparing");
        }
        let name = v.name.clone();
        match result {
            Ok(p) => {
                checked_stage(&name, &mut v.stage, Stage::Attached);
                let h = v.handle.as_mut().expect("a preparing attachment has a handle");
                h.held.kernel_device = p.kernel_device;
                if let ExportTarget::Tcp(addr) = &mut h.held.export {
                    // Port 0 picked one: a restarted agent serves on the same.
                    if addr.port() == 0 {
                        if let Some(port) = p.export_uri.parse::<blockio::uri::NbdUri>().ok().and_then(|u| u.port()) {
                            addr.set_port(port);
                            v.export = h.held.export.clone();
                        }
                    }
                }
                info!(volume = name, handle = h.held.handle, uri = p.export_uri, "volume attached");
                v.export_uri = Some(p.export_uri);
                let caller = v.caller.take();
                let info = AttachmentInfo { kernel_note: p.kernel_note, ..self.info(now, &self.volumes[&name]) };
                self.reply_to(caller, Reply::Attached(Box::new(info)));
                if self.stopping.is_some() {
                    self.leave_and_detach(&name);
                }
            }
            Err(e) => {
                let v = self.volumes.remove(&name).expect("found above");
                let handle = v.handle.expect("a preparing attachment has a handle").held.handle;
                self.out.push(Effect::Forget { attachment: id });
                self.send_close(now, v.caller, &name, handle, CloseOutcome::Undone(e));
            }
        }
    }

    pub(super) fn detach(&mut self, caller: CallerId, volume: &str) {
        let refusal = match self.volumes.get(volume).map(|v| v.stage) {
            None => Some(AgentError::NotAttached(volume.to_string())),
            Some(Stage::Opening | Stage::Preparing) => Some(AgentError::Attaching(volume.to_string())),
            Some(Stage::Detaching) => Some(AgentError::Detaching(volume.to_string())),
            Some(Stage::Attached) => None,
        };
        match refusal {
            Some(e) => self.out.push(Effect::Reply { caller, reply: Reply::Failed(e) }),
            None => self.start_detach(volume, Some(caller)),
        }
    }

    fn start_detach(&mut self, volume: &str, caller: Option<CallerId>) {
        let v = self.volumes.get_mut(volume).expect("the caller checked it is attached");
        checked_stage(volume, &mut v.stage, Stage::Detaching);
        let h = v.handle.as_ref().expect("an attached volume has a handle");
        let revoked = matches!(h.gate.phase, Phase::Revoked { .. });
        v.caller = caller;
        self.out.push(Effect::StartDetach { attachment: v.id, flush: !revoked && h.held.mode != OpenMode::ReadOnly });
    }

    /// Shutdown: the kernel device stays connected for the next agent.
    pub(super) fn leave_and_detach(&mut self, volume: &str) {
        let v = self.volumes.get_mut(volume).expect("the caller checked it is attached");
        let h = v.handle.as_mut().expect("an attached volume has a handle");
        if let Some(index) = h.held.kernel_device.take() {
            info!(
                volume,
                device = crate::kernel::device_path(index),
                "leaving the kernel device connected for the next agent"
            );
            self.out.push(Effect::LeaveKernelConnected { attachment: v.id });
        }
        self.start_detach(volume, None);
    }

    /// The detach task finished.
    pub(super) fn detached(&mut self, now: Millis, id: AttachmentId, result: Result<(), super::DetachFailure>) {
        let Some(v) = find(&mut self.volumes, id) else { return };
        if v.stage != Stage::Detaching {
            return warn!(volume = v.name, stage = ?v.stage, "a detach task reported for an attachment not detaching");
        }
        let name = v.name.clone();
        let caller = v.caller.take();
        let failure = match result {
            Ok(()) => None,
            Err(super::DetachFailure::Kernel(message)) => Some(AgentError::Kernel { volume: name.clone(), message }),
            Err(super::DetachFailure::Flush(message)) => {
                if let Some(h) = v.handle.as_mut() {
                    h.held.kernel_device = None;
                }
                Some(AgentError::FlushFailed { volume: name.clone(), message })
            }
            Err(super::DetachFailure::LeaveHandle(message)) => {
                let handle = v.handle.as_ref().map(|h| h.held.handle);
                warn!(
                    volume = name,
                    ?handle,
                    error = %message,
                    "detached without closing the handle: it runs out at the metadata server, which copies those \
                     regions before the volume is opened again"
                );
                self.volumes.remove(&name);
                self.out.push(Effect::Forget { attachment: id });
                self.reply_to(caller, Reply::Done);
                return self.shutdown_progress();
            }
        };
        if let Some(e) = failure {
            if self.stopping.is_some() {
                // The process is going away: the handle's lease will run out at the server.
                warn!(volume = name, error = %e, "detaching at shutdown failed");
                self.volumes.remove(&name);
                self.out.push(Effect::Forget { attachment: id });
                return self.reply_to(caller, Reply::Failed(e));
            }
            checked_stage(&name, &mut v.stage, Stage::Attached);
            return self.reply_to(caller, Reply::Failed(e));
        }
        let v = self.volumes.remove(&name).expect("found above");
        self.out.push(Effect::Forget { attachment: id });
        let handle = v.handle.expect("a detaching attachment has a handle").held.handle;
        self.send_close(now, caller, &name, handle, CloseOutcome::Detached);
    }

    /// Closes `handle` at the server (already forgotten locally), then tells
    /// `caller` per `outcome`.
    fn send_close(&mut self, now: Millis, caller: Option<CallerId>, volume: &str, handle: u64, outcome: CloseOutcome) {
        let connected = self.link.conn().is_some();
        if connected || self.stopping.is_none() {
            // Retried until the server has it closed (see `closing`).
            self.track_close(now, volume, handle);
        }
        match connected {
            true => {
                self.send_close_now(now, handle, caller, outcome);
            }
            false => {
                let e = self.unreachable();
                let reply = match outcome {
                    CloseOutcome::Detached => {
                        if self.stopping.is_some() {
                            warn!(volume, handle, error = %e, "cannot close the handle at shutdown");
                        }
                        Reply::Failed(AgentError::Session(e))
                    }
                    CloseOutcome::Undone(original) => {
                        warn!(volume, handle, error = %e, "closing the handle after a failed attach failed");
                        Reply::Failed(original)
                    }
                };
                self.reply_to(caller, reply);
                self.shutdown_progress();
            }
        }
    }

    pub(super) fn closed(
        &mut self,
        caller: Option<CallerId>,
        volume: &str,
        outcome: CloseOutcome,
        result: Result<Response, RequestError>,
    ) {
        let reply = match (outcome, result) {
            (CloseOutcome::Undone(e), result) => {
                if let Err(close) = result {
                    warn!(volume, error = ?close, "closing the handle after a failed attach failed");
                }
                Reply::Failed(e)
            }
            (CloseOutcome::Detached, Ok(_)) => {
                info!(volume, "volume detached");
                Reply::Done
            }
            // Already gone at the server (revoked, broken): closed is closed.
            (CloseOutcome::Detached, Err(RequestError::Server(e))) if e.code == ErrorCode::NotFound => {
                info!(volume, "volume detached");
                Reply::Done
            }
            (CloseOutcome::Detached, Err(e)) => Reply::Failed(AgentError::Session(e.to_session_error())),
        };
        self.reply_to(caller, reply);
    }

    pub(super) fn reply_to(&mut self, caller: Option<CallerId>, reply: Reply) {
        if let Some(caller) = caller {
            self.out.push(Effect::Reply { caller, reply });
        }
    }

    pub(super) fn list(&self, now: Millis) -> Vec<AttachmentInfo> {
        self.volumes.values().filter(|v| v.listed()).map(|v| self.info(now, v)).collect()
    }

    /// A listing line (the I/O counters are the shell's to fill in).
    fn info(&self, now: Millis, v: &Volume) -> AttachmentInfo {
        let h = v.handle.as_ref().expect("a listed volume has a handle");
        let lease_expired = now >= h.lease_until_ms;
        AttachmentInfo {
            volume: v.name.clone(),
            mode: h.held.mode.to_string(),
            handle: h.held.handle,
            export_uri: v.export_uri.clone().unwrap_or_default(),
            size_bytes: h.gate.size_bytes,
            layout_generation: h.gate.generation,
            state: h.gate.phase.word(lease_expired).to_string(),
            state_detail: match &h.gate.phase {
                Phase::Open if lease_expired => "the lease ran out; I/O is held until it is renewed".to_string(),
                Phase::Open => String::new(),
                phase => phase.to_string(),
            },
            io_in_flight: 0,
            io_waiting: 0,
            kernel_device: h.held.kernel_device.map(crate::kernel::device_path),
            kernel_note: None,
            cache: None,
            locks: v
                .lock_table
                .holders
                .iter()
                .flat_map(|l| {
                    let mine = if l.handle.0 == h.held.handle { " (this handle)" } else { "" };
                    l.ranges.iter().map(move |r| format!("{r} by {} (handle {}){mine}", l.holder, l.handle))
                })
                .collect(),
            recovery: v.recovery.as_ref().map(|r| r.to_string()).unwrap_or_default(),
            writes_behind: 0,
        }
    }

    /// Asks for a handover token. The shell has switched the volume's
    /// copy-on-write to server copies first (the target may write as soon
    /// as it holds the token; see `crate::cow`); the state file records it
    /// before the request leaves, so a restart keeps it.
    pub(super) fn handover(&mut self, now: Millis, caller: CallerId, volume: &str, to_key: [u8; 32]) {
        let handle = self.volumes.get_mut(volume).filter(|v| v.has_gate()).and_then(|v| v.handle.as_mut());
        let Some(handle) = handle.map(|h| {
            h.held.cow_by_server = true;
            h.held.handle
        }) else {
            let e = SessionError::Server(format!("volume {volume} is not attached here"));
            return self.out.push(Effect::Reply { caller, reply: Reply::Failed(AgentError::Session(e)) });
        };
        self.save_state();
        let Some(conn) = self.link.conn() else {
            let e = AgentError::Session(self.unreachable());
            return self.out.push(Effect::Reply { caller, reply: Reply::Failed(e) });
        };
        let message = Request::Handover { handle: HandleId(handle), to_key };
        self.requests.send(&mut self.out, conn, now, message, None, Purpose::Handover { caller });
    }

    pub(super) fn shutdown(&mut self, caller: CallerId) {
        if self.link.is_stopped() {
            return self.out.push(Effect::Reply { caller, reply: Reply::Done });
        }
        let first = self.stopping.is_none();
        self.stopping.get_or_insert_with(Vec::new).push(caller);
        if first {
            self.leave_restores();
            let attached: Vec<String> =
                self.volumes.values().filter(|v| v.stage == Stage::Attached).map(|v| v.name.clone()).collect();
            for volume in attached {
                self.leave_and_detach(&volume);
            }
        }
        self.shutdown_progress();
    }

    /// Once shutting down and nothing is left: close the connection and stop.
    pub(super) fn shutdown_progress(&mut self) {
        let Some(callers) = &self.stopping else { return };
        if !self.volumes.is_empty() || self.requests.closes_in_flight() || self.link.is_stopped() {
            return;
        }
        let callers = callers.clone();
        if let Some(conn) = self.link.stop() {
            self.out.push(Effect::Disconnect { conn });
        }
        self.registrations.fail_all(&mut self.out, "the agent is shutting down");
        for caller in callers {
            self.out.push(Effect::Reply { caller, reply: Reply::Done });
        }
        self.out.push(Effect::Stopped);
    }

    /// Routes one server event to its handle, or keeps it for a handle not
    /// registered yet.
    pub(super) fn event(&mut self, now: Millis, _conn: ConnId, event: ServerEvent) {
        let handle = super::event_handle(&event);
        let known =
            self.volumes.values().any(|v| v.has_gate() && v.handle.as_ref().is_some_and(|h| h.held.handle == handle));
        if !known && matches!(event, ServerEvent::Recall { .. }) && self.recall_of_closing(now, handle) {
            return;
        }
        if !known {
            if self.orphans.len() >= ORPHAN_EVENTS_MAX {
                self.orphans.pop_front();
            }
            debug!(handle, "event for a handle not registered (yet); keeping it");
            self.orphans.push_back(event);
            return;
        }
        self.apply_event(event);
    }

    pub(super) fn replay_orphans(&mut self, handle: u64) {
        let (mine, others): (Vec<ServerEvent>, Vec<ServerEvent>) =
            self.orphans.drain(..).partition(|e| super::event_handle(e) == handle);
        self.orphans = others.into();
        for event in mine {
            debug!(handle, "replaying an event that arrived before the handle was registered");
            self.apply_event(event);
        }
    }

    fn apply_event(&mut self, event: ServerEvent) {
        let handle = super::event_handle(&event);
        let Some(v) = self
            .volumes
            .values_mut()
            .find(|v| v.has_gate() && v.handle.as_ref().is_some_and(|h| h.held.handle == handle))
        else {
            return;
        };
        let (id, name) = (v.id, v.name.clone());
        let h = v.handle.as_mut().expect("checked above");
        match event {
            ServerEvent::Recall { generation, .. } => {
                info!(volume = name, handle, generation, "recall: draining I/O");
                if let Err(e) = recall_allowed(&h.gate.phase, h.gate.generation, generation) {
                    return warn!(volume = name, handle, generation, error = %e, "cannot recall");
                }
                checked_phase(&name, &mut h.gate.phase, Phase::Recalled { generation });
                h.held.pending_recall = Some(PendingRecall { generation, drained: false, confirmed: false });
                h.confirm = Confirm { in_flight: h.confirm.in_flight, ..Confirm::default() };
                self.out.push(Effect::BeginRecall { attachment: id, generation });
            }
            ServerEvent::Publish { description, .. } => {
                let generation = description.layout_generation;
                if let Err(e) = publish_allowed(&h.gate.phase, h.gate.generation, generation) {
                    return warn!(volume = name, handle, generation, error = %e, "ignoring published layout");
                }
                checked_phase(&name, &mut h.gate.phase, Phase::Open);
                h.gate.generation = generation;
                h.gate.size_bytes = description.size_bytes;
                h.held.pending_recall = None;
                info!(volume = name, handle, generation, "new layout published; I/O resumes");
                self.out.push(Effect::Publish { attachment: id, description, context: PublishContext::Event });
            }
            ServerEvent::Revoked { reason, .. } => {
                warn!(volume = name, handle, %reason, "handle revoked by the metadata server");
                self.revoke(id, reason);
            }
            ServerEvent::Locks { locks, .. } => {
                info!(volume = name, handle, holders = locks.holders.len(), "the volume's range locks changed");
                v.lock_table = locks.clone();
                self.out.push(Effect::Locks { attachment: id, table: locks });
            }
            ServerEvent::Recovery { status, .. } => {
                match &status {
                    Some(s) => info!(volume = name, handle, "the server copies the volume: {s}"),
                    None => info!(volume = name, handle, "the server's copy of the volume is over"),
                }
                v.recovery = status;
            }
            // Handled by the core before events reach volumes.
            ServerEvent::Redirect { .. } => {}
        }
    }

    /// Fails the volume's held and later I/O with `reason`.
    pub(super) fn revoke(&mut self, id: AttachmentId, reason: String) {
        let Some(v) = find(&mut self.volumes, id) else { return };
        let Some(h) = v.handle.as_mut() else { return };
        if h.gate.phase == Phase::Closed {
            return;
        }
        checked_phase(&v.name, &mut h.gate.phase, Phase::Revoked { reason: reason.clone() });
        self.out.push(Effect::Revoke { attachment: id, reason });
    }

    pub(super) fn layout_rejected(&mut self, id: AttachmentId, context: PublishContext, reason: String) {
        let reason = match context {
            PublishContext::Event => {
                error!(attachment = id.0, %reason, "the published layout is unusable");
                format!("the metadata server published an unusable layout: {reason}")
            }
            PublishContext::Resume => format!("the layout after resuming is unusable: {reason}"),
            PublishContext::Reopen => format!("could not re-open after reconnecting: {reason}"),
        };
        self.revoke(id, reason);
    }

    /// Starts bringing every handle that lives on an older connection over
    /// to the live one (those not already on their way, and not revoked).
    pub(super) fn recover(&mut self, now: Millis) {
        let Some(conn) = self.link.conn() else { return };
        for v in self.volumes.values_mut() {
            if !v.has_gate() {
                continue;
            }
            let h = v.handle.as_mut().expect("has_gate");
            if h.conn == conn || h.recovery != Recovery::Idle || matches!(h.gate.phase, Phase::Revoked { .. }) {
                continue;
            }
            let (message, purpose, recovery) = if !h.held.resume_key.is_empty() {
                (
                    Request::Resume { key: h.held.resume_key.clone() },
                    Purpose::Resume { attachment: v.id },
                    Recovery::Resuming,
                )
            } else {
                let message = Request::Close { handle: HandleId(h.held.handle) };
                (message, Purpose::CloseOld { attachment: v.id }, Recovery::ClosingOld)
            };
            h.recovery = recovery;
            self.requests.send(&mut self.out, conn, now, message, None, purpose);
        }
        self.send_restores(now);
    }

    pub(super) fn resumed(
        &mut self,
        now: Millis,
        pending: &Pending,
        id: AttachmentId,
        result: Result<Response, RequestError>,
    ) {
        let Some(v) = find(&mut self.volumes, id) else { return };
        let name = v.name.clone();
        let Some(h) = v.handle.as_mut() else { return };
        h.recovery = Recovery::Idle;
        let handle = h.held.handle;
        match result {
            Ok(Response::Opened(opened)) if opened.handle.0 == handle => {
                let generation = opened.description.layout_generation;
                // The server follows a resume with the recall in progress,
                // and its event may overtake the answer: a gate recalled for
                // a newer generation stays recalled (and its confirmation
                // owed); the answer's layout is the one being replaced.
                let recalled_ahead = matches!(h.gate.phase, Phase::Recalled { generation: g } if g > generation);
                if generation != h.gate.generation && !recalled_ahead {
                    if let Err(e) = publish_allowed(&h.gate.phase, h.gate.generation, generation) {
                        let reason = format!("the layout after resuming is unusable: {e}");
                        return self.revoke(id, reason);
                    }
                    checked_phase(&name, &mut h.gate.phase, Phase::Open);
                    h.gate.generation = generation;
                    h.gate.size_bytes = opened.description.size_bytes;
                    h.held.pending_recall = None;
                    let description = Box::new(opened.description);
                    self.out.push(Effect::Publish { attachment: id, description, context: PublishContext::Resume });
                }
                let until = pending.sent_ms + opened.lease_ms;
                h.lease_until_ms = until;
                h.conn = pending.conn;
                // A confirmation the old connection lost goes out on this one.
                h.confirm = Confirm { in_flight: h.confirm.in_flight, ..Confirm::default() };
                self.out.push(Effect::RenewLease { attachment: id, until_ms: until });
                info!(volume = name, handle, "handle resumed after reconnecting: unchanged");
                self.registrations.retry_volume_now(&name, now);
            }
            Ok(other) => warn!(volume = name, handle, "unexpected answer to Resume: {other:?}; retrying"),
            Err(RequestError::Server(e)) if e.code == ErrorCode::Unavailable => {
                info!(volume = name, handle, reason = %e.message, "cannot resume yet; I/O stays held, retrying");
            }
            // A standby (or a server that just lost the lease) answered: the
            // link moves on to the next address; the handle is resumed there.
            Err(RequestError::Server(e)) if e.code == ErrorCode::NotActive => {
                info!(volume = name, handle, reason = %e.message, "that server is not active; I/O stays held, resuming at the active one");
            }
            Err(RequestError::Server(e)) => {
                // Broken (another client has the volume), closed, or a key
                // the server does not accept: writing on would be unsafe.
                error!(volume = name, handle, reason = %e.message, "the metadata server refused the resume; failing the volume's I/O");
                self.revoke(id, e.message);
            }
            Err(e) => warn!(volume = name, handle, error = ?e, "resuming failed; retrying"),
        }
    }

    /// The old handle's close (before a re-open) was answered, whatever it said.
    pub(super) fn closed_old(&mut self, now: Millis, id: AttachmentId) {
        let conn = self.link.conn();
        let Some(v) = find(&mut self.volumes, id) else { return };
        let Some(h) = v.handle.as_mut() else { return };
        let Some(conn) = conn else {
            h.recovery = Recovery::Idle;
            return;
        };
        h.recovery = Recovery::Reopening;
        let message = Request::Open { volume: v.name.clone(), mode: h.held.mode };
        self.requests.send(&mut self.out, conn, now, message, None, Purpose::Reopen { attachment: id });
    }

    pub(super) fn reopened(
        &mut self,
        now: Millis,
        pending: &Pending,
        id: AttachmentId,
        result: Result<Response, RequestError>,
    ) {
        let Some(v) = find(&mut self.volumes, id) else { return };
        let name = v.name.clone();
        let Some(h) = v.handle.as_mut() else { return };
        h.recovery = Recovery::Idle;
        let old_handle = h.held.handle;
        match result {
            Ok(Response::Opened(opened)) => {
                let generation = opened.description.layout_generation;
                if let Err(e) = publish_allowed(&h.gate.phase, h.gate.generation, generation) {
                    return self.revoke(id, format!("could not re-open after reconnecting: {e}"));
                }
                checked_phase(&name, &mut h.gate.phase, Phase::Open);
                h.gate.generation = generation;
                h.gate.size_bytes = opened.description.size_bytes;
                h.held.pending_recall = None;
                h.held.handle = opened.handle.0;
                h.held.resume_key = opened.resume_key;
                h.conn = pending.conn;
                let until = pending.sent_ms + opened.lease_ms;
                h.lease_until_ms = until;
                let description = Box::new(opened.description);
                self.out.push(Effect::Publish { attachment: id, description, context: PublishContext::Reopen });
                self.out.push(Effect::RenewLease { attachment: id, until_ms: until });
                info!(volume = name, old_handle, handle = opened.handle.0, "re-opened after reconnecting");
                self.replay_orphans(opened.handle.0);
                self.registrations.retry_volume_now(&name, now);
            }
            Err(RequestError::Server(e))
                if matches!(e.code, ErrorCode::Conflict | ErrorCode::Unavailable | ErrorCode::NotActive) =>
            {
                info!(volume = name, reason = %e.message, "cannot re-open yet; I/O stays held, retrying");
            }
            Err(RequestError::Server(e)) => {
                self.revoke(id, format!("re-opening after reconnecting was refused: {}", e.message));
            }
            Ok(other) => warn!(volume = name, "unexpected answer to Open: {other:?}"),
            Err(e) => warn!(volume = name, error = ?e, "re-opening after reconnecting failed; retrying"),
        }
    }
}
