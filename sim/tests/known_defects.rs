//! Defects of today's code that the simulator finds and other issues fix,
//! each pinned to a seed: such a test passes while the defect is still there
//! (and shows how to reproduce it); when its fix lands, the test fails —
//! delete it then (and its entry in `sanvol_sim::observer::KNOWN_DEFECTS`,
//! or the config knob that keeps it out of the random runs).
//!
//! One is pinned now (below). The three before it (issue 14's timing rules: the agent's
//! and the server's lease clocks on `CLOCK_MONOTONIC`, seeds 2 and 37, and a
//! holder released the moment its lease ran out while its writes were still
//! stalled in a device, seed 16) were fixed by leases on `CLOCK_BOOTTIME` and
//! the server waiting lease + `device_request_max_ms`; their faults (agent
//! and server VM pauses, device stalls) are in the random runs since. See
//! this file's history for the shape of a pinned test and its seed hunt.

use sanvol_sim::{run, Config};

/// Found by the random stage of the last CI run of 2026-12-01, not fixed
/// yet: a server's snapshot commit fails ("flushing metadata … no answer",
/// device cut off) and is answered "nothing was changed", the holder is
/// given the old layout and writes on; the server then loses the pool lease
/// before superseding the refused entry, and the standby that takes over
/// loads it from the copies that did take it — the snapshot exists after
/// all, without the holder having copied its pre-images (invariant
/// `snapshot-reads-recall-point`). The fix belongs in the journal's
/// refused-commit rule across a takeover (issue 11/13).
#[test]
fn a_refused_snapshot_commit_revived_by_the_standby_seed_23170555851917() {
    let o = run(Config::from_seed(23_170_555_851_917), false);
    let v =
        o.violation.as_ref().unwrap_or_else(|| panic!("seed {} passed: the defect is fixed; delete this test", o.seed));
    assert_eq!(v.invariant, "snapshot-reads-recall-point", "{v}");
}
