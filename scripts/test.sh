#!/usr/bin/env bash
# Installs what the tests need, runs every test in the workspace, then a
# fixed range of the simulation's seeds (SIM_RANGE, default 41..3041: seeds
# 1..40 already ran with the workspace's tests). The range is fixed so that
# a red run replays anywhere; random exploration is scripts/sim-seeds.sh
# with SIM_SECONDS (run it before you stop; sim/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --all-targets
cargo test --workspace "$@"
SIM_RANGE="${SIM_RANGE:-41..3041}" scripts/sim-seeds.sh
