#!/usr/bin/env bash
# Recovery benchmark (issue 12: mirrors that stay identical, and recovery).
#
# Two nbdkit memory devices hold the pool; two agents each attach one
# mirrored volume (two legs, one per device):
#   writes   fio through the agent keeping the write-intent log vs the same
#            through an agent started with SANVOL_INTENT_LOG=off, row by row
#            and alternating which goes first; reported as log / no log.
#            Every row starts after the log's clearing delay, so its regions
#            are clean and the row pays for marking them (the worst case:
#            a writer that was idle for seconds).
#   resync   kill -9 of the logging agent under 4k random writes QD32, then
#            an open by the other agent: the server copies the regions the
#            dead holder left dirty before it grants the open. Reported: the
#            regions' bytes, the copy time from the server's log, the open's
#            wall time, and the copy rate as a ratio of nbdcopy copying the
#            same number of bytes between the same two devices.
#   move     a third device is added; `sanvol volume move` copies the other
#            volume's legs off dev1 onto it while fio (4k random writes
#            QD8) runs on that volume. Reported: the move's wall time and
#            rate (as a ratio of nbdcopy of the same bytes), fio's IOPS
#            before and during the move (ratio), and fio's longest request
#            during it: the pause at the recall point, where the regions
#            written during the online copy are copied again (see
#            metadata-server's server/precopy.rs).
#   move-hot the same move back (dev2 → dev1) with fio writing only the
#            first eighth of the volume: what a pause costs when writes
#            have locality (the regions copied again are only those).
#
# Usage: bench/recovery.sh   (env: BENCH_SECONDS=10 per timed row,
#        BENCH_VOLUME_MIB=512)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
VOLUME_MIB=${BENCH_VOLUME_MIB:-512}
DEVICE_MIB=$((VOLUME_MIB * 3))
# The agent clears a region 5 s after its last write (INTENT_CLEAR_AFTER_MS)
# and sweeps every second: wait this long between rows.
CLEAR_WAIT_SECS=7

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
source bench/lib.sh
BIN=target/release
D=$BENCH_DIR

start_nbdkit dev0 memory "${DEVICE_MIB}M"
start_nbdkit dev1 memory "${DEVICE_MIB}M"
start_pool dev0 dev1
start_agent log
SANVOL_INTENT_LOG=off start_agent nolog
$BIN/sanvol volume create vlog "${VOLUME_MIB}M" --mirror 2 >/dev/null
$BIN/sanvol volume create vnolog "${VOLUME_MIB}M" --mirror 2 >/dev/null
declare -A URI=(
    [log]=$($BIN/sanvol-agent attach vlog --control-socket "$D/agent-log.sock")
    [nolog]=$($BIN/sanvol-agent attach vnolog --control-socket "$D/agent-nolog.sock")
)
results="$D/results.txt"

ROWS=("4k-randwrite-qd32 randwrite 4k 32" "1m-write-qd8 write 1m 8" "4k-randwrite-qd1 randwrite 4k 1")
# Each row runs no log, log, log, no log (ABBA: a drift of the shared host
# during the row weighs on both sides alike); the table shows the means.
for row in "${ROWS[@]}"; do
    read -r name rw bs depth <<<"$row"
    for who in nolog log log nolog; do
        sleep "$CLEAR_WAIT_SECS"
        echo "write $name $who $(fio_nbd "${URI[$who]}" "$rw" "$bs" "$depth" "$VOLUME_MIB" "$SECS")" >>"$results"
    done
    echo "done: $name" >&2
done

# --- resync after a crash: kill -9 the logging agent under writes.
fio --name=crash --ioengine=nbd --uri="${URI[log]}" --rw=randwrite --bs=4k --iodepth=32 \
    --size="${VOLUME_MIB}M" --time_based --runtime=30 --randrepeat=0 >/dev/null 2>&1 &
FIO_PID=$!
sleep 3
kill -9 "${PID_OF[agent-log]}"
wait "$FIO_PID" 2>/dev/null || true
t0=$(date +%s.%N)
until $BIN/sanvol-agent attach vlog --control-socket "$D/agent-nolog.sock" >/dev/null 2>"$D/attach.err"; do
    grep -q "is open" "$D/attach.err" || { cat "$D/attach.err" >&2; exit 1; }
    sleep 0.1
