#!/usr/bin/env bash
# Metadata benchmark (issue: metadata that scales — a commit costs what
# changed, not the size of the pool).
#
# Three sparse nbdkit memory devices hold the pool; one agent.
#   cow      fio randwrite 4k QD1 over the first GiB of a 1 GiB and of a
#            1 TiB volume, BENCH_SECONDS each: with no snapshot, right after
#            a snapshot (first writes: every new 64 KiB chunk is copied and
#            registered before it is overwritten), and again. Ratios to no
#            snapshot; the 1 TiB rows against the 1 GiB rows. The agent
#            acknowledges first writes before their chunk is preserved
#            (`--cow-write-behind-kib`, client-agent/src/cow_behind.rs), so
#            every row ends with a FLUSH and counts its time: IOPS = writes /
#            (fio's runtime + the FLUSH), nothing left outstanding is
#            counted free. Each cell is the median of BENCH_REPS rounds (the
#            sizes alternate; each round's snapshot is deleted after it).
#            One more row, "in line": first writes on the 1 GiB volume
#            (after a new snapshot) through a second agent with
#            write-behind off, each write waiting for its copy.
#   create   `volume create` latency (requests over one admin connection,
#            median and p99 of 100) with 10 and with 10,000 volumes in the
#            pool, and the CLI's wall time for one create at each size.
#   load     sanvol-mds start (load the metadata from the devices, replay
#            the journal) to listening, with ~110 and ~10,100 volumes.
#   floor    what a 4 KiB first write costs at least on these devices,
#            whatever the metadata protocol (blockio's examples/cow_floor on
#            a fresh `nbdkit memory` device: the 64 KiB pre-image read, its
#            FUA write, then the write, one after the other), and the ratio
#            that leaves for the agent's first writes (its plain write time
#            from the no-snapshot row plus the copy).
#
# Usage: bench/metadata.sh   (env: BENCH_SECONDS=4, BENCH_REPS=3, BENCH_VOLUMES=10000)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-4}
REPS=${BENCH_REPS:-3}
VOLUMES=${BENCH_VOLUMES:-10000}

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
cargo build --release -q -p metadata-server --example populate
cargo build --release -q -p blockio --example cow_floor --example nbd_flush
source bench/lib.sh
BIN=target/release
POPULATE=target/release/examples/populate
COW_FLOOR=target/release/examples/cow_floor
NBD_FLUSH=target/release/examples/nbd_flush
D=$BENCH_DIR
results="$D/results.txt"

# The floor first, before the pool's processes exist: measured after the
# copy-on-write rows it read 1043-1053 µs per pre-image copy (2026-12-04,
# two runs) against 179 run on its own a minute later (cause not traced).
start_nbdkit floor memory 4G
echo "floor $($COW_FLOOR "$(sock_uri floor)" "$SECS")" >>"$results"
kill "${PID_OF[floor]}"

for i in 0 1 2; do start_nbdkit "dev$i" memory 2T; done
start_pool dev0 dev1 dev2
MDS_PID=${BENCH_PIDS[-1]}   # start_pool's last start is sanvol-mds
start_agent agent

# fio_run URI SECONDS : randwrite 4k QD1 over the first GiB, then a FLUSH
# through the same export; prints "iops" = writes / (runtime + the FLUSH).
fio_run() {
    local json flush_s
    json=$(fio --name=bench --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=1 --size=1024M \
        --time_based --runtime="$2" --randrepeat=0 --output-format=json 2>/dev/null)
    flush_s=$($NBD_FLUSH "$1")
    python3 -c '
import json, sys
text = sys.stdin.read()
job = json.loads(text[text.index("{"):])["jobs"][0]
w = job["write"]
flush_s = float(sys.argv[1])
print("%.0f" % (w["total_ios"] / (w["runtime"] / 1000 + flush_s)))
print("flush after the row: %.1f ms (fio alone: %.0f IOPS)" % (flush_s * 1000, w["iops"]), file=sys.stderr)
' "$flush_s" <<<"$json"
}

# BENCH_REPS rounds, the two sizes alternating in each: a QD1 row on this
# 2-vCPU VM swings by tens of percent from one 4 s run to the next, so each
# cell is the median of its rounds. Each round's snapshot is deleted at its
# end, so the next round's first row has no snapshot again.
for size in 1G 1T; do $BIN/sanvol volume create "v$size" "$size" >/dev/null; done
for round in $(seq "$REPS"); do
    for size in 1G 1T; do
        vol="v$size"
        uri=$($BIN/sanvol-agent attach "$vol" --control-socket "$D/agent-agent.sock")
        echo "cow $size none $(fio_run "$uri" "$SECS")" >>"$results"
        $BIN/sanvol snapshot create "$vol" "s$round" >/dev/null
        echo "cow $size first $(fio_run "$uri" "$SECS")" >>"$results"
        echo "cow $size again $(fio_run "$uri" "$SECS")" >>"$results"
        $BIN/sanvol-agent detach "$vol" --control-socket "$D/agent-agent.sock" >/dev/null
        $BIN/sanvol snapshot delete "$vol" "s$round" >/dev/null
        echo "done: cow $size, round $round" >&2
    done
done
start_agent inline --cow-write-behind-kib 0
$BIN/sanvol snapshot create v1G inline >/dev/null
uri=$($BIN/sanvol-agent attach v1G --control-socket "$D/agent-inline.sock")
echo "cow 1G inline $(fio_run "$uri" "$SECS")" >>"$results"
$BIN/sanvol-agent detach v1G --control-socket "$D/agent-inline.sock" >/dev/null
echo "done: cow in line" >&2

