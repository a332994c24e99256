//! The metadata server's mirror of agents' write-back caches (issue 15).
//!
//! An agent holding a volume with a mirrored cache acknowledges a write only
//! once it is durable in its own cache log *and* here: if the agent dies,
//! the server writes every mirrored write not yet released to the devices,
//! in order, before anyone may open the volume again.
//!
//! Shape: the owner loop never touches a mirror file. It checks that a
//! mirror request comes from the session holding the volume's exclusive
//! handle and passes it on ([`Mirrors::send`], a map lookup and a queue
//! push); one worker task per volume ([`worker`]) does the file I/O (an
//! append on its own runtime thread while the disk is fast: [`inline`]) and
//! answers the agent directly. Appends that are queued together are written
//! together: one write and one fdatasync for all of them (group commit). Requests of one volume are handled in the order
//! they arrive, so a replay queued after an append sees it.
//!
//! A holder's appends and releases take a shorter way: from its session's
//! reader straight to the worker, checked there against what the owner
//! published ([`lane`]).
//!
//! - [`store`]: one volume's mirror file (blocking, testable without a
//!   server).
//! - [`worker`]: the per-volume task: batching, waiting for space, replay.
//! - [`inline`]: where an append's synchronous write runs, and when it
//!   stops running inline (a slow disk, a one-thread runtime).
//! - [`replay`]: what a replay writes — the records' final bytes as large,
//!   disjoint writes sent together, not one record after another.
//! - [`lane`]: the holders' way to their worker, and why it is as safe as
//!   the owner's.
//! - [`fetch`]: a copy of a mirror recorded at another server, fetched from
//!   it when it stands by (a holder that died right after a handoff).

pub mod fetch;
pub mod inline;
pub mod lane;
pub mod replay;
pub mod store;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use volume_format::control::messages::{
    CacheStateInfo, ControlError, ErrorCode, MirrorRecord, Response, MIRROR_APPEND_BYTES_MAX, MIRROR_APPEND_RECORDS_MAX,
};
use volume_format::metadata::{CacheMirrorRecord, PoolMetadata, VolumeCache};
use volume_format::VolumeId;

use crate::server::snapshot_io::DeviceClients;

/// Requests queued per volume before the agent is told to retry: an agent
/// has at most four appends (pipelined, client-agent's
/// `MIRROR_APPENDS_IN_FLIGHT_MAX`) and one release in flight per volume, so
/// only a misbehaving client gets near it.
pub const MIRROR_QUEUED_MAX: usize = 64;

/// What the owner asks of a volume's mirror.
#[derive(Debug)]
pub enum MirrorOp {
    /// Make the file of `generation` *before* the owner commits that
    /// generation to the pool metadata: started afresh (empty) — or, with
    /// `staged` (an attempt and its record count), the staged file of that
    /// attempt ([`MirrorOp::Stage`]) if it is whole. Answered `Done`; the
    /// file is not written to until [`MirrorOp::Open`]. So a committed
    /// generation always has its file: a missing one was lost, never "not
    /// created yet" (a server that died between the commit and the file's
    /// creation left a volume nobody could open — simulator seeds
    /// 128124716596664, 123708996430583). Safe to do before the commit:
    /// the holder asks only once what the previous generation's file holds
    /// is on the devices (a fresh start) or staged (a staged start), and a
    /// replay that finds the next generation's file prepared here replays
    /// it instead ([`MirrorOp::Replay`]).
    Prepare {
        cache: VolumeCache,
        generation: u64,
        staged: Option<(u64, u64)>,
    },
    /// `generation` is committed: mirror into the file prepared for it.
    Open {
        cache: VolumeCache,
        generation: u64,
    },
    /// Records for the next generation, into a staged file no replay reads
    /// (`Request::MirrorStage`): a `copy` other than the staged file's
    /// starts it afresh, `size_bytes` large.
    Stage {
        copy: u64,
        size_bytes: u64,
        records: Vec<MirrorRecord>,
    },
    Append {
        records: Vec<MirrorRecord>,
    },
    Release {
        upto_seq: u64,
    },
    /// Write everything the mirror holds to the volume's devices, in order
    /// (the holder is gone), if the `expected` record names this server
    /// (`named_here`) and the file is of its generation (`None`: a pool that
    /// recorded none: whatever the file holds) — or of the generation after
    /// it: prepared here and never committed ([`MirrorOp::Prepare`]), it
    /// holds what the expected one held and the devices lack
    /// ([`replayable`]). Answered `Done` or with why not (another server
    /// holds that generation).
    /// `source`: where the record's server can be reached when it is not
    /// this one — the file is then fetched from it ([`fetch`]) and the copy
    /// replayed.
    Replay {
        meta: std::sync::Arc<PoolMetadata>,
        expected: Option<CacheMirrorRecord>,
        named_here: bool,
        source: Option<fetch::MirrorSource>,
    },
    /// The volume has no cache any more (or no longer exists): delete the
    /// file. Only once nothing is held.
    Remove,
    /// What `sanvol volume show` shows: `known` (what the owner knows)
    /// completed with the mirror's own state, answered
    /// [`Response::VolumeCacheState`].
    Status {
        known: CacheStateInfo,
    },
}