done
t1=$(date +%s.%N)
# The server's line for the copy: "extents resynchronized extents=N bytes=B elapsed_ms=T".
line=$(grep "extents resynchronized" "$D/mds.err" | tail -1)
bytes=$(sed -n 's/.*bytes=\([0-9]*\).*/\1/p' <<<"$line")
copy_ms=$(sed -n 's/.*elapsed_ms=\([0-9]*\).*/\1/p' <<<"$line")
regions=$(grep "copying the regions a gone holder left dirty" "$D/mds.err" | tail -1 | sed -n 's/.*regions=\([0-9]*\).*/\1/p')
echo "resync $regions $bytes $copy_ms $(python3 -c "print($t1 - $t0)")" >>"$results"
# The peer: nbdcopy of as many bytes between the same devices (from the data
# area of dev0 to that of dev1: never the label or metadata at the start).
DATA_OFFSET=$($BIN/sanvol volume show vlog --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["description"]["extents"][0]["legs"][0]["offset"])')
t0=$(date +%s.%N)
nbdcopy --request-size=4194304 --requests=4 --connections=1 \
    -- [ nbdkit --exit-with-parent --filter=offset nbd socket="$D/dev0.sock" offset="$DATA_OFFSET" range="$bytes" ] \
    [ nbdkit --exit-with-parent --filter=offset nbd socket="$D/dev1.sock" offset="$DATA_OFFSET" range="$bytes" ]
t1=$(date +%s.%N)
echo "nbdcopy $bytes $(python3 -c "print(($t1 - $t0) * 1000)")" >>"$results"
echo "done: resync" >&2

# --- move under load: the copy of a whole volume's legs onto a new device.
# fio_json URI SECS : "iops max_latency_ms" of a 4k random write QD8 run
# (fio prints "fio: connected to NBD server" before its JSON).
fio_json() {
    fio --name=move --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=8 --size="${3:-$VOLUME_MIB}M" \
        --time_based --runtime="$2" --randrepeat=0 --output-format=json 2>/dev/null |
        python3 -c 'import json, sys; t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]["write"]; print("%.0f %.1f" % (j["iops"], j["clat_ns"]["max"] / 1e6))'
}
start_nbdkit dev2 memory "${DEVICE_MIB}M"
$BIN/sanvol device add "$(sock_uri dev2)" >/dev/null
MOVE_SECS=$((SECS > 6 ? SECS : 6))
before=$(fio_json "${URI[nolog]}" "$MOVE_SECS")
fio_json "${URI[nolog]}" "$MOVE_SECS" >"$D/during.txt" &
FIO_PID=$!
sleep 1
t0=$(date +%s.%N)
$BIN/sanvol volume move vnolog --from dev1 --to dev2 >/dev/null
t1=$(date +%s.%N)
wait "$FIO_PID"
moved=$((VOLUME_MIB * 1048576))
echo "move $moved $(python3 -c "print(($t1 - $t0) * 1000)") $before $(cat "$D/during.txt")" >>"$results"
t0=$(date +%s.%N)
nbdcopy --request-size=4194304 --requests=4 --connections=1 \
    -- [ nbdkit --exit-with-parent --filter=offset nbd socket="$D/dev0.sock" offset="$DATA_OFFSET" range="$moved" ] \
    [ nbdkit --exit-with-parent --filter=offset nbd socket="$D/dev2.sock" offset="$DATA_OFFSET" range="$moved" ]
t1=$(date +%s.%N)
echo "nbdcopy-move $moved $(python3 -c "print(($t1 - $t0) * 1000)")" >>"$results"
echo "done: move" >&2
# The same move back, with writes to the first eighth of the volume only.
HOT_MIB=$((VOLUME_MIB / 8))
before=$(fio_json "${URI[nolog]}" "$MOVE_SECS" "$HOT_MIB")
fio_json "${URI[nolog]}" "$MOVE_SECS" "$HOT_MIB" >"$D/during.txt" &
FIO_PID=$!
sleep 1
t0=$(date +%s.%N)
$BIN/sanvol volume move vnolog --from dev2 --to dev1 >/dev/null
t1=$(date +%s.%N)
wait "$FIO_PID"
echo "move-hot $moved $(python3 -c "print(($t1 - $t0) * 1000)") $before $(cat "$D/during.txt") $HOT_MIB" >>"$results"
echo "done: move-hot" >&2

