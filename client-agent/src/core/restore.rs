//! Taking back, after a restart, the handles a previous run of this agent
//! held: resumed with the resume keys its state file kept, and served again
//! as they were (the same export socket or TCP port, the same kernel device).
//!
//! Why resume instead of re-opening: a re-open is refused while the old
//! handle holds the volume — its lease plus the server's durable time, 40 s
//! with the defaults — so a restarted agent used to wait for itself while
//! applications (and kernel devices) waited for it. A resume is answered at
//! once: "unchanged" when nobody else had the volume, else who had it (the
//! handle was broken), and then the volume is not served again at all: its
//! data may have changed under whatever the previous run's users cached.
//!
//! The shell decides beforehand what to do with the handle's kernel device
//! (reconnect the same `/dev/nbdX`, connect it afresh, or nothing) and
//! passes it in [`RestoreSpec::kernel`]; from the resume on, a restore is an
//! attach ([`super::Stage::Preparing`], the attach task, `Prepared`) whose
//! handle and gate come from the resume instead of an open.
//!
//! A pending recall in the record starts the gate recalled for that
//! generation (unless the resume already returns that layout or a newer one),
//! and the agent drains (nothing to drain in a new process) and confirms
//! again: the previous run may have confirmed it, after which the server may
//! commit the new layout at any moment, so the old one must not be used even
//! for a moment. The server follows every resume with the recall still in
//! progress or, if there is none, with the current layout, which reopens
//! the gate.
//!
//! "Not now" (the server's grace period) and transport errors are retried
//! like any resume (at the next connection or renewal tick); the record stays
//! in the state file until the handle is taken back or refused.

use tracing::{error, info, warn};
use volume_format::control::messages::{Request, Response};

use super::state::{checked_stage, Confirm, GateMirror, Handle, PendingRecall, Recovery, Volume};
use super::{
    answers_later, AgentCore, AttachmentId, CallerId, Effect, Millis, OpenWith, Pending, Purpose, Reply, RequestError,
    RestoreSpec, Stage,
};
use crate::agent::AgentError;
use crate::gate::Phase;
use crate::session::SessionError;

impl AgentCore {
    pub(super) fn restore(&mut self, now: Millis, caller: CallerId, spec: RestoreSpec) {
        let name = spec.held.volume.clone();
        let refusal = if !super::volumes::valid_name(&name) {
            Some(AgentError::BadName(name.clone()))
        } else if self.volumes.contains_key(&name) {
            Some(AgentError::AlreadyAttached(name.clone()))
        } else if self.stopping.is_some() {
            Some(AgentError::Session(SessionError::ShutDown))
        } else if spec.held.resume_key.is_empty() {
            Some(AgentError::Session(SessionError::Server(format!(
                "volume {name}: the state file has no resume key for handle {}; attach it again",
                spec.held.handle
            ))))
        } else {
            None
        };
        if let Some(e) = refusal {
            return self.out.push(Effect::Reply { caller, reply: Reply::Failed(e) });
        }
        self.next_attachment += 1;
        let id = AttachmentId(self.next_attachment);
        info!(volume = name, handle = spec.held.handle, "taking back a handle the previous run held");
        self.volumes.insert(
            name.clone(),
            Volume {
                id,
                name,
                stage: Stage::Opening,
                export: spec.held.export.clone(),
                open: OpenWith::Restore(Box::new(spec.held)),
                kernel: spec.kernel,
                handle: None,
                caller: Some(caller),
                export_uri: None,
                locks: Vec::new(),
                lock_table: Default::default(),
                recovery: None,
                locking: None,
            },
        );
        self.send_restores(now);
    }

    /// Sends the resume of every handle being taken back that has none in
    /// flight (on connecting, and on every renewal tick after "not now").
    pub(super) fn send_restores(&mut self, now: Millis) {
        let Some(conn) = self.link.conn() else { return };
        let due: Vec<(AttachmentId, Vec<u8>)> = self
            .volumes
            .values()
            .filter(|v| v.stage == Stage::Opening)
            .filter_map(|v| match &v.open {
                OpenWith::Restore(held) => Some((v.id, held.resume_key.clone())),
                _ => None,
            })
            .filter(|(id, _)| !self.requests.in_flight(&Purpose::Restore { attachment: *id }))
            .collect();
        for (attachment, key) in due {
            self.requests.send(
                &mut self.out,
                conn,
                now,
                Request::Resume { key },
                None,
                Purpose::Restore { attachment },
            );
        }
    }

