#!/usr/bin/env bash
# Seeds of the deterministic simulation (sim/) in a release build (about 10x
# the seeds of a debug build). Two modes:
#   SIM_RANGE=a..b   every seed from a to b, b excluded (deterministic: the
#                    CI stage, scripts/test.sh sets it; a failure replays
#                    anywhere, seed for seed)
#   SIM_SECONDS=S    random seeds for S seconds (exploration: new schedules
#                    every run; default 180 when SIM_RANGE is unset; 0 skips)
# Both spread the seeds over every core (SIM_THREADS=N to change; each seed
# is one thread and one world, so it replays the same on any count).
# Prints every failing seed with the command that replays it, and fails if
# any seed failed in a way no known defect explains.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p sanvol-sim --release --tests
if [ -n "${SIM_RANGE:-}" ]; then
    echo "sim-seeds: seeds ${SIM_RANGE}"
    SIM_RANGE="$SIM_RANGE" exec cargo test -p sanvol-sim --release --test seeds -- range --nocapture
fi
secs="${SIM_SECONDS:-180}"
if [ "$secs" = 0 ]; then
    echo "sim-seeds: SIM_SECONDS=0, skipped"
    exit 0
fi
echo "sim-seeds: random seeds for ${secs} s (SIM_SECONDS to change)"
SIM_SECONDS="$secs" exec cargo test -p sanvol-sim --release --test seeds -- random --nocapture
