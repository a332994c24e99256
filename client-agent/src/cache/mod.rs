//! A volume's write-back cache on the agent: a [`BlockDevice`] in front of
//! the volume's data path that acknowledges a write once it is appended to
//! a local log file and `fdatasync`ed, and writes it to the devices in the
//! background.
//!
//! Why: to a slow or distant device a small synchronous write costs a round
//! trip and the device's own latency; a local append batched with its
//! neighbours (many concurrent writes, one write + one fdatasync) costs a
//! local sync. The log is the durable copy until the devices have the data.
//!
//! What holds, and how:
//! - **Durable before acknowledged**: a write is acknowledged only after its
//!   batch is synced (one batch at a time, so a later batch never lands
//!   before an earlier one is durable: see
//!   [`volume_format::cache_log::scan`]). FLUSH and FUA are therefore
//!   satisfied by the log; FLUSH reaches the devices only after a TRIM or
//!   WRITE_ZEROES, which bypass the log.
//! - **Read-your-writes**: reads overlay the cached bytes not yet destaged
//!   ([`dirty::DirtyMap`]) on what the devices return; the overlay is taken
//!   *before* the device read, and a record leaves it only once the devices
//!   have it, so a read never misses an acknowledged write.
//! - **Ordered, coalesced destage**: a round takes the oldest records (up
//!   to [`DESTAGE_ROUND_BYTES_MAX`], and half the log), writes the ranges
//!   they cover — sorted, adjacent ones merged, with the newest cached bytes
//!   there ([`plan_round`]) — then flushes the devices; their log space is
//!   released later (the superblock moves the tail, synced, before the space
//!   is reused), and only then are they dropped from the dirty map. A byte written
//!   twice is written once, and many small random writes become fewer,
//!   larger device writes (what a write-back cache must do to destage
//!   faster than the device takes the same writes one by one). Writing the
//!   newest bytes, possibly of records after the round, never puts an
//!   older write over a newer one: the newer record stays in the log (and
//!   the mirror) until its own round, and a replay writes every record in
//!   log order. A failed device write or release is retried (with a bounded
//!   back-off), never dropped.
//! - **Destage hold**: the destager waits before it writes acknowledged
//!   records, up to [`CacheConfig::destage_hold`] after the oldest of them
//!   was logged (agent option `--cache-destage-hold-ms`, default
//!   [`DESTAGE_HOLD_MS_DEFAULT`]), so a block written again meanwhile
//!   reaches the devices once and neighbouring blocks merge into one
//!   device write — what bcache's `writeback_delay` and dm-writecache's
//!   watermarks are for. It writes at once when someone waits for the
//!   destage (a recall point, a detach, a write-through acknowledgement),
//!   when the log needs space, when the mirror failed, and once the
//!   records not yet written hold a [`DESTAGE_HOLD_LOG_DIVISOR`]th of the
//!   log. Held records are as durable as any acknowledged record: in the
//!   log and, mirrored, in the mirror; a hold only lengthens what a replay
//!   has to write after a failure (at most that share of the log).
//! - **Lazy release**: a release costs a synchronous superblock write here
//!   and a mirror request with a synchronous write there, on the same disks
//!   the next appends wait for. So records on the devices keep their log
//!   space while the destager writes the next rounds, and are released
//!   together when a release is due: someone waits for it (a recall point,
//!   a detach, a write-through acknowledgement), the log needs the space,
//!   they hold a [`RELEASE_LAG_LOG_DIVISOR`]th of the log, or the destager
//!   had nothing to write for [`RELEASE_IDLE_MS`]. Until then they are
//!   still in the log, the mirror and the dirty map, exactly as in the
//!   moment between a round's device writes and its release before: a
//!   replay writes them again, in order, under every newer record, and no
//!   write goes around the log over them. If the mirror fails meanwhile
//!   they are among what it may still hold (see "Stale mirror"), so a
//!   write-through write over them is acknowledged only once the mirror has
//!   been emptied: its replay can never put them back over that write (the
//!   window that had an earlier deferral reverted, bench/README.md).
//! - **Back-pressure**: a write that does not fit waits for log space; it
//!   never fails for lack of it.
//! - **Write-around**: a write of [`WRITE_AROUND_BYTES_MIN`] or more whose
//!   range no logged record touches goes straight to the devices (a FLUSH
//!   then flushes them); large writes gain little from the log and would
//!   cost its bandwidth twice (and, mirrored, the mirror's too: see
//!   "Mirrored"). Acknowledged once the devices have it, as without a cache;
//!   its payload stays in the pipes the export spliced it into, as on a
//!   volume without a cache ([`BlockDevice::wants_write_pipe`]).
//! - **Crash**: opening the cache reads the old log back, writes every
//!   acknowledged record to the devices in order (a torn last batch was
//!   never acknowledged and is ignored; a damaged record in the middle fails
//!   the open with file and offset, and nothing is replayed), flushes them,
//!   and starts a fresh log.
//!
//! **Mirrored** ([`CachedDevice::open_mirrored`], issue 15): every batch is
//! also sent to the metadata server's mirror of the volume's cache
//! ([`CacheMirror`]), concurrently with the local append, and its writes
//! are acknowledged once both are durable; if this agent dies, the server
//! writes what its mirror holds to the devices before anyone opens the
//! volume again. Destaged records are released at the mirror *before* their
//! local log space, so the mirror holds a subset of the dirty map (plus,
//! while a batch is being logged, that batch's not yet acknowledged
//! writes). That is what makes write-around safe on a mirrored cache too:
//! a large write no dirty record touches has no record under it in the
//! mirror either, so the mirror's replay cannot put an older write over it
//! (a record of the batch in flight is concurrent with it, and lands after
//! it both when destaged and when replayed). While the cache writes through
//! the mirror may hold records released here, so nothing goes around then.
//! **Pipelined mirror appends**: the next batch is logged and sent to the
//! mirror while earlier batches still wait for the mirror's answer (at
//! most [`MIRROR_APPENDS_IN_FLIGHT_MAX`]); the server takes the appends of
//! one connection in order and writes those queued together with one sync,
//! so at high queue depth a write waits for one local append and about one
//! mirror round trip, not for the batch before it too. Local appends stay
//! one at a time (see "Durable before acknowledged"). A batch's writes are
//! acknowledged by its answer only if mirroring has not failed (or started
//! afresh, which empties the mirror) since it was sent; otherwise once on
//! the devices, like any write-through write — so an answer that arrives
//! after an earlier append failed never acknowledges a write the mirror may
//! hold without the writes before it.
//! When the mirror fails (the server is down or restarted, or the
//! connection mirroring started on is gone: checked every
//! [`MIRROR_RETRY_MS`] even with no writes),
//! the cache switches to **write-through**: writes are still logged, but
//! acknowledged only once destaged; a background task starts mirroring
//! again every [`MIRROR_RETRY_MS`] until the server answers, and batches
//! are mirrored again from then on.
//! **Mirroring again with the log's records** (a server of protocol 15):
//! the task stages every record still in the log at the mirror
//! ([`CacheMirror::stage`], a copy no replay reads) and then starts the
//! mirror with them ([`CacheMirror::open_staged`]: the server commits the
//! new generation only once it holds the whole copy). No release runs
//! meanwhile ([`Shared::releases`]), so the mirror starts holding exactly
//! the log's records, every one still in the dirty map: it holds a subset
//! of the dirty map again, as write-around needs. Batches logged while the
//! copy was made are not in it: written through, each is acknowledged once
//! destaged and released, and releases from then on go to the new mirror
//! first, so no older copied record can be replayed over it. A write the
//! failed mirror threatened waits as before (see "Stale mirror"), until the
//! new mirror started — and so does one over a staged record: an attempt
//! that fails may still have left its copy as the mirror's file (committed,
//! the answer lost; or prepared by a server that died before the commit).
//! So the cache is mirrored again as soon as the server
//! answers, however much the devices still lack — not only after
//! everything was destaged (minutes behind slow devices), as with an older
//! server, where the task first waits for the destage and then starts the
//! mirror empty ([`CacheMirror::open`]).
//! **Stale mirror**: the failed mirror may still hold records (the server
//! is down, not gone: restarted, it would replay them if this agent died).
//! A write-through write over the range of an older such record would be
//! put back under that record's bytes by the replay — so it is acknowledged
//! only once the mirror has been started afresh, which empties it
//! ([`stale::StaleRanges`]); write-through writes elsewhere are
//! acknowledged once on the devices. Such writes wait for the server (as
//! every write of an agent whose lease runs out does), never fail.
//!
//! `sanvol-agent attach` opens the cache of an exclusively held, cached
//! volume (the owner's attach task, `crate::owner`): after a fresh open
//! the server already replayed its mirror, so an old local log is dropped
//! ([`OldLog::Discard`]); after a resume it is replayed ([`OldLog::Replay`]).
//! A detach destages it first. `examples/cache_serve.rs` serves one volume
//! through the cache without the agent (the crash tests' and
//! `bench/cache.sh`'s peer).
//!
//! **Snapshots** (recall points): before the agent confirms a recall it
//! quiesces the cache ([`CachedDevice::quiesce`]): new batches are held
//! (their writes wait unacknowledged, as writes to an uncached volume wait
//! at its recalled gate), the batch being logged finishes, and everything
//! acknowledged is destaged — so the snapshot holds every acknowledged
//! write, and the mirror holds nothing (mirrored: each destaged record was
//! released there first; write-through: the mirror is started afresh,
//! which empties it). Held writes are logged once the new layout is
//! published ([`CachedDevice::resume_writes`]). After the snapshot, every
//! batch is preceded by [`BeforeLogged`]: the volume device preserves
//! (copies and registers) the chunks the batch touches *before* it is
//! logged and mirrored, so a mirror record is never over a chunk the
//! snapshot still needs, and the server's replay of a dead agent's mirror
//! (which writes the live volume directly) cannot change a snapshot.
//!
//! TRIM, WRITE_ZEROES and BLOCK_STATUS first destage everything
//! acknowledged before them (they must not overtake cached writes, and the
//! devices' allocation answer must include them), then go to the devices.