mkdir -p bench/results
out="bench/results/recovery-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$VOLUME_MIB" "$SECS" >"$out" <<'PY'
import sys, collections
w = collections.OrderedDict()
resync = copy = move = move_copy = move_hot = None
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "write":
        w.setdefault(f[1], {}).setdefault(f[2], []).append((float(f[3]), float(f[4])))
    elif f[0] == "resync":
        resync = (int(f[1] or 0), int(f[2] or 0), float(f[3] or 0), float(f[4]))
    elif f[0] == "nbdcopy":
        copy = (int(f[1]), float(f[2]))
    elif f[0] == "move":
        move = (int(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), float(f[6]))
    elif f[0] == "move-hot":
        move_hot = (int(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), float(f[6]), int(f[7]))
    elif f[0] == "nbdcopy-move":
        move_copy = (int(f[1]), float(f[2]))
print(f"mirrored volume of {sys.argv[2]} MiB (two legs) on two nbdkit memory devices, unix sockets, {sys.argv[3]} s per row\n")
print("Writes through the agent, write-intent log vs none (each row starts with clean regions;")
print("runs in the order no log, log, log, no log; means and each run's IOPS):\n")
print("| row | no log IOPS | log IOPS | no log MiB/s | log MiB/s | log / no log | runs (no log; log) |")
print("|---|---:|---:|---:|---:|---:|---|")
mean = lambda runs, i: sum(r[i] for r in runs) / len(runs)
for name, x in w.items():
    n, l = x["nolog"], x["log"]
    each = ", ".join(f"{r[0]:.0f}" for r in n) + "; " + ", ".join(f"{r[0]:.0f}" for r in l)
    print(f"| {name} | {mean(n, 0):.0f} | {mean(l, 0):.0f} | {mean(n, 1):.1f} | {mean(l, 1):.1f} | {mean(l, 0)/mean(n, 0):.2f} | {each} |")
if resync:
    regions, b, ms, open_s = resync
    print("\nResync after kill -9 of the agent under 4k random writes QD32 (before the next open is granted):\n")
    print("| dirty regions | bytes copied | copy ms | open wall s | copy MiB/s | nbdcopy same bytes MiB/s | resync / nbdcopy |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rate = b / 2**20 / max(ms, 1) * 1000
    crate = copy[0] / 2**20 / max(copy[1], 1) * 1000 if copy else float("nan")
    print(f"| {regions} | {b} | {ms:.0f} | {open_s:.2f} | {rate:.1f} | {crate:.1f} | {rate/crate:.2f} |")
if move:
    b, ms, iops0, lat0, iops1, lat1 = move
    rate = b / 2**20 / max(ms, 1) * 1000
    crate = move_copy[0] / 2**20 / max(move_copy[1], 1) * 1000 if move_copy else float("nan")
    print("\n`sanvol volume move` of the whole volume onto a new device under fio 4k random writes QD8 (same length before and during):\n")
    print("| bytes | move wall ms | move MiB/s | nbdcopy same bytes MiB/s | move / nbdcopy | fio IOPS before | during | during / before | longest request before ms | during ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {b} | {ms:.0f} | {rate:.1f} | {crate:.1f} | {rate/crate:.2f} | {iops0:.0f} | {iops1:.0f} | {iops1/max(iops0, 1):.2f} | {lat0:.1f} | {lat1:.1f} |")
if move_hot:
    b, ms, iops0, lat0, iops1, lat1, hot = move_hot
    print(f"\nThe same move back with fio writing only the first {hot} MiB (locality: only those regions are copied again at the recall point):\n")
    print("| bytes | move wall ms | fio IOPS before | during | during / before | longest request before ms | during ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {b} | {ms:.0f} | {iops0:.0f} | {iops1:.0f} | {iops1/max(iops0, 1):.2f} | {lat0:.1f} | {lat1:.1f} |")
PY
cat "$out"
echo "(saved to $out)"
