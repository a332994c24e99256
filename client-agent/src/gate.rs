//! The recall gate: decides, for every I/O to one attached volume, whether it
//! may go to the devices now, must wait, or must fail.
//!
//! Why a separate, socket-free type: the rules of reconfiguration and leases
//! are where a shared-storage system loses data if it gets them wrong, so they
//! live in one small state machine that unit tests drive with paused time,
//! without devices or a metadata server.
//!
//! Rules:
//! - Every I/O [`enter`](Gate::enter)s the gate and holds a [`GateGuard`]
//!   until it has finished at *every* device it touched; the guard carries the
//!   layout the I/O must use, so an I/O never mixes two layouts.
//! - [`begin_recall`](Gate::begin_recall) closes the gate: new I/O *waits*
//!   (it does not fail; the kernel or NBD client above us would turn a failure
//!   into a filesystem error), and [`drained`](Gate::drained) resolves once
//!   in-flight I/O has finished. Only then may the agent confirm the recall.
//! - [`publish`](Gate::publish) installs the new layout and reopens the gate.
//! - [`revoke`](Gate::revoke) fails held and later I/O with the server's
//!   reason; [`close`](Gate::close) (detach) fails them as "detached".
//! - The lease: I/O is admitted only while `now < lease_until`. If the agent
//!   could not renew in time, the server may hand the volume to someone else
//!   once the lease has run out, so the gate holds I/O *by itself* — no timer,
//!   no message needed — until a renewal moves `lease_until` forward.
//!
//! - After an unclean stop (a crash, `kill -9`): no data-changing request
//!   of this process leaves for a device before [`hold_writes_until`]'s
//!   instant (start + `device_request_max_ms`), reads flow at once. A write
//!   of the previous run may still be queued inside a device's NBD server
//!   — it was never acknowledged, so the client above resends it — and
//!   would land over a newer, acknowledged write of this run. Process-wide,
//!   because it is a fact about the previous process, not about a volume.
//!
//! Cost on the hot path: one uncontended mutex lock and a clock read to
//! enter, one lock to leave. Nothing is awaited while the lock is held.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};

use blockio::{IoError, IoErrorKind};
use tokio::sync::Notify;
// Leases run on the lease clock (`CLOCK_BOOTTIME`): a VM pause counts.
use blockio::clock::LeaseInstant as Instant;

/// Until when this process's writes wait (see the module docs); set once.
static PREVIOUS_RUN_WRITES_LAND_BY: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Holds every data-changing device request of this process until `until`:
/// the previous run of this agent stopped uncleanly and its writes may land
/// until then. Set once at start; a later call changes nothing.
pub fn hold_writes_until(until: Instant) {
    let _ = PREVIOUS_RUN_WRITES_LAND_BY.set(until);
}

/// Waits until the previous run's writes have landed (at once if there was
/// no unclean stop, or the time has passed).
pub async fn previous_run_writes_landed() {
    // Once the hold is over, one relaxed load per write (not a clock read).
    if HOLD_OVER.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    if let Some(until) = PREVIOUS_RUN_WRITES_LAND_BY.get() {
        if !until.has_passed() {
            until.sleep_until().await;
        }
    }
    HOLD_OVER.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Set once [`previous_run_writes_landed`] found the hold over: it never
/// comes back within a run.
static HOLD_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Why the gate refuses an I/O or an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("the metadata server revoked this volume's handle: {reason}; detach and attach it again")]
    Revoked { reason: String },
    #[error("the volume is detached")]
    Closed,
    #[error("layout generation {offered} is older than the current generation {current}; ignoring it")]
    StaleGeneration { offered: u64, current: u64 },
}

impl From<GateError> for IoError {
    fn from(e: GateError) -> IoError {
        let kind = match e {
            GateError::Closed => IoErrorKind::Shutdown,
            _ => IoErrorKind::Io,
        };
        IoError::new(kind, e.to_string())
    }
}