pub mod clean;
pub mod dirty;
mod log_file;
pub mod mirror;
pub mod report;
mod stale;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use blockio::{BlockDevice, BlockSizes, IoError, MetaContext, Payload, StatusExtent, ZeroFlags};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};
use volume_format::cache_log::{LogAppender, ScanError};
use volume_format::control::messages::{MirrorRecord, MIRROR_APPEND_BYTES_MAX, MIRROR_APPEND_RECORDS_MAX};
use volume_format::VolumeId;

use clean::{CleanBlocks, CleanStats, Lookup};
use dirty::DirtyMap;
use log_file::LogFile;
use stale::StaleRanges;

/// Smallest log file the cache accepts (the ring must hold several of the
/// largest records so a write never waits for space it cannot get).
pub const LOG_BYTES_MIN: u64 = 8 << 20;
/// Writes are logged in records of at most this many bytes.
pub const RECORD_CHUNK_BYTES: usize = 1 << 20;
/// Writes appended with one write + one fdatasync, at most.
pub const BATCH_WRITES_MAX: usize = 256;
/// Bytes appended with one write + one fdatasync, at most.
pub const BATCH_BYTES_MAX: usize = 8 << 20;
// A batch is one mirror append.
const _: () = assert!(
    BATCH_BYTES_MAX <= volume_format::control::messages::MIRROR_APPEND_BYTES_MAX
        && BATCH_WRITES_MAX <= volume_format::control::messages::MIRROR_APPEND_RECORDS_MAX
        && RECORD_CHUNK_BYTES <= BATCH_BYTES_MAX
);
/// Writes waiting to be appended, at most (senders wait for room).
pub const WRITES_QUEUED_MAX: usize = 1024;
/// Bytes of records one destage round takes, at most (at least one record,
/// and at most half the log, so writes fill the other half meanwhile).
pub const DESTAGE_ROUND_BYTES_MAX: u64 = 128 << 20;
/// Bytes of one device write of a destage round, at most.
pub const DESTAGE_WRITE_BYTES_MAX: u64 = 1 << 20;
/// Device writes of a destage round in flight at once, at most.
pub const DESTAGE_WRITES_IN_FLIGHT_MAX: usize = 64;
/// Mirror appends sent and not yet answered, at most (see "Pipelined
/// mirror appends" in the module doc).
pub const MIRROR_APPENDS_IN_FLIGHT_MAX: usize = 4;
/// Writes of at least this many bytes go straight to the devices when no
/// record in the log touches their range (write-around, as bcache's
/// sequential cutoff): large writes gain little from the log and would cost
/// its bandwidth twice. They are then as durable as any device write:
/// FLUSH flushes the devices after them.
pub const WRITE_AROUND_BYTES_MIN: usize = 512 << 10;
/// Log bytes of records on the devices whose space is not yet released, at
/// most this share of the log (see "Lazy release" in the module doc): a
/// release is then made after the next round even while more records wait.
pub const RELEASE_LAG_LOG_DIVISOR: u64 = 4;
/// A destager with nothing left to write releases what it wrote after this
/// long without new work (at once when someone waits for it).
pub const RELEASE_IDLE_MS: u64 = 5;
/// How long acknowledged writes may wait in the cache before the destager
/// writes them, unless configured (see "Destage hold" in the module doc).
pub const DESTAGE_HOLD_MS_DEFAULT: u64 = 1_000;
/// Bytes of writes not yet destaged past which the destager no longer
/// holds: this share of the log.
pub const DESTAGE_HOLD_LOG_DIVISOR: u64 = 4;
/// Back-off between attempts to destage a record the devices refused.
pub const DESTAGE_RETRY_MIN_MS: u64 = 50;
pub const DESTAGE_RETRY_MAX_MS: u64 = 5_000;
/// Memory for clean blocks per cached volume, unless configured.
pub const READ_CACHE_BYTES_DEFAULT: u64 = 64 << 20;
/// Pause between attempts to start mirroring again after the mirror failed.
pub const MIRROR_RETRY_MS: u64 = 1_000;
/// The destage rate a report shows is over this window.
pub const DESTAGE_RATE_WINDOW_MS: u64 = 10_000;
/// Destage rounds remembered for the rate, at most (older ones are
/// dropped first; the rate then shows less than it was).
pub const DESTAGE_SAMPLES_MAX: usize = 4096;

/// The metadata server's mirror of this cache (issue 15), as the cache uses
/// it: the agent implements it over its control connection.
#[async_trait]
pub trait CacheMirror: Send + Sync + 'static {
    /// Starts mirroring afresh: the mirror drops what it held (everything
    /// the cache logged before is on the devices, or not yet acknowledged).
    async fn open(&self) -> Result<(), String>;
    /// Sends a batch; returns once it is on its way (appends reach the
    /// mirror in the order this returns), with the mirror's answer to come:
    /// `Ok` once the batch is durable there.
    async fn append(&self, records: Vec<MirrorRecord>) -> Result<MirrorAck, String>;
    /// Every record up to `upto_seq` is on the devices.
    async fn release(&self, upto_seq: u64) -> Result<(), String>;
    /// Whether the mirror started last can still be reached the way it
    /// was started (`Err`: why not, e.g. the connection it was started on
    /// is gone). A mirror that cannot is failed at once, not at the next
    /// request, so mirroring starts again as soon as it can: see
    /// [`remirror_loop`].
    fn still_mirroring(&self) -> Result<(), String> {
        Ok(())
    }
    /// Whether mirroring can start again with the log's records
    /// ([`CacheMirror::stage`], [`CacheMirror::open_staged`]) rather than
    /// empty: see "Mirroring again with the log's records". `None` while
    /// that cannot be told (the mirror cannot be reached now).
    fn stages(&self) -> Option<bool> {
        Some(false)
    }
    /// Records for the next start of mirroring, attempt `copy` (another
    /// `copy` starts the staged records afresh): durable at the mirror when
    /// this returns, and held by no replay until
    /// [`CacheMirror::open_staged`].
    async fn stage(&self, _copy: u64, _records: Vec<MirrorRecord>) -> Result<(), String> {
        Err("this mirror cannot stage records".into())
    }
    /// Starts mirroring afresh holding attempt `copy`'s `records` staged
    /// records (refused unless the mirror has exactly those).
    async fn open_staged(&self, _copy: u64, _records: u64) -> Result<(), String> {
        Err("this mirror cannot stage records".into())
    }
}

/// The mirror's answer to an append already sent ([`CacheMirror::append`]).
pub type MirrorAck = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Runs before a batch is logged, on the ranges it writes: the agent's
/// volume device preserves the chunks a snapshot still needs there (see
/// "Snapshots" in the module doc).
#[async_trait]
pub trait BeforeLogged: Send + Sync + 'static {
    async fn before_logged(&self, ranges: &[(u64, u64)]) -> Result<(), IoError>;
}

/// One recall point's hold on a cache's new writes
/// ([`CachedDevice::hold_writes`]): tells whether it was ended meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteHold(u64);

/// Whether a cache's writes are mirrored right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorState {
    /// No mirror (a cache only this agent can replay).
    Local,
    Mirrored,
    /// The mirror failed: writes are acknowledged once on the devices.
    WriteThrough {
        why: String,
    },
}

impl std::fmt::Display for MirrorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MirrorState::Local => f.write_str("local"),
            MirrorState::Mirrored => f.write_str("mirrored"),
            MirrorState::WriteThrough { why } => write!(f, "write-through ({why})"),
        }
    }
}

/// Where a volume's cache log lives and how big it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub log_path: PathBuf,
    pub log_bytes: u64,
    /// Memory for clean blocks read from the devices ([`clean`]); 0: none.
    pub read_cache_bytes: u64,
    /// How long acknowledged writes may wait in the cache before the
    /// destager writes them (see "Destage hold"); zero: at once.
    pub destage_hold: Duration,
}

impl CacheConfig {
    /// A log of `log_bytes` at `log_path`, with the default read cache and
    /// destage hold.
    pub fn new(log_path: PathBuf, log_bytes: u64) -> CacheConfig {
        CacheConfig {
            log_path,
            log_bytes,
            read_cache_bytes: READ_CACHE_BYTES_DEFAULT,
            destage_hold: Duration::from_millis(DESTAGE_HOLD_MS_DEFAULT),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache log {path}: cannot {what}: {message}")]
    Io { path: String, what: String, message: String },
    #[error("{0}")]
    Log(#[from] ScanError),
    #[error(
        "cache log {path} belongs to volume {found}, not {expected}: give each volume its own cache log path \
         (replay the other volume's log by attaching that volume first)"
    )]
    OtherVolume { path: String, found: VolumeId, expected: VolumeId },
    #[error("cache log {path}: {log_bytes} bytes is too small; give it at least {LOG_BYTES_MIN} bytes")]
    TooSmall { path: String, log_bytes: u64 },
    #[error("cache log {path}: replaying record {seq} to the devices failed ({message}); the log is kept: retry")]
    Replay { path: String, seq: u64, message: String },
    #[error(
        "cache log {path}: needs {need_bytes} more bytes but its file system has {free_bytes} free; free space \
         there, or give the agent another --cache-dir (or turn the volume's cache off: `sanvol volume cache VOL \
         --mode off`)"
    )]
    NoRoom { path: String, need_bytes: u64, free_bytes: u64 },
}

