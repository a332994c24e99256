#!/usr/bin/env bash
# Snapshot benchmark (issue: snapshots by client-side copy-on-write, the
# backup pseudo-device and sanvol-backup).
#
# Two nbdkit memory devices hold the pool; one agent attaches the volume.
#   writes     fio through the agent with no snapshot, then right after a
#              fresh snapshot (every chunk's first write copies it: "first
#              writes"), then again over the same range ("re-writes");
#              reported as ratios to no snapshot.
#   backup     sanvol-backup full of a snapshot, then incrementals after
#              rewriting 1% and 10% of the chunks; reported as ratios of the
#              full backup's time.
#   read       fio reading the snapshot from the backup pseudo-device,
#              through the bridge (sanvol-backup serve: a protected backup
#              channel, what a backup host elsewhere uses) and from the
#              server's own backup socket (plain NBD, one hop, for tools on
#              the server's host), vs reading the live volume through the
#              agent; reported as ratios, with the CPU per request of the
#              agent, the bridge and sanvol-mds.
#
# Usage: bench/snapshot.sh   (env: BENCH_SECONDS=10 per timed row,
#        BENCH_VOLUME_MIB=1024)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
VOLUME_MIB=${BENCH_VOLUME_MIB:-1024}
DEVICE_MIB=$((VOLUME_MIB * 4))
REGION_MIB=$((VOLUME_MIB / 4))

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
source bench/lib.sh
BIN=target/release
D=$BENCH_DIR

start_nbdkit dev0 memory "${DEVICE_MIB}M"
start_nbdkit dev1 memory "${DEVICE_MIB}M"
MDS_EXTRA="backup_socket = \"$D/backup.sock\""
start_pool dev0 dev1
start_agent agent
$BIN/sanvol volume create vol "${VOLUME_MIB}M" >/dev/null
URI=$($BIN/sanvol-agent attach vol --control-socket "$D/agent-agent.sock")
results="$D/results.txt"

# fio_pass URI RW BS DEPTH OFFSET_MIB SIZE_MIB : one pass over the range
# (random rows touch every block once); prints "iops mib_per_s".
fio_pass() {
    local uri=$1 rw=$2 bs=$3 depth=$4 offset=$5 size=$6
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --offset="${offset}M" --size="${size}M" --randrepeat=0 --output-format=json 2>/dev/null |
        python3 -c "$FIO_JSON_TO_IOPS_MIB"
}

fio_pass "$URI" write 1m 8 0 "$VOLUME_MIB" >/dev/null   # allocate the whole volume first

# --- writes: no snapshot / first writes / re-writes, each on a fresh range
ROWS=("1m-seq-write-qd8 write 1m 8" "4k-randwrite-qd32 randwrite 4k 32" "4k-randwrite-qd1 randwrite 4k 1")
n=0
for row in "${ROWS[@]}"; do
    read -r name rw bs depth <<<"$row"
    size=$REGION_MIB
    [ "$depth" = 1 ] && size=$((REGION_MIB / 8))   # QD1 4k is slow; a smaller range keeps the row short
    offset=$(( (n * REGION_MIB) % VOLUME_MIB ))
    echo "write $name none $(fio_pass "$URI" "$rw" "$bs" "$depth" "$offset" "$size")" >>"$results"
    $BIN/sanvol snapshot create vol "w$n" >/dev/null
    echo "write $name first $(fio_pass "$URI" "$rw" "$bs" "$depth" "$offset" "$size")" >>"$results"
    echo "write $name rewrite $(fio_pass "$URI" "$rw" "$bs" "$depth" "$offset" "$size")" >>"$results"
    $BIN/sanvol snapshot delete vol "w$n" >/dev/null
    n=$((n + 1))
    echo "done: $name" >&2
done

# --- backups: full, then incrementals after rewriting 1% and 10% of chunks
export SANVOL_MDS SANVOL_KEY SANVOL_SERVER_KEY
chunks=$((VOLUME_MIB * 16))
$BIN/sanvol snapshot create vol b0 >/dev/null
t0=$(date +%s.%N); $BIN/sanvol-backup full vol@b0 --to "$D/repo" >/dev/null 2>&1; t1=$(date +%s.%N)
echo "backup full 0 $(python3 -c "print($t1 - $t0)")" >>"$results"
prev=b0
for pct in 1 10; do
    io_mib=$((chunks * pct / 100 / 16))
    fio --name=touch --ioengine=nbd --uri="$URI" --rw=randwrite --bs=64k --iodepth=8 --size="${VOLUME_MIB}M" \
        --io_size="${io_mib}M" --randrepeat=0 >/dev/null 2>&1
    $BIN/sanvol snapshot create vol "b$pct" >/dev/null
    t0=$(date +%s.%N)
    $BIN/sanvol-backup incremental "vol@b$pct" --since "$prev" --to "$D/repo" >/dev/null 2>&1
    t1=$(date +%s.%N)
    echo "backup incremental $pct $(python3 -c "print($t1 - $t0)")" >>"$results"
    prev="b$pct"
