//! The pool lease on the devices: acquiring it (standing by meanwhile),
//! renewing it, handing it over — the I/O around
//! `volume_format::lease::LeaseMachine`.
//!
//! The task has its own connections to the lease areas of the metadata
//! devices, so renewals never wait behind a metadata commit. What it learns
//! reaches the rest of the server through a [`LeaseGuard`] (may this server
//! commit right now?), read by the device task before every metadata write,
//! and through watches: the owner record a standby sees (for redirect
//! messages) and the servers of the pool (for listings).
//!
//! Fault point (`SANVOL_FAULT`, see `control_client::fault`):
//! `mds-lease-won-before-serving` — this server won the pool lease; the
//! renewal that opens its window (and lets it serve) has not happened yet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockio::client::NbdClient;
use blockio::clock::LeaseInstant;
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};
use uuid::Uuid;
use volume_format::control::messages::{ControlError, ErrorCode};
use volume_format::lease::{
    decode_sector, encode_sector, LeaseAction, LeaseMachine, LeasePhase, LeaseRecord, LeaseTiming, ServerRole,
    LEASE_SECTOR_BYTES,
};
use volume_format::ByteRange;

use crate::config::Availability;
use crate::pool::Pool;

/// May this server commit metadata right now? Shared by the lease task
/// (which extends or ends it) and the device task (which checks it before
/// every metadata write).
///
/// Its window is on the lease clock (`CLOCK_BOOTTIME`, [`blockio::clock`]):
/// a server whose VM was paused past its pool lease finds the window closed
/// on resume, as the standby that took the pool over meanwhile counted it.
#[derive(Debug)]
pub struct LeaseGuard {
    epoch: LeaseInstant,
    valid_until_ms: AtomicU64,
    ended: AtomicBool,
    /// Bumped whenever the window moves, for [`LeaseGuard::wait_may_commit`].
    changed: watch::Sender<u64>,
}

impl LeaseGuard {
    pub fn new() -> Arc<LeaseGuard> {
        Arc::new(LeaseGuard {
            epoch: LeaseInstant::now(),
            valid_until_ms: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            changed: watch::channel(0).0,
        })
    }

    /// The guard of the next term: a closed window on the same clock (the
    /// lease machine's times carry over from one term to the next).
    pub fn successor(&self) -> Arc<LeaseGuard> {
        Arc::new(LeaseGuard {
            epoch: self.epoch,
            valid_until_ms: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            changed: watch::channel(0).0,
        })
    }

    /// Whether this server may commit now, waiting up to `max` for a
    /// renewal in flight to extend the window (a renewal a little late
    /// must not fail a commit; an ended lease fails at once).
    pub async fn wait_may_commit(&self, max: Duration) -> bool {
        let mut changed = self.changed.subscribe();
        let deadline = Instant::now() + max;
        loop {
            if self.may_commit() {
                return true;
            }
            if self.ended.load(Ordering::Acquire) {
                return false;
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return self.may_commit();
            }
        }
    }