/// What to do with an old log found where a cache opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldLog {
    /// Write it to the devices first (this agent may hold the only copy:
    /// a crash, or a handle taken back after a restart).
    Replay,
    /// Drop it: the volume was opened afresh, so the server replayed its
    /// mirror — which held every write this log acknowledged — before the
    /// open, and others may have written the volume since (replaying the
    /// log would put older data over theirs).
    Discard,
}

/// What the cache holds, for status displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStatus {
    /// Acknowledged bytes not yet on the devices (overlapping writes count
    /// once).
    pub dirty_bytes: u64,
    /// Log bytes in use, of `log_capacity_bytes`.
    pub log_used_bytes: u64,
    pub log_capacity_bytes: u64,
    /// Records waiting to be destaged.
    pub records: usize,
}

/// [`CacheStatus`] with the mirror's state and the bytes destaged so far
/// (a rate is two readings apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheReport {
    pub status: CacheStatus,
    pub mirror: MirrorState,
    pub destaged_bytes: u64,
    /// Device writes the destager made for them (fewer than the writes
    /// destaged where rewrites were absorbed and neighbours merged).
    pub destage_writes: u64,
    /// Bytes destaged per second over the last [`DESTAGE_RATE_WINDOW_MS`].
    pub destage_bytes_per_sec: u64,
    /// Bytes written around the log so far (see "Write-around").
    pub written_around_bytes: u64,
    /// Write-through writes on the devices that wait for a failed mirror
    /// to be emptied before they are acknowledged (see "Stale mirror").
    pub writes_waiting_for_mirror: u64,
    /// The clean blocks kept for reads (all zero when there is no room
    /// for them).
    pub read_cache: CleanStats,
}

struct WriteReq {
    offset: u64,
    data: Bytes,
    /// Its record's sequence number, once it is in a batch.
    seq: u64,
    done: oneshot::Sender<Result<(), IoError>>,
}

/// An acknowledged record waiting for the devices.
#[derive(Clone)]
struct Queued {
    seq: u64,
    pos: u64,
    offset: u64,
    data: Bytes,
    /// When its batch was logged (see "Destage hold").
    logged_at: Instant,
}

struct State {
    appender: LogAppender,
    dirty: DirtyMap,
    queue: VecDeque<Queued>,
    /// The first records of `queue` that are on the devices (written and
    /// flushed) but whose log space is not yet released ("Lazy release").
    written: usize,
    /// Their data bytes.
    written_bytes: u64,
    /// Data bytes of the records of `queue` after them: not yet written.
    unwritten_bytes: u64,
    /// Tasks waiting for records to be released ([`wait_destaged`],
    /// [`CachedDevice::destage_all`]): the destager releases after every
    /// round while there are any.
    release_waiters: usize,
    /// The append loop waits for log space: release what is written.
    space_wanted: bool,
    /// First position and sequence number of the batch being written.
    in_flight: Option<(u64, u64)>,
    /// Every record up to it is on the devices and released.
    last_destaged_seq: u64,
    /// The log could not be written: later writes fail with this.
    failed: Option<String>,
    mirror_state: MirrorState,
    /// Counts the starts of mirroring: an append's answer counts only if
    /// mirroring did not fail (and start afresh, emptying the mirror) since
    /// it was sent.
    mirror_epoch: u64,
    /// What a failed mirror may still hold (see "Stale mirror" in the
    /// module doc); empty while mirroring.
    stale_mirror: StaleRanges,
    destaged_bytes: u64,
    /// [`CacheReport::destage_writes`].
    destage_writes: u64,
    /// Bytes of writes sent around the log (see "Write-around").
    written_around_bytes: u64,
    /// When each recent destage round finished and its bytes.
    destage_samples: VecDeque<(std::time::Instant, u64)>,
    /// A recall point holds new batches ([`CachedDevice::hold_writes`]).
    held: bool,
    /// Holds ended so far ([`WriteHold`]).
    resumes: u64,
    /// The append loop is past its hold check with a batch (preserving,
    /// logging or mirroring it).
    appending: bool,
}

impl State {
    fn destage_rate(&mut self) -> u64 {
        let window = Duration::from_millis(DESTAGE_RATE_WINDOW_MS);
        let now = std::time::Instant::now();
        while self.destage_samples.front().is_some_and(|(at, _)| now.duration_since(*at) > window) {
            self.destage_samples.pop_front();
        }
        let bytes: u64 = self.destage_samples.iter().map(|(_, b)| b).sum();
        bytes * 1000 / DESTAGE_RATE_WINDOW_MS
    }
}

struct Shared {
    inner: Arc<dyn BlockDevice>,
    mirror: Option<Arc<dyn CacheMirror>>,
    before_logged: Option<Arc<dyn BeforeLogged>>,
    /// Wakes the append loop when a hold ends, and a quiesce when the
    /// append loop is idle.
    hold_changed: Notify,
    /// Wakes the task that starts mirroring again.
    mirror_failed: Notify,
    /// Wakes writes waiting for a failed mirror to be emptied
    /// ([`wait_not_threatened`]).
    mirror_emptied: Notify,
    /// How many wait so (for the report).
    writes_waiting_for_mirror: AtomicU64,
    log: LogFile,
    state: Mutex<State>,
    space_freed: Notify,
    work: Notify,
    destaged: Notify,
    inner_unflushed: AtomicBool,
    /// Held by a release ([`release_written`]) and by a start of mirroring
    /// with the log's records ([`restart_with_records`]): what the latter
    /// copies stays in the log until the mirror holds it (see "Mirroring
    /// again with the log's records").
    releases: tokio::sync::Mutex<()>,
    /// One permit per mirror append that may be unanswered
    /// ([`MIRROR_APPENDS_IN_FLIGHT_MAX`]).
    mirror_slots: Arc<Semaphore>,
    /// Clean blocks for reads ([`clean`]). Never locked while `state` is.
    clean: Option<Mutex<CleanBlocks>>,
    /// [`CacheConfig::destage_hold`].
    destage_hold: Duration,
}

impl State {
    /// Whether a record still in the log touches `[offset, offset+len)`.
    /// A record leaves the dirty map only once its log space is released,
    /// and every byte of a record still in the log is in the dirty map or
    /// was replaced there by a newer record, also still in the log (records
    /// are released in order).
    fn logged(&self, offset: u64, len: u64) -> bool {
        !self.dirty.overlay(offset, len).is_empty()
    }

    /// Whether a large write to `[offset, offset + len)` may go straight to
    /// the devices: no record in the log touches the range (an older record
    /// destaged or replayed after it would put old bytes over it), and no
    /// mirror can hold one there either — with no mirror, or while
    /// mirroring (the mirror then holds a subset of the dirty map, or of
    /// the batch being logged, whose writes are not yet acknowledged and so
    /// concurrent with this one). Not while write-through: the mirror may
    /// still hold records released here (see "Stale mirror").
    fn may_write_around(&self, offset: u64, len: u64) -> bool {
        matches!(self.mirror_state, MirrorState::Local | MirrorState::Mirrored) && !self.logged(offset, len)
    }

    /// The mirror was started afresh (it holds nothing): batches are
    /// mirrored again, and answers to appends sent before do not count.
    /// Wake [`Shared::mirror_emptied`] after.
    fn mirroring_again(&mut self) {
        self.mirror_state = MirrorState::Mirrored;
        self.mirror_epoch += 1;
        self.stale_mirror.clear();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still the
        // best record of what is cached, so keep using it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn clean(&self) -> Option<std::sync::MutexGuard<'_, CleanBlocks>> {
        self.clean.as_ref().map(|c| c.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The devices' bytes of the range changed (or may have): see
    /// [`clean`].
    fn devices_changed(&self, offset: u64, len: u64) {
        if let Some(mut clean) = self.clean() {
            clean.invalidate(offset, len);
        }
    }

    /// A request that changes the devices' bytes of the range is under way:
    /// the clean blocks there are dropped when the returned guard is —
    /// after the request, whether it succeeded, failed or was abandoned.
    fn changing(&self, offset: u64, len: u64) -> impl Drop + '_ {
        struct Changing<'a>(&'a Shared, u64, u64);
        impl Drop for Changing<'_> {
            fn drop(&mut self) {
                self.0.devices_changed(self.1, self.2);
            }
        }
        Changing(self, offset, len)
    }

    /// Reads the devices, through the clean blocks.
    async fn read_devices(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let ticket = match self.clean().map(|mut c| c.lookup_or_begin(offset, len as u64)) {
            None => return self.inner.read(offset, len).await,
            Some(Lookup::Hit(bytes)) => return Ok(bytes),
            Some(Lookup::Miss(ticket)) => ticket,
        };
        // Ends the ticket also when this read is abandoned.
        struct Reading<'a>(&'a Shared, u64, Option<Bytes>);
        impl Drop for Reading<'_> {
            fn drop(&mut self) {
                if let Some(mut clean) = self.0.clean() {
                    clean.finish(self.1, self.2.as_ref());
                }
            }
        }
        let mut reading = Reading(self, ticket, None);
        let data = self.inner.read(offset, len).await?;
        reading.2 = Some(data.clone());
        Ok(data)
    }
}

