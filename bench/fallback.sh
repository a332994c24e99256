#!/usr/bin/env bash
# Fallback-path benchmark (issue 4: fallback I/O through the server).
#
# One nbdkit memory device holds the pool; one volume, attached shared by two
# agents. The same fio matrix as bench/agent.sh runs through each:
#   direct    fio -> agent A export -> (direct) nbdkit device
#   fallback  fio -> agent B export -> data channel -> sanvol-mds -> nbdkit device
# Agent B reaches the device through an nbdkit hop (`--device-uri`), which is
# stopped after attach: B's direct path fails and all its I/O goes through the
# metadata server. The fallback figures are reported as ratios to the direct
# path.
#
# Usage: bench/fallback.sh   (env: BENCH_SECONDS=10 per row, BENCH_SIZE_MIB=2048)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
SIZE_MIB=${BENCH_SIZE_MIB:-2048}
VOLUME_MIB=$((SIZE_MIB / 2))
WORK_MIB=$((VOLUME_MIB / 2))

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
source bench/lib.sh
BIN=target/release
D=$BENCH_DIR

start_nbdkit dev0 memory "${SIZE_MIB}M"
start_nbdkit hop nbd socket="$D/dev0.sock"
HOP_PID=${BENCH_PIDS[-1]}
start_pool dev0
$BIN/sanvol volume create vol "${VOLUME_MIB}M" >/dev/null
start_agent a
start_agent b --device-uri "$(sock_uri dev0)=$(sock_uri hop)"
URI_A=$($BIN/sanvol-agent attach vol --mode shared --control-socket "$D/agent-a.sock")
URI_B=$($BIN/sanvol-agent attach vol --mode shared --control-socket "$D/agent-b.sock")

# Break agent B's direct path: stop the hop (our own nbdkit, by PID).
kill -KILL "$HOP_PID"   # SIGTERM would wait for B's connections to close
wait "$HOP_PID" 2>/dev/null || true
fio_nbd "$URI_A" write 1m 8 "$WORK_MIB" 1 >/dev/null   # fill the working set (direct)
fio_nbd "$URI_B" write 1m 8 "$WORK_MIB" 1 >/dev/null   # B fails over on its first request
if ! $BIN/sanvol client list --json | python3 -c 'import json,sys; sys.exit(not any(c["name"] == "bench-b" and c["fallback"] for c in json.load(sys.stdin)))'; then
    echo "agent B is not on fallback: $($BIN/sanvol client list)" >&2
    exit 1
fi

declare -A URI=([direct]="$URI_A" [fallback]="$URI_B")
ROWS=(
    "4k-randread-qd1 randread 4k 1"
    "4k-randread-qd32 randread 4k 32"
    "4k-randwrite-qd1 randwrite 4k 1"
    "4k-randwrite-qd32 randwrite 4k 32"
    "1m-read-qd8 read 1m 8"
    "1m-write-qd8 write 1m 8"
)
results="$D/results.txt"
for row in "${ROWS[@]}"; do
    read -r name rw bs depth <<<"$row"
    for path in direct fallback; do
        echo "$name $path $(fio_nbd "${URI[$path]}" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")" >>"$results"
    done
    echo "done: $name" >&2
done
for a in a b; do $BIN/sanvol-agent detach vol --control-socket "$D/agent-$a.sock"; done

mkdir -p bench/results
out="bench/results/fallback-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" >"$out" <<'PY'
import sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, who, iops, mib = line.split()
    rows.setdefault(name, {})[who] = (float(iops), float(mib))
print(f"fio nbd engine, unix sockets, one nbdkit memory device, {sys.argv[2]} s per row\n")
print("| row | direct IOPS | fallback IOPS | direct MiB/s | fallback MiB/s | fallback / direct |")
print("|---|---:|---:|---:|---:|---:|")
for name, r in rows.items():
    d, f = r["direct"], r["fallback"]
    print(f"| {name} | {d[0]:.0f} | {f[0]:.0f} | {d[1]:.1f} | {f[1]:.1f} | {f[0]/d[0]:.2f} |")
PY
show_results "$out"