/// Where the gate stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// I/O flows (subject to the lease).
    Open,
    /// The server recalled the layout for `generation`: new I/O waits.
    Recalled { generation: u64 },
    /// The handle was revoked: all I/O fails.
    Revoked { reason: String },
    /// Detached: all I/O fails.
    Closed,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Open => f.write_str("open"),
            Phase::Recalled { generation } => write!(f, "recalled (waiting for generation {generation})"),
            Phase::Revoked { reason } => write!(f, "revoked: {reason}"),
            Phase::Closed => f.write_str("detached"),
        }
    }
}

/// Whether a recall of `offered` may close a gate in `phase` whose layout is at `current`: not
/// when revoked or detached, and only for a newer generation. The agent's owner applies the same
/// rule to its own record of the gate ([`crate::core`]), so both always agree.
pub fn recall_allowed(phase: &Phase, current: u64, offered: u64) -> Result<(), GateError> {
    match phase {
        Phase::Revoked { reason } => Err(GateError::Revoked { reason: reason.clone() }),
        Phase::Closed => Err(GateError::Closed),
        _ if offered <= current => Err(GateError::StaleGeneration { offered, current }),
        _ => Ok(()),
    }
}

/// Whether a layout at `offered` may be published into a gate in `phase` at `current`: not when
/// revoked or detached, and never an older generation (a delayed message must not roll the
/// volume back).
pub fn publish_allowed(phase: &Phase, current: u64, offered: u64) -> Result<(), GateError> {
    match phase {
        Phase::Revoked { reason } => Err(GateError::Revoked { reason: reason.clone() }),
        Phase::Closed => Err(GateError::Closed),
        _ if offered < current => Err(GateError::StaleGeneration { offered, current }),
        _ => Ok(()),
    }
}

/// A snapshot of the gate for listings and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateStatus {
    pub phase: Phase,
    /// Layout generation in use.
    pub generation: u64,
    /// I/O admitted and not yet finished.
    pub in_flight: u64,
    /// I/O waiting at the gate (recall or lease).
    pub waiting: u64,
    /// Whether the lease has run out (I/O is held until it is renewed).
    pub lease_expired: bool,
}

impl Phase {
    /// One word for listings: `open`, `recalled`, `lease-expired`, `revoked`, `detached`.
    pub fn word(&self, lease_expired: bool) -> &'static str {
        match self {
            Phase::Open if lease_expired => "lease-expired",
            Phase::Open => "open",
            Phase::Recalled { .. } => "recalled",
            Phase::Revoked { .. } => "revoked",
            Phase::Closed => "detached",
        }
    }
}

impl GateStatus {
    /// One word for listings: `open`, `recalled`, `lease-expired`, `revoked`, `detached`.
    pub fn state_word(&self) -> &'static str {
        self.phase.word(self.lease_expired)
    }
}

struct State<L> {
    phase: Phase,
    layout: Arc<L>,
    generation: u64,
    in_flight: u64,
    waiting: u64,
    /// `None`: no lease applies (tests, or embedding without a server).
    lease_until: Option<Instant>,
}

enum Verdict {
    Admit,
    Hold,
    Fail(GateError),
}

impl<L> State<L> {
    fn verdict(&self) -> Verdict {
        match &self.phase {
            Phase::Open => match self.lease_until {
                Some(until) if Instant::now() >= until => Verdict::Hold,
                _ => Verdict::Admit,
            },
            Phase::Recalled { .. } => Verdict::Hold,
            Phase::Revoked { reason } => Verdict::Fail(GateError::Revoked { reason: reason.clone() }),
            Phase::Closed => Verdict::Fail(GateError::Closed),
        }
    }
}

/// The gate of one attached volume; `L` is the layout I/O runs against.
pub struct Gate<L> {
    state: Mutex<State<L>>,
    /// Wakes held I/O: reopen, revoke, close, lease renewal.
    changed: Notify,
    /// Wakes `drained` waiters: in-flight reached zero, or revoke/close.
    drained: Notify,
}

impl<L> fmt::Debug for Gate<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate").field("status", &self.status()).finish()
    }
}