/// The cache in front of one volume's data path. Dropping it stops its
/// tasks at once (what a crash would do: the log keeps what was
/// acknowledged); [`CachedDevice::close`] destages everything first.
pub struct CachedDevice {
    shared: Arc<Shared>,
    replayed_records: usize,
    writes: mpsc::Sender<WriteReq>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for CachedDevice {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl CachedDevice {
    /// Whether a write of `len` bytes at `offset` goes straight to the
    /// devices: see [`WRITE_AROUND_BYTES_MIN`] and "Write-around" in the
    /// module doc.
    fn goes_around(&self, offset: u64, len: usize) -> bool {
        len >= WRITE_AROUND_BYTES_MIN && self.shared.lock().may_write_around(offset, len as u64)
    }

    /// Reads `[offset, offset + len)`: the devices' bytes (through the
    /// clean blocks) with `overlay`, the cached bytes there taken before,
    /// laid over them.
    async fn read_under(&self, offset: u64, len: u32, overlay: Vec<(u64, Bytes)>) -> Result<Bytes, IoError> {
        if dirty::covers(&overlay, len as u64) {
            return Ok(dirty::join(overlay));
        }
        let read = self.shared.read_devices(offset, len).await?;
        if overlay.is_empty() {
            return Ok(read);
        }
        let mut out = BytesMut::from(&read[..]);
        for (at, data) in overlay {
            let start = (at - offset) as usize;
            out[start..start + data.len()].copy_from_slice(&data);
        }
        Ok(out.freeze())
    }

    /// Writes `data` straight to the devices ([`Self::goes_around`]).
    async fn write_around(&self, offset: u64, data: Payload, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        tracing::debug!(offset, len, "write goes around the cache, straight to the devices");
        let changing = self.shared.changing(offset, len);
        let written = self.shared.inner.write_payload(offset, data, fua).await;
        drop(changing);
        written?;
        self.shared.inner_unflushed.store(true, Ordering::SeqCst);
        self.shared.lock().written_around_bytes += len;
        Ok(())
    }

    /// Opens the cache of `volume` over `inner`: replays an old log at
    /// `config.log_path` to `inner` (see the module doc), then starts a
    /// fresh log there.
    pub async fn open(
        inner: Arc<dyn BlockDevice>,
        volume: VolumeId,
        config: &CacheConfig,
    ) -> Result<CachedDevice, CacheError> {
        CachedDevice::open_with(inner, volume, config, None, OldLog::Replay, None).await
    }

    /// [`CachedDevice::open`], every batch also mirrored at `mirror` (see
    /// the module doc). Mirroring starts once the old log is replayed; if
    /// the mirror cannot be reached the cache starts write-through.
    pub async fn open_mirrored(
        inner: Arc<dyn BlockDevice>,
        volume: VolumeId,
        config: &CacheConfig,
        mirror: Arc<dyn CacheMirror>,
    ) -> Result<CachedDevice, CacheError> {
        CachedDevice::open_with(inner, volume, config, Some(mirror), OldLog::Replay, None).await
    }

    /// [`CachedDevice::open_mirrored`], with a choice about an old log
    /// (see [`OldLog`]): `sanvol-agent attach` discards it after a fresh
    /// open and replays it when it took its handle back after a restart.
    /// `before_logged` runs before every batch is logged (the agent's volume
    /// device: snapshots' copy-on-write, see the module doc).
    pub async fn open_mirrored_with(
        inner: Arc<dyn BlockDevice>,
        volume: VolumeId,
        config: &CacheConfig,
        mirror: Arc<dyn CacheMirror>,
        old: OldLog,
        before_logged: Option<Arc<dyn BeforeLogged>>,
    ) -> Result<CachedDevice, CacheError> {
        CachedDevice::open_with(inner, volume, config, Some(mirror), old, before_logged).await
    }

    async fn open_with(
        inner: Arc<dyn BlockDevice>,
        volume: VolumeId,
        config: &CacheConfig,
        mirror: Option<Arc<dyn CacheMirror>>,
        old: OldLog,
        before_logged: Option<Arc<dyn BeforeLogged>>,
    ) -> Result<CachedDevice, CacheError> {
        let path = config.log_path.display().to_string();
        if config.log_bytes < LOG_BYTES_MIN {
            return Err(CacheError::TooSmall { path, log_bytes: config.log_bytes });
        }
        let log_path = config.log_path.clone();
        let (log, existed) = blocking(move || LogFile::open(&log_path)).await?;
        let (log, replayed) = match (existed, old) {
            (false, _) => (log, Vec::new()),
            (true, OldLog::Replay) => replay(log, &inner, volume).await?,
            (true, OldLog::Discard) => {
                // Another volume's log is never dropped silently.
                let (log, scanned) = blocking(move || {
                    let scanned = log.scan(volume);
                    Ok((log, scanned))
                })
                .await?;
                match scanned {
                    Err(e @ CacheError::OtherVolume { .. }) => return Err(e),
                    Err(e) => warn!(log = %path, error = %e, "dropping an old cache log that does not scan"),
                    Ok(scanned) => info!(
                        log = %path,
                        records = scanned.records.len(),
                        "dropping the old cache log: the server replayed its mirror before this open"
                    ),
                }
                (log, Vec::new())
            }
        };
        let replayed_records = replayed.len();
        let log_bytes = config.log_bytes;
        let room_path = config.log_path.clone();
        blocking(move || check_room(&room_path, log_bytes)).await?;
        let (log, appender) = blocking(move || log.create(volume, log_bytes).map(|appender| (log, appender))).await?;
        let mirror_state = match &mirror {
            None => MirrorState::Local,
            Some(m) => match m.open().await {
                Ok(()) => MirrorState::Mirrored,
                Err(why) => {
                    warn!(%why, "cannot start mirroring the cache; write-through until the mirror answers");
                    MirrorState::WriteThrough { why }
                }
            },
        };
        // A replayed log (a resume) was mirrored by the previous incarnation,
        // and the mirror could not be emptied: its records may still be
        // there, older than every new write (sequence 0).
        let mut stale_mirror = StaleRanges::default();
        if matches!(mirror_state, MirrorState::WriteThrough { .. }) {
            for (offset, len) in &replayed {
                stale_mirror.add(*offset, *len, 0);
            }
        }
        let shared = Arc::new(Shared {
            inner,
            mirror,
            before_logged,
            hold_changed: Notify::new(),
            mirror_failed: Notify::new(),
            mirror_emptied: Notify::new(),
            writes_waiting_for_mirror: AtomicU64::new(0),
            releases: tokio::sync::Mutex::new(()),
            log,
            state: Mutex::new(State {
                appender,
                dirty: DirtyMap::default(),
                queue: VecDeque::new(),
                written: 0,
                written_bytes: 0,
                unwritten_bytes: 0,
                release_waiters: 0,
                space_wanted: false,
                in_flight: None,
                last_destaged_seq: 0,
                failed: None,
                mirror_state,
                mirror_epoch: 0,
                stale_mirror,
                destaged_bytes: 0,
                destage_writes: 0,
                written_around_bytes: 0,
                destage_samples: VecDeque::new(),
                held: false,
                resumes: 0,
                appending: false,
            }),
            space_freed: Notify::new(),
            work: Notify::new(),
            destaged: Notify::new(),
            inner_unflushed: AtomicBool::new(false),
            mirror_slots: Arc::new(Semaphore::new(MIRROR_APPENDS_IN_FLIGHT_MAX)),
            clean: CleanBlocks::new(config.read_cache_bytes).map(Mutex::new),
            destage_hold: config.destage_hold,
        });
        let (writes, rx) = mpsc::channel(WRITES_QUEUED_MAX);
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let mut tasks = vec![
            tokio::spawn(append_loop(shared.clone(), rx, acks)),
            tokio::spawn(ack_loop(shared.clone(), acks_rx)),
            tokio::spawn(destage_loop(shared.clone())),
        ];
        if shared.mirror.is_some() {
            tasks.push(tokio::spawn(remirror_loop(shared.clone())));
        }
        Ok(CachedDevice { shared, replayed_records, writes, tasks })
    }

    /// Records of an old log written to the devices when the cache opened.
    pub fn replayed_records(&self) -> usize {
        self.replayed_records
    }

    pub fn status(&self) -> CacheStatus {
        let state = self.shared.lock();
        // Records on the devices whose space is not yet released are not
        // dirty (a byte of theirs a newer record overwrote counts once, in
        // the dirty map, so the sum of the others caps it).
        let waiting = state.queue.range(state.written..);
        let waiting_bytes: u64 = waiting.map(|q| q.data.len() as u64).sum();
        CacheStatus {
            dirty_bytes: state.dirty.bytes().min(waiting_bytes),
            log_used_bytes: state.appender.ring().used_bytes(),
            log_capacity_bytes: state.appender.ring().capacity_bytes(),
            records: state.queue.len() - state.written,
        }
    }

    /// The status with the mirror's state and the bytes destaged so far.
    pub fn report(&self) -> CacheReport {
        let status = self.status();
        let mut state = self.shared.lock();
        let destage_bytes_per_sec = state.destage_rate();
        CacheReport {
            status,
            mirror: state.mirror_state.clone(),
            destaged_bytes: state.destaged_bytes,
            destage_writes: state.destage_writes,
            destage_bytes_per_sec,
            written_around_bytes: state.written_around_bytes,
            writes_waiting_for_mirror: self.shared.writes_waiting_for_mirror.load(Ordering::SeqCst),
            read_cache: self.shared.clean().map(|c| c.stats()).unwrap_or_default(),
        }
    }

    /// Waits until every write acknowledged before the call is on the
    /// devices (and flushed there).
    pub async fn destage_all(&self) {
        let target = self.shared.lock().queue.back().map(|q| q.seq);
        let Some(target) = target else { return };
        wait_destaged(&self.shared, target).await;
    }

    /// A recall point (a snapshot or another reconfiguration) starts: new
    /// writes wait, unacknowledged, until [`CachedDevice::resume_writes`].
    /// Then [`CachedDevice::quiesce`].
    pub fn hold_writes(&self) -> WriteHold {
        let mut state = self.shared.lock();
        state.held = true;
        WriteHold(state.resumes)
    }

    /// Whether `hold` has not been ended by [`CachedDevice::resume_writes`]
    /// (a new layout, a revocation) since it was taken.
    pub fn hold_is_current(&self, hold: WriteHold) -> bool {
        self.shared.lock().resumes == hold.0
    }

    /// After [`CachedDevice::hold_writes`]: waits for the batch being
    /// logged, destages everything acknowledged, and makes sure the mirror
    /// holds nothing (see "Snapshots" in the module doc). Returns once the
    /// devices hold every acknowledged write; an error says the mirror could
    /// not be emptied (retry; the hold stays until writes are resumed).
    pub async fn quiesce(&self) -> Result<(), String> {
        loop {
            let notified = self.shared.hold_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.shared.lock().appending {
                break;
            }
            notified.await;
        }
        self.destage_all().await;
        let Some(mirror) = &self.shared.mirror else { return Ok(()) };
        // Mirrored: every destaged record was released at the mirror before
        // the destage counted it. Write-through: the mirror may still hold
        // records from before it failed (all on the devices now): start it
        // afresh, which empties it.
        if self.shared.lock().mirror_state == MirrorState::Mirrored {
            return Ok(());
        }
        mirror.open().await.map_err(|why| format!("the cache mirror cannot be emptied for the recall: {why}"))?;
        info!("the cache mirror answers again (emptied at a recall point); writes are mirrored from now on");
        self.shared.lock().mirroring_again();
        self.shared.mirror_emptied.notify_waiters();
        Ok(())
    }

    /// Ends a [`CachedDevice::quiesce`]'s hold: held writes are logged (and
    /// acknowledged) from now on.
    pub fn resume_writes(&self) {
        {
            let mut state = self.shared.lock();
            state.held = false;
            state.resumes += 1;
        }
        self.shared.hold_changed.notify_waiters();
    }

    /// Destages everything, then stops.
    pub async fn close(self) {
        self.destage_all().await;
    }
}

/// Whether the log file at `path` can grow to `log_bytes` (it is
/// preallocated: a full file system shows at the open, not at a write).
fn check_room(path: &std::path::Path, log_bytes: u64) -> Result<(), CacheError> {
    use std::os::unix::ffi::OsStrExt;
    let have = path.metadata().map(|m| m.len()).unwrap_or(0);
    let need_bytes = log_bytes.saturating_sub(have);
    if need_bytes == 0 {
        return Ok(());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| CacheError::Io {
        path: path.display().to_string(),
        what: "name".into(),
        message: e.to_string(),
    })?;
    // SAFETY: `c_path` is a valid NUL-terminated string and `stats` a
    // plain struct statvfs fills in.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(CacheError::Io {
            path: path.display().to_string(),
            what: "statvfs".into(),
            message: e.to_string(),
        });
    }
    let free_bytes = (stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64);
    if free_bytes < need_bytes {
        return Err(CacheError::NoRoom { path: path.display().to_string(), need_bytes, free_bytes });
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(CacheError::Io { path: String::new(), what: "run a file operation".into(), message: e.to_string() })
    })
}

