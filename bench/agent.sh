#!/usr/bin/env bash
# Agent data-path benchmark (issue: metadata server, admin CLI and the
# agent's direct data path).
#
# One nbdkit memory device holds the pool. The same fio matrix runs:
#   agent   fio -> sanvol-agent export -> (direct) nbdkit device
#   proxy   fio -> nbdkit nbd plugin   -> nbdkit device   (one extra hop, a real peer)
#   direct  fio -> nbdkit device                           (no hop)
#   splice  fio -> byte hop (splice through a pipe) -> nbdkit device
#   copy    fio -> byte hop (read/write a buffer)   -> nbdkit device
# and the agent's figures are reported as ratios to them. The two byte hops
# (tests/examples/byte_hop.rs) parse nothing: they are the floor of any
# userspace hop on this machine, so "agent / floor" (the faster hop of the
# row) says how close the agent is to what a hop can do here at all.
#
# Usage: bench/agent.sh   (env: BENCH_SECONDS=10 per row, BENCH_SIZE_MIB=2048, BENCH_ROWS=all,
#                          BENCH_ROUNDS=1: the whole matrix again, rounds interleaved; the
#                          tables then give medians and every round's ratios)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
SIZE_MIB=${BENCH_SIZE_MIB:-2048}
VOLUME_MIB=$((SIZE_MIB / 2))
WORK_MIB=$((VOLUME_MIB / 2))

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
cargo build --release -q -p sanvol-tests --example byte_hop
source bench/lib.sh
BIN=target/release
D=$BENCH_DIR

start_nbdkit dev0 memory "${SIZE_MIB}M"
start_nbdkit proxy nbd socket="$D/dev0.sock"
start_ready splice $BIN/examples/byte_hop "$D/splice.sock" "$D/dev0.sock" splice
start_ready copy $BIN/examples/byte_hop "$D/copy.sock" "$D/dev0.sock" copy
start_pool dev0
start_agent agent
$BIN/sanvol volume create vol "${VOLUME_MIB}M" >/dev/null
AGENT_URI=$($BIN/sanvol-agent attach vol --control-socket "$D/agent-agent.sock")

declare -A URI=([agent]="$AGENT_URI" [proxy]="$(sock_uri proxy)" [direct]="$(sock_uri dev0)"
    [splice]="$(sock_uri splice)" [copy]="$(sock_uri copy)")
# The proxy and direct runs go to the device where the volume's data starts:
# the same device addresses the agent's run reaches, and never the pool's
# label, metadata or lease areas at the device's start (writing over those
# made the server lose its pool lease).
DATA_OFFSET=$($BIN/sanvol volume show vol --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["description"]["extents"][0]["legs"][0]["offset"])')
declare -A OFFSET=([agent]=0 [proxy]="$DATA_OFFSET" [direct]="$DATA_OFFSET" [splice]="$DATA_OFFSET" [copy]="$DATA_OFFSET")
# Whose CPU per request is counted: the hop's (the device's for direct).
declare -A HOP=([agent]="${PID_OF[agent-agent]}" [proxy]="${PID_OF[proxy]}" [direct]="${PID_OF[dev0]}"
    [splice]="${PID_OF[splice]}" [copy]="${PID_OF[copy]}")
ROWS=(
    "4k-randread-qd1 randread 4k 1"
    "4k-randread-qd32 randread 4k 32"
    "4k-randwrite-qd1 randwrite 4k 1"
    "4k-randwrite-qd32 randwrite 4k 32"
    "1m-read-qd8 read 1m 8"
    "1m-write-qd8 write 1m 8"
)
# BENCH_ROWS="NAME ..." runs only those rows, with all their peers (to re-run a noisy row).
if [ -n "${BENCH_ROWS:-}" ]; then
    mapfile -t ROWS < <(for r in "${ROWS[@]}"; do [[ " $BENCH_ROWS " == *" ${r%% *} "* ]] && echo "$r"; done)
fi
fio_nbd "${URI[agent]}" write 1m 8 "$WORK_MIB" 1 >/dev/null   # fill the volume's working set
FIO_OFFSET_BYTES=$DATA_OFFSET fio_nbd "${URI[direct]}" write 1m 8 "$WORK_MIB" 1 >/dev/null  # the same device range

results="$D/results.txt"
ROUNDS=${BENCH_ROUNDS:-1}
for round in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        read -r name rw bs depth <<<"$row"
        for path in agent proxy direct splice copy; do
            r=$(FIO_OFFSET_BYTES=${OFFSET[$path]} fio_nbd_cpu "${HOP[$path]}" "${URI[$path]}" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")
            echo "$round $name $path $r" >>"$results"
        done
        echo "done: $name (round $round of $ROUNDS)" >&2
    done
done
mkdir -p bench/results
out="bench/results/agent-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" >"$out" <<'PY'
import sys
sys.path.insert(0, "bench")
from rounds import load, med, iops, mib, cpu, ratios, heading
rows, rounds = load(sys.argv[1])
def floor(r, rnd): return max(r["splice"][rnd][0], r["copy"][rnd][0])
print(f"fio nbd engine, unix sockets, one nbdkit memory device, {sys.argv[2]} s per row, {heading(rounds)}\n")
print("| row | agent IOPS | nbdkit proxy IOPS | direct IOPS | agent MiB/s | agent / proxy | agent / direct | CPU µs/request: agent / proxy / device (direct) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (name,), r in rows.items():
    cpus = " / ".join(cpu(r, w) for w in ("agent", "proxy", "direct"))
    print(f"| {name} | {iops(r, 'agent'):.0f} | {iops(r, 'proxy'):.0f} | {iops(r, 'direct'):.0f} | {mib(r, 'agent'):.1f} | {med(ratios(r, 'agent', 'proxy', rounds)):.2f} | {med(ratios(r, 'agent', 'direct', rounds)):.2f} | {cpus} |")
print("\nThe floor of one userspace hop, same run (byte hops that parse nothing; the floor is the faster of the two):\n")
print("| row | splice hop IOPS | copy hop IOPS | splice / direct | copy / direct | agent / floor | CPU µs/request: splice / copy |")
print("|---|---:|---:|---:|---:|---:|---:|")
for (name,), r in rows.items():
    print(f"| {name} | {iops(r, 'splice'):.0f} | {iops(r, 'copy'):.0f} | {med(ratios(r, 'splice', 'direct', rounds)):.2f} | {med(ratios(r, 'copy', 'direct', rounds)):.2f} | {med(ratios(r, 'agent', floor, rounds)):.2f} | {cpu(r, 'splice')} / {cpu(r, 'copy')} |")
if len(rounds) > 1:
    print("\nEvery round's ratios, in the order run:\n")
    print("| row | agent / proxy | agent / direct | agent / floor |")
    print("|---|---|---|---|")
    for (name,), r in rows.items():
        cells = (", ".join("%.2f" % x for x in ratios(r, "agent", den, rounds)) for den in ("proxy", "direct", floor))
        print(f"| {name} | " + " | ".join(cells) + " |")
PY
show_results "$out"
$BIN/sanvol-agent detach vol --control-socket "$D/agent-agent.sock" || echo "warning: detaching the volume failed" >&2