    /// Milliseconds since the guard was made (the lease machine's clock).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn may_commit(&self) -> bool {
        !self.ended.load(Ordering::Acquire) && self.now_ms() < self.valid_until_ms.load(Ordering::Acquire)
    }

    /// `None` while this server may commit; else what a request is answered.
    pub fn refusal(&self) -> Option<ControlError> {
        (!self.may_commit()).then(|| closed_window_refusal(self.ended.load(Ordering::Acquire)))
    }

    fn extend(&self, valid_until_ms: u64) {
        let before = self.valid_until_ms.fetch_max(valid_until_ms, Ordering::AcqRel);
        if valid_until_ms > before {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Never again (the lease was lost or handed over).
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The answer to a request that arrives while this server may not commit
/// (its pool lease window is closed; `ended`: lost or handed on for good).
///
/// Why requests and not only commits: some answers grant without a commit
/// — a handle's lease renewal, a copy-on-write registration already made —
/// and a server paused past its pool lease would otherwise renew agents'
/// handle leases after the standby took over and released those handles.
/// Within the window the renewals it grants end at most 3T + the agent
/// lease after its last good pool-lease renewal, long before a new server
/// (9T later at the earliest, then a whole agent lease) releases them.
pub fn closed_window_refusal(ended: bool) -> ControlError {
    if ended {
        ControlError::new(
            ErrorCode::NotActive,
            "this metadata server no longer holds the pool lease; another server serves the pool",
        )
    } else {
        ControlError::new(
            ErrorCode::Unavailable,
            "this metadata server is renewing its pool lease (it could not for a while); retry shortly",
        )
    }
}

/// One metadata device's lease area and a connection to it.
struct LeaseCopy {
    uri: String,
    nbd_uri: Option<NbdUri>,
    client: Option<NbdClient>,
    area: ByteRange,
}

/// Why the lease task stopped holding the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Another server has it, or it could not be renewed: commit nothing more.
    Lost(String),
    /// Handed to the standby with this host id (planned handoff).
    HandedOff(u32),
    /// The server is shutting down (the lease was released).
    Stopped,
}

/// What the server asks of the lease task while it holds the lease.
pub enum LeaseCommand {
    /// Hand the lease to `to` (a host id); answered once written.
    HandOff { to: u32, done: oneshot::Sender<Result<(), String>> },
}

/// The pool's servers as their sectors say (for `pool status`).
pub type Servers = Vec<LeaseRecord>;

pub struct LeaseTask {
    machine: LeaseMachine,
    copies: Vec<LeaseCopy>,
    pool: Uuid,
    guard: Arc<LeaseGuard>,
    /// The owner record as last seen (standbys name the active server).
    pub owner_seen: watch::Sender<Option<LeaseRecord>>,
    pub servers: watch::Sender<Servers>,
    last_presence_ms: Option<u64>,
    last_servers_read_ms: Option<u64>,
    /// The last warning about unreadable server sectors ([`LeaseTask::read_hosts`]).
    host_read_warning: RepeatedWarning,
}

impl LeaseTask {
    /// A lease task for the devices that hold `pool`'s metadata copies (each
    /// must have a lease area: layouts planned before the lease existed may
    /// lack one).
    pub async fn new(
        pool: &Pool,
        holders: &[Uuid],
        me: &Availability,
        device_request_max_ms: u64,
        instance: [u8; 16],
        guard: Arc<LeaseGuard>,
    ) -> Result<LeaseTask, String> {
        let mut copies = Vec::new();
        for uuid in holders {
            let Some(d) = pool.devices.iter().find(|d| d.expected_uuid == Some(*uuid)) else {
                return Err(format!("device {uuid} holds a metadata copy but was not found"));
            };
            let Some(label) = d.label else {
                return Err(format!("device {} holds a metadata copy but has no readable label", d.uri));
            };
            let area = label.layout.lease_area().ok_or_else(|| {
                format!(
                    "device {} has no room for the pool lease after its metadata area (a layout from before the \
                     lease); this pool can only be served by one server at a time, re-initialize it to use standbys",
                    d.uri
                )
            })?;
            copies.push(LeaseCopy { uri: d.uri.clone(), nbd_uri: d.uri.parse().ok(), client: None, area });
        }
        if copies.is_empty() {
            return Err("no device holds a metadata copy".into());
        }
        let timing = LeaseTiming { io_timeout_ms: me.lease_io_timeout_ms, device_request_max_ms };
        let record = LeaseRecord {
            pool_uuid: pool.pool_uuid,
            host_id: me.host_id,
            instance,
            name: me.name.clone(),
            generation: 0,
            counter: 0,
            io_timeout_ms: me.lease_io_timeout_ms as u32,
            since_unix_ms: unix_ms(),
            handoff_to: 0,
            addrs: me.advertise.clone(),
            role: ServerRole::Standby,
        };
        Ok(LeaseTask {
            machine: LeaseMachine::new(record, timing),
            copies,
            pool: pool.pool_uuid,
            guard,
            owner_seen: watch::channel(None).0,
            servers: watch::channel(Vec::new()).0,
            last_presence_ms: None,
            last_servers_read_ms: None,
            host_read_warning: RepeatedWarning::default(),
        })
    }

    pub fn timing(&self) -> LeaseTiming {
        self.machine.timing
    }

    /// The pool-lease generation this server holds (`None` unless it is
    /// the owner): the generation of its capability on fencing devices.
    pub fn generation(&self) -> Option<u64> {
        match &self.machine.phase {
            LeasePhase::Owner { record, .. } => Some(record.generation),
            _ => None,
        }
    }

    /// The lease areas this task reads and writes (what a standby's
    /// capability lets it write, [`crate::targets::ServerTerm::Standby`]).
    pub fn lease_areas(&self) -> Vec<ByteRange> {
        let mut areas: Vec<ByteRange> = self.copies.iter().map(|c| c.area).collect();
        areas.sort_by_key(|a| a.start);
        areas.dedup();
        areas
    }

    /// A term starts: the listing names this server active at once, not
    /// only after the first read of the host sectors — the owner records
    /// its own name (in cache mirror records) from its first request on,
    /// and a replay after a restart compares it with its name then.
    pub fn list_self_active(&self) {
        let current = self.servers.borrow().clone();
        self.servers.send_replace(active_servers_listing(&self.machine.me, current));
    }

    /// The guard of the current (or coming) term.
    pub fn guard(&self) -> Arc<LeaseGuard> {
        self.guard.clone()
    }

    /// After a term ended (lost or handed off): watch for the lease again,
    /// with a fresh guard for the next term (on the same clock).
    pub fn stand_by(&mut self) {
        self.machine.stand_by(self.guard.now_ms());
        self.guard = self.guard.successor();
        self.last_servers_read_ms = None;
        self.owner_seen.send_replace(None);
    }

    /// Standing by until this server holds the lease (or `stop` resolves:
    /// `false`). Logs who is active, once per owner.
    pub async fn acquire(&mut self, mut stop: watch::Receiver<bool>) -> bool {
        let mut announced: Option<(u32, u64)> = None;
        let mut stopped_at_won = false;
        loop {
            if let LeasePhase::Owner { record, .. } = &self.machine.phase {
                // Serving starts once the first renewal opened the window.
                if self.machine.may_commit(self.guard.now_ms()) {
                    info!(generation = record.generation, "acquired the pool lease");
                    return true;
                }
                if !stopped_at_won {
                    stopped_at_won = true;
                    control_client::fault::hit("mds-lease-won-before-serving");
                }
            }
            // Won, then lost before the window opened (stopped, or cut off
            // from the devices, right after winning): a lost lease waits
            // for nothing (`LeasePhase::Lost`), and this server stayed
            // "stopped" for good — no standby to hand over to, and a
            // cache mirror only it holds never replayed (simulator
            // exploration seed 268100476750943). It stands by again.
            if let LeasePhase::Lost { why } = &self.machine.phase {
                warn!("lost the pool lease before serving ({why}); standing by");
                stopped_at_won = false;
                self.stand_by();
                continue;
            }
            if let LeasePhase::Standby { owner: Some((rec, _)) } = &self.machine.phase {
                if announced != Some((rec.host_id, rec.generation)) {
                    announced = Some((rec.host_id, rec.generation));
                    info!(
                        active = %rec.name,
                        host_id = rec.host_id,
                        since = %super::durable::hms(rec.since_unix_ms / 1000),
                        addrs = ?rec.addrs,
                        "the pool is served by another metadata server; standing by"
                    );
                }
                self.owner_seen.send_replace(Some(rec.clone()));
            }
            if *stop.borrow() {
                return false;
            }
            self.step(None, &mut stop).await;
        }
    }

    /// Holds the lease until it is lost, handed over, or `stop` resolves
    /// (then it is released, so a standby takes over without waiting for
    /// it to expire).
    pub async fn hold(
        &mut self,
        mut commands: mpsc::Receiver<LeaseCommand>,
        mut stop: watch::Receiver<bool>,
    ) -> LeaseEnd {
        loop {
            match &self.machine.phase {
                LeasePhase::Lost { why } => {
                    self.guard.end();
                    return LeaseEnd::Lost(why.clone());
                }
                LeasePhase::HandedOff { to } => {
                    self.guard.end();
                    return LeaseEnd::HandedOff(*to);
                }
                _ => {}
            }
            if *stop.borrow() {
                self.release().await;
                return LeaseEnd::Stopped;
            }
            // Commands are taken between steps (a step is never cut short in
            // the middle of a renewal), and they end a wait at once.
            if let Some(LeaseCommand::HandOff { to, done }) = self.step(Some(&mut commands), &mut stop).await {
                let _ = done.send(self.hand_off(to).await);
            }
        }
    }

    /// One step of the machine: a read, a write, or a wait (which a command
    /// or `stop` ends early; a command is returned to handle).
    async fn step(
        &mut self,
        commands: Option<&mut mpsc::Receiver<LeaseCommand>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<LeaseCommand> {
        let now = self.guard.now_ms();
        self.presence(now).await;
        match self.machine.next(now) {
            LeaseAction::Read => {
                self.machine.reading(now);
                let records = self.read_owner().await;
                let done = self.guard.now_ms();
                if done.saturating_sub(now) > self.machine.timing.io_timeout_ms {
                    warn!(
                        read_ms = done - now,
                        io_timeout_ms = self.machine.timing.io_timeout_ms,
                        "reading the pool lease took longer than the lease I/O timeout; this read does not count"
                    );
                }
                let action = self.machine.read_done(done, &records);
                tracing::debug!(?records, ?action, phase = ?self.machine.phase, "lease read");
                if let LeaseAction::Write(record) = action {
                    self.write(&record).await;
                }
            }
            LeaseAction::Write(record) => self.write(&record).await,
            LeaseAction::WaitUntil(t) => {
                let presence = self.last_presence_ms.map_or(now, |p| p + self.machine.timing.io_timeout_ms);
                let until = t.min(presence).max(now + 1);
                let sleep = tokio::time::sleep(Duration::from_millis(until - now));
                // A closed command channel or a dropped stop sender (the
                // server shutting down) ends nothing: waiting on them would
                // return at once, again and again (a busy loop, seen at
                // shutdown until the lease was released).
                let command = async {
                    match commands {
                        Some(c) => match c.recv().await {
                            Some(cmd) => cmd,
                            None => std::future::pending().await,
                        },
                        None => std::future::pending().await,
                    }
                };
                let stopped = async {
                    if stop.wait_for(|s| *s).await.is_err() {
                        std::future::pending::<()>().await
                    }
                };
                tokio::select! {
                    _ = sleep => {}
                    cmd = command => return Some(cmd),
                    _ = stopped => {}
                }
            }
        }
        if let LeasePhase::Owner { valid_until_ms, .. } = &self.machine.phase {
            self.guard.extend(*valid_until_ms);
        }
        None
    }

    async fn write(&mut self, record: &LeaseRecord) {
        let ok = self.write_sector(0, record).await;
        self.machine.write_done(self.guard.now_ms(), record, ok, self.copies.len());
    }

    async fn hand_off(&mut self, to: u32) -> Result<(), String> {
        let Some(record) = self.machine.hand_off(to) else {
            return Err("this server does not hold the pool lease".into());
        };
        self.guard.end();
        let ok = self.write_sector(0, &record).await;
        if ok > self.copies.len() / 2 {
            info!(to, "handed the pool lease over");
            Ok(())
        } else {
            Err(format!("the handoff record reached only {ok} of {} lease copies", self.copies.len()))
        }
    }

    /// Releases a held lease (written free), so standbys need not wait for
    /// it to expire.
    async fn release(&mut self) {
        if !matches!(self.machine.phase, LeasePhase::Owner { .. }) {
            return;
        }
        self.guard.end();
        // The free record keeps this term's generation: the next acquirer
        // goes on from it (server capabilities on fencing devices need
        // generations that only go up).
        let mut free = match &self.machine.phase {
            LeasePhase::Owner { record, .. } => record.clone(),
            _ => self.machine.me.clone(),
        };
        free.host_id = 0;
        free.role = ServerRole::Stopped;
        let ok = self.write_sector(0, &free).await;
        info!(copies = ok, "released the pool lease");
        let mut me = self.machine.me.clone();
        me.role = ServerRole::Stopped;
        super::metrics::set_role("stopped");
        self.write_sector(self.machine.me.host_id as u64, &me).await;
    }

    /// Writes this server's host sector every `T`; the active server also
    /// reads every host sector every `2T` (who is standing by).
    async fn presence(&mut self, now: u64) {
        let t = self.machine.timing.io_timeout_ms;
        if self.last_presence_ms.is_none_or(|p| now >= p + t) {
            self.last_presence_ms = Some(now);
            let me = presence_record(&self.machine);
            super::metrics::set_role(match me.role {
                ServerRole::Active => "active",
                ServerRole::Standby => "standby",
                _ => "stopped",
            });
            self.write_sector(self.machine.me.host_id as u64, &me).await;
        }
        let active = matches!(self.machine.phase, LeasePhase::Owner { .. });
        if active && self.last_servers_read_ms.is_none_or(|p| now >= p + 2 * t) {
            self.last_servers_read_ms = Some(now);
            let read = self.read_hosts().await;
            self.servers.send_replace(active_servers_listing(&self.machine.me, read));
        }
    }

    fn client(&mut self, i: usize) -> Option<NbdClient> {
        self.copies[i].client.clone()
    }

    async fn connect(&mut self, i: usize) -> Result<NbdClient, String> {
        if let Some(c) = self.client(i) {
            return Ok(c);
        }
        let Some(uri) = self.copies[i].nbd_uri.clone() else {
            return Err(format!("device {}: bad URI", self.copies[i].uri));
        };
        let t = Duration::from_millis(self.machine.timing.io_timeout_ms);
        let base = blockio::client::ClientOptions {
            connect_timeout: t,
            request_timeout: Some(t),
            ..blockio::client::ClientOptions::default()
        };
        let opts = crate::targets::with_lease_credential(base, self.lease_areas());
        let c = tokio::time::timeout(t, NbdClient::connect(&uri, opts))
            .await
            .map_err(|_| format!("device {}: no connection within {} ms", self.copies[i].uri, t.as_millis()))?
            .map_err(|e| format!("device {}: {e}", self.copies[i].uri))?;
        self.copies[i].client = Some(c.clone());
        Ok(c)
    }

    /// Reads sector `sector` of every copy, each bounded by `T`. A copy's
    /// connection is dropped (the next request reconnects) only when its
    /// read failed; a sector that was read but does not decode says nothing
    /// about the connection.
    async fn read_sector(&mut self, sector: u64) -> Vec<Result<Option<LeaseRecord>, String>> {
        let t = Duration::from_millis(self.machine.timing.io_timeout_ms);
        let mut clients = Vec::new();
        for i in 0..self.copies.len() {
            clients.push(self.connect(i).await);
        }
        let pool = self.pool;
        let reads = clients.into_iter().zip(&self.copies).map(|(c, copy)| async move {
            let c = c.map_err(SectorReadError::Io)?;
            let at = copy.area.start + sector * LEASE_SECTOR_BYTES;
            let bytes = tokio::time::timeout(t, c.read(at, LEASE_SECTOR_BYTES as u32))
                .await
                .map_err(|_| {
                    SectorReadError::Io(format!("device {}: lease read took over {} ms", copy.uri, t.as_millis()))
                })?
                .map_err(|e| SectorReadError::Io(format!("device {}: {e}", copy.uri)))?;
            decode_sector(&bytes, pool).map_err(|e| SectorReadError::Content(format!("device {}: {e}", copy.uri)))
        });
        let results = join_all(reads).await;
        self.forget_failed(results.iter().map(|r| matches!(r, Err(SectorReadError::Io(_)))));
        results.into_iter().map(|r| r.map_err(SectorReadError::into_message)).collect()
    }

    async fn read_owner(&mut self) -> Vec<Result<Option<LeaseRecord>, String>> {
        let results = self.read_sector(0).await;
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            // A renewal whose read fails does not count: say why, or the
            // server stops committing with no word in its log.
            warn!("lease read failed: {r}");
        }
        results
    }

    /// Every server's sector, the newest (highest counter) copy of each.
    /// Sectors that cannot be read are reported in one line, again only when
    /// what fails changes or a minute later (the active server reads them
    /// all every 2 T: a damaged lease area would otherwise log a line per
    /// sector and copy every few seconds).
    async fn read_hosts(&mut self) -> Servers {
        let mut servers: Servers = Vec::new();
        let mut failed = Vec::new();
        for h in 1..=volume_format::lease::HOST_ID_MAX as u64 {
            let (read, unread): (Vec<_>, Vec<_>) = self.read_sector(h).await.into_iter().partition(Result::is_ok);
            failed.extend(unread.into_iter().filter_map(Result::err).map(|e| (h, e)));
            let newest = read.into_iter().filter_map(|r| r.ok().flatten()).max_by_key(|r| (r.since_unix_ms, r.counter));
            servers.extend(newest);
        }
        match self.host_read_warning.next(host_read_failures(&failed), self.guard.now_ms()) {
            Some(Notice::Warn(line)) => warn!("{line}"),
            Some(Notice::Cleared) => info!("the servers' lease sectors read correctly again"),
            None => {}
        }
        servers
    }

    /// Writes `record` into sector `sector` of every copy (FUA, each bounded
    /// by `T`); returns how many copies took it.
    async fn write_sector(&mut self, sector: u64, record: &LeaseRecord) -> usize {
        let bytes = match encode_sector(record) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                error!("cannot encode a lease record: {e}");
                return 0;
            }
        };
        let t = Duration::from_millis(self.machine.timing.io_timeout_ms);
        let mut clients = Vec::new();
        for i in 0..self.copies.len() {
            clients.push(self.connect(i).await);
        }
        let writes = clients.into_iter().zip(&self.copies).map(|(c, copy)| {
            let bytes = bytes.clone();
            async move {
                let c = c?;
                let at = copy.area.start + sector * LEASE_SECTOR_BYTES;
                tokio::time::timeout(t, c.write(at, bytes, true))
                    .await
                    .map_err(|_| format!("device {}: lease write took over {} ms", copy.uri, t.as_millis()))?
                    .map_err(|e| format!("device {}: {e}", copy.uri))
            }
        });
        let results = join_all(writes).await;
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            warn!("lease write failed: {r}");
        }
        self.forget_failed(results.iter().map(Result::is_err));
        results.iter().filter(|r| r.is_ok()).count()
    }

    /// Drops the connection of each copy whose request failed (`true`, in
    /// the copies' order; the next request reconnects).
    fn forget_failed(&mut self, failed: impl IntoIterator<Item = bool>) {
        for (copy, failed) in self.copies.iter_mut().zip(failed) {
            if failed {
                copy.client = None;
            }
        }
    }
}