/// Writes every acknowledged record of the old log to `inner`, in order,
/// and flushes it. Nothing is written when the scan finds damage.
/// Writes an old log's records to `inner`, in order; returns the log and
/// the range of each record replayed.
async fn replay(
    log: LogFile,
    inner: &Arc<dyn BlockDevice>,
    volume: VolumeId,
) -> Result<(LogFile, Vec<(u64, u64)>), CacheError> {
    let (log, scanned) = blocking(move || log.scan(volume).map(|scanned| (log, scanned))).await?;
    let path = log.path.display().to_string();
    let log = Arc::new(log);
    for record in &scanned.records {
        let (reader, record) = (log.clone(), *record);
        let data = blocking(move || reader.read_record(&record).map_err(CacheError::Log)).await?;
        let failed =
            |e: IoError| CacheError::Replay { path: path.clone(), seq: record.header.seq, message: e.to_string() };
        inner.write(record.header.offset, Bytes::from(data), false).await.map_err(failed)?;
    }
    if let Some(last) = scanned.records.last() {
        inner.flush().await.map_err(|e| CacheError::Replay {
            path: path.clone(),
            seq: last.header.seq,
            message: format!("flush: {e}"),
        })?;
        info!(log = %path, records = scanned.records.len(), "cache log replayed to the devices");
    }
    let ranges = scanned.records.iter().map(|r| (r.header.offset, u64::from(r.header.length))).collect();
    Ok((Arc::into_inner(log).expect("the replay's readers are done"), ranges))
}

/// Takes queued writes in batches: place them in the log, write + sync
/// once, then make them visible to reads and the destager, and acknowledge.
async fn append_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<WriteReq>, acks: mpsc::UnboundedSender<Mirroring>) {
    let mut pending: VecDeque<WriteReq> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(write) => pending.push_back(write),
                None => return,
            }
        }
        let mut bytes: usize = pending.iter().map(|w| w.data.len()).sum();
        while pending.len() < BATCH_WRITES_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(write) => {
                    bytes += write.data.len();
                    pending.push_back(write);
                }
                Err(_) => break,
            }
        }
        // A recall point holds batches: wait (see `CachedDevice::quiesce`).
        {
            let notified = shared.hold_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let held = {
                let mut state = shared.lock();
                state.appending = !state.held;
                state.held
            };
            if held {
                notified.await;
                continue;
            }
        }
        let taken = append_batch(&shared, &mut pending, &acks).await;
        shared.lock().appending = false;
        shared.hold_changed.notify_waiters();
        if taken == 0 {
            // The log is full: wait for the destager to release space
            // (asked to release what it wrote at once).
            let freed = shared.space_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            shared.lock().space_wanted = true;
            shared.work.notify_one();
            freed.await;
        }
    }
}

/// The writes of the next batch, at most: what one batch may carry.
fn batch_candidates(pending: &VecDeque<WriteReq>) -> usize {
    let mut bytes = 0;
    let mut count = 0;
    for write in pending.iter().take(BATCH_WRITES_MAX) {
        if count > 0 && bytes + write.data.len() > BATCH_BYTES_MAX {
            break;
        }
        bytes += write.data.len();
        count += 1;
    }
    count
}

/// A logged batch whose mirror append is on its way: its writes are
/// acknowledged once the mirror answers ([`ack_loop`]).
struct Mirroring {
    taken: Vec<WriteReq>,
    last_seq: u64,
    /// [`State::mirror_epoch`] when it was sent.
    epoch: u64,
    answer: MirrorAck,
    _slot: OwnedSemaphorePermit,
}

