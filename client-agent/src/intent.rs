//! The agent's side of the write-intent log of mirrored volumes
//! (`volume_format::metadata::intent`): a region is recorded dirty at the
//! metadata server before the first write to it, and cleared lazily once no
//! write to it has been in flight for [`INTENT_CLEAR_AFTER_MS`].
//!
//! Why: the agent writes every leg of a mirrored extent concurrently; if it
//! dies with writes in flight, the legs of those regions may differ, and a
//! later reader rotating between legs would see a block flip between old
//! and new. With the regions recorded first, the server knows exactly which
//! regions to copy from one leg to the others before anyone opens the
//! volume again (`metadata-server`'s `intents`).
//!
//! **Cost.** A write to a region already dirty pays one short lock and
//! nothing else. Only the first write to a clean region waits for a round
//! trip and a metadata commit; a write that marks region `r` also marks
//! `r + 1` ahead ([`MARK_AHEAD_REGIONS`]), so a sequential writer never waits
//! after its first region. Clearing is batched by a sweeper every
//! [`INTENT_SWEEP_MS`] (as md clears its bitmap lazily every 5 s), so a
//! region written again within seconds is never marked twice.
//!
//! **After a restart.** A new run of the agent that takes its handle back
//! (resume) inherits the handle's dirty set at the server, left by the run
//! that died. Before its first I/O it asks the server to copy those regions
//! ([`IntentLog::ready`]); reads wait for that too, so no read ever sees
//! legs that differ.
//!
//! **The state machine** ([`IntentState`], a plain type): a region is
//! absent (clean), `Marking` (a record in flight), `Dirty` (with the writes
//! in flight in it, when the last one ended, and whether any failed), or
//! `Clearing`. A write touching a region that is `Marking` by another write
//! or `Clearing` waits until that settles (a write may never start on a
//! region whose clear the server may commit after it). A region where a
//! write failed (or was abandoned) is never cleared: its legs may differ,
//! and the server copies it if this handle goes away uncleanly.
//!
//! **Before a close.** A clean close makes the server forget the handle's
//! dirty regions, so a detach first has the regions where a write failed
//! copied ([`IntentLog::resync_before_close`]); if that copy cannot be
//! made, the handle is left to run out instead of closed, and the server
//! copies its regions before the volume opens again (simulator seed 131).
//!
//! `SANVOL_INTENT_LOG=off` in the agent's environment turns the log off
//! (for benchmarks that measure its cost, and for the test that proves a
//! crash without it leaves the legs different); never in production.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use blockio::IoError;
use tokio::sync::Notify;

/// Idle time after a region's last write before it is cleared.
pub const INTENT_CLEAR_AFTER_MS: u64 = 5_000;
/// How often the sweeper looks for regions to clear.
pub const INTENT_SWEEP_MS: u64 = 1_000;
/// Regions marked beyond the last one a write touches.
pub const MARK_AHEAD_REGIONS: u64 = 1;
/// Most regions in one record request (the server's bound is 4096).
pub const INTENT_REGIONS_PER_RECORD_MAX: usize = 1024;

/// Whether the environment turns the intent log off (see the module docs).
pub fn disabled_by_env() -> bool {
    std::env::var("SANVOL_INTENT_LOG").is_ok_and(|v| v == "off")
}

/// Records marks and clears at the metadata server.
#[async_trait]
pub trait IntentRecorder: Send + Sync + 'static {
    /// Commits `mark` dirty and `clear` clean; retries transient failures
    /// itself. An error means the regions cannot be recorded.
    async fn record(&self, mark: Vec<u64>, clear: Vec<u64>) -> Result<(), String>;

    /// Asks the server to copy whatever this handle recorded dirty before
    /// (a previous run of the agent died with writes in flight) and to
    /// forget it; answered at once when there is nothing.
    async fn resync(&self) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    /// A record in flight; `writes` writes wait in it (began, not ended).
    Marking {
        writes: u32,
    },
    Dirty {
        writes: u32,
        last_ms: u64,
        failed: bool,
    },
    Clearing,
}

/// What a write must do before it may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Go; but first record these regions dirty (empty: go at once).
    Go { mark: Vec<u64> },
    /// Another record of one of its regions is in flight: wait for it to
    /// settle and try again. Nothing changed.
    Wait,
}

