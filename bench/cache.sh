#!/usr/bin/env bash
# Write-back cache benchmark (issue 15): the agent's cache in front of a
# device vs straight through to it, same device, same run.
#
# Devices: `nbdkit memory` behind the `delay` filter (delay-write=1ms and
# delay-read=1ms, standing for a remote array) and without it (a fast device, so the cache's
# cost is visible). Peers: client-agent's `cache_serve` example serving each
# device through the cache (log file on this host's disk, fdatasync'ed) and
# with --write-through. fio's nbd engine drives all four over unix sockets.
#
# Mirrored (the product path): per device (delayed, then not), a pool on one
# nbdkit memory device, `sanvol-mds` (holding the caches' mirrors, on this
# host's disk) and `sanvol-agent` serving two volumes of the pool: `vc` with a
# mirrored cache (`sanvol volume cache`; log in the agent's --cache-dir) and
# `vw` without one (writes go straight to the device: the write-through
# peer). Each pool runs in a subshell with its own processes and directory.
#
# Usage: bench/cache.sh   (env: BENCH_SECONDS=10 per row, BENCH_LOG_MIB=256,
#                          BENCH_WORK_MIB=256, BENCH_ROWS="NAME ...", BENCH_KEEP=1,
#                          BENCH_BIN=DIR: another build's release binaries and
#                          examples, e.g. an older commit's, for an A/B;
#                          TMPDIR=/dev/shm puts the logs and mirrors on tmpfs,
#                          taking the disk out of the path: what is left is
#                          the software's share of a write)
# Goals (delay rows): >= 5x at 4k randwrite QD1, >= 2x at QD32, >= 1x at 1 MiB.
#
# Read rows (the cache's clean blocks, 64 MiB per volume by default): 4k
# random reads at QD1 over a hot set of 16 MiB that fits (after one
# sequential 256 KiB pass over it), and at QD32 over the whole working set,
# four times the clean blocks' room (where it cannot pay off: its cost).
#
# The floor (printed first): a cache acknowledges a QD1 write only once it is
# durable, so no cache on this host beats one synchronous 4k append to a
# preallocated file on this disk (fio, O_DIRECT|O_DSYNC, as the cache log is
# written) at QD1. Mirrored on one host, the agent's log and the server's
# mirror are both on this disk: the floor is two such appends at once. Both
# are measured in the same run and divided by the write-through QD1 row.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
LOG_MIB=${BENCH_LOG_MIB:-256}
WORK_MIB=${BENCH_WORK_MIB:-256}
DEVICE_MIB=$((WORK_MIB * 2))

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
cargo build --release -q -p client-agent --example cache_serve
source bench/lib.sh
SERVE=${BENCH_BIN:-target/release}/examples/cache_serve

start_nbdkit slow --filter=delay memory "${DEVICE_MIB}M" delay-write=1ms delay-read=1ms
start_nbdkit fast memory "${DEVICE_MIB}M"
for dev in slow fast; do
    start_ready "$dev-cache" "$SERVE" --unix "$BENCH_DIR/$dev-cache.sock" --device "$(sock_uri "$dev")" \
        --log "$BENCH_DIR/$dev.cachelog" --log-mib "$LOG_MIB"
    start_ready "$dev-direct" "$SERVE" --unix "$BENCH_DIR/$dev-direct.sock" --device "$(sock_uri "$dev")" \
        --write-through
done

# The matrix: name rw block-size depth [working-set-MiB]
ROWS=(
    "4k-randwrite-qd1 randwrite 4k 1"
    "4k-randwrite-qd32 randwrite 4k 32"
    "1m-write-qd4 write 1m 4"
    "4k-randread-qd1-hot randread 4k 1 16"
    "4k-randread-qd32 randread 4k 32"
)
# row_fio URI NAME RW BS DEPTH [SIZE] : "iops mib" of one row; a read row
# first reads its working set once, sequentially in 256 KiB requests.
row_fio() {
    local uri=$1 name=$2 rw=$3 bs=$4 depth=$5 size=${6:-$WORK_MIB}
    if [ "$rw" = randread ]; then fio_nbd "$uri" read 256k 1 "$size" 1 >/dev/null; fi
    fio_nbd "$uri" "$rw" "$bs" "$depth" "$size" "$SECS"
}
if [ -n "${BENCH_ROWS:-}" ]; then
    mapfile -t ROWS < <(for r in "${ROWS[@]}"; do [[ " $BENCH_ROWS " == *" ${r%% *} "* ]] && echo "$r"; done)
fi

# sync_append_floor JOBS : "iops-per-job mean-latency-us" of JOBS concurrent
# sequential 4k O_DIRECT|O_DSYNC writers, each to its own preallocated file in
# the benchmark's directory (the disk the cache logs and mirrors are on).
sync_append_floor() {
    local jobs=$1 dir="$BENCH_DIR/floor-$1"
    mkdir -p "$dir"
    for j in $(seq 0 $((jobs - 1))); do
        dd if=/dev/zero of="$dir/floor.$j.0" bs=1M count=64 conv=fsync status=none
    done
    fio --name=floor --directory="$dir" --size=64M --rw=write --bs=4k --direct=1 --sync=dsync --ioengine=psync \
        --numjobs="$jobs" --time_based --runtime="$SECS" --ramp_time=1 --group_reporting --output-format=json 2>/dev/null |
        python3 -c 'import json, sys
job = json.load(sys.stdin)["jobs"][0]["write"]
print("%.0f %.0f" % (job["iops"] / int(sys.argv[1]), job["lat_ns"]["mean"] / 1000))' "$jobs"
    rm -rf "$dir"
}
FLOOR="$BENCH_DIR/floor.txt"
if [ -z "${BENCH_ROWS:-}" ] || [[ " $BENCH_ROWS " == *" 4k-randwrite-qd1 "* ]]; then
    echo "one $(sync_append_floor 1)" >"$FLOOR"
    echo "two $(sync_append_floor 2)" >>"$FLOOR"
    echo "done: floor" >&2