/// Where a mirror request's answer goes: to the owner's path (a oneshot
/// the session or the owner waits on), or, for a lane request, straight to
/// the session's writer ([`lane::LaneReply`], which also says whose it is).
#[derive(Debug)]
pub enum MirrorReply {
    Owner(oneshot::Sender<Result<Response, ControlError>>),
    Lane(lane::LaneReply),
}

impl MirrorReply {
    pub fn send(self, result: Result<Response, ControlError>) {
        match self {
            MirrorReply::Owner(tx) => {
                let _ = tx.send(result);
            }
            MirrorReply::Lane(lane) => lane.send(result),
        }
    }
}

/// Whether a mirror file of generation `held` may be replayed for a record
/// of generation `expected`, which names this server (`named_here`) or
/// another: only a file of the named server — of that generation, or of the
/// next one, prepared there for a commit that did not happen
/// ([`MirrorOp::Prepare`]). Any other file is stale, or not this
/// generation's.
///
/// A file of the same generation on a server the record does not name is
/// stale too: generations are numbered by the pool's record, so a server
/// that prepared generation 2 and lost the lease before committing it left
/// a file of "generation 2", and the next active server prepared and
/// committed its own generation 2, which took the holder's writes. Replaying
/// the first file recorded the volume as replayed without them (simulator
/// seed 260647906676046).
pub fn replayable(held: Option<u64>, expected: u64, named_here: bool) -> bool {
    named_here && (held == Some(expected) || held == expected.checked_add(1))
}

/// What this server's file is, in the refusal of a replay that
/// [`replayable`] rejected: `held` is the file's generation, `expected` and
/// `server` the record's.
pub fn not_replayable_here(held: Option<u64>, expected: u64, server: &str, path: &std::path::Path) -> String {
    match held {
        Some(g) if g == expected => format!(
            "this server's mirror file {} is of generation {g} too, but it was prepared here for a commit that did \
             not happen and holds none of the writes {server} mirrored (if {server} is this server under an earlier \
             name, set that `name` in mds.toml again)",
            path.display()
        ),
        Some(g) => format!("this server's mirror file {} is of generation {g}", path.display()),
        None => format!("this server has no mirror file of it ({})", path.display()),
    }
}

/// Why an append is refused for its size (`None`: within the limits).
pub fn append_size_error(records: &[MirrorRecord]) -> Option<String> {
    let bytes: usize = records.iter().map(|r| r.data.len()).sum();
    (records.len() > MIRROR_APPEND_RECORDS_MAX || bytes > MIRROR_APPEND_BYTES_MAX).then(|| {
        format!(
            "a mirror append carries at most {MIRROR_APPEND_RECORDS_MAX} records and {MIRROR_APPEND_BYTES_MAX} bytes \
             (this one: {} records, {bytes} bytes)",
            records.len()
        )
    })
}

#[derive(Debug)]
pub struct MirrorWork {
    pub op: MirrorOp,
    pub reply: MirrorReply,
}