/// The regions of one volume and their states (no I/O, no clock).
#[derive(Debug, Default)]
pub struct IntentState {
    regions: HashMap<u64, Region>,
    /// Regions of the volume (marks ahead stop there).
    count: u64,
}

impl IntentState {
    pub fn new(count: u64) -> IntentState {
        IntentState { regions: HashMap::new(), count }
    }

    /// A write to `regions` (ascending) begins.
    pub fn begin(&mut self, regions: &[u64]) -> Begin {
        if regions.iter().any(|r| matches!(self.regions.get(r), Some(Region::Marking { .. } | Region::Clearing))) {
            return Begin::Wait;
        }
        let mut mark = Vec::new();
        for r in regions {
            match self.regions.get_mut(r) {
                Some(Region::Dirty { writes, .. }) => *writes += 1,
                _ => {
                    self.regions.insert(*r, Region::Marking { writes: 1 });
                    mark.push(*r);
                }
            }
        }
        if let (false, Some(&last)) = (mark.is_empty(), regions.last()) {
            for ahead in (last + 1..=last + MARK_AHEAD_REGIONS).filter(|a| *a < self.count) {
                if let std::collections::hash_map::Entry::Vacant(slot) = self.regions.entry(ahead) {
                    slot.insert(Region::Marking { writes: 0 });
                    mark.push(ahead);
                }
            }
        }
        Begin::Go { mark }
    }

    /// The record of `mark` (from [`IntentState::begin`]) was answered.
    /// On failure the write that began does not happen: its regions are as
    /// before it (pass the same `regions`).
    pub fn marked(&mut self, regions: &[u64], mark: &[u64], ok: bool, now_ms: u64) {
        for r in mark {
            if let Some(Region::Marking { writes }) = self.regions.get(r).copied() {
                if ok {
                    self.regions.insert(*r, Region::Dirty { writes, last_ms: now_ms, failed: false });
                } else {
                    self.regions.remove(r);
                }
            }
        }
        if !ok {
            for r in regions.iter().filter(|r| !mark.contains(r)) {
                if let Some(Region::Dirty { writes, .. }) = self.regions.get_mut(r) {
                    *writes = writes.saturating_sub(1);
                }
            }
        }
    }

    /// A write to `regions` ended; `ok` if it reached every leg.
    pub fn end(&mut self, regions: &[u64], ok: bool, now_ms: u64) {
        for r in regions {
            if let Some(Region::Dirty { writes, last_ms, failed }) = self.regions.get_mut(r) {
                *writes = writes.saturating_sub(1);
                *last_ms = now_ms;
                *failed |= !ok;
            }
        }
    }

    /// Regions idle for `idle_ms` with nothing in flight and no failed
    /// write, now `Clearing` (at most `max`).
    pub fn sweep(&mut self, now_ms: u64, idle_ms: u64, max: usize) -> Vec<u64> {
        let mut due: Vec<u64> = self
            .regions
            .iter()
            .filter(|(_, s)| match s {
                Region::Dirty { writes: 0, last_ms, failed: false } => now_ms.saturating_sub(*last_ms) >= idle_ms,
                _ => false,
            })
            .map(|(r, _)| *r)
            .collect();
        due.sort_unstable();
        due.truncate(max);
        for r in &due {
            self.regions.insert(*r, Region::Clearing);
        }
        due
    }

    /// The clear of `regions` was answered, either way: clean now. Why not
    /// dirty again on a failure: the server may have committed the clear
    /// before the answer was lost, so only a new mark makes a region safe
    /// to write again (an extra mark costs a round trip; a missed one, a
    /// region a crash leaves different).
    pub fn cleared(&mut self, regions: &[u64]) {
        for r in regions {
            self.regions.remove(r);
        }
    }

    /// Regions where a write failed (or was abandoned): their legs may
    /// differ, so they are never cleared — and the handle must not be
    /// closed before the server copied them (see [`IntentLog::resync_before_close`]).
    pub fn failed(&self) -> Vec<u64> {
        let mut f: Vec<u64> = self
            .regions
            .iter()
            .filter(|(_, s)| matches!(s, Region::Dirty { failed: true, .. }))
            .map(|(r, _)| *r)
            .collect();
        f.sort_unstable();
        f
    }