/// An admitted I/O. Dereferences to the layout it must use; leaving the gate
/// happens on drop.
pub struct GateGuard<'a, L> {
    gate: &'a Gate<L>,
    layout: Arc<L>,
}

impl<L> Deref for GateGuard<'_, L> {
    type Target = L;
    fn deref(&self) -> &L {
        &self.layout
    }
}

impl<L> Drop for GateGuard<'_, L> {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl<L> GateGuard<'_, L> {
    /// A second admission of this I/O that owns its gate, for the part of
    /// it that outlives the request (a write acknowledged before it landed,
    /// [`crate::cow_behind`]): the gate counts it in flight until it drops.
    pub fn to_owned(&self, gate: Arc<Gate<L>>) -> OwnedGateGuard<L> {
        assert!(std::ptr::eq(self.gate, &*gate), "an admission is owned by its own gate");
        gate.lock().in_flight += 1;
        OwnedGateGuard { gate, layout: self.layout.clone() }
    }
}

/// An admitted I/O that owns its gate (see [`GateGuard::to_owned`]).
pub struct OwnedGateGuard<L> {
    gate: Arc<Gate<L>>,
    layout: Arc<L>,
}

impl<L> Deref for OwnedGateGuard<L> {
    type Target = L;
    fn deref(&self) -> &L {
        &self.layout
    }
}

impl<L> Drop for OwnedGateGuard<L> {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl<L> Gate<L> {
    /// One admitted I/O left.
    fn leave(&self) {
        let mut s = self.lock();
        s.in_flight -= 1;
        if s.in_flight == 0 && s.phase != Phase::Open {
            drop(s);
            self.drained.notify_waiters();
        }
    }

    /// An open gate with `layout` at `generation`, and no lease yet (see
    /// [`Gate::renew_lease`]).
    pub fn new(layout: Arc<L>, generation: u64) -> Gate<L> {
        Gate {
            state: Mutex::new(State {
                phase: Phase::Open,
                layout,
                generation,
                in_flight: 0,
                waiting: 0,
                lease_until: None,
            }),
            changed: Notify::new(),
            drained: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<L>> {
        // A panic while holding this short lock cannot leave the counters
        // half-updated (every critical section is a few assignments), so a
        // poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits an I/O, waiting while the gate is recalled or the lease has run
    /// out; fails if the handle was revoked or the volume detached.
    pub async fn enter(&self) -> Result<GateGuard<'_, L>, GateError> {
        // Fast path: no waiter registration when the gate is open.
        if let Some(r) = self.try_enter() {
            return r;
        }
        self.lock().waiting += 1;
        let _waiting = WaitingGuard(self);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register before checking, so a change between the check and the
            // await is not missed.
            notified.as_mut().enable();
            if let Some(r) = self.try_enter() {
                return r;
            }
            notified.await;
        }
    }

    fn try_enter(&self) -> Option<Result<GateGuard<'_, L>, GateError>> {
        let mut s = self.lock();
        match s.verdict() {
            Verdict::Admit => {
                s.in_flight += 1;
                Some(Ok(GateGuard { gate: self, layout: s.layout.clone() }))
            }
            Verdict::Hold => None,
            Verdict::Fail(e) => Some(Err(e)),
        }
    }

    /// The current layout, without entering (for sizes and listings).
    pub fn layout(&self) -> Arc<L> {
        self.lock().layout.clone()
    }

    pub fn status(&self) -> GateStatus {
        let s = self.lock();
        GateStatus {
            phase: s.phase.clone(),
            generation: s.generation,
            in_flight: s.in_flight,
            waiting: s.waiting,
            lease_expired: s.lease_until.is_some_and(|until| Instant::now() >= until),
        }
    }

    /// Closes the gate to new I/O for a recall of `generation`. In-flight I/O
    /// continues; wait for it with [`Gate::drained`].
    pub fn begin_recall(&self, generation: u64) -> Result<(), GateError> {
        let mut s = self.lock();
        recall_allowed(&s.phase, s.generation, generation)?;
        s.phase = Phase::Recalled { generation };
        Ok(())
    }

