//! Fault injection for crash tests: `SANVOL_FAULT=POINT[,POINT...]` makes a
//! process kill itself with SIGKILL (exactly what `kill -9` does) when it
//! reaches one of the named points, so tests can crash the agent or the
//! server between two steps of a protocol (e.g. after copying a pre-image
//! but before registering it) instead of hoping a timed `kill` lands there.
//!
//! Points are named `PROCESS-when`, e.g. `agent-after-cow-copy`; each
//! caller documents its own. `POINT@N` fires on the point's Nth hit (to
//! crash in the middle of a load rather than at its first step).
//! `POINT:stop` (or `POINT:stop@N`) stops the process instead (SIGSTOP, as a
//! debugger or a stalled host would), so a test can act while it is frozen
//! there — cut its connection between two protocol steps — and then let it
//! go on (SIGCONT). `POINT:jump=MS` (or `POINT:jump=MS@N`) neither kills nor
//! stops: [`hit`] returns that duration and the caller moves its lease clock
//! on by it (`blockio::clock::jump`), standing for a VM pause of that length
//! right there. `POINT:sleep=MS` (or `POINT:sleep=MS@N`) returns that
//! duration too, for the points whose callers wait it out there (a slow step
//! widened, so a test can act in the window it leaves). Unset (the normal
//! case) costs one load of a cached value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// An armed point: its name, what it does, on which hit it fires, and the
/// hits so far.
struct Armed {
    point: String,
    stop: bool,
    /// A clock jump instead of a kill or a stop.
    jump_ms: Option<u64>,
    /// A wait instead of a kill or a stop.
    sleep_ms: Option<u64>,
    on_hit: u64,
    hits: AtomicU64,
}

fn armed() -> &'static [Armed] {
    static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("SANVOL_FAULT")
            .map(|v| v.split(',').filter_map(|p| parse(p.trim())).collect())
            .unwrap_or_default()
    })
}

fn parse(spec: &str) -> Option<Armed> {
    if spec.is_empty() {
        return None;
    }
    let (point, on_hit) = match spec.split_once('@') {
        Some((point, n)) => (point, n.parse().ok().filter(|n| *n > 0)?),
        None => (spec, 1),
    };
    let (point, stop) = match point.strip_suffix(":stop") {
        Some(point) => (point, true),
        None => (point, false),
    };
    let (point, jump_ms) = match point.split_once(":jump=") {
        Some((point, ms)) => (point, Some(ms.parse().ok()?)),
        None => (point, None),
    };
    let (point, sleep_ms) = match point.split_once(":sleep=") {
        Some((point, ms)) => (point, Some(ms.parse().ok()?)),
        None => (point, None),
    };
    Some(Armed { point: point.to_string(), stop, jump_ms, sleep_ms, on_hit, hits: AtomicU64::new(0) })
}

/// Kills this process with SIGKILL (or stops it with SIGSTOP) if `point` is
/// armed (and this is the hit it is armed for); returns the clock jump a
/// `:jump=MS` point asks for.
pub fn hit(point: &str) -> Option<std::time::Duration> {
    let a = armed().iter().find(|a| a.point == point)?;
    if a.hits.fetch_add(1, Ordering::SeqCst) + 1 != a.on_hit {
        return None;
    }
    if let Some(ms) = a.sleep_ms {
        eprintln!("SANVOL_FAULT: reached {point}; waiting {ms} ms there");
        return Some(std::time::Duration::from_millis(ms));
    }
    if let Some(ms) = a.jump_ms {
        eprintln!("SANVOL_FAULT: reached {point}; the lease clock jumps {ms} ms (a VM pause)");
        return Some(std::time::Duration::from_millis(ms));
    }
    if a.stop {
        eprintln!("SANVOL_FAULT: reached {point}; stopping this process (SIGSTOP) until SIGCONT");
        // To this thread, not the process: a process-directed SIGSTOP is
        // taken by whichever thread the kernel picks (the main one), and
        // this thread ran on past the point until that one was scheduled —
        // long enough to send the very write the point stands before (seen
        // with `mds-before-metadata-write`). Sent to itself, this thread
        // stops on its way out of the call, and the whole process with it.
        // SAFETY: raise(3) has no memory-safety preconditions.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    } else {
        eprintln!("SANVOL_FAULT: reached {point}; killing this process (SIGKILL)");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_parse_with_an_optional_hit_count() {
        let a = parse("mds-mid-journal-write@4").unwrap();
        assert_eq!((a.point.as_str(), a.on_hit), ("mds-mid-journal-write", 4));
        assert_eq!(parse("agent-after-cow-copy").unwrap().on_hit, 1);
        let a = parse("agent-before-recall-done:stop").unwrap();
        assert_eq!((a.point.as_str(), a.stop, a.on_hit), ("agent-before-recall-done", true, 1));
        assert!(parse("x:stop@2").is_some_and(|a| a.stop && a.on_hit == 2));
        assert!(parse("x@0").is_none() && parse("x@y").is_none() && parse("").is_none());
        let a = parse("agent-cache-serving:sleep=3000").unwrap();
        assert_eq!((a.point.as_str(), a.sleep_ms, a.jump_ms), ("agent-cache-serving", Some(3000), None));
    }
}