/// Why one copy of a lease sector could not be used.
enum SectorReadError {
    /// No connection, a failed or late read: the connection is dropped.
    Io(String),
    /// Read, but not a lease record of this pool (damaged, or overwritten).
    Content(String),
}

impl SectorReadError {
    fn into_message(self) -> String {
        match self {
            SectorReadError::Io(m) | SectorReadError::Content(m) => m,
        }
    }
}

/// One line for the server sectors that could not be read (sector, why), or
/// `None` when all could.
fn host_read_failures(failed: &[(u64, String)]) -> Option<String> {
    let ((first_sector, first), rest) = failed.split_first()?;
    let sectors: std::collections::BTreeSet<u64> = failed.iter().map(|(s, _)| *s).collect();
    let others = match rest.len() {
        0 => String::new(),
        1 => " (and 1 more failure)".to_string(),
        n => format!(" (and {n} more failures)"),
    };
    Some(format!(
        "lease read failed for {} of the servers' sectors (the pool's server list may be incomplete): sector {first_sector}: {first}{others}",
        sectors.len()
    ))
}

/// A warning that repeats itself only when it changes, or once a minute.
#[derive(Debug, Default)]
struct RepeatedWarning {
    /// The warning in force and when it was last logged.
    last: Option<(String, u64)>,
}

