//! Copy-on-write behind the acknowledgement: the first write to a chunk
//! after a snapshot is acknowledged before its chunk is preserved.
//!
//! Why: preserving a chunk ([`crate::cow`]) costs a 64 KiB read, a 64 KiB
//! FUA write into the COW area and a round trip to the metadata server
//! before the write itself may go — at queue depth 1 a first write took
//! five to six times as long as a plain one (`bench/metadata.sh`). Done in
//! line, no cheaper commit can fix that: the copy alone is three plain
//! writes' worth.
//!
//! What the NBD contract allows: a write that is not FUA is durable only
//! once a later FLUSH has completed (the export advertises a volatile write
//! cache, `NBD_FLAG_SEND_FLUSH`). So such a write to a chunk that still
//! needs preserving is acknowledged at once and the rest of it — preserve,
//! then the write to every leg — runs in a task of its own, like a disk's
//! write cache destaging. The snapshot's rule is unchanged: the live chunk
//! is overwritten only after its pre-image is in the COW area and
//! registered, so a crash at any instant leaves every snapshot exact; what
//! a crash may lose is an acknowledged write no FLUSH has covered, which
//! the contract permits.
//!
//! What keeps it honest:
//! - **Bounded.** At most `budget` bytes of such writes are outstanding
//!   (`--cow-write-behind-kib`, default 1 MiB; 0 turns it off); a writer
//!   past it waits for room, so a sustained rate is the rate the copies
//!   run at, not the rate memory fills at. Larger writes go in line.
//! - **Ordered.** A later request overlapping an outstanding write —
//!   read, write, TRIM, WRITE_ZEROES, BLOCK_STATUS — waits for it to land
//!   first: reads see every acknowledged write, and two writes to a byte
//!   land in the order they were acknowledged.
//! - **FLUSH and FUA.** A FLUSH waits for every write acknowledged before it
//!   and fails if one of them failed (the error is reported once, to the
//!   next FLUSH, and logged). A FUA write, TRIM and WRITE_ZEROES go in line.
//! - **Admitted.** Each outstanding write keeps its admission through the
//!   volume's gate, so a recall (a snapshot, a reconfiguration) and a
//!   detach wait for it, exactly as for a write still in line.
//! - **One writer.** Only a holder that copies its own pre-images — an
//!   exclusive writer — writes behind. A shared writer's acknowledged
//!   write must be on the devices, where the other hosts read; and a
//!   handover to another host first waits for every outstanding write
//!   ([`crate::volume::VolumeDevice::use_server_copies`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Default budget of outstanding writes, in bytes.
pub const DEFAULT_BUDGET_BYTES: u64 = 1 << 20;

/// Budget accounting unit (a write of fewer bytes takes one unit).
const UNIT_BYTES: u64 = 4096;

/// The writes of one volume acknowledged before they landed.
pub struct WriteBehind {
    budget: Arc<Semaphore>,
    units_max: u32,
    pending: Mutex<Pending>,
    /// `pending.writes.len()`, read without the lock on every request.
    count: AtomicUsize,
}

#[derive(Default)]
struct Pending {
    next_id: u64,
    writes: Vec<Outstanding>,
    /// The first failure since the last FLUSH asked.
    failed: Option<String>,
}

struct Outstanding {
    id: u64,
    offset: u64,
    len: u64,
    landed: watch::Receiver<bool>,
}

/// One write acknowledged before it landed: holds its share of the budget
/// and wakes its waiters when [`WriteBehind::finish`]ed (or dropped).
pub struct Ticket {
    id: u64,
    _permit: OwnedSemaphorePermit,
    landed: watch::Sender<bool>,
    /// Earlier outstanding writes it overlaps: it lands after them.
    before: Vec<watch::Receiver<bool>>,
}

impl Ticket {
    /// Waits until every earlier write this one overlaps has landed (or
    /// failed).
    pub async fn wait_for_earlier(&mut self) {
        wait_all(std::mem::take(&mut self.before)).await;
    }
}

