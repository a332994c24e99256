//! The mirror lane: a cache holder's appends and releases go from its
//! session's reader task straight to the volume's mirror worker, and the
//! worker's answer straight to the session's writer task — not through the
//! session loop, the owner loop and back (three task hand-offs less per
//! mirrored write, each worth tens of µs of a QD1 write on a 2-core host;
//! bench/README.md).
//!
//! Why it decides what the owner's path decides: the owner publishes,
//! after every input and before it performs that input's effects, which
//! `(session, handle)` may write which volume's mirror
//! ([`Holders`]: `Core::mirror_holders`, the same checks as
//! `Core::mirror_holder`, empty while the server is not active or in its
//! grace period). The worker checks every lane request against the
//! publication when it *takes* the request, not when the reader routed it.
//! Every owner request to a worker (start afresh, replay, remove) is queued
//! after the publication of the state that led to it, so a lane request
//! taken after such a request is checked against that state or a newer
//! one: a stale holder's append can never land in the next holder's mirror
//! nor after a replay. A lane request taken before it is one the owner's
//! path would have forwarded before it as well.
//!
//! What the owner's path did besides: it renewed the session's handles on
//! every request. The lane does not; an agent renews by its own `Renew`
//! requests and believes only their answers, so the server's view of a
//! lease stays at or beyond the agent's. The reader routes a request to the
//! lane only while the pool lease lets the server answer (the owner's shell
//! checks the same at every request) and only requests within the size
//! limits; everything else takes the owner's path, which answers it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc::{self, error::TrySendError};
use volume_format::control::messages::{ControlError, ErrorCode, Request, ServerMessage};
use volume_format::{HandleId, VolumeId};

use super::{append_size_error, MirrorOp, MirrorReply, MirrorWork};
use crate::handles::SessionId;
use crate::server::lease_task::LeaseGuard;

/// Which `(session, handle)` may write which volume's mirror.
pub type Holders = HashMap<(SessionId, u64), VolumeId>;

/// What the owner publishes and the sessions' readers and the workers read.
pub struct Lanes {
    holders: RwLock<Arc<Holders>>,
    /// The volumes' workers (the owner's shell starts them).
    pub(super) workers: Mutex<HashMap<VolumeId, mpsc::Sender<MirrorWork>>>,
    /// `None` in tests without a pool lease.
    guard: Option<Arc<LeaseGuard>>,
}

impl Lanes {
    pub fn new(guard: Option<Arc<LeaseGuard>>) -> Arc<Lanes> {
        Arc::new(Lanes { holders: RwLock::default(), workers: Mutex::default(), guard })
    }

    /// The owner's publication (a no-op when nothing changed).
    pub fn publish(&self, holders: Holders) {
        let mut current = self.holders.write().unwrap_or_else(|e| e.into_inner());
        if **current != holders {
            *current = Arc::new(holders);
        }
    }

    /// The volume whose mirror `handle` on `session` may write, if any.
    pub fn holder(&self, session: SessionId, handle: u64) -> Option<VolumeId> {
        self.holders.read().unwrap_or_else(|e| e.into_inner()).get(&(session, handle)).copied()
    }

