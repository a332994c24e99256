//! Client-side copy-on-write for snapshots.
//!
//! While a volume has a snapshot (the newest one is in its description,
//! [`SnapshotEpoch`]), every write, TRIM or WRITE_ZEROES first makes sure
//! each chunk it touches is **preserved**: the chunk's current bytes are
//! copied into the snapshot's COW area (every leg, FUA) and the chunk is
//! registered at the metadata server, which commits it to the snapshot's COW
//! map before answering. Only then does the write go to the volume. So at
//! every instant each chunk of the snapshot is either unregistered and
//! unmodified in the live volume, or registered with its pre-image in the
//! COW area — whatever crashes when (the agent between copy and register,
//! or between register and overwrite; the server before or after its
//! commit), every snapshot stays readable and correct:
//! - crash after the copy, before the registration: the chunk is
//!   unregistered and the live volume unmodified; the copy is just ignored;
//! - crash after the registration, before the overwrite: registered, and
//!   the COW area holds the pre-image;
//! - registration lost with a server crash: the agent retries it after it
//!   has resumed its handle (registrations are idempotent), and the write
//!   waits.
//!
//! **Concurrency.** A chunk is preserved once: the first write to reach it
//! copies it; later writes to the same chunk wait for that copy's outcome
//! ([`CowState`] tracks chunks in progress). The state is per snapshot and
//! lives in the volume device, not in a layout, so a layout republished in
//! the middle (a device failure) cannot make two writers copy one chunk.
//!
//! **Batching.** A request registers every chunk it touches at once (a
//! 1 MiB write: 16 chunks, one round trip), and registrations from
//! concurrent writers are merged into one request while one is in flight
//! (group commit, [`Registrations`]); a sequential 4 KiB writer pays one
//! round trip per 64 KiB chunk, not per block. Why no read-ahead (preserving
//! chunks a sequential writer has not reached yet): the COW map is also the
//! changed-block list of incremental backups, and chunks registered ahead
//! but never written would show as changed.
//!
//! **While a volume has more than one writer** no agent may copy pre-images
//! itself: another writer may have registered and overwritten a chunk
//! between this agent's check and its copy, and the copy would then put new
//! data over the snapshot's pre-image in the COW area — before the server
//! hears of it, so nothing there could refuse it. Such holders ask the
//! server to copy (`CowCopy`), which it does serialized with every
//! registration (and the server refuses an agent's own copies while a
//! volume has two writers). Shared-write holders always do; an exclusive
//! holder switches when it hands the volume over ([`Registrations::use_server_copies`]
//! waits for its copies in flight, so none is still reading when the target
//! may write), and the handover's target copies through the server for as
//! long as it holds that handle.
//!
//! Fault points (`SANVOL_FAULT`): `agent-after-cow-copy`,
//! `agent-after-cow-register`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use blockio::IoError;
use futures::future::join_all;
use tokio::sync::{oneshot, watch, RwLock, RwLockReadGuard};
use volume_format::description::SnapshotEpoch;
use volume_format::metadata::CowMap;

/// Most chunks in one registration request.
pub const REGISTRATION_CHUNKS_MAX: usize = 4096;

/// Registers preserved chunks at the metadata server.
#[async_trait]
pub trait CowRegistrar: Send + Sync + 'static {
    /// Commits `chunks` of `snapshot` to its COW map; with `server_copies`
    /// the server copies the pre-images first. Retries transient failures
    /// itself; an error means the chunks cannot be registered.
    async fn register(&self, snapshot: u64, chunks: Vec<u64>, server_copies: bool) -> Result<(), String>;
}

/// Outcome of preserving a chunk, as waiters see it.
type Outcome = Option<Result<(), String>>;

/// Which chunks of one snapshot are preserved or being preserved.
pub struct CowState {
    pub snapshot: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    done: CowMap,
    in_progress: HashMap<u64, watch::Receiver<Outcome>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`CowState::claim`] decided for a set of chunks.
pub struct Claim {
    /// Chunks this caller must preserve, with the sender to report on.
    pub mine: Vec<(u64, watch::Sender<Outcome>)>,
    /// Chunks someone else is preserving.
    pub others: Vec<watch::Receiver<Outcome>>,
}

impl CowState {
    pub fn new(epoch: &SnapshotEpoch) -> CowState {
        CowState {
            snapshot: epoch.id.0,
            inner: Mutex::new(Inner { done: epoch.cow.clone(), in_progress: HashMap::new() }),
        }
    }

    /// Registered chunks, as this agent knows them.
    pub fn preserved(&self) -> u64 {
        lock(&self.inner).done.count()
    }

