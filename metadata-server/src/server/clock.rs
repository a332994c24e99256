//! Time for the owner task: monotonic milliseconds for leases (tokio's
//! clock, so tests can pause and advance it) and wall-clock rendering for
//! messages people read ("lease until 14:03:07Z").

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock { start: Instant::now() }
    }
}

impl Clock {
    /// Milliseconds since the server started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The instant `ms` milliseconds after start.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.start + std::time::Duration::from_millis(ms)
    }

    /// Renders monotonic time `at_ms` as a wall-clock time plus how far away
    /// it is: "14:03:07Z, in 8.2 s".
    pub fn describe(&self, at_ms: u64) -> String {
        let now_ms = self.now_ms();
        let wall_now_ms = unix_ms();
        let wall_ms = (wall_now_ms as i128 + at_ms as i128 - now_ms as i128).max(0) as u64;
        let secs = wall_ms / 1000 % 86_400;
        let delta = at_ms as i64 - now_ms as i64;
        let when = if delta >= 0 {
            format!("in {:.1} s", delta as f64 / 1000.0)
        } else {
            format!("{:.1} s ago", -delta as f64 / 1000.0)
        };
        format!("{:02}:{:02}:{:02}Z, {when}", secs / 3600, secs / 60 % 60, secs % 60)
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}