fn lock(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn overlaps(w: &Outstanding, offset: u64, len: u64) -> bool {
    w.offset < offset.saturating_add(len) && offset < w.offset.saturating_add(w.len)
}

async fn wait_all(receivers: Vec<watch::Receiver<bool>>) {
    for mut rx in receivers {
        // A dropped sender (its task ended without finishing) counts as done.
        let _ = rx.wait_for(|landed| *landed).await;
    }
}

impl WriteBehind {
    /// Outstanding writes limited to `budget_bytes`; `None` when 0 (off).
    pub fn new(budget_bytes: u64) -> Option<WriteBehind> {
        let units = (budget_bytes / UNIT_BYTES).min(u64::from(u32::MAX >> 4)) as u32;
        (units > 0).then(|| WriteBehind {
            budget: Arc::new(Semaphore::new(units as usize)),
            units_max: units,
            pending: Mutex::new(Pending::default()),
            count: AtomicUsize::new(0),
        })
    }

    /// Outstanding writes now.
    pub fn outstanding(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Admits a write of `[offset, offset + len)` to be acknowledged now and
    /// landed later, waiting for room in the budget; `None` if it is larger
    /// than the whole budget (it goes in line). Call it before acknowledging:
    /// from here on later requests overlapping it wait for it.
    pub async fn admit(&self, offset: u64, len: u64) -> Option<Ticket> {
        let units = len.div_ceil(UNIT_BYTES).max(1);
        if units > u64::from(self.units_max) {
            return None;
        }
        let permit = self.budget.clone().acquire_many_owned(units as u32).await.ok()?;
        let (tx, rx) = watch::channel(false);
        let mut p = lock(&self.pending);
        let before = p.writes.iter().filter(|w| overlaps(w, offset, len)).map(|w| w.landed.clone()).collect();
        let id = p.next_id;
        p.next_id += 1;
        p.writes.push(Outstanding { id, offset, len, landed: rx });
        self.count.store(p.writes.len(), Ordering::Relaxed);
        Some(Ticket { id, _permit: permit, landed: tx, before })
    }

    /// Records how the write of `ticket` ended and wakes its waiters.
    pub fn finish(&self, ticket: Ticket, result: Result<(), String>) {
        {
            let mut p = lock(&self.pending);
            p.writes.retain(|w| w.id != ticket.id);
            self.count.store(p.writes.len(), Ordering::Relaxed);
            if let Err(e) = result {
                p.failed.get_or_insert(e);
            }
        }
        ticket.landed.send_replace(true);
    }

    /// Waits until every outstanding write overlapping `[offset, offset +
    /// len)` has landed (or failed).
    pub async fn wait_overlapping(&self, offset: u64, len: u64) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let waits: Vec<_> = {
            let p = lock(&self.pending);
            p.writes.iter().filter(|w| overlaps(w, offset, len)).map(|w| w.landed.clone()).collect()
        };
        wait_all(waits).await;
    }

    /// Waits until every write acknowledged so far has landed (or failed).
    pub async fn landed(&self) {
        let waits: Vec<_> = lock(&self.pending).writes.iter().map(|w| w.landed.clone()).collect();
        wait_all(waits).await;
    }

    /// What a FLUSH does first: waits for every write acknowledged so far,
    /// then returns (and forgets) the first failure since the last call.
    pub async fn drain(&self) -> Result<(), String> {
        self.landed().await;
        match lock(&self.pending).failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn zero_budget_is_off() {
        assert!(WriteBehind::new(0).is_none());
        assert!(WriteBehind::new(4095).is_none());
        assert!(WriteBehind::new(4096).is_some());
    }

    #[tokio::test]
    async fn a_write_larger_than_the_budget_goes_in_line() {
        let wb = WriteBehind::new(64 << 10).unwrap();
        assert!(wb.admit(0, (64 << 10) + 1).await.is_none());
        assert!(wb.admit(0, 64 << 10).await.is_some());
    }

    #[tokio::test]
    async fn the_budget_holds_back_writers_until_one_lands() {
        let wb = Arc::new(WriteBehind::new(8192).unwrap());
        let a = wb.admit(0, 4096).await.unwrap();
        let _b = wb.admit(8192, 4096).await.unwrap();
        let third = tokio::spawn({
            let wb = wb.clone();
            async move { wb.admit(65536, 4096).await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "admitted past the budget");
        wb.finish(a, Ok(()));
        assert!(third.await.unwrap());
    }

    #[tokio::test]
    async fn overlapping_requests_wait_and_disjoint_ones_do_not() {
        let wb = Arc::new(WriteBehind::new(1 << 20).unwrap());
        let first = wb.admit(4096, 8192).await.unwrap();
        // Disjoint: returns at once.
        tokio::time::timeout(Duration::from_secs(5), wb.wait_overlapping(12288, 4096)).await.unwrap();
        let mut second = wb.admit(8192, 4096).await.unwrap();
        assert_eq!(second.before.len(), 1, "the second write must land after the first");
        let reader = tokio::spawn({
            let wb = wb.clone();
            async move { wb.wait_overlapping(0, 4097).await }
        });
        let ordered = tokio::spawn(async move {
            second.wait_for_earlier().await;
            second
        });
        tokio::task::yield_now().await;
        assert!(!reader.is_finished() && !ordered.is_finished());
        wb.finish(first, Ok(()));
        reader.await.unwrap();
        let second = ordered.await.unwrap();
        assert_eq!(wb.outstanding(), 1);
        wb.finish(second, Ok(()));
        assert_eq!(wb.outstanding(), 0);
    }

    #[tokio::test]
    async fn drain_waits_for_all_and_reports_a_failure_once() {
        let wb = Arc::new(WriteBehind::new(1 << 20).unwrap());
        let a = wb.admit(0, 4096).await.unwrap();
        let b = wb.admit(1 << 16, 4096).await.unwrap();
        let flush = tokio::spawn({
            let wb = wb.clone();
            async move { wb.drain().await }
        });
        wb.finish(a, Err("device 2 refused the write".into()));
        tokio::task::yield_now().await;
        assert!(!flush.is_finished(), "drained with a write outstanding");
        wb.finish(b, Ok(()));
        assert_eq!(flush.await.unwrap(), Err("device 2 refused the write".to_string()));
        assert_eq!(wb.drain().await, Ok(()), "a failure is reported to one FLUSH");
    }

    #[tokio::test]
    async fn a_dropped_ticket_does_not_strand_its_waiters() {
        let wb = WriteBehind::new(1 << 20).unwrap();
        let a = wb.admit(0, 4096).await.unwrap();
        drop(a);
        // Its entry stays until finished, but nothing waits forever on it.
        tokio::time::timeout(Duration::from_secs(5), wb.wait_overlapping(0, 4096)).await.unwrap();
    }
}