    /// Regions recorded dirty (or being recorded), ascending.
    pub fn dirty(&self) -> Vec<u64> {
        let mut d: Vec<u64> = self.regions.iter().filter(|(_, s)| **s != Region::Clearing).map(|(r, _)| *r).collect();
        d.sort_unstable();
        d
    }
}

/// The intent log of one attached mirrored volume.
pub struct IntentLog {
    state: Mutex<IntentState>,
    settled: Notify,
    recorder: Arc<dyn IntentRecorder>,
    region_bytes: u64,
    started: std::time::Instant,
    /// Set once the server resynchronized what the handle left dirty before
    /// this attachment (see [`IntentLog::ready`]).
    resynced: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for IntentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentLog").field("region_bytes", &self.region_bytes).finish()
    }
}

/// A write's hold on its regions; [`IntentGuard::finish`] it with the
/// write's outcome (dropped unfinished, the write counts as failed).
pub struct IntentGuard {
    log: Arc<IntentLog>,
    regions: Vec<u64>,
    done: bool,
}

impl IntentGuard {
    pub fn finish(mut self, ok: bool) {
        self.done = true;
        self.log.end(&self.regions, ok);
    }
}

impl Drop for IntentGuard {
    fn drop(&mut self) {
        if !self.done {
            self.log.end(&self.regions, false);
        }
    }
}

impl IntentLog {
    /// The log of a volume of `size_bytes` in regions of `region_bytes`,
    /// with its sweeper running (until the log is dropped). Needs a tokio
    /// runtime.
    pub fn start(recorder: Arc<dyn IntentRecorder>, region_bytes: u64, size_bytes: u64) -> Arc<IntentLog> {
        let region_bytes = region_bytes.max(1);
        let log = Arc::new(IntentLog {
            state: Mutex::new(IntentState::new(size_bytes.div_ceil(region_bytes))),
            settled: Notify::new(),
            recorder,
            region_bytes,
            started: std::time::Instant::now(),
            resynced: tokio::sync::OnceCell::new(),
        });
        tokio::spawn(sweeper(Arc::downgrade(&log)));
        log
    }

    /// Returns once the server has copied the regions this handle recorded
    /// dirty before this attachment existed — a restarted agent that took
    /// its handle back finds them left by the run that died. Every I/O of
    /// the attachment waits for it (the first one asks; a failure is asked
    /// again by the next I/O). A fresh open has nothing dirty: one round
    /// trip, once.
    pub async fn ready(&self) -> Result<(), IoError> {
        self.resynced
            .get_or_try_init(|| async {
                self.recorder.resync().await.map_err(|e| {
                    IoError::io(format!(
                        "the regions the previous run of this agent was writing could not be resynchronized \
                         ({e}); no I/O until they are"
                    ))
                })
            })
            .await
            .map(|_| ())
    }

