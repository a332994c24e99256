//! Defects of today's code that the simulator finds and other issues fix,
//! each pinned to a seed: such a test passes while the defect is still there
//! (and shows how to reproduce it); when its fix lands, the test fails —
//! delete it then (and its entry in `sanvol_sim::observer::KNOWN_DEFECTS`,
//! or the config knob that keeps it out of the random runs).
//!
//! One is pinned now (below). The one before it (seed 23170555851917: a snapshot commit
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

/// Found by the CI random stage of 2026-12-02 (and failing the same way on
/// the tree before that session): after early lease faults no server of a
/// two-server world acquires the pool lease again; none serves the pool
/// once the world settled. Not fixed yet (the availability issue's lease
/// acquisition); when it is, this test fails: delete it and the entry in
/// `KNOWN_DEFECTS`, and add the seed to `TWO_SERVER_REGRESSION_SEEDS`.
#[test]
fn no_server_acquires_the_pool_lease_seed_13872807266413() {
    let o = run(Config::from_seed(13_872_807_266_413), false);
    let v =
        o.violation.as_ref().unwrap_or_else(|| panic!("seed {} passed: the defect is fixed; delete this test", o.seed));
    assert_eq!(v.invariant, "settled-one-active-server", "{v}");
    assert_eq!(v.known, Some(sanvol_sim::observer::NO_SERVER_ACQUIRES), "{v}");
}