/// Logs (and mirrors) one batch from the front of `pending`, after
/// [`BeforeLogged`]; returns how many writes it took (0: the log is full).
/// A mirrored batch's writes are acknowledged by [`ack_loop`], once the
/// mirror answers: the next batch is logged (and sent) meanwhile.
async fn append_batch(
    shared: &Arc<Shared>,
    pending: &mut VecDeque<WriteReq>,
    acks: &mpsc::UnboundedSender<Mirroring>,
) -> usize {
    // A slot for the mirror append first: at most
    // MIRROR_APPENDS_IN_FLIGHT_MAX wait for the mirror's answer.
    let slot = match &shared.mirror {
        Some(_) => Some(shared.mirror_slots.clone().acquire_owned().await.expect("the semaphore is never closed")),
        None => None,
    };
    let candidates = batch_candidates(pending);
    if let Some(before) = &shared.before_logged {
        let ranges: Vec<(u64, u64)> =
            pending.iter().take(candidates).map(|w| (w.offset, w.data.len() as u64)).collect();
        if let Err(e) = before.before_logged(&ranges).await {
            // Not logged, not acknowledged: these writes fail (as the same
            // write straight to the volume would).
            for write in pending.drain(..candidates) {
                let _ = write.done.send(Err(e.clone()));
            }
            return candidates;
        }
    }
    let (batch, taken) = {
        let mut state = shared.lock();
        if let Some(reason) = &state.failed {
            let reason = reason.clone();
            drop(state);
            let failed = pending.len();
            for write in pending.drain(..) {
                let _ = write.done.send(Err(IoError::io(reason.clone())));
            }
            return failed;
        }
        // At most BATCH_BYTES_MAX (what one mirror append may carry), and
        // always the first write.
        let mut bytes = 0;
        let within = pending
            .iter()
            .take(candidates)
            .enumerate()
            .take_while(|(i, w)| {
                bytes += w.data.len();
                *i == 0 || bytes <= BATCH_BYTES_MAX
            })
            .count();
        let writes = || pending.iter().take(within);
        let mut batch = state.appender.begin_batch_for(writes().map(|w| w.data.len()));
        let mut taken = 0;
        for write in writes() {
            if !state.appender.push(&mut batch, write.offset, &write.data) {
                break;
            }
            taken += 1;
        }
        if taken > 0 {
            state.in_flight = Some((batch.regions[0].pos, batch.first_seq));
        }
        (batch, taken)
    };
    if taken == 0 {
        return 0;
    }
    let count = taken;
    let taken: Vec<WriteReq> = pending
        .drain(..taken)
        .zip(&batch.records)
        .map(|(write, record)| WriteReq { seq: record.seq, ..write })
        .collect();
    let (mirror, epoch) = {
        let state = shared.lock();
        match (&shared.mirror, &state.mirror_state) {
            (Some(mirror), MirrorState::Mirrored) => (Some(mirror.clone()), state.mirror_epoch),
            _ => (None, state.mirror_epoch),
        }
    };
    let last_seq = batch.records.last().map_or(0, |r| r.seq);
    let records: Option<Vec<MirrorRecord>> = mirror.as_ref().map(|_| {
        batch
            .records
            .iter()
            .zip(&taken)
            .map(|(r, w)| MirrorRecord { seq: r.seq, offset: w.offset, data: w.data.to_vec() })
            .collect()
    });
    // The local append and the mirror's, concurrently: one round trip. The
    // mirror's is sent first (polled first): its round trip is the longer
    // leg, and starting the local one (a wake of a blocking-pool thread)
    // first delayed it by about 15 µs at QD1. Only the sending is waited
    // for here (appends reach the mirror in the
    // order they are sent); the answer, by `ack_loop`.
    let sent = async {
        let (mirror, records) = (mirror?, records?);
        Some(mirror.append(records).await)
    };
    let writer = shared.clone();
    let local = blocking(move || writer.log.append(&batch).map(|()| batch));
    let (sent, written) = futures::join!(sent, local);
    match written {
        Ok(batch) => {
            {
                let mut state = shared.lock();
                // Sent to a mirror that failed since (or may have failed on
                // it): the mirror may hold it; a failure from now on finds
                // it in the queue.
                let current = state.mirror_epoch == epoch && state.mirror_state == MirrorState::Mirrored;
                if sent.is_some() && !current {
                    for write in &taken {
                        state.stale_mirror.add(write.offset, write.data.len() as u64, write.seq);
                    }
                }
                let logged_at = Instant::now();
                for (record, write) in batch.records.iter().zip(&taken) {
                    state.dirty.insert(write.offset, write.data.clone(), record.seq);
                    state.unwritten_bytes += write.data.len() as u64;
                    state.queue.push_back(Queued {
                        seq: record.seq,
                        pos: record.pos,
                        offset: write.offset,
                        data: write.data.clone(),
                        logged_at,
                    });
                }
                state.in_flight = None;
            }
            shared.work.notify_one();
            match sent {
                Some(Ok(answer)) => {
                    let slot = slot.expect("a mirrored cache takes a slot for every batch");
                    let mirroring = Mirroring { taken, last_seq, epoch, answer, _slot: slot };
                    if let Err(mpsc::error::SendError(m)) = acks.send(mirroring) {
                        // The cache is being dropped: as a crash would.
                        drop(m.taken);
                    }
                }
                // No mirror at all: durable here is enough.
                None if shared.mirror.is_none() => ack(taken),
                Some(Err(why)) => {
                    mirror_failed(shared, epoch, why);
                    ack_when_destaged(shared, taken, last_seq);
                }
                None => ack_when_destaged(shared, taken, last_seq),
            }
        }
        Err(e) => {
            let reason = format!("{e}; the volume's cache cannot take writes: detach the volume and fix the log");
            warn!(%reason, "cache log append failed");
            {
                let mut state = shared.lock();
                state.failed = Some(reason.clone());
                state.in_flight = None;
            }
            for write in taken {
                let _ = write.done.send(Err(IoError::io(reason.clone())));
            }
        }
    }
    count
}

/// Acknowledges mirrored batches as the mirror answers, in the order they
/// were sent: once durable here and there, or — if mirroring failed or
/// started afresh since the batch was sent — once on the devices.
async fn ack_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Mirroring>) {
    let current = |epoch: u64| {
        let state = shared.lock();
        state.mirror_epoch == epoch && state.mirror_state == MirrorState::Mirrored
    };
    while let Some(m) = rx.recv().await {
        let Mirroring { taken, last_seq, epoch, answer, _slot } = m;
        if !current(epoch) {
            // Mirroring failed since it was sent: its answer cannot count,
            // so do not wait for it (a stopped server answers nothing until
            // each request's timeout).
            ack_when_destaged(&shared, taken, last_seq);
            continue;
        }
        let answer = answer.await;
        match answer {
            Ok(()) if current(epoch) => ack(taken),
            Ok(()) => ack_when_destaged(&shared, taken, last_seq),
            Err(why) => {
                mirror_failed(&shared, epoch, why);
                ack_when_destaged(&shared, taken, last_seq);
            }
        }
    }
}

fn ack(taken: Vec<WriteReq>) {
    for write in taken {
        let _ = write.done.send(Ok(()));
    }
}

/// Write-through: acknowledges `taken` once the devices have everything
/// up to `last_seq` (without holding up the next batch) — and, for a write
/// an older record of a failed mirror touches, once that mirror has been
/// emptied (see "Stale mirror" in the module doc).
fn ack_when_destaged(shared: &Arc<Shared>, taken: Vec<WriteReq>, last_seq: u64) {
    let shared = shared.clone();
    tokio::spawn(async move {
        wait_destaged(&shared, last_seq).await;
        // The others first: one threatened write holds up no other.
        let threatened: Vec<WriteReq> = {
            let state = shared.lock();
            let (threatened, safe): (Vec<_>, Vec<_>) =
                taken.into_iter().partition(|w| state.stale_mirror.threatens(w.offset, w.data.len() as u64, w.seq));
            drop(state);
            ack(safe);
            threatened
        };
        shared.writes_waiting_for_mirror.fetch_add(threatened.len() as u64, Ordering::SeqCst);
        for write in threatened {
            wait_not_threatened(&shared, &write).await;
            shared.writes_waiting_for_mirror.fetch_sub(1, Ordering::SeqCst);
            let _ = write.done.send(Ok(()));
        }
    });
}

/// Returns once no record of a failed mirror older than `write` touches
/// its range (the mirror was emptied, or never held one there).
async fn wait_not_threatened(shared: &Shared, write: &WriteReq) {
    let mut logged = false;
    loop {
        let notified = shared.mirror_emptied.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !shared.lock().stale_mirror.threatens(write.offset, write.data.len() as u64, write.seq) {
            return;
        }
        if !logged {
            logged = true;
            tracing::debug!(
                offset = write.offset,
                len = write.data.len(),
                "a write-through write over records the failed mirror may hold waits for the mirror to be emptied"
            );
        }
        notified.await;
    }
}

/// Returns once every record up to `seq` is on the devices and released
/// (from the log, and from the mirror while mirroring). Counted among the
/// [`State::release_waiters`] meanwhile, so the destager releases at once.
async fn wait_destaged(shared: &Shared, seq: u64) {
    struct Waiting<'a>(&'a Shared);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.lock().release_waiters -= 1;
        }
    }
    let _waiting = {
        let mut state = shared.lock();
        if state.last_destaged_seq >= seq {
            return;
        }
        state.release_waiters += 1;
        Waiting(shared)
    };
    shared.work.notify_one();
    loop {
        let notified = shared.destaged.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if shared.lock().last_destaged_seq >= seq {
            return;
        }
        notified.await;
    }
}

/// The mirror failed (a request sent while mirroring was in `epoch`):
/// write-through until it is started again. A failure from before the
/// mirror was last started afresh changes nothing.
fn mirror_failed(shared: &Shared, epoch: u64, why: String) {
    let mut state = shared.lock();
    if state.mirror_state == MirrorState::Mirrored && state.mirror_epoch == epoch {
        warn!(%why, "the cache mirror failed; writes are acknowledged once on the devices until it answers again");
        state.mirror_state = MirrorState::WriteThrough { why };
        // The mirror holds a subset of the queue (released records leave
        // it first), plus batches still being logged, which find the
        // failure when they are queued.
        let State { queue, stale_mirror, .. } = &mut *state;
        for q in queue.iter() {
            stale_mirror.add(q.offset, q.data.len() as u64, q.seq);
        }
        shared.mirror_failed.notify_one();
    }
}

