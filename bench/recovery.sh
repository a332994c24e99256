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
#   move     a third device is added; `sanvol volume move` copies a
#            volume's legs off dev1 onto it while fio (4k random writes
#            QD8) runs on that volume: move-paused for the volume of the
#            agent without the log (copied whole, its I/O paused),
#            move-online for a volume of an agent keeping it. Reported: the move's wall time and
#            rate (as a ratio of nbdcopy of the same bytes), fio's IOPS
#            before and during the move (ratio), and fio's longest request
#            during it: the pause at the recall point, where the regions
#            written during the online copy are copied again (see
#            metadata-server's server/precopy.rs).
#   move-online-hot  the same volume's legs off dev0, with fio writing
#            only its first eighth: the regions copied again at the
#            recall point are only those.
#
# Usage: bench/recovery.sh   (env: BENCH_SECONDS=10 per timed row,
#        BENCH_VOLUME_MIB=512)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
VOLUME_MIB=${BENCH_VOLUME_MIB:-512}
DEVICE_MIB=$((VOLUME_MIB * 6))
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

# --- moves under load: the copy of a whole volume's legs onto a new device.
# fio_json URI SECS [MIB] : "iops max_latency_ms" of a 4k random write QD8
# run over the first MIB of the volume (default: all of it; fio prints
# "fio: connected to NBD server" before its JSON).
fio_json() {
    fio --name=move --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=8 --size="${3:-$VOLUME_MIB}M" \
        --time_based --runtime="$2" --randrepeat=0 --output-format=json 2>/dev/null |
        python3 -c 'import json, sys; t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]["write"]; print("%.0f %.1f" % (j["iops"], j["clat_ns"]["max"] / 1e6))'
}
# move_row LABEL URI VOLUME FROM [MIB]: fio before (same length), then
# during `sanvol volume move VOLUME --from FROM` (to wherever has room).
move_row() {
    local before bytes
    bytes=$($BIN/sanvol volume show "$3" --json | python3 -c '
import json, sys
d = json.load(sys.stdin)["description"]
on = sum(1 for e in d["extents"] for l in e["legs"] if "dev%d" % l["device"] == sys.argv[1])
print(on * d["extent_bytes"])' "$4")
    before=$(fio_json "$2" "$MOVE_SECS" "${5:-}")
    fio_json "$2" "$MOVE_SECS" "${5:-}" >"$D/during.txt" &
    FIO_PID=$!
    sleep 1
    t0=$(date +%s.%N)
    $BIN/sanvol volume move "$3" --from "$4" >/dev/null
    t1=$(date +%s.%N)
    wait "$FIO_PID"
    echo "$1 $bytes $(python3 -c "print(($t1 - $t0) * 1000)") $before $(cat "$D/during.txt") ${5:-$VOLUME_MIB}" >>"$results"
    echo "done: $1" >&2
}
start_nbdkit dev2 memory "$((DEVICE_MIB * 2))M"
$BIN/sanvol device add "$(sock_uri dev2)" >/dev/null
MOVE_SECS=$((SECS > 6 ? SECS : 6))
moved=$((VOLUME_MIB * 1048576))
# The agent without the write-intent log: its volume is copied whole with
# its I/O paused (the server cannot tell which regions it wrote meanwhile).
move_row move-paused "${URI[nolog]}" vnolog dev1
t0=$(date +%s.%N)
nbdcopy --request-size=4194304 --requests=4 --connections=1 \
    -- [ nbdkit --exit-with-parent --filter=offset nbd socket="$D/dev0.sock" offset="$DATA_OFFSET" range="$moved" ] \
    [ nbdkit --exit-with-parent --filter=offset nbd socket="$D/dev2.sock" offset="$DATA_OFFSET" range="$moved" ]
t1=$(date +%s.%N)
echo "nbdcopy-move $moved $(python3 -c "print(($t1 - $t0) * 1000)")" >>"$results"
# An agent keeping the log (a fresh one: the first was killed above) on a
# volume of its own: copied online, then again where fio wrote meanwhile —
# everywhere, with random writes over the whole volume; an eighth of it,
# with writes over its first eighth.
start_agent log2
$BIN/sanvol volume create vmove "${VOLUME_MIB}M" --mirror 2 >/dev/null
URI[log2]=$($BIN/sanvol-agent attach vmove --control-socket "$D/agent-log2.sock")
move_row move-online "${URI[log2]}" vmove dev1
move_row move-online-hot "${URI[log2]}" vmove dev0 "$((VOLUME_MIB / 8))"

mkdir -p bench/results
out="bench/results/recovery-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$VOLUME_MIB" "$SECS" >"$out" <<'PY'
import sys, collections
w = collections.OrderedDict()
resync = copy = move_copy = None
moves = []
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "write":
        w.setdefault(f[1], {}).setdefault(f[2], []).append((float(f[3]), float(f[4])))
    elif f[0] == "resync":
        resync = (int(f[1] or 0), int(f[2] or 0), float(f[3] or 0), float(f[4]))
    elif f[0] == "nbdcopy":
        copy = (int(f[1]), float(f[2]))
    elif f[0].startswith("move"):
        moves.append((f[0], int(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), float(f[6]), int(f[7])))
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
if moves:
    crate = move_copy[0] / 2**20 / max(move_copy[1], 1) * 1000 if move_copy else float("nan")
    print("\n`sanvol volume move` of a whole volume onto another device under fio 4k random writes QD8 over the first MiB named (same length before and during). move-paused: the agent keeps no write-intent log, the copy runs with its I/O paused; move-online: the agent keeps it, the copy runs online and again where fio wrote meanwhile, paused. nbdcopy of the same bytes between the same kind of devices: %.1f MiB/s.\n" % crate)
    print("| row | fio MiB | bytes | move wall ms | move MiB/s | move / nbdcopy | fio IOPS before | during | during / before | longest request before ms | during ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, b, ms, iops0, lat0, iops1, lat1, mib in moves:
        rate = b / 2**20 / max(ms, 1) * 1000
        print(f"| {name} | {mib} | {b} | {ms:.0f} | {rate:.1f} | {rate/crate:.2f} | {iops0:.0f} | {iops1:.0f} | {iops1/max(iops0, 1):.2f} | {lat0:.1f} | {lat1:.1f} |")
PY
show_results "$out"
