//! Defects of today's code that the simulator finds and other issues fix,
//! each pinned to a seed: such a test passes while the defect is still there
//! (and shows how to reproduce it); when its fix lands, the test fails —
//! delete it then (and its entry in `sanvol_sim::observer::KNOWN_DEFECTS`,
//! or the config knob that keeps it out of the random runs).
//!
//! One is pinned now (below). Of those fixed, the last (seed
//! 13872807266413: after early faults the lease copies stayed split between
//! two acquirers' records and no server acquired the pool lease again) was
//! fixed in
//! `volume_format::lease` (a standby acquires when split copies stay
//! unchanged for an expiry); its seed is a regression seed. The one before
//! it (seed 23170555851917: a snapshot commit
//! refused after a failed flush, answered at once, then revived by the
//! standby that loaded it from the copy that took it) was fixed by answering
//! a refused commit only once a later commit superseded it on every copy.
//! The three before it (issue 14's timing rules: the agent's
//! and the server's lease clocks on `CLOCK_MONOTONIC`, seeds 2 and 37, and a
//! holder released the moment its lease ran out while its writes were still
//! stalled in a device, seed 16) were fixed by leases on `CLOCK_BOOTTIME` and
//! the server waiting lease + `device_request_max_ms`; their faults (agent
//! and server VM pauses, device stalls) are in the random runs since. See
//! this file's history for the shape of a pinned test and its seed hunt.

use sanvol_sim::{run, Config};

/// Found by a random exploration on 2026-12-07 (6134th seed of a 1200 s
/// run; the code it ran had no change to recalls or copy-on-write since
/// the last clean explorations): a recall of a shared volume (deleting its
/// snapshot) waits 3842 ms of server time for a holder that keeps renewing
/// its lease, past the observer's bound (2 × lease + D + slack = 3754 ms).
/// The holder is draining: its first writes after the snapshot wait for
/// their copy-on-write registrations (`CowCopy`, one request per chunk),
/// which the server runs one job per volume at a time, each ending in a
/// metadata commit — and the commits are slow (injected device latency,
/// then the metadata device loses power). No acknowledged write is lost
/// and nobody writes after an exclusion (the safety invariants hold); the
/// reconfiguration only takes longer than the bound says it may. Not fixed
/// yet: one job (one commit) for the queued registrations of a handle, or
/// a bound that counts the server's own commits the drain waits for. When
/// it is fixed, this test fails: delete it and add the seed to the
/// regression seeds.
#[test]
fn a_recall_waits_past_its_bound_for_serialized_copy_on_write_commits_seed_114450128283725() {
    let o = run(Config::from_seed(114_450_128_283_725), false);
    let v =
        o.violation.as_ref().unwrap_or_else(|| panic!("seed {} passed: the defect is fixed; delete this test", o.seed));
    assert_eq!(v.invariant, "recall-completes-or-excludes", "{v}");
}