    /// The answer to a restore's resume.
    pub(super) fn restored(
        &mut self,
        now: Millis,
        pending: &Pending,
        id: AttachmentId,
        result: Result<Response, RequestError>,
    ) {
        let Some(v) = self.volumes.values_mut().find(|v| v.id == id) else { return };
        let OpenWith::Restore(held) = &v.open else { return };
        let mut held = (**held).clone();
        let name = v.name.clone();
        if self.stopping.is_some() && !matches!(&result, Err(RequestError::Server(e)) if !answers_later(e)) {
            // Still ours, whatever the answer was: the next run takes it back.
            let v = self.volumes.remove(&name).expect("found above");
            self.successor.push(held);
            self.reply_to(v.caller, Reply::Failed(AgentError::Session(SessionError::ShutDown)));
            return self.shutdown_progress();
        }
        let opened = match result {
            Ok(Response::Opened(o))
                if o.handle.0 == held.handle
                    && o.description.pool_uuid == held.pool_uuid
                    && o.description.name == held.volume =>
            {
                o
            }
            Ok(other) => {
                let e = SessionError::Unexpected { request: "Resume", response: format!("{other:?}") };
                return self.restore_failed(&name, AgentError::Session(e));
            }
            Err(RequestError::Server(e)) if answers_later(&e) => {
                return info!(volume = name, reason = %e.message, "cannot take the handle back yet; retrying");
            }
            Err(RequestError::Server(e)) => {
                // Broken (another client had the volume), closed, or a key
                // the server does not accept: serving it again would be unsafe.
                error!(volume = name, handle = held.handle, reason = %e.message, "the metadata server refused to give the previous run's handle back; the volume is not served");
                return self.restore_failed(&name, AgentError::Session(SessionError::Server(e.message)));
            }
            Err(e) => return warn!(volume = name, error = ?e, "taking the handle back failed; retrying"),
        };
        let description = opened.description;
        let generation = description.layout_generation;
        let recalled = held.pending_recall.filter(|p| p.generation > generation).map(|p| p.generation);
        held.pending_recall = recalled.map(|generation| PendingRecall { generation, drained: false, confirmed: false });
        if !opened.resume_key.is_empty() {
            held.resume_key = opened.resume_key;
        }
        held.devices = description.devices.clone();
        let handle = held.handle;
        let mode = held.mode;
        let cow_by_server = held.cow_by_server;
        let lease_until_ms = pending.sent_ms + opened.lease_ms;
        let phase = match recalled {
            Some(generation) => Phase::Recalled { generation },
            None => Phase::Open,
        };
        let v = self.volumes.get_mut(&name).expect("found above");
        v.handle = Some(Handle {
            held,
            gate: GateMirror { phase, generation, size_bytes: description.size_bytes },
            conn: pending.conn,
            lease_until_ms,
            recovery: Recovery::Idle,
            confirm: Confirm::default(),
        });
        checked_stage(&name, &mut v.stage, Stage::Preparing);
        info!(volume = name, handle, generation, "the previous run's handle resumed: unchanged");
        self.out.push(Effect::StartAttach {
            attachment: id,
            volume: name.clone(),
            handle,
            mode,
            description: Box::new(description),
            lease_until_ms,
            export: v.export.clone(),
            kernel: v.kernel.clone(),
            cow_by_server,
            resumed: true,
        });
        if let Some(generation) = recalled {
            info!(
                volume = name,
                handle,
                generation,
                "the previous run was recalled: the gate stays closed until the layout is published"
            );
            self.out.push(Effect::BeginRecall { attachment: id, generation });
        }
        self.renewed(pending.conn, pending.sent_ms, opened.lease_ms);
        self.replay_orphans(handle);
        self.registrations.retry_volume_now(&name, now);
    }

    fn restore_failed(&mut self, name: &str, e: AgentError) {
        let Some(v) = self.volumes.remove(name) else { return };
        self.reply_to(v.caller, Reply::Failed(e));
        self.shutdown_progress();
    }

    /// At shutdown: handles still being taken back stay the next run's
    /// (those with a resume in flight are settled by its answer).
    pub(super) fn leave_restores(&mut self) {
        let waiting: Vec<String> = self
            .volumes
            .values()
            .filter(|v| v.stage == Stage::Opening && matches!(v.open, OpenWith::Restore(_)))
            .filter(|v| !self.requests.in_flight(&Purpose::Restore { attachment: v.id }))
            .map(|v| v.name.clone())
            .collect();
        for name in waiting {
            let v = self.volumes.remove(&name).expect("listed above");
            if let OpenWith::Restore(held) = v.open {
                self.successor.push(*held);
            }
            self.reply_to(v.caller, Reply::Failed(AgentError::Session(SessionError::ShutDown)));
        }
    }
}