/// Starts mirroring again after a failure, every [`MIRROR_RETRY_MS`] until
/// the mirror answers (see the module doc).
async fn remirror_loop(shared: Arc<Shared>) {
    let Some(mirror) = shared.mirror.clone() else { return };
    loop {
        let failed = matches!(shared.lock().mirror_state, MirrorState::WriteThrough { .. });
        if !failed {
            // Until a request fails, or the way to the mirror is gone (a
            // lost control connection: with no writes and a long destage
            // round, no request would tell for a long time).
            let wait = Duration::from_millis(MIRROR_RETRY_MS);
            if tokio::time::timeout(wait, shared.mirror_failed.notified()).await.is_err() {
                if let Err(why) = mirror.still_mirroring() {
                    let epoch = shared.lock().mirror_epoch;
                    mirror_failed(&shared, epoch, why);
                }
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(MIRROR_RETRY_MS)).await;
        let Some(stages) = mirror.stages() else { continue };
        if stages {
            match restart_with_records(&shared, &*mirror).await {
                Ok(records) => info!(
                    records,
                    "the cache mirror answers again, holding the records not yet released here; writes are mirrored \
                     from now on"
                ),
                Err(why) => {
                    let mut state = shared.lock();
                    if state.mirror_state != MirrorState::Mirrored {
                        state.mirror_state = MirrorState::WriteThrough { why };
                    }
                }
            }
            continue;
        }
        // Starting afresh drops the mirror's copies: first every write it
        // acknowledged must be on the devices (later ones are acknowledged
        // only once they are).
        let target = shared.lock().queue.back().map(|q| q.seq);
        if let Some(target) = target {
            wait_destaged(&shared, target).await;
        }
        match mirror.open().await {
            Ok(()) => {
                info!("the cache mirror answers again; writes are mirrored from now on");
                shared.lock().mirroring_again();
                shared.mirror_emptied.notify_waiters();
            }
            Err(why) => shared.lock().mirror_state = MirrorState::WriteThrough { why },
        }
    }
}

/// Starts mirroring again holding every record still in the log (see
/// "Mirroring again with the log's records"): stages them at the mirror in
/// log order, then opens it with them. No release runs meanwhile, so what
/// the mirror gets is still in the log and the dirty map when mirroring
/// starts. Returns how many records the mirror got.
async fn restart_with_records(shared: &Arc<Shared>, mirror: &dyn CacheMirror) -> Result<usize, String> {
    let _no_release = shared.releases.lock().await;
    let records: Vec<Queued> = {
        let mut state = shared.lock();
        let records: Vec<Queued> = state.queue.iter().cloned().collect();
        // Once staged, they may be the mirror's file even if this attempt
        // never hears so: the server commits the new generation and its
        // answer is lost, or it prepares the generation and dies before the
        // commit (its replay then takes the prepared file). Until mirroring
        // starts again they are among what a failed mirror may hold (seen
        // while modelling this restart in the simulator: a write-through
        // write over a record logged after the mirror failed was
        // acknowledged, and a replay of the staged copy would put the record
        // back over it).
        for q in &records {
            state.stale_mirror.add(q.offset, q.data.len() as u64, q.seq);
        }
        records
    };
    if records.is_empty() {
        mirror.open().await?;
    } else {
        let copy = {
            let mut bytes = [0u8; 8];
            getrandom::getrandom(&mut bytes).map_err(|e| format!("picking a staging id: {e}"))?;
            u64::from_be_bytes(bytes)
        };
        let mut rest = records.as_slice();
        while !rest.is_empty() {
            let mut bytes = 0;
            let count = rest
                .iter()
                .take(MIRROR_APPEND_RECORDS_MAX)
                .take_while(|r| {
                    bytes += r.data.len();
                    bytes <= MIRROR_APPEND_BYTES_MAX
                })
                .count()
                .max(1);
            let (chunk, later) = rest.split_at(count);
            let chunk = chunk.iter().map(|q| MirrorRecord { seq: q.seq, offset: q.offset, data: q.data.to_vec() });
            mirror.stage(copy, chunk.collect()).await?;
            rest = later;
        }
        mirror.open_staged(copy, records.len() as u64).await?;
    }
    shared.lock().mirroring_again();
    shared.mirror_emptied.notify_waiters();
    Ok(records.len())
}

/// The records of the next destage round: consecutive from the oldest, at
/// most `max_bytes` of them (and at least one).
fn next_round<'a>(queue: impl Iterator<Item = &'a Queued>, max_bytes: u64) -> Vec<Queued> {
    let mut round: Vec<Queued> = Vec::new();
    let mut bytes = 0u64;
    for record in queue {
        if !round.is_empty() && bytes + record.data.len() as u64 > max_bytes {
            break;
        }
        bytes += record.data.len() as u64;
        round.push(record.clone());
    }
    round
}

/// The device writes of a round: the union of its records' ranges, sorted,
/// adjacent and overlapping ranges merged, cut into writes of at most
/// [`DESTAGE_WRITE_BYTES_MAX`], each carrying the newest cached bytes
/// there (pieces of the dirty map, joined only when written: [`dirty::join`]).
/// Every byte of a round's record is in the dirty map — its own or a newer
/// record's — until the round is released; `None` if not (a bug: the
/// caller then writes the records one by one, in order).
fn plan_round(round: &[Queued], dirty: &DirtyMap) -> Option<Vec<PlannedWrite>> {
    let mut ranges: Vec<(u64, u64)> = round.iter().map(|r| (r.offset, r.offset + r.data.len() as u64)).collect();
    ranges.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match runs.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => runs.push((start, end)),
        }
    }
    let mut writes = Vec::new();
    for (start, end) in runs {
        let mut at = start;
        while at < end {
            let len = (end - at).min(DESTAGE_WRITE_BYTES_MAX);
            let pieces = dirty.overlay(at, len);
            if !dirty::covers(&pieces, len) {
                return None;
            }
            writes.push((at, pieces));
            at += len;
        }
    }
    Some(writes)
}

/// One device write of a destage round: where, and the dirty map's pieces
/// that fill it, in order.
type PlannedWrite = (u64, Vec<(u64, Bytes)>);