# restart_mds VOLUMES : stops sanvol-mds (SIGTERM), starts it again and
# records the seconds from start to listening. (Not in a $(...) subshell:
# it must update MDS_PID and the PIDs the exit trap stops.)
restart_mds() {
    kill "$MDS_PID" && wait "$MDS_PID" 2>/dev/null || true
    rm -f "$D/mds.ready"
    local t0 t1
    t0=$(date +%s.%N)
    start_ready mds "$BIN/sanvol-mds" --config "$D/mds.toml"
    t1=$(date +%s.%N)
    MDS_PID=${BENCH_PIDS[-1]}
    echo "load $1 $(python3 -c "print('%.3f' % ($t1 - $t0))")" >>"$results"
}

populate() { $POPULATE --mds "$SANVOL_MDS" --key "$SANVOL_KEY" --server-key "$SANVOL_SERVER_KEY" "$@"; }
cli_create_ms() {
    local t0 t1
    t0=$(date +%s.%N); $BIN/sanvol volume create "$1" 4096 >/dev/null; t1=$(date +%s.%N)
    python3 -c "print('%.1f' % (($t1 - $t0) * 1000))"
}

populate --count 8 --prefix pre- --sample 8 >/dev/null    # 10 volumes with the two above
echo "create 10 $(populate --count 100 --prefix at10- --sample 100) cli_ms=$(cli_create_ms cli10)" >>"$results"
restart_mds 110
populate --count $((VOLUMES - 111)) --prefix fill- --sample 1 >/dev/null
echo "create $VOLUMES $(populate --count 100 --prefix at10k- --sample 100) cli_ms=$(cli_create_ms cli10k)" >>"$results"
restart_mds $((VOLUMES + 100))

python3 - "$results" "$SECS" <<'PY'
import re, sys
rows = [l.split() for l in open(sys.argv[1])]
import statistics
runs = {}
for r in rows:
    if r[0] == "cow":
        runs.setdefault((r[1], r[2]), []).append(float(r[3]))
cow = {k: statistics.median(v) for k, v in runs.items()}
print(f"fio randwrite 4k QD1 over the first GiB, {sys.argv[2]} s each, median of {len(runs[('1G', 'none')])} rounds "
      f"(IOPS; ratio to no snapshot):")
print(f"{'volume':>8} {'no snapshot':>12} {'first writes':>14} {'again':>14}")
for size in ("1G", "1T"):
    none, first, again = cow[(size, "none")], cow[(size, "first")], cow[(size, "again")]
    print(f"{size:>8} {none:>12.0f} {first:>8.0f} ({first/none:.2f}) {again:>8.0f} ({again/none:.2f})")
for (size, row), values in sorted(runs.items()):
    print(f"  rounds, {size} {row}: " + ", ".join(f"{v:.0f}" for v in values))
print(f"1 TiB / 1 GiB: no snapshot {cow[('1T','none')]/cow[('1G','none')]:.2f}, "
      f"first writes {cow[('1T','first')]/cow[('1G','first')]:.2f}, again {cow[('1T','again')]/cow[('1G','again')]:.2f}")
r1t, r1g = cow[("1T", "first")] / cow[("1T", "none")], cow[("1G", "first")] / cow[("1G", "none")]
print(f"first writes / no snapshot, 1 TiB against 1 GiB (each against its own volume's no-snapshot row): {r1t / r1g:.2f}")
if ("1G", "inline") in cow:
    inline = cow[("1G", "inline")]
    print(f"1 GiB first writes in line (--cow-write-behind-kib 0, after a new snapshot): {inline:.0f} "
          f"({inline / cow[('1G', 'none')]:.2f} of no snapshot)")
floor = next((dict(x.split("=") for x in r[1:]) for r in rows if r[0] == "floor"), None)
if floor:
    copy_us = float(floor["copy_us"])
    print(f"floor on one nbdkit memory device, QD1: plain 4 KiB write {float(floor['plain_us']):.0f} us, "
          f"pre-image copy (64 KiB read + FUA write) {copy_us:.0f} us: a write to a new chunk at most "
          f"{float(floor['ratio']):.2f}x as fast as a plain write, on the device itself")
    for size in ("1G", "1T"):
        plain_us = 1e6 / cow[(size, "none")]
        print(f"  {size}: the agent's plain write {plain_us:.0f} us + the copy: a write to a new chunk waiting for "
              f"its copy (in line) at most {plain_us / (plain_us + copy_us):.2f}x of no snapshot even if registering "
              f"cost nothing; written behind, the copies of many writes overlap instead")
creates = [r for r in rows if r[0] == "create"]
def field(r, name):
    return float(next(x.split("=")[1] for x in r if x.startswith(name + "=")))
print("volume create (one admin connection, 100 creates; CLI = one `sanvol volume create`):")
for r in creates:
    print(f"  at {r[1]:>6} volumes: median {field(r, 'create_ms_median'):.2f} ms, p99 {field(r, 'create_ms_p99'):.2f} ms, CLI {field(r, 'cli_ms'):.1f} ms")
if len(creates) == 2:
    print(f"  median at {creates[1][1]} / at {creates[0][1]}: {field(creates[1], 'create_ms_median') / field(creates[0], 'create_ms_median'):.2f}")
for r in rows:
    if r[0] == "load":
        print(f"server start to listening with {r[1]} volumes: {float(r[2]):.3f} s")
PY
echo; host_facts