    /// Routes request `id` of `session` to its volume's mirror worker when
    /// it is a holder's append or release the lane may take; otherwise
    /// gives it back for the owner's path. The answer goes to `out`.
    pub fn route(
        &self,
        session: SessionId,
        id: u64,
        request: Request,
        out: &mpsc::Sender<ServerMessage>,
    ) -> Result<(), Request> {
        let (handle, op) = match request {
            Request::MirrorAppend { handle, records } => {
                if append_size_error(&records).is_some() {
                    return Err(Request::MirrorAppend { handle, records });
                }
                (handle, MirrorOp::Append { records })
            }
            Request::MirrorRelease { handle, upto_seq } => (handle, MirrorOp::Release { upto_seq }),
            other => return Err(other),
        };
        let back = |op| match op {
            MirrorOp::Append { records } => Request::MirrorAppend { handle, records },
            MirrorOp::Release { upto_seq } => Request::MirrorRelease { handle, upto_seq },
            _ => unreachable!("built above"),
        };
        if self.guard.as_ref().is_some_and(|g| g.refusal().is_some()) {
            return Err(back(op));
        }
        let Some(volume) = self.holder(session, handle.0) else { return Err(back(op)) };
        let Some(worker) = self.workers.lock().unwrap_or_else(|e| e.into_inner()).get(&volume).cloned() else {
            return Err(back(op));
        };
        let reply = MirrorReply::Lane(LaneReply { session, handle, id, out: out.downgrade() });
        match worker.try_send(MirrorWork { op, reply }) {
            Ok(()) => Ok(()),
            // A full queue answers "retry", as the owner's path does.
            Err(TrySendError::Full(work)) => {
                let msg = format!(
                    "the cache mirror of volume {volume} has {} requests queued; retry",
                    super::MIRROR_QUEUED_MAX
                );
                work.reply.send(Err(ControlError::new(ErrorCode::Unavailable, msg)));
                Ok(())
            }
            // The worker ended: the owner's path starts another.
            Err(TrySendError::Closed(work)) => Err(back(work.op)),
        }
    }
}

/// Where a lane request's answer goes, and whose it is.
#[derive(Debug)]
pub struct LaneReply {
    pub session: SessionId,
    pub handle: HandleId,
    pub id: u64,
    pub out: mpsc::WeakSender<ServerMessage>,
}

