#!/usr/bin/env bash
# Random seeds of the deterministic simulation (sim/) for a bounded time:
# SIM_SECONDS (default 180; 0 skips). Prints every failing seed with the
# command that replays it, and fails if any seed failed in a way no known
# defect explains. Release build: about 10x the seeds of a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${SIM_SECONDS:-180}"
if [ "$secs" = 0 ]; then
    echo "sim-seeds: SIM_SECONDS=0, skipped"
    exit 0
fi
cargo build -p sanvol-sim --release --tests
echo "sim-seeds: random seeds for ${secs} s (SIM_SECONDS to change)"
SIM_SECONDS="$secs" exec cargo test -p sanvol-sim --release --test seeds -- random --nocapture