fi

results="$BENCH_DIR/results.txt"
for row in "${ROWS[@]}"; do
    read -r name rw bs depth size <<<"$row"
    for dev in slow fast; do
        for mode in cache direct; do
            echo "$name $dev $mode $(row_fio "$(sock_uri "$dev-$mode")" $row)" >>"$results"
        done
    done
    echo "done: $name" >&2
done

# mirrored_rows DEVICE NBDKIT-ARGS... : the mirrored rows of one device.
mirrored_rows() {
    local dev=$1; shift
    (
        source bench/lib.sh # its own directory, processes and EXIT trap
        BIN=${BENCH_BIN:-target/release}
        # The pool holds both volumes, its metadata and the caches' mirrors.
        start_nbdkit dev0 "$@"
        start_pool dev0
        start_agent a --cache-dir "$BENCH_DIR/cache"
        start_cached_pair "$WORK_MIB" "$LOG_MIB"
        for row in "${ROWS[@]}"; do
            read -r name rw bs depth size <<<"$row"
            for mode in mirrored through; do
                echo "$name $dev $mode $(row_fio "${URI[$mode]}" $row)" >>"$MIRRORED_RESULTS"
            done
            echo "done: mirrored $name ($dev)" >&2
        done
        # Detached while the server is up (the EXIT trap stops everything at
        # once; an agent still holding volumes then waits out its shutdown
        # timeout for the server).
        for v in vc vw; do "$BIN/sanvol-agent" detach "$v" --control-socket "$BENCH_DIR/agent-a.sock" >/dev/null; done
    )
}
MIRRORED_RESULTS="$BENCH_DIR/mirrored.txt"
mirrored_rows slow --filter=delay memory "$((DEVICE_MIB + 512))M" delay-write=1ms delay-read=1ms
mirrored_rows fast memory "$((DEVICE_MIB + 512))M"

mkdir -p bench/results
out="bench/results/cache-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" "$LOG_MIB" "$MIRRORED_RESULTS" "$FLOOR" >"$out" <<'PY'
import sys, collections, os
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, dev, mode, iops, mib = line.split()
    rows.setdefault((name, dev), {})[mode] = (float(iops), float(mib))
print(f"fio nbd engine -> cache_serve (write-back cache, {sys.argv[3]} MiB log, direct synchronous appends) vs write-through, "
      f"nbdkit memory devices, {sys.argv[2]} s per row\n")
print("| row | device | cache IOPS | write-through IOPS | cache MiB/s | write-through MiB/s | ratio |")
print("|---|---|---:|---:|---:|---:|---:|")
for (name, dev), r in rows.items():
    label = ("delay-read=1ms" if "read" in name else "delay-write=1ms") if dev == "slow" else "no delay"
    c, d = r["cache"], r["direct"]
    print(f"| {name} | {label} | {c[0]:.0f} | {d[0]:.0f} | {c[1]:.1f} | {d[1]:.1f} | {c[0]/max(d[0],1):.2f} |")
rows = collections.OrderedDict()
for line in open(sys.argv[4]):
    name, dev, mode, iops, mib = line.split()
    rows.setdefault((name, dev), {})[mode] = (float(iops), float(mib))
print(f"\nMirrored: fio nbd engine -> sanvol-agent export of a volume with a mirrored cache ({sys.argv[3]} MiB log, mirror "
      f"at sanvol-mds) vs of a volume without one (write-through), same agent, same pool, one nbdkit memory device, "
      f"{sys.argv[2]} s per row\n")
print("| row | device | mirrored IOPS | write-through IOPS | mirrored MiB/s | write-through MiB/s | ratio |")
print("|---|---|---:|---:|---:|---:|---:|")
for (name, dev), r in rows.items():
    label = ("delay-read=1ms" if "read" in name else "delay-write=1ms") if dev == "slow" else "no delay"
    c, d = r["mirrored"], r["through"]
    print(f"| {name} | {label} | {c[0]:.0f} | {d[0]:.0f} | {c[1]:.1f} | {d[1]:.1f} | {c[0]/max(d[0],1):.2f} |")
if os.path.exists(sys.argv[5]):
    floor = {l.split()[0]: (float(l.split()[1]), float(l.split()[2])) for l in open(sys.argv[5])}
    through = rows.get(("4k-randwrite-qd1", "slow"), {}).get("through")
    print("\nFloor at QD1: synchronous 4k appends (fio, O_DIRECT|O_DSYNC, sequential, preallocated file on the "
          "disk of the logs and mirrors) against the mirrored table's write-through 4k QD1 row (delay-write=1ms)\n")
    print("| floor | IOPS (per writer) | mean latency µs | floor / write-through QD1 |")
    print("|---|---:|---:|---:|")
    for key, label in (("one", "one append (unmirrored cache)"), ("two", "two appends at once (log + mirror, one host)")):
        iops, lat = floor[key]
        ratio = f"{iops / through[0]:.2f}" if through else "n/a"
        print(f"| {label} | {iops:.0f} | {lat:.0f} | {ratio} |")
PY
show_results "$out"