    /// Resolves when no admitted I/O is left. Fails if the gate is revoked
    /// meanwhile (the confirmation would be pointless).
    pub async fn drained(&self) -> Result<(), GateError> {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if let Phase::Revoked { reason } = &s.phase {
                    return Err(GateError::Revoked { reason: reason.clone() });
                }
                if s.in_flight == 0 {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// [`Gate::begin_recall`] then [`Gate::drained`].
    pub async fn recall(&self, generation: u64) -> Result<(), GateError> {
        self.begin_recall(generation)?;
        self.drained().await
    }

    /// Installs `layout` at `generation` and reopens the gate. A layout older
    /// than the current one is refused (a delayed message must not roll the
    /// volume back).
    pub fn publish(&self, layout: Arc<L>, generation: u64) -> Result<(), GateError> {
        {
            let mut s = self.lock();
            publish_allowed(&s.phase, s.generation, generation)?;
            s.layout = layout;
            s.generation = generation;
            s.phase = Phase::Open;
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// Fails held and later I/O with `reason`.
    pub fn revoke(&self, reason: impl Into<String>) {
        {
            let mut s = self.lock();
            if s.phase == Phase::Closed {
                return;
            }
            s.phase = Phase::Revoked { reason: reason.into() };
        }
        self.changed.notify_waiters();
        self.drained.notify_waiters();
    }

    /// Detach: fails held and later I/O. In-flight I/O finishes; wait for it
    /// with [`Gate::drained`].
    pub fn close(&self) {
        self.lock().phase = Phase::Closed;
        self.changed.notify_waiters();
    }

    /// The lease now runs until `until`. Held I/O resumes if the lease had
    /// run out.
    pub fn renew_lease(&self, until: Instant) {
        self.lock().lease_until = Some(until);
        self.changed.notify_waiters();
    }

    pub fn lease_until(&self) -> Option<Instant> {
        self.lock().lease_until
    }

    /// For an admitted I/O whose device request found the lease run out
    /// before it could leave: waits until a renewal moves the lease past
    /// now, and returns its new end (`None`: no lease applies). Fails if the
    /// handle is revoked or detached meanwhile. The I/O stays admitted (a
    /// recall's drain waits for it).
    pub async fn wait_for_lease(&self) -> Result<Option<Instant>, GateError> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                match &s.phase {
                    Phase::Revoked { reason } => return Err(GateError::Revoked { reason: reason.clone() }),
                    Phase::Closed => return Err(GateError::Closed),
                    Phase::Open | Phase::Recalled { .. } => {}
                }
                match s.lease_until {
                    None => return Ok(None),
                    Some(until) if Instant::now() < until => return Ok(Some(until)),
                    Some(_) => {}
                }
            }
            notified.await;
        }
    }
}

/// Counts a waiter for [`GateStatus::waiting`] even if its future is dropped.
struct WaitingGuard<'a, L>(&'a Gate<L>);

impl<L> Drop for WaitingGuard<'_, L> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate() -> Arc<Gate<&'static str>> {
        Arc::new(Gate::new(Arc::new("v1"), 1))
    }

