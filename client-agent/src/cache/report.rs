//! Telling the metadata server how a mirrored cache stands (protocol 14).
//!
//! Why: the server sees only its side of a holder's cache — whether it
//! mirrors the holder's writes now and what its mirror holds. Why a holder
//! writes through (its mirror requests timed out, the server changed, it
//! is starting mirroring afresh) and how fast it destages are known only
//! at the holder, and an operator asks the server (`sanvol volume show`),
//! not every host. So the holder reports them: at each change of state
//! (looked at every [`CHECK_PERIOD`]) and every [`REPORT_PERIOD`] otherwise.
//! A report is small and best effort, and the server keeps only the last
//! one, in memory: one that is lost (no connection, a server older than
//! protocol 14) is followed by the next; an old one tells the operator the
//! holder stopped reporting.

use std::future::Future;
use std::sync::Weak;
use std::time::{Duration, Instant};

use tracing::debug;
use volume_format::control::messages::HolderCacheReport;

use super::{CacheReport, CachedDevice, MirrorState};

/// The longest between two reports of an unchanged cache.
pub const REPORT_PERIOD: Duration = Duration::from_secs(2);
/// How often the cache's state is looked at for a change.
pub const CHECK_PERIOD: Duration = Duration::from_millis(250);

/// The state's name ("mirrored", "write-through", "local") and why it is
/// not mirrored (empty when it is, or has no mirror).
pub fn state_names(state: &MirrorState) -> (&'static str, String) {
    match state {
        MirrorState::Mirrored => ("mirrored", String::new()),
        MirrorState::WriteThrough { why } => ("write-through", why.clone()),
        MirrorState::Local => ("local", String::new()),
    }
}

/// What a holder tells the server of its cache.
pub fn holder_report(report: &CacheReport) -> HolderCacheReport {
    let (state, why) = state_names(&report.mirror);
    HolderCacheReport {
        state: state.to_string(),
        why,
        dirty_bytes: report.status.dirty_bytes,
        log_used_bytes: report.status.log_used_bytes,
        log_capacity_bytes: report.status.log_capacity_bytes,
        destage_bytes_per_sec: report.destage_bytes_per_sec,
        destaged_bytes: report.destaged_bytes,
    }
}

/// Reports `cache` with `send` (in `sanvol-agent`,
/// [`super::mirror::ControlMirror::report`]) until the cache is gone (its volume
/// detached).
pub fn spawn<F, Fut>(cache: Weak<CachedDevice>, send: F, volume: String)
where
    F: Fn(HolderCacheReport) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The state and reason last sent, and when.
        let mut last: Option<((String, String), Instant)> = None;
        loop {
            tick.tick().await;
            let Some(report) = cache.upgrade().map(|c| holder_report(&c.report())) else { return };
            let state = (report.state.clone(), report.why.clone());
            let due = match &last {
                None => true,
                Some((sent, at)) => *sent != state || at.elapsed() >= REPORT_PERIOD,
            };
            if !due {
                continue;
            }
            // Sent or not, the next try waits for a change or the period: a
            // server that refuses (a resume still under way) is not pressed.
            last = Some((state, Instant::now()));
            if let Err(e) = send(report).await {
                debug!(volume, error = %e, "cannot report the cache's state to the metadata server");
            }
        }
    });
}
