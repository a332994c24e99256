//! Durable handles at the owner: resumes (after a reconnect or a server
//! restart, and duplicate handles on a second channel), handovers for live
//! migration, broken-handle records and the grace period's request filter.
//!
//! Why resumes need no commit: a resume changes nothing that must survive a
//! restart — the handle record is already in the pool metadata, and which
//! session holds it is connection state. So a resume is answered from memory
//! at once, which keeps the agent's I/O pause across a server restart short.
//!
//! Every refusal says what was wrong with the key or token and what to do;
//! none of them changes any state.

use tracing::{info, info_span};
use volume_format::control::messages::{ControlError, ErrorCode, OpenedHandle, Request, Response, ServerEvent};
use volume_format::metadata::{HandleRecord, HandleState, MetaChange, UsedToken};
use volume_format::{HandleId, PublicKey, VolumeDescription, VolumeId};

use super::core::{AfterCommit, Core, ReplyId, Step};
use crate::handles::{Handle, SessionId};
use crate::resume::{check_token_time, HandoverToken, ResumeKey, SignedResumeKey, HANDOVER_TOKEN_MS};

/// Broken-handle records kept to answer late resumes; beyond it the oldest
/// are forgotten (their agents are then told the handle is unknown).
pub const BROKEN_RECORDS_MAX: usize = 256;

fn err(code: ErrorCode, message: impl Into<String>) -> ControlError {
    ControlError::new(code, message)
}

/// Requests served during the grace period after a restart: resumes, the
/// lease and recall traffic of agents that resumed, closes, read-only
/// listings, and the fallback path of agents whose direct path is down (data
/// channels of handles in the pool, device-failure reports): an agent on
/// fallback must keep its I/O flowing through a server restart, not fail it.
/// Opens, handovers and admin changes wait.
pub fn allowed_in_grace(request: &Request) -> bool {
    matches!(
        request,
        Request::PoolStatus
            | Request::Renew
            | Request::Resume { .. }
            | Request::Close { .. }
            | Request::RecallDone { .. }
            | Request::DeviceList
            | Request::DeviceFencing
            | Request::ClientList
            | Request::VolumeList
            | Request::VolumeShow { .. }
            | Request::VolumeCacheShow { .. }
            | Request::VolumeCacheReport { .. }
            | Request::VolumeCacheMirror { .. }
            // Volatile, and only from a holder (resumed, in the grace period).
            | Request::CacheReport { .. }
            | Request::Operations
            | Request::SnapshotList { .. }
            | Request::DataChannel { .. }
            | Request::ReportDeviceFailure { .. }
            | Request::ReportDeviceRecovered { .. }
            // A resumed handle reconnects to its fencing devices with them.
            | Request::Capabilities { .. }
            // Only a resumed handle can register: its writes are waiting.
            | Request::CowRegister { .. }
            | Request::CowCopy { .. }
            | Request::IntentRecord { .. }
            | Request::IntentResync { .. }
    )
}