/// What [`RepeatedWarning::next`] says to log.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Warn(String),
    /// The warning in force no longer holds.
    Cleared,
}

impl RepeatedWarning {
    const REPEAT_MS: u64 = 60_000;

    /// What to log now, given the current warning (`None`: all is well).
    fn next(&mut self, current: Option<String>, now_ms: u64) -> Option<Notice> {
        let Some(line) = current else {
            return self.last.take().map(|_| Notice::Cleared);
        };
        if let Some((last, at)) = &self.last {
            if *last == line && now_ms < at + Self::REPEAT_MS {
                return None;
            }
        }
        self.last = Some((line.clone(), now_ms));
        Some(Notice::Warn(line))
    }
}

/// What this server writes in its host sector: its record, with the role
/// its lease phase gives it.
pub fn presence_record(machine: &LeaseMachine) -> LeaseRecord {
    let mut me = machine.me.clone();
    me.role = match machine.phase {
        LeasePhase::Owner { .. } => ServerRole::Active,
        LeasePhase::HandedOff { .. } | LeasePhase::Lost { .. } => ServerRole::Stopped,
        _ => ServerRole::Standby,
    };
    me
}

/// The pool's servers as the active server `me` lists them, from the host
/// sectors it read (the newest copy of each).
pub fn active_servers_listing(me: &LeaseRecord, mut servers: Servers) -> Servers {
    // This server is active, whatever its sector said when read (a
    // presence written while it stood by may still be there).
    let mut me = me.clone();
    me.role = ServerRole::Active;
    servers.retain(|s| s.host_id != me.host_id);
    // Another server's sector saying "active" is from before this
    // one took the lease: that server stopped (or is about to say
    // it stands by, within T). Never list two active servers.
    for s in servers.iter_mut().filter(|s| s.role == ServerRole::Active) {
        s.role = ServerRole::Stopped;
    }
    servers.push(me);
    servers.sort_by_key(|s| s.host_id);
    servers
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_server_sectors_make_one_line_naming_how_many() {
        assert_eq!(host_read_failures(&[]), None);
        let one = host_read_failures(&[(3, "device d: bad magic".into())]).unwrap();
        assert!(
            one.contains("for 1 of the servers' sectors") && one.contains("sector 3: device d: bad magic"),
            "{one}"
        );
        assert!(!one.contains("more"), "{one}");
        // Two copies of sector 1 and one of sector 2: two sectors, three failures.
        let failed = [(1, "device d: x".into()), (1, "device e: y".into()), (2, "device d: z".into())];
        let many = host_read_failures(&failed).unwrap();
        assert!(many.contains("for 2 of the servers' sectors") && many.contains("sector 1: device d: x"), "{many}");
        assert!(many.ends_with("(and 2 more failures)"), "{many}");
    }

    #[test]
    fn a_repeated_warning_is_logged_again_only_when_it_changes_or_a_minute_later() {
        let mut w = RepeatedWarning::default();
        assert_eq!(w.next(None, 0), None, "nothing wrong, nothing said");
        assert_eq!(w.next(Some("a".into()), 1_000), Some(Notice::Warn("a".into())));
        assert_eq!(w.next(Some("a".into()), 3_000), None, "the same, within the minute");
        assert_eq!(w.next(Some("b".into()), 5_000), Some(Notice::Warn("b".into())), "changed");
        assert_eq!(w.next(Some("b".into()), 64_999), None);
        assert_eq!(w.next(Some("b".into()), 65_000), Some(Notice::Warn("b".into())), "a minute after it was logged");
        assert_eq!(w.next(None, 66_000), Some(Notice::Cleared));
        assert_eq!(w.next(None, 67_000), None, "cleared once");
        assert_eq!(w.next(Some("b".into()), 68_000), Some(Notice::Warn("b".into())), "back: said again at once");
    }
}