/// Writes a round to the devices (see "Ordered, coalesced destage");
/// returns how many device writes it took.
async fn write_round(shared: &Shared, round: &[Queued]) -> Result<u64, IoError> {
    // A device connection replaced between the writes and the flush (the
    // device server restarted, say) may have lost what the old one
    // completed: the flush on the new one does not vouch for it, so the
    // round is written again (found by the simulator).
    let epoch = shared.inner.connection_epoch();
    let planned = plan_round(round, &shared.lock().dirty);
    let device_writes = planned.as_ref().map_or(round.len(), Vec::len) as u64;
    match planned {
        Some(writes) => {
            // The writes cover disjoint ranges, so their order does not
            // matter; every one is waited for, even after a failure (the
            // retry must not race a write still on its way).
            let mut results = futures::stream::iter(writes)
                .map(|(offset, pieces)| shared.inner.write(offset, dirty::join(pieces), false))
                .buffer_unordered(DESTAGE_WRITES_IN_FLIGHT_MAX);
            let mut failed = None;
            while let Some(result) = results.next().await {
                if let Err(e) = result {
                    failed.get_or_insert(e);
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        None => {
            warn!("a destage round's bytes are not all in the dirty map; writing its records one by one, in order");
            for r in round {
                shared.inner.write(r.offset, r.data.clone(), false).await?;
            }
        }
    }
    shared.inner.flush().await?;
    if shared.inner.connection_epoch() != epoch {
        return Err(IoError::io(
            "a device connection was replaced between the round's writes and its flush, which cannot vouch for \
             what the old connection completed",
        ));
    }
    Ok(device_writes)
}

/// Writes acknowledged records to the devices in order, round by round,
/// and releases their log space when a release is due (see "Lazy release"
/// in the module doc).
async fn destage_loop(shared: Arc<Shared>) {
    let mut retry_ms = DESTAGE_RETRY_MIN_MS;
    loop {
        let (round, written, hold) = {
            let state = shared.lock();
            let log_bytes = state.appender.ring().capacity_bytes();
            let hold = hold_left(&state, shared.destage_hold, Instant::now());
            let round = match hold {
                Some(_) => Vec::new(),
                None => next_round(state.queue.range(state.written..), DESTAGE_ROUND_BYTES_MAX.min(log_bytes / 2)),
            };
            (round, state.written, hold)
        };
        if !round.is_empty() {
            let device_writes = match write_round(&shared, &round).await {
                Ok(device_writes) => device_writes,
                Err(e) => {
                    warn!(error = %e, retry_ms, "destaging cached writes failed; retrying (they stay in the cache log)");
                    tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                    retry_ms = (retry_ms * 2).min(DESTAGE_RETRY_MAX_MS);
                    continue;
                }
            };
            retry_ms = DESTAGE_RETRY_MIN_MS;
            {
                let mut state = shared.lock();
                state.destage_writes += device_writes;
                let round_bytes = round.iter().map(|r| r.data.len() as u64).sum::<u64>();
                state.written += round.len();
                state.written_bytes += round_bytes;
                state.unwritten_bytes -= round_bytes;
                state.destaged_bytes += round_bytes;
                if state.destage_samples.len() == DESTAGE_SAMPLES_MAX {
                    state.destage_samples.pop_front();
                }
                state.destage_samples.push_back((std::time::Instant::now(), round_bytes));
            }
            if !release_due(&shared) {
                continue;
            }
        } else if written == 0 {
            // Nothing to write, or held: look again when new work comes or
            // the hold ends.
            match hold {
                Some(left) => _ = tokio::time::timeout(left, shared.work.notified()).await,
                None => shared.work.notified().await,
            }
            continue;
        } else if !release_due(&shared) {
            // Nothing to write now (or held): release once no new work comes
            // for a while (new records are written first, then released
            // together) — unless the hold ends first.
            let idle = Duration::from_millis(RELEASE_IDLE_MS);
            match hold {
                Some(left) if left <= idle => {
                    _ = tokio::time::timeout(left, shared.work.notified()).await;
                    continue;
                }
                _ => {
                    if tokio::time::timeout(idle, shared.work.notified()).await.is_ok() {
                        continue;
                    }
                }
            }
        }
        if let Err(e) = release_written(&shared).await {
            // The records are on the devices and stay in the log; the
            // release is tried again.
            warn!(error = %e, retry_ms, "cannot release cache log space; retrying");
            tokio::time::sleep(Duration::from_millis(retry_ms)).await;
            retry_ms = (retry_ms * 2).min(DESTAGE_RETRY_MAX_MS);
            continue;
        }
        retry_ms = DESTAGE_RETRY_MIN_MS;
    }
}

/// How much longer the destager holds the records not yet written (see
/// "Destage hold" in the module doc); `None`: write them now — nobody waits
/// for them, the log has room, the mirror answers, and the oldest of them
/// was logged less than `hold` ago.
fn hold_left(state: &State, hold: Duration, now: Instant) -> Option<Duration> {
    let log_bytes = state.appender.ring().capacity_bytes();
    if hold.is_zero()
        || state.release_waiters > 0
        || state.space_wanted
        || matches!(state.mirror_state, MirrorState::WriteThrough { .. })
        || state.unwritten_bytes >= log_bytes / DESTAGE_HOLD_LOG_DIVISOR
    {
        return None;
    }
    let oldest = state.queue.get(state.written)?.logged_at;
    hold.checked_sub(now.saturating_duration_since(oldest)).filter(|left| !left.is_zero())
}

/// Whether the records on the devices should be released now rather than
/// after the next round: someone waits for it, the log needs the space, or
/// they hold more than a [`RELEASE_LAG_LOG_DIVISOR`]th of the log.
fn release_due(shared: &Shared) -> bool {
    let state = shared.lock();
    state.written > 0
        && (state.release_waiters > 0
            || state.space_wanted
            || state.written_bytes >= state.appender.ring().capacity_bytes() / RELEASE_LAG_LOG_DIVISOR)
}

/// Releases the records on the devices ([`State::written`]): at the mirror
/// first (what it still holds is always still in the local log and the
/// dirty map: see the module doc), then in the log (the superblock moves
/// the tail), and only then are they dropped from the queue and the dirty
/// map (a record still in the log would be replayed over anything written
/// around it: see `State::logged`).
async fn release_written(shared: &Arc<Shared>) -> Result<(), CacheError> {
    let _releasing = shared.releases.lock().await;
    let (count, upto, mirroring, epoch) = {
        let state = shared.lock();
        let mirroring = state.mirror_state == MirrorState::Mirrored;
        (state.written, state.queue[state.written - 1].seq, mirroring, state.mirror_epoch)
    };
    if let Some(mirror) = shared.mirror.as_ref().filter(|_| mirroring) {
        if let Err(why) = mirror.release(upto).await {
            mirror_failed(shared, epoch, why);
        }
    }
    let superblock = {
        let mut state = shared.lock();
        let (tail_pos, tail_seq) = match (state.queue.get(count), state.in_flight) {
            (Some(next), _) => (next.pos, next.seq),
            (None, Some(in_flight)) => in_flight,
            (None, None) => (state.appender.ring().head(), state.appender.next_seq()),
        };
        state.appender.release_superblock(tail_pos, tail_seq)
    };
    let writer = shared.clone();
    blocking(move || writer.log.write_superblock(&superblock)).await?;
    // Before the records leave the dirty map, whose overlay hides what the
    // clean blocks hold under them (see `clean`).
    let released: Vec<Queued> = shared.lock().queue.iter().take(count).cloned().collect();
    if let Some(mut clean) = shared.clean() {
        for record in &released {
            clean.invalidate(record.offset, record.data.len() as u64);
        }
    }
    {
        let mut state = shared.lock();
        for record in &released {
            let front = state.queue.pop_front().expect("released records came from the queue");
            debug_assert_eq!(front.seq, record.seq);
            state.dirty.destaged(record.offset, record.data.len() as u64, record.seq);
        }
        state.written = 0;
        state.written_bytes = 0;
        state.space_wanted = false;
        state.appender.released(superblock.tail_pos);
        state.last_destaged_seq = upto;
    }
    shared.space_freed.notify_one();
    shared.destaged.notify_waiters();
    Ok(())
}

#[async_trait]
impl BlockDevice for CachedDevice {
    fn size(&self) -> u64 {
        self.shared.inner.size()
    }

    fn connection_epoch(&self) -> u64 {
        self.shared.inner.connection_epoch()
    }

    fn block_sizes(&self) -> BlockSizes {
        self.shared.inner.block_sizes()
    }

    fn is_read_only(&self) -> bool {
        self.shared.inner.is_read_only()
    }

    fn can_multi_conn(&self) -> bool {
        self.shared.inner.can_multi_conn()
    }

    fn can_trim(&self) -> bool {
        self.shared.inner.can_trim()
    }

    fn can_fast_zero(&self) -> bool {
        self.shared.inner.can_fast_zero()
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.shared.inner.meta_contexts()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        blockio::error::check_range(offset, len as u64, self.size())?;
        // Taken before the device read: see the module doc.
        let overlay = self.shared.lock().dirty.overlay(offset, len as u64);
        self.read_under(offset, len, overlay).await
    }

    /// A read larger than the clean blocks keep ([`clean::INSERT_BYTES_MAX`])
    /// that no cached write touches is passed on as the devices return it
    /// — in pipes, when they forward to a socket — as on a volume without a
    /// cache: its bytes never enter the agent's memory.
    async fn read_payload(&self, offset: u64, len: u32) -> Result<Payload, IoError> {
        blockio::error::check_range(offset, len as u64, self.size())?;
        // Taken before the device read: see the module doc.
        let overlay = self.shared.lock().dirty.overlay(offset, len as u64);
        if overlay.is_empty() && u64::from(len) > clean::INSERT_BYTES_MAX {
            return self.shared.inner.read_payload(offset, len).await;
        }
        self.read_under(offset, len, overlay).await.map(Payload::Bytes)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        blockio::error::check_range(offset, data.len() as u64, self.size())?;
        if self.is_read_only() {
            return self.shared.inner.write(offset, data, _fua).await;
        }
        if self.goes_around(offset, data.len()) {
            return self.write_around(offset, Payload::Bytes(data), _fua).await;
        }
        let mut acks = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let chunk = data.slice(at..data.len().min(at + RECORD_CHUNK_BYTES));
            let (done, ack) = oneshot::channel();
            let write = WriteReq { offset: offset + at as u64, data: chunk, seq: 0, done };
            at += write.data.len();
            self.writes.send(write).await.map_err(|_| IoError::io("the volume's cache has stopped"))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|_| IoError::io("the volume's cache stopped before the write was logged"))??;
        }
        Ok(())
    }

    /// A write that will go around the log may stay in pipes as the
    /// client's socket delivered it, when the devices take it so: its
    /// bytes then never enter the agent's memory, as on a volume without a
    /// cache.
    fn wants_write_pipe(&self, offset: u64, len: u32) -> bool {
        !self.is_read_only()
            && self.goes_around(offset, len as usize)
            && self.shared.inner.wants_write_pipe(offset, len)
    }

    async fn write_payload(&self, offset: u64, data: Payload, fua: bool) -> Result<(), IoError> {
        let chain = match data {
            Payload::Bytes(data) => return self.write(offset, data, fua).await,
            Payload::Pipe(chain) => chain,
        };
        blockio::error::check_range(offset, chain.len() as u64, self.size())?;
        if self.is_read_only() {
            return self.shared.inner.write_payload(offset, Payload::Pipe(chain), fua).await;
        }
        if self.goes_around(offset, chain.len()) {
            return self.write_around(offset, Payload::Pipe(chain), fua).await;
        }
        // A record came to lie under it since the server asked
        // `wants_write_pipe`: it is logged, out of its pipes.
        self.write(offset, chain.into_write_data()?, fua).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        // Acknowledged writes are already durable in the log; only TRIM and
        // WRITE_ZEROES went to the devices directly.
        if self.shared.inner_unflushed.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.shared.inner.flush().await {
                self.shared.inner_unflushed.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.destage_all().await;
        let changing = self.shared.changing(offset, len as u64);
        let trimmed = self.shared.inner.trim(offset, len, fua).await;
        drop(changing);
        trimmed?;
        // Set after completion: a FLUSH that cleared it earlier did not
        // cover this request.
        self.shared.inner_unflushed.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.destage_all().await;
        let changing = self.shared.changing(offset, len as u64);
        let zeroed = self.shared.inner.write_zeroes(offset, len, flags).await;
        drop(changing);
        zeroed?;
        self.shared.inner_unflushed.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.destage_all().await;
        self.shared.inner.block_status(context, offset, len).await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        // A prefetch: into the clean blocks when there are any.
        if self.shared.clean.is_none() {
            return self.shared.inner.cache(offset, len).await;
        }
        blockio::error::check_range(offset, len as u64, self.size())?;
        // In reads the clean blocks keep, and no more than they hold.
        let room = self.shared.clean().map_or(0, |c| c.stats().capacity_bytes);
        let end = offset + (len as u64).min(room);
        let mut at = offset;
        while at < end {
            let piece = (end - at).min(clean::INSERT_BYTES_MAX);
            self.shared.read_devices(at, piece as u32).await?;
            at += piece;
        }
        Ok(())
    }
}