/// "14:03:07Z" for a Unix time in seconds.
pub fn hms(unix_secs: u64) -> String {
    let s = unix_secs % 86_400;
    format!("{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// How a handle record reads in listings: "active", "disconnected, reserved
/// for a resume until …", "broken: …".
pub fn record_state_text(core: &Core, record: &HandleRecord) -> String {
    match &record.state {
        HandleState::Broken { reason, since_unix_secs } => format!("broken at {}: {reason}", hms(*since_unix_secs)),
        HandleState::Active => match core.handles.get(record.id.0) {
            Some(h) if h.session != 0 => "active".into(),
            Some(h) if core.grace.as_ref().is_some_and(|g| g.waiting.contains(&h.id)) => {
                format!(
                    "in grace, awaiting resume until {}",
                    core.now.describe(h.breakable_at_ms(core.handles.device_request_max_ms))
                )
            }
            Some(h) => {
                format!(
                    "disconnected, reserved for a resume until {}",
                    core.now.describe(h.breakable_at_ms(core.handles.device_request_max_ms))
                )
            }
            None => "active".into(),
        },
    }
}

impl Core {
    /// The resume key for committed handle `id`; empty if it has no record
    /// (cannot happen after a successful commit).
    pub fn resume_key_for(&self, id: u64) -> Vec<u8> {
        let Some(r) = self.meta.handles.iter().find(|r| r.id.0 == id) else { return Vec::new() };
        ResumeKey {
            pool: *self.meta.pool_uuid.as_bytes(),
            handle: id,
            volume: r.volume.0,
            opened_at_unix_secs: r.opened_at_unix_secs,
            agent_key: r.agent_key.0,
            agent_instance: *r.agent_instance.as_bytes(),
            mode: r.mode,
        }
        .sign(&self.key)
    }

    fn volume_name(&self, id: u64) -> String {
        self.meta.volume(VolumeId(id)).map_or_else(|| format!("#{id}"), |v| v.name.clone())
    }

    fn opened_reply(&self, handle: &Handle, resume_key: Vec<u8>) -> Result<Response, ControlError> {
        let description = VolumeDescription::from_metadata(&self.meta, VolumeId(handle.volume)).map_err(|e| {
            err(ErrorCode::Internal, format!("describing volume {}: {e}", self.volume_name(handle.volume)))
        })?;
        Ok(Response::Opened(OpenedHandle {
            handle: volume_format::HandleId(handle.id),
            mode: handle.mode,
            description,
            lease_ms: self.lease_ms,
            resume_key,
        }))
    }

    /// `Request::Resume`: re-attaches `session` to the handle the key names.
    pub fn resume(&mut self, session: SessionId, key: &[u8]) -> Result<Response, ControlError> {
        let Some(peer) = self.sessions.get(&session).cloned() else {
            return Err(err(ErrorCode::Unavailable, "session is closing"));
        };
        let claims = ResumeKey::verify(key, &self.key.verifying_key())
            .map_err(|e| err(ErrorCode::PermissionDenied, format!("resume key refused: {e}")))?;
        let _span = info_span!("resume", handle = claims.handle, volume = claims.volume).entered();
        if claims.pool != *self.meta.pool_uuid.as_bytes() {
            return Err(err(ErrorCode::PermissionDenied, "resume key refused: it was issued for another pool"));
        }
        if claims.agent_key != peer.key {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!(
                    "resume key refused: it was issued to agent key {}, not this session's key; only the agent that \
                     opened a handle can resume it (use a handover token to move it)",
                    PublicKey(claims.agent_key)
                ),
            ));
        }
        if claims.agent_instance != peer.instance {
            return Err(err(
                ErrorCode::PermissionDenied,
                "resume key refused: it was issued to another run of this agent; open the volume again",
            ));
        }
        let volume = self.volume_name(claims.volume);
        let Some(record) = self.meta.handles.iter().find(|r| r.id.0 == claims.handle).cloned() else {
            return Err(err(
                ErrorCode::NotFound,
                format!(
                    "resume key refused: handle {} of volume {volume} was closed or released, so the key is no longer \
                     valid; open the volume again",
                    claims.handle
                ),
            ));
        };
        if record.volume.0 != claims.volume
            || record.opened_at_unix_secs != claims.opened_at_unix_secs
            || record.agent_key.0 != claims.agent_key
            || record.mode != claims.mode
        {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!("resume key refused: it does not match handle {} as the pool records it", claims.handle),
            ));
        }
        if let HandleState::Broken { reason, since_unix_secs } = &record.state {
            return Err(err(
                ErrorCode::HandleBroken,
                format!(
                    "handle {} of volume {volume} was broken at {}: {reason}; this agent must not write to it any more",
                    claims.handle,
                    hms(*since_unix_secs)
                ),
            ));
        }
        // A handle a commit (or job) in flight is releasing, or whose holder
        // was told so, is not renewed by a resume either: the answer would
        // extend its lease at the agent while the release goes on.
        if self.removing().contains(&claims.handle) || self.revoked.contains(&claims.handle) {
            return Err(err(
                ErrorCode::HandleBroken,
                format!(
                    "handle {} of volume {volume} is being released (its lease ran out, or it was excluded from a \
                     reconfiguration); this agent must not write to it any more; open the volume again",
                    claims.handle
                ),
            ));
        }
        let now_ms = self.now.mono_ms;
        let Some(handle) = self.handles.resume(claims.handle, session, now_ms, self.lease_ms).cloned() else {
            return Err(err(ErrorCode::Internal, format!("handle {} is recorded but not in the table", claims.handle)));
        };
        if let Some(g) = self.grace.as_mut() {
            g.settled(handle.id);
        }
        let duplicate = handle.session != session;
        info!(holder = %peer.name, session, duplicate, "handle resumed: unchanged");
        self.opened_reply(&handle, key.to_vec())
    }

    /// Follows a resume answer on `session`: a recall in progress on the
    /// handle's volume is sent again (owed or already confirmed: a
    /// confirmation the agent repeats is counted once), and without one the
    /// current layout is published.
    ///
    /// Why always one or the other: an agent whose gate is recalled cannot
    /// tell from the answer alone whether the recall it confirmed is still in
    /// progress or over without a publish it could receive (abandoned when
    /// the server restarted, or finished while the publish went to a
    /// connection that had died). A publish of the current generation
    /// reopens such a gate; the recall keeps it closed.
    pub(super) fn after_resume(&mut self, session: SessionId, handle: HandleId) {
        match self.handles.recall_in_progress(handle.0) {
            Some(generation) => {
                let owed = self.handles.pending_recall(handle.0).is_some();
                info!(
                    handle = handle.0,
                    generation, owed, "the resumed handle's volume is being recalled: asking again"
                );
                self.send_event(session, ServerEvent::Recall { handle, generation });
            }
            None => {
                let Some(volume) = self.handles.get(handle.0).map(|h| h.volume) else { return };
                match VolumeDescription::from_metadata(&self.meta, VolumeId(volume)) {
                    Ok(description) => {
                        self.send_event(session, ServerEvent::Publish { handle, description: Box::new(description) })
                    }
                    Err(e) => tracing::warn!(handle = handle.0, "cannot describe the resumed handle's volume: {e}"),
                }
            }
        }
    }

    /// `Request::Handover`: a token for `to_key` to attach `handle`'s volume.
    pub fn handover(&mut self, session: SessionId, handle: u64, to_key: [u8; 32]) -> Result<Response, ControlError> {
        let Some(peer) = self.sessions.get(&session).cloned() else {
            return Err(err(ErrorCode::Unavailable, "session is closing"));
        };
        let Some(h) = self.handles.get(handle).filter(|h| h.held_by(session)).cloned() else {
            return Err(err(ErrorCode::NotFound, format!("handle {handle} is not open on this session")));
        };
        let authorized = self
            .meta
            .clients
            .iter()
            .any(|c| c.public_key.0 == to_key && c.role == volume_format::control::auth::Role::Agent);
        if !authorized {
            return Err(err(
                ErrorCode::NotFound,
                format!(
                    "key {} is not an authorized agent of this pool; authorize it (`sanvol client add`) first",
                    PublicKey(to_key)
                ),
            ));
        }
        let mut nonce = [0u8; 16];
        self.entropy.fill(&mut nonce);
        let issued_at_unix_ms = self.token_clock.now_ms(self.now.mono_ms);
        let token = HandoverToken {
            pool: *self.meta.pool_uuid.as_bytes(),
            handle,
            volume: h.volume,
            from_key: peer.key,
            to_key,
            mode: h.mode,
            issued_at_unix_ms,
            expires_at_unix_ms: issued_at_unix_ms + HANDOVER_TOKEN_MS,
            nonce,
        };
        info!(handle, volume = h.volume, to = %PublicKey(to_key), "handover token issued");
        Ok(Response::HandoverToken { token: token.sign(&self.key), expires_in_ms: HANDOVER_TOKEN_MS })
    }

    /// `Request::OpenHandover`: opens the token's volume next to its holder.
    pub(super) fn prepare_open_handover(&mut self, session: SessionId, token: &[u8], reply: ReplyId) -> Step {
        match self.open_handover_step(session, token, reply) {
            Ok(step) => step,
            Err(e) => Step::Done(Some((reply, Err(e)))),
        }
    }

    fn open_handover_step(&mut self, session: SessionId, token: &[u8], reply: ReplyId) -> Result<Step, ControlError> {
        let Some(peer) = self.sessions.get(&session).cloned() else {
            return Err(err(ErrorCode::Unavailable, "session is closing"));
        };
        let claims = HandoverToken::verify(token, &self.key.verifying_key())
            .map_err(|e| err(ErrorCode::PermissionDenied, format!("handover token refused: {e}")))?;
        if claims.pool != *self.meta.pool_uuid.as_bytes() {
            return Err(err(ErrorCode::PermissionDenied, "handover token refused: it was issued for another pool"));
        }
        if claims.to_key != peer.key {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!(
                    "handover token refused: it was issued to agent key {}, not this one",
                    PublicKey(claims.to_key)
                ),
            ));
        }
        let token_now = self.token_clock.now_ms(self.now.mono_ms);
        let refused = |why: String| err(ErrorCode::PermissionDenied, format!("handover token refused: {why}"));
        if self.meta.handovers.is_used(&claims.nonce) {
            return Err(refused(
                "the handover token was already used (tokens are single-use); ask the holder for a new one".into(),
            ));
        }
        if let Err(why) = check_token_time(&claims, token_now) {
            if token_now >= claims.expires_at_unix_ms && self.meta.handovers.clock_floor_unix_ms < token_now {
                // Expired here: the refusal commits the token clock first, so
                // that no server of the pool finds the token valid again,
                // whatever its clock says.
                if let Ok(change) = self.meta.plan_handover_tokens(token_now, None) {
                    let then = AfterCommit::Refuse { reply, error: refused(why) };
                    return Ok(Step::Commit { changes: vec![change], then });
                }
            }
            return Err(refused(why));
        }
        let used = UsedToken { nonce: claims.nonce, expires_at_unix_ms: claims.expires_at_unix_ms };
        let record_use = self
            .meta
            .plan_handover_tokens(token_now, Some(used))
            .map_err(|why| err(ErrorCode::Unavailable, format!("handover token refused: {why}")))?;
        let volume = self.volume_name(claims.volume);
        match self.handles.get(claims.handle) {
            Some(src) if src.volume == claims.volume && src.mode == claims.mode => {}
            _ => {
                return Err(err(
                    ErrorCode::NotFound,
                    format!(
                        "handover token refused: handle {} of volume {volume} it was issued from is no longer open \
                         (closed or broken), so there is nothing to hand over; open the volume instead",
                        claims.handle
                    ),
                ))
            }
        }
        if self.handles.recall_of(claims.volume).is_some() {
            return Err(err(
                ErrorCode::Unavailable,
                format!("volume {volume} is being reconfigured; retry in a moment"),
            ));
        }
        let now_ms = self.now.mono_ms;
        self.handles.set_next_id(self.meta.next_ids.handle.0);
        let Some(handle) = self.handles.open_alongside(claims.handle, session, &peer.name, now_ms, self.lease_ms)
        else {
            return Err(err(ErrorCode::Internal, "the source handle vanished"));
        };
        // The handle and the token's use in one commit: both or neither.
        let changes = vec![
            MetaChange::HandleOpen(HandleRecord {
                id: HandleId(handle.id),
                volume: VolumeId(handle.volume),
                agent_key: PublicKey(peer.key),
                agent_name: peer.name.clone(),
                agent_instance: uuid::Uuid::from_bytes(peer.instance),
                mode: handle.mode,
                opened_at_unix_secs: self.now.unix_secs(),
                lease_expires_at_unix_ms: self.now.unix_ms + self.lease_ms,
                durable_timeout_ms: handle.durable_ms,
                state: HandleState::Active,
            }),
            record_use,
        ];
        Ok(Step::Commit { changes, then: AfterCommit::Handover { claims: Box::new(claims), handle, reply } })
    }

    pub(super) fn finish_open_handover(
        &mut self,
        claims: HandoverToken,
        handle: Handle,
        reply: ReplyId,
        result: Result<(), ControlError>,
    ) {
        if let Err(e) = result {
            self.handles.remove(handle.id);
            return self.reply(reply, Err(e));
        }
        info!(handle = handle.id, from = claims.handle, holder = %handle.holder, "volume attached with a handover token");
        let key = self.resume_key_for(handle.id);
        let result = self.opened_reply(&handle, key);
        self.reply(reply, result);
    }
}
