#!/usr/bin/env bash
# NBD engine benchmark (issue: workspace, on-disk format and NBD engine).
#
# Server: fio's nbd engine (libnbd) against blockio's server on a memory
# device, `nbdkit memory`, and the `nbd` crate's server, all over unix
# sockets, same matrix, same run. blockio runs twice: with connection
# threads (`--connection-threads`, BENCH_CONNECTION_THREADS=2: blocking
# threads taking turns at the socket, the mode for local devices; the
# "blockio" column and the ratio), the same with polling before each
# blocking read (`--poll-us`, BENCH_POLL_US=200: `ServerConfig::poll_before_block`,
# the "polling" column) and on its async path (the default of `ServerConfig`,
# what the agent's exports use; the "async" column).
# Client: blockio's client against fio's libnbd engine, both driving the same
# `nbdkit memory` export.
#
# Usage: bench/nbd-engine.sh   (env: BENCH_SECONDS=10 per row, BENCH_SIZE_MIB=1024, BENCH_ROWS=all,
#                              BENCH_ROUNDS=1: the whole matrix again, rounds interleaved; the
#                              tables then give medians and every round's ratios)
# Prints a markdown table with the ratios; also saved under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
WORK_MIB=$((SIZE_MIB / 2))

scripts/install-deps.sh >/dev/null
cargo build --release -q -p blockio --example nbd_serve --example nbd_client_bench
cargo build --release -q -p sanvol-tests --example nbd_crate_server
source bench/lib.sh

start_ready ours target/release/examples/nbd_serve --unix "$BENCH_DIR/ours.sock" --memory "${SIZE_MIB}M" \
    --connection-threads "${BENCH_CONNECTION_THREADS:-2}"
start_ready poll target/release/examples/nbd_serve --unix "$BENCH_DIR/poll.sock" --memory "${SIZE_MIB}M" \
    --connection-threads "${BENCH_CONNECTION_THREADS:-2}" --poll-us "${BENCH_POLL_US:-200}"
start_ready async target/release/examples/nbd_serve --unix "$BENCH_DIR/async.sock" --memory "${SIZE_MIB}M"
start_ready nbdcrate target/release/examples/nbd_crate_server "$BENCH_DIR/nbdcrate.sock" "$SIZE_MIB"
start_nbdkit nbdkit memory "${SIZE_MIB}M"

# The matrix: name rw block-size depth
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

# Fill the working set once on every server so reads move real data.
for s in ours poll async nbdcrate nbdkit; do
    fio_nbd "$(sock_uri $s)" write 1m 8 "$WORK_MIB" 1 >/dev/null
done

results="$BENCH_DIR/results.txt"
ROUNDS=${BENCH_ROUNDS:-1}
for round in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        read -r name rw bs depth <<<"$row"
        for s in ours poll async nbdkit nbdcrate; do
            echo "$round server $name $s $(fio_nbd_cpu "${PID_OF[$s]}" "$(sock_uri $s)" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")" >>"$results"
        done
        # Client side: fio (libnbd) vs blockio's client, both on nbdkit.
        echo "$round client $name fio $(fio_nbd "$(sock_uri nbdkit)" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS") -" >>"$results"
        case $bs in 4k) bytes=4096 ;; 1m) bytes=1048576 ;; esac
        ours=$(target/release/examples/nbd_client_bench "$(sock_uri nbdkit)" "$rw" "$bytes" "$depth" "$SECS" --json |
            python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f %.1f -" % (r["iops"], r["mib_per_s"]))')
        echo "$round client $name ours $ours" >>"$results"
        echo "done: $name (round $round of $ROUNDS)" >&2
    done
done

mkdir -p bench/results
out="bench/results/nbd-engine-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" >"$out" <<'PY'
import sys
sys.path.insert(0, "bench")
from rounds import load, med, iops, mib, cpu, ratios, heading
rows, rounds = load(sys.argv[1])
def best(r, rnd): return max(r["nbdkit"][rnd][0], r["nbdcrate"][rnd][0])
print(f"fio nbd engine, unix socket, memory backends, {sys.argv[2]} s per row, {heading(rounds)}\n")
print("### Server: fio -> server\n")
print("| row | blockio IOPS | blockio polling IOPS | blockio async IOPS | nbdkit IOPS | nbd crate IOPS | blockio MiB/s | ratio vs faster peer | polling / faster peer | async / faster peer | CPU µs/request: blockio / polling / async / nbdkit / nbd crate |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (side, name), r in rows.items():
    if side != "server": continue
    cpus = " / ".join(cpu(r, w) for w in ("ours", "poll", "async", "nbdkit", "nbdcrate"))
    cols = " | ".join("%.0f" % iops(r, w) for w in ("ours", "poll", "async", "nbdkit", "nbdcrate"))
    rats = " | ".join("%.2f" % med(ratios(r, w, best, rounds)) for w in ("ours", "poll", "async"))
    print(f"| {name} | {cols} | {mib(r, 'ours'):.1f} | {rats} | {cpus} |")
print("\n### Client: client -> nbdkit memory\n")
print("| row | blockio client IOPS | fio/libnbd IOPS | blockio MiB/s | fio MiB/s | ratio |")
print("|---|---:|---:|---:|---:|---:|")
for (side, name), r in rows.items():
    if side != "client": continue
    print(f"| {name} | {iops(r, 'ours'):.0f} | {iops(r, 'fio'):.0f} | {mib(r, 'ours'):.1f} | {mib(r, 'fio'):.1f} | {med(ratios(r, 'ours', 'fio', rounds)):.2f} |")
if len(rounds) > 1:
    print("\nEvery round's ratios, in the order run:\n")
    print("| row | blockio / faster peer | polling / faster peer | async / faster peer | client / fio |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(n for _, n in rows):
        r, c = rows[("server", name)], rows[("client", name)]
        cells = [", ".join("%.2f" % x for x in ratios(r, w, best, rounds)) for w in ("ours", "poll", "async")]
        cells.append(", ".join("%.2f" % x for x in ratios(c, "ours", "fio", rounds)))
        print(f"| {name} | " + " | ".join(cells) + " |")
PY
show_results "$out"