    /// Whether every chunk of `wanted` is registered.
    pub fn all_preserved(&self, mut wanted: impl Iterator<Item = u64>) -> bool {
        let inner = lock(&self.inner);
        wanted.all(|chunk| inner.done.contains(chunk))
    }

    /// Claims the chunks of `wanted` nobody has preserved or is preserving.
    pub fn claim(&self, wanted: impl Iterator<Item = u64>) -> Claim {
        let mut inner = lock(&self.inner);
        let mut claim = Claim { mine: Vec::new(), others: Vec::new() };
        for chunk in wanted {
            if inner.done.contains(chunk) {
                continue;
            }
            if let Some(rx) = inner.in_progress.get(&chunk) {
                // A claim whose writer went away (its future was dropped)
                // is free again.
                if rx.has_changed().is_ok() {
                    claim.others.push(rx.clone());
                    continue;
                }
            }
            let (tx, rx) = watch::channel(None);
            inner.in_progress.insert(chunk, rx);
            claim.mine.push((chunk, tx));
        }
        claim
    }

    /// Records the outcome of preserving `mine` and wakes their waiters.
    pub fn finish(&self, mine: Vec<(u64, watch::Sender<Outcome>)>, result: &Result<(), String>) {
        let mut inner = lock(&self.inner);
        for (chunk, tx) in mine {
            inner.in_progress.remove(&chunk);
            if result.is_ok() {
                inner.done.insert(chunk);
            }
            tx.send_replace(Some(result.clone()));
        }
    }
}

/// Waits for chunks another writer is preserving.
pub async fn wait_for(others: Vec<watch::Receiver<Outcome>>) -> Result<(), IoError> {
    for mut rx in others {
        let outcome = rx.wait_for(Option::is_some).await.map(|o| o.clone());
        match outcome {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(IoError::io(format!("preserving a chunk for the snapshot failed: {e}"))),
            // The preserving writer vanished without a word: its sender was
            // dropped only by a panic; refuse rather than overwrite.
            _ => return Err(IoError::io("preserving a chunk for the snapshot was abandoned")),
        }
    }
    Ok(())
}

/// Group commit of registrations: while one request is in flight, the
/// chunks of every other caller queue up and go together in the next.
pub struct Registrations {
    registrar: Arc<dyn CowRegistrar>,
    /// Whether the server copies the pre-images. A writer holds it read
    /// from before its copy until its registration is answered; switching
    /// to server copies takes it for writing, so it waits for those.
    server_copies: RwLock<bool>,
    queue: Mutex<Queue>,
}

/// A caller's registration: (snapshot, server copies, chunks, where to answer).
type Waiting = (u64, bool, Vec<u64>, oneshot::Sender<Result<(), String>>);

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    running: bool,
}

impl Registrations {
    pub fn new(registrar: Arc<dyn CowRegistrar>, server_copies: bool) -> Arc<Registrations> {
        Arc::new(Registrations {
            registrar,
            server_copies: RwLock::new(server_copies),
            queue: Mutex::new(Queue::default()),
        })
    }

    /// Who copies the pre-images (`true`: the server), held for one
    /// preservation: from before its copy until its registration is answered.
    pub async fn copy_mode(&self) -> RwLockReadGuard<'_, bool> {
        self.server_copies.read().await
    }

    /// Whether the server copies the pre-images now (without waiting).
    pub fn server_copies_now(&self) -> bool {
        self.server_copies.try_read().is_ok_and(|m| *m)
    }

    /// From now on the server copies the pre-images. Returns once every
    /// preservation that copies itself has been answered, so none of its
    /// reads of the live volume is still to come.
    pub async fn use_server_copies(&self) {
        *self.server_copies.write().await = true;
    }

    /// Registers `chunks` of `snapshot`, batched with concurrent callers;
    /// `server_copies`: as the caller's [`Self::copy_mode`] says.
    pub async fn register(
        self: &Arc<Self>,
        snapshot: u64,
        server_copies: bool,
        chunks: Vec<u64>,
    ) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = lock(&self.queue);
            q.waiting.push((snapshot, server_copies, chunks, tx));
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            // Its own task: a caller that goes away must not strand the batch.
            tokio::spawn(self.clone().drain());
        }
        rx.await.unwrap_or_else(|_| Err("the registration task ended".to_string()))
    }

    async fn drain(self: Arc<Self>) {
        loop {
            let batch = {
                let mut q = lock(&self.queue);
                if q.waiting.is_empty() {
                    q.running = false;
                    return;
                }
                // One snapshot and one copy mode per request; the rest
                // waits for the next round.
                let (snapshot, server_copies) = (q.waiting[0].0, q.waiting[0].1);
                let mut batch = Vec::new();
                let mut count = 0;
                let mut i = 0;
                while i < q.waiting.len() {
                    let (s, copies, chunks, _) = &q.waiting[i];
                    if *s == snapshot
                        && *copies == server_copies
                        && (batch.is_empty() || count + chunks.len() <= REGISTRATION_CHUNKS_MAX)
                    {
                        count += chunks.len();
                        batch.push(q.waiting.remove(i));
                    } else {
                        i += 1;
                    }
                }
                batch
            };
            let (snapshot, server_copies) = (batch[0].0, batch[0].1);
            let mut chunks: Vec<u64> = batch.iter().flat_map(|(_, _, c, _)| c.iter().copied()).collect();
            chunks.sort_unstable();
            chunks.dedup();
            let result = self.registrar.register(snapshot, chunks, server_copies).await;
            for (_, _, _, tx) in batch {
                let _ = tx.send(result.clone());
            }
        }
    }
}