    /// Lets spawned tasks run until `cond` holds (no sleeping: with paused
    /// time a sleep would also move the clock).
    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition never became true");
    }

    #[tokio::test(start_paused = true)]
    async fn open_gate_admits_and_counts() {
        let g = gate();
        let a = g.enter().await.unwrap();
        let b = g.enter().await.unwrap();
        assert_eq!(*a, "v1");
        assert_eq!(g.status().in_flight, 2);
        drop(a);
        drop(b);
        assert_eq!(g.status().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn recall_drains_in_flight_and_holds_new_io_until_publish() {
        let g = gate();
        let in_flight = g.enter().await.unwrap();
        g.begin_recall(2).unwrap();

        // Draining does not finish while an I/O is in flight.
        let drain = tokio::spawn({
            let g = g.clone();
            async move { g.drained().await }
        });
        // New I/O waits, it does not fail.
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.enter().await.map(|guard| *guard) }
        });
        until(|| g.status().waiting == 1).await;
        assert!(!drain.is_finished());
        assert!(!held.is_finished());

        drop(in_flight);
        drain.await.unwrap().unwrap();
        assert!(!held.is_finished(), "held I/O must wait for the publish, not just the drain");
        assert_eq!(g.status().state_word(), "recalled");

        g.publish(Arc::new("v2"), 2).unwrap();
        assert_eq!(held.await.unwrap().unwrap(), "v2", "held I/O runs against the new layout");
        assert_eq!(g.status().generation, 2);
        assert_eq!(g.status().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn recall_with_nothing_in_flight_drains_at_once() {
        let g = gate();
        g.recall(5).await.unwrap();
        assert_eq!(g.status().phase, Phase::Recalled { generation: 5 });
    }

    #[tokio::test(start_paused = true)]
    async fn stale_generations_are_refused() {
        let g = gate();
        g.publish(Arc::new("v3"), 3).unwrap();
        assert!(matches!(g.publish(Arc::new("v2"), 2), Err(GateError::StaleGeneration { offered: 2, current: 3 })));
        assert!(matches!(g.begin_recall(3), Err(GateError::StaleGeneration { .. })));
        assert_eq!(*g.layout(), "v3");
    }

    #[tokio::test(start_paused = true)]
    async fn revoke_fails_held_and_later_io() {
        let g = gate();
        g.begin_recall(2).unwrap();
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.enter().await.map(|_| ()) }
        });
        until(|| g.status().waiting == 1).await;
        g.revoke("volume opened exclusively by host-b");
        let err = held.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("host-b"), "{err}");
        assert!(g.enter().await.is_err());
        assert!(g.publish(Arc::new("v2"), 2).is_err(), "a revoked gate stays revoked");
        let io: IoError = err.into();
        assert_eq!(io.kind, IoErrorKind::Io);
    }

    #[tokio::test(start_paused = true)]
    async fn revoke_during_drain_fails_the_drain() {
        let g = gate();
        let in_flight = g.enter().await.unwrap();
        g.begin_recall(2).unwrap();
        let drain = tokio::spawn({
            let g = g.clone();
            async move { g.drained().await }
        });
        tokio::task::yield_now().await;
        g.revoke("gone");
        assert!(drain.await.unwrap().is_err());
        drop(in_flight);
    }

    #[tokio::test(start_paused = true)]
    async fn close_fails_io_as_detached() {
        let g = gate();
        g.close();
        let err: IoError = g.enter().await.map(|_| ()).unwrap_err().into();
        assert_eq!(err.kind, IoErrorKind::Shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_holds_io_until_renewal() {
        let g = gate();
        g.renew_lease(Instant::now() + Duration::from_millis(3000));
        drop(g.enter().await.unwrap());

        // Nobody renews: once the lease runs out, I/O is held by the gate itself.
        tokio::time::advance(Duration::from_millis(3000)).await;
        assert!(g.status().lease_expired);
        assert_eq!(g.status().state_word(), "lease-expired");
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.enter().await.map(|guard| *guard) }
        });
        until(|| g.status().waiting == 1).await;
        // Time passing alone does not release it.
        tokio::time::advance(Duration::from_secs(60)).await;
        until(|| g.status().waiting == 1).await;
        assert!(!held.is_finished());

        g.renew_lease(Instant::now() + Duration::from_millis(3000));
        assert_eq!(held.await.unwrap().unwrap(), "v1");
        assert!(!g.status().lease_expired);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_just_before_expiry_admits() {
        let g = gate();
        g.renew_lease(Instant::now() + Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(99)).await;
        drop(g.enter().await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_waiter_is_uncounted() {
        let g = gate();
        g.begin_recall(2).unwrap();
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.enter().await.map(|_| ()) }
        });
        until(|| g.status().waiting == 1).await;
        held.abort();
        let _ = held.await;
        assert_eq!(g.status().waiting, 0);
        assert_eq!(g.status().in_flight, 0);
    }
}
