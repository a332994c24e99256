#!/usr/bin/env bash
# Installs what the demo needs and starts a local demo pool (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bins
exec target/release/sanvol demo "$@"
