#!/usr/bin/env bash
# Installs what the tests need, runs every test in the workspace (several
# test binaries at a time: scripts/test-lanes.sh; with arguments, plain
# `cargo test --workspace ARGS`) and, beside
# them, a fixed range of the simulation's seeds (SIM_RANGE, default
# 41..3041: seeds 1..40 already run with the workspace's tests). The range
# is fixed so that a red run replays anywhere; random exploration is
# scripts/sim-seeds.sh with SIM_SECONDS (run it before you stop;
# sim/README.md).
#
# Why beside: the workspace's process tests spend most of their time
# waiting on real servers (leases, fio), while the seed range is a release
# build and a couple of minutes of every core. Run one after the other they took
# 30+ minutes; the seed range (its build included) runs at idle CPU and I/O
# priority (SCHED_IDLE, ionice idle), in its own target directory so the
# two cargo runs never wait on each other's lock, and takes only the time
# the tests leave unused. Its output is printed after the tests'. SIM=0
# skips it (SIM_RANGE=... scripts/sim-seeds.sh runs it alone).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --all-targets

sim_pid=
sim_log=
if [ "${SIM:-1}" != 0 ]; then
    sim_log="$(mktemp /tmp/sanvol-sim-seeds.XXXXXX)"
    CARGO_TARGET_DIR="${SIM_TARGET_DIR:-target/sim-seeds}" SIM_RANGE="${SIM_RANGE:-41..3041}" \
        chrt --idle 0 ionice -c 3 scripts/sim-seeds.sh >"$sim_log" 2>&1 &
    sim_pid=$!
    # Stop it (our own child, by PID) if this script ends early.
    trap '[ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null; true' EXIT
fi

tests_rc=0
if [ $# -eq 0 ]; then
    # Every test of `cargo test --workspace`, several binaries at a time.
    scripts/test-lanes.sh || tests_rc=$?
else
    # Arguments (a package, a filter, libtest flags) go to cargo as before.
    cargo test --workspace "$@" || tests_rc=$?
fi

sim_rc=0
if [ -n "$sim_pid" ]; then
    if [ "$tests_rc" = 0 ]; then
        echo "test.sh: waiting for the simulation's seed range"
        wait "$sim_pid" || sim_rc=$?
    else
        kill "$sim_pid" 2>/dev/null || true
        wait "$sim_pid" 2>/dev/null || true
        sim_rc=1
    fi
    sim_pid=
    echo "---- scripts/sim-seeds.sh (ran beside the tests) ----"
    grep -v '^ *Compiling ' "$sim_log" || true
    rm -f "$sim_log"
fi

if [ "$tests_rc" != 0 ]; then
    echo "test.sh: workspace tests failed (exit $tests_rc)" >&2
    exit "$tests_rc"
fi
if [ "$sim_rc" != 0 ]; then
    echo "test.sh: the simulation's seed range failed (exit $sim_rc)" >&2
    exit "$sim_rc"
fi
echo "test.sh: all tests passed"
