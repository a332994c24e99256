#!/usr/bin/env bash
# Installs what the tests need, runs every test in the workspace, then random
# seeds of the simulation for a bounded time (SIM_SECONDS, default 180).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --all-targets
cargo test --workspace "$@"
scripts/sim-seeds.sh
