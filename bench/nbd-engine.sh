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
# Usage: bench/nbd-engine.sh   (env: BENCH_SECONDS=10 per row, BENCH_SIZE_MIB=1024, BENCH_ROWS=all)
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
for row in "${ROWS[@]}"; do
    read -r name rw bs depth <<<"$row"
    for s in ours poll async nbdkit nbdcrate; do
        echo "server $name $s $(fio_nbd_cpu "${PID_OF[$s]}" "$(sock_uri $s)" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")" >>"$results"
    done
    # Client side: fio (libnbd) vs blockio's client, both on nbdkit.
    echo "client $name fio $(fio_nbd "$(sock_uri nbdkit)" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS") -" >>"$results"
    case $bs in 4k) bytes=4096 ;; 1m) bytes=1048576 ;; esac
    ours=$(target/release/examples/nbd_client_bench "$(sock_uri nbdkit)" "$rw" "$bytes" "$depth" "$SECS" --json |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f %.1f -" % (r["iops"], r["mib_per_s"]))')
    echo "client $name ours $ours" >>"$results"
    echo "done: $name" >&2
done

mkdir -p bench/results
out="bench/results/nbd-engine-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" >"$out" <<'PY'
import sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    side, name, who, iops, mib, cpu = line.split()
    rows.setdefault((side, name), {})[who] = (float(iops), float(mib), cpu)
print(f"fio nbd engine, unix socket, memory backends, {sys.argv[2]} s per row\n")
print("### Server: fio -> server\n")
print("| row | blockio IOPS | blockio polling IOPS | blockio async IOPS | nbdkit IOPS | nbd crate IOPS | blockio MiB/s | ratio vs faster peer | polling / faster peer | async / faster peer | CPU µs/request: blockio / polling / async / nbdkit / nbd crate |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (side, name), r in rows.items():
    if side != "server": continue
    best = max(r["nbdkit"][0], r["nbdcrate"][0])
    cpu = " / ".join(r[w][2] for w in ("ours", "poll", "async", "nbdkit", "nbdcrate"))
    print(f"| {name} | {r['ours'][0]:.0f} | {r['poll'][0]:.0f} | {r['async'][0]:.0f} | {r['nbdkit'][0]:.0f} | {r['nbdcrate'][0]:.0f} | {r['ours'][1]:.1f} | {r['ours'][0]/best:.2f} | {r['poll'][0]/best:.2f} | {r['async'][0]/best:.2f} | {cpu} |")
print("\n### Client: client -> nbdkit memory\n")
print("| row | blockio client IOPS | fio/libnbd IOPS | blockio MiB/s | fio MiB/s | ratio |")
print("|---|---:|---:|---:|---:|---:|")
for (side, name), r in rows.items():
    if side != "client": continue
    print(f"| {name} | {r['ours'][0]:.0f} | {r['fio'][0]:.0f} | {r['ours'][1]:.1f} | {r['fio'][1]:.1f} | {r['ours'][0]/r['fio'][0]:.2f} |")
PY
show_results "$out"
