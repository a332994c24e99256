//! Byte-range locks on shared volumes: `Request::Lock` and telling a
//! volume's holders its lock table.
//!
//! Why here and so small: the rule (who conflicts with whom) is
//! [`volume_format::locks::LockTable`], applied again when the change is
//! applied ([`MetaChange::RangeLocks`]), and the locks live in the pool
//! metadata with their handle, so they survive a restart and end with the
//! handle (close, break, removal: the handle's lease and durable rules).
//! What this module adds is the request's checks and, after every commit
//! that changed a volume's table, one [`ServerEvent::Locks`] per holder so
//! each agent refuses writes into the others' locks.

use tracing::info;
use volume_format::control::messages::{ErrorCode, OpenMode, Response, ServerEvent};
use volume_format::locks::{LockError, LockRange, LOCK_RANGES_PER_HANDLE_MAX};
use volume_format::metadata::MetaChange;
use volume_format::{HandleId, VolumeId};

use super::core::{AfterCommit, Core, Step};
use super::requests::{done, err};
use crate::handles::SessionId;

impl Core {
    /// `Request::Lock`: sets the locks of the shared-write `handle` held on
    /// `session`, refused when another handle holds any of those bytes.
    pub(super) fn prepare_lock(
        &mut self,
        session: SessionId,
        handle: u64,
        ranges: Vec<LockRange>,
        reply: super::core::ReplyId,
    ) -> Step {
        let h = match self.handles.get(handle) {
            Some(h) if h.held_by(session) => h,
            _ => {
                let msg = format!("handle {handle} is not open on this session");
                return done(reply, Err(err(ErrorCode::NotFound, msg)));
            }
        };
        if h.mode != OpenMode::SharedWrite {
            let msg = format!(
                "handle {handle} is open {}: byte-range locks are for shared-write handles; attach with --mode shared",
                h.mode
            );
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        if self.removing().contains(&handle) || self.revoked.contains(&handle) {
            let msg = format!("handle {handle} is being released; it can take no locks");
            return done(reply, Err(err(ErrorCode::HandleBroken, msg)));
        }
        if ranges.len() > LOCK_RANGES_PER_HANDLE_MAX {
            let msg = format!("{} lock ranges; at most {LOCK_RANGES_PER_HANDLE_MAX} per handle", ranges.len());
            return done(reply, Err(err(ErrorCode::InvalidArgument, msg)));
        }
        let (volume, holder) = (VolumeId(h.volume), h.holder.clone());
        let Some(record) = self.meta.volume(volume) else {
            return done(reply, Err(err(ErrorCode::NotFound, format!("volume {volume} does not exist"))));
        };
        let mut table = self.meta.lock_table(volume);
        let sorted = match table.check_request(volume, record.size_bytes, HandleId(handle), &ranges) {
            Ok(sorted) => sorted,
            Err(e @ LockError::Conflict { .. }) => return done(reply, Err(err(ErrorCode::Conflict, e.to_string()))),
            Err(e) => return done(reply, Err(err(ErrorCode::InvalidArgument, e.to_string()))),
        };
        info!(volume = record.name, handle, holder, ranges = ?sorted, "range locks");
        table.set(HandleId(handle), &holder, sorted.clone());
        let changes = vec![MetaChange::RangeLocks { handle: HandleId(handle), ranges: sorted }];
        Step::Commit { changes, then: AfterCommit::Respond { reply, response: Box::new(Response::Locked(table)) } }
    }

    /// After a resume (an agent restarted, or reconnected to a restarted
    /// server): tells the holder its volume's lock table, if it has one, so
    /// a new run of the agent enforces the others' locks at once.
    pub(super) fn tell_lock_table(&mut self, session: SessionId, handle: HandleId, volume: VolumeId) {
        let locks = self.meta.lock_table(volume);
        if !locks.holders.is_empty() {
            // Later changes are compared with what was told (a restarted
            // server starts with nothing told).
            self.lock_tables_told.insert(volume, locks.clone());
            self.send_event(session, ServerEvent::Locks { handle, locks });
        }
    }

    /// After a commit: tells every holder of a volume whose lock table
    /// changed (a lock taken or released, a locking handle closed, broken
    /// or removed) the new table.
    pub(super) fn tell_lock_tables(&mut self, changes: &[MetaChange]) {
        let touches_locks = changes.iter().any(|c| {
            matches!(
                c,
                MetaChange::RangeLocks { .. } | MetaChange::HandleBreak { .. } | MetaChange::HandleRemove { .. }
            )
        });
        if !touches_locks {
            return;
        }
        let volumes: Vec<VolumeId> = self.meta.volumes.iter().map(|v| v.id).collect();
        for volume in volumes {
            let table = self.meta.lock_table(volume);
            let told = self.lock_tables_told.get(&volume);
            if told == Some(&table) || (told.is_none() && table.holders.is_empty()) {
                continue;
            }
            let holders: Vec<_> = self.handles.on_volume(volume.0).cloned().collect();
            for h in &holders {
                let event = ServerEvent::Locks { handle: HandleId(h.id), locks: table.clone() };
                self.send_handle_event(h, event);
            }
            if table.holders.is_empty() {
                self.lock_tables_told.remove(&volume);
            } else {
                self.lock_tables_told.insert(volume, table);
            }
        }
    }
}
