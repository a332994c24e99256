#!/usr/bin/env bash
# Installs what the tests need and runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --all-targets
cargo test --workspace "$@"