    /// Before the handle is closed, with no write in flight any more (the
    /// volume's gate drained): if a write failed in some region, its legs
    /// may differ there, and a close makes the server forget the handle's
    /// dirty regions (a clean close means every write reached every leg).
    /// So the server is asked to copy them first. An error means they
    /// could not be copied: the handle must then not be closed, but left to
    /// run out at the server, which copies the regions of a gone handle
    /// before the volume opens again.
    pub async fn resync_before_close(&self) -> Result<(), String> {
        let failed = self.lock().failed();
        if failed.is_empty() {
            return Ok(());
        }
        tracing::info!(regions = ?failed, "writes failed in these regions: resynchronizing them before the handle is closed");
        self.recorder.resync().await.map_err(|e| {
            format!("the regions {failed:?}, where a write failed, could not be resynchronized before the close ({e})")
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Regions `[offset, offset + len)` touches.
    fn regions_of(&self, offset: u64, len: u64) -> Vec<u64> {
        if len == 0 {
            return Vec::new();
        }
        (offset / self.region_bytes..=(offset + len - 1) / self.region_bytes).collect()
    }

    /// Waits until every region of `[offset, offset + len)` is recorded
    /// dirty; the write may go once this returns.
    pub async fn begin(self: &Arc<Self>, offset: u64, len: u64) -> Result<IntentGuard, IoError> {
        self.ready().await?;
        let regions = self.regions_of(offset, len);
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            let begin = self.lock().begin(&regions);
            match begin {
                Begin::Wait => settled.await,
                Begin::Go { mark } if mark.is_empty() => {
                    return Ok(IntentGuard { log: self.clone(), regions, done: false })
                }
                Begin::Go { mark } => {
                    let result = self.recorder.record(mark.clone(), Vec::new()).await;
                    self.lock().marked(&regions, &mark, result.is_ok(), self.now_ms());
                    self.settled.notify_waiters();
                    return match result {
                        Ok(()) => Ok(IntentGuard { log: self.clone(), regions, done: false }),
                        Err(e) => Err(IoError::io(format!("recording the write-intent regions {mark:?}: {e}"))),
                    };
                }
            }
        }
    }

    fn end(&self, regions: &[u64], ok: bool) {
        let now_ms = self.now_ms();
        self.lock().end(regions, ok, now_ms);
    }

    /// Clears the regions idle long enough; returns how many.
    pub async fn sweep(&self, idle_ms: u64) -> usize {
        let due = self.lock().sweep(self.now_ms(), idle_ms, INTENT_REGIONS_PER_RECORD_MAX);
        if due.is_empty() {
            return 0;
        }
        let result = self.recorder.record(Vec::new(), due.clone()).await;
        if let Err(e) = &result {
            tracing::debug!(regions = due.len(), error = %e, "clearing write-intent regions failed; tried again later");
        }
        self.lock().cleared(&due);
        self.settled.notify_waiters();
        due.len()
    }

    /// Regions recorded dirty now, ascending.
    pub fn dirty(&self) -> Vec<u64> {
        self.lock().dirty()
    }
}

async fn sweeper(log: Weak<IntentLog>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(INTENT_SWEEP_MS)).await;
        let Some(log) = log.upgrade() else { return };
        log.sweep(INTENT_CLEAR_AFTER_MS).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_write_marks_its_regions_and_one_ahead_then_goes_unmarked() {
        let mut s = IntentState::new(10);
        assert_eq!(s.begin(&[2, 3]), Begin::Go { mark: vec![2, 3, 4] });
        // A second write to region 3 waits for the record in flight.
        assert_eq!(s.begin(&[3]), Begin::Wait);
        s.marked(&[2, 3], &[2, 3, 4], true, 0);
        assert_eq!(s.begin(&[3]), Begin::Go { mark: vec![] });
        assert_eq!(s.begin(&[4]), Begin::Go { mark: vec![] }, "marked ahead");
        assert_eq!(s.dirty(), vec![2, 3, 4]);
    }

    #[test]
    fn regions_clear_only_when_idle_and_never_after_a_failed_write() {
        let mut s = IntentState::new(10);
        let Begin::Go { mark } = s.begin(&[0, 1]) else { panic!() };
        s.marked(&[0, 1], &mark, true, 0);
        assert_eq!(s.sweep(50, 10, 100), vec![2], "0 and 1 have writes in flight; 2 (marked ahead) has none");
        s.cleared(&[2]);
        s.end(&[0], true, 100);
        s.end(&[1], false, 100);
        assert!(s.sweep(105, 10, 100).is_empty(), "not idle yet");
        assert_eq!(s.sweep(200, 10, 100), vec![0], "1 had a failed write");
        assert_eq!(s.failed(), vec![1]);
        // A write to a region being cleared waits for the clear.
        assert_eq!(s.begin(&[0]), Begin::Wait);
        s.cleared(&[0]);
        assert_eq!(s.begin(&[0]), Begin::Go { mark: vec![0] }, "1 ahead is still dirty");
        assert_eq!(s.dirty(), vec![0, 1]);
    }

    #[test]
    fn a_failed_record_leaves_the_regions_as_before() {
        let mut s = IntentState::new(10);
        let Begin::Go { mark } = s.begin(&[5]) else { panic!() };
        s.marked(&[5], &mark, true, 0);
        s.end(&[5], true, 0);
        let Begin::Go { mark } = s.begin(&[5, 7]) else { panic!() };
        assert_eq!(mark, vec![7, 8]);
        s.marked(&[5, 7], &mark, false, 1);
        assert_eq!(s.dirty(), vec![5, 6]);
        assert_eq!(s.sweep(10_000, 10, 100), vec![5, 6], "no write is left counted in 5");
    }

    /// Counts the resyncs asked; fails them when told to.
    #[derive(Default)]
    struct Recorder {
        resyncs: Mutex<u32>,
        fail_resync: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl IntentRecorder for Recorder {
        async fn record(&self, _mark: Vec<u64>, _clear: Vec<u64>) -> Result<(), String> {
            Ok(())
        }

        async fn resync(&self) -> Result<(), String> {
            *self.resyncs.lock().unwrap() += 1;
            if self.fail_resync.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("device 1: EIO".into());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_handle_whose_write_failed_is_resynchronized_before_its_close() {
        let recorder = Arc::new(Recorder::default());
        let log = IntentLog::start(recorder.clone(), 4096, 10 * 4096);
        log.begin(0, 4096).await.unwrap().finish(true);
        assert_eq!(*recorder.resyncs.lock().unwrap(), 1, "the attachment's first I/O asks once");
        log.resync_before_close().await.unwrap();
        assert_eq!(*recorder.resyncs.lock().unwrap(), 1, "every write succeeded: nothing to copy before a close");

        log.begin(8 * 4096, 4096).await.unwrap().finish(false);
        log.resync_before_close().await.unwrap();
        assert_eq!(*recorder.resyncs.lock().unwrap(), 2, "a failed write: its regions are copied first");

        recorder.fail_resync.store(true, std::sync::atomic::Ordering::Relaxed);
        let e = log.resync_before_close().await.unwrap_err();
        assert!(e.contains("[8]") && e.contains("EIO"), "{e}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Begin(u64, u64),
        Answer(bool),
        End(bool),
        Sweep,
        Cleared(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..8, 1u64..3).prop_map(|(r, n)| Op::Begin(r, n)),
            any::<bool>().prop_map(Op::Answer),
            any::<bool>().prop_map(Op::End),
            Just(Op::Sweep),
            any::<bool>().prop_map(Op::Cleared),
        ]
    }

    proptest! {
        /// The invariant the server relies on: whenever a write is in
        /// flight (began, its record answered, not ended), every region it
        /// touches is recorded dirty at the server — marked by an answered
        /// record and not cleared since.
        #[test]
        fn a_write_in_flight_is_always_covered_by_the_server_s_dirty_set(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            let mut s = IntentState::new(10);
            let mut server: std::collections::BTreeSet<u64> = Default::default();
            let mut recording: Vec<(Vec<u64>, Vec<u64>)> = Vec::new();
            let mut in_flight: Vec<Vec<u64>> = Vec::new();
            let mut clearing: Vec<Vec<u64>> = Vec::new();
            let mut now = 0;
            for op in ops {
                now += 7;
                match op {
                    Op::Begin(first, n) => {
                        let regions: Vec<u64> = (first..(first + n).min(10)).collect();
                        match s.begin(&regions) {
                            Begin::Go { mark } if mark.is_empty() => in_flight.push(regions),
                            Begin::Go { mark } => recording.push((regions, mark)),
                            Begin::Wait => {}
                        }
                    }
                    Op::Answer(ok) => {
                        if let Some((regions, mark)) = recording.pop() {
                            if ok {
                                server.extend(mark.iter().copied());
                            }
                            s.marked(&regions, &mark, ok, now);
                            if ok {
                                in_flight.push(regions);
                            }
                        }
                    }
                    Op::End(ok) => {
                        if let Some(regions) = in_flight.pop() {
                            s.end(&regions, ok, now);
                        }
                    }
                    Op::Sweep => {
                        let due = s.sweep(now, 20, 100);
                        if !due.is_empty() {
                            clearing.push(due);
                        }
                    }
                    Op::Cleared(ok) => {
                        if let Some(due) = clearing.pop() {
                            // Failed or not, the server may have committed it.
                            let _ = ok;
                            for r in &due {
                                server.remove(r);
                            }
                            s.cleared(&due);
                        }
                    }
                }
                for w in &in_flight {
                    for r in w {
                        prop_assert!(server.contains(r), "region {} written while not dirty at the server", r);
                    }
                }
            }
        }
    }
}