/// A volume's replay as it runs, shared by its worker (which writes it)
/// and [`Mirrors`] (which reads it): a worker busy replaying answers
/// nothing else until it is done — possibly many minutes behind slow
/// devices — and `sanvol volume show` must not wait for that.
#[derive(Debug, Default)]
pub struct ReplayProgress {
    running: std::sync::atomic::AtomicBool,
    records: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl ReplayProgress {
    /// A replay of `records` records of `bytes` in all started.
    pub fn started(&self, records: u64, bytes: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.records.store(records, SeqCst);
        self.bytes.store(bytes, SeqCst);
        self.running.store(true, SeqCst);
    }

    pub fn ended(&self) {
        self.running.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// `known` as a replay shows it: not mirroring, holding what it
    /// writes; `None` when no replay runs.
    fn status(&self, mut known: CacheStateInfo) -> Option<CacheStateInfo> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.running.load(SeqCst) {
            return None;
        }
        known.mirroring = false;
        known.held_records = self.records.load(SeqCst);
        known.held_bytes = self.bytes.load(SeqCst);
        Some(known)
    }
}

/// The per-volume workers, as the owner's shell holds them.
pub struct Mirrors {
    dir: PathBuf,
    /// Where replays write (the owner's job connections, lease-guarded).
    devices: DeviceClients,
    /// The workers and the published holders, shared with the sessions.
    lanes: Arc<lane::Lanes>,
    /// Each worker's replay, as it runs.
    replays: std::collections::HashMap<VolumeId, Arc<ReplayProgress>>,
}

impl Mirrors {
    pub fn new(dir: PathBuf, devices: DeviceClients, lanes: Arc<lane::Lanes>) -> Mirrors {
        Mirrors { dir, devices, lanes, replays: Default::default() }
    }

    /// Queues `work` for `volume`'s worker (started on first use). Never
    /// waits: a full queue answers "retry". A status asked while the worker
    /// replays is answered here, at once ([`ReplayProgress`]).
    pub fn send(&mut self, volume: VolumeId, work: MirrorWork) {
        let progress = self.replays.entry(volume).or_default().clone();
        let work = match work.op {
            MirrorOp::Status { known } => match progress.status(known.clone()) {
                Some(replaying) => return work.reply.send(Ok(Response::VolumeCacheState(replaying))),
                None => MirrorWork { op: MirrorOp::Status { known }, reply: work.reply },
            },
            _ => work,
        };
        let mut workers = self.lanes.workers.lock().unwrap_or_else(|e| e.into_inner());
        let worker = workers.entry(volume).or_insert_with(|| {
            worker::spawn(self.dir.clone(), self.devices.clone(), volume, self.lanes.clone(), progress)
        });
        match worker.try_send(work) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(work)) => {
                let msg = format!("the cache mirror of volume {volume} has {MIRROR_QUEUED_MAX} requests queued; retry");
                work.reply.send(Err(ControlError::new(ErrorCode::Unavailable, msg)));
            }
            Err(mpsc::error::TrySendError::Closed(work)) => {
                // The worker ended (it only does when its queue is dropped,
                // or it panicked): start another for the next request.
                workers.remove(&volume);
                let msg = format!("the cache mirror of volume {volume} stopped; retry");
                work.reply.send(Err(ControlError::new(ErrorCode::Unavailable, msg)));
            }
        }
    }

    /// What the owner publishes after every input: who may use the lane.
    pub fn publish(&self, holders: lane::Holders) {
        self.lanes.publish(holders);
    }
}

impl Drop for Mirrors {
    /// The owner stopped: nobody may use the lane, and the workers end
    /// once their queues are empty (their senders are dropped here).
    fn drop(&mut self) {
        self.lanes.publish(lane::Holders::new());
        self.lanes.workers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_servers_file_of_the_generation_or_the_next_is_replayable() {
        // The named server: its file of the generation, or of the next one
        // (prepared for a commit that did not happen).
        assert!(replayable(Some(2), 2, true));
        assert!(replayable(Some(3), 2, true));
        assert!(!replayable(Some(1), 2, true), "an older file is stale");
        assert!(!replayable(Some(4), 2, true));
        assert!(!replayable(None, 2, true));
        assert!(!replayable(Some(u64::MAX), u64::MAX - 1, false));
        // Any other server: never, not even a file of the same generation
        // (simulator seed 260647906676046).
        assert!(!replayable(Some(2), 2, false));
        assert!(!replayable(Some(3), 2, false));
    }

    #[test]
    fn a_refusal_says_what_the_file_here_is() {
        let path = std::path::Path::new("/m/volume-7.mirror");
        let same = not_replayable_here(Some(2), 2, "mds-b", path);
        assert!(same.contains("of generation 2 too") && same.contains("commit that did not happen"), "{same}");
        assert!(same.contains("writes mds-b mirrored"), "{same}");
        assert_eq!(
            not_replayable_here(Some(1), 2, "mds-b", path),
            "this server's mirror file /m/volume-7.mirror is of generation 1"
        );
        assert!(not_replayable_here(None, 2, "mds-b", path).starts_with("this server has no mirror file of it"));
    }
}