done
echo "done: backups" >&2

# --- reads: the snapshot through the pseudo-device vs the live volume
start_ready bridge $BIN/sanvol-backup serve --socket "$D/snapshots.sock"
SNAP_URI="nbd+unix:///vol@b10?socket=$D/snapshots.sock"
LOCAL_URI="nbd+unix:///vol@b10?socket=$D/backup.sock"
# us_per_io IOPS TICKS : CPU microseconds per request of a process that
# spent TICKS clock ticks during a fio_nbd run of SECS (+1 ramp second).
us_per_io() {
    python3 -c 'import sys; iops, t, hz, secs = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("%.1f" % (t * 1e6 / hz / max(iops * (secs + 1), 1)))' "$1" "$2" "$(getconf CLK_TCK)" "$SECS"
}
for row in "1m-read-qd8 read 1m 8" "4k-randread-qd32 randread 4k 32"; do
    read -r name rw bs depth <<<"$row"
    a0=$(cpu_ticks "${PID_OF[agent-agent]}")
    r=$(fio_nbd "$URI" "$rw" "$bs" "$depth" "$REGION_MIB" "$SECS")
    a1=$(cpu_ticks "${PID_OF[agent-agent]}")
    echo "read $name live $r $(us_per_io "${r%% *}" $((a1 - a0)))" >>"$results"
    b0=$(cpu_ticks "${PID_OF[bridge]}"); m0=$(cpu_ticks "${PID_OF[mds]}")
    r=$(fio_nbd "$SNAP_URI" "$rw" "$bs" "$depth" "$REGION_MIB" "$SECS")
    b1=$(cpu_ticks "${PID_OF[bridge]}"); m1=$(cpu_ticks "${PID_OF[mds]}")
    echo "read $name snapshot $r $(us_per_io "${r%% *}" $((b1 - b0))) $(us_per_io "${r%% *}" $((m1 - m0)))" >>"$results"
    m0=$(cpu_ticks "${PID_OF[mds]}")
    r=$(fio_nbd "$LOCAL_URI" "$rw" "$bs" "$depth" "$REGION_MIB" "$SECS")
    m1=$(cpu_ticks "${PID_OF[mds]}")
    echo "read $name local $r $(us_per_io "${r%% *}" $((m1 - m0)))" >>"$results"
done
echo "done: reads" >&2
$BIN/sanvol-agent detach vol --control-socket "$D/agent-agent.sock"

mkdir -p bench/results
out="bench/results/snapshot-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$VOLUME_MIB" "$SECS" >"$out" <<'PY'
import sys, collections
w, b, r = collections.OrderedDict(), {}, collections.OrderedDict()
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "write":
        w.setdefault(f[1], {})[f[2]] = (float(f[3]), float(f[4]))
    elif f[0] == "backup":
        b[(f[1], int(f[2]))] = float(f[3])
    else:
        r.setdefault(f[1], {})[f[2]] = [float(x) for x in f[3:]]
print(f"volume {sys.argv[2]} MiB on two nbdkit memory devices, one agent, unix sockets\n")
print("Writes through the agent (one pass over a fresh range per phase):\n")
print("| row | no snapshot IOPS | first writes IOPS | re-writes IOPS | first / none | re-write / none |")
print("|---|---:|---:|---:|---:|---:|")
for name, x in w.items():
    n, f, rw = x["none"][0], x["first"][0], x["rewrite"][0]
    print(f"| {name} | {n:.0f} | {f:.0f} | {rw:.0f} | {f/n:.2f} | {rw/n:.2f} |")
full = b[("full", 0)]
print("\nBackups (sanvol-backup, wall time):\n")
print("| backup | seconds | / full |")
print("|---|---:|---:|")
print(f"| full | {full:.2f} | 1.00 |")
for pct in (1, 10):
    t = b[("incremental", pct)]
    print(f"| incremental, {pct}% of chunks changed | {t:.2f} | {t/full:.3f} |")
print(f"\nReads ({sys.argv[3]} s per row):\n")
print("| row | live volume (agent) MiB/s | snapshot via bridge MiB/s | snapshot via backup socket MiB/s | bridge / live | backup socket / live | CPU µs/request: agent (live) / bridge + server (bridge) / server (backup socket) |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, x in r.items():
    l, s, o = x["live"][1], x["snapshot"][1], x["local"][1]
    cpu = f"{x['live'][2]:.1f} / {x['snapshot'][2]:.1f} + {x['snapshot'][3]:.1f} / {x['local'][2]:.1f}"
    print(f"| {name} | {l:.1f} | {s:.1f} | {o:.1f} | {s/l:.2f} | {o/l:.2f} | {cpu} |")
PY
show_results "$out"