/// Runs `copy` for every item concurrently; the first error wins.
pub async fn copy_all<T: Copy, F, Fut>(items: &[T], copy: F) -> Result<(), IoError>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), IoError>>,
{
    join_all(items.iter().map(|&c| copy(c))).await.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use volume_format::SnapshotId;

    fn epoch(chunks: u64) -> SnapshotEpoch {
        SnapshotEpoch {
            id: SnapshotId(3),
            name: "s".into(),
            size_bytes: chunks * 65536,
            chunk_bytes: 65536,
            cow_extents: Vec::new(),
            cow: CowMap::new(chunks),
        }
    }

    #[test]
    fn a_chunk_is_claimed_once_and_waiters_see_the_outcome() {
        let state = CowState::new(&epoch(100));
        let a = state.claim([5, 6].into_iter());
        assert_eq!(a.mine.iter().map(|m| m.0).collect::<Vec<_>>(), vec![5, 6]);
        let b = state.claim([6, 7].into_iter());
        assert_eq!(b.mine.iter().map(|m| m.0).collect::<Vec<_>>(), vec![7]);
        assert_eq!(b.others.len(), 1);
        state.finish(a.mine, &Ok(()));
        assert!(b.others[0].borrow().as_ref().is_some_and(|r| r.is_ok()));
        assert!(state.claim([5, 6].into_iter()).mine.is_empty());
        state.finish(b.mine, &Err("no".into()));
        assert_eq!(state.claim([7].into_iter()).mine[0].0, 7, "a failed chunk can be claimed again");
    }

    struct Counting {
        calls: AtomicUsize,
        gate: tokio::sync::Semaphore,
        seen: Mutex<Vec<Vec<u64>>>,
    }

    #[async_trait]
    impl CowRegistrar for Counting {
        async fn register(&self, _snapshot: u64, chunks: Vec<u64>, _copy: bool) -> Result<(), String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            lock(&self.seen).push(chunks);
            Ok(())
        }
    }

    #[tokio::test]
    async fn concurrent_registrations_share_a_request() {
        let registrar = Arc::new(Counting {
            calls: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let regs = Registrations::new(registrar.clone(), false);
        let first = tokio::spawn({
            let regs = regs.clone();
            async move { regs.register(1, false, vec![1]).await }
        });
        while registrar.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // While the first is in flight, three more arrive.
        let more: Vec<_> = (2..5)
            .map(|c| {
                let regs = regs.clone();
                tokio::spawn(async move { regs.register(1, false, vec![c, c + 10]).await })
            })
            .collect();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        registrar.gate.add_permits(2);
        first.await.unwrap().unwrap();
        for m in more {
            m.await.unwrap().unwrap();
        }
        assert_eq!(registrar.calls.load(Ordering::SeqCst), 2);
        assert_eq!(lock(&registrar.seen)[1], vec![2, 3, 4, 12, 13, 14]);
    }

    #[tokio::test]
    async fn switching_to_server_copies_waits_for_copies_in_flight() {
        let registrar = Arc::new(Counting {
            calls: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let regs = Registrations::new(registrar, false);
        let copying = regs.copy_mode().await;
        assert!(!*copying);
        let switch = tokio::spawn({
            let regs = regs.clone();
            async move { regs.use_server_copies().await }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!switch.is_finished(), "a copy of the agent's own is still in flight");
        assert!(!regs.server_copies_now());
        drop(copying);
        switch.await.unwrap();
        assert!(regs.server_copies_now());
        assert!(*regs.copy_mode().await);
    }
}