impl LaneReply {
    /// Queues the answer for the session's writer (a full queue is waited
    /// for on a task of its own; a session that ended hears nothing).
    pub fn send(self, result: Result<volume_format::control::messages::Response, ControlError>) {
        let Some(out) = self.out.upgrade() else { return };
        match out.try_send(ServerMessage::Reply { id: self.id, result }) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(message)) => {
                tokio::spawn(async move {
                    let _ = out.send(message).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;
    use volume_format::control::messages::{MirrorRecord, Response};
    use volume_format::metadata::{CacheMode, VolumeCache};

    use super::*;
    use crate::server::snapshot_io::DeviceClients;

    const VOLUME: VolumeId = VolumeId(3);
    const SESSION: SessionId = 11;
    const HANDLE: u64 = 5;

    fn append(seq: u64, len: usize) -> Request {
        Request::MirrorAppend {
            handle: HandleId(HANDLE),
            records: vec![MirrorRecord { seq, offset: 0, data: vec![7; len] }],
        }
    }

    /// A worker of `VOLUME` with its mirror started, reachable by the lane.
    async fn started(dir: &std::path::Path) -> Arc<Lanes> {
        let lanes = Lanes::new(None);
        let worker = super::super::worker::spawn(
            dir.to_path_buf(),
            DeviceClients::default(),
            VOLUME,
            lanes.clone(),
            Default::default(),
        );
        let cache = VolumeCache { volume: VOLUME, size_bytes: 1 << 20, mode: CacheMode::Mirrored };
        let (tx, rx) = oneshot::channel();
        let op = MirrorOp::Prepare { cache, generation: 1, staged: None };
        worker.send(MirrorWork { op, reply: MirrorReply::Owner(tx) }).await.unwrap();
        assert!(matches!(rx.await.unwrap(), Ok(Response::Done)));
        let (tx, rx) = oneshot::channel();
        let op = MirrorOp::Open { cache, generation: 1 };
        worker.send(MirrorWork { op, reply: MirrorReply::Owner(tx) }).await.unwrap();
        assert!(matches!(rx.await.unwrap(), Ok(Response::MirrorOpened { .. })));
        lanes.workers.lock().unwrap().insert(VOLUME, worker);
        lanes
    }

    async fn answer(out: &mut mpsc::Receiver<ServerMessage>) -> (u64, Result<Response, ControlError>) {
        match tokio::time::timeout(Duration::from_secs(10), out.recv()).await {
            Ok(Some(ServerMessage::Reply { id, result })) => (id, result),
            other => panic!("no answer on the writer's queue: {other:?}"),
        }
    }

    async fn held_records(lanes: &Lanes) -> u64 {
        let worker = lanes.workers.lock().unwrap().get(&VOLUME).cloned().unwrap();
        let (tx, rx) = oneshot::channel();
        let known = volume_format::control::messages::CacheStateInfo {
            cache: None,
            holder: None,
            mirroring: false,
            held_records: 0,
            held_bytes: 0,
        };
        worker.send(MirrorWork { op: MirrorOp::Status { known }, reply: MirrorReply::Owner(tx) }).await.unwrap();
        match rx.await.unwrap() {
            Ok(Response::VolumeCacheState(state)) => state.held_records,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holder_s_append_is_answered_straight_to_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let lanes = started(dir.path()).await;
        let (out, mut queued) = mpsc::channel(8);
        // Not published as a holder (yet): the owner's path gets it back.
        assert!(matches!(lanes.route(SESSION, 1, append(1, 4096), &out), Err(Request::MirrorAppend { .. })));
        lanes.publish(Holders::from([((SESSION, HANDLE), VOLUME)]));
        lanes.route(SESSION, 2, append(1, 4096), &out).unwrap();
        assert_eq!(answer(&mut queued).await, (2, Ok(Response::Mirrored { upto_seq: 1 })));
        lanes.route(SESSION, 3, Request::MirrorRelease { handle: HandleId(HANDLE), upto_seq: 1 }, &out).unwrap();
        assert_eq!(answer(&mut queued).await, (3, Ok(Response::Done)));
        assert_eq!(held_records(&lanes).await, 0);
        // Another session, another handle, an oversized append, another
        // request: all the owner's.
        assert!(lanes.route(SESSION + 1, 4, append(2, 4096), &out).is_err());
        let other = Request::MirrorAppend { handle: HandleId(HANDLE + 1), records: Vec::new() };
        assert!(lanes.route(SESSION, 5, other, &out).is_err());
        let records = (0..=volume_format::control::messages::MIRROR_APPEND_RECORDS_MAX as u64)
            .map(|seq| MirrorRecord { seq: seq + 2, offset: 0, data: vec![1; 512] })
            .collect();
        let oversized = Request::MirrorAppend { handle: HandleId(HANDLE), records };
        assert!(lanes.route(SESSION, 6, oversized, &out).is_err());
        assert!(matches!(lanes.route(SESSION, 7, Request::Renew, &out), Err(Request::Renew)));
        assert!(queued.try_recv().is_err(), "nothing else was answered");
    }

    /// The race the worker's own check is for: the reader routed an append
    /// while its handle was a holder, the owner then took the handle away
    /// (and may have queued a replay or the next holder's start): the
    /// worker refuses the append and the mirror does not hold it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_request_is_checked_when_the_worker_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let lanes = started(dir.path()).await;
        let (out, mut queued) = mpsc::channel(8);
        lanes.publish(Holders::from([((SESSION, HANDLE), VOLUME)]));
        let worker = lanes.workers.lock().unwrap().get(&VOLUME).cloned().unwrap();
        // Routed, as far as the reader goes, but not taken yet.
        let reply =
            MirrorReply::Lane(LaneReply { session: SESSION, handle: HandleId(HANDLE), id: 9, out: out.downgrade() });
        let Request::MirrorAppend { records, .. } = append(1, 4096) else { unreachable!() };
        let work = MirrorWork { op: MirrorOp::Append { records }, reply };
        lanes.publish(Holders::new());
        worker.send(work).await.unwrap();
        let (id, result) = answer(&mut queued).await;
        assert_eq!(id, 9);
        assert_eq!(result.unwrap_err().code, ErrorCode::HandleBroken);
        assert_eq!(held_records(&lanes).await, 0, "the refused append is not in the mirror");
    }

    /// A session that ended hears nothing, and the worker goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_to_a_session_that_ended_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let lanes = started(dir.path()).await;
        lanes.publish(Holders::from([((SESSION, HANDLE), VOLUME)]));
        let (out, queued) = mpsc::channel(8);
        lanes.route(SESSION, 1, append(1, 4096), &out).unwrap();
        drop((out, queued));
        assert_eq!(held_records(&lanes).await, 1, "written all the same");
    }
}
