//! Defects of today's code that the simulator finds and other issues fix,
//! each pinned to a seed: such a test passes while the defect is still there
//! (and shows how to reproduce it); when its fix lands, the test fails —
//! delete it then (and its entry in `sanvol_sim::observer::KNOWN_DEFECTS`,
//! or the config knob that keeps it out of the random runs).
//!
//! None is pinned now. Of those fixed, the last (seed 114450128283725: a
//! recall waited past its bound for a holder whose drain waited on
//! server-side copy-on-write registrations, run one job and one slow
//! metadata commit at a time) was fixed in the owner: the copies queued on
//! a volume are served by one job and one commit (`snapshots::prepare_cow`);
//! its seed is a regression seed. The one before it (seed
//! 13872807266413: after early faults the lease copies stayed split between
//! two acquirers' records and no server acquired the pool lease again) was
//! fixed in
//! `volume_format::lease` (a standby acquires when split copies stay
//! unchanged for an expiry). The one before
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
