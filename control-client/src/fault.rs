//! Fault injection for crash tests: `SANVOL_FAULT=POINT[,POINT...]` makes a
//! process kill itself with SIGKILL (exactly what `kill -9` does) when it
//! reaches one of the named points, so tests can crash the agent or the
//! server between two steps of a protocol (e.g. after copying a pre-image
//! but before registering it) instead of hoping a timed `kill` lands there.
//!
//! Points are named `PROCESS-when`, e.g. `agent-after-cow-copy`; each
//! caller documents its own. Unset (the normal case) costs one load of a
//! cached value.

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("SANVOL_FAULT")
            .map(|v| v.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Kills this process with SIGKILL if `point` is armed.
pub fn hit(point: &str) {
    if armed().iter().any(|p| p == point) {
        eprintln!("SANVOL_FAULT: reached {point}; killing this process (SIGKILL)");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
