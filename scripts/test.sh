#!/usr/bin/env bash
# Installs what the tests need, runs every test in the workspace, and beside
# them a fixed range of the simulation's seeds (SIM_RANGE, default 41..3041:
# seeds 1..40 already run with the workspace's tests). The range is fixed so
# that a red run replays anywhere; random exploration is scripts/sim-seeds.sh
# with SIM_SECONDS (run it before you stop; sim/README.md).
#
# Why side by side: the seeds are one CPU-bound thread for about three
# minutes, while the workspace's process tests mostly wait (leases, timeouts,
# devices slowed by nbdkit's delay filter). The seeds run niced, so the
# tests' processes get a core first; their output is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --all-targets
cargo build -p sanvol-sim --release --tests
sim_bin=$(cargo test -p sanvol-sim --release --test seeds --no-run 2>&1 |
    sed -n 's/.*Executable tests\/seeds.rs (\(.*\))/\1/p')
[ -x "$sim_bin" ] || { echo "test.sh: cannot find the simulation's seeds binary" >&2; exit 1; }
sim_range="${SIM_RANGE:-41..3041}"
sim_log=$(mktemp /tmp/sanvol-sim-seeds.XXXXXX)
# Run from the crate's directory, as cargo runs it.
(cd sim && SIM_RANGE="$sim_range" exec nice -n 10 "../$sim_bin" range --nocapture) >"$sim_log" 2>&1 &
sim_pid=$!
trap 'kill "$sim_pid" 2>/dev/null || true; rm -f "$sim_log"' EXIT
cargo test --workspace "$@"
echo "sim-seeds: seeds $sim_range (run beside the tests; replay one with scripts/sim-seeds.sh, see sim/README.md)"
sim_status=0
wait "$sim_pid" || sim_status=$?
cat "$sim_log"
exit "$sim_status"
